"""The clients' commands exactly as README's "Clients" section writes them, on tiny phantoms.

README: ``python -m models.CLIENT train --data DIR --budget 8GB`` then ``python -m models.CLIENT evaluate
--data DIR`` (default --out / --checkpoint runs/CLIENT). Only size flags are added here, so CPU tests stay small.
"""
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.checkpoint import FORMAT, load_checkpoint_file
from tools.phantom import generate_cases

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "pose": (["--input-size", "32,32,32", "--channels", "4", "--depth", "2", "--epochs", "1"], (32, 32, 32), 3),
    "femur": (["--config", "tiny", "--epochs", "1", "--adv-epochs", "0", "--roi-epochs", "1", "--roi-size", "32,32,32",
               "--roi-margin", "3"], (32, 32, 32), 3),
    "face": (["--input-size", "32,32,32", "--spacing-mm", "2.6", "--channels", "4,8,8,8", "--fuse-channels", "8",
              "--rpn-channels", "8", "--epochs", "1"], (32, 32, 32), 3),
    "head": (["--input-size", "16,16,16", "--tiny", "--epochs", "1", "--levels", "1"], (24, 24, 24), 2),
}


def _readme_commands(client: str) -> list[list[str]]:
    """The ``python -m models.CLIENT ...`` and phantom lines of README's Clients section, as argv lists."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Clients"):]
    section = section[:section.index("\n## ", 4)]
    lines = re.findall(r"^\s*(python -m (?:models|tools)\.\S+ .*)$", section, flags=re.M)
    return [line.split()[2:] for line in lines if line.split()[2] in (f"models.{client}", "tools.phantom")
            and (line.split()[2] != "tools.phantom" or line.split()[3] == client)]


@pytest.mark.parametrize("client", sorted(TINY))
def test_readme_train_and_evaluate_work_as_written(client, tmp_path, monkeypatch, capsys):
    extra, shape, count = TINY[client]
    commands = _readme_commands(client)
    kinds = [c[0] for c in commands]
    assert kinds == ["tools.phantom", f"models.{client}", f"models.{client}"], commands
    phantom, train, evaluate = commands
    assert train[1:] == ["train", "--data", f"data/{client}", "--budget", "8GB"]
    assert evaluate[1:] == ["evaluate", "--data", f"data/{client}"]
    monkeypatch.chdir(tmp_path)
    generate_cases(client, Path(phantom[phantom.index("--out") + 1]), count=count, seed=0, shape=shape)
    main = importlib.import_module(f"models.{client}.__main__").main
    torch.manual_seed(0)
    assert main([*train[1:], *extra, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"memplan: vanilla peak .*budget 8\.00 GB", err), err
    ckpt = load_checkpoint_file(tmp_path / "runs" / client, client)        # the default --out, the shared schema
    assert ckpt.plans and all(p for p in ckpt.plans.values())
    assert torch.load(tmp_path / "runs" / client / "last.pt", weights_only=False)["format"] == FORMAT
    assert main([*evaluate[1:], "--quiet"]) == 0                           # the default --checkpoint
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("client", sorted(TINY))
def test_help_shows_defaults_and_the_module_runs(client):
    out = subprocess.run([sys.executable, "-m", f"models.{client}", "train", "--help"], cwd=ROOT, capture_output=True,
                         text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(default: runs/" + client + ")" in out.stdout and "(default: cpu)" in out.stdout
    assert "(default: 0)" in out.stdout                                    # --seed
    assert "--amp {bf16,fp16}" in out.stdout


def test_pose_trains_end_to_end_under_bf16(tmp_path, capsys):
    """--amp bf16: the plan is made for bf16 (its peaks are simulate_step's under bf16 with the client's
    loss, recomputed here), the run trains and the checkpoint evaluates."""
    import json

    import memplan
    from models.pose.train import build_model, planning_loss
    extra, shape, count = TINY["pose"]
    generate_cases("pose", tmp_path / "d", count=count, seed=0, shape=shape)
    main = importlib.import_module("models.pose.__main__").main
    torch.manual_seed(0)
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "d"), "--out", str(run), *extra, "--amp", "bf16", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "simulated, bf16 autocast" in err, err
    ckpt = load_checkpoint_file(run, "pose")
    plan = memplan.Plan.from_json(ckpt.plans["detector"])
    assert plan.amp == "bf16" and plan.fingerprint.endswith("+bf16")
    assert json.loads((run / "config.json").read_text())["amp"] == "bf16"
    model = build_model("v2", channels=4, depth=2)
    meta = torch.empty(1, 1, *shape, device="meta")
    want = memplan.simulate_step(model, meta, loss_fn=planning_loss("v2"), amp="bf16", threads=plan.threads)
    assert plan.simulated_vanilla_peak_bytes == want.peak_bytes
    fp32 = memplan.simulate_step(model, meta, loss_fn=planning_loss("v2"), threads=plan.threads).peak_bytes
    assert want.peak_bytes < fp32
    assert main(["evaluate", "--data", str(tmp_path / "d"), "--checkpoint", str(run), "--quiet"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("client", sorted(TINY))
def test_cuda_without_a_gpu_is_one_line_and_exit_2(client, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the same on a machine with a GPU
    main = importlib.import_module(f"models.{client}.__main__").main
    generate_cases(client, tmp_path, count=2, seed=0, shape=(16, 16, 16))
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --device cuda: no CUDA GPU is visible on this machine (torch.cuda.is_available() is "
                   f"False, torch {torch.__version__}); use --device cpu")
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("client", ["pose", *(pytest.param(c, marks=pytest.mark.slow) for c in ("face", "femur", "head"))])
def test_an_infeasible_budget_exits_3_with_the_smallest_peak(client, tmp_path, capsys):
    extra, shape, count = TINY[client]
    generate_cases(client, tmp_path / "d", count=count, seed=0, shape=shape)
    main = importlib.import_module(f"models.{client}.__main__").main
    assert main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "run"), "--budget", "100KB", *extra,
                 "--quiet"]) == 3
    err = capsys.readouterr().err
    smallest = int(re.search(r"smallest feasible peak .* = (\d+) bytes; rerun with --budget (\d+)", err).group(1))
    assert smallest > 100_000
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("client", sorted(TINY))
def test_a_nan_voxel_is_refused_naming_the_file(client, tmp_path, capsys):
    import nibabel as nib
    import numpy as np
    extra, shape, count = TINY[client]
    generate_cases(client, tmp_path / "d", count=count, seed=0, shape=shape)
    path = tmp_path / "d" / f"{client}_0001.nii.gz"
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).astype(np.float32)
    data[1, 2, 3] = np.inf
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))
    main = importlib.import_module(f"models.{client}.__main__").main
    assert main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "run"), *extra, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{client}_0001.nii.gz: 1 of {int(np.prod(shape))} voxels are not finite" in err and "(1, 2, 3)" in err
