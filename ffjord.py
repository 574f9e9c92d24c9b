"""FFJORD and Residual Flows: free-form Jacobians with stochastic log-determinants.

Papers: Chen et al. 2018, Neural ODEs, arXiv 1806.07366 (adjoint, instantaneous change of
variables); Grathwohl et al. 2019, FFJORD, arXiv 1810.01367; Finlay et al. 2020, RNODE, arXiv
2002.02798; Behrmann et al. 2019, i-ResNet, arXiv 1811.00995; Chen et al. 2019, Residual Flows,
arXiv 1906.02735; Dormand & Prince 1980 with Hairer et al. 1993 Sec. II.4 (dopri5).

Implemented: --arch cnf (default): log p(x) = log N(z(T)) + int_0^T Tr(df/dz) dt with the ODE
solvers written out (rk4; dopri5 with error control, NFE counted, a step cap), the exact trace
or Hutchinson's with noise fixed per solve, the adjoint or backpropagation, RNODE's penalties,
concatsquash dynamics (2D) and the multiscale model (images). --arch residual: blocks x + g(x),
Lip(g) < 1 by spectral normalisation, the log-det by the truncated series or the Russian
roulette, the Neumann gradient, exact slogdet for scoring, inverse by fixed-point iteration
(2D points and flattened images). Images: uniform dequantisation + logit, bits/dim.
Not implemented: the learned end time T, Adams/BDF solvers, bottleneck dynamics, tabular and
VAE experiments; Residual Flows' convolutional multiscale nets, ActNorm, induced mixed norms.
Presets (each value's source is cited at PRESETS): mnist and cifar10 follow FFJORD App. B.1 and
the official train_cnf.py, except T (fixed here, learned there) and where the paper and the code
differ (batch 900 and the drop to 1e-4 from the paper; warm-up and flips from the code); digits
is RNODE's MNIST recipe (rk4, lambda 0.01) with a smaller network and batch for a CPU.

Run it
    python ffjord.py                                    # CNF on 8gaussians: density, trajectories, NFE
    python ffjord.py --eval runs/ffjord-8gaussians/ckpt.pt  # exact NLL (nats) beside the true entropy
    python ffjord.py --arch residual --dataset digits   # Residual Flow; --sample CKPT draws samples

Paper -> code
    Chen'18 Sec. 2    z(t1) = ODESolve(z(t0), f, t0, t1)               odeint, rk4, dopri5
    Chen'18 Alg. 1    da/dt = -a^T df/dz, dg/dt = -a^T df/dtheta       AdjointSolve, integrate
    Chen'18 Thm. 1    d log p(z(t))/dt = -Tr(df/dz)                    augmented_dynamics, CNF
    FFJORD Sec. 3.1   Tr(A) = E[e^T A e], e fixed for a solve          trace_hutchinson, hutchinson_noise
    FFJORD App. B.1   N CNFs, squeeze, N CNFs, factor out half         Multiscale, squeeze
    (official code)   logit(alpha + (1 - 2 alpha) (x + u) / K)         dequantize, LogitPreprocess, nll
    RNODE             int ||f||^2 / 2D dt, int ||df/dz||_F^2 / D dt    kinetic_energy, rnode_loss
    Hairer II.4       max over y of ||err / (atol + rtol |y|)||_RMS    _error_ratio, dopri5
    i-ResNet          W~ = W / max(1, sigma / c), sigma = u^T W v      SpectralNormLinear
    ResFlow           LipSwish(x) = x sigmoid(beta x) / 1.1            LipSwish
    i-ResNet          log det(I + J) = sum_k (-1)^(k+1) tr(J^k) / k    log_det_power_series
    ResFlow Thm. 1    sum_{k<=N} (-1)^(k+1) v^T J^k v / (k P(N >= k))  roulette_weights, sample_n_terms
    ResFlow           E[(sum_k (-1)^k v^T J^k / P(N >= k)) dJ v]       log_det_power_series(neumann)
    i-ResNet Alg. 1   x <- y - g(x)                                    fixed_point_inverse
    (exact scoring)   log |det(I + J_g)| by slogdet                    log_det_exact
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Batches, Logger, RunConfig, Training, UserError, check_range, density_on_grid, dispatch,
                    entropy_estimate, flag, get_device, load_checkpoint, load_dataset, load_weights, output_dir,
                    parse_config, report_files, save_density, save_image_grid, save_scatter, saved_config,
                    seed_everything, user_errors, wrap_ddp)
from common import fid_evaluate  # --eval CKPT --fid N

LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------
# ODE solvers: fixed-step RK4 and adaptive Dormand-Prince 5(4)
# ----------------------------------------------------------------------------------------
# The state of an ODE here is a tuple of tensors (for a CNF: z, the log-density change and the
# regularisers' running integrals); f(t, y) returns a tuple of the same shapes, t a float.

@dataclasses.dataclass
class SolveOptions:
    """How one CNF solve is run: the solver and its tolerances, the cap on its steps, adjoint
    or backpropagation for the gradient, the trace (exact or Hutchinson) and its noise, and
    whether the RNODE regularisers are integrated along."""
    method: str = "dopri5"      # "dopri5" (adaptive) or "rk4" (fixed step)
    atol: float = 1e-5          # dopri5 tolerances (official FFJORD code: 1e-5 and 1e-5)
    rtol: float = 1e-5
    step_size: float = 0.05     # rk4: step (rounded down so that it divides T)
    max_steps: int = 1000       # per solve; beyond it a ValueError (the NFE blow-up guard)
    adjoint: bool = False       # gradients by the adjoint method (Chen et al. Alg. 1), else backprop
    trace: str = "exact"        # "exact" (one autograd pass per dimension) or "hutchinson"
    noise: str = "rademacher"   # Hutchinson noise: "rademacher" or "gaussian"
    probes: int = 1             # Hutchinson probes averaged at every evaluation (more for --eval)
    regularize: bool = False    # integrate RNODE's kinetic energy and Jacobian Frobenius norm

    def __post_init__(self):
        if self.method not in ("dopri5", "rk4"):
            raise ValueError(f"solver {self.method!r} is not known; accepted: dopri5, rk4")
        if not (self.atol > 0 and self.rtol >= 0):
            raise ValueError(f"tolerances atol={self.atol}, rtol={self.rtol} are out of range; "
                             f"atol must be > 0 and rtol >= 0")
        if not self.step_size > 0:
            raise ValueError(f"step_size {self.step_size} is out of range; it takes a positive number")
        if self.max_steps < 1:
            raise ValueError(f"max_steps {self.max_steps} is out of range; it takes an integer >= 1")
        if self.trace not in ("exact", "hutchinson"):
            raise ValueError(f"trace {self.trace!r} is not known; accepted: exact, hutchinson")
        if self.noise not in ("rademacher", "gaussian"):
            raise ValueError(f"noise {self.noise!r} is not known; accepted: rademacher, gaussian")
        if self.probes < 1:
            raise ValueError(f"probes {self.probes} is out of range; it takes an integer >= 1")


@dataclasses.dataclass
class SolveStats:
    """Counts over every solve given this object: the NFE of the forward solves, and of the
    backward pass (the adjoint's backward solve, known after loss.backward(); or the
    evaluations kept in the graph by backpropagation); accepted and rejected forward steps."""
    nfe_forward: int = 0    # dopri5: 2 to choose the first step, then 6 per attempted step; rk4: 4 per step
    nfe_backward: int = 0   # backprop: 6 per accepted dopri5 step, 4 per rk4 step
    steps: int = 0
    rejected: int = 0


def _combine(y, h, ks, coeffs):
    """y + h * sum_j coeffs_j k_j, on tuples of tensors (zero coefficients skipped)."""
    out = []
    for i, yi in enumerate(y):
        for c, k in zip(coeffs, ks):
            if c:
                yi = yi + (h * c) * k[i]
        out.append(yi)
    return tuple(out)


def rk4(f, y0, t0, t1, step_size, max_steps=10**9):
    """The classical fourth-order Runge-Kutta method (Kutta 1901) with n = ceil(|t1 - t0| / step_size)
    equal steps:

        k1 = f(t, y), k2 = f(t + h/2, y + h/2 k1), k3 = f(t + h/2, y + h/2 k2), k4 = f(t + h, y + h k3),
        y <- y + h/6 (k1 + 2 k2 + 2 k3 + k4).

    The global error is O(h^4): halving h divides it by about 16. Returns (y1, info)."""
    length = abs(t1 - t0)
    n = math.ceil(length / step_size * (1 - 1e-12)) if length > 0 else 0  # guard 0.5/0.05 = 10.000000000000002
    if n > max_steps:
        raise ValueError(f"rk4 with step {step_size} needs {n} steps between t={t0} and t={t1}, more than "
                         f"max_steps={max_steps}; take a larger step or raise max_steps")
    h = (t1 - t0) / n if n else 0.0
    y = y0
    for i in range(n):
        t = t0 + i * h
        k1 = f(t, y)
        k2 = f(t + h / 2, _combine(y, h, [k1], [0.5]))
        k3 = f(t + h / 2, _combine(y, h, [k2], [0.5]))
        k4 = f(t + h, _combine(y, h, [k3], [1.0]))
        y = _combine(y, h, [k1, k2, k3, k4], [1 / 6, 1 / 3, 1 / 3, 1 / 6])
    return y, {"nfe": 4 * n, "nfe_graph": 4 * n, "steps": n, "rejected": 0}


# Dormand & Prince 1980 (Hairer et al. Sec. II.5): nodes c, stages a, the 5th-order weights b
# that advance the solution (local extrapolation) and e = b - b*, b* the embedded 4th-order
# weights, over the 7 stages; the 7th stage f(t + h, y_new) is the next step's first (FSAL).
DOPRI5_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
DOPRI5_A = ((),
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656))
DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
DOPRI5_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0  # step-size controller (Hairer et al. Sec. II.4)


def _rms(v):
    return v.pow(2).mean().sqrt() if v.numel() else v.new_zeros(())


@torch.no_grad()
def _error_ratio(err, y, y_new, atol, rtol, mask):
    """Hairer et al. Sec. II.4: ||err / (atol + rtol max(|y|, |y_new|))|| in the RMS norm; a
    tuple state takes the largest of its components' norms (the components with mask False, pure
    quadratures such as the regularisers, do not steer the step). A ratio <= 1 meets the
    tolerance."""
    ratios = [_rms(e / (atol + rtol * torch.maximum(a.abs(), b.abs())))
              for e, a, b, m in zip(err, y, y_new, mask) if m]
    return torch.stack(ratios).max().item()


@torch.no_grad()
def _initial_step(f, t0, y0, f0, direction, length, atol, rtol, mask):
    """The starting step of Hairer et al. Sec. II.4: h0 from |y0| / |f0|, then an explicit Euler
    probe to estimate the second derivative, h1 = (0.01 / max(d1, d2))^(1/5). One evaluation."""
    def norm(v):
        return max(_rms(vi / (atol + rtol * yi.abs())).item() for vi, yi, m in zip(v, y0, mask) if m)
    d0, d1 = norm(y0), norm(f0)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, length)
    f1 = f(t0 + direction * h0, _combine(y0, direction * h0, [f0], [1.0]))
    d2 = norm(tuple(a - b for a, b in zip(f1, f0))) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1, length)


def dopri5(f, y0, t0, t1, rtol=1e-5, atol=1e-5, max_steps=1000, error_mask=None):
    """Adaptive Dormand-Prince 5(4) from t0 to t1 (t1 < t0 integrates backwards). Returns (y1, info).

    Each step evaluates the 7 stages (6 new evaluations thanks to FSAL), advances with the 5th-order
    solution and estimates the local error as h sum_j e_j k_j. A step is accepted when the error
    ratio r (`_error_ratio`) is below 1; the next step is h * min(10, max(0.2, 0.9 r^(-1/5)))
    (no growth right after a rejection). The same controller and starting step as
    scipy.integrate.solve_ivp(method="RK45"), so for one tensor the two take the same steps.

    The step sizes are plain floats, outside the autograd graph: backpropagating through the
    solver differentiates the discrete solution with the steps it took. Raises ValueError after
    `max_steps` attempted steps or when the step underflows: the dynamics have become too stiff
    for the tolerance (loosen atol/rtol, raise max_steps, or regularise, see the module doc); and
    at once when f(t0, y0) is not finite (no step size can help then)."""
    mask = tuple(error_mask) if error_mask is not None else (True,) * len(y0)
    info = {"nfe": 0, "nfe_graph": 0, "steps": 0, "rejected": 0}
    length, direction = abs(t1 - t0), (1.0 if t1 >= t0 else -1.0)
    if length == 0:
        return y0, info
    k1 = f(t0, y0)
    bad = [("nan" if torch.isnan(k).any() else "inf") for k, m in zip(k1, mask) if m and not torch.isfinite(k).all()]
    if bad:  # no step size helps (e.g. the parameters hold nan); later stages are checked by the error ratio
        raise ValueError(f"dopri5: the dynamics are {bad[0]} at the start t={t0}, so no step size can help; "
                         "check the network's parameters and the input")
    h_abs = _initial_step(f, t0, y0, k1, direction, length, atol, rtol, mask)
    info["nfe"] = 2
    t, y, rejected_last = t0, y0, False
    while direction * (t1 - t) > 0:
        if info["steps"] + info["rejected"] >= max_steps:
            raise ValueError(
                f"dopri5 took more than max_steps={max_steps} steps ({info['steps']} accepted, {info['rejected']} "
                f"rejected, NFE {info['nfe']}) and reached t={t:.6g} of [{t0}, {t1}] at atol={atol}, rtol={rtol}: "
                f"the dynamics have become hard to integrate; raise max_steps, loosen atol/rtol, use the RNODE "
                f"regularisers or the fixed-step rk4")
        if h_abs < 10 * abs(math.nextafter(t, direction * math.inf) - t):
            raise ValueError(f"dopri5 step size underflow at t={t:.6g} (atol={atol}, rtol={rtol}): the dynamics "
                             f"are stiff or not finite there")
        t_new = t + direction * h_abs
        if direction * (t_new - t1) > 0:
            t_new = t1
        h = t_new - t
        ks = [k1]
        for i in range(1, 6):
            ks.append(f(t + DOPRI5_C[i] * h, _combine(y, h, ks, DOPRI5_A[i])))
        y_new = _combine(y, h, ks, DOPRI5_B)
        ks.append(f(t + h, y_new))
        info["nfe"] += 6
        with torch.no_grad():
            err = tuple(sum(h * e * k[i] for e, k in zip(DOPRI5_E, ks) if e) for i in range(len(y)))
            ratio = _error_ratio(err, y, y_new, atol, rtol, mask)
        if ratio < 1:
            factor = MAX_FACTOR if ratio == 0 else min(MAX_FACTOR, SAFETY * ratio ** -0.2)
            h_abs = abs(h) * (min(1.0, factor) if rejected_last else factor)
            t, y, k1, rejected_last = t_new, y_new, ks[6], False
            info["steps"] += 1
        else:  # rejected (a non-finite error counts as a failure: shrink as much as allowed)
            factor = SAFETY * ratio ** -0.2 if math.isfinite(ratio) else MIN_FACTOR
            h_abs = abs(h) * max(MIN_FACTOR, factor)
            rejected_last = True
            info["rejected"] += 1
    info["nfe_graph"] = 6 * info["steps"]  # f0, then per accepted step k2..k6 and the FSAL stage
    return y, info


def odeint(f, y0, t0, t1, opts, error_mask=None):
    """z(t1) = ODESolve(z(t0), f, t0, t1) (Chen et al. Sec. 2) with the solver of `opts`.
    y0 a tuple of tensors; returns (y1, info) with info = {nfe, nfe_graph, steps, rejected}."""
    if opts.method == "rk4":
        return rk4(f, y0, t0, t1, opts.step_size, opts.max_steps)
    return dopri5(f, y0, t0, t1, rtol=opts.rtol, atol=opts.atol, max_steps=opts.max_steps, error_mask=error_mask)


# ----------------------------------------------------------------------------------------
# The adjoint method (Chen et al. 2018, Sec. 2, Algorithm 1)
# ----------------------------------------------------------------------------------------

class AdjointSolve(torch.autograd.Function):
    """y1 = ODESolve(y0, f, t0, t1) whose backward pass is Chen et al.'s Algorithm 1.

    The forward solve keeps no graph (memory independent of the NFE). The backward pass solves
    the augmented system from t1 back to t0, starting from [y(t1), a(t1) = dL/dy(t1), 0]:

        dy/dt = f(y, t),   da/dt = -a^T df/dy   (Eq. 4),   dg/dt = -a^T df/dtheta,
        so a(t0) = dL/dy(t0) and g(t0) = -int_t1^t0 a^T df/dtheta dt = dL/dtheta   (Eq. 5),

    re-creating y(t) backwards instead of storing it. a^T df/dy and a^T df/dtheta are one
    vector-Jacobian product per evaluation. The parameter gradients g are pure quadratures and
    do not steer the backward steps (Kidger et al. 2021's seminorm); y and a do.
    Inputs: f, t0, t1, opts, stats, error_mask, n (the number of state tensors), *y0, *params."""

    @staticmethod
    def forward(ctx, f, t0, t1, opts, stats, error_mask, n, *y0_and_params):
        """Solve forwards without a graph, keeping y(t1) and the parameters for the backward solve."""
        y0, params = y0_and_params[:n], y0_and_params[n:]
        y1, info = odeint(f, y0, t0, t1, opts, error_mask)  # autograd is off inside Function.forward
        if stats is not None:
            stats.nfe_forward += info["nfe"]
            stats.steps += info["steps"]
            stats.rejected += info["rejected"]
        ctx.f, ctx.t0, ctx.t1, ctx.opts, ctx.stats, ctx.n = f, t0, t1, opts, stats, n
        ctx.error_mask = tuple(error_mask) if error_mask is not None else (True,) * n
        ctx.save_for_backward(*y1, *params)
        return y1

    @staticmethod
    def backward(ctx, *a1):
        """Chen et al. Algorithm 1: solve [y, a, g] from t1 back to t0; return dL/dy0 and dL/dtheta."""
        n, f = ctx.n, ctx.f
        saved = ctx.saved_tensors
        y1, params = saved[:n], saved[n:]

        def adjoint_dynamics(t, s):
            """d/dt [y, a, g] = [f, -a^T df/dy, -a^T df/dtheta] (Chen et al. Eqs. 4-5)."""
            y, a = s[:n], s[n:2 * n]
            with torch.enable_grad():
                y = tuple(yi.detach().requires_grad_(True) for yi in y)
                fy = f(t, y)
                used = [i for i, fi in enumerate(fy) if fi.requires_grad]
                vjp = torch.autograd.grad([fy[i] for i in used], y + params, [-a[i] for i in used],
                                          allow_unused=True, materialize_grads=True)
            return tuple(fi.detach() for fi in fy) + tuple(v.detach() for v in vjp)

        s1 = tuple(y1) + tuple(a1) + tuple(torch.zeros_like(p) for p in params)
        mask = ctx.error_mask + (True,) * n + (False,) * len(params)
        with torch.no_grad():
            s0, info = odeint(adjoint_dynamics, s1, ctx.t1, ctx.t0, ctx.opts, mask)
        if ctx.stats is not None:
            ctx.stats.nfe_backward += info["nfe"]
        return (None,) * 7 + tuple(s0[n:2 * n]) + tuple(s0[2 * n:])


def integrate(f, y0, t0, t1, opts, stats=None, params=(), error_mask=None):
    """Solve from t0 to t1 and return y1 (a tuple), differentiably: by the adjoint method when
    opts.adjoint (params: the tensors f depends on that need gradients), else by
    backpropagation through the solver's operations. Adds the NFE to `stats`."""
    params = tuple(p for p in params if p.requires_grad)
    if opts.adjoint and torch.is_grad_enabled():
        return tuple(AdjointSolve.apply(f, t0, t1, opts, stats, error_mask, len(y0), *y0, *params))
    y1, info = odeint(f, y0, t0, t1, opts, error_mask)
    if stats is not None:
        stats.nfe_forward += info["nfe"]
        stats.steps += info["steps"]
        stats.rejected += info["rejected"]
        if torch.is_grad_enabled():
            stats.nfe_backward += info["nfe_graph"]
    return y1


# ----------------------------------------------------------------------------------------
# The instantaneous change of variables and the trace of the Jacobian
# ----------------------------------------------------------------------------------------

def trace_exact(f_z, z, create_graph=False):
    """Tr(df/dz) per example, exactly: one autograd pass per dimension d gives the row
    d f_d / d z for every example at once (examples are independent). D passes, O(D^2): what
    FFJORD Sec. 3.1 replaces by Hutchinson's estimator in high dimension; for 2D data, two passes.
    Also returns ||df/dz||_F^2 from the same rows (RNODE's Jacobian penalty, exactly).
    f_z, z: (B, ...); returns (trace (B,), frobenius^2 (B,))."""
    if not f_z.requires_grad:
        zero = f_z.new_zeros(f_z.shape[0])
        return zero, zero
    fz, B = f_z.reshape(f_z.shape[0], -1), f_z.shape[0]
    trace, frob = fz.new_zeros(B), fz.new_zeros(B)
    for d in range(fz.shape[1]):
        row = torch.autograd.grad(fz[:, d].sum(), z, create_graph=create_graph, retain_graph=True,
                                  materialize_grads=True)[0].reshape(B, -1)
        trace = trace + row[:, d]
        frob = frob + row.pow(2).sum(1)
    return trace, frob


def hutchinson_noise(z, kind="rademacher", probes=1, generator=None):
    """Noise e with E[e e^T] = I for Hutchinson's estimator, shaped (probes, *z.shape): Rademacher
    (+-1 with probability 1/2; the smaller variance, the official code's choice for images) or
    standard Gaussian. FFJORD Sec. 3.1: draw it once per solve and keep it for every evaluation
    of the dynamics, so the ODE being solved is one fixed smooth ODE (redrawing it inside a solve
    makes the adaptive solver's error estimates meaningless and its steps collapse)."""
    shape = (probes, *z.shape)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, device=z.device, dtype=z.dtype)
    if kind == "rademacher":
        return torch.randint(0, 2, shape, generator=generator, device=z.device).to(z.dtype) * 2 - 1
    raise ValueError(f"noise {kind!r} is not known; accepted: rademacher, gaussian")


def trace_hutchinson(f_z, z, e, create_graph=False):
    """FFJORD Sec. 3.1: Tr(df/dz) = E_e[e^T (df/dz) e], estimated with one vector-Jacobian
    product e^T (df/dz) per probe (cost O(D), the same as evaluating f), averaged over the
    probes e (probes, *z.shape). The same product gives ||e^T df/dz||^2, an unbiased estimate of
    ||df/dz||_F^2 = Tr(J J^T) (RNODE's Jacobian penalty at no extra cost).
    Returns (trace estimate (B,), frobenius^2 estimate (B,))."""
    if not f_z.requires_grad:
        zero = f_z.new_zeros(f_z.shape[0])
        return zero, zero
    B = f_z.shape[0]
    trace, frob = f_z.new_zeros(B), f_z.new_zeros(B)
    for ek in e:
        eJ = torch.autograd.grad(f_z, z, ek, create_graph=create_graph, retain_graph=True,
                                 materialize_grads=True)[0]  # e^T df/dz, shaped like z
        trace = trace + (eJ * ek).reshape(B, -1).sum(1)
        frob = frob + eJ.pow(2).reshape(B, -1).sum(1)
    return trace / len(e), frob / len(e)


def kinetic_energy(f_z):
    """RNODE's kinetic energy integrand in the normalisation of RNODE's official code (whose
    scripts use lambda_K = lambda_J = 0.01 with it): 0.5 ||f||^2 / D per example. (B, ...) -> (B,)."""
    return 0.5 * f_z.reshape(f_z.shape[0], -1).pow(2).mean(1)


def augmented_dynamics(net, noise=None, regularize=False):
    """The CNF's augmented system (Chen et al. Theorem 1; FFJORD Sec. 2):

        d/dt [z, Delta, R_K, R_J] = [f(z, t), -Tr(df/dz), 0.5 ||f||^2 / D, ||df/dz||_F^2 / D],

    Delta(t) = log p(z(t)) - log p(z(0)) the log-density change along the path, R_K and R_J
    RNODE's kinetic and Jacobian penalties (only when `regularize`; the official RNODE code's
    per-dimension normalisation). net(t, z) -> f, shaped like z. noise: None for the exact trace,
    else Hutchinson probes (probes, *z.shape) used at every evaluation of this solve.

    Returns f(t, state) for state = (z, Delta[, R_K, R_J]). It builds the graph of the trace
    (create_graph) only when called with gradients enabled (training by backpropagation, or the
    adjoint's backward pass), so evaluation under torch.no_grad stores nothing."""
    def dynamics(t, state):
        """d/dt (z, Delta[, R_K, R_J]) = (f, Tr(df/dz)[, kinetic, Jacobian]) at time t."""
        z = state[0]
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            f_z = net(t, z)
            if noise is None:
                trace, frob = trace_exact(f_z, z, create_graph)
            else:
                trace, frob = trace_hutchinson(f_z, z, noise, create_graph)
        out = (f_z, -trace)
        if regularize:
            out = out + (kinetic_energy(f_z), frob / z[0].numel())
        return out if create_graph else tuple(o.detach() for o in out)
    return dynamics


# Every flow here maps forward(x, opts) -> (z, log_det, reg), log_det = log |det dz/dx| per
# example and reg the RNODE integrals, and inverse(z, opts) -> x (as realnvp.py's layers, without
# reg). Data sit at t = 0 and the N(0, I) base at t = T (the official code's direction). The
# dynamics must treat examples independently (no batch norm inside f): only then is the trace of
# the batch's Jacobian the sum of the per-example traces.

def standard_normal_log_prob(z):
    """log N(z; 0, I) summed over all but the batch dimension: (B, ...) -> (B,). The base density."""
    return -0.5 * (z.pow(2) + LOG_2PI).flatten(1).sum(1)


class CNF(nn.Module):
    """One continuous normalizing flow block: dz/dt = net(t, z) for t in [0, T].

    forward: x = z(0) -> (z(T), log_det, reg) with log_det = log |det dz(T)/dx| = -Delta(T) =
    int_0^T Tr(df/dz) dt (FFJORD Sec. 2), per example, and reg (B, 2) the RNODE integrals
    [R_K, R_J] (zeros unless opts.regularize). inverse: z(T) -> z(0), integrating backwards
    (no trace needed). The Hutchinson noise is drawn here, once per solve."""

    def __init__(self, net, T=1.0):
        super().__init__()
        if not T > 0:
            raise ValueError(f"integration time T={T} is out of range; it takes a positive number")
        self.net, self.T = net, float(T)

    def forward(self, x, opts, stats=None, generator=None):
        """x (data side, t = 0) -> (z at t = T, log|det dz/dx| = int Tr df/dz dt (B,), penalties (B, 2))."""
        noise = hutchinson_noise(x, opts.noise, opts.probes, generator) if opts.trace == "hutchinson" else None
        zero = x.new_zeros(x.shape[0])
        state = (x, zero) + ((zero, zero) if opts.regularize else ())
        mask = (True, True) + ((False, False) if opts.regularize else ())  # the penalties are quadratures
        out = integrate(augmented_dynamics(self.net, noise, opts.regularize), state, 0.0, self.T, opts, stats,
                        tuple(self.net.parameters()), mask)
        reg = torch.stack(out[2:], 1) if opts.regularize else x.new_zeros(x.shape[0], 2)
        return out[0], -out[1], reg

    def inverse(self, z, opts, stats=None):
        """z (base side, t = T) -> x at t = 0: the same ODE integrated backwards."""
        dynamics = lambda t, s: (self.net(t, s[0]),)
        return integrate(dynamics, (z,), self.T, 0.0, opts, stats, tuple(self.net.parameters()))[0]

    @torch.inference_mode()
    def trajectory(self, z, n_times, opts):
        """The path of the points z = z(T) back to the data side z(0), at n_times equally spaced
        times T, ..., 0: (n_times, *z.shape). For the picture of the flow (base to data)."""
        if n_times < 2:
            raise ValueError(f"n_times {n_times} is out of range; it takes an integer >= 2")
        dynamics = lambda t, s: (self.net(t, s[0]),)
        ts = [self.T * (1 - i / (n_times - 1)) for i in range(n_times)]
        path = [z]
        for a, b in zip(ts[:-1], ts[1:]):
            path.append(odeint(dynamics, (path[-1],), a, b, opts)[0][0])
        return torch.stack(path)


class CNFStack(nn.ModuleList):
    """CNF blocks applied one after the other (the official code's num_blocks for 2D data):
    log-determinants and RNODE integrals add; the inverse runs the blocks backwards."""

    def forward(self, x, opts, stats=None, generator=None):
        log_det, reg = x.new_zeros(x.shape[0]), x.new_zeros(x.shape[0], 2)
        for block in self:
            x, ld, r = block(x, opts, stats, generator)
            log_det, reg = log_det + ld, reg + r
        return x, log_det, reg

    def inverse(self, z, opts, stats=None):
        for block in reversed(self):
            z = block.inverse(z, opts, stats)
        return z

    @torch.inference_mode()
    def trajectory(self, z, n_times, opts):
        """The path of z from the base through every block to the data side: (n_blocks (n_times
        - 1) + 1, *z.shape), the times of each block as in CNF.trajectory."""
        path = [z[None]]
        for block in reversed(self):
            path.append(block.trajectory(path[-1][-1], n_times, opts)[1:])
        return torch.cat(path)


# ----------------------------------------------------------------------------------------
# Images: dequantisation, logit preprocessing, squeeze, the multiscale architecture
# ----------------------------------------------------------------------------------------

def dequantize(x, u=None):
    """Uniform dequantisation (Theis et al. 2016; FFJORD's official code: (x + u) / 256): integer
    levels x in {0, ..., K-1}^D -> v = x + u, u ~ U[0, 1)^D, a point of the cube [x, x + 1) that
    level x owns. `u` may be given (tests pass one). Where x + u rounds up to x + 1 in floating
    point, v is a float just below x + 1 instead, so quantize(dequantize(x, u)) == x always."""
    x = x.to(torch.get_default_dtype()) if not x.is_floating_point() else x
    v = x + (torch.rand_like(x) if u is None else u.to(x))
    below = (x + 1) - (x + 1) * torch.finfo(x.dtype).eps  # one or two spacings below x + 1
    return torch.where(v < x + 1, v, below)


def quantize(v, levels):
    """Back to integer levels: floor(v) clipped to {0, ..., K-1} (the cube v lies in)."""
    return v.floor().clamp(0, levels - 1).to(torch.uint8 if levels <= 256 else torch.long)


class LogitPreprocess(nn.Module):
    """The logit preprocessing as a flow layer on the dequantised v in [0, K]^D:

        y = v / K,  p = alpha + (1 - 2 alpha) y,  w = logit(p) = log p - log(1 - p),
        log|det dw/dv| = sum_i [-log K + log(1 - 2 alpha) - log p_i - log(1 - p_i)].

    The squeeze into [alpha, 1 - alpha] keeps the logit finite at the borders (FFJORD's official
    code: alpha = 1e-6; RealNVP and realnvp.py: 0.05). The -log K term turns the density of y in
    [0,1]^D into one of v (see FFJORD.nll)."""

    def __init__(self, levels, alpha=1e-6):
        super().__init__()
        if not 0 <= alpha < 0.5:
            raise ValueError(f"alpha {alpha} is out of range; it takes a number in [0, 0.5)")
        self.levels, self.alpha = levels, alpha

    def forward(self, v):
        p = self.alpha + (1 - 2 * self.alpha) * (v / self.levels)
        w = torch.log(p) - torch.log1p(-p)
        log_det = math.log(1 - 2 * self.alpha) - math.log(self.levels) - torch.log(p) - torch.log1p(-p)
        return w, log_det.flatten(1).sum(1)

    def inverse(self, w):
        return self.levels * (torch.sigmoid(w) - self.alpha) / (1 - 2 * self.alpha)


def bits_per_dim(nats, dims):
    """Nats per example -> bits per dimension: nats / (dims ln 2)."""
    return nats / (dims * math.log(2))


def squeeze(x):
    """Every 2x2xC sub-square becomes 1x1x4C (Dinh et al. 2017, Sec. 3.6; FFJORD App. B.1):
    (B, C, H, W) -> (B, 4C, H/2, W/2); a permutation, so its log-determinant is 0."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(z):
    """The inverse of `squeeze`: (B, 4C, H, W) -> (B, C, 2H, 2W)."""
    b, c4, h, w = z.shape
    z = z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c4 // 4, 2 * h, 2 * w)


def default_n_scales(h, w):
    """The official code's number of scales: squeeze while both sides are >= 4
    (MNIST 28 -> 3 scales, CIFAR-10 32 -> 4, digits 8 -> 2)."""
    n = 0
    while h >= 4 and w >= 4:
        n, h, w = n + 1, h // 2, w // 2
    return n


class Multiscale(nn.Module):
    """The multiscale architecture of FFJORD App. B.1 (the official code's ODENVP).

    A scale that is not the last: n_blocks CNFs on (C, H, W), squeeze, n_blocks CNFs on
    (4C, H/2, W/2), then half of the channels are factored out (kept as latents) and the other
    half (2C, H/2, W/2) goes on to the next scale. The last scale: n_blocks CNFs, no squeeze.
    The paper: n_blocks = 2; 3 scales for MNIST, 4 for CIFAR-10. Latents are put back in the
    place of their pixels (unsqueeze), so z has the shape of x; log-determinants add.
    make_net(channels) -> the dynamics net(t, z) of one block."""

    def __init__(self, shape, n_scales, n_blocks, make_net, T=1.0):
        super().__init__()
        c, h, w = shape
        if n_scales < 1 or n_blocks < 1 or h % 2 ** (n_scales - 1) or w % 2 ** (n_scales - 1):
            raise ValueError(f"{n_scales} scales of {n_blocks} blocks do not fit {c}x{h}x{w} images; n_scales and "
                             f"n_blocks take integers >= 1, with H and W divisible by 2^(n_scales - 1)")
        self.last = n_scales == 1
        self.pre = nn.ModuleList(CNF(make_net(c), T) for _ in range(n_blocks))
        if not self.last:
            self.post = nn.ModuleList(CNF(make_net(4 * c), T) for _ in range(n_blocks))
            self.next = Multiscale((2 * c, h // 2, w // 2), n_scales - 1, n_blocks, make_net, T)

    def forward(self, x, opts, stats=None, generator=None):
        """x (B, C, H, W) -> (z, log|det dz/dx| (B,), penalties (B, 2)): blocks, squeeze, blocks,
        half the variables factored out, the other half to the next scale."""
        log_det, reg = x.new_zeros(x.shape[0]), x.new_zeros(x.shape[0], 2)
        blocks = list(self.pre) if self.last else list(self.pre) + [squeeze] + list(self.post)
        for block in blocks:
            if block is squeeze:
                x = squeeze(x)
                continue
            x, ld, r = block(x, opts, stats, generator)
            log_det, reg = log_det + ld, reg + r
        if self.last:
            return x, log_det, reg
        z_out, h = x.chunk(2, dim=1)  # factor out half of the variables
        z_rest, ld, r = self.next(h, opts, stats, generator)
        return unsqueeze(torch.cat([z_out, z_rest], 1)), log_det + ld, reg + r

    def inverse(self, z, opts, stats=None):
        """z -> x: the scales undone from the last to the first."""
        if not self.last:
            z_out, z_rest = squeeze(z).chunk(2, dim=1)
            z = torch.cat([z_out, self.next.inverse(z_rest, opts, stats)], 1)
            for block in reversed(self.post):
                z = block.inverse(z, opts, stats)
            z = unsqueeze(z)
        for block in reversed(self.pre):
            z = block.inverse(z, opts, stats)
        return z


# ----------------------------------------------------------------------------------------
# The model: log-likelihood, bits/dim, sampling
# ----------------------------------------------------------------------------------------

class FFJORD(nn.Module):
    """A continuous normalizing flow with a standard normal base: `body` (a CNFStack of CNF
    blocks, or Multiscale for images) after the optional logit preprocessing (images: levels K,
    alpha). x is continuous: points, or dequantised images v = x + u in [0, K]^D. Its forward is
    the flow x -> (z, log|det dz/dx|, reg), which `log_prob` and `nll` call, so a wrapper (DDP)
    around it sees every solve; `sample` runs it backwards from the base."""

    def __init__(self, body, event_shape, levels=None, alpha=1e-6):
        super().__init__()
        self.body, self.event_shape, self.levels = body, tuple(event_shape), levels
        self.pre = LogitPreprocess(levels, alpha) if levels else None
        self.register_buffer("_anchor", torch.zeros(()))  # the model's device and dtype

    def forward(self, x, opts, stats=None, generator=None):
        """x (B, *event_shape) -> (z, log|det dz/dx| (B,), reg (B, 2)), preprocessing included."""
        log_det = x.new_zeros(x.shape[0])
        if self.pre is not None:
            x, log_det = self.pre(x)
        z, ld, reg = self.body(x, opts, stats, generator)
        return z, log_det + ld, reg

    @torch.inference_mode()
    def sample(self, n, opts, generator=None, stats=None):
        """n samples on the model's device: z ~ N(0, I), integrated backwards from T to 0 through
        every block (FFJORD Sec. 2: sampling needs no trace). Images come back as integer levels."""
        z = torch.randn(n, *self.event_shape, generator=generator, device=self._anchor.device,
                        dtype=self._anchor.dtype)
        x = self.body.inverse(z, opts, stats)
        return quantize(self.pre.inverse(x), self.levels) if self.pre is not None else x


def log_prob(flow, x, opts, stats=None, generator=None):
    """log p(x) = log N(z(T); 0, I) + int_0^T Tr(df/dz) dt (+ the preprocessing's log-det), per
    example in nats (B,) (Chen et al. Theorem 1 integrated, FFJORD Sec. 2), and the RNODE
    integrals reg (B, 2) = [R_K, R_J] summed over blocks. `flow` is any callable
    x, opts, stats, generator -> (z, log_det, reg) (an FFJORD, or it wrapped for DDP).
    Exact with opts.trace == "exact"; with Hutchinson an unbiased estimate of log p(x) (the
    trace enters linearly; averaging over opts.probes reduces its variance). Without gradients
    call it under torch.no_grad, not inference_mode: the trace needs autograd inside."""
    z, log_det, reg = flow(x, opts, stats, generator)
    return standard_normal_log_prob(z) + log_det, reg


def nll(flow, x, opts, stats=None, generator=None, discrete=False, u=None):
    """Negative log-likelihood per example in nats (B,), and reg (B, 2); training minimises its mean.

    Points: -log p(x). Images (discrete=True): x holds integer levels and the flow is a density
    of v = x + u in [0, K]^D; one draw of u gives an unbiased estimate of the bound
    -E_u[log p(x + u)] >= -log P(x) (Theis et al. 2016, Sec. 3.1; derived in realnvp.py), the
    number FFJORD's code reports as bits/dim. Integer x takes u's dtype, else the default one."""
    if discrete:
        if not x.is_floating_point():
            x = x.to(u.dtype if u is not None else torch.get_default_dtype())
        x = dequantize(x, u)
    log_p, reg = log_prob(flow, x, opts, stats, generator)
    return -log_p, reg


def rnode_loss(nats, reg, lambda_k=0.0, lambda_j=0.0):
    """The training objective: the mean NLL plus RNODE's penalties (Finlay et al. 2020),
    mean over the batch of nll + lambda_K int 0.5 ||f||^2 / D dt + lambda_J int ||df/dz||_F^2 / D dt
    (reg from `nll` with opts.regularize; both zero weights give plain maximum likelihood)."""
    loss = nats.mean()
    if lambda_k:
        loss = loss + lambda_k * reg[:, 0].mean()
    if lambda_j:
        loss = loss + lambda_j * reg[:, 1].mean()
    return loss


# ----------------------------------------------------------------------------------------
# Residual Flows (Behrmann et al. 2019, arXiv 1811.00995; Chen et al. 2019, arXiv 1906.02735)
# ----------------------------------------------------------------------------------------
# An invertible residual network: blocks f(x) = x + g(x) with Lip(g) < 1 are invertible (Banach's
# fixed-point theorem; Behrmann et al.), and log p(x) = log N(F(x); 0, I) + sum over blocks
# of log det(I + J_g). A ResidualFlow maps x -> (z, log_det, reg) like a CNFStack (reg is zero), so
# FFJORD, log_prob and nll above serve both families; opts is a LogDetOptions here.

@dataclasses.dataclass
class LogDetOptions:
    """How the residual blocks compute log det(I + J_g): "roulette" (the unbiased Russian-roulette
    estimator, Chen et al. 2019, Theorem 1), "series" (the power series truncated after n_terms,
    Behrmann et al.: biased) or "exact" (slogdet of the autograd Jacobian, D passes). The
    fixed-point inverse stops when an update moves no coordinate more than fp_atol + fp_rtol |y|."""
    method: str = "roulette"
    n_terms: int = 10           # series: terms kept
    n_exact: int = 2            # roulette: terms always computed; N = n_exact + Geometric(p)
    p: float = 0.5              # roulette: P(N >= k) = (1 - p)^(k - n_exact) for k > n_exact
    probes: int = 1             # Hutchinson probes averaged
    neumann: bool = False       # gradients by Chen et al.'s Neumann gradient series
    fp_atol: float = 1e-6
    fp_rtol: float = 1e-5
    fp_max_iter: int = 1000

    def __post_init__(self):
        if self.method not in ("roulette", "series", "exact"):
            raise ValueError(f"log-det method {self.method!r} is not known; accepted: roulette, series, exact")
        if self.n_terms < 1 or self.n_exact < 0 or self.probes < 1 or self.fp_max_iter < 1:
            raise ValueError(f"n_terms {self.n_terms}, n_exact {self.n_exact}, probes {self.probes}, fp_max_iter "
                             f"{self.fp_max_iter} are out of range; they take n_terms, probes, fp_max_iter >= 1 "
                             f"and n_exact >= 0")
        if not 0 < self.p < 1:
            raise ValueError(f"roulette p {self.p} is out of range; it takes a number in (0, 1)")


class SpectralNormLinear(nn.Module):
    """A linear layer with spectral norm at most c (Behrmann et al., after Miyato et al.
    2018): W~ = W / max(1, sigma / c), sigma = u^T W v estimated by power iteration,
    v <- W^T u / |W^T u|, u <- W v / |W v|. The vectors are buffers, advanced by
    `power_iteration` (ResidualBlock does n_power_iterations steps at every training forward), so
    the estimate tracks W as it learns and evaluation and sampling see one fixed function."""

    def __init__(self, d_in, d_out, coeff=0.97, n_power_iterations=1):
        super().__init__()
        if not 0 < coeff < 1:
            raise ValueError(f"coeff {coeff} is out of range; it takes a number in (0, 1)")
        self.coeff, self.n_power_iterations = coeff, n_power_iterations
        layer = nn.Linear(d_in, d_out)  # nn.Linear's initialisation
        self.weight, self.bias = layer.weight, layer.bias
        self.register_buffer("u", F.normalize(torch.randn(d_out), dim=0))
        self.register_buffer("v", F.normalize(torch.randn(d_in), dim=0))

    @torch.no_grad()
    def power_iteration(self, n):
        """n steps of the power iteration on W^T W, stored in the buffers u and v."""
        w = self.weight.detach()
        u, v = self.u, self.v
        for _ in range(n):
            v = F.normalize(w.T @ u, dim=0)
            u = F.normalize(w @ v, dim=0)
        self.u.copy_(u)
        self.v.copy_(v)

    def normalized_weight(self):
        """W~ = W / max(1, sigma / c); the gradient flows through W and sigma, not through u, v."""
        sigma = self.u @ self.weight @ self.v
        return self.weight / torch.clamp(sigma / self.coeff, min=1.0)

    def forward(self, x):
        return F.linear(x, self.normalized_weight(), self.bias)


class LipSwish(nn.Module):
    """Chen et al. 2019's LipSwish(x) = x sigmoid(beta x) / 1.1, beta = softplus(b) > 0
    learned. Swish's slope never exceeds 1.0998 whatever beta, so Lip(LipSwish) <= 1."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.tensor(math.log(math.e - 1)))  # beta = softplus(b) = 1 at the start

    def forward(self, x):
        return x * torch.sigmoid(F.softplus(self.b) * x) / 1.1


def _vjp(g_x, x, u, create_graph):
    """u^T J_g for every example at once (examples are independent): (B, D)."""
    return torch.autograd.grad(g_x, x, u, create_graph=create_graph, retain_graph=True, materialize_grads=True)[0]


def log_det_exact(g_x, x, create_graph=False):
    """log |det(I + J_g)| per example from the full Jacobian (one autograd pass per dimension,
    as trace_exact) and torch.linalg.slogdet: exact, O(D) passes, for 2D points and small images.
    g_x, x (B, D) -> (B,)."""
    B, D = x.shape
    rows = [_vjp(g_x, x, torch.nn.functional.one_hot(torch.full((B,), d, device=x.device), D).to(x), create_graph)
            for d in range(D)]
    jac = torch.stack(rows, 1)  # (B, D, D): row d is d g_d / d x
    return torch.linalg.slogdet(torch.eye(D, dtype=x.dtype, device=x.device) + jac)[1]


def roulette_weights(n, n_exact, p):
    """1 / P(N >= k) for k = 1..n, N = n_exact + G, P(G >= m) = (1 - p)^m (Chen et al. 2019, Thm. 1)."""
    return [(1 - p) ** -max(0, k - n_exact) for k in range(1, n + 1)]


def sample_n_terms(n_exact, p, generator=None):
    """N = n_exact + G, G ~ Geometric(p) on {0, 1, ...} by inversion: G = floor(log U / log(1 - p))
    has P(G >= m) = P(U <= (1 - p)^m) = (1 - p)^m. One draw serves a whole batch (Chen et al.'s code)."""
    device = generator.device if generator is not None else "cpu"
    u = torch.rand((), generator=generator, device=device, dtype=torch.float64).item()
    return n_exact + math.floor(math.log(max(u, 1e-300)) / math.log(1 - p))


def log_det_power_series(g_x, x, v, weights, neumann=False):
    """log det(I + J_g) = sum_k (-1)^(k+1) tr(J_g^k) / k (Behrmann et al., converges for
    Lip(g) < 1), estimated per example as

        sum_{k=1}^{n} (-1)^(k+1) / k * w_k * v^T J^k v,      n = len(weights),

    with Hutchinson probes v (probes, B, D), E[v v^T] = I, averaged: w_k = 1 is the truncated series
    (Behrmann et al.), w_k = 1 / P(N >= k) with n = N random the Russian-roulette estimator,
    unbiased for the infinite series (Chen et al. 2019, Thm. 1). v^T J^k is k vector-Jacobian products.
    Gradients (when enabled): by backpropagation through those products, or with `neumann` by
    Chen et al.'s Neumann gradient series, d log det / d theta = E[(sum_{k=0}^{n} (-1)^k w_k v^T J^k) (dJ/dtheta) v]
    (w_0 = 1): the bracket is built without a graph and one more product carries the gradient, so
    memory does not grow with n. g_x, x (B, D) -> (B,)."""
    grad = torch.is_grad_enabled()
    value = x.new_zeros(x.shape[0])
    w = v.clone() if neumann else None  # sum_k (-1)^k w_k v^T J^k, from k = 0
    for vi in range(v.shape[0]):
        u = v[vi]
        for k, wk in enumerate(weights, start=1):
            u = _vjp(g_x, x, u, create_graph=grad and not neumann)  # v^T J^k
            value = value + ((-1) ** (k + 1) / k * wk) * (u * v[vi]).sum(1) / v.shape[0]
            if neumann:
                w[vi] = w[vi] + ((-1) ** k * wk) * u.detach()
    if neumann and grad:
        surrogate = sum((_vjp(g_x, x, w[vi], create_graph=True) * v[vi]).sum(1) for vi in range(v.shape[0]))
        surrogate = surrogate / v.shape[0]  # its gradient is the series'; its value is not used
        value = value.detach() + surrogate - surrogate.detach()
    return value


def residual_log_det(g_x, x, opts, generator=None):
    """log det(I + J_g) per example by the method of `opts` (a LogDetOptions); x (B, D) requires grad."""
    if opts.method == "exact":
        return log_det_exact(g_x, x, create_graph=torch.is_grad_enabled())
    if opts.method == "series":
        weights = [1.0] * opts.n_terms
    else:
        weights = roulette_weights(sample_n_terms(opts.n_exact, opts.p, generator), opts.n_exact, opts.p)
    v = hutchinson_noise(x, "rademacher", opts.probes, generator)
    return log_det_power_series(g_x, x, v, weights, opts.neumann)


def fixed_point_inverse(g, y, atol=1e-6, rtol=1e-5, max_iter=1000):
    """x with x + g(x) = y by the iteration x <- y - g(x) from x = y (Behrmann et al. Alg. 1): a
    contraction when Lip(g) < 1, so it converges geometrically; after an update of size d the
    remaining error is at most d Lip(g) / (1 - Lip(g)). Raises ValueError after max_iter updates."""
    x = y
    for _ in range(max_iter):
        x_new = y - g(x)
        done = ((x_new - x).abs() <= atol + rtol * y.abs()).all()
        x = x_new
        if done:
            return x
    raise ValueError(f"the fixed-point inverse did not converge in {max_iter} iterations (atol={atol}, rtol={rtol}): "
                     f"Lip(g) is close to 1; lower the coefficient of the spectral normalisation")


class ResidualBlock(nn.Module):
    """f(x) = x + g(x), g = SN-Linear, LipSwish, ..., SN-Linear on flat vectors (B, D): each
    linear map has spectral norm <= c and LipSwish is 1-Lipschitz, so Lip(g) <= c < 1 (Behrmann
    et al.; Chen et al.). forward: x -> (f(x), log det(I + J_g(x))); inverse by
    fixed-point iteration."""

    def __init__(self, dim, hidden=64, n_hidden=2, coeff=0.97, n_power_iterations=1):
        super().__init__()
        dims = [dim] + [hidden] * n_hidden + [dim]
        self.linears = nn.ModuleList(SpectralNormLinear(a, b, coeff, n_power_iterations)
                                     for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(LipSwish() for _ in range(n_hidden))

    def g(self, x):
        h = x
        for linear, act in zip(self.linears[:-1], self.acts):
            h = act(linear(h))
        return self.linears[-1](h)

    def forward(self, x, opts, generator=None):
        """x (B, D) -> (x + g(x), log det(I + J_g(x)) (B,)), with a graph only when gradients are on."""
        grad = torch.is_grad_enabled()
        if grad and self.training:  # a training step: the spectral norms' estimates follow W
            for linear in self.linears:
                linear.power_iteration(linear.n_power_iterations)
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            g_x = self.g(x)
            log_det = residual_log_det(g_x, x, opts, generator)
        y = x + g_x
        return (y, log_det) if grad else (y.detach(), log_det.detach())

    def inverse(self, y, opts):
        return fixed_point_inverse(self.g, y, opts.fp_atol, opts.fp_rtol, opts.fp_max_iter)


class ResidualFlow(nn.ModuleList):
    """Residual blocks one after the other on the flattened example (B, *shape) -> (B, D):
    log-determinants add; the inverse undoes the blocks from the last by fixed-point iteration.
    The same interface as CNFStack (reg is zero)."""

    def forward(self, x, opts, stats=None, generator=None):
        h, log_det = x.reshape(x.shape[0], -1), x.new_zeros(x.shape[0])
        for block in self:
            h, ld = block(h, opts, generator)
            log_det = log_det + ld
        return h.reshape(x.shape), log_det, x.new_zeros(x.shape[0], 2)

    def inverse(self, z, opts, stats=None):
        h = z.reshape(z.shape[0], -1)
        for block in reversed(self):
            h = block.inverse(h, opts)
        return h.reshape(z.shape)

    @torch.inference_mode()
    def trajectory(self, z, n_times, opts):
        """The points after each block from the base (z) to the data side: (n_blocks + 1, *z.shape);
        n_times is not used (a block is one step)."""
        path = [z.reshape(z.shape[0], -1)]
        for block in reversed(self):
            path.append(block.inverse(path[-1], opts))
        return torch.stack(path).reshape(len(path), *z.shape)


# ----------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------
# Every network is the dynamics f = net(t, z), z (B, ...) -> (B, ...), t a float. The last layer
# starts at zero (as in RNODE's code), so every block starts as the identity map with NFE at its
# minimum and grows only as far as the data asks.

def _time(t, like):
    return torch.as_tensor(t, dtype=like.dtype, device=like.device).reshape(1, 1)


class ConcatSquashLinear(nn.Module):
    """The official FFJORD code's concatsquash layer (its default for the toy data):
    h -> (W h + b) * sigmoid(W_g t + b_g) + w_b t, the time gating and shifting every unit."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.layer = nn.Linear(d_in, d_out)
        self.hyper_gate = nn.Linear(1, d_out)
        self.hyper_bias = nn.Linear(1, d_out, bias=False)

    def forward(self, t, h):
        t = _time(t, h)
        return self.layer(h) * torch.sigmoid(self.hyper_gate(t)) + self.hyper_bias(t)


class ConcatSquashMLP(nn.Module):
    """Dynamics for 2D points: concatsquash layers dim -> hidden x n_hidden -> dim with tanh
    (the official toy setting: 64-64-64, tanh)."""

    def __init__(self, dim=2, hidden=64, n_hidden=3):
        super().__init__()
        dims = [dim] + [hidden] * n_hidden + [dim]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        last = self.layers[-1]
        for p in (last.layer.weight, last.layer.bias, last.hyper_bias.weight):
            nn.init.zeros_(p)

    def forward(self, t, z):
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = torch.tanh(h)
        return h


class ConcatConv2d(nn.Module):
    """The official code's "concat" convolution: t enters as an extra constant input channel,
    3x3 convolution with padding 1."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in + 1, c_out, 3, padding=1)

    def forward(self, t, h):
        tt = _time(t, h).reshape(1, 1, 1, 1).expand(h.shape[0], 1, *h.shape[2:])
        return self.conv(torch.cat([tt, h], 1))


class ODEConvNet(nn.Module):
    """Dynamics of one image block (FFJORD App. B.1: "3 convolutional layers with 64 filters",
    softplus; the official code's --dims 64,64,64: three hidden concat convolutions of 64
    channels and an output one back to `channels`)."""

    def __init__(self, channels, hidden=(64, 64, 64)):
        super().__init__()
        dims = [channels] + list(hidden) + [channels]
        self.layers = nn.ModuleList(ConcatConv2d(a, b) for a, b in zip(dims[:-1], dims[1:]))
        nn.init.zeros_(self.layers[-1].conv.weight)
        nn.init.zeros_(self.layers[-1].conv.bias)

    def forward(self, t, z):
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = F.softplus(h)
        return h


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Config(RunConfig):
    """Defaults: the official code's toy setting on 8gaussians (a CPU, minutes); PRESETS follow
    FFJORD App. B.1 for MNIST and CIFAR-10 and RNODE's fixed-step recipe for the 8x8 digits."""
    dataset: str = flag("8gaussians", "dataset: a 2D set (8gaussians, checkerboard, rings, ...) or an image set")
    arch: str = flag("cnf", "the flow: cnf (FFJORD's continuous flow) or residual (Residual Flows: x + g(x), "
                     "Lip(g) < 1)", choices=("cnf", "residual"))
    steps: int = flag(1000, "training steps (optimiser updates)")
    batch_size: int = flag(256, "global batch size (--eval: examples per solve)")
    lr: float = flag(1e-3, "Adam learning rate")
    save_every: int = flag(500, "steps between checkpoints and pictures")
    # the ODE solve of a training step
    solver: str = flag("dopri5", "training solver: dopri5 (adaptive, --atol/--rtol) or rk4 (fixed --step-size)",
                       choices=("dopri5", "rk4"))
    atol: float = flag(1e-5, "dopri5 absolute tolerance in training (official code: 1e-5)")
    rtol: float = flag(1e-5, "dopri5 relative tolerance in training (official code: 1e-5)")
    step_size: float = flag(0.05, "rk4 step (rounded down so that it divides --time-length)")
    max_steps: int = flag(1000, "cap on the solver steps of one solve (training and evaluation); beyond it "
                          "the run stops with a one-line error: the guard against the NFE blowing up")
    adjoint: bool = flag(False, "gradients by the adjoint method (Chen et al. Alg. 1; memory independent of the "
                         "NFE) instead of backpropagation through the solver")
    trace: str = flag("exact", "Tr(df/dz) in training: exact (one autograd pass per dimension) or hutchinson "
                      "(FFJORD Sec. 3.1, one pass per probe)", choices=("exact", "hutchinson"))
    noise: str = flag("rademacher", "Hutchinson noise, drawn once per solve", choices=("rademacher", "gaussian"))
    kinetic: float = flag(0.0, "RNODE weight lambda_K of the kinetic energy int 0.5 ||f||^2 / D dt (RNODE: 0.01)")
    jacobian: float = flag(0.0, "RNODE weight lambda_J of int ||df/dz||_F^2 / D dt (RNODE: 0.01)")
    # --eval, --sample and the pictures: always dopri5, so the continuous model is what is scored
    eval_atol: float = flag(1e-5, "dopri5 absolute tolerance for --eval, --sample and the pictures")
    eval_rtol: float = flag(1e-5, "dopri5 relative tolerance for --eval, --sample and the pictures")
    eval_probes: int = flag(4, "Hutchinson probes averaged in --eval on images (2D data: the exact trace)")
    # the flow
    time_length: float = flag(0.5, "integration time T of every CNF block (fixed here; the official code "
                              "learns it from 0.5 on 2D data and 1.0 on images)")
    n_blocks: int = flag(1, "CNF blocks: stacked on 2D data; per half-stage of every scale on images (paper: 2)")
    hidden: int = flag(64, "2D: width of the concatsquash MLP (official: 64)")
    n_hidden: int = flag(3, "2D: hidden layers of the concatsquash MLP (official: 3)")
    n_scales: int = flag(0, "images: scales of the multiscale architecture (0: squeeze while both sides are >= 4, "
                         "so digits 2, MNIST 3, CIFAR-10 4)")
    width: int = flag(64, "images: channels of every hidden concat convolution (paper: 64)")
    depth: int = flag(3, "images: hidden concat convolutions of every block's network (paper: 3)")
    alpha: float = flag(1e-6, "images: the logit preprocessing maps x/K into [alpha, 1 - alpha] (official: 1e-6)")
    # optimisation
    weight_decay: float = flag(1e-5, "Adam weight decay (official toy code: 1e-5; image code: 0)")
    warmup: int = flag(0, "linear learning-rate warm-up steps (official image code: 1000)")
    lr_drop: int = flag(0, "step from which the learning rate is a tenth of --lr (paper: half-way; 0 = never)")
    decay: str = flag("none", "learning rate after the warm-up: none (constant, or --lr-drop) or cosine (to 0 at "
                      "--steps; Loshchilov & Hutter 2017)", choices=("none", "cosine"))
    flip: bool = flag(False, "random horizontal flips of training images (official CIFAR-10 code)")
    # --arch residual (n_blocks, hidden, n_hidden size its blocks, on 2D points and flattened images)
    coeff: float = flag(0.9, "residual: spectral norm bound c < 1 of every linear map, so Lip(g) <= c "
                        "(official toy code: 0.9)")
    n_power_iterations: int = flag(5, "residual: power-iteration steps per training step for each spectral norm "
                                   "(official toy code: 5; 200 before evaluation, as --eval and --sample do)")
    logdet: str = flag("roulette", "residual: log det(I + J_g) in training: roulette (unbiased, Chen et al. 2019, "
                       "Thm. 1) or series (truncated after --n-terms, biased)", choices=("roulette", "series"))
    n_terms: int = flag(10, "residual: terms of the truncated series (--logdet series)")
    n_exact_terms: int = flag(2, "residual: terms the Russian roulette always computes")
    roulette_p: float = flag(0.5, "residual: the roulette draws N = n_exact_terms + Geometric(p)")
    neumann_grad: bool = flag(False, "residual: gradients of the log-det by the Neumann series (Chen et al. 2019; "
                              "memory independent of the number of terms)")


# Sources of the presets' values (issue 29): [B.1] FFJORD App. B.1 as recorded in
# ../shared/PAPERS.md; [cnf] the official rtqichen/ffjord train_cnf.py defaults and its README's
# command (--dims 64,64,64 --num_blocks 2 --layer_type concat --multiscale True --rademacher True);
# [toy] its train_toy.py; [rnode] cfinlay/ffjord-rnode train.py defaults and
# example-scripts/mnist.sh (--solver rk4 --step_size 0.25 --kinetic-energy 0.01
#   --jacobian-norm2 0.01 --alpha 1e-5); [ours] chosen here.
_DIGITS = dict(  # RNODE's MNIST recipe on a CPU budget
    solver="rk4", step_size=0.25,       # [rnode] mnist.sh: rk4, 4 steps per block of T = 1
    kinetic=0.01, jacobian=0.01,        # [rnode] mnist.sh
    time_length=1.0,                    # [rnode] train.py: T = 1, not learned (train_T False)
    trace="hutchinson",                 # [rnode] one Hutchinson sample (div_samples 1); noise: ours, Rademacher
    lr=1e-3, weight_decay=0.0,          # [rnode] train.py
    steps=2000, batch_size=64,          # [ours] a CPU budget ([rnode]: batch 200, 100 epochs, 1000 warm-up steps)
    n_blocks=1, width=32, depth=2,      # [ours] small ([rnode]: 2 blocks of 64,64,64)
    n_scales=2,                         # [cnf] squeeze while both sides are >= 4 (8x8 -> 2 scales)
    alpha=0.05)                         # [ours] as realnvp.py ([rnode]: 1e-5 in mnist.sh, 0.05 in cifar10.sh)
_PAPER = dict(
    n_blocks=2, width=64, depth=3,      # [B.1] blocks of N = 2 CNFs, 3 convolutions of 64 filters; [cnf] README
    trace="hutchinson", noise="rademacher",  # [cnf] divergence_fn approximate, --rademacher True
    solver="dopri5", atol=1e-5, rtol=1e-5,   # [cnf] defaults
    time_length=1.0,                    # [cnf] time_length 1.0; it is learned there (train_T True), fixed here
    alpha=1e-6,                         # [cnf] --alpha 1e-6
    lr=1e-3, weight_decay=0.0,          # [B.1] Adam 1e-3; [cnf] weight decay 0
    warmup=1000,                        # [cnf] warmup_iters 1000 (the paper does not mention it)
    batch_size=900,                     # [B.1] batch 900 ([cnf] default: 200)
    save_every=1000)                    # [ours]
# [B.1] 500 epochs with the learning rate 1e-3 then 1e-4 from epoch 250 ([cnf]: 1000 epochs, no
# drop, no gradient clipping): 500 epochs of 60,000 (50,000) images at batch 900 are 33,334
# (27,778) steps. [cnf] flips the CIFAR-10 training images. Scales: [B.1] 3 for MNIST, 4 for
# CIFAR-10. MNIST 800,636 parameters, CIFAR-10 1,358,868 (tested).

PRESETS = {
    # [toy] (README: --dims 64-64-64 --layer_type concatsquash): tanh, T = 0.5 (learned there,
    # fixed here), the exact trace (brute_force), dopri5 at 1e-5, Adam 1e-3 with weight decay 1e-5;
    # batch 100 and 10,000 iterations there; here 2000 steps of 256 ([ours], minutes on a CPU: on
    # 8gaussians 1000 steps end 0.26 nats above the entropy, 2000 steps 0.03). 9,224 parameters.
    "points": dict(n_samples=2000, steps=2000),
    "digits": _DIGITS,                  # 33,670 parameters
    "image": _DIGITS,                   # other small image sets (digits-binary)
    "mnist": dict(_PAPER, steps=33_334, lr_drop=16_667, n_scales=3),
    "fashion-mnist": dict(_PAPER, steps=33_334, lr_drop=16_667, n_scales=3),  # [ours] MNIST's
    "cifar10": dict(_PAPER, steps=27_778, lr_drop=13_889, n_scales=4, flip=True),
}

# With --arch residual: Chen et al.'s official train_toy.py scaled down. It has 100 blocks of
# 2-128-128-128-128-2, batch 500, 50,000 iterations, coeff 0.9, 5 power iterations, the roulette
# with geometric N, Adam 1e-3 with weight decay 1e-5. Ours: 8 blocks of 2-64-64-64-2, the steps
# and batch of the CNF's toy run (one budget for both), and Adam 3e-3 (after 1000 steps on
# 8gaussians 1e-3 ends 0.89 nats above the true entropy, 3e-3 0.30; on rings 2000 steps end at
# 3.530 nats, 3.624 with the cosine decay). Digits: 8 blocks of
# 64-128-128-64 on the flattened, logit-preprocessed image (ours; the paper's image models are
# convolutional and multiscale, not implemented).
ARCH_PRESETS = {
    "residual": {
        "points": dict(n_samples=2000, n_blocks=8, hidden=64, n_hidden=3, lr=3e-3, steps=2000),
        "digits": dict(steps=2000, batch_size=64, weight_decay=0.0, n_blocks=8, hidden=128, n_hidden=2,
                       alpha=0.05),
        "image": dict(steps=2000, batch_size=64, weight_decay=0.0, n_blocks=8, hidden=128, n_hidden=2, alpha=0.05),
    },
}


def check_config(cfg):
    """The flags' values that their types let through; whether --n-scales fits the images is
    checked in build (it needs the data). --compile and --amp are refused (see their messages)."""
    if cfg.compile:
        raise UserError("--compile is not available for ffjord.py: training differentiates the dynamics network "
                        "twice (the trace is a vector-Jacobian product inside the loss), and torch.compile does not "
                        "support double backward; run without --compile")
    if cfg.amp:
        raise UserError("--amp is not available for ffjord.py: bfloat16 resolves about 4e-3, coarser than the "
                        "solver's tolerances (1e-5), so the adaptive step control and the log-density integral "
                        "need float32; run without --amp")
    for name in ("atol", "eval_atol", "step_size", "time_length"):
        check_range(cfg, name, 0, open_low=True)
    for name in ("rtol", "eval_rtol", "kinetic", "jacobian", "weight_decay", "warmup", "lr_drop", "n_scales",
                 "n_hidden"):
        check_range(cfg, name, 0)
    for name in ("max_steps", "eval_probes", "n_blocks", "hidden", "width", "depth"):
        check_range(cfg, name, 1)
    check_range(cfg, "alpha", 0, 0.5, open_high=True)
    check_range(cfg, "coeff", 0, 1, open_low=True, open_high=True)
    check_range(cfg, "roulette_p", 0, 1, open_low=True, open_high=True)
    for name in ("n_power_iterations", "n_terms"):
        check_range(cfg, name, 1)
    check_range(cfg, "n_exact_terms", 0)
    if cfg.decay != "none" and cfg.lr_drop:
        raise UserError(f"--decay {cfg.decay} and --lr-drop {cfg.lr_drop} are two schedules; accepted: one of them "
                        "(--lr-drop 0 with --decay cosine, or --decay none with --lr-drop)")
    if cfg.arch == "residual":
        cnf_only = [f for f, on in (("--adjoint", cfg.adjoint), ("--kinetic", cfg.kinetic),
                                    ("--jacobian", cfg.jacobian), ("--solver rk4", cfg.solver == "rk4"),
                                    ("--trace hutchinson", cfg.trace == "hutchinson"),
                                    ("--noise gaussian", cfg.noise == "gaussian")) if on]
        if cnf_only:
            raise UserError(f"{', '.join(cnf_only)}: not used by --arch residual (no ODE is solved); with --arch "
                            f"residual the flow's flags are --coeff, --n-power-iterations, --logdet, --n-terms, "
                            f"--n-exact-terms, --roulette-p, --neumann-grad")
    elif cfg.neumann_grad or cfg.logdet != "roulette":
        raise UserError("--neumann-grad and --logdet apply to --arch residual only; add --arch residual or drop them")


def learning_rate(step, cfg):
    """The learning rate of step `step` (0-based): linear warm-up over --warmup steps (the official
    train_cnf.py's update_lr), then --lr, a tenth of it from step --lr-drop (FFJORD App. B.1), or
    with --decay cosine lr (1 + cos(pi p)) / 2 at the fraction p of the steps after the warm-up."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
    if cfg.decay == "cosine" and step >= cfg.warmup:
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1))))
    return lr * 0.1 if cfg.lr_drop and step >= cfg.lr_drop else lr


EXACT_LOGDET_DIMS = 256  # --arch residual scores with the exact log-det up to this many dimensions


def train_options(cfg):
    """The options of a training step: SolveOptions (RNODE's integrals carried only when weighted),
    or LogDetOptions for --arch residual."""
    if cfg.arch == "residual":
        return LogDetOptions(cfg.logdet, cfg.n_terms, cfg.n_exact_terms, cfg.roulette_p, neumann=cfg.neumann_grad)
    return SolveOptions(cfg.solver, cfg.atol, cfg.rtol, cfg.step_size, cfg.max_steps, cfg.adjoint, cfg.trace,
                        cfg.noise, probes=1, regularize=cfg.kinetic > 0 or cfg.jacobian > 0)


def eval_options(cfg, info, trained=None):
    """--eval, --sample and the pictures: dopri5 at the evaluation tolerances whatever solver
    trained the model (so the continuous flow is what is scored); the exact trace on 2D data,
    Hutchinson with --eval-probes probes on images. --arch residual: the exact log-det up to
    EXACT_LOGDET_DIMS dimensions (2D points, digits), else the roulette with --eval-probes probes.
    trained: the checkpoint's Config (its --arch), when cfg is that of --eval or --sample."""
    points, trained = info.kind == "points", trained or cfg
    if trained.arch == "residual":
        exact = info.dims <= EXACT_LOGDET_DIMS
        return LogDetOptions("exact" if exact else "roulette", n_exact=trained.n_exact_terms, p=trained.roulette_p,
                             probes=1 if exact else cfg.eval_probes)
    return SolveOptions("dopri5", cfg.eval_atol, cfg.eval_rtol, max_steps=cfg.max_steps,
                        trace="exact" if points else "hutchinson", noise=cfg.noise,
                        probes=1 if points else cfg.eval_probes)


@contextmanager
def solver_failures(what, then="", flags="--max-steps, --atol, --rtol, --kinetic, --jacobian, --solver rk4"):
    """A solver's ValueError (beyond --max-steps, a step size underflow, dynamics that are not
    finite, a fixed-point inverse that does not converge) becomes one line: what failed, the
    reason, what happens now, the flags to try."""
    try:
        yield
    except ValueError as e:
        raise UserError(f"{what}: {e}{then} (the flags: {flags})") from None


# ----------------------------------------------------------------------------------------
# Data and pictures
# ----------------------------------------------------------------------------------------

# Data go into the flow as they come: points as floats, images as integer levels that `nll`
# dequantises (discrete = info.kind == "image"); samples come back the same way.

NAMES = {"cnf": "FFJORD", "residual": "Residual Flow"}  # the pictures' titles
GRID_CHUNK = 4096  # points per solve on the density grid: 4 solves for 128 x 128


def save_samples(x, path, info, title=None):
    """Samples as a scatter on [-lim, lim]^2 (points) or an image grid (integer levels)."""
    if info.kind == "points":
        save_scatter(x, path, lim=info.lim, title=title)
    else:
        save_image_grid(x, path, levels=info.levels, title=title)


@torch.no_grad()
def model_log_density(net, lim, opts, n=128):
    """log p(x) of the 2D flow on common.density_on_grid's n x n grid of [-lim, lim]^2, GRID_CHUNK
    points per solve (under no_grad: the trace and the log-det make their own graphs inside)."""
    device = net._anchor.device
    return density_on_grid(lambda p: log_prob(net, p.to(device), opts)[0].cpu(), lim, n, chunk=GRID_CHUNK)


def save_trajectory(path_points, path, lim, n_panels=6, name="FFJORD"):
    """Points from the base (t = T, left) to the data (t = 0, right), coloured by their angle in
    the base, so one sees where each part of N(0, I) goes. path_points (n_times, N, 2)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    p = path_points.detach().float().cpu()
    keep = sorted({round(i * (len(p) - 1) / (n_panels - 1)) for i in range(n_panels)})
    colour = torch.atan2(p[0, :, 1], p[0, :, 0]).numpy()
    fig, axes = plt.subplots(1, len(keep), figsize=(2.4 * len(keep), 2.7), squeeze=False)
    for ax, k in zip(axes[0], keep):
        ax.scatter(p[k, :, 0].numpy(), p[k, :, 1].numpy(), c=colour, cmap="hsv", s=1)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        frac = 1 - k / (len(p) - 1)
        ax.set_title("base" if k == 0 else "data" if k == len(p) - 1 else f"{frac:.2f} of the way back",
                     fontsize=9)
    fig.suptitle(f"{name}: samples carried from the base to the data", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_nfe(metrics_path, png_path):
    """The NFE of the forward and the backward pass of every training step (means over each
    metrics line) against the step: how hard the dynamics are to integrate as training goes on."""
    if not metrics_path.exists():
        return
    rows = {}
    for line in metrics_path.read_text().splitlines():
        r = json.loads(line) if line.strip() else {}
        if "step" in r and "nfe_forward" in r:
            rows[r["step"]] = r  # after a resume, the latest line of a step wins
    if not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = sorted(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("nfe_forward", "forward solve"), ("nfe_backward", "backward pass")):
        ax.plot(steps, [rows[s][key] for s in steps], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("function evaluations per step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def save_pictures(net, out, step, cfg, ds):
    """Samples, and the NFE so far; for 2D data also the model's density beside the truth and
    the trajectories from the base to the data. Seeded generators only: the training run's
    random stream is untouched."""
    with solver_failures(f"the ODE solve for the pictures of step {step} failed", "; the checkpoint is saved",
                         "--max-steps, --eval-atol, --eval-rtol"):
        _draw_pictures(net, out, step, cfg, ds)


def _draw_pictures(net, out, step, cfg, ds):
    info, opts = ds.info, eval_options(cfg, ds.info)
    device = net._anchor.device
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    x = net.sample(cfg.n_samples, opts, g)
    save_samples(x, out / f"samples_{step}.png", info, title=f"{NAMES[cfg.arch]} samples, step {step}")
    save_nfe(out / "metrics.jsonl", out / "nfe.png")
    if info.kind == "points":
        truth = density_on_grid(ds.log_prob, info.lim) if ds.log_prob else ds.data
        save_density({"true" if ds.log_prob else "training data": truth,
                      NAMES[cfg.arch]: model_log_density(net, info.lim, opts)}, out / "density.png", info.lim)
        z = torch.randn(min(cfg.n_samples, 1000), *info.shape, generator=g, device=device)
        save_trajectory(net.body.trajectory(z, 6, opts), out / "trajectory.png", info.lim, name=NAMES[cfg.arch])


# ----------------------------------------------------------------------------------------
# Run code
# ----------------------------------------------------------------------------------------

MODEL = "ffjord"


def build(cfg, info):
    """The flow for a configuration and the data's description: stacked CNFs with concatsquash
    dynamics on points, the multiscale architecture on images (after the logit preprocessing);
    with --arch residual, residual blocks on the flattened points or images."""
    levels = dict(levels=info.levels, alpha=cfg.alpha) if info.kind == "image" else {}
    if cfg.arch == "residual":
        body = ResidualFlow(ResidualBlock(info.dims, cfg.hidden, cfg.n_hidden, cfg.coeff, cfg.n_power_iterations)
                            for _ in range(cfg.n_blocks))
        return FFJORD(body, info.shape, **levels)
    if info.kind == "points":
        (dim,) = info.shape
        body = CNFStack(CNF(ConcatSquashMLP(dim, cfg.hidden, cfg.n_hidden), cfg.time_length)
                        for _ in range(cfg.n_blocks))
        return FFJORD(body, info.shape)
    c, h, w = info.shape
    n_scales = cfg.n_scales or default_n_scales(h, w)
    if n_scales < 1 or h % 2 ** (n_scales - 1) or w % 2 ** (n_scales - 1):
        raise UserError(f"--n-scales {cfg.n_scales} does not fit {h}x{w} images; it takes 1.. as long as {h} and "
                        f"{w} are divisible by 2^(n_scales - 1), or 0 for the default")
    body = Multiscale(info.shape, n_scales, cfg.n_blocks, lambda ch: ODEConvNet(ch, (cfg.width,) * cfg.depth),
                      cfg.time_length)
    return FFJORD(body, info.shape, **levels)


def train(cfg):
    """Maximum likelihood by the instantaneous change of variables (FFJORD Sec. 2; with --arch
    residual, by the residual blocks' log-det estimator) with Adam, plus RNODE's penalties when
    weighted, the NFE of every step logged; under torchrun every process trains on its slice of
    the global batch (DDP)."""
    with Training(cfg, MODEL) as run:
        ds = load_dataset(cfg.dataset, "train", cfg.data_dir)
        info, discrete, cnf = ds.info, ds.info.kind == "image", cfg.arch == "cnf"
        seed_everything(cfg.seed)  # the same initial weights on every process
        net = build(cfg, info).to(run.device)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        batches = Batches(ds, cfg.batch_size, run.dist, seed=cfg.seed)
        step = run.start(info, model=net, opt=opt, batches=batches)  # noise differs between processes
        model = wrap_ddp(net, run.dist, cfg.compile)  # check_config refuses --compile
        opts = train_options(cfg)
        for step in run.steps(step, lambda step: save_pictures(net, run.out, step, cfg, ds)):
            x, _ = next(batches)
            if cfg.flip:
                x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, cfg)
            stats = SolveStats()  # this step's NFE; nfe_backward is known after backward()
            with solver_failures(f"the ODE solve failed at step {step + 1}",
                                 "; training stopped and the last checkpoint on disk is kept"):
                nats, reg = nll(model, x, opts, stats, discrete=discrete)
                loss = rnode_loss(nats, reg, cfg.kinetic, cfg.jacobian)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            metrics = dict(loss=loss, nll=nats.mean())  # tensors: run.log averages them over processes
            if cnf:
                counts = dict(nfe_forward=stats.nfe_forward, nfe_backward=stats.nfe_backward,
                              solver_steps=stats.steps, rejected=stats.rejected)
                metrics.update({k: torch.tensor(float(v)) for k, v in counts.items()})
            if cnf and opts.regularize:
                metrics.update(kinetic=reg[:, 0].mean(), jacobian=reg[:, 1].mean())
            if discrete:
                metrics["bits_per_dim"] = bits_per_dim(nats.mean(), info.dims)
            run.log(**metrics)
    run.report(["ckpt.pt", f"samples_{run.step}.png", "density.png", "trajectory.png", "nfe.png", "metrics.jsonl",
                "loss.png"])


@torch.no_grad()  # not inference_mode: the trace is a derivative taken inside the dynamics
def evaluate(cfg):
    """--eval CKPT: test-set NLL (nats per example; images: one dequantisation draw each) and
    bits/dim with dopri5 at --eval-atol/--eval-rtol, the exact trace on 2D data and Hutchinson
    with --eval-probes probes on images; on a 2D set also the true entropy, density.npz and
    density.png."""
    net, saved, info = load(cfg.eval, get_device(cfg.device))
    device = net._anchor.device
    out = output_dir(cfg, cfg.eval)
    ds = load_dataset(info.name, "test", cfg.data_dir)
    opts, stats = eval_options(cfg, info, saved), SolveStats()
    if cfg.fid is not None:
        with solver_failures("the ODE solve of --fid failed", flags="--max-steps, --eval-atol, --eval-rtol"):
            return fid_evaluate(cfg, info, lambda n, g: net.sample(n, opts, g, stats))
    torch.manual_seed(cfg.seed)  # dequantisation and Hutchinson noise
    start = time.perf_counter()
    parts = ds.data.split(cfg.batch_size)
    with solver_failures("the ODE solve of --eval failed", flags="--max-steps, --eval-atol, --eval-rtol"):
        v = torch.cat([nll(net, x.to(device), opts, stats, discrete=info.kind == "image")[0].double().cpu()
                       for x in parts])
    fields = {"nll": v.mean().item(), "nll_se": v.std().item() / math.sqrt(len(v)), "n": len(v)}
    if info.kind == "image":
        fields["bits_per_dim"] = bits_per_dim(fields["nll"], info.dims)
    if saved.arch == "residual":
        fields.update(arch="residual", logdet=opts.method, probes=opts.probes if opts.method != "exact" else None)
    else:
        fields.update(solver=opts.method, atol=opts.atol, rtol=opts.rtol, trace=opts.trace,
                      probes=opts.probes if opts.trace == "hutchinson" else None,
                      nfe_per_solve=stats.nfe_forward / len(parts))
    fields["seconds"] = round(time.perf_counter() - start, 1)
    if info.kind == "points":
        if ds.log_prob is not None:
            fields["true_entropy"], fields["true_entropy_se"] = entropy_estimate(info.name)
        with solver_failures("the ODE solve of --eval's density grid failed", flags="--max-steps, --eval-atol, "
                             "--eval-rtol"):
            log_density = model_log_density(net, info.lim, opts)
        np.savez(out / "density.npz", log_density=log_density, lim=info.lim)
        truth = density_on_grid(ds.log_prob, info.lim) if ds.log_prob else ds.data
        save_density({"true" if ds.log_prob else "test data": truth, NAMES[saved.arch]: log_density},
                     out / "density.png", info.lim)
    Logger(out, 0).event("eval", split="test", dataset=info.name, **fields)
    report_files(out, ["metrics.jsonl", "density.npz", "density.png"])
    return fields


def draw_samples(cfg):
    """--sample CKPT: n_samples samples (base draws integrated from T to 0 with dopri5 at the
    evaluation tolerances) to samples.png and samples.pt, the trajectories on 2D data, and a
    "sample" event with samples per second and the NFE."""
    net, saved, info = load(cfg.sample, get_device(cfg.device))
    device = net._anchor.device
    out = output_dir(cfg, cfg.sample)
    opts, stats = eval_options(cfg, info, saved), SolveStats()
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    with solver_failures("the ODE solve of --sample failed", flags="--max-steps, --eval-atol, --eval-rtol"):
        t0 = time.perf_counter()
        x = net.sample(cfg.n_samples, opts, g, stats)
        seconds = time.perf_counter() - t0
        save_samples(x, out / "samples.png", info, title=f"{NAMES[saved.arch]} samples")
        torch.save(x.cpu(), out / "samples.pt")
        if info.kind == "points":
            z = torch.randn(min(cfg.n_samples, 1000), *info.shape, generator=g, device=device)
            save_trajectory(net.body.trajectory(z, 6, opts), out / "trajectory.png", info.lim, name=NAMES[saved.arch])
    solver = (dict(solver=opts.method, atol=opts.atol, rtol=opts.rtol, nfe=stats.nfe_forward) if saved.arch == "cnf"
              else dict(arch="residual"))
    Logger(out, 0).event("sample", n=cfg.n_samples, seconds=seconds, samples_per_s=cfg.n_samples / max(seconds, 1e-9),
                         **solver)
    report_files(out, ["samples.png", "samples.pt", "trajectory.png", "metrics.jsonl"])
    return x


def load(path, device="cpu"):
    """(flow in evaluation mode on `device`, its training Config, its data's description) from a
    checkpoint of ffjord.py."""
    ckpt = load_checkpoint(path, MODEL)
    cfg, info = saved_config(Config, ckpt)
    net = build(cfg, info)
    load_weights(net, ckpt["model"], path)
    for m in net.modules():  # residual: the spectral norms to convergence (train_toy.py does 200 before testing)
        if isinstance(m, SpectralNormLinear):
            m.power_iteration(200)
    return net.to(device).eval(), cfg, info


def main(argv=None):
    """Train (default), or --eval CKPT, or --sample CKPT; a user's mistake exits with one line."""
    with user_errors():
        cfg = parse_config(Config, PRESETS, argv, doc=__doc__, kinds=("image", "points"), arch_presets=ARCH_PRESETS)
        check_config(cfg)
        return dispatch(cfg, train, evaluate, draw_samples)


if __name__ == "__main__":
    main()
