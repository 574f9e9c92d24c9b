"""What limits the Frechet distance of each system that misses issue 28's targets on digits: one
cheap measurement per system on its trained digits checkpoint, in quality.py's classifier features.

    python benchmarks/quality_limits.py [--n 1000] [--models LABEL ...] [--long-steps 4000]

The targets (issue 28): every family at most 4 times the floor (quality.py's training images),
diffusion, score and autoregressive models at most 2 times. Each system's run of the table
(runs/bench/<system>-digits-2000: 2000 steps at batch 64) is reused when its command is the same,
also when an earlier version of its model file trained it (its command.json without or with
another source hash; the table's rows were measured on those runs, and their stored samples give
the table's number again, shown beside each measurement); a missing run is trained by _runs.train.
Every Frechet distance is quality.py's: `--n` images against the 300 test images. The measurements:

- vae, vqvae, vqvae --levels 2: the decoder's reconstructions of the floor's `--n` training images
  (vae: the decoder mean at the posterior mean, vae.reconstruct; vqvae: the decoder's mode at the
  encoder's codes, as --sample decodes) against the prior samples: the decoder's limit against the
  prior's. vae also: decoder means at z from the full-covariance Gaussian fitted to the posterior
  means of the 1497 training images (whether a better Gaussian prior would do).
- realnvp (--arch glow, maf), ffjord (--arch residual): samples at the prior temperature T = 0.7,
  0.85 and 1, z ~ N(0, T^2 I) (Kingma & Dhariwal 2018, arXiv 1807.03039, Sec. 6), from one shared
  draw: whether the samples' error sits in the tails of the base distribution; and samples
  f^{-1}(z) at z from the Gaussian fitted to the latents f(x + u) of the 1497 training images,
  whether it sits in the base's shape; with the dequantised bound in bits/dim on the training and
  the test images (computed on the same pass) and the fitted Gaussian's mean norm and covariance
  eigenvalues.
- ddim: the sampling steps S and eta (Song et al. 2021, arXiv 2010.02502, Eqs. 12 and 16; the
  file's tau, x0_hat clipped, as --sample), from one shared x_T: the sampler's share.
- pixelcnn, gpt: the checkpoint against a run of `--long-steps` steps (the preset's cosine schedule
  stretched over them): the training budget's share.
- ebm: the replay buffer's chains as the checkpoint stores them, the same chains continued for one
  training draw's Langevin steps (the table's samples) and fresh chains from uniform noise (ebm.py's
  own length, 25 times a training draw): whether the samples owe their quality to the energy or to
  the persistent chains.

Writes the `quality-limits` section of benchmarks/results/quality.md (which quality.py keeps when
it redraws its table) and benchmarks/results/quality_limits.json, the numbers with each system's
command, machine and date.
"""
import argparse
import hashlib
import json
import re
import sys
import time

import torch

from _runs import (RESULTS, ROOT, RUNS, SYSTEMS, last_event, merge_rows, model_of, provenance, read_metrics, run, shown,
                   train, training_length as training_time, write_section)
from quality import features, frechet_distance, reference, samples_of

sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import ddim  # noqa: E402
import ebm  # noqa: E402
import ffjord  # noqa: E402
import realnvp  # noqa: E402
import vae  # noqa: E402
import vqvae  # noqa: E402

STEPS = 2000                                       # the table's runs
TEMPERATURES = (0.7, 0.85, 1.0)
DDIM = ((20, 0.0), (50, 0.0), (100, 0.0), (200, 0.0), (1000, 1.0))   # (S, eta); the table: S = 50, eta 0
DDPM_NET = ((50, 0.0), (200, 0.0))                 # the same sampler on ddpm.py's run
TARGET = {"ar": 2, "latent": 4, "flow": 4, "diffusion": 2, "energy": 4}            # times the floor (issue 28)
FAMILY = {"pixelcnn": "ar", "gpt": "ar", "vae": "latent", "vqvae": "latent", "realnvp": "flow", "ffjord": "flow",
          "ddim": "diffusion", "ebm": "energy"}


class Scorer:
    """quality.py's Frechet distance against the test images, and its floor."""

    def __init__(self, n):
        self.net, self.accuracy, self.test_features, self.real, self.floor = reference(n)
        self.n = n

    def __call__(self, images):
        """images (N, 1, 8, 8): integer levels, or floats in [0, 1]."""
        return frechet_distance(features(self.net, images.reshape(-1, 1, 8, 8).cpu(), 17), self.test_features)

    def spread(self, images, k=20):
        """The standard deviation of the distance over k bootstrap resamples of the images (drawn
        with replacement, seed 0): the scale of its sampling error at this n."""
        f, g = features(self.net, images.reshape(-1, 1, 8, 8).cpu(), 17), torch.Generator().manual_seed(0)
        d = [frechet_distance(f[torch.randint(len(f), (len(f),), generator=g).numpy()], self.test_features)
             for _ in range(k)]
        return torch.tensor(d).std().item()


def run_of(label, steps):
    """(run folder, whether the current model file trained it): the run `_runs.train` would give for
    `label` on digits at batch 64, reused also when its command.json names no or another source."""
    model, flags = SYSTEMS[label]
    out = RUNS / f"{re.sub(r'[^A-Za-z0-9_.]+', '-', label)}-digits-{steps}"
    want = {"model": model, "dataset": "digits", "steps": steps, "extra": list(map(str, [*flags, "--batch-size", 64]))}
    source = hashlib.sha256((ROOT / f"{model}.py").read_bytes()).hexdigest()[:16]
    stamp = out / "command.json"
    if (out / "ckpt.pt").exists() and stamp.exists():
        got = json.loads(stamp.read_text())
        if {k: got.get(k) for k in want} == want:
            return out, got.get("source") == source
    return train(label, "digits", steps, ["--batch-size", 64]), True


# --- the measurements: each returns {setting: Frechet distance} (and a dict of other numbers)

def gaussian_fit(z):
    """(mean m, Cholesky factor L of the covariance S) of latents z (N, D), float64."""
    S = torch.cov(z.T)
    return z.mean(0), torch.linalg.cholesky(S + 1e-6 * torch.eye(len(S), dtype=S.dtype))


@torch.no_grad()
def decoder_against_prior(label, out, fd):
    """vae, vqvae: the decoder's reconstructions of the floor's training images, and prior samples;
    vae also decoder means at z from the Gaussian fitted to the training images' posterior means."""
    if SYSTEMS[label][0] == "vae":
        net, cfg, info = vae.load(out / "ckpt.pt")
        x = vae.prepare(fd.real, info, net.likelihood, torch.Generator().manual_seed(0))
        recon = vae.as_image(vae.reconstruct(net, x), net)
        train = vae.prepare(common.load_dataset("digits", "train").data, info, net.likelihood,
                            torch.Generator().manual_seed(0))
        m, L = gaussian_fit(net.posterior(train)[0].double())
        z = m + torch.randn(fd.n, len(m), generator=torch.Generator().manual_seed(0), dtype=L.dtype) @ L.T
        fitted = vae.as_image(net.likelihood.mean(net.decode(z.float())), net)
        return {"reconstructions": fd(recon), "z ~ N(m, S) of the posterior means": fd(fitted),
                "prior samples": fd(samples_of(label, out, fd.n))}
    (vq, prior), cfg, info = vqvae.load(out / "ckpt.pt")
    logits = vq(vqvae.to_model_space(fd.real, info))[0]
    recon = vqvae.decoder_sample(logits, vqvae.decoder_levels(info), mode=cfg.decode == "mode")
    return ({"reconstructions": fd(recon), "prior samples": fd(samples_of(label, out, fd.n))},
            {"prior_updates": int(prior.updates)})


def flow_latents(model, net, cfg, info, x, generator, chunk=500):
    """(z = f(x + u) flattened (B, D) float64, the dequantised bound -log p(x + u) in bits/dim averaged
    over x) of images x (levels; u ~ U[0, 1) from `generator`), through the model file's log_prob."""
    zs, nats = [], []

    def flow(v, *args):                            # the flow, its z kept
        out = net(v, *args)
        zs.append(out[0].flatten(1).double())
        return out
    with torch.no_grad():                          # the CNF's trace needs autograd inside
        for xb in x.split(chunk):
            v = model.dequantize(xb, torch.rand(xb.shape, generator=generator))
            if model is realnvp:
                nats.append(-realnvp.log_prob(flow, v))
            else:
                nats.append(-ffjord.log_prob(flow, v, ffjord.eval_options(cfg, info, cfg), None, generator)[0])
    return torch.cat(zs), model.bits_per_dim(torch.cat(nats).mean().item(), x[0].numel())


def flow_inverse(model, net, cfg, info, z):
    """x = f^{-1}(z) as integer levels: RealNVP.sample's and FFJORD.sample's map, for a given z."""
    with torch.inference_mode():
        if model is realnvp:
            return realnvp.quantize(net.inverse(z), net.levels)
        return ffjord.quantize(net.pre.inverse(net.body.inverse(z, ffjord.eval_options(cfg, info, cfg))), net.levels)


def temperatures(label, out, fd):
    """Flows: samples at prior temperature T from one shared base draw (the seed of --sample), and
    samples at z ~ N(m, S), the Gaussian fitted to the latents z = f(x + u) of the 1497 training
    images (whether the map is at fault or the latents of the data are not N(0, I))."""
    model = realnvp if SYSTEMS[label][0] == "realnvp" else ffjord
    net, cfg, info = model.load(out / "ckpt.pt")
    z0 = torch.randn(fd.n, *net.event_shape, generator=torch.Generator().manual_seed(0))   # --sample's draw
    result = {f"T = {T:g}": fd(flow_inverse(model, net, cfg, info, T * z0)) for T in TEMPERATURES}
    z, train_bits = flow_latents(model, net, cfg, info, common.load_dataset("digits", "train").data,
                                 torch.Generator().manual_seed(0))
    test_bits = flow_latents(model, net, cfg, info, common.load_dataset("digits", "test").data,
                             torch.Generator().manual_seed(0))[1]
    m, L = gaussian_fit(z)
    fitted = m + torch.randn(fd.n, len(m), generator=torch.Generator().manual_seed(0), dtype=L.dtype) @ L.T
    result["z ~ N(m, S) of f(train)"] = fd(flow_inverse(model, net, cfg, info, fitted.float().reshape(z0.shape)))
    eig = torch.linalg.eigvalsh(L @ L.T)
    return result, {"train_bits_per_dim": train_bits, "test_bits_per_dim": test_bits,
                    "latent_mean_norm": m.norm().item(), "latent_var_mean": eig.mean().item(),
                    "latent_cov_eig_min": eig[0].item(), "latent_cov_eig_max": eig[-1].item()}


def sampler_steps(label, out, fd):
    """ddim: S and eta from one shared x_T (the seed of --sample), the file's tau, x0_hat clipped; the
    same for the network of ddpm.py's run (the same configuration trained again: a second network)."""
    result = {}
    for name, folder, settings in (("", out, DDIM), ("ddpm.py's network: ", run_of("ddpm", STEPS)[0], DDPM_NET)):
        (net, alphas_cumprod), cfg, info = ddim.load(folder / "ckpt.pt")
        x_T = torch.randn((fd.n, *info.shape), generator=torch.Generator().manual_seed(0))
        for S, eta in settings:
            x = ddim.ddim_sample(net, alphas_cumprod, x_T=x_T, steps=S, eta=eta, skip=cfg.skip or ddim.paper_skip(info),
                                 clip_x0=True, generator=torch.Generator().manual_seed(1))
            key = f"{name}S = {S}, eta = {eta:g}"
            result[key] = fd(ddim.to_levels(x, info))
            print(f"  {key}: {result[key]:.2f}", flush=True)
    return result


def bits(label, out):
    """(the last logged training loss, the test NLL by the model file's --eval; run once, then read
    from metrics.jsonl), both in bits/dim, of the run in `out`."""
    if not any(r.get("event") == "eval" for r in read_metrics(out)):
        run(model_of(label), ["--eval", out / "ckpt.pt", "--out", out], out / "log.txt")
    train_bits = [r["bits_per_dim"] for r in read_metrics(out) if "step" in r and "event" not in r][-1]
    return train_bits, last_event(out, "eval")["bits_per_dim"]


def training_length(label, out, fd, long_steps):
    """AR: the checkpoint's samples against those of a run of long_steps steps (trained here once),
    with each run's training and test bits/dim."""
    longer, _ = run_of(label, long_steps)
    (train0, test0), (train1, test1) = bits(label, out), bits(label, longer)
    x0, x1 = samples_of(label, out, fd.n), samples_of(label, longer, fd.n)
    return ({f"{STEPS} steps": fd(x0), f"{long_steps} steps": fd(x1)},
            {"long_run_training_seconds": training_time(longer)[1] or float("nan"), "train_bits_per_dim": train0,
             "test_bits_per_dim": test0, "long_train_bits_per_dim": train1, "long_test_bits_per_dim": test1,
             "nearest_train_l1": nearest_training_distance(x0), "long_nearest_train_l1": nearest_training_distance(x1),
             "test_nearest_train_l1": nearest_training_distance(common.load_dataset("digits", "test").data)})


def nearest_training_distance(images):
    """The mean over images of the L1 distance (in levels, over the 64 pixels) to the nearest of the
    1497 training images: a sample that copies one scores 0; the test images score the typical
    distance of a new digit."""
    train_set = common.load_dataset("digits", "train").data.reshape(-1, 64).float()
    return torch.cdist(images.reshape(-1, 64).float(), train_set, p=1).min(1).values.mean().item()


def chains(label, out, fd):
    """ebm: the buffer as stored, continued for one training draw's steps, fresh chains from noise."""
    (net, buffer), cfg, info = ebm.load(out / "ckpt.pt")
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(buffer), (fd.n,), generator=torch.Generator().manual_seed(0))
    return {"buffer as stored": fd(ebm.to_levels(buffer.x[idx], info)),
            f"buffer + {ebm.sample_steps(cfg, 'buffer')} steps": fd(ebm.to_levels(
                ebm.buffer_chains(net, buffer, fd.n, info, cfg, torch.Generator().manual_seed(0)), info)),
            f"noise + {ebm.sample_steps(cfg, 'noise')} steps": fd(ebm.to_levels(
                ebm.fresh_chains(net, fd.n, info, cfg, "cpu", g), info))}


MEASURE = {
    "pixelcnn": training_length, "gpt": training_length,
    "vae": decoder_against_prior, "vqvae": decoder_against_prior, "vqvae --levels 2": decoder_against_prior,
    "realnvp": temperatures, "realnvp --arch glow": temperatures, "realnvp --arch maf": temperatures,
    "ffjord": temperatures, "ffjord --arch residual": temperatures,
    "ddim": sampler_steps,
    "ebm": chains,
}


# --- what the numbers say

def reading(label, r, floor):
    """One sentence per system, built from its numbers."""
    d, target = r["fd"], TARGET[FAMILY[SYSTEMS[label][0]]] * floor
    kind, meets = MEASURE[label], (lambda v: "within" if v <= target else "above")
    if kind is decoder_against_prior:
        rec, pri = d["reconstructions"], d["prior samples"]
        text = (f"the decoder's reconstructions score {rec:.2f} ({meets(rec)} the target {target:.1f}), its prior "
                + (f"(after {r['prior_updates']} updates) " if "prior_updates" in r else "")
                + f"samples {pri:.2f}: {pri - rec:.1f} of the distance is the prior's, {rec - floor:.1f} the decoder's")
        if "z ~ N(m, S) of the posterior means" in d:
            fit = d["z ~ N(m, S) of the posterior means"]
            text += (f"; z from a full-covariance Gaussian fitted to the training images' posterior means decodes "
                     f"to {fit:.2f}, so no Gaussian prior closes it: the aggregate posterior is not Gaussian")
        return text + ("; the prior limits it" if pri - rec > rec - floor else "; the decoder limits it")
    if kind is temperatures:
        fit, one = d["z ~ N(m, S) of f(train)"], d["T = 1"]
        colder = min(v for k, v in d.items() if k.startswith("T =") and k != "T = 1")
        gap = r["test_bits_per_dim"] - r["train_bits_per_dim"]
        return ((f"not the base's tails: a colder prior scores worse (best {colder:.2f})" if colder > one
                 else f"partly the base's tails: a colder prior scores {colder:.2f}")
                + f"; a Gaussian fitted to the latents f(x) of the training images (mean norm "
                f"{r['latent_mean_norm']:.2f}, covariance eigenvalues {r['latent_cov_eig_min']:.2f} to "
                f"{r['latent_cov_eig_max']:.2f}) gives {fit:.2f}"
                + (f", {one - fit:.1f} better than N(0, I) but still {meets(fit)} the target {target:.1f}, so most of "
                   "the distance" if fit < one else f", no better, so the distance") + " is the inverse map's own: it "
                "sends typical latents to non-digits (test bound "
                f"{r['test_bits_per_dim']:.2f} bits/dim, {gap:.2f} above its training bound"
                + (", an overfit map)" if gap > 0.3 else ")"))
    if kind is sampler_steps:
        own = {k: v for k, v in d.items() if not k.startswith("ddpm")}
        det = [(k, v) for k, v in own.items() if k.endswith("eta = 0")]
        (k0, v0), (k1, v1) = det[0], det[-1]
        ka, va = [(k, v) for k, v in own.items() if not k.endswith("eta = 0")][-1]
        other = {k.split(": ")[1]: v for k, v in d.items() if k.startswith("ddpm")}
        same = [(k, v, own[k]) for k, v in other.items() if k in own]
        return (f"deterministic DDIM goes from {v0:.2f} ({k0.split(',')[0]}) to {v1:.2f} ({k1.split(',')[0]}), "
                f"the stochastic sampler at {ka} scores {va:.2f} ({meets(va)} the target {target:.1f}); the same "
                "configuration trained again (ddpm.py's run) scores "
                + ", ".join(f"{v:.2f} at {k}" for k, v, _ in same)
                + (" under the same sampler, within the target: the miss is this training run's network, within the "
                   "spread between two runs" if min(v for _, v, _ in same) <= target else
                   " under the same sampler, also above the target: the deterministic sampler on a network of this "
                   "budget stops near " + f"{min(v for _, v, _ in same):.1f}")
                + (f"; the best, {min(d.values()):.2f}, is within one bootstrap standard deviation "
                   f"({r['table_bootstrap_sd']:.1f}) of the target, so the miss is at the edge of what {r['n']} "
                   "samples resolve"
                   if "table_bootstrap_sd" in r and min(d.values()) - target <= r["table_bootstrap_sd"] else ""))
    if kind is training_length:
        (k0, v0), (k1, v1) = d.items()
        return (f"{k0} {v0:.2f}, {k1} {v1:.2f} (trained in {r['long_run_training_seconds'] / 60:.1f} min): the "
                "longer run " + (f"lowers it by {v0 - v1:.1f}" if v1 < v0 else f"raises it by {v1 - v0:.1f}")
                + (f", within the target {target:.1f}" if v1 <= target else f", still above the target {target:.1f}")
                + f"; meanwhile its training loss falls from {r['train_bits_per_dim']:.2f} to "
                f"{r['long_train_bits_per_dim']:.2f} bits/dim and its test NLL rises from {r['test_bits_per_dim']:.2f} "
                f"to {r['long_test_bits_per_dim']:.2f}, yet its samples are no copies (mean L1 distance to the nearest "
                f"training image {r['nearest_train_l1']:.0f} then {r['long_nearest_train_l1']:.0f} levels, test "
                f"images' {r['test_nearest_train_l1']:.0f})"
                + (": the samples are limited by the training length, which the test likelihood pays for"
                   if v1 < v0 else ": more steps do not help"))


    (k0, v0), (k1, v1), (k2, v2) = d.items()
    return (f"the samples are the replay buffer's, not the energy's: chains from uniform noise score {v2:.2f} "
            f"after {k2.split('+ ')[1]}, and continuing the buffer's chains moves them away from the digits "
            f"({v0:.2f} as stored, {v1:.2f} after {k1.split('+ ')[1]}); the learned energy's Langevin dynamics "
            "do not lead to digits")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--long-steps", type=int, default=2 * STEPS, help="pixelcnn, gpt: the longer run's steps")
    p.add_argument("--models", nargs="*", default=None, help="systems to measure now (default all of them); the "
                        "section keeps the others' stored numbers")
    args = p.parse_args()
    fd = Scorer(args.n)
    table = json.loads((RESULTS / "quality.json").read_text())
    rows = {}
    for label in MEASURE if args.models is None else args.models:
        print(f"{label} ...", flush=True)
        out, current = run_of(label, STEPS)
        start = time.perf_counter()
        kind = MEASURE[label]
        d = kind(label, out, fd, args.long_steps) if kind is training_length else kind(label, out, fd)
        d, extra = d if isinstance(d, tuple) else (d, {})
        rows[label] = {"fd": {k: round(v, 2) for k, v in d.items()}, **{k: round(v, 4) for k, v in extra.items()},
                       "floor": round(fd.floor, 2), "n": args.n,
                       "table": round(fd(samples_of(label, out, fd.n)), 2),
                       "table_bootstrap_sd": round(fd.spread(samples_of(label, out, fd.n)), 2), "run": out.name,
                       "trained_by_current_file": current, "seconds": round(time.perf_counter() - start, 1),
                       "quality_table": table.get(label, {}).get("cells")}
        print(f"  {rows[label]}", flush=True)
    cmd = "python benchmarks/quality_limits.py" + (f" --n {args.n}" if args.n != 1000 else "") + \
        (f" --long-steps {args.long_steps}" if args.long_steps != 2 * STEPS else "") + \
        (" --models " + " ".join(f"'{m}'" for m in args.models) if args.models else "")
    merged = merge_rows("quality_limits", rows, cmd)
    lines = []
    for label, r, _ in merged:
        target = TARGET[FAMILY[SYSTEMS[label][0]]]
        measured = " / ".join(f"{k}: {v:.2f}" for k, v in r["fd"].items())
        cells = r["quality_table"]
        other = (f" (the table's {cells[0]} is another run: {cells[1] if len(cells) > 1 else '2000 steps'})"
                 if cells and abs(float(cells[0]) - r["table"]) > 0.005 else "")
        sd = f" ± {r['table_bootstrap_sd']:.1f}" if "table_bootstrap_sd" in r else ""
        lines.append(f"| {shown(label)} | {r['table']:.2f}{sd}{other} | "
                     f"{target}x = {target * r['floor']:.1f} | "
                     f"{measured} | {r['seconds']:.0f} s"
                     + (f" + {r['long_run_training_seconds'] / 60:.1f} min training" if "long_run_training_seconds" in r
                        else "") + f" | {reading(label, r, r['floor'])} |")
    old = [label for label, r, _ in merged if not r["trained_by_current_file"]]
    md = ("### What limits each Frechet distance\n\n"
          f"For every system above its target (issue 28: at most 4x the floor of {fd.floor:.2f}, diffusion, score and "
          "autoregressive models at most 2x), one measurement on its digits checkpoint of the table (2000 steps at "
          "batch 64), in the same classifier features against the same 300 test images, "
          f"{args.n} samples each; \"table\" is the Frechet distance of the samples stored beside the checkpoint "
          "(the table's number when it is the table's run) ± the standard deviation of that distance over 20 "
          "bootstrap resamples of them, the scale of a distance's sampling error at this n (differences between "
          "settings drawn from one shared noise, as below, vary less). "
          + (f"Runs trained by an earlier version of their model file (reused; the table's rows were measured on "
             f"them): {', '.join(shown(m) for m in old)}. " if old else "")
          + "Reconstructions: of the floor's training images (vae: the decoder mean at the posterior mean; vqvae: "
          "the decoder's mode at the encoder's codes). T: prior temperature, z ~ N(0, T^2 I) from one shared draw "
          "(Kingma & Dhariwal 2018). S, eta: DDIM's steps and noise (Song et al. 2021 Eq. 16) from one shared x_T, "
          "x0_hat clipped as `ddim.py --sample`. Steps: the table's run against one of twice the steps (the "
          "preset's cosine schedule stretched). ebm: replay-buffer chains as stored, continued, and fresh chains "
          "from uniform noise. Time: this script's wall time per system (with the longer run's training, made "
          f"once). {provenance(merged)}\n\n"
          "| system | table | target | measured | time | reading |\n|---|---|---|---|---|---|\n" + "\n".join(lines))
    write_section("quality-limits", md, RESULTS / "quality.md")
    print(md)


if __name__ == "__main__":
    main()
