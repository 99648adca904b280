"""The documentation: the generated references are complete, the README is short and its links
resolve. No MkDocs needed: the generators (``cli.reference``, ``studies.spec_reference``) are
plain functions, which the docs' MkDocs hook calls."""

from __future__ import annotations

import argparse
import dataclasses
import html
import importlib
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

from defectforge.cli.reference import command_reference
from defectforge.studies.spec_reference import spec_reference

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 250
# The config classes whose options the labeller, gan, mask_gan and label stages take.
MAPPING_STAGE_CLASSES = (
    ("defectforge.segmentation.config", "SegConfig"),
    ("defectforge.gan.config", "GanConfig"),
    ("defectforge.segmentation.pseudo_label", "LabelConfig"),
    ("defectforge.segmentation.pseudo_label", "Corrections"),
)


def _sections(page: str) -> dict[str, str]:
    """Each heading's text up to the next heading, by its heading text and by its anchor."""
    sections: dict[str, list[str]] = {}
    keys: list[str] = []
    for line in page.splitlines():
        heading = re.match(r"^#{1,6} (.+?)(?: \{#([\w-]+)\})?$", line)
        if heading:
            keys = [heading.group(1).strip()] + ([heading.group(2)] if heading.group(2) else [])
            for key in keys:
                sections[key] = []
        else:
            for key in keys:
                sections[key].append(line)
    return {key: "\n".join(lines) for key, lines in sections.items()}


def _plain(text: str) -> str:
    """Markdown escapes undone, whitespace collapsed: what a reader sees."""
    return " ".join(html.unescape(text).replace("\\", "").split())


def _parsers(parser: argparse.ArgumentParser, path: list[str]):
    """(command words, parser) of the root and of every command and subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, [*path, name])


def test_command_reference_lists_every_command_flag_and_help():
    from defectforge.cli import parser

    sections = _sections(command_reference())
    walked = list(_parsers(parser(), ["defectforge"]))
    assert len(walked) > 20  # every command group and its subcommands
    for path, sub in walked:
        heading = " ".join(path)
        assert heading in sections, f"no section for `{heading}`"
        body = sections[heading]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                for name in action.choices:
                    assert f"`{heading} {name}`" in body, f"{heading}: subcommand {name} not listed"
                continue
            for name in action.option_strings or [action.dest]:
                assert f"`{name}`" in body, f"{heading}: {name} not on the page"
            if action.help and action.help != argparse.SUPPRESS:
                shown = _plain(action.help.replace("%%", "%"))
                assert shown in _plain(body), f"{heading}: the help of {action.dest} not shown"


def test_command_reference_matches_help_output():
    """What `--help` prints, read as a user reads it, against the page's section."""
    out = subprocess.run(
        [sys.executable, "-m", "defectforge.cli", "seg", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200", "NO_ALBUMENTATIONS_UPDATE": "1"},
    ).stdout
    options_part = out.split("options:", 1)[1]
    flags = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", options_part)) - {"-h", "--help"}
    assert {"--data", "--out", "--resume", "--arch", "--synthetic-ratio"} <= flags
    body = _sections(command_reference())["defectforge seg train"]
    missing = sorted(flag for flag in flags if f"`{flag}`" not in body)
    assert not missing, f"`seg train --help` shows flags the page lacks: {missing}"


def _dataclasses_in(annotation) -> list[type]:
    members = typing.get_args(annotation) or (annotation,)
    return [m for m in members if isinstance(m, type) and dataclasses.is_dataclass(m)]


def _spec_classes() -> list[type]:
    """StudySpec, Stages, every dataclass their fields hold (recursively), and the classes the
    mapping stages take their options from."""
    from defectforge.studies.spec_schema import StudySpec
    from defectforge.studies.stages import Stages

    waiting = [StudySpec, Stages] + [
        getattr(importlib.import_module(module), name) for module, name in MAPPING_STAGE_CLASSES
    ]
    found: list[type] = []
    while waiting:
        cls = waiting.pop(0)
        if cls in found:
            continue
        found.append(cls)
        hints = typing.get_type_hints(cls)
        waiting += [n for f in dataclasses.fields(cls) for n in _dataclasses_in(hints[f.name])]
    return found


def test_spec_reference_names_every_field_of_every_section():
    from defectforge.segmentation.config import SegConfig
    from defectforge.studies.spec_schema import Range

    sections = _sections(spec_reference())
    classes = _spec_classes() + [Range]
    names = {cls.__name__ for cls in classes}
    assert {"DatasetSpec", "SearchSpec", "AshaSpec", "ResourcesSpec", "FinalSpec"} <= names
    assert {"BuildConfig", "SubsetConfig", "GenerateSpec", "CopyPasteConfig", "ExportSpec"} <= names
    for cls in classes:
        anchor = cls.__name__.lower()
        assert anchor in sections, f"no section for {cls.__name__}"
        for spec in dataclasses.fields(cls):
            assert f"`{spec.name}`" in sections[anchor], f"{cls.__name__}.{spec.name} not named"
    for name in SegConfig.searchable():
        assert f"`{name}`" in sections["search-space"], f"searchable {name} not listed"


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    lines = len(text.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines"
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", link) or link.startswith("#"):
            continue  # another site, or an anchor of the README itself
        target = ROOT / link.split("#", 1)[0]
        assert target.exists(), f"README.md links to {link}, which does not exist"


def test_readme_setup_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = README.read_text()
    for command in (
        'pip install -e ".[train,cpu,dev,docs]" && defectforge quickstart',
        "ruff check . && ruff format --check . && python -m pytest -q",
    ):
        assert command in ci and command in readme, command
