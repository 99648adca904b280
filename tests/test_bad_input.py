"""Every kind of bad input gives one line naming the file and the fix; nothing half-written."""

import cv2
import numpy as np
import pytest
from cli_checks import error_lines

from defectforge.cli import main
from defectforge.core.errors import ConfigError, DataError
from defectforge.datasets.build import BuildConfig
from defectforge.datasets.discover import NEU_SEG_CLASSES, discover_neu_seg
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.readers import load_sample
from defectforge.datasets.samples import SampleSpec

SPEC = SampleSpec("neu-seg", NEU_SEG_CLASSES, 1)


def _ref(root, stem_index=0):
    return discover_neu_seg(root)[stem_index]


def _load_error(ref, spec=SPEC) -> str:
    with pytest.raises(DataError) as err:
        load_sample(ref, spec)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_corrupt_image(sample_copy):
    ref = _ref(sample_copy)
    open(ref.image_path, "wb").write(b"not an image at all\xff\xd9")
    message = _load_error(ref)
    assert ref.image_path in message and "cannot be read" in message


def test_truncated_jpeg(sample_copy):
    ref = _ref(sample_copy)
    data = open(ref.image_path, "rb").read()
    open(ref.image_path, "wb").write(data[: len(data) // 2])
    assert "truncated" in _load_error(ref)


def test_missing_mask(sample_copy):
    ref = _ref(sample_copy)
    import os

    os.remove(ref.mask_path)
    message = _load_error(discover_neu_seg(sample_copy)[0])
    assert "no mask" in message and ref.image_path in message


def test_mask_of_another_size(sample_copy):
    ref = _ref(sample_copy)
    cv2.imwrite(ref.mask_path, np.zeros((100, 120), np.uint8))
    message = _load_error(ref)
    assert ref.mask_path in message and "120x100" in message and "200x200" in message


def test_mask_values_outside_classes(sample_copy):
    ref = _ref(sample_copy)
    cv2.imwrite(ref.mask_path, np.full((200, 200), 255, np.uint8))
    message = _load_error(ref)
    assert "[255]" in message and "--mask-threshold" in message


def test_wrong_channel_count(sample_copy):
    ref = _ref(sample_copy)
    colour = np.zeros((200, 200, 3), np.uint8)
    colour[..., 2] = 200
    cv2.imwrite(ref.image_path, colour)
    assert "3 colour channels but 1 (grey) is expected" in _load_error(ref)
    assert "--channels 3" in _load_error(ref)


def test_empty_folder_cli_one_line(tmp_path, capsys):
    (tmp_path / "raw" / "images" / "train").mkdir(parents=True)
    code = main(
        [
            "data",
            "build",
            "--source",
            "neu-seg",
            "--root",
            str(tmp_path / "raw"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(error_lines(err)) == 1 and "no images found" in err
    assert not (tmp_path / "out").exists()


def test_build_fails_cleanly_and_skip_bad_lists_rejects(ray_session, sample_copy, tmp_path):
    from defectforge.trainables.data_jobs import build_parquet

    out = tmp_path / "out"
    first = build_parquet(BuildConfig(source="neu-seg", root=str(sample_copy)), out)
    refs = discover_neu_seg(sample_copy)
    cv2.imwrite(refs[0].mask_path, np.zeros((10, 10), np.uint8))
    open(refs[1].image_path, "wb").write(b"garbage")
    cfg = BuildConfig(source="neu-seg", root=str(sample_copy))
    with pytest.raises(DataError, match="2 bad files in all"):
        build_parquet(cfg, out, overwrite=True)
    assert Manifest.load(out) == first  # the earlier dataset stands, untouched
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]

    skip = BuildConfig(source="neu-seg", root=str(sample_copy), skip_bad=True)
    manifest = build_parquet(skip, tmp_path / "skip")
    rejected = (tmp_path / "skip" / "rejected.csv").read_text().splitlines()
    assert len(rejected) == 3 and manifest.rejected == 2
    assert manifest.split_total("train") + manifest.split_total("val") == 55


def test_bad_config_values_are_rejected():
    with pytest.raises(ConfigError, match="split_ratios"):
        BuildConfig(source="folder", root=".", split_ratios=(0.5, 0.2, 0.2))
    with pytest.raises(ConfigError, match="source = 'nope': must be one of"):
        BuildConfig(source="nope", root=".")


def test_options_a_source_ignores_are_refused_unless_they_agree_with_it():
    from defectforge.datasets.steel import SteelOptions

    assert BuildConfig(source="steel", root="r", channels=3).channels == 3  # what steel makes
    with pytest.raises(ConfigError, match="channels = 1 is not used with source steel"):
        BuildConfig(source="steel", root="r", channels=1)
    with pytest.raises(ConfigError, match="missing_mask = 'background' .* holds its mask.png"):
        BuildConfig(source="steel", root="r", missing_mask="background")
    # Of nested options only the changed one is shown, with the flags that belong to them.
    with pytest.raises(ConfigError, match=r"steel = \{'robust': True\} .* --robust"):
        BuildConfig(source="folder", root="r", steel=SteelOptions(robust=True))
    with pytest.raises(ConfigError, match="root = 's3://b/raw' is on object storage; .*copy it"):
        BuildConfig(source="folder", root="s3://b/raw")


def test_a_data_error_survives_ray_copying_and_pickling_it():
    import copy
    import pickle

    error = DataError("runs/x/manifest.json", "no manifest.json", "build it first")
    for clone in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert str(clone) == str(error) and clone.fix == "build it first"
