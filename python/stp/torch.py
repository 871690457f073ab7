"""stp.torch: run a checked stp program on your own PyTorch stages.

Each process of a `torch.distributed` job builds the stages it owns and a
`Schedule` over them, then calls `step` once per training step::

    import stp, stp.torch, torch.distributed as dist

    dist.init_process_group("gloo")                 # or "nccl"
    program = stp.compile("zb-v", p=dist.get_world_size(), m=8)
    mine = [stp.torch.Stage(build_stage(s), s) for s in stp.torch.my_stages(program)]
    schedule = stp.torch.Schedule(program, mine, loss_fn=torch.nn.functional.mse_loss)
    losses = []
    schedule.step(batch, target=labels, losses=losses)  # gradients are in .grad
    optimizer.step()

The schedule runs each rank's instruction stream as the IR's semantics
define it (the book's chapter "The IR"): every `group` of transfers is posted
with one `batch_isend_irecv`, so the rendezvous-deadlock freedom stpc proved
holds on NCCL; a buffer is dropped where the program frees it; `B` computes
only the input gradient and `W` the weight gradient from what `B` kept; `R`
recomputes a checkpointed forward; `reduce` sums the gradients of a part's
model copies (several pipelines). Gradients are those of the mean of the
microbatch losses, as PyTorch's schedules give by default, whichever
backward the schedule splits.

With tensor parallelism (`stp.compile(..., tp=N)`, N processes per pipeline
rank) a stage is a list of **units** (`Stage(module, s, units=[attention,
mlp])`), each computing its tensor-parallel shard and returning a partial
sum; the schedule issues the all-reduce that completes it (forward output
and input gradient, as Megatron's row- and column-parallel layers do) on
the communication stream, asynchronously, and runs the other pass of a
braided pair meanwhile, in exactly the order of the IR's units. On CUDA
the two passes of a braid run on two streams.

Building a `Schedule` and calling `step` are collective: every process of
the job must do both, in the same order. Anything wrong that one process
can see (a missing stage, a wrong world size, a stage whose output does not
fit the next stage's input) is raised on every process as a
`ScheduleError` before any of them waits for another; a peer that dies or
stops answering raises `PeerError` naming the transfer.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generator, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from . import StpError
from .ir import Compute, Free, Group, Pass, Program, Reduce

__all__ = ["Stage", "Schedule", "ScheduleError", "PeerError", "my_stages", "coordinates"]


class ScheduleError(StpError):
    """The program, the stages or the inputs do not fit together. Raised on
    every process of the job, before any of them blocks."""


class PeerError(StpError):
    """A transfer or collective failed: a peer died, or did not answer
    within the timeout. Says which instruction was waiting, for what."""


def coordinates(program: Program, rank: Optional[int] = None) -> Tuple[int, int]:
    """`(pipeline rank, tensor-parallel rank)` of a process: process `g`
    is pipeline rank `g // tp` and tensor-parallel rank `g % tp` (the
    processes of one pipeline rank are consecutive). `rank` defaults to
    this process's rank in the default process group."""
    g = dist.get_rank() if rank is None else rank
    return g // program.tp, g % program.tp


def my_stages(program: Program, rank: Optional[int] = None) -> List[int]:
    """The stages this process's pipeline rank owns, in increasing order."""
    pipeline_rank, _ = coordinates(program, rank)
    return [s for s, owner in enumerate(program.placement) if owner == pipeline_rank]


class Stage:
    """One stage of the model on this process.

    `module` holds the stage's parameters. Without `units`, `module(x)`
    is the stage's forward. With `units` (submodules of `module`, in
    forward order), the forward is the units one after another, each
    unit's output completed by an all-reduce over the tensor-parallel
    group (a no-op at tp = 1) and, with `residual`, added to its input:
    `x = x + all_reduce(unit(x))`. A program compiled with `tp > 1`
    names two units per stage (attention, then MLP), so its stages must
    give exactly two.
    """

    def __init__(
        self,
        module: nn.Module,
        index: int,
        *,
        units: Optional[Sequence[nn.Module]] = None,
        residual: bool = True,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"stage {index}: module must be a torch.nn.Module, not {type(module).__name__}")
        self.module = module
        self.index = int(index)
        self.units: List[nn.Module] = list(units) if units is not None else [module]
        self.residual = bool(residual) if units is not None else False
        owned = {id(p) for p in module.parameters()}
        for k, unit in enumerate(self.units):
            if not all(id(p) in owned for p in unit.parameters()):
                raise ValueError(f"stage {index}: unit {k} has parameters that are not the stage module's")

    def __repr__(self) -> str:
        return f"Stage({self.index}, {len(self.units)} unit(s))"


# ---------------------------------------------------------------------------
# What a forward keeps for its backward.


@dataclass
class _Stash:
    """`stash.s.i`: per unit, its input (a leaf) and partial output (the
    graph's root); the gradients `B` found for each unit's output, which
    `W` needs; with recompute, only the stage's input until `R`."""

    checkpoint: Optional[torch.Tensor] = None
    rng: Optional[Any] = None
    inputs: List[torch.Tensor] = field(default_factory=list)
    partials: List[torch.Tensor] = field(default_factory=list)
    out_grads: List[Optional[torch.Tensor]] = field(default_factory=list)
    output: Optional[torch.Tensor] = None  # the last stage's output leaf
    loss: Optional[torch.Tensor] = None  # the last stage's scaled loss


_Key = Tuple[str, int, int]  # (kind, stage, microbatch)


def _key(buffer: Any) -> _Key:
    return (buffer.kind, buffer.stage, buffer.microbatch)


def _name(key: _Key) -> str:
    return f"{key[0]}.s{key[1]}.mb{key[2]}"


@dataclass
class _Pending:
    """A receive in flight: the tensor it fills and its work handle."""

    tensor: torch.Tensor
    work: Any
    what: str


_Meta = Tuple[Tuple[int, ...], str]  # (shape, dtype name)


class Schedule:
    """Runs `program` over this process's `stages`.

    `loss_fn(output, target)` gives a microbatch's loss on a pipeline's
    last stage. `group` is the process group of the whole job (default:
    the default group); with tp > 1 the schedule makes the tensor-parallel
    groups itself (`self.tp_group`). `device` defaults to the stages'
    parameters' device. `timeout` bounds every wait for a peer (default:
    the process group's). With `scale_grads` (the default) gradients are
    those of the mean microbatch loss; without, of their sum.
    """

    def __init__(
        self,
        program: Program,
        stages: Union[Stage, Sequence[Stage]],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        group: Optional[Any] = None,
        device: Optional[Union[str, torch.device]] = None,
        timeout: Optional[datetime.timedelta] = None,
        scale_grads: bool = True,
    ) -> None:
        if not isinstance(program, Program):
            raise TypeError("program must be an stp.Program (from stp.compile or stp.Program.from_json, both verified)")
        if not dist.is_initialized():
            raise ScheduleError("torch.distributed is not initialized: call dist.init_process_group first")
        self.program = program
        self.group = group
        self.loss_fn = loss_fn
        self.timeout = timeout
        self.scale_grads = scale_grads
        self.stages: Dict[int, Stage] = {}
        stage_list = [stages] if isinstance(stages, Stage) else list(stages)
        self.global_rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.tp = program.tp
        self.pipeline_rank, self.tp_rank = coordinates(program, self.global_rank)
        self.parts = program.num_stages // program.pipelines
        error = self._local_problem(stage_list)
        if error is None:
            self.stages = {s.index: s for s in stage_list}
            if device is None:
                device = next((p.device for s in stage_list for p in s.module.parameters()), torch.device("cpu"))
            self.device = torch.device(device)
        self._raise_if_any(error)
        self._recomputed = self._recompute_plan()
        self.tp_group = self._make_tp_groups()
        self._reduce_groups = self._make_reduce_groups()
        self._meta: Optional[Dict[str, _Meta]] = None
        self._streams: Optional[List[Any]] = None
        self._graph_stream: Dict[Tuple[int, int], int] = {}
        # When a list: every unit computed, all-reduce issued and waited
        # for is appended, as (event, pass, unit) with pass "F s0 mb1"
        # (tests read it to see a braid's collectives overlap).
        self.trace: Optional[List[Tuple[str, str, int]]] = None

    # -- construction -------------------------------------------------------

    def _local_problem(self, stages: List[Stage]) -> Optional[str]:
        """What this process alone can see is wrong, or None."""
        p = self.program
        if self.world != p.num_ranks * p.tp:
            return (
                f"the program has {p.num_ranks} pipeline ranks x tp {p.tp} = {p.num_ranks * p.tp} processes, "
                f"but the process group has {self.world}"
            )
        if any(
            isinstance(i, Compute) and any(u.collective == "rs-ag" for u in i.units)
            for r in p.ranks
            for i in r.instructions
        ):
            return "stp.torch does not run sequence-parallel programs (rs-ag units) yet: compile without sequence_parallel"
        if not all(isinstance(s, Stage) for s in stages):
            return "stages must be stp.torch.Stage objects"
        given = sorted(s.index for s in stages)
        owned = my_stages(p, self.global_rank)
        if given != owned:
            return (
                f"process {self.global_rank} is pipeline rank {self.pipeline_rank}, which owns stage(s) {owned} "
                f"of {p.num_stages}, but was given stage(s) {given}"
            )
        for s in stages:
            if p.tp > 1 and len(s.units) != 2:
                return (
                    f"stage {s.index}: a program compiled with tp = {p.tp} runs each stage as two tensor-parallel "
                    f"units (attention, mlp), but the stage has {len(s.units)}: pass units=[attention, mlp]"
                )
        return None

    def _raise_if_any(self, error: Optional[str]) -> None:
        """Every process learns every process's error, and all raise."""
        errors: List[Optional[str]] = [None] * self.world
        self._collective("exchanging the processes' checks", lambda: dist.all_gather_object(errors, error, group=self.group))
        bad = [(g, e) for g, e in enumerate(errors) if e is not None]
        if bad:
            lines = "\n".join(f"  process {g}: {e}" for g, e in bad)
            raise ScheduleError(f"the schedule cannot run:\n{lines}")

    def _collective(self, what: str, run: Callable[[], Any]) -> None:
        try:
            run()
        except Exception as e:
            raise PeerError(f"process {self.global_rank}, {what}: {e}") from e

    def _global(self, pipeline_rank: int) -> int:
        return pipeline_rank * self.tp + self.tp_rank

    def _make_tp_groups(self) -> Optional[Any]:
        if self.tp == 1:
            return None
        mine = None
        for r in range(self.program.num_ranks):
            g = dist.new_group([r * self.tp + t for t in range(self.tp)])
            if r == self.pipeline_rank:
                mine = g
        return mine

    def _reduce_owner_sets(self) -> List[Tuple[int, ...]]:
        sets = set()
        for rank in self.program.ranks:
            for instr in rank.instructions:
                if isinstance(instr, Reduce):
                    owners = tuple(sorted({self.program.placement[s] for s in instr.stages}))
                    if len(owners) > 1:
                        sets.add(owners)
        return sorted(sets)

    def _make_reduce_groups(self) -> Dict[Tuple[int, ...], Any]:
        groups = {}
        for owners in self._reduce_owner_sets():
            for t in range(self.tp):
                g = dist.new_group([o * self.tp + t for o in owners])
                if t == self.tp_rank and self.pipeline_rank in owners:
                    groups[owners] = g
        return groups

    def _recompute_plan(self) -> set:
        rank = self.program.ranks[self.pipeline_rank]
        return {(q.stage, q.microbatch) for q in rank.passes() if q.kind == "R"}

    # -- the chain of stages ------------------------------------------------

    def _is_first(self, stage: int) -> bool:
        return stage % self.parts == 0

    def _is_last(self, stage: int) -> bool:
        return stage % self.parts == self.parts - 1

    def _route(self, mb: int) -> int:
        return self.program.routes[mb] if self.program.routes else 0

    # -- shapes -------------------------------------------------------------

    def _infer_shapes(self, inputs: Dict[int, torch.Tensor], targets: Dict[int, Any]) -> Dict[str, _Meta]:
        """Every stage's output shape, stage by stage: its owner runs it on
        zeros of its input's shape (no gradient, no collective) and tells
        every process, or tells them what failed."""
        meta: Dict[str, _Meta] = {}
        m = self.program.num_microbatches
        for s in range(self.program.num_stages):
            owner = self.program.placement[s]
            answer: List[Any] = [None]
            if self.pipeline_rank == owner:
                answer[0] = self._try_stage(s, meta, inputs, targets, m)
            self._collective(
                f"learning stage {s}'s output shape from process {owner * self.tp}",
                lambda: dist.broadcast_object_list(answer, src=owner * self.tp, group=self.group),
            )
            kind, value = answer[0]
            if kind == "error":
                raise ScheduleError(value)
            meta[f"in{s}"], meta[f"out{s}"] = value
        return meta

    def _try_stage(self, s: int, meta: Dict[str, _Meta], inputs, targets, m: int) -> Tuple[str, Any]:
        stage = self.stages[s]
        x: Optional[torch.Tensor] = None
        try:
            if self._is_first(s):
                mb = next((i for i in range(m) if self._route(i) == s // self.parts), None)
                if mb is None:
                    x = None
                elif mb not in inputs:
                    return ("error", f"stage {s} is a first stage, but its owner (process {self.global_rank}) got no inputs")
                else:
                    x = inputs[mb]
            else:
                shape, dtype = meta[f"out{s - 1}"]
                x = torch.zeros(shape, dtype=getattr(torch, dtype), device=self.device)
            if x is None:
                return ("ok", (((0,), "float32"), ((0,), "float32")))
            with torch.no_grad():
                y = self._forward_values(stage, x)
                if self._is_last(s):
                    mb = next(i for i in range(m) if self._route(i) == s // self.parts)
                    if mb not in targets:
                        return ("error", f"stage {s} is a last stage, but its owner (process {self.global_rank}) got no target")
                    loss = self.loss_fn(y, targets[mb])
                    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                        return ("error", f"loss_fn on stage {s}'s output must return one number, not {loss!r}")
            if not isinstance(y, torch.Tensor):
                return ("error", f"stage {s} returned {type(y).__name__}; stp.torch passes one tensor between stages")
            return ("ok", ((tuple(x.shape), _dtype(x)), (tuple(y.shape), _dtype(y))))
        except Exception as e:  # the user's module failed on this shape
            where = "its input" if self._is_first(s) else f"stage {s - 1}'s output"
            shape = tuple(x.shape) if x is not None else "unknown"
            return ("error", f"stage {s} (on process {self.global_rank}) fails on {where}, shape {shape}: {e}")

    def _forward_values(self, stage: Stage, x: torch.Tensor) -> torch.Tensor:
        for unit in stage.units:
            y = unit(x)
            x = x + y if stage.residual else y
        return x

    # -- one step -----------------------------------------------------------

    def step(
        self,
        inputs: Optional[torch.Tensor] = None,
        *,
        target: Optional[torch.Tensor] = None,
        losses: Optional[List[torch.Tensor]] = None,
    ) -> Optional[torch.Tensor]:
        """Runs one training step: the whole batch `inputs` (on the owners
        of first stages) is cut into the program's m microbatches along
        dimension 0, as is `target` (on the owners of last stages).
        Gradients accumulate into the stages' `.grad`. `losses`, if
        given, receives this process's microbatch losses (unscaled) in
        microbatch order. Returns the last stages' outputs, concatenated
        in microbatch order, on the processes that own them."""
        m = self.program.num_microbatches
        chunks = self._split("inputs", inputs, m)
        goals = self._split("target", target, m)
        if self._meta is None:
            self._raise_if_any(chunks if isinstance(chunks, str) else goals if isinstance(goals, str) else None)
            self._meta = self._infer_shapes(chunks, goals)
        elif isinstance(chunks, str) or isinstance(goals, str):
            raise ScheduleError(chunks if isinstance(chunks, str) else goals)
        run = _Step(self, chunks, goals)
        run.execute()
        if losses is not None:
            losses.extend(run.losses[i] for i in sorted(run.losses))
        if not run.outputs:
            return None
        return torch.cat([run.outputs[i] for i in sorted(run.outputs)])

    def _split(self, what: str, batch: Optional[torch.Tensor], m: int) -> Union[Dict[int, Any], str]:
        if batch is None:
            return {}
        if not isinstance(batch, torch.Tensor):
            return f"{what} must be one tensor, not {type(batch).__name__}"
        if batch.shape[0] % m != 0:
            return f"{what} has {batch.shape[0]} rows, which do not divide into the program's {m} microbatches"
        return dict(enumerate(torch.chunk(batch, m)))

    def _stream(self, k: int) -> Any:
        if self._streams is None:
            self._streams = [torch.cuda.Stream(device=self.device) for _ in range(2)]
        return self._streams[k]


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


class _Step:
    """The state of one step on one process: live buffers, transfers in
    flight, losses."""

    def __init__(self, schedule: Schedule, inputs: Dict[int, torch.Tensor], targets: Dict[int, Any]) -> None:
        self.s = schedule
        self.inputs = inputs
        self.targets = targets
        self.buffers: Dict[_Key, Any] = {}
        self.sends: Dict[_Key, List[Tuple[Any, str]]] = {}
        self.losses: Dict[int, torch.Tensor] = {}
        self.outputs: Dict[int, torch.Tensor] = {}
        self.at = ""  # the instruction being run, for errors
        m = schedule.program.num_microbatches
        self.scale = 1.0 / m if schedule.scale_grads else 1.0

    def execute(self) -> None:
        rank = self.s.program.ranks[self.s.pipeline_rank]
        for n, instr in enumerate(rank.instructions):
            self.at = f"instruction {n} of pipeline rank {self.s.pipeline_rank}"
            if isinstance(instr, Compute):
                self.compute(instr)
            elif isinstance(instr, Group):
                self.post(instr)
            elif isinstance(instr, Free):
                self.free(_key(instr.buffer))
            elif isinstance(instr, Reduce):
                self.reduce(instr.stages)
        self.at = f"the end of pipeline rank {self.s.pipeline_rank}'s step"
        for key in list(self.sends):
            self.wait_sends(key)

    # -- transfers ----------------------------------------------------------

    def wait(self, work: Any, what: str) -> None:
        try:
            if self.s.timeout is None:
                work.wait()
            else:
                work.wait(self.s.timeout)
        except Exception as e:
            raise PeerError(
                f"process {self.s.global_rank} (pipeline rank {self.s.pipeline_rank}), at {self.at}, "
                f"waiting for {what}: {e}"
            ) from e

    def shape_of(self, key: _Key) -> _Meta:
        kind, stage, _ = key
        assert self.s._meta is not None
        return self.s._meta[f"out{stage}" if kind == "act" else f"in{stage}"]

    def post(self, group: Group) -> None:
        ops, received = [], []
        for t in group.transfers:
            key = _key(t.buffer)
            peer = self.s._global(t.peer)
            if t.direction == "send":
                tensor = self.read(key).contiguous()
                ops.append(dist.P2POp(dist.isend, tensor, peer, group=self.s.group))
                received.append((key, None, f"send {_name(key)} to pipeline rank {t.peer}"))
            else:
                shape, dtype = self.shape_of(key)
                tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.s.device)
                ops.append(dist.P2POp(dist.irecv, tensor, peer, group=self.s.group))
                received.append((key, tensor, f"recv {_name(key)} from pipeline rank {t.peer}"))
        try:
            works = dist.batch_isend_irecv(ops)
        except Exception as e:
            raise PeerError(f"process {self.s.global_rank}, at {self.at}, posting a group of transfers: {e}") from e
        for (key, tensor, what), work in zip(received, works):
            if tensor is None:
                self.sends.setdefault(key, []).append((work, what))
            else:
                self.buffers[key] = _Pending(tensor, work, what)

    def read(self, key: _Key) -> Any:
        value = self.buffers[key]
        if isinstance(value, _Pending):
            self.wait(value.work, value.what)
            value = self.buffers[key] = value.tensor
        return value

    def wait_sends(self, key: _Key) -> None:
        for work, what in self.sends.pop(key, []):
            self.wait(work, what)

    def free(self, key: _Key) -> None:
        self.wait_sends(key)
        value = self.buffers.pop(key)
        if isinstance(value, _Pending):
            self.wait(value.work, value.what)

    # -- compute ------------------------------------------------------------

    def compute(self, instr: Compute) -> None:
        passes = list(instr.passes)
        cuda = self.s.device.type == "cuda"
        streams = self.choose_streams(passes) if cuda else [None] * len(passes)
        if cuda:
            ambient = torch.cuda.current_stream(self.s.device)
            for k in streams:
                self.s._stream(k).wait_stream(ambient)
        runs = [self.run_pass(q, streams[n]) for n, q in enumerate(passes)]
        for unit in instr.units:  # the IR's interleaving of the passes' units
            next(runs[unit.pass_index], None)
        for run in runs:
            for _ in run:
                pass
        if cuda:
            for k in streams:
                ambient.wait_stream(self.s._stream(k))

    def choose_streams(self, passes: List[Pass]) -> List[int]:
        """A forward runs on a stream other than its braided partner's
        graph: autograd runs each backward kernel on the stream its forward
        kernel ran on, so two graphs made on one stream cannot overlap."""
        if len(passes) == 1:
            q = passes[0]
            return [self.s._graph_stream.setdefault((q.stage, q.microbatch), 0)]
        chosen: List[Optional[int]] = [None, None]
        for n, q in enumerate(passes):
            if q.kind not in ("F", "R"):
                chosen[n] = self.s._graph_stream.get((q.stage, q.microbatch), 0)
        for n, q in enumerate(passes):
            if chosen[n] is None:
                other = chosen[1 - n]
                chosen[n] = 1 - other if other is not None else n
                self.s._graph_stream[(q.stage, q.microbatch)] = chosen[n]
        return [int(c) for c in chosen]  # type: ignore[arg-type]

    def run_pass(self, q: Pass, stream: Optional[int]) -> Generator[None, None, None]:
        body = {"F": self.forward, "R": self.recompute, "B": self.backward_input, "W": self.backward_weight, "BW": self.backward_full}[q.kind]
        gen = body(self.s.stages[q.stage], q.microbatch)
        if stream is None:
            yield from gen
            return
        ctx = torch.cuda.stream(self.s._stream(stream))
        while True:
            with ctx:
                try:
                    next(gen)
                except StopIteration:
                    return
            yield

    def note(self, event: str, q: str, unit: int) -> None:
        if self.s.trace is not None:
            self.s.trace.append((event, q, unit))

    def all_reduce(self, tensor: torch.Tensor, q: str, unit: int) -> Optional[Any]:
        if self.s.tp_group is None:
            return None
        self.note("issue", q, unit)
        return dist.all_reduce(tensor, group=self.s.tp_group, async_op=True)

    def finish(self, work: Optional[Any], q: str, unit: int, what: str) -> None:
        if work is not None:
            self.wait(work, what)
            self.note("wait", q, unit)

    def stage_input(self, stage: Stage, mb: int) -> torch.Tensor:
        s = stage.index
        if self.s._is_first(s):
            return self.inputs[mb]
        return self.read(("act", s - 1, mb))

    def run_units(self, stage: Stage, x: torch.Tensor, stash: _Stash, q: str, graph: bool) -> Generator[None, None, torch.Tensor]:
        """The forward, unit by unit: each unit's partial output is
        all-reduced asynchronously while the other pass of a braid runs."""
        needs_input_grad = graph and not self.s._is_first(stage.index)
        for j, unit in enumerate(stage.units):
            leaf = x.detach().requires_grad_(graph and (j > 0 or needs_input_grad))
            self.note("compute", q, j)
            with torch.set_grad_enabled(graph):
                partial = unit(leaf)
            total = partial.detach().clone() if self.s.tp_group is not None else partial.detach()
            work = self.all_reduce(total, q, j)
            if graph:
                stash.inputs.append(leaf)
                stash.partials.append(partial)
                stash.out_grads.append(None)
            yield
            self.finish(work, q, j, f"the tensor-parallel all-reduce of stage {stage.index} unit {j}")
            x = leaf.detach() + total if stage.residual else total
        return x

    def forward(self, stage: Stage, mb: int) -> Generator[None, None, None]:
        s = stage.index
        x = self.stage_input(stage, mb)
        stash = _Stash()
        checkpointed = (s, mb) in self.s._recomputed
        if checkpointed:
            stash.checkpoint = x
            stash.rng = torch.get_rng_state()
        y = yield from self.run_units(stage, x, stash, f"F s{s} mb{mb}", graph=not checkpointed)
        self.buffers[("act", s, mb)] = y
        if self.s._is_last(s):
            self.outputs[mb] = y
            loss = self.loss(stash, y, mb, graph=not checkpointed)
            self.losses[mb] = loss.detach()
        self.buffers[("stash", s, mb)] = stash

    def loss(self, stash: _Stash, y: torch.Tensor, mb: int, graph: bool) -> torch.Tensor:
        leaf = y.detach().requires_grad_(graph)
        with torch.set_grad_enabled(graph):
            loss = self.s.loss_fn(leaf, self.targets[mb])
        stash.output, stash.loss = leaf, loss * self.scale
        return loss

    def recompute(self, stage: Stage, mb: int) -> Generator[None, None, None]:
        stash: _Stash = self.buffers[("stash", stage.index, mb)]
        assert stash.checkpoint is not None
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(stash.rng)
            q = f"R s{stage.index} mb{mb}"
            y = yield from self.run_units(stage, stash.checkpoint, stash, q, graph=True)
        stash.checkpoint = None
        if self.s._is_last(stage.index):
            self.loss(stash, y, mb, graph=True)

    def output_grad(self, stage: Stage, mb: int, stash: _Stash) -> torch.Tensor:
        if self.s._is_last(stage.index):
            assert stash.loss is not None and stash.output is not None
            (g,) = torch.autograd.grad(stash.loss, stash.output)
            return g
        return self.read(("grad", stage.index + 1, mb))

    def input_grads(self, stage: Stage, mb: int, stash: _Stash, q: str, weights: bool) -> Generator[None, None, None]:
        """Backward through the units, last first: each unit's input
        gradient (all-reduced, plus the residual's), and with `weights`
        its weight gradient too, while the all-reduce is in flight."""
        g = self.output_grad(stage, mb, stash)
        first = self.s._is_first(stage.index)
        for j in reversed(range(len(stage.units))):
            stash.out_grads[j] = g
            leaf, partial = stash.inputs[j], stash.partials[j]
            params = [p for p in stage.units[j].parameters() if p.requires_grad]
            work, gx = None, None
            self.note("compute", q, j)
            if j > 0 or not first:
                (gx,) = torch.autograd.grad(partial, leaf, g, retain_graph=True)
                work = self.all_reduce(gx, q, j)
            yield  # dgrad
            if weights:
                if params:
                    torch.autograd.backward(partial, g, inputs=params)
                yield  # wgrad
            what = f"the tensor-parallel all-reduce of stage {stage.index} unit {j}'s input gradient"
            self.finish(work, q, j, what)
            if gx is not None:
                g = gx + g if stage.residual else gx
        if not first:
            self.buffers[("grad", stage.index, mb)] = g

    def backward_input(self, stage: Stage, mb: int) -> Generator[None, None, None]:
        stash: _Stash = self.buffers[("stash", stage.index, mb)]
        yield from self.input_grads(stage, mb, stash, f"B s{stage.index} mb{mb}", weights=False)

    def backward_full(self, stage: Stage, mb: int) -> Generator[None, None, None]:
        stash: _Stash = self.buffers[("stash", stage.index, mb)]
        yield from self.input_grads(stage, mb, stash, f"BW s{stage.index} mb{mb}", weights=True)
        stash.inputs, stash.partials, stash.out_grads = [], [], []

    def backward_weight(self, stage: Stage, mb: int) -> Generator[None, None, None]:
        stash: _Stash = self.buffers[("stash", stage.index, mb)]
        for j in reversed(range(len(stage.units))):
            params = [p for p in stage.units[j].parameters() if p.requires_grad]
            self.note("compute", f"W s{stage.index} mb{mb}", j)
            if params:
                torch.autograd.backward(stash.partials[j], stash.out_grads[j], inputs=params)
            yield  # wgrad
        stash.inputs, stash.partials, stash.out_grads = [], [], []

    # -- several pipelines --------------------------------------------------

    def reduce(self, stages: Iterable[int]) -> None:
        """Every copy of the part ends with the sum of all copies'
        gradients (summed here, then across the copies' owners)."""
        stages = tuple(stages)
        mine = [self.s.stages[s] for s in stages if s in self.s.stages]
        copies = [list(s.module.parameters()) for s in mine]
        owners = tuple(sorted({self.s.program.placement[s] for s in stages}))
        for params in zip(*copies):
            total = sum(_grad_or_zeros(p) for p in params)
            if len(owners) > 1:
                work = dist.all_reduce(total, group=self.s._reduce_groups[owners], async_op=True)
                self.wait(work, f"the gradient reduction of stages {list(stages)}")
            for p in params:
                p.grad = total.clone()


def _grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    return p.grad.clone() if p.grad is not None else torch.zeros_like(p)
