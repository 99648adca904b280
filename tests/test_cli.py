"""The command line: flags derived from the config declarations, help with defaults, version,
one-line errors, and only the chosen command's modules imported."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_checks import error_lines

from defectforge.cli import main, parser

BLOCKED = """
import sys
from defectforge.cli import TRAINING_MODULES
for name in TRAINING_MODULES:
    sys.modules[name] = None  # importing any of them now fails, as where none is installed
from defectforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.floors
def test_predict_needs_none_of_the_training_stack():
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED, "predict", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "--runtime" in done.stdout


def test_a_command_whose_extra_is_not_installed_says_which_to_install(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED, "seg", "train", "--data", str(tmp_path), "--out", "o"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and len(error_lines(done.stderr)) == 1, done.stderr
    assert "is not installed" in done.stderr and "defectforge[train,cpu]" in done.stderr


def requirements(extras: set[str]) -> set[str]:
    """The distributions the installed defectforge asks for with these extras."""
    from defectforge.core.files import declared_requirements

    return {requirement.name.lower() for requirement in declared_requirements(tuple(extras))}


@pytest.mark.parametrize(
    "extras",
    [set(), {"cpu"}, {"gpu"}, {"train", "cpu"}, {"train", "gpu"}, {"train", "dev", "docs"}],
)
def test_every_documented_install_has_at_most_one_onnx_runtime(extras):
    runtimes = requirements(extras) & {"onnxruntime", "onnxruntime-gpu"}
    assert len(runtimes) == (1 if extras & {"cpu", "gpu"} else 0), runtimes


def test_the_training_modules_are_the_train_extras_and_nothing_else_is_left_out():
    """What the CLI calls the training stack is what the `train` extra installs beside the
    base: each of its distributions brings one of those modules, and every module is brought."""
    from importlib.metadata import packages_distributions

    from defectforge.cli import TRAINING_MODULES

    modules_of = {}
    for module, distributions in packages_distributions().items():
        for distribution in distributions:
            modules_of.setdefault(distribution.lower().replace("_", "-"), set()).add(module)
    train = requirements({"train"}) - requirements(set())
    named = set().union(*(modules_of[name] for name in train)) & set(TRAINING_MODULES)
    assert named == set(TRAINING_MODULES)
    assert all(modules_of[name] & set(TRAINING_MODULES) for name in train), train


def test_flags_come_from_the_config_declarations_with_their_defaults(capsys):
    from defectforge.segmentation.config import SegConfig

    with pytest.raises(SystemExit):
        main(["seg", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for spec in SegConfig.options():
        if spec.metadata["cli"]:
            assert "--" + spec.name.replace("_", "-") in text
    assert (
        "--crop-size N random training crops at native scale (0: whole images) (default: 128)"
        in text
    )
    with pytest.raises(SystemExit):
        main(["gan", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 64; 256 with --profile gpu)" in text
    assert (
        "--pl-weight X path-length regularisation (0: off) (default: 0.0; 2.0 with --profile gpu)"
        in text
    )


def test_given_flags_only_override_the_config(tmp_path):
    from defectforge.cli.options import given
    from defectforge.segmentation.config import SegConfig

    args = parser(["seg"]).parse_args(
        ["seg", "train", "--data", "d", "--out", "o", "--epochs", "3", "--no-binary"]
    )
    assert given(args, SegConfig) == {"epochs": 3, "binary": False}


@pytest.mark.parametrize(
    ("flags", "field", "value"),
    [
        (["--test-fraction", "0.2"], "test_fraction", 0.2),
        (
            ["--source", "steel", "--data", "rig", "--split-ratios", "0.6,0.2,0.2"],
            "split_ratios",
            (0.6, 0.2, 0.2),
        ),
    ],
)
def test_quickstart_flags_make_a_build_config(tmp_path, flags, field, value):
    from defectforge.cli.quickstart import build_options
    from defectforge.trainables.quickstart import _build_config

    args = parser(["quickstart"]).parse_args(["quickstart", *flags])
    source, options = build_options(args)
    cfg = _build_config(source, args.data, tmp_path, options)
    assert (cfg.source, getattr(cfg, field)) == (
        flags[1] if "--source" in flags else "neu-seg",
        value,
    )


def test_a_dashboard_address_for_the_ray_work_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["--address", "http://head:8265", "gan", "train", "--data", "d", "--out", "o"])
    err = capsys.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and "defectforge submit" in err
    assert "RAY_ADDRESS" not in os.environ


def test_version_and_a_bad_flag_value_are_one_line(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("defectforge ")
    with pytest.raises(SystemExit) as exited:
        main(["seg", "train", "--data", "d", "--out", "o", "--epochs", "many"])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(error_lines(err)) == 1
    assert "--epochs: invalid int value: 'many'" in err and "--help" in err


def test_an_unknown_flag_is_named_with_its_commands_own_help(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["gan", "generate", "--model", "m", "--out", "o", "--masks"])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(error_lines(err)) == 1
    assert err == (
        "defectforge gan generate: error: unrecognized arguments: --masks; "
        "see defectforge gan generate --help"
    )


def test_an_internal_bug_keeps_its_traceback(monkeypatch):
    from defectforge.cli import study

    def broken(args):
        raise ValueError("a bug, not the user's mistake")

    monkeypatch.setattr(study, "run", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["study", "report", "somewhere"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_interrupted_command_finds_the_grandchildren_it_must_end():
    """What `entry` ends after Ctrl-C: the whole tree below it, as a local Ray's raylet
    starts agents of its own that outlive it."""
    from defectforge.cli import _descendants

    child = subprocess.Popen(["sh", "-c", "sleep 60 & wait"])
    try:
        for _ in range(100):
            if _descendants(child.pid):
                break
            time.sleep(0.05)
        grandchildren = _descendants(child.pid)
        assert len(grandchildren) == 1  # the sleep
        assert {child.pid, *grandchildren} <= set(_descendants(os.getpid()))
    finally:
        for pid in _descendants(child.pid):
            os.kill(pid, 9)
        child.kill()
        child.wait()


INTERRUPTED_COMMAND = """
import subprocess, sys, time
from pathlib import Path
from defectforge import cli

PID_FILE = Path(sys.argv[1])

def run(args):  # a command that has started a process tree when Ctrl-C comes
    subprocess.Popen(["sh", "-c", f"sleep 300 & echo $! > {PID_FILE}.tmp; mv {PID_FILE}.tmp {PID_FILE}; wait"])
    while not PID_FILE.is_file():
        time.sleep(0.05)
    raise KeyboardInterrupt

cli.seg.run = run
sys.argv = ["defectforge", "seg", "train", "--data", "d", "--out", "o"]
cli.entry()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_ends_the_command_with_130_and_every_process_it_started(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    done = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_COMMAND, str(pid_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().startswith("defectforge: interrupted;"), done.stderr
    grandchild = Path("/proc") / pid_file.read_text().strip()
    for _ in range(100):  # gone, or a zombie waiting for init to reap it
        try:
            if ") Z" in (grandchild / "stat").read_text():
                break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the command's grandchild {grandchild.name} still runs")


def _commands(node, path=()):
    """(command path, its parser) for every command and subcommand."""
    import argparse

    for action in node._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


# A hand-written flag that shares its name with a config's option, for another meaning.
SAME_NAME_OTHER_MEANING = {
    ("seg", "eval", "--images"): "images to score (LabelConfig's: generated images to label)",
    ("seg", "eval", "--masks"): "their masks (GanConfig's: draw masks)",
    ("predict", "--images"): "images to judge (LabelConfig's: generated images to label)",
    ("gan", "metrics", "--class"): "scores one class of a trained run (GanConfig's: trains on one)",
    ("gan", "metrics", "--n"): "images per set to score (SimulationConfig's: sheets to draw)",
    ("gan", "compare", "--kimg"): "the snapshot to show (GanConfig's: the length to train)",
    ("study", "run", "--name"): "the study's name (BuildConfig's: the dataset's)",
    ("submit", "--name"): "the study's name (BuildConfig's: the dataset's)",
}


@pytest.mark.parametrize("command", ["seg", "gan"])
def test_a_tracking_flag_that_cannot_work_is_one_line_before_anything_runs(
    command, tmp_path, capsys
):
    out = tmp_path / "run"
    train = [command, "train", "--data", str(tmp_path / "no-data"), "--out", str(out)]
    with pytest.raises(SystemExit) as exited:
        main([*train, "--mlflow", "file:/tmp/mlruns"])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(error_lines(err)) == 1
    assert "mlflow = 'file:/tmp/mlruns': must be an http(s):// URL of a tracking server" in err
    assert main([*train, "--mlflow-experiment", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(error_lines(err)) == 1 and "give --mlflow too" in err
    assert not out.exists()


def test_a_tracking_server_that_is_down_is_one_warning_and_the_run_goes_on(
    tmp_path, monkeypatch, capsys
):
    from defectforge.core.storage import Location
    from defectforge.studies.spec_schema import TrackingSpec
    from defectforge.trainables.tracking import RUN_RECORD, RunTracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = TrackingSpec(mlflow="http://127.0.0.1:1")  # nothing listens on port 1
    tracker = RunTracking(down, Location.of(tmp_path), {"epochs": 3}, "epoch", "seg train")
    tracker([{"epoch": 0, "train_loss": 1.0}])
    tracker([{"epoch": 1, "train_loss": 0.5}])
    tracker.finish(["plots"])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1  # said once: the later reports and the end are silent
    assert lines[0].startswith(
        "defectforge: warning: MLflow tracking at http://127.0.0.1:1 failed; the run goes on "
        "without it"
    )
    assert tracker.failed and not (tmp_path / RUN_RECORD).exists()


def test_a_studys_tracking_server_that_is_down_is_one_warning_and_the_study_goes_on(
    tmp_path, monkeypatch, capsys
):
    """Ray's MLflow callback raised from its setup when the server was down, ending the study;
    each later failure was a Python warning of its own."""
    from defectforge.studies.spec import parse_spec
    from defectforge.studies.store import StudyStore
    from defectforge.trainables.tracking import log_study
    from defectforge.trainables.trial_logger import TrialLogger

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    trials = TrialLogger(tracking_uri="http://127.0.0.1:1", experiment_name="down")
    trials.setup()
    trials.log_trial_start(trial="t1")
    trials.log_trial_result(1, "t1", {"val_iou": 0.5})
    trials.log_trial_end("t1")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and trials.failed
    assert lines[0].startswith(
        "defectforge: warning: MLflow tracking at http://127.0.0.1:1 failed; the study goes on "
        "without it"
    )
    spec = parse_spec(
        {
            "name": "t",
            "dataset": {"real": "r"},
            "search_space": {"lr": 0.001},
            "tracking": {"mlflow": "http://127.0.0.1:1"},
        }
    )
    assert log_study(spec, StudyStore(str(tmp_path)), {}) is None
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "the study's results are in its folder" in lines[0]


def test_a_tracking_study_gives_up_on_a_server_as_soon_as_a_run_and_keeps_a_users_retries(
    monkeypatch,
):
    from defectforge.studies.spec import parse_spec
    from defectforge.trainables.tracking import HTTP_DEFAULTS, require_mlflow

    for name in HTTP_DEFAULTS:
        monkeypatch.setenv(name, "")  # recorded, so the test leaves the variables as it found them
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    untracked = {"name": "t", "dataset": {"real": "r"}, "search_space": {"lr": 0.001}}
    require_mlflow(parse_spec(untracked))
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # nothing set without tracking
    require_mlflow(parse_spec({**untracked, "tracking": {"mlflow": "http://127.0.0.1:1"}}))
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"  # the user's value wins


def test_a_run_whose_recorded_mlflow_run_the_server_lacks_starts_a_new_one(tmp_path, mlflow_server):
    """A run folder resumed against a server that has no such run (its store was reset, the
    run purged) is tracked in a new MLflow run, which the folder then records."""
    import mlflow

    from defectforge.core.storage import Location
    from defectforge.studies.spec_schema import TrackingSpec
    from defectforge.trainables.tracking import RUN_RECORD, RunTracking

    (tmp_path / RUN_RECORD).write_text(
        json.dumps({"tracking_uri": mlflow_server.url, "run_id": "0" * 32})
    )
    tracking = TrackingSpec(mlflow=mlflow_server.url, experiment="record-of-a-lost-run")
    tracker = RunTracking(tracking, Location.of(tmp_path), {"epochs": 2}, "epoch", "seg train")
    tracker([{"epoch": 0, "train_loss": 1.0}])
    tracker.finish([])
    recorded = json.loads((tmp_path / RUN_RECORD).read_text())["run_id"]
    run = mlflow.MlflowClient(mlflow_server.url).get_run(recorded)
    assert recorded != "0" * 32 and not tracker.failed
    assert run.info.status == "FINISHED" and run.data.metrics["train_loss"] == 1.0


def test_no_command_declares_by_hand_a_flag_a_config_declares():
    from defectforge.cli.options import flag_of

    commands = list(_commands(parser()))
    configs = {
        action.declared_by
        for _, command in commands
        for action in command._actions
        if hasattr(action, "declared_by")
    }
    declared = {
        flag_of(spec): cls.__name__
        for cls in configs
        for spec in cls.options()
        if spec.metadata.get("cli")
    }
    by_hand = [
        (path, flag, declared[flag])
        for path, command in commands
        for action in command._actions
        if not hasattr(action, "declared_by")
        for flag in action.option_strings
        if flag in declared and (*path, flag) not in SAME_NAME_OTHER_MEANING
    ]
    assert not by_hand, "\n".join(
        f"{' '.join(path)} {flag}: declare it once, in {owner}" for path, flag, owner in by_hand
    )


def test_calibrating_without_a_target_is_refused_before_the_run_is_read(tmp_path, capsys):
    # No run exists there: the target is checked first, so the error is about the target.
    assert main(["seg", "calibrate", str(tmp_path / "not-a-run")]) == 2
    err = capsys.readouterr().err
    assert "give target_recall (--target-recall) or target_false_alarm" in err
    assert len(error_lines(err)) == 1


def test_a_second_ctrl_c_while_the_hint_is_made_still_ends_in_one_line(tmp_path, monkeypatch):
    from defectforge.cli import _interrupted_hint, study
    from defectforge.studies import spec as spec_module

    spec = tmp_path / "spec.yaml"
    args = parser(["study", "run", str(spec)]).parse_args(["study", "run", str(spec)])
    general = "run the command again (`study resume DIR` for a study)"
    assert _interrupted_hint(study, args) == general  # the spec is gone meanwhile

    def second_ctrl_c(path):
        raise KeyboardInterrupt  # as SIGINT arriving while the spec is read

    monkeypatch.setattr(spec_module, "load_spec", second_ctrl_c)
    assert _interrupted_hint(study, args) == general
