"""The README's "Your own task" example runs as written.

The code blocks between ``<!-- own-task:begin -->`` and ``<!-- own-task:end -->`` are extracted:
a block whose first line is ``# <path>`` is written to that path of an empty directory, and
each line of the ``bash`` block is run there, in order, as a subprocess. Two substitutions make
the commands use this checkout's interpreter without touching the shared environment:
``pip install -e ./mine`` installs the package (not editable) into a temporary prefix that is put
on ``PYTHONPATH`` (a prefix's site directory is not processed for ``.pth`` files, so an editable
install would not be importable from it); ``genopt`` and ``python`` are this interpreter. The
entry point is the package's own: the project is found through ``importlib.metadata`` exactly as
after a user's ``pip install``.

``genopt run mine`` runs the embedded SmolLM2 model (the default optimizer), so the test that
runs every line is marked ``e2e``; the other runs the rest (install, ``genopt projects``, the
Python script with its scripted optimizer) and the defaults' contract.
"""

from __future__ import annotations

import os
import re
import shlex
import sqlite3
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def section_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block of the README's own-task section."""
    text = README.read_text(encoding="utf-8")
    begin, end = text.index("<!-- own-task:begin -->"), text.index("<!-- own-task:end -->")
    return re.findall(r"^```(\w*)\n(.*?)^```$", text[begin:end], flags=re.S | re.M)


def write_files(directory: Path) -> list[str]:
    """Write the path-named blocks; returns the bash block's command lines."""
    commands: list[str] = []
    for language, body in section_blocks():
        first = body.splitlines()[0]
        if language == "bash":
            commands += [line for line in body.splitlines() if line.strip()]
        else:
            assert first.startswith("# "), f"block without a file name: {first!r}"
            path = directory / first[2:].strip()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body, encoding="utf-8")
    return commands


def command(line: str, prefix: Path) -> list[str]:
    argv = shlex.split(line)
    if argv[:3] == ["pip", "install", "-e"]:
        return [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--prefix", str(prefix),
                *argv[3:]]
    if argv[0] == "genopt":
        return [sys.executable, "-m", "mlflow_genopt.cli", *argv[1:]]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    raise AssertionError(f"the README's command {line!r} has no substitution here")


def environment(directory: Path, prefix: Path) -> dict[str, str]:
    site = sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OPENAI_"))}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", HOME=str(directory),
               PYTHONPATH=os.pathsep.join([site, *filter(None, [os.environ.get("PYTHONPATH")])]))
    return env


def run_section(directory: Path, *, skip: tuple[str, ...] = ()) -> dict[str, subprocess.CompletedProcess]:
    prefix = directory.parent / (directory.name + "-prefix")
    env = environment(directory, prefix)
    done = {}
    for line in write_files(directory):
        if line in skip:
            continue
        completed = subprocess.run(command(line, prefix), cwd=directory, env=env, capture_output=True,
                                   text=True, timeout=900)
        assert completed.returncode == 0, f"{line}\n{completed.stdout[-2000:]}\n{completed.stderr[-3000:]}"
        done[line] = completed
    return done


def finished_runs(directory: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(directory / "mlflow.db") as db:
        return db.execute("SELECT status, name FROM runs ORDER BY start_time").fetchall()


def test_the_section_holds_a_task_file_an_entry_point_commands_and_a_script():
    blocks = section_blocks()
    names = [body.splitlines()[0] for language, body in blocks if language != "bash"]
    assert names == ["# mine/genopt_mine/__init__.py", "# mine/pyproject.toml", "# run_mine.py"]
    [bash] = [body for language, body in blocks if language == "bash"]
    assert "genopt run mine" in bash and "pip install -e ./mine" in bash
    toml = next(body for _, body in blocks if body.startswith("# mine/pyproject.toml"))
    assert '[project.entry-points."mlflow_genopt.projects"]' in toml  # the group the code reads
    from mlflow_genopt.project import ENTRY_POINT_GROUP

    assert ENTRY_POINT_GROUP == "mlflow_genopt.projects"


def test_the_example_installs_registers_and_runs_from_python(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    done = run_section(work, skip=("genopt run mine",))
    assert "mine: Parse prices as people write them" in done["genopt projects"].stdout
    assert "--init naive: float() of the text (trainable: parse_price)" in done["genopt projects"].stdout
    script = done["python run_mine.py"].stdout
    assert "check_task(mine/prices): ok" in script
    [(best_val, test)] = re.findall(r"^v1-[0-9a-f]{8} (\S+) (\S+)$", script, flags=re.M)
    assert float(best_val) == 1.0 and float(test) == 1.0  # the scripted rewrite reads every price
    assert [status for status, _ in finished_runs(work)] == ["FINISHED"]


def test_loop_config_takes_the_projects_own_defaults(tmp_path):
    """``LoopConfig(project="mine")`` takes mine's defaults for every field not given (and the
    generic ones for the rest); an unregistered name takes the generic defaults, not BBEH's."""
    work = tmp_path / "work"
    work.mkdir()
    prefix = tmp_path / "work-prefix"
    line = next(line for line in write_files(work) if line.startswith("pip install"))
    subprocess.run(command(line, prefix), cwd=work, check=True, capture_output=True, timeout=600)
    probe = (
        "import json\n"
        "from mlflow_genopt import LoopConfig\n"
        "from mlflow_genopt.config import GENERIC_DEFAULTS\n"
        "mine = LoopConfig(project='mine', batch_size=2)\n"
        "other = LoopConfig(project='not_installed')\n"
        "print(json.dumps({'mine': mine.to_dict(), 'other': other.to_dict(), 'generic': GENERIC_DEFAULTS}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=work, env=environment(work, prefix),
                         capture_output=True, text=True, timeout=300, check=True).stdout
    import json

    data = json.loads(out)
    mine, other, generic = data["mine"], data["other"], data["generic"]
    assert (mine["task"], mine["init"], mine["steps"], mine["optimizer_max_tokens"]) == ("prices", "naive", 2, 300)
    assert mine["batch_size"] == 2  # given: wins over the project's default (3)
    untouched = set(generic) - {"task", "init", "steps", "batch_size", "optimizer_max_tokens"}
    assert {k: mine[k] for k in untouched} == {k: generic[k] for k in untouched}
    assert other["init"] == "default" and other["task"] == "default"  # not bbeh's prompt_only
    assert {k: other[k] for k in generic} == dict(generic)


@pytest.mark.e2e
def test_every_command_of_the_section_runs_as_written(tmp_path):
    """All of it, `genopt run mine` with the embedded SmolLM2 model included."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is a dependency: install the project")
    work = tmp_path / "work"
    work.mkdir()
    done = run_section(work)
    assert "[genopt] step 2/2" in done["genopt run mine"].stderr
    assert "selected version: v" in done["genopt run mine"].stdout
    assert [status for status, _ in finished_runs(work)] == ["FINISHED", "FINISHED"]
