"""Plumbing shared by the model files; no model mathematics lives here.

Above the MACHINERY line: the configuration and what a model file's train(), evaluate(),
draw_samples() and load() are built from. Below it, what a reader may take on trust: the command
line (parse_config, user_errors, dispatch), the log (Logger), stop signals, run folders, processes,
the datasets' sources and drawing. A model file needs this file alone (and data/).
"""
from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import gzip
import hashlib
import http.client
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import struct
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
import typing
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


# ----------------------------------------------------------------------------------------
# User errors and the configuration
# ----------------------------------------------------------------------------------------

class UserError(Exception):
    """A mistake of the user's: one line saying what was wrong and what is accepted."""


def flag(default, help, choices=None):
    """A configuration field that is also a command-line flag."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for a sequence default")
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class RunConfig:
    """The flags every model file shares; a model's Config subclasses it."""
    dataset: str = flag("digits", "dataset name (see README) or a path to a .txt file")
    steps: int = flag(2000, "training steps (optimiser updates)")
    batch_size: int = flag(128, "global batch size, split across processes under torchrun")
    lr: float = flag(1e-3, "learning rate")
    seed: int = flag(0, "random seed")
    device: str = flag("auto", "device: auto picks cuda, then mps, then cpu", choices=("auto", "cpu", "cuda", "mps"))
    out: typing.Optional[str] = flag(None, "run folder (default runs/<model>-<dataset>)")
    resume: typing.Optional[str] = flag(None, "resume training from CKPT (bare --resume: <run folder>/ckpt.pt)")
    overwrite: bool = flag(False, "train afresh where a run is (deletes its checkpoint, metrics, pictures, samples)")
    sample: typing.Optional[str] = flag(None, "load CKPT, write samples and exit")
    n_samples: int = flag(64, "number of samples to draw")
    eval: typing.Optional[str] = flag(None, "load CKPT, report the test-set likelihood and exit")
    fid: typing.Optional[int] = flag(None, "with --eval: FID of N samples (bare: 50000 or the training set's size)")
    compile: bool = flag(False, "torch.compile the network")
    amp: bool = flag(False, "bfloat16 autocast for the network")
    data_dir: typing.Optional[str] = flag(None, "dataset cache (default $GENMODELS_DATA or ~/.cache/genmodels)")
    log_every: int = flag(50, "steps between lines of metrics.jsonl")
    save_every: int = flag(500, "steps between checkpoints and sample grids")


def check_range(cfg, name, low=None, high=None, open_low=False, open_high=False):
    """A UserError unless low <= cfg.<name> <= high (strict at an open end)."""
    value = getattr(cfg, name)
    if ((low is None or (value > low if open_low else value >= low))
            and (high is None or (value < high if open_high else value <= high))):
        return
    accepted = " and ".join(s for s in (None if low is None else f"{'>' if open_low else '>='} {low}",
                                        None if high is None else f"{'<' if open_high else '<='} {high}") if s)
    raise UserError(f"--{name.replace('_', '-')} {value} is out of range; accepted: {accepted}")


# ----------------------------------------------------------------------------------------
# Data and batches: the data lives on the device; a batch is a random draw of indices
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a model knows of its data; a checkpoint holds it, so --sample and --eval need no dataset."""
    name: str
    kind: str                                  # "image", "points" or "text"
    shape: tuple                               # one example: (C, H, W), (2,) or () for a token
    levels: typing.Optional[int] = None        # images: integer levels 0..levels-1
    num_classes: int = 0                       # labelled images: 10; otherwise 0
    lim: typing.Optional[float] = None         # points: the data lie in [-lim, lim]^2
    vocab: typing.Optional[tuple] = None       # text: the characters; a token is an index

    @property
    def dims(self):
        """Dimensions of one example (C*H*W, 2, or 1 per text token): the divisor of bits/dim."""
        return math.prod(self.shape)

    def as_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**{**d, "shape": tuple(d["shape"]), "vocab": None if d.get("vocab") is None else tuple(d["vocab"])})


def load_dataset(name, split="train", root=None):
    """One split ("train" or "test") of a dataset, downloaded into `root` if need be: `.info`, `.data`,
    `.labels` (images), `.sample(n, generator)` and the exact `.log_prob(x)` or None (2D sets)."""
    kind = _dataset_kind(name)
    if split not in _SPLITS:
        raise UserError(f"unknown split '{split}'; accepted: {', '.join(_SPLITS)}")
    if kind == "points":
        sampler, log_prob = _POINT_SETS[name]
        data = sampler(_POINTS_N, torch.Generator().manual_seed(_POINTS_SEED[split]))
        return _Dataset(DataInfo(name, kind, (2,), lim=POINTS_LIM), split, data, log_prob=log_prob, sample=sampler)
    if kind == "text":
        ids, vocab = _load_text(name, split, root)
        return _Dataset(DataInfo(name, kind, (), vocab=tuple(vocab)), split, ids)
    images, labels, levels = _load_images(name, split, root)
    return _Dataset(DataInfo(name, kind, tuple(images.shape[1:]), levels=levels, num_classes=10), split, images, labels)


class Batches:
    """Endless batches on `dist.device`: (images uint8, labels) or (fresh points, None), not text (gpt.py
    draws windows); each process draws the same global batch and keeps its slice: N see what one would."""

    def __init__(self, ds, batch_size, dist=None, seed=0):
        self.dist = dist or _Dist()
        if batch_size % self.dist.world_size:
            raise UserError(f"--batch-size {batch_size} does not split over {self.dist.world_size} processes; "
                            f"use a multiple of {self.dist.world_size}")
        self.ds, self.kind, self.batch_size = ds, ds.info.kind, batch_size
        self.generator = torch.Generator().manual_seed(_stream_seed(seed, "batches"))
        self.data = ds.data.to(self.dist.device) if self.kind != "points" else None
        self.labels = ds.labels.to(self.dist.device) if ds.labels is not None else None
        self.part = slice(self.dist.rank * batch_size // self.dist.world_size,
                          (self.dist.rank + 1) * batch_size // self.dist.world_size)

    def __iter__(self):
        return self

    def __next__(self):
        device, g, n = self.dist.device, self.generator, self.batch_size
        if self.kind == "points":
            return self.ds.sample(n, g)[self.part].to(device), None
        i = torch.randint(len(self.data), (n,), generator=g)[self.part].to(device)
        return self.data[i], (self.labels[i] if self.labels is not None else None)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


# ----------------------------------------------------------------------------------------
# Training: the run, the average of the weights, devices
# ----------------------------------------------------------------------------------------

class Training:
    """What every train() repeats around its loop `for step in run.steps(step, pictures): ...;
    run.log(loss=loss)` (ddpm.py's shows the whole shape): processes (`run.dist`: rank, world_size,
    device, is_main; collectives sum, mean, any), run folder `run.out`, stop signals, the log
    (`run.logger.event(name, **fields)`), --resume and checkpoints."""

    def __init__(self, cfg, model_name):
        self.cfg, self.model_name, self.step, self.parts, self.info = cfg, model_name, 0, {}, None

    def __enter__(self):
        self.dist = _init_distributed(self.cfg.device)
        self.device = self.dist.device
        self.out = _open_run(self.cfg, self.model_name, self.dist)
        self.stop = _StopSignal().__enter__()
        self.logger = Logger(self.out, self.cfg.steps, enabled=self.dist.is_main, every=self.cfg.log_every)
        return self

    def start(self, info, **parts):
        """The step to train from: --resume restores the parts and random state; a fresh run seeds
        each process with seed + rank (the weights are alike already; the noise must differ)."""
        self.info, self.parts = info, parts
        if self.cfg.resume:
            return _resume(self.cfg, self.model_name, self.dist, **parts)
        seed_everything(self.cfg.seed + self.dist.rank)
        return 0

    def steps(self, step, pictures=None):
        """Yield step, ..., cfg.steps - 1; a checkpoint and `pictures(step)` every --save-every steps
        and at the last, a checkpoint alone at a stop signal or for --steps 0."""
        cfg, dist = self.cfg, self.dist
        start = self.step = step
        self.logger.restart_clock()
        while self.step < cfg.steps:
            yield self.step
            self.step += 1
            stopping = dist.any(self.stop.requested)
            if self.step % cfg.save_every == 0 or self.step == cfg.steps or stopping:
                self.checkpoint(None if stopping else pictures)
            if stopping:
                if dist.is_main:
                    print(f"stopped at step {self.step}; {self.out / 'ckpt.pt'} saved; continue with --resume",
                          flush=True)
                return
        if self.step == start:  # --steps 0, or nothing left to train: still a checkpoint
            self.checkpoint(pictures)

    def checkpoint(self, pictures=None):
        """Save ckpt.pt (a collective), then draw `pictures(step)` on rank 0; neither counts in examples/s."""
        with self.logger.paused():
            _save_training(self.out, self.model_name, self.step, self.cfg, self.info, self.dist, **self.parts)
        if pictures is not None:
            self.draw(pictures, self.step)

    def draw(self, picture, *args):
        """picture(*args) on rank 0 unless a stop was asked for; a stop signal interrupts it."""
        if self.dist.is_main and not self.stop.requested:
            with self.logger.paused(), self.stop.interruptible():
                picture(*args)

    def log(self, **metrics):
        """Log the step just taken (tensors averaged over processes; a non-finite loss stops the run)."""
        values = {k: self.dist.mean(v) if torch.is_tensor(v) else v for k, v in metrics.items()}
        if "loss" in values:
            _check_finite(values["loss"], self.step + 1)
        self.logger.log(self.step + 1, self.cfg.batch_size, **values)
        return values

    def __exit__(self, kind, *exc):
        self.stop.__exit__(kind, *exc)
        if kind is None:
            self.logger.close()
            self.dist.close()
        return False

    def report(self, names):
        """The last line of a training run: the files it wrote (rank 0)."""
        if self.dist.is_main:
            report_files(self.out, names)


class EMA:
    """theta_ema <- d theta_ema + (1 - d) theta for parameters and float buffers (others copied);
    with warm-up d = min(decay, (1 + n) / (10 + n)) after n updates."""

    def __init__(self, model, decay, warmup=True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = decay, warmup, 0

    @torch.no_grad()
    def update(self, model):
        n, self.num_updates = self.num_updates, self.num_updates + 1
        d = min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.lerp_(b, 1 - d) if e.is_floating_point() else e.copy_(b)

    def state_dict(self):
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.num_updates = state["num_updates"]


def get_device(name="auto"):
    """cuda, then mps, then cpu for "auto"; a named device that is absent is a UserError."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    kind = name.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device '{name}'; accepted: auto, cpu, cuda, cuda:N, mps")
    if (kind == "cuda" and not torch.cuda.is_available()) or (kind == "mps" and not has_mps):
        raise UserError(f"device '{name}' is not available on this machine; accepted here: auto, cpu")
    return torch.device(name)


def seed_everything(seed):
    """Seed Python, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def wrap_ddp(net, dist, compile=False):
    """DistributedDataParallel over several processes, then torch.compile if asked (PyTorch's order);
    checkpoints and EMA keep the unwrapped `net`."""
    model = net
    if dist.world_size > 1:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
    return torch.compile(model) if compile else model


# ----------------------------------------------------------------------------------------
# Checkpoints, outputs and pictures
# ----------------------------------------------------------------------------------------

def load_checkpoint(path, model=None):
    """A checkpoint, loaded with weights_only=True; a missing or unreadable file, or one written
    by a model file other than `model` (a name or a tuple of names), is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass a ckpt.pt written by a training run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is truncated, corrupt "
                        "or not a checkpoint of this project") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path} is not a checkpoint of this project (no model weights in it)")
    accepted = (model,) if isinstance(model, str) else model
    if accepted and state.get("model_name") not in accepted:
        raise UserError(f"{path} was written by {_writer(state)}; this file takes checkpoints of "
                        f"{' or '.join(f'{m}.py' for m in accepted)}")
    return state


def saved_config(cls, ckpt):
    """(Config, DataInfo) of a checkpoint; fields this file no longer knows are dropped."""
    known = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items() if k in known})
    return cfg, DataInfo.from_dict(ckpt["data"])


def load_weights(module, state, path):
    """module.load_state_dict(state), a mismatch being a one-line UserError."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"the weights in {path} do not fit the network this file builds "
                        f"({_state_dict_mismatch(e)})") from None


def output_dir(cfg, ckpt):
    """Where --eval and --sample write: --out, or the checkpoint's folder."""
    path = Path(cfg.out) if cfg.out else Path(ckpt).parent
    _make_writable_dir(path)
    return path


def report_files(out, names):
    """The last line a command prints: the files it wrote that exist."""
    written = [n for n in names if (Path(out) / n).exists()]
    print(f"written to {out}: {', '.join(written) if written else 'nothing'}", flush=True)


def save_image_grid(x, path, levels=None, nrow=None, title=None):
    """A batch (N, C, H, W) as a PNG grid of at least ~256 pixels, `title` above: integer levels in
    [0, levels) when `levels` is given, else floats in [0, 1]."""
    _draw_grid(_image_grid(x, levels, nrow), path, title)


def save_scatter(points, path, lim=None, title=None):
    """A scatter plot of 2D points (N, 2) on [-lim, lim]^2."""
    _draw_scatter(torch.as_tensor(points).detach().float().cpu().numpy(), path, lim, title)


def density_on_grid(log_prob, lim, n=128, chunk=4096):
    """log_prob ((M, 2) float32 -> (M,)) at the n x n cell centres of [-lim, lim]^2, as a numpy
    array (n, n), row i at y_i, column j at x_j; log_prob picks its device and gradient mode."""
    edges = torch.linspace(-lim, lim, n + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    return torch.cat([log_prob(c).detach().double().cpu() for c in pts.split(chunk)]).reshape(n, n).numpy()


def save_density(panels, path, lim):
    """Heat maps side by side, {title: an (n, n) log-density from `density_on_grid`, or (M, 2) points
    (M != 2) drawn as a histogram}."""
    _draw_density(panels, path, lim)


def entropy_estimate(name, n=100_000, seed=0):
    """(H, standard error): the entropy -E[log p(x)] in nats of a 2D set with a closed-form density,
    by Monte Carlo over n fresh points; a model's test NLL approaches it from above."""
    sampler, log_prob = _POINT_SETS[name]
    if log_prob is None:
        raise UserError(f"{name} has no closed-form density; sets with one: "
                        + ", ".join(k for k, v in _POINT_SETS.items() if v[1] is not None))
    lp = log_prob(sampler(n, torch.Generator().manual_seed(seed)).double())
    return -lp.mean().item(), lp.std().item() / math.sqrt(n)


# ========================================================================================
# MACHINERY: what the functions above rely on. Nothing below is needed to read a model file.
# ========================================================================================

# --- the command line

@contextmanager
def user_errors():
    """A UserError ends the process with `error: <message>` and status 2, a second stop signal
    with its line and status: no traceback for what the user did."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except _Interrupted as e:
        print(e, file=sys.stderr)
        raise SystemExit(e.code) from None
    except KeyboardInterrupt:
        print("interrupted; a checkpoint on disk is whole (each is written atomically)", file=sys.stderr)
        raise SystemExit(130) from None


def dispatch(cfg, train, evaluate, draw_samples):
    """Run --eval, --sample or training; running out of memory is a UserError naming the flag
    that sized the allocation."""
    command, sizing = ((evaluate, "batch_size") if cfg.eval else (draw_samples, "n_samples") if cfg.sample
                       else (train, "batch_size"))
    try:
        return command(cfg)
    except (MemoryError, RuntimeError) as e:
        asked = _allocation_failure(e)
        if asked is None:
            raise
        name = "--" + sizing.replace("_", "-")
        raise UserError(f"out of memory: {asked} could not be allocated with {name} {getattr(cfg, sizing)}; "
                        f"lower {name} (what is on disk is kept)") from None


def parse_config(cls, presets, argv=None, doc=None, kinds=("image", "points", "text"), arch_presets=None):
    """The configuration: defaults, then the preset `presets[dataset]` (else `presets[kind]`;
    `arch_presets[arch]` replaces `presets` where given), then the typed flags."""
    parser = _build_parser(cls, presets, doc, arch_presets or {})
    typed = vars(parser.parse_args(argv))
    default = {f.name: f.default for f in dataclasses.fields(cls)}
    dataset = typed.get("dataset", default["dataset"])
    try:
        kind = _dataset_kind(dataset)
    except UserError as e:
        parser.error(str(e))
    if kind not in kinds:
        parser.error(f"--dataset {dataset} is {kind} data; this model accepts {', '.join(kinds)} data")
    presets = (arch_presets or {}).get(typed.get("arch", default.get("arch")), presets)
    resumed = _resumed_flags(cls, typed, default) if "resume" in typed else {}
    cfg = cls(**{**presets.get(dataset, presets.get(kind, {})), **resumed, **typed})
    _check_shared_flags(cfg, parser)
    return cfg


def _resumed_flags(cls, typed, default):
    """What --resume keeps from its checkpoint: every flag not typed now, except those that say
    where and how this command runs. Nothing when the checkpoint is absent (_resume() says so)."""
    model = Path(sys.modules[cls.__module__].__file__).stem
    where = argparse.Namespace(out=typed.get("out"), dataset=typed.get("dataset", default["dataset"]))
    path = _run_dir(where, model) / "ckpt.pt" if typed["resume"] == "auto" else Path(typed["resume"])
    if not path.is_file():
        return {}
    saved, _ = saved_config(cls, load_checkpoint(path, model))
    here = {"resume", "overwrite", "sample", "eval", "out", "device", "data_dir", "compile", "amp"}
    return {k: v for k, v in dataclasses.asdict(saved).items() if k not in here}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _build_parser(cls, presets, doc, arch_presets):
    tables = [("presets (applied by --dataset before the flags you type)", presets),
              *((f"presets with --arch {arch}", table) for arch, table in arch_presets.items())]
    epilog = "\n".join(f"{title}:\n" + "\n".join(f"  {name}: " + " ".join(f"{k}={_show(v)}" for k, v in p.items())
                                                  for name, p in table.items()) for title, table in tables)
    parser = _Parser(description=(doc or "").strip().split("\n\n")[0], epilog=epilog,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name, default = "--" + f.name.replace("_", "-"), f.default
        help_text = f.metadata.get("help", "") + ("" if default is None else f" (default: {_show(default)})")
        if hints[f.name] is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        elif f.name == "resume":
            parser.add_argument(name, nargs="?", const="auto", default=argparse.SUPPRESS, metavar="CKPT",
                                help=help_text)
        else:
            parser.add_argument(name, type=_converter(hints[f.name], default), default=argparse.SUPPRESS,
                                choices=f.metadata.get("choices"), metavar=f.name.upper(), help=help_text,
                                **({"nargs": "?", "const": 0} if f.name == "fid" else {}))  # bare --fid
    return parser


def _converter(tp, default):
    """The command-line string to the field's type (int, float, str, tuples, Optional)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        return _converter(next(a for a in args if a is not type(None)), default)
    if tp is tuple or origin is tuple:
        item = args[0] if args else type(default[0]) if default else str

        def parse_tuple(s):
            return tuple(item(v) for v in s.split(",") if v.strip())
        parse_tuple.__name__ = f"comma-separated {item.__name__}"
        return parse_tuple
    return tp


def _show(v):
    return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else v


def _check_shared_flags(cfg, parser):
    try:
        check_range(cfg, "steps", 0)
        for name in ("batch_size", "n_samples", "log_every", "save_every"):
            check_range(cfg, name, 1)
        check_range(cfg, "lr", 0, open_low=True)
    except UserError as e:
        parser.error(str(e))
    if cfg.overwrite and cfg.resume:
        parser.error("--overwrite starts afresh and --resume continues: give one of them")
    if cfg.fid is not None and not cfg.eval:
        parser.error("--fid scores the samples of a checkpoint: give --eval CKPT with it")


def _allocation_failure(e):
    """The size a failed allocation asked for ("40.0 GB"), "memory" when unknown, or None when
    `e` is not an out-of-memory error (CPU, CUDA, MPS or MemoryError)."""
    text = str(e)
    if isinstance(e, MemoryError):
        return "memory"
    if not (isinstance(e, getattr(torch, "OutOfMemoryError", ())) or "can't allocate memory" in text
            or "out of memory" in text):
        return None
    m = re.search(r"allocate (\d+) bytes", text)
    if m:
        return f"{int(m.group(1)) / 1e9:.3g} GB"
    m = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]i?B)", text)
    return m.group(1) if m else "memory"


# --- stopping: a non-finite loss, a signal

def _check_finite(value, step):
    """Stop training on a NaN or infinite loss, naming the step; nothing is saved after it."""
    if not math.isfinite(value):
        raise UserError(f"loss is {value} at step {step}; training stopped and the last checkpoint on disk "
                        "is kept (try a lower --lr)")


class _Interrupted(Exception):
    """A second stop signal, which ends the run at once; `code` is the exit status."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class _PicturesStopped(Exception):
    """Raised at a network call inside _StopSignal.interruptible() once a signal came, and caught there."""


class _StopSignal:
    """Inside `with _StopSignal() as stop:` a first SIGINT or SIGTERM sets `stop.requested` (the loop
    saves and exits with status 0) and stops pictures drawn inside `stop.interruptible()` at their
    next network call; a second signal ends the process at once (status 128 + signal)."""

    def __enter__(self):
        self.requested, self._pictures, self._previous = False, False, {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
            self._previous_unraisable, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    @contextmanager
    def interruptible(self):
        # A forward pre-hook, not the handler, raises: an exception raised by a signal handler
        # is lost when the handler runs inside a finaliser (a weakref callback of matplotlib's).
        self._pictures = True
        hook = torch.nn.modules.module.register_module_forward_pre_hook(self._stop_pictures)
        try:
            yield
        except _PicturesStopped:
            pass
        finally:
            hook.remove()
            self._pictures = False

    def _stop_pictures(self, module, args):
        if self.requested:
            raise _PicturesStopped

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            raise _Interrupted(f"{name} again: stopped at once; the checkpoint on disk is whole (continue with "
                              "--resume)", 128 + signum)
        self.requested = True
        what = "pictures stopped; the checkpoint is saved" if self._pictures else \
            "finishing this step, then saving a checkpoint"
        print(f"\n{name}: {what}", file=sys.stderr, flush=True)

    def _unraisable(self, unraisable):  # the second signal's exception, lost in a finaliser
        if isinstance(unraisable.exc_value, _Interrupted):
            print(unraisable.exc_value, file=sys.stderr, flush=True)
            os._exit(unraisable.exc_value.code)
        self._previous_unraisable(unraisable)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if self._previous:
            sys.unraisablehook = self._previous_unraisable
        return False


# --- run folders

def _open_run(cfg, model, dist):
    """The run folder, created and locked: one that holds a run is refused unless --resume or
    --overwrite, as is a second training writing into it; rank 0 decides for all."""
    path, error = _run_dir(cfg, model), None
    if dist.is_main:
        try:
            _claim_run_folder(path, resuming=bool(cfg.resume), overwrite=cfg.overwrite)
        except UserError as e:
            error = e
    if dist.any(error is not None):
        raise error or UserError(f"the run folder {path} was refused (see the first process's message)")
    return path


def _run_dir(cfg, model):
    """--out, or runs/<model>-<dataset> (a .txt dataset gives its stem)."""
    return Path(cfg.out) if cfg.out else Path("runs") / f"{model}-{Path(cfg.dataset).stem}"


_RUN_OUTPUTS = ("ckpt.pt", "metrics.jsonl")  # what makes a folder hold a run
_RUN_FILES = ("ckpt.pt", "metrics.jsonl", "*.png", "samples*", "density.npz")  # what --overwrite deletes
_RUN_FLAGS = {f.name for f in dataclasses.fields(RunConfig)} - {"dataset"}  # flags that do not shape a network
_RUN_LOCKS = {}  # resolved folder -> open lock file, held until the process ends


def _make_writable_dir(path):
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except FileExistsError:
        raise UserError(f"--out {path} is a file, not a folder; give a folder (it is created if missing)") from None
    except NotADirectoryError:
        raise UserError(f"--out {path} lies below a file, not a folder; give a folder you can write to") from None
    except PermissionError:
        raise UserError(f"--out {path} cannot be written (permission denied); give a folder you can write to") from None
    except OSError as e:
        raise UserError(f"--out {path} cannot be used ({e.strerror}); give a folder you can write to") from None


def _claim_run_folder(path, resuming, overwrite):
    _make_writable_dir(path)
    _lock_run_folder(path)
    held = [n for n in _RUN_OUTPUTS if (path / n).exists()]
    if held and not resuming:
        if not overwrite:
            raise UserError(f"{path} holds a run ({', '.join(held)}); continue it with --resume, start afresh with "
                            f"--overwrite, or choose another --out")
        for pattern in _RUN_FILES:
            for f in path.glob(pattern):
                if f.is_file():
                    f.unlink()


def _lock_run_folder(path):
    """An exclusive flock on <path>/.lock for the life of this process (none without fcntl)."""
    key = path.resolve()
    if key in _RUN_LOCKS:
        return
    try:
        import fcntl
    except ImportError:
        return
    f = open(path / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise UserError(f"another training ({owner}) is writing to {path}; wait for it or choose another --out") \
            from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    _RUN_LOCKS[key] = f


# --- checkpoints of a training run: written atomically, with every process's random state

def _save_checkpoint(path, state):
    """torch.save(state) so that `path` always holds a whole checkpoint (see _atomic_write)."""
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def _save_training(out, model_name, step, cfg, info, dist, /, **parts):
    """<out>/ckpt.pt: model file, step, configuration, data description, each part's state_dict()
    and every process's torch generator states (all its randomness); a collective, rank 0 writes."""
    rng = _gather_rng_states(dist)
    if dist.is_main:
        _save_checkpoint(Path(out) / "ckpt.pt", dict(
            model_name=model_name, step=step, config=dataclasses.asdict(cfg), data=info.as_dict(), rng=rng,
            **{name: part.state_dict() for name, part in parts.items()}))


def _resume(cfg, model_name, dist, /, **parts):
    """Restore the checkpoint --resume names into each part and the random state; returns its
    step. A network the typed flags change is a UserError naming the flags."""
    path = _run_dir(cfg, model_name) / "ckpt.pt" if cfg.resume == "auto" else Path(cfg.resume)
    ckpt = load_checkpoint(path, model_name)
    for name, part in parts.items():
        try:
            part.load_state_dict(ckpt[name])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"cannot resume from {path}: {_why_not_resumable(cfg, ckpt, name, e)}") from None
    _set_rng_state(ckpt["rng"], dist)
    return ckpt["step"]


def _writer(state):
    name = state.get("model_name")
    return f"{name}.py" if name else "an older version of this project (no model name in it)"


def _state_dict_mismatch(e):
    """The first line of load_state_dict's complaint, shortened to one line."""
    first = str(e).strip().splitlines()
    text = " ".join(s.strip() for s in first[1:3]) if len(first) > 1 else (first[0] if first else type(e).__name__)
    return text[:300]


def _why_not_resumable(cfg, ckpt, part, e):
    """The typed flags that differ from the checkpoint's (the likely cause), else the error."""
    differ = [f"--{k.replace('_', '-')} {_show(v)} (now {_show(getattr(cfg, k))})" for k, v in ckpt["config"].items()
              if k not in _RUN_FLAGS and hasattr(cfg, k) and _show(v) != _show(getattr(cfg, k))]
    if differ:
        return ("flags differ from the checkpoint's: " + ", ".join(differ)
                + "; resume with the checkpoint's values, or start afresh with --overwrite")
    return f"its {part} does not fit ({_state_dict_mismatch(e)}); start afresh with --overwrite"


def _gather_rng_states(dist):
    """Every process's torch generator states: [{"cpu": ByteTensor, "cuda": ByteTensor or None}] by rank."""
    local = {"cpu": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(dist.device) if dist.device.type == "cuda" else None}
    if dist.world_size == 1:
        return [local]
    states = [dict.fromkeys(local) for _ in range(dist.world_size)]
    for key, state in local.items():
        if state is not None:  # a generator's state has the same size on every process
            t = state.to(dist.device)
            parts = [torch.empty_like(t) for _ in range(dist.world_size)]
            torch.distributed.all_gather(parts, t)
            _COLLECTIVE_TENSORS.extend([t, *parts])
            for s, part in zip(states, parts):
                s[key] = part.to("cpu", copy=True)  # not the tensor kept for _leave_process_group
    return states


def _set_rng_state(states, dist):
    """Restore this process's generators; with another number of processes than saved, the seeded
    generators are kept (the run goes on, not bit-exactly)."""
    if len(states) != dist.world_size:
        if dist.is_main:
            print(f"note: checkpoint saved by {len(states)} process(es), resuming with {dist.world_size}: "
                  "random streams restart from the seed", file=sys.stderr)
        return
    torch.set_rng_state(states[dist.rank]["cpu"])
    if states[dist.rank]["cuda"] is not None and dist.device.type == "cuda":
        torch.cuda.set_rng_state(states[dist.rank]["cuda"], dist.device)


def _stream_seed(seed, stream):
    """A seed for the named stream, unrelated to `seed`: no stream repeats another's draws."""
    return int(np.random.SeedSequence([seed, *stream.encode()]).generate_state(1)[0])


# --- processes under torchrun

@dataclasses.dataclass
class _Dist:
    """This process's rank among world_size and its device; only rank 0 (`is_main`) writes files.
    `mean`, `any` and `sum` are collectives every process must call."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    def mean(self, x):
        """The average of a scalar over all processes, as a Python float."""
        t = torch.tensor(float(x)) if not torch.is_tensor(x) else x.detach().float().reshape(())
        return self.sum(t)[0].item() / self.world_size

    def any(self, flag):
        """True on every process when `flag` is true on any of them."""
        return _all_reduce([torch.tensor(float(flag))], self, "max")[0].item() > 0

    def sum(self, *tensors):
        """The tensors summed over all processes, as new tensors."""
        return _all_reduce(tensors, self, "sum")

    def close(self):
        """Wait for every process, then leave the process group (see _leave_process_group)."""
        _leave_process_group(self)


def _init_distributed(device="auto"):
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA), or run alone."""
    dev = get_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return _Dist(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return _Dist(rank, world_size, dev)


def _all_reduce(tensors, dist, op):
    """`tensors` reduced over the processes in one all_reduce of a flat copy (kept for
    _leave_process_group), as new tensors."""
    if dist.world_size == 1:
        return tuple(t.detach().clone() for t in tensors)
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors]).to(dist.device)
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM if op == "sum"
                                 else torch.distributed.ReduceOp.MAX)
    _COLLECTIVE_TENSORS.append(flat)
    parts = flat.split([t.numel() for t in tensors])
    return tuple(p.reshape(t.shape).to(t.dtype) for p, t in zip(parts, tensors))


_COLLECTIVE_TENSORS = collections.deque(maxlen=16)  # our last collectives' tensors


def _leave_process_group(dist):
    """Barrier, wait until gloo's worker threads let go of our tensors, leave the process group.

    A gloo thread that releases a tensor's Python object after interpreter shutdown has begun
    aborts the process ("terminate called without an active exception", torch 2.13); a C++
    reference counts in the Python reference count, so we wait, GIL released, for none."""
    if dist.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(sys.getrefcount(t) > 3 for t in _COLLECTIVE_TENSORS):
            time.sleep(0.001)  # references: the deque, the loop variable, getrefcount's argument
        torch.distributed.destroy_process_group()


# --- files: atomic writes that follow the umask

def _atomic_write(path, write):
    """`write(f)` into a temporary file beside `path`, fsynced, given the mode open() would give,
    renamed over `path` (atomic on POSIX), and the rename made durable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# --- the log: metrics.jsonl and the terminal

class Logger:
    """metrics.jsonl and the terminal. log(step, n, **metrics), n examples: every `every` steps
    (and at close) a line of means and examples/s; a progress line at most every `print_every` s.
    event(name, **fields) writes a line at once; close() also draws loss.png."""

    def __init__(self, out_dir, total_steps, enabled=True, every=50, print_every=None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.total, self.enabled, self.every = total_steps, enabled, every
        self.print_every = print_every if print_every is not None else (1.0 if sys.stdout.isatty() else 10.0)
        self.sums, self.counts, self.count, self.examples, self.step = {}, {}, 0, 0, None
        self.t_start = self.t_window = self.t_printed = time.perf_counter()
        self.first_step = None

    def log(self, step, n, **metrics):
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step = step - 1
        for k, v in metrics.items():  # a metric logged at some steps only is averaged over those
            self.sums[k], self.counts[k] = self.sums.get(k, 0.0) + float(v), self.counts.get(k, 0) + 1
        self.count, self.examples, self.step = self.count + 1, self.examples + n, step
        if now - self.t_printed >= self.print_every or step == self.total:
            _print_progress(self, step, now)
            self.t_printed = now
        if step % self.every == 0 or step == self.total:
            _write_window(self, now)

    def restart_clock(self):
        """Time from now: building and resuming are not training."""
        self.t_start = self.t_window = self.t_printed = time.perf_counter()

    @contextmanager
    def paused(self):
        """Time inside counts neither in examples/s nor in the ETA."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.t_start, self.t_window = self.t_start + dt, self.t_window + dt

    def event(self, name, **fields):
        if self.enabled:
            _append_json(self.path, {"event": name, **fields})
            print(f"{name}: " + " ".join(f"{k} {_fmt(v)}" for k, v in fields.items()), flush=True)

    def close(self):
        if not self.enabled:
            return
        if self.count:
            _write_window(self, time.perf_counter())
        if self.path.exists():
            _plot_metrics(self.path, self.path.with_name("loss.png"))


def _append_json(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _print_progress(logger, step, now):
    eta = (now - logger.t_start) / (step - logger.first_step) * (logger.total - step)
    speed = logger.examples / max(now - logger.t_window, 1e-9)
    shown = " | ".join(f"{k} {_fmt(s / logger.counts[k])}" for k, s in logger.sums.items())
    end = "\r" if sys.stdout.isatty() and step < logger.total else "\n"
    print(f"step {step}/{logger.total} | {shown} | {speed:.0f} ex/s | ETA {eta:.0f}s", end=end, flush=True)


def _write_window(logger, now):
    """One metrics line: the mean of each metric over the steps since the last line."""
    speed = logger.examples / max(now - logger.t_window, 1e-9)
    _append_json(logger.path, {"step": logger.step, **{k: s / logger.counts[k] for k, s in logger.sums.items()},
                               "ex_per_s": speed})
    logger.sums, logger.counts, logger.count, logger.examples, logger.t_window = {}, {}, 0, 0, now


def _read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --- datasets: one split of any kind, the 2D sets, the downloaded sets

@dataclasses.dataclass
class _Dataset:
    """One split. image: data uint8 (N, C, H, W) of levels 0..levels-1, labels int64 (N,);
    points: data float32 (N, 2), fresh points from `sample(n, generator)`, the exact
    `log_prob(x)` or None; text: data int64 (num_chars,), the token ids."""
    info: DataInfo
    split: str
    data: torch.Tensor
    labels: typing.Optional[torch.Tensor] = None
    log_prob: typing.Optional[typing.Callable] = None
    sample: typing.Optional[typing.Callable] = None


POINTS_LIM = 4.0  # every 2D set lies in [-4, 4]^2


# --- the 2D sets: each a sampler drawing from a torch generator, some with an exact density

_8G_RADIUS, _8G_STD = 2.5, 0.3
_8G_CENTRES = _8G_RADIUS * torch.stack([torch.cos(torch.arange(8) * math.pi / 4),
                                         torch.sin(torch.arange(8) * math.pi / 4)], 1)


def _sample_8gaussians(n, g):
    k = torch.randint(8, (n,), generator=g)
    return _8G_CENTRES[k] + _8G_STD * torch.randn(n, 2, generator=g)


def _log_prob_8gaussians(x):
    """An equal mixture of 8 isotropic Gaussians (std 0.3) centred on a circle of radius 2.5."""
    d2 = ((x[:, None, :] - _8G_CENTRES.to(x)) ** 2).sum(-1)  # (N, 8)
    log_comp = -d2 / (2 * _8G_STD**2) - math.log(2 * math.pi * _8G_STD**2)
    return torch.logsumexp(log_comp, 1) - math.log(8)


def _sample_checkerboard(n, g):
    # A 4x4 board of 2x2 cells over [-4, 4]^2; the 8 cells with (column + row) even are filled.
    x = 8 * torch.rand(n, generator=g) - 4
    col = torch.floor((x + 4) / 2)
    row = 2 * torch.randint(2, (n,), generator=g) + (col % 2)
    y = -4 + 2 * row + 2 * torch.rand(n, generator=g)
    return torch.stack([x, y], 1)


def _log_prob_checkerboard(x):
    """Uniform on 8 cells of area 4: log(1/32) inside them, -inf outside."""
    col, row = torch.floor((x[:, 0] + 4) / 2), torch.floor((x[:, 1] + 4) / 2)
    inside = (x.abs() < 4).all(1) & ((col + row) % 2 == 0)
    return torch.where(inside, torch.full_like(col, -math.log(32)), torch.full_like(col, -math.inf))


_RING_RADII, _RING_STD = torch.tensor([1.0, 2.0, 3.0]), 0.1
_RING_WEIGHTS = _RING_RADII / _RING_RADII.sum()  # as many points per unit length on every ring


def _sample_rings(n, g):
    k = torch.multinomial(_RING_WEIGHTS, n, replacement=True, generator=g)
    r = _RING_RADII[k] + _RING_STD * torch.randn(n, generator=g)
    theta = 2 * math.pi * torch.rand(n, generator=g)
    return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1)


def _log_prob_rings(x):
    """Radius r ~ sum_k w_k N(r_k, 0.1^2), angle uniform. A point at distance rho comes from
    r = rho or r = -rho (the opposite angle), so p(x) = [p_r(rho) + p_r(-rho)] / (2 pi rho)."""
    rho = x.norm(dim=1).clamp_min(1e-30)[:, None]
    radii, w = _RING_RADII.to(x), _RING_WEIGHTS.to(x)
    log_n = lambda r: -((r - radii) ** 2) / (2 * _RING_STD**2) - 0.5 * math.log(2 * math.pi * _RING_STD**2)
    log_pr = torch.logsumexp(torch.cat([log_n(rho), log_n(-rho)], 1) + w.log().repeat(2), 1)
    return log_pr - torch.log(2 * math.pi * rho[:, 0])


def _sample_moons(n, g):
    upper = torch.rand(n, generator=g) < 0.5
    t = math.pi * torch.rand(n, generator=g)
    x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
    y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
    return 2 * (torch.stack([x, y], 1) - torch.tensor([0.5, 0.25])) + 0.1 * torch.randn(n, 2, generator=g)


def _sample_2spirals(n, g):
    theta = 3 * math.pi * torch.sqrt(torch.rand(n, generator=g))  # sqrt: uniform density along the arm
    r = theta / (3 * math.pi) * 3.2
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)[:, None]
    return sign * torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1) + 0.1 * torch.randn(n, 2, generator=g)


def _sample_pinwheel(n, g):
    arm = torch.randint(5, (n,), generator=g)
    radial, tangential = 1.6 + 0.45 * torch.randn(n, generator=g), 0.1 * torch.randn(n, generator=g)
    angle = 2 * math.pi * arm / 5 + 0.25 * radial**2  # the twist grows with the radius
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([c * radial - s * tangential, s * radial + c * tangential], 1)


def _sample_swissroll(n, g):
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    roll = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1)
    return roll * (3.5 / (4.5 * math.pi)) + 0.1 * torch.randn(n, 2, generator=g)


_POINT_SETS = {  # name: (sampler, exact log-density or None)
    "8gaussians": (_sample_8gaussians, _log_prob_8gaussians),
    "checkerboard": (_sample_checkerboard, _log_prob_checkerboard),
    "rings": (_sample_rings, _log_prob_rings),
    "moons": (_sample_moons, None),
    "2spirals": (_sample_2spirals, None),
    "pinwheel": (_sample_pinwheel, None),
    "swissroll": (_sample_swissroll, None),
}
POINT_SETS = tuple(_POINT_SETS)
_POINTS_N, _POINTS_SEED = 10_000, {"train": 1, "test": 2}


_IMAGE_SETS = ("digits", "digits-binary", "mnist", "fashion-mnist", "cifar10")
_SPLITS = ("train", "test")


def _dataset_kind(name):
    """'image', 'points' or 'text' for a dataset name, without loading anything."""
    if name in _IMAGE_SETS:
        return "image"
    if name in _POINT_SETS:
        return "points"
    if name == "shakespeare" or name.endswith(".txt"):
        return "text"
    raise UserError(f"unknown dataset '{name}'; accepted: {', '.join(_IMAGE_SETS + POINT_SETS)}, "
                    "shakespeare, or a path to a .txt file")


# --- downloaded sets: official sources, the md5 checksums their publishers list

_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
_SOURCES = {
    "mnist": {"urls": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
              "files": dict(zip(_MNIST_FILES, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                               "9fb629c4189551a2d022fa330f9573f3",
                                               "ec29112dd5afa0611ce80d1b7f02629c")))},
    "fashion-mnist": {"urls": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
                      "files": dict(zip(_MNIST_FILES, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                                       "25c81989df183df01b3e8a0aad5dffbe",
                                                       "bef4ecab320f06d8554ea6380940ec79",
                                                       "bb300cfdad3c16e7a12a480ee83cd310")))},
    "cifar10": {"urls": ["https://www.cs.toronto.edu/~kriz/"],
                "files": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}},
    "shakespeare": {"urls": ["https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"],
                    "files": {"input.txt": "6fb458f1232090904fb40fe944165e91"}},
}


def _data_root(root=None):
    """The download cache: `root`, else $GENMODELS_DATA, else <user cache>/genmodels."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genmodels"
    return Path(root or os.environ.get("GENMODELS_DATA") or cache)


class _BadTransfer(Exception):
    """A download that arrived cut short or with the wrong md5."""


def _download(name, filename, folder):
    """<folder>/<filename> of `name`, fetched unless there, md5 verified and written atomically,
    so a cut or corrupt transfer never leaves a file later taken as good."""
    dest = folder / filename
    if dest.exists():
        return dest
    md5, failures = _SOURCES[name]["files"][filename], []
    for url in [base + filename for base in _SOURCES[name]["urls"]]:
        try:
            _atomic_write(dest, lambda f: _fetch(url, f, md5))
            return dest
        except (urllib.error.URLError, OSError, http.client.HTTPException, _BadTransfer) as e:
            failures.append(f"{url}: {getattr(e, 'reason', None) or e}")
    raise UserError(f"could not download {name} ({'; '.join(failures)}); "
                    f"without network, fetch {_SOURCES[name]['urls'][0]}{filename} by hand and put it at {dest}")


def _fetch(url, f, md5):
    with urllib.request.urlopen(url, timeout=60) as response:
        expected, digest, size = response.headers.get("Content-Length"), hashlib.md5(), 0
        print(f"downloading {url}", file=sys.stderr)
        while chunk := response.read(1 << 20):
            f.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    if expected is not None and size != int(expected):
        raise _BadTransfer(f"transfer cut short ({size} of {expected} bytes)")
    if digest.hexdigest() != md5:
        raise _BadTransfer(f"md5 {digest.hexdigest()} != expected {md5}, file deleted")


def _safe_extract(archive, folder):
    """Extract a tarball into `folder` through a temporary folder, refusing any member that would
    land outside it or is not a plain file or folder."""
    folder.mkdir(parents=True, exist_ok=True)
    root = folder.resolve()
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=folder))
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                target = (root / m.name).resolve()
                if not (m.isfile() or m.isdir()) or not target.is_relative_to(root) or target == root:
                    raise UserError(f"refusing to extract {archive.name}: member '{m.name}' would land outside "
                                    f"{folder} or is not a plain file; delete the archive and download it again")
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # checks again (Python >= 3.11.4)
            tar.extractall(tmp, members=members, **extra)
        for top in tmp.iterdir():
            if not (folder / top.name).exists():
                os.replace(top, folder / top.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_idx(path):
    """A gzipped IDX file (LeCun's MNIST format): zero, type 0x08, ndim, big-endian int32 sizes, bytes."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes; delete it and download it again")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise UserError(f"{path} holds {data.size} bytes for shape {dims}; delete it and download it again")
    return torch.from_numpy(data.reshape(dims).copy())


def _load_images(name, split, root):
    """(images uint8 (N, C, H, W), labels int64 (N,), levels) of an image set."""
    if name in ("digits", "digits-binary"):
        images, labels = _load_digits(split)
        return ((images >= 8).to(torch.uint8), labels, 2) if name == "digits-binary" else (images, labels, 17)
    if name == "cifar10":
        return (*_load_cifar10(split, root), 256)
    folder = _data_root(root) / name
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_download(name, f"{prefix}-images-idx3-ubyte.gz", folder))
    labels = _read_idx(_download(name, f"{prefix}-labels-idx1-ubyte.gz", folder))
    return images[:, None], labels.long(), 256


def _load_cifar10(split, root):
    folder = _data_root(root) / "cifar10"
    batches = folder / "cifar-10-batches-py"
    if not batches.is_dir():
        _safe_extract(_download("cifar10", "cifar-10-python.tar.gz", folder), folder)
    images, labels = [], []
    for n in [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]:
        with open(batches / n, "rb") as f:
            d = pickle.load(f, encoding="bytes")  # the official format; the archive's md5 was verified
        images.append(torch.from_numpy(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)))
        labels.append(torch.tensor(d[b"labels"], dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def _load_digits(split):
    path = Path(__file__).resolve().parent / "data" / "digits.npz"
    if not path.exists():
        raise UserError(f"{path} is missing: copy the data/ folder next to common.py")
    with np.load(path) as f:
        images, labels, test = f["images"], f["labels"], f["test_index"]
    keep = np.zeros(len(images), dtype=bool)
    keep[test] = True
    keep = keep if split == "test" else ~keep
    return torch.from_numpy(images[keep][:, None].copy()), torch.from_numpy(labels[keep].astype(np.int64))


def _load_text(name, split, root):
    if name == "shakespeare":
        path = _download("shakespeare", "input.txt", _data_root(root) / "shakespeare")
    else:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"text file {name} not found; give the path of an existing UTF-8 .txt file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; accepted: a UTF-8 .txt file") from None
    if len(text) < 100:
        raise UserError(f"{path} holds {len(text)} characters; a text dataset needs at least 100")
    vocab = sorted(set(text))  # both splits share the vocabulary of the whole file
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))  # fixed split: the first 90% trains, the last 10% tests
    return ids[:cut] if split == "train" else ids[cut:], vocab


# --- drawing

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_figure(plt, fig, path, tight=True):
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_metrics(jsonl_path, png_path, key="loss"):
    """`key` against the step from metrics.jsonl (after a resume, the latest line of a step wins)."""
    by_step = {r["step"]: r[key] for r in _read_metrics(jsonl_path) if "step" in r and key in r}
    if not by_step:
        return
    plt = _pyplot()
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [by_step[s] for s in steps])
    ax.set(xlabel="step", ylabel=key)
    ax.grid(alpha=0.3)
    _save_figure(plt, fig, png_path)


def _image_grid(x, levels=None, nrow=None, pad=1):
    """A batch (N, C, H, W) tiled into one float array (rows, cols[, 3]) in [0, 1]: integer levels
    in [0, levels) when given, else floats clipped to [0, 1]; a C other than 1 or 3 is grey tiles."""
    x = x.detach().float().cpu()
    if levels is not None:
        x = x / (levels - 1)
    x = x.clamp(0, 1)
    n, c, h, w = x.shape
    if c not in (1, 3):
        x, n, c = x.reshape(n * c, 1, h, w), n * c, 1
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 0.5)
    for i in range(n):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()


def _draw_grid(grid, path, title=None):
    scale = max(1, math.ceil(256 / max(grid.shape[:2])))
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    plt = _pyplot()
    if title is None:
        plt.imsave(path, grid, cmap="gray", vmin=0.0, vmax=1.0)
        return
    dpi, (h, w) = 100, grid.shape[:2]
    # wrapped at about 7 pixels a character of a 9-point font, so the band fits the lines
    lines = [line for part in title.split("\n") for line in textwrap.wrap(part, max(10, w // 7)) or [""]]
    band = 18 * len(lines) + 8
    fig = plt.figure(figsize=(w / dpi, (h + band) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, h / (h + band)))
    ax.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.axis("off")
    fig.text(0.5, 1 - 4 / (h + band), "\n".join(lines), ha="center", va="top", fontsize=9)
    _save_figure(plt, fig, path, tight=False)


def _draw_scatter(p, path, lim, title):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(p[:, 0], p[:, 1], s=1, alpha=0.5)
    if lim:
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim))
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    _save_figure(plt, fig, path)


def _draw_density(panels, path, lim):
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, value) in zip(axes[0], panels.items()):
        v = np.asarray(torch.as_tensor(value).detach().cpu().double())
        if v.ndim == 2 and v.shape[1] == 2 and v.shape[0] != 2:
            img, _, _ = np.histogram2d(v[:, 1], v[:, 0], bins=128, range=[[-lim, lim], [-lim, lim]], density=True)
        else:
            img = np.exp(v)
        ax.imshow(img, origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma")
        ax.set(title=title, xticks=[], yticks=[])
    _save_figure(plt, fig, path)


# --- FID and Inception Score of generated images (--eval CKPT --fid N), by torch-fidelity's Inception

_FID_INSTALL = "pip install torch-fidelity==0.4.0 (it is in requirements.txt)"
FID_WEIGHTS_ENV = "GENMODELS_INCEPTION_WEIGHTS"  # a local weights file in torch-fidelity's format
_FID_MAX_N = 50_000  # samples by default; a smaller training split (digits: 1497) gives its size


def _frechet_distance(mu1, sigma1, mu2, sigma2):
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between N(mu1, S1) and N(mu2, S2)
    (Heusel et al. 2017, arXiv 1706.08500, Eq. 6), in float64; Tr (S1 S2)^(1/2) is taken as
    Tr (S1^(1/2) S2 S1^(1/2))^(1/2), the square root of a symmetric PSD matrix (by eigh)."""
    mu1, mu2, s1, s2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


class _Moments:
    """Running sums of features and of their outer products (float64): the Gaussian's statistics
    of any number of batches without holding the features."""

    def __init__(self):
        self.n, self.sum, self.outer = 0, 0.0, 0.0

    def add(self, f):
        f = f.detach().double().cpu()
        self.n, self.sum, self.outer = self.n + len(f), self.sum + f.sum(0), self.outer + f.T @ f

    def stats(self):
        """(mean, covariance) in float64; the covariance unbiased, as np.cov."""
        mu = self.sum / self.n
        return mu.numpy(), ((self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)).numpy()


def _fidelity_images(x, levels):
    """Images as torch-fidelity's Inception takes them: uint8 (N, 3, H, W), RGB, 0..255. `x` is
    (N, C, H, W) integer levels 0..levels-1 or floats in [0, 1]; level k is round(255 k / (levels - 1));
    a grey image is repeated in the three channels."""
    v = x.float().clamp(0, 1) * 255 if x.is_floating_point() else x.double() * (255 / (levels - 1))
    u = v.round().clamp(0, 255).to(torch.uint8)
    return (u.expand(-1, 3, -1, -1) if u.shape[1] == 1 else u).contiguous()


def _inception(device):
    """(torch-fidelity's Inception-v3 returning pool features (2048) and logits_unbiased, its id):
    the id names the weights, those at $GENMODELS_INCEPTION_WEIGHTS by their sha256."""
    try:
        from torch_fidelity import feature_extractor_inceptionv3 as inception
    except ImportError:
        raise UserError(f"--fid needs torch-fidelity, which is not installed: {_FID_INSTALL}") from None
    path = os.environ.get(FID_WEIGHTS_ENV)
    if path and not Path(path).is_file():
        raise UserError(f"${FID_WEIGHTS_ENV} is {path}, which is not a file; give a weights file of torch-fidelity's "
                        "Inception, or unset it to download the standard one")
    tag = "weights-" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12] if path else \
        Path(inception.URL_INCEPTION_V3).stem
    try:
        net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                    feature_extractor_weights_path=path)
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"the Inception weights could not be downloaded ({e}); without network, fetch "
                        f"{inception.URL_INCEPTION_V3} by hand and set ${FID_WEIGHTS_ENV} to its path") from None
    return net.to(device), f"inception-v3-compat-{tag}"


def _inception_features(net, images, levels, device):
    """(pool features, logits_unbiased) of a batch of images, both float32 on the CPU."""
    with torch.inference_mode():
        pool, logits = net(_fidelity_images(images, levels).to(device))
    return pool.cpu(), logits.cpu()


def _reference_stats(net, extractor, ds, data_dir, batch_size, device):
    """(mu, S) of the Inception pool features of the whole training split, cached in
    <data root>/fid/<dataset>-train-<extractor>.npz with a fingerprint of the images: reused while
    both match, computed afresh (and the file replaced atomically) when either changed."""
    path = _data_root(data_dir) / "fid" / f"{ds.info.name}-train-{extractor}.npz"
    data = ds.data.contiguous()
    fingerprint = f"{tuple(data.shape)}:{hashlib.sha256(data.numpy().tobytes()).hexdigest()}:{extractor}"
    if path.is_file():
        with np.load(path) as f:
            if str(f["fingerprint"]) == fingerprint:
                return f["mu"], f["sigma"]
    moments, start = _Moments(), time.perf_counter()
    for i in range(0, len(data), batch_size):
        moments.add(_inception_features(net, data[i:i + batch_size], ds.info.levels, device)[0])
        _fid_progress("training images' statistics", min(i + batch_size, len(data)), len(data), start)
    mu, sigma = moments.stats()
    _atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, fingerprint=np.array(fingerprint)))
    return mu, sigma


def _fid_progress(what, done, total, start, every=10.0):
    now = time.perf_counter()
    if done == total or now - getattr(_fid_progress, "printed", 0.0) >= every:
        rate = done / max(now - start, 1e-9)
        print(f"fid: {what} {done}/{total} ({rate:.1f}/s, ETA {(total - done) / rate:.0f}s)", flush=True)
        _fid_progress.printed = now


def fid_evaluate(cfg, info, sample, levels=None):
    """--eval CKPT --fid N: N samples, drawn cfg.batch_size at a time by `sample(n, generator)` (images
    (n, C, H, W) of integer levels 0..levels-1, default info.levels, or floats in [0, 1]) on the
    model's device, their FID against the training split's Inception statistics (cached) and, on
    CIFAR-10, the Inception Score; an "eval" event with both."""
    if info.kind != "image":
        raise UserError(f"--fid scores images; {cfg.eval} was trained on {info.name}, {info.kind} data")
    device = get_device(cfg.device)
    net, extractor = _inception(device)
    train_set = load_dataset(info.name, "train", cfg.data_dir)
    n = cfg.fid or min(_FID_MAX_N, len(train_set.data))
    if n < 2:
        raise UserError(f"--fid {n}: the samples' covariance needs at least 2; accepted: --fid N with N >= 2")
    start = time.perf_counter()
    mu_ref, sigma_ref = _reference_stats(net, extractor, train_set, cfg.data_dir, cfg.batch_size, device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    moments, logits, t0 = _Moments(), [], time.perf_counter()
    for done in range(0, n, cfg.batch_size):
        m = min(cfg.batch_size, n - done)
        pool, logit = _inception_features(net, sample(m, g), levels or info.levels, device)
        moments.add(pool)
        if info.name == "cifar10":  # the Inception Score's classes are ImageNet's: natural images only
            logits.append(logit)
        _fid_progress("samples", done + m, n, t0)
    fields = dict(split="train", fid=_frechet_distance(*moments.stats(), mu_ref, sigma_ref), n=n,
                  reference_n=len(train_set.data), extractor=extractor)
    if logits:  # exp E_x KL(p(y|x) || p(y)) over 10 parts (Salimans et al. 2016, arXiv 1606.03498): the library's
        from torch_fidelity.metric_isc import isc_features_to_metric
        score = isc_features_to_metric(torch.cat(logits), splits=max(1, min(10, n // 2)))  # parts of 2 or more
        fields.update(inception_score=score["inception_score_mean"], inception_score_std=score["inception_score_std"])
    fields["seconds"] = round(time.perf_counter() - start, 1)
    out = output_dir(cfg, cfg.eval)
    Logger(out, 0).event("eval", **fields)
    report_files(out, ["metrics.jsonl"])
    return fields
