"""The run options' vocabulary: Enums of every choice, and `option()`, one field's form and bounds.

Each run option is a dataclass field whose metadata is an `OptionSpec` (title, description, bounds,
pattern, nullable). From that one place come the trigger form's JSON schema (`OptionSpec.schema`),
the validation of a value (`check_option`) and the CLI's help. No Airflow import here.
"""

from __future__ import annotations

import difflib
import math
import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field
from enum import StrEnum
from typing import Any

from gfocal_pipeline.backends.process import SHELL_METACHARACTERS
from gfocal_pipeline.errors import ConfigError


class Choice(StrEnum):
    """An Enum whose values are the strings the form, the CLI and XCom carry."""

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class Policy(Choice):
    LETTERBOX = "letterbox"
    MMDET = "mmdet"
    CENTERED = "centered"


class Dtype(Choice):
    FLOAT32 = "float32"
    UINT8 = "uint8"


class Tool(Choice):
    MSAME = "msame"
    AIS_BENCH = "ais_bench"


class OutputFormat(Choice):
    BIN = "BIN"
    TXT = "TXT"


class PrecisionMode(Choice):
    """atc `--precision_mode` values (docs: /reference/ascend-tools.md)."""

    FORCE_FP16 = "force_fp16"
    ALLOW_FP32_TO_FP16 = "allow_fp32_to_fp16"
    MUST_KEEP_ORIGIN_DTYPE = "must_keep_origin_dtype"
    ALLOW_MIX_PRECISION = "allow_mix_precision"
    FORCE_FP32 = "force_fp32"
    CUBE_FP16IN_FP32OUT = "cube_fp16in_fp32out"
    ALLOW_MIX_PRECISION_FP16 = "allow_mix_precision_fp16"
    ALLOW_MIX_PRECISION_BF16 = "allow_mix_precision_bf16"


class Engine(Choice):
    FASTER_COCO_EVAL = "faster-coco-eval"
    PYCOCOTOOLS = "pycocotools"


# escaped for a character class in both Python and ECMA regexes (the UI validates with the latter)
_UNSAFE_CLASS = "".join(
    "\\" + ch if ch in "\\[]^-" else ch for ch in sorted(SHELL_METACHARACTERS) if ch >= " "
)
# absolute, normalized (no empty, `.` or `..` component, no trailing slash), no shell metacharacters
_PART = rf"(?!\.\.?(?:/|$))[^/\x00-\x1f{_UNSAFE_CLASS}]+"
PATH_PATTERN = rf"^(?:/{_PART})+$"
SUBPATH_PATTERN = rf"^{_PART}(?:/{_PART})*$"
SOC_PATTERN = r"^Ascend[0-9A-Za-z]+$"


@dataclass(frozen=True)
class OptionSpec:
    """What the form, the validation and the CLI know about one option."""

    title: str
    description: str
    kind: type  # bool, int, float, str or a Choice subclass
    nullable: bool = False
    path: bool = False  # an absolute path
    subpath: bool = False  # a path relative to another option's folder (no `..`)
    minimum: float | None = None
    exclusive_minimum: float | None = None
    maximum: float | None = None
    exclusive_maximum: float | None = None
    multiple_of: int | None = None
    pattern: str | None = None
    # allowed strings of a str option, or a function giving them when asked (e.g. the model adapters
    # registered so far: an adapter registered after this module was imported is allowed too)
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    hint: str = ""  # how to fix a bad value, added to error messages

    def allowed(self) -> tuple[str, ...] | None:
        """The allowed strings of a str option with `choices` (None: any)."""
        return self.choices() if callable(self.choices) else self.choices

    def schema(self) -> dict[str, Any]:
        """JSON-schema keywords of the option (what Airflow's `Param` validates with)."""
        names = {bool: "boolean", int: "integer", float: "number", str: "string"}
        base = "string" if issubclass(self.kind, Choice) else names[self.kind]
        out: dict[str, Any] = {"type": ["null", base] if self.nullable else base}
        if issubclass(self.kind, Choice) or self.choices:
            allowed = self.kind.values() if issubclass(self.kind, Choice) else list(self.allowed() or ())
            out["enum"] = [*allowed, *([None] if self.nullable else [])]
        keywords = {
            "minimum": self.minimum,
            "exclusiveMinimum": self.exclusive_minimum,
            "maximum": self.maximum,
            "exclusiveMaximum": self.exclusive_maximum,
            "multipleOf": self.multiple_of,
            "pattern": PATH_PATTERN if self.path else SUBPATH_PATTERN if self.subpath else self.pattern,
        }
        out.update({key: value for key, value in keywords.items() if value is not None})
        return out


def option(default: Any = MISSING, *, default_factory: Any = MISSING, **spec: Any) -> Any:
    """A dataclass field carrying its `OptionSpec` (see the module docstring)."""
    return field(default=default, default_factory=default_factory, metadata={"option": OptionSpec(**spec)})


def spec_of(item: Field) -> OptionSpec:
    return item.metadata["option"]


def default_of(item: Field) -> Any:
    if item.default_factory is not MISSING:
        return item.default_factory()
    return None if item.default is MISSING else item.default


def check_path(name: str, value: str) -> str:
    """An absolute, normalized path without `..` or shell metacharacters (relative ones are refused)."""
    if not value.startswith("/") or posixpath.normpath(value) != value or not re.match(PATH_PATTERN, value):
        raise ConfigError(
            f"parameter {name!r} = {value!r} must be an absolute, normalized path (no '..', '.', '//' "
            "or trailing '/') without shell metacharacters; e.g. /data/coco"
        )
    return value


def check_subpath(name: str, value: str) -> str:
    """A relative, normalized path without `..` or shell metacharacters (e.g. `val2017`)."""
    if not re.match(SUBPATH_PATTERN, value):
        raise ConfigError(
            f"parameter {name!r} = {value!r} must be a relative, normalized path inside the COCO root "
            "(no leading '/', no '..', '.', '//' or trailing '/') without shell metacharacters; e.g. val2017"
        )
    return value


def _number(name: str, value: Any, spec: OptionSpec) -> int | float:
    whole = spec.kind is int
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(
            f"parameter {name!r} must be {'an integer' if whole else 'a number'}, got {value!r}"
        )
    try:
        number = (int if whole else float)(value)
    except ValueError:
        raise ConfigError(
            f"parameter {name!r} must be {'an integer' if whole else 'a number'}, got {value!r}"
        ) from None
    if whole and isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"parameter {name!r} must be a whole number, got {value!r}")
    if not whole and not math.isfinite(number):
        raise ConfigError(f"parameter {name!r} must be a finite number, got {value!r}")
    return number


def _bounds(name: str, number: float, spec: OptionSpec) -> None:
    low = -math.inf if spec.minimum is None else spec.minimum
    high = math.inf if spec.maximum is None else spec.maximum
    too_low = number < low or (spec.exclusive_minimum is not None and number <= spec.exclusive_minimum)
    too_high = number > high or (spec.exclusive_maximum is not None and number >= spec.exclusive_maximum)
    multiple = spec.multiple_of is None or number % spec.multiple_of == 0
    if too_low or too_high or not multiple:
        floor = f"> {spec.exclusive_minimum:g}" if spec.exclusive_minimum is not None else f">= {low:g}"
        limit = f"< {spec.exclusive_maximum:g}" if spec.exclusive_maximum is not None else f"<= {high:g}"
        extra = f", a multiple of {spec.multiple_of}" if spec.multiple_of else ""
        hint = f" ({spec.hint})" if spec.hint else ""
        raise ConfigError(f"parameter {name!r} = {number:g} must be {floor} and {limit}{extra}{hint}")


def _check_choice(name: str, text: str, spec: OptionSpec) -> None:
    """A str option with `choices` must be one of them (the nearest is named)."""
    allowed = spec.allowed()
    if allowed and text not in allowed:
        near = difflib.get_close_matches(text, allowed, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"parameter {name!r} = {text!r} must be one of: {', '.join(allowed)}{hint}")


def check_option(name: str, value: Any, spec: OptionSpec) -> Any:
    """`value` checked against `spec` and converted to its kind (a Choice member, int, float or str)."""
    if value is None or (value == "" and spec.nullable):
        if spec.nullable:
            return None
        raise ConfigError(f"parameter {name!r} is required ({spec.description})")
    if issubclass(spec.kind, Choice):
        try:
            return spec.kind(value)
        except ValueError:
            choices = ", ".join(spec.kind.values())
            raise ConfigError(f"parameter {name!r} = {value!r} must be one of: {choices}") from None
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"parameter {name!r} must be true or false, got {value!r}")
        return value
    if spec.kind in (int, float):
        number = _number(name, value, spec)
        _bounds(name, number, spec)
        return number
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"parameter {name!r} must be a non-empty string, got {value!r}")
    if spec.path:
        return check_path(name, text)
    if spec.subpath:
        return check_subpath(name, text)
    _check_choice(name, text, spec)
    if spec.pattern and not re.match(spec.pattern, text):
        raise ConfigError(f"parameter {name!r} = {text!r} does not match {spec.pattern} ({spec.hint})")
    return text


def plain(value: Any) -> Any:
    """A Choice member as its string, anything else unchanged (for XCom / JSON)."""
    return value.value if isinstance(value, Choice) else value
