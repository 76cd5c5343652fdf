"""The budget-sweep benchmark: its miss accounting against hand-made rows, and one tiny real run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.budget_sweep import NETS, markdown  # noqa: E402


def _row(net, point, budget, simulated=None, measured=None, recomputed=0, accepted=True):
    base = {"net": net, "input": "1x1x8x8x8", "threads": 1, "floor_simulated_bytes": 100,
            "vanilla_simulated_bytes": 200, "vanilla_measured_bytes": 200, "point": point, "budget_bytes": budget,
            "accepted": accepted}
    if not accepted:
        return {**base, "min_feasible_bytes": budget + 1}
    return {**base, "simulated_bytes": simulated, "measured_bytes": measured, "over_bytes": measured - budget,
            "recomputed": recomputed, "overhead": 0.1}


def test_summary_counts_misses_and_splits_rng_from_scratch():
    rng = torch.get_rng_state().numel()
    rows = [_row("a", 0, 1000, 1000, 1000 + rng, recomputed=1),       # a miss the RNG state explains
            _row("a", 1, 2000, 1990, 2100, recomputed=1),              # over by 100 <= rng: RNG
            _row("b", 0, 1000, 1000, 1000 + 3 * rng, recomputed=2),   # over by 3 states with 2 segments: scratch
            _row("b", 1, 5000, 4000, 4000),                             # fits
            _row("b", 2, 50, accepted=False)]
    text = markdown(rows, [])
    assert "5 budgets, 4 accepted, 1 refused; 3 accepted budget(s) exceeded" in text
    assert "2 of the misses are within the RNG states" in text and "1 exceed them" in text and ": b." in text
    assert f"| b | 1x1x8x8x8 | 0 | 1,000 B | yes | 1,000 B | {1000 + 3 * rng:,} B | +{3 * rng:,} B |" in text
    assert "**refused** (min feasible 51 B)" in text


@pytest.mark.slow
def test_one_net_two_budgets_runs_and_renders_from_json(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "budget_sweep.py"), "--only", "face",
                           "--points", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "budget_sweep.json").read_text())
    assert [r["point"] for r in rows] == [0, 1]
    assert rows[0]["budget_bytes"] == rows[0]["floor_simulated_bytes"]
    assert rows[1]["budget_bytes"] == rows[1]["vanilla_simulated_bytes"]
    assert (tmp_path / "budget_sweep.md").read_text() == markdown(rows, [n for n in NETS if n.name == "face"])
