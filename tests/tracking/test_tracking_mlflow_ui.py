"""What the Tracker writes for the MLflow UI: the experiment kind, source tags.
These run against the test session's SQLite store; tests/tracking/test_tracking_browser.py renders them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from mlflow.tracking import MlflowClient

from interiorfusion_core import tracking
from interiorfusion_core.tracking import NullTracker, Tracker, source_tags, tracking_uri, ui_url

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def experiment() -> str:
    return f"ui-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def client() -> MlflowClient:
    return MlflowClient(tracking_uri())


@pytest.fixture
def fresh_source_tags() -> Iterator[None]:
    source_tags.cache_clear()
    yield
    source_tags.cache_clear()


def test_created_and_reused_experiments_are_training_experiments(experiment: str, client: MlflowClient) -> None:
    run = Tracker("pipeline:a", experiment=experiment)
    exp = client.get_experiment(run.experiment_id)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"

    # An experiment someone else created (and the UI marked as GenAI) is re-marked when a Tracker reuses it.
    other = client.create_experiment(f"{experiment}-b", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    Tracker("pipeline:b", experiment=f"{experiment}-b").end()
    assert client.get_experiment(other).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    run.end()


def test_ui_links_open_the_model_training_view() -> None:
    assert ui_url("7", uri="sqlite:///x.db") is None
    assert (
        ui_url("7", uri="http://mlflow:5000/")
        == "http://mlflow:5000/#/experiments/7/runs?workflowType=machine_learning"
    )
    assert ui_url("7", "abc", uri="https://h") == "https://h/#/experiments/7/runs/abc?workflowType=machine_learning"


def test_source_tags_prefer_the_environment(monkeypatch: pytest.MonkeyPatch, fresh_source_tags: None) -> None:
    monkeypatch.setenv("INTERIORFUSION_GIT_SHA", SHA)
    tags = source_tags()
    assert tags["mlflow.source.git.commit"] == SHA
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    # A branch or remote of a checkout at another commit would describe the wrong code.
    if tracking._git("rev-parse", "HEAD") != SHA:
        assert "mlflow.source.git.branch" not in tags and "mlflow.source.git.repoURL" not in tags


def test_source_tags_from_git_and_none_without(monkeypatch: pytest.MonkeyPatch, fresh_source_tags: None) -> None:
    monkeypatch.delenv("INTERIORFUSION_GIT_SHA", raising=False)
    answers = {
        ("rev-parse", "HEAD"): SHA,
        ("rev-parse", "--abbrev-ref", "HEAD"): "main",
        ("remote",): "upstream\norigin",
        ("remote", "get-url", "origin"): "https://user:token@github.com/acme/InteriorFusion.git",
    }
    monkeypatch.setattr(tracking, "_git", lambda *args: answers.get(args, ""))
    assert source_tags() == {
        "mlflow.source.git.commit": SHA,
        "mlflow.source.git.branch": "main",
        "mlflow.source.git.repoURL": "https://github.com/acme/InteriorFusion.git",
        "mlflow.source.name": "https://github.com/acme/InteriorFusion.git",
        "mlflow.source.type": "LOCAL",
    }
    source_tags.cache_clear()
    monkeypatch.setattr(tracking, "_git", lambda *args: "")
    assert source_tags() == {}


def test_every_run_carries_the_source_tags(
    experiment: str, client: MlflowClient, monkeypatch: pytest.MonkeyPatch, fresh_source_tags: None
) -> None:
    monkeypatch.setenv("INTERIORFUSION_GIT_SHA", SHA)
    parent = Tracker("pipeline:a", experiment=experiment)
    child = Tracker("data", experiment=experiment, parent_run_id=parent.run_id, tags={"mlflow.source.name": "x"})
    for t in (child, parent):
        t.end()
    assert client.get_run(parent.run_id).data.tags["mlflow.source.git.commit"] == SHA
    tags = client.get_run(child.run_id).data.tags
    assert tags["mlflow.source.git.commit"] == SHA and tags["mlflow.source.name"] == "x"  # the caller's tags win


def test_null_tracker_accepts_the_new_calls() -> None:
    t = NullTracker()
    assert t.experiment_id is None and t.experiment_url is None and t.run_url is None
    own = {name for name, value in vars(Tracker).items() if callable(value) and not name.startswith("_")}
    assert own <= set(vars(NullTracker)), "every Tracker method needs a no-op in NullTracker"
