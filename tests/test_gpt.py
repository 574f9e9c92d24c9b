"""Tests of gpt.py: each identity is checked against an independent computation."""
import dataclasses
import itertools
import json
import math

import pytest
import torch
from hypothesis import given, strategies as st

import common
import gpt
from conftest import events, torchrun


def tiny(vocab=7, block=8, n_layer=2, n_head=2, n_embd=8, dropout=0.0, seed=0, start_token=False):
    """A float64 GPT with random (non-trivial) weights, in eval mode."""
    torch.manual_seed(seed)
    m = gpt.GPT(gpt.GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block,
                              vocab_size=vocab, dropout=dropout, start_token=start_token)).double()
    with torch.no_grad():  # GPT-2's init is small; spread the weights so the logits differ a lot
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


# ---------------------------------------------------------------- attention


@given(B=st.integers(1, 2), h=st.integers(1, 3), Tk=st.integers(1, 7), d=st.integers(1, 4),
       lag=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_sdpa_attention_equals_explicit_masked_softmax(B, h, Tk, d, lag, seed):
    Tq = max(1, Tk - lag)  # covers Tq == Tk (is_causal), Tq == 1 (no mask) and the cached offset mask
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, h, Tq, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, h, Tk, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, h, Tk, d, generator=g, dtype=torch.float64)
    out = gpt.causal_attention(q, k, v)
    expect = torch.empty_like(out)
    for i in range(Tq):
        pos = Tk - Tq + i  # absolute position of query i
        for b, hh in itertools.product(range(B), range(h)):
            scores = torch.stack([q[b, hh, i] @ k[b, hh, j] / math.sqrt(d) for j in range(pos + 1)])
            w = torch.exp(scores - scores.max())
            w = w / w.sum()
            expect[b, hh, i] = sum(w[j] * v[b, hh, j] for j in range(pos + 1))
    torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- causality and the cache


@given(j=st.integers(0, 7), seed=st.integers(0, 2**16))
def test_changing_token_j_changes_no_earlier_logit(j, seed):
    m = tiny()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 7, (2, 8), generator=g)
    idx2 = idx.clone()
    idx2[:, j] = (idx[:, j] + 1 + torch.randint(0, 6, (2,), generator=g)) % 7  # a different token
    a, b = m(idx), m(idx2)
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-12)
    assert (a[:, j] - b[:, j]).abs().amax() > 1e-6  # position j itself must see the change


@given(prefill=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_cached_forward_matches_full_forward(prefill, seed):
    m = tiny()
    idx = torch.randint(0, 7, (3, 8), generator=torch.Generator().manual_seed(seed))
    full = m(idx)
    cache = m.new_cache()
    parts = [m(idx[:, :prefill], cache=cache)] + [m(idx[:, t:t + 1], cache=cache) for t in range(prefill, 8)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)
    assert cache.length == 8


@pytest.mark.parametrize("mode", [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.7, top_k=3),
                                  dict(temperature=1.3, top_p=0.8)])
@pytest.mark.parametrize("prompt_len,new", [(1, 7), (3, 20)])  # (3, 20) slides past the 8-token context
def test_cached_generation_equals_recomputation(mode, prompt_len, new):
    m = tiny()
    prompt = torch.randint(0, 7, (4, prompt_len), generator=torch.Generator().manual_seed(1))
    a = m.generate(prompt, new, use_cache=True, generator=torch.Generator().manual_seed(5), **mode)
    b = m.generate(prompt, new, use_cache=False, generator=torch.Generator().manual_seed(5), **mode)
    assert a.shape == (4, prompt_len + new)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :prompt_len], prompt)


def test_greedy_generation_past_the_context_follows_the_sliding_window():
    m = tiny(block=8)
    out = m.generate(torch.tensor([[2]]), 20, temperature=0, use_cache=True)
    start = 0  # the documented window: it jumps to keep the last block // 2 = 4 tokens once full
    for n in range(1, 21):
        if n - start > 8:
            start = n - 4
        assert out[0, n] == m(out[:, start:n])[0, -1].argmax(), n


def test_completions_keep_the_given_top_half():
    m = tiny(vocab=17, block=16, start_token=True)
    info = common.DataInfo("digits", "image", (1, 4, 4), levels=17)
    images = torch.randint(0, 17, (3, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cfg = gpt.Config(temperature=1.0)
    grid = gpt.complete_images(m.float(), cfg, info, images, 2, torch.Generator().manual_seed(0)).view(3, 4, 1, 4, 4)
    assert torch.equal(grid[:, -1], images)  # the original last
    assert torch.equal(grid[:, 0, :, :2], images[:, :, :2]) and (grid[:, 0, :, 2:] == 0).all()
    assert torch.equal(grid[:, 1:3, :, :2], images[:, None, :, :2].expand(3, 2, 1, 2, 4))  # completions


def test_greedy_generation_is_the_argmax_chain():
    m = tiny()
    idx = torch.tensor([[3]])
    out = m.generate(idx, 5, temperature=0)
    for t in range(1, 6):  # recompute each step from the full prefix, independently of generate()
        assert out[0, t] == m(out[:, :t])[0, -1].argmax()


# ---------------------------------------------------------------- likelihood


@given(seed=st.integers(0, 2**16), T=st.integers(2, 8))
def test_nll_equals_hand_summed_chain_rule(seed, T):
    m = tiny()
    idx = torch.randint(0, 7, (2, T), generator=torch.Generator().manual_seed(seed))
    by_hand = torch.zeros(2, dtype=torch.float64)
    for t in range(1, T):  # run the model on each prefix alone: no reliance on the causal mask
        p = torch.softmax(m(idx[:, :t])[:, -1], -1)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, dtype=torch.float64))
        by_hand -= torch.log(p[torch.arange(2), idx[:, t]])
    torch.testing.assert_close(m.nll(idx), by_hand, rtol=1e-10, atol=1e-10)


def test_training_loss_is_the_nll_per_token():
    m = tiny()
    idx = torch.randint(0, 7, (3, 6), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gpt.sequence_loss(m, idx) * 3 * 5, m.nll(idx).sum())


def test_nll_with_an_oracle_bigram_network():
    P = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], dtype=torch.float64)
    oracle = lambda idx: P.log()[idx]  # logits (B, T, 3) of a known Markov chain
    idx = torch.tensor([[0, 1, 1, 2], [2, 2, 0, 0]])
    expect = -torch.tensor([math.log(0.25 * 0.8 * 0.1), math.log(0.4 * 0.3 * 0.5)], dtype=torch.float64)
    torch.testing.assert_close(gpt.nll(oracle, idx), expect)


def test_likelihood_sums_to_one_over_all_sequences():
    m = tiny(vocab=3, block=3, start_token=True)  # data tokens 0..2, input-only start token 3
    seqs = torch.tensor([(3,) + s for s in itertools.product(range(3), repeat=3)])
    assert m(seqs[:, :-1]).shape[-1] == 3  # the start token is never predicted
    torch.testing.assert_close(torch.exp(-m.nll(seqs)).sum(), torch.tensor(1.0, dtype=torch.float64))


def test_points_density_integrates_to_one_and_width_term():
    bins, lim = 6, 2.0
    m = tiny(vocab=bins, block=2, start_token=True)
    w = gpt.bin_width(lim, bins)
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) * w - lim
    grid = torch.cartesian_prod(centres, centres)
    logp = gpt.points_log_prob(m, grid, lim, bins)
    torch.testing.assert_close((logp.exp() * w * w).sum(), torch.tensor(1.0, dtype=torch.float64))
    # constant within a bin: a point near the bin's corner has the centre's density
    torch.testing.assert_close(gpt.points_log_prob(m, grid + 0.49 * w, lim, bins), logp)


def test_tokens_to_points_stays_in_its_bin():
    tok = torch.randint(0, 16, (500, 2), generator=torch.Generator().manual_seed(0))
    x = gpt.tokens_to_points(tok, 4.0, 16, torch.Generator().manual_seed(1))
    assert torch.equal(gpt.point_tokens(x, 4.0, 16), tok)


@given(C=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_image_tokens_round_trip(C, seed):
    x = torch.randint(0, 256, (2, C, 3, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    q = gpt.image_levels(256, C, 0)
    assert q == (16 if C == 1 else 8)
    tok = gpt.image_tokens(x, 256, q)
    assert tok.shape == (2, 12) and tok.min() >= 0 and tok.max() < q ** C
    assert torch.equal(gpt.tokens_to_image(tok, (C, 3, 4), q), (x >> (8 - int(math.log2(q)))))
    # raster order: token 4 is row 1, column 0
    expect = sum(int(x[0, c, 1, 0]) // (256 // q) * q ** (C - 1 - c) for c in range(C))
    assert tok[0, 4] == expect


def test_digits_levels_are_kept_exactly():
    x = torch.randint(0, 17, (3, 1, 8, 8), dtype=torch.uint8)
    assert gpt.image_levels(17, 1, 0) == 17
    assert torch.equal(gpt.tokens_to_image(gpt.image_tokens(x, 17, 17), (1, 8, 8), 17), x)


def test_text_windows_predict_each_character_once():
    data = torch.arange(23)
    w = gpt.text_windows(data, 5)
    assert w.shape == (4, 6)
    assert torch.equal(w[:, 1:].flatten(), torch.arange(1, 21))  # every target once, in order
    assert torch.equal(w[1:, 0], w[:-1, -1])  # each window's context token is the previous target


def test_text_windows_for_training_are_slices_split_over_processes_and_resumable():
    info = common.DataInfo("t", "text", (), vocab=tuple("abcdefgh"))
    data = torch.randint(0, 8, (300,), generator=torch.Generator().manual_seed(0))
    ds = common._Dataset(info, "train", data)
    whole = gpt.TextWindows(ds, 6, 16, common._Dist(), seed=3)
    halves = [gpt.TextWindows(ds, 6, 16, dataclasses.replace(common._Dist(), rank=r, world_size=2), seed=3)
              for r in range(2)]
    for _ in range(3):
        x, y = next(whole)
        assert y is None and x.shape == (6, 17) and x.dtype == torch.int64
        for row in x:  # a contiguous window of the stream
            starts = [s for s in range(300 - 16) if torch.equal(data[s:s + 17], row)]
            assert starts
        assert torch.equal(torch.cat([next(h)[0] for h in halves]), x)  # the global batch, sliced
    again = gpt.TextWindows(ds, 6, 16, common._Dist(), seed=3)
    again.load_state_dict(whole.state_dict())
    assert torch.equal(next(again)[0], next(whole)[0])


# ---------------------------------------------------------------- the k-means palette (Chen et al. 2020, Sec. 3.1)


@given(N=st.integers(1, 60), K=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_palette_tokens_are_the_nearest_centres_by_brute_force(N, K, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (N, 3), generator=g).double()
    centres = 255 * torch.rand(K, 3, generator=g, dtype=torch.float64)
    tok = gpt.nearest_centre(x, centres, chunk=7)
    for n in range(N):
        d = [sum((x[n, c].item() - centres[k, c].item()) ** 2 for c in range(3)) for k in range(K)]
        assert tok[n].item() == min(range(K), key=lambda k: (d[k], k))  # the nearest, ties to the lower k


def test_fitted_palette_is_a_fixed_point_of_lloyds_step():
    g = torch.Generator().manual_seed(0)
    blobs = torch.tensor([[30.0, 30, 200], [200, 40, 40], [90, 220, 90], [240, 240, 240]], dtype=torch.float64)
    x = (blobs[torch.randint(0, 4, (400,), generator=g)] + 25 * torch.randn(400, 3, generator=g)).round().clamp(0, 255)
    centres = gpt.fit_palette(x, 6, torch.Generator().manual_seed(1))
    assert centres.shape == (6, 3) and len(torch.unique(centres, dim=0)) == 6
    again, a = gpt.lloyd_step(x, centres)
    assert torch.equal(again, centres)  # bit for bit: Lloyd's step moves nothing
    for k in range(6):  # each centre the mean of its colours, which are nearer to it than to any other
        torch.testing.assert_close(centres[k], x[a == k].mean(0), rtol=1e-12, atol=1e-9)
    d = torch.cdist(x, centres)
    assert (d.gather(1, a[:, None])[:, 0] <= d.min(1).values + 1e-9).all()
    torch.testing.assert_close(gpt.fit_palette(x, 6, torch.Generator().manual_seed(1)), centres, rtol=0, atol=0)
    with pytest.raises(ValueError):
        gpt.fit_palette(torch.zeros(10, 3), 2)  # one colour cannot make two centres


def test_palette_token_to_colour_to_token_round_trips():
    g = torch.Generator().manual_seed(0)
    centres = gpt.fit_palette(torch.randint(0, 256, (500, 3), generator=g), 32, g)
    tok = torch.randint(0, 32, (4, 12), generator=g)
    colours = centres[tok].permute(0, 2, 1).reshape(4, 3, 3, 4)  # each pixel its centre's colour
    assert torch.equal(gpt.palette_tokens(colours, centres), tok)
    pictures = gpt.palette_image(tok, centres, (3, 3, 4))  # and rounded to levels, for pictures
    assert pictures.dtype == torch.uint8
    assert torch.equal(pictures.double(), colours.round())
    # images -> tokens: raster order, each pixel's nearest centre
    img = torch.randint(0, 256, (2, 3, 3, 4), generator=g, dtype=torch.uint8)
    tok = gpt.palette_tokens(img, centres)
    assert tok.shape == (2, 12) and tok[1, 5] == gpt.nearest_centre(img[1, :, 1, 1].double()[None], centres)[0]


@pytest.fixture
def colour_set(monkeypatch):
    """gpt.load_dataset serves a made-up 3-channel 8-bit set of cifar10's kind (no download)."""
    g = torch.Generator().manual_seed(0)
    info = common.DataInfo("cifar10", "image", (3, 4, 4), levels=256, num_classes=10)
    sets = {split: common._Dataset(info, split, torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8),
                                  torch.zeros(n, dtype=torch.long)) for split, n in (("train", 64), ("test", 6))}
    monkeypatch.setattr(gpt, "load_dataset", lambda name, split="train", root=None: sets[split])
    return sets


def test_cli_kmeans_palette_reports_the_tokens_nll(tmp_path, colour_set):
    """--palette kmeans on a 3-channel 8-bit set (cifar10's kind, made up here): the palette is
    fitted with the seed and stored in the checkpoint; --eval and --sample need no flag repeated;
    the eval's nll is the palette tokens' chain rule, recomputed by hand, and says so."""
    out = tmp_path / "run"
    gpt.main(["--dataset", "cifar10", "--palette", "kmeans", "--palette-size", "16", "--steps", "2",
              "--out", str(out), *TINY])
    lines = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert all("bits_per_dim" not in r and r["bits_per_token"] == pytest.approx(r["loss"] / math.log(2))
               for r in lines)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    sets = colour_set
    pixels = sets["train"].data.permute(0, 2, 3, 1).reshape(-1, 3)  # 1024 pixels: all of them fitted
    assert torch.equal(ckpt["palette"]["centres"], gpt.fit_palette(pixels, 16, torch.Generator().manual_seed(0)))
    gpt.main(["--eval", str(out / "ckpt.pt")])
    ev = events(out, "eval")[-1]
    assert ev["palette"] == 16 and "not comparable with bits/dim" in ev["likelihood"] and "bits_per_dim" not in ev
    net, cfg, _ = gpt.load(out / "ckpt.pt")
    centres = gpt.load_palette(out / "ckpt.pt")
    assert cfg.palette == "kmeans" and net.config.vocab_size == 16 and torch.equal(centres, ckpt["palette"]["centres"])
    nats = 0.0
    with torch.no_grad():
        for img in sets["test"].data:
            seq = [16] + [int(gpt.nearest_centre(img[:, i, j].double()[None], centres)[0])
                          for i in range(4) for j in range(4)]  # start token, raster order
            seq = torch.tensor([seq])
            nats -= sum(torch.log_softmax(net(seq[:, :t])[0, -1].double(), -1)[seq[0, t]].item() for t in range(1, 17))
    assert ev["nll"] == pytest.approx(nats / 6, rel=1e-5)
    assert ev["bits_per_token"] == pytest.approx(nats / 6 / (16 * math.log(2)), rel=1e-5)
    gpt.main(["--sample", str(out / "ckpt.pt"), "--n-samples", "3", "--out", str(tmp_path / "s")])
    x = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    assert x.shape == (3, 3, 4, 4) and x.dtype == torch.uint8
    palette_colours = {tuple(c) for c in centres.round().long().tolist()}
    assert {tuple(p) for p in x.permute(0, 2, 3, 1).reshape(-1, 3).long().tolist()} <= palette_colours


# ---------------------------------------------------------------- sampling filters


# distinct logits a tenth apart: no ties, so "the k most probable" and "the smallest set" are unique
logit_rows = st.lists(st.integers(-50, 50), min_size=2, max_size=12, unique=True).map(lambda r: [v / 10 for v in r])


@given(row=logit_rows, k=st.integers(1, 14))
def test_top_k_keeps_exactly_the_k_largest(row, k):
    logits = torch.tensor(row, dtype=torch.float64)
    kept = torch.isfinite(gpt.top_k_filter(logits, k))
    assert kept.sum() == min(k, len(row))
    assert kept[logits.argmax()]
    if not kept.all():
        assert logits[kept].min() > logits[~kept].max()


@given(row=logit_rows, p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_set_reaching_p(row, p):
    logits = torch.tensor(row, dtype=torch.float64)
    probs = logits.softmax(-1)
    kept = torch.isfinite(gpt.top_p_filter(logits, p))
    assert kept[logits.argmax()]
    assert probs[kept].sum() >= p - 1e-12
    if not kept.all():
        assert probs[kept].min() > probs[~kept].max()  # the most probable tokens
    # smallest: without its least probable member the set falls short of p
    assert probs[kept].sum() - probs[kept].min() < p + 1e-12


def test_sampling_frequencies_match_the_filtered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]], dtype=torch.float64)
    n = 20000
    draws = gpt.sample_next(logits.expand(n, -1), temperature=0.8, top_k=4,
                            generator=torch.Generator().manual_seed(0)).squeeze(1)
    p = torch.softmax(logits[0, :4] / 0.8, -1)
    freq = torch.bincount(draws, minlength=5).double() / n
    assert freq[4] == 0
    se = (p * (1 - p) / n).sqrt()
    assert ((freq[:4] - p).abs() < 5 * se).all()
    assert torch.equal(gpt.sample_next(logits, temperature=0), torch.tensor([[0]]))


# ---------------------------------------------------------------- presets and training pieces


def test_gpt2_architecture_has_124_439_808_parameters():
    with torch.device("meta"):
        m = gpt.GPT(gpt.GPTConfig(**gpt.ARCHS["gpt2"], vocab_size=gpt.GPT2_VOCAB))
    assert sum(p.numel() for p in m.parameters()) == 124_439_808
    assert m.config.n_layer == 12 and m.config.n_embd == 768 and m.config.block_size == 1024


def test_residual_projections_are_scaled_at_init():
    torch.manual_seed(0)
    m = gpt.GPT(gpt.GPTConfig(n_layer=8, n_head=4, n_embd=128, block_size=16, vocab_size=50))
    std = 0.02 / math.sqrt(16)
    for name, p in m.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() - std) < 0.05 * std
        elif name.endswith("c_fc.weight"):
            assert abs(p.std().item() - 0.02) < 0.05 * 0.02


def test_weight_decay_only_on_matrices():
    m = tiny()
    opt = gpt.configure_optimizer(m, 1e-3, (0.9, 0.99), weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_learning_rate_schedule():
    cfg = gpt.Config(lr=1e-3, min_lr=1e-4, warmup=10, steps=110)
    lr = lambda step: gpt.learning_rate(step, cfg)
    assert lr(0) == pytest.approx(1e-4)
    assert lr(9) == pytest.approx(1e-3)
    assert lr(10) == pytest.approx(1e-3)
    assert lr(60) == pytest.approx(5.5e-4)  # half-way down the cosine
    assert lr(110) == pytest.approx(1e-4)


# ---------------------------------------------------------------- the command line

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--batch-size", "8", "--log-every", "1",
        "--n-samples", "4", "--warmup", "2"]


def test_cli_digits_train_eval_sample(tmp_path):
    out = tmp_path / "run"
    gpt.main(["--steps", "3", "--out", str(out), *TINY])
    for name in ("ckpt.pt", "samples_3.png", "completion_3.png", "metrics.jsonl", "loss.png"):
        assert (out / name).exists(), name
    gpt.main(["--eval", str(out / "ckpt.pt")])
    ev = events(out, "eval")[-1]
    assert ev["n"] == 300 and ev["levels"] == 17
    assert ev["bits_per_dim"] == pytest.approx(ev["nll"] / (64 * math.log(2)))
    # three steps from a small init: still close to the uniform 64 log 17 nats, and not above it by much
    assert abs(ev["nll"] - 64 * math.log(17)) < 0.1 * 64 * math.log(17)
    gpt.main(["--sample", str(out / "ckpt.pt"), "--n-samples", "3", "--out", str(tmp_path / "s"), "--top-k", "5"])
    assert (tmp_path / "s" / "samples.png").exists() and (tmp_path / "s" / "completion.png").exists()
    assert torch.load(tmp_path / "s" / "samples.pt", weights_only=True).shape == (3, 1, 8, 8)
    assert events(tmp_path / "s", "sample")[-1]["n"] == 3


def test_cli_text_file(tmp_path, capsys):
    txt = tmp_path / "tiny.txt"
    txt.write_text("to be or not to be, that is the question. " * 30)
    out = tmp_path / "run"
    gpt.main(["--dataset", str(txt), "--steps", "3", "--out", str(out), "--block-size", "16",
              "--sample-len", "20", "--prompt", "to", *TINY])
    samples = (out / "samples_3.txt").read_text().split("\n\n---\n\n")
    assert len(samples) == 4 and all(len(s) == 22 and s.startswith("to") for s in samples)
    assert samples[0] in capsys.readouterr().out  # printed as well
    gpt.main(["--eval", str(out / "ckpt.pt")])
    ev = events(out, "eval")[-1]
    n_test = len(txt.read_text()) - int(0.9 * len(txt.read_text()))
    assert ev["characters"] == (n_test - 1) // 16 * 16 and ev["context"] == 16
    assert ev["bits_per_char"] == pytest.approx(ev["nll"] / math.log(2))
    # the value (issue 16): -log p of every predicted character, recomputed from the network's
    # logits one character at a time from the start of its window, over the characters predicted
    # (a window's first character is context, not a prediction)
    net, _, info = gpt.load(out / "ckpt.pt")
    text = txt.read_text()
    ids = torch.tensor([info.vocab.index(c) for c in text[int(0.9 * len(text)):]])
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range((len(ids) - 1) // 16):
            for t in range(16 * k + 1, 16 * k + 17):
                total -= torch.log_softmax(net(ids[None, 16 * k:t])[0, -1].double(), -1)[ids[t]].item()
                count += 1
    assert ev["characters"] == count and ev["nll"] == pytest.approx(total / count, rel=1e-5)
    with pytest.raises(SystemExit) as e:
        gpt.main(["--sample", str(out / "ckpt.pt"), "--prompt", "Z"])  # Z is not in the vocabulary
    assert e.value.code == 2 and "--prompt" in capsys.readouterr().err


def test_cli_points_density(tmp_path):
    out = tmp_path / "run"
    gpt.main(["--dataset", "8gaussians", "--steps", "3", "--out", str(out), "--bins", "32", *TINY])
    assert (out / "samples_3.png").exists()
    gpt.main(["--eval", str(out / "ckpt.pt")])
    ev = events(out, "eval")[-1]
    assert ev["discrete_nll"] == pytest.approx(ev["nll"] - 2 * math.log(8 / 32))
    import numpy as np
    d = np.load(out / "density.npz")
    assert d["log_density"].shape == (128, 128) and float(d["lim"]) == 4.0
    # 32 bins of the square hold 4 x 4 grid cells each: the grid sum integrates the density exactly
    assert np.exp(d["log_density"]).sum() * (8 / 128) ** 2 == pytest.approx(1.0, abs=1e-4)
    assert (out / "density.png").exists()


def test_resume_equals_uninterrupted_training_on_text(tmp_path):
    """The text windows' stream (TextWindows) and the dropout's random state are restored too;
    tests/test_cli.py's resume test runs on 2D points without dropout."""
    txt = tmp_path / "tiny.txt"
    txt.write_text("to be or not to be, that is the question. " * 30)
    flags = [*TINY, "--dataset", str(txt), "--block-size", "16", "--dropout", "0.1", "--decay-steps", "6",
             "--sample-len", "5", "--prompt", "to", "--save-every", "3"]
    gpt.main(["--steps", "6", "--out", str(tmp_path / "a"), *flags])
    gpt.main(["--steps", "3", "--out", str(tmp_path / "b"), *flags])
    half = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    gpt.main(["--steps", "6", "--out", str(tmp_path / "b"), "--resume", *flags])
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert half["step"] == 3 and a["step"] == b["step"] == 6
    assert not torch.equal(half["model"]["wte.weight"], b["model"]["wte.weight"])  # it did train on
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["batches"]["generator"], b["batches"]["generator"])


@pytest.mark.parametrize("argv,flag", [(["--n-embd", "10", "--n-head", "4"], "--n-head"),
                                       (["--top-p", "0"], "--top-p"), (["--bins", "1"], "--bins"),
                                       (["--dataset", "cifar10", "--image-bits", "6"], "--image-bits"),
                                       (["--palette", "kmeans"], "--palette kmeans"),
                                       (["--dataset", "8gaussians", "--palette", "kmeans"], "--palette kmeans"),
                                       (["--palette", "kmeans", "--image-bits", "3"], "--image-bits"),
                                       (["--palette", "kmeans", "--palette-size", "1"], "--palette-size"),
                                       (["--palette-size", "64"], "--palette-size")])
def test_user_errors_are_one_line(tmp_path, capsys, argv, flag, monkeypatch):
    if flag == "--image-bits":  # no download: a tiny 8-bit colour set in place of cifar10
        fake = common._Dataset(common.DataInfo("cifar10", "image", (3, 2, 2), levels=256, num_classes=10), "train",
                              torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
        monkeypatch.setattr(gpt, "load_dataset", lambda *a, **k: fake)
    with pytest.raises(SystemExit) as e:
        gpt.main([*argv, "--steps", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and flag in err and err.startswith("error")


def test_amp_training_runs(tmp_path):
    out = tmp_path / "run"
    gpt.main(["--steps", "2", "--out", str(out), "--amp", *TINY])
    assert all(math.isfinite(r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if "loss" in r)


def test_two_processes_train_like_one(tmp_path):
    flags = ["--steps", "2", *TINY]
    run = torchrun("gpt", ["--out", tmp_path / "ddp", *flags])
    assert run.returncode == 0, run.stderr[-2000:]
    gpt.main(["--out", str(tmp_path / "one"), *flags, "--device", "cpu"])
    a = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    for k in a:  # the same global batch, averaged gradients: equal up to float32 summation order
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_colour_bits_per_dim_divides_by_every_sub_pixel(tmp_path, colour_set):
    """A 3-channel 8-bit set (cifar10's kind, made up here: no download). The eval's nll is the chain
    rule recomputed by hand from the network's logits on tokens built here, and bits/dim divides it
    by C*H*W (issue 16: H*W made cifar10's bits/dim 3x too high); the training lines too."""
    out = tmp_path / "run"
    gpt.main(["--dataset", "cifar10", "--steps", "2", "--out", str(out), *TINY])
    lines = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(lines) == 2 and all(r["bits_per_dim"] == pytest.approx(r["loss"] / (3 * math.log(2))) for r in lines)
    gpt.main(["--eval", str(out / "ckpt.pt")])
    ev = events(out, "eval")[-1]
    assert ev["levels"] == 8 and ev["n"] == 6
    net = gpt.load(out / "ckpt.pt")[0].double()
    q = colour_set["test"].data.long() >> 5  # the top 3 bits of each channel: 8^3 = 512 colours
    per_image = []
    with torch.no_grad():
        for img in q:
            seq = torch.tensor([[512] + [int(img[0, i, j]) * 64 + int(img[1, i, j]) * 8 + int(img[2, i, j])
                                         for i in range(4) for j in range(4)]])  # start token, raster order
            per_image.append(-sum(torch.log_softmax(net(seq[:, :t])[0, -1], -1)[seq[0, t]].item()
                                  for t in range(1, 17)))
    nats = sum(per_image) / len(per_image)
    assert ev["nll"] == pytest.approx(nats, rel=1e-5)
    assert ev["bits_per_dim"] == pytest.approx(nats / (3 * 4 * 4 * math.log(2)), rel=1e-5)


def test_arch_gpt2_is_usable_and_help_lists_only_usable_presets(monkeypatch, capsys):
    """Issue 16: --help listed a gpt2 preset that --dataset refused. Now --arch gpt2 lays GPT-2
    small's shape over the dataset's preset (the flags typed still win), and every preset --help
    lists is a dataset --dataset accepts or a kind of data."""
    monkeypatch.setattr(gpt, "dispatch", lambda cfg, *commands: cfg)  # the configuration main would run
    cfg = gpt.main(["--dataset", "shakespeare", "--arch", "gpt2"])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.dropout) == (12, 12, 768, 1024, 0.0)
    assert (cfg.batch_size, cfg.steps, cfg.n_samples) == (64, 5000, 2)  # the dataset's preset beneath it
    info = common.DataInfo("bpe", "text", (), vocab=tuple(map(chr, range(gpt.GPT2_VOCAB))))
    with torch.device("meta"):
        net = gpt.build(cfg, info)
    assert sum(p.numel() for p in net.parameters()) == 124_439_808  # GPT-2 small
    cfg = gpt.main(["--arch", "gpt2", "--n-layer", "2", "--dropout", "0.1"])  # digits: its preset sets steps only
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout) == (2, 12, 768, 0.1)
    assert gpt.main(["--dataset", "shakespeare"]).n_layer == 6 and gpt.main([]).n_layer == 4
    for name in gpt.PRESETS:
        if name not in ("image", "points", "text"):
            assert gpt.main(["--dataset", name]).dataset == name
    capsys.readouterr()
    with pytest.raises(SystemExit):
        gpt.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--arch ARCH" in help_text and "gpt2 is GPT-2 small's shape" in help_text
    assert "gpt2:" not in help_text.split("presets (applied by --dataset")[1].split("presets with --arch")[0]


def test_completion_grid_says_which_columns_are_which(tmp_path, monkeypatch):
    """Issue 16: a grid that mixes kinds of pictures (the given top halves, the completions, the
    originals) says which is which in its title; a grid of samples alone needs none."""
    titles = {}
    monkeypatch.setattr(gpt, "save_image_grid", lambda x, path, levels=None, nrow=None, title=None:
                        titles.__setitem__(path.name, (title, nrow)))
    info = common.DataInfo("digits", "image", (1, 4, 4), levels=17)
    test = common._Dataset(info, "test", torch.randint(0, 17, (8, 1, 4, 4), dtype=torch.uint8))
    net = tiny(vocab=17, block=16, start_token=True).float()
    gpt.write_samples(net, gpt.Config(n_samples=2), info, tmp_path, 7, common.Logger(tmp_path, 0), test)
    assert titles["samples_7.png"] == (None, None)
    title, nrow = titles["completion_7.png"]
    assert nrow == 6 and all(w in title for w in ("each row", "top half given", "4 samples of the bottom half",
                                                  "original"))
    assert title.index("given") < title.index("samples") < title.index("original")  # left to right


def test_mathematics_runs_without_common(without_common):
    """The mathematics and the network, with common.py replaced by a module whose every name fails."""
    m = without_common("gpt")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    # images: 4 levels, 2 x 4 pixels -> 8 tokens after the start token (id 4)
    net = m.GPT(m.GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=4, start_token=True)).double()
    x = torch.randint(0, 4, (3, 1, 2, 4), generator=g, dtype=torch.uint8)
    assert m.image_levels(4, 1, 0) == 4
    seq = m.with_start(m.image_tokens(x, 4, 4), 4)
    assert torch.equal(m.tokens_to_image(seq[:, 1:], (1, 2, 4), 4), x)
    logits = net(seq[:, :-1])
    assert logits.shape == (3, 8, 4)
    cache = net.new_cache()
    stepwise = torch.cat([net(seq[:, t:t + 1], cache=cache) for t in range(8)], 1)
    torch.testing.assert_close(stepwise, logits)
    nll = m.nll(net, seq)
    torch.testing.assert_close(net.nll(seq), nll)
    torch.testing.assert_close(m.sequence_loss(net, seq) * 3 * 8, nll.sum())
    torch.testing.assert_close(m.dataset_nll(net, seq, batch_size=2), nll.detach())
    assert m.bits_per_dim(nll.mean().item(), 8) == pytest.approx(nll.mean().item() / (8 * math.log(2)))
    start = torch.full((5, 1), 4)
    for mode in (dict(temperature=0), dict(temperature=0.9, top_k=3, top_p=0.8)):
        a = net.generate(start, 8, use_cache=True, generator=torch.Generator().manual_seed(1), **mode)
        b = m.generate(net, start, 8, use_cache=False, generator=torch.Generator().manual_seed(1), **mode)
        assert a.shape == (5, 9) and torch.equal(a, b) and a[:, 1:].max() < 4
    # 2D points: two bin tokens; the piecewise-uniform density integrates to one
    pts = m.GPT(m.GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=2, vocab_size=4, start_token=True)).double()
    w = m.bin_width(2.0, 4)
    centres = (torch.arange(4, dtype=torch.float64) + 0.5) * w - 2.0
    logp = m.points_log_prob(pts, torch.cartesian_prod(centres, centres), 2.0, 4)
    torch.testing.assert_close((logp.exp() * w * w).sum(), torch.tensor(1.0, dtype=torch.float64))
    tok = m.point_tokens(m.tokens_to_points(torch.tensor([[0, 3], [2, 1]]), 2.0, 4, g), 2.0, 4)
    assert torch.equal(tok, torch.tensor([[0, 3], [2, 1]]))
    # text windows, the filters, and a training step with the optimiser and its schedule
    assert m.text_windows(torch.arange(11), 5).shape == (2, 6)
    row = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert torch.isfinite(m.top_k_filter(row, 2)).tolist() == [False, True, True, False]
    assert torch.isfinite(m.top_p_filter(row, 0.5)).tolist() == [False, True, False, False]
    assert m.sample_next(row[None], temperature=0).item() == 1
    opt = m.configure_optimizer(net, 5e-3, (0.9, 0.99), 0.1)
    before = m.sequence_loss(net, seq)
    before.backward()
    opt.step()
    assert m.sequence_loss(net, seq) < before
    with pytest.raises(ValueError):
        m.image_levels(256, 3, 6)  # 18 bits a pixel: too many colours for one token
