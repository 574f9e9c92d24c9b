"""score_sde.py on 8gaussians: the exact likelihood of each system, and the samplers' speed and quality.

    python benchmarks/score_sde_table.py [--systems vp ncsn ...] [--steps 5000] [--n 2000] [--fresh]

Trains score_sde.py on 8gaussians through its command line once per system (SYSTEMS: the three
SDEs with the default denoising loss, exact score matching, the likelihood weighting with
importance-sampled t, and NCSN; runs kept in runs/bench/score_sde-8gaussians-<steps>-<system>
and reused when the same command finished before), and runs its --eval: the exact test NLL by
the probability-flow ODE next to the true entropy, the network evaluations (NFE) of one ODE
solve, and the mass of the ODE density on the 128 x 128 grid (NCSN has no likelihood: its test
objective, Eq. 6, instead). Then, in this process, draws `--n` samples from each checkpoint with
each sampler (pc, em, ode; ald on the VE model and NCSN), timing them, and scores them by the
squared maximum mean discrepancy to the test set with a Gaussian kernel of width 0.3 (the std of
the mixture's components), unbiased; the floor is the same for n fresh draws of the data.
--systems measures those rows now and keeps the others stored in
benchmarks/results/score_sde_table.json (each row with its command, machine and date). Writes
one table of each kind into benchmarks/results/score_sde.md (between
<!-- score-sde-table:start --> and <!-- score-sde-table:end -->). About 3 minutes of one quiet
CPU core per system.
"""
import argparse
import dataclasses
import json
import sys
import time

import torch

from _runs import RESULTS, ROOT, RUNS, last_event, run, stamp, write_section

sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import score_sde  # noqa: E402

# label -> flags beyond the defaults; the run folder is named by the slug
SYSTEMS = {
    "vp": ["--sde", "vp"],
    "subvp": ["--sde", "subvp"],
    "ve": ["--sde", "ve"],
    "vp --loss sm": ["--sde", "vp", "--loss", "sm"],
    "vp --weighting likelihood --importance-sampling": ["--sde", "vp", "--weighting", "likelihood",
                                                         "--importance-sampling"],
    "subvp --weighting likelihood --importance-sampling": ["--sde", "subvp", "--weighting", "likelihood",
                                                            "--importance-sampling"],
    "ncsn": ["--sde", "ncsn"],
}
SAMPLERS = ("pc", "em", "ode", "ald")
WIDTH = 0.3
STORE = RESULTS / "score_sde_table.json"


def slug(label):
    return label.replace("--", "").replace(" ", "-")


def train(label, steps, fresh):
    """The run folder of score_sde.py trained on 8gaussians as the system `label`, evaluated."""
    out = RUNS / f"score_sde-8gaussians-{steps}-{slug(label)}"
    command = {"steps": steps, "flags": SYSTEMS[label]}
    stamp_file = out / "command.json"
    old = json.loads(stamp_file.read_text()) if stamp_file.exists() else None
    if old == {"steps": steps, "sde": label}:   # the stamp of the three SDE rows before the other systems
        old = command
    if fresh or not (out / "ckpt.pt").exists() or old != command:
        out.mkdir(parents=True, exist_ok=True)
        for f in out.iterdir():
            if f.is_file():
                f.unlink()
        run("score_sde", ["--dataset", "8gaussians", *SYSTEMS[label], "--steps", steps, "--save-every", steps,
                          "--out", out], out / "log.txt")
        run("score_sde", ["--eval", out / "ckpt.pt", "--out", out], out / "log.txt")
        stamp_file.write_text(json.dumps(command))
    return out


def mmd2(x, y, width=WIDTH):
    """Unbiased squared MMD between samples x (n, 2) and y (m, 2), Gaussian kernel."""
    x, y = x.double(), y.double()

    def k(a, b):
        return torch.exp(-torch.cdist(a, b) ** 2 / (2 * width ** 2))
    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * k(x, y).mean()).item()


def measure(label, args, test):
    """(the likelihood row's cells, [the sampler rows' cells]) of one system."""
    out = train(label, args.steps, args.fresh)
    e = last_event(out, "eval")
    if "nll" in e:
        cells = [f"{e['nll']:.3f} ± {e['nll_se']:.3f}", f"{e['nfe']:.0f}", f"{e['density_mass']:.4f}"]
    else:   # NCSN: Eq. 6 on the test set
        cells = [f"no likelihood; test objective (Eq. 6) {e['loss']:.3f} ± {e['loss_se']:.3f}", "", ""]
    (net, sde), cfg, info = score_sde.load(out / "ckpt.pt")
    rows = []
    samplers = ("ald",) if cfg.sde == "ncsn" else SAMPLERS if cfg.sde == "ve" else SAMPLERS[:3]
    for sampler in samplers:
        run_cfg = dataclasses.replace(cfg, sampler=sampler)
        g = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        x, nfe = score_sde.sample_with(run_cfg, net, sde, (args.n, *info.shape), "cpu", g)
        seconds = time.perf_counter() - start
        rows.append([sampler, f"{nfe}", f"{args.n / seconds:.0f}", f"{1e3 * mmd2(x, test.data):.2f}"])
    return cells, rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", nargs="*", default=None, choices=list(SYSTEMS),
                   help="systems to measure now (default: all); the others' stored rows are kept")
    p.add_argument("--steps", type=int, default=5000, help="training steps of each run")
    p.add_argument("--n", type=int, default=2000, help="samples per sampler")
    p.add_argument("--fresh", action="store_true", help="train afresh even if the runs exist")
    args = p.parse_args()
    test = common.load_dataset("8gaussians", "test")
    fresh_data = test.sample(args.n, torch.Generator().manual_seed(123))
    entropy, entropy_se = common.entropy_estimate("8gaussians", n=1_000_000)
    cmd = "python benchmarks/score_sde_table.py" + (" --systems " + " ".join(f"'{s}'" for s in args.systems)
                                                    if args.systems else "") + \
        (f" --steps {args.steps}" if args.steps != 5000 else "") + (f" --n {args.n}" if args.n != 2000 else "")
    stored = json.loads(STORE.read_text()) if STORE.exists() else {}
    for label in args.systems or SYSTEMS:
        print(f"{label} ...", flush=True)
        cells, rows = measure(label, args, test)
        stored[label] = {"likelihood": cells, "samplers": rows, "steps": args.steps, "measured": stamp(cmd)}
    STORE.write_text(json.dumps(stored, indent=1) + "\n")
    labels = [label for label in SYSTEMS if label in stored]
    measured = {}
    for label in labels:
        measured.setdefault(stored[label]["measured"], []).append(label)
    provenance = "; ".join(f"rows {', '.join(ls)}: {m}" for m, ls in measured.items())
    cfg = score_sde.Config()
    md = (f"score_sde.py on 8gaussians, each system trained {', '.join(sorted({str(stored[s]['steps']) for s in labels}))} "
          f"steps with the defaults otherwise (batch {cfg.batch_size}, MLP {cfg.hidden} wide with {cfg.depth} blocks; VE "
          f"and NCSN sigma {cfg.sigma_min}..{cfg.sigma_max}, NCSN on {cfg.n_levels} geometric levels; VP and sub-VP beta "
          f"{cfg.beta_min}..{cfg.beta_max}); `--loss sm`: exact score matching; `--weighting likelihood "
          f"--importance-sampling`: lambda = g^2 with t drawn by g^2 / sigma^2 (Song et al. 2021b). Exact test NLL by "
          f"the probability-flow ODE (rtol = atol = {cfg.rtol:g}, exact divergence) with its standard error over the "
          f"10000 test points; the true entropy is {entropy:.3f} ± {entropy_se:.3f} nats. NFE: network evaluations of "
          f"one ODE solve (the mean over batches of {cfg.batch_size}); mass: the ODE density summed over the 128 x 128 "
          f"grid of [-4, 4]^2 (rtol = atol = {cfg.density_tol:g}). NCSN has no likelihood: its test objective (Eq. 6, "
          f"lambda = sigma^2, summed over the 2 dimensions, every level). Produced by: {provenance}.\n\n"
          "| system | test NLL (nats) | NFE | mass on the grid |\n|---|---|---|---|\n"
          + "\n".join(f"| {label} | " + " | ".join(stored[label]["likelihood"]) + " |" for label in labels)
          + f"\n\n{args.n} samples per sampler ({cfg.sample_steps} steps for pc and em, pc with one corrector step at "
          f"snr {cfg.snr}; ode at rtol = atol = {cfg.rtol:g}; ald: {cfg.n_levels} levels of "
          f"{cfg.sample_steps // cfg.n_levels} steps, eps {cfg.ald_eps:g}), one process on the CPU (samples/s depend on "
          f"the machine's load at the time of each row). MMD: squared maximum mean discrepancy to the 10000 test points "
          f"(Gaussian kernel of width {WIDTH}, unbiased, x 1000; {args.n} fresh draws of the data give "
          f"{1e3 * mmd2(fresh_data, test.data):.2f}).\n\n"
          "| system | sampler | NFE | samples/s | MMD^2 x 1000 |\n|---|---|---|---|---|\n"
          + "\n".join(f"| {label} | " + " | ".join(row) + " |" for label in labels for row in stored[label]["samplers"]))
    write_section("score-sde-table", md, RESULTS / "score_sde.md")
    print(md)


if __name__ == "__main__":
    main()
