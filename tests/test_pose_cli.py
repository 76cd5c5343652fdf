"""python -m models.pose train | evaluate | refine, end to end on phantoms (tiny sizes)."""
import math
import re
import warnings

import numpy as np

import pytest
import torch

import memplan
from models.pose.__main__ import main
from models.pose.losses import FetusMapV2Loss
from models.pose.refine import refine_case
from models.pose.train import build_model, load_checkpoint, planning_loss
from tools.phantom import generate_cases

TINY = ["--input-size", "32,32,32", "--channels", "4", "--depth", "2"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    generate_cases("pose", root / "train", count=8, seed=2, shape=(32, 32, 32))
    generate_cases("pose", root / "test", count=1, seed=3, shape=(32, 32, 32))
    return root


def test_train_evaluate_refine(dirs, capsys):
    torch.manual_seed(0)
    out = dirs / "run"
    assert main(["train", "--data", str(dirs / "train"), "--out", str(out), "--epochs", "1", "--budget", "1GB",
                 "--lr", "1e-3", *TINY]) == 0
    assert re.search(r"loss \d+\.\d+ -> \d+\.\d+; checkpoint", capsys.readouterr().out)
    assert (out / "last.pt").is_file() and (out / "config.json").is_file()
    assert main(["evaluate", "--checkpoint", str(out / "last.pt"), "--data", str(dirs / "test")]) == 0
    table = capsys.readouterr().out
    assert "l_wrist" in table and "crl_mm" in table and re.search(r"mean\s+\d+\.\d+\s+\d+\.\d+", table)
    assert main(["refine", "--checkpoint", str(out / "last.pt"), "--data", str(dirs / "test"), "--library",
                 str(dirs / "train"), "--iterations", "2", "--k", "4"]) == 0
    text = capsys.readouterr().out
    assert "before SSL" in text and "after SSL" in text and re.search(r"mean ED \d+\.\d+ -> \d+\.\d+ mm", text)


def test_rev_budget_and_the_real_loss_reach_memplan(dirs, monkeypatch, capsys):
    seen = {}
    real = memplan.compile

    def spy(model, example, **kwargs):
        seen.update(kwargs, shape=tuple(example.shape), device=example.device.type)
        return real(model, example, **{**kwargs, "rev": False})

    monkeypatch.setattr(memplan, "compile", spy)
    assert main(["train", "--data", str(dirs / "train"), "--out", str(dirs / "rev"), "--epochs", "1",
                 "--budget", "2GB", "--rev", "--batch-size", "2", *TINY]) == 0
    loss_fn = seen.pop("loss_fn")
    assert seen == {"budget": "2GB", "optimizer": "adam", "rev": True, "shape": (2, 1, 32, 32, 32), "device": "meta",
                    "scratch": "cpu", "amp": None}
    out = torch.randn(2, 22, 4, 4, 4)                     # memplan plans with Eq. 8 itself, not a sum of outputs
    assert float(loss_fn(out)) == pytest.approx(float(FetusMapV2Loss()(out, torch.zeros_like(out))))
    assert float(loss_fn(out)) != pytest.approx(float(out.sum()))
    state = torch.load(dirs / "rev" / "last.pt", weights_only=False)
    assert "detector" in state["compiled"] and state["config"]["rev"] is True
    assert memplan.Plan.from_json(state["plans"]["detector"]).segments


#: The smallest pose net found where REV pays on the CPU (CPU convolution scratch counted, the output held
#: through backward): the full-resolution decoder layer (4 -> 4 channels) as a reversible block lowers the
#: simulated peak 79,003,032 -> 76,941,124 B (2.6%, over memplan's 1% rev_min_gain). At 48^3, 64x40x40 or depth 2
#: it pays nothing and --rev rightly leaves the network unchanged.
REV_PAYS = ["--input-size", "56,48,48", "--channels", "4", "--depth", "3"]


def test_real_rev_training_then_refine_runs_the_trained_substituted_network(dirs, tmp_path, monkeypatch, capsys):
    """The FetusMapV2 pipeline: train --rev (memplan replaces a pass), the checkpoint rebuilds that network with
    its trained weights, then refine (SSL) fine-tunes a copy of it per case."""
    generate_cases("pose", tmp_path / "train", count=2, seed=4, shape=(56, 48, 48))     # two steps: CPU-cheap
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="REV substitution changed the network"):
        assert main(["train", "--data", str(tmp_path / "train"), "--out", str(run), "--epochs", "1", "--rev",
                     "--lr", "1e-3", *REV_PAYS]) == 0
    assert re.search(r"planned peak .*, 1 REV block\(s\); budget none", capsys.readouterr().err)
    state = torch.load(run / "last.pt", weights_only=False)
    plan = memplan.Plan.from_json(state["plans"]["detector"])
    assert len(plan.rev) == 1 and plan.simulated_peak_bytes < plan.simulated_vanilla_peak_bytes
    record = plan.rev[0]
    plain = build_model("v2", channels=4, depth=3)
    modules = dict(plain.named_modules())
    conv, bn, relu = (modules[name] for name in record.replaced)        # the Conv-BN-ReLU pass it replaced
    assert (type(conv), type(bn), type(relu)) == (torch.nn.Conv3d, torch.nn.BatchNorm3d, torch.nn.ReLU)
    c, k = conv.in_channels, conv.kernel_size
    assert c == conv.out_channels == 4 and k == (3, 3, 3) and conv.bias is None
    # by hand: a C -> C 3x3x3 conv (no bias: BN follows) and BN (2C) before; F and G, each a C/2 -> C/2 conv
    # without bias and BN (C), after
    assert record.params_before == c * c * 27 + 2 * c == 440
    assert record.params_after == 2 * ((c // 2) ** 2 * 27 + c) == 224
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # the trained REV weights load: no "fresh weights" warning
        loaded, config = load_checkpoint(run / "last.pt")
    assert config.rev and loaded.memplan_plan.rev == plan.rev
    count = lambda m: sum(p.numel() for p in m.parameters())          # noqa: E731
    assert count(loaded) == count(plain) - record.params_before + record.params_after
    got = loaded.state_dict()
    assert got.keys() == state["compiled"]["detector"].keys()
    assert all(torch.equal(got[key], v) for key, v in state["compiled"]["detector"].items())
    block = [key for key in got if key.startswith(record.new_module + ".")]
    assert block and not any(key.startswith(record.replaced[0] + ".") for key in got)
    with pytest.warns(UserWarning, match="fresh weights"):                # the block's seeded fresh weights ...
        fresh = memplan.compile(build_model("v2", channels=4, depth=3), torch.empty(1, 1, 56, 48, 48), plan=plan)
    assert any(not torch.equal(fresh.state_dict()[key], got[key]) for key in block)   # ... were trained
    plain.load_state_dict(state["models"]["detector"])
    x = torch.randn(1, 1, 56, 48, 48)
    with torch.no_grad():
        assert not torch.allclose(loaded(x), plain(x))        # the REV block is in use, with its own weights

    results = []
    real_refine = refine_case

    def spy(model, image, *args, **kwargs):
        before = {key: v.clone() for key, v in model.state_dict().items()}
        result = real_refine(model, image, *args, **kwargs)
        assert all(torch.equal(before[key], v) for key, v in model.state_dict().items())   # refines a copy
        results.append((model, tuple(image.shape), result))
        return result

    monkeypatch.setattr("models.pose.__main__.refine_case", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # it used to crash on the REV module
        assert main(["refine", "--checkpoint", str(run), "--data", str(dirs / "test"), "--library",
                     str(dirs / "train"), "--iterations", "2", "--k", "4"]) == 0
    text = capsys.readouterr().out
    assert "before SSL" in text and "after SSL" in text
    before_mm, after_mm = map(float, re.search(r"mean ED (\S+) -> (\S+) mm", text).groups())
    assert math.isfinite(before_mm) and math.isfinite(after_mm)
    (model, shape, result), = results                  # one test case, refined on the REV detector
    assert model.memplan_plan.rev == plan.rev and shape == (1, 1, 56, 48, 48)
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    for pred in (result.before_vox, result.after_vox):
        assert pred.shape == (22, 3) and np.isfinite(pred).all()
        assert (pred >= 0).all() and (pred <= np.array(shape[2:]) - 1).all()


def test_plan_summary_and_per_step_progress_go_to_stderr(dirs, capsys):
    assert main(["train", "--data", str(dirs / "train"), "--out", str(dirs / "p"), "--epochs", "2", *TINY]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("memplan:"))
    assert re.search(r"vanilla peak [\d.]+ [KMG]iB, planned peak [\d.]+ [KMG]iB \(\d+% of vanilla, simulated\), "
                     r"recompute [\d.]+% of forward FLOPs; budget none", line)
    assert "16/16" in err and "epoch 2/2" in err                 # 8 cases x 2 epochs, one update per case


@pytest.mark.slow
def test_cuda_without_a_gpu_and_an_infeasible_budget_exit_like_memplan(dirs, capsys):
    if not torch.cuda.is_available():
        assert main(["train", "--data", str(dirs / "train"), "--device", "cuda", *TINY]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "no CUDA GPU is visible" in err and "--device cpu" in err
    assert main(["train", "--data", str(dirs / "train"), "--out", str(dirs / "b"), "--budget", "1MB", *TINY]) == 3
    err = capsys.readouterr().err
    smallest = int(re.search(r"smallest feasible peak .* = (\d+) bytes", err).group(1))
    plan = memplan.plan(build_model("v2", channels=4, depth=2), torch.empty(1, 1, 32, 32, 32, device="meta"),
                        loss_fn=planning_loss("v2"), scratch="cpu")
    assert smallest == plan.simulated_peak_bytes > 10 ** 6
    assert not (dirs / "b" / "last.pt").exists()


def test_a_nan_voxel_is_refused_naming_the_case(dirs, tmp_path, capsys):
    import shutil
    import nibabel as nib
    import numpy as np
    bad = tmp_path / "bad"
    shutil.copytree(dirs / "train", bad)
    path = bad / "pose_0003.nii.gz"
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).astype(np.float32)
    data[5, 6, 7] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert "pose_0003.nii.gz: 1 of 32768 voxels are not finite" in err and "(5, 6, 7)" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_errors_are_messages_not_tracebacks(dirs, capsys):
    assert main(["train", "--data", str(dirs / "missing"), *TINY]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--data", str(dirs / "train"), "--input-size", "30,32,32", "--channels", "4",
                 "--depth", "2"]) == 2
    assert "not divisible by 2**depth = 4" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(dirs / "nope.pt"), "--data", str(dirs / "test")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_presets_fill_the_papers_setups_and_flags_win():
    from models.pose.__main__ import build_parser, train_config
    v2 = train_config(build_parser().parse_args(["train", "--data", "d", "--preset", "fetusmapv2"]))
    assert (v2.variant, v2.input_size, v2.rev, v2.budget, v2.resolved_lr, v2.resolved_epochs) == \
        ("v2", (208, 128, 144), True, "8GB", 1e-4, 100)
    fm = train_config(build_parser().parse_args(["train", "--data", "d", "--preset", "fetusmap", "--width", "paper"]))
    assert (fm.variant, fm.scale_ratio, fm.budget, fm.channels, fm.resolved_lr, fm.resolved_epochs) == \
        ("fetusmap", 0.5, "12GB", 41, 1e-3, 20)
    mine = train_config(build_parser().parse_args(["train", "--data", "d", "--preset", "fetusmapv2", "--budget", "6GB",
                                               "--input-size", "192,112,128", "--lr", "3e-4"]))
    assert (mine.budget, mine.input_size, mine.rev, mine.resolved_lr) == ("6GB", (192, 112, 128), True, 3e-4)
    fm_plain = train_config(build_parser().parse_args(["train", "--data", "d", "--variant", "fetusmap"]))
    assert fm_plain.scale_ratio == 0.4                       # FetusMap's Land-R4: volumes downsampled 0.4x
    fm_sized = train_config(build_parser().parse_args(["train", "--data", "d", "--variant", "fetusmap",
                                                       "--input-size", "64,64,64"]))
    assert fm_sized.scale_ratio is None and fm_sized.input_size == (64, 64, 64)
    plain = train_config(build_parser().parse_args(["train", "--data", "d"]))
    assert (plain.input_size, plain.rev, plain.budget, plain.channels) == ((176, 112, 112), False, None, 32)
