"""PixelCNN, PixelRNN (Row LSTM, Diagonal BiLSTM), Gated PixelCNN, PixelCNN++: autoregressive image models.

Papers
  van den Oord, Kalchbrenner & Kavukcuoglu 2016, "Pixel Recurrent Neural Networks", arXiv 1601.06759:
    the softmax over levels, masks A/B with R -> G -> B, the PixelCNN, Row LSTM, Diagonal BiLSTM.
  van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders", arXiv 1606.05328.
  Salimans, Karpathy, Chen & Kingma 2017, "PixelCNN++", arXiv 1701.05517; where it is silent, its
    official code (github.com/openai/pixel-cnn).
Implemented: every network above with its likelihood (a softmax over the L levels of each sub-pixel,
or PixelCNN++'s discretized logistic mixture over whole pixels), the exact NLL in nats and bits/dim
of the discrete data (no dequantisation), a batched raster-order sampler with image completion and a
fast path (the Gated stacks' vertical stack once per row, the Row LSTM's states carried row by row),
class-conditional biases (--cond), binarised images (--binarize), 2D points as a 1 x 2 image of bins.
Not implemented: PixelRNN's multi-scale model, the Gated PixelCNN's location-dependent conditioning
and decoder use, PixelCNN++'s data-dependent initialisation, per-layer sampling caches (1704.06001).

Run it
  python pixelcnn.py [--arch rowlstm|diagonal-bilstm|pixelcnn|pixelcnn++] [--dataset cifar10]
  python pixelcnn.py --sample runs/pixelcnn-digits/ckpt.pt      # samples and completions
  python pixelcnn.py --eval runs/pixelcnn-digits/ckpt.pt        # test NLL, bits/dim

Map (x_i a sub-pixel in raster order, R -> G -> B; c_x = 2x / (L - 1) - 1 the bin centre)
  chain rule, Oord Eq. 1           p(x) = prod_i p(x_i | x_<i)                 log_prob, nll, bits_per_dim
  softmax, Oord Sec. 2.2           p(x_i = l | .) = softmax(logits_i)_l         categorical_log_prob
  masks, Oord Sec. 3.4, Fig. 2     A: g_in < g_out, B: g_in <= g_out at centre   causal_mask, MaskedConv2d
  PixelCNN, Oord Sec. 3.5, Fig. 5  7x7 A, residual (1x1, kxk B, 1x1), 2 x 1x1   PixelCNN, ResidualBlock
  LSTM, Oord Eq. 3                 c = f*c' + i*g, h = o*tanh(c)                 lstm_cell, gate_conv
  Row LSTM, Oord Sec. 3.1          gates = K^ss (*) h_{i-1} + K^is (*) x_i       RowLSTMLayer, RowLSTM
  Diagonal BiLSTM, Oord Sec. 3.2   skew, column LSTM, R-to-L shifted down a row  skew, DiagonalBiLSTM
  Gated PixelCNN Eq. 2, 4          tanh(W_f*x + V_f h) * sigmoid(W_g*x + V_g h)  gate, GatedBlock
  Salimans Eq. 2, Sec. 2.2         sum_k pi_k prod_c [s((c_x+d-mu)/s) - s((c_x-d-mu)/s)]
                                                                                 logistic_mixture_log_prob
  Salimans Sec. 2.3-2.5            two streams, 3 resolutions, short-cuts        PixelCNNpp, GatedResnet
  ancestral sampling               x_i ~ p(x_i | x_<i), one pass per sub-pixel   sample
  2D points (ours)                 log p(x) = log P(bins) - 2 log w              points_log_prob

Networks are called model(x, y=None) -> (B, P, H, W), x in [-1, 1] (y: labels); model(x, y, row=i,
cache=dict) returns row i alone, what the fast sampler calls. P = C * L for the softmax (channel c's
logits at c*L .. c*L+L-1) and K (1 + 2C + C(C-1)/2) for a K-component mixture.
"""
import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (EMA, Batches, Logger, RunConfig, Training, UserError, check_range, density_on_grid, dispatch,
                    entropy_estimate, flag, get_device, load_checkpoint, load_dataset, load_weights, output_dir,
                    parse_config, report_files, save_density, save_image_grid, save_scatter, saved_config,
                    seed_everything, user_errors, wrap_ddp)
from common import fid_evaluate  # --eval CKPT --fid N

LIKELIHOODS = ("categorical", "mixture")
LOG_SCALE_MIN = -7.0  # floor of a logistic's log-scale, as the official PixelCNN++ code


# ----------------------------------------------------------------------------------------
# Masked convolutions
# ----------------------------------------------------------------------------------------

def channel_groups(n, colors):
    """The colour group (0 = R, 1 = G, 2 = B) of each of n feature maps: the maps are split into
    `colors` contiguous groups of near-equal size, as PixelRNN Sec. 3.4 splits the maps of every
    layer into one group per colour. (n,) int64."""
    return torch.arange(n) * colors // n


def causal_mask(c_out, c_in, kh, kw, centre, mask_type, colors):
    """The 0/1 mask (c_out, c_in, kh, kw) of a masked convolution (PixelRNN Sec. 3.4, Fig. 2).

    The tap `centre` sits on the output's own pixel. Taps before it in raster order (rows above,
    then the centre row left of it) are kept, taps after it are zeroed. At the centre tap an
    output map of colour group g sees input maps of groups < g (mask A, the first layer: a
    sub-pixel never sees itself) or <= g (mask B, every later layer), so R sees nothing of its
    pixel, G sees R, B sees R and G. With colors = 1, mask A drops the centre and mask B keeps it.
    """
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type {mask_type!r} is not accepted; use 'A' or 'B'")
    ci, cj = centre
    if not (0 <= ci < kh and 0 <= cj < kw):
        raise ValueError(f"centre {centre} lies outside the {kh}x{kw} kernel")
    spatial = torch.zeros(kh, kw)
    spatial[:ci] = 1
    spatial[ci, :cj] = 1
    g_out, g_in = channel_groups(c_out, colors)[:, None], channel_groups(c_in, colors)[None, :]
    mask = spatial.expand(c_out, c_in, kh, kw).clone()
    mask[:, :, ci, cj] = (g_in < g_out if mask_type == "A" else g_in <= g_out).float()
    return mask


class MaskedConv2d(nn.Conv2d):
    """A convolution whose weights are multiplied by causal_mask (PixelRNN Sec. 3.4).

    The input is padded so that the `centre` tap (default: the kernel's middle) lands on the
    output's pixel: the spatial size is kept. The mask is a non-persistent buffer (rebuilt from
    the arguments); the masked weights are stored and counted, and stay zero in effect.
    """

    def __init__(self, c_in, c_out, kernel_size, mask_type, colors=1, centre=None):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        super().__init__(c_in, c_out, (kh, kw))
        ci, cj = centre if centre is not None else (kh // 2, kw // 2)
        self.pad = (cj, kw - 1 - cj, ci, kh - 1 - ci)  # left, right, top, bottom
        self.register_buffer("mask", causal_mask(c_out, c_in, kh, kw, (ci, cj), mask_type, colors),
                             persistent=False)

    def forward(self, x):
        return F.conv2d(F.pad(x, self.pad), self.weight * self.mask, self.bias)


# ----------------------------------------------------------------------------------------
# Gated activation units and the two stacks
# ----------------------------------------------------------------------------------------

def gate(x):
    """y = tanh(W_f * x) * sigmoid(W_g * x) (Gated PixelCNN Eq. 2), on the 2p pre-activations x
    (B, 2p, H, W) -> (B, p, H, W). f and g are interleaved (f_k = x[2k], g_k = x[2k+1]) so that
    each pair falls in one colour group of channel_groups (p a multiple of the colours)."""
    return torch.tanh(x[:, 0::2]) * torch.sigmoid(x[:, 1::2])


def _label_bias(emb, y):
    """V^T h for a one-hot h: the row of the label's embedding, shaped (B, C, 1, 1) (Eq. 4)."""
    if emb is None:
        return 0.0
    if y is None:
        raise ValueError("a class-conditional network needs labels y")
    return emb(y)[:, :, None, None]


class GatedBlock(nn.Module):
    """One layer of the Gated PixelCNN (Gated PixelCNN paper, Sec. 2.2, Fig. 2).

    Vertical stack: a (k//2 + 1) x k convolution over the rows up to the feature's own row; the
    vertical features of row r see only image rows < r (the first layer, mask A, uses a k//2 x k
    kernel over the rows strictly above), so they can feed the horizontal stack of row r with no
    shift and no blind spot. Horizontal stack: a 1 x (k//2 + 1) masked convolution over the row,
    up to the pixel itself (its channel mask A in the first layer, B after), plus a 1 x 1 link from
    the vertical pre-activations, gated (Eq. 2), a 1 x 1 convolution and, after the first layer,
    a residual connection. With num_classes > 0 each stack's pre-activation gets a learned bias
    per class (Eq. 4).
    """

    def __init__(self, c_in, p, k, mask_type, colors=1, num_classes=0):
        super().__init__()
        if p % colors:
            raise ValueError(f"hidden width {p} is not a multiple of the {colors} colour channels")
        if k % 2 == 0 or k < 3:
            raise ValueError(f"kernel size {k} is not accepted; use an odd size >= 3")
        first = mask_type == "A"
        self.v_pad = (k // 2, k // 2, k // 2, -1 if first else 0)  # -1 drops the last row: rows < r only
        self.v_conv = nn.Conv2d(c_in, 2 * p, (k // 2 if first else k // 2 + 1, k))
        self.v_to_h = nn.Conv2d(2 * p, 2 * p, 1)
        self.h_conv = MaskedConv2d(c_in, 2 * p, (1, k // 2 + 1), mask_type, colors, centre=(0, k // 2))
        self.h_out = MaskedConv2d(p, p, 1, "B", colors)
        self.residual = not first
        self.v_cond = nn.Embedding(num_classes, 2 * p) if num_classes else None
        self.h_cond = nn.Embedding(num_classes, 2 * p) if num_classes else None

    def vertical(self, v, y=None):
        """v (B, c_in, H, W) -> (pre-activation (B, 2p, H, W), output (B, p, H, W)); row r of
        both depends on image rows < r only."""
        v_pre = self.v_conv(F.pad(v, self.v_pad)) + _label_bias(self.v_cond, y)
        return v_pre, gate(v_pre)

    def horizontal(self, h, v_pre, y=None):
        """h (B, c_in, H', W) and the vertical pre-activations of the same rows -> (B, p, H', W).
        Works on any set of rows, one row included: nothing here mixes rows."""
        h_pre = self.h_conv(h) + self.v_to_h(v_pre) + _label_bias(self.h_cond, y)
        out = self.h_out(gate(h_pre))
        return h + out if self.residual else out


# ----------------------------------------------------------------------------------------
# Likelihoods
# ----------------------------------------------------------------------------------------

def bin_centre(x, levels):
    """Integer levels 0..L-1 -> the centres c_x = 2x / (L - 1) - 1 of L bins of width 2 / (L - 1)
    tiling [-1 - d, 1 + d], d = 1 / (L - 1): the networks' input and the grid of Salimans Eq. 2
    (their x +- 0.5 on 0..255 is c_x +- d here)."""
    if levels < 2:
        raise ValueError(f"levels {levels} is not accepted; images need at least 2 levels")
    return 2.0 * x / (levels - 1) - 1.0


def categorical_log_prob(logits, x):
    """log p(x_{i,c} | x_<(i,c)) under a softmax over the L levels of each sub-pixel (PixelRNN
    Sec. 2.2). logits (B, C*L, H, W), channel c's logits at c*L .. c*L + L - 1; x (B, C, H, W)
    integer levels -> (B, C, H, W) in nats, at least float32."""
    B, C, H, W = x.shape
    if logits.shape[1] % C:
        raise ValueError(f"{logits.shape[1]} output channels do not split into {C} channels' logits")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = F.log_softmax(logits.view(B, C, -1, H, W), dim=2)
    return logp.gather(2, x.long().unsqueeze(2)).squeeze(2)


def discretized_logistic_log_prob(x, mean, log_scale, levels):
    """log P(x) = log[sigmoid(a) - sigmoid(b)], a = (c_x + d - mean) / s, b = (c_x - d - mean) / s, of a
    logistic(mean, s = e^log_scale) over the bin of level x (Salimans et al. 2017, Eq. 2, one
    component), the first bin open to -inf and the last to +inf; c_x, d of bin_centre; elementwise."""
    d = 1.0 / (levels - 1)
    c = bin_centre(x.to(mean.dtype), levels)
    inv_s = torch.exp(-log_scale)
    a = (c + d - mean) * inv_s
    b = (c - d - mean) * inv_s
    log_cdf_a = F.logsigmoid(a)    # log F(c + d): the whole first bin
    log_sf_b = F.logsigmoid(-b)    # log (1 - F(c - d)): the whole last bin
    # sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - e^(b - a)), b - a = -2d/s: three factors each
    # accurate in relative terms, however far in a tail (the plain difference underflows or cancels; the
    # official code falls back to a midpoint rule there instead)
    interior = log_cdf_a + log_sf_b + torch.log(-torch.expm1(-2.0 * d * inv_s))
    return torch.where(x == 0, log_cdf_a, torch.where(x == levels - 1, log_sf_b, interior))


def mixture_channels(colors, n_mix):
    """Output maps of a K-component mixture over C channels: K (1 + 2C + C(C-1)/2) (mixture
    logits; a mean and a log-scale per channel; one coefficient per earlier channel); 10 K for RGB
    (Salimans et al. Sec. 2.2)."""
    return n_mix * (1 + 2 * colors + colors * (colors - 1) // 2)


def unpack_mixture(out, colors):
    """Split the network's output (B, P, *spatial) into the mixture's parameters.

    Layout along dim 1: K mixture logits, then C*K means, C*K log-scales and C(C-1)/2 * K
    coefficients (channel-major, component-minor). Returns logit_pi (B, K, *), mean and log_scale
    (B, C, K, *), coeff (B, C(C-1)/2, K, *). The log-scales are floored at LOG_SCALE_MIN and the
    coefficients squashed by tanh, as the official code does. Coefficient of channel c on an
    earlier channel c2 < c: coeff[:, c(c-1)/2 + c2] (alpha, beta, gamma of Sec. 2.2 for RGB).
    """
    P = out.shape[1]
    per = 1 + 2 * colors + colors * (colors - 1) // 2
    if P % per:
        raise ValueError(f"{P} output channels do not hold a mixture over {colors} channels "
                         f"(a multiple of {per} is needed)")
    K = P // per
    rest = out.shape[2:]
    logit_pi = out[:, :K]
    mean = out[:, K:K + colors * K].reshape(out.shape[0], colors, K, *rest)
    log_scale = out[:, K + colors * K:K + 2 * colors * K].reshape(out.shape[0], colors, K, *rest)
    coeff = torch.tanh(out[:, K + 2 * colors * K:]).reshape(out.shape[0], -1, K, *rest)
    return logit_pi, mean, log_scale.clamp(min=LOG_SCALE_MIN), coeff


def _channel_mean(mean, coeff, values, c):
    """mu_c + sum_{c2 < c} coeff_{c, c2} v_{c2}: the mean of channel c moves linearly with the
    values of the earlier channels of the same pixel (Salimans et al. Sec. 2.2, e.g.
    mu_g = mu_g(C) + alpha r, mu_b = mu_b(C) + beta r + gamma g). values[c2]: (B, 1|K, *)."""
    m = mean[:, c]
    for c2 in range(c):
        m = m + coeff[:, c * (c - 1) // 2 + c2] * values[c2]
    return m


def logistic_mixture_log_prob(out, x, levels):
    """log P(x_c | x_<c, context) = log sum_k pi_k prod_{c2 <= c} P_k(x_c2 | .) - log sum_k pi_k
    prod_{c2 < c} P_k(x_c2 | .) under PixelCNN++'s mixture over whole pixels, each P_k a discretized
    logistic whose mean moves with the earlier channels (Salimans et al. 2017, Eq. 2, Sec. 2.2);
    out (B, P, H, W), x (B, C, H, W) levels -> (B, C, H, W), summing over c to log P(x_ij)."""
    C = x.shape[1]
    out = out.to(torch.promote_types(out.dtype, torch.float32))
    logit_pi, mean, log_scale, coeff = unpack_mixture(out, C)     # (B, K, H, W), (B, C, K, H, W), ...
    values = bin_centre(x.to(out.dtype), levels).unsqueeze(2)     # (B, C, 1, H, W)
    means = torch.stack([_channel_mean(mean, coeff, values.unbind(1), c) for c in range(C)], dim=1)
    lp = discretized_logistic_log_prob(x.unsqueeze(2), means, log_scale, levels)  # (B, C, K, H, W)
    joint = F.log_softmax(logit_pi, dim=1).unsqueeze(1) + lp.cumsum(1)  # log pi_k + sum_{c2<=c} log P_k
    upto = torch.logsumexp(joint, dim=2)                                 # log P(x_<=c), (B, C, H, W)
    return torch.cat([upto[:, :1], upto[:, 1:] - upto[:, :-1]], dim=1)


def log_prob(out, x, levels, likelihood):
    """log p(x_{i,c} | everything before it in raster order, R -> G -> B within a pixel), the
    factors of the chain rule p(x) = prod p(x_{i,c} | x_<(i,c)) (Gated PixelCNN Eq. 1), from the
    network's output: (B, C, H, W) in nats."""
    if likelihood == "categorical":
        if out.shape[1] != x.shape[1] * levels:
            raise ValueError(f"{out.shape[1]} output channels for {x.shape[1]} channels of "
                             f"{levels} levels; a softmax needs C * L = {x.shape[1] * levels}")
        return categorical_log_prob(out, x)
    if likelihood == "mixture":
        return logistic_mixture_log_prob(out, x, levels)
    raise ValueError(f"likelihood {likelihood!r} is not accepted; use one of {LIKELIHOODS}")


def nll(model, x, levels, likelihood, y=None):
    """-log p(x) = -sum over sub-pixels of log p(x_{i,c} | x_<(i,c)): the exact NLL of the integer
    levels x (B, C, H, W), per example in nats, (B,), from one network evaluation (the masks make
    every conditional available at once)."""
    out = model(bin_centre(x.to(_dtype_of(model)), levels), y)
    return -log_prob(out, x, levels, likelihood).flatten(1).sum(1)


def bits_per_dim(nats, dims):
    """Nats per example -> bits per dimension: nats / (dims ln 2)."""
    return nats / (dims * math.log(2))


# ----------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------

def _dtype_of(model):
    p = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    return p.dtype if p is not None and p.is_floating_point() else torch.get_default_dtype()


def _device_of(model):
    p = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


def sample_categorical(logits, generator=None):
    """One draw per row of logits (n, L) by the inverse CDF of the softmax, one uniform per row
    whatever the logits (two samplers fed the same generator consume it alike). (n,) int64."""
    p = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    wide = torch.float32 if p.device.type == "mps" else torch.float64  # MPS has no float64
    cdf = p.to(wide).cumsum(-1)
    u = torch.rand(p.shape[:-1] + (1,), generator=generator, device=p.device, dtype=wide)
    # u scaled by the total: a level of zero probability is never drawn, rounding never passes the last
    return (cdf <= u * cdf[..., -1:]).sum(-1).clamp(max=p.shape[-1] - 1)


def sample_mixture_pixel(out, levels, colors, generator=None):
    """Draw whole pixels from the discretized logistic mixture: out (n, P) -> levels (n, C).

    k ~ softmax(logits); then for c = R, G, B in turn: z ~ logistic(mean_c, s_c) by the inverse
    CDF, z = mean + s (log u - log(1 - u)), and its bin, clamped to the open edge bins, is the
    level. The mean of channel c uses the levels already drawn for the earlier channels, exactly
    as the likelihood does (the official sampler feeds back the unrounded values instead).
    """
    n = out.shape[0]
    logit_pi, mean, log_scale, coeff = unpack_mixture(out.to(torch.promote_types(out.dtype, torch.float32)), colors)
    k = sample_categorical(logit_pi, generator)[:, None]  # (n, 1)
    u = torch.rand(n, colors, generator=generator, device=out.device, dtype=mean.dtype)

    def pick(t):  # the chosen component: (n, K) -> (n, 1)
        return t.gather(1, k)

    values, x = [], []
    for c in range(colors):
        m = pick(_channel_mean(mean, coeff, values, c))     # values hold (n, 1) bin centres
        z = m + torch.exp(pick(log_scale[:, c])) * (torch.log(u[:, c:c + 1]) - torch.log1p(-u[:, c:c + 1]))
        level = torch.floor((z + 1) * (levels - 1) / 2 + 0.5).clamp(0, levels - 1)  # c_l - d <= z < c_l + d
        values.append(bin_centre(level, levels))
        x.append(level.long())
    return torch.cat(x, dim=1)


@torch.inference_mode()
def sample(model, n, shape, levels, likelihood="categorical", y=None,
           x=None, start=0, fast=True,
           generator=None, device=None):
    """Ancestral sampling in raster order: n images (n, C, H, W) of integer levels (uint8).

    Pixel by pixel, left to right, top to bottom; within a pixel R, then G, then B. One network
    evaluation per sub-pixel for the softmax (the network's channel masks make G's logits depend
    on R); one per pixel for the mixture (its network sees no channel of the pixel, the channel
    dependencies are in the mixture's means). Batched on the model's device; put the model in
    eval mode first (dropout).

    fast=False evaluates model(x, y) on the whole image each time and reads one position: the
    naive recomputation. fast=True calls model(x, y, row=i, cache=cache) and lets the network
    compute only what row i needs (the Gated PixelCNN: its vertical stack once per row, its
    horizontal stack on row i alone; the others: the rows above within the receptive field).
    Both consume the generator identically, so they return the same images for the same seed.

    Completion: x (n, C, H, W) levels and start = the number of pixels, in raster order, kept
    from x (e.g. (H // 2) * W keeps the top half); sampling begins at pixel `start`.
    y: labels (n,) for a class-conditional network. generator: on the model's device.
    """
    C, H, W = shape
    if not 2 <= levels <= 256:
        raise ValueError(f"levels {levels} is not accepted; images have 2..256 levels")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood {likelihood!r} is not accepted; use one of {LIKELIHOODS}")
    if not 0 <= start <= H * W:
        raise ValueError(f"start {start} is out of range; accepted: 0..{H * W} pixels")
    device = torch.device(device) if device is not None else _device_of(model)
    if x is None:
        if start:
            raise ValueError("start > 0 keeps pixels of x: pass the images to complete as x")
        x = torch.zeros(n, C, H, W, dtype=torch.long, device=device)
    else:
        if tuple(x.shape) != (n, C, H, W):
            raise ValueError(f"x has shape {tuple(x.shape)}; expected {(n, C, H, W)}")
        x = x.to(device=device, dtype=torch.long).clone()
    if y is not None:
        y = y.to(device)
    inp = bin_centre(x.to(_dtype_of(model)), levels)
    cache = {}

    def output_row(i):  # the network's output at row i, (n, P, W)
        if fast:
            return model(inp, y, row=i, cache=cache)[:, :, 0]
        return model(inp, y)[:, :, i]

    for pos in range(start, H * W):
        i, j = divmod(pos, W)
        if likelihood == "categorical":
            for c in range(C):
                logits = output_row(i)[:, :, j].reshape(n, C, levels)[:, c]
                x[:, c, i, j] = sample_categorical(logits, generator)
                inp[:, c, i, j] = bin_centre(x[:, c, i, j].to(inp.dtype), levels)
        else:
            x[:, :, i, j] = sample_mixture_pixel(output_row(i)[:, :, j], levels, C, generator)
            inp[:, :, i, j] = bin_centre(x[:, :, i, j].to(inp.dtype), levels)
    return x.to(torch.uint8)


# ----------------------------------------------------------------------------------------
# 2D points as a 1 x 2 image of bins (ours, as gpt.py does with two tokens)
# ----------------------------------------------------------------------------------------

def bin_width(lim, bins):
    """Width w = 2 lim / bins of a coordinate's bin over [-lim, lim]."""
    return 2 * lim / bins


def point_levels(x, lim, bins):
    """Points (B, 2) -> a 1 x 2 image of bin indices (B, 1, 1, 2): x's bin, then y's, so the
    raster order is p(x bin) p(y bin | x bin). Points outside the square fall in the edge bins."""
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"points have shape {tuple(x.shape)}; expected (B, 2)")
    return torch.floor((x + lim) / bin_width(lim, bins)).long().clamp(0, bins - 1).view(-1, 1, 1, 2)


def levels_to_points(levels, lim, bins, generator=None):
    """Bin images (B, 1, 1, 2) -> points (B, 2) drawn uniformly inside their bin's square: a
    sample of the piecewise-uniform density whose log is points_log_prob."""
    b = levels.reshape(-1, 2).to(torch.float32)
    u = torch.rand(b.shape, generator=generator, device=b.device)
    return (b + u) * bin_width(lim, bins) - lim


def points_log_prob(model, x, lim, bins, likelihood="categorical"):
    """log p(x) of points (B, 2) under the piecewise-uniform density: the model's probability of
    the pair of bins spread evenly over their square of area w^2, so
    log p(x) = -nll(bins) - 2 log w: the continuous NLL is the discrete NLL + 2 log w. (B,) nats."""
    return -nll(model, point_levels(x, lim, bins), bins, likelihood) - 2 * math.log(bin_width(lim, bins))


# ----------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------

class ResidualBlock(nn.Module):
    """PixelCNN residual block (PixelRNN Fig. 5): 2h -> ReLU, 1x1 -> h -> ReLU, k x k mask B ->
    ReLU, 1x1 -> 2h, added to the input; every convolution masked with the colour groups. With
    num_classes > 0, a per-class bias after the k x k convolution (Gated PixelCNN Eq. 4's bias,
    our placement)."""

    def __init__(self, h, k, colors, num_classes=0):
        super().__init__()
        self.conv1 = MaskedConv2d(2 * h, h, 1, "B", colors)
        self.conv2 = MaskedConv2d(h, h, k, "B", colors)
        self.conv3 = MaskedConv2d(h, 2 * h, 1, "B", colors)
        self.cond = nn.Embedding(num_classes, h) if num_classes else None

    def forward(self, x, y=None):
        t = self.conv2(F.relu(self.conv1(F.relu(x)))) + _label_bias(self.cond, y)
        return x + self.conv3(F.relu(t))


class PixelCNN(nn.Module):
    """The plain PixelCNN (PixelRNN Sec. 3.5): a k0 x k0 mask-A convolution to 2h maps, residual
    blocks of mask-B convolutions, ReLU and two 1x1 mask-B layers, a softmax over the levels.
    Masked convolutions alone leave a blind spot: up and to the right of a pixel, inside the
    stack's nominal receptive field, lie earlier pixels it never sees (Gated PixelCNN paper,
    Sec. 2.2). Its output at row i depends on the `field_rows` rows above it at most."""

    likelihood = "categorical"

    def __init__(self, channels=1, levels=17, h=32, n_blocks=5,
                 kernel=3, first_kernel=7, out_hidden=128, num_classes=0):
        super().__init__()
        self.channels, self.levels, self.num_classes = channels, levels, num_classes
        self.inp = MaskedConv2d(channels, 2 * h, first_kernel, "A", channels)
        self.blocks = nn.ModuleList(ResidualBlock(h, kernel, channels, num_classes) for _ in range(n_blocks))
        self.out1 = MaskedConv2d(2 * h, out_hidden, 1, "B", channels)
        self.out2 = MaskedConv2d(out_hidden, channels * levels, 1, "B", channels)
        self.field_rows = first_kernel // 2 + n_blocks * (kernel // 2)

    def forward(self, x, y=None, row=None, cache=None):
        """x (B, C, H, W) in [-1, 1] -> logits (B, C*L, H, W); with row=i, the logits of row i
        (B, C*L, 1, W) from the crop of rows i - field_rows .. i (exact: no output of row i
        depends on a row outside it, nor on the zero padding above the crop)."""
        if row is not None:
            return self(x[:, :, max(0, row - self.field_rows):row + 1], y)[:, :, -1:]
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, y)
        return self.head(h)

    def head(self, h):
        """The output layers (PixelRNN Sec. 3.4 / Table 1): ReLU, 1x1 mask B, ReLU, 1x1 mask B -> logits."""
        return self.out2(F.relu(self.out1(F.relu(h))))


class GatedPixelCNN(nn.Module):
    """The Gated PixelCNN (Gated PixelCNN paper, Fig. 2): n_layers GatedBlocks (the first
    with a first_kernel-wide mask-A stack pair, then kernel-wide mask-B ones), then ReLU and two
    1x1 mask-B layers and a softmax over the levels. Every earlier pixel within its receptive
    field, the raster-earlier part of a square of radius field_rows, reaches the output."""

    likelihood = "categorical"

    def __init__(self, channels=1, levels=17, p=32, n_layers=6,
                 kernel=3, first_kernel=7, out_hidden=128, num_classes=0):
        super().__init__()
        self.channels, self.levels, self.num_classes = channels, levels, num_classes
        self.blocks = nn.ModuleList(
            [GatedBlock(channels, p, first_kernel, "A", channels, num_classes)]
            + [GatedBlock(p, p, kernel, "B", channels, num_classes) for _ in range(n_layers - 1)])
        self.out1 = MaskedConv2d(p, out_hidden, 1, "B", channels)
        self.out2 = MaskedConv2d(out_hidden, channels * levels, 1, "B", channels)
        self.field_rows = first_kernel // 2 + (n_layers - 1) * (kernel // 2)

    def forward(self, x, y=None, row=None, cache=None):
        """x (B, C, H, W) in [-1, 1] -> logits (B, C*L, H, W).

        With row=i: the logits of row i alone, (B, C*L, 1, W). The vertical stack of row i sees
        rows < i only, which do not change while row i is sampled: it is computed once per row
        (on the crop of rows i - field_rows .. i) and kept in `cache`; the horizontal stack then
        runs on the single row i at every call.
        """
        if row is None:
            v = h = x
            for block in self.blocks:
                v_pre, v = block.vertical(v, y)
                h = block.horizontal(h, v_pre, y)
            return self.out2(F.relu(self.out1(F.relu(h))))
        if cache is None:
            cache = {}
        if cache.get("row") != row:
            v, links = x[:, :, max(0, row - self.field_rows):row + 1], []
            for block in self.blocks:
                v_pre, v = block.vertical(v, y)
                links.append(v_pre[:, :, -1:])
            cache.update(row=row, links=links)
        h = x[:, :, row:row + 1]
        for block, v_pre in zip(self.blocks, cache["links"]):
            h = block.horizontal(h, v_pre, y)
        return self.out2(F.relu(self.out1(F.relu(h))))


# --- PixelCNN++ (Salimans et al. 2017, Sec. 2.3-2.5; the layer shapes follow the official code)

def _wn(module, dim=0):
    """Weight normalisation w = g v / ||v|| per output map (Salimans & Kingma 2016), used on every
    layer of the official PixelCNN++ code (its data-dependent initialisation is not reproduced)."""
    return nn.utils.parametrizations.weight_norm(module, dim=dim)


def down_shift(x):
    """Move the maps one row down (zeros in row 0): row r then holds what row r - 1 saw."""
    return F.pad(x, (0, 0, 1, -1))


def right_shift(x):
    """Move the maps one column right (zeros in column 0)."""
    return F.pad(x, (1, -1, 0, 0))


def concat_elu(x):
    """ELU of [x, -x] along the channels (the official code's non-linearity, after Shang et al.'s
    concatenated ReLU): doubles the channels."""
    return F.elu(torch.cat([x, -x], dim=1))


class ShiftedConv2d(nn.Module):
    """A convolution padded so that its output at (r, c) sees rows <= r only: centred on c
    (a "down-shifted" conv, kernel (2, 3) by default) or, with right=True, columns <= c only
    (a "down-right-shifted" conv, kernel (2, 2)). Stride 2 halves the resolution causally."""

    def __init__(self, c_in, c_out, kernel=(2, 3), stride=1, right=False):
        super().__init__()
        kh, kw = kernel
        self.pad = (kw - 1, 0, kh - 1, 0) if right else ((kw - 1) // 2, (kw - 1) // 2, kh - 1, 0)
        self.conv = _wn(nn.Conv2d(c_in, c_out, kernel, stride))

    def forward(self, x):
        return self.conv(F.pad(x, self.pad))


class ShiftedDeconv2d(nn.Module):
    """The stride-2 transposed convolutions that undo ShiftedConv2d's down-sampling, cropped so
    the output (2H, 2W) stays causal: kernel (2, 3) centred, or (2, 2) with right=True."""

    def __init__(self, c_in, c_out, kernel=(2, 3), right=False):
        super().__init__()
        self.kw, self.right = kernel[1], right
        self.deconv = _wn(nn.ConvTranspose2d(c_in, c_out, kernel, stride=2), dim=1)

    def forward(self, x):
        out = self.deconv(x)                                   # (B, c_out, 2H, 2W + kw - 2)
        W = 2 * x.shape[-1]
        first = 0 if self.right else (self.kw - 1) // 2
        return out[..., first:first + W]


class GatedResnet(nn.Module):
    """PixelCNN++'s ResNet layer (official code, gated_resnet): c1 = conv(concat_elu(x)) [+ a 1x1
    of concat_elu(a), the short-cut input, Sec. 2.4]; dropout on concat_elu(c1) (Sec. 2.5);
    c2 = conv(.) to 2F maps [+ a per-class bias]; x + c2_a * sigmoid(c2_b)."""

    def __init__(self, F_, right, aux=0, dropout=0.0, num_classes=0):
        super().__init__()
        kernel = (2, 2) if right else (2, 3)
        self.conv1 = ShiftedConv2d(2 * F_, F_, kernel, right=right)
        self.aux = _wn(nn.Conv2d(2 * aux * F_, F_, 1)) if aux else None
        self.drop = nn.Dropout(dropout)
        self.conv2 = ShiftedConv2d(2 * F_, 2 * F_, kernel, right=right)
        self.cond = nn.Embedding(num_classes, 2 * F_) if num_classes else None

    def forward(self, x, a=None, y=None):
        c1 = self.conv1(concat_elu(x))
        if self.aux is not None:
            c1 = c1 + self.aux(concat_elu(a))
        c2 = self.conv2(self.drop(concat_elu(c1))) + _label_bias(self.cond, y)
        a_, b_ = c2.chunk(2, dim=1)
        return x + a_ * torch.sigmoid(b_)


class PixelCNNpp(nn.Module):
    """PixelCNN++ (Salimans et al. 2017, Sec. 2.3-2.5, official pixel_cnn_pp/model.py).

    Two streams: u sees the rows above (down-shifted convolutions), ul the rows above and the
    pixels to the left (down-right-shifted). The first half runs nr_resnet GatedResnets at each
    of three resolutions (H, H/2, H/4), halving between them with stride-2 shifted convolutions
    (Sec. 2.3); the second half climbs back with shifted transposed convolutions, running
    nr_resnet, then nr_resnet + 1, then nr_resnet + 1 layers, each fed by a short-cut from the
    matching first-half layer (Sec. 2.4). The input gets a channel of ones so the zero padding
    is told apart from black. Output: a 1x1 layer to the parameters of an n_mix-component
    discretized logistic mixture per pixel (10 n_mix maps for RGB). The output at (i, j) sees no
    channel of pixel (i, j). The CIFAR-10 network: nr_filters 160, nr_resnet 5, n_mix 10,
    dropout 0.5.
    """

    likelihood = "mixture"

    def __init__(self, channels=3, nr_filters=160, nr_resnet=5, n_mix=10, dropout=0.5, num_classes=0):
        super().__init__()
        F_, c_in = nr_filters, channels + 1
        self.channels, self.num_classes = channels, num_classes
        self.u_init = ShiftedConv2d(c_in, F_, (2, 3))
        self.ul_init_up = ShiftedConv2d(c_in, F_, (1, 3))
        self.ul_init_left = ShiftedConv2d(c_in, F_, (2, 1), right=True)
        res = lambda right, aux: GatedResnet(F_, right, aux, dropout, num_classes)
        self.up_u = nn.ModuleList(nn.ModuleList(res(False, 0) for _ in range(nr_resnet)) for _ in range(3))
        self.up_ul = nn.ModuleList(nn.ModuleList(res(True, 1) for _ in range(nr_resnet)) for _ in range(3))
        self.down_u = nn.ModuleList(nn.ModuleList(res(False, 1) for _ in range(n)) for n in
                                    (nr_resnet, nr_resnet + 1, nr_resnet + 1))
        self.down_ul = nn.ModuleList(nn.ModuleList(res(True, 2) for _ in range(n)) for n in
                                     (nr_resnet, nr_resnet + 1, nr_resnet + 1))
        self.halve_u = nn.ModuleList(ShiftedConv2d(F_, F_, (2, 3), stride=2) for _ in range(2))
        self.halve_ul = nn.ModuleList(ShiftedConv2d(F_, F_, (2, 2), stride=2, right=True) for _ in range(2))
        self.double_u = nn.ModuleList(ShiftedDeconv2d(F_, F_, (2, 3)) for _ in range(2))
        self.double_ul = nn.ModuleList(ShiftedDeconv2d(F_, F_, (2, 2), right=True) for _ in range(2))
        self.out = _wn(nn.Conv2d(F_, mixture_channels(channels, n_mix), 1))

    def forward(self, x, y=None, row=None, cache=None):
        """x (B, C, H, W) in [-1, 1], H and W multiples of 4 -> mixture parameters (B, P, H, W).

        With row=i: row i alone, (B, P, 1, W), from the rows 0 .. i rounded up to a multiple of 4
        (the rows below do not reach row i; the rounding keeps the stride-2 grid aligned). The
        receptive field spans the whole image above, so nothing is cropped at the top.
        """
        H, W = x.shape[-2:]
        if H % 4 or W % 4:
            raise ValueError(f"PixelCNN++ halves the image twice: {H}x{W} is not a multiple of 4")
        if row is not None:
            end = min(H, (row // 4 + 1) * 4)
            return self(x[:, :, :end], y)[:, :, row:row + 1]
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        u = down_shift(self.u_init(x))
        ul = down_shift(self.ul_init_up(x)) + right_shift(self.ul_init_left(x))
        us, uls = [u], [ul]
        for s in range(3):                                   # first half: H -> H/2 -> H/4
            for res_u, res_ul in zip(self.up_u[s], self.up_ul[s]):
                u = res_u(u, y=y)
                ul = res_ul(ul, u, y=y)
                us.append(u)
                uls.append(ul)
            if s < 2:
                u, ul = self.halve_u[s](u), self.halve_ul[s](ul)
                us.append(u)
                uls.append(ul)
        u, ul = us.pop(), uls.pop()
        for s in range(3):                                   # second half: H/4 -> H/2 -> H, short-cuts
            for res_u, res_ul in zip(self.down_u[s], self.down_ul[s]):
                u = res_u(u, us.pop(), y=y)
                ul = res_ul(ul, torch.cat([u, uls.pop()], dim=1), y=y)
            if s < 2:
                u, ul = self.double_u[s](u), self.double_ul[s](ul)
        return self.out(F.elu(ul))


# ----------------------------------------------------------------------------------------
# Row LSTM (van den Oord, Kalchbrenner & Kavukcuoglu 2016, arXiv 1601.06759, Sec. 3.1)
# ----------------------------------------------------------------------------------------

def lstm_cell(gates, c_prev):
    """[o, f, i, g] = [sigmoid, sigmoid, sigmoid, tanh](gates), c = f * c_prev + i * g,
    h = o * tanh(c) (PixelRNN Eq. 3). gates (B, 4h, ...) with unit u's four gates at 4u .. 4u + 3
    (gate_conv) -> (h, c), each (B, h, ...)."""
    o, f, i = torch.sigmoid(gates[:, 0::4]), torch.sigmoid(gates[:, 1::4]), torch.sigmoid(gates[:, 2::4])
    c = f * c_prev + i * torch.tanh(gates[:, 3::4])
    return o * torch.tanh(c), c


def gate_conv(c_in, h, kernel, colors):
    """K^is: a mask-B convolution from c_in maps to the 4h gates, the four gates of unit u (maps
    4u .. 4u + 3) masked as unit u of h maps, so that each unit lies in one colour group (Sec. 3.4)."""
    conv = MaskedConv2d(c_in, 4 * h, kernel, "B", colors)
    kh, kw = conv.kernel_size
    conv.mask = causal_mask(h, c_in, kh, kw, (conv.pad[2], conv.pad[0]), "B", colors).repeat_interleave(4, 0)
    return conv


class RowLSTMLayer(nn.Module):
    """A residual Row LSTM layer (PixelRNN Sec. 3.1, Sec. 3.4, Fig. 5): 2h maps in; the
    input-to-state K^is, a k x 1 convolution over the row masked with mask B and the colour
    groups, gives the 4h gates of every row at once; the state-to-state K^ss, an unmasked k x 1
    convolution over the previous row's h_{i-1}, is added row by row, top to bottom (Eq. 3); a
    1x1 mask-B convolution takes h back to 2h maps, added to the input. With num_classes > 0,
    a per-class bias on the gates (Gated PixelCNN Eq. 4's bias, our placement)."""

    def __init__(self, h, k, colors, num_classes=0):
        super().__init__()
        self.h = h
        self.input_to_state = gate_conv(2 * h, h, (1, k), colors)  # over the row, up to the pixel
        self.state_to_state = nn.Conv1d(h, 4 * h, k, padding=k // 2)          # over the row above
        self.out = MaskedConv2d(h, 2 * h, 1, "B", colors)
        self.cond = nn.Embedding(num_classes, 4 * h) if num_classes else None

    def gates_from_input(self, x, y=None):
        """K^is * x (+ the label's bias): (B, 2h, H', W) -> (B, 4h, H', W); no row is mixed."""
        return self.input_to_state(x) + _label_bias(self.cond, y)

    def step(self, gates_is, state):
        """One row: gates_is (B, 4h, W) and state (h_{i-1}, c_{i-1}) -> (h_i, c_i), each (B, h, W)."""
        h_prev, c_prev = state
        return lstm_cell(gates_is + self.state_to_state(h_prev), c_prev)

    def zero_state(self, x):
        z = x.new_zeros(x.shape[0], self.h, x.shape[-1])
        return z, z

    def forward(self, x, y=None):
        gates, state, hs = self.gates_from_input(x, y), self.zero_state(x), []
        for i in range(x.shape[2]):
            state = self.step(gates[:, :, i], state)
            hs.append(state[0])
        return x + self.out(torch.stack(hs, dim=2))


class RowLSTM(PixelCNN):
    """The Row LSTM PixelRNN (PixelRNN Sec. 3.1, Table 1): PixelCNN's k0 x k0 mask-A convolution
    to 2h maps, n_layers residual RowLSTMLayers, PixelCNN's output layers and softmax. Its
    receptive field is a triangle (Fig. 4): d rows above the pixel it reaches k0 // 2 + (d - 1)(k // 2)
    columns to the right, on the pixel's own row k0 // 2 + n_layers (k // 2) pixels to the left;
    the earlier pixels outside it (up-right, far left on the row) are not seen."""

    def __init__(self, channels=1, levels=17, h=32, n_layers=4, kernel=3, first_kernel=7, out_hidden=128,
                 num_classes=0):
        super().__init__(channels, levels, h, 0, kernel, first_kernel, out_hidden, num_classes)
        self.blocks = nn.ModuleList(RowLSTMLayer(h, kernel, channels, num_classes) for _ in range(n_layers))
        self.field_rows = None  # the whole image above

    def forward(self, x, y=None, row=None, cache=None):
        """x (B, C, H, W) in [-1, 1] -> logits (B, C*L, H, W). With row=i, the logits of row i
        alone, (B, C*L, 1, W), from the states (h, c) of row i - 1 of every layer, kept in `cache`
        and carried one row down when the sampler moves on (a fresh cache runs rows 0 .. i - 1)."""
        if row is None:
            return super().forward(x, y)
        cache = {} if cache is None else cache
        if cache.get("row") != row:
            done, states = cache.get("row"), cache.get("states")
            if done is None or done > row:  # a fresh cache (or an earlier row): from the top
                done, states = 0, [block.zero_state(x) for block in self.blocks]
            for r in range(done, row):  # rows < i are final: carry their states down
                states = self._row(x, y, r, states)[1]
            cache.update(row=row, states=states)
        return self._row(x, y, row, cache["states"])[0]

    def _row(self, x, y, r, states):
        """Row r through every layer from the states of row r - 1: (logits (B, C*L, 1, W), states of row r)."""
        a = self.inp(x[:, :, max(0, r - self.inp.pad[2]):r + 1])[:, :, -1:]  # mask A: rows r - k0 // 2 .. r
        new = []
        for block, state in zip(self.blocks, states):
            state = block.step(block.gates_from_input(a, y)[:, :, 0], state)
            a = a + block.out(state[0].unsqueeze(2))
            new.append(state)
        return self.head(a), new


# ----------------------------------------------------------------------------------------
# Diagonal BiLSTM (van den Oord, Kalchbrenner & Kavukcuoglu 2016, arXiv 1601.06759, Sec. 3.2)
# ----------------------------------------------------------------------------------------

def skew(x):
    """(B, C, H, W) -> (B, C, H, W + H - 1): row r moved right by r, so that the diagonals
    become columns (PixelRNN Sec. 3.2, Fig. 3); zeros elsewhere. Pad each row to W + H, read the
    flat rows with a stride one shorter."""
    B, C, H, W = x.shape
    flat = F.pad(x, (0, H)).flatten(2)[:, :, :H * (W + H - 1)]
    return flat.reshape(B, C, H, W + H - 1)


def unskew(s, W):
    """The inverse of skew: (B, C, H, W + H - 1) -> (B, C, H, W), row r read from column r on."""
    B, C, H, _ = s.shape
    return F.pad(s.flatten(2), (0, H)).reshape(B, C, H, W + H)[..., :W]


class DiagonalLSTM(nn.Module):
    """One direction of the Diagonal BiLSTM (PixelRNN Sec. 3.2): on the skewed gates, column by
    column left to right, the state-to-state K^ss is a 2 x 1 convolution over the previous
    column's h (rows r - 1 and r), so the state at pixel (r, c) follows those at (r, c - 1) and
    (r - 1, c): it sees every pixel (r', c') with r' <= r, c' <= c."""

    def __init__(self, h):
        super().__init__()
        self.h = h
        self.state_to_state = nn.Conv1d(h, 4 * h, 2)

    def forward(self, gates):
        """gates (B, 4h, H, W) of K^is * x -> h (B, h, H, W)."""
        B, _, H, W = gates.shape
        g = skew(gates)
        h = c = gates.new_zeros(B, self.h, H)
        hs = []
        for k in range(g.shape[-1]):
            h, c = lstm_cell(g[..., k] + self.state_to_state(F.pad(h, (1, 0))), c)  # rows r - 1, r
            hs.append(h)
        return unskew(torch.stack(hs, dim=-1), W)


class DiagonalBiLSTMLayer(nn.Module):
    """A residual Diagonal BiLSTM layer (PixelRNN Sec. 3.2, Sec. 3.4, Table 1): from 2h maps, a
    1x1 mask-B K^is per direction (the gates); the left-to-right DiagonalLSTM, and the same run
    on the image mirrored left-right, whose output (it sees (r, c' >= c), the future) is shifted
    down one row so that pixel (r, c) reads the state of (r - 1, c): r' < r, c' >= c. Their sum
    sees every earlier pixel; a 1x1 mask-B convolution back to 2h maps, added to the input."""

    def __init__(self, h, colors, num_classes=0):
        super().__init__()
        self.input_to_state = nn.ModuleList(gate_conv(2 * h, h, 1, colors) for _ in range(2))
        self.lstm = nn.ModuleList(DiagonalLSTM(h) for _ in range(2))
        self.out = MaskedConv2d(h, 2 * h, 1, "B", colors)
        self.cond = nn.Embedding(num_classes, 8 * h) if num_classes else None

    def forward(self, x, y=None):
        """x (B, 2h, H, W) + the 1x1 convolution of both directions' states (the class docstring)."""
        bias = _label_bias(self.cond, y)
        b_lr, b_rl = bias.chunk(2, dim=1) if torch.is_tensor(bias) else (bias, bias)
        left_to_right = self.lstm[0](self.input_to_state[0](x) + b_lr)
        # the shift drops the mirrored direction's last row, and its row r depends on rows <= r only:
        # it runs on rows 0 .. H - 2 (none for one row), the same values for less work
        above = x[:, :, :-1].flip(3)
        right_to_left = (F.pad(self.lstm[1](self.input_to_state[1](above) + b_rl).flip(3), (0, 0, 1, 0))
                         if x.shape[2] > 1 else torch.zeros_like(left_to_right))
        return x + self.out(left_to_right + right_to_left)


class DiagonalBiLSTM(PixelCNN):
    """The Diagonal BiLSTM PixelRNN (PixelRNN Sec. 3.2, Table 1): PixelCNN's k0 x k0 mask-A
    convolution to 2h maps, n_layers residual DiagonalBiLSTMLayers, PixelCNN's output layers and
    softmax. Each layer sees every earlier position (Fig. 4), so the network sees every earlier
    pixel, but the last sub-pixel of the row above when it lies beyond the first layer's reach,
    which no network with a mask-A first layer can see from further left (tests/test_pixelcnn.py)."""

    def __init__(self, channels=1, levels=17, h=32, n_layers=4, first_kernel=7, out_hidden=128, num_classes=0):
        super().__init__(channels, levels, h, 0, 3, first_kernel, out_hidden, num_classes)
        self.blocks = nn.ModuleList(DiagonalBiLSTMLayer(h, channels, num_classes) for _ in range(n_layers))
        self.field_rows = None  # the whole image above

    def forward(self, x, y=None, row=None, cache=None):
        """x (B, C, H, W) in [-1, 1] -> logits (B, C*L, H, W); with row=i, row i alone from the
        rows 0 .. i (no row below reaches it; the states are recomputed, not carried)."""
        if row is not None:
            return super().forward(x[:, :, :row + 1], y)[:, :, -1:]
        return super().forward(x, y)


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

ARCHS = ("gated", "pixelcnn", "pixelcnn++", "rowlstm", "diagonal-bilstm")
RNNS = ("rowlstm", "diagonal-bilstm")  # PixelRNN's recurrent networks


@dataclasses.dataclass
class Config(RunConfig):
    """Defaults train the Gated PixelCNN on 8x8 digits on a laptop CPU in minutes; PRESETS (the
    Gated PixelCNN) and ARCH_PRESETS (per --arch) follow the papers where they say."""
    steps: int = flag(1000, "training steps")
    batch_size: int = flag(64, "global batch size (also the batch of --eval)")
    lr: float = flag(2e-3, "Adam learning rate (after warm-up)")
    save_every: int = flag(500, "steps between checkpoints and sample grids")
    # the network and its likelihood
    arch: str = flag("gated", "network: gated (Gated PixelCNN), pixelcnn (the plain masked stack, with its blind "
                     "spot), pixelcnn++, rowlstm or diagonal-bilstm (PixelRNN); the likelihood follows it (a "
                     "softmax over the levels, or PixelCNN++'s logistic mixture), and each architecture has its "
                     "own presets (ARCH_PRESETS)", choices=ARCHS)
    hidden: int = flag(32, "feature maps: p of the gated stacks, h of the plain residual blocks and of the LSTM "
                           "layers (2h between them), PixelCNN++'s filters; gated: a multiple of the colour "
                           "channels")
    layers: int = flag(6, "gated layers; residual blocks of the plain PixelCNN; LSTM layers; PixelCNN++'s ResNet "
                          "layers per stage")
    kernel: int = flag(3, "kernel size (odd) of the gated and plain layers after the first; k of the Row LSTM's "
                          "k x 1 convolutions")
    first_kernel: int = flag(7, "kernel size (odd) of the first, mask-A layer (gated, plain, LSTMs)")
    out_hidden: int = flag(128, "maps of the 1x1 layer before the softmax (gated, plain, LSTMs)")
    n_mix: int = flag(5, "components of the discretized logistic mixture (pixelcnn++)")
    dropout: float = flag(0.0, "dropout in PixelCNN++'s ResNet layers (Salimans et al. Sec. 2.5; pixelcnn++ only)")
    cond: bool = flag(False, "class-conditional: a learned bias per class in every layer (Gated PixelCNN Eq. 4)")
    binarize: bool = flag(False, "model the images thresholded at half their range (2 levels), e.g. binarised MNIST")
    bins: int = flag(256, "bins per coordinate for 2D points (2..256)")
    # optimisation
    beta1: float = flag(0.9, "Adam beta1")
    beta2: float = flag(0.999, "Adam beta2")
    warmup: int = flag(50, "linear learning-rate warm-up steps")
    schedule: str = flag("cosine", "learning rate after the warm-up: cosine (down to --min-lr over --decay-steps), "
                         "exponential (times --lr-decay every step, PixelCNN++'s official code) or constant",
                         choices=("cosine", "exponential", "constant"))
    min_lr: float = flag(0.0, "learning rate at the end of the cosine decay")
    decay_steps: int = flag(0, "length of the cosine decay in steps (0 = --steps); set it to resume into a longer run")
    lr_decay: float = flag(0.999995, "per-step factor of the exponential schedule")
    grad_clip: float = flag(0.0, "clip the global gradient norm to this (0 = off)")
    ema_decay: float = flag(0.995, "decay of the weights' moving average used for sampling and --eval (0 = off)")
    # sampling
    completions: int = flag(8, "test images whose top half is completed in completion.png, 4 samples each (0 = none)")
    naive_sampler: bool = flag(False, "sample by recomputing the whole network for every sub-pixel (slow; to "
                                      "measure what the fast sampler saves)")


# Presets: {dataset or kind: Config fields}; parse_config applies PRESETS[dataset], else PRESETS[kind].
# The training recipes of the softmax networks are ours: the papers' optimisers are not stated in
# what we could check. Parameter counts are tested (tests/test_pixelcnn.py).
PRESETS = {
    # The Config defaults: 6 gated layers of 32 maps, 122,001 parameters on digits; 2000 steps (ours: at
    # 1000 the test NLL is the same, 1.770 against 1.774 bits/dim, but the samples are not yet digits:
    # Frechet distance 20.4 against 12.6 at 2000, benchmarks/quality.py's measure, seed 0).
    "digits": dict(steps=2000),
    "digits-binary": dict(),
    # 28x28: 15 gated layers of 64 maps, 5x5 kernels; 2,463,936 parameters at 256 levels. A GPU preset.
    "mnist": dict(hidden=64, layers=15, kernel=5, first_kernel=7, out_hidden=256, batch_size=64, lr=1e-3,
                  warmup=500, steps=50_000, ema_decay=0.9995, save_every=5000, n_samples=16),
    # CIFAR-10: 15 gated layers (as the issue asks; the paper's width is not in what we could check),
    # 120 maps (a multiple of the 3 colour groups), 5x5 kernels, 1024 maps before the 256-way softmax:
    # 9,279,304 parameters. Published: Gated PixelCNN 3.03 bits/dim. A GPU preset.
    "cifar10": dict(hidden=120, layers=15, kernel=5, first_kernel=7, out_hidden=1024, batch_size=64, lr=1e-3,
                    warmup=1000, steps=200_000, ema_decay=0.9995, save_every=10_000, n_samples=16),
    # 2D points: a 1 x 2 image of 256 bins per coordinate; fresh points every batch.
    "points": dict(hidden=64, layers=4, kernel=3, first_kernel=3, out_hidden=256, batch_size=256, steps=3000,
                   warmup=100, n_samples=2000, save_every=1500),
}
PRESETS["fashion-mnist"] = PRESETS["mnist"]

ARCH_PRESETS = {
    "gated": PRESETS,
    "pixelcnn": {
        # 5 residual blocks of h = 32 (2h = 64 maps between them): 80,913 parameters on digits.
        "image": dict(hidden=32, layers=5, kernel=3, first_kernel=7, out_hidden=128),
        # 12 residual blocks of h = 128, 1024 maps before the softmax: 3,650,304 parameters; our choice
        # (PixelRNN's PixelCNN depth is not in what we could check). Published: PixelCNN 3.14 bits/dim.
        "cifar10": dict(hidden=128, layers=12, kernel=3, first_kernel=7, out_hidden=1024, batch_size=64, lr=1e-3,
                        warmup=1000, steps=200_000, ema_decay=0.9995, save_every=10_000, n_samples=16),
        "points": PRESETS["points"],
    },
    "pixelcnn++": {
        # small: 32 filters, 1 ResNet layer per stage, 5 components (digits and other small images)
        "image": dict(hidden=32, layers=1, n_mix=5),
        # 28x28: 64 filters, 5 layers per stage, 5 components, dropout 0.5; our choice (not in the paper)
        "mnist": dict(hidden=64, layers=5, n_mix=5, dropout=0.5, batch_size=64, lr=1e-3, beta1=0.95, beta2=0.9995,
                      warmup=0, schedule="exponential", lr_decay=0.99999, ema_decay=0.9995, steps=100_000,
                      save_every=5000, n_samples=16),
        # CIFAR-10, each value's source: the paper (Salimans et al. 2017) for the discretized logistic
        # mixture, the three resolutions, short-cuts and dropout; the official code (openai/pixel-cnn,
        # train.py in its final, archived version, and pixel_cnn_pp/) for every number: 160 filters
        # (--nr_filters), 5 ResNet layers per stage (--nr_resnet), 10 components (--nr_logistic_mix),
        # dropout 0.5 (--dropout_p), batch 128 = 16 per GPU (--batch_size) x 8 GPUs (--nr_gpu) (an
        # earlier train.py had 12 per GPU, 96), Adam betas (0.95, 0.9995) (its adam_updates call), lr
        # 1e-3 (--learning_rate) times 0.999995 before every update (--lr_decay), Polyak averaging 0.9995
        # (--polyak_decay); no warm-up (it has a data-dependent initialisation, not reproduced here).
        # 53,659,080 parameters. Ours: the number of steps (its README: about 5 days on 8 GPUs to
        # 2.92 bits/dim), the checkpoint cadence and the samples drawn.
        "cifar10": dict(hidden=160, layers=5, n_mix=10, dropout=0.5, batch_size=128, lr=1e-3, beta1=0.95,
                        beta2=0.9995, warmup=0, schedule="exponential", lr_decay=0.999995, ema_decay=0.9995,
                        steps=1_000_000, save_every=10_000, n_samples=16),
    },
}
ARCH_PRESETS["pixelcnn++"]["fashion-mnist"] = ARCH_PRESETS["pixelcnn++"]["mnist"]
# PixelRNN (van den Oord et al. 2016): the kernels are Table 1's (7x7 mask A first; Row LSTM 3 x 1
# input-to-state and state-to-state; Diagonal BiLSTM 1x1 and 2 x 1); the depths and widths h are
# Sec. 5's as commonly cited (not re-checked against the paper's text here); the width of the output
# layers, the optimiser and the number of steps are ours (the same as the PixelCNN's presets).
# 2D points: the Gated PixelCNN's points preset with 2 LSTM layers instead of 4 (ours: on a 1 x 2 image
# the recurrences run over one row and two columns, and half the layers halves a CPU benchmark's time).
_POINTS_RNN = dict(PRESETS["points"], layers=2)
_CIFAR10_RNN = dict(hidden=128, layers=12, kernel=3, first_kernel=7, out_hidden=1024, batch_size=64, lr=1e-3,
                    warmup=1000, steps=200_000, ema_decay=0.9995, save_every=10_000, n_samples=16)
ARCH_PRESETS["rowlstm"] = {
    # ours: 4 Row LSTM layers of h = 32 on small images (digits: 8 rows)
    "image": dict(hidden=32, layers=4, kernel=3, first_kernel=7, out_hidden=128),
    # 12 layers of h = 128; published: Row LSTM 3.07 bits/dim. A GPU preset.
    "cifar10": _CIFAR10_RNN,
    "points": _POINTS_RNN,
}
ARCH_PRESETS["diagonal-bilstm"] = {
    "image": dict(hidden=32, layers=4, kernel=3, first_kernel=7, out_hidden=128),
    # binarised MNIST, 7 layers of h = 16; published: 79.20 nats. Output width 64 and the optimiser are ours.
    "mnist": dict(binarize=True, hidden=16, layers=7, kernel=3, first_kernel=7, out_hidden=64, batch_size=64,
                  lr=1e-3, warmup=500, steps=50_000, ema_decay=0.9995, save_every=5000, n_samples=16),
    # 12 layers of h = 128; published: Diagonal BiLSTM 3.00 bits/dim. A GPU preset.
    "cifar10": _CIFAR10_RNN,
    "points": _POINTS_RNN,
}


def check_config(cfg):
    """One-line errors for values the flags' types let through; checks that need the data (colour
    channels, image sides, labels) are in build."""
    for name in ("hidden", "layers", "out_hidden", "n_mix"):
        check_range(cfg, name, 1)
    for name in ("kernel", "first_kernel"):
        check_range(cfg, name, 3)
        if getattr(cfg, name) % 2 == 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)} is even; accepted: odd sizes >= 3, "
                            "so the kernel has a centre tap")
    check_range(cfg, "bins", 2, 256)
    for name in ("warmup", "decay_steps", "min_lr", "grad_clip", "completions"):
        check_range(cfg, name, 0)
    check_range(cfg, "lr_decay", 0, 1, open_low=True)
    for name in ("beta1", "beta2", "ema_decay", "dropout"):
        check_range(cfg, name, 0, 1, open_high=True)
    if cfg.arch == "diagonal-bilstm" and cfg.kernel != 3:
        raise UserError(f"--kernel {cfg.kernel} is not used by --arch diagonal-bilstm (its convolutions are 1x1 "
                        "and 2 x 1, PixelRNN Sec. 3.2); accepted: --kernel 3, or --arch rowlstm, gated or pixelcnn")
    if cfg.dropout and cfg.arch != "pixelcnn++":
        raise UserError(f"--dropout {cfg.dropout} is PixelCNN++'s (Salimans et al. Sec. 2.5); accepted: "
                        "--arch pixelcnn++, or --dropout 0")


def learning_rate(step, cfg):
    """The learning rate of step `step` (0-based): linear warm-up over --warmup steps, then the
    cosine decay to --min-lr at --decay-steps (or --steps) (Loshchilov & Hutter 2017, arXiv
    1608.03983, Eq. 5), or lr * lr_decay^(step + 1) as the official PixelCNN++ code multiplies
    before every update, or constant."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "exponential":
        return cfg.lr * cfg.lr_decay ** (step + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    total = cfg.decay_steps or cfg.steps
    progress = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------
# Data and pictures
# ----------------------------------------------------------------------------------------

def image_shape(info):
    """(C, H, W) of what the network models: the images, or a 2D point as a 1 x 2 image of bins."""
    return (1, 1, 2) if info.kind == "points" else tuple(info.shape)


def model_levels(cfg, info):
    """The levels L of each sub-pixel: a coordinate's bins, 2 with --binarize, else the images' own."""
    if info.kind == "points":
        return cfg.bins
    return 2 if cfg.binarize else info.levels


def binarize(x, levels):
    """Integer levels -> 0/1: 1 where the value is at least half the range, 2x >= L - 1 (digits:
    x >= 8 of 0..16, which is the digits-binary set; 8-bit images: x >= 128)."""
    return (2 * x.long() >= levels - 1).long()


def to_levels(x, cfg, info):
    """A batch of data -> the integer levels (B, C, H, W) the likelihood scores: images (binarised
    with --binarize), or points as their 1 x 2 image of bins."""
    if info.kind == "points":
        return point_levels(x.float(), info.lim, cfg.bins)
    return binarize(x, info.levels) if cfg.binarize else x.long()


def sample_labels(n, cfg, info, device):
    """Labels 0, 1, ..., 9, 0, ... for a conditional model's samples, None otherwise."""
    return torch.arange(n, device=device) % info.num_classes if cfg.cond else None


def sample_data(net, cfg, info, n, generator, fast=True):
    """n samples: images (n, C, H, W) of uint8 levels, or points (n, 2)."""
    device = next(net.parameters()).device
    x = sample(net, n, image_shape(info), model_levels(cfg, info), net.likelihood, sample_labels(n, cfg, info, device),
               fast=fast, generator=generator)
    return levels_to_points(x, info.lim, cfg.bins, generator) if info.kind == "points" else x


def complete_images(net, cfg, info, images, labels, k, generator, fast=True):
    """Completions of test images: the top half given, the bottom half sampled (sample with
    start = (H // 2) * W). Returns (N * (k + 2), C, H, W) uint8: per image the top half alone, k
    completions, the original."""
    device = next(net.parameters()).device
    C, H, W = info.shape
    given = to_levels(images, cfg, info).to(device)
    y = labels.to(device).repeat_interleave(k) if cfg.cond else None
    done = sample(net, len(given) * k, (C, H, W), model_levels(cfg, info), net.likelihood, y,
                  x=given.repeat_interleave(k, 0), start=(H // 2) * W, fast=fast, generator=generator)
    half = given.clone()
    half[:, :, H // 2:] = 0
    return torch.cat([half[:, None].to(torch.uint8), done.view(len(given), k, C, H, W),
                      given[:, None].to(torch.uint8)], dim=1).flatten(0, 1)


def write_pictures(net, cfg, info, out, step, logger, test=None, fast=True):
    """Samples (timed: a "sample" event), samples<tag>.png (a scatter for points) and, for images,
    completion<tag>.png, the top halves of --completions test images completed; tag is _<step>,
    or nothing without a step. Returns the samples (uint8 levels, or float points)."""
    tag = "" if step is None else f"_{step}"
    device = next(net.parameters()).device
    g = torch.Generator(device).manual_seed(cfg.seed)  # the training generators are left alone
    start = time.perf_counter()
    x = sample_data(net, cfg, info, cfg.n_samples, g, fast)
    seconds = time.perf_counter() - start
    logger.event("sample", n=cfg.n_samples, seconds=round(seconds, 3),
                 samples_per_s=cfg.n_samples / max(seconds, 1e-9), sampler="fast" if fast else "naive")
    if info.kind == "points":
        save_scatter(x.cpu(), out / f"samples{tag}.png", lim=info.lim,
                     title="PixelCNN samples" + ("" if step is None else f", step {step}"))
        return x
    levels = model_levels(cfg, info)
    save_image_grid(x.cpu(), out / f"samples{tag}.png", levels=levels, nrow=10 if cfg.cond else None,
                    title="column k: samples of class k" if cfg.cond else None)
    if test is not None and cfg.completions:
        k, m = 4, cfg.completions
        grid = complete_images(net, cfg, info, test.data[:m], test.labels[:m], k, g, fast)
        save_image_grid(grid.cpu(), out / f"completion{tag}.png", levels=levels, nrow=k + 2,
                        title=f"each row: the top half given,\n{k} samples of the bottom half,\nthe original")
    return x


def write_density(net, cfg, info, ds, out):
    """density.npz and density.png: the model's log-density on common.density_on_grid's 128 x 128
    grid beside the truth (or a histogram of the test points when the set has no closed-form density)."""
    device = next(net.parameters()).device

    @torch.inference_mode()
    def log_prob(x):
        return points_log_prob(net, x.to(device), info.lim, cfg.bins, net.likelihood).cpu()

    grid = density_on_grid(log_prob, info.lim, n=128)
    np.savez(out / "density.npz", log_density=grid, lim=info.lim)
    truth = ({"true density": density_on_grid(ds.log_prob, info.lim, n=128)} if ds.log_prob is not None
             else {"test data": ds.data})
    save_density({**truth, f"PixelCNN ({cfg.bins} bins)": grid}, out / "density.png", info.lim)


# ----------------------------------------------------------------------------------------
# Run code
# ----------------------------------------------------------------------------------------

MODEL = "pixelcnn"


def build(cfg, info):
    """The network for a configuration and the data's description; its likelihood is
    net.likelihood ("categorical" for the softmax networks, "mixture" for PixelCNN++)."""
    C, H, W = image_shape(info)
    if cfg.cond and not info.num_classes:
        raise UserError(f"--cond needs labelled images (digits, mnist, fashion-mnist, cifar10); {info.name} has none")
    if cfg.binarize and info.kind != "image":
        raise UserError(f"--binarize thresholds images; {info.name} is {info.kind} data")
    classes = info.num_classes if cfg.cond else 0
    if cfg.arch == "pixelcnn++":
        if H % 4 or W % 4:
            what = "a 2D point is a 1x2 image of bins" if info.kind == "points" else f"{info.name} is {H}x{W}"
            raise UserError(f"--arch pixelcnn++ halves the image twice, so its sides must be multiples of 4; {what}: "
                            "use --arch gated or pixelcnn")
        return PixelCNNpp(C, cfg.hidden, cfg.layers, cfg.n_mix, cfg.dropout, classes)
    if cfg.hidden % C if cfg.arch == "gated" else cfg.hidden < C:  # gated: each f, g pair in one colour group
        accepted = f"a multiple of {C}" if cfg.arch == "gated" else f"at least {C}"
        raise UserError(f"--hidden {cfg.hidden} does not split into {C} colour groups (PixelRNN Sec. 3.4); "
                        f"accepted: {accepted}")
    levels = model_levels(cfg, info)
    if cfg.arch == "diagonal-bilstm":
        return DiagonalBiLSTM(C, levels, cfg.hidden, cfg.layers, cfg.first_kernel, cfg.out_hidden, classes)
    network = {"gated": GatedPixelCNN, "pixelcnn": PixelCNN, "rowlstm": RowLSTM}[cfg.arch]
    return network(C, levels, cfg.hidden, cfg.layers, cfg.kernel, cfg.first_kernel, cfg.out_hidden, classes)


def train(cfg):
    """Maximum likelihood: the exact NLL of each training batch (one network evaluation, the masks
    give every conditional at once) with Adam and an EMA of the weights; under torchrun every
    process trains on its slice of the global batch (DDP)."""
    with Training(cfg, MODEL) as run:
        ds = load_dataset(cfg.dataset, "train", cfg.data_dir)
        info = ds.info
        seed_everything(cfg.seed)  # the same initial weights on every process
        net = build(cfg, info).to(run.device)
        ema = EMA(net, cfg.ema_decay)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        batches = Batches(ds, cfg.batch_size, run.dist, seed=cfg.seed)
        step = run.start(info, model=net, ema=ema, opt=opt, batches=batches)
        model = wrap_ddp(net, run.dist, cfg.compile)
        test = load_dataset(cfg.dataset, "test", cfg.data_dir) if info.kind == "image" else None  # completions
        levels, dims = model_levels(cfg, info), math.prod(image_shape(info))
        amp = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.amp)

        def pictures(step):
            write_pictures(ema.model, cfg, info, run.out, step, run.logger, test, fast=not cfg.naive_sampler)

        for step in run.steps(step, pictures):
            lr = learning_rate(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = next(batches)
            with amp:  # nats per sub-pixel (per coordinate for points)
                loss = nll(model, to_levels(x, cfg, info), levels, net.likelihood, y if cfg.cond else None)
                loss = loss.mean() / dims
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            ema.update(net)
            bits = {"bits_per_dim": loss / math.log(2)} if info.kind == "image" else {}
            run.log(loss=loss, **bits, lr=lr)
    run.report(["ckpt.pt", f"samples_{run.step}.png", f"completion_{run.step}.png", "metrics.jsonl", "loss.png"])


def evaluate(cfg):
    """--eval CKPT: the exact test-set NLL, nats per image and bits/dim (for a --cond model,
    -log p(x | y) with the test labels), or nats per point with density.npz and density.png."""
    net, saved, info = load(cfg.eval, get_device(cfg.device))
    if cfg.fid is not None:
        return fid_evaluate(cfg, info, lambda n, g: sample_data(net, saved, info, n, g), model_levels(saved, info))
    device = next(net.parameters()).device
    out = output_dir(cfg, cfg.eval)
    ds = load_dataset(info.name, "test", cfg.data_dir or saved.data_dir)
    logger = Logger(out, 0)
    start = time.perf_counter()
    if info.kind == "image":
        levels, parts = model_levels(saved, info), []
        with torch.inference_mode():
            for i in range(0, len(ds.data), cfg.batch_size):
                x = to_levels(ds.data[i:i + cfg.batch_size], saved, info).to(device)
                y = ds.labels[i:i + cfg.batch_size].to(device) if saved.cond else None
                parts.append(nll(net, x, levels, net.likelihood, y).double().cpu())
        v = torch.cat(parts)
        nats = v.mean().item()
        logger.event("eval", split="test", nll=nats, bits_per_dim=bits_per_dim(nats, info.dims),
                     stderr=v.std().item() / math.sqrt(len(v)), n=len(v), levels=levels, conditional=saved.cond,
                     arch=saved.arch, seconds=round(time.perf_counter() - start, 1))
    else:
        with torch.inference_mode():
            log_p = torch.cat([points_log_prob(net, ds.data[i:i + 4096].to(device), info.lim, saved.bins,
                                               net.likelihood).double().cpu() for i in range(0, len(ds.data), 4096)])
        two_log_w = 2 * math.log(bin_width(info.lim, saved.bins))  # continuous NLL = discrete NLL + 2 log w
        truth = {}
        if ds.log_prob is not None:
            truth["entropy"], truth["entropy_se"] = entropy_estimate(info.name)
        logger.event("eval", split="test", nll=-log_p.mean().item(), discrete_nll=-log_p.mean().item() - two_log_w,
                     stderr=log_p.std().item() / math.sqrt(len(log_p)), n=len(log_p), bins=saved.bins, **truth)
        write_density(net, saved, info, ds, out)
    report_files(out, ["metrics.jsonl", "density.npz", "density.png"])


def draw_samples(cfg):
    """--sample CKPT: samples.png (a scatter for points), samples.pt (uint8 levels, or float
    points), completion.png of test images, and a "sample" event with samples per second (the fast
    sampler, or the naive one with --naive-sampler)."""
    net, saved, info = load(cfg.sample, get_device(cfg.device))
    out = output_dir(cfg, cfg.sample)
    run = dataclasses.replace(saved, n_samples=cfg.n_samples, seed=cfg.seed, completions=cfg.completions)
    logger = Logger(out, 0)
    test = None
    if info.kind == "image" and cfg.completions:  # test images: from the cache, as training left it
        try:
            test = load_dataset(info.name, "test", cfg.data_dir or saved.data_dir)
        except UserError as e:
            logger.event("no_completions", reason=str(e))
    x = write_pictures(net, run, info, out, None, logger, test, fast=not cfg.naive_sampler)
    torch.save(x.cpu(), out / "samples.pt")
    report_files(out, ["samples.png", "samples.pt", "completion.png", "metrics.jsonl"])


def load(path, device="cpu"):
    """(the EMA network in evaluation mode on `device`, its training Config, its data's
    description) from a checkpoint of pixelcnn.py. The masks are not stored: the network is
    rebuilt from the configuration, then given the weights."""
    ckpt = load_checkpoint(path, MODEL)
    cfg, info = saved_config(Config, ckpt)
    net = build(cfg, info)
    load_weights(net, ckpt["ema"]["model"], path)
    return net.to(device).eval(), cfg, info


def main(argv=None):
    """Train (default), or --eval CKPT, or --sample CKPT; a user's mistake exits with one line.
    The presets are the architecture's: ARCH_PRESETS[--arch] (PRESETS for the Gated PixelCNN)."""
    with user_errors():
        cfg = parse_config(Config, PRESETS, argv, doc=__doc__, kinds=("image", "points"), arch_presets=ARCH_PRESETS)
        check_config(cfg)
        return dispatch(cfg, train, evaluate, draw_samples)


if __name__ == "__main__":
    main()
