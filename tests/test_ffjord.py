"""Tests of ffjord.py: every identity against an independent computation.

The solvers against closed forms (torch.linalg.matrix_exp) and scipy.integrate.solve_ivp; the
adjoint's gradients against backpropagation through the solver; Hutchinson's estimator against
the exact trace with Monte-Carlo tolerances from the standard error; the log-density change
against log|det| of autograd Jacobians of the flow map and against -t Tr(A) for linear fields;
the 2D density integrating to one; inverses; the RNODE integrals against quadrature; the paper
architecture's parameter count against a hand count; the tuple state's error ratio against the
fast component's norm. Residual Flows: the spectral norm against torch.linalg.matrix_norm, the
fixed-point inverse, the truncated series against slogdet with its tail bound, the Russian
roulette's mean against slogdet within its standard error, the Neumann gradient against
autograd's gradient of slogdet, the density integrating to one. The mathematics without
common.py; and the command line end to end on 8gaussians and digits for both architectures
(train, --eval, --sample, bit-exact --resume, the step cap and the refused flags as one-line errors).
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.integrate import quad, solve_ivp
from scipy.linalg import expm

import common
import ffjord as M
from conftest import events, run_main, torchrun

F64 = torch.float64
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------

def randomize(module, seed, std=0.3):
    """Random values in every parameter, so no block is the identity (the zero-initialised
    output layers would otherwise hide wrong signs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def tight(**kw):
    return M.SolveOptions(**{"atol": 1e-10, "rtol": 1e-10, **kw})


class Linear(torch.nn.Module):
    """f(z, t) = A z, with A a parameter (so the adjoint and backprop have something to differentiate)."""

    def __init__(self, A):
        super().__init__()
        self.A = torch.nn.Parameter(A.clone())

    def forward(self, t, z):
        return z @ self.A.T


def van_der_pol(mu=1.0):
    numpy_f = lambda t, y: np.array([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])
    torch_f = lambda t, y: (torch.stack([y[0][1], mu * (1 - y[0][0] ** 2) * y[0][1] - y[0][0]]),)
    return numpy_f, torch_f


def flow_map_logdet(flow, x, opts):
    """log|det dz/dx| per example from the autograd Jacobian of the solver's map x -> z: the
    examples are independent, so the gradient of sum_b z[b, j] gives row j of every example's
    Jacobian (one backward pass per dimension)."""
    x = x.clone().requires_grad_(True)
    z = flow(x, opts)[0].reshape(x.shape[0], -1)
    rows = [torch.autograd.grad(z[:, j].sum(), x, retain_graph=True)[0].reshape(x.shape[0], -1)
            for j in range(z.shape[1])]
    sign, logabs = torch.linalg.slogdet(torch.stack(rows, 1))
    assert torch.all(sign != 0)
    return logabs.detach()


# ----------------------------------------------------------------------------------------
# solvers
# ----------------------------------------------------------------------------------------

@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_rk4_error_falls_16_fold_when_the_step_halves(seed):
    """dy/dt = A y has y(t) = expm(t A) y0. RK4's global error is C h^4 + O(h^5): from h = 1/32 to
    1/64 the error ratio is 2^4 = 16 up to the O(h) correction (a first-order method gives 2,
    a third-order one 8)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(3, 3, generator=g, dtype=F64)
    A = A / torch.linalg.matrix_norm(A, 2)  # unit spectral norm: the asymptotic regime at these steps
    y0 = torch.randn(3, generator=g, dtype=F64)
    exact = torch.linalg.matrix_exp(A) @ y0
    errors = []
    for n in (32, 64):
        y, info = M.rk4(lambda t, y: (A @ y[0],), (y0,), 0.0, 1.0, 1.0 / n)
        assert info["nfe"] == 4 * n
        errors.append((y[0] - exact).abs().max().item())
    assert 14 < errors[0] / errors[1] < 18, errors


@SETTINGS
@given(seed=st.integers(0, 10_000), tol=st.sampled_from([1e-4, 1e-6, 1e-8]), backwards=st.booleans())
def test_dopri5_meets_the_tolerance_on_a_linear_ode(seed, tol, backwards):
    """The global error of dopri5 with atol = rtol = tol stays within a small multiple of
    tol (1 + |y|) on dy/dt = A y (closed form expm), forwards and backwards in time. The local
    control bounds each step's error by about tol; over a unit interval with a stable-or-mild A
    the accumulation is a factor of a few, far from 10."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(4, 4, generator=g, dtype=F64)
    A = A / torch.linalg.matrix_norm(A, 2)
    y0 = torch.randn(4, generator=g, dtype=F64)
    t0, t1 = (1.0, 0.0) if backwards else (0.0, 1.0)
    y, info = M.dopri5(lambda t, y: (A @ y[0],), (y0,), t0, t1, rtol=tol, atol=tol, max_steps=10_000)
    exact = torch.linalg.matrix_exp((t1 - t0) * A) @ y0
    err = (y[0] - exact).abs().max().item()
    assert err < 10 * tol * (1 + exact.abs().max().item()), (err, tol)
    assert info["nfe"] == 2 + 6 * (info["steps"] + info["rejected"])


def pendulum():
    numpy_f = lambda t, y: np.array([y[1], -np.sin(y[0])])
    torch_f = lambda t, y: (torch.stack([y[0][1], -torch.sin(y[0][0])]),)
    return numpy_f, torch_f


@SETTINGS
@given(y0=st.tuples(st.floats(-2.5, 2.5), st.floats(-2.5, 2.5)), tol=st.sampled_from([1e-3, 1e-6, 1e-9]),
       system=st.sampled_from(["van der Pol", "pendulum backwards"]))
def test_dopri5_takes_the_steps_of_scipy_rk45(y0, tol, system):
    """scipy's RK45 is the same Dormand-Prince pair with the same controller and starting step
    (Hairer et al. II.4): on one tensor the two must take the same steps (equal NFE) and reach the
    same values up to rounding. Van der Pol forwards (backwards it blows up), the pendulum backwards."""
    fn, ft = van_der_pol() if system == "van der Pol" else pendulum()
    t0, t1 = (0.0, 4.0) if system == "van der Pol" else (4.0, 0.0)
    ref = solve_ivp(fn, (t0, t1), list(y0), method="RK45", rtol=tol, atol=tol)
    y, info = M.dopri5(ft, (torch.tensor(y0, dtype=F64),), t0, t1, rtol=tol, atol=tol, max_steps=100_000)
    assert info["nfe"] == ref.nfev
    np.testing.assert_allclose(y[0].numpy(), ref.y[:, -1], rtol=0, atol=1e-9)


def test_dopri5_agrees_with_scipy_dop853_on_a_nonlinear_ode():
    """Against an independent method: scipy's 8th-order DOP853 at rtol 1e-13 as the reference for
    Van der Pol (mu = 2) and Lotka-Volterra; ours at 1e-9 must agree to 1e-7."""
    fn, ft = van_der_pol(mu=2.0)
    ref = solve_ivp(fn, (0, 6), [1.0, -0.5], method="DOP853", rtol=1e-13, atol=1e-13)
    y, _ = M.dopri5(ft, (torch.tensor([1.0, -0.5], dtype=F64),), 0.0, 6.0, rtol=1e-9, atol=1e-9, max_steps=100_000)
    np.testing.assert_allclose(y[0].numpy(), ref.y[:, -1], rtol=0, atol=1e-7)
    lv_n = lambda t, y: np.array([1.5 * y[0] - y[0] * y[1], -3 * y[1] + y[0] * y[1]])
    lv_t = lambda t, y: (1.5 * y[0] - y[0] * y[1], -3 * y[1] + y[0] * y[1])  # a tuple state of two tensors
    ref = solve_ivp(lv_n, (0, 5), [2.0, 1.0], method="DOP853", rtol=1e-13, atol=1e-13)
    y, _ = M.dopri5(lv_t, (torch.tensor(2.0, dtype=F64), torch.tensor(1.0, dtype=F64)), 0.0, 5.0, rtol=1e-9, atol=1e-9,
                    max_steps=100_000)
    np.testing.assert_allclose([y[0].item(), y[1].item()], ref.y[:, -1], rtol=0, atol=1e-7)


def test_dopri5_counts_every_evaluation_and_ignores_masked_quadratures():
    """NFE against a counter wrapped around f; a quadrature component (mask False) with huge
    values does not change the steps taken for the controlled one."""
    fn, ft = van_der_pol()
    calls = [0]

    def counted(t, y):
        calls[0] += 1
        (v,) = ft(t, y[:1])
        return v, 1e6 * torch.cos(50 * torch.tensor(t, dtype=F64)) * torch.ones(3, dtype=F64)

    y0 = (torch.tensor([2.0, 0.0], dtype=F64), torch.zeros(3, dtype=F64))
    y, info = M.dopri5(counted, y0, 0.0, 2.0, rtol=1e-6, atol=1e-6, max_steps=10_000, error_mask=(True, False))
    assert info["nfe"] == calls[0]
    alone, info_alone = M.dopri5(ft, y0[:1], 0.0, 2.0, rtol=1e-6, atol=1e-6, max_steps=10_000)
    assert (info["steps"], info["rejected"]) == (info_alone["steps"], info_alone["rejected"])
    torch.testing.assert_close(y[0], alone[0], rtol=0, atol=0)
    calls[0] = 0
    _, info = M.rk4(counted, y0, 0.0, 0.5, 0.05)
    assert info["nfe"] == calls[0] == 4 * 10  # 0.5 / 0.05 is 10 steps despite rounding


def test_error_ratio_of_a_tuple_state_is_the_fast_components_norm():
    """Issue 29: on a tuple state (z, Delta log p) the error ratio is the largest of the
    components' RMS norms (as torchdiffeq's mixed norm), so a large calm component does not
    dilute a small fast one's error. The fast component's norm is computed here; pooling all
    the elements into one RMS norm would give about 30 times less. And dopri5 on (calm, fast)
    accepts as many steps as on the fast component alone (the starting-step heuristic, which also
    takes the largest norm, may cost one rejection more) and meets the same accuracy."""
    atol, rtol = 1e-6, 1e-3
    g = torch.Generator().manual_seed(0)
    y_calm, y_fast = torch.randn(1000, dtype=F64, generator=g), torch.randn(1, dtype=F64, generator=g)
    new_calm, new_fast = y_calm * (1 - 1e-6), y_fast + 0.3
    err = (1e-9 * torch.randn(1000, dtype=F64, generator=g), torch.tensor([2e-3], dtype=F64))
    fast_norm = ((err[1] / (atol + rtol * torch.maximum(y_fast.abs(), new_fast.abs()))) ** 2).mean().sqrt().item()
    ratio = M._error_ratio(err, (y_calm, y_fast), (new_calm, new_fast), atol, rtol, (True, True))
    assert ratio == pytest.approx(fast_norm, rel=1e-12) and fast_norm > 0.5
    scaled = torch.cat([e / (atol + rtol * torch.maximum(a.abs(), b.abs())) for e, a, b in
                        zip(err, (y_calm, y_fast), (new_calm, new_fast))])
    assert scaled.pow(2).mean().sqrt().item() < ratio / 30  # what a pooled norm would have said

    calm = lambda t, y: -0.01 * y  # a slow decay of 1000 elements
    fast = lambda t, y: torch.stack([y[1], -400 * y[0]])  # an oscillator of period 0.31
    both = lambda t, y: (calm(t, y[0]), fast(t, y[1]))
    y0 = (torch.ones(1000, dtype=F64), torch.tensor([1.0, 0.0], dtype=F64))
    y_both, info_both = M.dopri5(both, y0, 0.0, 1.0, rtol=1e-6, atol=1e-6, max_steps=10_000)
    y_fast, info_fast = M.dopri5(lambda t, y: (fast(t, y[0]),), y0[1:], 0.0, 1.0, rtol=1e-6, atol=1e-6,
                                 max_steps=10_000)
    assert info_both["steps"] == info_fast["steps"] and abs(info_both["rejected"] - info_fast["rejected"]) <= 1
    exact = torch.tensor([math.cos(20.0), -20 * math.sin(20.0)], dtype=F64)
    err_both, err_fast = (y_both[1] - exact).abs().max().item(), (y_fast[0] - exact).abs().max().item()
    assert err_both < 2 * err_fast + 1e-9 and err_fast < 1e-4, (err_both, err_fast)


def test_step_cap_and_bad_options_raise_value_errors():
    """A stiff problem exceeds the cap with a ValueError that names the cure; dynamics that are
    not finite at the start are refused at once; bad options are refused when the options are built."""
    stiff = lambda t, y: (-1e5 * (y[0] - torch.cos(torch.tensor(t, dtype=F64))),)
    with pytest.raises(ValueError, match="max_steps=50.*atol"):
        M.dopri5(stiff, (torch.zeros(1, dtype=F64),), 0.0, 1.0, rtol=1e-8, atol=1e-8, max_steps=50)
    with pytest.raises(ValueError, match="max_steps"):
        M.rk4(stiff, (torch.zeros(1, dtype=F64),), 0.0, 1.0, 1e-3, max_steps=100)
    calls = [0]

    def nan(t, y):  # as a network whose parameters hold nan: no step size can help
        calls[0] += 1
        return (y[0] * float("nan"),)
    with pytest.raises(ValueError, match="dopri5: the dynamics are nan at the start"):
        M.dopri5(nan, (torch.ones(1, dtype=F64),), 0.0, 1.0, rtol=1e-6, atol=1e-6, max_steps=100)
    assert calls[0] == 1  # refused at once, not after max_steps rejected steps
    for bad in (dict(method="euler"), dict(atol=0), dict(rtol=-1), dict(step_size=0), dict(max_steps=0),
                dict(trace="none"), dict(noise="uniform"), dict(probes=0)):
        with pytest.raises(ValueError):
            M.SolveOptions(**bad)
    with pytest.raises(ValueError):
        M.CNF(Linear(torch.eye(2, dtype=F64)), T=0)


# ----------------------------------------------------------------------------------------
# the instantaneous change of variables (Chen et al. Theorem 1)
# ----------------------------------------------------------------------------------------

@SETTINGS
@given(seed=st.integers(0, 10_000), t=st.floats(0.1, 2.0), method=st.sampled_from(["dopri5", "rk4"]))
def test_linear_field_log_density_change_is_minus_t_trace(seed, t, method):
    """f(z) = A z: Tr(df/dz) = Tr(A) everywhere, so Delta(t) = -t Tr(A) exactly (the integrand
    is constant, so any Runge-Kutta method integrates it without error) and z(t) = expm(t A) z0."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(3, 3, generator=g, dtype=F64)
    z0 = torch.randn(4, 3, generator=g, dtype=F64)
    opts = tight(method=method, step_size=0.02)
    f = M.augmented_dynamics(Linear(A))
    with torch.no_grad():
        (z, delta), _ = M.odeint(f, (z0, torch.zeros(4, dtype=F64)), 0.0, t, opts)
    torch.testing.assert_close(delta, torch.full((4,), -t * torch.trace(A).item(), dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(z, z0 @ torch.linalg.matrix_exp(t * A).T, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(seed=st.integers(0, 10_000), dim=st.sampled_from([2, 3]))
def test_nonlinear_flow_log_det_equals_log_abs_det_of_the_flow_map_jacobian(seed, dim):
    """For a random concatsquash field, int_0^T Tr(df/dz) dt (the CNF's log_det) equals
    log|det dz(T)/dx| of the solver's map differentiated by autograd (Liouville's formula),
    to the solver's tolerance."""
    cnf = M.CNF(randomize(M.ConcatSquashMLP(dim, 16, 2).double(), seed, std=0.7), T=0.8)
    x = 1.5 * torch.randn(3, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    opts = M.SolveOptions(atol=1e-9, rtol=1e-9)
    with torch.no_grad():
        _, log_det, _ = cnf(x, opts)
    torch.testing.assert_close(log_det, flow_map_logdet(cnf, x, opts), rtol=0, atol=1e-6)
    assert log_det.abs().max() > 1e-3  # the field does change volume: the check is not vacuous


def test_exact_trace_and_frobenius_against_autograd_jacobian():
    """trace_exact's trace and ||J||_F^2 against the full Jacobian of one example at a time."""
    net = randomize(M.ConcatSquashMLP(3, 8, 2).double(), 7, std=0.6)
    z = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    trace, frob = M.trace_exact(net(0.3, z), z)
    for i in range(4):
        J = torch.autograd.functional.jacobian(lambda v: net(0.3, v[None])[0], z[i].detach())
        torch.testing.assert_close(trace[i], torch.trace(J), rtol=0, atol=1e-12)
        torch.testing.assert_close(frob[i], J.pow(2).sum(), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------
# Hutchinson's estimator (FFJORD Sec. 3.1)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_with_the_predicted_variance(kind):
    """N = 20000 independent probes at one point (the batch holds N copies, each with its own
    e): the mean of e^T J e is within 4 standard errors of Tr(J), the mean of ||e^T J||^2
    within 4 of ||J||_F^2, and the sample variance matches the closed form, with S = (J + J^T)/2:
    Gaussian 2 ||S||_F^2, Rademacher 2 sum_{i != j} S_ij^2 (relative standard error of a variance
    from 20000 draws is about 2-3%; 12% allowed)."""
    net = randomize(M.ConcatSquashMLP(4, 16, 2).double(), 3, std=0.6)
    x = torch.randn(1, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    J = torch.autograd.functional.jacobian(lambda v: net(0.2, v[None])[0], x[0])
    N = 20_000
    z = x.expand(N, 4).clone().requires_grad_(True)
    e = M.hutchinson_noise(z, kind, 1, torch.Generator().manual_seed(2))
    est, frob = M.trace_hutchinson(net(0.2, z), z, e)
    for sample, truth in ((est, torch.trace(J)), (frob, J.pow(2).sum())):
        se = sample.std() / math.sqrt(N)
        assert abs(sample.mean() - truth) < 4 * se, (sample.mean(), truth, se)
    S = (J + J.T) / 2
    var = 2 * S.pow(2).sum() if kind == "gaussian" else 2 * (S.pow(2).sum() - S.diag().pow(2).sum())
    assert abs(est.var() / var - 1) < 0.12, (est.var(), var)
    if kind == "rademacher":
        assert set(e.unique().tolist()) == {-1.0, 1.0}


def test_several_probes_average_and_the_noise_is_fixed_for_the_whole_solve():
    """f(z) = A z with Hutchinson: the estimate e^T A e is constant along the path, so with the
    noise fixed for the solve log_det(T) = T mean_k e_k^T A e_k exactly, for each example its own
    e (drawn again here from the same generator seed). Noise redrawn at every evaluation would give
    an average over many e instead and fail this to far more than 1e-10."""
    A = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    cnf = M.CNF(Linear(A), T=0.6)
    x = torch.randn(5, 3, dtype=F64)
    opts = tight(trace="hutchinson", noise="gaussian", probes=3)
    with torch.no_grad():
        _, log_det, _ = cnf(x, opts, generator=torch.Generator().manual_seed(9))
    e = M.hutchinson_noise(x, "gaussian", 3, torch.Generator().manual_seed(9))  # (3, 5, 3)
    expected = 0.6 * torch.einsum("kbi,ij,kbj->b", e, A, e) / 3
    torch.testing.assert_close(log_det, expected, rtol=0, atol=1e-10)
    assert (log_det - 0.6 * torch.trace(A)).abs().max() > 1e-3  # an estimate, not the exact trace


def test_hutchinson_log_likelihood_is_unbiased_for_the_exact_one():
    """The integrated estimate int e^T J e dt with e fixed per solve has expectation int Tr(J) dt:
    over 4000 independent solves (a batch of copies of one point, one e each) the mean of the
    Hutchinson log p(x) is within 4 standard errors of the exact-trace log p(x)."""
    model = M.FFJORD(M.CNF(randomize(M.ConcatSquashMLP(2, 16, 2).double(), 5, std=0.6), T=0.5), (2,)).double()
    x = torch.tensor([[0.7, -1.1]], dtype=F64).expand(4000, 2)
    with torch.no_grad():
        exact, _ = M.log_prob(model, x[:1], M.SolveOptions(atol=1e-8, rtol=1e-8))
        est, _ = M.log_prob(model, x, M.SolveOptions(atol=1e-8, rtol=1e-8, trace="hutchinson"),
                                generator=torch.Generator().manual_seed(0))
    se = est.std() / math.sqrt(len(est))
    assert abs(est.mean() - exact[0]) < 4 * se + 1e-6, (est.mean(), exact, se)
    assert est.std() > 1e-3


# ----------------------------------------------------------------------------------------
# the adjoint method (Chen et al. Sec. 2, Algorithm 1)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_adjoint_gradients_equal_backprop_gradients(trace):
    """The gradients of a loss of (z(T), log_det, R_K, R_J) with respect to every parameter and to
    the initial state, by the adjoint's backward solve and by backpropagation through the solver,
    agree to the solvers' tolerance (1e-10), with the same Hutchinson noise in both (same
    generator seed). The NFE of both directions is reported."""
    net = randomize(M.ConcatSquashMLP(2, 16, 2).double(), 11, std=0.5)
    cnf = M.CNF(net, T=0.7)
    x0 = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    grads, stats = {}, {}
    for adjoint in (False, True):
        x = x0.clone().requires_grad_(True)
        s = M.SolveStats()
        z, log_det, reg = cnf(x, tight(adjoint=adjoint, trace=trace, regularize=True), s,
                              generator=torch.Generator().manual_seed(3))
        loss = (w * z).sum() + (log_det * w[:, 0]).sum() + (reg * torch.tensor([0.3, -0.7], dtype=F64)).sum()
        nfe_before_backward = s.nfe_backward
        loss.backward()
        grads[adjoint] = [x.grad.clone()] + [p.grad.clone() for p in net.parameters()]
        net.zero_grad()
        stats[adjoint] = (s, nfe_before_backward)
    for g_bp, g_adj in zip(grads[False], grads[True]):
        torch.testing.assert_close(g_adj, g_bp, rtol=1e-7, atol=1e-8)
    assert max(g.abs().max() for g in grads[True]) > 0.1
    (s_bp, before_bp), (s_adj, before_adj) = stats[False], stats[True]
    assert s_bp.nfe_forward == s_adj.nfe_forward  # the same forward solve
    assert before_adj == 0 and s_adj.nfe_backward > 0  # the adjoint's NFE is known after backward()
    assert s_bp.nfe_backward == 6 * s_bp.steps == before_bp


def test_adjoint_through_stacked_blocks_and_rk4():
    """Two CNF blocks in sequence with the fixed-step RK4: the adjoint solves the continuous adjoint
    equation, backprop differentiates the discrete RK4 map; both approximate the true gradient
    to O(h^4), so at h = 1/50 they agree to 1e-8 (measured: 6e-10, falling 16-fold per halving)."""
    blocks = [M.CNF(randomize(M.ConcatSquashMLP(2, 8, 1).double(), s, std=0.5), T=0.5) for s in (1, 2)]
    x0 = torch.randn(4, 2, dtype=F64)
    grads = {}
    for adjoint in (False, True):
        x = x0.clone().requires_grad_(True)
        opts = M.SolveOptions(method="rk4", step_size=1 / 50, adjoint=adjoint)
        z, total = x, 0
        for b in blocks:
            z, ld, _ = b(z, opts)
            total = total + ld
        (z.pow(2).sum() + total.sum()).backward()
        grads[adjoint] = [x.grad] + [p.grad.clone() for b in blocks for p in b.parameters()]
        for b in blocks:
            b.zero_grad()
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-8)


# ----------------------------------------------------------------------------------------
# RNODE regularisers
# ----------------------------------------------------------------------------------------

def test_rnode_integrals_for_a_linear_field_against_quadrature():
    """f(z) = A z on [0, T]: R_J = T ||A||_F^2 / D exactly (exact trace), and
    R_K = int_0^T 0.5 ||A expm(tA) z0||^2 / D dt by scipy quad. Integrating them changes neither
    the solution nor the steps (they are quadratures outside the error control)."""
    A = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    z0 = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    cnf, T = M.CNF(Linear(A), T=0.9), 0.9
    s_reg, s_plain = M.SolveStats(), M.SolveStats()
    with torch.no_grad():
        z, log_det, reg = cnf(z0, tight(regularize=True), s_reg)
        z_plain, log_det_plain, reg_plain = cnf(z0, tight(), s_plain)
    torch.testing.assert_close(reg[:, 1], torch.full((2,), T * A.pow(2).sum().item() / 3, dtype=F64))
    An, zn = A.numpy(), z0.numpy()
    for i in range(2):
        kin = quad(lambda t: 0.5 * np.sum((An @ expm(t * An) @ zn[i]) ** 2)
                   / 3, 0, T, epsabs=1e-12, epsrel=1e-12)[0]
        assert abs(reg[i, 0].item() - kin) < 1e-8
    torch.testing.assert_close(z, z_plain, rtol=0, atol=0)
    torch.testing.assert_close(log_det, log_det_plain, rtol=0, atol=0)
    assert (s_reg.steps, s_reg.nfe_forward) == (s_plain.steps, s_plain.nfe_forward)
    assert torch.all(reg_plain == 0)


# ----------------------------------------------------------------------------------------
# the oracle: the exact velocity of a known flow
# ----------------------------------------------------------------------------------------

class MixtureFlow(torch.nn.Module):
    """The exact velocity of a known flow: x_t = a(t) x_0 + b(t) e, x_0 from the Gaussian
    mixture sum_k pi_k N(mu_k, sigma^2 I), e ~ N(0, I), a = cos(pi t / 2T), b = sin(pi t / 2T).
    p_t = sum_k pi_k N(a mu_k, s^2 I), s^2 = a^2 sigma^2 + b^2, so p_0 is the mixture and
    p_T = N(0, I), the CNF's base. Each component moves as x = a mu_k + s xi, with velocity
    v_k = a' mu_k + (s'/s)(x - a mu_k); p_t v = sum_k pi_k p_k v_k solves the continuity
    equation, so v = sum_k r_k(x, t) v_k, r_k the posterior weights (the probability flow)."""

    def __init__(self, mu, sigma, log_pi, T):
        super().__init__()
        self.mu, self.sigma, self.log_pi, self.T = mu, sigma, log_pi, T

    def forward(self, t, x):
        w = math.pi / (2 * self.T)
        a, b, da, db = math.cos(w * t), math.sin(w * t), -w * math.sin(w * t), w * math.cos(w * t)
        s2 = a * a * self.sigma ** 2 + b * b
        ds_over_s = (a * da * self.sigma ** 2 + b * db) / s2
        d = x[:, None, :] - a * self.mu  # (B, K, D)
        r = torch.softmax(self.log_pi - 0.5 * d.pow(2).sum(-1) / s2, dim=1)
        return (r[..., None] * (da * self.mu + ds_over_s * d)).sum(1)

    def log_density(self, x):
        """log p_0(x) of the mixture, in closed form."""
        d = x[:, None, :] - self.mu
        comp = -0.5 * d.pow(2).sum(-1) / self.sigma ** 2 - x.shape[1] * (math.log(self.sigma) + 0.5 * LOG_2PI)
        return torch.logsumexp(self.log_pi + comp, dim=1)


LOG_2PI = math.log(2 * math.pi)


def mixture_oracle_error(tol):
    """|log_prob - log p_0| of the FFJORD likelihood code (exact trace, dopri5 at atol = rtol =
    tol) driven by the MixtureFlow velocity, at points around the modes and between them, and
    the bound the error control allows: every accepted step keeps its local error estimate
    below atol + rtol |y| per component, and the global error is at most the sum of the local
    ones times a stability factor exp(L T), taken as 10 here (the errors measured sit 50 to 2000
    times below the bound at tol 1e-5 to 1e-8)."""
    g = torch.Generator().manual_seed(0)
    angles = torch.arange(4, dtype=F64) * math.pi / 2
    mu = 2.0 * torch.stack([angles.cos(), angles.sin()], 1)
    log_pi = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64))
    oracle = MixtureFlow(mu, 0.5, log_pi, T=0.5)
    x = torch.cat([mu + 0.5 * torch.randn(4, 2, generator=g, dtype=F64), 3 * torch.randn(8, 2, generator=g, dtype=F64)])
    model = M.FFJORD(M.CNF(oracle, T=0.5), (2,)).double()
    stats = M.SolveStats()
    with torch.no_grad():
        log_p = M.log_prob(model, x, M.SolveOptions(atol=tol, rtol=tol), stats)[0]
    truth = oracle.log_density(x)
    bound = 10 * stats.steps * tol * (1 + truth.abs().max().item() + x.abs().max().item())
    return (log_p - truth).abs().max().item(), bound


@pytest.mark.parametrize("tol", [1e-5, 1e-8])
def test_mixture_probability_flow_reproduces_the_mixture_log_density(tol):
    """The oracle: the exact velocity of a known flow from a Gaussian mixture to N(0, I)
    plugged into the CNF likelihood code (CNF, FFJORD, log_prob, the exact trace, dopri5)
    gives the mixture's closed-form log-density to the tolerance the solver's error control
    implies (3e-2 at 1e-5, 1e-4 at 1e-8; a wrong sign of the divergence is off by nats)."""
    err, bound = mixture_oracle_error(tol)
    assert err < bound, (err, bound)
    assert bound < 3e4 * tol  # the bound is a tolerance, not a licence


def test_mixture_oracle_fails_on_a_planted_divergence_sign(monkeypatch):
    """The same oracle with the divergence's sign flipped (d Delta/dt = +Tr) misses by far more
    than its bound: the test above can fail."""
    exact = M.trace_exact
    monkeypatch.setattr(M, "trace_exact", lambda f_z, z, create_graph=False: tuple(
        -v if i == 0 else v for i, v in enumerate(exact(f_z, z, create_graph))))
    err, bound = mixture_oracle_error(1e-8)
    assert err > 1e3 * bound and err > 0.1, (err, bound)


# ----------------------------------------------------------------------------------------
# the 2D model
# ----------------------------------------------------------------------------------------

def integrate_density(model, lim, n, opts):
    """Midpoint rule for the integral of exp(log_prob) over [-lim, lim]^2 with n x n cells."""
    h = 2 * lim / n
    c = -lim + h * (torch.arange(n, dtype=F64) + 0.5)
    pts = torch.stack(torch.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        return torch.exp(M.log_prob(model, pts, opts)[0]).sum().item() * h * h


def test_2d_model_density_integrates_to_one():
    """The exact-trace density of a random (non-identity) 2D model integrates to 1: the midpoint
    rule's error is O(h^2), so |I_n - I_2n| / 3 estimates the error of I_2n (Richardson); the
    box [-7, 7]^2 leaves tails below 1e-6 for this mildly deformed Gaussian; the solver
    contributes about its tolerance (1e-7) to each log-density."""
    model = M.FFJORD(M.CNF(randomize(M.ConcatSquashMLP(2, 16, 2).double(), 21, std=0.5), T=0.5), (2,)).double()
    opts = M.SolveOptions(atol=1e-7, rtol=1e-7)
    i1, i2 = integrate_density(model, 7.0, 100, opts), integrate_density(model, 7.0, 200, opts)
    err = abs(i1 - i2) / 3
    assert abs(i2 - 1) < 5 * err + 1e-5, (i1, i2, err)
    with torch.no_grad():  # and the model is not N(0, I): the flow moved the density
        p = M.log_prob(model, torch.tensor([[0.0, 0.0]], dtype=F64), opts)[0]
    assert abs(p.item() + math.log(2 * math.pi)) > 0.05


@SETTINGS
@given(seed=st.integers(0, 10_000), method=st.sampled_from(["dopri5", "rk4"]))
def test_forward_then_backward_integration_returns_the_input_2d(seed, method):
    """x -> z(T) -> back to t = 0 returns x (to the solver's accuracy); sample() is inverse() of base draws."""
    cnf = M.CNF(randomize(M.ConcatSquashMLP(2, 16, 2).double(), seed, std=0.5), T=0.5)
    x = 2 * torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))
    opts = tight(method=method, step_size=0.01)
    with torch.no_grad():
        z, _, _ = cnf(x, opts)
        back = cnf.inverse(z, opts)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-7)
    assert (z - x).abs().max() > 1e-2


def test_sample_and_trajectory_run_from_the_base_to_the_data():
    """sample(n) is inverse(z) of z ~ N(0, I) from the generator; the trajectory starts at z and
    ends at inverse(z)."""
    model = M.FFJORD(M.CNF(randomize(M.ConcatSquashMLP(2, 16, 2).double(), 4, std=0.5), T=0.5), (2,)).double()
    opts = M.SolveOptions(atol=1e-9, rtol=1e-9)
    x = model.sample(5, opts, torch.Generator().manual_seed(0))
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(x, model.body.inverse(z, opts))
    path = model.body.trajectory(z, 6, opts)
    assert path.shape == (6, 5, 2)
    torch.testing.assert_close(path[0], z, rtol=0, atol=0)
    torch.testing.assert_close(path[-1], x, rtol=0, atol=1e-8)


def test_identity_start_gives_the_base_density_and_bounded_nfe():
    """A freshly built 2D model (zero last layer: f = 0) is the identity: log p(x) = log N(x) and
    the solver's NFE stays small (the starting-step heuristic and a 10x growth per step)."""
    model = M.FFJORD(M.CNF(M.ConcatSquashMLP(2, 64, 3), T=0.5), (2,))
    x = torch.randn(16, 2)
    stats = M.SolveStats()
    with torch.no_grad():
        log_p, _ = M.log_prob(model, x, M.SolveOptions(), stats)
    torch.testing.assert_close(log_p, M.standard_normal_log_prob(x))
    assert stats.nfe_forward <= 2 + 6 * 8


# ----------------------------------------------------------------------------------------
# images: preprocessing, squeeze, the multiscale architecture
# ----------------------------------------------------------------------------------------

def image_model(seed, levels=17, n_scales=2, shape=(1, 4, 4)):
    body = M.Multiscale(shape, n_scales, 1, lambda c: M.ODEConvNet(c, (4,)), T=0.5)
    return M.FFJORD(randomize(body, seed, std=0.3), shape, levels=levels, alpha=0.05).double()


def test_squeeze_is_the_2x2_space_to_channel_permutation():
    x = torch.randn(2, 3, 4, 6, dtype=F64)
    y = M.squeeze(x)
    assert y.shape == (2, 12, 2, 3)
    for ci in range(3):
        for di in range(2):
            for dj in range(2):
                torch.testing.assert_close(y[:, 4 * ci + 2 * di + dj], x[:, ci, di::2, dj::2], rtol=0, atol=0)
    assert torch.equal(M.unsqueeze(y), x)


@pytest.mark.parametrize("n_scales", [1, 2])
def test_multiscale_log_det_with_preprocessing_equals_the_jacobian_of_the_whole_map(n_scales):
    """FFJORD.forward on dequantised 1x4x4 images (logit, CNFs, squeeze, factor-out, the next
    scale) against slogdet of the autograd Jacobian of v -> z, per example, with the exact trace;
    and the inverse returns v."""
    model = image_model(3, n_scales=n_scales)
    g = torch.Generator().manual_seed(0)
    v = M.dequantize(torch.randint(17, (2, 1, 4, 4), generator=g).double(),
                     torch.rand(2, 1, 4, 4, generator=g, dtype=F64).clamp(0.01, 0.99))
    opts = tight()
    with torch.no_grad():
        z, log_det, _ = model(v, opts)
        back = model.pre.inverse(model.body.inverse(z, opts))
    torch.testing.assert_close(back, v, rtol=0, atol=1e-8)
    torch.testing.assert_close(log_det, flow_map_logdet(model, v, opts), rtol=0, atol=1e-7)


def test_nll_hand_computed_with_an_identity_flow():
    """With f = 0 the flow is the logit alone: x = (3, 10), K = 17, u = (0.5, 0.25), alpha = 0.05,
    nll = -sum_i [log N(w_i) + log(1 - 2a) - log K - log p_i - log(1 - p_i)], p = a + (1-2a)(x+u)/K,
    w = logit(p); bits/dim = nll / (D ln 2)."""
    K, a = 17, 0.05
    body = M.CNF(M.ConcatSquashMLP(2, 4, 1), T=1.0)  # zero last layer: f = 0
    model = M.FFJORD(body, (2,), levels=K, alpha=a).double()
    x = torch.tensor([[3, 10]], dtype=torch.uint8)
    u = torch.tensor([[0.5, 0.25]], dtype=F64)
    total = 0.0
    for xi, ui in ((3, 0.5), (10, 0.25)):
        p = a + (1 - 2 * a) * (xi + ui) / K
        w = math.log(p / (1 - p))
        total += -0.5 * w * w - 0.5 * math.log(2 * math.pi) + math.log(1 - 2 * a) - math.log(K) - math.log(p * (1 - p))
    with torch.no_grad():
        nll, _ = M.nll(model, x, M.SolveOptions(), discrete=True, u=u)
    torch.testing.assert_close(nll, torch.tensor([-total], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(M.bits_per_dim(nll, 2), nll / (2 * math.log(2)))


def test_image_model_samples_levels_and_its_adjoint_gradients_equal_backprop():
    """Samples are integer levels; on the multiscale model with Hutchinson noise (same seed in both
    runs), dequantisation noise u fixed and the RNODE terms, the adjoint gradients of every
    parameter equal backprop's."""
    model = image_model(5)
    x = model.sample(3, M.SolveOptions(atol=1e-6, rtol=1e-6), torch.Generator().manual_seed(0))
    assert x.dtype == torch.uint8 and x.shape == (3, 1, 4, 4) and int(x.max()) <= 16
    u = torch.rand(x.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    grads = {}
    for adjoint in (False, True):
        stats = M.SolveStats()
        opts = M.SolveOptions(atol=1e-8, rtol=1e-8, trace="hutchinson", regularize=True, adjoint=adjoint)
        nll, reg = M.nll(model, x, opts, stats, generator=torch.Generator().manual_seed(2), discrete=True, u=u)
        (nll.mean() + 0.1 * reg.sum(1).mean()).backward()
        assert torch.isfinite(nll).all() and reg.shape == (3, 2) and stats.nfe_backward > 0
        grads[adjoint] = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
    for a, b in zip(grads[False], grads[True]):  # measured: 2e-7 of the largest entry at tolerance 1e-8
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * a.abs().max().item())


def test_paper_multiscale_parameter_counts():
    """FFJORD App. B.1 with the official --dims 64,64,64: each block is 4 concat convolutions
    (3x3, time as an extra input channel) c+1 -> 64 -> 64 -> 64 -> c, i.e.
    (c+1) 64 9 + 64 + 2 (65 64 9 + 64) + 65 c 9 + c = 1162 c + 75648 parameters. Blocks of N = 2:
    MNIST (3 scales) has channels 1,1 | 4,4 (squeezed) | 2,2 | 8,8 | 4,4 (last scale);
    CIFAR-10 (4 scales) 3,3 | 12,12 | 6,6 | 24,24 | 12,12 | 48,48 | 24,24."""
    count = lambda m: sum(p.numel() for p in m.parameters())
    per_block = lambda c: 1162 * c + 75648
    assert (M.default_n_scales(28, 28), M.default_n_scales(32, 32), M.default_n_scales(8, 8)) == (3, 4, 2)
    mnist = M.Multiscale((1, 28, 28), 3, 2, lambda c: M.ODEConvNet(c), T=1.0)
    cifar = M.Multiscale((3, 32, 32), 4, 2, lambda c: M.ODEConvNet(c), T=1.0)
    mnist_channels = [1, 1, 4, 4, 2, 2, 8, 8, 4, 4]
    cifar_channels = [3, 3, 12, 12, 6, 6, 24, 24, 12, 12, 48, 48, 24, 24]
    assert count(mnist) == sum(map(per_block, mnist_channels)) == 800_636
    assert count(cifar) == sum(map(per_block, cifar_channels)) == 1_358_868
    with pytest.raises(ValueError):
        M.Multiscale((1, 28, 28), 4, 2, lambda c: M.ODEConvNet(c))  # 28 is not divisible by 8


def test_stacked_2d_blocks_log_det_inverse_and_trajectory():
    """Two CNF blocks in a CNFStack: the log-det is log|det| of the autograd Jacobian of the
    whole map, the inverse returns the input, and the trajectory runs from the base through both
    blocks to the data (n_blocks (n_times - 1) + 1 frames)."""
    stack = M.CNFStack(M.CNF(randomize(M.ConcatSquashMLP(2, 8, 1).double(), s, std=0.6), T=0.4) for s in (1, 2))
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    opts = tight()
    with torch.no_grad():
        z, log_det, _ = stack(x, opts)
        back = stack.inverse(z, opts)
    torch.testing.assert_close(log_det, flow_map_logdet(stack, x, opts), rtol=0, atol=1e-7)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-8)
    path = stack.trajectory(z, 4, opts)
    assert path.shape == (7, 5, 2)
    torch.testing.assert_close(path[0], z, rtol=0, atol=0)
    torch.testing.assert_close(path[-1], x, rtol=0, atol=1e-8)


def test_dequantized_values_stay_in_their_cube_even_when_x_plus_u_rounds_up():
    """u just below 1 rounds x + u up to x + 1 in float32 for large x: v is kept below x + 1."""
    x = torch.tensor([0, 7, 255], dtype=torch.uint8)
    u = torch.tensor([0.0, 0.5, 1 - 1e-9], dtype=torch.float32)
    v = M.dequantize(x, u)
    assert v.dtype == torch.float32 and torch.all(v < x.float() + 1) and torch.all(v >= x.float())
    assert torch.equal(M.quantize(v, 256), x)


def test_rnode_loss_and_learning_rate_schedule():
    nats, reg = torch.tensor([1.0, 3.0]), torch.tensor([[2.0, 10.0], [4.0, 20.0]])
    assert M.rnode_loss(nats, reg).item() == 2.0
    assert M.rnode_loss(nats, reg, 0.5, 0.1).item() == pytest.approx(2.0 + 0.5 * 3.0 + 0.1 * 15.0)
    cfg = M.Config(lr=1e-3, warmup=4, lr_drop=10)
    rates = [M.learning_rate(s, cfg) for s in (0, 3, 9, 10)]
    assert rates == pytest.approx([2.5e-4, 1e-3, 1e-3, 1e-4])
    cosine = M.Config(lr=1e-3, warmup=4, steps=12, decay="cosine")  # lr (1 + cos(pi p)) / 2 after the warm-up
    rates = [M.learning_rate(s, cosine) for s in (0, 3, 4, 8, 12)]
    assert rates == pytest.approx([2.5e-4, 1e-3, 1e-3, 5e-4, 0], abs=1e-12)


# ----------------------------------------------------------------------------------------
# Residual Flows (Behrmann et al. 2019; Chen et al. 2019)
# ----------------------------------------------------------------------------------------

def residual_flow(seed, dim=2, n_blocks=2, hidden=16, n_hidden=1, coeff=0.9):
    """A float64 residual flow with random (large) weights, so every spectral normalisation binds,
    its power iterations run to convergence, in evaluation mode."""
    torch.manual_seed(seed)
    body = M.ResidualFlow(M.ResidualBlock(dim, hidden, n_hidden, coeff) for _ in range(n_blocks)).double()
    randomize(body, seed, std=1.0)
    for m in body.modules():
        if isinstance(m, M.SpectralNormLinear):
            m.power_iteration(1000)
    return body.eval()


def autograd_jacobian(fn, x):
    """(B, D, D): the Jacobian of fn at each row of x, example by example."""
    return torch.stack([torch.autograd.functional.jacobian(fn, xi[None])[0, :, 0, :] for xi in x])


def contraction(seed, D=3, lip=0.55):
    """g(x) = A x + 0.05 sin(B x) with ||A||_2 = lip, ||B||_2 = 1, so Lip(g) <= lip + 0.05 < 0.71:
    the Russian roulette with p = 0.5 then has a finite variance (the sum of L^(2k) / (1 - p)^k converges)."""
    gen = torch.Generator().manual_seed(seed)
    A, B = torch.randn(D, D, generator=gen, dtype=F64), torch.randn(D, D, generator=gen, dtype=F64)
    A, B = lip * A / torch.linalg.matrix_norm(A, 2), B / torch.linalg.matrix_norm(B, 2)
    return lambda x: x @ A.T + 0.05 * torch.sin(x @ B.T)


def basis_probes(D, B=1):
    """Probes sqrt(D) e_i, i = 1..D: their average of v^T A v is tr(A) exactly (no Hutchinson noise)."""
    return (math.sqrt(D) * torch.eye(D, dtype=F64))[:, None, :].expand(D, B, D)


@SETTINGS
@given(seed=st.integers(0, 10_000), d_in=st.integers(1, 8), d_out=st.integers(1, 8),
       coeff=st.sampled_from([0.5, 0.9, 0.97]))
def test_spectral_norm_after_power_iteration_is_at_most_c(seed, d_in, d_out, coeff):
    """After the power iteration converges, the normalised weight's largest singular value
    (torch.linalg.matrix_norm(ord=2)) is c when W's exceeds c (sigma-hat <= sigma always, so
    c sigma / sigma-hat >= c; convergence makes it c), and W itself when it is below c."""
    layer = M.SpectralNormLinear(d_in, d_out, coeff).double()
    randomize(layer, seed, std=2.0)
    layer.power_iteration(2000)
    sigma = torch.linalg.matrix_norm(layer.weight.detach(), ord=2).item()
    norm = torch.linalg.matrix_norm(layer.normalized_weight().detach(), ord=2).item()
    assert norm <= coeff * (1 + 1e-9), (norm, sigma)
    if sigma > coeff:
        assert norm == pytest.approx(coeff, rel=1e-6)
    with torch.no_grad():
        layer.weight.mul_(0.5 * coeff / sigma)  # now below c: left alone
    layer.power_iteration(2000)
    torch.testing.assert_close(layer.normalized_weight(), layer.weight)


def test_power_iteration_runs_in_training_steps_only():
    """The buffers u, v move at a training forward with gradients, not in evaluation mode nor
    under no_grad (the density grid of the pictures computes its log-det under enable_grad
    inside, and must not move them either: resume is bit-exact across pictures)."""
    block = M.ResidualBlock(4, 8, 1, 0.9)
    u0 = block.linears[0].u.clone()
    opts = M.LogDetOptions("exact")
    block.eval()
    block(torch.randn(2, 4), opts)
    block.train()
    with torch.no_grad():
        block(torch.randn(2, 4), opts)
    assert torch.equal(block.linears[0].u, u0)
    block(torch.randn(2, 4), opts)
    assert not torch.equal(block.linears[0].u, u0)


def test_lipswish_is_one_lipschitz_and_the_bound_is_tight():
    """LipSwish's slope, by autograd on a fine grid, stays below 1 for several beta and reaches
    1.0998/1.1 > 0.999 (Chen et al. 2019's LipSwish)."""
    act = M.LipSwish().double()
    for b in (-3.0, 0.0, 0.5413, 3.0):
        with torch.no_grad():
            act.b.fill_(b)
        beta = torch.nn.functional.softplus(act.b).item()
        x = (torch.linspace(-20, 20, 40001, dtype=F64) / beta).requires_grad_(True)  # beta x in [-20, 20]
        slope = torch.autograd.grad(act(x).sum(), x)[0]
        assert slope.abs().max() <= 1 and slope.max() > 0.999


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_residual_block_jacobian_has_spectral_norm_below_c(seed):
    """Lip(g) <= c: the spectral norm of J_g (autograd) at random points is at most c."""
    flow = residual_flow(seed, dim=3, n_blocks=1, n_hidden=2, coeff=0.9)
    x = 3 * torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))
    J = autograd_jacobian(flow[0].g, x)
    assert torch.linalg.matrix_norm(J, ord=2).max() <= 0.9 * (1 + 1e-9)


@SETTINGS
@given(seed=st.integers(0, 10_000), dim=st.sampled_from([2, 5]))
def test_fixed_point_inverse_recovers_x(seed, dim):
    """inverse(forward(x)) == x and forward(inverse(z)) == z to 1e-10 (float64, the iteration
    run to 1e-13), for the whole flow; and the flow moved the points."""
    flow = residual_flow(seed, dim=dim, n_blocks=3)
    opts = M.LogDetOptions("exact", fp_atol=1e-13, fp_rtol=0.0)
    x = 2 * torch.randn(8, dim, dtype=F64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        z = flow(x, opts)[0]
        torch.testing.assert_close(flow.inverse(z, opts), x, rtol=0, atol=1e-10)
        torch.testing.assert_close(flow(flow.inverse(x, opts), opts)[0], x, rtol=0, atol=1e-10)
    assert (z - x).abs().max() > 1e-2
    with pytest.raises(ValueError, match="did not converge"):
        flow.inverse(z, M.LogDetOptions(fp_atol=1e-13, fp_rtol=0.0, fp_max_iter=2))


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_exact_log_det_of_the_flow_equals_slogdet_of_its_jacobian(seed):
    """The flow's exact log-det (per block slogdet(I + J_g)) equals log|det| of the autograd
    Jacobian of the whole map x -> z."""
    flow = residual_flow(seed, dim=3, n_blocks=2)
    opts = M.LogDetOptions("exact")
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        log_det = flow(x, opts)[1]
    J = autograd_jacobian(lambda a: flow(a, opts)[0], x)
    torch.testing.assert_close(log_det, torch.linalg.slogdet(J)[1], rtol=0, atol=1e-12)


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_truncated_power_series_converges_to_slogdet(seed):
    """sum_{k<=n} (-1)^(k+1) tr(J^k) / k (traces exact: basis probes) approaches
    log det(I + J) = slogdet, within the tail bound |sum_{k>n}| <= D L^(n+1) / ((n+1)(1 - L)),
    L = ||J||_2 (|tr(J^k)| <= D L^k); the first term alone misses by more than 1e-3."""
    D, g = 3, contraction(seed)
    x = torch.randn(1, D, dtype=F64, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    J = autograd_jacobian(g, x.detach())
    L = torch.linalg.matrix_norm(J, 2).item()
    exact = torch.linalg.slogdet(torch.eye(D, dtype=F64) + J)[1].item()
    gx = g(x)
    errors = []
    for n in (1, 2, 4, 8, 16, 32):
        with torch.no_grad():
            value = M.log_det_power_series(gx, x, basis_probes(D), [1.0] * n).item()
        errors.append(abs(value - exact))
        assert errors[-1] <= D * L ** (n + 1) / ((n + 1) * (1 - L)) + 1e-14, (n, errors)
    assert errors[0] > 1e-3 and errors[-1] < 1e-7


def test_russian_roulette_mean_equals_the_exact_log_det_within_its_standard_error():
    """Chen et al. Theorem 1: with N = n_exact + Geometric(p) and weights 1 / P(N >= k), the
    estimator with Rademacher probes is unbiased for log det(I + J). 20,000 independent draws
    (N and v; grouped by N, one batch per value): the mean is within 4 standard errors of
    slogdet, while the truncation at the n_exact = 1 terms always computed is more than 4 off."""
    D, g, n_exact, p, draws = 3, contraction(7), 1, 0.5, 20_000
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, D, dtype=F64, generator=gen)
    exact = torch.linalg.slogdet(torch.eye(D, dtype=F64) + autograd_jacobian(g, x0))[1].item()
    ns = [M.sample_n_terms(n_exact, p, gen) for _ in range(draws)]
    assert min(ns) == n_exact and np.mean(ns) == pytest.approx(n_exact + (1 - p) / p, rel=0.05)
    values = []
    for n in sorted(set(ns)):
        x = x0.repeat(ns.count(n), 1).requires_grad_(True)
        gx = g(x)
        with torch.no_grad():
            v = M.hutchinson_noise(x, "rademacher", 1, gen)
            values.append(M.log_det_power_series(gx, x, v, M.roulette_weights(n, n_exact, p)))
    values = torch.cat(values)
    mean, se = values.mean().item(), values.std().item() / math.sqrt(draws)
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    x = x0.clone().requires_grad_(True)
    truncated = M.log_det_power_series(g(x), x, basis_probes(D), [1.0] * n_exact).item()
    assert abs(truncated - exact) > 4 * se, (truncated, exact, se)
    assert M.roulette_weights(4, 2, 0.5) == [1.0, 1.0, 2.0, 4.0]


@pytest.mark.parametrize("method", ["series", "roulette"])
def test_neumann_gradient_equals_backprop_and_the_exact_gradient(method):
    """Chen et al.'s Neumann gradient series: with the same draws (seeded), the Neumann-series gradient and
    backpropagation through the series give the same value; with exact traces (basis probes)
    and 60 terms (L^60 < 1e-15) both gradients, in the parameters and in x, equal those of
    slogdet(I + J_g) by autograd. For the roulette the gradients agree in expectation only, so
    there it checks the value and that the gradients are finite."""
    flow = residual_flow(3, dim=3, n_blocks=1, n_hidden=1, coeff=0.5)
    block = flow[0]
    params = list(block.parameters())
    x0 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(1))

    def grads(fn):
        x = x0.clone().requires_grad_(True)
        value = fn(x)
        return value.detach(), torch.autograd.grad(value.sum(), [x] + params, allow_unused=True,
                                                   materialize_grads=True)  # the last bias does not enter

    exact = grads(lambda x: torch.linalg.slogdet(torch.eye(3, dtype=F64) + torch.func.vmap(
        torch.func.jacrev(block.g))(x))[1])
    if method == "series":
        for neumann in (False, True):
            got = grads(lambda x: M.log_det_power_series(block.g(x), x, basis_probes(3, 4), [1.0] * 60, neumann))
            torch.testing.assert_close(got[0], exact[0], rtol=0, atol=1e-12)
            for a, b in zip(got[1], exact[1]):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    else:
        def roulette(neumann):
            opts = M.LogDetOptions("roulette", neumann=neumann)
            return grads(lambda x: M.residual_log_det(block.g(x), x, opts, torch.Generator().manual_seed(5)))
        plain, neumann = roulette(False), roulette(True)
        torch.testing.assert_close(plain[0], neumann[0], rtol=0, atol=1e-12)
        assert all(torch.isfinite(gr).all() for gr in neumann[1])


def test_residual_density_integrates_to_one():
    """The exact log-det density of a random 2D residual flow integrates to 1 on [-7, 7]^2 (the
    midpoint rule's error estimated by Richardson, as for the CNF); and it is not N(0, I)."""
    model = M.FFJORD(residual_flow(11, dim=2, n_blocks=2, coeff=0.9), (2,)).double()
    opts = M.LogDetOptions("exact")
    i1, i2 = integrate_density(model, 7.0, 100, opts), integrate_density(model, 7.0, 200, opts)
    err = abs(i1 - i2) / 3
    assert abs(i2 - 1) < 5 * err + 1e-5, (i1, i2, err)
    with torch.no_grad():
        p = M.log_prob(model, torch.tensor([[0.0, 0.0]], dtype=F64), opts)[0]
    assert abs(p.item() + math.log(2 * math.pi)) > 0.05


def test_residual_image_model_nll_and_samples():
    """On integer levels: the residual flow after the logit preprocessing gives a finite NLL whose
    gradient reaches every parameter, with the roulette and the Neumann gradient; its exact
    log-det equals the autograd Jacobian's of the whole map; samples are levels."""
    torch.manual_seed(0)
    body = M.ResidualFlow(M.ResidualBlock(16, 8, 1, 0.9) for _ in range(2))
    model = M.FFJORD(body, (1, 4, 4), levels=17, alpha=0.05).double()
    levels = torch.randint(17, (3, 1, 4, 4), dtype=torch.uint8)
    u = torch.rand(levels.shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    nats, _ = M.nll(model, levels, M.LogDetOptions(neumann=True), discrete=True, u=u)
    nats.mean().backward()
    assert torch.isfinite(nats).all() and all(p.grad is not None for p in model.parameters())
    model.eval()
    v = M.dequantize(levels.double(), u)
    with torch.no_grad():
        log_det = model(v, M.LogDetOptions("exact"))[1]
    J = autograd_jacobian(lambda a: model(a.reshape(-1, 1, 4, 4), M.LogDetOptions("exact"))[0].reshape(-1, 16),
                          v.reshape(3, 16))
    torch.testing.assert_close(log_det, torch.linalg.slogdet(J)[1], rtol=0, atol=1e-9)
    samples = model.sample(5, M.LogDetOptions())
    assert samples.shape == (5, 1, 4, 4) and samples.dtype == torch.uint8 and int(samples.max()) <= 16


# ----------------------------------------------------------------------------------------
# the mathematics and the networks alone
# ----------------------------------------------------------------------------------------

def test_mathematics_runs_without_common(without_common):
    """The solvers, the adjoint, the traces, RNODE's integrals, the 2D and the multiscale image
    flow with their networks, the likelihood, its gradients and the sampler run from the file's
    first half alone (common.py replaced by a module whose every name fails)."""
    m = without_common("ffjord")
    torch.manual_seed(0)
    flow = m.FFJORD(m.CNFStack(m.CNF(m.ConcatSquashMLP(2, 8, 1), T=0.5) for _ in range(2)), (2,))
    for p in flow.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(6, 2)
    for adjoint, method, trace in ((False, "dopri5", "exact"), (True, "rk4", "hutchinson")):
        opts = m.SolveOptions(method=method, adjoint=adjoint, trace=trace, step_size=0.1, regularize=True)
        stats = m.SolveStats()
        nats, reg = m.nll(flow, x, opts, stats)
        m.rnode_loss(nats, reg, 0.01, 0.01).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in flow.parameters())
        assert stats.nfe_forward > 0 and stats.nfe_backward > 0 and reg.shape == (6, 2)
        flow.zero_grad()
    opts = m.SolveOptions()
    with torch.no_grad():
        torch.testing.assert_close(m.log_prob(flow, x, opts)[0], -m.nll(flow, x, opts)[0])
    assert flow.sample(4, opts).shape == (4, 2) and flow.body.trajectory(x, 3, opts).shape == (5, 6, 2)
    body = m.Multiscale((1, 4, 4), 2, 1, lambda c: m.ODEConvNet(c, (4,)), T=0.5)
    images = m.FFJORD(body, (1, 4, 4), levels=17, alpha=0.05)
    levels = torch.randint(17, (2, 1, 4, 4), dtype=torch.uint8)
    opts = m.SolveOptions(trace="hutchinson", probes=2, regularize=True)
    nats, reg = m.nll(images, levels, opts, discrete=True)
    nats.mean().backward()
    assert torch.isfinite(nats).all() and m.bits_per_dim(nats.mean().item(), 16) > 0
    samples = images.sample(3, opts)
    assert samples.shape == (3, 1, 4, 4) and samples.dtype == torch.uint8 and int(samples.max()) <= 16
    with pytest.raises(ValueError):
        m.SolveOptions(trace="brute")
    residual = m.FFJORD(m.ResidualFlow(m.ResidualBlock(16, 8, 1, 0.9) for _ in range(2)), (1, 4, 4), levels=17,
                        alpha=0.05)
    for opts in (m.LogDetOptions(), m.LogDetOptions("series", n_terms=3, neumann=True)):
        nats, _ = m.nll(residual, levels, opts, discrete=True)
        nats.mean().backward()
    with torch.no_grad():
        assert torch.isfinite(m.nll(residual, levels, m.LogDetOptions("exact"), discrete=True)[0]).all()
    assert residual.sample(3, m.LogDetOptions()).shape == (3, 1, 4, 4)
    with pytest.raises(ValueError):
        m.LogDetOptions(method="brute")


# ----------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset, info, count", [
    ("8gaussians", common.DataInfo("8gaussians", "points", (2,), lim=4.0), 9_224),
    ("digits", common.DataInfo("digits", "image", (1, 8, 8), levels=17, num_classes=10), 33_670),
    ("mnist", common.DataInfo("mnist", "image", (1, 28, 28), levels=256, num_classes=10), 800_636),
    ("cifar10", common.DataInfo("cifar10", "image", (3, 32, 32), levels=256, num_classes=10), 1_358_868),
])
def test_presets_build_the_stated_models(dataset, info, count):
    """The parameter counts stated in the README and the docstrings: the official toy network
    (concatsquash 2-64-64-64-2: 3 (64 + 64) + 3 * 64 * 64 + ... counted by hand below), the small
    digits model, and the paper's multiscale models (App. B.1; test_paper_multiscale_parameter_counts)."""
    kind = "points" if info.kind == "points" else "image"
    cfg = M.Config(**M.PRESETS.get(dataset, M.PRESETS[kind]))
    with torch.device("meta"):
        net = M.build(cfg, info)
    assert sum(p.numel() for p in net.parameters()) == count
    if dataset == "8gaussians":  # each concatsquash layer: W, b, gate (1 -> out, with bias), shift (no bias)
        layer = lambda a, b: a * b + b + 2 * b + b
        assert count == layer(2, 64) + 2 * layer(64, 64) + layer(64, 2)
    if dataset in ("mnist", "cifar10"):  # the values the preset's comment cites (issue 29)
        assert (cfg.solver, cfg.atol, cfg.rtol, cfg.trace, cfg.noise, cfg.batch_size) == \
            ("dopri5", 1e-5, 1e-5, "hutchinson", "rademacher", 900)
        assert (cfg.n_blocks, cfg.width, cfg.depth, cfg.time_length, cfg.alpha) == (2, 64, 3, 1.0, 1e-6)
        assert (cfg.lr, cfg.weight_decay, cfg.warmup, cfg.flip) == (1e-3, 0.0, 1000, dataset == "cifar10")
        n_train = {"mnist": 60_000, "cifar10": 50_000}[dataset]
        assert cfg.steps == math.ceil(500 * n_train / 900) and cfg.lr_drop == math.ceil(250 * n_train / 900)
        assert M.learning_rate(cfg.lr_drop - 1, cfg) == 1e-3 and M.learning_rate(cfg.lr_drop, cfg) == 1e-4
    if dataset == "digits":  # RNODE's mnist.sh
        assert (cfg.solver, cfg.step_size, cfg.kinetic, cfg.jacobian, cfg.time_length, cfg.trace, cfg.lr) == \
            ("rk4", 0.25, 0.01, 0.01, 1.0, "hutchinson", 1e-3)


@pytest.mark.parametrize("dataset, info", [
    ("8gaussians", common.DataInfo("8gaussians", "points", (2,), lim=4.0)),
    ("digits", common.DataInfo("digits", "image", (1, 8, 8), levels=17, num_classes=10)),
])
def test_residual_presets_replace_the_cnf_presets(dataset, info):
    """--arch residual takes ARCH_PRESETS["residual"] in place of PRESETS (so none of the CNF's
    digits recipe, RNODE's penalties included, leaks in): 8 blocks D-h-...-h-D of spectrally
    normalised linear maps (weights and biases) and one LipSwish parameter per hidden layer."""
    cfg = common.parse_config(M.Config, M.PRESETS, ["--arch", "residual", "--dataset", dataset],
                              arch_presets=M.ARCH_PRESETS)
    M.check_config(cfg)
    assert (cfg.kinetic, cfg.jacobian, cfg.solver, cfg.coeff, cfg.n_power_iterations) == (0.0, 0.0, "dopri5", 0.9, 5)
    with torch.device("meta"):
        net = M.build(cfg, info)
    dims = [info.dims] + [cfg.hidden] * cfg.n_hidden + [info.dims]
    per_block = sum(a * b + b for a, b in zip(dims[:-1], dims[1:])) + cfg.n_hidden
    assert sum(p.numel() for p in net.parameters()) == cfg.n_blocks * per_block
    assert cfg.n_blocks == 8 and (cfg.hidden, cfg.n_hidden) == ((64, 3) if dataset == "8gaussians" else (128, 2))


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------

TINY_2D = ["--dataset", "8gaussians", "--hidden", "8", "--n-hidden", "1", "--batch-size", "32", "--n-samples", "50",
           "--device", "cpu"]
TINY_DIGITS = ["--dataset", "digits", "--width", "4", "--depth", "1", "--batch-size", "8", "--n-samples", "4",
               "--device", "cpu"]
TINY_RESIDUAL = ["--arch", "residual", "--n-blocks", "2", "--hidden", "8", "--n-hidden", "1", "--batch-size", "16",
                 "--n-samples", "20", "--device", "cpu"]


def single_process_only(*args, **kwargs):
    raise AssertionError("--eval and --sample run in one process: they never join a process group")


def test_cli_2d_end_to_end_eval_and_sample(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_main("ffjord", [*TINY_2D, "--steps", "3", "--out", str(out), "--log-every", "1"])
    for f in ("ckpt.pt", "samples_3.png", "density.png", "trajectory.png", "nfe.png", "metrics.jsonl", "loss.png"):
        assert (out / f).exists(), f
    lines = [r for r in common._read_metrics(out / "metrics.jsonl") if "step" in r]
    assert [r["step"] for r in lines] == [1, 2, 3]
    for r in lines:  # dopri5: 2 evaluations to start, 6 per attempted step; backprop keeps 6 per accepted one
        assert r["nfe_forward"] == 2 + 6 * (r["solver_steps"] + r["rejected"])
        assert r["nfe_backward"] == 6 * r["solver_steps"]
    monkeypatch.setattr(common, "_init_distributed", single_process_only)
    fields = run_main("ffjord", ["--eval", str(out / "ckpt.pt"), "--out", str(out)])
    (ev,) = events(out, "eval")
    assert ev["nll"] == fields["nll"] and ev["n"] == 10_000 and ev["split"] == "test"
    assert (ev["solver"], ev["atol"], ev["rtol"], ev["trace"]) == ("dopri5", 1e-5, 1e-5, "exact")
    assert ev["nll"] > ev["true_entropy"] - 5 * ev["true_entropy_se"] and ev["nfe_per_solve"] >= 8
    with np.load(out / "density.npz") as d:
        assert d["log_density"].shape == (128, 128) and float(d["lim"]) == 4.0
        cell = (8 / 128) ** 2  # a 3-step flow is near N(0, I): nearly all its mass lies in the box
        assert 0.97 < np.exp(d["log_density"]).sum() * cell < 1.001
    run_main("ffjord", ["--sample", str(out / "ckpt.pt"), "--n-samples", "10", "--out", str(out / "s")])
    assert torch.load(out / "s" / "samples.pt", weights_only=True).shape == (10, 2)
    (ev,) = events(out / "s", "sample")
    assert ev["n"] == 10 and ev["nfe"] > 0 and (out / "s" / "trajectory.png").exists()


def test_cli_digits_end_to_end_eval_and_sample(tmp_path, monkeypatch):
    """The digits preset (rk4, Hutchinson, RNODE penalties): training logs bits/dim, the NFE and
    the penalties; --eval scores with dopri5 and 4 Hutchinson probes; samples are levels."""
    out = tmp_path / "digits"
    run_main("ffjord", [*TINY_DIGITS, "--steps", "2", "--out", str(out), "--log-every", "1"])
    for f in ("ckpt.pt", "samples_2.png", "nfe.png", "loss.png"):
        assert (out / f).exists(), f
    line = [r for r in common._read_metrics(out / "metrics.jsonl") if "step" in r][-1]
    assert line["nfe_forward"] == line["nfe_backward"] == 3 * 4 * 4  # 3 blocks, 4 rk4 steps of 4 stages
    assert line["bits_per_dim"] == pytest.approx(line["nll"] / (64 * math.log(2)))
    assert line["kinetic"] > 0 and line["jacobian"] >= 0
    assert line["loss"] == pytest.approx(line["nll"] + 0.01 * (line["kinetic"] + line["jacobian"]))
    monkeypatch.setattr(common, "_init_distributed", single_process_only)
    run_main("ffjord", ["--eval", str(out / "ckpt.pt"), "--batch-size", "150"])
    (ev,) = events(out, "eval")
    assert ev["n"] == 300 and (ev["solver"], ev["trace"], ev["probes"]) == ("dopri5", "hutchinson", 4)
    assert ev["bits_per_dim"] == pytest.approx(ev["nll"] / (64 * math.log(2)))
    run_main("ffjord", ["--sample", str(out / "ckpt.pt"), "--n-samples", "4"])
    samples = torch.load(out / "samples.pt", weights_only=True)
    assert samples.shape == (4, 1, 8, 8) and samples.dtype == torch.uint8 and int(samples.max()) <= 16


def test_cli_residual_2d_end_to_end_eval_and_sample(tmp_path, monkeypatch):
    """--arch residual on 8gaussians: training logs the NLL (no solver counts); --eval and
    --sample take the architecture from the checkpoint (no --arch repeated): the exact log-det,
    a density that integrates to about 1 on the grid, samples by the fixed-point inverse."""
    out = tmp_path / "run"
    run_main("ffjord", [*TINY_RESIDUAL, "--steps", "3", "--out", out, "--log-every", "1"])
    for f in ("ckpt.pt", "samples_3.png", "density.png", "trajectory.png", "metrics.jsonl", "loss.png"):
        assert (out / f).exists(), f
    lines = [r for r in common._read_metrics(out / "metrics.jsonl") if "step" in r]
    assert [r["step"] for r in lines] == [1, 2, 3] and all("nfe_forward" not in r for r in lines)
    assert all(r["loss"] == r["nll"] for r in lines)
    assert common.load_checkpoint(out / "ckpt.pt")["config"]["arch"] == "residual"
    monkeypatch.setattr(common, "_init_distributed", single_process_only)
    fields = run_main("ffjord", ["--eval", out / "ckpt.pt", "--out", out])
    (ev,) = events(out, "eval")
    assert ev["nll"] == fields["nll"] and ev["n"] == 10_000 and (ev["arch"], ev["logdet"]) == ("residual", "exact")
    assert ev["nll"] > ev["true_entropy"] - 5 * ev["true_entropy_se"]
    with np.load(out / "density.npz") as d:
        assert 0.95 < np.exp(d["log_density"]).sum() * (8 / 128) ** 2 < 1.001
    run_main("ffjord", ["--sample", out / "ckpt.pt", "--n-samples", "10", "--out", out / "s"])
    assert torch.load(out / "s" / "samples.pt", weights_only=True).shape == (10, 2)
    (ev,) = events(out / "s", "sample")
    assert ev["n"] == 10 and ev["arch"] == "residual" and (out / "s" / "trajectory.png").exists()


def test_cli_residual_digits_end_to_end_eval_and_sample(tmp_path, monkeypatch):
    """--arch residual on digits: bits/dim in training; --eval with the exact log-det on the 64
    dimensions (one dequantisation draw per image); samples are levels."""
    out = tmp_path / "digits"
    run_main("ffjord", [*TINY_RESIDUAL, "--dataset", "digits", "--steps", "2", "--out", out, "--log-every", "1"])
    line = [r for r in common._read_metrics(out / "metrics.jsonl") if "step" in r][-1]
    assert line["bits_per_dim"] == pytest.approx(line["nll"] / (64 * math.log(2)), rel=1e-6)
    monkeypatch.setattr(common, "_init_distributed", single_process_only)
    run_main("ffjord", ["--eval", out / "ckpt.pt", "--batch-size", "150"])
    (ev,) = events(out, "eval")
    assert ev["n"] == 300 and ev["logdet"] == "exact" and ev["bits_per_dim"] == pytest.approx(
        ev["nll"] / (64 * math.log(2)))
    run_main("ffjord", ["--sample", out / "ckpt.pt", "--n-samples", "4"])
    samples = torch.load(out / "samples.pt", weights_only=True)
    assert samples.shape == (4, 1, 8, 8) and samples.dtype == torch.uint8 and int(samples.max()) <= 16


def params(path):
    return common.load_checkpoint(path)["model"]


@pytest.mark.parametrize("argv", [
    [*TINY_2D, "--adjoint", "--trace", "hutchinson", "--kinetic", "0.1"],  # noise from the restored generators
    [*TINY_DIGITS, "--flip"],
    [*TINY_RESIDUAL, "--neumann-grad"],  # the roulette's draws and the power-iteration buffers restored
    [*TINY_RESIDUAL, "--dataset", "digits", "--logdet", "series", "--n-terms", "3"],
])
def test_resume_equals_uninterrupted_run(tmp_path, argv):
    a, b = tmp_path / "a", tmp_path / "b"
    argv = argv + ["--save-every", "2"]  # pictures in the middle of the run must not change it
    run_main("ffjord", argv + ["--steps", "4", "--out", str(a)])
    run_main("ffjord", argv + ["--steps", "2", "--out", str(b)])
    run_main("ffjord", argv + ["--steps", "4", "--out", str(b), "--resume"])
    pa, pb = params(a / "ckpt.pt"), params(b / "ckpt.pt")
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def test_the_step_cap_stops_training_with_one_line_naming_the_step(tmp_path, capsys):
    """--max-steps is the guard against the NFE blowing up: the solve that exceeds it stops the
    run with one line naming the step and the cures, and the last checkpoint stays."""
    run_main("ffjord", [*TINY_2D, "--steps", "2", "--out", str(tmp_path)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main("ffjord", [*TINY_2D, "--steps", "4", "--out", str(tmp_path), "--resume", "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err, err
    assert "at step 3" in err and "max_steps=1" in err and "last checkpoint" in err
    assert common.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2
    for command in ("--eval", "--sample"):  # the same cap in evaluation, with the evaluation's flags
        with pytest.raises(SystemExit) as e:
            run_main("ffjord", [command, str(tmp_path / "ckpt.pt"), "--max-steps", "1", "--out", str(tmp_path / "e")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and f"{command} failed" in err and "--eval-atol" in err, err


@pytest.mark.parametrize("argv, words", [
    (["--compile"], "--compile is not available"),
    (["--amp"], "--amp is not available"),
    (["--atol", "0"], "--atol 0.0 is out of range"),
    (["--eval-probes", "0"], "--eval-probes 0 is out of range"),
    (["--time-length", "-1"], "--time-length -1.0 is out of range"),
    (["--alpha", "0.5"], "--alpha 0.5 is out of range"),
    (["--dataset", "digits", "--n-scales", "5"], "--n-scales 5 does not fit 8x8 images"),
    (["--solver", "euler"], "invalid choice"),
    (["--arch", "residual", "--adjoint", "--kinetic", "0.1"], "--adjoint, --kinetic: not used by --arch residual"),
    (["--arch", "residual", "--solver", "rk4"], "--solver rk4: not used by --arch residual"),
    (["--arch", "residual", "--noise", "gaussian"], "--noise gaussian: not used by --arch residual"),
    (["--neumann-grad"], "apply to --arch residual only"),
    (["--logdet", "series"], "apply to --arch residual only"),
    (["--arch", "residual", "--coeff", "1"], "--coeff 1.0 is out of range"),
    (["--arch", "residual", "--roulette-p", "0"], "--roulette-p 0.0 is out of range"),
    (["--arch", "flow"], "invalid choice"),
    (["--decay", "cosine", "--lr-drop", "5"], "--decay cosine and --lr-drop 5 are two schedules"),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        run_main("ffjord", argv + ["--steps", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and words in err, err
    if "--n-scales" not in argv:  # the flags alone are checked before anything is written
        assert not (tmp_path / "run").exists()


def test_torchrun_two_processes_equal_one_process(tmp_path):
    """DistributedDataParallel over 2 CPU processes (gloo) on halves of the same global batch
    gives the parameters of one process on the whole batch. With the fixed-step rk4 and the
    exact trace every example's solve is the same in both runs, and the adjoint's parameter
    gradients (returned by its backward solve) go through DDP's all-reduce like any others."""
    argv = [*TINY_2D[:-2], "--steps", "3", "--solver", "rk4", "--step-size", "0.1", "--adjoint"]
    r = torchrun("ffjord", [*argv, "--out", tmp_path / "ddp"])
    assert r.returncode == 0, r.stderr[-2000:]
    run_main("ffjord", [*argv, "--device", "cpu", "--out", tmp_path / "one"])
    pa, pb = params(tmp_path / "ddp" / "ckpt.pt"), params(tmp_path / "one" / "ckpt.pt")
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6)
    assert pa["body.0.net.layers.1.layer.weight"].abs().max() > 0  # trained: the last layer started at zero
