"""Tasks, strategies and recipes from installed packages: a module listed under an entry point group is imported
when a name is looked up, and what it registers is used like a built-in (a real importlib EntryPoint, loaded by
importlib; only the list of installed entry points is replaced)."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint

import pytest

import selfcorrect.plugins
from selfcorrect import evaluate
from selfcorrect.tasks import TASKS
from selfcorrect.train.data import RECIPES, build_rows

from conftest import ScriptedBackend, cli


@pytest.fixture
def installed(monkeypatch):
    """plugin_example listed as a package would list it; what it registers is removed afterwards."""
    points = {"selfcorrect.tasks": [EntryPoint("plugin-doubles", "plugin_example", "selfcorrect.tasks")],
              "selfcorrect.recipes": [EntryPoint("plugin-sft-twice", "plugin_example", "selfcorrect.recipes")]}
    monkeypatch.setattr(selfcorrect.plugins, "entry_points", lambda group: points.get(group, []))
    yield
    TASKS.pop("plugin-doubles", None)
    RECIPES.pop("plugin-sft-twice", None)


def test_a_plugin_task_and_recipe_work_like_built_in_ones(installed, tmp_path):
    listed = json.loads(cli("tasks", "--json").stdout)
    assert {"task": "plugin-doubles", "items": 5, "grader": "number"}.items() <= next(
        row for row in listed if row["task"] == "plugin-doubles").items()
    run = evaluate(task="plugin-doubles", backend=ScriptedBackend(), db=tmp_path / "runs.sqlite")
    assert run.report()["n_items"] == 5
    rows, summary = build_rows([run], "plugin-sft-twice")
    assert len(rows) == 10 and summary["rows"] == 10 and {row["source"]["recipe"] for row in rows} == {"plugin-sft-twice"}
    # `data --help` lists the recipes known when the command line is imported (a package's are by then).
    from selfcorrect.cli import _recipes_help

    assert "plugin-sft-twice: the sft rows, each twice" in _recipes_help()


def test_without_the_plugin_its_names_are_unknown(tmp_path):
    refused = cli("run", "--task", "plugin-doubles", "--db", str(tmp_path / "runs.sqlite"))
    assert refused.returncode == 2 and "--task plugin-doubles: unknown task" in refused.stderr
