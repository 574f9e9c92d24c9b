"""Variational autoencoders: the ELBO, the IWAE bound, flows in q, semi-amortized and hierarchical VAEs.

Papers: Kingma & Welling 2013, arXiv 1312.6114 (VAE, reparameterisation, SGVB); Burda, Grosse &
Salakhutdinov 2016, arXiv 1509.00519 (IWAE, L_k, L_5000, active units); Bowman et al. 2016, arXiv
1511.06349 (KL annealing); Kingma et al. 2016, arXiv 1606.04934 (IAF, free bits); Germain et al.
2015, arXiv 1502.03509 (MADE); Rezende & Mohamed 2015, arXiv 1505.05770 (planar and radial flows);
Kim et al. 2018, arXiv 1802.02550 (SA-VAE); Salimans et al. 2017, arXiv 1701.05517 (discretized logistic);
Child 2021, arXiv 2011.10650 (VD-VAE); Vahdat & Kautz 2020, arXiv 2007.03898 (NVAE, residual normal).

Implemented: a diagonal-Gaussian q0(z|x), N(0, I) prior, Bernoulli / Gaussian / categorical /
discretized-logistic decoders; the ELBO, L_k (k = 5000 in chunks), the IWAE objective, KL warm-up,
free bits, active units; flows in q, `--posterior planar|radial|iaf` (parameters or context h from
the encoder; the bounds use q_K); SA-VAE, `--svi-steps K` (exact autograd through the steps, each
example's SVI gradients clipped); `--arch hierarchical`, VD-VAE's top-down latent groups with
gradient skipping and `--residual-posterior` (NVAE's q). Not implemented: two stochastic layers,
Sylvester and Householder flows, IAF with ResNet blocks, SVI on flow parameters or with momentum,
logistic mixtures, free bits with a flow, NVAE's cells and spectral regularisation.
Data: digits, a discretized logistic over 17 levels (bits/dim = -log2 p(x) / 64); mnist, binarised
afresh every batch (the test set once, EVAL_BINARIZATION_SEED); 2D points, a Gaussian decoder, nats.

    python vae.py                                    # digits, about a minute on one CPU core
    python vae.py --posterior iaf --flow-length 4    # or planar, radial; --svi-steps 10 for SA-VAE
    python vae.py --eval runs/vae-digits/ckpt.pt     # ELBO, IWAE-5000 (and the amortization gap)
    python vae.py --arch hierarchical                # VD-VAE on digits; --residual-posterior for NVAE's q

Paper -> code
  Kingma & Welling App. B          -KL = 1/2 sum(1 + log s^2 - mu^2 - s^2)      gaussian_kl(_per_dim)
  Kingma & Welling Eq. 10          z = mu + s * eps, eps ~ N(0, I)              reparameterize
  K & W App. C; Salimans Eq. 2     log p(x|z), one example                      bernoulli, discretized_logistic
  Kingma & Welling Eqs. 3, 6, 10   L = E_q log p(x|z) - KL(q || p)              elbo, VAE.forward
  Burda et al. Eq. 8, Thm. 1       L_k = log 1/k sum_i p(x, z_i) / q(z_i|x)     log_weights, iwae_bound, nll
  Bowman; Kingma et al. 2016       min(1, t/T) KL; sum_j max(lambda, KL_j)      kl_weight, free_bits_kl
  Burda et al. Secs. 5.1, 5.2      lr 10^(-i/7); Cov_x E_q[u] > 0.01            burda_lr, active_units
  Rezende & Mohamed Eqs. 10-12     f = z + u^ h(w'z + b), log|1 + u^'psi|       planar
  Rezende & Mohamed App. A.1       u^ = u + [m(w'u) - w'u] w / |w|^2            planar_u_hat
  Rezende & Mohamed Eq. 14         f = z + beta h(alpha, r)(z - z0)             radial
  Rezende & Mohamed Eqs. 13, 15    log q_K = log q0 - sum_k log|det|            VAE.forward (log_q)
  Germain et al. Eqs. 12-13        masks [m^l(k) >= m^(l-1)(k')], [d > m^L(k)]  made_masks, MADE
  Kingma et al. 2016 Eqs. 10-14    z = sigma z + (1 - sigma) m, sum log sigma   IAF
  Kim et al. 2018 Alg. 1           lambda' = lambda + alpha grad ELBO(lambda)   svi_refine, VAE.forward
  Kim et al.'s code (sa-vae)       g * min(1, c / ||g||), c = 5                 clip_norm
  Cremer et al. 2018 (1801.03558)  gap = ELBO(lambda_K) - ELBO(lambda_0)        evaluate
  Burda et al. Sec. 5              x ~ Bernoulli(level / (L - 1)) per batch     prepare
  Child 2021 (VD-VAE)              p(z) = prod_l p(z_l|z_<l), q(z_l|z_<l, x)    HierarchicalVAE, TopDownGroup
  Child 2021                       L = E_q log p(x|z) - sum_l E_q KL_l          hierarchical_elbo, _iwae
  Child 2021                       KL_l, two diagonal Gaussians, closed form    gaussian_kl_between
  Vahdat & Kautz Eq. 2             KL = (dmu^2/s_p^2 + ds^2 - log ds^2 - 1)/2   residual_normal_kl
  Child 2021 (stabilisers)         skip |g| >= threshold; last layer / sqrt(L)  GradientSkipping, Bottleneck
  Child 2021                       z_l ~ N(mu_p, (t_l s_p)^2) top-down          sample_top_down

References (binarised MNIST, test -log p(x), nats): Burda et al. Table 1, 784-200-200-50 tanh: VAE
86.76, IWAE (k = 50) 84.78; Rezende & Mohamed Table 2 (bound): diagonal Gaussian 89.9, planar K = 10
/ 20 / 40 / 80: 87.5 / 86.5 / 85.7 / 85.1. `--dataset mnist` is Burda et al.'s model and optimiser.
IAF: Kingma et al. 2016, CIFAR-10 3.11 bits/dim with their ResNet VAE (not this file's MLP).
Hierarchical (PAPERS.md): VD-VAE CIFAR-10 2.87 bits/dim with 39M parameters (`--arch hierarchical
--dataset cifar10` builds that network, 39.1M with one logistic); NVAE CIFAR-10 2.91, binarised MNIST 78.01.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Batches, Logger, RunConfig, Training, UserError, check_range, density_on_grid, dispatch,
                    EMA, entropy_estimate, flag, get_device, load_checkpoint, load_dataset, load_weights, output_dir,
                    parse_config, report_files, save_density, save_image_grid, save_scatter, saved_config,
                    seed_everything, user_errors, wrap_ddp)
from common import fid_evaluate  # --eval CKPT --fid N


# ----------------------------------------------------------------------------------------
# The Gaussian posterior and prior: closed-form KL, reparameterisation
# ----------------------------------------------------------------------------------------

def gaussian_kl(mu, logvar):
    """KL(N(mu, diag exp(logvar)) || N(0, I)), (..., D) -> (...): Kingma & Welling App. B,
    -KL = 1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)."""
    return gaussian_kl_per_dim(mu, logvar).sum(-1)


def gaussian_kl_per_dim(mu, logvar):
    """The terms of `gaussian_kl` for each latent dimension, (..., D)."""
    # sigma^2 - 1 as expm1: exp(logvar) - 1 - logvar rounds below 0 near logvar = 0, where KL ~ logvar^2
    return 0.5 * (mu.pow(2) + torch.expm1(logvar) - logvar)


def reparameterize(mu, logvar, k=1, generator=None):
    """k samples z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling Sec. 2.4, Eq. 10): (B, D) -> (k, B, D)."""
    eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + (0.5 * logvar).exp() * eps


def log_normal(z, mu, logvar):
    """log N(z; mu, diag exp(logvar)) summed over the last axis; broadcasts over leading axes."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * (-logvar).exp()).sum(-1)


def log_prior(z):
    """log p(z) = log N(z; 0, I), summed over the last axis."""
    return log_normal(z, torch.zeros_like(z), torch.zeros_like(z))


# ----------------------------------------------------------------------------------------
# Decoder likelihoods: each is the normalised log p(x | params) of a whole example, in nats
# ----------------------------------------------------------------------------------------

def bernoulli(x, logits):
    """log p(x) = sum_i x_i log s_i + (1 - x_i) log(1 - s_i), s = sigmoid(logits), x in {0, 1}
    (Kingma & Welling App. C.1); (B, *shape) -> (B,)."""
    return (x * logits - F.softplus(logits)).flatten(1).sum(1)


def gaussian(x, mean, logvar):
    """log N(x; mean, diag exp(logvar)) per example (Kingma & Welling Appendix C.2). -> (B,)."""
    return log_normal(x.flatten(1), mean.flatten(1), logvar.flatten(1))


def categorical(x, logits):
    """log p(x) = sum_i log softmax(logits_i)[x_i], one categorical over the L levels per pixel;
    x (B, *shape) levels, logits (B, L, *shape) -> (B,)."""
    logp = F.log_softmax(logits, dim=1).gather(1, x.long().unsqueeze(1)).squeeze(1)
    return logp.flatten(1).sum(1)


LOG_SCALE_MIN = -7.0  # as in PixelCNN++: keeps the bins of a collapsed logistic finite


def discretized_logistic(x, mean, log_scale, levels):
    """log P(x) with P(x = l) = sigmoid((c_l + d - mean) / s) - sigmoid((c_l - d - mean) / s), the
    first and last bins open to -inf and +inf (Salimans et al. 2017, Eq. 2, one component): level l
    of L at c_l = 2l / (L - 1) - 1, half-width d = 1 / (L - 1). x (B, *shape) levels; mean,
    log_scale (B, *shape) in [-1, 1] units -> (B,)."""
    # Accurate in relative terms in every bin (against mpmath: 3e-5 in float32, 1.2e-13 in float64,
    # tested to 1e-4 and 1e-12): the interior bin is sigmoid(a) (1 - sigmoid(b)) (1 - exp(b - a)),
    # three logs that cannot cancel, log(1 - e^-w) by expm1 or log1p, whichever is exact there
    # (Maechler 2012); each bin edge is one rounding from exact, so a mean at an edge keeps its digits.
    log_scale = log_scale.clamp(min=LOG_SCALE_MIN)
    m = 2.0 * x.to(mean.dtype) - (levels - 1)  # an integer, exact: c_l = m / (L - 1)
    inv_s = (-log_scale).exp()
    a = ((m + 1.0) / (levels - 1) - mean) * inv_s
    b = ((m - 1.0) / (levels - 1) - mean) * inv_s
    log_cdf_a = F.logsigmoid(a)           # log F(c + d): the last bin's complement
    log_sf_b = F.logsigmoid(-b)           # log (1 - F(c - d))
    w = 2.0 / (levels - 1) * inv_s        # a - b, the bin's width in scales
    log1m_exp = torch.where(w < math.log(2), torch.log(-torch.expm1(-w)), torch.log1p(-torch.exp(-w)))
    interior = log_cdf_a + log_sf_b + log1m_exp
    logp = torch.where(x == 0, log_cdf_a, torch.where(x == levels - 1, log_sf_b, interior))
    return logp.flatten(1).sum(1)


class Bernoulli:
    """p(x|z) for binary data; the decoder returns logits as (B, 1, *shape)."""

    n_params, levels = 1, 2

    def log_prob(self, x, out):
        return bernoulli(x, out[:, 0])

    def mean(self, out):
        return torch.sigmoid(out[:, 0])

    def sample(self, out, generator=None):
        return torch.bernoulli(self.mean(out), generator=generator)


class Gaussian:
    """p(x|z) = N(mean, diag exp(logvar)) for continuous data; decoder output (B, 2, *shape)."""

    n_params, levels = 2, None

    def log_prob(self, x, out):
        return gaussian(x, out[:, 0], out[:, 1])

    def mean(self, out):
        return out[:, 0]

    def sample(self, out, generator=None):
        eps = torch.randn(out[:, 0].shape, generator=generator, device=out.device, dtype=out.dtype)
        return out[:, 0] + (0.5 * out[:, 1]).exp() * eps


class Categorical:
    """p(x|z): a softmax over the L levels per pixel; decoder output (B, L, *shape) of logits."""

    def __init__(self, levels):
        self.n_params = self.levels = levels

    def log_prob(self, x, out):
        return categorical(x, out)

    def mean(self, out):
        grid = torch.arange(self.levels, device=out.device, dtype=out.dtype)
        return torch.einsum("bl...,l->b...", out.softmax(1), grid)

    def sample(self, out, generator=None):
        probs = out.softmax(1).movedim(1, -1)
        flat = torch.multinomial(probs.reshape(-1, self.levels), 1, generator=generator)
        return flat.view(probs.shape[:-1]).to(out.dtype)


class DiscretizedLogistic:
    """p(x|z) = discretized logistic over L levels; decoder output (B, 2, *shape): mean, log scale."""

    n_params = 2

    def __init__(self, levels):
        self.levels = levels

    def log_prob(self, x, out):
        return discretized_logistic(x, out[:, 0], out[:, 1], self.levels)

    def mean(self, out):
        # The logistic's location in level units (the discretised mean differs only near the edges).
        return ((out[:, 0].clamp(-1, 1) + 1) * (self.levels - 1) / 2)

    def sample(self, out, generator=None):
        u = torch.rand(out[:, 0].shape, generator=generator, device=out.device, dtype=out.dtype)
        u = u.clamp(1e-6, 1 - 1e-6)
        y = out[:, 0] + out[:, 1].clamp(min=LOG_SCALE_MIN).exp() * (u.log() - (-u).log1p())
        return ((y + 1) * (self.levels - 1) / 2).round().clamp(0, self.levels - 1)


def _full(t):
    """At least float32: under bfloat16 autocast the log-probabilities are still summed in float32."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# ----------------------------------------------------------------------------------------
# The bounds and the training objectives
# ----------------------------------------------------------------------------------------
# Every function here takes the VAE as a callable `model(x, k, generator) -> (mu, logvar, z,
# log_lik, log_q)` (VAE.forward): the Gaussian's parameters (B, D), k reparameterised samples z
# (k, B, D), log p(x | z) (k, B) and log q(z|x) (k, B), None when q is the Gaussian itself (with
# a flow, q_K of Rezende & Mohamed Eq. 15). Training passes the DistributedDataParallel wrapper,
# so its gradient hooks fire; tests pass VAEs built from exact oracles.

def log_weights(mu, logvar, z, log_lik, log_q=None):
    """log w = log p(x|z) + log p(z) - log q(z|x), (k, B): the importance weights of Burda et al.
    Eq. 8, from the outputs of one pass of the model, `log_weights(*model(x, k))`."""
    if log_q is None:
        log_q = log_normal(z, mu, logvar)
    return log_lik + log_prior(z) - log_q


def elbo(model, x, k=1, analytic_kl=True, generator=None):
    """L(x) = E_q[log p(x|z)] - KL(q || p(z)) per example (B,), Kingma & Welling Eq. 3 by Eq. 10:
    k samples, the KL in closed form; analytic_kl=False or a flow: estimator A (Eq. 6; Rezende &
    Mohamed Eq. 15), mean_l log w_l, the IWAE bound L_1 sample for sample."""
    mu, logvar, z, log_lik, log_q = model(x, k, generator)
    if analytic_kl and log_q is None:
        return log_lik.mean(0) - gaussian_kl(mu, logvar)
    return log_weights(mu, logvar, z, log_lik, log_q).mean(0)


def iwae_bound(model, x, k, chunk=None, generator=None):
    """L_k(x) = log (1/k) sum_i w_i, z_i ~ q(z|x) (Burda et al. Eq. 8), per example (B,); L_1 is the
    ELBO, L_k <= L_{k+1} <= log p(x), L_k -> log p(x) (Theorem 1). Differentiable."""
    # k samples in chunks (all at once when None): the log-sum-exp of the chunks' log-sum-exps is
    # exact, so memory grows with the chunk, not with k.
    chunk = k if chunk is None else chunk
    partial = [torch.logsumexp(log_weights(*model(x, min(chunk, k - start), generator)), dim=0)
               for start in range(0, k, chunk)]
    return torch.logsumexp(torch.stack(partial), dim=0) - math.log(k)


def nll(model, x, k=5000, chunk=None, generator=None):
    """-L_k(x) in nats per example, the NLL estimate of Burda et al. Sec. 5 (k = 5000)."""
    return -iwae_bound(model, x, k, chunk, generator)


def free_bits_kl(kl_dims, free_bits=0.0):
    """sum_j max(lambda, E_x[KL_j]), (B, D) -> (): free bits (Kingma et al. 2016, App. "free bits"),
    each latent dimension its own group, the clamp on its batch mean; lambda = 0: the plain KL."""
    per_dim = kl_dims.mean(0)
    return per_dim.clamp(min=free_bits).sum() if free_bits > 0 else per_dim.sum()


def kl_weight(step, warmup):
    """KL cost annealing (Bowman et al. 2016): the KL weight rises linearly from 0 to 1 over `warmup` steps."""
    return 1.0 if warmup <= 0 else min(1.0, step / warmup)


def training_loss(model, x, objective="elbo", k=1, kl_scale=1.0, free_bits=0.0):
    """The training loss averaged over the batch, from one pass of the model, and detached
    statistics for the log.

    objective "elbo": -(E_q[log p(x|z)] - kl_scale * KL) with the KL through `free_bits_kl`
    (Kingma & Welling Eq. 10 with k samples; warm-up weight `kl_weight`; free bits when
    free_bits > 0); with a flow the KL is the Monte-Carlo E_q[log q_K(z|x) - log p(z)] (Rezende &
    Mohamed Eq. 15). objective "iwae": -L_k (Burda et al. Eq. 8, trained with k samples).
    Returns (loss, {"elbo" or "iwae_bound": the batch mean of the bound, "kl": the mean KL}).
    """
    mu, logvar, z, log_lik, log_q = model(x, k)
    if log_q is None:
        kl_dims = gaussian_kl_per_dim(mu, logvar)         # (B, D)
        kl = kl_dims.sum(1).mean()
    elif free_bits > 0:
        raise ValueError("free bits act on the closed-form KL per dimension of a Gaussian q; with a flow use 0")
    else:
        kl = (log_q - log_prior(z)).mean()
    if objective == "iwae":
        bound = (torch.logsumexp(log_weights(mu, logvar, z, log_lik, log_q), dim=0) - math.log(k)).mean()
        return -bound, {"iwae_bound": bound.detach(), "kl": kl.detach()}
    if objective != "elbo":
        raise ValueError(f"objective {objective!r}: 'elbo' or 'iwae'")
    rec = log_lik.mean()
    loss = -(rec - kl_scale * (free_bits_kl(kl_dims, free_bits) if log_q is None else kl))
    return loss, {"elbo": (rec - kl).detach(), "kl": kl.detach()}


# ----------------------------------------------------------------------------------------
# Evaluation: the bounds over a data set, the density, bits/dim
# ----------------------------------------------------------------------------------------

def dataset_bounds(model, x, k, rows):
    """(ELBO, L_k) per example of x (float64, CPU), in x-batches and k-chunks of about `rows`
    decoder rows each, so k = 5000 fits in memory."""
    b = max(1, min(len(x), rows // min(k, rows)))
    chunk = max(1, rows // b)
    elbos, bounds = [], []
    for xb in x.split(b):
        elbos.append(elbo(model, xb).double().cpu())
        bounds.append(iwae_bound(model, xb, k, chunk=chunk).double().cpu())
    return torch.cat(elbos), torch.cat(bounds)


def iwae_log_density(net, k, rows=2 ** 16):
    """log p(x) estimated by L_k (Burda et al. Eq. 8) as a callable for a density grid:
    points (M, 2) -> (M,), on the VAE's device, k samples in chunks of about `rows` decoder rows."""
    @torch.no_grad()
    def log_density(pts):
        return iwae_bound(net, pts.to(net.ref), k, chunk=max(1, rows // len(pts)))
    return log_density


def bits_per_dim(nats, dims):
    """Nats per example -> bits per dimension: nats / (dims ln 2)."""
    return nats / (dims * math.log(2))


# ----------------------------------------------------------------------------------------
# Sampling and the latent space
# ----------------------------------------------------------------------------------------

@torch.inference_mode()
def sample(net, n, mean=False, generator=None):
    """x ~ p(x|z), z ~ N(0, I): n samples (n, *shape) from a VAE; mean=True returns E[x|z] instead."""
    if isinstance(net, HierarchicalVAE):
        return sample_top_down(net, n, mean=mean, generator=generator)
    z = torch.randn(n, net.latent_dim, generator=generator, device=net.ref.device, dtype=net.ref.dtype)
    out = net.decode(z)
    return net.likelihood.mean(out) if mean else net.likelihood.sample(out, generator)


@torch.inference_mode()
def reconstruct(net, x):
    """E[x | z = z(x)]: the decoder's mean at `VAE.posterior_point` (the posterior mean mu for a
    Gaussian q), (B, *shape)."""
    return net.likelihood.mean(net.decode(net.posterior_point(x)))


@torch.inference_mode()
def interpolate(net, x1, x2, steps=8):
    """Decoder means along the line between the posterior points (means) of x1 and x2: (B, steps, *shape)."""
    mu1, mu2 = net.posterior_point(x1), net.posterior_point(x2)
    t = torch.linspace(0, 1, steps, device=mu1.device, dtype=mu1.dtype).view(1, steps, 1)
    z = (1 - t) * mu1.unsqueeze(1) + t * mu2.unsqueeze(1)            # (B, steps, D)
    means = net.likelihood.mean(net.decode(z.flatten(0, 1)))
    return means.view(mu1.shape[0], steps, *means.shape[1:])


# ----------------------------------------------------------------------------------------
# Posterior collapse: active units (Burda et al. Sec. 5.2)
# ----------------------------------------------------------------------------------------

def active_units(mu, threshold=0.01):
    """A_u = Cov_x(E_q(u|x)[u]) > threshold per dimension (Burda et al. Sec. 5.2); mu (N, D) posterior
    means of fixed examples -> (count, variances (D,))."""
    var = mu.double().var(0, unbiased=False)
    return int((var > threshold).sum()), var


@torch.no_grad()
def diagnostics(net, x):
    """KL per latent dimension (mean over the fixed batch x, nats) and the active units
    (Burda et al. Sec. 5.2), the signs of posterior collapse; with a flow, of the base q0."""
    mu, logvar = net.posterior(x)
    kl = gaussian_kl_per_dim(mu, logvar).mean(0)
    count, _ = active_units(mu)
    return {"active_units": count, "kl": kl.sum().item(), "kl_per_dim": [round(v, 4) for v in kl.tolist()]}


# ----------------------------------------------------------------------------------------
# The optimiser's schedule (Burda et al. Sec. 5.1)
# ----------------------------------------------------------------------------------------

PASSES_PER_STAGE = [3 ** i for i in range(8)]  # Burda et al. Sec. 5.1: 3280 passes in all


def burda_lr(step, steps_per_pass, lr):
    """Burda et al. 2016 Sec. 5.1: stage i = 0..7 lasts 3^i passes over the training set at lr * 10^(-i/7).

    Defined by passes, not by the run's length, so a resumed run follows the same schedule; after
    the 3280 passes of the paper it stays at the last stage's rate.
    """
    position, end = step / steps_per_pass, 0
    for i, passes in enumerate(PASSES_PER_STAGE):
        end += passes
        if position < end:
            return lr * 10 ** (-i / 7)
    return lr * 10 ** (-7 / 7)


# ----------------------------------------------------------------------------------------
# Planar and radial flows (Rezende & Mohamed 2015, arXiv 1505.05770)
# ----------------------------------------------------------------------------------------
# q_K(z_K|x) = q0(z0|x) / prod_k |det df_k/dz_{k-1}| (Eq. 13): a flow module maps z0 (k, B, D)
# and the encoder's per-example output h (B, P) to (z_K, sum_k log|det|) (k, B); VAE.forward
# turns that into log q_K, and every bound above takes it from there (Eq. 15).

def planar_u_hat(u, w):
    """u^ = u + [m(w^T u) - w^T u] w / ||w||^2, m(a) = -1 + softplus(a) (Rezende & Mohamed App. A.1):
    w^T u^ = m(w^T u) > -1, so the planar map is invertible whatever the raw u."""
    wu = (w * u).sum(-1, keepdim=True)
    return u + (F.softplus(wu) - 1 - wu) * w / w.pow(2).sum(-1, keepdim=True).clamp(min=1e-30)


def planar(z, u, w, b):
    """f(z) = z + u^ h(w^T z + b), h = tanh, log|det df/dz| = log|1 + u^T psi(z)|, psi = h'(w^T z + b) w
    (Rezende & Mohamed Eqs. 10-12, u^ of App. A.1). z (..., D); u, w (..., D) and b (..., 1)
    broadcast against it -> (f(z), log|det| (...))."""
    u = planar_u_hat(u, w)
    h = torch.tanh((z * w).sum(-1, keepdim=True) + b)
    psi = (1 - h.pow(2)) * w
    return z + u * h, torch.log1p((u * psi).sum(-1))  # u^T psi >= -h' > -1 (App. A.1)


def radial(z, z0, a, b):
    """f(z) = z + beta h(alpha, r)(z - z0), r = ||z - z0||, h = 1 / (alpha + r), and
    log|det| = (D - 1) log(1 + beta h) + log(1 + beta h + beta h'(alpha, r) r) (Rezende & Mohamed
    Eq. 14); alpha = softplus(a) > 0 and beta = -alpha + softplus(b) >= -alpha keep it invertible
    (App. A.2). z (..., D); z0 (..., D), a and b (..., 1) broadcast -> (f(z), log|det| (...))."""
    alpha = F.softplus(a)
    beta = -alpha + F.softplus(b)
    diff = z - z0
    r = diff.norm(dim=-1, keepdim=True)
    h = 1 / (alpha + r)
    log_det = (z.shape[-1] - 1) * torch.log1p(beta * h) + torch.log1p(beta * h - beta * h.pow(2) * r)
    return z + beta * h * diff, log_det.squeeze(-1)


class PlanarFlow(nn.Module):
    """K planar steps (`planar`) whose u, w, b come from the encoder, (2D + 1) numbers per step and
    example: the amortized flow of Rezende & Mohamed Sec. 4."""

    def __init__(self, dim, length):
        super().__init__()
        self.dim, self.length, self.n_context = dim, length, length * (2 * dim + 1)

    def forward(self, z, h):
        log_det = 0
        for p in h.split(2 * self.dim + 1, dim=-1):
            u, w, b = p.split([self.dim, self.dim, 1], dim=-1)
            z, ld = planar(z, u, w, b)
            log_det = log_det + ld
        return z, log_det


class RadialFlow(nn.Module):
    """K radial steps (`radial`) whose z0, alpha, beta come from the encoder, D + 2 numbers per step."""

    def __init__(self, dim, length):
        super().__init__()
        self.dim, self.length, self.n_context = dim, length, length * (dim + 2)

    def forward(self, z, h):
        log_det = 0
        for p in h.split(self.dim + 2, dim=-1):
            z0, a, b = p.split([self.dim, 1, 1], dim=-1)
            z, ld = radial(z, z0, a, b)
            log_det = log_det + ld
        return z, log_det


# ----------------------------------------------------------------------------------------
# IAF (Kingma et al. 2016, arXiv 1606.04934) with MADE (Germain et al. 2015, arXiv 1502.03509)
# ----------------------------------------------------------------------------------------

def made_masks(order, hidden):
    """MADE's masks (Germain et al. Eqs. 12-13): inputs have degrees `order` (a permutation of
    1..D), hidden units m^l(k) in 1..D-1; a weight is kept where m^l(k) >= m^{l-1}(k') and, into
    output d, where d > m^L(k), so output d depends only on inputs of lower degree. -> [(out, in)]."""
    d = len(order)
    degrees = [order] + [torch.arange(n) % max(d - 1, 1) + min(1, d - 1) for n in hidden]
    masks = [(m_out[:, None] >= m_in[None, :]).float() for m_in, m_out in zip(degrees[:-1], degrees[1:])]
    return masks + [(order[:, None] > degrees[-1][None, :]).float()]


class MaskedLinear(nn.Linear):
    """x W^T + b with W multiplied by a fixed 0/1 mask (out, in) (Germain et al. Eq. 10)."""

    def __init__(self, n_in, n_out, mask):
        super().__init__(n_in, n_out)
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """(m, s) = AutoregressiveNN(z, h) of Kingma et al. Eq. 10: a MADE over z (..., D) in the
    ordering `order`, ELU hidden layers, the context h (B, C) added to the first one (unmasked:
    it is the same for every dimension); m_i and s_i depend on z_j of lower degree only."""

    def __init__(self, dim, hidden, context, order):
        super().__init__()
        masks = made_masks(order, hidden)
        sizes = [dim, *hidden]
        self.layers = nn.ModuleList(MaskedLinear(a, b, m) for a, b, m in zip(sizes[:-1], sizes[1:], masks))
        self.context = nn.Linear(context, hidden[0])
        self.out = MaskedLinear(hidden[-1], 2 * dim, masks[-1].repeat(2, 1))

    def forward(self, z, h):
        a = self.layers[0](z) + self.context(h)
        for layer in self.layers[1:]:
            a = layer(F.elu(a))
        return self.out(F.elu(a)).chunk(2, dim=-1)


class IAF(nn.Module):
    """K IAF steps (Kingma et al. 2016 Eqs. 10-14, the "LSTM-type" update): [m, s] = MADE_t(z, h),
    sigma = sigmoid(s), z <- sigma * z + (1 - sigma) * m, log|det| = sum_i log sigma_i; the
    ordering is reversed between steps. h (B, C) is the context from the encoder."""

    def __init__(self, dim, length, hidden, context):
        super().__init__()
        self.n_context = context
        order = torch.arange(1, dim + 1)
        self.steps = nn.ModuleList(MADE(dim, hidden, context, order if t % 2 == 0 else order.flip(0))
                                   for t in range(length))
        with torch.no_grad():  # s starts near +1, sigma ~ 0.73: as Kingma et al. advise, near the identity
            for made in self.steps:
                made.out.bias[dim:].fill_(1.0)

    def forward(self, z, h):
        """z_K and sum_k sum_i log sigma_k,i: the K steps of Eqs. 10-14, context h (B, H)."""
        log_det = 0
        for made in self.steps:
            m, s = made(z, h)
            sigma = torch.sigmoid(s)
            z = sigma * z + (1 - sigma) * m
            log_det = log_det + F.logsigmoid(s).sum(-1)
        return z, log_det


# ----------------------------------------------------------------------------------------
# The semi-amortized VAE (Kim et al. 2018, arXiv 1802.02550)
# ----------------------------------------------------------------------------------------

def clip_norm(g, max_norm):
    """g * min(1, c / ||g||), the norm over the last axis (one example's gradient with respect to mu,
    or to logvar): the clipping of the SVI gradients in Kim et al.'s code (svi_max_grad_norm 5);
    c = 0: g unchanged."""
    if max_norm <= 0:
        return g
    return g * (max_norm / g.norm(dim=-1, keepdim=True).clamp(min=1e-30)).clamp(max=1.0)


def svi_refine(log_likelihood, x, mu, logvar, steps, lr, generator=None, k=1, max_norm=0.0):
    """lambda_{k+1} = lambda_k + alpha clip(grad_lambda ELBO(lambda_k; theta, x)), k < K, lambda =
    (mu, logvar) (Kim et al. Alg. 1 without momentum), each ELBO from k reparameterised samples and
    the KL in closed form, each example's gradient with respect to mu and to logvar clipped to norm
    `max_norm` (`clip_norm`); `log_likelihood(x, z (k, B, D)) -> (k, B)`. With gradients enabled
    the steps stay in the graph (create_graph), so a loss at lambda_K trains the decoder and,
    through lambda_0, the encoder, with the exact Hessian-vector products of Alg. 1 (by autograd,
    through the clipping too; Kim et al. use finite differences). Returns lambda_K."""
    train = torch.is_grad_enabled()
    with torch.enable_grad():
        if not (train and mu.requires_grad):  # evaluation, or an encoder without parameters
            mu, logvar = mu.detach().requires_grad_(), logvar.detach().requires_grad_()
        for _ in range(steps):
            z = reparameterize(mu, logvar, k, generator)
            elbo_sum = (log_likelihood(x, z).mean(0) - gaussian_kl(mu, logvar)).sum()  # examples are independent
            g_mu, g_logvar = torch.autograd.grad(elbo_sum, (mu, logvar), create_graph=train)
            mu, logvar = mu + lr * clip_norm(g_mu, max_norm), logvar + lr * clip_norm(g_logvar, max_norm)
    return (mu, logvar) if train else (mu.detach(), logvar.detach())


# ----------------------------------------------------------------------------------------
# Hierarchical VAE (Child 2021, arXiv 2011.10650; Vahdat & Kautz 2020, arXiv 2007.03898)
# ----------------------------------------------------------------------------------------
# p(z) = prod_l p(z_l | z_<l), q(z|x) = prod_l q(z_l | z_<l, x) (Child 2021): a bottom-up
# pass turns x into features a_r at every resolution r; one top-down pass then carries a state
# h_l, from which group l forms its prior p(z_l | h_l) and, with a_r, its posterior
# q(z_l | h_l, a_r) (Kingma et al. 2016's bidirectional inference, as VD-VAE uses it).
# Prior sampling is the same top-down pass with z_l drawn from the prior and no encoder at all.
# A model here is a callable `model(x, k, generator) -> (log p(x|z) (k, B), KL per group
# (k, B, L), log q(z|x) - log p(z) (k, B))`, HierarchicalVAE.forward; tests pass oracles.

def gaussian_kl_between(mu_q, logvar_q, mu_p, logvar_p):
    """KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))) elementwise:
    1/2 (log s_p^2 / s_q^2 + (s_q^2 + (mu_q - mu_p)^2) / s_p^2 - 1) (the KL between the diagonal
    Gaussians of each group of Child 2021; `gaussian_kl_per_dim` is the case mu_p = 0, s_p = 1)."""
    d = logvar_q - logvar_p
    # s_q^2 / s_p^2 - 1 - log(s_q^2 / s_p^2) as expm1(d) - d: exact to the last bit at q = p
    return 0.5 * ((mu_q - mu_p).pow(2) * (-logvar_p).exp() + torch.expm1(d) - d)


def residual_normal_kl(d_mu, d_logvar, logvar_p):
    """KL(q || p) for NVAE's residual normal q = N(mu_p + dmu, (s_p ds)^2), p = N(mu_p, s_p^2)
    (Vahdat & Kautz Eq. 2): 1/2 (dmu^2 / s_p^2 + ds^2 - log ds^2 - 1), elementwise; the encoder
    gives (dmu, log ds^2) relative to the prior, so q = p exactly when both are 0."""
    return 0.5 * (d_mu.pow(2) * (-logvar_p).exp() + torch.expm1(d_logvar) - d_logvar)


def hierarchical_elbo(model, x, k=1, generator=None):
    """(L(x) (B,), E_q KL per group (B, L)): L = E_q[log p(x|z)] - sum_l E_q[KL(q(z_l|z_<l, x) ||
    p(z_l|z_<l))] (Child 2021; Vahdat & Kautz 2020), each KL in closed form given the sampled
    z_<l, averaged over k samples."""
    log_lik, kl, _ = model(x, k, generator)
    return log_lik.mean(0) - kl.sum(-1).mean(0), kl.mean(0)


def hierarchical_iwae(model, x, k, chunk=None, generator=None):
    """L_k(x) = log 1/k sum_i p(x, z_i) / q(z_i|x) (Burda et al. Eq. 8) for the hierarchical model,
    log w = log p(x|z) - (log q(z|x) - log p(z)), in chunks of samples as `iwae_bound`. -> (B,)."""
    chunk = k if chunk is None else chunk
    partial = []
    for start in range(0, k, chunk):
        log_lik, _, log_ratio = model(x, min(chunk, k - start), generator)
        partial.append(torch.logsumexp(log_lik - log_ratio, dim=0))
    return torch.logsumexp(torch.stack(partial), dim=0) - math.log(k)


def hierarchical_loss(model, x):
    """-L(x) / dims averaged over the batch (VD-VAE trains on nats per dimension, the scale its
    gradient-norm thresholds refer to), and detached statistics: the ELBO and the KL in nats."""
    log_lik, kl, _ = model(x)
    rec, kl = log_lik.mean(), kl.sum(-1).mean()
    elbo = rec - kl
    return -elbo / x[0].numel(), {"elbo": elbo.detach(), "kl": kl.detach(), "recon": rec.detach()}


class GradientSkipping:
    """VD-VAE's update (Child 2021, gradient skipping): clip the gradient norm at `clip`, and skip the update
    altogether when the norm before clipping is at least `threshold` or not finite; a skipped step
    leaves the weights and the optimiser state as they were, and is counted (`skipped`, kept in
    the checkpoint). 0 turns either off."""

    def __init__(self, clip=0.0, threshold=0.0):
        self.clip, self.threshold, self.skipped = clip, threshold, 0

    def step(self, params, opt):
        """opt.step() unless skipped; -> {"grad_norm", "skipped": 1.0 or 0.0} for the log."""
        params = [p for p in params if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip if self.clip > 0 else math.inf).item()
        skip = not math.isfinite(norm) or 0 < self.threshold <= norm
        if skip:
            self.skipped += 1
            opt.zero_grad(set_to_none=True)
        else:
            opt.step()
        return {"grad_norm": norm, "skipped": float(skip)}

    def state_dict(self):
        return {"skipped": self.skipped}

    def load_state_dict(self, state):
        self.skipped = state["skipped"]


def parse_blocks(spec, kind):
    """VD-VAE's block strings (the enc_blocks / dec_blocks of openai/vdvae): comma-separated
    "RxN" (N blocks at resolution R), "R" (one), and "RdK" (encoder: one block at R, then
    average-pooling by K) or "RmS" (decoder: one group at R whose state starts from the state at
    resolution S upsampled). -> [(R, K or S or None)], one entry per block or latent group."""
    tag = {"encoder": "d", "decoder": "m"}[kind]
    blocks = []
    for item in spec.split(","):
        item = item.strip()
        try:
            if "x" in item:
                res, n = map(int, item.split("x"))
                if n < 1:
                    raise ValueError
                blocks += [(res, None)] * n
            elif tag in item:
                res, other = map(int, item.split(tag))
                blocks.append((res, other))
            else:
                blocks.append((int(item), None))
        except ValueError:
            raise ValueError(f"{item!r} is not RxN, R or R{tag}K with positive integers") from None
    if not blocks or any(r < 1 or (o is not None and o < 1) for r, o in blocks):
        raise ValueError(f"{spec!r}: resolutions and counts must be positive integers")
    return blocks


def check_blocks(enc, dec, side):
    """That the block strings fit an image of side `side` (1 for points): the encoder starts at the
    side and pools by rates that divide; the decoder ends at the side, reads features at
    resolutions the encoder has, and upsamples from a lower resolution it has already reached
    by an integer factor. ValueError otherwise."""
    res, have = side, {side}
    for r, down in enc:
        if r != res:
            raise ValueError(f"encoder block at {r} follows resolution {res}")
        if down is not None:
            if res % down:
                raise ValueError(f"pooling {res} by {down} does not divide")
            res //= down
            have.add(res)
    seen = set()
    for r, mixin in dec:
        if r not in have:
            raise ValueError(f"decoder group at {r}: the encoder has no features there (it has {sorted(have)})")
        if mixin is not None and (mixin not in seen or mixin >= r or r % mixin):
            raise ValueError(f"decoder group {r}m{mixin} needs the lower resolution {mixin}, reached before "
                             f"and dividing {r}")
        if seen and r not in seen and mixin is None:
            raise ValueError(f"decoder reaches resolution {r} without RmS saying where its state comes from")
        seen.add(r)
    if dec[-1][0] != side:
        raise ValueError(f"the decoder ends at {dec[-1][0]}, not at the data's side {side}")


def _conv(c_in, c_out, res, scale=1.0):
    """A 3x3 convolution above resolution 2, else a 1x1 (a linear map per position: at resolution 1,
    the MLP variant used for 2D points); the weight scaled by `scale` at initialisation."""
    conv = nn.Conv2d(c_in, c_out, 3 if res > 2 else 1, padding=1 if res > 2 else 0)
    with torch.no_grad():
        conv.weight.mul_(scale)
        if scale == 0:
            conv.bias.zero_()
    return conv


class Bottleneck(nn.Module):
    """VD-VAE's residual bottleneck block (Child 2021): GELU then 1x1, 3x3, 3x3, 1x1 convolutions through a width
    `mid` (a quarter of the width), optionally around a residual connection; the last layer's
    weight is scaled by `last_scale` at initialisation (1/sqrt(depth), Child 2021; 0 for the
    prior's output, which starts every group at p = N(0, I) plus its bias)."""

    def __init__(self, c_in, mid, c_out, res, residual=False, last_scale=1.0):
        super().__init__()
        self.residual = residual
        self.layers = nn.ModuleList([nn.Conv2d(c_in, mid, 1), _conv(mid, mid, res), _conv(mid, mid, res),
                                     _conv(mid, c_out, 1, last_scale)])

    def forward(self, x):
        h = x
        for layer in self.layers:
            h = layer(F.gelu(h))
        return x + h if self.residual else h


class HierarchicalEncoder(nn.Module):
    """The bottom-up pass: x (B, C, side, side) -> {r: a_r (B, width, r, r)}, the features after the
    last block at each resolution; residual bottleneck blocks, average-pooled where the block
    string says (Child 2021)."""

    def __init__(self, channels, side, width, mid, blocks):
        super().__init__()
        self.blocks_spec = blocks
        self.stem = _conv(channels, width, side)
        scale = 1 / math.sqrt(len(blocks))
        self.blocks = nn.ModuleList(Bottleneck(width, mid, width, r, residual=True, last_scale=scale)
                                    for r, _ in blocks)

    def forward(self, x):
        """The bottom-up pass: {resolution: the last activation at that resolution}."""
        h = self.stem(x)
        acts = {h.shape[-1]: h}
        for block, (_, down) in zip(self.blocks, self.blocks_spec):
            h = block(h)
            if down is not None:
                h = F.avg_pool2d(h, down)
            acts[h.shape[-1]] = h
        return acts


class TopDownGroup(nn.Module):
    """One latent group of the top-down pass (VD-VAE's "top-down block"): from the state h,
    the prior p(z_l | z_<l) = N(mu_p, s_p^2) and a residual update of h; with features a, the
    posterior q(z_l | z_<l, x) from [h, a] (NVAE's residual normal with `residual`); then
    h <- h + h_p + W z_l and a residual bottleneck block."""

    def __init__(self, width, mid, zdim, res, depth, residual):
        super().__init__()
        self.zdim, self.residual = zdim, residual
        scale = 1 / math.sqrt(depth)
        self.prior = Bottleneck(width, mid, 2 * zdim + width, res, last_scale=0.0)
        self.posterior = Bottleneck(2 * width, mid, 2 * zdim, res)
        self.z_proj = _conv(zdim, width, 1, scale)
        self.block = Bottleneck(width, mid, width, res, residual=True, last_scale=scale)

    def forward(self, h, a=None, temperature=1.0, generator=None, record=None):
        """-> (next state, z_l, KL(q || p) (B,) and log q(z_l) - log p(z_l) (B,), both None without
        a: then z_l ~ N(mu_p, (t s_p)^2), temperature t). `record`, a list, receives a dict of h,
        z_l and the parameters of p and q (tests)."""
        mu_p, logvar_p, h_p = self.prior(h).split([self.zdim, self.zdim, h.shape[1]], dim=1)
        mu_p, logvar_p = _full(mu_p), _full(logvar_p)
        eps = torch.randn(mu_p.shape, generator=generator, device=mu_p.device, dtype=mu_p.dtype)
        mu_q = logvar_q = kl = log_ratio = None
        if a is None:
            z = mu_p + temperature * (0.5 * logvar_p).exp() * eps
        else:
            mu_q, logvar_q = _full(self.posterior(torch.cat([h, a], dim=1))).chunk(2, dim=1)
            if self.residual:  # Vahdat & Kautz Eq. 2: q relative to p
                kl = residual_normal_kl(mu_q, logvar_q, logvar_p)
                mu_q, logvar_q = mu_p + mu_q, logvar_p + logvar_q
            else:
                kl = gaussian_kl_between(mu_q, logvar_q, mu_p, logvar_p)
            z = mu_q + (0.5 * logvar_q).exp() * eps
            log_ratio = (log_normal(z.flatten(1), mu_q.flatten(1), logvar_q.flatten(1))
                         - log_normal(z.flatten(1), mu_p.flatten(1), logvar_p.flatten(1)))
            kl = kl.flatten(1).sum(1)
        if record is not None:
            record.append(dict(h=h, z=z, mu_p=mu_p, logvar_p=logvar_p, mu_q=mu_q, logvar_q=logvar_q))
        h = self.block(h + h_p + self.z_proj(z.to(h.dtype)))
        return h, z, kl, log_ratio


class HierarchicalVAE(nn.Module):
    """The top-down VAE of Child 2021 (VD-VAE): an encoder pass, a decoder of latent groups at the
    resolutions of `dec_blocks` starting from learned states, and the likelihood's parameters from
    the last state by a 1x1 convolution. 2D points are 2-channel 1x1 images, so every layer is a
    linear map per group of latent vectors (the MLP variant). `forward(x, k)` is what the bounds
    take; `top_down` draws from the prior without the encoder."""

    def __init__(self, shape, likelihood, width, enc_blocks, dec_blocks, zdim, bottleneck=0.25,
                 residual=False, in_scale=1.0, centre=True):
        super().__init__()
        self.data_shape = tuple(shape)
        c, side = (shape[0], shape[-1]) if len(shape) == 3 else (shape[0], 1)
        enc, dec = parse_blocks(enc_blocks, "encoder"), parse_blocks(dec_blocks, "decoder")
        check_blocks(enc, dec, side)
        self.likelihood, self.channels, self.side, self.in_scale, self.centre = likelihood, c, side, in_scale, centre
        mid = max(1, int(width * bottleneck))
        self.encoder = HierarchicalEncoder(c, side, width, mid, enc)
        self.dec_spec = dec
        self.groups = nn.ModuleList(TopDownGroup(width, mid, zdim, r, len(dec), residual) for r, _ in dec)
        self.start = nn.ParameterDict({str(r): nn.Parameter(torch.zeros(1, width, r, r)) for r in {r for r, _ in dec}})
        self.gain, self.bias = nn.Parameter(torch.ones(1, width, 1, 1)), nn.Parameter(torch.zeros(1, width, 1, 1))
        self.out = nn.Conv2d(width, likelihood.n_params * c, 1)
        self.register_buffer("ref", torch.zeros(()), persistent=False)

    @property
    def n_groups(self):
        return len(self.groups)

    def encode(self, x):
        """The bottom-up features {r: a_r} of x (B, *shape), the input centred on [-1, 1] for images."""
        x = x.to(self.out.weight.dtype).reshape(x.shape[0], self.channels, self.side, self.side) * self.in_scale
        return self.encoder(2 * x - 1 if self.centre else x)

    def top_down(self, n, acts=None, temperature=(1.0,), generator=None, record=None):
        """The top-down pass for n examples: with acts, z_l ~ q(z_l | z_<l, x); without, z_l ~ the
        prior at temperature t_l (one value for all groups or one per group). -> (the likelihood's
        parameters (n, n_params, *shape), KL per group (n, L) and log q/p (n,), both None without
        acts). `record`, a list, receives each group's h_l, z_l and parameters (TopDownGroup)."""
        if len(temperature) not in (1, self.n_groups):
            raise ValueError(f"{len(temperature)} temperatures for {self.n_groups} groups: give 1 or {self.n_groups}")
        states, kls, log_ratio = {}, [], 0
        for l, (group, (r, mixin)) in enumerate(zip(self.groups, self.dec_spec)):
            if r not in states:
                h = self.start[str(r)].expand(n, -1, -1, -1)
                if mixin is not None:
                    h = h + F.interpolate(states[mixin], scale_factor=r // mixin, mode="nearest")
            else:
                h = states[r]
            t = temperature[l if len(temperature) > 1 else 0]
            h, z, kl, lr = group(h, None if acts is None else acts[r], t, generator, record)
            states[r] = h
            if acts is not None:
                kls.append(kl)
                log_ratio = log_ratio + lr
        out = _full(self.out(states[self.side] * self.gain + self.bias))
        out = out.view(n, self.likelihood.n_params, *self.data_shape)
        return (out, None, None) if acts is None else (out, torch.stack(kls, -1), log_ratio)

    def forward(self, x, k=1, generator=None):
        """x (B, *shape) -> (log p(x|z) (k, B), KL per group (k, B, L), log q(z|x) - log p(z) (k, B)):
        one encoder pass, k top-down passes with z ~ q."""
        b = x.shape[0]
        acts = {r: a.repeat(k, 1, 1, 1) for r, a in self.encode(x).items()}
        out, kl, log_ratio = self.top_down(k * b, acts, generator=generator)
        log_lik = self.likelihood.log_prob(x.repeat(k, *[1] * (x.dim() - 1)), out)
        return log_lik.view(k, b), kl.view(k, b, -1), log_ratio.view(k, b)


@torch.inference_mode()
def sample_top_down(net, n, temperature=(1.0,), mean=False, generator=None):
    """x ~ p(x|z), z_l ~ p(z_l | z_<l) at temperature t_l, top-down (Child 2021): n samples
    (n, *shape); mean=True returns E[x|z]. The encoder never runs."""
    out, _, _ = net.top_down(n, None, tuple(temperature), generator)
    return net.likelihood.mean(out) if mean else net.likelihood.sample(out, generator)


def hierarchical_dataset_bounds(net, x, k, rows):
    """(ELBO, L_k, KL per group) per example of x (float64, CPU), as `dataset_bounds`."""
    b = max(1, min(len(x), rows // min(k, rows)))
    chunk = max(1, rows // b)
    elbos, bounds, kls = [], [], []
    for xb in x.split(b):
        e, kl = hierarchical_elbo(net, xb)
        elbos.append(e.double().cpu())
        kls.append(kl.double().cpu())
        bounds.append(hierarchical_iwae(net, xb, k, chunk=chunk).double().cpu())
    return torch.cat(elbos), torch.cat(bounds), torch.cat(kls)


@torch.no_grad()
def hierarchical_diagnostics(net, x):
    """The KL of each group in nats (mean over the fixed batch x): how much each layer carries."""
    _, kl = hierarchical_elbo(net, x)
    kl = kl.mean(0)
    return {"kl": kl.sum().item(), "kl_per_group": [round(v, 4) for v in kl.tolist()]}



# ----------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "silu": nn.SiLU}


def _mlp(sizes, activation):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def _split(h, latent):
    """The encoder's last layer -> (mu, logvar), or (mu, logvar, h) when it also gives the flow's
    per-example parameters or context h."""
    mu, logvar, rest = h[:, :latent], h[:, latent:2 * latent], h[:, 2 * latent:]
    return (mu, logvar) if rest.shape[1] == 0 else (mu, logvar, rest)


class MLPEncoder(nn.Module):
    """q(z|x) = N(mu(x), diag exp(logvar(x))) (Kingma & Welling Appendix C.2).

    x (B, *shape) -> (mu, logvar), each (B, latent), and h (B, extra) when extra > 0 (a flow's
    parameters or context). `in_scale` maps the data's levels to [0, 1].
    """

    def __init__(self, in_dim, hidden, latent, activation="relu", in_scale=1.0, extra=0):
        super().__init__()
        self.in_scale, self.latent = in_scale, latent
        self.net = _mlp([in_dim, *hidden, 2 * latent + extra], activation)

    def forward(self, x):
        return _split(self.net(x.flatten(1).to(self.net[0].weight.dtype) * self.in_scale), self.latent)


class MLPDecoder(nn.Module):
    """z (B, latent) -> the likelihood's parameters (B, n_params, *shape) (Kingma & Welling App. C)."""

    def __init__(self, latent, hidden, shape, n_params, activation="relu"):
        super().__init__()
        self.shape, self.n_params = tuple(shape), n_params
        self.net = _mlp([latent, *hidden, n_params * math.prod(self.shape)], activation)

    def forward(self, z):
        return self.net(z).view(z.shape[0], self.n_params, *self.shape)


class ConvEncoder(nn.Module):
    """Stride-2 4x4 convolutions, then a linear layer to (mu, logvar[, h]); x (B, C, H, W)."""

    def __init__(self, shape, channels, latent, activation="elu", in_scale=1.0, extra=0):
        super().__init__()
        c, h, w = shape
        s = 2 ** len(channels)
        if h % s or w % s:
            raise ValueError(f"{len(channels)} stride-2 layers need a height and width divisible by {s}; got {h}x{w}")
        self.in_scale, self.latent = in_scale, latent
        layers = []
        for c_out in channels:
            layers += [nn.Conv2d(c, c_out, 4, stride=2, padding=1), _ACTIVATIONS[activation]()]
            c = c_out
        self.conv = nn.Sequential(*layers)
        self.head = nn.Linear(c * (h // s) * (w // s), 2 * latent + extra)

    def forward(self, x):
        # Centre the input on [-1, 1] as convolutions without a normalisation layer prefer.
        h = self.conv(x.to(self.head.weight.dtype) * (2 * self.in_scale) - 1)
        return _split(self.head(h.flatten(1)), self.latent)


class ConvDecoder(nn.Module):
    """Mirror of ConvEncoder with transposed convolutions; z (B, latent) -> (B, n_params, C, H, W)."""

    def __init__(self, shape, channels, latent, n_params, activation="elu"):
        super().__init__()
        self.shape, self.n_params = tuple(shape), n_params
        c, h, w = shape
        s = 2 ** len(channels)
        self.start = (channels[-1], h // s, w // s)
        self.fc = nn.Linear(latent, math.prod(self.start))
        layers = []
        widths = list(channels[::-1]) + [n_params * c]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.ConvTranspose2d(a, b, 4, stride=2, padding=1))
            if i < len(widths) - 2:
                layers.append(_ACTIVATIONS[activation]())
        self.deconv = nn.Sequential(_ACTIVATIONS[activation](), *layers)

    def forward(self, z):
        h = self.deconv(self.fc(z).view(z.shape[0], *self.start))
        return h.view(z.shape[0], self.n_params, *self.shape)


class VAE(nn.Module):
    """A VAE from any encoder x -> (mu, logvar[, h]), decoder z -> the likelihood's parameters, and
    likelihood p(x | params); the prior is p(z) = N(0, I) of dimension `latent_dim`. With a `flow`
    (PlanarFlow, RadialFlow, IAF) q(z|x) is q_K, the Gaussian pushed through it with the encoder's
    h; with `svi_steps` > 0 the Gaussian's parameters are refined by `svi_refine` (SA-VAE).

    `forward(x, k)` is one pass of the model, what every bound is made of: encode x, draw k
    reparameterised latents per example from q(z|x), decode them and score x under p(x|z).
    `encoder` and `decoder` may be modules or plain callables (tests pass exact oracles).
    """

    def __init__(self, encoder, decoder, likelihood, latent_dim, flow=None, svi_steps=0, svi_lr=1.0,
                 svi_max_norm=0.0):
        super().__init__()
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.latent_dim, self.flow, self.svi_steps, self.svi_lr = latent_dim, flow, svi_steps, svi_lr
        self.svi_max_norm = svi_max_norm
        # A zero that follows .to(device, dtype): where prior samples are drawn, even for a VAE
        # built from parameter-free oracles.
        self.register_buffer("ref", torch.zeros(()), persistent=False)

    def encode(self, x):
        """(mu, logvar) of the Gaussian q0(z|x), each (B, D), and the flow's h (B, P) or None, in at
        least float32."""
        out = self.encoder(x)
        return _full(out[0]), _full(out[1]), (_full(out[2]) if len(out) > 2 else None)

    def posterior(self, x):
        """(mu, logvar) of the Gaussian q(z|x) (the base q0 of a flow), each (B, D)."""
        return self.encode(x)[:2]

    def posterior_point(self, x):
        """One latent (B, D) that stands for q(z|x): mu, pushed through the flow if there is one."""
        mu, _, h = self.encode(x)
        return mu if self.flow is None else self.flow(mu.unsqueeze(0), h)[0][0]

    def decode(self, z):
        """The likelihood's parameters for latents z (N, D), in at least float32."""
        return _full(self.decoder(z))

    def log_likelihood(self, x, z):
        """log p(x | z) for z (k, B, D) -> (k, B); the decoder sees all k * B latents at once."""
        k, b = z.shape[:2]
        out = self.decode(z.reshape(k * b, -1))
        xs = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])
        return self.likelihood.log_prob(xs, out).view(k, b)

    def forward(self, x, k=1, generator=None, svi_steps=None):
        """x (B, *shape) -> (mu, logvar (B, D), z ~ q(z|x) (k, B, D), log p(x|z) (k, B), log q(z|x)
        (k, B) or None for a Gaussian q). mu, logvar are lambda_K after `svi_steps` SVI steps
        (default self.svi_steps; 0 gives the encoder's lambda_0)."""
        mu, logvar, h = self.encode(x)
        steps = self.svi_steps if svi_steps is None else svi_steps
        if steps:
            mu, logvar = svi_refine(self.log_likelihood, x, mu, logvar, steps, self.svi_lr, generator,
                                    max_norm=self.svi_max_norm)
        z = reparameterize(mu, logvar, k, generator)
        if self.flow is None:
            return mu, logvar, z, self.log_likelihood(x, z), None
        z_k, log_det = self.flow(z, h)
        log_q = log_normal(z, mu, logvar) - log_det  # Rezende & Mohamed Eq. 13
        return mu, logvar, z_k, self.log_likelihood(x, z_k), log_q


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Config(RunConfig):
    """Every flag of `python vae.py`; `--help` prints them with their defaults."""

    steps: int = flag(2000, "training steps")
    log_every: int = flag(100, "steps between metric lines and diagnostics (KL per dimension, active units)")
    save_every: int = flag(1000, "steps between checkpoints and sample pictures")
    latent: int = flag(16, "latent dimensions (--arch hierarchical: channels of each group, VD-VAE's zdim)")
    arch: str = flag("mlp", "encoder/decoder network; hierarchical: VD-VAE's top-down groups of latents "
                     "(Child 2021), with its own presets", choices=("mlp", "conv", "hierarchical"))
    hidden: tuple = flag((256, 256), "MLP hidden widths, e.g. 200,200")
    channels: tuple = flag((64, 128, 256), "conv channels, one stride-2 layer each")
    activation: str = flag("relu", "hidden non-linearity", choices=("relu", "tanh", "elu", "silu"))
    likelihood: str = flag("auto", "decoder p(x|z); auto: gaussian for 2D points, bernoulli for 2-level "
                           "images, discretized logistic for other images (the mnist preset sets bernoulli: "
                           "MNIST binarised)",
                           choices=("auto", "bernoulli", "categorical", "logistic", "gaussian"))
    objective: str = flag("elbo", "training objective: the ELBO (VAE) or the k-sample bound (IWAE)",
                          choices=("elbo", "iwae"))
    k: int = flag(1, "samples per example in the training objective (IWAE k; ELBO: averaged samples)")
    kl_warmup: int = flag(0, "steps over which the KL weight rises linearly from 0 to 1 (ELBO only)")
    free_bits: float = flag(0.0, "free bits: minimum KL in nats per latent dimension (ELBO only)")
    k_eval: int = flag(5000, "importance samples of the IWAE bound in --eval")
    k_density: int = flag(100, "importance samples per grid point for density.npz on 2D sets")
    adam_eps: float = flag(1e-8, "Adam epsilon")
    lr_schedule: str = flag("constant", "learning rate schedule; burda: stage i of 3^i passes over the data "
                            "at lr*10^(-i/7), i = 0..7",
                            choices=("constant", "burda"))
    posterior: str = flag("gaussian", "q(z|x): diagonal Gaussian, or that Gaussian through K planar or radial "
                          "steps (Rezende & Mohamed 2015) or K IAF steps (Kingma et al. 2016)",
                          choices=("gaussian", "planar", "radial", "iaf"))
    flow_length: int = flag(4, "K, the steps of the posterior's flow (planar, radial, iaf)")
    svi_steps: int = flag(0, "SA-VAE (Kim et al. 2018): gradient steps on the Gaussian's (mu, logvar) per "
                          "example, in training and evaluation; 0: the encoder's own q")
    svi_lr: float = flag(0.02, "SA-VAE: the step size alpha of those steps")
    svi_max_grad_norm: float = flag(5.0, "SA-VAE: each example's gradient with respect to mu, and to logvar, "
                                    "clipped to this norm before the step (Kim et al.'s code: 5); 0: no clipping")
    # --arch hierarchical (Child 2021; Vahdat & Kautz 2020); --latent is the channels of each group
    width: int = flag(32, "hierarchical: channels of the encoder's and decoder's states")
    bottleneck: float = flag(0.25, "hierarchical: the bottleneck blocks' inner width as a fraction of --width")
    enc_blocks: str = flag("8x1,8d2,4x1,4d2,2x1,2d2,1x1", "hierarchical: encoder blocks, RxN (N blocks at "
                           "resolution R) or RdK (a block, then pooling by K), comma-separated (VD-VAE's strings)")
    dec_blocks: str = flag("1x1,2m1,2x1,4m2,4x1,8m4,8x1", "hierarchical: decoder latent groups, RxN or RmS (a "
                           "group at R starting from the state at S upsampled), comma-separated")
    residual_posterior: bool = flag(False, "hierarchical: NVAE's residual normal q = N(mu_p + dmu, (s_p ds)^2)")
    grad_clip: float = flag(0.0, "hierarchical: clip the gradient norm at this value (0: off)")
    skip_threshold: float = flag(0.0, "hierarchical: skip (and count) an update whose gradient norm before "
                                 "clipping is at least this (0: off)")
    warmup: int = flag(0, "hierarchical: steps of linear learning-rate warm-up")
    weight_decay: float = flag(0.0, "hierarchical: AdamW's decoupled weight decay")
    adam_beta2: float = flag(0.999, "hierarchical: Adam's beta2")
    ema_rate: float = flag(0.0, "hierarchical: EMA of the weights used for --eval and --sample (0: off)")
    temperature: tuple = flag((1.0,), "hierarchical --sample: prior temperature, one for every group or one "
                              "per group, e.g. 1,1,0.8")


PRESETS = {
    # Default: about a minute on one CPU core. Longer runs overfit the 1497 training images
    # (5000 steps: train ELBO 1.66, test 2.21 bits/dim); a categorical decoder overfits sooner.
    # Its samples' Frechet distance (benchmarks/quality.py, floor 4.77) is a prior hole, not the
    # decoder: measured on one run, decoder means at z ~ q(z|x) of training images 13.3 (at the
    # posterior means 12.5), at z ~ N(0, I) 58.1, at z from a full-covariance Gaussian fitted to
    # those z ~ q(z|x) 43.2; latent 2 / 4 / 8 gave 95 / 57 / 55 at z ~ N(0, I), --kl-warmup 1000
    # 71. The aggregate posterior of 1497 images is clustered, and N(0, I) puts mass between the
    # clusters; closing that needs a richer prior, not another setting of this one.
    "digits": dict(latent=16, hidden=(256, 256), likelihood="logistic"),
    "digits-binary": dict(latent=16, hidden=(256, 256), likelihood="bernoulli"),
    # Burda et al. 2016 Sec. 5.1, one stochastic layer: 784-200-200-50 tanh, Bernoulli output
    # (MNIST binarised afresh for every batch), Adam eps 1e-4, batch 20, 3280 passes over the
    # 60000 training images in 8 stages. With --posterior planar: flow_length 10 is Rezende &
    # Mohamed's K = 10 row (Table 2, 87.5 nats); their network, optimiser and annealing are not
    # checked here, so the rest is Burda et al.'s (ours). The IAF steps' MADE widths (= hidden)
    # and its context size are ours. SA-VAE: Kim et al. report no MNIST run; their image code
    # (OMNIGLOT, train_img.py) takes 20 SVI steps of size 1 on the batch-mean ELBO at batch 50
    # (0.02 per example: our --svi-lr default), momentum 0.5 (not implemented here) and clips at
    # 5 (--svi-max-grad-norm), so add --svi-steps 20.
    "mnist": dict(latent=50, hidden=(200, 200), activation="tanh", likelihood="bernoulli",
                  batch_size=20, lr=1e-3, adam_eps=1e-4, lr_schedule="burda", flow_length=10,
                  steps=3280 * 60000 // 20, log_every=1000, save_every=20000),
    # Not from a paper: a small convolutional VAE with a discretized logistic decoder.
    "cifar10": dict(arch="conv", channels=(64, 128, 256), latent=128, activation="elu",
                    likelihood="logistic", batch_size=64, lr=3e-4, steps=200000,
                    log_every=500, save_every=10000),
    # Other image sets (fashion-mnist): an MLP with a discretized logistic decoder over 256 levels.
    "image": dict(latent=32, hidden=(512, 512)),
    # 2D point sets: a 2D latent so the latent manifold can be drawn. Free bits keep the second
    # latent alive (without: 1 active unit, 8gaussians NLL 3.43 nats; with: 2, 2.76; entropy 2.51).
    "points": dict(latent=2, hidden=(128, 128), likelihood="gaussian", batch_size=256, steps=5000,
                   free_bits=0.5, log_every=250, save_every=2500),
}


ARCH_PRESETS = {"hierarchical": {
    # Ours: a few minutes on one CPU core; 7 latent groups at 1, 2, 4, 8 (the default block strings).
    "digits": dict(arch="hierarchical", width=32, latent=4, likelihood="logistic", batch_size=64, lr=2e-3,
                   steps=3000, warmup=100, grad_clip=200.0, skip_threshold=400.0, adam_beta2=0.9,
                   ema_rate=0.999, log_every=100, save_every=1000),
    "digits-binary": dict(arch="hierarchical", width=32, latent=4, likelihood="bernoulli", batch_size=64, lr=2e-3,
                          steps=3000, warmup=100, grad_clip=200.0, skip_threshold=400.0, adam_beta2=0.9,
                          ema_rate=0.999, log_every=100, save_every=1000),
    # VD-VAE has no MNIST model: ours, a small one on Burda et al.'s binarised MNIST (NVAE's 78.01 nats).
    "mnist": dict(arch="hierarchical", width=128, latent=8, likelihood="bernoulli", batch_size=64, lr=5e-4,
                  enc_blocks="28x3,28d2,14x3,14d2,7x3,7d7,1x2", dec_blocks="1x1,7m1,7x2,14m7,14x3,28m14,28x3",
                  steps=200_000, warmup=100, grad_clip=200.0, skip_threshold=400.0, adam_beta2=0.9,
                  weight_decay=0.01, ema_rate=0.9999, log_every=1000, save_every=10000),
    # VD-VAE's CIFAR-10 model (openai/vdvae hps.py "cifar10" and its defaults): width
    # 384, zdim 16, bottleneck 1/4, these block strings, AdamW lr 2e-4, betas (0.9, 0.9), weight
    # decay 0.01, 100 warm-up steps, clip 200, skip 400, EMA 0.9999, 16 images per GPU (here the
    # whole batch). Ours: one discretized logistic, not a mixture of 10; the step count.
    "cifar10": dict(arch="hierarchical", width=384, latent=16, likelihood="logistic", batch_size=16, lr=2e-4,
                    enc_blocks="32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3",
                    dec_blocks="1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21",
                    steps=1_000_000, warmup=100, grad_clip=200.0, skip_threshold=400.0, adam_beta2=0.9,
                    weight_decay=0.01, ema_rate=0.9999, log_every=1000, save_every=10000),
    # Other 28x28 sets (fashion-mnist): the mnist network with the discretized logistic.
    "image": dict(arch="hierarchical", width=128, latent=8, likelihood="logistic", batch_size=64, lr=5e-4,
                  enc_blocks="28x3,28d2,14x3,14d2,7x3,7d7,1x2", dec_blocks="1x1,7m1,7x2,14m7,14x3,28m14,28x3",
                  steps=100_000, warmup=100, grad_clip=200.0, skip_threshold=400.0, adam_beta2=0.9,
                  ema_rate=0.999, log_every=1000, save_every=10000),
    # Ours, 2D points: 1x1 "images", three groups of 2D latent vectors, every layer linear (the MLP variant).
    "points": dict(arch="hierarchical", width=64, bottleneck=0.5, latent=2, likelihood="gaussian",
                   enc_blocks="1x3", dec_blocks="1x3", batch_size=256, lr=1e-3, steps=3000, warmup=100,
                   grad_clip=200.0, skip_threshold=400.0, adam_beta2=0.9, ema_rate=0.999,
                   log_every=250, save_every=2500),
}}


def check_config(cfg):
    """The flags' values that their types let through; what depends on the data (the likelihood
    against the kind of data, the image side against --channels) is checked in build."""
    for name in ("latent", "k", "k_eval", "k_density"):
        check_range(cfg, name, 1)
    for name in ("kl_warmup", "free_bits", "adam_eps"):
        check_range(cfg, name, 0)
    if any(h < 1 for h in (*cfg.hidden, *cfg.channels)):
        raise UserError("--hidden and --channels take positive widths, e.g. 256,256")
    if cfg.arch == "conv" and not cfg.channels:
        raise UserError("--arch conv needs at least one of --channels, e.g. 64,128,256")
    if cfg.posterior == "iaf" and not cfg.hidden:
        raise UserError("--posterior iaf builds its MADEs with the --hidden widths: give at least one, e.g. 256,256")
    check_range(cfg, "flow_length", 1)
    check_range(cfg, "svi_steps", 0)
    check_range(cfg, "svi_lr", 0, open_low=True)
    check_range(cfg, "svi_max_grad_norm", 0)
    check_hierarchical(cfg)
    if cfg.eval or cfg.sample:  # the checkpoint's own configuration decides the rest
        return
    if cfg.objective == "iwae" and (cfg.kl_warmup or cfg.free_bits):
        raise UserError(f"--kl-warmup {cfg.kl_warmup} and --free-bits {cfg.free_bits} act on the ELBO's KL "
                        "term; with --objective iwae set both to 0 (the 2D preset sets --free-bits 0.5: add "
                        "--free-bits 0)")
    if cfg.posterior != "gaussian" and cfg.free_bits:
        raise UserError(f"--free-bits {cfg.free_bits} clamps the closed-form KL per dimension of a Gaussian q; "
                        f"with --posterior {cfg.posterior} set --free-bits 0 (the 2D preset sets 0.5) and use --kl-warmup")
    if cfg.svi_steps and cfg.posterior != "gaussian":
        raise UserError(f"--svi-steps refines the Gaussian's (mu, logvar) (Kim et al. 2018); with --svi-steps "
                        f"{cfg.svi_steps} accepted: --posterior gaussian")
    if cfg.svi_steps and cfg.objective != "elbo":
        raise UserError("--svi-steps trains on the ELBO at the refined parameters (Kim et al. Alg. 1); "
                        "accepted with it: --objective elbo")
    if cfg.svi_steps and cfg.compile:
        raise UserError("--svi-steps differentiates through gradient steps inside the forward pass, which "
                        "torch.compile does not support; drop --compile")


HIERARCHICAL_FLAGS = ("width", "bottleneck", "enc_blocks", "dec_blocks", "residual_posterior", "grad_clip",
                      "skip_threshold", "warmup", "weight_decay", "adam_beta2", "ema_rate")


def check_hierarchical(cfg):
    """The --arch hierarchical flags: their ranges, the block strings' syntax (their fit to the
    data is checked in build), and the flags of the other systems that do not combine with it."""
    check_range(cfg, "width", 1)
    check_range(cfg, "bottleneck", 0, 1, open_low=True)
    for name in ("grad_clip", "skip_threshold", "warmup", "weight_decay"):
        check_range(cfg, name, 0)
    check_range(cfg, "ema_rate", 0, 1, open_high=True)
    check_range(cfg, "adam_beta2", 0, 1, open_high=True)
    if not cfg.temperature or any(not t >= 0 for t in cfg.temperature):
        raise UserError(f"--temperature {','.join(map(str, cfg.temperature))}: accepted: values >= 0, one for "
                        "every group or one per group, e.g. 1 or 1,1,0.8")
    for name, kind in (("enc_blocks", "encoder"), ("dec_blocks", "decoder")):
        try:
            parse_blocks(getattr(cfg, name), kind)
        except ValueError as e:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: {e}; accepted: e.g. "
                            f"{Config.enc_blocks if kind == 'encoder' else Config.dec_blocks}") from None
    if cfg.eval or cfg.sample:
        return
    if cfg.arch != "hierarchical":
        changed = [f"--{n.replace('_', '-')}" for n in HIERARCHICAL_FLAGS if getattr(cfg, n) != getattr(Config, n)]
        if changed:
            raise UserError(f"{' '.join(changed)} configure the hierarchical VAE; accepted with them: --arch "
                            "hierarchical")
        return
    others = [f for f, on in (("--posterior " + cfg.posterior, cfg.posterior != "gaussian"),
                              (f"--svi-steps {cfg.svi_steps}", cfg.svi_steps > 0),
                              ("--objective iwae", cfg.objective != "elbo"), (f"--k {cfg.k}", cfg.k != 1),
                              (f"--free-bits {cfg.free_bits}", cfg.free_bits > 0),
                              (f"--kl-warmup {cfg.kl_warmup}", cfg.kl_warmup > 0),
                              ("--lr-schedule burda", cfg.lr_schedule != "constant")) if on]
    if others:
        raise UserError(f"--arch hierarchical trains on its ELBO with a Gaussian q per group; {' '.join(others)} "
                        "belong to the one-layer VAE (accepted: their defaults; --residual-posterior for NVAE's q)")


# ----------------------------------------------------------------------------------------
# Data and pictures
# ----------------------------------------------------------------------------------------

EVAL_BINARIZATION_SEED = 0  # the one fixed binarisation of a test set (see the module docstring)
DIAGNOSTIC_BATCH = 512      # examples of the fixed batch used for KL per dimension and active units


def likelihood_name(cfg, info):
    """The decoder likelihood `--likelihood auto` stands for: gaussian for 2D points, bernoulli
    for two-level images, the discretized logistic for other images."""
    if cfg.likelihood != "auto":
        return cfg.likelihood
    if info.kind == "points":
        return "gaussian"
    return "bernoulli" if info.levels == 2 else "logistic"


def make_likelihood(name, info):
    """The likelihood object; it scores levels 0..L-1 of the image (2 after binarisation)."""
    if name == "gaussian":
        return Gaussian()
    if name == "bernoulli":
        return Bernoulli()
    return Categorical(info.levels) if name == "categorical" else DiscretizedLogistic(info.levels)


def prepare(x, info, likelihood, generator=None):
    """Data as the likelihood scores it. Images scored by a Bernoulli with more than two levels are
    binarised, x ~ Bernoulli(level / (L - 1)): afresh for every training batch (as Burda et al. do),
    with a seeded CPU `generator` for the one fixed binarisation of an evaluation set."""
    if isinstance(likelihood, Bernoulli):
        p = x.float() / (info.levels - 1)
        return torch.bernoulli(p, generator=generator) if info.levels > 2 else p
    return x


def as_image(x, net):
    """Images in the likelihood's level units -> floats in [0, 1] for save_image_grid."""
    return x.float().cpu() / (net.likelihood.levels - 1)


def save_samples(net, path, info, n=64, seed=0):
    """Prior samples: decoder means E[x|z], z ~ N(0, I), for images (the customary picture; pixels
    drawn independently from p(x|z) look like noise); drawn points for 2D sets."""
    g = torch.Generator(device=net.ref.device).manual_seed(seed)  # never the training stream
    if info.kind == "points":
        save_scatter(sample(net, max(n, 2000), generator=g).cpu(), path, lim=info.lim, title="VAE samples")
    else:
        save_image_grid(as_image(sample(net, n, mean=True, generator=g), net), path)


def _rows(numbers):
    return ("row " if len(numbers) == 1 else "rows ") + ", ".join(map(str, numbers))


def save_final_pictures(net, out, info, x):
    """recon.png (inputs above their reconstructions), interp.png (latent interpolations, one pair a
    row) and, with a 2D latent, latent.png: the decoder over a grid of prior quantiles (images, as in
    Kingma & Welling Fig. 4) or the posterior means of the data and the decoded latent grid (points)."""
    if info.kind == "image":
        per = min(8, len(x))
        rows = []
        for inputs in x[:per * min(4, len(x) // per)].split(per):  # whole rows only
            rows += [as_image(inputs, net), as_image(reconstruct(net, inputs), net)]
        pairs = len(rows) // 2
        save_image_grid(torch.cat(rows), out / "recon.png", nrow=per,
                        title=f"{_rows(range(1, 2 * pairs, 2))}: inputs; {_rows(range(2, 2 * pairs + 1, 2))}: "
                              "their reconstructions (decoder mean at the posterior mean)")
        pairs = min(8, len(x) // 2)
        if pairs:
            path = interpolate(net, x[:pairs], x[pairs:2 * pairs], steps=10)
            save_image_grid(as_image(path.flatten(0, 1), net), out / "interp.png", nrow=10,
                            title="each row: decoder means along the line between the posterior means of "
                                  "two inputs")
    if net.latent_dim != 2:
        return
    # Quantiles of N(0, 1) at evenly spaced probabilities, so every cell holds equal prior mass.
    q = torch.erfinv(2 * torch.linspace(0.05, 0.95, 15) - 1) * math.sqrt(2)
    zz = torch.stack(torch.meshgrid(q.flip(0), q, indexing="ij"), -1).view(-1, 2).to(net.ref)
    with torch.inference_mode():
        grid = net.likelihood.mean(net.decode(zz))
    if info.kind == "image":
        save_image_grid(as_image(grid, net), out / "latent.png", nrow=15,
                        title="decoder means over a grid of prior quantiles: z_1 falls down the rows, "
                              "z_2 rises across the columns")
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with torch.inference_mode():
        mu = net.posterior_point(x).cpu()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].scatter(mu[:, 0], mu[:, 1], s=1, alpha=0.4)
    axes[0].set_title("posterior means E_q[z] of the data" if net.flow is None else "flow(mu(x)) of the data")
    g = grid.cpu().view(15, 15, 2)
    for lines in (g, g.transpose(0, 1)):
        for line in lines:
            axes[1].plot(line[:, 0], line[:, 1], lw=0.6, color="C1")
    axes[1].set_title("decoder mean over a latent quantile grid")
    axes[0].set(xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), xlabel="z1", ylabel="z2")
    axes[1].set(xlim=(-info.lim, info.lim), ylim=(-info.lim, info.lim), xlabel="x1", ylabel="x2")
    for ax in axes:
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(out / "latent.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# Run code
# ----------------------------------------------------------------------------------------

MODEL = "vae"


def build(cfg, info):
    """The VAE for a configuration and the data's description: the likelihood that fits the data,
    an MLP or convolutional encoder and decoder."""
    name = likelihood_name(cfg, info)
    if (info.kind == "points") != (name == "gaussian"):
        raise UserError(f"--likelihood {name} does not fit {info.kind} data; accepted: gaussian for 2D points, "
                        "bernoulli, categorical or logistic for images")
    likelihood = make_likelihood(name, info)
    in_scale = 1.0 if likelihood.levels is None else 1.0 / (likelihood.levels - 1)
    if cfg.arch == "hierarchical":
        try:
            return HierarchicalVAE(info.shape, likelihood, cfg.width, cfg.enc_blocks, cfg.dec_blocks, cfg.latent,
                                   cfg.bottleneck, cfg.residual_posterior, in_scale, centre=info.kind == "image")
        except ValueError as e:
            raise UserError(f"--enc-blocks {cfg.enc_blocks} --dec-blocks {cfg.dec_blocks} do not fit {info.name} "
                            f"(shape {list(info.shape)}; points count as 1x1): {e}") from None
    flow = make_flow(cfg)
    extra = 0 if flow is None else flow.n_context
    if cfg.arch == "conv":
        s = 2 ** len(cfg.channels)
        if info.kind != "image" or info.shape[1] % s or info.shape[2] % s:
            raise UserError(f"--arch conv needs images whose height and width divide by 2^len(channels) = {s} "
                            f"(got shape {list(info.shape)}); use --arch mlp or fewer --channels")
        enc = ConvEncoder(info.shape, cfg.channels, cfg.latent, cfg.activation, in_scale, extra)
        dec = ConvDecoder(info.shape, cfg.channels, cfg.latent, likelihood.n_params, cfg.activation)
    else:
        enc = MLPEncoder(info.dims, cfg.hidden, cfg.latent, cfg.activation, in_scale, extra)
        dec = MLPDecoder(cfg.latent, cfg.hidden, info.shape, likelihood.n_params, cfg.activation)
    return VAE(enc, dec, likelihood, cfg.latent, flow, cfg.svi_steps, cfg.svi_lr, cfg.svi_max_grad_norm)


def make_flow(cfg):
    """The posterior's flow for --posterior (None for gaussian); IAF's MADEs have the MLP's widths
    and a context h of the last width (our choice)."""
    if cfg.posterior == "planar":
        return PlanarFlow(cfg.latent, cfg.flow_length)
    if cfg.posterior == "radial":
        return RadialFlow(cfg.latent, cfg.flow_length)
    if cfg.posterior == "iaf":
        return IAF(cfg.latent, cfg.flow_length, cfg.hidden, cfg.hidden[-1])
    return None


def train(cfg):
    """Adam on the negative ELBO (Kingma & Welling Eq. 10; Rezende & Mohamed Eq. 15 with a flow;
    at the refined lambda_K with SA-VAE, Kim et al. Alg. 1) or the IWAE objective (Burda et al.
    Eq. 8), with KL warm-up and free bits; --arch hierarchical: AdamW on its ELBO per dimension with
    learning-rate warm-up, gradient clipping and skipping and an EMA of the weights (VD-VAE); under
    torchrun every process trains on its slice of the global batch (DDP)."""
    with Training(cfg, MODEL) as run:
        ds = load_dataset(cfg.dataset, "train", cfg.data_dir)
        info = ds.info
        seed_everything(cfg.seed)  # the same initial weights on every process
        net = build(cfg, info).to(run.device)
        batches = Batches(ds, cfg.batch_size, run.dist, seed=cfg.seed)
        hier, parts = cfg.arch == "hierarchical", {}
        if hier:  # VD-VAE's optimiser and stabilisers (Child 2021; openai/vdvae hps.py)
            opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2), eps=cfg.adam_eps,
                                    weight_decay=cfg.weight_decay)
            parts = dict(skips=GradientSkipping(cfg.grad_clip, cfg.skip_threshold))
            if cfg.ema_rate:
                parts["ema"] = EMA(net, cfg.ema_rate)
        else:
            opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
        step = run.start(info, model=net, opt=opt, batches=batches, **parts)
        model = wrap_ddp(net, run.dist, cfg.compile)
        shown = parts["ema"].model if "ema" in parts else net  # the weights --eval and --sample use
        # A fixed batch for the diagnostics and the final pictures, binarised once with a fixed seed.
        fixed = prepare(ds.data[:DIAGNOSTIC_BATCH], info, net.likelihood,
                        torch.Generator().manual_seed(EVAL_BINARIZATION_SEED)).to(run.device)
        bound = "iwae_bound" if cfg.objective == "iwae" else "elbo"

        def samples(step):
            save_samples(shown, run.out / f"samples_{step}.png", info, cfg.n_samples, cfg.seed)

        for step in run.steps(step, samples):
            x = prepare(next(batches)[0], info, net.likelihood)
            lr = burda_lr(step, len(ds.data) / cfg.batch_size, cfg.lr) if cfg.lr_schedule == "burda" else cfg.lr
            lr = lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else lr
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                if hier:
                    loss, stats = hierarchical_loss(model, x)
                else:
                    loss, stats = training_loss(model, x, cfg.objective, cfg.k, kl_weight(step, cfg.kl_warmup),
                                                cfg.free_bits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if hier:
                stats.update(parts["skips"].step(net.parameters(), opt))
                if "ema" in parts and not stats["skipped"]:
                    parts["ema"].update(net)
            else:
                opt.step()
            if info.kind == "image":  # the training bound (ELBO or L_k) in bits/dim
                stats["bound_bits_per_dim"] = bits_per_dim(-stats[bound], info.dims)
            run.log(loss=loss.detach(), **stats)
            if run.dist.is_main and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
                run.logger.event("diagnostics", at_step=step + 1,
                                 **(hierarchical_diagnostics(shown, fixed) if hier else diagnostics(net, fixed)))
                if hier:
                    run.logger.event("skipped", at_step=step + 1, total=parts["skips"].skipped)
        if not hier:
            run.draw(save_final_pictures, net, run.out, info, fixed)
    run.report(["ckpt.pt", f"samples_{run.step}.png", "recon.png", "interp.png", "latent.png", "metrics.jsonl",
                "loss.png"])


def evaluate(cfg):
    """--eval CKPT: test-set ELBO and IWAE-k (nll = -L_k, Burda et al. Sec. 5, with q_K for a flow)
    in nats and bits/dim; with SA-VAE the ELBO at lambda_K (svi_elbo, also the proposal of L_k)
    and the amortization gap svi_elbo - elbo; on a 2D set also density.npz (log p(x) estimated by
    L_{k_density} on a grid) and density.png."""
    net, saved, info = load(cfg.eval, get_device(cfg.device))
    if cfg.fid is not None:  # decoder means E[x|z], as the pictures show them
        return fid_evaluate(cfg, info, lambda n, g: as_image(sample(net, n, mean=True, generator=g), net))
    out = output_dir(cfg, cfg.eval)
    ds = load_dataset(info.name, "test", cfg.data_dir)
    x = prepare(ds.data, info, net.likelihood, torch.Generator().manual_seed(EVAL_BINARIZATION_SEED))
    x = x.to(net.ref.device)
    torch.manual_seed(cfg.seed)
    hier = saved.arch == "hierarchical"
    rows = 2 ** 16 if saved.arch == "mlp" or (hier and info.kind == "points") else 2 ** 9
    t0 = time.perf_counter()
    with torch.no_grad():  # not inference_mode: SA-VAE's steps take gradients (svi_refine)
        if hier:
            elbos, bounds, group_kl = hierarchical_dataset_bounds(net, x, cfg.k_eval, rows)
        else:
            elbos, bounds = dataset_bounds(net, x, cfg.k_eval, rows)
        if saved.svi_steps:
            refined = elbos
            amortized = functools.partial(net, svi_steps=0)  # the encoder's lambda_0
            elbos = torch.cat([elbo(amortized, xb).double().cpu() for xb in x.split(max(1, rows // 64))])
    n = len(bounds)
    fields = {"dataset": info.name, "k": cfg.k_eval, "n": n,
              "nll": -bounds.mean().item(), "nll_se": bounds.std().item() / math.sqrt(n),
              "elbo": elbos.mean().item(), "elbo_se": elbos.std().item() / math.sqrt(n)}
    if hier:
        fields["kl_per_group"] = group_kl.mean(0).tolist()
    if saved.svi_steps:
        gap = refined - elbos
        fields.update(svi_elbo=refined.mean().item(), svi_elbo_se=refined.std().item() / math.sqrt(n),
                      amortization_gap=gap.mean().item(), amortization_gap_se=gap.std().item() / math.sqrt(n))
    if info.kind == "image":
        fields["bits_per_dim"] = bits_per_dim(fields["nll"], info.dims)
        fields["elbo_bits_per_dim"] = bits_per_dim(-fields["elbo"], info.dims)
    else:
        if ds.log_prob is not None:
            fields["true_entropy"], fields["true_entropy_se"] = entropy_estimate(info.name)
        log_density = (torch.no_grad()(lambda pts: hierarchical_iwae(net, pts.to(net.ref), cfg.k_density))
                       if hier else iwae_log_density(net, cfg.k_density, rows))
        grid = density_on_grid(log_density, info.lim, n=128,
                               chunk=max(1, rows // cfg.k_density))
        np.savez(out / "density.npz", log_density=grid, lim=info.lim)
        truth = density_on_grid(ds.log_prob, info.lim) if ds.log_prob else ds.data
        # Importance weights are heavy-tailed: one lucky draw can lift a grid point far above its
        # neighbours and black out a linear colour scale, so the picture (not the .npz) is clipped.
        shown = np.minimum(grid, np.percentile(grid, 99.9))
        save_density({"true" if ds.log_prob else "test data": truth,
                      f"VAE, IWAE-{cfg.k_density} (clipped)": shown}, out / "density.png", info.lim)
    fields["seconds"] = time.perf_counter() - t0
    Logger(out, 0).event("eval", split="test", **fields)
    report_files(out, ["metrics.jsonl", "density.npz", "density.png"])
    return fields


def draw_samples(cfg):
    """--sample CKPT: n_samples prior samples (decoder means for images) to samples.png and
    samples.pt (images in [0, 1] or points, for benchmarks/quality.py), timed."""
    net, saved, info = load(cfg.sample, get_device(cfg.device))
    out = output_dir(cfg, cfg.sample)
    g = torch.Generator(device=net.ref.device).manual_seed(cfg.seed)
    t0 = time.perf_counter()
    if saved.arch == "hierarchical":
        if len(cfg.temperature) not in (1, net.n_groups):
            raise UserError(f"--temperature takes 1 value or {net.n_groups}, one per group of {cfg.sample}; got "
                            f"{len(cfg.temperature)}")
        x = sample_top_down(net, cfg.n_samples, cfg.temperature, mean=info.kind == "image", generator=g)
    elif cfg.temperature != Config.temperature:
        raise UserError(f"--temperature scales the prior of each group of --arch hierarchical; {cfg.sample} is "
                        f"--arch {saved.arch}")
    else:
        x = sample(net, cfg.n_samples, mean=info.kind == "image", generator=g)
    seconds = time.perf_counter() - t0
    if info.kind == "points":
        save_scatter(x.cpu(), out / "samples.png", lim=info.lim, title="VAE samples")
    else:
        x = as_image(x, net)
        save_image_grid(x, out / "samples.png")
    torch.save(x.cpu(), out / "samples.pt")
    Logger(out, 0).event("sample", n=cfg.n_samples, seconds=seconds, samples_per_s=cfg.n_samples / max(seconds, 1e-9))
    report_files(out, ["samples.png", "samples.pt", "metrics.jsonl"])
    return x


def load(path, device="cpu"):
    """(VAE in evaluation mode on `device`, its training Config, its data's description) from a
    checkpoint of vae.py."""
    ckpt = load_checkpoint(path, MODEL)
    cfg, info = saved_config(Config, ckpt)
    net = build(cfg, info)
    load_weights(net, ckpt["ema"]["model"] if "ema" in ckpt else ckpt["model"], path)
    return net.to(device).eval(), cfg, info


def main(argv=None):
    """Train (default), or --eval CKPT, or --sample CKPT; a user's mistake exits with one line."""
    with user_errors():
        cfg = parse_config(Config, PRESETS, argv, doc=__doc__, kinds=("image", "points"), arch_presets=ARCH_PRESETS)
        check_config(cfg)
        return dispatch(cfg, train, evaluate, draw_samples)


if __name__ == "__main__":
    main()
