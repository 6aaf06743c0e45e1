"""MLflow plugin surface of mlflow-genopt: what installing the package teaches MLflow itself.

One small module per entry point (declared in ``pyproject.toml``):

``run_context``   ``mlflow.run_context_provider``: ``genopt.*`` tags on runs started while a
                  learning loop is active (:mod:`.active` holds that state, without MLflow).
``lineage``       ``mlflow.app`` ``genopt``: ``mlflow server --app-name genopt`` serves the MLflow
                  UI plus the lineage pages under ``/genopt/`` (data: :mod:`.lineage_data`).
``prompts``       registers the selected version's prompt parameters in the MLflow Prompt
                  Registry at the end of a tracked loop.
``optimizer``     :class:`~mlflow_genopt.plugin.optimizer.GenoptPromptOptimizer`, a backend for
                  ``mlflow.genai.optimize_prompts`` that runs a genopt learning loop.

Importing this package imports nothing from MLflow; each module imports what it needs.
"""
