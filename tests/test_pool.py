"""Pooling the seeds of compare studies of one spec (no Ray: the studies' files only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from defectforge.core.errors import DataError
from defectforge.studies.stats import mean_interval

SPEC = {
    "name": "few",
    "dataset": {"real": "/data/real", "synthetic": "/data/gan"},
    "search_space": {"arms": [], "epochs": 12, "arch": "pan"},
    "training": {"crop_size": 128, "threads": 2},
    "search": {"algorithm": "compare", "max_concurrent_trials": 1},
    "final": {"seeds": 3},
}
IDS = {"real": "r1", "synthetic": "g1"}


def _seed(seed: int, score: float) -> dict:
    return {"seed": seed, "best_epoch": 3, "best_val_binary_defect_iou": 0.5,
            "test_binary_defect_iou": score, "test_mean_defect_iou": None,
            "best_checkpoint_path": f"c/{seed}"}  # fmt: skip


def _arm(arm: dict, scores: dict[int, float], per_image: list) -> dict:
    return {"arm": arm, "label": "x", "seeds": [_seed(k, v) for k, v in scores.items()],
            "per_image_binary_iou": per_image}  # fmt: skip


def _study(root: Path, arms: list[dict], keys: list[str], **changes) -> str:
    root.mkdir(parents=True)
    spec = {**SPEC, **changes.get("spec", {})}
    study = {"spec": spec, "dataset_ids": changes.get("ids", IDS)}
    (root / "study.json").write_text(json.dumps(study))
    (root / "compare.json").write_text(json.dumps({"keys": keys, "arms": arms, "paired": []}))
    return str(root)


@pytest.fixture
def two_studies(tmp_path) -> list[str]:
    # The first study spells its arms with real_count (one arm replaced real images), the
    # second without: the same arms all the same.
    keys = ["real_count", "synthetic_ratio", "synthetic_source"]
    first = _study(
        tmp_path / "first",
        [
            _arm({"real_count": None, "synthetic_ratio": 0.0, "synthetic_source": None},
                 {1000: 0.50, 1001: 0.55, 1002: 0.52}, [0.4, None, 0.9]),
            _arm({"real_count": None, "synthetic_ratio": 0.38, "synthetic_source": "gan"},
                 {1000: 0.53, 1001: 0.56, 1002: 0.51}, [0.5, None, 0.8]),
        ],
        keys,
    )  # fmt: skip
    second = _study(
        tmp_path / "second",
        [
            _arm({"synthetic_ratio": 0.0}, {1003: 0.48, 1004: 0.51}, [0.7, 0.2, None]),
            _arm({"synthetic_ratio": 0.38, "synthetic_source": "gan"},
                 {1003: 0.50, 1004: 0.55}, [0.2, 0.6, None]),
        ],
        ["synthetic_ratio", "synthetic_source"],
        spec={"final": {"seeds": 2, "first_seed": 1003}, "training": {"crop_size": 128}},
    )  # fmt: skip
    return [first, second]


def test_pooled_seeds_give_one_interval_and_paired_difference_per_arm(two_studies, tmp_path):
    from defectforge.studies.pool import write_pool

    comparison = write_pool(two_studies, tmp_path / "pooled")
    baseline, gan = comparison["arms"]
    assert [s["seed"] for s in gan["seeds"]] == [1000, 1001, 1002, 1003, 1004]
    assert gan["test_binary_defect_iou"] == mean_interval([0.53, 0.56, 0.51, 0.50, 0.55])
    # Per image: each study's seed mean weighted by its seed count; undefined stays out.
    assert baseline["per_image_binary_iou"] == pytest.approx([(3 * 0.4 + 2 * 0.7) / 5, 0.2, 0.9])
    (paired,) = comparison["paired"]
    differences = [0.03, 0.01, -0.01, 0.02, 0.04]
    assert [d["difference"] for d in paired["differences"]] == pytest.approx(differences)
    assert paired["interval"]["mean"] == pytest.approx(mean_interval(differences)["mean"])
    assert paired["verdict"] == "cannot be told apart"
    report = (tmp_path / "pooled" / "report.md").read_text()
    assert "## Against ratio 0, paired by seed" in report and "gan 0.38" in report
    for plot in ("paired_differences.png", "per_image_iou.png", "per_image_by_arm.png"):
        assert (tmp_path / "pooled" / plot).stat().st_size > 0


def test_studies_of_another_question_or_the_same_seeds_are_refused(two_studies, tmp_path):
    from defectforge.studies.pool import pool_comparisons

    other_data = _study(tmp_path / "other", [], [], ids={"real": "r2", "synthetic": "g1"})
    with pytest.raises(DataError, match="asks another question"):
        pool_comparisons([two_studies[0], other_data])
    other_epochs = _study(tmp_path / "epochs", [], [], spec={"search_space": {"epochs": 6}})
    with pytest.raises(DataError, match="asks another question"):
        pool_comparisons([two_studies[0], other_epochs])
    with pytest.raises(DataError, match=r"ran seed\(s\) \[1000, 1001, 1002\] in another study"):
        pool_comparisons([two_studies[0], two_studies[0]])
    with pytest.raises(DataError, match="not a study folder; pass folders made by"):
        pool_comparisons([two_studies[0], str(tmp_path)])
    grid = _study(tmp_path / "grid", [], [], spec={"search": {"algorithm": "grid"}})
    with pytest.raises(DataError, match="a study of search.algorithm grid: only compare studies"):
        pool_comparisons([two_studies[0], grid])
    (Path(two_studies[1]) / "compare.json").unlink()
    with pytest.raises(DataError, match="no compare.json yet: the compare study has not finished"):
        pool_comparisons([two_studies[0], two_studies[1]])
    other_final = _study(tmp_path / "final", [], [], spec={"final": {"seeds": 3, "epochs": 6}})
    with pytest.raises(DataError, match="asks another question"):
        pool_comparisons([two_studies[0], other_final])


def test_an_arm_with_seeds_its_baseline_lacks_is_refused(two_studies, tmp_path):
    from defectforge.studies.pool import pool_comparisons

    gan_only = _study(
        tmp_path / "gan-only",
        [_arm({"synthetic_ratio": 0.38, "synthetic_source": "gan"}, {1003: 0.5}, [0.1, 0.2, 0.3])],
        ["synthetic_ratio", "synthetic_source"],
    )
    with pytest.raises(DataError, match=r"ran seed\(s\) \[1003\] that its baseline 'real only'"):
        pool_comparisons([two_studies[0], gan_only])


def test_arms_of_one_study_only_and_its_own_synthetic_sets_pool(two_studies, tmp_path):
    from defectforge.studies.pool import pool_comparisons

    # Copy-paste arms only: this study lists no GAN set, and its copy-paste arm is new.
    keys = ["synthetic_ratio", "synthetic_source"]
    pasted = _study(
        tmp_path / "pasted",
        [
            _arm({"synthetic_ratio": 0.0}, {1005: 0.5, 1006: 0.52}, [0.1, 0.2, 0.3]),
            _arm({"synthetic_ratio": 0.38, "synthetic_source": "copy_paste"},
                 {1005: 0.6, 1006: 0.62}, [0.4, 0.5, 0.6]),
        ],
        keys,
        ids={"real": "r1", "copy_paste": "c1"},
        spec={"final": {"seeds": 2, "first_seed": 1005}},
    )  # fmt: skip
    comparison = pool_comparisons([*two_studies, pasted])
    by_label = {arm["label"]: arm for arm in comparison["arms"]}
    assert [s["seed"] for s in by_label["real only"]["seeds"]] == list(range(1000, 1007))
    assert [s["seed"] for s in by_label["copy_paste 0.38"]["seeds"]] == [1005, 1006]
    # Every arm spelt with every study's keys, and each paired with the pooled baseline.
    assert all(set(arm["arm"]) == set(comparison["keys"]) for arm in comparison["arms"])
    pairs = {p["arm"]: [d["seed"] for d in p["differences"]] for p in comparison["paired"]}
    assert pairs == {"copy_paste 0.38": [1005, 1006], "gan 0.38": list(range(1000, 1005))}


def test_final_seeds_start_at_first_seed_and_stay_clear_of_search_seeds():
    from defectforge.studies.errors import SpecError
    from defectforge.studies.spec import parse_spec
    from defectforge.trainables.study_tune import _final_seeds

    spec = {"name": "s", "dataset": {"real": "r"}, "search_space": {},
            "final": {"seeds": 3, "first_seed": 1003}}  # fmt: skip
    assert _final_seeds(parse_spec(spec)) == [1003, 1004, 1005]
    with pytest.raises(SpecError, match="first_seed"):
        parse_spec({**spec, "final": {"seeds": 3, "first_seed": 5}})
