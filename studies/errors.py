"""The study spec's error: what a user got wrong in a spec file, said in one line."""

from __future__ import annotations

from typing import Any

from defectforge.core.errors import UserError


class SpecError(UserError):
    """``<file>: <key> = <value>: <problem>; <fix>``, or a message already in that form."""

    def __init__(self, where: str, key: str | None = None, value: Any = None, problem="", fix=""):
        super().__init__(where if key is None else f"{where}: {key} = {value!r}: {problem}; {fix}")


def with_fix(text: str) -> str:
    """An option's message as a spec error: its own fix (after ``;``) or a plain "fix it"."""
    return text if ";" in text else f"{text}; fix it"
