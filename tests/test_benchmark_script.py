"""The peak-memory benchmark script runs end to end (--quick) and writes files that parse.

It measures and never asserts, so no number is checked here; the helpers it is built from are
checked against hand-computed values below.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import baselines  # noqa: E402
from benchmarks.fit_search import grid_shape, largest_fits, voxels  # noqa: E402
from benchmarks.report import fit_table, markdown  # noqa: E402


@pytest.mark.slow
def test_quick_run_writes_json_markdown_and_plots(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peak_memory.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "peak_memory.json").read_text())
    assert {m["key"] for m in results["models"]} == {"fetusmapv2"} and results["meta"]["mode"] == "quick"
    methods = [r["method"] for r in results["models"][0]["rows"]]
    assert methods[0] == "vanilla" and "memplan-gcp+rev" in methods and "compile-0.5" in methods
    text = (out / "peak_memory.md").read_text()
    assert "FetusMapV2 Table 4" in text and "Largest input under a budget" in text
    assert markdown(results) == text                       # the Markdown is rebuilt from the JSON alone
    png = (out / "fetusmapv2.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "peak_memory" in proc.stderr                    # the progress bar goes to stderr
    noise = [ln for ln in proc.stderr.replace("\r", "\n").splitlines()
             if ln.strip() and not ln.startswith(("peak_memory:", "Rockmate row", "wrote "))]
    assert noise == []                                     # the bar, the Rockmate line, the files: no profiler noise


def test_default_output_is_a_scratch_folder_and_quick_never_replaces_the_results():
    from benchmarks import peak_memory
    for argv, mode in (([], "default"), (["--quick"], "quick"), (["--full"], "full")):
        args = peak_memory.parse_args(argv)
        assert args.out == ROOT / "runs" / f"peak_memory-{mode}" and args.mode == mode
    assert "/runs/" in (ROOT / ".gitignore").read_text().split()          # git never sees a scratch run
    with pytest.raises(SystemExit) as exc:
        peak_memory.parse_args(["--quick", "--out", str(ROOT / "benchmarks" / "results")])
    assert exc.value.code == 2
    assert peak_memory.parse_args(["--out", str(ROOT / "benchmarks" / "results")]).out == ROOT / "benchmarks" / "results"


def test_help_says_where_it_writes(capsys):
    from benchmarks import peak_memory
    with pytest.raises(SystemExit):
        peak_memory.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "writes to runs/peak_memory-<mode>/ unless --out is given" in text and "benchmarks/results" in text


def test_bad_fit_budget_is_rejected_with_its_value():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peak_memory.py"), "--fit-budgets", "8 bananas"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "8 bananas" in proc.stderr


def test_grid_follows_fetusmapv2_answers():
    base = (1, 1, 176, 112, 112)
    shapes = [grid_shape(base, k)[2:] for k in range(6)]
    assert shapes == [(176, 112, 112), (192, 112, 112), (192, 112, 128), (192, 128, 128), (208, 128, 128),
                      (208, 128, 144)]
    assert grid_shape(base, -3)[2:] == (160, 96, 96)


def test_largest_fits_brackets_a_known_answer():
    base = (1, 1, 32, 32, 32)
    peak = lambda s: 1000 + 7 * voxels(s)                  # noqa: E731 - strictly growing, known in closed form
    budget = 1000 + 7 * 48 * 48 * 48
    (answer,), evaluations = largest_fits(peak, base, [budget], static_bytes=1000)
    # brute force over the grid: the largest k whose peak fits
    best = max(k for k in range(-3, 40) if peak(grid_shape(base, k)) <= budget)
    assert answer.shape == grid_shape(base, best) and answer.next_shape == grid_shape(base, best + 1)
    assert answer.peak_bytes <= budget < answer.next_peak_bytes
    assert evaluations <= 5


def test_checkpoint_modules_keeps_outputs_and_gradients():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv3d(2, 1, 1))
    wrapped = baselines.checkpoint_modules(net, ["0", "2"])
    x = torch.randn(1, 1, 6, 6, 6)
    net(x).sum().backward()
    wrapped(x).sum().backward()
    assert isinstance(wrapped[0], baselines.Checkpointed) and not isinstance(net[0], baselines.Checkpointed)
    torch.testing.assert_close(wrapped[0].inner.weight.grad, net[0].weight.grad)
    with pytest.raises(ValueError, match="'nope'"):
        baselines.checkpoint_modules(net, ["nope"])


class _SkipNet(nn.Module):
    """conv a -> conv b -> cat(a-branch, b) -> conv c: FetusMap's rule skips the passes that feed the cat."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.BatchNorm3d(2), nn.ReLU())
        self.b = nn.Sequential(nn.Conv3d(2, 2, 3, padding=1), nn.BatchNorm3d(2), nn.ReLU())
        self.c = nn.Conv3d(4, 1, 1)

    def forward(self, x):
        a = self.a(x)
        return self.c(torch.cat([a, self.b(a)], dim=1))


def test_fetusmap_rule_skips_passes_feeding_a_concatenation():
    assert baselines.fetusmap_rule_names(_SkipNet()) == ["c"]
    net = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.ReLU(), nn.Conv3d(2, 2, 3))
    assert baselines.fetusmap_rule_names(net) == ["0", "3"]      # the pass is not a whole Sequential: its conv


def test_chen_chain_on_a_chain_of_nine():
    import memplan
    g = memplan.trace(nn.Sequential(*[nn.Tanh() for _ in range(9)]), torch.empty(2, 3, device="meta"))
    cuts = baselines.articulation_points(g)
    assert cuts == list(range(9))                           # every node of a chain is a cut
    chain = baselines.chen_chain(g, cuts)
    step = math.ceil(math.sqrt(9))
    assert [bin(m).count("1") for m in chain] == [step, 2 * step, 7, 8, 9]


def test_fit_table_marks_a_capped_search():
    fit = {"budgets": ["1GiB"], "paper": {}, "results": [
        {"strategy": "vanilla", "evaluations": 2, "wall_s": 1.0, "answers": [
            {"shape": [1, 1, 8, 8, 8], "peak_bytes": 10, "next_shape": None, "next_peak_bytes": None,
             "capped": True}]}]}
    assert "| vanilla | 8x8x8 | 10 B | capped |" in fit_table(fit)
