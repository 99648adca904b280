"""The few-shot question's tools: stratified subsets, replace-mode mixes, the leakage check,
copy-paste images with exact masks, per-image IoU, arms compared on test, ASHA stopping a trial."""

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from cli_checks import refused

from defectforge.core.errors import DataError
from defectforge.datasets.contract import decode_png, read_split_table
from defectforge.datasets.manifest import Manifest
from defectforge.studies.errors import SpecError
from defectforge.studies.spec import parse_spec


def _classes(root: Path, split: str) -> dict[str, str | None]:
    table = read_split_table(root, split, columns=["id", "defect_class"])
    return dict(zip(table["id"].to_pylist(), table["defect_class"].to_pylist(), strict=True))


@pytest.fixture(scope="module")
def few(sample_dataset, tmp_path_factory) -> Path:
    """12 of the sample's 42 train images, 6 of its 15 val; the rest are the test split."""
    from defectforge.datasets.subset import SubsetConfig, subset_dataset

    out = tmp_path_factory.mktemp("few") / "few"
    subset_dataset(sample_dataset, out, SubsetConfig(train=12, val=6, rest_as_test=True))
    return out


def test_a_subset_is_seeded_stratified_and_lists_its_ids(sample_dataset, few, tmp_path):
    from defectforge.datasets.subset import SubsetConfig, subset_dataset

    parent, manifest = _classes(sample_dataset, "train"), Manifest.load(few)
    kept = _classes(few, "train")
    assert sorted(kept) == manifest.subset.train_ids and len(kept) == 12
    wanted = Counter(c or "none" for c in parent.values())
    for name, count in Counter(c or "none" for c in kept.values()).items():
        assert abs(count - 12 * wanted[name] / len(parent)) < 1  # proportional, rounded
    assert manifest.counts["val"].total == 6
    assert manifest.counts["test"].total == (42 - 12) + (15 - 6)
    assert set(_classes(few, "test")).isdisjoint(kept)
    assert manifest.pixel_mean != Manifest.load(sample_dataset).pixel_mean  # from the 12 alone
    again = subset_dataset(sample_dataset, tmp_path / "again", SubsetConfig(train=12, val=6))
    other = subset_dataset(sample_dataset, tmp_path / "other", SubsetConfig(train=12, seed=1))
    assert again.subset.train_ids == manifest.subset.train_ids
    assert other.subset.train_ids != manifest.subset.train_ids
    assert again.counts["test"].total == 0  # without rest_as_test the rest is left out
    with pytest.raises(DataError, match="more train images than the 42"):
        subset_dataset(sample_dataset, tmp_path / "big", SubsetConfig(train=43))


@pytest.fixture(scope="module")
def pasted(few, tmp_path_factory) -> Path:
    from defectforge.datasets.copy_paste import CopyPasteConfig, copy_paste_dataset

    out = tmp_path_factory.mktemp("pasted") / "cp"
    copy_paste_dataset(few, out, CopyPasteConfig(count=24, pastes=1, seed=3))
    return out


def test_copy_paste_masks_are_exactly_the_pasted_pixels():
    from defectforge.datasets.copy_paste import paste

    rng = np.random.default_rng(0)
    target = rng.integers(0, 255, (40, 50, 1), dtype=np.uint8)
    target_mask = np.zeros((40, 50), np.uint8)
    target_mask[:5] = 2
    pixels = rng.integers(0, 255, (12, 16, 1), dtype=np.uint8)
    inside = np.zeros((12, 16), bool)
    inside[2:10, 3:14] = True
    image, mask = paste(target, target_mask, pixels, inside, 3, (4, 20), feather=2)
    box = (slice(4, 16), slice(20, 36))
    assert np.array_equal(mask[box] == 3, inside)  # the mask is the region, no more, no less
    deep = np.zeros_like(inside)
    deep[4:8, 5:12] = True  # more than 2 px (the feather) inside the region
    assert np.array_equal(image[box][deep], pixels[deep])
    outside = np.ones((40, 50), bool)
    outside[2:18, 18:38] = False  # beyond the region's edge and its feather
    assert np.array_equal(image[outside], target[outside])
    assert np.array_equal(mask[:4], target_mask[:4])  # the target's own defects stay


def test_a_copy_paste_set_is_labelled_exactly_and_mixes_like_gan_images(few, pasted):
    from defectforge.datasets.mix import MixConfig, plan_for

    manifest = Manifest.load(pasted)
    assert manifest.counts["train"].total == 24 and manifest.source == "synthetic"
    table = read_split_table(pasted, "train")
    columns = (table[name].to_pylist() for name in ("image", "mask", "defect_class"))
    for image, mask, cls in zip(*columns, strict=True):
        values = np.unique(decode_png(mask, 0))
        assert values.max() > 0 and cls is not None  # each image got a defect
        assert decode_png(image, 1).shape[:2] == decode_png(mask, 0).shape
    assert all(o.startswith("copy-paste: ") for o in table["origin"].to_pylist())
    mix = plan_for(few, pasted, MixConfig(ratio=0.5))
    assert len(mix.plan.synthetic_ids) == 12


def test_replace_mode_keeps_real_count_real_images_and_the_synthetic_count_follows(
    few, pasted, tmp_path
):
    from defectforge.datasets.mix import MixConfig, plan_for

    mix = plan_for(few, pasted, MixConfig(ratio=0.5, real_count=8))
    assert len(mix.plan.real_ids) == 8 and len(mix.plan.synthetic_ids) == 8
    assert set(mix.plan.real_ids) <= set(_classes(few, "train"))
    assert plan_for(few, pasted, MixConfig(ratio=0.5, real_count=8)).plan == mix.plan
    with pytest.raises(DataError, match="real_count 13 is more than the 12"):
        plan_for(few, pasted, MixConfig(ratio=0.5, real_count=13))


def test_synthetic_data_made_from_a_studys_test_images_is_refused(sample_dataset, few, labelled):
    from defectforge.datasets.mix import check_compatible

    # The labelled fixture's GAN and labeller learnt from the whole sample's train split, which
    # is mostly the few-shot subset's test split now.
    with pytest.raises(DataError, match=r"learnt from \d+ image\(s\) that are in .*test split"):
        check_compatible(few, labelled)
    check_compatible(sample_dataset, labelled)  # their own dataset: no leakage


def test_generated_sets_never_replace_real_data_and_only_generated_images_are_labelled(
    sample_dataset, generated, labelled, tmp_path
):
    """Found probing the GAN commands as a new user: `gan generate --overwrite` replaced the
    GAN's own training dataset with its samples; `synth label` labelled a real dataset's rows as
    synthetic, and a GAN run folder's sample grid as one generated image."""
    from defectforge.trainables.gan_samples import write_generated
    from defectforge.trainables.synth import generated_dataset

    run = generated.parent / "run"
    real = tmp_path / "real"
    shutil.copytree(sample_dataset, real)
    before = Manifest.load(real).dataset_id
    with pytest.raises(DataError, match="built from raw images .* only `data build` replaces"):
        write_generated(run, real, [0, 1], overwrite=True)
    assert Manifest.load(real).dataset_id == before
    from defectforge.datasets.mix import MixConfig
    from defectforge.trainables.data_jobs import mix_datasets

    with pytest.raises(DataError, match="only `data build` replaces"):  # nor does a mix
        mix_datasets(sample_dataset, labelled, MixConfig(0.1), real, overwrite=True)
    assert Manifest.load(real).dataset_id == before
    with pytest.raises(DataError, match="--out is the input .* would replace your input data"):
        write_generated(run, sample_dataset, [0], overwrite=True)  # the data it learnt from
    with pytest.raises(DataError, match=r"real images \(source neu-seg\), which have masks"):
        generated_dataset(sample_dataset)
    with pytest.raises(DataError, match="is a GAN run folder, not generated images; write them"):
        generated_dataset(run)


def test_a_mix_of_the_wrong_kinds_of_set_says_which_to_give(sample_dataset, labelled, tmp_path):
    """Found probing `data mix` as a new user: a synthetic set as --real mixed as if real, and a
    real dataset or a folder of images as --synthetic got fixes that did not work."""
    from defectforge.datasets.mix import check_compatible

    with pytest.raises(DataError, match="is a synthetic set, and the real side of a mix"):
        check_compatible(labelled, labelled)
    with pytest.raises(DataError, match=r"is a dataset of real images \(source neu-seg\)"):
        check_compatible(sample_dataset, sample_dataset)
    (tmp_path / "shots").mkdir()
    with pytest.raises(DataError, match="no synthetic set .*synth label --images FOLDER"):
        check_compatible(sample_dataset, tmp_path / "shots")
    # and `synth label` on that folder does not advise a --skip-bad it lacks
    from defectforge.trainables.synth import generated_dataset

    (tmp_path / "shots" / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="file is empty; re-export the file or remove it$"):
        generated_dataset(tmp_path / "shots")


def test_copy_paste_with_no_region_large_enough_names_the_min_area_that_works(
    sample_dataset, tmp_path
):
    from defectforge.datasets.copy_paste import CopyPasteConfig, copy_paste_dataset

    with pytest.raises(DataError, match=r"the largest is \d+ px") as refused:
        copy_paste_dataset(sample_dataset, tmp_path / "a", CopyPasteConfig(count=2, min_area=10**8))
    largest = int(str(refused.value).rsplit("--min-area to ", 1)[1].split()[0])
    assert not (tmp_path / "a").exists()
    copy_paste_dataset(sample_dataset, tmp_path / "b", CopyPasteConfig(count=2, min_area=largest))


def test_combined_sets_give_as_many_rows_each_and_keep_every_makers_sources(
    sample_dataset, few, labelled, tmp_path, capsys
):
    from defectforge.cli import main
    from defectforge.datasets.combine import CombineConfig, combine_synthetic
    from defectforge.datasets.copy_paste import CopyPasteConfig, copy_paste_dataset
    from defectforge.datasets.mix import MixConfig, check_compatible, plan_for, synthetic_count

    pasted = tmp_path / "cp"
    copy_paste_dataset(sample_dataset, pasted, CopyPasteConfig(count=40, pastes=1))
    gan_ids = set(_classes(labelled, "train"))
    assert 0 < len(gan_ids) < 40
    out = tmp_path / "both"
    assert main(["synth", "combine", "--sets", str(labelled), str(pasted), "--out", str(out)]) == 0
    assert f"{len(gan_ids)} images from each of 2 sets" in capsys.readouterr().out
    ids = set(_classes(out, "train"))
    assert len(ids) == 2 * len(gan_ids) and gan_ids < ids  # the smaller set whole
    assert ids - gan_ids < set(_classes(pasted, "train"))  # as many copy-paste rows
    manifest = Manifest.load(out)
    roles = sorted(source.role for source in manifest.labelling.trained_on)
    assert roles == ["GAN", "copy-paste source", "labeller"]
    check_compatible(sample_dataset, out)
    with pytest.raises(DataError, match=rf"ask for at most {len(gan_ids)}, "):  # the smallest's
        combine_synthetic([str(pasted), str(labelled)], tmp_path / "x", CombineConfig(1000))
    with pytest.raises(
        DataError, match=r"its (GAN|labeller|copy-paste source) learnt from \d+ image"
    ):
        check_compatible(few, out)  # every set's makers are checked
    same = combine_synthetic([str(pasted), str(labelled)], tmp_path / "same", CombineConfig())
    other = combine_synthetic([str(labelled), str(pasted)], tmp_path / "s1", CombineConfig(seed=1))
    assert same.dataset_id == manifest.dataset_id  # the same sets in another order
    assert set(_classes(tmp_path / "s1", "train")) != ids and other.dataset_id != same.dataset_id
    mix = plan_for(sample_dataset, out, MixConfig(ratio=0.3))
    assert len(mix.plan.synthetic_ids) == synthetic_count(42, 0.3)


def test_combine_refuses_what_it_cannot_join_in_one_line(
    sample_dataset, generated, labelled, tmp_path, capsys
):
    out = tmp_path / "out"

    def combine(*argv: str) -> list[str]:
        return ["synth", "combine", "--out", str(out), "--sets", *argv]

    refused(capsys, combine(str(labelled)), "1 set(s) to combine", "give two or more")
    unlabelled = "it is not a labelled synthetic set"
    refused(capsys, combine(str(labelled), str(generated)), str(generated), unlabelled)
    refused(capsys, combine(str(labelled), str(sample_dataset)), unlabelled)
    refused(capsys, combine(str(labelled), str(labelled)), "share row ids", "sets made apart")
    too_many = [str(labelled), str(labelled), "--count-each", "1000"]
    refused(capsys, combine(*too_many), "count_each 1000 asks for more rows than its")

    def altered(name: str, change) -> str:
        """A copy of the labelled set whose manifest ``change`` edits."""
        folder = tmp_path / name
        shutil.copytree(labelled, folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        change(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return str(folder)

    older = altered("older", lambda m: m["labelling"].pop("trained_on"))
    refused(capsys, combine(str(labelled), older), older, "does not record what its makers")
    empty = altered("empty", lambda m: m["counts"]["train"].update(total=0))
    refused(capsys, combine(str(labelled), empty), empty, "it has no rows")
    binary = altered("binary", lambda m: m.update(classes=["background", "defect"], binary=True))
    refused(capsys, combine(str(labelled), binary), "classes", "combine sets made for the same")
    assert not out.exists()


def test_per_image_iou_is_each_images_own():
    import torch

    from defectforge.segmentation.metrics import MetricAccumulator

    truth = torch.zeros(3, 4, 4, dtype=torch.long)
    truth[0, :2] = 1  # 8 defect pixels
    pred = truth.clone()
    pred[0, 2, :2] = 1  # 2 false positives: 8 / 10
    pred[2, 0, 0] = 1  # a defect-free image with one false positive: 0
    accumulator = MetricAccumulator(2)
    accumulator.update(pred, truth)
    assert accumulator.per_image_iou() == [0.8, None, 0.0]


def test_gan_arms_meet_the_copy_paste_arm_of_the_same_mix_paired_by_seed():
    from defectforge.studies.compare import arm_entry, comparison_of, comparison_section

    def arm(source: str | None, ratio: float, offsets: list[float]) -> dict:
        point = {"synthetic_ratio": ratio, "synthetic_source": source, "real_count": 0}
        seeds = [
            {"seed": seed, "test_binary_defect_iou": 0.5 + offset}
            for seed, offset in zip((1000, 1001, 1002), offsets, strict=True)
        ]
        return arm_entry(point, seeds, [0.5])

    arms = [
        arm(None, 0.0, [0.0, 0.0, 0.0]),
        arm("copy_paste", 0.38, [0.02, 0.03, 0.02]),
        arm("gan", 0.38, [-0.02, -0.01, -0.03]),  # below copy-paste at every seed
        arm("combined", 0.38, [0.02, 0.04, 0.01]),  # as good as it
        arm("gan", 0.5, [0.0, 0.01, 0.0]),  # no copy-paste arm at 0.5
    ]
    comparison = comparison_of(["real_count", "synthetic_ratio", "synthetic_source"], arms)
    against = {row["arm"]: row for row in comparison["against_copy_paste"]}
    assert set(against) == {"gan 0.38", "combined 0.38"}
    assert {row["baseline"] for row in against.values()} == {"copy_paste 0.38"}
    gan = against["gan 0.38"]
    assert [round(d["difference"], 6) for d in gan["differences"]] == [-0.04, -0.04, -0.05]
    assert gan["verdict"] == "loses to copy-paste"
    assert against["combined 0.38"]["verdict"] == "cannot be told apart"
    assert len(comparison["paired"]) == 4  # every synthetic arm against real only, as before
    text = "\n".join(comparison_section(comparison))
    assert "## GAN images against copy-paste, paired by seed" in text
    assert "| gan 0.38 | copy_paste 0.38 | -0.0433 |" in text


def _compare_spec(few: Path, pasted: Path, storage: Path) -> dict:
    return {
        "name": "cmp",
        "dataset": {"real": str(few), "copy_paste": str(pasted)},
        "search_space": {
            "arms": [
                {"synthetic_ratio": 0.0},
                {"synthetic_ratio": 0.4, "synthetic_source": "copy_paste"},
            ],
            "epochs": 1,
            "batch_size": 4,
        },
        "search": {"algorithm": "compare"},
        "training": {"max_steps_per_epoch": 1, "crop_size": 64, "image_size": 64},
        "storage_path": str(storage),
        "final": {"seeds": 3},
    }


def test_compare_specs_are_checked():
    spec = {
        "name": "c",
        "dataset": {"real": "r"},
        "search_space": {"arms": [{"synthetic_ratio": 0.3, "synthetic_source": "copy_paste"}]},
        "search": {"algorithm": "compare"},
    }
    with pytest.raises(SpecError, match="dataset.copy_paste .* synthetic_source copy_paste with"):
        parse_spec(spec)
    drawn = {"arms": [{"synthetic_ratio": 0.3, "synthetic_source": "gan_masks"}]}
    with pytest.raises(SpecError, match="dataset.gan_masks .* add mask_gan and generate_masks"):
        parse_spec({**spec, "search_space": drawn})
    with pytest.raises(SpecError, match="draws its seeds itself"):
        parse_spec({**spec, "search_space": {"seed": [0, 1, 2]}})
    with pytest.raises(SpecError, match="arms need a grid"):
        parse_spec({**spec, "search": {"algorithm": "optuna"}})
    with pytest.raises(SpecError, match="an arm holds one value per key"):
        parse_spec({**spec, "search_space": {"arms": [{"synthetic_ratio": [0.1, 0.2]}]}})
    with pytest.raises(SpecError, match="an arm with synthetic_ratio 0 mixes nothing in"):
        parse_spec({**spec, "search_space": {"arms": [{"synthetic_source": "copy_paste"}]}})
    with pytest.raises(SpecError, match="lists an arm twice"):
        parse_spec({**spec, "search_space": {"arms": [{"synthetic_ratio": 0.0}] * 2}})
    with pytest.raises(SpecError, match="search.asha .* searches nothing"):
        parse_spec({**spec, "search": {"algorithm": "compare", "asha": {}}})
    # An arm that names no source mixes GAN images: the GAN set is needed too.
    mixed = {"arms": [{"synthetic_ratio": 0.3, "synthetic_source": "copy_paste"},
                      {"synthetic_ratio": 0.3}]}  # fmt: skip
    with pytest.raises(SpecError, match="dataset.synthetic .* synthetic_source gan with"):
        parse_spec({**spec, "dataset": {"real": "r", "copy_paste": "c"}, "search_space": mixed})
    parsed = parse_spec({**spec, "dataset": {"real": "r", "copy_paste": "c"}})
    assert "synthetic_ratio" not in parsed.fixed()  # the arms set it
    assert parsed.varied() == ["synthetic_ratio", "synthetic_source"]


def test_a_compare_study_scores_every_arm_on_test_paired_by_seed(few, pasted, tmp_path):
    from defectforge.trainables.study import run_study

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_compare_spec(few, pasted, tmp_path / "studies")))
    summary = run_study(spec_file)
    comparison = summary["comparison"]
    labels = [arm["label"] for arm in comparison["arms"]]
    assert labels == ["real only", "copy_paste 0.4"]
    for arm in comparison["arms"]:
        assert [s["seed"] for s in arm["seeds"]] == [1000, 1001, 1002]
        assert len(arm["per_image_binary_iou"]) == Manifest.load(few).counts["test"].total
    (paired,) = comparison["paired"]
    theirs, ours = (
        {s["seed"]: s["test_binary_defect_iou"] for s in arm["seeds"]} for arm in comparison["arms"]
    )
    expected = [ours[seed] - theirs[seed] for seed in sorted(ours)]
    assert [d["seed"] for d in paired["differences"]] == sorted(ours)
    assert [d["difference"] for d in paired["differences"]] == pytest.approx(expected)
    assert paired["verdict"] in ("helps", "hurts", "cannot be told apart")
    report = Path(summary["location"]).parent
    text = (report / "report.md").read_text()
    assert "## Against ratio 0, paired by seed" in text and "copy_paste 0.4" in text
    for plot in ("per_image_iou.png", "per_image_by_arm.png"):
        assert (report / plot).stat().st_size > 0
    stored = json.loads((tmp_path / "studies" / "cmp" / "compare.json").read_text())
    assert stored["paired"][0]["arm"] == "copy_paste 0.4"


def test_a_trial_keeps_its_best_and_latest_epoch_by_the_trial_tables_rule(tmp_path):
    from defectforge.studies.store import StudyStore
    from defectforge.trainables.epochs import EpochFolders

    store = StudyStore(str(tmp_path / "study"))
    folders = EpochFolders(store, "train/t1")
    scores = [0.2, None, 0.5, 0.5, 0.4, 0.1, 0.3, 0.3, 0.3, 0.3, 0.45]  # epochs 0-10
    for epoch, score in enumerate(scores):
        checkpoint = tmp_path / "checkpoint"
        checkpoint.mkdir(exist_ok=True)
        (checkpoint / "model.pt").write_bytes(b"weights %d" % epoch)
        folders.save(checkpoint, {"epoch": epoch, "val_binary_defect_iou": score})
        folders.prune()
    # The first of the two 0.5 epochs is the best; epoch_010 sorts after epoch_009.
    assert store.subfolders("train/t1") == ["epoch_002", "epoch_010"]
    again = EpochFolders(store, "train/t1")  # a restored trial finds both
    assert (again.best(), again.latest()) == ("epoch_002", "epoch_010")
    (tmp_path / "study/train/t1/epoch_011").mkdir()  # cut short: no epoch_metrics.json
    assert EpochFolders(store, "train/t1").latest() == "epoch_010"


def test_asha_as_a_study_configures_it_stops_a_trial_behind_at_the_first_rung(
    ray_session, tmp_path
):
    from ray import tune

    from defectforge.segmentation.loop import EPOCHS_TRAINED
    from defectforge.trainables.study_tune import _scheduler

    spec = parse_spec(
        {
            "name": "a",
            "dataset": {"real": "r"},
            "search_space": {"epochs": 4, "lr": [0.01, 0.001]},
            "search": {"algorithm": "grid", "asha": {"grace_period": 1, "reduction_factor": 2}},
        }
    )

    def epochs(config):
        # The first trial (lr 0.01) scores 0.5 an epoch, the second 0.1: behind at every rung.
        for epoch in range(config["epochs"]):
            score = 0.5 if config["lr"] == 0.01 else 0.1
            tune.report({"val_binary_defect_iou": score, EPOCHS_TRAINED: epoch + 1})

    tuner = tune.Tuner(
        epochs,
        param_space={"epochs": 4, "lr": tune.grid_search([0.01, 0.001])},
        tune_config=tune.TuneConfig(
            metric="val_binary_defect_iou",
            mode="max",
            scheduler=_scheduler(spec),
            max_concurrent_trials=1,
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
    )
    results = {r.config["lr"]: r.metrics["training_iteration"] for r in tuner.fit()}
    assert results == {0.01: 4, 0.001: 1}


def test_subset_copy_paste_and_combine_stages_are_made_once_and_reused(
    sample_dataset, sample_root, tmp_path, monkeypatch
):
    from defectforge.datasets.build import BUILD_RULES
    from defectforge.datasets.copy_paste import CopyPasteConfig, copy_paste_dataset
    from defectforge.trainables import pipeline
    from defectforge.trainables.pipeline import Pipeline

    given = tmp_path / "given-set"  # stands in for a labelled GAN set
    copy_paste_dataset(sample_dataset, given, CopyPasteConfig(count=4, seed=9))
    spec = parse_spec(
        {
            "name": "p",
            "dataset": {"synthetic": str(given)},
            "data": {"source": "neu-seg", "root": str(sample_root)},
            "subset": {"train": 10, "rest_as_test": True},
            "copy_paste": {"count": 6},
            "combine": {"sources": ["gan", "copy_paste"]},
            "search_space": {
                "arms": [
                    {"synthetic_ratio": 0.0},
                    {"synthetic_ratio": 0.3, "synthetic_source": "copy_paste"},
                    {"synthetic_ratio": 0.3, "synthetic_source": "combined"},
                ]
            },
            "search": {"algorithm": "compare"},
            "training": {"batch_size": 4},  # the real-only arm trains on the 10 images alone
            "storage_path": str(tmp_path),
        }
    )
    first = Pipeline(spec, "spec.yaml")
    made = first.run()
    assert Manifest.load(made.dataset.real).counts["train"].total == 10
    pasted = Manifest.load(made.dataset.copy_paste)
    assert pasted.counts["train"].total == 6
    (source,) = pasted.labelling.trained_on
    assert source.dataset_id == Manifest.load(made.dataset.real).dataset_id
    combined = Manifest.load(made.dataset.combined)
    assert combined.counts["train"].total == 8  # 4 of each: the given set has 4
    assert combined.labelling.config["sets"] == sorted(
        [Manifest.load(given).dataset_id, pasted.dataset_id]
    )
    again = Pipeline(spec, "spec.yaml")
    assert again.run() == made
    assert [r["status"] for r in again.records()] == ["reused"] * 4

    # A data stage made under earlier build rules is made again; the stages after it are reused,
    # as the dataset it makes keeps its id.
    monkeypatch.setattr(pipeline, "DATA_STAGE_INPUTS", {"build_rules": BUILD_RULES + 1})
    rebuilt = Pipeline(spec, "spec.yaml")
    assert rebuilt.run() == made
    assert [r["status"] for r in rebuilt.records()] == ["ran", "reused", "reused", "reused"]
