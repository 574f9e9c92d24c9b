"""What the benchmark scripts share: running a model file through its command line, reading
the metrics it writes, and writing a generated table into README.md between markers."""
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "bench"
RESULTS = ROOT / "benchmarks" / "results"
# Every system a table has a row for: label -> (model file, training flags beyond the defaults),
# in the README's family order: autoregressive, latent-variable, flows, diffusion and score, energy.
# A system's checkpoint remembers its flags, so --eval and --sample need only the checkpoint.
SYSTEMS = {
    "pixelcnn": ("pixelcnn", []),
    "gpt": ("gpt", []),
    "vae": ("vae", []),
    "vqvae": ("vqvae", []),
    "realnvp": ("realnvp", []),
    "ffjord": ("ffjord", []),
    "ddpm": ("ddpm", []),
    "ddim": ("ddim", []),
    "score_sde": ("score_sde", []),
    "ebm": ("ebm", []),
}


def present_systems():
    return [label for label, (model, _) in SYSTEMS.items() if (ROOT / f"{model}.py").exists()]


def model_of(label):
    """The model file that runs a system."""
    return SYSTEMS[label][0]


def shown(label):
    """How a table names a system: `vae.py --posterior iaf`."""
    model, flags = SYSTEMS[label]
    return " ".join([f"`{model}.py`", *flags])


class Unsupported(Exception):
    """The model file refused the dataset (its command line said so)."""


def run(model, args, log):
    """Run `python <model>.py args`, appending its output to `log`; Unsupported when it refuses."""
    cmd = [sys.executable, str(ROOT / f"{model}.py"), *map(str, args)]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.PIPE, text=True)
        f.write(r.stderr)
    if r.returncode != 0:
        if "accepts" in r.stderr:
            raise Unsupported(r.stderr.strip())
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")


def read_metrics(out):
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_event(out, name):
    events = [r for r in read_metrics(out) if r.get("event") == name]
    if not events:
        raise RuntimeError(f"no '{name}' event in {out}/metrics.jsonl")
    return events[-1]


def train(label, dataset, steps, extra=(), fresh=False):
    """Train the system `label` on `dataset` for `steps` (or reuse a finished run of the same
    command); returns the run folder."""
    model, flags = SYSTEMS[label]
    out = RUNS / f"{re.sub(r'[^A-Za-z0-9_.]+', '-', label)}-{dataset}-{steps}"
    ckpt = out / "ckpt.pt"
    stamp = out / "command.json"
    command = {"model": model, "dataset": dataset, "steps": steps, "extra": list(map(str, [*flags, *extra]))}
    if not fresh and ckpt.exists() and stamp.exists() and json.loads(stamp.read_text()) == command:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if old.is_file():
            old.unlink()
    run(model, ["--dataset", dataset, "--steps", steps, "--out", out, "--save-every", steps, *flags, *extra],
        out / "log.txt")
    stamp.write_text(json.dumps(command))
    return out


def machine():
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def stamp(command):
    return f"`{command}` on {machine()}, {datetime.date.today().isoformat()}"


def write_section(name, markdown):
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` in README.md
    (adding the pair before `<!-- results-end -->` the first time), and save it to results/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(markdown + "\n")
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.replace("<!-- results-end -->", f"{block}\n\n<!-- results-end -->", 1)
    readme.write_text(text)
