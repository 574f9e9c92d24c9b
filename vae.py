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
- digits-binary and mnist: Bernoulli. mnist is binarised dynamically, a fresh draw
  x ~ Bernoulli(intensity / 255) for every training batch (as Burda et al. 2016); the test set is
  binarised once with a fixed seed (`EVAL_BINARIZATION_SEED`), so evaluations are comparable.
- cifar10 (and other 256-level images): a convolutional network with a discretized logistic
  decoder, bits/dim = -log2 p(x) / (3 * 32 * 32).
- 2D point sets: a Gaussian decoder and a 2D latent; the NLL is a density, in nats (continuous).

Reference numbers (Burda et al. 2016, Table 1, MNIST test NLL in nats = -L_5000, one stochastic
layer, 784-200-200-50 tanh, Bernoulli output, k training samples = 1 / 5 / 50):
VAE 86.76 / 86.47 / 86.35, IWAE 86.76 / 85.54 / 84.78. `--dataset mnist` builds that architecture
and optimiser (Adam beta = (0.9, 0.999), eps 1e-4, batch 20, lr 1e-3 * 10^(-i/7) over stages of 3^i
passes, 3280 passes); `--objective iwae --k 50` gives the IWAE row.

Run
    python vae.py                                   # digits, about a minute on one CPU core
    python vae.py --eval runs/vae-digits/ckpt.pt    # test ELBO and IWAE-5000 in nats and bits/dim
    python vae.py --sample runs/vae-digits/ckpt.pt --n-samples 64

Paper -> code
    Kingma & Welling Eq. 3 / Eq. 10 (ELBO, Gaussian case)   VAE.elbo
    Kingma & Welling Eq. 6 (SGVB estimator A)               VAE.elbo(analytic_kl=False)
    Kingma & Welling Appendix B (closed-form -KL)            gaussian_kl
    Kingma & Welling Sec. 2.4 (reparameterisation)           reparameterize
    Kingma & Welling Appendix C.1 / C.2 (MLP decoders)       bernoulli, gaussian, MLPEncoder, MLPDecoder
    Burda et al. Eq. 8 (L_k, weights w_i), Theorem 1        VAE.log_weights, VAE.iwae_bound, VAE.nll,
                                                             iwae_log_density (density.npz on 2D sets)
    Burda et al. (dynamic binarisation of MNIST)             prepare
    Burda et al. Sec. 5.2 (active units)                     active_units
    Burda et al. Sec. 5.1 (optimisation schedule)            burda_lr
    Bowman et al. 2016 (KL cost annealing)                   kl_weight
    Kingma et al. 2016 (free bits)                           free_bits_kl
    Salimans et al. 2017 Eq. 2 (discretized logistic)        discretized_logistic
"""

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Batches, Logger, RunConfig, StopSignal, UserError, check_finite, density_on_grid,
                    entropy_estimate, flag, init_distributed, load_checkpoint, load_dataset, parse_config,
                    resume_path, rng_state, run_dir, save_checkpoint, save_density, save_image_grid,
                    save_scatter, seed_everything, set_rng_state, user_errors, wrap_ddp)

MODEL_NAME = "vae"
EVAL_BINARIZATION_SEED = 0  # the one fixed binarisation of a test set (see the module docstring)
DIAGNOSTIC_BATCH = 512      # examples of the fixed batch used for KL per dimension and active units


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

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
                           "images and mnist (binarised), discretized logistic for other images",
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


PASSES_PER_STAGE = [3 ** i for i in range(8)]  # Burda et al. Sec. 5.1: 3280 passes in all

PRESETS = {
    # Default: about a minute on one CPU core. Longer runs overfit the 1497 training images
    # (5000 steps: train ELBO 1.66, test 2.21 bits/dim); a categorical decoder overfits sooner.
    "digits": dict(latent=16, hidden=(256, 256), likelihood="logistic"),
    "digits-binary": dict(latent=16, hidden=(256, 256), likelihood="bernoulli"),
    # Burda et al. 2016 Sec. 5.1, one stochastic layer: 784-200-200-50 tanh, Bernoulli output,
    # Adam eps 1e-4, batch 20, 3280 passes over the 60000 training images in 8 stages.
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


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------

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
        self.in_scale = in_scale
        layers = []
        for c_out in channels:
            layers += [nn.Conv2d(c, c_out, 4, stride=2, padding=1), _ACTIVATIONS[activation]()]
            c = c_out
        self.conv = nn.Sequential(*layers)
        s = 2 ** len(channels)
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


# ----------------------------------------------------------------------------------------------
# The mathematics
# ----------------------------------------------------------------------------------------------

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


# Decoder likelihoods: each is the normalised log p(x | params) of a whole example, in nats.

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


def _full(t):
    """At least float32: under bfloat16 autocast the log-probabilities are still summed in float32."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class VAE(nn.Module):
    """A VAE from any encoder x -> (mu, logvar), decoder z -> params and likelihood p(x|params).

    The prior is p(z) = N(0, I) of dimension `latent_dim`. Every bound is per example, in nats.
    `encoder` and `decoder` may be modules or plain callables (tests pass exact oracles).
    """

    def __init__(self, encoder: Callable, decoder: Callable, likelihood, latent_dim: int):
        super().__init__()
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.latent_dim = latent_dim
        # Follows .to(device, dtype) so sample() works even for a VAE built from parameter-free oracles.
        self.register_buffer("_ref", torch.zeros(()), persistent=False)

    def _decode_log_lik(self, x, z):
        """log p(x | z) for z (k, B, D) -> (k, B); the decoder sees all k * B latents at once."""
        k, b = z.shape[:2]
        out = _full(self.decoder(z.reshape(k * b, -1)))
        xs = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])
        return self.likelihood.log_prob(xs, out).view(k, b)

    def posterior(self, x):
        """(mu, logvar) of q(z|x), each (B, D), in at least float32."""
        mu, logvar = self.encoder(x)
        return _full(mu), _full(logvar)

    def elbo(self, x, k=1, analytic_kl=True, generator=None):
        """The evidence lower bound L(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)), per example (B,).

        Kingma & Welling Eq. 3 estimated as in Eq. 10 (estimator B, Eq. 7): the expectation by k
        reparameterised samples, the KL in closed form (Appendix B). With analytic_kl=False it is
        estimator A (Eq. 6), mean_l [log p(x, z_l) - log q(z_l|x)], which equals the IWAE bound
        with k = 1 sample for sample.
        """
        mu, logvar = self.posterior(x)
        z = reparameterize(mu, logvar, k, generator)
        if analytic_kl:
            return self._decode_log_lik(x, z).mean(0) - gaussian_kl(mu, logvar)
        return self._log_weights(x, mu, logvar, z).mean(0)

    def _log_weights(self, x, mu, logvar, z):
        """log w = log p(x|z) + log p(z) - log q(z|x) for z (k, B, D) -> (k, B)."""
        log_prior = log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
        return self._decode_log_lik(x, z) + log_prior - log_normal(z, mu, logvar)

    def log_weights(self, x, k, generator=None):
        """log w_i = log p(x, z_i) - log q(z_i|x), z_i ~ q(z|x), i = 1..k (Burda et al. Eq. 8). (k, B)."""
        mu, logvar = self.posterior(x)
        return self._log_weights(x, mu, logvar, reparameterize(mu, logvar, k, generator))

    def iwae_bound(self, x, k, chunk=None, generator=None):
        """L_k(x) = log (1/k) sum_i w_i, z_i ~ q(z|x) i.i.d. (Burda et al. 2016, Eq. 8), per example (B,).

        L_1 is the ELBO, L_k <= L_{k+1} <= log p(x) and L_k -> log p(x) (Burda et al. Theorem 1).
        The k samples are drawn in chunks of `chunk` (all at once when None): each chunk is reduced
        to its log-sum-exp, and the log-sum-exp of those is exact, so memory grows with the chunk,
        not with k. Differentiable (the IWAE objective is its negation with k training samples).
        """
        return self._iwae_bound(x, *self.posterior(x), k, chunk, generator)

    def _iwae_bound(self, x, mu, logvar, k, chunk=None, generator=None):
        chunk = k if chunk is None else chunk
        partial = []
        for start in range(0, k, chunk):
            z = reparameterize(mu, logvar, min(chunk, k - start), generator)
            partial.append(torch.logsumexp(self._log_weights(x, mu, logvar, z), dim=0))
        return torch.logsumexp(torch.stack(partial), dim=0) - math.log(k)

    def nll(self, x, k=5000, chunk=None, generator=None):
        """-L_k(x) in nats per example, the NLL estimate of Burda et al. Sec. 5 (k = 5000)."""
        return -self.iwae_bound(x, k, chunk, generator)

    def loss(self, x, objective="elbo", k=1, kl_scale=1.0, free_bits=0.0):
        """The training loss averaged over the batch, and detached statistics for the log.

        objective "elbo": -(E_q[log p(x|z)] - kl_scale * KL) with the KL through `free_bits_kl`
        (Kingma & Welling Eq. 10; warm-up weight `kl_weight`; free bits when free_bits > 0).
        objective "iwae": -L_k (Burda et al. Eq. 8, trained with k samples).
        Returns (loss, {"elbo" or "iwae_bound": the batch mean of the bound, "kl": mean KL}).
        """
        mu, logvar = self.posterior(x)
        kl_dims = gaussian_kl_per_dim(mu, logvar)             # (B, D)
        kl = kl_dims.sum(1).mean()
        if objective == "iwae":
            bound = self._iwae_bound(x, mu, logvar, k).mean()
            return -bound, {"iwae_bound": bound.detach(), "kl": kl.detach()}
        rec = self._decode_log_lik(x, reparameterize(mu, logvar, k)).mean()
        loss = -(rec - kl_scale * free_bits_kl(kl_dims, free_bits))
        return loss, {"elbo": (rec - kl).detach(), "kl": kl.detach()}

    def forward(self, x, **kwargs):
        """`loss` (DistributedDataParallel synchronises gradients through forward)."""
        return self.loss(x, **kwargs)

    @torch.inference_mode()
    def sample(self, n, mean=False, generator=None):
        """x ~ p(x|z), z ~ N(0, I): n samples (n, *shape); mean=True returns E[x|z] instead."""
        z = torch.randn(n, self.latent_dim, generator=generator, device=self._ref.device,
                        dtype=self._ref.dtype)
        out = _full(self.decoder(z))
        return self.likelihood.mean(out) if mean else self.likelihood.sample(out, generator)

    @torch.inference_mode()
    def reconstruct(self, x):
        """E[x | z = mu(x)]: the decoder's mean at the posterior mean, (B, *shape)."""
        return self.likelihood.mean(_full(self.decoder(self.posterior(x)[0])))

    @torch.inference_mode()
    def interpolate(self, x1, x2, steps=8):
        """Decoder means along the line between the posterior means of x1 and x2: (B, steps, *shape)."""
        mu1, mu2 = self.posterior(x1)[0], self.posterior(x2)[0]
        t = torch.linspace(0, 1, steps, device=mu1.device, dtype=mu1.dtype).view(1, steps, 1)
        z = (1 - t) * mu1.unsqueeze(1) + t * mu2.unsqueeze(1)            # (B, steps, D)
        means = self.likelihood.mean(_full(self.decoder(z.flatten(0, 1))))
        return means.view(mu1.shape[0], steps, *means.shape[1:])


def active_units(mu, threshold=0.01):
    """A_u = Cov_x(E_q(u|x)[u]) > threshold per latent dimension (Burda et al. 2016, Sec. 5.2).

    mu: (N, D) posterior means of a fixed set of examples. Returns (count, variances (D,)).
    """
    var = mu.double().var(0, unbiased=False)
    return int((var > threshold).sum()), var


def bits_per_dim(nats, dims):
    """Nats per example -> bits per dimension: nats / (dims * ln 2).

    For discrete images (levels 0..L-1) log p(x) is the log-probability of the discrete image, so
    this is the usual bits/dim with no dequantisation offset to add.
    """
    return nats / (dims * math.log(2))


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


# ----------------------------------------------------------------------------------------------
# Building a model from the configuration and the data
# ----------------------------------------------------------------------------------------------

def _meta(ds):
    """What the network needs from the data, kept in the checkpoint so --sample needs no dataset."""
    return {"kind": ds.kind, "shape": list(ds.shape), "levels": ds.levels, "num_classes": ds.num_classes}


def likelihood_name(cfg, meta):
    """The decoder likelihood `--likelihood auto` stands for, checked against the data."""
    name = cfg.likelihood
    if name == "auto":
        if meta["kind"] == "points":
            name = "gaussian"
        elif meta["levels"] == 2 or cfg.dataset == "mnist":
            name = "bernoulli"
        else:
            name = "logistic"
    if (meta["kind"] == "points") != (name == "gaussian"):
        raise UserError(f"--likelihood {name} does not fit {meta['kind']} data; accepted: gaussian for 2D points, "
                        "bernoulli, categorical or logistic for images")
    return name


def model_levels(name, meta):
    """Levels of the data the likelihood scores: 2 after binarisation, the image's own otherwise."""
    return None if name == "gaussian" else 2 if name == "bernoulli" else meta["levels"]


def _check(cfg, meta):
    for field in ("latent", "k", "k_eval", "k_density"):
        if getattr(cfg, field) < 1:
            raise UserError(f"--{field.replace('_', '-')} {getattr(cfg, field)} is out of range; "
                            "it takes a whole number >= 1")
    if cfg.kl_warmup < 0 or cfg.free_bits < 0:
        raise UserError("--kl-warmup and --free-bits take numbers >= 0")
    if cfg.objective == "iwae" and (cfg.kl_warmup or cfg.free_bits):
        raise UserError(f"--kl-warmup {cfg.kl_warmup} and --free-bits {cfg.free_bits} act on the ELBO's KL "
                        "term; with --objective iwae set both to 0 (the 2D preset sets --free-bits 0.5: add "
                        "--free-bits 0)")
    if any(h < 1 for h in (*cfg.hidden, *cfg.channels)):
        raise UserError("--hidden and --channels take positive widths, e.g. 256,256")
    if cfg.arch == "conv":
        s = 2 ** len(cfg.channels)
        if meta["kind"] != "image" or len(cfg.channels) == 0 or meta["shape"][1] % s or meta["shape"][2] % s:
            raise UserError(f"--arch conv needs images whose height and width divide by 2^len(channels) = {s} "
                            f"(got shape {meta['shape']}); use --arch mlp or fewer --channels")


def build_model(cfg, meta):
    """The VAE the configuration describes, for data described by `meta`."""
    _check(cfg, meta)
    name = likelihood_name(cfg, meta)
    levels = model_levels(name, meta)
    if name in ("bernoulli", "gaussian"):
        likelihood = Bernoulli() if name == "bernoulli" else Gaussian()
    else:
        likelihood = Categorical(levels) if name == "categorical" else DiscretizedLogistic(levels)
    shape = tuple(meta["shape"])
    in_scale = 1.0 if levels is None else 1.0 / (levels - 1)
    if cfg.arch == "conv":
        enc = ConvEncoder(shape, cfg.channels, cfg.latent, cfg.activation, in_scale)
        dec = ConvDecoder(shape, cfg.channels, cfg.latent, likelihood.n_params, cfg.activation)
    else:
        enc = MLPEncoder(math.prod(shape), cfg.hidden, cfg.latent, cfg.activation, in_scale)
        dec = MLPDecoder(cfg.latent, cfg.hidden, shape, likelihood.n_params, cfg.activation)
    return VAE(enc, dec, likelihood, cfg.latent)


def prepare(x, meta, likelihood, generator=None):
    """Data as the likelihood scores it. Images scored by a Bernoulli with more than two levels are
    binarised, x ~ Bernoulli(level / (L - 1)): afresh for every training batch (as Burda et al. do),
    with a seeded CPU `generator` for the one fixed binarisation of an evaluation set."""
    if isinstance(likelihood, Bernoulli):
        p = x.float() / (meta["levels"] - 1)
        return torch.bernoulli(p, generator=generator) if meta["levels"] > 2 else p
    return x


# ----------------------------------------------------------------------------------------------
# Pictures and diagnostics
# ----------------------------------------------------------------------------------------------

def _as_image(model, means):
    """Decoder means in level units -> floats in [0, 1] for save_image_grid."""
    levels = model.likelihood.levels
    return means.float().cpu() / (levels - 1)


def save_samples(model, path, meta, n=64, seed=0):
    """Prior samples: decoder means E[x|z], z ~ N(0, I), for images (the customary picture; pixels
    drawn independently from p(x|z) look like noise); drawn points for 2D sets."""
    g = torch.Generator(device=model._ref.device).manual_seed(seed)  # never the training stream
    if meta["kind"] == "points":
        save_scatter(model.sample(max(n, 2000), generator=g).cpu(), path, lim=4.0, title="VAE samples")
    else:
        save_image_grid(_as_image(model, model.sample(n, mean=True, generator=g)), path)


def save_final_pictures(model, out, meta, x):
    """recon.png (inputs above their reconstructions), interp.png (latent interpolations, one pair a
    row) and, with a 2D latent, latent.png: the decoder over a grid of prior quantiles (images, as in
    Kingma & Welling Fig. 4) or the posterior means of the data and the decoded latent grid (points)."""
    if meta["kind"] == "image":
        per = min(8, len(x))
        rows = []
        for inputs in x[:4 * per].split(per):
            rows += [_as_image(model, inputs.float()), _as_image(model, model.reconstruct(inputs))]
        save_image_grid(torch.cat(rows), out / "recon.png", nrow=per)
        pairs = min(8, len(x) // 2)
        if pairs:
            path = model.interpolate(x[:pairs], x[pairs:2 * pairs], steps=10)
            save_image_grid(_as_image(model, path.flatten(0, 1)), out / "interp.png", nrow=10)
    if model.latent_dim != 2:
        return
    # Quantiles of N(0, 1) at evenly spaced probabilities, so every cell holds equal prior mass.
    q = torch.erfinv(2 * torch.linspace(0.05, 0.95, 15) - 1) * math.sqrt(2)
    zz = torch.stack(torch.meshgrid(q.flip(0), q, indexing="ij"), -1).view(-1, 2).to(model._ref)
    with torch.inference_mode():
        grid = model.likelihood.mean(_full(model.decoder(zz)))
    if meta["kind"] == "image":
        save_image_grid(_as_image(model, grid), out / "latent.png", nrow=15)
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with torch.inference_mode():
        mu = model.posterior(x)[0].cpu()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].scatter(mu[:, 0], mu[:, 1], s=1, alpha=0.4)
    axes[0].set_title("posterior means E_q[z] of the data")
    g = grid.cpu().view(15, 15, 2)
    for lines in (g, g.transpose(0, 1)):
        for line in lines:
            axes[1].plot(line[:, 0], line[:, 1], lw=0.6, color="C1")
    axes[1].set_title("decoder mean over a latent quantile grid")
    axes[0].set(xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), xlabel="z1", ylabel="z2")
    axes[1].set(xlim=(-4, 4), ylim=(-4, 4), xlabel="x1", ylabel="x2")
    for ax in axes:
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(out / "latent.png", dpi=100)
    plt.close(fig)


@torch.no_grad()
def diagnostics(model, x):
    """KL per latent dimension (mean over the fixed batch x, nats) and the active units
    (Burda et al. Sec. 5.2), the signs of posterior collapse."""
    mu, logvar = model.posterior(x)
    kl = gaussian_kl_per_dim(mu, logvar).mean(0)
    count, _ = active_units(mu)
    return {"active_units": count, "kl": kl.sum().item(), "kl_per_dim": [round(v, 4) for v in kl.tolist()]}


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def _lr(cfg, step, n_train):
    return burda_lr(step, n_train / cfg.batch_size, cfg.lr) if cfg.lr_schedule == "burda" else cfg.lr


def train(cfg):
    """The training loop: Adam on the loss of `VAE.loss`, checkpoints, pictures, diagnostics."""
    dist = init_distributed(cfg.device)
    ds = load_dataset(cfg.dataset, "train", cfg.data_dir)
    meta, out = _meta(ds), run_dir(cfg, MODEL_NAME)
    seed_everything(cfg.seed)
    model = build_model(cfg, meta).to(dist.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
    batches = Batches(ds, cfg.batch_size, dist, seed=cfg.seed)
    step, ckpt = 0, resume_path(cfg, MODEL_NAME)
    if ckpt is not None:
        state = load_checkpoint(ckpt, map_location=dist.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        batches.load_state_dict(state["batches"])
        set_rng_state(state["rng"], dist)
        step = state["step"]
    else:
        seed_everything(cfg.seed + dist.rank)  # different posterior samples and binarisations per process
    start_step = step
    objective = wrap_ddp(model, dist)
    if cfg.compile:
        objective = torch.compile(objective)
    logger = Logger(out, cfg.steps, enabled=dist.is_main, every=cfg.log_every)
    # A fixed batch for the diagnostics (and the final pictures), binarised once with a fixed seed.
    fixed = prepare(ds.data[:DIAGNOSTIC_BATCH], meta, model.likelihood,
                    torch.Generator().manual_seed(EVAL_BINARIZATION_SEED)).to(dist.device)
    dims = math.prod(meta["shape"])

    def save():
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "rng": rng_state(dist),
                 "batches": batches.state_dict(), "config": dataclasses.asdict(cfg), "meta": meta}
        if dist.is_main:
            save_checkpoint(out / "ckpt.pt", state)
            save_samples(model, out / f"samples_{step}.png", meta, cfg.n_samples, cfg.seed)

    with StopSignal() as stop:
        while step < cfg.steps:
            x = prepare(next(batches)[0], meta, model.likelihood)
            for group in opt.param_groups:
                group["lr"] = _lr(cfg, step, len(ds.data))
            with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                loss, stats = objective(x, objective=cfg.objective, k=cfg.k,
                                        kl_scale=kl_weight(step, cfg.kl_warmup), free_bits=cfg.free_bits)
            check_finite(dist.mean(loss), step + 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            metrics = {"loss": dist.mean(loss), **{name: dist.mean(v) for name, v in stats.items()}}
            if meta["kind"] == "image":  # the training bound (ELBO or L_k) in bits/dim
                bound = metrics["iwae_bound" if cfg.objective == "iwae" else "elbo"]
                metrics["bound_bits_per_dim"] = bits_per_dim(-bound, dims)
            logger.log(step, cfg.batch_size, **metrics)
            if dist.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
                logger.event("diagnostics", at_step=step, **diagnostics(model, fixed))
            stopping = dist.any(stop.requested)
            if step % cfg.save_every == 0 or step == cfg.steps or stopping:
                save()
            if stopping:
                if dist.is_main:
                    print(f"stopped at step {step}; resume with --resume {out / 'ckpt.pt'}", flush=True)
                break
    if step == start_step:  # nothing trained in this call: still leave a checkpoint
        save()
    if dist.is_main:
        save_final_pictures(model, out, meta, fixed)
    logger.close()
    dist.close()
    if dist.is_main:
        extra = ", recon.png, interp.png" if meta["kind"] == "image" else ""
        extra += ", latent.png" if cfg.latent == 2 else ""
        print(f"checkpoint and pictures (samples_{step}.png{extra}, loss.png) in {out}")
    return model


# ----------------------------------------------------------------------------------------------
# Evaluation and sampling from a checkpoint
# ----------------------------------------------------------------------------------------------

def _load(cfg, path):
    """Model (evaluation mode), its training config and meta from a checkpoint."""
    dist = init_distributed(cfg.device)
    state = load_checkpoint(path, map_location=dist.device)
    known = {f.name for f in dataclasses.fields(Config)}
    ccfg = Config(**{k: tuple(v) if isinstance(v, list) else v
                     for k, v in state["config"].items() if k in known})
    model = build_model(ccfg, state["meta"]).to(dist.device)
    model.load_state_dict(state["model"])
    return model.eval(), ccfg, state["meta"], dist


def _bounds(model, x, k, rows):
    """(ELBO, L_k) per example of x, in x-batches and k-chunks of about `rows` decoder rows each."""
    b = max(1, min(len(x), rows // min(k, rows)))
    chunk = max(1, rows // b)
    elbo, iwae = [], []
    for xb in x.split(b):
        elbo.append(model.elbo(xb).double().cpu())
        iwae.append(model.iwae_bound(xb, k, chunk=chunk).double().cpu())
    return torch.cat(elbo), torch.cat(iwae)


def iwae_log_density(model, k, rows=2 ** 16):
    """log p(x) estimated by L_k (Burda et al. Eq. 8) as a callable for `density_on_grid`:
    points (M, 2) -> (M,), on the model's device, k samples in chunks of about `rows` decoder rows."""
    @torch.no_grad()
    def log_density(pts):
        return model.iwae_bound(pts.to(model._ref), k, chunk=max(1, rows // len(pts)))
    return log_density


@torch.no_grad()
def evaluate(cfg):
    """`--eval CKPT`: test-set ELBO and IWAE-k (nll = -L_k, Burda et al. Sec. 5) in nats and bits/dim;
    on a 2D set also density.npz (log p(x) estimated by L_{k_density} on a grid) and density.png."""
    model, ccfg, meta, dist = _load(cfg, cfg.eval)
    out = Path(cfg.out) if cfg.out else Path(cfg.eval).parent
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(ccfg.dataset, "test", cfg.data_dir)
    x = prepare(ds.data, meta, model.likelihood, torch.Generator().manual_seed(EVAL_BINARIZATION_SEED))
    x = x.to(dist.device)
    torch.manual_seed(cfg.seed)
    rows = 2 ** 16 if ccfg.arch == "mlp" else 2 ** 9
    t0 = time.perf_counter()
    elbo, iwae = _bounds(model, x, cfg.k_eval, rows)
    n = len(iwae)
    fields = {"dataset": ccfg.dataset, "k": cfg.k_eval, "n": n,
              "nll": -iwae.mean().item(), "nll_se": iwae.std().item() / math.sqrt(n),
              "elbo": elbo.mean().item(), "elbo_se": elbo.std().item() / math.sqrt(n)}
    if meta["kind"] == "image":
        dims = math.prod(meta["shape"])
        fields["bits_per_dim"] = bits_per_dim(fields["nll"], dims)
        fields["elbo_bits_per_dim"] = bits_per_dim(-fields["elbo"], dims)
    else:
        if ds.log_prob is not None:
            fields["true_entropy"], fields["true_entropy_se"] = entropy_estimate(ccfg.dataset)
        grid = density_on_grid(iwae_log_density(model, cfg.k_density, rows), ds.lim, n=128,
                               chunk=max(1, rows // cfg.k_density))
        np.savez(out / "density.npz", log_density=grid, lim=ds.lim)
        truth = density_on_grid(ds.log_prob, ds.lim) if ds.log_prob else ds.data
        # Importance weights are heavy-tailed: one lucky draw can lift a grid point far above its
        # neighbours and black out a linear colour scale, so the picture (not the .npz) is clipped.
        shown = np.minimum(grid, np.percentile(grid, 99.9))
        save_density({"true" if ds.log_prob else "test data": truth,
                      f"VAE, IWAE-{cfg.k_density} (clipped)": shown}, out / "density.png", ds.lim)
    fields["seconds"] = time.perf_counter() - t0
    Logger(out, 0, enabled=dist.is_main).event("eval", split="test", **fields)
    return fields


def sample_cmd(cfg):
    """`--sample CKPT`: n_samples prior samples to samples.png, timed."""
    model, ccfg, meta, dist = _load(cfg, cfg.sample)
    out = Path(cfg.out) if cfg.out else Path(cfg.sample).parent
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=dist.device).manual_seed(cfg.seed)
    t0 = time.perf_counter()
    x = model.sample(cfg.n_samples, mean=meta["kind"] == "image", generator=g)
    seconds = time.perf_counter() - t0
    if meta["kind"] == "points":
        save_scatter(x.cpu(), out / "samples.png", lim=4.0, title="VAE samples")
    else:
        x = _as_image(model, x)
        save_image_grid(x, out / "samples.png")
    if dist.is_main:
        torch.save(x.cpu(), out / "samples.pt")  # images in [0, 1] or points, for benchmarks/quality.py
    Logger(out, 0, enabled=dist.is_main).event("sample", n=cfg.n_samples, seconds=seconds,
                                               samples_per_s=cfg.n_samples / max(seconds, 1e-9))
    return x


def main(argv=None):
    """Train (default), or `--eval CKPT`, or `--sample CKPT`."""
    with user_errors():
        cfg = parse_config(Config, PRESETS, argv, doc=__doc__, kinds=("image", "points"))
        if cfg.eval:
            return evaluate(cfg)
        if cfg.sample:
            return sample_cmd(cfg)
        return train(cfg)


if __name__ == "__main__":
    main()
