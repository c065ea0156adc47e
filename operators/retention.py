"""Retention as the DAGs' last task: prune old run directories, evict the cache (see
`gfocal_pipeline.retention`; the same as `gfocal gc`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from gfocal_pipeline import retention
from gfocal_pipeline.errors import ConfigError
from gfocal_pipeline.workspace import default_work_dir
from operators.base import fail_without_retry, project_errors
from operators.settings import GfocalSettings, load_settings

XCOM_LIST_CAP = 20


class RetentionOperator(BaseOperator):
    """Keep the newest `keep_runs` run directories of each DAG whole, prune the older ones, then evict
    the cache of `work_dir` down to `cache_max_gb`.

    `keep_runs` / `cache_max_gb` default to `[gfocal] keep_runs` / `cache_max_gb`; `work_dir` to
    `[gfocal] work_dir`, else the default work directory. The current run's directory (`run_dir`,
    else `<work_dir>/<dag_id>/<run_id>`) and the cache entries it uses are never touched, nor runs in
    progress. Returns a small report for XCom (counts, bytes, lists of at most 20 items).
    A missing `work_dir` is an error naming it, unless `require_work_dir` is off (the DAGs: a run
    that failed before its first write has nothing to prune); a bad setting fails without retries.
    """

    template_fields: Sequence[str] = ("work_dir", "run_dir", "keep_runs", "cache_max_gb")

    def __init__(
        self,
        *,
        work_dir: str | None = None,
        run_dir: str | None = None,
        keep_runs: int | None = None,
        cache_max_gb: float | None = None,
        dry_run: bool = False,
        require_work_dir: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.work_dir, self.run_dir, self.dry_run = work_dir, run_dir, dry_run
        self.require_work_dir = require_work_dir
        self.keep_runs, self.cache_max_gb = keep_runs, cache_max_gb

    def _limits(self) -> tuple[int, float]:
        settings: GfocalSettings | None = None
        if self.keep_runs is None or self.cache_max_gb is None:
            settings = load_settings()
        keep_runs = settings.keep_runs if self.keep_runs is None else self.keep_runs
        max_gb = settings.cache_max_gb if self.cache_max_gb is None else self.cache_max_gb
        source = f"RetentionOperator({self.task_id!r})"
        return (
            retention.check_keep_runs(keep_runs, f"{source} keep_runs"),
            retention.check_cache_max_gb(max_gb, f"{source} cache_max_gb"),
        )

    def _work_dir(self) -> str:
        if self.work_dir:
            return str(self.work_dir)
        configured = dict(load_settings().run_defaults).get("work_dir")
        return str(configured or default_work_dir())

    def _protected(self, work_dir: str, context: Any) -> list[str]:
        if self.run_dir:
            return [str(self.run_dir)]
        dag, run_id = context.get("dag"), context.get("run_id")
        if dag is None or not run_id:
            return []
        from gfocal_pipeline.steps import run_directory

        return [str(run_directory(work_dir, dag.dag_id, run_id))]

    @project_errors
    def execute(self, context: Any) -> dict[str, Any]:
        with fail_without_retry():  # a bad setting or path stays bad: no retry
            keep_runs, max_gb = self._limits()
            work_dir = self._work_dir()
            if not os.path.isabs(work_dir):
                raise ConfigError(
                    f"RetentionOperator({self.task_id!r}) work_dir {work_dir!r}: expected an absolute path "
                    "(the work directory every worker mounts, e.g. the prepare task's work_dir)"
                )
            if not self.require_work_dir and not self.run_dir and not os.path.isdir(work_dir):
                self.log.info(
                    "work directory %s does not exist (nothing was written): nothing to prune", work_dir
                )
                return {"skipped": f"no work directory {work_dir}"}
            return self._gc(work_dir, keep_runs, max_gb, context)

    def _gc(self, work_dir: str, keep_runs: int, max_gb: float, context: Any) -> dict[str, Any]:
        report = retention.gc(
            work_dir,
            keep_runs,
            round(max_gb * retention.GB),
            protect=self._protected(work_dir, context),
            dry_run=self.dry_run,
        )
        self.log.info("retention of %s: %s", work_dir, retention.format_summary(report))
        return retention.small_report(report, cap=XCOM_LIST_CAP)
