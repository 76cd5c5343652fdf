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


def test_summary_counts_misses_and_the_measured_minus_simulated_range():
    rows = [_row("a", 0, 1000, 1000, 1040, recomputed=1),     # over by 40, measured 40 above simulated
            _row("a", 1, 2000, 1990, 2100, recomputed=1),     # over by 100, gap +110
            _row("b", 0, 1000, 1000, 990, recomputed=2),      # fits, gap -10
            _row("b", 1, 5000, 4000, 4000),                   # fits, gap 0
            _row("b", 2, 50, accepted=False)]
    text = markdown(rows, [])
    assert "5 budgets, 4 accepted, 1 refused; 2 accepted budget(s) exceeded when measured (worst by 100 B, +5.00%)" \
        in text
    assert "measured - simulated over the accepted plans: -10 B to +110 B." in text
    assert "| a | 1x1x8x8x8 | 1 | 2,000 B | yes | 1,990 B | 2,100 B | +100 B | +5.00% | 1 | +110 B |" in text
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
