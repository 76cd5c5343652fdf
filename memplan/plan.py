"""Plan: pure data saying which segments a compiled module checkpoints, and what that should cost.

Every planner (memplan.planners) returns one; it round-trips through JSON and is checked against
the graph it is applied to (:func:`check_plan`).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .costmodel import CostArrays, block_cost
from .errors import MemplanError, PlanMismatchError
from .graph import MemGraph
from .options import Amp, PlanOptions, amp_text, check_amp_mode
from .planfile import check_step_fields, validate_against_graph, validate_plan_dict
from .segtable import segment_rows
from .units import format_bytes

PLAN_FORMAT = 1
#: Plans written before the seed was a field of each REV record carried it in a note.
_OLD_SEED_NOTE = re.compile(r"^REV seed=(\d+)$")


@dataclass(frozen=True)
class Segment:
    """One block of the chain: its nodes, the outputs it keeps for later blocks, recomputed or not."""
    index: int
    nodes: tuple[str, ...]
    kept: tuple[str, ...]
    recompute: bool
    kept_bytes: int
    flops: int
    rebuilt: tuple[str, ...] = ()    # inputs the segment's checkpoint does not hold (remat planner)
    rebuild: tuple[str, ...] = ()    # nodes re-run under no_grad to rebuild them when it is recomputed


@dataclass(frozen=True)
class RevReplacementRecord:
    """A pass REV replaced: which modules, and parameter counts before and after."""
    name: str
    replaced: tuple[str, ...]
    new_module: str
    params_before: int
    params_after: int
    free_input: bool = False     # the block frees its input after forward (rebuilt in backward)
    seed: int = 0                # seed of the fresh F/G weights


@dataclass(frozen=True)
class ConcatSplit:
    """A convolution over a channel concatenation split into one convolution per part (memplan.splitcat;
    opt-in, it rounds differently from the original): the nodes it replaced and the nodes it made."""
    conv: str
    concat: str
    channels: tuple[int, ...]    # channels of each part, in concatenation order
    convs: tuple[str, ...]       # the per-part convolution nodes
    output: str                  # the node whose value replaces the convolution's


@dataclass(frozen=True)
class Plan:
    """What to keep and what to recompute, with the predicted cost. Round-trips through JSON."""
    segments: tuple[Segment, ...]
    predicted_peak_bytes: int
    predicted_overhead: float            # recomputed FLOPs / forward FLOPs
    vanilla_peak_bytes: int              # cost-model peak of the unplanned step
    budget_bytes: int | None
    objective: str                       # "time-centric" (budget) or "memory-centric"
    method: str                          # "exact" or "approx"
    method_reason: str
    lower_set_count: int | None
    fingerprint: str
    optimizer: str
    static_bytes: int
    planning_time_s: float
    simulated_peak_bytes: int | None = None
    simulated_vanilla_peak_bytes: int | None = None
    rev: tuple[RevReplacementRecord, ...] = ()
    notes: tuple[str, ...] = ()
    amp: str | None = None               # autocast of the planned step: None (fp32), "bf16" or "fp16"
    keep_output: bool = True             # the step holds the model output through backward
    threads: int | None = None           # OpenMP threads the CPU scratch figures assume (None: unknown, old file)
    split_concat: tuple[ConcatSplit, ...] = ()   # convolutions over concatenations split (not bitwise)
    format: int = PLAN_FORMAT

    # -- JSON -------------------------------------------------------------------------------------
    def to_json(self, path: str | Path | None = None) -> str:
        """The plan as JSON text; also written to ``path`` when given."""
        text = json.dumps(asdict(self), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @staticmethod
    def from_json(text_or_path: str | Path) -> "Plan":
        """Read a plan from JSON text or a file path."""
        text = str(text_or_path)
        if not text.lstrip().startswith(("{", "[")):
            p = Path(text)
            try:
                text = p.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise MemplanError(f"plan file {str(p)[:200]} does not exist or cannot be read ({type(exc).__name__}); "
                                   "write one with Plan.to_json(path) or `memplan optimize ... --out plan.json`") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MemplanError(f"plan is not valid JSON ({exc}); regenerate it with `memplan optimize --out`") from exc
        validate_plan_dict(d, Plan)     # every field and its type, before anything reads it
        check_step_fields(d)            # amp, threads and the fingerprint's precision agree
        d["segments"] = tuple(Segment(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
                              for s in d["segments"])
        notes = tuple(d.get("notes", ()))
        old_seed = next((int(m.group(1)) for m in map(_OLD_SEED_NOTE.match, notes) if m), 0)
        d["rev"] = tuple(RevReplacementRecord(**{"seed": old_seed, **r, "replaced": tuple(r["replaced"])})
                         for r in d.get("rev", ()))
        d["notes"] = tuple(n for n in notes if not _OLD_SEED_NOTE.match(n))
        d["split_concat"] = tuple(ConcatSplit(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()})
                                  for r in d.get("split_concat", ()))
        return Plan(**d)

    # -- reading ----------------------------------------------------------------------------------
    @property
    def recomputed_segments(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.segments if s.recompute)

    def summary(self) -> str:
        """A readable table of the plan."""
        lines = [
            f"memplan plan ({self.objective}, {self.method} DP: {self.method_reason})",
            f"  lower sets: {self.lower_set_count if self.lower_set_count is not None else 'not enumerated'}"
            f"; graph {self.fingerprint}; optimizer {self.optimizer}; {amp_text(self.amp)}; planned in "
            f"{self.planning_time_s:.2f} s",
            f"  budget:          {format_bytes(self.budget_bytes) if self.budget_bytes else 'none (least memory)'}",
            f"  vanilla peak:    {format_bytes(self.vanilla_peak_bytes)} (cost model)",
            f"  planned peak:    {format_bytes(self.predicted_peak_bytes)} (cost model)",
        ]
        if self.simulated_peak_bytes is not None:
            err = (self.predicted_peak_bytes - self.simulated_peak_bytes) / self.simulated_peak_bytes
            lines.append(f"  simulated peak:  {format_bytes(self.simulated_peak_bytes)} "
                         f"(cost model {err:+.1%} vs simulation)")
        if self.simulated_vanilla_peak_bytes is not None:
            lines.append(f"  simulated vanilla: {format_bytes(self.simulated_vanilla_peak_bytes)}")
        lines.append(f"  overhead:        {self.predicted_overhead:.1%} of forward FLOPs recomputed")
        lines.append(f"  {'seg':>4} {'nodes':>5} {'mode':<10} {'kept':>10}  first .. last  (kept outputs)")
        for row in segment_rows(self.segments, self.rev):
            kept = ", ".join(row.kept[:3]) + (f" +{len(row.kept) - 3}" if len(row.kept) > 3 else "")
            lines.append(f"  {row.label:>4} {len(row.nodes):>5} {row.mode:<10} "
                         f"{format_bytes(row.kept_bytes):>10}  {row.nodes[0]} .. {row.nodes[-1]}  ({kept})")
        for r in self.rev:
            lines.append(f"  REV {r.name}: {', '.join(r.replaced)} -> {r.new_module} "
                         f"(params {r.params_before} -> {r.params_after})")
        for r in self.split_concat:
            lines.append(f"  split {r.conv}: conv over {r.concat} ({' + '.join(map(str, r.channels))} channels) -> "
                         f"{len(r.convs)} convolutions summed (not bitwise: rounds differently)")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


def _runs_of_stores(segments: tuple[Segment, ...]) -> list[list[Segment]]:
    """Segments grouped for display: each recomputed segment alone, consecutive stored ones together."""
    groups: list[list[Segment]] = []
    for s in segments:
        if groups and not s.recompute and not groups[-1][-1].recompute:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def chain_to_segments(graph: MemGraph, costs: CostArrays, chain: tuple[int, ...]) -> tuple[Segment, ...]:
    """Turn a chain of lower sets into Segments (graph order inside each)."""
    segments, prev = [], 0
    for i, cur in enumerate(chain):
        bc = block_cost(costs, prev, cur)
        block = cur & ~prev
        bnd = costs.boundary(cur) & block
        nodes = tuple(graph.names_of(block))
        segments.append(Segment(index=i, nodes=nodes, kept=tuple(graph.names_of(bnd)), recompute=bc.recompute,
                                kept_bytes=int(bc.keep_b), flops=int(sum(graph.info(n).flops for n in nodes))))
        prev = cur
    return tuple(segments)


def precision_fingerprint(graph_fingerprint: str, amp: Any) -> str:
    """A plan's fingerprint: the graph's hash, then ``+bf16``/``+fp16`` for an autocast step (a plan made
    for one precision keeps other tensors than one for another). Full precision adds nothing, so plans
    written before ``amp`` existed keep their fingerprint. The thread count is not part of it: it moves
    only the CPU scratch figures, never which plan is valid or what it computes (it is recorded in
    ``Plan.threads``).

    >>> precision_fingerprint("0123abcd", None), precision_fingerprint("0123abcd", "bf16")
    ('0123abcd', '0123abcd+bf16')
    """
    mode = check_amp_mode(amp)
    return graph_fingerprint if mode is None else f"{graph_fingerprint}+{mode.value}"


def graph_part(fingerprint: str) -> str:
    """The graph hash of a plan's fingerprint (without its precision suffix)."""
    return fingerprint.split("+", 1)[0]


def stamped(plan: Plan, options: PlanOptions) -> Plan:
    """``plan`` recording the step it was planned for: precision (in its fingerprint too), output
    lifetime and thread count. Idempotent."""
    amp = None if options.amp is None else options.amp.value
    return replace(plan, amp=amp, keep_output=options.keep_output, threads=options.threads,
                   fingerprint=precision_fingerprint(graph_part(plan.fingerprint), amp))


def check_plan(plan: Plan, graph: MemGraph, amp: Any = ...) -> None:
    """Raise PlanMismatchError unless ``plan`` was made for ``graph`` trained at precision ``amp`` (by
    default the plan's own: the precision is not checked) and is a chain of it (planfile.py)."""
    want = plan.amp if amp is ... else check_amp_mode(amp)
    want = None if want is None else Amp(want).value
    if plan.amp != want:
        raise PlanMismatchError(
            f"plan was made for a {amp_text(plan.amp)} step but this step runs {amp_text(want)} "
            f"(amp={want!r}); re-plan with memplan.plan(model, example_inputs, amp={want!r}) or pass "
            f"amp={plan.amp!r}")
    fp = precision_fingerprint(graph.fingerprint(), want)
    if plan.fingerprint != fp:
        raise PlanMismatchError(
            f"plan was made for graph {plan.fingerprint} but this model traces to {fp} (a different network, "
            "input shape or dtype); re-plan with memplan.plan(model, example_inputs)")
    validate_against_graph(plan, graph)


def with_simulation(plan: Plan, simulated: int, vanilla: int | None = None) -> Plan:
    return replace(plan, simulated_peak_bytes=int(simulated),
                   simulated_vanilla_peak_bytes=None if vanilla is None else int(vanilla))
