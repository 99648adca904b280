import logging

import pytest
import torch

from defectforge.core.errors import DataError
from defectforge.segmentation.models import architecture_names, build_model

pytestmark = pytest.mark.floors  # .ci/floors runs them at the lowest versions


@pytest.mark.parametrize("arch", ["deeplabv3plus", "PAN", "Unet"])
@pytest.mark.parametrize("channels", [1, 3])
def test_architectures_by_name_give_logits_per_class(arch, channels):
    model = build_model(arch, "resnet18", channels, 4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, 128, 128))
    assert out.shape == (2, 4, 128, 128)


def test_unknown_architecture_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        build_model("deeplabv5", "resnet18", 1, 2)
    assert "deeplabv3plus" in str(err.value) and "pan" in str(err.value)
    assert "deeplabv3plus" in architecture_names()


def test_the_papers_xception_backbone_through_timm_is_dilated_for_deeplabv3plus():
    model = build_model("deeplabv3plus", "tu-xception41", 1, 4).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 64, 64))
    assert out.shape == (1, 4, 64, 64)
    # DeepLabV3+ takes the encoder at output stride 16: the last stage is dilated, not strided.
    assert model.encoder.model.feature_info.reduction()[-1] == 16


def test_unknown_encoder_and_channels():
    with pytest.raises(ValueError, match="unknown encoder"):
        build_model("pan", "resnet19", 1, 2)
    with pytest.raises(ValueError, match="tu-<any timm model>"):
        build_model("pan", "tu-no-such-model", 1, 2)
    with pytest.raises(ValueError, match="in_channels must be 1 or 3"):
        build_model("pan", "resnet18", 2, 2)


def test_local_encoder_weights_are_loaded_and_grey_conv_is_summed(tmp_path):
    source = build_model("unet", "resnet18", 3, 2)
    path = tmp_path / "encoder.pt"
    torch.save(source.encoder.state_dict(), path)
    grey = build_model("unet", "resnet18", 1, 2, encoder_weights=str(path))
    assert torch.allclose(
        grey.encoder.layer1[0].conv1.weight, source.encoder.layer1[0].conv1.weight
    )
    summed = source.encoder.conv1.weight.sum(dim=1, keepdim=True)
    assert torch.allclose(grey.encoder.conv1.weight, summed)
    with pytest.raises(DataError, match="encoder weights file not found"):
        build_model("unet", "resnet18", 1, 2, encoder_weights=str(tmp_path / "missing.pt"))


def test_encoder_weights_of_another_encoder_or_an_unreachable_hub_are_one_line(
    tmp_path, monkeypatch, caplog
):
    from defectforge.core.errors import ConfigError

    path = tmp_path / "resnet50.pt"
    torch.save(build_model("unet", "resnet50", 3, 2).encoder.state_dict(), path)
    with pytest.raises(DataError, match=r"tensors do not fit this encoder \(e\.g\. layer"):
        build_model("unet", "resnet18", 3, 2, encoder_weights=str(path))

    from huggingface_hub import constants as hub

    # A hub no name server knows (as every hub is on a machine without network; .invalid never
    # resolves), and nothing in the cache: one line at once, not the hub's retries and their
    # warnings.
    monkeypatch.setattr(hub, "HUGGINGFACE_CO_URL_TEMPLATE", "https://hub.invalid/{repo_id}")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr("urllib.request.getproxies", dict)  # no proxy to resolve it either
    offline = hub.HF_HUB_OFFLINE
    with caplog.at_level(logging.WARNING), pytest.raises(ConfigError) as refused:
        build_model("unet", "resnet18", 3, 2, encoder_weights="imagenet")
    assert str(refused.value) == (
        "encoder_weights = 'imagenet': resnet18's weights could not be had from the model hub "
        "(hub.invalid is not known here, nor the weights cached); give a local weights file, "
        "or none, on a machine without network"
    )
    assert not caplog.records and hub.HF_HUB_OFFLINE == offline  # the hub's own, back

    # A machine that says it has no network (HF_HUB_OFFLINE=1) though its hub's name is known:
    # the hub's own reason.
    monkeypatch.setattr(hub, "HUGGINGFACE_CO_URL_TEMPLATE", "https://localhost/{repo_id}")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ConfigError, match="'imagenet': resnet18's weights could not be had"
    ) as refused:
        build_model("unet", "resnet18", 3, 2, encoder_weights="imagenet")
    assert "not known here" not in str(refused.value)
