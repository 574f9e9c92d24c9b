"""Test configuration and the helpers every test file shares: hypothesis profiles, the project's
root and its model files, `events` (a run's event lines), `run_main` (a model file's command line
in this process), `torchrun` (a model file under torchrun), and `without_common`, which runs a
model file's mathematics with common.py replaced.

The `ci` profile (chosen when the CI environment variable is set) is derandomised, so every
run draws the same examples, with few examples and no deadline: the whole suite stays within
10 minutes on two cores. `dev` draws new examples each run, a few more of them.
"""
import importlib
import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

settings.register_profile("ci", derandomize=True, max_examples=10, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")
# One torch thread per test process: the README's command runs one worker process per core, and
# a second thread only spins at OpenMP barriers when its core is taken (issue 22's measurements).
torch.set_num_threads(1)

MODEL_FILES = sorted(p.stem for p in ROOT.glob("*.py") if p.stem in
                     ("pixelcnn", "gpt", "vae", "vqvae", "ddpm", "ddim", "ebm", "score_sde", "realnvp", "ffjord"))


def subprocess_env():
    """The environment of a model file run as a program: one thread, the project importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def events(out, name=None):
    """The event lines of <out>/metrics.jsonl (or of that file itself), those named `name` if given."""
    path = out if str(out).endswith(".jsonl") else os.path.join(out, "metrics.jsonl")
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [r for r in lines if "event" in r and (name is None or r["event"] == name)]


def run_main(model, argv):
    """`<model>.main(argv)` in this process (no interpreter start-up); returns what it returns."""
    return importlib.import_module(model).main([str(a) for a in argv])


def torchrun(model, argv, nproc=2, timeout=300):
    """`torchrun --nproc_per_node=nproc <model>.py argv` on gloo CPU processes; the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(ROOT / f"{model}.py"),
                           *map(str, argv), "--device", "cpu"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _isolated_default_dtype():
    """A test that changes torch's default dtype must not change it for the tests after it."""
    previous = torch.get_default_dtype()
    yield
    torch.set_default_dtype(previous)


class _Poisoned:
    """Stands for a name imported from common.py; any use of it fails the test."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        raise AssertionError(f"the mathematics used common.{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"the mathematics called common.{self._name}")

    def __mro_entries__(self, bases):
        raise AssertionError(f"the mathematics subclasses common.{self._name}")


class _PoisonedCommon(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):  # what tools ask of any module (inspect reads __file__, say)
            raise AttributeError(name)
        return _Poisoned(name)


MATHEMATICS_END = "# Configuration"  # the banner after the mathematics and the networks


@pytest.fixture
def without_common(monkeypatch):
    """`without_common("ddpm")` executes ddpm.py up to its Configuration section (the docstring,
    the imports, the mathematics and the networks) with common.py replaced by a module whose
    every name fails when used, and returns it as a module: the mathematics must run on it."""
    def load(model):
        lines = (ROOT / f"{model}.py").read_text().splitlines(keepends=True)
        end = next(i for i, line in enumerate(lines) if line.rstrip() == MATHEMATICS_END)
        source = "".join(lines[:end - 1])  # stop before the banner's opening rule
        module = types.ModuleType(f"{model}_without_common")
        module.__file__ = str(ROOT / f"{model}.py")
        monkeypatch.setitem(sys.modules, "common", _PoisonedCommon("common"))
        monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
        exec(compile(source, module.__file__, "exec"), module.__dict__)
        return module
    return load
