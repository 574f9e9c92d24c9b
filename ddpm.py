"""Denoising diffusion probabilistic models, with the exact variational bound in bits/dim.

Papers
  Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv 2006.11239 (DDPM).
  Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", arXiv 2102.09672
    (cosine schedule, learned variances with the hybrid loss, respaced sampling).
  Ho & Salimans 2021, "Classifier-Free Diffusion Guidance", arXiv 2207.12598.
  Sohl-Dickstein et al. 2015, "Deep Unsupervised Learning using Nonequilibrium Thermodynamics",
    arXiv 1503.03585 (the variational bound as a sum of per-step KLs).

Implemented: epsilon- or x0-prediction; fixed (beta, beta-tilde) or learned variances; L_simple
and L_hybrid; the whole bound per example in nats (prior, every KL, the discretized decoder, exact
for any number of levels); ancestral sampling on all T steps or a respaced sub-sequence;
classifier-free guidance; the DDPM U-Net (the paper's 35.7M-parameter CIFAR-10 model as a preset)
and an MLP for 2D points. Not implemented: importance-sampled L_vlb (Nichol & Dhariwal Sec. 3.3), FID.

Run it (--dataset cifar10: the paper's model and recipe; --cond --guidance 2; --dataset 8gaussians)
  python ddpm.py                                      # train on 8x8 digits (CPU, minutes)
  python ddpm.py --sample runs/ddpm-digits/ckpt.pt    # samples and a reverse chain (--sample-steps S)
  python ddpm.py --eval runs/ddpm-digits/ckpt.pt      # test bits/dim from the whole bound

Paper -> code (Ho et al. unless named; alpha_bar_t = prod_{s <= t} (1 - beta_s))
  Eq. 4           q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)      q_sample, q_mean_variance
  Eqs. 6-7        q(x_{t-1} | x_t, x_0) = N(mu~_t(x_t, x_0), beta~_t I)               q_posterior
  Eq. 11          mu_theta = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_t)   p_mean_variance
  Eq. 13          L_0 = -log of N(mu_theta(x_1, 1), sigma_1^2) on x_0's bin   discretized_gaussian_log_likelihood
  Eq. 14, Alg. 1  L_simple = E_{t, x_0, eps} || eps - eps_theta(x_t, t) ||^2            training_loss
  Eq. 5           L = L_T + sum_{t>1} KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t)) + L_0   nll, normal_kl
  Alg. 2          x_{t-1} = mu_theta(x_t, t) + sigma_t z, z = 0 at t = 1                sample, sample_chain
  Sec. 4, App. B  U-Net: Wide-ResNet blocks, GroupNorm, self-attention at 16x16        UNet (PointMLP on 2D)
  N&D Eq. 17      alpha_bar(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) pi/2)^2    cosine_beta_schedule
  N&D Eq. 15      Sigma_theta = exp(v log beta_t + (1 - v) log beta~_t)                 p_mean_variance
  N&D Eq. 16      L_hybrid = L_simple + lambda L_vlb, lambda = 0.001                    training_loss
  N&D Sec. 4      betas 1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}} on a sub-sequence   respace
  H&S Eq. 6       eps~ = (1 + w) eps_theta(x_t, c) - w eps_theta(x_t)                    guided_output, drop_labels
  bits/dim        nats / (D ln 2)                                                      bits_per_dim

Conventions: timesteps are integer tensors in [0, T) (index 0 is the paper's t = 1); images
arrive as levels 0..L-1 and are used at x / (L - 1) * 2 - 1 in [-1, 1], the decoder's bins
2 / (L - 1) wide (256 levels for CIFAR-10, 17 for digits); 2D points are used as they are, with
a Gaussian decoder, so their bound is on the continuous NLL in nats.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Batches, EMA, Logger, RunConfig, Training, UserError, check_range, density_on_grid, dispatch,
                    entropy_estimate, flag, get_device, load_checkpoint, load_dataset, load_weights, output_dir,
                    parse_config, report_files, save_density, save_image_grid, save_scatter, saved_config,
                    seed_everything, user_errors, wrap_ddp)
from common import fid_evaluate  # --eval CKPT --fid N


# ----------------------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------------------

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
    """The schedule for T steps, every beta_t at most max_beta; the linear one's ends scaled by
    1000 / T (Nichol & Dhariwal's scaling; it reaches 0.999 only for T < 20)."""
    if T < 1:
        raise ValueError(f"T = {T}: a schedule needs T >= 1 steps")
    if schedule == "cosine":
        return cosine_beta_schedule(T, max_beta=max_beta)
    return linear_beta_schedule(T, 1e-4 * 1000 / T, 0.02 * 1000 / T).clamp(max=max_beta)


# ----------------------------------------------------------------------------------------
# Densities: the KL terms, the decoder, bits/dim
# ----------------------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats, elementwise: the terms of Ho et al. Eq. 5."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def _log_normal_mass(lower, upper):
    """log(Phi(upper) - Phi(lower)) for lower < upper (either may be infinite), elementwise,
    accurate in relative terms however far the interval lies from the mean.

    Each difference is formed where it loses nothing. An interval on one side of the mean is
    mirrored to [near, far] with 0 <= near < far, so P = Q(near) - Q(far) with Q(z) = Phi(-z):
    log P = log Q(near) + log(1 - Q(far) / Q(near)), the ratio taken as a difference of
    log_ndtr's (accurate in relative terms for negative arguments) inside expm1. An interval
    holding the mean has P = 1 - Phi(lower) - Q(upper): log1p of minus the two tails while they
    are below 1/2 (erfc keeps each tail's relative precision, and log P is then near 0), else the
    sum of two non-negative erf's. Unused branches get harmless arguments, so that no inf or
    NaN reaches the gradient through torch.where.
    """
    left, right = upper < 0, lower > 0
    one_sided = left | right
    near = torch.where(one_sided, torch.where(left, -upper, lower), 0.0)
    far = torch.where(one_sided, torch.where(left, -lower, upper), 1.0)
    log_q_near = torch.special.log_ndtr(-near)
    log_one_sided = log_q_near + torch.log(-torch.expm1(torch.special.log_ndtr(-far) - log_q_near))
    lo, hi = torch.where(one_sided, -1.0, lower), torch.where(one_sided, 1.0, upper)
    tails = (torch.special.erfc(-lo / math.sqrt(2)) + torch.special.erfc(hi / math.sqrt(2))) / 2
    small = tails < 0.5
    body = (torch.special.erf(hi / math.sqrt(2)) + torch.special.erf(-lo / math.sqrt(2))) / 2
    log_holding = torch.where(small, torch.log1p(-torch.where(small, tails, 0.0)),
                              torch.log(torch.where(small, 1.0, body)))
    return torch.where(one_sided, log_one_sided, log_holding)


def discretized_gaussian_log_likelihood(x, means, log_scales, levels=256):
    """log of the probability of the bin of x under N(means, e^(2 log_scales)) (Ho et al. Eq. 13).

    x holds data levels k / (levels - 1) * 2 - 1 in [-1, 1]; bin k is [x - d, x + d] with
    d = 1 / (levels - 1), the first bin extended to -inf and the last to +inf, so the
    probabilities of all levels sum to 1. Elementwise, in nats. Every bin's log-probability is
    accurate in relative terms wherever the mean lies: against mpmath, with the mean up to 45
    sigmas beyond the bin, the worst errors measured are 2e-5 in float32 and 4e-13 in float64
    (tested to 1e-4 and 1e-12). The bin edges' offsets from the mean are formed exactly
    (Knuth's two-sum for x - means, and d as its float plus the remainder), so a mean at a bin
    edge keeps its digits even when sigma is smaller than the spacing of the floats near 1;
    the Gaussian mass of the bin is then taken by `_log_normal_mass`. No clamp: a bin of
    probability 1e-300 scores its true 690.8 nats.
    """
    d = 1.0 / (levels - 1)
    d_hi = float(torch.tensor(d, dtype=x.dtype))
    d_lo = d - d_hi  # what d loses in x's dtype (0 in float64)
    c = x - means
    part = c - x  # the share of -means that the rounded c holds
    err = (x - (c - part)) + (-means - part)  # two-sum: c + err == x - means exactly
    inv_std = torch.exp(-log_scales)
    upper = ((c + d_hi) + (err + d_lo)) * inv_std
    lower = ((c - d_hi) + (err - d_lo)) * inv_std
    k = torch.round((x + 1) / (2 * d))
    return torch.where(k <= 0, torch.special.log_ndtr(upper),
                       torch.where(k >= levels - 1, torch.special.log_ndtr(-lower),
                                   _log_normal_mass(lower, upper)))


def gaussian_log_likelihood(x, means, log_scales):
    """log N(x; means, e^(2 log_scales)), elementwise: the continuous decoder for point data."""
    return -0.5 * math.log(2 * math.pi) - log_scales - 0.5 * ((x - means) * torch.exp(-log_scales)) ** 2


def bits_per_dim(nats, dims):
    """Nats per example -> bits per dimension: nats / (dims ln 2)."""
    # the discretized decoder bounds -log P of the integer levels: no offset for the scaling to [-1, 1]
    return nats / (dims * math.log(2))


# ----------------------------------------------------------------------------------------
# The forward and reverse processes, the objective, the bound and the sampler
# ----------------------------------------------------------------------------------------

def _expand(v, x):
    """v (B,) reshaped to (B, 1, ..., 1) so that it broadcasts against x (B, ...)."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def _sum_dims(x):
    return x.reshape(x.shape[0], -1).sum(1)


def guided_output(model, x_t, t, y, guidance):
    """Classifier-free guidance (Ho & Salimans Eq. 6): eps~ = (1 + w) eps(x, c) - w eps(x, null).

    Applied to the mean part of the output (epsilon or x0: x0 is affine in epsilon with the
    same coefficients, so mixing either is the same); a learned variance channel is taken
    from the conditional output. With w = 0 the unconditional network is not called.
    """
    out = model(x_t, t, y)
    if guidance == 0:
        return out
    if y is None:
        raise ValueError("guidance needs labels y and a class-conditional model")
    out_u = model(x_t, t, None)
    c = x_t.shape[1]
    mixed = (1 + guidance) * out[:, :c] - guidance * out_u[:, :c]
    return torch.cat([mixed, out[:, c:]], dim=1)


def drop_labels(y, p_uncond, null_label, generator=None):
    """Ho & Salimans Algorithm 1: replace each label by the null label with probability p_uncond."""
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(y, null_label), y)


class GaussianDiffusion:
    """The forward process q and the reverse process p_theta of Ho et al. 2020.

    betas: (T,) float64. model_mean_type "eps" (Eq. 11) or "x0"; model_var_type "fixedlarge"
    (sigma^2 = beta_t), "fixedsmall" (sigma^2 = beta-tilde_t) or "learned" (Nichol & Dhariwal
    Eq. 15). levels: number of data levels for the discretized decoder L_0, or None for a
    continuous Gaussian decoder (point data). clip_denoised: clip the predicted x0 to [-1, 1]
    when sampling and evaluating the bound (images). Every method takes the network as a
    callable model(x_t, t, y=None) returning (B, C, ...) or (B, 2C, ...) with a learned variance.
    """

    def __init__(self, betas, model_mean_type="eps", model_var_type="fixedlarge", levels=256,
                 clip_denoised=False, lambda_vlb=1e-3):
        betas = torch.as_tensor(betas, dtype=torch.float64, device="cpu")  # tables live on the CPU
        self.betas, self.T = betas, len(betas)
        self.model_mean_type, self.model_var_type = model_mean_type, model_var_type
        self.levels, self.clip_denoised, self.lambda_vlb = levels, clip_denoised, lambda_vlb
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        one = torch.ones(1, dtype=torch.float64, device="cpu")
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # Eq. 7: beta-tilde_t and the two coefficients of mu-tilde_t(x_t, x_0).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta-tilde_1 = 0; the decoder and the learned-variance interpolation need a finite
        # log, so index 0 borrows beta-tilde_2 (as the official code does).
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        # "fixedlarge" sigma^2 = beta_t, with beta-tilde_2 at index 0 (the official code's choice)
        self.fixedlarge_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], betas[1:]]))
        self.log_betas = torch.log(betas)
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)

    # --- forward process

    def q_mean_variance(self, x0, t):
        """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho et al. Eq. 4)."""
        mean = _expand(self.sqrt_alphas_cumprod.to(x0)[t], x0) * x0
        var = _expand((1.0 - self.alphas_cumprod).to(x0)[t], x0).expand_as(x0)
        return mean, var, torch.log(var)

    def q_sample(self, x0, t, noise):
        """Draw x_t ~ q(x_t | x_0) as sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise (Eq. 4)."""
        return (_expand(self.sqrt_alphas_cumprod.to(x0)[t], x0) * x0
                + _expand(self.sqrt_one_minus_alphas_cumprod.to(x0)[t], x0) * noise)

    def q_posterior(self, x0, x_t, t):
        """q(x_{t-1} | x_t, x_0) = N(mu-tilde, beta-tilde I) (Ho et al. Eqs. 6-7).

        Returns (mean, variance, log_variance), each shaped like x0; log_variance is clipped
        at index 0 (see __init__).
        """
        mean = (_expand(self.posterior_mean_coef1.to(x0)[t], x0) * x0
                + _expand(self.posterior_mean_coef2.to(x0)[t], x0) * x_t)
        var = _expand(self.posterior_variance.to(x0)[t], x0).expand_as(x0)
        log_var = _expand(self.posterior_log_variance_clipped.to(x0)[t], x0).expand_as(x0)
        return mean, var, log_var

    def predict_x0_from_eps(self, x_t, t, eps):
        """Invert Eq. 4: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return ((x_t - _expand(self.sqrt_one_minus_alphas_cumprod.to(x_t)[t], x_t) * eps)
                / _expand(self.sqrt_alphas_cumprod.to(x_t)[t], x_t))

    # --- reverse process

    def p_mean_variance(self, model, x_t, t, y=None, guidance=0.0, clip_denoised=None, output=None):
        """p_theta(x_{t-1} | x_t) = N(mu_theta, Sigma_theta): a dict with mean, variance,
        log_variance, pred_x0 (each shaped like x_t).

        Mean (Ho et al. Eq. 11): mu = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps),
        computed as mu-tilde(x0_hat, x_t) with x0_hat from eps, which is the same quantity and
        lets x0_hat be clipped to [-1, 1]. Variance: beta_t ("fixedlarge"; index 0 uses
        beta-tilde_2 as the official code), beta-tilde_t ("fixedsmall"), or Nichol & Dhariwal
        Eq. 15: log Sigma = v log beta_t + (1 - v) log beta-tilde_t with v = (out + 1) / 2, the
        network's extra output unconstrained as in the paper. `output` replaces the network
        call (used by the hybrid loss to stop the gradient through the mean).
        """
        if output is None:
            output = guided_output(model, x_t, t, y, guidance)
        c = x_t.shape[1]
        out, v = output[:, :c], output[:, c:]
        if self.model_var_type == "learned":
            frac = (v + 1) / 2
            log_var = (frac * _expand(self.log_betas.to(x_t)[t], x_t)
                       + (1 - frac) * _expand(self.posterior_log_variance_clipped.to(x_t)[t], x_t))
        elif self.model_var_type == "fixedlarge":
            log_var = _expand(self.fixedlarge_log_variance.to(x_t)[t], x_t).expand_as(x_t)
        else:
            log_var = _expand(self.posterior_log_variance_clipped.to(x_t)[t], x_t).expand_as(x_t)
        pred_x0 = self.predict_x0_from_eps(x_t, t, out) if self.model_mean_type == "eps" else out
        if self.clip_denoised if clip_denoised is None else clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        if self.model_var_type == "fixedsmall":
            variance = _expand(self.posterior_variance.to(x_t)[t], x_t).expand_as(x_t)  # exact 0 at index 0
        else:
            variance = torch.exp(log_var)
        return dict(mean=mean, variance=variance, log_variance=log_var, pred_x0=pred_x0)

    # --- the objective and the bound

    def _decoder_nll(self, x0, mean, log_var):
        """-log p_theta(x_0 | x_1) per element: Ho et al. Eq. 13, or a Gaussian density."""
        if self.levels is None:
            return -gaussian_log_likelihood(x0, mean, 0.5 * log_var)
        return -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var, self.levels)

    def _vb_term(self, p, x0, x_t, t):
        """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for index t > 0 and the decoder
        L_0 = -log p(x_0|x_1) for index 0 (Ho et al. Eq. 5), per example in nats: (B,)."""
        q_mean, _, q_log_var = self.q_posterior(x0, x_t, t)
        kl = _sum_dims(normal_kl(q_mean, q_log_var, p["mean"], p["log_variance"]))
        decoder = _sum_dims(self._decoder_nll(x0, p["mean"], p["log_variance"]))
        return torch.where(t == 0, decoder, kl)

    def prior_kl(self, x0):
        """L_T = KL(q(x_T | x_0) || N(0, I)) per example in nats (Ho et al. Eq. 5): (B,)."""
        t = torch.full((x0.shape[0],), self.T - 1, dtype=torch.long, device=x0.device)
        mean, _, log_var = self.q_mean_variance(x0, t)
        return _sum_dims(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean)))

    def training_loss(self, model, x0, y=None, t=None, noise=None):
        """Per-example loss (B,) at a uniformly drawn timestep (Ho et al. Algorithm 1).

        L_simple (Eq. 14): || target - model(x_t, t) ||^2 averaged over dimensions, the target
        being the noise (eps) or x0. With a learned variance, the hybrid loss of Nichol &
        Dhariwal Eq. 16: L_simple + lambda * L_vlb, where L_vlb = T * L_t (an unbiased
        one-sample estimate of the sum over t) per dimension in nats, its mean computed from a
        detached network output so that L_vlb trains the variance only (their Sec. 3.1).
        """
        if t is None:
            t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, t, y)
        c = x0.shape[1]
        target = noise if self.model_mean_type == "eps" else x0
        loss = (output[:, :c] - target).pow(2).reshape(x0.shape[0], -1).mean(1)
        if self.model_var_type == "learned":
            frozen = torch.cat([output[:, :c].detach(), output[:, c:]], dim=1)
            p = self.p_mean_variance(None, x_t, t, output=frozen, clip_denoised=False)
            loss = loss + self.lambda_vlb * self.T * self._vb_term(p, x0, x_t, t) / x0[0].numel()
        return loss

    def nll(self, model, x0, y=None, generator=None, shared_noise=False, sign=1.0):
        """The full variational bound -log p(x_0) <= L_T + sum_{t>1} L_{t-1} + L_0, per example
        in nats: (B,) (Ho et al. Eq. 5, Sohl-Dickstein et al. Eq. 14).

        Every one of the T terms is evaluated (one network call each) on x_t ~ q(x_t | x_0)
        with fresh noise, so the result is an unbiased one-sample estimate of the bound (L_T is
        exact). y: labels for a conditional bound, None for the unconditional (null-label) model.
        shared_noise: every example gets the same noise at each t (common random numbers): each
        estimate is as unbiased, and their errors vary smoothly with x_0 (a density grid). sign -1
        uses minus the generator's noise (the antithetic draw, as unbiased: the noise is symmetric).
        """
        total = self.prior_kl(x0)
        for i in reversed(range(self.T)):
            t = torch.full((x0.shape[0],), i, dtype=torch.long, device=x0.device)
            shape = (1, *x0.shape[1:]) if shared_noise else x0.shape
            noise = sign * torch.randn(shape, generator=generator, device=x0.device, dtype=x0.dtype).expand_as(x0)
            x_t = self.q_sample(x0, t, noise)
            total = total + self._vb_term(self.p_mean_variance(model, x_t, t, y), x0, x_t, t)
        return total

    # --- sampling

    def respace(self, steps):
        """Nichol & Dhariwal Sec. 4: a process on S evenly spaced timesteps of this one.

        Keeps alpha_bar on the subsequence tau (which always contains the first and last
        index) and recomputes beta_i = 1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}}.
        Returns (GaussianDiffusion, tau) where tau (S,) maps new indices to the network's.
        """
        if not 1 <= steps <= self.T:
            raise ValueError(f"respacing to {steps} steps; accepted: 1..{self.T}")
        tau = torch.linspace(0, self.T - 1, steps, dtype=torch.float64).round().long()
        ab = self.alphas_cumprod[tau]
        betas = 1 - ab / torch.cat([torch.ones(1, dtype=torch.float64, device="cpu"), ab[:-1]])
        return GaussianDiffusion(betas, self.model_mean_type, self.model_var_type, self.levels,
                                 self.clip_denoised, self.lambda_vlb), tau

    @torch.inference_mode()
    def sample_chain(self, model, shape, y=None, guidance=0.0, steps=None, device=None,
                     generator=None):
        """Ancestral sampling (Ho et al. Algorithm 2), yielding (index, x_{t-1}, predicted x_0)
        after every step.

        x_T ~ N(0, I); x_{t-1} = mu_theta(x_t, t) + sigma_t z with z ~ N(0, I), z = 0 at the
        last step. `steps` < T runs on a respaced subsequence (the yielded index is then the
        original timestep). `guidance` w mixes predictions (Ho & Salimans Eq. 6).
        """
        if device is None:
            device = next(model.parameters()).device
        diffusion, net = self, model
        if steps and steps != self.T:
            diffusion, tau = self.respace(steps)
            tau = tau.to(device)

            def net(x, t, y=None):
                return model(x, tau[t], y)
        else:
            tau = torch.arange(self.T, device=device)
        x = torch.randn(shape, generator=generator, device=device)
        for i in reversed(range(diffusion.T)):
            t = torch.full((shape[0],), i, dtype=torch.long, device=device)
            p = diffusion.p_mean_variance(net, x, t, y, guidance)
            z = torch.randn(shape, generator=generator, device=device) if i > 0 else torch.zeros_like(x)
            x = p["mean"] + torch.exp(0.5 * p["log_variance"]) * z
            yield int(tau[i]), x, p["pred_x0"]

    def sample(self, model, shape, y=None, guidance=0.0, steps=None, device=None, generator=None):
        """Samples x_0 of the given shape (see sample_chain), batched on the model's device."""
        for _, x, _ in self.sample_chain(model, shape, y, guidance, steps, device, generator):
            pass
        return x


# ----------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------

# Every network is called as model(x_t, t, y=None).

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


class UNet(nn.Module):
    """The DDPM U-Net (Ho et al. Sec. 4 and App. B; PixelCNN++ backbone).

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
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image side {image_size} is not divisible by 2^{len(ch_mult) - 1}")
        self.ch, self.num_classes, temb_dim = ch, num_classes, 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, temb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, skips, c, res = nn.ModuleList(), [ch], ch, image_size
        for i, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(c, ch * mult, temb_dim, dropout))
                c = ch * mult
                if res in attn_res:
                    self.down.append(AttnBlock(c))
                skips.append(c)
            if i < len(ch_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                res //= 2
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, temb_dim, dropout), AttnBlock(c),
                                  ResBlock(c, c, temb_dim, dropout)])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), ch * mult, temb_dim, dropout))
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
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            else:
                h = layer(h)
            if not isinstance(layer, AttnBlock):  # attention refines the block before it
                hs.append(h)
            else:
                hs[-1] = h
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class PointMLP(nn.Module):
    """Residual MLP for 2D points: time embedding added inside every block (our choice)."""

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


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

@dataclass
class Config(RunConfig):
    """Defaults train the 8x8 `digits` on a laptop CPU in minutes; PRESETS follow the papers."""
    steps: int = flag(1000, "training steps")
    lr: float = flag(2e-3, "Adam learning rate (after warm-up)")
    save_every: int = flag(500, "checkpoint and EMA sample grid every this many steps")
    # diffusion
    timesteps: int = flag(1000, "number of diffusion steps T")
    schedule: str = flag("linear", "beta schedule: linear (Ho et al.) or cosine (Nichol & Dhariwal)",
                         choices=("linear", "cosine"))
    max_beta: float = flag(0.999, "the largest beta_t: the schedule is clipped there (Nichol & Dhariwal: 0.999)")
    mean_type: str = flag("eps", "what the network predicts: eps (noise) or x0", choices=("eps", "x0"))
    var_type: str = flag("fixedlarge", "reverse variance: fixedlarge (beta), fixedsmall (beta-tilde) "
                         "or learned (Nichol & Dhariwal Eq. 15, trained with the hybrid loss)",
                         choices=("fixedlarge", "fixedsmall", "learned"))
    lambda_vlb: float = flag(1e-3, "weight of L_vlb in the hybrid loss (learned variance only)")
    # network
    ch: int = flag(32, "U-Net base channels")
    ch_mult: tuple = flag((1, 2), "U-Net channel multiplier per resolution")
    num_res_blocks: int = flag(1, "residual blocks per resolution")
    attn_res: tuple = flag((4,), "resolutions (side in pixels) with self-attention")
    dropout: float = flag(0.0, "dropout in the residual blocks")
    hidden: int = flag(128, "width of the MLP used on 2D point sets")
    # optimisation
    warmup: int = flag(100, "linear learning-rate warm-up steps")
    grad_clip: float = flag(1.0, "gradient-norm clip (0 = off)")
    ema_decay: float = flag(0.995, "EMA decay of the weights used for sampling and eval")
    flip: bool = flag(False, "random horizontal flips of training images")
    # conditioning and sampling
    cond: bool = flag(False, "train class-conditional with label dropout (classifier-free guidance)")
    p_uncond: float = flag(0.1, "probability of dropping the label when --cond")
    guidance: float = flag(0.0, "guidance weight w of Ho & Salimans Eq. 6 (0 = plain conditional)")
    sample_steps: int = flag(0, "sampling steps on a respaced subsequence (0 = all T)")
    eval_n: int = flag(0, "evaluate the bound on the first N test examples (0 = all)")
    density_draws: int = flag(8, "--eval on 2D sets: draws K (even: K/2 antithetic pairs) of the bound averaged per "
                              "point of the density grid, each draw's noise shared by every point")


PRESETS = {
    # Ho et al. 2020, Sec. 4 and App. B; official code (hojonathanho/diffusion), 35.7M parameters.
    "cifar10": dict(steps=800_000, batch_size=128, lr=2e-4, warmup=5000, grad_clip=1.0,
                    ema_decay=0.9999, flip=True, timesteps=1000, schedule="linear",
                    mean_type="eps", var_type="fixedlarge", ch=128, ch_mult=(1, 2, 2, 2),
                    num_res_blocks=2, attn_res=(16,), dropout=0.1, save_every=10_000),
    # The CIFAR-10 recipe scaled to 28x28 (28 -> 14 -> 7); attention at 14x14.
    "mnist": dict(steps=50_000, batch_size=128, lr=2e-4, warmup=1000, ema_decay=0.9999,
                  ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_res=(14,), dropout=0.1,
                  save_every=5000),
    "fashion-mnist": dict(steps=50_000, batch_size=128, lr=2e-4, warmup=1000, ema_decay=0.9999,
                          ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_res=(14,),
                          dropout=0.1, save_every=5000),
    "digits": dict(),  # the Config defaults
    # 2D point sets: MLP network; T = 200 keeps the bound on a 128x128 grid to seconds. Learned variances
    # (Nichol & Dhariwal's hybrid loss): measured on 8gaussians (batch 256, the first 2000 test points,
    # entropy 2.508), the bound is 2.783 with them against 2.937 with beta_t (fixedlarge) and 4.113 with
    # beta-tilde_t (fixedsmall) on the same network's mean, and 2.964 for a network trained with fixedlarge.
    # beta_T clipped at 0.99, not 0.999 (ours): the first reverse step's mean multiplies the network's
    # error in eps by beta_T / sqrt(alpha_T (1 - alpha_bar_T)), 31.6 at 0.999, and that one step held
    # 0.26 / 0.56 / 0.43 nats of the bound's 0.31 / 0.73 / 0.75 above the entropy on 8gaussians /
    # checkerboard / rings (benchmarks/bound_gaps.py, run when the preset clipped at 0.999); at 0.99 the
    # bound fell by 0.24 / 0.50 / 0.38, the other terms unchanged.
    "points": dict(steps=5000, batch_size=512, lr=1e-3, warmup=100, ema_decay=0.995, max_beta=0.99,
                   timesteps=200, schedule="cosine", var_type="learned", hidden=128, save_every=2500,
                   n_samples=2000),
}


def check_config(cfg):
    """The flags' values that their types let through; those that depend on the data are
    checked in build, and --sample-steps against a checkpoint's T in draw_samples."""
    for name in ("timesteps", "ch", "num_res_blocks", "hidden"):
        check_range(cfg, name, 1)
    check_range(cfg, "density_draws", 2)
    if cfg.density_draws % 2:
        raise UserError(f"--density-draws {cfg.density_draws} makes antithetic pairs; accepted: an even number >= 2")
    for name in ("warmup", "grad_clip", "lambda_vlb", "guidance", "eval_n"):
        check_range(cfg, name, 0)
    for name in ("p_uncond", "dropout", "ema_decay"):
        check_range(cfg, name, 0, 1, open_high=True)
    check_range(cfg, "max_beta", 0, 1, open_low=True, open_high=True)
    if not (cfg.sample or cfg.eval):
        check_range(cfg, "sample_steps", 0, cfg.timesteps)
    if not cfg.ch_mult or min(cfg.ch_mult) < 1:
        raise UserError(f"--ch-mult {','.join(map(str, cfg.ch_mult))} is out of range; accepted: positive "
                        "multipliers, one per resolution, e.g. 1,2,2,2")


def learning_rate(step, cfg):
    """The learning rate of step `step` (0-based): linear warm-up over cfg.warmup steps, then
    constant (Ho et al. 2020, App. B)."""
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))


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


def sample_labels(n, cfg, info, device):
    """Labels 0, 1, ..., 9, 0, ... for a conditional model's pictures, None otherwise."""
    return torch.arange(n, device=device) % info.num_classes if cfg.cond else None


def save_samples(x, path, info):
    """Samples in model space as a scatter (points) or an image grid (ten per row when they divide)."""
    if info.kind == "points":
        save_scatter(x.cpu(), path, lim=info.lim)
    else:
        save_image_grid(to_levels(x, info).cpu(), path, levels=info.levels,
                        nrow=10 if x.shape[0] % 10 == 0 else None)


def save_panels(rows, path, info, title):
    """Rows of panels {row label: {timestep label: x (N, ...)}}: images show the first example."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n_cols = max(len(r) for r in rows.values())
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.6 * n_cols, 1.8 * len(rows) + 0.3), squeeze=False)
    for r, (row_label, panels) in enumerate(rows.items()):
        for c, (label, x) in enumerate(panels.items()):
            ax, x = axes[r, c], x.detach().float().cpu()
            if info.kind == "points":
                ax.scatter(x[:, 0], x[:, 1], s=1)
                ax.set_xlim(-info.lim, info.lim), ax.set_ylim(-info.lim, info.lim), ax.set_aspect("equal")
            else:
                img = ((x[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(label, fontsize=8), ax.set_xticks([]), ax.set_yticks([])
        axes[r, 0].set_ylabel(row_label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _panel_steps(T, n):
    # Quadratic spacing: most of the visible change happens at small t.
    return sorted({int(round((T - 1) * (k / (n - 1)) ** 2)) for k in range(n)})


def forward_figure(diffusion, x0, path, info, n_panels=8):
    """The forward process: one image (or the whole point set) noised across t (Eq. 4)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    panels = {"data": x0}
    for i in _panel_steps(diffusion.T, n_panels)[1:]:
        t = torch.full((x0.shape[0],), i, dtype=torch.long)
        panels[f"t={i + 1}"] = diffusion.q_sample(x0, t, noise)
    save_panels({"x_t": panels}, path, info, "forward process q(x_t | x_0), pixels clipped to [-1, 1]")


def reverse_figure(diffusion, model, path, info, cfg, device, n_panels=8):
    """The reverse chain of one sampling run (Algorithm 2): x_{t-1} and the network's x_0 guess,
    for one image (with the first label when conditional) or a cloud of n_samples points."""
    shape = (1, *info.shape) if info.kind == "image" else (cfg.n_samples, *info.shape)
    y = sample_labels(1, cfg, info, device) if info.kind == "image" else None
    g = torch.Generator(device=device).manual_seed(0)
    chain = list(diffusion.sample_chain(model, shape, y, cfg.guidance, cfg.sample_steps, device, g))[::-1]  # by time
    keep = reversed(_panel_steps(len(chain), n_panels))
    rows = {"x_{t-1}": {}, "predicted x_0": {}}
    for k in keep:
        t, x, x0 = chain[k]
        rows["x_{t-1}"][f"t={t + 1}"], rows["predicted x_0"][f"t={t + 1}"] = x, x0
    save_panels(rows, path, info, "reverse process p(x_{t-1} | x_t)")


# ----------------------------------------------------------------------------------------
# Run code
# ----------------------------------------------------------------------------------------

MODEL = "ddpm"


def build(cfg, info):
    """(network, diffusion) for a configuration and the data's description (a common.DataInfo)."""
    if cfg.cond and not info.num_classes:
        raise UserError(f"--cond needs labelled images (digits, mnist, fashion-mnist, cifar10); {info.name} has none")
    learn = cfg.var_type == "learned"
    if info.kind == "points":
        net = PointMLP(info.shape[0], cfg.hidden, learn_sigma=learn)
    else:
        c, h, w = info.shape
        if h != w or h % 2 ** (len(cfg.ch_mult) - 1):
            raise UserError(f"--ch-mult {','.join(map(str, cfg.ch_mult))} halves the side {len(cfg.ch_mult) - 1} "
                            f"times; {info.name} has {h}x{w} images: use square images and fewer levels")
        net = UNet(c, h, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_res, cfg.dropout,
                   info.num_classes if cfg.cond else 0, learn)
    diffusion = GaussianDiffusion(make_betas(cfg.schedule, cfg.timesteps, cfg.max_beta), cfg.mean_type, cfg.var_type,
                                  info.levels, clip_denoised=info.kind == "image", lambda_vlb=cfg.lambda_vlb)
    return net, diffusion


def train(cfg):
    """Algorithm 1 of Ho et al. with Adam, warm-up, gradient clipping and an EMA of the weights;
    under torchrun every process trains on its slice of the global batch (DDP)."""
    with Training(cfg, MODEL) as run:
        ds = load_dataset(cfg.dataset, "train", cfg.data_dir)
        info = ds.info
        seed_everything(cfg.seed)  # the same initial weights on every process
        net, diffusion = build(cfg, info)
        net.to(run.device)
        ema = EMA(net, cfg.ema_decay)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        batches = Batches(ds, cfg.batch_size, run.dist, seed=cfg.seed)
        step = run.start(info, model=net, ema=ema, opt=opt, batches=batches)
        model = wrap_ddp(net, run.dist, cfg.compile)
        amp = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.amp)
        shape = (100 if cfg.cond else cfg.n_samples, *info.shape)

        def samples(step):
            g = torch.Generator(device=run.device).manual_seed(cfg.seed)
            x = diffusion.sample(ema.model, shape, sample_labels(shape[0], cfg, info, run.device), cfg.guidance,
                                 cfg.sample_steps, run.device, g)
            save_samples(x, run.out / f"samples_{step}.png", info)

        if step == 0:
            x0 = to_model_space(ds.data[:1] if info.kind == "image" else ds.data[:cfg.n_samples], info)
            run.draw(forward_figure, diffusion, x0, run.out / "forward.png", info)
        for step in run.steps(step, samples):
            x, y = next(batches)
            x0 = to_model_space(x, info)
            if cfg.flip:
                x0 = torch.where(torch.rand(x0.shape[0], 1, 1, 1, device=x0.device) < 0.5, x0.flip(3), x0)
            y = drop_labels(y, cfg.p_uncond, info.num_classes) if cfg.cond else None
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, cfg)
            with amp:
                loss = diffusion.training_loss(model, x0, y).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            ema.update(net)
            run.log(loss=loss)
        run.draw(reverse_figure, diffusion, ema.model, run.out / "reverse.png", info, cfg, run.device)
    run.report(["ckpt.pt", f"samples_{run.step}.png", "forward.png", "reverse.png", "loss.png"])


def evaluate(cfg):
    """--eval CKPT: the test-set bound in nats per example and bits/dim (every one of the T
    terms, Ho et al. Eq. 5); on 2D sets also density.npz and density.png (exp of -bound)."""
    (net, diffusion), saved, info = load(cfg.eval, get_device(cfg.device))
    device = next(net.parameters()).device
    if cfg.fid is not None:
        check_range(cfg, "sample_steps", 0, diffusion.T)
        return fid_evaluate(cfg, info, lambda n, g: to_levels(diffusion.sample(
            net, (n, *info.shape), sample_labels(n, saved, info, device), cfg.guidance, cfg.sample_steps, device, g),
            info))
    out = output_dir(cfg, cfg.eval)
    ds = load_dataset(info.name, "test", cfg.data_dir)
    x_all = ds.data if not cfg.eval_n else ds.data[:cfg.eval_n]
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    values, start = [], time.time()
    with torch.inference_mode():
        for i in range(0, len(x_all), cfg.batch_size):
            x0 = to_model_space(x_all[i:i + cfg.batch_size].to(device), info)
            values.append(diffusion.nll(net, x0, None, g).double().cpu())
    values = torch.cat(values)
    nll, count = values.mean().item(), len(values)
    # the standard error over the test examples (each bound one draw: the draws' noise included)
    extra = dict(n=count, nll_se=values.std().item() / math.sqrt(count) if count > 1 else 0.0, timesteps=diffusion.T,
                 seconds=round(time.time() - start, 1))
    if info.kind == "image":
        extra["bits_per_dim"] = bits_per_dim(nll, info.dims)
    else:
        if ds.log_prob is not None:
            extra["entropy"], extra["entropy_se"] = entropy_estimate(info.name)

        K, se = cfg.density_draws, []

        def log_density(points):
            """-bound at each point, the mean of K draws in K/2 antithetic pairs (noise and minus
            it); pair k's noise is the same at every point of the grid (common random numbers, every
            chunk re-seeded alike), so that the picture shows the bound, smooth in x_0, and not
            independent noise from point to point."""
            def draw(k, sign):
                g_k = torch.Generator(device).manual_seed(cfg.seed + 1 + k)
                return diffusion.nll(net, points.to(device), None, g_k, shared_noise=True, sign=sign).double().cpu()
            with torch.inference_mode():
                pairs = torch.stack([(draw(k, 1.0) + draw(k, -1.0)) / 2 for k in range(K // 2)])
            se.append(pairs.std(0) / math.sqrt(K // 2) if K > 2 else torch.zeros_like(pairs[0]))
            return -pairs.mean(0)

        start = time.time()
        grid = density_on_grid(log_density, info.lim, n=128)
        np.savez(out / "density.npz", log_density=grid, lim=info.lim)
        se = torch.cat(se)
        # the standard error of each point's mean over the K draws (their spread / sqrt K), in nats
        extra.update(density_draws=K, density_seconds=round(time.time() - start, 1))
        if K > 2:
            extra.update(density_se_median=se.median().item(), density_se_max=se.max().item())
        truth = density_on_grid(ds.log_prob, info.lim, n=128) if ds.log_prob is not None else ds.data
        save_density({"data": truth, "ddpm (exp -bound)": grid}, out / "density.png", info.lim)
    Logger(out, 0).event("eval", split="test", nll=nll, **extra)
    report_files(out, ["metrics.jsonl", "density.npz", "density.png"])
    return dict(nll=nll, **extra)


def draw_samples(cfg):
    """--sample CKPT: n_samples from the EMA network (samples.png, samples.pt) and one reverse chain."""
    (net, diffusion), saved, info = load(cfg.sample, get_device(cfg.device))
    device = next(net.parameters()).device
    check_range(cfg, "sample_steps", 0, diffusion.T)
    if cfg.guidance and not saved.cond:
        raise UserError(f"--guidance needs a checkpoint trained with --cond; {cfg.sample} was not")
    out = output_dir(cfg, cfg.sample)
    run = dataclasses.replace(saved, guidance=cfg.guidance, sample_steps=cfg.sample_steps, n_samples=cfg.n_samples)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    start = time.time()
    x = diffusion.sample(net, (cfg.n_samples, *info.shape), sample_labels(cfg.n_samples, run, info, device),
                         cfg.guidance, cfg.sample_steps, device, g)
    seconds = time.time() - start
    save_samples(x, out / "samples.png", info)
    torch.save(to_levels(x, info).cpu() if info.kind == "image" else x.cpu(), out / "samples.pt")
    reverse_figure(diffusion, net, out / "reverse.png", info, run, device)
    Logger(out, 0).event("sample", n=cfg.n_samples, seconds=round(seconds, 3), samples_per_s=cfg.n_samples / seconds,
                         steps=cfg.sample_steps or diffusion.T, guidance=cfg.guidance)
    report_files(out, ["samples.png", "samples.pt", "reverse.png", "metrics.jsonl"])
    return x


def load(path, device="cpu"):
    """((EMA network, diffusion), its training Config, its data's description) from a checkpoint."""
    ckpt = load_checkpoint(path, MODEL)
    cfg, info = saved_config(Config, ckpt)
    net, diffusion = build(cfg, info)
    load_weights(net, ckpt["ema"]["model"], path)
    return (net.to(device).eval(), diffusion), cfg, info


def main(argv=None):
    """Train (default), or --eval CKPT, or --sample CKPT; a user's mistake exits with one line."""
    with user_errors():
        cfg = parse_config(Config, PRESETS, argv, doc=__doc__, kinds=("image", "points"))
        check_config(cfg)
        return dispatch(cfg, train, evaluate, draw_samples)


if __name__ == "__main__":
    main()
