"""Pseudo-labelling generated images and mixing them with real ones at a synthetic ratio."""

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from defectforge.core.errors import ConfigError, DataError
from defectforge.datasets.augment import AugmentConfig
from defectforge.datasets.contract import read_split_table, split_dir, write_png
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.mix import MixConfig, NotEnoughSynthetic, plan_mix, synthetic_count
from defectforge.segmentation.pseudo_label import (
    Corrections,
    LabelConfig,
    close_regions,
    fill_holes,
    pseudo_label,
    remove_small_regions,
)

PAPER_RATIOS = (0.0, 0.13, 0.235, 0.315, 0.38, 0.44, 0.5)


def disc(size: int, radius: float, centre=None) -> np.ndarray:
    cy, cx = centre or (size // 2, size // 2)
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def test_hole_filling_turns_a_ring_into_a_disc_and_keeps_classes_apart():
    ring = (disc(40, 12) & ~disc(40, 6)).astype(np.uint8)
    filled = fill_holes(ring)
    assert np.array_equal(filled > 0, disc(40, 12))
    # A class-1 ring around a class-2 core with a background gap: the gap becomes 1, the core
    # stays 2.
    nested = ring.copy()
    nested[disc(40, 3)] = 2
    filled = fill_holes(nested)
    assert (filled[disc(40, 3)] == 2).all()
    assert (filled[disc(40, 6) & ~disc(40, 3)] == 1).all()
    # A region touching the border has no hole to fill.
    open_ring = ring.copy()
    open_ring[20, :] = 0
    open_ring[:, 20] = 0
    assert np.array_equal(fill_holes(open_ring), open_ring)


def test_small_regions_are_removed_per_class_and_closing_bridges_gaps():
    mask = np.zeros((30, 30), np.uint8)
    mask[2:4, 2:4] = 1  # 4 px
    mask[10:20, 10:20] = 1  # 100 px
    mask[25:27, 25:28] = 2  # 6 px
    cleaned = remove_small_regions(mask, min_area=5)
    assert cleaned[2:4, 2:4].sum() == 0
    assert (cleaned[10:20, 10:20] == 1).all() and (cleaned[25:27, 25:28] == 2).all()
    split = np.zeros((20, 20), np.uint8)
    split[5:15, 3:9] = 1
    split[5:15, 10:16] = 1  # one-pixel gap at column 9
    closed = close_regions(split, kernel=3)
    assert (closed[6:14, 9] == 1).all() and closed[0:4].sum() == 0


def _probabilities(mask: np.ndarray, confidence: float, classes: int = 3) -> np.ndarray:
    probs = np.full((classes, *mask.shape), (1 - confidence) / (classes - 1), np.float32)
    for k in range(classes):
        probs[k][mask == k] = confidence
    return probs


def test_pseudo_label_scores_corrects_and_filters():
    mask = (disc(32, 10) & ~disc(32, 4)).astype(np.uint8) * 2
    classes = ("background", "a", "b")
    label = pseudo_label(_probabilities(mask, 0.9), classes, Corrections(), 0.5, False)
    assert label.rejected == "" and label.defect_class == "b"
    assert label.confidence == pytest.approx(0.9)
    assert (label.mask[16, 16] == 2) and label.defect_fraction == pytest.approx(disc(32, 10).mean())
    unsure = pseudo_label(_probabilities(mask, 0.6), classes, Corrections(), 0.7, True)
    assert unsure.rejected == "low confidence" and set(np.unique(unsure.mask)) == {0, 1}
    empty = pseudo_label(
        _probabilities(np.zeros((8, 8), np.uint8), 0.99), classes, Corrections(), 0, False
    )
    assert empty.rejected == "no defect" and empty.confidence == 0.0


@pytest.mark.parametrize("ratio", PAPER_RATIOS)
def test_mix_plan_hits_the_ratio_within_one_image(ratio):
    real = 3129
    candidates = {f"s{i}": "patches" for i in range(4000)}
    plan = plan_mix(real, {"patches": real}, candidates, MixConfig(ratio))
    exact = ratio * real / (1 - ratio)
    assert abs(len(plan.synthetic_ids) - exact) <= 0.5
    assert abs(plan.achieved_ratio - ratio) <= 1 / (real + len(plan.synthetic_ids))


def test_mix_plan_is_seeded_stable_and_refuses_impossible_ratios():
    candidates = {f"s{i}": ("a" if i % 4 else "b") for i in range(100)}
    first = plan_mix(60, {"a": 30, "b": 30}, candidates, MixConfig(0.25, seed=1))
    again = plan_mix(60, {"a": 30, "b": 30}, candidates, MixConfig(0.25, seed=1))
    other = plan_mix(60, {"a": 30, "b": 30}, candidates, MixConfig(0.25, seed=2))
    assert first == again and first.synthetic_ids != other.synthetic_ids
    assert len(first.synthetic_ids) == synthetic_count(60, 0.25) == 20
    per_class = plan_mix(60, {"a": 30, "b": 30}, candidates, MixConfig(0.25, per_class=True))
    chosen = [candidates[i] for i in per_class.synthetic_ids]
    assert chosen.count("a") == chosen.count("b") == 10
    with pytest.raises(NotEnoughSynthetic, match="needs 240 synthetic images, only 100 exist"):
        plan_mix(60, {}, candidates, MixConfig(0.8))
    fewer = plan_mix(60, {}, candidates, MixConfig(0.8, allow_fewer=True))
    assert len(fewer.synthetic_ids) == 100 and fewer.achieved_ratio == pytest.approx(100 / 160)
    with pytest.raises(NotEnoughSynthetic, match="none fits a real defect class"):
        plan_mix(60, {"c": 30}, candidates, MixConfig(0.25, per_class=True, allow_fewer=True))
    with pytest.raises(NotEnoughSynthetic, match="would be the real set alone"):
        plan_mix(60, {}, {}, MixConfig(0.25, allow_fewer=True))
    with pytest.raises(ConfigError, match=r"ratio = 1.0: must be in \[0, 1\)"):
        MixConfig(1.0)


def test_label_config_validation():
    with pytest.raises(ConfigError, match="min_confidence = 1.5"):
        LabelConfig(images="x", labeller="y", min_confidence=1.5)
    with pytest.raises(ConfigError, match="HxW"):
        LabelConfig(images="x", labeller="y", size=(200,))
    with pytest.raises(ConfigError, match="min_region_area = -1"):
        Corrections(min_region_area=-1)


# --- Ray Data jobs on the bundled sample --------------------------------------------------


def test_labelling_writes_masks_lineage_report_and_plots(labelled, generated, sample_dataset):
    manifest = Manifest.load(labelled)
    table = pq.read_table(split_dir(labelled, "train"))
    assert manifest.split_total("train") == table.num_rows == 32
    rows = table.to_pylist()
    assert {r["source"] for r in rows} == {"synthetic"} and {r["defect_class"] for r in rows} == {
        "patches"
    }
    # Upscaled to the labeller's real image size (NEU: 200 x 200) before labelling.
    assert {(r["height"], r["width"]) for r in rows} == {(200, 200)}
    assert all(r["mask"] and r["label_confidence"] > 0.99 for r in rows)
    assert all("/seed" in r["origin"] and "|labeller:run-" in r["origin"] for r in rows)
    lineage = manifest.labelling
    assert lineage.labeller_data_id == Manifest.load(sample_dataset).dataset_id
    assert lineage.generated_dataset_id == Manifest.load(generated).dataset_id
    with open(labelled / "labels.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 32
    quality = json.loads((labelled / "label_quality.json").read_text())
    assert set(quality) == {"raw", "fill_holes", "min_area", "fill_holes+min_area"}
    # Calling every pixel "patches" on the sample's val images scores what it should.
    assert quality["raw"]["per_class_iou"]["background"] == 0.0
    for name in ("label_quality.png", "confidence.png", "synthetic_labels.png"):
        assert (labelled / "plots" / name).stat().st_size > 1000


def test_labelling_drops_unsure_images_and_rejects_a_wrong_channel_count(
    generated, labeller, tmp_path, capsys
):
    from defectforge.cli import main
    from defectforge.trainables.synth import label_synthetic

    strict = tmp_path / "strict"
    argv = ["synth", "label", "--images", str(generated), "--labeller", str(labeller)]
    assert main([*argv, "--min-confidence", "1.0", "--out", str(strict)]) == 0
    assert Manifest.load(strict).labelling.dropped == {"low confidence": 32}
    assert not (strict / "train").exists()
    assert "no image was kept, so it has nothing to mix; lower --min-confidence (now 1.0" in (
        capsys.readouterr().err
    )
    colour = tmp_path / "colour"
    colour.mkdir()
    write_png(colour / "a.png", np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8))
    with pytest.raises(DataError, match=r"images have 3 channel\(s\) but the labeller"):
        label_synthetic(LabelConfig(images=str(colour), labeller=str(labeller)), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_offline_and_lazy_mixes_agree_and_keep_val_real(sample_dataset, labelled, tmp_path):
    from defectforge.datasets.mix import plan_for
    from defectforge.trainables.data_jobs import mix_datasets, train_rows

    real = Manifest.load(sample_dataset)
    cfg = MixConfig(0.38, seed=3)
    manifest = mix_datasets(sample_dataset, labelled, cfg, tmp_path / "mixed")
    n_real = real.split_total("train")
    n_synthetic = synthetic_count(n_real, 0.38)
    mix = manifest.mix
    assert mix.synthetic_images == n_synthetic
    assert manifest.counts["train"].by_source == {"real": n_real, "synthetic": n_synthetic}
    assert mix.real_dataset_id == real.dataset_id
    assert mix.synthetic_dataset_id == Manifest.load(labelled).dataset_id
    train = pq.read_table(split_dir(tmp_path / "mixed", "train"), columns=["id", "source"])
    val = pq.read_table(split_dir(tmp_path / "mixed", "val"), columns=["source"])
    assert set(val["source"].to_pylist()) == {"real"}
    lazy = train_rows(sample_dataset, str(labelled), cfg)
    assert sorted(r["id"] for r in lazy.select_columns(["id"]).take_all()) == sorted(
        train["id"].to_pylist()
    )
    assert plan_for(sample_dataset, labelled, cfg).plan.achieved_ratio == mix.achieved_ratio


def test_ratio_zero_reproduces_the_real_set_and_impossible_ratios_fail(
    sample_dataset, labelled, tmp_path
):
    from defectforge.trainables.data_jobs import mix_datasets

    manifest = mix_datasets(sample_dataset, labelled, MixConfig(0.0), tmp_path / "zero")
    assert manifest.dataset_id == Manifest.load(sample_dataset).dataset_id
    assert (
        pq.read_table(split_dir(tmp_path / "zero", "train"))
        .sort_by("id")
        .equals(pq.read_table(split_dir(sample_dataset, "train")).sort_by("id"))
    )
    with pytest.raises(NotEnoughSynthetic, match="--allow-fewer"):
        mix_datasets(sample_dataset, labelled, MixConfig(0.5), tmp_path / "too-many")
    assert not (tmp_path / "too-many").exists()
    with pytest.raises(ConfigError, match="factor = 0: must be >= 1"):
        AugmentConfig(factor=0)


def test_mix_then_offline_augmentation_expands_train_only(sample_dataset, labelled, tmp_path):
    from defectforge.trainables.data_jobs import mix_datasets

    twice = AugmentConfig(factor=2, strength=1.0)
    manifest = mix_datasets(sample_dataset, labelled, MixConfig(0.13), tmp_path / "mixed-2x", twice)
    real = Manifest.load(sample_dataset)
    n_mixed = real.split_total("train") + manifest.mix.synthetic_images
    assert manifest.split_total("train") == 2 * n_mixed
    assert pq.read_table(split_dir(tmp_path / "mixed-2x", "train")).num_rows == 2 * n_mixed
    assert manifest.counts["val"] == real.counts["val"]
    assert manifest.augmentation.factor == 2
    assert manifest.mix.requested_ratio == 0.13
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # scratch removed


def test_mixing_unlabelled_images_is_a_clear_error(sample_dataset, generated, tmp_path):
    from defectforge.trainables.data_jobs import mix_datasets

    with pytest.raises(DataError, match="no masks yet.*synth label"):
        mix_datasets(sample_dataset, generated, MixConfig(0.2), tmp_path / "mixed")


def _interrupt(*args):
    raise KeyboardInterrupt


def test_an_interrupted_labelling_labels_only_the_parts_not_done(
    generated, labeller, labelled, tmp_path, monkeypatch
):
    from defectforge.segmentation.pseudo_label import Corrections, LabelConfig
    from defectforge.trainables import synth

    monkeypatch.setattr(synth, "PART_ROWS", 16)  # the 32 images in two parts
    saved = []
    save_part = synth._save_part

    def interrupted_at_the_second(path, table):
        if saved:
            raise KeyboardInterrupt
        saved.append(table.num_rows)
        save_part(path, table)

    cfg = LabelConfig(
        images=str(generated),
        labeller=str(labeller),
        corrections=Corrections(min_region_area=20),
    )
    out = tmp_path / "synthetic"
    monkeypatch.setattr(synth, "_save_part", interrupted_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        synth.label_synthetic(cfg, out)
    assert not out.exists() and saved == [16]
    (parts,) = tmp_path.glob(".synthetic.labelling-*")
    assert len(list(parts.glob("part-*.parquet"))) == 1
    given = []
    label_rows = synth.label_rows
    monkeypatch.setattr(synth, "_save_part", save_part)
    monkeypatch.setattr(
        synth,
        "label_rows",
        lambda *args: (
            given.append(args[1] if args[1] is None else args[1].count()) or label_rows(*args)
        ),
    )
    # Interrupted again once every part is saved, before the dataset is published.
    plot_label_grid = synth.plot_label_grid
    monkeypatch.setattr(synth, "plot_label_grid", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        synth.label_synthetic(cfg, out)
    assert given == [16] and len(list(parts.glob("part-*.parquet"))) == 2  # the second part only
    monkeypatch.setattr(synth, "plot_label_grid", plot_label_grid)
    synth.label_synthetic(cfg, out)
    assert given == [16, None] and not parts.exists()  # nothing left to label: val scored alone
    ours, fresh = (read_split_table(d, "train").sort_by("id") for d in (out, labelled))
    assert ours.column("id").equals(fresh.column("id"))
    assert ours.column("mask").equals(fresh.column("mask"))
    quality = (json.loads((d / "label_quality.json").read_text()) for d in (out, labelled))
    assert next(quality) == next(quality)
