"""What Optuna users look at after a search: parameter importance, the optimisation history and
a parallel-coordinate plot, drawn by Optuna's own matplotlib visualisations, and which trials
ASHA stopped at which epoch.

Everything comes from the study's trial rows, replayed into a scratch Optuna study in the order
the trials started, so grid and Optuna studies get the same views and a report can be
redrawn without Ray or the search's storage.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from defectforge.core.files import pyplot, save_png
from defectforge.segmentation.selection import SELECTION_METRIC
from defectforge.studies.spec_schema import ARMS, Range, StudySpec


def _distribution(value):
    import optuna

    if isinstance(value, Range):
        if isinstance(value.low, int) and isinstance(value.high, int):
            return optuna.distributions.IntDistribution(value.low, value.high, log=value.log)
        return optuna.distributions.FloatDistribution(value.low, value.high, log=value.log)
    return optuna.distributions.CategoricalDistribution(value)


def _values(value) -> list:
    return [value.low, value.high] if isinstance(value, Range) else list(value)


def scratch_study(spec: StudySpec, trials: list[dict]):
    """The finished trials as an Optuna study over the keys that varied (seeds are repeats, not
    a choice: their share would only measure noise); ValueError when nothing varied."""
    import optuna

    searched = {
        k: v for k, v in spec.searched().items() if len(_values(v)) > 1 and k not in ("seed", ARMS)
    }
    if not searched:
        raise ValueError("nothing varies between trials")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a scratch study, not news to the user
    study = optuna.create_study(direction="maximize")
    finished = [t for t in trials if t[SELECTION_METRIC] is not None]
    for trial in sorted(finished, key=lambda t: t.get("started", 0)):
        study.add_trial(
            optuna.trial.create_trial(
                params={k: trial["config"][k] for k in searched},
                distributions={k: _distribution(v) for k, v in searched.items()},
                value=trial[SELECTION_METRIC],
            )
        )
    return study


def parameter_importance(study) -> dict[str, float]:
    """Optuna's importance of each searched key for the validation IoU."""
    import optuna

    return optuna.importance.get_param_importances(study)


def plot_importance(importance: dict[str, float], path: Path) -> None:
    plt = pyplot()
    names = list(importance)[::-1]
    figure, axis = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
    axis.barh(names, [importance[n] for n in names], color="#4878a8")
    axis.set(xlabel="importance (Optuna, sums to 1)", title="What mattered for defect IoU")
    save_png(figure, path)


def plot_search_views(study, folder: Path) -> list[str]:
    """Optuna's optimisation history and parallel-coordinate plots as PNGs in ``folder``;
    returns their file names."""
    from optuna.visualization import matplotlib as views

    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib views experimental
        for name, draw in (
            ("optimization_history.png", views.plot_optimization_history),
            ("parallel_coordinate.png", views.plot_parallel_coordinate),
        ):
            axis = draw(study, target_name="val binary defect IoU")
            axis.figure.set_size_inches(8, 4.5)
            save_png(axis.figure, folder / name)
            written.append(name)
    return written


def asha_section(trials: list[dict]) -> list[str]:
    """The trials ASHA stopped, the epoch each stopped after and its best IoU by then."""
    stopped = sorted(
        (t for t in trials if t["status"] == "stopped early"), key=lambda t: t["epochs_run"]
    )
    if not stopped:
        return []
    lines = [
        f"## Stopped early by ASHA ({len(stopped)} of {len(trials)} trials)",
        "",
        "| trial | stopped after epoch | best val binary IoU by then |",
        "|---|---|---|",
    ]
    for trial in stopped:
        best = trial[SELECTION_METRIC]
        shown = "-" if best is None else f"{best:.4f}"
        lines.append(f"| `{trial['trial']}` | {trial['epochs_run']} | {shown} |")
    return [*lines, ""]
