"""Where defectforge may write: the safety rules every output folder obeys.

- An output never equals, contains or lies inside one of the command's inputs (``--out`` =
  ``--root`` would replace the raw images with the dataset; an output inside an input would be
  read back as input by the next command over it).
- ``--overwrite`` replaces only a folder defectforge wrote: one holding its output record
  (``defectforge.json``) or, for folders written by earlier versions, a dataset manifest, an
  export's model.json or a steel simulation's record. Anything else is refused, and so is a
  training run's folder (its checkpoints are hours of work; a run is continued, never replaced)
  and an output of another kind (an export never replaces a dataset).
- A folder is written under a temporary name beside the target and renamed into place at the
  end, so a failed or interrupted command leaves nothing under the final name. The rename never
  replaces a folder that appeared meanwhile (another run to the same ``--out``): that run's
  result stands and this one reports it. The temporary name carries its writer's host and pid,
  so a later command clears what a killed writer left, and never a live writer's folder.
- A training run's folder takes only a run of its own kind: ``gan train`` never trains into a
  segmentation run, nor ``seg train`` into a GAN run or any other output.
- A name a user gives (a study's, a dataset's, a job's) names one folder: ``check_name``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from defectforge.core import store_outputs
from defectforge.core.errors import ConfigError, DataError
from defectforge.core.files import (
    UMASK,
    package_version,
    private_folder,
    remove_dead_writers,
    scratch_folder,
    write_json_atomic,
)
from defectforge.core.storage import Location, is_uri

OUTPUT_RECORD = "defectforge.json"
# The output kinds that hold a training run's checkpoints (`prepare_run_folder`).
SEG_RUN, GAN_RUN = "segmentation run", "GAN run"
DATASET, EXPORT, PREDICTIONS = "dataset", "export", "predictions"
# The kind `publish_dir` records when told none: any kind may replace such a folder.
ANY_KIND = "output"
TRAINING_RUN_KINDS = (SEG_RUN, GAN_RUN)
# Artefacts of earlier versions, written before every output carried OUTPUT_RECORD.
EARLIER_ARTEFACTS = {
    "manifest.json": "schema_version",
    "model.json": "format",
    "simulation.json": "simulated",
}
EARLIER_KINDS = {"manifest.json": DATASET, "model.json": EXPORT}
# The weights that tell an earlier version's run (no OUTPUT_RECORD) for what it is.
EARLIER_RUN_WEIGHTS = {"model.pt": SEG_RUN, "generator.pt": GAN_RUN}
STAGING, SCRATCH = "partial", "scratch"
# File systems take 255 bytes per name; folders add a prefix or suffix to a study's name.
MAX_NAME_BYTES = 200
NAME_RULE = (
    "one folder's name (not empty, no / or \\, not . or .., no control characters, at most "
    f"{MAX_NAME_BYTES} bytes)"
)


def name_problem(name: str) -> str:
    """What keeps ``name`` from naming one folder under the place it is used; "" if nothing."""
    if not name.strip():
        return "is empty"
    if "/" in name or "\\" in name:
        return "holds a path separator, so it would name a folder elsewhere"
    if name in (".", ".."):
        return "names the folder it is in, or the one above, instead of a new one"
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "holds a control character"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes, which file systems refuse in a folder name"
    return ""


def check_name(name: str, flag: str) -> str:
    """``name``, given as ``flag``; refused in one line unless it names one folder."""
    problem = name_problem(name)
    if problem:
        raise ConfigError(f"{flag} {name!r}: {problem}; give {NAME_RULE}")
    return name


def is_within(path: Path, folder: Path) -> bool:
    """True if ``path`` is ``folder`` or lies below it (both resolved)."""
    return path == folder or folder in path.parents


def check_not_over_inputs(out: Path, inputs: tuple[str | Path, ...], flag: str = "--out") -> None:
    """Refuse an output folder that is, contains, or lies inside one of the inputs."""
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
        if is_within(out, source):
            raise DataError(
                out,
                f"{flag} lies inside the input {source}, so the next command that reads "
                f"{source} would take this output for input data",
                f"choose an {flag} outside {source}",
            )


def written_by_defectforge(folder: Path) -> bool:
    """Whether ``folder`` holds an output record (or an earlier version's artefact)."""
    if (folder / OUTPUT_RECORD).is_file():
        return True
    return any(written_by_defectforge_as(folder, name) for name in EARLIER_ARTEFACTS)


def written_by_defectforge_as(folder: Path, artefact: str) -> bool:
    """Whether ``folder`` holds the earlier version's ``artefact`` (with its telling key)."""
    path = folder / artefact
    if not path.is_file():
        return False
    with contextlib.suppress(OSError, ValueError):
        return EARLIER_ARTEFACTS[artefact] in json.loads(path.read_text())
    return False


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output(
    out: str | Path,
    overwrite: bool,
    inputs: tuple = (),
    flag: str = "--out",
    kind: str | None = None,
) -> Path | Location:
    """The resolved output folder, after the rules in this module's docstring (on a store:
    ``core.store_outputs``); ``kind``: what will be written there (None: any kind may go)."""
    if is_uri(out):
        target = store_outputs.check_output(
            Location.of(out), overwrite, inputs, flag, OUTPUT_RECORD, TRAINING_RUN_KINDS
        )
        refuse_another_kind(target, store_outputs.recorded_kind(target, OUTPUT_RECORD), kind, flag)
        return target
    final = Path(out).expanduser().resolve()
    check_not_over_inputs(final, inputs, flag)
    if final.exists() and not final.is_dir():
        raise DataError(final, f"{flag} is a file, not a folder", f"choose another {flag}")
    if not final.exists() or _is_empty_folder(final):
        return final
    if _is_training_run(final):
        # Said whatever the flags: advising --overwrite here would only lead to this refusal.
        raise DataError(
            final,
            "--overwrite never replaces a training run's folder (its checkpoints would go)",
            f"choose another {flag}, or move the run away yourself",
        )
    if not written_by_defectforge(final):
        # Said whatever the flags, as above.
        raise DataError(
            final,
            f"output folder already exists, and --overwrite replaces only folders defectforge "
            f"wrote: this one has no {OUTPUT_RECORD} (nor a dataset manifest or export record)",
            f"choose another {flag}, or move the folder away yourself",
        )
    if not overwrite:
        raise DataError(
            final, "output folder already exists", f"pass --overwrite or choose another {flag}"
        )
    refuse_another_kind(final, _recorded_kind(final) or _earlier_kind(final), kind, flag)
    return final


def refuse_another_kind(final, old: str | None, new: str | None, flag: str) -> None:
    """``--overwrite`` of an output by one of another kind (an export over a dataset) would
    lose what the folder held to a typo; an output of no known kind may be replaced."""
    if new and old and old != new and old != ANY_KIND:
        raise DataError(
            final,
            f"--overwrite replaces only an output of the same kind, and this folder holds "
            f"{_a(old)}, not {_a(new)}",
            f"choose another {flag}, or move the {old} away yourself",
        )


def _a(kind: str) -> str:
    if kind == PREDICTIONS:  # a plural: "a predictions" read wrong
        return "predictions"
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _earlier_kind(folder: Path) -> str | None:
    """The kind of an earlier version's dataset or export (no output record), by its artefact."""
    for name, kind in EARLIER_KINDS.items():
        if written_by_defectforge_as(folder, name):
            return kind
    return None


def _is_training_run(folder: Path) -> bool:
    """A `seg train` / `gan train` folder: its record says so, or (earlier versions) it holds
    Ray Train storage."""
    return _recorded_kind(folder) in TRAINING_RUN_KINDS or (folder / "ray").is_dir()


def _recorded_kind(folder: Path) -> str | None:
    """The kind in the folder's output record; None without a readable one."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads((folder / OUTPUT_RECORD).read_text()).get("kind")
    return None


def kind_of(folder: Path) -> str | None:
    """What defectforge wrote in ``folder``: its record's kind, or for an earlier version's run
    the kind its weights show; None if neither tells."""
    kind = _recorded_kind(folder)
    if kind is not None:
        return kind
    found = [kind for name, kind in EARLIER_RUN_WEIGHTS.items() if (folder / name).is_file()]
    return found[0] if len(found) == 1 else None


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
    kind: str = ANY_KIND,
    flag: str = "--out",
) -> Iterator[Path]:
    """Yield a staging folder beside ``final``; when the block succeeds, write the output record
    and rename the folder to ``final``. On failure nothing under ``final`` changes. On a store
    the staging folder is local and uploaded, the record last (``store_outputs.publish``)."""
    if is_uri(final):
        target = check_output(final, overwrite, inputs, flag, kind)
        with store_outputs.publish(
            target, overwrite, OUTPUT_RECORD, output_record(kind), flag
        ) as staging:
            yield staging
        return
    final = check_output(final, overwrite, inputs, flag, kind)
    staging = new_staging(final, STAGING)
    # mkdtemp makes a private (0700) folder; the published one gets ordinary permissions.
    staging.chmod(0o777 & ~UMASK)
    try:
        yield staging
        write_json_atomic(staging / OUTPUT_RECORD, output_record(kind))
        _move_into_place(staging, final, overwrite, flag)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def new_staging(final: Path, what: str) -> Path:
    """A new private folder ``.<final's name>.<what>-<host>-<pid>-<random>`` beside ``final``,
    after clearing the ones of its kind that a killed writer on this host left in that folder,
    for any output there: a SIGKILL (an out-of-memory kill, a container's stop timeout) leaves
    one, and the same --out may never be written again."""
    final.parent.mkdir(parents=True, exist_ok=True)
    marker = f".{what}-"
    leftovers = final.parent.glob(f".*{marker}*")
    others = {name[: name.rindex(marker) + len(marker)] for name in (p.name for p in leftovers)}
    for prefix in others - {f".{final.name}{marker}"}:  # its own: private_folder clears them
        remove_dead_writers(final.parent, prefix)
    return private_folder(final.parent, f".{final.name}{marker}")


@contextlib.contextmanager
def scratch_beside(final: str | Path) -> Iterator[Path]:
    """A scratch folder beside ``final`` (on its file system, so results move by rename),
    removed on leaving; one a killed command left is cleared by the next one. For an output on
    a store, a local temporary folder (results are uploaded from it anyway)."""
    if is_uri(final):
        with scratch_folder("scratch") as scratch:
            yield Path(scratch)
        return
    scratch = new_staging(Path(final).expanduser().resolve(), SCRATCH)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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


def check_run_folder(out: str | Path, kind: str, inputs: tuple = ()) -> Path | Location:
    """A training run's folder (written in place, resumable) for a run of ``kind``, resolved:
    refused if it is over an input, a file, or a non-empty folder that is not a defectforge run
    or holds another kind of output (a GAN run for a segmentation run, a dataset)."""
    if is_uri(out):
        return store_outputs.check_run_folder(Location.of(out), kind, inputs, OUTPUT_RECORD)
    folder = Path(out).expanduser().resolve()
    check_not_over_inputs(folder, inputs)
    if folder.exists() and not folder.is_dir():
        raise DataError(folder, "--out is a file, not a folder", "choose another --out")
    if not folder.is_dir() or _is_empty_folder(folder):
        return folder
    if not _is_run(folder):
        raise DataError(
            folder,
            f"--out holds files that are not a defectforge run (no {OUTPUT_RECORD})",
            "choose a new or empty --out, or the folder of an earlier run to continue it",
        )
    found = kind_of(folder)
    if found is not None and found != kind:
        raise DataError(
            folder,
            f"--out holds a {found}, not a {kind}; training into it would overwrite its files",
            f"choose a new or empty --out, or the folder of an earlier {kind} to continue it",
        )
    return folder


def prepare_run_folder(out: str | Path, kind: str, inputs: tuple = ()) -> Path | Location:
    """The checked run folder, created with its output record (``kind``: one of
    ``TRAINING_RUN_KINDS``, which no --overwrite replaces). Call it after every other input
    check, so a refused command leaves no folder behind."""
    if kind not in TRAINING_RUN_KINDS:
        raise ValueError(f"{kind!r} is not one of {TRAINING_RUN_KINDS}")
    folder = check_run_folder(out, kind, inputs)
    if isinstance(folder, Location):
        if not (folder / OUTPUT_RECORD).is_file():
            (folder / OUTPUT_RECORD).write_json(output_record(kind))
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / OUTPUT_RECORD).is_file():
        write_json_atomic(folder / OUTPUT_RECORD, output_record(kind))
    return folder


def _is_run(folder: Path) -> bool:
    # Runs of earlier versions carry no record but always a config.json or Ray storage.
    return written_by_defectforge(folder) or (folder / "config.json").is_file()
