"""What a training run shows while it runs: a progress bar on the driver, TensorBoard events.

Rank 0 of a run appends each report to ``RUN/progress.jsonl`` and to TensorBoard event files in
``RUN/tensorboard/`` (``tensorboard --logdir RUN``). The driver, which waits for the run in
``runtime.fit``, reads the new lines every half second into one tqdm bar, so the terminal shows
a bar and defectforge's own summary lines, not Ray's (those stay in Ray's log files unless
``--verbose``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

PROGRESS_FILE = "progress.jsonl"
BOARD_DIR = "tensorboard"


def _numbers(metrics: dict) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


class RunRecorder:
    """Rank 0's side: one JSON line and one set of TensorBoard scalars per report."""

    def __init__(self, run: str | Path):
        self.run = Path(run)
        self._writer = None

    def _board(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.run / BOARD_DIR))
        return self._writer

    def record(self, metrics: dict, step: int, image: Path | None = None) -> None:
        with open(self.run / PROGRESS_FILE, "a") as handle:
            handle.write(json.dumps(_numbers(metrics)) + "\n")
        board = self._board()
        for key, value in _numbers(metrics).items():
            board.add_scalar(key, value, step)
        if image is not None:
            self.image(image, step)
        board.flush()

    def image(self, path: Path, step: int) -> None:
        """A PNG file (a sample grid, the validation grid) as a TensorBoard image."""
        import cv2

        picture = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        self._board().add_image(path.stem, picture, step, dataformats="HWC")
        self._board().flush()


class ProgressBar:
    """The driver's side: a bar over ``total`` whose position and text come from the run's
    latest progress line."""

    def __init__(
        self,
        run: str | Path,
        total: float,
        unit: str,
        position: Callable[[dict], float],
        describe: Callable[[dict], str],
        name: str = "train",
    ):
        self.path = Path(run) / PROGRESS_FILE
        self.offset = self.path.stat().st_size if self.path.is_file() else 0
        self.position, self.describe = position, describe
        self.bar = tqdm(total=total, unit=unit, desc=name, dynamic_ncols=True)

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path) as handle:
            handle.seek(self.offset)
            lines = handle.readlines()
        complete = [line for line in lines if line.endswith("\n")]
        self.offset += sum(len(line.encode()) for line in complete)
        if complete:
            latest = json.loads(complete[-1])
            self.bar.n = min(self.bar.total, self.position(latest))
            self.bar.set_postfix_str(self.describe(latest), refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        self.poll()
        self.bar.close()
