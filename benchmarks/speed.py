"""Training and sampling throughput of every model file, and the FLOP/s it achieves.

    python benchmarks/speed.py [--steps 100] [--models ddpm gpt ...] [--no-libraries]

For each model file present, on digits at batch 64 through its command line: training
examples/s (metrics.jsonl, the second half of the run, so start-up is excluded) and sampling
throughput (the `sample` event of `--sample`, 64 samples). FLOPs of one training step are
counted with torch.utils.flop_counter.FlopCounterMode (matrix products and convolutions, forward
and backward) as the difference between in-process runs of 2k and k steps, so the sampling at
the end of a run cancels; achieved FLOP/s is given as a fraction of this machine's measured
float32 matrix-multiply FLOP/s. Where a well-known library implements the same network
(diffusers' UNet2DModel for ddpm.py, transformers' GPT-2 for gpt.py), the comparison scripts
beside this one time both in the same run.
"""
import argparse
import contextlib
import importlib
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.utils.module_tracker
from torch.utils.flop_counter import FlopCounterMode

from _runs import (RESULTS, ROOT, RUNS, SYSTEMS, Unsupported, last_event, merge_rows, present_systems, provenance,
                   read_metrics, run, shown, stamp, write_section)

sys.path.insert(0, str(ROOT))

BATCH = 64
# A model file whose training has stages is timed and counted on one of them, so that its
# examples/s and its FLOPs per step are of the same step: vqvae.py's autoencoder (with
# --stage both, the second half of a run, which is timed, would train the prior alone).
STAGE_FLAGS = {"vqvae": ["--stage", "ae"]}


def matmul_flops_per_second(n=2048, repeats=10):
    """The best float32 matrix-multiply rate of this machine (FLOP/s), at the default threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_per_step(label, k=2):
    """FLOPs of one training step of the system `label` on digits, counted in a fresh process."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import speed; print(speed._count({label!r}, {k}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


class _NoHook:
    def remove(self):
        pass


def _count(label, k):
    # FlopCounterMode fails on weight-normalised modules run under inference_mode (torch 2.13), as
    # the samplers are; in this process only, no_grad stands in for it (the same FLOPs are done).
    torch.inference_mode = lambda mode=True: torch.no_grad()
    # FlopCounterMode's module tracker hooks the gradient of every module input, and autograd.grad
    # to a leaf input (ffjord.py's trace and log-det inside the loss) then fails (torch 2.13); in
    # this process only, the hooks are left out: they attribute FLOPs to modules, not the total.
    torch.utils.module_tracker.register_multi_grad_hook = lambda *args, **kwargs: _NoHook()
    model, flags = SYSTEMS[label]
    module = importlib.import_module(model)
    totals = []
    for steps in (k, 2 * k):
        with tempfile.TemporaryDirectory() as out, FlopCounterMode(display=False) as counter, \
                contextlib.redirect_stdout(io.StringIO()):
            module.main(["--dataset", "digits", "--steps", str(steps), "--batch-size", str(BATCH), "--out", out,
                         "--n-samples", "1", "--save-every", "1000000", "--log-every", "1000000", "--device", "cpu",
                         *flags, *STAGE_FLAGS.get(model, [])])
        totals.append(counter.get_total_flops())
    return (totals[1] - totals[0]) / k


def model_rows(labels, steps, peak):
    rows = {}
    for label in labels:
        print(f"{label} ...", flush=True)
        model, flags = SYSTEMS[label]
        out = RUNS / ("speed-" + "-".join(label.replace("--", "").split()))
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        try:
            run(model, ["--dataset", "digits", "--steps", steps, "--batch-size", BATCH, "--out", out, "--overwrite",
                        "--log-every", steps // 2, "--save-every", steps, "--n-samples", 1, *flags,
                        *STAGE_FLAGS.get(model, [])], out / "log.txt")
        except Unsupported:
            continue
        train_speed = [r["ex_per_s"] for r in read_metrics(out) if "step" in r][-1]
        run(model, ["--sample", out / "ckpt.pt", "--n-samples", 64, "--out", out], out / "log.txt")
        sample = last_event(out, "sample")
        flops = flops_per_step(label)
        achieved = flops * train_speed / BATCH
        rows[label] = [f"{train_speed:.0f}", f"{sample['samples_per_s']:.2f}", f"{flops / BATCH / 1e6:.1f}",
                       f"{achieved / 1e9:.2f}", f"{achieved / peak:.1%}"]
    return rows


def library_sections():
    sections = []
    for name in ("compare_diffusers", "compare_transformers"):
        try:
            module = importlib.import_module(name)
        except ImportError as e:  # the library is not installed, or the script is absent
            print(f"skipping {name}: {e}")
            continue
        rows = module.rows()
        keys = list(rows[0])
        table = ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
        table += ["| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |"
                  for r in rows]
        sections.append(f"{(module.__doc__ or name).strip().splitlines()[0]}\n\n" + "\n".join(table))
    return sections


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--models", nargs="*", default=None,
                   help="systems (labels of _runs.SYSTEMS) to measure now, default all; the table keeps the others' "
                        "stored rows (with no label: redraw the table from the stored rows)")
    p.add_argument("--no-libraries", action="store_true")
    args = p.parse_args()
    peak = matmul_flops_per_second()
    rows = model_rows(present_systems() if args.models is None else args.models, args.steps, peak)
    cmd = "python benchmarks/speed.py" + (" --models " + " ".join(f"'{m}'" for m in args.models) if args.models else "")
    merged = merge_rows("speed", {label: [*cells, f"{peak / 1e9:.0f}"] for label, cells in rows.items()}, cmd)
    table = [" ".join([shown(m), *STAGE_FLAGS.get(SYSTEMS[m][0], [])]) for m, _, _ in merged]
    md = (f"### Speed\n\nOn digits at batch {BATCH}, CPU. The machine's float32 matrix-multiply peak varies between "
          f"runs, so each row gives the peak measured with it; compare rows measured together. {provenance(merged)}\n\n"
          "| model | train examples/s | samples/s | training MFLOP per example | achieved GFLOP/s | of matmul peak | "
          "peak GFLOP/s |\n|---|---|---|---|---|---|---|\n"
          + "\n".join(f"| {name} | " + " | ".join(cells) + " |" for name, (_, cells, _) in zip(table, merged)))
    libraries = RESULTS / "speed_libraries.md"  # kept, so that a run with --no-libraries shows them too
    if not args.no_libraries:
        libraries.write_text("\n\n".join(library_sections()) + "\n")
    if libraries.exists():
        md += "\n\n" + libraries.read_text().strip("\n")
    write_section("speed", md)
    print(md)


if __name__ == "__main__":
    main()
