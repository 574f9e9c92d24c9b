"""Test-set likelihood of every model file trained for the same budget.

    python benchmarks/likelihood.py [--steps N] [--models ddpm vae ...] [--fresh]

Trains each model file present through its command line on 8gaussians, checkerboard and rings
(batch 256) and on digits (batch 64), with the model's preset for the dataset (its own number of
steps, or N steps for every model with --steps), then runs its `--eval` on the test split. Each
row states its steps and training wall time. Writes a markdown table (test
NLL in nats next to the true entropy for the 2D sets, bits/dim for digits) into README.md and
benchmarks/results/likelihood.md, and one figure of the learned density of every model that has
one, next to the true one (benchmarks/results/likelihood_density.png). Runs are kept in
runs/bench/ and reused when the same command finished before (--fresh retrains).
"""
import argparse
import json
import re
import sys

import numpy as np

from _runs import (RESULTS, ROOT, Unsupported, last_event, merge_rows, model_of, present_systems, provenance,
                   read_metrics, run, shown, train, training_length, write_section)

sys.path.insert(0, str(ROOT))
import common  # noqa: E402

POINTS = ("8gaussians", "checkerboard", "rings")
BATCH = {"digits": 64, **{d: 256 for d in POINTS}}


# How close an exact density should come to the true entropy (nats), and the files whose 2D NLL
# is an upper bound on -log p(x) instead (their gaps are explained in their results pages)
TARGET = {"8gaussians": 0.05, "checkerboard": 0.05, "rings": 0.10}
BOUNDS = ("vae", "vqvae", "ddpm")
WHY = (  # the reading of the gaps; the measurements behind it are in the results pages it links
    "Each density evaluator is exact for an exact model (oracle tests: a Gaussian mixture's exact score, "
    "velocity or energy reproduces its log-density), so the gaps are the trained models'. A flow is a smooth "
    "bijection of a Gaussian: it thins the gaps between the rings and between the checkerboard's cells but "
    "cannot empty them, and what it leaves there falls with capacity and steps ([realnvp](benchmarks/results/"
    "realnvp.md); FFJORD trained longer than its preset comes within reach of the rings' target, "
    "[ffjord](benchmarks/results/ffjord.md)). score_sde.py's gap is its learned score's error: it fell with "
    "the steps and with the likelihood weighting (measured in the comment on score_sde.py's rings preset). "
    "ebm.py's Langevin chains do "
    "not carry mass between modes while it trains, so the modes' masses stay uneven "
    "([ebm](benchmarks/results/ebm.md)). The bounds: vae.py's gap is its model's misfit, a decoder noise wider "
    "than the modes, not the bound's looseness ([vae](benchmarks/results/vae.md)); vqvae.py's is mostly the "
    "bound's, which counts only the encoder's code of a mixture over the codes "
    "([vqvae](benchmarks/results/vqvae.md)); ddpm.py's is the low-noise steps that must resolve sharp edges "
    "and thin rings ([ddpm](benchmarks/results/ddpm.md), by term)."
)


def gaps(merged, entropy):
    """The sentence under the table: which exact-density cells are within TARGET of the entropy."""
    met, unmet = [], []
    for m, cells, _ in merged:
        if model_of(m) in BOUNDS:
            continue
        for d, c in zip(POINTS, cells):
            if c != "n/a":
                gap = float(c) - entropy[d][0]
                (met if gap <= TARGET[d] else unmet).append(f"{shown(m)} {d} ({gap:+.3f})")
    return (f"Exact densities within {TARGET['8gaussians']:.2f} nats of the entropy ({TARGET['rings']:.2f} on rings): "
            f"{len(met)} of {len(met) + len(unmet)} cells; the others: {', '.join(unmet) or 'none'}.")


# Flags for --eval where a model's default is too slow for a benchmark of every model on CPU
EVAL_FLAGS = {("vae", "points"): ["--k-eval", "1000"]}  # IWAE-1000 instead of IWAE-5000 on 10000 points


def evaluate(model, dataset, steps, fresh):
    """(nll nats, bits/dim or None, run folder) of one system on one dataset, or None if refused;
    steps=None trains for the model file's own default.
    A finished evaluation of the same training run is reused."""
    try:
        out = train(model, dataset, steps, ["--batch-size", BATCH[dataset]], fresh)
        if not any(r.get("event") == "eval" for r in read_metrics(out)) or not (out / "density.npz").exists() \
                and dataset in POINTS:
            flags = EVAL_FLAGS.get((model_of(model), "points" if dataset in POINTS else "image"), [])
            run(model_of(model), ["--eval", out / "ckpt.pt", "--out", out, *flags], out / "log.txt")
    except Unsupported:
        return None
    e = last_event(out, "eval")
    if "nll" not in e:  # a model file without a likelihood (ddim.py): n/a in the table
        return None
    return e["nll"], e.get("bits_per_dim"), out


def budget(label, results):
    """The training column of a row: steps and wall time on the 2D sets (the slowest) / digits."""
    def part(datasets):
        runs = [training_length(results[(label, d)][2]) for d in datasets if (label, d) in results]
        if not runs:
            return "-"
        steps = sorted({s for s, _ in runs if s})
        seconds = [t for _, t in runs if t]
        return "/".join(map(str, steps)) + " steps" + (f", {max(seconds) / 60:.1f} min" if seconds else "")
    return f"{part(POINTS)} / {part(['digits'])}"


def density_grids(label, results=None):
    """{dataset: (n, n) log-density} of a system's 2D runs, stored (float16) in results/density/
    when `results` holds this run's, so the figure can be redrawn after a partial run."""
    path = RESULTS / "density" / f"{re.sub(r'[^A-Za-z0-9_.]+', '-', label)}.npz"
    if results is not None:
        grids = {d: np.load(results[(label, d)][2] / "density.npz")["log_density"]
                 for d in POINTS if (label, d) in results}
        if grids:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, **{d: np.clip(g, -1e4, None).astype(np.float16) for d, g in grids.items()})
    return dict(np.load(path)) if path.exists() else {}


def figure(labels, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grids = {label: density_grids(label) for label in labels}
    fig, axes = plt.subplots(len(POINTS), 1 + len(labels), figsize=(2.4 * (1 + len(labels)), 2.5 * len(POINTS)),
                             squeeze=False)
    for i, d in enumerate(POINTS):
        ds = common.load_dataset(d, "test")
        panels = [("true", common.density_on_grid(ds.log_prob, ds.info.lim, n=128))]
        panels += [(label.replace(" --", "\n--"), grids[label].get(d)) for label in labels]
        for ax, (title, logp) in zip(axes[i], panels):
            if logp is not None:
                # the colour scale stops at the 99.5th percentile: bounds estimated by sampling
                # (VAE, DDPM) have heavy-tailed grid values that would otherwise black out the picture
                dens = np.exp(logp.astype(np.float64))
                ax.imshow(dens, origin="lower", extent=(-ds.info.lim, ds.info.lim, -ds.info.lim, ds.info.lim), cmap="magma",
                          vmin=0, vmax=np.percentile(dens, 99.5))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title if i == 0 else "", fontsize=8)
        axes[i][0].set_ylabel(d)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="the same steps for every model (default: each file's own)")
    p.add_argument("--models", nargs="*", default=None,
                   help="systems (labels of _runs.SYSTEMS) to measure now; the table keeps the others' stored rows "
                        "(with no label: redraw the table from the stored rows)")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--points-only", action="store_true",
                   help="measure the 2D sets only; each row keeps its stored digits cell and digits training time")
    args = p.parse_args()
    labels = present_systems() if args.models is None else args.models
    results = {}
    for m in labels:
        for d in POINTS if args.points_only else (*POINTS, "digits"):
            print(f"{m} on {d} ...", flush=True)
            r = evaluate(m, d, args.steps, args.fresh)
            if r:
                results[(m, d)] = r
    rows, path = {}, RESULTS / "likelihood.json"
    before = json.loads(path.read_text()) if args.points_only and path.exists() else {}
    for m in labels:
        density_grids(m, results)
        cells = [f"{results[(m, d)][0]:.3f}" if (m, d) in results else "n/a" for d in POINTS]
        dig = results.get((m, "digits"))
        rows[m] = cells + [f"{dig[1]:.3f}" if dig and dig[1] is not None else "n/a", budget(m, results)]
        if args.points_only:  # the digits cell and its training time as stored (rows without a training
            old = before.get(m, {}).get("cells", [])  # column ran the shared 2000 steps)
            rows[m][len(POINTS)] = old[len(POINTS)] if old else "n/a"
            rows[m][-1] = rows[m][-1].split(" / ")[0] + " / " + (
                old[-1].split(" / ")[-1] if len(old) > len(POINTS) + 1 else "2000 steps" if old else "-")
    cmd = "python benchmarks/likelihood.py" + (f" --steps {args.steps}" if args.steps else "") + \
        (" --points-only" if args.points_only else "") + \
        (" --models " + " ".join(f"'{m}'" for m in args.models) if args.models else "")
    merged = merge_rows("likelihood", rows, cmd)
    entropy = {d: common.entropy_estimate(d, n=1_000_000) for d in POINTS}
    head = "| model | " + " | ".join(f"{d} NLL (nats)" for d in POINTS) + " | digits (bits/dim) | training |"
    lines = [head, "|---" * (len(POINTS) + 3) + "|",
             "| true entropy | " + " | ".join(f"{entropy[d][0]:.3f} ± {entropy[d][1]:.3f}" for d in POINTS) + " | | |"]
    # rows stored before the training column existed ran the shared budget of 2000 steps
    lines += [f"| {shown(m)} | " + " | ".join(cells + ["2000 steps"] * (len(cells) == len(POINTS) + 1)) + " |"
              for m, cells, _ in merged]
    with_density = [m for m, cells, _ in merged if any(c != "n/a" for c in cells[:len(POINTS)])]
    stored = [m for m in with_density if density_grids(m)]
    if stored == with_density:  # every row's density is stored: the one figure
        figure(with_density, RESULTS / "likelihood_density.png")
        pictures = "![learned densities](benchmarks/results/likelihood_density.png)"
    else:  # rows measured before densities were stored keep the figure they were drawn in
        figure(stored, RESULTS / "likelihood_density_recent.png")
        pictures = ("![learned densities](benchmarks/results/likelihood_density.png)\n\n"
                    "Rows measured since (their densities):\n\n"
                    "![learned densities, recent rows](benchmarks/results/likelihood_density_recent.png)")
    md = (f"### Likelihood\n\nTest-set NLL after training with each model's preset (batch {BATCH['8gaussians']} on the "
          f"2D sets, {BATCH['digits']} on digits); the last column gives the training steps and wall time "
          "(2D sets, the slowest of the three / digits), which depends on the machine's load (rows measured "
          "beside other jobs name the load where it was recorded; the 2026-12-06 rows without it ran at load "
          "averages of 20-55 on 2 cores, many times a quiet machine's time; each default run's time on a quiet "
          "machine: [points](benchmarks/results/points.md)). The 2D values are continuous "
          "NLLs (or their upper bounds, for models with a variational bound), to be read against the true "
          "entropy; digits bits/dim are of the 17-level data; n/a where the model file reports no likelihood "
          "(its `--eval` says why); rows measured with `--points-only` keep the digits cell of their "
          "previous measurement. In the figure each panel's colour scale ends at "
          "its 99.5th percentile. "
          "Evaluation flags beyond the defaults: "
          + "; ".join(f"`{m}.py` on {kind} data `{' '.join(f)}`" for (m, kind), f in EVAL_FLAGS.items())
          + f". {provenance(merged)}\n\n" + "\n".join(lines) + f"\n\n{gaps(merged, entropy)} {WHY}\n\n"
          + pictures)
    write_section("likelihood", md)
    print(md)


if __name__ == "__main__":
    main()
