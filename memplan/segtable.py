"""Segment rows for display: each recomputed segment alone, runs of stored ones merged.

One helper for every place that shows a plan's segments (``Plan.summary()``, the ``memplan``
command's table and its ``--json``), so they group and count the same way.

>>> from memplan.plan import Segment
>>> segs = [Segment(0, ("a", "b"), ("b",), True, 8, 2), Segment(1, ("c",), ("c",), False, 4, 1),
...         Segment(2, ("d",), ("d",), False, 4, 1)]
>>> [(r.label, r.mode, r.nodes, r.kept_bytes) for r in segment_rows(segs)]
[('0', 'recompute', ('a', 'b'), 8), ('1-2', 'store', ('c', 'd'), 8)]
>>> len(segment_rows(segs, merge=False))
3
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:                       # only for the annotations: plan.py may import this module
    from .plan import RevReplacementRecord, Segment


@dataclass(frozen=True)
class SegmentRow:
    """One display row: segments ``first..last`` (one recomputed, or a run of stored ones)."""
    first: int
    last: int
    recompute: bool
    nodes: tuple[str, ...]
    kept: tuple[str, ...]
    kept_bytes: int
    rev: tuple[str, ...]                # names of the REV replacements whose block lies in these segments

    @property
    def mode(self) -> str:
        return "recompute" if self.recompute else "store"

    @property
    def label(self) -> str:
        """``"3"`` for one segment, ``"3-6"`` for a run."""
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    def kept_text(self, limit: int = 3) -> str:
        """The kept outputs, at most ``limit`` named: ``"a, b, c +2"``; a stored run keeps ``"all"``."""
        if not self.recompute:
            return "all"
        more = f" +{len(self.kept) - limit}" if len(self.kept) > limit else ""
        return ", ".join(self.kept[:limit]) + more

    def as_dict(self) -> dict:
        """The JSON form: ``first``, ``last``, ``mode``, ``nodes``, ``kept``, ``kept_bytes``, ``rev``."""
        return {"first": self.first, "last": self.last, "mode": self.mode, "nodes": list(self.nodes),
                "kept": list(self.kept), "kept_bytes": self.kept_bytes, "rev": list(self.rev)}


def segment_rows(segments: Sequence[Segment], rev: Iterable[RevReplacementRecord] = (), *,
                 merge: bool = True) -> list[SegmentRow]:
    """Rows in plan order; with ``merge`` consecutive stored segments without a REV block share a row."""
    rev_nodes = {r.new_module.replace(".", "_"): r.name for r in rev}     # fx names a module's node so
    rows: list[SegmentRow] = []
    for s in segments:
        row = SegmentRow(first=s.index, last=s.index, recompute=s.recompute, nodes=tuple(s.nodes),
                         kept=tuple(s.kept), kept_bytes=s.kept_bytes,
                         rev=tuple(rev_nodes[n] for n in s.nodes if n in rev_nodes))
        prev = rows[-1] if rows else None
        if merge and prev is not None and not prev.recompute and not row.recompute and not prev.rev and not row.rev:
            rows[-1] = SegmentRow(first=prev.first, last=row.last, recompute=False, nodes=prev.nodes + row.nodes,
                                  kept=prev.kept + row.kept, kept_bytes=prev.kept_bytes + row.kept_bytes, rev=())
        else:
            rows.append(row)
    return rows
