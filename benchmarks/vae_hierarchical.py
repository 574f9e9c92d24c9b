"""vae.py --arch hierarchical on digits: how many nats each latent group carries, and prior samples
at a few temperatures.

    python benchmarks/vae_hierarchical.py [--fresh] [--k-eval K]

Uses the digits run of benchmarks/likelihood.py (the same command, so a finished run and its
`--eval` are reused; otherwise trains the digits preset at batch 64 and evaluates it with
IWAE-5000, or with IWAE-K into a folder of its own when --k-eval K is given). Draws
benchmarks/results/vae_hierarchical_kl.png: the test-set KL of each group (from `--eval`) and the
KL of each group on the fixed training batch over training (the diagnostics events), and
benchmarks/results/vae_hierarchical_samples.png: decoder means of prior samples, one row of 8 per
temperature. Writes the table into benchmarks/results/vae.md (section vae-hierarchical).
"""
import argparse
import os
import sys

import torch

from _runs import RESULTS, ROOT, RUNS, last_event, read_metrics, run, stamp, train, training_length, write_section

sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import vae  # noqa: E402

LABEL = "vae --arch hierarchical"
TEMPERATURES = (1.0, 0.9, 0.8, 0.6)


def groups(cfg):
    """(resolution, latent dimensions) of each group of a configuration."""
    return [(r, cfg.latent * r * r) for r, _ in vae.parse_blocks(cfg.dec_blocks, "decoder")]


def kl_figure(out, test_kl, cfg, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    g = groups(cfg)
    names = [f"{l + 1}\n{r}x{r}" for l, (r, _) in enumerate(g)]
    diag = [r for r in read_metrics(out) if r.get("event") == "diagnostics"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].bar(range(len(g)), test_kl, color=[f"C{[1, 2, 4, 8, 16, 32].index(r) % 10}" for r, _ in g])
    axes[0].set_xticks(range(len(g)), names)
    axes[0].set(xlabel="group (top to bottom) and resolution", ylabel="KL (nats per image)",
                title=f"test set: KL per group, {sum(test_kl):.1f} nats in all")
    steps = [d["at_step"] for d in diag]
    for l, (r, _) in enumerate(g):
        axes[1].plot(steps, [d["kl_per_group"][l] for d in diag], label=f"{l + 1} ({r}x{r})")
    axes[1].set(xlabel="training step", ylabel="KL (nats per image)", title="fixed training batch, EMA weights")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def samples_figure(ckpt, path):
    net, _, info = vae.load(ckpt)
    rows = []
    for t in TEMPERATURES:
        g = torch.Generator().manual_seed(0)
        rows.append(vae.as_image(vae.sample_top_down(net, 8, (t,), mean=True, generator=g), net))
    common.save_image_grid(torch.cat(rows), path, nrow=8,
                           title="decoder means of prior samples; rows: temperature " +
                                 ", ".join(map(str, TEMPERATURES)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--k-eval", type=int, default=None, help="IWAE-K instead of the likelihood table's IWAE-5000")
    args = p.parse_args()
    out = train(LABEL, "digits", None, ["--batch-size", 64], args.fresh)
    evals = out if args.k_eval is None else RUNS / f"vae-hierarchical-digits-eval-k{args.k_eval}"
    if args.fresh or not any(r.get("event") == "eval" for r in read_metrics(evals)):
        evals.mkdir(parents=True, exist_ok=True)
        k = [] if args.k_eval is None else ["--k-eval", args.k_eval]
        run("vae", ["--eval", out / "ckpt.pt", "--out", evals, *k], evals / "log.txt")
    e = last_event(evals, "eval")
    cfg = common.saved_config(vae.Config, common.load_checkpoint(out / "ckpt.pt"))[0]
    kl_figure(out, e["kl_per_group"], cfg, RESULTS / "vae_hierarchical_kl.png")
    samples_figure(out / "ckpt.pt", RESULTS / "vae_hierarchical_samples.png")
    steps, seconds = training_length(out)
    command = "python benchmarks/vae_hierarchical.py" + (f" --k-eval {args.k_eval}" if args.k_eval else "")
    rows = "\n".join(f"| {l + 1} | {r}x{r} | {d} | {kl:.2f} | {kl / d:.4f} |"
                     for l, ((r, d), kl) in enumerate(zip(groups(cfg), e["kl_per_group"])))
    time = f", {seconds / 60:.1f} min" if seconds else ""
    md = (f"### Hierarchical VAE (VD-VAE, issue 24): nats per latent group on digits\n\n"
          f"`vae.py --arch hierarchical`, the digits preset ({cfg.width} channels, {len(groups(cfg))} groups of "
          f"{cfg.latent} channels at {', '.join(sorted({f'{r}x{r}' for r, _ in groups(cfg)}))}), trained "
          f"{steps} steps at batch {cfg.batch_size}{time} (one thread; load average {os.getloadavg()[0]:.0f} on "
          f"{os.cpu_count()} cores when this was written, so wall times are inflated). Test set ({e['n']} images): "
          f"IWAE-{e['k']} {e['bits_per_dim']:.3f} bits/dim, ELBO {e['elbo_bits_per_dim']:.3f} bits/dim "
          f"(nll {e['nll']:.2f} ± {e['nll_se']:.2f} nats, ELBO {e['elbo']:.2f} ± {e['elbo_se']:.2f}). "
          f"KL of each group on the test set (closed form, nats per image), and per latent dimension. "
          f"Produced by {stamp(command)}.\n\n"
          "| group | resolution | latent dims | KL (nats) | KL per dim |\n|---|---|---|---|---|\n" + rows +
          "\n\n![KL per group](vae_hierarchical_kl.png)\n\n![prior samples](vae_hierarchical_samples.png)")
    write_section("vae-hierarchical", md, RESULTS / "vae.md")
    print(md)


if __name__ == "__main__":
    main()
