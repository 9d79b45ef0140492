"""The configuration schema of a run: frozen dataclasses, each field typed and range-checked.

    TrainConfig = run-level fields (name, seed, device, periods)
                + model: ModelConfig   (backend, architecture, heads, PCB switches, test-time rules)
                + data: DataConfig     (annotation files / image roots, augmentation, sampler)
                + solver: SolverConfig (SGD, schedule, warm-up, AMP, clipping)
A bad value raises `PcbkitError` naming the dotted key (`solver.gamma: must be in (0, 1]`).
Architecture-dependent model fields default to None and are filled from ARCH_DEFAULTS by
`resolved()`. Logits downstream are [R, K+1], background last (K = model.num_classes).
Reading / writing YAML: `pcb_train.config_io`; both are re-exported by `pcb_train.config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pcb_analysis.errors import PcbkitError

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
    "cls_loss",
    "normalized_classifier",
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
    # classification-loss family of the R-CNN head (docs/losses.md): softmax cross-entropy, Seesaw
    # (K+2 outputs: classes + foreground/background) or EQLv2 (K+1 sigmoid outputs); each works with
    # and without `pcb_loss`. `normalized_classifier`: cosine classifier (and mask predictor) with
    # temperature 20, as the official Seesaw configs.
    cls_loss: Literal["ce", "seesaw", "eqlv2"] = "ce"
    normalized_classifier: bool = False
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
