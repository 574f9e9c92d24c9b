"""Tests of score_sde.py: the mathematics, each against an independent computation (the paper's
closed forms typed here, Gaussian conditioning, autograd Jacobians, torch.linalg.matrix_exp,
scipy.integrate.solve_ivp, Monte Carlo with a tolerance from its standard error); oracles (for a
Gaussian mixture the score of every perturbed marginal p_t is closed form, so the samplers must
reproduce the mixture and the ODE likelihood must give its exact log-density); and the command
line end to end, where an untrained network (its output layer is zero, so its score is 0) has a
closed-form likelihood that --eval must reproduce."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

import common
import score_sde as S
from conftest import events, run_main

f64 = torch.float64
SETTINGS = settings(max_examples=10, deadline=None)
SDE_NAMES = ["ve", "vp", "subvp"]


def make_sde(name):
    return S.SDES[name]()  # the paper's settings: sigma 0.01..50, beta 0.1..20


def paper_kernel(name, t):
    """m(t) and sigma(t) of p_0t typed from the SDE paper (App. B) with its CIFAR-10 settings,
    independently of score_sde: VE sigma(t) = 0.01 (50/0.01)^t (from the data convolved with
    N(0, 0.01^2)), VP N(x0 e^{-B/2}, 1 - e^{-B}), sub-VP N(x0 e^{-B/2}, (1 - e^{-B})^2) with
    B(t) = int_0^t beta = 0.1 t + 19.9 t^2 / 2."""
    t = torch.as_tensor(t, dtype=f64)
    if name == "ve":
        return torch.ones_like(t), 0.01 * (50 / 0.01) ** t
    B = 0.1 * t + 0.5 * 19.9 * t ** 2
    var = 1 - torch.exp(-B) if name == "vp" else (1 - torch.exp(-B)) ** 2
    return torch.exp(-B / 2), var.sqrt()


def t_vec(t, n):
    return torch.full((n,), float(t), dtype=f64)


# ---------------------------------------------------------------------------- the SDEs

@pytest.mark.parametrize("name", SDE_NAMES)
@SETTINGS
@given(t=st.floats(1e-4, 1.0))
def test_marginal_prob_equals_the_papers_kernel_and_solves_the_moment_odes(name, t):
    """Closed form: m, sigma as in App. B. Consistency with the SDE: for a linear SDE
    dx = -1/2 beta x dt + g dw the kernel's moments obey dm/dt = -1/2 beta m and
    d(sigma^2)/dt = -beta sigma^2 + g^2; checked with autograd derivatives in t, so the drift
    and diffusion of `sde()` are tied to `marginal_prob` (a wrong g or a missing discount would fail)."""
    sde = make_sde(name)
    tt = torch.tensor([t], dtype=f64, requires_grad=True)
    x0 = torch.tensor([[1.0]], dtype=f64)
    mean, std = sde.marginal_prob(x0, tt)
    m_ref, s_ref = paper_kernel(name, t)
    torch.testing.assert_close(mean[0, 0].detach(), m_ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(std[0].detach(), s_ref, rtol=1e-10, atol=1e-15)
    dm = torch.autograd.grad(mean.sum(), tt)[0] if mean.requires_grad else torch.zeros(1, dtype=f64)  # VE: m = 1
    dvar, = torch.autograd.grad((std ** 2).sum(), tt)
    f, g = sde.sde(x0, tt.detach())               # f = -1/2 beta(t) x at x = 1
    torch.testing.assert_close(dm, f[0] * mean.detach()[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dvar, 2 * f[0, 0] * std.detach() ** 2 + g ** 2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", SDE_NAMES)
def test_marginal_prob_agrees_with_euler_maruyama_simulation(name):
    """10 000 paths of dx = f dt + g dw, 1000 Euler-Maruyama steps from t = 0 to 0.6, started at
    x0 = 1.5 (VE: from the data convolved with N(0, sigma_min^2), its t = 0 marginal). Mean and
    variance within 5 standard errors (sigma / sqrt(n), sigma^2 sqrt(2 / n), 7% of the variance);
    the scheme's own bias (under 0.6% of the variance for VE's fast-growing g) is far below."""
    sde, n, steps, t_end = make_sde(name), 10_000, 1000, 0.6
    g = torch.Generator().manual_seed(0)
    x = torch.full((n, 1), 1.5, dtype=f64)
    if name == "ve":
        x = x + sde.sigma_min * torch.randn(n, 1, generator=g, dtype=f64)
    dt = t_end / steps
    for i in range(steps):
        f, gt = sde.sde(x, t_vec(i * dt, n))
        x = x + f * dt + gt[:, None] * math.sqrt(dt) * torch.randn(n, 1, generator=g, dtype=f64)
    mean, std = sde.marginal_prob(torch.tensor([[1.5]], dtype=f64), torch.tensor([t_end], dtype=f64))
    var = std[0] ** 2
    assert abs(x.mean() - mean[0, 0]) < 5 * var.sqrt() / math.sqrt(n)
    assert abs(x.var() - var) < 5 * var * math.sqrt(2 / n)


@pytest.mark.parametrize("name", SDE_NAMES)
@SETTINGS
@given(t=st.floats(0.01, 1.0), frac=st.floats(0.05, 0.95))
def test_discretize_is_the_exact_transition_between_marginals(name, t, frac):
    """x_t = a x_s + G z with a = m(t)/m(s) and G^2 = sigma(t)^2 - a^2 sigma(s)^2 (the variance
    the kernel adds between s and t); for VE G^2 = sigma_t^2 - sigma_s^2 (SMLD's chain), for VP
    a^2 = 1 - beta_i with DDPM's beta_i = 1 - alpha_bar(t) / alpha_bar(s)."""
    s = frac * t
    sde = make_sde(name)
    a, G = sde.discretize(torch.tensor([t], dtype=f64), torch.tensor([s], dtype=f64))
    (m_t, sig_t), (m_s, sig_s) = paper_kernel(name, t), paper_kernel(name, s)
    torch.testing.assert_close(a[0], m_t / m_s, rtol=1e-12, atol=0)
    torch.testing.assert_close(G[0] ** 2, sig_t ** 2 - (m_t / m_s) ** 2 * sig_s ** 2, rtol=1e-9, atol=1e-13)
    if name == "vp":
        torch.testing.assert_close(1 - a[0] ** 2, G[0] ** 2, rtol=1e-12, atol=1e-15)


def test_vp_discretisation_matches_the_papers_betas_to_first_order():
    """The paper's VP chain uses beta_i = beta(t_i) / N on N = 1000 steps; the exact transition's
    1 - a^2 differs from it by O(1/N^2) only (relative error below 2% at every step)."""
    sde, N = S.VPSDE(), 1000
    t = torch.arange(1, N + 1, dtype=f64) / N
    a, _ = sde.discretize(t, t - 1 / N)
    paper = sde.beta(t - 0.5 / N) / N
    assert ((1 - a ** 2) / paper - 1).abs().max() < 0.02


@pytest.mark.parametrize("name", SDE_NAMES)
def test_prior_is_the_gaussian_at_T(name):
    sde = make_sde(name)
    g = torch.Generator().manual_seed(0)
    z = sde.prior_sample((4000, 3), dtype=f64, generator=g)
    expected_std = 50.0 if name == "ve" else 1.0
    assert abs(z.std() / expected_std - 1) < 5 / math.sqrt(2 * z.numel())
    ref = torch.distributions.Normal(0.0, expected_std).log_prob(z[:5]).sum(1)
    torch.testing.assert_close(sde.prior_log_prob(z[:5]), ref)
    # the prior is close to the true marginal at T = 1 for bounded data: m(1) < 0.007 (VP),
    # sigma(1) = sigma_max (VE)
    m, s = paper_kernel(name, 1.0)
    assert (m < 0.007 and abs(s - 1) < 1e-4) if name != "ve" else abs(s - 50) < 1e-9


def test_ve_time_of_sigma_inverts_sigma():
    sde = S.VESDE()
    t = torch.linspace(0, 1, 11, dtype=f64)
    torch.testing.assert_close(sde.t_of_sigma(sde.std(t)), t)


# ---------------------------------------------------------------------------- training objectives

def gaussian_marginal_log_prob(name, x, t, mu, s):
    """log p_t(x) for x0 ~ N(mu, s^2 I), by the paper's kernel: N(m mu, (m^2 s^2 + sigma^2) I)."""
    m, sig = paper_kernel(name, t)
    var = m ** 2 * s ** 2 + sig ** 2
    return torch.distributions.Normal(m * mu, var.sqrt()).log_prob(x).sum(-1)


@pytest.mark.parametrize("name", SDE_NAMES)
@SETTINGS
@given(t=st.floats(1e-3, 1.0), mu=st.floats(-2, 2), s=st.floats(0.1, 2.0))
def test_dsm_target_averaged_over_the_posterior_is_the_true_score(name, t, mu, s):
    """Vincent 2011: E[grad log p_0t(x_t | x0) | x_t] = grad log p_t(x_t). For Gaussian data the
    posterior of x0 given x_t is Gaussian with mean mu + m s^2 / (m^2 s^2 + sigma^2)(x_t - m mu);
    the target is linear in x0, so its posterior mean is the target at that mean. The true score
    comes from autograd of the Gaussian marginal. Also: the target is the gradient of the kernel.
    Tolerance 1e-8, or the reference's own rounding where larger: x_t - m E[x0 | x_t] cancels to
    sigma^2 / (m^2 s^2 + sigma^2) of x_t (3e-9 of it for sub-VP at t = 1e-3, s = 2)."""
    sde = make_sde(name)
    g = torch.Generator().manual_seed(1)
    x_t = (3 * torch.randn(6, 2, generator=g, dtype=f64)).requires_grad_(True)
    tt = t_vec(t, 6)
    m, sig = paper_kernel(name, t)
    post_mean = mu + m * s ** 2 / (m ** 2 * s ** 2 + sig ** 2) * (x_t.detach() - m * mu)
    avg_target = S.dsm_target(sde, x_t.detach(), post_mean, tt)
    true_score, = torch.autograd.grad(gaussian_marginal_log_prob(name, x_t, t, mu, s).sum(), x_t)
    rtol = max(1e-8, 8 * torch.finfo(f64).eps * float((m ** 2 * s ** 2 + sig ** 2) / sig ** 2))
    torch.testing.assert_close(avg_target, true_score, rtol=rtol, atol=1e-8)
    x0 = torch.randn(6, 2, generator=g, dtype=f64)
    kernel = torch.distributions.Normal(m * x0, sig).log_prob(x_t).sum()
    kernel_grad, = torch.autograd.grad(kernel, x_t)
    torch.testing.assert_close(S.dsm_target(sde, x_t.detach(), x0, tt), kernel_grad, rtol=1e-8, atol=1e-8)


def exact_gaussian_score(sde_name, mu, s):
    def score_fn(x, t):
        m, sig = paper_kernel(sde_name, t)
        m, sig = m[:, None], sig[:, None]
        return -(x - m * mu) / (m ** 2 * s ** 2 + sig ** 2)
    return score_fn


@pytest.mark.parametrize("name", SDE_NAMES)
@settings(max_examples=4, deadline=None)
@given(mu=st.floats(-1, 1), s=st.floats(0.2, 2.0))
def test_dsm_loss_at_the_true_score_is_its_known_minimum(name, mu, s):
    """At the true score the loss is E_t[lambda(t) E||s - target||^2]/D = E_t[m^2 s^2 / (m^2 s^2 +
    sigma^2)] (the per-dimension posterior variance of z, t ~ U(eps, 1)), computed here by
    quadrature; adding a constant c to the score adds exactly c^2 E_t[sigma(t)^2] (lambda(t) =
    sigma^2, as Eq. 7). Monte Carlo over 40 000 examples, 5 standard errors."""
    sde, n, eps = make_sde(name), 40_000, 1e-5
    g = torch.Generator().manual_seed(0)
    x0 = mu + s * torch.randn(n, 2, generator=g, dtype=f64)
    t = eps + (1 - eps) * torch.rand(n, generator=g, dtype=f64)
    z = torch.randn(n, 2, generator=g, dtype=f64)
    score = exact_gaussian_score(name, mu, s)
    loss = S.dsm_loss(score, sde, x0, t=t, z=z)

    def minimum(u):
        m, sig = paper_kernel(name, u)
        return float(m ** 2 * s ** 2 / (m ** 2 * s ** 2 + sig ** 2))
    expected = integrate.quad(minimum, eps, 1, limit=200)[0] / (1 - eps)
    assert abs(loss.mean() - expected) < 5 * loss.std() / math.sqrt(n)
    c = 0.3 / max(1.0, float(paper_kernel(name, 1.0)[1]))   # keep VE's c^2 sigma^2 moderate
    shifted = S.dsm_loss(lambda x, tt: score(x, tt) + c, sde, x0, t=t, z=z)
    excess = shifted - loss
    expected_excess = c ** 2 * integrate.quad(lambda u: float(paper_kernel(name, u)[1]) ** 2, eps, 1)[0] / (1 - eps)
    assert abs(excess.mean() - expected_excess) < 5 * excess.std() / math.sqrt(n)


def test_make_score_fn_turns_dsm_into_noise_regression():
    sde = S.VPSDE()
    g = torch.Generator().manual_seed(0)
    x0, z, t = (torch.randn(7, 3, generator=g, dtype=f64), torch.randn(7, 3, generator=g, dtype=f64),
                0.01 + torch.rand(7, generator=g, dtype=f64))
    W = torch.randn(3, 3, generator=g, dtype=f64)

    def model(x, tt):
        return torch.tanh(x @ W) * tt[:, None]
    loss = S.dsm_loss(S.make_score_fn(model, sde), sde, x0, t=t, z=z)
    mean, std = sde.marginal_prob(x0, t)
    torch.testing.assert_close(loss, ((model(mean + std[:, None] * z, t) - z) ** 2).mean(1))


@pytest.mark.parametrize("variant", ["ssm-vr", "ssm", "sm"])
@pytest.mark.parametrize("name", ["ve", "vp"])
def test_sliced_and_exact_score_matching_equal_dsm_up_to_a_constant(name, variant):
    """For Gaussian data and linear scores s(x) = A x + b (not the true one) at fixed t:
    E[SSM] = E[SM] = sigma^2 (2 tr A + E||A x_t + b||^2) / D in closed form (x_t ~ N(m mu, v I)),
    and E[SSM] - E[DSM] does not depend on s (Hyvarinen 2005, Thm. 1): equal for two scores. Monte
    Carlo over 200 000 examples, 5 standard errors of the (paired) differences."""
    sde, n, D, t, mu, s = make_sde(name), 200_000, 2, 0.3, 0.5, 0.7
    g = torch.Generator().manual_seed(0)
    x0 = mu + s * torch.randn(n, D, generator=g, dtype=f64)
    z, v = torch.randn(n, D, generator=g, dtype=f64), torch.randn(n, D, generator=g, dtype=f64)
    tt = t_vec(t, n)
    m, sig = paper_kernel(name, t)
    var = m ** 2 * s ** 2 + sig ** 2
    diffs = []
    for A, b in [(torch.tensor([[-1.0, 0.3], [0.2, -0.5]], dtype=f64), torch.tensor([0.1, -0.2], dtype=f64)),
                 (torch.tensor([[-2.0, 0.0], [-0.4, -1.0]], dtype=f64), torch.tensor([0.4, 0.0], dtype=f64))]:
        A, b = A / sig, b / sig    # scores scale as 1/sigma, so keep lambda-weighted terms O(1)

        def score(x, _t, A=A, b=b):
            return x @ A.T + b
        ssm = (S.score_matching_loss(score, sde, x0, t=tt, z=z) if variant == "sm" else
               S.sliced_score_matching_loss(score, sde, x0, t=tt, z=z, v=v, variance_reduction=variant == "ssm-vr"))
        mean_x = m * mu * torch.ones(D, dtype=f64)
        closed = sig ** 2 * (2 * torch.trace(A) + (A @ mean_x + b).pow(2).sum() + var * (A ** 2).sum()) / D
        assert abs(ssm.mean() - closed) < 5 * ssm.std() / math.sqrt(n)
        diffs.append(ssm - S.dsm_loss(score, sde, x0, t=tt, z=z))
    gap = diffs[0] - diffs[1]
    assert abs(gap.mean()) < 5 * gap.std() / math.sqrt(n)


def test_sliced_score_matching_trains_through_the_jacobian():
    """The loss keeps the vector-Jacobian product in the graph: its gradient with respect to a
    parameter of the score equals autograd's through an explicitly built objective."""
    sde = S.VPSDE()
    w = torch.tensor(0.7, dtype=f64, requires_grad=True)
    x0, t = torch.randn(5, 2, dtype=f64), torch.full((5,), 0.4, dtype=f64)
    z, v = torch.randn(5, 2, dtype=f64), torch.randn(5, 2, dtype=f64)
    S.sliced_score_matching_loss(lambda x, _t: -w * x ** 3, sde, x0, t=t, z=z, v=v).sum().backward()
    mean, std = sde.marginal_prob(x0, t)
    x = mean + std[:, None] * z
    wd = w.detach().requires_grad_(True)
    # v^T J v = sum_i v_i^2 (-3 w x_i^2), s = -w x^3
    explicit = std ** 2 * (2 * (v ** 2 * -3 * wd * x ** 2).sum(1) + (wd * x ** 3).pow(2).sum(1)) / 2
    explicit.sum().backward()
    torch.testing.assert_close(w.grad, wd.grad)


def test_exact_score_matching_trains_through_the_divergence():
    """The same for --loss sm: tr J = sum_i -3 w x_i^2, kept in the graph."""
    sde = S.VPSDE()
    w = torch.tensor(0.7, dtype=f64, requires_grad=True)
    x0, t, z = torch.randn(5, 2, dtype=f64), torch.full((5,), 0.4, dtype=f64), torch.randn(5, 2, dtype=f64)
    S.score_matching_loss(lambda x, _t: -w * x ** 3, sde, x0, t=t, z=z).sum().backward()
    mean, std = sde.marginal_prob(x0, t)
    x = mean + std[:, None] * z
    wd = w.detach().requires_grad_(True)
    explicit = std ** 2 * (2 * (-3 * wd * x ** 2).sum(1) + (wd * x ** 3).pow(2).sum(1)) / 2
    explicit.sum().backward()
    torch.testing.assert_close(w.grad, wd.grad)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_hyvarinen_objective_equals_the_explicit_loss_up_to_a_constant(seed):
    """Hyvarinen 2005, Thm. 1, by quadrature of a known density (the 3-component mixture below):
    for analytic scores s(x) = A x + b + c tanh(W x), int p [tr ds/dx + 1/2 ||s||^2] =
    int p 1/2 ||s - grad log p||^2 - int p 1/2 ||grad log p||^2, the constant independent of s.
    Riemann sum on [-7, 7]^2 with spacing 0.02 (spectrally accurate for these smooth, decaying
    integrands; mass outside the box below 1e-12). A wrong sign of the trace or a missing 1/2
    changes the gap by O(1); s is far from the true score (the explicit loss is O(1) or more)."""
    g = torch.Generator().manual_seed(seed)
    A, W = torch.randn(2, 2, generator=g, dtype=f64), torch.randn(2, 2, generator=g, dtype=f64)
    b, c = torch.randn(2, generator=g, dtype=f64), torch.randn(2, generator=g, dtype=f64)

    def score(x):
        return x @ A.T + b + c * torch.tanh(x @ W.T)
    h = 0.02
    axis = torch.arange(-7, 7 + h / 2, h, dtype=f64)
    x = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    t = t_vec(0.0, len(x))
    p = mixture_log_prob("ve", x, t).exp()
    true = mixture_score("ve")(x, t)
    implicit = (p * S.hyvarinen_score_matching(score, x)).sum() * h ** 2
    explicit = (p * 0.5 * (score(x) - true).pow(2).sum(1)).sum() * h ** 2
    constant = -(p * 0.5 * true.pow(2).sum(1)).sum() * h ** 2
    assert (p.sum() * h ** 2).item() == pytest.approx(1.0, abs=1e-10)
    assert explicit > 0.1
    assert implicit.item() == pytest.approx((explicit + constant).item(), abs=1e-7)


# ---------------------------------------------------------------------------- Langevin steps

def test_langevin_step_has_the_requested_signal_to_noise_ratio():
    """Algorithm 4/5's step eps = 2 alpha (r ||z|| / ||s||)^2 makes the batch-mean norm of the drift
    eps s over that of the noise sqrt(2 eps) z equal to r sqrt(alpha)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 4, 4, generator=g, dtype=f64)
    for alpha in (1.0, 0.81):
        x_new, x_mean = S.langevin_corrector(lambda x, t: -x / 0.3, x, t_vec(0.5, 50), snr=0.16, alpha=alpha,
                                             generator=g)
        drift = (x_mean - x).flatten(1).norm(dim=1).mean()
        noise = (x_new - x_mean).flatten(1).norm(dim=1).mean()
        assert abs(drift / noise - 0.16 * math.sqrt(alpha)) < 1e-12


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_langevin_corrector_stationary_variance_is_the_ula_closed_form(alpha):
    """Unadjusted Langevin on N(0, v I) with step eps has stationary variance V = v / (1 - eps/(2v));
    with the snr step eps = 2 alpha r^2 (||z|| / ||s||)^2 and ||s|| = ||x|| / v this solves to
    V = v (1 + alpha r^2). r = 0.5 makes it 25% (alpha = 1) or 12.5% above v: a step off by a
    factor 2, or noise sqrt(eps) for sqrt(2 eps), would miss by more than 10%. 4000 chains of
    dimension 8, 300 steps (the variance relaxes within ~50), tolerance 5 standard errors."""
    n, D, v, r = 4000, 8, 0.3, 0.5
    g = torch.Generator().manual_seed(0)
    x = math.sqrt(v) * torch.randn(n, D, generator=g, dtype=f64)
    for _ in range(300):
        x, _ = S.langevin_corrector(lambda x, t: -x / v, x, t_vec(0.5, n), snr=r, alpha=alpha, generator=g)
    V = x.pow(2).mean()
    assert abs(V / (v * (1 + alpha * r ** 2)) - 1) < 5 * math.sqrt(2 / (n * D))


def test_reverse_diffusion_mean_is_tweedies_posterior_mean_for_ve():
    """For VE, x_t = x_s + G z, so E[x_s | x_t] = x_t + G^2 grad log p_t(x_t) (Tweedie); the reverse
    diffusion predictor's mean is exactly that. Checked against Gaussian conditioning for
    Gaussian data (x_s ~ N(mu, V_s), x_t ~ N(mu, V_s + G^2))."""
    sde, mu, s = S.VESDE(), 0.4, 0.8
    t, t_prev = 0.5, 0.45
    x = torch.linspace(-3, 3, 7, dtype=f64)[:, None]
    _, x_mean = S.reverse_diffusion_predictor(sde, exact_gaussian_score("ve", mu, s), x, t_vec(t, 7),
                                              t_vec(t_prev, 7))
    Vs = s ** 2 + paper_kernel("ve", t_prev)[1] ** 2
    Vt = s ** 2 + paper_kernel("ve", t)[1] ** 2
    torch.testing.assert_close(x_mean, mu + Vs / Vt * (x - mu), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- oracles: a Gaussian mixture

MIX_W = torch.tensor([0.5, 0.3, 0.2], dtype=f64)
MIX_M = torch.tensor([[-1.5, 0.0], [1.0, 1.0], [1.0, -1.5]], dtype=f64)
MIX_S = torch.tensor([0.5, 0.3, 0.7], dtype=f64)   # isotropic standard deviations


def _mixture_t(name, t, n):
    t = t_vec(t, n) if not torch.is_tensor(t) or t.dim() == 0 else t
    m, sig = paper_kernel(name, t)
    return m[:, None], m[:, None] ** 2 * MIX_S[None] ** 2 + sig[:, None] ** 2   # (B, 1), (B, K)


def mixture_log_prob(name, x, t):
    """log p_t(x) = log sum_k w_k N(x; m(t) mu_k, (m^2 s_k^2 + sigma^2) I), exact."""
    m, var = _mixture_t(name, t, x.shape[0])
    d2 = ((x[:, None, :] - m[:, :, None] * MIX_M[None]) ** 2).sum(-1)
    D = x.shape[1]
    return torch.logsumexp(torch.log(MIX_W) - d2 / (2 * var) - D / 2 * torch.log(2 * math.pi * var), 1)


def mixture_score(name):
    """The exact score of p_t: sum_k r_k(x) (-(x - m mu_k) / v_k), r_k the responsibilities."""
    def score_fn(x, t):
        m, var = _mixture_t(name, t, x.shape[0])
        diff = x[:, None, :] - m[:, :, None] * MIX_M[None]
        logits = torch.log(MIX_W) - (diff ** 2).sum(-1) / (2 * var) - x.shape[1] / 2 * torch.log(var)
        return -(torch.softmax(logits, 1)[:, :, None] * diff / var[:, :, None]).sum(1)
    return score_fn


def test_mixture_oracle_score_is_the_gradient_of_its_log_density():
    x = torch.randn(9, 2, dtype=f64).requires_grad_(True)
    for name in SDE_NAMES:
        grad, = torch.autograd.grad(mixture_log_prob(name, x, 0.2).sum(), x)
        torch.testing.assert_close(mixture_score(name)(x.detach(), t_vec(0.2, 9)), grad)


def mixture_moments(name, eps):
    """Mean and covariance of p_eps: the mixture's (plus sigma(eps)^2 I), scaled by m(eps)."""
    m, sig = paper_kernel(name, eps)
    mean = m * (MIX_W[:, None] * MIX_M).sum(0)
    second = m ** 2 * (MIX_W[:, None, None] * (MIX_M[:, :, None] * MIX_M[:, None, :]
                                                + (MIX_S ** 2)[:, None, None] * torch.eye(2, dtype=f64))).sum(0)
    return mean, second - mean[:, None] * mean[None] + sig ** 2 * torch.eye(2, dtype=f64)


def assert_mixture_moments(x, name, eps):
    """Mean and covariance entries within 5 standard errors (the errors of the sample mean and of
    the sample second moments, estimated from the samples)."""
    n = x.shape[0]
    mean, cov = mixture_moments(name, eps)
    err_mean = x.mean(0) - mean
    assert (err_mean.abs() < 5 * x.std(0) / math.sqrt(n)).all(), err_mean
    xc = x - x.mean(0)
    prods = xc[:, :, None] * xc[:, None, :]
    assert ((prods.mean(0) - cov).abs() < 5 * prods.std(0) / math.sqrt(n)).all(), prods.mean(0) - cov


# The samplers at n = 2000: the tolerance is 5 standard errors, about 0.1 on the means. Measured
# biases at n = 20 000: the reverse-SDE samplers' discretisation (N = 1000) under 0.01; the
# Langevin corrector at snr 0.16 moves about 1% of the mass from the narrow to the wide
# component (0.026 on the mean, the O(eps) bias of unadjusted Langevin); annealed Langevin
# (eps = 2e-5, T = 100, as the paper) the same, 0.05. A wrong sign or a missing g^2 factor
# moves the moments by O(1).
@pytest.mark.parametrize("name", SDE_NAMES)
@pytest.mark.parametrize("predictor, corrector", [("reverse_diffusion", "langevin"), ("euler_maruyama", None)])
def test_pc_and_reverse_sde_samplers_reproduce_the_mixture(name, predictor, corrector):
    sde = make_sde(name)
    g = torch.Generator().manual_seed(0)
    x = S.pc_sample(sde, mixture_score(name), (2000, 2), n_steps=250, predictor=predictor, corrector=corrector,
                    snr=0.16, dtype=f64, generator=g)
    assert_mixture_moments(x, name, 1e-3)


@pytest.mark.parametrize("name", SDE_NAMES)
def test_ode_sampler_reproduces_the_mixture(name):
    sde = make_sde(name)
    x, nfe = S.ode_sample(sde, mixture_score(name), (2000, 2), dtype=f64, generator=torch.Generator().manual_seed(0))
    assert_mixture_moments(x, name, 1e-3)
    assert 20 < nfe < 1000


def test_annealed_langevin_dynamics_reproduces_the_mixture():
    """Song & Ermon's Algorithm 1 with their eps = 2e-5 and T = 100 on 10 levels from sigma_1 = 5
    (the largest distance between the components, Song & Ermon 2020's advice) to 0.01, using
    the exact score of the VE marginals at those sigmas."""
    ve = S.VESDE()
    score = mixture_score("ve")
    sigmas = S.ncsn_sigmas(5.0, 0.01, 10)
    g = torch.Generator().manual_seed(0)
    x = S.annealed_langevin_dynamics(lambda x, s: score(x, ve.t_of_sigma(s)), 5 * torch.randn(2000, 2, generator=g,
                                     dtype=f64), sigmas, eps=2e-5, n_steps_each=100, generator=g)
    assert_mixture_moments(x, "ve", 0.0)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_ncsn_objective_is_minimised_by_the_mixture_oracle(seed):
    """Song & Ermon's Eqs. 5-6 (lambda = sigma^2) on mixture data: the closed-form score of the
    data convolved with N(0, sigma_i^2 I) minimises it. Perturbed as s + delta u(x~) / sigma with a
    random affine u, the loss rises by exactly delta^2 / 2 E||u||^2 (the cross term vanishes at the
    oracle: E[z | x~] = -sigma s(x~)): checked within 5 standard errors of the paired differences
    (same x, z, levels), for delta = +-0.2, so the loss rises in the direction and against it.
    n = 100 000, 10 levels from 5 to 0.01."""
    ve, n = S.VESDE(), 100_000
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(MIX_W, n, replacement=True, generator=g)
    x0 = MIX_M[k] + MIX_S[k, None] * torch.randn(n, 2, generator=g, dtype=f64)
    sigmas = S.ncsn_sigmas(5.0, 0.01, 10)
    labels, z = torch.randint(10, (n,), generator=g), torch.randn(n, 2, generator=g, dtype=f64)
    oracle = mixture_score("ve")                 # the score of p_t, whose sigma(t) is sigma_i at ve.t_of_sigma

    def score(x, sigma):
        return oracle(x, ve.t_of_sigma(sigma))
    best = S.ncsn_loss(score, sigmas, x0, labels, z)
    A, b = torch.randn(2, 2, generator=g, dtype=f64), torch.randn(2, generator=g, dtype=f64)
    x_tilde = x0 + sigmas[labels][:, None] * z
    u2 = (x_tilde @ A.T + b).pow(2).sum(1)
    for delta in (0.2, -0.2):
        def perturbed(x, sigma):
            return score(x, sigma) + delta * (x @ A.T + b) / sigma[:, None]
        diff = S.ncsn_loss(perturbed, sigmas, x0, labels, z) - best
        se = diff.std() / math.sqrt(n)
        assert diff.mean() > 5 * se
        assert abs(diff.mean() - delta ** 2 / 2 * u2.mean()) < 5 * (diff - delta ** 2 / 2 * u2).std() / math.sqrt(n)


def test_ncsn_loss_is_the_ve_dsm_loss_at_its_levels():
    """At level i, with the same z: 1/2 ||sigma_i s + z||^2 = D/2 dsm_loss of the VE SDE at the t
    with sigma(t) = sigma_i (lambda = sigma^2 in both); labels pick the level per example."""
    ve, x0, z = S.VESDE(0.01, 5.0), torch.randn(6, 2, dtype=f64), torch.randn(6, 2, dtype=f64)
    sigmas = S.ncsn_sigmas(5.0, 0.01, 4)
    labels = torch.tensor([0, 1, 2, 3, 3, 0])
    score = mixture_score("ve")
    ours = S.ncsn_loss(lambda x, sigma: score(x, ve.t_of_sigma(sigma)) * 1.3, sigmas, x0, labels, z)
    dsm = S.dsm_loss(lambda x, t: score(x, t) * 1.3, ve, x0, t=ve.t_of_sigma(sigmas[labels]), z=z)
    torch.testing.assert_close(ours, dsm * 2 / 2)  # D / 2 with D = 2


def test_ncsn_sigmas_are_geometric():
    s = S.ncsn_sigmas()
    assert len(s) == 10 and s[0] == 1.0 and abs(s[-1] - 0.01) < 1e-15
    torch.testing.assert_close(s[1:] / s[:-1], torch.full((9,), 0.01 ** (1 / 9), dtype=f64))


@pytest.mark.parametrize("name", SDE_NAMES)
def test_ode_likelihood_with_the_oracle_equals_the_true_log_density(name):
    """The centre of the file. With the exact score and the exact p_T in place of the prior, the
    instantaneous change of variables must give log p_eps(x) to the solver's accuracy: at
    rtol = atol = 1e-7 the largest error measured is 4e-6 nats (VE), 5e-7 (VP); a wrong sign of
    the divergence, a missing 1/2 in Eq. 13 or a missing g^2 would be off by O(1) nats. With the
    SDE's own prior the error is the prior's mismatch, log pi - log p_T at x(T): 0.007 (VP),
    0.03 (VE) nats for this mixture."""
    sde, eps = make_sde(name), 1e-5
    g = torch.Generator().manual_seed(0)
    x = 1.5 * torch.randn(16, 2, generator=g, dtype=f64)
    true = mixture_log_prob(name, x, eps)
    log_p, z, nfe = S.ode_log_likelihood(sde, mixture_score(name), x, eps=eps, rtol=1e-7, atol=1e-7,
                                         prior_log_prob=lambda z: mixture_log_prob(name, z, 1.0))
    assert (log_p - true).abs().max() < 2e-5
    assert nfe > 50
    log_p_prior, _, _ = S.ode_log_likelihood(sde, mixture_score(name), x, eps=eps, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(log_p_prior - log_p, sde.prior_log_prob(z) - mixture_log_prob(name, z, 1.0),
                               rtol=0, atol=1e-5)
    assert (log_p_prior - true).abs().max() < 0.05


EIGHT_CENTRES = 2.5 * torch.stack([torch.cos(torch.arange(8) * math.pi / 4),
                                    torch.sin(torch.arange(8) * math.pi / 4)], 1).to(f64)


def eight_gaussians_log_prob(sde, x, t):
    """log p_t of 8gaussians (8 equal isotropic Gaussians of std 0.3 on a circle of radius 2.5,
    typed from the data set's definition) under the SDE's kernel: each component N(m mu_k,
    (m^2 0.3^2 + sigma^2) I), m and sigma from score_sde's marginal (tested above)."""
    t = torch.as_tensor(t, dtype=f64).reshape(-1, 1)
    m, sigma = torch.exp(sde.log_mean_coeff(t)), sde.std(t)
    var = m ** 2 * 0.09 + sigma ** 2
    d2 = ((x[:, None, :] - m[..., None] * EIGHT_CENTRES[None]) ** 2).sum(-1)
    return torch.logsumexp(-d2 / (2 * var) - torch.log(2 * math.pi * var), 1) - math.log(8)


def eight_gaussians_score(sde):
    """Its exact score grad_x log p_t, by autograd (differentiable, for the exact divergence)."""
    def score_fn(x, t):
        with torch.enable_grad():
            x_in = x if x.requires_grad else x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(eight_gaussians_log_prob(sde, x_in, t).sum(), x_in, create_graph=True)
        return grad
    return score_fn


def _oracle_likelihood_errors(sde, x, tol):
    """(|log p - log p_eps| per example, the bound on it derived from the solver's tolerance)."""
    log_p, z, nfe = S.ode_log_likelihood(sde, eight_gaussians_score(sde), x, rtol=tol, atol=tol,
                                         prior_log_prob=lambda z: eight_gaussians_log_prob(sde, z, sde.T))
    steps, D = (nfe - 2) / 6, x.shape[1]
    # dopri5 holds each step's error estimate to sqrt(D + 1) (atol + rtol |y|) in every component of
    # y = (x, delta); summed over its steps (at most (nfe - 2) / 6, 6 evaluations each and 2 for the
    # first step) that bounds the error of delta and of every coordinate of z = x(T), which log p_T
    # turns into nats through its gradient.
    delta = log_p - eight_gaussians_log_prob(sde, z, sde.T)
    y_max = max(x.abs().max().item(), z.abs().max().item(), delta.abs().max().item())
    zz = z.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(eight_gaussians_log_prob(sde, zz, sde.T).sum(), zz)
    bound = steps * math.sqrt(D + 1) * (tol + tol * y_max) * (1 + grad.abs().sum(1).max().item())
    return (log_p - eight_gaussians_log_prob(sde, x, 1e-5)).abs(), bound


@pytest.mark.parametrize("name", SDE_NAMES)
def test_ode_likelihood_of_the_8gaussians_oracle_at_the_files_settings(name, monkeypatch):
    """Issue 28's evidence for the 2D panels: the likelihood code as --eval runs it (the Config's
    SDEs: beta 0.1..20, sigma 0.01..10; eps 1e-5; --rtol = --atol 1e-5) reproduces the log-density
    of the 8gaussians data itself when given its exact score, to within the error bound derived
    from the solver's tolerance (measured on these 8 points: at most 1.6e-4 nats against bounds
    of 0.005 to 0.008; on the first 2000 test points the mean NLL is 2.5079 for 2.5079, with the
    SDE's own prior too). The same check fails when a bug is planted, the divergence's sign
    flipped: then the errors are O(1) nats."""
    cfg, tol = S.Config(), S.Config().rtol
    sde = S.VESDE(cfg.sigma_min, cfg.sigma_max) if name == "ve" else S.SDES[name](cfg.beta_min, cfg.beta_max)
    x = common.load_dataset("8gaussians", "test").data[:8].to(f64)
    torch.testing.assert_close(eight_gaussians_log_prob(S.VPSDE(), x, 0.0),   # m = 1, sigma = 0: the data
                               common.load_dataset("8gaussians", "test").log_prob(x))
    error, bound = _oracle_likelihood_errors(sde, x, tol)
    assert error.max() < bound < 0.02, (error.max(), bound)
    exact = S.divergence_exact
    monkeypatch.setattr(S, "divergence_exact", lambda f_x, x, create_graph=False: -exact(f_x, x, create_graph))
    error, bound = _oracle_likelihood_errors(sde, x, tol)
    assert error.max() > 3 * bound


def test_hutchinson_likelihood_is_unbiased_with_noise_fixed_per_solve():
    """One 2D point repeated 400 times: each copy gets its own probe v, fixed along its solve, so
    the copies are 400 independent unbiased estimates of the same exact log-likelihood; their
    mean equals the exact-divergence result within 5 standard errors, for both kinds of probe."""
    sde, name = S.VPSDE(), "vp"
    x = torch.tensor([[0.7, -0.4]], dtype=f64).expand(400, 2).contiguous()
    exact, _, _ = S.ode_log_likelihood(sde, mixture_score(name), x[:1], rtol=1e-6, atol=1e-6)
    for noise in ("rademacher", "gaussian"):
        est, _, _ = S.ode_log_likelihood(sde, mixture_score(name), x, divergence="hutchinson", noise=noise,
                                         rtol=1e-6, atol=1e-6, generator=torch.Generator().manual_seed(1))
        assert est.std() > 1e-3      # the probes differ
        assert abs(est.mean() - exact[0]) < 5 * est.std() / math.sqrt(len(est))


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_ode_sampler_inverts_the_likelihood_map(name):
    """The probability-flow ODE is a bijection: integrating the sampled x back up to T returns
    the latent it started from, to the solver's tolerance."""
    sde = make_sde(name)
    z = sde.prior_sample((8, 2), dtype=f64, generator=torch.Generator().manual_seed(0))
    x, _ = S.ode_sample(sde, mixture_score(name), (8, 2), rtol=1e-8, atol=1e-8, eps=1e-5, z=z)
    _, z_back, _ = S.ode_log_likelihood(sde, mixture_score(name), x, eps=1e-5, rtol=1e-8, atol=1e-8)
    assert ((z_back - z).abs() / (1 + z.abs())).max() < 1e-5


# ---------------------------------------------------------------------------- likelihood weighting

def weight_typed(name, t):
    """g^2 / sigma^2 typed from the SDE paper's drift, diffusion and kernels (App. B) with the
    Config's settings: VE 2 log(10 / 0.01); VP beta / (1 - e^-B); sub-VP beta (1 - e^-2B) / (1 - e^-B)^2."""
    t = torch.as_tensor(t, dtype=f64)
    if name == "ve":
        return torch.full_like(t, 2 * math.log(1000.0))
    beta, B = 0.1 + 19.9 * t, 0.1 * t + 19.9 * t ** 2 / 2
    return beta / (1 - torch.exp(-B)) if name == "vp" else beta * (1 - torch.exp(-2 * B)) / (1 - torch.exp(-B)) ** 2


def config_sde(name):
    cfg = S.Config()
    return S.VESDE(cfg.sigma_min, cfg.sigma_max) if name == "ve" else S.SDES[name](cfg.beta_min, cfg.beta_max)


@pytest.mark.parametrize("name", SDE_NAMES)
@SETTINGS
@given(t=st.floats(1e-4, 0.999))
def test_likelihood_weight_and_its_integral_are_the_papers(name, t):
    """lambda / sigma^2 = g^2 / sigma^2 against the closed forms typed from the SDE paper, and W' =
    g^2 / sigma^2 by a central difference (relative error O(h^2))."""
    sde, tt = config_sde(name), torch.tensor([t], dtype=f64)
    torch.testing.assert_close(S.likelihood_weight(sde, tt), weight_typed(name, tt), rtol=1e-10, atol=0)
    h = 1e-6 * t
    slope = (S.likelihood_weight_integral(sde, t + h) - S.likelihood_weight_integral(sde, t - h)) / (2 * h)
    assert slope.item() == pytest.approx(weight_typed(name, t).item(), rel=1e-6)


@pytest.mark.parametrize("name", SDE_NAMES)
def test_importance_sampled_times_have_density_g2_over_sigma2(name):
    """t = W^-1(W(eps) + u Z) inverts W exactly (W(t) = W(eps) + u Z), and 200 000 draws put in
    each of 8 intervals the mass int w / Z given by quadrature of the typed weight, within 5
    binomial standard errors (a uniform t would put 0.9 of its mass where these put 0.01)."""
    sde, eps = config_sde(name), 1e-5
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=f64)
    t = S.likelihood_importance_time(sde, u, eps)
    W = lambda t: S.likelihood_weight_integral(sde, t)  # noqa: E731
    Z = (W(1.0) - W(eps)).item()
    torch.testing.assert_close((W(t) - W(eps)) / Z, u, rtol=0, atol=1e-9)
    edges = [eps, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.3, 0.6, 1.0]
    for a, b in zip(edges[:-1], edges[1:]):
        mass = integrate.quad(lambda s: weight_typed(name, s).item(), a, b, limit=200)[0] / Z
        frac = ((t >= a) & (t < b)).double().mean().item()
        assert abs(frac - mass) < 5 * math.sqrt(mass * (1 - mass) / len(t)) + 1e-12, (a, b, frac, mass)


@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_importance_sampling_leaves_the_likelihood_weighted_loss_unbiased(name):
    """Song et al. 2021b: with t ~ g^2 / (Z sigma^2) the loss ||sigma s + z||^2 / D estimates
    what g^2 / (c sigma^2) ||sigma s + z||^2 / D estimates with t ~ U(eps, 1): the two means agree
    within 5 standard errors (n = 200 000 each, a wrong score: the mixture's x 1.3; both 0.59 for
    VP, as quadrature over t gives), and differ from the sigma^2-weighted loss of the same score
    (0.32) by far more, so the weights matter; the importance-sampled draws have the smaller spread."""
    sde, n = config_sde(name), 200_000
    g = torch.Generator().manual_seed(0)
    k = torch.multinomial(MIX_W, n, replacement=True, generator=g)
    x0 = MIX_M[k] + MIX_S[k, None] * torch.randn(n, 2, generator=g, dtype=f64)

    def kernel_score(x, t):   # the score of the mixture under this SDE's kernel, times 1.3
        m, sigma = torch.exp(sde.log_mean_coeff(t))[:, None], sde.std(t)[:, None]
        var = m ** 2 * MIX_S[None] ** 2 + sigma ** 2
        diff = x[:, None, :] - m[:, :, None] * MIX_M[None]
        logits = torch.log(MIX_W) - (diff ** 2).sum(-1) / (2 * var) - torch.log(var)
        return -1.3 * (torch.softmax(logits, 1)[:, :, None] * diff / var[:, :, None]).sum(1)
    uniform = S.likelihood_weighted_dsm_loss(kernel_score, sde, x0, False, generator=g)
    important = S.likelihood_weighted_dsm_loss(kernel_score, sde, x0, True, generator=g)
    plain = S.dsm_loss(kernel_score, sde, x0, generator=g)
    se = math.sqrt(uniform.var() / n + important.var() / n)
    assert abs(uniform.mean() - important.mean()) < 5 * se
    assert abs(important.mean() - plain.mean()) > 20 * math.sqrt(important.var() / n + plain.var() / n)
    assert important.std() < uniform.std()


@pytest.mark.parametrize("loss", ["ssm-vr", "sm"])
def test_likelihood_weighting_of_the_sliced_and_exact_losses(loss):
    """training_loss with --weighting likelihood on the sliced and exact losses: the lambda = sigma^2
    loss at the drawn t times g^2 / (c sigma^2) (t uniform; the typed weight), or unweighted at t
    drawn by g^2 / sigma^2 (importance sampling), with the same random numbers (t first)."""
    torch.manual_seed(0)
    net, sde, x0 = S.ScoreMLP(2, 16, 1).double(), config_sde("vp"), torch.randn(6, 2, dtype=f64)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ref = {"ssm-vr": S.sliced_score_matching_loss, "sm": S.score_matching_loss}[loss]
    sf = S.make_score_fn(net, sde)
    Z = (S.likelihood_weight_integral(sde, 1.0) - S.likelihood_weight_integral(sde, 1e-5)).item()
    torch.manual_seed(1)
    ours = S.training_loss(net, sde, x0, loss, weighting="likelihood")
    torch.manual_seed(1)
    t = 1e-5 + (1 - 1e-5) * torch.rand(6, dtype=f64)
    torch.testing.assert_close(ours, ref(sf, sde, x0, t) * weight_typed("vp", t) * (1 - 1e-5) / Z)
    torch.manual_seed(1)
    ours = S.training_loss(net, sde, x0, loss, weighting="likelihood", importance_sampling=True)
    torch.manual_seed(1)
    t = S.likelihood_importance_time(sde, torch.rand(6, dtype=f64))
    torch.testing.assert_close(ours, ref(sf, sde, x0, t))


def test_likelihood_weighting_of_the_ve_sde_is_its_default_weighting():
    """VE: g^2 = 2 log(sigma_max / sigma_min) sigma^2, so lambda = g^2 / c is lambda = sigma^2 and
    the two losses agree draw for draw; importance-sampled t is uniform."""
    sde, x0 = config_sde("ve"), torch.randn(6, 2, dtype=f64)
    t, z = torch.rand(6, dtype=f64) * 0.9 + 0.05, torch.randn(6, 2, dtype=f64)
    score = lambda x, t: -x / 3  # noqa: E731
    torch.testing.assert_close(S.likelihood_weighted_dsm_loss(score, sde, x0, False, t, z),
                               S.dsm_loss(score, sde, x0, t, z), rtol=1e-12, atol=0)
    u = torch.linspace(0, 1, 11, dtype=f64)
    torch.testing.assert_close(S.likelihood_importance_time(sde, u), 1e-5 + (1 - 1e-5) * u)


# ---------------------------------------------------------------------------- divergence estimators

def nonlinear_field(x):
    """An arbitrary smooth per-example field R^3 -> R^3 with a non-symmetric Jacobian."""
    W = torch.tensor([[0.5, -1.0, 0.3], [0.8, 0.2, -0.6], [-0.4, 0.9, 1.1]], dtype=x.dtype)
    return torch.tanh(x @ W) * x.roll(1, dims=1) + x ** 2


def test_divergence_exact_equals_the_jacobian_trace():
    x = torch.randn(5, 3, dtype=f64, requires_grad=True)
    div = S.divergence_exact(nonlinear_field(x), x)
    for i in range(5):
        J = torch.autograd.functional.jacobian(lambda y: nonlinear_field(y[None])[0], x[i].detach())
        torch.testing.assert_close(div[i], torch.trace(J))


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_mean_over_many_probes_equals_the_trace(noise):
    """20 000 probes on one point: the mean of v^T J v is within 5 standard errors of tr J, and
    the sample variance matches the closed form (Rademacher 2 sum_{i!=j} Asym_ij^2, Gaussian
    2 ||Asym||_F^2) within 10%."""
    n = 20_000
    point = torch.tensor([[0.3, -1.2, 0.8]], dtype=f64)
    x = point.expand(n, 3).clone().requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(n, 3, generator=g, dtype=f64)
    if noise == "rademacher":
        v = torch.sign(v)
    est = S.divergence_hutchinson(nonlinear_field(x), x, v)
    J = torch.autograd.functional.jacobian(lambda y: nonlinear_field(y[None])[0], point[0])
    assert abs(est.mean() - torch.trace(J)) < 5 * est.std() / math.sqrt(n)
    A = (J + J.T) / 2
    var = 2 * (A ** 2).sum() - (2 * torch.diag(A).pow(2).sum() if noise == "rademacher" else 0)
    assert abs(est.var() / var - 1) < 0.1


# ---------------------------------------------------------------------------- the ODE solver

def test_dopri5_step_reproduces_the_stability_polynomial():
    """For y' = y one Dormand-Prince step multiplies y by R(h) = sum_{k<=5} h^k/k! + h^6/600 (its
    stability polynomial: order 5, with h^6/600 against e^h's h^6/720), to rounding."""
    for h in (0.1, 0.5, -0.7):
        y = torch.tensor([[1.0]], dtype=f64)
        y5, err, k7 = S.dopri5_step(lambda t, y: y, 0.0, y, h, y)
        R = sum(h ** k / math.factorial(k) for k in range(6)) + h ** 6 / 600
        assert abs(y5.item() - R) < 1e-15
        torch.testing.assert_close(k7, y5)     # first same as last


def test_dopri5_step_local_errors_have_orders_six_and_five():
    """On a nonlinear scalar ODE the 5th-order solution's local error falls as h^6 (halving h
    divides it by ~2^6 or more) and the embedded error estimate as h^5 (~2^5)."""
    def f(t, y):
        return -y ** 2 + math.sin(t) * y

    def reference(h):
        sol = integrate.solve_ivp(lambda t, y: -y ** 2 + np.sin(t) * y, (0.3, 0.3 + h), [1.0], method="DOP853",
                                  rtol=1e-13, atol=1e-16)
        return sol.y[0, -1]
    y0 = torch.tensor([[1.0]], dtype=f64)
    errs, ests = [], []
    for h in (0.1, 0.05, 0.025):
        y5, err, _ = S.dopri5_step(f, 0.3, y0, h, f(0.3, y0))
        errs.append(abs(y5.item() - reference(h)))
        ests.append(abs(err.item()))
    assert all(math.log2(a / b) > 5.7 for a, b in zip(errs, errs[1:]))
    assert all(4.5 < math.log2(a / b) < 5.5 for a, b in zip(ests, ests[1:]))


@SETTINGS
@given(seed=st.integers(0, 10_000), log_tol=st.integers(-9, -3), backwards=st.booleans())
def test_odeint_meets_its_tolerance_on_a_linear_ode(seed, log_tol, backwards):
    """y' = A y has y(t1) = expm(A (t1 - t0)) y0 (torch.linalg.matrix_exp). A is a rotation plus a
    mild damping, so errors are neither amplified nor hidden; a batch of 3 systems, forwards or
    backwards. Local error control does not bound the global error strictly; it must stay
    within 10 (atol + rtol |exact|) (worst measured over 40 seeds, tolerances 1e-9..1e-3 and both
    directions: 7.4 at 1e-3, 3.6 at 1e-9). The solver calls f only at times inside [t0, t1]."""
    tol = 10.0 ** log_tol
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(4, 4, generator=g, dtype=f64)
    A = (K - K.T) - 0.2 * torch.eye(4, dtype=f64)
    y0 = torch.randn(3, 4, generator=g, dtype=f64)
    t0, t1 = (2.0, 0.0) if backwards else (0.0, 2.0)
    calls = []
    y, nfe = S.dopri5(lambda t, y: calls.append(t) or y @ A.T, y0, t0, t1, rtol=tol, atol=tol)
    exact = y0 @ torch.linalg.matrix_exp((t1 - t0) * A).T
    assert ((y - exact).abs() / (tol + tol * exact.abs())).max() <= 10.0
    assert nfe == len(calls)
    assert all(min(t0, t1) <= c <= max(t0, t1) for c in calls)


def van_der_pol(t, y):
    return torch.stack([y[:, 1], (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], 1)


@pytest.mark.parametrize("tol", [1e-4, 1e-6, 1e-8])
def test_odeint_agrees_with_scipy_on_a_nonlinear_ode(tol):
    """Van der Pol (mu = 1) from (2, 0) to t = 5. Against a DOP853 reference at 1e-13: global
    error within 3 (atol + rtol |y|). Against scipy's RK45 (the same Dormand-Prince pair and
    controller) at the same tolerance: the same number of evaluations, the same result to 1e-9
    (for one system the error norms coincide)."""
    def rhs(t, y):
        return [y[1], (1 - y[0] ** 2) * y[1] - y[0]]
    ref = integrate.solve_ivp(rhs, (0, 5), [2.0, 0.0], method="DOP853", rtol=1e-13, atol=1e-13).y[:, -1]
    rk45 = integrate.solve_ivp(rhs, (0, 5), [2.0, 0.0], method="RK45", rtol=tol, atol=tol)
    y, nfe = S.dopri5(van_der_pol, torch.tensor([[2.0, 0.0]], dtype=f64), 0.0, 5.0, rtol=tol, atol=tol)
    y = y[0].numpy()
    assert (np.abs(y - ref) / (tol + tol * np.abs(ref))).max() < 3
    assert nfe == rk45.nfev
    np.testing.assert_allclose(y, rk45.y[:, -1], rtol=1e-9, atol=1e-12)


def test_odeint_error_control_is_per_example():
    """A batch of a calm and a fast system needs as many steps as the fast one alone: the norm is
    the largest per-example error, so the calm one cannot dilute the fast one's error."""
    _, nfe_fast = S.dopri5(lambda t, y: -30 * y, torch.ones(1, 1, dtype=f64), 0.0, 1.0)
    two = torch.tensor([[1.0], [1.0]], dtype=f64)
    rates = torch.tensor([[1.0], [30.0]], dtype=f64)
    y, nfe_batch = S.dopri5(lambda t, y: -rates * y, two, 0.0, 1.0)
    assert nfe_batch == nfe_fast
    torch.testing.assert_close(y[:, 0], torch.exp(-rates[:, 0]), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- bits/dim

@SETTINGS
@given(levels=st.sampled_from([2, 17, 256]), seed=st.integers(0, 1000))
def test_dequantized_nll_is_exact_for_a_piecewise_constant_density(levels, seed):
    """If the model density is constant on every cube of the dequantisation, p_Y(y) = P(k(y))
    (L/2)^D, the bound is tight: dequantized_nll returns -log P(k) whatever u is. A uniform
    density on [-1, 1)^D gives log2(L) bits/dim. quantize inverts dequantize."""
    D = 6
    g = torch.Generator().manual_seed(seed)
    log_P = torch.log_softmax(torch.randn(levels, generator=g, dtype=f64), 0)   # i.i.d. dimensions
    k = torch.randint(0, levels, (5, D), generator=g)
    y = S.dequantize(k, levels, u=torch.rand(5, D, generator=g, dtype=f64))
    assert (y >= -1).all() and (y < 1).all()
    assert torch.equal(S.quantize(y, levels).long(), k)
    k_of_y = torch.floor((y + 1) / 2 * levels).long()
    log_p_y = (log_P[k_of_y] + math.log(levels / 2)).sum(1)
    torch.testing.assert_close(S.dequantized_nll(log_p_y, D, levels), -log_P[k].sum(1))
    uniform = S.dequantized_nll(torch.full((5,), -D * math.log(2), dtype=f64), D, levels)
    torch.testing.assert_close(S.bits_per_dim(uniform, D), torch.full((5,), math.log2(levels), dtype=f64))


# ---------------------------------------------------------------------------- networks

def unet_param_count(in_ch, ch, ch_mult, nrb, attn_levels):
    """Parameters of the DDPM++ U-Net counted from its layer list (the official configuration's
    structure): conv3x3 9 ci co + co, 1x1 ci co + co, GroupNorm 2c, dense ci co + co."""
    temb = 4 * ch

    def res(ci, co, resample=False):
        skip = ci * co + co if ci != co or resample else 0
        return 2 * ci + 9 * ci * co + co + temb * co + co + 2 * co + 9 * co * co + co + skip

    def attn(c):
        return 2 * c + 4 * (c * c + c)
    n = (ch * temb + temb) + (temb * temb + temb) + (9 * in_ch * ch + ch)
    skips, c = [ch], ch
    for i, mult in enumerate(ch_mult):
        for _ in range(nrb):
            n += res(c, ch * mult) + (attn(ch * mult) if i in attn_levels else 0)
            c = ch * mult
            skips.append(c)
        if i < len(ch_mult) - 1:
            n += res(c, c, True)
            skips.append(c)
    n += 2 * res(c, c) + attn(c)
    for i, mult in reversed(list(enumerate(ch_mult))):
        for _ in range(nrb + 1):
            n += res(c + skips.pop(), ch * mult)
            c = ch * mult
        n += attn(c) if i in attn_levels else 0
        if i > 0:
            n += res(c, c, True)
    return n + 2 * c + 9 * c * in_ch + in_ch


def test_cifar10_unet_is_ddpmpp_cont_with_61_8m_parameters():
    """DDPM++ cont. (the official configs/vp/cifar10_ddpmpp_continuous.py: ch 128, ch_mult
    1,2,2,2, 4 residual blocks, attention at 16x16): 61,804,419 parameters, equal to the count
    from the layer list. (The paper gives no count; NCSN++'s FIR and pyramid layers are absent.)"""
    with torch.device("meta"):
        net = S.UNet(3, 32, 128, (1, 2, 2, 2), 4, (16,), 0.1)
    n = sum(p.numel() for p in net.parameters())
    assert n == unet_param_count(3, 128, (1, 2, 2, 2), 4, attn_levels={1}) == 61_804_419


def ncsnpp_param_count(in_ch, ch, ch_mult, nrb, attn_levels):
    """NCSN++ cont. from the same layer list: the U-Net's, with the first time layer reading the
    2 ch Fourier features instead of ch sinusoids, and one 3x3 convolution per down-sampling in
    the residual input pyramid (in_ch -> ch ch_mult[0] -> ...). The 128 Fourier frequencies are
    a fixed buffer, not counted."""
    widths = [ch * m for m in ch_mult[:-1]]
    pyramid = sum(9 * ci * co + co for ci, co in zip([in_ch] + widths, widths))
    return unet_param_count(in_ch, ch, ch_mult, nrb, attn_levels) + ch * 4 * ch + pyramid


def test_cifar10_ncsnpp_has_the_official_parameter_count():
    """NCSN++ cont. (configs/ve/cifar10_ncsnpp_continuous.py): 62,758,787 trainable parameters,
    equal to the layer-list count and to the official code's count (62,758,915 with its 128
    Fourier frequencies, a parameter with requires_grad=False there; counted by building the
    official NCSNpp on 2026-12-06). Its two other pyramids: 61,892,236 (output_skip) and
    61,872,515 (input_skip), also the official counts less 128."""
    with torch.device("meta"):
        nets = {pi_po: S.NCSNpp(3, 32, 128, (1, 2, 2, 2), 4, (16,), 0.1, progressive_input=pi_po[0],
                                progressive=pi_po[1])
                for pi_po in [("residual", "none"), ("none", "output_skip"), ("input_skip", "none")]}
    counts = {k: sum(p.numel() for p in net.parameters()) for k, net in nets.items()}
    assert counts[("residual", "none")] == ncsnpp_param_count(3, 128, (1, 2, 2, 2), 4, {1}) == 62_758_787
    assert counts[("none", "output_skip")] == 61_892_236 and counts[("input_skip", "none")] == 61_872_515


def fir_reference(x, k, up, down, pad):
    """upfirdn2d by its definition, with loops: y[i, j] = sum_{a, b} K[a, b] u[i + a, j + b], u the
    zero-inserted, zero-padded image, K the filter flipped (a convolution); every down-th output."""
    K = np.outer(k, k) / np.sum(k) ** 2 * up ** 2
    H, W = x.shape
    u = np.zeros((H * up + pad[0] + pad[1], W * up + pad[0] + pad[1]))
    u[pad[0]:pad[0] + H * up:up, pad[0]:pad[0] + W * up:up] = x
    n = len(k)
    out = np.array([[sum(K[n - 1 - a, n - 1 - b] * u[i + a, j + b] for a in range(n) for b in range(n))
                     for j in range(u.shape[1] - n + 1)] for i in range(u.shape[0] - n + 1)])
    return out[::down, ::down]


def test_fir_resampling_is_upfirdn_with_the_right_gains():
    """fir_filter sums to its gain; fir_upsample / fir_downsample equal upfirdn2d written with loops
    (StyleGAN2's paddings: up (2, 1), down (1, 1) for [1, 3, 3, 1]); with the box filter [1, 1]
    they are nearest-neighbour doubling and 2x2 average pooling (torch's own); a constant image
    comes back constant from up-then-down, except within one pixel of the border, where the
    zeros outside the image (StyleGAN2's and the official code's convention) enter."""
    for k in [(1, 3, 3, 1), (1, 1), (1, 2, 1)]:
        assert S.fir_filter(k).sum().item() == pytest.approx(1.0) and S.fir_filter(k, 4.0).sum().item() == \
            pytest.approx(4.0)
    x = torch.randn(1, 1, 6, 6, dtype=f64)
    p = 2   # len(k) - factor for [1, 3, 3, 1]
    np.testing.assert_allclose(S.fir_upsample(x)[0, 0].numpy(),
                               fir_reference(x[0, 0].numpy(), [1, 3, 3, 1], 2, 1, ((p + 1) // 2 + 1, p // 2)),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(S.fir_downsample(x)[0, 0].numpy(),
                               fir_reference(x[0, 0].numpy(), [1, 3, 3, 1], 1, 2, ((p + 1) // 2, p // 2)),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S.fir_upsample(x, (1, 1)), F.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(S.fir_downsample(x, (1, 1)), F.avg_pool2d(x, 2))
    c = torch.full((2, 3, 8, 8), 0.7, dtype=f64)
    up = S.fir_upsample(c)
    assert up.shape == (2, 3, 16, 16) and torch.allclose(up[..., 1:-1, 1:-1], torch.tensor(0.7, dtype=f64))
    back = S.fir_downsample(up)
    assert back.shape == c.shape and torch.allclose(back[..., 1:-1, 1:-1], c[..., 1:-1, 1:-1])
    assert (back[..., 0, :] < 0.7).all()   # the border sees the zeros outside
    down = S.FIRConvDown(3, 5)
    assert down(torch.randn(2, 3, 8, 8)).shape == (2, 5, 4, 4)


@pytest.mark.parametrize("pyramids", [("residual", "none"), ("input_skip", "output_skip"), ("none", "none")])
def test_ncsnpp_maps_shapes_as_the_unet_and_conditions_on_log_sigma(pyramids):
    """NCSN++ maps (B, C, H, W) to (B, C, H, W) as the U-Net (odd channel counts, two and three
    resolutions), starts at zero (every head zero-initialised), treats examples independently,
    and its time enters through Fourier features of log sigma(t) = log sigma_min + t log(ratio)."""
    torch.manual_seed(0)
    for c, side, mult in [(1, 8, (1, 2)), (3, 16, (1, 2, 2))]:
        net = S.NCSNpp(c, side, 8, mult, 1, (side // 2,), 0.0, 0.02, 100.0, progressive_input=pyramids[0],
                       progressive=pyramids[1]).double()
        x = torch.randn(2, c, side, side, dtype=f64, requires_grad=True)
        t = torch.tensor([0.3, 0.7], dtype=f64)
        assert net(x, t).abs().max() == 0
        for q in net.parameters():
            torch.nn.init.normal_(q, std=0.2)
        out = net(x, t)
        assert out.shape == x.shape == S.UNet(c, side, 8, mult, 1, (side // 2,), 0.0)(x.float(), t.float()).shape
        grad, = torch.autograd.grad(out[0].sum(), x)
        assert grad[1].abs().max() == 0 and grad[0].abs().max() > 0
        assert not torch.allclose(out, net(x, torch.tensor([0.5, 0.2], dtype=f64)))
    emb = net.embed(t, x)
    log_sigma = math.log(0.02) + t * math.log(100.0 / 0.02)
    proj = 2 * math.pi * log_sigma[:, None] * net.fourier_w[None]
    torch.testing.assert_close(emb, net.temb(torch.cat([proj.sin(), proj.cos()], 1)))
    assert "fourier_w" in net.state_dict() and not any(q is net.fourier_w for q in net.parameters())


def test_networks_treat_examples_independently_and_depend_on_time():
    """The divergence estimators need f(x)_b to depend on x_b only (GroupNorm, no batch
    statistics): the Jacobian of example 0's output with respect to example 1's input is zero.
    With the zero-initialised layers re-drawn, the output depends on t."""
    torch.manual_seed(0)
    unet = S.UNet(1, 8, 16, (1, 2), 1, (4,), 0.0).double()
    mlp = S.ScoreMLP(2, 32, 2).double()
    for net, shape in ((unet, (2, 1, 8, 8)), (mlp, (2, 2))):
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.2)
        x = torch.randn(shape, dtype=f64, requires_grad=True)
        t = torch.tensor([0.3, 0.7], dtype=f64)
        out = net(x, t)
        assert out.shape == x.shape
        grad, = torch.autograd.grad(out[0].sum(), x)
        assert grad[1].abs().max() == 0 and grad[0].abs().max() > 0
        assert not torch.allclose(out, net(x, torch.tensor([0.5, 0.2], dtype=f64)))


@pytest.mark.parametrize("name", SDE_NAMES)
def test_log_sigma_time_is_uniform_in_the_noise_level(name):
    """c(t) = (log sigma(t) - log sigma(eps)) / (log sigma(1) - log sigma(eps)), sigma typed from
    the paper's kernels: 0 at eps, 1 at T, increasing; for VE (t - eps) / (1 - eps), its t; and
    the MLP given it embeds c(t) where the plain one embeds t."""
    sde = make_sde(name)
    t = torch.tensor([1e-5, 1e-3, 0.01, 0.3, 1.0], dtype=f64)
    sigma = paper_kernel(name, t)[1]
    expected = (sigma.log() - sigma[0].log()) / (sigma[-1].log() - sigma[0].log())
    torch.testing.assert_close(S.log_sigma_time(sde)(t), expected)
    assert (expected.diff() > 0).all() and expected[0] == 0 and abs(expected[-1] - 1) < 1e-12
    if name == "ve":
        torch.testing.assert_close(expected, (t - 1e-5) / (1 - 1e-5))
    torch.manual_seed(0)
    plain = S.ScoreMLP(2, 16, 1).double()
    mapped = S.ScoreMLP(2, 16, 1, S.log_sigma_time(sde)).double()
    mapped.load_state_dict(plain.state_dict())
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.3)
    mapped.load_state_dict(plain.state_dict())
    x = torch.randn(5, 2, dtype=f64)
    torch.testing.assert_close(mapped(x, t), plain(x, S.log_sigma_time(sde)(t)))


def test_fresh_networks_output_zero():
    """DDPM++'s zero initialisation: a new network predicts eps = 0 (score 0) everywhere."""
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    assert S.UNet(1, 8, 16, (1, 2), 1, (4,), 0.0)(x, t).abs().max() == 0
    assert S.ScoreMLP()(torch.randn(3, 2), t).abs().max() == 0


# ---------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("call", [
    lambda: S.VESDE(1.0, 0.5),
    lambda: S.VPSDE(5.0, 1.0),
    lambda: S.ncsn_sigmas(0.01, 1.0),
    lambda: S.pc_sample(S.VPSDE(), lambda x, t: x, (2, 2), n_steps=0),
    lambda: S.pc_sample(S.VPSDE(), lambda x, t: x, (2, 2), predictor="ancestral"),
    lambda: S.pc_sample(S.VPSDE(), lambda x, t: x, (2, 2), snr=0.0),
    lambda: S.ode_log_likelihood(S.VPSDE(), lambda x, t: x, torch.zeros(2, 2), divergence="trace"),
    lambda: S.ode_log_likelihood(S.VPSDE(), lambda x, t: x, torch.zeros(2, 2), eps=0.0),
    lambda: S.dsm_loss(lambda x, t: x, S.VPSDE(), torch.zeros(2, 2), eps=2.0),
    lambda: S.dopri5(lambda t, y: y, torch.zeros(1, 1), 0.0, 1.0, rtol=0.0),
    lambda: S.UNet(3, 30, 32, (1, 2, 2)),
    lambda: S.NCSNpp(3, 32, 32, (1, 2), progressive="residual"),
])
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------------------- what the run code uses

def test_training_loss_is_dsm_or_sliced_score_matching_of_the_noise_predictor():
    """training_loss wraps the network as the score -net / sigma and draws t, z (and v) in the
    order the two losses do: with the same seed it equals them exactly."""
    torch.manual_seed(0)
    net = S.ScoreMLP(2, 16, 1).double()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    sde, x0 = S.VPSDE(), torch.randn(6, 2, dtype=f64)
    for loss, reference in [("dsm", lambda sf: S.dsm_loss(sf, sde, x0)),
                            ("ssm", lambda sf: S.sliced_score_matching_loss(sf, sde, x0, variance_reduction=False)),
                            ("ssm-vr", lambda sf: S.sliced_score_matching_loss(sf, sde, x0))]:
        torch.manual_seed(1)
        ours = S.training_loss(net, sde, x0, loss)
        torch.manual_seed(1)
        torch.testing.assert_close(ours, reference(S.make_score_fn(net, sde)), rtol=0, atol=0)
    with pytest.raises(ValueError):
        S.training_loss(net, sde, x0, "nce")


def test_annealed_langevin_sample_is_algorithm_1_on_the_ve_noise_levels():
    """On a VE model the sampler is Algorithm 1 from x ~ N(0, sigma_max^2 I) with sigma_i
    geometric from sigma_max to sigma_min, the score at sigma_i taken at the t with
    sigma(t) = sigma_i. Rebuilt here from the paper's formulas with the same random numbers."""
    sde, score = S.VESDE(0.01, 5.0), mixture_score("ve")
    scored_at = []

    def score_fn(x, t):
        scored_at.append(sde.std(t)[0].item())
        return score(x, t)
    x = S.annealed_langevin_sample(sde, score_fn, (50, 2), n_levels=4, n_steps_each=3, eps=1e-3, dtype=f64,
                                   generator=torch.Generator().manual_seed(0))
    sigmas = 5.0 * (0.01 / 5.0) ** (np.arange(4) / 3)
    np.testing.assert_allclose(scored_at, np.repeat(sigmas, 3), rtol=1e-12)
    g = torch.Generator().manual_seed(0)
    y = 5.0 * torch.randn(50, 2, generator=g, dtype=f64)
    for sigma in sigmas:
        alpha = 1e-3 * sigma ** 2 / 0.01 ** 2
        for _ in range(3):
            t = torch.full((50,), math.log(sigma / 0.01) / math.log(500.0), dtype=f64)
            y = y + alpha / 2 * score(y, t) + math.sqrt(alpha) * torch.randn(50, 2, generator=g, dtype=f64)
    torch.testing.assert_close(x, y)
    with pytest.raises(ValueError):
        S.annealed_langevin_sample(S.VPSDE(), score, (2, 2))


@pytest.mark.parametrize("name", SDE_NAMES)
def test_sweep_times_reach_each_noise_to_signal_ratio_first(name):
    sde = make_sde(name)
    t = S.sweep_times(sde)
    m, sigma = paper_kernel(name, t)
    m_before, sigma_before = paper_kernel(name, t - 1e-5)
    for r, ratio, before in zip(S.SWEEP_RATIOS, (sigma / m).tolist(), (sigma_before / m_before).tolist()):
        assert ratio >= r * (1 - 1e-9) and before < r


def test_mathematics_runs_without_common(without_common):
    """The SDEs, both losses, every sampler and the likelihood (both divergences) with both
    networks, and bits/dim, from the file's first half alone (common.py replaced by a module that
    fails when used)."""
    m = without_common("score_sde")
    torch.manual_seed(0)
    net = m.ScoreMLP(2, 16, 1)
    for name in ("ve", "vp", "subvp"):
        sde = m.SDES[name]()
        for loss in m.LOSSES:
            value = m.training_loss(net, sde, torch.randn(5, 2), loss).mean()
            value.backward()
            assert torch.isfinite(value) and all(p.grad is not None for p in net.parameters())
        score = m.make_score_fn(net, sde)
        assert m.pc_sample(sde, score, (3, 2), n_steps=4).shape == (3, 2)
        assert m.pc_sample(sde, score, (3, 2), n_steps=4, predictor="euler_maruyama", corrector=None).shape == (3, 2)
        x, nfe = m.ode_sample(sde, score, (3, 2), rtol=1e-3, atol=1e-3)
        assert x.shape == (3, 2) and nfe > 0
        log_p, z, nfe = m.ode_log_likelihood(sde, score, torch.randn(4, 2), rtol=1e-3, atol=1e-3)
        assert torch.isfinite(log_p).all() and z.shape == (4, 2)
    ve = m.VESDE()
    assert m.annealed_langevin_sample(ve, m.make_score_fn(net, ve), (3, 2), 2, 2).shape == (3, 2)
    unet = m.UNet(1, 8, 8, (1, 2), 1, (4,), 0.0)
    y = m.dequantize(torch.randint(0, 17, (2, 1, 8, 8)), 17)
    vp = m.VPSDE()
    log_p, _, _ = m.ode_log_likelihood(vp, m.make_score_fn(unet, vp), y, "hutchinson", rtol=1e-3, atol=1e-3)
    assert torch.isfinite(m.bits_per_dim(m.dequantized_nll(log_p, 64, 17), 64)).all()
    assert m.quantize(y, 17).dtype == torch.uint8
    ncsnpp = m.NCSNpp(1, 8, 8, (1, 2), 1, (4,), 0.0, progressive="output_skip")
    value = m.training_loss(ncsnpp, ve, y, sigmas=m.ncsn_sigmas(1.0, 0.01, 3)).mean()
    value.backward()
    assert torch.isfinite(value) and m.fir_downsample(m.fir_upsample(y)).shape == y.shape
    with pytest.raises(ValueError):
        m.VESDE(1.0, 0.5)


# ---------------------------------------------------------------------------- presets and networks

def test_presets_have_the_counted_parameters():
    """cifar10: the DDPM++ cont. U-Net, 61,804,419 parameters (the layer-list count above);
    digits: the small U-Net of the Config, 748,737."""
    for dataset, shape, count in [("cifar10", (3, 32, 32), 61_804_419), ("digits", (1, 8, 8), 748_737)]:
        cfg = S.Config(**S.PRESETS[dataset])
        info = common.DataInfo(dataset, "image", shape, levels=256 if dataset == "cifar10" else 17, num_classes=10)
        with torch.device("meta"):
            net, sde = S.build(cfg, info)
        n = sum(p.numel() for p in net.parameters())
        attn_levels = {i for i in range(len(cfg.ch_mult)) if shape[1] // 2 ** i in cfg.attn_res}
        assert n == count == unet_param_count(shape[0], cfg.ch, cfg.ch_mult, cfg.num_res_blocks, attn_levels)
        assert isinstance(sde, S.VPSDE) and (sde.beta_min, sde.beta_max) == (0.1, 20.0)
    cfg = S.Config(**S.PRESETS["cifar10"])
    assert (cfg.lr, cfg.warmup, cfg.batch_size, cfg.ema_decay, cfg.dropout, cfg.snr, cfg.sample_steps) == \
        (2e-4, 5000, 128, 0.9999, 0.1, 0.16, 1000) and (cfg.sigma_min, cfg.sigma_max) == (0.01, 50.0)


def test_cifar10_presets_sample_and_evaluate_as_the_official_configs():
    """Built from the command line, not trained. VP (configs/vp/cifar10_ddpmpp_continuous.py):
    sampling "pc" with predictor euler_maruyama and corrector none, N = 1000 (num_scales), eps
    1e-3 (VP); likelihood as run_lib.evaluate on the test split: 5 passes (bpd_num_repeats),
    rtol = atol = 1e-5, Rademacher probes. VE (--arch ncsnpp, configs/ve/cifar10_ncsnpp_continuous.py):
    reverse_diffusion + one langevin step at snr 0.16, eps 1e-5, EMA 0.999, sigma 0.01..50 on [0, 1]
    = 0.02..100 on [-1, 1], NCSN++ with 62,758,787 trainable parameters."""
    info = common.DataInfo("cifar10", "image", (3, 32, 32), levels=256, num_classes=10)
    vp = S.Config(**S.PRESETS["cifar10"])
    with torch.device("meta"):
        net, sde = S.build(vp, info)
    assert S.sampler_of(vp) == "em" and vp.n_corrector == 0 and vp.sample_steps == 1000
    assert isinstance(sde, S.VPSDE) and sde.sampling_eps == 1e-3 and isinstance(net, S.UNet)
    assert (vp.eval_repeats, vp.rtol, vp.atol, vp.likelihood) == (5, 1e-5, 1e-5, "auto")
    ve = common.parse_config(S.Config, S.PRESETS, ["--dataset", "cifar10", "--arch", "ncsnpp"],
                             arch_presets=S.ARCH_PRESETS)
    S.check_config(ve)
    with torch.device("meta"):
        net, sde = S.build(ve, info)
    assert isinstance(net, S.NCSNpp) and sum(p.numel() for p in net.parameters()) == 62_758_787
    assert (net.fir, net.progressive_input, net.progressive) == ((1, 3, 3, 1), "residual", "none")
    assert isinstance(sde, S.VESDE) and (sde.sigma_min, sde.sigma_max, sde.sampling_eps) == (0.02, 100.0, 1e-5)
    assert (S.sampler_of(ve), ve.n_corrector, ve.snr, ve.sample_steps, ve.ema_decay) == ("pc", 1, 0.16, 1000, 0.999)
    assert (ve.eval_repeats, ve.rtol, ve.atol, ve.lr, ve.warmup, ve.grad_clip, ve.dropout) == \
        (5, 1e-5, 1e-5, 2e-4, 5000, 1.0, 0.1)


def test_learning_rate_warms_up_linearly_then_stays():
    cfg = S.Config(lr=2e-4, warmup=5000)
    assert [S.learning_rate(s, cfg) for s in (0, 2499, 4999, 10 ** 6)] == \
        pytest.approx([2e-4 / 5000, 2e-4 / 2, 2e-4, 2e-4])


def test_cosine_learning_rate_falls_from_lr_to_zero_after_the_warm_up():
    """--lr-schedule cosine: the warm-up as before, then lr (1 + cos(pi p)) / 2, p the fraction of
    the 1000 steps after it: lr at p = 0, lr / 2 halfway, 0 at the end."""
    cfg = S.Config(lr=1e-3, warmup=100, steps=1100, lr_schedule="cosine")
    assert [S.learning_rate(s, cfg) for s in (49, 100, 350, 600, 1100)] == \
        pytest.approx([5e-4, 1e-3, 1e-3 * (1 + math.cos(math.pi / 4)) / 2, 5e-4, 0.0], abs=1e-12)


# ---------------------------------------------------------------------------- command line

POINTS = ["--dataset", "8gaussians", "--hidden", "8", "--depth", "1", "--batch-size", "16", "--n-samples", "8",
          "--sample-steps", "10", "--log-every", "1", "--device", "cpu"]
DIGITS = ["--dataset", "digits", "--ch", "8", "--ch-mult", "1,2", "--num-res-blocks", "1", "--batch-size", "8",
          "--n-samples", "4", "--sample-steps", "4", "--log-every", "1", "--device", "cpu"]


def untrained_log_density(sde_name, y, eps=1e-5, beta_max=20.0):
    """The model density of a network whose score is 0: the probability flow is then the SDE's
    drift alone, x(1) = x m(1) / m(eps) for VP (the identity for VE), so p(x) = N(x; 0, s^2 I)
    with s = m(eps) / m(1) (VP) or sigma_max (VE). Per example, in nats."""
    if sde_name == "ve":
        s = 10.0
    else:
        log_m = lambda t: -0.5 * 0.1 * t - 0.25 * (beta_max - 0.1) * t ** 2  # noqa: E731
        s = math.exp(log_m(eps) - log_m(1.0))
    y = y.double().reshape(len(y), -1)
    return torch.distributions.Normal(0.0, s).log_prob(y).sum(1), s


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_eval_of_an_untrained_model_on_points_is_its_closed_form(sde_name, tmp_path):
    """--steps 0 leaves the zero-initialised output layer, so --eval must give the closed-form
    NLL of untrained_log_density on the test points and the Gaussian's mass on the box for the
    density grid: a sign, a factor or a missing term of the likelihood would show here."""
    run_main("score_sde", POINTS + ["--sde", sde_name, "--steps", "0", "--out", str(tmp_path)])
    for name in ("ckpt.pt", "samples_0.png", "score_field.png"):
        assert (tmp_path / name).is_file(), name
    result = run_main("score_sde", ["--eval", str(tmp_path / "ckpt.pt"), "--eval-n", "50", "--density-tol", "1e-2", "--device", "cpu"])
    test = common.load_dataset("8gaussians", "test").data[:50]
    log_p, s = untrained_log_density(sde_name, test)
    assert result["nll"] == pytest.approx(-log_p.mean().item(), abs=1e-3)
    assert result["n"] == 50 and result["divergence"] == "exact" and result["nfe"] > 0
    assert result["entropy"] == pytest.approx(2.505, abs=0.02)
    mass = (2 * stats.norm.cdf(4.0 / s) - 1) ** 2
    assert result["density_mass"] == pytest.approx(mass, rel=1e-3)
    d = np.load(tmp_path / "density.npz")
    assert d["log_density"].shape == (128, 128) and float(d["lim"]) == 4.0 and (tmp_path / "density.png").is_file()
    assert events(tmp_path / "metrics.jsonl", "eval")[-1]["nll"] == result["nll"]


def test_eval_of_an_untrained_model_on_digits_is_its_closed_form_in_bits_per_dim(tmp_path):
    """Images: Hutchinson's estimate is exact for a linear drift with a Rademacher probe (v^T A v
    = -beta/2 ||v||^2 = -beta D / 2), so --eval must reproduce the closed form on the very
    dequantised test images it drew (the seed's first draws), with the -D log(2 / L) of
    dequantized_nll; bits/dim = nll / (D ln 2)."""
    run_main("score_sde", DIGITS + ["--steps", "0", "--out", str(tmp_path)])
    result = run_main("score_sde", ["--eval", str(tmp_path / "ckpt.pt"), "--eval-n", "6", "--batch-size", "6", "--seed", "3",
                     "--device", "cpu"])
    images = common.load_dataset("digits", "test").data[:6]
    y = S.dequantize(images, 17, generator=torch.Generator().manual_seed(3))
    log_p, _ = untrained_log_density("vp", y)
    expected = (-log_p - 64 * math.log(2 / 17)).mean().item()
    assert result["divergence"] == "hutchinson" and result["nll"] == pytest.approx(expected, abs=1e-2)
    assert result["bits_per_dim"] == pytest.approx(result["nll"] / (64 * math.log(2)))


def test_points_train_sample_and_eval_with_sliced_score_matching(tmp_path):
    run_main("score_sde", POINTS + ["--steps", "3", "--save-every", "2", "--loss", "ssm-vr", "--out", str(tmp_path)])
    for name in ("ckpt.pt", "samples_2.png", "samples_3.png", "score_field.png", "metrics.jsonl", "loss.png"):
        assert (tmp_path / name).is_file(), name
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    for sampler, nfe in [("pc", 2 * 10), ("em", 10), ("ode", None)]:
        out = tmp_path / sampler
        run_main("score_sde", ["--sample", str(tmp_path / "ckpt.pt"), "--sampler", sampler, "--sample-steps", "10", "--n-samples", "7",
                "--out", str(out), "--device", "cpu"])
        x = torch.load(out / "samples.pt", weights_only=True)
        assert x.shape == (7, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
        event = events(out / "metrics.jsonl", "sample")[-1]
        assert event["sampler"] == sampler and event["samples_per_s"] > 0 and (nfe is None or event["nfe"] == nfe)


def test_digits_train_sample_and_annealed_langevin_on_ve(tmp_path):
    run_main("score_sde", DIGITS + ["--sde", "ve", "--sigma-max", "10", "--steps", "2", "--sampler", "ald", "--sample-steps", "20",
                     "--out", str(tmp_path)])
    for name in ("ckpt.pt", "samples_2.png", "score_field.png", "loss.png"):
        assert (tmp_path / name).is_file(), name
    for sampler, nfe in [("ald", 20), ("ode", None)]:
        run_main("score_sde", ["--sample", str(tmp_path / "ckpt.pt"), "--sampler", sampler, "--sample-steps", "20", "--n-samples", "3",
                "--rtol", "1e-3", "--atol", "1e-3", "--out", str(tmp_path / sampler), "--device", "cpu"])
        levels = torch.load(tmp_path / sampler / "samples.pt", weights_only=True)
        assert levels.shape == (3, 1, 8, 8) and levels.dtype == torch.uint8 and levels.max() < 17
        assert nfe is None or events(tmp_path / sampler / "metrics.jsonl", "sample")[-1]["nfe"] == nfe


def test_eval_repeats_report_the_standard_error_over_the_passes(tmp_path):
    """--eval-repeats R (saved in the checkpoint, as the cifar10 presets' 5, so --eval needs no
    flag): R passes over the test set, each with fresh dequantisation u and probe v, drawn in the
    order of the run's generator; the untrained model's closed form gives each pass's mean, their
    average is nll and their standard error std / sqrt(R) is reported in bits/dim. beta_max 0.3
    keeps the prior's scale near 1, so that the density, and the passes, differ with u."""
    run_main("score_sde", DIGITS + ["--steps", "0", "--eval-repeats", "3", "--beta-max", "0.3", "--out", str(tmp_path)])
    result = run_main("score_sde", ["--eval", str(tmp_path / "ckpt.pt"), "--eval-n", "5", "--batch-size", "5", "--device", "cpu"])
    images = common.load_dataset("digits", "test").data[:5]
    g = torch.Generator().manual_seed(0)
    means = []
    for _ in range(3):
        y = S.dequantize(images, 17, generator=g)
        torch.randn(y.shape, generator=g)      # the pass's Hutchinson probe
        log_p, _ = untrained_log_density("vp", y, beta_max=0.3)
        means.append((-log_p - 64 * math.log(2 / 17)).mean().item())
    means = torch.tensor(means, dtype=f64)
    assert result["repeats"] == 3 and result["n"] == 5
    assert result["nll"] == pytest.approx(means.mean().item(), abs=1e-2)
    assert result["bits_per_dim_repeats"] == pytest.approx((means / (64 * math.log(2))).tolist(), abs=1e-3)
    se = (means.std() / math.sqrt(3) / (64 * math.log(2))).item()
    assert se > 1e-4 and result["bits_per_dim_se_repeats"] == pytest.approx(se, rel=1e-2)


def test_ncsn_trains_samples_and_evaluates_without_repeating_the_flag(tmp_path):
    """--sde ncsn with NCSN++ on digits: the checkpoint remembers both, so --sample draws by
    annealed Langevin dynamics over its L levels (NFE = L x steps per level) and --eval reports
    Eq. 6 on the test set, every level, with no flag repeated."""
    run_main("score_sde", DIGITS + ["--sde", "ncsn", "--arch", "ncsnpp", "--n-levels", "4", "--steps", "2", "--out", str(tmp_path)])
    for name in ("ckpt.pt", "samples_2.png", "score_field.png", "loss.png"):
        assert (tmp_path / name).is_file(), name
    run_main("score_sde", ["--sample", str(tmp_path / "ckpt.pt"), "--sample-steps", "8", "--n-samples", "3", "--out",
            str(tmp_path / "s"), "--device", "cpu"])
    levels = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    assert levels.shape == (3, 1, 8, 8) and levels.dtype == torch.uint8
    event = events(tmp_path / "s", "sample")[-1]
    assert (event["sampler"], event["nfe"], event["sde"]) == ("ald", 8, "ncsn")
    result = run_main("score_sde", ["--eval", str(tmp_path / "ckpt.pt"), "--eval-n", "4", "--device", "cpu"])
    assert result["sde"] == "ncsn" and result["levels"] == 4 and len(result["loss_per_level"]) == 4
    assert result["loss"] == pytest.approx(np.mean(result["loss_per_level"])) and result["loss"] > 0


def test_ncsn_training_loss_is_eq_6_per_dimension_of_the_network():
    """training_loss with NCSN's levels: ncsn_loss / D of the score -net(x, t_i) / sigma_i at the
    VE times of the levels, with the same random numbers (labels, then z)."""
    torch.manual_seed(0)
    net, ve, x0 = S.ScoreMLP(2, 16, 1).double(), S.VESDE(0.01, 5.0), torch.randn(6, 2, dtype=f64)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    sigmas = S.ncsn_sigmas(5.0, 0.01, 5)
    torch.manual_seed(1)
    ours = S.training_loss(net, ve, x0, sigmas=sigmas)
    torch.manual_seed(1)
    labels = torch.randint(5, (6,))
    z = torch.randn(6, 2, dtype=f64)
    sigma = sigmas[labels]
    x_tilde = x0 + sigma[:, None] * z
    t = torch.log(sigma / 0.01) / math.log(500.0)
    expected = 0.5 * ((-net(x_tilde, t)) + z).pow(2).sum(1) / 2
    torch.testing.assert_close(ours, expected)


def test_points_train_and_eval_with_exact_score_matching(tmp_path):
    run_main("score_sde", POINTS + ["--steps", "3", "--loss", "sm", "--out", str(tmp_path)])
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    result = run_main("score_sde", ["--eval", str(tmp_path / "ckpt.pt"), "--eval-n", "20", "--density-tol", "1e-1", "--device", "cpu"])
    assert math.isfinite(result["nll"])


def test_points_train_with_likelihood_weighting_and_eval_without_the_flags(tmp_path):
    """--weighting likelihood --importance-sampling --lr-schedule cosine --time-input log-sigma: the
    checkpoint remembers them (so --resume trains as it did, and the network is rebuilt with its
    time input) and --eval needs none of them."""
    run_main("score_sde", POINTS + ["--steps", "3", "--weighting", "likelihood", "--importance-sampling",
                                    "--lr-schedule", "cosine", "--time-input", "log-sigma", "--out", str(tmp_path)])
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)["config"]
    assert saved["weighting"] == "likelihood" and saved["importance_sampling"] is True
    (net, sde), cfg, _ = S.load(tmp_path / "ckpt.pt")
    assert cfg.time_input == "log-sigma" and net.time_map is not None and cfg.lr_schedule == "cosine"
    result = run_main("score_sde", ["--eval", str(tmp_path / "ckpt.pt"), "--eval-n", "10", "--density-tol", "1e-1",
                                    "--device", "cpu"])
    assert math.isfinite(result["nll"])


def test_resume_is_bit_exact(tmp_path):
    """Dequantisation noise, flips, dropout, t and z all come from the saved random state."""
    flags = DIGITS + ["--save-every", "2", "--flip", "--dropout", "0.1", "--sample-steps", "2"]
    a, b = tmp_path / "a", tmp_path / "b"
    run_main("score_sde", flags + ["--out", str(a), "--steps", "4"])
    run_main("score_sde", flags + ["--out", str(b), "--steps", "2"])
    run_main("score_sde", flags + ["--out", str(b), "--steps", "4", "--resume"])
    ca, cb = (torch.load(p / "ckpt.pt", weights_only=True) for p in (a, b))
    assert ca["step"] == cb["step"] == 4
    for key in ("model",):
        for name, value in ca[key].items():
            assert torch.equal(value, cb[key][name]), name
    for name, value in ca["ema"]["model"].items():
        assert torch.equal(value, cb["ema"]["model"][name]), name


def test_user_errors_are_one_line(tmp_path, capsys):
    run_main("score_sde", POINTS + ["--steps", "0", "--out", str(tmp_path / "vp")])
    for argv, words in [(POINTS + ["--sampler", "ald"], "--sde ve"),
                        (["--sample", str(tmp_path / "vp" / "ckpt.pt"), "--sampler", "ald"], "--sde vp"),
                        (["--beta-max", "0.05"], "--beta-max"),
                        (["--sigma-max", "0.001"], "--sigma-max"),
                        (["--snr", "0"], "--snr"),
                        (["--flip"], "--flip"),
                        (["--dataset", "digits", "--ch-mult", "1,2,2,2,2"], "--ch-mult"),
                        (["--sde", "ncsn", "--loss", "ssm"], "--loss dsm"),
                        (["--sde", "ncsn", "--sampler", "pc"], "--sampler auto or ald"),
                        (["--dataset", "digits", "--arch", "ncsnpp", "--sde", "vp"], "--sde ve or ncsn"),
                        (["--arch", "ncsnpp", "--sde", "ve"], "--arch ncsnpp"),
                        (["--progressive", "output_skip"], "--arch ncsnpp"),
                        (["--dataset", "digits", "--loss", "sm"], "--loss ssm-vr"),
                        (["--n-levels", "1"], "--n-levels"),
                        (["--weighting", "likelihood", "--sde", "ncsn"], "--sde vp, subvp or ve"),
                        (["--dataset", "rings", "--sde", "ncsn"], "--weighting sigma2"),
                        (["--importance-sampling"], "--weighting likelihood"),
                        (["--dataset", "digits", "--time-input", "log-sigma"], "--time-input"),
                        (["--eval-repeats", "0"], "--eval-repeats")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run_main("score_sde", argv + ["--out", str(tmp_path / "o"), "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error:") and "\n" not in err and words in err, (argv, err)
    run_main("score_sde", POINTS + ["--steps", "0", "--sde", "ncsn", "--out", str(tmp_path / "ncsn")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main("score_sde", ["--sample", str(tmp_path / "ncsn" / "ckpt.pt"), "--sampler", "ode", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "--sampler ald or auto" in err, err
