"""The memplan command line: each command in a subprocess on example files, and every error path's exit code."""
import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import memplan
from memplan.cli import EXIT_BUDGET, EXIT_OK, EXIT_USAGE, main
from memplan.modelfile import load_model
from tests.nets import UNTRACEABLE_MODEL_SOURCE

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny_unet.py")
CONVNET = str(ROOT / "examples" / "convnet_instance.py")


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "memplan.cli", *args], capture_output=True, text=True, env=env, check=False,
                          cwd=ROOT, timeout=300)


# -- optimize ------------------------------------------------------------------------------------------
def test_optimize_json_plan_file_and_plot(tmp_path):
    plan_file, plot = tmp_path / "plan.json", tmp_path / "timeline.png"
    proc = run("optimize", TINY, "--budget", "18MiB", "--json", "--out", str(plan_file), "--plot", str(plot))
    assert proc.returncode == EXIT_OK, proc.stderr
    rec = json.loads(proc.stdout)                                  # stdout is one JSON object, nothing else
    assert rec["budget_bytes"] == 18 * 2**20 and rec["objective"] == "time-centric"
    assert rec["planned_peak_bytes"] <= rec["budget_bytes"] < rec["vanilla_peak_bytes"]
    assert rec["graph_nodes"] == sum(len(s["nodes"]) for s in rec["segments"]) == sum(
        len(s["nodes"]) for s in rec["plan"]["segments"])
    assert any(s["mode"] == "recompute" for s in rec["segments"]) and rec["overhead"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000

    # the plan file loads into memplan.compile; the module computes what the model computes
    loaded = load_model(TINY)
    compiled = memplan.compile(loaded.model, loaded.inputs, plan=str(plan_file))
    assert [s.nodes for s in compiled.memplan_plan.segments] == [tuple(s["nodes"]) for s in rec["segments"]]
    assert memplan.simulate_step(compiled, loaded.inputs).peak_bytes == rec["planned_peak_bytes"]
    assert memplan.simulate_step(loaded.model, loaded.inputs).peak_bytes == rec["vanilla_peak_bytes"]
    x = torch.randn(1, 1, 16, 16, 16)                 # any real size: compare outputs on a cheap one
    small = memplan.compile(loaded.model, x, plan=memplan.plan(loaded.model, x))
    torch.testing.assert_close(small(x), loaded.model(x), rtol=0, atol=0)


def test_optimize_text_names_every_figure(capsys):
    assert main(["optimize", CONVNET, "--budget", "1MiB", "--optimizer", "sgd", "--method", "approx"]) == EXIT_OK
    text = capsys.readouterr().out
    for needle in ("graph", "approx DP", "vanilla peak", "planned peak", "budget", "1.00 MiB", "overhead",
                   "segments", "recompute", "store", "optimizer sgd"):
        assert needle in text, needle


def test_optimize_rev_reports_what_it_replaced(tmp_path, capsys):
    """GCP+REV reaches below the GCP floor on this net; the table and JSON name the replaced blocks,
    and the plan file rebuilds the same substituted network."""
    loaded = load_model(CONVNET)
    gcp_floor = memplan.plan(loaded.model, loaded.inputs).simulated_peak_bytes
    plan_file = tmp_path / "rev.json"
    assert main(["optimize", CONVNET, "--rev", "--json", "--out", str(plan_file)]) == EXIT_OK
    out, err = capsys.readouterr()
    rec = json.loads(out)
    assert rec["rev"] and rec["planned_peak_bytes"] < gcp_floor
    assert {r["name"] for r in rec["rev"]} == {n for s in rec["segments"] for n in s["rev"]}
    assert "REV substitution changed the network" in err          # the warning is a note on stderr
    assert rec["plan_file_loads"] is True
    with pytest.warns(UserWarning):
        compiled = memplan.compile(loaded.model, loaded.inputs, plan=str(plan_file))
    assert memplan.simulate_step(compiled, loaded.inputs).peak_bytes == rec["planned_peak_bytes"]


# -- fit -----------------------------------------------------------------------------------------------
def test_fit_answer_fits_and_the_next_size_does_not():
    budget = 3 * 2**20
    proc = run("fit", CONVNET, "--budget", "3MiB", "--json")
    assert proc.returncode == EXIT_OK, proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["budget_bytes"] == budget and [r["strategy"] for r in rec["results"]] == ["vanilla", "GCP"]
    model = load_model(CONVNET).model
    for r in rec["results"]:
        fits, over = (torch.empty(r[k], device="meta") for k in ("shape", "next_shape"))
        if r["strategy"] == "vanilla":
            assert memplan.simulate_step(model, fits).peak_bytes == r["peak_bytes"] <= budget
            assert memplan.simulate_step(model, over).peak_bytes > budget
        else:
            assert memplan.plan(model, fits, budget=budget).simulated_peak_bytes <= budget
            with pytest.raises(memplan.BudgetError):
                memplan.plan(model, over, budget=budget)
        assert r["shape"][2] == r["shape"][3] == r["shape"][4] > 16     # cube stays a cube, grown


def test_fit_table_and_nothing_fits(capsys):
    assert main(["fit", CONVNET, "--budget", "2MiB", "--axis", "2"]) == EXIT_OK
    text = capsys.readouterr().out
    assert "largest input within 2.00 MiB" in text and "vanilla" in text and "GCP" in text
    assert main(["fit", CONVNET, "--budget", "20KiB"]) == EXIT_BUDGET
    assert "no strategy fits 20.0 KiB even at the smallest input 2x1x2x2x2" in capsys.readouterr().err


# -- measure -------------------------------------------------------------------------------------------
def test_measure_real_side_by_side():
    proc = run("measure", CONVNET, "--budget", "1MiB", "--real", "--repeat", "1", "--json")
    assert proc.returncode == EXIT_OK, proc.stderr
    rec = json.loads(proc.stdout)
    v, p = rec["vanilla"], rec["planned"]
    assert p["simulated_peak_bytes"] <= 2**20 < v["simulated_peak_bytes"]
    assert rec["simulated_ratio"] == pytest.approx(p["simulated_peak_bytes"] / v["simulated_peak_bytes"])
    # measured in the same run: the plan really holds less, and each step took time
    assert 0 < p["measured_peak_bytes"] < v["measured_peak_bytes"]
    assert rec["measured_ratio"] == pytest.approx(p["measured_peak_bytes"] / v["measured_peak_bytes"])
    assert p["step_time_s"] > 0 and v["step_time_s"] > 0
    assert rec["step_time_ratio"] == pytest.approx(p["step_time_s"] / v["step_time_s"])
    assert "USDT" not in proc.stderr


def test_json_stdout_stays_clean_when_the_model_file_prints(tmp_path, capsys):
    noisy = tmp_path / "noisy.py"
    noisy.write_text(f"print('hello from the model file')\nexec(open({CONVNET!r}).read())\n")
    assert main(["optimize", str(noisy), "--json"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert json.loads(out)["graph_nodes"] > 0 and "hello from the model file" in err


def test_measure_simulated_only(capsys):
    assert main(["measure", TINY, "--json"]) == EXIT_OK
    rec = json.loads(capsys.readouterr().out)
    assert rec["measured_ratio"] is None and rec["planned"]["simulated_peak_bytes"] < rec["vanilla"]["simulated_peak_bytes"]


# -- errors --------------------------------------------------------------------------------------------
def test_subprocess_exit_codes(tmp_path):
    missing = run("optimize", str(tmp_path / "nope.py"))
    assert missing.returncode == EXIT_USAGE and "does not exist" in missing.stderr and not missing.stdout
    infeasible = run("optimize", CONVNET, "--budget", "900KiB", "--json")
    assert infeasible.returncode == EXIT_BUDGET and not infeasible.stdout
    assert "smallest feasible peak" in infeasible.stderr and "REV would reach" in infeasible.stderr


UNTRACEABLE = UNTRACEABLE_MODEL_SOURCE


@pytest.mark.parametrize("argv, code, match", [
    (["optimize", "examples/missing.py"], EXIT_USAGE, "model file examples/missing.py does not exist"),
    (["optimize", "examples/no_model.py"], EXIT_USAGE, "no model found in examples/no_model.py"),
    (["optimize", "examples/no_model.py:Block"], EXIT_USAGE, "give every argument a default"),
    (["optimize", TINY, "--input-shape", "1,1,x"], EXIT_USAGE, "cannot parse input shape '1,1,x'"),
    (["optimize", TINY, "--input-shape", "1,1,30,30,30"], EXIT_USAGE, "does not accept an input of shape 1x1x30x30x30"),
    (["optimize", TINY, "--budget", "12 bananas"], EXIT_USAGE, "cannot parse byte quantity '12 bananas'"),
    (["optimize", "UNTRACEABLE"], EXIT_USAGE, "Model cannot run without data.*Fix: forward reads a tensor.s values"),
    (["optimize", CONVNET, "--budget", "900KiB"], EXIT_BUDGET, "below the smallest feasible peak 978 KiB.*add --rev"),
    (["fit", TINY], EXIT_USAGE, "the following arguments are required: --budget"),
    (["fit", CONVNET, "--budget", "8MiB", "--axis", "1"], EXIT_USAGE, "axis 1 is the channel axis"),
    (["measure", CONVNET, "--repeat", "0"], EXIT_USAGE, "--repeat must be >= 1"),
    (["optimize", CONVNET, "--method", "fast"], EXIT_USAGE, "invalid choice: 'fast'"),
])
def test_error_paths(tmp_path, monkeypatch, capsys, argv, code, match):
    monkeypatch.chdir(ROOT)
    if "UNTRACEABLE" in argv:
        (tmp_path / "branchy.py").write_text(textwrap.dedent(UNTRACEABLE))
        argv = [str(tmp_path / "branchy.py") if a == "UNTRACEABLE" else a for a in argv]
    assert main(argv) == code
    captured = capsys.readouterr()
    assert not captured.out
    assert re.search(match, captured.err, re.DOTALL), captured.err


def test_rev_without_rev_plan_is_a_clear_usage_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "memplan.rev_plan", None)       # as if rev_plan.py were missing
    assert main(["optimize", CONVNET, "--rev"]) == EXIT_USAGE
    assert "--rev needs memplan.rev_plan" in capsys.readouterr().err
    assert main(["fit", CONVNET, "--budget", "8MiB", "--rev"]) == EXIT_USAGE
    assert "--rev needs memplan.rev_plan" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["optimize", "fit", "measure"])
def test_help_has_examples_and_says_the_file_runs(command, capsys):
    assert main([command, "--help"]) == EXIT_OK
    text = " ".join(capsys.readouterr().out.split())
    assert "examples:" in text and f"memplan {command} examples/" in text and "EXECUTES" in text
    assert "--scratch {cpu,none}" in text and "cpu: count CPU convolution scratch buffers" in text


def test_segment_rows_merge_only_runs_of_stored_segments():
    from memplan.cli import _segment_rows
    loaded = load_model(TINY)
    plan = memplan.plan(loaded.model, loaded.inputs, budget="18MiB")
    compact, full = _segment_rows(plan, False), _segment_rows(plan, True)
    assert len(full) == len(plan.segments)
    assert [n for r in compact for n in r["nodes"]] == [n for s in plan.segments for n in s.nodes]
    assert [r["mode"] for r in compact if r["mode"] == "recompute"] == ["recompute"] * len(plan.recomputed_segments)
    assert all(a["mode"] != "store" or b["mode"] != "store" for a, b in itertools.pairwise(compact))
    assert sum(r["kept_bytes"] for r in compact) == sum(s.kept_bytes for s in plan.segments)
