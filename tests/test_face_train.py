"""Face client end to end: tiny training through memplan.compile, gradient equality, the command line."""
import copy

import pytest
import torch

import memplan
from models.face.__main__ import main
from models.face.evaluate import evaluate, load_checkpoint
from models.face.losses import rpn_loss
from models.face.net import FaceRPN, flatten_head, tiny_config
from models.face.train import TrainConfig, batch_targets, make_anchors, train
from tools.phantom import generate_cases

SIZE = (32, 32, 32)
TINY = {"channels": (4, 8, 8, 8), "fuse_channels": 8, "rpn_channels": 8}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("face_phantoms")
    generate_cases("face", out, count=4, seed=0, shape=SIZE)
    return out


def test_tiny_config_trains_with_loss_falling(phantoms, tmp_path):
    torch.set_num_threads(1)
    config = TrainConfig(data=str(phantoms), out=str(tmp_path), input_size=SIZE, epochs=12, lr=3e-3, spacing_mm=2.6,
                         augment=False, anchor_batch=128, progress=False, **TINY)
    model, history = train(config)
    assert len(history) == 12
    assert history[-1] < 0.7 * history[0], history
    # the checkpoint is the original model's state_dict: it loads strictly into a fresh FaceRPN
    loaded = load_checkpoint(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    metrics = evaluate(loaded, phantoms)
    assert 0.0 <= metrics.ap <= metrics.ap50 <= metrics.ap35 <= 1.0
    assert 0.0 <= metrics.miou <= 1.0 and metrics.mean_distance_mm >= 0 and metrics.inference_ms > 0


def _loss(network, image, anchors, targets, boxes, num_anchors):
    scores, deltas = flatten_head(*network(image), num_anchors)
    return rpn_loss(scores, deltas, anchors, targets, boxes).total


def _midway_budget(model, example):
    """Half-way between the least-memory plan's and the unplanned step's peaks (the larger of memplan's
    cost-model and simulated figures at each end, so the budget is feasible for both)."""
    least = memplan.plan(model, example)
    low = max(least.predicted_peak_bytes, least.simulated_peak_bytes)
    high = max(least.vanilla_peak_bytes, least.simulated_vanilla_peak_bytes)
    return (low + high) // 2


@pytest.mark.parametrize("budget_kind", ["least", "midway"])
def test_compiled_and_plain_gradients_equal(budget_kind):
    torch.manual_seed(0)
    model = FaceRPN(**tiny_config())
    image = torch.randn(1, 1, *SIZE)
    anchors = make_anchors(SIZE, 0.5)
    landmarks = torch.tensor([[[18.0, 12, 14], [14, 16, 17], [18, 20, 14], [10, 16, 18], [4, 16, 15]]])
    targets, boxes = batch_targets(landmarks, anchors, box_scale=0.5, generator=torch.Generator().manual_seed(0))
    start = copy.deepcopy(model.state_dict())

    _loss(model, image, anchors, targets, boxes, model.num_anchors).backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    plain_buffers = {n: b.clone() for n, b in model.named_buffers()}

    model.load_state_dict(start)
    model.zero_grad(set_to_none=True)
    example = torch.empty(1, 1, *SIZE, device="meta")
    budget = None if budget_kind == "least" else _midway_budget(model, example)
    compiled = memplan.compile(model, example, budget=budget)
    _loss(compiled, image, anchors, targets, boxes, model.num_anchors).backward()
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, plain_grads[name], rtol=1e-5, atol=1e-7), name
    for name, buffer in model.named_buffers():   # BatchNorm statistics updated exactly once
        assert torch.allclose(buffer.float(), plain_buffers[name].float(), rtol=1e-6, atol=1e-7), name


def test_command_line_train_and_evaluate(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--data", str(phantoms), "--out", str(run), "--input-size", "32,32,32", "--epochs", "1",
                 "--channels", "4,8,8,8", "--fuse-channels", "8", "--rpn-channels", "8", "--spacing-mm", "2.6",
                 "--budget", "1GB", "--no-augment"])
    assert code == 0 and (run / "last.pt").is_file() and (run / "graph_prior.json").is_file()
    assert "memplan: vanilla peak" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(phantoms)]) == 0
    assert "AP50" in capsys.readouterr().out


def test_command_line_errors(phantoms, tmp_path, capsys):
    assert main(["train", "--data", str(phantoms), "--out", str(tmp_path), "--input-size", "30,32,32"]) == 2
    assert "divisible by 8" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope"), "--data", str(phantoms)]) == 2
    assert "does not exist; train one with `python -m models.face train" in capsys.readouterr().err


def test_memplan_plans_with_the_rpn_loss(phantoms, monkeypatch):
    """The planning loss flattens the head maps as rpn_loss does: its backward holds the same buffers."""
    from models.face.train import planning_loss
    torch.manual_seed(0)
    model = FaceRPN(**tiny_config())
    example = torch.empty(1, 1, *SIZE, device="meta")
    real = memplan.simulate_step(model, example, loss_fn=planning_loss(model.num_anchors), scratch="none").peak_bytes
    summed = memplan.simulate_step(model, example, scratch="none").peak_bytes
    # flatten_head copies both (1, 384, 8, 8, 8) maps (permute + reshape); with the loop holding the raw maps
    # through backward in both steps, the copies and their gradients still add at least one map's bytes
    assert real - summed >= 384 * 8 ** 3 * 4
    scores, deltas = flatten_head(*model(torch.randn(1, 1, *SIZE)), model.num_anchors)
    value = planning_loss(model.num_anchors, 8)(model(torch.randn(1, 1, *SIZE)))
    assert value.ndim == 0 and torch.isfinite(value)
