"""The batch rule a models file is checked with at parse time (`registry.check_batch_size`, no backend
imported) agrees with each backend class's own rule."""

from __future__ import annotations

import pytest

from gfocal_pipeline.backends.registry import BACKENDS, backend_class, check_batch_size
from gfocal_pipeline.errors import BackendError


@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_the_parse_time_rule_agrees_with_the_backend_class(name: str, batch_size: int) -> None:
    try:
        backend_class(name).check_batch_size(batch_size)
        allowed = True
    except BackendError:
        allowed = False
    if allowed:
        check_batch_size(name, batch_size)
    else:
        with pytest.raises(BackendError, match="batch_size must be 1"):
            check_batch_size(name, batch_size)


def test_a_batch_that_every_tool_runs_imports_no_backend() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from gfocal_pipeline.backends.registry import check_batch_size; "
        "check_batch_size('ais_bench', 4); check_batch_size('msame', 1); "
        "print(sorted(m for m in ('numpy', 'gfocal_pipeline.backends.base') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
