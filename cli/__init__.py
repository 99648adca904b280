"""The ``defectforge`` command line: one module per command group, at the top of the stack.

Only the command being run has its options built and its modules imported: `predict` with an
export needs neither Ray nor segmentation-models-pytorch nor albumentations, as a production
line has none of them.

A mistake in what the user gave (any ``UserError``, also when Ray raised it inside a task or a
worker) prints one line, ``defectforge: error: <file>: <problem>; <fix>``, and exits 2. Ctrl-C
prints one line saying how to continue and exits 130. Anything else is a defect of defectforge
and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Read by Ray when it loads: joining a cluster without its token then fails at once with a
# reason, instead of retrying for 20 s. Token authentication stays on for local instances too.
os.environ.setdefault("RAY_AUTH_MODE", "token")

from defectforge.cli import cluster, data, gan, quickstart, seg, study, synth  # noqa: E402
from defectforge.cli.options import Parser  # noqa: E402
from defectforge.core.errors import UserError, one_line, user_error_in  # noqa: E402
from defectforge.core.files import package_version  # noqa: E402
from defectforge.core.interrupt import stop_on_sigterm_as_on_ctrl_c  # noqa: E402
from defectforge.trainables import VERBOSE_ENV  # noqa: E402

INTERRUPTED = 130
MODULES = (data, seg, gan, synth, study, quickstart, cluster)
# command -> the module that builds and runs it
COMMANDS = {name: module for module in MODULES for name in module.COMMANDS}


# The modules of an extra (pyproject.toml) a command may need and the install may lack.
TRAINING_MODULES = (
    "ray",
    "torch",
    "torchvision",
    "segmentation_models_pytorch",
    "albumentations",
    "optuna",
    "matplotlib",
    "tensorboardX",
    "scipy",
    "onnx",
    "onnxscript",
)
RUNTIME_MODULES = ("onnxruntime",)

# Options before the command that take a value (the value is not the command).
ROOT_VALUE_OPTIONS = ("--address",)


def _chosen(argv: list[str]) -> str | None:
    """The command: the first word that is neither an option nor a root option's value."""
    words = iter(argv)
    for word in words:
        if word in ROOT_VALUE_OPTIONS:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def parser(argv: list[str] | None = None) -> Parser:
    """The parser, with the options of the command in ``argv`` (every command's, if None)."""
    chosen = _chosen(argv) if argv is not None else None
    root = Parser(
        prog="defectforge",
        description="Few-shot defect segmentation: GAN-synthesised defects, pseudo-labels and "
        "Ray studies of the synthetic ratio.",
    )
    root.add_argument("--version", action="version", version=f"defectforge {package_version()}")
    root.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's own log lines and its workers' output (they are always in Ray's "
        "log files)",
    )
    root.add_argument(
        "--address",
        dest="ray_address",
        metavar="auto|ray://HOST:10001",
        help="run the command's Ray work on this running cluster (every stage command: data, "
        "seg, gan, synth, study); default: a local Ray started for the command",
    )
    commands = root.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, module in COMMANDS.items():
        text = module.COMMANDS[name]
        sub = commands.add_parser(name, help=text, description=text)
        if argv is None or name == chosen:
            module.build(name, sub)
    return root


def join_cluster(address: str) -> None:
    """Every Ray start of this process joins ``address`` (``ensure_ray`` reads RAY_ADDRESS),
    resolved and checked now, before the command does anything: ``auto`` becomes the user's
    own cluster, and an address nothing answers at is one line at once."""
    from defectforge.trainables.runtime import ray_address

    os.environ["RAY_ADDRESS"] = ray_address(address) or "local"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser(argv).parse_args(argv)
    except ModuleNotFoundError as err:
        return _not_installed(err)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    module = COMMANDS[args.command]
    try:
        if args.ray_address:
            join_cluster(args.ray_address)
        return module.run(args) or 0
    except KeyboardInterrupt:
        print(f"defectforge: interrupted; {_interrupted_hint(module, args)}", file=sys.stderr)
        return INTERRUPTED
    except ModuleNotFoundError as err:
        return _not_installed(err)
    except Exception as err:
        user_error = user_error_in(err)
        if user_error is None:
            raise
        print(f"defectforge: error: {one_line(str(user_error))}", file=sys.stderr)
        return 2


def _interrupted_hint(module, args) -> str:
    """What to do next after Ctrl-C. Making it may read the spec (`study run`), so a second
    Ctrl-C, or a spec gone meanwhile, can land here: the line then says the general thing."""
    try:
        return module.interrupted_hint(args)
    except (KeyboardInterrupt, UserError):
        return "run the command again (`study resume DIR` for a study)"


def _not_installed(err: ModuleNotFoundError) -> int:
    """One line naming the extra that brings a missing module; other missing modules are
    defects of the install or of defectforge, and keep their traceback."""
    missing = (err.name or "").split(".")[0]
    if missing in TRAINING_MODULES:
        fix = (
            "this command needs the training stack: pip install 'defectforge[train,cpu]' "
            "([train,gpu] on a CUDA machine)"
        )
    elif missing in RUNTIME_MODULES:
        fix = "pip install 'defectforge[cpu]' (or [gpu] on a CUDA machine)"
    elif missing == "mlflow":
        fix = "--mlflow or a spec's tracking needs it: pip install 'defectforge[mlflow]'"
    else:
        raise err
    print(f"defectforge: error: {missing} is not installed; {fix}", file=sys.stderr)
    return 2


def entry() -> None:
    """The process entry point (the ``defectforge`` script, ``python -m``): ``main``'s code.

    After Ctrl-C the run's thread may still be inside Ray (``runtime.fit``). Letting Python finalise
    around it shut Ray down under that thread and now and then ended in a segmentation fault
    instead of 130, so the process ends at once instead, with every process it started (a local
    Ray instance and its agents, data loaders). What the run wrote stays: the checkpoints it
    completed, which a resume starts from. A Ray Client session (``ray://``) is closed first,
    so the cluster stops the run now rather than after the client's reconnection grace period.
    """
    stop_on_sigterm_as_on_ctrl_c()
    code = main()
    if code == INTERRUPTED:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the ending
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        _close_client_session()
        _end_descendants()
        os._exit(code)
    sys.exit(code)


def _close_client_session() -> None:
    if "ray" not in sys.modules:
        return
    from ray.util.client import ray as client

    if client.is_connected():
        with contextlib.suppress(Exception):  # ending anyway; nothing to tell the user
            client.disconnect()


def _end_descendants() -> None:
    """Stop the whole tree first (a stopped process forks no more), then kill it: killing
    parent by parent would let orphans slip out of the tree."""
    stopped: set[int] = set()
    while new := set(_descendants(os.getpid())) - stopped:
        for pid in new:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
        stopped |= new
    for pid in stopped:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (Linux /proc; none found elsewhere). Ray's own fate sharing
    ends a local instance's raylet with its driver but leaves the raylet's agents running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (name) state ppid ...": the name may hold spaces and parentheses
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    found, waiting = [], [root]
    while waiting:
        below = children.get(waiting.pop(), [])
        found += below
        waiting += below
    return found
