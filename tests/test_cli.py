"""The memplan command line: each command on example files, every error path's exit code and message,
the --json error record, output files checked before planning and written all or nothing, progress
on stderr when it is not a terminal, and the bare `memplan` / --version / python -m memplan."""
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
from memplan.segtable import segment_rows
from tests.nets import UNTRACEABLE_MODEL_SOURCE

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny_unet.py")
CONVNET = str(ROOT / "examples" / "convnet_instance.py")
TWO_INPUTS = """
    import torch
    from torch import nn
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv3d(1, 2, 3, padding=1), nn.Conv3d(1, 2, 3, padding=1)
        def forward(self, image, mask):
            return self.a(image) + self.b(mask)
"""


def run(*args: str, module: str = "memplan.cli", cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The command in a fresh interpreter, stdout and stderr pipes (not terminals)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("COLUMNS", None)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          check=False, cwd=cwd, timeout=600)


def write(path: Path, source: str) -> str:
    path.write_text(textwrap.dedent(source))
    return str(path)


# -- optimize ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_optimize_json_plan_file_and_plot(tmp_path, capsys):
    plan_file, plot = tmp_path / "plan.json", tmp_path / "timeline.png"
    code = main(["optimize", TINY, "--budget", "18MiB", "--json", "--out", str(plan_file), "--plot", str(plot)])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    rec = json.loads(out)                                          # stdout is one JSON object, nothing else
    assert rec["budget_bytes"] == 18 * 2**20 and rec["objective"] == "time-centric"
    assert rec["planned_peak_bytes"] <= rec["budget_bytes"] < rec["vanilla_peak_bytes"]
    assert rec["graph_nodes"] == sum(len(s["nodes"]) for s in rec["segments"]) == sum(
        len(s["nodes"]) for s in rec["plan"]["segments"])
    assert any(s["mode"] == "recompute" for s in rec["segments"]) and rec["overhead"] > 0
    assert rec["plan_file"] == str(plan_file) and rec["plot_file"] == str(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "timeline.png"]   # no temporary left

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
    assert main(["optimize", CONVNET, "--budget", "1450KiB", "--optimizer", "sgd", "--method", "approx"]) == EXIT_OK
    text = capsys.readouterr().out
    for needle in ("graph", "approx DP", "vanilla peak", "planned peak", "budget", "1.42 MiB", "overhead",
                   "segments", "recompute", "store", "optimizer sgd"):
        assert needle in text, needle


def test_optimize_amp_puts_fp32_and_bf16_side_by_side(tmp_path, capsys):
    """--amp bf16 --threads 1: the plan is made for bf16 at one thread; the JSON's fp32 and bf16 peaks are
    simulate_step's, computed here independently of the command."""
    plan_file = tmp_path / "bf16.json"
    assert main(["optimize", CONVNET, "--amp", "bf16", "--threads", "1", "--json", "--out", str(plan_file)]) == EXIT_OK
    rec = json.loads(capsys.readouterr().out)
    loaded = load_model(CONVNET)
    plan = memplan.Plan.from_json(plan_file)
    assert (rec["amp"], rec["threads"], plan.amp, plan.threads) == ("bf16", 1, "bf16", 1)
    planned = memplan.compile(loaded.model, loaded.inputs, plan=plan, amp="bf16")
    for amp, key in ((None, "fp32"), ("bf16", "bf16")):
        for name, m in (("vanilla", loaded.model), ("planned", planned)):
            want = memplan.simulate_step(m, loaded.inputs, amp=amp, threads=1).peak_bytes
            assert rec["precision_peaks"][key][f"{name}_peak_bytes"] == want, (key, name)
    assert rec["planned_peak_bytes"] == rec["precision_peaks"]["bf16"]["planned_peak_bytes"]
    assert main(["optimize", CONVNET, "--threads", "1"]) == EXIT_OK
    text = capsys.readouterr().out
    fp32 = memplan.simulate_step(loaded.model, loaded.inputs, threads=1).peak_bytes
    bf16 = memplan.simulate_step(loaded.model, loaded.inputs, amp="bf16", threads=1).peak_bytes
    assert re.search(rf"fp32 / bf16 +vanilla {re.escape(memplan.format_bytes(fp32))} / "
                     rf"{re.escape(memplan.format_bytes(bf16))}; planned [^(]*\(simulated,\s+the fp32 plan\)", text), text
    assert "optimizer adam, scratch cpu, fp32, 1 thread" in text


def test_fit_amp_json_holds_both_precisions_at_the_given_input(capsys):
    assert main(["fit", CONVNET, "--budget", "2MiB", "--axis", "2", "--amp", "bf16", "--threads", "1",
                 "--json"]) == EXIT_OK
    rec = json.loads(capsys.readouterr().out)
    loaded = load_model(CONVNET)
    assert rec["amp"] == "bf16" and rec["threads"] == 1
    given = rec["peaks_at_given"]
    assert given["fp32"]["vanilla"] == memplan.simulate_step(loaded.model, loaded.inputs, threads=1).peak_bytes
    assert given["bf16"]["vanilla"] == memplan.simulate_step(loaded.model, loaded.inputs, amp="bf16",
                                                             threads=1).peak_bytes
    gcp = memplan.plan(loaded.model, loaded.inputs, amp="bf16", threads=1)
    assert given["bf16"]["GCP"] == gcp.simulated_peak_bytes
    by_strategy = {r["strategy"]: r for r in rec["results"]}
    assert by_strategy["vanilla"]["base_peak_bytes"] == given["bf16"]["vanilla"]   # the search ran in bf16
    assert main(["fit", CONVNET, "--budget", "2MiB", "--axis", "2", "--threads", "1"]) == EXIT_OK
    text = capsys.readouterr().out
    fp32 = memplan.format_bytes(given["fp32"]["vanilla"])
    bf16 = memplan.format_bytes(given["bf16"]["vanilla"])
    assert f"at given, fp32 / bf16: vanilla {fp32} / {bf16}, GCP " in text, text


#: C -> C Conv-BN-ReLU layers, each of which a reversible block can replace and free: REV pays here
CHAIN_SOURCE = """
        import torch
        from torch import nn
        INPUT_SHAPE = (1, 1, 40, 40, 40)
        def build_model():
            torch.manual_seed(0)
            mods = [nn.Conv3d(1, 4, 3, padding=1)]
            for _ in range(4):       # C -> C Conv-BN-ReLU layers: each can become a reversible block
                mods += [nn.Conv3d(4, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4), nn.ReLU()]
            return nn.Sequential(*mods, nn.Conv3d(4, 1, 1))
        """


def test_optimize_rev_reports_what_it_replaced(tmp_path, capsys):
    """GCP+REV reaches below the GCP floor on this net; the table and JSON name the replaced blocks,
    and the plan file rebuilds the same substituted network."""
    chain = write(tmp_path / "chain.py", CHAIN_SOURCE)
    loaded = load_model(chain)
    gcp_floor = memplan.plan(loaded.model, loaded.inputs).simulated_peak_bytes
    plan_file = tmp_path / "rev.json"
    assert main(["optimize", chain, "--rev", "--json", "--out", str(plan_file)]) == EXIT_OK
    out, err = capsys.readouterr()
    rec = json.loads(out)
    assert rec["rev"] and rec["planned_peak_bytes"] < gcp_floor
    assert {r["name"] for r in rec["rev"]} == {n for s in rec["segments"] for n in s["rev"]}
    assert "REV substitution changed the network" in err          # the warning is a note on stderr
    with pytest.warns(UserWarning):
        compiled = memplan.compile(loaded.model, loaded.inputs, plan=str(plan_file))
    assert memplan.simulate_step(compiled, loaded.inputs).peak_bytes == rec["planned_peak_bytes"]


# -- output paths: checked before planning, written all or nothing ---------------------------------------
@pytest.fixture
def no_planning(monkeypatch):
    """Fail the test if the command gets as far as loading the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded: the output path was not checked first")
    monkeypatch.setattr("memplan.cli.commands.load", refuse)


@pytest.mark.parametrize("option, name, match", [
    ("--out", "missing/plan.json", r"--out .*missing/plan.json: folder .*missing does not exist; create it"),
    ("--plot", "missing/t.png", r"--plot .*missing/t.png: folder .*missing does not exist"),
    ("--out", "plan.txt", r"--out .*plan.txt: the suffix must be .json \(got '.txt'\)"),
    ("--plot", "timeline.bmpx", r"--plot .*timeline.bmpx: the suffix must be .png, .pdf, .svg, .* \(got '.bmpx'\)"),
    ("--out", "adir.json", r"--out .*adir.json is a folder; name a file in it"),
    ("--out", "afile/plan.json", r"folder .*afile does not exist"),
])
def test_bad_output_paths_fail_before_planning(tmp_path, capsys, no_planning, option, name, match):
    (tmp_path / "adir.json").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    assert main(["optimize", TINY, option, str(tmp_path / name)]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert not out and re.search(match, err), err
    assert "Traceback" not in err


def test_unwritable_folder_fails_before_planning(tmp_path, capsys, monkeypatch, no_planning):
    # root may write anywhere, so the permission check itself is made to say no
    monkeypatch.setattr("memplan.cli.outputs.os.access", lambda path, mode: Path(path) != tmp_path)
    assert main(["optimize", TINY, "--out", str(tmp_path / "plan.json")]) == EXIT_USAGE
    assert f"folder {tmp_path} is not writable" in capsys.readouterr().err


def test_a_failed_plot_leaves_no_plan_file_and_keeps_the_old_one(tmp_path, capsys, monkeypatch):
    def broken_plot(curves, path, **kwargs):
        Path(path).write_bytes(b"half a png")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("memplan.cli.plots.plot_timeline", broken_plot)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    code = main(["optimize", TINY, "--out", str(fresh / "plan.json"), "--plot", str(fresh / "t.png")])
    assert code == EXIT_USAGE
    assert "No space left on device" in capsys.readouterr().err
    assert list(fresh.iterdir()) == []                              # no plan.json, no half plot, no temporary

    old = tmp_path / "plan.json"
    old.write_text("the previous plan")
    assert main(["optimize", TINY, "--out", str(old), "--plot", str(tmp_path / "t.png")]) == EXIT_USAGE
    assert old.read_text() == "the previous plan" and sorted(p.name for p in tmp_path.iterdir()) == ["fresh",
                                                                                                    "plan.json"]


# -- fit -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fit_answer_fits_and_the_next_size_does_not(capsys):
    budget = 3 * 2**20
    assert main(["fit", CONVNET, "--budget", "3MiB", "--json"]) == EXIT_OK
    rec = json.loads(capsys.readouterr().out)
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
    assert main(["fit", CONVNET, "--budget", "20KiB", "--json"]) == EXIT_BUDGET      # one object: answer + error
    out, err = capsys.readouterr()
    assert "memplan: error: no strategy fits 20.0 KiB even at the smallest input 2x1x2x2x2" in err
    rec = json.loads(out)
    assert all(r["shape"] is None for r in rec["results"]) and rec["error"]["exit_code"] == EXIT_BUDGET
    assert rec["error"]["message"].startswith("no strategy fits 20.0 KiB even at the smallest input 2x1x2x2x2")


# -- measure -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_measure_real_side_by_side():
    # a budget halfway between the least-memory plan and vanilla on this CPU (its scratch figures follow the ISA)
    loaded = load_model(CONVNET)
    least = memplan.plan(loaded.model, loaded.inputs, threads=1)
    budget = (least.simulated_peak_bytes + least.simulated_vanilla_peak_bytes) // 2
    proc = run("measure", CONVNET, "--budget", str(budget), "--real", "--repeat", "1", "--json")
    assert proc.returncode == EXIT_OK, proc.stderr
    rec = json.loads(proc.stdout)
    v, p = rec["vanilla"], rec["planned"]
    assert p["simulated_peak_bytes"] <= budget < v["simulated_peak_bytes"]
    assert rec["simulated_ratio"] == pytest.approx(p["simulated_peak_bytes"] / v["simulated_peak_bytes"])
    # measured in the same run: the plan really holds less, and each step took time
    assert 0 < p["measured_peak_bytes"] < v["measured_peak_bytes"]
    assert rec["measured_ratio"] == pytest.approx(p["measured_peak_bytes"] / v["measured_peak_bytes"])
    assert p["step_time_s"] > 0 and v["step_time_s"] > 0
    assert rec["step_time_ratio"] == pytest.approx(p["step_time_s"] / v["step_time_s"])
    # stderr: the plain progress lines (not a terminal) and nothing from the profiler's native code
    assert "measuring a real planned step on cpu: done in" in proc.stderr
    assert "USDT" not in proc.stderr and "allocated before the profiling started" not in proc.stderr


def test_json_stdout_stays_clean_when_the_model_file_prints(tmp_path, capsys):
    noisy = tmp_path / "noisy.py"
    noisy.write_text(f"print('hello from the model file')\nexec(open({CONVNET!r}).read())\n")
    assert main(["optimize", str(noisy), "--json"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert json.loads(out)["graph_nodes"] > 0 and "hello from the model file" in err


def test_measure_simulated_only(capsys):
    assert main(["measure", TINY, "--json"]) == EXIT_OK
    rec = json.loads(capsys.readouterr().out)
    assert rec["measured_ratio"] is None
    assert rec["planned"]["simulated_peak_bytes"] < rec["vanilla"]["simulated_peak_bytes"]


def test_measure_amp_simulates_both_steps_in_bf16(capsys):
    assert main(["measure", CONVNET, "--amp", "bf16", "--threads", "1", "--json"]) == EXIT_OK
    rec = json.loads(capsys.readouterr().out)
    loaded = load_model(CONVNET)
    assert rec["amp"] == "bf16" and rec["threads"] == 1
    want = memplan.simulate_step(loaded.model, loaded.inputs, amp="bf16", threads=1).peak_bytes
    assert rec["vanilla"]["simulated_peak_bytes"] == want


def test_device_cuda_without_a_gpu_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["measure", CONVNET, "--real", "--device", "cuda"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.strip() == "memplan: error: --device cuda: no CUDA device is available here; use --device cpu"


# -- the command itself: progress, bare memplan, --version, python -m memplan ----------------------------------
def test_progress_is_plain_lines_when_stderr_is_not_a_terminal():
    proc = run("optimize", TINY)
    assert proc.returncode == EXIT_OK, proc.stderr
    lines = proc.stderr.splitlines()
    assert f"loading {TINY} ..." in lines and "tracing and planning on 1x1x32x24x24 ..." in lines
    assert any(re.fullmatch(r"tracing and planning on 1x1x32x24x24: done in \d+\.\d s", ln) for ln in lines), lines
    assert "\r" not in proc.stderr and "\x1b[" not in proc.stderr        # no spinner, no escape codes
    assert "planned peak" in proc.stdout and "planned peak" not in proc.stderr


def test_quiet_drops_progress_but_keeps_notes(tmp_path, capsys):
    assert main(["optimize", write(tmp_path / "chain.py", CHAIN_SOURCE), "--rev", "-q"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "tracing" not in err and "loading" not in err and "note: memplan REV substitution" in err


def test_bare_memplan_lists_the_commands_and_python_m_memplan_runs(tmp_path):
    bare = run(module="memplan", cwd=tmp_path)                   # python -m memplan, from any folder
    assert bare.returncode == EXIT_USAGE and not bare.stdout
    for command, what in (("optimize", "plan a model"), ("fit", "the largest input"), ("measure", "vanilla vs")):
        assert re.search(rf"^\s+{command}\s+{what}", bare.stderr, re.MULTILINE), bare.stderr
    version = run("--version", module="memplan", cwd=tmp_path)
    assert version.returncode == EXIT_OK
    assert version.stdout.strip() == (f"memplan {memplan.__version__} (torch {torch.__version__}, Python "
                                      f"{'.'.join(map(str, sys.version_info[:3]))})")


# -- errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, code, match", [
    (["optimize", "examples/missing.py"], EXIT_USAGE, "model file examples/missing.py does not exist"),
    (["optimize", "examples/no_model.py"], EXIT_USAGE, "no model found in examples/no_model.py"),
    (["optimize", "examples/no_model.py:Block"], EXIT_USAGE, "give every argument a default"),
    (["optimize", TINY, "--input-shape", "1,1,x"], EXIT_USAGE, "cannot parse input shape '1,1,x'"),
    (["optimize", TINY, "--input-shape", "1,1,30,30,30"], EXIT_USAGE, "does not accept an input of shape 1x1x30x30x30"),
    (["optimize", TINY, "--budget", "12 bananas"], EXIT_USAGE, "cannot parse byte quantity '12 bananas'"),
    (["optimize", "UNTRACEABLE"], EXIT_USAGE, "Model cannot run without data.*Fix: forward reads a tensor.s values"),
    (["optimize", CONVNET, "--budget", "500KiB", "--scratch", "none"], EXIT_BUDGET,
     r"below the smallest feasible peak \d+(\.\d+)? [KM]iB"),   # tensors only: the same on every CPU
    (["optimize", "TWO_INPUTS", "--input-shape", "1,1,8,8,8"], EXIT_USAGE,
     r"takes 2 inputs \(image, mask\) but --input-shape gives one tensor; define `def example_inputs\(\): "
     r"return \(image, mask\)` in .*two.py, a tuple of 2 tensors.*and drop --input-shape"),
    (["optimize", "TWO_INPUTS"], EXIT_USAGE, r"no input shape for .*two.py: define `def example_inputs\(\): "
     r"return \(image, mask\)`"),
    (["fit", TINY], EXIT_USAGE, "the following arguments are required: --budget"),
    (["fit", CONVNET, "--budget", "8MiB", "--axis", "1"], EXIT_USAGE, "axis 1 is the channel axis"),
    (["measure", CONVNET, "--repeat", "0"], EXIT_USAGE, "--repeat must be >= 1"),
    (["optimize", CONVNET, "--method", "fast"], EXIT_USAGE, "invalid choice: 'fast'"),
    (["optimise", CONVNET], EXIT_USAGE, "invalid choice: 'optimise'"),
])
def test_error_paths(tmp_path, monkeypatch, capsys, argv, code, match):
    monkeypatch.chdir(ROOT)
    files = {"UNTRACEABLE": write(tmp_path / "branchy.py", UNTRACEABLE_MODEL_SOURCE),
             "TWO_INPUTS": write(tmp_path / "two.py", TWO_INPUTS)}
    argv = [files.get(a, a) for a in argv]
    assert main(argv) == code
    captured = capsys.readouterr()
    assert not captured.out
    assert re.search(match, captured.err, re.DOTALL), captured.err
    assert "Traceback" not in captured.err

    # --json: the same failure is one JSON record on stdout, the message still on stderr
    assert main([*argv, "--json"]) == code
    captured = capsys.readouterr()
    err = json.loads(captured.out)["error"]
    assert err["exit_code"] == code and re.search(match, err["message"], re.DOTALL), err
    assert re.search(match, captured.err, re.DOTALL)


def test_budget_error_record_carries_the_floor_and_what_rev_reaches(tmp_path, capsys):
    chain = write(tmp_path / "chain.py", CHAIN_SOURCE)
    loaded = load_model(chain)
    gcp_floor = memplan.plan(loaded.model, loaded.inputs).simulated_peak_bytes
    assert main(["optimize", chain, "--budget", "20MiB", "--json"]) == EXIT_BUDGET
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["type"] == "BudgetError" and err["budget_bytes"] == 20 * 2**20
    assert err["min_feasible_bytes"] == gcp_floor and err["rev_min_bytes"] < gcp_floor


def test_rev_hint_follows_rev_min_bytes_not_the_message_text(capsys, monkeypatch):
    """The CLI adds "add --rev" exactly when the BudgetError says REV reaches below the floor."""
    from memplan.cli import commands

    def raise_budget(rev_min):
        def compile_loaded(*args, **kwargs):
            raise memplan.BudgetError("budget too small", budget_bytes=1, min_feasible_bytes=100,
                                      rev_min_bytes=rev_min)
        return compile_loaded
    for rev_min, hinted in ((60, True), (100, False), (None, False)):
        monkeypatch.setattr(commands, "compile_loaded", raise_budget(rev_min))
        assert main(["optimize", CONVNET, "--budget", "1MiB"]) == EXIT_BUDGET
        assert ("hint: add --rev" in capsys.readouterr().err) is hinted, rev_min
    assert main(["optimize", CONVNET, "--budget", "1MiB", "--rev"]) == EXIT_BUDGET    # --rev given: no hint
    assert "hint" not in capsys.readouterr().err


def test_usage_error_prints_the_usage_line(capsys):
    assert main(["optimize"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("usage: memplan optimize [-h]") and "the following arguments are required: MODEL" in err


@pytest.mark.parametrize("command", ["optimize", "fit", "measure"])
def test_help_has_examples_defaults_and_says_the_file_runs(command, capsys):
    assert main([command, "--help"]) == EXIT_OK
    text = " ".join(capsys.readouterr().out.split())
    assert "examples:" in text and f"memplan {command} examples/" in text and "EXECUTES" in text
    assert "--scratch {cpu,none}" in text and "cpu: count CPU convolution scratch buffers" in text
    assert "(default: adam)" in text and "auto (default)" in text


# -- the segment rows shared with Plan.summary -------------------------------------------------------------
def test_segment_rows_merge_only_runs_of_stored_segments_and_summary_shows_them():
    loaded = load_model(TINY)
    plan = memplan.plan(loaded.model, loaded.inputs, budget="18MiB")
    compact, full = segment_rows(plan.segments, plan.rev), segment_rows(plan.segments, plan.rev, merge=False)
    assert len(full) == len(plan.segments)
    assert [n for r in compact for n in r.nodes] == [n for s in plan.segments for n in s.nodes]
    assert sum(r.recompute for r in compact) == len(plan.recomputed_segments) > 0
    assert all(a.recompute or b.recompute for a, b in itertools.pairwise(compact))   # no two stored rows adjoin
    assert sum(r.kept_bytes for r in compact) == sum(s.kept_bytes for s in plan.segments)
    summary = plan.summary().splitlines()
    for r in compact:                                                # Plan.summary() prints the same rows
        assert any(ln.split()[:3] == [r.label, str(len(r.nodes)), r.mode] for ln in summary), r.label


# -- progress on a terminal, interrupts and bugs ---------------------------------------------------------------
def test_progress_on_a_terminal_is_a_spinner_and_quiet_is_silent():
    import io

    from rich.console import Console

    from memplan.cli.progress import Progress
    buf = io.StringIO()
    live = Progress(Console(file=buf, force_terminal=True, width=80), live=True)
    with live.stage("tracing and planning") as update:
        update("tracing and planning, step 2")
    assert "tracing and planning" in buf.getvalue() and "done in" not in buf.getvalue()   # no plain lines
    silent = io.StringIO()
    with Progress(Console(file=silent), live=False, quiet=True).stage("loading"):
        pass
    assert silent.getvalue() == ""


def test_interrupt_exits_130_and_a_bug_still_gives_the_json_record(capsys, monkeypatch):
    from memplan.cli import commands

    def interrupted(args, io):
        raise KeyboardInterrupt
    monkeypatch.setitem(commands.COMMANDS, "optimize", interrupted)
    assert main(["optimize", CONVNET]) == 130
    assert capsys.readouterr().err.strip() == "memplan: interrupted"

    def buggy(args, io):
        raise ZeroDivisionError("a bug")
    monkeypatch.setitem(commands.COMMANDS, "optimize", buggy)
    with pytest.raises(ZeroDivisionError):                    # a bug keeps its traceback (exit 1) ...
        main(["optimize", CONVNET, "--json"])
    assert json.loads(capsys.readouterr().out) == {"error": {"type": "ZeroDivisionError", "message": "a bug",
                                                             "exit_code": 1}}   # ... and stdout stays JSON
