"""The dataset check for a model with its own classes: `num_classes` and `classes` of its spec decide
which categories an annotation file must have and which model class each one is."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from gfocal_pipeline.dataset import load_annotations, load_coco
from gfocal_pipeline.errors import ConfigError, DatasetError

CATEGORIES = [{"id": 9, "name": "dog"}, {"id": 2, "name": "Bird "}, {"id": 5, "name": "cat"}]
CLASSES = ("CAT", "dog", " bird")


def write_set(
    root: Path, categories: list[dict[str, Any]] = CATEGORIES, extra_ann: int | None = None
) -> Path:
    """A COCO root with two (dummy) images and one box per category of `CATEGORIES`; `extra_ann`: one
    more box of that category id. Returns the annotation file."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 80} for i in (1, 2)]
    for image in images:
        (root / "val2017" / image["file_name"]).write_bytes(b"not decoded here")
    cats = [c["id"] for c in CATEGORIES] + ([] if extra_ann is None else [extra_ann])
    annotations = [
        {
            "id": n + 1,
            "image_id": 1 + n % 2,
            "category_id": c,
            "bbox": [5, 5, 20, 20],
            "area": 400,
            "iscrowd": 0,
        }
        for n, c in enumerate(cats)
    ]
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_classes_map_categories_by_name(tmp_path: Path) -> None:
    path = write_set(tmp_path)
    # label 0 = cat (id 5), 1 = dog (id 9), 2 = bird (id 2): names compared case-insensitively, stripped
    assert load_annotations(path, num_classes=3, classes=CLASSES).class_of == {5: 0, 9: 1, 2: 2}
    dataset = load_coco(tmp_path, num_classes=3, classes=CLASSES)
    assert dataset.class_of == {5: 0, 9: 1, 2: 2}
    assert dataset.categories == [(2, "Bird "), (5, "cat"), (9, "dog")]


def test_without_classes_class_k_is_the_kth_id(tmp_path: Path) -> None:
    path = write_set(tmp_path)
    assert load_annotations(path, num_classes=3).class_of == {2: 0, 5: 1, 9: 2}


def test_the_default_is_still_coco_s_80(tmp_path: Path) -> None:
    path = write_set(tmp_path)
    with pytest.raises(DatasetError, match="categories are not COCO's 80, the model's classes: 3 listed"):
        load_annotations(path)


def test_a_category_count_unlike_num_classes_names_the_file_and_the_fix(tmp_path: Path) -> None:
    path = write_set(tmp_path)
    with pytest.raises(DatasetError) as err:
        load_coco(tmp_path, num_classes=4)
    message = str(err.value)
    assert str(path) in message
    assert "categories are not the model's 4 classes: 3 listed" in message
    assert "exactly 4 categories" in message and "`classes`" in message


def test_a_class_no_category_is_named_as(tmp_path: Path) -> None:
    path = write_set(tmp_path)
    with pytest.raises(DatasetError) as err:
        load_annotations(path, num_classes=3, classes=("cat", "dog", "horse"))
    message = str(err.value)
    assert str(path) in message and "model classes that no category is named as" in message
    assert "'horse'" in message and "'cat'" not in message


def test_two_classes_naming_one_category_are_refused(tmp_path: Path) -> None:
    path = write_set(tmp_path)
    with pytest.raises(DatasetError, match=r"name the same category.*'cat', 'Cat '"):
        load_annotations(path, num_classes=3, classes=("cat", "Cat ", "dog"))


def test_two_categories_of_one_name_are_refused(tmp_path: Path) -> None:
    path = write_set(tmp_path, [*CATEGORIES, {"id": 11, "name": "DOG"}])
    with pytest.raises(DatasetError, match=r"several categories are named as.*'dog' \(ids 9, 11\)"):
        load_annotations(path, num_classes=3, classes=CLASSES)


def test_boxes_of_a_category_the_classes_do_not_name_are_only_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_set(tmp_path, [*CATEGORIES, {"id": 7, "name": "horse"}], extra_ann=7)
    with caplog.at_level(logging.WARNING, logger="gfocal_pipeline.dataset"):
        checked = load_annotations(path, num_classes=3, classes=CLASSES)
    assert checked.class_of == {5: 0, 9: 1, 2: 2}
    assert "categories that the model's classes do not name" in caplog.text and "category_id 7" in caplog.text
    # without classes a fourth category is one too many
    with pytest.raises(DatasetError, match="not the model's 3 classes: 4 listed"):
        load_annotations(path, num_classes=3)


def test_category_map_indices_follow_num_classes(tmp_path: Path) -> None:
    write_set(tmp_path)
    assert load_coco(tmp_path, category_map={2: 2, 5: 0, 9: 1}, num_classes=3).class_of == {2: 2, 5: 0, 9: 1}
    with pytest.raises(ConfigError, match=r"0\.\.2"):
        load_coco(tmp_path, category_map={2: 3, 5: 0, 9: 1}, num_classes=3)
