"""Bad input through every entry point: the exception type, the value and the fix in its message, and
nothing lost (no file written, the model's parameters and buffers and the RNG state unchanged)."""
from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

import memplan
from memplan.cli import EXIT_USAGE, main
from memplan.errors import MemplanError, PlanFileError, PlanMismatchError
from memplan.inputs import check_model_and_inputs
from memplan.planfile import validate_against_graph, validate_plan_dict
from tests.nets import TinyUNet3D, ValueBranch

X = (1, 1, 8, 8, 8)


@dataclass
class World:
    """What a case may use: the net and input, a valid plan's JSON dict, and a folder for files."""
    net: nn.Module
    x: torch.Tensor
    plan: dict
    tmp: Path

    def compile_with(self, plan: dict | list) -> None:
        """memplan.compile with ``plan`` as a file, the way a user hands one over."""
        path = self.tmp / "edited.json"
        path.write_text(json.dumps(plan))
        memplan.compile(self.net, self.x, plan=path)


@pytest.fixture(scope="module")
def plan_dict() -> dict:
    torch.manual_seed(0)
    net, x = TinyUNet3D(width=2), torch.randn(X)
    d = json.loads(memplan.plan(net, x, budget=None).to_json())
    assert len(d["segments"]) >= 3 and sum(s["recompute"] for s in d["segments"]) >= 1
    return d


@pytest.fixture
def world(plan_dict, tmp_path) -> World:
    torch.manual_seed(0)
    return World(TinyUNet3D(width=2), torch.randn(X), json.loads(json.dumps(plan_dict)), tmp_path)


def no_params() -> nn.Module:
    return nn.Sequential(nn.ReLU(), nn.MaxPool3d(2))


def untrainable() -> nn.Module:
    """tanh saves its result; the in-place ReLU after it overwrites it, so the plain net's backward fails."""
    with torch.random.fork_rng():
        return nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.Tanh(), nn.ReLU(inplace=True))


def value_branch() -> nn.Module:
    """tests.nets.ValueBranch (an `if` on x.sum()), built without touching the global RNG."""
    with torch.random.fork_rng():
        return ValueBranch()


def frozen(w: World) -> nn.Module:
    for p in w.net.parameters():
        p.requires_grad_(False)
    return w.net


def edit_segments(w: World, fn: Callable[[list[dict]], list[dict]]) -> dict:
    return {**w.plan, "segments": fn([dict(s) for s in w.plan["segments"]])}


def swap_first_two(segs: list[dict]) -> list[dict]:
    """Segments 0 and 1 trade places, renumbered: consecutive indices, dependency order broken."""
    a, b = segs[0], segs[1]
    return [{**b, "index": 0}, {**a, "index": 1}] + segs[2:]


def move_node(segs: list[dict], dup: bool) -> list[dict]:
    """The first node of segment 1 also (dup) or instead (not dup) in segment 0."""
    node = segs[1]["nodes"][0]
    segs[0] = {**segs[0], "nodes": segs[0]["nodes"] + [node]}
    if not dup:
        rest = segs[1]["nodes"][1:]
        segs[1] = {**segs[1], "nodes": rest, "kept": [k for k in segs[1]["kept"] if k in rest]}
    return segs


def optimize_cli(w: World, source: str, *extra: str) -> None:
    """`memplan optimize FILE --out plan.json ...` in-process; an error exits EXIT_USAGE with a message."""
    f = w.tmp / "netfile.py"
    f.write_text(textwrap.dedent(source))
    out = w.tmp / "plan_out.json"
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["optimize", str(f), "--out", str(out), *extra])
    assert code == EXIT_USAGE, err.getvalue()
    assert not out.exists()
    raise MemplanError(err.getvalue())        # hand the message to the table's checks


TINY_FILE = """
    from tests.nets import TinyUNet3D
    def build_model():
        return TinyUNet3D(width=2)
    INPUT_SHAPE = (1, 1, 8, 8, 8)
"""
NOPARAM_FILE = """
    from torch import nn
    model = nn.Sequential(nn.ReLU(), nn.MaxPool3d(2))
    INPUT_SHAPE = (1, 1, 8, 8, 8)
"""
STRING_FILE = """
    model = "a string"
    INPUT_SHAPE = (1, 1, 8, 8, 8)
"""

# name, call, exception type, message fragments (regexes: the value, then the fix)
CASES: list[tuple[str, Callable[[World], object], type, tuple[str, ...]]] = [
    # -- not a module, not tensors -------------------------------------------------------------------
    ("trace a function", lambda w: memplan.trace(lambda t: t, w.x), MemplanError,
     ("got function", "pass the network instance")),
    ("compile a class", lambda w: memplan.compile(TinyUNet3D, w.x), MemplanError,
     ("the class TinyUNet3D", "not its class")),
    ("plan a class", lambda w: memplan.plan(TinyUNet3D, w.x), MemplanError,
     ("the class TinyUNet3D", "not its class")),
    ("simulate a function", lambda w: memplan.simulate_step(lambda t: t, w.x), MemplanError,
     ("got function", "pass the network instance")),
    ("measure a string", lambda w: memplan.measure_step("unet", w.x), MemplanError,
     ("got str", "pass the network instance")),
    ("trace a numpy input", lambda w: memplan.trace(w.net, np.zeros(X, np.float32)), MemplanError,
     ("got ndarray", r"torch\.empty\(1, 1, 96, 96, 96")),
    ("plan without a tensor", lambda w: memplan.plan(w.net, (None,)), MemplanError,
     ("hold no tensor", "pass the input batch")),
    # -- wrong shape, dtype: the inputs named, never control-flow advice ------------------------------
    ("trace 3 channels", lambda w: memplan.trace(w.net, torch.zeros(1, 3, 8, 8, 8)), MemplanError,
     ("1x3x8x8x8 float32 on cpu", "Fix: give the input shape, dtype and device")),
    ("plan float64", lambda w: memplan.plan(w.net, w.x.double()), MemplanError,
     ("1x1x8x8x8 float64 on cpu", "Fix: give the input shape, dtype and device")),
    ("compile int64", lambda w: memplan.compile(w.net, w.x.long()), MemplanError,
     ("1x1x8x8x8 int64", "Fix: give the input shape, dtype and device")),
    ("compile odd size", lambda w: memplan.compile(w.net, torch.zeros(1, 1, 6, 6, 6)), MemplanError,
     ("1x1x6x6x6", r"divisible by its total downsampling")),
    ("simulate 3 channels", lambda w: memplan.simulate_step(w.net, torch.zeros(1, 3, 8, 8, 8)), MemplanError,
     ("1x3x8x8x8", r"tests/nets\.py:\d+", "Fix: give the input shape")),
    ("simulate meta float16", lambda w: memplan.simulate_step(w.net, torch.empty(X, dtype=torch.float16,
                                                                               device="meta")), MemplanError,
     ("float16 on meta", "Fix: give the input shape, dtype and device")),
    ("measure float64", lambda w: memplan.measure_step(w.net, w.x.double()), MemplanError,
     ("float64 on cpu", "Fix: give the input shape, dtype and device")),
    ("measure odd size", lambda w: memplan.measure_step(w.net, torch.zeros(1, 1, 5, 5, 5)), MemplanError,
     ("1x1x5x5x5", "Fix: give the input shape")),
    ("measure meta", lambda w: memplan.measure_step(w.net, w.x.to("meta")), MemplanError,
     ("got meta tensors", "use simulate_step")),
    ("simulate a value branch", lambda w: memplan.simulate_step(value_branch(), w.x), MemplanError,
     (r"ValueBranch reads tensor values in forward at .*tests/nets\.py:\d+", "measure the step for real")),
    # -- nothing to train ------------------------------------------------------------------------------
    ("plan a net whose own backward fails", lambda w: memplan.plan(untrainable(), w.x), MemplanError,
     (r"cannot train as written.*output 0 of Tanh, is at version 1", r"inplace=False")),
    ("compile a net whose own backward fails", lambda w: memplan.compile(untrainable(), w.x), MemplanError,
     (r"modified by an inplace operation", r"Fix: make that op out-of-place")),
    ("plan no parameters", lambda w: memplan.plan(no_params(), w.x), MemplanError,
     ("Sequential has nothing to train: it has no parameters", r"requires_grad=True")),
    ("compile frozen", lambda w: memplan.compile(frozen(w), w.x), MemplanError,
     (r"all \d+ parameter tensor\(s\) have requires_grad=False", r"p\.requires_grad_\(True\)")),
    ("simulate no parameters", lambda w: memplan.simulate_step(no_params(), w.x), MemplanError,
     ("nothing to train", "torch.no_grad")),
    ("measure no parameters", lambda w: memplan.measure_step(no_params(), w.x), MemplanError,
     ("nothing to train", "torch.no_grad")),
    # -- options ---------------------------------------------------------------------------------------
    ("plan unknown optimizer", lambda w: memplan.plan(w.net, w.x, optimizer="adamw"), MemplanError,
     ("'adamw'", "choose one of adam, sgd")),
    ("plan unknown method", lambda w: memplan.plan(w.net, w.x, method="greedy"), MemplanError,
     ("'greedy'", "choose one of approx, auto, chen, exact")),
    ("plan budget text", lambda w: memplan.plan(w.net, w.x, budget="12 parsecs"), MemplanError,
     ("'12 parsecs'", "e.g. '12GB'")),
    ("simulate unknown scratch", lambda w: memplan.simulate_step(w.net, w.x, scratch="gpu"), MemplanError,
     ("'gpu'", "choose one of")),
    ("measure on a tpu", lambda w: memplan.measure_step(w.net, w.x, device="tpu"), MemplanError,
     ("device 'tpu'", "pass device='cpu' or device='cuda'")),
    ("plan amp fp8", lambda w: memplan.plan(w.net, w.x, amp="fp8"), MemplanError,
     ("unknown amp mode 'fp8'", "choose None \\(full precision\\), 'bf16' or 'fp16'")),
    ("compile amp fp8", lambda w: memplan.compile(w.net, w.x, amp="fp8"), MemplanError,
     ("unknown amp mode 'fp8'", "'bf16' or 'fp16'")),
    ("plan threads zero", lambda w: memplan.plan(w.net, w.x, threads=0), MemplanError,
     ("threads must be a positive int", "got 0", "torch.get_num_threads")),
    ("compile rev and plan", lambda w: memplan.compile(w.net, w.x, rev=True, plan=w.tmp / "p.json"), MemplanError,
     ("rev=True", "not both")),
    # -- plan files: schema ----------------------------------------------------------------------------
    ("plan file is a list", lambda w: w.compile_with([w.plan]), PlanFileError,
     (r"must be a JSON object.*got \[", "regenerate the plan")),
    ("plan text is a list", lambda w: memplan.Plan.from_json(json.dumps([w.plan])), PlanFileError,
     ("must be a JSON object", "regenerate the plan")),
    ("plan lacks segments", lambda w: w.compile_with({k: v for k, v in w.plan.items() if k != "segments"}),
     PlanFileError, ("lacks field.*'segments'", "regenerate the plan")),
    ("plan extra key", lambda w: w.compile_with({**w.plan, "segmnts": []}), PlanFileError,
     ("unknown field.*'segmnts'", "regenerate the plan")),
    ("plan peak is text", lambda w: w.compile_with({**w.plan, "predicted_peak_bytes": "big"}), PlanFileError,
     ("predicted_peak_bytes must be an integer, got 'big'", "regenerate")),
    ("plan nodes is text", lambda w: w.compile_with(edit_segments(w, lambda s: [{**s[0], "nodes": "conv"}] + s[1:])),
     PlanFileError, (r"segments\[0\]\.nodes must be a list, got 'conv'", "regenerate")),
    ("plan recompute is text", lambda w: w.compile_with(edit_segments(w, lambda s: [{**s[0], "recompute": "yes"}]
                                                                      + s[1:])),
     PlanFileError, (r"segments\[0\]\.recompute must be true or false, got 'yes'", "regenerate")),
    ("plan segment lacks kept", lambda w: w.compile_with(edit_segments(
        w, lambda s: [{k: v for k, v in s[0].items() if k != "kept"}] + s[1:])),
     PlanFileError, (r"segments\[0\] lacks field.*'kept'", "regenerate")),
    ("plan negative bytes", lambda w: w.compile_with(edit_segments(w, lambda s: [{**s[0], "kept_bytes": -1}] + s[1:])),
     PlanFileError, (r"kept_bytes must be >= 0, got -1", "regenerate")),
    ("plan NaN overhead", lambda w: w.compile_with({**w.plan, "predicted_overhead": float("nan")}), PlanFileError,
     ("predicted_overhead must be a finite number, got nan", "regenerate")),
    ("plan format 99", lambda w: w.compile_with({**w.plan, "format": 99}), PlanFileError,
     ("plan format 99 is not 1", "regenerate")),
    ("plan not JSON", lambda w: memplan.Plan.from_json("{segments: none"), MemplanError,
     ("not valid JSON", "memplan optimize --out")),
    ("plan file missing", lambda w: memplan.compile(w.net, w.x, plan=w.tmp / "absent.json"), MemplanError,
     ("absent.json does not exist", "Plan.to_json")),
    # -- plan files: against the graph -----------------------------------------------------------------
    ("plan reversed", lambda w: w.compile_with(edit_segments(w, lambda s: s[::-1])), PlanMismatchError,
     (r"segment indices must be 0, 1, \.\.\., \d+ in order, got \[\d+, ", "re-plan")),
    ("plan duplicate index", lambda w: w.compile_with(edit_segments(w, lambda s: s + [s[-1]])), PlanMismatchError,
     (r"segment index \d+ appears 2 times", "re-plan")),
    ("plan out of order", lambda w: w.compile_with(edit_segments(w, swap_first_two)), PlanMismatchError,
     (r"reads '\w+' from the later segment 1: segments must be in dependency order", "re-plan")),
    ("plan node twice", lambda w: w.compile_with(edit_segments(w, lambda s: move_node(s, dup=True))),
     PlanMismatchError, (r"node '\w+' is in segments 0 and 1", "re-plan")),
    ("plan node missing", lambda w: w.compile_with(edit_segments(w, lambda s: s[:-1])), PlanMismatchError,
     (r"plan segments do not partition the graph's nodes: '\w+'.* are in no segment", "re-plan")),
    ("plan unknown node", lambda w: w.compile_with(edit_segments(w, lambda s: [{**s[0], "nodes": s[0]["nodes"]
                                                                                + ["conv99"]}] + s[1:])),
     PlanMismatchError, ("node 'conv99' of segment 0 is not in this graph", "re-plan")),
    ("plan kept elsewhere", lambda w: w.compile_with(edit_segments(w, lambda s: [{**s[0], "kept": s[1]["nodes"][:1]}]
                                                                   + s[1:])),
     PlanMismatchError, (r"segment 0 keeps '\w+', which are not its nodes", "re-plan")),
    ("plan empty segment", lambda w: w.compile_with(edit_segments(w, lambda s: s + [{**s[-1], "index": len(s),
                                                                                     "nodes": [], "kept": []}])),
     PlanMismatchError, (r"segment \d+ has no nodes", "re-plan")),
    ("plan for another shape", lambda w: memplan.compile(w.net, torch.zeros(1, 1, 16, 16, 16),
                                                         plan=memplan.Plan.from_json(json.dumps(w.plan))),
     PlanMismatchError, ("plan was made for graph [0-9a-f]+ but this model traces to", "re-plan")),
    ("plan for another precision", lambda w: memplan.compile(w.net, w.x, plan=memplan.Plan.from_json(
        json.dumps(w.plan)), amp="bf16"), PlanMismatchError,
     ("made for a fp32 step but this step runs bf16", r"re-plan with memplan\.plan\(model, example_inputs, amp='bf16'\)")),
    ("plan file amp fp8", lambda w: w.compile_with({**w.plan, "amp": "fp8"}), PlanFileError,
     ("amp must be null \\(fp32\\), \"bf16\" or \"fp16\", got 'fp8'", "regenerate")),
    ("plan file amp without its fingerprint", lambda w: w.compile_with({**w.plan, "amp": "bf16"}), PlanFileError,
     ("says precision fp32 but field amp is 'bf16'", "regenerate")),
    ("plan file threads zero", lambda w: w.compile_with({**w.plan, "threads": 0}), PlanFileError,
     ("threads must be a positive int or null, got 0", "regenerate")),
    # -- the command line ------------------------------------------------------------------------------
    ("cli 3 channels", lambda w: optimize_cli(w, TINY_FILE, "--input-shape", "1,3,8,8,8"), MemplanError,
     ("shape 1x3x8x8x8", "pass an --input-shape the network accepts")),
    ("cli no parameters", lambda w: optimize_cli(w, NOPARAM_FILE), MemplanError,
     ("nothing to train", "requires_grad")),
    ("cli a string", lambda w: optimize_cli(w, STRING_FILE), MemplanError,
     ("model is a str, not an nn.Module", "name the network")),
    ("cli amp fp8", lambda w: optimize_cli(w, TINY_FILE, "--amp", "fp8"), MemplanError,
     ("--amp: invalid choice: 'fp8'", "choose from 'bf16', 'fp16'")),
    ("cli threads zero", lambda w: optimize_cli(w, TINY_FILE, "--threads", "0"), MemplanError,
     ("--threads 0", "a positive number")),
]

XFAIL: dict[str, str] = {}   # rows known to fail, with the reason (strict: they must fail)


def _state(net: nn.Module | None) -> dict[str, torch.Tensor]:
    return {} if net is None else {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("name, call, exc, fragments", [
    pytest.param(*c, id=c[0], marks=[pytest.mark.xfail(reason=XFAIL[c[0]], strict=True)] if c[0] in XFAIL else [])
    for c in CASES])
def test_bad_input_table(world, name, call, exc, fragments):
    before_state, before_files = _state(world.net), sorted(world.tmp.iterdir())
    rng = torch.get_rng_state()
    with pytest.raises(exc) as info:
        call(world)
    text = str(info.value)
    for frag in fragments:
        assert re.search(frag, text, re.DOTALL), f"{frag!r} not in: {text}"
    assert "control flow" not in text                     # never a tracer's advice for an input mistake
    if not name.startswith("cli"):    # the CLI builds the file's network itself: its init draws weights
        assert torch.equal(torch.get_rng_state(), rng)
    after = _state(world.net)
    assert after.keys() == before_state.keys()
    for k, v in before_state.items():                     # the user's network is untouched, bitwise
        assert torch.equal(after[k], v), k
    written = [p for p in sorted(world.tmp.iterdir()) if p not in before_files and p.name not in ("edited.json", "netfile.py")]
    assert not written, written


def test_table_size_and_kinds():
    """The table covers every public entry point and the plan loader, with at least 25 rows."""
    assert len(CASES) >= 25
    text = " ".join(c[0] for c in CASES)
    for entry in ("trace", "plan", "compile", "simulate", "measure", "cli", "plan file"):
        assert entry in text, entry


def test_valid_plan_and_inputs_pass(world):
    """The checks refuse only what is wrong: the plan as written loads and runs; good inputs pass."""
    validate_plan_dict(world.plan, memplan.Plan)
    plan = memplan.Plan.from_json(json.dumps(world.plan))
    graph = memplan.trace(world.net, world.x)
    validate_against_graph(plan, graph)
    check_model_and_inputs(world.net, world.x)
    check_model_and_inputs(no_params(), world.x.requires_grad_())   # input gradients are something to train
    module = memplan.compile(world.net, world.x, plan=plan)
    torch.testing.assert_close(module(world.x), world.net(world.x), rtol=0, atol=0)


def test_schema_is_the_plan_dataclass(world):
    """Every field a written plan has is checked; a field added to Plan is picked up by itself."""
    from dataclasses import fields
    assert set(world.plan) == {f.name for f in fields(memplan.Plan)}
    for key in world.plan:
        if key in ("segments", "rev", "notes") or world.plan[key] is None:
            continue
        bad = [] if not isinstance(world.plan[key], list) else "x"
        with pytest.raises(PlanFileError, match=re.escape(key)):
            validate_plan_dict({**world.plan, key: bad}, memplan.Plan)


def test_in_place_groups_and_pinned_nodes_by_hand():
    """A hand-made chain a -> b -> c: a split in-place group and a recomputed pinned node are refused."""
    import networkx as nx
    from types import SimpleNamespace
    from memplan.plan import Segment

    dag = nx.DiGraph([("a", "b"), ("b", "c")])

    def graph(together=(), pinned=frozenset()):
        return SimpleNamespace(order=["a", "b", "c"], dag=dag, together=together, pinned=pinned, ordered=())

    def plan(*blocks, recompute=()):
        return SimpleNamespace(segments=tuple(Segment(index=i, nodes=tuple(b), kept=(b[-1],), recompute=i in recompute,
                                                      kept_bytes=0, flops=0) for i, b in enumerate(blocks)))

    validate_against_graph(plan("ab", "c", recompute=(0,)), graph(together=(("a", "b"),), pinned=frozenset("c")))
    with pytest.raises(PlanMismatchError, match=r"in-place group a, b is split over segments \[0, 1\]"):
        validate_against_graph(plan("a", "bc"), graph(together=(("a", "b"),)))
    with pytest.raises(PlanMismatchError, match=r"node 'b' writes into an input or parameter but segment 0 would "
                                                r"recompute it"):
        validate_against_graph(plan("ab", "c", recompute=(0,)), graph(pinned=frozenset("b")))
    with pytest.raises(PlanMismatchError, match=r"node 'b' is twice in segment 0"):
        validate_against_graph(plan("abb", "c"), graph())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (a CPU input for a CUDA model)")
@pytest.mark.parametrize("entry", [memplan.trace, memplan.simulate_step, memplan.plan])
def test_input_on_the_wrong_device(entry):
    net = TinyUNet3D(width=2).cuda()
    with pytest.raises(MemplanError, match=r"(?s)1x1x8x8x8 float32 on cpu; parameters on cuda:0.*Fix: give the "
                                           r"input shape, dtype and device") as info:
        entry(net, torch.zeros(X))
    assert "control flow" not in str(info.value)


def test_a_value_branch_is_measured_for_real():
    """measure_step runs for real, so a forward that reads values passes its input check and is measured:
    the same peak as the branch's twin without the `if` (the branch taken by x > 0)."""
    torch.manual_seed(0)
    net, x = ValueBranch(), torch.rand(1, 1, 8, 8, 8) + 0.1

    class Taken(nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(x) * 2

    assert memplan.measure_step(net, x).peak_bytes == memplan.measure_step(Taken(net.conv), x).peak_bytes
