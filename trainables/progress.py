"""What a training run shows while it runs: a progress bar on the driver, TensorBoard events.

Rank 0 of a run appends each report to ``RUN/progress.jsonl`` and to TensorBoard event files in
``RUN/tensorboard/`` (``tensorboard --logdir RUN``). The driver, which waits for the run in
``runtime.fit``, reads the new lines every half second into one tqdm bar, so the terminal shows
a bar and defectforge's own summary lines, not Ray's (those stay in Ray's log files unless
``--verbose``), and hands them to its listeners (``--mlflow``'s tracking logs them).

A run folder on object storage (``s3://``, ``gs://``) has no appendable files and may be on no
disk of the worker's node: rank 0 then keeps both files in a local folder of its own and uploads
them whole after every report, and the driver reads the progress file from the store, at most
every few seconds.
"""

from __future__ import annotations

import json
import shutil
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from defectforge.core.files import scratch_path
from defectforge.core.storage import Location

PROGRESS_FILE = "progress.jsonl"
BOARD_DIR = "tensorboard"
# How often the driver reads a progress file on object storage (each read is a request).
REMOTE_POLL_SECONDS = 3.0
# How often rank 0 uploads its TensorBoard files to a store between images.
BOARD_UPLOAD_SECONDS = 60.0


def _numbers(metrics: dict) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


class RunRecorder:
    """Rank 0's side: one JSON line and one set of TensorBoard scalars per report."""

    def __init__(self, run: str | Path | Location):
        self.run = Location.of(run)
        # Where the files are written: the run folder itself, or a local mirror for a store.
        if self.run.remote:
            self.local = scratch_path("progress")
            weakref.finalize(self, shutil.rmtree, self.local, True)
        else:
            self.local = self.run.local
        if self.run.remote and (self.run / PROGRESS_FILE).exists():
            (self.local / PROGRESS_FILE).write_bytes((self.run / PROGRESS_FILE).read_bytes())
        self._writer = None
        self._board_uploaded = 0.0

    def _board(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.local / BOARD_DIR))
        return self._writer

    def record(self, metrics: dict, step: int, image: Path | None = None) -> None:
        with open(self.local / PROGRESS_FILE, "a") as handle:
            handle.write(json.dumps(_numbers(metrics)) + "\n")
        board = self._board()
        for key, value in _numbers(metrics).items():
            board.add_scalar(key, value, step)
        if image is not None:
            self._add_image(image, step)
        board.flush()
        self._upload(board_too=image is not None)

    def image(self, path: Path, step: int) -> None:
        """A PNG file (a sample grid, the validation grid) as a TensorBoard image."""
        self._add_image(path, step)
        self._board().flush()
        self._upload(board_too=True)

    def _add_image(self, path: Path, step: int) -> None:
        import cv2

        picture = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        self._board().add_image(path.stem, picture, step, dataformats="HWC")

    def _upload(self, board_too: bool) -> None:
        """To a store: the progress file every time, the (growing) TensorBoard files with each
        image and at most every BOARD_UPLOAD_SECONDS otherwise."""
        if not self.run.remote:
            return
        (self.run / PROGRESS_FILE).write_bytes((self.local / PROGRESS_FILE).read_bytes())
        now = time.monotonic()
        if board_too or now - self._board_uploaded >= BOARD_UPLOAD_SECONDS:
            (self.run / BOARD_DIR).upload(self.local / BOARD_DIR)
            self._board_uploaded = now


class ProgressBar:
    """The driver's side: a bar over ``total`` whose position and text come from the run's
    latest progress line."""

    def __init__(
        self,
        run: str | Path | Location,
        total: float,
        unit: str,
        position: Callable[[dict], float],
        describe: Callable[[dict], str],
        name: str = "train",
        listeners: tuple[Callable[[list[dict]], None], ...] = (),
    ):
        self.file = Location.of(run) / PROGRESS_FILE
        self.offset = len(self._text()) if self.file.is_file() else 0
        self.position, self.describe = position, describe
        # Each is handed every new progress record (MLflow tracking logs them).
        self.listeners = listeners
        self.last_read = 0.0
        self.started = False
        self.bar = tqdm(total=total, unit=unit, desc=name, dynamic_ncols=True)

    def _text(self, offset: int = 0) -> bytes:
        """The progress file from byte ``offset`` on (a store's object is read whole)."""
        if self.file.remote:
            return self.file.read_bytes()[offset:]
        with open(self.file.local, "rb") as handle:
            handle.seek(offset)
            return handle.read()

    def poll(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.file.remote and not force and now - self.last_read < REMOTE_POLL_SECONDS:
            return
        self.last_read = now
        if not self.file.is_file():
            return
        new = self._text(self.offset)
        complete = new[: new.rfind(b"\n") + 1]
        self.offset += len(complete)
        records = [json.loads(line) for line in complete.decode().splitlines()]
        if records and not self.started:
            # A continued run starts at its checkpoint: rate and time left count from its first
            # record, not as if the work before were done in this command's first seconds.
            self.started = True
            self.bar.initial = min(self.bar.total, self.position(records[0]))
        if records:
            latest = records[-1]
            self.bar.n = min(self.bar.total, self.position(latest))
            self.bar.set_postfix_str(self.describe(latest), refresh=False)
            self.bar.refresh()
        for listener in self.listeners:
            listener(records)

    def close(self) -> None:
        self.poll(force=True)
        self.bar.close()
