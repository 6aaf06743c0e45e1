"""Case studies of mlflow-genopt, installed as the ``genopt_projects`` package.

Each subpackage registers one project under the ``mlflow_genopt.projects`` entry point group.
"""
