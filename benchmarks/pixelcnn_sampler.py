"""pixelcnn.py's fast sampler against the naive one: what evaluating only the rows a new sub-pixel needs saves.

    python benchmarks/pixelcnn_sampler.py [--configs gated-digits ...] [--n N]

For each configuration, through pixelcnn.py's command line: a checkpoint of the untrained network
(`--steps 0`: the network evaluations a sample costs, hence the time, do not depend on the weights),
then `--sample` with the fast sampler and with `--naive-sampler` (which runs the whole network on the
whole image for every sub-pixel), the same number of samples from the same seed; the two must give
the same samples, and the table says so. Samples per second are those of the `sample` event (the
sampling alone, no pictures, no completions). Writes the table into
benchmarks/results/pixelcnn.md between `<!-- pixelcnn-sampler:start -->` and `<!-- pixelcnn-sampler:end -->`. The 28x28 configuration downloads MNIST once.
"""
import argparse
import sys

import torch

from _runs import RESULTS, RUNS, last_event, run, stamp, write_section

# name: (flags of the training run, samples drawn, what the row is)
CONFIGS = {
    "gated-digits": (["--dataset", "digits"], 64, "Gated PixelCNN, the defaults (8x8, 17 levels)"),
    "pixelcnn-digits": (["--dataset", "digits", "--arch", "pixelcnn"], 64, "plain PixelCNN (8x8, 17 levels)"),
    "pixelcnn++-digits": (["--dataset", "digits", "--arch", "pixelcnn++"], 64, "PixelCNN++, small (8x8, 17 levels)"),
    "gated-mnist": (["--dataset", "mnist"], 4, "Gated PixelCNN, the mnist preset (28x28, 256 levels)"),
}


def measure(name, n):
    flags, _, _ = CONFIGS[name]
    out = RUNS / f"pixelcnn-sampler-{name}"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    run("pixelcnn", [*flags, "--steps", 0, "--out", out, "--overwrite", "--n-samples", 1, "--completions", 0,
                     "--device", "cpu"], log)
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    params = sum(v.numel() for v in ckpt["model"].values() if v.is_floating_point())
    result = {"params": params}
    for sampler, extra in (("fast", []), ("naive", ["--naive-sampler"])):
        folder = out / sampler
        run("pixelcnn", ["--sample", out / "ckpt.pt", "--n-samples", n, "--completions", 0, "--out", folder,
                         "--device", "cpu", *extra], log)
        event = last_event(folder, "sample")
        assert event["sampler"] == sampler and event["n"] == n, event
        result[sampler] = event["samples_per_s"]
        result[sampler + "_samples"] = torch.load(folder / "samples.pt", weights_only=True)
    result["same"] = torch.equal(result["fast_samples"], result["naive_samples"])
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--n", type=int, default=None, help="samples per run (default: each configuration's own)")
    args = p.parse_args()
    rows, skipped = [], []
    for name in args.configs:
        n = args.n or CONFIGS[name][1]
        print(f"{name} ({n} samples) ...", flush=True)
        try:
            r = measure(name, n)
        except RuntimeError as e:  # a dataset that cannot be downloaded here
            if "could not download" not in str(e) and "without network" not in str(e):
                raise
            print(f"skipped {name}: {e}", flush=True)
            skipped.append(CONFIGS[name][2])
            continue
        rows.append(f"| {CONFIGS[name][2]} | {r['params']:,} | {n} | {r['fast']:.3g} | {r['naive']:.3g} | "
                    f"{r['fast'] / r['naive']:.1f}x | {'yes' if r['same'] else 'NO'} |")
    cmd = " ".join(["python benchmarks/pixelcnn_sampler.py", *sys.argv[1:]])
    md = ("#### Fast against naive sampling\n\n"
          "Samples per second on one process of the CPU, the fast sampler (a Gated PixelCNN runs its vertical "
          "stack once per row and its horizontal stack on that row alone; the plain PixelCNN runs the rows of its "
          "receptive field; PixelCNN++ the rows above, rounded up to a multiple of 4) against the naive one (the "
          "whole network on the whole image for every sub-pixel), untrained networks, the same seed. Produced by "
          f"{stamp(cmd)}.\n\n"
          "| network | parameters | samples | fast samples/s | naive samples/s | speed-up | same samples |\n"
          "|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    if skipped:
        md += "\n\nNot measured (the dataset could not be downloaded): " + "; ".join(skipped) + "."
    write_section("pixelcnn-sampler", md, RESULTS / "pixelcnn.md")
    print(md)
    if not all("| yes |" in r for r in rows):
        sys.exit("the fast and the naive sampler gave different samples")


if __name__ == "__main__":
    main()
