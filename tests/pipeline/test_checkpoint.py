"""Checkpoint loading: mmcv layouts, safe unpickling with numpy meta, strict layout errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from gfocal_pipeline.checkpoint import RANDOM_CHECKPOINT_NOTE, read_state_dict
from gfocal_pipeline.errors import CheckpointError
from gfocal_pipeline.fileio import sha256_file
from gfocal_pipeline.models.gfocalv2.checkpoint import load_model, random_state_dict, write_random_checkpoint


def test_random_checkpoint_is_deterministic_and_labelled(tmp_path: Path) -> None:
    a = write_random_checkpoint(tmp_path / "a.pth", seed=3)
    b = write_random_checkpoint(tmp_path / "b.pth", seed=3)
    c = write_random_checkpoint(tmp_path / "c.pth", seed=4)
    assert sha256_file(a) == sha256_file(b) != sha256_file(c)
    raw = torch.load(a, weights_only=True)
    assert set(raw) == {"meta", "state_dict"}
    assert raw["meta"]["note"] == RANDOM_CHECKPOINT_NOTE and raw["meta"]["random"] is True
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_loads_mmcv_bare_and_module_prefixed(tmp_path: Path) -> None:
    state = random_state_dict(1)
    torch.save(state, tmp_path / "bare.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    for name in ("bare.pth", "ddp.pth"):
        model = load_model(tmp_path / name)
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_numpy_meta_loads_with_safe_unpickling(tmp_path: Path) -> None:
    """An mmcv checkpoint's meta may carry numpy scalars/arrays; they load without weights_only=False."""
    meta = {"epoch": np.int64(12), "lr": np.float64(0.01), "hist": np.arange(3, dtype=np.float32)}
    torch.save({"meta": meta, "state_dict": random_state_dict(0)}, tmp_path / "np.pth")
    state, got = read_state_dict(tmp_path / "np.pth")
    assert float(got["lr"]) == 0.01 and int(got["epoch"]) == 12
    assert np.array_equal(got["hist"], np.arange(3, dtype=np.float32))
    assert "bbox_head.gfl_cls.weight" in state


def test_numpy1_pickled_meta_loads(tmp_path: Path) -> None:
    """A checkpoint written under numpy 1.x names `numpy.core.multiarray.*`, not numpy 2's `numpy._core`."""
    import zipfile

    meta = {"lr": np.float64(0.02), "hist": np.arange(2, dtype=np.int64)}
    torch.save({"meta": meta, "state_dict": random_state_dict(0)}, tmp_path / "np2.pth")
    with zipfile.ZipFile(tmp_path / "np2.pth") as src, zipfile.ZipFile(tmp_path / "np1.pth", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data  # protocol 2: newline-terminated GLOBAL names
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(item, data)
    state, got = read_state_dict(tmp_path / "np1.pth")
    assert float(got["lr"]) == 0.02 and got["hist"].tolist() == [0, 1]
    assert "backbone.conv1.weight" in state


class _Evil:
    def __reduce__(self):  # would run a command if unpickled unsafely
        return (print, ("pwned",))


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    torch.save({"meta": {"x": _Evil()}, "state_dict": random_state_dict(0)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil\.pth.*unsafe") as info:
        read_state_dict(tmp_path / "evil.pth")
    # the message says what was refused, and not torch's advice to load it with weights_only=False
    assert "GLOBAL print" in str(info.value) and "weights_only" not in str(info.value)


def test_missing_and_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pth.*does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(CheckpointError, match=r"text\.pth.*not a PyTorch checkpoint"):
        read_state_dict(tmp_path / "text.pth")
    with open(tmp_path / "list.pth", "wb") as handle:
        pickle.dump([1, 2, 3], handle)
    with pytest.raises(CheckpointError, match=r"list\.pth"):
        read_state_dict(tmp_path / "list.pth")
    torch.save({"state_dict": {}}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no state dict"):
        read_state_dict(tmp_path / "empty.pth")


def test_layout_mismatch_lists_keys_and_shapes(tmp_path: Path) -> None:
    state = random_state_dict(0)
    del state["bbox_head.reg_conf.0.bias"]
    state["bbox_head.gfl_cls.weight"] = torch.zeros(80, 256, 3, 3)  # the GFL v1 shape
    state["bbox_head.extra.weight"] = torch.zeros(2)
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "bad.pth")
    text = str(info.value)
    assert "missing: bbox_head.reg_conf.0.bias (64,)" in text
    assert (
        "wrong shape: bbox_head.gfl_cls.weight expected (81, 256, 3, 3), checkpoint has (80, 256, 3, 3)"
        in text
    )
    assert "unexpected: bbox_head.extra.weight (2,)" in text
    assert "Traceback" not in text
    model = load_model(tmp_path / "bad.pth", strict=False)  # what fits is loaded
    assert torch.equal(model.state_dict()["bbox_head.gfl_reg.weight"], state["bbox_head.gfl_reg.weight"])


def test_non_finite_weights_are_refused_naming_the_tensors(tmp_path: Path) -> None:
    # a few tensors are enough: the check runs on the file, before any model is built
    state = {
        "backbone.conv1.weight": torch.zeros(2, 3, 1, 4),
        "bbox_head.gfl_reg.bias": torch.zeros(68),
        "backbone.bn1.num_batches_tracked": torch.zeros((), dtype=torch.int64),
    }
    state["bbox_head.gfl_reg.bias"][:4] = float("nan")
    state["backbone.conv1.weight"][0, 0, 0, :2] = float("inf")
    state["backbone.conv1.weight"][1, 0, 0, 0] = float("nan")
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "nan.pth")
    text = str(info.value)
    assert str(tmp_path / "nan.pth") in text and "2 floating tensor(s)" in text
    assert "backbone.conv1.weight (1 NaN, 2 Inf)" in text and "bbox_head.gfl_reg.bias (4 NaN)" in text
    assert "damaged" in text and "re-export" in text and "re-train" in text
    with pytest.raises(CheckpointError, match=r"nan\.pth"):  # strict or not, the model is never built
        load_model(tmp_path / "nan.pth", strict=False)


def test_many_non_finite_tensors_show_the_first_few_and_a_count(tmp_path: Path) -> None:
    state = {f"layer{i}.weight": torch.ones(3) for i in range(8)}
    for tensor in state.values():
        tensor[0] = float("-inf")
    state["head.bias"] = torch.tensor([float("inf"), 1.0], dtype=torch.float16)  # fp16 is checked too
    state["fine.weight"] = torch.ones(2)
    torch.save(state, tmp_path / "inf.pth")
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "inf.pth")
    text = str(info.value)
    assert "9 floating tensor(s)" in text and "... and 4 more" in text
    assert "layer0.weight (1 Inf)" in text and "layer5.weight" not in text and "fine.weight" not in text
