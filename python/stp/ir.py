"""The stp IR as Python objects: a program is one instruction stream per rank.

These are plain, frozen dataclasses read from the IR's JSON form (the
book's chapter "The IR" defines every field). They carry no behaviour
beyond reading and printing; `stp.verify` checks a program.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

__all__ = [
    "Buffer",
    "Pass",
    "Unit",
    "Compute",
    "Transfer",
    "Group",
    "Free",
    "Reduce",
    "Instruction",
    "Rank",
    "Program",
]


@dataclass(frozen=True)
class Buffer:
    """A named tensor on a rank: `act.s0.mb1` (an activation stage 0
    sends forward), `grad.s1.mb0` (the gradient stage 1 sends back) or
    `stash.s0.mb1` (what a forward keeps for its backward)."""

    kind: str
    stage: int
    microbatch: int

    @staticmethod
    def parse(text: str) -> "Buffer":
        kind, stage, mb = text.split(".")
        return Buffer(kind, int(stage[1:]), int(mb[2:]))

    def __str__(self) -> str:
        return f"{self.kind}.s{self.stage}.mb{self.microbatch}"


@dataclass(frozen=True)
class Pass:
    """One pass of one microbatch through one stage. `kind` is `F`
    (forward), `B` (input gradient), `W` (weight gradient), `BW` (full
    backward) or `R` (recompute a forward's activations)."""

    kind: str
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind} s{self.stage} mb{self.microbatch}"


@dataclass(frozen=True)
class Unit:
    """With tensor parallelism: one sublayer of a pass (`attention`,
    `mlp`, `mlp-dgrad`, ...) and the collective it issues, if any."""

    pass_index: int
    part: str
    collective: Optional[str] = None


@dataclass(frozen=True)
class Compute:
    """Run one pass, or two braided passes (STP's `F & B`), on the
    rank's compute stream. `units` lists tensor-parallel sublayers in
    the order they run (empty without tensor parallelism)."""

    passes: Tuple[Pass, ...]
    units: Tuple[Unit, ...] = ()

    @property
    def braided(self) -> bool:
        return len(self.passes) == 2


@dataclass(frozen=True)
class Transfer:
    """A point-to-point send or receive of `buffer` with rank `peer`."""

    direction: str  # "send" or "recv"
    buffer: Buffer
    peer: int


@dataclass(frozen=True)
class Group:
    """Transfers posted together (one NCCL group / `batch_isend_irecv`).
    Each completes on its own, as soon as its partner is posted."""

    transfers: Tuple[Transfer, ...]


@dataclass(frozen=True)
class Free:
    """The buffer is dead: release it once earlier uses are done."""

    buffer: Buffer


@dataclass(frozen=True)
class Reduce:
    """With several pipelines: sum the weight gradients of the copies of
    one model part (the stages listed) across the ranks that hold them."""

    stages: Tuple[int, ...]


Instruction = Union[Compute, Group, Free, Reduce]


@dataclass(frozen=True)
class Rank:
    """One pipeline rank's instruction stream, in issue order."""

    rank: int
    instructions: Tuple[Instruction, ...]

    def passes(self) -> List[Pass]:
        """Every pass the rank runs, in order (a braid's forward first)."""
        return [p for i in self.instructions if isinstance(i, Compute) for p in i.passes]


def _instruction(raw: Dict[str, Any]) -> Instruction:
    if "compute" in raw:
        c = raw["compute"]
        passes = tuple(Pass(p["kind"], p["stage"], p["mb"]) for p in c["passes"])
        units = tuple(Unit(u["pass"], u["part"], u.get("collective")) for u in c.get("units", ()))
        return Compute(passes, units)
    if "comm" in raw:
        return Group(tuple(Transfer(t["dir"], Buffer.parse(t["buffer"]), t["peer"]) for t in raw["comm"]))
    if "free" in raw:
        return Free(Buffer.parse(raw["free"]["buffer"]))
    if "reduce" in raw:
        return Reduce(tuple(raw["reduce"]["stages"]))
    raise ValueError(f"unknown instruction {raw!r}")


@dataclass(frozen=True)
class Program:
    """A checked, lowered schedule: what `stp.compile` returns.

    `ranks[r].instructions` is rank r's stream. `cost` is the cost model
    the program is timed with by default (the schedule's `cost { ... }`
    block, or the one given to `compile`), `peaks` each rank's peak
    activation memory in the schedule's units, `notes` what the compiler
    said (for `auto` schedules: which order it kept), and `lower_bound`
    the makespan no order of these passes can beat under `cost`.
    """

    name: str
    params: Dict[str, int]
    num_ranks: int
    num_stages: int
    num_microbatches: int
    placement: Tuple[int, ...]
    pipelines: int
    routes: Tuple[int, ...]
    tp: int
    ranks: Tuple[Rank, ...]
    cost: Dict[str, Any] = field(default_factory=dict, compare=False)
    peaks: Tuple[int, ...] = field(default=(), compare=False)
    notes: Tuple[str, ...] = field(default=(), compare=False)
    plan: Optional[Dict[str, Any]] = field(default=None, compare=False)
    lower_bound: Optional[float] = field(default=None, compare=False)
    _json: str = field(default="", repr=False, compare=False)

    @staticmethod
    def _from_ir(ir: Dict[str, Any], **extra: Any) -> "Program":
        meta = ir["schedule"]
        ranks = tuple(Rank(r["rank"], tuple(_instruction(i) for i in r["instrs"])) for r in ir["ranks"])
        return Program(
            name=meta["name"],
            params={p["name"]: p["value"] for p in meta["params"]},
            num_ranks=meta["num_ranks"],
            num_stages=meta["num_stages"],
            num_microbatches=meta["num_microbatches"],
            placement=tuple(meta["placement"]),
            pipelines=meta.get("pipelines", 1),
            routes=tuple(meta.get("routes", ())),
            tp=meta.get("tp", 1),
            ranks=ranks,
            _json=json.dumps(ir),
            **extra,
        )

    def to_json(self, compact: bool = False) -> str:
        """The program in the IR's JSON form (`stpc compile` writes the
        same; `stp-exec run` and `stp.Program.from_json` read it). With
        `compact`, format version 2 (`stpc compile --emit compact`): each
        rank's instructions as one array of integers, about a fifth of
        the size, read by the same readers."""
        if not compact:
            return self._json
        from . import _answer, _stp

        return _answer(_stp.compact_json(self._json))["json"]

    @staticmethod
    def from_json(text: str) -> "Program":
        """Reads a program in the IR's JSON form, verified (raises
        `stp.VerifyError` if it is not a valid program)."""
        from . import verify_json

        return Program._from_ir(verify_json(text))

    def owner(self, stage: int) -> int:
        """The rank that holds `stage`."""
        return self.placement[stage]

    def __str__(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name} ({args}): {self.num_ranks} ranks, {self.num_stages} stages"
