"""Where and how training runs: seeding, the torchrun process group (`Distributed`), the device,
mixed precision (bf16 detection, autocast) and the float32 depthwise convolutions that make bf16 fast
on CPUs. The fit loop in `training` uses these; the benchmarks time them."""

from __future__ import annotations

import os
import random
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .models import predict_probs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def gather_probs(self, model: nn.Module, images) -> np.ndarray:
        """Probabilities for the whole split: each rank predicts every world-th image, then all share."""
        if self.world == 1:
            return predict_probs(model, images)
        import torch.distributed as dist

        index = np.arange(self.rank, len(images), self.world)
        mine = predict_probs(model, np.stack([images[int(i)] for i in index]) if len(index) else images[0:0])
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, (index, mine))
        probs = np.zeros((len(images), mine.shape[1]), np.float32)
        for idx, p in parts:
            probs[idx] = p
        return probs

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def pick_device(dist: Distributed = Distributed()) -> torch.device:
    return torch.device(f"cuda:{dist.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def autocast(device: torch.device, enabled: bool):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype, enabled=enabled)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled and cpu_has_bf16())


def _fp32_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", enabled=False):
        return type(conv).forward(conv, x.float())


@contextmanager
def slow_bf16_convs_in_fp32(model: nn.Module, device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Within this block, on CPU, run the trainable depthwise convolutions with a 5×5 kernel or stride 2 in
    float32 under bf16 autocast: oneDNN's bf16 backward for those is 2–5× slower than float32 and took over
    half of a training step, while its other bf16 kernels are fast (`python benchmarks/train_step.py`).
    Frozen ones stay in bf16: they have no weight gradient, and their forward pass is faster in bf16.
    With enabled=False, or off the CPU, the block changes nothing."""
    convs = [] if not enabled or device.type != "cpu" else [
        m for m in model.modules()
        if isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels and (max(m.kernel_size) > 3 or max(m.stride) > 1)
        and m.weight.requires_grad
    ]
    for conv in convs:
        conv.forward = types.MethodType(_fp32_forward, conv)
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward
