"""Training through memplan.compile: the loss falls, and compiled gradients equal the plain model's."""
import copy

import numpy as np
import pytest
import torch

import memplan
from models.pose.dataset import PoseDataset
from models.pose.losses import FetusMapV2Loss, HeatmapL2Loss
from models.pose.train import (PAPER_WIDTH, PRESETS, VARIANTS, TrainConfig, build_model, compile_detector,
                               evaluate, load_checkpoint, make_dataset, predict_landmarks, split_cases, train)
from tools.phantom import generate_cases

TINY = dict(input_size=(32, 32, 32), channels=4, depth=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pose_train")
    generate_cases("pose", d, count=3, seed=1, shape=(32, 32, 32))
    return d


def test_tiny_v2_trains_through_memplan_and_its_loss_falls(data_dir, tmp_path):
    torch.manual_seed(0)
    config = TrainConfig(data=str(data_dir), out=str(tmp_path), variant="v2", epochs=4, lr=3e-3, augment=False,
                         progress=False, **TINY)
    result = train(config)
    first, last = result["losses"][0], result["losses"][-1]
    assert last < 0.99 * first, result["losses"]
    model, loaded = load_checkpoint(result["checkpoint"])
    assert loaded == config
    fresh = build_model("v2", channels=4, depth=2)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    # the checkpoint is the trained model: its loss on the data is the last epoch's, not the first's
    data = PoseDataset(data_dir, (32, 32, 32))
    with torch.no_grad():
        losses = [float(FetusMapV2Loss()(model(s["image"][None]), s["heatmaps"][None])) for s in data]
    assert np.mean(losses) < first
    assert predict_landmarks(model, data[0]["image"][None], "v2").shape == (1, 22, 3)


def test_compiled_and_plain_gradients_match_on_a_pose_batch(data_dir):
    torch.manual_seed(0)
    plain = build_model("v2", channels=4, depth=2)
    model = copy.deepcopy(plain)
    compiled = compile_detector(model, (2, 1, 32, 32, 32))
    assert any(s.recompute for s in compiled.memplan_plan.segments)          # checkpointing is really on
    data = PoseDataset(data_dir, (32, 32, 32))
    image = torch.stack([data[0]["image"], data[1]["image"]])
    target = torch.stack([data[0]["heatmaps"], data[1]["heatmaps"]])
    loss_plain = FetusMapV2Loss()(plain(image), target)
    loss_plain.backward()
    loss_compiled = FetusMapV2Loss()(compiled(image), target)
    loss_compiled.backward()
    torch.testing.assert_close(loss_compiled, loss_plain)
    grads_plain = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_plain[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fetusmap_variant_uses_l2_and_16_landmarks(data_dir, tmp_path):
    torch.manual_seed(0)
    config = TrainConfig(data=str(data_dir), out=str(tmp_path), variant="fetusmap", epochs=2, lr=3e-3,
                         augment=False, progress=False, budget="1GB", **TINY)
    result = train(config)
    assert result["losses"][-1] < result["losses"][0]
    model, _ = load_checkpoint(result["checkpoint"])
    assert model.head.out_channels == 16 and len(model.decoders[0]) == 3        # 3 convs per block
    # FetusMap's L2: sum over voxels, mean over batch and landmarks: channels of 1s and 2s against 0 -> (8 + 32) / 2
    pred = torch.cat([torch.ones(1, 1, 2, 2, 2), torch.full((1, 1, 2, 2, 2), 2.0)], dim=1)
    assert float(HeatmapL2Loss()(pred, torch.zeros_like(pred))) == 20.0
    # the loss trained on is the one the checkpoint's history reports: recompute the first step by hand
    state = torch.load(result["checkpoint"], weights_only=False)
    assert state["history"] == result["losses"] and len(result["losses"]) == 2


def test_variants_carry_the_papers_settings():
    v2, fm = VARIANTS["v2"], VARIANTS["fetusmap"]
    assert (v2.lr, v2.epochs, v2.pck_max_mm, len(v2.landmarks)) == (1e-4, 100, 20.0, 22)     # V2 §4.1
    assert (fm.lr, fm.epochs, fm.pck_max_mm, len(fm.landmarks)) == (1e-3, 20, 10.0, 16)     # FetusMap §3
    config = TrainConfig(data="x", variant="fetusmap")
    assert (config.resolved_lr, config.resolved_epochs) == (1e-3, 20)
    assert TrainConfig(data="x", variant="fetusmap", lr=5e-4).resolved_lr == 5e-4
    assert PRESETS["fetusmapv2"] == {"variant": "v2", "input_size": (208, 128, 144), "rev": True, "budget": "8GB"}
    # V2 Table 4: 147.98 MB of parameters; the paper width gives 37,063,407 float32 = 148.25 MB
    from models.blocks import count_parameters
    assert count_parameters(build_model("v2", channels=PAPER_WIDTH)) * 4 / 1e6 == pytest.approx(147.98, rel=0.003)
    assert count_parameters(build_model("v2")) == 22_579_446


def test_validation_split_keeps_the_best_epoch(data_dir, tmp_path):
    config = TrainConfig(data=str(data_dir), out=str(tmp_path), epochs=3, lr=3e-3, augment=False, progress=False,
                         val_fraction=1 / 3, **TINY)
    result = train(config)
    val = result["val_mean_ed_mm"]
    assert len(val) == 3 and result["best"]
    best = torch.load(result["best"], weights_only=False)
    assert best["epoch"] == int(np.argmin(val)) and best["extra"]["val_mean_ed_mm"] == val[:best["epoch"] + 1]
    # one held-out case, never trained on; best.pt's error on it is the recorded minimum
    model, loaded = load_checkpoint(result["best"])
    train_ids, val_ids = split_cases(loaded)
    assert len(val_ids) == 1 and len(train_ids) == 2 and not set(val_ids) & set(train_ids)
    ds = make_dataset(loaded, val_ids, augment=False)
    assert float(evaluate(model, ds, "v2").errors_mm.mean()) == pytest.approx(min(val), rel=1e-5)


@pytest.mark.slow
def test_budget_below_the_minimum_names_the_fix(data_dir, tmp_path):
    config = TrainConfig(data=str(data_dir), out=str(tmp_path), epochs=1, progress=False, budget="1MB", **TINY)
    with pytest.raises(memplan.MemplanError, match="raise the budget"):
        train(config)


def test_bad_variant_and_input_size(data_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown pose variant 'v3'"):
        train(TrainConfig(data=str(data_dir), out=str(tmp_path), variant="v3", **TINY))
    with pytest.raises(ValueError, match="not divisible by 2\\*\\*depth = 4"):
        train(TrainConfig(data=str(data_dir), out=str(tmp_path), input_size=(30, 32, 32), channels=4, depth=2))
