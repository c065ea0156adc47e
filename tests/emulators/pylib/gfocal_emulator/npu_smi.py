"""Emulated `npu-smi info`: the documented table with one NPU (Name from $GFOCAL_EMULATOR_CHIP)."""

from __future__ import annotations

import os

from gfocal_emulator.common import CHIP_VARIABLE, faults, record_call

RULE = "+" + "-" * 19 + "+" + "-" * 17 + "+" + "-" * 50 + "+"
DOUBLE = "+" + "=" * 19 + "+" + "=" * 17 + "+" + "=" * 50 + "+"


def row(a: str, b: str, c: str) -> str:
    return f"| {a:<17} | {b:<15} | {c:<48} |"


def main(argv: list[str]) -> int:
    record_call("npu-smi", argv)
    if argv[:1] != ["info"]:
        print("Usage: npu-smi info [-t type] [-i id]")
        return 1 if argv else 0
    chip = os.environ.get(CHIP_VARIABLE, "310P3")
    lines = [
        RULE,
        f"| npu-smi 23.0.0{'':<36}Version: 23.0.0{'':<24}|",
        RULE,
        row("NPU     Name", "Health", "Power(W)     Temp(C)           Hugepages-Usage(page)"),
        row("Chip    Device", "Bus-Id", "AICore(%)    Memory-Usage(MB)"),
        DOUBLE,
    ]
    if "npu_smi_no_chip" not in faults():
        lines += [
            row(f"0       {chip}", "OK", "15.8         42                0    / 0"),
            row("0       0", "0000:3B:00.0", "0            1782 / 21527"),
            DOUBLE,
        ]
    print("\n".join(lines), flush=True)
    return 0
