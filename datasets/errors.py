"""The one exception type for bad input: it names the file, the problem and the fix."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data. ``str(err)`` is one line: ``<path>: <problem>; <fix>``."""

    def __init__(self, path: str | Path, problem: str, fix: str):
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {problem}; {fix}")

    def __reduce__(self):
        # Ray copies and pickles exceptions raised in workers; rebuild from the three parts.
        return type(self), (self.path, self.problem, self.fix)
