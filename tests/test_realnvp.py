"""Tests of realnvp.py: every identity against an independent computation.

Invertibility to float64 precision and log-determinants against the slogdet of
torch.autograd.functional.jacobian, for every layer type (RealNVP's couplings and
normalisations; Glow's 1x1 convolutions, plain and LU, its coupling, split prior and levels;
MAF's layers) and the whole flows; MADE's masks by autograd; the split prior against
torch.distributions; the densities integrating to one by quadrature; the discrete likelihood
against hand computation and closed forms; the command line end to end for every --arch, resume
and torchrun; the mathematics and the networks with common.py replaced.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import common
import realnvp as R
from conftest import events, run_main, torchrun

F64 = torch.float64
POINTS = common.DataInfo("8gaussians", "points", (2,), lim=common.POINTS_LIM)


def image_info(c, side, levels=17):
    """The description of c x side x side images of `levels` levels (what load_dataset gives)."""
    return common.DataInfo("digits", "image", (c, side, side), levels=levels, num_classes=10)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------

def randomize(module, seed, std=0.3):
    """Random values in every parameter and float buffer, so no layer is the identity
    (the networks' zero-initialised output layers would otherwise hide wrong signs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
            if name.endswith("original0"):  # weight-norm magnitudes: keep them away from 0
                p.add_(1.0)
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g, dtype=b.dtype))
            elif name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g, dtype=b.dtype))
    return module


def per_example_logdet(f, x):
    """slogdet of the autograd Jacobian of one example's map f: (1, *shape) -> (1, *shape)."""
    shape = x.shape[1:]
    g = lambda v: f(v.reshape(1, *shape)).reshape(-1)
    J = torch.autograd.functional.jacobian(g, x.reshape(-1))
    sign, logabs = torch.linalg.slogdet(J)
    assert sign != 0
    return logabs


def check_layer(layer, x, tol=1e-9):
    """forward/inverse round trip, and log_det == slogdet(Jacobian) for each example."""
    z, log_det = layer(x)
    assert z.numel() == x.numel() and log_det.shape == (x.shape[0],)
    torch.testing.assert_close(layer.inverse(z), x, rtol=0, atol=tol)
    for i in range(x.shape[0]):
        expected = per_example_logdet(lambda v: layer(v)[0], x[i:i + 1])
        torch.testing.assert_close(log_det[i], expected, rtol=0, atol=tol)


class Oracle(torch.nn.Module):
    """A fixed nonlinear s, t network for couplings: any function of x_a will do."""

    def __init__(self, numel, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(2 * numel, numel, generator=g, dtype=F64) / math.sqrt(numel)

    def forward(self, xa):
        flat = xa.flatten(1)
        out = torch.sin(flat @ self.A.T) + 0.5 * (flat @ self.A.T)
        return out.reshape(xa.shape[0], 2 * xa.shape[1], *xa.shape[2:])


shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))


# ----------------------------------------------------------------------------------------
# coupling layers (Eqs. 4-9)
# ----------------------------------------------------------------------------------------

@given(shape=shapes, seed=st.integers(0, 10_000), affine=st.booleans(), data=st.data())
def test_coupling_inverts_and_logdet_matches_jacobian_any_mask(shape, seed, affine, data):
    numel = math.prod(shape)
    bits = data.draw(st.lists(st.booleans(), min_size=numel, max_size=numel))
    mask = torch.tensor(bits, dtype=F64).reshape(shape)
    layer = randomize(R.AffineCoupling(mask, Oracle(numel, seed), affine).double(), seed)
    x = torch.randn(2, *shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    check_layer(layer, x)
    z, log_det = layer(x)
    # the conditioning half passes through unchanged (y_a = x_a, Eq. 4)
    torch.testing.assert_close(z * mask, x * mask, rtol=0, atol=0)
    if not affine:  # NICE: volume preserving
        assert torch.all(log_det == 0)


@given(c=st.sampled_from([1, 2]), hw=st.sampled_from([2, 3, 4]), parity=st.integers(0, 1),
       kind=st.sampled_from(["checkerboard", "channel"]), seed=st.integers(0, 10_000))
def test_resnet_coupling_with_paper_masks(c, hw, parity, kind, seed):
    shape = (2 * c if kind == "channel" else c, hw, hw)
    mask = (R.checkerboard_mask if kind == "checkerboard" else R.channel_mask)(shape, parity)
    layer = randomize(R.AffineCoupling(mask, R.ResNet(mask, 4, 1)), seed).double().eval()
    x = torch.randn(2, *shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    check_layer(layer, x)


def test_coupling_train_mode_batchnorm_in_network_full_batch_jacobian():
    """In training mode the network's batch norm couples the examples, but y_a = x_a still holds
    for the whole batch, so the batch Jacobian stays triangular: its log-determinant is the
    sum of the per-example log_dets."""
    mask = R.checkerboard_mask((1, 2, 2), 0)
    layer = randomize(R.AffineCoupling(mask, R.ResNet(mask, 4, 1)), 3).double().train()
    x = torch.randn(3, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    z, log_det = layer(x)
    torch.testing.assert_close(layer.inverse(z), x, rtol=0, atol=1e-10)
    J = torch.autograd.functional.jacobian(lambda v: layer(v.reshape(x.shape))[0].reshape(-1), x.reshape(-1))
    torch.testing.assert_close(torch.linalg.slogdet(J)[1], log_det.sum(), rtol=0, atol=1e-10)


def test_coupling_matches_equation_4_5_written_out():
    """Eq. 4-5 with d = 1 of D = 2, computed by hand with an oracle s, t."""
    s_fn, t_fn = lambda a: 0.7 * torch.sin(a), lambda a: a**2 - 1
    st_fn = lambda xa: (s_fn(xa[:, :1]).repeat(1, 2), t_fn(xa[:, :1]).repeat(1, 2))
    x = torch.tensor([[0.4, -1.3]], dtype=F64)
    y, log_det = R.coupling_forward(x, torch.tensor([1.0, 0.0], dtype=F64), st_fn)
    x1, x2 = 0.4, -1.3
    expected = [x1, x2 * math.exp(0.7 * math.sin(x1)) + x1**2 - 1]
    torch.testing.assert_close(y, torch.tensor([expected], dtype=F64))
    torch.testing.assert_close(log_det, torch.tensor([0.7 * math.sin(x1)], dtype=F64))


# ----------------------------------------------------------------------------------------
# masks and squeeze (Secs. 3.4, 3.6)
# ----------------------------------------------------------------------------------------

@given(shape=st.tuples(st.integers(1, 4).map(lambda c: 2 * c), st.integers(1, 5), st.integers(1, 5)))
def test_masks_alternate_and_partition(shape):
    c, h, w = shape
    for make in (R.checkerboard_mask, R.channel_mask):
        b0, b1 = make(shape, 0), make(shape, 1)
        assert torch.equal(b0 + b1, torch.ones(shape))  # consecutive layers transform the other half
    cb = R.checkerboard_mask(shape, 0)
    for i in range(h):
        for j in range(w):
            assert cb[:, i, j].eq(float((i + j) % 2 == 0)).all()
    ch = R.channel_mask(shape, 0)
    assert ch[: c // 2].eq(1).all() and ch[c // 2:].eq(0).all()


def coupling_groups(model):
    """The sequences of couplings that share one partition of the variables: the 2D flow; in every
    scale its checkerboard couplings and its channel-wise couplings (after the squeeze)."""
    groups = []
    for m in model.modules():
        if isinstance(m, R.Scale):
            groups.append(("checkerboard", m.checker))
            if not m.last:
                groups.append(("channel", m.channel))
    if not groups:
        groups.append(("vector", model.body))
    return [(kind, [layer.mask for layer in seq if isinstance(layer, R.AffineCoupling)]) for kind, seq in groups]


@given(c=st.integers(1, 3), n_scales=st.integers(1, 3), norm=st.sampled_from(["batch", "act", "none"]))
def test_consecutive_couplings_transform_complementary_halves_in_every_scale(c, n_scales, norm):
    """Secs. 3.4-3.6: inside each scale, consecutive couplings of each kind use complementary masks
    (they add to 1), so what one coupling leaves unchanged the next transforms. Checkerboard masks
    are constant over channels and alternate along rows and columns; channel-wise masks are
    constant over space and select half of the channels."""
    side = 2 ** n_scales
    model = R.build(small_cfg(n_scales=n_scales, norm=norm), image_info(c, side))
    groups = coupling_groups(model)
    assert [kind for kind, _ in groups] == ["checkerboard", "channel"] * (n_scales - 1) + ["checkerboard"]
    for kind, masks in groups:
        assert len(masks) >= 3
        for a, b in zip(masks, masks[1:]):
            assert torch.equal(a + b, torch.ones_like(a)), kind
        for m in masks:
            if kind == "checkerboard":
                assert torch.equal(m, m[:1].expand_as(m))
                assert (m[:, 1:, :] != m[:, :-1, :]).all() and (m[:, :, 1:] != m[:, :, :-1]).all()
            else:
                assert torch.equal(m, m[:, :1, :1].expand_as(m)) and m[:, 0, 0].sum() == m.shape[0] // 2


@given(n_couplings=st.integers(2, 9), norm=st.sampled_from(["batch", "act", "none"]))
def test_consecutive_couplings_of_the_2d_flow_have_complementary_masks(n_couplings, norm):
    """The 2D flow (Dinh et al. 2017's toy setting): each coupling transforms the coordinate the
    coupling before it kept, (1, 0), (0, 1), (1, 0), ..."""
    model = R.build(small_cfg(n_couplings=n_couplings, norm=norm), POINTS)
    [(kind, masks)] = coupling_groups(model)
    assert len(masks) == n_couplings
    for a, b in zip(masks, masks[1:]):
        assert torch.equal(a + b, torch.ones(2))
    assert all(m.sum() == 1 for m in masks)


@given(b=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 3), w=st.integers(1, 3))
def test_squeeze_is_the_2x2_space_to_channel_map(b, c, h, w):
    x = torch.randn(b, c, 2 * h, 2 * w, dtype=F64)
    y = R.squeeze(x)
    assert y.shape == (b, 4 * c, h, w)
    for ci in range(c):
        for di in range(2):
            for dj in range(2):
                torch.testing.assert_close(y[:, 4 * ci + 2 * di + dj], x[:, ci, di::2, dj::2], rtol=0, atol=0)
    assert torch.equal(R.unsqueeze(y), x)
    class SqueezeLayer:  # a permutation: log_det 0
        forward = __call__ = staticmethod(lambda v: (R.squeeze(v), v.new_zeros(v.shape[0])))
        inverse = staticmethod(R.unsqueeze)
    check_layer(SqueezeLayer(), x[:1])


# ----------------------------------------------------------------------------------------
# normalisation layers (Sec. 3.7; Glow Sec. 3.1)
# ----------------------------------------------------------------------------------------

@given(shape=st.sampled_from([(3,), (2, 2, 3), (1, 3, 2)]), seed=st.integers(0, 10_000))
def test_batchnorm_flow_eval_jacobian_and_train_inverse(shape, seed):
    layer = randomize(R.BatchNormFlow(shape[0]), seed).double()
    x = 2 + 3 * torch.randn(5, *shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    layer.eval()
    check_layer(layer, x[:2])
    layer.train()
    running = layer.running_mean.clone()
    z, log_det = layer(x)
    torch.testing.assert_close(layer.inverse(z), x, rtol=0, atol=1e-10)  # inverse with the batch statistics
    dims = [0] + list(range(2, x.dim()))
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    torch.testing.assert_close(layer.running_mean, running + layer.momentum * (mean - running))
    expected = ((layer.log_gamma - 0.5 * torch.log(var + layer.eps)).sum() * math.prod(shape[1:])).expand(5)
    torch.testing.assert_close(log_det, expected)
    # training-mode output: per feature mean beta and standard deviation exp(log_gamma) (up to eps)
    torch.testing.assert_close(z.mean(dims), layer.beta.detach())
    torch.testing.assert_close(z.var(dims, unbiased=False),
                               layer.log_gamma.detach().exp() ** 2 * var / (var + layer.eps))


@given(shape=st.sampled_from([(2,), (3, 2, 2), (1, 4, 3)]), seed=st.integers(0, 10_000))
def test_actnorm_data_init_gives_zero_mean_unit_variance_and_inverts(shape, seed):
    layer = R.ActNorm(shape[0]).double().train()
    x = 1.5 - 4 * torch.randn(6, *shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    z, _ = layer(x)  # first training forward initialises from this batch
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(z.mean(dims), torch.zeros(shape[0], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(z.var(dims, unbiased=False), torch.ones(shape[0], dtype=F64), rtol=0, atol=1e-12)
    assert bool(layer.initialized)
    x2 = torch.randn(2, *shape, dtype=F64)
    before = layer.shift.clone()
    check_layer(layer, x2)  # later batches do not re-initialise
    assert torch.equal(layer.shift, before)
    layer.eval()
    check_layer(layer, x2)
    torch.testing.assert_close(layer(x2)[0], layer.train()(x2)[0], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------
# preprocessing (Sec. 4.1) and the discrete likelihood
# ----------------------------------------------------------------------------------------

@given(levels=st.sampled_from([2, 17, 256]), alpha=st.sampled_from([0.0, 0.05, 0.2]), seed=st.integers(0, 10_000))
def test_logit_preprocess_inverts_and_logdet_matches_jacobian(levels, alpha, seed):
    layer = R.LogitPreprocess(levels, alpha)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(levels, (2, 1, 2, 2), generator=g)
    v = R.dequantize(x.double(), torch.rand(x.shape, generator=g, dtype=F64).clamp(1e-3, 1 - 1e-3))
    check_layer(layer, v, tol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(levels=st.sampled_from([2, 17, 256]), data=st.data())
def test_dequantized_values_lie_in_the_cube_of_their_level(dtype, levels, data):
    """Sec. 4.1: level x owns the cube [x, x + 1) and v = x + u, u in [0, 1), lies in it, so
    quantize (the floor) takes every v back to x, for every u up to the largest float below 1
    (where x + u would round up to x + 1). Rounding instead of flooring fails from u = 1/2 on."""
    width = 32 if dtype == torch.float32 else 64
    us = data.draw(st.lists(st.floats(0, 1, exclude_max=True, width=width), max_size=10))
    one = torch.tensor(1.0, dtype=dtype)
    u = torch.cat([torch.tensor([0.0, 0.25, 0.5, 0.75, 0.999, 1 - 2 ** -12] + us, dtype=dtype),
                   torch.nextafter(one, torch.zeros_like(one)).reshape(1)])
    x = torch.arange(levels, dtype=dtype)[:, None].expand(levels, len(u))
    v = R.dequantize(x, u.expand_as(x))
    assert v.dtype == dtype and (v >= x).all() and (v < x + 1).all()
    exact = x + u < x + 1  # where the float sum x + u is already below x + 1, v is that sum
    assert torch.equal(v[exact], (x + u)[exact])
    back = R.quantize(v, levels)
    assert torch.equal(back.long(), x.long())
    assert torch.equal(R.quantize(torch.tensor([-0.5, levels + 0.5], dtype=dtype), levels).long(),
                       torch.tensor([0, levels - 1]))  # outside the data range: the outer levels


def test_nll_hand_computed():
    """x = (3, 10), K = 17, u = (0.5, 0.25), alpha = 0.05, one ActNorm layer after the logit:
    nll = -[log N(z) + sum_i (log(1-2a) - log K - log p_i - log(1-p_i)) - sum log_scale]."""
    K, a, shift, log_scale = 17, 0.05, 0.3, 0.2
    act = R.ActNorm(1).double()
    with torch.no_grad():
        act.shift.fill_(shift), act.log_scale.fill_(log_scale), act.initialized.fill_(True)
    model = R.RealNVP(R.FlowSequence([act]), (1, 1, 2), levels=K, alpha=a).double()
    x = torch.tensor([[[[3, 10]]]], dtype=torch.uint8)
    u = torch.tensor([[[[0.5, 0.25]]]], dtype=F64)
    total = 0.0
    for xi, ui in ((3, 0.5), (10, 0.25)):
        p = a + (1 - 2 * a) * (xi + ui) / K
        w = math.log(p / (1 - p))
        z = (w - shift) * math.exp(-log_scale)
        total += -0.5 * z * z - 0.5 * math.log(2 * math.pi)
        total += math.log(1 - 2 * a) - math.log(K) - math.log(p) - math.log(1 - p) - log_scale
    nll = R.nll(model, x, discrete=True, u=u)
    torch.testing.assert_close(nll, torch.tensor([-total], dtype=F64), rtol=0, atol=1e-12)
    D = 2
    torch.testing.assert_close(R.bits_per_dim(nll, D), nll / (D * math.log(2)))


def test_discrete_probabilities_sum_to_the_mass_inside_the_cube():
    """P(x) = int_0^1 p_V(x + u) du (Gauss-Legendre) summed over the K levels is the model's mass
    on v in [0, K], i.e. on w in [logit(a), logit(1-a)]: with an ActNorm body (z = (w - m) e^-s)
    Phi((b - m) e^-s) - Phi((-b - m) e^-s), b = logit(1 - a). A missing -log K, a wrong logit
    log-determinant or a wrong sign changes the sum. Jensen: E_u[nll] >= -log P(x) for every x."""
    K, a, m, s = 5, 0.05, 0.4, -0.3
    act = R.ActNorm(1).double()
    with torch.no_grad():
        act.shift.fill_(m), act.log_scale.fill_(s), act.initialized.fill_(True)
    model = R.RealNVP(R.FlowSequence([act]), (1, 1, 1), levels=K, alpha=a).double().eval()
    nodes, weights = np.polynomial.legendre.leggauss(200)
    u = torch.tensor((nodes + 1) / 2, dtype=F64).reshape(-1, 1, 1, 1)
    wts = torch.tensor(weights / 2, dtype=F64)
    total = 0.0
    for xi in range(K):
        x = torch.full((len(u), 1, 1, 1), xi, dtype=torch.uint8)
        nll = R.nll(model, x, discrete=True, u=u)
        P = (wts * torch.exp(-nll)).sum().item()
        total += P
        assert (wts * nll).sum().item() >= -math.log(P)
    b = math.log((1 - a) / a)
    Phi = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))
    expected = Phi((b - m) * math.exp(-s)) - Phi((-b - m) * math.exp(-s))
    assert abs(total - expected) < 1e-9, (total, expected)


# ----------------------------------------------------------------------------------------
# whole flows
# ----------------------------------------------------------------------------------------

def small_cfg(**kw):
    cfg = R.Config(dataset="digits", n_couplings=4, hidden=16, n_blocks=1, n_features=4)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@given(c=st.sampled_from([1, 2]), hw=st.sampled_from([2, 4]), n_scales=st.integers(1, 2),
       norm=st.sampled_from(["batch", "act", "none"]), coupling=st.sampled_from(["affine", "additive"]),
       seed=st.integers(0, 10_000))
def test_multiscale_flow_with_preprocessing_inverts_and_logdet_matches_jacobian(c, hw, n_scales, norm, coupling, seed):
    cfg = small_cfg(n_scales=n_scales, norm=norm, coupling=coupling)
    model = R.build(cfg, image_info(c, hw))
    model = randomize(model.double(), seed, std=0.2).eval()
    g = torch.Generator().manual_seed(seed)
    v = R.dequantize(torch.randint(17, (2, c, hw, hw), generator=g).double(),
                     torch.rand(2, c, hw, hw, generator=g, dtype=F64).clamp(0.01, 0.99))
    check_layer(model, v, tol=1e-8)


def test_multiscale_flow_train_mode_inverts_with_batch_statistics():
    model = R.build(small_cfg(n_scales=2, norm="batch"), image_info(1, 4))
    model = randomize(model.double(), 1, std=0.2).train()
    v = R.dequantize(torch.randint(17, (4, 1, 4, 4)).double())
    z, _ = model(v)
    torch.testing.assert_close(model.inverse(z), v, rtol=0, atol=1e-8)


@given(norm=st.sampled_from(["batch", "act", "none"]), seed=st.integers(0, 10_000))
def test_2d_flow_inverts_and_logdet_matches_jacobian(norm, seed):
    model = randomize(R.build(small_cfg(norm=norm), POINTS).double(), seed).eval()
    x = 2 * torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))
    check_layer(model, x)
    z = torch.randn(3, 2, dtype=F64)
    torch.testing.assert_close(model(model.inverse(z))[0], z, rtol=0, atol=1e-9)


def integrate_density(model, lim, n):
    """Midpoint rule for the integral of exp(log_prob) over [-lim, lim]^2 with n x n cells."""
    h = 2 * lim / n
    c = -lim + h * (torch.arange(n, dtype=F64) + 0.5)
    pts = torch.stack(torch.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        return torch.exp(R.log_prob(model, pts)).sum().item() * h * h


def check_normalised(model):
    """The integral is 1 up to the quadrature error, estimated from the grid itself: the midpoint
    rule's error is O(h^2), so |I_n - I_2n| / 3 estimates the error of I_2n (Richardson). The
    box is wide enough that the density's tails beyond it are below 1e-6."""
    i1, i2 = integrate_density(model, 10.0, 200), integrate_density(model, 10.0, 400)
    err = abs(i1 - i2) / 3
    assert abs(i2 - 1) < 5 * err + 1e-6, (i1, i2, err)
    return i2


def test_2d_density_integrates_to_one_at_random_init_and_after_training():
    torch.manual_seed(0)
    cfg = small_cfg(norm="batch")
    model = randomize(R.build(cfg, POINTS), 0, std=0.3).double()
    model.eval()
    check_normalised(model)
    # the randomised flow is far from the prior, so the check is not trivially N(0, I)'s
    base = R.standard_normal_log_prob(torch.zeros(1, 2, dtype=F64))
    assert abs(R.log_prob(model, torch.zeros(1, 2, dtype=F64)).item() - base.item()) > 0.05
    ds = common.load_dataset("8gaussians")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for _ in range(30):
        loss = R.nll(model, ds.sample(128, g).double()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    check_normalised(model)


def test_sample_is_the_inverse_of_prior_draws_in_eval_mode():
    model = randomize(R.build(small_cfg(n_scales=2), image_info(1, 4)), 2)
    model.train()
    torch.manual_seed(5)
    x = model.sample(6, temperature=0.7)
    assert model.training  # restored
    assert x.dtype == torch.uint8 and x.shape == (6, 1, 4, 4) and int(x.max()) <= 16
    torch.manual_seed(5)
    z = 0.7 * torch.randn(6, 1, 4, 4)
    with torch.no_grad():
        expected = R.quantize(model.eval().inverse(z), 17)
    assert torch.equal(x, expected)


def test_scale_weight_penalty_counts_weightnorm_magnitudes_and_coupling_scales():
    model = randomize(R.build(small_cfg(n_scales=2), image_info(1, 4)), 0)
    expected = sum(p.pow(2).sum() for m in model.modules() if isinstance(m, R.AffineCoupling) for p in [m.scale])
    expected = expected + sum(m.parametrizations.weight.original0.pow(2).sum() for m in model.modules()
                              if isinstance(m, torch.nn.Conv2d))
    torch.testing.assert_close(R.scale_weight_penalty(model), expected)


@torch.no_grad()
def test_latent_grid_says_which_rows_are_images_and_which_latents(tmp_path, monkeypatch):
    """Issue 16: a grid that mixes kinds of rows says which is which. latent.png holds 8 images
    in rows 1 and 3 and, below each row, the latents z = f(x + u) of the same images through the
    normal CDF; its title says so."""
    info = image_info(1, 4)
    net = randomize(R.build(small_cfg(n_scales=2), info), 0).eval()
    xs = torch.randint(17, (16, 1, 4, 4), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    calls = []
    monkeypatch.setattr(R, "save_image_grid", lambda x, path, **kw: calls.append((x, path, kw)))
    torch.manual_seed(3)
    R.save_latent_grid(net, xs, tmp_path / "latent.png", info)
    [(grid, path, kw)] = calls
    assert path == tmp_path / "latent.png" and kw["nrow"] == 8 and "levels" not in kw
    assert "rows 1 and 3: images" in kw["title"] and "rows 2 and 4: latents" in kw["title"]
    torch.manual_seed(3)
    z, _ = net(R.dequantize(xs.float()))
    phi, images = 0.5 * (1 + torch.erf(z / math.sqrt(2))), xs.float() / 16
    for rows, expected in ((slice(0, 8), images[:8]), (slice(8, 16), phi[:8]), (slice(16, 24), images[8:]),
                           (slice(24, 32), phi[8:])):
        torch.testing.assert_close(grid[rows], expected)
    monkeypatch.undo()  # drawn for real, the title is a band above the grid
    import matplotlib.image
    R.save_latent_grid(net, xs, tmp_path / "latent.png", info)
    common.save_image_grid(grid, tmp_path / "untitled.png", nrow=8)
    titled, untitled = (matplotlib.image.imread(tmp_path / n) for n in ("latent.png", "untitled.png"))
    assert titled.shape[1] == untitled.shape[1] and titled.shape[0] > untitled.shape[0] + 30


# ----------------------------------------------------------------------------------------
# Glow (Kingma & Dhariwal 2018): 1x1 convolutions, its coupling, the split prior, levels
# ----------------------------------------------------------------------------------------

def roundtrip(layer, z, tol=1e-10):
    """forward(inverse(z)) == z: the direction the issue names (inverse first)."""
    torch.testing.assert_close(layer(layer.inverse(z))[0], z, rtol=0, atol=tol)


def glow_net(width=6):
    return lambda i, o: R.GlowNet(i, o, width)


def vector_net(width=6):
    return lambda i, o: R.GlowNet(i, o, width, image=False)


@given(c=st.integers(1, 4), spatial=st.sampled_from([(), (1, 1), (2, 3)]), lu=st.booleans(),
       seed=st.integers(0, 10_000))
def test_invconv1x1_logdet_is_slogdet_of_the_jacobian(c, spatial, lu, seed):
    """Sec. 3.2: log|det| = h w log|det W| (plain: slogdet of W; LU: sum log|s|), against the
    slogdet of the autograd Jacobian of the whole layer on the (C, h, w) example, float64."""
    torch.manual_seed(seed)
    layer = randomize(R.InvConv1x1(c, lu).double(), seed, std=0.6)
    if lu:  # away from zero, and a sign of each kind
        with torch.no_grad():
            layer.log_s.copy_(0.5 * torch.randn(c, dtype=F64))
            layer.sign_s.copy_(torch.tensor([(-1.0) ** i for i in range(c)], dtype=F64))
    x = torch.randn(2, c, *spatial, dtype=F64, generator=torch.Generator().manual_seed(seed))
    check_layer(layer, x)
    roundtrip(layer, x)
    W, log_det_W = layer.weight_and_logdet()
    assert abs(log_det_W.item() - torch.linalg.slogdet(W)[1].item()) < 1e-10
    assert abs(log_det_W.item()) > 1e-6 or c == 1  # the check is not the trivial det 1 of a rotation


@given(c=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_lu_form_reconstructs_the_plain_w(c, seed):
    """W = P L (U + diag(s)) (Sec. 3.2): from the same seed the LU-parametrised layer starts at
    the very rotation the plain one starts at, P is a permutation, L unit lower-triangular."""
    torch.set_default_dtype(F64)
    torch.manual_seed(seed)
    plain = R.InvConv1x1(c)
    torch.manual_seed(seed)
    lu = R.InvConv1x1(c, lu=True)
    W, log_det = lu.weight_and_logdet()
    torch.testing.assert_close(W, plain.weight.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(W @ W.T, torch.eye(c), rtol=0, atol=1e-12)  # a rotation: log|det| = 0
    assert abs(log_det.item()) < 1e-12
    assert torch.equal(lu.P @ lu.P.T, torch.eye(c)) and set(lu.P.sum(0).tolist()) == {1.0}
    assert torch.equal(lu.lower, torch.tril(torch.ones(c, c), -1))


@given(c=st.integers(2, 5), spatial=st.sampled_from([(), (2, 2)]), affine=st.booleans(), seed=st.integers(0, 10_000))
def test_glow_coupling_inverts_and_logdet_matches_jacobian(c, spatial, affine, seed):
    torch.manual_seed(seed)
    net = (vector_net if not spatial else glow_net)()(c - c // 2, 2 * (c // 2))
    layer = randomize(R.GlowCoupling(c, net, 1 + len(spatial), affine).double(), seed).eval()
    x = torch.randn(2, c, *spatial, dtype=F64, generator=torch.Generator().manual_seed(seed))
    check_layer(layer, x)
    roundtrip(layer, x)
    # Table 1 written out: (h, t) = NN(x_b), y_a = sigmoid(h + 2) x_a + t, y_b = x_b
    y, log_det = layer(x)
    h, t = net(x[:, c // 2:]).chunk(2, 1)
    s = torch.sigmoid(h + 2) if affine else torch.ones_like(h)
    torch.testing.assert_close(y[:, :c // 2], s * x[:, :c // 2] + t, rtol=0, atol=1e-12)
    assert torch.equal(y[:, c // 2:], x[:, c // 2:])
    torch.testing.assert_close(log_det, torch.log(s).flatten(1).sum(1), rtol=0, atol=1e-12)


def test_glow_coupling_and_split_prior_start_as_the_paper_says():
    """Zero initialisation (Sec. 3.3): NN's last layer is zero, so a fresh coupling is
    y_a = sigmoid(2) x_a, y_b = x_b, and a fresh split prior is N(0, I)."""
    layer = R.GlowCoupling(4, glow_net()(2, 4), 3).double()
    x = torch.randn(3, 4, 2, 2, dtype=F64)
    y, log_det = layer(x)
    s2 = 1 / (1 + math.exp(-2))
    torch.testing.assert_close(y, torch.cat([s2 * x[:, :2], x[:, 2:]], 1))
    torch.testing.assert_close(log_det, torch.full((3,), 8 * math.log(s2), dtype=F64))
    split = R.SplitPrior(4, R.zero_layer(torch.nn.Conv2d(2, 4, 3, padding=1))).double()
    y, log_det = split(x)
    assert torch.equal(y, x) and torch.equal(log_det, torch.zeros(3, dtype=F64))


@given(c=st.sampled_from([2, 4, 5]), seed=st.integers(0, 10_000))
def test_split_prior_log_density_is_the_conditional_gaussian(c, seed):
    """log N(eps; 0, I) + log|det| of the split equals log N(z; mu(h), sigma(h)^2) computed by
    torch.distributions; the split inverts, and its log-det is the autograd Jacobian's."""
    torch.manual_seed(seed)
    net = torch.nn.Conv2d(c - c // 2, 2 * (c // 2), 3, padding=1)
    split = randomize(R.SplitPrior(c, net).double(), seed, std=0.4)
    x = torch.randn(3, c, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))
    y, log_det = split(x)
    h, z = x[:, :c - c // 2], x[:, c - c // 2:]
    assert torch.equal(y[:, :c - c // 2], h)
    mu, log_sigma = net(h).chunk(2, 1)
    expected = torch.distributions.Normal(mu, log_sigma.exp()).log_prob(z).flatten(1).sum(1)
    got = R.standard_normal_log_prob(y[:, c - c // 2:]) + log_det
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    check_layer(split, x)
    roundtrip(split, x)


@given(levels=st.sampled_from([2, 17, 256]), seed=st.integers(0, 10_000))
def test_center_preprocess_inverts_and_logdet_matches_jacobian(levels, seed):
    layer = R.CenterPreprocess(levels)
    v = levels * torch.rand(2, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))
    check_layer(layer, v)
    roundtrip(layer, v - 0.5)


def test_glow_discrete_probabilities_sum_to_the_mass_inside_the_cube():
    """As for the logit (test above): with Glow's centring y = v/K - 1/2 and an ActNorm body,
    sum_x P(x) = Phi((1/2 - m) e^-s) - Phi((-1/2 - m) e^-s); a missing -D log K changes it."""
    K, m, s = 5, 0.1, -1.0
    act = R.ActNorm(1).double()
    with torch.no_grad():
        act.shift.fill_(m), act.log_scale.fill_(s), act.initialized.fill_(True)
    model = R.RealNVP(R.FlowSequence([act]), (1, 1, 1), levels=K, pre=R.CenterPreprocess(K)).double().eval()
    nodes, weights = np.polynomial.legendre.leggauss(100)
    u = torch.tensor((nodes + 1) / 2, dtype=F64).reshape(-1, 1, 1, 1)
    total = sum((torch.tensor(weights / 2) * torch.exp(-R.nll(model, torch.full((len(u), 1, 1, 1), xi), True, u)))
                .sum().item() for xi in range(K))
    Phi = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))
    expected = Phi((0.5 - m) * math.exp(-s)) - Phi((-0.5 - m) * math.exp(-s))
    assert abs(total - expected) < 1e-9, (total, expected)


def glow_images(c, side, n_levels, K=1, lu=False, seed=0):
    torch.manual_seed(seed)
    body = R.GlowLevel((c, side, side), n_levels, K, glow_net(4),
                       lambda i, o: R.zero_layer(torch.nn.Conv2d(i, o, 3, padding=1)), lu)
    model = randomize(R.RealNVP(body, (c, side, side), levels=17, pre=R.CenterPreprocess(17)).double(), seed, std=0.1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random but well-conditioned 1x1 convolutions: rotation times exp(scales), log|det| != 0
        for m in model.modules():
            if isinstance(m, R.InvConv1x1) and m.lu:
                m.L.copy_(torch.randn(m.L.shape, generator=g, dtype=F64) * 0.1)
                m.U.copy_(torch.randn(m.U.shape, generator=g, dtype=F64) * 0.1)
                m.log_s.copy_(torch.randn(m.log_s.shape, generator=g, dtype=F64) * 0.1)
            elif isinstance(m, R.InvConv1x1):
                q = torch.linalg.qr(torch.randn(m.weight.shape, generator=g, dtype=F64))[0]
                m.weight.copy_(q * torch.exp(0.3 * torch.randn(q.shape[0], generator=g, dtype=F64)))
    return model.eval()


@given(c=st.sampled_from([1, 2]), n_levels=st.integers(1, 2), lu=st.booleans(), seed=st.integers(0, 10_000))
def test_whole_glow_inverts_and_logdet_matches_jacobian(c, n_levels, lu, seed):
    """The whole Glow (centring, levels of squeeze, K steps of ActNorm, 1x1 convolution and
    coupling, split priors): forward(inverse(z)) == z to 1e-10 and the log-det against the
    slogdet of the autograd Jacobian (float64)."""
    side = 2 ** n_levels
    model = glow_images(c, side, n_levels, K=2, lu=lu, seed=seed)
    z = torch.randn(2, c, side, side, dtype=F64, generator=torch.Generator().manual_seed(seed))
    roundtrip(model, z)
    v = R.dequantize(torch.randint(17, (2, c, side, side), generator=torch.Generator().manual_seed(seed)).double(),
                     torch.full((2, c, side, side), 0.5, dtype=F64))
    check_layer(model, v, tol=1e-8)


def test_glow_levels_squeeze_at_each_level_and_split_half():
    """Fig. 2b: L levels of K steps; level i (from 1) works on 2^(i+1) C channels of side H / 2^i
    (a squeeze, then half of the channels factored out before the next squeeze)."""
    model = glow_images(1, 8, 3, K=2)
    level, seen = model.body, []
    while True:
        seen.append((len(level.steps), level.steps[0][0].log_scale.shape[0]))
        if level.last:
            break
        level = level.next
    assert seen == [(2, 4), (2, 8), (2, 16)]
    with pytest.raises(ValueError):
        R.GlowLevel((1, 4, 4), 3, 1, glow_net(), glow_net())


def test_glow_sample_at_a_temperature_is_the_inverse_of_scaled_prior_draws():
    """Sampling with temperature T (Glow, Sec. 6): z ~ N(0, T^2 I) through the inverse,
    so at each split z_2 = mu(h) + sigma(h) T eps, Glow's reduced-temperature prior."""
    model = glow_images(1, 4, 2, K=1, seed=3)
    torch.manual_seed(5)
    x = model.sample(6, temperature=0.7)
    torch.manual_seed(5)
    z = 0.7 * torch.randn(6, 1, 4, 4, dtype=F64)
    with torch.no_grad():
        assert torch.equal(x, R.quantize(model.inverse(z), 17))
    split, eps, h = model.body.split, torch.randn(6, 2, 2, 2, dtype=F64), torch.randn(6, 2, 2, 2, dtype=F64)
    with torch.no_grad():
        mu, log_sigma = split.mu_log_sigma(h)
        torch.testing.assert_close(split.inverse(torch.cat([h, 0.7 * eps], 1))[:, 2:], mu + log_sigma.exp() * 0.7 * eps)


# ----------------------------------------------------------------------------------------
# MAF (Papamakarios et al. 2017) and MADE (Germain et al. 2015)
# ----------------------------------------------------------------------------------------

@given(D=st.integers(2, 6), hidden=st.sampled_from([5, 16]), seed=st.integers(0, 10_000), data=st.data())
def test_made_outputs_depend_only_on_earlier_inputs(D, hidden, seed, data):
    """By autograd: d(mu_i, alpha_i)/dx_j is zero unless j comes before i in the ordering, and
    (hidden >= D - 1) non-zero for some input wherever it may be, so the masks cut no more than
    they must."""
    order = data.draw(st.permutations(range(D)))
    made = randomize(R.MADE(order, hidden).double(), seed, std=0.5)
    rank = {d: r for r, d in enumerate(order)}
    allowed = torch.tensor([[rank[j] < rank[i] for j in range(D)] for i in range(D)])
    x = torch.randn(D, dtype=F64, generator=torch.Generator().manual_seed(seed))
    for out in (0, 1):
        J = torch.autograd.functional.jacobian(lambda v: made(v[None])[out][0], x)
        assert torch.all(J[~allowed] == 0)
    with torch.no_grad():  # positive weights and biases, small x: every ReLU open, every allowed path adds
        for p in made.parameters():
            p.abs_().add_(0.1)
    for out in (0, 1):
        J = torch.autograd.functional.jacobian(lambda v: made(v[None])[out][0], 1e-3 * x)
        assert torch.equal(J != 0, allowed)


@given(D=st.integers(1, 5), seed=st.integers(0, 10_000), data=st.data())
def test_maf_layer_d_pass_inverse_inverts_one_pass_forward_and_logdet(D, seed, data):
    """Sec. 3.1: u = (x - mu) exp(-alpha) in one pass, log|det| = -sum alpha against autograd;
    the D-pass inverse recovers x, and forward(inverse(u)) == u to 1e-10."""
    order = data.draw(st.permutations(range(D)))
    layer = randomize(R.MaskedAutoregressive(order, 8).double(), seed, std=0.4)
    x = torch.randn(3, D, dtype=F64, generator=torch.Generator().manual_seed(seed))
    check_layer(layer, x)
    roundtrip(layer, x)
    mu, alpha = layer.mu_alpha(x)
    u, log_det = layer(x)
    torch.testing.assert_close(x, u * alpha.exp() + mu, rtol=0, atol=1e-12)  # x_i = u_i exp(alpha_i) + mu_i
    torch.testing.assert_close(log_det, -alpha.sum(1), rtol=0, atol=0)
    raw = layer.made(x)[1]  # the bound: alpha = 5 tanh(raw / 5), within 5, and raw's near 0
    assert torch.all(alpha.abs() < 5) and torch.all((alpha - raw).abs() <= raw.abs() ** 3 / 75 + 1e-15)


@given(n_layers=st.integers(1, 5), norm=st.sampled_from(["batch", "act", "none"]))
def test_maf_reverses_the_ordering_and_normalises_between_layers(n_layers, norm):
    flow = R.maf_flow(3, n_layers, 8, norm)
    mades = [m for m in flow if isinstance(m, R.MaskedAutoregressive)]
    assert len(mades) == n_layers
    for k, m in enumerate(mades):
        with torch.no_grad():  # positive weights, small x: the Jacobian's pattern is the ordering's
            for p in m.parameters():
                p.uniform_(0.1, 0.5)
        J = torch.autograd.functional.jacobian(lambda v: m.made(v[None])[0][0], 1e-3 * torch.ones(3))
        order = [0, 1, 2] if k % 2 == 0 else [2, 1, 0]  # natural, reversed, natural, ...
        assert torch.equal(J != 0, torch.tensor([[order.index(j) < order.index(i) for j in range(3)]
                                                  for i in range(3)]))
    between = [type(layer) for layer in flow if not isinstance(layer, R.MaskedAutoregressive)]
    expected = {"batch": R.BatchNormFlow, "act": R.ActNorm, "none": None}[norm]
    assert between == ([expected] * (n_layers - 1) if expected else [])
    kinds = [isinstance(layer, R.MaskedAutoregressive) for layer in flow]
    assert kinds[0] and kinds[-1] and not any(a == b == False for a, b in zip(kinds, kinds[1:]))  # noqa: E712


@given(norm=st.sampled_from(["batch", "none"]), seed=st.integers(0, 10_000))
def test_maf_on_flattened_images_inverts_and_logdet_matches_jacobian(norm, seed):
    model = R.build(small_cfg(arch="maf", n_couplings=2, hidden=8, norm=norm), image_info(1, 2))
    model = randomize(model.double(), seed, std=0.3).eval()
    g = torch.Generator().manual_seed(seed)
    v = R.dequantize(torch.randint(17, (2, 1, 2, 2), generator=g).double(),
                     torch.rand(2, 1, 2, 2, generator=g, dtype=F64).clamp(0.01, 0.99))
    check_layer(model, v, tol=1e-8)
    assert isinstance(model.pre, R.LogitPreprocess)  # the same preprocessing as RealNVP: bits/dim compare
    roundtrip(model.body, torch.randn(2, 1, 2, 2, dtype=F64, generator=g))


@pytest.mark.parametrize("arch", ["glow", "maf"])
def test_new_flows_2d_density_integrates_to_one(arch):
    """Glow's steps (LU convolutions) and MAF (batch norm in evaluation mode) on R^2: the density
    integrates to one by quadrature, and it is far from the prior, so the check is not N(0, I)'s."""
    cfg = small_cfg(arch=arch, n_couplings=3, hidden=8, norm="act" if arch == "glow" else "batch",
                    conv1x1="lu" if arch == "glow" else "plain")
    model = randomize(R.build(cfg, POINTS), 0, std=0.3).double().eval()  # its mass inside the box
    check_normalised(model)
    base = R.standard_normal_log_prob(torch.zeros(1, 2, dtype=F64))
    assert abs(R.log_prob(model, torch.zeros(1, 2, dtype=F64)).item() - base.item()) > 0.05
    z = torch.randn(4, 2, dtype=F64)
    roundtrip(model, z)


def test_learning_rate_warms_up_linearly_then_stays():
    cfg = R.Config(lr=1e-3, warmup=4)
    assert [R.learning_rate(s, cfg) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert {R.learning_rate(s, R.Config(lr=1e-3)) for s in range(5)} == {1e-3}  # --warmup 0: constant


def test_cosine_decay_after_the_warm_up_halves_at_mid_course_and_ends_at_zero():
    """--decay cosine: lr (1 + cos(pi p)) / 2, p the fraction of the steps after the warm-up."""
    cfg = R.Config(lr=1e-3, warmup=4, steps=12, decay="cosine")
    rates = [R.learning_rate(s, cfg) for s in (0, 3, 4, 6, 8, 10, 12)]
    s2 = math.sqrt(2) / 2
    assert rates == pytest.approx([2.5e-4, 1e-3, 1e-3, 1e-3 * (1 + s2) / 2, 5e-4, 1e-3 * (1 - s2) / 2, 0], abs=1e-12)
    no_warmup = dataclasses.replace(cfg, warmup=0)
    assert R.learning_rate(2, no_warmup) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 6)) / 2)
    # --decay-steps fixes the horizon whatever --steps is (a run cut short follows the same rates)
    short = dataclasses.replace(cfg, steps=6, decay_steps=12)
    assert [R.learning_rate(s, short) for s in range(6)] == [R.learning_rate(s, cfg) for s in range(6)]
    assert R.learning_rate(20, short) == 0


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------

def single_process_only(*args, **kwargs):
    raise AssertionError("--eval and --sample run in one process: they never join a process group")


def test_cli_2d_end_to_end_eval_and_sample(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_main("realnvp", ["--dataset", "8gaussians", "--steps", "4", "--batch-size", "32", "--hidden", "8",
                         "--n-couplings", "2", "--out", str(out), "--log-every", "2"])
    for f in ("ckpt.pt", "samples_4.png", "density.png", "latent.png", "metrics.jsonl", "loss.png"):
        assert (out / f).exists(), f
    monkeypatch.setattr(common, "_init_distributed", single_process_only)  # issue 16: not even under torchrun
    fields = run_main("realnvp", ["--eval", str(out / "ckpt.pt"), "--out", str(out)])
    (ev,) = events(out, "eval")
    assert ev["split"] == "test" and math.isfinite(ev["nll"]) and ev["nll"] == fields["nll"]
    assert ev["nll"] > ev["true_entropy"] - 5 * ev["true_entropy_se"]  # no model beats the truth
    with np.load(out / "density.npz") as d:
        assert d["log_density"].shape == (128, 128) and float(d["lim"]) == 4.0
    run_main("realnvp", ["--sample", str(out / "ckpt.pt"), "--n-samples", "10", "--out", str(out)])
    assert (out / "samples.png").exists() and events(out, "sample")[0]["n"] == 10
    assert torch.load(out / "samples.pt", weights_only=True).shape == (10, 2)


def test_cli_digits_end_to_end_eval_and_sample(tmp_path, monkeypatch):
    out = tmp_path / "digits"
    run_main("realnvp", ["--dataset", "digits", "--steps", "2", "--batch-size", "8", "--n-blocks", "1",
                         "--n-features", "4", "--n-samples", "4", "--out", str(out)])
    for f in ("ckpt.pt", "samples_2.png", "latent.png", "loss.png"):
        assert (out / f).exists(), f
    monkeypatch.setattr(common, "_init_distributed", single_process_only)
    run_main("realnvp", ["--eval", str(out / "ckpt.pt")])
    (ev,) = events(out, "eval")
    assert ev["n"] == 300
    assert ev["bits_per_dim"] == pytest.approx(ev["nll"] / (64 * math.log(2)))
    run_main("realnvp", ["--sample", str(out / "ckpt.pt"), "--n-samples", "4"])
    assert (out / "samples.png").exists()
    samples = torch.load(out / "samples.pt", weights_only=True)
    assert samples.shape == (4, 1, 8, 8) and samples.dtype == torch.uint8 and int(samples.max()) <= 16


@pytest.mark.parametrize("arch,dataset,extra", [
    ("glow", "8gaussians", ["--hidden", "8", "--n-couplings", "2", "--conv1x1", "lu"]),
    ("glow", "digits", ["--n-features", "4", "--n-couplings", "1", "--n-scales", "2", "--n-samples", "4",
                        "--preprocess", "center"]),
    ("maf", "8gaussians", ["--hidden", "8", "--n-couplings", "2"]),
    ("maf", "digits", ["--hidden", "16", "--n-couplings", "2", "--n-samples", "4"]),
])
def test_cli_new_arch_end_to_end_eval_and_sample_without_repeating_the_flag(tmp_path, arch, dataset, extra):
    """--arch glow / maf train, and --eval and --sample on their checkpoints rebuild the same
    flow from the checkpoint alone (no --arch): the evaluated NLL is the saved flow's."""
    out = tmp_path / arch
    run_main("realnvp", ["--arch", arch, "--dataset", dataset, "--steps", "2", "--batch-size", "16", *extra,
                         "--out", out])
    ckpt = common.load_checkpoint(out / "ckpt.pt")
    assert ckpt["config"]["arch"] == arch
    net, saved, info = R.load(out / "ckpt.pt")
    assert saved.arch == arch and any(isinstance(m, R.MaskedAutoregressive if arch == "maf" else R.InvConv1x1)
                                      for m in net.modules())
    fields = run_main("realnvp", ["--eval", out / "ckpt.pt", "--out", out])
    (ev,) = events(out, "eval")
    assert math.isfinite(ev["nll"]) and ev["nll"] == fields["nll"]
    if info.kind == "image":
        assert ev["bits_per_dim"] == pytest.approx(ev["nll"] / (64 * math.log(2)))
    else:
        assert ev["nll"] > ev["true_entropy"] - 5 * ev["true_entropy_se"]
    run_main("realnvp", ["--sample", out / "ckpt.pt", "--n-samples", "3", "--out", out])
    samples = torch.load(out / "samples.pt", weights_only=True)
    assert samples.shape == (3, *info.shape) and events(out, "sample")[0]["n"] == 3


def test_arch_presets_replace_the_presets_and_cifar10_glow_follows_the_paper():
    cfg = common.parse_config(R.Config, R.PRESETS, ["--arch", "glow", "--dataset", "cifar10"],
                              arch_presets=R.ARCH_PRESETS)
    assert (cfg.n_couplings, cfg.n_scales, cfg.n_features, cfg.norm, cfg.coupling) == (32, 3, 512, "act", "affine")
    assert (cfg.batch_size, cfg.lr, cfg.preprocess) == (512, 1e-3, "center")
    assert isinstance(R.build(dataclasses.replace(cfg, n_couplings=1, n_features=4), common.DataInfo(
        "cifar10", "image", (3, 32, 32), levels=256)).pre, R.CenterPreprocess)
    glow_digits = common.parse_config(R.Config, R.PRESETS, ["--arch", "glow", "--dataset", "digits"],
                                      arch_presets=R.ARCH_PRESETS)
    assert glow_digits.preprocess == "logit" and isinstance(R.build(glow_digits, image_info(1, 8)).pre,
                                                             R.LogitPreprocess)
    maf = common.parse_config(R.Config, R.PRESETS, ["--arch", "maf", "--dataset", "digits"],
                              arch_presets=R.ARCH_PRESETS)
    assert maf.norm == "batch" and maf.l2 == 0.0
    default = common.parse_config(R.Config, R.PRESETS, ["--dataset", "digits"], arch_presets=R.ARCH_PRESETS)
    assert default.arch == "realnvp" and default.n_blocks == R.PRESETS["digits"]["n_blocks"]


@pytest.mark.parametrize("argv,start", [
    (["--arch", "glow", "--norm", "batch"], "error: --norm batch with --arch glow"),
    (["--arch", "maf", "--coupling", "additive"], "error: --coupling additive with --arch maf"),
    (["--conv1x1", "lu"], "error: --conv1x1 lu is Glow's"),
    (["--arch", "maf", "--dataset", "digits", "--l2", "5e-05"], "error: --l2 5e-05 acts on RealNVP's"),
    (["--arch", "flow++"], "error: argument --arch: invalid choice: 'flow++' (choose from 'realnvp', 'glow', 'maf')"),
    (["--warmup", "-1"], "error: --warmup -1 is out of range"),
    (["--preprocess", "center"], "error: --preprocess center is for images"),
    (["--arch", "glow", "--dataset", "digits", "--n-scales", "4"], "error: --n-scales 4 does not fit 8x8"),
])
def test_new_flags_refuse_nonsense_in_one_line(tmp_path, capsys, argv, start):
    with pytest.raises(SystemExit) as e:
        run_main("realnvp", [*argv, "--steps", "1", "--out", tmp_path / "never"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and start in err and "\n" not in err, err


def params(path):
    return common.load_checkpoint(path)["model"]


@pytest.mark.parametrize("argv", [
    # test_cli.py's resume test runs the default (8gaussians, ActNorm); these add batch statistics
    # on images, Glow's warm-up and LU convolution, and MAF's batch norm between MADE layers
    ["--dataset", "digits", "--n-blocks", "1", "--n-features", "4", "--batch-size", "4", "--n-samples", "4"],
    ["--arch", "glow", "--hidden", "8", "--n-couplings", "2", "--batch-size", "16", "--warmup", "3", "--conv1x1", "lu"],
    ["--arch", "maf", "--hidden", "8", "--n-couplings", "2", "--batch-size", "16"],
])
def test_resume_equals_uninterrupted_run(tmp_path, argv):
    a, b = tmp_path / "a", tmp_path / "b"
    argv = argv + ["--save-every", "2"]  # pictures in the middle of the run must not change it
    run_main("realnvp", argv + ["--steps", "4", "--out", a])
    run_main("realnvp", argv + ["--steps", "2", "--out", b])
    run_main("realnvp", argv + ["--steps", "4", "--out", b, "--resume"])
    pa, pb = params(a / "ckpt.pt"), params(b / "ckpt.pt")
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def test_user_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main("realnvp", ["--dataset", "digits", "--n-scales", "5", "--steps", "1", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --n-scales 5") and "\n" not in err
    with pytest.raises(SystemExit):
        run_main("realnvp", ["--dataset", "shakespeare", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        run_main("realnvp", ["--eval", str(tmp_path / "missing.pt")])
    # the model's own flags are checked before anything is written (check_config)
    for flag, value in [("--alpha", "0.5"), ("--temperature", "0.0"), ("--n-couplings", "0"), ("--l2", "-1.0")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run_main("realnvp", [flag, value, "--steps", "1", "--out", str(tmp_path / "never")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith(f"error: {flag} {value} is out of range") and "\n" not in err
        assert not (tmp_path / "never").exists()


def test_torchrun_two_processes_equal_one_process(tmp_path):
    """DistributedDataParallel over 2 CPU processes (gloo) on slices of the same global batch
    gives the parameters of one process on the whole batch (no batch statistics: --norm none)."""
    argv = ["--dataset", "8gaussians", "--steps", "3", "--norm", "none", "--hidden", "8", "--n-couplings", "2",
            "--batch-size", "32"]
    r = torchrun("realnvp", argv + ["--out", tmp_path / "ddp"])
    assert r.returncode == 0, r.stderr[-2000:]
    run_main("realnvp", argv + ["--out", str(tmp_path / "one")])
    pa, pb = params(tmp_path / "ddp" / "ckpt.pt"), params(tmp_path / "one" / "ckpt.pt")
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# the mathematics and the networks alone
# ----------------------------------------------------------------------------------------

def test_mathematics_runs_without_common(without_common):
    """The couplings, masks, squeeze, normalisation layers, the logit preprocessing, the 2D and the
    multi-scale flow with their networks, the likelihood, its gradient and the sampler run from the
    file's first half alone (common.py replaced by a module whose every name fails)."""
    m = without_common("realnvp")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    # the 2D flow: ActNorm initialised from data, then forward/inverse and log-det against autograd
    flow = m.RealNVP(m.point_flow(2, 4, lambda mask: m.MLP(2, 8), affine=True, norm="act"), (2,)).double()
    x = 2 * torch.randn(6, 2, dtype=F64, generator=g)
    m.initialize_actnorm(flow, iter([(x, None)]))
    assert all(bool(a.initialized) for a in flow.modules() if isinstance(a, m.ActNorm))
    flow = randomize(flow, 1).eval()
    check_layer(flow, x[:3])
    torch.testing.assert_close(m.nll(flow, x), -m.log_prob(flow, x))
    z, log_det = flow(x)
    torch.testing.assert_close(m.log_prob(flow, x), m.change_of_variables(m.standard_normal_log_prob(z), log_det))
    flow.train()
    m.nll(flow, x).mean().backward()
    assert all(p.grad is not None for p in flow.parameters())
    assert flow.sample(5).shape == (5, 2) and flow.training
    # a two-scale image flow with its ResNets and the logit preprocessing: forward/inverse, log-det
    images = m.RealNVP(m.Scale((1, 4, 4), 2, lambda mask: m.ResNet(mask, 4, 1), affine=True, norm="batch"),
                       (1, 4, 4), levels=17, alpha=0.05).double()
    images = randomize(images, 2, std=0.2).eval()
    levels = torch.randint(17, (2, 1, 4, 4), generator=g).to(torch.uint8)
    u = torch.rand(2, 1, 4, 4, generator=g, dtype=F64).clamp(0.01, 0.99)
    v = m.dequantize(levels.double(), u)
    check_layer(images, v, tol=1e-8)
    check_layer(m.LogitPreprocess(17, 0.05), v, tol=1e-8)
    assert torch.equal(m.quantize(v, 17), levels)
    nats = m.nll(images, levels, discrete=True, u=u)
    torch.testing.assert_close(nats, -m.log_prob(images, v))
    assert m.bits_per_dim(nats.mean().item(), 16) == pytest.approx(nats.mean().item() / (16 * math.log(2)))
    assert torch.isfinite(m.scale_weight_penalty(images))
    samples = images.sample(3, temperature=0.8)
    assert samples.shape == (3, 1, 4, 4) and samples.dtype == torch.uint8 and int(samples.max()) <= 16
    with pytest.raises(ValueError):
        m.LogitPreprocess(17, 0.5)
    with pytest.raises(ValueError):
        m.Scale((1, 6, 6), 3, lambda mask: m.ResNet(mask, 4, 1))
    with pytest.raises(ValueError):
        m.norm_layer("group", 2)
    # Glow: levels of ActNorm, LU 1x1 convolutions and couplings with the networks of its section
    # and the split priors, its centring; sampled at a temperature
    glow = m.RealNVP(m.GlowLevel((1, 4, 4), 2, 1, lambda i, o: m.GlowNet(i, o, 4),
                                 lambda i, o: m.zero_layer(torch.nn.Conv2d(i, o, 3, padding=1)), lu=True),
                     (1, 4, 4), levels=17, pre=m.CenterPreprocess(17)).double()
    m.initialize_actnorm(glow, iter([(levels.double(), None)]), discrete=True)
    glow = randomize(glow, 3, std=0.1).eval()
    check_layer(glow, v, tol=1e-8)
    assert glow.sample(2, temperature=0.7).shape == (2, 1, 4, 4)
    points = m.RealNVP(m.glow_point_flow(2, 2, lambda i, o: m.GlowNet(i, o, 4, image=False)), (2,)).double()
    check_layer(randomize(points, 4, std=0.3).eval(), x[:2])
    # MAF: MADE layers with batch norm between them, on points and on flattened images
    maf = m.RealNVP(m.maf_flow(2, 3, 8, norm="batch"), (2,)).double()
    maf.train()
    m.nll(maf, x).mean().backward()
    maf = randomize(maf, 5, std=0.3).eval()
    check_layer(maf, x[:2])
    assert maf.sample(4).shape == (4, 2)
    flat = m.RealNVP(m.Flattened(m.maf_flow(16, 2, 16)), (1, 4, 4), levels=17).double()
    check_layer(randomize(flat, 6, std=0.1).eval(), v, tol=1e-8)
    with pytest.raises(ValueError):
        m.GlowLevel((1, 6, 6), 2, 1, lambda i, o: m.GlowNet(i, o, 4), lambda i, o: m.GlowNet(i, o, 4))
