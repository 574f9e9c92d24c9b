"""score_sde.py on 8gaussians: the exact likelihood of each SDE, and the samplers' speed and quality.

    python benchmarks/score_sde_table.py [--steps 5000] [--n 2000] [--fresh]

Trains score_sde.py on 8gaussians through its command line once per SDE (ve, vp, subvp), with
its defaults otherwise (runs kept in runs/bench/score_sde-8gaussians-<steps>-<sde> and reused
when the same command finished before), and runs its --eval: the exact test NLL by the
probability-flow ODE next to the true entropy, the network evaluations (NFE) of one ODE solve,
and the mass of the ODE density on the 128 x 128 grid. Then, in this process, draws `--n` samples
from each checkpoint with each sampler (pc, em, ode; ald on the VE model), timing them, and
scores them by the squared maximum mean discrepancy to the test set with a Gaussian kernel of
width 0.3 (the std of the mixture's components), unbiased; the floor is the same for n fresh
draws of the data. Writes the tables into benchmarks/results/score_sde.md
(between <!-- score-sde-table:start --> and <!-- score-sde-table:end -->). About 10 minutes of
one CPU core at the defaults.
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

SDES = ("vp", "subvp", "ve")
SAMPLERS = ("pc", "em", "ode", "ald")
WIDTH = 0.3


def train(sde, steps, fresh):
    """The run folder of score_sde.py trained on 8gaussians with --sde `sde`, evaluated."""
    out = RUNS / f"score_sde-8gaussians-{steps}-{sde}"
    command = {"steps": steps, "sde": sde}
    stamp_file = out / "command.json"
    if fresh or not (out / "ckpt.pt").exists() or not stamp_file.exists() or json.loads(stamp_file.read_text()) != command:
        out.mkdir(parents=True, exist_ok=True)
        for old in out.iterdir():
            if old.is_file():
                old.unlink()
        run("score_sde", ["--dataset", "8gaussians", "--sde", sde, "--steps", steps, "--save-every", steps, "--out", out],
            out / "log.txt")
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5000, help="training steps of each run")
    p.add_argument("--n", type=int, default=2000, help="samples per sampler")
    p.add_argument("--fresh", action="store_true", help="train afresh even if the runs exist")
    args = p.parse_args()
    test = common.load_dataset("8gaussians", "test")
    fresh_data = test.sample(args.n, torch.Generator().manual_seed(123))
    entropy, entropy_se = common.entropy_estimate("8gaussians", n=1_000_000)
    likelihood_rows, sampler_rows = [], []
    for sde_name in SDES:
        print(f"{sde_name} ...", flush=True)
        out = train(sde_name, args.steps, args.fresh)
        e = last_event(out, "eval")
        likelihood_rows.append(f"| {sde_name} | {e['nll']:.3f} ± {e['nll_se']:.3f} | {e['nfe']:.0f} | "
                               f"{e['density_mass']:.4f} |")
        (net, sde), cfg, info = score_sde.load(out / "ckpt.pt")
        for sampler in SAMPLERS:
            if sampler == "ald" and sde_name != "ve":
                continue
            run_cfg = dataclasses.replace(cfg, sampler=sampler)
            g = torch.Generator().manual_seed(0)
            start = time.perf_counter()
            x, nfe = score_sde.sample_with(run_cfg, net, sde, (args.n, *info.shape), "cpu", g)
            seconds = time.perf_counter() - start
            sampler_rows.append(f"| {sde_name} | {sampler} | {nfe} | {args.n / seconds:.0f} | "
                                f"{1e3 * mmd2(x, test.data):.2f} |")
    cfg = score_sde.Config()
    cmd = "python benchmarks/score_sde_table.py" + (f" --steps {args.steps}" if args.steps != 5000 else "") + \
        (f" --n {args.n}" if args.n != 2000 else "")
    md = (f"score_sde.py on 8gaussians, trained {args.steps} steps per SDE with the defaults otherwise (batch "
          f"{cfg.batch_size}, MLP {cfg.hidden} wide with {cfg.depth} blocks; VE sigma {cfg.sigma_min}..{cfg.sigma_max}, "
          f"VP and sub-VP beta {cfg.beta_min}..{cfg.beta_max}). Exact test NLL by the probability-flow ODE "
          f"(rtol = atol = {cfg.rtol:g}, exact divergence) with its standard error over the 10000 test points; the "
          f"true entropy is {entropy:.3f} ± {entropy_se:.3f} nats. NFE: network evaluations of one ODE solve "
          f"(the mean over batches of {cfg.batch_size}); mass: the ODE density summed over the 128 x 128 grid of "
          f"[-4, 4]^2 (rtol = atol = {cfg.density_tol:g}). Produced by {stamp(cmd)}.\n\n"
          "| SDE | test NLL (nats) | NFE | mass on the grid |\n|---|---|---|---|\n" + "\n".join(likelihood_rows) +
          f"\n\n{args.n} samples per sampler ({cfg.sample_steps} steps for pc and em, pc with one corrector step at "
          f"snr {cfg.snr}; ode at rtol = atol = {cfg.rtol:g}; ald: 10 levels of {cfg.sample_steps // 10} steps, eps "
          f"{cfg.ald_eps:g}), one process on the CPU. MMD: squared maximum mean discrepancy to the 10000 test points "
          f"(Gaussian kernel of width {WIDTH}, unbiased, x 1000; {args.n} fresh draws of the data give "
          f"{1e3 * mmd2(fresh_data, test.data):.2f}).\n\n"
          "| SDE | sampler | NFE | samples/s | MMD^2 x 1000 |\n|---|---|---|---|---|\n" + "\n".join(sampler_rows))
    write_section("score-sde-table", md, RESULTS / "score_sde.md")
    print(md)


if __name__ == "__main__":
    main()
