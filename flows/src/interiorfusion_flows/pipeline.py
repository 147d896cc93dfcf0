"""The `interiorfusion-pipeline` Prefect flow: the pipeline config's graph of named stage instances (data → vae →
structure → material → lora → grpo → evaluate, with as many instances of a stage as the config names).

Instances hand each other manifest URIs, never in-memory objects. Each output prefix is content-addressed:
`<root>/pipelines/<name>/<instance>/<cache key[:16]>`, where the cache key digests (stage, config, input manifests).
So a rerun finds every unchanged stage's manifest and skips it, and a changed config or upstream output gives a
new key, a new prefix, and a rerun of everything downstream — no completed output is ever overwritten.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from interiorfusion_core.config.pipeline import PipelineConfig, PipelineGraph, PipelineStageEntry, load_pipeline
from interiorfusion_core.contract import lookup_cached, request_stage
from interiorfusion_core.errors import UserError
from interiorfusion_core.manifest import read_manifest
from interiorfusion_core.state import artifact_root
from interiorfusion_core.storage import ArtifactStore, open_store
from interiorfusion_core.tracking import Tracker
from interiorfusion_flows.executors import EXECUTORS, StageJob

PIPELINE_FLOW = "interiorfusion-pipeline"
STAGE_FLOW = "interiorfusion-stage"


def pipeline_store(cfg: PipelineConfig) -> ArtifactStore:
    return open_store(cfg.artifact_root or artifact_root()).child(f"pipelines/{cfg.name}")


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
    instance: str,
    stage: str,
    entry: PipelineStageEntry,
    inputs: dict[str, str],
    store_uri: str,
    force: bool,
    parent_run_id: str | None,
    experiment: str,
) -> dict[str, Any]:
    """Run (or find cached) one stage instance; returns its output URI and timings."""
    logger = get_run_logger()
    started = time.perf_counter()
    request = request_stage(stage, entry.config, inputs, tuple(entry.set))
    output = open_store(store_uri).child(f"{instance}/{request.key[:16]}")
    cached = None if force else lookup_cached(output, request.key)
    if cached is not None:
        logger.info("%s: cached at %s", instance, output.uri)
        return {"uri": output.uri, "stage": stage, "cached": True, "seconds": time.perf_counter() - started,
                "stage_seconds": 0.0, "mlflow_run_id": cached.mlflow_run_id, "metrics": dict(cached.metrics)}
    job = StageJob(
        stage=stage, config_path=entry.config, overrides=list(entry.set), inputs=inputs, output=output.uri,
        force=force, parent_run_id=parent_run_id, experiment=experiment, entry=entry, log=logger.info,
        run_name=instance,
    )
    logger.info("%s: running stage '%s' with the %s executor → %s", instance, stage, entry.executor, output.uri)
    EXECUTORS[entry.executor](job)
    manifest = read_manifest(output)
    if manifest.cache_key != request.key:
        raise UserError(f"{output.uri}: the stage wrote a manifest for another cache key; refusing to chain it")
    return {
        "uri": output.uri,
        "stage": stage,
        "cached": False,
        "seconds": time.perf_counter() - started,
        "stage_seconds": float(manifest.metrics.get("stage_seconds", 0.0)),
        "mlflow_run_id": manifest.mlflow_run_id,
    }


def select_instances(graph: PipelineGraph, only: str | None, from_stage: str | None) -> set[str]:
    """`only`: one instance; `from_stage`: an instance and everything downstream of it; neither: all."""
    for name in (only, from_stage):
        if name is not None and name not in graph.order:
            raise UserError(f"'{name}' is not an instance of this pipeline (its instances: {', '.join(graph.order)})")
    if only:
        return {only}
    if from_stage:
        return {from_stage} | graph.downstream_of(from_stage)
    return set(graph.order)


def _previous_outputs(store: ArtifactStore, run: str | None, required: bool) -> dict[str, str]:
    """The outputs recorded by the latest (or the named) pipeline run; `required`: the selection builds on them."""
    key = f"runs/{run}.json" if run else "runs/latest.json"
    if not store.exists(key):
        if not required and run is None:
            return {}
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
    """Run the pipeline's stage instances in dependency order; `only`/`from_stage` take the outputs of the instances
    they build on from the latest (or the `upstream_run`) recorded pipeline run; `force` reruns the named instances
    even if cached. All of them take instance names."""
    logger = get_run_logger()
    cfg, graph = load_pipeline(config)
    selected = select_instances(graph, only, from_stage)
    forced = set(force or [])
    unknown = sorted(forced - set(graph.order))
    if unknown:
        raise UserError(f"--force {unknown[0]}: not an instance of this pipeline (its instances: "
                        f"{', '.join(graph.order)})")
    needed = set().union(*(graph.upstream_of(n) for n in selected)) - selected
    store = pipeline_store(cfg)
    # A partial run carries the other instances' outputs over, so the record stays whole for the next --only.
    previous = _previous_outputs(store, upstream_run, bool(needed)) if selected != set(graph.order) else {}
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{(flow_run.get_id() or 'local')[:8]}"
    parent = Tracker(f"pipeline:{cfg.name}", experiment=cfg.experiment,
                     tags={"interiorfusion.pipeline": cfg.name, "interiorfusion.pipeline_run": run_id})
    parent.log_params({"pipeline.config": str(config), "pipeline.instances": ",".join(graph.order)})
    if parent.experiment_url:
        logger.info("MLflow: %s", parent.experiment_url)
    outputs: dict[str, str] = {}
    timings: dict[str, dict[str, Any]] = {}
    status = "FAILED"
    try:
        for name in graph.order:
            if name not in selected:
                if name in previous:
                    outputs[name] = previous[name]
                elif name in needed:
                    raise UserError(f"instance '{name}' has no output in the previous pipeline run to build on")
                continue
            entry = cfg.stages[name]
            inputs = {inp: outputs[up] for inp, up in graph.inputs[name].items()}
            result = run_stage_task.with_options(
                name=name, retries=entry.retries, retry_delay_seconds=entry.retry_delay_seconds,
            )(name, graph.specs[name].name, entry, inputs, store.uri, name in forced, parent.run_id, cfg.experiment)
            outputs[name] = result["uri"]
            timings[name] = result
            if result["cached"]:
                # A cached instance still shows as a child of this run, linked to the run that produced it.
                parent.log_cached_child(
                    name, result.get("mlflow_run_id"),
                    metrics={f"final/{k}": v for k, v in result.get("metrics", {}).items()},
                    tags={"interiorfusion.stage": result["stage"], "interiorfusion.output": result["uri"]},
                )
        record = {"run_id": run_id, "pipeline": cfg.name, "config": str(config), "stages": outputs,
                  "instances": {n: graph.specs[n].name for n in graph.order}, "timings": timings,
                  "mlflow_parent_run_id": parent.run_id,
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
