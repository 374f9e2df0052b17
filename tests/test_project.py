"""Project plumbing: pyproject and environment.yml agree, .ci/run runs the README's test command."""
from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    py_reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        py_reqs += extra
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    env_reqs = [r for r in pip_section if not r.startswith("-e")]
    assert {_name(r): r.replace(" ", "") for r in py_reqs} == {_name(r): r.replace(" ", "") for r in env_reqs}
    assert "-e ." in pip_section
    assert any(str(d).startswith("python") for d in env["dependencies"] if isinstance(d, str))


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 dev.py test" in readme and "python3 dev.py demo" in readme
    assert "python3 dev.py test" in ci


def test_generated_data_is_ignored():
    ignore = (ROOT / ".gitignore").read_text().splitlines()
    assert "/data/*" in ignore and "!/data/README.md" in ignore and ".venv/" in ignore
