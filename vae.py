"""Variational autoencoders: the ELBO, the reparameterisation trick and the IWAE bound.

Papers
- Kingma & Welling 2013, Auto-Encoding Variational Bayes, arXiv 1312.6114 (the VAE, the
  reparameterisation trick, the SGVB estimators of the ELBO).
- Burda, Grosse & Salakhutdinov 2016, Importance Weighted Autoencoders, arXiv 1509.00519 (the
  k-sample bound L_k, the IWAE objective, the NLL estimate L_5000, active units).
- Bowman et al. 2016, Generating Sentences from a Continuous Space, arXiv 1511.06349 (KL cost
  annealing, here `--kl-warmup`) and Kingma et al. 2016, Improved Variational Inference with
  Inverse Autoregressive Flow, arXiv 1606.04934 (free bits, `--free-bits`): two remedies for
  posterior collapse.
- Salimans et al. 2017, PixelCNN++, arXiv 1701.05517 (the discretized logistic likelihood, one
  mixture component here).

What is implemented: a VAE with a diagonal-Gaussian encoder q(z|x), a standard-normal prior and a
choice of decoder likelihoods p(x|z) (Bernoulli, diagonal Gaussian, categorical over the grey
levels, discretized logistic); the ELBO with the KL term in closed form; the IWAE bound L_k in
chunks with log-sum-exp so k = 5000 fits in memory; the IWAE training objective; KL warm-up and
free bits; the active-unit diagnostic. Not implemented: the two-stochastic-layer model of Burda
et al., flows in the posterior (IAF), mixtures in the discretized logistic.

Data and likelihoods (what "bits/dim" means here). Images arrive as integer levels 0..L-1.
- digits (L = 17): a discretized logistic over the 17 levels per pixel (`--likelihood categorical`
  gives a softmax over them instead; it overfits the 1497 training images sooner), so log p(x)
  is the log-probability of the discrete image and bits/dim = -log2 p(x) / 64 (log2 17 = 4.09
  for a uniform guess).
- digits-binary and mnist: Bernoulli (the mnist preset sets `--likelihood bernoulli`). mnist is
  binarised dynamically, a fresh draw x ~ Bernoulli(intensity / 255) for every training batch (as
  Burda et al. 2016); the test set is binarised once with a fixed seed (`EVAL_BINARIZATION_SEED`),
  so evaluations are comparable.
- cifar10 (and other 256-level images): a convolutional network with a discretized logistic
  decoder, bits/dim = -log2 p(x) / (3 * 32 * 32).
- 2D point sets: a Gaussian decoder and a 2D latent; the NLL is a density, in nats (continuous).

Reference numbers (Burda et al. 2016, Table 1, MNIST test NLL in nats = -L_5000, one stochastic
layer, 784-200-200-50 tanh, Bernoulli output, k training samples = 1 / 5 / 50):
VAE 86.76 / 86.47 / 86.35, IWAE 86.76 / 85.54 / 84.78. `--dataset mnist` builds that architecture
and optimiser (Adam beta = (0.9, 0.999), eps 1e-4, batch 20, lr 1e-3 * 10^(-i/7) over stages of 3^i
passes, 3280 passes); `--objective iwae --k 50` gives the IWAE row.

Run it
    python vae.py                                   # digits, about a minute on one CPU core
    python vae.py --eval runs/vae-digits/ckpt.pt    # test ELBO and IWAE-5000 in nats and bits/dim
    python vae.py --sample runs/vae-digits/ckpt.pt --n-samples 64
    python vae.py --dataset 8gaussians              # 2D data, 2D latent, latent.png

Paper -> code
    Kingma & Welling Appendix B (closed-form -KL)            gaussian_kl, gaussian_kl_per_dim
    Kingma & Welling Sec. 2.4 (reparameterisation)           reparameterize
    Kingma & Welling Appendix C.1 / C.2 (decoders)           bernoulli, gaussian (Bernoulli, Gaussian)
    Salimans et al. 2017 Eq. 2 (discretized logistic)        discretized_logistic (DiscretizedLogistic)
    encode, sample z ~ q(z|x), decode, score log p(x|z)      VAE.forward
    Kingma & Welling Eq. 3 / Eq. 10 (ELBO, Gaussian case)    elbo
    Kingma & Welling Eq. 6 (SGVB estimator A)                elbo(analytic_kl=False), log_weights
    Burda et al. Eq. 8 (L_k, weights w_i), Theorem 1         log_weights, iwae_bound, nll,
                                                              dataset_bounds, iwae_log_density
    Bowman et al. 2016 (KL cost annealing)                   kl_weight
    Kingma et al. 2016 (free bits)                           free_bits_kl
    the training objectives (-ELBO with both, or -L_k)       training_loss
    Burda et al. Sec. 5.2 (active units)                     active_units, diagnostics
    Burda et al. Sec. 5.1 (optimisation schedule)            burda_lr
    Burda et al. (dynamic binarisation of MNIST)             prepare
    ancestral sampling x ~ p(x|z) p(z); the latent space     sample; reconstruct, interpolate
    Kingma & Welling Fig. 4 (learned manifold)               save_final_pictures (latent.png)
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Batches, Logger, RunConfig, StopSignal, UserError, check_finite, check_range,
                    density_on_grid, dispatch, entropy_estimate, flag, get_device, init_distributed,
                    load_checkpoint, load_dataset, load_weights, open_run, output_dir, parse_config,
                    report_files, resume, save_density, save_image_grid, save_scatter, save_training,
                    saved_config, seed_everything, user_errors, wrap_ddp)


# ----------------------------------------------------------------------------------------
# The Gaussian posterior and prior: closed-form KL, reparameterisation
# ----------------------------------------------------------------------------------------

def gaussian_kl(mu, logvar):
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per example, summed over latent dimensions.

    Kingma & Welling 2013, Appendix B: -KL = 1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2).
    mu, logvar: (..., D) -> (...). `gaussian_kl_per_dim` keeps the last axis.
    """
    return gaussian_kl_per_dim(mu, logvar).sum(-1)


def gaussian_kl_per_dim(mu, logvar):
    """The terms of `gaussian_kl` for each latent dimension, (..., D) (Kingma & Welling App. B).

    sigma^2 - 1 is computed as expm1(logvar): exp(logvar) - 1 - logvar would round below zero
    for logvar near 0, where the KL is of order logvar^2.
    """
    return 0.5 * (mu.pow(2) + torch.expm1(logvar) - logvar)


def reparameterize(mu, logvar, k=1, generator=None):
    """k samples z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling Sec. 2.4, Eq. 10).

    mu, logvar: (B, D) -> z: (k, B, D), differentiable in mu and logvar.
    """
    eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + (0.5 * logvar).exp() * eps


def log_normal(z, mu, logvar):
    """log N(z; mu, diag exp(logvar)) summed over the last axis; broadcasts over leading axes."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * (-logvar).exp()).sum(-1)


# ----------------------------------------------------------------------------------------
# Decoder likelihoods: each is the normalised log p(x | params) of a whole example, in nats
# ----------------------------------------------------------------------------------------

def bernoulli(x, logits):
    """log p(x) = sum_i x_i log s_i + (1 - x_i) log(1 - s_i), s = sigmoid(logits), x in {0, 1}.

    Kingma & Welling Appendix C.1. x, logits: (B, *shape) -> (B,).
    """
    return (x * logits - F.softplus(logits)).flatten(1).sum(1)


def gaussian(x, mean, logvar):
    """log N(x; mean, diag exp(logvar)) per example (Kingma & Welling Appendix C.2). -> (B,)."""
    return log_normal(x.flatten(1), mean.flatten(1), logvar.flatten(1))


def categorical(x, logits):
    """log p(x) = sum_i log softmax(logits_i)[x_i]: one categorical over the L levels per pixel.

    x: (B, *shape) integer levels 0..L-1; logits: (B, L, *shape) -> (B,).
    """
    logp = F.log_softmax(logits, dim=1).gather(1, x.long().unsqueeze(1)).squeeze(1)
    return logp.flatten(1).sum(1)


LOG_SCALE_MIN = -7.0  # as in PixelCNN++: keeps the bins of a collapsed logistic finite


def discretized_logistic(x, mean, log_scale, levels):
    """log P(x) with P(x = l) = sigmoid((c_l + d - mean) / s) - sigmoid((c_l - d - mean) / s).

    Salimans et al. 2017, Eq. 2 with one mixture component: level l of L sits at
    c_l = 2l / (L - 1) - 1 in [-1, 1], bins have half-width d = 1 / (L - 1), and the first and last
    bins extend to -inf and +inf so the L probabilities sum to 1. The interior difference is
    computed exactly as sigmoid(a) (1 - sigmoid(b)) (1 - exp(b - a)), a sum of three logs that
    cannot cancel, with log(1 - e^-w) taken by expm1 or by log1p, whichever is exact there
    (Maechler 2012), so every bin is accurate in relative terms: against mpmath the worst errors
    measured are 3e-5 in float32 and 1.2e-13 in float64 (tested to 1e-4 and 1e-12). Each bin
    edge (2l +- 1 - (L - 1)) / (L - 1) is one rounding from exact, so a mean at an edge keeps
    its digits. x: (B, *shape) levels; mean, log_scale: (B, *shape) in the [-1, 1] units -> (B,).
    """
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
# log_lik)` (VAE.forward): the posterior's parameters (B, D), k reparameterised samples z
# (k, B, D) and log p(x | z) (k, B). Training passes the DistributedDataParallel wrapper, so
# its gradient hooks fire; tests pass VAEs built from exact oracles.

def log_weights(mu, logvar, z, log_lik):
    """log w = log p(x|z) + log p(z) - log q(z|x), (k, B): the importance weights of Burda et al.
    Eq. 8, from the outputs of one pass of the model, `log_weights(*model(x, k))`."""
    log_prior = log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
    return log_lik + log_prior - log_normal(z, mu, logvar)


def elbo(model, x, k=1, analytic_kl=True, generator=None):
    """The evidence lower bound L(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)), per example (B,).

    Kingma & Welling Eq. 3 estimated as in Eq. 10 (estimator B, Eq. 7): the expectation by the
    mean of k reparameterised samples, the KL in closed form (Appendix B). With analytic_kl=False
    it is estimator A (Eq. 6), mean_l [log p(x, z_l) - log q(z_l|x)], which equals the IWAE bound
    with k = 1 sample for sample.
    """
    mu, logvar, z, log_lik = model(x, k, generator)
    if analytic_kl:
        return log_lik.mean(0) - gaussian_kl(mu, logvar)
    return log_weights(mu, logvar, z, log_lik).mean(0)


def iwae_bound(model, x, k, chunk=None, generator=None):
    """L_k(x) = log (1/k) sum_i w_i, z_i ~ q(z|x) i.i.d. (Burda et al. 2016, Eq. 8), per example (B,).

    L_1 is the ELBO, L_k <= L_{k+1} <= log p(x) and L_k -> log p(x) (Burda et al. Theorem 1).
    The k samples are drawn in chunks of `chunk` (all at once when None), one pass of the model
    each: each chunk is reduced to its log-sum-exp, and the log-sum-exp of those is exact, so
    memory grows with the chunk, not with k. Differentiable (the IWAE objective is its negation
    with k training samples).
    """
    chunk = k if chunk is None else chunk
    partial = [torch.logsumexp(log_weights(*model(x, min(chunk, k - start), generator)), dim=0)
               for start in range(0, k, chunk)]
    return torch.logsumexp(torch.stack(partial), dim=0) - math.log(k)


def nll(model, x, k=5000, chunk=None, generator=None):
    """-L_k(x) in nats per example, the NLL estimate of Burda et al. Sec. 5 (k = 5000)."""
    return -iwae_bound(model, x, k, chunk, generator)


def free_bits_kl(kl_dims, free_bits=0.0):
    """sum_j max(lambda, E_x[KL_j]): the KL term with free bits (Kingma et al. 2016, App. "free bits").

    Each latent dimension j is its own group; the batch mean of its KL below lambda nats is not
    penalised, so the encoder keeps using it. lambda = 0 gives the plain KL. kl_dims: (B, D) -> ().
    """
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
    free_bits > 0). objective "iwae": -L_k (Burda et al. Eq. 8, trained with k samples).
    Returns (loss, {"elbo" or "iwae_bound": the batch mean of the bound, "kl": the mean KL}).
    """
    mu, logvar, z, log_lik = model(x, k)
    kl_dims = gaussian_kl_per_dim(mu, logvar)             # (B, D)
    kl = kl_dims.sum(1).mean()
    if objective == "iwae":
        bound = (torch.logsumexp(log_weights(mu, logvar, z, log_lik), dim=0) - math.log(k)).mean()
        return -bound, {"iwae_bound": bound.detach(), "kl": kl.detach()}
    if objective != "elbo":
        raise ValueError(f"objective {objective!r}: 'elbo' or 'iwae'")
    rec = log_lik.mean()
    loss = -(rec - kl_scale * free_bits_kl(kl_dims, free_bits))
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
    """Nats per example -> bits per dimension: nats / (dims * ln 2).

    For discrete images (levels 0..L-1) log p(x) is the log-probability of the discrete image, so
    this is the usual bits/dim with no dequantisation offset to add.
    """
    return nats / (dims * math.log(2))


# ----------------------------------------------------------------------------------------
# Sampling and the latent space
# ----------------------------------------------------------------------------------------

@torch.inference_mode()
def sample(net, n, mean=False, generator=None):
    """x ~ p(x|z), z ~ N(0, I): n samples (n, *shape) from a VAE; mean=True returns E[x|z] instead."""
    z = torch.randn(n, net.latent_dim, generator=generator, device=net.ref.device, dtype=net.ref.dtype)
    out = net.decode(z)
    return net.likelihood.mean(out) if mean else net.likelihood.sample(out, generator)


@torch.inference_mode()
def reconstruct(net, x):
    """E[x | z = mu(x)]: the decoder's mean at the posterior mean, (B, *shape)."""
    return net.likelihood.mean(net.decode(net.posterior(x)[0]))


@torch.inference_mode()
def interpolate(net, x1, x2, steps=8):
    """Decoder means along the line between the posterior means of x1 and x2: (B, steps, *shape)."""
    mu1, mu2 = net.posterior(x1)[0], net.posterior(x2)[0]
    t = torch.linspace(0, 1, steps, device=mu1.device, dtype=mu1.dtype).view(1, steps, 1)
    z = (1 - t) * mu1.unsqueeze(1) + t * mu2.unsqueeze(1)            # (B, steps, D)
    means = net.likelihood.mean(net.decode(z.flatten(0, 1)))
    return means.view(mu1.shape[0], steps, *means.shape[1:])


# ----------------------------------------------------------------------------------------
# Posterior collapse: active units (Burda et al. Sec. 5.2)
# ----------------------------------------------------------------------------------------

def active_units(mu, threshold=0.01):
    """A_u = Cov_x(E_q(u|x)[u]) > threshold per latent dimension (Burda et al. 2016, Sec. 5.2).

    mu: (N, D) posterior means of a fixed set of examples. Returns (count, variances (D,)).
    """
    var = mu.double().var(0, unbiased=False)
    return int((var > threshold).sum()), var


@torch.no_grad()
def diagnostics(net, x):
    """KL per latent dimension (mean over the fixed batch x, nats) and the active units
    (Burda et al. Sec. 5.2), the signs of posterior collapse."""
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


class MLPEncoder(nn.Module):
    """q(z|x) = N(mu(x), diag exp(logvar(x))) (Kingma & Welling Appendix C.2).

    x (B, *shape) -> (mu, logvar), each (B, latent). `in_scale` maps the data's levels to [0, 1].
    """

    def __init__(self, in_dim, hidden, latent, activation="relu", in_scale=1.0):
        super().__init__()
        self.in_scale = in_scale
        self.net = _mlp([in_dim, *hidden, 2 * latent], activation)

    def forward(self, x):
        h = self.net(x.flatten(1).to(self.net[0].weight.dtype) * self.in_scale)
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar


class MLPDecoder(nn.Module):
    """z (B, latent) -> the likelihood's parameters (B, n_params, *shape) (Kingma & Welling App. C)."""

    def __init__(self, latent, hidden, shape, n_params, activation="relu"):
        super().__init__()
        self.shape, self.n_params = tuple(shape), n_params
        self.net = _mlp([latent, *hidden, n_params * math.prod(self.shape)], activation)

    def forward(self, z):
        return self.net(z).view(z.shape[0], self.n_params, *self.shape)


class ConvEncoder(nn.Module):
    """Stride-2 4x4 convolutions, then a linear layer to (mu, logvar); x (B, C, H, W)."""

    def __init__(self, shape, channels, latent, activation="elu", in_scale=1.0):
        super().__init__()
        c, h, w = shape
        s = 2 ** len(channels)
        if h % s or w % s:
            raise ValueError(f"{len(channels)} stride-2 layers need a height and width divisible by {s}; got {h}x{w}")
        self.in_scale = in_scale
        layers = []
        for c_out in channels:
            layers += [nn.Conv2d(c, c_out, 4, stride=2, padding=1), _ACTIVATIONS[activation]()]
            c = c_out
        self.conv = nn.Sequential(*layers)
        self.head = nn.Linear(c * (h // s) * (w // s), 2 * latent)

    def forward(self, x):
        # Centre the input on [-1, 1] as convolutions without a normalisation layer prefer.
        h = self.conv(x.to(self.head.weight.dtype) * (2 * self.in_scale) - 1)
        return self.head(h.flatten(1)).chunk(2, dim=1)


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
    """A VAE from any encoder x -> (mu, logvar), decoder z -> the likelihood's parameters, and
    likelihood p(x | params); the prior is p(z) = N(0, I) of dimension `latent_dim`.

    `forward(x, k)` is one pass of the model, what every bound is made of: encode x, draw k
    reparameterised latents per example from q(z|x), decode them and score x under p(x|z).
    `encoder` and `decoder` may be modules or plain callables (tests pass exact oracles).
    """

    def __init__(self, encoder, decoder, likelihood, latent_dim):
        super().__init__()
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.latent_dim = latent_dim
        # A zero that follows .to(device, dtype): where prior samples are drawn, even for a VAE
        # built from parameter-free oracles.
        self.register_buffer("ref", torch.zeros(()), persistent=False)

    def posterior(self, x):
        """(mu, logvar) of q(z|x), each (B, D), in at least float32."""
        mu, logvar = self.encoder(x)
        return _full(mu), _full(logvar)

    def decode(self, z):
        """The likelihood's parameters for latents z (N, D), in at least float32."""
        return _full(self.decoder(z))

    def log_likelihood(self, x, z):
        """log p(x | z) for z (k, B, D) -> (k, B); the decoder sees all k * B latents at once."""
        k, b = z.shape[:2]
        out = self.decode(z.reshape(k * b, -1))
        xs = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])
        return self.likelihood.log_prob(xs, out).view(k, b)

    def forward(self, x, k=1, generator=None):
        """x (B, *shape) -> (mu, logvar (B, D), z ~ q(z|x) (k, B, D), log p(x|z) (k, B))."""
        mu, logvar = self.posterior(x)
        z = reparameterize(mu, logvar, k, generator)
        return mu, logvar, z, self.log_likelihood(x, z)


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Config(RunConfig):
    """Every flag of `python vae.py`; `--help` prints them with their defaults."""

    steps: int = flag(2000, "training steps")
    log_every: int = flag(100, "steps between metric lines and diagnostics (KL per dimension, active units)")
    save_every: int = flag(1000, "steps between checkpoints and sample pictures")
    latent: int = flag(16, "latent dimensions")
    arch: str = flag("mlp", "encoder/decoder network", choices=("mlp", "conv"))
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


PRESETS = {
    # Default: about a minute on one CPU core. Longer runs overfit the 1497 training images
    # (5000 steps: train ELBO 1.66, test 2.21 bits/dim); a categorical decoder overfits sooner.
    "digits": dict(latent=16, hidden=(256, 256), likelihood="logistic"),
    "digits-binary": dict(latent=16, hidden=(256, 256), likelihood="bernoulli"),
    # Burda et al. 2016 Sec. 5.1, one stochastic layer: 784-200-200-50 tanh, Bernoulli output
    # (MNIST binarised afresh for every batch), Adam eps 1e-4, batch 20, 3280 passes over the
    # 60000 training images in 8 stages.
    "mnist": dict(latent=50, hidden=(200, 200), activation="tanh", likelihood="bernoulli",
                  batch_size=20, lr=1e-3, adam_eps=1e-4, lr_schedule="burda",
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
    if cfg.objective == "iwae" and (cfg.kl_warmup or cfg.free_bits) and not (cfg.eval or cfg.sample):
        raise UserError(f"--kl-warmup {cfg.kl_warmup} and --free-bits {cfg.free_bits} act on the ELBO's KL "
                        "term; with --objective iwae set both to 0 (the 2D preset sets --free-bits 0.5: add "
                        "--free-bits 0)")


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
        mu = net.posterior(x)[0].cpu()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].scatter(mu[:, 0], mu[:, 1], s=1, alpha=0.4)
    axes[0].set_title("posterior means E_q[z] of the data")
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
    if cfg.arch == "conv":
        s = 2 ** len(cfg.channels)
        if info.kind != "image" or info.shape[1] % s or info.shape[2] % s:
            raise UserError(f"--arch conv needs images whose height and width divide by 2^len(channels) = {s} "
                            f"(got shape {list(info.shape)}); use --arch mlp or fewer --channels")
        enc = ConvEncoder(info.shape, cfg.channels, cfg.latent, cfg.activation, in_scale)
        dec = ConvDecoder(info.shape, cfg.channels, cfg.latent, likelihood.n_params, cfg.activation)
    else:
        enc = MLPEncoder(info.dims, cfg.hidden, cfg.latent, cfg.activation, in_scale)
        dec = MLPDecoder(cfg.latent, cfg.hidden, info.shape, likelihood.n_params, cfg.activation)
    return VAE(enc, dec, likelihood, cfg.latent)


def train(cfg):
    """Adam on the negative ELBO (Kingma & Welling Eq. 10) or the IWAE objective (Burda et al.
    Eq. 8), with KL warm-up and free bits; under torchrun every process trains on its slice of the
    global batch (DDP)."""
    dist = init_distributed(cfg.device)
    out = open_run(cfg, MODEL, dist)
    ds = load_dataset(cfg.dataset, "train", cfg.data_dir)
    info = ds.info
    seed_everything(cfg.seed)  # the same initial weights on every process
    net = build(cfg, info).to(dist.device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
    batches = Batches(ds, cfg.batch_size, dist, seed=cfg.seed)
    if cfg.resume:
        step = resume(cfg, MODEL, dist, model=net, opt=opt, batches=batches)
    else:
        step = 0
        seed_everything(cfg.seed + dist.rank)  # posterior samples and binarisations differ between processes
    start = step
    model = wrap_ddp(net, dist, cfg.compile)  # DDP over the processes, then torch.compile
    logger = Logger(out, cfg.steps, enabled=dist.is_main, every=cfg.log_every)
    # A fixed batch for the diagnostics and the final pictures, binarised once with a fixed seed.
    fixed = prepare(ds.data[:DIAGNOSTIC_BATCH], info, net.likelihood,
                    torch.Generator().manual_seed(EVAL_BINARIZATION_SEED)).to(dist.device)

    def checkpoint_and_samples():
        save_training(out, MODEL, step, cfg, info, dist, model=net, opt=opt, batches=batches)
        if dist.is_main and not stop.requested:  # asked to stop: no pictures, say how to continue
            with stop.interruptible():  # a signal now stops the pictures at once; the checkpoint is whole
                save_samples(net, out / f"samples_{step}.png", info, cfg.n_samples, cfg.seed)

    with StopSignal() as stop:
        while step < cfg.steps:
            x = prepare(next(batches)[0], info, net.likelihood)
            lr = burda_lr(step, len(ds.data) / cfg.batch_size, cfg.lr) if cfg.lr_schedule == "burda" else cfg.lr
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                loss, stats = training_loss(model, x, cfg.objective, cfg.k, kl_weight(step, cfg.kl_warmup),
                                            cfg.free_bits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            value = dist.mean(loss)  # each a mean over the processes, the argument left alone
            check_finite(value, step)
            metrics = {"loss": value, **{name: dist.mean(v) for name, v in stats.items()}}
            if info.kind == "image":  # the training bound (ELBO or L_k) in bits/dim
                bound = metrics["iwae_bound" if cfg.objective == "iwae" else "elbo"]
                metrics["bound_bits_per_dim"] = bits_per_dim(-bound, info.dims)
            logger.log(step, cfg.batch_size, **metrics)
            stopping = dist.any(stop.requested)
            if step % cfg.save_every == 0 or step == cfg.steps or stopping:
                checkpoint_and_samples()
            if dist.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
                logger.event("diagnostics", at_step=step, **diagnostics(net, fixed))
            if stopping:
                if dist.is_main:
                    print(f"stopped at step {step}; {out / 'ckpt.pt'} saved; continue with --resume", flush=True)
                break
        if step == start:  # --steps 0, or nothing left to train: still leave a checkpoint
            checkpoint_and_samples()
        if dist.is_main and not stop.requested:
            with stop.interruptible():
                save_final_pictures(net, out, info, fixed)
    logger.close()
    dist.close()
    if dist.is_main:
        report_files(out, ["ckpt.pt", f"samples_{step}.png", "recon.png", "interp.png", "latent.png", "metrics.jsonl",
                           "loss.png"])


def evaluate(cfg):
    """--eval CKPT: test-set ELBO and IWAE-k (nll = -L_k, Burda et al. Sec. 5) in nats and bits/dim;
    on a 2D set also density.npz (log p(x) estimated by L_{k_density} on a grid) and density.png."""
    net, saved, info = load(cfg.eval, get_device(cfg.device))
    out = output_dir(cfg, cfg.eval)
    ds = load_dataset(info.name, "test", cfg.data_dir)
    x = prepare(ds.data, info, net.likelihood, torch.Generator().manual_seed(EVAL_BINARIZATION_SEED))
    x = x.to(net.ref.device)
    torch.manual_seed(cfg.seed)
    rows = 2 ** 16 if saved.arch == "mlp" else 2 ** 9
    t0 = time.perf_counter()
    with torch.inference_mode():
        elbos, bounds = dataset_bounds(net, x, cfg.k_eval, rows)
    n = len(bounds)
    fields = {"dataset": info.name, "k": cfg.k_eval, "n": n,
              "nll": -bounds.mean().item(), "nll_se": bounds.std().item() / math.sqrt(n),
              "elbo": elbos.mean().item(), "elbo_se": elbos.std().item() / math.sqrt(n)}
    if info.kind == "image":
        fields["bits_per_dim"] = bits_per_dim(fields["nll"], info.dims)
        fields["elbo_bits_per_dim"] = bits_per_dim(-fields["elbo"], info.dims)
    else:
        if ds.log_prob is not None:
            fields["true_entropy"], fields["true_entropy_se"] = entropy_estimate(info.name)
        grid = density_on_grid(iwae_log_density(net, cfg.k_density, rows), info.lim, n=128,
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
    load_weights(net, ckpt["model"], path)
    return net.to(device).eval(), cfg, info


def main(argv=None):
    """Train (default), or --eval CKPT, or --sample CKPT; a user's mistake exits with one line."""
    with user_errors():
        cfg = parse_config(Config, PRESETS, argv, doc=__doc__, kinds=("image", "points"))
        check_config(cfg)
        return dispatch(cfg, train, evaluate, draw_samples)


if __name__ == "__main__":
    main()
