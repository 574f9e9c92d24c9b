"""One prepared check of every model file's paper preset on a GPU, and what a full training costs.

    python benchmarks/gpu_check.py [--models ddpm gpt ...] [--steps 8] [--jobs 5] [--budget 470]
    python benchmarks/gpu_check.py --device cpu --smoke      # tiny networks, in this process: seconds

For each model file, on a fake CIFAR-10 written in the official format (random images; nothing is
downloaded): its cifar10 preset (the paper's network and batch size) trains --steps steps with
--amp, then again with --amp --compile, then --sample and --eval run on the checkpoint, each under
torchrun with one process (DistributedDataParallel, NCCL). Measured per file: seconds per training
step (the median after three steps: two of warm-up, one counted; CUDA synchronised), samples per
second (the `sample` event), peak GPU memory (torch.cuda.max_memory_allocated), FLOPs of one
training step (torch.utils.flop_counter.FlopCounterMode: matrix products and convolutions, forward
and backward) and so the achieved FLOP/s and their share of the GPU's dense bf16 peak, and whether
each command worked. The table then estimates each paper's full training on this GPU: the preset's
steps times the --amp seconds per step (ffjord.py refuses --amp: float32 there). With
torch-fidelity installed, `--eval --fid 64` also runs, with a randomly initialised Inception saved
in torch-fidelity's format (its pretrained weights are a download).

Sizes, chosen for 8 minutes on one H100 (not yet run on one): the --amp runs go one at a time
(their times are the table's), 8 steps each (2 of warm-up, 1 counted, 4 timed), with 4 samples
drawn at their end (ddpm.py with 100 respaced steps, pixelcnn.py without completions); then the
--compile runs, --sample (16 samples, the file's own sampler), --eval (on the 64 fake test images,
16 where the file has --eval-n) and --fid 64 on the --amp checkpoint, --jobs at a time, the
CPU-bound compilations first: the compiled seconds per step are measured beside other work and only
shown in brackets. The fake set has 1280 training images, more than the largest preset batch
(ffjord.py's 900). No command runs past --budget (470 s): one still running then is stopped and
marked, as is one over its own limit (LIMITS).

Writes benchmarks/results/gpu_check.json and gpu_check.md (--out DIR to put them elsewhere).
--smoke: tiny networks of every file at batch 4, 5 steps, in this process, --compile and --fid
skipped: the script's own path, checked on a CPU in seconds (tests/test_fid.py runs it on ddpm.py).
"""
import argparse
import concurrent.futures
import contextlib
import datetime
import importlib
import io
import json
import os
import pickle
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

MODELS = ("pixelcnn", "gpt", "vae", "vqvae", "realnvp", "ffjord", "ddpm", "ddim", "score_sde", "ebm")
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by a word of the device name.
BF16_PEAK = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12, "4090": 165e12, "V100": None}
# Flags that keep --sample and --eval to seconds on the paper's network (the commands are unchanged).
EVAL_FLAGS = {"vae": ["--k-eval", 64], "ddpm": ["--eval-n", 16], "ddim": ["--eval-n", 16],
              "score_sde": ["--eval-n", 16, "--eval-repeats", 1], "vqvae": ["--eval-n", 16]}
# vqvae.py trains its autoencoder, then its prior: the timed steps are the autoencoder's (as speed.py).
TRAIN_FLAGS = {"vqvae": ["--stage", "ae"]}
NO_AMP = {"ffjord"}  # refuses --amp (bfloat16 is coarser than its solver's tolerances): float32
# --smoke: every file's network shrunk to seconds on a CPU (the flags the files document).
TINY = {"pixelcnn": ["--hidden", 12, "--layers", 2, "--out-hidden", 12, "--completions", 0],
        "gpt": ["--n-layer", 1, "--n-head", 1, "--n-embd", 16],
        "vae": ["--channels", "8,8,8", "--latent", 4, "--k-eval", 2],
        "vqvae": ["--hidden", 8, "--codes", 8, "--code-dim", 4, "--res-blocks", 1, "--prior-layers", 1,
                  "--prior-width", 16, "--prior-heads", 1],
        "realnvp": ["--n-blocks", 1, "--n-features", 8],
        "ffjord": ["--n-blocks", 1, "--width", 8, "--depth", 1, "--n-scales", 1],
        "ddpm": ["--ch", 8, "--ch-mult", "1,2", "--num-res-blocks", 1, "--attn-res", "", "--timesteps", 5],
        "ddim": ["--ch", 8, "--ch-mult", "1,2", "--num-res-blocks", 1, "--attn-res", "", "--timesteps", 5,
                 "--sample-steps", 2],
        "score_sde": ["--ch", 8, "--ch-mult", "1,2", "--num-res-blocks", 1, "--attn-res", "", "--sample-steps", 3],
        "ebm": ["--ch", 8, "--ch-mult", "1", "--blocks", 1, "--sgld-steps", 2, "--buffer-size", 16, "--n-samples", 2]}
# The pictures at the end of a timed run, not themselves timed: fewer sampling steps, no completions.
PICTURES = {"ddpm": ["--sample-steps", 100], "pixelcnn": ["--completions", 0]}
TINY_SAMPLING = {"ddim": ["--sample-steps", 2, "--eval-steps", "2"], "pixelcnn": ["--completions", 0],
                 "score_sde": ["--eval-n", 2, "--rtol", "1e-3", "--atol", "1e-3"]}
LIMITS = {"amp": 150, "compile": 300, "sample": 150, "eval": 150, "fid": 150}  # seconds a command may take


# --- the measurements, in the process that runs the command (under torchrun, or this one with --smoke)

def measure(model, argv, flops_at=None):
    """Run `<model>.main(argv)` here: whether it worked (its error's last line if not), its wall time,
    the times of the training steps (CUDA synchronised), the FLOPs of step `flops_at`, peak memory."""
    from torch.utils.flop_counter import FlopCounterMode
    module = importlib.import_module(model)
    cuda = torch.cuda.is_available() and "cpu" not in argv
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, flops, original = [], [], common.Training.steps

    def steps(self, step, pictures=None):
        for s in original(self, step, pictures):
            sync()
            times.append(time.perf_counter())
            if s == flops_at:
                with _flop_counting(), FlopCounterMode(display=False) as counter:
                    yield s
                flops.append(counter.get_total_flops())
            else:
                yield s

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    err, start, error = io.StringIO(), time.perf_counter(), None
    common.Training.steps = steps
    try:
        with contextlib.redirect_stderr(err):
            module.main([str(a) for a in argv])
    except SystemExit as e:
        error = None if e.code in (0, None) else (err.getvalue().strip().splitlines() or [f"exit {e.code}"])[-1]
    except Exception as e:  # a crash is a result here: the table says which command failed
        error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    finally:
        common.Training.steps = original
    timed = [b - a for a, b in zip(times, times[1:])][3:]  # two steps of warm-up, the counted one
    return {"ok": error is None, "error": error, "seconds": round(time.perf_counter() - start, 2),
            "s_per_step": statistics.median(timed) if timed else None, "flops_per_step": flops[0] if flops else None,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


@contextlib.contextmanager
def _flop_counting():
    """FlopCounterMode's module tracker hooks the gradient of every module input, and autograd.grad to
    a leaf input (ffjord.py's trace inside the loss) then fails: the hooks are left out while counting
    (they attribute FLOPs to modules, not the total); as benchmarks/speed.py does."""
    import torch.utils.module_tracker as tracker
    hook = tracker.register_multi_grad_hook
    tracker.register_multi_grad_hook = lambda *args, **kwargs: type("NoHook", (), {"remove": lambda self: None})()
    try:
        yield
    finally:
        tracker.register_multi_grad_hook = hook


def _worker(argv):
    """`gpu_check.py --worker RESULT FLOPS_AT MODEL ARGV...`, under torchrun: measure, write RESULT."""
    result, flops_at, model, *rest = argv
    r = measure(model, rest, None if flops_at == "-" else int(flops_at))
    if int(os.environ.get("RANK", 0)) == 0:
        Path(result).write_text(json.dumps(r))


def launch(model, argv, limit, here, flops_at=None):
    """One command: in this process (`here`), else under torchrun with one process."""
    if here:
        with contextlib.redirect_stdout(io.StringIO()):
            return measure(model, argv, flops_at)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__,
               "--worker", result, "-" if flops_at is None else flops_at, model, *argv]
        start = time.perf_counter()
        p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
        try:
            _, stderr = p.communicate(timeout=limit)
        except subprocess.TimeoutExpired:  # torchrun and its worker: the whole process group
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            return {"ok": False, "error": f"stopped after its limit of {limit:.0f} s", "seconds": round(limit)}
        if result.exists():
            return json.loads(result.read_text())
        last = (stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        return {"ok": False, "error": last[:300], "seconds": round(time.perf_counter() - start, 2)}


# --- the fake data, the Inception weights

def fake_cifar10(root, n_train=1280, n_test=64, seed=0):
    """Random 32x32 RGB images in CIFAR-10's python format, extracted where load_dataset looks."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [*((f"data_batch_{i}", n_train // 5) for i in range(1, 6)), ("test_batch", n_test)]:
        body = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": [i % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(body))


def random_inception_weights(path):
    """torch-fidelity's Inception-v3 with He-initialised convolutions, saved as its weights file; None
    without torch-fidelity."""
    try:
        from torch_fidelity import feature_extractor_inceptionv3 as inception
    except ImportError:
        return None
    cls = inception.FeatureExtractorInceptionV3
    url, load = inception.load_state_dict_from_url, cls.load_state_dict
    inception.load_state_dict_from_url, cls.load_state_dict = (lambda *a, **k: None), (lambda self, state: None)
    try:
        net = cls("inception-v3-compat", ["2048"])
    finally:
        inception.load_state_dict_from_url, cls.load_state_dict = url, load
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


# --- one model file, the table

def preset(model):
    """(steps, batch size) of the file's cifar10 preset: the paper's training run."""
    module = importlib.import_module(model)
    cfg = common.parse_config(module.Config, module.PRESETS, ["--dataset", "cifar10"],
                              arch_presets=getattr(module, "ARCH_PRESETS", None))
    return cfg.steps, cfg.batch_size


def command(model, step, args, data, work, deadline):
    """One of a file's commands ("amp", "compile", "sample", "eval", "fid"): its measurements. The
    trained ones write <work>/<model>/<step>; the others take the --amp run's checkpoint."""
    smoke, steps = args.smoke, 5 if args.smoke else args.steps
    out = work / model
    if step == "compile" and smoke:
        return {"ok": None, "error": "skipped: --smoke (inductor's CPU compile takes minutes)"}
    if step in ("amp", "compile"):
        argv = ["--dataset", "cifar10", "--data-dir", data, "--device", args.device, "--steps", steps,
                "--n-samples", 4, "--save-every", 10**9, "--log-every", steps, "--out", out / step,
                *([] if model in NO_AMP else ["--amp"]), *(["--compile"] if step == "compile" else []),
                *TRAIN_FLAGS.get(model, []), *(TINY[model] + ["--batch-size", 4] if smoke else PICTURES.get(model, []))]
    else:
        ckpt = out / "amp" / "ckpt.pt"
        if not ckpt.exists():
            return {"ok": None, "error": "no checkpoint: the --amp run failed"}
        argv = ["--sample" if step == "sample" else "--eval", ckpt, "--n-samples", 2 if smoke else 16,
                "--device", args.device, "--data-dir", data, "--out", out / step,
                *(EVAL_FLAGS.get(model, []) if step != "sample" else []),
                *(TINY_SAMPLING.get(model, []) if smoke else []),
                *(["--fid", 4 if smoke else 64] if step == "fid" else [])]
    left = deadline - time.time()
    if left < 10:
        return {"ok": False, "error": "not run: the --budget was spent", "seconds": 0}
    print(f"{model}: {step} ...", flush=True)
    r = launch(model, argv, min(LIMITS[step], left), smoke and not args.torchrun, flops_at=2 if step == "amp" else None)
    if step == "sample" and r["ok"]:
        event = [e for e in _events(out / step) if e.get("event") == "sample"]
        r["samples_per_s"] = event[-1].get("samples_per_s") if event else None
    print(f"{model}: {step} {'ok' if r['ok'] else 'FAILED: ' + str(r['error'])} ({r['seconds']} s)", flush=True)
    return r


def _events(out):
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def bf16_peak(device):
    if device != "cuda" or not torch.cuda.is_available():
        return None, "a CPU (no bf16 peak)"
    name = torch.cuda.get_device_name()
    return next((p for k, p in BF16_PEAK.items() if k in name), None), name


def table(results, peak, device_name, command, where):
    mark = {True: "ok", False: "FAILED", None: "-"}
    lines = [f"### GPU check: every paper preset on {device_name}", "",
             f"`{command}` on {device_name}, torch {torch.__version__}, Python {platform.python_version()}, "
             f"{datetime.date.today().isoformat()}. Fake CIFAR-10 (random images, the official format), each file's "
             f"cifar10 preset {where}. s/step: the median training step with --amp "
             "(--compile's, measured beside other jobs, in brackets); TFLOP/s achieved from FlopCounterMode's count "
             "of one step; the full run is the preset's steps times the --amp s/step.", "",
             "| file | batch | s/step amp (compile) | samples/s | peak GB | TFLOP/s | % bf16 peak | amp | compile | "
             "sample | eval | fid | paper steps | full training |", "|" + "---|" * 14]
    for model, r in results.items():
        amp, comp = r["amp"], r.get("compile", {})
        s = amp.get("s_per_step")
        achieved = amp["flops_per_step"] / amp["s_per_step"] if amp.get("flops_per_step") and amp.get("s_per_step") \
            else None
        hours = r["paper_steps"] * s / 3600 if s else None
        lines.append(" | ".join([
            f"| `{model}.py`", str(r["batch"]),
            (f"{amp['s_per_step']:.4f}" if amp.get("s_per_step") else "-")
            + (f" ({comp['s_per_step']:.4f})" if comp.get("s_per_step") else ""),
            f"{r['sample']['samples_per_s']:.3g}" if r.get("sample", {}).get("samples_per_s") else "-",
            f"{amp['peak_gb']:.1f}" if amp.get("peak_gb") is not None else "-",
            f"{achieved / 1e12:.3g}" if achieved else "-",
            f"{achieved / peak:.0%}" if achieved and peak else "-",
            *(mark[r.get(k, {}).get("ok")] for k in ("amp", "compile", "sample", "eval", "fid")),
            f"{r['paper_steps']:,}", f"{hours:.1f} h |" if hours else "- |"]))
    failures = [f"- `{m}.py` {k}: {v['error']}" for m, r in results.items() for k, v in r.items()
                if isinstance(v, dict) and v.get("ok") is False]
    return "\n".join(lines + ([""] + ["Failures:"] + failures if failures else [])) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] == ["--worker"]:
        return _worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--smoke", action="store_true", help="tiny networks, in this process, no --compile")
    p.add_argument("--torchrun", action="store_true", help="with --smoke: each command under torchrun all the same")
    p.add_argument("--steps", type=int, default=8, help="training steps of each run (5 with --smoke)")
    p.add_argument("--jobs", type=int, default=5, help="commands at once after the timed --amp runs")
    p.add_argument("--budget", type=float, default=470, help="seconds from the start that no command runs past")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder of gpu_check.json and .md")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here; for the CPU path: --device cpu --smoke")
    if args.steps < 5 and not args.smoke:
        p.error(f"--steps {args.steps}: accepted >= 5 (2 of warm-up, 1 counted, 1 timed; the last is not)")
    start = time.time()
    deadline = start + args.budget
    with tempfile.TemporaryDirectory() as tmp:
        work, data = Path(tmp) / "runs", Path(tmp) / "data"
        fake_cifar10(data, *((20, 8) if args.smoke else (1280, 64)))
        weights = None if args.smoke else random_inception_weights(Path(tmp) / "inception.pth")
        if weights:
            os.environ[common.FID_WEIGHTS_ENV] = str(weights)
        results = {m: {"paper_steps": preset(m)[0], "batch": 4 if args.smoke else preset(m)[1]} for m in args.models}
        for m in args.models:  # one at a time: the table's times
            results[m]["amp"] = command(m, "amp", args, data, work, deadline)
        rest = [(m, step) for step in ("compile", "sample", "eval", *(["fid"] if weights else [])) for m in args.models]
        with concurrent.futures.ThreadPoolExecutor(1 if args.smoke else args.jobs) as pool:  # the compilations first
            done = {(m, step): pool.submit(command, m, step, args, data, work, deadline) for m, step in rest}
            for (m, step), f in done.items():
                results[m][step] = f.result()
    peak, name = bf16_peak(args.device)
    line = "python benchmarks/gpu_check.py " + " ".join(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": line.strip(), "device": name, "bf16_peak": peak, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "seconds": round(time.time() - start, 1), "files": results}
    (out / "gpu_check.json").write_text(json.dumps(record, indent=1) + "\n")
    where = ("under torchrun with one process" if args.torchrun or not args.smoke
             else "with tiny networks (--smoke), in one process")
    md = table(results, peak, name, line.strip(), where)
    (out / "gpu_check.md").write_text(md)
    print(md + f"\n{time.time() - start:.0f} s; written to {out}: gpu_check.json, gpu_check.md", flush=True)
    return record


if __name__ == "__main__":
    main()
