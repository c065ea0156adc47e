"""`npu-smi info`: which Ascend chips are present, and the `--soc_version` atc needs for them.

The table has two rows per NPU: a device row `| <npu id>  <Name> | <Health> | power temp ... |`
and a chip row `| <chip> [<device>] | <Bus-Id> | AICore memory ... |`. The soc version is
"Ascend" + Name (`310P3` -> `Ascend310P3`, `310` -> `Ascend310`). Device rows are told apart from
chip rows by their second cell: a health word (OK, Warning, Alarm, ...) rather than a PCI bus id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gfocal_pipeline.backends.cann_env import CannEnv
from gfocal_pipeline.backends.process import ProcessHandle, run_tool
from gfocal_pipeline.errors import BackendError

_NAME = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_-]*$")
_HEALTH = re.compile(r"^[A-Za-z][A-Za-z ]*$")


@dataclass(frozen=True)
class NpuDevice:
    npu_id: int
    name: str
    health: str

    @property
    def soc_version(self) -> str:
        return f"Ascend{self.name}"


def parse_npu_smi_info(text: str) -> list[NpuDevice]:
    """The device rows of an `npu-smi info` table (possibly none)."""
    devices = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("|"):
            continue
        cells = [cell.strip() for cell in stripped.strip("|").split("|")]
        if len(cells) < 2:
            continue
        words = cells[0].split()
        if len(words) != 2 or not words[0].isdigit() or not _NAME.match(words[1]):
            continue
        if not _HEALTH.match(cells[1]):  # chip rows carry a bus id here
            continue
        devices.append(NpuDevice(int(words[0]), words[1], cells[1]))
    return devices


def list_npus(env: CannEnv, timeout_s: float = 60.0, handle: ProcessHandle | None = None) -> list[NpuDevice]:
    """Run `npu-smi info` and return its NPUs (at least one; none is a BackendError)."""
    tool = env.which("npu-smi")
    if tool is None:
        raise BackendError(
            "cannot detect the Ascend chip: npu-smi is not on PATH (it ships with the NPU driver); "
            "install the driver or pass soc_version explicitly, e.g. 'Ascend310P3'"
        )
    result = run_tool([tool, "info"], env=env.environ(), name="npu-smi", timeout_s=timeout_s, handle=handle)
    text = "\n".join(result.lines)
    if result.returncode != 0:
        raise BackendError(
            f"`npu-smi info` failed (exit {result.returncode}); is the NPU driver loaded? Output:\n"
            f"{result.tail()}"
        )
    devices = parse_npu_smi_info(text)
    if not devices:
        raise BackendError(
            "`npu-smi info` listed no NPU (no '| <id> <Name> | <Health> |' row), so the soc version cannot "
            "be detected; check that the NPU driver sees the card, or pass soc_version explicitly "
            f"(e.g. 'Ascend310P3'). Output:\n{result.tail()}"
        )
    return devices


def detect_soc_version(env: CannEnv, timeout_s: float = 60.0, handle: ProcessHandle | None = None) -> str:
    """Run `npu-smi info` and return the soc version of the NPUs on this host."""
    devices = list_npus(env, timeout_s, handle)
    names = sorted({device.name for device in devices})
    if len(names) > 1:
        raise BackendError(
            f"`npu-smi info` lists different chips ({', '.join(names)}); pass soc_version explicitly"
        )
    return devices[0].soc_version
