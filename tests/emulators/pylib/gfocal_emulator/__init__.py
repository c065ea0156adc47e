"""Test-only emulators of the Ascend tools (atc, msame, ais_bench, npu-smi).

They follow the command-line contracts in `shared/reference/ascend-tools.md` (flags, exit codes, log
lines, output folders and file formats) and compute with ONNX Runtime + numpy, so the product code can
be exercised end to end without an NPU. Independent of `gfocal_pipeline` on purpose: a bug in the
product cannot hide behind the same bug in its emulator.

Misbehaviour on request: `GFOCAL_EMULATOR_FAULT` = comma-separated fault names (see `FAULTS`).
Every call is appended as one JSON line to `$GFOCAL_EMULATOR_CALL_LOG` when that is set.
"""
