"""Tests of pixelcnn.py: each identity is checked against an independent computation.

Causality and the blind spot by autograd; the likelihoods against scipy's logistic CDF, against
mpmath in the far tails, and by enumerating every value of a pixel; the sampler against oracles
with known conditionals (Markov chains along the raster order) and against the naive sampler;
the 2D points' density by summing it over every bin; the presets' parameter counts against hand
formulas; the command line end to end on digits and on 8gaussians. Monte-Carlo checks use a
fixed seed and a tolerance of Z = 5 standard errors.
"""
import dataclasses
import functools
import itertools
import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy import stats

import common
import pixelcnn as P
from conftest import events

f64 = torch.float64
Z = 5.0  # standard errors allowed by Monte-Carlo checks
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)


def tiny(arch, colors=1, levels=4, num_classes=0, seed=0, **kw):
    """A small float64 network in eval mode (its default initialisation: random, non-trivial)."""
    torch.manual_seed(seed)
    if arch == "pixelcnn":
        m = P.PixelCNN(colors, levels, **{**dict(h=6, n_blocks=2, out_hidden=12), **kw}, num_classes=num_classes)
    elif arch == "gated":
        m = P.GatedPixelCNN(colors, levels, **{**dict(p=6, n_layers=3, out_hidden=12), **kw},
                            num_classes=num_classes)
    elif arch == "rowlstm":
        m = P.RowLSTM(colors, levels, **{**dict(h=4, n_layers=2, out_hidden=12), **kw}, num_classes=num_classes)
    elif arch == "diagonal-bilstm":
        m = P.DiagonalBiLSTM(colors, levels, **{**dict(h=4, n_layers=2, out_hidden=12), **kw},
                             num_classes=num_classes)
    else:
        m = P.PixelCNNpp(colors, **{**dict(nr_filters=8, nr_resnet=1, n_mix=2, dropout=0.0), **kw},
                         num_classes=num_classes)
    if arch != "pixelcnn++":
        with torch.no_grad():  # positive biases keep the ReLUs of these small nets alive: a zero
            for mod in m.modules():  # gradient is then a structural zero, not a dead unit
                if isinstance(mod, P.MaskedConv2d):
                    mod.bias.add_(1.0)
    return m.double().eval()


ARCHS = ("pixelcnn", "gated", "pixelcnn++", "rowlstm", "diagonal-bilstm")
RNNS = ("rowlstm", "diagonal-bilstm")


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------

@SETTINGS
@given(kh=st.integers(1, 5), kw=st.integers(1, 5), c_in=st.integers(1, 7), c_out=st.integers(1, 7),
       colors=st.sampled_from([1, 3]), mask_type=st.sampled_from("AB"), data=st.data())
def test_causal_mask_keeps_exactly_the_raster_earlier_taps_and_colour_order(kh, kw, c_in, c_out, colors,
                                                                             mask_type, data):
    ci, cj = data.draw(st.integers(0, kh - 1)), data.draw(st.integers(0, kw - 1))
    mask = P.causal_mask(c_out, c_in, kh, kw, (ci, cj), mask_type, colors)
    # independently: map o of n belongs to colour floor(o * colors / n) (R first), a tap is kept
    # if it is earlier in raster order, and at the centre if the input colour comes earlier
    # (mask A) or is the same or earlier (mask B)
    for o, i, r, s in itertools.product(range(c_out), range(c_in), range(kh), range(kw)):
        g_o, g_i = (o * colors) // c_out, (i * colors) // c_in
        if (r, s) < (ci, cj):
            keep = True
        elif (r, s) == (ci, cj):
            keep = g_i < g_o if mask_type == "A" else g_i <= g_o
        else:
            keep = False
        assert mask[o, i, r, s].item() == float(keep), (o, i, r, s)


@pytest.mark.parametrize("mask_type", "AB")
def test_masked_conv_sees_earlier_pixels_and_earlier_colours_only(mask_type):
    torch.manual_seed(0)
    conv = P.MaskedConv2d(3, 6, 5, mask_type, colors=3).double()   # inputs R, G, B; outputs 2 per colour
    H, W, i, j = 7, 7, 3, 3
    for c in range(3):  # output maps 2c, 2c + 1 are of colour c
        x = torch.randn(2, 3, H, W, dtype=f64, requires_grad=True)
        conv(x)[:, 2 * c:2 * c + 2, i, j].sum().backward()
        g = x.grad.abs().sum(0)                                  # (3, H, W)
        later = torch.arange(H * W).view(H, W) > i * W + j
        assert (g[:, later] == 0).all()
        seen = [cc for cc in range(3) if (cc < c if mask_type == "A" else cc <= c)]
        for cc in range(3):
            assert (g[cc, i, j] != 0) == (cc in seen), (c, cc)
        assert (g[:, i, j - 1] != 0).all() and (g[:, i - 1, j + 2] != 0).all()  # earlier pixels, every colour


# ----------------------------------------------------------------------------------------------
# Causality of every architecture, by autograd
# ----------------------------------------------------------------------------------------------

def dependency(model, x, i, j, channels, y=None):
    """|d out[:, channels, i, j] / d x| summed over the batch: (C, H, W)."""
    x = x.clone().requires_grad_(True)
    model(x, y)[:, channels, i, j].sum().backward()
    return x.grad.abs().sum(0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("colors", [1, 3])
def test_no_output_depends_on_a_later_subpixel(arch, colors):
    L, H, W = (4, 5, 6) if arch in RNNS else (4, 8, 8)  # the LSTMs: a smaller image, the same cases
    model = tiny(arch, colors, L, num_classes=3)
    mixture = model.likelihood == "mixture"
    g = torch.Generator().manual_seed(1)
    x = 2 * torch.rand(8, colors, H, W, generator=g, dtype=f64) - 1  # 8 inputs: no dead-ReLU luck
    y = torch.tensor([0, 2] * 4)
    out_channels = model(x, y).shape[1]
    assert out_channels == (P.mixture_channels(colors, 2) if mixture else colors * L)
    groups = [range(out_channels)] if mixture else [range(c * L, (c + 1) * L) for c in range(colors)]
    raster = torch.arange(H * W).view(H, W)
    for i, j in itertools.product(range(H), range(W)):
        for c, chans in enumerate(groups):  # the mixture's output serves the whole pixel
            dep = dependency(model, x, i, j, list(chans), y)
            assert (dep[:, raster > i * W + j] == 0).all(), (i, j, c)
            # the same pixel: the softmax of channel c sees channels < c (mask A then B), the mixture none
            for cc in range(colors):
                allowed = (not mixture) and cc < c
                assert (dep[cc, i, j] != 0) == allowed, (i, j, c, cc)
            if j > 0:
                assert (dep[:, i, j - 1] != 0).all()  # and it does see the pixel before


def receptive_field_of_the_plain_stack(first_kernel, n_blocks, k):
    """The offsets (dr, dc) an output of the plain stack can see, by composing the masks'
    supports (a Minkowski sum): mask A k0 x k0, then n_blocks mask-B k x k (1x1 layers and the
    residual add only (0, 0), which mask B contains)."""
    def support(kk, mask_type):
        h = kk // 2
        return {(dr, dc) for dr in range(-h, 1) for dc in range(-h, h + 1)
                if dr < 0 or dc < 0 or (mask_type == "B" and dc == 0)}
    reach = support(first_kernel, "A")
    for _ in range(n_blocks):
        reach = {(a + c, b + d) for a, b in reach for c, d in support(k, "B")}
    return reach


def test_plain_stack_has_a_blind_spot_inside_its_field():
    n_blocks, H, W, i, j = 2, 13, 13, 12, 6
    model = tiny("pixelcnn", 1, 4, h=8, n_blocks=n_blocks)
    R = model.field_rows
    assert R == 3 + n_blocks
    x = 2 * torch.rand(16, 1, H, W, generator=torch.Generator().manual_seed(0), dtype=f64) - 1
    seen = dependency(model, x, i, j, slice(None))[0] != 0  # union over 16 inputs: no dead-ReLU luck
    reach = receptive_field_of_the_plain_stack(7, n_blocks, 3)
    expect = torch.zeros(H, W, dtype=torch.bool)
    for dr, dc in reach:
        expect[i + dr, j + dc] = True
    assert torch.equal(seen, expect)
    # the nominal field: earlier pixels within R rows above and R columns either side
    nominal = {(dr, dc) for dr in range(-R, 1) for dc in range(-R, R + 1) if dr < 0 or dc < 0}
    blind = nominal - reach
    assert blind and all(dc > 0 for _, dc in blind)  # up and to the right
    assert (-1, 4) in blind and not seen[i - 1, j + 4]


def test_gated_stacks_see_every_earlier_pixel_of_their_field():
    n_layers, H, W, i, j = 3, 13, 13, 12, 6
    model = tiny("gated", 1, 4, p=4, n_layers=n_layers)
    R = model.field_rows
    assert R == 3 + (n_layers - 1)
    x = 2 * torch.rand(2, 1, H, W, generator=torch.Generator().manual_seed(0), dtype=f64) - 1
    seen = dependency(model, x, i, j, slice(None))[0] != 0
    expect = torch.zeros(H, W, dtype=torch.bool)
    for dr, dc in itertools.product(range(-R, 1), range(-R, R + 1)):
        if dr < 0 or dc < 0:
            expect[i + dr, j + dc] = True
    assert torch.equal(seen, expect)  # the whole causal square: no blind spot, nothing outside


def row_lstm_field(H, W, first_kernel, n_layers, k):
    """The pixels each output of the Row LSTM depends on, by composing its dependencies (Eq. 3)
    row by row: the mask-A k0 x k0 layer; then per layer h(r, c) <- the layer's input at (r, c' in
    c - k // 2 .. c) (mask B over the row) and h(r - 1, c' in c - k // 2 .. c + k // 2) (its c
    is elementwise, with the same dependencies as h); the residual adds the input at (r, c).
    Returns {(r, c): set of (r', c')}."""
    h0 = first_kernel // 2
    dep = {(r, c): {(r + dr, c + dc) for dr in range(-h0, 1) for dc in range(-h0, h0 + 1)
                    if (dr < 0 or dc < 0) and 0 <= r + dr < H and 0 <= c + dc < W}
           for r in range(H) for c in range(W)}
    for _ in range(n_layers):
        hid = {}
        for r in range(H):
            for c in range(W):
                s = set().union(*(dep[r, cc] for cc in range(max(0, c - k // 2), c + 1)))
                if r:
                    s |= set().union(*(hid[r - 1, cc] for cc in range(max(0, c - k // 2), min(W, c + k // 2 + 1))))
                hid[r, c] = s
        dep = {rc: dep[rc] | hid[rc] for rc in dep}
    return dep


def test_row_lstm_field_is_the_triangle_of_its_recurrence_and_misses_earlier_pixels():
    """PixelRNN Sec. 3.1, Fig. 4: the Row LSTM's receptive field is triangular and does not
    capture the entire available context."""
    H, W, n_layers = 6, 16, 2
    model = tiny("rowlstm", 1, 4, h=4, n_layers=n_layers)
    field = row_lstm_field(H, W, 7, n_layers, 3)
    x = 2 * torch.rand(8, 1, H, W, generator=torch.Generator().manual_seed(0), dtype=f64) - 1
    raster = torch.arange(H * W).view(H, W)
    for i, j in [(5, 8), (5, 1), (2, 14), (0, 10)]:
        seen = dependency(model, x, i, j, slice(None))[0] != 0
        expect = torch.zeros(H, W, dtype=torch.bool)
        for r, c in field[i, j]:
            expect[r, c] = True
        assert torch.equal(seen, expect), (i, j)
    # the triangle (k = 3): d rows up it spans columns j - k0 // 2 - n_layers - d .. j + k0 // 2 + d - 1,
    # on the pixel's row j - k0 // 2 - n_layers .. j - 1; every earlier pixel outside it is missed
    i, j = 5, 8
    seen = dependency(model, x, i, j, slice(None))[0] != 0
    cols = torch.arange(W)
    for d in range(0, i + 1):
        right = j - 1 if d == 0 else j + 3 + d - 1
        assert torch.equal(seen[i - d], (cols >= j - 3 - n_layers - d) & (cols <= right)), d
    missed = (raster < i * W + j) & ~seen
    assert missed[i - 1, j + 4:].all() and missed[i, :j - 3 - n_layers].all() and missed.sum() == 16


def test_diagonal_bilstm_layer_sees_every_earlier_position():
    """PixelRNN Sec. 3.2, Fig. 4: one Diagonal BiLSTM layer's output at (i, j) depends on its
    input at every position up to (i, j) in raster order (its own by mask B), and at no later one."""
    layer = tiny("diagonal-bilstm", 1, 4, h=4, n_layers=1).blocks[0]
    H, W = 5, 6
    x = torch.randn(3, 8, H, W, generator=torch.Generator().manual_seed(0), dtype=f64)
    raster = torch.arange(H * W).view(H, W)
    for i, j in itertools.product(range(H), range(W)):
        seen = (dependency(lambda v, y: layer(v) - v, x, i, j, slice(None)) != 0).any(0)  # the LSTM branch
        assert torch.equal(seen, raster <= i * W + j), (i, j)


@pytest.mark.parametrize("colors", [1, 3])
def test_diagonal_bilstm_field_is_every_earlier_pixel(colors):
    """PixelRNN Sec. 3.2, Fig. 4: the Diagonal BiLSTM sees the whole available context, and nothing
    later (own and later colour channels: test_no_output_depends_on_a_later_subpixel), but for one
    sub-pixel that no network with a mask-A first layer can see: the last sub-pixel of the row
    above, when it lies beyond the first layer's k0 // 2 columns (it enters the network at
    positions after (i, j) only)."""
    H, W, k0 = 5, 7, 3
    model = tiny("diagonal-bilstm", colors, 4, h=4, n_layers=2, first_kernel=k0)
    x = 2 * torch.rand(4, colors, H, W, generator=torch.Generator().manual_seed(0), dtype=f64) - 1
    raster = torch.arange(H * W).view(H, W)
    for i, j in itertools.product(range(H), range(W)):
        seen = dependency(model, x, i, j, slice(0, 4)) != 0  # the first channel's logits: (C, H, W)
        expect = (raster < i * W + j).expand(colors, H, W).clone()
        if i > 0 and j + k0 // 2 < W - 1:
            expect[colors - 1, i - 1, W - 1] = False
        assert torch.equal(seen, expect), (i, j)


@SETTINGS
@given(B=st.integers(1, 2), C=st.integers(1, 3), H=st.integers(1, 6), W=st.integers(1, 6), seed=st.integers(0, 99))
def test_skew_moves_row_r_right_by_r_and_unskew_inverts_it(B, C, H, W, seed):
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed), dtype=f64)
    s = P.skew(x)
    expect = torch.zeros(B, C, H, W + H - 1, dtype=f64)
    for r in range(H):  # Fig. 3: row r starts at column r, zeros elsewhere
        expect[:, :, r, r:r + W] = x[:, :, r]
    assert torch.equal(s, expect)
    assert torch.equal(P.unskew(s, W), x)


def test_diagonal_lstm_column_state_follows_left_and_upper_neighbours():
    """One direction, on the skewed map: the state at (r, c) depends on the gates at (r', c')
    with r' <= r and c' <= c, every one of them; the mirrored direction before its one-row shift
    would see (r, c + 1), the future, which the shift removes."""
    torch.manual_seed(0)
    lstm = P.DiagonalLSTM(3).double()
    H, W, i, j = 5, 6, 3, 2
    gates = torch.randn(2, 12, H, W, dtype=f64, requires_grad=True)
    lstm(gates)[:, :, i, j].sum().backward()
    seen = gates.grad.abs().sum((0, 1)) != 0
    rows, cols = torch.arange(H)[:, None], torch.arange(W)[None, :]
    assert torch.equal(seen, (rows <= i) & (cols <= j))
    layer = tiny("diagonal-bilstm", 1, 4, h=4, n_layers=1).blocks[0]
    x = torch.randn(2, 8, H, W, dtype=f64, requires_grad=True)
    mirrored = layer.lstm[1](layer.input_to_state[1](x.flip(3))).flip(3)
    mirrored[:, :, i, j].sum().backward()
    assert (x.grad[:, :, i, j + 1] != 0).any()          # unshifted, it would see the next pixel
    x.grad = None
    mirrored = layer.lstm[1](layer.input_to_state[1](x.flip(3))).flip(3)
    P.down_shift(mirrored)[:, :, i, j].sum().backward()
    g = x.grad.abs().sum((0, 1)) != 0
    assert torch.equal(g, (rows < i) & (cols >= j))     # shifted: rows above, columns >= c


@pytest.mark.parametrize("H,num_classes", [(1, 0), (5, 0), (4, 3)])
def test_bilstm_layer_is_both_full_directions_with_the_mirrored_one_shifted_down(H, num_classes):
    """The layer runs its mirrored direction on the rows the shift keeps (rows 0 .. H - 2): the same
    output as both directions run on the whole image, the mirrored one then shifted down a row."""
    layer = tiny("diagonal-bilstm", 1, 4, num_classes=num_classes, h=4, n_layers=1).blocks[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, H, 5, generator=g, dtype=f64)
    y = torch.tensor([0, 2]) if num_classes else None
    bias = P._label_bias(layer.cond, y)
    b_lr, b_rl = bias.chunk(2, dim=1) if torch.is_tensor(bias) else (bias, bias)
    left_to_right = layer.lstm[0](layer.input_to_state[0](x) + b_lr)
    right_to_left = layer.lstm[1](layer.input_to_state[1](x.flip(3)) + b_rl).flip(3)
    expect = x + layer.out(left_to_right + P.down_shift(right_to_left))
    torch.testing.assert_close(layer(x, y), expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch,colors", [("rowlstm", 3), ("diagonal-bilstm", 3), ("diagonal-bilstm", 1)])
def test_every_value_of_one_pixel_has_total_probability_one(arch, colors):
    """sum over the L^C values v of a pixel of prod_c p(v_c | v_<c, earlier pixels) = 1, the
    earlier pixels fixed and the later ones arbitrary (each value scored by its own network pass)."""
    L, H, W, i, j = 3, 4, 5, 2, 3
    model = tiny(arch, colors, L)
    base = torch.randint(0, L, (1, colors, H, W), generator=torch.Generator().manual_seed(1))
    values = torch.tensor(list(itertools.product(range(L), repeat=colors)))
    x = base.repeat(len(values), 1, 1, 1)
    x[:, :, i, j] = values
    x[:, :, i, j + 1:] = torch.randint(0, L, x[:, :, i, j + 1:].shape, generator=torch.Generator().manual_seed(2))
    x[:, :, i + 1:] = torch.randint(0, L, x[:, :, i + 1:].shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        lp = P.log_prob(model(P.bin_centre(x.double(), L)), x, L, "categorical")[:, :, i, j].sum(1)
    assert torch.logsumexp(lp, 0).item() == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Likelihoods: normalised over the levels, exact in the tails
# ----------------------------------------------------------------------------------------------

@SETTINGS
@given(C=st.sampled_from([1, 3]), L=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_categorical_is_the_softmax_of_each_subpixels_logits(C, L, seed):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(1, C * L, 2, 2, generator=g, dtype=f64)
    for c, level in itertools.product(range(C), range(L)):
        x = torch.full((1, C, 2, 2), level)
        lp = P.categorical_log_prob(logits, x)[0, c].numpy()
        z = logits[0, c * L:(c + 1) * L].numpy()                    # (L, 2, 2)
        expect = z[level] - np.log(np.exp(z).sum(0))
        np.testing.assert_allclose(lp, expect, rtol=1e-12, atol=1e-12)
    every = torch.stack([P.categorical_log_prob(logits, torch.full((1, C, 2, 2), l)) for l in range(L)])
    torch.testing.assert_close(every.exp().sum(0), torch.ones(1, C, 2, 2, dtype=f64))


@SETTINGS
@given(L=st.sampled_from([2, 3, 17, 256]), mean=st.floats(-1.5, 1.5), log_scale=st.floats(-7, 2))
def test_discretized_logistic_is_a_difference_of_logistic_cdfs(L, mean, log_scale):
    x = torch.arange(L)
    lp = P.discretized_logistic_log_prob(x, torch.full((L,), mean, dtype=f64),
                                         torch.full((L,), log_scale, dtype=f64), L)
    # scipy: P(x = l) = F(c_l + d) - F(c_l - d), first bin from -inf, last to +inf
    c, d = 2 * np.arange(L) / (L - 1) - 1, 1 / (L - 1)
    upper = np.where(np.arange(L) == L - 1, np.inf, c + d)
    lower = np.where(np.arange(L) == 0, -np.inf, c - d)
    s = math.exp(log_scale)
    p = stats.logistic.cdf(upper, mean, s) - stats.logistic.cdf(lower, mean, s)
    np.testing.assert_allclose(lp.exp().numpy(), p, rtol=1e-9, atol=1e-15)
    assert torch.logsumexp(lp, 0).item() == pytest.approx(0.0, abs=1e-12)


def mp_log_bin(level, mean, log_scale, L):
    """log P(level) in 50-digit arithmetic from the very float values given: a difference of
    logistic CDFs, or of survival functions right of the mean, so that nothing cancels."""
    with mpmath.workdps(50):
        d, m = mpmath.mpf(1) / (L - 1), mpmath.mpf(mean)
        c, s = 2 * mpmath.mpf(level) / (L - 1) - 1, mpmath.exp(mpmath.mpf(log_scale))
        cdf = lambda t: 1 / (1 + mpmath.exp(-(t - m) / s))
        sf = lambda t: 1 / (1 + mpmath.exp((t - m) / s))
        if c - d > m:
            return float(mpmath.log(sf(c - d) - (0 if level == L - 1 else sf(c + d))))
        return float(mpmath.log((1 if level == L - 1 else cdf(c + d)) - (0 if level == 0 else cdf(c - d))))


@functools.lru_cache(maxsize=None)
def mp_log_bins(mean, log_scale, L):
    return np.array([mp_log_bin(level, mean, log_scale, L) for level in range(L)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_discretized_logistic_keeps_relative_precision_in_the_far_tails(dtype):
    L, eps = 256, torch.finfo(dtype).eps
    levels = torch.arange(L)
    worst, naive_worst = 0.0, 0.0
    # values exact in float32 and float64, so one 50-digit reference serves both precisions
    for mean, log_scale in itertools.product([-1.0, -0.3125, 0.5, 1.0], [-7.0, -4.5, -2.0, 1.5]):
        m, ls = torch.tensor(mean, dtype=dtype), torch.tensor(log_scale, dtype=dtype)
        lp = P.discretized_logistic_log_prob(levels, m.expand(L), ls.expand(L), L)
        ref = mp_log_bins(mean, log_scale, L)
        assert np.isfinite(ref).all() and ref.min() < -1000 if log_scale == -7.0 else True  # far tails
        # The problem's own conditioning: forming a = (c + d - mean) / s in working precision errs by
        # ~eps (1 + |c| + |mean|) / s, and d log P / d a is O(1) everywhere (log P ~ a in the left
        # tail, ~ -b in the right). An error of a few eps times that scale is "relatively accurate";
        # for a bin far in a tail the scale is ~|log P|, i.e. P itself to relative ~eps |log P|.
        c = 2 * np.arange(L) / (L - 1) - 1
        scale = eps * (1 + (1 + np.abs(c) + abs(m.item())) / math.exp(ls.item()))
        worst = max(worst, (np.abs(lp.double().numpy() - ref) / scale).max())
        # the plain formula log(sigmoid(a) - sigmoid(b)) in the same precision, for contrast
        cc, d, s = P.bin_centre(levels.to(dtype), L), 1 / (L - 1), torch.exp(ls)
        naive = torch.log(torch.sigmoid((cc + d - m) / s) - torch.sigmoid((cc - d - m) / s))[1:-1]
        naive_err = np.abs(naive.double().numpy() - ref[1:-1]) / scale[1:-1]
        naive_worst = max(naive_worst, np.nan_to_num(naive_err, nan=np.inf).max())
    assert worst < 8, worst
    assert naive_worst > 1e3  # it underflows or cancels: this test catches the plain formula


def random_mixture_output(C, K, n=1, seed=0, spatial=()):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(n, P.mixture_channels(C, K), *spatial, generator=g, dtype=f64)
    out[:, K + C * K:K + 2 * C * K] = -1.5 + 0.7 * out[:, K + C * K:K + 2 * C * K]  # log-scales near e^-1.5
    return out


def brute_force_pixel_prob(out, value, L):
    """P(pixel = value) for a mixture output (P,) by the layout of unpack_mixture's docstring,
    with scipy's logistic CDF: sum_k pi_k prod_c [F(c_v + d) - F(c_v - d)], edges open."""
    C = len(value)
    K = len(out) // P.mixture_channels(C, 1)
    o = out.numpy()
    pi = np.exp(o[:K] - o[:K].max())
    pi /= pi.sum()
    mean = o[K:K + C * K].reshape(C, K)
    log_s = np.maximum(o[K + C * K:K + 2 * C * K].reshape(C, K), P.LOG_SCALE_MIN)
    coeff = np.tanh(o[K + 2 * C * K:]).reshape(-1, K)
    cen = [2 * v / (L - 1) - 1 for v in value]
    d, total = 1 / (L - 1), 0.0
    for k in range(K):
        prob = pi[k]
        for c in range(C):
            m = mean[c, k] + sum(coeff[c * (c - 1) // 2 + c2, k] * cen[c2] for c2 in range(c))
            hi = 1.0 if value[c] == L - 1 else stats.logistic.cdf(cen[c] + d, m, math.exp(log_s[c, k]))
            lo = 0.0 if value[c] == 0 else stats.logistic.cdf(cen[c] - d, m, math.exp(log_s[c, k]))
            prob *= hi - lo
        total += prob
    return total


@pytest.mark.parametrize("C,L,K", [(3, 4, 3), (1, 5, 2), (2, 3, 4)])
def test_mixture_is_normalised_over_every_joint_pixel_value(C, L, K):
    out = random_mixture_output(C, K, seed=C + L)
    values = torch.tensor(list(itertools.product(range(L), repeat=C)))          # (L^C, C)
    x = values.view(-1, C, 1, 1)
    terms = P.logistic_mixture_log_prob(out.view(1, -1, 1, 1).expand(len(values), -1, 1, 1), x, L)[..., 0, 0]
    joint = terms.sum(1)                                                        # log P(pixel)
    assert torch.logsumexp(joint, 0).item() == pytest.approx(0.0, abs=1e-12)
    brute = np.array([brute_force_pixel_prob(out[0], tuple(v.tolist()), L) for v in values])
    np.testing.assert_allclose(joint.exp().numpy(), brute, rtol=1e-9, atol=1e-15)
    # every per-sub-pixel term is a distribution over its L levels, given the earlier channels
    t = terms.view(*([L] * C), C)
    for c in range(C):
        mass = torch.logsumexp(t[..., c], dim=c)   # sum over channel c's level, the earlier ones fixed
        torch.testing.assert_close(mass, torch.zeros_like(mass), atol=1e-12, rtol=0)


def test_mixture_means_follow_the_earlier_channels_linearly():
    # one component, unit coefficients (tanh^-1 of 0.5): the mean of G moves by 0.5 * (value of R)
    C, K, L = 3, 1, 9
    out = torch.zeros(1, P.mixture_channels(C, K), dtype=f64)
    out[0, 1 + 2 * C:] = math.atanh(0.5)
    for r in range(L):
        _, mean, _, coeff = P.unpack_mixture(out, C)
        m_g = P._channel_mean(mean, coeff, [P.bin_centre(torch.tensor([[float(r)]], dtype=f64), L)], 1)
        assert m_g.item() == pytest.approx(0.5 * (2 * r / (L - 1) - 1), abs=1e-12)


@pytest.mark.parametrize("arch,colors", [("pixelcnn", 3), ("gated", 3), ("pixelcnn++", 3), ("gated", 1),
                                         ("rowlstm", 3), ("diagonal-bilstm", 3)])
def test_nll_is_the_sum_of_separately_computed_conditionals(arch, colors):
    L, H, W = 4, 4, 4
    model = tiny(arch, colors, L)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, L, (2, colors, H, W), generator=g)
    by_hand = torch.zeros(2, dtype=f64)
    mixture = model.likelihood == "mixture"
    for i, j in itertools.product(range(H), range(W)):
        for c in range(1 if mixture else colors):
            # every sub-pixel after (i, j, c) replaced by noise: a causal model cannot tell
            z = x.clone().permute(0, 2, 3, 1).reshape(2, -1)
            k = (i * W + j) * colors + c
            z[:, k + 1:] = torch.randint(0, L, z[:, k + 1:].shape, generator=g)
            z = z.view(2, H, W, colors).permute(0, 3, 1, 2)
            if mixture:
                z[:, :, i, j] = x[:, :, i, j]   # the pixel's own values enter only its mixture's means
            terms = P.log_prob(model(P.bin_centre(z.double(), L)), z, L, model.likelihood)
            by_hand -= terms[:, :, i, j].sum(1) if mixture else terms[:, c, i, j]
    torch.testing.assert_close(P.nll(model, x, L, model.likelihood), by_hand, rtol=1e-12, atol=1e-10)


def test_bits_per_dim_of_a_uniform_model_is_log2_of_the_levels():
    L, shape = 17, (3, 1, 8, 8)
    uniform = lambda x, y=None: torch.zeros(x.shape[0], L, 8, 8, dtype=f64)   # softmax of zeros
    x = torch.randint(0, L, shape)
    nats = P.nll(uniform, x, L, "categorical")
    torch.testing.assert_close(nats, torch.full((3,), 64 * math.log(L), dtype=f64))
    assert P.bits_per_dim(nats, 64)[0].item() == pytest.approx(math.log2(L), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Sampling: oracles with known conditionals, and the fast path against the naive one
# ----------------------------------------------------------------------------------------------

class MarkovOracle:
    """A 'network' whose softmax conditionals are a Markov chain along the raster order of the
    sub-pixels (channels fastest): x_0 ~ pi0, x_k | x_<k ~ T[x_{k-1}]. Counts its calls."""

    def __init__(self, pi0, T, shape):
        self.pi0, self.T, self.shape, self.calls = pi0, T, shape, 0

    def __call__(self, inp, y=None, row=None, cache=None):
        self.calls += 1
        C, H, W = self.shape
        L = len(self.pi0)
        n = inp.shape[0]
        x = torch.round((inp + 1) * (L - 1) / 2).long().permute(0, 2, 3, 1).reshape(n, -1)
        logits = torch.cat([self.pi0.log().expand(n, 1, L), self.T.log()[x[:, :-1]]], dim=1)  # (n, HWC, L)
        logits = logits.view(n, H, W, C, L).permute(0, 3, 4, 1, 2).reshape(n, C * L, H, W)
        return logits if row is None else logits[:, :, row:row + 1]


def assert_frequencies(samples, probs, n):
    """Each empirical frequency within Z binomial standard errors of its exact probability."""
    freq = samples.double().mean(0)
    se = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= Z * se + 1e-12).all(), (freq - probs).abs().max()


@pytest.mark.parametrize("fast", [True, False])
def test_sampler_reproduces_a_raster_markov_chain(fast):
    C, H, W, L, n = 2, 3, 3, 3, 20000
    pi0 = torch.tensor([0.2, 0.5, 0.3], dtype=f64)
    T = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]], dtype=f64)
    oracle = MarkovOracle(pi0, T, (C, H, W))
    x = P.sample(oracle, n, (C, H, W), L, fast=fast, generator=torch.Generator().manual_seed(0))
    assert oracle.calls == H * W * C  # one evaluation per sub-pixel
    flat = x.long().permute(0, 2, 3, 1).reshape(n, -1)                       # raster order, channels fastest
    marginal = pi0.clone()
    for k in range(H * W * C):
        onehot = torch.nn.functional.one_hot(flat[:, k], L)
        assert_frequencies(onehot, marginal, n)
        if k + 1 < H * W * C:  # the pair (x_k, x_k+1): P = p_k(a) T(a, b), across channels, pixels, rows
            pair = torch.nn.functional.one_hot(flat[:, k] * L + flat[:, k + 1], L * L)
            assert_frequencies(pair, (marginal[:, None] * T).flatten(), n)
        marginal = marginal @ T
    # and the exact likelihood of the chain
    some = x[:5]
    f = some.long().permute(0, 2, 3, 1).reshape(5, -1)
    exact = torch.log(pi0[f[:, 0]]) + torch.log(T[f[:, :-1], f[:, 1:]]).sum(1)
    torch.testing.assert_close(-P.nll(oracle, some, L, "categorical").double(), exact, rtol=1e-6, atol=1e-5)


def test_completion_keeps_the_top_half_and_continues_the_chain():
    C, H, W, L, n = 1, 4, 3, 3, 20000
    pi0 = torch.tensor([0.2, 0.5, 0.3], dtype=f64)
    T = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]], dtype=f64)
    oracle = MarkovOracle(pi0, T, (C, H, W))
    given = torch.randint(0, L, (n, C, H, W), generator=torch.Generator().manual_seed(3))
    start = (H // 2) * W
    x = P.sample(oracle, n, (C, H, W), L, x=given, start=start, generator=torch.Generator().manual_seed(4))
    assert torch.equal(x[:, :, :H // 2].long(), given[:, :, :H // 2])
    assert oracle.calls == (H * W - start) * C
    last = given[:, 0, H // 2 - 1, W - 1]                 # the last given sub-pixel
    for a in range(L):  # the first sampled sub-pixel follows T[last]
        sel = last == a
        assert_frequencies(torch.nn.functional.one_hot(x[sel, 0, H // 2, 0].long(), L), T[a], int(sel.sum()))


class MixtureChainOracle:
    """A 'network' whose mixture output at a pixel is base + A @ (bin centres of the previous
    pixel in raster order); the first pixel gets base. Counts its calls."""

    def __init__(self, base, A, shape, levels):
        self.base, self.A, self.shape, self.levels, self.calls = base, A, shape, levels, 0

    def params(self, prev_centres):  # (n, C) -> (n, P)
        return self.base + prev_centres @ self.A.T

    def __call__(self, inp, y=None, row=None, cache=None):
        self.calls += 1
        C, H, W = self.shape
        n = inp.shape[0]
        flat = inp.permute(0, 2, 3, 1).reshape(n, H * W, C)
        prev = torch.cat([torch.zeros(n, 1, C, dtype=inp.dtype), flat[:, :-1]], dim=1)
        out = self.params(prev.to(self.base.dtype)).view(n, H, W, -1).permute(0, 3, 1, 2)
        return out if row is None else out[:, :, row:row + 1]


def test_mixture_sampler_reproduces_the_pixel_chain_it_scores():
    C, H, W, L, K, n = 3, 2, 2, 3, 2, 20000
    g = torch.Generator().manual_seed(7)
    Pn = P.mixture_channels(C, K)
    base = torch.randn(Pn, generator=g, dtype=f64)
    # narrow logistics (s ~ e^-2, a fifth of a bin) and strong coefficients: a sampler that fed
    # anything but the drawn level's centre to the next channel's mean would be seen
    base[K + C * K:K + 2 * C * K] = -2.0 + 0.3 * base[K + C * K:K + 2 * C * K]
    base[K + 2 * C * K:] *= 3
    A = 0.6 * torch.randn(Pn, C, generator=g, dtype=f64)  # the previous pixel moves every parameter...
    A[K + C * K:K + 2 * C * K] = 0                         # ...but the scales, which stay narrow
    oracle = MixtureChainOracle(base, A, (C, H, W), L)
    x = P.sample(oracle, n, (C, H, W), L, "mixture", generator=torch.Generator().manual_seed(8))
    assert oracle.calls == H * W  # one evaluation per pixel: the channels share it
    # exact: P(pixel | previous pixel) by the likelihood, enumerated over all L^C values
    states = torch.tensor(list(itertools.product(range(L), repeat=C)))        # (S, C)
    S = len(states)

    def pixel_probs(params):  # (P,) -> (S,)
        terms = P.logistic_mixture_log_prob(params.view(1, -1, 1, 1).expand(S, -1, 1, 1), states.view(S, C, 1, 1), L)
        return terms.sum(1)[:, 0, 0].exp()

    T = torch.stack([pixel_probs(oracle.params(P.bin_centre(s.double(), L)[None])[0]) for s in states])
    marginal = pixel_probs(oracle.params(torch.zeros(1, C, dtype=f64))[0])
    code = (x.long().permute(0, 2, 3, 1).reshape(n, H * W, C) * L ** torch.arange(C - 1, -1, -1)).sum(-1)
    for k in range(H * W):
        onehot = torch.nn.functional.one_hot(code[:, k], S)
        big = marginal * n >= 20     # the normal approximation of the binomial needs n p >~ 20
        assert_frequencies(onehot[:, big], marginal[big], n)
        assert_frequencies(onehot[:, ~big].sum(1, keepdim=True), marginal[~big].sum()[None], n)
        marginal = marginal @ T


@pytest.mark.parametrize("arch,colors", [("pixelcnn", 3), ("gated", 3), ("gated", 1), ("pixelcnn++", 3),
                                         ("pixelcnn++", 1), ("rowlstm", 3), ("rowlstm", 1),
                                         ("diagonal-bilstm", 3)])
def test_fast_sampler_gives_the_naive_samplers_images(arch, colors):
    L, n = 5, 3
    model = tiny(arch, colors, L, num_classes=2)
    H, W = (8, 8) if arch == "pixelcnn++" else (11, 4)  # 11 rows > field_rows + 1: the top crop is used
    if arch in ("pixelcnn", "gated"):
        assert model.field_rows + 1 < H
    y = torch.tensor([0, 1, 1])
    given = torch.randint(0, L, (n, colors, H, W), generator=torch.Generator().manual_seed(0))
    for start in (0, (H // 2) * W + 1):
        kw = dict(y=y, x=given if start else None, start=start)
        a = P.sample(model, n, (colors, H, W), L, model.likelihood, fast=True,
                     generator=torch.Generator().manual_seed(5), **kw)
        b = P.sample(model, n, (colors, H, W), L, model.likelihood, fast=False,
                     generator=torch.Generator().manual_seed(5), **kw)
        assert a.dtype == torch.uint8 and a.shape == (n, colors, H, W)
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_row_evaluation_equals_the_full_network_while_the_row_changes(arch):
    L, colors = 4, 3
    model = tiny(arch, colors, L, num_classes=2)
    H, W = (8, 4) if arch == "pixelcnn++" else (11, 4)
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.rand(2, colors, H, W, generator=g, dtype=f64) - 1
    y = torch.tensor([1, 0])
    for i in range(H):
        cache = {}
        for _ in range(3):  # the sampler keeps the cache while it fills row i (and later rows hold anything)
            x[:, :, i:] = 2 * torch.rand(x[:, :, i:].shape, generator=g, dtype=f64) - 1
            torch.testing.assert_close(model(x, y, row=i, cache=cache)[:, :, 0], model(x, y)[:, :, i],
                                       rtol=1e-12, atol=1e-12)


def test_bad_arguments_are_value_errors():
    model = tiny("gated", 1, 4)
    for kw in (dict(likelihood="softmax"), dict(start=17), dict(start=3), dict(x=torch.zeros(2, 1, 4, 4)),
               dict(levels=300), dict(levels=1)):
        args = {**dict(model=model, n=1, shape=(1, 4, 4), levels=4), **kw}
        with pytest.raises(ValueError):
            P.sample(**args)
    with pytest.raises(ValueError):
        P.causal_mask(2, 2, 3, 3, (1, 1), "C", 1)
    with pytest.raises(ValueError):
        P.GatedPixelCNN(3, 4, p=8)                     # hidden maps not a multiple of the colours
    with pytest.raises(ValueError):
        P.GatedPixelCNN(1, 4, kernel=4)
    with pytest.raises(ValueError):
        tiny("pixelcnn++", 1)(torch.zeros(1, 1, 6, 8, dtype=f64))  # not a multiple of 4
    with pytest.raises(ValueError):
        P.log_prob(torch.zeros(1, 5, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.long), 4, "categorical")
    with pytest.raises(ValueError):
        P.unpack_mixture(torch.zeros(1, 11), 3)


def test_conditional_networks_need_labels_and_use_them():
    for arch in ARCHS:
        model = tiny(arch, 1, 4, num_classes=3)
        x = torch.zeros(1, 1, 4, 4, dtype=f64)
        with pytest.raises(ValueError):
            model(x)
        assert (model(x, torch.tensor([0])) - model(x, torch.tensor([2]))).abs().max() > 1e-6


# ----------------------------------------------------------------------------------------------
# Parameter counts of the presets, against hand formulas
# ----------------------------------------------------------------------------------------------

def gated_count(C, L, p, n_layers, k, k0, out_hidden, num_classes=0):
    def block(c_in, kk, first):
        kv = kk // 2 if first else kk // 2 + 1
        return (c_in * 2 * p * kv * kk + 2 * p          # vertical k//2(+1) x k
                + 2 * p * 2 * p + 2 * p                 # link, 1x1
                + c_in * 2 * p * (kk // 2 + 1) + 2 * p  # horizontal 1 x (k//2 + 1)
                + p * p + p                             # horizontal 1x1 after the gate
                + 2 * num_classes * 2 * p)              # class biases of both stacks
    return (block(C, k0, True) + (n_layers - 1) * block(p, k, False)
            + p * out_hidden + out_hidden + out_hidden * C * L + C * L)


def plain_count(C, L, h, n_blocks, k, k0, out_hidden, num_classes=0):
    block = 2 * h * h + h + h * h * k * k + h + h * 2 * h + 2 * h + num_classes * h
    return C * 2 * h * k0 * k0 + 2 * h + n_blocks * block + 2 * h * out_hidden + out_hidden + out_hidden * C * L + C * L


def pixelcnnpp_count(C, F, R, K, num_classes=0):
    """With weight normalisation every layer holds v, g (one per output map) and a bias."""
    def conv(cin, cout, area):
        return cin * cout * area + 2 * cout

    def resnet(area, aux):  # two shifted convolutions, the short-cut's 1x1, the class biases
        return (conv(2 * F, F, area) + conv(2 * F, 2 * F, area) + (conv(2 * aux * F, F, 1) if aux else 0)
                + num_classes * 2 * F)

    first = conv(C + 1, F, 6) + conv(C + 1, F, 3) + conv(C + 1, F, 2)
    up = 3 * R * (resnet(6, 0) + resnet(4, 1))
    down = (3 * R + 2) * (resnet(6, 1) + resnet(4, 2))
    resample = 2 * 2 * (conv(F, F, 6) + conv(F, F, 4))   # halve and double, both streams, twice
    return first + up + down + resample + conv(F, P.mixture_channels(C, K), 1)


def rnn_count(arch, C, L, h, n_layers, k, k0, out_hidden, num_classes=0):
    """PixelRNN Table 1: the k0 x k0 first layer; per Row LSTM layer a k x 1 input-to-state and a k x 1
    state-to-state to 4h gates, per Diagonal BiLSTM layer a 1x1 and a 2 x 1 in each direction;
    the 1x1 back to 2h; the two output layers."""
    if arch == "rowlstm":
        layer = 2 * h * 4 * h * k + 4 * h + h * 4 * h * k + 4 * h + num_classes * 4 * h
    else:
        layer = 2 * (2 * h * 4 * h + 4 * h + h * 4 * h * 2 + 4 * h) + num_classes * 8 * h
    layer += h * 2 * h + 2 * h
    return C * 2 * h * k0 * k0 + 2 * h + n_layers * layer + 2 * h * out_hidden + out_hidden + out_hidden * C * L + C * L


@pytest.mark.parametrize("arch,dataset", [("rowlstm", "digits"), ("rowlstm", "cifar10"), ("diagonal-bilstm", "digits"),
                                          ("diagonal-bilstm", "mnist"), ("diagonal-bilstm", "cifar10")])
def test_pixelrnn_presets_are_the_papers_shapes(arch, dataset, monkeypatch):
    """Binarised MNIST: Diagonal BiLSTM, 7 layers of h = 16 (79.20 nats); CIFAR-10: 12 layers of
    h = 128 (Row LSTM 3.07, Diagonal BiLSTM 3.00 bits/dim); the kernels of Table 1."""
    cfg = preset_config(dataset, arch, monkeypatch=monkeypatch)
    paper = {"mnist": (16, 7, True), "cifar10": (128, 12, False)}.get(dataset)
    if paper:
        assert (cfg.hidden, cfg.layers, cfg.binarize) == paper
    assert (cfg.kernel, cfg.first_kernel) == (3, 7)
    info = INFO[dataset]
    C, L = info.shape[0], 2 if cfg.binarize else info.levels
    for classes in (0, 10):
        net = built(dataclasses.replace(cfg, cond=bool(classes)), dataset)
        assert type(net).__name__ == {"rowlstm": "RowLSTM", "diagonal-bilstm": "DiagonalBiLSTM"}[arch]
        assert count(net) == rnn_count(arch, C, L, cfg.hidden, cfg.layers, 3, 7, cfg.out_hidden, classes)


def count(model):
    return sum(p.numel() for p in model.parameters())


INFO = {"digits": common.DataInfo("digits", "image", (1, 8, 8), levels=17, num_classes=10),
        "mnist": common.DataInfo("mnist", "image", (1, 28, 28), levels=256, num_classes=10),
        "cifar10": common.DataInfo("cifar10", "image", (3, 32, 32), levels=256, num_classes=10)}


def preset_config(dataset, arch="gated", *flags, monkeypatch):
    """The Config main would run for `--dataset dataset --arch arch flags` (dispatch replaced)."""
    monkeypatch.setattr(P, "dispatch", lambda cfg, *commands: cfg)
    return P.main(["--dataset", dataset, "--arch", arch, *flags])


def built(cfg, dataset):
    with torch.device("meta"):  # no memory for millions of weights
        return P.build(cfg, INFO[dataset])


# The parameter counts the README and the presets' comments state.
STATED = {("gated", "digits"): 122_001, ("gated", "mnist"): 2_463_936, ("gated", "cifar10"): 9_279_304,
          ("pixelcnn", "digits"): 80_913, ("pixelcnn", "cifar10"): 3_650_304,
          ("pixelcnn++", "cifar10"): 53_659_080}


@pytest.mark.parametrize("arch,dataset", list(STATED))
def test_preset_parameter_counts(arch, dataset, monkeypatch):
    cfg = preset_config(dataset, arch, monkeypatch=monkeypatch)
    cond = dataclasses.replace(cfg, cond=True)
    info = INFO[dataset]
    C, L = info.shape[0], info.levels
    if arch == "pixelcnn++":
        formula = functools.partial(pixelcnnpp_count, C, cfg.hidden, cfg.layers, cfg.n_mix)
    else:
        formula = functools.partial(gated_count if arch == "gated" else plain_count, C, L, cfg.hidden, cfg.layers,
                                    cfg.kernel, cfg.first_kernel, cfg.out_hidden)
    assert count(built(cfg, dataset)) == formula() == STATED[arch, dataset]
    assert count(built(cond, dataset)) == formula(num_classes=10)


def test_pixelcnnpp_cifar10_preset_is_the_official_model_and_recipe(monkeypatch):
    """openai/pixel-cnn train.py (final version): 160 filters, 5 ResNet layers per stage, 10
    logistics, dropout 0.5, batch 16 x 8 GPUs, Adam (0.95, 0.9995), lr 1e-3 x 0.999995 per step,
    Polyak 0.9995 (issue 29: the batch was 12 x 8, an earlier train.py's)."""
    cfg = preset_config("cifar10", "pixelcnn++", monkeypatch=monkeypatch)
    assert (cfg.hidden, cfg.layers, cfg.n_mix, cfg.dropout) == (160, 5, 10, 0.5)
    assert (cfg.batch_size, cfg.lr, cfg.beta1, cfg.beta2, cfg.ema_decay) == (16 * 8, 1e-3, 0.95, 0.9995, 0.9995)
    assert (cfg.schedule, cfg.lr_decay, cfg.warmup) == ("exponential", 0.999995, 0)
    assert P.learning_rate(9, cfg) == pytest.approx(1e-3 * 0.999995 ** 10, rel=1e-12)
    net = built(cfg, "cifar10")
    assert net.likelihood == "mixture" and net.out.out_channels == 100  # 10 x (1 + 3 + 3 + 3)
    assert count(built(dataclasses.replace(cfg, cond=True), "cifar10")) == 53_863_880
    # the flags typed still win over the architecture's preset, which wins over the gated one
    cfg = preset_config("cifar10", "pixelcnn++", "--hidden", "16", monkeypatch=monkeypatch)
    assert (cfg.hidden, cfg.layers) == (16, 5)
    assert preset_config("cifar10", monkeypatch=monkeypatch).hidden == 120
    assert preset_config("digits", "pixelcnn", monkeypatch=monkeypatch).layers == 5  # the "image" preset


def test_smaller_presets_match_their_formulas(monkeypatch):
    for arch, dataset in [("pixelcnn++", "digits"), ("pixelcnn++", "mnist")]:
        cfg = preset_config(dataset, arch, monkeypatch=monkeypatch)
        C = INFO[dataset].shape[0]
        assert count(built(cfg, dataset)) == pixelcnnpp_count(C, cfg.hidden, cfg.layers, cfg.n_mix)


# ----------------------------------------------------------------------------------------------
# 2D points as a 1 x 2 image of bins, binarised images, the sampler's edge cases
# ----------------------------------------------------------------------------------------------

def test_points_density_integrates_to_one_over_the_square():
    """exp(points_log_prob) summed over one point per bin pair, times the bins' area w^2, is the
    total probability of the bin pairs: 1. And it is -nll(bins) - 2 log w at every point of a bin."""
    bins, lim = 8, 4.0
    model = tiny("gated", 1, bins)
    w = P.bin_width(lim, bins)
    centres = -lim + (torch.arange(bins, dtype=f64) + 0.5) * w
    pts = torch.cartesian_prod(centres, centres)                        # (64, 2): x, then y
    lp = P.points_log_prob(model, pts, lim, bins)
    assert torch.logsumexp(lp, 0).item() + 2 * math.log(w) == pytest.approx(0.0, abs=1e-12)
    jitter = pts + (torch.rand(pts.shape, generator=torch.Generator().manual_seed(0), dtype=f64) - 0.5) * 0.99 * w
    torch.testing.assert_close(P.points_log_prob(model, jitter, lim, bins), lp, rtol=0, atol=1e-12)
    levels = P.point_levels(pts, lim, bins)
    assert levels.shape == (64, 1, 1, 2)
    assert torch.equal(levels.view(-1, 2), torch.cartesian_prod(torch.arange(bins), torch.arange(bins)))
    torch.testing.assert_close(lp, -P.nll(model, levels, bins, "categorical") - 2 * math.log(w))


def test_points_outside_the_square_fall_in_the_edge_bins_and_samples_stay_in_their_bin():
    bins, lim = 16, 4.0
    far = torch.tensor([[-9.0, 4.0], [4.5, -4.0], [0.0, 3.99]])
    assert P.point_levels(far, lim, bins).view(-1, 2).tolist() == [[0, 15], [15, 0], [8, 15]]
    levels = torch.randint(0, bins, (1000, 1, 1, 2), generator=torch.Generator().manual_seed(1))
    pts = P.levels_to_points(levels, lim, bins, torch.Generator().manual_seed(2))
    assert torch.equal(P.point_levels(pts, lim, bins), levels)


def test_sampler_never_draws_a_level_of_zero_probability():
    logits = torch.tensor([[0.0, -math.inf, 1.0, -math.inf], [-math.inf, -math.inf, -math.inf, 2.0]]).repeat(5000, 1)
    x = P.sample_categorical(logits, torch.Generator().manual_seed(0))
    assert set(x[0::2].tolist()) == {0, 2} and set(x[1::2].tolist()) == {3}
    p = 1 / (1 + math.e)                                                # P(level 0) in the first row
    assert abs((x[0::2] == 0).double().mean().item() - p) < Z * math.sqrt(p * (1 - p) / 5000)


def test_binarize_thresholds_at_half_the_range():
    grey, binary = common.load_dataset("digits", "test"), common.load_dataset("digits-binary", "test")
    assert torch.equal(P.binarize(grey.data, 17), binary.data.long())  # digits-binary is digits >= 8
    assert P.binarize(torch.tensor([0, 127, 128, 255]), 256).tolist() == [0, 0, 1, 1]


def test_mathematics_runs_without_common(without_common):
    """The likelihoods, the sampler (fast and naive, completion), the points' density and every
    network, from the file's first half alone (common.py replaced by a module that fails)."""
    m = without_common("pixelcnn")
    torch.manual_seed(0)
    nets = [m.GatedPixelCNN(1, 4, p=4, n_layers=2, out_hidden=8, num_classes=2),
            m.PixelCNN(1, 4, h=4, n_blocks=1, out_hidden=8, num_classes=2),
            m.PixelCNNpp(1, nr_filters=4, nr_resnet=1, n_mix=2, dropout=0.5, num_classes=2)]
    x, y = torch.randint(0, 4, (2, 1, 4, 4)), torch.tensor([0, 1])
    for net in nets:
        loss = m.nll(net, x, 4, net.likelihood, y).mean()
        loss.backward()
        assert torch.isfinite(loss) and all(p.grad is not None for p in net.parameters())
        net.eval()
        g = lambda: torch.Generator().manual_seed(3)
        a = m.sample(net, 2, (1, 4, 4), 4, net.likelihood, y, generator=g())
        assert torch.equal(a, m.sample(net, 2, (1, 4, 4), 4, net.likelihood, y, fast=False, generator=g()))
        done = m.sample(net, 2, (1, 4, 4), 4, net.likelihood, y, x=x, start=8, generator=g())
        assert torch.equal(done[:, :, :2].long(), x[:, :, :2])
        assert m.bits_per_dim(loss.item(), 16) > 0
    gated = nets[0]
    lp = m.points_log_prob(m.GatedPixelCNN(1, 8, p=4, n_layers=2, out_hidden=8), torch.randn(5, 2), 4.0, 8)
    assert lp.shape == (5,) and torch.isfinite(lp).all()
    assert m.levels_to_points(m.point_levels(torch.zeros(3, 2), 4.0, 8), 4.0, 8).shape == (3, 2)
    with pytest.raises(ValueError):
        m.sample(gated, 1, (1, 4, 4), 4, "softmax")


# ----------------------------------------------------------------------------------------------
# The command line end to end
# ----------------------------------------------------------------------------------------------

TINY = ["--hidden", "8", "--layers", "2", "--out-hidden", "16", "--batch-size", "8", "--log-every", "1",
        "--n-samples", "4", "--warmup", "2", "--device", "cpu"]


def test_cli_digits_conditional_train_eval_sample(tmp_path):
    out = tmp_path / "run"
    P.main(["--steps", "3", "--out", str(out), "--cond", *TINY])
    for name in ("ckpt.pt", "samples_3.png", "completion_3.png", "metrics.jsonl", "loss.png"):
        assert (out / name).exists(), name
    P.main(["--eval", str(out / "ckpt.pt"), "--batch-size", "128"])
    ev = events(out, "eval")[-1]
    assert ev["n"] == 300 and ev["levels"] == 17 and ev["conditional"] is True
    assert ev["bits_per_dim"] == pytest.approx(ev["nll"] / (64 * math.log(2)))
    # the value: -log p(x | y) of every test image, recomputed here sub-pixel by sub-pixel from the
    # EMA network's logits, each conditional read off an input where every later pixel is noise
    net, cfg, info = P.load(out / "ckpt.pt")
    test = common.load_dataset("digits", "test")
    x, y = test.data[:20].long(), test.labels[:20]
    g = torch.Generator().manual_seed(0)
    by_hand = torch.zeros(20, dtype=f64)
    with torch.no_grad():
        for i, j in itertools.product(range(8), range(8)):
            z = x.clone().view(20, 64)
            z[:, i * 8 + j + 1:] = torch.randint(0, 17, z[:, i * 8 + j + 1:].shape, generator=g)
            logits = net(P.bin_centre(z.view(20, 1, 8, 8).float(), 17), y)[:, :, i, j].double()
            by_hand -= torch.log_softmax(logits, 1).gather(1, x[:, :, i, j]).squeeze(1)
        full = torch.cat([P.nll(net, test.data[k:k + 100].long(), 17, "categorical", test.labels[k:k + 100])
                          for k in range(0, 300, 100)])
    torch.testing.assert_close(full[:20].double(), by_hand, rtol=1e-4, atol=1e-3)
    assert ev["nll"] == pytest.approx(full.double().mean().item(), rel=1e-5)
    # --sample, then the naive sampler: the same images for the same seed
    for sampler, folder in (([], "fast"), (["--naive-sampler"], "naive")):
        P.main(["--sample", str(out / "ckpt.pt"), "--n-samples", "3", "--out", str(tmp_path / folder), *sampler])
        assert events(tmp_path / folder, "sample")[-1]["sampler"] == folder
    a, b = (torch.load(tmp_path / f / "samples.pt", weights_only=True) for f in ("fast", "naive"))
    assert a.shape == (3, 1, 8, 8) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert (tmp_path / "fast" / "samples.png").exists() and (tmp_path / "fast" / "completion.png").exists()


@pytest.mark.parametrize("arch", RNNS)
def test_cli_pixelrnn_train_eval_sample_without_repeating_the_flag(arch, tmp_path):
    out = tmp_path / "run"
    P.main(["--arch", arch, "--steps", "2", "--out", str(out), "--completions", "1", *TINY])
    assert (out / "samples_2.png").exists() and (out / "completion_2.png").exists()
    net, cfg, _ = P.load(out / "ckpt.pt")
    assert cfg.arch == arch and type(net) is {"rowlstm": P.RowLSTM, "diagonal-bilstm": P.DiagonalBiLSTM}[arch]
    P.main(["--eval", str(out / "ckpt.pt"), "--batch-size", "300"])
    ev = events(out, "eval")[-1]
    assert ev["arch"] == arch and ev["n"] == 300
    test = common.load_dataset("digits", "test")
    with torch.no_grad():
        nats = P.nll(net, test.data.long(), 17, "categorical").double().mean().item()
    assert ev["nll"] == pytest.approx(nats, rel=1e-5)
    for sampler, folder in (([], "fast"), (["--naive-sampler"], "naive")):
        P.main(["--sample", str(out / "ckpt.pt"), "--n-samples", "2", "--completions", "0",
                "--out", str(tmp_path / folder), *sampler])
    a, b = (torch.load(tmp_path / f / "samples.pt", weights_only=True) for f in ("fast", "naive"))
    assert a.shape == (2, 1, 8, 8) and torch.equal(a, b)


def test_cli_points_density(tmp_path):
    out = tmp_path / "run"
    P.main(["--dataset", "8gaussians", "--steps", "3", "--out", str(out), "--bins", "32", *TINY])
    assert (out / "samples_3.png").exists() and not (out / "completion_3.png").exists()
    P.main(["--eval", str(out / "ckpt.pt")])
    ev = events(out, "eval")[-1]
    assert ev["discrete_nll"] == pytest.approx(ev["nll"] - 2 * math.log(8 / 32)) and ev["n"] == 10_000
    assert ev["entropy"] == pytest.approx(2.505, abs=0.01)  # the true entropy of 8gaussians, for reading
    d = np.load(out / "density.npz")
    assert d["log_density"].shape == (128, 128) and float(d["lim"]) == 4.0
    # 32 bins of the square hold 4 x 4 grid cells each: the grid sum integrates the density exactly
    assert np.exp(d["log_density"]).sum() * (8 / 128) ** 2 == pytest.approx(1.0, abs=1e-4)
    assert (out / "density.png").exists()
    P.main(["--sample", str(out / "ckpt.pt"), "--n-samples", "50", "--out", str(tmp_path / "s")])
    pts = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    assert pts.shape == (50, 2) and pts.dtype == torch.float32 and pts.abs().max() <= 4.0


def test_pictures_leave_the_training_random_state_alone(tmp_path):
    info = common.load_dataset("digits", "test").info
    net = P.GatedPixelCNN(1, 17, p=4, n_layers=2, out_hidden=8).eval()
    state = torch.get_rng_state()
    P.write_pictures(net, P.Config(n_samples=2), info, tmp_path, 1, common.Logger(tmp_path, 0),
                     common.load_dataset("digits", "test"))
    assert torch.equal(torch.get_rng_state(), state)


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    """PixelCNN++ with dropout: the random state must be restored too. (Pictures draw from their
    own generator, tested above; PixelCNN++'s are slow on a CPU, so they are skipped here.)"""
    monkeypatch.setattr(P, "write_pictures", lambda *args, **kwargs: None)
    flags = ["--arch", "pixelcnn++", "--hidden", "8", "--layers", "1", "--n-mix", "2", "--dropout", "0.5",
             "--decay-steps", "4", "--save-every", "2", *TINY]
    P.main(["--steps", "4", "--out", str(tmp_path / "a"), *flags])
    P.main(["--steps", "2", "--out", str(tmp_path / "b"), *flags])
    half = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    P.main(["--steps", "4", "--out", str(tmp_path / "b"), "--resume", *flags])
    a, b = (torch.load(tmp_path / f / "ckpt.pt", weights_only=True) for f in "ab")
    assert half["step"] == 2 and a["step"] == b["step"] == 4
    assert any(not torch.equal(half["model"][k], b["model"][k]) for k in b["model"])  # it did train on
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]["model"]:
        assert torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]), k


def test_cli_binarized_images_are_two_level(tmp_path):
    out = tmp_path / "run"
    P.main(["--steps", "1", "--out", str(out), "--binarize", *TINY])
    P.main(["--eval", str(out / "ckpt.pt")])
    ev = events(out, "eval")[-1]
    assert ev["levels"] == 2 and ev["nll"] < 64 * math.log(17) / 2  # two levels: near 64 log 2, far below 64 log 17
    P.main(["--sample", str(out / "ckpt.pt"), "--n-samples", "3", "--out", str(tmp_path / "s")])
    assert set(torch.load(tmp_path / "s" / "samples.pt", weights_only=True).unique().tolist()) <= {0, 1}


def test_completion_grid_says_which_columns_are_which(tmp_path, monkeypatch):
    """The grid mixes kinds of pictures (the given top halves, the completions, the originals): its
    title says which is which, and its columns hold what the title says."""
    grids = {}
    monkeypatch.setattr(P, "save_image_grid", lambda x, path, levels=None, nrow=None, title=None:
                        grids.__setitem__(path.name, (x, title, nrow)))
    info = common.DataInfo("digits", "image", (1, 4, 4), levels=5, num_classes=10)
    test = common._Dataset(info, "test", torch.randint(0, 5, (8, 1, 4, 4), dtype=torch.uint8),
                          torch.arange(8) % 10)
    net = P.GatedPixelCNN(1, 5, p=4, n_layers=2, out_hidden=8).eval()
    P.write_pictures(net, P.Config(n_samples=2), info, tmp_path, 7, common.Logger(tmp_path, 0), test)
    assert grids["samples_7.png"][1:] == (None, None)
    x, title, nrow = grids["completion_7.png"]
    assert nrow == 6 and all(w in title for w in ("each row", "top half given", "4 samples of the bottom half",
                                                  "original"))
    assert title.index("given") < title.index("samples") < title.index("original")  # left to right
    rows = x.view(8, 6, 1, 4, 4)
    assert torch.equal(rows[:, 5], test.data) and torch.equal(rows[:, 0, :, :2], test.data[:, :, :2])
    assert (rows[:, 0, :, 2:] == 0).all()
    assert torch.equal(rows[:, 1:5, :, :2], test.data[:, None, :, :2].expand(8, 4, 1, 2, 4))


@pytest.mark.parametrize("argv,flag", [
    (["--arch", "pixelcnn++", "--dataset", "8gaussians"], "--arch pixelcnn++"),
    (["--dataset", "8gaussians", "--cond"], "--cond"),
    (["--dataset", "8gaussians", "--binarize"], "--binarize"),
    (["--dropout", "0.5"], "--dropout"),
    (["--kernel", "4"], "--kernel"),
    (["--bins", "300"], "--bins"),
    (["--dataset", "cifar10", "--hidden", "32"], "--hidden"),
    (["--dataset", "cifar10", "--arch", "rowlstm", "--hidden", "2"], "--hidden"),
    (["--arch", "diagonal-bilstm", "--kernel", "5"], "--kernel"),
    (["--arch", "rowlstm", "--dropout", "0.5"], "--dropout"),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, flag, monkeypatch):
    if "cifar10" in argv:  # no download: a tiny 8-bit colour set in place of cifar10
        fake = common._Dataset(common.DataInfo("cifar10", "image", (3, 4, 4), levels=256, num_classes=10), "train",
                              torch.zeros(4, 3, 4, 4, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
        monkeypatch.setattr(P, "load_dataset", lambda *a, **k: fake)
    with pytest.raises(SystemExit) as e:
        P.main([*argv, "--steps", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and flag in err and err.startswith("error")
