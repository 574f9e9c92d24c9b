"""FFJORD's number of function evaluations (NFE) during training: how it grows, and what the
adjoint method, RNODE's regularisers and the fixed-step solver do to it, to the speed and to
the test NLL.

    python benchmarks/ffjord_nfe.py [--steps 1000] [--dataset 8gaussians] [--fresh]

Trains ffjord.py through its command line once per variant below (batch 256 on a 2D set, the
preset otherwise), then runs its `--eval` (dopri5 at 1e-5 with the exact trace, whatever solver
trained the model). From metrics.jsonl: the training examples/s over the whole run, the NFE of
the forward solve and of the backward pass (the mean of the first and of the last tenth of the
steps) and the rejected dopri5 steps per step. The backward NFE is what the backward pass
differentiates: with backpropagation the evaluations kept in the graph (6 per accepted dopri5
step, each a vector-Jacobian product), with the adjoint the evaluations of its backward solve
(each an evaluation and a vector-Jacobian product). Writes the table into
benchmarks/results/ffjord.md. Runs are kept in runs/bench/ and reused when the same command
finished before (--fresh retrains).
"""
import argparse
import json

from _runs import RESULTS, RUNS, last_event, read_metrics, run, stamp, write_section

VARIANTS = (  # (label, flags)
    ("dopri5, backpropagation", []),
    ("dopri5, adjoint", ["--adjoint"]),
    ("dopri5, RNODE lambda 0.01", ["--kinetic", "0.01", "--jacobian", "0.01"]),
    ("dopri5, RNODE lambda 0.1", ["--kinetic", "0.1", "--jacobian", "0.1"]),
    ("rk4, step 0.05", ["--solver", "rk4", "--step-size", "0.05"]),
)


def train_and_eval(dataset, steps, label, flags, fresh):
    """The run folder of one variant, trained and evaluated (or reused)."""
    slug = "".join(c if c.isalnum() else "-" for c in label).strip("-")
    out = RUNS / f"ffjord-nfe-{dataset}-{steps}-{slug}"
    extra = ["--batch-size", 256] if dataset != "digits" else []
    command = {"dataset": dataset, "steps": steps, "flags": list(map(str, flags + extra))}
    stamp_file = out / "command.json"
    if fresh or not (stamp_file.exists() and json.loads(stamp_file.read_text()) == command
                     and any(r.get("event") == "eval" for r in read_metrics(out))):
        out.mkdir(parents=True, exist_ok=True)
        for old in out.iterdir():
            if old.is_file():
                old.unlink()
        run("ffjord", ["--dataset", dataset, "--steps", steps, "--out", out, "--save-every", steps,
                       "--log-every", max(1, steps // 20), *flags, *extra], out / "log.txt")
        run("ffjord", ["--eval", out / "ckpt.pt", "--out", out], out / "log.txt")
        stamp_file.write_text(json.dumps(command))
    return out


def summary(out):
    lines = [r for r in read_metrics(out) if "step" in r and "nfe_forward" in r]
    tenth = max(1, len(lines) // 10)

    def mean(key, part):
        return sum(r[key] for r in part) / len(part)
    first, last = lines[:tenth], lines[-tenth:]
    speed = sum(r["ex_per_s"] for r in lines) / len(lines)
    return (f"{speed:.0f} | {mean('nfe_forward', first):.0f} -> {mean('nfe_forward', last):.0f} | "
            f"{mean('nfe_backward', first):.0f} -> {mean('nfe_backward', last):.0f} | "
            f"{mean('rejected', last):.1f} | {last_event(out, 'eval')['nll']:.3f} | "
            f"{last_event(out, 'eval')['nfe_per_solve']:.0f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--dataset", default="8gaussians")
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args()
    rows = []
    for label, flags in VARIANTS:
        print(f"ffjord on {args.dataset}: {label} ...", flush=True)
        out = train_and_eval(args.dataset, args.steps, label, flags, args.fresh)
        rows.append(f"| {label} | {summary(out)} |")
    cmd = "python benchmarks/ffjord_nfe.py" + (f" --steps {args.steps}" if args.steps != 1000 else "") + \
          (f" --dataset {args.dataset}" if args.dataset != "8gaussians" else "")
    md = (f"### FFJORD: function evaluations during training\n\n`ffjord.py` on {args.dataset}, {args.steps} "
          "training steps per variant (batch 256 on 2D sets; the preset otherwise). Forward and backward NFE "
          "per training step, the mean over the first and the last tenth of the steps; the backward NFE is "
          "the evaluations the backward pass differentiates (backpropagation: those kept in the graph; the "
          "adjoint: those of its backward solve). Rejected: dopri5 steps rejected per training step at the end. "
          "Test NLL and its NFE per solve from `--eval` (dopri5 at 1e-5, exact trace). Produced by "
          f"{stamp(cmd)}.\n\n| variant | train examples/s | forward NFE (start -> end) | backward NFE "
          "(start -> end) | rejected | test NLL (nats) | eval NFE |\n|---|---|---|---|---|---|---|\n"
          + "\n".join(rows))
    write_section("ffjord-nfe", md, RESULTS / "ffjord.md")
    print(md)


if __name__ == "__main__":
    main()
