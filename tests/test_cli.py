"""The behaviour every model file shares through common.py, checked on each of them end to end:
Ctrl-C/SIGTERM saves a checkpoint
and exits cleanly, a second signal stops at once, a non-finite loss stops training naming the
step and keeps the last good checkpoint, user mistakes are one-line errors, a run folder is
never silently overwritten, and every file a command names exists."""
import dataclasses
import importlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
from conftest import MODEL_FILES, ROOT, events, run_main, subprocess_env, torchrun

TINY = ["--dataset", "8gaussians", "--batch-size", "32", "--n-samples", "4"]


def _main(model, args, capsys):
    """Run `model.main(args)` in this process: (exit status, stdout, stderr)."""
    module = importlib.import_module(model)
    capsys.readouterr()
    try:
        module.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *words):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), (code, err)


@pytest.mark.parametrize("model", MODEL_FILES)
def test_signal_saves_a_checkpoint_and_resume_continues(model, tmp_path):
    """Ctrl-C (SIGINT) here; the second-signal test below sends SIGTERM, to the same handler."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / f"{model}.py"), *TINY, "--out", str(out), "--log-every", "3",
           "--save-every", "100000"]
    proc = subprocess.Popen([*cmd, "--steps", "100000"], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"step"') >= 2):
        time.sleep(0.2)  # two windows of 3 steps logged (event lines have no "step")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    step = common.load_checkpoint(out / "ckpt.pt")["step"]
    assert 6 <= step < 100000
    assert "resume" in (stdout + stderr).lower()
    # the steps since the last metrics line are logged at the stop, not lost (a window of 3)
    assert [r["step"] for r in common._read_metrics(metrics) if "step" in r][-1] == step
    run_main(model, [*cmd[2:], "--steps", step + 2, "--resume"])  # the rest in this process: no start-up
    assert common.load_checkpoint(out / "ckpt.pt")["step"] == step + 2
    # --sample writes the raw samples beside the picture (benchmarks/quality.py reads them)
    run_main(model, ["--sample", out / "ckpt.pt", "--n-samples", 5, "--out", tmp_path / "s"])
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
def test_user_mistakes_are_one_line_errors(model, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    for args, words in [(["--dataset", "imagenet"], "accepted"),
                        (["--eval", str(tmp_path / "missing.pt")], "does not exist"),
                        (["--sample", str(bad)], "cannot be read"),
                        (["--steps", "-3"], "out of range")]:
        code, _, err = _main(model, [*args, "--out", tmp_path], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and words in lines[0], (args, err)


@pytest.mark.parametrize("model", MODEL_FILES)
def test_torchrun_two_gloo_processes(model, tmp_path):
    """The model file trains under torchrun with DistributedDataParallel on two CPU processes;
    only rank 0 writes the run folder."""
    r = torchrun(model, [*TINY, "--steps", "3", "--log-every", "1", "--out", tmp_path])
    assert r.returncode == 0, r.stderr[-2000:]
    assert common.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 3
    steps = [m["step"] for m in common._read_metrics(tmp_path / "metrics.jsonl") if "step" in m]
    assert steps == [1, 2, 3]  # one line a step: rank 1 wrote nothing


def _same(a, b, where="ckpt"):
    """Every tensor and number in two checkpoints' contents equal (recursively), bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


RESUME_FLAGS = {"vqvae": ["--stage", "ae"]}  # --stage both splits --steps, so 2 + 2 would not be 4


@pytest.mark.parametrize("model", MODEL_FILES)
def test_resume_is_bit_exact(model, tmp_path):
    """4 steps in one run, or 2 and then 2 more with --resume: the same weights, optimiser and
    EMA states, random states and data stream, and the same losses logged for steps 3 and 4."""
    a, b = tmp_path / "a", tmp_path / "b"
    flags = [*TINY, "--save-every", "2", "--log-every", "1", *RESUME_FLAGS.get(model, [])]
    run_main(model, [*flags, "--out", a, "--steps", "4"])
    run_main(model, [*flags, "--out", b, "--steps", "2"])
    run_main(model, [*flags, "--out", b, "--steps", "4", "--resume"])
    ca, cb = common.load_checkpoint(a / "ckpt.pt"), common.load_checkpoint(b / "ckpt.pt")
    assert ca["step"] == cb["step"] == 4
    _same({k: v for k, v in ca.items() if k != "config"}, {k: v for k, v in cb.items() if k != "config"})
    loss = {d: {r["step"]: r["loss"] for r in common._read_metrics(d / "metrics.jsonl") if "loss" in r}
            for d in (a, b)}
    assert [loss[a][s] for s in (3, 4)] == [loss[b][s] for s in (3, 4)]


# ----------------------------------------------------------------------------------------
# What a user can get wrong or interrupt, checked on every model file (issue 16, 3 and 4)
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`tiny_run(model)`: the checkpoint of a 2-step run of `model` on 8gaussians (made once)."""
    runs = {}

    def get(model):
        if model not in runs:
            out = tmp_path_factory.mktemp(f"{model}-tiny")
            run_main(model, [*TINY, "--steps", 2, "--out", out])
            runs[model] = out / "ckpt.pt"
        return runs[model]
    return get


@pytest.mark.parametrize("model", MODEL_FILES)
def test_load_gives_the_model_its_config_and_its_data(model, tiny_run):
    module = importlib.import_module(model)
    model_objects, cfg, info = module.load(tiny_run(model), "cpu")
    assert isinstance(cfg, module.Config) and cfg.steps == 2 and cfg.dataset == "8gaussians"
    assert info == common.load_dataset("8gaussians").info
    nets = [model_objects] if isinstance(model_objects, torch.nn.Module) else \
        [m for m in model_objects if isinstance(m, torch.nn.Module)]
    assert nets and not any(n.training for n in nets)


@pytest.mark.parametrize("model", MODEL_FILES)
def test_a_checkpoint_of_another_model_file_is_a_one_line_error(model, tiny_run, tmp_path, capsys):
    readable = {"ddim": ("ddpm",)}.get(model, ())  # ddim.py samples ddpm.py's checkpoints
    others = [m for m in MODEL_FILES if m != model and m not in readable]
    if others:
        ckpt = tiny_run(others[0])
        writer = f"{others[0]}.py"
    else:  # one model file alone: a checkpoint that names another writer
        ckpt, writer = tmp_path / "other.pt", "other.py"
        common._save_checkpoint(ckpt, {**common.load_checkpoint(tiny_run(model)), "model_name": "other"})
    for args in (["--sample", ckpt], ["--eval", ckpt], [*TINY, "--resume", ckpt]):
        code, _, err = _main(model, [*args, "--out", tmp_path / "o"], capsys)
        _one_line_error(code, err, f"written by {writer}")


def _network_flag(module, cfg, info, change=lambda v: v + 1):
    """A flag of the model's own (an int) whose change changes the network's weights' shapes."""
    def shapes(c):
        built = module.build(c, info)
        nets = [built] if isinstance(built, torch.nn.Module) else [b for b in built if isinstance(b, torch.nn.Module)]
        return [tuple(v.shape) for n in nets for v in n.state_dict().values()]
    base, shared = shapes(cfg), {f.name for f in dataclasses.fields(common.RunConfig)}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in shared or type(value) is not int or value < 1:
            continue
        try:
            if shapes(dataclasses.replace(cfg, **{f.name: change(value)})) != base:
                return f.name, change(value)
        except Exception:
            continue
    raise AssertionError(f"{module.__name__}: no integer flag changes the network")


@pytest.mark.parametrize("model", MODEL_FILES)
def test_resuming_with_a_flag_that_changes_the_network_names_the_flag(model, tiny_run, tmp_path, capsys):
    module = importlib.import_module(model)
    ckpt = common.load_checkpoint(tiny_run(model))
    name, value = _network_flag(module, *common.saved_config(module.Config, ckpt))
    shutil.copy(tiny_run(model), tmp_path / "ckpt.pt")
    flag = "--" + name.replace("_", "-")
    code, _, err = _main(model, [*TINY, "--out", tmp_path, "--resume", "--steps", 4, flag, value], capsys)
    _one_line_error(code, err, f"{flag} {value - 1} (now {value})", "--overwrite")
    assert common.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2


@pytest.mark.parametrize("model", MODEL_FILES)
def test_resume_keeps_the_flags_of_its_checkpoint(model, tiny_run, tmp_path):
    """A run trained with a network flag changed resumes with no flag repeated (bare --resume in
    its folder, the dataset too): the checkpoint's configuration is the run's."""
    module = importlib.import_module(model)
    cfg, info = common.saved_config(module.Config, common.load_checkpoint(tiny_run(model)))
    name, value = _network_flag(module, cfg, info, change=lambda v: 2 * v)  # widths stay even
    flag = "--" + name.replace("_", "-")
    run_main(model, [*TINY, "--out", tmp_path, "--steps", 1, flag, value])
    run_main(model, ["--out", tmp_path, "--resume", "--steps", 2])
    ckpt = common.load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 2 and ckpt["config"][name] == value and ckpt["config"]["dataset"] == "8gaussians"
    assert ckpt["config"]["batch_size"] == 32 and ckpt["config"]["resume"] == "auto"


@pytest.mark.parametrize("model", MODEL_FILES)
def test_training_into_a_folder_that_holds_a_run_is_refused(model, tiny_run, tmp_path, capsys):
    shutil.copy(tiny_run(model), tmp_path / "ckpt.pt")
    code, _, err = _main(model, [*TINY, "--out", tmp_path, "--steps", 3], capsys)
    _one_line_error(code, err, "holds a run", "--resume", "--overwrite")
    assert common.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2  # untouched
    code, out, err = _main(model, [*TINY, "--out", tmp_path, "--steps", 3, "--overwrite"], capsys)
    assert code == 0, err
    assert common.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 3


@pytest.mark.parametrize("model", MODEL_FILES)
def test_out_must_be_a_folder(model, tiny_run, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out, words in [(tmp_path / "file", "is a file"), (tmp_path / "file" / "below", "lies below a file")]:
        for args in ([*TINY, "--steps", 1], ["--sample", tiny_run(model)], ["--eval", tiny_run(model)]):
            code, _, err = _main(model, [*args, "--out", out], capsys)
            _one_line_error(code, err, words)


@pytest.mark.parametrize("model", MODEL_FILES)
def test_steps_zero_names_only_files_it_wrote(model, tmp_path, capsys):
    code, out, err = _main(model, [*TINY, "--out", tmp_path, "--steps", 0], capsys)
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"written to {tmp_path}: ")
    names = last.split(": ", 1)[1].split(", ")
    assert "ckpt.pt" in names and all((tmp_path / n).exists() for n in names), last
    assert common.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 0


@pytest.fixture
def little_memory():
    """This process may take at most 2 GB more address space while the test runs."""
    import re
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    size = int(re.search(r"VmSize:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + 2 * 2**30, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize("model", MODEL_FILES)
def test_running_out_of_memory_names_the_flag(model, tiny_run, tmp_path, capsys, little_memory):
    huge = 10**9  # a billion 2D points: 8 GB
    code, _, err = _main(model, [*TINY, "--out", tmp_path / "t", "--batch-size", huge], capsys)
    _one_line_error(code, err, f"--batch-size {huge}", "GB")
    code, _, err = _main(model, ["--sample", tiny_run(model), "--out", tmp_path / "s", "--n-samples", huge], capsys)
    _one_line_error(code, err, f"--n-samples {huge}", "GB")


@pytest.mark.parametrize("model", MODEL_FILES)
def test_a_second_signal_stops_at_once_and_leaves_the_checkpoint_whole(model, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / f"{model}.py"), *TINY, "--out", str(out), "--log-every", "1",
                             "--save-every", "2", "--steps", "100000"], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 4):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (0, 128 + signal.SIGTERM) and "Traceback" not in stderr, stderr
    assert common.load_checkpoint(out / "ckpt.pt")["step"] >= 2
