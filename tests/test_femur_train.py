"""Femur training end to end on phantoms: losses fall, memplan-compiled gradients equal plain ones,
checkpoints reload, and the command line trains and evaluates."""
import copy
import json

import pytest
import torch

import memplan
from models.femur.__main__ import main
from models.femur.adversarial import AdversarialSchedule
from models.femur.dataset import FemurDataset
from models.femur.losses import branch_loss
from models.femur.net import BranchedFemurNet
from models.femur.train import TrainConfig, load_branch, load_roi, train, train_roi
from tools.phantom import generate_cases

TINY = dict(channels=(2, 4, 4, 8), disc_channels=(2, 2, 4, 4, 4, 4), roi_channels=(2, 4, 8))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("femur_phantoms")
    generate_cases("femur", out, count=4, seed=0, shape=(32, 32, 32))
    return out


def _config(data, out, **kw):
    base = dict(data_dir=str(data), out_dir=str(out), patch_size=(16, 16, 16), roi_volume_size=(32, 32, 32),
                roi_margin_vox=3, sigma_vox=1.5, lr=3e-3, augment=False, progress=False, roi_scale=None, **TINY)
    return TrainConfig(**(base | kw))


def test_tiny_config_trains_with_loss_falling(phantoms, tmp_path):
    config = _config(phantoms, tmp_path, schedule=AdversarialSchedule(5, 2), roi_epochs=0, compile=False)
    result = train(config)
    hist = result.branch_history
    assert len(hist) == 7 and "gan" not in hist[4] and {"gan", "d"} <= set(hist[5])
    assert hist[-1]["total"] < 0.8 * hist[0]["total"]
    assert hist[4]["hybrid"] < hist[0]["hybrid"] and hist[4]["reg"] < hist[0]["reg"]
    # the checkpoint holds the plain model's state_dict and the config to rebuild it
    model, stored = load_branch(result.checkpoint)
    assert tuple(stored["channels"]) == (2, 4, 4, 8) and stored["schedule"]["adversarial_epochs"] == 2
    state = torch.load(result.checkpoint, weights_only=False)
    assert set(state["models"]["branch"]) == set(BranchedFemurNet(3, 1, 2, channels=(2, 4, 4, 8)).state_dict())
    assert [h["total"] for h in state["history"]] == [h["total"] for h in hist]


def test_roi_detector_loss_falls(phantoms, tmp_path):
    model, history = train_roi(_config(phantoms, tmp_path, roi_epochs=4))
    assert history[-1] < history[0]


def _step(module, params, batch):
    """Outputs, L_branch and parameter gradients of one forward/backward of ``module``."""
    outputs = module(batch["image"])
    loss = branch_loss(outputs, batch["labels"], batch["heatmaps"]).total
    loss.backward()
    return [o.detach() for o in outputs], loss.item(), [p.grad for p in params]


@pytest.mark.parametrize("budget", [None, "1.8MB"])   # least memory; a budget under the plain step's 2.2 MB
def test_compiled_and_plain_gradients_equal(phantoms, budget):
    torch.manual_seed(0)
    data = FemurDataset(phantoms, (16, 16, 16), roi_margin_vox=3)
    batch = torch.utils.data.default_collate([data[0], data[1]])
    model = BranchedFemurNet(3, 1, 2, channels=(2, 4, 4, 8)).train()
    plain = copy.deepcopy(model)
    compiled = memplan.compile(model, torch.empty(2, 1, 16, 16, 16, device="meta"), budget=budget)
    plan = compiled.memplan_plan
    assert any(seg.recompute for seg in plan.segments)              # the plan really recomputes something
    assert plan.simulated_peak_bytes < plan.simulated_vanilla_peak_bytes
    out_plain, loss_plain, g_plain = _step(plain, list(plain.parameters()), batch)
    out_comp, loss_comp, g_comp = _step(compiled, list(model.parameters()), batch)
    assert len(out_comp) == 3 and loss_comp == pytest.approx(loss_plain, rel=1e-6)
    for a, b in zip(out_plain, out_comp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_plain, g_comp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # recomputation must not update BatchNorm statistics a second time
    for (name, a), b in zip(plain.named_buffers(), model.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_command_line_trains_compiled_and_evaluates(phantoms, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    rc = main(["train", "--data", str(phantoms), "--out", str(ckpt), "--config", "tiny", "--input-size", "16,16,16",
               "--epochs", "2", "--adv-epochs", "1", "--roi-epochs", "1", "--roi-size", "32,32,32",
               "--roi-margin", "3", "--budget", "1GB", "--lr", "3e-3", "--gamma", "0.25", "--theta", "50"])
    captured = capsys.readouterr()
    assert rc == 0 and "trained 3 epochs" in captured.out and "memplan: vanilla peak" in captured.err
    roi, size = load_roi(ckpt)
    assert size == (32, 32, 32)
    stored = torch.load(ckpt / "last.pt", weights_only=False)["config"]
    assert (stored["loss"]["gamma"], stored["loss"]["theta"], stored["cross"]) == (0.25, 50.0, True)
    report = tmp_path / "metrics.json"
    assert main(["evaluate", "--data", str(phantoms), "--checkpoint", str(ckpt), "--json", str(report)]) == 0
    payload = json.loads(report.read_text())
    assert len(payload["cases"]) == 4
    for case in payload["cases"]:
        assert 0.0 <= case["dsc"] <= 1.0 and 0.0 <= case["roi_iou"] <= 1.0 and case["p1_error_mm"] >= 0.0
    # with the ground-truth ROI the IoU is the tight box against itself: exactly 1 (no 30-voxel enlargement first)
    assert main(["evaluate", "--data", str(phantoms), "--checkpoint", str(ckpt), "--gt-roi", "--json", str(report)]) == 0
    assert all(case["roi_iou"] == 1.0 for case in json.loads(report.read_text())["cases"])
    assert main(["train", "--data", str(phantoms), "--out", str(ckpt), "--input-size", "12,16,16"]) == 2
    assert "divisible by 8" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(phantoms), "--checkpoint", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_variants_switch_cross_connections_gamma_and_the_gan(phantoms, tmp_path, capsys):
    for variant, cross, gamma, epochs in (("brn", False, 0.0, 1), ("brnd", False, 0.5, 1), ("brndc-d", True, 0.5, 2)):
        out = tmp_path / variant
        assert main(["train", "--data", str(phantoms), "--out", str(out), "--config", "tiny", "--input-size",
                     "16,16,16", "--epochs", "1", "--adv-epochs", "1", "--roi-epochs", "0", "--roi-margin", "3",
                     "--variant", variant, "--quiet"]) == 0
        state = torch.load(out / "last.pt", weights_only=False)
        assert (state["config"]["cross"], state["config"]["loss"]["gamma"], len(state["history"])) == \
            (cross, gamma, epochs)
        assert ("gan" in state["history"][-1]) == (variant == "brndc-d")


def test_memplan_plans_with_l_branch():
    from models.femur.losses import BranchLossConfig
    from models.femur.train import planning_loss
    outputs = BranchedFemurNet(3, 1, 2, channels=(2, 4, 4, 8))(torch.randn(1, 1, 16, 16, 16))
    zeros = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    expected = branch_loss(outputs, zeros, torch.zeros(1, 2, 16, 16, 16)).total
    assert float(planning_loss(BranchLossConfig())(outputs).detach()) == pytest.approx(float(expected.detach()))


@pytest.mark.parametrize("variant", ["unet-s", "unet-l"])
def test_one_branch_baselines_train_and_report_only_their_metrics(phantoms, tmp_path, variant):
    out = tmp_path / variant
    assert main(["train", "--data", str(phantoms), "--out", str(out), "--config", "tiny", "--input-size", "16,16,16",
                 "--epochs", "1", "--roi-epochs", "0", "--roi-margin", "3", "--variant", variant, "--quiet"]) == 0
    history = torch.load(out / "last.pt", weights_only=False)["history"][0]
    assert (history["hybrid"] == 0.0) == (variant == "unet-l") and (history["reg"] == 0.0) == (variant == "unet-s")
    report = tmp_path / "m.json"
    assert main(["evaluate", "--data", str(phantoms), "--checkpoint", str(out), "--gt-roi", "--json", str(report),
                 "--quiet"]) == 0
    case = json.loads(report.read_text())["cases"][0]
    assert (case["dsc"] is None) == (variant == "unet-l") and (case["p1_error_mm"] is None) == (variant == "unet-s")
