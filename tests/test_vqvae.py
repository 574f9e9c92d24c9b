"""Tests of vqvae.py: each identity of the mathematics against an independent computation
(brute force, autograd, enumeration, closed forms, Monte Carlo with a fixed seed), an exact
oracle for Gaussian-mixture data, and the command line end to end."""
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

import common
import vqvae
from conftest import events, run_main, torchrun
from vqvae import (CodePrior, ConvDecoder, ConvEncoder, HierarchicalPrior, PointDecoder, PointEncoder, VQVAE, VQVAE2,
                   codebook_statistics, decoder_log_prob, ema_codebook_update, exact_log_likelihood,
                   hierarchical_exact_log_likelihood, hierarchical_nll_bound, nll_bound, perplexity, prior_nll,
                   quantize, random_encoder_outputs, restart_dead_codes, sample_codes, update_unused, vqvae_loss)

f64 = torch.float64


def toy_images(K=4, side=2, levels=3, hidden=8, D=3, ema=False, seed=0):
    """A float64 VQ-VAE of 1 x side x side images with one stride-2 convolution (a code map of
    side/2 x side/2), random weights and a spread-out random codebook."""
    torch.manual_seed(seed)
    m = VQVAE(ConvEncoder(1, hidden, 1, 1, D), ConvDecoder(1, levels, hidden, 1, 1, D), K, D, ema=ema,
              restart_after=0).double()
    with torch.no_grad():
        m.codebook.copy_(torch.randn(K, D, dtype=f64))
    return m


def toy_prior(K, L, seed=1):
    torch.manual_seed(seed)
    p = CodePrior(K, L, layers=2, heads=2, width=8, dropout=0.0).double()
    with torch.no_grad():  # spread the weights so the conditionals differ a lot
        for q in p.parameters():
            q.add_(0.3 * torch.randn_like(q))
    return p.eval()


# ---------------------------------------------------------------------------- quantisation

@given(seed=st.integers(0, 2**16), D=st.integers(1, 4), K=st.integers(1, 6),
       shape=st.sampled_from([(5,), (2, 3), (2, 2, 2)]), chunk=st.sampled_from([1, 7, 2**22]))
def test_quantize_is_the_brute_force_nearest_code_with_ties_to_the_lowest_index(seed, D, K, shape, chunk):
    g = torch.Generator().manual_seed(seed)
    # small integers: exact distances, frequent ties (equidistant codes and duplicated codes)
    codebook = torch.randint(-2, 3, (K, D), generator=g).float()
    if K > 1:
        codebook[-1] = codebook[0]
    z = torch.randint(-3, 4, (*shape, D), generator=g).float()
    codes, z_q, z_st = quantize(z, codebook, chunk=chunk)
    flat, expect = z.reshape(-1, D).numpy().astype(np.int64), []
    for v in flat:
        d = [int(((v - c) ** 2).sum()) for c in codebook.numpy().astype(np.int64)]
        expect.append(d.index(min(d)))  # the first minimal index
    assert codes.shape == shape and codes.reshape(-1).tolist() == expect
    assert torch.equal(z_q, codebook[codes]) and torch.equal(z_st, z_q)


def test_straight_through_value_is_z_q_and_its_gradient_reaches_z_e_unchanged():
    g = torch.Generator().manual_seed(0)
    z_e = torch.randn(4, 3, 5, generator=g, dtype=f64, requires_grad=True)
    codebook = torch.randn(7, 5, generator=g, dtype=f64, requires_grad=True)
    codes, z_q, z_st = quantize(z_e, codebook)
    assert torch.equal(z_st, z_q)  # exactly, not up to rounding
    w = torch.randn(4, 3, 5, generator=g, dtype=f64)

    def f(v):
        return (torch.sin(v) * w).sum() + (v ** 2).sum()
    grad_z_e, grad_codebook = torch.autograd.grad(f(z_st), (z_e, codebook), allow_unused=True)
    z_q_leaf = z_q.detach().requires_grad_(True)
    grad_z_q, = torch.autograd.grad(f(z_q_leaf), z_q_leaf)
    assert torch.equal(grad_z_e, grad_z_q)  # the decoder-input gradient copied to the encoder
    assert grad_codebook is None or not grad_codebook.any()  # and nothing reaches the codebook this way


def _grads(term, params):
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def test_codebook_term_moves_only_the_codebook_and_commitment_only_the_encoder():
    m = toy_images(K=5, side=4)
    x = torch.randint(0, 3, (6, 1, 4, 4))
    terms = vqvae_loss(m, x.double() - 1, x, beta=0.25, codebook_loss=True, levels=3)
    book, enc, dec = [m.codebook], list(m.encoder.parameters()), list(m.decoder.parameters())
    for name, term, moves, still in [("codebook", terms["codebook"], [book], [enc, dec]),
                                     ("commitment", terms["commitment"], [enc], [book, dec]),
                                     ("reconstruction", terms["recon"], [enc, dec], [book])]:
        for group in still:  # autograd: exactly zero
            assert all(not g.any() for g in _grads(term.sum(), group)), f"{name} moves what it must not"
        for group in moves:
            assert any(g.any() for g in _grads(term.sum(), group)), f"{name} does not move what it should"


def test_the_loss_is_eq_3_term_by_term():
    m = toy_images(K=5, side=4)
    x = torch.randint(0, 3, (6, 1, 4, 4))
    out, z_e, z_q, codes = m(x.double() - 1)
    recon = -torch.stack([torch.distributions.Categorical(logits=out[i].permute(0, 2, 3, 1)).log_prob(
        x[i].long()).sum() for i in range(6)])
    dist2 = ((z_e - m.codebook[codes]) ** 2).reshape(6, -1).sum(1)
    for codebook_loss, expect in [(True, recon + 1.25 * dist2), (False, recon + 0.25 * dist2)]:
        terms = vqvae_loss(m, x.double() - 1, x, 0.25, codebook_loss, levels=3)
        torch.testing.assert_close(terms["loss"], expect, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(terms["recon"], recon, rtol=1e-12, atol=1e-10)


def test_decoder_likelihoods_are_normalised():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1, 3, 2, 2, generator=g, dtype=f64)  # 3 levels, 2x2 image: 81 images
    images = torch.tensor(list(itertools.product(range(3), repeat=4))).reshape(81, 1, 2, 2)
    total = decoder_log_prob(images, logits.expand(81, -1, -1, -1, -1), levels=3).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-12)
    x = torch.randn(5, 2, generator=g, dtype=f64)
    out = torch.randn(5, 4, generator=g, dtype=f64)
    expect = stats.norm.logpdf(x.numpy(), out[:, :2].numpy(), np.exp(out[:, 2:].numpy())).sum(1)
    np.testing.assert_allclose(decoder_log_prob(x, out).numpy(), expect, rtol=1e-12)


# ---------------------------------------------------------------------------- EMA codebook, dead codes

@given(seed=st.integers(0, 2**16), K=st.integers(1, 6), D=st.integers(1, 3), N=st.integers(1, 30))
def test_codebook_statistics_count_and_sum_the_assigned_outputs(seed, K, D, N):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, D, generator=g, dtype=f64)
    codes = torch.randint(K, (N,), generator=g)
    counts, sums = codebook_statistics(z, codes, K)
    for k in range(K):
        assert counts[k] == (codes == k).sum()
        torch.testing.assert_close(sums[k], z[codes == k].sum(0), rtol=1e-12, atol=1e-12)


@given(seed=st.integers(0, 2**16), K=st.integers(2, 6), D=st.integers(1, 3))
def test_ema_with_decay_zero_puts_each_used_code_at_the_mean_of_its_outputs(seed, K, D):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(20, D, generator=g, dtype=f64)
    codes = torch.randint(K - 1, (20,), generator=g)  # code K-1 is never used
    old = torch.randn(K, D, generator=g, dtype=f64)
    size, total, new = ema_codebook_update(old, torch.rand(K, generator=g, dtype=f64), torch.randn(K, D, dtype=f64),
                                           *codebook_statistics(z, codes, K), decay=0.0, eps=0.0)
    for k in range(K):
        if (codes == k).any():
            torch.testing.assert_close(new[k], z[codes == k].mean(0), rtol=1e-12, atol=1e-12)
        else:
            assert torch.equal(new[k], old[k])  # eps = 0: an empty cluster keeps its vector


@given(seed=st.integers(0, 2**16), decay=st.floats(0.0, 0.999), eps=st.floats(1e-6, 1.0), T=st.integers(1, 5))
def test_ema_cluster_sizes_and_sums_follow_their_recurrence_and_smoothing(seed, decay, eps, T):
    g = torch.Generator().manual_seed(seed)
    K, D = 4, 2
    size0, sum0 = torch.rand(K, generator=g, dtype=f64) * 3, torch.randn(K, D, generator=g, dtype=f64)
    size, total, book = size0, sum0, torch.zeros(K, D, dtype=f64)
    n_t, s_t = [], []
    for _ in range(T):
        n_t.append(torch.randint(0, 5, (K,), generator=g).to(f64))
        s_t.append(torch.randn(K, D, generator=g, dtype=f64))
        size, total, book = ema_codebook_update(book, size, total, n_t[-1], s_t[-1], decay, eps)
    # closed form of N_i^(T) = gamma N_i^(T-1) + (1 - gamma) n_i^(T), and of m_i likewise
    expect_n = decay ** T * size0 + sum((1 - decay) * decay ** (T - 1 - t) * n_t[t] for t in range(T))
    expect_m = decay ** T * sum0 + sum((1 - decay) * decay ** (T - 1 - t) * s_t[t] for t in range(T))
    torch.testing.assert_close(size, expect_n, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(total, expect_m, rtol=1e-10, atol=1e-12)
    n = expect_n.sum()
    smoothed = (expect_n + eps) / (n + K * eps) * n
    assert smoothed.sum().item() == pytest.approx(n.item(), rel=1e-12)
    torch.testing.assert_close(book, expect_m / smoothed[:, None], rtol=1e-10, atol=1e-12)


def test_restart_reseeds_exactly_the_dead_codes():
    g = torch.Generator().manual_seed(0)
    K, D, patience = 6, 3, 4
    book, cand = torch.randn(K, D, generator=g), torch.randn(K, D, generator=g)
    size, total = torch.rand(K, generator=g) + 0.5, torch.randn(K, D, generator=g)
    unused = torch.tensor([0, 5, 3, 4, 1, 9])
    unused = update_unused(unused, torch.tensor([2.0, 0, 0, 0, 1, 0]))  # used codes reset, the others one older
    assert unused.tolist() == [0, 6, 4, 5, 0, 10]
    new_book, new_size, new_total, new_unused, dead = restart_dead_codes(book, size, total, unused, cand, patience)
    assert dead.tolist() == [False, True, True, True, False, True]
    for k in range(K):
        if dead[k]:
            assert torch.equal(new_book[k], cand[k]) and torch.equal(new_total[k], cand[k])
            assert new_size[k] == 1 and new_unused[k] == 0
        else:
            assert torch.equal(new_book[k], book[k]) and torch.equal(new_total[k], total[k])
            assert new_size[k] == size[k] and new_unused[k] == unused[k]


def test_restart_candidates_are_distinct_encoder_outputs():
    z = torch.arange(30.0).reshape(2, 5, 3)  # 10 distinct rows
    rows = random_encoder_outputs(z, 7, torch.Generator().manual_seed(0))
    flat = [tuple(r) for r in z.reshape(-1, 3).tolist()]
    assert len({tuple(r) for r in rows.tolist()}) == 7 and all(tuple(r) in flat for r in rows.tolist())
    assert random_encoder_outputs(z, 25).shape == (25, 3)  # more than there are rows: with replacement


def test_first_step_seeds_the_codes_the_first_batch_left_unused():
    torch.manual_seed(0)
    m = VQVAE(PointEncoder(2, 8, 2), PointDecoder(2, 8, 2), 16, 2, ema=True, restart_after=5)
    x = torch.randn(64, 2)
    terms = vqvae_loss(m, x, x)
    counts, sums = codebook_statistics(terms["z_e"], terms["codes"], 16)
    restarted = m.update_codebook(counts, sums, random_encoder_outputs(terms["z_e"], 16))
    assert restarted == int((counts == 0).sum()) > 0
    z = terms["z_e"].detach().reshape(-1, 2)
    for k in torch.nonzero(counts == 0).flatten():  # each re-seeded at an encoder output of the batch
        assert (m.codebook[k] == z).all(1).any()


def test_perplexity_is_k_for_uniform_use_one_for_one_code_and_the_formula_otherwise():
    assert perplexity(torch.full((7,), 3.0)).item() == pytest.approx(7.0, rel=1e-12)
    assert perplexity(torch.tensor([0.0, 5.0, 0.0])).item() == 1.0
    counts = torch.tensor([1.0, 0.0, 2.0, 7.0], dtype=f64)
    assert perplexity(counts).item() == pytest.approx(math.exp(stats.entropy(counts.numpy())), rel=1e-12)


# ---------------------------------------------------------------------------- the prior

@pytest.mark.parametrize("t", range(6))
def test_prior_is_causal_by_autograd(t):
    p = toy_prior(K=5, L=6)
    kept = {}

    def keep(module, inputs, output):  # the token embeddings become the leaves to differentiate by
        kept["emb"] = output.detach().requires_grad_(True)
        return kept["emb"]
    handle = p.tok.register_forward_hook(keep)
    idx = torch.randint(0, 6, (3, 6), generator=torch.Generator().manual_seed(t))
    logits = p(idx)
    handle.remove()
    grad, = torch.autograd.grad(logits[:, t].sum(), kept["emb"])
    assert not grad[:, t + 1:].any()  # no later position reaches position t
    assert (grad[:, :t + 1].abs().sum(-1) > 0).all()  # every earlier one does


def test_prior_is_normalised_over_all_code_maps_and_is_the_chain_rule():
    K, L = 3, 4
    p = toy_prior(K, L)
    maps = torch.tensor(list(itertools.product(range(K), repeat=L)))
    with torch.no_grad():
        nll = prior_nll(p, maps, K)
    assert nll.neg().exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    with torch.no_grad():  # one prefix at a time, each conditional from its own call
        for z, value in zip(maps[:10], nll[:10]):
            seq, total = torch.tensor([[K]]), 0.0
            for code in z:
                total -= torch.log_softmax(p(seq)[0, -1], -1)[code].item()
                seq = torch.cat([seq, code.reshape(1, 1)], 1)
            assert value.item() == pytest.approx(total, rel=1e-12)


def test_prior_samples_follow_its_probabilities():
    K, L, n = 3, 2, 20000
    p = toy_prior(K, L).float()
    maps = torch.tensor(list(itertools.product(range(K), repeat=L)))
    with torch.no_grad():
        prob = prior_nll(p, maps, K).neg().exp().double()
    z = sample_codes(p, n, L, K, torch.Generator().manual_seed(0))
    freq = torch.tensor([((z == m).all(1)).double().mean().item() for m in maps])
    se = (prob * (1 - prob) / n).sqrt()
    assert ((freq - prob).abs() < 5 * se + 1e-4).all(), (freq, prob)  # 5 standard errors, fixed seed


# ---------------------------------------------------------------------------- the bound

def test_the_bound_is_above_the_exact_nll_and_the_exact_likelihood_sums_to_one():
    m, K = toy_images(K=4, side=2), 4
    p = toy_prior(K, 1)
    images = torch.tensor(list(itertools.product(range(3), repeat=4))).reshape(81, 1, 2, 2)
    x_in = images.double() - 1
    with torch.no_grad():
        exact = exact_log_likelihood(m, p, images, (1, 1), K, levels=3)
        bound = nll_bound(m, p, x_in, images, K, levels=3)[0]
    assert exact.exp().sum().item() == pytest.approx(1.0, abs=1e-10)  # a distribution over the 81 images
    assert (bound >= -exact - 1e-12).all() and (bound > -exact + 1e-6).any()


def test_exact_likelihood_is_the_brute_force_sum_over_code_maps():
    m, K = toy_images(K=3, side=4), 3
    p = toy_prior(K, 4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (5, 1, 4, 4), generator=g)
    with torch.no_grad():
        exact = exact_log_likelihood(m, p, x, (2, 2), K, levels=3)
        bound, recon, prior_term, _, codes = nll_bound(m, p, x.double() - 1, x, K, levels=3)
        terms = []
        for z in itertools.product(range(K), repeat=4):
            z = torch.tensor(z)
            logits = torch.log_softmax(m.decoder(m.codebook[z].reshape(1, 2, 2, -1)), dim=2)[0]  # (1, 3, 4, 4)
            log_px = sum(logits[0, :, i, j].gather(0, x[:, 0, i, j]) for i in range(4) for j in range(4))
            terms.append(log_px - prior_nll(p, z[None], K))
    torch.testing.assert_close(exact, torch.logsumexp(torch.stack(terms, 1), 1), rtol=1e-12, atol=1e-12)
    assert (bound >= -exact).all()
    torch.testing.assert_close(bound, recon + prior_term, rtol=0, atol=0)


class MixtureOracle(torch.nn.Module):
    """The exact VQ-VAE of a mixture of K Gaussians N(mu_k, s^2 I) with weights w: the encoder
    is the identity (D = 2), the codes are the means, the decoder N(code, s^2 I), the prior w."""

    def __init__(self, mu, s, w):
        super().__init__()
        self.codebook, self.s, self.log_w = mu, s, torch.log(w)

    def decode(self, codes):
        mean = self.codebook[codes[:, 0]]
        return torch.cat([mean, torch.full_like(mean, math.log(self.s))], 1)

    def forward(self, x):
        codes, z_q, z_st = quantize(x[:, None], self.codebook)
        return self.decode(codes), x[:, None], z_q, codes

    def prior(self, idx):
        return self.log_w.expand(idx.shape[0], idx.shape[1], -1)


def test_oracle_reproduces_the_mixture_density_and_its_samples():
    mu = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], dtype=f64)
    w, s = torch.tensor([0.5, 0.3, 0.2], dtype=f64), 0.4
    m = MixtureOracle(mu, s, w)
    x = torch.randn(200, 2, dtype=f64, generator=torch.Generator().manual_seed(0)) * 2
    exact = exact_log_likelihood(m, m.prior, x, (1,), 3)
    truth = np.log(sum(w[k].item() * stats.multivariate_normal(mu[k].numpy(), s ** 2).pdf(x.numpy()) for k in range(3)))
    np.testing.assert_allclose(exact.numpy(), truth, rtol=1e-10)
    bound = nll_bound(m, m.prior, x, x, 3)[0]
    assert (bound >= -exact - 1e-12).all()
    n = 20000
    samples = vqvae.generate(m, m.prior, n, (1,), 3, generator=torch.Generator().manual_seed(1))
    nearest = quantize(samples[:, None].double(), mu)[0][:, 0]
    # components are 4 s apart or more: the nearest mean identifies the component but for ~1e-3 of the draws
    for k in range(3):
        share = (nearest == k).double().mean().item()
        assert abs(share - w[k].item()) < 5 * math.sqrt(w[k] * (1 - w[k]) / n) + 5e-3
    assert samples.mean(0).numpy() == pytest.approx((w[:, None] * mu).sum(0).numpy(), abs=5 * 2.5 / math.sqrt(n))


def test_points_model_density_integrates_to_one():
    torch.manual_seed(0)
    m = VQVAE(PointEncoder(2, 8, 2), PointDecoder(2, 8, 2), 5, 2, restart_after=0).double()
    p = toy_prior(5, 1)
    edges = torch.linspace(-10, 10, 401, dtype=f64)
    c = (edges[1:] + edges[:-1]) / 2
    grid = torch.cartesian_prod(c, c)
    with torch.no_grad():
        logp = exact_log_likelihood(m, p, grid, (1,), 5)
    assert logp.exp().sum().item() * (20 / 400) ** 2 == pytest.approx(1.0, abs=1e-3)


def test_bits_per_dim_divides_by_dims_and_ln_2():
    assert vqvae.bits_per_dim(64 * math.log(2) * 1.5, 64) == pytest.approx(1.5)


# ---------------------------------------------------------------------------- VQ-VAE-2 (--levels 2)

def toy_two_level(K=3, side=4, levels=3, hidden=8, D=3, seed=0):
    """A float64 VQ-VAE-2 of 1 x side x side images, bottom map side/2, top map side/4, random
    weights and spread-out random codebooks."""
    torch.manual_seed(seed)
    m = VQVAE2(1, levels, hidden, 1, 1, K, D, ema=False, restart_after=0).double()
    with torch.no_grad():
        m.top.codebook.copy_(torch.randn(K, D, dtype=f64))
        m.bottom.codebook.copy_(torch.randn(K, D, dtype=f64))
    return m


def toy_hierarchical_prior(K, L_top, L_bottom, seed=1):
    torch.manual_seed(seed)
    p = HierarchicalPrior(K, L_top, L_bottom, layers=2, heads=2, width=8).double()
    with torch.no_grad():  # spread the weights so the conditionals differ a lot
        for q in p.parameters():
            q.add_(0.3 * torch.randn_like(q))
    return p.eval()


def test_two_level_maps_have_the_papers_ratio_and_the_bottom_encoder_reads_the_decoded_top():
    m = toy_two_level(side=8)
    x = torch.randn(2, 1, 8, 8, dtype=f64)
    out, (z_e_top, z_e_bottom), _, (top, bottom) = m(x)
    assert top.shape == (2, 2, 2) and bottom.shape == (2, 4, 4) and out.shape == (2, 1, 3, 8, 8)
    with torch.no_grad():  # other top codes, the same image: another bottom encoder output
        m.top.codebook.add_(1.0)
        assert not torch.allclose(m.quantize_both(x)[0][1], z_e_bottom)
    # the decoder reads both maps: changing either code map changes its output
    other = (top + 1) % 3, (bottom + 1) % 3
    for t, b in ((other[0], bottom), (top, other[1])):
        assert not torch.allclose(m.decode(t, b), m.decode(top, bottom))


def test_two_level_terms_move_what_eq_3_says_on_each_map():
    m = toy_two_level(K=5)
    x = torch.randint(0, 3, (6, 1, 4, 4))
    terms = vqvae_loss(m, x.double() - 1, x, beta=0.25, codebook_loss=True, levels=3)
    books = [m.top.codebook, m.bottom.codebook]
    encoders = [*m.trunk.parameters(), *m.encoder_top.parameters(), *m.decoder_top.parameters(),
                *m.encoder_bottom.parameters()]
    decoder = [*m.upsample.parameters(), *m.decoder.parameters()]
    for name, term, moves, still in [("codebook", terms["codebook"], [books], [encoders, decoder]),
                                     ("commitment", terms["commitment"], [encoders], [books, decoder]),
                                     ("reconstruction", terms["recon"], [encoders, decoder], [books])]:
        for group in still:
            assert all(not g.any() for g in _grads(term.sum(), group)), f"{name} moves what it must not"
        for group in moves:
            assert all(g.any() for g in _grads(term.sum(), group)), f"{name} does not move all it should"
    # the straight-through estimator reaches the top encoder through the reconstruction alone
    assert any(g.any() for g in _grads(terms["recon"].sum(), list(m.encoder_top.parameters())))
    (z_e_top, z_e_bottom), (q_top, q_bottom) = terms["z_e"], (m.top.codebook[terms["codes"][0]],
                                                               m.bottom.codebook[terms["codes"][1]])
    dist2 = [((a - b) ** 2).reshape(6, -1).sum(1) for a, b in ((z_e_top, q_top), (z_e_bottom, q_bottom))]
    torch.testing.assert_close(terms["loss"], terms["recon"] + 1.25 * (dist2[0] + dist2[1]), rtol=1e-12, atol=1e-10)


def test_hierarchical_prior_is_normalised_over_all_pairs_of_maps():
    K, L_top, L_bottom = 2, 2, 4
    p = toy_hierarchical_prior(K, L_top, L_bottom)
    maps = torch.tensor(list(itertools.product(range(K), repeat=L_top + L_bottom)))
    with torch.no_grad():
        nll_top, nll_bottom = p(maps[:, :L_top], maps[:, L_top:])
        torch.testing.assert_close(nll_top, prior_nll(p.top, maps[:, :L_top], K), rtol=0, atol=0)
    joint = (-nll_top - nll_bottom).exp()
    assert joint.sum().item() == pytest.approx(1.0, abs=1e-12)
    for z_top in itertools.product(range(K), repeat=L_top):  # p(z_bottom | z_top) sums to 1 for every top map
        rows = (maps[:, :L_top] == torch.tensor(z_top)).all(1)
        assert (-nll_bottom[rows]).exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    # and depends on the top map
    assert not torch.allclose(nll_bottom[:2 ** L_bottom], nll_bottom[-2 ** L_bottom:])


@pytest.mark.parametrize("t", range(4))
def test_bottom_prior_is_causal_in_raster_order_and_reads_the_whole_top_map(t):
    p = toy_hierarchical_prior(K=5, L_top=3, L_bottom=4).bottom
    kept = {}

    def keeper(name):
        def keep(module, inputs, output):  # the embeddings become the leaves to differentiate by
            kept[name] = output.detach().requires_grad_(True)
            return kept[name]
        return keep
    handles = [p.tok.register_forward_hook(keeper("codes")), p.cond_tok.register_forward_hook(keeper("top"))]
    g = torch.Generator().manual_seed(t)
    logits = p(torch.randint(0, 6, (3, 4), generator=g), torch.randint(0, 5, (3, 3), generator=g))
    for h in handles:
        h.remove()
    grad_codes, grad_top = torch.autograd.grad(logits[:, t].sum(), (kept["codes"], kept["top"]))
    assert not grad_codes[:, t + 1:].any()  # no later bottom position reaches position t
    assert (grad_codes[:, :t + 1].abs().sum(-1) > 0).all()  # every earlier one does
    assert (grad_top.abs().sum(-1) > 0).all()  # and every top position does, at every t


def test_two_level_bound_is_above_the_exact_nll_of_an_enumerable_toy_model():
    """4x4 images of 3 levels, a 1x1 top and a 2x2 bottom map of K = 3 codes: 3^5 pairs of maps.
    The exact log p(x) is the brute-force sum over them, written here with loops; the bound is
    the joint term at the encoder's own pair, so it is above -log p(x), strictly where the
    other pairs carry mass."""
    K = 3
    m, p = toy_two_level(K=K), toy_hierarchical_prior(K, 1, 4)
    x = torch.randint(0, 3, (5, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = hierarchical_exact_log_likelihood(m, p, x, (1, 1), (2, 2), K, levels=3)
        bound, recon, nll_top, nll_bottom, _, (top, bottom) = hierarchical_nll_bound(m, p, x.double() - 1, x, 3)
        terms = {}
        for z in itertools.product(range(K), repeat=5):
            zt, zb = torch.tensor(z[:1]), torch.tensor(z[1:])
            log_p_top = -prior_nll(p.top, zt[None], K)
            log_p_bottom = -prior_nll(p.bottom, zb[None], K, cond=zt[None])
            logits = torch.log_softmax(m.decode(zt.reshape(1, 1, 1), zb.reshape(1, 2, 2)), dim=2)[0]  # (1, 3, 4, 4)
            log_px = sum(logits[0, :, i, j].gather(0, x[:, 0, i, j]) for i in range(4) for j in range(4))
            terms[z] = log_px + log_p_top + log_p_bottom
    brute = torch.logsumexp(torch.stack(list(terms.values()), 1), 1)
    torch.testing.assert_close(exact, brute, rtol=1e-12, atol=1e-12)
    own = torch.stack([terms[(int(top[b, 0, 0]), *bottom[b].reshape(-1).tolist())][b] for b in range(5)])
    torch.testing.assert_close(bound, -own, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bound, recon + nll_top + nll_bottom, rtol=0, atol=0)
    assert (bound >= -exact).all() and (bound > -exact + 1e-6).all()


def test_two_level_samples_follow_the_top_then_the_bottom_prior():
    """hierarchical_generate's codes, read back through a decoder whose mode is the codes
    themselves: each pair of maps as often as p(z_top) p(z_bottom | z_top) says."""
    K, n = 2, 20000
    p = toy_hierarchical_prior(K, 1, 2).float()

    class Echo:
        def decode(self, top, bottom):  # (n, 1, K, 1, 3) logits whose argmax is the codes
            return 50 * F.one_hot(torch.cat([top.reshape(-1, 1), bottom.reshape(-1, 2)], 1), K).float() \
                .permute(0, 2, 1)[:, None, :, None, :]
    z = vqvae.hierarchical_generate(Echo(), p, n, (1, 1), (1, 2), K, levels=K, mode=True,
                                    generator=torch.Generator().manual_seed(0)).reshape(n, 3)
    maps = torch.tensor(list(itertools.product(range(K), repeat=3)))
    with torch.no_grad():
        prob = torch.stack(p(maps[:, :1], maps[:, 1:])).sum(0).neg().exp().double()
    freq = torch.tensor([(z == m).all(1).double().mean().item() for m in maps])
    se = (prob * (1 - prob) / n).sqrt()
    assert ((freq - prob).abs() < 5 * se + 1e-4).all(), (freq, prob)  # 5 standard errors, fixed seed


# ---------------------------------------------------------------------------- the file alone

def test_mathematics_runs_without_common(without_common):
    """Quantisation, the loss, the EMA and restarts, the prior, the bound, the exact likelihood
    and sampling, with the image and the point networks, run from the file's first half alone."""
    m = without_common("vqvae")
    torch.manual_seed(0)
    net = m.VQVAE(m.ConvEncoder(1, 8, 1, 1, 4), m.ConvDecoder(1, 17, 8, 1, 1, 4), 8, 4, ema=True, restart_after=2)
    prior = m.CodePrior(8, 16, 1, 2, 8)
    x = torch.randint(0, 17, (3, 1, 8, 8))
    terms = m.vqvae_loss(net, x.float() / 16 * 2 - 1, x, levels=17)
    terms["loss"].mean().backward()
    counts, sums = m.codebook_statistics(terms["z_e"], terms["codes"], 8)
    net.update_codebook(counts, sums, m.random_encoder_outputs(terms["z_e"], 8))
    assert torch.isfinite(m.nll_bound(net, prior, x.float() / 16 * 2 - 1, x, 8, 17)[0]).all()
    assert m.generate(net, prior, 2, (4, 4), 8, 17, mode=True).shape == (2, 1, 8, 8)
    assert 1 <= m.perplexity(counts) <= 8
    points = m.VQVAE(m.PointEncoder(2, 8, 2), m.PointDecoder(2, 8, 2), 4, 2, ema=False)
    p1 = m.CodePrior(4, 1, 1, 1, 4)
    assert m.exact_log_likelihood(points, p1, torch.randn(5, 2), (1,), 4).shape == (5,)
    with pytest.raises(ValueError):
        m.quantize(torch.zeros(2, 3), torch.zeros(4, 2))
    two = m.VQVAE2(1, 17, 8, 1, 1, 8, 4, ema=True, restart_after=2)
    priors = m.HierarchicalPrior(8, 4, 16, 1, 2, 8)
    terms = m.vqvae_loss(two, x.float() / 16 * 2 - 1, x, levels=17)
    terms["loss"].mean().backward()
    for book, z_e, codes in zip(two.codebooks(), terms["z_e"], terms["codes"]):
        book.update_codebook(*m.codebook_statistics(z_e, codes, 8), m.random_encoder_outputs(z_e, 8))
    assert torch.isfinite(m.hierarchical_nll_bound(two, priors, x.float() / 16 * 2 - 1, x, 17)[0]).all()
    assert m.hierarchical_generate(two, priors, 2, (2, 2), (4, 4), 8, 17, mode=True).shape == (2, 1, 8, 8)


# ---------------------------------------------------------------------------- networks and presets

def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("dataset, shape, levels, ae, prior", [
    ("cifar10", (3, 32, 32), 256, 8_077_120, 6_597_888),
    ("mnist", (1, 28, 28), 256, 1_752_864, 4_817_536),
])
def test_presets_parameter_counts(dataset, shape, levels, ae, prior):
    cfg = vqvae.Config(**vqvae.PRESETS[dataset])
    info = common.DataInfo(dataset, "image", shape, levels=levels, num_classes=10)
    with torch.device("meta"):
        net, pri = vqvae.build(cfg, info)
    assert (_count(net), _count(pri)) == (ae, prior)
    assert vqvae.latent_shape(cfg, info) == (shape[1] // 4, shape[2] // 4)


@pytest.mark.parametrize("dataset, shape, top, bottom", [
    ("digits", (1, 8, 8), (2, 2), (4, 4)),  # our choice for 8x8 images (PRESETS["digits"] says why)
    ("cifar10", (3, 32, 32), (4, 4), (8, 8)),  # 1/8 and 1/4 of the side, as Razavi et al.'s 32 and 64 of 256
])
def test_two_level_code_maps_per_preset(dataset, shape, top, bottom):
    cfg = vqvae.Config(**vqvae.PRESETS[dataset], levels=2)
    info = common.DataInfo(dataset, "image", shape, levels=256, num_classes=10)
    with torch.device("meta"):
        net, prior = vqvae.build(cfg, info)
        codes = net.encode(torch.zeros(1, *shape))
    assert (tuple(codes[0].shape[1:]), tuple(codes[1].shape[1:])) == (top, bottom)
    assert (vqvae.top_shape(cfg, info), vqvae.latent_shape(cfg, info)) == (top, bottom)
    assert (prior.top.length, prior.bottom.length, prior.bottom.cond_length) == (math.prod(top), math.prod(bottom),
                                                                                  math.prod(top))


def test_cifar10_encoder_and_decoder_follow_the_paper():
    cfg = vqvae.Config(**vqvae.PRESETS["cifar10"])
    enc = ConvEncoder(3, cfg.hidden, cfg.res_blocks, cfg.down, cfg.code_dim)
    strided = [c for c in enc.modules() if isinstance(c, torch.nn.Conv2d) and c.stride == (2, 2)]
    assert [(c.kernel_size, c.out_channels) for c in strided] == [((4, 4), 256)] * 2
    assert sum(isinstance(c, vqvae.ResBlock) for c in enc.modules()) == 2
    assert enc(torch.zeros(1, 3, 32, 32)).shape == (1, 8, 8, 64)
    # as the module docstring states against the Sonnet example: the residual blocks follow the
    # strided convolutions and their ReLU directly (no 3x3 convolution between), all 256 wide
    layers = list(enc.net)
    last = max(i for i, c in enumerate(layers) if isinstance(c, torch.nn.Conv2d) and c.stride == (2, 2))
    assert isinstance(layers[last + 1], torch.nn.ReLU) and isinstance(layers[last + 2], vqvae.ResBlock)
    assert all(c.out_channels == 256 for b in enc.modules() if isinstance(b, vqvae.ResBlock)
               for c in (b.conv3, b.conv1))
    dec = ConvDecoder(3, 256, cfg.hidden, cfg.res_blocks, cfg.down, cfg.code_dim)
    assert dec(torch.zeros(1, 8, 8, 64)).shape == (1, 3, 256, 32, 32)
    first = dec.net[0]  # the Sonnet example's input convolution: 3x3, D -> width, stride 1, no activation
    assert isinstance(first, torch.nn.Conv2d) and (first.in_channels, first.out_channels) == (64, 256)
    assert first.kernel_size == (3, 3) and first.stride == (1, 1) and isinstance(dec.net[1], vqvae.ResBlock)
    widths = [c.out_channels for c in dec.modules() if isinstance(c, torch.nn.ConvTranspose2d)]
    assert widths == [256, 3 * 256]  # the first transposed convolution keeps the width (Sonnet: half)
    assert cfg.codes == 512 and cfg.beta == 0.25 and cfg.decay == 0.99 and cfg.lr == 2e-4


# ---------------------------------------------------------------------------- command line

TINY = ["--hidden", "8", "--code-dim", "4", "--codes", "8", "--res-blocks", "1", "--prior-layers", "1",
        "--prior-width", "16", "--prior-heads", "2", "--batch-size", "8", "--n-samples", "4", "--log-every", "1",
        "--device", "cpu"]


def test_cli_digits_trains_both_stages_samples_and_evaluates(tmp_path):
    out = tmp_path / "run"
    run_main("vqvae", ["--out", str(out), "--steps", "6", "--save-every", "2", *TINY])
    for name in ["ckpt.pt", "samples_2.png", "samples_4.png", "recon_2.png", "recon_4.png", "codes.png",
                 "metrics.jsonl", "loss.png"]:
        assert (out / name).is_file(), name
    # the digits preset trains the autoencoder for a third of the steps, then the prior
    assert [(e["trains"], e["from_step"]) for e in events(out, "stage")] == [("autoencoder", 0), ("prior", 2)]
    lines = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "step" in r]
    assert [("perplexity" in r) for r in lines] == [True, True, False, False, False, False]
    result = run_main("vqvae", ["--eval", str(out / "ckpt.pt"), "--eval-n", "20", "--batch-size", "7"])
    ev = events(out, "eval")[-1]
    assert ev["n"] == 20 and ev["prior_updates"] == 4 and result["nll"] == ev["nll"]
    assert ev["bits_per_dim"] == pytest.approx(ev["nll"] / (64 * math.log(2)))
    assert ev["nll"] == pytest.approx(ev["recon_nll"] + ev["prior_nll"])
    assert ev["uniform_prior_nll"] == pytest.approx(ev["recon_nll"] + 16 * math.log(8))
    assert 1 <= ev["perplexity"] <= ev["codes_used"] <= 8
    run_main("vqvae", ["--sample", str(out / "ckpt.pt"), "--out", str(tmp_path / "s"), "--n-samples", "5",
                       "--decode", "sample"])
    x = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.uint8 and int(x.max()) < 17
    assert events(tmp_path / "s", "sample")[-1]["n"] == 5 and (tmp_path / "s" / "samples.png").is_file()


def test_cli_two_levels_trains_evaluates_and_samples_without_the_flag(tmp_path):
    """--levels 2 end to end on digits: both maps' codebooks move, the prior's two NLLs are
    logged and evaluated, and --eval and --sample read the choice from the checkpoint."""
    out = tmp_path / "run"
    run_main("vqvae", ["--out", out, "--steps", "6", "--save-every", "2", "--levels", "2", *TINY])
    lines = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "step" in r]
    assert [("perplexity_top" in r, "prior_top" in r) for r in lines] == [(True, False)] * 2 + [(False, True)] * 4
    (net, prior), cfg, info = vqvae.load(out / "ckpt.pt")
    assert isinstance(net, VQVAE2) and isinstance(prior, HierarchicalPrior) and cfg.levels == 2
    assert int(prior.updates) == 4 and all(int(book.unused.max()) < cfg.restart_after for book in net.codebooks())
    result = run_main("vqvae", ["--eval", out / "ckpt.pt", "--eval-n", "20", "--batch-size", "7"])
    ev = events(out, "eval")[-1]
    assert ev["n"] == 20 and result["nll"] == ev["nll"]
    assert ev["nll"] == pytest.approx(ev["recon_nll"] + ev["prior_top_nll"] + ev["prior_bottom_nll"])
    assert ev["prior_nll"] == pytest.approx(ev["prior_top_nll"] + ev["prior_bottom_nll"])
    assert ev["bits_per_dim"] == pytest.approx(ev["nll"] / (64 * math.log(2)))
    assert ev["uniform_prior_nll"] == pytest.approx(ev["recon_nll"] + (2 * 2 + 4 * 4) * math.log(8))
    x = common.load_dataset("digits", "test").data[:20]
    with torch.no_grad():  # the two priors' NLLs, each from its own network
        top, bottom = net.encode(x.float() / 16 * 2 - 1)
        nll_top = prior_nll(prior.top, top.reshape(20, 4), 8)
        nll_bottom = prior_nll(prior.bottom, bottom.reshape(20, 16), 8, cond=top.reshape(20, 4))
    assert ev["prior_top_nll"] == pytest.approx(nll_top.mean().item(), rel=1e-5)
    assert ev["prior_bottom_nll"] == pytest.approx(nll_bottom.mean().item(), rel=1e-5)
    run_main("vqvae", ["--sample", out / "ckpt.pt", "--out", tmp_path / "s", "--n-samples", "5"])
    x = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.uint8 and int(x.max()) < 17


def test_levels_1_is_the_one_level_model(tmp_path):
    """--levels 1 is the default and builds VQ-VAE's networks with the state they had before
    VQ-VAE-2 (a Codebook's tensors under VQVAE's own names, a prior without cross-attention):
    the same checkpoint, tensor for tensor, as no flag at all."""
    for name, extra in (("flag", ["--levels", "1"]), ("none", [])):
        run_main("vqvae", ["--out", tmp_path / name, "--steps", "4", *TINY, *extra])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("flag", "none"))
    for part in ("model", "prior", "opt", "prior_opt"):
        assert str(a[part]) == str(b[part]), part
    (net, prior), cfg, info = vqvae.load(tmp_path / "flag" / "ckpt.pt")
    assert type(net) is VQVAE and type(prior) is CodePrior and net.codebooks() == [net]
    assert {k.split(".")[0] for k in a["model"]} == {"codebook", "cluster_size", "embed_sum", "unused", "encoder",
                                                     "decoder"}
    assert not any("cross" in k or "cond" in k for k in a["prior"])


def test_cli_points_density_is_the_exact_mixture(tmp_path):
    run_main("vqvae", ["--dataset", "8gaussians", "--out", str(tmp_path), "--steps", "4", "--save-every", "4",
                       "--codebook", "loss", *TINY])
    assert (tmp_path / "recon_4.png").is_file() and (tmp_path / "codes.png").is_file()
    result = run_main("vqvae", ["--eval", str(tmp_path / "ckpt.pt"), "--eval-n", "50"])
    assert result["exact_nll"] <= result["nll"] and "entropy" in result and "bits_per_dim" not in result
    d = np.load(tmp_path / "density.npz")
    assert d["log_density"].shape == (128, 128) and float(d["lim"]) == 4.0
    (net, prior), cfg, info = vqvae.load(tmp_path / "ckpt.pt")
    edges = torch.linspace(-4, 4, 129)
    c = (edges[1:] + edges[:-1]) / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    with torch.no_grad():
        expect = exact_log_likelihood(net, prior, torch.stack([xx.flatten(), yy.flatten()], 1), (1,), 8)
    np.testing.assert_allclose(d["log_density"], expect.reshape(128, 128).numpy(), rtol=1e-5, atol=1e-5)
    assert (tmp_path / "density.png").is_file()


def test_colour_images_bits_per_dim_divide_by_every_sub_pixel(tmp_path, monkeypatch):
    """A 3-channel 8-bit set (cifar10's kind, made up here: no download): the eval's bound is the
    decoder's categorical log-probability of all C*H*W sub-pixels plus the prior's, recomputed
    here from the networks, and bits/dim divides it by C*H*W."""
    g = torch.Generator().manual_seed(0)
    info = common.DataInfo("cifar10", "image", (3, 4, 4), levels=256, num_classes=10)
    sets = {split: common._Dataset(info, split, torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8),
                                  torch.zeros(n, dtype=torch.long)) for split, n in (("train", 64), ("test", 6))}
    monkeypatch.setattr(vqvae, "load_dataset", lambda name, split="train", root=None: sets[split])
    out = tmp_path / "run"
    run_main("vqvae", ["--dataset", "cifar10", "--steps", "2", "--out", str(out), *TINY, "--down", "2"])
    run_main("vqvae", ["--eval", str(out / "ckpt.pt")])
    ev = events(out, "eval")[-1]
    (net, prior), cfg, _ = vqvae.load(out / "ckpt.pt")
    x = sets["test"].data
    with torch.no_grad():
        out_, _, _, codes = net(x.float() / 255 * 2 - 1)
        logp = torch.log_softmax(out_.double(), dim=2)  # (6, 3, 256, 4, 4)
        recon = -sum(logp[:, c, :, i, j].gather(1, x[:, c, i, j, None].long())[:, 0]
                     for c in range(3) for i in range(4) for j in range(4))
        bound = recon + prior_nll(prior, codes.reshape(6, 1), 8).double()
    assert codes.shape == (6, 1, 1) and ev["n"] == 6
    assert ev["nll"] == pytest.approx(bound.mean().item(), rel=1e-5)
    assert ev["bits_per_dim"] == pytest.approx(bound.mean().item() / (3 * 4 * 4 * math.log(2)), rel=1e-5)


@pytest.mark.parametrize("levels", ["1", "2"])
def test_resume_is_bit_exact_in_either_stage(tmp_path, levels):
    """Stopped and resumed inside either stage, across the stage boundary (test_cli.py's shared
    resume test stays inside the autoencoder's stage)."""
    flags = [*TINY, "--restart-after", "1", "--prior-dropout", "0.2",  # restarts and dropout draw random numbers
             "--levels", levels, "--ae-fraction", "0.5"]
    run_main("vqvae", ["--out", str(tmp_path / "a"), "--steps", "6", *flags])
    # the same stage boundary (step 3): stopped in the autoencoder's stage, then in the prior's
    for stop, first in ((2, ["--stage", "ae"]), (4, ["--ae-fraction", "0.75"])):
        b = tmp_path / f"b{stop}"
        run_main("vqvae", ["--out", str(b), "--steps", str(stop), *flags, *first])
        # --resume keeps the checkpoint's flags: name the stage schedule of run a
        run_main("vqvae", ["--out", str(b), "--steps", "6", "--resume", *flags,
                           "--stage", "both", "--ae-fraction", "0.5"])
        ca, cb = (torch.load(p / "ckpt.pt", weights_only=True) for p in (tmp_path / "a", b))
        assert ca["step"] == cb["step"] == 6
        for part in ("model", "prior"):
            for name, value in ca[part].items():
                assert torch.equal(value, cb[part][name]), (stop, part, name)


def test_stage_prior_trains_the_prior_of_a_trained_autoencoder(tmp_path, capsys):
    run_main("vqvae", ["--out", str(tmp_path), "--steps", "3", "--stage", "ae", *TINY])
    assert "the prior has not trained" in capsys.readouterr().out
    ae = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert int(ae["prior"]["updates"]) == 0
    run_main("vqvae", ["--out", str(tmp_path), "--steps", "5", "--stage", "prior", "--resume", *TINY])
    both = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert int(both["prior"]["updates"]) == 2 and both["step"] == 5
    for name, value in ae["model"].items():  # the autoencoder is frozen
        assert torch.equal(value, both["model"][name]), name
    with pytest.raises(SystemExit) as e:  # and stays so
        run_main("vqvae", ["--out", str(tmp_path), "--steps", "7", "--stage", "ae", "--resume", *TINY])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "--stage prior" in err


@pytest.mark.parametrize("argv, words", [
    (["--prior-width", "10", "--prior-heads", "4"], "--prior-heads"),
    (["--stage", "prior"], "--resume"),
    (["--down", "4"], "--down"),
    (["--decay", "1"], "--decay"),
    (["--ae-fraction", "1.5"], "--ae-fraction"),
    (["--levels", "3"], "--levels"),
    (["--levels", "2", "--dataset", "8gaussians"], "--levels"),
    (["--levels", "2", "--down", "3"], "--down"),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        run_main("vqvae", [*argv, "--out", str(tmp_path), "--steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and (err.startswith("error") or ": error: " in err) and "\n" not in err and words in err


@pytest.mark.parametrize("levels", ["1", "2"])
def test_two_processes_train_like_one(tmp_path, levels):
    """DDP over two gloo processes with the codebook statistics summed over them: the same
    autoencoder and prior (both maps' with --levels 2) as one process on the whole batch
    (restarts and dropout off, since they draw per process)."""
    flags = ["--steps", "4", *TINY, "--restart-after", "0", "--prior-dropout", "0", "--levels", levels]
    r = torchrun("vqvae", ["--out", tmp_path / "ddp", *flags])
    assert r.returncode == 0, r.stderr[-2000:]
    run_main("vqvae", ["--out", str(tmp_path / "one"), *flags])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("ddp", "one"))
    for part in ("model", "prior"):
        for k in a[part]:
            x, y = a[part][k], b[part][k]
            if k.endswith("qkv.bias"):  # the key bias has an exactly zero gradient (softmax is shift invariant):
                x, y = x.view(3, -1)[[0, 2]], y.view(3, -1)[[0, 2]]  # Adam's first steps amplify its rounding noise
            if k.endswith("kv_cross.bias"):  # likewise the cross-attention's key bias
                x, y = x.view(2, -1)[1], y.view(2, -1)[1]
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m: f"{part} {k}: {m}")
