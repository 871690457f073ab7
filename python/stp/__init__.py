"""stp: pipeline-parallel schedules, checked and compiled.

The stp compiler runs in-process (a native module built from the same
Rust crates as `stpc`)::

    import stp

    program = stp.compile("zb-v", p=4, m=8)          # a standard schedule
    program.ranks[0].instructions[:3]                # per-rank streams
    stp.simulate(program).makespan                   # under its cost model

    stp.compile(open("mine.sched").read(), p=4, m=8) # or your own source
    stp.compile("mine.sched", p=4, m=8)              # or its path

A schedule the checker refuses raises `stp.CompileError`, whose `report`
is the same text `stpc` prints, and whose `code`, `line` and `column`
say what and where. See the book's chapter "Python" for the whole API,
and `stp.torch` (chapter "Training with PyTorch") to train your own
PyTorch model with a program.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from . import _stp
from .ir import (
    Buffer,
    Compute,
    Free,
    Group,
    Instruction,
    Pass,
    Program,
    Rank,
    Reduce,
    Transfer,
    Unit,
)

__version__ = _stp.version()

__all__ = [
    "compile",
    "check",
    "simulate",
    "verify",
    "standard_schedules",
    "explain",
    "torch_csv",
    "TorchCsv",
    "StpError",
    "CompileError",
    "VerifyError",
    "CostError",
    "SimulationError",
    "Diagnostic",
    "CheckReport",
    "Timeline",
    "RankTimes",
    "Program",
    "Rank",
    "Compute",
    "Group",
    "Transfer",
    "Free",
    "Reduce",
    "Pass",
    "Unit",
    "Buffer",
    "Instruction",
]


@dataclass(frozen=True)
class Diagnostic:
    """One compiler error: its stable `code` (`stp.explain(code)` or
    `stpc explain` describes it), a one-sentence `message`, where it
    points (`file`, 1-based `line` and `column`; `None` when it has no
    place in the source), and context `notes` and `help`."""

    code: str
    title: str
    message: str
    file: str
    line: Optional[int]
    column: Optional[int]
    notes: Tuple[str, ...]
    help: Optional[str]

    def __str__(self) -> str:
        at = f"{self.file}:{self.line}:{self.column}: " if self.line is not None else f"{self.file}: "
        return f"{at}{self.code}: {self.message}"


class StpError(Exception):
    """Base of every error stp raises for bad input. `report` is the
    full text (what `stpc` would print)."""

    def __init__(self, message: str, report: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.report = report or message

    def __str__(self) -> str:
        return self.report


class CompileError(StpError):
    """The schedule was refused: a syntax, type, dependency, memory or
    deadlock error. `diagnostics` lists every error found; `code`,
    `file`, `line` and `column` are the first one's."""

    def __init__(self, message: str, report: str, diagnostics: List[Diagnostic]) -> None:
        super().__init__(message, report)
        self.diagnostics = diagnostics
        first = diagnostics[0] if diagnostics else None
        self.code: Optional[str] = first.code if first else None
        self.file: Optional[str] = first.file if first else None
        self.line: Optional[int] = first.line if first else None
        self.column: Optional[int] = first.column if first else None


class VerifyError(StpError):
    """A program (read from JSON) is not a valid stp program."""


class CostError(StpError, ValueError):
    """A cost model that is malformed or does not fit the program (one
    entry per stage, or per part with several pipelines; times from 0)."""


class SimulationError(StpError):
    """A program cannot be timed (it deadlocks under the semantics asked for)."""


def _raise(error: Mapping[str, Any]) -> None:
    kind, message, report = error["kind"], error["message"], error["report"]
    if kind == "compile":
        diagnostics = [
            Diagnostic(
                code=d["code"],
                title=d["title"],
                message=d["message"],
                file=d["file"],
                line=d["line"],
                column=d["column"],
                notes=tuple(d["notes"]),
                help=d["help"],
            )
            for d in error["diagnostics"]
        ]
        raise CompileError(message, report, diagnostics)
    if kind == "verify":
        raise VerifyError(message, report)
    if kind == "schedule":
        raise StpError(message, report)
    if kind == "cost":
        raise CostError(message, report)
    raise SimulationError(message, report)


def _answer(raw: str) -> Dict[str, Any]:
    answer = json.loads(raw)
    if not answer["ok"]:
        _raise(answer["error"])
    return answer


def _schedule_source(schedule: str) -> Dict[str, str]:
    """Where the schedule comes from. A string holding `{` is schedule
    source; otherwise an existing file (or a path ending in `.sched`) is a
    file; otherwise it is a standard schedule's name."""
    if not isinstance(schedule, str):
        raise TypeError(f"schedule must be a str (source, a path or a standard name), not {type(schedule).__name__}")
    if "{" in schedule:
        return {"source": schedule, "file_name": "<string>"}
    if os.path.isfile(schedule) or schedule.endswith(".sched"):
        try:
            with open(schedule, encoding="utf-8") as f:
                return {"source": f.read(), "file_name": schedule}
        except OSError as e:
            raise StpError(f"cannot read {schedule}: {e.strerror}") from None
    return {"name": schedule}


def _cost(cost: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    if cost is None:
        return None
    if not isinstance(cost, Mapping):
        raise TypeError("cost must be a dict in the form `stpc --cost` reads, e.g. {'forward': 1, 'backward_input': 2}")
    return dict(cost)


_I64 = range(-(2**63), 2**63)


def _fits(name: str, value: int, values: range = _I64) -> int:
    if value not in values:
        raise ValueError(f"{name} = {value} is out of range ({values.start} to {values.stop - 1})")
    return value


def _int_items(name: str, values: Optional[Mapping[str, int]]) -> List[Tuple[str, int]]:
    items = list((values or {}).items())
    for key, value in items:
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} maps names to integers; got {key!r}: {value!r}")
        _fits(f"{name}[{key!r}]", value)
    return items


def _request(
    schedule: str,
    p: Optional[int],
    m: Optional[int],
    v: Optional[int],
    params: Optional[Mapping[str, int]],
    memory: Optional[Mapping[str, int]],
    cost: Optional[Mapping[str, Any]],
    tp: int,
    sequence_parallel: bool,
    comm: str,
    solver: str,
    solver_effort: float,
    schedule_name: Optional[str],
    max_ops: Optional[int],
    hoist: bool,
) -> str:
    limits = {"tp": range(1, 2**32), "max_ops": range(0, 2**63)}
    for name, value in (("p", p), ("m", m), ("v", v), ("tp", tp), ("max_ops", max_ops)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if value is not None:
            _fits(name, value, limits.get(name, _I64))
    request: Dict[str, Any] = dict(_schedule_source(schedule))
    request.update(
        schedule=schedule_name,
        p=p,
        m=m,
        v=v,
        params=_int_items("params", params),
        memory=_int_items("memory", memory),
        cost=_cost(cost),
        tp=tp,
        sequence_parallel=bool(sequence_parallel),
        comm=comm,
        solver=solver,
        solver_effort=float(solver_effort),
        max_ops=max_ops,
        hoist=bool(hoist),
    )
    return json.dumps(request)


def compile(
    schedule: str,
    *,
    p: Optional[int] = None,
    m: Optional[int] = None,
    v: Optional[int] = None,
    params: Optional[Mapping[str, int]] = None,
    memory: Optional[Mapping[str, int]] = None,
    cost: Optional[Mapping[str, Any]] = None,
    tp: int = 1,
    sequence_parallel: bool = False,
    comm: str = "rendezvous",
    solver: str = "greedy",
    solver_effort: float = 10.0,
    schedule_name: Optional[str] = None,
    max_ops: Optional[int] = None,
    hoist: bool = True,
) -> Program:
    """Checks and compiles a schedule to per-rank instruction streams.

    `schedule` is schedule source (any string holding `{`), a path to a
    `.sched` file, or a standard schedule's name (`stp.standard_schedules()`).
    `p`, `m` and `v` set the parameters of kind `ranks`, `microbatches`
    and `chunks`; `params` any parameter by name; `memory` overrides
    settings of the `memory { ... }` block (`{"budget": 8}`). `cost` is a
    cost model in the JSON form `stpc --cost` reads; an `auto` schedule is
    ordered for it, and the program is timed with it by default. `tp` is
    the tensor-parallel group behind each pipeline rank. `comm` is the
    send semantics the program must not deadlock under (`"rendezvous"`,
    as NCCL, or `"buffered"`). `solver` orders `auto` schedules
    (`"greedy"`, or `"smt"` with `solver_effort` reference seconds of
    deterministic work). `hoist=False` posts every receive right before
    its use, as PyTorch's runtime does.

    Raises `CompileError` when the checker refuses the schedule.
    """
    answer = _answer(
        _stp.compile(
            _request(
                schedule, p, m, v, params, memory, cost, tp, sequence_parallel, comm, solver, solver_effort,
                schedule_name, max_ops, hoist,
            )
        )
    )
    return Program._from_ir(
        answer["program"],
        cost=answer["cost"],
        peaks=tuple(answer["peaks"]),
        notes=tuple(answer["notes"]),
        plan=answer["plan"],
        lower_bound=answer["lower_bound"],
    )


@dataclass(frozen=True)
class CheckReport:
    """What the checker proved about one instance: every pass runs once,
    in dependency order, within the memory budget, without deadlock."""

    schedule: str
    params: Dict[str, int]
    ranks: int
    stages: int
    microbatches: int
    ops: int
    peaks: Tuple[int, ...]
    notes: Tuple[str, ...]

    def __str__(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in self.params.items())
        return (
            f"ok: {self.schedule} ({args}): {self.ranks} ranks, {self.stages} stages, "
            f"{self.microbatches} microbatches, {self.ops} ops"
        )


def check(schedule: str, **options: Any) -> CheckReport:
    """Checks a schedule as `stpc check` does and says what it proved;
    takes the keyword arguments of `compile`. Raises `CompileError`."""
    program = compile(schedule, **options)
    ops = sum(1 for r in program.ranks for i in r.instructions if isinstance(i, Compute))
    return CheckReport(
        schedule=program.name,
        params=dict(program.params),
        ranks=program.num_ranks,
        stages=program.num_stages,
        microbatches=program.num_microbatches,
        ops=ops,
        peaks=program.peaks,
        notes=program.notes,
    )


@dataclass(frozen=True)
class RankTimes:
    """One rank's share of a simulated step."""

    rank: int
    busy: float
    idle: float
    bubble: float
    exposed_comm: float


@dataclass(frozen=True)
class Timeline:
    """A simulated step: its `makespan`, bubble ratio, the cost model it
    was timed with, each rank's times, and the program's lower bound
    under that cost model (when known)."""

    makespan: float
    bubble_ratio: float
    microbatches: int
    cost: Dict[str, Any]
    ranks: Tuple[RankTimes, ...]
    lower_bound: Optional[float]

    @property
    def throughput(self) -> float:
        """Microbatches per time unit."""
        return self.microbatches / self.makespan if self.makespan else 0.0


def simulate(
    target: Union[str, Program],
    *,
    cost: Optional[Mapping[str, Any]] = None,
    comm: str = "rendezvous",
    **compile_options: Any,
) -> Timeline:
    """Simulates one step with the timed simulator `stpc simulate` uses.

    `target` is a compiled `Program`, or a schedule (compiled first with
    `compile_options`; an `auto` schedule is then ordered for `cost`).
    `cost` defaults to the program's own. Raises `CompileError`,
    `VerifyError` or `SimulationError`.
    """
    if isinstance(target, Program):
        if compile_options:
            raise TypeError(f"options {sorted(compile_options)} apply to a schedule, not a compiled Program")
        program = target
    else:
        program = compile(target, cost=cost, comm=comm, **compile_options)
    timing = _cost(cost) if cost is not None else program.cost
    answer = _answer(_stp.simulate(json.dumps({"program": json.loads(program.to_json()), "cost": timing, "comm": comm})))
    # The program's bound holds for the cost model it was compiled with.
    same_cost = cost is None or not isinstance(target, Program)
    return Timeline(
        makespan=answer["makespan"],
        bubble_ratio=answer["bubble_ratio"],
        microbatches=program.num_microbatches,
        cost=answer["cost"],
        ranks=tuple(RankTimes(**r) for r in answer["ranks"]),
        lower_bound=program.lower_bound if same_cost else None,
    )


def verify_json(text: str) -> Dict[str, Any]:
    """Reads and verifies a program in the IR's JSON form; returns the
    IR as a dict. Raises `VerifyError`."""
    return _answer(_stp.verify(text))["program"]


def verify(program: Union[Program, str]) -> None:
    """Checks a program (a `Program` or its JSON text) against every
    invariant of the IR (the book's "What verify guarantees"); raises
    `VerifyError` with the first violation."""
    verify_json(program.to_json() if isinstance(program, Program) else program)


def standard_schedules() -> Dict[str, str]:
    """The standard schedules: name -> one-line summary."""
    return {s["name"]: s["summary"] for s in json.loads(_stp.standard_schedules())}


def explain(code: str) -> str:
    """What an error code (`"E0018"`) means and how to fix it."""
    text = _stp.explain(code)
    if text is None:
        raise ValueError(f"{code!r} is not an stp error code")
    return text


@dataclass(frozen=True)
class TorchCsv:
    """A program as `torch.distributed.pipelining`'s schedule CSV: `text`
    (one row per rank) and `notes` on what the format could not hold."""

    text: str
    notes: Tuple[str, ...]

    def write(self, path: str) -> None:
        """Writes `text` to `path` atomically (a temporary file renamed)."""
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.text)
        os.replace(tmp, path)


def torch_csv(program: Union[Program, str], comms: bool = False) -> TorchCsv:
    """The CSV `stpc export --format torch-csv` writes (`comms=True`: with
    its transfers, the `compute_comms` form), for PyTorch's
    `_PipelineScheduleRuntime._load_csv`. Raises `StpError` for a program
    of several pipelines, which the format cannot express."""
    text = program.to_json() if isinstance(program, Program) else program
    answer = _answer(_stp.torch_csv(text, bool(comms)))
    return TorchCsv(answer["csv"], tuple(answer["notes"]))
