"""Command-line flags derived from config declarations (``core.config.option``).

A flag's name, type, default shown in ``--help``, choices and help text all come from the
option's one declaration. Flags not given are left out of the parsed arguments, so the config's
own default (or a profile's) applies, exactly as when the config is built in code.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import MISSING, Field
from typing import Any

from defectforge.core.config import LOCAL_ONLY, TypedConfig, field_types, scalar_type
from defectforge.core.storage import Location, StorageError, is_uri


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like every other error of the tool."""

    def error(self, message: str) -> typing.NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}; see {self.prog} --help\n")
        raise SystemExit(2)

    def parse_known_args(self, args=None, namespace=None):
        """A command's own parser names an option it does not know, and its own help: left to
        the top-level parser, `gan generate --masks` pointed at `defectforge --help`."""
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def absolute_path(text: str) -> str:
    """Paths leave the command line absolute: workers on a cluster run in other folders. A
    location on object storage (``s3://``, ``gs://``) is taken as given."""
    try:
        return Location.of(text).uri
    except StorageError as err:  # its own line: argparse's would repeat the text as given
        raise argparse.ArgumentTypeError(str(err)) from None


def local_path(text: str) -> str:
    """An absolute path on this machine. For inputs read only here (raw image folders, weights,
    token files, specs): a store location is refused at once rather than failing mid-run."""
    location = absolute_path(text)
    if is_uri(location):
        raise argparse.ArgumentTypeError(f"{text} is on object storage; {LOCAL_ONLY}")
    return location


def add_out(parser: argparse.ArgumentParser, what: str = "dataset folder to write") -> None:
    """``--out`` and ``--overwrite``, as every command that publishes a folder has them."""
    parser.add_argument("--out", required=True, type=absolute_path, help=what)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if defectforge wrote it (never another folder)",
    )


def continue_hint(out: str, checkpoints: str) -> str:
    """After Ctrl-C in a training run: what running the command again does, from what it kept
    (a run stopped before its first checkpoint starts over)."""
    from defectforge.trainables.runtime import latest_checkpoint_dir

    latest = latest_checkpoint_dir(Location.of(out) / "ray")
    if latest is None:
        return (
            f"no {checkpoints} was reached, so nothing is kept; run the same command to start over"
        )
    return f"run the same command again to continue from its latest {checkpoints} ({latest.name})"


def add_tracking(parser: argparse.ArgumentParser) -> None:
    """``--mlflow URL`` and ``--mlflow-experiment NAME`` (a training run logged to MLflow)."""
    parser.add_argument(
        "--mlflow",
        metavar="URL",
        type=_mlflow_url,
        help="log the run to this MLflow tracking server (http(s)://HOST:PORT; this machine "
        "reaches it): the config, every report's metrics, the published model and plots; "
        "needs defectforge[mlflow]",
    )
    parser.add_argument(
        "--mlflow-experiment",
        metavar="NAME",
        help="the run's MLflow experiment (default: 'defectforge <command>')",
    )


def _mlflow_url(text: str) -> str:
    """Checked as a spec's ``tracking.mlflow`` is."""
    from defectforge.core.errors import ConfigError
    from defectforge.studies.spec_schema import TrackingSpec

    try:
        return TrackingSpec(mlflow=text).mlflow
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def tracking_of(args: argparse.Namespace):
    """The ``TrackingSpec`` of ``--mlflow`` (None without it). mlflow is imported here, so a
    missing one is a one-line error before anything runs."""
    from defectforge.core.errors import ConfigError
    from defectforge.studies.spec_schema import TrackingSpec

    if not args.mlflow:
        if args.mlflow_experiment:
            raise ConfigError("--mlflow-experiment names an MLflow experiment: give --mlflow too")
        return None
    import mlflow  # noqa: F401

    return TrackingSpec(mlflow=args.mlflow, experiment=args.mlflow_experiment or "")


def flag_of(spec: Field) -> str:
    return spec.metadata.get("flag") or "--" + spec.name.replace("_", "-")


def _unwrapped(annotation: Any) -> Any:
    """``X`` for ``X | None``; the annotation itself otherwise."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _is_tuple(annotation: Any) -> bool:
    return typing.get_origin(_unwrapped(annotation)) is tuple


def _element_type(annotation: Any) -> type:
    inner = _unwrapped(annotation)
    return typing.get_args(inner)[0] if _is_tuple(annotation) else inner


def _reader(spec: Field, annotation: Any):
    """How the flag's text becomes the option's value."""
    if spec.metadata.get("parse"):
        return spec.metadata["parse"]
    if spec.metadata.get("path"):
        return local_path if spec.metadata["path"] == "local" else absolute_path
    element = _element_type(annotation)
    if not _is_tuple(annotation):
        return element

    def items(text: str) -> tuple:
        return tuple(element(part.strip()) for part in text.split(",") if part.strip())

    items.__name__ = f"comma-separated {element.__name__}"  # argparse names it in errors
    return items


def _metavar(spec: Field, annotation: Any) -> str:
    if spec.metadata.get("path"):
        return "PATH"
    name = {int: "N", float: "X", str: "NAME"}.get(_element_type(annotation), "VALUE")
    return f"{name},..." if _is_tuple(annotation) else name


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, TypedConfig):
        return "see the options above"
    return "none" if value is None or value == "" else str(value)


def _default_of(spec: Field, defaults: dict[str, Any] | None) -> tuple[Any, bool]:
    """(the default a flag stands for, whether it has one)."""
    if defaults and spec.name in defaults:
        return defaults[spec.name], True
    if spec.default is not MISSING:
        return spec.default, True
    if spec.default_factory is not MISSING:
        return spec.default_factory(), True
    return None, False


def _help(spec: Field, default: Any, profiles: dict[str, dict] | None) -> str:
    shown = f"default: {_shown(default)}"
    for name, values in (profiles or {}).items():
        if spec.name in values:
            shown += f"; {_shown(values[spec.name])} with --profile {name}"
    text = spec.metadata.get("help", "")
    return (f"{text} ({shown})" if text else f"({shown})").replace("%", "%%")


def _flagged(
    cls: type[TypedConfig], skip: tuple[str, ...], only: tuple[str, ...] | None
) -> list[Field]:
    """The options of ``cls`` a command takes: every command-line one, less ``skip``, or
    ``only`` the ones named."""
    return [
        spec
        for spec in cls.options()
        if spec.metadata.get("cli")
        and spec.name not in skip
        and (only is None or spec.name in only)
    ]


def add_options(
    parser: argparse.ArgumentParser,
    cls: type[TypedConfig],
    skip: tuple[str, ...] = (),
    prefix: str = "",
    profiles: dict[str, dict] | None = None,
    defaults: dict[str, Any] | None = None,
    only: tuple[str, ...] | None = None,
    required: tuple[str, ...] = (),
) -> None:
    """A flag for every command-line option of ``cls`` (not in ``skip``; or ``only`` those
    named). ``prefix`` names them ``--<prefix><name>``; ``profiles`` lists per-profile defaults
    in the help; ``defaults`` replaces a default for this command (shown as given: text such as
    "the calibrated one" is fine, the flag's value is still read by the option's type);
    ``required`` names options this command cannot do without."""
    hints = field_types(cls)
    for spec in _flagged(cls, skip, only):
        default, has_default = _default_of(spec, defaults)
        kwargs: dict[str, Any] = {
            "dest": prefix.replace("-", "_") + spec.name,
            "default": argparse.SUPPRESS,
            "help": _help(spec, default, profiles)
            if has_default and spec.name not in required
            else spec.metadata["help"],
        }
        kind, _ = scalar_type(hints[spec.name])
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _reader(spec, hints[spec.name])
            kwargs["metavar"] = spec.metadata.get("metavar") or _metavar(spec, hints[spec.name])
            if spec.metadata.get("choices"):
                kwargs["choices"] = spec.metadata["choices"]
                kwargs.pop("metavar")
            kwargs["required"] = not has_default or spec.name in required
        flag = flag_of(spec) if not prefix else f"--{prefix}{flag_of(spec)[2:]}"
        # Marked, so a test can tell a declared flag from one a command adds by hand.
        parser.add_argument(flag, **kwargs).declared_by = cls


def given(
    args: argparse.Namespace,
    cls: type[TypedConfig],
    prefix: str = "",
    skip: tuple = (),
    only: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """The options of ``cls`` the user gave on the command line, by name; ``skip`` and ``only``
    as for ``add_options``."""
    dest = prefix.replace("-", "_")
    return {
        spec.name: getattr(args, dest + spec.name)
        for spec in _flagged(cls, skip, only)
        if hasattr(args, dest + spec.name)
    }
