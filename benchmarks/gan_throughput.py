"""StyleGAN2 training and generation throughput, printed as a table. Run by hand:

    python benchmarks/gan_throughput.py            # the reference configs at 32 and 64 px, CPU
    python benchmarks/gan_throughput.py --device cuda --resolutions 128 256 --batch 32

The default rows match the reference measured on 2 CPU cores with NVIDIA's stylegan2-ada-pytorch
(reference ops): 1 channel, mapping depth 2, channel_base 4096 / channel_max 512, z/w 512, batch 8,
lazy R1 every 16 steps, path-length regularisation every 4 steps: 2.9 img/s at 32 px and 2.4 img/s
at 64 px. Training steps include DiffAugment (color,translation,cutout) and the EMA update.
Each resolution is measured in fp32 (as the reference) and with bf16 mixed precision, which pays
only where the hardware has native bf16 (GPUs; CPUs with AVX512-BF16 or AMX).
"""

from __future__ import annotations

import argparse
import time

import torch

from defectforge.gan.config import GanConfig
from defectforge.gan.generate import generate_images
from defectforge.gan.loop import GanTrainer

REFERENCE_IMG_PER_S = {32: 2.9, 64: 2.4}
WARMUP_STEPS = 2


def reference_config(resolution: int, batch: int, precision: str = "fp32") -> GanConfig:
    return GanConfig(
        data="benchmark",
        channels=1,
        resolution=resolution,
        z_dim=512,
        w_dim=512,
        mapping_layers=2,
        channel_base=4096,
        channel_max=512,
        batch_size=batch,
        r1_interval=16,
        pl_weight=2.0,
        pl_interval=4,
        precision=precision,
    )


def training_rate(cfg: GanConfig, device: torch.device, steps: int) -> float:
    trainer = GanTrainer(cfg, device)
    reals = (
        torch.rand(cfg.batch_size, cfg.channels, cfg.resolution, cfg.resolution, device=device) * 2
        - 1
    )
    # Steps cover whole regularisation cycles so lazy R1/PL costs are counted at their share.
    steps = max(steps, cfg.r1_interval)
    for _ in range(WARMUP_STEPS):
        trainer.step(reals, None)
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        trainer.step(reals, None)
    _sync(device)
    return steps * cfg.batch_size / (time.perf_counter() - started), trainer


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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        "| resolution | batch | workers | device | precision | train img/s | reference img/s "
        "| x reference | generate img/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for resolution in args.resolutions:
        for precision in args.precisions:
            cfg = reference_config(resolution, args.batch, precision)
            rate, trainer = training_rate(cfg, device, args.steps)
            reference = REFERENCE_IMG_PER_S.get(resolution) if args.batch == 8 else None
            ratio = f"{rate / reference:.1f}x" if reference and device.type == "cpu" else "-"
            print(
                f"| {resolution} | {args.batch} | 1 | {device.type} ({torch.get_num_threads()} "
                f"threads) | {precision} | {rate:.1f} | {reference or '-'} | {ratio} | "
                f"{generation_rate(trainer, args.generate):.1f} |"
            )


if __name__ == "__main__":
    main()
