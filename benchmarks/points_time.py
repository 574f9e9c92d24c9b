"""Wall time of each model file's default run on a 2D set: `python <model>.py --dataset rings`.

    python benchmarks/points_time.py [--dataset rings] [--models 'ddpm' 'realnvp --arch glow' ...]

Each system of _runs.SYSTEMS that accepts 2D data is run exactly as a user would run it (its
preset's steps, batch and pictures; torch's default threads), into a temporary folder, one at a
time; the wall time covers the whole command (start-up, training, pictures, the last checkpoint).
Run it on a quiet machine: the load average at the end is stamped beside the table. The rows go
to results/points_time.json and the section `points-time` of results/points.md.
"""
import argparse
import subprocess
import sys
import tempfile
import time

from _runs import RESULTS, ROOT, SYSTEMS, merge_rows, present_systems, provenance, read_metrics, shown, write_section


def default_run(label, dataset):
    """(seconds, steps) of `python <model>.py --dataset <dataset> <flags>`, or None if refused."""
    model, flags = SYSTEMS[label]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        r = subprocess.run([sys.executable, str(ROOT / f"{model}.py"), "--dataset", dataset, "--out", out, *flags],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - start
        if r.returncode != 0:
            if "accepts" in r.stderr or "accepted" in r.stderr:
                return None
            raise RuntimeError(f"{label} on {dataset} failed: {r.stderr.strip()[-500:]}")
        steps = max((m["step"] for m in read_metrics(out) if "step" in m and "event" not in m), default=0)
    return seconds, steps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="rings", help="the 2D set (default rings, the longest presets)")
    p.add_argument("--models", nargs="*", default=None, help="systems to time now; the others keep their stored rows")
    args = p.parse_args()
    cmd = "python benchmarks/points_time.py" + (f" --dataset {args.dataset}" if args.dataset != "rings" else "") + \
        (" --models " + " ".join(f"'{m}'" for m in args.models) if args.models else "")
    merged = merge_rows("points_time", {}, cmd)
    for label in present_systems() if args.models is None else args.models:
        print(f"{label} ...", flush=True)
        r = default_run(label, args.dataset)
        if r:  # stored at once: an interrupted run keeps the rows it measured
            merged = merge_rows("points_time", {label: [args.dataset, str(r[1]), f"{r[0] / 60:.1f}"]}, cmd)
            print(f"  {r[1]} steps, {r[0]:.0f} s", flush=True)
    lines = ["| system | dataset | steps | minutes |", "|---|---|---|---|"]
    lines += [f"| {shown(m)} | " + " | ".join(cells) + " |" for m, cells, _ in merged]
    md = ("### Default runs on a 2D set\n\nWall time of the whole command `python <model>.py --dataset <set>` with "
          "each file's preset (training, pictures, checkpoint), torch's default threads. "
          f"{provenance(merged)}\n\n" + "\n".join(lines))
    write_section("points-time", md, page=RESULTS / "points.md")
    print(md)


if __name__ == "__main__":
    main()
