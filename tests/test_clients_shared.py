"""The clients' shared layer: augmentation geometry, the epoch loop, the checkpoint schema, the plan line."""
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import memplan
from models.augment import ALL_PLANES, AugmentConfig, Spatial, augment, flip, resize, rot90, rotate, scale
from models.checkpoint import Checkpoint, load_checkpoint_file, save_checkpoint
from models.data import Case, crop_or_pad
from models.errors import ClientError
from models.loop import Precision, run_epochs
from models.planning import compile_for_training, plan_line, resolve_device


def _dot(shape, point):
    v = np.zeros(shape, np.float32)
    v[tuple(point)] = 1.0
    return Spatial(v, np.array([point], dtype=float), (v > 0).astype(np.uint8), (1.0, 2.0, 3.0))


@pytest.mark.parametrize("turns", [1, 2, 3])
@pytest.mark.parametrize("plane", ALL_PLANES)
def test_rot90_moves_a_voxel_to_its_landmark_on_non_cubic_grids(turns, plane):
    s = rot90(_dot((5, 4, 3), (1, 2, 0)), turns, plane)
    p = tuple(int(x) for x in s.points[0])
    assert s.volume[p] == 1.0 and s.mask[p] == 1 and s.volume.sum() == 1.0
    a, b = plane
    expect = [1.0, 2.0, 3.0]
    if turns % 2:
        expect[a], expect[b] = expect[b], expect[a]
    assert s.spacing_mm == tuple(expect)


def test_quarter_turn_of_unequal_sides_is_resized_back_and_keeps_landmarks_on_the_grid():
    """A turn in the (0, 1) plane of 9x5x3 is 5x9x3; resized back the landmark lands where the voxel went."""
    s = resize(rot90(_dot((9, 5, 3), (8, 4, 1)), 1, (0, 1)), (9, 5, 3))
    assert s.shape == (9, 5, 3)
    # one turn: (a, b) -> (n_b - 1 - b, a) = (0, 8); resize 5x9 -> 9x5: (0 * 8/4, 8 * 4/8) = (0, 4)
    np.testing.assert_allclose(s.points[0], [0.0, 4.0, 1.0])
    assert np.unravel_index(s.volume.argmax(), s.shape) == (0, 4, 1)


def test_scale_and_rotate_move_content_with_the_landmark():
    grid = np.stack(np.meshgrid(*[np.arange(21.0)] * 3, indexing="ij"), -1)
    point = np.array([6.0, 13.0, 9.0])
    blob = np.exp(-((grid - point) ** 2).sum(-1) / (2 * 1.5 ** 2)).astype(np.float32)
    base = Spatial(blob, point[None], None, (1.0, 1.0, 1.0))
    for moved in (scale(base, 1.2), rotate(base, Rotation.from_rotvec([0.2, -0.3, 0.25]).as_matrix())):
        w = moved.volume.astype(float)
        centroid = (w[..., None] * grid).sum((0, 1, 2)) / w.sum()
        np.testing.assert_allclose(centroid, moved.points[0], atol=0.15)
    assert scale(base, 1.2).points[0].tolist() == pytest.approx((10 + 1.2 * (point - 10)).tolist())
    with pytest.raises(ClientError, match="proper 3x3 rotation"):
        rotate(base, np.diag([-1.0, 1.0, 1.0]))


def test_an_odd_number_of_mirrors_swaps_labels_an_even_one_does_not():
    s = Spatial(np.zeros((4, 4, 4), np.float32), np.array([[0.0, 1, 1], [3.0, 1, 1]]))
    config = AugmentConfig(flip_axes=(0, 1), flip_p=1.0, mirror_order=(1, 0))
    out = augment(np.random.default_rng(0), s, config)                     # two mirrors: handedness kept
    np.testing.assert_allclose(out.points, [[3.0, 2, 1], [0.0, 2, 1]])
    one = augment(np.random.default_rng(0), s, AugmentConfig(flip_axes=(0,), flip_p=1.0, mirror_order=(1, 0)))
    np.testing.assert_allclose(one.points, [[0.0, 1, 1], [3.0, 1, 1]])     # mirrored and relabelled
    np.testing.assert_allclose(flip(s, 0).points, [[3.0, 1, 1], [0.0, 1, 1]])


def test_crop_or_pad_keeps_world_coordinates():
    affine = np.array([[-2.0, 0, 0, 10], [0, 1.0, 0, -3], [0, 0, 0.5, 7], [0, 0, 0, 1]])
    case = Case("c", np.random.default_rng(0).random((9, 4, 6)).astype(np.float32), (2.0, 1.0, 0.5),
                landmarks={"p": np.array([4.0, 1.0, 2.0])}, affine=affine)
    out = crop_or_pad(case, (5, 8, 6))
    assert out.shape == (5, 8, 6)
    np.testing.assert_allclose(out.landmarks_mm()["p"], case.landmarks_mm()["p"])
    i, j, k = out.landmarks["p"].astype(int)
    assert out.volume[i, j, k] == case.volume[4, 1, 2]


def test_loop_averages_terms_and_stops_on_a_nan_loss():
    seen = []
    hist = run_epochs(lambda b: {"loss": float(b), "x": 2.0 * b}, lambda e: [e, e + 1], epochs=2, steps_per_epoch=2,
                      desc="t", progress=False, on_epoch=lambda e, m: seen.append((e, m)))
    assert hist == [{"loss": 0.5, "x": 1.0}, {"loss": 1.5, "x": 3.0}] and [e for e, _ in seen] == [0, 1]
    with pytest.raises(ClientError, match=r"loss became nan at epoch 1, case\(s\) a.*lower --lr"):
        run_epochs(lambda b: {"loss": math.nan}, lambda e: [{"id": "a"}], epochs=1, steps_per_epoch=1, desc="t",
                   progress=False)


def test_precision_autocasts_the_forward_and_fp16_scaling_leaves_the_step_unchanged():
    """bf16: the forward runs in bf16, gradients land in fp32 parameters; fp16 with its GradScaler takes
    the same SGD step as unscaled fp16 autocast (the scale is a power of two, unscaled before the step)."""
    def net_and_opt():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        return net, torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    net, opt = net_and_opt()
    bf16 = Precision("bf16", "cpu")
    with bf16.autocast():
        out = net(x)
        loss = out.float().pow(2).mean()
    assert out.dtype == torch.bfloat16 and bf16.scaler is None
    bf16.backward(loss, opt)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters())
    scaled, opt_s = net_and_opt()
    plain, opt_p = net_and_opt()
    fp16 = Precision("fp16", "cpu")
    assert fp16.scaler is not None
    for module, opt_, prec in ((scaled, opt_s, fp16), (plain, opt_p, None)):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = module(x).float().pow(2).mean()
        if prec is None:
            loss.backward()
            opt_.step()
        else:
            prec.backward(loss, opt_)
    for a, b in zip(scaled.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(not torch.equal(a, b) for a, b in zip(scaled.parameters(), net_and_opt()[0].parameters()))
    with pytest.raises(ClientError, match=r"--amp 'fp8'.*use bf16, fp16"):
        Precision("fp8", "cpu")


def test_checkpoint_round_trip_and_refusals(tmp_path):
    state = {"w": torch.arange(3.0)}
    path = save_checkpoint(tmp_path / "run" / "last.pt", Checkpoint("pose", {"a": 1}, {"net": state}, {"net": "{}"},
                                                                     epoch=4, history=[1.0]))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]          # no temporary file left
    ckpt = load_checkpoint_file(tmp_path / "run", "pose")
    assert torch.equal(ckpt.models["net"]["w"], state["w"]) and ckpt.epoch == 4 and ckpt.config == {"a": 1}
    with pytest.raises(ClientError, match="a 'pose' checkpoint, not a 'face' one"):
        load_checkpoint_file(path, "face")
    torch.save({"model": state}, tmp_path / "old.pt")
    with pytest.raises(ClientError, match="not a memplan client checkpoint"):
        load_checkpoint_file(tmp_path / "old.pt", "pose")
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(ClientError, match="not a readable torch checkpoint"):
        load_checkpoint_file(tmp_path / "junk.pt", "pose")


def test_plan_line_reports_the_simulated_peaks_of_the_plan():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 1, 3, padding=1))
    compiled = compile_for_training(net, (1, 1, 8, 8, 8), loss_fn=lambda out: (out ** 2).sum())
    plan = compiled.plan
    line = plan_line(plan)
    ratio = plan.simulated_peak_bytes / plan.simulated_vanilla_peak_bytes
    assert f"vanilla peak {memplan.format_bytes(plan.simulated_vanilla_peak_bytes)}" in line
    assert f"planned peak {memplan.format_bytes(plan.simulated_peak_bytes)} ({ratio:.0%} of vanilla" in line
    assert f"recompute {plan.predicted_overhead:.1%}" in line and line.endswith("budget none (least memory)")


def test_resolve_device_refuses_unknown_devices():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ClientError, match="is not a torch device"):
        resolve_device("gpu0")
