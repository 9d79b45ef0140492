"""Tests of pcb_train.config: strict YAML keys, typed dotted overrides, arch defaults, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcb_analysis.errors import PcbkitError
from pcb_train.config import (
    ARCH_DEFAULTS,
    STRUCTURAL_FIELDS,
    DataConfig,
    ModelConfig,
    SolverConfig,
    TrainConfig,
    load_config,
    model_config_from_dict,
    save_config,
)

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_follow_the_paper_recipe() -> None:
    cfg = load_config(None)
    m, s = cfg.model, cfg.solver
    assert (m.arch, m.num_classes, m.box_head_dim, m.fpn_channels) == ("r50_fpn", 1203, 1024, 256)
    assert (m.score_thresh, m.nms_thresh, m.detections_per_image) == (1e-4, 0.5, 300)
    assert (m.roi_batch_size_per_image, m.roi_positive_fraction, m.rpn_post_nms_top_n_test) == (
        512,
        0.25,
        1000,
    )
    assert (m.pcb_alpha, m.pcb_momentum, m.pcb_start, m.pcb_start_unit) == (0.4, 0.99, 17.0, "epoch")
    assert m.step_weights == (0.2, 0.2, 0.6) and m.n_iter == 3
    assert (s.base_lr, s.momentum, s.weight_decay, s.warmup_iters, s.epochs, s.lr_steps) == (
        0.02,
        0.9,
        1e-4,
        500,
        24.0,
        (16.0, 22.0),
    )
    assert cfg.data.rfs_threshold == 1e-3 and cfg.data.flip_prob == 0.5
    # linear scaling rule: 0.02 for 16 images -> 0.01 for 8
    assert SolverConfig(ims_per_batch=8).lr == pytest.approx(0.01)


def test_unknown_key_names_file_dotted_key_and_suggestion(tmp_path: Path) -> None:
    p = _write(tmp_path, "bad.yaml", "model:\n  arch: tiny\n  fpn_chanels: 32\n")
    with pytest.raises(PcbkitError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p) in msg and "model.fpn_chanels" in msg and "did you mean model.fpn_channels" in msg


def test_unknown_top_level_section(tmp_path: Path) -> None:
    p = _write(tmp_path, "bad.yaml", "modle:\n  arch: tiny\n")
    with pytest.raises(PcbkitError, match=r"unknown key 'modle' \(did you mean model\?\)"):
        load_config(p)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("model:\n  num_classes: twelve\n", "model.num_classes': expected int"),
        ("model:\n  mask_head: 1\n", "model.mask_head': expected bool"),
        ("model:\n  arch: r101\n", "model.arch': expected 'tiny' | 'r50_fpn'"),
        ("solver:\n  lr_steps: 3\n", "solver.lr_steps': expected list of float"),
        ("model:\n  num_classes: 0\n", "model.num_classes: must be >= 1"),
        ("model: [1, 2]\n", "model: expected a mapping"),
        ("- a\n- b\n", "top level must be a mapping"),
    ],
)
def test_bad_values_are_refused_with_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    p = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(PcbkitError) as err:
        load_config(p)
    assert fragment in str(err.value) and str(p) in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(PcbkitError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    p = _write(tmp_path, "broken.yaml", "model:\n  arch: [tiny\n")
    with pytest.raises(PcbkitError, match="not valid YAML at line"):
        load_config(p)


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path: Path) -> None:
    # PyYAML reads "1e-4" as a string; float fields must accept it
    p = _write(tmp_path, "c.yaml", "model:\n  score_thresh: 1e-3\nsolver:\n  weight_decay: 5e-5\n")
    cfg = load_config(p)
    assert cfg.model.score_thresh == 1e-3 and cfg.solver.weight_decay == 5e-5


def test_overrides_are_typed_and_strict() -> None:
    cfg = load_config(
        None,
        [
            "model.arch=tiny",
            "model.num_classes=12",
            "model.weights=null",
            "solver.lr_steps=[3000, 4000]",
            "solver.max_iter=5000",
            "model.score_thresh=1e-3",
            "data.sampler=rfs",
            "model.iterative_head=true",
            "name=x",
        ],
    )
    assert cfg.model.num_classes == 12 and isinstance(cfg.model.num_classes, int)
    assert cfg.solver.lr_steps == (3000.0, 4000.0) and cfg.solver.max_iter == 5000
    assert cfg.model.score_thresh == 1e-3 and cfg.data.sampler == "rfs" and cfg.model.iterative_head
    assert cfg.name == "x"
    with pytest.raises(
        PcbkitError, match=r"unknown key 'model.num_clases' \(did you mean model.num_classes\?\)"
    ):
        load_config(None, ["model.num_clases=3"])
    with pytest.raises(PcbkitError, match="unknown key 'solvr'"):
        load_config(None, ["solvr.base_lr=0.1"])
    with pytest.raises(PcbkitError, match="expected key=value"):
        load_config(None, ["model.num_classes"])
    with pytest.raises(PcbkitError, match="is a section"):
        load_config(None, ["model=3"])
    with pytest.raises(PcbkitError, match="is not a section"):
        load_config(None, ["name.x=3"])
    with pytest.raises(PcbkitError, match="model.num_classes': expected int"):
        load_config(None, ["model.num_classes=1.5"])


def test_arch_defaults_are_resolved_after_overrides(tmp_path: Path) -> None:
    # the file says r50_fpn; switching the arch on the command line must pick up the tiny defaults
    p = _write(tmp_path, "c.yaml", "model:\n  arch: r50_fpn\n  num_classes: 5\n")
    cfg = load_config(p, ["model.arch=tiny"])
    for key, value in ARCH_DEFAULTS["tiny"].items():
        assert getattr(cfg.model, key) == value, key
    # an explicit value wins over the arch default
    cfg = load_config(p, ["model.arch=tiny", "model.fpn_channels=32"])
    assert cfg.model.fpn_channels == 32


def test_base_inheritance(tmp_path: Path) -> None:
    _write(tmp_path, "base.yaml", "model:\n  arch: tiny\n  num_classes: 7\nsolver:\n  base_lr: 0.1\n")
    child = _write(tmp_path, "child.yaml", "base: base.yaml\nmodel:\n  num_classes: 9\n")
    cfg = load_config(child)
    assert (cfg.model.arch, cfg.model.num_classes, cfg.solver.base_lr) == ("tiny", 9, 0.1)
    loop = _write(tmp_path, "loop.yaml", "base: loop.yaml\n")
    with pytest.raises(PcbkitError, match="deeper than"):
        load_config(loop)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.arch=tiny", "model.num_classes=12", "data.train_min_sizes=[96, 128]"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert "lr_steps: [16.0, 22.0]" in out.read_text()


def test_configs_are_frozen() -> None:
    cfg = TrainConfig()
    with pytest.raises(AttributeError):
        cfg.name = "y"  # type: ignore[misc]


def test_iterative_step_weights_must_match_n_iter() -> None:
    with pytest.raises(PcbkitError, match="model.step_weights: 2 weights for n_iter=3"):
        ModelConfig(iterative_head=True, step_weights=(0.5, 0.5))
    ModelConfig(iterative_head=False, step_weights=(0.5, 0.5))  # unused without the head


def test_structural_differences() -> None:
    a = ModelConfig(arch="tiny", num_classes=12)
    assert a.structural_differences(a) == []
    b = ModelConfig(arch="tiny", num_classes=12, score_thresh=0.05, rpn_post_nms_top_n_test=10)
    assert a.structural_differences(b) == []  # test-time settings may differ
    c = ModelConfig(arch="tiny", num_classes=12, iterative_head=True)
    assert a.structural_differences(c) == ["iterative_head: True != False"]
    assert "num_classes" in STRUCTURAL_FIELDS


def test_model_config_from_checkpoint_dict_is_strict() -> None:
    with pytest.raises(PcbkitError, match=r"ckpt: unknown key 'model.bogus'"):
        model_config_from_dict({"bogus": 1}, source="ckpt")
    assert model_config_from_dict({"arch": "tiny", "num_classes": 3}, source="x").fpn_channels == 64


@pytest.mark.parametrize("name", ["synth_tiny.yaml", "lvis_v1_r50_fpn.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(REPO / "configs" / name)
    assert cfg.model.backend == "torchvision"
    if name.startswith("lvis"):
        assert cfg.model.num_classes == 1203 and cfg.model.arch == "r50_fpn"
        assert cfg.data.train_min_sizes == tuple(range(640, 801, 32))
    else:
        assert cfg.model.arch == "tiny" and isinstance(cfg.data, DataConfig)
