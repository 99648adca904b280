"""A GAN that draws defects: a generator that draws each image's mask beside it, the measure
of how many samples hold a defect, label-preserving mirroring of the reals, never handing on an
untrained generator, and the `gan` commands' refusals of what cannot work."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from cli_checks import error_lines

from defectforge.core.errors import DataError
from defectforge.core.storage import Location
from defectforge.datasets.batches import GanBatchMaker, mask_channels_of
from defectforge.datasets.contract import decode_png, encode_png
from defectforge.gan.config import GanConfig
from defectforge.gan.diffaug import diff_augment
from defectforge.gan.generate import generate_samples, masks_of
from defectforge.gan.loop import GanTrainer
from defectforge.studies.errors import SpecError

SMALL = dict(z_dim=32, w_dim=32, mapping_layers=2, channel_base=256, channel_max=32)
SIDE = 16


def _squares(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Dark images each with one bright square (4-7 px) somewhere; the mask is the square."""
    images = np.full((n, SIDE, SIDE), 40, np.uint8)
    masks = np.zeros((n, SIDE, SIDE), np.uint8)
    for i in range(n):
        side = rng.integers(4, 8)
        top, left = rng.integers(0, SIDE - side, 2)
        images[i, top : top + side, left : left + side] = 220
        masks[i, top : top + side, left : left + side] = 1
    return images, masks


def _batch(rng: np.random.Generator, n: int) -> torch.Tensor:
    images, masks = _squares(rng, n)
    pixels = images[:, None].astype(np.float32) / 127.5 - 1
    return torch.from_numpy(np.concatenate([pixels, mask_channels_of(masks, 1)], axis=1))


def _agreement(images: np.ndarray, masks: np.ndarray) -> float:
    """Mean IoU of each drawn mask with its image's bright pixels (1 where both are empty)."""
    bright, drawn = images[..., 0] > 128, masks > 0
    inter = (bright & drawn).sum(axis=(1, 2))
    union = (bright | drawn).sum(axis=(1, 2))
    return float(np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean())


def test_a_generator_that_draws_masks_learns_masks_that_fit_its_images():
    torch.set_num_threads(1)
    cfg = GanConfig(
        data="squares",
        channels=1,
        classes=("defect",),
        masks=True,
        resolution=SIDE,
        batch_size=16,
        diffaug="",
        g_lr=0.002,
        d_lr=0.002,
        **SMALL,
    )
    trainer = GanTrainer(cfg, torch.device("cpu"))
    assert trainer.G.img_channels == 2  # the image's channel and one mask channel
    rng = np.random.default_rng(0)
    before = _agreement(*generate_samples(trainer.G_ema, cfg, range(200)))
    for _ in range(300):
        trainer.step(_batch(rng, 16), None)
    images, masks = generate_samples(trainer.G_ema, cfg, range(200))
    after = _agreement(images, masks)
    # Each mask fits its own image, not just where squares tend to be: another sample's mask
    # fits far worse.
    shuffled = _agreement(images, np.roll(masks, 1, axis=0))
    assert before < 0.4 and after > 0.6 and shuffled < after / 2, (before, after, shuffled)
    assert 0.01 < (masks > 0).mean() < 0.4  # squares are drawn, not all or nothing


def test_mask_channels_and_mirroring_keep_each_mask_on_its_image():
    image = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))  # brighter to the right
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 24:] = 2  # the second defect class, on the bright right-hand side
    maker = GanBatchMaker(1, 32, mask_classes=2, mirror="dihedral", mirror_seed=3)
    batch = maker({"image": [encode_png(image)] * 64, "mask": [encode_png(mask)] * 64})
    channels = batch["image"]
    assert channels.shape == (64, 3, 32, 32)
    assert set(np.unique(channels[:, 1:])) == {-1.0, 1.0}
    assert (channels[:, 1] == -1).all()  # no pixel of the first class
    # Whatever symmetry each sample got, the mask still covers the image's brightest quarter.
    bright = channels[:, 0] > 0.45
    assert ((channels[:, 2] > 0) == bright).all()
    # And the symmetries differ between samples: the bright side is not always on the right.
    sides = {tuple(np.argwhere(b).mean(0).round()) for b in bright}
    assert len(sides) == 4
    unmirrored = GanBatchMaker(1, 32).images([encode_png(image)] * 4)
    assert (unmirrored[..., 0] == image).all()


def test_diffaugment_moves_masks_with_the_image_but_leaves_their_values():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    x[:, 1:] = torch.where(x[:, 1:] > 0, 1.0, -1.0)
    colour = diff_augment(x, "color", generator=torch.Generator().manual_seed(0), image_channels=1)
    assert torch.equal(colour[:, 1:], x[:, 1:]) and not torch.equal(colour[:, :1], x[:, :1])
    shifted = diff_augment(
        x, "translation", generator=torch.Generator().manual_seed(0), image_channels=1
    )
    alone = diff_augment(x[:, :1], "translation", generator=torch.Generator().manual_seed(0))
    assert torch.equal(shifted[:, :1], alone) and not torch.equal(shifted[:, 1:], x[:, 1:])
    assert torch.equal(
        masks_of(torch.tensor([[[[1.0]], [[-1.0]]], [[[-0.5]], [[-1.0]]]])).flatten(),
        torch.tensor([1, 0], dtype=torch.uint8),
    )


def _small_config(data: Path, **options) -> GanConfig:
    """A 32-px GAN config of the small networks for the dataset ``data``."""
    from defectforge.datasets.manifest import Manifest

    manifest = Manifest.load(data)
    return GanConfig(
        data=str(data),
        data_manifest_id=manifest.dataset_id,
        channels=1,
        classes=manifest.classes[1:],
        resolution=32,
        **options,
        **SMALL,
    )


def _save_generator(folder: Path, cfg: GanConfig, generator: torch.nn.Module) -> None:
    """The two files a run keeps of a generator."""
    from defectforge.gan.checkpoint import CONFIG_FILE, GENERATOR_FILE

    torch.save(generator.state_dict(), folder / GENERATOR_FILE)
    (folder / CONFIG_FILE).write_text(cfg.to_json())


def _mask_generator(folder: Path, data: Path, mask_bias: float) -> Path:
    """An untrained generator that draws masks, its mask channels pushed by ``mask_bias``."""
    from defectforge.gan.checkpoint import build_generator

    cfg = _small_config(data, masks=True)
    generator = build_generator(cfg)
    with torch.no_grad():
        generator.blocks[-1].torgb.bias[1:] = mask_bias
    folder.mkdir(parents=True)
    _save_generator(folder, cfg, generator)
    return folder


def test_drawn_masks_survive_generate_mix_and_the_training_feed(
    ray_session, sample_dataset, tmp_path
):
    from defectforge.cli import main
    from defectforge.datasets.batches import BatchMaker, BatchSpec
    from defectforge.datasets.manifest import Manifest
    from defectforge.datasets.mix import MixConfig
    from defectforge.trainables.data_jobs import mix_datasets

    run = _mask_generator(tmp_path / "gan", sample_dataset, mask_bias=0.0)
    out = tmp_path / "drawn"
    assert main(["gan", "generate", "--model", str(run), "--count", "24", "--out", str(out)]) == 0
    manifest = Manifest.load(out)
    assert manifest.masks and manifest.labelling.labeller.startswith("drawn")
    drawn = {row["id"]: row for row in pq.read_table(out / "train").to_pylist()}
    assert drawn and all(row["mask"] is not None for row in drawn.values())
    for row in drawn.values():
        mask = decode_png(row["mask"], 0)
        assert mask.shape == (32, 32) and mask.max() <= 3 and mask.any()
        counts = np.bincount(mask.ravel(), minlength=4)[1:]
        assert row["defect_class"] == manifest.classes[1 + int(counts.argmax())]

    mixed = tmp_path / "mixed"
    mix_datasets(sample_dataset, out, MixConfig(ratio=0.2), mixed)
    rows = pq.read_table(mixed / "train").to_pylist()
    synthetic = [row for row in rows if row["source"] == "synthetic"]
    assert synthetic and all(row["mask"] == drawn[row["id"]]["mask"] for row in synthetic)
    spec = BatchSpec(channels=1, mean=(0.5,), std=(0.25,))
    fed = BatchMaker(spec, train=False)(
        {"image": [r["image"] for r in synthetic], "mask": [r["mask"] for r in synthetic]}
    )
    for row, mask in zip(synthetic, fed["mask"], strict=True):
        assert (mask == decode_png(row["mask"], 0)).all()


def test_generated_sets_are_written_table_by_table_with_the_same_rows_and_statistics(
    ray_session, sample_dataset, tmp_path, monkeypatch
):
    """Memory does not grow with --count: images are drawn and written a table at a time, and
    the set (rows, kept masks, pixel statistics) is the one drawn whole."""
    from defectforge.datasets.manifest import Manifest
    from defectforge.trainables import gan_samples

    run = _mask_generator(tmp_path / "gan", sample_dataset, mask_bias=0.0)
    whole, in_tables = tmp_path / "whole", tmp_path / "tables"
    gan_samples.write_generated(run, whole, list(range(23)))
    monkeypatch.setattr(gan_samples, "SEEDS_PER_TABLE", 5)
    gan_samples.write_generated(run, in_tables, list(range(23)))

    assert len(list((whole / "train").glob("*.parquet"))) == 1
    assert len(list((in_tables / "train").glob("*.parquet"))) >= 4
    rows = {name: pq.read_table(name / "train").to_pylist() for name in (whole, in_tables)}
    assert rows[whole] and rows[whole] == rows[in_tables]
    manifests = Manifest.load(whole), Manifest.load(in_tables)
    assert manifests[0].pixel_mean == manifests[1].pixel_mean
    assert manifests[0].pixel_std == manifests[1].pixel_std
    assert manifests[0].labelling.kept == manifests[1].labelling.kept == len(rows[whole])


def test_a_stop_asked_for_with_sigterm_while_generating_leaves_nothing_behind(
    sample_dataset, tmp_path
):
    """SIGTERM (a scheduler's stop) ends `gan generate` as Ctrl-C does: exit 130, one line, and
    neither the set nor its staging folder left beside --out."""
    run = _mask_generator(tmp_path / "gan", sample_dataset, mask_bias=0.0)
    out = tmp_path / "drawn"
    command = [sys.executable, "-m", "defectforge.cli", "gan", "generate", "--model", str(run)]
    command += ["--count", "200000", "--out", str(out)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(tmp_path.glob(".drawn.*/*.png")):
        assert process.poll() is None, process.stderr.read()[-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 130, err[-2000:]
    ours = [line for line in error_lines(err) if line.startswith("defectforge:")]
    assert "Traceback" not in err and len(ours) == 1 and "interrupted" in ours[0], err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gan"]


def test_a_generator_that_draws_no_defect_publishes_nothing(ray_session, sample_dataset, tmp_path):
    from defectforge.cli import main

    run = _mask_generator(tmp_path / "gan", sample_dataset, mask_bias=-20.0)
    out = tmp_path / "drawn"
    assert main(["gan", "generate", "--model", str(run), "--count", "8", "--out", str(out)]) == 2
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--count", "0"], "count = 0: must be >= 1"),
        (["--count", "-5"], "count = -5: must be >= 1"),
        (["--seeds", "9-3"], "--seeds '9-3': a range goes up, e.g. 3-9"),
        (["--seeds", "a,b"], "give seeds as 0,5,9 or a range 0-99"),
    ],
)
def test_gan_generate_refuses_seeds_it_cannot_draw(
    ray_session, sample_dataset, tmp_path, capsys, flags, message
):
    from defectforge.cli import main

    run = _mask_generator(tmp_path / "gan", sample_dataset, mask_bias=0.0)
    out = tmp_path / "out"
    assert main(["gan", "generate", "--model", str(run), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(error_lines(err)) == 1
    assert not out.exists()


def test_a_gan_whose_workers_would_get_less_than_a_batch_is_refused_before_it_starts(
    ray_session, sample_dataset, tmp_path, capsys
):
    from defectforge.cli import main

    out = tmp_path / "run"
    argv = ["gan", "train", "--data", str(sample_dataset), "--out", str(out), "--batch-size", "64"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "42 train image(s) give each of 1 GAN worker(s) 42, fewer than one batch of 64" in err
    assert "lower --batch-size to 42 or less" in err and not out.exists()


def _blobs(rng: np.random.Generator, n: int, share: float, side: int = 32):
    """Noisy grey crops; ``share`` of them hold a bright square (class 1) or a dark bar
    (class 2), with their masks."""
    images = rng.normal(100, 20, (n, side, side, 1)).clip(0, 255).astype(np.uint8)
    masks = np.zeros((n, side, side), np.uint8)
    for i in np.flatnonzero(rng.random(n) < share):
        kind, size = rng.integers(1, 3), rng.integers(5, 9)
        top, left = rng.integers(0, side - size, 2)
        width = size if kind == 1 else 2
        images[i, top : top + size, left : left + width] = 230 if kind == 1 else 10
        masks[i, top : top + size, left : left + width] = kind
    return images, masks


def test_the_presence_measure_finds_the_share_of_samples_that_hold_each_defect():
    from defectforge.gan.presence import Presence, train_presence

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    images, masks = _blobs(rng, 800, share=0.5)
    presence = train_presence(images, masks, np.arange(800) // 4, ("bright", "dark"), 8, steps=300)
    assert presence.held_out_accuracy > 0.9
    assert abs(presence.real_shares["defect_share"] - 0.5) < 0.06
    # "Generators" made to draw known blobs: the measured shares follow the drawn ones.
    for share in (0.0, 0.3, 0.9):
        drawn, _ = _blobs(rng, 400, share)
        measured = presence.shares(drawn)
        assert abs(measured["defect_share"] - share) < 0.07, (share, measured)
        assert abs(measured["defect_share_bright"] - share / 2) < 0.08, (share, measured)
    again = Presence.from_state(presence.state())
    assert (again.held(images[:50]) == presence.held(images[:50])).all()


def _kept_snapshot(run: Path, kimg: float, data: Path, seed: int) -> None:
    """A snapshot as a run keeps it: an untrained generator, its config and its grid."""
    import cv2

    from defectforge.gan.checkpoint import build_generator

    name = f"kimg_{kimg:09.3f}"
    folder = run / "snapshots" / name
    folder.mkdir(parents=True)
    cfg = _small_config(data, metric_images=16)
    torch.manual_seed(seed)
    _save_generator(folder, cfg, build_generator(cfg))
    (run / "samples").mkdir(exist_ok=True)
    cv2.imwrite(str(run / "samples" / f"{name}.png"), np.full((32, 32, 3), seed * 40, np.uint8))


def test_kimg_0_is_never_published_and_a_run_that_never_beat_it_publishes_nothing(
    sample_dataset, tmp_path, capsys
):
    from defectforge.trainables.gan import publish_run

    run = tmp_path / "run"
    for seed, kimg in enumerate((0.0, 2.0, 4.0)):
        _kept_snapshot(run, kimg, sample_dataset, seed)
    cfg = GanConfig.load(run / "snapshots" / "kimg_00004.000" / "config.json")
    history = [{"kimg": 0.0, "swd": 100.0}, {"kimg": 2.0, "swd": 90.0}, {"kimg": 4.0, "swd": 95.0}]
    summary = publish_run(cfg, Location.of(run), history)
    assert summary["best"]["kimg"] == 2.0
    kept = run / "snapshots" / "kimg_00002.000" / "generator.pt"
    assert (run / "generator.pt").read_bytes() == kept.read_bytes()
    assert (run / "plots" / "swd.png").is_file() and (run / "plots" / "samples.png").is_file()

    # The untrained start had the lowest SWD: nothing is published, the earlier one goes too.
    worse = [{"kimg": 0.0, "swd": 80.0}, {"kimg": 2.0, "swd": 90.0}, {"kimg": 4.0, "swd": 95.0}]
    with pytest.raises(DataError, match="no snapshot beat the untrained generator's SWD 80.0"):
        publish_run(cfg, Location.of(run), worse)
    assert not (run / "generator.pt").exists()
    assert json.loads((run / "metrics.json").read_text())["best"] is None
    from defectforge.cli import main

    generated = tmp_path / "generated"
    assert main(["gan", "generate", "--model", str(run), "--out", str(generated)]) == 2
    assert "published no generator: none of its snapshots beat" in capsys.readouterr().err
    assert not generated.exists()


def test_every_snapshot_a_run_kept_is_scored_on_request(ray_session, sample_dataset, tmp_path):
    from defectforge.cli import main

    run = tmp_path / "run"
    for seed, kimg in enumerate((0.0, 2.0)):
        _kept_snapshot(run, kimg, sample_dataset, seed)
    assert main(["gan", "metrics", "--model", str(run), "--every-snapshot"]) == 0
    rows = json.loads((run / "snapshot_metrics.json").read_text())
    assert [row["kimg"] for row in rows] == [0.0, 2.0]
    for row in rows:
        assert row["swd"] > 0 and row["swd_defect"] > 0 and 0 <= row["defect_share"] <= 1
        assert set(row) >= {"defect_share_inclusion", "defect_share_patches", "real_defect_share"}
    assert rows[0]["swd"] != rows[1]["swd"]  # two different generators
    assert (run / "plots" / "swd.png").is_file()


def test_a_study_mixes_in_images_and_masks_its_mask_gan_stage_drew(
    ray_session, sample_dataset, tmp_path
):
    """The third synthetic source: a mask GAN stage (here a given run), its samples generated
    with their drawn masks by the generate_masks stage, mixed into a trial with no labeller."""
    import yaml

    from defectforge.studies.results import TRIALS_FILE
    from defectforge.trainables.study import run_study

    run = _mask_generator(tmp_path / "mask-gan", sample_dataset, mask_bias=0.0)
    spec = {
        "name": "drawn",
        "dataset": {"real": str(sample_dataset)},
        "mask_gan": {"run": str(run)},
        "generate_masks": {"count": 24},
        "search_space": {
            "synthetic_ratio": 0.2,
            "synthetic_source": "gan_masks",
            "epochs": 1,
            "batch_size": 4,
        },
        "training": {"crop_size": 32, "max_steps_per_epoch": 2},
        "search": {"algorithm": "grid"},
        "storage_path": str(tmp_path / "studies"),
        "final": {"seeds": 0},
    }
    plain = tmp_path / "plain-gan"
    plain.mkdir()
    (plain / "config.json").write_text(_small_config(sample_dataset).to_json())
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({**spec, "mask_gan": {"run": str(plain)}}))
    with pytest.raises(SpecError, match="mask_gan.run = .*draws no masks.*gan train --masks"):
        run_study(spec_file)
    assert not (tmp_path / "studies" / "stages").exists()  # refused before any stage

    spec_file.write_text(yaml.safe_dump(spec))
    run_study(spec_file)

    study = json.loads((tmp_path / "studies" / "drawn" / "study.json").read_text())
    made = {stage["name"]: stage["status"] for stage in study["stages"]}
    assert made == {"mask_gan": "given", "generate_masks": "ran"}
    drawn = study["spec"]["dataset"]["gan_masks"]
    assert Path(drawn).parent.name == "stages" and "gan_masks" in study["dataset_ids"]
    (trial,) = json.loads((tmp_path / "studies" / "drawn" / TRIALS_FILE).read_text())
    # A ratio above 0 with no synthetic set would have failed the trial's config.
    assert trial["status"] == "finished" and trial["config"]["synthetic_source"] == "gan_masks"
