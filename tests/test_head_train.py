"""The head client through memplan: trace coverage, compiled == plain gradients, training, the CLI."""
import copy
import json

import pytest
import torch
from torch import nn

import memplan
from models.head.__main__ import main
from models.head.losses import DeepSupervisionLoss
from models.head.net import TINY_CONFIG, USegNetHAS
from models.head.train import TrainConfig, train
from tools.phantom import generate_cases


def _tiny(seed=0):
    torch.manual_seed(seed)
    return USegNetHAS.from_config(TINY_CONFIG)


def test_memplan_traces_the_5x5x5_convs_and_the_attention_branches():
    net = _tiny()
    graph = memplan.trace(net, torch.empty(1, 1, 16, 16, 16, device="meta"))
    by_target = {info.target: info for info in graph}
    convs = {name: m for name, m in net.named_modules() if isinstance(m, nn.Conv3d)}
    big = {name: m for name, m in convs.items() if m.kernel_size == (5, 5, 5)}
    assert sorted(big) == ["encoders.2.0.0", "encoders.2.1.0", "encoders.3.0.0", "encoders.3.1.0"]
    for name, side in [("encoders.2.0.0", 4), ("encoders.3.1.0", 2)]:
        assert by_target[name].out_shapes == ((1, 8, side, side, side),)
        assert by_target[name].out_bytes == 8 * side ** 3 * 4
    # FLOPs scale with C_in * C_out * k^3 * output voxels for every conv, 1x1x1, 3x3x3 and 5x5x5 alike.
    ratios = {name: by_target[name].flops / (m.in_channels * m.out_channels * m.kernel_size[0] ** 3
                                            * by_target[name].out_shapes[0][2] ** 3)
              for name, m in convs.items()}
    assert len(convs) == len(ratios) == sum(1 for i in graph if i.target in convs)
    assert max(ratios.values()) == pytest.approx(min(ratios.values()))
    # Each attention module is a branch: project -> weigh -> softmax, rejoined by mul(softmax, project).
    softmaxes = [i.name for i in graph if "softmax" in i.target]
    assert len(softmaxes) == 6  # 3 SAMs + 3 UAMs
    for module in ["sams.0", "sams.2", "uams.1"]:
        project = by_target[f"{module}.project"].name
        muls = [m for m in graph.dag.successors(project) if "mul" in graph.info(m).target]
        assert len(muls) == 1
        preds = set(graph.dag.predecessors(muls[0]))
        assert project in preds and any(p in softmaxes for p in preds)


@pytest.mark.parametrize("budget", [None, "1GB"])
def test_compiled_and_plain_gradients_equal(budget):
    plain = _tiny(1)
    model = copy.deepcopy(plain)
    compiled = memplan.compile(model, torch.empty(1, 1, 16, 16, 16, device="meta"), budget=budget)
    if budget is None:  # least memory: something must be recomputed, or this test checks nothing
        assert any(s.recompute for s in compiled.memplan_plan.segments)
    torch.manual_seed(2)
    x = torch.randn(1, 1, 16, 16, 16)
    labels = (torch.rand(1, 16, 16, 16) > 0.6).long()
    loss_fn = DeepSupervisionLoss()
    ref = loss_fn(plain(x), labels)
    ref.backward()
    got = loss_fn(compiled(x), labels)
    got.backward()
    torch.testing.assert_close(got, ref)
    plain_params = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    plain_buffers = dict(plain.named_buffers())
    for name, b in model.named_buffers():  # BatchNorm statistics updated exactly once
        torch.testing.assert_close(b, plain_buffers[name], msg=name)


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("head_phantoms")
    generate_cases("head", d, count=2, seed=0, shape=(24, 24, 24))
    return d


def test_tiny_config_trains_with_loss_falling(phantom_dir, tmp_path):
    config = TrainConfig(data_dir=phantom_dir, out_dir=tmp_path, input_size=(16, 16, 16), net=TINY_CONFIG,
                         levels=2, epochs=6, lr=3e-3, augment=None, progress=False, seed=0)
    results = train(config)
    assert [r.level for r in results] == [1, 2]
    for r in results:
        assert len(r.epoch_losses) == 6
        assert r.epoch_losses[-1] < 0.8 * r.epoch_losses[0], r.epoch_losses
        assert max(r.epoch_losses[1:]) < r.epoch_losses[0], r.epoch_losses
    assert results[0].checkpoint == results[1].checkpoint == tmp_path / "last.pt"
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    fresh = USegNetHAS.from_config(TINY_CONFIG)
    fresh.load_state_dict(state["models"]["level2"])  # the original model's keys, not the compiled module's
    assert sorted(state["models"]) == ["level1", "level2"] and state["extra"]["input_size"] == [16, 16, 16]
    assert [h for h in state["history"]] == [list(r.epoch_losses) for r in results]
    assert all(memplan.Plan.from_json(state["plans"][k]).segments for k in ("level1", "level2"))


def test_cli_train_then_evaluate(phantom_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["train", "--data", str(phantom_dir), "--out", str(ckpt), "--input-size", "16,16,16",
                 "--epochs", "1", "--levels", "2", "--tiny", "--budget", "1GB", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert "memplan: vanilla peak" in captured.err and "level 2: loss" in captured.out
    assert main(["evaluate", "--data", str(phantom_dir), "--checkpoint", str(ckpt)]) == 0
    report = json.loads((ckpt / "metrics.json").read_text())
    assert len(report["mean_per_level"]) == 2 and sorted(report["cases"]) == ["head_0000", "head_0001"]
    for level in report["cases"]["head_0000"]:
        assert 0.0 <= level["dsc"] <= 1.0 and level["jaccard"] <= level["dsc"]
    assert "volume r" in capsys.readouterr().out
    # the volume agreement of the report is the case volumes' own (recomputed here from the per-case errors)
    from models.data import load_case
    from models.segmetrics import bland_altman, volume_ml
    true = [volume_ml(load_case(phantom_dir, c).mask > 0, load_case(phantom_dir, c).spacing_mm)
            for c in ("head_0000", "head_0001")]
    for k, agree in enumerate(report["volume_agreement_per_level"]):
        pred = [t + report["cases"][c][k]["volume_error_ml"] for t, c in zip(true, ("head_0000", "head_0001"))]
        expected = bland_altman(pred, true)
        assert agree["bias_ml"] == pytest.approx(expected[1]) and agree["loa_ml"] == pytest.approx(expected[2])


def test_cli_errors_name_the_fix(phantom_dir, tmp_path, capsys):
    assert main(["evaluate", "--data", str(tmp_path), "--checkpoint", str(tmp_path / "none")]) == 2
    assert "does not exist; train one with `python -m models.head train" in capsys.readouterr().err
    assert main(["train", "--data", str(phantom_dir), "--out", str(tmp_path), "--input-size", "20,16,16",
                 "--tiny"]) == 2
    assert "(20, 16, 16) must have 3 sizes, each a multiple of 8" in capsys.readouterr().err


def test_defaults_are_the_papers_and_the_plan_uses_eq2():
    """§3: 0.4x volumes, Adam lr 1e-5, moment 0.5, 30 epochs per level, 2 levels; memplan plans with Eq. 2."""
    from models.head.net import PAPER_INPUT_SIZE
    from models.head.train import planning_loss
    config = TrainConfig(data_dir="x")
    assert (config.input_size, config.lr, config.betas[0], config.epochs, config.levels) == \
        (PAPER_INPUT_SIZE, 1e-5, 0.5, 30, 2)
    assert PAPER_INPUT_SIZE == tuple(round(0.4 * n / 8) * 8 for n in (388, 258, 440))
    outputs = (torch.randn(1, 2, 8, 8, 8), torch.randn(1, 2, 4, 4, 4), torch.randn(1, 2, 2, 2, 2))
    zeros = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    assert float(planning_loss((1.0, 1.0))(outputs)) == pytest.approx(float(DeepSupervisionLoss()(outputs, zeros)))
    no_ds = TrainConfig(data_dir="x", net=TINY_CONFIG.__class__(**{**TINY_CONFIG.__dict__, "deep_supervision": False}))
    assert no_ds.resolved_aux_weights == ()
