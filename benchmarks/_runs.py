"""What the benchmark scripts share: running a model file through its command line, reading
the metrics it writes, and writing a generated table into README.md between markers."""
import datetime
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
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
    "pixelcnn --arch rowlstm": ("pixelcnn", ["--arch", "rowlstm"]),
    "pixelcnn --arch diagonal-bilstm": ("pixelcnn", ["--arch", "diagonal-bilstm"]),
    "gpt": ("gpt", []),
    "vae": ("vae", []),
    # vae.py's posteriors: free bits act on a Gaussian's KL per dimension, so the flows keep their
    # latents alive by KL warm-up instead, and the Gaussian is measured with that remedy too
    "vae --kl-warmup 1000": ("vae", ["--free-bits", "0", "--kl-warmup", "1000"]),
    "vae --posterior planar": ("vae", ["--posterior", "planar", "--free-bits", "0", "--kl-warmup", "1000"]),
    "vae --posterior radial": ("vae", ["--posterior", "radial", "--free-bits", "0", "--kl-warmup", "1000"]),
    "vae --posterior iaf": ("vae", ["--posterior", "iaf", "--free-bits", "0", "--kl-warmup", "1000"]),
    # SA-VAE with the preset's free bits, --svi-lr 0.02 and each example's SVI gradients clipped to norm 5
    "vae --svi-steps 5": ("vae", ["--svi-steps", "5"]),
    "vae --arch hierarchical": ("vae", ["--arch", "hierarchical"]),
    "vqvae": ("vqvae", []),
    "vqvae --levels 2": ("vqvae", ["--levels", "2"]),
    "realnvp": ("realnvp", []),
    "realnvp --arch glow": ("realnvp", ["--arch", "glow"]),
    "realnvp --arch maf": ("realnvp", ["--arch", "maf"]),
    "ffjord": ("ffjord", []),
    "ffjord --arch residual": ("ffjord", ["--arch", "residual"]),
    "ddpm": ("ddpm", []),
    "ddim": ("ddim", []),
    "score_sde": ("score_sde", []),
    "score_sde --loss sm": ("score_sde", ["--loss", "sm"]),
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
        if "accepts" in r.stderr or "accepted" in r.stderr:
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
    """Train the system `label` on `dataset` for `steps` (None: the model file's own default for
    the dataset), or reuse a finished run of the same command; returns the run folder. The
    training's wall time is kept in the folder's time.json."""
    model, flags = SYSTEMS[label]
    out = RUNS / f"{re.sub(r'[^A-Za-z0-9_.]+', '-', label)}-{dataset}-{steps or 'default'}"
    ckpt = out / "ckpt.pt"
    stamp = out / "command.json"
    # the model file's text is part of the command: a run made before its presets changed is not reused
    source = hashlib.sha256((ROOT / f"{model}.py").read_bytes()).hexdigest()[:16]
    command = {"model": model, "dataset": dataset, "steps": steps, "extra": list(map(str, [*flags, *extra])),
               "source": source}
    if not fresh and ckpt.exists() and stamp.exists() and json.loads(stamp.read_text()) == command:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if old.is_file():
            old.unlink()
    length = ["--steps", steps, "--save-every", steps] if steps else []
    start = time.perf_counter()
    run(model, ["--dataset", dataset, "--out", out, *length, *flags, *extra], out / "log.txt")
    (out / "time.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    stamp.write_text(json.dumps(command))
    return out


def training_length(out):
    """(steps, seconds) of the training run in `out`: its last logged step and its wall time
    (None where the run predates time.json)."""
    steps = max((r["step"] for r in read_metrics(out) if "step" in r and "event" not in r), default=None)
    t = out / "time.json"
    return steps, json.loads(t.read_text())["seconds"] if t.exists() else None


def machine():
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def stamp(command):
    """Command, machine, date and the load at the end of the measurement (times under load are
    longer than a quiet machine's; the other columns are not affected)."""
    return (f"`{command}` on {machine()}, {datetime.date.today().isoformat()}, "
            f"load average {os.getloadavg()[0]:.0f} at the end")


def merge_rows(table, rows, command):
    """Store `rows` ({label: [cells]}) measured now by `command` in results/<table>.json, beside
    the rows measured before for other systems; returns every stored row in SYSTEMS order as
    (label, cells, measured), so a table can be brought up to date one system at a time."""
    path = RESULTS / f"{table}.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    now = stamp(command)
    stored.update({label: {"cells": cells, "measured": now} for label, cells in rows.items()})
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=1) + "\n")
    return [(label, stored[label]["cells"], stored[label]["measured"]) for label in SYSTEMS if label in stored]


def provenance(rows):
    """One line per distinct measurement: which rows it produced, with its command, machine and date."""
    runs = {}
    for label, _, measured in rows:
        runs.setdefault(measured, []).append(label)
    if len(runs) == 1:
        return f"Produced by {next(iter(runs))}."
    return "Produced by: " + "; ".join(f"rows {', '.join(labels)}: {measured}" for measured, labels in runs.items()) + "."


def write_section(name, markdown, page=None):
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` in `page` (README.md,
    or a model's benchmarks/results/<model>.md), adding the pair at its end the first time (in the
    README, before `<!-- results-end -->`). README sections are also saved as results/<name>.md, after
    which the marked sections other scripts wrote into that page are kept."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    page = Path(page) if page else ROOT / "README.md"
    if page.name == "README.md":
        copy = RESULTS / f"{name}.md"
        kept = re.finditer(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", copy.read_text() if copy.exists() else "", re.S)
        copy.write_text("\n\n".join([markdown, *(m.group(0) for m in kept)]) + "\n")
    text = page.read_text() if page.exists() else f"# {page.stem}.py: measured results\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    elif "<!-- results-end -->" in text:
        text = text.replace("<!-- results-end -->", f"{block}\n\n<!-- results-end -->", 1)
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    page.write_text(text)
