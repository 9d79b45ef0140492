"""A tiny detectron2 backbone for CPU work (the detectron2 backend's "tiny" architecture).

    [B, 3, H, W] -> stem (stride 2) -> res2 (4) -> res3 (8) -> res4 (16) -> res5 (32)

each stage two 3x3 convolutions (the first strided) with BatchNorm (`cfg.MODEL.RESNETS.NORM`) and
ReLU, the first `cfg.MODEL.BACKBONE.FREEZE_AT` stages frozen, widths `TINY_WIDTHS` (the
torchvision backend's tiny network has the same stages), then
detectron2's own FPN on `cfg.MODEL.FPN.IN_FEATURES` (res3-res5 -> p3-p5, `FPN.OUT_CHANNELS`
wide, no extra level). About 0.6 M parameters: a training step on two 64 px images takes a small
fraction of a second on a CPU, where ResNet-18 takes seconds.

Importing this module imports detectron2 and registers `build_pcbkit_tiny_fpn_backbone` in
detectron2's BACKBONE_REGISTRY (set `cfg.MODEL.BACKBONE.NAME` to it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from detectron2.config import CfgNode
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from torch import Tensor, nn

from pcb_analysis.errors import ApiMisuseError

NAME = "build_pcbkit_tiny_fpn_backbone"
TINY_WIDTHS = (16, 24, 48, 96, 128)  # stem, res2, res3, res4, res5
STAGES = ("stem", "res2", "res3", "res4", "res5")


def _conv(cin: int, cout: int, stride: int, norm: str) -> Conv2d:
    conv = Conv2d(
        cin, cout, 3, stride=stride, padding=1, bias=not norm, norm=get_norm(norm, cout), activation=nn.ReLU()
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class TinyConvNet(Backbone):
    """Strided 3x3 conv stages: outputs {name: [B, C, H/s, W/s]} for `out_features` of res2..res5."""

    def __init__(
        self,
        out_features: Sequence[str] = ("res3", "res4", "res5"),
        widths: Sequence[int] = TINY_WIDTHS,
        norm: str = "BN",
    ) -> None:
        super().__init__()
        unknown = sorted(set(out_features) - set(STAGES[1:]))
        if unknown:
            raise ApiMisuseError(
                f"TinyConvNet: unknown out_features {unknown}; choose from {list(STAGES[1:])}"
            )
        if len(widths) != len(STAGES):
            raise ApiMisuseError(f"TinyConvNet: {len(widths)} widths for {len(STAGES)} stages")
        self.stem = _conv(3, widths[0], 2, norm)
        self.stage_names = list(STAGES[1:])
        self._out_features = list(out_features)
        self._out_feature_strides: dict[str, int] = {}
        self._out_feature_channels: dict[str, int] = {}
        for i, name in enumerate(self.stage_names, start=1):
            block = nn.Sequential(
                _conv(widths[i - 1], widths[i], 2, norm), _conv(widths[i], widths[i], 1, norm)
            )
            self.add_module(name, block)
            self._out_feature_strides[name] = 2 ** (i + 1)
            self._out_feature_channels[name] = widths[i]
        last = max(self.stage_names.index(n) for n in self._out_features)
        self.stage_names = self.stage_names[: last + 1]  # no stage past the last output

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                out[name] = x
        return out


def build_pcbkit_tiny_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Any:
    """detectron2 backbone builder: `TinyConvNet` + FPN (see the module docstring)."""
    if input_shape.channels != 3:
        raise ApiMisuseError(f"{NAME}: expects 3 input channels, got {input_shape.channels}")
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    bottom_up = TinyConvNet(in_features, norm=cfg.MODEL.RESNETS.NORM)
    # MODEL.BACKBONE.FREEZE_AT as for detectron2's ResNet: 1 freezes the stem, 2 also res2, ...
    for name in STAGES[: int(cfg.MODEL.BACKBONE.FREEZE_AT)]:
        if hasattr(bottom_up, name):
            for param in getattr(bottom_up, name).parameters():
                param.requires_grad_(False)
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=None,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


if NAME not in BACKBONE_REGISTRY:
    BACKBONE_REGISTRY.register(build_pcbkit_tiny_fpn_backbone)
