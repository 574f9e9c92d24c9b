"""Tests of vae.py: each identity is checked against an independent computation.

The heart is a linear-Gaussian model, p(z) = N(0, I), p(x|z) = N(Wz + b, s2 I), where log p(x),
the exact posterior and the exact ELBO of any Gaussian encoder are known in closed form.
Monte-Carlo checks use a fixed seed and a tolerance of 5 standard errors.
"""

import gzip
import itertools
import json
import math
import re
import struct

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from scipy import integrate, stats

import common
import vae
from conftest import events, run_main, torchrun


@pytest.fixture(autouse=True)
def _double_precision():
    """The mathematics is tested in double precision (and the default restored afterwards)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


Z = 5.0  # standard errors allowed by Monte-Carlo checks


def _mc_close(samples, target, z=Z, atol=1e-9):
    """|mean(samples) - target| <= z standard errors (+ atol for round-off)."""
    samples = np.asarray(samples, dtype=np.float64)
    se = samples.std(ddof=1) / math.sqrt(samples.size)
    assert abs(samples.mean() - target) <= z * se + atol, (samples.mean(), target, se)
    return se


# ----------------------------------------------------------------------------------------------
# Closed-form KL and the reparameterisation trick
# ----------------------------------------------------------------------------------------------

vectors = st.lists(st.floats(-3, 3), min_size=1, max_size=4)


@given(vectors, st.data())
def test_gaussian_kl_equals_general_two_gaussian_formula(mu, data):
    logvar = data.draw(st.lists(st.floats(-3, 3), min_size=len(mu), max_size=len(mu)))
    m1, s1 = np.array(mu), np.diag(np.exp(logvar))
    m2, s2 = np.zeros(len(mu)), np.eye(len(mu))
    inv2 = np.linalg.inv(s2)
    general = 0.5 * (np.trace(inv2 @ s1) + (m2 - m1) @ inv2 @ (m2 - m1) - len(mu)
                     + np.log(np.linalg.det(s2) / np.linalg.det(s1)))
    got = vae.gaussian_kl(torch.tensor(mu), torch.tensor(logvar)).item()
    assert got == pytest.approx(general, rel=1e-9, abs=1e-9)


@given(vectors, st.data())
def test_gaussian_kl_is_zero_only_at_the_prior(mu, data):
    logvar = data.draw(st.lists(st.floats(-3, 3), min_size=len(mu), max_size=len(mu)))
    kl = vae.gaussian_kl(torch.tensor(mu), torch.tensor(logvar)).item()
    assert vae.gaussian_kl(torch.zeros(len(mu)), torch.zeros(len(mu))).item() == 0.0
    if max(map(abs, mu + logvar)) > 1e-3:
        assert kl > 0
    assert (vae.gaussian_kl_per_dim(torch.tensor(mu), torch.tensor(logvar)) >= 0).all()


def test_gaussian_kl_matches_monte_carlo():
    mu, logvar = torch.tensor([0.7, -1.2, 0.0]), torch.tensor([0.5, -1.0, 1.5])
    g = torch.Generator().manual_seed(0)
    z = vae.reparameterize(mu.unsqueeze(0), logvar.unsqueeze(0), 20000, g)[:, 0].numpy()
    sd = np.exp(0.5 * logvar.numpy())
    log_ratio = (stats.norm.logpdf(z, mu.numpy(), sd) - stats.norm.logpdf(z)).sum(1)
    _mc_close(log_ratio, vae.gaussian_kl(mu, logvar).item())


@given(st.lists(st.tuples(st.floats(-2, 2), st.floats(-2, 1), st.floats(-2, 2), st.floats(-2, 2)),
                min_size=1, max_size=3), st.integers(0, 2 ** 31))
def test_reparameterized_gradient_of_a_quadratic(params, seed):
    # f(z) = sum_j a_j z_j^2 + c_j z_j has E_q f = sum_j a_j (mu_j^2 + exp(logvar_j)) + c_j mu_j,
    # so d/dmu = 2 a mu + c and d/dlogvar = a exp(logvar).
    mu0, lv0, a, c = (torch.tensor(v) for v in zip(*params))
    groups, k = 40, 200
    mu = mu0.repeat(groups, 1).requires_grad_(True)        # one independent estimate per row
    logvar = lv0.repeat(groups, 1).requires_grad_(True)
    z = vae.reparameterize(mu, logvar, k, torch.Generator().manual_seed(seed))   # (k, groups, D)
    (a * z.pow(2) + c * z).sum(-1).mean(0).sum().backward()
    for j in range(len(params)):
        _mc_close(mu.grad[:, j].numpy(), (2 * a[j] * mu0[j] + c[j]).item())
        _mc_close(logvar.grad[:, j].numpy(), (a[j] * lv0[j].exp()).item())


# ----------------------------------------------------------------------------------------------
# Likelihoods: each is normalised over its support
# ----------------------------------------------------------------------------------------------

@given(st.lists(st.floats(-6, 6), min_size=3, max_size=3))
def test_bernoulli_sums_to_one(logits):
    xs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)))
    lp = vae.bernoulli(xs, torch.tensor(logits).expand(8, 3))
    assert torch.logsumexp(lp, 0).item() == pytest.approx(0.0, abs=1e-12)
    p = torch.sigmoid(torch.tensor(logits))
    assert lp[-1].item() == pytest.approx(p.log().sum().item(), abs=1e-9)  # x = (1,1,1)


@given(st.integers(2, 6), st.integers(0, 2 ** 31))
def test_categorical_sums_to_one(levels, seed):
    logits = 3 * torch.randn(1, levels, 2, generator=torch.Generator().manual_seed(seed))
    xs = torch.tensor(list(itertools.product(range(levels), repeat=2)))
    lp = vae.categorical(xs, logits.expand(len(xs), levels, 2))
    assert torch.logsumexp(lp, 0).item() == pytest.approx(0.0, abs=1e-12)


@given(st.sampled_from([2, 3, 17, 256]), st.floats(-1.5, 1.5), st.floats(-8, 2))
def test_discretized_logistic_sums_to_one_and_matches_the_logistic_cdf(levels, mean, log_scale):
    xs = torch.arange(levels).view(levels, 1)
    lp = vae.discretized_logistic(xs, torch.full((levels, 1), mean), torch.full((levels, 1), log_scale),
                                  levels)
    assert torch.logsumexp(lp, 0).item() == pytest.approx(0.0, abs=1e-10)
    # independent: P(x = l) = F(c_l + d) - F(c_l - d), with the outer bins open, from scipy
    s = math.exp(max(log_scale, vae.LOG_SCALE_MIN))
    centres = 2 * np.arange(levels) / (levels - 1) - 1
    d = 1 / (levels - 1)
    upper = np.where(np.arange(levels) == levels - 1, np.inf, centres + d)
    lower = np.where(np.arange(levels) == 0, -np.inf, centres - d)
    p = stats.logistic.cdf(upper, mean, s) - stats.logistic.cdf(lower, mean, s)
    np.testing.assert_allclose(lp.exp().numpy(), p, rtol=1e-6, atol=1e-13)
    # a two-pixel image: the per-pixel log-probabilities add
    two = vae.discretized_logistic(torch.tensor([[0, levels - 1]]), torch.full((1, 2), mean),
                                   torch.full((1, 2), log_scale), levels)
    assert two.item() == pytest.approx(lp[0].item() + lp[-1].item(), rel=1e-12)


def mp_log_logistic_bin(level, mean, log_scale, levels):
    """log P(x = level) of the discretized logistic with mpmath at 40 digits, from the float inputs
    exactly and the scale floored at LOG_SCALE_MIN as documented; written so nothing cancels."""
    with mpmath.workdps(40):
        s = mpmath.exp(max(mpmath.mpf(float(log_scale)), vae.LOG_SCALE_MIN))
        d = mpmath.mpf(1) / (levels - 1)
        c = 2 * mpmath.mpf(level) / (levels - 1) - 1
        a, b = (c + d - float(mean)) / s, (c - d - float(mean)) / s
        sf = lambda t: 1 / (1 + mpmath.exp(t))         # 1 - F(t)
        if level == 0:
            return float(-mpmath.log1p(mpmath.exp(-a)))  # log F(a)
        if level == levels - 1:
            return float(-mpmath.log1p(mpmath.exp(b)))   # log (1 - F(b))
        if b >= 0:
            return float(mpmath.log(sf(b) - sf(a)))
        if a <= 0:
            return float(mpmath.log(sf(-a) - sf(-b)))
        return float(mpmath.log1p(-(sf(a) + sf(-b))))


# Measured worst relative errors (about 5000 cases per setting): 3e-5 in float32 and 1.2e-13 in
# float64; before log(1 - e^-w) was split by the size of w, float64 lost digits in bins holding
# nearly all the mass (1.6e-9, where log P ~ -3e-8).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(st.sampled_from([2, 17, 256]),
       st.lists(st.tuples(st.integers(0, 255), st.floats(-8, 1), st.sampled_from([-1, 1]), st.floats(-60, 60)),
                min_size=40, max_size=40))
def test_discretized_logistic_is_accurate_in_relative_terms_everywhere(dtype, levels, rows):
    """Every bin, scales from the floor e^-7 (and below it, where the floor applies) to e, and the
    mean anywhere up to 60 scales beyond either edge of the bin or on it: log P to a relative
    1e-4 in float32 and 1e-12 in float64 against mpmath."""
    k = np.array([r[0] % levels for r in rows])
    log_s = np.array([r[1] for r in rows])
    side, t = np.array([r[2] for r in rows]), np.array([r[3] for r in rows])
    mean = 2 * k / (levels - 1) - 1 + side / (levels - 1) + side * t * np.exp(np.maximum(log_s, vae.LOG_SCALE_MIN))
    mean_t, log_s_t = torch.tensor(mean, dtype=dtype), torch.tensor(log_s, dtype=dtype)
    got = vae.discretized_logistic(torch.tensor(k)[:, None], mean_t[:, None], log_s_t[:, None], levels)
    assert got.dtype == dtype
    expected = np.array([mp_log_logistic_bin(int(kk), m, s, levels)
                         for kk, m, s in zip(k, mean_t.tolist(), log_s_t.tolist())])
    rtol, tiny = (1e-4 if dtype == torch.float32 else 1e-12), torch.finfo(dtype).tiny
    err = np.abs(got.double().numpy() - expected)
    bad = err > rtol * np.abs(expected) + tiny
    assert not bad.any(), list(zip(k[bad], mean_t[bad].tolist(), log_s[bad], got[bad].tolist(), expected[bad]))


@given(st.floats(-2, 2), st.floats(-3, 2))
def test_gaussian_integrates_to_one(mean, logvar):
    f = lambda x: vae.gaussian(torch.tensor([[x]]), torch.tensor([[mean]]), torch.tensor([[logvar]])).exp().item()
    sd = math.exp(0.5 * logvar)
    total, _ = integrate.quad(f, mean - 12 * sd, mean + 12 * sd, points=[mean], limit=200)
    assert total == pytest.approx(1.0, abs=1e-8)
    x = torch.tensor([[0.3, -1.0, 2.0]])
    got = vae.gaussian(x, torch.full((1, 3), mean), torch.full((1, 3), logvar)).item()
    assert got == pytest.approx(stats.norm.logpdf(x.numpy(), mean, sd).sum(), rel=1e-10)


@pytest.mark.parametrize("lik", [vae.Bernoulli(), vae.Gaussian(), vae.Categorical(5),
                                 vae.DiscretizedLogistic(5)])
def test_likelihood_samples_follow_log_prob(lik):
    # Sample frequencies of one scalar dimension against exp(log_prob) (discrete) or the moments
    # (Gaussian), and mean() against the expectation under log_prob where it is the exact mean.
    g = torch.Generator().manual_seed(1)
    out = torch.randn(1, lik.n_params, 1, generator=g)
    n = 20000
    xs = lik.sample(out.expand(n, -1, -1).contiguous(), g)[:, 0]
    if isinstance(lik, vae.Gaussian):
        _mc_close(xs.numpy(), out[0, 0, 0].item())
        _mc_close(((xs - out[0, 0, 0]) ** 2).numpy(), out[0, 1, 0].exp().item())
        return
    support = torch.arange(lik.levels, dtype=torch.float64)
    probs = lik.log_prob(support.view(-1, 1), out.expand(lik.levels, -1, -1)).exp()
    for level, p in zip(support, probs):
        _mc_close((xs == level).double().numpy(), p.item())
    if not isinstance(lik, vae.DiscretizedLogistic):  # its mean() is the logistic's location
        assert lik.mean(out).item() == pytest.approx((probs * support).sum().item(), rel=1e-10)


# ----------------------------------------------------------------------------------------------
# The linear-Gaussian VAE: log p(x) is exact
# ----------------------------------------------------------------------------------------------

class LinearGaussian:
    """p(z) = N(0, I_d), p(x|z) = N(Wz + b, s2 I_n) with W = Q diag(s): orthogonal columns make the
    exact posterior diagonal, N(m, diag v) with v_j = 1 / (1 + s_j^2 / s2), m = v * W^T (x - b) / s2."""

    def __init__(self, seed, d=2, n=3):
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.normal(size=(n, d)))
        self.W = q * rng.uniform(0.5, 2.0, size=d)
        self.b = rng.normal(size=n)
        self.s2 = rng.uniform(0.2, 1.0)
        self.d, self.n = d, n

    def decoder(self, z):
        mean = z @ torch.tensor(self.W).T + torch.tensor(self.b)
        return torch.stack([mean, torch.full_like(mean, math.log(self.s2))], dim=1)   # (N, 2, n)

    def log_px(self, x):
        cov = self.W @ self.W.T + self.s2 * np.eye(self.n)
        return stats.multivariate_normal(self.b, cov).logpdf(x)

    def posterior(self, x):
        v = 1.0 / (1.0 + (self.W ** 2).sum(0) / self.s2)
        return v * ((x - self.b) @ self.W) / self.s2, v

    def exact_elbo(self, x, m, v):
        """E_q log N(x; Wz + b, s2 I) - KL(q || p(z)) for q = N(m, diag v), in closed form."""
        r = x - self.W @ m - self.b
        rec = -0.5 * (self.n * np.log(2 * np.pi * self.s2) + (r @ r + (self.W ** 2 * v).sum()) / self.s2)
        kl = 0.5 * (v.sum() + m @ m - self.d - np.log(v).sum())
        return rec - kl

    def vae(self, encoder):
        return vae.VAE(encoder, self.decoder, vae.Gaussian(), self.d)


def _encoder_at(m, v):
    """An encoder giving q(z|x) = N(m, diag v) for (copies of) the single test point x. The bounds at
    x depend on the encoder only through q(z|x) at x, so this covers every encoder there."""
    def encoder(xb):
        return torch.tensor(m).expand(len(xb), -1), torch.tensor(np.log(v)).expand(len(xb), -1)
    return encoder


def _replicate(x, r):
    return torch.tensor(x).unsqueeze(0).repeat(r, 1)


@given(st.integers(0, 2 ** 31))
def test_elbo_is_the_closed_form_and_below_log_px_for_any_encoder(seed):
    model = LinearGaussian(seed)
    rng = np.random.default_rng(seed + 1)
    x = model.b + model.W @ rng.normal(size=model.d) + rng.normal(size=model.n)
    m, v = rng.normal(size=model.d), np.exp(rng.uniform(-2, 1, size=model.d))   # an arbitrary q
    exact = model.exact_elbo(x, m, v)
    assert exact < model.log_px(x)
    # log p(x) - ELBO = KL(q || p(z|x)), both Gaussian: the gap is exactly that KL.
    pm, pv = model.posterior(x)
    kl_post = 0.5 * ((v / pv).sum() + ((m - pm) ** 2 / pv).sum() - model.d + np.log(pv / v).sum())
    assert model.log_px(x) - exact == pytest.approx(kl_post, rel=1e-8)
    net = model.vae(_encoder_at(m, v))
    xs = _replicate(x, 2000)
    g = torch.Generator().manual_seed(seed)
    _mc_close(vae.elbo(net, xs, generator=g).numpy(), exact)
    _mc_close(vae.elbo(net, xs, analytic_kl=False, generator=g).numpy(), exact)


@given(st.integers(0, 2 ** 31), st.sampled_from([2, 5, 20]))
def test_elbo_with_k_samples_averages_them_to_the_closed_form(seed, k):
    """elbo(x, k) estimates E_q[log p(x|z)] by the mean of k reparameterised samples (Kingma &
    Welling Eq. 10 with L = k): for any k its expectation is the closed-form ELBO of the
    linear-Gaussian model (a sum of the k terms would be near k times the reconstruction term)."""
    model = LinearGaussian(seed)
    rng = np.random.default_rng(seed + 2)
    x = model.b + model.W @ rng.normal(size=model.d) + rng.normal(size=model.n)
    m, v = rng.normal(size=model.d), np.exp(rng.uniform(-2, 1, size=model.d))
    net = model.vae(_encoder_at(m, v))
    xs = _replicate(x, 1000)
    g = torch.Generator().manual_seed(seed)
    exact = model.exact_elbo(x, m, v)
    for analytic in (True, False):
        _mc_close(vae.elbo(net, xs, k=k, analytic_kl=analytic, generator=g).numpy(), exact)


@given(st.integers(0, 2 ** 31))
def test_exact_posterior_makes_every_bound_equal_log_px(seed):
    model = LinearGaussian(seed)
    x = np.random.default_rng(seed + 1).normal(size=model.n) * 2
    net = model.vae(_encoder_at(*model.posterior(x)))
    xs, g = _replicate(x, 500), torch.Generator().manual_seed(seed)
    # With q = p(z|x) every weight p(x, z) / q(z|x) equals p(x): no Monte-Carlo error at all.
    np.testing.assert_allclose(vae.elbo(net, xs, analytic_kl=False, generator=g).numpy(), model.log_px(x), atol=1e-10)
    for k in (1, 7):
        np.testing.assert_allclose(vae.iwae_bound(net, xs[:20], k, chunk=3, generator=g).numpy(),
                                   model.log_px(x), atol=1e-10)
    _mc_close(vae.elbo(net, xs, generator=g).numpy(), model.log_px(x))


def test_density_grid_of_the_exact_posterior_model_is_the_exact_density():
    # 2D data, 2D latent: with q = p(z|x) at every point, L_k = log p(x) exactly, so the grid written
    # to density.npz must be log p(x) at the cell centres (row i: y_i, column j: x_j).
    model = LinearGaussian(11, d=2, n=2)

    def encoder(xb):
        m, v = model.posterior(xb.numpy())
        return torch.tensor(m), torch.tensor(np.log(v)).expand(len(xb), -1)
    net = model.vae(encoder)
    got = common.density_on_grid(vae.iwae_log_density(net, k=3, rows=40), lim=4.0, n=16, chunk=50)
    centres = -4 + 0.5 * (np.arange(16) + 0.5)
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    expected = model.log_px(np.stack([xx.ravel(), yy.ravel()], 1)).reshape(16, 16)
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_iwae_1_equals_the_elbo_with_the_same_samples():
    model = LinearGaussian(3)
    x = np.array([0.5, -1.0, 2.0])
    net = model.vae(_encoder_at(np.array([0.3, -0.2]), np.array([0.5, 2.0])))
    xs = _replicate(x, 4000)
    iwae1 = vae.iwae_bound(net, xs, 1, generator=torch.Generator().manual_seed(5))
    elbo_a = vae.elbo(net, xs, analytic_kl=False, generator=torch.Generator().manual_seed(5))
    np.testing.assert_allclose(iwae1.numpy(), elbo_a.numpy(), rtol=0, atol=1e-12)
    # The closed-form-KL ELBO uses the same z; its difference from L_1 has mean zero.
    elbo_b = vae.elbo(net, xs, generator=torch.Generator().manual_seed(5))
    _mc_close((elbo_b - iwae1).numpy(), 0.0)
    assert (elbo_b - iwae1).abs().max() > 1e-3  # estimators A and B really differ sample by sample


def test_iwae_bound_chunks_and_log_weights_against_direct_computation():
    model = LinearGaussian(4)
    x = np.array([1.0, 0.0, -1.5])
    m, v = np.array([0.1, 0.4]), np.array([0.7, 1.3])
    net = model.vae(_encoder_at(m, v))
    xs = _replicate(x, 2)
    got = vae.iwae_bound(net, xs, 10, chunk=3, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    mu, logvar = torch.tensor(m).expand(2, -1), torch.tensor(np.log(v)).expand(2, -1)
    z = torch.cat([vae.reparameterize(mu, logvar, c, g) for c in (3, 3, 3, 1)]).numpy()   # (10, 2, d)
    log_w = (stats.norm.logpdf(x, z @ model.W.T + model.b, math.sqrt(model.s2)).sum(-1)
             + stats.norm.logpdf(z).sum(-1) - stats.norm.logpdf(z, m, np.sqrt(v)).sum(-1))
    expected = np.log(np.exp(log_w).mean(0))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    assert vae.nll(net, xs, 10, chunk=4, generator=torch.Generator().manual_seed(9)).shape == (2,)


def test_iwae_bound_increases_with_k_towards_log_px():
    model = LinearGaussian(6)
    x = np.array([1.0, -0.5, 0.8])
    pm, pv = model.posterior(x)
    # A proposal wider than the posterior and shifted: finite weight variance, a clear gap at k = 1.
    net = model.vae(_encoder_at(pm + 0.5, 2.0 * pv))
    log_px = model.log_px(x)
    g = torch.Generator().manual_seed(0)
    means, ses = [], []
    for k, reps in ((1, 4000), (4, 2000), (16, 1000), (64, 500), (1024, 200)):
        b = vae.iwae_bound(net, _replicate(x, reps), k, chunk=256, generator=g).numpy()
        means.append(b.mean())
        ses.append(b.std(ddof=1) / math.sqrt(reps))
        assert b.mean() <= log_px + Z * ses[-1]            # L_k <= log p(x) (Burda et al. Thm 1)
    for i in range(len(means) - 1):                         # L_k <= L_{k'} for k < k', in expectation
        assert means[i + 1] - means[i] >= -Z * math.hypot(ses[i], ses[i + 1])
    gap_1 = log_px - means[0]
    assert gap_1 > 20 * ses[0]                              # the test has something to detect
    assert log_px - means[-1] < 0.02 * gap_1 + Z * ses[-1]  # L_k -> log p(x)


# ----------------------------------------------------------------------------------------------
# Loss, schedules, diagnostics, sampling helpers
# ----------------------------------------------------------------------------------------------

def _small_vae(likelihood=None, shape=(1, 4, 4), latent=3):
    torch.manual_seed(0)
    likelihood = likelihood or vae.Categorical(5)
    enc = vae.MLPEncoder(math.prod(shape), (16,), latent, in_scale=1 / (likelihood.levels - 1))
    dec = vae.MLPDecoder(latent, (16,), shape, likelihood.n_params)
    return vae.VAE(enc, dec, likelihood, latent).double()


def test_loss_is_the_negative_bound_it_names():
    net = _small_vae()
    x = torch.randint(0, 5, (6, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    loss, stats_ = vae.training_loss(net, x)
    torch.manual_seed(1)
    assert loss.item() == pytest.approx(-vae.elbo(net, x).mean().item(), rel=1e-12)
    assert stats_["elbo"].item() == pytest.approx(-loss.item(), rel=1e-12)
    torch.manual_seed(2)
    loss, _ = vae.training_loss(net, x, objective="iwae", k=5)
    torch.manual_seed(2)
    assert loss.item() == pytest.approx(-vae.iwae_bound(net, x, 5).mean().item(), rel=1e-12)
    # KL weight 0 leaves the reconstruction term alone.
    torch.manual_seed(3)
    rec_only, st0 = vae.training_loss(net, x, kl_scale=0.0)
    assert rec_only.item() == pytest.approx(-(st0["elbo"] + st0["kl"]).item(), rel=1e-12)


def test_training_loss_is_one_pass_of_the_model():
    """The training loss calls the model once, through its forward (so DistributedDataParallel's
    gradient hooks fire under torchrun), and is built from what that pass returns."""
    net = _small_vae()
    x = torch.randint(0, 5, (6, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    for objective, k in (("elbo", 3), ("iwae", 4)):
        calls = []

        def model(*args, **kwargs):
            calls.append(args)
            return net(*args, **kwargs)
        torch.manual_seed(4)
        loss, _ = vae.training_loss(model, x, objective, k, kl_scale=0.5, free_bits=0.1)
        assert len(calls) == 1 and calls[0][1] == k
        torch.manual_seed(4)
        mu, logvar, z, log_lik, log_q = net(x, k)
        assert log_q is None  # a Gaussian q: the KL in closed form
        assert z.shape == (k, 6, 3) and log_lik.shape == (k, 6)
        if objective == "elbo":
            kl = vae.gaussian_kl_per_dim(mu, logvar).mean(0).clamp(min=0.1).sum()
            expected = -(log_lik.mean() - 0.5 * kl)
        else:
            expected = -(torch.logsumexp(vae.log_weights(mu, logvar, z, log_lik), 0) - math.log(k)).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_free_bits_kl_against_brute_force():
    kl_dims = torch.tensor([[0.1, 2.0, 0.0], [0.3, 1.0, 0.0]])
    assert vae.free_bits_kl(kl_dims, 0.0).item() == pytest.approx(0.2 + 1.5 + 0.0)
    assert vae.free_bits_kl(kl_dims, 0.5).item() == pytest.approx(0.5 + 1.5 + 0.5)
    # Below the threshold a dimension's KL carries no gradient: the encoder may use it freely.
    kl = kl_dims.clone().requires_grad_(True)
    vae.free_bits_kl(kl, 0.5).backward()
    np.testing.assert_allclose(kl.grad.numpy(), [[0, 0.5, 0], [0, 0.5, 0]])


@given(st.floats(0.1, 2.0), st.integers(0, 2 ** 31))
def test_free_bits_clamp_the_batch_mean_of_each_kl_j(lam, seed):
    """Kingma et al. 2016 (free bits), as VAE.loss uses it: the KL term is
    sum_j max(lambda, mean_over_batch KL_j), the clamp on each latent dimension's minibatch mean,
    not on each example's KL. Dimension 0 has examples on both sides of lambda and its mean above
    it, dimension 1 examples on both sides and its mean below: clamping per example would give
    another value, and gradient to examples that the batch mean does not give (checked)."""
    rng = np.random.default_rng(seed)
    b = 6
    kl = lam * rng.uniform(1.2, 3.0, size=(b, 4))            # dimension 2: every example above
    kl[:, 0] = lam * np.array([0.1, 0.3, 2.0, 2.5, 1.5, 0.5])  # mean 1.15 lambda
    kl[:, 1] = lam * np.array([0.1, 0.2, 1.6, 0.3, 0.4, 0.6])  # mean 0.53 lambda
    kl[:, 3] = lam * rng.uniform(0.0, 0.9, size=b)             # every example below
    mu = torch.tensor(np.sqrt(2 * kl), requires_grad=True)     # KL_j = mu_j^2 / 2 at logvar = 0
    logvar = torch.zeros_like(mu)
    x = torch.tensor(rng.normal(size=(b, 3)))
    decoder = lambda z: torch.zeros(z.shape[0], 2, 3)          # p(x|z) = N(0, I): no sampling noise
    net = vae.VAE(lambda xb: (mu, logvar), decoder, vae.Gaussian(), 4)
    loss, stats_ = vae.training_loss(net, x, free_bits=lam)
    rec = stats.norm.logpdf(x.numpy()).sum(1).mean()
    batch_mean = kl.mean(0)
    assert loss.item() == pytest.approx(-(rec - np.maximum(lam, batch_mean).sum()), rel=1e-12)
    assert stats_["kl"].item() == pytest.approx(kl.sum(1).mean(), rel=1e-12)  # logged unclamped
    per_example = np.maximum(lam, kl).mean(0).sum()
    assert abs(per_example - np.maximum(lam, batch_mean).sum()) > 0.1 * lam  # the two differ here
    loss.backward()
    expected_grad = (batch_mean > lam) * mu.detach().numpy() / b  # d/dmu of mean_b mu^2 / 2
    np.testing.assert_allclose(mu.grad.numpy(), expected_grad, rtol=1e-12, atol=1e-15)
    assert expected_grad[:, 0].all() and not expected_grad[:, 1].any()


def test_kl_weight_and_burda_schedule():
    assert [vae.kl_weight(s, 10) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert vae.kl_weight(0, 0) == 1.0
    # Stage i covers passes [sum_{j<i} 3^j, sum_{j<=i} 3^j); here 10 steps make one pass.
    stage = lambda s: round(-7 * math.log10(vae.burda_lr(s, 10, 1.0)))
    passes = (0, 1, 3, 4, 12, 13, 1092, 1093, 3279, 5000)
    assert [stage(10 * p) for p in passes] == [0, 1, 1, 2, 2, 3, 6, 7, 7, 7]
    assert [stage(10 * p - 1) for p in (1, 4, 13)] == [0, 1, 2]


def test_active_units_on_a_constructed_encoder():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(500, 5))
    u = (u - u.mean(0)) / u.std(0)                     # each column has variance exactly 1
    scale = np.sqrt([0.0, 0.005, 0.009, 0.02, 1.0])    # Cov_x(E_q[z_j]) = scale_j^2
    count, var = vae.active_units(torch.tensor(u * scale))
    assert count == 2
    np.testing.assert_allclose(var.numpy(), scale ** 2, atol=1e-12)


def test_reconstruct_interpolate_and_sample_shapes_and_end_points():
    net = _small_vae()
    x = torch.randint(0, 5, (3, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 5, (3, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    path = vae.interpolate(net, x, y, steps=5)
    assert path.shape == (3, 5, 1, 4, 4)
    torch.testing.assert_close(path[:, 0], vae.reconstruct(net, x))
    torch.testing.assert_close(path[:, -1], vae.reconstruct(net, y))
    s = vae.sample(net, 7, generator=torch.Generator().manual_seed(0))
    assert s.shape == (7, 1, 4, 4) and set(s.unique().tolist()) <= set(range(5))
    m = vae.sample(net, 7, mean=True, generator=torch.Generator().manual_seed(0))
    assert ((m >= 0) & (m <= 4)).all()


def test_conv_vae_for_8_bit_colour_images():
    # The cifar10 preset's path on a small shape: auto picks the discretized logistic, and the
    # identity L_1 = ELBO estimator A (same samples) holds for any encoder and decoder.
    cfg = vae.Config(dataset="cifar10", arch="conv", channels=(4, 8), latent=3)
    info = common.DataInfo("cifar10", "image", (3, 8, 8), levels=256, num_classes=10)
    net = vae.build(cfg, info).double()
    assert isinstance(net.likelihood, vae.DiscretizedLogistic) and net.likelihood.levels == 256
    x = torch.randint(0, 256, (4, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    loss, _ = vae.training_loss(net, x)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    iwae1 = vae.iwae_bound(net, x, 1, generator=torch.Generator().manual_seed(3))
    elbo_a = vae.elbo(net, x, analytic_kl=False, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(iwae1, elbo_a, rtol=1e-12, atol=1e-9)
    s = vae.sample(net, 5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (5, 3, 8, 8) and s.min() >= 0 and s.max() <= 255 and torch.equal(s, s.round())


def test_bits_per_dim():
    assert vae.bits_per_dim(64 * math.log(2), 64) == pytest.approx(1.0)
    # a uniform categorical over 17 levels is log2(17) bits per pixel
    net = _small_vae(vae.Categorical(17), shape=(1, 2, 2))
    out = torch.zeros(1, 17, 1, 2, 2)
    nats = -net.likelihood.log_prob(torch.zeros(1, 1, 2, 2), out).item()
    assert vae.bits_per_dim(nats, 4) == pytest.approx(math.log2(17))


# ----------------------------------------------------------------------------------------------
# Data preparation and the command line, end to end
# ----------------------------------------------------------------------------------------------

def test_binarisation_draws_bernoulli_of_the_intensity():
    info = common.DataInfo("mnist", "image", (4,), levels=256)
    x = torch.tensor([0, 255, 64, 200], dtype=torch.uint8).repeat(20000, 1)
    b = vae.prepare(x, info, vae.Bernoulli(), torch.Generator().manual_seed(0))
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    for j, level in enumerate((0, 255, 64, 200)):
        _mc_close(b[:, j].numpy(), level / 255)
    again = vae.prepare(x, info, vae.Bernoulli(), torch.Generator().manual_seed(0))
    assert torch.equal(b, again)                            # the fixed evaluation binarisation
    assert vae.prepare(x, info, vae.Categorical(256)) is x   # other likelihoods score the levels


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


TINY = ["--batch-size", "16", "--hidden", "16", "--latent", "3", "--n-samples", "4"]


def test_cli_digits_train_eval_sample(tmp_path):
    out = tmp_path / "run"
    vae.main([*TINY, "--steps", "3", "--log-every", "1", "--save-every", "2", "--out", str(out)])
    for name in ("ckpt.pt", "samples_2.png", "samples_3.png", "metrics.jsonl", "loss.png", "recon.png",
                 "interp.png"):
        assert (out / name).is_file(), name
    steps = [r["step"] for r in _records(out) if "step" in r]
    assert steps == [1, 2, 3]
    diag = events(out, "diagnostics")
    assert [d["at_step"] for d in diag] == [1, 2, 3]
    assert len(diag[0]["kl_per_dim"]) == 3 and 0 <= diag[0]["active_units"] <= 3
    assert diag[0]["kl"] == pytest.approx(sum(diag[0]["kl_per_dim"]), abs=1e-3)
    fields = vae.main(["--eval", str(out / "ckpt.pt"), "--k-eval", "3"])
    assert fields["n"] == 300 and fields["k"] == 3
    assert fields["bits_per_dim"] == pytest.approx(fields["nll"] / (64 * math.log(2)))
    assert fields["elbo_bits_per_dim"] == pytest.approx(-fields["elbo"] / (64 * math.log(2)))
    assert 0 < fields["bits_per_dim"] < 2 * math.log2(17)   # a 17-level discrete likelihood
    assert events(out, "eval")[-1]["nll"] == pytest.approx(fields["nll"])
    vae.main(["--sample", str(out / "ckpt.pt"), "--n-samples", "5"])
    assert (out / "samples.png").is_file() and events(out, "sample")[-1]["n"] == 5


def test_cli_resume_is_exact(tmp_path):
    # Dynamic binarisation, KL warm-up and the staged schedule all depend on the step and the RNG.
    args = [*TINY, "--likelihood", "bernoulli", "--kl-warmup", "3", "--lr-schedule", "burda",
            "--log-every", "1", "--save-every", "100"]
    whole, half = tmp_path / "whole", tmp_path / "half"
    vae.main([*args, "--steps", "4", "--out", str(whole)])
    vae.main([*args, "--steps", "2", "--out", str(half)])
    middle = torch.load(half / "ckpt.pt", weights_only=True)["model"]
    vae.main([*args, "--steps", "4", "--out", str(half), "--resume"])
    a = torch.load(whole / "ckpt.pt", weights_only=True)
    b = torch.load(half / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert any(not torch.equal(middle[k], b["model"][k]) for k in middle)   # the resumed call trained


def _write_idx(path, array):
    """A gzipped IDX file as LeCun publishes MNIST: magic 2051 (images) / 2049 (labels), big-endian sizes."""
    array = np.asarray(array, dtype=np.uint8)
    magic = 2051 if array.ndim == 3 else 2049
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def test_cli_mnist_format_offline(tmp_path):
    # The cache layout common.load_dataset reads: <data dir>/mnist/<official file names>.
    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    for prefix, n in (("train", 24), ("t10k", 6)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    out = tmp_path / "run"
    base = ["--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--out", str(out)]
    vae.main([*base, "--steps", "2", "--batch-size", "4", "--hidden", "8", "--latent", "2", "--n-samples", "4"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["activation"] == "tanh" and ckpt["config"]["adam_eps"] == 1e-4   # Burda et al. preset
    assert ckpt["data"]["levels"] == 256 and (out / "latent.png").is_file()
    fields = vae.main([*base, "--eval", str(out / "ckpt.pt"), "--k-eval", "2"])
    assert fields["n"] == 6
    assert fields["bits_per_dim"] == pytest.approx(fields["nll"] / (784 * math.log(2)))


def test_cli_2d_points_density(tmp_path):
    out = tmp_path / "run"
    vae.main(["--dataset", "8gaussians", "--steps", "3", "--batch-size", "32", "--hidden", "16",
              "--objective", "iwae", "--k", "4", "--free-bits", "0", "--out", str(out)])
    assert (out / "latent.png").is_file() and (out / "samples_3.png").is_file()
    fields = vae.main(["--eval", str(out / "ckpt.pt"), "--k-eval", "2", "--k-density", "3"])
    assert "bits_per_dim" not in fields and fields["n"] == 10000 and "true_entropy" in fields
    saved = np.load(out / "density.npz")
    assert saved["log_density"].shape == (128, 128) and float(saved["lim"]) == 4.0
    assert np.isfinite(saved["log_density"]).all() and (out / "density.png").is_file()


@pytest.mark.parametrize("args, words", [
    (["--objective", "iwae", "--free-bits", "0.5"], "--objective iwae"),
    (["--dataset", "rings", "--objective", "iwae"], "add --free-bits 0"),
    (["--likelihood", "gaussian"], "does not fit image data"),
    (["--dataset", "8gaussians", "--likelihood", "bernoulli"], "does not fit points data"),
    (["--arch", "conv", "--channels", "8,8,8,8"], "divide by"),
    (["--k", "0"], "--k 0 is out of range"),
    (["--posterior", "planar", "--free-bits", "0.5"], "set --free-bits 0"),
    (["--dataset", "rings", "--posterior", "iaf"], "set --free-bits 0"),
    (["--posterior", "iaf", "--svi-steps", "3"], "accepted: --posterior gaussian"),
    (["--svi-steps", "3", "--objective", "iwae"], "accepted with it: --objective elbo"),
    (["--svi-steps", "3", "--compile"], "drop --compile"),
    (["--svi-steps", "-1"], "--svi-steps -1 is out of range"),
    (["--svi-lr", "0"], "--svi-lr 0.0 is out of range"),
    (["--svi-max-grad-norm", "-1"], "--svi-max-grad-norm -1.0 is out of range"),
    (["--flow-length", "0"], "--flow-length 0 is out of range"),
    (["--posterior", "sylvester"], "invalid choice"),
])
def test_user_mistakes_are_one_line_errors(args, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        vae.main([*args, "--steps", "1", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


# ----------------------------------------------------------------------------------------------
# Issue 16: what a run logs and draws
# ----------------------------------------------------------------------------------------------

def test_torchrun_logs_each_loss_once_averaged_over_the_processes(tmp_path):
    """Under torchrun vae.py logged the loss at twice its value (a second mean of a tensor that the
    first had reduced in place). On two gloo processes the loss logged at step 1 must be the loss
    of one process on the whole global batch (each half with its process's noise), recomputed
    here from the seeds training uses; and at every step the logged loss is -ELBO (no warm-up, no
    free bits), each mean taken once."""
    torch.set_default_dtype(torch.float32)  # as training runs
    out = tmp_path / "two"
    r = torchrun("vae", [*TINY, "--batch-size", "32", "--steps", "2", "--log-every", "1", "--save-every", "100",
                         "--out", out])
    assert r.returncode == 0, r.stderr[-2000:]
    logged = [m for m in _records(out) if "step" in m]
    assert [m["step"] for m in logged] == [1, 2]
    for m in logged:
        assert m["loss"] == pytest.approx(-m["elbo"], rel=1e-5), m
    cfg, info = common.saved_config(vae.Config, common.load_checkpoint(out / "ckpt.pt"))
    assert cfg.kl_warmup == 0 and cfg.free_bits == 0 and cfg.objective == "elbo"
    ds = common.load_dataset(info.name)
    losses, elbos = [], []
    for rank in (0, 1):  # train's order: seed, build, batches; then seed + rank for the noise
        common.seed_everything(cfg.seed)
        net = vae.build(cfg, info)
        x, _ = next(common.Batches(ds, cfg.batch_size, common._Dist(rank=rank, world_size=2), seed=cfg.seed))
        common.seed_everything(cfg.seed + rank)
        loss, stats_ = vae.training_loss(net, vae.prepare(x, info, net.likelihood), cfg.objective, cfg.k)
        losses.append(loss.item())
        elbos.append(stats_["elbo"].item())
    assert logged[0]["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert logged[0]["elbo"] == pytest.approx(sum(elbos) / 2, rel=1e-5)


def test_recon_grid_says_which_rows_are_inputs_and_which_reconstructions(tmp_path, monkeypatch):
    """recon.png mixes rows of inputs and rows of their reconstructions: its title names the rows
    of each kind, and the rows are what the title says (the inputs, and the decoder's mean at the
    posterior mean of the inputs of the same column)."""
    torch.set_default_dtype(torch.float32)  # as training runs
    grids = {}
    draw = vae.save_image_grid

    def record(x, path, levels=None, nrow=None, title=None):
        grids[path.name] = (x.clone(), nrow, title)
        draw(x, path, levels=levels, nrow=nrow, title=title)
    monkeypatch.setattr(vae, "save_image_grid", record)
    out = tmp_path / "run"
    vae.main([*TINY, "--steps", "1", "--out", str(out)])
    grid, nrow, title = grids["recon.png"]
    found = {kind: re.search(rf"rows? ([\d, ]+): {kind}", title or "") for kind in ("inputs", "their reconstructions")}
    assert all(found.values()), title
    inputs, recons = ([int(v) for v in m.group(1).split(", ")] for m in found.values())
    rows = grid.view(-1, nrow, *grid.shape[1:])
    assert sorted(inputs + recons) == list(range(1, len(rows) + 1)) and len(inputs) == len(recons)
    net, cfg, info = vae.load(out / "ckpt.pt")
    data = common.load_dataset(info.name).data
    for i, (a, b) in enumerate(zip(inputs, recons)):
        x = data[i * nrow:(i + 1) * nrow]
        torch.testing.assert_close(rows[a - 1], x.float() / (info.levels - 1))
        torch.testing.assert_close(rows[b - 1], vae.reconstruct(net, x) / (info.levels - 1))
    assert grids["interp.png"][2]  # one kind of row, titled too: what a row is


# ----------------------------------------------------------------------------------------------
# The mathematics and the networks without common.py
# ----------------------------------------------------------------------------------------------

def test_mathematics_runs_without_common(without_common):
    """vae.py up to its Configuration section, run with common.py replaced by a module whose every
    name fails: the losses (with KL warm-up and free bits, and IWAE), the ELBO and the IWAE bound,
    the evaluation helpers, sampling and the latent space, for each likelihood and both networks.
    (torch.equal and torch.allclose, not torch.testing's comparison: its first use imports
    torch.distributed.tensor, whose import walks sys.modules with inspect and reads
    common.__file__, which the stand-in poisons.)"""
    m = without_common("vae")
    g = lambda seed: torch.Generator().manual_seed(seed)
    shape = (1, 4, 4)
    levels = torch.randint(0, 5, (6, *shape), generator=g(0))
    cases = [(m.Bernoulli(), (levels > 2).double()), (m.Categorical(5), levels), (m.DiscretizedLogistic(5), levels),
             (m.Gaussian(), torch.randn(6, *shape, generator=g(1)))]
    for arch in ("mlp", "conv"):
        for lik, x in cases:
            torch.manual_seed(0)
            scale = 1.0 if lik.levels is None else 1 / (lik.levels - 1)
            if arch == "mlp":
                enc, dec = m.MLPEncoder(16, (8,), 3, in_scale=scale), m.MLPDecoder(3, (8,), shape, lik.n_params)
            else:
                enc = m.ConvEncoder(shape, (4,), 3, in_scale=scale)
                dec = m.ConvDecoder(shape, (4,), 3, lik.n_params)
            net = m.VAE(enc, dec, lik, 3).double()
            weight = m.kl_weight(1, 4)
            torch.manual_seed(1)
            loss, stats_ = m.training_loss(net, x, "elbo", 2, weight, free_bits=0.5)
            torch.manual_seed(1)
            mu, logvar, z, log_lik, _ = net(x, 2)
            kl = m.free_bits_kl(m.gaussian_kl_per_dim(mu, logvar), 0.5)
            assert weight == 0.25 and loss.item() == pytest.approx(-(log_lik.mean() - weight * kl).item(), rel=1e-12)
            assert stats_["kl"].item() == pytest.approx(m.gaussian_kl(mu, logvar).mean().item(), rel=1e-12)
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in net.parameters())
            iwae_loss, iwae_stats = m.training_loss(net, x, "iwae", 3)
            assert iwae_loss.item() == pytest.approx(-iwae_stats["iwae_bound"].item())
            elbo_a = m.elbo(net, x, analytic_kl=False, generator=g(3))
            assert torch.allclose(m.iwae_bound(net, x, 1, generator=g(3)), elbo_a, rtol=1e-12, atol=1e-12)
            bound = m.iwae_bound(net, x, 7, chunk=3, generator=g(4))
            assert torch.equal(m.nll(net, x, 7, chunk=3, generator=g(4)), -bound)
            assert m.elbo(net, x, k=2, generator=g(5)).shape == bound.shape == (6,)
            elbos, bounds = m.dataset_bounds(net, x, 4, rows=8)
            assert elbos.shape == bounds.shape == (6,) and torch.isfinite(bounds).all()
            assert m.sample(net, 5, generator=g(6)).shape == m.sample(net, 5, mean=True).shape == (5, *shape)
            path = m.interpolate(net, x[:2], x[2:4], steps=3)
            assert torch.allclose(path[:, 0], m.reconstruct(net, x[:2]), rtol=1e-12, atol=1e-12)
            assert len(m.diagnostics(net, x)["kl_per_dim"]) == 3
    points = m.VAE(m.MLPEncoder(2, (8,), 2), m.MLPDecoder(2, (8,), (2,), 2), m.Gaussian(), 2)
    log_density = m.iwae_log_density(points, k=3, rows=16)(torch.zeros(5, 2))
    assert log_density.shape == (5,) and torch.isfinite(log_density).all()
    assert m.active_units(torch.eye(4))[0] == 4 and m.active_units(torch.zeros(4, 3))[0] == 0
    assert m.bits_per_dim(math.log(2), 1) == pytest.approx(1.0) and m.burda_lr(0, 10, 1.0) == 1.0
    # the posteriors of issue 23: flows (planar, radial, IAF) and SA-VAE's refinement
    x = torch.randn(6, *shape, generator=g(7))
    for flow, svi_steps in ((m.PlanarFlow(3, 2), 0), (m.RadialFlow(3, 2), 0), (m.IAF(3, 2, (8,), 4), 0), (None, 2)):
        torch.manual_seed(0)
        enc = m.MLPEncoder(16, (8,), 3, extra=0 if flow is None else flow.n_context)
        net = m.VAE(enc, m.MLPDecoder(3, (8,), shape, 2), m.Gaussian(), 3, flow, svi_steps, 0.1).double()
        loss, stats_ = m.training_loss(net, x, "elbo", 2, 0.5)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters()) and torch.isfinite(stats_["kl"])
        with torch.no_grad():
            elbos, bounds = m.dataset_bounds(net, x, 4, rows=8)
        assert torch.isfinite(elbos).all() and torch.isfinite(bounds).all()
        assert m.reconstruct(net, x).shape == x.shape


# ----------------------------------------------------------------------------------------------
# Flows in the posterior (Rezende & Mohamed 2015; IAF, Kingma et al. 2016) and SA-VAE (Kim et al. 2018)
# ----------------------------------------------------------------------------------------------

def _jacobian(f, z):
    """The Jacobian (D, D) of a map R^D -> R^D at one point z (D,), by autograd."""
    return torch.autograd.functional.jacobian(f, z)


raw = st.floats(-4, 4)


@given(st.integers(1, 4), st.data())
def test_planar_log_det_is_slogdet_of_the_autograd_jacobian(d, data):
    """Random u, w, b, most of them with w^T u < -1 (the raw planar map is then not invertible):
    after App. A.1, w^T u^ > -1, det > 0, and log|det| is slogdet of the Jacobian."""
    # |u|, |w| <= 2 per coordinate: w^T u >= -16 keeps 1 + u^T psi >= softplus(-16) ~ 1e-7, where
    # float64 still gives log|det| to ~1e-9 both ways (nearer -1 both lose digits alike)
    u, w = (0.5 * torch.tensor(data.draw(st.lists(raw, min_size=d, max_size=d))) for _ in range(2))
    z = torch.tensor(data.draw(st.lists(raw, min_size=d, max_size=d)))
    w = w + 0.1 * torch.sign(w) + (w == 0) * 0.1               # ||w|| > 0
    u = u - 1.5 * w / w.norm() if data.draw(st.booleans()) else u  # often w^T u < -1 before A.1
    b = torch.tensor([data.draw(raw)])
    assert (vae.planar_u_hat(u, w) * w).sum() > -1
    f, log_det = vae.planar(z, u, w, b)
    sign, expected = torch.linalg.slogdet(_jacobian(lambda v: vae.planar(v, u, w, b)[0], z))
    assert sign == 1 and log_det.item() == pytest.approx(expected.item(), abs=1e-8)


@given(st.integers(1, 4), st.data())
def test_radial_log_det_is_slogdet_of_the_autograd_jacobian(d, data):
    """Raw a, b anywhere (beta = -alpha + softplus(b) >= -alpha by construction, even where the raw b
    is far below -alpha): det > 0 and log|det| (Eq. 14) is slogdet of the Jacobian."""
    z, z0 = (torch.tensor(data.draw(st.lists(raw, min_size=d, max_size=d))) for _ in range(2))
    a, b = torch.tensor([data.draw(raw)]), torch.tensor([data.draw(st.floats(-8, 4))])
    if (z - z0).norm() < 1e-3:
        z = z + 0.1
    f, log_det = vae.radial(z, z0, a, b)
    sign, expected = torch.linalg.slogdet(_jacobian(lambda v: vae.radial(v, z0, a, b)[0], z))
    assert sign == 1 and log_det.item() == pytest.approx(expected.item(), abs=1e-9)


def _iaf(d, length, seed, scale=1.0, context=3):
    torch.manual_seed(seed)
    flow = vae.IAF(d, length, (8, 8), context).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(scale)
    return flow


@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 2 ** 31))
def test_iaf_is_autoregressive_and_its_log_det_is_slogdet(d, length, seed):
    """MADE's (m, s) at output i depend only on inputs of lower degree (a strictly triangular
    Jacobian in the step's ordering, ascending or reversed), each IAF step's Jacobian is triangular
    with diagonal sigma, the composed flow's Jacobian is the product of the steps', and sum log sigma
    is slogdet of that product."""
    flow = _iaf(d, length, seed, scale=2.0)
    g = torch.Generator().manual_seed(seed)
    z, h = torch.randn(d, generator=g), torch.randn(1, 3, generator=g)
    total = torch.eye(d, dtype=torch.float64)
    zt = z
    for t, made in enumerate(flow.steps):
        lower = t % 2 == 0  # ascending ordering on even steps, reversed on odd ones
        tri = (lambda a: torch.tril(a, -1)) if lower else (lambda a: torch.triu(a, 1))
        for out in range(2):
            jm = _jacobian(lambda v: made(v.unsqueeze(0), h)[out][0], zt)
            assert torch.equal(jm, tri(jm)), (t, out)
        step = vae.IAF(d, 1, (8, 8), 3).double()
        step.steps[0] = made
        js = _jacobian(lambda v: step(v.unsqueeze(0), h)[0][0], zt)
        sigma = torch.sigmoid(made(zt.unsqueeze(0), h)[1][0])
        torch.testing.assert_close(js.diagonal(), sigma, rtol=1e-12, atol=1e-14)
        assert torch.equal(js - torch.diag(js.diagonal()), tri(js))
        total = js @ total
        zt = step(zt.unsqueeze(0), h)[0][0]
    z_k, log_det = flow(z.unsqueeze(0), h)
    torch.testing.assert_close(z_k[0], zt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_jacobian(lambda v: flow(v.unsqueeze(0), h)[0][0], z), total, rtol=1e-10, atol=1e-12)
    sign, expected = torch.linalg.slogdet(total)
    assert sign == 1 and log_det.item() == pytest.approx(expected.item(), abs=1e-10)


def test_made_masks_follow_germain_et_al():
    """The masks themselves: output d sees hidden units of degree < d, hidden units see inputs of
    degree <= theirs; with D = 1 the outputs see no input at all."""
    order = torch.tensor([2, 3, 1])
    m1, m2, out = vae.made_masks(order, (4, 5))
    deg1 = torch.tensor([1, 2, 1, 2])
    assert torch.equal(m1, (deg1[:, None] >= order[None, :]).float())
    assert out.shape == (3, 5) and not out[order == 1].any()   # the first in the ordering sees nothing
    first, last = vae.made_masks(torch.tensor([1]), (3,))
    assert not first.any() and last.all()   # D = 1: hidden units see no input; (m, s) are biases and context


class _FlowOracle:
    """An encoder for 2D latents that gives q0 = N(m, diag v) and a fixed h for every x."""

    def __init__(self, m, v, h):
        self.m, self.logvar, self.h = torch.tensor(m), torch.tensor(np.log(v)), h

    def __call__(self, xb):
        n = len(xb)
        out = (self.m.expand(n, -1), self.logvar.expand(n, -1))
        return out if self.h is None else (*out, self.h.expand(n, -1))


def _flow_vae(kind, model, m, v, seed=0, length=3):
    """A VAE over the linear-Gaussian model with q0 = N(m, v) and a `kind` posterior whose flow
    deforms q0 strongly (random parameters of unit to double scale)."""
    d = model.d
    g = torch.Generator().manual_seed(seed)
    flow = {"gaussian": None, "planar": vae.PlanarFlow(d, length), "radial": vae.RadialFlow(d, length),
            "iaf": _iaf(d, length, seed, scale=2.0, context=3)}[kind]
    h = None if flow is None else 1.5 * torch.randn(1, flow.n_context, generator=g)
    return vae.VAE(_FlowOracle(m, v, h), model.decoder, vae.Gaussian(), d, flow)


KINDS = ["gaussian", "planar", "radial", "iaf"]


@pytest.mark.parametrize("kind", KINDS)
def test_q_k_integrates_to_one_on_a_2d_latent_grid(kind):
    """Quadrature of q_K over the z_K plane on the grid that the flow makes of a square grid of
    z0 = mu + sigma eps: each cell's image is a quadrilateral whose area is measured from its
    mapped corners (shoelace formula, no Jacobian), and sum_cells q_K(f(centre)) area = 1 to the
    grid's O(h^2), with q_K = q0 / |det| as VAE.forward computes it. A wrong log-det would be off by
    E[|det|^(+-1)] - 1, which the check that the cells' areas vary by a factor > 2 makes large."""
    model = LinearGaussian(5, d=2, n=3)
    net = _flow_vae(kind, model, [0.3, -0.5], [0.6, 1.4], seed=1)
    x = torch.zeros(1, 3)
    mu, logvar, h = net.encode(x)
    # forward's log q for one draw, recomputed from the same eps: the pass uses this very density
    g = torch.Generator().manual_seed(3)
    _, _, z, _, log_q = net(x, 5, generator=g)
    eps = torch.randn(5, *mu.shape, generator=torch.Generator().manual_seed(3))
    z0 = mu + (0.5 * logvar).exp() * eps
    z_k, log_det = (z0, 0) if net.flow is None else net.flow(z0, h)
    torch.testing.assert_close(z, z_k, rtol=1e-12, atol=1e-12)
    if kind == "gaussian":
        assert log_q is None
    else:
        torch.testing.assert_close(log_q, vae.log_normal(z0, mu, logvar) - log_det, rtol=1e-12, atol=1e-12)
    n, lim = 500, 8.0
    e = torch.linspace(-lim, lim, n + 1)
    corners = torch.stack(torch.meshgrid(e, e, indexing="ij"), -1)                 # (n+1, n+1, 2)
    centres = (corners[:-1, :-1] + corners[1:, 1:]) / 2

    def push(eps):
        z0 = mu + (0.5 * logvar).exp() * eps.reshape(-1, 2).unsqueeze(1)          # (M, 1, 2)
        if net.flow is None:
            return z0[:, 0].reshape(eps.shape), vae.log_normal(z0, mu, logvar)[:, 0].reshape(eps.shape[:-1])
        zk, ld = net.flow(z0, h)
        return zk[:, 0].reshape(eps.shape), (vae.log_normal(z0, mu, logvar) - ld)[:, 0].reshape(eps.shape[:-1])
    with torch.no_grad():
        zc, log_qk = push(centres)
        zq, _ = push(corners)
    p = [zq[:-1, :-1], zq[1:, :-1], zq[1:, 1:], zq[:-1, 1:]]                      # the quadrilateral, in order
    area = 0.5 * sum(a[..., 0] * b[..., 1] - b[..., 0] * a[..., 1] for a, b in zip(p, p[1:] + p[:1]))
    assert (area > 0).all() or (area < 0).all()                                    # invertible: no cell folds
    area = area.abs()
    total = (log_qk.exp() * area).sum().item()
    assert total == pytest.approx(1.0, abs=2e-3), total
    if kind != "gaussian":
        ratio = area / area.median()
        inner = log_qk.exp() * area > 1e-6
        assert ratio[inner].max() / ratio[inner].min() > 2                          # the flow deforms q0


@pytest.mark.parametrize("kind", KINDS[1:])
def test_flow_bounds_stay_below_log_px_and_rise_with_k(kind):
    """Linear-Gaussian model, log p(x) exact: with any flow posterior the ELBO (Eq. 15) and L_k are
    below log p(x) (within 5 standard errors), and L_k rises with k towards it."""
    model = LinearGaussian(7, d=2, n=3)
    x = np.array([1.0, -0.5, 0.8])
    pm, pv = model.posterior(x)
    net = _flow_vae(kind, model, pm + 0.3, 1.5 * pv, seed=2)
    log_px = model.log_px(x)
    xs, g = _replicate(x, 3000), torch.Generator().manual_seed(0)
    e = vae.elbo(net, xs, generator=g).detach().numpy()
    assert e.mean() < log_px + Z * e.std() / math.sqrt(len(e))
    means = []
    for k, reps in ((1, 3000), (16, 500), (256, 100)):
        b = vae.iwae_bound(net, xs[:reps], k, chunk=64, generator=g).detach().numpy()
        se = b.std(ddof=1) / math.sqrt(reps)
        assert b.mean() <= log_px + Z * se
        means.append((b.mean(), se))
    assert means[-1][0] - means[0][0] > 5 * math.hypot(means[0][1], means[-1][1])   # L_k rises with k
    assert log_px - means[0][0] > 10 * means[0][1]                                   # there is a gap


def test_a_flow_that_reaches_the_true_posterior_closes_the_gap():
    """One IAF step whose MADE weights are zero is the affine map z -> sigma z + (1 - sigma) m with
    sigma, m from its biases: set so that it carries q0 = N(m0, v0) exactly onto p(z|x), every
    weight equals p(x) and every bound is log p(x) (no Monte-Carlo error), while q0 alone has a
    gap KL(q0 || p(z|x)) > 0."""
    model = LinearGaussian(9, d=2, n=3)
    x = np.array([0.4, 1.1, -0.7])
    pm, pv = model.posterior(x)
    m0, v0 = pm - 0.8, 3.0 * pv
    sigma = np.sqrt(pv / v0)
    m = (pm - sigma * m0) / (1 - sigma)
    flow = vae.IAF(2, 1, (4,), 3).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.zero_()
        flow.steps[0].out.bias.copy_(torch.tensor(np.concatenate([m, np.log(sigma / (1 - sigma))])))
    h = torch.zeros(1, 3)
    exact = vae.VAE(_FlowOracle(m0, v0, h), model.decoder, vae.Gaussian(), 2, flow)
    base = vae.VAE(_FlowOracle(m0, v0, None), model.decoder, vae.Gaussian(), 2)
    xs, g = _replicate(x, 400), torch.Generator().manual_seed(1)
    log_px = model.log_px(x)
    np.testing.assert_allclose(vae.elbo(exact, xs, generator=g).detach().numpy(), log_px, atol=1e-10)
    np.testing.assert_allclose(vae.iwae_bound(exact, xs[:20], 7, generator=g).detach().numpy(), log_px, atol=1e-10)
    assert log_px - model.exact_elbo(x, m0, v0) > 0.5
    _mc_close(vae.elbo(base, xs, generator=g).numpy(), model.exact_elbo(x, m0, v0))


def test_svi_steps_do_not_decrease_the_elbo_and_close_the_gap():
    """Kim et al. Alg. 1's inner loop in the linear-Gaussian model, where ELBO(m, v) is exact: with
    a small step and a gradient from many samples each step raises the exact ELBO of every example,
    and the gap to log p(x) (the Gaussian family holds p(z|x)) shrinks towards 0."""
    model = LinearGaussian(12, d=2, n=3)
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(4, 3)) * 2
    mu = torch.tensor(rng.normal(size=(4, 2)))
    logvar = torch.tensor(rng.uniform(-1.5, 1.5, size=(4, 2)))
    net = model.vae(None)
    exact = lambda m, lv: np.array([model.exact_elbo(x, mi, vi) for x, mi, vi in
                                    zip(xs, m.numpy(), lv.exp().numpy())])
    g = torch.Generator().manual_seed(0)
    values = [exact(mu, logvar)]
    with torch.no_grad():
        for _ in range(30):
            mu, logvar = vae.svi_refine(net.log_likelihood, torch.tensor(xs), mu, logvar, 1, 0.05, g, k=4000)
            values.append(exact(mu, logvar))
    values = np.array(values)
    assert (np.diff(values, axis=0) > 0).all(), np.diff(values, axis=0).min()
    gaps = model.log_px(xs) - values
    assert (gaps[-1] < 0.2 * gaps[0]).all(), (gaps[0], gaps[-1])


def test_svi_step_clips_each_examples_gradient_against_finite_differences():
    """One SVI step with clipping (Kim et al.'s code, svi_max_grad_norm): the gradient of each
    example's ELBO (the noise fixed) with respect to mu and to logvar by central differences, its
    norm brought down to c where it exceeds c and left alone below, gives the step; an example's
    step does not depend on the other examples of the batch."""
    net = _svi_net()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1)) * 3
    mu, logvar = (t.detach() for t in net.posterior(x))
    eps = torch.randn((1, *mu.shape), generator=torch.Generator().manual_seed(5))

    def elbo_i(i, m, lv):  # the ELBO of example i at (m, lv) with its noise eps[:, i]
        z = (m + (0.5 * lv).exp() * eps[:, i]).view(1, 1, -1)
        return (net.log_likelihood(x[i:i + 1], z)[0, 0] - vae.gaussian_kl(m, lv)).item()

    def fd_grad(i, which):
        g, h = np.zeros(2), 1e-6
        for j in range(2):
            lam = [mu[i].clone(), logvar[i].clone()]
            lam[which][j] += h
            up = elbo_i(i, *lam)
            lam[which][j] -= 2 * h
            g[j] = (up - elbo_i(i, *lam)) / (2 * h)
        return g
    grads = [np.array([fd_grad(i, w) for i in range(len(x))]) for w in (0, 1)]   # (B, D) each
    norms = np.linalg.norm(np.concatenate(grads), axis=1)
    c = float(np.median(norms))
    with torch.no_grad():
        got = vae.svi_refine(net.log_likelihood, x, mu, logvar, 1, 0.3, torch.Generator().manual_seed(5),
                             max_norm=c)
    for lam, g, new in zip((mu, logvar), grads, got):
        n = np.linalg.norm(g, axis=1, keepdims=True)
        clipped = g * np.minimum(1.0, c / n)
        np.testing.assert_allclose(new.numpy(), lam.numpy() + 0.3 * clipped, rtol=1e-6, atol=1e-8)
    assert (norms > 1.01 * c).any() and (norms < 0.99 * c).any()   # both cases occur
    step = np.linalg.norm((got[0] - mu).numpy(), axis=1)
    assert step.max() <= 0.3 * c * (1 + 1e-9)
    np.testing.assert_allclose(vae.clip_norm(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0).numpy(),
                               [[0.6, 0.8], [0.3, 0.4]], rtol=1e-12)
    assert torch.equal(vae.clip_norm(torch.tensor([[3.0, 4.0]]), 0.0), torch.tensor([[3.0, 4.0]]))


def _svi_net(svi_steps=3, max_norm=0.0):
    torch.manual_seed(0)
    enc = vae.MLPEncoder(3, (5,), 2, activation="tanh")
    dec = vae.MLPDecoder(2, (5,), (3,), 2, activation="tanh")
    return vae.VAE(enc, dec, vae.Gaussian(), 2, svi_steps=svi_steps, svi_lr=0.2, svi_max_norm=max_norm).double()


@pytest.mark.parametrize("max_norm", [0.0, 0.5])  # 0.5: the first step clips 3 of the 4 examples' mu-gradients
def test_svi_gradient_through_the_unrolled_steps_matches_finite_differences(max_norm):
    """The SA-VAE loss -ELBO(lambda_K) with the noise fixed (a seeded generator) is a smooth function
    of every weight; its autograd gradient through the K unrolled steps (create_graph) matches
    central differences for encoder and decoder weights (Alg. 1 differentiates both through the
    steps), and differs from the gradient with the steps cut off (lambda_K treated as lambda_0 +
    a constant): the second-order terms matter. With clipping, through the clipping too."""
    net = _svi_net(max_norm=max_norm)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))

    def loss():
        return -vae.elbo(net, x, generator=torch.Generator().manual_seed(2)).sum()
    params = [net.encoder.net[0].weight, net.encoder.net[2].weight, net.decoder.net[0].weight]
    grads = torch.autograd.grad(loss(), params)
    for p, grad in zip(params, grads):
        for idx in [(0, 0), (1, 2), (3, 1)]:
            idx = tuple(i % s for i, s in zip(idx, p.shape))
            with torch.no_grad():
                p[idx] += 1e-6
                up = loss().item()
                p[idx] -= 2e-6
                down = loss().item()
                p[idx] += 1e-6
            assert grad[idx].item() == pytest.approx((up - down) / 2e-6, rel=1e-5, abs=1e-7)
    # cut: the refined parameters as lambda_0 + (lambda_K - lambda_0).detach()
    mu0, logvar0 = net.posterior(x)
    g = torch.Generator().manual_seed(2)
    mu_k, logvar_k = vae.svi_refine(net.log_likelihood, x, mu0, logvar0, 3, 0.2, g, max_norm=max_norm)
    mu_c, logvar_c = mu0 + (mu_k - mu0).detach(), logvar0 + (logvar_k - logvar0).detach()
    z = vae.reparameterize(mu_c, logvar_c, 1, g)
    cut = -(net.log_likelihood(x, z)[0] - vae.gaussian_kl(mu_c, logvar_c)).sum()
    assert cut.item() == pytest.approx(loss().item(), rel=1e-12)        # the same value ...
    cut_grad = torch.autograd.grad(cut, params[0])[0]
    assert (cut_grad - grads[0]).abs().max() > 1e-3 * grads[0].abs().max()  # ... another gradient


# --- the command line

@pytest.mark.parametrize("flags", [["--posterior", "planar"], ["--posterior", "radial"],
                                   ["--posterior", "iaf", "--flow-length", "2"], ["--svi-steps", "2"]])
def test_cli_posterior_train_eval_sample(flags, tmp_path):
    out = tmp_path / "run"
    run_main("vae", [*TINY, *flags, "--steps", "3", "--log-every", "1", "--out", out])
    cfg = common.load_checkpoint(out / "ckpt.pt")["config"]
    assert cfg["posterior"] == (flags[1] if flags[0] == "--posterior" else "gaussian")
    assert cfg["svi_steps"] == (2 if "--svi-steps" in flags else 0)
    logged = [r for r in _records(out) if "step" in r]
    assert [r["step"] for r in logged] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in logged)
    fields = run_main("vae", ["--eval", out / "ckpt.pt", "--k-eval", "3"])   # no flag repeated
    assert fields["nll"] == pytest.approx(events(out, "eval")[-1]["nll"]) and math.isfinite(fields["nll"])
    if "--svi-steps" in flags:
        assert fields["amortization_gap"] == pytest.approx(fields["svi_elbo"] - fields["elbo"])
    else:
        assert "amortization_gap" not in fields
    run_main("vae", ["--sample", out / "ckpt.pt", "--n-samples", "5"])
    assert events(out, "sample")[-1]["n"] == 5


def test_cli_flow_on_2d_points_with_density(tmp_path):
    out = tmp_path / "run"
    run_main("vae", ["--dataset", "8gaussians", "--posterior", "radial", "--free-bits", "0", "--steps", "3",
                     "--batch-size", "32", "--hidden", "16", "--out", out])
    assert (out / "latent.png").is_file()
    fields = run_main("vae", ["--eval", out / "ckpt.pt", "--k-eval", "2", "--k-density", "2"])
    assert np.isfinite(np.load(out / "density.npz")["log_density"]).all() and "true_entropy" in fields


@pytest.mark.parametrize("flags", [["--posterior", "iaf"], ["--svi-steps", "2"]])
def test_cli_resume_with_a_posterior_is_exact(flags, tmp_path):
    args = [*TINY, *flags, "--log-every", "1", "--save-every", "100"]
    whole, half = tmp_path / "whole", tmp_path / "half"
    run_main("vae", [*args, "--steps", "4", "--out", whole])
    run_main("vae", [*args, "--steps", "2", "--out", half])
    run_main("vae", [*args, "--steps", "4", "--out", half, "--resume"])
    a, b = (common.load_checkpoint(d / "ckpt.pt")["model"] for d in (whole, half))
    assert all(torch.equal(a[key], b[key]) for key in a)
    loss = [{r["step"]: r["loss"] for r in _records(d) if "step" in r} for d in (whole, half)]
    assert loss[0][4] == loss[1][4]
