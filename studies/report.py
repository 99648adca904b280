"""A study's report: Markdown with a table of every trial, plots, the held-out result.

Reads only the study's own records (the trial rows and the final summary written by the runner),
so a report can be redrawn at any time without Ray.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from defectforge.core.files import atomic_write, pyplot, save_png
from defectforge.segmentation.report import plot_confusion, plot_per_class_iou
from defectforge.segmentation.selection import SELECTION_METRIC
from defectforge.studies.compare import (
    comparison_section,
    plot_comparison,
)
from defectforge.studies.search_plots import (
    asha_section,
    parameter_importance,
    plot_importance,
    plot_search_views,
    scratch_study,
)
from defectforge.studies.spec_schema import MIX_DEFAULTS, SOURCE_DATASETS, StudySpec
from defectforge.studies.stats import mean_interval

REPORT_FILE = "report.md"


def _finished(trials: list[dict]) -> list[dict]:
    return [t for t in trials if t[SELECTION_METRIC] is not None]


def plot_iou_vs_ratio(trials: list[dict], final: dict | None, path: Path) -> None:
    """Every trial's best validation IoU against its synthetic ratio (one colour per
    architecture); where a ratio has several trials, their mean and standard deviation."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4))
    by_arch: dict[str, list] = defaultdict(list)
    for trial in _finished(trials):
        by_arch[str(trial["config"].get("arch", "deeplabv3plus"))].append(trial)
    for arch, group in sorted(by_arch.items()):
        axis.scatter(
            [t["config"]["synthetic_ratio"] for t in group],
            [t[SELECTION_METRIC] for t in group],
            alpha=0.5,
            label=f"{arch} trials",
        )
        per_ratio: dict[float, list] = defaultdict(list)
        for trial in group:
            per_ratio[trial["config"]["synthetic_ratio"]].append(trial[SELECTION_METRIC])
        repeated = sorted((r, v) for r, v in per_ratio.items() if len(v) > 1)
        if repeated:
            axis.errorbar(
                [r for r, _ in repeated],
                [np.mean(v) for _, v in repeated],
                yerr=[np.std(v, ddof=1) for _, v in repeated],
                fmt="-s",
                capsize=4,
                label=f"{arch} mean ± sd of the trials at a ratio",
            )
    finals = [(final, "final", "black")] if final else []
    if final and "baseline" in final:
        finals.append((final["baseline"], "baseline", "grey"))
    for result, name, colour in finals:
        interval = result["test_binary_defect_iou"]
        axis.errorbar(
            [result["config"].get("synthetic_ratio", 0.0)],
            [interval["mean"]],
            yerr=[interval["half_width"]],
            fmt="D",
            color=colour,
            capsize=6,
            label=f"{name}: test, {interval['n']} seeds, 95% CI",
        )
    axis.set(
        xlabel="synthetic share of the train split",
        ylabel="binary defect IoU",
        title="Defect IoU vs synthetic ratio (validation; final on test)",
        xlim=(-0.02, max(0.55, axis.get_xlim()[1])),
        ylim=(0, 1),
    )
    axis.legend(fontsize=8)
    save_png(figure, path)


def plot_by_architecture(trials: list[dict], path: Path) -> None:
    plt = pyplot()
    groups: dict[str, list[float]] = defaultdict(list)
    for trial in _finished(trials):
        groups[str(trial["config"].get("arch", "deeplabv3plus"))].append(trial[SELECTION_METRIC])
    names = sorted(groups)
    figure, axis = plt.subplots(figsize=(1.6 * len(names) + 2.5, 3.8))
    axis.boxplot([groups[n] for n in names], tick_labels=names)
    for index, name in enumerate(names, start=1):
        axis.scatter([index] * len(groups[name]), groups[name], alpha=0.6, zorder=3)
    axis.set(ylabel="best validation binary defect IoU", title="Trials per architecture")
    save_png(figure, path)


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if not math.isnan(value) else "nan"
    return str(value)


def _trial_table(trials: list[dict], keys: list[str]) -> list[str]:
    header = ["trial", "status", "epochs", "val binary IoU", "val mean defect IoU", *keys, "s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for trial in trials:
        cells = [
            "_".join(trial["trial"].split("_")[:2]),
            trial["status"],
            str(trial["epochs_run"]),
            _number(trial[SELECTION_METRIC]),
            _number(trial["val_mean_defect_iou"]),
            *[_number(trial["config"].get(k)) for k in keys],
            f"{trial['seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _by_configuration_section(trials: list[dict], keys: list[str]) -> list[str]:
    """Where a configuration ran with several seeds: its mean validation IoU and 95% interval
    (the paper's question, e.g. 0 vs 0.38 synthetic, answered with its uncertainty)."""
    varied = [k for k in keys if k != "seed"]
    groups: dict[tuple, list[float]] = defaultdict(list)
    for trial in _finished(trials):
        groups[tuple(trial["config"].get(k) for k in varied)].append(trial[SELECTION_METRIC])
    if len(groups) < 2 or not all(len(v) > 1 for v in groups.values()):
        return []
    lines = [
        "## Per configuration, seeds pooled (validation)",
        "",
        "| " + " | ".join([*varied, "n", "mean val binary IoU", "95% interval"]) + " |",
        "|" + "---|" * (len(varied) + 3),
    ]
    for values, scores in sorted(groups.items(), key=lambda kv: -np.mean(kv[1])):
        interval = mean_interval(scores)
        lines.append(
            "| "
            + " | ".join(
                [*map(_number, values), str(interval["n"]), f"{interval['mean']:.4f}"]
                + [f"{interval['low']:.4f} - {interval['high']:.4f}"]
            )
            + " |"
        )
    return [*lines, ""]


def _final_section(final: dict) -> list[str]:
    test = final["test_binary_defect_iou"]
    mean_defect = final["test_mean_defect_iou"]
    lines = [
        f"## Held-out test ({test['n']} seeds of the best configuration)",
        "",
        f"**Binary defect IoU on test: {test['mean']:.4f} ± {test['half_width']:.4f}** "
        f"(95% t-interval {test['low']:.4f} - {test['high']:.4f}, sd {test['std']:.4f}); "
        f"mean defect IoU {mean_defect['mean']:.4f} ± {mean_defect['half_width']:.4f}.",
        "",
        "| seed | best epoch | val binary IoU | test binary IoU | test mean defect IoU |",
        "|---|---|---|---|---|",
    ]
    for seed in final["seeds"]:
        lines.append(
            f"| {seed['seed']} | {seed['best_epoch']} | "
            f"{_number(seed['best_val_binary_defect_iou'])} | "
            f"{_number(seed['test_binary_defect_iou'])} | {_number(seed['test_mean_defect_iou'])} |"
        )
    return [*lines, "", *_baseline_lines(final)]


def _baseline_lines(final: dict) -> list[str]:
    """The chosen configuration against its baseline on the same seeds."""
    if final.get("chosen_is_baseline"):
        return [
            "## Against the baseline",
            "",
            "The search chose the baseline itself (final.baseline): there is nothing to compare it "
            "with, and its seeds trained once.",
        ]
    if "baseline" not in final:
        return []
    theirs, paired = final["baseline"]["test_binary_defect_iou"], final["paired"]
    values = ", ".join(
        f"{k} = {_number(v)}" for k, v in sorted(_applicable(final["baseline"]["config"]).items())
    )
    interval = paired["interval"]
    shown = (
        f"{interval['mean']:+.4f} (95% interval {interval['low']:+.4f} - {interval['high']:+.4f})"
        if interval
        else "no interval (fewer than 2 seeds with a defined IoU)"
    )
    differences = ", ".join(f"{d['difference']:+.4f}" for d in paired["differences"])
    return [
        "## Against the baseline (same seeds)",
        "",
        f"Baseline ({values}): test binary defect IoU {theirs['mean']:.4f} "
        f"(95% interval {theirs['low']:.4f} - {theirs['high']:.4f}).",
        f"Chosen minus baseline, paired by seed: {shown}; per seed {differences}: "
        f"**{paired['verdict']}**.",
        "",
    ]


def _applicable(config: dict) -> dict:
    """A trial's config without the mix keys that do nothing at ratio 0 (real only)."""
    if config.get("synthetic_ratio"):
        return config
    return {k: v for k, v in config.items() if k not in MIX_DEFAULTS or k == "synthetic_ratio"}


def _stages_section(stages: list[dict]) -> list[str]:
    """What made the study's data, stage by stage (a study whose data was given has none)."""
    if not stages:
        return []
    rows = [
        f"| {s['name']} | `{s['key']}` | {s['status']} | {s['seconds']:.1f} | `{s['folder']}` |"
        for s in stages
    ]
    header = [
        "## Stages",
        "",
        "| stage | key | status | seconds | output |",
        "|---|---|---|---|---|",
    ]
    return [*header, *rows, ""]


SOURCE_NAMES = {
    "gan": "GAN images labelled",
    "copy_paste": "copy-paste",
    "gan_masks": "GAN-drawn with masks",
    "combined": "combined sets",
}


def _data_line(study: dict) -> str:
    """The datasets the trials read: as resolved when the study started (a pipeline's stages
    fill in paths its spec leaves out)."""
    dataset, ids = study["spec"]["dataset"], study["dataset_ids"]
    line = f"- data: `{dataset['real']}` (id `{ids['real']}`)"
    for source, key in SOURCE_DATASETS.items():
        if dataset.get(key) and key in ids:
            line += f", {SOURCE_NAMES[source]} `{dataset[key]}` (id `{ids[key]}`)"
    return line


def _search_views(spec: StudySpec, trials: list[dict], folder: Path):
    """(parameter importance, the PNGs drawn, a note for each view that could not be drawn)."""
    try:
        scratch = scratch_study(spec, trials)
    except ValueError as err:
        return None, [], [f"Parameter importance and Optuna's views not drawn: {err}.", ""]
    importance, pictures, notes = None, [], []
    try:
        importance = parameter_importance(scratch)
        plot_importance(importance, folder / "importance.png")
        pictures.append("importance.png")
    except (ValueError, RuntimeError) as err:
        notes += [f"Parameter importance not computed: {err}.", ""]
    try:
        pictures += plot_search_views(scratch, folder)
    except (ValueError, RuntimeError) as err:
        notes += [f"Optuna's search views not drawn: {err}.", ""]
    return importance, pictures, notes


def write_report(
    folder: Path,
    spec: StudySpec,
    study: dict,
    trials: list[dict],
    final: dict | None,
    comparison: dict | None = None,
) -> dict:
    """Write report.md and its PNGs into ``folder``; returns a short summary."""
    folder.mkdir(parents=True, exist_ok=True)
    finished = _finished(trials)
    best = finished[0] if finished else None
    keys = spec.varied()
    lines = [
        f"# Study `{study['name']}`",
        "",
        spec.description or "",
        "",
        _data_line(study),
        f"- search: {spec.search.algorithm}, {len(trials)} trials "
        f"({sum(t['status'] == 'finished' for t in trials)} finished, "
        f"{sum(t['status'] == 'stopped early' for t in trials)} stopped early by ASHA, "
        f"{sum(t['status'] == 'error' for t in trials)} failed); "
        f"{sum(t['seconds'] for t in trials) / 60:.1f} trial-minutes",
        f"- metric: `{SELECTION_METRIC}` (validation during the search; the test split is read only by "
        "the final step)",
        f"- spec sha256 `{study['spec_sha256'][:16]}`, created {study['created']}",
        "",
        *_stages_section(study.get("stages", [])),
    ]
    pictures = []
    if best:
        lines += [
            f"## Best trial: `{best['trial']}`",
            "",
            f"Validation binary defect IoU **{best[SELECTION_METRIC]:.4f}** at epoch {best['best_epoch']}; "
            + ", ".join(f"{k} = {_number(v)}" for k, v in sorted(best["config"].items())),
            "",
        ]
        plot_per_class_iou(best["val_per_class_iou"], folder / "best_per_class_iou.png")
        names = list(best["val_per_class_iou"])
        plot_confusion(best["val_confusion_matrix"], names, folder / "best_confusion.png")
        pictures += ["best_per_class_iou.png", "best_confusion.png"]
    lines += _by_configuration_section(trials, keys)
    if final:
        lines += _final_section(final)
    if comparison:
        lines += comparison_section(comparison)
        pictures[:0] = plot_comparison(comparison, folder)
    plot_iou_vs_ratio(trials, final, folder / "iou_vs_ratio.png")
    pictures.insert(0, "iou_vs_ratio.png")
    if len({str(t["config"].get("arch")) for t in finished}) > 1:
        plot_by_architecture(trials, folder / "by_architecture.png")
        pictures.insert(1, "by_architecture.png")
    importance, views, notes = _search_views(spec, trials, folder)
    pictures += views
    lines += notes
    if spec.search.asha:
        lines += asha_section(trials)
    lines += ["## All trials (best first)", "", *_trial_table(trials, keys), ""]
    failed = [t for t in trials if t["error"]]
    if failed:
        lines += ["## Failed trials", ""] + [f"- `{t['trial']}`: {t['error']}" for t in failed]
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in pictures]
    text = "\n".join(lines) + "\n"
    atomic_write(folder / REPORT_FILE, lambda tmp: Path(tmp).write_text(text))
    return {
        "best": best,
        "final": final,
        "comparison": comparison,
        "importance": importance,
        "trials": len(trials),
        "report": REPORT_FILE,
    }
