"""The models file: the zoo's nightly entries as data (`[gfocal] models_file`, `$GFOCAL_MODELS_FILE`).

One YAML file lists the models a team keeps on the nightly; each entry becomes one DAG
`<name>_nightly` (dags/gfocal_models.py), and each of its variants one branch of that DAG::

    models:
      - name: gfocalv2_r50          # DAG id <name>_nightly; history and trends key
        adapter: gfocalv2           # a registered adapter (`gfocal models`), or onnx
        checkpoint: /data/ckpt/gfocal_r50_fpn_1x.pth   # adapter onnx: onnx: <graph> (spec: beside it)
        coco_root: /data/coco
        published_ap: 0.410         # one-sided: fails only below published_ap - ap_tolerance
        ap_tolerance: 0.005
        schedule: "0 2 * * *"
        priority_weight: 2          # the NPU pool serves higher weights first
        variants:
          - {name: fp16, tool: msame, precision_mode: force_fp16}
          - {name: keep, tool: ais_bench, precision_mode: must_keep_origin_dtype, batch_size: 4}
        expected_failures: {keep: "atc 8.0 drops the NMS op"}

Any run option of the trigger forms may appear in an entry or a variant under its form name (a
variant may not change the model, its checkpoint or the work directory). The variants that change
only what neither the export nor the preprocessing reads (`device_options`: conversion, inference
tool, batch, gate thresholds) share the night's one export and one preprocessing; a variant that
changes an input option (height, dtype, policy, ...) `owns_inputs`: it exports and preprocesses in its
own folder. Structure is validated with pydantic, values with the forms' own option specs, so a
value the form refuses is refused here with the same words. Entries are validated one by one: a
bad entry is reported (`ModelsFile.errors`, naming the file, the entry and the field) and the others
still load.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gfocal_pipeline.errors import ConfigError

MODELS_FILE_ENV = "GFOCAL_MODELS_FILE"
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"
DAG_SUFFIX = "_nightly"
DEFAULT_VARIANT = "default"  # the one variant of an entry that lists none
RESERVED_NAMES = ("gfocal_ascend", "gfocal_onnxruntime")  # the built-in DAGs' ids, less the suffix
# what the entry's own keys set, so the matching run options may not appear beside them
ENTRY_KEYS = {"adapter": "model", "checkpoint": "checkpoint", "onnx": "checkpoint"}
_CRON_FIELD = r"[0-9A-Za-z*/,?#LW-]+"
_SCHEDULE = re.compile(
    rf"^(@(once|hourly|daily|weekly|monthly|quarterly|yearly)|({_CRON_FIELD}\s+){{4}}{_CRON_FIELD})$"
)


def _run_options() -> dict[str, Any]:
    """{name: OptionSpec} of every run option of the nightly form."""
    from gfocal_pipeline.run_config import form_options

    return {name: spec for name, (_, spec) in form_options(ascend=True).items()}


def device_options() -> frozenset[str]:
    """The run options neither the export nor the preprocessing reads (conversion, inference, gate):
    variants that change only these share one export and one preprocessing."""
    from dataclasses import fields

    from gfocal_pipeline.gate import GateThresholds
    from gfocal_pipeline.run_config import AscendOptions

    groups = (AscendOptions, GateThresholds)
    return frozenset({*(f.name for g in groups for f in fields(g)), "batch_size", "engine"})


VARIANT_FORBIDDEN = ("model", "checkpoint", "work_dir")  # one model, one run folder per entry


def variant_options() -> frozenset[str]:
    """The run options a variant may set: every one but the model, its checkpoint and the work_dir."""
    return frozenset(set(_run_options()) - set(VARIANT_FORBIDDEN))


def owns_inputs(changes: dict[str, Any]) -> bool:
    """Whether a variant changing `changes` needs its own export and preprocessing."""
    return bool(set(changes) - device_options())


class FieldError(ValueError):
    """A bad run option of an entry or a variant; `field` names it (pydantic reports the location)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _check_options(options: dict[str, Any], allowed: set[str] | frozenset[str], what: str) -> dict[str, Any]:
    """`options` checked by the forms' specs (converted to plain values); a FieldError names the key."""
    from gfocal_pipeline.options import check_option, plain

    specs = _run_options()
    checked = {}
    for name, value in options.items():
        if name not in allowed:
            near = difflib.get_close_matches(name, sorted(allowed), n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}?" if near else f"known: {', '.join(sorted(allowed))}"
            raise FieldError(name, f"not an option {what} may set ({hint})")
        try:
            checked[name] = plain(check_option(name, value, specs[name]))
        except ConfigError as exc:
            raise FieldError(name, str(exc)) from None
    return checked


class Variant(BaseModel):
    """One branch of an entry's night: a name and the run options it changes."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(pattern=NAME_PATTERN)

    @model_validator(mode="after")
    def _options(self) -> Variant:
        extra = dict(self.model_extra or {})
        taken = sorted(set(extra) & set(VARIANT_FORBIDDEN))
        if taken:
            raise FieldError(
                taken[0],
                "the variants of an entry share its model, checkpoint and work_dir: set it on the entry "
                "(or make another entry)",
            )
        _check_options(extra, variant_options(), "a variant")
        return self

    @property
    def options(self) -> dict[str, Any]:
        return _check_options(dict(self.model_extra or {}), variant_options(), "a variant")


class Entry(BaseModel):
    """One model on the nightly (see the module docstring)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(pattern=NAME_PATTERN)
    adapter: str
    checkpoint: str | None = None
    onnx: str | None = None
    spec: str | None = None
    schedule: str | None = None
    priority_weight: int = Field(default=1, ge=1, le=1000)
    description: str | None = None
    variants: tuple[Variant, ...] = ()
    expected_failures: dict[str, str] = Field(default_factory=dict)

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, value: str) -> str:
        from gfocal_pipeline.adapters import check_model_name

        try:
            return check_model_name(value, "adapter")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_NAMES:
            raise ValueError(f"{value!r} would be the built-in DAG {value}{DAG_SUFFIX}: choose another name")
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is not None and not _SCHEDULE.match(value.strip()):
            raise ValueError(f"{value!r} is not a cron expression of 5 fields or a preset like @daily")
        return None if value is None else value.strip()

    @model_validator(mode="after")
    def _consistent(self) -> Entry:
        self._check_model_files()
        names = [variant.name for variant in self.variants]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"variants {twice} are listed more than once: give each variant its own name")
        unknown = sorted(set(self.expected_failures) - set(names or [DEFAULT_VARIANT]))
        if unknown:
            raise ValueError(
                f"expected_failures names {unknown}, which are not variants ({names or [DEFAULT_VARIANT]})"
            )
        empty = sorted(name for name, why in self.expected_failures.items() if not str(why).strip())
        if empty:
            raise ValueError(f"expected_failures {empty} need a reason (why the variant is known to fail)")
        taken = sorted(set(self.model_extra or {}) & set(ENTRY_KEYS.values()))
        if taken:
            raise ValueError(f"{taken}: set the model with 'adapter' and 'checkpoint' (or 'onnx') instead")
        entry = _check_options(
            dict(self.model_extra or {}), set(_run_options()) - {"model", "checkpoint"}, "an entry"
        )
        self._check_batches(entry)
        return self

    def _check_batches(self, entry: dict[str, Any]) -> None:
        """The inference tool's batch rule (msame runs batch 1) for each variant whose tool and batch
        the file sets (its own or the entry's `entry` options); unset ones come from the form."""
        from gfocal_pipeline.backends.registry import check_batch_size
        from gfocal_pipeline.errors import BackendError

        for index, variant in enumerate(self.variants or [None]):
            changes = variant.options if variant else {}
            merged = {**entry, **changes}
            if "tool" not in merged or "batch_size" not in merged:
                continue
            try:
                check_batch_size(merged["tool"], merged["batch_size"])
            except BackendError as exc:
                where = f"variants.{index}." if variant and "batch_size" in changes else ""
                raise FieldError(f"{where}batch_size", str(exc)) from None

    def _check_model_files(self) -> None:
        if self.adapter == "onnx":
            if not self.onnx or self.checkpoint:
                raise ValueError("adapter onnx takes 'onnx: <graph.onnx>' (and no 'checkpoint')")
            graph = Path(self.onnx)
            beside = [graph.with_suffix(suffix) for suffix in (".spec.yaml", ".spec.yml", ".spec.json")]
            if self.spec and Path(self.spec) not in beside:
                raise ValueError(
                    f"spec {self.spec!r}: the declaration is read beside the graph, as {beside[0]} "
                    f"(or .spec.yml, .spec.json): move it there"
                )
        elif self.onnx or self.spec:
            raise ValueError(
                f"'onnx' and 'spec' are for adapter onnx; adapter {self.adapter!r} takes 'checkpoint'"
            )

    @property
    def dag_id(self) -> str:
        return f"{self.name}{DAG_SUFFIX}"

    def run_options(self) -> dict[str, Any]:
        """The entry's run options by form name (the DAG's form defaults)."""
        options = _check_options(dict(self.model_extra or {}), set(_run_options()), "an entry")
        options["model"] = self.adapter
        model_file = self.onnx or self.checkpoint
        if model_file:
            options["checkpoint"] = str(model_file)
        return options

    def variant_runs(self) -> dict[str, dict[str, Any]]:
        """{variant name: the run options it changes}, in file order; one `default` variant if none."""
        if not self.variants:
            return {DEFAULT_VARIANT: {}}
        return {variant.name: variant.options for variant in self.variants}


@dataclass(frozen=True)
class EntryError:
    """A bad entry: where it is and what is wrong (shown as its placeholder DAG's failure)."""

    path: str
    index: int
    name: str | None
    message: str

    @property
    def dag_id(self) -> str:
        """`<name>_nightly` when the name is usable, else `models_file_entry_<n>_nightly`."""
        if self.name and re.match(NAME_PATTERN, self.name) and self.name not in RESERVED_NAMES:
            return f"{self.name}{DAG_SUFFIX}"
        return f"models_file_entry_{self.index + 1}{DAG_SUFFIX}"

    def __str__(self) -> str:
        who = f"entry {self.index + 1}" + (f" ({self.name!r})" if self.name else "")
        return f"models file {self.path!r}, {who}: {self.message}"


@dataclass(frozen=True)
class ModelsFile:
    """The entries of a models file that are valid, and an error per entry that is not."""

    path: str
    entries: tuple[Entry, ...] = ()
    errors: tuple[EntryError, ...] = field(default_factory=tuple)
    positions: dict[str, int] = field(default_factory=dict)  # entry name -> its index in the file

    def error_of(self, entry: Entry, message: str) -> EntryError:
        """An error found later (building the entry's DAG) of a valid entry."""
        return EntryError(self.path, self.positions.get(entry.name, -1), entry.name, message)


def _field_errors(exc: ValidationError) -> str:
    """pydantic's errors as `field: message; ...` (the field path joined with dots)."""
    parts = []
    for error in exc.errors(include_url=False):
        cause = (error.get("ctx") or {}).get("error")
        loc = [*error["loc"], *([cause.field] if isinstance(cause, FieldError) else [])]
        where = ".".join(str(part) for part in loc) or "entry"
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"field {where!r}: {message}")
    return "; ".join(parts)


def models_file_path(configured: str | None = None) -> str | None:
    """The models file in use: `[gfocal] models_file` (passed in), else $GFOCAL_MODELS_FILE, else none."""
    path = (configured or "").strip() or os.environ.get(MODELS_FILE_ENV, "").strip()
    return path or None


def _read(path: str) -> list[Any]:
    """The `models` list of the file; a ConfigError naming the file and the fix for anything else."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"models file {path!r} cannot be read ({exc.strerror or exc}); fix [gfocal] models_file or "
            f"${MODELS_FILE_ENV}, or unset it for the built-in DAGs only"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"models file {path!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ConfigError(
            f"models file {path!r} must be a mapping with a list under 'models' (docs/models-file.md), "
            f"got {type(data).__name__}"
        )
    unknown = sorted(set(data) - {"models"})
    if unknown:
        raise ConfigError(f"models file {path!r}: unknown top-level key(s) {unknown}; only 'models' is read")
    return data["models"]


def load_models_file(path: str | os.PathLike[str]) -> ModelsFile:
    """Validate every entry of the models file at `path` (see the module docstring).

    A file that cannot be read or is not a `models:` list raises ConfigError (nothing can load);
    a bad entry, or a second entry of a name, is an `EntryError` and the others load."""
    path = str(path)
    entries: list[Entry] = []
    errors: list[EntryError] = []
    seen: set[str] = set()
    positions: dict[str, int] = {}
    for index, raw in enumerate(_read(path)):
        name = raw.get("name") if isinstance(raw, dict) else None
        name = name if isinstance(name, str) else None
        if not isinstance(raw, dict):
            errors.append(EntryError(path, index, None, f"must be a mapping, got {type(raw).__name__}"))
            continue
        try:
            entry = Entry.model_validate(raw)
        except ValidationError as exc:
            errors.append(EntryError(path, index, name, _field_errors(exc)))
            continue
        if entry.name in seen:
            errors.append(
                EntryError(path, index, None, f"field 'name': {entry.name!r} is used by an earlier entry")
            )
            continue
        seen.add(entry.name)
        entries.append(entry)
        positions[entry.name] = index
    return ModelsFile(path, tuple(entries), tuple(errors), positions)
