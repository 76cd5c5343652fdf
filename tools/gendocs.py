"""Regenerate the command output shown in README.md and docs/cli.md from the code, or check it.

    python -m tools.gendocs            # rerun every documented command, rewrite the files
    python -m tools.gendocs --check    # exit 1 (with a diff) when a file differs from what the code prints

What it regenerates, in document order, in one scratch folder holding a link to ``examples/``
(so ``examples/...`` paths and files such as ``plan.json`` behave as in the docs):

- a fenced block whose first line is ``$ memplan ...`` or ``$ python FILE.py``: the lines after it
  become the command's stdout; a ``stderr:`` block right after it (kept where the document shows
  one, added when the command fails) its stderr; an ``exit code N`` line its exit code. ``FILE.py``
  is the ``python`` block just before it.
- ``<!-- json-excerpt: memplan ... --json; omit KEY,...; first KEY,... -->`` before a ``json`` block:
  the command's record without the ``omit`` keys and with only the first item of the ``first`` lists.
- ``<!-- include: PATH#HEADING -->`` ... ``<!-- end include -->``: the body of that section of PATH
  (``; demote N`` before ``-->`` puts its headings N levels lower).

Run times and step times differ from run to run: :func:`normalize` masks them (and table widths)
before two texts are compared, so ``--check`` fails only when a figure or a word changed.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/cli.md", "docs/benchmarks.md")
COLUMNS = 100                                  # the terminal width the documented output was made with
#: the documented commands run on this many threads, as the tests do (conftest): CPU kernel scratch,
#: and so every scratch="cpu" figure, depends on the thread count
DOC_THREADS = 1
#: ... and as on this CPU kernel family (memplan.measure.cpu_kernels): the ISA moves those figures too
DOC_CPU = "avx512-bf16"
FENCE = "```"
_JSON_EXCERPT = re.compile(r"<!-- json-excerpt: (?P<cmd>.+?)(?:; omit (?P<omit>[\w,]+))?"
                           r"(?:; first (?P<first>[\w,]+))? -->")
_INCLUDE = re.compile(r"<!-- include: (?P<path>[^#]+)#(?P<heading>.+?)(?:; demote (?P<demote>\d))? -->")
_END_INCLUDE = "<!-- end include -->"


@dataclass(frozen=True)
class Result:
    """What a documented command printed and returned."""
    stdout: str
    stderr: str
    code: int


# -- running the commands ----------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_folder() -> Iterator[Path]:
    """A temporary working folder with ``examples`` linked to this repository's."""
    with tempfile.TemporaryDirectory(prefix="memplan-docs-") as tmp:
        (Path(tmp) / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
        yield Path(tmp)


@contextlib.contextmanager
def _environment(cwd: Path) -> Iterator[None]:
    """The documented commands' surroundings: ``cwd``, COLUMNS, one OpenMP thread and the CPU kernels of
    DOC_CPU (thread count and ISA are part of CPU scratch figures, so docs generated anywhere match)."""
    import torch
    old_cwd, old_columns, old_threads = Path.cwd(), os.environ.get("COLUMNS"), torch.get_num_threads()
    old_cpu = os.environ.get("MEMPLAN_CPU")
    os.chdir(cwd)
    os.environ["COLUMNS"] = str(COLUMNS)
    os.environ["MEMPLAN_CPU"] = DOC_CPU
    torch.set_num_threads(DOC_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        os.chdir(old_cwd)
        if old_cpu is None:
            os.environ.pop("MEMPLAN_CPU", None)
        else:
            os.environ["MEMPLAN_CPU"] = old_cpu
        if old_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old_columns


def run_command(command: str, cwd: Path, files: dict[str, str]) -> Result:
    """Run ``memplan ...`` in this process, or ``python FILE`` (FILE's text from ``files``) in a fresh one."""
    argv = shlex.split(command)
    if argv[0] == "memplan":
        from memplan.cli import main
        out, err = io.StringIO(), io.StringIO()
        with _environment(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv[1:])
        return Result(out.getvalue(), err.getvalue(), code)
    if argv[0] == "python" and len(argv) == 2 and argv[1] in files:
        (cwd / argv[1]).write_text(files[argv[1]])
        env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": str(COLUMNS), "OMP_NUM_THREADS": str(DOC_THREADS),
               "MEMPLAN_CPU": DOC_CPU}
        proc = subprocess.run([sys.executable, argv[1]], cwd=cwd, env=env, capture_output=True, text=True,
                              check=False, timeout=900)
        return Result(proc.stdout, proc.stderr, proc.returncode)
    raise ValueError(f"gendocs cannot run {command!r}: only `memplan ...` and `python FILE` after a python block")


def clean(text: str) -> list[str]:
    """Lines without trailing spaces, and without leading or trailing blank lines."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def excerpt(record: dict, omit: list[str], first: list[str]) -> dict:
    """``record`` without the ``omit`` keys, the ``first`` lists cut to their first item.

    >>> excerpt({"a": 1, "b": [1, 2], "plan": {}}, ["plan"], ["b"])
    {'a': 1, 'b': [1]}
    """
    return {k: (v[:1] if k in first else v) for k, v in record.items() if k not in omit}


# -- the documents -----------------------------------------------------------------------------------
def _fenced(lines: list[str], start: int) -> tuple[list[str], int]:
    """The body of the fenced block opening at ``lines[start]`` and the index after its closing fence."""
    end = lines.index(FENCE, start + 1)
    return lines[start + 1:end], end + 1


def section(path: Path, heading: str) -> list[str]:
    """The lines under ``heading`` in the Markdown file ``path``, up to the next heading as high or higher."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"(#+) (.*)", line)
        if m and m.group(2).strip() == heading:
            level, body = len(m.group(1)), []
            for nxt in lines[i + 1:]:
                h = re.match(r"(#+) ", nxt)
                if h and len(h.group(1)) <= level:
                    break
                body.append(nxt)
            return clean("\n".join(body))
    raise ValueError(f"{path} has no heading {heading!r}")


def regenerate(text: str, cwd: Path, *, run: Callable[[str, Path, dict[str, str]], Result] = run_command,
               select: Callable[[str], bool] = lambda command: True) -> str:
    """``text`` with every generated part rebuilt (commands for which ``select`` is false are left as they are)."""
    lines, out, files, i = text.splitlines(), [], {}, 0
    last_python: str | None = None
    while i < len(lines):
        line = lines[i]
        inc = _INCLUDE.fullmatch(line)
        jex = _JSON_EXCERPT.fullmatch(line)
        if inc:
            end = lines.index(_END_INCLUDE, i)
            body = section(ROOT / inc["path"], inc["heading"])
            depth = "#" * int(inc["demote"] or 0)              # "; demote 1": its headings one level lower
            out += [line, "", *[depth + ln if ln.startswith("#") else ln for ln in body], "", _END_INCLUDE]
            i = end + 1
        elif jex and i + 1 < len(lines) and lines[i + 1] == FENCE + "json":
            old, i = _fenced(lines, i + 1)
            body = old
            if select(jex["cmd"]):
                from memplan.cli.records import to_json
                res = run(jex["cmd"], cwd, files)
                rec = excerpt(json.loads(res.stdout), (jex["omit"] or "").split(","), (jex["first"] or "").split(","))
                body = to_json(rec).splitlines()
            out += [line, FENCE + "json", *body, FENCE]
        elif line.startswith(FENCE + "python"):
            body, i = _fenced(lines, i)
            last_python = "\n".join(body) + "\n"
            out += [line, *body, FENCE]
        elif line == FENCE and i + 1 < len(lines) and lines[i + 1].startswith("$ "):
            command = lines[i + 1][2:]
            old_out, i = _fenced(lines, i)
            old_err, has_err = [], i + 1 < len(lines) and lines[i] == "stderr:" and lines[i + 1] == FENCE
            if has_err:
                old_err, i = _fenced(lines, i + 1)
            old_code = re.fullmatch(r"exit code (\d+)", lines[i]) if i < len(lines) else None
            if old_code:
                i += 1
            py = re.fullmatch(r"python (\S+\.py)", command)
            if py and last_python is not None:
                files[py.group(1)] = last_python
            if select(command):
                res = run(command, cwd, files)
                stdout, stderr, code = clean(res.stdout), clean(res.stderr), res.code
            else:
                stdout, stderr, code = old_out[1:], old_err, int(old_code.group(1)) if old_code else 0
            out += [FENCE, f"$ {command}", *stdout, FENCE]
            if has_err or (code != 0 and stderr):
                out += ["stderr:", FENCE, *stderr, FENCE]
            if old_code:
                out.append(f"exit code {code}")
        else:
            out.append(line)
            i += 1
    return "\n".join(out) + "\n"


def normalize(text: str) -> str:
    """``text`` with what differs between two runs masked: durations, planning and step times, table widths.

    >>> normalize("planned in 0.09 s; │ planned / vanilla │ 0.93x │ 0.93x │  │ 3.01x │")
    'planned in <t> s; │ planned / vanilla │ 0.93x │ 0.93x │ │ <t>x │'
    """
    text = re.sub(r"\b\d+(?:\.\d+)? s\b", "<t> s", text)
    text = re.sub(r'("(?:planning_time_s|step_time_s)": )[0-9.e-]+', r"\1<t>", text)
    lines = [re.sub(r"[0-9.]+x(?=\s*│\s*$)", "<t>x", ln) if "planned / vanilla" in ln and ln.count("│") >= 6 else ln
             for ln in text.splitlines()]             # the step-time ratio: the last cell of measure --real's row
    return re.sub(r"[ ━─═]+", " ", "\n".join(lines))


def diff(path: str, committed: str, generated: str) -> str:
    """A unified diff of the normalized texts ('' when they agree)."""
    a, b = normalize(committed).splitlines(), normalize(generated).splitlines()
    return "\n".join(difflib.unified_diff(a, b, f"{path} (committed)", f"{path} (generated)", lineterm=""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    p.add_argument("docs", nargs="*", default=list(DOCS), help=f"files, relative to the repository (default: "
                   f"{' '.join(DOCS)})")
    args = p.parse_args(argv)
    status = 0
    for name in args.docs:
        path = ROOT / name
        committed = path.read_text()
        with scratch_folder() as cwd:
            generated = regenerate(committed, cwd)
        if args.check:
            d = diff(name, committed, generated)
            if d:
                print(d)
                status = 1
        elif diff(name, committed, generated):      # only times changed: keep the file (no churn in git)
            path.write_text(generated)
            print(f"rewrote {name}", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
