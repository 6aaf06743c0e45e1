"""Package discovery only (metadata lives in pyproject.toml): the case studies in ``projects/``
install as the ``genopt_projects`` package next to the ``mlflow_genopt`` library."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["mlflow_genopt", "mlflow_genopt.*"])
    + ["genopt_projects"]
    + [f"genopt_projects.{name}" for name in find_packages("projects")],
    package_dir={"genopt_projects": "projects"},
    package_data={"genopt_projects": ["*/*.yaml", "*/*.json", "*/MLproject"]},
)
