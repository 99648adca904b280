"""A study's folder on a local disk or any pyarrow filesystem (s3://, gs://, file://).

Tune and Train write their own runs there; this class writes the study's own files (spec, trial
table, final result, report), each under a temporary name and then moved into place.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from defectforge.core.storage import is_uri


class StudyStore:
    def __init__(self, root: str):
        if is_uri(root):
            self.fs, self.path = pafs.FileSystem.from_uri(root)
            self.uri = root.rstrip("/")
        else:
            self.fs, self.path = pafs.LocalFileSystem(), str(Path(root).resolve())
            self.uri = self.path

    def location(self, relative: str) -> str:
        """Where ``relative`` lives, as Ray's storage_path wants it (URI or absolute path)."""
        return f"{self.uri}/{relative}"

    def _full(self, relative: str) -> str:
        return f"{self.path}/{relative}"

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self._full(relative)).type != pafs.FileType.NotFound

    def write_bytes(self, relative: str, data: bytes) -> None:
        target = self._full(relative)
        parent, name = target.rsplit("/", 1)
        self.fs.create_dir(parent, recursive=True)
        staging = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(staging) as stream:
            stream.write(data)
        self.fs.move(staging, target)

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode())

    def write_json(self, relative: str, payload: Any) -> None:
        self.write_text(relative, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")

    def read_text(self, relative: str) -> str:
        with self.fs.open_input_stream(self._full(relative)) as stream:
            return stream.read().decode()

    def read_json(self, relative: str) -> Any:
        return json.loads(self.read_text(relative))

    def upload_folder(self, local: str | Path, relative: str, last: str = "") -> None:
        """Copy every file of a local folder to ``relative``; ``last`` (a file name) is copied
        after all the others, so its presence says the folder is complete."""
        files = sorted(p for p in Path(local).rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p.name == last):
            self.write_bytes(f"{relative}/{path.relative_to(local).as_posix()}", path.read_bytes())

    def subfolders(self, relative: str) -> list[str]:
        """The names of the folders directly under ``relative`` (none if it is not there)."""
        selector = pafs.FileSelector(self._full(relative), allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def delete_folder(self, relative: str) -> None:
        self.fs.delete_dir(self._full(relative))

    def local_copy(self, location: str, scratch: str | Path) -> Path:
        """The folder at ``location`` as a local folder: itself on a local disk, else copied into
        ``scratch``. ``location`` is a URI, or a path on this store's filesystem (Ray Train
        gives checkpoint paths on s3 without the scheme)."""
        if is_uri(location):
            source, path = pafs.FileSystem.from_uri(location)
        elif is_uri(self.uri):
            source, path = self.fs, location
        else:
            return Path(location)
        local = pafs.LocalFileSystem()
        pafs.copy_files(path, str(scratch), source_filesystem=source, destination_filesystem=local)
        return Path(scratch)
