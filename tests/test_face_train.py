"""Face client end to end: tiny training through memplan.compile, gradient equality, the command line."""
import copy

import pytest
import torch

import memplan
from models.face.__main__ import main
from models.face.evaluate import evaluate, load_checkpoint
from models.face.losses import rpn_loss
from models.face.net import FaceRPN, flatten_head, tiny_config
from models.face.train import (TrainConfig, batch_loss, batch_targets, compile_model, held_bytes, make_anchors,
                               planning_loss, train, train_step)
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


# ---------------------------------------------------------------------------------------------
# The planning loss against the real step (models/face/train.py: planning_loss, held_bytes)
# ---------------------------------------------------------------------------------------------

def _real_batch(model):
    torch.manual_seed(0)
    image = torch.randn(1, 1, *SIZE)
    anchors = make_anchors(SIZE, 0.5)
    landmarks = torch.tensor([[[18.0, 12, 14], [14, 16, 17], [18, 20, 14], [10, 16, 18], [4, 16, 15]]])
    return image, anchors, landmarks


@pytest.fixture(scope="module")
def least_memory():
    torch.manual_seed(0)
    model = FaceRPN(**tiny_config())
    return model, compile_model(model, SIZE, 1, None).module


def test_fixed_anchor_rows_give_the_real_losss_peak(least_memory):
    """The data-dependent sampling of rpn_loss and the planning loss's fixed rows peak alike (the profiler)."""
    model, compiled = least_memory
    image, anchors, landmarks = _real_batch(model)
    targets, boxes = batch_targets(landmarks, anchors, box_scale=0.5, generator=torch.Generator().manual_seed(0))
    assert int((targets[0].labels > 0).sum()) > 0                    # real positives, picked by data

    def real(outputs):
        return batch_loss(outputs, targets, boxes, anchors, num_anchors=model.num_anchors).total

    planned = memplan.measure_step(compiled, image, loss_fn=planning_loss(model.num_anchors)).peak_bytes
    assert memplan.measure_step(compiled, image, loss_fn=real).peak_bytes == planned
    assert planned == compiled.memplan_plan.simulated_peak_bytes        # and the plan's ruler says the same


def _profiled_train_steps(network, model, image, landmarks, anchors, steps=2):
    """Peak bytes of ``steps`` real face training steps (targets built per step, as train() does), by the
    CPU profiler: the bytes live before (parameters, buffers, image, anchors) plus the largest running sum."""
    from memplan.measure import allocator_events, running_peak
    live = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*model.parameters(), *model.buffers(), image, anchors]}

    def steps_run() -> None:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(steps):
            targets, boxes = batch_targets(landmarks, anchors, box_scale=0.5, generator=generator)
            train_step(network, optimizer, image, targets, boxes, anchors, num_anchors=model.num_anchors)
            del targets, boxes

    _, deltas = allocator_events(steps_run)
    return sum(live.values()) + running_peak(deltas)[0]


def test_real_training_step_peaks_at_the_planned_step_plus_the_loops_held_bytes(least_memory):
    model, compiled = least_memory
    image, anchors, landmarks = _real_batch(model)
    targets, boxes = batch_targets(landmarks, anchors, box_scale=0.5, generator=torch.Generator().manual_seed(0))
    t = targets[0]
    stored = sum(x.untyped_storage().nbytes() for x in (anchors, t.labels, t.matched, t.deltas, t.max_iou, boxes[0]))
    assert held_bytes(SIZE, 1) == stored == 68 * 32768 + 5 * 6 * 4     # 8^3 cells x 64 anchors, 68 B each
    real = _profiled_train_steps(compiled, model, image, landmarks, anchors)
    # train_step drops the head maps once the loss is built (memplan's ruler: keep_output=False); what it
    # holds besides is the loop's data, and RPNLoss's two more scalars (8 B)
    dropped = memplan.simulate_step(compiled, torch.empty(1, 1, *SIZE, device="meta"),
                                    loss_fn=planning_loss(model.num_anchors), keep_output=False).peak_bytes
    assert 0 <= real - (dropped + held_bytes(SIZE, 1)) <= 64
    plan = compiled.memplan_plan                   # planned with the maps held: the budget check is on the safe side
    assert real <= plan.simulated_peak_bytes + held_bytes(SIZE, 1)
    assert real > 1.03 * plan.simulated_peak_bytes   # the plan alone is 3.7% under the real step here (tiny widths)


@pytest.mark.slow
def test_the_budget_is_the_whole_steps_the_network_gets_it_less_the_held_bytes(least_memory):
    model, compiled = least_memory
    held = held_bytes(SIZE, 1)
    floor = compiled.memplan_plan.simulated_peak_bytes
    plan = compile_model(model, SIZE, 1, floor + held + 10 ** 6).plan
    assert plan.budget_bytes == floor + 10 ** 6 and plan.simulated_peak_bytes <= plan.budget_bytes
    with pytest.raises(memplan.BudgetError) as err:
        compile_model(model, SIZE, 1, "1MB")
    assert err.value.min_feasible_bytes == floor + held and "anchor targets held by the training loop" in str(err.value)
    fixed = compile_model(model, SIZE, 1, err.value.min_feasible_bytes).plan       # the budget it names plans
    assert fixed.simulated_peak_bytes == floor
