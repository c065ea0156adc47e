"""Results history: one row per finished run and configuration, in a database of its own.

The store is plain SQLAlchemy Core (no Airflow import), so the gate, the alerts, the CLI and the
plugin's trend page all read the same table. Any SQLAlchemy URL works; the default is a SQLite file
beside the Airflow home. Recording is an upsert keyed by (dag_id, run_id, configuration without the
dataset), and a run holds one row per backend: a retried task replaces its own row instead of adding
a second one (also when the retry scored a changed dataset or ran on another device), and the gate
only ever updates the verdict columns of a row that already exists, so a failing gate never loses
the measurement.

The configuration includes the dataset identity (`Manifest.dataset_id`), so runs on two datasets of
the same size never share a baseline. A table created before that column existed is migrated when a
store first opens it: its rows get LEGACY_DATASET, which no new run can carry, so they stay in the
trend page and the history but never become the baseline of a new run.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, SQLAlchemyError

from gfocal_pipeline.errors import GfocalError

log = logging.getLogger(__name__)

HISTORY_URL_ENV = "GFOCAL_HISTORY_URL"
HISTORY_FILE_NAME = "gfocal_history.sqlite"
TABLE_NAME = "gfocal_run_results"

# COCO summary key -> column name (SQL-friendly, case-insensitive databases would merge APs/APS).
STAT_COLUMNS: dict[str, str] = {
    "AP": "ap",
    "AP50": "ap50",
    "AP75": "ap75",
    "APs": "ap_small",
    "APm": "ap_medium",
    "APl": "ap_large",
    "AR1": "ar1",
    "AR10": "ar10",
    "AR100": "ar100",
    "ARs": "ar_small",
    "ARm": "ar_medium",
    "ARl": "ar_large",
}
LATENCY_KEYS = ("mean", "p50", "p90", "p99", "min", "max")
VERDICTS = ("pass", "fail")
# What a row is recorded under (with dag_id and run_id); the gate's key adds the dataset.
ROW_CONFIG_FIELDS = ("model", "backend", "device", "precision", "batch_size", "policy")
CONFIG_FIELDS = (*ROW_CONFIG_FIELDS, "dataset")
# The dataset of rows recorded before the history knew datasets. New identities look like
# `ann:<16 hex>+img:<16 hex>`, and RunRecord.from_pipeline refuses this label, so it never matches.
LEGACY_DATASET = "legacy (before dataset keys)"
DATASET_MAX_LENGTH = 100
PRECISION_MAX_LENGTH = 40  # atc modes like allow_mix_precision_bf16 (24 characters) fit
_DATASET_ID = re.compile(r"ann:([^+]+)\+img:(.+)")
# A model zoo run records its model as `<entry>/<variant>`; a plain name (older DAGs) is one entry
# with the variant DEFAULT_VARIANT.
MODEL_NAME = re.compile(r"[a-z][a-z0-9_]*")
VARIANT_SEPARATOR = "/"
DEFAULT_VARIANT = "default"


class HistoryError(GfocalError):
    """The history database is unreachable or misconfigured, or a record is malformed."""


def model_key(entry: str, variant: str) -> str:
    """The history `model` of a zoo run: `<entry>/<variant>`, both matching `[a-z][a-z0-9_]*`
    (HistoryError otherwise). model_entry() splits it again."""
    for what, name in (("entry", entry), ("variant", variant)):
        if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
            raise HistoryError(f"model {what} {name!r} must match {MODEL_NAME.pattern} (e.g. 'gfocalv2_r50')")
    return f"{entry}{VARIANT_SEPARATOR}{variant}"


def model_entry(model: str) -> tuple[str, str]:
    """(entry, variant) of a history `model`: `a/b` -> ('a', 'b'); a plain name (rows of the older
    DAGs, e.g. 'gfocalv2_r50_fpn_1x') -> (name, DEFAULT_VARIANT)."""
    entry, separator, variant = model.partition(VARIANT_SEPARATOR)
    return (entry, variant) if separator else (model, DEFAULT_VARIANT)


@dataclass(frozen=True)
class ConfigKey:
    """What makes two runs comparable: the gate's baseline only mixes runs of the same key."""

    model: str
    backend: str
    device: str
    precision: str
    batch_size: int
    policy: str
    dataset: str  # Manifest.dataset_id ("ann:<16 hex>+img:<16 hex>") or LEGACY_DATASET

    def __post_init__(self) -> None:
        for name in ("model", "backend", "device", "precision", "policy", "dataset"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise HistoryError(f"configuration field {name!r} must be a non-empty string, got {value!r}")
        if len(self.precision) > PRECISION_MAX_LENGTH:
            raise HistoryError(
                f"configuration field 'precision' is {len(self.precision)} characters, more than "
                f"{PRECISION_MAX_LENGTH}: pass the atc precision mode or fp16 / fp32"
            )
        if len(self.dataset) > DATASET_MAX_LENGTH:
            raise HistoryError(
                f"configuration field 'dataset' is {len(self.dataset)} characters, more than "
                f"{DATASET_MAX_LENGTH}: pass Manifest.dataset_id, not a path or a file listing"
            )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise HistoryError(
                f"configuration field 'batch_size' must be an integer >= 1, got {self.batch_size!r}"
            )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ConfigKey:
        missing = [name for name in CONFIG_FIELDS if name not in data]
        if missing:
            hint = " ('dataset' is the run's Manifest.dataset_id)" if "dataset" in missing else ""
            raise HistoryError(
                f"configuration is missing {missing}; it needs all of {list(CONFIG_FIELDS)}{hint}"
            )
        return cls(**{name: data[name] for name in CONFIG_FIELDS})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def legacy(self) -> bool:
        """True for rows recorded before the history keyed runs by dataset."""
        return self.dataset == LEGACY_DATASET

    @property
    def dataset_label(self) -> str:
        """The dataset shortly: `ann:<8 hex>+img:<8 hex>` of an identity, any other value whole."""
        match = _DATASET_ID.fullmatch(self.dataset)
        return f"ann:{match[1][:8]}+img:{match[2][:8]}" if match else self.dataset

    @property
    def label(self) -> str:
        return (
            f"{self.model} {self.backend}/{self.device} {self.precision} b{self.batch_size} {self.policy}"
            f" data {self.dataset_label}"
        )

    @property
    def slug(self) -> str:
        """A string safe for HTML ids and file names."""
        raw = "-".join(str(value) for value in asdict(self).values())
        return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in raw)


def _utc(moment: datetime) -> datetime:
    """Aware UTC datetime; naive values (SQLite returns those) are taken as UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _finite(name: str, value: Any, *, optional: bool = True) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise HistoryError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass
class RunRecord:
    """One finished run of one configuration: provenance, accuracy, speed and (later) the verdict.

    `stats` holds the COCO summary (keys of STAT_COLUMNS, -1 where COCO has no ground truth);
    `latency_ms` the keys of LATENCY_KEYS; `verdict` is None until the gate has judged the run.
    """

    dag_id: str
    run_id: str
    config: ConfigKey
    stats: dict[str, float]
    finished_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    fps: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    images: int | None = None
    ap_delta: float | None = None
    checkpoint_sha256: str | None = None
    onnx_sha256: str | None = None
    om_sha256: str | None = None
    tool_versions: dict[str, str] = field(default_factory=dict)
    verdict: str | None = None
    verdict_detail: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("dag_id", "run_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise HistoryError(f"record field {name!r} must be a non-empty string, got {value!r}")
        if not isinstance(self.config, ConfigKey):
            raise HistoryError(f"record config must be a ConfigKey, got {type(self.config).__name__}")
        if not isinstance(self.finished_at, datetime):
            raise HistoryError(f"record finished_at must be a datetime, got {self.finished_at!r}")
        self.finished_at = _utc(self.finished_at)
        unknown = sorted(set(self.stats) - set(STAT_COLUMNS))
        if unknown:
            raise HistoryError(f"unknown COCO stat keys {unknown}; expected a subset of {list(STAT_COLUMNS)}")
        if "AP" not in self.stats:
            raise HistoryError("stats has no 'AP': pass the COCO summary produced by the evaluation step")
        self.stats = {
            key: _finite(f"stats[{key!r}]", value, optional=False) for key, value in self.stats.items()
        }
        unknown = sorted(set(self.latency_ms) - set(LATENCY_KEYS))
        if unknown:
            raise HistoryError(f"unknown latency keys {unknown}; expected a subset of {list(LATENCY_KEYS)}")
        self.latency_ms = {
            k: _finite(f"latency_ms[{k!r}]", v, optional=False) for k, v in self.latency_ms.items()
        }
        self.fps = _finite("fps", self.fps)
        if self.fps is not None and self.fps < 0:
            raise HistoryError(f"fps must be >= 0, got {self.fps}")
        self.ap_delta = _finite("ap_delta", self.ap_delta)
        if self.images is not None and (isinstance(self.images, bool) or not isinstance(self.images, int)):
            raise HistoryError(f"images must be an integer, got {self.images!r}")
        if self.verdict not in (None, *VERDICTS):
            raise HistoryError(f"verdict must be one of {VERDICTS} or None, got {self.verdict!r}")

    @property
    def ap(self) -> float:
        return self.stats["AP"]

    @classmethod
    def from_pipeline(
        cls,
        *,
        dag_id: str,
        run_id: str,
        config: ConfigKey | Mapping[str, Any],
        stats: Mapping[str, float],
        timing: Mapping[str, Any] | None = None,
        export_info: Mapping[str, Any] | None = None,
        convert_info: Mapping[str, Any] | None = None,
        ap_delta: float | None = None,
        finished_at: datetime | None = None,
    ) -> RunRecord:
        """Build a record from the dicts the pipeline steps return (evaluation stats, timing summary,
        export.json, convert.json). Keys of the export/convert dicts ending in `_version` become
        `tool_versions`. `config` must name the dataset (`Manifest.dataset_id`) under "dataset"."""
        config_key = config if isinstance(config, ConfigKey) else ConfigKey.from_mapping(config)
        if config_key.legacy:
            raise HistoryError(
                f"configuration dataset {LEGACY_DATASET!r} marks rows recorded before dataset keys; "
                "a new run must pass its Manifest.dataset_id as 'dataset'"
            )
        timing = timing or {}
        export_info = export_info or {}
        convert_info = convert_info or {}
        versions = {
            key: str(value)
            for info in (export_info, convert_info)
            for key, value in info.items()
            if key.endswith("_version") and value is not None
        }
        return cls(
            dag_id=dag_id,
            run_id=run_id,
            config=config_key,
            stats={key: value for key, value in stats.items() if key in STAT_COLUMNS},
            finished_at=finished_at or datetime.now(UTC),
            fps=timing.get("fps"),
            latency_ms=dict(timing.get("latency_ms") or {}),
            images=timing.get("images"),
            ap_delta=ap_delta,
            checkpoint_sha256=export_info.get("checkpoint_sha256"),
            onnx_sha256=export_info.get("onnx_sha256"),
            om_sha256=convert_info.get("om_sha256"),
            tool_versions=versions,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (small enough for XCom); inverse of from_dict."""
        data = asdict(self)
        data["config"] = self.config.as_dict()
        data["finished_at"] = self.finished_at.isoformat()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        """Inverse of to_dict; a dict written before dataset keys (no config "dataset") gets
        LEGACY_DATASET, like the rows of its time."""
        values = dict(data)
        values["config"] = ConfigKey.from_mapping({"dataset": LEGACY_DATASET, **values["config"]})
        if isinstance(values.get("finished_at"), str):
            values["finished_at"] = datetime.fromisoformat(values["finished_at"])
        return cls(**values)


_metadata = sa.MetaData()
_ROW_KEY_COLUMNS = ("dag_id", "run_id", *ROW_CONFIG_FIELDS)  # the unique key of a row
results_table = sa.Table(
    TABLE_NAME,
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("dag_id", sa.String(250), nullable=False),
    sa.Column("run_id", sa.String(250), nullable=False),
    sa.Column("model", sa.String(100), nullable=False),
    sa.Column("backend", sa.String(50), nullable=False),
    sa.Column("device", sa.String(100), nullable=False),
    # 20 before atc's longer modes were recorded as variants' precision: widened by _widen_precision
    sa.Column("precision", sa.String(PRECISION_MAX_LENGTH), nullable=False),
    sa.Column("batch_size", sa.Integer, nullable=False),
    sa.Column("policy", sa.String(50), nullable=False),
    # Added by _add_dataset_column to tables of before; the default labels rows that old code writes.
    sa.Column("dataset", sa.String(DATASET_MAX_LENGTH), nullable=False, server_default=LEGACY_DATASET),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("checkpoint_sha256", sa.String(64)),
    sa.Column("onnx_sha256", sa.String(64)),
    sa.Column("om_sha256", sa.String(64)),
    sa.Column("tool_versions", sa.JSON, nullable=False),
    *(sa.Column(column, sa.Float) for column in STAT_COLUMNS.values()),
    sa.Column("ap_delta", sa.Float),
    sa.Column("fps", sa.Float),
    *(sa.Column(f"latency_{key}_ms", sa.Float) for key in LATENCY_KEYS),
    sa.Column("images", sa.Integer),
    sa.Column("verdict", sa.String(10)),
    sa.Column("verdict_detail", sa.JSON),
    # Constraint and index are those of tables of before (without the dataset): a migration only
    # adds the column, and old and new tables stay alike.
    sa.UniqueConstraint(*_ROW_KEY_COLUMNS, name=f"uq_{TABLE_NAME}_run_config"),
    sa.Index(f"ix_{TABLE_NAME}_config_time", *ROW_CONFIG_FIELDS, "finished_at"),
)


def model_clause(model: str) -> sa.ColumnElement[bool]:
    """Rows of `model`: `entry/variant` exactly (`entry/default` also the plain `entry`); a plain
    `entry` with all its variants (`entry` itself or `entry/...`, matched literally: `_` and `%` are
    no wildcards)."""
    column = results_table.c.model
    entry, variant = model_entry(model)
    if VARIANT_SEPARATOR in model:
        return column.in_([model, entry]) if variant == DEFAULT_VARIANT else column == model
    return sa.or_(column == model, column.startswith(model + VARIANT_SEPARATOR, autoescape=True))


def _row_values(record: RunRecord) -> dict[str, Any]:
    values: dict[str, Any] = {
        "dag_id": record.dag_id,
        "run_id": record.run_id,
        **record.config.as_dict(),
        "finished_at": record.finished_at,
        "recorded_at": datetime.now(UTC),
        "checkpoint_sha256": record.checkpoint_sha256,
        "onnx_sha256": record.onnx_sha256,
        "om_sha256": record.om_sha256,
        "tool_versions": dict(record.tool_versions),
        "ap_delta": record.ap_delta,
        "fps": record.fps,
        "images": record.images,
        "verdict": record.verdict,
        "verdict_detail": record.verdict_detail,
    }
    values.update({column: record.stats.get(key) for key, column in STAT_COLUMNS.items()})
    values.update({f"latency_{key}_ms": record.latency_ms.get(key) for key in LATENCY_KEYS})
    return values


def _record_from_row(row: Mapping[str, Any]) -> RunRecord:
    return RunRecord(
        dag_id=row["dag_id"],
        run_id=row["run_id"],
        config=ConfigKey.from_mapping(row),
        stats={key: row[column] for key, column in STAT_COLUMNS.items() if row[column] is not None},
        finished_at=_utc(row["finished_at"]),
        fps=row["fps"],
        latency_ms={
            key: row[f"latency_{key}_ms"] for key in LATENCY_KEYS if row[f"latency_{key}_ms"] is not None
        },
        images=row["images"],
        ap_delta=row["ap_delta"],
        checkpoint_sha256=row["checkpoint_sha256"],
        onnx_sha256=row["onnx_sha256"],
        om_sha256=row["om_sha256"],
        tool_versions=dict(row["tool_versions"] or {}),
        verdict=row["verdict"],
        verdict_detail=row["verdict_detail"],
    )


def _qualified_table(conn: Connection, schema: str | None) -> str:
    quote = conn.dialect.identifier_preparer.quote
    return f"{quote(schema)}.{quote(TABLE_NAME)}" if schema else quote(TABLE_NAME)


def _lock_schema(conn: Connection, schema: str | None) -> None:
    """Serialise creating and migrating the table among processes that open the store at once
    (until the transaction ends): a Postgres advisory lock, SQLite's write lock."""
    if conn.dialect.name == "postgresql":
        key = zlib.crc32(f"gfocal-history:{schema or ''}.{TABLE_NAME}".encode())
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _add_dataset_column(conn: Connection, schema: str | None) -> int | None:
    """Give a table created before dataset keys its `dataset` column; None if it has one already,
    else how many existing rows got LEGACY_DATASET.

    Rows of before carry no dataset identity anywhere (their JSON columns are `tool_versions`, only
    `*_version` keys, and `verdict_detail`, whose config has no dataset), so every one of them gets
    LEGACY_DATASET: kept and shown, never a new run's baseline.
    """
    columns = {column["name"] for column in sa.inspect(conn).get_columns(TABLE_NAME, schema=schema)}
    if "dataset" in columns:
        return None
    column_type = results_table.c.dataset.type.compile(dialect=conn.dialect)
    if_not_exists = "IF NOT EXISTS " if conn.dialect.name == "postgresql" else ""
    conn.exec_driver_sql(
        f"ALTER TABLE {_qualified_table(conn, schema)} ADD COLUMN {if_not_exists}dataset {column_type} "
        f"NOT NULL DEFAULT '{LEGACY_DATASET}'"
    )
    return int(conn.execute(sa.select(sa.func.count()).select_from(results_table)).scalar_one())


def _widen_precision(conn: Connection, schema: str | None) -> int | None:
    """Widen the `precision` column of a table of before (VARCHAR(20)) to PRECISION_MAX_LENGTH; the
    old width when it was widened, else None. SQLite does not enforce lengths: nothing to do there."""
    if conn.dialect.name not in ("postgresql", "mysql", "mariadb"):
        return None
    columns = sa.inspect(conn).get_columns(TABLE_NAME, schema=schema)
    length = next((getattr(c["type"], "length", None) for c in columns if c["name"] == "precision"), None)
    if length is None or length >= PRECISION_MAX_LENGTH:
        return None
    column = conn.dialect.identifier_preparer.quote("precision")
    wider = f"VARCHAR({PRECISION_MAX_LENGTH})"
    change = (
        f"ALTER COLUMN {column} TYPE {wider}"
        if conn.dialect.name == "postgresql"
        else f"MODIFY {column} {wider} NOT NULL"
    )
    conn.exec_driver_sql(f"ALTER TABLE {_qualified_table(conn, schema)} {change}")
    return int(length)


def default_history_url() -> str:
    """$GFOCAL_HISTORY_URL, else a SQLite file in $AIRFLOW_HOME (default ~/airflow)."""
    url = os.environ.get(HISTORY_URL_ENV, "").strip()
    if url:
        return url
    home = Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser()
    return f"sqlite:///{home / HISTORY_FILE_NAME}"


class HistoryStore:
    """Reads and writes run results. Every database failure surfaces as HistoryError naming the URL.

    `schema` places the table in a database schema (Postgres); the table is created on first use,
    and a table of before dataset keys is migrated then (see _add_dataset_column).
    """

    def __init__(self, url: str | URL, *, schema: str | None = None) -> None:
        try:
            self._url = make_url(url)
        except ArgumentError as exc:
            raise HistoryError(
                f"history URL {url!r} is not a SQLAlchemy URL ({exc}); "
                f"use e.g. sqlite:////abs/path/history.sqlite or postgresql+psycopg://user@host/db"
            ) from exc
        self.schema = schema
        self._engine = self._create_engine()
        self._ready = False

    @property
    def url(self) -> str:
        """The URL with any password masked, safe for logs and messages."""
        return self._url.render_as_string(hide_password=True)

    def _create_engine(self) -> Engine:
        backend = self._url.get_backend_name()
        connect_args: dict[str, Any] = {}
        if backend == "sqlite":
            database = self._url.database
            if database and database != ":memory:" and not database.startswith("file:"):
                try:
                    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise HistoryError(
                        f"cannot create the directory of history database {self.url!r}: {exc}; "
                        f"point {HISTORY_URL_ENV} at a writable location"
                    ) from exc
            connect_args["timeout"] = 30  # several workers may record at once
        elif backend == "postgresql":
            connect_args["connect_timeout"] = 10
        try:
            engine = sa.create_engine(self._url, connect_args=connect_args, pool_pre_ping=True)
        except (NoSuchModuleError, ModuleNotFoundError, ArgumentError) as exc:
            raise HistoryError(
                f"cannot open history database {self.url!r}: {exc}; install the database driver "
                "or name an installed one in the URL (e.g. postgresql+psycopg://)"
            ) from exc
        if self.schema:
            engine = engine.execution_options(schema_translate_map={None: self.schema})
        return engine

    def _prepare(self) -> None:
        """Create the table, or migrate one of before, once per store; safe in concurrent processes."""
        with self._engine.begin() as conn:
            _lock_schema(conn, self.schema)
            _metadata.create_all(conn, checkfirst=True)
            migrated = _add_dataset_column(conn, self.schema)
            widened = _widen_precision(conn, self.schema)
        if widened is not None:
            log.warning(
                "history database %s: widened column 'precision' of table %s from %d to %d characters",
                self.url,
                TABLE_NAME,
                widened,
                PRECISION_MAX_LENGTH,
            )
        if migrated is not None:
            log.warning(
                "history database %s: added column 'dataset' to table %s; %d existing row(s) got the "
                "dataset %r (kept in the trend page and the history, never a new run's baseline)",
                self.url,
                TABLE_NAME,
                migrated,
                LEGACY_DATASET,
            )
        self._ready = True

    @contextmanager
    def _transaction(self, action: str) -> Iterator[Connection]:
        try:
            if not self._ready:
                self._prepare()
            with self._engine.begin() as conn:
                yield conn
        except HistoryError:
            raise
        except SQLAlchemyError as exc:
            detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            log.error("history database %s failed while %s: %s", self.url, action, detail)
            raise HistoryError(
                f"history database {self.url!r} failed while {action}: {detail}; check that the "
                f"server is reachable and {HISTORY_URL_ENV} / the history_url setting is correct"
            ) from exc

    @staticmethod
    def _key_clause(
        dag_id: str, run_id: str, config: ConfigKey, *, with_dataset: bool = True
    ) -> sa.ColumnElement[bool]:
        values = {"dag_id": dag_id, "run_id": run_id, **config.as_dict()}
        names = (*_ROW_KEY_COLUMNS, "dataset") if with_dataset else _ROW_KEY_COLUMNS
        return sa.and_(*(results_table.c[name] == values[name] for name in names))

    def record(self, record: RunRecord) -> None:
        """Insert the record, or replace the row of the same (dag_id, run_id, configuration without
        the dataset): a retry that scored a changed dataset replaces its row, dataset included.

        One row per (dag_id, run_id, model, backend): a second record of a run's backend under
        another configuration (a cleared run whose reference fell back from CUDA to the CPU, another
        precision) replaces the first one instead of adding a row beside it; the variants of a
        models file entry (models `<entry>/<variant>`) are rows of their own."""
        values = _row_values(record)
        where = self._key_clause(record.dag_id, record.run_id, record.config, with_dataset=False)
        same_backend = sa.and_(
            results_table.c.dag_id == record.dag_id,
            results_table.c.run_id == record.run_id,
            results_table.c.model == record.config.model,
            results_table.c.backend == record.config.backend,
            sa.not_(where),
        )
        action = f"recording run {record.run_id!r}"
        try:
            with self._transaction(action) as conn:
                replaced = conn.execute(sa.delete(results_table).where(same_backend)).rowcount
                if replaced:
                    log.warning(
                        "run %s: replaced %d row(s) of backend %s recorded under another configuration",
                        record.run_id,
                        replaced,
                        record.config.backend,
                    )
                updated = conn.execute(sa.update(results_table).where(where).values(**values)).rowcount
                if not updated:
                    conn.execute(sa.insert(results_table).values(**values))
        except HistoryError as exc:
            if not isinstance(exc.__cause__, IntegrityError):
                raise
            # Another writer inserted the same key between our UPDATE and INSERT: update it.
            with self._transaction(action) as conn:
                conn.execute(sa.update(results_table).where(where).values(**values))
        log.info("recorded %s run %s (%s) in %s", record.dag_id, record.run_id, record.config.label, self.url)

    def set_verdict(self, dag_id: str, run_id: str, config: ConfigKey, verdict: Mapping[str, Any]) -> None:
        """Store the gate's verdict dict on an already recorded row of `config` (dataset included)."""
        label = "pass" if verdict.get("passed") else "fail"
        with self._transaction(f"storing the verdict of run {run_id!r}") as conn:
            updated = conn.execute(
                sa.update(results_table)
                .where(self._key_clause(dag_id, run_id, config))
                .values(verdict=label, verdict_detail=dict(verdict))
            ).rowcount
        if not updated:
            raise HistoryError(
                f"no recorded result for dag {dag_id!r} run {run_id!r} ({config.label}); "
                "record the run before gating it"
            )

    def runs(
        self,
        config: ConfigKey,
        *,
        limit: int,
        verdict: str | None = None,
        dag_id: str | None = None,
        exclude: tuple[str, str] | None = None,
    ) -> list[RunRecord]:
        """The newest `limit` rows of `config`, newest first, optionally only those with `verdict`,
        of DAG `dag_id`, and without run `exclude` = (dag_id, run_id)."""
        query = sa.select(results_table).where(
            *(results_table.c[name] == value for name, value in config.as_dict().items())
        )
        if verdict is not None:
            query = query.where(results_table.c.verdict == verdict)
        if dag_id is not None:
            query = query.where(results_table.c.dag_id == dag_id)
        if exclude is not None:
            query = query.where(
                sa.not_(sa.and_(results_table.c.dag_id == exclude[0], results_table.c.run_id == exclude[1]))
            )
        query = query.order_by(results_table.c.finished_at.desc(), results_table.c.id.desc()).limit(limit)
        with self._transaction(f"reading the history of {config.label}") as conn:
            rows = conn.execute(query).mappings().all()
        return [_record_from_row(row) for row in rows]

    def passing_history(
        self, config: ConfigKey, *, limit: int, exclude: tuple[str, str] | None = None
    ) -> list[RunRecord]:
        """The newest `limit` passing runs of `config`, newest first: the gate's baseline candidates."""
        return self.runs(config, limit=limit, verdict="pass", exclude=exclude)

    def configurations(self, *, dag_id: str | None = None, model: str | None = None) -> list[ConfigKey]:
        """Every recorded configuration (optionally of one DAG, of one `model` as model_clause
        reads it), most recently run first."""
        columns = [results_table.c[name] for name in CONFIG_FIELDS]
        query = sa.select(*columns, sa.func.max(results_table.c.finished_at).label("last")).group_by(*columns)
        if dag_id is not None:
            query = query.where(results_table.c.dag_id == dag_id)
        if model is not None:
            query = query.where(model_clause(model))
        with self._transaction("listing configurations") as conn:
            rows = conn.execute(query.order_by(sa.desc("last"))).mappings().all()
        return [ConfigKey.from_mapping(row) for row in rows]

    def recent(
        self, *, limit: int = 100, dag_id: str | None = None, model: str | None = None
    ) -> list[RunRecord]:
        """The newest `limit` rows of all configurations (optionally of one DAG, of one `model` as
        model_clause reads it), newest first."""
        query = sa.select(results_table)
        if dag_id is not None:
            query = query.where(results_table.c.dag_id == dag_id)
        if model is not None:
            query = query.where(model_clause(model))
        query = query.order_by(results_table.c.finished_at.desc(), results_table.c.id.desc()).limit(limit)
        with self._transaction("reading recent runs") as conn:
            rows = conn.execute(query).mappings().all()
        return [_record_from_row(row) for row in rows]

    def models(self, *, dag_id: str | None = None) -> list[str]:
        """Every recorded `model` value (optionally of one DAG), sorted."""
        query = sa.select(results_table.c.model).distinct().order_by(results_table.c.model)
        if dag_id is not None:
            query = query.where(results_table.c.dag_id == dag_id)
        with self._transaction("listing models") as conn:
            return list(conn.execute(query).scalars())

    def run_records(self, dag_id: str, run_id: str) -> list[RunRecord]:
        """Every row of run `run_id` of DAG `dag_id` (any configuration), newest first."""
        query = (
            sa.select(results_table)
            .where(results_table.c.dag_id == dag_id, results_table.c.run_id == run_id)
            .order_by(results_table.c.finished_at.desc(), results_table.c.id.desc())
        )
        with self._transaction(f"reading run {run_id!r} of {dag_id!r}") as conn:
            rows = conn.execute(query).mappings().all()
        return [_record_from_row(row) for row in rows]

    def count(self) -> int:
        with self._transaction("counting rows") as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(results_table)).scalar_one())

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
