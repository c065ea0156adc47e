"""`RunConfig`: every option of a run, typed, bounded and described in one place.

The groups below are frozen dataclasses whose fields carry an `OptionSpec` (see `options`). From
them come the DAGs' trigger forms (`form_options`), the `gfocal` CLI's options, and the one
validation of a run (`RunConfig.from_mapping`, called by the prepare task). What the later tasks
receive is `RunConfig.to_dict()`: plain JSON values (Enum members as their strings).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gfocal_pipeline.adapters import DEFAULT_MODEL, check_model_name, model_names, run_model_spec
from gfocal_pipeline.constants import (
    DEFAULT_ANNOTATION_FILE,
    DEFAULT_IMAGE_DIR,
    SIZE_DIVISOR,
)
from gfocal_pipeline.errors import BackendError, ConfigError
from gfocal_pipeline.gate import GateThresholds
from gfocal_pipeline.options import (
    SOC_PATTERN,
    Dtype,
    Engine,
    OptionSpec,
    OutputFormat,
    Policy,
    PrecisionMode,
    Tool,
    check_option,
    default_of,
    option,
    plain,
    spec_of,
)
from gfocal_pipeline.workspace import default_work_dir, demo_paths, ensure_demo_data

_SIZE = {"kind": int, "minimum": 64, "maximum": 4096, "multiple_of": SIZE_DIVISOR}


@dataclass(frozen=True)
class DataOptions:
    """What goes in: the checkpoint, the COCO-format set and how images become model inputs."""

    model: str = option(
        DEFAULT_MODEL,
        title="Model adapter",
        description="The model adapter (`gfocal models` lists them): its checkpoint layout, export, "
        "classes, pixels and post-processing; its input size and resize policy fill those left empty "
        "(section Model).",
        kind=str,
        choices=model_names,
    )
    checkpoint: str = option(
        default_factory=lambda: str(demo_paths()["checkpoint"]),
        title="Checkpoint (.pth) or ONNX graph",
        description="mmcv-style checkpoint in the model's official layout; with model onnx, your .onnx "
        "graph (its declaration <graph>.spec.yaml beside it). Default: generated RANDOM weights (with "
        "another model than gfocalv2, that model's own demo weights in the same folder).",
        kind=str,
        path=True,
    )
    coco_root: str = option(
        default_factory=lambda: str(demo_paths()["coco_root"]),
        title="COCO root",
        description="Folder of a COCO-format set (images folder + annotation file). Default: the demo set.",
        kind=str,
        path=True,
    )
    images_dir: str = option(
        DEFAULT_IMAGE_DIR,
        title="Images folder",
        description="Images folder inside the COCO root (e.g. val2017, val2014).",
        kind=str,
        subpath=True,
    )
    annotations: str = option(
        DEFAULT_ANNOTATION_FILE,
        title="Annotation file",
        description="COCO instances file inside the COCO root.",
        kind=str,
        subpath=True,
    )
    work_dir: str = option(
        default_factory=lambda: str(default_work_dir()),
        title="Work directory",
        description="Runs are written to <work_dir>/<dag_id>/<run_id>/; the OM cache lives here too.",
        kind=str,
        path=True,
    )
    policy: Policy | None = option(
        None,
        title="Resize policy",
        description="letterbox: the ModelZoo recipe (fit the input, pad bottom-right); "
        "mmdet: the official test pipeline (the model's keep-ratio scale, e.g. 1333x800, pad to /32); "
        "centered: fit the input, image in the centre. Empty: the model's (GFocalV2, RetinaNet: "
        "letterbox; a bring-your-own graph: its declaration's).",
        kind=Policy,
        nullable=True,
    )
    dtype: Dtype = option(
        Dtype.FLOAT32,
        title="Input dtype",
        description="float32: normalized on the host (the recipe's .bin); uint8: 4x smaller, normalized "
        "in the model (AIPP on Ascend).",
        kind=Dtype,
    )
    height: int | None = option(
        None,
        title="Input height",
        description="Model input height in pixels (multiple of 32). Empty: the model's (GFocalV2, "
        "RetinaNet: 800; a bring-your-own graph: its declaration's).",
        nullable=True,
        **_SIZE,
    )
    width: int | None = option(
        None,
        title="Input width",
        description="Model input width in pixels (multiple of 32). Empty: the model's (GFocalV2, "
        "RetinaNet: 1216; a bring-your-own graph: its declaration's).",
        nullable=True,
        **_SIZE,
    )
    shard_size: int | None = option(
        None,
        title="Images per shard",
        description="Inference is mapped over shards, one task each. Empty = few, full tasks: a task's "
        "fixed cost at most 5% of its device work, at least one shard per device slot (val2017 on one "
        "NPU: 1 task; docs/architecture.md, 'Shard size').",
        kind=int,
        nullable=True,
        minimum=1,
        maximum=100_000,
    )
    max_images: int | None = option(
        None,
        title="Max images",
        description="Use only the first N images by id (empty = all).",
        kind=int,
        nullable=True,
        minimum=1,
        maximum=10**7,
    )


@dataclass(frozen=True)
class ModelOptions:
    """How the model is exported, run and scored."""

    batch_size: int = option(
        1, title="Batch size", description="Images per inference call.", kind=int, minimum=1, maximum=256
    )
    parity_threshold: float = option(
        1e-3,
        title="Parity threshold",
        description="Largest allowed |ONNX Runtime - PyTorch| difference of boxes (px; relative to the "
        "box size for YOLOX) and scores over the export's matched candidates.",
        kind=float,
        exclusive_minimum=0,
    )
    max_unexplained: int = option(
        0,
        title="Unexplained parity candidates",
        description="How many candidates that match no PyTorch anchor and are no top-k boundary tie "
        "the export lets through (diagnosis only; recorded in its result). 0 refuses any.",
        kind=int,
        minimum=0,
    )
    engine: Engine = option(
        Engine.FASTER_COCO_EVAL,
        title="COCO evaluator",
        description="faster-coco-eval (default) or pycocotools; they give the same numbers.",
        kind=Engine,
    )


@dataclass(frozen=True)
class CacheOptions:
    """What a run may reuse from `<work_dir>/cache/` and what it keeps for debugging."""

    cache_inputs: bool = option(
        True,
        title="Reuse preprocessed inputs",
        description="Keep the inputs in the cache, keyed by the images' and annotations' content. Off: "
        "each inference task builds its shard and deletes it after (disk bounded by the shards in flight).",
        kind=bool,
    )
    cache_onnx: bool = option(
        True,
        title="Reuse the exported ONNX",
        description="Export once per checkpoint, size and export settings.",
        kind=bool,
    )
    cache_reference: bool = option(
        True,
        title="Reuse the PyTorch reference",
        description="Run the PyTorch reference once per checkpoint and inputs (per shard).",
        kind=bool,
    )
    keep_candidates: bool = option(
        False,
        title="Keep raw candidates",
        description="Also keep the pre-NMS candidates of every shard (about 1 MB per image; debugging).",
        kind=bool,
    )


@dataclass(frozen=True)
class AscendOptions:
    """The Ascend DAG's options: tool, device, atc conversion and the CANN environment."""

    tool: Tool = option(
        Tool.MSAME, title="Inference tool", description="msame (the recipe) or ais_bench.", kind=Tool
    )
    device: int = option(
        0,
        title="NPU device id",
        description="The --device of msame/ais_bench.",
        kind=int,
        minimum=0,
        maximum=255,
    )
    chips: int = option(
        1,
        title="Chips per card",
        description="fps = chips x 1000 x batch / mean ms (4 for an Atlas 300I / Ascend 310).",
        kind=int,
        minimum=1,
        maximum=16,
    )
    outfmt: OutputFormat = option(
        OutputFormat.BIN,
        title="Tool output format",
        description="BIN (exact) or TXT (6 significant digits).",
        kind=OutputFormat,
    )
    soc_version: str | None = option(
        None,
        title="SoC version",
        description="e.g. Ascend310P3; empty = detect with npu-smi info.",
        kind=str,
        nullable=True,
        pattern=SOC_PATTERN,
        hint="like Ascend310P3, or empty to detect it",
    )
    precision_mode: PrecisionMode = option(
        PrecisionMode.FORCE_FP16,
        title="atc precision mode",
        description="Passed to atc --precision_mode.",
        kind=PrecisionMode,
    )
    cann_set_env: str | None = option(
        None,
        title="CANN set_env.sh",
        description="Sourced once for the tools' environment. Empty = $GFOCAL_CANN_SET_ENV on the worker, "
        "else /usr/local/Ascend/ascend-toolkit/set_env.sh.",
        kind=str,
        nullable=True,
        path=True,
    )


# the options the preprocess step takes (form, CLI and operator share this list)
PREPROCESS_OPTIONS = (
    "coco_root",
    "images_dir",
    "annotations",
    "policy",
    "dtype",
    "height",
    "width",
    "shard_size",
    "max_images",
)
GROUPS: dict[str, type] = {
    "data": DataOptions,
    "model": ModelOptions,
    "gate": GateThresholds,
    "cache": CacheOptions,
    "ascend": AscendOptions,
}


def _group_fields(ascend: bool) -> Iterator[tuple[str, Any]]:
    for group, cls in GROUPS.items():
        if group != "ascend" or ascend:
            yield from ((group, item) for item in fields(cls))


# The trigger forms' sections, in form order (Airflow Params' `section`). Every run option is in
# exactly one (tests/dags/test_dag_forms.py). Airflow's form opens only its default section, "Run
# Parameters" (the params without a section): it holds the fields set on most runs; the named
# sections below it start collapsed, "Advanced" last.
DEFAULT_SECTION = "Run Parameters"
FORM_SECTIONS: dict[str, tuple[str, ...]] = {
    DEFAULT_SECTION: ("model", "checkpoint", "coco_root", "max_images", "tool", "precision_mode"),
    "Data": ("images_dir", "annotations", "work_dir"),
    "Model": ("height", "width", "policy", "dtype"),
    "Inference": ("batch_size", "shard_size"),
    "Gate & alerts": tuple(item.name for item in fields(GateThresholds)),
    "Ascend": ("soc_version", "cann_set_env", "device", "chips", "outfmt"),
    "Advanced": (
        "parity_threshold",
        "max_unexplained",
        "engine",
        "cache_inputs",
        "cache_onnx",
        "cache_reference",
        "keep_candidates",
    ),
}
SECTION_OF = {name: section for section, names in FORM_SECTIONS.items() for name in names}


def form_options(ascend: bool = False) -> dict[str, tuple[Any, OptionSpec]]:
    """{name: (default, spec)} of a DAG's trigger form, in form order (by `FORM_SECTIONS`)."""
    found = {item.name: (plain(default_of(item)), spec_of(item)) for _, item in _group_fields(ascend)}
    order = [name for names in FORM_SECTIONS.values() for name in names if name in found]
    return {name: found[name] for name in order + [n for n in found if n not in SECTION_OF]}


def option_spec(name: str) -> OptionSpec:
    """The spec of one run option by name (for the CLI)."""
    for _, item in _group_fields(True):
        if item.name == name:
            return spec_of(item)
    raise KeyError(name)


def _check_batch(ascend: AscendOptions | None, batch_size: int) -> None:
    """The tool's own batch rule (msame runs batch 1), from the backend class that owns it."""
    if ascend is None:
        return
    from gfocal_pipeline.backends.registry import backend_class

    try:
        backend_class(ascend.tool.value).check_batch_size(batch_size)
    except BackendError as exc:
        raise ConfigError(f"parameter 'batch_size' = {batch_size}: {exc}") from None


MODEL_INPUT = ("policy", "height", "width")  # options whose default is the model adapter's


def model_input_defaults(values: Mapping[str, Any], names: tuple[str, ...] = MODEL_INPUT) -> dict[str, Any]:
    """`values` with the options `names` it leaves empty (None or absent) set to the chosen model's
    (`model`, default GFocalV2; a bring-your-own graph's declaration, `checkpoint`)."""
    values = dict(values)
    model = values.get("model") or DEFAULT_MODEL
    pre = run_model_spec(model, values.get("checkpoint")).preprocessing
    for name in names:
        if values.get(name) is None:
            values[name] = getattr(pre, name)
    return values


def _demo_in_work_dir(values: Mapping[str, Any]) -> dict[str, Any]:
    """The chosen model (checked); a run without a checkpoint / COCO root uses the demo data of its
    own work directory, and the default checkpoint (GFocalV2's demo weights, what the form shows)
    means the chosen model's own demo weights."""
    values = dict(values)
    model = check_model_name(values.get("model") or DEFAULT_MODEL, "parameter 'model'")
    work_dir = values.get("work_dir") or str(default_work_dir())
    demo = demo_paths(work_dir, model)
    for key in ("checkpoint", "coco_root"):
        if values.get(key) in (None, "") and key in demo:
            values[key] = str(demo[key])
    defaults = {demo_paths(base)["checkpoint"] for base in (work_dir, default_work_dir())}
    if model != DEFAULT_MODEL and values.get("checkpoint") and Path(values["checkpoint"]) in defaults:
        values["checkpoint"] = str(demo["checkpoint"]) if "checkpoint" in demo else None
    return {**values, "model": model}


def _demo_defaults(values: dict[str, Any]) -> bool:
    """Generate the demo data when a run uses it (first use); True when the weights are RANDOM."""
    bases = {Path(values["work_dir"]), default_work_dir()}
    model = values["model"]
    for base in bases:
        demo = demo_paths(base, model)
        if any(Path(values[key]) == demo.get(key) for key in ("checkpoint", "coco_root")):
            ensure_demo_data(base, model)
    for key in ("checkpoint", "coco_root"):
        if not Path(values[key]).exists():
            raise ConfigError(f"parameter {key!r}: {values[key]!r} does not exist; pass an existing path")
    return any(Path(values["checkpoint"]) == demo_paths(base, model).get("checkpoint") for base in bases)


def check_known(values: Mapping[str, Any], names: set[str]) -> None:
    """A ConfigError naming every key of `values` that is not a run parameter, each with the nearest
    known name (a typo in a run's conf must not silently run the default)."""
    unknown = sorted(set(values) - names)
    if not unknown:
        return
    hints = []
    for key in unknown:
        near = difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.6)
        hints.append(f"{key!r} (did you mean {near[0]!r}?)" if near else repr(key))
    raise ConfigError(
        f"unknown run parameter(s) {unknown}: {', '.join(hints)}; remove or rename them "
        f"(known: {', '.join(sorted(names))})"
    )


@dataclass(frozen=True)
class RunConfig:
    """A validated run: one instance per group (`ascend` only on the Ascend DAG)."""

    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    gate: GateThresholds = field(default_factory=GateThresholds)
    cache: CacheOptions = field(default_factory=CacheOptions)
    ascend: AscendOptions | None = None
    weights_random: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, ascend: bool = False) -> RunConfig:
        """Validate a form's (or CLI's) values; missing or None ones take their defaults."""
        check_known(values, {item.name for _, item in _group_fields(ascend)})
        values = model_input_defaults(_demo_in_work_dir(values))
        checked: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        for group, item in _group_fields(ascend):
            spec, raw = spec_of(item), values.get(item.name)
            value = default_of(item) if raw is None and not spec.nullable else raw
            checked[group][item.name] = check_option(item.name, value, spec)
        weights_random = _demo_defaults(checked["data"])
        ascend_options = AscendOptions(**checked["ascend"]) if ascend else None
        _check_batch(ascend_options, checked["model"]["batch_size"])
        return cls(
            data=DataOptions(**checked["data"]),
            model=ModelOptions(**checked["model"]),
            gate=GateThresholds(**checked["gate"]),
            cache=CacheOptions(**checked["cache"]),
            ascend=ascend_options,
            weights_random=weights_random,
        )

    def to_dict(self) -> dict[str, Any]:
        """Flat plain values by option name, plus `thresholds` (the gate's) and `weights_random`."""
        groups = [self.data, self.model, self.gate, self.cache, *([self.ascend] if self.ascend else [])]
        flat = {item.name: plain(getattr(group, item.name)) for group in groups for item in fields(group)}
        return {**flat, "thresholds": self.gate.as_dict(), "weights_random": self.weights_random}
