"""pcb_train.distributed: the context from torchrun's environment, sharding, single-process no-ops."""

from __future__ import annotations

import pytest
import torch

from pcb_analysis.errors import PcbkitError
from pcb_train.distributed import (
    DistContext,
    all_reduce_sum_,
    barrier,
    context_from_env,
    gather_to_main,
    reduce_means,
    resolve_device,
    shard_indices,
)


def test_shard_indices_partition_without_padding() -> None:
    for n in (0, 1, 5, 8):
        for w in (1, 2, 3):
            parts = [shard_indices(n, r, w) for r in range(w)]
            flat = sorted(i for p in parts for i in p)
            assert flat == list(range(n))  # disjoint, covering, no padding
    assert shard_indices(5, 1, 2) == [1, 3]
    with pytest.raises(ValueError, match="bad rank"):
        shard_indices(5, 2, 2)


def test_context_from_env() -> None:
    assert context_from_env({}) == DistContext(0, 1, 0)
    assert context_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == DistContext(3, 4, 1)
    with pytest.raises(PcbkitError, match="outside WORLD_SIZE"):
        context_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(PcbkitError, match="must be integers"):
        context_from_env({"RANK": "a", "WORLD_SIZE": "4"})


def test_single_process_helpers_are_no_ops() -> None:
    ctx = DistContext()
    assert ctx.is_main and not ctx.distributed
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum_(t) is t and t.tolist() == [1.0, 2.0]
    barrier(ctx)
    assert gather_to_main({"a": 1}, ctx) == [{"a": 1}]
    assert reduce_means({"loss": 0.5}, ctx, torch.device("cpu")) == {"loss": 0.5}


def test_resolve_device_names_the_option() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(PcbkitError, match="^device: unknown device"):
        resolve_device("gpu", option="device")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(PcbkitError, match="--device cuda: no CUDA device"):
            resolve_device("cuda")
