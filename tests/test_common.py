"""Tests of common.py: datasets, downloads (offline, from a loopback HTTP server), batching,
EMA, checkpoints, resume, distributed training, logging, pictures and the command line."""
import ast
import contextlib
import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import common
from common import UserError
from conftest import MODEL_FILES, ROOT, free_port, subprocess_env


# ----------------------------------------------------------------------------------------
# Shipped data
# ----------------------------------------------------------------------------------------

def test_digits_splits_are_fixed_stratified_and_disjoint():
    train, test = common.load_dataset("digits", "train"), common.load_dataset("digits", "test")
    assert train.data.shape == (1497, 1, 8, 8) and test.data.shape == (300, 1, 8, 8)
    assert train.data.dtype == torch.uint8 and train.info.kind == "image" and train.info.shape == (1, 8, 8)
    assert train.info.levels == 17 and int(train.data.max()) == 16 and int(train.data.min()) == 0
    assert test.labels.bincount().tolist() == [30] * 10 and train.info.num_classes == 10
    with np.load(ROOT / "data" / "digits.npz") as f:
        images, labels, test_index = f["images"], f["labels"], f["test_index"]
    assert len(set(test_index.tolist())) == 300
    np.testing.assert_array_equal(test.data[:, 0].numpy(), images[np.sort(test_index)])
    np.testing.assert_array_equal(test.labels.numpy(), labels[np.sort(test_index)])
    # the two splits together are the whole set: the multiset of (image, label) rows matches
    rows = lambda x, y: sorted(map(bytes, np.concatenate([x.reshape(len(x), -1), y[:, None]], 1).astype(np.uint8)))
    both = rows(np.concatenate([train.data[:, 0].numpy(), test.data[:, 0].numpy()]),
                np.concatenate([train.labels.numpy(), test.labels.numpy()]))
    assert both == rows(images, labels)


def test_digits_binary_thresholds_at_8():
    grey, binary = common.load_dataset("digits", "test"), common.load_dataset("digits-binary", "test")
    assert binary.info.levels == 2 and set(binary.data.unique().tolist()) == {0, 1}
    assert torch.equal(binary.data, (grey.data >= 8).to(torch.uint8))


@pytest.mark.parametrize("name", common.POINT_SETS)
def test_point_sets_are_seeded_and_inside_the_box(name):
    a, b, test = (common.load_dataset(name, "train"), common.load_dataset(name, "train"),
                  common.load_dataset(name, "test"))
    assert a.data.shape == (10_000, 2) and a.data.dtype == torch.float32 and a.info.kind == "points"
    assert torch.equal(a.data, b.data) and not torch.equal(a.data, test.data)
    assert a.data.abs().max() < a.info.lim == common.POINTS_LIM
    fresh = a.sample(5000, torch.Generator().manual_seed(7))
    assert fresh.shape == (5000, 2) and not torch.equal(fresh, a.data[:5000])


CLOSED_FORM = [n for n in common.POINT_SETS if common.load_dataset(n, "test").log_prob is not None]


def test_the_required_sets_have_a_closed_form_density():
    assert {"8gaussians", "checkerboard", "rings"} <= set(CLOSED_FORM)


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_log_prob_is_the_density_of_the_sampler(name):
    """Mass of each cell of an 8x8 partition by quadrature of exp(log_prob) equals the fraction
    of sampled points in it, within 5 binomial standard errors; the density integrates to 1."""
    ds = common.load_dataset(name, "test")
    fine = 400  # midpoint rule on 400x400 cells, each coarse cell gets 50x50 of them
    dens = np.exp(common.density_on_grid(ds.log_prob, ds.info.lim, n=fine)) * (2 * ds.info.lim / fine) ** 2
    assert abs(dens.sum() - 1) < 1e-4
    mass = dens.reshape(8, fine // 8, 8, fine // 8).sum((1, 3))  # (row: y, column: x)
    n = 200_000
    x = ds.sample(n, torch.Generator().manual_seed(3)).numpy()
    counts, _, _ = np.histogram2d(x[:, 1], x[:, 0], bins=8, range=[[-ds.info.lim, ds.info.lim]] * 2)
    se = np.sqrt(mass * (1 - mass) / n) + 1e-12
    z = np.abs(counts / n - mass) / se
    assert z.max() < 5, f"cell deviates by {z.max():.1f} standard errors"


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_entropy_estimate_matches_quadrature(name):
    ds = common.load_dataset(name, "test")
    h, se = common.entropy_estimate(name, n=100_000, seed=0)
    fine = 800
    logp = common.density_on_grid(ds.log_prob, ds.info.lim, n=fine)
    p = np.exp(logp) * (2 * ds.info.lim / fine) ** 2
    h_quad = -(p[p > 0] * logp[p > 0]).sum()
    assert abs(h - h_quad) < 5 * se + 2e-3
    if name == "checkerboard":
        assert h == pytest.approx(math.log(32), abs=1e-9)


def test_text_file_split_and_vocabulary(tmp_path):
    text = "".join(chr(97 + (i * 7) % 26) for i in range(1000)) + "Z!"
    path = tmp_path / "t.txt"
    path.write_text(text)
    train, test = common.load_dataset(str(path), "train"), common.load_dataset(str(path), "test")
    assert train.info.kind == "text" and train.info.vocab == tuple(sorted(set(text))) == test.info.vocab
    assert len(train.data) == 901 and len(test.data) == 101  # int(0.9 * 1002) and train.data.dtype == torch.int64
    assert "".join(train.info.vocab[i] for i in torch.cat([train.data, test.data])) == text


def test_user_mistakes_about_datasets_are_one_line_errors(tmp_path):
    for call, words in [(lambda: common.load_dataset("imagenet"), "accepted: digits"),
                        (lambda: common.load_dataset("digits", "valid"), "accepted: train, test"),
                        (lambda: common.load_dataset(str(tmp_path / "none.txt")), "not found"),
                        (lambda: common.entropy_estimate("moons"), "no closed-form")]:
        with pytest.raises(UserError) as e:
            call()
        assert words in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------
# Downloads, offline: official file formats served from 127.0.0.1
# ----------------------------------------------------------------------------------------

class _Server:
    """A loopback HTTP server: `files[name] = bytes`; names in `truncate` are cut short."""

    def __init__(self):
        self.files, self.truncate, self.requests = {}, set(), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                outer.requests.append(name)
                if name not in outer.files:
                    self.send_error(404)
                    return
                body = outer.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if name in outer.truncate else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _idx(array):
    """Bytes of a gzipped IDX file (big-endian header, unsigned bytes), as LeCun publishes MNIST."""
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.tobytes())


def _serve(monkeypatch, server, name, files, urls=None):
    for fname, body in files.items():
        server.files[fname] = body
    monkeypatch.setitem(common._SOURCES, name, {
        "urls": urls or [server.url],
        "files": {f: hashlib.md5(b).hexdigest() for f, b in files.items()}})


def _mnist_files(n_train=12, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"train": (rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train)),
              "t10k": (rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test))}
    files = {}
    for prefix, (x, y) in arrays.items():
        files[f"{prefix}-images-idx3-ubyte.gz"] = _idx(x)
        files[f"{prefix}-labels-idx1-ubyte.gz"] = _idx(y)
    return files, arrays


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_download_parse_and_cache(monkeypatch, server, tmp_path, name):
    files, arrays = _mnist_files()
    _serve(monkeypatch, server, name, files)
    train = common.load_dataset(name, "train", root=tmp_path)
    test = common.load_dataset(name, "test", root=tmp_path)
    assert train.data.shape == (12, 1, 28, 28) and test.data.shape == (5, 1, 28, 28)
    assert train.data.dtype == torch.uint8 and train.labels.dtype == torch.int64 and train.info.levels == 256
    np.testing.assert_array_equal(train.data[:, 0].numpy(), arrays["train"][0])
    np.testing.assert_array_equal(test.labels.numpy(), arrays["t10k"][1])
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(files)
    mask = os.umask(0)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / name).iterdir()} == {0o666 & ~mask}  # as open() would
    n = len(server.requests)
    common.load_dataset(name, "train", root=tmp_path)  # cached: no second request
    assert len(server.requests) == n == 4


def test_cifar10_tarball_parse(monkeypatch, server, tmp_path):
    rng = np.random.default_rng(1)
    batches = {f"data_batch_{i}": rng.integers(0, 256, (3, 3072)) for i in range(1, 6)}
    batches["test_batch"] = rng.integers(0, 256, (2, 3072))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for fname, data in batches.items():
            body = pickle.dumps({b"data": data.astype(np.uint8), b"labels": list(range(len(data)))})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{fname}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    _serve(monkeypatch, server, "cifar10", {"cifar-10-python.tar.gz": buf.getvalue()})
    train, test = common.load_dataset("cifar10", "train", root=tmp_path), common.load_dataset("cifar10", "test", root=tmp_path)
    assert train.data.shape == (15, 3, 32, 32) and test.data.shape == (2, 3, 32, 32) and train.info.shape == (3, 32, 32)
    # the official row layout: 1024 red values, then green, then blue, each row-major
    row = batches["data_batch_2"][1]
    assert train.data[4, 1, 2, 5] == row[1024 + 2 * 32 + 5] and train.data[4, 2, 31, 0] == row[2048 + 31 * 32]
    assert train.labels.tolist() == [0, 1, 2] * 5


def test_shakespeare_download(monkeypatch, server, tmp_path):
    text = ("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 5).encode()
    _serve(monkeypatch, server, "shakespeare", {"input.txt": text})
    ds = common.load_dataset("shakespeare", "train", root=tmp_path)
    assert ds.info.kind == "text" and "".join(ds.info.vocab[i] for i in ds.data) == text.decode()[: len(ds.data)]


def _leftovers(folder):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_checksum_mismatch_deletes_the_file(monkeypatch, server, tmp_path):
    files, _ = _mnist_files()
    _serve(monkeypatch, server, "mnist", files)
    good = files["train-images-idx3-ubyte.gz"]
    server.files["train-images-idx3-ubyte.gz"] = good[:100] + bytes([good[100] ^ 1]) + good[101:]
    with pytest.raises(UserError, match="md5") as e:
        common.load_dataset("mnist", "train", root=tmp_path)
    assert "file deleted" in str(e.value) and "\n" not in str(e.value)
    assert _leftovers(tmp_path / "mnist") == []


def test_truncated_transfer_leaves_nothing_taken_for_good(monkeypatch, server, tmp_path):
    files, arrays = _mnist_files()
    _serve(monkeypatch, server, "mnist", files)
    server.truncate.add("train-images-idx3-ubyte.gz")
    with pytest.raises(UserError, match="cut short"):
        common.load_dataset("mnist", "train", root=tmp_path)
    assert _leftovers(tmp_path / "mnist") == []
    server.truncate.clear()  # the next attempt downloads it whole
    assert torch.equal(common.load_dataset("mnist", "train", root=tmp_path).data[:, 0],
                       torch.from_numpy(arrays["train"][0].astype(np.uint8)))


def test_falls_back_to_the_next_source(monkeypatch, server, tmp_path):
    files, _ = _mnist_files()
    _serve(monkeypatch, server, "mnist", files, urls=[server.url + "official/", server.url + "mirror/"])
    urlopen = common.urllib.request.urlopen

    def official_down(url, timeout):
        if "/official/" in url:
            raise common.urllib.error.URLError("403 forbidden")
        return urlopen(url, timeout=timeout)
    monkeypatch.setattr(common.urllib.request, "urlopen", official_down)
    assert common.load_dataset("mnist", "test", root=tmp_path).data.shape == (5, 1, 28, 28)
    assert server.requests == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def test_no_network_names_the_url_and_the_place(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setitem(common._SOURCES, "mnist", {"urls": [f"http://127.0.0.1:{port}/mnist/"],
                                                  "files": dict.fromkeys(common._MNIST_FILES, "0" * 32)})
    with pytest.raises(UserError) as e:
        common.load_dataset("mnist", "test", root=tmp_path)
    msg = str(e.value)
    assert f"http://127.0.0.1:{port}/mnist/t10k-images-idx3-ubyte.gz" in msg
    assert str(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz") in msg and "\n" not in msg


def _tar_with(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


@pytest.mark.parametrize("bad", ["../evil.txt", "cifar-10-batches-py/../../evil.txt", "/tmp/evil_abs.txt"])
def test_tarball_member_outside_the_folder_is_refused(monkeypatch, server, tmp_path, bad):
    body = _tar_with([("cifar-10-batches-py/test_batch", b"x"), (bad, b"pwned")])
    _serve(monkeypatch, server, "cifar10", {"cifar-10-python.tar.gz": body})
    root = tmp_path / "cache"
    with pytest.raises(UserError, match="refusing to extract"):
        common.load_dataset("cifar10", "test", root=root)
    assert not (tmp_path / "evil.txt").exists() and not (root / "evil.txt").exists()
    assert not Path("/tmp/evil_abs.txt").exists()
    assert not (root / "cifar10" / "cifar-10-batches-py").exists()  # nothing half-extracted taken as done


def test_tarball_symlink_member_is_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    (tmp_path / "a.tar").write_bytes(buf.getvalue())
    with pytest.raises(UserError, match="not a plain file"):
        common._safe_extract(tmp_path / "a.tar", tmp_path / "out")


# ----------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------

def test_batches_images_and_points():  # text windows: gpt.TextWindows (tests/test_gpt.py)
    ds = common.load_dataset("digits")
    x, y = next(common.Batches(ds, 32, seed=0))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.uint8 and y.shape == (32,)
    # each (image, label) pair drawn is a pair of the dataset
    flat = ds.data.reshape(len(ds.data), -1)
    for xi, yi in zip(x.reshape(32, -1), y):
        assert any(torch.equal(xi, r) and l == yi for r, l in zip(flat, ds.labels))
    pts = common.load_dataset("rings")
    b = common.Batches(pts, 64, seed=0)
    p1, p2 = next(b)[0], next(b)[0]
    assert p1.shape == (64, 2) and not torch.equal(p1, p2)


def test_batches_split_the_global_batch_across_ranks():
    ds = common.load_dataset("digits")
    full = next(common.Batches(ds, 12, seed=5))[0]
    parts = [next(common.Batches(ds, 12, common._Dist(rank=r, world_size=3), seed=5))[0] for r in range(3)]
    assert torch.equal(torch.cat(parts), full)
    with pytest.raises(UserError, match="multiple of 3"):
        common.Batches(ds, 10, common._Dist(rank=0, world_size=3))


@pytest.mark.parametrize("name", ["8gaussians", "digits"])
def test_batches_stream_is_independent_of_the_global_generator(name):
    """Seeded with the same number as the global generator, the data stream must not repeat its
    draws: a model's noise would otherwise be a function of the data it is added to."""
    ds = common.load_dataset(name)
    common.seed_everything(0)
    b = common.Batches(ds, 256, seed=0)
    noise, generator_noise = torch.randn(4096), torch.randn(4096, generator=b.generator)
    assert abs(torch.corrcoef(torch.stack([noise, generator_noise]))[0, 1]) < 5 / math.sqrt(4096)
    common.seed_everything(0)
    x, _ = next(b)
    other = ds.sample(256, torch.Generator().manual_seed(0)) if name == "8gaussians" else None
    if other is not None:
        assert not torch.allclose(x, other)


def test_batches_state_resumes_the_stream():
    ds = common.load_dataset("8gaussians")
    a = common.Batches(ds, 16, seed=1)
    next(a)
    state = a.state_dict()
    expected = next(a)[0]
    b = common.Batches(ds, 16, seed=99)
    b.load_state_dict(state)
    assert torch.equal(next(b)[0], expected)


# ----------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------

@given(decay=st.floats(0.5, 0.999), steps=st.integers(1, 30), warmup=st.booleans())
def test_ema_follows_the_recurrence(decay, steps, warmup):
    torch.manual_seed(0)
    model = torch.nn.BatchNorm1d(3)  # parameters, float buffers and an integer buffer
    ema = common.EMA(model, decay, warmup=warmup)
    expected = model.weight.detach().clone().double()
    for n in range(steps):
        with torch.no_grad():
            model.weight.add_(torch.randn(3))
        model(torch.randn(8, 3))  # moves running stats and num_batches_tracked
        ema.update(model)
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        expected = d * expected + (1 - d) * model.weight.detach().double()
    torch.testing.assert_close(ema.model.weight.double(), expected, rtol=1e-5, atol=1e-6)
    assert ema.model.num_batches_tracked == model.num_batches_tracked == steps
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())
    other = common.EMA(torch.nn.BatchNorm1d(3), decay, warmup=warmup)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == steps and torch.equal(other.model.weight, ema.model.weight)


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------

def test_checkpoint_roundtrip_and_bad_files(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "step": 7, "config": {"lr": 0.1, "ch_mult": (1, 2)},
             "rng": [{"cpu": torch.get_rng_state(), "cuda": None}]}
    path = tmp_path / "sub" / "ckpt.pt"
    common._save_checkpoint(path, state)
    back = common.load_checkpoint(path)
    assert back["step"] == 7 and torch.equal(back["model"]["w"], state["model"]["w"])
    assert back["config"] == state["config"] and torch.equal(back["rng"][0]["cpu"], state["rng"][0]["cpu"])
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temporary file left
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    path.with_name("cut.pt").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    torch.save([1, 2], tmp_path / "list.pt")
    for bad, words in [(tmp_path / "missing.pt", "does not exist"), (tmp_path / "garbage.pt", "cannot be read"),
                       (path.with_name("cut.pt"), "cannot be read"), (tmp_path / "list.pt", "not a checkpoint")]:
        with pytest.raises(UserError, match=words) as e:
            common.load_checkpoint(bad)
        assert "\n" not in str(e.value)


def test_a_process_killed_while_writing_leaves_the_previous_checkpoint(tmp_path):
    """The child writes checkpoint A, then starts writing B and is killed (SIGKILL) before B is
    renamed into place; A must still load."""
    script = textwrap.dedent(f"""
        import os, sys, time, torch, common
        path = {str(tmp_path / 'ckpt.pt')!r}
        common._save_checkpoint(path, {{"model": {{"w": torch.zeros(3)}}, "step": 1}})
        def stall(fd):
            print("writing", flush=True)
            time.sleep(60)
        os.fsync = stall
        common._save_checkpoint(path, {{"model": {{"w": torch.ones(10**6)}}, "step": 2}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=subprocess_env(), text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    state = common.load_checkpoint(tmp_path / "ckpt.pt")
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.zeros(3))


@dataclasses.dataclass
class _ToyConfig(common.RunConfig):
    width: int = common.flag(32, "hidden units")


def _toy_training(steps, out, resume=None, width=32):
    """A small loop built from common's pieces, with every kind of randomness a model file
    uses: batches drawn by index, dropout from the global generator, EMA, Adam; saved with
    _save_training and resumed with resume, as the model files do."""
    common.seed_everything(0)
    ds = common.load_dataset("digits")
    cfg = _ToyConfig(resume=str(resume) if resume else None, width=width)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.Dropout(0.3),
                                torch.nn.Linear(width, 10))
    ema = common.EMA(model, 0.9)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dist = common._Dist()
    batches = common.Batches(ds, 16, dist, seed=0)
    step = common._resume(cfg, "toy", dist, model=model, ema=ema, opt=opt, batches=batches) if resume else 0
    for step in range(step + 1, steps + 1):
        x, y = next(batches)
        loss = torch.nn.functional.cross_entropy(model(x.float() / 16), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
    common._save_training(out, "toy", step, cfg, ds.info, dist, model=model, ema=ema, opt=opt, batches=batches)
    return model, ema


def test_resume_is_bit_exact(tmp_path):
    for run in ("a", "half", "b"):
        (tmp_path / run).mkdir()
    straight, straight_ema = _toy_training(20, tmp_path / "a")
    _toy_training(10, tmp_path / "half")
    resumed, resumed_ema = _toy_training(20, tmp_path / "b", resume=tmp_path / "half" / "ckpt.pt")
    for p, q in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)
    for p, q in zip(straight_ema.model.parameters(), resumed_ema.model.parameters()):
        assert torch.equal(p, q)
    ckpt = common.load_checkpoint(tmp_path / "b" / "ckpt.pt", "toy")
    cfg, info = common.saved_config(_ToyConfig, ckpt)
    assert ckpt["step"] == 20 and cfg.width == 32 and info == common.load_dataset("digits").info


def test_resume_names_the_flags_that_change_the_network(tmp_path):
    _toy_training(3, tmp_path)
    with pytest.raises(UserError) as e:
        _toy_training(5, tmp_path, resume=tmp_path / "ckpt.pt", width=16)
    msg = str(e.value)
    assert "--width 32 (now 16)" in msg and "--overwrite" in msg and "\n" not in msg
    with pytest.raises(UserError, match=r"written by toy\.py; this file takes checkpoints of other\.py"):
        common.load_checkpoint(tmp_path / "ckpt.pt", "other")
    common.load_checkpoint(tmp_path / "ckpt.pt", ("other", "toy"))  # a file may accept several writers


def test_set_rng_state_restores_each_process_its_own_state():
    """After a two-process run, rank 1 resumes with rank 1's generator, not rank 0's."""
    states = []
    for seed in (11, 12):
        torch.manual_seed(seed)
        states.append({"cpu": torch.get_rng_state(), "cuda": None})
    expected = [torch.Generator().manual_seed(s).get_state() for s in (11, 12)]
    for rank in (0, 1):
        torch.manual_seed(0)
        common._set_rng_state(states, common._Dist(rank=rank, world_size=2))
        assert torch.equal(torch.get_rng_state(), expected[rank])
    torch.manual_seed(5)
    before = torch.get_rng_state()
    common._set_rng_state(states, common._Dist(rank=0, world_size=3))  # another process count: keep the seed's
    assert torch.equal(torch.get_rng_state(), before)


def test_checkpoints_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        common._save_checkpoint(tmp_path / "c.pt", {"model": {}})
    finally:
        os.umask(old)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o640


def test_data_info_round_trips_through_a_checkpoint(tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("hello world, " * 20)
    for name in ("digits", "rings", str(txt)):
        info = common.load_dataset(name).info
        common._save_checkpoint(tmp_path / "c.pt", {"model": {}, "data": info.as_dict()})
        back = common.DataInfo.from_dict(common.load_checkpoint(tmp_path / "c.pt")["data"])
        assert back == info and hash(back) == hash(info)
    assert common.load_dataset("digits").info.dims == 64 and common.load_dataset("rings").info.dims == 2


# ----------------------------------------------------------------------------------------
# Distributed: two gloo processes on half-batches equal one process on the full batch
# ----------------------------------------------------------------------------------------

DDP_SCRIPT = """
import sys, json, torch, common
out = sys.argv[1]
dist = common._init_distributed("cpu")
common.seed_everything(0)
ds = common.load_dataset("digits")
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
net = common.wrap_ddp(model, dist)
opt = torch.optim.SGD(model.parameters(), lr=0.5)
batches = common.Batches(ds, 32, dist, seed=3)
logger = common.Logger(out, total_steps=2, enabled=dist.is_main, every=1)
for step in (1, 2):
    x, y = next(batches)
    loss = torch.nn.functional.cross_entropy(net(x.float() / 16), y)
    opt.zero_grad(); loss.backward(); opt.step()
    counts = torch.tensor([1.0 + dist.rank, 2.0])
    assert dist.sum(counts)[0].tolist() == ([3.0, 4.0] if dist.world_size == 2 else [1.0, 2.0])
    assert counts.tolist() == [1.0 + dist.rank, 2.0]
    kept = loss.detach().clone()
    logger.log(step, n=32, loss=dist.mean(loss), again=dist.mean(loss))  # a collective leaves its argument alone
    assert torch.equal(loss.detach(), kept)
if dist.is_main:
    torch.save(model.state_dict(), out + "/params.pt")
with open(out + f"/rank{dist.rank}.json", "w") as f:
    json.dump({"world_size": dist.world_size, "rank": dist.rank, "stop": dist.any(dist.rank == 1)}, f)
dist.close()
"""



def test_two_gloo_processes_equal_one_process(tmp_path):
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    subprocess.run([sys.executable, str(script), str(one)], check=True, env=subprocess_env(), timeout=120)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                    f"--master_port={free_port()}", str(script), str(two)], check=True, env=subprocess_env(),
                   timeout=180, capture_output=True)
    a, b = torch.load(one / "params.pt"), torch.load(two / "params.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a["1.weight"], torch.nn.Linear(64, 10).weight)  # it did train
    # the logged loss is the mean over ranks: equal to the single process's full-batch loss
    la, lb = common._read_metrics(one / "metrics.jsonl"), common._read_metrics(two / "metrics.jsonl")
    assert len(la) == len(lb) == 2
    for r, s in zip(la, lb):
        assert s["loss"] == pytest.approx(r["loss"], rel=1e-5) and s["again"] == s["loss"]
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["stop"] for r in ranks)
    assert json.loads((one / "rank0.json").read_text())["stop"] is False


# ----------------------------------------------------------------------------------------
# Training-loop helpers: signals, non-finite loss, logging
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_sets_a_flag_and_restores_handlers(sig):
    before = signal.getsignal(sig)
    with common._StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), sig)
        time.sleep(0.05)
        assert stop.requested
    assert signal.getsignal(sig) is before


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_names_the_step(value):
    common._check_finite(1.5, 3)
    with pytest.raises(UserError, match="at step 42"):
        common._check_finite(value, 42)


def test_logger_averages_windows_and_writes_events(tmp_path, capsys):
    log = common.Logger(tmp_path, total_steps=6, every=3, print_every=0.0)
    for step, v in enumerate([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], start=1):
        log.log(step, n=4, loss=v)
    log.event("eval", split="test", nll=1.25)
    log.close()
    lines = common._read_metrics(tmp_path / "metrics.jsonl")
    assert [l.get("step") for l in lines] == [3, 6, None]
    assert lines[0]["loss"] == pytest.approx(3.0) and lines[1]["loss"] == pytest.approx(1.0)
    assert lines[0]["ex_per_s"] > 0 and lines[2] == {"event": "eval", "split": "test", "nll": 1.25}
    assert (tmp_path / "loss.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "step 6/6" in out and "ETA" in out and "ex/s" in out
    some = common.Logger(tmp_path / "s", total_steps=4, every=4)
    (tmp_path / "s").mkdir()
    for step in (1, 2, 3, 4):  # a metric logged at some steps only is their average
        some.log(step, n=1, loss=1.0, **({"fid": 10.0 * step} if step % 2 == 0 else {}))
    assert common._read_metrics(tmp_path / "s" / "metrics.jsonl")[0]["fid"] == pytest.approx(30.0)
    partial = common.Logger(tmp_path / "p", total_steps=100, every=50)
    (tmp_path / "p").mkdir()
    for step in (1, 2, 3):  # a run stopped at step 3 of a 50-step window still logs it
        partial.log(step, n=1, loss=float(step))
    partial.close()
    assert common._read_metrics(tmp_path / "p" / "metrics.jsonl")[0]["loss"] == pytest.approx(2.0)
    silent = common.Logger(tmp_path / "x", total_steps=1, enabled=False)
    silent.log(1, n=1, loss=1.0)
    silent.event("eval", nll=1.0)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------

def _png(path):
    import matplotlib.image
    return matplotlib.image.imread(path)


def test_image_grid_layout_and_levels(tmp_path):
    x = torch.zeros(10, 1, 8, 8, dtype=torch.uint8)
    x[3, 0, 2, 5] = 16
    grid = common._image_grid(x, levels=17)
    assert grid.shape == (3 * 9 + 1, 4 * 9 + 1)  # 4 per row, 3 rows, 1-pixel borders
    assert grid[1 + 2, 1 + 3 * 9 + 5] == 1.0 and grid[1, 1] == 0.0 and grid[0, 0] == 0.5
    common.save_image_grid(x, tmp_path / "g.png", levels=17)
    img = _png(tmp_path / "g.png")
    scale = math.ceil(256 / 37)
    assert img.shape[:2] == (28 * scale, 37 * scale)
    rgb = common._image_grid(torch.rand(4, 3, 5, 5))
    assert rgb.shape == (2 * 6 + 1, 2 * 6 + 1, 3)
    tiled = common._image_grid(torch.rand(2, 4, 5, 5), nrow=4)  # 4 channels: every channel a grey tile
    assert tiled.shape == (2 * 6 + 1, 4 * 6 + 1)


def test_scatter_and_density_pictures(tmp_path):
    common.save_scatter(torch.randn(100, 2), tmp_path / "s.png", lim=4, title="x")
    grid = common.density_on_grid(lambda p: p[:, 0] + 10 * p[:, 1], lim=2.0, n=4)
    centres = np.array([-1.5, -0.5, 0.5, 1.5])
    np.testing.assert_allclose(grid, centres[None, :] + 10 * centres[:, None], rtol=1e-6)  # row y, column x
    common.save_density({"a": grid, "pts": np.random.randn(50, 2)}, tmp_path / "d.png", lim=2.0)
    assert _png(tmp_path / "s.png").shape[0] > 100 and _png(tmp_path / "d.png").shape[1] > 400


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Cfg(common.RunConfig):
    lr: float = common.flag(2e-4, "learning rate")
    ch_mult: tuple = common.flag((1, 2), "channel multipliers")
    dropout: float = common.flag(0.0, "dropout")
    cond: bool = common.flag(False, "class-conditional")
    kind: str = common.flag("a", "a choice", choices=("a", "b"))


_PRESETS = {"cifar10": {"dropout": 0.1, "ch_mult": (1, 2, 2, 2), "cond": True}, "points": {"lr": 1e-3}}


def test_parse_config_defaults_presets_and_flags():
    cfg = common.parse_config(_Cfg, _PRESETS, [])
    assert (cfg.dataset, cfg.lr, cfg.ch_mult, cfg.cond) == ("digits", 2e-4, (1, 2), False)
    cfg = common.parse_config(_Cfg, _PRESETS, ["--dataset", "cifar10", "--dropout", "0.3", "--no-cond"])
    assert (cfg.dropout, cfg.ch_mult, cfg.cond) == (0.3, (1, 2, 2, 2), False)  # typed flags beat the preset
    assert common.parse_config(_Cfg, _PRESETS, ["--dataset", "rings"]).lr == 1e-3  # preset by kind
    assert common.parse_config(_Cfg, _PRESETS, ["--ch-mult", "1,2,4", "--batch-size", "8"]).ch_mult == (1, 2, 4)
    assert common.parse_config(_Cfg, _PRESETS, ["--resume"]).resume == "auto"
    assert common.parse_config(_Cfg, _PRESETS, ["--resume", "x.pt"]).resume == "x.pt"


@pytest.mark.parametrize("argv, words", [
    (["--dataset", "imagenet"], "accepted: digits"),
    (["--dataset", "shakespeare"], "accepts image, points"),
    (["--lr", "fast"], "invalid float"),
    (["--lr", "-1"], "accepted: > 0"),
    (["--batch-size", "0"], ">= 1"),
    (["--kind", "c"], "invalid choice"),
    (["--device", "tpu"], "invalid choice"),
    (["--no-such-flag"], "unrecognized"),
])
def test_parse_config_errors_are_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_config(_Cfg, _PRESETS, argv, kinds=("image", "points"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        common.parse_config(_Cfg, _PRESETS, ["--help"], doc="Toy model.\n\nMore.")
    out = capsys.readouterr().out
    for f in dataclasses.fields(_Cfg):
        assert "--" + f.name.replace("_", "-") in out
    assert "(default: 1,2)" in out and "cifar10: dropout=0.1 ch_mult=1,2,2,2" in out


def test_user_errors_exit_with_one_line(capsys):
    with pytest.raises(SystemExit) as e, common.user_errors():
        raise UserError("bad thing; accepted: good things")
    assert e.value.code == 2 and capsys.readouterr().err == "error: bad thing; accepted: good things\n"


def test_get_device():
    assert common.get_device("cpu") == torch.device("cpu")
    assert common.get_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(UserError, match="accepted"):
        common.get_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="not available"):
            common.get_device("cuda")


# ----------------------------------------------------------------------------------------
# House rules: model files import only what DESIGN.md allows, and run with common.py alone
# ----------------------------------------------------------------------------------------

ALLOWED = {"torch", "numpy", "matplotlib", "common"} | set(sys.stdlib_module_names)


def test_there_are_model_files():
    assert MODEL_FILES, "no model file found"


@pytest.mark.parametrize("model", MODEL_FILES)
def test_model_file_imports_only_what_is_allowed(model):
    tree = ast.parse((ROOT / f"{model}.py").read_text())
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for name in names:
            assert name.split(".")[0] in ALLOWED, f"{model}.py:{node.lineno} imports {name}"


_RUN_HELP = """
import contextlib, io, runpy, sys
for model in sys.argv[1:]:
    sys.argv, out = [model + ".py", "--help"], io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(model + ".py", run_name="__main__")
        except SystemExit as e:
            assert e.code in (0, None), (model, e.code)
    assert "--dataset" in out.getvalue() and "--resume" in out.getvalue() and "default" in out.getvalue(), model
    print(model, "ok")
"""


def test_model_files_run_with_common_alone(tmp_path):
    """Each model file's --help runs in a folder with nothing but the model files, common.py and
    data/, outside the repository (one interpreter for all: no file imports another, as
    test_model_file_imports_only_what_is_allowed checks)."""
    for model in MODEL_FILES:
        shutil.copy(ROOT / f"{model}.py", tmp_path)
    shutil.copy(ROOT / "common.py", tmp_path)
    shutil.copytree(ROOT / "data", tmp_path / "data")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", _RUN_HELP, *MODEL_FILES], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [w for m in MODEL_FILES for w in (m, "ok")]


def test_check_range_accepts_the_range_and_names_it():
    cfg = _Cfg(dropout=0.5)
    common.check_range(cfg, "dropout", 0, 1, open_high=True)
    for low, high, ol, oh, words in [(0, 0.4, False, False, "accepted: >= 0 and <= 0.4"),
                                     (0.5, None, True, False, "accepted: > 0.5"),
                                     (None, 0.5, False, True, "accepted: < 0.5")]:
        with pytest.raises(UserError, match=re.escape(f"--dropout 0.5 is out of range; {words}")):
            common.check_range(cfg, "dropout", low, high, open_low=ol, open_high=oh)


# ----------------------------------------------------------------------------------------
# Run folders, memory, signals: what a user can get wrong, and what they can interrupt
# ----------------------------------------------------------------------------------------

def test_a_run_folder_that_holds_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    dist = common._Dist()
    out = tmp_path / "run"
    assert common._open_run(_Cfg(out=str(out)), "toy", dist) == out and out.is_dir()
    (out / "ckpt.pt").write_bytes(b"x")
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "samples_5.png").write_bytes(b"x")
    with pytest.raises(UserError, match="holds a run .*--resume.*--overwrite"):
        common._open_run(_Cfg(out=str(out)), "toy", dist)
    assert common._open_run(_Cfg(out=str(out), resume="auto"), "toy", dist) == out
    assert (out / "ckpt.pt").exists()
    (out / "notes.md").write_text("mine")
    common._open_run(_Cfg(out=str(out), overwrite=True), "toy", dist)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "notes.md"]  # the run's files, and only them


def test_a_second_training_cannot_write_the_same_folder(tmp_path):
    script = textwrap.dedent(f"""
        import time, common, test_common
        cfg = test_common._Cfg(out={str(tmp_path)!r})
        common._open_run(cfg, "toy", common._Dist())
        print("locked", flush=True)
        time.sleep(60)
    """)
    env = {**subprocess_env(), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        common._RUN_LOCKS.clear()
        with pytest.raises(UserError, match=f"another training \\(pid {holder.pid}\\) is writing"):
            common._open_run(_Cfg(out=str(tmp_path), overwrite=True), "toy", common._Dist())
    finally:
        holder.kill()
        holder.wait()
    common._open_run(_Cfg(out=str(tmp_path)), "toy", common._Dist())  # the lock went with its process


def test_out_that_is_not_a_writable_folder_is_a_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    for out, words in [(tmp_path / "file", "is a file"), (tmp_path / "file" / "below", "lies below a file")]:
        for call in (lambda: common._open_run(_Cfg(out=str(out)), "toy", common._Dist()),
                     lambda: common.output_dir(_Cfg(out=str(out)), tmp_path / "ckpt.pt")):
            with pytest.raises(UserError, match=words) as e:
                call()
            assert "\n" not in str(e.value)

    def refuse(*args, **kwargs):  # as a read-only folder answers a user without root's rights
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(common.tempfile, "TemporaryFile", refuse)
    with pytest.raises(UserError, match="cannot be written"):
        common.output_dir(_Cfg(out=str(tmp_path / "ro")), tmp_path / "ckpt.pt")


def test_report_files_names_only_files_that_exist(tmp_path, capsys):
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    common.report_files(tmp_path, ["ckpt.pt", "samples_0.png"])
    assert capsys.readouterr().out == f"written to {tmp_path}: ckpt.pt\n"


@pytest.mark.parametrize("error, asked", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: "
                  "you tried to allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)"), "40 GB"),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 15.90 GiB total capacity)"), "20.00 GiB"),
    (MemoryError(), "memory"),
])
def test_dispatch_turns_running_out_of_memory_into_one_line(error, asked):
    def fails(cfg):
        raise error
    for argv, flag in [({}, "--batch-size 128"), ({"sample": "c.pt"}, "--n-samples 64"),
                       ({"eval": "c.pt"}, "--batch-size 128")]:
        with pytest.raises(UserError, match=re.escape(f"{asked} could not be allocated with {flag}")):
            common.dispatch(_Cfg(**argv), fails, fails, fails)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not the user's
        common.dispatch(_Cfg(), lambda cfg: (_ for _ in ()).throw(RuntimeError("shape mismatch")), None, None)


def test_a_signal_while_drawing_pictures_or_a_second_signal_stops_at_once(capsys):
    net, calls = torch.nn.Linear(2, 2), []
    with common._StopSignal() as stop:
        with stop.interruptible():
            for i in range(1000):  # a sampler: the signal comes after the 3rd network call
                if i == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.05)
                net(torch.zeros(1, 2))
                calls.append(i)
        assert calls == [0, 1, 2] and stop.requested  # stopped at the next call; the run goes on
        assert "SIGTERM: pictures stopped" in capsys.readouterr().err
        net(torch.zeros(1, 2))  # outside the pictures, networks run as before
    with common._StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested
        for inside in (False, True):
            with pytest.raises(common._Interrupted) as e:
                with stop.interruptible() if inside else contextlib.nullcontext():
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)
            assert e.value.code == 128 + signal.SIGTERM


def test_a_second_signal_lost_in_a_finaliser_still_ends_the_process(tmp_path):
    """An exception a signal handler raises inside a finaliser (__del__, a weakref callback) is
    not propagated by Python: the unraisable hook then ends the process with the one line."""
    script = textwrap.dedent("""
        import os, signal, sys, time, common
        class Finalised:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)  # the handler runs here, inside the finaliser
        with common._StopSignal() as stop:
            stop.requested = True  # a first signal came before
            Finalised()
            time.sleep(2)
            print("went on", flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 128 + signal.SIGTERM and "went on" not in r.stdout
    assert r.stderr.strip().splitlines() == ["SIGTERM again: stopped at once; the checkpoint on disk is whole "
                                             "(continue with --resume)"]


def test_user_errors_turn_interruptions_into_one_line(capsys):
    for raised, code in [(common._Interrupted("SIGTERM again: stopped at once", 143), 143),
                         (KeyboardInterrupt(), 130)]:
        with pytest.raises(SystemExit) as e, common.user_errors():
            raise raised
        assert e.value.code == code and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_grid_title_is_drawn_above_it(tmp_path):
    x = torch.rand(8, 1, 8, 8)
    common.save_image_grid(x, tmp_path / "plain.png")
    common.save_image_grid(x, tmp_path / "titled.png", title="rows 1, 3: inputs; rows 2, 4: reconstructions")
    plain, titled = _png(tmp_path / "plain.png"), _png(tmp_path / "titled.png")
    assert titled.shape[1] == plain.shape[1] and titled.shape[0] > plain.shape[0]
    top = titled[: titled.shape[0] - plain.shape[0], :, :3]
    assert (top < 0.5).any()  # dark text on the white band
