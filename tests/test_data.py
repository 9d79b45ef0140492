"""Tests of pcb_train.data: the LVIS-format torch dataset, its errors, augmentation and collate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError
from pcb_train.data import LVISDetectionDataset, collate, decode_segmentation, horizontal_flip, targets_to

H, W = 10, 12


def _lvis(
    tmp_path: Path, *, drop_file: str | None = None, extra_images: list[dict[str, Any]] | None = None
) -> Path:
    """A hand-made LVIS file: categories 7 and 3 (contiguous 3 -> 0, 7 -> 1), images 10, 2, 5
    listed out of order, image 5 without annotations."""
    img_dir = tmp_path / "images" / "val"
    img_dir.mkdir(parents=True, exist_ok=True)
    images = [
        {"id": 10, "file_name": "val/a.png", "height": H, "width": W},
        {"id": 2, "file_name": "val/b.png", "height": H, "width": W},
        {"id": 5, "file_name": "val/c.png", "height": H, "width": W},
    ] + (extra_images or [])
    for k, im in enumerate(images):
        pixels = np.zeros((H, W, 3), dtype=np.uint8)
        pixels[..., 0] = 255
        pixels[..., 1] = 51 * k
        name = Path(im.get("file_name") or im["coco_url"].split("/", 3)[-1]).name
        sub = "val" if "file_name" in im else im["coco_url"].split("/")[-2]
        (tmp_path / "images" / sub).mkdir(parents=True, exist_ok=True)
        if name != drop_file:
            Image.fromarray(pixels).save(tmp_path / "images" / sub / name)
    anns = [
        # image 10: a 4x4 square polygon of class 7 at [2, 6) x [2, 6)
        {
            "id": 1,
            "image_id": 10,
            "category_id": 7,
            "bbox": [2, 2, 4, 4],
            "area": 16.0,
            "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]],
        },
        # image 10: a 3x2 rectangle of class 3 at x in [1, 4), y in [1, 3)
        {
            "id": 2,
            "image_id": 10,
            "category_id": 3,
            "bbox": [1, 1, 3, 2],
            "area": 6.0,
            "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]],
        },
        # image 10: a degenerate box (w = 0): dropped
        {
            "id": 3,
            "image_id": 10,
            "category_id": 3,
            "bbox": [5, 5, 0, 2],
            "area": 0.0,
            "segmentation": [[5, 5, 5, 5, 5, 7, 5, 7]],
        },
        # image 2: a crowd region of class 3 (kept at test time, dropped in training)
        {
            "id": 4,
            "image_id": 2,
            "category_id": 3,
            "bbox": [0, 0, 5, 5],
            "area": 25.0,
            "iscrowd": 1,
            "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]],
        },
        {
            "id": 5,
            "image_id": 2,
            "category_id": 7,
            "bbox": [6, 4, 4, 5],
            "area": 20.0,
            "segmentation": [[6, 4, 10, 4, 10, 9, 6, 9]],
        },
    ]
    cats = [
        {"id": 7, "name": "seven", "frequency": "r", "image_count": 2},
        {"id": 3, "name": "three", "frequency": "f", "image_count": 2},
    ]
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ann


def test_items_follow_the_conventions(tmp_path: Path) -> None:
    ann = _lvis(tmp_path)
    ds = LVISDetectionDataset(ann, tmp_path / "images", 2, train=False)
    assert ds.image_ids == [2, 5, 10]  # sorted by id, not the JSON's order
    assert ds.categories.ids == (3, 7) and ds.num_classes == 2
    image, t = ds[2]  # image 10
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    # red channel 255 -> 1.0; green 51 * 0 -> 0 (image 10 is the first written)
    assert torch.all(image[0] == 1.0) and torch.all(image[1] == 0.0)
    assert t["image_id"].item() == 10 and t["image_id"].dtype == torch.int64
    # xywh -> xyxy; category 7 -> 1, 3 -> 0; the degenerate box is gone
    assert torch.equal(t["boxes"], torch.tensor([[2.0, 2.0, 6.0, 6.0], [1.0, 1.0, 4.0, 3.0]]))
    assert torch.equal(t["labels"], torch.tensor([1, 0]))
    assert t["masks"].shape == (2, H, W) and t["masks"].dtype == torch.uint8
    # pixel [x, x+1) convention: the square covers rows/cols 2..5 (16 px), the rectangle rows 1..2, cols 1..3
    expected = torch.zeros((2, H, W), dtype=torch.uint8)
    expected[0, 2:6, 2:6] = 1
    expected[1, 1:3, 1:4] = 1
    assert torch.equal(t["masks"], expected)
    assert not t["iscrowd"].any()


def test_empty_images_and_crowd_regions(tmp_path: Path) -> None:
    ann = _lvis(tmp_path)
    test = LVISDetectionDataset(ann, tmp_path / "images", 2, train=False)
    _, t5 = test[1]
    assert t5["boxes"].shape == (0, 4) and t5["labels"].shape == (0,) and t5["masks"].shape == (0, H, W)
    _, t2 = test[0]
    assert t2["iscrowd"].tolist() == [True, False]
    train = LVISDetectionDataset(ann, tmp_path / "images", 2, train=True, flip_prob=0.0)
    assert train.image_ids == [2, 10]  # image 5 has no annotation
    _, t2 = train[0]
    assert t2["labels"].tolist() == [1] and not t2["iscrowd"].any()
    keep = LVISDetectionDataset(ann, tmp_path / "images", 2, train=True, filter_empty=False)
    assert keep.image_ids == [2, 5, 10]


def test_missing_image_names_the_file(tmp_path: Path) -> None:
    ann = _lvis(tmp_path, drop_file="b.png")
    with pytest.raises(PcbkitError) as err:
        LVISDetectionDataset(ann, tmp_path / "images", 2)
    msg = str(err.value)
    assert "b.png" in msg and "image file not found" in msg and "image id 2" in msg


def test_category_mismatch_is_refused(tmp_path: Path) -> None:
    ann = _lvis(tmp_path)
    with pytest.raises(PcbkitError, match="K=2 classes, the model has K=3"):
        LVISDetectionDataset(ann, tmp_path / "images", 3)
    other = CategorySpace(ids=(3, 8), names=("three", "eight"), frequency=("f", "r"), image_count=(1, 1))
    with pytest.raises(PcbkitError, match="category space mismatch"):
        LVISDetectionDataset(ann, tmp_path / "images", other)
    same = CategorySpace.from_lvis_json(ann)
    assert len(LVISDetectionDataset(ann, tmp_path / "images", same)) == 3


def test_bad_inputs(tmp_path: Path) -> None:
    ann = _lvis(tmp_path)
    with pytest.raises(PcbkitError, match="annotation file not found"):
        LVISDetectionDataset(tmp_path / "nope.json", tmp_path / "images")
    with pytest.raises(PcbkitError, match="image folder not found"):
        LVISDetectionDataset(ann, tmp_path / "nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PcbkitError, match="not valid JSON"):
        LVISDetectionDataset(bad, tmp_path / "images")
    data = json.loads(ann.read_text())
    data["images"][0]["height"] = H + 1
    wrong = tmp_path / "wrong_size.json"
    wrong.write_text(json.dumps(data))
    ds = LVISDetectionDataset(wrong, tmp_path / "images")
    with pytest.raises(PcbkitError, match="a.png: image is 12x10 but"):
        ds[ds.image_ids.index(10)]


def test_coco_url_resolution(tmp_path: Path) -> None:
    extra = [{"id": 20, "coco_url": "http://images.cocodataset.org/train2017/d.png", "height": H, "width": W}]
    ann = _lvis(tmp_path, extra_images=extra)
    ds = LVISDetectionDataset(ann, tmp_path / "images", 2)
    entry = ds.entries[ds.image_ids.index(20)]
    assert entry.path == tmp_path / "images" / "train2017" / "d.png"


def test_horizontal_flip() -> None:
    image = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)[:1].expand(3, 3, 4)
    masks = torch.zeros((1, 3, 4), dtype=torch.uint8)
    masks[0, :, 0] = 1  # leftmost column
    t = {"boxes": torch.tensor([[0.0, 0.5, 1.0, 2.0]]), "labels": torch.tensor([0]), "masks": masks}
    flipped, ft = horizontal_flip(image, t)
    # W = 4: x1' = 4 - 1 = 3, x2' = 4 - 0 = 4
    assert torch.equal(ft["boxes"], torch.tensor([[3.0, 0.5, 4.0, 2.0]]))
    assert ft["masks"][0, :, 3].all() and ft["masks"][0, :, :3].sum() == 0
    assert torch.equal(flipped[..., 0], image[..., 3])
    back, bt = horizontal_flip(flipped, ft)  # an involution
    assert (
        torch.equal(back, image) and torch.equal(bt["boxes"], t["boxes"]) and torch.equal(bt["masks"], masks)
    )
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}
    assert horizontal_flip(image, empty)[1]["boxes"].shape == (0, 4)


def test_training_flip_uses_the_generator_and_mirrors_boxes_and_masks(tmp_path: Path) -> None:
    ann = _lvis(tmp_path)
    plain = LVISDetectionDataset(ann, tmp_path / "images", 2, train=True, flip_prob=0.0)
    flip = LVISDetectionDataset(ann, tmp_path / "images", 2, train=True, flip_prob=1.0)
    (i0, t0), (i1, t1) = plain[1], flip[1]
    assert torch.equal(i1, i0.flip(-1)) and torch.equal(t1["masks"], t0["masks"].flip(-1))
    assert torch.equal(t1["boxes"][:, [0, 2]], W - t0["boxes"][:, [2, 0]])
    # the flip decisions follow the given generator: same seed, same decisions
    decisions = []
    for _ in range(2):
        g = torch.Generator().manual_seed(7)
        ds = LVISDetectionDataset(ann, tmp_path / "images", 2, train=True, flip_prob=0.5, generator=g)
        decisions.append([bool(torch.equal(ds[1][1]["boxes"], t1["boxes"])) for _ in range(8)])
    assert decisions[0] == decisions[1] and 0 < sum(decisions[0]) < 8
    # no augmentation at test time whatever flip_prob says
    test = LVISDetectionDataset(ann, tmp_path / "images", 2, train=False, flip_prob=1.0)
    assert torch.equal(test[2][0], plain[1][0])


def test_collate_and_targets_to(tmp_path: Path) -> None:
    ds = LVISDetectionDataset(_lvis(tmp_path), tmp_path / "images", 2, with_masks=False)
    images, targets = collate([ds[0], ds[2]])
    assert len(images) == 2 and [t["image_id"].item() for t in targets] == [2, 10]
    assert "masks" not in targets[0]
    moved = targets_to(targets, "cpu")
    assert torch.equal(moved[1]["boxes"], targets[1]["boxes"])


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_decode_segmentation_rle_forms() -> None:
    m = np.zeros((5, 6), dtype=np.uint8)
    m[1:3, 2:5] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    assert np.array_equal(decode_segmentation(rle, 5, 6), m)  # compressed RLE
    # uncompressed RLE (list counts), column-major runs: 7 zeros, 2 ones, 3 zeros, 2 ones, ...
    runs = mask_utils.decode(rle)
    flat = runs.flatten(order="F")
    counts, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(n)
            cur, n = v, 0
        n += 1
    counts.append(n)
    assert np.array_equal(decode_segmentation({"size": [5, 6], "counts": counts}, 5, 6), m)
    assert decode_segmentation([[1, 1, 2]], 5, 6).sum() == 0  # a polygon needs 3 points
    with pytest.raises(ValueError):
        decode_segmentation("nope", 5, 6)


@pytest.fixture(scope="module")
def synth_split(synth_dataset: Path) -> Path:
    return synth_dataset  # the session's shared K = 12 dataset (conftest)


def test_on_a_synthetic_split(synth_split: Path) -> None:
    ann = synth_split / "val.json"
    data = json.loads(ann.read_text())
    ds = LVISDetectionDataset(ann, synth_split / "images", CategorySpace.from_lvis_json(ann))
    assert len(ds) == len(data["images"]) == 40
    assert ds.image_ids == sorted(im["id"] for im in data["images"])
    areas: dict[int, list[float]] = {}
    for a in data["annotations"]:
        areas.setdefault(a["image_id"], []).append(a["area"])
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, 64, 64) and float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        assert t["labels"].min() >= 0 and t["labels"].max() < 12
        assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all()
        # synth's `area` is the pycocotools area of the polygon: the decoded masks match it exactly
        assert sorted(t["masks"].sum(dim=(1, 2)).tolist()) == sorted(areas.get(ds.image_ids[i], []))
