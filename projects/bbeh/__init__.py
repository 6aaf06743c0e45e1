"""BIG-Bench Extra Hard prompt optimization (the experience-batching case study).

Starting artifacts: ``prompt_only`` (the prompt is trainable, answer extraction is BBEH's
default and frozen) and ``prompt_and_extraction`` (both trainable).
"""

from mlflow_genopt.project import SimpleProject, StartingArtifact

from .task import DEFAULT_EXTRACTOR, DEFAULT_PROMPT, SPEC, BBEHTask, make_task

_VALUES = {"prompt": DEFAULT_PROMPT, "extract_answer": DEFAULT_EXTRACTOR}

PROJECT = SimpleProject(
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
    task_factory=make_task,
    defaults={"task": "generated_boolean", "init": "prompt_only", "steps": 5,
              "batch_size": 3},
    # The study's two choices for prompt optimization: the starting artifact and the experience
    # batch (1, 3, 5 trials per update). BBEH trials have no multi-step trace, so the credit
    # horizon changes nothing here and is left out (add it with --param credit_horizon=...).
    search_space={"init": ["prompt_only", "prompt_and_extraction"], "batch_size": [1, 3, 5]},
)

__all__ = ["PROJECT", "BBEHTask", "SPEC"]
