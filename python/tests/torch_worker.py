"""One process of a torch.distributed job that trains a small
transformer-like model through stp.torch and compares every gradient with
a single-process run. Run by test_torch.py; each process reads RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT as torchrun sets them, and a
scenario name and its arguments from argv.

Exit status 0: every case agreed. Otherwise the last line of stderr says
which case and parameter differed, or what was raised.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn

import stp
import stp.torch as stp_torch

D, SEQ, HEADS, FFN = 8, 3, 2, 16
ROWS_PER_MB = 2
TOLERANCE = 1e-10


def full_weights(part: int) -> dict:
    """One model part's weights (a transformer layer), the same on every
    process: the single-process reference and every copy start alike."""
    g = torch.Generator().manual_seed(1000 + part)
    w = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64) / math.sqrt(shape[0])  # noqa: E731
    return {"wq": w(D, D), "wk": w(D, D), "wv": w(D, D), "wo": w(D, D), "w1": w(D, FFN), "w2": w(FFN, D)}


class Attention(nn.Module):
    """Self-attention over the heads `heads` (a tensor-parallel shard of
    the full layer's): returns its partial contribution to the output."""

    def __init__(self, weights: dict, tp: int, t: int) -> None:
        super().__init__()
        width = D // tp
        cols = slice(t * width, (t + 1) * width)
        self.heads = HEADS // tp
        self.wq = nn.Parameter(weights["wq"][:, cols].clone())
        self.wk = nn.Parameter(weights["wk"][:, cols].clone())
        self.wv = nn.Parameter(weights["wv"][:, cols].clone())
        self.wo = nn.Parameter(weights["wo"][cols, :].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        hd = D // HEADS

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, hd).transpose(1, 2)

        q, k, v = heads(x @ self.wq), heads(x @ self.wk), heads(x @ self.wv)
        ctx = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        return ctx.transpose(1, 2).reshape(b, n, self.heads * hd) @ self.wo


class Mlp(nn.Module):
    def __init__(self, weights: dict, tp: int, t: int) -> None:
        super().__init__()
        width = FFN // tp
        cols = slice(t * width, (t + 1) * width)
        self.w1 = nn.Parameter(weights["w1"][:, cols].clone())
        self.w2 = nn.Parameter(weights["w2"][cols, :].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w1) @ self.w2


class Layer(nn.Module):
    """x + attention(x), then + mlp(x): one model part."""

    def __init__(self, part: int, tp: int = 1, t: int = 0) -> None:
        super().__init__()
        weights = full_weights(part)
        self.attention = Attention(weights, tp, t)
        self.mlp = Mlp(weights, tp, t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(x)
        return x + self.mlp(x)


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def batch(m: int):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(m * ROWS_PER_MB, SEQ, D, generator=g, dtype=torch.float64)
    y = torch.randn(m * ROWS_PER_MB, SEQ, D, generator=g, dtype=torch.float64)
    return x, y


def reference(parts: int, m: int):
    """The single-process run: the mean microbatch loss's gradients."""
    layers = [Layer(j) for j in range(parts)]
    x, y = batch(m)
    losses = []
    for xi, yi in zip(torch.chunk(x, m), torch.chunk(y, m)):
        h = xi
        for layer in layers:
            h = layer(h)
        losses.append(loss_fn(h, yi))
    (sum(losses) / m).backward()
    return layers, [l.detach() for l in losses]


def shard_of(full_grad: torch.Tensor, name: str, tp: int, t: int) -> torch.Tensor:
    if tp == 1:
        return full_grad
    if name in ("attention.wq", "attention.wk", "attention.wv"):
        w = D // tp
        return full_grad[:, t * w : (t + 1) * w]
    if name == "attention.wo":
        w = D // tp
        return full_grad[t * w : (t + 1) * w, :]
    w = FFN // tp
    return full_grad[:, t * w : (t + 1) * w] if name == "mlp.w1" else full_grad[t * w : (t + 1) * w, :]


def run_case(case: dict) -> None:
    """Compiles `case`, runs one step, and compares with the reference."""
    schedule = case["schedule"]
    options = {k: v for k, v in case.items() if k not in ("schedule", "label")}
    program = stp.compile(schedule, **options)
    tp = program.tp
    parts = program.num_stages // program.pipelines
    m = program.num_microbatches
    _, t = stp_torch.coordinates(program)
    stages = []
    for s in stp_torch.my_stages(program):
        layer = Layer(s % parts, tp, t)
        stages.append(stp_torch.Stage(layer, s, units=[layer.attention, layer.mlp]))
    runner = stp_torch.Schedule(program, stages, loss_fn)
    runner.trace = []
    x, y = batch(m)
    losses: list = []
    runner.step(x, target=y, losses=losses)
    check_overlap(program, runner)
    ref_layers, ref_losses = reference(parts, m)
    label = f"{case.get('label', schedule)} {options}"
    owned = {stage.index for stage in stages}
    routes = program.routes or (0,) * m
    mine = [i for i in range(m) if routes[i] * parts + parts - 1 in owned]
    want = [ref_losses[i] for i in mine]
    if len(losses) != len(want):
        raise AssertionError(f"{label}: {len(losses)} losses, expected {len(want)}")
    for got, expected in zip(losses, want):
        if abs(float(got) - float(expected)) > TOLERANCE:
            raise AssertionError(f"{label}: loss {float(got)} != {float(expected)}")
    for stage in stages:
        ref = dict(ref_layers[stage.index % parts].named_parameters())
        for name, param in stage.module.named_parameters():
            expected = shard_of(ref[name].grad, name, tp, t)
            if param.grad is None:
                raise AssertionError(f"{label}: stage {stage.index} {name} has no gradient")
            err = (param.grad - expected).abs().max().item()
            if err > TOLERANCE:
                raise AssertionError(f"{label}: stage {stage.index} {name} differs by {err:.3g}")
    print(f"rank {dist.get_rank()}: {label}: {len(stages)} stage(s), {len(losses)} loss(es) agree", flush=True)


def check_overlap(program, runner) -> None:
    """With tensor parallelism, every braided compute must run a unit of
    one pass while the other pass's all-reduce is in flight: between an
    all-reduce's issue and its wait, the trace shows the other pass
    computing."""
    if program.tp == 1:
        return
    pipeline_rank, _ = stp_torch.coordinates(program)
    braids = [i for i in program.ranks[pipeline_rank].instructions if isinstance(i, stp.Compute) and i.braided]
    events = runner.trace
    overlapped = 0
    for n, (event, q, unit) in enumerate(events):
        if event != "issue":
            continue
        end = events.index(("wait", q, unit), n)
        if any(e == "compute" and other != q for e, other, _ in events[n:end]):
            overlapped += 1
    if overlapped < len(braids):
        raise AssertionError(f"{len(braids)} braided computes but only {overlapped} all-reduces overlapped")
    if braids:
        print(f"rank {dist.get_rank()}: {overlapped} all-reduces ran under the other pass of {len(braids)} braids", flush=True)


def scenario_train(cases_json: str) -> None:
    for case in json.loads(cases_json):
        run_case(case)
        dist.barrier()


def scenario_runtime(cases_json: str) -> None:
    """PyTorch's own runtime (`_PipelineScheduleRuntime`) runs stpc's
    CSV export, in both formats, with the loss and gradients of the
    single-process run. torch 2.9.1 scales gradients after a full backward
    but not after a weight gradient, so the runtime is built with
    `scale_grads=False` and the gradients divided by m here (the book's
    workaround)."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

    directory = os.environ["STP_TEST_DIR"]
    # torch 2.9.1's stage initialization sends an int64 and receives a
    # tensor of the default dtype; gloo refuses a size mismatch, so the
    # default must be 8 bytes wide (NCCL does not check).
    torch.set_default_dtype(torch.float64)
    # It also warms up the link to the next and previous stage's rank even
    # when that rank is itself (a V placement's turn), which gloo cannot
    # do ("Pair is not connected"); those warm-ups are dropped.
    from torch.distributed.pipelining.stage import _PipelineStageBase

    warm_ups = _PipelineStageBase._get_init_p2p_neighbors_ops

    def without_self_sends(stage):
        me = dist.get_rank(stage.group)
        return [op for op in warm_ups(stage) if op.group_peer != me]

    _PipelineStageBase._get_init_p2p_neighbors_ops = without_self_sends
    for case in json.loads(cases_json):
        options = {k: v for k, v in case.items() if k != "schedule"}
        program = stp.compile(case["schedule"], **options)
        m, n = program.num_microbatches, program.num_stages
        for comms in (False, True):
            layers = {s: Layer(s) for s in stp_torch.my_stages(program)}
            stages = [PipelineStage(layer, s, n, torch.device("cpu")) for s, layer in layers.items()]
            runtime = _PipelineScheduleRuntime(stages, m, loss_fn=loss_fn, scale_grads=False)
            path = os.path.join(directory, f"{case['schedule']}-{comms}.csv")
            if dist.get_rank() == 0:
                stp.torch_csv(program, comms=comms).write(path)
            dist.barrier()
            runtime._load_csv(path, format="compute_comms" if comms else "compute_only")
            x, y = batch(m)
            losses: list = []
            runtime.step(x, target=y, losses=losses)
            ref_layers, ref_losses = reference(n, m)
            label = f"{case['schedule']} {options} ({'compute_comms' if comms else 'compute_only'})"
            if n - 1 in layers:
                for got, expected in zip([l.detach() for l in losses], ref_losses, strict=True):
                    if abs(float(got) - float(expected)) > TOLERANCE:
                        raise AssertionError(f"{label}: loss {float(got)} != {float(expected)}")
            for s, layer in layers.items():
                ref = dict(ref_layers[s].named_parameters())
                for name, param in layer.named_parameters():
                    err = (param.grad / m - ref[name].grad).abs().max().item()
                    if err > TOLERANCE:
                        raise AssertionError(f"{label}: stage {s} {name} differs by {err:.3g}")
            print(f"rank {dist.get_rank()}: {label}: torch's runtime agrees", flush=True)
            dist.barrier()


class Masked(nn.Module):
    """A stage that takes and returns two tensors: hidden states and an
    integer mask that travels along (no gradient flows through it)."""

    def __init__(self, part: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2000 + part)
        self.w = nn.Parameter(torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D))

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        return x + torch.tanh(x @ self.w) * mask.unsqueeze(-1).to(x.dtype), mask


def masked_loss(out, target: torch.Tensor) -> torch.Tensor:
    hidden, _ = out
    return ((hidden - target) ** 2).mean()


def scenario_tuples(cases_json: str) -> None:
    """Stages without units pass a tuple (hidden, mask) between them; the
    gradients equal a single-process run's."""
    for case in json.loads(cases_json):
        options = {k: v for k, v in case.items() if k not in ("schedule", "label")}
        program = stp.compile(case["schedule"], **options)
        parts, m = program.num_stages // program.pipelines, program.num_microbatches
        mine = {s: Masked(s % parts) for s in stp_torch.my_stages(program)}
        runner = stp_torch.Schedule(program, [stp_torch.Stage(layer, s) for s, layer in mine.items()], masked_loss)
        x, y = batch(m)
        mask = (torch.arange(x.shape[0] * SEQ).reshape(x.shape[0], SEQ) % 3 != 0).long()
        losses: list = []
        out = runner.step((x, mask), target=y, losses=losses)
        reference = [Masked(j) for j in range(parts)]
        ref_losses = []
        for xi, mi, yi in zip(torch.chunk(x, m), torch.chunk(mask, m), torch.chunk(y, m)):
            h = (xi, mi)
            for layer in reference:
                h = layer(*h)
            ref_losses.append(masked_loss(h, yi))
        (sum(ref_losses) / m).backward()
        label = f"{case['schedule']} {options} (tuples)"
        if out is not None and not (isinstance(out, tuple) and out[1].dtype == torch.long):
            raise AssertionError(f"{label}: the step returns the last stage's (hidden, mask), not {type(out)}")
        routes = program.routes or (0,) * m
        expected = [float(ref_losses[i].detach()) for i in range(m) if routes[i] * parts + parts - 1 in mine]
        if len(losses) != len(expected) or any(abs(float(a) - b) > TOLERANCE for a, b in zip(losses, expected)):
            raise AssertionError(f"{label}: losses {losses} != {expected}")
        for s, layer in mine.items():
            err = (layer.w.grad - reference[s % parts].w.grad).abs().max().item()
            if err > TOLERANCE:
                raise AssertionError(f"{label}: stage {s} differs by {err:.3g}")
        print(f"rank {dist.get_rank()}: {label}: {len(mine)} stage(s) agree", flush=True)
        dist.barrier()


def scenario_subgroups() -> None:
    """Four processes, two jobs: processes 0-1 and 2-3 each run a schedule
    over their own subgroup (as data-parallel replicas of a pipeline
    would), zb-v on one and dualpipe (with its reduction) on the other."""
    halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    half = dist.get_rank() // 2
    group = halves[half]
    name = "zb-v" if half == 0 else "dualpipe"
    program = stp.compile(name, p=2, m=4)
    parts = program.num_stages // program.pipelines
    me = dist.get_rank(group)
    owned = [s for s, r in enumerate(program.placement) if r == me]
    mine = {s: Layer(s % parts) for s in owned}
    stages = [stp_torch.Stage(layer, s, units=[layer.attention, layer.mlp]) for s, layer in mine.items()]
    runner = stp_torch.Schedule(program, stages, loss_fn, group=group)
    x, y = batch(4)
    runner.step(x, target=y)
    ref_layers, _ = reference(parts, 4)
    for s, layer in mine.items():
        ref = dict(ref_layers[s % parts].named_parameters())
        for pname, param in layer.named_parameters():
            err = (param.grad - ref[pname].grad).abs().max().item()
            if err > TOLERANCE:
                raise AssertionError(f"{name} on subgroup {half}: stage {s} {pname} differs by {err:.3g}")
    print(f"rank {dist.get_rank()}: {name} on subgroup {half}: {len(mine)} stage(s) agree", flush=True)
    dist.barrier()


def scenario_refused(kind: str) -> None:
    """Every process must raise ScheduleError with the cause."""
    try:
        if kind == "sequence-parallel":
            program = stp.compile("stp", p=2, m=6, tp=2, sequence_parallel=True)
            stages = [stp_torch.Stage(Layer(0), 0)]
        elif kind == "world":
            program = stp.compile("1f1b", p=4, m=4)
            stages = [stp_torch.Stage(Layer(0), 0)]
        elif kind == "stages":
            program = stp.compile("1f1b", p=2, m=4)
            stages = [stp_torch.Stage(Layer(0), 0)]  # both processes claim stage 0
        else:  # "shape": stage 1 expects a different width
            program = stp.compile("1f1b", p=2, m=4)
            module = Layer(0) if dist.get_rank() == 0 else nn.Linear(D + 1, D, dtype=torch.float64)
            stages = [stp_torch.Stage(module, dist.get_rank())]
        runner = stp_torch.Schedule(program, stages, loss_fn)
        x, y = batch(4)
        runner.step(x, target=y)
    except stp_torch.ScheduleError as e:
        print(f"REFUSED: {e}", flush=True)
        return
    raise AssertionError(f"{kind}: not refused")


def scenario_dies() -> None:
    """Process 1 dies in the middle of the step; process 0 must raise
    PeerError, not hang."""
    program = stp.compile("1f1b", p=2, m=4)
    layer = Layer(dist.get_rank())
    runner = stp_torch.Schedule(program, [stp_torch.Stage(layer, dist.get_rank())], loss_fn)
    if dist.get_rank() == 1:
        original = layer.forward

        def die_in_the_step(x):
            if torch.is_grad_enabled():  # not while the shapes are found
                os._exit(3)
            return original(x)

        layer.forward = die_in_the_step  # type: ignore[method-assign]
    x, y = batch(4)
    try:
        runner.step(x, target=y)
    except stp_torch.PeerError as e:
        print(f"PEER ERROR: {e}", flush=True)
        return
    raise AssertionError("process 0 finished a step its peer never ran")


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        scenario = sys.argv[1]
        if scenario == "train":
            scenario_train(sys.argv[2])
        elif scenario == "subgroups":
            scenario_subgroups()
        elif scenario == "tuples":
            scenario_tuples(sys.argv[2])
        elif scenario == "runtime":
            scenario_runtime(sys.argv[2])
        elif scenario == "refused":
            scenario_refused(sys.argv[2])
        elif scenario == "dies":
            scenario_dies()
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if scenario != "dies":
        dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
