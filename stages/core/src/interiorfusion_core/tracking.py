"""MLflow tracking: one parent run per pipeline run, a nested run per stage, batched metrics.

Embedded default: `sqlite:///<state dir>/mlflow.db` with artifacts beside it; `MLFLOW_TRACKING_URI` wins.
The client API is used (not mlflow's fluent globals) so concurrent stages in one process never share state.

What the MLflow UI shows, and which tag or call puts it there (checked against mlflow 3.17):
- experiments are tagged `mlflow.experimentKind=custom_model_development` (a model-training experiment);
  3.17's UI picks its GenAI or model-training view from the `workflowType` URL parameter (or the user's last
  choice), so the links made here (`Tracker.experiment_url`, `run_url`) carry `workflowType=machine_learning`;
- every run gets MLflow's own source tags (`source_tags`: git commit, source name and type), shown in the runs
  table's Source column and on the run page;
- `log_dataset_input` fills the runs table's Dataset column; `log_cached_child` keeps a cached stage visible
  as a child of a rerun's pipeline run.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from interiorfusion_core.errors import UserError
from interiorfusion_core.state import distributed_rank, state_dir

DEFAULT_EXPERIMENT = "interiorfusion"
SECRET_PATTERN = re.compile(r"(secret|password|passwd|token|access_key|credential|api_key|private_key)", re.I)
PARAM_VALUE_LIMIT = 6000

# The experiment tag MLflow 3's UI reads and writes for an experiment's kind (its `ExperimentKind` values
# include "genai_development" and "custom_model_development"; mlflow/server/js/build/static/js/main.*.js).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"
# The UI's view switch (GenAI / Model training), read from the URL before the user's stored choice.
UI_TRAINING_VIEW = "workflowType=machine_learning"
# MLflow's own run tags (mlflow.utils.mlflow_tags), set by the client API only when given.
SOURCE_NAME_TAG = "mlflow.source.name"
SOURCE_TYPE_TAG = "mlflow.source.type"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
GIT_BRANCH_TAG = "mlflow.source.git.branch"
GIT_REPO_URL_TAG = "mlflow.source.git.repoURL"
NOTE_TAG = "mlflow.note.content"
DATASET_CONTEXT_TAG = "mlflow.data.context"
# MLflow's own dataset digests are 8 hex characters (mlflow.data.digest_utils); the store allows at most 36.
DATASET_DIGEST_LENGTH = 8


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{state_dir() / 'mlflow.db'}"


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → {"a.b.c": "value"}, secrets redacted, lists as JSON."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
            continue
        text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
        if SECRET_PATTERN.search(str(key)):
            text = "***"
        flat[name] = text[:PARAM_VALUE_LIMIT]
    return flat


def _client() -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def check_server(uri: str | None = None, timeout: float = 5.0) -> None:
    """Fail fast with one sentence when an MLflow server is configured but not answering."""
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as resp:
            resp.read()
    except Exception as exc:
        raise UserError(
            f"MLflow server at {uri} is not reachable ({exc}); start it or unset MLFLOW_TRACKING_URI",
            transient=True,
        ) from None


def experiment_id(client: Any, name: str) -> str:
    """The id of the experiment `name`, created if missing; either way marked as a model-training experiment."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        mark_training_experiment(client, exp)
        return exp.experiment_id
    location = None
    if not tracking_uri().startswith(("http://", "https://", "databricks")):
        location = (state_dir() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND}
        )
    except Exception:
        # Another process created it first.
        exp = client.get_experiment_by_name(name)
        mark_training_experiment(client, exp)
        return exp.experiment_id


def mark_training_experiment(client: Any, experiment: Any) -> None:
    """Tag an experiment (an `mlflow.entities.Experiment`) as a model-training one unless it already is.
    The pipelines own the experiments they write to, so another kind (e.g. one the UI inferred) is replaced."""
    if (experiment.tags or {}).get(EXPERIMENT_KIND_TAG) != TRAINING_EXPERIMENT_KIND:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)


def ui_url(experiment_id: str, run_id: str | None = None, uri: str | None = None) -> str | None:
    """The MLflow UI page of an experiment's runs table (or of one run), in the model-training view; None when
    the tracking URI is not a server (`mlflow ui` on a local store serves the same `#/...` paths)."""
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/{ui_path(experiment_id, run_id)}"


def ui_path(experiment_id: str, run_id: str | None = None) -> str:
    """The UI's own route, relative to its root: `#/experiments/<id>/runs[/<run id>]?workflowType=...`."""
    run = f"/{run_id}" if run_id else ""
    return f"#/experiments/{experiment_id}/runs{run}?{UI_TRAINING_VIEW}"


def _git(*args: str) -> str:
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _strip_credentials(url: str) -> str:
    parts = urlsplit(url)
    if not parts.scheme or "@" not in parts.netloc:
        return url  # also scp-style `git@host:org/repo.git`, which carries no secret
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, parts.query, parts.fragment))


@functools.cache
def source_tags() -> dict[str, str]:
    """MLflow's source tags for the code running now, computed once per process: the commit from
    `INTERIORFUSION_GIT_SHA` (images and CI set it) or else `git rev-parse HEAD` of this package's checkout;
    the branch and remote URL only when they describe that same commit. Empty when no commit is known."""
    head = _git("rev-parse", "HEAD")
    sha = os.environ.get("INTERIORFUSION_GIT_SHA", "").strip() or head
    if not sha:
        return {}
    tags = {GIT_COMMIT_TAG: sha, SOURCE_TYPE_TAG: "LOCAL", SOURCE_NAME_TAG: "interiorfusion"}
    if head == sha:
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags[GIT_BRANCH_TAG] = branch
        names = _git("remote").split()
        name = "origin" if "origin" in names else next(iter(names), "")
        remote = _git("remote", "get-url", name) if name else ""
        if remote:
            # The UI shows the source name's last path part and links it when it is a GitHub/GitLab URL.
            tags[GIT_REPO_URL_TAG] = tags[SOURCE_NAME_TAG] = _strip_credentials(remote)
    return tags


class Tracker:
    """A handle on one MLflow run. Metrics are buffered and sent with log_batch."""

    def __init__(
        self,
        run_name: str,
        *,
        experiment: str | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        flush_every: int = 200,
        flush_seconds: float = 10.0,
    ):
        check_server()
        self.client = _client()
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._metrics: list[Any] = []
        self._last_flush = time.monotonic()
        self._experiment_id: str | None = None
        if run_id is not None:
            self.run_id = run_id
            return
        exp_name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        all_tags = {**source_tags(), **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        self._experiment_id = experiment_id(self.client, exp_name)
        run = self.client.create_run(self._experiment_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id

    @property
    def enabled(self) -> bool:
        return True

    @property
    def experiment_id(self) -> str | None:
        if self._experiment_id is None:
            self._experiment_id = self.client.get_run(self.run_id).info.experiment_id
        return self._experiment_id

    @property
    def experiment_url(self) -> str | None:
        """This run's experiment in the UI's model-training runs table (None without a tracking server)."""
        return ui_url(self.experiment_id)

    @property
    def run_url(self) -> str | None:
        return ui_url(self.experiment_id, self.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_config(self, resolved: Mapping[str, Any]) -> None:
        self.log_params(flatten(resolved))
        self.log_dict(dict(resolved), "config.json")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._metrics.extend(Metric(k, float(v), now, int(step)) for k, v in metrics.items())
        if len(self._metrics) >= self.flush_every or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._metrics), 1000):
            self.client.log_batch(self.run_id, metrics=self._metrics[i : i + 1000])
        self._metrics.clear()
        self._last_flush = time.monotonic()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
            self.log_artifact(p)

    def log_text(self, text: str, artifact_file: str) -> None:
        """`text` as the artifact `artifact_file` (a relative path, e.g. "viewers/val.html": the UI shows HTML
        artifacts in an iframe)."""
        self.client.log_text(self.run_id, text, artifact_file)

    def log_image(self, image: Any, name: str) -> None:
        """A PIL image, a HxWx3 uint8 array, or PNG bytes, stored under images/ (`name` may hold folders:
        "samples/step-10.png" → images/samples/step-10.png)."""
        rel = Path(name)
        folder = "images" if rel.parent == Path(".") else f"images/{rel.parent.as_posix()}"
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / rel.name
            if isinstance(image, bytes | bytearray):
                p.write_bytes(image)
            else:
                from PIL import Image

                img = image if hasattr(image, "save") else Image.fromarray(image)
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                p.write_bytes(buf.getvalue())
            self.log_artifact(p, folder)

    def log_dataset_input(
        self,
        name: str,
        uri: str,
        digest: str,
        *,
        context: str = "training",
        profile: Mapping[str, Any] | str | None = None,
        schema: Mapping[str, Any] | str | None = None,
    ) -> None:
        """Record a stage output this run reads (e.g. the data stage's shards) as an MLflow dataset input: the
        runs table's Dataset column shows `name` and the short digest. `name` is the producing stage instance,
        `uri` its output prefix, `digest` its manifest's digest (kept whole in the input tag
        `interiorfusion.digest`); `context` is MLflow's dataset context ("training", "evaluation", ...)."""
        self.client.log_inputs(self.run_id, datasets=[dataset_input(name, uri, digest, context, profile, schema)])

    def log_cached_child(
        self,
        name: str,
        cached_run_id: str | None,
        *,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str | None:
        """A FINISHED child run of this (pipeline) run for a stage that a rerun found cached, so the new pipeline
        run still lists every stage. Returns the child's run id.

        MLflow has no run-to-run link besides `mlflow.parentRunId` (its other links join runs to logged models
        and datasets), so the child is a stand-in that points at the run which did the work: the tags
        `interiorfusion.cached=true`, `interiorfusion.cached_run_id` and, with a server,
        `interiorfusion.cached_run_url`, plus a description (`mlflow.note.content`) linking to it. It carries
        the original's latest metric values (not their histories: the curves stay on the original), params,
        dataset inputs, `interiorfusion.*` and source tags (the code that produced the output), so the runs
        table compares it with its siblings. `metrics` fill in values the original lacks, or stand in when it
        cannot be read (another tracking store, deleted)."""
        from mlflow.entities import Metric, Param

        original = None
        if cached_run_id:
            try:
                original = self.client.get_run(cached_run_id)
            except Exception:
                original = None
        child_tags: dict[str, str] = {**source_tags()}
        values: dict[str, float] = {}
        params: list[Any] = []
        inputs: list[Any] = []
        if original is not None:
            child_tags.update(
                {
                    k: v
                    for k, v in original.data.tags.items()
                    if k.startswith(("interiorfusion.", "mlflow.source.")) and not k.startswith("interiorfusion.cached")
                }
            )
            values.update(original.data.metrics)
            params = [Param(k, v) for k, v in original.data.params.items()]
            inputs = list(original.inputs.dataset_inputs) if original.inputs else []
        for k, v in (metrics or {}).items():
            values.setdefault(k, float(v))
        child_tags.update(tags or {})
        child_tags.update({"mlflow.parentRunId": self.run_id, "interiorfusion.cached": "true"})
        if cached_run_id:
            child_tags["interiorfusion.cached_run_id"] = cached_run_id
            where = original.info.experiment_id if original is not None else self.experiment_id
            url = ui_url(where, cached_run_id)
            if url:
                child_tags["interiorfusion.cached_run_url"] = url
            label = original.info.run_name if original is not None else cached_run_id
            link = f"[{label}]({ui_path(where, cached_run_id)})"
            child_tags[NOTE_TAG] = f"Cached: this stage's output was reused; it was produced by run {link}."
        else:
            child_tags[NOTE_TAG] = "Cached: this stage's output was reused."
        run = self.client.create_run(self.experiment_id, run_name=name, tags=child_tags)
        child = run.info.run_id
        now = int(time.time() * 1000)
        metric_items = [Metric(k, float(v), now, 0) for k, v in values.items()]
        for i in range(0, max(len(metric_items), len(params)), 100):
            batch_metrics, batch_params = metric_items[i : i + 100], params[i : i + 100]
            if batch_metrics or batch_params:
                self.client.log_batch(child, metrics=batch_metrics, params=batch_params)
        if inputs:
            self.client.log_inputs(child, datasets=inputs)
        self.client.set_terminated(child, status="FINISHED")
        return child

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)


def dataset_input(
    name: str,
    uri: str,
    digest: str,
    context: str = "training",
    profile: Mapping[str, Any] | str | None = None,
    schema: Mapping[str, Any] | str | None = None,
) -> Any:
    """An `mlflow.entities.DatasetInput` for a stage output at `uri`, with the source type and source JSON that
    MLflow's own dataset sources give such a URI ("local" + {"uri"} for paths and file://, the scheme + {"uri"}
    for s3:// and the like, "http" + {"url"} for http(s)://)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    scheme = urlsplit(uri).scheme
    if scheme in ("", "file") or len(scheme) == 1:  # a Windows drive letter is a path too
        source_type, source = "local", {"uri": uri}
    elif scheme in ("http", "https"):
        source_type, source = "http", {"url": uri}
    else:
        source_type, source = scheme, {"uri": uri}

    def as_text(value: Mapping[str, Any] | str | None) -> str | None:
        return value if value is None or isinstance(value, str) else json.dumps(dict(value), sort_keys=True)

    dataset = Dataset(
        name=name,
        digest=digest[:DATASET_DIGEST_LENGTH],
        source_type=source_type,
        source=json.dumps(source),
        schema=as_text(schema),
        profile=as_text(profile),
    )
    tags = [InputTag(DATASET_CONTEXT_TAG, context), InputTag("interiorfusion.digest", digest)]
    return DatasetInput(dataset, tags=tags)


class NullTracker(Tracker):
    """Non-zero ranks and dry runs: accepts every call, sends nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.run_id = None  # type: ignore[assignment]

    @property
    def enabled(self) -> bool:
        return False

    @property
    def experiment_id(self) -> str | None:
        return None

    @property
    def experiment_url(self) -> str | None:
        return None

    @property
    def run_url(self) -> str | None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_config(self, resolved: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def flush(self) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, obj: Any, name: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_image(self, image: Any, name: str) -> None: ...
    def log_dataset_input(
        self,
        name: str,
        uri: str,
        digest: str,
        *,
        context: str = "training",
        profile: Mapping[str, Any] | str | None = None,
        schema: Mapping[str, Any] | str | None = None,
    ) -> None: ...
    def log_cached_child(
        self,
        name: str,
        cached_run_id: str | None,
        *,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str | None: ...
    def end(self, status: str = "FINISHED") -> None: ...


def tracker_for_rank(run_name: str, **kwargs: Any) -> Tracker:
    rank, _ = distributed_rank()
    return Tracker(run_name, **kwargs) if rank == 0 else NullTracker()
