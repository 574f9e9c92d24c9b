"""How a command's time on the CPU changes when another PyTorch job shares the machine.

    python benchmarks/busy.py [--steps 200] [--suite]

Times `python pixelcnn.py --steps N` (and with --suite the README's test command) alone and
beside a busy job: another process running a small convolution in a loop at torch's default
threads. Each is timed with torch's default threads, with OMP_WAIT_POLICY=PASSIVE (OpenMP
threads sleep at a barrier instead of spinning), with GNU OpenMP's spinning shortened
(GOMP_SPINCOUNT=10000, the default spins about 300,000 times) and with one thread. On a
shared core a spinning thread waits for a sibling that is not running, so the default can lose
far more than the fair share. Writes benchmarks/results/busy.md; the README's advice to CPU
users rests on it.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from _runs import RESULTS, ROOT, stamp

BUSY = ("import torch\nx = torch.randn(16, 32, 64, 64)\nc = torch.nn.Conv2d(32, 32, 3, padding=1)\n"
        "with torch.no_grad():\n    while True:\n        c(x)\n")
SETTINGS = {"default": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"}, "one thread": {"OMP_NUM_THREADS": "1"}}


# the environment without any thread setting of the caller's
BASE = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}


def timed(cmd, env, busy):
    """Seconds `cmd` takes, alone or beside the busy job."""
    job = subprocess.Popen([sys.executable, "-c", BUSY], env=BASE) if busy else None
    try:
        if job:
            time.sleep(3)  # the busy job is up and running
        t = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env={**BASE, **env}, check=True, capture_output=True)
        return time.perf_counter() - t
    finally:
        if job:
            job.kill()
            job.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--suite", action="store_true", help="also time the README's test command")
    p.add_argument("--suite-only", action="store_true",
                   help="time only the README's test command; the table keeps its stored pixelcnn.py rows")
    args = p.parse_args()
    stored = (RESULTS / "busy.md").read_text() if (RESULTS / "busy.md").exists() else ""
    rows = [r for r in stored.splitlines() if r.startswith("| `python pixelcnn.py")] if args.suite_only else []
    with tempfile.TemporaryDirectory() as out:
        train = [sys.executable, "pixelcnn.py", "--steps", str(args.steps), "--out", out, "--overwrite"]
        for name, env in ({} if args.suite_only else SETTINGS).items():
            quiet, busy = timed(train, env, False), timed(train, env, True)
            rows.append(f"| `python pixelcnn.py --steps {args.steps}` | {name} | {quiet:.1f} | {busy:.1f} | "
                        f"{busy / quiet:.1f}x |")
            print(rows[-1], flush=True)
    if args.suite or args.suite_only:
        suite = [sys.executable, "-m", "pytest", "-q", "-n", "2", "tests"]
        quiet, busy = timed(suite, {"CI": "true"}, False), timed(suite, {"CI": "true"}, True)
        rows.append(f"| `python -m pytest -q -n 2 tests` | one thread per worker | {quiet:.0f} | {busy:.0f} | "
                    f"{busy / quiet:.1f}x |")
        print(rows[-1], flush=True)
    cmd = "python benchmarks/busy.py" + (" --suite" if args.suite else "") + (" --suite-only" if args.suite_only else "")
    produced = f"Produced by {stamp(cmd)}."
    if args.suite_only and rows[:-1]:
        before = re.search(r"Produced by (.*?\d{4}-\d\d-\d\d)\.", stored)
        produced = f"The pixelcnn.py rows: produced by {before.group(1) if before else 'an earlier run'}; the test suite's: {produced[12:]}"
    md = (f"### A busy machine\n\nSeconds alone and beside another PyTorch job (a convolution in a loop at "
          f"torch's default threads). {produced}\n\n"
          "| command | threads | alone (s) | busy (s) | busy / alone |\n|---|---|---|---|---|\n" + "\n".join(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "busy.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
