"""The "tiny" architecture's backbone: a strided conv network + 3-level FPN for CPU work.

[B, 3, H, W] -> {"0", "1", "2"} feature maps at strides 8, 16, 32, each `out_channels` wide.
With 64 FPN channels, anchors 16/32/64, 7 x 7 RoIs (one RoIAlign sample per bin) and small heads
(see `model.build_model`), a training step of 8 synthetic 128 px images takes about 0.1-0.13 s on two
CPU cores.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.misc import Conv2dNormActivation

TINY_WIDTHS = (16, 24, 48, 96, 128)  # stem (stride 2) and four stages (strides 4, 8, 16, 32)
TINY_CANONICAL_SCALE = 56  # RoI -> FPN level mapping: a 56 px box goes to level 4 (stride 16)
# RoIAlign samples per bin side for tiny (torchvision's CPU RoIAlign backward dominates a tiny step)
TINY_SAMPLING_RATIO = 1


class TinyBackbone(nn.Module):
    """Strided 3x3 conv stages + FPN: [B, 3, H, W] -> {"0", "1", "2"} at strides 8, 16, 32.

    Stages: stem (stride 2) and four blocks of two 3x3 convs (strides 4, 8, 16, 32; widths
    `widths`), BatchNorm + ReLU. The FPN reads the last three blocks; every output level has
    `out_channels` channels (the attribute torchvision's heads read). No stride-4 level: at
    64 channels its FPN and RPN convolutions would cost more than the rest of the network.
    """

    def __init__(self, out_channels: int = 64, widths: Sequence[int] = TINY_WIDTHS) -> None:
        super().__init__()
        w0, w1, w2, w3, w4 = widths

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                Conv2dNormActivation(cin, cout, 3, stride=2, norm_layer=nn.BatchNorm2d),
                Conv2dNormActivation(cout, cout, 3, stride=1, norm_layer=nn.BatchNorm2d),
            )

        self.stem = Conv2dNormActivation(3, w0, 3, stride=2, norm_layer=nn.BatchNorm2d)
        self.layer1 = block(w0, w1)
        self.layer2 = block(w1, w2)
        self.layer3 = block(w2, w3)
        self.layer4 = block(w3, w4)
        self.fpn = FeaturePyramidNetwork([w2, w3, w4], out_channels)
        self.out_channels = out_channels
        for stage in (self.stem, self.layer1, self.layer2, self.layer3, self.layer4):
            for m in stage.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        c2 = self.layer2(self.layer1(self.stem(x)))
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return self.fpn(OrderedDict([("0", c2), ("1", c3), ("2", c4)]))
