"""The ``--plot`` of ``memplan optimize``: live memory over one steady training step, vanilla vs planned."""
from __future__ import annotations

from pathlib import Path

from ..units import format_bytes

COLORS = ("tab:gray", "tab:blue", "tab:green", "tab:orange")


def steady_timeline(module, inputs, *, optimizer: str, scratch: str, amp: str | None = None,
                    threads: int | None = None) -> list[int]:
    """Live bytes after every op of a steady-state training step (the second of two simulated steps)."""
    from ..measure import simulate_step
    step = dict(optimizer=optimizer, scratch=scratch, amp=amp, threads=threads)
    first = simulate_step(module, inputs, steps=1, **step).timeline
    both = simulate_step(module, inputs, steps=2, **step).timeline
    return [b for _, b in both[len(first):]]


def plot_timeline(curves: dict[str, list[int]], path: str | Path, *, budget_bytes: int | None = None,
                  title: str = "") -> None:
    """Live memory over one training step per curve (e.g. vanilla vs planned), saved with matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    top = max(max(c) for c in curves.values())
    scale, unit = (2**30, "GiB") if top >= 2**30 else (2**20, "MiB")
    fig, ax = plt.subplots(figsize=(9, 4))
    try:
        for (label, ys), color in zip(curves.items(), COLORS):
            peak_at = max(range(len(ys)), key=ys.__getitem__)
            ax.plot(range(len(ys)), [y / scale for y in ys], color=color, lw=1,
                    label=f"{label}: peak {format_bytes(ys[peak_at])}")
            ax.plot([peak_at], [ys[peak_at] / scale], "o", color=color, ms=4)
        if budget_bytes:
            ax.axhline(budget_bytes / scale, color="tab:red", ls="--", lw=1,
                       label=f"budget {format_bytes(budget_bytes)}")
        ax.set_xlabel("ATen op of one training step (forward, backward with recomputation, optimizer)")
        ax.set_ylabel(f"live memory ({unit})")
        ax.set_title(title, fontsize=9)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
