"""StyleGAN2 training and generation throughput, printed as a table. Run by hand:

    python benchmarks/gan_throughput.py --reference ../shared/anchors/stylegan2-ada-pytorch
    python benchmarks/gan_throughput.py --device cuda --resolutions 64 256 --batch 32 --reference ...

Every row is one config: 1 channel, mapping depth 2, z/w 512, channel_base 4096 / channel_max 512,
lazy R1 every 16 steps, path-length regularisation (weight 2) every 4 steps, EMA, DiffAugment
(color,translation,cutout) in ours. With ``--reference PATH`` (NVIDIA's stylegan2-ada-pytorch
source; read from there, never part of this project) the same config runs through the official
code, fp32, in this same process and on the same device, and the table gives our rate as a
ratio to it: a speed claim is a ratio measured in one run, never against a figure from another
day. Our bf16 rows (mixed precision) pay only where the hardware has native bf16.
``--convolutions`` adds a second table: how much of our training step is convolution (FLOPs
from torch's FlopCounterMode, time from the torch profiler, over one 16-step R1 cycle) and the
rate the step would reach if everything else took no time at all.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from defectforge.gan.config import GanConfig
from defectforge.gan.generate import generate_images
from defectforge.gan.loop import GanTrainer

WARMUP_STEPS = 2
Z_DIM = 512


def reference_config(resolution: int, batch: int, precision: str = "fp32") -> GanConfig:
    return GanConfig(
        data="benchmark",
        channels=1,
        resolution=resolution,
        z_dim=Z_DIM,
        w_dim=Z_DIM,
        mapping_layers=2,
        channel_base=4096,
        channel_max=512,
        batch_size=batch,
        r1_interval=16,
        pl_weight=2.0,
        pl_interval=4,
        precision=precision,
    )


def _timed(step, steps: int, batch: int, device: torch.device) -> float:
    """img/s over ``steps`` calls of ``step(i)`` after a warm-up; steps cover whole
    regularisation cycles so the lazy R1 and path-length costs count at their share."""
    steps = max(steps, 16)
    for i in range(WARMUP_STEPS):
        step(i)
    _sync(device)
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    _sync(device)
    return steps * batch / (time.perf_counter() - started)


def training_rate(cfg: GanConfig, device: torch.device, steps: int) -> tuple[float, GanTrainer]:
    trainer = GanTrainer(cfg, device)
    reals = torch.rand(cfg.batch_size, 1, cfg.resolution, cfg.resolution, device=device) * 2 - 1
    rate = _timed(lambda _: trainer.step(reals, None), steps, cfg.batch_size, device)
    return rate, trainer


def official_rate(source: str, cfg: GanConfig, device: torch.device, steps: int) -> float:
    """The official code's img/s for ``cfg`` (fp32, no ADA), its own loss and lazy-regularised
    Adam, on ``device``."""
    sys.path.insert(0, source)
    from training.loss import StyleGAN2Loss
    from training.networks import Discriminator, Generator

    common = dict(channel_base=cfg.channel_base, channel_max=cfg.channel_max, num_fp16_res=0)
    G = Generator(
        z_dim=cfg.z_dim,
        c_dim=0,
        w_dim=cfg.w_dim,
        img_resolution=cfg.resolution,
        img_channels=1,
        mapping_kwargs={"num_layers": cfg.mapping_layers},
        synthesis_kwargs={**common, "conv_clamp": None},
    ).to(device)
    D = Discriminator(
        c_dim=0,
        img_resolution=cfg.resolution,
        img_channels=1,
        conv_clamp=None,
        epilogue_kwargs={"mbstd_group_size": 4},
        **common,
    ).to(device)
    G_ema = copy.deepcopy(G).eval()
    loss = StyleGAN2Loss(
        device=device,
        G_mapping=G.mapping,
        G_synthesis=G.synthesis,
        D=D,
        r1_gamma=cfg.effective_r1_gamma,
        pl_weight=cfg.pl_weight,
    )

    def adam(module, interval):  # the official lazy-regularisation correction
        ratio = interval / (interval + 1)
        return torch.optim.Adam(module.parameters(), lr=0.0025 * ratio, betas=(0.0, 0.99**ratio))

    opt_g, opt_d = adam(G, cfg.pl_interval), adam(D, cfg.r1_interval)
    reals = torch.rand(cfg.batch_size, 1, cfg.resolution, cfg.resolution, device=device) * 2 - 1
    labels = torch.zeros(cfg.batch_size, 0, device=device)

    def step(i: int) -> None:
        phases = [("Gmain", opt_g, 1), ("Dmain", opt_d, 1)]
        if i % cfg.pl_interval == 0:
            phases.insert(1, ("Greg", opt_g, cfg.pl_interval))
        if i % cfg.r1_interval == 0:
            phases.append(("Dreg", opt_d, cfg.r1_interval))
        for phase, optimizer, gain in phases:
            optimizer.zero_grad(set_to_none=True)
            latents = torch.randn(cfg.batch_size, cfg.z_dim, device=device)
            loss.accumulate_gradients(phase, reals, labels, latents, labels, True, gain)
            optimizer.step()
        with torch.no_grad():
            for mine, averaged in zip(G.parameters(), G_ema.parameters(), strict=True):
                averaged.copy_(mine.lerp(averaged, 0.999))

    return _timed(step, steps, cfg.batch_size, device)


def convolution_share(trainer: GanTrainer, device: torch.device) -> dict[str, float]:
    """Our step's convolutions over one R1 cycle: GFLOP, seconds, share of the profiled time."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    cycle = trainer.cfg.r1_interval
    reals = torch.rand(trainer.cfg.batch_size, 1, trainer.cfg.resolution, trainer.cfg.resolution)
    reals = reals.to(device) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        for _ in range(cycle):
            trainer.step(reals, None)
    flops = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "conv" in str(op))
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        for _ in range(cycle):
            trainer.step(reals, None)
    events = profiled.key_averages()
    conv = sum(e.self_cpu_time_total for e in events if "conv" in e.key) / 1e6
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    return {"gflop": flops / 1e9, "conv_s": conv, "total_s": total}


def generation_rate(trainer: GanTrainer, count: int) -> float:
    generate_images(trainer.G_ema, trainer.cfg, range(8))
    started = time.perf_counter()
    generate_images(trainer.G_ema, trainer.cfg, range(count))
    return count / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--generate", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--reference", help="stylegan2-ada-pytorch source folder: adds the ratio")
    parser.add_argument(
        "--convolutions", action="store_true", help="add the convolution-share table (CPU)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = (
        f"{device.type} ({torch.get_num_threads()} threads)"
        if device.type == "cpu"
        else (torch.cuda.get_device_name(device))
    )
    print(
        "| resolution | batch | device | precision | ours train img/s | official img/s (fp32) "
        "| ours / official | ours generate img/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    shares = []
    for resolution in args.resolutions:
        official = None
        if args.reference:
            official = official_rate(
                args.reference, reference_config(resolution, args.batch), device, args.steps
            )
        for precision in args.precisions:
            cfg = reference_config(resolution, args.batch, precision)
            rate, trainer = training_rate(cfg, device, args.steps)
            ratio = f"{rate / official:.2f}x" if official else "-"
            print(
                f"| {resolution} | {args.batch} | {where} | {precision} | {rate:.1f} | "
                f"{f'{official:.1f}' if official else '-'} | {ratio} | "
                f"{generation_rate(trainer, args.generate):.1f} |",
                flush=True,
            )
            if args.convolutions:
                shares.append((resolution, precision, rate, convolution_share(trainer, device)))
    if shares:
        _print_shares(shares)


def _print_shares(shares: list) -> None:
    print(
        "\n| resolution | precision | conv GFLOP per R1 cycle | conv s / profiled s | conv share "
        "| conv GFLOP/s | train img/s | img/s if only convolutions took time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for resolution, precision, rate, share in shares:
        fraction = share["conv_s"] / share["total_s"]
        print(
            f"| {resolution} | {precision} | {share['gflop']:.0f} | {share['conv_s']:.1f} / "
            f"{share['total_s']:.1f} | {fraction:.0%} | {share['gflop'] / share['conv_s']:.0f} | "
            f"{rate:.1f} | {rate / fraction:.1f} |"
        )


if __name__ == "__main__":
    main()
