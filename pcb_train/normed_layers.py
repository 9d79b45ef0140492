"""Cosine ("normalised") classifier layers of the official Seesaw configs (docs/losses.md §2).

    NormedLinear(in, out)      x [N, in] -> T * (x / |x|) . (w_j / |w_j|)^T + b   [N, out]
    NormedConv2d(in, out, k)   the same per pixel: input normalised over channels, each output
                               filter over its input channels, times T, then the convolution

T = 20 (temperature), norms get + 1e-6. `NormedLinear` starts with weights N(0, 0.01) and bias 0
(the reference initialisation); `NormedConv2d` keeps PyTorch's. Both subclass their plain layer,
so code that reads `.out_features` / `.weight` keeps working.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

TEMPERATURE = 20.0
NORM_EPS = 1e-6


def _unit(x: Tensor, dim: int) -> Tensor:
    return x / (x.norm(dim=dim, keepdim=True) + NORM_EPS)


class NormedLinear(nn.Linear):
    """Cosine linear layer with temperature (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, temperature: float = TEMPERATURE) -> None:
        super().__init__(in_features, out_features)
        self.temperature = float(temperature)
        nn.init.normal_(self.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(_unit(x, 1) * self.temperature, _unit(self.weight, 1), self.bias)


class NormedConv2d(nn.Conv2d):
    """Cosine convolution with temperature (see the module docstring)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, temperature: float = TEMPERATURE
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size)
        self.temperature = float(temperature)

    def normalized_input(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] divided by its per-pixel channel norm, times the temperature."""
        return _unit(x, 1) * self.temperature

    def normalized_weight(self) -> Tensor:
        """Each filter divided by its norm over the input channels (per kernel position)."""
        return _unit(self.weight, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.normalized_input(x), self.normalized_weight(), self.bias)
