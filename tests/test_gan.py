"""StyleGAN2 + DiffAugment: the networks, the loop, the metric, and training through Ray Train."""

import json
import math
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from cli_checks import fake_gan_run
from torch import nn

from defectforge.core.errors import ConfigError, DataError
from defectforge.gan.config import GanConfig
from defectforge.gan.diffaug import diff_augment, parse_policy
from defectforge.gan.generate import generate_images
from defectforge.gan.loop import GanLoopIO, GanTrainer, train_gan
from defectforge.gan.metrics import sliced_wasserstein
from defectforge.gan.networks import (
    Discriminator,
    EqualConv2d,
    EqualLinear,
    Generator,
    ModulatedConv2d,
    blur,
)

SMALL = dict(z_dim=32, w_dim=32, mapping_layers=2, channel_base=256, channel_max=32)


def tiny_config(**overrides) -> GanConfig:
    values = dict(
        data="unused",
        channels=1,
        resolution=32,
        batch_size=4,
        r1_interval=2,
        pl_weight=2.0,
        pl_interval=2,
        metric_images=16,
        threads=1,
        **SMALL,
    )
    return GanConfig(**{**values, **overrides})


@pytest.mark.parametrize("resolution", [8, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_and_discriminator_shapes(resolution, channels):
    G = Generator(resolution, channels, **SMALL)
    D = Discriminator(resolution, channels, SMALL["channel_base"], SMALL["channel_max"])
    images = G(torch.randn(4, 32))
    assert images.shape == (4, channels, resolution, resolution)
    assert images.dtype == torch.float32
    assert D(images).shape == (4, 1)
    assert G.num_ws == 2 * (int(math.log2(resolution)) - 1)


def test_conditional_networks_use_the_class():
    G = Generator(16, 1, num_classes=3, **SMALL)
    D = Discriminator(16, 1, 256, 32, num_classes=3)
    z = torch.randn(2, 32)
    c0, c1 = torch.eye(3)[[0, 0]], torch.eye(3)[[1, 1]]
    assert not torch.allclose(G(z, c0, noise_mode="const"), G(z, c1, noise_mode="const"))
    images = G(z, c0)
    assert not torch.allclose(D(images, c0), D(images, c1))


def test_bad_resolution():
    with pytest.raises(ValueError, match="power of two"):
        Generator(48, 1, **SMALL)


def test_demodulation_keeps_activations_normalised():
    torch.manual_seed(0)
    conv = ModulatedConv2d(64, 64, 3, w_dim=16)
    x = torch.randn(8, 64, 16, 16)
    w = torch.randn(8, 16)
    out = conv(x, w)
    assert 0.8 < out.std().item() < 1.2
    with torch.no_grad():
        conv.affine.bias.mul_(10)  # much larger styles...
    assert 0.8 < conv(x, w).std().item() < 1.2  # ...are demodulated away
    plain = ModulatedConv2d(64, 64, 3, w_dim=16, demodulate=False)
    with torch.no_grad():
        plain.affine.bias.mul_(10)
    assert plain(x, w).std().item() > 5


@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv_equals_per_sample_modulated_weights(demodulate):
    """The activation-side form must equal StyleGAN2's definition: each sample convolved with
    its own modulated (and demodulated) weight, a grouped convolution."""
    torch.manual_seed(0)
    conv = ModulatedConv2d(6, 5, 3, w_dim=8, demodulate=demodulate)
    x, w = torch.randn(3, 6, 8, 8), torch.randn(3, 8)
    weights = conv.weight[None] * conv.weight_gain * conv.affine(w)[:, None, :, None, None]
    if demodulate:
        weights = weights * weights.square().sum(dim=(2, 3, 4), keepdim=True).add(1e-8).rsqrt()
    grouped = F.conv2d(x.reshape(1, 18, 8, 8), weights.reshape(15, 6, 3, 3), padding=1, groups=3)
    assert torch.allclose(conv(x, w, out_gain=2.0), 2.0 * grouped.reshape(3, 5, 8, 8), atol=1e-5)


def test_upsampling_modulated_conv_equals_the_weight_side_gain():
    torch.manual_seed(0)
    conv = ModulatedConv2d(6, 5, 3, w_dim=8, up=True)
    x, w = torch.randn(3, 6, 8, 8), torch.randn(3, 8)
    styles, weight = conv.affine(w), conv.weight * conv.weight_gain
    up = F.conv_transpose2d(x * styles[:, :, None, None], weight.transpose(0, 1), stride=2)
    dcoefs = (styles.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8).rsqrt()
    expected = blur(up, gain=4.0) * dcoefs[:, :, None, None]
    assert torch.allclose(conv(x, w), expected, atol=1e-5)


def test_r1_steps_match_one_pass_over_fakes_and_reals_with_the_penalty():
    """R1 steps pass the reals alone; loss and D's gradients must equal those of the single
    pass over fakes and reals that the penalty was defined on."""
    trainer = GanTrainer(tiny_config(diffaug_strength=0.0, r1_gamma=100.0), torch.device("cpu"))
    cfg, D, real = trainer.cfg, trainer.D, _reals(trainer.cfg, 4)
    fake = trainer.G(torch.randn(4, cfg.z_dim)).detach()
    real_input = real.clone().requires_grad_(True)
    fake_logits, real_logits = D(torch.cat([fake, real_input]), None, 4).split(4)
    (grad,) = torch.autograd.grad(real_logits.sum(), real_input, create_graph=True)
    r1 = grad.square().sum(dim=(1, 2, 3)).mean()
    gain = cfg.effective_r1_gamma / 2 * cfg.r1_interval
    expected = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean() + r1 * gain
    expected_grads = torch.autograd.grad(expected, list(D.parameters()))

    trainer.step_count = cfg.r1_interval
    stats: dict = {}
    loss = trainer._d_loss(fake, None, real, None, stats)
    grads = torch.autograd.grad(loss, list(D.parameters()))
    assert r1.item() * gain > 0.1  # the penalty weighs in the comparison
    assert stats["r1"] == pytest.approx(r1.item(), rel=1e-4)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for mine, reference in zip(grads, expected_grads, strict=True):
        assert torch.allclose(mine, reference, rtol=1e-4, atol=1e-6)


def test_equalized_learning_rate_scales_at_run_time():
    for fan_in in (16, 1024):
        layer = EqualLinear(fan_in, 256)
        assert layer.weight.std().item() == pytest.approx(1.0, abs=0.1)  # stored at unit scale
        out = layer(torch.randn(512, fan_in))
        assert out.std().item() == pytest.approx(1.0, abs=0.15)  # He gain applied in forward
    slow = EqualLinear(64, 64, lr_mul=0.01)
    assert slow.weight.std().item() == pytest.approx(100, rel=0.1)


def test_folded_gains_equal_the_explicit_ones():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16, 16)
    conv = EqualConv2d(8, 16, 3, activate=True, out_gain=math.sqrt(0.5))
    with torch.no_grad():
        conv.bias.normal_()
    explicit = F.leaky_relu(F.conv2d(x, conv.weight / math.sqrt(8 * 9), conv.bias, padding=1), 0.2)
    assert torch.allclose(conv(x), explicit * math.sqrt(2) * math.sqrt(0.5), atol=1e-5)
    linear = EqualLinear(8, 4, bias_init=0.5, lr_mul=0.1, activate=True)
    v = torch.randn(3, 8)
    explicit = F.leaky_relu(F.linear(v, linear.weight * 0.1 / math.sqrt(8), linear.bias * 0.1), 0.2)
    assert torch.allclose(linear(v), explicit * math.sqrt(2), atol=1e-5)


def test_bf16_mixed_precision_runs_the_convolutions_in_bf16():
    trainer = GanTrainer(tiny_config(precision="bf16"), torch.device("cpu"))
    seen = set()
    trainer.D.blocks[0].conv0.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    stats = [trainer.step(_reals(trainer.cfg, 4, seed), None) for seed in range(2)]
    assert seen == {torch.bfloat16}
    assert all(math.isfinite(v) for step in stats for v in step.values())
    assert all(p.dtype == torch.float32 for p in trainer.G.parameters())
    with pytest.raises(ValueError, match="precision = .*must be one of fp32, bf16"):
        tiny_config(precision="fp16")


@pytest.mark.floors
def test_diffaugment_is_differentiable_and_shared_between_batches():
    real = torch.rand(6, 3, 32, 32, requires_grad=True)
    out = diff_augment(real, "color,translation,cutout", 1.0, torch.Generator().manual_seed(3))
    out.sum().backward()
    assert real.grad is not None and real.grad.abs().sum() > 0
    # Same generator seed -> the same shifts and holes on both batches (both ops are linear).
    x = torch.rand(6, 1, 32, 32)
    a = diff_augment(x, "translation,cutout", 1.0, torch.Generator().manual_seed(9))
    b = diff_augment(2 * x, "translation,cutout", 1.0, torch.Generator().manual_seed(9))
    assert torch.allclose(b, 2 * a)
    assert (a == 0).float().mean() > 0.05  # cutout and translation really removed pixels
    assert torch.equal(diff_augment(x, "color", 0.0), x)
    with pytest.raises(ValueError, match="valid: color, translation, cutout"):
        parse_policy("colour")


def _reals(cfg: GanConfig, n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, cfg.channels, cfg.resolution, cfg.resolution, generator=generator) * 2 - 1


@pytest.mark.floors
def test_resume_reproduces_the_next_step():
    cfg = tiny_config()
    batches = [_reals(cfg, 4, seed) for seed in range(4)]
    straight = GanTrainer(cfg, torch.device("cpu"))
    for batch in batches[:3]:
        straight.step(batch, None)
    saved = {k: (v.copy() if isinstance(v, dict) else v) for k, v in straight.state_dict().items()}
    saved = torch.load(_roundtrip(saved), weights_only=False)
    straight.step(batches[3], None)

    resumed = GanTrainer(cfg, torch.device("cpu"))
    resumed.load_state_dict(saved)
    resumed.step(batches[3], None)
    for a, b in zip(straight.G.state_dict().values(), resumed.G.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.D.parameters(), resumed.D.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.images_seen == straight.images_seen == 16


def _roundtrip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_ema_ramp_up_lets_g_ema_follow_g_early():
    def distance_after_steps(rampup: float) -> float:
        trainer = GanTrainer(tiny_config(pl_weight=0.0, ema_rampup=rampup), torch.device("cpu"))
        for seed in range(3):
            trainer.step(_reals(trainer.cfg, 4, seed), None)
        pairs = zip(trainer.G_ema.parameters(), trainer.G.parameters(), strict=True)
        return sum((ema - live).abs().sum().item() for ema, live in pairs)

    assert distance_after_steps(0.05) < 0.5 * distance_after_steps(0.0)


def test_conditional_run_snapshots_every_class():
    cfg = tiny_config(classes=("a", "b", "c"), conditional=True, kimg=0.008, snapshot_kimg=0.004)
    reports = []

    def batches():
        generator = torch.Generator().manual_seed(0)
        while True:
            yield {"image": _reals(cfg, 4), "label": torch.randint(0, 3, (4,), generator=generator)}

    io = GanLoopIO(
        real_batches=batches(),
        report=lambda metrics, folder: reports.append(
            (metrics, (folder / "samples.png").is_file())
        ),
        real_for_metric=lambda: np.zeros((16, 32, 32, 1), np.uint8),
    )
    train_gan(cfg, io)
    assert [m["kimg"] for m, _ in reports] == [0.0, 0.004, 0.008]
    assert all(grid for _, grid in reports) and all(m["swd"] > 0 for m, _ in reports)
    trainer = GanTrainer(cfg, torch.device("cpu"))
    images = generate_images(trainer.G_ema, cfg, [7, 7, 7], class_index=[0, 1, 2])
    assert not np.array_equal(images[0], images[1])  # same seed, another class


def test_generation_is_deterministic_per_seed():
    cfg = tiny_config()
    trainer = GanTrainer(cfg, torch.device("cpu"))
    a = generate_images(trainer.G_ema, cfg, [5, 6, 7])
    b = generate_images(trainer.G_ema, cfg, [7])
    assert a.dtype == np.uint8 and a.shape == (3, 32, 32, 1)
    assert np.array_equal(a[2], b[0])
    assert not np.array_equal(a[0], a[1])
    truncated = generate_images(trainer.G_ema, cfg, [5], truncation_psi=0.0)
    assert truncated.shape == (1, 32, 32, 1)


@pytest.mark.floors
def test_sliced_wasserstein_separates_sets():
    rng = np.random.default_rng(0)
    smooth = np.repeat(np.linspace(0, 255, 32, dtype=np.uint8)[None, :], 32, 0)
    base = np.stack([np.roll(smooth, rng.integers(32), axis=1) for _ in range(64)])[..., None]
    other = np.stack([np.roll(smooth, rng.integers(32), axis=1) for _ in range(64)])[..., None]
    noise = rng.integers(0, 256, base.shape).astype(np.uint8)
    same = sliced_wasserstein(base, other)["swd"]
    different = sliced_wasserstein(base, noise)["swd"]
    assert different > 5 * same
    assert set(sliced_wasserstein(base, other)) == {"swd_32", "swd_16", "swd"}


def test_fid_and_kid_from_a_local_inception_file(tmp_path):
    from torchvision.models import inception_v3

    from defectforge.gan.metrics import frechet_distance, inception_metrics

    torch.manual_seed(0)
    weights = tmp_path / "inception.pt"
    torch.save(
        inception_v3(weights=None, aux_logits=False, init_weights=True).state_dict(), weights
    )
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (6, 32, 32, 1)).astype(np.uint8)
    fake = np.zeros_like(real)
    metrics = inception_metrics(real, fake, str(weights))
    assert metrics["fid"] > 0 and np.isfinite(metrics["kid"])
    features = rng.normal(size=(50, 8))
    assert frechet_distance(features, features) == pytest.approx(0, abs=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        tiny_config(resolution=100)
    with pytest.raises(ValueError, match="unknown DiffAugment"):
        tiny_config(diffaug="color,zoom")
    with pytest.raises(ValueError, match="unknown GAN config keys"):
        GanConfig.from_dict({"data": "x", "channels": 1, "kimgs": 3})
    assert tiny_config().effective_r1_gamma == pytest.approx(0.0002 * 32**2 / 4)


def _two_worker_step(config):
    import ray.train
    import torch.distributed as dist

    cfg = GanConfig.from_dict(config["gan"])
    trainer = GanTrainer(cfg, torch.device("cpu"), ray.train.get_context().get_world_rank())
    rank = ray.train.get_context().get_world_rank()
    trainer.step(_reals(cfg, 4, seed=rank), None)  # different data on each worker
    checksum = torch.stack(
        [p.detach().double().sum() for p in trainer.G.parameters()]
        + [p.detach().double().sum() for p in trainer.D.parameters()]
    )
    gathered = [torch.zeros_like(checksum) for _ in range(2)]
    dist.all_gather(gathered, checksum)
    with tempfile.TemporaryDirectory() as folder:  # V2 keeps metrics of checkpointed reports
        (Path(folder) / "done").write_text("1")
        checkpoint = ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
        ray.train.report({"checksums": [g.tolist() for g in gathered]}, checkpoint=checkpoint)


def test_two_worker_ray_train_keeps_parameters_identical(ray_session, tmp_path):
    from dataclasses import asdict

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = tiny_config(pl_weight=0.0)
    trainer = TorchTrainer(
        _two_worker_step,
        train_loop_config={"gan": asdict(cfg)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="ddp", storage_path=str(tmp_path)),
    )
    first, second = trainer.fit().metrics["checksums"]
    assert first == second
    untouched = GanTrainer(cfg, torch.device("cpu"))
    start = [p.detach().double().sum().item() for p in untouched.G.parameters()]
    assert first[: len(start)] != start  # the step did change the weights


def test_ray_train_run_on_a_store_snapshots_resumes_and_generates(
    ray_session, s3_server, mlflow_server, sample_dataset, tmp_path, capsys
):
    """Two workers write their snapshots to a bucket (no folder shared with the driver), the
    run resumes from there, and generate / metrics read the generator back from it. The run,
    resume included, is one MLflow run: config, losses and SWD by step, generator and grids."""
    from mlflowserver import artifact_names, only_run

    from defectforge.cli import main
    from defectforge.core.storage import Location
    from defectforge.studies.spec_schema import TrackingSpec
    from defectforge.trainables.gan import gan_config_from_manifest, run_gan_training

    tracking = TrackingSpec(mlflow=mlflow_server.url, experiment="gan-on-a-store")

    cfg = gan_config_from_manifest(
        sample_dataset,
        "cpu-small",
        resolution=32,
        batch_size=8,
        kimg=0.032,
        snapshot_kimg=0.016,
        metric_images=16,
        workers=2,  # as many as the session has CPUs: each gets half, Ray Data keeps one
        # Its untrained generator is far from the sample (SWD 330; seed 0's is 258): four steps
        # beat it by 30 or more, where seed 0's beat it by 1-5 or lost by up to 4 (two runs in
        # seven here), and then no snapshot is published.
        seed=3,
        **{k: v for k, v in SMALL.items()},
    )
    run = Location.of(s3_server.make_bucket("gan-runs")) / "gan"
    summary = run_gan_training(cfg, run.uri, tracking=tracking)
    kimgs = [row["kimg"] for row in summary["history"]]
    assert kimgs == [0.0, 0.016, 0.032]
    assert all(row["swd"] > 0 for row in summary["history"])
    assert (run / "generator.pt").is_file() and len((run / "samples").files(".png")) == 3
    trained = [row for row in summary["history"] if row["kimg"] > 0]
    assert summary["best"]["swd"] == min(row["swd"] for row in trained)  # kimg 0 never counts
    assert summary["best"]["swd"] < summary["history"][0]["swd"]

    more = run_gan_training(replace(cfg, kimg=0.048), run.uri, resume=True, tracking=tracking)
    assert [row["kimg"] for row in more["history"]] == [0.0, 0.016, 0.032, 0.048]
    # A resume continues the run it finds: what its snapshots and record hold cannot change.
    for changed in ({"diffaug": ""}, {"seed": 5}, {"native_crops": True}):
        key, value = next(iter(changed.items()))
        with pytest.raises(ConfigError, match=rf"{key} = {value!r}: .* holds a run of {key} = "):
            run_gan_training(replace(cfg, kimg=0.064, **changed), run.uri, resume=True)
    client, tracked = only_run(mlflow_server.url, "gan-on-a-store")
    assert tracked.info.status == "FINISHED" and tracked.data.params["kimg"] == "0.032"
    swd = client.get_metric_history(tracked.info.run_id, "swd")
    assert sorted(point.value for point in swd) == sorted(row["swd"] for row in more["history"])
    losses = client.get_metric_history(tracked.info.run_id, "g_loss")
    trained_steps = {point.step for point in swd if point.step > 0}
    assert len(trained_steps) == 3 and trained_steps <= {point.step for point in losses}
    logged = artifact_names(client, tracked.info.run_id)
    assert {"generator.pt", "samples.png", "metrics.json", "plots"} <= logged

    out = tmp_path / "generated"
    assert main(["gan", "generate", "--model", run.uri, "--count", "5", "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 5
    rows = pq.read_table(out / "train").to_pylist()
    assert [r["source"] for r in rows] == ["synthetic"] * 5 and rows[0]["mask"] is None
    assert rows[0]["origin"].endswith("/seed0") and rows[0]["id"].startswith("gan/gan-")
    one_class = ["--class", "patches", "--out", str(tmp_path / "patches")]
    assert main(["gan", "generate", "--model", run.uri, "--count", "2", *one_class]) == 2
    assert "trained without --conditional" in capsys.readouterr().err

    capsys.readouterr()
    assert main(["gan", "metrics", "--model", run.uri, "--n", "8", "--class", "patches"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["images"] == 8 and scored["swd"] > 0
    assert main(["gan", "metrics", "--model", run.uri, "--class", "rust"]) == 2
    assert "--class 'rust' is not among" in capsys.readouterr().err


@pytest.fixture
def shard_passes(monkeypatch) -> list:
    """Counts the Ray Data passes a GAN worker's feed starts."""
    from defectforge.trainables import gan

    passes, start_pass = [], gan._shard_pass
    monkeypatch.setattr(gan, "_shard_pass", lambda *a, **k: passes.append(1) or start_pass(*a, **k))
    return passes


def _feed(rows: int, batch: int, replay: bool = True):
    """A GAN worker's real batches over a Ray dataset of ``rows`` flat images (value = row)."""
    import ray.data

    from defectforge.datasets.batches import GanBatchMaker
    from defectforge.datasets.contract import encode_png
    from defectforge.trainables.gan import _endless

    images = [encode_png(np.full((40, 40), 5 * row, np.uint8)) for row in range(rows)]
    items = [{"id": f"s{n:03d}", "image": i, "defect_class": "x"} for n, i in enumerate(images)]
    shard = ray.data.from_items(items)
    cfg = tiny_config(batch_size=batch)
    return _endless(shard, cfg, GanBatchMaker(1, 32, crop_seed=0), replay)


def _rows_of(batch: dict) -> list[int]:
    return [round(float(value)) for value in (batch["image"][:, 0, 0, 0] + 1) * 127.5 / 5]


def test_a_small_shard_is_read_once_then_replayed_with_every_image_in_a_new_order(
    ray_session, shard_passes
):
    feed = _feed(rows=10, batch=4)
    first_pass = [_rows_of(next(feed)) for _ in range(2)]  # 10 rows, full batches only
    replayed = [_rows_of(next(feed)) for _ in range(8)]  # four epochs of two batches

    assert len(shard_passes) == 1
    assert all(len(rows) == 4 for rows in first_pass + replayed)
    assert set(sum(replayed, [])) == set(range(10))  # the rows the first pass left out too
    epochs = [sum(replayed[i : i + 2], []) for i in range(0, 8, 2)]
    assert all(len(set(epoch)) == 8 for epoch in epochs)  # no row twice within an epoch
    assert len({tuple(epoch) for epoch in epochs}) == 4  # reshuffled every epoch


def test_without_replay_every_epoch_is_a_new_pass(ray_session, shard_passes):
    feed = _feed(rows=8, batch=4, replay=False)
    batches = [_rows_of(next(feed)) for _ in range(6)]

    assert len(shard_passes) == 3 and all(len(rows) == 4 for rows in batches)


def test_the_driver_decides_replay_from_the_train_splits_size(sample_dataset, monkeypatch):
    from defectforge.datasets import replay
    from defectforge.trainables import gan

    cfg = tiny_config(data=str(sample_dataset))
    assert gan.replays_in_memory(cfg)  # the bundled sample: a few hundred kB
    monkeypatch.setattr(replay, "CACHED_SPLIT_BYTES", 1000)
    assert not gan.replays_in_memory(cfg)


def _average_on_rank(rank: int, store_file: str, results: str) -> None:
    import torch.distributed as dist

    from defectforge.gan import loop

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    loop.GRADIENT_BUCKET_BYTES = 64  # several buckets from a few small gradients
    module = nn.ModuleList([nn.Linear(5, 3), nn.Linear(3, 2), nn.Linear(2, 1).double()])
    for index, parameter in enumerate(module.parameters()):
        parameter.grad = torch.full_like(parameter, float(rank * 10 + index))
    module[1].bias.grad = None  # a parameter without a gradient is left alone
    loop._average_gradients(module)
    grads = [None if p.grad is None else p.grad.tolist() for p in module.parameters()]
    torch.save(grads, f"{results}.{rank}")
    dist.destroy_process_group()


def test_gradients_are_averaged_over_workers_bucket_by_bucket(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_average_on_rank, args=(str(tmp_path / "store"), str(tmp_path / "g")), nprocs=2)
    first, second = (torch.load(tmp_path / f"g.{rank}") for rank in range(2))
    assert first == second
    for index, grad in enumerate(first):  # rank 0 gave index, rank 1 10 + index
        if index == 3:  # module[1].bias
            assert grad is None
        else:
            assert set(torch.tensor(grad).flatten().tolist()) == {index + 5.0}


def test_buckets_hold_one_dtype_up_to_the_size_limit(monkeypatch):
    from defectforge.gan import loop

    monkeypatch.setattr(loop, "GRADIENT_BUCKET_BYTES", 64)
    floats = [torch.zeros(4), torch.zeros(4), torch.zeros(20), torch.zeros(2), torch.zeros(1)]
    tensors = floats + [torch.zeros(2, dtype=torch.float64)]
    # 16 + 16 bytes; 80 alone (over the limit); 8 + 4; the float64 one on its own
    assert [len(bucket) for bucket in loop._buckets(tensors)] == [2, 1, 2, 1]


def test_a_worker_with_fewer_images_than_a_batch_is_told_so(ray_session):
    from defectforge.core.errors import DataError

    with pytest.raises(DataError, match="got 3 train image.* fewer than one batch of 4"):
        next(_feed(rows=3, batch=4))


def _sheet_with_one_defect() -> tuple[bytes, bytes]:
    """A 128-px sheet (value = column, so a crop's first pixel tells where it was cut) with a
    4 x 4 defect in its bottom-right corner."""
    from defectforge.datasets.contract import encode_png

    image = np.tile(np.arange(128, dtype=np.uint8), (128, 1))
    mask = np.zeros((128, 128), np.uint8)
    mask[120:124, 120:124] = 1
    return encode_png(image), encode_png(mask)


def test_native_crops_keep_scale_and_defect_crops_land_on_the_defect():
    from defectforge.datasets.batches import GanBatchMaker

    image, mask = _sheet_with_one_defect()
    crops = GanBatchMaker(1, 32, crop_seed=0).images([image] * 64, [mask] * 64)
    # Native scale: neighbouring columns differ by one grey level, as in the sheet.
    assert crops.shape == (64, 32, 32, 1) and (np.diff(crops[..., 0], axis=2) == 1).all()
    # Random crops rarely reach the corner; defect crops always hold a defect pixel
    # (the defect spans columns 120-123, so the crop starts at column 89 or later).
    assert (crops[:, 0, 0, 0] >= 89).mean() < 0.3
    on_defect = GanBatchMaker(1, 32, crop_seed=0, defect_crops=1.0).images(
        [image] * 64, [mask] * 64
    )
    assert (on_defect[:, 0, 0, 0] >= 89).all()
    # A half share: some crops over the defect, the rest anywhere.
    half = GanBatchMaker(1, 32, crop_seed=0, defect_crops=0.5).images([image] * 64, [mask] * 64)
    assert 0.3 < (half[:, 0, 0, 0] >= 89).mean() < 1.0


def test_defect_crops_need_native_crops_and_a_mask_of_the_images_size(sample_dataset):
    from defectforge.datasets.batches import GanBatchMaker
    from defectforge.datasets.contract import encode_png, split_files
    from defectforge.trainables.gan_reals import columns as _columns

    # A built row as the GAN reads it with defect crops, its mask swapped for one of another size.
    cfg = tiny_config(data=str(sample_dataset), native_crops=True, defect_crops=1.0)
    row = pq.read_table(split_files(sample_dataset, "train")[0].uri, columns=_columns(cfg)).slice(
        0, 1
    )
    row = row.to_pylist()[0]
    small_mask = encode_png(np.zeros((16, 16), np.uint8))
    with pytest.raises(DataError, match=f"{Path(row['origin']).name}: its mask is 16x16 px"):
        GanBatchMaker(1, 32, crop_seed=0, defect_crops=1.0)(
            {"image": [row["image"]], "mask": [small_mask], "origin": [row["origin"]]}
        )
    with pytest.raises(ConfigError, match="add --native-crops"):
        tiny_config(defect_crops=0.5)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        tiny_config(native_crops=True, defect_crops=1.5)


def test_odd_gan_command_lines_are_refused_naming_the_fix(
    sample_dataset, sample_root, generated, tmp_path, capsys
):
    from defectforge.cli import main
    from defectforge.trainables.gan import _check_crops_fit

    # The sample's images are 200 px: the largest power of two within is 128, not 200.
    with pytest.raises(ConfigError, match="lower --resolution to 128 \\(a power of two"):
        _check_crops_fit(tiny_config(data=str(sample_dataset), native_crops=True, resolution=256))
    out = tmp_path / "generated"
    argv = ["gan", "generate", "--model", str(tmp_path), "--out", str(out), "--seeds", "1,2"]
    assert main([*argv, "--count", "4"]) == 2
    assert "--count would be ignored; give --seeds alone" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's own one-line refusal
        main(["gan", "metrics", "--model", str(tmp_path), "--n", "0"])
    assert "give a whole number of images, 1 or more" in capsys.readouterr().err
    assert not out.exists()
    run = generated.parent / "run"  # a raw folder as --data is not a dataset
    assert main(["gan", "metrics", "--model", str(run), "--data", str(sample_root)]) == 2
    assert "manifest.json: no manifest.json: not a defectforge dataset" in capsys.readouterr().err


def test_a_gan_worker_feeds_defect_crops_from_its_shards_masks(ray_session):
    import ray.data

    from defectforge.trainables.gan import _endless
    from defectforge.trainables.gan_reals import batch_maker as _batch_maker

    image, mask = _sheet_with_one_defect()
    rows = [
        {"id": f"s{n}", "image": image, "mask": mask, "defect_class": "x", "origin": "sheet.png"}
        for n in range(8)
    ]
    shard = ray.data.from_items(rows)
    cfg = tiny_config(native_crops=True, defect_crops=1.0)
    feed = _endless(shard, cfg, _batch_maker(cfg, rank=0), replay=True)
    for _ in range(3):  # the streamed first pass, then replays
        first_columns = (next(feed)["image"][:, 0, 0, 0] + 1) * 127.5
        assert (first_columns >= 89 - 0.5).all()


def test_gan_runs_compare_by_swd_curve_and_sample_grids(tmp_path):
    import cv2

    from defectforge.gan.report import swd_history, write_comparison

    # The "on" run was resumed at kimg 2: its kimg-2 line appears twice, the latest counts.
    on = fake_gan_run(tmp_path / "on", [(0, 200.0), (2, 150.0), (2, 140.0), (4, 120.0)])
    off = fake_gan_run(tmp_path / "off", [(0, 200.0), (2, 160.0), (4, 170.0)])
    rows = write_comparison({"on": on, "off": off}, tmp_path / "cmp", kimg=4)
    assert rows == [
        {"run": "on", "swd_at_kimg": 120.0, "lowest_swd": 120.0, "lowest_at_kimg": 4},
        {"run": "off", "swd_at_kimg": 170.0, "lowest_swd": 160.0, "lowest_at_kimg": 2},
    ]
    assert (tmp_path / "cmp" / "swd.png").stat().st_size > 0
    side_by_side = cv2.imread(str(tmp_path / "cmp" / "samples_kimg4.png"))
    assert side_by_side.shape[1] == 2 * (32 + 8)  # two grids, each with its gap
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"] == rows
    with pytest.raises(DataError, match="no sample grid at kimg 6"):
        write_comparison({"on": on, "off": off}, tmp_path / "cmp6", kimg=6)
    assert not (tmp_path / "cmp6").exists()
    # A finished run resumed to more kimg: its summary stops at its first end, its progress goes
    # on; the curve has both, the summary's figure where they share a kimg.
    (on / "metrics.json").write_text(json.dumps({"history": [{"kimg": 0, "swd": 190.0}]}))
    resumed = write_comparison({"on": on}, tmp_path / "cmp-resumed", kimg=4)
    assert resumed == [
        {"run": "on", "swd_at_kimg": 120.0, "lowest_swd": 120.0, "lowest_at_kimg": 4}
    ]
    assert [line["swd"] for line in swd_history(on)] == [190.0, 140.0, 120.0]
    (on / "metrics.json").unlink()
    # A folder of the user's own is never written into; an earlier comparison is replaced only
    # when asked.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "swd.png").write_bytes(b"the user's own plot")
    with pytest.raises(DataError, match="already exists"):
        write_comparison({"on": on, "off": off}, tmp_path / "mine", kimg=4)
    assert (tmp_path / "mine" / "swd.png").read_bytes() == b"the user's own plot"
    with pytest.raises(DataError, match="already exists"):
        write_comparison({"on": on}, tmp_path / "cmp", kimg=2)
    assert write_comparison({"on": on}, tmp_path / "cmp", kimg=2, overwrite=True)[0]["run"] == "on"
    assert not (tmp_path / "cmp" / "samples_kimg4.png").exists()
    # Nor, even with --overwrite, the user's folder, a run it compares, or another training run.
    from defectforge.core.outputs import GAN_RUN, prepare_run_folder

    other_run = prepare_run_folder(tmp_path / "other-run", GAN_RUN)
    for out, refusal in (
        (tmp_path / "mine", "replaces only folders defectforge wrote"),
        (on, "is the input"),
        (other_run, "never replaces a training run"),
    ):
        with pytest.raises(DataError, match=refusal):
            write_comparison({"on": on, "off": off}, out, kimg=4, overwrite=True)
    assert (tmp_path / "mine" / "swd.png").read_bytes() == b"the user's own plot"


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"conditional": True, "classes": ("inclusion", "patches", "scratches")},
        {"defect_class": "patches"},
        {"defect_class": "scratches"},
    ],
)
def test_the_gan_learns_from_the_rows_its_class_options_ask_for(sample_dataset, options):
    from defectforge.datasets.contract import read_split_table
    from defectforge.trainables.gan import real_images
    from defectforge.trainables.gan_reals import metric_reals

    classes = read_split_table(sample_dataset, "train")["defect_class"].to_pylist()
    if "defect_class" in options:
        expected = classes.count(options["defect_class"])
    else:
        expected = len(classes) - (classes.count(None) if options else 0)
    cfg = tiny_config(data=str(sample_dataset), metric_images=1000, **options)

    assert 0 < expected and real_images(cfg).count() == expected
    assert len(metric_reals(cfg)) == expected


def test_progress_moves_between_snapshots(monkeypatch):
    from defectforge.gan import loop

    monkeypatch.setattr(loop, "PROGRESS_SECONDS", 0.0)
    cfg = tiny_config(kimg=0.016, snapshot_kimg=1.0)
    lines, snapshots = [], []

    def batches():
        while True:
            yield {"image": _reals(cfg, cfg.batch_size), "label": None}

    io = GanLoopIO(
        real_batches=batches(),
        report=lambda metrics, folder: snapshots.append(metrics["kimg"]),
        real_for_metric=lambda: np.zeros((16, 32, 32, 1), np.uint8),
        progress=lines.append,
    )
    train_gan(cfg, io)
    # Before the run's only snapshot after kimg 0 (its end), the bar got a line every step.
    assert snapshots == [0.0, 0.016]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all({"g_loss", "d_loss", "img_per_s"} <= set(line) for line in lines)
    assert lines[-1]["kimg"] == 0.012


def test_inception_weights_missing_damaged_or_foreign_are_one_line(tmp_path):
    from defectforge.core.errors import DataError
    from defectforge.gan.metrics import inception_features

    images = np.zeros((2, 8, 8, 1), np.uint8)
    (tmp_path / "damaged.pt").write_bytes(b"not weights")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "foreign.pt")
    for name, problem in (
        ("missing.pt", "Inception weights file not found.*nothing is downloaded"),
        ("damaged.pt", "damaged or not a PyTorch state dict"),
        ("foreign.pt", "the weights are not inception_v3's"),
    ):
        with pytest.raises(DataError, match=problem):
            inception_features(images, str(tmp_path / name))
