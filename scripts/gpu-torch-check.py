#!/usr/bin/env python3
"""The torch part of the GPU check: stp.torch runs a braided order with
each braid's two passes on two CUDA streams.

One process (world size 1), one stage of a transformer-like layer large
enough that its kernels take milliseconds. Two programs of the same
passes: `braided` (each forward beside the previous microbatch's
backward, `F(i) & BW(i - 1)`) and `split` (the same order, one pass at a
time). It checks that both give the same gradients, prints each one's
step time (median of STEPS), and in a torch profiler trace of one braided
step counts the pairs of kernels on different streams whose intervals
overlap: on a GPU there must be some.

Usage: python3 scripts/gpu-torch-check.py            (needs torch with CUDA and `stp`)
       DEVICE=cpu python3 scripts/gpu-torch-check.py (a dry run of the logic)
Budget: about a minute on one H100 once torch and stp are installed.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

import stp
import stp.torch as stp_torch

DEVICE = os.environ.get("DEVICE", "cuda")
HIDDEN = int(os.environ.get("HIDDEN", "4096" if DEVICE == "cuda" else "64"))
ROWS = int(os.environ.get("ROWS", "4096" if DEVICE == "cuda" else "16"))
M = int(os.environ.get("M", "8"))
STEPS = int(os.environ.get("STEPS", "5"))


def order(braided: bool) -> str:
    pair = "F(i) & BW(i - 1)" if braided else "F(i); BW(i - 1)"
    return f"""
schedule one_rank(p: ranks, m: microbatches) {{
  require p == 1 : "one rank";
  require m >= 2 : "two microbatches at least";
  stages 1;
  place s -> 0;
  memory {{ budget = 2; }}
  rank r {{
    F(0);
    for i in 1..m {{ {pair} }}
    BW(m - 1)
  }}
}}
"""


class Mlp(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(HIDDEN, 4 * HIDDEN, generator=g) / HIDDEN**0.5)
        self.w2 = nn.Parameter(torch.randn(4 * HIDDEN, HIDDEN, generator=g) / (4 * HIDDEN) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w1) @ self.w2


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = Mlp(1), Mlp(2)


def run(braided: bool, x: torch.Tensor, y: torch.Tensor, profile: bool = False):
    program = stp.compile(order(braided), p=1, m=M)
    layer = Layer().to(DEVICE)
    stage = stp_torch.Stage(layer, 0, units=[layer.first, layer.second])
    schedule = stp_torch.Schedule(program, [stage], lambda out, t: ((out - t) ** 2).mean())
    times = []
    for _ in range(STEPS):
        layer.zero_grad()
        sync()
        start = time.perf_counter()
        schedule.step(x, target=y)
        sync()
        times.append(time.perf_counter() - start)
    overlaps = None
    if profile and DEVICE == "cuda":
        from torch.profiler import ProfilerActivity, profile as profiler

        with profiler(activities=[ProfilerActivity.CUDA]) as prof:
            layer.zero_grad()
            schedule.step(x, target=y)
            sync()
        overlaps = overlapping_kernels(prof)
        layer.zero_grad()
        schedule.step(x, target=y)
        sync()
    grads = {n: p.grad.detach().float().cpu() for n, p in layer.named_parameters()}
    return statistics.median(times), grads, overlaps


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def overlapping_kernels(prof) -> int:
    """Pairs of kernels on different streams whose intervals overlap, read
    from the profiler's Chrome trace (kernel events carry their stream)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    kernels = sorted(
        (e["ts"], e["ts"] + e.get("dur", 0), e.get("args", {}).get("stream"))
        for e in events
        if e.get("cat") == "kernel"
    )
    count = 0
    for i, (_, end1, stream1) in enumerate(kernels):
        for start2, _, stream2 in kernels[i + 1 :]:
            if start2 >= end1:
                break
            count += stream1 != stream2
    return count


def main() -> int:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("error: torch sees no CUDA device (DEVICE=cpu runs a dry run)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/rendezvous", rank=0, world_size=1)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(M * ROWS, HIDDEN, generator=g).to(DEVICE)
        y = torch.randn(M * ROWS, HIDDEN, generator=g).to(DEVICE)
        split_time, split_grads, _ = run(False, x, y)
        braided_time, braided_grads, overlaps = run(True, x, y, profile=True)
        dist.destroy_process_group()
    worst = max(((braided_grads[n] - split_grads[n]).abs().max() / split_grads[n].abs().max()).item() for n in split_grads)
    print(f"device {DEVICE}, hidden {HIDDEN}, rows {ROWS} per microbatch, m = {M}")
    print(f"step time: split {split_time * 1e3:.2f} ms, braided {braided_time * 1e3:.2f} ms "
          f"(braided / split = {braided_time / split_time:.3f})")
    print(f"largest relative gradient difference braided vs split: {worst:.2e}")
    ok = worst < 1e-4
    if overlaps is not None:
        print(f"kernel pairs on different streams that overlap in one braided step: {overlaps}")
        ok = ok and overlaps > 0
    print("torch check:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
