"""Speed of ddpm.py's CIFAR-10 U-Net next to diffusers' UNet2DModel built with the same configuration.

Both networks are the DDPM CIFAR-10 model (Ho et al. 2020: channels 128, multipliers 1,2,2,2,
two residual blocks per resolution, single-head attention at 16x16, dropout 0.1, 35.7M
parameters) with random weights, on this machine's CPU. Measured per model:
  - training images/s: forward + backward + Adam step of the epsilon MSE at random t;
  - sampling images/s per step: one network evaluation under inference_mode (a sampler
    with S steps makes S of these, so images/s for a full sample = this / S).
The two models are timed in alternation, iteration by iteration, and the median iteration
is reported, so that other processes sharing the CPU slow both alike.

diffusers is needed for this script only (`pip install diffusers`); ddpm.py does not use it.

    OMP_NUM_THREADS=1 python benchmarks/compare_diffusers.py --batch-size 4 --steps 5
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import ddpm  # noqa: E402


def our_unet():
    cfg = ddpm.Config(**ddpm.PRESETS["cifar10"])
    info = common.DataInfo("cifar10", "image", (3, 32, 32), levels=256, num_classes=10)
    net, _ = ddpm.build(cfg, info)
    return net


def diffusers_unet():
    """UNet2DModel configured as the DDPM CIFAR-10 network (as in google/ddpm-cifar10-32)."""
    from diffusers import UNet2DModel
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
        dropout=0.1, norm_num_groups=32, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0)


def _call(net, name):
    if name == "diffusers":
        return lambda x, t: net(x, t).sample
    return lambda x, t: net(x, t)


def rows(batch_size=4, steps=5, warmup=1, seed=0):
    """Time both networks; returns one dict per network (model, params, train/sample images/s)."""
    torch.manual_seed(seed)
    nets = {"ddpm.py UNet": our_unet(), "diffusers UNet2DModel": diffusers_unet()}
    x = torch.randn(batch_size, 3, 32, 32)
    t = torch.randint(0, 1000, (batch_size,))
    noise = torch.randn_like(x)
    opts = {k: torch.optim.Adam(n.parameters(), lr=2e-4) for k, n in nets.items()}
    calls = {k: _call(n, "diffusers" if k.startswith("diffusers") else "ours") for k, n in nets.items()}
    train_times = {k: [] for k in nets}
    sample_times = {k: [] for k in nets}
    for i in range(warmup + steps):
        for k, net in nets.items():
            net.train()
            start = time.perf_counter()
            loss = (calls[k](x, t) - noise).pow(2).mean()
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
            if i >= warmup:
                train_times[k].append(time.perf_counter() - start)
    for i in range(warmup + steps):
        for k, net in nets.items():
            net.eval()
            with torch.inference_mode():
                start = time.perf_counter()
                calls[k](x, t)
                if i >= warmup:
                    sample_times[k].append(time.perf_counter() - start)
    return [dict(model=k, params=sum(p.numel() for p in net.parameters()), batch_size=batch_size,
                 train_img_per_s=batch_size / statistics.median(train_times[k]),
                 sample_img_per_s=batch_size / statistics.median(sample_times[k]))
            for k, net in nets.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed iterations per model")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    result = rows(args.batch_size, args.steps, args.warmup)
    import diffusers
    print(f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}")
    print(f"Command: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/compare_diffusers.py "
          f"--batch-size {args.batch_size} --steps {args.steps} --warmup {args.warmup}\n")
    print("| network | parameters | batch | training images/s | sampling images/s per step |")
    print("|---|---:|---:|---:|---:|")
    for r in result:
        print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['batch_size']} | {r['train_img_per_s']:.2f} | "
              f"{r['sample_img_per_s']:.2f} |")
    return result


if __name__ == "__main__":
    main()
