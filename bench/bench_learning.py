"""Benchmark: do loops learn with the models a user can run? genopt cells side by side with GEPA.

For each study (a case study and its starting artifact), each optimizer model (``embedded``:
SmolLM2-135M, the default; ``bench``: Qwen2.5-Coder-1.5B-Instruct from ``../shared/bin/bench-llm``)
and each cell of a small grid of loop choices (``edit_format/kN/selection/rM[/rr][/nwX|/imX]``: the
edit format, candidates per step, which version a step improves, repair attempts, ``/rr`` for
``parameter_selection: round_robin``, one parameter per step, and ``/nwX`` or ``/imX`` for
``acceptance: no_worse`` or ``improve`` with margin X), runs a loop per seed with a
fixed number of steps and records:

* first-try valid rate and valid-after-repair rate of the proposals (per candidate);
* accepted versions; validation gain of the selected version over the starting version;
* test score of the selected version; optimizer calls, task-model calls, wall time.

``--gepa`` runs GEPA 0.1.4 on each BBEH ``prompt_only`` study given, with the same task, splits,
exact-match scorer, seed prompt, task model and reflection model, with the same number of
reflection (optimizer) calls as genopt's steps. GEPA is never a project dependency: it is installed into a separate virtual environment
(``.bench/gepa-venv``, which sees this project's environment read-only through a ``.pth`` file)
and run there as a subprocess.

Results are appended to ``bench/results/learning.jsonl`` (committed; one line per run, keyed by
study, model, cell, seed and steps, with the commit measured): a key already measured on the same
commit is not run again, so an interrupted benchmark continues, and a new commit is measured anew.
The table (one line per study, model, cell and commit) is printed at the end (``--table`` prints
it without running anything). LLM answers are cached in ``.bench/cache`` (a rerun with the same
seed replays them).

Usage::

    python bench/bench_learning.py --studies bbeh/prompt_only --models embedded --seeds 3
    python bench/bench_learning.py --studies ml_pipeline/one_function,ml_pipeline/many_function \
        --models bench --cells tagged/k1/current/r2 --seeds 3
    python bench/bench_learning.py --gepa --studies bbeh/causal_understanding --models bench --seeds 3
    python bench/bench_learning.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OUT = ROOT / ".bench"
# Results are committed (a row per run, keyed by study, model, cell, seed and steps, with the
# commit measured): a session's machine is not kept, so a table built over several sessions
# lives in the repository. Each run's every attempt goes to .bench/runs (not committed).
RESULTS = ROOT / "bench" / "results" / "learning.jsonl"

# The studies: project, overrides. BBEH runs the real boolean_expressions task with the GEPA
# comparison's splits (20 train, 40 validation, 60 test); the ML pipeline runs Spaceship Titanic (MLAgentBench split); Atari runs Pong with the
# 100-step credit horizon of the reference study.
BBEH_OPTIONS = {"data_dir": str(SHARED / "data" / "bbeh" / "benchmark_tasks"), "train_size": 20,
                "val_size": 40, "test_size": 60, "answer_max_tokens": 48}
# The ML-pipeline studies use every labelled row (8,693; validation 1,391 rows): with 2,000 rows
# (the "@2k" rows of the results) validation had 320 rows, a standard error of about 0.023, more
# than the effects: gradient boosting beat the random forest on 5 folds of 5 and lost on validation.
STUDIES = {
    "bbeh/prompt_only": ("bbeh", {"task": "boolean_expressions", "init": "prompt_only",
                                  "batch_size": 3, "task_options": BBEH_OPTIONS}),
    # a task the 135M task model answers right by chance already (Yes / No / Ambiguous), so
    # that a prompt can move the score: on boolean_expressions it scores 0 whatever the prompt
    "bbeh/causal_understanding": ("bbeh", {"task": "causal_understanding", "init": "prompt_only",
                                           "batch_size": 3, "task_options": BBEH_OPTIONS}),
    "bbeh/prompt_and_extraction": ("bbeh", {"task": "boolean_expressions",
                                            "init": "prompt_and_extraction", "batch_size": 3,
                                            "task_options": BBEH_OPTIONS}),
    "ml_pipeline/one_function": ("ml_pipeline", {
        "task": "spaceship-titanic", "init": "one_function", "batch_size": 1,
        "task_options": {"data_dir": str(SHARED / "data" / "spaceship-titanic")}}),
    "ml_pipeline/many_function": ("ml_pipeline", {
        "task": "spaceship-titanic", "init": "many_function", "batch_size": 1,
        "task_options": {"data_dir": str(SHARED / "data" / "spaceship-titanic")}}),
    "atari/pong_h100": ("atari", {"task": "Pong", "init": "single", "credit_horizon": 100,
                                  "batch_size": 1,
                                  "task_options": {"eval_episodes": 1, "eval_max_steps": 600,
                                                   "train_episodes": 2}}),
}
DEFAULT_CELLS = ("tagged/k1/current/r2", "json/k1/current/r2", "tagged/k2/best/r2",
                 "json/k1/current/r0")


def bench_model_path() -> str:
    out = subprocess.run([str(SHARED / "bin" / "bench-llm")], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().splitlines()[-1]


def model_spec(name: str) -> str:
    if name == "embedded":
        return "smollm2"
    if name == "bench":
        return bench_model_path()
    return name  # any model spec


def parse_cell(cell: str) -> dict:
    """``FORMAT/kN/SELECTION/rM`` and optional flags: ``rr`` (``parameter_selection:
    round_robin``), ``nwX`` (``acceptance: no_worse`` with margin X) or ``imX`` (``improve`` with
    margin X); without an acceptance flag the study's own rule holds."""
    parts = cell.split("/")
    usage = (f"--cells: {cell!r}: use FORMAT/kN/SELECTION/rM[/rr][/nwX|/imX], e.g. "
             "tagged/k1/current/r2, tagged/k1/current/r2/rr or diff/k1/best/r2/nw0.005")
    if len(parts) < 4 or not (parts[1][:1] == "k" and parts[1][1:].isdigit()
                              and parts[3][:1] == "r" and parts[3][1:].isdigit()):
        raise SystemExit(usage)
    fmt, k, selection, repair = parts[:4]
    fields = {"edit_format": fmt, "candidates_per_step": int(k[1:]), "selection": selection,
              "repair_attempts": int(repair[1:]), "parameter_selection": "all"}
    for flag in parts[4:]:
        if flag == "rr":
            fields["parameter_selection"] = "round_robin"
        elif flag[:2] in ("nw", "im") and "acceptance" not in fields:
            try:
                fields["acceptance_margin"] = float(flag[2:])
            except ValueError:
                raise SystemExit(usage) from None
            fields["acceptance"] = "no_worse" if flag[:2] == "nw" else "improve"
        else:
            raise SystemExit(usage)
    return fields


def code_version() -> str:
    """The commit the benchmark runs (``+`` when the working tree differs): rows of one table can
    come from several sessions, and the code they measured is part of the result."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout
    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                  ":(exclude)bench/results").strip()
    return commit + ("+" if changed else "")


def done_keys(code: str) -> set[str]:
    """The keys already measured on commit ``code``."""
    if not RESULTS.exists():
        return set()
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return {row["key"] for row in rows if row.get("code") == code}


def append(row: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")


def run_genopt(study: str, model: str, cell: str, seed: int, steps: int) -> dict:
    from mlflow_genopt.build import resolve_config, run_loop

    project, overrides = STUDIES[study]
    spec = model_spec(model)
    fields = {**overrides, **parse_cell(cell), "steps": steps, "seed": seed,
              "optimizer_model": spec}
    if project == "bbeh":
        fields["task_model"] = "smollm2"  # the task model stays the embedded one (as in GEPA's run)
    config = resolve_config(project, overrides=fields)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        result = run_loop(config, tracking=None, resume=None, cache_dir=OUT / "cache",
                          export_dir=Path(tmp) / "export")
    wall = time.perf_counter() - started
    candidates = [c for s in result.steps for c in s.candidates]
    attempts = sum(len(c.attempts) for c in candidates)
    start_val = result.versions[0].val_score if result.versions else None
    totals = dict(result.totals)
    _write_details(study, model, cell, seed, result)
    return {
        "candidates": len(candidates),
        "first_try_valid": sum(c.first_try_valid for c in candidates),
        "valid": sum(c.valid for c in candidates),
        "accepted": sum(s.accepted for s in result.steps),
        "start_val": start_val,
        "best_val": result.best_val_score,
        "val_gain": (result.best_val_score - start_val) if start_val is not None else None,
        "test": result.test_score,
        "optimizer_calls": attempts,
        "llm_calls": totals.get("llm_calls"),
        "cached_calls": totals.get("cached_calls"),
        "task_calls": (totals["llm_calls"] - attempts) if "llm_calls" in totals else None,
        "invalid_reasons": [c.invalid_reason for c in candidates if not c.valid][:10],
        "wall_s": round(wall, 1),
    }


def _write_details(study: str, model: str, cell: str, seed: int, result) -> None:
    """Every attempt of every candidate (answer, reason, follow-up) and every version's scores,
    in ``.bench/runs/``: the table says how often proposals fail, this file says why."""
    steps = [{
        "step": s.step, "parent": s.current_id, "batch_score": s.batch_score,
        "accepted": s.accepted, "val_score": s.val_score,
        "candidates": [{"index": c.index, "valid": c.valid, "batch_score": c.batch_score,
                        "invalid_reason": c.invalid_reason, "repairs": list(c.repairs),
                        "attempts": [{"raw": a.raw, "invalid_reason": a.invalid_reason,
                                      "followup": [m["content"] for m in a.followup],
                                      "finish_reason": a.finish_reason,
                                      "temperature": a.temperature} for a in c.attempts]}
                       for c in s.candidates]} for s in result.steps]
    versions = [{"id": v.version.version_id, "status": v.status, "batch_score": v.batch_score,
                 "val_score": v.val_score} for v in result.versions]
    path = OUT / "runs" / f"{study.replace('/', '_')}-{model}-{cell.replace('/', '_')}-{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"steps": steps, "versions": versions,
                                "test": result.test_score}, indent=1))


# --- GEPA -------------------------------------------------------------------------------------

GEPA_VENV = OUT / "gepa-venv"


def gepa_python() -> Path:
    python = GEPA_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(GEPA_VENV)], check=True)
        site = next(Path(sys.prefix).glob("lib/python3*/site-packages"))
        gepa_site = next(GEPA_VENV.glob("lib/python3*/site-packages"))
        # addsitedir also runs that environment's .pth files (the editable install's finder)
        (gepa_site / "genopt-env.pth").write_text(f"import site; site.addsitedir({str(site)!r})\n")
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps",
                        "gepa==0.1.4"], check=True)
    return python


def run_gepa(study: str, model: str, seed: int, reflection_calls: int) -> dict:
    spec = model_spec(model)
    _, overrides = STUDIES[study]
    cmd = [str(gepa_python()), str(Path(__file__).with_name("gepa_bbeh.py")),
           "--reflection-model", spec, "--seed", str(seed), "--task", overrides["task"],
           "--reflection-calls", str(reflection_calls),
           "--options", json.dumps(overrides["task_options"]), "--cache-dir", str(OUT / "cache")]
    started = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"GEPA failed: {out.stderr.strip().splitlines()[-1:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["wall_s"] = round(time.perf_counter() - started, 1)
    return row


# --- table ------------------------------------------------------------------------------------


def _mean(values) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.mean(values):.3f}" if values else "-"


def replayed(row: dict) -> bool:
    """Whether ``row`` replayed cached answers (LLM cache, evaluation cache) instead of running:
    its validity and scores are results, its calls and wall time are not a cost. Rows recorded
    before ``cached_calls`` was: a run under 60 s (five optimizer calls take longer here)."""
    if row.get("cached_calls") is not None and row.get("llm_calls"):
        return row["cached_calls"] >= row["llm_calls"]
    return (row.get("wall_s") or 0) < 60


def table() -> str:
    if not RESULTS.exists():
        return "no results yet"
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["study"], row["model"], row["cell"], row.get("code", "?")),
                          []).append(row)
    head = (f"{'study':28} {'model':8} {'cell':26} {'seeds':>5} {'1st-valid':>9} "
            f"{'valid':>6} {'accepted':>8} {'gain>0':>6} {'val gain':>8} {'test':>6} "
            f"{'opt calls':>9} {'task calls':>10} {'wall s':>7}  code")
    lines = [head, "-" * len(head)]
    for (study, model, cell, code), group in sorted(groups.items()):
        cands = sum(r.get("candidates", 0) for r in group)
        # GEPA does not report its proposals' validity: "-", not 0 %
        rate = (lambda key: f"{sum(r[key] for r in group) / cands:.0%}"
                if cands and all(key in r for r in group) else "-")
        gains = [r.get("val_gain") for r in group]
        ran = [r for r in group if not replayed(r)]  # the cost columns: runs, not replays
        mark = "" if len(ran) == len(group) else f" ({len(ran)} ran)"
        lines.append(
            f"{study:28} {model:8} {cell:26} {len(group):>5} {rate('first_try_valid'):>9} "
            f"{rate('valid'):>6} {sum(r.get('accepted', 0) for r in group):>8} "
            f"{sum(1 for g in gains if g is not None and g > 0):>3}/{len(group):<2} "
            f"{_mean(gains):>8} {_mean(r.get('test') for r in group):>6} "
            f"{_mean(r.get('optimizer_calls') for r in group):>9} "
            f"{_mean(r.get('task_calls', r.get('llm_calls')) for r in ran):>10} "
            f"{_mean(r.get('wall_s') for r in ran):>7}  {code}{mark}")
    return "\n".join(lines + ["task calls and wall s average the runs that were not replays of "
                               "cached answers (n ran: the others replayed)"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", default="bbeh/prompt_only",
                        help=f"comma-separated, of {sorted(STUDIES)}, or 'none'")
    parser.add_argument("--models", default="embedded", help="embedded, bench, or model specs")
    parser.add_argument("--cells", default=",".join(DEFAULT_CELLS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds first-seed .. first-seed + seeds - 1 (a later session goes on)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps (genopt) and "
                        "reflection calls (GEPA)")
    parser.add_argument("--gepa", action="store_true", help="also run GEPA on BBEH")
    parser.add_argument("--table", action="store_true", help="print the table and exit")
    args = parser.parse_args()
    if args.table:
        print(table())
        return
    studies = [] if args.studies == "none" else args.studies.split(",")
    for cell in args.cells.split(","):
        parse_cell(cell)  # a bad cell stops here, before any run
    for study in studies:
        if study not in STUDIES:
            raise SystemExit(f"--studies: unknown {study!r}; use one of {sorted(STUDIES)}")
    version = code_version()  # read once: the modules were imported from this tree
    done = done_keys(version)
    for model in args.models.split(","):
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for study in studies:
                for cell in args.cells.split(","):
                    key = f"{study}|{model}|{cell}|{seed}|{args.steps}"
                    if key in done:
                        continue
                    print(f"[bench] {key}", file=sys.stderr, flush=True)
                    try:
                        row = run_genopt(study, model, cell, seed, args.steps)
                    except Exception as exc:  # one failed run is a result, not the end
                        row = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                    append({"key": key, "study": study, "model": model, "cell": cell,
                            "seed": seed, "code": version, **row})
            for study in studies if args.gepa else ():
                if STUDIES[study][0] != "bbeh" or STUDIES[study][1]["init"] != "prompt_only":
                    continue  # GEPA optimizes the prompt of a BBEH task
                key = f"gepa|{study}|{model}|{seed}|{args.steps}"
                if key not in done:
                    print(f"[bench] {key}", file=sys.stderr, flush=True)
                    try:
                        row = run_gepa(study, model, seed, args.steps)
                    except Exception as exc:
                        row = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                    append({"key": key, "study": study, "model": model,
                            "cell": "gepa-0.1.4", "seed": seed, "code": version, **row})
    print(table())


if __name__ == "__main__":
    main()
