"""Helpers the tests import by name (`from support import ...`): the checkout root and real-Airflow
DAG loading, read-only and full file systems, a step lock held by another process, and image files
whose header lies about their size. A module of its own, since `conftest` is not a unique module
name across test folders."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EMULATORS = ROOT / "tests" / "emulators"


def load_dag_file(source: Path, name: str | None = None) -> Any:
    """Copy a DAG file into the test DAG bundle and import it; returns the module."""
    target = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"]) / (name or source.name)
    shutil.copyfile(source, target)
    spec = importlib.util.spec_from_file_location(target.stem, target)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[target.stem] = module
    spec.loader.exec_module(module)
    return module


def xcoms(dag_id: str, run_id: str, key: str = "return_value") -> dict[str, Any]:
    """{task_id or task_id[map_index]: value} of one DAG run's XComs under `key`."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(XComModel)
            .filter(XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.key == key)
            .all()
        )
        return {(r.task_id if r.map_index < 0 else f"{r.task_id}[{r.map_index}]"): r.value for r in rows}


@contextlib.contextmanager
def both_dags(cann_dir: Path) -> Iterator[tuple[Any, Any, Any]]:
    """(gfocal_onnxruntime, gfocal_ascend_nightly, the CANN tool emulators in `cann_dir`) ready for
    `dag.test()` runs: the Ascend pool exists and, meanwhile, the nightly has no DeadlineAlert (Airflow
    3.3's `dag.test()` cannot run one; test_dag_ascend_nightly.py checks the deadline itself)."""
    from airflow.models.pool import Pool
    from emulators.toolkit import make_toolkit

    from gfocal_pipeline.constants import ASCEND_POOL

    os.environ["AIRFLOW__GFOCAL__NIGHTLY_DEADLINE_HOURS"] = "0"
    try:
        Pool.create_or_update_pool(ASCEND_POOL, slots=1, description="Ascend NPUs", include_deferred=False)
        load_dag_file(ROOT / "dags" / "gfocal_factory.py")
        embedded = load_dag_file(ROOT / "dags" / "gfocal_onnxruntime.py").dag
        nightly = load_dag_file(ROOT / "dags" / "gfocal_ascend_nightly.py").dag
        yield embedded, nightly, make_toolkit(cann_dir)
    finally:
        os.environ.pop("AIRFLOW__GFOCAL__NIGHTLY_DEADLINE_HOURS", None)


@contextlib.contextmanager
def mounted(target: Path, options: str) -> Iterator[bool]:
    """A tmpfs at `target` (root only); yields False when mounting is not possible here."""
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        yield False
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    if done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` read-only: a tmpfs mounted `ro` as root (root ignores modes), else chmod 0555."""
    with mounted(folder, "ro,size=1m") as ok:
        if not ok:
            if os.geteuid() == 0:
                raise RuntimeError(f"cannot make {folder} read-only: root without permission to mount")
            folder.chmod(0o555)
        try:
            yield
        finally:
            if not ok:
                folder.chmod(0o755)


@contextlib.contextmanager
def read_only_tree(folder: Path) -> Iterator[None]:
    """`folder` and what it holds, read-only in place: as root a read-only bind mount of it over itself
    (root ignores modes; writes fail with EROFS), else every folder chmod 0555 and file 0444."""
    if os.geteuid() == 0:
        bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
        if bind.returncode != 0:
            raise RuntimeError(f"cannot make {folder} read-only: {bind.stderr.decode().strip()}")
        try:
            ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True)
            if ro.returncode != 0:
                raise RuntimeError(f"cannot remount {folder} read-only: {ro.stderr.decode().strip()}")
            yield
        finally:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        return
    paths = [folder, *folder.rglob("*")]
    modes = {path: path.stat().st_mode for path in paths}
    for path in reversed(paths):
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        yield
    finally:
        for path in paths:
            path.chmod(modes[path])


def run_with_file_size_limit(argv: list[str], limit: int = 1_000_000) -> subprocess.CompletedProcess[str]:
    """`gfocal <argv>` with RLIMIT_FSIZE (SIGXFSZ ignored): writes past `limit` fail with EFBIG, the
    unprivileged stand-in for a full disk."""
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from gfocal_pipeline.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True)


@contextlib.contextmanager
def lock_held_by_a_child(run_dir: Path, step: str) -> Iterator[subprocess.Popen[str]]:
    """`fileio.step_lock(run_dir, step)` held by a live child process until the block ends."""
    code = (
        "import sys\n"
        "from gfocal_pipeline.fileio import step_lock\n"
        "with step_lock(sys.argv[1], sys.argv[2]):\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir), step],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        yield child
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=60)


def image_claiming(width: int, height: int, ext: str = ".jpg") -> bytes:
    """A valid 8x8 JPEG or PNG (a few hundred bytes) whose header claims `width` x `height`: the
    JPEG's SOF0 frame header or the PNG's IHDR chunk patched (decoding it would allocate the claim)."""
    import cv2
    import numpy as np

    ok, encoded = cv2.imencode(ext, np.full((8, 8, 3), 128, np.uint8))
    assert ok
    data = bytearray(encoded.tobytes())
    if ext == ".png":
        data[16:20], data[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    else:
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 7], data[sof + 7 : sof + 9] = height.to_bytes(2, "big"), width.to_bytes(2, "big")
    return bytes(data)


def peak_rss_of_gfocal(argv: list[str]) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run `gfocal <argv>` in a child that reports how much its peak RSS grew while the command ran
    (after its imports): (the finished process, the growth in bytes)."""
    code = (
        "import resource, sys\n"
        "from gfocal_pipeline.cli import main\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "rc = main(sys.argv[1:])\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(f'PEAK_RSS_GROWTH_KB={after - before}', file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True)
    growth = [line for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_GROWTH_KB=")]
    assert growth, done.stderr[-3000:]
    return done, int(growth[-1].split("=")[1]) * 1024


def closed_port() -> int:
    """A loopback TCP port nothing listens on (bound, then released): a service that is down."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel's backlog) but never answers: a hung
    service, or a firewall that lets the handshake through and drops the rest."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@contextlib.contextmanager
def smtp_server() -> Iterator[tuple[int, list[Any]]]:
    """A real SMTP server on loopback (aiosmtpd): yields its port and the list of envelopes it got."""
    from aiosmtpd.controller import Controller

    class Keep:
        def __init__(self) -> None:
            self.envelopes: list[Any] = []

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            self.envelopes.append(envelope)
            return "250 OK"

    handler, port = Keep(), closed_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, handler.envelopes
    finally:
        controller.stop()


def shard_marker(manifest: Any, backend: str, shard: str) -> dict[str, Any]:
    """The done-marker fields a backend writes beside one shard's outputs of `manifest` (what
    evaluation checks the outputs against), for tests that write outputs themselves."""
    return {
        "backend": backend,
        "shard": shard,
        "policy": manifest.policy,
        "dtype": manifest.dtype,
        "input_height": manifest.input_height,
        "input_width": manifest.input_width,
        "shard_digest": manifest.shard_digest(shard),
    }


class SmtpInbox:
    """An aiosmtpd handler keeping every message it receives (alerts over SMTP on loopback)."""

    def __init__(self) -> None:
        import email.message

        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        import email
        import email.policy

        self.messages.append(email.message_from_bytes(envelope.original_content, policy=email.policy.default))
        return "250 OK"


def free_port() -> int:
    """A TCP port free on loopback now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
