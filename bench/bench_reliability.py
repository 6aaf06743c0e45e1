"""Reliability and security figures from one command.

1. Hostile loops: each case study and starting artifact with trainable code (bbeh
   prompt_and_extraction, ml_pipeline one_function and many_function on breast-cancer, atari
   single, modular and Pong.modular on Pong) runs against a fake OpenAI-compatible endpoint on
   loopback that
   answers with adversarial proposals (malformed JSON and code, code fences, truncation, lone
   surrogates, non-UTF-8 bodies, enormous answers; valid code that loops forever, bombs memory
   and processes, floods output, kills, spawns daemons, reads canary secrets, writes outside its
   scratch dir, opens sockets) while also injecting timeouts, 429s, 500s and dropped connections.
   Everything each loop logged and every file written since it started is scanned for the
   canaries (see ``tests/test_hostile.py`` for the exact attacks and scans). Each attack is put
   into one trainable code parameter, in turn (``--every-position``: into each), the others
   valid, and writes a marker first thing: the table counts the payloads that ran, in the
   sandbox (another uid than the loop's), by case study.
2. A dead endpoint: the loop must end within seconds with one LLMError line and a FAILED run.
3. Traces under SIGKILL (``tests/test_resume.py``): a BBEH loop through the CLI is killed at
   random moments ``--kills`` times (default 10) and resumed to the end; every committed
   phase must have exactly one trace holding its LLM calls, and every trace its run.
4. Temporary files: everything above runs with ``TMPDIR`` pointing at a fresh directory; what is
   left in it after the in-process loops (finished or failed) is counted (goal 0). Killed
   processes cannot clean up: what they left is reported separately.
5. Bad input through the CLI (``tests/test_bad_input.py``'s table): one line, exit 2, nothing
   written. Skipped with ``--quick``.

Goals: 0 loop crashes, 0 malformed proposals adopted, 0 secrets readable, 0 writes outside the
scratch dir, 0 network escapes, 0 processes left behind, 0 tracking errors, every fault and
unusable HTTP body retried and logged (``llm_retries``), every payload run in the sandbox, 0
lost, duplicated or orphaned traces, 0 temporary files left. Exit code 0 when every goal holds.

Usage: python bench/bench_reliability.py [--quick] [--fault-rate 0.15] [--kills 10]
       [--every-position] [--projects bbeh,ml_pipeline,atari]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

import test_bad_input  # noqa: E402
import test_hostile  # noqa: E402
import test_resume  # noqa: E402
from fake_openai import FakeOpenAI, arithmetic_task_model  # noqa: E402

COLUMNS = [
    ("proposals tried", "proposals_tried"),
    ("loop crashes", "loop_crashes"),
    ("malformed adopted", "malformed_adopted"),
    ("secrets readable", "secrets_readable"),
    ("writes outside scratch", "writes_outside_scratch"),
    ("network escapes", "network_escapes"),
    ("processes left", "processes_left"),
    ("tracking errors", "tracking_errors"),
    ("faults injected", "faults_injected"),
    ("bad HTTP bodies", "http_malformed"),
    ("retries logged", "llm_retries"),
    ("loops completed", "loops_completed"),
    ("payloads placed", "placed"),
    ("ran in sandbox", "ran_in_sandbox"),
]


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def dead_endpoint(workdir: Path) -> tuple[bool, float, str]:
    """(ended cleanly, seconds, the error line) for a loop whose endpoint is down for good."""
    from mlflow import MlflowClient

    from mlflow_genopt.config import LoopConfig
    from mlflow_genopt.llm.base import LLMError
    from mlflow_genopt.build import run_loop

    config = LoopConfig(project="bbeh", task="generated_arithmetic", steps=3, batch_size=1,
                        optimizer_model="openai:fake", task_model="openai:fake",
                        task_options={"train_size": 2, "val_size": 1, "test_size": 1})
    uri = f"sqlite:///{workdir}/mlflow.db"
    saved = {k: os.environ.get(k) for k in ("GENOPT_LLM_MAX_RETRIES", "GENOPT_LLM_BACKOFF_S")}
    os.environ.update(GENOPT_LLM_MAX_RETRIES="3", GENOPT_LLM_BACKOFF_S="0.05")
    started = time.monotonic()
    try:
        with FakeOpenAI(task=arithmetic_task_model, down=True) as server:
            run_loop(config, tracking=uri, experiment="dead", cache_dir=None, base_url=server.base_url)
        return False, time.monotonic() - started, "the loop did not fail"
    except LLMError as exc:
        elapsed = time.monotonic() - started
        client = MlflowClient(uri)
        [run] = client.search_runs([client.get_experiment_by_name("dead").experiment_id])
        clean = "\n" not in str(exc) and run.info.status == "FAILED" and \
            run.data.tags.get("genopt.error") == f"LLMError: {exc}"
        return clean, elapsed, str(exc)
    except BaseException as exc:  # noqa: BLE001 - a figure
        return False, time.monotonic() - started, f"{type(exc).__name__}: {exc}"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def bad_inputs() -> tuple[int, int, list[str]]:
    """(cases, cases with one line + exit != 0 + nothing written, failures) of the CLI table,
    each case checked by ``tests/test_bad_input.py``'s own ``check_case``."""
    store = Path(tempfile.mkdtemp(prefix="genopt-bad-store-"))
    try:
        mlflow_db = test_bad_input.empty_mlflow_db(store)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    with FakeOpenAI(api_key="sk-right") as server:
        def one(case):
            if case[0] == "bbeh-no-data-and-no-network" and test_bad_input.online():
                return None
            workdir = Path(tempfile.mkdtemp(prefix="genopt-bad-"))
            try:
                broken = test_bad_input.check_case(case, workdir, server.base_url, mlflow_db)
                return f"{case[0]}: " + "; ".join(broken)[-600:] if broken else None
            finally:
                shutil.rmtree(workdir, ignore_errors=True)

        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(one, test_bad_input.CASES))
    failures = [r for r in results if r]
    return len(results), len(results) - len(failures), failures


def traces_under_sigkill(workdir: Path, kills: int, seed: int) -> dict:
    """``tests/test_resume.py``'s kill-and-resume loop with ``kills`` SIGKILLs: its trace audit."""
    workdir.mkdir(parents=True, exist_ok=True)
    return test_resume.kill_and_resume(workdir, "killed.db", kills, random.Random(seed),
                                       "--steps", str(kills + 3))


def _fresh_tmpdir(path: Path) -> Path:
    path.mkdir(parents=True)
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = None  # re-read TMPDIR
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the CLI bad-input table")
    parser.add_argument("--fault-rate", type=float, default=0.15,
                        help="share of endpoint requests that get a fault (default 0.15)")
    parser.add_argument("--projects", default="bbeh,ml_pipeline,atari")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs of the traced loop")
    parser.add_argument("--every-position", action="store_true",
                        help="each attack into every trainable code parameter, not in turn")
    parser.add_argument("--seed", type=int, default=7, help="seed of the kill moments")
    args = parser.parse_args()

    from mlflow_genopt.sandbox import isolation_report

    print(f"sandbox isolation here: {isolation_report()}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="genopt-bench-reliability-"))
    saved_tmpdir = os.environ.get("TMPDIR")
    reports = []
    try:
        loops_tmp = _fresh_tmpdir(root / "tmp-loops")
        for project in [p.strip() for p in args.projects.split(",") if p.strip()]:
            for init in test_hostile.HOSTILE_INITS[project]:
                print(f"hostile loop: {project}/{init} ...", flush=True)
                reports.append(test_hostile.run_hostile_loop(
                    project, root / project / init, init=init, fault_rate=args.fault_rate,
                    every_position=args.every_position))
        dead = dead_endpoint(root / "dead")
        left_by_loops = sorted(p.name for p in loops_tmp.iterdir())
        print(f"traced loop: {args.kills} SIGKILLs and a resume ...", flush=True)
        killed_tmp = _fresh_tmpdir(root / "tmp-killed")
        audit = traces_under_sigkill(root / "killed", args.kills, args.seed)
        left_by_killed = sorted(p.name for p in killed_tmp.iterdir())
    finally:
        if saved_tmpdir is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_tmpdir
        tempfile.tempdir = None
        shutil.rmtree(root, ignore_errors=True)
    bad = None if args.quick else bad_inputs()

    for r in reports:
        r.placed = sum(r.payloads_placed.values())
        r.ran_in_sandbox = sum(r.payloads_ran_in_sandbox.values())
    rows = [[r.project] + [int(getattr(r, key)) for _, key in COLUMNS] for r in reports]
    rows.append(["total"] + [sum(row[i + 1] for row in rows) for i in range(len(COLUMNS))])
    print()
    print(table(rows, ["loop"] + [label for label, _ in COLUMNS]))
    print()
    for r in reports:
        print(f"{r.project}: {r.wall_time_s:.0f}s; malformed rejected {r.malformed_rejected}/{r.malformed_sent}; "
              f"hostile programs run {r.attacks_evaluated}/{r.valid_sent}; positive controls: probe reports "
              f"logged {'yes' if r.probe_reports_logged else 'NO'}, 0644 file read "
              f"{'yes' if r.public_file_read else 'no'} (not protected, documented), files written to /tmp "
              f"{r.tmp_files_written} (allowed, documented)" + (f"; crash: {r.crash}" if r.crash else "")
              + (f"; leaks: {r.leaks}" if r.leaks else "") + (f"; written: {r.written}" if r.written else ""))
    for r in reports:
        print(f"{r.project}: payloads run in the sandbox by parameter: "
              + ", ".join(f"{k} {r.payloads_ran_in_sandbox.get(k, 0)}/{v}"
                          for k, v in r.payloads_placed.items()))
    retries_ok = all(r.llm_retries == r.faults_injected + r.http_malformed for r in reports)
    payloads_ok = all(r.payloads_ran_in_sandbox == r.payloads_placed for r in reports)
    traces_ok = (audit["kills"] >= args.kills and audit["status"] == "FINISHED"
                 and audit["lost"] == audit["duplicated"] == audit["orphans"] == 0
                 and audit["wrong_calls"] == 0 and not audit["unexpected"])
    print(f"traces after {audit['kills']} SIGKILLs and a resume: {audit['phases']} phases with "
          f"LLM calls, {audit['traces']} traces; lost {audit['lost']}, duplicated "
          f"{audit['duplicated']}, orphaned {audit['orphans']}, wrong call counts "
          f"{audit['wrong_calls']}, unexpected {audit['unexpected']}; run {audit['status']}")
    print(f"temporary files left by the in-process loops (finished and failed): "
          f"{len(left_by_loops)} {left_by_loops[:5]}")
    print(f"temporary files left by the {audit['kills']} SIGKILLed processes (cannot clean up; "
          f"not a goal): {len(left_by_killed)}")
    print(f"retries logged == faults injected + bad HTTP bodies: {'yes' if retries_ok else 'NO'}")
    print(f"dead endpoint: {'ended cleanly' if dead[0] else 'NOT clean'} in {dead[1]:.1f}s "
          f"(LLMError, run FAILED): {dead[2]}")
    if bad is not None:
        print(f"bad CLI input: {bad[1]}/{bad[0]} cases give one line, exit non-zero, leave nothing")
        for failure in bad[2]:
            print(f"  FAILED {failure}")
    goals = all(all(v == 0 for v in r.goals.values()) and r.loops_completed for r in reports)
    goals = goals and retries_ok and payloads_ok and traces_ok and not left_by_loops
    goals = goals and dead[0] and (bad is None or not bad[2])
    print(f"all goals met: {'yes' if goals else 'NO'}")
    return 0 if goals else 1


if __name__ == "__main__":
    sys.exit(main())
