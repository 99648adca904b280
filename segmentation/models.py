"""Model factory over segmentation-models-pytorch: any architecture and encoder by name."""

from __future__ import annotations

import contextlib
import logging
import socket
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
from torch import nn

from defectforge.core.errors import ConfigError, DataError
from defectforge.core.files import load_state_dict_file
from defectforge.core.storage import Location, absolute_location

# smp's public name -> class mapping (names are lower-case class names).
ARCHITECTURES: dict[str, type[nn.Module]] = dict(smp.MODEL_ARCHITECTURES_MAPPING)


# PAN's feature-pyramid attention pools the stride-32 features three more times.
MIN_INPUT_SIZE = {"pan": 128}


def min_input_size(arch: str) -> int:
    return MIN_INPUT_SIZE.get(check_architecture(arch), 32)


def architecture_names() -> list[str]:
    return sorted(ARCHITECTURES)


def encoder_names() -> list[str]:
    return sorted(smp.encoders.get_encoder_names())


def check_architecture(arch: str) -> str:
    key = arch.lower().replace("_", "").replace("-", "")
    if key not in ARCHITECTURES:
        raise ConfigError(
            f"unknown architecture {arch!r}; valid: {', '.join(architecture_names())}"
        )
    return key


# smp's prefix for any timm model as an encoder (e.g. tu-xception41, dilated for DeepLabV3+).
TIMM_PREFIX = "tu-"


def _timm_has(name: str) -> bool:
    import timm  # installed with segmentation-models-pytorch

    return timm.is_model(name)


def check_encoder(encoder: str) -> str:
    if encoder in smp.encoders.get_encoder_names():
        return encoder
    if encoder.startswith(TIMM_PREFIX) and _timm_has(encoder[len(TIMM_PREFIX) :]):
        return encoder
    raise ConfigError(
        f"unknown encoder {encoder!r}; valid include resnet18, resnet34, efficientnet-b0, "
        f"mit_b0 (all: {len(encoder_names())} smp encoders) and tu-<any timm model>, e.g. "
        "tu-xception41"
    )


def build_model(
    arch: str, encoder: str, in_channels: int, num_classes: int, encoder_weights: str | None = None
) -> nn.Module:
    """A segmentation network returning logits ``N x num_classes x H x W``.

    ``encoder_weights``: None (random init), ``"imagenet"`` (downloaded by smp; needs network),
    or a ``.pt``/``.pth`` state dict for the encoder: a path, or a URI (``s3://...``).
    """
    if in_channels not in (1, 3):
        raise ConfigError(f"in_channels must be 1 or 3, got {in_channels}")
    local_file = names_weights_file(encoder_weights)
    hub = _hub_as_reachable() if encoder_weights == "imagenet" else contextlib.nullcontext()
    with hub as unreachable:
        try:
            model = smp.create_model(
                check_architecture(arch),
                encoder_name=check_encoder(encoder),
                in_channels=in_channels,
                classes=num_classes,
                encoder_weights=None if local_file else encoder_weights,
            )
        except Exception as err:  # noqa: BLE001 - a hub download fails in many ways
            if encoder_weights != "imagenet":
                raise
            # A download's failure (an OSError) is the unknown host's; any other, its own.
            if unreachable and isinstance(err, OSError):
                reason = unreachable
            else:
                reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            raise ConfigError(
                f"encoder_weights = 'imagenet': {encoder}'s weights could not be had from the "
                f"model hub ({reason}); give a local weights file, or none, on a machine without "
                "network"
            ) from None
    if local_file:
        load_encoder_weights(model, encoder_weights, in_channels)
    return model


@contextlib.contextmanager
def _hub_as_reachable():
    """Yields why the model hub is out of reach, or None. Where no name server knows the hub (a
    machine without network) and nothing is cached, the hub would retry for about 25 s before
    failing: it is asked offline instead, and fails at once. Its retry warnings are not
    printed either way: a refusal is one line."""
    from huggingface_hub import constants

    host = urlparse(constants.HUGGINGFACE_CO_URL_TEMPLATE).hostname
    unreachable = None if _may_reach(host) else f"{host} is not known here, nor the weights cached"
    hub_logger = logging.getLogger("huggingface_hub")
    level, offline = hub_logger.level, constants.HF_HUB_OFFLINE
    hub_logger.setLevel(logging.ERROR)
    constants.HF_HUB_OFFLINE = offline or unreachable is not None
    try:
        yield unreachable
    finally:
        constants.HF_HUB_OFFLINE = offline
        hub_logger.setLevel(level)


def _may_reach(host: str) -> bool:
    """False only where no proxy is set (a proxy resolves the name, not this machine) and this
    machine's name servers do not know ``host``."""
    if any(urllib.request.getproxies().get(scheme) for scheme in ("https", "http", "all")):
        return True
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):  # UnicodeError: a host name that cannot be one
        return False
    return True


def names_weights_file(encoder_weights: str | None) -> bool:
    """Whether ``encoder_weights`` names a state-dict file (a path or a URI), not none or the
    model hub's."""
    return encoder_weights not in (None, "imagenet")


def absolute_weights(encoder_weights: str | None) -> str | None:
    """A weights file's path made absolute (trials and workers run in folders of their own,
    where a relative path names nothing); none, the hub's, or a URI as given."""
    if names_weights_file(encoder_weights):
        return absolute_location(encoder_weights)
    return encoder_weights


def read_encoder_state(location: Location) -> dict:
    """The encoder state dict in a file or an object on a store."""
    data = location.read_bytes() if location.remote else None
    return load_state_dict_file(location.uri, "encoder weights", data)


def load_encoder_weights(model: nn.Module, path: str | Path, in_channels: int) -> None:
    """Load an encoder state dict from a file or object storage (every node of a cluster without
    shared disk reads it there); a 3-channel first conv is summed down for grey input."""
    location = Location.of(path)
    if not location.is_file():
        raise DataError(
            path,
            "encoder weights file not found",
            "pass an existing state-dict file (a path every node has, or an s3:// URI), "
            "'imagenet', or nothing",
        )
    state = read_encoder_state(location)
    state = {k.removeprefix("encoder."): v for k, v in state.items()}
    own = model.encoder.state_dict()
    for key, value in state.items():
        # Only a colour input convolution (3 in, 1 here) is summed down; any other misfit is
        # another encoder's, refused below.
        if (
            in_channels == 1
            and key in own
            and value.ndim == 4
            and (value.shape[1], own[key].shape[1]) == (3, 1)
        ):
            state[key] = value.sum(dim=1, keepdim=True)
    if not set(state) & set(own):
        raise DataError(
            path,
            "no tensor matches the encoder's parameter names",
            "pass a state dict saved from this encoder",
        )
    misfits = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if misfits:
        key = misfits[0]
        raise DataError(
            path,
            f"{len(misfits)} tensors do not fit this encoder (e.g. {key}: "
            f"{tuple(state[key].shape)} here, {tuple(own[key].shape)} in the encoder)",
            "pass weights saved from this encoder, or choose the encoder they were saved from",
        )
    _require_this_encoder(path, state, own)
    model.encoder.load_state_dict(state, strict=False)


def _require_this_encoder(path: str | Path, state: dict, own: dict) -> None:
    """Refuse weights of another encoder whose shared tensors happen to fit: a deeper one of
    the same family (resnet34 for resnet18) has every tensor of the shallower one plus blocks
    it lacks; a shallower one lacks some. A classifier head in the file (fc, classifier: a
    name the encoder has no part of) is left out, as smp's encoders drop it."""
    parts = {key.split(".")[0] for key in own}
    extra = [k for k in state if k not in own and k.split(".")[0] in parts]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if not extra and not missing:
        return
    which = (
        f"{len(extra)} tensors of it are not in the encoder (e.g. {extra[0]})"
        if extra
        else f"{len(missing)} of the encoder's tensors are not in it (e.g. {missing[0]})"
    )
    raise DataError(
        path,
        f"{which}: it was saved from another encoder",
        "pass weights saved from this encoder, or choose the encoder they were saved from",
    )
