"""Tests of ddpm.py: the mathematics against independent computations, exact oracles for
Gaussian data, and the command line end to end."""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch
from conftest import events, torchrun
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import common
import ddpm
from ddpm import (GaussianDiffusion, cosine_beta_schedule, discretized_gaussian_log_likelihood,
                  linear_beta_schedule, normal_kl)

f64 = torch.float64


def random_betas(seed, T):
    g = torch.Generator().manual_seed(seed)
    return 1e-3 + 0.3 * torch.rand(T, generator=g, dtype=f64)


def index(T, t, n):
    return torch.full((n,), t, dtype=torch.long)


# ---------------------------------------------------------------------------- forward process

@given(seed=st.integers(0, 10_000), T=st.integers(1, 30), data=st.data())
def test_q_sample_matches_step_by_step_composition(seed, T, data):
    t = data.draw(st.integers(0, T - 1))
    betas = random_betas(seed, T)
    diff = GaussianDiffusion(betas)
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(5, 3, generator=g, dtype=f64), torch.randn(5, 3, generator=g, dtype=f64)
    # q(x_s | x_{s-1}) = N(sqrt(1 - beta_s) x_{s-1}, beta_s): compose means and variances exactly.
    mean, var = x0.clone(), torch.zeros((), dtype=f64)
    for s in range(t + 1):
        mean, var = (1 - betas[s]).sqrt() * mean, (1 - betas[s]) * var + betas[s]
    tt = index(T, t, 5)
    torch.testing.assert_close(diff.q_sample(x0, tt, noise), mean + var.sqrt() * noise, rtol=1e-12, atol=1e-12)
    m, v, logv = diff.q_mean_variance(x0, tt)
    torch.testing.assert_close(v, var.expand_as(x0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(logv, torch.log(var).expand_as(x0))


@given(seed=st.integers(0, 10_000), T=st.integers(2, 30), data=st.data())
def test_q_posterior_equals_gaussian_conditioning(seed, T, data):
    t = data.draw(st.integers(0, T - 1))
    betas = random_betas(seed, T)
    diff = GaussianDiffusion(betas)
    g = torch.Generator().manual_seed(seed + 1)
    x0, x_t = torch.randn(4, 2, generator=g, dtype=f64), torch.randn(4, 2, generator=g, dtype=f64)
    ab_prev = torch.prod(1 - betas[:t])  # alpha_bar of x_{t-1}; 1 when x_{t-1} = x_0
    a_t = 1 - betas[t]
    # Joint Gaussian of (x_{t-1}, x_t) given x_0, then condition on x_t.
    m1, v1 = ab_prev.sqrt() * x0, 1 - ab_prev
    m2, v2, c12 = a_t.sqrt() * m1, a_t * v1 + betas[t], a_t.sqrt() * v1
    mean, var = m1 + c12 / v2 * (x_t - m2), v1 - c12 ** 2 / v2
    q_mean, q_var, q_logvar = diff.q_posterior(x0, x_t, index(T, t, 4))
    torch.testing.assert_close(q_mean, mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(q_var, var.expand_as(x0), rtol=1e-10, atol=1e-12)
    if t > 0:
        torch.testing.assert_close(q_logvar, torch.log(var).expand_as(x0))


# ---------------------------------------------------------------------------- densities

@given(m1=st.floats(-2, 2), m2=st.floats(-2, 2), lv1=st.floats(-2, 1), lv2=st.floats(-2, 1))
def test_normal_kl_monte_carlo_zero_and_nonnegative(m1, m2, lv1, lv2):
    args = [torch.tensor(v, dtype=f64) for v in (m1, lv1, m2, lv2)]
    kl = normal_kl(*args)
    g = torch.Generator().manual_seed(0)
    x = m1 + math.exp(lv1 / 2) * torch.randn(20_000, generator=g, dtype=f64)
    log_ratio = (torch.distributions.Normal(m1, math.exp(lv1 / 2)).log_prob(x)
                 - torch.distributions.Normal(m2, math.exp(lv2 / 2)).log_prob(x))
    se = log_ratio.std() / math.sqrt(len(x))
    assert abs(kl - log_ratio.mean()) < 5 * se + 1e-9
    assert kl >= 0
    assert normal_kl(args[0], args[1], args[0], args[1]).abs() < 1e-12


@given(levels=st.sampled_from([2, 5, 17, 256]), mean=st.floats(-1.5, 1.5), log_scale=st.floats(-6, 0.5))
def test_discretized_likelihood_sums_to_one_and_matches_cdf(levels, mean, log_scale):
    x = torch.linspace(-1, 1, levels, dtype=f64)
    means, ls = torch.full_like(x, mean), torch.full_like(x, log_scale)
    logp = discretized_gaussian_log_likelihood(x, means, ls, levels)
    assert abs(torch.logsumexp(logp, 0).item()) < 1e-6
    d, s = 1 / (levels - 1), math.exp(log_scale)
    cdf = stats.norm.cdf((x.numpy()[:, None] + np.array([-d, d]) - mean) / s)
    expected = cdf[:, 1] - cdf[:, 0]
    expected[0], expected[-1] = cdf[0, 1], 1 - cdf[-1, 0]
    ok = expected > 1e-10  # where the probability is representable
    np.testing.assert_allclose(np.exp(logp.numpy())[ok], expected[ok], rtol=1e-6, atol=1e-12)


def test_discretized_likelihood_far_tail_keeps_precision():
    # A bin 8 to 8.5 standard deviations right of the mean: ndtr(u) - ndtr(l) would round to 0.
    x, mean, levels = torch.tensor([0.0], dtype=f64), torch.tensor([-0.8], dtype=f64), 5
    s = 0.1  # bin [-0.25, 0.25] sits 5.5..10.5 sigmas right of -0.8
    logp = discretized_gaussian_log_likelihood(x, mean, torch.log(torch.tensor([s], dtype=f64)), levels)
    expected = math.log(stats.norm.sf(5.5) - stats.norm.sf(10.5))
    assert abs(logp.item() - expected) < 1e-6


# The decoder's precision: every bin's log-probability against mpmath at 40 digits, computed
# from the very float inputs the function gets (so only the function's own rounding counts).

def mp_log_bin_probability(x, mean, log_scale, levels):
    """log P(bin of x) under N(mean, e^(2 log_scale)), the outer bins open, with mpmath. Every
    probability is written so that nothing cancels: 1 - P by the two tails when the bin holds
    the mean, a difference of upper (or lower) tails when it lies to one side."""
    with mpmath.workdps(40):
        x, mean, s = mpmath.mpf(float(x)), mpmath.mpf(float(mean)), mpmath.exp(mpmath.mpf(float(log_scale)))
        d = mpmath.mpf(1) / (levels - 1)
        k = round((float(x) + 1) * (levels - 1) / 2)
        lo = -mpmath.inf if k == 0 else (x - d - mean) / s
        hi = mpmath.inf if k == levels - 1 else (x + d - mean) / s
        phi = mpmath.ncdf
        if lo >= 0:
            p = phi(-lo) - phi(-hi)
        elif hi <= 0:
            p = phi(hi) - phi(lo)
        else:
            return float(mpmath.log1p(-(phi(lo) + phi(-hi))))
        return float(mpmath.log(p))


def bin_cases(levels, rows, dtype):
    """(x, mean, log_scale) in `dtype` from rows (k, log_sigma, side, t): the bin of level k, the
    mean t sigmas beyond its edge on `side` (t < 0: inside the bin, or beyond the other edge)."""
    k = np.array([r[0] % levels for r in rows])
    log_s = np.array([r[1] for r in rows])
    side, t = np.array([r[2] for r in rows]), np.array([r[3] for r in rows])
    x = k / (levels - 1) * 2 - 1
    mean = x + side / (levels - 1) + side * t * np.exp(log_s)
    return tuple(torch.tensor(a, dtype=dtype) for a in (x, mean, log_s))


def assert_relative_precision(x, mean, log_s, levels, rtol):
    got = discretized_gaussian_log_likelihood(x, mean, log_s, levels).double().numpy()
    expected = np.array([mp_log_bin_probability(*args, levels) for args in zip(x.tolist(), mean.tolist(),
                                                                                 log_s.tolist())])
    # below the smallest normal number a float has no relative precision left to keep
    tiny = torch.finfo(x.dtype).tiny
    bad = np.abs(got - expected) > rtol * np.abs(expected) + tiny
    assert not bad.any(), list(zip(x[bad].tolist(), mean[bad].tolist(), log_s[bad].tolist(), got[bad],
                                   expected[bad]))


# Measured worst relative errors (about 5000 cases per setting): 2e-5 in float32, 4e-13 in float64
# (the latter where log P is about -1e-250, from the rounding of the CDF's argument). The code this
# replaced was off by up to 100% in both: ndtr differences rounding to 0 and a clamp at 1e-12.
RTOL = {torch.float32: 1e-4, torch.float64: 1e-12}
rows = st.lists(st.tuples(st.integers(0, 255), st.floats(-9, 0.5), st.sampled_from([-1, 1]), st.floats(-45, 45)),
                min_size=40, max_size=40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(levels=st.sampled_from([2, 17, 256]), rows=rows)
def test_discretized_likelihood_is_accurate_in_relative_terms_everywhere(dtype, levels, rows):
    """Bins 0..L-1, sigma from 1e-4 to 1.6 and the mean anywhere up to 45 sigmas beyond either
    edge of the bin (or on it): log P to a relative 1e-4 in float32 and 1e-12 in float64."""
    assert_relative_precision(*bin_cases(levels, rows, dtype), levels, RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("levels", [2, 17, 256])
def test_discretized_likelihood_precision_on_a_grid_of_the_hard_places(dtype, levels):
    """The same property on a fixed grid: the outer and inner bins, sigma from far below the bin
    width (the float spacing near 1 is then a good part of a sigma) to above it, the mean exactly
    on an edge and 1e-3 sigma to either side of it, and 1 to 45 sigmas out."""
    ks = sorted({0, 1, levels // 2, levels - 2, levels - 1})
    ts = [-1e-3, 0.0, 1e-3, 0.5, 1, 3, 6, 10, 20, 30, 40, 45]
    grid = [(k, ls, side, t) for k in ks for ls in (-9, -7, -5, -3, 0) for side in (-1, 1) for t in ts]
    assert_relative_precision(*bin_cases(levels, grid, dtype), levels, RTOL[dtype])


def test_discretized_likelihood_in_the_papers_setting():
    """sigma_1 = 0.00738 (linear schedule, T = 1000), 256 levels, the mean 6 levels above the
    pixel: -log P = 19.80 nats in float32 (the difference of CDFs gave 27.63, the clamp at
    1e-12), and 40 levels away its true 885.8 nats, not a capped 27.63."""
    x = torch.tensor([2 * 100 / 255 - 1] * 2)
    mean = x + torch.tensor([6.0, 40.0]) * 2 / 255
    log_s = torch.full_like(x, math.log(0.00738))
    got = discretized_gaussian_log_likelihood(x, mean, log_s, 256)
    expected = [mp_log_bin_probability(a, b, c, 256) for a, b, c in zip(x.tolist(), mean.tolist(), log_s.tolist())]
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5)
    assert -got[0] == pytest.approx(19.80, abs=0.01) and -got[1] == pytest.approx(885.8, abs=0.1)


def mp_gradient(x, mean, log_scale, levels):
    """(sigma d log P / d mean, d log P / d log sigma) with mpmath: -(phi(hi) - phi(lo)) / P and
    -(hi phi(hi) - lo phi(lo)) / P, the density terms of an open edge being 0."""
    with mpmath.workdps(40):
        x, mean, s = mpmath.mpf(float(x)), mpmath.mpf(float(mean)), mpmath.exp(mpmath.mpf(float(log_scale)))
        d = mpmath.mpf(1) / (levels - 1)
        k = round((float(x) + 1) * (levels - 1) / 2)
        lo, hi = (x - d - mean) / s, (x + d - mean) / s
        f_lo = 0 if k == 0 else mpmath.npdf(lo)
        f_hi = 0 if k == levels - 1 else mpmath.npdf(hi)
        lo_term = 0 if k == 0 else lo * f_lo
        hi_term = 0 if k == levels - 1 else hi * f_hi
        log_p = mp_log_bin_probability(x, mean, log_scale, levels)
        inv_p = mpmath.exp(-mpmath.mpf(log_p))
        return float(-(f_hi - f_lo) * inv_p), float(-(hi_term - lo_term) * inv_p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=4)
@given(levels=st.sampled_from([2, 17, 256]), rows=rows)
def test_discretized_likelihood_gradients_are_finite_and_right(dtype, levels, rows):
    """The hybrid loss trains the decoder's variance through this function: its gradients must be
    finite in every branch (torch.where passes the unused branches' gradients as zeros, so an
    inf there would turn into NaN) and agree with the analytic derivatives."""
    x, mean, log_s = bin_cases(levels, rows, dtype)
    mean.requires_grad_(True)
    log_s.requires_grad_(True)
    discretized_gaussian_log_likelihood(x, mean, log_s, levels).sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_s.grad).all()
    got = np.stack([(mean.grad * log_s.exp()).detach().double().numpy(), log_s.grad.double().numpy()], 1)
    expected = np.array([mp_gradient(*a, levels) for a in zip(x.tolist(), mean.tolist(), log_s.tolist())])
    rtol = 1e-3 if dtype == torch.float32 else 1e-9
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol)


# ---------------------------------------------------------------------------- schedules, reverse process

@given(T=st.integers(2, 2000))
def test_cosine_schedule_against_formula(T):
    betas = cosine_beta_schedule(T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ab = torch.cumprod(1 - betas, 0)
    assert betas.max() <= 0.999 and betas.min() > 0
    for t in sorted({1, T // 3, T // 2, T - 2}):
        if t >= 1 and (betas[:t] < 0.999).all():
            assert abs(ab[t - 1].item() - f(t) / f(0)) < 1e-12
    assert betas[-1] == pytest.approx(min(0.999, 1 - f(T) / f(T - 1)), abs=1e-12)


@given(T=st.integers(2, 400), max_beta=st.floats(0.5, 0.999))
def test_max_beta_clips_only_the_betas_above_it(T, max_beta):
    """make_betas(..., max_beta) = min(beta_t, max_beta) of the unclipped formula, for both schedules."""
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    raw = torch.tensor([1 - f(t) / f(t - 1) for t in range(1, T + 1)], dtype=torch.float64)
    torch.testing.assert_close(ddpm.make_betas("cosine", T, max_beta), raw.clamp(max=max_beta), rtol=0, atol=1e-12)
    linear = torch.linspace(0.1 / T, 20 / T, T, dtype=torch.float64)
    torch.testing.assert_close(ddpm.make_betas("linear", T, max_beta), linear.clamp(max=max_beta), rtol=0, atol=1e-12)


def test_linear_schedule_endpoints():
    b = linear_beta_schedule(1000)
    assert b[0] == 1e-4 and abs(b[-1] - 0.02) < 1e-15 and len(b) == 1000


@given(seed=st.integers(0, 10_000), T=st.integers(2, 20), data=st.data())
def test_mean_from_epsilon_is_eq_11_and_x0_mean_is_posterior(seed, T, data):
    t = data.draw(st.integers(0, T - 1))
    betas = random_betas(seed, T)
    g = torch.Generator().manual_seed(seed)
    x_t, out = torch.randn(3, 2, generator=g, dtype=f64), torch.randn(3, 2, generator=g, dtype=f64)
    tt = index(T, t, 3)
    p = GaussianDiffusion(betas, "eps").p_mean_variance(lambda x, t, y: out, x_t, tt)
    ab = torch.prod(1 - betas[:t + 1])
    eq11 = (x_t - betas[t] / (1 - ab).sqrt() * out) / (1 - betas[t]).sqrt()
    torch.testing.assert_close(p["mean"], eq11, rtol=1e-10, atol=1e-10)
    d = GaussianDiffusion(betas, "x0")
    p = d.p_mean_variance(lambda x, t, y: out, x_t, tt)
    torch.testing.assert_close(p["mean"], d.q_posterior(out, x_t, tt)[0])


@given(seed=st.integers(0, 10_000), T=st.integers(2, 50),
       vs=st.lists(st.floats(-2, 2), max_size=4))
def test_learned_variance_is_eq_15_a_geometric_interpolation(seed, T, vs):
    """Nichol & Dhariwal Eq. 15: Sigma = exp(w log beta_t + (1 - w) log beta-tilde_t), w = (v + 1)/2,
    at every t: v = -1 gives beta-tilde_t, v = 1 gives beta_t, v = 0 their geometric mean
    sqrt(beta_t beta-tilde_t) (interpolating the variances themselves would give the arithmetic
    mean), any other v (unconstrained, as in the paper) the weighted geometric mean. At t = 1
    (index 0), where beta-tilde_1 = 0, beta-tilde_2 stands in (the official code's choice)."""
    betas = random_betas(seed, T)
    ab = torch.cumprod(1 - betas, 0)
    beta_tilde = betas[1:] * (1 - ab[:-1]) / (1 - ab[1:])  # Eq. 7, t = 2..T
    beta_tilde = torch.cat([beta_tilde[:1], beta_tilde])
    d = GaussianDiffusion(betas, "eps", "learned")
    x_t, t = torch.zeros(T, 1, dtype=f64), torch.arange(T)
    for v in [-1.0, 0.0, 1.0] + vs:
        out = torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, v)], 1)
        p = d.p_mean_variance(lambda x, t, y: out, x_t, t)
        expected = betas ** ((1 + v) / 2) * beta_tilde ** ((1 - v) / 2)
        torch.testing.assert_close(p["variance"][:, 0], expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(p["log_variance"][:, 0], expected.log(), rtol=1e-12, atol=1e-14)
        if v == 0:
            torch.testing.assert_close(p["variance"][:, 0], (betas * beta_tilde).sqrt(), rtol=1e-12, atol=0)


def test_fixed_variances():
    betas = random_betas(0, 10)
    tt = torch.arange(10)
    x = torch.zeros(10, 1, dtype=f64)
    zero = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
    large = GaussianDiffusion(betas, "eps", "fixedlarge").p_mean_variance(zero, x, tt)["variance"][:, 0]
    small = GaussianDiffusion(betas, "eps", "fixedsmall").p_mean_variance(zero, x, tt)["variance"][:, 0]
    pv = GaussianDiffusion(betas).posterior_variance
    torch.testing.assert_close(large[1:], betas[1:])
    torch.testing.assert_close(large[0], pv[1])
    torch.testing.assert_close(small, pv)
    assert small[0] == 0


def test_hybrid_loss_vlb_term_does_not_train_the_mean():
    torch.manual_seed(0)
    d = GaussianDiffusion(linear_beta_schedule(10, 1e-2, 0.2), "eps", "learned", levels=17)
    x0 = torch.randint(0, 17, (4, 1, 2, 2)).double() / 16 * 2 - 1
    out = torch.randn(4, 2, 2, 2, dtype=f64, requires_grad=True)
    t, noise = torch.tensor([0, 3, 5, 9]), torch.randn(4, 1, 2, 2, dtype=f64)
    d.training_loss(lambda x, t, y: out, x0, t=t, noise=noise).sum().backward()
    grad_hybrid = out.grad.clone()
    out.grad = None
    simple = GaussianDiffusion(d.betas, "eps", "fixedlarge", levels=17)
    simple.training_loss(lambda x, t, y: out[:, :1], x0, t=t, noise=noise).sum().backward()
    torch.testing.assert_close(grad_hybrid[:, :1], out.grad[:, :1])  # mean: L_simple only
    assert grad_hybrid[:, 1:].abs().sum() > 0  # the variance is trained by L_vlb


@given(seed=st.integers(0, 10_000), lam=st.sampled_from([1e-3, 0.3]))
def test_hybrid_loss_value_is_l_simple_plus_lambda_t_l_t_per_dimension(seed, lam):
    """Nichol & Dhariwal Eq. 16, per example: L_simple + lambda L_vlb with L_vlb = T L_t / D, the
    one-sample estimate of the bound's sum over t in nats per dimension. Computed here from the
    formulas: L_t = sum_dims KL(q(x_{t-1}|x_t,x_0) || N(mu_theta, Sigma_theta)) for t > 0 (Eqs.
    7, 11, 15) and, at t = 0, -log of the 17-level bin masses of N(mu_theta, Sigma_theta) (Eq. 13,
    scipy's normal CDF). Checks the value, not only where its gradient goes."""
    T, levels = 10, 17
    betas = linear_beta_schedule(T, 1e-2, 0.2)
    d = GaussianDiffusion(betas, "eps", "learned", levels=levels, lambda_vlb=lam)
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, levels, (T, 1, 2, 2), generator=g)
    x0 = k.double() / (levels - 1) * 2 - 1
    t = torch.arange(T)  # one example at every timestep, t = 0 included
    noise = torch.randn(x0.shape, generator=g, dtype=f64)
    out = torch.cat([noise + 0.3 * torch.randn(x0.shape, generator=g, dtype=f64),
                     2 * torch.rand(x0.shape, generator=g, dtype=f64) - 1], 1)
    got = d.training_loss(lambda x, t, y: out, x0, t=t, noise=noise)

    a = (1 - betas).numpy()
    ab = np.cumprod(a)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    b = betas.numpy()
    bt = b * (1 - ab_prev) / (1 - ab)
    bt_clipped = np.concatenate([bt[1:2], bt[1:]])
    X0, EPS, N, V = x0.numpy(), out[:, :1].numpy(), noise.numpy(), out[:, 1:].numpy()
    expected = []
    for i in range(T):
        x_t = math.sqrt(ab[i]) * X0[i] + math.sqrt(1 - ab[i]) * N[i]
        mu = (x_t - b[i] / math.sqrt(1 - ab[i]) * EPS[i]) / math.sqrt(a[i])  # Eq. 11
        w = (V[i] + 1) / 2
        var = np.exp(w * np.log(b[i]) + (1 - w) * np.log(bt_clipped[i]))  # Eq. 15
        if i == 0:
            s, dd = np.sqrt(var), 1 / (levels - 1)
            hi = np.where(k[i].numpy() == levels - 1, np.inf, (X0[i] + dd - mu) / s)
            lo = np.where(k[i].numpy() == 0, -np.inf, (X0[i] - dd - mu) / s)
            l_t = -np.log(stats.norm.cdf(hi) - stats.norm.cdf(lo)).sum()
        else:
            q_mu = (math.sqrt(ab_prev[i]) * b[i] * X0[i] + math.sqrt(a[i]) * (1 - ab_prev[i]) * x_t) / (1 - ab[i])
            l_t = (0.5 * (np.log(var / bt[i]) + (bt[i] + (q_mu - mu) ** 2) / var - 1)).sum()
        l_simple = ((EPS[i] - N[i]) ** 2).mean()
        expected.append(l_simple + lam * T * l_t / X0[i].size)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-9)


# ---------------------------------------------------------------------------- oracles for Gaussian data

def gaussian_oracle(diff, m, s):
    """The optimal epsilon for x0 ~ N(m, s^2 I): E[eps | x_t] in closed form."""
    def model(x, t, y=None):
        ab = diff.alphas_cumprod.to(x.device)[t].to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        return (1 - ab).sqrt() * (x - ab.sqrt() * m) / (ab * s ** 2 + 1 - ab)
    return model


@given(m=st.floats(-1, 1), s=st.floats(0.1, 2.0))
def test_l_simple_minimum_with_optimal_epsilon(m, s):
    betas = linear_beta_schedule(100, 1e-3, 0.2)
    diff = GaussianDiffusion(betas)
    torch.manual_seed(0)
    x0 = m + s * torch.randn(20_000, 2, dtype=f64)
    loss = diff.training_loss(gaussian_oracle(diff, m, s), x0)
    ab = torch.cumprod(1 - betas, 0)
    expected = (ab * s ** 2 / (ab * s ** 2 + 1 - ab)).mean()  # E_t Var(eps | x_t), t uniform
    assert abs(loss.mean() - expected) < 5 * loss.std() / math.sqrt(len(loss))


# Gaussian reverse steps with fixed variances are exact only as the steps shrink: with the
# oracle the chain's std is off by 0.3% (T = 1000) and 1.4% (250 respaced steps, fixedlarge)
# at s = 0.3, against a tolerance of 5 standard errors = 5.6%; 50 respaced steps would be 7.6%.
@pytest.mark.parametrize("steps", [None, 250])
@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
@settings(max_examples=4)
@given(m=st.floats(-1, 1), s=st.floats(0.3, 1.5))
def test_ancestral_sampling_reproduces_gaussian_data(steps, var_type, m, s):
    diff = GaussianDiffusion(linear_beta_schedule(1000), "eps", var_type)
    n = 4000
    g = torch.Generator().manual_seed(0)
    x = diff.sample(gaussian_oracle(diff, m, s), (n, 1), steps=steps, device="cpu", generator=g)
    x = x.double()[:, 0]
    assert abs(x.mean() - m) < 5 * s / math.sqrt(n)
    assert abs(x.std() - s) < 5 * s / math.sqrt(2 * n)


def discrete_oracle(diff, levels, probs):
    """Optimal epsilon for i.i.d. dimensions on the level grid with probabilities `probs`:
    E[x0 | x_t] is a finite mixture, exact."""
    grid = torch.linspace(-1, 1, levels, dtype=f64)
    log_p = torch.log(probs)

    def model(x, t, y=None):
        ab = diff.alphas_cumprod[t].reshape(-1, *[1] * (x.dim() - 1))[..., None]
        logw = log_p - (x[..., None] - ab.sqrt() * grid) ** 2 / (2 * (1 - ab))
        x0_hat = (torch.softmax(logw, -1) * grid).sum(-1)
        return (x - ab[..., 0].sqrt() * x0_hat) / (1 - ab[..., 0]).sqrt()
    return model


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall", "learned"])
def test_decoder_term_at_256_levels_is_the_gaussian_mass_of_each_pixels_bin(var_type):
    """L_0 = -log p(x_0 | x_1) (Ho et al. Eq. 13) with the paper's schedule: per pixel, the mass
    of N(mu_theta(x_1), sigma_1^2), sigma_1^2 = exp(log_variance), on the pixel's bin
    [x - 1/255, x + 1/255] (the outer bins open), here from scipy.stats.norm. At 256 levels the
    bin (0.0078 wide) is about one sigma_1 (0.0074), so the value depends on sigma_1: a decoder
    given the log-variance where it wants the log-scale is off by several nats per pixel."""
    diff = GaussianDiffusion(linear_beta_schedule(1000), "eps", var_type, levels=256)
    g = torch.Generator().manual_seed(0)
    k = torch.randint(0, 256, (4, 3, 4, 4), generator=g)
    k[0, 0, 0, :2] = torch.tensor([0, 255])
    x0 = k.double() / 255 * 2 - 1
    t = torch.zeros(4, dtype=torch.long)
    x1 = diff.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=f64))
    # a network whose prediction of x0 misses by a few levels (3 levels standard deviation)
    x0_hat = x0 + 3 * 2 / 255 * torch.randn(x0.shape, generator=g, dtype=f64)
    ab = diff.alphas_cumprod[0]
    out = (x1 - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
    if var_type == "learned":
        out = torch.cat([out, 2 * torch.rand(x0.shape, generator=g, dtype=f64) - 1], 1)
    p = diff.p_mean_variance(lambda x, t, y=None: out, x1, t)
    got = diff._vb_term(p, x0, x1, t)
    mean, sigma, xs, kk = p["mean"].numpy(), np.exp(0.5 * p["log_variance"].numpy()), x0.numpy(), k.numpy()
    hi = np.where(kk == 255, np.inf, (xs + 1 / 255 - mean) / sigma)
    lo = np.where(kk == 0, -np.inf, (xs - 1 / 255 - mean) / sigma)
    prob = np.where(lo > 0, stats.norm.sf(lo) - stats.norm.sf(hi), stats.norm.cdf(hi) - stats.norm.cdf(lo))
    np.testing.assert_allclose(got.numpy(), -np.log(prob).reshape(4, -1).sum(1), rtol=1e-9)
    assert 0.0073 < sigma.min() and sigma.max() < 0.0101  # sqrt(beta-tilde_2) .. sqrt(beta_1): ~ the bin


def reverse_variances(betas, var_type):
    """sigma_t^2 of each reverse step as documented: beta_t (fixedlarge, with beta-tilde_2 at t = 1),
    beta-tilde_t (fixedsmall, beta-tilde_2 at t = 1), or beta_t (learned with v = 1, Eq. 15)."""
    ab = torch.cumprod(1 - betas, 0)
    bt = betas[1:] * (1 - ab[:-1]) / (1 - ab[1:])
    if var_type == "learned":
        return betas.clone()
    if var_type == "fixedlarge":
        return torch.cat([bt[:1], betas[1:]])
    return torch.cat([bt[:1], bt])


@pytest.mark.parametrize("var_type", ["learned", "fixedlarge", "fixedsmall"])
@settings(max_examples=5)
@given(betas=st.lists(st.floats(0.02, 0.2), min_size=5, max_size=5),
       x0=st.lists(st.floats(1.0, 2.5), min_size=2, max_size=2), signs=st.sampled_from([(1, 1), (1, -1), (-1, -1)]))
def test_five_step_bound_is_above_the_model_nll_and_exact_when_the_reverse_process_is(var_type, betas, x0, signs):
    """Data x_0 ~ N(0, I), T = 5, continuous decoder. The optimal network eps = sqrt(1 - alpha_bar_t) x_t
    makes the reverse mean E[x_{t-1} | x_t] = sqrt(alpha_t) x_t, and the true reverse variance is
    beta_t (each x_t is N(0, I)); with v = 1 (Eq. 15) the learned variance is exactly beta_t, and
    p(x_T) = N(0, I) = q(x_T). Then p_theta is q and the expected bound equals -log N(x_0; 0, I)
    for every x_0. With fixed variances the model is the linear-Gaussian chain with those
    variances, whose marginal N(0, V_0) is computed by propagation, and the bound lies above
    its NLL. With T = 5 and betas <= 0.2, L_T (0.4 nats or more here) is far above the
    Monte-Carlo error (checked), so leaving it out fails."""
    betas = torch.tensor(betas, dtype=f64)
    learned = var_type == "learned"
    diff = GaussianDiffusion(betas, "eps", var_type, levels=None)
    oracle = gaussian_oracle(diff, 0.0, 1.0)
    model = (lambda x, t, y=None: torch.cat([oracle(x, t), torch.ones_like(x)], 1)) if learned else oracle
    n = 20_000
    x = torch.tensor(x0, dtype=f64) * torch.tensor(signs, dtype=f64)
    bound = diff.nll(model, x.expand(n, 2).clone(), generator=torch.Generator().manual_seed(0))
    se = (bound.std() / math.sqrt(n)).item()
    v0 = torch.ones((), dtype=f64)  # the model's marginal variance, from x_T ~ N(0, 1) down to x_0
    for a, s2 in zip(reversed(1 - betas), reversed(reverse_variances(betas, var_type))):
        v0 = a * v0 + s2
    model_nll = -torch.distributions.Normal(0.0, v0.sqrt()).log_prob(x).sum().item()
    ab_T = torch.prod(1 - betas)
    prior_term = (0.5 * (ab_T * x ** 2 - ab_T - torch.log1p(-ab_T))).sum().item()  # L_T, closed form
    assert bound.mean().item() >= model_nll - 5 * se
    if learned:
        assert v0.item() == pytest.approx(1.0, abs=1e-12)
        assert prior_term > 10 * se
        assert abs(bound.mean().item() - model_nll) < 5 * se


@settings(max_examples=3)
@given(m=st.floats(-0.5, 0.5), s=st.floats(0.2, 0.8))
def test_nll_bounds_true_discrete_nll_and_is_close(m, s):
    """The bound with the exact optimal epsilon for discrete data on 9 levels: never below
    the true NLL (up to Monte-Carlo error), and above it by 0.02 +- 0.02 nats/dim in a check
    run (beta-tilde variances, T = 1000); a decoder with the wrong number of bins would be off
    by log((levels' - 1) / 8) nats/dim, a missing or doubled KL term by far more than 0.1."""
    levels, n = 9, 1000
    edges = np.concatenate([[-np.inf], np.linspace(-1, 1, levels)[:-1] + 1 / (levels - 1), [np.inf]])
    probs = torch.tensor(np.diff(stats.norm.cdf((edges - m) / s)), dtype=f64).clamp(min=1e-300)
    diff = GaussianDiffusion(linear_beta_schedule(1000), "eps", "fixedsmall", levels=levels)
    g = torch.Generator().manual_seed(0)
    k = torch.multinomial(probs, n, replacement=True, generator=g).reshape(n, 1)
    x0 = k.double() / (levels - 1) * 2 - 1
    bound = diff.nll(discrete_oracle(diff, levels, probs), x0, generator=g)
    gap = bound + torch.log(probs[k]).sum(1)  # same examples: the data's own noise cancels
    se = gap.std() / math.sqrt(n)
    assert -5 * se < gap.mean() < 0.1 + 5 * se


@settings(max_examples=3)
@given(m=st.floats(-1, 1), s=st.floats(0.3, 2.0))
def test_continuous_bound_for_points_close_to_gaussian_nll(m, s):
    """Gaussian decoder (point data), exact optimal epsilon, beta variances, cosine T = 200:
    the bound is above the true NLL and within 0.1 nats/dim of it (a check run gave 0.05 +-
    0.02; beta-tilde variances give 0.6, as they are wrong at large t for continuous data)."""
    diff = GaussianDiffusion(cosine_beta_schedule(200), "eps", "fixedlarge", levels=None)
    g = torch.Generator().manual_seed(0)
    n = 2000
    x0 = m + s * torch.randn(n, 2, generator=g, dtype=f64)
    bound = diff.nll(gaussian_oracle(diff, m, s), x0, generator=g)
    gap = (bound + torch.distributions.Normal(m, s).log_prob(x0).sum(1)) / 2  # per dim
    se = gap.std() / math.sqrt(n)
    assert -5 * se < gap.mean() < 0.1 + 5 * se


# ---------------------------------------------------------------------------- respacing and guidance

def test_respacing_keeps_alpha_bar_on_the_subsequence():
    diff = GaussianDiffusion(linear_beta_schedule(1000))
    same, tau = diff.respace(1000)
    torch.testing.assert_close(same.betas, diff.betas)
    sub, tau = diff.respace(37)
    assert tau[0] == 0 and tau[-1] == 999 and len(tau) == 37
    torch.testing.assert_close(sub.alphas_cumprod, diff.alphas_cumprod[tau])


class ToyConditional(torch.nn.Module):
    """A conditional 'network' with a null label: output depends on x, t and y."""

    def __init__(self, learn=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.learn = learn

    def forward(self, x, t, y=None):
        shift = torch.zeros(x.shape[0]) if y is None else 0.3 * (y.double() - 1)
        eps = self.w * x + shift[:, None] + 1e-3 * t[:, None]
        return torch.cat([eps, torch.tanh(x)], 1) if self.learn else eps


def test_guidance_zero_is_exactly_the_conditional_sampler():
    diff = GaussianDiffusion(linear_beta_schedule(50, 1e-3, 0.3))
    net, y = ToyConditional().double(), torch.tensor([0, 1, 2, 1])
    a = diff.sample(net, (4, 3), y=y, guidance=0.0, generator=torch.Generator().manual_seed(3))
    cond_only = ToyConditional().double()
    b = diff.sample(lambda x, t, _: cond_only(x, t, y), (4, 3), device="cpu",
                    generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    c = diff.sample(net, (4, 3), y=y, guidance=1.0, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(a, c)


@given(w=st.floats(0.1, 5))
def test_guided_output_is_eq_6_and_keeps_conditional_variance(w):
    net, x = ToyConditional(learn=True).double(), torch.randn(4, 3, dtype=f64)
    t, y = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 1])
    out = ddpm.guided_output(net, x, t, y, w)
    c, u = net(x, t, y), net(x, t, None)
    torch.testing.assert_close(out[:, :3], (1 + w) * c[:, :3] - w * u[:, :3])
    torch.testing.assert_close(out[:, 3:], c[:, 3:])


def test_drop_labels_rate():
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(20_000, dtype=torch.long)
    dropped = (ddpm.drop_labels(y, 0.1, 10, generator=g) == 10).double()
    assert abs(dropped.mean() - 0.1) < 5 * math.sqrt(0.1 * 0.9 / len(y))


# ---------------------------------------------------------------------------- networks

def test_mathematics_runs_without_common(without_common):
    """The schedules, the processes, the loss, the bound, guidance and the sampler, with both
    networks, run from the file's first half alone (common.py replaced by a module that fails)."""
    m = without_common("ddpm")
    torch.manual_seed(0)
    for var_type in ("fixedlarge", "learned"):
        diffusion = m.GaussianDiffusion(m.make_betas("cosine", 8), "eps", var_type, levels=None)
        net = m.PointMLP(2, 16, learn_sigma=var_type == "learned")
        x0 = torch.randn(5, 2)
        loss = diffusion.training_loss(net, x0).mean()
        loss.backward()
        assert torch.isfinite(loss) and all(p.grad is not None for p in net.parameters())
        assert diffusion.nll(net, x0).shape == (5,)
        assert diffusion.sample(net, (3, 2), steps=4).shape == (3, 2)
    unet = m.UNet(1, 8, 8, (1, 2), 1, (4,), 0.0, num_classes=3)
    images = m.GaussianDiffusion(m.linear_beta_schedule(6), levels=17, clip_denoised=True)
    x = torch.randint(0, 17, (2, 1, 8, 8)).float() / 16 * 2 - 1
    y = m.drop_labels(torch.tensor([0, 2]), 0.5, 3)
    assert torch.isfinite(images.nll(unet, x, y)).all()
    assert images.sample(unet, (2, 1, 8, 8), y=torch.tensor([0, 1]), guidance=2.0).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError):
        m.make_betas("linear", 0)


def test_cifar10_preset_has_the_papers_parameter_count():
    cfg = ddpm.Config(**ddpm.PRESETS["cifar10"])
    info = common.DataInfo("cifar10", "image", (3, 32, 32), levels=256, num_classes=10)
    with torch.device("meta"):
        net, diff = ddpm.build(cfg, info)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - 35.7e6) / 35.7e6 < 0.01, n
    assert diff.T == 1000 and torch.allclose(diff.betas, linear_beta_schedule(1000))


def test_unet_shapes_and_conditioning():
    torch.manual_seed(0)
    net = ddpm.UNet(1, 8, 16, (1, 2), 1, (4,), 0.0, num_classes=3, learn_sigma=True)
    for p in net.parameters():  # undo the zero init so the output depends on the inputs
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0, 7])
    out = net(x, t, torch.tensor([0, 1]))
    assert out.shape == (2, 2, 8, 8)
    assert not torch.allclose(out, net(x, t, None))
    assert not torch.allclose(out, net(x, torch.tensor([1, 8]), torch.tensor([0, 1])))


# ---------------------------------------------------------------------------- command line

TINY = ["--timesteps", "5", "--ch", "8", "--batch-size", "8", "--log-every", "1", "--n-samples", "10",
        "--warmup", "2", "--dropout", "0.1", "--device", "cpu"]


def test_cli_digits_train_sample_eval(tmp_path):
    ddpm.main(["--out", str(tmp_path), "--steps", "4", "--save-every", "2", "--cond", "--flip"] + TINY)
    for name in ["ckpt.pt", "samples_2.png", "samples_4.png", "metrics.jsonl", "loss.png", "forward.png",
                 "reverse.png"]:
        assert (tmp_path / name).is_file(), name
    ckpt = str(tmp_path / "ckpt.pt")
    ddpm.main(["--sample", ckpt, "--out", str(tmp_path / "s"), "--n-samples", "5", "--guidance", "2",
               "--sample-steps", "4", "--device", "cpu"])
    assert (tmp_path / "s" / "samples.png").is_file() and (tmp_path / "s" / "reverse.png").is_file()
    assert events(tmp_path / "s")[-1]["n"] == 5
    result = ddpm.main(["--eval", ckpt, "--out", str(tmp_path / "e"), "--eval-n", "6", "--batch-size", "4",
                        "--device", "cpu"])
    ev = events(tmp_path / "e")[-1]
    assert ev["event"] == "eval" and ev["n"] == 6 and ev["split"] == "test"
    assert ev["bits_per_dim"] == pytest.approx(ev["nll"] / (64 * math.log(2)))
    assert 0 < result["bits_per_dim"] < 20


def test_cli_points_learned_variance_and_density(tmp_path):
    ddpm.main(["--dataset", "8gaussians", "--out", str(tmp_path), "--steps", "3", "--hidden", "16",
               "--var-type", "learned", "--save-every", "3"] + TINY)
    assert (tmp_path / "samples_3.png").is_file() and (tmp_path / "forward.png").is_file()
    result = ddpm.main(["--eval", str(tmp_path / "ckpt.pt"), "--eval-n", "20", "--density-draws", "4",
                        "--device", "cpu"])
    d = np.load(tmp_path / "density.npz")
    assert d["log_density"].shape == (128, 128) and float(d["lim"]) == 4.0
    assert np.isfinite(d["log_density"]).all() and (tmp_path / "density.png").is_file()
    assert math.isfinite(result["nll"]) and "entropy" in result and result["nll_se"] > 0
    # the grid: at cell (i, j), minus the mean of 2 antithetic pairs of draws of the bound, pair k
    # seeded 1 + k for every point, its second draw with the noise negated (recomputed point by point)
    (net, diffusion), _, _ = ddpm.load(str(tmp_path / "ckpt.pt"))
    cells = [(0, 0), (64, 31), (127, 100)]
    centre = lambda i: -4 + (i + 0.5) * 8 / 128  # noqa: E731
    points = torch.tensor([[centre(j), centre(i)] for i, j in cells])
    with torch.inference_mode():
        draws = torch.stack([torch.cat([diffusion.nll(net, p[None], None, torch.Generator().manual_seed(1 + k),
                                                      sign=sign) for p in points]) for k in range(2)
                             for sign in (1.0, -1.0)]).double()
    np.testing.assert_allclose([d["log_density"][i, j] for i, j in cells], -draws.mean(0).numpy(), rtol=1e-5)
    assert result["density_draws"] == 4 and 0 < result["density_se_median"] <= result["density_se_max"]


def test_shared_noise_gives_each_example_the_bound_it_has_alone():
    """nll(..., shared_noise=True) draws one noise per t for the whole batch: each example's bound
    is then the one it gets alone with the same generator (so it is as unbiased), and the bound
    is unchanged by the batch it sits in."""
    torch.manual_seed(0)
    net = ddpm.PointMLP(hidden=16)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    diffusion = ddpm.GaussianDiffusion(ddpm.make_betas("cosine", 20), levels=None)
    x0 = torch.randn(5, 2)
    with torch.inference_mode():
        together = diffusion.nll(net, x0, None, torch.Generator().manual_seed(3), shared_noise=True)
        alone = torch.cat([diffusion.nll(net, x[None], None, torch.Generator().manual_seed(3)) for x in x0])
        independent = diffusion.nll(net, x0, None, torch.Generator().manual_seed(3))
    torch.testing.assert_close(together, alone)
    assert not torch.allclose(independent[1:], alone[1:])
    # sign -1: the antithetic draw, x_t from minus the same noise (checked on the first term's x_t
    # through a network that records its input)
    seen = []

    def recording(x, t, y=None):
        seen.append(x.clone())
        return net(x, t, y)
    for sign in (1.0, -1.0):
        with torch.inference_mode():
            diffusion.nll(recording, x0[:1], None, torch.Generator().manual_seed(3), sign=sign)
    mean = diffusion.sqrt_alphas_cumprod[-1].item() * x0[:1]
    torch.testing.assert_close(seen[0] - mean, -(seen[20] - mean))


def test_resume_is_bit_exact_with_labels_and_flips(tmp_path):
    """The conditional image model with flips, whose label dropout and flips draw random numbers
    (tests/test_cli.py checks every part of the checkpoint on 8gaussians): 4 steps at once, or 2
    and 2 more with --resume, give the same weights and EMA."""
    a, b = tmp_path / "a", tmp_path / "b"
    flags = ["--save-every", "100", "--cond", "--flip"] + TINY  # checkpoints at the last step only
    ddpm.main(["--out", str(a), "--steps", "4"] + flags)
    ddpm.main(["--out", str(b), "--steps", "2"] + flags)
    ddpm.main(["--out", str(b), "--steps", "4", "--resume"] + flags)
    ca, cb = (torch.load(p / "ckpt.pt", weights_only=True) for p in (a, b))
    assert ca["step"] == cb["step"] == 4
    for key in ("model",):
        for name, value in ca[key].items():
            assert torch.equal(value, cb[key][name]), name
    for name, value in ca["ema"]["model"].items():
        assert torch.equal(value, cb["ema"]["model"][name]), name


def test_torchrun_two_processes_resume_a_conditional_model(tmp_path):
    """DistributedDataParallel on gloo with two CPU processes: trains the conditional U-Net,
    checkpoints, resumes (tests/test_cli.py trains every model file under torchrun, without resuming)."""
    flags = ["--out", tmp_path, "--save-every", "100", "--cond"] + TINY
    for more in (["--steps", "2"], ["--steps", "4", "--resume"]):
        r = torchrun("ddpm", flags + more, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4
    assert (tmp_path / "samples_4.png").is_file()


@pytest.mark.parametrize("argv, words", [
    (["--guidance", "-1"], "--guidance"),
    (["--dataset", "8gaussians", "--cond"], "--cond"),
    (["--p-uncond", "1.5"], "--p-uncond"),
    (["--sample-steps", "5000", "--steps", "1", "--timesteps", "10"], "--sample-steps"),
    (["--ch-mult", "1,2,2,2,2"], "--ch-mult"),
    (["--timesteps", "0"], "--timesteps"),
    (["--density-draws", "3"], "--density-draws"),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        ddpm.main(argv + ["--out", str(tmp_path), "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and words in err


def test_a_signal_during_the_final_pictures_stops_them_with_the_checkpoint_whole(tmp_path):
    """The end-of-run sampling (T = 1000 network calls for the grid, as many again for the reverse
    chain) is drawn after the last checkpoint: a signal then stops it at once instead of being
    acknowledged and ignored until the pictures are done."""
    root = Path(ddpm.__file__).resolve().parent
    proc = subprocess.Popen([sys.executable, str(root / "ddpm.py"), "--out", str(tmp_path), "--steps", "1",
                             "--n-samples", "64", "--device", "cpu"], env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not (tmp_path / "ckpt.pt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "pictures stopped" in stderr and "Traceback" not in stderr, stderr
    assert not (tmp_path / "reverse.png").exists()  # the pictures were stopped, not finished
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 1
