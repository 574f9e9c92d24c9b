"""Tests of ddim.py, each against an independent computation.

The generalised forward process against Gaussian conditioning and its marginals; eta = 1 on all
T steps (and on a sub-sequence) against an independent DDPM ancestral sampler fed the same
noise; eta = 0 drawing nothing; the encoder against the exact solution of Eq. 14 for a constant
epsilon; and, with the closed-form optimal epsilon of a Gaussian mixture (an exact oracle), the
sampler's moments, the encode-decode error and the encoder's output distribution as S grows,
classifier guidance with the exact posterior p(y | x_t) as classifier, classifier-free
guidance, L_simple and the classifier's loss against closed forms and quadrature; the networks
against ddpm.py's by exchanging state dicts. Then the command line end to end: digits and
8gaussians, the classifier of classifier guidance (and its resume), a ddpm.py-format checkpoint built
here, and `--eta 1 --sample-steps T` against ddpm.py's own sampler.

ddpm.py is imported by the tests that check compatibility with it (schedules, state-dict names,
its sampler); ddim.py itself never imports it.
"""
import ast
import importlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import events
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

import common
import ddim

f64 = torch.float64
SETTINGS = settings(max_examples=10, deadline=None)


def random_betas(seed, T):
    g = torch.Generator().manual_seed(seed)
    return 1e-3 + 0.3 * torch.rand(T, generator=g, dtype=f64)


def full(i, n):
    return torch.full((n,), i, dtype=torch.long)


class Toy(torch.nn.Module):
    """A conditional 'network', nonlinear in x and dependent on t and y (y = None: null label).
    Raises if called unconditionally while `forbid_uncond` is set."""

    def __init__(self, forbid_uncond=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7, dtype=f64))
        self.forbid_uncond = forbid_uncond
        self.calls = []

    def forward(self, x, t, y=None):
        if y is None and self.forbid_uncond:
            raise AssertionError("unconditional call")
        self.calls.append(t[0].item())
        shift = 0.0 if y is None else 0.3 * (y.to(x.dtype) - 1).reshape(-1, *[1] * (x.dim() - 1))
        return torch.tanh(self.w * x) + shift + 1e-3 * t.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))


# ----------------------------------------------------------------------------------------
# The exact oracle: a Gaussian mixture and everything about its noised versions in closed form
# ----------------------------------------------------------------------------------------

class Mixture:
    """x_0 ~ sum_k pi_k N(mu_k, s_k^2 I) in D dimensions. Noised by Eq. 4, x_t is a mixture of
    N(sqrt(ab) mu_k, v_k I) with v_k = ab s_k^2 + 1 - ab, so the optimal epsilon is
    E[eps | x_t] = -sqrt(1 - ab) grad log p_t(x_t) = sqrt(1 - ab) sum_k w_k (x_t - sqrt(ab) mu_k) / v_k
    with w_k = p(k | x_t), the exact classifier."""

    def __init__(self, pi, mu, s, alphas_cumprod):
        self.pi, self.mu, self.s = (torch.tensor(v, dtype=f64) for v in (pi, mu, s))
        self.ab = alphas_cumprod

    def sample(self, n, generator):
        k = torch.multinomial(self.pi, n, replacement=True, generator=generator)
        return self.mu[k] + self.s[k, None] * torch.randn(n, self.mu.shape[1], generator=generator, dtype=f64), k

    def _terms(self, x, a):
        """(K, D, B) differences x - sqrt(a) mu_k, (K, B) variances v_k, (K, B) log pi_k N(x; .)."""
        d = x.T[None] - a.sqrt()[None, None] * self.mu[:, :, None]
        v = a[None] * (self.s ** 2)[:, None] + 1 - a[None]
        D = x.shape[1]
        log_joint = (torch.log(self.pi)[:, None] - 0.5 * (d * d).sum(1) / v
                     - 0.5 * D * torch.log(2 * math.pi * v))
        return d, v, log_joint

    def eps(self, x, t, y=None):
        a = self.ab[t].to(x.dtype)
        d, v, log_joint = self._terms(x, a)
        if y is not None:  # component y alone: the conditional model
            log_joint = torch.where(torch.arange(len(self.pi))[:, None] == y[None], log_joint, -math.inf)
        w = torch.softmax(log_joint, 0)
        return ((1 - a).sqrt() * (d * (w / v)[:, None]).sum(0)).T

    def logits(self, x, t):
        """log p(k | x_t) up to a constant per example: the exact noise-aware classifier."""
        return self._terms(x, self.ab[t].to(x.dtype))[2].T

    def moments(self):
        mean = (self.pi[:, None] * self.mu).sum(0)
        second = sum(p * (torch.outer(m, m) + s ** 2 * torch.eye(len(m), dtype=f64))
                     for p, m, s in zip(self.pi, self.mu, self.s))
        return mean, second - torch.outer(mean, mean)


AB = ddim.make_alphas_cumprod(ddim.make_betas("linear", 1000))
MIX = Mixture([0.5, 0.3, 0.2], [[-1.5, 0.0], [1.0, 1.0], [1.0, -1.2]], [0.3, 0.5, 0.25], AB)


def unconditional(x, t, y=None):
    """The optimal unconditional network: it ignores the label."""
    return MIX.eps(x, t)


def moment_errors(x, mean, cov):
    """|mean error| and |covariance error| (Frobenius), and 5 standard errors of each entry."""
    n = x.shape[0]
    m, c = x.mean(0), torch.cov(x.T)
    xc = x - m
    se_m = (c.diag() / n).sqrt()
    se_c = (xc[:, :, None] * xc[:, None, :]).reshape(n, -1).std(0).reshape(c.shape) / math.sqrt(n)
    return ((m - mean).norm().item(), (c - cov).norm().item(),
            (m - mean).abs() < 5 * se_m, (c - cov).abs() < 5 * se_c)


# ----------------------------------------------------------------------------------------
# Schedules and the timestep convention
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddpm():
    """ddpm.py, for the tests of compatibility with it (ddim.py never imports it)."""
    return importlib.import_module("ddpm")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1, 5, 19, 20, 200, 1000])
@pytest.mark.parametrize("max_beta", [0.999, 0.99])
def test_schedules_equal_ddpm_py(ddpm, schedule, T, max_beta):
    assert torch.equal(ddim.make_betas(schedule, T, max_beta), ddpm.make_betas(schedule, T, max_beta))


def test_schedule_formulas_and_timestep_convention():
    betas = ddim.make_betas("linear", 1000)
    assert betas.dtype == f64 and betas[0] == 1e-4 and abs(betas[-1] - 0.02) < 1e-15
    # T = 100: the 1000/T scaling gives 1e-3..0.2; at T = 2 beta_T would be 10, clipped at 0.999
    torch.testing.assert_close(ddim.make_betas("linear", 100), torch.linspace(1e-3, 0.2, 100, dtype=f64))
    assert ddim.make_betas("linear", 2).max() == 0.999
    T = 50
    cos = ddim.make_betas("cosine", T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ab = ddim.make_alphas_cumprod(cos)
    assert ab.dtype == f64
    for t in (1, 10, 25, 49):  # index t - 1 is the paper's t: alpha_bar(t) = f(t) / f(0)
        assert abs(ab[t - 1].item() - f(t) / f(0)) < 1e-12
    assert ab[0] == 1 - cos[0]  # index 0 is t = 1, one step of noise


# ----------------------------------------------------------------------------------------
# The generalised forward process
# ----------------------------------------------------------------------------------------

@SETTINGS
@given(seed=st.integers(0, 10_000), T=st.integers(2, 30), frac=st.floats(0, 1), data=st.data())
def test_q_sigma_posterior_keeps_the_marginals(seed, T, frac, data):
    """Song et al. Lemma 1: if x_t | x_0 ~ N(sqrt(ab_t) x_0, 1 - ab_t), then x_{t-1} drawn from
    Eq. 7 has x_{t-1} | x_0 ~ N(sqrt(ab_{t-1}) x_0, 1 - ab_{t-1}) for every allowed sigma.
    The mean is affine in x_t: its slope found by evaluating at two points."""
    t = data.draw(st.integers(1, T - 1))
    ab = ddim.make_alphas_cumprod(random_betas(seed, T))
    ab_t, ab_prev = ab[t].item(), ab[t - 1].item()
    sigma = frac * math.sqrt(1 - ab_prev)
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed), dtype=f64)
    m_at_mean, var = ddim.q_sigma_posterior(x0, math.sqrt(ab_t) * x0, ab_t, ab_prev, sigma)
    m_plus_one, _ = ddim.q_sigma_posterior(x0, math.sqrt(ab_t) * x0 + 1, ab_t, ab_prev, sigma)
    slope = m_plus_one - m_at_mean
    torch.testing.assert_close(m_at_mean, math.sqrt(ab_prev) * x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(slope ** 2 * (1 - ab_t) + var, torch.full_like(x0, 1 - ab_prev),
                               rtol=1e-10, atol=1e-12)


@SETTINGS
@given(seed=st.integers(0, 10_000), T=st.integers(2, 30), data=st.data())
def test_eta_one_is_ddpm_posterior_by_gaussian_conditioning(seed, T, data):
    """sigma(eta = 1) (Eq. 16) in Eq. 7 is Ho et al.'s q(x_{t-1} | x_t, x_0): conditioning the
    joint Gaussian of (x_{t-1}, x_t) given x_0 under the Markov chain, as in test_ddpm.py."""
    t = data.draw(st.integers(1, T - 1))
    betas = random_betas(seed, T)
    ab_prev = torch.prod(1 - betas[:t])
    a_t = 1 - betas[t]
    g = torch.Generator().manual_seed(seed + 1)
    x0, x_t = torch.randn(4, 2, generator=g, dtype=f64), torch.randn(4, 2, generator=g, dtype=f64)
    m1, v1 = ab_prev.sqrt() * x0, 1 - ab_prev
    m2, v2, c12 = a_t.sqrt() * m1, a_t * v1 + betas[t], a_t.sqrt() * v1
    mean, var = m1 + c12 / v2 * (x_t - m2), v1 - c12 ** 2 / v2
    ab = ddim.make_alphas_cumprod(betas)
    sigma = ddim.ddim_sigma(ab[t].item(), ab[t - 1].item(), 1.0)
    q_mean, q_var = ddim.q_sigma_posterior(x0, x_t, ab[t].item(), ab[t - 1].item(), sigma)
    torch.testing.assert_close(q_mean, mean, rtol=1e-10, atol=1e-10)
    assert q_var == pytest.approx(var.item(), rel=1e-10)
    # eta scales sigma linearly; eta = 0 has no noise
    assert ddim.ddim_sigma(ab[t].item(), ab[t - 1].item(), 0.5) == pytest.approx(sigma / 2, rel=1e-14)
    assert ddim.ddim_sigma(ab[t].item(), ab[t - 1].item(), 0.0) == 0


@SETTINGS
@given(seed=st.integers(0, 10_000), t=st.integers(0, 999), eta=st.floats(0, 1), clip=st.booleans())
def test_ddim_step_is_eq_12_a_draw_from_q_sigma_at_predicted_x0(seed, t, eta, clip):
    """Eq. 12 = Eq. 10: the update is q_sigma(x_{t-1} | x_t, x0_hat) with x0_hat from Eq. 9
    (clipped or not), and Eq. 9 inverts Eq. 4 exactly."""
    g = torch.Generator().manual_seed(seed)
    x0, eps, z = (2 * torch.randn(3, 5, generator=g, dtype=f64) for _ in range(3))
    x_t = ddim.q_sample(x0, full(t, 3), eps, AB)
    ab_t, ab_prev = AB[t].item(), (AB[t - 1].item() if t > 0 else 1.0)
    torch.testing.assert_close(ddim.predict_x0(x_t, eps, ab_t), x0, rtol=1e-9, atol=1e-9)
    sigma = ddim.ddim_sigma(ab_t, ab_prev, eta)
    x_prev, x0_hat = ddim.ddim_step(x_t, eps, ab_t, ab_prev, sigma, z, clip_x0=clip)
    expected_x0 = x0.clamp(-1, 1) if clip else x0
    torch.testing.assert_close(x0_hat, expected_x0, rtol=1e-9, atol=1e-9)
    mean, _ = ddim.q_sigma_posterior(expected_x0, x_t, ab_t, ab_prev, sigma)
    torch.testing.assert_close(x_prev, mean + sigma * z, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------
# Sub-sequences
# ----------------------------------------------------------------------------------------

@SETTINGS
@given(T=st.integers(1, 2000), data=st.data(), skip=st.sampled_from(["linear", "quadratic"]))
def test_tau_is_increasing_in_range_of_length_s_and_ends_at_t(T, data, skip):
    S = data.draw(st.integers(1, T))
    tau = ddim.timestep_subsequence(T, S, skip)
    assert tau.dtype == torch.int64 and len(tau) == S
    assert (tau[1:] > tau[:-1]).all() and tau[0] >= 0 and tau[-1] == T - 1
    i = range(1, S + 1)
    c = T / S if skip == "linear" else T / S ** 2
    paper = [math.floor(c * (k if skip == "linear" else k * k) + 1e-9) for k in i]
    # App. D.2 in the paper's 1..T; quadratic raised to i where floor(c i^2) < i (kept increasing)
    expected = paper if skip == "linear" else [max(p, k) for p, k in zip(paper, i)]
    assert (tau + 1).tolist() == expected
    assert torch.equal(ddim.timestep_subsequence(T, T, skip), torch.arange(T))


@SETTINGS
@given(T=st.integers(2, 2000), data=st.data())
def test_uniform_and_quad_are_the_authors_runner_expressions(T, data):
    """Song et al.'s runner (ermongroup/ddim, runners/diffusion.py): --skip_type uniform visits
    range(0, T, T // S); --skip_type quad visits int(s) for s in linspace(0, sqrt(0.8 T), S) ** 2;
    written here with numpy as there. Table 1's S = 50 (uniform) and S = 100 (quad) at T = 1000
    first, then any T and S."""
    assert ddim.timestep_subsequence(1000, 50, "uniform").tolist() == list(range(0, 1000, 1000 // 50))
    assert ddim.timestep_subsequence(1000, 100, "quad").tolist() == \
        [int(s) for s in list(np.linspace(0, np.sqrt(1000 * 0.8), 100) ** 2)]
    S = data.draw(st.integers(1, T))
    assert ddim.timestep_subsequence(T, S, "uniform").tolist() == list(range(0, T, T // S))
    assert ddim.timestep_subsequence(T, S, "quad").tolist() == \
        [int(s) for s in list(np.linspace(0, np.sqrt(T * 0.8), S) ** 2)]


def test_a_repeated_index_of_quad_is_a_step_that_leaves_x_unchanged():
    """quad at S = 100 visits index 0 four times; a step from alpha_bar to itself is the identity
    (sigma = 0 for any eta, and Eq. 12 returns x_t), with or without the clip."""
    assert ddim.timestep_subsequence(1000, 100, "quad")[:5].tolist() == [0, 0, 0, 0, 1]
    x, eps, ab = torch.randn(3, 2, dtype=f64), torch.randn(3, 2, dtype=f64), float(AB[0])
    sigma = ddim.ddim_sigma(ab, ab, 1.0)
    assert sigma == 0
    for clip in (False, True):
        torch.testing.assert_close(ddim.ddim_step(x, eps, ab, ab, sigma, None, clip)[0], x, rtol=0, atol=1e-12)


def test_quadratic_tau_puts_more_steps_at_small_t():
    lin, quad = ddim.timestep_subsequence(1000, 10, "linear"), ddim.timestep_subsequence(1000, 10, "quadratic")
    assert lin.tolist() == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    assert quad.tolist() == [9, 39, 89, 159, 249, 359, 489, 639, 809, 999]


def test_sampler_calls_the_network_on_reversed_tau():
    net = Toy()
    ddim.ddim_sample(net, AB, (2, 3), steps=7, skip="quadratic", generator=torch.Generator().manual_seed(0))
    assert net.calls == ddim.timestep_subsequence(1000, 7, "quadratic").flip(0).tolist()


# ----------------------------------------------------------------------------------------
# The sampler against DDPM, and its determinism
# ----------------------------------------------------------------------------------------

def ddpm_ancestral(model, betas, x_T, generator, clip):
    """Ho et al. Algorithm 2 with sigma_t^2 = beta-tilde_t, written from the DDPM paper alone:
    mean from Eq. 11, or mu-tilde(clip(x0_hat), x_t) of Eq. 7 when clipping; z = 0 at t = 1."""
    alphas = 1 - betas
    ab = torch.cumprod(alphas, 0)
    x = x_T
    for i in reversed(range(len(betas))):
        eps = model(x, full(i, x.shape[0]))
        ab_prev = ab[i - 1] if i > 0 else torch.tensor(1.0, dtype=f64)
        if clip:
            x0 = ((x - (1 - ab[i]).sqrt() * eps) / ab[i].sqrt()).clamp(-1, 1)
            mean = (ab_prev.sqrt() * betas[i] * x0 + alphas[i].sqrt() * (1 - ab_prev) * x) / (1 - ab[i])
        else:
            mean = (x - betas[i] / (1 - ab[i]).sqrt() * eps) / alphas[i].sqrt()
        var = betas[i] * (1 - ab_prev) / (1 - ab[i])
        z = torch.randn(x.shape, generator=generator, dtype=f64) if i > 0 else torch.zeros_like(x)
        x = mean + var.sqrt() * z
    return x


@SETTINGS
@given(seed=st.integers(0, 10_000), T=st.integers(1, 40), clip=st.booleans(), data=st.data())
def test_eta_one_equals_ddpm_ancestral_sampling_with_the_same_noise(seed, T, clip, data):
    """All T steps: DDIM(eta = 1) is DDPM with beta-tilde variance, trajectory for trajectory.
    On a sub-sequence tau it is the DDPM whose betas are 1 - ab_{tau_i} / ab_{tau_{i-1}}
    (Song et al. App. C.1), with the network called at tau."""
    S = data.draw(st.integers(1, T))
    skip = data.draw(st.sampled_from(["linear", "quadratic"]))
    betas = random_betas(seed, T)
    net = Toy()
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(5, 3, generator=g, dtype=f64)
    out = ddim.ddim_sample(net, ddim.make_alphas_cumprod(betas), steps=S, skip=skip, eta=1.0, x_T=x_T,
                           clip_x0=clip, generator=g)
    tau = ddim.timestep_subsequence(T, S, skip)
    ab = torch.cumprod(1 - betas, 0)[tau]
    sub_betas = 1 - ab / torch.cat([torch.ones(1, dtype=f64), ab[:-1]])
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(5, 3, generator=g, dtype=f64)
    expected = ddpm_ancestral(lambda x, t: net(x, tau[t]), sub_betas, x_T, g, clip)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_eta_zero_draws_no_noise_and_is_deterministic():
    net = Toy()
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(6, 4, generator=g, dtype=f64)
    before = g.get_state()
    a = ddim.ddim_sample(net, AB, steps=20, eta=0.0, x_T=x_T, generator=g)
    assert torch.equal(g.get_state(), before)  # nothing drawn
    b = ddim.ddim_sample(net, AB, steps=20, eta=0.0, x_T=x_T.clone(), generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    # without x_T exactly one N(0, I) of the shape is drawn: x_T itself
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    c = ddim.ddim_sample(net, AB, (6, 4), steps=20, generator=g1)
    torch.randn((6, 4), generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())
    # eta > 0 does draw, and changes the sample
    d = ddim.ddim_sample(net, AB, steps=20, eta=0.5, x_T=x_T, generator=g)
    assert not torch.equal(g.get_state(), before) and not torch.allclose(a, d)
    assert c.shape == (6, 4)


def test_chain_yields_each_step_and_its_predicted_x0():
    net = Toy()
    x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=f64)
    chain = list(ddim.ddim_sample_chain(net, AB, steps=5, x_T=x_T))
    assert [i for i, _, _ in chain] == [999, 799, 599, 399, 199]
    torch.testing.assert_close(chain[-1][1], chain[-1][2])  # the last step returns x0_hat itself


# ----------------------------------------------------------------------------------------
# The ODE: encoding and reconstruction
# ----------------------------------------------------------------------------------------

@SETTINGS
@given(S=st.integers(1, 1000), skip=st.sampled_from(["linear", "quadratic"]), c=st.floats(-2, 2))
def test_encoder_integrates_eq_14_exactly_for_a_constant_epsilon(S, skip, c):
    """With eps = c, d x_bar = c d sigma has the solution x_bar_T = x_0 + sigma_T c, which
    Euler's method reproduces for any steps: x_T = sqrt(ab_T) (x_0 + sigma_T c); decoding
    returns x_0 exactly."""
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(S), dtype=f64)
    const = lambda x, t, y=None: torch.full_like(x, c)  # noqa: E731
    z = ddim.ddim_encode(const, AB, x0, steps=S, skip=skip)
    ab_T = AB[-1].item()
    torch.testing.assert_close(z, math.sqrt(ab_T) * (x0 + math.sqrt((1 - ab_T) / ab_T) * c), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ddim.ddim_sample(const, AB, steps=S, skip=skip, x_T=z), x0, rtol=1e-8, atol=1e-8)


def test_oracle_encode_then_decode_error_falls_as_s_grows_and_codes_are_standard_normal():
    """Song et al. Sec. 5.4 / Table 2 with the exact epsilon: reconstruction error falls with S
    (measured per dimension: 0.05, 0.004, 2e-4, 9e-6 at S = 10, 50, 200, 1000). The exact ODE
    maps the data distribution to p_T ~ N(0, I): at S = 1000 the codes' mean and covariance are
    within 5 standard errors of (0, I) (at S = 50 the variances are still 0.9 and 0.87)."""
    x0, _ = MIX.sample(4000, torch.Generator().manual_seed(1))
    errors = []
    for S in (10, 50, 200, 1000):
        z = ddim.ddim_encode(MIX.eps, AB, x0, steps=S)
        errors.append(((ddim.ddim_sample(MIX.eps, AB, steps=S, x_T=z) - x0) ** 2).mean().item())
    assert all(a > 2 * b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4, errors
    _, _, mean_ok, cov_ok = moment_errors(z, torch.zeros(2, dtype=f64), torch.eye(2, dtype=f64))
    assert mean_ok.all() and cov_ok.all()


def test_oracle_ddim_reproduces_the_mixture_moments_with_error_falling_in_s():
    """The exact epsilon of a 3-component mixture, eta = 0, the same 4000 latents for every S:
    the covariance error falls with S (0.31, 0.07, 0.01 in a check run at n = 20000; it is
    discretisation, not sampling error, that makes S = 10 wrong) and at S = 1000 the mean and
    covariance are within 5 standard errors of the truth, for eta = 0 and for eta = 1."""
    mean, cov = MIX.moments()
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(4000, 2, generator=g, dtype=f64)
    errs = [moment_errors(ddim.ddim_sample(MIX.eps, AB, steps=S, x_T=x_T), mean, cov) for S in (10, 50, 1000)]
    cov_errs = [e[1] for e in errs]
    assert cov_errs[0] > cov_errs[1] > cov_errs[2], cov_errs
    assert errs[2][2].all() and errs[2][3].all()
    stochastic = ddim.ddim_sample(MIX.eps, AB, steps=1000, eta=1.0, x_T=x_T, generator=g)
    _, _, mean_ok, cov_ok = moment_errors(stochastic, mean, cov)
    assert mean_ok.all() and cov_ok.all()


@SETTINGS
@given(seed=st.integers(0, 1000))
def test_slerp_against_the_great_circle(seed):
    """For orthonormal z0, z1 slerp is cos(alpha pi/2) z0 + sin(alpha pi/2) z1; in general it
    keeps the endpoints, moves at a constant angle alpha * theta from z0 and, for equal norms,
    keeps the norm."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(12, 2, generator=g, dtype=f64))
    e0, e1 = q[:, 0].reshape(1, 3, 4), q[:, 1].reshape(1, 3, 4)
    alpha = torch.linspace(0, 1, 7, dtype=f64)
    a = alpha[:, None, None]
    expected = torch.cos(a * math.pi / 2) * e0 + torch.sin(a * math.pi / 2) * e1
    torch.testing.assert_close(ddim.slerp(e0, e1, alpha), expected, rtol=1e-12, atol=1e-12)
    z0, z1 = torch.randn(1, 12, generator=g, dtype=f64), torch.randn(1, 12, generator=g, dtype=f64)
    z1 = z1 * z0.norm() / z1.norm()
    path = ddim.slerp(z0, z1, alpha)
    torch.testing.assert_close(path[0], z0[0]), torch.testing.assert_close(path[-1], z1[0])
    theta = torch.arccos((z0 * z1).sum() / z0.norm() ** 2)
    angles = torch.arccos(((path * z0).sum(1) / (path.norm(dim=1) * z0.norm())).clamp(-1, 1))
    torch.testing.assert_close(angles, alpha * theta, rtol=1e-6, atol=1e-6)  # arccos near 1 loses digits
    torch.testing.assert_close(path.norm(dim=1), z0.norm().expand(7), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ddim.slerp(z0, 2 * z0, 0.25), 1.25 * z0)  # parallel: the straight line


# ----------------------------------------------------------------------------------------
# Guidance
# ----------------------------------------------------------------------------------------

@SETTINGS
@given(seed=st.integers(0, 10_000), t=st.integers(0, 999), y=st.integers(0, 2))
def test_classifier_guidance_with_the_exact_classifier_is_the_conditional_epsilon(seed, t, y):
    """Dhariwal & Nichol's eps - sqrt(1 - ab) s grad log p(y | x_t) with s = 1 and the exact
    p(y | x_t) is -sqrt(1 - ab) grad log p(x_t | y): the closed-form epsilon of component y."""
    x = 2 * torch.randn(6, 2, generator=torch.Generator().manual_seed(seed), dtype=f64)
    tt, yy = full(t, 6), full(y, 6)
    guided = ddim.guided_eps(unconditional, x, tt, AB, yy, classifier=MIX.logits, classifier_scale=1.0)
    unguided = MIX.eps(x, tt)
    torch.testing.assert_close(guided, MIX.eps(x, tt, yy), rtol=1e-9, atol=1e-9)
    # the gradient scales linearly with s
    s3 = ddim.guided_eps(unconditional, x, tt, AB, yy, classifier=MIX.logits, classifier_scale=3.0)
    torch.testing.assert_close(s3 - unguided, 3 * (guided - unguided), rtol=1e-9, atol=1e-9)


def test_classifier_guidance_moves_the_mass_to_the_chosen_component():
    """y = 2 (weight 0.2). Fractions assigned to component 2 by the data posterior, 2000 samples,
    S = 50, eta = 0: unguided about 0.2 (5 standard errors allowed); scale 1 with the exact
    classifier is the sampler of component 2 alone (the same trajectories as its closed-form
    epsilon, mean mu_2), a fraction near 1; scale 0 is the unguided sampler bit for bit and
    never calls the classifier."""
    n = 2000
    y = full(2, n)
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=f64)

    def forbidden(x, t):
        raise AssertionError("classifier called at scale 0")

    def component(x):
        return MIX.logits(x, full(0, len(x))).argmax(1)  # index 0: ab = 0.9999, about the data itself

    plain = ddim.ddim_sample(unconditional, AB, steps=50, x_T=x_T, y=y)
    zero = ddim.ddim_sample(unconditional, AB, steps=50, x_T=x_T, y=y, classifier=forbidden, classifier_scale=0.0)
    assert torch.equal(plain, zero)
    guided = ddim.ddim_sample(unconditional, AB, steps=50, x_T=x_T, y=y, classifier=MIX.logits,
                              classifier_scale=1.0)
    p_plain, p_guided = (component(x).eq(2).double().mean().item() for x in (plain, guided))
    assert abs(p_plain - 0.2) < 5 * math.sqrt(0.2 * 0.8 / n), p_plain
    assert p_guided > 0.99, p_guided
    conditional = ddim.ddim_sample(MIX.eps, AB, steps=50, x_T=x_T, y=y)  # the oracle of p(x | y = 2)
    torch.testing.assert_close(guided, conditional, rtol=1e-7, atol=1e-7)
    _, _, mean_ok, _ = moment_errors(guided, MIX.mu[2], 0.25 ** 2 * torch.eye(2, dtype=f64))
    assert mean_ok.all()


def test_classifier_free_guidance_zero_is_exactly_the_conditional_sampler():
    y = torch.tensor([0, 1, 2, 1])
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=f64)
    a = ddim.ddim_sample(Toy(forbid_uncond=True), AB, steps=30, eta=0.5, x_T=x_T, y=y, guidance=0.0,
                         generator=torch.Generator().manual_seed(1))
    cond = Toy()
    b = ddim.ddim_sample(lambda x, t, _: cond(x, t, y), AB, steps=30, eta=0.5, x_T=x_T,
                         generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    c = ddim.ddim_sample(Toy(), AB, steps=30, eta=0.5, x_T=x_T, y=y, guidance=1.0,
                         generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c)


@SETTINGS
@given(w=st.floats(0.1, 5), t=st.integers(0, 999))
def test_guided_eps_is_eq_6_on_the_epsilon_channels(w, t):
    """(1 + w) eps(x, y) - w eps(x, null), on the first C channels of a 2C-channel output."""
    net = Toy()

    def learned_variance(x, t, y=None):
        return torch.cat([net(x, t, y), torch.full_like(x, 7.0)], 1)
    x, y, tt = torch.randn(4, 3, dtype=f64), torch.tensor([0, 1, 2, 1]), full(t, 4)
    out = ddim.guided_eps(learned_variance, x, tt, AB, y, guidance=w)
    torch.testing.assert_close(out, (1 + w) * net(x, tt, y) - w * net(x, tt, None))


def test_drop_labels_rate():
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(20_000, dtype=torch.long)
    dropped = (ddim.drop_labels(y, 0.1, 10, generator=g) == 10).double()
    assert abs(dropped.mean() - 0.1) < 5 * math.sqrt(0.1 * 0.9 / len(y))


# ----------------------------------------------------------------------------------------
# Training objectives
# ----------------------------------------------------------------------------------------

@settings(max_examples=5, deadline=None, derandomize=True)
@given(m=st.floats(-1, 1), s=st.floats(0.1, 2.0))
def test_l_simple_with_the_optimal_epsilon_is_its_minimum(m, s):
    """For x_0 ~ N(m, s^2): E[eps | x_t] is linear, and L_simple at the optimum is the
    posterior variance ab s^2 / (ab s^2 + 1 - ab), averaged over t uniform (Monte Carlo, 5 SE)."""
    betas = ddim.make_betas("linear", 100)
    ab = ddim.make_alphas_cumprod(betas)

    def optimal(x, t, y=None):
        a = ab[t].reshape(-1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * m) / (a * s ** 2 + 1 - a)
    torch.manual_seed(0)
    x0 = m + s * torch.randn(20_000, 2, dtype=f64)
    loss = ddim.l_simple(optimal, x0, ab)
    expected = (ab * s ** 2 / (ab * s ** 2 + 1 - ab)).mean()
    assert abs(loss.mean() - expected) < 5 * loss.std() / math.sqrt(len(loss))
    t, noise = torch.randint(0, 100, (20_000,)), torch.randn(x0.shape, dtype=f64)
    loss = ddim.l_simple(optimal, x0, ab, t=t, noise=noise)
    worse = ddim.l_simple(lambda x, t, y=None: 1.1 * optimal(x, t), x0, ab, t=t, noise=noise)
    assert worse.mean() > loss.mean()


@pytest.mark.parametrize("t", [50, 300, 700])
def test_classifier_loss_with_the_exact_classifier_is_the_conditional_entropy(t):
    """E[-log p(y | x_t)] at a fixed t equals H(y | x_t) = -int sum_k pi_k N_k(x) log w_k(x) dx
    for a 1D mixture, by quadrature (scipy); Monte Carlo over 20000 examples, 5 SE."""
    mix = Mixture([0.6, 0.4], [[-1.0], [1.0]], [0.4, 0.6], AB)
    g = torch.Generator().manual_seed(t)
    x0, y = mix.sample(20_000, g)
    loss = ddim.classifier_loss(mix.logits, x0, y, AB, t=full(t, 20_000),
                                noise=torch.randn(x0.shape, generator=g, dtype=f64))
    a = AB[t].item()
    comps = [(p, stats.norm(math.sqrt(a) * m[0], math.sqrt(a * s ** 2 + 1 - a)))
             for p, m, s in zip([0.6, 0.4], [[-1.0], [1.0]], [0.4, 0.6])]

    def integrand(x):
        joint = [p * c.pdf(x) for p, c in comps]
        total = sum(joint)
        return -sum(j * math.log(j / total) for j in joint if j > 0)
    entropy = integrate.quad(integrand, -12, 12, limit=200)[0]
    assert abs(loss.mean().item() - entropy) < 5 * loss.std().item() / math.sqrt(len(loss))
    assert 0 < entropy < -0.6 * math.log(0.6) - 0.4 * math.log(0.4)


# ----------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------

def randomize(module, seed):
    """Random parameters everywhere (the zero-initialised output layers would hide differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


@pytest.mark.parametrize("build", [
    lambda m: m.UNet(1, 8, 16, (1, 2), 1, (4,), 0.0, num_classes=3, learn_sigma=True),
    lambda m: m.UNet(3, 8, 8, (1, 2, 2), 2, (8, 2), 0.0),
    lambda m: m.PointMLP(2, 32, 3, learn_sigma=False),
    lambda m: m.PointMLP(2, 16, 2, learn_sigma=True),
])
def test_networks_exchange_state_dicts_with_ddpm_py(ddpm, build):
    theirs, ours = randomize(build(ddpm), 0).eval(), build(ddim).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())  # same names, same order
    ours.load_state_dict(theirs.state_dict())
    image = isinstance(ours, ddim.UNet)
    shape = (4, ours.conv_in.in_channels, 8, 8) if image else (4, 2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([0, 5, 500, 999]), torch.tensor([0, 1, 2, 1])
    for label in (y, None):
        assert torch.equal(ours(x, t, label), theirs(x, t, label))
    randomize(ours, 2)
    theirs.load_state_dict(ours.state_dict())  # and back
    assert torch.equal(ours(x, t), theirs(x, t))


def test_cifar10_unet_has_the_papers_parameter_count():
    with torch.device("meta"):
        net = ddim.UNet(3, 32, 128, (1, 2, 2, 2), 2, (16,), 0.1)
    assert sum(p.numel() for p in net.parameters()) == 35_746_307  # 35.7M in Ho et al. Sec. 4


def test_classifiers_shapes_time_dependence_and_independent_examples():
    img = randomize(ddim.UNetClassifier(1, 8, 10, 16, (1, 2), 1, (4,)), 0)
    pts = randomize(ddim.PointClassifier(3, 2, 32, 2), 1)
    for net, x in ((img, torch.randn(3, 1, 8, 8)), (pts, torch.randn(3, 2))):
        t, y = torch.tensor([0, 400, 999]), torch.tensor([1, 0, 2])
        logits = net(x, t)
        assert logits.shape == (3, 10 if net is img else 3)
        assert not torch.allclose(logits, net(x, t.flip(0)))
        # the gradient of the batch is each example's own gradient (no mixing across the batch)
        grad = ddim.classifier_grad(net, x, t, y)
        for i in range(3):
            one = slice(i, i + 1)
            torch.testing.assert_close(grad[one], ddim.classifier_grad(net, x[one], t[one], y[one]))
        # and it is the gradient of log softmax, checked by a central difference
        d = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
        f = lambda z: torch.log_softmax(net(z, t), 1).gather(1, y[:, None]).sum().item()  # noqa: E731
        fd = (f(x + 1e-2 * d) - f(x - 1e-2 * d)) / 2e-2  # float32 networks: a wide central difference
        assert abs(fd - (grad * d).sum().item()) < 1e-3 * max(1.0, abs(fd))


def test_classifier_training_loss_decreases_on_the_mixture():
    """120 Adam steps of PointClassifier on noised mixture data move its loss from
    log 3 towards the exact classifier's (the floor E_t H(y | x_t))."""
    torch.manual_seed(0)
    net = ddim.PointClassifier(3, 2, 64, 2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    ab32 = AB.float()
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        x0, y = MIX.sample(256, g)
        loss = ddim.classifier_loss(net, x0.float(), y, ab32).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x0, y = MIX.sample(4000, g)
    t = torch.randint(0, 1000, (4000,), generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=f64)
    with torch.no_grad():
        learned = ddim.classifier_loss(net, x0.float(), y, ab32, t, noise.float()).mean().item()
    floor = ddim.classifier_loss(MIX.logits, x0, y, AB, t, noise).mean().item()
    assert floor < learned < floor + 0.1 < math.log(3), (learned, floor)


# ----------------------------------------------------------------------------------------
# Arguments, and independence from common.py
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, words", [
    (lambda: ddim.make_betas("linear", 0), "T = 0"),
    (lambda: ddim.make_betas("sigmoid", 10), "sigmoid"),
    (lambda: ddim.timestep_subsequence(10, 11), "S = 11"),
    (lambda: ddim.timestep_subsequence(10, 0), "S = 0"),
    (lambda: ddim.timestep_subsequence(10, 5, "cubic"), "cubic"),
    (lambda: ddim.ddim_sample(Toy(), AB, (2, 3), eta=1.5), "eta"),
    (lambda: ddim.ddim_sample(Toy(), AB, (2, 3), eta=-0.1), "eta"),
    (lambda: ddim.ddim_sample(Toy(), AB), "shape"),
    (lambda: ddim.ddim_sample(Toy(), AB, (2, 3), guidance=1.0), "labels"),
    (lambda: ddim.ddim_sample(Toy(), AB, (2, 3), classifier_scale=1.0), "classifier"),
    (lambda: ddim.q_sigma_posterior(torch.zeros(1), torch.zeros(1), 0.5, 0.9, 0.5), "sigma"),
    (lambda: ddim.UNet(1, 10, 8, (1, 2, 2)), "divisible"),
])
def test_bad_arguments_raise_value_error(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_imports_no_other_model_file():
    """ddim.py reads ddpm.py's checkpoints without importing it: the standard library, torch and common only."""
    import sys
    tree = ast.parse(Path(ddim.__file__).read_text())
    names = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert names <= set(sys.stdlib_module_names) | {"torch", "matplotlib", "common"}, names


def test_mathematics_runs_without_common(without_common):
    """Schedules, L_simple, the classifier's loss, the encoder, the sampler with both kinds of
    guidance and slerp, on the point and image networks, from the file's first half alone."""
    m = without_common("ddim")
    torch.manual_seed(0)
    ab = m.make_alphas_cumprod(m.make_betas("cosine", 8))
    net, clf = m.PointMLP(2, 16), m.PointClassifier(3, 2, 16, 2)
    x0, y = torch.randn(5, 2), torch.tensor([0, 1, 2, 0, 1])
    loss = m.l_simple(net, x0, ab).mean() + m.classifier_loss(clf, x0, y, ab).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in [*net.parameters(), *clf.parameters()])
    z = m.ddim_encode(net, ab, x0, steps=4, skip="quadratic")
    assert m.slerp(z, z.flip(0), 0.3).shape == (5, 2)
    x = m.ddim_sample(net, ab, x_T=z, steps=4, eta=0.5, y=y, classifier=clf,
                      classifier_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 2) and torch.isfinite(x).all()
    unet, uclf = m.UNet(1, 8, 8, (1, 2), 1, (4,), 0.0, num_classes=3), m.UNetClassifier(1, 8, 3, 8, (1, 2), 1, (4,))
    ab6, images = m.make_alphas_cumprod(m.make_betas("linear", 6)), torch.rand(2, 1, 8, 8) * 2 - 1
    assert torch.isfinite(m.l_simple(unet, images, ab6, m.drop_labels(torch.tensor([0, 2]), 0.5, 3))).all()
    x = m.ddim_sample(unet, ab6, (2, 1, 8, 8), steps=3, y=torch.tensor([0, 1]), guidance=2.0, classifier=uclf,
                      classifier_scale=1.0, clip_x0=True)
    assert x.shape == (2, 1, 8, 8) and x.abs().max() <= 1
    with pytest.raises(ValueError):
        m.make_betas("linear", 0)


CLASSIFIER_CIFAR10, UNET_DIGITS, MLP_POINTS = 13_414_794, 701_345, 182_274  # stated in README


def _parameters(net):
    return sum(p.numel() for p in net.parameters())


def test_presets_parameter_counts():
    """The cifar10 preset builds Ho et al.'s 35.7M U-Net (and its classifier, the same trunk);
    the counts of the digits and 2D defaults are those the README states."""
    import dataclasses
    cifar = common.DataInfo("cifar10", "image", (3, 32, 32), levels=256, num_classes=10)
    cfg = ddim.Config(**ddim.PRESETS["cifar10"])
    with torch.device("meta"):
        net, ab = ddim.build(cfg, cifar)
        classifier, _ = ddim.build(dataclasses.replace(cfg, train_classifier=True), cifar)
    assert _parameters(net) == 35_746_307 and len(ab) == 1000 and cfg.skip == "quad"  # Song et al. App. D.2
    assert isinstance(classifier, ddim.UNetClassifier) and _parameters(classifier) == CLASSIFIER_CIFAR10
    digits = common.load_dataset("digits").info
    assert _parameters(ddim.build(ddim.Config(), digits)[0]) == UNET_DIGITS
    # tau "uniform" on Song et al.'s other data sets; unset (digits, ddpm.py checkpoints): the paper's by paper_skip
    assert [ddim.Config(**ddim.PRESETS[d]).skip for d in ("mnist", "fashion-mnist", "digits")] == \
        ["uniform", "uniform", None]
    assert [ddim.paper_skip(i) for i in (cifar, digits, common.load_dataset("8gaussians").info)] == \
        ["quad", "uniform", "linear"]
    points = ddim.Config(**ddim.PRESETS["points"])
    net, ab = ddim.build(points, common.load_dataset("8gaussians").info)
    assert _parameters(net) == MLP_POINTS and len(ab) == 200


# ----------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------

TINY = ["--timesteps", "10", "--ch", "16", "--batch-size", "8", "--log-every", "1", "--n-samples", "10",
        "--warmup", "2", "--sample-steps", "5", "--device", "cpu"]
FIGURES = ("samples.png", "samples.pt", "sweep.png", "reconstruction.png", "interpolation.png")


def one_line_error(capsys, argv, *words):
    with pytest.raises(SystemExit) as e:
        ddim.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and "\n" not in err, err
    assert all(w in err for w in words), err


def test_cli_digits_train_sample_eval(tmp_path):
    run = tmp_path / "run"
    ddim.main(["--out", str(run), "--steps", "4", "--save-every", "2", "--cond", "--flip", "--eta", "0.5"] + TINY)
    for name in ("ckpt.pt", "samples_2.png", "samples_4.png", "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    ckpt = common.load_checkpoint(run / "ckpt.pt", "ddim")
    assert ckpt["step"] == 4 and ckpt["config"]["eta"] == 0.5 and set(ckpt) >= {"model", "ema", "opt", "batches", "rng"}
    ddim.main(["--sample", str(run / "ckpt.pt"), "--out", str(tmp_path / "s"), "--n-samples", "5", "--guidance", "2",
               "--sample-steps", "4", "--eta", "1", "--skip", "quadratic", "--no-clip-x0", "--device", "cpu"])
    for name in FIGURES:
        assert (tmp_path / "s" / name).is_file(), name
    samples = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    assert samples.shape == (5, 1, 8, 8) and samples.dtype == torch.uint8 and samples.max() <= 16
    ev = events(tmp_path / "s", "sample")[-1]
    assert (ev["n"], ev["steps"], ev["eta"], ev["skip"], ev["guidance"]) == (5, 4, 1.0, "quadratic", 2.0)
    assert ev["clip_x0"] is False
    result = ddim.main(["--eval", str(run / "ckpt.pt"), "--out", str(tmp_path / "e"), "--eval-n", "6",
                        "--batch-size", "4", "--eval-steps", "2,10,50", "--device", "cpu"])
    ev = events(tmp_path / "e", "eval")[-1]
    assert ev["n"] == 6 and ev["split"] == "test" and "no likelihood" in ev["reports"]
    assert ev["skip"] == "uniform"  # the paper's on images other than CIFAR-10
    assert "nll" not in ev and "bits_per_dim" not in ev  # benchmarks/likelihood.py shows n/a
    assert set(k for k in ev if k.startswith("mse_")) == {"mse_s2", "mse_s10"}  # 50 > T = 10 is skipped
    assert all(0 <= ev[k] <= 1 for k in ("mse_s2", "mse_s10")) and result["mse_s2"] == ev["mse_s2"]
    again = ddim.main(["--eval", str(run / "ckpt.pt"), "--out", str(tmp_path / "e"), "--eval-n", "6",
                       "--batch-size", "6", "--eval-steps", "2,10", "--device", "cpu"])
    assert again["mse_s10"] == pytest.approx(result["mse_s10"], rel=1e-5)  # deterministic both ways, any batch


def test_cli_points_sample_eval(tmp_path):
    run = tmp_path / "run"
    ddim.main(["--dataset", "8gaussians", "--out", str(run), "--steps", "3", "--hidden", "16", "--save-every", "3"]
              + TINY)
    assert (run / "samples_3.png").is_file()
    ddim.main(["--sample", str(run / "ckpt.pt"), "--n-samples", "7", "--sample-steps", "10", "--device", "cpu"])
    for name in FIGURES:
        assert (run / name).is_file(), name
    samples = torch.load(run / "samples.pt", weights_only=True)
    assert samples.shape == (7, 2) and samples.dtype == torch.float32
    result = ddim.main(["--eval", str(run / "ckpt.pt"), "--eval-n", "20", "--eval-steps", "1,5", "--device", "cpu"])
    assert set(result) == {"n", "skip", "mse_s1", "mse_s5"} and result["n"] == 20 and result["skip"] == "linear"
    assert math.isfinite(result["mse_s5"]) and not (run / "density.npz").exists()


def test_classifier_guidance_end_to_end(tmp_path, capsys, monkeypatch):
    """--train-classifier writes runs/ddim-digits-classifier, and a bare --resume continues it
    there (not from the epsilon-network in runs/ddim-digits); --classifier guides --sample, scale 0
    being the unguided sampler exactly; --eval of a classifier reports its accuracy against t; the
    checkpoints refuse the wrong roles with one line."""
    monkeypatch.chdir(tmp_path)
    eps = tmp_path / "runs" / "ddim-digits"  # the default folder, its network narrower than the classifier
    ddim.main(["--steps", "2"] + TINY + ["--ch", "8"])
    ddim.main(["--train-classifier", "--steps", "2", "--save-every", "2"] + TINY)
    clf = tmp_path / "runs" / "ddim-digits-classifier" / "ckpt.pt"
    assert common.load_checkpoint(clf, "ddim")["config"]["train_classifier"]
    assert not list(clf.parent.glob("samples_*.png"))
    ddim.main(["--train-classifier", "--steps", "3", "--resume", "--device", "cpu"])  # no other flag repeated
    assert common.load_checkpoint(clf)["step"] == 3 and common.load_checkpoint(clf)["config"]["ch"] == 16
    sample = ["--sample", eps / "ckpt.pt", "--n-samples", "4", "--sample-steps", "5", "--device", "cpu"]
    outs = {}
    for scale in ("0", "30"):
        outs[scale] = tmp_path / f"s{scale}"
        ddim.main([str(a) for a in sample + ["--classifier", clf, "--classifier-scale", scale, "--out", outs[scale]]])
        assert events(outs[scale], "sample")[-1]["classifier_scale"] == float(scale)
    ddim.main([str(a) for a in sample + ["--out", tmp_path / "plain"]])
    plain, zero, guided = (torch.load(p / "samples.pt", weights_only=True)
                           for p in (tmp_path / "plain", *outs.values()))
    assert torch.equal(plain, zero) and not torch.equal(plain, guided)
    result = ddim.main(["--eval", str(clf), "--out", str(tmp_path / "e"), "--eval-n", "12", "--device", "cpu"])
    assert set(result) == {"n", "loss", "accuracy_t1", "accuracy_t3", "accuracy_t6", "accuracy_t8", "accuracy_t10"}
    assert all(0 <= result[k] <= 1 for k in result if k.startswith("accuracy")) and result["loss"] > 0
    one_line_error(capsys, ["--sample", clf, "--out", tmp_path / "x"], "classifier", "--classifier")
    one_line_error(capsys, [*sample, "--classifier", eps / "ckpt.pt"], "not a classifier")
    one_line_error(capsys, [*sample, "--guidance", "1"], "--cond")
    one_line_error(capsys, [*sample, "--sample-steps", "11"], "--sample-steps 11")
    other = tmp_path / "other"
    ddim.main(["--train-classifier", "--out", str(other), "--steps", "1"] + TINY + ["--timesteps", "20"])
    one_line_error(capsys, [*sample, "--classifier", other / "ckpt.pt"], "--timesteps 20")


@pytest.mark.parametrize("argv, words", [
    (["--dataset", "8gaussians", "--cond"], "--cond"),
    (["--dataset", "8gaussians", "--train-classifier"], "--train-classifier"),
    (["--eta", "1.5"], "--eta"),
    (["--sample-steps", "20", "--timesteps", "10"], "--sample-steps"),
    (["--classifier", "clf.pt"], "--classifier"),
    (["--train-classifier", "--cond"], "--cond"),
    (["--train-classifier", "--sample", "x.pt"], "--train-classifier"),
    (["--eval-steps", "0,10"], "--eval-steps"),
    (["--classifier-scale", "-1"], "--classifier-scale"),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, words):
    one_line_error(capsys, argv + ["--out", tmp_path, "--device", "cpu", "--steps", "1"], words)


# ----------------------------------------------------------------------------------------
# ddpm.py's checkpoints
# ----------------------------------------------------------------------------------------

def ddpm_style_checkpoint(path, net, info, **config):
    """A checkpoint as ddpm.py writes one (its model name and Config fields), built here."""
    fields = dict(dataset=info.name, steps=0, batch_size=8, lr=2e-3, seed=0, device="cpu", out=None, resume=None,
                  overwrite=False, sample=None, n_samples=64, eval=None, compile=False, amp=False, data_dir=None,
                  log_every=50, save_every=500, timesteps=10, schedule="linear", mean_type="eps",
                  var_type="fixedlarge", lambda_vlb=1e-3, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_res=(4,),
                  dropout=0.0, hidden=128, warmup=100, grad_clip=1.0, ema_decay=0.995, flip=False, cond=False,
                  p_uncond=0.1, guidance=0.0, sample_steps=0, eval_n=0)
    fields.update(config)
    state = net.state_dict()
    common._save_checkpoint(path, dict(model_name="ddpm", step=0, config=fields, data=info.as_dict(),
                                      rng=[{"cpu": torch.get_rng_state(), "cuda": None}], model=state,
                                      ema={"model": state, "num_updates": 0}))


def test_a_ddpm_checkpoint_with_learned_variance_samples_on_its_epsilon_channels(tmp_path, capsys):
    info = common.load_dataset("digits").info
    theirs = randomize(ddim.UNet(1, 8, 16, (1, 2), 1, (4,), 0.0, num_classes=10, learn_sigma=True), 0).eval()
    path = tmp_path / "ddpm.pt"
    ddpm_style_checkpoint(path, theirs, info, var_type="learned", cond=True)
    (net, ab), cfg, loaded_info = ddim.load(path)
    assert cfg.cond and not cfg.train_classifier and loaded_info == info and len(ab) == 10
    assert not hasattr(cfg, "var_type") and net.conv_out.out_channels == 1
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 9]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert torch.equal(net(x, t, y), theirs(x, t, y)[:, :1])
    ddim.main(["--sample", str(path), "--n-samples", "3", "--sample-steps", "5", "--guidance", "1", "--device", "cpu"])
    assert torch.load(tmp_path / "samples.pt", weights_only=True).shape == (3, 1, 8, 8)
    x0_path = tmp_path / "x0.pt"
    ddpm_style_checkpoint(x0_path, ddim.UNet(1, 8, 16, (1, 2), 1, (4,), 0.0), info, mean_type="x0")
    one_line_error(capsys, ["--sample", x0_path, "--out", tmp_path / "o"], "x0", "epsilon")
    one_line_error(capsys, ["--out", tmp_path / "r", "--resume", path] + TINY, "written by ddpm.py")


@pytest.mark.parametrize("dataset, extra", [("8gaussians", ["--hidden", "16"]),
                                            ("digits", ["--ch", "16", "--cond"])])
def test_eta_one_on_all_t_steps_reproduces_ddpm_py_samples(ddpm, tmp_path, dataset, extra):
    """The same ddpm.py checkpoint ("fixedsmall": variance beta-tilde), the same seed:
    `ddim.py --eta 1 --sample-steps T` draws what `ddpm.py --sample` draws (Song et al. Eq. 16
    with eta = 1 is DDPM's posterior; the noise is drawn in the same order), with guidance on
    the conditional digits model."""
    run = tmp_path / "run"
    ddpm.main(["--dataset", dataset, "--out", str(run), "--steps", "20", "--timesteps", "10", "--batch-size", "8",
               "--warmup", "1", "--var-type", "fixedsmall", "--log-every", "10", "--device", "cpu", *extra])
    guidance = ["--guidance", "1.5"] if "--cond" in extra else []
    common_flags = ["--n-samples", "6", "--seed", "3", "--device", "cpu", *guidance]
    ddpm.main(["--sample", str(run / "ckpt.pt"), "--out", str(tmp_path / "ddpm"), *common_flags])
    ddim.main(["--sample", str(run / "ckpt.pt"), "--out", str(tmp_path / "ddim"), "--eta", "1", "--sample-steps",
               "10", *common_flags])
    theirs, ours = (torch.load(tmp_path / m / "samples.pt", weights_only=True) for m in ("ddpm", "ddim"))
    if dataset == "digits":
        assert torch.equal(ours, theirs)  # integer levels
    else:
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
