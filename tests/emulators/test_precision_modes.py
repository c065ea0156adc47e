"""The emulated atc keeps its own copy of the documented precision modes: both lists match the doc."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from emulators.toolkit import PYLIB
from gfocal_pipeline.options import PrecisionMode

REFERENCE = Path(
    os.environ.get("GFOCAL_REFERENCE_DOCS", Path(__file__).resolve().parents[3] / "shared" / "reference")
)
DOC = REFERENCE / "ascend-tools.md"


def documented_precision_modes(text: str) -> list[str]:
    """The `--precision_mode` values listed in the reference, in order (`x_fp16/bf16` is two names)."""
    start = text.index("`--precision_mode`") + len("`--precision_mode`")
    segment = text[start : text.index(");", start)]
    segment = re.sub(r"\(default[^)]*\)", "", segment)
    names: list[str] = []
    for token in re.findall(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+(?:/[a-z0-9_]+)*", segment):
        parts = token.split("/")
        names.append(parts[0])
        for part in parts[1:]:  # a bare suffix replaces the last component of the previous name
            names.append(part if "_" in part else names[-1].rsplit("_", 1)[0] + "_" + part)
    return names


def test_pipeline_and_emulator_precision_modes_equal_the_reference() -> None:
    if not DOC.is_file():  # CI has shared/ beside the clone: a missing document must fail, not skip
        pytest.fail(f"reference document {DOC} not found; set GFOCAL_REFERENCE_DOCS to its folder")
    documented = documented_precision_modes(DOC.read_text())
    assert len(documented) == 8 and documented[0] == "force_fp16"
    assert list(PrecisionMode.values()) == documented
    sys.path.insert(0, str(PYLIB))
    try:
        from gfocal_emulator.atc import PRECISION
    finally:
        sys.path.remove(str(PYLIB))
    assert set(documented) == PRECISION


def test_the_parser_reads_the_documented_shape() -> None:
    text = "`--precision_mode` a_b (default for x 5/6) | c_d |\n  e_f (newer: g_h/i_j, k_l_m/n);"
    assert documented_precision_modes(text) == ["a_b", "c_d", "e_f", "g_h", "i_j", "k_l_m", "k_l_n"]
