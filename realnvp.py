"""RealNVP, Glow and MAF: normalizing flows with an exact likelihood, coupling and autoregressive.

Papers
  Dinh, Sohl-Dickstein & Bengio 2017, "Density estimation using Real NVP", arXiv 1605.08803.
  Dinh, Krueger & Bengio 2014, "NICE", arXiv 1410.8516: additive coupling (`--coupling additive`).
  Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1 Convolutions", arXiv 1807.03039.
  Papamakarios, Pavlakou & Murray 2017, "Masked Autoregressive Flow for Density Estimation", arXiv
      1705.07057, with MADE (Germain, Gregor, Murray & Larochelle 2015, arXiv 1502.03509).
  Theis, van den Oord & Bethge 2016, arXiv 1511.01844, Sec. 3.1: the dequantisation bound (`nll`).

A flow maps data x to z ~ N(0, I); every layer is `forward(x) -> (z, log|det dz/dx|)` and
`inverse(z) -> x`, so layers compose and each is checked alone against an autograd Jacobian
(tests/test_realnvp.py). The likelihood takes the flow as a callable: `log_prob`, `nll`.
Implemented: RealNVP's affine couplings (bounded scale), checkerboard and channel masks, squeeze,
the multi-scale architecture, batch norm or ActNorm as flow layers, the logit preprocessing;
Glow (`--arch glow`): ActNorm, the invertible 1x1 convolution (plain or `--conv1x1 lu`), its
coupling, levels with a learned prior at each split, sampling at a temperature, its input map
v/K - 1/2 (`--preprocess center`, its cifar10 preset); MAF (`--arch maf`): MADE layers with
reversed orderings and batch norm between them, on points and on flattened images; a cosine
learning-rate decay (`--decay cosine`, the points presets of realnvp and maf). `nll` is of
the *discrete* data for images (a bound), so bits/dim compare across the three. Ours: MAF's
log-scale bounded, 5 tanh(alpha / 5); Glow's NN without the official code's output rescaling.
Not implemented: RealNVP's running-average batch norm (App. E), its bottleneck blocks and flips;
Glow's learned top prior, Adamax, Polyak averaging, class conditioning; MAF MoG.

Run it
  python realnvp.py                                      # 8gaussians: density next to the true one
  python realnvp.py --dataset digits --arch glow         # 8x8 digits (also: --arch realnvp, maf)
  python realnvp.py --eval runs/realnvp-digits/ckpt.pt   # test NLL (nats) and bits/dim
  python realnvp.py --sample runs/realnvp-digits/ckpt.pt --n-samples 64 --temperature 0.7

Paper -> code (Dinh et al. 2017 unless named)
  Eq. 3         log p_X(x) = log p_Z(f(x)) + log|det df/dx^T|          change_of_variables, log_prob
  Eqs. 4-6, 9   y = b x + (1-b)(x exp(s(b x)) + t(b x)), log det = sum s coupling_forward
  Eqs. 7-8      x = b y + (1-b)(y - t(b y)) exp(-s(b y))                coupling_inverse, AffineCoupling
  Secs. 3.4-3.6 checkerboard / channel masks, squeeze, factor out half  *_mask, squeeze, Scale
  Sec. 3.7      batch norm as a flow layer; ResNets for s, t            BatchNormFlow, ResNet, MLP (2D)
  Sec. 4.1      v = x + u, logit(a + (1-2a) v/K), Jensen bound          dequantize, LogitPreprocess, nll
  NICE Sec. 3.2 additive coupling, s = 0                                AffineCoupling(affine=False)
  Glow 3.1      ActNorm y = (x - b) e^-s, data-dependent init           ActNorm, initialize_actnorm
  Glow 3.2      y = W x per pixel, log det = h w log|det W|;            InvConv1x1
                W = P L (U + diag s), log|det W| = sum log|s|           InvConv1x1(lu=True)
  Glow 3.3      (h, t) = NN(x_b), y_a = sigmoid(h + 2) x_a + t          GlowCoupling, GlowNet
  Glow Fig. 2   K steps per level; split z_2 ~ N(mu(z_1), sigma(z_1))   glow_step, GlowLevel, SplitPrior
  Glow Sec. 6   z ~ N(0, T^2 I): sampling at a temperature T            RealNVP.sample
  Glow code     y = v/K - 1/2, log det = -D log K                       CenterPreprocess
  MADE Sec. 4   masks 1[m(k) >= m(j)], output 1[m(d) > m(k)]            made_masks, MaskedLinear, MADE
  MAF Sec. 3.1  x_i = u_i exp(alpha_i) + mu_i, log det = -sum alpha_i   MaskedAutoregressive
  MAF Sec. 4    orderings reversed, batch norm between layers           maf_flow, Flattened (images)
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (POINT_SETS, Batches, Logger, RunConfig, Training, UserError, check_range, density_on_grid, dispatch,
                    entropy_estimate, flag, get_device, load_checkpoint, load_dataset, load_weights, output_dir,
                    parse_config, report_files, save_density, save_image_grid, save_scatter, saved_config,
                    seed_everything, user_errors, wrap_ddp)
from common import fid_evaluate  # --eval CKPT --fid N

LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------
# The change of variables (Eq. 3) and coupling layers (Eqs. 4-9)
# ----------------------------------------------------------------------------------------

def standard_normal_log_prob(z):
    """log N(z; 0, I) summed over all but the batch dimension: (B, ...) -> (B,). The prior p_Z."""
    return -0.5 * (z.pow(2) + LOG_2PI).flatten(1).sum(1)


def change_of_variables(log_pz, log_det):
    """Dinh et al. 2017, Eq. 3: log p_X(x) = log p_Z(f(x)) + log |det(df(x)/dx^T)|, per example."""
    return log_pz + log_det


def coupling_forward(x, b, st):
    """Affine coupling, Dinh et al. 2017, Eqs. 4-5 in the masked form of Eq. 9:

        y = b * x + (1 - b) * (x * exp(s(b * x)) + t(b * x)),

    b a binary mask (1 on the conditioning half x_a, broadcast over the batch) and
    st(b * x) -> (s, t), each shaped like x. The Jacobian is triangular with diagonal
    exp(s) on the transformed half and 1 elsewhere (Eq. 6), so log|det dy/dx| = sum (1-b) s.
    Returns (y, log_det (B,))."""
    xa = x * b
    s, t = st(xa)
    s, t = s * (1 - b), t * (1 - b)
    y = xa + (1 - b) * (x * torch.exp(s) + t)
    return y, s.flatten(1).sum(1)


def coupling_inverse(y, b, st):
    """Inverse of the coupling, Dinh et al. 2017, Eqs. 7-8 (masked, Eq. 9):
    x_a = y_a and x_b = (y_b - t(y_a)) * exp(-s(y_a)); s and t are never inverted, so they can
    be arbitrarily complex networks."""
    ya = y * b
    s, t = st(ya)
    s, t = s * (1 - b), t * (1 - b)
    return ya + (1 - b) * (y - t) * torch.exp(-s)


class AffineCoupling(nn.Module):
    """A coupling layer: `coupling_forward` / `coupling_inverse` with the network `net`.

    The scale is bounded, s = scale * tanh(s_raw) with a learned per-channel `scale` (the
    official code's "rescaling_scale"): |s| cannot blow up early in training. With
    affine=False it is NICE's additive coupling (Dinh et al. 2014, Sec. 3.2): s = 0, log_det = 0.
    `mask` has the shape of one example: (D,) for vectors, (C, H, W) for images."""

    def __init__(self, mask, net, affine=True):
        super().__init__()
        self.register_buffer("mask", mask.clone())
        self.net, self.affine = net, affine
        scale_shape = (mask.shape[0],) + (1,) * (mask.dim() - 1)
        self.scale = nn.Parameter(torch.ones(scale_shape)) if affine else None

    def st(self, xa):
        s_raw, t = self.net(xa).to(xa.dtype).chunk(2, dim=1)  # cast back from autocast's bfloat16
        s = self.scale * torch.tanh(s_raw) if self.affine else torch.zeros_like(t)
        return s, t

    def forward(self, x):
        return coupling_forward(x, self.mask.to(x.dtype), self.st)

    def inverse(self, z):
        return coupling_inverse(z, self.mask.to(z.dtype), self.st)

# ----------------------------------------------------------------------------------------
# Masks and squeeze (Secs. 3.4, 3.6)
# ----------------------------------------------------------------------------------------

def vector_mask(dim, parity):
    """Mask for vectors: b_i = 1 where i % 2 == parity (for 2D data: (1, 0) or (0, 1))."""
    return (torch.arange(dim) % 2 == parity).float()


def checkerboard_mask(shape, parity):
    """Spatial checkerboard mask (Dinh et al. 2017, Sec. 3.4, Fig. 3 left): b = 1 where
    (i + j) % 2 == parity, the same on every channel. shape = (C, H, W)."""
    c, h, w = shape
    ij = torch.arange(h)[:, None] + torch.arange(w)[None, :]
    return (ij % 2 == parity).float().expand(c, h, w).clone()


def channel_mask(shape, parity):
    """Channel-wise mask (Sec. 3.4, Fig. 3 right): b = 1 on the first half of the channels
    (parity 0) or the second half (parity 1). shape = (C, H, W), C even."""
    c, h, w = shape
    first = (torch.arange(c) < c // 2).float()
    b = first if parity == 0 else 1 - first
    return b[:, None, None].expand(c, h, w).clone()


def squeeze(x):
    """Sec. 3.6: every 2x2xC sub-square becomes 1x1x4C. (B, C, H, W) -> (B, 4C, H/2, W/2);
    a permutation, so its log-determinant is 0."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(z):
    """The inverse of `squeeze`: (B, 4C, H, W) -> (B, C, 2H, 2W)."""
    b, c4, h, w = z.shape
    z = z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c4 // 4, 2 * h, 2 * w)

# ----------------------------------------------------------------------------------------
# Normalisation layers as flows (Sec. 3.7; Glow Sec. 3.1)
# ----------------------------------------------------------------------------------------

def _feature_stats_dims(x):
    return [0] + list(range(2, x.dim()))  # statistics per feature/channel: over batch and space


def _channelwise(v, x):
    """v (C,) reshaped to (1, C, 1, ..., 1) so that it broadcasts against x (B, C, ...)."""
    return v.view(1, -1, *([1] * (x.dim() - 2))).to(x.dtype)


class BatchNormFlow(nn.Module):
    """Batch normalisation as a flow layer (Dinh et al. 2017, Sec. 3.7):

        y = (x - mu) / sqrt(sigma^2 + eps) * exp(log_gamma) + beta,
        log|det dy/dx| = sum_features (log_gamma - 0.5 log(sigma^2 + eps)) * (H * W).

    Training mode: mu, sigma^2 are the minibatch statistics (treated as constants in the
    determinant, as in the paper) and update the running averages; evaluation mode: the
    running averages, so the layer is a fixed bijection and the density normalises exactly.
    In training mode `inverse` reuses the statistics of the last forward pass: given them the
    layer is a bijection, which is what the train-mode invertibility check needs."""

    def __init__(self, num_features, momentum=0.05, eps=1e-4):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.log_gamma = nn.Parameter(torch.zeros(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self._batch_stats = None

    def forward(self, x):
        """y = (x - mean) / sqrt(var + eps) * exp(log_gamma) + beta, log_det = sum over the
        dimensions of log_gamma - 0.5 log(var + eps): batch statistics in training (the per-example
        log-determinant treats them as constants, Sec. 3.7), running statistics in evaluation."""
        if self.training:
            dims = _feature_stats_dims(x)
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(var.detach().to(self.running_var.dtype), self.momentum)
            self._batch_stats = (mean.detach(), var.detach())
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - _channelwise(mean, x)) * torch.rsqrt(_channelwise(var, x) + self.eps)
        y = y * _channelwise(self.log_gamma.exp(), x) + _channelwise(self.beta, x)
        per_feature = self.log_gamma.to(x.dtype) - 0.5 * torch.log(var.to(x.dtype) + self.eps)
        log_det = per_feature.sum() * math.prod(x.shape[2:])
        return y, log_det.expand(x.shape[0])

    def inverse(self, y):
        if self.training and self._batch_stats is not None:
            mean, var = self._batch_stats
        else:
            mean, var = self.running_mean, self.running_var
        x = (y - _channelwise(self.beta, y)) * _channelwise((-self.log_gamma).exp(), y)
        return x * torch.sqrt(_channelwise(var, y) + self.eps) + _channelwise(mean, y)


class ActNorm(nn.Module):
    """ActNorm (Kingma & Dhariwal 2018, Sec. 3.1): a per-channel affine map
    y = (x - shift) * exp(-log_scale), log|det| = -sum_c log_scale_c * (H * W), initialised
    from the first minibatch so that y has zero mean and unit variance per channel; afterwards
    ordinary parameters, the same in training and evaluation (no batch dependence)."""

    def __init__(self, num_features):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x):
        """Data-dependent initialisation (Glow, Sec. 3.1) from the batch x."""
        dims = _feature_stats_dims(x)
        self.shift.copy_(x.mean(dims))
        self.log_scale.copy_(x.std(dims, unbiased=False).clamp_min(1e-6).log())
        self.initialized.fill_(True)

    def forward(self, x):
        if not self.initialized and self.training:
            self.initialize(x)
        y = (x - _channelwise(self.shift, x)) * _channelwise((-self.log_scale).exp(), x)
        log_det = -self.log_scale.to(x.dtype).sum() * math.prod(x.shape[2:])
        return y, log_det.expand(x.shape[0])

    def inverse(self, y):
        return y * _channelwise(self.log_scale.exp(), y) + _channelwise(self.shift, y)

# ----------------------------------------------------------------------------------------
# Composing flows: the 2D flow and the multi-scale architecture (Sec. 3.6)
# ----------------------------------------------------------------------------------------

class FlowSequence(nn.ModuleList):
    """Composition of flow layers: log-determinants add (chain rule), inverses run in reverse."""

    def forward(self, x):
        log_det = x.new_zeros(x.shape[0])
        for layer in self:
            x, ld = layer(x)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, z):
        for layer in reversed(self):
            z = layer.inverse(z)
        return z


def norm_layer(norm, num_features):
    """The normalisation flow layer after each coupling: "batch" (BatchNormFlow, Sec. 3.7),
    "act" (ActNorm, Glow) or "none" (None)."""
    if norm not in ("batch", "act", "none"):
        raise ValueError(f"norm {norm!r}: accepted batch, act or none")
    return BatchNormFlow(num_features) if norm == "batch" else ActNorm(num_features) if norm == "act" else None


def couplings(masks, make_net, affine=True, norm="none"):
    """Coupling layers with the given masks, each followed by a normalisation layer.
    `make_net(mask)` returns the s, t network of one coupling (see AffineCoupling)."""
    layers = []
    for m in masks:
        layers.append(AffineCoupling(m, make_net(m), affine))
        n = norm_layer(norm, m.shape[0])
        if n is not None:
            layers.append(n)
    return layers


def point_flow(dim, n_couplings, make_net, affine=True, norm="act"):
    """The flow on R^dim (the toy 2-d data of Dinh et al. 2017, Fig. 1): n_couplings couplings
    whose masks alternate, (1, 0), (0, 1), (1, 0), ..., so each transforms what the one before kept."""
    return FlowSequence(couplings([vector_mask(dim, i % 2) for i in range(n_couplings)], make_net, affine, norm))


class Scale(nn.Module):
    """One scale of the multi-scale architecture (Dinh et al. 2017, Sec. 3.6).

    Not the last: 3 couplings with alternating checkerboard masks, squeeze, 3 couplings with
    alternating channel-wise masks, then half of the channels are factored out, z_i, and
    the other half h_i goes on to the next scale: (z_i, h_i) = f_i(h_{i-1}). The last scale:
    4 couplings with alternating checkerboard masks. The outputs are put back in the place of
    their pixels (unsqueeze), so z has the shape of x and the prior is N(0, I) on all of it.
    `make_net(mask)` returns the s, t network of one coupling; shape = (C, H, W) of one example,
    H and W divisible by 2^(n_scales - 1)."""

    def __init__(self, shape, n_scales, make_net, affine=True, norm="batch"):
        super().__init__()
        c, h, w = shape
        if n_scales < 1 or h % 2 ** (n_scales - 1) or w % 2 ** (n_scales - 1):
            raise ValueError(f"{n_scales} scales need n_scales >= 1 and {h}x{w} divisible by 2^(n_scales - 1)")
        self.last = n_scales == 1
        n_check = 4 if self.last else 3
        self.checker = FlowSequence(couplings([checkerboard_mask(shape, i % 2) for i in range(n_check)],
                                              make_net, affine, norm))
        if not self.last:
            sq = (4 * c, h // 2, w // 2)
            self.channel = FlowSequence(couplings([channel_mask(sq, i % 2) for i in range(3)],
                                                  make_net, affine, norm))
            self.next = Scale((2 * c, h // 2, w // 2), n_scales - 1, make_net, affine, norm)

    def forward(self, x):
        h, log_det = self.checker(x)
        if self.last:
            return h, log_det
        h, ld = self.channel(squeeze(h))
        z_out, h = h.chunk(2, dim=1)  # factor out half of the variables (Sec. 3.6)
        z_rest, ld_next = self.next(h)
        return unsqueeze(torch.cat([z_out, z_rest], 1)), log_det + ld + ld_next

    def inverse(self, z):
        if self.last:
            return self.checker.inverse(z)
        z_out, z_rest = squeeze(z).chunk(2, dim=1)
        h = torch.cat([z_out, self.next.inverse(z_rest)], 1)
        return self.checker.inverse(unsqueeze(self.channel.inverse(h)))


# ----------------------------------------------------------------------------------------
# Dequantisation, the logit preprocessing, the likelihood and sampling (Sec. 4.1)
# ----------------------------------------------------------------------------------------

def dequantize(x, u=None):
    """Uniform dequantisation (Sec. 4.1; Theis et al. 2016): integer levels x in
    {0, ..., K-1}^D -> v = x + u, u ~ U[0, 1)^D, a point of the cube [x, x + 1) that level x owns.
    `u` may be given (tests pass a fixed one). Where x + u rounds up to x + 1 (u within half a
    float spacing of x from 1: for x from 128 to 255 in float32, one draw of torch.rand in about
    130 000), v is a float just below x + 1 instead, so quantize(dequantize(x, u)) == x always."""
    x = x.to(torch.get_default_dtype()) if not x.is_floating_point() else x
    v = x + (torch.rand_like(x) if u is None else u.to(x))
    below = (x + 1) - (x + 1) * torch.finfo(x.dtype).eps  # one or two spacings below x + 1
    return torch.where(v < x + 1, v, below)


def quantize(v, levels):
    """Back to integer levels: floor(v) clipped to {0, ..., K-1} (the cube v lies in)."""
    return v.floor().clamp(0, levels - 1).to(torch.uint8 if levels <= 256 else torch.long)


class LogitPreprocess(nn.Module):
    """The preprocessing of Sec. 4.1 as a flow layer on the dequantised v in [0, K]^D:

        y = v / K,  p = alpha + (1 - 2 alpha) y,  w = logit(p) = log p - log(1 - p),
        log|det dw/dv| = sum_i [-log K + log(1 - 2 alpha) - log p_i - log(1 - p_i)].

    The squeeze into [alpha, 1 - alpha] keeps the logit away from +-inf at the borders. The
    paper takes alpha = .05; its official code (data_constraint = .9) maps y into [.05, .95],
    the symmetric form used here. The -log K term turns the density of y in [0,1]^D into one
    of v (see RealNVP.nll)."""

    def __init__(self, levels, alpha=0.05):
        super().__init__()
        if not 0 <= alpha < 0.5:
            raise ValueError(f"alpha {alpha}: the logit preprocessing takes alpha in [0, 0.5)")
        self.levels, self.alpha = levels, alpha

    def forward(self, v):
        p = self.alpha + (1 - 2 * self.alpha) * (v / self.levels)
        w = torch.log(p) - torch.log1p(-p)
        log_det = (math.log(1 - 2 * self.alpha) - math.log(self.levels) - torch.log(p) - torch.log1p(-p))
        return w, log_det.flatten(1).sum(1)

    def inverse(self, w):
        return self.levels * (torch.sigmoid(w) - self.alpha) / (1 - 2 * self.alpha)


def bits_per_dim(nats, dims):
    """Nats per example -> bits per dimension: nats / (dims ln 2)."""
    return nats / (dims * math.log(2))


class RealNVP(nn.Module):
    """A flow with a standard normal prior: `body` (a flow layer) after the preprocessing
    `pre` (images: `LogitPreprocess(levels, alpha)` unless another flow layer is given). x is
    continuous: points, or dequantised images v = x + u in [0, K]^D. Its forward is the flow,
    x -> (z, log|det dz/dx|), which `log_prob` and `nll` call; `sample` runs it backwards from
    the prior. Glow and MAF are RealNVPs with another body (and Glow with another `pre`)."""

    def __init__(self, body, event_shape, levels=None, alpha=0.05, pre=None):
        super().__init__()
        self.body, self.event_shape, self.levels = body, tuple(event_shape), levels
        self.pre = pre if pre is not None else LogitPreprocess(levels, alpha) if levels else None
        self.register_buffer("_anchor", torch.zeros(()))  # the model's device and dtype

    def forward(self, x):
        """x (B, *event_shape) -> (z, log|det dz/dx|) with the preprocessing included."""
        log_det = x.new_zeros(x.shape[0])
        if self.pre is not None:
            x, log_det = self.pre(x)
        z, ld = self.body(x)
        return z, log_det + ld

    def inverse(self, z):
        x = self.body.inverse(z)
        return self.pre.inverse(x) if self.pre is not None else x

    @torch.inference_mode()
    def sample(self, n, temperature=1.0):
        """x = f^{-1}(z), z ~ N(0, temperature^2 I): n samples on the model's device, in evaluation
        mode (running statistics). Images come back as integer levels (`quantize`)."""
        was_training = self.training
        self.eval()
        z = temperature * torch.randn(n, *self.event_shape, device=self._anchor.device, dtype=self._anchor.dtype)
        x = self.inverse(z)
        self.train(was_training)
        return quantize(x, self.levels) if self.levels else x


def log_prob(flow, x):
    """log p_X(x) by the change of variables (Eq. 3), per example (B,). `flow` is any callable
    x -> (z, log|det dz/dx|) (a RealNVP, or it wrapped for DDP); the prior is N(0, I)."""
    z, log_det = flow(x)
    return change_of_variables(standard_normal_log_prob(z), log_det)


def nll(flow, x, discrete=False, u=None):
    """Negative log-likelihood per example in nats; the training loss is its mean.

    Points (discrete=False): -log p(x), the continuous density. Images (discrete=True): x
    holds integer levels {0, ..., K-1}^D and the flow is a density p_Y on [0,1]^D of
    y = (x + u)/K. It defines a discrete distribution by integrating over the cube each x owns:

        P(x) = int_{[0,1)^D} p_Y((x + u)/K) K^{-D} du = E_u[ p_V(x + u) ],
        p_V(v) = p_Y(v / K) K^{-D}   (the density of v = K y),

    and by Jensen's inequality (Theis, van den Oord & Bethge 2016, arXiv 1511.01844, Sec. 3.1)

        log P(x) >= E_u[log p_V(x + u)] = E_u[log p_Y((x + u)/K)] - D log K.

    `log_prob` of v already includes -D log K and the preprocessing's log-determinant
    (LogitPreprocess; Glow's CenterPreprocess), so nll = -log p_V(x + u) with one draw of u (`dequantize`; `u` may be
    given) is an unbiased estimate of the bound -E_u[log p_V(x + u)] >= -log P(x). Bits/dim =
    nll / (D ln 2), as the paper reports. Integer x is computed in u's dtype when u is given,
    else in the default dtype."""
    if not discrete:
        return -log_prob(flow, x)
    if not x.is_floating_point():
        x = x.to(u.dtype if u is not None else torch.get_default_dtype())
    return -log_prob(flow, dequantize(x, u))


def scale_weight_penalty(model):
    """Sum of squares of the weight-scale parameters (Sec. 4.1, L2 5e-5 in the paper): the
    weight-norm magnitudes of the coupling networks and the couplings' tanh scales."""
    total = model._anchor.new_zeros(())
    for name, p in model.named_parameters():
        if name.endswith("original0") or name.endswith(".scale"):
            total = total + p.pow(2).sum()
    return total


def initialize_actnorm(flow, batches, discrete=False):
    """If the flow has ActNorm layers not yet initialised, run one forward pass in training mode
    on the next batch of `batches` (an iterator of (x, y)), so they initialise from it (Glow,
    Sec. 3.1). Under DDP this comes before wrapping, which then copies rank 0's values to every
    process."""
    if any(isinstance(m, ActNorm) and not m.initialized for m in flow.modules()):
        with torch.no_grad():
            flow.train()
            nll(flow, next(batches)[0], discrete)


# ----------------------------------------------------------------------------------------
# Glow (Kingma & Dhariwal 2018, arXiv 1807.03039)
# ----------------------------------------------------------------------------------------

# A step of flow is ActNorm (above), an invertible 1x1 convolution and an affine coupling
# (Sec. 3, Fig. 2a, Table 1); L levels of K steps make the multi-scale flow (Fig. 2b). Every
# layer here works on (B, C, H, W) images and on (B, C) vectors alike (2D points: C = 2, no
# pixels), so Glow also runs on the 2D sets.

def conv1x1(x, W):
    """y = W x at every position: the 1x1 convolution of x (B, C, ...) with the C x C matrix W."""
    return torch.einsum("ij,bj...->bi...", W.to(x.dtype), x).to(x.dtype)  # back from autocast's dtype


class InvConv1x1(nn.Module):
    """The invertible 1x1 convolution (Kingma & Dhariwal 2018, Sec. 3.2): y = W x at each of the
    h x w positions, log|det dy/dx| = h w log|det W|, W initialised as a random rotation
    (log|det W| = 0). lu=True: the LU-decomposed form W = P L (U + diag(s)), P a fixed
    permutation, L unit lower-triangular, U strictly upper-triangular, so
    log|det W| = sum_i log|s_i| costs O(C) instead of O(C^3)."""

    def __init__(self, channels, lu=False):
        super().__init__()
        self.lu = lu
        w = torch.linalg.qr(torch.randn(channels, channels))[0]
        if not lu:
            self.weight = nn.Parameter(w)
            return
        P, L, U = torch.linalg.lu(w)
        s = torch.diagonal(U)
        self.register_buffer("P", P)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower", torch.tril(torch.ones(channels, channels), -1))
        self.L, self.U = nn.Parameter(L), nn.Parameter(torch.triu(U, 1))
        self.log_s = nn.Parameter(s.abs().log())

    def weight_and_logdet(self):
        """(W, log|det W|)."""
        if not self.lu:
            return self.weight, torch.linalg.slogdet(self.weight)[1]
        eye = torch.eye(self.L.shape[0], dtype=self.L.dtype, device=self.L.device)
        L = self.L * self.lower + eye
        U = self.U * self.lower.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.P @ L @ U, self.log_s.sum()

    def forward(self, x):
        W, log_det_W = self.weight_and_logdet()
        log_det = log_det_W.to(x.dtype) * math.prod(x.shape[2:])  # h * w (1 for vectors)
        return conv1x1(x, W), log_det.expand(x.shape[0])

    def inverse(self, y):
        return conv1x1(y, torch.linalg.inv(self.weight_and_logdet()[0]))


class GlowCoupling(nn.Module):
    """Glow's affine coupling (Sec. 3.3, Table 1): x = (x_a, x_b) split along the channels,
    (h, t) = NN(x_b), s = sigmoid(h + 2), y_a = s * x_a + t, y_b = x_b, log|det| = sum log s.
    It is the masked coupling of Dinh et al. (`coupling_forward`, b = 1 on x_b) with the
    log-scale log sigmoid(h + 2) (the official code's bounded scale, s < 1; the paper writes
    exp(log s)). NN's last layer starts at zero (Sec. 3.3). affine=False: additive, s = 1."""

    def __init__(self, channels, net, event_dims, affine=True):
        super().__init__()
        self.ca, self.net, self.affine = channels // 2, net, affine  # x_a: the first C // 2 channels
        b = (torch.arange(channels) >= self.ca).float()
        self.register_buffer("mask", b.reshape(channels, *([1] * (event_dims - 1))))

    def st(self, xb_masked):
        h, t = self.net(xb_masked[:, self.ca:]).to(xb_masked.dtype).chunk(2, dim=1)
        log_s = F.logsigmoid(h + 2) if self.affine else torch.zeros_like(t)
        pad = xb_masked[:, self.ca:].new_zeros(xb_masked[:, self.ca:].shape)  # nothing on x_b
        return torch.cat([log_s, pad], 1), torch.cat([t, pad], 1)

    def forward(self, x):
        return coupling_forward(x, self.mask.to(x.dtype), self.st)

    def inverse(self, y):
        return coupling_inverse(y, self.mask.to(y.dtype), self.st)


def glow_step(channels, make_net, event_dims, lu=False, affine=True):
    """One step of flow (Sec. 3, Fig. 2a): ActNorm, invertible 1x1 convolution, affine coupling.
    `make_net(c_in, c_out)` returns the coupling's NN."""
    return FlowSequence([ActNorm(channels), InvConv1x1(channels, lu),
                         GlowCoupling(channels, make_net(channels - channels // 2, 2 * (channels // 2)),
                                      event_dims, affine)])


class SplitPrior(nn.Module):
    """Glow's split with a learned prior (Sec. 3, Fig. 2b; the official code's split2d):
    x = (h, z) along the channels, z ~ N(mu(h), sigma(h)^2) with (mu, log sigma) = NN(h),
    NN's last layer zero (the prior starts as N(0, I)). Written as a flow,
    eps = (z - mu(h)) / sigma(h), log|det| = -sum log sigma(h), so that
    log N(eps; 0, I) + log|det| = log N(z; mu(h), sigma(h)^2) and the prior of the whole flow
    stays N(0, I); sampling eps ~ N(0, T^2 I) gives z = mu + sigma * T * eps, Glow's temperature."""

    def __init__(self, channels, net):
        super().__init__()
        self.ch, self.net = channels - channels // 2, net  # h: the first channels - C // 2

    def mu_log_sigma(self, h):
        return self.net(h).to(h.dtype).chunk(2, dim=1)

    def forward(self, x):
        h, z = x[:, :self.ch], x[:, self.ch:]
        mu, log_sigma = self.mu_log_sigma(h)
        return torch.cat([h, (z - mu) * torch.exp(-log_sigma)], 1), -log_sigma.flatten(1).sum(1)

    def inverse(self, y):
        h, eps = y[:, :self.ch], y[:, self.ch:]
        mu, log_sigma = self.mu_log_sigma(h)
        return torch.cat([h, mu + torch.exp(log_sigma) * eps], 1)


class GlowLevel(nn.Module):
    """Levels of Glow's multi-scale architecture (Sec. 3, Fig. 2b; Dinh et al. 2017, Sec. 3.6):
    squeeze, K steps of flow, then, but for the last level, a split with the learned prior
    whose factored-out half eps leaves and whose other half goes on to the next level. As in
    `Scale` the latents are put back at their pixels, so z has the shape of x.
    shape = (C, H, W) with H and W divisible by 2^n_levels; make_net(c_in, c_out) builds the
    couplings' NN, make_prior(c_in, c_out) the split's."""

    def __init__(self, shape, n_levels, K, make_net, make_prior, lu=False, affine=True):
        super().__init__()
        c, h, w = shape
        if n_levels < 1 or h % 2 ** n_levels or w % 2 ** n_levels:
            raise ValueError(f"{n_levels} levels need n_levels >= 1 and {h}x{w} divisible by 2^n_levels")
        self.steps = FlowSequence([glow_step(4 * c, make_net, 3, lu, affine) for _ in range(K)])
        self.last = n_levels == 1
        if not self.last:
            self.split = SplitPrior(4 * c, make_prior(2 * c, 4 * c))
            self.next = GlowLevel((2 * c, h // 2, w // 2), n_levels - 1, K, make_net, make_prior, lu, affine)

    def forward(self, x):
        y, log_det = self.steps(squeeze(x))
        if self.last:
            return unsqueeze(y), log_det
        y, ld_split = self.split(y)
        h, eps = y.chunk(2, dim=1)
        z_rest, ld_next = self.next(h)
        return unsqueeze(torch.cat([z_rest, eps], 1)), log_det + ld_split + ld_next

    def inverse(self, z):
        y = squeeze(z)
        if not self.last:
            z_rest, eps = y.chunk(2, dim=1)
            y = self.split.inverse(torch.cat([self.next.inverse(z_rest), eps], 1))
        return unsqueeze(self.steps.inverse(y))


def glow_point_flow(dim, K, make_net, lu=False, affine=True):
    """K steps of flow on R^dim (the vectors as dim channels of one pixel): Glow on the 2D sets."""
    return FlowSequence([glow_step(dim, make_net, 1, lu, affine) for _ in range(K)])


class CenterPreprocess(nn.Module):
    """Glow's input map (the official code: x / 2^bits - 1/2) as a flow layer on the dequantised
    v in [0, K]^D: y = v / K - 1/2, log|det| = -D log K, the same -D log K as in
    LogitPreprocess, so `nll` is again a bound on -log P(x) of the discrete data."""

    def __init__(self, levels):
        super().__init__()
        self.levels = levels

    def forward(self, v):
        return v / self.levels - 0.5, v.new_full((v.shape[0],), -math.prod(v.shape[1:]) * math.log(self.levels))

    def inverse(self, y):
        return (y + 0.5) * self.levels


# ----------------------------------------------------------------------------------------
# MAF (Papamakarios, Pavlakou & Murray 2017, arXiv 1705.07057)
# ----------------------------------------------------------------------------------------

# Each layer is an autoregressive Gaussian whose mean and log-scale come from a MADE
# (Germain, Gregor, Murray & Larochelle 2015, arXiv 1502.03509): one network pass gives
# every (mu_i, alpha_i) with the dependence on x_{<i} only, enforced by masks.

def made_masks(order, hidden, n_hidden=2):
    """MADE's masks (Germain et al. 2015, Sec. 4): degrees m(x_d) = 1 + position of d in `order`
    (a permutation of 0..D-1); hidden degrees in 1..D-1 (assigned in turn here; the paper draws
    them at random); hidden masks 1[m(k) >= m(j)], output masks 1[m(x_d) > m(k)], so output d
    depends only on the inputs before d in the ordering. Returns [(H, D), (H, H)..., (D, H)]."""
    D = len(order)
    m_in = torch.empty(D, dtype=torch.long)
    m_in[torch.as_tensor(order)] = torch.arange(1, D + 1)
    m_hidden = torch.arange(hidden) % max(D - 1, 1) + 1
    masks = [(m_hidden[:, None] >= m_in[None, :]).float()]
    masks += [(m_hidden[:, None] >= m_hidden[None, :]).float() for _ in range(n_hidden - 1)]
    return masks + [(m_in[:, None] > m_hidden[None, :]).float()]


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (MADE, Sec. 4)."""

    def __init__(self, mask):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """A Gaussian MADE (Papamakarios et al. 2017, Sec. 3.1; Germain et al. 2015): x (B, D) ->
    (mu, alpha), each (B, D), with (mu_i, alpha_i) a function of x_{<i} in `order`. Two ReLU
    hidden layers of `hidden` units; the output layer starts at zero (ours: each layer starts
    as the identity, as the couplings do)."""

    def __init__(self, order, hidden):
        super().__init__()
        m1, m2, m_out = made_masks(order, hidden)
        self.net = nn.Sequential(MaskedLinear(m1), nn.ReLU(), MaskedLinear(m2), nn.ReLU(),
                                 MaskedLinear(torch.cat([m_out, m_out])))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x):
        return self.net(x).chunk(2, dim=1)


class MaskedAutoregressive(nn.Module):
    """One MAF layer (Papamakarios et al. 2017, Sec. 3.1):
        x_i = u_i exp(alpha_i) + mu_i,  (mu_i, alpha_i) = MADE(x_{<i}),
    so the density direction x -> u is one pass, u = (x - mu(x)) exp(-alpha(x)) with
    log|det du/dx| = -sum_i alpha_i (triangular Jacobian), and sampling u -> x takes D passes:
    after pass k the first k variables of the ordering are final."""

    def __init__(self, order, hidden, alpha_max=5.0):
        super().__init__()
        self.made, self.alpha_max = MADE(order, hidden), alpha_max

    def mu_alpha(self, x):
        mu, alpha = self.made(x)
        # |alpha| < alpha_max, alpha ~ MADE's output near 0 (ours: with the paper's unbounded alpha
        # a trained flow overflows float32 a little outside the data, exp(-alpha) compounding over layers)
        return mu, self.alpha_max * torch.tanh(alpha / self.alpha_max)

    def forward(self, x):
        mu, alpha = self.mu_alpha(x)
        return (x - mu) * torch.exp(-alpha), -alpha.sum(1)

    def inverse(self, u):
        x = torch.zeros_like(u)
        for _ in range(u.shape[1]):
            mu, alpha = self.mu_alpha(x)
            x = u * torch.exp(alpha) + mu
        return x


def maf_flow(dim, n_layers, hidden, norm="batch"):
    """MAF (Papamakarios et al. 2017, Sec. 3; experiments Sec. 4): n_layers MADE layers, the
    ordering reversed from one to the next, a normalisation flow layer between consecutive ones
    (the paper's batch norm, `BatchNormFlow`; or "act", "none")."""
    layers = []
    for k in range(n_layers):
        order = list(range(dim)) if k % 2 == 0 else list(reversed(range(dim)))
        layers.append(MaskedAutoregressive(order, hidden))
        n = norm_layer(norm, dim) if k < n_layers - 1 else None
        if n is not None:
            layers.append(n)
    return FlowSequence(layers)


class Flattened(nn.Module):
    """A flow on vectors applied to x (B, *shape) flattened to (B, D) in raster order (MAF on
    MNIST and CIFAR-10, Sec. 4); z comes back in x's shape, the log-determinant unchanged."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, x):
        z, log_det = self.flow(x.flatten(1))
        return z.reshape(x.shape), log_det

    def inverse(self, z):
        return self.flow.inverse(z.flatten(1)).reshape(z.shape)


# ----------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------

# The networks s and t of a coupling, computed from the conditioning half x_a = b * x:
# net(x_a) -> (s_raw, t) stacked along dimension 1, as AffineCoupling.st expects.

class MLP(nn.Module):
    """2D coupling network: x_a (B, D) -> (s_raw, t) as one (B, 2D) tensor. The last layer
    starts at zero so every coupling starts as the identity."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2 * dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, xa):
        return self.net(xa)


def _wn_conv(c_in, c_out, k):
    # Weight normalisation in s and t (Sec. 3.7); its magnitudes `original0` are the
    # "weight scale parameters" the paper's L2 term acts on (scale_weight_penalty).
    return nn.utils.parametrizations.weight_norm(nn.Conv2d(c_in, c_out, k, padding=k // 2))


class ResBlock(nn.Module):
    """Pre-activation residual block (Sec. 3.7: deep residual networks with batch norm and
    weight norm in s and t): x + conv(relu(bn(conv(relu(bn(x))))))."""

    def __init__(self, ch):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(ch), _wn_conv(ch, ch, 3)
        self.bn2, self.conv2 = nn.BatchNorm2d(ch), _wn_conv(ch, ch, 3)

    def forward(self, h):
        r = self.conv1(F.relu(self.bn1(h)))
        return h + self.conv2(F.relu(self.bn2(r)))


class ResNet(nn.Module):
    """Image coupling network: x_a (B, C, H, W) -> (B, 2C, H, W) holding (s_raw, t).

    The mask is given as an extra input channel, so the translation-equivariant convolutions
    know which pixels are the conditioning ones. The output layer starts at zero (its weight-norm
    magnitudes are zero): each coupling starts as the identity."""

    def __init__(self, mask, n_features, n_blocks):
        super().__init__()
        c = mask.shape[0]
        self.register_buffer("mask_channel", mask[:1].clone())  # (1, H, W)
        self.conv_in = _wn_conv(c + 1, n_features, 3)
        self.blocks = nn.Sequential(*[ResBlock(n_features) for _ in range(n_blocks)])
        self.bn_out = nn.BatchNorm2d(n_features)
        self.conv_out = _wn_conv(n_features, 2 * c, 3)
        with torch.no_grad():
            self.conv_out.parametrizations.weight.original0.zero_()
            self.conv_out.bias.zero_()

    def forward(self, xa):
        m = self.mask_channel.to(xa.dtype).expand(xa.shape[0], 1, *xa.shape[2:])
        h = self.blocks(self.conv_in(torch.cat([xa, m], 1)))
        return self.conv_out(F.relu(self.bn_out(h)))


class GlowNet(nn.Module):
    """Glow's coupling NN (Kingma & Dhariwal 2018, Sec. 3.3 and the official code): 3x3 conv,
    ActNorm, ReLU, 1x1 conv, ActNorm, ReLU, then a 3x3 conv that starts at zero, so every
    coupling starts as y_a = sigmoid(2) x_a. x (B, c_in, H, W) -> (B, c_out, H, W); on vectors
    (image=False) the convolutions are linear layers."""

    def __init__(self, c_in, c_out, width, image=True):
        super().__init__()
        layer = (lambda i, o, k: nn.Conv2d(i, o, k, padding=k // 2)) if image else (lambda i, o, k: nn.Linear(i, o))
        self.inp, self.norm1 = layer(c_in, width, 3), ActNorm(width)
        self.mid, self.norm2 = layer(width, width, 1), ActNorm(width)
        self.out = zero_layer(layer(width, c_out, 3))

    def forward(self, x):
        h = F.relu(self.norm1(self.inp(x))[0])  # ActNorm as a plain layer here: its log-det is not needed
        h = F.relu(self.norm2(self.mid(h))[0])
        return self.out(h)


def zero_layer(layer):
    """`layer` with its weight and bias set to zero (Glow, Sec. 3.3: zero initialisation); the
    split's prior network is zero_layer(Conv2d(c_in, c_out, 3)), so the prior starts as N(0, I)."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Config(RunConfig):
    dataset: str = flag("8gaussians", "dataset: a 2D set (8gaussians, checkerboard, rings, ...) or an image set")
    steps: int = flag(3000, "training steps (optimiser updates)")
    batch_size: int = flag(256, "global batch size")
    lr: float = flag(1e-3, "Adam learning rate")
    save_every: int = flag(1000, "steps between checkpoints and pictures")
    arch: str = flag("realnvp", "the flow: realnvp (Dinh et al. 2017), glow (Kingma & Dhariwal 2018) or maf "
                     "(Papamakarios et al. 2017); each has its presets (ARCH_PRESETS)",
                     choices=("realnvp", "glow", "maf"))
    n_couplings: int = flag(8, "2D: number of coupling layers (masks alternate); glow: K, steps of flow per level "
                            "(2D: in all); maf: MADE layers")
    hidden: int = flag(128, "2D: width of the two hidden layers of each coupling MLP; maf: of each MADE")
    n_scales: int = flag(2, "images: scales of the multi-scale architecture (n_scales - 1 squeezes); glow: L levels")
    n_blocks: int = flag(4, "images: residual blocks in each coupling network")
    n_features: int = flag(32, "images: feature maps in each coupling network (glow: the width of NN)")
    coupling: str = flag("affine", "affine (RealNVP, Glow) or additive (NICE: s = 0)", choices=("affine", "additive"))
    norm: str = flag("act", "normalisation flow layer after each coupling (maf: between MADEs): batch norm (the "
                     "paper's, images; maf's), ActNorm (Glow; 2D default) or none", choices=("batch", "act", "none"))
    conv1x1: str = flag("plain", "glow: the invertible 1x1 convolution, plain W or LU-decomposed (Sec. 3.2)",
                        choices=("plain", "lu"))
    preprocess: str = flag("logit", "images: logit(alpha + (1 - 2 alpha) v/K) (RealNVP) or center, v/K - 1/2 "
                           "(Glow's official code)", choices=("logit", "center"))
    warmup: int = flag(0, "steps of linear learning-rate warm-up (0: constant)")
    decay: str = flag("none", "learning rate after the warm-up: none (constant) or cosine (to 0 at --steps; "
                      "Loshchilov & Hutter 2017)", choices=("none", "cosine"))
    decay_steps: int = flag(0, "steps over which --decay cosine anneals, 0 after them (0: --steps); the presets "
                            "set it, so a run cut short with --steps and resumed follows the same rates")
    alpha: float = flag(0.05, "images: logit preprocessing maps x/K into [alpha, 1 - alpha] (Sec. 4.1)")
    l2: float = flag(0.0, "L2 coefficient on the weight-scale parameters (paper, images: 5e-5)")
    grad_clip: float = flag(100.0, "clip the global gradient norm (official code: 100; 0 = off)")
    temperature: float = flag(1.0, "standard deviation of the prior when sampling pictures")


PRESETS = {
    # MLP couplings on R^2; ActNorm rather than batch norm: batch statistics of 2D minibatches
    # are noisy, and the running averages would lag behind the fast-moving early training.
    # 12 couplings, 6000 steps and the cosine decay (issue 28; ours): 8 couplings for 2000
    # constant-rate steps left rings 0.52 nats above its entropy, with a tear in the density.
    "points": dict(steps=6000, batch_size=256, lr=1e-3, decay="cosine", decay_steps=6000, n_couplings=12, norm="act",
                   l2=0.0),
    # 8x8 digits: one squeeze (8x8 -> 4x4), a small version of the paper's convolutional flow.
    # Small on purpose: 1497 training images; 2 blocks of 32 maps reach 1.58 bits/dim on the
    # training set but 2.27 on the test set after 2000 steps.
    "digits": dict(steps=2000, batch_size=64, lr=1e-3, n_scales=2, n_blocks=1, n_features=16,
                   norm="batch", alpha=0.05, l2=5e-5, save_every=500),
    "digits-binary": dict(steps=2000, batch_size=64, lr=1e-3, n_scales=2, n_blocks=1, n_features=16,
                          norm="batch", alpha=0.05, l2=5e-5, save_every=500),
    # The paper reports no MNIST flow; this follows its smaller-dataset setting (4 residual
    # blocks of 32 maps) with two squeezes, 28 -> 14 -> 7.
    "mnist": dict(steps=50_000, batch_size=64, lr=1e-3, n_scales=3, n_blocks=4, n_features=32,
                  norm="batch", alpha=0.05, l2=5e-5, save_every=2000),
    "fashion-mnist": dict(steps=50_000, batch_size=64, lr=1e-3, n_scales=3, n_blocks=4, n_features=32,
                          norm="batch", alpha=0.05, l2=5e-5, save_every=2000),
    # Paper, Sec. 4.1: 8 residual blocks, 64 feature maps, one squeeze (downscale once) for
    # CIFAR-10; batch 64; Adam; L2 5e-5; alpha 0.05. It reports 3.49 bits/dim (test). The number
    # of steps is ours (the paper does not state it); lr 1e-3 is the official code's default.
    "cifar10": dict(steps=500_000, batch_size=64, lr=1e-3, n_scales=2, n_blocks=8, n_features=64,
                    norm="batch", alpha=0.05, l2=5e-5, save_every=5000),
}

# With --arch glow or maf these take the place of PRESETS. Glow on cifar10 follows the paper
# (K = 32, L = 3, NN width 512; 3.35 bits/dim reported) and the official code's CIFAR-10
# command (affine coupling, plain 1x1 convolution, lr 1e-3, 8 GPUs x 64 = batch 512, warm-up
# over 10 epochs ~ 1000 steps, inputs v/256 - 1/2). Ours: Adam (the code's default is Adamax),
# the number of steps, the gradient clipping, no learned top prior (learntop) and no data
# augmentation. The small presets and all of MAF's sizes and learning rates are ours (MAF's
# numbers are unverified, shared/PAPERS.md); MAF keeps the paper's batch norm between its MADE
# layers (on points 10 of them, 6000 steps with the cosine decay: rings 3.126 nats, against 3.453
# for 5 MADEs and 2000 constant-rate steps). On digits Glow takes RealNVP's logit: most pixels
# sit at the end levels 0 and 16, and after 2000 steps the centring gives 2.52 test bits/dim where
# the logit gives 2.17.
ARCH_PRESETS = {
    "glow": {
        "points": dict(steps=3000, batch_size=256, lr=1e-3, n_couplings=8, hidden=64, norm="act", l2=0.0),
        "image": dict(steps=2000, batch_size=64, lr=1e-3, warmup=100, n_scales=2, n_couplings=4, n_features=32,
                      norm="act", l2=0.0, save_every=500),
        "cifar10": dict(steps=500_000, batch_size=512, lr=1e-3, warmup=1000, n_scales=3, n_couplings=32,
                        n_features=512, norm="act", l2=0.0, conv1x1="plain", preprocess="center", save_every=5000),
    },
    "maf": {
        "points": dict(steps=6000, batch_size=256, lr=1e-3, decay="cosine", decay_steps=6000, n_couplings=10,
                       hidden=128, norm="batch", l2=0.0),
        "image": dict(steps=2000, batch_size=64, lr=1e-3, n_couplings=5, hidden=256, norm="batch", alpha=0.05,
                      l2=0.0, save_every=500),
    },
}


def check_config(cfg):
    """One-line errors for values the flags' types let through, and combinations that make no
    sense; whether --n-scales fits the images is checked in build (it needs the data)."""
    for name in ("n_couplings", "hidden", "n_scales", "n_features"):
        check_range(cfg, name, 1)
    for name in ("n_blocks", "l2", "grad_clip", "warmup", "decay_steps"):
        check_range(cfg, name, 0)
    check_range(cfg, "alpha", 0, 0.5, open_high=True)
    check_range(cfg, "temperature", 0, open_low=True)
    if cfg.arch == "glow" and cfg.norm != "act":
        raise UserError(f"--norm {cfg.norm} with --arch glow: Glow's step of flow has ActNorm; accepted: --norm act")
    if cfg.arch == "maf" and cfg.coupling != "affine":
        raise UserError(f"--coupling {cfg.coupling} with --arch maf: MAF has no coupling layers; accepted: "
                        "--coupling affine (the default)")
    if cfg.arch != "realnvp" and cfg.l2:
        raise UserError(f"--l2 {cfg.l2} acts on RealNVP's weight-norm and coupling scales, which --arch {cfg.arch} "
                        "does not have; accepted: --l2 0 (its preset)")
    if cfg.preprocess != "logit" and cfg.dataset in POINT_SETS:
        raise UserError(f"--preprocess {cfg.preprocess} is for images; accepted with --dataset {cfg.dataset}: "
                        "logit (the default, unused on points)")
    if cfg.arch != "glow" and cfg.conv1x1 != "plain":
        raise UserError(f"--conv1x1 {cfg.conv1x1} is Glow's; accepted with --arch {cfg.arch}: plain (the default), "
                        "or use --arch glow")


def learning_rate(step, cfg):
    """The learning rate of step `step` (0-based): linear warm-up over cfg.warmup steps (Glow's
    official code warms up over its first 10 epochs; --warmup 0: none), then constant or, with
    --decay cosine, lr (1 + cos(pi p)) / 2 at the fraction p of the remaining steps of
    --decay-steps (else --steps) (SGDR's
    annealing without restarts, Loshchilov & Hutter 2017, arXiv 1608.03983)."""
    lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
    if cfg.decay == "cosine" and step >= cfg.warmup:
        horizon = cfg.decay_steps or cfg.steps
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / max(horizon - cfg.warmup, 1))))
    return lr


# ----------------------------------------------------------------------------------------
# Data and pictures
# ----------------------------------------------------------------------------------------

# Data go into the flow as they come: points as floats, images as integer levels that `nll`
# dequantises (discrete = info.kind == "image"); samples come back the same way.

NAMES = {"realnvp": "RealNVP", "glow": "Glow", "maf": "MAF"}  # --arch as the pictures name it


def save_samples(x, path, info, title=None):
    """Samples as a scatter on [-lim, lim]^2 with `title` (points) or an image grid (levels)."""
    if info.kind == "points":
        save_scatter(x, path, lim=info.lim, title=title)
    else:
        save_image_grid(x, path, levels=info.levels)


@torch.no_grad()
def model_log_density(net, lim, n=128):
    """log p(x) of the flow (evaluation mode) on common.density_on_grid's n x n grid of [-lim, lim]^2."""
    net.eval()
    device = net._anchor.device
    return density_on_grid(lambda p: log_prob(net, p.to(device)).cpu(), lim, n)


@torch.no_grad()
def save_pictures(net, out, step, cfg, ds):
    """Samples; for 2D data the model's density next to the truth; data mapped to latents.
    Drawn from a forked random stream, so pictures never change the training run."""
    device = net._anchor.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(step)
        _draw_pictures(net, out, step, cfg, ds)


def _draw_pictures(net, out, step, cfg, ds):
    info = ds.info
    net.eval()
    x = net.sample(cfg.n_samples if info.kind != "points" else 2000, cfg.temperature)
    save_samples(x, out / f"samples_{step}.png", info, title=f"{NAMES[cfg.arch]} samples, step {step}")
    if info.kind == "points":
        truth = density_on_grid(ds.log_prob, info.lim) if ds.log_prob else ds.data
        save_density({"true" if ds.log_prob else "training data": truth,
                      NAMES[cfg.arch]: model_log_density(net, info.lim)}, out / "density.png", info.lim)
        z, _ = net(ds.data[:2000].to(net._anchor))
        save_latent_2d(ds.data[:2000], z.cpu(), out / "latent.png", info.lim)
    else:
        save_latent_grid(net, ds.data[:16], out / "latent.png", info)


def save_latent_2d(x, z, path, lim):
    """Data (left) and its image z = f(x) under the flow (right), coloured by angle in x."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colour = torch.atan2(x[:, 1], x[:, 0]).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.5))
    for ax, p, title in ((axes[0], x, "data x"), (axes[1], z, "latent z = f(x)")):
        ax.scatter(p[:, 0].numpy(), p[:, 1].numpy(), c=colour, cmap="hsv", s=2)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


LATENT_TITLE = "rows 1 and 3: images x\nrows 2 and 4: latents z = f(x), as Phi(z)\n(uniform noise when z ~ N(0, I))"


@torch.no_grad()
def save_latent_grid(net, xs, path, info):
    """16 images (integer levels) and their latents z = f(x + u): four rows of 8, each row of
    images above the row of its latents. z is shown through the normal CDF Phi (N(0,1) -> U(0,1)),
    so a latent that follows the prior looks like uniform noise."""
    xs = xs[:16].to(net._anchor.device)
    z, _ = net(dequantize(xs.to(net._anchor.dtype)))
    phi = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    x01 = xs.float().cpu() / (info.levels - 1)
    rows = [x01[:8], phi[:8].float().cpu(), x01[8:], phi[8:].float().cpu()]  # data above its latent
    save_image_grid(torch.cat(rows), path, nrow=8, title=LATENT_TITLE)


# ----------------------------------------------------------------------------------------
# Run code
# ----------------------------------------------------------------------------------------

MODEL = "realnvp"


def build(cfg, info):
    """The flow for a configuration and the data's description: on points MLP couplings
    (realnvp), K steps of flow (glow) or MADE layers (maf); on images the multi-scale
    convolutional flow (realnvp), Glow's levels (glow) or MAF on the flattened image (maf), after
    the logit preprocessing or Glow's centring (--preprocess)."""
    affine, lu = cfg.coupling == "affine", cfg.conv1x1 == "lu"
    if info.kind == "points":
        (dim,) = info.shape
        if cfg.arch == "glow":
            net = lambda i, o: GlowNet(i, o, cfg.hidden, image=False)  # noqa: E731
            body = glow_point_flow(dim, cfg.n_couplings, net, lu, affine)
        elif cfg.arch == "maf":
            body = maf_flow(dim, cfg.n_couplings, cfg.hidden, cfg.norm)
        else:
            body = point_flow(dim, cfg.n_couplings, lambda m: MLP(dim, cfg.hidden), affine, cfg.norm)
        return RealNVP(body, info.shape)
    c, h, w = info.shape
    halvings = cfg.n_scales if cfg.arch == "glow" else cfg.n_scales - 1  # glow squeezes at every level
    if cfg.arch != "maf" and (h % 2 ** halvings or w % 2 ** halvings):
        most = min((h & -h).bit_length(), (w & -w).bit_length()) - (cfg.arch == "glow")  # how often both halve
        raise UserError(f"--n-scales {cfg.n_scales} does not fit {h}x{w} images (every scale but the last halves "
                        f"the side; with --arch glow every level); accepted for {info.name}: 1 to {most}")
    if cfg.arch == "maf":
        body = Flattened(maf_flow(info.dims, cfg.n_couplings, cfg.hidden, cfg.norm))
    elif cfg.arch == "glow":
        body = GlowLevel(info.shape, cfg.n_scales, cfg.n_couplings, lambda i, o: GlowNet(i, o, cfg.n_features),
                         lambda i, o: zero_layer(nn.Conv2d(i, o, 3, padding=1)), lu, affine)
    else:
        body = Scale(info.shape, cfg.n_scales, lambda m: ResNet(m, cfg.n_features, cfg.n_blocks), affine, cfg.norm)
    pre = CenterPreprocess(info.levels) if cfg.preprocess == "center" else None  # None: LogitPreprocess
    return RealNVP(body, info.shape, levels=info.levels, alpha=cfg.alpha, pre=pre)


def train(cfg):
    """Maximum likelihood of the (dequantised) data with Adam and, for images, L2 on the scale
    weights (Sec. 4.1); under torchrun every process trains on its slice of the global batch (DDP)."""
    with Training(cfg, MODEL) as run:
        ds = load_dataset(cfg.dataset, "train", cfg.data_dir)
        info, discrete = ds.info, ds.info.kind == "image"
        seed_everything(cfg.seed)  # the same initial weights on every process
        net = build(cfg, info).to(run.device)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        batches = Batches(ds, cfg.batch_size, run.dist, seed=cfg.seed)
        if not cfg.resume:
            initialize_actnorm(net, batches, discrete)  # Glow Sec. 3.1; DDP then copies rank 0's values
        step = run.start(info, model=net, opt=opt, batches=batches)
        model = wrap_ddp(net, run.dist, cfg.compile)  # DDP over the processes, then torch.compile
        for step in run.steps(step, pictures=lambda step: save_pictures(net, run.out, step, cfg, ds)):
            model.train()  # the pictures leave the flow in evaluation mode
            x, _ = next(batches)
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, cfg)
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                nats = nll(model, x, discrete).mean()
            loss = nats + cfg.l2 * scale_weight_penalty(net) if cfg.l2 else nats
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            nats = nats.detach()
            run.log(loss=nats, **({"bits_per_dim": bits_per_dim(nats, info.dims)} if discrete else {}))
    run.report(["ckpt.pt", f"samples_{run.step}.png", "latent.png", "density.png", "metrics.jsonl", "loss.png"])


@torch.no_grad()
def evaluate(cfg):
    """--eval CKPT: test-set NLL (nats per example, one dequantisation draw per image) and
    bits/dim; on a 2D set also the true entropy, density.npz and density.png."""
    net, saved, info = load(cfg.eval, get_device(cfg.device))
    device = net._anchor.device
    out = output_dir(cfg, cfg.eval)
    ds = load_dataset(info.name, "test", cfg.data_dir)
    torch.manual_seed(cfg.seed)
    if cfg.fid is not None:
        return fid_evaluate(cfg, info, lambda n, g: net.sample(n, cfg.temperature))
    v = torch.cat([nll(net, x.to(device), info.kind == "image").double().cpu() for x in ds.data.split(500)])
    fields = {"nll": v.mean().item(), "nll_se": v.std().item() / math.sqrt(len(v)), "n": len(v)}
    if info.kind == "image":
        fields["bits_per_dim"] = bits_per_dim(fields["nll"], info.dims)
    else:
        if ds.log_prob is not None:
            fields["true_entropy"], fields["true_entropy_se"] = entropy_estimate(info.name)
        log_density = model_log_density(net, info.lim)
        np.savez(out / "density.npz", log_density=log_density, lim=info.lim)
        truth = density_on_grid(ds.log_prob, info.lim) if ds.log_prob else ds.data
        save_density({"true" if ds.log_prob else "test data": truth, NAMES[saved.arch]: log_density},
                     out / "density.png", info.lim)
    Logger(out, 0).event("eval", split="test", dataset=info.name, **fields)
    report_files(out, ["metrics.jsonl", "density.npz", "density.png"])
    return fields


def draw_samples(cfg):
    """--sample CKPT: n_samples samples at --temperature to samples.png and samples.pt (for
    benchmarks/quality.py), and a "sample" event with samples per second."""
    net, saved, info = load(cfg.sample, get_device(cfg.device))
    out = output_dir(cfg, cfg.sample)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    x = net.sample(cfg.n_samples, cfg.temperature)
    seconds = time.perf_counter() - t0
    save_samples(x, out / "samples.png", info, title=f"{NAMES[saved.arch]} samples")
    torch.save(x.cpu(), out / "samples.pt")
    Logger(out, 0).event("sample", n=cfg.n_samples, seconds=seconds, samples_per_s=cfg.n_samples / max(seconds, 1e-9))
    report_files(out, ["samples.png", "samples.pt", "metrics.jsonl"])
    return x


def load(path, device="cpu"):
    """(flow in evaluation mode on `device`, its training Config, its data's description) from a
    checkpoint of realnvp.py."""
    ckpt = load_checkpoint(path, MODEL)
    cfg, info = saved_config(Config, ckpt)
    net = build(cfg, info)
    load_weights(net, ckpt["model"], path)
    return net.to(device).eval(), cfg, info


def main(argv=None):
    """Train (default), or --eval CKPT, or --sample CKPT; a user's mistake exits with one line."""
    with user_errors():
        cfg = parse_config(Config, PRESETS, argv, doc=__doc__, kinds=("image", "points"), arch_presets=ARCH_PRESETS)
        check_config(cfg)
        return dispatch(cfg, train, evaluate, draw_samples)


if __name__ == "__main__":
    main()
