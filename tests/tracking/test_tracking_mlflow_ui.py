"""What the Tracker writes for the MLflow UI: the experiment kind, source tags, dataset inputs, cached children.
These run against the test session's SQLite store; tests/tracking/test_tracking_browser.py renders them."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from mlflow.tracking import MlflowClient

from interiorfusion_core import tracking
from interiorfusion_core.tracking import NullTracker, Tracker, dataset_input, source_tags, tracking_uri, ui_url

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


def test_dataset_input_is_logged_like_mlflow_datasets(experiment: str, client: MlflowClient) -> None:
    digest = "ab" * 32
    run = Tracker("vae", experiment=experiment)
    run.log_dataset_input(
        "data",
        "s3://bucket/pipelines/p/data/0123",
        digest,
        profile={"scenes": 12},
        schema={"mlflow_colspec": [{"type": "string", "name": "scene"}]},
    )
    run.end()
    [inp] = client.get_run(run.run_id).inputs.dataset_inputs
    ds = inp.dataset
    assert (ds.name, ds.digest, ds.source_type) == ("data", digest[:8], "s3")
    assert json.loads(ds.source) == {"uri": "s3://bucket/pipelines/p/data/0123"}
    assert json.loads(ds.profile) == {"scenes": 12} and "mlflow_colspec" in json.loads(ds.schema)
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "training", "interiorfusion.digest": digest}


@pytest.mark.parametrize(
    ("uri", "source_type", "source"),
    [
        ("/data/shards", "local", {"uri": "/data/shards"}),
        ("file:///data/shards", "local", {"uri": "file:///data/shards"}),
        ("gs://b/shards", "gs", {"uri": "gs://b/shards"}),
        ("https://h/shards", "http", {"url": "https://h/shards"}),
    ],
)
def test_dataset_sources_match_mlflow_source_types(uri: str, source_type: str, source: dict) -> None:
    ds = dataset_input("data", uri, "f" * 64, context="evaluation").dataset
    assert ds.source_type == source_type and json.loads(ds.source) == source and ds.profile is None


def test_cached_stage_is_a_finished_child_copying_the_original(experiment: str, client: MlflowClient) -> None:
    first = Tracker("pipeline:p", experiment=experiment)
    original = Tracker(
        "data",
        experiment=experiment,
        parent_run_id=first.run_id,
        tags={"interiorfusion.stage": "data", "interiorfusion.cache_key": "k1"},
    )
    original.log_params({"data.scenes": 4})
    original.log_metrics({"train/loss": 2.0}, step=1)
    original.log_metrics({"train/loss": 0.5}, step=9)
    original.log_metrics({"final/scenes": 4}, step=0)
    original.log_dataset_input("raw", "/raw", "c" * 64)
    original.end()
    first.end()

    rerun = Tracker("pipeline:p", experiment=experiment)
    child_id = rerun.log_cached_child("data", original.run_id, metrics={"final/scenes": 99, "final/extra": 1.0})
    rerun.end()
    child = client.get_run(child_id)
    tags = child.data.tags
    assert child.info.status == "FINISHED" and child.info.run_name == "data"
    assert child.info.experiment_id == rerun.experiment_id
    assert tags["mlflow.parentRunId"] == rerun.run_id
    assert tags["interiorfusion.cached"] == "true" and tags["interiorfusion.cached_run_id"] == original.run_id
    assert tags["interiorfusion.stage"] == "data" and tags["interiorfusion.cache_key"] == "k1"
    assert f"#/experiments/{first.experiment_id}/runs/{original.run_id}" in tags["mlflow.note.content"]
    assert "interiorfusion.cached_run_url" not in tags  # no server: no absolute URL to give
    # The original's latest values win; the caller's fill in what it lacks.
    assert child.data.metrics == {"train/loss": 0.5, "final/scenes": 4.0, "final/extra": 1.0}
    assert child.data.params == {"data.scenes": "4"}
    assert [i.dataset.name for i in child.inputs.dataset_inputs] == ["raw"]


def test_cached_child_without_a_readable_original(experiment: str, client: MlflowClient) -> None:
    rerun = Tracker("pipeline:p", experiment=experiment)
    gone = rerun.log_cached_child("vae", "0" * 32, metrics={"final/loss": 0.25})
    none = rerun.log_cached_child("data", None)
    rerun.end()
    run = client.get_run(gone)
    assert run.data.metrics == {"final/loss": 0.25} and run.data.tags["interiorfusion.cached_run_id"] == "0" * 32
    assert client.get_run(none).data.tags["interiorfusion.cached"] == "true"


def test_null_tracker_accepts_the_new_calls() -> None:
    t = NullTracker()
    t.log_dataset_input("data", "/x", "d" * 64, context="evaluation", profile={"n": 1})
    assert t.log_cached_child("data", "abc", metrics={"a": 1.0}) is None
    assert t.experiment_id is None and t.experiment_url is None and t.run_url is None
    own = {name for name, value in vars(Tracker).items() if callable(value) and not name.startswith("_")}
    assert own <= set(vars(NullTracker)), "every Tracker method needs a no-op in NullTracker"
