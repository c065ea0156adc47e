"""History store against real databases: a SQLite file and the Postgres server on 127.0.0.1:5432.

Postgres tests create a uniquely named schema and drop it afterwards. Without a reachable server
they are skipped, unless GFOCAL_REQUIRE_POSTGRES=1 (then they fail). The migration tests build the
table as it was before dataset keys (OLD_COLUMNS, spelled out here, independent of history.py).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from gfocal_pipeline.history import (
    HISTORY_URL_ENV,
    LEGACY_DATASET,
    TABLE_NAME,
    ConfigKey,
    HistoryError,
    HistoryStore,
    RunRecord,
    default_history_url,
)

POSTGRES_URL = os.environ.get("GFOCAL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
DATASET_A = "ann:0123456789abcdef+img:fedcba9876543210"
DATASET_B = "ann:0123456789abcdef+img:00112233aabbccdd"  # same annotations, other images
CONFIG = ConfigKey("gfocal_r50_fpn_1x", "onnxruntime", "cpu", "fp32", 1, "mmdet", DATASET_A)
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
    other = ConfigKey("gfocal_r50_fpn_1x", "msame", "Ascend310P3", "fp16", 1, "mmdet", DATASET_A)
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
    store.record(
        make_record("other-config", config=ConfigKey("m", "torch", "cpu", "fp32", 1, "mmdet", DATASET_A))
    )
    store.set_verdict(
        "gfocal_onnxruntime",
        "other-config",
        ConfigKey("m", "torch", "cpu", "fp32", 1, "mmdet", DATASET_A),
        {"passed": True},
    )
    history = store.passing_history(CONFIG, limit=3, exclude=("gfocal_onnxruntime", "r5"))
    assert [r.run_id for r in history] == ["r3", "r2", "r0"]
    assert [r.run_id for r in store.passing_history(CONFIG, limit=2)] == ["r5", "r3"]


def test_recent_orders_all_configs_by_time(store):
    store.record(make_record("old", day=0))
    store.record(
        make_record("new", day=2, config=ConfigKey("m", "torch", "cpu", "fp32", 2, "mmdet", DATASET_A))
    )
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
            "dataset": DATASET_A,
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
        ConfigKey("m", "b", "d", "fp32", batch_size, "p", DATASET_A)


def test_dataset_is_part_of_the_key_and_shows_shortly_in_label_and_slug():
    other = replace(CONFIG, dataset=DATASET_B)
    legacy = replace(CONFIG, dataset=LEGACY_DATASET)
    assert len({CONFIG, other, legacy}) == 3
    assert CONFIG.label.endswith("mmdet data ann:01234567+img:fedcba98")
    assert other.label.endswith("data ann:01234567+img:00112233")
    assert legacy.label.endswith(f"data {LEGACY_DATASET}") and legacy.legacy and not CONFIG.legacy
    slugs = {key.slug for key in (CONFIG, other, legacy)}
    assert len(slugs) == 3
    assert all(ch.isalnum() or ch in "-_." for slug in slugs for ch in slug)


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [("", "non-empty string"), ("  ", "non-empty string"), (None, "non-empty string"), (7, "non-empty")],
)
def test_bad_dataset_is_rejected(dataset, expected):
    with pytest.raises(HistoryError, match=f"'dataset' must be a {expected}"):
        replace(CONFIG, dataset=dataset)


def test_overlong_dataset_names_the_fix():
    with pytest.raises(HistoryError, match=r"101 characters.*pass Manifest.dataset_id"):
        replace(CONFIG, dataset="x" * 101)


def test_from_pipeline_requires_a_new_dataset_identity():
    config = {**CONFIG.as_dict()}
    del config["dataset"]
    with pytest.raises(HistoryError, match=r"missing \['dataset'\].*Manifest.dataset_id"):
        RunRecord.from_pipeline(dag_id="d", run_id="r", config=config, stats={"AP": 0.4})
    with pytest.raises(HistoryError, match="before dataset keys"):
        RunRecord.from_pipeline(
            dag_id="d", run_id="r", config={**config, "dataset": LEGACY_DATASET}, stats={"AP": 0.4}
        )


def test_from_dict_of_a_record_before_dataset_keys_gets_the_legacy_label():
    data = json.loads(json.dumps(make_record("r1").to_dict()))
    del data["config"]["dataset"]
    loaded = RunRecord.from_dict(data)
    assert loaded.config == replace(CONFIG, dataset=LEGACY_DATASET)
    assert loaded == replace(make_record("r1"), config=loaded.config)


def test_two_datasets_of_the_same_size_never_share_history(store):
    other = replace(CONFIG, dataset=DATASET_B)  # same model, backend, policy (incl. image count)
    for day, config in enumerate([CONFIG, other, CONFIG, other]):
        store.record(make_record(f"r{day}", day=day, config=config))
        store.set_verdict("gfocal_onnxruntime", f"r{day}", config, {"passed": True})
    assert [r.run_id for r in store.passing_history(CONFIG, limit=10)] == ["r2", "r0"]
    assert [r.run_id for r in store.passing_history(other, limit=10)] == ["r3", "r1"]
    assert store.configurations() == [other, CONFIG]


def test_a_retry_that_scored_a_changed_dataset_replaces_its_row(store):
    store.record(make_record("r1", fps=80.0))
    store.record(make_record("r1", fps=95.0, config=replace(CONFIG, dataset=DATASET_B)))
    assert store.count() == 1
    assert fetch(store, "gfocal_onnxruntime", "r1", CONFIG) is None
    assert fetch(store, "gfocal_onnxruntime", "r1", replace(CONFIG, dataset=DATASET_B)).fps == 95.0
    with pytest.raises(HistoryError, match="record the run before gating"):
        store.set_verdict("gfocal_onnxruntime", "r1", CONFIG, {"passed": True})


def test_a_second_record_of_a_runs_backend_never_adds_a_row(store):
    """One row per (dag_id, run_id, backend): a cleared run whose reference moved from CUDA to the CPU
    (or any other configuration change) replaces its row; other backends and runs are untouched."""
    torch_cuda = ConfigKey("gfocal_r50_fpn_1x", "torch", "cuda", "fp32", 1, "mmdet", DATASET_A)
    other_run = make_record("r2", config=torch_cuda)
    store.record(make_record("r1"))  # the device backend of r1: stays
    store.record(make_record("r1", config=torch_cuda, fps=10.0))
    store.record(other_run)
    store.set_verdict("gfocal_onnxruntime", "r1", torch_cuda, {"passed": True})
    store.record(make_record("r1", config=replace(torch_cuda, device="cpu"), fps=2.0))
    store.record(make_record("r1", config=replace(torch_cuda, device="cpu"), fps=2.5))  # twice: same
    assert store.count() == 3
    assert fetch(store, "gfocal_onnxruntime", "r1", torch_cuda) is None
    moved = fetch(store, "gfocal_onnxruntime", "r1", replace(torch_cuda, device="cpu"))
    assert moved.fps == 2.5 and moved.verdict is None
    assert fetch(store, "gfocal_onnxruntime", "r1", CONFIG).fps == 100.0
    assert fetch(store, "gfocal_onnxruntime", "r2", torch_cuda) == other_run


# --- migration of a table created before dataset keys --------------------------------------------

OLD_CONFIG_FIELDS = ("model", "backend", "device", "precision", "batch_size", "policy")
OLD_STATS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
OLD_STATS += ("ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large")
OLD_LATENCY = ("mean", "p50", "p90", "p99", "min", "max")
LEGACY = replace(CONFIG, dataset=LEGACY_DATASET)


def old_table(schema: str | None) -> sa.Table:
    """The results table exactly as history.py created it before the dataset column."""
    return sa.Table(
        TABLE_NAME,
        sa.MetaData(schema=schema),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dag_id", sa.String(250), nullable=False),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("backend", sa.String(50), nullable=False),
        sa.Column("device", sa.String(100), nullable=False),
        sa.Column("precision", sa.String(20), nullable=False),
        sa.Column("batch_size", sa.Integer, nullable=False),
        sa.Column("policy", sa.String(50), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(64)),
        sa.Column("onnx_sha256", sa.String(64)),
        sa.Column("om_sha256", sa.String(64)),
        sa.Column("tool_versions", sa.JSON, nullable=False),
        *(sa.Column(column, sa.Float) for column in OLD_STATS),
        sa.Column("ap_delta", sa.Float),
        sa.Column("fps", sa.Float),
        *(sa.Column(f"latency_{key}_ms", sa.Float) for key in OLD_LATENCY),
        sa.Column("images", sa.Integer),
        sa.Column("verdict", sa.String(10)),
        sa.Column("verdict_detail", sa.JSON),
        sa.UniqueConstraint("dag_id", "run_id", *OLD_CONFIG_FIELDS, name=f"uq_{TABLE_NAME}_run_config"),
        sa.Index(f"ix_{TABLE_NAME}_config_time", *OLD_CONFIG_FIELDS, "finished_at"),
    )


def old_row(run_id: str, day: int, ap: float, verdict: str | None) -> dict:
    """A row as the old `_row_values` wrote it (its verdict_detail as the old gate stored it)."""
    old_config = {name: getattr(CONFIG, name) for name in OLD_CONFIG_FIELDS}
    detail = None if verdict is None else {"passed": verdict == "pass", "config": old_config}
    return {
        "dag_id": "gfocal_onnxruntime",
        "run_id": run_id,
        **old_config,
        "finished_at": T0 + timedelta(days=day),
        "recorded_at": T0 + timedelta(days=day, minutes=1),
        "checkpoint_sha256": "a" * 64,
        "onnx_sha256": None,
        "om_sha256": None,
        "tool_versions": {"torch_version": "2.13.0"},
        "ap": ap,
        "ap50": ap + 0.18,
        "fps": 100.0,
        "latency_p50_ms": 9.5,
        "images": 8,
        "verdict": verdict,
        "verdict_detail": detail,
    }


OLD_ROWS = [
    ("old0", 0.401, "pass"),
    ("old1", 0.399, "pass"),
    ("old2", 0.390, "fail"),
    ("old3", 0.402, "pass"),
]


@pytest.fixture(params=["sqlite", "postgres"])
def old_database(request, tmp_path):
    """(url, schema, old table, engine) of a database holding the old table with OLD_ROWS."""
    if request.param == "sqlite":
        url, schema = f"sqlite:///{tmp_path / 'old.sqlite'}", None
        engine = sa.create_engine(url)
    else:
        engine, schema = _postgres_schema()
        url = POSTGRES_URL
    table = old_table(schema)
    with engine.begin() as conn:
        table.metadata.create_all(conn)
        conn.execute(
            sa.insert(table), [old_row(run_id, day, ap, v) for day, (run_id, ap, v) in enumerate(OLD_ROWS)]
        )
    try:
        yield url, schema, table, engine
    finally:
        if schema:
            with engine.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def _migration_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "added column 'dataset'" in r.getMessage()]


def test_opening_a_table_of_before_dataset_keys_migrates_it_in_place(old_database, caplog):
    from gfocal_pipeline.gate import run_gate

    url, schema, table, engine = old_database
    caplog.set_level(logging.INFO, logger="gfocal_pipeline.history")
    with HistoryStore(url, schema=schema) as store:
        assert store.count() == len(OLD_ROWS)
        (message,) = _migration_logs(caplog)
        assert f"{len(OLD_ROWS)} existing row(s)" in message and LEGACY_DATASET in message
        assert store.configurations() == [LEGACY]
        kept = store.runs(LEGACY, limit=10)
        assert [(r.run_id, r.ap, r.verdict) for r in kept] == [
            (run_id, pytest.approx(ap), v) for run_id, ap, v in reversed(OLD_ROWS)
        ]
        assert kept[0].tool_versions == {"torch_version": "2.13.0"} and kept[0].latency_ms == {"p50": 9.5}
        assert kept[0].verdict_detail["config"]["policy"] == "mmdet"
        assert [r.run_id for r in store.recent(limit=10)] == [run_id for run_id, _, _ in reversed(OLD_ROWS)]
        assert [r.run_id for r in store.passing_history(LEGACY, limit=10)] == ["old3", "old1", "old0"]
        assert store.passing_history(CONFIG, limit=10) == []

        # A new run far below the old runs' AP: judged on floors only, not failed against them.
        new = make_record("new", ap=0.30, day=10)
        store.record(new)
        verdict = run_gate(store, new, {"baseline_runs": 3})
        assert verdict["passed"] and verdict["first_run"] and verdict["baseline_runs"] == []
        assert any("no passing history for this configuration and dataset" in n for n in verdict["notes"])
        assert set(store.configurations()) == {CONFIG, LEGACY}

    # A worker still running the old code writes without the dataset: its row is legacy too.
    with engine.begin() as conn:
        conn.execute(sa.insert(table).values(**old_row("old-writer", 11, 0.41, "pass")))

    caplog.clear()
    with HistoryStore(url, schema=schema) as again:  # opening again is a no-op
        assert again.count() == len(OLD_ROWS) + 2
        assert _migration_logs(caplog) == []
        assert [r.run_id for r in again.passing_history(LEGACY, limit=1)] == ["old-writer"]
        assert [r.run_id for r in again.passing_history(CONFIG, limit=10)] == ["new"]
    columns = [c["name"] for c in sa.inspect(engine).get_columns(TABLE_NAME, schema=schema)]
    assert columns.count("dataset") == 1


def test_stores_opening_an_old_table_at_once_migrate_it_once(old_database, caplog):
    url, schema, _, _ = old_database
    caplog.set_level(logging.INFO, logger="gfocal_pipeline.history")
    openers = 4
    barrier = threading.Barrier(openers)
    counts: list[int] = []
    errors: list[BaseException] = []

    def open_store() -> None:
        store = HistoryStore(url, schema=schema)
        try:
            barrier.wait(timeout=30)
            counts.append(store.count())
        except BaseException as exc:  # reported below, with the other threads' results
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=open_store) for _ in range(openers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and counts == [len(OLD_ROWS)] * openers
    assert len(_migration_logs(caplog)) == 1


def test_a_table_of_before_takes_atcs_longest_precision_modes(old_database, caplog):
    """The old precision column held 20 characters; `allow_mix_precision_bf16` (a variant's precision
    mode) has 24: the store widens the column when it opens the table, rows kept."""
    url, schema, _, engine = old_database
    caplog.set_level(logging.INFO, logger="gfocal_pipeline.history")
    long_mode = "allow_mix_precision_bf16"
    with HistoryStore(url, schema=schema) as store:
        store.record(make_record("variant-night", config=replace(CONFIG, precision=long_mode)))
        assert store.count() == len(OLD_ROWS) + 1
        (row,) = store.runs(replace(CONFIG, precision=long_mode), limit=5)
        assert row.config.precision == long_mode
    widened = [r.getMessage() for r in caplog.records if "widened column 'precision'" in r.getMessage()]
    length = next(
        c["type"].length
        for c in sa.inspect(engine).get_columns(TABLE_NAME, schema=schema)
        if c["name"] == "precision"
    )
    if engine.dialect.name == "postgresql":
        assert len(widened) == 1 and "from 20 to 40" in widened[0] and length == 40
    else:  # SQLite does not enforce VARCHAR lengths: nothing to migrate
        assert widened == []


def test_a_precision_longer_than_the_column_is_refused_by_name():
    with pytest.raises(HistoryError, match="'precision' is 41 characters"):
        replace(CONFIG, precision="x" * 41)
