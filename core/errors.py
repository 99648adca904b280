"""The user-error hierarchy: mistakes in what a user gave, shown as one line.

Every exception a user can fix by changing their input derives from ``UserError``: the command
line prints it as ``defectforge: error: <message>`` and exits 2. Anything else is a bug in
defectforge and keeps its traceback. ``UserError`` is a ``ValueError`` so library callers that
catch bad values keep working.
"""

from __future__ import annotations

from pathlib import Path


class UserError(ValueError):
    """A problem with the user's input, settings or environment; ``str(err)`` is one line."""


class ConfigError(UserError):
    """An option or config value out of range, of the wrong type, or inconsistent."""


class ClusterError(UserError):
    """A cluster the user named cannot be used as asked (address, token, resources, storage)."""


class TrialsFailed(UserError):
    """Trials of a study ended in an error; each trial's traceback is kept in its folder and its
    last line in the study's report."""


class DataError(UserError):
    """Bad input data. ``str(err)`` is one line: ``<path>: <problem>; <fix>``."""

    def __init__(self, path: str | Path, problem: str, fix: str):
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {problem}; {fix}")

    def __reduce__(self):
        # Ray copies and pickles exceptions raised in workers; rebuild from the three parts.
        return type(self), (self.path, self.problem, self.fix)


def one_line(text: str) -> str:
    """``text`` folded onto one line (nested library messages may hold newlines)."""
    return " ".join(text.split())


def user_error_in(error: BaseException | None) -> UserError | None:
    """The ``UserError`` behind ``error``: itself, or the one Ray wrapped it in when it was raised
    inside a task, an actor or a Train worker; None if there is none."""
    pending, seen = [error], set()
    while pending:
        error = pending.pop(0)
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, UserError) and not _is_ray_wrapper(error):
            return error
        pending += [getattr(error, "cause", None), error.__cause__]
        pending.append(getattr(error, "controller_failure", None))  # Ray Train's driver side
        pending += list((getattr(error, "worker_failures", None) or {}).values())
    return None


def _is_ray_wrapper(error: BaseException) -> bool:
    # Ray re-raises a task's exception as a class deriving from both RayTaskError and the
    # original type; its message is a traceback, so the original (its ``cause``) is shown.
    return any(cls.__name__ in ("RayTaskError", "RayActorError") for cls in type(error).__mro__)
