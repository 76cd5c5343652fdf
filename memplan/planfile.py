"""Plan files are checked in full before use: the schema, then the segments against the graph.

``validate_plan_dict`` checks a parsed JSON document against the Plan dataclass itself (every field's
type, nested Segments included; unknown or missing fields named), so the schema cannot drift from
the code. ``validate_against_graph`` checks that the segments are a chain the rewrite can run: unique
consecutive indices, a partition of the graph's nodes, dependency order, kept outputs inside their
segment, in-place groups whole, pinned nodes stored. Each error names the value and the fix.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Rec:
...     name: str
...     size_bytes: int = 0
>>> validate_plan_dict({"name": "a", "size_bytes": 3}, Rec)
>>> validate_plan_dict({"name": "a", "size_bytes": "3"}, Rec)
Traceback (most recent call last):
...
memplan.errors.PlanFileError: plan field size_bytes must be an integer, got '3' (str); regenerate the plan with Plan.to_json(path) or `memplan optimize MODEL.py --out plan.json`
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections import Counter
from typing import Any

from .errors import PlanFileError, PlanMismatchError

REGENERATE = "regenerate the plan with Plan.to_json(path) or `memplan optimize MODEL.py --out plan.json`"
REPLAN = "re-plan with memplan.plan(model, example_inputs) (or `memplan optimize --out`) instead of editing the file"

_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _got(value: Any) -> str:
    text = repr(value)
    return f"{text[:60] + '...' if len(text) > 60 else text} ({type(value).__name__})"


def _check_value(value: Any, tp: Any, where: str) -> None:
    """Raise PlanFileError unless the JSON ``value`` fits the annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _check_value(value, options[0], where)
    elif tp is bool:
        if isinstance(value, bool):
            return
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0 and (where.endswith("_bytes") or where.endswith("index") or where.endswith("flops")):
                raise PlanFileError(f"plan field {where} must be >= 0, got {value}; {REGENERATE}")
            return
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise PlanFileError(f"plan field {where} must be a finite number, got {value}; {REGENERATE}")
            return
    elif tp is str:
        if isinstance(value, str):
            return
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
            if item is None and len(value) != len(args):
                raise PlanFileError(f"plan field {where} must have {len(args)} items, got {len(value)}; {REGENERATE}")
            for i, v in enumerate(value):
                _check_value(v, item if item is not None else args[i], f"{where}[{i}]")
            return
        raise PlanFileError(f"plan field {where} must be a list, got {_got(value)}; {REGENERATE}")
    elif dataclasses.is_dataclass(tp):
        return validate_plan_dict(value, tp, where=where)
    elif tp is typing.Any or origin is dict or tp is dict:
        return
    word = _TYPE_WORDS.get(tp, str(tp).replace("typing.", ""))
    raise PlanFileError(f"plan field {where} must be {word}, got {_got(value)}; {REGENERATE}")


def validate_plan_dict(d: Any, schema: type, *, where: str = "") -> None:
    """Raise PlanFileError unless ``d`` (parsed JSON) has exactly ``schema``'s fields with their types.

    Fields with a default may be absent; a field named ``format`` must equal its default (the file
    format version this code reads)."""
    name = where or "plan"
    if not isinstance(d, dict):
        raise PlanFileError(f"{name} must be a JSON object with fields {', '.join(f.name for f in dataclasses.fields(schema))}, "
                            f"got {_got(d)}; {REGENERATE}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise PlanFileError(f"{name} has unknown field(s) {', '.join(map(repr, unknown))} (a plan has "
                            f"{', '.join(fields)}); {REGENERATE}")
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in d]
    if missing:
        raise PlanFileError(f"{name} lacks field(s) {', '.join(map(repr, missing))}; {REGENERATE}")
    if "format" in fields and fields["format"].default is not dataclasses.MISSING:
        if d.get("format", fields["format"].default) != fields["format"].default:
            raise PlanFileError(f"plan format {d.get('format')!r} is not {fields['format'].default}; {REGENERATE}")
    for key, value in d.items():
        _check_value(value, hints[key], f"{where}.{key}" if where else key)


#: The precisions a plan file may name in ``amp`` (null: full precision).
PLAN_AMP_MODES = (None, "bf16", "fp16")


def check_step_fields(d: dict) -> None:
    """Raise PlanFileError unless a schema-checked plan dict's step fields are sane: ``amp`` null, "bf16"
    or "fp16" and matching the fingerprint's precision suffix, ``threads`` null or positive."""
    amp = d.get("amp")
    if amp not in PLAN_AMP_MODES:
        raise PlanFileError(f"plan field amp must be null (fp32), \"bf16\" or \"fp16\", got {_got(amp)}; {REGENERATE}")
    fp = d["fingerprint"]
    suffix = fp.split("+", 1)[1] if "+" in fp else None
    if suffix != amp:
        raise PlanFileError(f"plan fingerprint {fp!r} says precision {suffix or 'fp32'} but field amp is {amp!r}; "
                            f"{REGENERATE}")
    threads = d.get("threads")
    if threads is not None and threads < 1:
        raise PlanFileError(f"plan field threads must be a positive int or null, got {threads}; {REGENERATE}")


def _indices_problem(indices: list[int]) -> str:
    """What is wrong with a plan's segment indices ('' when they are 0, 1, ..., k-1 in order)."""
    if indices == list(range(len(indices))):
        return ""
    twice = sorted(i for i, c in Counter(indices).items() if c > 1)
    if twice:
        return (f"segment index {twice[0]} appears {Counter(indices)[twice[0]]} times: a repeated segment would "
                "run twice per forward")
    return f"segment indices must be 0, 1, ..., {len(indices) - 1} in order, got {indices}"


def validate_against_graph(plan: Any, graph: Any) -> None:
    """Raise PlanMismatchError unless ``plan.segments`` is a chain of ``graph`` the rewrite can run.

    Unique consecutive indices; every node in exactly one segment; a node's inputs in its own or an
    earlier segment; kept nodes inside their segment; each in-place group in one segment; random draws
    and writers of one buffer (``graph.ordered``) in fx order; pinned nodes (writes into inputs or
    parameters) in stored segments."""
    segments = list(plan.segments)
    problem = _indices_problem([s.index for s in segments])
    if problem:
        raise PlanMismatchError(f"{problem}; {REPLAN}")
    nodes = set(graph.order)
    seg_of: dict[str, int] = {}
    for s in segments:
        if not s.nodes:
            raise PlanMismatchError(f"segment {s.index} has no nodes; {REPLAN}")
        for n in s.nodes:
            if n not in nodes:
                raise PlanMismatchError(f"node {n!r} of segment {s.index} is not in this graph (nodes are fx "
                                        f"names such as {', '.join(graph.order[:3])}); {REPLAN}")
            if n in seg_of:
                where = "twice in segment" if seg_of[n] == s.index else f"in segments {seg_of[n]} and"
                raise PlanMismatchError(f"node {n!r} is {where} {s.index}: segments must partition the graph's "
                                        f"nodes; {REPLAN}")
            seg_of[n] = s.index
        outside = [k for k in s.kept if k not in s.nodes]
        if outside:
            raise PlanMismatchError(f"segment {s.index} keeps {', '.join(map(repr, outside))}, which are not its "
                                    f"nodes; {REPLAN}")
    absent = [n for n in graph.order if n not in seg_of]
    if absent:
        more = f" (+{len(absent) - 5} more)" if len(absent) > 5 else ""
        raise PlanMismatchError(f"plan segments do not partition the graph's nodes: {', '.join(map(repr, absent[:5]))}"
                                f"{more} are in no segment; {REPLAN}")
    for n in graph.order:
        for p in graph.dag.predecessors(n):
            if seg_of[p] > seg_of[n]:
                raise PlanMismatchError(
                    f"node {n!r} (segment {seg_of[n]}) reads {p!r} from the later segment {seg_of[p]}: segments "
                    f"must be in dependency order; {REPLAN}")
    for group in graph.ordered:
        for a, b in zip(group, group[1:]):
            if seg_of[a] > seg_of[b]:
                what = "draws random numbers" if graph.info(a).draws_random else "writes the same buffer"
                raise PlanMismatchError(f"node {b!r} (segment {seg_of[b]}) {what} after {a!r} (segment {seg_of[a]}) "
                                        f"in the network; a plan that runs it first changes what both compute; "
                                        f"{REPLAN}")
    for group in graph.together:
        owners = sorted({seg_of[n] for n in group})
        if len(owners) > 1:
            raise PlanMismatchError(f"in-place group {', '.join(group)} is split over segments {owners}: an in-place "
                                    f"write and the reads it ties must share one segment; {REPLAN}")
    recomputed = {s.index for s in segments if s.recompute}
    for n in sorted(graph.pinned):
        if seg_of.get(n) in recomputed:
            raise PlanMismatchError(f"node {n!r} writes into an input or parameter but segment {seg_of[n]} would "
                                    f"recompute it (writing twice); {REPLAN}")
