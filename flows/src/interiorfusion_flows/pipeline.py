"""The `interiorfusion-pipeline` Prefect flow: data → vae → structure → material → lora → grpo → evaluate,
for the stages the pipeline config lists and that are installed.

Stages hand each other manifest URIs, never in-memory objects. Each stage's output prefix is content-addressed:
`<root>/pipelines/<name>/<stage>/<cache key[:16]>`, where the cache key digests (stage, config, input manifests).
So a rerun finds every unchanged stage's manifest and skips it, and a changed config or upstream output gives a
new key, a new prefix, and a rerun of everything downstream — no completed output is ever overwritten.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from interiorfusion_core.config import load_config
from interiorfusion_core.config.schemas import PipelineConfig, PipelineStageEntry
from interiorfusion_core.contract import resolve_inputs
from interiorfusion_core.errors import UserError
from interiorfusion_core.manifest import cache_key, read_manifest, try_read_manifest
from interiorfusion_core.registry import get_stage, stages
from interiorfusion_core.state import artifact_root
from interiorfusion_core.storage import ArtifactStore, open_store
from interiorfusion_core.tracking import Tracker
from interiorfusion_flows.executors import EXECUTORS, StageJob

PIPELINE_FLOW = "interiorfusion-pipeline"
STAGE_FLOW = "interiorfusion-stage"


def load_pipeline(path: str | Path) -> PipelineConfig:
    loaded = load_config(path, kind="pipeline")
    cfg = loaded.model
    assert isinstance(cfg, PipelineConfig)
    installed = stages()
    for name, entry in cfg.stages.items():
        if name not in installed:
            listed = ", ".join(installed)
            raise UserError(f"{path}: stages.{name}: stage '{name}' is not installed (installed: {listed})")
        cfg.stages[name] = entry.model_copy(update={"config": str(_relative_to(path, entry.config))})
    return cfg


def _relative_to(pipeline_path: str | Path, config: str) -> Path:
    """Stage configs are named relative to the pipeline file (or the working directory, if found there)."""
    p = Path(config)
    if p.is_absolute() or p.exists():
        return p
    return Path(pipeline_path).parent / p


def pipeline_store(cfg: PipelineConfig) -> ArtifactStore:
    return open_store(cfg.artifact_root or artifact_root()).child(f"pipelines/{cfg.name}")


def ordered_stages(cfg: PipelineConfig) -> list[str]:
    return [name for name in stages() if name in cfg.stages and cfg.stages[name].enabled]


def _retry_on_infrastructure(task: Any, task_run: Any, state: Any) -> bool:
    """Retry unreachable servers, killed processes and the like; never a user error such as a bad config."""
    try:
        state.result()
    except UserError as exc:
        return exc.transient
    except Exception:
        return True
    return False


@task(retry_condition_fn=_retry_on_infrastructure, persist_result=False, log_prints=True)
def run_stage_task(
    stage: str,
    entry: PipelineStageEntry,
    inputs: dict[str, str],
    store_uri: str,
    force: bool,
    parent_run_id: str | None,
    experiment: str,
) -> dict[str, Any]:
    """Run (or find cached) one stage; returns its output URI and timings."""
    logger = get_run_logger()
    started = time.perf_counter()
    loaded = load_config(entry.config, tuple(entry.set), get_stage(stage).config_kind)
    resolved = resolve_inputs(get_stage(stage), inputs)
    key = cache_key(stage, loaded.digest, {n: i.manifest.digest for n, i in resolved.items()})
    output = open_store(store_uri).child(f"{stage}/{key[:16]}")
    existing = try_read_manifest(output)
    if existing is not None and existing.cache_key == key and not force:
        logger.info("%s: cached at %s", stage, output.uri)
        return {"uri": output.uri, "cached": True, "seconds": time.perf_counter() - started, "stage_seconds": 0.0}
    job = StageJob(
        stage=stage, config_path=entry.config, overrides=list(entry.set), inputs=inputs, output=output.uri,
        force=force, parent_run_id=parent_run_id, experiment=experiment, entry=entry, log=logger.info,
    )
    logger.info("%s: running with the %s executor → %s", stage, entry.executor, output.uri)
    EXECUTORS[entry.executor](job)
    manifest = read_manifest(output)
    if manifest.cache_key != key:
        raise UserError(f"{output.uri}: the stage wrote a manifest for another cache key; refusing to chain it")
    return {
        "uri": output.uri,
        "cached": False,
        "seconds": time.perf_counter() - started,
        "stage_seconds": float(manifest.metrics.get("stage_seconds", 0.0)),
    }


def _select(order: list[str], only: str | None, from_stage: str | None) -> set[str]:
    for name in (only, from_stage):
        if name is not None and name not in order:
            raise UserError(f"stage '{name}' is not part of this pipeline (its stages: {', '.join(order)})")
    if only:
        return {only}
    if from_stage:
        return set(order[order.index(from_stage):])
    return set(order)


def _previous_outputs(store: ArtifactStore, run: str | None) -> dict[str, str]:
    key = f"runs/{run}.json" if run else "runs/latest.json"
    if not store.exists(key):
        what = f"pipeline run '{run}'" if run else "an earlier pipeline run"
        raise UserError(f"{store.uri_for(key)}: no record of {what}; run the whole pipeline once first")
    return store.get_json(key)["stages"]


@flow(name=PIPELINE_FLOW, log_prints=True)
def interiorfusion_pipeline(
    config: str,
    only: str | None = None,
    from_stage: str | None = None,
    force: list[str] | None = None,
    upstream_run: str | None = None,
) -> dict[str, Any]:
    """Run the pipeline config's stages in order; `only`/`from_stage` take upstream outputs from the latest
    (or the `upstream_run`) recorded pipeline run; `force` reruns the named stages even if cached."""
    logger = get_run_logger()
    cfg = load_pipeline(config)
    order = ordered_stages(cfg)
    selected = _select(order, only, from_stage)
    forced = set(force or [])
    store = pipeline_store(cfg)
    previous = _previous_outputs(store, upstream_run) if selected != set(order) else {}
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{(flow_run.get_id() or 'local')[:8]}"
    parent = Tracker(f"pipeline:{cfg.name}", experiment=cfg.experiment,
                     tags={"interiorfusion.pipeline": cfg.name, "interiorfusion.pipeline_run": run_id})
    parent.log_params({"pipeline.config": str(config), "pipeline.stages": ",".join(order)})
    outputs: dict[str, str] = {}
    timings: dict[str, dict[str, Any]] = {}
    status = "FAILED"
    try:
        for name in order:
            if name not in selected:
                if name not in previous:
                    raise UserError(f"stage '{name}' has no output in the previous pipeline run to build on")
                outputs[name] = previous[name]
                continue
            stage_cls = get_stage(name)
            wanted = {**stage_cls.inputs, **stage_cls.optional_inputs}
            inputs = {inp: outputs[up] for inp, up in wanted.items() if up in outputs}
            result = run_stage_task.with_options(
                name=f"stage-{name}", retries=cfg.stages[name].retries,
                retry_delay_seconds=cfg.stages[name].retry_delay_seconds,
            )(name, cfg.stages[name], inputs, store.uri, name in forced, parent.run_id, cfg.experiment)
            outputs[name] = result["uri"]
            timings[name] = result
        record = {"run_id": run_id, "pipeline": cfg.name, "config": str(config), "stages": outputs,
                  "timings": timings, "mlflow_parent_run_id": parent.run_id,
                  "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
        store.put_json(f"runs/{run_id}.json", record)
        store.put_json("runs/latest.json", record)
        parent.log_metrics({f"{n}.seconds": t["seconds"] for n, t in timings.items()}, step=0)
        parent.log_dict(record, "pipeline_run.json")
        status = "FINISHED"
        logger.info("pipeline %s run %s: %s", cfg.name, run_id, outputs)
        return record
    finally:
        parent.end(status)


@flow(name=STAGE_FLOW, log_prints=True)
def interiorfusion_stage(
    stage: str, config: str, output: str, inputs: dict[str, str] | None = None, overrides: list[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """One stage alone (for per-stage deployments): same contract as `interiorfusion stage run`."""
    from interiorfusion_core.contract import run_stage

    outcome = run_stage(stage, config, inputs=inputs or {}, output=output, overrides=tuple(overrides or ()),
                        force=force)
    return {"uri": outcome.uri, "cached": outcome.skipped, "metrics": outcome.manifest.metrics}
