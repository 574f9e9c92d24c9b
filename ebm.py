"""Energy-based models: contrastive divergence with Langevin dynamics and a replay buffer, JEM,
and an exactly normalised density on 2D data.

Papers
  Du & Mordatch 2019, "Implicit Generation and Generalization in Energy-Based Models", arXiv 1903.08689
    (IGEBM: Langevin sampling from a replay buffer, the L2 energy regulariser, Algorithm 1).
  Grathwohl et al. 2020, "Your Classifier is Secretly an Energy Based Model and You Should Treat
    it Like One", arXiv 1912.03263 (JEM).
  Welling & Teh 2011, "Bayesian Learning via Stochastic Gradient Langevin Dynamics", ICML (SGLD).
  Song & Kingma 2021, "How to Train Your Energy-Based Models", arXiv 2101.03288 (Eqs. 3-4).
  Hinton 2002, Neural Computation 14(8) (contrastive divergence); Tieleman 2008, ICML (persistent chains).

Implemented: the contrastive-divergence loss with Du & Mordatch's regulariser; Langevin dynamics
as SGLD and in the decoupled form of Du & Mordatch's code (step and noise apart, gradient clip),
reflected into the box the data live in; the replay buffer with restarts; JEM, with --jem applying
JEM's settings (see JEM); on 2D data the exact log-likelihood, log Z by quadrature over the box;
an MLP energy for points and a residual convolutional energy for images (IGEBM's block layout,
not its network: see ImageEnergy). Not implemented: a likelihood for images (AIS), IGEBM's
class-conditional models and FIFO buffer, JEM's Wide-ResNet, FID and IS.
The density lives on a box (images in [0, 1]^D, dequantised (k + u) / L; points in [-lim, lim]^2;
E = +inf outside), so on 2D data Z is the integral over the box. The decoupled sampler samples
exp(-E / T), T = sigma^2 / (2 lambda): that is the density of a model trained with it.

Run it (also: --dataset digits --jem; --dataset cifar10, IGEBM's sampler settings)
  python ebm.py                                       # 8gaussians: exp(-E)/Z beside the true density
  python ebm.py --sample runs/ebm-8gaussians/ckpt.pt  # replay-buffer chains continued, and chains from noise
  python ebm.py --eval runs/ebm-8gaussians/ckpt.pt    # exact test NLL (nats), density.npz/png

Paper -> code
  Song & Kingma Eq. 1   p(x) = exp(-E(x)) / Z                                   energy_from_logits, log_prob_2d
  Song & Kingma Eqs. 3-4  grad_theta log p(x) = -grad E(x) + E_{x- ~ p}[grad E(x-)]   contrastive_divergence
  Du & Mordatch         L = E(x+) - E(x-) + alpha (E(x+)^2 + E(x-)^2)          contrastive_divergence, training_loss
  Welling & Teh         x' = x - (eps / 2) grad E(x) + sqrt(eps) z                sgld_update, langevin
  Du & Mordatch's code  x' = x - lambda grad E(x) + sigma z, T = sigma^2 / (2 lambda)   decoupled_update,
                                                                                 langevin_temperature
  Du & Mordatch Alg. 1  persistent chains, 5% restarted from uniform noise      ReplayBuffer, train
  Grathwohl Sec. 3      p(y | x) = softmax_y f(x), E(x) = -LogSumExp_y f(x)[y]   class_log_probs, energy_from_logits
  Grathwohl Sec. 4      log p(x, y) = log p(y | x) + log p(x)                   training_loss with labels, JEM
  (ours, 2D)            log Z = log sum over grid cells of exp(-E) h^2          log_partition_2d, log_prob_2d
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Batches, Logger, RunConfig, Training, UserError, check_range, density_on_grid, dispatch,
                    entropy_estimate, flag, get_device, load_checkpoint, load_dataset, load_weights, output_dir,
                    parse_config, report_files, save_density, save_image_grid, saved_config, seed_everything,
                    user_errors, wrap_ddp)
from common import fid_evaluate  # --eval CKPT --fid N


# ----------------------------------------------------------------------------------------
# The energy, the density and JEM's classifier
# ----------------------------------------------------------------------------------------

# Every network here returns logits f(x) of shape (B, K): K = 1 for a plain EBM, K = the number of
# classes for JEM. One formula then serves both: E(x) = -logsumexp_y f(x)[y], which for K = 1 is
# E(x) = -f(x).

def energy_from_logits(logits):
    """E(x) = -LogSumExp_y f(x)[y], (B, K) -> (B,): p(x) = sum_y exp(f(x)[y]) / Z (Grathwohl et al. Sec. 3)."""
    if logits.dim() != 2:
        raise ValueError(f"logits of shape {tuple(logits.shape)}; expected (batch, classes)")
    return -torch.logsumexp(logits, dim=1)


def class_log_probs(logits):
    """log p(y | x) = f(x)[y] - LogSumExp_y' f(x)[y'] (Grathwohl et al. Sec. 3): the softmax
    classifier, since Z cancels in p(x, y) / p(x). Unchanged by a constant added to every logit."""
    return torch.log_softmax(logits, dim=1)


def energy(model, x):
    """E(x) of a network returning logits (B, K): one call of its forward."""
    return energy_from_logits(model(x))


# ----------------------------------------------------------------------------------------
# Maximum likelihood: the gradient, and the contrastive-divergence loss that gives it
# ----------------------------------------------------------------------------------------

def contrastive_divergence(e_pos, e_neg, alpha=0.0):
    """L = mean E(x+) - mean E(x-) + alpha (mean E(x+)^2 + mean E(x-)^2): its gradient is the NLL's,
    E_data[grad E] - E_model[grad E] (Song & Kingma Eqs. 3-4), plus Du & Mordatch's regulariser.
    e_pos (B,) of data, e_neg (M,) of model samples x- taken with no graph through x-; L is not the NLL."""
    if e_pos.dim() != 1 or e_neg.dim() != 1:
        raise ValueError("contrastive_divergence takes per-example energies of shape (B,)")
    return e_pos.mean() - e_neg.mean() + alpha * (e_pos.pow(2).mean() + e_neg.pow(2).mean())


def training_loss(model, x_pos, x_neg, y=None, alpha=0.0, px_weight=1.0):
    """One training objective for the EBM and for JEM, with one call of the network's forward.

    Without labels: contrastive_divergence(E(x+), E(x-), alpha). With labels y (JEM, Grathwohl
    et al. Sec. 4), log p(x, y) = log p(y | x) + log p(x) is maximised: the loss is the
    cross-entropy -log p(y | x+) plus px_weight times the contrastive-divergence term for
    log p(x). x+ and x- go through the network as one batch, so under DDP a single forward
    fires the gradient hooks. Returns (loss, parts) with parts the detached means of e_pos,
    e_neg and, with labels, the cross-entropy and the batch accuracy.
    """
    b = x_pos.shape[0]
    logits = model(torch.cat([x_pos, x_neg.detach()]))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bfloat16 under --amp
    e = energy_from_logits(logits)
    e_pos, e_neg = e[:b], e[b:]
    loss = px_weight * contrastive_divergence(e_pos, e_neg, alpha)
    parts = {"e_pos": e_pos.detach().mean(), "e_neg": e_neg.detach().mean()}
    if y is not None:
        log_py = class_log_probs(logits[:b])
        ce = -log_py.gather(1, y[:, None]).mean()
        loss = loss + ce
        parts["ce"] = ce.detach()
        parts["acc"] = (log_py.argmax(1) == y).float().mean()
    return loss, parts


# ----------------------------------------------------------------------------------------
# Langevin dynamics: SGLD (Welling & Teh) and the decoupled form of Du & Mordatch's code
# ----------------------------------------------------------------------------------------

def energy_grad(energy_fn, x):
    """(grad_x E(x), E(x)) for a batch: E summed over the batch, so each row gets its own gradient
    (examples do not interact: no batch statistics in these networks). Needs autograd, so it
    refuses to run under torch.inference_mode()."""
    if torch.is_inference_mode_enabled():
        raise ValueError("Langevin dynamics needs gradients: do not run it under torch.inference_mode()")
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        e = energy_fn(x)
        # backward(inputs=[x]) reaches x alone (no parameter's .grad is touched); unlike
        # torch.autograd.grad it also runs under torch.utils.flop_counter (benchmarks/speed.py)
        e.sum().backward(inputs=[x])
    return x.grad, e.detach()


def sgld_update(x, grad, step_size, z):
    """x' = x - (eps / 2) grad E(x) + sqrt(eps) z, z ~ N(0, I) (Welling & Teh): for small eps the chain
    samples exp(-E(x))."""
    return x - 0.5 * step_size * grad + math.sqrt(step_size) * z


def decoupled_update(x, grad, step_size, noise, z):
    """x' = x - lambda grad E(x) + sigma z, z ~ N(0, I) (Du & Mordatch's code, lambda and sigma apart):
    SGLD for exp(-E / T), T = sigma^2 / (2 lambda) (see langevin_temperature)."""
    # their code adds the noise before taking the gradient: the order only shifts where the chain
    # starts and stops
    return x - step_size * grad + noise * z


def langevin_temperature(step_size, noise=None):
    """The temperature T whose density exp(-E / T) Langevin dynamics samples (for small steps):
    1 for SGLD, sigma^2 / (2 lambda) for the decoupled form (see decoupled_update). A model trained
    with the decoupled sampler is fitted as exp(-E / T) / Z_T: that is its density. (Clipping
    grad E changes the stationary law further; it is not accounted for.)"""
    return 1.0 if noise is None else noise ** 2 / (2 * step_size)


def reflect(x, low, high):
    """Fold x into [low, high] by mirror reflection at the walls (any distance outside).

    Keeps a Langevin chain inside the box its density lives on; the reflected diffusion has the
    density restricted to the box as its stationary law. (Du & Mordatch clip to [0, 1] instead.)"""
    width = high - low
    y = torch.remainder(x - low, 2 * width)
    return low + width - (y - width).abs()


def langevin(energy_fn, x, n_steps, step_size, noise=None, grad_clip=0.0, box=None, generator=None,
             keep=()):
    """n_steps of Langevin dynamics from x (B, ...): SGLD (sgld_update) when noise is None, the
    decoupled form (decoupled_update) with noise sigma otherwise.

    grad_clip > 0 clips grad E elementwise to [-grad_clip, grad_clip] (Du & Mordatch's code:
    0.01 on CIFAR-10). box = (low, high) reflects the chain into the box after every step.
    Returns the final x, detached; with `keep` (step numbers, 0 = the start) also the list of
    (step, x) at those steps: the chain as a picture.
    """
    if n_steps < 0 or step_size <= 0:
        raise ValueError(f"n_steps {n_steps} and step_size {step_size}: need n_steps >= 0, step_size > 0")
    x = x.detach()
    chain = [(0, x)] if 0 in keep else []
    for k in range(1, n_steps + 1):
        grad, _ = energy_grad(energy_fn, x)
        if grad_clip > 0:
            grad = grad.clamp(-grad_clip, grad_clip)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = sgld_update(x, grad, step_size, z) if noise is None else decoupled_update(x, grad, step_size, noise, z)
        if box is not None:
            x = reflect(x, *box)
        if k in keep:
            chain.append((k, x))
    return (x, chain) if keep else x


# ----------------------------------------------------------------------------------------
# The replay buffer of persistent chains (Du & Mordatch; JEM's code)
# ----------------------------------------------------------------------------------------

def uniform_noise(n, shape, low, high, generator=None, device=None, dtype=torch.float32):
    """n draws from the uniform distribution on the box [low, high]^shape: where chains start."""
    return low + (high - low) * torch.rand((n, *shape), generator=generator, device=device, dtype=dtype)


class ReplayBuffer:
    """`size` persistent Langevin chains on the box [low, high]^shape, started from uniform noise.

    `sample(n)` draws n chains uniformly with replacement and restarts each from fresh uniform
    noise with probability `restart` (Du & Mordatch: about 5%, so chains both persist, which lets
    them mix over many training steps, and keep exploring from noise); after Langevin dynamics
    `update(idx, x)` writes the new states back. Its state is the chains themselves, saved in
    checkpoints so that training resumes exactly.
    """

    def __init__(self, size, shape, low, high, restart=0.05, device=None, generator=None):
        if size < 1 or not 0 <= restart <= 1:
            raise ValueError(f"buffer size {size} and restart {restart}: need size >= 1, 0 <= restart <= 1")
        self.shape, self.low, self.high, self.restart = tuple(shape), low, high, restart
        self.x = uniform_noise(size, self.shape, low, high, generator, device)

    def __len__(self):
        return self.x.shape[0]

    def sample(self, n, generator=None):
        """(x0 (n, *shape), idx (n,), restarted (n,) bool): starting points for n chains."""
        device = self.x.device
        idx = torch.randint(len(self), (n,), generator=generator, device=device)
        restarted = torch.rand(n, generator=generator, device=device) < self.restart
        fresh = uniform_noise(n, self.shape, self.low, self.high, generator, device, self.x.dtype)
        mask = restarted.reshape(n, *([1] * len(self.shape)))
        return torch.where(mask, fresh, self.x[idx]), idx, restarted

    def update(self, idx, x):
        """Write the chains' new states back (a repeated index keeps the last write)."""
        self.x[idx] = x.detach().to(self.x.dtype)

    def to(self, device):
        self.x = self.x.to(device)
        return self

    def state_dict(self):
        return {"x": self.x}

    def load_state_dict(self, state):
        if tuple(state["x"].shape) != tuple(self.x.shape):
            raise ValueError(f"buffer of shape {tuple(state['x'].shape)}, expected {tuple(self.x.shape)}")
        self.x = state["x"].to(self.x.device, self.x.dtype).clone()


# ----------------------------------------------------------------------------------------
# The exact density on 2D data: Z by quadrature over the box the density lives on
# ----------------------------------------------------------------------------------------

def grid_2d(low, high, n, device=None, dtype=torch.float32):
    """The n x n cell centres of the square [low, high]^2, (n*n, 2), and the area of one cell."""
    h = (high - low) / n
    c = low + h * (torch.arange(n, device=device, dtype=torch.float64) + 0.5)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1).to(dtype), h * h


def log_partition_2d(energy_fn, low, high, n=512, chunk=65536, device=None):
    """log Z = log of the integral over [low, high]^2 of exp(-E(x)) dx, by the midpoint rule on an
    n x n grid (error O(h^2) for smooth E, h = (high - low) / n), summed in float64 by
    log-sum-exp. Returns a float64 scalar tensor. E is evaluated without gradients."""
    if n < 1 or not high > low:
        raise ValueError(f"grid n = {n} on [{low}, {high}]: need n >= 1 and high > low")
    points, area = grid_2d(low, high, n, device)
    with torch.no_grad():
        neg_e = torch.cat([-energy_fn(p).double() for p in points.split(chunk)])
    return torch.logsumexp(neg_e, 0) + math.log(area)


def log_prob_2d(energy_fn, x, log_z, low, high):
    """log p(x) = -E(x) - log Z on the box [low, high]^2, -inf outside it (where E = +inf). (B,)."""
    inside = ((x >= low) & (x <= high)).all(1)
    with torch.no_grad():
        lp = -energy_fn(x).double() - log_z
    return torch.where(inside, lp, torch.full_like(lp, -math.inf))


# ----------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------

def _activation(name):
    # SiLU is smooth, so grad_x E is continuous (Langevin dynamics and quadrature like that);
    # IGEBM's code uses leaky ReLU with slope 0.2 (TensorFlow's default).
    if name == "silu":
        return nn.SiLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.2)
    raise ValueError(f"activation {name!r}; accepted: silu, leaky_relu")


class PointEnergy(nn.Module):
    """An MLP energy for 2D points: x (B, 2) -> logits (B, K), depth hidden layers of width
    `hidden` with SiLU (a smooth energy: the midpoint rule converges fast on it)."""

    def __init__(self, dim=2, hidden=128, depth=3, num_outputs=1, act="silu"):
        super().__init__()
        layers, width = [], dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), _activation(act)]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, num_outputs))

    def forward(self, x):
        return self.net(x)


def _maybe_spectral_norm(module, on):
    return nn.utils.parametrizations.spectral_norm(module) if on else module


class ResBlock(nn.Module):
    """conv3x3 - activation - conv3x3, plus a shortcut (a conv3x3 where the channels change, as in
    IGEBM's blocks), then 2x2 average pooling when `down`."""

    def __init__(self, cin, cout, act, down, spectral_norm):
        super().__init__()
        self.conv1 = _maybe_spectral_norm(nn.Conv2d(cin, cout, 3, padding=1), spectral_norm)
        self.conv2 = _maybe_spectral_norm(nn.Conv2d(cout, cout, 3, padding=1), spectral_norm)
        self.skip = (_maybe_spectral_norm(nn.Conv2d(cin, cout, 3, padding=1), spectral_norm)
                     if cin != cout else nn.Identity())
        self.act, self.down = _activation(act), down

    def forward(self, x):
        h = self.skip(x) + self.conv2(self.act(self.conv1(x)))
        return F.avg_pool2d(h, 2) if self.down else h


class ImageEnergy(nn.Module):
    """A residual convolutional energy: x (B, C, H, W) in [0, 1] -> logits (B, K).

    A conv3x3 stem of `ch` channels; for each multiplier m of ch_mult a level of `blocks`
    residual blocks at ch * m channels, the first of which changes the channels and halves the
    side; then ReLU, a sum over positions and a linear layer. ch = 128, ch_mult = (1, 2, 4),
    blocks = 3 has the block layout of IGEBM's CIFAR-10 network (ResNet32Large in Du & Mordatch's
    code: 9 blocks, 128/256/512 channels, 32 -> 16 -> 8 -> 4) but is not that network; it differs
    in (models.py and utils.py of openai/ebm_code_release, read 2026-12-06):
      - their stem has no bias and is followed by leaky ReLU; here no activation follows it;
      - their blocks apply leaky ReLU after each residual sum (after the pooling); here none;
      - their convolutions have no output bias but a learned bias added to their input, and the
        second one a per-channel gain (initialised at 1); here ordinary biases, no gain;
      - their second convolution starts near zero (N(0, 1e-10), its spectral norm capped at 1
        rather than set to 1), so each block starts as its shortcut; here PyTorch's default
        initialisation and torch's spectral norm (sigma set to 1);
      - their blocks have dropout 0.5 after the first convolution in training; here none.
    """

    def __init__(self, in_ch=3, ch=128, ch_mult=(1, 2, 4), blocks=3, num_outputs=1, act="leaky_relu",
                 spectral_norm=False, image_size=32):
        super().__init__()
        if blocks < 1 or image_size % 2 ** len(ch_mult):
            raise ValueError(f"{len(ch_mult)} levels halve the side {len(ch_mult)} times; "
                             f"an image side of {image_size} does not divide")
        self.stem = _maybe_spectral_norm(nn.Conv2d(in_ch, ch, 3, padding=1), spectral_norm)
        layers, c = [], ch
        for m in ch_mult:
            for i in range(blocks):
                layers.append(ResBlock(c, ch * m, act, down=i == 0, spectral_norm=spectral_norm))
                c = ch * m
        self.blocks = nn.Sequential(*layers)
        self.out = nn.Linear(c, num_outputs)  # IGEBM: no spectral norm on the last layer

    def forward(self, x):
        h = F.relu(self.blocks(self.stem(x)))
        return self.out(h.sum(dim=(2, 3)))


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

@dataclass
class Config(RunConfig):
    """Defaults train 8gaussians on a laptop CPU in minutes; PRESETS follow the papers."""
    dataset: str = flag("8gaussians", "dataset: a 2D set (8gaussians, checkerboard, rings, ...) or an image set")
    steps: int = flag(2000, "training steps (optimiser updates)")
    batch_size: int = flag(256, "global batch of data; as many Langevin chains run beside it")
    lr: float = flag(1e-3, "Adam learning rate")
    beta1: float = flag(0.9, "Adam beta1 (IGEBM's code: 0)")
    warmup: int = flag(0, "linear learning-rate warm-up steps (JEM: 1000; 0 = none)")
    lr_drop: int = flag(0, "from this step on the learning rate is a tenth of --lr (0 = never)")
    save_every: int = flag(1000, "steps between checkpoints and pictures")
    n_samples: int = flag(1000, "number of samples to draw (and of chains in each picture)")
    # the objective
    alpha: float = flag(0.1, "L2 regulariser alpha (E(x+)^2 + E(x-)^2) of Du & Mordatch (IGEBM: 1)")
    jem: bool = flag(False, "JEM: a classifier whose logits define the energy, trained on log p(y|x) + log p(x), "
                     "with JEM's settings (ebm.JEM) over the dataset's preset")
    px_weight: float = flag(1.0, "JEM: weight of the log p(x) term (0 trains a plain classifier)")
    # Langevin dynamics
    sampler: str = flag("sgld", "sgld (Welling & Teh: step eps/2, noise variance eps) or decoupled "
                        "(Du & Mordatch's code: step and noise set apart)", choices=("sgld", "decoupled"))
    sgld_steps: int = flag(20, "Langevin steps per training step (from the replay buffer)")
    step_size: float = flag(0.005, "Langevin step: eps of SGLD, or lambda of the decoupled form")
    noise: float = flag(0.005, "noise standard deviation of the decoupled form (sgld: sqrt(step))")
    langevin_clip: float = flag(0.0, "clip grad_x E elementwise to this magnitude (IGEBM: 0.01; 0 = off)")
    buffer_size: int = flag(10000, "replay buffer: persistent chains (Du & Mordatch: 10000)")
    restart: float = flag(0.05, "replay buffer: probability a drawn chain restarts from uniform noise")
    sample_steps: int = flag(0, "Langevin steps of the chains drawn for the pictures and by --sample (0 = one "
                             "training draw's, --sgld-steps, from the buffer; 25 x that from noise)")
    sample_init: str = flag("buffer", "--sample: continue chains of the replay buffer, or start from uniform noise",
                            choices=("buffer", "noise"))
    # networks
    hidden: int = flag(128, "2D: width of the MLP energy")
    depth: int = flag(3, "2D: hidden layers of the MLP energy")
    ch: int = flag(32, "images: channels of the first level of the residual energy")
    ch_mult: tuple = flag((1, 2), "images: channel multiplier per level (each level halves the side)")
    blocks: int = flag(1, "images: residual blocks per level")
    act: str = flag("silu", "activation", choices=("silu", "leaky_relu"))
    spectral_norm: bool = flag(False, "spectral normalisation of the convolutions (IGEBM)")
    # evaluation
    quad_n: int = flag(512, "2D: quadrature grid for log Z (n x n cells over the data box)")


PRESETS = {
    # 2D points: SGLD as Welling & Teh write it, so that the chains sample the model; 20 steps of
    # eps = 0.005 per training step continue persistent chains from the buffer. The chains hardly
    # cross between modes (rings 1 apart, std 0.1), so the buffer's share of each mode is set by
    # where restarts from uniform noise land, and contrastive divergence then biases the modes'
    # masses (measured on rings, 2000 steps: model masses 0.18 / 0.48 / 0.33 on the rings of true
    # mass 1/6, 1/3, 1/2, 15% of the chains stuck in the box's corners; NLL 2.910 against the
    # entropy 2.744). With 1000 chains restarted with probability 0.01 each chain runs 10 times
    # more Langevin steps over training and 5 times more between restarts: 0.23 / 0.29 / 0.48, 5%
    # in the corners, NLL 2.823; with the learning rate a tenth from step 1500, 2.795 (our choices).
    "points": dict(sampler="sgld", sgld_steps=20, step_size=0.005, alpha=0.1, buffer_size=1000, restart=0.01,
                   lr_drop=1500),
    # 8x8 digits (17 levels, dequantised into [0, 1]): the decoupled sampler with JEM's code's
    # numbers (20 steps, step 1, noise 0.01, on [0, 1] here where theirs are on [-1, 1]: steps four
    # times as long at the same temperature; --jem uses theirs, see JEM) and IGEBM's clip of grad E (at 0.03
    # here: with a classifier's logits unclipped chains jump from wall to wall), Adam with
    # beta1 = 0 as IGEBM's code, a small residual energy (ours). Other image sets without a preset
    # of their own (mnist, fashion-mnist, digits-binary) start from it too.
    "digits": dict(steps=2000, batch_size=64, lr=1e-3, beta1=0.0, save_every=500, n_samples=50,
                   alpha=0.1, sampler="decoupled", sgld_steps=20, step_size=1.0, noise=0.01,
                   langevin_clip=0.03, ch=16, ch_mult=(1, 2), blocks=1, act="silu"),
    # Du & Mordatch's CIFAR-10 setting (official code README, unconditional): 60 Langevin steps of
    # step 10 with noise 0.005, gradient clipped at 0.01, replay buffer of 10000 chains with 5%
    # restarts, alpha = 1, batch 128, Adam lr 3e-4 with beta1 = 0 (the code's defaults),
    # spectral norm, leaky ReLU; ResNet32Large's block layout (18,589,697 parameters here, tested),
    # not its activations, biases, gains, initialisation or dropout (see ImageEnergy). The number
    # of steps is ours.
    "cifar10": dict(steps=100_000, batch_size=128, lr=3e-4, beta1=0.0, save_every=5000, n_samples=100,
                    alpha=1.0, sampler="decoupled", sgld_steps=60, step_size=10.0, noise=0.005,
                    langevin_clip=0.01, buffer_size=10000, restart=0.05, ch=128,
                    ch_mult=(1, 2, 4), blocks=3, act="leaky_relu", spectral_norm=True),
}
PRESETS["image"] = PRESETS["digits"]

# --jem: Grathwohl et al.'s settings (the official train_wrn_ebm.py: its defaults and the README's
# CIFAR-10 command), applied over the dataset's preset; flags typed on the command line win.
# Adam, lr 1e-4, betas (0.9, 0.999), warm-up over 1000 iterations, batch 64; 20 SGLD steps of
# x' <- x' + 1.0 grad_x' f + 0.01 z on data x' in [-1, 1] (f = -E), which on this file's [0, 1]
# (x = (x' + 1) / 2) is the same chain with step 0.25 and noise 0.005; a buffer of 10000 chains,
# each drawn chain restarted from uniform noise with probability 0.05; weights 1 on log p(x) and
# log p(y|x); no L2 regulariser (alpha) and no clip of grad E (both stay available as flags).
# Departures: the network is the dataset's ImageEnergy, not their Wide-ResNet-28-10; no decay of
# the learning rate (theirs: x 0.3 at epochs 160 and 180) and our number of steps; the data are
# dequantised uniformly, not noised with N(0, 0.03^2) and not cropped or flipped; one batch serves
# both terms (theirs draws the labelled batch apart); the chains are reflected into the box
# (theirs are not confined).
JEM = dict(lr=1e-4, beta1=0.9, warmup=1000, batch_size=64, sampler="decoupled", sgld_steps=20, step_size=0.25,
           noise=0.005, buffer_size=10000, restart=0.05, px_weight=1.0, alpha=0.0, langevin_clip=0.0)
JEM_PRESETS = {name: {**preset, **JEM} for name, preset in PRESETS.items()}


def check_config(cfg):
    """The flags' values that their types let through; the data-dependent checks are in build."""
    for name in ("hidden", "depth", "ch", "blocks", "buffer_size", "quad_n"):
        check_range(cfg, name, 1)
    for name in ("sgld_steps", "sample_steps", "noise", "langevin_clip", "alpha", "px_weight", "warmup", "lr_drop"):
        check_range(cfg, name, 0)
    check_range(cfg, "step_size", 0, open_low=True)
    check_range(cfg, "restart", 0, 1)
    check_range(cfg, "beta1", 0, 1, open_high=True)
    if not cfg.ch_mult or min(cfg.ch_mult) < 1:
        raise UserError(f"--ch-mult {','.join(map(str, cfg.ch_mult))} is out of range; accepted: positive "
                        "multipliers, one per level, e.g. 1,2")


def learning_rate(step, cfg):
    """The learning rate of step `step` (0-based): lr * step / warmup during the warm-up, then lr
    (JEM's train_wrn_ebm.py, which starts at 0; constant lr when cfg.warmup is 0), a tenth of it
    from step cfg.lr_drop (when set)."""
    lr = cfg.lr * min(1.0, step / cfg.warmup) if cfg.warmup else cfg.lr
    return lr * 0.1 if cfg.lr_drop and step >= cfg.lr_drop else lr


# ----------------------------------------------------------------------------------------
# Data and pictures
# ----------------------------------------------------------------------------------------

def box(info):
    """(low, high): the box the model's density lives on, [0, 1] per pixel or [-lim, lim] per coordinate."""
    return (0.0, 1.0) if info.kind == "image" else (-info.lim, info.lim)


def to_model_space(x, info, dequantize=True):
    """Images: levels k -> (k + u) / L in [0, 1), u ~ U[0, 1) (dequantisation, as Du & Mordatch's
    code does for L = 256) or the bin centre u = 1/2 when not dequantizing; points unchanged."""
    if info.kind == "points":
        return x.float()
    u = torch.rand(x.shape, device=x.device) if dequantize else 0.5
    return (x.float() + u) / info.levels


def to_levels(x, info):
    """[0, 1] -> the level whose bin holds x (uint8), the inverse of to_model_space."""
    return (x * info.levels).floor().clamp(0, info.levels - 1).to(torch.uint8)


def energy_fn(net, amp=None):
    """x -> E(x) with the network under `amp` autocast where given, energies in float32."""
    def fn(x):
        if amp is None:
            return energy_from_logits(net(x).float())
        with amp:
            return energy_from_logits(net(x).float())
    return fn


def temperature(cfg):
    """T of the sampler the model was trained with: its density is exp(-E / T) / Z_T."""
    return langevin_temperature(cfg.step_size, None if cfg.sampler == "sgld" else cfg.noise)


def sample_steps(cfg, init="noise"):
    """Langevin steps of the chains drawn for the pictures and by --sample: --sample-steps, else one
    training draw's (--sgld-steps) for chains continued from the buffer, 25 times that from noise.
    (With the decoupled sampler at its low temperature, longer runs from the buffer drift towards
    a few over-smooth minima of E: on digits they score worse, see the README.)"""
    if cfg.sample_steps:
        return cfg.sample_steps
    return cfg.sgld_steps if init == "buffer" else 25 * cfg.sgld_steps


def run_chains(net, x0, steps, info, cfg, generator=None, keep=()):
    """Langevin steps from x0 with the training's sampler (with `keep`, also the chain at those steps)."""
    return langevin(energy_fn(net), x0, steps, cfg.step_size, None if cfg.sampler == "sgld" else cfg.noise,
                    cfg.langevin_clip, box(info), generator, keep)


def fresh_chains(net, n, info, cfg, device, generator=None, keep=()):
    """n chains from uniform noise on the box: samples of the model that owe nothing to the buffer."""
    x0 = uniform_noise(n, info.shape, *box(info), generator, device)
    return run_chains(net, x0, sample_steps(cfg, "noise"), info, cfg, generator, keep)


def buffer_chains(net, buffer, n, info, cfg, generator=None):
    """n chains drawn from the replay buffer (with replacement) and continued under the network, by
    default for one training draw's steps: the samples training would draw next."""
    idx = torch.randint(len(buffer), (n,), generator=generator, device=buffer.x.device)
    return run_chains(net, buffer.x[idx], sample_steps(cfg, "buffer"), info, cfg, generator)


def chain_steps(n_steps, n_panels=8):
    """Steps 0 .. n_steps at which to show a chain, denser at the start, where it moves most."""
    return sorted({round(n_steps * (k / (n_panels - 1)) ** 2) for k in range(n_panels)})


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_samples(top, bottom, path, info, names, heading=None):
    """Two sets of samples, `names` saying what each is: images as one grid, `top` in the upper
    rows and `bottom` below (the title says so); points as two scatters."""
    if info.kind == "image":
        title = f"top {top.shape[0]}: {names[0]}; bottom {bottom.shape[0]}: {names[1]}"
        nrow = 10 if top.shape[0] % 10 == 0 else None
        save_image_grid(to_levels(torch.cat([top, bottom]), info).cpu(), path, levels=info.levels, nrow=nrow,
                        title=f"{heading}: {title}" if heading else title)
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.9), squeeze=False)
    for ax, name, p in zip(axes[0], names, (top, bottom)):
        p = p.detach().float().cpu()
        ax.scatter(p[:, 0], p[:, 1], s=1, alpha=0.5)
        ax.set_xlim(-info.lim, info.lim), ax.set_ylim(-info.lim, info.lim), ax.set_aspect("equal")
        ax.set_title(f"{p.shape[0]} {name}", fontsize=8), ax.set_xticks([]), ax.set_yticks([])
    if heading:
        fig.suptitle(heading, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_chain(chain, path, info, title):
    """The Langevin chain as a picture: images, one row per chain and a column per kept step;
    points, the cloud of chains at each kept step."""
    plt = _pyplot()
    if info.kind == "image":
        rows = min(8, chain[0][1].shape[0])
        x = torch.stack([c[1][:rows] for c in chain], 1).reshape(-1, *info.shape)  # (rows * steps, ...)
        save_image_grid(to_levels(x, info).cpu(), path, levels=info.levels, nrow=len(chain),
                        title=f"{title}\ncolumns: steps " + ", ".join(str(k) for k, _ in chain))
        return
    fig, axes = plt.subplots(1, len(chain), figsize=(1.8 * len(chain), 2.2), squeeze=False)
    for ax, (k, x) in zip(axes[0], chain):
        x = x.detach().float().cpu()
        ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.5)
        ax.set_xlim(-info.lim, info.lim), ax.set_ylim(-info.lim, info.lim), ax.set_aspect("equal")
        ax.set_title(f"step {k}", fontsize=8), ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_energies(metrics_path, path):
    """E(x+) of the data and E(x-) of the Langevin samples against the step, from metrics.jsonl:
    the first quantity to show an unstable run (the two drift apart, or diverge together)."""
    by_step = {}
    if not metrics_path.exists():
        return
    with open(metrics_path) as f:
        for line in f:
            r = json.loads(line) if line.strip() else {}
            if "step" in r and "e_pos" in r:
                by_step[r["step"]] = (r["e_pos"], r["e_neg"])  # after a resume the latest line wins
    if not by_step:
        return
    steps = sorted(by_step)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [by_step[s][0] for s in steps], label="E(x+), data")
    ax.plot(steps, [by_step[s][1] for s in steps], label="E(x-), Langevin samples")
    ax.set_xlabel("step"), ax.set_ylabel("mean energy"), ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def scaled_energy_fn(net, t):
    """x -> E(x) / T: the energy of the density the model was trained as (T = 1 for SGLD)."""
    fn = energy_fn(net)
    return fn if t == 1 else (lambda x: fn(x) / t)


def density_figure(net, info, saved, cfg, device, path, ds=None):
    """2D: log p(x) = -E(x) / T - log Z on density_on_grid's 128 x 128 grid (T of the training's
    sampler `saved`, log Z from the cfg.quad_n quadrature) beside the true density; returns
    (log_density grid, log Z)."""
    low, high = box(info)
    fn = scaled_energy_fn(net, temperature(saved))
    log_z = log_partition_2d(fn, low, high, cfg.quad_n, device=device)
    grid = density_on_grid(lambda p: log_prob_2d(fn, p.to(device), log_z, low, high).cpu(), info.lim, n=128)
    ds = ds or load_dataset(info.name, "test", cfg.data_dir)
    truth = density_on_grid(ds.log_prob, info.lim, n=128) if ds.log_prob is not None else ds.data
    save_density({"data": truth, "EBM exp(-E)/Z": grid}, path, info.lim)
    return grid, log_z


def final_pictures(net, info, cfg, device, out):
    """The end of training: Langevin chains from noise as a picture, the energies over training
    and, on 2D data, the density."""
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    n = min(cfg.n_samples, 8) if info.kind == "image" else cfg.n_samples
    _, chain = fresh_chains(net, n, info, cfg, device, g, keep=chain_steps(sample_steps(cfg)))
    save_chain(chain, out / "chain.png", info, f"Langevin chains from uniform noise ({cfg.sampler})")
    save_energies(out / "metrics.jsonl", out / "energies.png")
    if info.kind == "points":
        density_figure(net, info, cfg, cfg, device, out / "density.png")


# ----------------------------------------------------------------------------------------
# Run code
# ----------------------------------------------------------------------------------------

MODEL = "ebm"


def build(cfg, info):
    """(energy network, replay buffer) for a configuration and the data's description."""
    if cfg.jem and not info.num_classes:
        raise UserError(f"--jem needs labelled images (digits, mnist, fashion-mnist, cifar10); {info.name} has none")
    k = info.num_classes if cfg.jem else 1
    if info.kind == "points":
        net = PointEnergy(info.shape[0], cfg.hidden, cfg.depth, k, cfg.act)
    else:
        c, h, w = info.shape
        if h != w or h % 2 ** len(cfg.ch_mult):
            raise UserError(f"--ch-mult {','.join(map(str, cfg.ch_mult))} halves the side {len(cfg.ch_mult)} "
                            f"times; {info.name} has {h}x{w} images: use fewer levels")
        net = ImageEnergy(c, cfg.ch, cfg.ch_mult, cfg.blocks, k, cfg.act, cfg.spectral_norm, h)
    low, high = box(info)
    buffer = ReplayBuffer(cfg.buffer_size, info.shape, low, high, cfg.restart)
    return net, buffer


def train(cfg):
    """Du & Mordatch's Algorithm 1 (with JEM's classifier term under --jem): Langevin chains from
    the replay buffer, then one Adam step on the contrastive-divergence loss; under torchrun
    every process trains on its slice of the global batch (DDP) with chains of its own."""
    with Training(cfg, MODEL) as run:
        ds = load_dataset(cfg.dataset, "train", cfg.data_dir)
        info = ds.info
        seed_everything(cfg.seed)  # the same initial weights on every process
        net, buffer = build(cfg, info)
        net.to(run.device)
        buffer.to(run.device)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
        batches = Batches(ds, cfg.batch_size, run.dist, seed=cfg.seed)
        # under torchrun each process keeps its own buffer; the checkpoint holds rank 0's, which
        # every process resumes from (bit-exact on one process)
        step = run.start(info, model=net, opt=opt, batches=batches, buffer=buffer)
        model = wrap_ddp(net, run.dist, cfg.compile)
        amp = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.amp)
        low, high = box(info)
        noise = None if cfg.sampler == "sgld" else cfg.noise

        def samples(step):
            g = torch.Generator(device=run.device).manual_seed(cfg.seed)
            fresh = fresh_chains(net, cfg.n_samples, info, cfg, run.device, g)
            held = buffer.x[torch.randint(len(buffer), (cfg.n_samples,), generator=g, device=run.device)]
            save_samples(fresh, held, run.out / f"samples_{step}.png", info,
                         (f"chains from noise ({sample_steps(cfg)} Langevin steps)", "replay-buffer chains"),
                         f"step {step}")

        for step in run.steps(step, samples):
            x, y = next(batches)
            x_pos = to_model_space(x, info)
            x0, idx, _ = buffer.sample(x_pos.shape[0])
            x_neg = langevin(energy_fn(net, amp), x0, cfg.sgld_steps, cfg.step_size, noise, cfg.langevin_clip,
                             (low, high))
            buffer.update(idx, x_neg)
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, cfg)
            with amp:
                loss, parts = training_loss(model, x_pos, x_neg, y if cfg.jem else None, cfg.alpha, cfg.px_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run.log(loss=loss, **parts)
        run.draw(final_pictures, net, info, cfg, run.device, run.out)
    run.report(["ckpt.pt", f"samples_{run.step}.png", "chain.png", "density.png", "energies.png", "loss.png"])


def evaluate(cfg):
    """--eval CKPT. 2D data: the exact test NLL in nats of exp(-E / T) / Z (T = 1 for SGLD), log Z by
    quadrature over the data box (and its change from the grid of half the resolution), the true
    entropy, density.npz and density.png. Images: no likelihood (Z is intractable and AIS is not
    implemented): the mean energy of test and training images and, for JEM, the test accuracy."""
    (net, buffer), saved, info = load(cfg.eval, get_device(cfg.device))
    device = next(net.parameters()).device
    if cfg.fid is not None:  # the chains of --sample-init, as --sample draws them
        run = dataclasses.replace(saved, sample_steps=cfg.sample_steps or saved.sample_steps)
        return fid_evaluate(cfg, info, lambda n, g: to_levels(
            buffer_chains(net, buffer, n, info, run, g) if cfg.sample_init == "buffer"
            else fresh_chains(net, n, info, run, device, g), info))
    out = output_dir(cfg, cfg.eval)
    ds = load_dataset(info.name, "test", cfg.data_dir)
    start, t = time.time(), temperature(saved)
    if info.kind == "points":
        low, high = box(info)
        fn = scaled_energy_fn(net, t)
        log_z = log_partition_2d(fn, low, high, cfg.quad_n, device=device)
        log_z_half = log_partition_2d(fn, low, high, max(cfg.quad_n // 2, 1), device=device)
        lp = torch.cat([log_prob_2d(fn, x.to(device), log_z, low, high).cpu() for x in ds.data.split(cfg.batch_size)])
        fields = dict(nll=-lp.mean().item(), nll_se=lp.std().item() / math.sqrt(len(lp)), n=len(lp),
                      log_z=log_z.item(), log_z_change_half_grid=abs(log_z - log_z_half).item(), quad_n=cfg.quad_n,
                      temperature=t, outside_box=int((~torch.isfinite(lp)).sum()))
        if ds.log_prob is not None:
            fields["entropy"], fields["entropy_se"] = entropy_estimate(info.name)
        grid, _ = density_figure(net, info, saved, cfg, device, out / "density.png", ds)
        np.savez(out / "density.npz", log_density=grid, lim=info.lim)
    else:
        def logits(data):  # images at their bins' centres
            with torch.no_grad():
                return torch.cat([net(to_model_space(x.to(device), info, dequantize=False)).float().cpu()
                                  for x in data.split(cfg.batch_size)])
        test_logits = logits(ds.data)
        fields = dict(likelihood="not computed: Z of an image EBM is intractable and AIS is not implemented",
                      energy_test=energy_from_logits(test_logits).mean().item(),
                      energy_train=energy_from_logits(logits(load_dataset(info.name, "train", cfg.data_dir).data))
                      .mean().item(), temperature=t, n=len(ds.data))
        if saved.jem:
            fields["accuracy"] = (test_logits.argmax(1) == ds.labels).float().mean().item()
    fields["seconds"] = round(time.time() - start, 1)
    Logger(out, 0).event("eval", split="test", **fields)
    report_files(out, ["metrics.jsonl", "density.npz", "density.png"])
    return fields


def draw_samples(cfg):
    """--sample CKPT: n_samples chains of --sample-steps Langevin steps into samples.pt, continued from
    the checkpoint's replay buffer (--sample-init buffer) or started from uniform noise (noise);
    samples.png shows them above as many chains of the other kind; chain.png, chains from noise."""
    (net, buffer), saved, info = load(cfg.sample, get_device(cfg.device))
    device = next(net.parameters()).device
    out = output_dir(cfg, cfg.sample)
    run = dataclasses.replace(saved, sample_steps=cfg.sample_steps or saved.sample_steps)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    kinds = {"buffer": lambda: buffer_chains(net, buffer, cfg.n_samples, info, run, g),
             "noise": lambda: fresh_chains(net, cfg.n_samples, info, run, device, g)}
    names = {k: f"{'buffer chains continued' if k == 'buffer' else 'chains from noise'} "
                f"({sample_steps(run, k)} Langevin steps)" for k in kinds}
    other = "noise" if cfg.sample_init == "buffer" else "buffer"
    start = time.time()
    x = kinds[cfg.sample_init]()
    seconds = time.time() - start
    torch.save(to_levels(x, info).cpu() if info.kind == "image" else x.cpu(), out / "samples.pt")
    save_samples(x, kinds[other](), out / "samples.png", info, (f"{names[cfg.sample_init]}, samples.pt", names[other]))
    _, chain = fresh_chains(net, min(cfg.n_samples, 8) if info.kind == "image" else cfg.n_samples, info, run,
                            device, g, keep=chain_steps(sample_steps(run)))
    save_chain(chain, out / "chain.png", info, f"Langevin chains from uniform noise ({run.sampler})")
    Logger(out, 0).event("sample", n=cfg.n_samples, seconds=round(seconds, 3), samples_per_s=cfg.n_samples / seconds,
                         init=cfg.sample_init, langevin_steps=sample_steps(run, cfg.sample_init))
    report_files(out, ["samples.png", "samples.pt", "chain.png", "metrics.jsonl"])
    return x


def load(path, device="cpu"):
    """((energy network, replay buffer), its training Config, its data's description) from a checkpoint."""
    ckpt = load_checkpoint(path, MODEL)
    cfg, info = saved_config(Config, ckpt)
    net, buffer = build(cfg, info)
    load_weights(net, ckpt["model"], path)
    try:
        buffer.load_state_dict(ckpt["buffer"])
    except (KeyError, ValueError) as e:
        raise UserError(f"the replay buffer in {path} does not fit ({e}); pass a ckpt.pt written by ebm.py") from None
    return (net.to(device).eval(), buffer.to(device)), cfg, info


def main(argv=None):
    """Train (default), or --eval CKPT, or --sample CKPT; a user's mistake exits with one line."""
    with user_errors():
        cfg = parse_config(Config, PRESETS, argv, doc=__doc__, kinds=("image", "points"))
        if cfg.jem:  # JEM's settings over the dataset's preset, under the flags typed
            cfg = parse_config(Config, JEM_PRESETS, argv, doc=__doc__, kinds=("image", "points"))
        check_config(cfg)
        return dispatch(cfg, train, evaluate, draw_samples)


if __name__ == "__main__":
    main()
