"""GAN training from 1 to 2 workers on CPU, gradients averaged bucket by bucket (what `gan train
--workers N` does) or one all-reduce per parameter (the way before), printed as a table.

Workers are plain torch.distributed processes (gloo), each stepping ``GanTrainer`` on its own
batch, as Ray Train's workers do; Ray's start-up is left out. "efficiency" is img/s over
workers x the img/s of one worker with the same threads per worker (1.0 = perfect scaling).
"all-reduce ms/step" is the time inside gradient averaging, waiting for the slower worker
included. Run by hand, alone on the machine:

    python benchmarks/gan_scaling.py --resolution 64 --batch 8 --steps 32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gan_throughput import WARMUP_STEPS, reference_config

from defectforge.gan import loop


def _per_parameter(module: torch.nn.Module) -> None:
    """The former averaging: one blocking all-reduce per parameter."""
    world = dist.get_world_size()
    for parameter in module.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= world


def _timed_averaging(average):
    spent = [0.0]

    def timed(module: torch.nn.Module) -> None:
        started = time.perf_counter()
        average(module)
        spent[0] += time.perf_counter() - started

    return timed, spent


def _worker(rank: int, world: int, threads: int, bucketed: bool, args, scratch: str) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        store = f"file://{scratch}/store"
        dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    timed, spent = _timed_averaging(loop._average_gradients if bucketed else _per_parameter)
    loop._average_gradients = timed
    cfg = reference_config(args.resolution, args.batch)
    trainer = loop.GanTrainer(cfg, torch.device("cpu"), rank)
    generator = torch.Generator().manual_seed(rank)
    reals = torch.rand(args.batch, 1, args.resolution, args.resolution, generator=generator)
    for _ in range(WARMUP_STEPS):
        trainer.step(reals * 2 - 1, None)
    if world > 1:
        dist.barrier()
    spent[0], started = 0.0, time.perf_counter()
    for _ in range(args.steps):
        trainer.step(reals * 2 - 1, None)
    if world > 1:
        dist.barrier()
    elapsed = time.perf_counter() - started
    if rank == 0:
        rate = args.steps * args.batch * world / elapsed
        Path(scratch, "result").write_text(f"{rate} {1000 * spent[0] / args.steps}")
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, threads: int, bucketed: bool, args) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="gan-scaling-") as scratch:
        mp.spawn(_worker, args=(world, threads, bucketed, args, scratch), nprocs=world)
        rate, averaging_ms = Path(scratch, "result").read_text().split()
    return float(rate), float(averaging_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="images per worker and step")
    parser.add_argument("--steps", type=int, default=32, help="timed steps (whole reg. cycles)")
    args = parser.parse_args()
    rows = [
        ("1 x 1 thread", 1, 1, True),
        ("1 x 2 threads", 1, 2, True),
        ("2 x 1 thread, one all-reduce per parameter", 2, 1, False),
        ("2 x 1 thread, buckets", 2, 1, True),
    ]
    results = {
        label: measure(world, threads, bucketed, args) for label, world, threads, bucketed in rows
    }
    single = results["1 x 1 thread"][0]
    print(f"\n{args.resolution} px, batch {args.batch} per worker, {args.steps} steps, fp32, CPU")
    print("| workers | img/s | efficiency | all-reduce ms/step |")
    print("|---|---|---|---|")
    for label, world, _, _ in rows:
        rate, averaging_ms = results[label]
        print(f"| {label} | {rate:.1f} | {rate / (world * single):.2f} | {averaging_ms:.1f} |")


if __name__ == "__main__":
    main()
