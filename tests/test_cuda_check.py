"""benchmarks/cuda_check.py --dry-run: the GPU check's code path, run on the CPU."""
import json

import pytest
import torch

import memplan
from benchmarks import cuda_check


@pytest.mark.slow
def test_dry_run_writes_rows_with_cuda_rounded_predictions(tmp_path):
    assert cuda_check.main(["--dry-run", "--only", "UNet", "--sizes", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "cuda_dry_run.json").read_text())
    rows = data["rows"]
    assert [(r["gcp"], r["precision"]) for r in rows] == [(False, "fp32"), (False, "bf16"), (True, "fp32"), (True, "bf16")]
    assert all(r["predicted_bytes"] % 512 == 0 and r["measured_bytes"] > 0 for r in rows)   # 512-B blocks
    assert rows[0]["time_ratio"] == 1.0 and rows[1]["time_ratio"] == 1.0
    # the fp32 vanilla prediction is the ruler's, independently recomputed
    net = next(n for n in cuda_check.nets() if n.name == "UNet")
    torch.manual_seed(0)
    model = net.build()
    expect = memplan.simulate_step(model, torch.randn(net.dry_shapes[0]), scratch="none", target="cuda").peak_bytes
    assert rows[0]["predicted_bytes"] == expect
    assert "| UNet |" in (tmp_path / "cuda_dry_run.md").read_text()


def test_refuses_without_a_gpu_unless_dry_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the same on a machine with a GPU
    assert cuda_check.main(["--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
