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

    `module` holds the stage's parameters. Without `units`, `module(*xs)`
    is the stage's forward: it takes the previous stage's outputs (or the
    microbatch's inputs), one tensor or several, and returns one tensor
    or a tuple of them — an attention mask or position ids may travel
    beside the hidden states; gradients flow back through the
    floating-point ones. With `units` (submodules of `module`, in
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
        # The whole module is the forward (any number of tensors in and
        # out), rather than units on one tensor.
        self.whole = units is None
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
    """`stash.s.i`: the input leaves the backward differentiates, the
    graph's roots (`partials`) and, once `B` ran, the gradient it found
    for each root (`out_grads[k]` for `partials[k]`; None where none
    flows), which `W` needs. With units a root is a unit's partial output
    and each unit has one leaf; without, the roots are the stage's
    outputs. With recompute, only the stage's inputs until `R`."""

    checkpoint: Optional[Tuple[torch.Tensor, ...]] = None
    rng: Optional[Any] = None
    inputs: List[torch.Tensor] = field(default_factory=list)
    partials: List[torch.Tensor] = field(default_factory=list)
    out_grads: List[Optional[torch.Tensor]] = field(default_factory=list)
    output: Optional[Tuple[torch.Tensor, ...]] = None  # the last stage's output leaves
    loss: Optional[torch.Tensor] = None  # the last stage's scaled loss


_Key = Tuple[str, int, int]  # (kind, stage, microbatch)


def _rooted(stash: _Stash) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The (root, gradient) pairs of `stash` a backward runs from."""
    return [(y, g) for y, g in zip(stash.partials, stash.out_grads) if g is not None]


def _key(buffer: Any) -> _Key:
    return (buffer.kind, buffer.stage, buffer.microbatch)


def _name(key: _Key) -> str:
    return f"{key[0]}.s{key[1]}.mb{key[2]}"


@dataclass
class _Pending:
    """A receive in flight: the tensors it fills and their work handles."""

    tensors: Tuple[torch.Tensor, ...]
    works: List[Any]
    what: str


_Meta = List[Tuple[Tuple[int, ...], str]]  # per tensor: (shape, dtype name)


def _as_tuple(value: Any) -> Tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _floating(meta: _Meta) -> _Meta:
    """The tensors gradients flow through: the floating-point ones."""
    return [(shape, dtype) for shape, dtype in meta if getattr(torch, dtype).is_floating_point]


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
        if any(
            isinstance(i, Compute) and any(u.collective == "reduce-scatter-all-gather" for u in i.units)
            for r in p.ranks
            for i in r.instructions
        ):
            return "stp.torch does not run sequence-parallel programs (rs-ag units) yet: compile without sequence_parallel"
        if self.world != p.num_ranks * p.tp:
            return (
                f"the program has {p.num_ranks} pipeline ranks x tp {p.tp} = {p.num_ranks * p.tp} processes, "
                f"but the process group has {self.world}"
            )
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

    def _process(self, pipeline_rank: int, tp_rank: int) -> int:
        """The global rank of a process (the job's group may be a subgroup)."""
        rank = pipeline_rank * self.tp + tp_rank
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _global(self, pipeline_rank: int) -> int:
        return self._process(pipeline_rank, self.tp_rank)

    @staticmethod
    def _new_group(members: List[int]) -> Any:
        # Only the members take part, so a job's group may be a subgroup.
        return dist.new_group(sorted(members), use_local_synchronization=True)

    def _make_tp_groups(self) -> Optional[Any]:
        if self.tp == 1:
            return None
        return self._new_group([self._process(self.pipeline_rank, t) for t in range(self.tp)])

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
        return {
            owners: self._new_group([self._process(o, self.tp_rank) for o in owners])
            for owners in self._reduce_owner_sets()
            if self.pipeline_rank in owners
        }

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
                f"learning stage {s}'s output shape from process {self._process(owner, 0)}",
                lambda: dist.broadcast_object_list(answer, src=self._process(owner, 0), group=self.group),
            )
            kind, value = answer[0]
            if kind == "error":
                raise ScheduleError(value)
            meta[f"in{s}"], meta[f"out{s}"] = value
        return meta

    def _try_stage(self, s: int, meta: Dict[str, _Meta], inputs, targets, m: int) -> Tuple[str, Any]:
        stage = self.stages[s]
        xs: Optional[Tuple[torch.Tensor, ...]] = None
        try:
            if self._is_first(s):
                mb = next((i for i in range(m) if self._route(i) == s // self.parts), None)
                if mb is None:
                    return ("ok", ([], []))
                if mb not in inputs:
                    return ("error", f"stage {s} is a first stage, but its owner (process {self.global_rank}) got no inputs")
                xs = inputs[mb]
            elif not meta[f"out{s - 1}"]:
                return ("ok", ([], []))  # a pipeline no microbatch takes
            else:
                xs = tuple(
                    torch.zeros(shape, dtype=getattr(torch, dtype), device=self.device) for shape, dtype in meta[f"out{s - 1}"]
                )
            with torch.no_grad():
                ys = self._forward_values(stage, xs)
                if isinstance(ys, str):
                    return ("error", ys)
                if self._is_last(s):
                    mb = next(i for i in range(m) if self._route(i) == s // self.parts)
                    if mb not in targets:
                        return ("error", f"stage {s} is a last stage, but its owner (process {self.global_rank}) got no target")
                    loss = self.loss_fn(ys[0] if len(ys) == 1 else ys, _single(targets[mb]))
                    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                        return ("error", f"loss_fn on stage {s}'s output must return one number, not {loss!r}")
            return ("ok", ([(tuple(x.shape), _dtype(x)) for x in xs], [(tuple(y.shape), _dtype(y)) for y in ys]))
        except Exception as e:  # the user's module failed on this shape
            where = "its input" if self._is_first(s) else f"stage {s - 1}'s output"
            shape = ", ".join(str(tuple(x.shape)) for x in xs) if xs is not None else "unknown"
            return ("error", f"stage {s} (on process {self.global_rank}) fails on {where}, shape {shape}: {e}")

    def _forward_values(self, stage: Stage, xs: Tuple[torch.Tensor, ...]) -> Union[Tuple[torch.Tensor, ...], str]:
        """The stage's outputs as a tuple, or what is wrong with them."""
        if stage.whole:
            ys = _as_tuple(stage.module(*xs))
        elif len(xs) != 1:
            return f"stage {stage.index} runs as units, which take one tensor, but gets {len(xs)}"
        else:
            x = xs[0]
            for unit in stage.units:
                y = unit(x)
                x = x + y if stage.residual else y
            ys = (x,)
        bad = [type(y).__name__ for y in ys if not isinstance(y, torch.Tensor)]
        if bad or not ys:
            return f"stage {stage.index} returned {', '.join(bad) or 'nothing'}; stages pass tensors (one, or a tuple)"
        return ys

    # -- one step -----------------------------------------------------------

    def step(
        self,
        inputs: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
        *,
        target: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
        losses: Optional[List[torch.Tensor]] = None,
    ) -> Optional[Union[torch.Tensor, Tuple[torch.Tensor, ...]]]:
        """Runs one training step: the whole batch `inputs` (one tensor, or
        a tuple the first stage takes as its arguments; on the owners of
        first stages) is cut into the program's m microbatches along
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
        ordered = [run.outputs[i] for i in sorted(run.outputs)]
        merged = tuple(torch.cat(parts) for parts in zip(*ordered))
        return merged[0] if len(merged) == 1 else merged

    def _split(self, what: str, batch: Any, m: int) -> Union[Dict[int, Tuple[torch.Tensor, ...]], str]:
        """Microbatch i's tensors: each of `batch`'s cut into m along dimension 0."""
        if batch is None:
            return {}
        tensors = _as_tuple(batch)
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            return f"{what} must be a tensor or a tuple of tensors, not {type(batch).__name__}"
        for t in tensors:
            if t.dim() == 0 or t.shape[0] % m != 0:
                rows = t.shape[0] if t.dim() else "no"
                return f"{what} has {rows} rows, which do not divide into the program's {m} microbatches"
        cut = [torch.chunk(t, m) for t in tensors]
        return {i: tuple(c[i] for c in cut) for i in range(m)}

    def _stream(self, k: int) -> Any:
        if self._streams is None:
            self._streams = [torch.cuda.Stream(device=self.device) for _ in range(2)]
        return self._streams[k]


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _single(value: Tuple[Any, ...]) -> Any:
    """A microbatch's target as `loss_fn` gets it: the tensor, or the tuple."""
    return value[0] if len(value) == 1 else value


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
        """What a buffer holds: a stage's outputs, or the gradients of its
        floating-point inputs."""
        kind, stage, _ = key
        assert self.s._meta is not None
        return self.s._meta[f"out{stage}"] if kind == "act" else _floating(self.s._meta[f"in{stage}"])

    def post(self, group: Group) -> None:
        """One `batch_isend_irecv` for the group; a buffer of several
        tensors is several operations, in order, on both sides."""
        ops, made = [], []
        for t in group.transfers:
            key = _key(t.buffer)
            peer = self.s._global(t.peer)
            if t.direction == "send":
                tensors = tuple(x.contiguous() for x in self.read(key))
                ops.extend(dist.P2POp(dist.isend, x, peer, group=self.s.group) for x in tensors)
                made.append((key, None, len(tensors), f"send {_name(key)} to pipeline rank {t.peer}"))
            else:
                tensors = tuple(
                    torch.empty(shape, dtype=getattr(torch, dtype), device=self.s.device) for shape, dtype in self.shape_of(key)
                )
                ops.extend(dist.P2POp(dist.irecv, x, peer, group=self.s.group) for x in tensors)
                made.append((key, tensors, len(tensors), f"recv {_name(key)} from pipeline rank {t.peer}"))
        try:
            works = dist.batch_isend_irecv(ops) if ops else []
        except Exception as e:
            raise PeerError(f"process {self.s.global_rank}, at {self.at}, posting a group of transfers: {e}") from e
        at = 0
        for key, tensors, n, what in made:
            mine, at = works[at : at + n], at + n
            if tensors is None:
                self.sends.setdefault(key, []).extend((work, what) for work in mine)
            else:
                self.buffers[key] = _Pending(tensors, mine, what)

    def read(self, key: _Key) -> Any:
        value = self.buffers[key]
        if isinstance(value, _Pending):
            for work in value.works:
                self.wait(work, value.what)
            value = self.buffers[key] = value.tensors
        return value

    def wait_sends(self, key: _Key) -> None:
        for work, what in self.sends.pop(key, []):
            self.wait(work, what)

    def free(self, key: _Key) -> None:
        self.wait_sends(key)
        value = self.buffers.pop(key)
        if isinstance(value, _Pending):
            for work in value.works:
                self.wait(work, value.what)

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

    def stage_input(self, stage: Stage, mb: int) -> Tuple[torch.Tensor, ...]:
        s = stage.index
        if self.s._is_first(s):
            return self.inputs[mb]
        return self.read(("act", s - 1, mb))

    def run_whole(self, stage: Stage, xs: Tuple[torch.Tensor, ...], stash: _Stash, graph: bool) -> Tuple[torch.Tensor, ...]:
        """The forward of a stage without units: `module(*xs)`. Its
        floating-point inputs are leaves the backward differentiates."""
        grads_in = graph and not self.s._is_first(stage.index)
        leaves = tuple(x.detach().requires_grad_(grads_in and x.is_floating_point()) for x in xs)
        with torch.set_grad_enabled(graph):
            outputs = _as_tuple(stage.module(*leaves))
        if graph:
            stash.inputs, stash.partials = list(leaves), list(outputs)
        return tuple(y.detach() for y in outputs)

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

    def run_forward(
        self, stage: Stage, xs: Tuple[torch.Tensor, ...], stash: _Stash, q: str, graph: bool
    ) -> Generator[None, None, Tuple[torch.Tensor, ...]]:
        if stage.whole:
            return self.run_whole(stage, xs, stash, graph)
        y = yield from self.run_units(stage, xs[0], stash, q, graph)
        return (y,)

    def forward(self, stage: Stage, mb: int) -> Generator[None, None, None]:
        s = stage.index
        xs = self.stage_input(stage, mb)
        stash = _Stash()
        checkpointed = (s, mb) in self.s._recomputed
        if checkpointed:
            stash.checkpoint = xs
            stash.rng = torch.get_rng_state()
        ys = yield from self.run_forward(stage, xs, stash, f"F s{s} mb{mb}", graph=not checkpointed)
        self.buffers[("act", s, mb)] = ys
        if self.s._is_last(s):
            self.outputs[mb] = ys
            loss = self.loss(stash, ys, mb, graph=not checkpointed)
            self.losses[mb] = loss.detach()
        self.buffers[("stash", s, mb)] = stash

    def loss(self, stash: _Stash, ys: Tuple[torch.Tensor, ...], mb: int, graph: bool) -> torch.Tensor:
        leaves = tuple(y.detach().requires_grad_(graph and y.is_floating_point()) for y in ys)
        with torch.set_grad_enabled(graph):
            loss = self.s.loss_fn(leaves[0] if len(leaves) == 1 else leaves, _single(self.targets[mb]))
        stash.output, stash.loss = leaves, loss * self.scale
        return loss

    def recompute(self, stage: Stage, mb: int) -> Generator[None, None, None]:
        stash: _Stash = self.buffers[("stash", stage.index, mb)]
        assert stash.checkpoint is not None
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(stash.rng)
            q = f"R s{stage.index} mb{mb}"
            ys = yield from self.run_forward(stage, stash.checkpoint, stash, q, graph=True)
        stash.checkpoint = None
        if self.s._is_last(stage.index):
            self.loss(stash, ys, mb, graph=True)

    def output_grads(self, stage: Stage, mb: int, stash: _Stash) -> List[Optional[torch.Tensor]]:
        """Per output of the stage, the loss's gradient (None where none
        flows: an integer output, or one the loss does not use)."""
        if self.s._is_last(stage.index):
            assert stash.loss is not None and stash.output is not None
            wanted = [y for y in stash.output if y.requires_grad]
            found = iter(torch.autograd.grad(stash.loss, wanted, allow_unused=True) if wanted else ())
            return [next(found) if y.requires_grad else None for y in stash.output]
        received = iter(self.read(("grad", stage.index + 1, mb)))
        meta = self.s._meta[f"out{stage.index}"] if self.s._meta else []
        return [next(received) if getattr(torch, dtype).is_floating_point else None for _, dtype in meta]

    def whole_backward(self, stage: Stage, mb: int, stash: _Stash, weights: bool) -> None:
        """A stage without units: its inputs' gradients (sent back for the
        floating-point ones) and, with `weights`, its weight gradients in
        the same backward; without, what `W` needs is kept."""
        grads = self.output_grads(stage, mb, stash)
        stash.out_grads = [g if y.requires_grad else None for y, g in zip(stash.partials, grads)]
        pairs = _rooted(stash)
        leaves = [x for x in stash.inputs if x.requires_grad]
        params = [p for p in stage.module.parameters() if p.requires_grad]
        roots, seeds = [y for y, _ in pairs], [g for _, g in pairs]
        found: Sequence[Optional[torch.Tensor]] = [None] * len(leaves)
        if roots and weights and (params or leaves):
            torch.autograd.backward(roots, seeds, inputs=params + leaves)
            found = [x.grad for x in leaves]
        elif roots and leaves:
            found = torch.autograd.grad(roots, leaves, seeds, retain_graph=True, allow_unused=True)
        if not self.s._is_first(stage.index):
            self.buffers[("grad", stage.index, mb)] = tuple(
                torch.zeros_like(x) if g is None else g for x, g in zip(leaves, found)
            )

    def input_grads(self, stage: Stage, mb: int, stash: _Stash, q: str, weights: bool) -> Generator[None, None, None]:
        """Backward through the units, last first: each unit's input
        gradient (all-reduced, plus the residual's), and with `weights`
        its weight gradient too, while the all-reduce is in flight."""
        if stage.whole:
            self.whole_backward(stage, mb, stash, weights)
            return
        (g,) = self.output_grads(stage, mb, stash)
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
            self.buffers[("grad", stage.index, mb)] = (g,)

    def backward_input(self, stage: Stage, mb: int) -> Generator[None, None, None]:
        stash: _Stash = self.buffers[("stash", stage.index, mb)]
        yield from self.input_grads(stage, mb, stash, f"B s{stage.index} mb{mb}", weights=False)

    def backward_full(self, stage: Stage, mb: int) -> Generator[None, None, None]:
        stash: _Stash = self.buffers[("stash", stage.index, mb)]
        yield from self.input_grads(stage, mb, stash, f"BW s{stage.index} mb{mb}", weights=True)
        stash.inputs, stash.partials, stash.out_grads = [], [], []

    def backward_weight(self, stage: Stage, mb: int) -> Generator[None, None, None]:
        stash: _Stash = self.buffers[("stash", stage.index, mb)]
        if stage.whole:
            params = [p for p in stage.module.parameters() if p.requires_grad]
            pairs = _rooted(stash)
            if params and pairs:
                roots, seeds = zip(*pairs)
                torch.autograd.backward(list(roots), list(seeds), inputs=params)
        else:
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
