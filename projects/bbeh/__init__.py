"""BIG-Bench Extra Hard prompt optimization (the experience-batching case study).

Starting artifacts: ``prompt_only`` (the prompt is trainable, answer extraction is BBEH's
default and frozen) and ``prompt_and_extraction`` (both trainable).
"""

from mlflow_genopt.project import Project, StartingArtifact, TaskOption

from .task import DEFAULT_EXTRACTOR, DEFAULT_PROMPT, SPEC, BBEHTask, make_task

_VALUES = {"prompt": DEFAULT_PROMPT, "extract_answer": DEFAULT_EXTRACTOR}

OPTIONS = (
    TaskOption("data_dir", "str", help="a BBEH benchmark_tasks directory (else downloaded)"),
    TaskOption("train_size", "int", 15, "training examples", minimum=1),
    TaskOption("val_size", "int", 10, "validation examples", minimum=0),
    TaskOption("test_size", "int", None, "test examples (default: the rest)", minimum=0),
    TaskOption("split_seed", "int", 0, "seed of the train/val/test split", minimum=0),
    TaskOption("answer_max_tokens", "int", 64, "answer budget of the task model", minimum=1),
    TaskOption("extract_timeout_s", "float", 10.0, "time limit of extract_answer per batch",
               minimum=0, exclusive_minimum=True),
)

PROJECT = Project(
    name="bbeh",
    description="BIG-Bench Extra Hard: optimize a prompt template and answer extraction",
    starting_artifacts={
        "prompt_only": StartingArtifact(
            "prompt_only", "Only the prompt is trainable; BBEH's answer extraction is frozen.",
            SPEC.with_trainable(("prompt",)), _VALUES,
        ),
        "prompt_and_extraction": StartingArtifact(
            "prompt_and_extraction", "The prompt and the extract_answer function are trainable.",
            SPEC.with_trainable(("prompt", "extract_answer")), _VALUES,
        ),
    },
    make_task=make_task,
    defaults={"task": "generated_boolean", "init": "prompt_only", "steps": 5,
              "batch_size": 3},
    options=OPTIONS,
    needs_task_llm=True,
    # Its units are task-LLM calls to a model loaded in this process (or an endpoint it calls
    # from here): nothing a Dask worker could run, so --executor must stay local.
    uses_executor=False,
    # The study's two choices for prompt optimization: the starting artifact and the experience
    # batch (1, 3, 5 trials per update). BBEH trials have no multi-step trace, so the credit
    # horizon does not apply (the config refuses it).
    search_space={"init": ["prompt_only", "prompt_and_extraction"], "batch_size": [1, 3, 5]},
)

__all__ = ["PROJECT", "BBEHTask", "SPEC"]
