"""``defectforge study``: check, run, resume, report, export, pool."""

from __future__ import annotations

from defectforge.cli.options import add_options, add_out, given, local_path

COMMANDS = {"study": "Ray Tune + Optuna studies: check, run, resume, report, export, pool"}


def build(name: str, parser) -> None:
    from defectforge.segmentation.decisions import CalibrationTarget

    study = parser.add_subparsers(dest="study_command", required=True)
    check = study.add_parser("check", help="the checks of `study run`, without running anything")
    check.add_argument("spec", type=local_path, help="study spec YAML (see studies/specs/)")
    check.add_argument("--address", help="Ray address: auto or ray://HOST:10001 (default: local)")
    run = study.add_parser("run", help="search, held-out final step, report")
    run.add_argument("spec", type=local_path, help="study spec YAML (see studies/specs/)")
    run.add_argument("--name", help="study folder name under storage_path (default: spec name)")
    run.add_argument("--address", help="Ray address: auto or ray://HOST:10001 (default: local)")
    resume = study.add_parser("resume", help="continue a study whose driver stopped")
    resume.add_argument("dir", help="the study folder (storage_path/name)")
    resume.add_argument("--address")
    report = study.add_parser("report", help="redraw report.md and its plots")
    report.add_argument("dir")
    export = study.add_parser("export", help="best model -> TorchScript + ONNX + model.json")
    export.add_argument("dir")
    add_out(export, "export folder to write")
    add_options(export, CalibrationTarget)
    pool = study.add_parser(
        "pool", help="pool the seeds of compare studies of one spec (different final.first_seed)"
    )
    pool.add_argument("dirs", nargs="+", help="the compare studies' folders")
    add_out(pool, "folder for the pooled compare.json, report.md and plots")


def study_line(summary: dict) -> str:
    best, final = summary["best"], summary["final"]
    if best is None:
        return "no trial has a validation score yet (each trial's status and error in the report)"
    line = f"best trial {best['trial']}: val binary defect IoU {best['val_binary_defect_iou']:.4f}"
    if final:
        test = final["test_binary_defect_iou"]
        line += (
            f"; held-out test {test['mean']:.4f} ± {test['half_width']:.4f} "
            f"(95% CI, {test['n']} seeds)"
        )
    if final and "paired" in final:
        line += "\n" + _paired_line(final["paired"])
    elif final and final.get("chosen_is_baseline"):
        line += "\nthe search chose the baseline itself: nothing to compare"
    return line


def _paired_line(row: dict) -> str:
    interval = row["interval"]
    if not interval:
        return f"{row['arm']} vs {row['baseline']}: too few paired seeds for an interval"
    return (
        f"{row['arm']} vs {row['baseline']}: {interval['mean']:+.4f} "
        f"[{interval['low']:+.4f}, {interval['high']:+.4f}] over {interval['n']} seeds: "
        f"{row['verdict']}"
    )


def run(args) -> None:
    if args.study_command == "check":
        from defectforge.trainables.study import check_spec

        print(check_spec(args.spec, args.address))
        return
    if args.study_command == "pool":
        from defectforge.studies.pool import write_pool

        comparison = write_pool(args.dirs, args.out, args.overwrite)
        for row in comparison["paired"]:
            print(_paired_line(row))
        print(f"report: {args.out}/report.md")
        return
    if args.study_command == "export":
        from defectforge.cli.seg import export_line
        from defectforge.segmentation.decisions import CalibrationTarget
        from defectforge.studies.export import export_study

        target = CalibrationTarget(**given(args, CalibrationTarget))
        meta = export_study(
            args.dir, args.out, args.overwrite, target.target_recall, target.target_false_alarm
        )
        print(export_line(meta, args.out) + f" ({meta['metrics']['chosen']})")
        return
    if args.study_command == "report":
        from defectforge.studies.results import report_only

        summary = report_only(args.dir)
    else:
        from defectforge.trainables import study

        if args.study_command == "run":
            summary = study.run_study(args.spec, args.name, args.address)
        else:
            summary = study.resume_study(args.dir, args.address)
    print(study_line(summary))
    print(f"report: {summary['location']}")
    if summary.get("export"):
        print(f"export: {summary['export']}")


def interrupted_hint(args) -> str:
    if args.study_command == "run":
        from defectforge.core.storage import absolute_location
        from defectforge.studies.spec import load_spec

        spec = load_spec(args.spec)
        root = absolute_location(f"{spec.storage_path.rstrip('/')}/{args.name or spec.name}")
        return f"`defectforge study resume {root}` continues the study where it stopped"
    if args.study_command == "resume":
        return f"`defectforge study resume {args.dir}` continues it again"
    return "nothing was published; run the command again"
