"""The rules of ``core.outputs`` on object storage, which has no rename.

- A folder on a store counts as written once its output record (``defectforge.json``) is there;
  the record is uploaded after every other file, so readers (``Manifest.load``, stages, runs)
  never take an unfinished upload for a result.
- A writer marks the folder (``.defectforge-writing-<host>-<pid>-<random>``) while it writes; a
  second writer finding another's mark is refused, and so is one that finds a record appeared
  meanwhile (of two concurrent writers the first result stands).
- ``--overwrite`` replaces only a folder holding defectforge's record or a writer's mark, never
  a training run's. The old result stands while the new one is made; just before the new record
  goes up its files are deleted, record first, so no mix ever looks finished. A writer that
  fails removes only what it wrote. A mark of a dead process of this host is cleared; another
  host's is named in the refusal, to delete by hand once that command is gone.
- A training run's folder takes only a run of its own kind, as on a disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from defectforge.core.errors import DataError
from defectforge.core.files import WRITER_HOST, process_alive, scratch_path, writer_of
from defectforge.core.storage import Location, is_uri

WRITING_MARK = ".defectforge-writing-"


def recorded_kind(folder: Location, record: str) -> str | None:
    """The kind its record names; None only when there is no readable record (a store that
    fails to answer raises: it must never make a training run look replaceable)."""
    if not (folder / record).is_file():
        return None
    with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return json.loads((folder / record).read_text()).get("kind")
    return None


def check_not_over_inputs(out: Location, inputs: tuple, flag: str) -> None:
    """Refuse an output location that is, contains, or lies inside an input on the same store."""
    for given in inputs:
        if not given or not is_uri(str(given)):
            continue
        source = Location.of(given).uri
        if out.uri == source or source.startswith(out.uri + "/"):
            raise DataError(
                out,
                f"{flag} is the input {source} or contains it, so writing there would replace "
                "your input data",
                f"choose an {flag} outside {source}",
            )
        if out.uri.startswith(source + "/"):
            raise DataError(
                out,
                f"{flag} lies inside the input {source}, so the next command that reads "
                f"{source} would take this output for input data",
                f"choose an {flag} outside {source}",
            )


def _names_there(out: Location, inputs: tuple, flag: str) -> list[str]:
    """What ``out`` holds, once it is known not to be over an input and to be writable (some
    stores create a missing bucket on a failed upload: asked before anything is written)."""
    check_not_over_inputs(out, inputs, flag)
    out.check_writable()
    return out.children()


def check_output(
    final: Location,
    overwrite: bool,
    inputs: tuple,
    flag: str,
    record: str,
    training_kinds: tuple[str, ...],
) -> Location:
    names = _names_there(final, inputs, flag)
    if not names:
        return final
    kind = recorded_kind(final, record)
    if kind in training_kinds:
        raise DataError(
            final,
            "--overwrite never replaces a training run's folder (its checkpoints would go)",
            f"choose another {flag}, or move the run away yourself",
        )
    if record not in names and not any(name.startswith(WRITING_MARK) for name in names):
        # Said whatever the flags: advising --overwrite here would only lead to this refusal.
        raise DataError(
            final,
            f"output folder already exists, and --overwrite replaces only folders defectforge "
            f"wrote: this one has no {record}",
            f"choose another {flag}, or move the objects away yourself",
        )
    if not overwrite:
        problem = (
            "output folder already exists"
            if record in names
            else "holds an unfinished upload (another command may still be writing it)"
        )
        raise DataError(final, problem, f"pass --overwrite or choose another {flag}")
    return final


def _delete_files(final: Location, names: set[str], record: str) -> None:
    """Delete an old result's files, its record first: from then on it no longer counts."""
    (final / record).delete()
    for name in sorted(names - {record}):
        (final / name).delete()


def _other_writers(final: Location, mark: str) -> list[str]:
    """Other writers' marks here; a mark left by a dead process of this host is removed."""
    others = []
    for name in final.children():
        if not name.startswith(WRITING_MARK) or name == mark:
            continue
        writer = writer_of(name, WRITING_MARK)
        if writer and writer[0] == WRITER_HOST and not process_alive(writer[1]):
            (final / name).delete()
        else:
            others.append(name)
    return others


@contextlib.contextmanager
def publish(
    final: Location, overwrite: bool, record: str, record_payload: dict, flag: str
) -> Iterator[Path]:
    """Yield a local staging folder; when the block succeeds, upload it to ``final`` with the
    record last. ``final`` has been checked (``check_output``)."""
    mark = f"{WRITING_MARK}{WRITER_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    (final / mark).write_bytes(b"")
    # --overwrite: the old result stands until the new one is whole (as a rename keeps it on a
    # disk); its files are deleted, record first, only just before the new record goes up.
    old = {name for name in final.all_files() if not name.startswith(WRITING_MARK)}
    staging: Path | None = None
    finished = False
    try:
        others = _other_writers(final, mark)
        if others:
            raise DataError(
                final,
                f"another command is writing this folder now ({others[0]}); its result will stand",
                f"wait for it, or choose another {flag} (if that command is gone, delete "
                f"{final / others[0]} and run again)",
            )
        if old and not overwrite:  # appeared since the command's check
            raise DataError(
                final, "output folder already exists", f"pass --overwrite or choose another {flag}"
            )
        staging = scratch_path("upload")
        yield staging
        if old:
            _delete_files(final, old, record)
        elif (final / record).is_file():
            raise DataError(
                final,
                "another run wrote this folder while this one was running; its result stands "
                "and this run's output was discarded",
                f"pass --overwrite to replace it, or choose another {flag}",
            )
        (staging / record).write_text(json.dumps(record_payload, indent=2) + "\n")
        final.upload(staging, last=record)
        finished = True
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        (final / mark).delete()
        if not finished and not _other_writers(final, mark):
            # What this writer put there goes; an earlier finished result is never touched.
            for name in final.all_files() - old:
                (final / name).delete()


def check_run_folder(folder: Location, kind: str, inputs: tuple, record: str) -> Location:
    if not _names_there(folder, inputs, "--out"):
        return folder
    found = recorded_kind(folder, record)
    if found is None:
        raise DataError(
            folder,
            f"--out holds objects that are not a defectforge run (no {record})",
            "choose a new or empty --out, or the folder of an earlier run to continue it",
        )
    if found != kind:
        raise DataError(
            folder,
            f"--out holds a {found}, not a {kind}; training into it would overwrite its files",
            f"choose a new or empty --out, or the folder of an earlier {kind} to continue it",
        )
    return folder
