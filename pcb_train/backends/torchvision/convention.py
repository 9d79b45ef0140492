"""torchvision's class convention <-> pcbkit's: the ONLY place that knows torchvision puts the
background first.

torchvision: class logits [R, K+1] with column 0 = background, labels 1..K for objects, box
deltas and mask logits with a background slot 0. pcbkit: logits [R, K+1] with the background
LAST (column K), labels 0..K-1, K = background, -1 = ignore. Parameters keep torchvision's layout
(so its state dicts load unchanged); `PCBRoIHeads` converts at its boundary with these functions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def tv_to_bg_last(x: Tensor) -> Tensor:
    """[R, K+1] in torchvision's column order (background 0) -> pcbkit's (background K)."""
    return torch.cat([x[:, 1:], x[:, :1]], dim=1)


def bg_last_to_tv(x: Tensor) -> Tensor:
    """[R, K+1] in pcbkit's column order (background K) -> torchvision's (background 0)."""
    return torch.cat([x[:, -1:], x[:, :-1]], dim=1)


def labels_to_tv(labels: Tensor) -> Tensor:
    """pcbkit object labels 0..K-1 -> torchvision's 1..K (also indexes the class slots of box
    deltas and mask logits, whose slot 0 is the background)."""
    return labels + 1


def tv_labels_to_bg_last(labels: Tensor, num_classes: int) -> Tensor:
    """torchvision sample labels (0 background, 1..K objects, -1 ignore) -> pcbkit's (K, 0..K-1, -1)."""
    out = labels - 1
    out = torch.where(labels == 0, torch.full_like(labels, num_classes), out)
    return torch.where(labels < 0, torch.full_like(labels, -1), out)
