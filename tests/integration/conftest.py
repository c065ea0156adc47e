"""Fixtures of the multi-process integration tests: one Celery deployment (`cluster.Cluster`) for this
package (up while its tests run, stopped right after them), shared by the REST API tests and the browser
tests; its logs go to test-artifacts/integration/. Its processes read a models file (`models_file`,
written before they start: the DAG processor parses at start) of three entries, whose nightlies
test_models_night.py runs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from emulators.toolkit import Toolkit, make_toolkit

from integration.cluster import (
    CPU_HOST,
    DEADLINE_S,
    PG_ADMIN_URL,
    REDIS_HOST,
    Cluster,
    Inbox,
    free_port,
    running_cluster,
)

DEVICE_SLOTS = 2
# the models file's entries: name -> (adapter, priority weight); each with the two VARIANTS
ZOO = {"it_gfocal": ("gfocalv2", 3), "it_retina": ("retinanet", 2), "it_byo": ("onnx", 1)}
# must_keep_origin_dtype: 22 characters, more than the history's `precision` column held before
VARIANTS = {"fp16": "force_fp16", "keep": "must_keep_origin_dtype"}
# a third variant of one entry that changes the inputs: its own export and preprocessing
OWN_INPUTS = {"it_retina": {"name": "small", "precision_mode": "force_fp16", "height": 96, "width": 96}}


def variants_of(entry: str) -> dict[str, str]:
    """{variant: precision mode} of a ZOO entry, in file order."""
    own = OWN_INPUTS.get(entry)
    return {**VARIANTS, **({own["name"]: own["precision_mode"]} if own else {})}


BROKEN_ENTRY = "it_broken"  # a models file entry with a misspelt option (`batch` for batch_size)
# as test_celery_deployment.SMALL: 3 images at 128 px make 2 shards with the cluster's device_slots
ZOO_SMALL = {"height": 128, "width": 128, "max_images": 3}
ROOT = Path(os.environ.get("GFOCAL_IT_ROOT") or Path(__file__).resolve().parents[2]).resolve()
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "integration"


def _reachable(url: str, default_port: int) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=3):
            return True
    except OSError:
        return False


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="package")
def toolkit(tmp_path_factory: pytest.TempPathFactory) -> Toolkit:
    """The emulated CANN toolkit; only the ascend worker's environment names its set_env.sh."""
    return make_toolkit(tmp_path_factory.mktemp("cann"))


@pytest.fixture(scope="package")
def inbox() -> Iterator[Inbox]:
    from aiosmtpd.controller import Controller

    box = Inbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port())
    controller.start()
    box.port = controller.port
    try:
        yield box
    finally:
        controller.stop()


def _byo_graph(folder: Path) -> dict[str, Any]:
    """The `onnx` entry's model: tests/models' toy detector traced by torch.onnx.export, its
    declaration `<graph>.spec.yaml` beside it, and the COCO-format set it partly hits."""
    from models.byo_graphs import HEIGHT, WIDTH, ToyDets, declaration, write_dataset, write_graph

    graph = write_graph(ToyDets(), folder / "it_byo.onnx", ("dets", "labels"), declaration("dets"))
    coco = write_dataset(folder / "coco")
    return {"onnx": str(graph), "coco_root": str(coco), "height": HEIGHT, "width": WIDTH}


@pytest.fixture(scope="package")
def models_file(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The cluster's models file (`$GFOCAL_MODELS_FILE`): the `ZOO` entries, each with the two
    `VARIANTS` (and `OWN_INPUTS`' variant), small data; demo weights and data except the `onnx`
    entry's own. Returns {"path": its path, "models": its entries}."""
    folder = tmp_path_factory.mktemp("models-file")
    models = []
    for name, (adapter, weight) in ZOO.items():
        data = _byo_graph(folder) if adapter == "onnx" else {}
        variants = [{"name": variant, "precision_mode": mode} for variant, mode in VARIANTS.items()]
        variants += [OWN_INPUTS[name]] if name in OWN_INPUTS else []
        models.append(
            {
                "name": name,
                "adapter": adapter,
                "priority_weight": weight,
                **ZOO_SMALL,
                **data,
                "variants": variants,
            }
        )
    # a bad entry: its placeholder DAG (never unpaused) carries the error; the others still load
    models.append({"name": BROKEN_ENTRY, "adapter": "retinanet", "variants": [{"name": "fp16", "batch": 4}]})
    path = folder / "models.yaml"
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return {"path": path, "models": models}


@pytest.fixture(scope="package")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, inbox: Inbox, models_file: dict[str, Any]
) -> Iterator[Cluster]:
    """Postgres + Redis DB + api-server, scheduler, dag-processor, triggerer and the CPU worker (default
    queue). The ascend worker is started by the tests (they first show a device task waits for it)."""
    for url, port, what in ((PG_ADMIN_URL, 5432, "PostgreSQL"), (REDIS_HOST, 6379, "Redis")):
        if not _reachable(url, port):
            pytest.fail(f"the integration tests need {what} at {url} (see .ci/run / scripts/test.sh)")
    tmp = tmp_path_factory.mktemp("celery-cluster")
    # `timeout` / CI cancellation send SIGTERM: unwind through the finalizers instead of dying with the
    # processes still running (they also get SIGTERM from the kernel if this process is SIGKILLed)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        alerts = {
            "AIRFLOW_CONN_SMTP_DEFAULT": f"smtp://127.0.0.1:{inbox.port}?disable_tls=true&disable_ssl=true",
            "AIRFLOW__GFOCAL__ALERT_TO": "oncall@example.test",
            "AIRFLOW__GFOCAL__NIGHTLY_DEADLINE_HOURS": str(DEADLINE_S / 3600),
            # a lost worker's task is noticed within a minute and retried after seconds (test_worker_loss)
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "AIRFLOW__GFOCAL__RETRY_DELAY_SECONDS": "5",
            # two device slots: a run with the default shard size gets at least two shards
            "AIRFLOW__GFOCAL__DEVICE_SLOTS": str(DEVICE_SLOTS),
            "GFOCAL_MODELS_FILE": str(models_file["path"]),
        }
        with running_cluster(ROOT, tmp, alerts) as deployment:
            deployment.start_worker("worker-cpu", "default", CPU_HOST, concurrency=2)
            yield deployment
    finally:
        signal.signal(signal.SIGTERM, previous)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for log in (tmp / "logs").glob("*.log"):
            shutil.copyfile(log, ARTIFACTS / log.name)


@pytest.fixture(scope="package")
def api(cluster: Cluster) -> Any:
    """An authenticated `apache-airflow-client` ApiClient (simple auth manager token)."""
    import airflow_client.client as client

    configuration = client.Configuration(host=cluster.base_url, access_token=cluster.token())
    with client.ApiClient(configuration) as api_client:
        yield api_client


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How many integration tests ran (CI must show they were not skipped)."""
    counts = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        reports = terminalreporter.stats.get(outcome, [])
        counts[outcome] = sum(
            1
            for r in reports
            if getattr(r, "when", "call") in ("call", "setup") and "integration" in r.keywords
        )
    line = ", ".join(f"{n} {k}" for k, n in counts.items())
    terminalreporter.write_line(f"gfocal integration (Celery, multi-process) tests: {line}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """In this package, the tests that need no cluster run first (its processes would only slow them
    down), the models file's night last (it starts the ascend worker when none runs: not before
    test_celery_deployment, which shows a device task waiting for it); the order of everything else in
    the session is left alone."""
    here = Path(__file__).resolve().parent
    standalone = ("test_ui_script.py", "test_preprocess_in_worker.py")
    last = ("test_models_night.py",)
    slots = [i for i, item in enumerate(items) if item.path.resolve().parent == here]
    ours = sorted(
        (items[i] for i in slots),
        key=lambda item: (item.path.name not in standalone) + (item.path.name in last),
    )
    for slot, item in zip(slots, ours, strict=True):
        items[slot] = item
