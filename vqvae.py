"""VQ-VAE and VQ-VAE-2: discrete autoencoders with straight-through gradients, EMA codebooks,
autoregressive priors over their code maps, and a likelihood bound in bits/dim.

Papers
  van den Oord, Vinyals & Kavukcuoglu 2017, "Neural Discrete Representation Learning", arXiv 1711.00937.
  Razavi, van den Oord & Vinyals 2019, "Generating Diverse High-Fidelity Images with VQ-VAE-2",
    arXiv 1906.00446 (--levels 2).
  Vaswani et al. 2017, "Attention Is All You Need", arXiv 1706.03762 (the priors' transformer).

Implemented: nearest-code quantisation, straight-through gradients, the loss of Eq. 3 (beta 0.25),
the EMA codebook of App. A.1 (Laplace-smoothed as the authors' Sonnet module) or the codebook term
(--codebook loss), dead codes re-seeded from encoder outputs (ours); a causal-transformer prior
trained on the frozen autoencoder's codes (ours where the paper uses a PixelCNN); the bound
-log p(x) <= -log p(x | z(x)) - log p(z(x)) in nats and bits/dim, the decoder a categorical over
the L levels of every sub-pixel, so no dequantisation (2D points: a Gaussian per code, and the
exact mixture density).
VQ-VAE-2: a top map at half the side of the bottom map (--down sets the bottom: 4x4 under 2x2 for
digits, 8x8 under 4x4 for CIFAR-10), the bottom encoder reading the decoded top, the decoder both;
a top prior and a bottom prior that reads the whole top map by cross-attention (the paper:
PixelCNNs with self-attention); the bound with both priors' NLLs. Networks: Sec. 4.1's text (all
256 wide, residual blocks right after the strided convolutions). DeepMind's Sonnet example differs:
a 3x3 convolution follows the strided ones, the first strided and the first transposed convolution
are half as wide, the residual 3x3s 32 wide; its decoder's input 3x3 convolution is ours
(PRESETS["cifar10"] has the details).
Not implemented: PixelCNN/PixelSNAIL priors, VQ-VAE-2's third level, class conditioning and
rejection sampling; the audio, video and speaker models.

Run it (--steps counts both stages: the autoencoder for --ae-fraction of them, then the prior)
  python vqvae.py [--levels 2]                      # digits, CPU, minutes
  python vqvae.py --eval runs/vqvae-digits/ckpt.pt  # the bound in bits/dim, each prior's NLL
  python vqvae.py --sample runs/vqvae-digits/ckpt.pt
  (--stage ae, then --stage prior --resume: one stage at a time; --dataset cifar10: Sec. 4.1;
   --dataset 8gaussians: one code per point, a K-means-like mixture of Gaussians)

Paper -> code
  VQ-VAE Eq. 1-2      z = argmin_k ||z_e - e_k||, z_q = e_z               quantize
  VQ-VAE Sec. 3.2     z_st = sg[z_q] + z_e - sg[z_e] (gradient copied)   quantize
  VQ-VAE Eq. 3        -log p(x|z_q) + ||sg[z_e] - e||^2                   vqvae_loss, vq_terms,
                        + beta ||z_e - sg[e]||^2                          decoder_log_prob
  VQ-VAE App. A.1     N <- g N + (1-g) n, m <- g m + (1-g) sum z, e = m/N  ema_codebook_update, Codebook
  (ours)              codes unused for T steps <- encoder outputs         restart_dead_codes
  usage               perplexity exp(H(n_i / sum n))                      perplexity
  VQ-VAE Sec. 3.3     p(z) = prod_t p(z_t | z_<t)                         prior_nll, sample_codes, CodePrior
  VQ-VAE Sec. 3       -log p(x) <= -log p(x|z_q(x)) - log p(z(x))         nll_bound, bits_per_dim
  exact               log p(x) = log sum_z p(z) p(x|e_z)                  exact_log_likelihood
  VQ-VAE Sec. 3       z ~ p(z), x ~ p(x|e_z)                              generate, decoder_sample
  VQ-VAE Sec. 4.1     stride-2 4x4 convolutions, residual 3x3 blocks      ConvEncoder, ConvDecoder, ResBlock
  VQ-VAE-2 Alg. 1     e_top = Q(E_top(x)), e_bot = Q(E_bot(x, D_top(e_top))), x^ = D(e_top, e_bot)   VQVAE2
  VQ-VAE-2 Sec. 3.2   p(z_top) p(z_bot | z_top)                           HierarchicalPrior
  bound, two maps     -log p(x|z_top,z_bot) - log p(z_top) - log p(z_bot|z_top)  hierarchical_nll_bound
  exact, two maps     log sum_{z_top,z_bot} p(z_top) p(z_bot|z_top) p(x|.)  hierarchical_exact_log_likelihood
  VQ-VAE-2 Alg. 2     z_top ~ p, z_bot ~ p(.|z_top), x ~ p(x|z_top,z_bot)  hierarchical_generate
"""
from __future__ import annotations

import collections
import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Batches, Logger, RunConfig, Training, UserError, check_range, density_on_grid, dispatch,
                    entropy_estimate, flag, get_device, load_checkpoint, load_dataset, load_weights, output_dir,
                    parse_config, report_files, save_density, save_image_grid, save_scatter, saved_config,
                    seed_everything, user_errors, wrap_ddp)
from common import fid_evaluate  # --eval CKPT --fid N


# ----------------------------------------------------------------------------------------
# Vector quantisation and the straight-through estimator
# ----------------------------------------------------------------------------------------

def quantize(z_e, codebook, chunk=2**22):
    """Nearest-code quantisation (van den Oord et al. Eqs. 1-2) and the straight-through
    estimator (Sec. 3.2). z_e (..., D), codebook (K, D) -> codes (...) = argmin_k ||z_e - e_k||^2
    (ties to the lowest k), z_q = e_codes (differentiable in the codebook only), and the decoder's
    input z_st = sg[z_q] + (z_e - sg[z_e]): z_q in value, z_e in gradient."""
    if z_e.shape[-1] != codebook.shape[-1] or codebook.dim() != 2:
        raise ValueError(f"z_e (..., {z_e.shape[-1]}) and codebook {tuple(codebook.shape)} need the same last dim D")
    K, D = codebook.shape
    dtype = torch.promote_types(z_e.dtype, torch.float32)
    with torch.no_grad():  # sums of squared differences: |z|^2 - 2 z.e + |e|^2 cancels and can break ties
        flat, e = z_e.detach().reshape(-1, D).to(dtype), codebook.detach().to(dtype)
        rows = max(1, chunk // (K * D))  # chunks of at most `chunk` elements
        codes = torch.cat([((flat[i:i + rows, None, :] - e[None]) ** 2).sum(-1).argmin(1)
                           for i in range(0, flat.shape[0], rows)]) if flat.shape[0] else \
            torch.zeros(0, dtype=torch.long, device=z_e.device)
    codes = codes.reshape(z_e.shape[:-1])
    z_q = F.embedding(codes, codebook)
    z_st = z_q.detach() + (z_e - z_e.detach())  # z_e + sg[z_q - z_e] would round: 0.9 + (0.1 - 0.9) != 0.1
    return codes, z_q, z_st


# ----------------------------------------------------------------------------------------
# The objective (Eq. 3)
# ----------------------------------------------------------------------------------------

def _sum_per_example(x):
    return x.reshape(x.shape[0], -1).sum(1)


def decoder_log_prob(x, out, levels=None):
    """log p(x | z_q) per example (B,), in nats: the reconstruction term of Eq. 3.

    Images (levels = L): x integer levels (B, C, H, W), out logits (B, C, L, H, W): an
    independent categorical over the L levels of every sub-pixel, normalised over the discrete
    images. Points (levels None): x (B, 2) floats, out (B, 4) the mean and log standard
    deviation of a diagonal Gaussian density.
    """
    out = out.to(torch.promote_types(out.dtype, torch.float32))  # bf16 under --amp: the likelihood in fp32
    if levels is None:
        mean, log_scale = out.chunk(2, dim=1)
        return _sum_per_example(-0.5 * math.log(2 * math.pi) - log_scale
                                - 0.5 * ((x - mean) * torch.exp(-log_scale)) ** 2)
    if out.shape[2] != levels:
        raise ValueError(f"decoder output has {out.shape[2]} levels, the data {levels}")
    logp = F.log_softmax(out, dim=2)
    return _sum_per_example(logp.gather(2, x.long().unsqueeze(2)).squeeze(2))


def vq_terms(z_e, z_q):
    """The two vector-quantisation terms of Eq. 3, summed over latent positions and dimensions,
    per example (B,): codebook ||sg[z_e] - e||^2 (its gradient moves the codes only) and
    commitment ||z_e - sg[e]||^2 (it moves the encoder only). Tuples of maps (VQ-VAE-2's top
    and bottom) give the sums over the maps (Razavi et al. Sec. 3.1: each level's own terms)."""
    if isinstance(z_e, tuple):
        terms = [vq_terms(e, q) for e, q in zip(z_e, z_q)]
        return sum(t[0] for t in terms), sum(t[1] for t in terms)
    return _sum_per_example((z_e.detach() - z_q) ** 2), _sum_per_example((z_e - z_q.detach()) ** 2)


def vqvae_loss(model, x, target, beta=0.25, codebook_loss=True, levels=None):
    """The loss of Eq. 3 per example (B,) in nats: -log p(x | z_q(x)) + ||sg[z_e(x)] - e||^2
    + beta ||z_e(x) - sg[e]||^2, without the codebook term when the EMA moves the codes
    (codebook_loss False). model(x) -> (decoder output, z_e, z_q, codes) (tuples of both maps for
    VQVAE2); target is what the decoder scores. A dict of the terms, z_e and codes."""
    out, z_e, z_q, codes = model(x)
    recon = -decoder_log_prob(target, out, levels)
    codebook, commitment = vq_terms(z_e, z_q)
    loss = recon + beta * commitment + (codebook if codebook_loss else 0.0)
    return dict(loss=loss, recon=recon, codebook=codebook, commitment=commitment, z_e=z_e, codes=codes)


# ----------------------------------------------------------------------------------------
# The EMA codebook (App. A.1), dead codes and the perplexity
# ----------------------------------------------------------------------------------------

def codebook_statistics(z_e, codes, num_codes):
    """One batch's statistics for App. A.1: n_i, the number of encoder outputs assigned to code i,
    (K,), and sum_j z_{i,j}, their sum, (K, D); in float32 at least, no gradient."""
    D = z_e.shape[-1]
    flat = z_e.detach().reshape(-1, D)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    one_hot = F.one_hot(codes.reshape(-1), num_codes).to(flat.dtype)  # (N, K)
    return one_hot.sum(0), one_hot.T @ flat


def ema_codebook_update(codebook, cluster_size, embed_sum, counts, sums, decay=0.99, eps=1e-5):
    """The EMA codebook update of App. A.1 with decay gamma: N_i <- gamma N_i + (1 - gamma) n_i,
    m_i <- gamma m_i + (1 - gamma) sum_j z_{i,j}, e_i = m_i / N~_i, with the Laplace smoothing
    N~_i = (N_i + eps) / (n + K eps) n, n = sum_i N_i, of the authors' Sonnet module
    (VectorQuantizerEMA). A code with N~_i = 0 keeps its vector. Returns the new (cluster_size,
    embed_sum, codebook)."""
    if not 0 <= decay <= 1 or eps < 0:
        raise ValueError(f"decay {decay} must be in [0, 1] and eps {eps} >= 0")
    K = cluster_size.shape[0]
    cluster_size = decay * cluster_size + (1 - decay) * counts
    embed_sum = decay * embed_sum + (1 - decay) * sums
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + K * eps) * n
    safe = torch.where(smoothed > 0, smoothed, torch.ones_like(smoothed))
    new = torch.where(smoothed[:, None] > 0, embed_sum / safe[:, None], codebook.detach().to(embed_sum.dtype))
    return cluster_size, embed_sum, new.to(codebook.dtype)


def update_unused(unused, counts):
    """Steps since each code was last used: 0 for the codes this batch used, else one more."""
    return torch.where(counts > 0, torch.zeros_like(unused), unused + 1)


def random_encoder_outputs(z_e, n, generator=None):
    """n rows of the (..., D) encoder outputs, drawn at random (without replacement when there
    are at least n): the candidates a dead code restarts from. (n, D), no gradient."""
    flat = z_e.detach().reshape(-1, z_e.shape[-1])
    if flat.shape[0] >= n:
        idx = torch.randperm(flat.shape[0], generator=generator, device=generator.device if generator else "cpu")[:n]
    else:
        idx = torch.randint(flat.shape[0], (n,), generator=generator,
                            device=generator.device if generator else "cpu")
    return flat[idx.to(flat.device)]


def restart_dead_codes(codebook, cluster_size, embed_sum, unused, candidates, patience):
    """Re-seed every code unused for at least `patience` steps with its candidate row (an
    encoder output; random_encoder_outputs). A restarted code counts as if that encoder output
    had been assigned to it once: cluster size 1, sum = the vector, so e_i = m_i / N_i holds.
    Not in the paper (a common remedy for codes the encoder never selects); ours.
    Returns (codebook, cluster_size, embed_sum, unused, dead) with dead the (K,) bool mask."""
    if patience < 1:
        raise ValueError(f"patience {patience} must be >= 1 step")
    dead = unused >= patience
    candidates = candidates.to(codebook.dtype)
    return (torch.where(dead[:, None], candidates, codebook.detach()),
            torch.where(dead, torch.ones_like(cluster_size), cluster_size),
            torch.where(dead[:, None], candidates.to(embed_sum.dtype), embed_sum),
            torch.where(dead, torch.zeros_like(unused), unused), dead)


def perplexity(counts):
    """exp(H(p)) of the code usage p_i = n_i / sum n: K when every code is used alike, 1 when one
    code takes everything (0 log 0 = 0). counts (K,) -> a 0-dim tensor."""
    p = counts.double() / counts.sum()
    return torch.exp(-torch.xlogy(p, p).sum())


# ----------------------------------------------------------------------------------------
# The prior over code maps (Sec. 3.3), the bound, and sampling
# ----------------------------------------------------------------------------------------

def prior_nll(prior, codes, num_codes, cond=None):
    """-log p(z) per example (B,) in nats, by the chain rule over the L = h w codes in raster
    order: p(z) = prod_t p(z_t | z_<t) (the autoregressive prior of Sec. 3.3). codes (B, L) int;
    prior(idx) -> logits (B, T, K) must be causal; its input starts with the token `num_codes`,
    which it never predicts, so p sums to 1 over the K^L code maps. With `cond` (B, S), codes
    the prior reads whole (VQ-VAE-2's top map): -log p(z | cond), by prior(idx, cond)."""
    start = torch.full((codes.shape[0], 1), num_codes, dtype=torch.long, device=codes.device)
    idx = torch.cat([start, codes[:, :-1]], 1)
    logits = prior(idx) if cond is None else prior(idx, cond)
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return -logp.gather(-1, codes[..., None]).squeeze(-1).sum(1)


@torch.inference_mode()
def sample_codes(prior, n, length, num_codes, generator=None, temperature=1.0, cond=None):
    """n code maps (n, length) drawn from the prior one code at a time (ancestral sampling), on
    the generator's device (the CPU without one); temperature divides the logits; `cond` (n, S)
    the codes a conditional prior reads (prior_nll)."""
    if temperature <= 0:
        raise ValueError(f"temperature {temperature} must be > 0")
    device = generator.device if generator is not None else torch.device("cpu")
    seq = torch.full((n, 1), num_codes, dtype=torch.long, device=device)
    for _ in range(length):
        logits = (prior(seq) if cond is None else prior(seq, cond))[:, -1].float() / temperature
        seq = torch.cat([seq, torch.multinomial(F.softmax(logits, -1), 1, generator=generator)], 1)
    return seq[:, 1:]


def nll_bound(model, prior, x, target, num_codes, levels=None):
    """The bound -log p(x) <= -log p(x | z_q(x)) - log p(z(x)) per example (B,), in nats (Sec. 3;
    q(z|x) is one-hot at z(x), Eq. 1, so the ELBO's KL is -log p(z(x)); log K per code under the
    uniform prior of Sec. 3.1). Returns (bound, reconstruction NLL, prior NLL, decoder output, codes)."""
    out, _, _, codes = model(x)
    recon = -decoder_log_prob(target, out, levels)
    prior_term = prior_nll(prior, codes.reshape(codes.shape[0], -1), num_codes)
    return recon + prior_term, recon, prior_term, out, codes


def exact_log_likelihood(model, prior, target, latent_shape, num_codes, levels=None, max_maps=2**16):
    """log p(x) = log sum_z p(z) p(x | e_z) per example (B,), in nats, by enumerating all
    K^L code maps (L = prod(latent_shape)): the exact likelihood the bound of nll_bound is an
    upper bound of (its sum holds the term of z(x)). Feasible for a few codes only: a 2D point's
    single code, or a toy model. model.decode(codes (M, *latent_shape)) -> decoder outputs."""
    maps = all_code_maps(num_codes, math.prod(latent_shape), target.device, max_maps)
    return log_marginal(target, model.decode(maps.reshape(-1, *latent_shape)), -prior_nll(prior, maps, num_codes),
                        levels)


def all_code_maps(num_codes, length, device=None, max_maps=2**16):
    """Every one of the K^L code maps, (K^L, L) int64, for exact sums over z."""
    if num_codes ** length > max_maps:
        raise ValueError(f"{num_codes}^{length} code maps are too many to enumerate (at most {max_maps})")
    return torch.cartesian_prod(*[torch.arange(num_codes, device=device)] * length).reshape(-1, length)


def log_marginal(target, out, log_prior, levels=None):
    """log sum_m p(z_m) p(x | z_m) per example (B,): out (M, ...) the decoder's output for each
    of M code maps z_m, log_prior (M,) their log-probabilities."""
    B = target.shape[0]
    log_joint = torch.stack([decoder_log_prob(target, out[m:m + 1].expand(B, *out.shape[1:]), levels)
                             for m in range(out.shape[0])], 1) + log_prior
    return torch.logsumexp(log_joint, 1)


def bits_per_dim(nats, dims):
    """Nats per example -> bits per dimension: nats / (dims ln 2)."""
    return nats / (dims * math.log(2))


def decoder_mean(out, levels=None):
    """E[x | z_q]: images in [0, 1] as sum_k p_k k / (L - 1), (B, C, H, W); points the mean (B, 2)."""
    if levels is None:
        return out.chunk(2, dim=1)[0]
    k = torch.arange(levels, device=out.device, dtype=torch.float32).reshape(1, 1, -1, 1, 1)
    return (F.softmax(out.float(), dim=2) * k).sum(2) / (levels - 1)


def decoder_sample(out, levels=None, mode=False, generator=None):
    """x ~ p(x | z_q), or its mode: images as integer levels (B, C, H, W) int64, drawn per
    sub-pixel; points (B, 2) from the Gaussian (its mean as the mode)."""
    if levels is None:
        mean, log_scale = out.float().chunk(2, dim=1)
        if mode:
            return mean
        return mean + torch.exp(log_scale) * torch.randn(mean.shape, generator=generator, device=mean.device)
    if mode:
        return out.argmax(2)
    B, C, Lv, H, W = out.shape
    probs = F.softmax(out.float(), dim=2).permute(0, 1, 3, 4, 2).reshape(-1, Lv)
    return torch.multinomial(probs, 1, generator=generator).reshape(B, C, H, W)


@torch.inference_mode()
def generate(model, prior, n, latent_shape, num_codes, levels=None, mode=False, generator=None,
             temperature=1.0):
    """Samples of the generative model: z ~ p(z) (sample_codes), then x ~ p(x | e_z) (or its mode)."""
    codes = sample_codes(prior, n, math.prod(latent_shape), num_codes, generator, temperature)
    out = model.decode(codes.reshape(n, *latent_shape))
    return decoder_sample(out, levels, mode, generator)


# ----------------------------------------------------------------------------------------
# VQ-VAE-2 (Razavi et al. 2019, arXiv 1906.00446)
# ----------------------------------------------------------------------------------------
# Two code maps: z_top at half the side of z_bottom (VQVAE2 below: the bottom encoder reads the
# decoded top, the decoder reads both), each quantised, straight-through and EMA-updated as
# above; a prior p(z_top) p(z_bottom | z_top) (HierarchicalPrior), trained after the autoencoder
# on its codes (Sec. 3.2, Algorithm 2).

def hierarchical_nll_bound(model, prior, x, target, levels=None):
    """-log p(x) <= -log p(x | z_top, z_bottom) - log p(z_top) - log p(z_bottom | z_top) per example
    (B,), in nats: nll_bound's bound (q one-hot on both maps, Eq. 1) with Razavi et al.'s prior
    (Sec. 3.2); prior(top, bottom) -> the two NLLs. Returns (bound, reconstruction NLL, top NLL,
    bottom NLL, decoder output, (top codes, bottom codes))."""
    out, _, _, codes = model(x)
    recon = -decoder_log_prob(target, out, levels)
    nll_top, nll_bottom = prior(*codes)
    return recon + nll_top + nll_bottom, recon, nll_top, nll_bottom, out, codes


def hierarchical_exact_log_likelihood(model, prior, target, top_shape, bottom_shape, num_codes, levels=None,
                                      max_maps=2**16):
    """log p(x) = log sum_{z_top, z_bottom} p(z_top) p(z_bottom | z_top) p(x | z_top, z_bottom) per
    example (B,), in nats, by enumerating all K^(L_top + L_bottom) pairs of maps (a toy model):
    what hierarchical_nll_bound bounds. model.decode(top, bottom) -> decoder outputs."""
    L_top = math.prod(top_shape)
    maps = all_code_maps(num_codes, L_top + math.prod(bottom_shape), target.device, max_maps)
    top, bottom = maps[:, :L_top].reshape(-1, *top_shape), maps[:, L_top:].reshape(-1, *bottom_shape)
    nll_top, nll_bottom = prior(top, bottom)
    return log_marginal(target, model.decode(top, bottom), -nll_top - nll_bottom, levels)


@torch.inference_mode()
def hierarchical_generate(model, prior, n, top_shape, bottom_shape, num_codes, levels=None, mode=False,
                          generator=None, temperature=1.0):
    """Samples (Razavi et al. Sec. 3.2): z_top ~ p(z_top), then z_bottom ~ p(z_bottom | z_top),
    then x ~ p(x | z_top, z_bottom) (or its mode). prior.top and prior.bottom are CodePriors."""
    top = sample_codes(prior.top, n, math.prod(top_shape), num_codes, generator, temperature)
    bottom = sample_codes(prior.bottom, n, math.prod(bottom_shape), num_codes, generator, temperature, cond=top)
    out = model.decode(top.reshape(n, *top_shape), bottom.reshape(n, *bottom_shape))
    return decoder_sample(out, levels, mode, generator)


# ----------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): the residual block of van den Oord et al. Sec. 4.1."""

    def __init__(self, ch):
        super().__init__()
        self.conv3 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv1 = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        return x + self.conv1(F.relu(self.conv3(F.relu(x))))


class ConvEncoder(nn.Module):
    """Sec. 4.1: `down` stride-2 4x4 convolutions, then `res_blocks` residual blocks, all `hidden`
    units wide (2 and 2 of 256 for CIFAR-10), then a 1x1 convolution to the code dimension D (as
    the Sonnet example's; the paper is silent), so that D need not equal the width. No 3x3
    convolution between the strided ones and the residual blocks, unlike the Sonnet example
    (PRESETS["cifar10"]). (B, C, H, W) -> (B, H / 2^down, W / 2^down, D)."""

    def __init__(self, in_ch, hidden, res_blocks, down, code_dim):
        super().__init__()
        layers, ch = [], in_ch
        for i in range(down):
            layers += [nn.Conv2d(ch, hidden, 4, stride=2, padding=1), nn.ReLU()]
            ch = hidden
        layers += [nn.Conv2d(ch, hidden, 3, padding=1)] if down == 0 else []
        layers += [ResBlock(hidden) for _ in range(res_blocks)] + [nn.ReLU(), nn.Conv2d(hidden, code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).permute(0, 2, 3, 1)


class ConvDecoder(nn.Module):
    """Sec. 4.1: a 3x3 convolution from D to `hidden` (no activation after it, as the Sonnet
    example's), `res_blocks` residual blocks, then `down` stride-2 4x4 transposed convolutions,
    all `hidden` wide but the last, which gives C * levels logits per pixel.
    (B, h, w, D) -> (B, C, levels, h 2^down, w 2^down)."""

    def __init__(self, out_ch, levels, hidden, res_blocks, down, code_dim):
        super().__init__()
        self.out_ch, self.levels = out_ch, levels
        layers = [nn.Conv2d(code_dim, hidden, 3, padding=1)] + [ResBlock(hidden) for _ in range(res_blocks)]
        layers += [nn.ReLU()]
        for i in range(down):
            last = i == down - 1
            layers += [nn.ConvTranspose2d(hidden, out_ch * levels if last else hidden, 4, stride=2, padding=1)]
            layers += [] if last else [nn.ReLU()]
        layers += [nn.Conv2d(hidden, out_ch * levels, 1)] if down == 0 else []
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        h = self.net(z.permute(0, 3, 1, 2))
        return h.reshape(h.shape[0], self.out_ch, self.levels, *h.shape[2:])


class PointEncoder(nn.Module):
    """2D point -> one D-dimensional vector, an MLP with two hidden ReLU layers: (B, 2) -> (B, 1, D)."""

    def __init__(self, dim, hidden, code_dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, code_dim))

    def forward(self, x):
        return self.net(x)[:, None]


class PointDecoder(nn.Module):
    """A code vector -> the mean and log standard deviation of a diagonal Gaussian: (B, 1, D) -> (B, 4).
    A function of the code alone, so each code carries its own Gaussian."""

    def __init__(self, dim, hidden, code_dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(code_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2 * dim))

    def forward(self, z):
        return self.net(z[:, 0])


class Codebook(nn.Module):
    """The K codes of one code map and their EMA statistics.

    The codebook (K, D) is a parameter trained by the codebook term of Eq. 3 (ema False) or
    moved by ema_codebook_update (ema True; it then takes no gradient). Buffers: cluster_size
    N_i and embed_sum m_i of App. A.1 (a fresh code counts as one assignment of its own vector:
    N_i = 1, m_i = e_i), and `unused`, the steps since each code was used; every code starts as
    dead (unused = restart_after), so the first step re-seeds the codes its batch leaves unused
    with its encoder outputs (a data-dependent initialisation).
    """

    def __init__(self, num_codes, code_dim, ema=True, decay=0.99, eps=1e-5, restart_after=100):
        super().__init__()
        self.num_codes, self.ema, self.decay, self.eps, self.restart_after = num_codes, ema, decay, eps, restart_after
        codebook = torch.empty(num_codes, code_dim).uniform_(-1 / num_codes, 1 / num_codes)
        self.codebook = nn.Parameter(codebook, requires_grad=not ema)
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_sum", codebook.clone())
        self.register_buffer("unused", torch.full((num_codes,), restart_after, dtype=torch.long))

    def codebooks(self):
        """The code maps' codebooks, top first: here the one."""
        return [self]

    @torch.no_grad()
    def update_codebook(self, counts, sums, candidates):
        """After an optimiser step: the EMA update (when ema), then the dead-code restart, from a
        batch's statistics (codebook_statistics) and candidate vectors (random_encoder_outputs).
        Returns the number of codes restarted."""
        if self.ema:
            size, total, codebook = ema_codebook_update(self.codebook, self.cluster_size, self.embed_sum,
                                                        counts, sums, self.decay, self.eps)
            self.cluster_size.copy_(size), self.embed_sum.copy_(total), self.codebook.copy_(codebook)
        self.unused.copy_(update_unused(self.unused, counts))
        if not self.restart_after:
            return 0
        codebook, size, total, unused, dead = restart_dead_codes(self.codebook, self.cluster_size, self.embed_sum,
                                                                 self.unused, candidates, self.restart_after)
        self.codebook.copy_(codebook), self.cluster_size.copy_(size), self.embed_sum.copy_(total)
        self.unused.copy_(unused)
        return int(dead.sum())


class VQVAE(Codebook):
    """Encoder -> quantize -> decoder around one Codebook (its parameters are VQVAE's own)."""

    def __init__(self, encoder, decoder, num_codes, code_dim, ema=True, decay=0.99, eps=1e-5, restart_after=100):
        super().__init__(num_codes, code_dim, ema, decay, eps, restart_after)
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x):
        """x in model space -> (decoder output, z_e, z_q, codes); the decoder sees z_st."""
        z_e = self.encoder(x)
        codes, z_q, z_st = quantize(z_e, self.codebook)
        return self.decoder(z_st), z_e, z_q, codes

    def encode(self, x):
        """The code map z(x): (B, *latent_shape) int64."""
        return quantize(self.encoder(x), self.codebook)[0]

    def decode(self, codes):
        """Decoder output for code maps (B, *latent_shape)."""
        return self.decoder(F.embedding(codes, self.codebook))


class VQVAE2(nn.Module):
    """Razavi et al. Sec. 3.1, Fig. 2a, Algorithm 1: two code maps of K codes of dimension D.

    The bottom encoder's trunk maps x to features at 1 / 2^down of the side; the top encoder
    halves them once more to z_e_top, quantised with the `top` Codebook; the top decoder maps the
    straight-through e_top back to the bottom's resolution, where it joins the trunk's features in
    a 1x1 convolution to give z_e_bottom (the bottom encoder conditioned on the decoded top),
    quantised with the `bottom` Codebook; the decoder reads the bottom codes beside the top codes
    upsampled once (a stride-2 4x4 transposed convolution). (B, C, H, W) -> decoder output as
    ConvDecoder's, with maps (H / 2^(down+1), W / 2^(down+1)) and (H / 2^down, W / 2^down)."""

    def __init__(self, in_ch, levels, hidden, res_blocks, down, num_codes, code_dim, **codebook):
        super().__init__()
        self.trunk = ConvEncoder(in_ch, hidden, res_blocks, down, hidden)
        self.encoder_top = ConvEncoder(hidden, hidden, res_blocks, 1, code_dim)
        self.decoder_top = ConvDecoder(code_dim, 1, hidden, res_blocks, 1, code_dim)  # 1 "level": D real outputs
        self.encoder_bottom = nn.Linear(hidden + code_dim, code_dim)  # a 1x1 convolution, channels last
        self.upsample = nn.ConvTranspose2d(code_dim, code_dim, 4, stride=2, padding=1)
        self.decoder = ConvDecoder(in_ch, levels, hidden, res_blocks, down, 2 * code_dim)
        self.top, self.bottom = Codebook(num_codes, code_dim, **codebook), Codebook(num_codes, code_dim, **codebook)
        self.num_codes = num_codes

    def codebooks(self):
        """The code maps' codebooks, top first."""
        return [self.top, self.bottom]

    def quantize_both(self, x):
        """Algorithm 1's encoder: ((z_e_top, z_e_bottom), quantize(top), quantize(bottom))."""
        h = self.trunk(x)  # (B, h, w, hidden)
        z_e_top = self.encoder_top(h.permute(0, 3, 1, 2))  # (B, h/2, w/2, D)
        top = quantize(z_e_top, self.top.codebook)
        decoded_top = self.decoder_top(top[2])[:, :, 0].permute(0, 2, 3, 1)  # (B, h, w, D)
        z_e_bottom = self.encoder_bottom(torch.cat([h, decoded_top], -1))
        return (z_e_top, z_e_bottom), top, quantize(z_e_bottom, self.bottom.codebook)

    def _decode(self, e_top, e_bottom):
        up = self.upsample(e_top.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.decoder(torch.cat([e_bottom, up], -1))

    def forward(self, x):
        """x in model space -> (decoder output, (z_e_top, z_e_bottom), (z_q_top, z_q_bottom),
        (codes_top, codes_bottom)); the decoder sees both z_st."""
        z_e, (c_top, q_top, st_top), (c_bottom, q_bottom, st_bottom) = self.quantize_both(x)
        return self._decode(st_top, st_bottom), z_e, (q_top, q_bottom), (c_top, c_bottom)

    def encode(self, x):
        """The code maps (z_top(x), z_bottom(x)), int64."""
        _, top, bottom = self.quantize_both(x)
        return top[0], bottom[0]

    def decode(self, top, bottom):
        """Decoder output for code maps top (B, h/2, w/2) and bottom (B, h, w)."""
        return self._decode(F.embedding(top, self.top.codebook), F.embedding(bottom, self.bottom.codebook))


class PriorBlock(nn.Module):
    """Pre-LayerNorm transformer block: causal multi-head self-attention (Vaswani et al. Eq. 1,
    Sec. 3.2.2) and a GELU MLP of width 4 d, each a residual branch; with `cross`, between them
    a non-causal attention from every position to a conditioning sequence (Sec. 3.2.3's
    encoder-decoder attention)."""

    def __init__(self, width, heads, dropout, cross=False):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)
        if cross:
            self.ln_cross, self.q_cross = nn.LayerNorm(width), nn.Linear(width, width)
            self.kv_cross, self.proj_cross = nn.Linear(width, 2 * width), nn.Linear(width, width)

    def _attend(self, q, k, v, causal):
        B, T, C = q.shape
        q, k, v = (t.reshape(B, t.shape[1], self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=causal)
        return a.transpose(1, 2).reshape(B, T, C)

    def forward(self, x, cond=None):
        C = x.shape[2]
        x = x + self.drop(self.proj(self._attend(*self.qkv(self.ln1(x)).split(C, dim=2), causal=True)))
        if cond is not None:  # cond (B, S, width): every position reads all of it
            k, v = self.kv_cross(cond).split(C, dim=2)
            x = x + self.drop(self.proj_cross(self._attend(self.q_cross(self.ln_cross(x)), k, v, causal=False)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CodePrior(nn.Module):
    """The prior over code maps: a causal transformer over the L codes in raster order, with
    learned positions and a start token (id num_codes, input only). idx (B, T) -> logits
    (B, T, K) of the next code at every position. `updates` counts the optimiser steps it has
    had (0: untrained). For a 2D point (L = 1) it is a learned categorical over the K codes.
    With cond_length S > 0 it is conditional: forward(idx, cond) with cond (B, S) codes, embedded
    with their own positions and read whole by cross-attention in every block."""

    def __init__(self, num_codes, length, layers=4, heads=4, width=128, dropout=0.0, cond_length=0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.num_codes, self.length, self.cond_length = num_codes, length, cond_length
        self.tok = nn.Embedding(num_codes + 1, width)
        self.pos = nn.Embedding(length, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PriorBlock(width, heads, dropout, cross=cond_length > 0) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_codes)
        if cond_length:
            self.cond_tok, self.cond_pos = nn.Embedding(num_codes, width), nn.Embedding(cond_length, width)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(self, idx, cond=None):
        """idx (B, T) inputs (start token first), cond (B, S) or None -> logits (B, T, K)."""
        T = idx.shape[1]
        if T > self.length:
            raise ValueError(f"{T} positions exceed the prior's {self.length}")
        if (cond is None) != (self.cond_length == 0) or (cond is not None and cond.shape[1] != self.cond_length):
            raise ValueError(f"this prior reads {self.cond_length} conditioning codes, "
                             f"given {None if cond is None else cond.shape[1]}")
        if cond is not None:
            cond = self.drop(self.cond_tok(cond) + self.cond_pos(torch.arange(cond.shape[1], device=idx.device)))
        x = self.drop(self.tok(idx) + self.pos(torch.arange(T, device=idx.device)))
        for block in self.blocks:
            x = block(x, cond)
        return self.head(self.ln_f(x))


class HierarchicalPrior(nn.Module):
    """VQ-VAE-2's prior p(z_top) p(z_bottom | z_top) (Razavi et al. Sec. 3.2): `top` a CodePrior
    over the top map, `bottom` a CodePrior over the bottom map that reads the whole top map by
    cross-attention (our choice where the paper uses PixelCNNs with self-attention and a
    conditioning stack). forward(top (B, h/2, w/2), bottom (B, h, w)) -> (-log p(z_top),
    -log p(z_bottom | z_top)), each (B,). `updates` counts the optimiser steps both have had."""

    def __init__(self, num_codes, top_length, bottom_length, layers=4, heads=4, width=128, dropout=0.0):
        super().__init__()
        self.num_codes = num_codes
        self.top = CodePrior(num_codes, top_length, layers, heads, width, dropout)
        self.bottom = CodePrior(num_codes, bottom_length, layers, heads, width, dropout, cond_length=top_length)

    @property
    def updates(self):
        return self.top.updates

    def forward(self, top, bottom):
        top, bottom = top.reshape(top.shape[0], -1), bottom.reshape(bottom.shape[0], -1)
        return prior_nll(self.top, top, self.num_codes), prior_nll(self.bottom, bottom, self.num_codes, cond=top)


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

@dataclass
class Config(RunConfig):
    """Defaults train the autoencoder, then the prior, on 8x8 digits on a laptop CPU in minutes."""
    steps: int = flag(3000, "training steps in all: the autoencoder's, then the prior's (see --stage)")
    batch_size: int = flag(64, "global batch size")
    lr: float = flag(1e-3, "Adam learning rate of the autoencoder")
    save_every: int = flag(500, "checkpoint, sample grid and reconstructions every this many steps")
    stage: str = flag("both", "both: the autoencoder for the first --ae-fraction of --steps, then the prior on its "
                      "codes; ae: only the autoencoder; prior: only the prior, on the codes of the autoencoder "
                      "--resume loads. Once the prior has trained, the autoencoder stays frozen",
                      choices=("both", "ae", "prior"))
    ae_fraction: float = flag(0.5, "with --stage both: the share of --steps that trains the autoencoder")
    # the autoencoder
    codes: int = flag(32, "codebook size K")
    code_dim: int = flag(16, "dimension D of a code vector")
    hidden: int = flag(64, "width of the encoder and decoder (units of the MLPs for 2D points)")
    down: int = flag(1, "stride-2 4x4 convolutions: the code map is the image side / 2^N")
    res_blocks: int = flag(2, "residual blocks in the encoder and in the decoder")
    beta: float = flag(0.25, "commitment weight beta of Eq. 3")
    codebook: str = flag("ema", "how the codes learn: ema (App. A.1) or loss (the codebook term of Eq. 3)",
                         choices=("ema", "loss"))
    decay: float = flag(0.99, "EMA decay gamma of the codebook statistics (App. A.1)")
    laplace_eps: float = flag(1e-5, "Laplace smoothing of the EMA cluster sizes")
    restart_after: int = flag(100, "re-seed a code unused for this many steps with an encoder output (0 = never)")
    levels: int = flag(1, "code maps: 1 (VQ-VAE) or 2 (VQ-VAE-2: a top map at half the side of the bottom map, "
                       "whose side --down sets; a top prior and a bottom prior conditioned on the top codes)",
                       choices=(1, 2))
    # the prior
    prior_lr: float = flag(1e-3, "Adam learning rate of the prior")
    prior_layers: int = flag(2, "transformer blocks of the prior")
    prior_heads: int = flag(4, "attention heads of the prior (must divide --prior-width)")
    prior_width: int = flag(64, "width of the prior's residual stream")
    prior_dropout: float = flag(0.3, "dropout in the prior (its training codes are few: 1497 digits)")
    grad_clip: float = flag(0.0, "clip the gradient norm of either network to this (0 = off, as the paper)")
    # sampling and evaluation
    decode: str = flag("mode", "images from codes: mode (the most probable level of every pixel) or sample "
                       "(a draw of every pixel from its categorical); 2D points are always drawn",
                       choices=("mode", "sample"))
    temperature: float = flag(1.0, "temperature of the prior when sampling codes")
    eval_n: int = flag(0, "evaluate the first N test examples (0 = all)")


PRESETS = {
    # The Config defaults but --ae-fraction (below): 8x8 -> 4x4 codes of K = 32; a 2-layer prior
    # over 16 positions. With --levels 2 the bottom map stays 4x4 (1/2 of the side) under a 2x2
    # top map (1/4): the paper's ratio of 2 between the maps (1/4 and 1/8 of 256), one level up,
    # since 1/8 of 8 leaves a single top code and 1/4 a bottom map of 2x2, too coarse to carry the
    # strokes. A third of the steps trains the autoencoder and two thirds the prior: the samples
    # are limited by the prior, not the decoder (measured 2026-12-06: decoded training codes score
    # a Frechet distance of 6.95 after 1000 autoencoder steps, against 7.12 for training images;
    # prior samples 36.7 after 1000 prior steps, 23.3 after 2000, 22.8 after 3000; the test bound
    # 2.316 -> 2.292 bits/dim).
    "digits": dict(ae_fraction=1 / 3),
    # 2D points: one code per point, a Gaussian per code; K = 64 codes (our choice).
    "points": dict(steps=4000, batch_size=256, lr=2e-3, codes=64, code_dim=8, hidden=128,
                   prior_layers=1, prior_width=32, prior_heads=2, prior_dropout=0.0, restart_after=20,
                   save_every=2000, n_samples=2000),
    # van den Oord et al. Sec. 4.1 (CIFAR-10): 2 stride-2 4x4 convolutions and 2 residual blocks of
    # 256 units, decoder mirrored; Adam 2e-4, batch 128, 250k autoencoder steps; EMA codebook with
    # gamma 0.99 (App. A.1), beta 0.25. The 8x8 code map with K = 512 is our reading of the paper
    # (K = 512 is stated for ImageNet; K and D for CIFAR-10 are not verified); D = 64 is ours, as is
    # the prior (a transformer where the paper used a PixelCNN) and its 250k further steps.
    # The networks follow Sec. 4.1's text. DeepMind's Sonnet example (examples/vqvae_example.ipynb,
    # read 2026-12-06) builds them otherwise: its encoder's first stride-2 convolution is half as
    # wide, and a 3x3 convolution with a ReLU follows the two strided ones (here the residual blocks
    # follow them directly); its residual blocks' 3x3 convolutions are 32 wide (256 here) and its
    # width 128. Its decoder's input convolution is the one here (3x3, D -> width, no ReLU before
    # the residual blocks), but its first transposed convolution halves the width and its last
    # gives 3 colour means for a squared error (here 256 logits per sub-pixel, a categorical).
    # --levels 2: an 8x8 bottom map under a 4x4 top map (1/4 and 1/8 of the side, the paper's ratios).
    "cifar10": dict(steps=500_000, batch_size=128, lr=2e-4, codes=512, code_dim=64, hidden=256, down=2,
                    res_blocks=2, decay=0.99, beta=0.25, prior_lr=3e-4, prior_layers=8, prior_width=256,
                    prior_heads=8, prior_dropout=0.1, save_every=10_000),
    # 28x28 -> 7x7 codes; sizes are ours (the paper gives no MNIST model).
    "mnist": dict(steps=40_000, batch_size=128, lr=2e-4, codes=128, code_dim=32, hidden=128, down=2,
                  res_blocks=2, prior_lr=3e-4, prior_layers=6, prior_width=256, prior_heads=8,
                  prior_dropout=0.1, save_every=5000),
}
PRESETS["fashion-mnist"] = PRESETS["mnist"]


def check_config(cfg):
    """The model's flags that their types let through; the image side against --down is checked
    in build, which knows the data."""
    for name in ("codes", "code_dim", "hidden", "prior_layers", "prior_heads", "prior_width"):
        check_range(cfg, name, 1)
    for name in ("down", "res_blocks", "beta", "laplace_eps", "restart_after", "grad_clip", "eval_n"):
        check_range(cfg, name, 0)
    check_range(cfg, "levels", 1, 2)
    check_range(cfg, "ae_fraction", 0, 1)
    check_range(cfg, "decay", 0, 1, open_high=True)
    check_range(cfg, "prior_dropout", 0, 1, open_high=True)
    check_range(cfg, "prior_lr", 0, open_low=True)
    check_range(cfg, "temperature", 0, open_low=True)
    if cfg.prior_width % cfg.prior_heads:
        raise UserError(f"--prior-width {cfg.prior_width} is not divisible by --prior-heads {cfg.prior_heads}; "
                        "use a width that is a multiple of the heads")
    if cfg.stage == "prior" and not (cfg.resume or cfg.sample or cfg.eval):
        raise UserError("--stage prior trains the prior of a trained autoencoder: give its checkpoint with "
                        "--resume [CKPT]")


# ----------------------------------------------------------------------------------------
# Data and pictures
# ----------------------------------------------------------------------------------------

def to_model_space(x, info):
    """The encoder's input: levels 0..L-1 -> x / (L - 1) * 2 - 1 in [-1, 1]; points unchanged."""
    return x.float() if info.kind == "points" else x.float() / (info.levels - 1) * 2 - 1


def latent_shape(cfg, info):
    """The (bottom) code map's shape: (H / 2^down, W / 2^down) for images, (1,) for a 2D point."""
    if info.kind == "points":
        return (1,)
    return (info.shape[1] // 2 ** cfg.down, info.shape[2] // 2 ** cfg.down)


def top_shape(cfg, info):
    """VQ-VAE-2's top code map: half the bottom map's side."""
    h, w = latent_shape(cfg, info)
    return (h // 2, w // 2)


def decoder_levels(info):
    """The categorical decoder's level count, None for the Gaussian decoder of points."""
    return None if info.kind == "points" else info.levels


def per_map(v):
    """A model output's per-map values as a list: [v], or VQ-VAE-2's [top, bottom]."""
    return list(v) if isinstance(v, tuple) else [v]


def stage_of(cfg, step, prior):
    """Which network a training step trains: the autoencoder until its share of --steps (or for
    all of them with --stage ae), then the prior; once the prior has trained, always the prior."""
    if cfg.stage == "prior" or int(prior.updates) > 0:
        return "prior"
    end = cfg.steps if cfg.stage == "ae" else int(cfg.steps * cfg.ae_fraction)
    return "ae" if step < end else "prior"


def draw(vqvae, prior, cfg, info, n, generator, mode=None):
    """n samples in data space: uint8 levels (n, C, H, W) or float points (n, 2)."""
    mode = (cfg.decode == "mode" if mode is None else mode) and info.kind == "image"
    if cfg.levels == 2:
        x = hierarchical_generate(vqvae, prior, n, top_shape(cfg, info), latent_shape(cfg, info), cfg.codes,
                                  decoder_levels(info), mode, generator, cfg.temperature)
    else:
        x = generate(vqvae, prior, n, latent_shape(cfg, info), cfg.codes, decoder_levels(info), mode, generator,
                     cfg.temperature)
    return x.to(torch.uint8) if info.kind == "image" else x.float()


@torch.no_grad()
def code_counts(vqvae, data, info, batch_size=1024):
    """How often each code is used over a data set (its whole code maps; VQ-VAE-2's bottom map):
    (K,) on the CPU."""
    device = _device(vqvae)
    counts = torch.zeros(vqvae.num_codes, dtype=torch.long)
    for i in range(0, len(data), batch_size):
        codes = vqvae.encode(to_model_space(data[i:i + batch_size].to(device), info))
        codes = codes[-1] if isinstance(codes, tuple) else codes
        counts += torch.bincount(codes.reshape(-1).cpu(), minlength=vqvae.num_codes)
    return counts


def save_samples(x, path, info, title):
    """Prior samples: an image grid (ten a row when they divide) or a scatter of points."""
    if info.kind == "points":
        save_scatter(x.cpu(), path, lim=info.lim, title=title)
    else:
        save_image_grid(x.cpu(), path, levels=info.levels, nrow=10 if x.shape[0] % 10 == 0 else None, title=title)


def _device(module):
    return next(module.parameters()).device


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@torch.no_grad()
def save_reconstructions(vqvae, x, path, info, cols=8):
    """Images: rows of inputs, each followed by a row of their reconstructions (the most
    probable level of every pixel given the codes). Points: the points coloured by their code,
    with each used code's decoder mean (a cross)."""
    device = _device(vqvae)
    out, _, _, codes = vqvae(to_model_space(x.to(device), info))
    if info.kind == "image":
        rec = out.argmax(2).to(torch.uint8).cpu()
        n = (x.shape[0] // cols) * cols
        rows = [t for i in range(0, n, cols) for t in (x[i:i + cols].cpu(), rec[i:i + cols])]
        save_image_grid(torch.cat(rows), path, levels=info.levels, nrow=cols,
                        title="rows 1, 3, 5, 7: training images; rows 2, 4, 6, 8: their reconstructions "
                              "(most probable level given the codes)")
        return
    plt = _pyplot()
    x, codes, means = x.cpu().numpy(), codes.reshape(-1).cpu().numpy(), decoder_mean(out).cpu().numpy()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(x[:, 0], x[:, 1], c=codes % 20, cmap="tab20", s=2, alpha=0.6)
    used = np.unique(codes, return_index=True)[1]
    ax.scatter(means[used, 0], means[used, 1], marker="x", c="black", s=20)
    ax.set_xlim(-info.lim, info.lim), ax.set_ylim(-info.lim, info.lim), ax.set_aspect("equal")
    ax.set_title(f"training points coloured by their code;\nx: the decoder's mean of each of the "
                 f"{len(used)} codes used", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_code_usage(counts, metrics_path, path):
    """Two panels: how often each code is used on (up to 10000 examples of) the training data,
    codes sorted by use, and the batch perplexity over the autoencoder's training (from
    metrics.jsonl) against K."""
    plt = _pyplot()
    K = len(counts)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    share = (counts.double() / counts.sum()).sort(descending=True).values.numpy()
    a.bar(np.arange(K), share, width=1.0)
    a.set_xlabel("codes, by use"), a.set_ylabel("share of the training code maps")
    a.set_title(f"code usage: {int((counts > 0).sum())} of {K} codes used, perplexity {float(perplexity(counts)):.1f}",
                fontsize=9)
    rows = []
    if metrics_path.exists():
        import json
        rows = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if "perplexity" in r]
    b.plot([r["step"] for r in rows], [r["perplexity"] for r in rows], label="batch perplexity")
    b.axhline(K, ls="--", c="grey", label=f"K = {K}")
    b.set_xlabel("step"), b.set_ylabel("perplexity"), b.legend(fontsize=8)
    b.set_title("codebook perplexity during the autoencoder's training", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_density(vqvae, prior, cfg, info, ds, out):
    """density.npz: the model's exact log-density (the mixture over its K codes) on
    common.density_on_grid's 128 x 128 grid; density.png beside the truth and exp(-bound)."""
    device = _device(vqvae)

    @torch.inference_mode()
    def exact(x):
        return exact_log_likelihood(vqvae, prior, x.to(device), (1,), cfg.codes).cpu()

    @torch.inference_mode()
    def bound(x):
        return -nll_bound(vqvae, prior, x.to(device), x.to(device), cfg.codes)[0].cpu()

    grid = density_on_grid(exact, info.lim, n=128)
    np.savez(out / "density.npz", log_density=grid, lim=info.lim)
    truth = density_on_grid(ds.log_prob, info.lim, n=128) if ds.log_prob is not None else ds.data
    save_density({"data": truth, f"exact: {cfg.codes} codes": grid,
                  "exp(-bound)": density_on_grid(bound, info.lim, n=128)}, out / "density.png", info.lim)


# ----------------------------------------------------------------------------------------
# Run code
# ----------------------------------------------------------------------------------------

MODEL = "vqvae"


def build(cfg, info):
    """(VQVAE, CodePrior), or (VQVAE2, HierarchicalPrior) with --levels 2, for a configuration
    and the data's description."""
    codebook = dict(ema=cfg.codebook == "ema", decay=cfg.decay, eps=cfg.laplace_eps, restart_after=cfg.restart_after)
    prior_size = (cfg.prior_layers, cfg.prior_heads, cfg.prior_width, cfg.prior_dropout)
    if info.kind == "points":
        if cfg.levels == 2:
            raise UserError(f"--levels 2 accepts image data only (it halves a code map); {info.name} is 2D points, "
                            "one code each: use --levels 1")
        return VQVAE(PointEncoder(info.shape[0], cfg.hidden, cfg.code_dim), PointDecoder(info.shape[0], cfg.hidden,
                     cfg.code_dim), cfg.codes, cfg.code_dim, **codebook), CodePrior(cfg.codes, 1, *prior_size)
    c, h, w = info.shape
    down = cfg.down + cfg.levels - 1  # the top map of --levels 2 halves the side once more
    if h % 2 ** down or w % 2 ** down:
        raise UserError(f"--down {cfg.down} with --levels {cfg.levels} halves the side {down} times; {info.name} has "
                        f"{h}x{w} images: use a --down whose 2^(N + levels - 1) divides {h} and {w}")
    L = math.prod(latent_shape(cfg, info))
    if cfg.levels == 2:
        return VQVAE2(c, info.levels, cfg.hidden, cfg.res_blocks, cfg.down, cfg.codes, cfg.code_dim, **codebook), \
            HierarchicalPrior(cfg.codes, math.prod(top_shape(cfg, info)), L, *prior_size)
    encoder = ConvEncoder(c, cfg.hidden, cfg.res_blocks, cfg.down, cfg.code_dim)
    decoder = ConvDecoder(c, info.levels, cfg.hidden, cfg.res_blocks, cfg.down, cfg.code_dim)
    return VQVAE(encoder, decoder, cfg.codes, cfg.code_dim, **codebook), CodePrior(cfg.codes, L, *prior_size)


def train(cfg):
    """Eq. 3 with Adam on the autoencoder (straight-through gradients, EMA or loss codebook, dead
    codes restarted), then maximum likelihood of the prior on the frozen autoencoder's codes;
    under torchrun every process trains on its slice of the global batch (DDP)."""
    with Training(cfg, MODEL) as run:
        ds = load_dataset(cfg.dataset, "train", cfg.data_dir)
        info = ds.info
        seed_everything(cfg.seed)  # the same initial weights on every process
        vqvae, prior = build(cfg, info)
        vqvae.to(run.device)
        prior.to(run.device)
        opt = torch.optim.Adam([p for p in vqvae.parameters() if p.requires_grad], lr=cfg.lr)
        prior_opt = torch.optim.Adam(prior.parameters(), lr=cfg.prior_lr)
        batches = Batches(ds, cfg.batch_size, run.dist, seed=cfg.seed)
        step = run.start(info, model=vqvae, prior=prior, opt=opt, prior_opt=prior_opt, batches=batches)
        if cfg.stage == "ae" and int(prior.updates) > 0:
            raise UserError("the prior in this checkpoint has trained on its autoencoder's codes; training the "
                            "autoencoder further would change them: use --stage prior, or start afresh with "
                            "--overwrite")
        model, model_prior = wrap_ddp(vqvae, run.dist, cfg.compile), wrap_ddp(prior, run.dist, cfg.compile)
        amp = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.amp)
        pixel_levels = decoder_levels(info)  # None for points; not cfg.levels, the code maps
        shown = ds.data[:32] if info.kind == "image" else ds.data[:2000]  # the inputs of the reconstructions

        def pictures(step):
            g = torch.Generator(device=run.device).manual_seed(cfg.seed)
            prior.eval()  # no dropout while sampling
            x = draw(vqvae, prior, cfg, info, cfg.n_samples, g)
            prior.train()
            untrained = " (the prior is untrained)" if int(prior.updates) == 0 else ""
            save_samples(x, run.out / f"samples_{step}.png", info, f"prior samples, step {step}{untrained}")
            save_reconstructions(vqvae, shown, run.out / f"recon_{step}.png", info)

        stage = None
        for step in run.steps(step, pictures):
            if stage != stage_of(cfg, step, prior):
                if stage is not None:  # a window of metrics holds one stage's lines only
                    run.logger.close()
                    run.logger = Logger(run.out, cfg.steps, enabled=run.dist.is_main, every=cfg.log_every)
                stage = stage_of(cfg, step, prior)
                run.logger.event("stage", trains="autoencoder" if stage == "ae" else "prior", from_step=step)
            x, _ = next(batches)
            x_in = to_model_space(x, info)
            target = x if info.kind == "image" else x_in
            if stage == "ae":  # Eq. 3 (on each map); the codes move after the optimiser step (EMA, restarts)
                with amp:
                    terms = vqvae_loss(model, x_in, target, cfg.beta, cfg.codebook == "loss", pixel_levels)
                loss = terms["loss"].mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(vqvae.parameters(), cfg.grad_clip)
                opt.step()
                restarted, used = 0, []
                for book, z_e, codes in zip(vqvae.codebooks(), *map(per_map, (terms["z_e"], terms["codes"]))):
                    counts, sums = codebook_statistics(z_e, codes, cfg.codes)
                    candidates = random_encoder_outputs(z_e, cfg.codes) * (run.dist.rank == 0)  # rank 0's
                    counts, sums, candidates = run.dist.sum(counts, sums, candidates)
                    restarted += book.update_codebook(counts, sums, candidates)
                    used.append(float(perplexity(counts)))
                top = dict(perplexity_top=used[0]) if cfg.levels == 2 else {}
                metrics = dict(recon=terms["recon"].mean(), commitment=terms["commitment"].mean(),
                               perplexity=used[-1], **top, restarted=restarted)
            else:  # the prior: maximum likelihood of the frozen autoencoder's code maps
                with torch.no_grad():
                    codes = vqvae.encode(x_in)
                with amp:
                    if cfg.levels == 2:
                        nll_top, nll_bottom = model_prior(*codes)
                        loss = (nll_top + nll_bottom).mean()
                    else:
                        loss = prior_nll(model_prior, codes.reshape(x.shape[0], -1), cfg.codes).mean()
                prior_opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(prior.parameters(), cfg.grad_clip)
                prior_opt.step()
                prior.updates.add_(1)
                metrics = dict(prior_top=nll_top.mean(), prior_bottom=nll_bottom.mean()) if cfg.levels == 2 else {}
            run.log(loss=loss, **metrics)
        run.draw(lambda: save_code_usage(code_counts(vqvae, ds.data[:10_000], info), run.out / "metrics.jsonl",
                                         run.out / "codes.png"))
    if run.dist.is_main and int(prior.updates) == 0:
        print("note: the prior has not trained yet (its samples are noise): continue with --stage prior --resume")
    run.report(["ckpt.pt", f"samples_{run.step}.png", f"recon_{run.step}.png", "codes.png", "metrics.jsonl",
                "loss.png"])


def evaluate(cfg):
    """--eval CKPT: the test-set bound -log p(x | z_q(x)) - log p(z(x)) with the learned prior,
    in nats per example and bits/dim, its terms (with --levels 2 the top and the bottom prior's
    NLLs), the uniform prior's bound, the reconstruction error and the codes' perplexity; on 2D
    sets also the exact NLL (the mixture over the K codes), density.npz and density.png."""
    (vqvae, prior), saved, info = load(cfg.eval, get_device(cfg.device))
    if cfg.fid is not None:
        run = dataclasses.replace(saved, decode=cfg.decode, temperature=cfg.temperature)
        return fid_evaluate(cfg, info, lambda n, g: draw(vqvae, prior, run, info, n, g))
    device = _device(vqvae)
    out = output_dir(cfg, cfg.eval)
    ds = load_dataset(info.name, "test", cfg.data_dir)
    data = ds.data[:cfg.eval_n] if cfg.eval_n else ds.data
    pixel_levels = decoder_levels(info)
    L = math.prod(latent_shape(saved, info)) + (math.prod(top_shape(saved, info)) if saved.levels == 2 else 0)
    parts = collections.defaultdict(list)
    start = time.time()
    with torch.inference_mode():
        for i in range(0, len(data), cfg.batch_size):
            x = data[i:i + cfg.batch_size].to(device)
            x_in = to_model_space(x, info)
            target = x if pixel_levels else x_in
            if saved.levels == 2:
                bound, recon, nll_top, nll_bottom, dec, codes = hierarchical_nll_bound(
                    vqvae, prior, x_in, target, pixel_levels)
                terms = dict(prior=nll_top + nll_bottom, prior_top=nll_top, prior_bottom=nll_bottom)
                parts["codes_top"].append(codes[0].reshape(-1).cpu())
                codes = codes[1]
            else:
                bound, recon, prior_term, dec, codes = nll_bound(vqvae, prior, x_in, target, saved.codes,
                                                                 pixel_levels)
                terms = dict(prior=prior_term)
            pixels = x.float() / (info.levels - 1) if pixel_levels else x_in  # pixels in [0, 1] for the error
            mse = ((decoder_mean(dec, pixel_levels) - pixels) ** 2).reshape(len(x), -1).mean(1)
            for name, value in dict(bound=bound, recon=recon, mse=mse, **terms).items():
                parts[name].append(value.double().cpu())
            parts["codes"].append(codes.reshape(-1).cpu())
            if info.kind == "points":
                parts["exact"].append(-exact_log_likelihood(vqvae, prior, x_in, (1,), saved.codes).double().cpu())
    v = {k: torch.cat(p) for k, p in parts.items()}
    nll, n = v["bound"].mean().item(), len(v["bound"])
    counts = torch.bincount(v["codes"], minlength=saved.codes)
    recon_nll = v["recon"].mean().item()
    extra = dict(n=n, stderr=v["bound"].std().item() / math.sqrt(n), recon_nll=recon_nll,
                 prior_nll=v["prior"].mean().item(), uniform_prior_nll=recon_nll + L * math.log(saved.codes),
                 recon_mse=v["mse"].mean().item(), perplexity=float(perplexity(counts)),
                 codes_used=int((counts > 0).sum()), prior_updates=int(prior.updates),
                 seconds=round(time.time() - start, 1))
    if saved.levels == 2:  # the bottom map's perplexity and codes above, the top map's here
        counts_top = torch.bincount(v["codes_top"], minlength=saved.codes)
        extra.update(prior_top_nll=v["prior_top"].mean().item(), prior_bottom_nll=v["prior_bottom"].mean().item(),
                     perplexity_top=float(perplexity(counts_top)), codes_used_top=int((counts_top > 0).sum()))
    if info.kind == "image":
        extra["bits_per_dim"] = bits_per_dim(nll, info.dims)
        extra["uniform_prior_bits_per_dim"] = bits_per_dim(extra["uniform_prior_nll"], info.dims)
    else:
        extra["exact_nll"] = v["exact"].mean().item()
        if ds.log_prob is not None:
            extra["entropy"], extra["entropy_se"] = entropy_estimate(info.name)
        write_density(vqvae, prior, saved, info, ds, out)
    Logger(out, 0).event("eval", split="test", nll=nll, **extra)
    report_files(out, ["metrics.jsonl", "density.npz", "density.png"])
    return dict(nll=nll, **extra)


def draw_samples(cfg):
    """--sample CKPT: n_samples from the prior, decoded (samples.png, samples.pt: uint8 levels for
    images, float points), and a "sample" event with samples per second."""
    (vqvae, prior), saved, info = load(cfg.sample, get_device(cfg.device))
    out = output_dir(cfg, cfg.sample)
    run = dataclasses.replace(saved, decode=cfg.decode, temperature=cfg.temperature)
    g = torch.Generator(device=_device(vqvae)).manual_seed(cfg.seed)
    start = time.time()
    x = draw(vqvae, prior, run, info, cfg.n_samples, g)
    seconds = time.time() - start
    untrained = " (the prior is untrained)" if int(prior.updates) == 0 else ""
    save_samples(x, out / "samples.png", info, f"VQ-VAE prior samples{untrained}")
    torch.save(x.cpu(), out / "samples.pt")
    Logger(out, 0).event("sample", n=cfg.n_samples, seconds=round(seconds, 3),
                         samples_per_s=cfg.n_samples / max(seconds, 1e-9), decode=cfg.decode,
                         temperature=cfg.temperature, prior_updates=int(prior.updates))
    report_files(out, ["samples.png", "samples.pt", "metrics.jsonl"])
    return x


def load(path, device="cpu"):
    """((VQVAE, CodePrior) in evaluation mode on `device`, the training Config, the data's description)."""
    ckpt = load_checkpoint(path, MODEL)
    cfg, info = saved_config(Config, ckpt)
    vqvae, prior = build(cfg, info)
    load_weights(vqvae, ckpt["model"], path)
    load_weights(prior, ckpt["prior"], path)
    return (vqvae.to(device).eval(), prior.to(device).eval()), cfg, info


def main(argv=None):
    """Train (default), or --eval CKPT, or --sample CKPT; a user's mistake exits with one line."""
    with user_errors():
        cfg = parse_config(Config, PRESETS, argv, doc=__doc__, kinds=("image", "points"))
        check_config(cfg)
        return dispatch(cfg, train, evaluate, draw_samples)


if __name__ == "__main__":
    main()
