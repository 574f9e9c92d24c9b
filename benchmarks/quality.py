"""Sample quality of the image models on digits: a Frechet distance between classifier features.

    python benchmarks/quality.py [--steps N] [--n 1000] [--models ddpm gpt ...]

For each model file present: trains it on digits with its preset (its own steps, or N for every
model with --steps; the runs of likelihood.py are reused when the
command is the same), draws `--n` samples through `--sample` (which writes samples.pt; n samples
written after the checkpoint are reused), and computes the Frechet distance
d^2 = |mu_s - mu_t|^2 + Tr(S_s + S_t - 2 (S_s S_t)^(1/2)) (Heusel et al. 2017, arXiv 1706.08500)
between the 64-dimensional features of the small classifier of digits_classifier.py on the
samples and on the 300 test images. The floor is the same distance for `--n` images of the
training split (real data, different images); the classifier's accuracy on the test split is
stated beside the table. It also saves the first 36 samples of each system as the gallery the
README shows (benchmarks/results/gallery/<system>.png).
"""
import argparse
import re
import sys

import numpy as np
import torch

from _runs import (RESULTS, ROOT, Unsupported, merge_rows, model_of, present_systems, provenance, run, shown, train,
                   training_length, write_section)
from digits_classifier import load_classifier

sys.path.insert(0, str(ROOT))
import common  # noqa: E402


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D) (mean and
    unbiased covariance): common.py's formula, the one --fid computes in Inception features."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return common._frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


@torch.no_grad()
def features(net, images, levels):
    """images: (N, 1, 8, 8) integer levels, or floats already in [0, 1] -> (N, 64) features."""
    x = images.float() if images.is_floating_point() else images.float() / (levels - 1)
    return net.features(x).numpy()


def reused_samples(out, n):
    """The samples an earlier run of this script drew from the same checkpoint (samples.pt written
    after ckpt.pt, n of them), or None."""
    path, ckpt = out / "samples.pt", out / "ckpt.pt"
    if not path.exists() or path.stat().st_mtime < ckpt.stat().st_mtime:
        return None
    samples = torch.load(path, weights_only=True)
    return samples if len(samples) == n else None


def reference(n):
    """(classifier, its test accuracy, features of the 300 test images, `n` training images drawn
    with seed 0, the floor: the Frechet distance of their features to the test features)."""
    net, accuracy = load_classifier()
    train_set, test = common.load_dataset("digits", "train"), common.load_dataset("digits", "test")
    test_features = features(net, test.data, 17)
    g = torch.Generator().manual_seed(0)
    real = train_set.data[torch.randperm(len(train_set.data), generator=g)[:n]]
    return net, accuracy, test_features, real, frechet_distance(features(net, real, 17), test_features)


def samples_of(label, out, n):
    """`n` samples (N, 1, 8, 8) of the checkpoint in `out` through its model file's `--sample`
    (reused when an earlier run drew them after the checkpoint)."""
    samples = reused_samples(out, n)
    if samples is None:
        run(model_of(label), ["--sample", out / "ckpt.pt", "--n-samples", n, "--out", out], out / "log.txt")
        samples = torch.load(out / "samples.pt", weights_only=True)
    return samples.reshape(-1, 1, 8, 8)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="the same steps for every model (default: each file's own)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--models", nargs="*", default=None, help="systems (labels of _runs.SYSTEMS) to measure now, default all; the table keeps the others' "
                        "stored rows (with no label: redraw the table from the stored rows)")
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args()
    net, accuracy, test_features, _, floor = reference(args.n)
    rows = {}
    for m in present_systems() if args.models is None else args.models:
        print(f"{m} ...", flush=True)
        try:
            out = train(m, "digits", args.steps, ["--batch-size", 64], args.fresh)
        except Unsupported:
            continue
        samples = samples_of(m, out, args.n)
        gallery = RESULTS / "gallery" / f"{re.sub(r'[^A-Za-z0-9_.]+', '-', m)}.png"
        gallery.parent.mkdir(parents=True, exist_ok=True)
        common.save_image_grid(samples[:36].float() / 16 if not samples.is_floating_point() else samples[:36],
                               gallery, nrow=6, title=shown(m).replace("`", ""))
        steps, seconds = training_length(out)
        rows[m] = [f"{frechet_distance(features(net, samples, 17), test_features):.2f}",
                   f"{steps} steps" + (f", {seconds / 60:.1f} min" if seconds else "")]
    cmd = "python benchmarks/quality.py" + (f" --steps {args.steps}" if args.steps else "") + \
        (" --models " + " ".join(f"'{m}'" for m in args.models) if args.models else "")
    merged = merge_rows("quality", rows, cmd)
    md = (f"### Sample quality on digits\n\nFrechet distance between classifier features of {args.n} samples and "
          "of the 300 test images (lower is better), each model trained at batch 64 with its digits preset (steps and "
          "training wall time in the last column; rows without it ran the shared budget of 2000 steps). "
          f"The classifier (`benchmarks/digits_classifier.py`, weights shipped) reaches {accuracy:.1%} accuracy "
          f"on the test split. {provenance(merged)}\n\n| samples from | Frechet distance | training |\n|---|---|---|\n"
          f"| training images (floor) | {floor:.2f} | |\n"
          + "\n".join(f"| {shown(m)} | {c[0]} | {c[1] if len(c) > 1 else '2000 steps'} |" for m, c, _ in merged))
    write_section("quality", md)
    print(md)


if __name__ == "__main__":
    main()
