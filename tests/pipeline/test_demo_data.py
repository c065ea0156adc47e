"""The generated demo set is a real, deterministic COCO-format data set whose boxes match the pixels."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from gfocal_pipeline.dataset import load_coco
from gfocal_pipeline.demo_data import make_demo_coco
from gfocal_pipeline.errors import DatasetError

# COCO detection category ids 1..90 leave out these ten
COCO_ID_GAPS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
N = 16


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_coco(tmp_path_factory.mktemp("demo"), num_images=N, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _annotations(root: Path) -> dict:
    return json.loads((root / "annotations" / "instances_val2017.json").read_text())


def test_same_seed_same_bytes_other_seed_differs(demo: Path, tmp_path: Path) -> None:
    again = make_demo_coco(tmp_path / "again", num_images=N, seed=3)
    other = make_demo_coco(tmp_path / "other", num_images=N, seed=4)
    assert _files(again) == _files(demo)
    assert len(_files(demo)) == N + 1
    assert _files(other) != _files(demo)


def test_complete_set_is_reused_and_an_incomplete_one_repaired(demo: Path, tmp_path: Path) -> None:
    root = make_demo_coco(tmp_path / "d", num_images=N, seed=3)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    make_demo_coco(root, num_images=N, seed=3)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps

    victim = sorted((root / "val2017").iterdir())[3]
    victim.unlink()
    make_demo_coco(root, num_images=N, seed=3)
    assert _files(root) == _files(demo)

    # other parameters: regenerated, and the images of the old set are gone
    make_demo_coco(root, num_images=N + 2, seed=5)
    listed = {im["file_name"] for im in _annotations(root)["images"]}
    assert {p.name for p in (root / "val2017").iterdir()} == listed
    assert len(listed) == N + 2


def test_refuses_to_overwrite_a_real_annotation_file(tmp_path: Path) -> None:
    ann = tmp_path / "annotations" / "instances_val2017.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(DatasetError, match="not a generated demo set"):
        make_demo_coco(tmp_path)
    assert json.loads(ann.read_text()) == {"images": [], "annotations": [], "categories": []}


@pytest.mark.parametrize("bad", [0, -1, 5000, 2.5])
def test_rejects_bad_image_counts(tmp_path: Path, bad: object) -> None:
    with pytest.raises(DatasetError, match="num_images"):
        make_demo_coco(tmp_path, num_images=bad)  # type: ignore[arg-type]


def test_is_a_coco_set_with_the_80_standard_categories(demo: Path) -> None:
    data = _annotations(demo)
    coco = COCO(str(demo / "annotations" / "instances_val2017.json"))
    cat_ids = sorted(coco.getCatIds())
    assert cat_ids == [i for i in range(1, 91) if i not in COCO_ID_GAPS]
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert (names[1], names[18], names[90]) == ("person", "dog", "toothbrush")
    assert len(set(names.values())) == 80

    ids = [im["id"] for im in data["images"]]
    assert len(set(ids)) == N and ids != sorted(ids)  # unordered, like COCO
    sizes = set()
    grayscale = 0
    for im in data["images"]:
        assert im["file_name"] == f"{im['id']:012d}.jpg"
        raw = cv2.imread(str(demo / "val2017" / im["file_name"]), cv2.IMREAD_UNCHANGED)
        assert raw.shape[:2] == (im["height"], im["width"])
        grayscale += raw.ndim == 2
        sizes.add((im["width"], im["height"]))
    assert grayscale >= 1
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)
    assert len(sizes) >= 8
    assert [cat_id for cat_id, _ in load_coco(demo).categories] == cat_ids


def test_boxes_match_the_drawn_objects(demo: Path) -> None:
    data = _annotations(demo)
    by_id = {im["id"]: im for im in data["images"]}
    anns = data["annotations"]
    assert len(anns) >= N
    assert len({a["id"] for a in anns}) == len(anns)
    assert any(a["area"] < 32**2 for a in anns) or any(a["area"] > 96**2 for a in anns)
    for ann in anns:
        im = by_id[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert ann["iscrowd"] == 0 and ann["category_id"] not in COCO_ID_GAPS
        assert min(x, y) >= 0 and x + w <= im["width"] and y + h <= im["height"]
        # filled rectangle (area = w*h) or ellipse (about pi/4 of the box)
        assert 0.7 * w * h <= ann["area"] <= w * h
        img = cv2.imread(str(demo / "val2017" / im["file_name"]), cv2.IMREAD_GRAYSCALE).astype(float)
        inner = img[y + h // 3 : y + h - h // 3, x + w // 3 : x + w - w // 3]
        ring = np.concatenate(
            [img[max(0, y - 4) : y, x : x + w].ravel(), img[y + h : y + h + 4, x : x + w].ravel()]
        )
        assert inner.std() < 6.0, "an object is a flat fill"
        if ring.size > 20:
            assert ring.std() > 8.0, "just outside the box is textured background"
