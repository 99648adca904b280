"""Where defectforge reads and writes: a local folder or a prefix on object storage, alike.

Every location a user gives (``--out``, ``--data``, ``--model``, a spec's ``storage_path`` and
dataset paths) may be a local path or ``s3://bucket/prefix`` / ``gs://bucket/prefix``: a real
cluster has no folder every node sees. A ``Location`` reads and writes either through a pyarrow
filesystem. Credentials come only from the standard places pyarrow and the cloud SDKs read
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for an S3-compatible
server, an instance role, ``GOOGLE_APPLICATION_CREDENTIALS``); a location is only ever written
down as its URI, which holds none.

Object storage has no rename, so a folder there counts as written once its completion record (a
dataset's manifest, an output's ``defectforge.json``, an epoch's metrics) is there: it is
uploaded after every other file (``upload``).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from defectforge.core.errors import UserError
from defectforge.core.files import atomic_write, scratch_folder

SCHEMES = ("s3", "gs")
# "s3:/bucket/x", "gs:bucket": a store location with a slash missing, which a path would take.
MISTYPED_URI = re.compile(r"^(s3|gs):(?!//)", re.IGNORECASE)


class StorageError(UserError):
    """A location that cannot be read or written as asked: one line naming it and the fix."""


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def absolute_location(location: str | Path) -> str:
    """A local path made absolute (``~`` expanded; ``file://`` is one); a URI, or "", as given
    (no trailing /)."""
    text = str(location).removeprefix("file://")
    if not text or is_uri(text):
        return text.rstrip("/")
    if MISTYPED_URI.match(text):
        raise StorageError(
            f"{text}: a store location missing a slash would be a local folder named "
            f"{text.split('/')[0]!r}; write {text.split(':')[0].lower()}://bucket/prefix"
        )
    return str(Path(text).expanduser().resolve())


def _check_uri(text: str) -> None:
    """Refuse a URI our schemes do not cover, or one holding credentials or options: a
    location is written into specs, manifests and logs."""
    parts = urlsplit(text)
    if parts.scheme not in SCHEMES:
        raise StorageError(
            f"{parts.scheme}://...: unknown storage scheme; use a local path, "
            "s3://bucket/prefix or gs://bucket/prefix"
        )
    if not text.startswith(f"{parts.scheme}://"):
        raise StorageError(
            f"{text}: write the scheme in lower case ({parts.scheme}://...), as the stores' "
            "clients read it"
        )
    if not parts.netloc:
        raise StorageError(f"{text}: no bucket named; write {parts.scheme}://bucket/prefix")
    if parts.path and {"", ".", ".."} & set(parts.path.removeprefix("/").split("/")):
        raise StorageError(
            f"{text}: an empty, '.' or '..' part names another key on a store than it seems; "
            "write the location without it"
        )
    if "@" in parts.netloc or parts.query:
        raise StorageError(
            f"{parts.scheme}://***: a location holding credentials or options would be written "
            f"into specs, manifests and logs; give the bare {parts.scheme}://bucket/prefix, and "
            "credentials and endpoint through AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
            "AWS_ENDPOINT_URL (or a role, or GOOGLE_APPLICATION_CREDENTIALS)"
        )


REFUSED = "the store refused the credentials"


def _problem(err: Exception) -> tuple[str, str]:
    """What went wrong with a store, and the fix, from pyarrow's message."""
    text = str(err)
    # The same refusal is spelt ACCESS_DENIED, AccessDenied, SignatureDoesNotMatch, ... by stores.
    squashed = text.upper().replace("_", "")
    refusals = (
        "ACCESSDENIED",
        "INVALIDACCESSKEYID",
        "SIGNATUREDOESNOTMATCH",
        "FORBIDDEN",
        "EXPIREDTOKEN",
        "INVALIDTOKEN",
        "PERMISSIONDENIED",
        "UNAUTHENTICATED",
    )
    if any(code in squashed for code in refusals):
        return (
            REFUSED,
            "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the node's role, or "
            "GOOGLE_APPLICATION_CREDENTIALS) and that their policy allows this location",
        )
    if "NETWORK_CONNECTION" in text or "Could not connect" in text or "resolve host" in text:
        return (
            "the store cannot be reached",
            "check the endpoint (AWS_ENDPOINT_URL for an S3-compatible server) and the network",
        )
    if "NOSUCHBUCKET" in squashed:
        return "the bucket does not exist", "create the bucket or correct the URI"
    return f"the store failed: {text.splitlines()[0][:200]}", "check the location and the store"


@contextlib.contextmanager
def store_errors(location: str, node: str = "") -> Iterator[None]:
    """Turn a store's OSError into one line naming the location (and the node it ran on)."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as err:
        if not is_uri(location):
            raise
        problem, fix = _problem(err)
        where = f" (from node {node})" if node else ""
        raise StorageError(f"{location}: {problem}{where}; {fix}") from None


@dataclass(frozen=True)
class Location:
    """A folder or file: an absolute local path or a URI (``s3://bucket/prefix``)."""

    uri: str

    @classmethod
    def of(cls, location: str | Path | Location) -> Location:
        if isinstance(location, Location):
            return location
        text = absolute_location(location)
        if is_uri(text):
            _check_uri(text)
        return cls(text)

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        """A local location works wherever a path does (``open``, ``Path``, ``os``)."""
        if self.remote:
            raise TypeError(f"{self.uri} is on a store, not a local path")
        return self.uri

    def __truediv__(self, name: str) -> Location:
        return Location(f"{self.uri}/{name}")

    @property
    def remote(self) -> bool:
        return is_uri(self.uri)

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.uri.rsplit("/", 1)[0])

    @cached_property
    def _fs_and_path(self) -> tuple[pafs.FileSystem, str]:
        if not self.remote:
            return pafs.LocalFileSystem(), self.uri
        with store_errors(self.uri):
            return pafs.FileSystem.from_uri(self.uri)

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self._fs_and_path[0]

    @property
    def path(self) -> str:
        """The path on ``filesystem`` (a bucket-relative key on a store)."""
        return self._fs_and_path[1]

    @property
    def local(self) -> Path:
        if self.remote:
            raise ValueError(f"{self.uri} is not a local path")
        return Path(self.uri)

    # --- what is there -------------------------------------------------------------------------

    def _info(self) -> pafs.FileInfo:
        with store_errors(self.uri):
            return self.filesystem.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def listing(self, recursive: bool = False) -> list[pafs.FileInfo]:
        """What is under this folder (nothing if it is not there), sorted by path."""
        with store_errors(self.uri):
            infos = self.filesystem.get_file_info(
                pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True)
            )
        return sorted(infos, key=lambda info: info.path)

    def relative(self, info: pafs.FileInfo) -> str:
        """A listed entry's path relative to this folder."""
        return info.path[len(self.path) :].lstrip("/")

    def children(self) -> list[str]:
        """Names directly under this folder, sorted (none if it is not there)."""
        return sorted(info.base_name for info in self.listing())

    def subfolders(self) -> list[str]:
        return sorted(
            info.base_name for info in self.listing() if info.type == pafs.FileType.Directory
        )

    def files(self, suffix: str = "") -> list[Location]:
        """Files directly in this folder whose names end with ``suffix``, sorted."""
        return [
            self / info.base_name
            for info in sorted(self.listing(), key=lambda i: i.base_name)
            if info.type == pafs.FileType.File and info.base_name.endswith(suffix)
        ]

    def all_files(self) -> set[str]:
        """Every file below this folder, as paths relative to it."""
        return {
            self.relative(info)
            for info in self.listing(recursive=True)
            if info.type == pafs.FileType.File
        }

    def is_empty_folder(self) -> bool:
        return self.is_dir() and not self.children()

    # --- reading and writing -------------------------------------------------------------------

    def read_bytes(self) -> bytes:
        with store_errors(self.uri), self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self) -> Any:
        return json.loads(self.read_text())

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file at once: renamed into place on a disk, one upload on a store
        (an object appears whole or not at all)."""
        if not self.remote:
            atomic_write(self.local, lambda tmp: Path(tmp).write_bytes(data))
            return
        with store_errors(self.uri), self.filesystem.open_output_stream(self.path) as stream:
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_json(self, payload: Any) -> None:
        self.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")

    def make_folder(self) -> None:
        """Create the folder (a no-op on a store, where folders are key prefixes)."""
        if not self.remote:
            self.local.mkdir(parents=True, exist_ok=True)

    def delete(self) -> None:
        """Delete this folder or file and everything below it (nothing if it is not there)."""
        info = self._info()
        with store_errors(self.uri):
            if info.type == pafs.FileType.Directory:
                self.filesystem.delete_dir(self.path)
            elif info.type == pafs.FileType.File:
                self.filesystem.delete_file(self.path)

    def upload(self, folder: str | Path, last: str = "") -> None:
        """Copy every file of the local ``folder`` here, the file named ``last`` after all the
        others: its presence then says the copy is whole."""
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p.relative_to(folder).as_posix() == last):
            target = self / path.relative_to(folder).as_posix()
            if self.remote:
                with store_errors(self.uri):
                    pafs.copy_files(
                        str(path),
                        target.path,
                        source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.filesystem,
                    )
            else:
                target.local.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(target.local, lambda tmp, source=path: shutil.copyfile(source, tmp))

    def download(self, folder: str | Path) -> Path:
        """Copy this folder (or file) into the local ``folder``; returns where it now is."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with store_errors(self.uri):
            if self.is_file():
                target = folder / self.name
                target.write_bytes(self.read_bytes())
                return target
            pafs.copy_files(
                self.path,
                str(folder),
                source_filesystem=self.filesystem,
                destination_filesystem=pafs.LocalFileSystem(),
            )
        return folder

    @contextlib.contextmanager
    def as_local_folder(self, scratch: str | Path | None = None) -> Iterator[Path]:
        """This folder as a local one: itself on a disk, else a copy in a temporary folder (or
        in ``scratch``) for the block's duration."""
        if not self.remote:
            yield self.local
            return
        with scratch_folder("copy", scratch) as tmp:
            yield self.download(Path(tmp) / self.name)

    def require_bucket(self, node: str = "") -> None:
        """On a store, one line if its bucket does not exist: what is looked for there would
        otherwise be "not found" (or "not a dataset") without saying why."""
        if not self.remote:
            return
        bucket = self.path.split("/", 1)[0]
        where = f" (from node {node})" if node else ""
        with store_errors(self.uri, node):
            if _bucket_missing(self.filesystem, bucket):
                raise StorageError(
                    f"{self.uri}: the bucket {bucket} does not exist{where}; create it or "
                    "correct the URI"
                )

    def check_writable(self, node: str = "") -> None:
        """Write, read back and delete a probe here: one line naming the location (and the node)
        when the store refuses the credentials, cannot be reached, or has no such bucket."""
        if not self.remote:
            return
        self.require_bucket(node)
        fs = self.filesystem
        probe = f"{self.path}/.defectforge-probe-{uuid.uuid4().hex}"
        where = f" (from node {node})" if node else ""
        with store_errors(self.uri, node):
            with fs.open_output_stream(probe) as stream:
                stream.write(b"defectforge")
            with fs.open_input_stream(probe) as stream:
                readable = stream.read() == b"defectforge"
            fs.delete_file(probe)
        if not readable:
            raise StorageError(
                f"{self.uri}: a probe written here read back wrong{where}; check the store"
            )


def _bucket_missing(fs: pafs.FileSystem, bucket: str) -> bool:
    """Whether the bucket is known not to exist. A policy that grants only a prefix refuses to
    say (HeadBucket is denied); the probe written under the prefix then decides."""
    try:
        return fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except OSError as err:
        if _problem(err)[0] == REFUSED:
            return False
        raise


CACHE_ENV = "DEFECTFORGE_CACHE"
CACHE_INDEX = ".defectforge-cache.json"


def cache_root() -> Path:
    """Where copies of models on a store are kept (``$DEFECTFORGE_CACHE``, else the user's
    cache folder)."""
    import os

    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "defectforge"
    return Path(os.environ.get(CACHE_ENV) or default)


def local_folder(location: str | Path | Location, recursive: bool = False) -> Path:
    """A local folder with this folder's files (and, ``recursive``, its subfolders'): itself
    on a disk; for a store, a copy in the cache (``cache_root``) made or refreshed now, file by
    file where a file's size or change time differs from the copied one, files gone from the
    store removed. Models, exports and runs load from here, so a node that shares no disk with
    the one that trained reads what it needs from the store."""
    import hashlib

    location = Location.of(location)
    if not location.remote:
        return location.local
    folder = cache_root() / hashlib.sha256(location.uri.encode()).hexdigest()[:24]
    folder.mkdir(parents=True, exist_ok=True)
    index_file = folder / CACHE_INDEX
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    infos = location.listing(recursive)
    if not infos:
        raise StorageError(f"{location.uri}: nothing is there; check the location")
    listed = {location.relative(info): info for info in infos if info.type == pafs.FileType.File}
    for gone in set(index) - set(listed):  # replaced on the store: no stale file may mix in
        (folder / gone).unlink(missing_ok=True)
        del index[gone]
    for relative, info in listed.items():
        stamp = [info.size, str(info.mtime)]
        target = folder / relative
        if index.get(relative) != stamp or not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            data = (location / relative).read_bytes()
            atomic_write(target, lambda tmp, data=data: Path(tmp).write_bytes(data))
            index[relative] = stamp
    atomic_write(index_file, lambda tmp: Path(tmp).write_text(json.dumps(index)))
    return folder
