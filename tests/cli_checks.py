"""What every bad-input test asserts of the command line: one line, exit 2, nothing lost; and
the inputs some commands read, made by hand."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np

from defectforge.cli import main

# Ray forwards what its own processes print (a raylet's full-disk warning, a worker's log) to
# every driver's stderr at any moment: such lines are not ours to count.
_RAY_FORWARDED = re.compile(
    r"^(?:\x1b\[[0-9;]*m)*\((?:raylet\b|autoscaler \+|[^\n]*?\bpid=\w+(?:, ip=[^)\s]+)?\))"
)


def can_unshare(*namespaces: str) -> bool:
    """Whether this machine lets a process into new Linux namespaces (``unshare`` flags, e.g.
    ``--mount``): tests that need them are skipped elsewhere."""
    if not shutil.which("unshare"):
        return False
    done = subprocess.run(["unshare", *namespaces, "true"], capture_output=True, check=False)
    return done.returncode == 0


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` our own code printed, without those Ray forwarded."""
    return [line for line in stderr.strip().splitlines() if not _RAY_FORWARDED.match(line)]


def refused(capsys, argv: list[str], *expected: str) -> str:
    """Run the CLI; it must exit 2 with one stderr line, no traceback, holding every
    ``expected`` text."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes: compared before and after, nothing lost."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def fake_gan_run(root: Path, swds: list[tuple[float, float]]) -> Path:
    """A GAN run folder as `gan train` leaves it mid-way: progress lines and sample grids."""
    (root / "samples").mkdir(parents=True)
    lines = [json.dumps({"kimg": kimg, "swd": swd}) for kimg, swd in swds]
    (root / "progress.jsonl").write_text("\n".join(lines) + "\n")
    for kimg, _ in swds:
        grid = np.full((32, 32, 3), int(kimg * 10), np.uint8)
        cv2.imwrite(str(root / "samples" / f"kimg_{kimg:09.3f}.png"), grid)
    return root
