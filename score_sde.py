"""Score-based generative models: score matching, NCSN, and score SDEs with an exact likelihood.

Papers
  Hyvarinen 2005, JMLR 6 (score matching, Thm. 1); Vincent 2011, Neural Computation 23 (denoising).
  Song, Garg, Shi & Ermon 2019, arXiv 1905.07088 (sliced score matching).
  Song & Ermon 2019, arXiv 1907.05600 (NCSN: noise-conditional scores, annealed Langevin dynamics);
    Song & Ermon 2020, arXiv 2006.09011 (Technique 1: sigma_max ~ the largest distance between points).
  Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole 2021, arXiv 2011.13456 ("SDE paper": VE/VP/sub-VP
    SDEs, PC and ODE samplers, the exact likelihood, DDPM++ and NCSN++); Dormand & Prince 1980 (RK5(4)).
  Song, Durkan, Murray & Ermon 2021, arXiv 2101.09258 ("2021b": likelihood weighting, importance-sampled t).

The probability-flow ODE dx/dt = f - 1/2 g^2 s_theta (Eq. 13) has the SDE's marginals and is a
continuous normalizing flow, so log p_theta(x) = log pi(x(T)) + int div f~ dt is exact up to the solver's
tolerance (and, for images, the Hutchinson probe's noise); on images bits/dim bound the discrete NLL.

Implemented: the VE, VP and sub-VP SDEs (closed-form kernels, exact one-step transitions); denoising,
sliced and exact (2D points) score matching with lambda = sigma^2, denoising also with the likelihood
weighting lambda = g^2 and importance-sampled t (2021b); NCSN (--sde ncsn) trained on L
geometric levels, the network conditioned on log sigma_i (through the VE time t_i), sampled by annealed
Langevin dynamics; Euler-Maruyama and reverse-diffusion predictors, the Langevin corrector, PC and ODE
samplers; the exact likelihood; an MLP for points, the DDPM++ U-Net and NCSN++ (--arch ncsnpp), both at
the official cifar10 configurations' parameter counts. Not implemented: the "deep" variants, the
ancestral predictor, controllable generation (Sec. 5), NCSN v1's RefineNet with conditional instance
norm, NCSNv2 beyond Technique 1, 2021b's variational dequantisation and its bounds, FID and IS.

Run it
  python score_sde.py                                            # 8gaussians, VP SDE, minutes on a CPU
  python score_sde.py --eval runs/score_sde-8gaussians/ckpt.pt   # exact NLL beside the true entropy
  python score_sde.py --sample runs/score_sde-8gaussians/ckpt.pt --sampler ode
  (--sde ncsn: NCSN; --loss sm: exact score matching; --weighting likelihood --importance-sampling: 2021b,
   the rings and checkerboard presets' choice; --dataset cifar10 [--arch ncsnpp]: DDPM++/NCSN++ cont.)

Paper -> code (SDE paper unless named)
  Hyvarinen Thm. 1     E[tr ds/dx + 1/2 ||s||^2] = 1/2 E||s - grad log p||^2 + c   hyvarinen_score_matching,
                                                                                   score_matching_loss
  Vincent; Eq. 7       sigma^2 ||s(x_t, t) - grad log p_0t(x_t | x0)||^2            dsm_loss, make_score_fn
  2021b Thm. 1; Sec. 4 lambda = g^2; t ~ g^2 / (Z sigma^2), W = int g^2 / sigma^2   likelihood_weighted_dsm_loss,
                                                                                   likelihood_importance_time
  SSM; App. A Eq. 19   sigma^2 [2 v^T (ds/dx) v + (v^T s)^2 or ||s||^2]            sliced_score_matching_loss
  NCSN Eqs. 5-6        1/L sum_i sigma_i^2 1/2 E||s(x + sigma_i z, sigma_i) + z/sigma_i||^2   ncsn_loss, ncsn_sigmas
  NCSN Algorithm 1     x += alpha_i/2 s(x, sigma_i) + sqrt(alpha_i) z              annealed_langevin_dynamics
  Eqs. 9, 11, 12       dx = f(x, t) dt + g(t) dw                                    VESDE, VPSDE, SubVPSDE
  App. B Eq. 29; C     p_0t(x_t | x0) = N(m(t) x0, sigma(t)^2 I)                    .marginal_prob, .prior_*
  Eqs. 8, 10           x_i = a x_{i-1} + G z  (SMLD's and DDPM's chains)            .discretize
  Eq. 6; App. E Eq. 46 dx = [f - g^2 s] dt + g dw-bar; reverse diffusion            *_predictor
  App. G Algs. 1-5     Langevin eps = 2 alpha (r ||z|| / ||s||)^2, corrector first  langevin_corrector, pc_sample
  Eq. 13; App. D.2     dx/dt = f - 1/2 g^2 s;  log p(x) = log pi(x(T)) + int div    ode_sample, ode_log_likelihood,
                       (Eqs. 39-40, Hutchinson-Skilling v^T (df/dx) v)              divergence_exact / _hutchinson
  Dormand-Prince 1980  RK5(4), FSAL, Hairer's step control                          dopri5_step, dopri5
  Theis et al. 2016    -log P(k) <= -E_u log p(k + u) (derived in realnvp.py)       dequantized_nll, bits_per_dim
  App. H               DDPM++: BigGAN blocks, skips / sqrt(2); NCSN++: Fourier      UNet, ResBlock, AttnBlock;
                       features of log sigma, FIR resampling, pyramids             NCSNpp, fir_upsample, ...

Conventions: images live as y = (k + u) / L * 2 - 1 in [-1, 1), fresh u every batch; t in [eps, 1],
eps = 1e-5 for training and likelihoods, 1e-3 (VP) or 1e-5 (VE) for sampling; the networks predict the
noise, s = -net(x, t) / sigma(t); the cifar10 presets' departures from the official code are at PRESETS.
"""
import math
import time
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (EMA, Batches, Logger, RunConfig, Training, UserError, check_range, density_on_grid, dispatch,
                    entropy_estimate, flag, get_device, load_checkpoint, load_dataset, load_weights, output_dir,
                    parse_config, report_files, save_density, save_image_grid, save_scatter, saved_config,
                    seed_everything, user_errors, wrap_ddp)
from common import fid_evaluate  # --eval CKPT --fid N


def _expand(v, x):
    """v (B,) reshaped to (B, 1, ..., 1) so that it broadcasts against x (B, ...)."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def _randn(shape, like, generator=None):
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def _sum_dims(x):
    return x.reshape(x.shape[0], -1).sum(1)


# ----------------------------------------------------------------------------------------
# NCSN: noise levels and annealed Langevin dynamics (Song & Ermon 2019)
# ----------------------------------------------------------------------------------------

def ncsn_sigmas(sigma_1=1.0, sigma_L=0.01, L=10):
    """The noise levels sigma_1 > ... > sigma_L, a geometric sequence (Song & Ermon 2019; their
    experiments on data in [0, 1] take sigma_1 = 1, sigma_L = 0.01, L = 10). Returns (L,) float64."""
    if not (sigma_1 > sigma_L > 0 and L >= 2):
        raise ValueError(f"noise levels need sigma_1 > sigma_L > 0 and L >= 2; got {sigma_1}, {sigma_L}, {L}")
    return torch.exp(torch.linspace(math.log(sigma_1), math.log(sigma_L), L, dtype=torch.float64))


def ncsn_loss(score_fn, sigmas, x0, labels=None, z=None, generator=None):
    """The NCSN objective (Song & Ermon 2019, Eqs. 5-6) with lambda(sigma) = sigma^2, per example (B,):

        lambda(sigma_i) 1/2 || s(x~, sigma_i) + (x~ - x) / sigma_i^2 ||^2 = 1/2 || sigma_i s(x~, sigma_i) + z ||^2,

    x~ = x + sigma_i z, z ~ N(0, I), with one level i ~ U{1..L} per example (`labels`, drawn
    unless given): an unbiased estimate of Eq. 6's average over the L levels. score_fn(x, sigma)
    takes sigma (B,)."""
    sigmas = torch.as_tensor(sigmas, dtype=x0.dtype, device=x0.device)
    if labels is None:
        labels = torch.randint(len(sigmas), (x0.shape[0],), generator=generator, device=x0.device)
    if z is None:
        z = _randn(x0.shape, x0, generator)
    sigma = sigmas[labels]
    x_tilde = x0 + _expand(sigma, x0) * z
    return 0.5 * _sum_dims((_expand(sigma, x0) * score_fn(x_tilde, sigma) + z) ** 2)


@torch.inference_mode()
def annealed_langevin_dynamics(score_fn, x, sigmas, eps=2e-5, n_steps_each=100, generator=None):
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1), batched, from x:

        for i = 1..L:   alpha_i = eps * sigma_i^2 / sigma_L^2
            for t = 1..T:   x <- x + alpha_i / 2 * s(x, sigma_i) + sqrt(alpha_i) z,  z ~ N(0, I)

    score_fn(x, sigma) with sigma (B,). The paper: eps = 2e-5, T = 100. Returns the last x (no
    denoising step, as Algorithm 1)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if eps <= 0 or n_steps_each < 1 or len(sigmas) < 1:
        raise ValueError(f"annealed Langevin needs eps > 0, n_steps_each >= 1 and noise levels; "
                         f"got {eps}, {n_steps_each}, {len(sigmas)}")
    sigma_L = sigmas[-1].item()
    for sigma in sigmas.tolist():
        alpha = eps * sigma ** 2 / sigma_L ** 2          # step size alpha_i
        s_vec = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        for _ in range(n_steps_each):
            # (the NCSN family's code steps x + a s + sqrt(2 a) z: twice Algorithm 1's step for one eps)
            x = x + 0.5 * alpha * score_fn(x, s_vec) + math.sqrt(alpha) * _randn(x.shape, x, generator)
    return x


# ----------------------------------------------------------------------------------------
# The SDEs (SDE paper Sec. 3.4, App. B and App. C)
# ----------------------------------------------------------------------------------------

class _LinearSDE:
    """dx = f(x, t) dt + g(t) dw on t in [0, T], T = 1 (SDE paper Eq. 5), with a drift linear in
    x, so that every perturbation kernel is Gaussian,

        p_0t(x(t) | x(0)) = N(m(t) x(0), sigma(t)^2 I),

    with m(t) = exp(log_mean_coeff(t)) and sigma(t) = std(t) given by each subclass. Every
    method takes t as a (B,) tensor (or a scalar) and works in the dtype of its tensor input.
    """

    T = 1.0
    prior_std = 1.0
    sampling_eps = 1e-3   # App. C: samplers stop at t = eps, 1e-3 for VP (DDPM's x_1), 1e-5 for VE

    def marginal_prob(self, x0, t):
        """The mean m(t) x0 and std sigma(t) of p_0t(x(t) | x(0) = x0) (App. B Eq. 29, App. C),
        closed form.
        Returns (mean shaped like x0, std (B,))."""
        return _expand(torch.exp(self.log_mean_coeff(t)), x0) * x0, self.std(t)

    def prior_sample(self, shape, device="cpu", dtype=torch.float32, generator=None):
        """x(T) ~ pi = N(0, prior_std^2 I), the SDE paper's prior for each SDE."""
        return self.prior_std * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_log_prob(self, z):
        """log pi(z) = -D/2 log(2 pi s^2) - ||z||^2 / (2 s^2) per example (B,), s = prior_std."""
        D = z[0].numel()
        return -0.5 * D * math.log(2 * math.pi * self.prior_std ** 2) - _sum_dims(z ** 2) / (2 * self.prior_std ** 2)


class VESDE(_LinearSDE):
    """Variance exploding SDE (SDE paper Eq. 9), the continuous limit of SMLD / NCSN:

        dx = sqrt(d[sigma^2(t)]/dt) dw,   sigma(t) = sigma_min (sigma_max / sigma_min)^t,
        f = 0,  g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min)),  prior N(0, sigma_max^2 I).

    Convention: App. B's Eq. 29 writes the kernel as N(x0, [sigma(t)^2 - sigma(0)^2] I), with
    sigma(0) = 0 by SMLD's convention; App. C, for this geometric sigma(t), gives N(x0, sigma(t)^2 I)
    on t in (0, 1], which is used here (and in the official code): p_0 is the data convolved with
    N(0, sigma_min^2 I), and the kernel from it is exactly consistent with the SDE for all t.
    """

    sampling_eps = 1e-5   # App. C: VE samplers run down to t = 1e-5

    def __init__(self, sigma_min=0.01, sigma_max=50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VE SDE needs 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.log_ratio = math.log(sigma_max / sigma_min)
        self.prior_std = sigma_max

    def std(self, t):
        return self.sigma_min * torch.exp(t * self.log_ratio)

    def log_mean_coeff(self, t):
        return torch.zeros_like(torch.as_tensor(t))

    def t_of_sigma(self, sigma):
        """The time at which sigma(t) = sigma (to run NCSN's sampler on a VE model)."""
        return torch.log(sigma / self.sigma_min) / self.log_ratio

    def sde(self, x, t):
        """(f(x, t), g(t)): f = 0, g = sigma(t) sqrt(2 log(sigma_max / sigma_min)), g (B,)."""
        return torch.zeros_like(x), self.std(t) * math.sqrt(2 * self.log_ratio)

    def discretize(self, t, t_prev):
        """The exact transition x_t = a x_{t_prev} + G z (SMLD's Markov chain, Eq. 8:
        x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z): a = 1, G^2 = sigma(t)^2 - sigma(t_prev)^2.
        In the paper's form x_{i+1} = x_i + f_i(x_i) + G_i z_i, f_i(x) = (a - 1) x."""
        s = self.std(t)
        G = s * torch.sqrt(-torch.expm1(2 * self.log_ratio * (t_prev - t)))  # sigma^2 (1 - (sigma_prev/sigma)^2)
        return torch.ones_like(s), G


class VPSDE(_LinearSDE):
    """Variance preserving SDE (SDE paper Eq. 11), the continuous limit of DDPM:

        dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,   beta(t) = beta_min + t (beta_max - beta_min),
        kernel N(x0 e^{-1/2 int_0^t beta}, (1 - e^{-int_0^t beta}) I)  (App. B Eq. 29),  prior N(0, I).
    """

    def __init__(self, beta_min=0.1, beta_max=20.0):
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"VP SDE needs 0 <= beta_min < beta_max; got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t):
        """log m(t) = -1/2 int_0^t beta(s) ds = -1/2 beta_min t - 1/4 (beta_max - beta_min) t^2."""
        return -0.5 * self.beta_min * t - 0.25 * (self.beta_max - self.beta_min) * t ** 2

    def std(self, t):
        return torch.sqrt(-torch.expm1(2 * self.log_mean_coeff(t)))  # sqrt(1 - m^2)

    def sde(self, x, t):
        """(f(x, t), g(t)): f = -1/2 beta(t) x, g = sqrt(beta(t)), g (B,)."""
        beta = self.beta(t)
        return -0.5 * _expand(beta, x) * x, torch.sqrt(beta)

    def discretize(self, t, t_prev):
        """The exact transition x_t = a x_{t_prev} + G z: DDPM's chain x_i = sqrt(1 - beta_i)
        x_{i-1} + sqrt(beta_i) z (Eq. 10) with beta_i = 1 - m(t)^2 / m(t_prev)^2 =
        1 - a^2. (App. C uses beta_i = beta(t_i) / N, the same to first order in 1/N.)"""
        delta = self.log_mean_coeff(t) - self.log_mean_coeff(t_prev)   # log a
        return torch.exp(delta), torch.sqrt(-torch.expm1(2 * delta))


class SubVPSDE(VPSDE):
    """sub-VP SDE (SDE paper Eq. 12), whose variance stays below the VP SDE's:

        dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - e^{-2 int_0^t beta})) dw,
        kernel N(x0 e^{-1/2 int_0^t beta}, (1 - e^{-int_0^t beta})^2 I)  (App. B Eq. 29),  prior N(0, I).
    """

    def std(self, t):
        return -torch.expm1(2 * self.log_mean_coeff(t))  # 1 - m^2

    def sde(self, x, t):
        beta = self.beta(t)
        discount = -torch.expm1(4 * self.log_mean_coeff(t))  # 1 - e^{-2 int beta} = 1 - m^4
        return -0.5 * _expand(beta, x) * x, torch.sqrt(beta * discount)

    def discretize(self, t, t_prev):
        """The exact transition x_t = a x_{t_prev} + G z of the linear SDE (the paper gives no
        chain for sub-VP; the official code discretises it by Euler-Maruyama): a = m(t) / m(t_prev) and
        G^2 = sigma(t)^2 - a^2 sigma(t_prev)^2 = (1 - a^2)(1 - m(t)^2 m(t_prev)^2)."""
        lt, lp = self.log_mean_coeff(t), self.log_mean_coeff(t_prev)
        delta = lt - lp
        return torch.exp(delta), torch.sqrt(-torch.expm1(2 * delta) * -torch.expm1(2 * (lt + lp)))


SDES = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE}


def probability_flow_drift(sde, score_fn, x, t):
    """The probability-flow ODE's velocity (SDE paper Eq. 13): f~(x, t) = f(x, t) - 1/2 g(t)^2 s(x, t)."""
    f, g = sde.sde(x, t)
    return f - 0.5 * _expand(g ** 2, x) * score_fn(x, t)


# ----------------------------------------------------------------------------------------
# Training objectives: denoising (Eq. 7) and sliced score matching
# ----------------------------------------------------------------------------------------

def make_score_fn(model, sde):
    """s_theta(x, t) = -model(x, t) / sigma(t): the network predicts the noise z of
    x_t = m x0 + sigma z (as the official code's VP models and, up to sign, its VE models with
    scale_by_sigma), so that dsm_loss becomes ||model(x_t, t) - z||^2 / D."""
    def score_fn(x, t):
        return -model(x, t) / _expand(sde.std(t), x)
    return score_fn


def make_ncsn_score_fn(model, sde):
    """NCSN's s(x, sigma) from a network of the VE SDE's time, at t = `sde.t_of_sigma(sigma)`:
    t is affine in log sigma, so the network is conditioned on log sigma_i (not on the index i)."""
    score_fn = make_score_fn(model, sde)
    return lambda x, sigma: score_fn(x, sde.t_of_sigma(sigma))


def _sample_t(x0, eps, T, generator):
    if not 0 < eps < T:
        raise ValueError(f"eps {eps} is out of range; accepted: 0 < eps < {T}")
    return eps + (T - eps) * torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)


def dsm_target(sde, x_t, x0, t):
    """grad_{x_t} log p_0t(x_t | x0) = -(x_t - m(t) x0) / sigma(t)^2, the regression target of
    denoising score matching (Vincent 2011; SDE paper Eq. 7). Its mean given x_t is the score of
    the perturbed data, grad log p_t(x_t), so the loss is minimised by the true score."""
    mean, std = sde.marginal_prob(x0, t)
    return -(x_t - mean) / _expand(std, x_t) ** 2


def dsm_loss(score_fn, sde, x0, t=None, z=None, eps=1e-5, generator=None):
    """Denoising score matching with lambda(t) = sigma(t)^2 (SDE paper Eq. 7) per example (B,):

        lambda(t) || s(x_t, t) - grad log p_0t(x_t | x0) ||^2 / D = ||sigma s + z||^2 / D,

    x_t = m(t) x0 + sigma(t) z, t ~ U(eps, T) and z ~ N(0, I) unless given; averaged over the D
    dimensions (Eq. 7 sums them)."""
    if t is None:
        t = _sample_t(x0, eps, sde.T, generator)
    if z is None:
        z = _randn(x0.shape, x0, generator)
    mean, std = sde.marginal_prob(x0, t)
    x_t = mean + _expand(std, x0) * z
    target = dsm_target(sde, x_t, x0, t)
    return (_expand(std, x0) ** 2 * (score_fn(x_t, t) - target) ** 2).reshape(x0.shape[0], -1).mean(1)


def sliced_score_matching_loss(score_fn, sde, x0, t=None, z=None, v=None, eps=1e-5,
                               variance_reduction=True, generator=None):
    """Sliced score matching (Song, Garg, Shi & Ermon 2019) on the perturbed data x_t ~ p_t,
    with Eq. 7's weighting (the SDE paper's App. A, Eq. 19), per example (B,):

        SSM:     lambda(t) [2 v^T (ds/dx) v + (v^T s)^2] / D,     v ~ N(0, I)
        SSM-VR:  lambda(t) [2 v^T (ds/dx) v + ||s||^2] / D        (variance_reduction=True)

    This is twice the paper's objective, so that its expectation equals dsm_loss's up to a
    constant independent of s: by Hyvarinen 2005 (Thm. 1) E[tr ds/dx + 1/2 ||s||^2] =
    1/2 E||s - grad log p_t||^2 - 1/2 E||grad log p_t||^2, and E_v[v^T A v] = tr A. Unlike DSM it
    needs no kernel, only samples of p_t, at the cost of a vector-Jacobian product (kept in the
    graph, create_graph=True, so that training backpropagates through it).
    """
    if t is None:
        t = _sample_t(x0, eps, sde.T, generator)
    if z is None:
        z = _randn(x0.shape, x0, generator)
    if v is None:
        v = _randn(x0.shape, x0, generator)
    mean, std = sde.marginal_prob(x0, t)
    with torch.enable_grad():
        x_t = (mean + _expand(std, x0) * z).detach().requires_grad_(True)
        s = score_fn(x_t, t)
        (grad_sv,) = torch.autograd.grad((s * v).sum(), x_t, create_graph=True)
    vJv = _sum_dims(grad_sv * v)                                     # v^T (ds/dx) v
    square = _sum_dims(s ** 2) if variance_reduction else _sum_dims(s * v) ** 2
    return std ** 2 * (2 * vJv + square) / x0[0].numel()


def divergence_exact(f_x, x, create_graph=False):
    """div f = sum_i d f_i / d x_i per example (B,), by one vector-Jacobian product per
    dimension: exact, D times the cost of a gradient (for 2D points). f_x = f(x) must be
    computed from x with x.requires_grad, each example from its own input only; create_graph
    keeps the divergence differentiable (for training on it)."""
    f_flat = f_x.reshape(f_x.shape[0], -1)
    div = torch.zeros(f_x.shape[0], dtype=f_x.dtype, device=f_x.device)
    for i in range(f_flat.shape[1]):
        (grad,) = torch.autograd.grad(f_flat[:, i].sum(), x, retain_graph=True, create_graph=create_graph)
        div = div + grad.reshape(grad.shape[0], -1)[:, i]
    return div


def hyvarinen_score_matching(score_fn, x, create_graph=False):
    """The integrand of Hyvarinen's J(s) = E_p[tr(grad_x s) + 1/2 ||s||^2] (Hyvarinen 2005, Thm. 1:
    J = 1/2 E_p||s - grad log p||^2 + a constant) per example (B,), exact divergence; score_fn(x)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        s = score_fn(x)
        return divergence_exact(s, x, create_graph) + 0.5 * _sum_dims(s ** 2)


def score_matching_loss(score_fn, sde, x0, t=None, z=None, eps=1e-5, generator=None):
    """Exact score matching on the perturbed data x_t ~ p_t with Eq. 7's weighting, per example (B,):

        lambda(t) [2 tr(ds/dx) + ||s||^2] / D  =  2 lambda(t) J(s(., t)) / D    (`hyvarinen_score_matching`),

    `sliced_score_matching_loss` with the exact trace in place of v^T (ds/dx) v: its expectation
    equals dsm_loss's up to a constant independent of s. D vector-Jacobian products (2D points)."""
    if t is None:
        t = _sample_t(x0, eps, sde.T, generator)
    if z is None:
        z = _randn(x0.shape, x0, generator)
    mean, std = sde.marginal_prob(x0, t)
    J = hyvarinen_score_matching(lambda x: score_fn(x, t), mean + _expand(std, x0) * z, create_graph=True)
    return std ** 2 * 2 * J / x0[0].numel()


LOSSES = ("dsm", "ssm", "ssm-vr", "sm")


def training_loss(model, sde, x0, loss="dsm", eps=1e-5, generator=None, sigmas=None, weighting="sigma2",
                  importance_sampling=False):
    """The training objective per example (B,) for a network `model(x, t)` that predicts the
    noise (`make_score_fn`): "dsm" (Eq. 7 with lambda = sigma^2, `dsm_loss`; with weighting
    "likelihood", lambda = g^2, `likelihood_weighted_dsm_loss`, t importance-sampled or not),
    sliced score matching with lambda = sigma^2 (App. A Eq. 19, `sliced_score_matching_loss`:
    "ssm" with (v^T s)^2, "ssm-vr" with ||s||^2), or exact score matching ("sm",
    `score_matching_loss`); t ~ U(eps, T). With NCSN's levels `sigmas` (a VE sde): `ncsn_loss` / D
    instead (averaged over the dimensions as dsm_loss). It calls model's forward, so DDP's
    gradient hooks fire."""
    if weighting not in ("sigma2", "likelihood"):
        raise ValueError(f"weighting {weighting!r} is unknown; accepted: 'sigma2', 'likelihood'")
    if (weighting == "likelihood" and sigmas is not None) or (importance_sampling and weighting != "likelihood"):
        raise ValueError(f"likelihood weighting is for the SDEs' losses and importance sampling for it; got NCSN "
                         f"levels {sigmas is not None}, weighting {weighting!r}, importance_sampling {importance_sampling}")
    if sigmas is not None:
        return ncsn_loss(make_ncsn_score_fn(model, sde), sigmas, x0, generator=generator) / x0[0].numel()
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r} is unknown; accepted: {', '.join(LOSSES)}")
    score_fn = make_score_fn(model, sde)
    if loss == "dsm" and weighting == "likelihood":
        return likelihood_weighted_dsm_loss(score_fn, sde, x0, importance_sampling, eps=eps, generator=generator)
    if loss == "dsm":
        return dsm_loss(score_fn, sde, x0, eps=eps, generator=generator)
    t = likelihood_time(sde, x0, importance_sampling, eps, generator) if weighting == "likelihood" else None
    if loss in ("ssm", "ssm-vr"):
        value = sliced_score_matching_loss(score_fn, sde, x0, t, eps=eps, variance_reduction=loss == "ssm-vr",
                                           generator=generator)
    else:
        value = score_matching_loss(score_fn, sde, x0, t, eps=eps, generator=generator)
    if weighting == "likelihood" and not importance_sampling:
        value = likelihood_factor(sde, t, eps).to(value.dtype) * value
    return value


# ----------------------------------------------------------------------------------------
# Sampling the reverse-time SDE: predictors, the Langevin corrector, PC (SDE paper Sec. 4)
# ----------------------------------------------------------------------------------------

def euler_maruyama_predictor(sde, score_fn, x, t, t_next, generator=None):
    """One Euler-Maruyama step of the reverse-time SDE dx = [f - g^2 s] dt + g dw-bar (SDE paper
    Eq. 6) from t down to t_next: x_mean = x - [f - g^2 s] dt, x = x_mean + g sqrt(dt) z,
    dt = t - t_next. Returns (x, x_mean)."""
    f, g = sde.sde(x, t)
    dt = _expand(t - t_next, x)
    x_mean = x - (f - _expand(g ** 2, x) * score_fn(x, t)) * dt
    return x_mean + _expand(g, x) * dt.sqrt() * _randn(x.shape, x, generator), x_mean


def reverse_diffusion_predictor(sde, score_fn, x, t, t_next, generator=None):
    """The reverse diffusion sampler (SDE paper App. E, Eq. 46) for the forward discretisation
    x_{i+1} = x_i + f_i(x_i) + G_i z_i (`discretize`): x_i = x_{i+1} - f_{i+1} + G_{i+1}^2 s + G_{i+1} z.
    Returns (x, x_mean)."""
    a, G = sde.discretize(t, t_next)
    x_mean = x - _expand(a - 1, x) * x + _expand(G ** 2, x) * score_fn(x, t)
    return x_mean + _expand(G, x) * _randn(x.shape, x, generator), x_mean


PREDICTORS = {"reverse_diffusion": reverse_diffusion_predictor, "euler_maruyama": euler_maruyama_predictor}


def langevin_corrector(score_fn, x, t, snr, alpha=1.0, generator=None):
    """One Langevin MCMC step on p_t with the signal-to-noise step size (SDE paper App. G,
    Algorithms 4 (VE, alpha = 1) and 5 (VP, alpha_i = 1 - beta_i)): eps = 2 alpha (r ||z|| / ||s||)^2,
    x <- x + eps s(x, t) + sqrt(2 eps) z, so that ||eps s|| / ||sqrt(2 eps) z|| = r sqrt(alpha).
    Returns (x, x_mean)."""
    s = score_fn(x, t)
    z = _randn(x.shape, x, generator)
    # norms averaged over the batch (App. G): a per-example ||s|| can vanish at a mode of 2D data
    z_norm, s_norm = (v.reshape(v.shape[0], -1).norm(dim=1).mean() for v in (z, s))
    alpha = torch.as_tensor(alpha, dtype=x.dtype, device=x.device).expand(x.shape[0])
    step = 2 * _expand(alpha, x) * (snr * z_norm / s_norm) ** 2
    x_mean = x + step * s
    return x_mean + torch.sqrt(2 * step) * z, x_mean


def _time_grid(sde, n_steps, eps, like):
    if n_steps < 1:
        raise ValueError(f"n_steps {n_steps} is out of range; accepted: n_steps >= 1")
    if not 0 < eps < sde.T:
        raise ValueError(f"eps {eps} is out of range; accepted: 0 < eps < {sde.T}")
    return torch.linspace(sde.T, eps, n_steps + 1, dtype=like.dtype, device=like.device)


@torch.inference_mode()
def pc_sample(sde, score_fn, shape, n_steps=1000, predictor="reverse_diffusion", corrector="langevin",
              snr=0.16, n_corrector_steps=1, eps=1e-3, denoise=True, device="cpu", dtype=torch.float32,
              generator=None):
    """Predictor-corrector sampling (SDE paper Sec. 4.2; App. G, Algorithm 1, and Algorithms 2
    (VE) and 3 (VP) with the reverse diffusion predictor and the Langevin corrector).

    x(T) ~ pi; on the grid t_0 = T > t_1 > ... > t_N = eps (N = n_steps, uniform), at each t_i:
    `n_corrector_steps` Langevin steps on p_{t_i} (alpha = a^2 of the step, 1 for VE and
    1 - beta_i for VP), then one predictor step to t_{i+1}. The corrector runs before the
    predictor, as in the official code (Algorithm 1 writes the predictor first: the same
    alternation, started one step later), so no score is evaluated at t = eps. predictor:
    "reverse_diffusion", "euler_maruyama" or None; corrector: "langevin" or None (so
    predictor="euler_maruyama", corrector=None is the plain reverse-SDE sampler). denoise: return
    the last step's mean, without its noise. The paper: N = 1000, snr = 0.16, one corrector
    step. Costs N (1 + n_corrector_steps) score evaluations.
    """
    if predictor is not None and predictor not in PREDICTORS:
        raise ValueError(f"predictor {predictor!r} is unknown; accepted: {', '.join(PREDICTORS)} or None")
    if corrector not in ("langevin", None):
        raise ValueError(f"corrector {corrector!r} is unknown; accepted: 'langevin' or None")
    if corrector and (snr <= 0 or n_corrector_steps < 1):
        raise ValueError(f"the corrector needs snr > 0 and n_corrector_steps >= 1; got {snr}, {n_corrector_steps}")
    x = sde.prior_sample(shape, device, dtype, generator)
    ts = _time_grid(sde, n_steps, eps, x)
    x_mean = x
    for i in range(n_steps):
        t, t_next = ts[i].expand(shape[0]), ts[i + 1].expand(shape[0])
        if corrector:
            alpha = sde.discretize(t, t_next)[0] ** 2
            for _ in range(n_corrector_steps):
                x, x_mean = langevin_corrector(score_fn, x, t, snr, alpha, generator)
        if predictor:
            x, x_mean = PREDICTORS[predictor](sde, score_fn, x, t, t_next, generator)
    return x_mean if denoise else x


def annealed_langevin_sample(sde, score_fn, shape, n_levels=10, n_steps_each=100, eps=2e-5, device="cpu",
                             dtype=torch.float32, generator=None):
    """Song & Ermon's Algorithm 1 run on a VE SDE model: the noise levels sigma_i geometric from
    sigma_max down to sigma_min (`ncsn_sigmas`), each scored at the time t_i with sigma(t_i) =
    sigma_i (`VESDE.t_of_sigma`), from x ~ N(0, sigma_max^2 I), the VE prior. The VE SDE is SMLD's
    continuous limit (Eq. 9), so its score at sigma(t) is NCSN's s(x, sigma). Costs
    n_levels * n_steps_each score evaluations. Returns the samples (no denoising step)."""
    if not isinstance(sde, VESDE):
        raise ValueError(f"annealed Langevin dynamics needs a VE SDE (noise levels sigma); got {type(sde).__name__}")
    sigmas = ncsn_sigmas(sde.sigma_max, sde.sigma_min, n_levels)
    x = sde.prior_sample(shape, device, dtype, generator)

    def score_at_sigma(x, sigma):
        return score_fn(x, sde.t_of_sigma(sigma))

    return annealed_langevin_dynamics(score_at_sigma, x, sigmas, eps, n_steps_each, generator)


# ----------------------------------------------------------------------------------------
# An adaptive ODE solver: Dormand-Prince 5(4)
# ----------------------------------------------------------------------------------------

# Dormand & Prince 1980 (Hairer, Norsett & Wanner, "Solving ODEs I", Table II.5.2): nodes c,
# stages a, the 5th-order weights b (equal to the last row of a: first same as last) and the
# embedded 4th-order weights b4.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = ((),
         (1 / 5,),
         (3 / 40, 9 / 40),
         (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
         (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def dopri5_step(f, t, y, h, k1):
    """One Dormand-Prince step of size h from (t, y), k1 = f(t, y) already known.

    Returns (y5, err, k7): y5 the 5th-order solution (the one kept: local extrapolation),
    err = y5 - y4 against the embedded 4th-order solution (the local error estimate, O(h^5)),
    and k7 = f(t + h, y5), the next step's k1 (first same as last: 6 evaluations per step).
    """
    k = [k1]
    for i in range(1, 7):
        y_i = y + h * sum(a * k_j for a, k_j in zip(_DP_A[i], k) if a != 0.0)
        k.append(f(t + _DP_C[i] * h, y_i))
        if i == 6:
            y5 = y_i                      # the last stage is evaluated at the 5th-order solution
    err = h * sum((b5 - b4) * k_j for b5, b4, k_j in zip(_DP_B5, _DP_B4, k))
    return y5, err, k[6]


def _error_norm(v):
    """max over examples of the RMS over each example's components: every example of the batch
    meets the tolerance, not only their average."""
    return v.reshape(v.shape[0], -1).pow(2).mean(1).sqrt().max().item()


def dopri5(f, y0, t0, t1, rtol=1e-5, atol=1e-5, max_steps=100_000):
    """Solve dy/dt = f(t, y), y(t0) = y0, to t1 (either direction) by Dormand-Prince 5(4) with
    step-size control (Hairer, Norsett & Wanner, "Solving ODEs I", Sec. II.4).

    y0 (B, ...) holds B independent systems solved with one step size. A step is accepted when

        max_b RMS_b( err / (atol + rtol max(|y|, |y5|)) ) <= 1,

    and the next step is h min(10, max(0.2, 0.9 err^(-1/5))) (no growth after a rejection).
    The first step follows Hairer's starting-step algorithm. The global error
    is typically a small multiple of the tolerances. Returns (y(t1), nfe), nfe the number of
    evaluations of f. Raises RuntimeError when the step size underflows or after max_steps.
    """
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"tolerances must be positive; got rtol={rtol}, atol={atol}")
    nfe = 0

    def fun(t, y):
        nonlocal nfe
        nfe += 1
        return f(t, y)

    t0, t1 = float(t0), float(t1)
    direction = 1.0 if t1 >= t0 else -1.0
    span = abs(t1 - t0)
    if span == 0:
        return y0, 0
    t, y = t0, y0
    k1 = fun(t, y)
    scale = atol + rtol * y.abs()   # Hairer's starting step
    d0, d1 = _error_norm(y / scale), _error_norm(k1 / scale)
    h = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h = min(h, span)
    f1 = fun(t + direction * h, y + direction * h * k1)
    d2 = _error_norm((f1 - k1) / scale) / h
    h1 = max(1e-6, h * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** 0.2
    h = min(100 * h, h1, span)
    steps, rejected_last = 0, False
    while direction * (t1 - t) > 0:
        steps += 1
        if steps > max_steps:
            raise RuntimeError(f"ODE solver: more than {max_steps} steps between t = {t0} and {t1}")
        last = h >= abs(t1 - t)
        if last:
            h = abs(t1 - t)
        if h < 1e-14 * max(1.0, abs(t)):
            raise RuntimeError(f"ODE solver: step size underflow at t = {t}")
        y_new, err, k7 = dopri5_step(fun, t, y, direction * h, k1)
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        err_norm = _error_norm(err / scale)
        if err_norm <= 1.0:
            t = t1 if last else t + direction * h
            y, k1 = y_new, k7
            factor = 10.0 if err_norm == 0 else min(10.0, max(0.2, 0.9 * err_norm ** -0.2))
            h *= min(1.0, factor) if rejected_last else factor
            rejected_last = False
        else:
            h *= max(0.2, 0.9 * err_norm ** -0.2)
            rejected_last = True
    return y, nfe


# ----------------------------------------------------------------------------------------
# The probability-flow ODE: sampling and the exact likelihood (SDE paper Sec. 4.3, App. D)
# ----------------------------------------------------------------------------------------

@torch.inference_mode()
def ode_sample(sde, score_fn, shape, rtol=1e-5, atol=1e-5, eps=1e-3, z=None, device="cpu",
               dtype=torch.float32, generator=None):
    """Samples by integrating the probability-flow ODE (Eq. 13) from x(T) = z ~ pi down to
    t = eps with `dopri5` (App. D.4: RK45 at rtol = atol = 1e-5, eps = 1e-3 for VP and
    1e-5 for VE, `sde.sampling_eps`). Deterministic given z: the inverse of the map that
    `ode_log_likelihood` follows. Returns (x(eps), nfe)."""
    if not 0 < eps < sde.T:
        raise ValueError(f"eps {eps} is out of range; accepted: 0 < eps < {sde.T}")
    x = sde.prior_sample(shape, device, dtype, generator) if z is None else z

    def velocity(t, x):
        return probability_flow_drift(sde, score_fn, x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))

    return dopri5(velocity, x, sde.T, eps, rtol, atol)


def divergence_hutchinson(f_x, x, v):
    """The Hutchinson-Skilling estimate v^T (df/dx) v of div f per example (B,), one
    vector-Jacobian product: unbiased when E[v v^T] = I (Gaussian or Rademacher v); Rademacher
    has the smaller variance, 2 sum_{i != j} A_ij^2 against Gaussian's 2 ||A||_F^2 (A
    symmetrised). Same requirements on f_x as divergence_exact."""
    (grad,) = torch.autograd.grad((f_x * v).sum(), x)
    return _sum_dims(grad * v)


@torch.no_grad()
def ode_log_likelihood(sde, score_fn, x, divergence="exact", noise="rademacher", eps=1e-5,
                       rtol=1e-5, atol=1e-5, prior_log_prob=None, generator=None):
    """The exact log-likelihood of the probability-flow model (SDE paper App. D.2, Eqs. 38-40),
    per example.

    Integrates the augmented ODE from t = eps to T,

        d/dt [x(t), delta(t)] = [f~(x, t), div f~(x, t)],   x(eps) = x, delta(eps) = 0,

    with f~ = f - 1/2 g^2 s_theta (Eq. 13), and returns

        log p(x) = log pi(x(T)) + delta(T) = log pi(x(T)) + int_eps^T div f~(x(t), t) dt,

    the instantaneous change of variables: d/dt log p_t(x(t)) = -div f~ along a path of the flow.
    divergence: "exact" (D vector-Jacobian products, for 2D points) or "hutchinson" (one, for
    images), its probe v ("rademacher" or "gaussian") drawn once and kept for the whole solve,
    so the integrand is a smooth ODE and the result an unbiased estimate of the exact value.
    eps = 1e-5 (App. C) and rtol = atol = 1e-5 (App. D.2). prior_log_prob replaces log pi
    (a test passes the exact log p_T). x in model space ((k + u)/L * 2 - 1 for images, see
    `dequantized_nll`). Not under inference_mode: the divergence needs autograd.

    Returns (log_p (B,) in nats, z = x(T), nfe).
    """
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence {divergence!r} is unknown; accepted: 'exact', 'hutchinson'")
    if noise not in ("rademacher", "gaussian"):
        raise ValueError(f"noise {noise!r} is unknown; accepted: 'rademacher', 'gaussian'")
    if not 0 < eps < sde.T:
        raise ValueError(f"eps {eps} is out of range; accepted: 0 < eps < {sde.T}")
    B, D = x.shape[0], x[0].numel()
    v = None
    if divergence == "hutchinson":
        v = _randn(x.shape, x, generator)
        if noise == "rademacher":
            v = torch.sign(v)   # +-1 with probability 1/2 each

    def augmented(t, state):
        t_vec = torch.full((B,), t, dtype=x.dtype, device=x.device)
        with torch.enable_grad():
            x_t = state[:, :D].reshape(x.shape).detach().requires_grad_(True)
            drift = probability_flow_drift(sde, score_fn, x_t, t_vec)
            div = divergence_exact(drift, x_t) if v is None else divergence_hutchinson(drift, x_t, v)
        return torch.cat([drift.detach().reshape(B, D), div.detach()[:, None]], 1)

    state0 = torch.cat([x.reshape(B, D), torch.zeros(B, 1, dtype=x.dtype, device=x.device)], 1)
    state, nfe = dopri5(augmented, state0, eps, sde.T, rtol, atol)
    z, delta = state[:, :D].reshape(x.shape), state[:, D]
    log_prior = (sde.prior_log_prob if prior_log_prob is None else prior_log_prob)(z)
    return log_prior + delta, z, nfe


# ----------------------------------------------------------------------------------------
# Discrete data: uniform dequantisation and bits/dim
# ----------------------------------------------------------------------------------------

def dequantize(x, levels, u=None, generator=None):
    """Integer levels k in {0..L-1}^D -> model space y = (k + u) / L * 2 - 1 in [-1, 1)^D,
    u ~ U[0, 1)^D (Theis, van den Oord & Bethge 2016), in the default float dtype. `u` may be
    given (tests pass a fixed one)."""
    k = x.to(torch.get_default_dtype()) if not x.is_floating_point() else x
    if u is None:
        u = torch.rand(k.shape, generator=generator, device=k.device, dtype=k.dtype)
    return (k + u) / levels * 2 - 1


def quantize(y, levels):
    """Model space back to levels: floor((y + 1) / 2 * L) clipped to {0..L-1} (the cube y is in)."""
    return torch.floor((y + 1) / 2 * levels).clamp(0, levels - 1).to(torch.uint8 if levels <= 256 else torch.long)


def dequantized_nll(log_p_y, num_dims, levels):
    """-log p_Y(y) - D log(2 / L) at y = dequantize(k): an unbiased one-sample estimate of the
    uniform-dequantisation bound on the discrete NLL -log P(k) (Theis et al. 2016, Sec. 3.1;
    derived in realnvp.py), with the Jacobian (2 / L)^D of y = 2 (k + u) / L - 1; in bits/dim the
    offset is log2(L / 2), 7 bits for L = 256 (the official code's `offset`)."""
    return -log_p_y - num_dims * math.log(2.0 / levels)


def bits_per_dim(nats, dims):
    """Nats per example -> bits per dimension: nats / (dims ln 2)."""
    return nats / (dims * math.log(2))


# ----------------------------------------------------------------------------------------
# Likelihood weighting (Song, Durkan, Murray & Ermon 2021, arXiv 2101.09258)
# ----------------------------------------------------------------------------------------

def likelihood_weight(sde, t):
    """g(t)^2 / sigma(t)^2: the likelihood weighting lambda(t) = g(t)^2 (Song et al. 2021b, Thm. 1:
    KL(p_0 || p_theta^SDE) <= 1/2 int_0^T g^2 E||s_theta - grad log p_t||^2 dt + KL(p_T || pi)) seen
    by the noise regression, g^2 ||s - grad log p_0t||^2 = g^2 / sigma^2 ||sigma s + z||^2."""
    t = torch.as_tensor(t)
    return sde.sde(torch.zeros_like(t), t)[1] ** 2 / sde.std(t) ** 2


def likelihood_weight_integral(sde, t):
    """W(t) = int g^2 / sigma^2 dt (up to a constant) in closed form, with B = int_0^t beta:
    VE 2 log(sigma_max / sigma_min) t; VP log(e^B - 1); sub-VP 2 log(e^B - 1) - B (g^2 / sigma^2 =
    beta / (1 - e^-B) for VP and beta (1 + e^-B) / (1 - e^-B) for sub-VP, App. B of the SDE paper)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if isinstance(sde, VESDE):
        return 2 * sde.log_ratio * t
    B = -2 * sde.log_mean_coeff(t)
    W = torch.log(torch.expm1(B))
    return 2 * W - B if isinstance(sde, SubVPSDE) else W


def likelihood_importance_time(sde, u, eps=1e-5):
    """t with density g(t)^2 / (Z sigma(t)^2) on [eps, T], Z = W(T) - W(eps), from u ~ U(0, 1)
    (Song et al. 2021b, Sec. 4: importance sampling of t for the likelihood weighting): t =
    W^-1(W(eps) + u Z), W inverted in closed form (VP: B = log(1 + e^W); sub-VP: e^B = 1 + a/2 +
    sqrt(a + a^2/4), a = e^W; then B(t) = beta_min t + (beta_max - beta_min) t^2 / 2 solved for t)."""
    if not 0 < eps < sde.T:
        raise ValueError(f"eps {eps} is out of range; accepted: 0 < eps < {sde.T}")
    lo, hi = likelihood_weight_integral(sde, eps), likelihood_weight_integral(sde, sde.T)
    W = lo + torch.as_tensor(u, dtype=torch.float64) * (hi - lo)
    if isinstance(sde, VESDE):
        t = W / (2 * sde.log_ratio)
    else:
        a = torch.exp(W)
        B = torch.log1p(a / 2 + torch.sqrt(a + a ** 2 / 4)) if isinstance(sde, SubVPSDE) else F.softplus(W)
        t = 2 * B / (sde.beta_min + torch.sqrt(sde.beta_min ** 2 + 2 * (sde.beta_max - sde.beta_min) * B))
    return t.clamp(eps, sde.T)


def likelihood_weighted_dsm_loss(score_fn, sde, x0, importance_sampling=False, t=None, z=None, eps=1e-5,
                                 generator=None):
    """Denoising score matching with the likelihood weighting lambda = g^2 (Song et al. 2021b,
    Eq. 7's loss with their Thm. 1's weighting), divided by c = Z / (T - eps), the mean of g^2 /
    sigma^2 over U(eps, T), so that its scale is dsm_loss's; per example (B,):

        t ~ U(eps, T):                    g^2 / (c sigma^2) ||sigma s + z||^2 / D
        t ~ g^2 / (Z sigma^2) (importance):                 ||sigma s + z||^2 / D

    Both estimate (T - eps) / Z E_{t ~ U} [g^2 ||s - grad log p_0t||^2] / D; the second with the
    variance of the weight removed. t and z are drawn unless given. (The same reweighting of the
    sliced and exact losses, whose lambda = sigma^2 too: `training_loss`.)"""
    if t is None:
        t = likelihood_time(sde, x0, importance_sampling, eps, generator)
    loss = dsm_loss(score_fn, sde, x0, t, z, eps, generator)   # ||sigma s + z||^2 / D
    return loss if importance_sampling else likelihood_factor(sde, t, eps).to(loss.dtype) * loss


def likelihood_time(sde, x0, importance_sampling, eps=1e-5, generator=None):
    """t (B,) for the likelihood-weighted losses: importance-sampled (`likelihood_importance_time`)
    or uniform on [eps, T]."""
    if not importance_sampling:
        return _sample_t(x0, eps, sde.T, generator)
    u = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=torch.float64)
    return likelihood_importance_time(sde, u, eps).to(x0.dtype)


def likelihood_factor(sde, t, eps=1e-5):
    """g^2 / (c sigma^2), c = Z / (T - eps): what turns lambda = sigma^2 into g^2 / c at uniform t."""
    Z = (likelihood_weight_integral(sde, sde.T) - likelihood_weight_integral(sde, eps)).item()
    return likelihood_weight(sde, t) * (sde.T - eps) / Z


# ----------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------

def timestep_embedding(t, dim, scale=999.0):
    """Sinusoidal embedding of continuous times t in [0, 1]: [sin(scale t w_i), cos(scale t w_i)],
    w_i = 10000^(-i / (dim/2 - 1)), at scale * t = 999 t: the official code calls its continuous
    VP models with 999 t (DDPM's embedding of a step index in 0..999). (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = scale * t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _zero(module):
    # DDPM++ initialises the last layer of every residual branch and the output at zero
    # (init_scale = 0), so each block starts as the identity and the network as eps = 0.
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


def log_sigma_time(sde, eps=1e-5):
    """c(t) = (log sigma(t) - log sigma(eps)) / (log sigma(T) - log sigma(eps)) in [0, 1]: a time
    uniform in log sigma (for VE, t itself up to eps). The VP SDE's sigma(t) = sqrt(1 - e^-B) covers
    0.003..0.3, the noise levels of thin structure, in t < 0.01: fed t, a network barely tells them
    apart; fed c(t), it spreads them over a third of its input's range."""
    lo, hi = (math.log(sde.std(torch.tensor(v, dtype=torch.float64)).item()) for v in (eps, sde.T))
    return lambda t: (torch.log(sde.std(t)) - lo) / (hi - lo)


class ScoreMLP(nn.Module):
    """Residual MLP for 2D points (our design): the time embedding enters every block through its
    own linear layer. model(x (B, dim), t (B,)) -> (B, dim), the noise prediction (make_score_fn).
    time_map: what is embedded in place of t (`log_sigma_time`), None for t."""

    def __init__(self, dim=2, hidden=128, depth=3, time_map=None):
        super().__init__()
        self.hidden, self.time_map = hidden, time_map
        self.temb = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.ModuleList([nn.Linear(hidden, hidden), nn.Linear(hidden, hidden),
                                                   nn.Linear(hidden, hidden)]) for _ in range(depth))
        self.out = _zero(nn.Linear(hidden, dim))

    def forward(self, x, t):
        emb = self.temb(timestep_embedding(t if self.time_map is None else self.time_map(t), self.hidden).to(x.dtype))
        h = self.inp(x)
        for lin1, lin_t, lin2 in self.blocks:
            h = h + lin2(F.silu(lin1(F.silu(h)) + lin_t(F.silu(emb))))
        return self.out(F.silu(h))


def _norm(c):
    return nn.GroupNorm(min(c // 4, 32), c, eps=1e-6)  # DDPM++'s group count


class ResBlock(nn.Module):
    """The BigGAN-type residual block of DDPM++ (SDE paper App. H; Brock et al. 2019):

        h = conv3x3(resample(swish(GN(x)))) + dense(swish(temb)),
        h = conv3x3(dropout(swish(GN(h))))                       (zero-initialised),
        out = (skip(resample(x)) + h) / sqrt(2)                  (skip rescaling),

    resample: nearest-neighbour doubling (up) or 2x2 average pooling (down) of both paths, or
    with `fir` (a 1D kernel, NCSN++) the FIR resampling `fir_upsample` / `fir_downsample`; skip a
    1x1 convolution when the block resamples or changes the channel count."""

    def __init__(self, cin, cout, temb_dim, dropout, up=False, down=False, fir=None):
        super().__init__()
        self.up, self.down, self.fir = up, down, fir
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2, self.dropout = _norm(cout), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout or up or down else nn.Identity()

    def _resample(self, x):
        if self.up:
            return fir_upsample(x, self.fir) if self.fir else F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return fir_downsample(x, self.fir) if self.fir else F.avg_pool2d(x, 2)
        return x

    def forward(self, x, temb):
        h = self.conv1(self._resample(F.silu(self.norm1(x))))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.skip(self._resample(x)) + h) / math.sqrt(2.0)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (DDPM's), output zero-initialised and
    the sum rescaled by 1/sqrt(2) as DDPM++."""

    def __init__(self, c):
        super().__init__()
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)  # the three 1x1 projections, fused
        self.proj = _zero(nn.Conv2d(c, c, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C), scale 1/sqrt(C)
        return (x + self.proj(a.transpose(1, 2).reshape(b, c, h, w))) / math.sqrt(2.0)


class UNet(nn.Module):
    """A U-Net of the DDPM++ family (SDE paper App. H; the official "DDPM++ cont." configuration
    with ch = 128, ch_mult = (1, 2, 2, 2), num_res_blocks = 4, attention at 16x16, dropout 0.1).

    DDPM's U-Net with the paper's changes: BigGAN-type residual blocks that also do the up- and
    down-sampling, skip connections rescaled by 1/sqrt(2), 4 residual blocks per resolution, zero
    initialisation of every residual branch's last layer and of the output. Down path: at each
    resolution num_res_blocks blocks (attention after each at the `attn_res` sides), then a
    down-sampling block; middle: block, attention, block; up path: num_res_blocks + 1 blocks
    on the concatenated skips, attention once per resolution, an up-sampling block. Time:
    sinusoidal embedding of 999 t and a 2-layer MLP of width 4 ch. Differences from the
    official code: PyTorch's default initialisation elsewhere (theirs: variance scaling,
    fan-average, uniform); with --arch ddpmpp VE models get this same network, conditioned on
    999 t (the official VE models are NCSN++, `NCSNpp`, --arch ncsnpp).
    model(x (B, C, H, W) in model space, t (B,)) -> (B, C, H, W), the noise prediction.
    """

    def __init__(self, in_ch=3, image_size=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4,
                 attn_res=(16,), dropout=0.1, fir=None):
        super().__init__()
        self.fir = fir
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image side {image_size} is not divisible by 2^{len(ch_mult) - 1}; "
                             f"use fewer channel multipliers")
        self.ch, temb_dim = ch, 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        skips, c, res = [ch], ch, image_size
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.blocks, level.attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.blocks.append(ResBlock(c, ch * mult, temb_dim, dropout))
                c = ch * mult
                level.attns.append(AttnBlock(c) if res in attn_res else nn.Identity())
                skips.append(c)
            level.resample = ResBlock(c, c, temb_dim, dropout, down=True, fir=fir) if i < len(ch_mult) - 1 else None
            if level.resample is not None:
                skips.append(c)
                res //= 2
            self.down.append(level)
        self.mid = nn.ModuleList([ResBlock(c, c, temb_dim, dropout), AttnBlock(c),
                                  ResBlock(c, c, temb_dim, dropout)])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.blocks.append(ResBlock(c + skips.pop(), ch * mult, temb_dim, dropout))
                c = ch * mult
            level.attn = AttnBlock(c) if res in attn_res else nn.Identity()
            level.resample = ResBlock(c, c, temb_dim, dropout, up=True, fir=fir) if i > 0 else None
            if level.resample is not None:
                res *= 2
            self.up.append(level)
        self.norm_out = _norm(c)
        self.conv_out = _zero(nn.Conv2d(c, in_ch, 3, padding=1))

    def embed(self, t, x):
        return self.temb(timestep_embedding(t, self.ch).to(x.dtype))

    def forward(self, x, t):
        """x (B, C, H, W), t (B,) in [0, 1] -> (B, C, H, W): the noise the score is made from."""
        emb = self.embed(t, x)
        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, emb))
                hs.append(h)
            if level.resample is not None:
                h = level.resample(h, emb)
                hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            h = level.attn(h)
            if level.resample is not None:
                h = level.resample(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


# --- NCSN++ (SDE paper App. H; the official configs/ve/cifar10_ncsnpp_continuous.py)

def _upfirdn2d(x, k, up=1, down=1, pad=(0, 0)):
    """Upsample by inserting up - 1 zeros after each pixel, pad with zeros (pad[0] before,
    pad[1] after, both axes), convolve each channel with the 2D filter k, keep every down-th
    pixel: StyleGAN2's upfirdn2d (Karras et al. 2020), in plain PyTorch. (B, C, H, W)."""
    B, C, H, W = x.shape
    if up > 1:
        x = F.pad(x.reshape(B, C, H, 1, W, 1), (0, up - 1, 0, 0, 0, up - 1)).reshape(B, C, H * up, W * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    w = k.flip(0, 1).to(x)[None, None].expand(C, 1, *k.shape)   # a convolution, not a correlation
    return F.conv2d(x, w, stride=down, groups=C)


def fir_filter(k, gain=1.0):
    """The separable 2D filter outer(k, k) normalised to sum to `gain` (a constant image is
    scaled by gain away from the border)."""
    k = torch.as_tensor(k, dtype=torch.float64)
    k = torch.outer(k, k)
    return k / k.sum() * gain


def fir_upsample(x, k=(1, 3, 3, 1), factor=2):
    """Zero insertion then the FIR low-pass k of gain factor^2 (the inserted zeros take their
    share): (B, C, H, W) -> (B, C, factor H, factor W); zeros outside the image (as StyleGAN2)."""
    p = len(k) - factor
    return _upfirdn2d(x, fir_filter(k, factor ** 2), up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def fir_downsample(x, k=(1, 3, 3, 1), factor=2):
    """The FIR low-pass k of gain 1, then every factor-th pixel: (B, C, H, W) -> (B, C, H / factor, W / factor)."""
    p = len(k) - factor
    return _upfirdn2d(x, fir_filter(k), down=factor, pad=((p + 1) // 2, p // 2))


class FIRConvDown(nn.Module):
    """A 3x3 convolution of stride 2 after the FIR low-pass k (StyleGAN2's fused conv_downsample_2d,
    one padding for both): the input pyramid's down-sampling in NCSN++ (progressive_input="residual")."""

    def __init__(self, cin, cout, k=(1, 3, 3, 1)):
        super().__init__()
        self.k, self.conv = k, nn.Conv2d(cin, cout, 3, stride=2)

    def forward(self, x):
        p = len(self.k) - 2 + 2     # (filter taps - factor) + (conv taps - 1)
        return self.conv(_upfirdn2d(x, fir_filter(self.k), pad=((p + 1) // 2, p // 2)))


class NCSNpp(UNet):
    """NCSN++ (SDE paper App. H, the official "NCSN++ cont." configuration for VE): the DDPM++
    U-Net above with

      - Gaussian Fourier features of log sigma(t) (Tancik et al. 2020): [sin 2 pi w log sigma,
        cos 2 pi w log sigma], w ~ N(0, fourier_scale^2)^ch fixed (a buffer), in place of the
        sinusoidal embedding of 999 t; sigma(t) = sigma_min (sigma_max / sigma_min)^t (VE);
      - FIR resampling (kernel `fir`, [1, 3, 3, 1]) in the up- and down-sampling blocks;
      - progressive growing of the input (`progressive_input`): "input_skip" adds a 1x1
        convolution of the FIR-downsampled image after each down-sampling; "residual" (the
        config) keeps a pyramid p <- (FIRConvDown(p) + h) / sqrt(2), h <- p;
      - of the output (`progressive`): "output_skip" sums the FIR-upsampled output of the
        coarser resolution with a conv3x3(swish(GN(h))) at each resolution (the config: "none");
      - skip connections rescaled by 1/sqrt(2) (ResBlock, AttnBlock, the pyramid).

    The official config trains on data in [0, 1] (centered = False) with sigma 0.01..50 and maps
    the network's input to 2x - 1; in model space [-1, 1] the same process has sigma 0.02..100
    (ARCH_PRESETS). Its score is h / sigma (scale_by_sigma); here -h / sigma (`make_score_fn`)."""

    def __init__(self, in_ch=3, image_size=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_res=(16,),
                 dropout=0.1, sigma_min=0.01, sigma_max=50.0, fir=(1, 3, 3, 1), fourier_scale=16.0,
                 progressive_input="residual", progressive="none"):
        if progressive_input not in ("none", "input_skip", "residual") or progressive not in ("none", "output_skip"):
            raise ValueError(f"progressive_input {progressive_input!r} or progressive {progressive!r} is unknown; "
                             "accepted: none, input_skip, residual and none, output_skip")
        super().__init__(in_ch, image_size, ch, ch_mult, num_res_blocks, attn_res, dropout, fir)
        self.log_sigma_min, self.log_ratio = math.log(sigma_min), math.log(sigma_max / sigma_min)
        self.progressive_input, self.progressive = progressive_input, progressive
        self.register_buffer("fourier_w", torch.randn(ch) * fourier_scale)
        self.temb[0] = nn.Linear(2 * ch, 4 * ch)
        widths = [ch * m for m in ch_mult[:-1]]                  # the channels after each down-sampling
        if progressive_input == "input_skip":
            self.pyramid_in = nn.ModuleList(nn.Conv2d(in_ch, c, 1) for c in widths)
        elif progressive_input == "residual":
            self.pyramid_in = nn.ModuleList(FIRConvDown(cin, c, fir) for cin, c in zip([in_ch] + widths, widths))
        if progressive == "output_skip":                         # one head per resolution, coarsest first
            self.pyramid_out = nn.ModuleList(nn.Sequential(_norm(ch * m), nn.SiLU(), _zero(nn.Conv2d(ch * m, in_ch, 3,
                                             padding=1))) for m in reversed(ch_mult))
            del self.norm_out, self.conv_out

    def embed(self, t, x):
        log_sigma = self.log_sigma_min + t.to(self.fourier_w.dtype) * self.log_ratio
        proj = 2 * math.pi * log_sigma[:, None] * self.fourier_w[None]
        return self.temb(torch.cat([torch.sin(proj), torch.cos(proj)], 1).to(x.dtype))

    def forward(self, x, t):
        """x (B, C, H, W), t (B,) in [0, 1] -> (B, C, H, W): the noise the score is made from."""
        emb, pyramid = self.embed(t, x), x
        h = self.conv_in(x)
        hs = [h]
        for i, level in enumerate(self.down):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, emb))
                hs.append(h)
            if level.resample is not None:
                h = level.resample(h, emb)
                if self.progressive_input == "input_skip":
                    pyramid = fir_downsample(pyramid, self.fir)
                    h = h + self.pyramid_in[i](pyramid)
                elif self.progressive_input == "residual":
                    h = pyramid = (self.pyramid_in[i](pyramid) + h) / math.sqrt(2.0)
                hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        out = None
        for i, level in enumerate(self.up):
            for block in level.blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            h = level.attn(h)
            if self.progressive == "output_skip":
                head = self.pyramid_out[i](h)
                out = head if out is None else fir_upsample(out, self.fir) + head
            if level.resample is not None:
                h = level.resample(h, emb)
        return out if self.progressive == "output_skip" else self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

SAMPLERS = {"pc": "PC sampler", "ode": "probability-flow ODE", "em": "Euler-Maruyama", "ald": "annealed Langevin"}
ARCHS = ("ddpmpp", "ncsnpp")


@dataclass
class Config(RunConfig):
    """Defaults train a VP SDE on `8gaussians` on a laptop CPU in minutes; PRESETS follow the papers."""
    dataset: str = flag("8gaussians", "dataset name (see README): a 2D set, or images (digits, mnist, cifar10, ...)")
    steps: int = flag(5000, "training steps")
    batch_size: int = flag(512, "global batch size, split across processes under torchrun (--eval: per ODE solve)")
    lr: float = flag(2e-3, "Adam learning rate (after warm-up)")
    save_every: int = flag(2500, "checkpoint and sample picture every this many steps")
    n_samples: int = flag(1000, "samples in the training pictures and drawn by --sample")
    # the SDE and the objective
    sde: str = flag("vp", "forward SDE: ve (Eq. 9), vp (Eq. 11) or subvp (Eq. 12); or ncsn: NCSN's --n-levels "
                    "discrete noise levels (Song & Ermon 2019), the VE kernels at those sigmas only",
                    choices=(*SDES, "ncsn"))
    n_levels: int = flag(10, "NCSN's L noise levels, geometric from --sigma-max to --sigma-min (--sde ncsn and "
                         "--sampler ald)")
    beta_min: float = flag(0.1, "VP and sub-VP: beta(0)")
    beta_max: float = flag(20.0, "VP and sub-VP: beta(1)")
    sigma_min: float = flag(0.01, "VE: sigma(0)")
    sigma_max: float = flag(10.0, "VE: sigma(1), about the largest distance between two data points "
                            "(Song & Ermon 2020, Technique 1)")
    loss: str = flag("dsm", "objective: dsm (denoising score matching, Eq. 7), ssm or ssm-vr (sliced score "
                     "matching), sm (exact score matching, 2D points); --sde ncsn: its Eqs. 5-6 (dsm)", choices=LOSSES)
    weighting: str = flag("sigma2", "lambda(t) of the loss: sigma2 (lambda = sigma^2, Eq. 7) or likelihood "
                          "(lambda = g^2, Song et al. 2021b: the loss bounds the NLL; on the VE SDE the same up to "
                          "a constant)", choices=("sigma2", "likelihood"))
    importance_sampling: bool = flag(False, "--weighting likelihood: draw t with density g^2 / sigma^2 instead of "
                                     "uniformly (Song et al. 2021b, Sec. 4)")
    # networks
    arch: str = flag("ddpmpp", "image network: ddpmpp (the DDPM++ U-Net) or ncsnpp (NCSN++, for --sde ve or ncsn)",
                     choices=ARCHS)
    progressive_input: str = flag("residual", "NCSN++ input pyramid: none, input_skip or residual",
                                  choices=("none", "input_skip", "residual"))
    progressive: str = flag("none", "NCSN++ output pyramid: none or output_skip", choices=("none", "output_skip"))
    hidden: int = flag(128, "width of the MLP used on 2D points")
    time_input: str = flag("t", "what the MLP on 2D points embeds: t, or log-sigma (log sigma(t) rescaled to [0, 1], "
                           "uniform in noise level)", choices=("t", "log-sigma"))
    depth: int = flag(3, "residual blocks of the MLP used on 2D points")
    ch: int = flag(32, "U-Net base channels")
    ch_mult: tuple = flag((1, 2), "U-Net channel multiplier per resolution")
    num_res_blocks: int = flag(1, "U-Net residual blocks per resolution")
    attn_res: tuple = flag((4,), "resolutions (side in pixels) with self-attention")
    dropout: float = flag(0.0, "dropout in the U-Net's residual blocks")
    # optimisation
    warmup: int = flag(100, "linear learning-rate warm-up steps")
    lr_schedule: str = flag("constant", "learning rate after the warm-up: constant (the official code) or cosine "
                            "(half a cosine from --lr down to 0 at the last step)", choices=("constant", "cosine"))
    grad_clip: float = flag(1.0, "gradient-norm clip (0 = off)")
    ema_decay: float = flag(0.999, "EMA decay of the weights used for sampling and --eval")
    flip: bool = flag(False, "random horizontal flips of training images")
    # sampling
    sampler: str = flag("auto", "pc (reverse diffusion predictor + Langevin corrector), ode (probability flow), "
                        "em (Euler-Maruyama, no corrector), ald (annealed Langevin dynamics, VE and NCSN), auto "
                        "(ald for --sde ncsn, else pc); --sample and --eval: the checkpoint's unless typed",
                        choices=("auto", *SAMPLERS))
    sample_steps: int = flag(500, "steps N of the pc and em samplers (ald: --n-levels levels of N / L steps)")
    snr: float = flag(0.16, "signal-to-noise ratio r of the Langevin corrector (App. G)")
    n_corrector: int = flag(1, "Langevin corrector steps per predictor step of pc (0: predictor only)")
    ald_eps: float = flag(2e-5, "annealed Langevin step scale eps: alpha_i = eps sigma_i^2 / sigma_L^2")
    rtol: float = flag(1e-5, "relative tolerance of the ODE solver (ode sampler and --eval)")
    atol: float = flag(1e-5, "absolute tolerance of the ODE solver (ode sampler and --eval)")
    # evaluation
    likelihood: str = flag("auto", "divergence in --eval: exact, hutchinson (one probe per solve), or auto "
                           "(exact on 2D points, hutchinson on images)", choices=("auto", "exact", "hutchinson"))
    density_tol: float = flag(1e-3, "ODE tolerances of the 128x128 density grid of --eval on 2D sets")
    eval_n: int = flag(0, "--eval on the first N test examples (0 = all)")
    eval_repeats: int = flag(1, "--eval: passes over the test set, each with fresh dequantisation and probes")


_MNIST = dict(steps=50_000, batch_size=128, lr=2e-4, warmup=1000, ema_decay=0.9999, sigma_max=50.0, ch=64,
              ch_mult=(1, 2, 2), num_res_blocks=2, attn_res=(14,), dropout=0.1, sample_steps=1000,
              save_every=5000, n_samples=64)

# Thin structure (rings: std 0.1; checkerboard: sharp edges): the likelihood weighting with importance-
# sampled t (Song et al. 2021b), which spends the steps where the NLL bound weighs the score error (g^2 /
# sigma^2 ~ 1/t as t -> 0 for VP), and 3x the steps: 423 s on one CPU thread of a machine at load 12 -> 5
# (38-44k examples/s once quiet). Measured on rings (NLL of the first 2000 test points, whose entropy is
# 2.725): at 5000 steps 3.282 with the default weighting, 3.022 with this one; this preset 2.953; the
# default weighting at 20 000 steps 2.920. The inner ring stays blurred: a budget matter, not a defect.
_THIN = dict(weighting="likelihood", importance_sampling=True, steps=15_000, save_every=5000)

PRESETS = {
    "points": dict(),  # the Config defaults: ScoreMLP 128 wide, 3 blocks
    "rings": _THIN,
    "checkerboard": _THIN,
    # 8x8 digits: the Config's small U-Net (748,737 parameters); sigma_max 10 by Technique 1 (the
    # largest distance between two digits in model space is 9.6, between two 2D points 6.7 to 11.1).
    "digits": dict(steps=2000, batch_size=128, save_every=1000, n_samples=64),
    "digits-binary": dict(steps=2000, batch_size=128, save_every=1000, n_samples=64),
    # 28x28: our scaling of the CIFAR-10 recipe (as ddpm.py's MNIST preset); 28 -> 14 -> 7.
    "mnist": _MNIST,
    "fashion-mnist": _MNIST,
    # DDPM++ cont. (SDE paper Table 2; the official configs/vp/cifar10_ddpmpp_continuous.py and its
    # defaults): 61,804,419 parameters here; 1.3M iterations, batch 128, Adam 2e-4, warm-up 5000,
    # gradient clip 1, EMA 0.9999, dropout 0.1, random flips; VP beta 0.1..20. Sampling as that
    # config: pc with predictor euler_maruyama and corrector none, N = 1000, eps 1e-3, the last
    # step's mean (noise_removal). Likelihood as run_lib.evaluate with bpd_dataset "test": the
    # test split, 5 passes each with fresh uniform dequantisation (bits/dim averaged over them),
    # likelihood.py's RK45 (scipy's Dormand-Prince 5(4), as dopri5) at rtol = atol = 1e-5 from
    # eps = 1e-5, one Rademacher probe per solve. Ours: the error norm is the largest per-example RMS
    # (theirs: the RMS over the whole flattened batch of 1024 images), so at least as strict.
    # (--sde ve here: this network and sigma 0.01..50 on [-1, 1]; the VE paper preset is --arch ncsnpp.)
    "cifar10": dict(steps=1_300_000, batch_size=128, lr=2e-4, warmup=5000, grad_clip=1.0, ema_decay=0.9999,
                    flip=True, sigma_max=50.0, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_res=(16,),
                    dropout=0.1, sampler="em", sample_steps=1000, snr=0.16, n_corrector=0, rtol=1e-5, atol=1e-5,
                    eval_repeats=5, save_every=50_000, n_samples=64),
}

# --arch ncsnpp: NCSN++ on the VE SDE. cifar10: NCSN++ cont. (SDE paper Table 3, FID 2.38; the official
# configs/ve/cifar10_ncsnpp_continuous.py): 62,758,787 trainable parameters (theirs, counted with their
# code: the same, plus 128 fixed Fourier frequencies); EMA 0.999; sigma 0.01..50 on their [0, 1] data is
# 0.02..100 on our [-1, 1] (the same process: x~ = x + sigma z maps to y~ = y + 2 sigma z, and
# ||sigma s + z||^2 is unchanged); pc with reverse_diffusion and one Langevin step at snr 0.16, N = 1000,
# eps 1e-5; evaluation as the VP preset. Ours: the loss averaged over dimensions (theirs: summed,
# reduce_mean False, before the clip at 1); PyTorch's default initialisation (theirs: fan-average uniform).
ARCH_PRESETS = {"ncsnpp": {**{name: {**p, "sde": "ve"} for name, p in PRESETS.items() if name != "points"},
                           "cifar10": dict(PRESETS["cifar10"], sde="ve", sigma_min=0.02, sigma_max=100.0,
                                           ema_decay=0.999, sampler="pc", n_corrector=1)}}


def check_config(cfg):
    """The flags' values that their types let through; the image side against --ch-mult and the
    data against --loss sm and --arch are checked in build, --sampler against a checkpoint's SDE
    in draw_samples."""
    for name in ("hidden", "depth", "ch", "num_res_blocks", "sample_steps", "eval_repeats"):
        check_range(cfg, name, 1)
    for name in ("warmup", "grad_clip", "n_corrector", "eval_n", "beta_min"):
        check_range(cfg, name, 0)
    for name in ("dropout", "ema_decay"):
        check_range(cfg, name, 0, 1, open_high=True)
    for name in ("snr", "ald_eps", "rtol", "atol", "density_tol", "sigma_min"):
        check_range(cfg, name, 0, open_low=True)
    check_range(cfg, "beta_max", cfg.beta_min, open_low=True)
    check_range(cfg, "sigma_max", cfg.sigma_min, open_low=True)
    if not cfg.ch_mult or min(cfg.ch_mult) < 1:
        raise UserError(f"--ch-mult {','.join(map(str, cfg.ch_mult))} is out of range; accepted: positive "
                        "multipliers, one per resolution, e.g. 1,2,2,2")
    check_range(cfg, "n_levels", 2)
    if cfg.sample or cfg.eval:
        return
    if cfg.sampler == "ald" and cfg.sde not in ("ve", "ncsn"):
        raise UserError(f"--sampler ald runs annealed Langevin dynamics on noise levels sigma, which --sde {cfg.sde} "
                        "does not have; accepted: --sde ve or ncsn with ald, or --sampler pc, ode or em")
    if cfg.sde == "ncsn" and (cfg.loss != "dsm" or cfg.sampler not in ("auto", "ald")):
        raise UserError(f"--sde ncsn is trained by its Eqs. 5-6 on {cfg.n_levels} levels and sampled by annealed "
                        f"Langevin dynamics (--loss {cfg.loss}, --sampler {cfg.sampler} given); accepted: --loss dsm, "
                        "--sampler auto or ald")
    if cfg.weighting == "likelihood" and cfg.sde == "ncsn":
        raise UserError("--weighting likelihood weights the loss of an SDE (--sde ncsn given; the rings and "
                        "checkerboard presets set it); accepted: --sde vp, subvp or ve, or --weighting sigma2")
    if cfg.importance_sampling and cfg.weighting != "likelihood":
        raise UserError("--importance-sampling draws t for the likelihood weighting; accepted: with --weighting "
                        "likelihood")
    if cfg.arch == "ncsnpp" and cfg.sde not in ("ve", "ncsn"):
        raise UserError(f"--arch ncsnpp is conditioned on log sigma, which --sde {cfg.sde} does not have; "
                        "accepted: --arch ncsnpp with --sde ve or ncsn, or --arch ddpmpp")
    if cfg.arch != "ncsnpp" and (cfg.progressive_input, cfg.progressive) != ("residual", "none"):
        raise UserError("--progressive-input and --progressive shape NCSN++'s pyramids; accepted: with --arch ncsnpp")


def learning_rate(step, cfg):
    """The learning rate of step `step` (0-based): linear warm-up over cfg.warmup steps, then
    constant (the official score_sde code's optimization_manager: lr min(step / warmup, 1)) or,
    with --lr-schedule cosine, lr (1 + cos(pi p)) / 2 at the fraction p of the steps after it."""
    warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
    if cfg.lr_schedule == "constant" or step < cfg.warmup:
        return cfg.lr * warm
    p = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


# ----------------------------------------------------------------------------------------
# Data and pictures
# ----------------------------------------------------------------------------------------

def to_model_space(x, info, generator=None):
    """2D points as they are; image levels k dequantised afresh, y = (k + u) / L * 2 - 1."""
    if info.kind == "points":
        return x.float()
    return dequantize(x, info.levels, generator=generator)


def to_levels(y, info):
    """Model space back to integer levels (uint8), the cube y lies in (`quantize`)."""
    return quantize(y, info.levels)


def sampler_of(cfg):
    """--sampler, with auto resolved: annealed Langevin dynamics for NCSN, else the PC sampler."""
    return cfg.sampler if cfg.sampler != "auto" else "ald" if cfg.sde == "ncsn" else "pc"


def sample_with(cfg, net, sde, shape, device, generator):
    """Samples in model space by --sampler, and the number of network evaluations they cost."""
    score_fn = make_score_fn(net, sde)
    where = dict(device=device, generator=generator)
    sampler = sampler_of(cfg)
    if sampler == "ode":
        return ode_sample(sde, score_fn, shape, cfg.rtol, cfg.atol, eps=sde.sampling_eps, **where)
    if sampler == "ald":   # NCSN: the levels it was trained on (ncsn_sigmas(sigma_max, sigma_min, L))
        each = max(1, cfg.sample_steps // cfg.n_levels)
        x = annealed_langevin_sample(sde, score_fn, shape, cfg.n_levels, each, cfg.ald_eps, **where)
        return x, cfg.n_levels * each
    if sampler == "em":
        x = pc_sample(sde, score_fn, shape, cfg.sample_steps, "euler_maruyama", None, eps=sde.sampling_eps, **where)
        return x, cfg.sample_steps
    x = pc_sample(sde, score_fn, shape, cfg.sample_steps, "reverse_diffusion", "langevin" if cfg.n_corrector else None,
                  cfg.snr, max(cfg.n_corrector, 1), eps=sde.sampling_eps, **where)
    return x, cfg.sample_steps * (1 + cfg.n_corrector)


def sample_title(cfg, nfe):
    return f"{'NCSN' if cfg.sde == 'ncsn' else cfg.sde.upper() + ' SDE'}, {SAMPLERS[sampler_of(cfg)]}, NFE {nfe}"


def save_samples(x, path, info, title):
    """Samples in model space as a scatter (points) or a grid of images (their levels)."""
    if info.kind == "points":
        save_scatter(x.cpu(), path, lim=info.lim, title=title)
    else:
        save_image_grid(to_levels(x, info).cpu(), path, levels=info.levels, title=title)


SWEEP_RATIOS = (0.03, 0.1, 0.3, 1.0, 3.0)


def sweep_times(sde, ratios=SWEEP_RATIOS):
    """The first times at which the kernel's noise-to-signal ratio sigma(t) / m(t) reaches each
    ratio (T where it never does): comparable noise levels whatever the SDE."""
    t = torch.linspace(1e-5, sde.T, 100_001, dtype=torch.float64)
    r = sde.std(t) / torch.exp(sde.log_mean_coeff(t))
    return t[torch.searchsorted(r, torch.tensor(ratios, dtype=torch.float64)).clamp(max=len(t) - 1)]


def save_score_field(net, sde, x0, path, info, device, n=20):
    """The learned score across noise levels (t from `sweep_times`). 2D points: arrows of
    sigma(t) s(x, t) = -net(x, t) on an n x n grid, drawn as directions coloured by their length,
    over the perturbed data x_t = m(t) x_0 + sigma(t) z in grey. Images: for each image of x0, a
    row of x_t above a row of Tweedie's estimate E[x_0 | x_t] = (x_t + sigma^2 s(x_t, t)) / m."""
    times = sweep_times(sde).tolist()
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    tt = torch.tensor(times, dtype=torch.float64)
    m, sigma = torch.exp(sde.log_mean_coeff(tt)).tolist(), sde.std(tt).tolist()
    if info.kind == "image":
        noisy, denoised = [], []
        with torch.inference_mode():
            for t, m_t, s_t in zip(times, m, sigma):
                x_t = (m_t * x0 + s_t * z).to(device)
                noisy.append(x_t.cpu())
                denoised.append(((x_t - s_t * net(x_t, torch.full((len(x0),), t, device=device))) / m_t).cpu())
        rows = [torch.stack(column)[:, i] for i in range(len(x0)) for column in (noisy, denoised)]
        grid = (torch.cat(rows).clamp(-1, 1) + 1) / 2  # (2 * len(x0) * len(times), C, H, W)
        save_image_grid(grid, path, nrow=len(times), title="odd rows: x_t = m x_0 + sigma z; even rows: Tweedie's "
                        "(x_t + sigma^2 s(x_t, t)) / m; columns: sigma / m = "
                        + ", ".join(f"{r:g}" for r in SWEEP_RATIOS))
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lim = info.lim
    c = torch.linspace(-lim, lim, n)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    fig, axes = plt.subplots(1, len(times), figsize=(2.9 * len(times), 3.3), squeeze=False)
    for ax, t, m_t, s_t in zip(axes[0], times, m, sigma):
        with torch.inference_mode():
            v = -net(grid.to(device), torch.full((len(grid),), t, device=device)).cpu()  # sigma s
        length = v.norm(dim=1)
        u = v / length.clamp_min(1e-12)[:, None]
        x_t = m_t * x0 + s_t * z
        ax.scatter(x_t[:, 0], x_t[:, 1], s=1, c="0.8")
        ax.quiver(grid[:, 0], grid[:, 1], u[:, 0], u[:, 1], length, cmap="viridis", pivot="mid", angles="xy",
                  scale_units="xy", scale=1 / (0.8 * 2 * lim / (n - 1)), width=0.006)
        ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"t = {t:.3g}, sigma(t) = {s_t:.3g}", fontsize=9)
    fig.suptitle("score directions, coloured by |sigma(t) s(x, t)|; grey: the perturbed data x_t", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# Run code
# ----------------------------------------------------------------------------------------

MODEL = "score_sde"


def build(cfg, info):
    """(network, SDE) for a configuration and the data's description: the MLP on 2D points, the
    U-Net (--arch) on images. NCSN's network is the VE SDE's, used at its levels' times."""
    ve = cfg.sde in ("ve", "ncsn")
    sde = VESDE(cfg.sigma_min, cfg.sigma_max) if ve else SDES[cfg.sde](cfg.beta_min, cfg.beta_max)
    if info.kind == "points":
        for wrong, name in ((cfg.flip, "--flip"), (cfg.arch != "ddpmpp", f"--arch {cfg.arch}")):
            if wrong:
                raise UserError(f"{name} is for images; {info.name} is a set of 2D points: leave {name} out")
        return ScoreMLP(info.shape[0], cfg.hidden, cfg.depth, log_sigma_time(sde) if cfg.time_input == "log-sigma"
                        else None), sde
    if cfg.time_input != "t":
        raise UserError(f"--time-input {cfg.time_input} is for the MLP on 2D points; the image networks embed t "
                        "(DDPM++) or log sigma (NCSN++): leave it out")
    if cfg.loss == "sm":
        raise UserError(f"--loss sm takes D = {info.dims} backward passes per step on {info.name}; accepted: "
                        "2D points, or --loss ssm-vr (sliced) or dsm on images")
    c, h, w = info.shape
    if h != w or h % 2 ** (len(cfg.ch_mult) - 1):
        raise UserError(f"--ch-mult {','.join(map(str, cfg.ch_mult))} halves the side {len(cfg.ch_mult) - 1} "
                        f"times; {info.name} has {h}x{w} images: use fewer multipliers")
    if cfg.arch == "ncsnpp":
        return NCSNpp(c, h, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_res, cfg.dropout, cfg.sigma_min,
                      cfg.sigma_max, progressive_input=cfg.progressive_input, progressive=cfg.progressive), sde
    return UNet(c, h, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_res, cfg.dropout), sde


def train(cfg):
    """Score matching with the weighting of Eq. 7 (t ~ U(1e-5, 1)), or NCSN's objective on its
    levels, Adam with warm-up, gradient clipping and an EMA of the weights; under torchrun every
    process trains on its slice of the global batch (DDP)."""
    with Training(cfg, MODEL) as run:
        ds = load_dataset(cfg.dataset, "train", cfg.data_dir)
        info = ds.info
        seed_everything(cfg.seed)  # the same initial weights on every process
        net, sde = build(cfg, info)
        net.to(run.device)
        ema = EMA(net, cfg.ema_decay)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        batches = Batches(ds, cfg.batch_size, run.dist, seed=cfg.seed)
        step = run.start(info, model=net, ema=ema, opt=opt, batches=batches)
        model = wrap_ddp(net, run.dist, cfg.compile)
        amp = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.amp)
        sigmas = ncsn_sigmas(cfg.sigma_max, cfg.sigma_min, cfg.n_levels) if cfg.sde == "ncsn" else None

        def samples(step):
            g = torch.Generator(device=run.device).manual_seed(cfg.seed)  # not the training's RNG
            x, nfe = sample_with(cfg, ema.model, sde, (cfg.n_samples, *info.shape), run.device, g)
            save_samples(x, run.out / f"samples_{step}.png", info, f"{sample_title(cfg, nfe)}, step {step}")

        for step in run.steps(step, samples):
            x, _ = next(batches)
            x0 = to_model_space(x, info)  # images: fresh dequantisation noise every batch
            if cfg.flip:
                x0 = torch.where(torch.rand(x0.shape[0], 1, 1, 1, device=x0.device) < 0.5, x0.flip(3), x0)
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, cfg)
            with amp:
                loss = training_loss(model, sde, x0, cfg.loss, sigmas=sigmas, weighting=cfg.weighting,
                                     importance_sampling=cfg.importance_sampling).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            ema.update(net)
            run.log(loss=loss)
        g = torch.Generator().manual_seed(cfg.seed)
        x0 = to_model_space(ds.data[:4], info, g) if info.kind == "image" else ds.data[:2000]
        run.draw(save_score_field, ema.model, sde, x0, run.out / "score_field.png", info, run.device)
    run.report(["ckpt.pt", f"samples_{run.step}.png", "score_field.png", "metrics.jsonl", "loss.png"])


SETTINGS = ("sampler", "sample_steps", "snr", "n_corrector", "ald_eps", "rtol", "atol", "likelihood", "eval_repeats")


def with_checkpoint_settings(cfg, saved):
    """The command line's configuration with the checkpoint's SDE and, for each sampling and
    evaluation flag left at its default, the checkpoint's value: --sample and --eval on a preset's
    checkpoint run the preset's sampler and evaluation."""
    default = Config()
    kept = {k: getattr(saved, k) for k in SETTINGS if getattr(cfg, k) == getattr(default, k)}
    return dataclasses.replace(cfg, sde=saved.sde, n_levels=saved.n_levels, **kept)


def evaluate(cfg):
    """--eval CKPT: the exact test-set NLL of the probability-flow model (App. D.2) in nats per
    example, and bits/dim of the dequantised images (an upper bound on the discrete NLL),
    averaged over --eval-repeats passes (with the standard error over the passes); on 2D sets also
    the true entropy, density.npz and density.png (the ODE density beside the truth). NCSN has no
    likelihood: its test-set objective (Eq. 6, every level) instead."""
    (net, sde), saved, info = load(cfg.eval, get_device(cfg.device))
    cfg = with_checkpoint_settings(cfg, saved)
    device = next(net.parameters()).device
    if cfg.fid is not None:
        return fid_evaluate(cfg, info, lambda n, g: to_levels(
            sample_with(cfg, net, sde, (n, *info.shape), device, g)[0], info))
    out = output_dir(cfg, cfg.eval)
    ds = load_dataset(info.name, "test", cfg.data_dir)
    data = ds.data[:cfg.eval_n] if cfg.eval_n else ds.data
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    if saved.sde == "ncsn":
        return evaluate_ncsn(cfg, net, sde, data, info, out, g)
    divergence = cfg.likelihood if cfg.likelihood != "auto" else "exact" if info.kind == "points" else "hutchinson"
    score_fn = make_score_fn(net, sde)
    passes, nfes, start = [], [], time.perf_counter()
    for _ in range(cfg.eval_repeats):   # each pass: fresh dequantisation u and probes v
        nats = []
        for x in data.split(cfg.batch_size):  # ode_log_likelihood runs under no_grad, never inference_mode
            y = to_model_space(x.to(device), info, generator=g)
            log_p, _, nfe = ode_log_likelihood(sde, score_fn, y, divergence, rtol=cfg.rtol, atol=cfg.atol,
                                               generator=g)
            nats.append((dequantized_nll(log_p, info.dims, info.levels) if info.kind == "image" else -log_p)
                        .double().cpu())
            nfes.append(nfe)
        passes.append(torch.cat(nats))
    v, per_pass = torch.cat(passes), torch.stack([p.mean() for p in passes])
    fields = dict(nll=v.mean().item(), nll_se=v.std().item() / math.sqrt(len(v)) if len(v) > 1 else 0.0,
                  n=len(passes[0]), repeats=cfg.eval_repeats, sde=saved.sde, divergence=divergence, rtol=cfg.rtol,
                  atol=cfg.atol, nfe=sum(nfes) / len(nfes), seconds=round(time.perf_counter() - start, 1))
    if cfg.eval_repeats > 1:   # the spread of the passes' means: dequantisation and probe noise
        fields["nll_se_repeats"] = per_pass.std().item() / math.sqrt(cfg.eval_repeats)
    if info.kind == "image":
        fields["bits_per_dim"] = bits_per_dim(fields["nll"], info.dims)
        if cfg.eval_repeats > 1:
            fields["bits_per_dim_repeats"] = [bits_per_dim(p.item(), info.dims) for p in per_pass]
            fields["bits_per_dim_se_repeats"] = bits_per_dim(fields["nll_se_repeats"], info.dims)
    else:
        if ds.log_prob is not None:
            fields["entropy"], fields["entropy_se"] = entropy_estimate(info.name)

        def log_density(points):
            return ode_log_likelihood(sde, score_fn, points.to(device), "exact", rtol=cfg.density_tol,
                                      atol=cfg.density_tol)[0].cpu()

        start = time.perf_counter()
        grid = density_on_grid(log_density, info.lim, n=128)
        np.savez(out / "density.npz", log_density=grid, lim=info.lim)
        # the model is a normalised density: its mass on the box should be about 1 (less what lies outside)
        fields["density_mass"] = float(np.exp(grid).sum() * (2 * info.lim / 128) ** 2)
        fields["density_seconds"] = round(time.perf_counter() - start, 1)
        truth = density_on_grid(ds.log_prob, info.lim, n=128) if ds.log_prob is not None else ds.data
        save_density({"true density" if ds.log_prob is not None else "test data": truth,
                      f"{saved.sde.upper()} SDE, ODE likelihood": grid}, out / "density.png", info.lim)
    Logger(out, 0).event("eval", split="test", **fields)
    report_files(out, ["metrics.jsonl", "density.npz", "density.png"])
    return fields


@torch.inference_mode()
def evaluate_ncsn(cfg, net, sde, data, info, out, g):
    """NCSN's test-set objective (Song & Ermon 2019, Eq. 6, summed over dimensions as the paper):
    every example at every level, one z each; "loss" and its standard error, per level too."""
    sigmas = ncsn_sigmas(sde.sigma_max, sde.sigma_min, cfg.n_levels)
    device = next(net.parameters()).device
    score_fn = make_ncsn_score_fn(net, sde)
    per_level = []
    for i in range(cfg.n_levels):
        values = []
        for x in data.split(cfg.batch_size):
            x0 = to_model_space(x.to(device), info, generator=g)
            labels = torch.full((x0.shape[0],), i, device=device)
            values.append(ncsn_loss(score_fn, sigmas, x0, labels, _randn(x0.shape, x0, g)).double().cpu())
        per_level.append(torch.cat(values))
    v = torch.stack(per_level).mean(0)   # Eq. 6's average over the levels, per example
    fields = dict(loss=v.mean().item(), loss_se=v.std().item() / math.sqrt(len(v)) if len(v) > 1 else 0.0,
                  n=len(v), sde="ncsn", levels=cfg.n_levels, loss_per_level=[p.mean().item() for p in per_level])
    Logger(out, 0).event("eval", split="test", **fields)
    report_files(out, ["metrics.jsonl"])
    return fields


def draw_samples(cfg):
    """--sample CKPT: n_samples by --sampler from the EMA network (samples.png, samples.pt: levels
    for images, points for 2D sets) and a "sample" event with samples per second and the NFE."""
    (net, sde), saved, info = load(cfg.sample, get_device(cfg.device))
    cfg = with_checkpoint_settings(cfg, saved)
    device = next(net.parameters()).device
    out = output_dir(cfg, cfg.sample)
    sampler = sampler_of(cfg)
    if sampler == "ald" and not isinstance(sde, VESDE):
        raise UserError(f"--sampler ald needs a VE SDE's noise levels; {cfg.sample} was trained with --sde "
                        f"{saved.sde}: use --sampler pc, ode or em")
    if saved.sde == "ncsn" and sampler != "ald":
        raise UserError(f"{cfg.sample} is an NCSN, trained at {saved.n_levels} noise levels only; accepted: "
                        "--sampler ald or auto")
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    start = time.perf_counter()
    x, nfe = sample_with(cfg, net, sde, (cfg.n_samples, *info.shape), device, g)
    seconds = time.perf_counter() - start
    save_samples(x, out / "samples.png", info, sample_title(cfg, nfe))
    torch.save(to_levels(x, info).cpu() if info.kind == "image" else x.cpu(), out / "samples.pt")
    Logger(out, 0).event("sample", n=cfg.n_samples, seconds=round(seconds, 3), samples_per_s=cfg.n_samples / seconds,
                         sampler=sampler, nfe=nfe, sde=saved.sde)
    report_files(out, ["samples.png", "samples.pt", "metrics.jsonl"])
    return x


def load(path, device="cpu"):
    """((EMA network, SDE), its training Config, its data's description) from a checkpoint."""
    ckpt = load_checkpoint(path, MODEL)
    cfg, info = saved_config(Config, ckpt)
    net, sde = build(cfg, info)
    load_weights(net, ckpt["ema"]["model"], path)
    return (net.to(device).eval(), sde), cfg, info


def main(argv=None):
    """Train (default), or --eval CKPT, or --sample CKPT; a user's mistake exits with one line."""
    with user_errors():
        cfg = parse_config(Config, PRESETS, argv, doc=__doc__, kinds=("image", "points"), arch_presets=ARCH_PRESETS)
        check_config(cfg)
        return dispatch(cfg, train, evaluate, draw_samples)


if __name__ == "__main__":
    main()
