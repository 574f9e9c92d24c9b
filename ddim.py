"""Denoising diffusion implicit models: fast, deterministic and invertible sampling of a network
trained as a DDPM, with classifier and classifier-free guidance.

Papers
  Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", arXiv 2010.02502 (DDIM).
  Ho, Jain & Abbeel 2020, arXiv 2006.11239 (schedule, U-Net, L_simple: a DDIM trains as a DDPM);
    Nichol & Dhariwal 2021, arXiv 2102.09672 (the cosine schedule).
  Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", arXiv 2105.05233.
  Ho & Salimans 2021, "Classifier-Free Diffusion Guidance", arXiv 2207.12598.

Implemented: q_sigma and the DDIM update for any 0 <= eta <= 1 on a sub-sequence tau, the authors'
(uniform, quad, as their runner computes them) or ours (linear, quadratic: ending at T); the
deterministic encoder x_0 -> x_T and slerp; classifier-free and classifier guidance with a
noise-aware classifier; ddpm.py's networks, whose checkpoints sample here. Ours, not the authors':
images sample with x0_hat clipped to [-1, 1] and eps recomputed from it (as ddpm.py: a short tau's
first steps stay in the data range); --no-clip-x0 samples as their generalized_steps. Not
implemented: a likelihood (--eval reports Table 2's reconstruction error), Table 1's sigma-hat
sampler (ddpm.py --sample-steps), higher-order solvers, the ADM network and its attention pool.

Run it (also: a ddpm.py checkpoint; --cond --guidance 2; --train-classifier, then --classifier CKPT)
  python ddim.py                                     # the epsilon-network on 8x8 digits (CPU, minutes)
  python ddim.py --sample runs/ddim-digits/ckpt.pt   # S = 50, eta = 0; S-by-eta grid, reconstructions, slerp
  python ddim.py --eval runs/ddim-digits/ckpt.pt     # test reconstruction error against S (Table 2)

Paper -> code (Song et al. unless named; their alpha_t is alpha_bar_t = alphas_cumprod[t])
  Eq. 4         x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps                  q_sample
  Eq. 7         q_sigma(x_{t-1} | x_t, x_0) = N(sqrt(alpha_bar_{t-1}) x_0
                  + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps, sigma_t^2 I)              q_sigma_posterior
  Eq. 9         x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_bar_t)     predict_x0, predict_eps
  Eq. 12        x_{t-1} = sqrt(alpha_bar_{t-1}) x0_hat
                  + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps_theta + sigma_t z          ddim_step
  Eq. 16        sigma_t(eta) = eta sqrt((1 - ab_{t-1}) / (1 - ab_t)) sqrt(1 - ab_t / ab_{t-1})   ddim_sigma
  App. D.2      tau: range(0, T, T // S), or int(s) for s in linspace(0, sqrt(0.8 T), S)^2   timestep_subsequence
  Eqs. 10, 12   x_T ~ N(0, I), then Eq. 12 from tau_S down to tau_1                     ddim_sample_chain, ddim_sample
  Eqs. 13-14    d(x_t / sqrt(ab_t)) = eps_theta d sqrt((1 - ab_t) / ab_t), run upwards   ddim_encode
  Sec. 5.3      slerp(z0, z1, a) = (sin((1 - a) th) z0 + sin(a th) z1) / sin th          slerp
  Ho Eq. 14     L_simple = || eps - eps_theta(x_t, t) ||^2                               l_simple
  H&S Eq. 6     eps~ = (1 + w) eps_theta(x_t, y) - w eps_theta(x_t)                      guided_eps, drop_labels
  D&N Alg. 2    eps^ = eps_theta - sqrt(1 - ab_t) s grad_x log p_phi(y | x_t)            guided_eps, classifier_grad
  D&N Sec. 4    -log p_phi(y | x_t, t) on noised data                                   classifier_loss, UNetClassifier
  Ho App. B     the U-Net (ddpm.py's, with its names)                                   UNet, PointMLP

Timesteps are integer tensors in [0, T): index 0 is the paper's t = 1; alpha_bar_0 := 1 belongs
to x_0 and is not stored. Images are levels 0..L-1 used at x / (L - 1) * 2 - 1 in [-1, 1].
"""
from __future__ import annotations

import math
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (EMA, Batches, Logger, RunConfig, Training, UserError, check_range, dispatch, flag, get_device,
                    load_checkpoint, load_dataset, load_weights, output_dir, parse_config, report_files,
                    save_image_grid, save_scatter, saved_config, seed_everything, user_errors, wrap_ddp)
from common import fid_evaluate  # --eval CKPT --fid N


# ----------------------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------------------
# ddpm.py's, so that its checkpoints mean the same thing here.

def linear_beta_schedule(T, beta_start=1e-4, beta_end=0.02):
    """beta_t linear from beta_start to beta_end, (T,) float64 (Ho et al. Sec. 4: 1e-4 to 0.02, T = 1000)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64, device="cpu")


def cosine_beta_schedule(T, s=0.008, max_beta=0.999):
    """beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1), (T,) float64, with alpha_bar(t) = f(t) / f(0),
    f(t) = cos((t/T + s)/(1 + s) * pi/2)^2 (Nichol & Dhariwal Eq. 17), clipped at max_beta (0.999 in their Sec. 3.2)."""
    steps = torch.arange(T + 1, dtype=torch.float64, device="cpu")
    f = torch.cos((steps / T + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def make_betas(schedule, T, max_beta=0.999):
    """The betas of ddpm.py for T steps, every beta_t at most max_beta: "linear" (scaled by 1000 / T;
    it reaches 0.999 only for T < 20) or "cosine". Returns (T,) float64."""
    if T < 1:
        raise ValueError(f"T = {T} diffusion steps; accepted: T >= 1")
    if schedule == "cosine":
        return cosine_beta_schedule(T, max_beta=max_beta)
    if schedule != "linear":
        raise ValueError(f"unknown schedule {schedule!r}; accepted: linear, cosine")
    return linear_beta_schedule(T, 1e-4 * 1000 / T, 0.02 * 1000 / T).clamp(max=max_beta)


def make_alphas_cumprod(betas):
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), (T,) float64 on the CPU: Song et al.'s alpha_t, all
    that DDIM needs of the schedule (their App. C.2)."""
    # float64: 1 - alpha_bar_t near t = 1 and alpha_bar_t near t = T are small numbers float32 would round
    return torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64, device="cpu"), 0)


def _expand(v, x):
    """v (B,) reshaped to (B, 1, ..., 1) so that it broadcasts against x (B, ...)."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


# ----------------------------------------------------------------------------------------
# The forward process and its non-Markovian generalisation
# ----------------------------------------------------------------------------------------

def q_sample(x0, t, noise, alphas_cumprod):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. / Song et al. Eq. 4).

    x0, noise: (B, ...); t: (B,) int indices. Every q_sigma below has these marginals.
    """
    ab = _expand(alphas_cumprod.to(x0)[t], x0)  # float64 table -> x's dtype and device
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def q_sigma_posterior(x0, x_t, alpha_bar_t, alpha_bar_prev, sigma):
    """(mean, sigma^2) of q_sigma(x_{t-1} | x_t, x_0) = N(sqrt(alpha_bar_{t-1}) x_0 + sqrt(1 - alpha_bar_{t-1}
    - sigma^2) (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t), sigma^2 I) (Song et al. Eq. 7), whose
    marginals are Eq. 4's for every sigma (Lemma 1); scalar alphas and sigma, t-1 standing for tau_{i-1}."""
    mean = (math.sqrt(alpha_bar_prev) * x0
            + _direction_coef(alpha_bar_prev, sigma) * (x_t - math.sqrt(alpha_bar_t) * x0)
            / math.sqrt(1 - alpha_bar_t))
    return mean, sigma ** 2


def _direction_coef(alpha_bar_prev, sigma):
    """sqrt(1 - alpha_bar_{t-1} - sigma_t^2): the weight of the direction pointing to x_t."""
    c2 = 1 - alpha_bar_prev - sigma ** 2
    if c2 < -1e-12:
        raise ValueError(f"sigma_t^2 = {sigma ** 2:.3g} exceeds 1 - alpha_bar_(t-1) = "
                         f"{1 - alpha_bar_prev:.3g}; accepted: 0 <= eta <= 1")
    return math.sqrt(max(c2, 0.0))


def predict_x0(x_t, eps, alpha_bar_t):
    """Song et al. Eq. 9: f_theta(x_t) = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t),
    the x_0 that Eq. 4 pairs with x_t and the predicted noise. alpha_bar_t: a scalar, or a tensor
    broadcasting against x_t."""
    return (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t ** 0.5


def predict_eps(x_t, x0, alpha_bar_t):
    """The inverse of Eq. 9: eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)."""
    return (x_t - alpha_bar_t ** 0.5 * x0) / (1 - alpha_bar_t) ** 0.5


# ----------------------------------------------------------------------------------------
# The DDIM generative process
# ----------------------------------------------------------------------------------------

def _check_eta(eta):
    if not 0 <= eta <= 1:
        raise ValueError(f"eta = {eta}; accepted: 0 <= eta <= 1 (0 = DDIM, 1 = DDPM)")


def ddim_sigma(alpha_bar_t, alpha_bar_prev, eta):
    """sigma(eta) = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev)
    (Song et al. Eq. 16): 0 is DDIM, 1 DDPM's sqrt(beta-tilde) on the sub-sequence. Scalars in, a float out."""
    _check_eta(eta)
    return eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))


def ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev, sigma, noise=None, clip_x0=False):
    """(x_{t-1}, x0_hat): x_{t-1} = sqrt(alpha_bar_{t-1}) x0_hat + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps
    + sigma_t z (Song et al. Eq. 12; App. D.3 on a sub-sequence), z = `noise` (unused when sigma = 0).
    With sigma = 0 it maps x_t to any other noise level, up or down (Eq. 13). Scalar alphas and sigma."""
    x0 = predict_x0(x_t, eps, alpha_bar_t)
    if clip_x0:  # ours (image data): x0_hat in [-1, 1], eps recomputed so both terms describe one x_0
        x0 = x0.clamp(-1, 1)
        eps = predict_eps(x_t, x0, alpha_bar_t)
    x_prev = math.sqrt(alpha_bar_prev) * x0 + _direction_coef(alpha_bar_prev, sigma) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def timestep_subsequence(T, S, skip="linear"):
    """The sub-sequence tau of the T timesteps the sampler visits (Song et al. Sec. 4.2, App. D.2),
    as increasing 0-based indices (index 0 is the paper's t = 1):

      "uniform"    range(0, T, T // S)                              Song et al.'s runner, --skip_type uniform
      "quad"       int(s) for s in linspace(0, sqrt(0.8 T), S)^2   Song et al.'s runner, --skip_type quad
      "linear"     floor(T i / S) - 1, i = 1..S                     ours: ends at T - 1
      "quadratic"  max(floor(T i^2 / S^2), i) - 1                   ours: ends at T - 1, strictly increasing

    The authors' two start at index 0 and stop short of T - 1 (uniform, T = 1000, S = 50: 0..980),
    so their first step takes x_T ~ N(0, I) as x at tau_S; "uniform" has ceil(T / (T // S))
    entries (S when S divides T) and "quad" repeats an index where the squares are under 1 apart
    (a step from an index to itself leaves x unchanged). Ours keep tau_S = T (App. C.1).
    """
    if not 1 <= S <= T:
        raise ValueError(f"S = {S} sampling steps; accepted: 1 <= S <= T = {T}")
    if skip == "uniform":
        return torch.arange(0, T, T // S, dtype=torch.int64)
    if skip == "quad":
        # numpy.linspace's arithmetic (i * step, the last point set to the end), so that int() sees
        # the same float64 values as the authors' code
        end = math.sqrt(T * 0.8)
        s = torch.arange(S, dtype=torch.float64) * (end / (S - 1)) if S > 1 else torch.zeros(1, dtype=torch.float64)
        if S > 1:
            s[-1] = end
        return (s * s).to(torch.int64)  # int() truncates; the values are >= 0
    i = torch.arange(1, S + 1, dtype=torch.int64)
    if skip == "linear":
        tau = (T * i) // S  # exact integer floor(T i / S)
    elif skip == "quadratic":
        tau = torch.maximum((T * i * i) // (S * S), i)
    else:
        raise ValueError(f"unknown sub-sequence {skip!r}; accepted: uniform, quad, linear, quadratic")
    return tau - 1


def _model_device(model):
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):  # a plain function (e.g. an exact oracle)
        return torch.device("cpu")


@torch.no_grad()  # not inference_mode: classifier guidance differentiates inside
def ddim_sample_chain(model, alphas_cumprod, shape=None, steps=None, eta=0.0, skip="linear", x_T=None,
                      y=None, guidance=0.0, classifier=None, classifier_scale=0.0, clip_x0=False,
                      device=None, generator=None):
    """The generative process of Song et al. Eqs. 10 and 12 on a sub-sequence tau of `steps`
    timesteps (all T when None or 0), yielding (index tau_i - 1, x_{tau_{i-1}}, x0_hat) after each step.

    x_T ~ N(0, I) of `shape` (drawn first from `generator`), or the given `x_T` (a latent from
    ddim_encode or slerp); then for i = S..1 one network call and one ddim_step with
    sigma = ddim_sigma(alpha_bar_{tau_i}, alpha_bar_{tau_{i-1}}, eta), alpha_bar_{tau_0} := 1,
    drawing z ~ N(0, I) from `generator` only at steps with sigma > 0 (none for eta = 0; none at
    the last step, as in Ho et al. Algorithm 2). The last x is the sample x_0 = x0_hat of tau_1.
    The network's output is turned into epsilon by guided_eps (guidance w, classifier guidance
    with scale s). model(x_t, t, y) -> (B, C or 2C, ...); classifier(x_t, t) -> logits (B, K).
    """
    T = len(alphas_cumprod)
    tau = timestep_subsequence(T, steps or T, skip)
    _check_eta(eta)  # before anything is drawn
    if x_T is None:
        if shape is None:
            raise ValueError("give the shape of the samples or a latent x_T")
        x_T = torch.randn(shape, generator=generator, device=device or _model_device(model))
    x = x_T
    for i in reversed(range(len(tau))):
        index = int(tau[i])
        ab_t = float(alphas_cumprod[index])
        ab_prev = float(alphas_cumprod[tau[i - 1]]) if i > 0 else 1.0
        t = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
        eps = guided_eps(model, x, t, alphas_cumprod, y, guidance, classifier, classifier_scale)
        sigma = ddim_sigma(ab_t, ab_prev, eta)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if sigma > 0 else None
        x, x0 = ddim_step(x, eps, ab_t, ab_prev, sigma, z, clip_x0)
        yield index, x, x0


def ddim_sample(model, alphas_cumprod, shape=None, **kwargs):
    """The sample x_0 (B, ...) of ddim_sample_chain (same arguments). With eta = 0 and x_T from
    ddim_encode on the same tau this is the reconstruction x_T -> x_0 (Song et al. Sec. 5.4)."""
    x = None
    for _, x, _ in ddim_sample_chain(model, alphas_cumprod, shape, **kwargs):
        pass
    return x


@torch.no_grad()  # as the sampler: its codes may go on to a classifier-guided decoding
def ddim_encode(model, alphas_cumprod, x0, steps=None, skip="linear", y=None, guidance=0.0):
    """x_T (B, ...) from x_0: Euler steps of Song et al. Eq. 14, d x_bar = eps(x_t, t) d sigma with
    x_bar = x / sqrt(alpha_bar), sigma = sqrt((1 - alpha_bar) / alpha_bar), upwards along tau (Sec. 4.3),
    each slope taken where its step starts; decoding by ddim_sample(eta=0) errs by O(1/S) (Table 2)."""
    T = len(alphas_cumprod)
    tau = timestep_subsequence(T, steps or T, skip)
    x, ab_prev, prev = x0, 1.0, 0
    for index in tau.tolist():
        ab_t = float(alphas_cumprod[index])
        t = torch.full((x.shape[0],), prev, dtype=torch.long, device=x.device)  # from x_0: t = 1, the nearest level
        eps = guided_eps(model, x, t, alphas_cumprod, y, guidance)
        x, _ = ddim_step(x, eps, ab_prev, ab_t, 0.0)  # Eq. 13 from alpha_bar_prev up to alpha_bar_t
        ab_prev, prev = ab_t, index
    return x


def slerp(z0, z1, alpha):
    """Spherical linear interpolation of latents (Song et al. Sec. 5.3, App. D.5 Eq. 67):

        z(alpha) = sin((1 - alpha) theta) / sin(theta) z0 + sin(alpha theta) / sin(theta) z1,
        theta = arccos(<z0, z1> / (|z0| |z1|)),

    per example over all its dimensions. Gaussian latents concentrate on a sphere, which a
    straight line would cut through (its midpoint has norm |z| / sqrt(2) for orthogonal z0, z1).
    z0, z1: (B, ...) (B = 1 broadcasts); alpha: a float or a tensor (N,) giving (N, ...).
    Parallel latents (theta = 0) fall back to the straight line, slerp's limit.
    """
    shape = (-1, *([1] * (z0.dim() - 1)))
    a = torch.as_tensor(alpha, dtype=z0.dtype, device=z0.device).reshape(shape)
    f0, f1 = z0.flatten(1), z1.flatten(1)
    cos = (f0 * f1).sum(1) / (f0.norm(dim=1) * f1.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1, 1)).reshape(shape)
    s = torch.sin(theta)
    small = s < 1e-6
    s = torch.where(small, torch.ones_like(s), s)
    w0 = torch.where(small, 1 - a, torch.sin((1 - a) * theta) / s)
    w1 = torch.where(small, a, torch.sin(a * theta) / s)
    return w0 * z0 + w1 * z1


# ----------------------------------------------------------------------------------------
# Guidance
# ----------------------------------------------------------------------------------------

def classifier_grad(classifier, x_t, t, y):
    """grad_{x_t} log p_phi(y | x_t, t) (B, ...), by autograd even inside no_grad.

    Examples are independent (the classifier must not mix the batch: no batch norm), so the
    gradient of the sum over the batch is each example's own gradient.
    """
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        log_p = F.log_softmax(classifier(x, t), dim=-1)
        chosen = log_p.gather(1, y.reshape(-1, 1)).sum()
        return torch.autograd.grad(chosen, x)[0]


def guided_eps(model, x_t, t, alphas_cumprod, y=None, guidance=0.0, classifier=None, classifier_scale=0.0):
    """The sampler's epsilon at x_t (B, C, ...): eps~ = (1 + w) eps(x_t, y) - w eps(x_t, null) (Ho &
    Salimans Eq. 6), then eps^ = eps~ - sqrt(1 - alpha_bar_t) s grad_x log p_phi(y | x_t, t) (Dhariwal &
    Nichol Algorithm 2); each extra call made only when its weight is not 0. y: (B,) labels or None."""
    c = x_t.shape[1]
    eps = model(x_t, t, y)[:, :c]  # a learned-variance network of ddpm.py outputs 2C channels
    if guidance != 0:
        if y is None:
            raise ValueError("classifier-free guidance needs labels y and a class-conditional model")
        eps = (1 + guidance) * eps - guidance * model(x_t, t, None)[:, :c]
    if classifier_scale != 0:
        if classifier is None or y is None:
            raise ValueError("classifier guidance needs a classifier and labels y")
        grad = classifier_grad(classifier, x_t, t, y)
        eps = eps - (1 - _expand(alphas_cumprod.to(x_t)[t], x_t)).sqrt() * classifier_scale * grad
    return eps


def drop_labels(y, p_uncond, null_label, generator=None):
    """Ho & Salimans Algorithm 1: replace each label by the null label with probability p_uncond,
    so that one network learns both eps(x_t, y) and eps(x_t, null)."""
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(y, null_label), y)


# ----------------------------------------------------------------------------------------
# Training objectives
# ----------------------------------------------------------------------------------------

def l_simple(model, x0, alphas_cumprod, y=None, t=None, noise=None):
    """Per-example loss (B,) of Ho et al. Eq. 14 (Algorithm 1), what DDIM reuses (Song et al. Sec. 3.2:
    L_1, whose optimum does not depend on sigma): || eps - eps_theta(x_t, t) ||^2 averaged over
    dimensions, at t uniform in [0, T) and x_t from q_sample. The optimum is E[eps | x_t]."""
    if t is None:
        t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    out = model(q_sample(x0, t, noise, alphas_cumprod), t, y)[:, :x0.shape[1]]
    return (out - noise).pow(2).reshape(x0.shape[0], -1).mean(1)


def classifier_loss(classifier, x0, y, alphas_cumprod, t=None, noise=None):
    """Per-example cross-entropy (B,) -log p_phi(y | x_t, t) of the noise-aware classifier on
    x_t ~ q(x_t | x_0) at t uniform in [0, T) (Dhariwal & Nichol Sec. 4: the classifier is
    trained on noised inputs at the diffusion's own noise levels). In expectation it is at least
    H(y | x_t), with equality for the exact posterior p(y | x_t)."""
    if t is None:
        t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    return F.cross_entropy(classifier(q_sample(x0, t, noise, alphas_cumprod), t), y, reduction="none")


# ----------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------
# The epsilon-networks are ddpm.py's, with the same module names and constructor arguments,
# so ddpm.py's state dicts load into them: model(x_t, t, y=None) -> epsilon.

def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps (Ho et al. Sec. 4, from Vaswani et al. 2017).

    t: (B,) integers; returns (B, dim) = [sin(t w_i), cos(t w_i)], w_i = 10000^(-i / (dim/2 - 1)).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _norm(c):
    # 32 groups as in the paper for its 128/256-channel layers; fewer for narrow toy networks.
    return nn.GroupNorm(min(32, c // 4), c)


def _zero(module):
    # The official code initialises the last layer of each residual branch at zero, so every
    # block starts as the identity.
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """Wide-ResNet block with GroupNorm, a per-channel time-embedding bias and dropout."""

    def __init__(self, cin, cout, temb_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2, self.dropout = _norm(cout), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, c):
        super().__init__()
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)  # the paper's three 1x1 projections, fused
        self.proj = _zero(nn.Conv2d(c, c, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C), scale 1/sqrt(C)
        return x + self.proj(a.transpose(1, 2).reshape(b, c, h, w))


def _encoder(in_ch, image_size, ch, ch_mult, num_res_blocks, attn_res, dropout):
    """The U-Net's down half, shared by UNet and UNetClassifier: (time MLP, conv_in, down layers,
    middle layers, the channels of every skip, the channels at the bottom)."""
    if image_size % 2 ** (len(ch_mult) - 1):
        raise ValueError(f"image side {image_size} is not divisible by 2^{len(ch_mult) - 1}; "
                         "use fewer resolution levels (ch_mult)")
    temb_dim = 4 * ch
    temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
    conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
    down, skips, c, res = nn.ModuleList(), [ch], ch, image_size
    for i, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            down.append(ResBlock(c, ch * mult, temb_dim, dropout))
            c = ch * mult
            if res in attn_res:
                down.append(AttnBlock(c))
            skips.append(c)
        if i < len(ch_mult) - 1:
            down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
            res //= 2
            skips.append(c)
    mid = nn.ModuleList([ResBlock(c, c, temb_dim, dropout), AttnBlock(c), ResBlock(c, c, temb_dim, dropout)])
    return temb, conv_in, down, mid, skips, c


def _run_down(layers, h, emb):
    """Applies down (or middle) layers; returns the output and the activations kept for skips."""
    hs = [h]
    for layer in layers:
        h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        if isinstance(layer, AttnBlock):  # attention refines the block before it
            hs[-1] = h
        else:
            hs.append(h)
    return h, hs


class UNet(nn.Module):
    """The DDPM U-Net (Ho et al. Sec. 4 and App. B; PixelCNN++ backbone), as in ddpm.py.

    Resolution levels with `num_res_blocks` ResBlocks each (self-attention after them at the
    sides listed in `attn_res`), stride-2 convolutions down, nearest-neighbour + conv up, skip
    connections from every down block, middle ResBlock-Attention-ResBlock. The time embedding
    is sinusoidal followed by a 2-layer MLP (width 4 * ch). With `num_classes` > 0 a learned
    class embedding is added to it; label `num_classes` is the "null" label of classifier-free
    guidance. Outputs `2 * in_ch` channels when the variance is learned (epsilon, then v).
    x: (B, C, H, W) in [-1, 1], t: (B,) int, y: (B,) int or None (= null label).
    """

    def __init__(self, in_ch=3, image_size=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_res=(16,), dropout=0.1, num_classes=0, learn_sigma=False):
        super().__init__()
        self.ch, self.num_classes = ch, num_classes
        temb, conv_in, down, mid, skips, c = _encoder(in_ch, image_size, ch, ch_mult, num_res_blocks,
                                                      attn_res, dropout)
        # registered in ddpm.py's order, so that parameters() (and an optimiser's state) line up
        self.temb = temb
        self.label_emb = nn.Embedding(num_classes + 1, 4 * ch) if num_classes else None
        self.conv_in, self.down, self.mid = conv_in, down, mid
        self.up, res = nn.ModuleList(), image_size // 2 ** (len(ch_mult) - 1)
        for i, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), ch * mult, 4 * ch, dropout))
                c = ch * mult
                if res in attn_res:
                    self.up.append(AttnBlock(c))
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(c, c, 3, padding=1)))
                res *= 2
        self.norm_out = _norm(c)
        self.conv_out = _zero(nn.Conv2d(c, in_ch * (2 if learn_sigma else 1), 3, padding=1))

    def forward(self, x, t, y=None):
        """x (B, C, H, W), t (B,) int, y (B,) int or None -> (B, C or 2C, H, W)."""
        emb = self.temb(timestep_embedding(t, self.ch))
        if self.label_emb is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes)
            emb = emb + self.label_emb(y)
        h, hs = _run_down(self.down, self.conv_in(x), emb)
        h, _ = _run_down(self.mid, h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class PointMLP(nn.Module):
    """Residual MLP for 2D points, as in ddpm.py: time embedding added inside every block."""

    def __init__(self, dim=2, hidden=128, depth=3, learn_sigma=False):
        super().__init__()
        self.hidden = hidden
        self.temb = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList([nn.ModuleList([nn.Linear(hidden, hidden), nn.Linear(hidden, hidden),
                                                    nn.Linear(hidden, hidden)]) for _ in range(depth)])
        self.out = _zero(nn.Linear(hidden, dim * (2 if learn_sigma else 1)))

    def forward(self, x, t, y=None):
        """x (B, 2), t (B,) int; y is ignored (point sets have no labels) -> (B, 2 or 4)."""
        emb = self.temb(timestep_embedding(t, self.hidden))
        h = self.inp(x)
        for lin1, lin_t, lin2 in self.blocks:
            h = h + lin2(F.silu(lin1(F.silu(h)) + lin_t(F.silu(emb))))
        return self.out(F.silu(h))


class UNetClassifier(nn.Module):
    """Noise-aware image classifier p_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol
    Sec. 4: the down-sampling trunk of the U-Net, time-conditioned, with a pooled head).

    The U-Net's time embedding, down half and middle block, then GroupNorm, SiLU, a global
    mean pool (their classifier pools with attention at 8x8) and a linear layer to `num_classes`
    logits. Call as classifier(x_t, t) -> (B, num_classes).
    """

    def __init__(self, in_ch=3, image_size=32, num_classes=10, ch=128, ch_mult=(1, 2, 2, 2),
                 num_res_blocks=2, attn_res=(16,), dropout=0.0):
        super().__init__()
        self.ch = ch
        self.temb, self.conv_in, self.down, self.mid, _, c = _encoder(
            in_ch, image_size, ch, ch_mult, num_res_blocks, attn_res, dropout)
        self.norm_out = _norm(c)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x, t):
        """x (B, C, H, W), t (B,) int -> logits (B, num_classes)."""
        emb = self.temb(timestep_embedding(t, self.ch))
        h, _ = _run_down(self.down, self.conv_in(x), emb)
        h, _ = _run_down(self.mid, h, emb)
        return self.head(F.silu(self.norm_out(h)).mean(dim=(2, 3)))


class PointClassifier(PointMLP):
    """Noise-aware classifier p_phi(y | x_t, t) for 2D points: PointMLP's residual blocks with
    `num_classes` logits out. Call as classifier(x_t, t) -> (B, num_classes)."""

    def __init__(self, num_classes, dim=2, hidden=128, depth=3):
        super().__init__(dim, hidden, depth)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x, t):
        """x (B, 2), t (B,) int -> logits (B, num_classes)."""
        return super().forward(x, t)


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

@dataclass
class Config(RunConfig):
    """ddpm.py's fields for the network and the diffusion, under the same names and defaults, so
    that a checkpoint of either file means the same here; then DDIM's own for sampling, guidance
    and evaluation. The defaults train the 8x8 `digits` on a laptop CPU in minutes."""
    steps: int = flag(1000, "training steps")
    lr: float = flag(2e-3, "Adam learning rate (after warm-up)")
    save_every: int = flag(500, "checkpoint and EMA sample grid every this many steps")
    eval: typing.Optional[str] = flag(None, "load CKPT, report the test reconstruction error against S (DDIM has "
                                      "no likelihood; a classifier: its accuracy against t) and exit")
    # diffusion (as ddpm.py)
    timesteps: int = flag(1000, "number of diffusion steps T the network is trained on")
    schedule: str = flag("linear", "beta schedule: linear (Ho et al.) or cosine (Nichol & Dhariwal)",
                         choices=("linear", "cosine"))
    max_beta: float = flag(0.999, "the largest beta_t: the schedule is clipped there (Nichol & Dhariwal: 0.999)")
    # network (as ddpm.py)
    ch: int = flag(32, "U-Net base channels")
    ch_mult: tuple = flag((1, 2), "U-Net channel multiplier per resolution")
    num_res_blocks: int = flag(1, "residual blocks per resolution")
    attn_res: tuple = flag((4,), "resolutions (side in pixels) with self-attention")
    dropout: float = flag(0.0, "dropout in the residual blocks")
    hidden: int = flag(128, "width of the MLP used on 2D point sets")
    # optimisation (as ddpm.py)
    warmup: int = flag(100, "linear learning-rate warm-up steps")
    grad_clip: float = flag(1.0, "gradient-norm clip (0 = off)")
    ema_decay: float = flag(0.995, "EMA decay of the weights used for sampling and eval")
    flip: bool = flag(False, "random horizontal flips of training images")
    # conditioning (as ddpm.py)
    cond: bool = flag(False, "train class-conditional with label dropout (classifier-free guidance)")
    p_uncond: float = flag(0.1, "probability of dropping the label when --cond")
    guidance: float = flag(0.0, "classifier-free guidance weight w of Ho & Salimans Eq. 6 (needs a --cond network)")
    # DDIM sampling
    sample_steps: int = flag(50, "S: sampling steps on a sub-sequence tau of the T (0 = all T)")
    eta: float = flag(0.0, "eta of Song et al. Eq. 16: 0 = DDIM (deterministic), 1 = DDPM's posterior variance")
    skip: typing.Optional[str] = flag(None, "the sub-sequence tau: uniform or quad (Song et al.'s code), linear or "
                                      "quadratic (ours, ending at T); unset: the checkpoint's, else the paper's (quad "
                                      "on cifar10, uniform on other images) or linear on 2D points",
                                      choices=("uniform", "quad", "linear", "quadratic"))
    clip_x0: bool = flag(True, "clip the predicted x_0 to [-1, 1] when sampling images (ours, as ddpm.py; Song et "
                         "al.'s code does not: --no-clip-x0)")
    # classifier guidance
    train_classifier: bool = flag(False, "train the noise-aware classifier p(y | x_t, t) of classifier guidance "
                                  "instead of the epsilon-network (run folder runs/ddim-<dataset>-classifier)")
    classifier: typing.Optional[str] = flag(None, "with --sample: classifier guidance by this checkpoint of "
                                            "--train-classifier (Dhariwal & Nichol Algorithm 2)")
    classifier_scale: float = flag(1.0, "guidance scale s of --classifier (1: the exact p(x | y) for an exact "
                                   "classifier)")
    # evaluation
    eval_steps: tuple = flag((10, 20, 50, 100, 200), "S of --eval's reconstructions (those above T are skipped); "
                             "Song et al. Table 2 has 10,20,50,100,200,500,1000")
    eval_n: int = flag(1000, "evaluate on the first N test examples (0 = all)")


PRESETS = {
    # Ho et al. 2020, Sec. 4 and App. B, as ddpm.py (35,746,307 parameters); tau "quad" as Song
    # et al. sample CIFAR-10 (App. D.2; their runner's --skip_type quad).
    "cifar10": dict(steps=800_000, batch_size=128, lr=2e-4, warmup=5000, grad_clip=1.0,
                    ema_decay=0.9999, flip=True, timesteps=1000, schedule="linear", ch=128,
                    ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,), dropout=0.1,
                    save_every=10_000, skip="quad"),
    # ddpm.py's: the CIFAR-10 recipe scaled to 28x28 (28 -> 14 -> 7); attention at 14x14; tau
    # "uniform" as Song et al. sample their other data sets (App. D.2).
    "mnist": dict(steps=50_000, batch_size=128, lr=2e-4, warmup=1000, ema_decay=0.9999,
                  ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_res=(14,), dropout=0.1,
                  save_every=5000, skip="uniform"),
    "fashion-mnist": dict(steps=50_000, batch_size=128, lr=2e-4, warmup=1000, ema_decay=0.9999,
                          ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_res=(14,),
                          dropout=0.1, save_every=5000, skip="uniform"),
    # the Config defaults; tau "uniform" by paper_skip (not set here: --sample parses this preset,
    # and a set value would override the checkpoint's)
    "digits": dict(),
    # ddpm.py's 2D preset (MLP network, T = 200) but for the schedule. The deterministic first
    # step from x_T multiplies the error of the network's epsilon by about
    # sqrt(alpha_bar_prev / alpha_bar_T): with the cosine schedule (its last beta clipped at
    # 0.999, alpha_bar_T = 6e-8) 22 times more than with the linear one (3e-5); see README.
    "points": dict(steps=5000, batch_size=512, lr=1e-3, warmup=100, ema_decay=0.995,
                   timesteps=200, schedule="linear", hidden=128, save_every=2500, n_samples=2000),
}


def check_config(cfg):
    """The flags' values that their types let through; what depends on the data is checked in
    build, --sample-steps against a checkpoint's T in draw_samples, a classifier against the
    network it guides in draw_samples."""
    for name in ("timesteps", "ch", "num_res_blocks", "hidden"):
        check_range(cfg, name, 1)
    for name in ("warmup", "grad_clip", "guidance", "eval_n", "classifier_scale"):
        check_range(cfg, name, 0)
    for name in ("p_uncond", "dropout", "ema_decay"):
        check_range(cfg, name, 0, 1, open_high=True)
    check_range(cfg, "eta", 0, 1)
    check_range(cfg, "max_beta", 0, 1, open_low=True, open_high=True)
    check_range(cfg, "sample_steps", 0, None if cfg.sample or cfg.eval else cfg.timesteps)
    if not cfg.ch_mult or min(cfg.ch_mult) < 1:
        raise UserError(f"--ch-mult {','.join(map(str, cfg.ch_mult))} is out of range; accepted: positive "
                        "multipliers, one per resolution, e.g. 1,2,2,2")
    if not cfg.eval_steps or min(cfg.eval_steps) < 1:
        raise UserError(f"--eval-steps {','.join(map(str, cfg.eval_steps))} is out of range; accepted: "
                        "positive step counts, e.g. 10,20,50,100")
    if cfg.train_classifier and (cfg.sample or cfg.eval):
        raise UserError("--train-classifier trains a classifier; it does not combine with --sample or --eval "
                        "(give its checkpoint to --classifier, or to --eval for its accuracy)")
    if cfg.train_classifier and cfg.cond:
        raise UserError("--train-classifier trains p(y | x_t, t), which takes no label; drop --cond")
    if cfg.classifier and not cfg.sample:
        raise UserError("--classifier guides sampling; give it with --sample CKPT")


def learning_rate(step, cfg):
    """The learning rate of step `step` (0-based): linear warm-up over cfg.warmup steps, then
    constant (Ho et al. 2020, App. B)."""
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))


def paper_skip(info):
    """The sub-sequence Song et al. sample with (App. D.2): quad on CIFAR-10, uniform on their other
    image sets; linear (ours, ending at T) on 2D points, where the first step starts from x_T."""
    if info.kind == "points":
        return "linear"
    return "quad" if info.name == "cifar10" else "uniform"


# ----------------------------------------------------------------------------------------
# Data and pictures
# ----------------------------------------------------------------------------------------

def to_model_space(x, info):
    """uint8 levels 0..L-1 -> [-1, 1] by x / (L - 1) * 2 - 1 (Ho et al. Sec. 3.3); points unchanged."""
    if info.kind == "points":
        return x.float()
    return x.float() / (info.levels - 1) * 2 - 1


def to_levels(x, info):
    """[-1, 1] -> nearest integer level (uint8), the inverse of to_model_space."""
    return ((x.clamp(-1, 1) + 1) / 2 * (info.levels - 1)).round().to(torch.uint8)


def unit_scale(info):
    """Model-space differences times this are on the scale of Song et al. Table 2: [0, 1] for
    images (model space [-1, 1] is twice as wide), the data's own units for points."""
    return 0.5 if info.kind == "image" else 1.0


def sample_labels(n, labelled, info, device):
    """Labels 0, 1, ..., 9, 0, ... when the sampler needs them (a conditional network, or a
    classifier to guide it), None otherwise."""
    return torch.arange(n, device=device) % info.num_classes if labelled else None


def picture_steps(T):
    """The S of the pictures: 10, 20, 50, 100 (those below T) and T, as Song et al. Table 1."""
    return sorted({s for s in (10, 20, 50, 100) if s < T} | {T})


def save_samples(x, path, info, title=None):
    """Samples in model space as a scatter (points) or an image grid (ten per row when they divide)."""
    if info.kind == "points":
        save_scatter(x.cpu(), path, lim=info.lim, title=title)
    else:
        save_image_grid(to_levels(x, info).cpu(), path, levels=info.levels,
                        nrow=10 if x.shape[0] % 10 == 0 else None, title=title)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _tile(x, nrow):
    """Images in model space (N, C, H, W) as one array (rows, cols[, 3]) in [0, 1], clipped,
    `nrow` to a row with a grey one-pixel gap."""
    x = (x.detach().float().cpu().clamp(-1, 1) + 1) / 2
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + 1) + 1, nrow * (w + 1) + 1), 0.5)
    for i in range(n):
        top, left = 1 + (i // nrow) * (h + 1), 1 + (i % nrow) * (w + 1)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()


def save_panels(rows, path, info, title, nrow=4):
    """A table of panels {row label: {column label: x or None}}: images tiled `nrow` to a row,
    points as a scatter on [-lim, lim]^2; None leaves its place empty."""
    plt = _pyplot()
    n_cols = max(len(r) for r in rows.values())
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.9 * n_cols, 1.9 * len(rows) + 0.5), squeeze=False)
    for r, (row_label, panels) in enumerate(rows.items()):
        for c in range(n_cols):
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            if c >= len(panels) or list(panels.values())[c] is None:
                axes[r, c].axis("off")
        for c, (label, x) in enumerate(panels.items()):
            ax = axes[r, c]
            if x is None:
                continue
            if info.kind == "points":
                x = x.detach().float().cpu()
                ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
                ax.set_xlim(-info.lim, info.lim), ax.set_ylim(-info.lim, info.lim), ax.set_aspect("equal")
            else:
                ax.imshow(_tile(x, nrow), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(label, fontsize=8)
        first = next(c for c, x in enumerate(panels.values()) if x is not None)
        axes[r, first].set_ylabel(row_label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_figure(net, alphas_cumprod, path, info, n, skip, guide, device, seed):
    """Song et al. Table 1 as pictures: n samples from one shared x_T for S in {10, 20, 50, 100, T}
    (columns) and eta in {0, 0.5, 1} (rows). With eta = 0 the columns converge to one picture as
    S grows; eta = 1 is DDPM on the sub-sequence. `guide`: the sampler's label, guidance,
    classifier and clipping arguments for n examples, as a function of n."""
    x_T = torch.randn((n, *info.shape), generator=torch.Generator(device=device).manual_seed(seed), device=device)
    rows = {}
    for eta in (0.0, 0.5, 1.0):
        rows[f"eta = {eta:g}"] = {
            f"S = {S}": ddim_sample(net, alphas_cumprod, x_T=x_T, steps=S, eta=eta, skip=skip, **guide(n),
                                    generator=torch.Generator(device=device).manual_seed(seed + 1))
            for S in picture_steps(len(alphas_cumprod))}
    save_panels(rows, path, info, f"DDIM from one shared x_T: S steps ({skip} tau) by eta")


def reconstruction_figure(net, alphas_cumprod, x0, y, path, info, skip):
    """Song et al. Sec. 5.4: test data x_0 -> x_T by the ODE encoder (ddim_encode) -> x_0 by the
    sampler with eta = 0, for each S of picture_steps; each panel is titled with its mean squared
    error on the scale of unit_scale. Returns {S: MSE}. Neither direction clips x0_hat (the clip
    is not part of the ODE, and decoding with it undoes the encoding less well); the decoded
    image is clamped to [-1, 1] at the end, as any picture is."""
    rows = {"reconstruction": {"test data": x0}, "code x_T": {"": None}}
    errors = {}
    for S in picture_steps(len(alphas_cumprod)):
        z = ddim_encode(net, alphas_cumprod, x0, steps=S, skip=skip, y=y)
        rec = ddim_sample(net, alphas_cumprod, x_T=z, steps=S, skip=skip, y=y)
        rec = rec.clamp(-1, 1) if info.kind == "image" else rec  # the picture's range, after the ODE
        errors[S] = (((rec - x0) * unit_scale(info)) ** 2).mean().item()
        rows["reconstruction"][f"S = {S}\nMSE {errors[S]:.2g}"] = rec
        rows["code x_T"][f"S = {S}"] = z
    scale = "on [0, 1]; codes shown clipped to [-1, 1]" if info.kind == "image" else "in data units"
    save_panels(rows, path, info, f"test data -> x_T (ODE encoder) -> data, {skip} tau; MSE {scale}")
    return errors


def interpolation_figure(net, alphas_cumprod, path, info, steps, skip, guide, device, seed):
    """Song et al. Sec. 5.3: decode slerp(z0, z1, alpha) for alpha from 0 to 1 with eta = 0, so
    that the sample moves smoothly with the latent. Images: a row per pair of latents (9 alphas);
    points: the path of each of 8 pairs (33 alphas) drawn as a line from o to x."""
    pairs, k = (4, 9) if info.kind == "image" else (8, 33)
    g = torch.Generator(device=device).manual_seed(seed)
    z0, z1 = (torch.randn((pairs, *info.shape), generator=g, device=device) for _ in range(2))
    alpha = torch.linspace(0, 1, k, device=device)
    x_T = torch.cat([slerp(z0[i:i + 1], z1[i:i + 1], alpha) for i in range(pairs)])
    args = guide(pairs)
    if args["y"] is not None:
        args["y"] = args["y"].repeat_interleave(k)  # one label per row
    x = ddim_sample(net, alphas_cumprod, x_T=x_T, steps=steps, skip=skip, **args)
    title = f"slerp in x_T, DDIM S = {steps}, eta = 0"
    if info.kind == "image":
        save_image_grid(to_levels(x, info).cpu(), path, levels=info.levels, nrow=k, title=title)
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.8))
    for path_i in x.detach().float().cpu().reshape(pairs, k, 2):
        line, = ax.plot(path_i[:, 0], path_i[:, 1], "-", lw=1)
        ax.plot(path_i[0, 0], path_i[0, 1], "o", color=line.get_color(), ms=4)
        ax.plot(path_i[-1, 0], path_i[-1, 1], "x", color=line.get_color(), ms=5)
    ax.set_xlim(-info.lim, info.lim), ax.set_ylim(-info.lim, info.lim), ax.set_aspect("equal")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# Run code
# ----------------------------------------------------------------------------------------

MODEL = "ddim"


def build(cfg, info):
    """(network, alphas_cumprod) for a configuration and the data's description: ddpm.py's
    epsilon-network (the U-Net for images, the MLP for points, with ddpm.py's names), or with
    --train-classifier the noise-aware classifier; alphas_cumprod (T,) float64 is all that
    DDIM needs of the schedule."""
    for wanted, flag_name in ((cfg.cond, "--cond"), (cfg.train_classifier, "--train-classifier")):
        if wanted and not info.num_classes:
            raise UserError(f"{flag_name} needs labelled images (digits, mnist, fashion-mnist, cifar10); "
                            f"{info.name} has no labels")
    alphas_cumprod = make_alphas_cumprod(make_betas(cfg.schedule, cfg.timesteps, cfg.max_beta))
    if info.kind == "points":
        return PointMLP(info.shape[0], cfg.hidden), alphas_cumprod
    c, h, w = info.shape
    if h != w or h % 2 ** (len(cfg.ch_mult) - 1):
        raise UserError(f"--ch-mult {','.join(map(str, cfg.ch_mult))} halves the side {len(cfg.ch_mult) - 1} "
                        f"times; {info.name} has {h}x{w} images: use square images and fewer levels")
    if cfg.train_classifier:
        net = UNetClassifier(c, h, info.num_classes, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_res,
                             cfg.dropout)
    else:
        net = UNet(c, h, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_res, cfg.dropout,
                   info.num_classes if cfg.cond else 0)
    return net, alphas_cumprod


def train(cfg):
    """Ho et al. Algorithm 1 (L_simple, which DDIM reuses unchanged: Song et al. Sec. 3.2) with
    Adam, warm-up, gradient clipping and an EMA of the weights; with --train-classifier the same
    loop trains the noise-aware classifier on noised images (Dhariwal & Nichol Sec. 4) in a run
    folder of its own (see main). Under torchrun every process trains on its slice of the global batch (DDP)."""
    with Training(cfg, MODEL) as run:
        ds = load_dataset(cfg.dataset, "train", cfg.data_dir)
        info = ds.info
        seed_everything(cfg.seed)  # the same initial weights on every process
        net, alphas_cumprod = build(cfg, info)
        net.to(run.device)
        ema = EMA(net, cfg.ema_decay)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        batches = Batches(ds, cfg.batch_size, run.dist, seed=cfg.seed)
        step = run.start(info, model=net, ema=ema, opt=opt, batches=batches)
        model = wrap_ddp(net, run.dist, cfg.compile)
        amp = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.amp)
        shape = (100 if cfg.cond else cfg.n_samples, *info.shape)
        sample_steps, skip = cfg.sample_steps or cfg.timesteps, cfg.skip or paper_skip(info)

        def samples(step):
            g = torch.Generator(device=run.device).manual_seed(cfg.seed)
            x = ddim_sample(ema.model, alphas_cumprod, shape, steps=sample_steps, eta=cfg.eta, skip=skip,
                            y=sample_labels(shape[0], cfg.cond, info, run.device), guidance=cfg.guidance,
                            clip_x0=cfg.clip_x0 and info.kind == "image", device=run.device, generator=g)
            save_samples(x, run.out / f"samples_{step}.png", info,
                         f"step {step}: DDIM S = {sample_steps} ({skip} tau), eta = {cfg.eta:g}, EMA weights")

        for step in run.steps(step, None if cfg.train_classifier else samples):
            x, y = next(batches)
            x0 = to_model_space(x, info)
            if cfg.flip:
                x0 = torch.where(torch.rand(x0.shape[0], 1, 1, 1, device=x0.device) < 0.5, x0.flip(3), x0)
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, cfg)
            with amp:
                if cfg.train_classifier:
                    loss = classifier_loss(model, x0, y, alphas_cumprod).mean()
                else:
                    y = drop_labels(y, cfg.p_uncond, info.num_classes) if cfg.cond else None
                    loss = l_simple(model, x0, alphas_cumprod, y).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            ema.update(net)
            run.log(loss=loss)
    run.report(["ckpt.pt", f"samples_{run.step}.png", "loss.png"])


def evaluate(cfg):
    """--eval CKPT. DDIM has no likelihood (with eta = 0 it is an implicit model), so for an
    epsilon-network this is Song et al. Table 2: test data encoded to x_T by the ODE and decoded
    with the same S steps (neither direction clips x0_hat; decoded images are clamped to [-1, 1]
    at the end), the mean squared error per dimension (on [0, 1] for images) for each S of
    --eval-steps. For a classifier of --train-classifier: its accuracy on test images noised
    to five levels t, and its cross-entropy at t drawn uniformly."""
    (net, alphas_cumprod), saved, info = load(cfg.eval, get_device(cfg.device))
    device = next(net.parameters()).device
    if cfg.fid is not None:  # Song et al. Table 1: FID of S = --sample-steps steps at --eta
        if saved.train_classifier:
            raise UserError(f"{cfg.eval} is a noise-aware classifier; --fid takes an epsilon-network's checkpoint")
        check_range(cfg, "sample_steps", 0, len(alphas_cumprod))
        return fid_evaluate(cfg, info, lambda n, g: to_levels(ddim_sample(
            net, alphas_cumprod, (n, *info.shape), steps=cfg.sample_steps or len(alphas_cumprod), eta=cfg.eta,
            skip=cfg.skip or saved.skip or paper_skip(info), device=device, generator=g,
            y=sample_labels(n, saved.cond, info, device), guidance=cfg.guidance, clip_x0=cfg.clip_x0), info))
    out = output_dir(cfg, cfg.eval)
    ds = load_dataset(info.name, "test", cfg.data_dir)
    n = min(cfg.eval_n or len(ds.data), len(ds.data))
    T, image, start = len(alphas_cumprod), info.kind == "image", time.time()
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    if saved.train_classifier:
        levels = sorted({0, T // 4, T // 2, 3 * T // 4, T - 1})
        correct, total = dict.fromkeys(levels, 0), 0.0
        with torch.no_grad():
            for i in range(0, n, cfg.batch_size):
                x0 = to_model_space(ds.data[i:min(i + cfg.batch_size, n)].to(device), info)
                y = ds.labels[i:i + len(x0)].to(device)
                for index in levels:
                    t = torch.full((len(x0),), index, dtype=torch.long, device=device)
                    noise = torch.randn(x0.shape, generator=g, device=device)
                    correct[index] += (net(q_sample(x0, t, noise, alphas_cumprod), t).argmax(1) == y).sum().item()
                t = torch.randint(T, (len(x0),), generator=g, device=device)
                noise = torch.randn(x0.shape, generator=g, device=device)
                total += classifier_loss(net, x0, y, alphas_cumprod, t, noise).sum().item()
        fields = {"loss": total / n, **{f"accuracy_t{index + 1}": correct[index] / n for index in levels}}
        reports = ("noise-aware classifier: accuracy on test images noised to t (the paper's t, 1..T) and "
                   "cross-entropy in nats at t uniform")
    else:
        steps = sorted({S for S in cfg.eval_steps if S <= T})
        if not steps:
            raise UserError(f"--eval-steps {','.join(map(str, cfg.eval_steps))} all exceed the checkpoint's "
                            f"T = {T}; accepted: step counts from 1 to {T}")
        skip = cfg.skip or saved.skip or paper_skip(info)
        squared = dict.fromkeys(steps, 0.0)
        for i in range(0, n, cfg.batch_size):
            x0 = to_model_space(ds.data[i:min(i + cfg.batch_size, n)].to(device), info)
            y = ds.labels[i:i + len(x0)].to(device) if saved.cond else None  # a conditional net encodes with the label
            for S in steps:
                z = ddim_encode(net, alphas_cumprod, x0, steps=S, skip=skip, y=y)
                x = ddim_sample(net, alphas_cumprod, x_T=z, steps=S, skip=skip, y=y)  # no clip: the ODE
                x = x.clamp(-1, 1) if image else x  # the decoded image in its range, as any picture
                squared[S] += (((x - x0) * unit_scale(info)) ** 2).sum().item()
        fields = {"skip": skip, **{f"mse_s{S}": squared[S] / (n * info.dims) for S in steps}}
        reports = ("no likelihood (DDIM with eta = 0 is an implicit model; ddpm.py --eval gives the DDPM bound of a "
                   "network it trained): mean squared error per dimension, " + ("on [0, 1]" if image else
                   "in data units") + ", of test data encoded to x_T by the ODE and decoded with S steps "
                   "(Song et al. Table 2)")
    Logger(out, 0).event("eval", split="test", n=n, reports=reports, **fields, seconds=round(time.time() - start, 1))
    report_files(out, ["metrics.jsonl"])
    return dict(n=n, **fields)


def draw_samples(cfg):
    """--sample CKPT (of ddim.py or ddpm.py): n_samples by DDIM with the chosen S, eta and
    guidance (samples.png, samples.pt), then sweep.png (S by eta from one shared x_T),
    reconstruction.png (test data -> x_T -> data) and interpolation.png (slerp in x_T)."""
    (net, alphas_cumprod), saved, info = load(cfg.sample, get_device(cfg.device))
    device = next(net.parameters()).device
    if saved.train_classifier:
        raise UserError(f"{cfg.sample} is a noise-aware classifier (--train-classifier); --sample takes an "
                        "epsilon-network's checkpoint, and the classifier goes to --classifier")
    T = len(alphas_cumprod)
    check_range(cfg, "sample_steps", 0, T)
    if cfg.guidance and not saved.cond:
        raise UserError(f"--guidance needs a checkpoint trained with --cond; {cfg.sample} was not")
    classifier = None
    if cfg.classifier:
        (classifier, classifier_alphas), classifier_cfg, classifier_info = load(cfg.classifier, device)
        if not classifier_cfg.train_classifier:
            raise UserError(f"--classifier {cfg.classifier} is not a classifier's checkpoint; train one with "
                            "--train-classifier")
        if (classifier_info.shape, classifier_info.num_classes) != (info.shape, info.num_classes):
            raise UserError(f"--classifier {cfg.classifier} was trained on {classifier_info.name}, the network on "
                            f"{info.name}; train a classifier on {info.name}")
        if not torch.equal(classifier_alphas, alphas_cumprod):
            raise UserError(f"--classifier {cfg.classifier} was trained with --timesteps {classifier_cfg.timesteps} "
                            f"--schedule {classifier_cfg.schedule} --max-beta {classifier_cfg.max_beta}, the network "
                            f"with --timesteps {saved.timesteps} --schedule {saved.schedule} --max-beta "
                            f"{saved.max_beta}; train the classifier with the network's")
        classifier.requires_grad_(False)  # guidance differentiates with respect to x_t only
    out = output_dir(cfg, cfg.sample)
    steps, skip = cfg.sample_steps or T, cfg.skip or saved.skip or paper_skip(info)

    def guide(n):  # the sampler's label, guidance and clipping arguments for n examples
        return dict(y=sample_labels(n, saved.cond or classifier is not None, info, device), guidance=cfg.guidance,
                    classifier=classifier, classifier_scale=cfg.classifier_scale if classifier is not None else 0.0,
                    clip_x0=cfg.clip_x0 and info.kind == "image")

    g = torch.Generator(device=device).manual_seed(cfg.seed)
    start = time.time()
    x = ddim_sample(net, alphas_cumprod, (cfg.n_samples, *info.shape), steps=steps, eta=cfg.eta, skip=skip,
                    device=device, generator=g, **guide(cfg.n_samples))
    seconds = time.time() - start
    clipped = guide(1)["clip_x0"]
    title = (f"DDIM S = {steps} ({skip} tau{', x0 clipped' * clipped}), eta = {cfg.eta:g}"
             + f", guidance w = {cfg.guidance:g}" * bool(cfg.guidance)
             + f", classifier scale {cfg.classifier_scale:g}" * (classifier is not None))
    save_samples(x, out / "samples.png", info, title)
    torch.save(to_levels(x, info).cpu() if info.kind == "image" else x.cpu(), out / "samples.pt")
    Logger(out, 0).event("sample", n=cfg.n_samples, seconds=round(seconds, 3), samples_per_s=cfg.n_samples / seconds,
                         steps=steps, eta=cfg.eta, skip=skip, clip_x0=clipped, guidance=cfg.guidance,
                         classifier_scale=cfg.classifier_scale if classifier is not None else 0.0)
    # the figures show --n-samples examples, at most 16 images (8 reconstructed) or 1000 points
    n = min(cfg.n_samples, 16 if info.kind == "image" else 1000)
    sweep_figure(net, alphas_cumprod, out / "sweep.png", info, n, skip, guide, device, cfg.seed)
    test = load_dataset(info.name, "test", cfg.data_dir)
    k = min(n, 8) if info.kind == "image" else n
    x0 = to_model_space(test.data[:k].to(device), info)
    y = test.labels[:k].to(device) if saved.cond else None
    reconstruction_figure(net, alphas_cumprod, x0, y, out / "reconstruction.png", info, skip)
    interpolation_figure(net, alphas_cumprod, out / "interpolation.png", info, steps, skip, guide, device, cfg.seed)
    report_files(out, ["samples.png", "samples.pt", "sweep.png", "reconstruction.png", "interpolation.png",
                       "metrics.jsonl"])
    return x


def load(path, device="cpu"):
    """((EMA network, alphas_cumprod), its training Config, its data's description) from a
    checkpoint of ddim.py (an epsilon-network, or a classifier of --train-classifier) or of
    ddpm.py (an epsilon-prediction network; a learned variance's extra channels are dropped, as
    DDIM's variance is sigma_t(eta)). ddpm.py's own fields (mean_type, var_type, lambda_vlb) are
    not part of this file's Config."""
    ckpt = load_checkpoint(path, (MODEL, "ddpm"))
    mean_type = ckpt["config"].get("mean_type", "eps")
    if mean_type != "eps":
        raise UserError(f"{path} is a ddpm.py network predicting {mean_type} (--mean-type {mean_type}); DDIM "
                        "samples epsilon-prediction networks (ddpm.py's default --mean-type eps)")
    cfg, info = saved_config(Config, ckpt)
    net, alphas_cumprod = build(cfg, info)
    state = ckpt["ema"]["model"]
    if ckpt["config"].get("var_type") == "learned":  # outputs (epsilon, v): keep epsilon's C channels
        c = info.shape[0]
        state = {k: v[:c] if k in ("conv_out.weight", "conv_out.bias", "out.weight", "out.bias") else v
                 for k, v in state.items()}
    load_weights(net, state, path)
    return (net.to(device).eval(), alphas_cumprod), cfg, info


def main(argv=None):
    """Train (default), or --eval CKPT, or --sample CKPT; a user's mistake exits with one line."""
    with user_errors():
        cfg = parse_config(Config, PRESETS, argv, doc=__doc__, kinds=("image", "points"))
        if cfg.train_classifier and not cfg.out:  # its own run folder, where a bare --resume looks too
            out = Path("runs") / f"{MODEL}-{Path(cfg.dataset).stem}-classifier"
            argv = [*(sys.argv[1:] if argv is None else argv), "--out", str(out)]
            cfg = parse_config(Config, PRESETS, argv, doc=__doc__, kinds=("image", "points"))
        check_config(cfg)
        return dispatch(cfg, train, evaluate, draw_samples)


if __name__ == "__main__":
    main()
