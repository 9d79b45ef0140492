"""Tests of the synthetic LVIS-format dataset generator and the `pcbkit synth` command."""

from __future__ import annotations

import colorsys
import json
import subprocess
import sys
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from click.testing import CliRunner
from PIL import Image

from pcb_analysis import synth
from pcb_analysis.errors import PcbkitError
from pcb_analysis.synth import SynthConfig, SynthSummary, frequency_bucket, generate, make_lvis_dicts
from pcbkit.cmd_synth import synth_cmd

SMALL = SynthConfig(seed=3, num_classes=12, train_images=200, val_images=60, size=64)
TINY = SynthConfig(seed=5, num_classes=6, train_images=150, val_images=20, size=48)

LVIS_CATEGORY_KEYS = {"id", "name", "synset", "synonyms", "def", "frequency", "image_count", "instance_count"}
LVIS_IMAGE_KEYS = {"id", "file_name", "height", "width", "neg_category_ids", "not_exhaustive_category_ids"}
LVIS_ANN_KEYS = {"id", "image_id", "category_id", "segmentation", "bbox", "area"}


@dataclass(frozen=True)
class Generated:
    root: Path
    summary: SynthSummary
    train: dict[str, Any]
    val: dict[str, Any]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    root = tmp_path_factory.mktemp("synth_small")
    summary = generate(root, SMALL, progress=False)
    train = json.loads((root / "train.json").read_text())
    val = json.loads((root / "val.json").read_text())
    return Generated(root, summary, train, val)


def _images_per_category(d: dict[str, Any]) -> Counter[int]:
    return Counter(cid for _, cid in {(a["image_id"], a["category_id"]) for a in d["annotations"]})


def _present(d: dict[str, Any]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = defaultdict(set)
    for a in d["annotations"]:
        out[a["image_id"]].add(a["category_id"])
    return out


# ----------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize(
    ("count", "bucket"), [(1, "r"), (10, "r"), (11, "c"), (100, "c"), (101, "f"), (5000, "f")]
)
def test_frequency_bucket_uses_lvis_thresholds(count: int, bucket: str) -> None:
    assert frequency_bucket(count) == bucket


def test_frequency_bucket_rejects_zero() -> None:
    with pytest.raises(ValueError):
        frequency_bucket(0)


# ----------------------------------------------------------------------------- files and format


def test_files_load_with_lvis_api(small: Generated) -> None:
    lvis = pytest.importorskip("lvis")
    for split in ("train", "val"):
        path = small.root / f"{split}.json"
        assert small.summary.annotation_files[split] == path
        api = lvis.LVIS(str(path))
        assert len(api.get_img_ids()) == small.summary.num_images[split]
        assert len(api.get_ann_ids()) == small.summary.num_annotations[split]
        assert len(api.get_cat_ids()) == SMALL.num_classes
    assert small.summary.num_images == {"train": 200, "val": 60}
    assert small.summary.images_written == 260 and small.summary.images_reused == 0


def test_only_lvis_fields(small: Generated) -> None:
    for d in (small.train, small.val):
        assert {"images", "annotations", "categories"} <= set(d)
        assert all(set(c) == LVIS_CATEGORY_KEYS for c in d["categories"])
        assert all(set(i) == LVIS_IMAGE_KEYS for i in d["images"])
        assert all(set(a) == LVIS_ANN_KEYS for a in d["annotations"])
        assert all(c["frequency"] in ("r", "c", "f") for c in d["categories"])


def test_images_on_disk_match_entries(small: Generated) -> None:
    for split, d in (("train", small.train), ("val", small.val)):
        names = sorted(p.name for p in (small.root / "images" / split).iterdir())
        assert names == sorted(Path(i["file_name"]).name for i in d["images"])
        for img in d["images"][:5]:
            assert img["file_name"].startswith(f"{split}/")
            with Image.open(small.root / "images" / img["file_name"]) as im:
                assert im.mode == "RGB" and im.size == (img["width"], img["height"]) == (
                    SMALL.size,
                    SMALL.size,
                )
        assert not [q for q in (small.root / "images" / split).iterdir() if q.name.startswith(".")]


def test_ids(small: Generated) -> None:
    assert [c["id"] for c in small.train["categories"]] == list(range(1, SMALL.num_classes + 1))
    names = [c["name"] for c in small.train["categories"]]
    assert names == sorted(names) and len(set(names)) == len(names)
    train_ids = [i["id"] for i in small.train["images"]]
    val_ids = [i["id"] for i in small.val["images"]]
    assert train_ids == list(range(1, 201))
    assert val_ids == list(range(201, 261))
    train_ann = [a["id"] for a in small.train["annotations"]]
    val_ann = [a["id"] for a in small.val["annotations"]]
    assert train_ann == list(range(1, len(train_ann) + 1))
    assert val_ann == list(range(len(train_ann) + 1, len(train_ann) + len(val_ann) + 1))
    for d, ids in ((small.train, set(train_ids)), (small.val, set(val_ids))):
        assert {a["image_id"] for a in d["annotations"]} <= ids
        assert {a["category_id"] for a in d["annotations"]} <= set(range(1, SMALL.num_classes + 1))


def test_category_statistics_come_from_train(small: Generated) -> None:
    assert small.val["categories"] == small.train["categories"]
    images = _images_per_category(small.train)
    instances = Counter(a["category_id"] for a in small.train["annotations"])
    for cat in small.train["categories"]:
        assert cat["image_count"] == images[cat["id"]]
        assert cat["instance_count"] == instances[cat["id"]]
        assert cat["frequency"] == frequency_bucket(cat["image_count"])
    buckets = Counter(c["frequency"] for c in small.train["categories"])
    assert dict(small.summary.bucket_counts) == {b: buckets[b] for b in "rcf"}
    assert all(buckets[b] >= 1 for b in "rcf")


def test_every_class_appears_in_val(small: Generated) -> None:
    in_val = _images_per_category(small.val)
    assert all(in_val[c["id"]] >= 1 for c in small.val["categories"])


def test_geometry_bbox_area_and_polygons(small: Generated) -> None:
    size = SMALL.size
    for a in small.train["annotations"] + small.val["annotations"]:
        assert len(a["segmentation"]) == 1
        poly = a["segmentation"][0]
        assert len(poly) % 2 == 0 and len(poly) >= 6
        assert all(round(v, 2) == v and 0 <= v <= size for v in poly)
        xs, ys = poly[0::2], poly[1::2]
        x, y, w, h = a["bbox"]
        assert (x, y) == (min(xs), min(ys))
        assert abs(x + w - max(xs)) < 1e-6 and abs(y + h - max(ys)) < 1e-6
        rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], size, size))
        assert a["area"] == float(mask_utils.area(rle)) > 0
        # objects span roughly 15-55% of the image side
        assert 0.1 * size <= max(w, h) <= 0.8 * size


def test_objects_per_image(small: Generated) -> None:
    per_image = Counter(a["image_id"] for a in small.train["annotations"])
    assert set(per_image) == {i["id"] for i in small.train["images"]}  # no empty image
    assert max(per_image.values()) <= 4
    assert 1.5 <= np.mean(list(per_image.values())) <= 4


def _check_federated(d: dict[str, Any]) -> tuple[int, dict[int, int], dict[int, int]]:
    """LVIS consistency of one split; returns (images with a not-exhaustive class, |P_c|, |N_c|)."""
    present = _present(d)
    n_not_exhaustive = 0
    n_pos: Counter[int] = Counter()
    n_neg: Counter[int] = Counter()
    for img in d["images"]:
        here = present[img["id"]]
        neg = set(img["neg_category_ids"])
        ne = set(img["not_exhaustive_category_ids"])
        assert img["neg_category_ids"] == sorted(neg)
        assert not neg & here, "a category is both present and verified absent"
        assert not neg & ne, "a category is both negative and not exhaustive"
        assert ne <= here
        n_not_exhaustive += bool(ne)
        n_pos.update(here)
        n_neg.update(neg)
    return n_not_exhaustive, n_pos, n_neg


def test_federated_fields_random_mode(small: Generated) -> None:
    # neg mode "random" (the default): per class, as many negative images as positive ones, or every
    # image without the class when there are fewer (the heads of this small split).
    assert SMALL.neg_mode == "random"
    n_not_exhaustive = 0
    for d in (small.train, small.val):
        ne, n_pos, n_neg = _check_federated(d)
        n_not_exhaustive += ne
        n = len(d["images"])
        assert all(n_neg[c["id"]] == min(n_pos[c["id"]], n - n_pos[c["id"]]) for c in d["categories"])
        assert any(n_pos[c["id"]] < n - n_pos[c["id"]] for c in d["categories"])
    assert 0.03 * 260 <= n_not_exhaustive <= 0.2 * 260


def test_federated_fields_sibling_mode() -> None:
    cfg = SynthConfig(**{**SMALL.__dict__, "neg_mode": "sibling"})
    dicts = make_lvis_dicts(cfg)
    assert dicts == make_lvis_dicts(cfg)  # deterministic in this mode too
    cats = {c["id"]: c for c in dicts["train"]["categories"]}
    specs = {s.name: s for s in synth.plan_classes(cfg, np.random.default_rng(cfg.seed))}
    look_alike = total = 0
    for d in (dicts["train"], dicts["val"]):
        _check_federated(d)
        present = _present(d)
        for img in d["images"]:
            here = [specs[cats[c]["name"]] for c in present[img["id"]]]
            for c in img["neg_category_ids"]:
                total += 1
                look_alike += any(specs[cats[c]["name"]].confusable_with(h) for h in here)
    # most negatives are absent look-alikes (p = 0.6 each), the rest 0-2 random classes per image
    assert total > 0 and look_alike / total > 0.6
    # the neg mode draws from its own stream: same images and annotations, other negative sets
    random_mode = make_lvis_dicts(SMALL)
    for split in ("train", "val"):
        assert dicts[split]["annotations"] == random_mode[split]["annotations"]
        strip = [[{k: v for k, v in i.items() if k != "neg_category_ids"} for i in d[split]["images"]]
                 for d in (dicts, random_mode)]
        assert strip[0] == strip[1]
        negs = [[i["neg_category_ids"] for i in d[split]["images"]] for d in (dicts, random_mode)]
        assert negs[0] != negs[1]


def test_not_exhaustive_instance_is_drawn_unannotated() -> None:
    specs, layouts = synth._layout(SMALL)
    checked = 0
    for images in layouts.values():
        for img in images:
            hidden = [o for o in img.objects if not o.annotated]
            assert [o.class_index + 1 for o in hidden] == list(img.not_exhaustive_category_ids)
            checked += len(hidden)
    assert checked > 0


def test_heads_commons_and_bridges(small: Generated) -> None:
    specs = synth.plan_classes(SMALL, np.random.default_rng(SMALL.seed))
    cats = {c["name"]: c for c in small.train["categories"]}
    heads = {s.name: s for s in specs if s.variant == "head"}
    assert len(heads) == SMALL.num_classes // 3
    assert len({(h.shape, h.colour) for h in heads.values()}) == len(heads)  # every head its own look
    pairs = set()
    for s in specs:
        cat = cats[s.name]
        assert cat["synset"] == f"{s.shape}_{s.colour}.n.{s.family_rank:02d}"
        if s.variant == "head":
            assert cat["frequency"] == "f" and s.absorbers == ()
        elif s.tier == "c":  # the look of one head plus a pattern
            (h,) = s.absorbers
            assert (heads[h].shape, heads[h].colour) == (s.shape, s.colour) and s.variant in synth.VARIANTS
            assert cat["frequency"] == "c" and cat["image_count"] < cats[h]["image_count"]
        else:  # a bridge: the shape of one head, the colour of another, a look of no head
            shape_head, colour_head = (heads[h] for h in s.absorbers)
            assert s.shape == shape_head.shape and s.colour == colour_head.colour
            assert shape_head.shape != colour_head.shape and shape_head.colour != colour_head.colour
            assert (s.shape, s.colour) not in {(h.shape, h.colour) for h in heads.values()}
            assert cat["frequency"] == "r" and all(h in cat["def"] for h in s.absorbers)
            # two-toned: part of it in the shape head's colour, a class-specific fraction
            assert s.colour2 == shape_head.colour
            assert synth.plan.BRIDGE_FRAC_MIN <= s.colour2_frac <= synth.plan.BRIDGE_FRAC_MAX
            pairs.add(s.absorbers)
        if s.tier != "r":
            assert s.colour2 == "" and s.colour2_frac == 0.0
    rares = [s for s in specs if s.tier == "r"]
    assert len(pairs) == len(rares)  # no two rares leak into the same pair of heads: rows not collinear


def test_bridge_is_two_toned(small: Generated) -> None:
    """A rare bridge's pixels: its colour head's colour over most of the mask, its shape head's colour
    over about `colour2_frac` of it (cut by a straight line); a head's object is one colour."""
    specs, layouts = synth.layout_dataset(SMALL)
    seen = 0
    for img in layouts["train"]:
        rare = [j for j, o in enumerate(img.objects) if specs[o.class_index].tier == "r"]
        if not rare or seen >= 6:
            continue
        j = rare[0]
        spec = specs[img.objects[j].class_index]
        pixels = synth.render_image(SMALL, img, specs).astype(float)
        rles = mask_utils.frPyObjects([list(o.polygon) for o in img.objects], SMALL.size, SMALL.size)
        with warnings.catch_warnings():  # pycocotools' decode trips a numpy 2 DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            masks = mask_utils.decode(rles).astype(bool)  # [H, W, n], drawn in this order
        mask = masks[..., j] & ~masks[..., j + 1:].any(axis=-1)  # the part no later object covers
        if mask.sum() < 0.8 * masks[..., j].sum():
            continue
        inner = mask & np.roll(mask, 2, 0) & np.roll(mask, -2, 0) & np.roll(mask, 2, 1) & np.roll(mask, -2, 1)
        hue = np.array([colorsys.rgb_to_hsv(*(p / 255.0))[0] for p in pixels[inner]])
        h1, h2 = synth.COLOURS[spec.colour][0], synth.COLOURS[spec.colour2][0]
        near = lambda h, c: np.minimum(np.abs(h - c), 1 - np.abs(h - c)) < 0.04  # noqa: E731
        share2 = near(hue, h2).mean()
        assert near(hue, h1).mean() + share2 > 0.9
        assert abs(share2 - spec.colour2_frac) < 0.15
        seen += 1
    assert seen > 0


def test_val_targets_hand_computed() -> None:
    # 400 val images: the full floors; 40: capped at 2.5% / 7.5% of the split
    assert (synth.val_floor("r", 400), synth.val_floor("c", 400), synth.val_floor("f", 400)) == (10, 30, 1)
    assert (synth.val_floor("r", 40), synth.val_floor("c", 40)) == (1, 3)
    assert synth.class_target(7, "r", 1500, "train", 1500) == 7
    assert synth.class_target(7, "r", 1500, "val", 400) == 10  # round(7 * 400 / 1500) = 2 -> floor 10
    assert synth.class_target(90, "c", 1500, "val", 400) == 30  # 24 -> floor 30
    assert synth.class_target(90, "c", 1000, "val", 500) == 45  # 45 > floor 30
    assert synth.class_target(300, "f", 1500, "val", 400) == 40  # heads: half of round(80)


# ----------------------------------------------------------------------------- determinism and reruns


def test_same_seed_gives_identical_bytes(small: Generated, tmp_path: Path) -> None:
    generate(tmp_path, SMALL, progress=False)
    for split in ("train", "val"):
        assert (tmp_path / f"{split}.json").read_bytes() == (small.root / f"{split}.json").read_bytes()
        for png in (small.root / "images" / split).iterdir():
            assert (tmp_path / "images" / split / png.name).read_bytes() == png.read_bytes(), png.name


def test_other_seed_gives_other_dataset() -> None:
    a = make_lvis_dicts(TINY)
    b = make_lvis_dicts(SynthConfig(**{**TINY.__dict__, "seed": TINY.seed + 1}))
    assert a["train"]["annotations"] != b["train"]["annotations"]


def test_rerun_reuses_images_and_config_change_replaces_them(tmp_path: Path) -> None:
    first = generate(tmp_path, TINY, progress=False)
    assert first.images_written == 170
    again = generate(tmp_path, TINY, progress=False)
    assert (again.images_written, again.images_reused) == (0, 170)
    other = SynthConfig(**{**TINY.__dict__, "seed": 9, "val_images": 10})
    changed = generate(tmp_path, other, progress=False)
    assert (changed.images_written, changed.images_reused) == (160, 0)
    assert len(list((tmp_path / "images" / "val").iterdir())) == 10  # stale images removed
    fresh = tmp_path / "fresh"
    generate(fresh, other, progress=False)
    for png in sorted((fresh / "images" / "train").iterdir())[:20]:
        assert (tmp_path / "images" / "train" / png.name).read_bytes() == png.read_bytes()


def test_interrupted_run_leaves_no_json_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_render = synth._render
    calls = {"n": 0}

    def failing_render(*args: Any, **kwargs: Any) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synth, "_render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, TINY, progress=False)
    assert not (tmp_path / "train.json").exists() and not (tmp_path / "val.json").exists()
    leftovers = [p for p in (tmp_path / "images" / "train").iterdir() if not p.name.endswith(".png")]
    assert leftovers == []
    monkeypatch.setattr(synth, "_render", real_render)
    resumed = generate(tmp_path, TINY, progress=False)
    assert (resumed.images_reused, resumed.images_written) == (7, 163)


# ----------------------------------------------------------------------------- default config


def test_default_config_long_tail(tmp_path: Path) -> None:
    summary = generate(tmp_path, SynthConfig(), progress=False, write_images=False)
    assert summary.images_written == 0 and not (tmp_path / "images").exists()
    train = json.loads((tmp_path / "train.json").read_text())
    val = json.loads((tmp_path / "val.json").read_text())
    assert summary.num_images == {"train": 1500, "val": 400}
    assert dict(summary.bucket_counts) == {"r": 16, "c": 16, "f": 16}
    images = _images_per_category(train)
    for c in train["categories"]:  # planned tiers land in their LVIS buckets, rares in 4-10 images
        lo, hi = {"r": (4, 10), "c": (11, 100), "f": (101, 10**6)}[c["frequency"]]
        assert lo <= images[c["id"]] <= hi, c["name"]
    # val minimums: >= 10 instances per rare class, >= 30 per common (issue 11)
    instances = Counter(a["category_id"] for a in val["annotations"])
    for c in train["categories"]:
        need = {"r": 10, "c": 30, "f": 1}[c["frequency"]]
        assert instances[c["id"]] >= need, (c["name"], instances[c["id"]])
    lvis = pytest.importorskip("lvis")
    lvis.LVIS(str(tmp_path / "val.json"))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"num_classes": 0}, "--classes"),
        ({"num_classes": 5}, "--classes"),
        ({"num_classes": 10_000}, "--classes"),
        ({"train_images": -1}, "--train-images"),
        ({"train_images": 120}, "--train-images"),
        ({"num_classes": 48, "train_images": 300}, "--train-images"),
        ({"val_images": 0}, "--val-images"),
        ({"val_images": 3}, "--val-images"),
        ({"size": 0}, "--size"),
        ({"size": 20}, "--size"),
        ({"seed": -3}, "--seed"),
        ({"size": 64.0}, "--size"),
        ({"neg_mode": "siblings"}, "--neg-mode"),
        ({"val_images": 400, "num_classes": 48, "train_images": 1500, "size": 128, "seed": 0,
          "neg_mode": None}, "--neg-mode"),
    ],
)
def test_bad_config_names_the_option(kwargs: dict[str, Any], option: str) -> None:
    with pytest.raises(PcbkitError, match=option) as info:
        SynthConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_out_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(PcbkitError, match="--out"):
        generate(target, TINY, progress=False, write_images=False)


# ----------------------------------------------------------------------------- CLI


def test_cli_generates_and_summarises(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    args = ["--out", str(out), "--seed", "5", "--classes", "6", "--train-images", "150"]
    result = CliRunner().invoke(synth_cmd, [*args, "--val-images", "20", "--size", "48"])
    assert result.exit_code == 0, result.output
    assert (out / "train.json").is_file() and (out / "val.json").is_file()
    assert (out / "train.json").read_bytes() == json.dumps(
        make_lvis_dicts(TINY)["train"], separators=(",", ":")
    ).encode() + b"\n"
    assert "r 2 / c 2 / f 2" in result.output
    assert str(out / "train.json") in result.output
    args += ["--val-images", "20", "--size", "48", "--neg-mode", "sibling"]
    result = CliRunner().invoke(synth_cmd, args)
    assert result.exit_code == 0, result.output
    sibling = SynthConfig(**{**TINY.__dict__, "neg_mode": "sibling"})
    assert json.loads((out / "val.json").read_text()) == make_lvis_dicts(sibling)["val"]


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(synth_cmd, ["--out", str(tmp_path), "--classes", "3"])
    assert isinstance(result.exception, PcbkitError) and "--classes" in str(result.exception)
    cli = pytest.importorskip("pcbkit.cli")
    with pytest.raises(SystemExit) as info:
        cli.main(["synth", "--out", str(tmp_path), "--classes", "3"])
    assert info.value.code == 2


def test_cli_defaults_match_config() -> None:
    defaults = {p.name: p.default for p in synth_cmd.params}
    option_of = {"num_classes": "classes", "neg_mode": "neg_mode"}
    for f in fields(SynthConfig):
        assert defaults[option_of.get(f.name, f.name)] == f.default, f.name


def test_cli_module_imports_only_click() -> None:
    code = (
        "import sys, pcbkit.cmd_synth; "
        "heavy = [m for m in ('numpy', 'torch', 'PIL', 'pycocotools', 'pcb_analysis.synth') "
        "if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
