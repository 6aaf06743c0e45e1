"""Reliability and security figures from one command.

1. Hostile loops: each case study (bbeh with trainable answer extraction, ml_pipeline on
   breast-cancer, atari Pong) runs against a fake OpenAI-compatible endpoint on loopback that
   answers with adversarial proposals (malformed JSON and code, code fences, truncation, lone
   surrogates, non-UTF-8 bodies, enormous answers; valid code that loops forever, bombs memory
   and processes, floods output, kills, spawns daemons, reads canary secrets, writes outside its
   scratch dir, opens sockets) while also injecting timeouts, 429s, 500s and dropped connections.
   Everything each loop logged and every file written since it started is scanned for the
   canaries (see ``tests/test_hostile.py`` for the exact attacks and scans).
2. A dead endpoint: the loop must end within seconds with one LLMError line and a FAILED run.
3. Bad input through the CLI (``tests/test_bad_input.py``'s table): one line, exit 2, nothing
   written. Skipped with ``--quick``.

Goals: 0 loop crashes, 0 malformed proposals adopted, 0 secrets readable, 0 writes outside the
scratch dir, 0 network escapes, 0 processes left behind, 0 tracking errors, every fault and
unusable HTTP body retried and logged (``llm_retries``). Exit code 0 when every goal holds.

Usage: python bench/bench_reliability.py [--quick] [--fault-rate 0.15] [--projects bbeh,ml_pipeline,atari]
"""

from __future__ import annotations

import argparse
import os
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the CLI bad-input table")
    parser.add_argument("--fault-rate", type=float, default=0.15,
                        help="share of endpoint requests that get a fault (default 0.15)")
    parser.add_argument("--projects", default="bbeh,ml_pipeline,atari")
    args = parser.parse_args()

    from mlflow_genopt.sandbox import isolation_report

    print(f"sandbox isolation here: {isolation_report()}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="genopt-bench-reliability-"))
    reports = []
    try:
        for project in [p.strip() for p in args.projects.split(",") if p.strip()]:
            print(f"hostile loop: {project} ...", flush=True)
            reports.append(test_hostile.run_hostile_loop(project, root / project, fault_rate=args.fault_rate))
        dead = dead_endpoint(root / "dead")
    finally:
        import mlflow

        mlflow.flush_trace_async_logging()  # MLflow writes traces in the background
        shutil.rmtree(root, ignore_errors=True)
    bad = None if args.quick else bad_inputs()

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
    retries_ok = all(r.llm_retries == r.faults_injected + r.http_malformed for r in reports)
    print(f"retries logged == faults injected + bad HTTP bodies: {'yes' if retries_ok else 'NO'}")
    print(f"dead endpoint: {'ended cleanly' if dead[0] else 'NOT clean'} in {dead[1]:.1f}s "
          f"(LLMError, run FAILED): {dead[2]}")
    if bad is not None:
        print(f"bad CLI input: {bad[1]}/{bad[0]} cases give one line, exit non-zero, leave nothing")
        for failure in bad[2]:
            print(f"  FAILED {failure}")
    goals = all(all(v == 0 for v in r.goals.values()) and r.loops_completed for r in reports)
    goals = goals and retries_ok and dead[0] and (bad is None or not bad[2])
    print(f"all goals met: {'yes' if goals else 'NO'}")
    return 0 if goals else 1


if __name__ == "__main__":
    sys.exit(main())
