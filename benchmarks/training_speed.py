"""Training throughput of one member, each change on its own and together, side by side in one run.

    python -m benchmarks.training_speed [--seconds 8] [--markdown docs/benchmarks.md]

Rows: the previous member layout (a residual stage at full resolution) at batch 128 in the default
memory format, then channels-last, batch 256, the current layout, both thread counts and
with ``--compile``, ``torch.compile`` (its compile time is shown apart). Every row trains on the same random batch with
the same AdamW step as ``training.train.fit``; images/s is over whole steps (forward, backward, update).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from benchmarks.load import write_between_markers
from training.members import CompactNet

PREVIOUS_STAGES = ((16, 1, 1), (32, 1, 2), (64, 2, 2))  # before: 28 -> 28 -> 14 -> 7


@dataclass(frozen=True)
class Setting:
    name: str
    previous_layout: bool = False
    channels_last: bool = True
    batch: int = 256
    threads: int = 2
    compile: bool = False


SETTINGS = (
    Setting("before: previous layout, batch 128, default memory format", True, False, 128),
    Setting("previous layout, batch 128, channels-last", True, True, 128),
    Setting("previous layout, batch 256, channels-last", True, True, 256),
    Setting("after: current layout, batch 256, channels-last"),
    Setting("current layout, 1 thread", threads=1),
)
COMPILED = Setting("current layout + torch.compile", compile=True)


def measure(setting: Setting, seconds: float, size: int = 28) -> tuple[float, float]:
    """(images/s, compile seconds) for one setting."""
    torch.set_num_threads(setting.threads)
    torch.manual_seed(0)
    model = CompactNet(0.0, stages=PREVIOUS_STAGES) if setting.previous_layout else CompactNet(0.0)
    fmt = torch.channels_last if setting.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    optimizer = create_optimizer_v2(model, "adamw", lr=4e-3, weight_decay=5e-4)
    forward = torch.compile(model) if setting.compile else model
    x = torch.randn(setting.batch, 1, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (setting.batch,))

    def step() -> None:
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    started = time.perf_counter()
    step()
    compile_seconds = time.perf_counter() - started if setting.compile else 0.0
    for _ in range(3):
        step()
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        images += setting.batch
    return images / (time.perf_counter() - started), compile_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per setting")
    parser.add_argument("--markdown", type=Path, help="write the table into this page's benchmarks.training block")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile row (about a minute of compiling)")
    args = parser.parse_args()
    results = []
    for setting in SETTINGS + ((COMPILED,) if args.compile else ()):
        rate, compiled = measure(setting, args.seconds)
        results.append((setting, rate, compiled))
        print(f"{setting.name}: {rate:.0f} images/s" + (f" (compile {compiled:.0f} s)" if compiled else ""), flush=True)
    before = results[0][1]
    lines = ["| setting | threads | images/s | vs before | compile time |", "|---|---|---|---|---|"]
    lines += [
        f"| {s.name} | {s.threads} | {rate:,.0f} | {rate / before:.2f}x | {f'{compiled:.0f} s' if compiled else ''} |"
        for s, rate, compiled in results
    ]
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        write_between_markers(args.markdown, "benchmarks.training", f"Command: `python -m benchmarks.training_speed --seconds {args.seconds:g}{' --compile' if args.compile else ''}`\n\n{table}")


if __name__ == "__main__":
    main()
