"""Loading mmcv-style checkpoints safely into a model of a known layout (each model adapter passes its
own `CheckpointLayout`), and writing generated random-weight checkpoints atomically.

torch 2.13 loads with `weights_only=True`. Official mmcv checkpoints keep numpy values in `meta`
(e.g. an `np.float64` learning rate or an ndarray), which the safe unpickler rejects. We allow-list
exactly the numpy reconstruction helpers such files need (see `SAFE_NUMPY_GLOBALS`) for the duration
of one load, instead of switching safe loading off.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gfocal_pipeline.errors import CheckpointError
from gfocal_pipeline.fileio import atomic_path, ensure_writable_dir


def _numpy_globals() -> list:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core to np._core
    items: list = [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar]
    # files pickled by numpy 1.x (the official 2021 checkpoint) name the old module path
    items += [
        (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    ]
    # dtype classes (np.dtypes.Float64DType, ...) appear in pickles written by numpy >= 1.25
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        items += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return items


SAFE_NUMPY_GLOBALS = _numpy_globals()
RANDOM_CHECKPOINT_NOTE = "RANDOM WEIGHTS - generated for tests and the demo, not a trained model"


def _torch_load(path: Path) -> object:
    with torch.serialization.safe_globals(SAFE_NUMPY_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | os.PathLike[str]) -> tuple[OrderedDict[str, torch.Tensor], dict]:
    """Read a checkpoint file -> (state dict without `module.` prefixes, meta dict).

    Refuses (CheckpointError naming the file) a missing, unreadable, empty, truncated or unsafe file,
    one holding no state dict of tensors, and one whose floating tensors hold NaN or Inf.
    """
    path = Path(path)
    _check_file(path)
    obj = _load_object(path)
    meta: dict = {}
    if isinstance(obj, dict) and "state_dict" in obj:
        meta = obj.get("meta") or {}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds no state dict of tensors (expected {{'meta', 'state_dict'}} "
            "or a bare state dict)"
        )
    state = OrderedDict((k.removeprefix("module."), v) for k, v in obj.items())
    _check_finite(path, state)
    return state, meta if isinstance(meta, dict) else {}


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a directory, not a file; pass the path of the .pth file in it"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass the path of a .pth file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"checkpoint {str(path)!r} is not readable; check its permissions")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is empty (0 bytes): its copy or download was cut short; copy it again"
        )


def _load_object(path: Path) -> object:
    """`torch.load` with safe unpickling; any failure is a CheckpointError naming the file."""
    try:
        return _torch_load(path)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} contains objects that are unsafe to unpickle "
            f"({_unpickler_reason(exc)}); it was refused, nothing in it was run. Only tensors, plain "
            "containers and numpy values are accepted; re-save the file with "
            "`torch.save({'state_dict': model.state_dict()}, path)` from a trusted environment"
        ) from exc
    except Exception as exc:  # torch.load raises many types (KeyError, RuntimeError...) for non-checkpoints
        raise CheckpointError(
            f"{str(path)!r} is not a PyTorch checkpoint, or it is truncated or damaged ({_first_line(exc)}); "
            "pass a .pth written by torch.save, or copy the file again if its download was cut short"
        ) from exc


def _unpickler_reason(exc: BaseException) -> str:
    """The part of torch's weights-only refusal that says what was refused (not its advice to trust it)."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", str(exc), re.DOTALL)
    return found.group(1).strip() if found else _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


NONFINITE_SHOWN = 5  # non-finite tensors named in the error; the rest are counted


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Each floating (or complex) tensor holding NaN or Inf -> (its NaN count, its Inf count)."""
    bad = {}
    for key, tensor in state.items():
        if not (tensor.is_floating_point() or tensor.is_complex()) or bool(torch.isfinite(tensor).all()):
            continue
        bad[key] = (int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum()))
    return bad


def _nan_inf(nans: int, infs: int) -> str:
    return ", ".join(f"{n} {kind}" for n, kind in ((nans, "NaN"), (infs, "Inf")) if n)


def _check_finite(path: Path, state: dict[str, torch.Tensor]) -> None:
    bad = nonfinite_tensors(state)
    if not bad:
        return
    shown = [f"{key} ({_nan_inf(*counts)})" for key, counts in list(bad.items())[:NONFINITE_SHOWN]]
    more = f" ... and {len(bad) - NONFINITE_SHOWN} more" if len(bad) > NONFINITE_SHOWN else ""
    raise CheckpointError(
        f"checkpoint {str(path)!r} has non-finite values (NaN/Inf) in {len(bad)} floating tensor(s): "
        f"{', '.join(shown)}{more}. The file is damaged (or its training diverged) and would only produce "
        "NaN outputs: re-export it from a good training checkpoint, or re-train"
    )


@dataclass(frozen=True)
class CheckpointLayout:
    """What a strict load checks a file against, and what its errors name."""

    model_name: str  # e.g. "GFocalV2 R50-FPN"
    official_file: str  # the released checkpoint in this layout, named in the fix
    build: Callable[[], nn.Module]  # the network, in eval mode, whose state_dict is the layout


def layout_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable lines for every missing, unexpected or wrongly shaped key."""
    expected = model.state_dict()
    lines = []
    for key, tensor in expected.items():
        if key not in state:
            lines.append(f"missing: {key} {tuple(tensor.shape)}")
        elif tuple(state[key].shape) != tuple(tensor.shape):
            lines.append(
                f"wrong shape: {key} expected {tuple(tensor.shape)}, checkpoint has {tuple(state[key].shape)}"
            )
    lines += [f"unexpected: {key} {tuple(state[key].shape)}" for key in state if key not in expected]
    return lines


LAYOUT_SHOWN = 8  # problem lines shown per kind (missing / wrong shape / unexpected)


def _layout_error(
    path: str | os.PathLike[str], problems: list[str], foreign: bool, layout: CheckpointLayout
) -> CheckpointError:
    """The strict-load error: counts per kind and the first lines of each; `foreign` when no key fits."""
    by_kind: dict[str, list[str]] = {}
    for line in problems:
        by_kind.setdefault(line.split(":", 1)[0], []).append(line)
    counts = ", ".join(f"{len(lines)} {kind}" for kind, lines in by_kind.items())
    shown = [line for lines in by_kind.values() for line in lines[:LAYOUT_SHOWN]]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    name = layout.model_name
    other = f"It has no key of {name} at all: this is the state dict of another model. " if foreign else ""
    return CheckpointError(
        f"checkpoint {str(path)!r} does not match the {name} layout "
        f"({len(problems)} problem(s): {counts}):\n  " + "\n  ".join(shown) + f"{more}\n{other}"
        f"Pass the official {layout.official_file} (or one in its layout), or strict=False to load what fits"
    )


def load_with_layout(
    path: str | os.PathLike[str], layout: CheckpointLayout, strict: bool = True
) -> nn.Module:
    """Build `layout`'s network and load `path` into it, in eval mode; strict by default, mismatches
    listed by key and shape."""
    state, _ = read_state_dict(path)
    model = layout.build()
    problems = layout_mismatch(model, state)
    own = model.state_dict()
    if problems and strict:
        raise _layout_error(path, problems, not any(k in own for k in state), layout)
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return model.eval()


def write_checkpoint(path: str | os.PathLike[str], state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write an mmcv-style `{'meta', 'state_dict'}` file atomically; the same arguments give the same
    bytes (the archive is built in memory, so its name is fixed)."""
    path = Path(path)
    ensure_writable_dir(path.parent, "checkpoint directory")
    buffer = io.BytesIO()
    torch.save({"meta": meta, "state_dict": state}, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path
