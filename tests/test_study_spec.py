"""Study specs: typed, validated at load, errors that name the key, the value and the fix."""

import pytest

from defectforge.studies.errors import SpecError
from defectforge.studies.spec import load_spec, parse_spec
from defectforge.studies.spec_schema import Range

pytestmark = pytest.mark.floors  # .ci/floors runs them at the lowest versions


def base(**overrides) -> dict:
    spec = {
        "name": "t",
        "dataset": {"real": "runs/neu", "synthetic": "runs/neu-synthetic"},
        "search_space": {
            "synthetic_ratio": [0.0, 0.38],
            "arch": ["deeplabv3plus", "pan"],
            "aug_strength": {"low": 0.0, "high": 1.0},
            "lr": {"low": 1e-4, "high": 3e-3, "log": True},
            "epochs": 3,
        },
        "search": {"algorithm": "optuna", "num_samples": 4, "asha": {"grace_period": 1}},
    }
    spec.update(overrides)
    return spec


def test_a_valid_spec_parses_into_types():
    spec = parse_spec(base())
    assert spec.search_space["lr"] == Range(1e-4, 3e-3, log=True)
    assert set(spec.searched()) == {"synthetic_ratio", "arch", "aug_strength", "lr"}
    assert spec.fixed() == {"epochs": 3}
    assert spec.search.asha.grace_period == 1 and spec.final.seeds == 3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"search_space": {"arch": "transformer9000"}}, r"search_space.arch = 'transformer9000'"),
        (
            {"search_space": {"synthetic_ratio": 1.2}},
            r"search_space.synthetic_ratio = 1.2: must be in \[0, 1\)",
        ),
        ({"search_space": {"lr": {"low": 0.0, "high": 1.0}}}, "search_space.lr = 0.0: must be > 0"),
        (
            {"search_space": {"aug_strength": {"low": 0.0, "high": 1.0, "log": True}}},
            "a log range needs low > 0",
        ),
        ({"search_space": {"lr": {"low": 0.1}}}, "a range needs exactly low, high"),
        ({"search_space": {"momentum": 0.9}}, "search_space.momentum = 0.9: not a searchable key"),
        ({"search_space": {"loss": "ce+hinge"}}, r"search_space.loss = 'ce\+hinge'"),
        (
            {"search": {"algorithm": "random"}},
            "search.algorithm = 'random': must be one of optuna, grid",
        ),
        ({"search": {"num_sample": 3}}, r"search: unknown search section keys \['num_sample'\]"),
        ({"search": {"num_samples": "many"}}, "search.num_samples = 'many': must be of type int"),
        ({"search": {"asha": {"grace_period": 0}}}, "search.asha.grace_period = 0: must be >= 1"),
        ({"final": {"seeds": 2}}, "final.seeds = 2: must be 0, or >= 3 for an interval"),
        (
            {"final": {"baseline": {"momentum": 0.9}}},
            "final.baseline.momentum = 0.9: the baseline takes one value of a searchable key",
        ),
        (
            {"final": {"baseline": {"synthetic_ratio": [0.0, 0.1]}}},
            r"final.baseline.synthetic_ratio = \[0.0, 0.1\]: the baseline takes one value",
        ),
        (
            {"final": {"seeds": 0, "baseline": {"synthetic_ratio": 0.0}}},
            "final.baseline = .*meets its baseline on the final step's seeds; set final.seeds",
        ),
        ({"final": {"baseline": {"lr": -1}}}, "final.baseline.lr = -1.0: must be > 0"),
        ({"final": {"baseline": {"seed": 7}}}, "final.baseline.seed = 7: the baseline takes one"),
        (
            {"training": {"synthetic_ratio": 0.3}},
            r"training.synthetic_ratio = 0.3: a trial's mix is set in search_space; move it there",
        ),
        (
            {"final": {"epochs": 4, "baseline": {"epochs": 6}}},
            "final.baseline.epochs = 6: final.epochs = 4 already sets the epochs",
        ),
        (
            {"tracking": {"mlflow": "file:/tmp/mlruns"}},
            "tracking.mlflow = 'file:/tmp/mlruns': must be an http\\(s\\):// URL of a tracking server",
        ),
        ({"tracking": {"mlfow": "http://h:5000"}}, "mlfow"),
        ({"datasets": {}}, "datasets = {}: unknown key"),
        ({"expected_runtime": 5}, "expected_runtime = 5: must be a mapping"),
        ({"dataset": {"synthetic": "x"}}, "dataset.real = None: missing"),
        (
            {"resources": {"cpus_per_trial": float("nan")}},
            "resources.cpus_per_trial = nan: must be a finite",
        ),
        ({"resources": {"workers_per_trial": 0}}, "resources.workers_per_trial = 0: must be >= 1"),
        (
            {"training": {"max_steps_per_epoch": -3}},
            "training.max_steps_per_epoch = -3: must be >= 0",
        ),
        ({"training": {"workers": 2}}, "training.workers = 2: not a training option"),
        (
            {"combine": {"sources": ["gan"]}},
            r"combine: sources = \('gan',\): must be two or more of gan, copy_paste, gan_masks",
        ),
        (
            {"combine": {"sources": ["gan", "combined"]}},
            "combine: sources = .*: must be two or more of gan, copy_paste, gan_masks, each once",
        ),
        (
            {"combine": {"sources": ["gan", "copy_paste"]}},
            "dataset.copy_paste = '': the combine stage's source copy_paste needs this dataset",
        ),
        ({"combine": {"sources": 5}}, "combine: sources = 5: must be two or more of"),
        (
            {"dataset": {"real": "r", "synthetic": "s", "combined": "c"}, "combine": {}},
            "combine = .*: nothing uses its set: no trial mixes in synthetic_source combined",
        ),
        (
            {
                "search_space": {
                    "arms": [{"synthetic_ratio": 0.3, "synthetic_source": "combined"}],
                },
                "search": {"algorithm": "grid"},
            },
            "dataset.combined = '': synthetic_source combined with synthetic_ratio > 0 needs "
            "this dataset; set dataset.combined to a `synth combine` output, or add a combine",
        ),
        ({"training": {"epochs": 2}}, "training.epochs = 2: also in search_space"),
        # Found probing `study check` as a new user: each was accepted or said unhelpfully.
        ({"search": {"asha": True}}, "search.asha = True: must be a mapping of asha section"),
        (
            {"search_space": {"lr": "1e-3"}},
            r"search_space.lr = '1e-3': must be of type float; write it as a number, 0.001",
        ),
        ({"search_space": {"epochs": 2.5}}, "epochs = 2.5: must be of type int; write a whole"),
        (
            {"search_space": {"lr": {"low": 1e-4, "high": 1e-2, "log": "false"}}},
            "log must be true or false",
        ),
        ({"search": {"optuna_storage": "s3://b/x.db"}}, "must be a local .db file or a database"),
        (
            {"search": {"algorithm": "grid", "optuna_storage": "x.db"}, "search_space": {}},
            "a grid search keeps no Optuna study",
        ),
        ({"name": None}, "name = None: must be text"),
        ({"name": ["a", "b"]}, r"name = \['a', 'b'\]: must be text"),
        ({"storage_path": None}, "storage_path = None: must be text"),
        ({"name": "q" * 201}, "is longer than 200 bytes"),
        ({"export": None}, "export = None: the section is empty; write export: {}"),
        ({"export": False}, "export = False: must be a mapping of its options"),
        (
            {"dataset": {"real": "x", "crop_size": 128}},
            r"dataset.crop_size = 128: is a training option now; move it under training:",
        ),
    ],
)
def test_errors_name_key_value_and_fix(change, message):
    data = base()
    for key, value in change.items():
        if isinstance(data.get(key), dict) and key != "dataset":
            data[key] = {**data[key], **value} if key != "search_space" else value
        else:
            data[key] = value
    with pytest.raises(SpecError, match=message):
        parse_spec(data, "my.yaml")


def test_grid_needs_lists_and_synthetic_ratios_need_a_synthetic_set():
    with pytest.raises(SpecError, match="a grid search needs lists, not ranges"):
        parse_spec(base(search={"algorithm": "grid"}))
    with pytest.raises(
        SpecError,
        match="dataset.synthetic = '': synthetic_source gan with synthetic_ratio > 0 needs",
    ):
        parse_spec(base(dataset={"real": "runs/neu"}))


def test_load_spec_reports_file_problems(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="broken.yaml: not valid YAML at line 2, column 1: "):
        load_spec(broken)
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: a\nsearch:\n  num_samples: 2\nsearch:\n  num_samples: 9\n")
    with pytest.raises(SpecError, match="line 4, column 1: key 'search' given twice"):
        load_spec(twice)


def test_a_trial_resumed_from_its_own_checkpoint_counts_every_epoch_it_ran():
    from defectforge.studies.results import TrialRecord, trial_row

    spec = parse_spec({"name": "r", "dataset": {"real": "r"}, "search_space": {"epochs": 6}})
    # Restored at epoch 3: Tune's record of the trial holds epochs 3-5 and the test line.
    lines = [{"epoch": e, "val_binary_defect_iou": 0.1 * e} for e in (3, 4, 5)]
    resumed = trial_row(TrialRecord("t", {"epochs": 6}, None, [*lines, {"test": 1}]), spec)
    assert (resumed["status"], resumed["epochs_run"], resumed["best_epoch"]) == ("finished", 6, 5)
    cut = trial_row(TrialRecord("t", {"epochs": 6}, None, lines[:2]), spec)
    assert (cut["status"], cut["epochs_run"]) == ("stopped early", 5)


def test_a_resumed_trial_row_shows_its_kept_best_epoch_from_before_the_resume():
    from defectforge.studies.results import KEPT_BEST, KEPT_BEST_METRICS, TrialRecord, trial_row

    spec = parse_spec({"name": "r", "dataset": {"real": "r"}, "search_space": {"epochs": 4}})
    before = {"epoch": 1, "val_binary_defect_iou": 0.9, "val_per_class_iou": [0.8, 0.7]}
    lines = [
        {
            "epoch": e,
            "val_binary_defect_iou": 0.5,
            KEPT_BEST: "t/epoch_001",
            KEPT_BEST_METRICS: before,
        }
        for e in (2, 3)
    ]
    row = trial_row(TrialRecord("t", {"epochs": 4}, None, lines), spec)
    assert (row["best_epoch"], row["val_binary_defect_iou"]) == (1, 0.9)
    assert (row["val_per_class_iou"], row["checkpoint_path"]) == ([0.8, 0.7], "t/epoch_001")
