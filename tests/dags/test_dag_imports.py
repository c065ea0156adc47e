"""DAG files parse light: importing a DAG file, the operators package or the plugin loads no numerical
library (torch, onnx, onnxruntime, numpy, OpenCV, the COCO evaluators). Each task process parses its DAG
file before running (and the DAG processor every 30 s), so whatever a DAG file imports is paid once per
task; the libraries load inside the step that needs them.

Each case runs in a fresh interpreter: the test process itself has imported most of them already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support import ROOT

HEAVY = ("torch", "onnx", "onnxruntime", "numpy", "cv2", "pycocotools", "faster_coco_eval", "mmdet")

PROBE = """
import json, sys
sys.path[:0] = [{root!r} + "/dags", {root!r} + "/plugins", {root!r} + "/include", {root!r}]
import airflow.sdk  # what the DAG processor and the task runner have loaded before a DAG file
before = set(sys.modules)
import importlib
importlib.import_module({module!r})
dags = [v for v in vars(sys.modules[{module!r}]).values() if isinstance(v, airflow.sdk.DAG)]
print(json.dumps({{
    "loaded": sorted(
        name for name in set(sys.modules) - before
        if any(name == h or name.startswith(h + ".") for h in {heavy!r})
    ),
    "tasks": sum(len(dag.tasks) for dag in dags) if dags else None,
}}))
"""
HELPERS = ("gfocal_factory", "gfocal_variants")  # modules of the DAG files, defining no DAG
MODELS_FILE = """
models:
  - name: probe_model
    adapter: retinanet
    variants: [{name: fp16}, {name: keep, precision_mode: must_keep_origin_dtype}]
"""


def _import_in_fresh_interpreter(module: str, heavy: tuple[str, ...] = HEAVY, **env: str) -> dict:
    code = PROBE.format(root=str(ROOT), module=module, heavy=heavy)
    env = {**os.environ, "PYTHONPATH": "", **env}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dag_file", sorted(path.stem for path in (ROOT / "dags").glob("*.py")))
def test_a_dag_file_imports_no_numerical_library(dag_file: str, tmp_path) -> None:
    models_file = tmp_path / "models.yaml"  # gfocal_models.py builds one DAG per entry of it
    models_file.write_text(MODELS_FILE)
    result = _import_in_fresh_interpreter(dag_file, GFOCAL_MODELS_FILE=str(models_file))
    assert result["loaded"] == [], f"{dag_file}.py loads {result['loaded']} at parse time"
    if dag_file not in HELPERS:
        assert result["tasks"], f"{dag_file}.py built no DAG"


@pytest.mark.parametrize(
    "module",
    [
        "operators",
        "gfocal_plugin",
        "gfocal_pipeline.run_config",
        "gfocal_pipeline.doctor",
        # choosing a model (the form's choices, a spec's defaults) imports no adapter's network code
        "gfocal_pipeline.models.gfocalv2.spec",
        "gfocal_pipeline.models.retinanet.spec",
        "gfocal_pipeline.models.onnx.spec",
        "gfocal_pipeline.models.onnx.declaration",
    ],
)
def test_the_operators_and_the_plugin_import_no_numerical_library(module: str) -> None:
    assert _import_in_fresh_interpreter(module)["loaded"] == []


def test_the_plugin_builds_its_web_app_only_when_served() -> None:
    """Every task process imports every plugin (Airflow's plugin macros): the trend app's FastAPI and
    the API server's security module load on the app's first request, in the api-server."""
    result = _import_in_fresh_interpreter(
        "gfocal_plugin", heavy=("fastapi", "starlette", "airflow.api_fastapi")
    )
    assert result["loaded"] == []


def test_the_probe_sees_a_heavy_import() -> None:
    """The check itself: a module that does import numpy is reported."""
    assert "numpy" in _import_in_fresh_interpreter("gfocal_pipeline.timing")["loaded"]
