"""A stop asked for with SIGTERM (``kill``, Slurm, Kubernetes, a stopped Ray Job) ends a command as
Ctrl-C does: one line, exit 130, what it was writing cleared, its checkpoints kept for a resume.
Without it SIGTERM ended Python at once, leaving a half-written staging folder beside the output,
and Ray's own handler (installed by ``ray.init``) aborted with a native stack trace."""

from __future__ import annotations

import signal
import threading


def stop_on_sigterm_as_on_ctrl_c() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread (again after ``ray.init``)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
