"""A study's stages (``studies.stages``), run in order before its search.

Each stage's output goes to ``<storage_path>/stages/<stage>-<key>/``; a stage whose output is
complete there (its ``stage.json`` written after it finished) is reused, by this study or any
other asking for the same thing, and one that was interrupted continues: a training stage
restarts from its latest checkpoint in the same folder (``seg train``'s and ``gan train``'s own
rule), a dataset stage, published only when whole, runs again. Every stage is announced with its key and
how it ended, and the study records them all (``study.json``, the report).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from defectforge.core.storage import Location, absolute_location
from defectforge.datasets.build import BUILD_RULES
from defectforge.datasets.contract import run_identity
from defectforge.datasets.manifest import Manifest
from defectforge.datasets.mix import synthetic_count
from defectforge.gan.checkpoint import GENERATOR_FILE
from defectforge.segmentation.checkpoint import MODEL_FILE
from defectforge.segmentation.pseudo_label import Corrections, LabelConfig
from defectforge.studies.errors import SpecError
from defectforge.studies.spec_schema import SOURCE_DATASETS, DatasetSpec, StudySpec
from defectforge.studies.stages import ORDER, RUN_KEY, settings_of, stage_key
from defectforge.trainables.runtime import check_storage_everywhere
from defectforge.trainables.study_setup import check_trial_values

STAGES_DIR = "stages"
STAGE_RECORD = "stage.json"
MADE_IN_ORDER = tuple(name for name in ORDER if name != "export")  # export: after the search
# A data stage's key covers the build rules: one made under earlier rules is made again (later
# stages are keyed by its dataset id, so they are reused where it did not change).
DATA_STAGE_INPUTS = {"build_rules": BUILD_RULES}


@dataclass(frozen=True)
class StageRun:
    """How one stage went: made now ("ran"), found made ("reused") or given as a path."""

    name: str
    key: str
    folder: str
    status: str
    seconds: float


def _announce(index: int, total: int, text: str) -> None:
    print(f"[stage {index}/{total}] {text}", flush=True)


class Pipeline:
    """Runs the made stages of one spec under one storage root."""

    def __init__(self, spec: StudySpec, where: str):
        self.spec, self.where = spec, where
        self.root = Location.of(spec.storage_path) / STAGES_DIR
        self.runs: list[StageRun] = []
        self.outputs: dict[str, str] = {}
        self.ids: dict[str, str] = {}
        names = [n for n in MADE_IN_ORDER if getattr(spec.stages, n) is not None]
        self.total = len(names)

    # --- one stage ---------------------------------------------------------------------------

    def _stage(self, name: str, settings: Any, inputs: dict[str, str], make) -> str:
        """The stage's output folder: reused if complete, else made by ``make(folder)``."""
        key = stage_key(name, settings, inputs)
        folder = self.root / f"{name}-{key}"
        index = len(self.runs) + 1
        if (folder / STAGE_RECORD).is_file():
            _announce(index, self.total, f"{name} {key}: reused {folder}")
            self.runs.append(StageRun(name, key, folder.uri, "reused", 0.0))
            return folder.uri
        # Checked where the work may run: nodes that joined since the last stage too.
        check_storage_everywhere(self.root.uri, "storage_path")
        _announce(index, self.total, f"{name} {key}: running")
        started = time.monotonic()
        make(folder.uri)
        seconds = round(time.monotonic() - started, 1)
        record = {"stage": name, "key": key, "settings": settings, "inputs": inputs}
        (folder / STAGE_RECORD).write_json({**record, "seconds": seconds})
        _announce(index, self.total, f"{name} {key}: done in {seconds:g} s")
        self.runs.append(StageRun(name, key, folder.uri, "ran", seconds))
        return folder.uri

    def _given(self, name: str, section: dict, weights: str) -> str:
        """A training stage given as ``{run: PATH}``: that run, identified by its weights."""
        path = absolute_location(section[RUN_KEY])
        self.runs.append(StageRun(name, run_identity(path, weights), path, "given", 0.0))
        _announce(len(self.runs), self.total, f"{name}: given {path}")
        return path

    # --- the stages, in order -----------------------------------------------------------------

    def _data(self) -> str:
        from defectforge.trainables.data_jobs import build_parquet

        stages = self.spec.stages
        if stages.data is None:
            return self.spec.dataset.real
        cfg = replace(stages.data, root=absolute_location(stages.data.root))
        return self._stage(
            "data",
            settings_of(cfg),
            DATA_STAGE_INPUTS,
            lambda out: build_parquet(cfg, out, overwrite=True),
        )

    def _subset(self, data: str) -> str:
        from defectforge.datasets.subset import subset_dataset

        section = self.spec.stages.subset
        if section is None:
            return data
        return self._stage(
            "subset",
            settings_of(section),
            {"data": self.ids["data"]},
            lambda out: subset_dataset(data, out, section, overwrite=True),
        )

    def _copy_paste(self, data: str) -> str:
        from defectforge.datasets.copy_paste import copy_paste_dataset

        section = self.spec.stages.copy_paste
        if section is None:
            return self.spec.dataset.copy_paste
        return self._stage(
            "copy_paste",
            settings_of(section),
            {"data": self.ids["data"]},
            lambda out: copy_paste_dataset(data, out, section, overwrite=True),
        )

    def _labeller(self, data: str) -> str | None:
        from defectforge.trainables.seg import config_from_manifest, run_seg_training

        section = self.spec.stages.labeller
        if section is None:
            return None
        if RUN_KEY in section:
            return self._given("labeller", section, MODEL_FILE)

        def train(out: str) -> None:
            run_seg_training(config_from_manifest(data, **section), out)

        return self._stage("labeller", section, {"data": self.ids["data"]}, train)

    def _gan(self, data: str, name: str = "gan") -> str | None:
        """The GAN stage (``mask_gan``: the one whose generator also draws masks)."""
        from defectforge.trainables.gan import gan_config_from_manifest, run_gan_training

        section = getattr(self.spec.stages, name)
        if section is None:
            return None
        if RUN_KEY in section:
            return self._given(name, section, GENERATOR_FILE)
        options = {k: v for k, v in section.items() if k != "profile"}
        if name == "mask_gan":
            options["masks"] = True

        def train(out: str) -> None:
            cfg = gan_config_from_manifest(data, section["profile"], **options)
            run_gan_training(cfg, out)

        return self._stage(name, section, {"data": self.ids["data"]}, train)

    def _generate(self, gan: str, name: str = "generate") -> str:
        """Samples of a GAN stage's generator (``generate_masks``: with their drawn masks)."""
        from defectforge.trainables.gan_samples import write_generated

        section = getattr(self.spec.stages, name)
        seeds = section.seeds()

        def make(out: str) -> None:
            write_generated(gan, out, seeds, section.truncation, section.class_name, overwrite=True)

        inputs = {"gan": run_identity(gan, GENERATOR_FILE)}
        return self._stage(name, settings_of(section), inputs, make)

    def _label(self, generated: str, labeller: str) -> str:
        from defectforge.trainables.synth import label_synthetic

        section = self.spec.stages.label
        correction_names = set(Corrections.__dataclass_fields__)
        corrections = Corrections(**{k: v for k, v in section.items() if k in correction_names})
        rest = {k: v for k, v in section.items() if k not in correction_names}
        cfg = LabelConfig(images=generated, labeller=labeller, corrections=corrections, **rest)
        inputs = {
            "generated": Manifest.load(generated).dataset_id,
            "labeller": run_identity(labeller, MODEL_FILE),
        }
        return self._stage(
            "label", section, inputs, lambda out: label_synthetic(cfg, out, overwrite=True)
        )

    def run(self) -> StudySpec:
        """Every stage the spec asks for; the spec with its dataset paths set to their outputs."""
        self._check_given_mask_gan()
        data = self._data()
        self.ids["data"] = Manifest.load(data).dataset_id
        data = self._subset(data)
        self.ids["data"] = Manifest.load(data).dataset_id
        check_trial_values(self.spec, data, self.where)
        self._check_generate_count(data)
        self._check_given_weights()
        labeller = self._labeller(data)
        gan = self._gan(data)
        synthetic = self.spec.dataset.synthetic
        if self.spec.stages.generate is not None:
            generated = self._generate(gan)
            synthetic = self._label(generated, labeller) if self.spec.stages.label else ""
        gan_masks = self.spec.dataset.gan_masks
        if self.spec.stages.generate_masks is not None:
            gan_masks = self._generate(self._gan(data, "mask_gan"), "generate_masks")
        dataset = replace(
            self.spec.dataset,
            real=data,
            synthetic=synthetic,
            gan_masks=gan_masks,
            copy_paste=self._copy_paste(data),
        )
        dataset = replace(dataset, combined=self._combine(dataset))
        return replace(self.spec, dataset=dataset)

    def _combine(self, dataset: DatasetSpec) -> str:
        """The combine stage's output: its sources' sets (given or made above) as one."""
        from defectforge.datasets.combine import combine_synthetic

        section = self.spec.stages.combine
        if section is None:
            return dataset.combined
        sets = [getattr(dataset, SOURCE_DATASETS[source]) for source in section.sources]
        inputs = {
            source: Manifest.load(path).dataset_id
            for source, path in zip(section.sources, sets, strict=True)
        }
        return self._stage(
            "combine",
            settings_of(section),
            inputs,
            lambda out: combine_synthetic(sets, out, section, overwrite=True),
        )

    def check_given_runs(self) -> None:
        """Both checks of the given runs, as `study check` makes them before any stage."""
        self._check_given_weights()
        self._check_given_mask_gan()

    def _check_given_weights(self) -> None:
        """A stage given as ``{run: PATH}`` must be such a run: found out before any stage
        trains."""
        for name, weights, command in (
            ("labeller", MODEL_FILE, "seg train"),
            ("gan", GENERATOR_FILE, "gan train"),
            ("mask_gan", GENERATOR_FILE, "gan train --masks"),
        ):
            section = getattr(self.spec.stages, name)
            if section is None or RUN_KEY not in section:
                continue
            if not (Location.of(absolute_location(section[RUN_KEY])) / weights).is_file():
                raise SpecError(
                    self.where,
                    f"{name}.{RUN_KEY}",
                    section[RUN_KEY],
                    f"holds no {weights}: not a finished `{command}` run folder",
                    f"give the folder a `defectforge {command}` run published, or leave out "
                    f"{RUN_KEY} to train the stage here",
                )

    def _check_given_mask_gan(self) -> None:
        """A given mask_gan run must draw masks: found out before any stage trains for hours."""
        from defectforge.gan.checkpoint import gan_run_config

        section = self.spec.stages.mask_gan
        if section is None or RUN_KEY not in section:
            return
        if not gan_run_config(absolute_location(section[RUN_KEY])).masks:
            raise SpecError(
                self.where,
                f"mask_gan.{RUN_KEY}",
                section[RUN_KEY],
                "this GAN run draws no masks (it was trained without --masks)",
                "give a run of `defectforge gan train --masks`, or use gan, generate and label "
                "stages for a GAN whose images a labeller masks",
            )

    def _check_generate_count(self, data: str) -> None:
        """Labelling (or a drawn mask without a defect) only ever drops images: a count below
        what a mix of the search needs would fail after the GANs trained, so it is refused once
        the real train split is known."""
        train = Manifest.load(data).split_total("train")
        for point in self.spec.mix_points():
            source = point["synthetic_source"]
            made = self.spec.stages.most_made(source)
            if made is None or not point["synthetic_ratio"]:
                continue
            key, value, most = made
            real = point["real_count"] or train
            needed = synthetic_count(real, point["synthetic_ratio"])
            if most < needed:
                raise SpecError(
                    self.where,
                    key,
                    value,
                    f"ratio {point['synthetic_ratio']} over {real} real train images needs "
                    f"{needed} {source} images with masks, and the stages make at most {most}",
                    self.spec.stages.more_images_fix(source, needed),
                )

    def records(self) -> list[dict]:
        return [asdict(run) for run in self.runs]
