"""Model, data and solver configuration: frozen dataclasses, strict YAML loading, `key=value` overrides.

A run's configuration is one `TrainConfig` composed of

    model:   ModelConfig   what to build (backend, architecture, heads, PCB switches, test-time rules)
    data:    DataConfig    which annotation files / image roots, augmentation, sampler
    solver:  SolverConfig  SGD, schedule, warm-up, AMP, clipping

plus a few run-level fields (name, seed, device, periods). Commands that only need a model
(`dump-logits`, `calibrate`) read the same files and use `.model`.

YAML files map onto these dataclasses with STRICT keys: an unknown key raises `PcbkitError` naming
the file and the dotted key (`model.fpn_chanels`) with the closest valid key as a suggestion.
Values are checked against the field types (int, float, bool, str, Literal choices, tuples,
optional values). A file may start from another one with `base: other.yaml` (path relative to the
file); its sections are merged key by key, the file's own values winning.

Overrides from the command line are dotted `key=value` strings (`model.num_classes=12`,
`solver.lr_steps=[3000,4000]`, `model.weights=null`); the value is parsed as YAML and typed by the
field it lands on, with the same strict-key errors.

Fields of `ModelConfig` whose default depends on the architecture (`min_size`, `fpn_channels`,
`box_head_dim`, ...) default to None and are filled from `ARCH_DEFAULTS` by `resolved()`;
`load_config` always returns resolved configs, so a saved config spells every value out.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pcb_analysis.atomic import write_text_atomic
from pcb_analysis.errors import PcbkitError

BASE_KEY = "base"
MAX_BASE_DEPTH = 8

# Architecture-dependent defaults of ModelConfig (fields left None are filled from here).
# r50_fpn: the paper's Mask R-CNN R50-FPN (docs/method.md §5; RPN top-N as in MMDetection's recipe the
# official code uses: 2000 pre-NMS per level / 1000 post-NMS per image in training, 1000 / 1000 at
# test). tiny: a small network for the synthetic 128 px dataset on CPU.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "r50_fpn": {
        "min_size": 800,
        "max_size": 1333,
        "fpn_channels": 256,
        "anchor_sizes": (32, 64, 128, 256, 512),
        "rpn_pre_nms_top_n_train": 2000,
        "rpn_post_nms_top_n_train": 1000,
        "rpn_pre_nms_top_n_test": 1000,
        "rpn_post_nms_top_n_test": 1000,
        "roi_batch_size_per_image": 512,
        "box_head_dim": 1024,
        "mask_head_channels": 256,
        "mask_head_layers": 4,
        "mask_roi_size": 14,
    },
    "tiny": {
        "min_size": 128,
        "max_size": 213,
        "fpn_channels": 64,
        "anchor_sizes": (16, 32, 64),
        "rpn_pre_nms_top_n_train": 300,
        "rpn_post_nms_top_n_train": 150,
        "rpn_pre_nms_top_n_test": 300,
        "rpn_post_nms_top_n_test": 100,
        "roi_batch_size_per_image": 64,
        "box_head_dim": 256,
        "mask_head_channels": 32,
        "mask_head_layers": 2,
        "mask_roi_size": 7,
    },
}

# Fields that change the network's parameters: a checkpoint must agree on these with the config
# that loads it. The others (test-time rules, sampling, loss weights, input size) may differ.
STRUCTURAL_FIELDS: tuple[str, ...] = (
    "backend",
    "arch",
    "num_classes",
    "fpn_channels",
    "anchor_sizes",
    "box_head_dim",
    "mask_head",
    "mask_head_channels",
    "mask_head_layers",
    "mask_roi_size",
    "iterative_head",
    "n_iter",
)


def _check(cond: bool, what: str, problem: str) -> None:
    if not cond:
        raise PcbkitError(f"{what}: {problem}")


@dataclass(frozen=True)
class ModelConfig:
    """What detector to build. Logits downstream are [R, K+1] with background last (K = num_classes)."""

    backend: Literal["torchvision", "detectron2"] = "torchvision"
    arch: Literal["tiny", "r50_fpn"] = "r50_fpn"
    num_classes: int = 1203
    # Optional local weights: a torchvision ResNet-50 state dict (ImageNet backbone) or a full Mask
    # R-CNN state dict; nothing is ever downloaded. None: random initialisation.
    weights: str | None = None
    trainable_backbone_layers: int = 3  # with `weights` only (random init trains every layer)
    # input: test-time short side / long-side cap (training sizes: DataConfig.train_min_sizes)
    min_size: int | None = None
    max_size: int | None = None
    # backbone / RPN
    fpn_channels: int | None = None
    anchor_sizes: tuple[int, ...] | None = None  # one anchor size per FPN level, aspect ratios 0.5/1/2
    rpn_pre_nms_top_n_train: int | None = None
    rpn_post_nms_top_n_train: int | None = None
    rpn_pre_nms_top_n_test: int | None = None
    rpn_post_nms_top_n_test: int | None = None
    rpn_nms_thresh: float = 0.7
    # R-CNN sampling (training)
    roi_batch_size_per_image: int | None = None
    roi_positive_fraction: float = 0.25
    roi_iou_thresh: float = 0.5  # foreground at IoU >= this, background below (training and dumps)
    # heads
    box_head_dim: int | None = None
    mask_head: bool = True
    mask_head_channels: int | None = None
    mask_head_layers: int | None = None
    mask_roi_size: int | None = None  # RoIAlign grid of the mask head; masks are predicted at 2x this
    # test-time post-processing (docs/method.md §3)
    score_thresh: float = 1e-4
    nms_thresh: float = 0.5
    detections_per_image: int = 300
    # PCB iterative head (docs/method.md §4.4)
    iterative_head: bool = False
    n_iter: int = 3
    step_weights: tuple[float, ...] = (0.2, 0.2, 0.6)
    modulation_init: Literal["default", "identity"] = "default"  # see IterativeRoIHead
    # PCB loss (docs/method.md §4.1-4.3); the training loop plugs it into the RoI head
    pcb_loss: bool = False
    pcb_alpha: float = 0.4
    pcb_momentum: float = 0.99
    pcb_start: float = 17.0
    pcb_start_unit: Literal["epoch", "fraction", "iteration"] = "epoch"

    def __post_init__(self) -> None:
        w = "model"
        _check(self.num_classes >= 1, f"{w}.num_classes", f"must be >= 1 (got {self.num_classes})")
        _check(0 <= self.trainable_backbone_layers <= 5, f"{w}.trainable_backbone_layers", "must be in 0..5")
        for name in (
            "min_size",
            "max_size",
            "fpn_channels",
            "rpn_pre_nms_top_n_train",
            "rpn_post_nms_top_n_train",
            "rpn_pre_nms_top_n_test",
            "rpn_post_nms_top_n_test",
            "roi_batch_size_per_image",
            "box_head_dim",
            "mask_head_channels",
            "mask_head_layers",
            "mask_roi_size",
        ):
            v = getattr(self, name)
            _check(v is None or v >= 1, f"{w}.{name}", f"must be >= 1 (got {v})")
        if self.anchor_sizes is not None:
            _check(
                len(self.anchor_sizes) >= 1 and all(a > 0 for a in self.anchor_sizes),
                f"{w}.anchor_sizes",
                f"must be a non-empty list of positive sizes (got {list(self.anchor_sizes)})",
            )
        for name in (
            "rpn_nms_thresh",
            "roi_positive_fraction",
            "roi_iou_thresh",
            "nms_thresh",
            "pcb_momentum",
        ):
            v = getattr(self, name)
            _check(0.0 < v <= 1.0, f"{w}.{name}", f"must be in (0, 1] (got {v})")
        _check(
            0.0 <= self.score_thresh < 1.0,
            f"{w}.score_thresh",
            f"must be in [0, 1) (got {self.score_thresh})",
        )
        _check(self.detections_per_image >= 1, f"{w}.detections_per_image", "must be >= 1")
        _check(self.n_iter >= 1, f"{w}.n_iter", f"must be >= 1 (got {self.n_iter})")
        if self.iterative_head:
            _check(
                len(self.step_weights) == self.n_iter,
                f"{w}.step_weights",
                f"{len(self.step_weights)} weights for n_iter={self.n_iter}",
            )
        _check(self.pcb_alpha >= 0.0, f"{w}.pcb_alpha", f"must be >= 0 (got {self.pcb_alpha})")
        _check(self.pcb_start >= 0.0, f"{w}.pcb_start", f"must be >= 0 (got {self.pcb_start})")
        if self.pcb_start_unit == "fraction":
            _check(self.pcb_start <= 1.0, f"{w}.pcb_start", "a fraction of training must be in [0, 1]")

    def resolved(self) -> ModelConfig:
        """A copy with every architecture-dependent field that is None filled from ARCH_DEFAULTS."""
        defaults = ARCH_DEFAULTS[self.arch]
        fill = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **fill) if fill else self

    def structural_differences(self, other: ModelConfig) -> list[str]:
        """`field: mine != theirs` for each STRUCTURAL_FIELDS entry that differs (both resolved)."""
        a, b = self.resolved(), other.resolved()
        out = []
        for name in STRUCTURAL_FIELDS:
            va, vb = getattr(a, name), getattr(b, name)
            if va != vb:
                out.append(f"{name}: {vb!r} != {va!r}")
        return out


@dataclass(frozen=True)
class DataConfig:
    """Datasets (LVIS-format annotation files and image roots), augmentation and sampler.

    Paths are used as given (relative paths resolve against the working directory).
    """

    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    # multi-scale training: the short side is drawn from these per image (None: model.min_size)
    train_min_sizes: tuple[int, ...] | None = None
    flip_prob: float = 0.5
    sampler: Literal["random", "rfs"] = "random"
    rfs_threshold: float = 1e-3
    rfs_rounding: Literal["stochastic", "ceil"] = "stochastic"
    filter_empty: bool = True  # drop training images without annotations
    num_workers: int = 2
    max_val_images: int | None = None

    def __post_init__(self) -> None:
        _check(0.0 <= self.flip_prob <= 1.0, "data.flip_prob", f"must be in [0, 1] (got {self.flip_prob})")
        _check(self.rfs_threshold > 0.0, "data.rfs_threshold", "must be > 0")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        if self.train_min_sizes is not None:
            _check(
                len(self.train_min_sizes) >= 1 and all(s > 0 for s in self.train_min_sizes),
                "data.train_min_sizes",
                "must be a non-empty list of positive sizes",
            )
        _check(self.max_val_images is None or self.max_val_images >= 1, "data.max_val_images", "must be >= 1")


@dataclass(frozen=True)
class SolverConfig:
    """SGD with linear warm-up and step decay (docs/method.md §5).

    The learning rate is `base_lr * ims_per_batch / lr_reference_batch` (linear scaling rule).
    The schedule runs `epochs` epochs, or `max_iter` iterations when that is set; `lr_steps` are in
    the same unit (epochs, or iterations with `max_iter`), each multiplying the rate by `gamma`.
    """

    ims_per_batch: int = 16
    base_lr: float = 0.02
    lr_reference_batch: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    epochs: float = 24.0
    max_iter: int | None = None
    lr_steps: tuple[float, ...] = (16.0, 22.0)
    gamma: float = 0.1
    clip_grad_norm: float | None = None
    amp: Literal["none", "bf16", "fp16"] = "none"

    def __post_init__(self) -> None:
        _check(self.ims_per_batch >= 1, "solver.ims_per_batch", "must be >= 1")
        _check(self.base_lr > 0.0, "solver.base_lr", "must be > 0")
        _check(self.lr_reference_batch >= 1, "solver.lr_reference_batch", "must be >= 1")
        _check(self.warmup_iters >= 0, "solver.warmup_iters", "must be >= 0")
        _check(0.0 < self.warmup_factor <= 1.0, "solver.warmup_factor", "must be in (0, 1]")
        _check(self.epochs > 0.0, "solver.epochs", "must be > 0")
        _check(self.max_iter is None or self.max_iter >= 1, "solver.max_iter", "must be >= 1")
        _check(list(self.lr_steps) == sorted(self.lr_steps), "solver.lr_steps", "must be increasing")
        _check(0.0 < self.gamma <= 1.0, "solver.gamma", "must be in (0, 1]")
        _check(
            self.clip_grad_norm is None or self.clip_grad_norm > 0.0, "solver.clip_grad_norm", "must be > 0"
        )

    @property
    def lr(self) -> float:
        """The peak learning rate after linear scaling."""
        return self.base_lr * self.ims_per_batch / self.lr_reference_batch


@dataclass(frozen=True)
class TrainConfig:
    """One run: model + data + solver and run-level settings. Saved next to outputs as config.yaml."""

    name: str = "run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_period: int = 20
    checkpoint_period: int = 5000
    eval_period: int = 0  # 0: evaluate at the end only
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)

    def __post_init__(self) -> None:
        _check(self.log_period >= 1, "log_period", "must be >= 1")
        _check(self.checkpoint_period >= 1, "checkpoint_period", "must be >= 1")
        _check(self.eval_period >= 0, "eval_period", "must be >= 0")

    def resolved(self) -> TrainConfig:
        return dataclasses.replace(self, model=self.model.resolved())


# --------------------------------------------------------------------------------------------
# generic dict <-> dataclass conversion with strict keys and type checks


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(key: str, choices: Sequence[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if len(args) == 2 and args[1] is Ellipsis else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """Return `value` as type `tp` or raise _Mismatch. Strings are parsed for numbers (YAML reads
    `1e-4` as a string)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(args) != len(value):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise _Mismatch from None
                if f.is_integer():
                    return int(f)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise _Mismatch


def from_dict(cls: type, data: Any, *, source: str | Path, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping with strict keys; errors name `source` and the dotted key."""
    where = prefix.rstrip(".") or "top level"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise PcbkitError(f"{source}: {where}: expected a mapping of keys, got {type(data).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in names:
            raise PcbkitError(f"{source}: unknown key '{prefix}{key}'{_suggest(str(key), names, prefix)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, source=source, prefix=f"{prefix}{key}.")
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except _Mismatch:
            raise PcbkitError(
                f"{source}: key '{prefix}{key}': expected {_type_name(tp)}, got {value!r}"
            ) from None
    try:
        return cls(**kwargs)
    except PcbkitError as err:  # __post_init__ messages start with the dotted key
        raise PcbkitError(f"{source}: {err}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain nested dict (tuples become lists), YAML/JSON friendly."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, depth: int = 0) -> dict[str, Any]:
    if depth > MAX_BASE_DEPTH:
        raise PcbkitError(f"{path}: '{BASE_KEY}' chain deeper than {MAX_BASE_DEPTH} files (a cycle?)")
    if not path.is_file():
        raise PcbkitError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise PcbkitError(f"{path}: not valid YAML{at}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PcbkitError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise PcbkitError(f"{path}: key '{BASE_KEY}' must be a file path")
    return _deep_merge(_read_yaml((path.parent / base).resolve(), depth + 1), data)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise PcbkitError(f"override '{text}': expected key=value (e.g. model.num_classes=12)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise PcbkitError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_dotted(cls: type, tree: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    """Set tree[parts] = value after checking each part names a field (strict keys)."""
    node, node_cls, done = tree, cls, ""
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node_cls)]
        if part not in names:
            raise PcbkitError(f"override '{text}': unknown key '{done}{part}'{_suggest(part, names, done)}")
        tp = _hints(node_cls)[part]
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(tp):
            if last:
                raise PcbkitError(f"override '{text}': '{done}{part}' is a section; set one of its keys")
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node, node_cls, done = child, tp, f"{done}{part}."
        else:
            if not last:
                raise PcbkitError(f"override '{text}': '{done}{part}' is not a section")
            node[part] = value


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Apply dotted `key=value` overrides (typed by the target field) and re-validate.

    Architecture defaults are not re-resolved here: `load_config` applies overrides before it
    resolves, so `model.arch=tiny` on an r50 file picks up the tiny defaults.
    """
    if not overrides:
        return cfg
    tree = to_dict(cfg)
    for text in overrides:
        parts, value = _parse_override(text)
        _set_dotted(TrainConfig, tree, parts, value, text)
    return from_dict(TrainConfig, tree, source="command-line overrides")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, resolve arch defaults."""
    if path is None:
        cfg = TrainConfig()
    else:
        p = Path(path)
        cfg = from_dict(TrainConfig, _read_yaml(p), source=p)
    return apply_overrides(cfg, overrides).resolved()


def model_config_from_dict(data: Mapping[str, Any], source: str | Path) -> ModelConfig:
    """A ModelConfig from a plain dict (e.g. the one stored in a checkpoint), strict keys, resolved."""
    return from_dict(ModelConfig, dict(data), source=source, prefix="model.").resolved()


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for lists (`lr_steps: [16.0, 22.0]`)."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def config_to_yaml(cfg: Any) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML, atomically (loadable again by `load_config`)."""
    write_text_atomic(path, config_to_yaml(cfg))
