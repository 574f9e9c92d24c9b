"""JEM's test accuracy on digits beside a plain classifier's.

    python benchmarks/jem_accuracy.py [--steps 2000] [--fresh]

Trains `ebm.py --dataset digits --jem` (JEM: the joint objective log p(y|x) + log p(x), Grathwohl
et al. 2020) and the same network with `--px-weight 0` (the cross-entropy alone: a classifier of the
same architecture, its Langevin chains run but unused) through the command line, for the same steps
with JEM's settings (ebm.JEM) over the digits preset, reads the test accuracy from their `--eval`, and puts them beside
the shipped digits classifier of digits_classifier.py (a different, smaller network trained with
one-pixel shifts). Writes a table into benchmarks/results/ebm.md. Runs are
kept in runs/bench/ and reused when the same command finished before (--fresh retrains).
"""
import argparse
import json

from _runs import RESULTS, RUNS, last_event, read_metrics, run, stamp, write_section
from digits_classifier import load_classifier

VARIANTS = {  # name: (description, extra flags)
    "jem": ("`ebm.py --dataset digits --jem`: JEM, log p(y|x) + log p(x)", ["--jem"]),
    "ce": ("`ebm.py --dataset digits --jem --px-weight 0`: the same network, cross-entropy only",
           ["--jem", "--px-weight", "0"]),
}


def accuracy(name, steps, fresh):
    """Test accuracy of one variant, training and evaluating it unless a finished run is reused."""
    out = RUNS / f"ebm-digits-{name}-{steps}"
    command = {"steps": steps, "flags": VARIANTS[name][1]}
    stamp_file = out / "command.json"
    if fresh or not (stamp_file.exists() and json.loads(stamp_file.read_text()) == command
                     and (out / "ckpt.pt").exists()):
        out.mkdir(parents=True, exist_ok=True)
        for old in out.iterdir():
            if old.is_file():
                old.unlink()
        run("ebm", ["--dataset", "digits", "--steps", steps, "--save-every", steps, "--out", out,
                    *VARIANTS[name][1]], out / "log.txt")
        stamp_file.write_text(json.dumps(command))
    if not any(r.get("event") == "eval" for r in read_metrics(out)):
        run("ebm", ["--eval", out / "ckpt.pt", "--out", out], out / "log.txt")
    return last_event(out, "eval")["accuracy"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args()
    rows = []
    for name, (description, _) in VARIANTS.items():
        print(f"{name} ...", flush=True)
        rows.append(f"| {description} | {accuracy(name, args.steps, args.fresh):.1%} |")
    _, shipped = load_classifier()
    rows.append(f"| `benchmarks/digits_classifier.py` (shipped weights) | {shipped:.1%} |")
    cmd = "python benchmarks/jem_accuracy.py" + (f" --steps {args.steps}" if args.steps != 2000 else "")
    md = (f"### JEM on digits\n\nTest accuracy on the 300 test digits after {args.steps} training steps (`--jem` applies "
          f"JEM's settings, `ebm.JEM`: Adam lr 1e-4 with 1000 warm-up steps, batch 64, 20 SGLD steps per step from "
          f"the replay buffer, no regulariser, no clip; the digits preset's network). Produced by "
          f"{stamp(cmd)}.\n\n| classifier | test accuracy |\n|---|---|\n" + "\n".join(rows))
    write_section("jem-accuracy", md, RESULTS / "ebm.md")
    print(md)


if __name__ == "__main__":
    main()
