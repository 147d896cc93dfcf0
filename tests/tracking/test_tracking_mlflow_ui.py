"""What the Tracker writes for the MLflow UI: the experiment kind and the links to its views.
These run against the test session's SQLite store; tests/tracking/test_tracking_browser.py renders them."""

from __future__ import annotations

import uuid

import pytest
from mlflow.tracking import MlflowClient

from interiorfusion_core import tracking
from interiorfusion_core.tracking import NullTracker, Tracker, tracking_uri, ui_url


@pytest.fixture
def experiment() -> str:
    return f"ui-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def client() -> MlflowClient:
    return MlflowClient(tracking_uri())


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


def test_null_tracker_accepts_the_new_calls() -> None:
    t = NullTracker()
    assert t.experiment_id is None and t.experiment_url is None and t.run_url is None
    own = {name for name, value in vars(Tracker).items() if callable(value) and not name.startswith("_")}
    assert own <= set(vars(NullTracker)), "every Tracker method needs a no-op in NullTracker"
