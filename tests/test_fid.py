"""FID and Inception Score (`--eval CKPT --fid N`, common.py's last section): the Frechet distance
against scipy's matrix square root and closed forms, the training set's statistics cached and
invalidated, each model file's samples handed to the Inception network exactly as torch-fidelity
takes them, and the whole path end to end with torch-fidelity's Inception under random weights
saved in its format (the pretrained weights are a download)."""
import dataclasses
import io
import json
import pickle
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

import common
from conftest import MODEL_FILES, ROOT, events, run_main


# --- the Frechet distance (Heusel et al. 2017, Eq. 6)

def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


@pytest.mark.parametrize("seed", range(3))
def test_frechet_distance_equals_the_formula_with_scipys_sqrtm(seed):
    rng = np.random.default_rng(seed)
    d = 6
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), _spd(rng, d), _spd(rng, d)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert common._frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_closed_forms_and_zero_for_identical_statistics():
    rng = np.random.default_rng(0)
    d = 5
    mu1, mu2, s = rng.normal(size=d), rng.normal(size=d), _spd(rng, d)
    # commuting covariances S and c S: Tr(S + cS - 2 sqrt(c) S) = (1 - sqrt c)^2 Tr S
    c = 2.5
    assert common._frechet_distance(mu1, s, mu2, c * s) == pytest.approx(
        ((mu1 - mu2) ** 2).sum() + (1 - np.sqrt(c)) ** 2 * np.trace(s), rel=1e-10)
    # diagonal covariances: the 1D distances (mu1 - mu2)^2 + (sigma1 - sigma2)^2 summed
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    assert common._frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(
        ((mu1 - mu2) ** 2 + (np.sqrt(v1) - np.sqrt(v2)) ** 2).sum(), rel=1e-10)
    assert abs(common._frechet_distance(mu1, s, mu1, s)) < 1e-10 * np.trace(s)


def test_running_moments_over_batches_are_the_mean_and_unbiased_covariance():
    f = np.random.default_rng(1).normal(3.0, 2.0, size=(50, 4))
    moments = common._Moments()
    for part in np.array_split(f, [7, 8, 30]):  # batches of 7, 1, 22 and 20 rows
        moments.add(torch.as_tensor(part))
    mu, sigma = moments.stats()
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-10)


# --- images as torch-fidelity takes them: uint8 (N, 3, H, W), RGB, 0..255

def test_fidelity_images_levels_floats_and_grey():
    grey = torch.arange(17, dtype=torch.uint8).view(1, 1, 1, 17)  # digits' levels 0..16
    u = common._fidelity_images(grey, 17)
    assert u.dtype == torch.uint8 and u.shape == (1, 3, 1, 17)
    assert torch.equal(u[0, 0, 0], torch.tensor([round(255 * k / 16) for k in range(17)], dtype=torch.uint8))
    assert torch.equal(u[:, 0], u[:, 1]) and torch.equal(u[:, 0], u[:, 2])
    binary = common._fidelity_images(torch.tensor([[[[0, 1]]]]), 2)
    assert binary.reshape(3, 2).tolist() == [[0, 255]] * 3
    rgb = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)  # 8-bit RGB: unchanged, channels in order
    assert torch.equal(common._fidelity_images(rgb, 256), rgb)
    floats = torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1]).view(1, 1, 1, 5)  # [0, 1] images, clamped
    assert common._fidelity_images(floats, 17)[0, 2, 0].tolist() == [0, 128, 255, 255, 0]


# --- the path with a stand-in for the Inception network (cheap; records what it is given)

class FakeInception(torch.nn.Module):
    """Checks its input as torch-fidelity's Inception does and returns the channel means (as 3
    "pool features") and 10 logits; keeps every batch it was given."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, (x.dtype, x.shape)
        self.batches.append(x.clone().cpu())
        f = x.double().mean((2, 3)) / 255 + 1e-3 * torch.randn(len(x), 3, dtype=torch.double)
        return f.float(), f.float().repeat(1, 4)[:, :10]


@pytest.fixture
def fake_inception(monkeypatch):
    fake = FakeInception()
    monkeypatch.setattr(common, "_inception", lambda device: (fake.to(device), "fake"))
    return fake


_TRAIN_FAST = {"ddpm": ["--timesteps", 20], "ddim": ["--timesteps", 20, "--sample-steps", 5],
               "score_sde": ["--sample-steps", 5], "ebm": ["--sample-steps", 2]}


@pytest.fixture(scope="module")
def digits_checkpoints(tmp_path_factory):
    """A one-step digits checkpoint of every model file."""
    root = tmp_path_factory.mktemp("fid_ckpts")
    return {m: root / m for m in MODEL_FILES}


def _checkpoint(model, folder):
    if not (folder / "ckpt.pt").exists():
        run_main(model, ["--dataset", "digits", "--steps", 1, "--batch-size", 8, "--n-samples", 4, "--out", folder,
                         *_TRAIN_FAST.get(model, [])])
    return folder / "ckpt.pt"


@pytest.mark.parametrize("model", MODEL_FILES)
def test_each_files_samples_reach_the_network_as_torch_fidelity_takes_them(model, digits_checkpoints, tmp_path,
                                                                            fake_inception, capsys):
    """digits (17 grey levels): every batch the network sees, training images and samples alike, is
    uint8 (n, 3, 8, 8) with three equal channels, and the levels' images are exactly the values
    round(255 k / 16); the event carries the FID of the 5 samples (no Inception Score off CIFAR-10)."""
    ckpt = _checkpoint(model, digits_checkpoints[model])
    fields = run_main(model, ["--eval", ckpt, "--fid", 5, "--batch-size", 3, "--out", tmp_path,
                              "--data-dir", tmp_path / "data", *(["--sample-steps", 5] if model == "ddim" else [])])
    train = common.load_dataset("digits", "train").data
    seen = torch.cat(fake_inception.batches)
    assert seen.shape == (len(train) + 5, 3, 8, 8)
    assert torch.equal(seen[:len(train)], common._fidelity_images(train, 17))  # the reference, in order
    samples = seen[len(train):]
    assert torch.equal(samples[:, 0], samples[:, 1]) and torch.equal(samples[:, 0], samples[:, 2])
    allowed = torch.tensor([round(255 * k / 16) for k in range(17)], dtype=torch.uint8)
    if model not in ("vae", "gpt"):  # floats in [0, 1] (vae); gpt's quantised colours (--image-bits)
        assert torch.isin(samples, allowed).all()
    assert [len(b) for b in fake_inception.batches[-2:]] == [3, 2]  # drawn --batch-size at a time
    (event,) = events(tmp_path, "eval")
    assert event["n"] == 5 and event["fid"] == pytest.approx(fields["fid"]) and event["fid"] >= 0
    assert "inception_score" not in event and event["extractor"] == "fake"
    assert "fid " in capsys.readouterr().out  # the printed summary


def test_bare_fid_draws_the_training_splits_size_on_small_sets(digits_checkpoints, tmp_path, fake_inception):
    ckpt = _checkpoint("vae", digits_checkpoints["vae"])
    fields = run_main("vae", ["--eval", ckpt, "--fid", "--batch-size", 500, "--out", tmp_path,
                              "--data-dir", tmp_path / "data"])
    assert fields["n"] == fields["reference_n"] == len(common.load_dataset("digits", "train").data) == 1497


def test_reference_statistics_are_cached_reused_and_invalidated(tmp_path, fake_inception):
    """Computed once and written under a name with the dataset, split and extractor; read back
    while the images and the extractor are the same; computed afresh when the images change (the
    file replaced) or the extractor does (another file)."""
    ds = common.load_dataset("digits", "train")
    first = common._reference_stats(fake_inception, "fake", ds, tmp_path, 500, "cpu")
    path = tmp_path / "fid" / "digits-train-fake.npz"
    assert path.is_file() and len(fake_inception.batches) == 3
    again = common._reference_stats(fake_inception, "fake", ds, tmp_path, 500, "cpu")
    assert len(fake_inception.batches) == 3  # not recomputed: the noise of the fake would differ
    np.testing.assert_array_equal(first[1], again[1])
    data = ds.data.clone()
    data[0, 0, 0, 0] = 16 - data[0, 0, 0, 0]  # one pixel of one image
    changed = dataclasses.replace(ds, data=data)
    common._reference_stats(fake_inception, "fake", changed, tmp_path, 500, "cpu")
    assert len(fake_inception.batches) == 6
    common._reference_stats(fake_inception, "other", changed, tmp_path, 500, "cpu")
    assert len(fake_inception.batches) == 9 and (tmp_path / "fid" / "digits-train-other.npz").is_file()


def test_an_interrupted_run_reuses_the_cached_statistics(digits_checkpoints, tmp_path, fake_inception, monkeypatch):
    """Stopped (Ctrl-C) after the statistics were written: the run again passes only its samples."""
    ckpt = _checkpoint("realnvp", digits_checkpoints["realnvp"])
    argv = ["--eval", ckpt, "--fid", 4, "--out", tmp_path, "--data-dir", tmp_path / "data"]
    frechet_distance = common._frechet_distance

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(common, "_frechet_distance", interrupted)
    with pytest.raises(SystemExit) as e:
        run_main("realnvp", argv)
    assert e.value.code == 130 and not (tmp_path / "metrics.jsonl").exists()
    seen = len(fake_inception.batches)
    monkeypatch.setattr(common, "_frechet_distance", frechet_distance)
    run_main("realnvp", argv)
    assert sum(len(b) for b in fake_inception.batches[seen:]) == 4  # the samples only


# --- errors

def test_fid_without_torch_fidelity_is_one_line_naming_the_install(digits_checkpoints, tmp_path, monkeypatch, capsys):
    ckpt = _checkpoint("realnvp", digits_checkpoints["realnvp"])
    monkeypatch.setitem(__import__("sys").modules, "torch_fidelity", None)  # import fails
    with pytest.raises(SystemExit) as e:
        run_main("realnvp", ["--eval", ckpt, "--fid", 4, "--out", tmp_path])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "pip install torch-fidelity==0.4.0" in err[0]


@pytest.mark.parametrize("argv, words", [(["--fid", "10"], "--eval CKPT"), (["--eval", "x.pt", "--fid", "1"], ">= 2")])
def test_fid_mistakes_are_one_line(argv, words, digits_checkpoints, tmp_path, capsys, fake_inception):
    if "x.pt" in argv:
        argv = ["--eval", _checkpoint("realnvp", digits_checkpoints["realnvp"]), "--fid", "1", "--out", tmp_path]
    with pytest.raises(SystemExit) as e:
        run_main("realnvp", argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and words in err[0], err


# --- end to end with torch-fidelity's Inception (random weights in its format, its local-path option)

def _fake_cifar10(root, n_train=10, n_test=2, seed=0):
    """The official python format, already extracted (as load_dataset leaves it): 5 training
    batches and the test batch of random 32x32 RGB images."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    sizes = {f"data_batch_{i}": n_train // 5 for i in range(1, 6)} | {"test_batch": n_test}
    for name, n in sizes.items():
        body = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": list(range(n))}
        (folder / name).write_bytes(pickle.dumps(body))


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 with its initial (random) weights, saved as its weights file."""
    inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    mp = pytest.MonkeyPatch()
    mp.setattr(inception, "load_state_dict_from_url", lambda *a, **k: None)  # nothing to download
    mp.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    try:
        torch.manual_seed(0)
        net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        mp.undo()
    for m in net.modules():  # He initialisation: features that vary from image to image (the default fades)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "weights.pth"
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    path.write_bytes(buffer.getvalue())
    return path


def test_fid_and_inception_score_end_to_end_with_torch_fidelity(inception_weights, tmp_path, monkeypatch, capsys):
    """ddpm.py (a tiny U-Net) on a fake CIFAR-10 of 10 training images: the statistics are written
    under the dataset, split and the weights' hash, FID and IS land in the eval event. The
    network resizes to 75 x 75, its smallest input, instead of 299 x 299: 16 times cheaper."""
    inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    monkeypatch.setattr(inception.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)
    monkeypatch.setenv(common.FID_WEIGHTS_ENV, str(inception_weights))
    _fake_cifar10(tmp_path / "data")
    small = ["--dataset", "cifar10", "--data-dir", tmp_path / "data", "--ch", 8, "--ch-mult", "1,2",
             "--num-res-blocks", 1, "--attn-res", "", "--timesteps", 5, "--batch-size", 4, "--n-samples", 2]
    run_main("ddpm", [*small, "--steps", 1, "--out", tmp_path / "run"])
    ckpt = tmp_path / "run" / "ckpt.pt"
    fields = run_main("ddpm", ["--eval", ckpt, "--fid", 4, "--batch-size", 4, "--data-dir", tmp_path / "data"])
    (cache,) = (tmp_path / "data" / "fid").glob("cifar10-train-inception-v3-compat-weights-*.npz")
    (event,) = events(tmp_path / "run", "eval")
    assert np.isfinite(event["fid"]) and event["fid"] > 0 and event["n"] == 4 and event["reference_n"] == 10
    # 2 parts of 2 samples: exp E KL(p(y|x) || p(y)) lies in [1, 2] (the mutual information <= log 2)
    assert 1 - 1e-9 <= event["inception_score"] <= 2 + 1e-9
    assert event["fid"] == pytest.approx(fields["fid"])
    with np.load(cache) as f:  # the training images' statistics (their reuse: the tests above)
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048) and np.isfinite(f["sigma"]).all()


# --- benchmarks/gpu_check.py: its CPU path, so CI proves the GPU check still runs

def test_gpu_check_smoke_runs_on_the_cpu(tmp_path):
    """`gpu_check.py --device cpu --smoke` on one file: a fake CIFAR-10, its training (timed, FLOPs
    counted), --sample and --eval all work, and the JSON and the table say so."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check
    record = gpu_check.main(["--device", "cpu", "--smoke", "--models", "ddpm", "--out", tmp_path])
    r = record["files"]["ddpm"]
    assert r["amp"]["ok"] and r["sample"]["ok"] and r["eval"]["ok"], r
    assert r["amp"]["s_per_step"] > 0 and r["amp"]["flops_per_step"] > 0 and r["sample"]["samples_per_s"] > 0
    assert r["paper_steps"] == 800_000
    assert json.loads((tmp_path / "gpu_check.json").read_text())["files"] == record["files"]
    assert "| `ddpm.py` | 4 | " in (tmp_path / "gpu_check.md").read_text()
