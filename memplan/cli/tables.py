"""The human-readable output of the ``memplan`` commands: rich tables and header grids for stdout."""
from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from ..options import amp_text
from ..segtable import segment_rows
from ..units import format_bytes

SEGMENTS_CAPTION = ("store: every output kept for backward; recompute: only the kept outputs are stored, "
                    "the rest runs again in backward")


def fmt(n: float | None) -> str:
    """Bytes as text, '-' for None.

    >>> fmt(None), fmt(3 * 2**20)
    ('-', '3.00 MiB')
    """
    return "-" if n is None else format_bytes(n)


def shape_text(shape) -> str:
    """(1, 1, 32, 24, 24) -> '1x1x32x24x24'; None -> '-'."""
    return "x".join(str(d) for d in shape) if shape is not None else "-"


def budget_text(budget_bytes: int | None) -> str:
    """'8.00 GB (7.45 GiB)' for a budget in whole MB, else '512 MiB'; 'none (least memory)' for None.

    >>> budget_text(8 * 10**9), budget_text(20 * 1024), budget_text(2**20), budget_text(None)
    ('8.00 GB (7.45 GiB)', '20.0 KiB', '1.00 MiB', 'none (least memory)')
    """
    if not budget_bytes:
        return "none (least memory)"
    binary = format_bytes(budget_bytes)
    if budget_bytes % 10**6 == 0 and budget_bytes % 2**20 != 0:
        return f"{format_bytes(budget_bytes, binary=False)} ({binary})"
    return binary


def segment_table(plan, *, all_segments: bool) -> Table:
    """The plan's segments, one row per recomputed segment and per run of stored ones."""
    table = Table(title="segments", title_justify="left", caption_justify="left", caption=SEGMENTS_CAPTION)
    cols = [("seg", "right"), ("mode", "left"), ("nodes", "right"), ("first .. last", "left"), ("kept", "left"),
            ("kept bytes", "right")] + ([("REV", "left")] if plan.rev else [])
    for col, just in cols:
        table.add_column(col, justify=just)
    for r in segment_rows(plan.segments, plan.rev, merge=not all_segments):
        mode = "[bold red]recompute[/]" if r.recompute else "store"
        table.add_row(r.label, mode, str(len(r.nodes)), f"{r.nodes[0]} .. {r.nodes[-1]}", r.kept_text(),
                      fmt(r.kept_bytes), *([", ".join(r.rev)] if plan.rev else []))
    return table


def step_text(optimizer: str, scratch: str, amp: str | None, threads: int | None) -> str:
    """The simulated step in words.

    >>> step_text("adam", "cpu", "bf16", 2)
    'optimizer adam, scratch cpu, bf16 autocast, 2 threads'
    """
    precision = "fp32" if amp is None else f"{amp} autocast"
    return f"optimizer {optimizer}, scratch {scratch}, {precision}" + (f", {threads} thread{'s' * (threads != 1)}" if threads else "")


def precision_text(peaks: dict[str, dict[str, int]], plan_amp: str | None) -> tuple[str, str]:
    """The header row putting fp32 and mixed-precision peaks side by side: (label, text).

    >>> precision_text({"fp32": {"vanilla_peak_bytes": 4 * 2**20, "planned_peak_bytes": 2**21},
    ...                 "bf16": {"vanilla_peak_bytes": 2**21, "planned_peak_bytes": 2**20}}, None)
    ('fp32 / bf16', 'vanilla 4.00 MiB / 2.00 MiB; planned 2.00 MiB / 1.00 MiB (simulated, the fp32 plan)')
    """
    names = list(peaks)
    cell = {k: " / ".join(fmt(peaks[n][f"{k}_peak_bytes"]) for n in names) for k in ("vanilla", "planned")}
    return (" / ".join(names), f"vanilla {cell['vanilla']}; planned {cell['planned']} "
            f"(simulated, the {amp_text(plan_amp)} plan)")


def print_optimize(out: Console, loaded, plan, *, scratch: str, all_segments: bool, written: list[str],
                   precision_peaks: dict[str, dict[str, int]] | None = None) -> None:
    """Header (model, input, graph, method, peaks, overhead), the segment table, REV lines, notes, files;
    ``precision_peaks`` adds the fp32 and mixed-precision peaks side by side."""
    sim_v, sim_p = plan.simulated_vanilla_peak_bytes, plan.simulated_peak_bytes
    nodes = sum(len(s.nodes) for s in plan.segments)
    sets = f"{plan.lower_set_count} lower sets" if plan.lower_set_count is not None else "lower sets not enumerated"
    ratio = f", {sim_p / sim_v:.0%} of vanilla" if sim_v and sim_p is not None else ""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("model", loaded.model_source)
    head.add_row("input", f"{', '.join(shape_text(s) for s in loaded.input_shapes)} "
                 f"{str(loaded.inputs[0].dtype).removeprefix('torch.')} ({loaded.input_source})")
    head.add_row("graph", f"{nodes} nodes, {sets}")
    head.add_row("method", f"{plan.method} DP ({plan.method_reason}); {plan.objective}; planned in "
                 f"{plan.planning_time_s:.2f} s")
    head.add_row("step", step_text(plan.optimizer, scratch, plan.amp, plan.threads))
    head.add_row("budget", budget_text(plan.budget_bytes))
    head.add_row("vanilla peak", f"{fmt(sim_v)} simulated  (cost model {fmt(plan.vanilla_peak_bytes)})")
    head.add_row("planned peak", f"{fmt(sim_p)} simulated  (cost model {fmt(plan.predicted_peak_bytes)}){ratio}")
    if precision_peaks:
        head.add_row(*precision_text(precision_peaks, plan.amp))
    head.add_row("overhead", f"{plan.predicted_overhead:.1%} of forward FLOPs recomputed"
                 + (" (incl. REV rebuilds)" if plan.rev else ""))
    out.print(head)
    out.print(segment_table(plan, all_segments=all_segments))
    for r in plan.rev:
        out.print(f"REV replaced {r.name}: {', '.join(r.replaced)} -> {r.new_module} "
                  f"(params {r.params_before} -> {r.params_after}; fresh weights, must be trained)")
    for note in plan.notes:
        out.print(f"note: {note}", soft_wrap=True, markup=False)
    for path in written:
        reuse = (f": memplan.compile(model, x, plan={path!r}) reuses it (same model, input shape and dtype)"
                 if path.lower().endswith(".json") else "")
        out.print(f"wrote {path}{reuse}", soft_wrap=True, markup=False)


def side_by_side_text(peaks_by_precision: dict[str, dict[str, int]] | None) -> str:
    r"""The fit caption's first line: each strategy's peak at the given input in fp32 and mixed precision.

    >>> side_by_side_text({"fp32": {"vanilla": 2**21, "GCP": 2**20}, "bf16": {"vanilla": 2**20, "GCP": 2**19}})
    'at given, fp32 / bf16: vanilla 2.00 MiB / 1.00 MiB, GCP 1.00 MiB / 512 KiB\n'
    """
    if not peaks_by_precision:
        return ""
    names = list(peaks_by_precision)
    strategies = list(peaks_by_precision[names[0]])
    cells = [f"{s} {' / '.join(fmt(peaks_by_precision[n][s]) for n in names)}" for s in strategies]
    return f"at given, {' / '.join(names)}: {', '.join(cells)}\n"


def fit_table(loaded, grid, results, budget_bytes: int, *, peaks_by_precision: dict[str, dict[str, int]] | None = None,
              amp: str | None = None) -> Table:
    """One row per strategy: its peak at the given input, the largest input that fits (planned under
    ``amp``), the next size up; ``peaks_by_precision`` adds a caption line with each strategy's peak at
    the given input in fp32 and in mixed precision side by side."""
    base_v = next((r.base_peak_bytes for r in results if r.strategy == "vanilla"), None)
    vox0 = math.prod(grid.base[a] for a in grid.axes)
    axes = f"axes {', '.join(map(str, grid.axes))} grown in multiples of {', '.join(map(str, grid.multiples))}"
    table = Table(title=f"largest input within {budget_text(budget_bytes)}: {loaded.model_source}",
                  title_justify="left", caption_justify="left",
                  caption=f"{side_by_side_text(peaks_by_precision)}given input {shape_text(grid.base)}; {axes}; "
                  f"peaks: simulated {amp_text(amp)} training steps, the smallest each strategy reaches; x given: "
                  "max input size / given; next size up: the next grid shape, over the budget")
    cols = [("strategy", "left"), ("peak at given", "right"), ("max input", "left"), ("peak", "right"),
            ("x given", "right"), ("next size up", "left")]
    for col, just in cols:
        table.add_column(col, justify=just)
    for r in results:
        pct = f" ({r.base_peak_bytes / base_v:.0%})" if base_v else ""
        size = "-" if r.shape is None else f"{math.prod(r.shape[a] for a in grid.axes) / vox0:.2f}x"
        nxt = "size cap reached" if r.capped else f"{shape_text(r.next_shape)}: {fmt(r.next_peak_bytes)}"
        table.add_row(r.strategy, f"{fmt(r.base_peak_bytes)}{pct}", shape_text(r.shape) if r.shape else "none fits",
                      fmt(r.peak_bytes), size, nxt)
    return table


def print_measure(out: Console, loaded, rec: dict, *, repeat: int) -> None:
    """Simulated (and with --real measured) peaks of both steps, their ratio, and the step times."""
    real = rec["device"] is not None
    out.print(f"{loaded.model_source}, input {shape_text(loaded.input_shapes[0])}, optimizer {rec['optimizer']}, "
              f"{amp_text(rec.get('amp'))}, budget {budget_text(rec['budget_bytes'])}" + (", REV" if rec["rev"] else ""),
              soft_wrap=True)
    table = Table()
    cols = [("", "left"), ("simulated peak", "right")]
    if real:
        cols += [("measured peak", "right"), ("sim. error", "right"), ("step time", "right")]
        table.caption = (f"simulated: meta tensors, scratch {rec['scratch']}; measured: "
                         f"{'CPU profiler' if rec['device'] == 'cpu' else 'CUDA max_memory_allocated'}; "
                         f"step time: median of {repeat} alternating steps")
        table.caption_justify = "left"
    for col, just in cols:
        table.add_column(col, justify=just)
    for name in ("vanilla", "planned"):
        r = rec[name]
        cells = [name, fmt(r["simulated_peak_bytes"])]
        if real:
            err_pct = (r["simulated_peak_bytes"] - r["measured_peak_bytes"]) / r["measured_peak_bytes"]
            cells += [fmt(r["measured_peak_bytes"]), f"{err_pct:+.1%}", f"{r['step_time_s']:.3f} s"]
        table.add_row(*cells)
    ratio = ["planned / vanilla", f"{rec['simulated_ratio']:.2f}x"]
    if real:
        ratio += [f"{rec['measured_ratio']:.2f}x", "", f"{rec['step_time_ratio']:.2f}x"]
    table.add_row(*ratio, style="bold")
    out.print(table)
    out.print(f"predicted overhead: {rec['overhead']:.1%} of forward FLOPs recomputed")
