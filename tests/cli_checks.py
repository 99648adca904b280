"""What every bad-input test asserts of the command line: one line, exit 2, nothing lost."""

from __future__ import annotations

from pathlib import Path

from defectforge.trainables.cli import main


def refused(capsys, argv: list[str], *expected: str) -> str:
    """Run the CLI; it must exit 2 with one stderr line, no traceback, holding every
    ``expected`` text."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes: compared before and after, nothing lost."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }
