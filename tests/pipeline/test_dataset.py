"""Reading and validating a COCO root: order by id, max_images, categories, and clear errors.

The annotation checks (one test per case of docs/annotations.md) use a small document written in
tmp_path: three images (ids 5, 7, 9; files of a few bytes, as only their existence is checked) and
four annotations (ids 1..4) over COCO's 80 categories.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gfocal_pipeline.dataset import check_annotations, load_annotations, load_coco, read_annotations
from gfocal_pipeline.demo_data import COCO_CATEGORIES, make_demo_coco
from gfocal_pipeline.errors import ConfigError, DatasetError, EvaluationError, GfocalError
from gfocal_pipeline.evaluate import category_ids

ANN = Path("annotations") / "instances_val2017.json"
COCO_IDS = [cat_id for cat_id, _, _ in COCO_CATEGORIES]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_coco(tmp_path_factory.mktemp("demo"), num_images=16, seed=1)


@pytest.fixture
def copy(demo: Path, tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    shutil.copytree(demo, root)
    return root


def _edit(root: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    path = root / ANN
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _document() -> dict[str, Any]:
    images = [
        {"id": 9, "file_name": "c.jpg", "width": 300, "height": 200},
        {"id": 5, "file_name": "a.jpg", "width": 640, "height": 480},
        {"id": 7, "file_name": "b.jpg", "width": 480, "height": 640},
    ]

    def ann(
        ann_id: int, image_id: int, category_id: int, bbox: list[float], iscrowd: int = 0
    ) -> dict[str, Any]:
        area = bbox[2] * bbox[3]
        return {
            "id": ann_id,
            "image_id": image_id,
            "category_id": category_id,
            "bbox": bbox,
            "area": area,
            "iscrowd": iscrowd,
        }

    annotations = [
        ann(1, 5, 1, [10, 20, 100, 50]),
        ann(2, 5, 3, [200.5, 100.25, 30.5, 40.0]),
        ann(3, 7, 90, [0, 0, 480, 640]),
        ann(4, 9, 1, [250, 150, 50, 50]),
    ]
    categories = [{"id": cat_id, "name": name, "supercategory": sup} for cat_id, name, sup in COCO_CATEGORIES]
    return {"info": {}, "images": images, "annotations": annotations, "categories": categories}


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A COCO root with the small document; edit it with `_edit(root, change)`."""
    root = tmp_path / "small"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (root / "val2017" / name).write_bytes(b"jpeg")
    (root / ANN).write_text(json.dumps(_document()))
    return root


def _rejects(root: Path, *needles: str, **kwargs: Any) -> str:
    """The DatasetError message of load_coco(root); it names the annotation file and every needle."""
    with pytest.raises(DatasetError) as err:
        load_coco(root, **kwargs)
    message = str(err.value)
    assert str(root.resolve() / ANN) in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"
    return message


# ---------------------------------------------------------------- what worked before


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
    dataset = load_coco(copy)
    assert [cat_id for cat_id, _ in dataset.categories] == expected
    assert dataset.categories[0] == (1, "person")
    assert len(expected) == 80 and expected[-1] == 90
    assert dataset.class_of == {cat_id: k for k, cat_id in enumerate(expected)}


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


def test_empty_dataset(small: Path) -> None:
    _edit(small, lambda d: d.update(images=[], annotations=[]))
    _rejects(small, "lists no images")


def test_the_small_document_is_valid(small: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gfocal_pipeline.dataset"):
        dataset = load_coco(small)
    assert [image.image_id for image in dataset.images] == [5, 7, 9]
    assert len(dataset.categories) == 80 and dataset.class_of[90] == 79
    assert not caplog.records
    checked = load_annotations(small / ANN)
    assert checked.annotations == 4 and checked.images[0] == (5, "a.jpg", 640, 480)


# ---------------------------------------------------------------- the file itself


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        pytest.param(json.dumps(_document())[:900].encode(), ["not valid JSON", "truncated"], id="truncated"),
        pytest.param(
            b'{"images": [], "annotations": [], "categories": [], "info": "\xff"}',
            ["not UTF-8 text (byte", "re-download"],
            id="not-utf8",
        ),
        pytest.param(b"", ["is empty"], id="empty"),
        pytest.param(b"  \n", ["is empty"], id="blank"),
        pytest.param(
            b'{"images": [],\n "annotations": [] "categories": []}',
            ["not valid JSON", "line 2 column"],
            id="malformed",
        ),
        pytest.param(b"[1, 2]", ["holds an array, not a COCO object"], id="top-level-list"),
        pytest.param(b'"images"', ["holds a string"], id="top-level-string"),
        pytest.param(
            b'{"images": [], "categories": []}', ["lacks the key(s) 'annotations'"], id="missing-key"
        ),
        pytest.param(
            b'{"images": {}, "annotations": [], "categories": 3}',
            ["'images' is an object", "'categories' is a number"],
            id="not-lists",
        ),
    ],
)
def test_malformed_annotation_file(small: Path, content: bytes, needles: list[str]) -> None:
    (small / ANN).write_bytes(content)
    _rejects(small, *needles)


def test_deeply_nested_json_is_an_error_not_a_traceback(small: Path) -> None:
    (small / ANN).write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _rejects(small, "nested too deeply")


def test_read_annotations_alone_checks_the_top_level(small: Path) -> None:
    data = read_annotations(small / ANN)
    assert set(data) >= {"images", "annotations", "categories"}
    with pytest.raises(DatasetError, match="does not exist"):
        read_annotations(small / "annotations" / "other.json")


# ---------------------------------------------------------------- entries: errors


def _set(section: str, index: int, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d[section][index].__setitem__(key, value)


def _drop(section: str, index: int, key: str) -> Callable[[dict[str, Any]], None]:
    return lambda d: d[section][index].pop(key)


def _append(section: str, entry: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d[section].append(entry)


def _dup_annotation(d: dict[str, Any]) -> None:
    d["annotations"].append({**d["annotations"][0], "id": 3})


def _shift_boxes(d: dict[str, Any]) -> None:
    for ann in d["annotations"]:
        ann["bbox"][0] += 10_000


ENTRY_ERRORS = [
    # (edit, needles): every needle must be in the message; the file's path always is
    pytest.param(
        _set("annotations", 1, "category_id", 91),
        ["category_id is not in 'categories'", "id 2 (category_id 91)"],
        id="unknown-category",
    ),
    pytest.param(
        _set("annotations", 1, "image_id", 999),
        ["image ids not in 'images'", "id 2 (image_id 999)"],
        id="unknown-image",
    ),
    pytest.param(
        _append("images", {"id": 5, "file_name": "d.jpg", "width": 10, "height": 10}),
        ["image ids listed more than once", "id 5 (2 times)"],
        id="duplicate-image-id",
    ),
    pytest.param(
        _dup_annotation,
        ["annotation ids used more than once", "id 3 (2 times)"],
        id="duplicate-annotation-id",
    ),
    pytest.param(
        _set("annotations", 0, "id", 0),
        ["an id that is not a positive integer", "id 0"],
        id="annotation-id-0",
    ),
    pytest.param(
        _set("annotations", 0, "id", 2**70),
        ["an id that is not a positive integer", f"annotations[0]: {2**70}"],
        id="annotation-id-beyond-int64",
    ),
    pytest.param(
        _set("annotations", 2, "bbox", [500, 10, 20, 20]),
        ["bbox lies entirely outside its image", "id 3 (image 7, 480x640: bbox [500, 10, 20, 20])"],
        id="box-outside",
    ),
    pytest.param(
        _set("annotations", 0, "bbox", [10, 20, -5, 50]),
        ["negative bbox width/height", "id 1 (image 5"],
        id="box-negative",
    ),
    pytest.param(
        _set("annotations", 0, "bbox", [10, 20, float("nan"), 50]),
        ["a bbox that is not 4 finite numbers", "id 1: [10, 20, nan, 50]"],
        id="box-nan",
    ),
    pytest.param(
        _set("annotations", 0, "bbox", [10, 20, float("inf"), 50]),
        ["a bbox that is not 4 finite numbers", "id 1: [10, 20, inf, 50]"],
        id="box-inf",
    ),
    pytest.param(
        _set("annotations", 0, "bbox", [10, 20, 10**400, 50]),
        ["a bbox that is not 4 finite numbers", "id 1: [10, 20, 1000"],
        id="box-beyond-float64",
    ),
    pytest.param(
        _set("annotations", 0, "bbox", [10, "20", 5, 50]),
        ["a bbox that is not 4 finite numbers", "id 1: [10, '20', 5, 50]"],
        id="box-string",
    ),
    pytest.param(
        _set("annotations", 0, "bbox", [10, 20, 5]),
        ["a bbox that is not 4 finite numbers", "id 1: [10, 20, 5]"],
        id="box-three-numbers",
    ),
    pytest.param(
        _set("annotations", 0, "bbox", [10, True, 5, 5]),
        ["a bbox that is not 4 finite numbers", "id 1: [10, True, 5, 5]"],
        id="box-bool",
    ),
    pytest.param(
        _set("annotations", 3, "area", -1),
        ["an area that is not a finite number >= 0", "id 4: -1"],
        id="area-negative",
    ),
    pytest.param(
        _set("annotations", 3, "iscrowd", 2), ["an iscrowd other than 0 or 1", "id 4: 2"], id="iscrowd-2"
    ),
    pytest.param(
        _set("annotations", 1, "image_id", "5"),
        ["an image_id that is not an integer", "id 2: '5'"],
        id="image-id-string",
    ),
    pytest.param(
        _set("annotations", 1, "category_id", 1.0),
        ["a category_id that is not an integer", "id 2: 1.0"],
        id="category-id-float",
    ),
    pytest.param(
        _drop("annotations", 1, "bbox"),
        ["annotations without the key 'bbox'", "id 2"],
        id="annotation-without-bbox",
    ),
    pytest.param(
        _drop("annotations", 1, "iscrowd"),
        ["annotations without the key 'iscrowd'", "id 2"],
        id="annotation-without-iscrowd",
    ),
    pytest.param(
        _drop("annotations", 1, "area"),
        ["annotations without the key 'area'", "id 2"],
        id="annotation-without-area",
    ),
    pytest.param(
        _drop("annotations", 1, "id"),
        ["annotations without the key 'id'", "annotations[1]"],
        id="annotation-without-id",
    ),
    pytest.param(
        _append("annotations", [1, 5, 1]),
        ["annotations entries that are not objects", "annotations[4] is an array"],
        id="annotation-not-object",
    ),
    pytest.param(
        _drop("images", 1, "width"), ["images without the key 'width'", "id 5"], id="image-without-width"
    ),
    pytest.param(
        _drop("images", 0, "file_name"),
        ["images without the key 'file_name'", "id 9"],
        id="image-without-file-name",
    ),
    pytest.param(
        _set("images", 0, "id", "9"),
        ["images whose id is not an integer", "images[0]: '9'"],
        id="image-id-string",
    ),
    pytest.param(
        _set("images", 0, "id", True),
        ["images whose id is not an integer", "images[0]: True"],
        id="image-id-bool",
    ),
    pytest.param(
        _set("images", 1, "width", 0),
        ["width/height is not a positive integer", "id 5: 0x480"],
        id="image-width-0",
    ),
    pytest.param(
        _set("images", 1, "height", 480.5),
        ["width/height is not a positive integer", "id 5: 640x480.5"],
        id="image-height-fraction",
    ),
    pytest.param(
        _set("images", 1, "file_name", 7),
        ["file_name is not a non-empty string", "id 5: 7"],
        id="file-name-number",
    ),
    pytest.param(
        _set("images", 1, "file_name", ""),
        ["file_name is not a non-empty string", "id 5: ''"],
        id="file-name-empty",
    ),
    pytest.param(
        _set("images", 1, "file_name", "/etc/passwd"),
        ["file_name leaves the image folder", "id 5: '/etc/passwd' is absolute"],
        id="file-name-absolute",
    ),
    pytest.param(
        _set("images", 1, "file_name", "../annotations/instances_val2017.json"),
        ["file_name leaves the image folder", "holds '..'"],
        id="file-name-dotdot",
    ),
    pytest.param(
        _set("images", 1, "file_name", "sub/../../x.jpg"),
        ["file_name leaves the image folder", "id 5: 'sub/../../x.jpg' holds '..'"],
        id="file-name-inner-dotdot",
    ),
    pytest.param(
        _set("images", 1, "file_name", "a\x00.jpg"),
        ["file_name leaves the image folder", "NUL byte"],
        id="file-name-nul",
    ),
    pytest.param(
        _append("images", "x.jpg"),
        ["images entries that are not objects", "images[3] is a string"],
        id="image-not-object",
    ),
    pytest.param(
        _drop("categories", 4, "name"),
        ["categories without the key 'name'", "id 5"],
        id="category-without-name",
    ),
    pytest.param(
        _set("categories", 0, "id", "1"),
        ["categories without an integer id and a string name", "categories[0]: id '1'"],
        id="category-id-string",
    ),
    pytest.param(
        _append("categories", {"id": 1, "name": "person"}),
        ["category ids listed more than once", "id 1 (2 times)"],
        id="duplicate-category-id",
    ),
    pytest.param(
        _append("categories", {"id": 91, "name": "banner"}),
        ["categories are not COCO's 80", "81 listed (", "id 91 'banner' is not COCO's", "category_map"],
        id="81-categories",
    ),
    pytest.param(
        lambda d: d.update(categories=d["categories"][:20]),
        [
            "categories are not COCO's 80",
            "20 listed (",
            "COCO's id 22 'elephant' is missing",
            "(60 in all",
            "category_id is not in 'categories' (1 in all: id 3 (category_id 90))",
        ],
        id="20-categories",
    ),
    pytest.param(
        lambda d: d.update(categories=[{"id": i, "name": f"thing{i}"} for i in range(80)]),
        ["categories are not COCO's 80", "id 0 'thing0' is not COCO's"],
        id="80-other-categories",
    ),
    pytest.param(
        lambda d: d.update(categories=[]), ["categories are not COCO's 80", "0 listed ("], id="no-categories"
    ),
]


@pytest.mark.parametrize(("change", "needles"), ENTRY_ERRORS)
def test_entry_errors(small: Path, change: Callable[[dict[str, Any]], None], needles: list[str]) -> None:
    _edit(small, change)
    message = _rejects(small, *needles)
    assert "; " in message  # every problem comes with its fix


def test_many_offenders_are_counted_and_the_first_listed(small: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["annotations"] = [{**d["annotations"][0], "id": i, "category_id": 200 + i} for i in range(1, 12)]

    _edit(small, change)
    message = _rejects(
        small, "(11 in all: id 1 (category_id 201), id 2 (category_id 202)", "id 5 (category_id 205), ...)"
    )
    assert "id 6 " not in message


def test_all_problems_are_reported_together(small: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["annotations"][0]["category_id"] = 91
        d["annotations"][1]["image_id"] = 999
        d["images"][0]["file_name"] = "/abs.jpg"

    _edit(small, change)
    message = _rejects(small, "has 3 problems:", "id 1 (category_id 91)", "id 2 (image_id 999)", "'/abs.jpg'")
    assert message.count("\n  - ") == 3


def test_image_with_bad_fields_is_not_also_unknown(small: Path) -> None:
    _edit(small, _set("images", 1, "width", -3))
    message = _rejects(small, "width/height is not a positive integer", "id 5: -3x480")
    assert "not in 'images'" not in message


def test_every_image_s_boxes_are_checked(small: Path) -> None:
    _edit(small, _shift_boxes)  # every box lies right of its image
    _rejects(small, "entirely outside", "(4 in all: id 1 (image 5", "id 4 (image 9")


# ---------------------------------------------------------------- symbolic links


def test_symlinked_file_leaving_the_image_folder(small: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"not yours")
    (small / "val2017" / "b.jpg").unlink()
    os.symlink(outside, small / "val2017" / "b.jpg")
    message = _rejects(small, "resolve outside the image folder", "'b.jpg' (id 7)", "symbolic link leads out")
    assert "1 of 3 images" in message


def test_symlinked_subfolder_leaving_the_image_folder(small: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.jpg").write_bytes(b"jpeg")
    os.symlink(elsewhere, small / "val2017" / "sub")
    _edit(small, _set("images", 2, "file_name", "sub/x.jpg"))
    _rejects(small, "resolve outside the image folder", "'sub/x.jpg' (id 7)")


def test_symlink_loop_is_an_error(small: Path) -> None:
    os.symlink("loop.jpg", small / "val2017" / "loop.jpg")
    _edit(small, _set("images", 2, "file_name", "loop.jpg"))
    _rejects(small, "'loop.jpg' (id 7)")


def test_a_symlinked_image_folder_and_inner_links_are_fine(small: Path, tmp_path: Path) -> None:
    real = tmp_path / "real_images"
    (small / "val2017").rename(real)
    os.symlink(real, small / "val2017")
    os.symlink("a.jpg", real / "alias.jpg")  # a link that stays inside the folder
    _edit(small, _set("images", 2, "file_name", "alias.jpg"))
    dataset = load_coco(small)
    assert [image.file_name for image in dataset.images] == ["a.jpg", "alias.jpg", "c.jpg"]


def test_only_selected_images_are_resolved(small: Path, tmp_path: Path) -> None:
    (tmp_path / "far.jpg").write_bytes(b"jpeg")
    (small / "val2017" / "c.jpg").unlink()
    os.symlink(tmp_path / "far.jpg", small / "val2017" / "c.jpg")  # image 9, the last by id
    assert len(load_coco(small, max_images=2).images) == 2
    _rejects(small, "'c.jpg' (id 9)")


# ---------------------------------------------------------------- entries: counted warnings


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        pytest.param(
            lambda d: [d["annotations"][i]["bbox"].__setitem__(0, -5) for i in (0, 3)],
            [
                "overhangs its image by more than 1 px",
                "(2 in all: id 1 (image 5, 640x480: bbox [-5, 20, 100, 50])",
                "id 4 (",
            ],
            id="box-overhangs",
        ),
        pytest.param(
            _set("annotations", 0, "bbox", [10, 20, 0, 50]),
            ["zero-size bbox", "(1 in all: id 1 ("],
            id="box-zero-width",
        ),
        pytest.param(
            _set("images", 0, "file_name", "a.jpg"),
            ["file names shared by several image ids", "'a.jpg' (2 ids)"],
            id="shared-file-name",
        ),
        pytest.param(
            lambda d: d["categories"][0].update(name="Person-ish"),
            ["categories named unlike COCO's", "id 1 'Person-ish' (COCO: 'person')"],
            id="category-renamed",
        ),
    ],
)
def test_usable_oddities_are_one_counted_warning(
    small: Path,
    caplog: pytest.LogCaptureFixture,
    change: Callable[[dict[str, Any]], None],
    needles: list[str],
) -> None:
    _edit(small, change)
    with caplog.at_level(logging.WARNING, logger="gfocal_pipeline.dataset"):
        dataset = load_coco(small)
    assert len(dataset.images) == 3
    (message,) = _warnings(caplog)
    assert str(small.resolve() / ANN) in message
    for needle in needles:
        assert needle in message, message


def test_overhang_within_a_pixel_is_silent(small: Path, caplog: pytest.LogCaptureFixture) -> None:
    _edit(small, _set("annotations", 0, "bbox", [-0.5, 20, 641, 50]))
    with caplog.at_level(logging.WARNING, logger="gfocal_pipeline.dataset"):
        load_coco(small)
    assert not _warnings(caplog)


def test_crowd_boxes_are_counted_once_at_info(small: Path, caplog: pytest.LogCaptureFixture) -> None:
    _edit(small, lambda d: [d["annotations"][i].update(iscrowd=1) for i in (0, 1, 2)])
    with caplog.at_level(logging.INFO, logger="gfocal_pipeline.dataset"):
        load_coco(small)
    (record,) = caplog.records
    assert record.levelno == logging.INFO and "3 crowd annotations" in record.getMessage()


# ---------------------------------------------------------------- categories and category_map


def test_category_count_must_match_the_model(copy: Path) -> None:
    _edit(copy, lambda d: d.__setitem__("categories", d["categories"][:20]))
    raw = json.loads((copy / ANN).read_text())["categories"]
    with pytest.raises(EvaluationError, match="20 categories"):
        category_ids(raw, copy / ANN)
    with pytest.raises(DatasetError, match="not COCO's 80"):  # now before any work, too
        load_coco(copy)


def test_coco_names_with_contiguous_ids_are_coco(small: Path) -> None:
    """Some converters renumber COCO 1..80; by name they are still COCO's classes, in order."""
    renumber = dict(zip(COCO_IDS, range(1, 81), strict=True))

    def change(d: dict[str, Any]) -> None:
        for cat in d["categories"]:
            cat["id"] = renumber[cat["id"]]
        for ann in d["annotations"]:
            ann["category_id"] = renumber[ann["category_id"]]

    _edit(small, change)
    assert load_coco(small).class_of == {k + 1: k for k in range(80)}


def _three_categories(d: dict[str, Any]) -> None:
    d["categories"] = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]
    for ann in d["annotations"]:
        ann["category_id"] = 1 + ann["id"] % 3


def test_category_map_accepts_a_custom_set(small: Path) -> None:
    _edit(small, _three_categories)
    _rejects(small, "categories are not COCO's 80", "3 listed (")
    dataset = load_coco(small, category_map={1: 15, 2: 16, 3: 14})
    assert dataset.class_of == {1: 15, 2: 16, 3: 14}
    assert dataset.categories == [(1, "cat"), (2, "dog"), (3, "bird")]


@pytest.mark.parametrize(
    ("category_map", "needles"),
    [
        pytest.param(
            {1: 15, 2: 16, 3: 14, 7: 3},
            ["category_map keys that are not category ids of the file", "id 7"],
            id="unknown-key",
        ),
        pytest.param(
            {1: 15, 3: 14},
            ["annotations of categories that category_map leaves out", "(category_id 2)"],
            id="unmapped-category",
        ),
    ],
)
def test_category_map_must_fit_the_file(
    small: Path, category_map: dict[int, int], needles: list[str]
) -> None:
    _edit(small, _three_categories)
    _rejects(small, *needles, category_map=category_map)


@pytest.mark.parametrize(
    ("category_map", "needle"),
    [
        pytest.param({1: 80}, "1: 80", id="class-out-of-range"),
        pytest.param({1: -1}, "1: -1", id="negative-class"),
        pytest.param({"1": 0}, "'1': 0", id="string-key"),
        pytest.param({1: 0, 2: 0}, "model class(es) 0", id="two-categories-one-class"),
        pytest.param({}, "non-empty dict", id="empty"),
        pytest.param([(1, 0)], "non-empty dict", id="not-a-dict"),
    ],
)
def test_invalid_category_map_is_a_config_error(small: Path, category_map: Any, needle: str) -> None:
    with pytest.raises(ConfigError, match="category_map") as err:
        load_coco(small, category_map=category_map)
    assert needle in str(err.value)


def test_check_annotations_names_the_given_path(small: Path) -> None:
    data = read_annotations(small / ANN)
    data["annotations"][0]["category_id"] = 91
    with pytest.raises(DatasetError, match=r"'elsewhere\.json'.*id 1 \(category_id 91\)"):
        check_annotations(data, "elsewhere.json")
