"""The behaviour every model file shares through common.py, checked on each of them end to end:
Ctrl-C/SIGTERM saves a checkpoint and exits cleanly, a non-finite loss stops training naming the
step and keeps the last good checkpoint, and user mistakes are one-line errors."""
import importlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
from conftest import ROOT
from test_common import MODEL_FILES, _env

TINY = ["--dataset", "8gaussians", "--batch-size", "32", "--n-samples", "4"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("model", MODEL_FILES)
def test_signal_saves_a_checkpoint_and_resume_continues(model, sig, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / f"{model}.py"), *TINY, "--out", str(out), "--log-every", "1",
           "--save-every", "100000"]
    proc = subprocess.Popen([*cmd, "--steps", "100000"], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    step = common.load_checkpoint(out / "ckpt.pt")["step"]
    assert 2 <= step < 100000
    assert "resume" in (stdout + stderr).lower()
    subprocess.run([*cmd, "--steps", str(step + 2), "--resume"], env=_env(), check=True, capture_output=True,
                   timeout=120)
    assert common.load_checkpoint(out / "ckpt.pt")["step"] == step + 2
    # --sample writes the raw samples beside the picture (benchmarks/quality.py reads them)
    subprocess.run([sys.executable, str(ROOT / f"{model}.py"), "--sample", str(out / "ckpt.pt"), "--n-samples", "5",
                    "--out", str(tmp_path / "s")], env=_env(), check=True, capture_output=True, timeout=120)
    assert torch.load(tmp_path / "s" / "samples.pt", weights_only=True).shape == (5, 2)


@pytest.mark.parametrize("model", MODEL_FILES)
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(model, tmp_path, monkeypatch, capsys):
    """After the 5th optimiser step every parameter becomes NaN, so the 6th loss is NaN."""
    module = importlib.import_module(model)
    calls = {"n": 0}
    for cls in [c for c in (torch.optim.Adam, torch.optim.AdamW) if "step" in c.__dict__]:  # AdamW may inherit
        original = cls.step

        def poisoned(self, *args, _original=original, **kwargs):
            result = _original(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 5:
                with torch.no_grad():
                    for group in self.param_groups:
                        for p in group["params"]:
                            p.fill_(float("nan"))
            return result
        monkeypatch.setattr(cls, "step", poisoned)
    with pytest.raises(SystemExit) as e:
        module.main([*TINY, "--out", str(tmp_path), "--steps", "50", "--save-every", "2", "--log-every", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "at step 6" in err and "nan" in err
    ckpt = common.load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("model", MODEL_FILES)
def test_user_mistakes_are_one_line_errors(model, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    for args, words in [(["--dataset", "imagenet"], "accepted"),
                        (["--eval", str(tmp_path / "missing.pt")], "does not exist"),
                        (["--sample", str(bad)], "cannot be read"),
                        (["--steps", "-3"], "out of range")]:
        r = subprocess.run([sys.executable, str(ROOT / f"{model}.py"), *args, "--out", str(tmp_path)],
                           env=_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, r.stderr)


@pytest.mark.parametrize("model", MODEL_FILES)
def test_torchrun_two_gloo_processes(model, tmp_path):
    """The model file trains under torchrun with DistributedDataParallel on two CPU processes;
    only rank 0 writes the run folder."""
    from test_common import _free_port
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(ROOT / f"{model}.py"), *TINY,
                        "--steps", "3", "--log-every", "1", "--out", str(tmp_path), "--device", "cpu"],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert common.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 3
    steps = [m["step"] for m in common._read_metrics(tmp_path / "metrics.jsonl") if "step" in m]
    assert steps == [1, 2, 3]  # one line a step: rank 1 wrote nothing
