"""The command-line reference page (docs/reference/commands.md), generated from the parsers
``defectforge.cli.parser()`` builds: every command and subcommand with every flag, its value,
its default and its help text. Read by the docs' MkDocs hook and by tests/test_docs.py."""

from __future__ import annotations

import argparse
import os

from defectforge.core.markdown import cell, code, table


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    """(name, parser, help) of each subcommand of ``parser``, in the order they were added."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            found += [(name, sub, helps.get(name, "")) for name, sub in action.choices.items()]
    return found


def _expanded_help(action: argparse.Action, prog: str) -> str:
    """The help text as ``--help`` prints it (``%(default)s`` and ``%%`` expanded)."""
    text = action.help or ""
    if text == argparse.SUPPRESS:
        return ""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    try:
        return text % params
    except (KeyError, TypeError, ValueError):
        return text.replace("%%", "%")


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        return " \\| ".join(code(c) for c in action.choices)
    metavar = action.metavar or (action.dest if not action.option_strings else action.dest.upper())
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    if action.nargs in ("+", "*"):
        metavar = f"{metavar} ..."
    return code(metavar)


def _default(action: argparse.Action) -> str:
    default = action.default
    if default is argparse.SUPPRESS or default is None or action.required:
        return ""
    if action.nargs == 0 and default is False:
        return "off"
    if default == "":
        return "''"
    return code(default)


def _options_rows(parser: argparse.ArgumentParser) -> list[tuple[str, ...]]:
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        names = ", ".join(code(s) for s in action.option_strings) or code(action.dest)
        needed = "yes" if action.required else ""
        help_text = cell(_expanded_help(action, parser.prog))
        rows.append((names, _value(action), _default(action), needed, help_text))
    return rows


def _groups(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for group in parser._mutually_exclusive_groups:
        names = ", ".join(code(a.option_strings[0]) for a in group._group_actions)
        how = "exactly one of" if group.required else "at most one of"
        lines.append(f"- {how} {names}")
    return lines + [""] if lines else []


def _command_section(path: list[str], parser: argparse.ArgumentParser, text: str) -> list[str]:
    level = "#" * min(len(path), 4)
    lines = [f"{level} {' '.join(path)}", ""]
    if text:
        lines += [cell(text[0].upper() + text[1:]) + ".", ""]
    lines += ["```text", parser.format_usage().strip(), "```", ""]
    subs = _subcommands(parser)
    rows = _options_rows(parser)
    if rows:
        lines += table(("option", "value", "default", "required", "what it does"), rows)
        lines += _groups(parser)
    if subs:
        lines += ["Subcommands:", ""]
        lines += [f"- `{' '.join([*path, name])}`: {cell(help_)}" for name, _, help_ in subs]
        lines += [""]
        for name, sub, help_ in subs:
            lines += _command_section([*path, name], sub, help_)
    return lines


def command_reference(root: argparse.ArgumentParser | None = None) -> str:
    """The command-line reference page, from the parsers ``defectforge.cli.parser()`` builds."""
    if root is None:
        from defectforge.cli import parser

        root = parser()
    # argparse wraps usage lines at the terminal's width: the same page on every machine.
    os.environ["COLUMNS"] = "100"
    lines = [
        "# Command line",
        "",
        "Generated from the command line's own parsers (`defectforge.cli.parser()`) each time the",
        "documentation is built, so it lists exactly the flags the installed version accepts.",
        "Every command and subcommand also takes `-h`, `--help`, which prints the same.",
        "A flag whose default says `none` is off or unset unless given; a GAN option's help",
        "names its default under each `--profile`. Boolean options also take a `--no-` form.",
        "",
        root.description or "",
        "",
    ]
    root_rows = _options_rows(root)
    lines += ["## defectforge", "", "```text", root.format_usage().strip(), "```", ""]
    lines += table(("option", "value", "default", "required", "what it does"), root_rows)
    lines += ["Commands:", ""]
    subs = _subcommands(root)
    lines += [f"- [`defectforge {name}`](#defectforge-{name}): {cell(h)}" for name, _, h in subs]
    lines += [""]
    for name, sub, help_ in subs:
        lines += _command_section(["defectforge", name], sub, help_)
    return "\n".join(lines).rstrip() + "\n"
