"""Fault switches, the call log and msame/ais_bench folder names shared by the emulators."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time

FAULT_VARIABLE = "GFOCAL_EMULATOR_FAULT"
CALL_LOG_VARIABLE = "GFOCAL_EMULATOR_CALL_LOG"
MSAME_VERSION_VARIABLE = "GFOCAL_EMULATOR_MSAME_VERSION"  # "2021" (padded folder, old success line) | "2022"
CHIP_VARIABLE = "GFOCAL_EMULATOR_CHIP"  # npu-smi Name column, default 310P3
# a device that is worse on purpose: the class index (0..79) whose scores it zeroes before its NMS
DROP_CLASS_VARIABLE = "GFOCAL_EMULATOR_DROP_CLASS"


def dropped_class() -> int | None:
    text = os.environ.get(DROP_CLASS_VARIABLE, "").strip()
    return int(text) if text else None


FAULTS = {
    "atc_e10001": "atc fails with a parameter error (E10001) and exit 1",
    "atc_e19999": "atc fails with an inner error (E19999) and exit 1",
    "atc_no_om": "atc prints the success line but writes no .om",
    "atc_arch_suffix": "atc writes <output>_linux_x86_64.om instead of <output>.om",
    "atc_hang": "atc sleeps for 10 minutes (timeouts, on_kill)",
    "npu_smi_no_chip": "npu-smi prints the table without any NPU row",
    "msame_not_om": "msame prints '[ERROR] input model file type is not .om' and exits 0",
    "msame_exit0_no_success": "msame does its work but never prints the success line",
    "msame_drop_output": "msame writes no output_1 file for the last input",
    "msame_extra_output": "msame writes an extra output file",
    "msame_garbage_timing": "msame prints an unparsable average time",
    "msame_fail": "msame fails ([ERROR] Sample process failed, exit 1)",
    "msame_hang": "msame sleeps for 10 minutes after starting",
    "ais_drop_output": "ais_bench writes no _1 file for the last input",
    "ais_extra_output": "ais_bench writes an extra output file",
    "ais_no_summary": "ais_bench writes no summary json",
    "ais_fail": "ais_bench raises (traceback, exit 1)",
}


def faults() -> set[str]:
    names = {f.strip() for f in os.environ.get(FAULT_VARIABLE, "").split(",") if f.strip()}
    unknown = names - set(FAULTS)
    if unknown:
        print(f"emulator: unknown fault(s) {sorted(unknown)}; known: {sorted(FAULTS)}", file=sys.stderr)
        sys.exit(97)
    return names


def record_call(tool: str, argv: list[str]) -> None:
    path = os.environ.get(CALL_LOG_VARIABLE)
    if not path:
        return
    entry = {"tool": tool, "argv": argv, "cwd": os.getcwd(), "pid": os.getpid(), "time": time.time()}
    with open(path, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def msame_folder_name(now: dt.datetime, version: str) -> str:
    """msame's per-run folder: `%Y%m%d_%H%M%S` (<= 2021-08) or unpadded `Ymd_H_M_S_usec` (newer)."""
    if version == "2021":
        return now.strftime("%Y%m%d_%H%M%S")
    return f"{now.year}{now.month}{now.day}_{now.hour}_{now.minute}_{now.second}_{now.microsecond}"


def ais_folder_name(now: dt.datetime) -> str:
    return now.strftime("%Y_%m_%d-%H_%M_%S")
