"""BBEH examples: the real benchmark tasks (local directory or download) and our own generated,
BBEH-format tasks that make the quickstart work offline.

A BBEH task file is ``{"canary": ..., "examples": [{"input": str, "target": str}, ...]}``.
"""

from __future__ import annotations

import json
import operator
import os
import random
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from mlflow_genopt.config import ConfigError

BBEH_TASKS = (
    "boardgame_qa", "boolean_expressions", "buggy_tables", "causal_understanding",
    "disambiguation_qa", "dyck_languages", "geometric_shapes", "hyperbaton", "linguini",
    "movie_recommendation", "multistep_arithmetic", "nycc", "object_counting",
    "object_properties", "sarc_triples", "shuffled_objects", "spatial_reasoning", "sportqa",
    "temporal_sequence", "time_arithmetic", "web_of_lies", "word_sorting", "zebra_puzzles",
)
DOWNLOAD_URL = (
    "https://raw.githubusercontent.com/google-deepmind/bbeh/main/bbeh/benchmark_tasks/"
    "bbeh_{task}/task.json"
)
CACHE_DIR = Path(os.environ.get("GENOPT_CACHE_DIR", Path.home() / ".cache" / "mlflow-genopt"))


# --- generated tasks (seeded code of ours; exact answers) ------------------------------------
def _arithmetic(rng: random.Random) -> dict[str, str]:
    ops = [("+", operator.add), ("-", operator.sub), ("*", operator.mul)]
    a, b, c = rng.randint(2, 20), rng.randint(2, 12), rng.randint(2, 9)
    (s1, f1), (s2, f2) = rng.choice(ops), rng.choice(ops)
    if s2 == "*" and s1 != "*":  # respect precedence: a s1 (b * c)
        value = f1(a, b * c)
    else:
        value = f2(f1(a, b), c)
    return {"input": f"What is {a} {s1} {b} {s2} {c}? Answer with the integer only.",
            "target": str(value)}


def _boolean(rng: random.Random) -> dict[str, str]:
    def expr(depth: int) -> str:
        if depth == 0:
            return rng.choice(["True", "False"])
        kind = rng.choice(["not", "and", "or"])
        if kind == "not":
            return f"not {expr(depth - 1)}"
        return f"({expr(depth - 1)} {kind} {expr(depth - 1)})"

    text = expr(rng.choice([1, 1, 2, 2, 3]))
    value = eval(text, {"__builtins__": {}}, {})  # our own generated expression, never LLM text
    return {"input": f"Evaluate the boolean expression: {text}. Answer True or False.",
            "target": str(value)}


GENERATORS: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "generated_arithmetic": _arithmetic,
    "generated_boolean": _boolean,
}


def generate_task(name: str, n: int = 60, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct examples of a generated task, the same for the same (name, n, seed)."""
    rng = random.Random(f"{name}:{seed}")
    examples, seen = [], set()
    for _ in range(n * 50):
        example = GENERATORS[name](rng)
        if example["input"] not in seen:
            seen.add(example["input"])
            examples.append(example)
        if len(examples) == n:
            break
    return examples


# --- real BBEH tasks ------------------------------------------------------------------------
def _candidates(data_dir: Path, task: str) -> list[Path]:
    return [
        data_dir / f"bbeh_{task}" / "task.json",
        data_dir / task / "task.json",
        data_dir / "benchmark_tasks" / f"bbeh_{task}" / "task.json",
        data_dir / "bbeh" / "benchmark_tasks" / f"bbeh_{task}" / "task.json",
        data_dir,
    ]


def read_task_file(path: Path) -> list[dict[str, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable BBEH task.json ({exc.__class__.__name__})") from None
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list) or not examples or not all(
        isinstance(e, dict) and "input" in e and "target" in e for e in examples
    ):
        raise ConfigError(f"{path}: expected {{\"examples\": [{{\"input\", \"target\"}}, ...]}}")
    return [{"input": str(e["input"]), "target": str(e["target"])} for e in examples]


def download_task(task: str, dest: Path, timeout_s: float = 30.0) -> Path:
    """Fetch ``bbeh_<task>/task.json`` from the BBEH repository into ``dest``."""
    url = DOWNLOAD_URL.format(task=task)
    target = dest / f"bbeh_{task}" / "task.json"
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - fixed https URL
        payload = response.read()
    target.parent.mkdir(parents=True, exist_ok=True)  # only once there is something to keep
    tmp = target.with_suffix(".part")
    tmp.write_bytes(payload)
    tmp.replace(target)  # never leave a half-written task file behind
    return target


def load_examples(task: str, data_dir: str | None = None, *, n_generated: int = 60,
                  generated_seed: int = 0) -> list[dict[str, str]]:
    """Examples of ``task``: generated, from ``data_dir``, from the cache, or downloaded."""
    if task in GENERATORS:
        return generate_task(task, n_generated, generated_seed)
    if task not in BBEH_TASKS:
        raise ConfigError(
            f"task: unknown BBEH task {task!r}; choose one of {', '.join(GENERATORS)}, "
            f"{', '.join(BBEH_TASKS)}"
        )
    if data_dir:
        for path in _candidates(Path(data_dir), task):
            if path.is_file():
                return read_task_file(path)
        raise ConfigError(
            f"data_dir: no task.json for {task} under {data_dir} "
            f"(expected {data_dir}/bbeh_{task}/task.json, BBEH's benchmark_tasks layout)"
        )
    cache = CACHE_DIR / "bbeh"
    cached = cache / f"bbeh_{task}" / "task.json"
    if cached.is_file():
        return read_task_file(cached)
    try:
        return read_task_file(download_task(task, cache))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"task {task}: not found locally and download failed ({reason}); pass "
            "--data-dir DIR with BBEH's benchmark_tasks (github.com/google-deepmind/bbeh)"
        ) from None
