"""Reading and validating a COCO root: order by id, max_images, categories, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gfocal_pipeline.dataset import load_coco
from gfocal_pipeline.demo_data import make_demo_coco
from gfocal_pipeline.errors import DatasetError, EvaluationError, GfocalError
from gfocal_pipeline.evaluate import category_ids

ANN = Path("annotations") / "instances_val2017.json"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_coco(tmp_path_factory.mktemp("demo"), num_images=16, seed=1)


@pytest.fixture
def copy(demo: Path, tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    shutil.copytree(demo, root)
    return root


def _edit(root: Path, change) -> None:
    path = root / ANN
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_images_are_ordered_by_id_and_resolved(demo: Path) -> None:
    raw = json.loads((demo / ANN).read_text())
    dataset = load_coco(demo)
    ids = [image.image_id for image in dataset.images]
    assert ids == sorted(im["id"] for im in raw["images"])
    assert dataset.total_images == 16
    by_id = {im["id"]: im for im in raw["images"]}
    for image in dataset.images:
        entry = by_id[image.image_id]
        assert image.path == demo / "val2017" / entry["file_name"]
        assert (image.width, image.height) == (entry["width"], entry["height"])
    assert dataset.annotation_file == demo / ANN and dataset.image_dir == demo / "val2017"


def test_max_images_takes_the_first_ids(demo: Path) -> None:
    everything = load_coco(demo)
    first = load_coco(demo, max_images=5)
    assert first.images == everything.images[:5]
    assert load_coco(demo, max_images=100).images == everything.images
    for bad in (0, -3):
        with pytest.raises(DatasetError, match="max_images"):
            load_coco(demo, max_images=bad)


def test_category_ids_are_sorted_ids(copy: Path) -> None:
    # reorder the categories in the file: the mapping must still be "sorted by id"
    _edit(copy, lambda d: d["categories"].reverse())
    raw = json.loads((copy / ANN).read_text())["categories"]
    expected = sorted(c["id"] for c in raw)
    assert category_ids(raw, copy / ANN) == expected
    assert [cat_id for cat_id, _ in load_coco(copy).categories] == expected
    assert load_coco(copy).categories[0] == (1, "person")
    assert len(expected) == 80 and expected[-1] == 90


def test_category_count_must_match_the_model(copy: Path) -> None:
    _edit(copy, lambda d: d.__setitem__("categories", d["categories"][:20]))
    raw = json.loads((copy / ANN).read_text())["categories"]
    with pytest.raises(EvaluationError, match="20 categories"):
        category_ids(raw, copy / ANN)
    assert len(load_coco(copy).categories) == 20


def test_custom_image_dir_and_annotation_names(copy: Path) -> None:
    (copy / "val2017").rename(copy / "images")
    (copy / ANN).rename(copy / "annotations" / "mine.json")
    dataset = load_coco(copy, image_dir="images", annotation_file="annotations/mine.json")
    assert len(dataset.images) == 16
    absolute = load_coco(copy, image_dir="images", annotation_file=str(copy / "annotations" / "mine.json"))
    assert absolute.images == dataset.images


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist") as err:
        load_coco(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    assert isinstance(err.value, GfocalError)


def test_missing_image_dir(copy: Path) -> None:
    shutil.rmtree(copy / "val2017")
    with pytest.raises(DatasetError, match="image directory") as err:
        load_coco(copy)
    assert str(copy / "val2017") in str(err.value)


def test_missing_annotation_file(copy: Path) -> None:
    (copy / ANN).unlink()
    with pytest.raises(DatasetError, match="annotation file") as err:
        load_coco(copy)
    assert str(copy / ANN) in str(err.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a COCO object"),
        (json.dumps({"images": [], "categories": []}), "lacks the list.*annotations"),
        (json.dumps({"images": {}, "annotations": [], "categories": []}), "lacks the list.*images"),
        (
            json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [], "categories": []}),
            r"images\[0\] lacks",
        ),
    ],
)
def test_malformed_annotation_file(copy: Path, content: str, message: str) -> None:
    (copy / ANN).write_text(content)
    with pytest.raises(DatasetError, match=message) as err:
        load_coco(copy)
    assert str(copy / ANN) in str(err.value)


def test_duplicate_ids_and_bad_sizes(copy: Path) -> None:
    _edit(copy, lambda d: d["images"].append(dict(d["images"][0])))
    with pytest.raises(DatasetError, match="twice"):
        load_coco(copy)
    _edit(copy, lambda d: d["images"].pop())
    _edit(copy, lambda d: d["images"][0].__setitem__("width", 0))
    with pytest.raises(DatasetError, match="size 0x"):
        load_coco(copy)


def test_image_ids_without_files(copy: Path) -> None:
    dataset = load_coco(copy)
    gone = [dataset.images[i] for i in (2, 5, 9)]
    for image in gone:
        image.path.unlink()
    with pytest.raises(DatasetError) as err:
        load_coco(copy)
    message = str(err.value)
    assert "3 of 16 images" in message
    assert all(image.file_name in message for image in gone)
    # only the selected images need to exist
    assert len(load_coco(copy, max_images=2).images) == 2


def test_many_missing_files_are_summarised(copy: Path) -> None:
    for path in (copy / "val2017").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match=r"16 of 16 images.*\(16 in all\)"):
        load_coco(copy)


def test_empty_dataset(copy: Path) -> None:
    _edit(copy, lambda d: d.__setitem__("images", []))
    with pytest.raises(DatasetError, match="lists no images"):
        load_coco(copy)
