"""python -m models.pose train | evaluate | refine, end to end on phantoms (tiny sizes)."""
import re

import pytest
import torch

import memplan
from models.pose.__main__ import main
from models.pose.train import build_model, load_checkpoint
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


def test_rev_and_budget_reach_memplan(dirs, monkeypatch, capsys):
    seen = {}
    real = memplan.compile

    def spy(model, example, **kwargs):
        seen.update(kwargs, shape=tuple(example.shape), device=example.device.type)
        return real(model, example, **{**kwargs, "rev": False})

    monkeypatch.setattr(memplan, "compile", spy)
    assert main(["train", "--data", str(dirs / "train"), "--out", str(dirs / "rev"), "--epochs", "1",
                 "--budget", "2GB", "--rev", "--batch-size", "2", *TINY]) == 0
    assert seen == {"budget": "2GB", "optimizer": "adam", "rev": True, "shape": (2, 1, 32, 32, 32), "device": "meta"}
    state = torch.load(dirs / "rev" / "last.pt", weights_only=False)
    assert "compiled_state" in state and state["config"]["rev"] is True


def test_real_rev_training_reloads_the_trained_substituted_network(dirs):
    """REV substitution by memplan itself: the checkpoint rebuilds the REV network with its trained weights."""
    with pytest.warns(UserWarning, match="REV substitution changed the network"):
        assert main(["train", "--data", str(dirs / "train"), "--out", str(dirs / "rev_real"), "--epochs", "1",
                     "--rev", *TINY]) == 0
    state = torch.load(dirs / "rev_real" / "last.pt", weights_only=False)
    with pytest.warns(UserWarning, match="REV substitution"):
        loaded, config = load_checkpoint(dirs / "rev_real" / "last.pt")
    assert config.rev
    got = loaded.state_dict()
    assert got.keys() == state["compiled_state"].keys()
    assert all(torch.equal(got[k], v) for k, v in state["compiled_state"].items())
    plain = build_model("v2", channels=4, depth=2)
    plain.load_state_dict(state["model"])
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(loaded(x), plain(x))        # the REV blocks are in use, with their own weights


def test_errors_are_messages_not_tracebacks(dirs, capsys):
    assert main(["train", "--data", str(dirs / "missing"), *TINY]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--data", str(dirs / "train"), "--input-size", "30,32,32", "--channels", "4",
                 "--depth", "2"]) == 2
    assert "not divisible by 2**depth = 4" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(dirs / "nope.pt"), "--data", str(dirs / "test")]) == 2
    assert "does not exist" in capsys.readouterr().err
