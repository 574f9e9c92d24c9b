"""GPT and image GPT: autoregressive transformers for text, pixels and 2D points.

Papers
  Vaswani et al. 2017, "Attention Is All You Need", arXiv 1706.03762 (attention, Eq. 1).
  Radford et al. 2018 (GPT) and 2019 (GPT-2), OpenAI reports, no arXiv ids: the decoder-only
    language model, tied embeddings, pre-LayerNorm blocks and the 1/sqrt(N) residual init.
  Chen et al. 2020, "Generative Pretraining from Pixels" (iGPT, ICML 2020, no arXiv id): pixels in
    raster order, one token per pixel, the k-means colour palette (Sec. 3.1).
  Fan et al. 2018, arXiv 1805.04833 (top-k); Holtzman et al. 2020, arXiv 1904.09751 (top-p).
Implemented: the GPT-2 network (--arch gpt2: GPT-2 small's shape), the exact likelihood, a batched
sampler with a key-value cache, temperature, top-k and top-p; AdamW, warm-up + cosine, clipping,
bf16 (--amp), torch.compile, DDP. Images one token per pixel: a uniform palette (the top
--image-bits bits of each channel; digits' 17 levels exactly) or --palette kmeans (k = 512 centres
fitted once on training pixels; the NLL is then the palette tokens', not bits/dim of the pixels);
character-level text; 2D points as two bin tokens with a piecewise-uniform density.
Not implemented: BPE tokenisation or GPT-2's weights, iGPT's BERT objective, linear probes,
fine-tuning.

Run it
  python gpt.py [--dataset shakespeare|cifar10] [--arch gpt2] [--palette kmeans]
  python gpt.py --sample runs/gpt-digits/ckpt.pt --top-p 0.9      # samples, completions
  python gpt.py --eval runs/gpt-digits/ckpt.pt                     # exact test NLL, bits/dim (or /char)

Map (u_t the tokens, h the residual stream)
  Vaswani Eq. 1                 softmax(Q K^T / sqrt(d_k) + causal mask) V        causal_attention, KVCache
  Vaswani Sec. 3.2.2            multi-head, W^O                                   CausalSelfAttention
  Radford 2018 Eq. 2            h_0 = U W_e + W_p, P(u) = softmax(h_n W_e^T)      GPT.forward
  Radford 2019 Sec. 2.3         pre-LN blocks, final LN, W ~ N(0, 0.02/sqrt(2n))  Block, GPT._init_weights
  Radford 2019 Eq. 1, Chen Eq. 1  log p(u) = sum_t log p(u_t | u_<t)              nll, bits_per_dim
  Radford 2018 Eq. 1, Chen Eq. 2  L_AR = E[-log p(u)] / T                         sequence_loss
  Chen Sec. 2.1, 3.2            raster order, token = sum_c q_c Q^(C-1-c)        image_tokens, tokens_to_image
  Chen Sec. 3.1 (k-means)       tok(x) = argmin_k ||x - mu_k||^2, Lloyd's steps   nearest_centre, fit_palette
  Fan et al., Holtzman Eq. 2-3  top-k, nucleus V(p), renormalised softmax         top_k_filter, top_p_filter
  autoregressive sampling       u_t ~ p(u_t | u_<t), cached keys and values       generate, sample_next
  Radford 2018 Sec. 4.1         warm-up + cosine, decay on matrices only          learning_rate, configure_optimizer
  2D points (ours)              log p(x) = log P(bins) - 2 log w                  points_log_prob
"""
import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Batches, Logger, RunConfig, Training, UserError, check_range, density_on_grid, dispatch, flag,
                    get_device, load_checkpoint, load_dataset, load_weights, output_dir, parse_config, report_files,
                    save_density, save_image_grid, save_scatter, saved_config, seed_everything, user_errors,
                    wrap_ddp)
from common import fid_evaluate  # --eval CKPT --fid N

# ----------------------------------------------------------------------------------------
# Attention (Vaswani et al. 2017) and its key-value cache
# ----------------------------------------------------------------------------------------


def causal_attention(q, k, v, dropout_p=0.0):
    """Masked scaled dot-product attention, softmax(Q K^T / sqrt(d_k)) V (Vaswani et al. 2017, Eq. 1).

    q: (B, h, Tq, d); k, v: (B, h, Tk, d) with Tq <= Tk. The queries are the LAST Tq positions of
    the Tk keys (a KV cache holds the first Tk - Tq), so query i sits at absolute position
    Tk - Tq + i and sees keys 0 .. Tk - Tq + i. Returns (B, h, Tq, d).
    """
    Tq, Tk = q.size(-2), k.size(-2)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if Tq == 1:  # one new token sees every cached key: no mask, the fastest kernel
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    # is_causal aligns the mask top-left when Tq != Tk; we need it bottom-right
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class KVCache:
    """Keys and values of the positions seen so far, per layer, so that each new token costs one
    position of compute. Buffers (n_layer, B, h, block_size, d) are allocated on first use with
    the dtype of the keys (bf16 under autocast)."""

    def __init__(self, n_layer, max_len):
        self.n_layer, self.max_len = n_layer, max_len
        self.k = self.v = None
        self.length = 0  # positions filled; advanced by GPT.forward after all layers

    def update(self, layer, k, v):
        """Store k, v (B, h, T, d) at positions length .. length+T-1; return all keys and values so far."""
        if self.k is None:
            B, h, _, d = k.shape
            self.k = k.new_zeros(self.n_layer, B, h, self.max_len, d)
            self.v = torch.zeros_like(self.k)
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self):
        self.length = 0


# ----------------------------------------------------------------------------------------
# Data as token sequences (Chen et al. 2020 for pixels; bins for 2D points)
# ----------------------------------------------------------------------------------------


def image_levels(levels, channels, bits):
    """Levels per channel the model sees. 8-bit images keep their top `bits` bits (default 4 for
    grey: 16 levels; 3 for colour: 8^3 = 512 colours, the size of iGPT's 9-bit palette but uniform
    instead of k-means, Chen et al. 2020, Sec. 3.2). Other level counts (digits: 17) are kept exactly."""
    if levels != 256:
        return levels
    bits = bits or (4 if channels == 1 else 3)
    if not 1 <= bits <= 8 or bits * channels > 16:
        raise ValueError(f"{bits} bits per channel with {channels} channels is not accepted; use 1..8 bits "
                         f"with bits * channels <= 16 (a vocabulary of at most 65536)")
    return 2 ** bits


def quantise_image(x, levels, qlevels):
    """Integer levels 0..levels-1 -> 0..qlevels-1 by floor(x * qlevels / levels); for 256 -> 2^b
    this drops the low 8 - b bits. Identity when qlevels == levels."""
    x = x.long()
    return x if qlevels == levels else (x * qlevels) // levels


def image_tokens(x, levels, qlevels):
    """Images (B, C, H, W) -> one token per pixel in raster order (Chen et al. 2020, Sec. 2.1, Eq. 1
    with the identity permutation): token = sum_c q_c * qlevels^(C-1-c), so (B, H*W) over qlevels^C values."""
    q = quantise_image(x, levels, qlevels)
    C = q.size(1)
    place = qlevels ** torch.arange(C - 1, -1, -1, device=q.device).view(1, C, 1, 1)
    return (q * place).sum(1).flatten(1)


def tokens_to_image(tok, shape, qlevels):
    """Inverse of image_tokens: (B, H*W) -> (B, C, H, W) integer levels 0..qlevels-1 (uint8)."""
    C, H, W = shape
    place = qlevels ** torch.arange(C - 1, -1, -1, device=tok.device).view(1, C, 1)
    q = (tok.view(-1, 1, H * W) // place) % qlevels
    return q.view(-1, C, H, W).to(torch.uint8)


# ----------------------------------------------------------------------------------------
# The k-means colour palette (Chen et al. 2020, Sec. 3.1)
# ----------------------------------------------------------------------------------------


def nearest_centre(x, centres, chunk=16384):
    """c(x) = argmin_k ||x - mu_k||^2, the palette token of each colour x (N, C) among the centres
    mu (K, C) (Chen et al. 2020, Sec. 3.1) -> (N,) int64; ties go to the lower k."""
    centres = centres.double()
    mu2 = (centres * centres).sum(1)
    out = []
    for part in x.double().split(chunk):  # ||x||^2 is the same for every k: left out
        out.append((mu2 - 2 * part @ centres.T).argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


def lloyd_step(x, centres):
    """One step of Lloyd's algorithm: assign each colour x (N, C) to its nearest centre, then move
    each centre to the mean of its colours (a centre with none stays). -> (centres (K, C), assignment (N,))."""
    x = x.double()
    a = nearest_centre(x, centres)
    return _cluster_means(x, a, centres.double()), a


def _cluster_means(x, a, centres):
    sums = torch.zeros_like(centres).index_add_(0, a, x)
    counts = torch.bincount(a, minlength=len(centres))[:, None]
    return torch.where(counts > 0, sums / counts.clamp(min=1), centres)


def fit_palette(x, k, generator=None, max_steps=300):
    """k-means on the colours x (N, C) (Chen et al. 2020, Sec. 3.1: k = 512 centres over RGB): the
    centres start at k distinct colours of x drawn with `generator`, then Lloyd steps until the
    assignment stops changing, where the centres are a fixed point of lloyd_step (or max_steps).
    -> (K, C) float64."""
    x = x.double()
    colours = torch.unique(x, dim=0)
    if len(colours) < k:
        raise ValueError(f"{len(colours)} distinct colours cannot make a palette of {k}")
    centres = colours[torch.randperm(len(colours), generator=generator)[:k].to(x.device)]
    a = nearest_centre(x, centres)
    for _ in range(max_steps):
        centres = _cluster_means(x, a, centres)
        new = nearest_centre(x, centres)
        if torch.equal(new, a):
            break
        a = new
    return centres


def palette_tokens(x, centres):
    """Images (B, C, H, W) -> the nearest centre of each pixel's colour in raster order (B, H*W)."""
    B, C = x.shape[:2]
    return nearest_centre(x.permute(0, 2, 3, 1).reshape(-1, C), centres.to(x.device)).view(B, -1)


def palette_image(tok, centres, shape):
    """Tokens (B, H*W) -> each pixel the colour of its centre mu_tok, rounded to the nearest level
    (uint8, (B, C, H, W)) for pictures."""
    C, H, W = shape
    colours = centres.to(tok.device)[tok].round().clamp(0, 255).to(torch.uint8)  # (B, H*W, C)
    return colours.permute(0, 2, 1).reshape(-1, C, H, W)


def bin_width(lim, bins):
    return 2 * lim / bins


def point_tokens(x, lim, bins):
    """Points (B, 2) -> (x bin, y bin) tokens (B, 2), bins of width 2 lim / bins over [-lim, lim];
    points outside the square fall in the edge bins."""
    t = torch.floor((x + lim) / bin_width(lim, bins)).long()
    return t.clamp(0, bins - 1)


def tokens_to_points(tok, lim, bins, generator=None):
    """(B, 2) bins -> points drawn uniformly inside their bin: a sample of the piecewise-uniform density."""
    u = torch.rand(tok.shape, generator=generator, device=tok.device)
    return (tok + u) * bin_width(lim, bins) - lim


def with_start(tok, start_token):
    """Prepend a start token, so the first data token is predicted too: (B, L) -> (B, L + 1)."""
    return torch.cat([torch.full_like(tok[:, :1], start_token), tok], dim=1)


def text_windows(data, T):
    """Non-overlapping evaluation windows (N, T + 1) of a token stream: window k is
    data[kT : kT + T + 1], its first token context only, so every token after the first is
    predicted exactly once, with a context of 1..T tokens. A tail shorter than T + 1 is dropped."""
    n = (data.numel() - 1) // T
    starts = torch.arange(n) * T
    return data[starts[:, None] + torch.arange(T + 1)]


# ----------------------------------------------------------------------------------------
# The likelihood by the chain rule, and the training objective
# ----------------------------------------------------------------------------------------


def nll(net, idx):
    """-log p(idx_1 .. idx_{T-1} | idx_0) = -sum_t log p(idx_t | idx_<t) in nats per sequence (B,), the
    chain rule (Radford et al. 2019, Eq. 1; Chen et al. 2020, Eq. 1); net (B, T-1) -> logits, causal."""
    logits = net(idx[:, :-1])
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # fp32 at least
    return -logp.gather(-1, idx[:, 1:, None]).squeeze(-1).sum(1)


def sequence_loss(net, idx):
    """L_AR = E[-log p(x)] (Chen et al. 2020, Eq. 2; Radford et al. 2018, Eq. 1), per token:
    the mean next-token cross-entropy in nats over the batch's (B, T) sequences. `net` is called
    (its forward), so DistributedDataParallel's gradient hooks fire."""
    logits = net(idx[:, :-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 under --amp: the loss in fp32
    return F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())


def points_log_prob(net, x, lim, bins):
    """Continuous log-density of 2D points under the piecewise-uniform model: the two-token model
    gives P(bin_x, bin_y), spread uniformly over a bin of area w^2, so
    log p(x) = log P(bins) - 2 log w, i.e. continuous NLL = discrete NLL + 2 log w. (B,) nats.
    The start token's id is `bins`, the one after the data tokens."""
    seq = with_start(point_tokens(x, lim, bins), bins)
    return -nll(net, seq) - 2 * math.log(bin_width(lim, bins))


def bits_per_dim(nats, dims):
    """Nats per example -> bits per dimension: nats / (dims ln 2)."""
    return nats / (dims * math.log(2))


@torch.inference_mode()
def dataset_nll(net, seqs, batch_size=256):
    """nll of every sequence (N, L) in batches, on the network's device; returns (N,) on the CPU."""
    device = next(net.parameters()).device
    return torch.cat([nll(net, seqs[i:i + batch_size].to(device)).cpu() for i in range(0, len(seqs), batch_size)])


# ----------------------------------------------------------------------------------------
# Sampling: filters (Fan et al. 2018; Holtzman et al. 2020) and the batched sampler
# ----------------------------------------------------------------------------------------


def top_k_filter(logits, k):
    """Keep the k most probable tokens (top-k sampling, Fan et al. 2018): logits below the k-th largest
    become -inf. Ties with the k-th are kept. logits (..., V)."""
    kth = logits.topk(min(k, logits.size(-1)), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus: keep V(p), the smallest set of most probable tokens whose mass reaches p
    (Holtzman et al. 2020, Eq. 2); renormalising the rest is Eq. 3 (the softmax that follows).
    A token is kept iff the tokens strictly more probable than it hold less than p, so the most
    probable token is always kept."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    remove_sorted = mass_before >= p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits (B, V): argmax when temperature is 0, else softmax(logits / T)
    after top-k then top-p filtering. Returns (B, 1)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True, generator=None):
    """u_t ~ p(u_t | u_<t) for t = T0 .. T0 + max_new_tokens - 1, batched: idx (B, T0) -> (B, T0 +
    max_new_tokens); with use_cache the keys and values come from a KVCache (the same tokens)."""
    with torch.inference_mode():
        out = _generate(model, idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator)
    return out.clone()  # an ordinary tensor (inference tensors refuse autograd)


def _generate(model, idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator):
    # past the learned positions the window jumps to keep the last block_size // 2 tokens (re-encoded,
    # the cache rebuilt): every token has at least half a context, cached or not
    block = model.config.block_size
    keep = max(1, block // 2)
    was_training = model.training
    model.eval()
    try:
        start = max(0, idx.size(1) - block)
        cache = model.new_cache() if use_cache else None
        logits = model(idx[:, start:], cache=cache, last_only=True)[:, -1]
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            idx = torch.cat([idx, nxt], dim=1)
            if i == max_new_tokens - 1:
                break
            if idx.size(1) - start > block:  # the window is full: slide it
                start = idx.size(1) - keep
                if cache is not None:
                    cache.reset()
                logits = model(idx[:, start:], cache=cache, last_only=True)[:, -1]
            elif cache is not None:
                logits = model(nxt, cache=cache, last_only=True)[:, -1]
            else:
                logits = model(idx[:, start:], last_only=True)[:, -1]
    finally:
        model.train(was_training)
    return idx


# ----------------------------------------------------------------------------------------
# The optimiser (Radford et al. 2018, Sec. 4.1)
# ----------------------------------------------------------------------------------------


def configure_optimizer(net, lr, betas=(0.9, 0.99), weight_decay=0.1):
    """AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101) with weight decay on matrices (and the
    embeddings) only, not on biases or LayerNorm gains (Radford et al. 2018, Sec. 4.1)."""
    decay = [p for p in net.parameters() if p.dim() >= 2]
    no_decay = [p for p in net.parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


# ----------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class GPTConfig:
    """The network's shape (Radford et al. 2019, Table 2 names: layers, d_model, context, vocab)."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 64     # context length: the most positions the model attends over
    vocab_size: int = 17     # tokens the model predicts
    dropout: float = 0.0
    bias: bool = True        # biases in Linear and LayerNorm layers, as in GPT-2
    start_token: bool = False  # one more input-only token, id vocab_size, that starts a sequence


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017, Sec. 3.2.2) with a causal mask."""

    def __init__(self, c):
        super().__init__()
        if c.n_embd % c.n_head:
            raise ValueError(f"n_embd {c.n_embd} is not divisible by n_head {c.n_head}")
        self.n_head, self.dropout = c.n_head, c.dropout
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)  # W^Q, W^K, W^V of all heads
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)      # W^O, a residual projection
        self.resid_drop = nn.Dropout(c.dropout)

    def forward(self, x, cache=None, layer=0):
        """x (B, T, C) -> (B, T, C). With a cache, x holds the new positions only: their keys and
        values are appended to the layer's cache and the queries attend to everything cached."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, h, T, d)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = causal_attention(q, k, v, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network, width 4 d_model (Vaswani et al. 2017, Eq. 2), with the
    GELU of GPT (Radford et al. 2018, Sec. 4.1) in its tanh form, as GPT-2's code computes it."""

    def __init__(self, c):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)  # a residual projection
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: LayerNorm moved to the input of each sub-block
    (Radford et al. 2019, Sec. 2.3)."""

    def __init__(self, c):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.mlp = MLP(c)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer: P(u) = softmax(h_n W_e^T), h_0 = U W_e + W_p (Radford et al. 2018, Eq. 2)."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size + c.start_token, c.n_embd)  # W_e, also the output layer (tied)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)  # W_p, learned positions
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, bias=c.bias)  # the extra final LayerNorm of GPT-2
        self.apply(self._init_weights)
        self._scale_residual_init()

    def _init_weights(self, m):
        """N(0, 0.02) weights and zero biases (Radford et al. 2018, Sec. 4.1)."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def _scale_residual_init(self):
        """Weights of the residual projections scaled by 1/sqrt(N), N = 2 n_layer residual layers
        (Radford et al. 2019, Sec. 2.3), so the residual stream's variance does not grow with depth."""
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.config.n_layer))

    def new_cache(self):
        return KVCache(self.config.n_layer, self.config.block_size)

    def forward(self, idx, cache=None, last_only=False):
        """idx (B, T) token ids -> logits (B, T, vocab) of the next token at every position.

        With a cache, idx are the tokens at positions cache.length .. cache.length + T - 1 and the
        cache grows by T. With last_only, only the last position's logits are computed: (B, 1, vocab).
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} positions exceed the context of {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, n_embd)
        for i, block in enumerate(self.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        # tied output layer W_e^T; the start token is never predicted, so p sums to 1 over the data tokens
        return F.linear(self.ln_f(x), self.wte.weight[:self.config.vocab_size])

    def nll(self, idx):
        """Exact negative log-likelihood per sequence in nats; see nll()."""
        return nll(self, idx)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True, generator=None):
        """Continue idx (B, T) by max_new_tokens sampled tokens; see generate()."""
        return generate(self, idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator)


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Config(RunConfig):
    """Defaults train image GPT on digits (its preset: 2000 steps) in about 4 minutes on one CPU thread
    (test 1.85 bits/dim)."""

    steps: int = flag(1000, "optimisation steps")
    batch_size: int = flag(64, "global batch size (sequences)")
    lr: float = flag(1e-3, "peak learning rate (after warm-up)")
    arch: str = flag("default", "architecture laid over the dataset's preset, under the flags you type: default "
                                "keeps the preset's; gpt2 is GPT-2 small's shape (12 layers, 12 heads, 768 wide, "
                                "context 1024; text stays character level)", choices=("default", "gpt2"))
    n_layer: int = flag(4, "transformer blocks")
    n_head: int = flag(4, "attention heads (must divide --n-embd)")
    n_embd: int = flag(64, "width of the residual stream")
    block_size: int = flag(128, "context length for text; images and 2D points use their own sequence length")
    dropout: float = flag(0.0, "dropout on embeddings, attention weights and residual branches")
    bias: bool = flag(True, "biases in Linear and LayerNorm layers (GPT-2 has them)")
    weight_decay: float = flag(0.1, "AdamW weight decay, applied to matrices only")
    beta1: float = flag(0.9, "AdamW beta1")
    beta2: float = flag(0.99, "AdamW beta2")
    warmup: int = flag(100, "linear warm-up steps")
    min_lr: float = flag(1e-4, "learning rate at the end of the cosine decay")
    decay_steps: int = flag(0, "length of the cosine decay in steps (0 = --steps); set it to resume into a longer run")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0 = off)")
    image_bits: int = flag(0, "bits kept per channel of 8-bit images (0 = 4 for grey, 3 for colour); "
                              "images with other level counts (digits: 17) are used as they are")
    palette: str = flag("uniform", "colours -> tokens: uniform (--image-bits per channel) or kmeans (Chen et al. "
                                   "2020: --palette-size k-means centres fitted on the training set; colour images; "
                                   "the NLL is then the palette tokens', not comparable with bits/dim)",
                        choices=("uniform", "kmeans"))
    palette_size: int = flag(512, "k of --palette kmeans (Chen et al. 2020: 512)")
    bins: int = flag(256, "bins per coordinate for 2D points")
    temperature: float = flag(1.0, "sampling temperature (0 = greedy)")
    top_k: int = flag(0, "sample from the k most probable tokens only (0 = off)")
    top_p: float = flag(1.0, "nucleus sampling: smallest set of tokens with this mass (1 = off)")
    prompt: str = flag("\n", "text prompt the samples continue (text only)")
    sample_len: int = flag(500, "characters generated per text sample")


# Presets: {dataset or kind: Config fields}; parse_config applies PRESETS[dataset], else PRESETS[kind].
PRESETS = {
    # 8x8 digits, the Config's network; 2000 steps (ours: at 1000 it is underfit, train and test NLL 1.84
    # and 1.91 bits/dim, samples' Frechet distance 49.5; at 2000 1.66 and 1.85, 31.1, benchmarks/quality.py's
    # measure, seed 0).
    "digits": dict(steps=2000),
    # nanoGPT's shakespeare-char configuration (its config/train_shakespeare_char.py; best
    # validation loss 1.4697 nats/char).
    "shakespeare": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2,
                        batch_size=64, lr=1e-3, min_lr=1e-4, steps=5000, warmup=100,
                        beta2=0.99, weight_decay=0.1, grad_clip=1.0, n_samples=2),
    # Any other .txt: CPU-sized.
    "text": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.1, batch_size=32,
                 steps=3000, n_samples=2),
    # 2D points: two tokens per point, fresh samples every batch so no dropout is needed.
    "points": dict(n_layer=3, n_head=4, n_embd=128, dropout=0.0, batch_size=256, steps=3000,
                   n_samples=2000, warmup=100),
    # 28x28 grey images at 16 levels, 784 tokens: a GPU-sized model (4.9M parameters), far smaller
    # than iGPT; our untuned choice. On a CPU, shrink it with --n-layer/--n-embd.
    "mnist": dict(n_layer=6, n_head=8, n_embd=256, dropout=0.1, batch_size=32, steps=20000, lr=5e-4),
    # iGPT-S's shape (24 layers, width 512, 8 heads; Chen et al. 2020, not in PAPERS.md, unverified)
    # on the 512-colour palette; the optimiser settings are ours, not iGPT's. A GPU preset.
    "cifar10": dict(n_layer=24, n_head=8, n_embd=512, dropout=0.0, batch_size=64, steps=200000,
                    lr=3e-4, warmup=5000, weight_decay=0.01),
}
PRESETS["fashion-mnist"] = PRESETS["mnist"]

# Architectures `--arch` lays over the dataset's preset (the flags typed still win).
ARCHS = {
    # GPT-2 small (Radford et al. 2019, Table 2; with vocabulary GPT2_VOCAB and tied embeddings it
    # has 124,439,808 parameters). Our text is character level, so this is the architecture only.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0, bias=True),
}
GPT2_VOCAB = 50257  # GPT-2's byte-level BPE vocabulary (Radford et al. 2019, Sec. 2.2)


def presets_with_arch(arch):
    """PRESETS with the architecture ARCHS[arch] laid over every one of them (and over each kind),
    so a configuration is: defaults, the dataset's preset, the architecture, the flags typed."""
    kinds = dict.fromkeys(("image", "points", "text"), {})
    return {name: {**preset, **ARCHS[arch]} for name, preset in {**kinds, **PRESETS}.items()}


ARCH_PRESETS = {arch: presets_with_arch(arch) for arch in ARCHS}  # --arch A: PRESETS under ARCHS[A]


def check_config(cfg):
    """One-line errors for values the flags' types let through (checks that need the data are in build)."""
    for name, low in [("n_layer", 1), ("n_head", 1), ("n_embd", 1), ("block_size", 1), ("bins", 2),
                      ("warmup", 0), ("decay_steps", 0), ("sample_len", 0), ("top_k", 0), ("temperature", 0),
                      ("grad_clip", 0), ("weight_decay", 0), ("min_lr", 0)]:
        check_range(cfg, name, low)
    check_range(cfg, "dropout", 0, 1, open_high=True)
    check_range(cfg, "top_p", 0, 1, open_low=True)
    check_range(cfg, "beta1", 0, 1, open_high=True)
    check_range(cfg, "beta2", 0, 1, open_high=True)
    check_range(cfg, "image_bits", 0, 8)
    check_range(cfg, "palette_size", 2, 65536)
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"--n-embd {cfg.n_embd} is not divisible by --n-head {cfg.n_head}; "
                        "use a width that is a multiple of the heads")
    if cfg.palette != "kmeans" and cfg.palette_size != 512:
        raise UserError(f"--palette-size {cfg.palette_size} is the k-means palette's; accepted: with --palette kmeans")
    if cfg.palette == "kmeans" and cfg.image_bits:
        raise UserError(f"--image-bits {cfg.image_bits} truncates the uniform palette's channels; accepted with "
                        "--palette kmeans: --image-bits 0")


def learning_rate(step, cfg):
    """The learning rate of step `step` (0-based): linear warm-up from 0 over --warmup steps, then
    cosine annealing from --lr to --min-lr at --decay-steps (or --steps) (Radford et al. 2018,
    Sec. 4.1; Loshchilov & Hutter 2017, arXiv 1608.03983, Eq. 5)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    total = cfg.decay_steps or cfg.steps
    progress = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------
# Data and pictures
# ----------------------------------------------------------------------------------------

# The flags that turn data into tokens: --eval and --sample use the checkpoint's own.
DATA_FLAGS = ("block_size", "bins", "image_bits", "palette", "palette_size")
PALETTE_FIT_PIXELS = 100_000  # ours: k-means runs on this many training pixels drawn with the seed


class TextWindows:
    """Training batches of a token stream: windows (B, T + 1) int64 starting at uniformly drawn
    positions (their first token is context only), on dist.device. Every process draws the global
    batch from a generator seeded alike and keeps its slice, as common.Batches does for the other
    kinds."""

    def __init__(self, ds, batch_size, block_size, dist, seed=0):
        if batch_size % dist.world_size:
            raise UserError(f"--batch-size {batch_size} does not split over {dist.world_size} processes; "
                            f"use a multiple of {dist.world_size}")
        if len(ds.data) <= block_size + 1:
            raise UserError(f"{ds.info.name} has {len(ds.data)} tokens in its {ds.split} split; "
                            f"a context of {block_size} needs more")
        self.dist, self.batch_size, self.block_size = dist, batch_size, block_size
        stream = np.random.SeedSequence([seed, *"batches".encode()])  # common.Batches' data stream seed
        self.generator = torch.Generator().manual_seed(int(stream.generate_state(1)[0]))
        self.data = ds.data.to(dist.device)
        self.part = slice(dist.rank * batch_size // dist.world_size, (dist.rank + 1) * batch_size // dist.world_size)

    def __iter__(self):
        return self

    def __next__(self):
        start = torch.randint(len(self.data) - self.block_size - 1, (self.batch_size,), generator=self.generator)
        offsets = start[self.part, None] + torch.arange(self.block_size + 1)
        return self.data[offsets.to(self.dist.device)], None

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


class Palette:
    """The k-means palette's centres (K, C) float64, a part of the checkpoint (state_dict)."""

    def __init__(self, centres):
        self.centres = centres

    def state_dict(self):
        return {"centres": self.centres}

    def load_state_dict(self, state):
        self.centres = state["centres"]


def training_palette(ds, cfg):
    """The palette of --palette kmeans: fit_palette on PALETTE_FIT_PIXELS training pixels drawn
    with --seed (or on every pixel of a smaller set)."""
    pixels = ds.data.permute(0, 2, 3, 1).reshape(-1, ds.info.shape[0])
    g = torch.Generator().manual_seed(cfg.seed)
    if len(pixels) > PALETTE_FIT_PIXELS:
        pixels = pixels[torch.randint(len(pixels), (PALETTE_FIT_PIXELS,), generator=g)]
    try:
        return Palette(fit_palette(pixels, cfg.palette_size, g))
    except ValueError as e:
        raise UserError(f"--palette-size {cfg.palette_size}: {e} in {ds.info.name}; use a smaller palette") from None


def quantised_levels(cfg, info):
    """Levels per channel of the images the model sees (image_levels)."""
    return image_levels(info.levels, info.shape[0], cfg.image_bits)


def picture_levels(cfg, info):
    """Levels per channel of the images decode_images returns: the data's own with a k-means palette."""
    return info.levels if cfg.palette == "kmeans" else quantised_levels(cfg, info)


def vocab_size(cfg, info):
    """Tokens the model predicts: the palette's colours (qlevels^C, or k), a coordinate's bins, or the characters."""
    if info.kind == "image":
        return cfg.palette_size if cfg.palette == "kmeans" else quantised_levels(cfg, info) ** info.shape[0]
    return cfg.bins if info.kind == "points" else len(info.vocab)


def context_length(cfg, info):
    """Positions the model attends over: a whole image (H*W pixels), a point (2), or --block-size characters."""
    if info.kind == "image":
        return info.shape[1] * info.shape[2]
    return 2 if info.kind == "points" else cfg.block_size


def to_sequences(x, cfg, info, palette=None):
    """A batch -> token sequences (B, L) whose nll() is the data's likelihood: images (through the
    k-means palette's centres when given) and points after a start token (id vocab_size, input
    only); text windows as they are (their first token is context only)."""
    if info.kind == "text":
        return x
    if info.kind == "image":
        tok = (palette_tokens(x, palette) if palette is not None
               else image_tokens(x, info.levels, quantised_levels(cfg, info)))
    else:
        tok = point_tokens(x, info.lim, cfg.bins)
    return with_start(tok, vocab_size(cfg, info))


def decode_images(tok, cfg, info, palette=None):
    """Image tokens (B, H*W) -> uint8 levels (B, C, H, W) of picture_levels."""
    if palette is not None:
        return palette_image(tok, palette, info.shape)
    return tokens_to_image(tok, info.shape, quantised_levels(cfg, info))


def loss_in_bits(loss, cfg, info):
    """The training loss (nats per token) in bits: per dimension for images (a token is a pixel of
    C dimensions), per palette token with --palette kmeans, per character for text; nothing for points."""
    if info.kind == "image":
        if cfg.palette == "kmeans":
            return {"bits_per_token": loss / math.log(2)}
        return {"bits_per_dim": loss / (info.shape[0] * math.log(2))}
    return {"bits_per_char": loss / math.log(2)} if info.kind == "text" else {}


def encode_text(text, vocab):
    index = {ch: i for i, ch in enumerate(vocab)}
    bad = sorted({ch for ch in text if ch not in index})
    if bad or not text:
        raise UserError(f"--prompt must be non-empty and use the training vocabulary; not in it: {bad!r}")
    return torch.tensor([[index[ch] for ch in text]])


def decode_text(tokens, vocab):
    return "".join(vocab[int(i)] for i in tokens)


def sample_data(net, cfg, info, n, generator, palette=None):
    """n samples in data space: images (n, C, H, W) levels, points (n, 2), or a list of n strings."""
    device = next(net.parameters()).device
    kw = dict(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p, generator=generator)
    if info.kind == "text":
        prompt = encode_text(cfg.prompt, info.vocab).to(device)
        out = generate(net, prompt.expand(n, -1), cfg.sample_len, **kw)
        return [decode_text(row, info.vocab) for row in out.cpu()]
    start = torch.full((n, 1), vocab_size(cfg, info), dtype=torch.long, device=device)
    tok = generate(net, start, context_length(cfg, info), **kw)[:, 1:]
    if info.kind == "image":
        return decode_images(tok, cfg, info, palette)
    return tokens_to_points(tok, info.lim, cfg.bins, generator)


def complete_images(net, cfg, info, images, n_completions, generator, palette=None):
    """Image completions as shown by Chen et al. 2020: the top half of each image given, the bottom
    half sampled. Returns (N * (n_completions + 2), C, H, W): per image the top half alone, the
    completions, the original (as the model sees them: quantised, or through the palette)."""
    C, H, W = info.shape
    seq = to_sequences(images.to(next(net.parameters()).device), cfg, info, palette)
    given = seq[:, :1 + (H // 2) * W].repeat_interleave(n_completions, 0)
    tok = generate(net, given, seq.size(1) - given.size(1), cfg.temperature, cfg.top_k or None, cfg.top_p,
                   generator=generator)[:, 1:]
    done = decode_images(tok, cfg, info, palette).view(len(images), n_completions, C, H, W)
    orig = decode_images(seq[:, 1:], cfg, info, palette)
    half = orig.clone()
    half[:, :, H // 2:] = 0
    return torch.cat([half[:, None], done, orig[:, None]], dim=1).flatten(0, 1)


def write_samples(net, cfg, info, out, step, logger, test=None, palette=None):
    """Samples in the data's form, timed (a "sample" event): samples_<step>.png (2D points as a
    scatter) or samples_<step>.txt (printed too); for images also completion_<step>.png, the top
    halves of test images completed. Without a step the names are samples.png, completion.png.
    Returns the samples."""
    tag = "" if step is None else f"_{step}"
    g = torch.Generator(next(net.parameters()).device).manual_seed(cfg.seed)  # the training RNG is left alone
    n = cfg.n_samples
    t0 = time.time()
    x = sample_data(net, cfg, info, n, g, palette)
    seconds = time.time() - t0
    logger.event("sample", n=n, seconds=round(seconds, 3), samples_per_s=round(n / max(seconds, 1e-9), 3))
    if info.kind == "text":
        (out / f"samples{tag}.txt").write_text("\n\n---\n\n".join(x))
        print(x[0])
    elif info.kind == "points":
        save_scatter(x.cpu(), out / f"samples{tag}.png", lim=info.lim,
                     title="GPT samples" + ("" if step is None else f", step {step}"))
    else:
        q = picture_levels(cfg, info)
        save_image_grid(x.cpu(), out / f"samples{tag}.png", levels=q)
        if test is not None:
            k = 4
            grid = complete_images(net, cfg, info, test.data[:8], k, g, palette)
            save_image_grid(grid.cpu(), out / f"completion{tag}.png", levels=q, nrow=k + 2,
                            title=f"each row: the top half given,\n{k} samples of the bottom half,\n"
                                  "the original")
    return x


def write_density(net, cfg, info, ds, out):
    """density.npz and density.png: the model's log-density on common.density_on_grid's 128 x 128
    grid beside the truth (or a histogram of the test points when the set has no closed-form density)."""
    device = next(net.parameters()).device

    @torch.inference_mode()
    def log_prob(x):
        return points_log_prob(net, x.to(device), info.lim, cfg.bins).cpu()

    model_grid = density_on_grid(log_prob, info.lim, n=128)
    np.savez(out / "density.npz", log_density=model_grid, lim=info.lim)
    if ds.log_prob is not None:
        truth = {"true density": density_on_grid(ds.log_prob, info.lim, n=128)}
    else:
        truth = {"test data": ds.data}  # drawn as a histogram
    save_density({**truth, f"GPT ({cfg.bins} bins)": model_grid}, out / "density.png", info.lim)


# ----------------------------------------------------------------------------------------
# Run code
# ----------------------------------------------------------------------------------------

MODEL = "gpt"


def build(cfg, info):
    """The network for a configuration and the data: its shape from the flags, its context and
    vocabulary from the data's description."""
    if cfg.palette == "kmeans" and (info.kind != "image" or info.shape[0] != 3):
        raise UserError(f"--palette kmeans clusters RGB colours (Chen et al. 2020, Sec. 3.1); {info.name} is "
                        f"{info.kind} data{' with 1 channel' if info.kind == 'image' else ''}: accepted for colour "
                        "images (cifar10), else --palette uniform")
    try:
        vocab = vocab_size(cfg, info)
    except ValueError as e:  # image_levels: too many colours for one token
        raise UserError(f"--image-bits {cfg.image_bits}: {e}") from None
    return GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                         block_size=context_length(cfg, info), vocab_size=vocab, dropout=cfg.dropout,
                         bias=cfg.bias, start_token=info.kind != "text"))


def train(cfg):
    """Maximum likelihood (Radford et al. 2018, Eq. 1) with AdamW, warm-up + cosine learning rate
    and gradient clipping; under torchrun every process trains on its slice of the global batch (DDP)."""
    with Training(cfg, MODEL) as run:
        ds = load_dataset(cfg.dataset, "train", cfg.data_dir)
        info = ds.info
        seed_everything(cfg.seed)  # the same initial weights on every process
        net = build(cfg, info).to(run.device)
        palette = training_palette(ds, cfg) if cfg.palette == "kmeans" else None  # from its own generator
        opt = configure_optimizer(net, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
        batches = (TextWindows(ds, cfg.batch_size, cfg.block_size, run.dist, seed=cfg.seed) if info.kind == "text"
                   else Batches(ds, cfg.batch_size, run.dist, seed=cfg.seed))
        parts = dict(model=net, opt=opt, batches=batches, **({"palette": palette} if palette else {}))
        step = run.start(info, **parts)
        model = wrap_ddp(net, run.dist, cfg.compile)
        centres = palette.centres.to(run.device) if palette else None
        test = load_dataset(cfg.dataset, "test", cfg.data_dir) if info.kind == "image" else None  # completions
        amp = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.amp)

        def pictures(step):
            write_samples(net, cfg, info, run.out, step, run.logger, test, centres)

        for step in run.steps(step, pictures):
            lr = learning_rate(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            x, _ = next(batches)
            idx = to_sequences(x, cfg, info, centres)
            with amp:
                loss = sequence_loss(model, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            run.log(loss=loss, **loss_in_bits(loss, cfg, info), lr=lr)
    run.report(["ckpt.pt", f"samples_{run.step}.png", f"samples_{run.step}.txt", f"completion_{run.step}.png",
                "metrics.jsonl", "loss.png"])


def evaluate(cfg):
    """--eval CKPT: the exact test-set likelihood, nats per image (bits/dim; with --palette kmeans
    the palette tokens' NLL, bits per token), per character (bits/char) or per point (with
    density.npz and density.png)."""
    net, saved, info = load(cfg.eval, get_device(cfg.device))
    palette = load_palette(cfg.eval, next(net.parameters()).device)
    if cfg.fid is not None:  # the sampling flags typed now, the data's tokens the checkpoint's
        run = dataclasses.replace(cfg, **{name: getattr(saved, name) for name in DATA_FLAGS})
        return fid_evaluate(cfg, info, lambda n, g: sample_data(net, run, info, n, g, palette),
                            picture_levels(run, info))
    out = output_dir(cfg, cfg.eval)
    ds = load_dataset(info.name, "test", cfg.data_dir or saved.data_dir)
    logger = Logger(out, 0)
    if info.kind == "text":
        T = saved.block_size
        windows = text_windows(ds.data, T)
        if len(windows) == 0:
            raise UserError(f"the test split of {info.name} has {ds.data.numel()} characters; "
                            f"evaluating a context of {T} needs at least {T + 1}")
        predicted = windows[:, 1:].numel()  # the first token of a window is context only
        per_char = dataset_nll(net, windows).sum().item() / predicted
        logger.event("eval", split="test", nll=per_char, bits_per_char=per_char / math.log(2), context=T,
                     characters=predicted)
    elif info.kind == "image":
        v = dataset_nll(net, to_sequences(ds.data, saved, info, palette))
        nats, stderr = v.mean().item(), v.std().item() / math.sqrt(len(v))
        if palette is not None:  # a likelihood of the tokens, not of the pixels
            tokens = info.shape[1] * info.shape[2]
            logger.event("eval", split="test", nll=nats, bits_per_token=bits_per_dim(nats, tokens), stderr=stderr,
                         palette=len(palette), n=len(v),
                         likelihood="of the k-means palette tokens: not comparable with bits/dim of the pixels")
        else:
            logger.event("eval", split="test", nll=nats, bits_per_dim=bits_per_dim(nats, info.dims), stderr=stderr,
                         levels=quantised_levels(saved, info), n=len(v))
    else:
        with torch.inference_mode():
            log_p = torch.cat([points_log_prob(net, ds.data[i:i + 4096].to(next(net.parameters()).device),
                                               info.lim, saved.bins).cpu() for i in range(0, len(ds.data), 4096)])
        two_log_w = 2 * math.log(bin_width(info.lim, saved.bins))  # continuous NLL = discrete NLL + 2 log w
        logger.event("eval", split="test", nll=-log_p.mean().item(), discrete_nll=-log_p.mean().item() - two_log_w,
                     stderr=log_p.std().item() / math.sqrt(len(log_p)), bins=saved.bins)
        write_density(net, saved, info, ds, out)
    report_files(out, ["metrics.jsonl", "density.npz", "density.png"])


def draw_samples(cfg):
    """--sample CKPT: samples.png (or samples.txt) and samples.pt, completions of test images, and a
    "sample" event with samples per second. The sampling flags are the ones typed now; the way data
    becomes tokens is the checkpoint's."""
    net, saved, info = load(cfg.sample, get_device(cfg.device))
    palette = load_palette(cfg.sample, next(net.parameters()).device)
    out = output_dir(cfg, cfg.sample)
    cfg = dataclasses.replace(cfg, **{name: getattr(saved, name) for name in DATA_FLAGS})
    logger = Logger(out, 0)
    test = None
    if info.kind == "image":  # completions need test images: from the cache, as training left it
        try:
            test = load_dataset(info.name, "test", cfg.data_dir or saved.data_dir)
        except UserError as e:
            logger.event("no_completions", reason=str(e))
    x = write_samples(net, cfg, info, out, None, logger, test, palette)
    if info.kind != "text":  # the raw samples, for benchmarks/quality.py (text: samples.txt is raw)
        torch.save(x.cpu(), out / "samples.pt")
    report_files(out, ["samples.png", "samples.txt", "samples.pt", "completion.png", "metrics.jsonl"])


def load(path, device="cpu"):
    """(network in evaluation mode on `device`, its Config, its DataInfo) from a checkpoint of gpt.py."""
    ckpt = load_checkpoint(path, MODEL)
    cfg, info = saved_config(Config, ckpt)
    net = build(cfg, info)
    load_weights(net, ckpt["model"], path)
    return net.to(device).eval(), cfg, info


def load_palette(path, device="cpu"):
    """The k-means palette's centres (K, C) on `device` from a checkpoint of --palette kmeans, else None."""
    ckpt = load_checkpoint(path, MODEL)
    return ckpt["palette"]["centres"].to(device) if "palette" in ckpt else None


def main(argv=None):
    """Train (default), or --eval CKPT, or --sample CKPT; a user's mistake exits with one line."""
    with user_errors():
        cfg = parse_config(Config, PRESETS, argv, doc=__doc__, arch_presets=ARCH_PRESETS)
        check_config(cfg)
        return dispatch(cfg, train, evaluate, draw_samples)


if __name__ == "__main__":
    main()
