"""Where defectforge may write: the safety rules every output folder obeys.

- An output never equals or contains one of the command's inputs (``--out`` = ``--root`` would
  otherwise replace the raw images with the dataset).
- ``--overwrite`` replaces only a folder defectforge wrote: one holding its output record
  (``defectforge.json``) or, for folders written by earlier versions, a dataset manifest, an
  export's model.json or a steel simulation's record. Anything else is refused, and so is a
  training run's folder (its checkpoints are hours of work; a run is continued, never replaced).
- A folder is written under a temporary name beside the target and renamed into place at the
  end, so a failed or interrupted command leaves nothing under the final name. The rename never
  replaces a folder that appeared meanwhile (another run to the same ``--out``): that run's
  result stands and this one reports it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from defectforge.datasets.errors import DataError
from defectforge.datasets.files import UMASK, package_version, write_json_atomic

OUTPUT_RECORD = "defectforge.json"
# The output kinds that hold a training run's checkpoints (`prepare_run_folder`).
SEG_RUN, GAN_RUN = "segmentation run", "GAN run"
TRAINING_RUN_KINDS = (SEG_RUN, GAN_RUN)
# Artefacts of earlier versions, written before every output carried OUTPUT_RECORD.
EARLIER_ARTEFACTS = {
    "manifest.json": "schema_version",
    "model.json": "format",
    "simulation.json": "simulated",
}


def is_within(path: Path, folder: Path) -> bool:
    """True if ``path`` is ``folder`` or lies below it (both resolved)."""
    return path == folder or folder in path.parents


def check_not_over_inputs(out: Path, inputs: tuple[str | Path, ...], flag: str = "--out") -> None:
    """Refuse an output folder that is, or contains, one of the inputs."""
    for given in inputs:
        if not given:
            continue
        source = Path(given).expanduser().resolve()
        if is_within(source, out):
            raise DataError(
                out,
                f"{flag} is the input {source} or contains it, so writing there would replace "
                "your input data",
                f"choose an {flag} outside {source}",
            )


def written_by_defectforge(folder: Path) -> bool:
    """Whether ``folder`` holds an output record (or an earlier version's artefact)."""
    if (folder / OUTPUT_RECORD).is_file():
        return True
    for name, key in EARLIER_ARTEFACTS.items():
        path = folder / name
        if path.is_file():
            with contextlib.suppress(OSError, ValueError):
                if key in json.loads(path.read_text()):
                    return True
    return False


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output(out: str | Path, overwrite: bool, inputs: tuple = (), flag: str = "--out") -> Path:
    """The resolved output folder, after the rules in this module's docstring."""
    final = Path(out).expanduser().resolve()
    check_not_over_inputs(final, inputs, flag)
    if final.exists() and not final.is_dir():
        raise DataError(final, f"{flag} is a file, not a folder", f"choose another {flag}")
    if not final.exists() or _is_empty_folder(final):
        return final
    if not overwrite:
        raise DataError(
            final, "output folder already exists", f"pass --overwrite or choose another {flag}"
        )
    if not written_by_defectforge(final):
        raise DataError(
            final,
            f"--overwrite replaces only folders defectforge wrote, and this one has no "
            f"{OUTPUT_RECORD} (nor a dataset manifest or export record)",
            f"choose another {flag}, or move the folder away yourself",
        )
    if _is_training_run(final):
        raise DataError(
            final,
            "--overwrite never replaces a training run's folder (its checkpoints would go)",
            f"choose another {flag}, or move the run away yourself",
        )
    return final


def _is_training_run(folder: Path) -> bool:
    """A `seg train` / `gan train` folder: its record says so, or (earlier versions) it holds
    Ray Train storage."""
    record = folder / OUTPUT_RECORD
    with contextlib.suppress(OSError, ValueError):
        if json.loads(record.read_text()).get("kind") in TRAINING_RUN_KINDS:
            return True
    return (folder / "ray").is_dir()


def output_record(kind: str, details: dict | None = None) -> dict:
    return {
        "written_by": f"defectforge {package_version()}",
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(details or {}),
    }


@contextlib.contextmanager
def publish_dir(
    final: str | Path,
    overwrite: bool = False,
    inputs: tuple = (),
    kind: str = "output",
    flag: str = "--out",
) -> Iterator[Path]:
    """Yield a staging folder beside ``final``; when the block succeeds, write the output record
    and rename the folder to ``final``. On failure nothing under ``final`` changes."""
    final = check_output(final, overwrite, inputs, flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    # mkdtemp makes a private (0700) folder; the published one gets ordinary permissions.
    staging.chmod(0o777 & ~UMASK)
    try:
        yield staging
        write_json_atomic(staging / OUTPUT_RECORD, output_record(kind))
        _move_into_place(staging, final, overwrite, flag)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, final: Path, overwrite: bool, flag: str) -> None:
    if overwrite and final.exists() and not _is_empty_folder(final):
        # Checked again here: the folder may have changed since the command started (a `gan
        # train` to the same folder, say).
        if not written_by_defectforge(final) or _is_training_run(final):
            raise DataError(final, "the folder was replaced meanwhile", f"choose another {flag}")
        retired = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, retired)
        try:
            _rename_no_replace(staging, final, flag)
        except BaseException:
            os.replace(retired, final)
            raise
        shutil.rmtree(retired, ignore_errors=True)
        return
    _rename_no_replace(staging, final, flag)


def _rename_no_replace(staging: Path, final: Path, flag: str) -> None:
    """Rename ``staging`` to ``final`` unless a non-empty ``final`` appeared meanwhile (POSIX
    rename of a folder onto a non-empty folder fails; onto an empty one, nothing is lost)."""
    try:
        os.rename(staging, final)
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise DataError(
                final,
                "another run wrote this folder while this one was running; its result stands "
                "and this run's output was discarded",
                f"pass --overwrite to replace it, or choose another {flag}",
            ) from None
        raise


def check_run_folder(out: str | Path, inputs: tuple = ()) -> Path:
    """A training run's folder (written in place, resumable), resolved: refused if it is over an
    input, a file, or a non-empty folder that is not a defectforge run."""
    folder = Path(out).expanduser().resolve()
    check_not_over_inputs(folder, inputs)
    if folder.exists() and not folder.is_dir():
        raise DataError(folder, "--out is a file, not a folder", "choose another --out")
    if folder.is_dir() and not _is_empty_folder(folder) and not _is_run(folder):
        raise DataError(
            folder,
            f"--out holds files that are not a defectforge run (no {OUTPUT_RECORD})",
            "choose a new or empty --out, or the folder of an earlier run to continue it",
        )
    return folder


def prepare_run_folder(out: str | Path, kind: str, inputs: tuple = ()) -> Path:
    """The checked run folder, created with its output record (``kind``: one of
    ``TRAINING_RUN_KINDS``, which no --overwrite replaces). Call it after every other input
    check, so a refused command leaves no folder behind."""
    if kind not in TRAINING_RUN_KINDS:
        raise ValueError(f"{kind!r} is not one of {TRAINING_RUN_KINDS}")
    folder = check_run_folder(out, inputs)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / OUTPUT_RECORD).is_file():
        write_json_atomic(folder / OUTPUT_RECORD, output_record(kind))
    return folder


def _is_run(folder: Path) -> bool:
    # Runs of earlier versions carry no record but always a config.json or Ray storage.
    return written_by_defectforge(folder) or (folder / "config.json").is_file()
