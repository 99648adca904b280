"""A compare study's answer: every arm on the held-out test split, each arm against ratio 0, and
each GAN arm against the copy-paste arm of the same mix.

Each arm (a grid point) ran with the same seeds; a seed fixes the weights' start and the batch
order's seed, so the arm minus its ratio-0 baseline at the same seed is a paired difference, and
its mean gets a Student-t interval; likewise an arm with GAN images (or GAN and copy-paste
images together) minus the copy-paste arm that differs from it only in its source: the cheap
control a GAN has to beat. Per-image IoUs (every test image, averaged over the seeds)
give the paper's per-image IoU curves. No Ray here.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from defectforge.core.files import pyplot, save_png
from defectforge.studies.spec_schema import MIX_DEFAULTS, StudySpec
from defectforge.studies.stats import mean_interval

COMPARE_FILE = "compare.json"
CONTROL_SOURCE = "copy_paste"
CONTROL_VERDICTS = ("beats copy-paste", "loses to copy-paste")
# What makes an arm's training data differ from its baseline's; every other key must match.
MIX_KEYS = tuple(MIX_DEFAULTS)
# What the report keeps of each seed's held-out run (final.json keeps its test metrics too).
SEED_KEYS = (
    "seed",
    "best_epoch",
    "best_val_binary_defect_iou",
    "test_binary_defect_iou",
    "test_mean_defect_iou",
    "best_checkpoint_path",
)


def arm_label(arm: dict) -> str:
    """``gan 0.38, arch=pan``; ``real only``; ``copy_paste 0.5 (100 real)``."""
    ratio = arm.get("synthetic_ratio") or 0
    mix = f"{arm.get('synthetic_source') or 'gan'} {ratio:g}" if ratio else "real only"
    if ratio and arm.get("real_count"):
        mix += f" ({arm['real_count']} real)"
    return ", ".join([mix, *(f"{k}={v}" for k, v in arm.items() if k not in MIX_KEYS)])


def _test_line(record) -> dict:
    lines = [line for line in record.lines if "test_binary_defect_iou" in line]
    if record.error or not lines:
        raise RuntimeError(f"compare run {record.name} failed: {record.error}")
    return lines[-1]


def _per_image_mean(runs: list[list[float | None]]) -> list[float | None]:
    """Each test image's IoU averaged over the seeds (None where every seed left it undefined)."""
    means = []
    for scores in zip(*runs, strict=True):
        known = [s for s in scores if s is not None]
        means.append(float(np.mean(known)) if known else None)
    return means


def _matching(arm: dict, arms: list[dict], free: tuple[str, ...], wanted) -> dict | None:
    """The first of ``arms`` for which ``wanted(other)`` holds that equals ``arm`` in every key
    but ``free``."""
    same = {k: v for k, v in arm.items() if k not in free}
    for other in arms:
        if wanted(other) and all(other.get(k) == v for k, v in same.items()):
            return other
    return None


def _baseline(arm: dict, arms: list[dict]) -> dict | None:
    """The ratio-0 arm that differs from ``arm`` only in its training data's mix."""
    return _matching(arm, arms, MIX_KEYS, lambda other: not other.get("synthetic_ratio"))


def _scores(seeds: list[dict]) -> dict[int, float]:
    """Each seed's test IoU (a seed whose IoU is undefined, no defect anywhere, is left out)."""
    return {
        s["seed"]: s["test_binary_defect_iou"]
        for s in seeds
        if s["test_binary_defect_iou"] is not None
    }


def _interval(values: list[float]) -> dict | None:
    return mean_interval(values) if len(values) > 1 else None


def _control(arm: dict, arms: list[dict]) -> dict | None:
    """The copy-paste arm that differs from ``arm`` (one with other synthetic images) only in
    its synthetic source."""
    if not arm.get("synthetic_ratio") or arm.get("synthetic_source") == CONTROL_SOURCE:
        return None
    return _matching(
        arm,
        arms,
        ("synthetic_source",),
        lambda other: other.get("synthetic_source") == CONTROL_SOURCE,
    )


def paired_difference(arm: dict, baseline: dict, verdicts=("helps", "hurts")) -> dict:
    """``arm`` minus ``baseline`` per seed both ran, the mean's 95% interval and a verdict
    (``verdicts``: the words for above and below zero)."""
    ours, theirs = _scores(arm["seeds"]), _scores(baseline["seeds"])
    differences = [
        {"seed": seed, "difference": score - theirs[seed]}
        for seed, score in sorted(ours.items())
        if seed in theirs
    ]
    interval = _interval([d["difference"] for d in differences])
    verdict = "cannot be told apart"
    if interval and interval["low"] > 0:
        verdict = verdicts[0]
    elif interval and interval["high"] < 0:
        verdict = verdicts[1]
    return {
        "arm": arm["label"],
        "baseline": baseline["label"],
        "differences": differences,
        "interval": interval,
        "verdict": verdict,
    }


def summarize_comparison(records: list, spec: StudySpec) -> dict:
    """compare.json: per arm its seeds, the test IoU's interval and per-image IoUs; per arm with
    synthetic images, the paired difference against its ratio-0 baseline; per GAN arm, the one
    against its copy-paste control (``against_copy_paste``)."""
    # The mix options are part of every arm, set or not, so its label and baseline are right.
    keys = sorted(set(spec.varied()) | {k for k in MIX_KEYS if k in spec.fixed()})
    grouped: dict[tuple, list] = defaultdict(list)
    for record in records:
        line = _test_line(record)
        arm = tuple(record.config.get(k) for k in keys)
        grouped[arm].append(line)
    arms = []
    for values, lines in grouped.items():
        lines.sort(key=lambda line: line["seed"])
        arms.append(
            arm_entry(
                dict(zip(keys, values, strict=True)),
                [{k: line.get(k) for k in SEED_KEYS} for line in lines],
                _per_image_mean([line["test"]["per_image_binary_iou"] for line in lines]),
            )
        )
    return comparison_of(keys, arms)


def arm_entry(arm: dict, seeds: list[dict], per_image: list[float | None]) -> dict:
    """One arm of compare.json: its seeds' scores and their interval, its per-image IoUs."""
    return {
        "arm": arm,
        "label": arm_label(arm),
        "seeds": seeds,
        "test_binary_defect_iou": _interval(list(_scores(seeds).values())),
        "per_image_binary_iou": per_image,
    }


def comparison_of(keys: list[str], arms: list[dict]) -> dict:
    """The arms in report order, each arm with synthetic images against its baseline, and each
    arm with GAN images against its copy-paste control."""
    arms = sorted(arms, key=lambda a: (bool(a["arm"].get("synthetic_ratio")), a["label"]))
    points = [a["arm"] for a in arms]
    paired, against_control = [], []
    for arm in arms:
        baseline = _baseline(arm["arm"], points)
        if arm["arm"].get("synthetic_ratio") and baseline is not None:
            base = next(a for a in arms if a["arm"] == baseline)
            paired.append(paired_difference(arm, base))
        control = _control(arm["arm"], points)
        if control is not None:
            base = next(a for a in arms if a["arm"] == control)
            against_control.append(paired_difference(arm, base, CONTROL_VERDICTS))
    return {"keys": keys, "arms": arms, "paired": paired, "against_copy_paste": against_control}


def plot_per_image_iou(comparison: dict, path: Path) -> None:
    """Each arm's per-image test IoUs, sorted: the share of test images at or above an IoU."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4))
    for arm in comparison["arms"]:
        scores = sorted((s for s in arm["per_image_binary_iou"] if s is not None), reverse=True)
        if scores:
            share = np.arange(1, len(scores) + 1) / len(scores)
            axis.plot(share, scores, label=f"{arm['label']} (median {np.median(scores):.3f})")
    axis.set(
        xlabel="share of test images (sorted by IoU)",
        ylabel="binary defect IoU of the image (mean over seeds)",
        title="Per-image IoU on the test split",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    axis.legend(fontsize=7)
    save_png(figure, path)


def plot_per_image_by_arm(comparison: dict, path: Path) -> None:
    """The paper's per-image view: each test image's IoU under every arm, the images in one
    order for all (by the real-only arm's IoU), so a reader sees which images an arm helps."""
    plt = pyplot()
    arms = comparison["arms"]
    baseline = next((a for a in arms if not a["arm"].get("synthetic_ratio")), arms[0])
    order = sorted(
        (i for i, s in enumerate(baseline["per_image_binary_iou"]) if s is not None),
        key=lambda i: baseline["per_image_binary_iou"][i],
    )
    figure, axis = plt.subplots(figsize=(9, 4))
    for arm in arms:
        scores = [arm["per_image_binary_iou"][i] for i in order]
        shown = [(x, s) for x, s in enumerate(scores) if s is not None]
        style = {"linewidth": 2.0, "color": "black"} if arm is baseline else {"linewidth": 0.8}
        axis.plot(*zip(*shown, strict=True), label=arm["label"], **style)
    axis.set(
        xlabel=f"test image, in order of its IoU under {baseline['label']}",
        ylabel="binary defect IoU of the image (mean over seeds)",
        title="Every test image under every arm",
        ylim=(0, 1),
    )
    axis.legend(fontsize=7)
    save_png(figure, path)


def plot_paired_differences(comparison: dict, path: Path) -> None:
    """Each arm minus its ratio-0 baseline, and each GAN arm minus its copy-paste control (same
    seeds): the mean and its 95% interval."""
    plt = pyplot()
    pairs = comparison["paired"] + comparison.get("against_copy_paste", [])
    rows = [p for p in pairs if p["interval"]]
    figure, axis = plt.subplots(figsize=(6.4, 0.5 * len(rows) + 1.5))
    for index, row in enumerate(rows):
        interval = row["interval"]
        axis.errorbar(
            [interval["mean"]],
            [index],
            xerr=[[interval["mean"] - interval["low"]], [interval["high"] - interval["mean"]]],
            fmt="o",
            capsize=4,
        )
        differences = [d["difference"] for d in row["differences"]]
        axis.scatter(differences, [index] * len(differences), marker="x", color="grey", zorder=3)
    axis.axvline(0, color="black", linewidth=0.8)
    # Several real-only arms (one per architecture, say): each row names the one it is against.
    several = len({row["baseline"] for row in rows}) > 1
    names = [f"{row['arm']} vs {row['baseline']}" if several else row["arm"] for row in rows]
    axis.set_yticks(range(len(rows)), names, fontsize=7)
    axis.set(
        xlabel="test binary defect IoU minus its baseline (same seed); 95% t-interval, x: seeds",
        title="Does the synthetic data help?",
    )
    save_png(figure, path)


def comparison_section(comparison: dict) -> list[str]:
    """Report lines: the arms on test, then each against its baseline and its control."""
    lines = [
        "## Arms on the held-out test split",
        "",
        "| arm | seeds | test binary IoU (mean) | 95% interval | median per-image IoU |",
        "|---|---|---|---|---|",
    ]
    for arm in comparison["arms"]:
        interval = arm["test_binary_defect_iou"]
        per_image = [s for s in arm["per_image_binary_iou"] if s is not None]
        median = f"{np.median(per_image):.4f}" if per_image else "-"
        low_high = f"{interval['low']:.4f} - {interval['high']:.4f}" if interval else "-"
        scores = list(_scores(arm["seeds"]).values())
        mean = f"{np.mean(scores):.4f}" if scores else "-"
        lines.append(f"| {arm['label']} | {len(arm['seeds'])} | {mean} | {low_high} | {median} |")
    lines += [
        "",
        "## Against ratio 0, paired by seed",
        "",
        "| arm | baseline | mean difference | 95% interval | per seed | verdict |",
        "|---|---|---|---|---|---|",
    ]
    lines += _paired_rows(comparison["paired"])
    against = comparison.get("against_copy_paste")
    if against:
        lines += [
            "",
            "## GAN images against copy-paste, paired by seed",
            "",
            "| arm | copy-paste arm | mean difference | 95% interval | per seed | verdict |",
            "|---|---|---|---|---|---|",
            *_paired_rows(against),
        ]
    return [*lines, ""]


def _paired_rows(pairs: list[dict]) -> list[str]:
    rows = []
    for row in pairs:
        interval = row["interval"]
        per_seed = ", ".join(f"{d['difference']:+.4f}" for d in row["differences"])
        if interval:
            cells = f"{interval['mean']:+.4f} | {interval['low']:+.4f} - {interval['high']:+.4f}"
        else:
            cells = "- | -"
        rows.append(
            f"| {row['arm']} | {row['baseline']} | {cells} | {per_seed} | {row['verdict']} |"
        )
    return rows


def plot_comparison(comparison: dict, folder: Path) -> list[str]:
    """A comparison's plots in ``folder``: the paired differences, the per-image IoU curves and
    every test image under every arm; returns their file names."""
    plots = {
        "paired_differences.png": plot_paired_differences,
        "per_image_iou.png": plot_per_image_iou,
        "per_image_by_arm.png": plot_per_image_by_arm,
    }
    for name, plot in plots.items():
        plot(comparison, folder / name)
    return list(plots)
