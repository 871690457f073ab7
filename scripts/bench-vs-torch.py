#!/usr/bin/env python3
"""stpc's whole compile path against PyTorch's lowering of the same
schedule, in one paired run.

For each schedule and size it times, alternating, (a) PyTorch 2.9's own
work in-process, import excluded: `get_schedule_ops` (the schedule class
builds every rank's compute order) plus `_add_send_recv` (the lowering that
adds transfers), and (b) `stpc compile SCHEDULE -p P -m M -o DIR` as a
whole process (start, parse, check, lower, verify, write the program).
It prints the medians and their ratio, as a Markdown table.

Usage: python3 scripts/bench-vs-torch.py [--stpc target/release/stpc] [--runs 5]
           [--sizes 32:128,64:256] [--format json|compact] [--schedules zb-v,interleaved-1f1b,1f1b]
Needs torch (scripts/python-env.sh makes an environment with it) and a
release stpc (cargo build --release -p stpc).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

TORCH_CLASS = {"zb-v": "ZBVZeroBubble", "interleaved-1f1b": "Interleaved1F1B", "1f1b": "1F1B", "dualpipe-v": "DualPipeV"}
CHUNKS = {"zb-v": 2, "interleaved-1f1b": 2, "1f1b": 1, "dualpipe-v": 2}


def stage_to_rank(name: str, p: int):
    if name in ("zb-v", "dualpipe-v"):
        return lambda s: s if s < p else 2 * p - 1 - s
    return lambda s: s % p


def torch_lowering(name: str, p: int, m: int, fallback: "dict | None") -> "tuple[float, int]":
    """Times torch's generator and lowering. Where torch's own order is
    malformed (2.9.1's 1F1B `pipeline_order` leaves F0 off the last rank,
    and `_add_send_recv` refuses it), the generator is still timed but
    the lowering runs on `fallback`, stpc's order of the same schedule."""
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
    from torch.distributed.pipelining.schedules import _add_send_recv, get_schedule_class

    v = CHUNKS[name]
    start = time.perf_counter()
    ops = get_schedule_ops(get_schedule_class(TORCH_CLASS[name]), p, m, num_stages_per_rank=v if v > 1 else None)
    actions = {r: [a for a in row if a is not None] for r, row in enumerate(ops)}
    if fallback is not None:
        actions = {r: list(row) for r, row in fallback.items()}
    passes = sum(len(r) for r in actions.values())
    lowered = _add_send_recv(actions, stage_to_rank(name, p), p * v)
    elapsed = time.perf_counter() - start
    assert sum(len(r) for r in lowered.values()) > 0
    return elapsed, passes


def torch_order_is_malformed(name: str, p: int, m: int) -> bool:
    try:
        torch_lowering(name, p, m, None)
        return False
    except AssertionError:
        return True


def stpc_order(stpc: str, name: str, p: int, m: int) -> dict:
    from torch.distributed.pipelining.schedules import _Action

    args = [stpc, "export", name, "-p", str(p), "-m", str(m), "--format", "torch-csv"]
    csv = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return {r: [_Action.from_str(c) for c in row.split(",")] for r, row in enumerate(csv.splitlines())}


def stpc_compile(stpc: str, name: str, p: int, m: int, out: str, extra: list) -> float:
    args = [stpc, "compile", name, "-p", str(p), "-m", str(m), "-o", out, *extra]
    if CHUNKS[name] > 1 and name == "interleaved-1f1b":
        args += ["-v", str(CHUNKS[name])]
    start = time.perf_counter()
    done = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"stpc failed: {' '.join(args)}\n{done.stderr}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stpc", default="target/release/stpc")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", default="32:128,64:256", help="p:m pairs")
    ap.add_argument("--schedules", default="zb-v,interleaved-1f1b,1f1b")
    ap.add_argument("--stpc-args", default="", help="extra arguments for stpc compile, e.g. '--format compact'")
    opts = ap.parse_args()
    import torch  # noqa: F401  (imported once, outside the timings)

    extra = opts.stpc_args.split()
    print(f"torch {torch.__version__}, stpc {opts.stpc} {' '.join(extra)}, median of {opts.runs} paired runs\n")
    print("| schedule | p | m | passes | torch get_schedule_ops + _add_send_recv | stpc compile (whole process) | torch / stpc |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out:
        for name in opts.schedules.split(","):
            for size in opts.sizes.split(","):
                p, m = (int(x) for x in size.split(":"))
                torch_times, stpc_times, passes = [], [], 0
                fallback = stpc_order(opts.stpc, name, p, m) if torch_order_is_malformed(name, p, m) else None
                for _ in range(opts.runs):
                    elapsed, passes = torch_lowering(name, p, m, fallback)
                    torch_times.append(elapsed)
                    stpc_times.append(stpc_compile(opts.stpc, name, p, m, out, extra))
                t, s = statistics.median(torch_times), statistics.median(stpc_times)
                mark = " (lowering stpc's order: torch's is malformed)" if fallback else ""
                print(f"| {name} | {p} | {m} | {passes:,} | {t * 1e3:.1f} ms{mark} | {s * 1e3:.1f} ms | {t / s:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
