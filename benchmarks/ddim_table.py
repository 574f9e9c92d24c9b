"""DDIM's Table 1 on digits: sample quality and sampling speed against the steps S and eta.

    python benchmarks/ddim_table.py [--steps 2000] [--n 1000] [--fresh]

Trains ddim.py on digits through its command line at batch 64 (the run of quality.py,
runs/bench/ddim-digits-<steps>, is reused when the command is the same), loads the checkpoint with
ddim.load (the EMA weights --sample uses) and, in this process, draws `--n` samples from one
shared x_T for every S in {10, 20, 50, 100, 1000} and eta in {0, 0.5, 1} by the paper's procedure
(Song et al.'s runner: tau "uniform", range(0, T, T // S), as for their data sets other than
CIFAR-10, and x0_hat not clipped, as their generalized_steps; `ddim.py --sample --no-clip-x0`),
timing each. Sample quality is the Frechet
distance of quality.py (its classifier's features of the samples against the 300 test images;
lower is better); speed is images per second on this machine. Song et al.'s CIFAR-10 FIDs
(Table 1) stand beside it as context: a different data set and a different measure, the same
trend. Writes the tables into benchmarks/results/ddim.md
(between <!-- ddim-table:start --> and <!-- ddim-table:end -->). The cost is about
3 x 1180 network calls on batches of `--n` images: some 20 minutes on 2 CPU cores for n = 1000.
"""
import argparse
import sys
import time

import torch

from _runs import RESULTS, ROOT, stamp, train, write_section
from digits_classifier import load_classifier
from quality import features, frechet_distance

sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import ddim  # noqa: E402

STEPS = (10, 20, 50, 100, 1000)
ETAS = (0.0, 0.5, 1.0)
# Song et al. 2021 (arXiv 2010.02502), Table 1, CIFAR-10 FID for S = 10, 20, 50, 100, 1000
# (../shared/PAPERS.md); eta = 0.5 is not recorded there.
PUBLISHED = {0.0: (13.36, 6.84, 4.67, 4.16, 4.04), 1.0: (41.07, 18.36, 8.01, 5.78, 4.73)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="training steps of the ddim.py run")
    p.add_argument("--n", type=int, default=1000, help="samples per cell")
    p.add_argument("--fresh", action="store_true", help="train afresh even if the run exists")
    args = p.parse_args()
    out = train("ddim", "digits", args.steps, ["--batch-size", 64], args.fresh)
    (net, alphas_cumprod), cfg, info = ddim.load(out / "ckpt.pt")
    classifier, accuracy = load_classifier()
    test = common.load_dataset("digits", "test")
    test_features = features(classifier, test.data, info.levels)
    T = len(alphas_cumprod)
    steps = [s for s in STEPS if s <= T]
    x_T = torch.randn((args.n, *info.shape), generator=torch.Generator().manual_seed(0))
    fd, speed = {}, {}
    for eta in ETAS:
        for S in steps:
            print(f"eta {eta:g}, S {S} ...", flush=True)
            start = time.perf_counter()
            x = ddim.ddim_sample(net, alphas_cumprod, x_T=x_T, steps=S, eta=eta, skip="uniform", clip_x0=False,
                                 generator=torch.Generator().manual_seed(1))
            speed[eta, S] = args.n / (time.perf_counter() - start)
            fd[eta, S] = frechet_distance(features(classifier, ddim.to_levels(x, info), info.levels), test_features)
    head = "| eta | " + " | ".join(f"S = {S}" for S in steps) + " |\n|---" + "|---" * len(steps) + "|\n"
    ours = head + "\n".join(f"| {eta:g} | " + " | ".join(f"{fd[eta, S]:.2f} ({speed[eta, S]:.3g}/s)" for S in steps)
                            + " |" for eta in ETAS)
    published = "| eta | " + " | ".join(f"S = {S}" for S in STEPS) + " |\n|---" + "|---" * len(STEPS) + "|\n" + \
        "\n".join(f"| {eta:g} | " + " | ".join(f"{v:.2f}" for v in PUBLISHED[eta]) + " |" for eta in PUBLISHED)
    cmd = "python benchmarks/ddim_table.py" + (f" --steps {args.steps}" if args.steps != 2000 else "") + \
        (f" --n {args.n}" if args.n != 1000 else "")
    md = (f"Frechet distance on digits (lower is better) of {args.n} DDIM samples from one shared x_T, and "
          f"images per second, for S steps and eta by Song et al.'s procedure (tau `uniform`, range(0, T, T // S); "
          f"x0_hat not clipped); `ddim.py` trained {args.steps} steps at batch 64 "
          f"(T = {T}, the digits defaults otherwise). Features of the classifier of `benchmarks/quality.py` "
          f"({accuracy:.1%} test accuracy), against the 300 test images. Produced by {stamp(cmd)}.\n\n{ours}\n\n"
          "Song et al. 2021, Table 1: CIFAR-10 FID (a different data set and measure; context for the trend "
          f"only).\n\n{published}")
    write_section("ddim-table", md, RESULTS / "ddim.md")
    print(md)


if __name__ == "__main__":
    main()
