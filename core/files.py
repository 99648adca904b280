"""Small file conventions every component shares: atomic writes, JSON, run files, weights."""

from __future__ import annotations

import contextlib
import glob
import importlib.metadata
import io
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from defectforge.core.errors import DataError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which races with other threads.
UMASK = _read_umask()


# Scratch folders carry their host and process: a process that was killed (a trial Ray stopped,
# a driver ended with SIGKILL) cannot remove its own, and each can be up to a checkpoint in size.
SCRATCH_PREFIX = "defectforge-"


def scratch_path(kind: str, within: str | Path | None = None) -> Path:
    """A new ``private_folder`` (in ``within``, else the system's temporary folder), named
    ``defectforge-HOST-PID-RANDOM.KIND``, that the caller removes."""
    if not kind.isalpha():
        raise ValueError(f"scratch kind {kind!r}: letters only, or its name would not parse")
    parent = Path(within or tempfile.gettempdir())
    return private_folder(parent, SCRATCH_PREFIX, suffix=f".{kind}")


@contextlib.contextmanager
def scratch_folder(kind: str, within: str | Path | None = None) -> Iterator[str]:
    """``scratch_path`` for the block's duration."""
    folder = scratch_path(kind, within)
    try:
        yield str(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def package_version() -> str:
    """The installed defectforge version ("unknown" when run from a bare source tree)."""
    try:
        return importlib.metadata.version("defectforge")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def declared_requirements(extras: tuple[str, ...] = ()) -> list:
    """The installed defectforge's requirements that apply with ``extras`` (pyproject's base
    dependencies and those extras'), as ``packaging`` Requirements without their markers."""
    from packaging.requirements import Requirement

    found = []
    for line in importlib.metadata.requires("defectforge") or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras):
            requirement.marker = None
            found.append(requirement)
    return found


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(temp_path)`` in ``path``'s folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def pyplot():
    """matplotlib's pyplot on its file-only backend, imported when a figure is first drawn: a
    process that never draws (a trial's worker) does not pay for the import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(figure, path: str | Path) -> Path:
    """A matplotlib figure as a PNG, written atomically; the figure is closed."""
    plt = pyplot()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(figure)
    return Path(path)


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def require_files(folder: str | Path, names: tuple[str, ...], written_by: str) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise DataError(
            folder, "does not exist", f"check the path: pass a run folder written by `{written_by}`"
        )
    for name in names:
        if not (folder / name).is_file():
            raise DataError(
                folder / name,
                "missing",
                f"pass a run folder written by `{written_by}` (or one of its checkpoints)",
            )
    return folder


def load_state_dict_file(path: Path | str, what: str, data: bytes | None = None) -> dict:
    """A weights file loaded safely (tensors only); a damaged or foreign file is a DataError.
    ``data``: the file's bytes, where they were read from object storage."""
    import torch  # here, not above: most users of this module never touch weights

    try:
        source = io.BytesIO(data) if data is not None else path
        state = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(path, f"{what} file not found", "check the path") from None
    except Exception:  # noqa: BLE001 - torch raises many types; all mean "not a weights file"
        # torch's own message suggests weights_only=False, which would run code from the file.
        raise DataError(
            path,
            f"{what} file is damaged or not a PyTorch state dict (truncated, tampered, or "
            "written by something else)",
            "copy it again from where it was trained, or retrain",
        ) from None
    if not isinstance(state, dict):
        raise DataError(path, f"{what} file holds no state dict", "retrain to write a new one")
    return state


# Every trainer's resumable state inside a checkpoint (seg and GAN; a resume looks for it).
STATE_FILE = "state.pt"


def _writer_host() -> str:
    """This machine as writers' names give it: its host name and, where Linux says, its
    process-id namespace. Containers that share a host name and a folder (host networking, a
    mounted /tmp) each see only their own processes: one must never judge another's pids."""
    host = socket.gethostname()
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return host
    return f"{host}.pidns{namespace.removeprefix('pid:[').removesuffix(']')}"


# Who is writing: staging folders and marks are named PREFIX + HOST-PID-RANDOM.
WRITER_HOST = _writer_host()


def writer_of(name: str, prefix: str) -> tuple[str, int] | None:
    """(host, pid) from the name of a writer's staging folder or mark (``PREFIX``HOST-PID-RANDOM);
    None for another name."""
    if not name.startswith(prefix):
        return None
    host, pid, _random = (name[len(prefix) :].rsplit("-", 2) + ["", ""])[:3]
    return (host, int(pid)) if pid.isdigit() else None


def private_folder(parent: Path, prefix: str, suffix: str = "") -> Path:
    """A new private folder ``PREFIX<host>-<pid>-<random>SUFFIX`` in ``parent``, after removing
    those of ``prefix`` that a process of this host, now gone, left there."""
    remove_dead_writers(parent, prefix)
    writer = f"{prefix}{WRITER_HOST}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=writer, suffix=suffix, dir=parent))


def remove_dead_writers(parent: Path, prefix: str) -> list[Path]:
    """Remove the ``private_folder``s of ``prefix`` in ``parent`` whose process, on this host,
    is gone. Folders of other hosts (shared storage, another container's process-id namespace)
    and of earlier versions are left alone. Returns the folders removed."""
    removed = []
    for folder in parent.glob(f"{glob.escape(prefix)}*"):
        writer = writer_of(folder.name, prefix)
        if writer is None or writer[0] != WRITER_HOST or not folder.is_dir():
            continue
        if not process_alive(writer[1]):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host. A dead writer's pid taken by a new process
    keeps its folder until that process ends: never removing a live writer's folder matters
    more than clearing every leftover at once."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    except OverflowError:
        pass  # no such pid can exist; kept, as the name is not one we made
    return True
