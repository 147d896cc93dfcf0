"""The one stage contract: (stage, resolved config, input manifests) → output prefix + manifest.json (last).

    run_stage("vae", "configs/smoke/vae.yaml", inputs={"data": uri}, output=uri)

- Inputs are prefixes holding a manifest; a prefix without one is refused.
- The cache key is sha256(stage, config digest, input manifest digests). An output whose manifest has the same
  key is not run again (unless `force`); an output holding a *different* completed run is never overwritten
  unless `force` (a completed artifact is never lost by accident).
- An output without a manifest but with `_run.json` is an interrupted run: rerunning the same command resumes
  it (stages resume from their latest checkpoint under the prefix); `restart` wipes it first. An interrupted
  run of a different config is refused rather than mixed with this one.
- Under a launcher (N processes, M nodes) rank 0 alone reads the output prefix and decides cached / refused /
  resume / fresh; every rank acts on that one decision (`agree`), so a cached rerun exits 0 on every rank at
  once and a refused one fails on every rank with the same sentence.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from importlib.metadata import distributions
from pathlib import Path
from typing import Any, Literal, TypeVar

from interiorfusion_core.config import LoadedConfig, StageSpec, load_config, stage_specs
from interiorfusion_core.errors import ConfigError, UserError
from interiorfusion_core.manifest import (
    MANIFEST_KEY,
    InputRef,
    Manifest,
    cache_key,
    read_manifest,
    try_read_manifest,
)
from interiorfusion_core.registry import get_stage
from interiorfusion_core.stage import RUN_MARKER, RecordingStore, Stage, StageContext, StageInput, StageResult
from interiorfusion_core.state import distributed_rank
from interiorfusion_core.storage import ArtifactStore, open_store
from interiorfusion_core.tracking import GIT_COMMIT_TAG, NullTracker, Tracker, source_tags

# The stage-facing types live in `stage`; they are re-exported here, where stages have always imported them from.
__all__ = [
    "RUN_MARKER", "RecordingStore", "RunOutcome", "Stage", "StageContext", "StageInput", "StageRequest",
    "StageResult", "agree", "lookup_cached", "prepare_output", "request_stage", "resolve_inputs", "run_stage",
]

@dataclass
class RunOutcome:
    manifest: Manifest
    uri: str
    skipped: bool


def code_version() -> dict[str, str]:
    versions = {
        d.metadata["Name"]: d.version
        for d in distributions()
        if (d.metadata["Name"] or "").startswith("interiorfusion")
    }
    sha = source_tags().get(GIT_COMMIT_TAG)  # INTERIORFUSION_GIT_SHA, else this checkout's HEAD (looked up once)
    if sha:
        versions["git"] = sha
    return dict(sorted(versions.items()))


def stage_spec(stage: str) -> StageSpec:
    """A stage's spec from its config schema (no stage code imported); else from its class (which reports a
    broken or unknown stage with the real reason)."""
    spec = stage_specs().get(stage)
    return spec if spec is not None else get_stage(stage).spec()


def resolve_inputs(spec: StageSpec, inputs: Mapping[str, str]) -> dict[str, StageInput]:
    known = spec.all_inputs
    for name in inputs:
        if name not in known:
            listed = ", ".join(known) or "none"
            raise UserError(f"stage '{spec.name}' takes no input named '{name}' (its inputs: {listed})")
    for name in spec.inputs:
        if name not in inputs:
            raise UserError(
                f"stage '{spec.name}' needs --input {name}=URI (the output of stage '{spec.inputs[name]}')"
            )
    resolved = {}
    for name, uri in inputs.items():
        store = open_store(uri)
        manifest = read_manifest(store)
        if manifest.stage != known[name]:
            raise UserError(
                f"{uri}: input '{name}' must be an output of stage '{known[name]}', but it came from '{manifest.stage}'"
            )
        resolved[name] = StageInput(name, uri, manifest, store)
    return resolved


T = TypeVar("T")
Decision = Literal["cached", "resume", "fresh"]


def _ensure_process_group() -> None:
    """The launcher's process group, created here when the stage decides before the engine would create it.
    accelerate and DeepSpeed both reuse an initialised default group; CUDA runs get NCCL for tensors on the GPU and
    gloo for the small CPU objects this module broadcasts."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    _OWN_GROUP.append(True)


_OWN_GROUP: list[bool] = []


def _release_process_group() -> None:
    """A cached run trains nothing: tear down the group this module created, so every rank exits cleanly."""
    if _OWN_GROUP:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        _OWN_GROUP.clear()


def agree(decide: Callable[[], T], what: str) -> T:
    """Rank 0 runs `decide` and every rank gets its result, or raises the same one-sentence error. No other rank
    looks at storage on its own, so nobody can see a state rank 0 is about to change. One process: just `decide`."""
    rank, world = distributed_rank()
    if world <= 1:
        return decide()
    import torch.distributed as dist

    _ensure_process_group()
    box: list[Any] = [None]
    failure: BaseException | None = None
    if rank == 0:
        try:
            box[0] = ("ok", decide())
        except UserError as exc:
            box[0] = ("user", str(exc), exc.exit_code, exc.transient)
            failure = exc
        except BaseException as exc:
            box[0] = ("crash", f"{type(exc).__name__}: {exc}")
            failure = exc
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    tag, *rest = box[0]
    if tag == "ok":
        return rest[0]
    if tag == "user":
        err = UserError(rest[0], transient=rest[2])
        err.exit_code = rest[1]
        raise err
    raise UserError(f"rank 0 failed while deciding {what} ({rest[0]}); its log has the details")


def lookup_cached(store: ArtifactStore, key: str) -> Manifest | None:
    """The completed run at `store` if it is this cache key's. The one cache check: `run_stage` and the pipeline
    flow both use it."""
    existing = try_read_manifest(store)
    return existing if existing is not None and existing.cache_key == key else None


def prepare_output(store: ArtifactStore, key: str, *, force: bool, restart: bool) -> tuple[Manifest | None, bool]:
    """Decide what to do with an output prefix. Returns (cached manifest or None, resuming?)."""
    cached = lookup_cached(store, key)
    if cached is not None and not force:
        return cached, False
    existing = cached or try_read_manifest(store)
    if existing is not None and not force:
        raise UserError(
            f"{store.uri}: already holds a completed run of stage '{existing.stage}' with another config or "
            "inputs; write to a new --output, or pass --force to replace it"
        )
    marker = store.get_json(RUN_MARKER) if store.exists(RUN_MARKER) else None
    if force or restart:
        # Manifest first, so an interruption while wiping leaves an incomplete prefix, never a stale complete one.
        if store.exists(MANIFEST_KEY):
            store.delete(MANIFEST_KEY)
        store.delete_prefix("")
        return None, False
    if marker is not None and marker.get("cache_key") != key:
        raise UserError(
            f"{store.uri}: holds an unfinished run with another config or inputs; pass --restart to discard it "
            "or write to a new --output"
        )
    return None, marker is not None


@dataclass
class StageRequest:
    """A stage run fully specified — resolved config, verified inputs, cache key — before anything is decided about
    its output. `run_stage` executes one; the pipeline flow builds one to name and check the output prefix."""

    spec: StageSpec
    loaded: LoadedConfig
    inputs: dict[str, StageInput]
    key: str

    @property
    def stage(self) -> str:
        return self.spec.name


def check_dataset_names(loaded: LoadedConfig, inputs: Mapping[str, StageInput]) -> None:
    """A stage's `data.dataset` names the dataset it trains on: it must be the one its data input holds (catches a
    pipeline that wires the real-scan data instance where the synthetic one belongs, or the reverse)."""
    wanted = getattr(getattr(loaded.model, "data", None), "dataset", None)
    data = inputs.get("data")
    if not isinstance(wanted, str) or data is None or data.manifest.stage != "data":
        return
    held = data.manifest.config.get("dataset")
    if isinstance(held, str) and held != wanted:
        raise ConfigError(
            f"{loaded.path}: data.dataset: this config trains on '{wanted}' but input 'data' ({data.uri}) holds "
            f"'{held}'; wire the right data instance or set data.dataset: {held}"
        )


def request_stage(
    stage: str,
    config: str | Path | LoadedConfig,
    inputs: Mapping[str, str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> StageRequest:
    spec = stage_spec(stage)
    loaded = config if isinstance(config, LoadedConfig) else load_config(config, overrides, spec.config_kind)
    if loaded.kind != spec.config_kind:
        raise UserError(f"{loaded.path}: is a '{loaded.kind}' config; stage '{stage}' needs '{spec.config_kind}'")
    resolved = resolve_inputs(spec, inputs or {})
    check_dataset_names(loaded, resolved)
    key = cache_key(stage, loaded.digest, {n: i.manifest.digest for n, i in resolved.items()})
    return StageRequest(spec, loaded, resolved, key)


def run_stage(
    stage: str,
    config: str | Path | LoadedConfig,
    *,
    inputs: Mapping[str, str] | None = None,
    output: str,
    overrides: list[str] | tuple[str, ...] = (),
    force: bool = False,
    restart: bool = False,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> RunOutcome:
    """Run one stage (or find it cached) under the contract; the same call on every rank of a launched job."""
    stage_cls = get_stage(stage)  # import the stage's code first: a broken package fails before anything else
    request = request_stage(stage, config, inputs, overrides)
    loaded, resolved_inputs, key = request.loaded, request.inputs, request.key
    rank, world = distributed_rank()
    out_store = open_store(output)

    def decide() -> tuple[Decision, dict[str, Any] | None]:
        cached, resuming = prepare_output(out_store, key, force=force, restart=restart)
        if cached is not None:
            return "cached", cached.model_dump(mode="json")
        out_store.put_json(RUN_MARKER, {"stage": stage, "cache_key": key, "config_digest": loaded.digest})
        return ("resume" if resuming else "fresh"), None

    decision, cached_json = agree(decide, f"whether {output} is cached")
    if decision == "cached":
        assert cached_json is not None
        _release_process_group()
        return RunOutcome(Manifest.model_validate(cached_json), out_store.uri, skipped=True)
    resuming = decision == "resume"

    parent = parent_run_id or os.environ.get("INTERIORFUSION_PARENT_RUN_ID")
    tracker: Tracker = (
        Tracker(
            run_name or os.environ.get("INTERIORFUSION_RUN_NAME") or stage,
            parent_run_id=parent,
            tags={"interiorfusion.stage": stage, "interiorfusion.cache_key": key, **(tags or {})},
        )
        if rank == 0
        else NullTracker()
    )
    status = "FAILED"
    try:
        tracker.log_config(loaded.resolved)
        tracker.set_tags(
            {"interiorfusion.output": out_store.uri, "interiorfusion.resumed": str(resuming)}
            | {f"interiorfusion.input.{n}": i.uri for n, i in resolved_inputs.items()}
        )
        for n, i in resolved_inputs.items():
            if i.manifest.stage == "data":  # the runs table's Dataset column: which shards this run read
                name = str(i.manifest.config.get("dataset") or n)
                tracker.log_dataset_input(name, i.uri, i.manifest.digest, profile=i.manifest.metrics)
        with tempfile.TemporaryDirectory(prefix=f"interiorfusion-{stage}-") as work:
            ctx = StageContext(
                stage=stage, loaded=loaded, inputs=resolved_inputs, output=RecordingStore(out_store),
                tracker=tracker, cache_key=key, work_dir=Path(work), rank=rank, world_size=world,
                resumed=resuming,
            )
            started = time.perf_counter()
            result = stage_cls().run(ctx)
            result.metrics.setdefault("stage_seconds", time.perf_counter() - started)
        manifest = Manifest(
            stage=stage, cache_key=key, config_kind=loaded.kind, config_digest=loaded.digest,
            config=loaded.resolved,
            inputs={n: InputRef(uri=i.uri, stage=i.manifest.stage, digest=i.manifest.digest)
                    for n, i in resolved_inputs.items()},
            outputs=result.outputs, metrics=result.metrics, code_version=code_version(),
            mlflow_run_id=tracker.run_id,
        )
        for info in sorted(ctx.output.record.values(), key=lambda i: i.key):
            if info.key != RUN_MARKER:
                manifest.add(info)
        if rank == 0:
            if result.metrics:
                tracker.log_metrics({f"final/{k}": v for k, v in result.metrics.items()}, step=0)
            tracker.set_tags({f"interiorfusion.output.{k}": out_store.uri_for(v) for k, v in result.outputs.items()})
            out_store.put_bytes(MANIFEST_KEY, manifest.model_dump_json(indent=2).encode() + b"\n")
            out_store.delete(RUN_MARKER)
            tracker.log_dict(manifest.model_dump(mode="json"), "manifest.json")
        status = "FINISHED"
        return RunOutcome(manifest, out_store.uri, skipped=False)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)
