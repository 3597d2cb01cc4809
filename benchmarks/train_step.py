"""Seconds per training step of the default model, by numeric precision, and where the time goes.

    python benchmarks/train_step.py [--batch 32] [--size 256] [--threads N] [--profile]

One step is what `training.fit` does per batch: forward and loss under autocast, backward, AdamW.
Compared: float32; bfloat16 autocast for everything; bfloat16 autocast with the slow depthwise
convolutions in float32 (`covid-xray train --fp32-depthwise`). bfloat16 rows need a CPU with native bf16
(avx512_bf16 or amx_bf16); elsewhere autocast is off and they time float32. --profile prints the
slowest operators of each setting, in all and by input shape (the same layer's share under each setting).
"""

from __future__ import annotations

import argparse

from _common import machine, print_table, time_calls, use_cores


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, help="run as if the machine had this many cores")
    parser.add_argument("--profile", action="store_true", help="also print each setting's slowest operators")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    use_cores(args.threads)
    import torch

    from covid_xray.models import DEFAULT_BACKBONE, create_model
    from covid_xray.training import autocast, cpu_has_bf16, slow_bf16_convs_in_fp32, train_mode

    device = torch.device("cpu")
    torch.manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 1, args.size, args.size), dtype=torch.uint8)
    y = torch.randint(0, 3, (args.batch,))
    settings = {  # name: (bf16 autocast, slow depthwise convs in float32)
        "float32": (False, False),
        "bfloat16 autocast": (True, False),
        "bfloat16 autocast, slow depthwise convs float32 (--fp32-depthwise)": (True, True),
    }
    rows = []
    for name, (amp, fp32_convs) in settings.items():
        model = create_model(DEFAULT_BACKBONE, 3).to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step() -> None:
            train_mode(model)
            with autocast(device, amp), slow_bf16_convs_in_fp32(model, device, fp32_convs):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        seconds = time_calls(step, min_calls=5, min_seconds=5, warmup=2)
        rows.append({"setting": name, "s/step": f"{seconds.mean():.2f}", "images/s": f"{args.batch / seconds.mean():.1f}"})
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                step()
            print(f"## {name}: by operator, then by operator and input shape")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
            print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12))
    print(f"default backbone {DEFAULT_BACKBONE}, batch {args.batch}, {args.size} px; native bf16: {cpu_has_bf16()}; {machine()}")
    print_table(rows)


if __name__ == "__main__":
    main()
