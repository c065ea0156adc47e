"""History store against real databases: a SQLite file and the Postgres server on 127.0.0.1:5432.

Postgres tests create a uniquely named schema and drop it afterwards. Without a reachable server
they are skipped, unless GFOCAL_REQUIRE_POSTGRES=1 (then they fail).
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from gfocal_pipeline.history import (
    HISTORY_URL_ENV,
    ConfigKey,
    HistoryError,
    HistoryStore,
    RunRecord,
    default_history_url,
)

POSTGRES_URL = os.environ.get("GFOCAL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
CONFIG = ConfigKey("gfocal_r50_fpn_1x", "onnxruntime", "cpu", "fp32", 1, "mmdet")
T0 = datetime(2026, 1, 1, 2, 0, tzinfo=UTC)


def fetch(store: HistoryStore, dag_id: str, run_id: str, config: ConfigKey) -> RunRecord | None:
    """The stored row of one run (read through the store's public query)."""
    rows = [r for r in store.runs(config, limit=1000, dag_id=dag_id) if r.run_id == run_id]
    return rows[0] if rows else None


def make_record(run_id: str, *, ap: float = 0.40, fps: float | None = 100.0, day: int = 0, **kw) -> RunRecord:
    return RunRecord(
        dag_id=kw.pop("dag_id", "gfocal_onnxruntime"),
        run_id=run_id,
        config=kw.pop("config", CONFIG),
        stats={"AP": ap, "AP50": ap + 0.18, "APs": -1.0},
        finished_at=T0 + timedelta(days=day),
        fps=fps,
        latency_ms={"mean": 10.0, "p50": 9.5, "p99": 14.0},
        images=8,
        **kw,
    )


def _postgres_schema():
    engine = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as exc:
        engine.dispose()
        if os.environ.get("GFOCAL_REQUIRE_POSTGRES") == "1":
            raise
        pytest.skip(f"Postgres at {POSTGRES_URL} unreachable: {exc.orig}")
    schema = f"gfocal_test_{uuid.uuid4().hex[:12]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    return engine, schema


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    """A fresh, empty HistoryStore on each real database kind."""
    if request.param == "sqlite":
        with HistoryStore(f"sqlite:///{tmp_path / 'sub' / 'history.sqlite'}") as s:
            yield s
        return
    admin, schema = _postgres_schema()
    try:
        with HistoryStore(POSTGRES_URL, schema=schema) as s:
            yield s
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_round_trip_keeps_every_field(store):
    record = make_record(
        "manual__2026-01-01T02:00:00+00:00",
        ap_delta=-0.0004,
        checkpoint_sha256="a" * 64,
        onnx_sha256="b" * 64,
        om_sha256="c" * 64,
        tool_versions={"torch_version": "2.13.0", "cann_version": "8.0.RC1"},
    )
    store.record(record)
    loaded = fetch(store, record.dag_id, record.run_id, CONFIG)
    assert loaded == record
    assert loaded.finished_at.tzinfo is not None and loaded.finished_at == T0
    assert loaded.verdict is None


def test_recording_a_run_twice_replaces_its_row(store):
    store.record(make_record("r1", fps=80.0))
    store.record(make_record("r1", fps=95.0))
    assert store.count() == 1
    assert fetch(store, "gfocal_onnxruntime", "r1", CONFIG).fps == 95.0


def test_same_run_id_of_another_config_or_dag_is_another_row(store):
    other = ConfigKey("gfocal_r50_fpn_1x", "msame", "Ascend310P3", "fp16", 1, "mmdet")
    store.record(make_record("r1"))
    store.record(make_record("r1", config=other))
    store.record(make_record("r1", dag_id="gfocal_ascend_nightly"))
    assert store.count() == 3
    assert set(store.configurations()) == {CONFIG, other}


def test_verdict_is_stored_on_the_existing_row(store):
    store.record(make_record("r1"))
    store.set_verdict("gfocal_onnxruntime", "r1", CONFIG, {"passed": False, "regressed": ["AP"]})
    loaded = fetch(store, "gfocal_onnxruntime", "r1", CONFIG)
    assert loaded.verdict == "fail"
    assert loaded.verdict_detail == {"passed": False, "regressed": ["AP"]}
    assert loaded.ap == pytest.approx(0.40)
    assert store.count() == 1


def test_verdict_for_an_unrecorded_run_is_an_error(store):
    with pytest.raises(HistoryError, match="record the run before gating"):
        store.set_verdict("gfocal_onnxruntime", "missing", CONFIG, {"passed": True})


def test_passing_history_is_newest_passing_first_without_the_current_run(store):
    for day, verdict in enumerate(["pass", "fail", "pass", "pass", None, "pass"]):
        store.record(make_record(f"r{day}", day=day))
        if verdict:
            store.set_verdict("gfocal_onnxruntime", f"r{day}", CONFIG, {"passed": verdict == "pass"})
    store.record(make_record("other-config", config=ConfigKey("m", "torch", "cpu", "fp32", 1, "mmdet")))
    store.set_verdict(
        "gfocal_onnxruntime",
        "other-config",
        ConfigKey("m", "torch", "cpu", "fp32", 1, "mmdet"),
        {"passed": True},
    )
    history = store.passing_history(CONFIG, limit=3, exclude=("gfocal_onnxruntime", "r5"))
    assert [r.run_id for r in history] == ["r3", "r2", "r0"]
    assert [r.run_id for r in store.passing_history(CONFIG, limit=2)] == ["r5", "r3"]


def test_recent_orders_all_configs_by_time(store):
    store.record(make_record("old", day=0))
    store.record(make_record("new", day=2, config=ConfigKey("m", "torch", "cpu", "fp32", 2, "mmdet")))
    store.record(make_record("mid", day=1))
    assert [r.run_id for r in store.recent(limit=10)] == ["new", "mid", "old"]
    assert [r.run_id for r in store.recent(limit=10, dag_id="nope")] == []


def test_unreachable_postgres_is_a_loud_error_without_the_password():
    store = HistoryStore("postgresql+psycopg://postgres:s3cret@127.0.0.1:1/test")
    with pytest.raises(HistoryError) as info:
        store.record(make_record("r1"))
    message = str(info.value)
    assert "127.0.0.1:1" in message and "recording run 'r1'" in message
    assert "s3cret" not in message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "not a SQLAlchemy URL"),
        ("nosuchdb://host/db", "install the database driver"),
        ("sqlite:////proc/gfocal-no-such-dir/h.sqlite", "cannot create the directory"),
    ],
)
def test_bad_urls_name_the_url_and_the_fix(url, expected):
    with pytest.raises(HistoryError, match=expected):
        HistoryStore(url).count()


def test_default_url_prefers_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(HISTORY_URL_ENV, "postgresql+psycopg://u@db/h")
    assert default_history_url() == "postgresql+psycopg://u@db/h"
    monkeypatch.delenv(HISTORY_URL_ENV)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    assert default_history_url() == f"sqlite:///{tmp_path}/gfocal_history.sqlite"


def test_from_pipeline_collects_the_step_outputs_and_survives_json():
    stats = {key: 0.1 * i for i, key in enumerate(["AP", "AP50", "AP75", "APs", "APm", "APl"])}
    timing = {
        "fps": 42.5,
        "latency_ms": {"mean": 23.5, "p50": 23.0, "p90": 25.0, "p99": 30.0, "min": 20.0, "max": 31.0},
        "batch_size": 1,
        "images": 16,
    }
    record = RunRecord.from_pipeline(
        dag_id="gfocal_ascend_nightly",
        run_id="scheduled__2026-01-02T00:00:00+00:00",
        config={
            "model": "gfocal",
            "backend": "msame",
            "device": "Ascend310P3",
            "precision": "fp16",
            "batch_size": 1,
            "policy": "modelzoo",
        },
        stats=stats,
        timing=timing,
        export_info={
            "onnx_sha256": "d" * 64,
            "checkpoint_sha256": "e" * 64,
            "torch_version": "2.13.0",
            "opset": 11,
        },
        convert_info={"om_sha256": "f" * 64, "cann_version": "8.0", "soc_version": "Ascend310P3"},
        ap_delta=0.001,
        finished_at=datetime(2026, 1, 2, 3, 0, tzinfo=timezone(timedelta(hours=8))),
    )
    assert record.fps == 42.5 and record.images == 16 and record.latency_ms["p99"] == 30.0
    assert record.tool_versions == {
        "torch_version": "2.13.0",
        "cann_version": "8.0",
        "soc_version": "Ascend310P3",
    }
    assert (record.onnx_sha256, record.om_sha256) == ("d" * 64, "f" * 64)
    assert record.finished_at == datetime(2026, 1, 1, 19, 0, tzinfo=UTC)
    assert RunRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"stats": {"AP50": 0.5}}, "no 'AP'"),
        ({"stats": {"AP": 0.4, "mAP": 0.4}}, "unknown COCO stat keys"),
        ({"fps": float("nan")}, "fps must be a finite number"),
        ({"fps": -1.0}, "fps must be >= 0"),
        ({"latency_ms": {"p95": 1.0}}, "unknown latency keys"),
        ({"verdict": "maybe"}, "verdict must be one of"),
        ({"run_id": ""}, "'run_id' must be a non-empty string"),
    ],
)
def test_malformed_records_are_rejected(change, expected):
    values = {"dag_id": "d", "run_id": "r", "config": CONFIG, "stats": {"AP": 0.4}, **change}
    with pytest.raises(HistoryError, match=expected):
        RunRecord(**values)


@pytest.mark.parametrize("batch_size", [0, 1.5, True, "1"])
def test_bad_batch_size_is_rejected(batch_size):
    with pytest.raises(HistoryError, match="batch_size"):
        ConfigKey("m", "b", "d", "fp32", batch_size, "p")
