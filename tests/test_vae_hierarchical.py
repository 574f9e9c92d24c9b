"""vae.py --arch hierarchical (Child 2021, VD-VAE; Vahdat & Kautz 2020, NVAE's residual posterior):
each group's KL against torch.distributions and Monte Carlo, NVAE's Eq. 2 against the general
Gaussian KL, the bounds on a linear-Gaussian hierarchy whose log p(x) is exact, the structure of
the top-down pass (prior sampling without the encoder, what the posterior of a group may see),
gradient skipping, the parameter count of VD-VAE's CIFAR-10 model, and the command line."""
import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import common
import vae
from conftest import events, run_main

torch.set_default_dtype(torch.float32)


def _tiny(residual=False, shape=(1, 8, 8), likelihood=None, seed=0):
    """A small hierarchical VAE on 8x8 images, groups at 1, 4 and 8 (two at 8)."""
    torch.manual_seed(seed)
    return vae.HierarchicalVAE(shape, likelihood or vae.DiscretizedLogistic(17), width=8,
                               enc_blocks="8x1,8d2,4x1,4d4,1x1", dec_blocks="1x1,4m1,8m4,8x1", zdim=2,
                               residual=residual, in_scale=1 / 16)


def _digits(n=6, seed=0):
    return torch.randint(0, 17, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))


def _randomise_prior(net, seed=1):
    """The prior's last layer starts at zero (p = N(0, I)); give it weights so p varies with h."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in net.groups:
            last = group.prior.layers[-1]
            last.weight.copy_(0.3 * torch.randn(last.weight.shape, generator=g))
            last.bias.copy_(0.3 * torch.randn(last.bias.shape, generator=g))


# ----------------------------------------------------------------------------------------
# Each group's KL in closed form
# ----------------------------------------------------------------------------------------

_floats = st.floats(-3, 3)


@settings(max_examples=10)
@given(st.lists(st.tuples(_floats, _floats, _floats, _floats), min_size=1, max_size=6))
def test_group_kl_matches_torch_distributions(params):
    mu_q, lv_q, mu_p, lv_p = torch.tensor(params, dtype=torch.float64).T
    ours = vae.gaussian_kl_between(mu_q, lv_q, mu_p, lv_p)
    q, p = torch.distributions.Normal(mu_q, (0.5 * lv_q).exp()), torch.distributions.Normal(mu_p, (0.5 * lv_p).exp())
    torch.testing.assert_close(ours, torch.distributions.kl_divergence(q, p), rtol=1e-10, atol=1e-12)


def test_group_kl_matches_monte_carlo():
    """E_q[log q(z) - log p(z)] by 200000 draws, within 4 standard errors of the closed form."""
    g = torch.Generator().manual_seed(0)
    mu_q, lv_q, mu_p, lv_p = torch.tensor([[0.3, -1.0, 2.0], [-0.5, 0.7, 0.0], [0.0, 0.5, 1.0], [0.2, -0.3, 1.0]],
                                          dtype=torch.float64)
    z = mu_q + (0.5 * lv_q).exp() * torch.randn(200_000, 3, generator=g, dtype=torch.float64)
    log_ratio = vae.log_normal(z, mu_q, lv_q) - vae.log_normal(z, mu_p, lv_p)   # the group's sum over dims
    closed = vae.gaussian_kl_between(mu_q, lv_q, mu_p, lv_p).sum()
    se = log_ratio.std() / math.sqrt(len(z))
    assert abs(log_ratio.mean() - closed) < 4 * se, (log_ratio.mean(), closed, se)
    assert 4 * se < 0.05 * closed  # the tolerance is tight enough to catch a wrong term


@settings(max_examples=10)
@given(st.lists(st.tuples(_floats, _floats, _floats, _floats), min_size=1, max_size=6))
def test_residual_normal_kl_is_nvae_eq2(params):
    """q = N(mu_p + dmu, (s_p ds)^2): Eq. 2 equals the general KL between q and p."""
    d_mu, d_lv, mu_p, lv_p = torch.tensor(params, dtype=torch.float64).T
    general = vae.gaussian_kl_between(mu_p + d_mu, lv_p + d_lv, mu_p, lv_p)
    torch.testing.assert_close(vae.residual_normal_kl(d_mu, d_lv, lv_p), general, rtol=1e-10, atol=1e-12)


def test_kl_is_exactly_zero_when_q_equals_p():
    mu, lv = torch.randn(50), torch.randn(50)
    assert torch.equal(vae.gaussian_kl_between(mu, lv, mu, lv), torch.zeros(50))
    assert torch.equal(vae.residual_normal_kl(torch.zeros(50), torch.zeros(50), lv), torch.zeros(50))


# ----------------------------------------------------------------------------------------
# The bounds on a linear-Gaussian hierarchy: z1 ~ N(0, 1), z2 | z1 ~ N(a z1, s2^2),
# x | z2 ~ N(b z2, sx^2 I), x in R^2, so log p(x) and p(z1 | x), p(z2 | z1, x) are exact
# ----------------------------------------------------------------------------------------

A, S2, B, SX = 0.8, 0.6, torch.tensor([1.0, -0.5], dtype=torch.float64), 0.7


def _joint_cov():
    """Cov of (z1, z2, x1, x2) by the model's linear structure."""
    m = torch.zeros(4, 4, dtype=torch.float64)  # (z1, z2, x) = m @ (e1, e2, e3, e4), e ~ N(0, I)
    m[0, 0] = 1
    m[1] = A * m[0]
    m[1, 1] = S2
    m[2:] = B[:, None] * m[1]
    m[2, 2] = m[3, 3] = SX
    return m @ m.T


def _condition(cov, x_idx, given_idx, given_vals):
    """Mean and variance of one coordinate given others, by Gaussian conditioning (zero means)."""
    s_ag = cov[x_idx, given_idx]
    s_gg = cov[given_idx][:, given_idx]
    w = torch.linalg.solve(s_gg, s_ag)
    return given_vals @ w, cov[x_idx, x_idx] - s_ag @ w


def _linear_gaussian_model(exact):
    """model(x, k, generator) for the hierarchy; q exact, or a deliberately poor diagonal guess."""
    cov = _joint_cov()

    def model(x, k, generator=None):
        if exact:
            m1, v1 = _condition(cov, 0, [2, 3], x)
        else:
            m1, v1 = 0.3 * x[:, 0], torch.full((len(x),), 0.3, dtype=x.dtype)
        z1 = m1 + v1.sqrt() * torch.randn(k, len(x), generator=generator, dtype=x.dtype)
        if exact:
            m2, v2 = _condition(cov, 1, [0, 2, 3], torch.cat([z1[..., None], x.expand(k, -1, -1)], -1))
        else:
            m2, v2 = A * z1 + 0.1 * x[:, 0], torch.full_like(z1, 0.1)
        v2 = v2.expand_as(z1)
        z2 = m2 + v2.sqrt() * torch.randn(k, len(x), generator=generator, dtype=x.dtype)
        lv1, lv2, lp2 = v1.log().expand_as(z1), v2.log(), torch.full_like(z1, math.log(S2 ** 2))
        kl = torch.stack([vae.gaussian_kl_between(m1.expand_as(z1), lv1, torch.zeros_like(z1), torch.zeros_like(z1)),
                          vae.gaussian_kl_between(m2, lv2, A * z1, lp2)], -1)
        log_lik = vae.log_normal(x, B * z2[..., None], torch.full((2,), math.log(SX ** 2), dtype=x.dtype))
        log_q = vae.log_normal(z1[..., None], m1.expand_as(z1)[..., None], lv1[..., None]) \
            + vae.log_normal(z2[..., None], m2[..., None], lv2[..., None])
        log_p = vae.log_normal(z1[..., None], torch.zeros_like(z1)[..., None], torch.zeros_like(z1)[..., None]) \
            + vae.log_normal(z2[..., None], (A * z1)[..., None], lp2[..., None])
        return log_lik, kl, log_q - log_p
    return model


def _log_px(x):
    cov = _joint_cov()[2:, 2:]
    return torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), cov).log_prob(x)


def test_exact_posterior_makes_every_bound_log_px():
    x = torch.tensor([[0.5, -1.0], [2.0, 0.3], [-1.5, 1.2]], dtype=torch.float64)
    model, g = _linear_gaussian_model(exact=True), torch.Generator().manual_seed(0)
    for k in (1, 7):  # log w = log p(x) for every sample: L_k is exact whatever k
        torch.testing.assert_close(vae.hierarchical_iwae(model, x, k, chunk=3, generator=g), _log_px(x),
                                   rtol=0, atol=1e-10)
    # The ELBO with closed-form KLs is exact in expectation: within 4 standard errors over 20000 samples.
    log_lik, kl, _ = model(x, 20_000, g)
    per_sample = log_lik - kl.sum(-1)
    se = per_sample.std(0) / math.sqrt(20_000)
    elbo, _ = vae.hierarchical_elbo(model, x, 20_000, torch.Generator().manual_seed(1))
    assert ((elbo - _log_px(x)).abs() < 4 * se).all()


def test_bounds_lie_below_log_px_and_iwae_approaches_it():
    x = torch.tensor([[0.5, -1.0], [2.0, 0.3], [-1.5, 1.2]], dtype=torch.float64)
    model, g = _linear_gaussian_model(exact=False), torch.Generator().manual_seed(0)
    log_px = _log_px(x)
    elbo, kl = vae.hierarchical_elbo(model, x, 20_000, g)
    assert kl.shape == (3, 2) and (kl > 0).all()
    assert (log_px - elbo > 0.3).all()                  # q is far from the posterior: a wide first gap
    # L_k over 200 repetitions each: below log p(x) (within 3 standard errors), the gap shrinking
    # with k (averaged over the examples), and at k = 1000 a tenth of the ELBO's.
    gaps, ses = [], []
    for k in (1, 10, 100, 1000):
        b = torch.stack([vae.hierarchical_iwae(model, x, k, generator=g) for _ in range(200)])
        gaps.append(log_px - b.mean(0))
        ses.append(b.std(0) / math.sqrt(len(b)))
        assert (gaps[-1] > -3 * ses[-1]).all(), k
    mean_gaps = [gap.mean().item() for gap in gaps]
    assert mean_gaps == sorted(mean_gaps, reverse=True) and mean_gaps[-1] < 0.1 * (log_px - elbo).mean()
    assert ((gaps[0] - (log_px - elbo)).abs() < 3 * ses[0]).all()  # L_1 is the ELBO


# ----------------------------------------------------------------------------------------
# The top-down pass
# ----------------------------------------------------------------------------------------

def test_posterior_equal_to_prior_gives_zero_kl_and_elbo_equal_to_log_likelihood():
    """NVAE's residual q with dmu = 0, log ds^2 = 0 at every group is the prior itself."""
    net = _tiny(residual=True)
    _randomise_prior(net)
    with torch.no_grad():
        for group in net.groups:
            group.posterior.layers[-1].weight.zero_()
            group.posterior.layers[-1].bias.zero_()
    x = _digits()
    log_lik, kl, log_ratio = net(x, 3, torch.Generator().manual_seed(0))
    assert torch.equal(kl, torch.zeros_like(kl)) and torch.equal(log_ratio, torch.zeros_like(log_ratio))
    elbo, _ = vae.hierarchical_elbo(net, x, 3, torch.Generator().manual_seed(0))
    assert torch.equal(elbo, log_lik.mean(0))


def test_prior_sampling_never_runs_the_encoder():
    net = _tiny(residual=True)
    ran = []
    for module in [net.encoder, *net.encoder.modules(), *(g.posterior for g in net.groups)]:
        module.register_forward_hook(lambda m, i, o: ran.append(type(m).__name__))
    x = vae.sample_top_down(net, 5, (1.0, 0.5, 0.0, 1.0), generator=torch.Generator().manual_seed(0))
    assert ran == [] and x.shape == (5, 1, 8, 8)
    net(_digits())
    assert ran  # the hooks do fire when the encoder runs


def test_temperature_zero_gives_the_prior_mean_at_every_group():
    net = _tiny()
    _randomise_prior(net)
    record = []
    net.top_down(4, None, (0.0,), torch.Generator().manual_seed(0), record)
    assert all(torch.equal(r["z"], r["mu_p"]) for r in record)


def test_posterior_sees_x_through_the_features_and_earlier_latents_through_the_state():
    """q(z_l | z_<l, x) is a function of (h_l, a_r) alone: recomputed from them it is the same;
    its parameters depend on no z_m with m >= l, on some z_m with m < l, and on x only through
    the bottom-up features."""
    net = _tiny(residual=False)
    _randomise_prior(net)
    x = _digits(4).double()
    net.double()
    x.requires_grad_(True)
    acts = {r: a.detach().requires_grad_() for r, a in net.encode(x).items()}
    record = []
    net.top_down(len(x), acts, generator=torch.Generator().manual_seed(0), record=record)
    for l, (rec, (r, _)) in enumerate(zip(record, net.dec_spec)):
        mu_q, lv_q = net.groups[l].posterior(torch.cat([rec["h"], acts[r]], 1)).chunk(2, 1)
        assert torch.equal(mu_q, rec["mu_q"]) and torch.equal(lv_q, rec["logvar_q"])
        out = (rec["mu_q"].sum() + rec["logvar_q"].sum())
        zs = [record[m]["z"] for m in range(len(record))]
        grads = torch.autograd.grad(out, [x, *acts.values(), *zs], retain_graph=True, allow_unused=True)
        g_x, g_acts, g_z = grads[0], dict(zip(acts, grads[1:1 + len(acts)])), grads[1 + len(acts):]
        assert g_x is None                                  # x enters only through a_r
        assert g_acts[r] is not None and g_acts[r].abs().sum() > 0
        assert all(g is None for g in g_z[l:])              # not its own or later latents
        if l > 0:
            assert any(g is not None and g.abs().sum() > 0 for g in g_z[:l])
            # ...and the earlier latents only through h_l: with h_l cut off, q_l sees none of them
            q_cut = net.groups[l].posterior(torch.cat([rec["h"].detach(), acts[r]], 1)).sum()
            cut = torch.autograd.grad(q_cut, zs[:l], allow_unused=True)
            assert all(g is None for g in cut)


# ----------------------------------------------------------------------------------------
# Gradient skipping and the parameter count
# ----------------------------------------------------------------------------------------

def _states(net, opt):
    return copy.deepcopy([p.detach() for p in net.parameters()]), copy.deepcopy(opt.state_dict())


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def test_gradient_skipping_leaves_weights_and_adam_state_untouched_and_counts():
    net, x = _tiny(), _digits(8)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.9), weight_decay=0.01)
    skipper = vae.GradientSkipping(clip=0.0, threshold=1e9)

    def backward():
        opt.zero_grad(set_to_none=True)
        vae.hierarchical_loss(net, x)[0].backward()

    for _ in range(2):
        backward()
        assert skipper.step(net.parameters(), opt)["skipped"] == 0.0
    before = _states(net, opt)
    backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in net.parameters() if p.grad is not None]).item()
    skipper.threshold = norm  # a norm at the threshold is skipped
    stats = skipper.step(net.parameters(), opt)
    assert stats == {"grad_norm": pytest.approx(norm), "skipped": 1.0} and skipper.skipped == 1
    assert _same(before, _states(net, opt))
    next(net.parameters()).grad = None
    backward()
    next(net.parameters()).grad.fill_(float("nan"))  # a non-finite gradient is skipped too
    assert skipper.step(net.parameters(), opt)["skipped"] == 1.0 and skipper.skipped == 2
    assert _same(before, _states(net, opt))
    skipper.threshold = 2 * norm
    backward()
    assert skipper.step(net.parameters(), opt)["skipped"] == 0.0
    after = _states(net, opt)
    assert not _same(before[0], after[0]) and after[1]["state"][0]["step"] == before[1]["state"][0]["step"] + 1
    assert skipper.state_dict() == {"skipped": 2}


def test_gradient_clipping_bounds_the_norm_of_the_update():
    net, x = _tiny(), _digits(8)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    vae.hierarchical_loss(net, x)[0].backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in net.parameters() if p.grad is not None]).item()
    before = [p.detach().clone() for p in net.parameters()]
    stats = vae.GradientSkipping(clip=norm / 10).step(net.parameters(), opt)
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, net.parameters())])
    assert stats["grad_norm"] == pytest.approx(norm) and step.norm().item() == pytest.approx(norm / 10, rel=1e-4)


def _bottleneck(c_in, mid, c_out, res):
    k2 = 9 if res > 2 else 1
    return c_in * mid + mid + 2 * (mid * mid * k2 + mid) + mid * c_out + c_out


def test_cifar10_preset_has_vdvae_parameter_count():
    """VD-VAE's CIFAR-10 model, counted from its description (the blocks, the block strings):
    39M parameters in Child 2021 (PAPERS.md); ours has one discretized logistic instead of 10."""
    cfg = vae.Config(**vae.ARCH_PRESETS["hierarchical"]["cifar10"], dataset="cifar10")
    info = common.DataInfo("cifar10", "image", (3, 32, 32), 256)
    with torch.device("meta"):
        net = vae.build(cfg, info)
    w, z, mid = 384, 16, 96
    enc = vae.parse_blocks(cfg.enc_blocks, "encoder")
    dec = vae.parse_blocks(cfg.dec_blocks, "decoder")
    expected = 3 * w * 9 + w + sum(_bottleneck(w, mid, w, r) for r, _ in enc)
    expected += sum(_bottleneck(w, mid, 2 * z + w, r) + _bottleneck(2 * w, mid, 2 * z, r) + z * w + w
                    + _bottleneck(w, mid, w, r) for r, _ in dec)
    expected += sum(w * r * r for r in {r for r, _ in dec}) + 2 * w + w * 6 + 6
    count = sum(p.numel() for p in net.parameters())
    assert count == expected and len(dec) == 43
    assert abs(count - 39e6) < 0.5e6


# ----------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------

TINY_DIGITS = ["--arch", "hierarchical", "--width", "8", "--latent", "2", "--batch-size", "16",
               "--enc-blocks", "8x1,8d2,4x1,4d4,1x1", "--dec-blocks", "1x1,4m1,8m4", "--n-samples", "4",
               "--log-every", "1"]


def test_digits_end_to_end_with_eval_and_sample_without_repeating_the_arch(tmp_path):
    run_main("vae", [*TINY_DIGITS, "--steps", "3", "--out", tmp_path, "--residual-posterior"])
    diag = events(tmp_path, "diagnostics")[-1]
    assert len(diag["kl_per_group"]) == 3
    fields = run_main("vae", ["--eval", tmp_path / "ckpt.pt", "--k-eval", "20"])
    assert len(fields["kl_per_group"]) == 3 and all(v >= 0 for v in fields["kl_per_group"])
    assert fields["nll"] <= -fields["elbo"] + 3 * fields["elbo_se"]  # L_20 >= L_1
    assert 1.0 < fields["bits_per_dim"] < 20
    x = run_main("vae", ["--sample", tmp_path / "ckpt.pt", "--temperature", "1,0.5,0", "--n-samples", "5"])
    assert x.shape == (5, 1, 8, 8) and x.min() >= 0 and x.max() <= 1


def test_points_end_to_end(tmp_path):
    run_main("vae", ["--arch", "hierarchical", "--dataset", "8gaussians", "--steps", "2", "--batch-size", "32",
                     "--width", "16", "--out", tmp_path])
    fields = run_main("vae", ["--eval", tmp_path / "ckpt.pt", "--k-eval", "5", "--k-density", "2"])
    assert math.isfinite(fields["nll"]) and len(fields["kl_per_group"]) == 3
    assert (tmp_path / "density.npz").exists()
    assert run_main("vae", ["--sample", tmp_path / "ckpt.pt", "--n-samples", "7"]).shape == (7, 2)


def test_resume_after_a_skipped_step_is_bit_exact(tmp_path):
    """A threshold at the largest gradient norm of the first 3 steps skips a step before the
    checkpoint at step 3; 6 steps in one run or 3 + 3 with --resume are the same, skips included."""
    flags = [*TINY_DIGITS, "--save-every", "3"]
    run_main("vae", [*flags, "--steps", "6", "--out", tmp_path / "probe"])
    norms = [r["grad_norm"] for r in common._read_metrics(tmp_path / "probe" / "metrics.jsonl") if "grad_norm" in r]
    flags += ["--skip-threshold", repr(max(norms[:3]))]
    a, b = tmp_path / "a", tmp_path / "b"
    run_main("vae", [*flags, "--steps", "6", "--out", a])
    run_main("vae", [*flags, "--steps", "3", "--out", b])
    run_main("vae", ["--steps", "6", "--out", b, "--resume"])
    ca, cb = common.load_checkpoint(a / "ckpt.pt"), common.load_checkpoint(b / "ckpt.pt")
    assert ca["skips"]["skipped"] >= 1 and ca["skips"] == cb["skips"]
    assert _same({k: v for k, v in ca.items() if k != "config"}, {k: v for k, v in cb.items() if k != "config"})
    logs = [{r["step"]: (r["loss"], r["skipped"]) for r in common._read_metrics(d / "metrics.jsonl") if "loss" in r}
            for d in (a, b)]
    assert [logs[0][s] for s in (4, 5, 6)] == [logs[1][s] for s in (4, 5, 6)]
    assert sum(logs[0][s][1] for s in (1, 2, 3)) >= 1


@pytest.mark.parametrize("argv, words", [
    (["--residual-posterior"], ["--residual-posterior", "--arch hierarchical"]),
    (["--skip-threshold", "5"], ["--skip-threshold", "--arch hierarchical"]),
    (["--arch", "hierarchical", "--posterior", "iaf"], ["--posterior iaf", "accepted"]),
    (["--arch", "hierarchical", "--free-bits", "0.5"], ["--free-bits", "accepted"]),
    (["--arch", "hierarchical", "--enc-blocks", "8y2"], ["--enc-blocks", "accepted"]),
    (["--arch", "hierarchical", "--dec-blocks", "1x1,4m1"], ["ends at 4", "8"]),
    (["--arch", "hierarchical", "--dec-blocks", "1x1,4x1,8m4"], ["RmS"]),
    (["--arch", "hierarchical", "--temperature", "-1"], ["--temperature", "accepted"]),
    (["--arch", "hierarchical", "--bottleneck", "0"], ["--bottleneck", "accepted"]),
])
def test_one_line_errors(argv, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main("vae", [*argv, "--steps", "1", "--out", tmp_path])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and all(w in err[0] for w in words), err
