"""A fake CANN toolkit directory whose `set_env.sh` puts the emulated tools on PATH.

Layout (mirrors /usr/local/Ascend/ascend-toolkit):
    <root>/ascend-toolkit/set_env.sh
    <root>/ascend-toolkit/latest/bin/{python3, atc, msame, npu-smi}
    <root>/ascend-toolkit/latest/x86_64-linux/ascend_toolkit_install.info   (version=...)
    <root>/ascend-toolkit/calls.jsonl                                        (every emulator call)

The emulators are `#!/usr/bin/env python3` scripts; `latest/bin/python3` is a tiny wrapper that
execs the interpreter running the tests, so they (and `python3 -m ais_bench`) use this venv.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

EMULATORS = Path(__file__).resolve().parent
BIN = EMULATORS / "bin"
PYLIB = EMULATORS / "pylib"
ALL_TOOLS = ("atc", "msame", "npu-smi", "ais_bench")


@dataclass(frozen=True)
class Toolkit:
    home: Path
    set_env: Path
    call_log: Path
    version: str

    def calls(self, tool: str | None = None) -> list[dict]:
        if not self.call_log.is_file():
            return []
        entries = [json.loads(line) for line in self.call_log.read_text().splitlines() if line]
        return [e for e in entries if tool is None or e["tool"] == tool]


def make_toolkit(
    root: str | os.PathLike[str],
    tools: tuple[str, ...] = ALL_TOOLS,
    version: str = "7.0.RC1",
    python: str = sys.executable,
) -> Toolkit:
    """Create the fake toolkit under `root` with only `tools` installed; returns its paths."""
    for script in BIN.iterdir():  # a checkout may lose the exec bit
        mode = script.stat().st_mode
        if not mode & stat.S_IXUSR:
            script.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    home = Path(root) / "ascend-toolkit"
    latest = home / "latest"
    bin_dir = latest / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "python3"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(python)} "$@"\n')
    wrapper.chmod(0o755)
    for tool in tools:
        if tool != "ais_bench":
            (bin_dir / tool).symlink_to(BIN / tool)
    info_dir = latest / "x86_64-linux"
    info_dir.mkdir(parents=True, exist_ok=True)
    (info_dir / "ascend_toolkit_install.info").write_text(
        f"package_name=Ascend-cann-toolkit\nversion={version}\ninnerversion=V100R001C00\narch=x86_64\n"
        "os=linux\npath=/usr/local/Ascend/ascend-toolkit/latest/x86_64-linux\n"
    )
    call_log = home / "calls.jsonl"
    pythonpath = (
        f'export PYTHONPATH={shlex.quote(str(PYLIB))}:"${{PYTHONPATH:-}}"\n' if "ais_bench" in tools else ""
    )
    set_env = home / "set_env.sh"
    set_env.write_text(
        "# Emulated CANN toolkit environment (gfocal-airflow tests); not a real CANN install.\n"
        f"export ASCEND_TOOLKIT_HOME={shlex.quote(str(latest))}\n"
        'export ASCEND_HOME_PATH="$ASCEND_TOOLKIT_HOME"\n'
        'export ASCEND_OPP_PATH="$ASCEND_TOOLKIT_HOME/opp"\n'
        'export ASCEND_AICPU_PATH="$ASCEND_TOOLKIT_HOME"\n'
        'export TOOLCHAIN_HOME="$ASCEND_TOOLKIT_HOME/toolkit"\n'
        'export LD_LIBRARY_PATH="$ASCEND_TOOLKIT_HOME/lib64:${LD_LIBRARY_PATH:-}"\n'
        'export PATH="$ASCEND_TOOLKIT_HOME/bin:$PATH"\n'
        f"{pythonpath}"
        f"export GFOCAL_EMULATOR_CALL_LOG={shlex.quote(str(call_log))}\n"
        'echo "emulated CANN environment set"\n'
    )
    return Toolkit(home=home, set_env=set_env, call_log=call_log, version=version)
