"""Seconds per training step of the default model, by numeric precision, and where the time goes.

    python benchmarks/train_step.py [--batch 32] [--size 256] [--threads N] [--profile]

One step is what `training.fit` does per batch: forward and loss under autocast, backward, AdamW.
The settings take turns, one step each per round, so a VM whose speed drifts affects them alike.
Compared, with every layer trained: float32; bfloat16 autocast for everything; bfloat16 autocast with
the slow depthwise convolutions in float32 (`covid-xray train --fp32-depthwise`). Then with the pretrained
layers down to 1/4 or 1/8 resolution fixed (`--freeze-stride`), which skips most of the backward pass at
full resolution, all in bfloat16; and the default: down to 1/8 fixed, and the depthwise convolutions that
still train in float32. bfloat16 rows need a CPU with native bf16 (avx512_bf16 or amx_bf16); elsewhere
autocast is off and they time float32. --profile prints the
slowest operators of each setting, in all and by input shape (the same layer's share under each setting).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
from _common import machine, print_table, time_in_turns, use_cores


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, help="run as if the machine had this many cores")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per setting, taken in turns")
    parser.add_argument("--profile", action="store_true", help="also print each setting's slowest operators")
    return parser.parse_args()


def make_step(amp: bool, fp32_convs: bool, freeze_stride: int, x, y) -> Callable[[], None]:
    """One training step of a fresh default model in the given setting, as `training.fit` takes it."""
    import torch

    from covid_xray.models import DEFAULT_BACKBONE, create_model
    from covid_xray.runtime import autocast, slow_bf16_convs_in_fp32
    from covid_xray.training import train_mode

    device = torch.device("cpu")
    model = create_model(DEFAULT_BACKBONE, 3).to(memory_format=torch.channels_last)
    model.freeze(freeze_stride)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        train_mode(model)
        with autocast(device, amp), slow_bf16_convs_in_fp32(model, device, fp32_convs):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    args = parse_args()
    use_cores(args.threads)
    import torch

    from covid_xray.models import DEFAULT_BACKBONE
    from covid_xray.config import TrainConfig
    from covid_xray.runtime import cpu_has_bf16

    torch.manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 1, args.size, args.size), dtype=torch.uint8)
    y = torch.randint(0, 3, (args.batch,))
    stride = TrainConfig().freeze_stride
    settings = {  # name: (bf16 autocast, slow depthwise convs in float32, --freeze-stride)
        "float32, every layer trained (--no-amp --freeze-stride 0)": (False, False, 0),
        "bfloat16 autocast, every layer trained (--freeze-stride 0 --no-fp32-depthwise)": (True, False, 0),
        "bfloat16 autocast, slow depthwise convs float32, every layer trained (--freeze-stride 0)": (True, True, 0),
        "bfloat16 autocast, layers down to 1/4 resolution fixed (--freeze-stride 4 --no-fp32-depthwise)": (True, False, 4),
        f"bfloat16 autocast, layers down to 1/{stride} resolution fixed (--no-fp32-depthwise)": (True, False, stride),
        f"the default: down to 1/{stride} fixed, slow depthwise convs that train in float32": (True, True, stride),
    }
    steps = {name: make_step(*setting, x, y) for name, setting in settings.items()}
    seconds = time_in_turns(steps, rounds=args.rounds)  # the untimed first steps allocate and pick kernels
    rows = [{"setting": name, "s/step (median)": f"{np.median(s):.2f}", "range": f"{min(s):.2f}–{max(s):.2f}",
             "images/s": f"{args.batch / np.median(s):.1f}"} for name, s in seconds.items()]
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                step()
            print(f"## {name}: by operator, then by operator and input shape")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
            print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12))
    print(f"default backbone {DEFAULT_BACKBONE}, batch {args.batch}, {args.size} px; native bf16: {cpu_has_bf16()}; {machine()}")
    print_table(rows)


if __name__ == "__main__":
    main()
