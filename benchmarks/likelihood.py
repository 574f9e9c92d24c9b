"""Test-set likelihood of every model file trained for the same budget.

    python benchmarks/likelihood.py [--steps 2000] [--models ddpm vae ...] [--fresh]

Trains each model file present through its command line on 8gaussians, checkerboard and rings
(batch 256) and on digits (batch 64), for the same number of steps with the model's preset for
the dataset otherwise, then runs its `--eval` on the test split. Writes a markdown table (test
NLL in nats next to the true entropy for the 2D sets, bits/dim for digits) into README.md and
benchmarks/results/likelihood.md, and one figure of the learned density of every model that has
one, next to the true one (benchmarks/results/likelihood_density.png). Runs are kept in
runs/bench/ and reused when the same command finished before (--fresh retrains).
"""
import argparse
import sys

import numpy as np

from _runs import (RESULTS, ROOT, Unsupported, last_event, model_of, present_systems, read_metrics, run, shown,
                   stamp, train, write_section)

sys.path.insert(0, str(ROOT))
import common  # noqa: E402

POINTS = ("8gaussians", "checkerboard", "rings")
BATCH = {"digits": 64, **{d: 256 for d in POINTS}}


# Flags for --eval where a model's default is too slow for a benchmark of every model on CPU
EVAL_FLAGS = {("vae", "points"): ["--k-eval", "1000"]}  # IWAE-1000 instead of IWAE-5000 on 10000 points


def evaluate(model, dataset, steps, fresh):
    """(nll nats, bits/dim or None, run folder) of one system on one dataset, or None if refused.
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


def figure(results, models, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(POINTS), 1 + len(models), figsize=(2.4 * (1 + len(models)), 2.5 * len(POINTS)),
                             squeeze=False)
    for i, d in enumerate(POINTS):
        ds = common.load_dataset(d, "test")
        panels = [("true", common.density_on_grid(ds.log_prob, ds.info.lim, n=128))]
        for m in models:
            r = results.get((m, d))
            panels.append((m, np.load(r[2] / "density.npz")["log_density"] if r else None))
        for ax, (title, logp) in zip(axes[i], panels):
            if logp is not None:
                # the colour scale stops at the 99.5th percentile: bounds estimated by sampling
                # (VAE, DDPM) have heavy-tailed grid values that would otherwise black out the picture
                dens = np.exp(logp)
                ax.imshow(dens, origin="lower", extent=(-ds.info.lim, ds.info.lim, -ds.info.lim, ds.info.lim), cmap="magma",
                          vmin=0, vmax=np.percentile(dens, 99.5))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title if i == 0 else "")
        axes[i][0].set_ylabel(d)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--models", nargs="*", default=None, help="systems (labels of _runs.SYSTEMS); default all")
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args()
    models = args.models or present_systems()
    results = {}
    for m in models:
        for d in (*POINTS, "digits"):
            print(f"{m} on {d} ...", flush=True)
            r = evaluate(m, d, args.steps, args.fresh)
            if r:
                results[(m, d)] = r
    entropy = {d: common.entropy_estimate(d, n=1_000_000) for d in POINTS}
    head = "| model | " + " | ".join(f"{d} NLL (nats)" for d in POINTS) + " | digits (bits/dim) |"
    lines = [head, "|---" * (len(POINTS) + 2) + "|",
             "| true entropy | " + " | ".join(f"{entropy[d][0]:.3f} ± {entropy[d][1]:.3f}" for d in POINTS) + " | |"]
    for m in models:
        cells = [f"{results[(m, d)][0]:.3f}" if (m, d) in results else "n/a" for d in POINTS]
        dig = results.get((m, "digits"))
        cells.append(f"{dig[1]:.3f}" if dig and dig[1] is not None else "n/a")
        lines.append(f"| {shown(m)} | " + " | ".join(cells) + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    figure(results, [m for m in models if any((m, d) in results for d in POINTS)], RESULTS / "likelihood_density.png")
    cmd = "python benchmarks/likelihood.py" + (f" --steps {args.steps}" if args.steps != 2000 else "")
    md = (f"### Likelihood\n\nTest-set NLL after {args.steps} training steps (batch {BATCH['8gaussians']} on the "
          f"2D sets, {BATCH['digits']} on digits; otherwise each model's preset). The 2D values are continuous "
          "NLLs (or their upper bounds, for models with a variational bound), to be read against the true "
          "entropy; digits bits/dim are of the 17-level data; n/a where the model file reports no likelihood "
          "(its `--eval` says why). In the figure each panel's colour scale ends at "
          "its 99.5th percentile. Evaluation flags beyond the defaults: "
          + "; ".join(f"`{m}.py` on {kind} data `{' '.join(f)}`" for (m, kind), f in EVAL_FLAGS.items())
          + ". Produced by "
          f"{stamp(cmd)}.\n\n" + "\n".join(lines) +
          "\n\n![learned densities](benchmarks/results/likelihood_density.png)")
    write_section("likelihood", md)
    print(md)


if __name__ == "__main__":
    main()
