"""Markdown for the generated reference pages: table cells, code spans, tables."""

from __future__ import annotations


def cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell, on one line: HTML, emphasis characters and
    pipes escaped outside `code spans` (inside them a pipe does not split a cell)."""
    parts = str(text).replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):  # outside code spans
        part = parts[i].replace("\\", "\\\\").replace("&", "&amp;")
        part = part.replace("<", "&lt;").replace(">", "&gt;")
        for char in "*_[]|":
            part = part.replace(char, "\\" + char)
        parts[i] = part
    if len(parts) % 2 == 0:  # an unmatched backtick: keep it literal
        parts[-2] += "\\`" + parts.pop()
    return "`".join(parts)


def code(text: str) -> str:
    text = str(text)  # a pipe inside a code span does not split a table cell
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]
