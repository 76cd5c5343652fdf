"""Model files: PATH[:ATTR] resolution (instance, class, factory, default names), inputs, dtype, errors."""
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import memplan
from memplan.modelfile import ModelFileError, load_model, parse_shape, split_reference

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
from tests.nets import UNTRACEABLE_MODEL_SOURCE


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.parametrize("text, shape", [
    ("1,1,176,112,112", (1, 1, 176, 112, 112)),
    ("2x1x32x32x32", (2, 1, 32, 32, 32)),
    (" (1, 3, 8) ", (1, 3, 8)),
])
def test_parse_shape(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text, match", [
    ("1,1,a,3", "cannot parse input shape '1,1,a,3'"),
    ("1,,3", "cannot parse input shape"),
    ("1,0,8", "dimension < 1"),
])
def test_parse_shape_rejects(text, match):
    with pytest.raises(ModelFileError, match=match):
        parse_shape(text)


@pytest.mark.parametrize("ref, split", [
    ("net.py", ("net.py", None)),
    ("dir/net.py:build_model", ("dir/net.py", "build_model")),
    ("net.py:zoo.small", ("net.py", "zoo.small")),
    ("C:\\models\\net.py", ("C:\\models\\net.py", None)),
])
def test_split_reference(ref, split):
    assert split_reference(ref) == split


def test_instance_and_example_inputs():
    loaded = load_model(str(EXAMPLES / "convnet_instance.py"))
    assert isinstance(loaded.model, nn.Sequential) and loaded.model_source.startswith("model in ")
    assert loaded.input_shapes == ((2, 1, 16, 16, 16),) and loaded.inputs[0].is_meta
    assert loaded.input_source.startswith("example_inputs()")
    # the file's real tensor is kept for measured steps: seeded, so equal to a fresh draw
    expected = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.real_inputs[0], expected)


def test_class_needs_an_input_shape_and_attr_picks_another_class():
    with pytest.raises(ModelFileError, match="no input shape for .*model_class.py: pass --input-shape"):
        load_model(str(EXAMPLES / "model_class.py"))
    loaded = load_model(str(EXAMPLES / "model_class.py"), input_shape="1,2,24,24,24")
    assert type(loaded.model).__name__ == "Model" and loaded.model_source.startswith("Model() in ")
    enc = load_model(str(EXAMPLES / "model_class.py") + ":Encoder", input_shape="1,2,24,24,24")
    assert type(enc.model).__name__ == "Encoder"
    assert sum(p.numel() for p in enc.model.parameters()) == sum(
        p.numel() for p in loaded.model.encoder.parameters())


def test_factory_and_input_shape_override():
    loaded = load_model(str(EXAMPLES / "tiny_unet.py"), input_shape="2,1,16,16,16")
    assert type(loaded.model).__name__ == "TinyUNet3D" and loaded.model_source.startswith("build_model() in ")
    assert loaded.input_shapes == ((2, 1, 16, 16, 16),) and loaded.input_source == "--input-shape"


def test_default_names_in_order(tmp_path):
    body = """
        from torch import nn
        class Model(nn.Module):
            def __init__(self): super().__init__(); self.lin = nn.Linear(3, 3)
            def forward(self, x): return self.lin(x)
        def build_model(): return nn.Linear(3, 5)
        {model}
        INPUT_SHAPE = (2, 3)
    """
    first = load_model(str(write(tmp_path, "a.py", body.format(model="model = nn.Linear(3, 7)"))))
    second = load_model(str(write(tmp_path, "b.py", body.format(model=""))))
    assert first.model.out_features == 7 and second.model.out_features == 5
    only_class = load_model(str(write(tmp_path, "c.py", body.format(model="del build_model"))))
    assert type(only_class.model).__name__ == "Model"


def test_dtype_casts_model_and_inputs():
    loaded = load_model(str(EXAMPLES / "convnet_instance.py"), dtype="float64")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float64}
    assert loaded.inputs[0].dtype == torch.float64 and loaded.real_inputs[0].dtype == torch.float64


def test_sibling_imports_work(tmp_path):
    write(tmp_path, "blocks_here.py", "from torch import nn\ndef block(): return nn.Conv1d(1, 2, 3)\n")
    path = write(tmp_path, "net.py", "from blocks_here import block\nmodel = block()\nINPUT_SHAPE = (1, 1, 9)\n")
    assert isinstance(load_model(str(path)).model, nn.Conv1d)


@pytest.mark.parametrize("ref_body, kwargs, match", [
    (None, {}, r"model file .*missing.py does not exist"),
    ("x = 1\n", {}, r"no model found in .*: define `model = MyNet\(\)`"),
    ("raise KeyError('boom')\n", {}, r"running model file .* failed: line 1: KeyError"),
    ("def f(:\n", {}, r"running model file .* failed: line 1: SyntaxError"),
    ("from torch import nn\nmodel = nn.Linear(2, 2)\nINPUT_SHAPE = (1, 'a')\n", {},
     r"INPUT_SHAPE in .* must be a tuple of positive ints"),
    ("from torch import nn\nmodel = nn.Linear(2, 2)\n", {"input_shape": "1,3"},
     r"does not accept an input of shape 1x3 \(--input-shape\): RuntimeError"),
    ("from torch import nn\nmodel = nn.Linear(2, 2)\nsize = 3\n", {"attr": "size"},
     r":size is a int, not an nn.Module"),
    ("from torch import nn\nmodel = nn.Linear(2, 2)\n", {"attr": "nothing"}, r"has no attribute 'nothing'"),
    ("def build_model(): return 3\n", {}, r"build_model\(\) returned a int, not an nn.Module"),
])
def test_errors_name_the_problem_and_the_fix(tmp_path, ref_body, kwargs, match):
    path = tmp_path / "missing.py" if ref_body is None else write(tmp_path, "net.py", ref_body)
    ref = str(path) + (f":{kwargs.pop('attr')}" if "attr" in kwargs else "")
    with pytest.raises(ModelFileError, match=match):
        load_model(ref, **kwargs)


def test_no_model_lists_what_the_file_defines():
    with pytest.raises(ModelFileError, match=r"this file defines Block: name one as .*no_model.py:Block"):
        load_model(str(EXAMPLES / "no_model.py"), input_shape="1,1,8,8,8")
    with pytest.raises(ModelFileError, match=r"Block\(\) failed: .*missing 2 required.*give every argument a default"):
        load_model(str(EXAMPLES / "no_model.py") + ":Block", input_shape="1,1,8,8,8")


def test_value_dependent_forward_is_left_to_the_tracer(tmp_path):
    """A forward that reads tensor values cannot run on meta: the shape check stays silent and the
    tracer's TraceError (which says how to fix forward) is what the user sees."""
    path = write(tmp_path, "branchy.py", UNTRACEABLE_MODEL_SOURCE)
    loaded = load_model(str(path))
    with pytest.raises(memplan.TraceError, match=r"(?s)branchy\.py:\d+.*Fix: forward reads a tensor.s values"):
        memplan.trace(loaded.model, loaded.inputs)


# -- networks with several inputs: the advice is example_inputs() returning a tuple --------------------------
TWO_INPUTS = """
    import torch
    from torch import nn
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv3d(1, 2, 3, padding=1), nn.Conv3d(1, 2, 3, padding=1)
        def forward(self, image, mask, scale=1.0):
            return (self.a(image) + self.b(mask)) * scale
"""


def test_two_input_network_loads_from_a_tuple_of_example_inputs(tmp_path):
    path = write(tmp_path, "two.py", TWO_INPUTS + """
    def example_inputs():
        return torch.empty(1, 1, 8, 8, 8, device="meta"), torch.empty(1, 1, 8, 8, 8, device="meta")
    """)
    loaded = load_model(str(path))
    assert loaded.input_shapes == ((1, 1, 8, 8, 8), (1, 1, 8, 8, 8))
    plan = memplan.plan(loaded.model, loaded.inputs)
    assert plan.simulated_peak_bytes > 0


@pytest.mark.parametrize("extra, input_shape, match", [
    ("", "1,1,8,8,8", r"Model\(\) in .*two.py takes 2 inputs \(image, mask\) but --input-shape gives one tensor; "
                      r"define `def example_inputs\(\): return \(image, mask\)` in .*two.py, a tuple of 2 tensors"
                      r".*and drop --input-shape"),
    ("", None, r"no input shape for .*two.py: define `def example_inputs\(\): return \(image, mask\)`"),
    ("INPUT_SHAPE = (1, 1, 8, 8, 8)\n", None, r"takes 2 inputs \(image, mask\) but INPUT_SHAPE in .*two.py gives 1; "
                                             r"define `def example_inputs\(\): return \(image, mask\)`"),
])
def test_two_input_network_gets_the_tuple_advice(tmp_path, extra, input_shape, match):
    path = write(tmp_path, "two.py", TWO_INPUTS + textwrap.indent(extra, "    "))
    with pytest.raises(ModelFileError, match=match) as info:
        load_model(str(path), input_shape=input_shape)
    assert "spatial sizes divisible" not in str(info.value)          # not the one-input advice that cannot work
