"""Tests of ebm.py: Langevin dynamics against the closed-form stationary laws of Gaussian energies,
the contrastive-divergence gradient against the data-minus-model term and the exact NLL gradient,
the 2D normaliser against closed forms and independent quadrature, JEM's identities, the replay
buffer, the networks, and the command line end to end."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import events
from hypothesis import given
from hypothesis import strategies as st
from scipy import linalg, stats

import common
import ebm
from ebm import (ReplayBuffer, class_log_probs, contrastive_divergence, decoupled_update, energy_from_logits,
                 langevin, log_partition_2d, log_prob_2d, reflect, sgld_update, training_loss)

f64 = torch.float64


class Quadratic(torch.nn.Module):
    """E(x) = 1/2 (x - mu)^T P (x - mu) as a network returning one logit f(x) = -E(x)."""

    def __init__(self, mu, cov):
        super().__init__()
        self.mu = torch.as_tensor(mu, dtype=f64)
        self.precision = torch.linalg.inv(torch.as_tensor(cov, dtype=f64))

    def forward(self, x):
        d = x - self.mu
        return -0.5 * ((d @ self.precision) * d).sum(1, keepdim=True)


def run_chains(energy_fn, n, mu, steps, step_size, noise=None, seed=0, box=None, low=-3.0, high=3.0):
    g = torch.Generator().manual_seed(seed)
    x0 = low + (high - low) * torch.rand(n, len(mu), generator=g, dtype=f64)
    return langevin(energy_fn, x0, steps, step_size, noise, box=box, generator=g)


def assert_mean_cov(x, mean, cov, k=4.0):
    """Sample mean and covariance of n independent chains against (mean, cov), within k standard
    errors: se(mean_i) = sqrt(C_ii / n), se(C_ij) = sqrt((C_ii C_jj + C_ij^2) / n) (Gaussian data)."""
    n = x.shape[0]
    mean, cov = torch.as_tensor(mean, dtype=f64), torch.as_tensor(cov, dtype=f64)
    d = torch.diagonal(cov)
    se_mean = (d / n).sqrt()
    se_cov = ((d[:, None] * d[None, :] + cov ** 2) / n).sqrt()
    emp_mean, emp_cov = x.mean(0), torch.cov(x.T)
    assert ((emp_mean - mean).abs() < k * se_mean).all(), (emp_mean, mean)
    assert ((emp_cov - cov).abs() < k * se_cov).all(), (emp_cov, cov)
    return se_cov


MU, COV = [0.3, -0.2], [[1.0, 0.5], [0.5, 0.8]]


# ---------------------------------------------------------------------------- Langevin dynamics

def test_sgld_converges_to_the_gaussian_mean_and_covariance():
    """Welling & Teh's update on E = 1/2 (x - mu)^T Sigma^-1 (x - mu) samples N(mu, Sigma). The
    step is small enough that the discretisation bias, known in closed form (the update is linear:
    the stationary covariance C solves C = A C A^T + eps I with A = I - eps/2 Sigma^-1), is below
    a tenth of the Monte-Carlo tolerance."""
    eps, n = 0.01, 5000
    model = Quadratic(MU, COV)
    a = np.eye(2) - eps / 2 * np.linalg.inv(COV)
    c_eps = linalg.solve_discrete_lyapunov(a, eps * np.eye(2))
    # relaxation time of the covariance 1 / (eps lambda_min(Sigma^-1)) = 142 steps: 1000 steps
    # leave e^-7 of the initial error
    x = run_chains(lambda v: ebm.energy(model, v), n, MU, 1000, eps)
    se_cov = assert_mean_cov(x, MU, COV)
    assert (torch.as_tensor(c_eps - np.array(COV)).abs() < 0.1 * 4 * se_cov).all()


def test_sgld_with_a_large_step_has_the_closed_form_stationary_covariance():
    """With eps = 0.4 the bias is large (about eps / (4 lambda_min) = 25%) and exactly the
    discrete Lyapunov solution: this checks the eps/2 on the gradient and the variance eps of the
    noise, not only the fixed point."""
    eps, n = 0.4, 5000
    model = Quadratic(MU, COV)
    a = np.eye(2) - eps / 2 * np.linalg.inv(COV)
    c_eps = linalg.solve_discrete_lyapunov(a, eps * np.eye(2))
    x = run_chains(lambda v: ebm.energy(model, v), n, MU, 100, eps, seed=1)
    se_cov = assert_mean_cov(x, MU, c_eps)
    assert (torch.as_tensor(c_eps - np.array(COV)).abs() > 6 * se_cov).any()  # distinguishable from Sigma


def test_decoupled_langevin_has_the_closed_form_stationary_covariance():
    """x' = x - lambda Sigma^-1 (x - mu) + sigma z: C = A C A^T + sigma^2 I, A = I - lambda Sigma^-1."""
    lam, sigma, n = 0.1, 0.3, 5000
    model = Quadratic(MU, COV)
    a = np.eye(2) - lam * np.linalg.inv(COV)
    c = linalg.solve_discrete_lyapunov(a, sigma ** 2 * np.eye(2))
    x = run_chains(lambda v: ebm.energy(model, v), n, MU, 200, lam, noise=sigma, seed=2)
    assert_mean_cov(x, MU, c)


@given(lam=st.floats(1e-3, 10), sigma=st.floats(1e-3, 1), seed=st.integers(0, 1000))
def test_decoupled_update_is_sgld_on_a_tempered_energy(lam, sigma, seed):
    """lambda grad E + sigma z = SGLD on E / T with T = sigma^2 / (2 lambda), eps = 2 lambda T."""
    g = torch.Generator().manual_seed(seed)
    x, grad, z = (torch.randn(5, 3, generator=g, dtype=f64) for _ in range(3))
    temperature = ebm.langevin_temperature(lam, sigma)
    assert temperature == pytest.approx(sigma ** 2 / (2 * lam)) and ebm.langevin_temperature(lam) == 1
    torch.testing.assert_close(decoupled_update(x, grad, lam, sigma, z),
                               sgld_update(x, grad / temperature, 2 * lam * temperature, z))


def test_reflected_langevin_samples_the_density_restricted_to_the_box():
    """A Gaussian energy on the box [0, 1]: the reflected chain samples the truncated normal
    (scipy's truncnorm), mean and variance within Monte-Carlo tolerance."""
    mu, s, eps, n = 0.8, 0.3, 2e-3, 5000
    model = Quadratic([mu], [[s * s]])
    x = run_chains(lambda v: ebm.energy(model, v), n, [mu], 1500, eps, box=(0.0, 1.0), seed=3, low=0.0, high=1.0)
    assert ((x >= 0) & (x <= 1)).all()
    t = stats.truncnorm((0 - mu) / s, (1 - mu) / s, loc=mu, scale=s)
    var = t.var()
    assert abs(x.mean().item() - t.mean()) < 4 * math.sqrt(var / n)
    # se of a sample variance: sqrt((m4 - var^2) / n), m4 of the truncated normal by quadrature
    m4 = t.expect(lambda v: (v - t.mean()) ** 4)
    assert abs(x.var().item() - var) < 4 * math.sqrt((m4 - var ** 2) / n)


@given(v=st.floats(-20, 20), low=st.floats(-3, 0), width=st.floats(0.5, 4))
def test_reflect_folds_into_the_box_as_a_mirror(v, low, width):
    high = low + width
    x = torch.tensor([v], dtype=f64)
    y = reflect(x, low, high).item()
    assert low - 1e-9 <= y <= high + 1e-9
    if low <= v <= high:
        assert y == pytest.approx(v, abs=1e-9)
    if high < v <= high + width:
        assert y == pytest.approx(2 * high - v, abs=1e-9)
    if low - width <= v < low:
        assert y == pytest.approx(2 * low - v, abs=1e-9)


def test_langevin_refuses_inference_mode_and_keeps_the_chain():
    model = Quadratic(MU, COV)
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        langevin(lambda v: ebm.energy(model, v), torch.zeros(3, 2, dtype=f64), 2, 0.1)
    x, chain = langevin(lambda v: ebm.energy(model, v), torch.zeros(3, 2, dtype=f64), 4, 0.1, keep=(0, 2, 4))
    assert [k for k, _ in chain] == [0, 2, 4] and torch.equal(chain[-1][1], x) and not x.requires_grad
    net = ebm.PointEnergy(2, 8, 1)  # the chains leave the network's parameters without gradients
    langevin(lambda v: ebm.energy(net, v), torch.zeros(3, 2), 2, 0.1)
    assert all(p.grad is None for p in net.parameters())


# ---------------------------------------------------------------------------- the CD loss

class LinearEnergy(torch.nn.Module):
    """E_theta(x) = sum_j theta_j phi_j(x): grad_theta E(x) = phi(x), known in closed form."""

    def __init__(self, theta):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.as_tensor(theta, dtype=f64))

    @staticmethod
    def features(x):
        return torch.stack([x[:, 0], x[:, 1] ** 2, torch.sin(x[:, 0] * x[:, 1])], 1)

    def forward(self, x):
        return -(self.features(x) @ self.theta)[:, None]  # one logit, -E


@given(alpha=st.floats(0, 2), seed=st.integers(0, 1000))
def test_cd_loss_gradient_is_the_data_term_minus_the_model_term(alpha, seed):
    """grad_theta L = E_data[phi] - E_model[phi] + 2 alpha (E_data[E phi] + E_model[E phi]) by
    autograd through training_loss (one forward of the network) against the closed form."""
    g = torch.Generator().manual_seed(seed)
    model = LinearEnergy(torch.randn(3, generator=g, dtype=f64))
    x_pos, x_neg = torch.randn(7, 2, generator=g, dtype=f64), torch.randn(5, 2, generator=g, dtype=f64)
    loss, parts = training_loss(model, x_pos, x_neg, alpha=alpha)
    (grad,) = torch.autograd.grad(loss, model.theta)
    phi_p, phi_n = model.features(x_pos), model.features(x_neg)
    e_p, e_n = phi_p @ model.theta.detach(), phi_n @ model.theta.detach()
    regulariser = 2 * alpha * ((e_p[:, None] * phi_p).mean(0) + (e_n[:, None] * phi_n).mean(0))
    expected = phi_p.mean(0) - phi_n.mean(0) + regulariser
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(parts["e_pos"], e_p.mean())
    torch.testing.assert_close(loss, contrastive_divergence(e_p, e_n, alpha))


def test_cd_gradient_with_exact_model_samples_is_the_nll_gradient():
    """E_theta(x) = theta x^2 / 2, Z = sqrt(2 pi / theta): with x- drawn exactly from p_theta the CD
    gradient estimates grad_theta NLL = E_data[x^2] / 2 - 1 / (2 theta) (Song & Kingma Eqs. 3-4:
    grad log Z = E_model[-grad E]), here computed by autograd of the closed-form NLL."""
    theta0, n = 2.5, 400_000
    g = torch.Generator().manual_seed(0)
    x_pos = 0.8 * torch.randn(1000, 1, generator=g, dtype=f64)
    x_neg = torch.randn(n, 1, generator=g, dtype=f64) / math.sqrt(theta0)
    theta = torch.tensor(theta0, dtype=f64, requires_grad=True)

    def model(x):
        return -theta * x ** 2 / 2

    loss, _ = training_loss(model, x_pos, x_neg, alpha=0.0)
    (cd_grad,) = torch.autograd.grad(loss, theta)
    nll = (theta * x_pos ** 2 / 2).mean() + 0.5 * torch.log(2 * math.pi / theta)
    (nll_grad,) = torch.autograd.grad(nll, theta)
    se = math.sqrt(2 / theta0 ** 2 / n) / 2  # sd of x^2 / 2 under N(0, 1/theta) over sqrt(n)
    assert abs(cd_grad.item() - nll_grad.item()) < 4 * se


def test_jem_loss_adds_the_cross_entropy_in_one_forward():
    g = torch.Generator().manual_seed(0)
    net = ebm.PointEnergy(2, 8, 1, num_outputs=3)
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    x_pos, x_neg = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    loss, parts = training_loss(net, x_pos, x_neg, y, alpha=0.3, px_weight=0.5)
    assert len(calls) == 1
    with torch.no_grad():
        lp, ln = net(x_pos), net(x_neg)
        ce = torch.nn.functional.cross_entropy(lp, y)
        cd = contrastive_divergence(energy_from_logits(lp), energy_from_logits(ln), 0.3)
    torch.testing.assert_close(loss.detach(), ce + 0.5 * cd)
    torch.testing.assert_close(parts["ce"], ce)


# ---------------------------------------------------------------------------- JEM

def test_jem_loss_with_the_regulariser_off_is_jems_objective():
    """Grathwohl et al.'s train_wrn_ebm.py, written here as there (weights 1, f = logsumexp of the
    logits): L = -(mean f(x_data) - mean f(x_q)) + CrossEntropy(logits(x_data), y). With alpha = 0
    training_loss is that, in value and in every parameter's gradient, on a tiny image network."""
    torch.manual_seed(0)
    net = ebm.ImageEnergy(1, 4, (1,), 1, num_outputs=3, act="leaky_relu", image_size=4).double()
    x_pos, x_neg = torch.rand(5, 1, 4, 4, dtype=f64), torch.rand(7, 1, 4, 4, dtype=f64)
    y = torch.tensor([0, 1, 2, 0, 2])
    theirs = (-(net(x_pos).logsumexp(1).mean() - net(x_neg).logsumexp(1).mean())
              + torch.nn.functional.cross_entropy(net(x_pos), y))
    ours, _ = training_loss(net, x_pos, x_neg, y, alpha=0.0, px_weight=1.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, list(net.parameters())),
                    torch.autograd.grad(theirs, list(net.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_jem_flag_applies_jems_settings_over_the_preset(tmp_path):
    """--jem: train_wrn_ebm.py's optimiser (Adam, lr 1e-4, betas 0.9/0.999, 1000 warm-up steps from
    lr 0), batch 64, buffer 10000 with restarts 0.05, 20 SGLD steps of 1.0 and noise 0.01 on
    [-1, 1] (0.25 and 0.005 on [0, 1]: the same chain), no regulariser, no clip; the digits preset's
    network; a typed flag wins (--alpha here); the checkpoint remembers all of it."""
    expected = dict(lr=1e-4, beta1=0.9, warmup=1000, batch_size=64, sampler="decoupled", sgld_steps=20,
                    step_size=0.25, noise=0.005, buffer_size=10000, restart=0.05, px_weight=1.0, alpha=0.0,
                    langevin_clip=0.0)
    for dataset in ("digits", "cifar10"):
        cfg = ebm.Config(**ebm.JEM_PRESETS[dataset])
        assert {k: getattr(cfg, k) for k in expected} == expected
        assert (cfg.ch, cfg.ch_mult, cfg.blocks) == tuple(ebm.PRESETS[dataset][k] for k in ("ch", "ch_mult", "blocks"))
    # SGLD on x' = 2x - 1 with step 1 and noise 0.01 is the [0, 1] chain with step 0.25, noise 0.005
    g = torch.Generator().manual_seed(0)
    x, z = torch.rand(3, 4, generator=g, dtype=f64), torch.randn(3, 4, generator=g, dtype=f64)
    grad_x = torch.randn(3, 4, generator=g, dtype=f64)  # grad_x E(x); grad_x' E = grad_x E / 2
    theirs = 2 * x - 1 - 1.0 * (grad_x / 2) + 0.01 * z
    torch.testing.assert_close((decoupled_update(x, grad_x, 0.25, 0.005, z) * 2 - 1), theirs)
    assert [ebm.learning_rate(s, ebm.Config(**ebm.JEM_PRESETS["digits"])) for s in (0, 500, 1000, 5000)] == \
        pytest.approx([0.0, 5e-5, 1e-4, 1e-4])
    assert ebm.learning_rate(0, ebm.Config()) == ebm.Config().lr  # no warm-up by default
    ebm.main(["--dataset", "digits", "--jem", "--alpha", "0.5", "--steps", "0", "--ch", "4", "--n-samples", "2",
              "--sample-steps", "1", "--out", str(tmp_path), "--device", "cpu"])
    saved = common.load_checkpoint(tmp_path / "ckpt.pt")["config"]
    assert {k: saved[k] for k in expected} == {**expected, "alpha": 0.5} and saved["jem"]
    assert ebm.Config(**ebm.PRESETS["digits"]).alpha == 0.1  # without --jem, the digits preset is unchanged


def test_learning_rate_is_a_tenth_from_lr_drop_after_the_warm_up():
    cfg = ebm.Config(lr=1e-3, lr_drop=1500)
    assert [ebm.learning_rate(s, cfg) for s in (0, 1499, 1500, 5000)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    cfg = ebm.Config(lr=1e-3, warmup=1000, lr_drop=1500)
    assert [ebm.learning_rate(s, cfg) for s in (500, 1000, 1500)] == pytest.approx([5e-4, 1e-3, 1e-4])
    points = ebm.Config(**ebm.PRESETS["points"])
    assert (points.buffer_size, points.restart, points.lr_drop) == (1000, 0.01, 1500)
    assert ebm.Config(**ebm.PRESETS["digits"]).lr_drop == 0  # images keep a constant rate


@given(c=st.floats(-50, 50), k=st.integers(1, 12), seed=st.integers(0, 1000))
def test_jem_a_constant_added_to_every_logit_leaves_p_y_given_x_and_shifts_the_energy(c, k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(4, k, generator=g, dtype=f64)
    shift = torch.zeros(4, 1, dtype=f64)
    shift[1] = c  # only example 1 is shifted
    torch.testing.assert_close(class_log_probs(logits + shift), class_log_probs(logits), rtol=0, atol=1e-10)
    diff = energy_from_logits(logits + shift) - energy_from_logits(logits)
    torch.testing.assert_close(diff, -shift[:, 0], rtol=0, atol=1e-10)


@given(k=st.integers(1, 12), seed=st.integers(0, 1000))
def test_jem_joint_is_log_p_y_given_x_plus_log_p_x(k, seed):
    """log p(x, y) + log Z = f(x)[y] = log p(y | x) + (log p(x) + log Z), log p(x) + log Z = -E(x);
    with one logit E(x) = -f(x)."""
    logits = torch.randn(5, k, generator=torch.Generator().manual_seed(seed), dtype=f64)
    torch.testing.assert_close(class_log_probs(logits) - energy_from_logits(logits)[:, None], logits)
    torch.testing.assert_close(class_log_probs(logits).exp().sum(1), torch.ones(5, dtype=f64))
    torch.testing.assert_close(energy_from_logits(logits[:, :1]), -logits[:, 0])


# ---------------------------------------------------------------------------- the replay buffer

def test_replay_buffer_restarts_the_stated_fraction_and_keeps_the_rest():
    """Chains set to 5.0, outside the box [0, 1]: a drawn chain is either kept (exactly its stored
    state) or restarted (uniform noise inside the box); the restarted fraction matches the
    stated probability within 4 binomial standard errors; update writes back only what was drawn."""
    size, n, p = 50, 40_000, 0.05
    buf = ReplayBuffer(size, (1, 2, 2), 0.0, 1.0, restart=p)
    buf.x = 5.0 + torch.arange(size, dtype=torch.float32).reshape(size, 1, 1, 1).expand(size, 1, 2, 2).clone()
    x0, idx, restarted = buf.sample(n, torch.Generator().manual_seed(0))
    kept = ~restarted
    assert torch.equal(x0[kept], buf.x[idx[kept]])
    assert ((x0[restarted] >= 0) & (x0[restarted] < 1)).all()
    assert abs(restarted.double().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert len(set(idx.tolist())) == size  # every chain can be drawn
    before = buf.x.clone()
    sel = torch.tensor([3, 7])
    buf.update(sel, torch.zeros(2, 1, 2, 2))
    assert (buf.x[sel] == 0).all()
    others = torch.ones(size, dtype=torch.bool)
    others[sel] = False
    assert torch.equal(buf.x[others], before[others])


def test_replay_buffer_starts_uniform_in_the_box_and_round_trips():
    buf = ReplayBuffer(2000, (2,), -4.0, 4.0, generator=torch.Generator().manual_seed(0))
    assert buf.x.min() >= -4 and buf.x.max() <= 4
    assert abs(buf.x.mean().item()) < 4 * (8 / math.sqrt(12)) / math.sqrt(4000)
    other = ReplayBuffer(2000, (2,), -4.0, 4.0)
    other.load_state_dict(buf.state_dict())
    assert torch.equal(other.x, buf.x)
    with pytest.raises(ValueError):
        ReplayBuffer(10, (3,), 0, 1).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError):
        ReplayBuffer(10, (2,), 0, 1, restart=1.5)


# ---------------------------------------------------------------------------- the exact 2D density

@given(m1=st.floats(-1.5, 1.5), m2=st.floats(-1.5, 1.5), s1=st.floats(0.3, 3), s2=st.floats(0.3, 3))
def test_quadrature_log_z_of_a_gaussian_energy_is_its_closed_form(m1, m2, s1, s2):
    """E = (x - m)^2 / (2 s^2) summed over the coordinates, restricted to [-4, 4]^2:
    Z = 2 pi s1 s2 prod_i (Phi((4 - m_i) / s_i) - Phi((-4 - m_i) / s_i)). The midpoint rule's error
    on a 512 grid is about (h / s)^2 / 24 relative, below 1e-4 for s >= 0.3."""
    m, s = torch.tensor([m1, m2], dtype=f64), torch.tensor([s1, s2], dtype=f64)

    def energy(x):
        return (((x.double() - m) / s) ** 2 / 2).sum(1)

    log_z = log_partition_2d(energy, -4.0, 4.0, n=512).item()
    inside = np.prod([stats.norm.cdf((4 - mi) / si) - stats.norm.cdf((-4 - mi) / si)
                      for mi, si in zip((m1, m2), (s1, s2))])
    assert log_z == pytest.approx(math.log(2 * math.pi * s1 * s2 * inside), abs=1e-4)


def test_normalised_2d_density_integrates_to_one_by_independent_quadrature():
    """A random MLP energy, normalised by the midpoint rule, integrates to 1 under Gauss-Legendre
    quadrature (a different rule, on different nodes) over the box; outside it the density is 0."""
    torch.manual_seed(0)
    net = ebm.PointEnergy(2, 32, 2).double()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.7)  # a rugged energy, several nats of range

    def energy(x):
        return ebm.energy(net, x.double())

    log_z = log_partition_2d(energy, -4.0, 4.0, n=512)
    nodes, weights = np.polynomial.legendre.leggauss(300)
    t, w = torch.tensor(4 * nodes), torch.tensor(4 * weights)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    dens = log_prob_2d(energy, pts, log_z, -4.0, 4.0).exp().reshape(300, 300)
    total = (w[:, None] * w[None, :] * dens).sum().item()
    assert total == pytest.approx(1.0, abs=1e-4)
    outside = torch.tensor([[4.01, 0.0], [0.0, -5.0], [9.0, 9.0]], dtype=f64)
    assert torch.isneginf(log_prob_2d(energy, outside, log_z, -4.0, 4.0)).all()


@pytest.mark.parametrize("t", [1.0, 0.4])
def test_oracle_mixture_energy_reproduces_the_mixture_log_density(t):
    """The oracle: a network whose energy is E(x) = -t log p(x) + 3, p a Gaussian mixture (the
    8 Gaussians of 8gaussians, std 0.3, and two anisotropic ones), goes through the likelihood
    code (scaled_energy_fn at temperature t, log_partition_2d, log_prob_2d) and gives back
    log p(x) - log M, M = p's mass in the box [-4, 4]^2 from normal CDFs (the density restricted
    to the box). Tolerance from the midpoint rule's error bound on the n x n grid,
    |Z - Z_h| <= A h^2 / 24 (sup |f_xx| + sup |f_yy|), A = 64, with sup |f_xx| <= sum_k w_k /
    (2 pi sx_k^3 sy_k) for f = sum_k w_k N(mu_k, diag(sx_k^2, sy_k^2)); relative to Z = M it bounds
    the error of log Z. The offset 3 makes log Z = log M - 3 / t, so a wrong sign of log Z fails."""
    angles = np.arange(8) * np.pi / 4
    means = np.concatenate([2.5 * np.stack([np.cos(angles), np.sin(angles)], 1), [[0.0, 0.5], [-0.5, -1.0]]])
    stds = np.concatenate([np.full((8, 2), 0.3), [[0.4, 0.7], [0.9, 0.35]]])
    w = np.concatenate([np.full(8, 0.6 / 8), [0.25, 0.15]])
    mu, sd, lw = torch.tensor(means), torch.tensor(stds), torch.tensor(np.log(w))

    def log_p(x):
        return torch.logsumexp(lw + torch.distributions.Normal(mu, sd).log_prob(x.double()[:, None]).sum(2), 1)

    class Oracle(torch.nn.Module):  # logits f(x) = -E(x)
        def forward(self, x):
            return (t * log_p(x) - 3.0)[:, None]

    n, lim = 1024, 4.0
    fn = ebm.scaled_energy_fn(Oracle(), t)
    log_z = log_partition_2d(fn, -lim, lim, n=n, chunk=2 ** 18)
    mass = float((w * np.prod(stats.norm.cdf((lim - means) / stds) - stats.norm.cdf((-lim - means) / stds), 1)).sum())
    sx, sy = stds[:, 0], stds[:, 1]
    bound = (2 * lim) ** 2 * (2 * lim / n) ** 2 / 24 * (w / (2 * np.pi * sx ** 3 * sy)
                                                          + w / (2 * np.pi * sx * sy ** 3)).sum()
    tol = -math.log(1 - bound / mass)
    assert 0 < tol < 0.01  # the bound is informative at this n
    assert abs(log_z.item() - (math.log(mass) - 3.0 / t)) < tol
    x = torch.cat([torch.tensor(means, dtype=torch.float32),
                   common.load_dataset("8gaussians", "test").data[:500], torch.tensor([[4.5, 0.0]])])
    lp = log_prob_2d(fn, x, log_z, -lim, lim)
    # log p is computed in float32 by the network path (energy_fn): an error of ~1e-6 |log p| more
    expected = log_p(x) - math.log(mass)
    assert ((lp[:-1] - expected[:-1]).abs() < tol + 1e-5 * (1 + expected[:-1].abs())).all()
    assert torch.isneginf(lp[-1])


def test_the_true_2d_densities_put_less_than_1e6_of_their_mass_outside_the_box():
    """How negligible the truncation to [-4, 4]^2 is: 8gaussians (8 Gaussians of std 0.3 on a
    circle of radius 2.5, README) in closed form with normal CDFs, its specification checked
    against common's log_prob; rings from its radial mixture (mass beyond radius 4 bounds the
    mass outside the box); checkerboard is uniform on cells inside the box."""
    angles = np.arange(8) * np.pi / 4
    centres = 2.5 * np.stack([np.cos(angles), np.sin(angles)], 1)
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=f64) * 2
    spec = torch.logsumexp(torch.stack([torch.distributions.Normal(torch.tensor(c), 0.3).log_prob(x).sum(1)
                                        for c in centres]), 0) - math.log(8)
    torch.testing.assert_close(common.load_dataset("8gaussians").log_prob(x), spec, rtol=1e-5, atol=1e-5)
    inside = np.mean([np.prod(stats.norm.cdf((4 - c) / 0.3) - stats.norm.cdf((-4 - c) / 0.3)) for c in centres])
    assert 1 - inside < 1e-6
    radii, weights = np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]) / 6
    assert (weights * stats.norm.sf((4 - radii) / 0.1)).sum() < 1e-6
    cb = common.load_dataset("checkerboard", "test").data
    assert (cb.abs() < 4).all() and torch.isfinite(common.load_dataset("checkerboard").log_prob(cb.double())).all()


# ---------------------------------------------------------------------------- networks

def test_mathematics_runs_without_common(without_common):
    """The energy, the CD and JEM losses, both Langevin forms, the buffer, the quadrature and both
    networks, run from the file's first half alone (common.py replaced by a module that fails)."""
    m = without_common("ebm")
    torch.manual_seed(0)
    net = m.PointEnergy(2, 16, 2)
    buf = m.ReplayBuffer(20, (2,), -4.0, 4.0)
    x0, idx, _ = buf.sample(6)
    x_neg = m.langevin(lambda x: m.energy(net, x), x0, 3, 0.01, box=(-4.0, 4.0))
    buf.update(idx, x_neg)
    loss, parts = m.training_loss(net, torch.randn(6, 2), x_neg, alpha=0.1)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in net.parameters())
    log_z = m.log_partition_2d(lambda x: m.energy(net, x), -4.0, 4.0, n=32)
    assert torch.isfinite(m.log_prob_2d(lambda x: m.energy(net, x), torch.zeros(2, 2), log_z, -4.0, 4.0)).all()
    image = m.ImageEnergy(1, 8, (1, 2), 1, num_outputs=10, act="silu", image_size=8)
    x = torch.rand(4, 1, 8, 8)
    x_neg = m.langevin(lambda v: m.energy(image, v), x, 2, 1.0, noise=0.01, grad_clip=0.01, box=(0.0, 1.0))
    loss, parts = m.training_loss(image, x, x_neg, torch.tensor([0, 1, 2, 3]), alpha=0.1)
    assert torch.isfinite(loss) and "acc" in parts
    with pytest.raises(ValueError):
        m.ImageEnergy(1, 8, (1, 2, 2, 2), 1, image_size=8)


def test_cifar10_preset_lays_out_the_igebm_resnet():
    """ResNet32Large's layout: a 128-channel stem, 9 residual blocks at 128/256/512 channels with
    3x3 shortcuts where the channels change, 32 -> 4 pixels, a sum-pooled linear head."""
    cfg = ebm.Config(**ebm.PRESETS["cifar10"])
    info = common.DataInfo("cifar10", "image", (3, 32, 32), levels=256, num_classes=10)
    assert cfg.spectral_norm and cfg.act == "leaky_relu"
    # spectral norm adds buffers, no parameters (checked on a small network below); it is left out
    # here because registering it on the meta device takes seconds
    with torch.device("meta"):
        net, buf = ebm.build(dataclasses.replace(cfg, spectral_norm=False), info)
    assert sum(p.numel() for p in net.parameters()) == 18_589_697
    assert len(net.blocks) == 9 and len(buf) == 10_000
    assert (cfg.sgld_steps, cfg.step_size, cfg.noise, cfg.langevin_clip, cfg.restart, cfg.alpha, cfg.batch_size) == \
        (60, 10.0, 0.005, 0.01, 0.05, 1.0, 128)
    small, plain = (ebm.ImageEnergy(3, 8, (1, 2, 4), 3, spectral_norm=sn, image_size=32) for sn in (True, False))
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in plain.parameters())
    assert small.blocks(small.stem(torch.rand(2, 3, 32, 32))).shape == (2, 32, 4, 4)


# ---------------------------------------------------------------------------- command line

POINTS = ["--dataset", "8gaussians", "--hidden", "16", "--depth", "2", "--buffer-size", "200", "--sgld-steps", "3",
          "--sample-steps", "6", "--n-samples", "30", "--quad-n", "64", "--batch-size", "32", "--log-every", "1",
          "--device", "cpu"]
DIGITS = ["--dataset", "digits", "--ch", "8", "--buffer-size", "100", "--sgld-steps", "2", "--n-samples", "10",
          "--batch-size", "16", "--log-every", "1", "--device", "cpu"]


def test_cli_points_train_eval_sample(tmp_path):
    ebm.main(["--out", str(tmp_path), "--steps", "4", "--save-every", "2"] + POINTS)
    for name in ["ckpt.pt", "samples_2.png", "samples_4.png", "chain.png", "density.png", "energies.png", "loss.png"]:
        assert (tmp_path / name).is_file(), name
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and all("e_pos" in r and "e_neg" in r for r in lines)
    result = ebm.main(["--eval", str(tmp_path / "ckpt.pt"), "--quad-n", "128", "--device", "cpu"])
    d = np.load(tmp_path / "density.npz")
    assert d["log_density"].shape == (128, 128) and float(d["lim"]) == 4.0
    cell = (8 / 128) ** 2  # the 128-grid density sums to about 1 over the box
    assert np.exp(d["log_density"]).sum() * cell == pytest.approx(1.0, abs=1e-2)
    ev = events(tmp_path)[-1]
    assert ev["event"] == "eval" and ev["nll"] == pytest.approx(result["nll"]) and math.isfinite(ev["nll"])
    assert "entropy" in ev and ev["quad_n"] == 128 and ev["outside_box"] == 0 and "bits_per_dim" not in ev
    assert ev["temperature"] == 1.0 and ev["log_z_change_half_grid"] < 1e-3
    ebm.main(["--sample", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "s"), "--n-samples", "7",
              "--device", "cpu"])
    x = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    assert x.shape == (7, 2) and x.dtype == torch.float32 and (x.abs() <= 4).all()
    ev = events(tmp_path / "s")[-1]
    assert ev["event"] == "sample" and ev["n"] == 7 and ev["langevin_steps"] == 6 and ev["init"] == "buffer"
    assert (tmp_path / "s" / "chain.png").is_file() and (tmp_path / "s" / "samples.png").is_file()


def test_eval_of_a_decoupled_run_normalises_exp_of_minus_e_over_t(tmp_path):
    """A run with the decoupled sampler is fitted as exp(-E / T) / Z_T, T = sigma^2 / (2 lambda):
    --eval normalises that density, whose 128-grid values sum to 1 over the box."""
    ebm.main(["--out", str(tmp_path), "--steps", "1", "--sampler", "decoupled", "--step-size", "0.5",
              "--noise", "0.2"] + POINTS)
    result = ebm.main(["--eval", str(tmp_path / "ckpt.pt"), "--quad-n", "128", "--device", "cpu"])
    assert result["temperature"] == pytest.approx(0.2 ** 2 / (2 * 0.5))
    d = np.load(tmp_path / "density.npz")
    assert np.exp(d["log_density"]).sum() * (8 / 128) ** 2 == pytest.approx(1.0, abs=1e-2)


@pytest.mark.parametrize("jem", [False, True])
def test_cli_digits_train_sample_eval(tmp_path, jem):
    ebm.main(["--out", str(tmp_path), "--steps", "2", "--save-every", "2"] + DIGITS + (["--jem"] if jem else []))
    for name in ["ckpt.pt", "samples_2.png", "chain.png", "energies.png"]:
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "density.png").exists()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert ("acc" in line and "ce" in line) == jem
    # by default --sample continues buffer chains for one training draw (--sgld-steps 2)
    ebm.main(["--sample", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "s"), "--n-samples", "5",
              "--device", "cpu"])
    x = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.uint8 and x.max() <= 16
    ev = events(tmp_path / "s")[-1]
    assert (ev["init"], ev["langevin_steps"]) == ("buffer", 2)
    ebm.main(["--sample", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "s"), "--n-samples", "5",
              "--sample-steps", "3", "--sample-init", "noise", "--device", "cpu"])
    ev = events(tmp_path / "s")[-1]
    assert (ev["init"], ev["langevin_steps"]) == ("noise", 3)
    result = ebm.main(["--eval", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "e"), "--device", "cpu"])
    ev = events(tmp_path / "e")[-1]
    assert "nll" not in ev and "bits_per_dim" not in ev and "not computed" in ev["likelihood"]
    assert math.isfinite(ev["energy_test"]) and ev["n"] == 300
    assert ("accuracy" in ev) == jem and (not jem or 0 <= result["accuracy"] <= 1)


@pytest.mark.parametrize("argv, words", [
    (["--jem"], "--jem"),
    (["--restart", "1.5"], "--restart"),
    (["--step-size", "0"], "--step-size"),
    (["--dataset", "digits", "--ch-mult", "1,2,2,2"], "--ch-mult"),
    (["--quad-n", "0"], "--quad-n"),
    (["--lr-drop", "-1"], "--lr-drop"),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        ebm.main(argv + ["--out", str(tmp_path), "--steps", "1", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and words in err
