"""The benchmark's tables (Markdown) and Pareto plots (PNG) from its JSON results."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from memplan.units import format_bytes

__all__ = ["markdown", "model_table", "table4", "fit_table", "plot_model", "PAPER_TABLE4"]

#: FetusMapV2 Table 4 at 176x112x112 (GB as the paper prints them; time in s per volume).
PAPER_TABLE4 = (
    ("UNet", "vanilla", 7.91, 1.00, 1.47),
    ("UGCP", "memplan-gcp", 5.95, 0.75, 1.82),
    ("UREV", "memplan-rev", 5.21, 0.66, 2.16),
    ("UGCPREV", "memplan-gcp+rev", 4.50, 0.57, 1.83),
)


def _b(n: Any) -> str:
    return "n/a" if n is None else format_bytes(n)


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _x(x: Any, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}x"


def _s(x: Any) -> str:
    return "" if x is None else f"{x:.1f} s"


def _shape(s: Any) -> str:
    return "none" if not s else "x".join(str(v) for v in list(s)[2:])


def _floor_line(f: dict | None, where: str) -> str:
    if not f:
        return f"floor {where}: n/a"
    return (f"floor {where}: **{format_bytes(f['total_bytes'])}** = parameters {format_bytes(f['parameter_bytes'])} + "
            f"gradients {format_bytes(f['gradient_bytes'])} + Adam state {format_bytes(f['optimizer_state_bytes'])} + "
            f"buffers and input {format_bytes(f['other_static_bytes'])} + largest op working set "
            f"{format_bytes(f['working_set_bytes'])} (`{f['working_set_op']}`)")


def model_table(m: dict) -> str:
    """One model's rows: predicted at the paper size, measured at the measured size."""
    ms = m["measure"]
    where = f"{_shape(ms['shape'])}, {ms['device']}"
    lines = [
        f"### {m['title']}", "",
        f"Paper size {m['paper_size']} ({m['size_note']}); {m['params'] / 1e6:.2f} M parameters. "
        f"Measured at {_shape(ms['shape'])} on {ms['device']} ({ms['note']}).", "",
        "- " + _floor_line(m.get("floor_paper"), f"at {m['paper_size']}"),
        "- " + _floor_line(m.get("floor_measured"), f"at {_shape(ms['shape'])} (scratch={ms['scratch']})"), "",
        f"| method | predicted peak @{m['paper_size']} | vs vanilla | peak/floor | recomputed FLOPs | planning "
        f"| predicted @{where} | measured @{where} | vs vanilla | peak/floor | step time vs vanilla | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in m["rows"]:
        p, q = r["paper"], r["measured"]
        time_ratio = _x(q.get("time_ratio")) if q.get("time_ratio") is not None else "n/a"
        if q.get("step_time_s") is not None:
            time_ratio += f" ({q['step_time_s']:.2f} s)"
        planning = _s(p.get("planning_time_s"))
        if q.get("compile_s") is not None:
            planning = f"compile {q['compile_s']:.1f} s"
        notes = p.get("note") or ""
        qn = q.get("note") or ""
        if qn and qn.removeprefix("not run: ") != notes:
            notes += ("; " if notes else "") + f"@{_shape(ms['shape'])}: {qn}"
        lines.append(
            f"| {r['label']} | {_b(p.get('peak_bytes'))} | {_pct(p.get('ratio'))} | {_x(p.get('peak_over_floor'))} "
            f"| {_pct(p.get('overhead'))} | {planning} | {_b(q.get('predicted_bytes'))} | {_b(q.get('peak_bytes'))} "
            f"| {_pct(q.get('ratio'))} | {_x(q.get('peak_over_floor'))} | {time_ratio} | {notes} |")
    return "\n".join(lines)


def table4(m: dict) -> str:
    """FetusMapV2 Table 4 (first rows, 176x112x112) beside memplan's figures on the pose net."""
    rows = {r["method"]: r for r in m["rows"]}
    ms = m["measure"]
    lines = [
        f"| FetusMapV2 row | memplan method | paper memory | paper ratio | memplan predicted @{m['paper_size']} "
        f"| memplan ratio | measured ratio @{_shape(ms['shape'])} | paper time | paper time ratio "
        f"| memplan step-time ratio @{_shape(ms['shape'])} | recomputed FLOPs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, key, gb, ratio, time_s in PAPER_TABLE4:
        r = rows.get(key, {"label": key, "paper": {}, "measured": {}})
        p, q = r["paper"], r["measured"]
        lines.append(f"| {name} | {r['label']} | {gb:.2f} GB | {ratio:.0%} | {_b(p.get('peak_bytes'))} "
                     f"| {_pct(p.get('ratio'))} | {_pct(q.get('ratio'))} | {time_s:.2f} s | {time_s / 1.47:.2f}x "
                     f"| {_x(q.get('time_ratio'))} | {_pct(p.get('overhead'))} |")
    extra = rows.get("memplan-0.57")
    if extra:
        p, q = extra["paper"], extra["measured"]
        lines.append(f"| (UGCPREV's 57%, GCP only) | {extra['label']} | | 57% | {_b(p.get('peak_bytes'))} "
                     f"| {_pct(p.get('ratio'))} | {_pct(q.get('ratio'))} | | | {_x(q.get('time_ratio'))} "
                     f"| {_pct(p.get('overhead'))} |")
    return "\n".join(lines)


def fit_table(fit: dict) -> str:
    """Largest input per strategy and budget, with the next grid step (which does not fit)."""
    budgets = fit.get("budgets", [])
    head = "| method | " + " | ".join(f"largest under {b} | its peak | next step (peak)" for b in budgets)
    head += " | paper, under 8 GB | search |"
    lines = [head, "|---|" + "---:|---:|---|" * len(budgets) + "---:|---|"]
    for res in fit.get("results", []):
        cells = []
        answers = res.get("answers", [])
        for i in range(len(budgets)):
            a = answers[i] if i < len(answers) else None
            if a is None:
                cells += ["n/a", "", res.get("note", "")]
                continue
            nxt = "capped" if a["capped"] else f"{_shape(a['next_shape'])} ({_b(a['next_peak_bytes'])})"
            cells += [_shape(a["shape"]), _b(a["peak_bytes"]), nxt]
        paper = fit.get("paper", {}).get(res["strategy"])
        search = f"{res.get('evaluations', 0)} peaks, {res.get('wall_s', 0):.0f} s" if answers else res.get("note", "")
        lines.append(f"| {res['strategy']} | " + " | ".join(cells) + f" | {'x'.join(map(str, paper)) if paper else ''} "
                     f"| {search} |")
    return "\n".join(lines)


def plot_model(m: dict, path: Path) -> None:
    """Peak vs time overhead for every method: paper size (predicted peak vs recomputed FLOPs) and the
    measured size (measured peak vs measured step time), both relative to vanilla."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    panels = (("paper", "overhead", f"predicted @{m['paper_size']} (scratch=none)",
               "(forward + recomputed) FLOPs / forward FLOPs"),
              ("measured", "time_ratio", f"measured @{_shape(m['measure']['shape'])} ({m['measure']['device']})",
               "step time / vanilla step time"))
    for ax, (part, xkey, title, xlabel) in zip(axes, panels):
        for i, r in enumerate(m["rows"]):          # one colour and marker per method in both panels
            d = r[part]
            x, y = d.get(xkey), d.get("ratio")
            if x is None or y is None:
                continue
            x = 1 + x if xkey == "overhead" else x
            ax.scatter([x], [y], s=70, marker="os^vD<>p*hX"[i % 11], color=f"C{i % 10}", label=r["label"],
                       edgecolors="black", linewidths=0.5, zorder=3)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("peak / vanilla peak")
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(f"{m['title']}: peak memory vs time overhead")
    fig.tight_layout(rect=(0, 0.14, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict) -> str:
    """The whole report: run notes, Table 4, the fit table, then one table per model."""
    meta = results["meta"]
    out = [
        "# memplan peak-memory benchmark", "",
        f"Run: {meta['started']}, {meta['wall_s']:.0f} s wall, torch {meta['torch']}, {meta['threads']} thread(s) per "
        f"process, {meta['jobs']} planning process(es), mode `{meta['mode']}`. Batch 1, Adam, loss = sum of the "
        "outputs.", "",
        "Notes:", "",
        *[f"- {n}" for n in meta["notes"]], "",
    ]
    pose = next((m for m in results["models"] if m["key"] == "fetusmapv2"), None)
    if pose:
        out += ["## FetusMapV2 Table 4, replicated on the pose net", "", table4(pose), ""]
    if results.get("fit"):
        fit = results["fit"]
        out += [f"## Largest input under a budget ({fit['model']}, predicted, scratch={fit['scratch']})", "",
                fit["note"], "", fit_table(fit), ""]
    out += ["## Every method on every client", ""]
    for m in results["models"]:
        out += [model_table(m), ""]
    if results.get("skipped"):
        out += ["## Skipped", "", *[f"- {s}" for s in results["skipped"]], ""]
    return "\n".join(out)
