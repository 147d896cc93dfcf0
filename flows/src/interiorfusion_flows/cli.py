"""The `interiorfusion` command line. Stage packages add sub-commands through the `interiorfusion.cli`
entry-point group (a typer app per name), so the CLI never needs editing when a stage lands."""

from __future__ import annotations

import json
import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated

import typer
import yaml

from interiorfusion_core.cli import (
    ConfigOpt,
    ForceOpt,
    InputOpt,
    OutputOpt,
    RestartOpt,
    SetOpt,
    console,
    run_stage_command,
    user_errors,
)
from interiorfusion_core.errors import UserError

app = typer.Typer(
    name="interiorfusion",
    help="InteriorFusion training platform: validate configs, run stages and pipelines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Validate and inspect config files.", no_args_is_help=True)
stage_app = typer.Typer(help="Run one stage of the pipeline.", no_args_is_help=True)
app.add_typer(config_app, name="config")
pipeline_app = typer.Typer(help="Run the Prefect pipeline (data → vae → … → evaluate).", no_args_is_help=True)
app.add_typer(stage_app, name="stage")
app.add_typer(pipeline_app, name="pipeline")


@config_app.command("check")
@user_errors
def config_check(
    files: Annotated[list[Path], typer.Argument(help="Config YAML files to validate.")],
    kind: Annotated[str | None, typer.Option(help="Validate as this kind instead of detecting it.")] = None,
    set_: SetOpt = None,
    show: Annotated[bool, typer.Option("--show", help="Print the resolved config (all defaults filled in).")] = False,
) -> None:
    """Validate config files; the kind comes from a `kind:` key or is detected from the content. A pipeline is
    checked as a graph too (instances, inputs, cycles) with every instance's stage config.

    Exit code 2 and one line `FILE: a.b.c: what is wrong` on the first invalid file. Imports no torch."""
    from interiorfusion_core.config import load_config
    from interiorfusion_core.config.pipeline import load_pipeline

    for file in files:
        loaded = load_config(file, tuple(set_ or ()), kind)
        note = ""
        if loaded.kind == "pipeline":
            _, graph = load_pipeline(file)
            note = f", instances {' → '.join(graph.order)}"
        console.print(f"{file}: ok ({loaded.kind}, digest {loaded.digest[:12]}{note})", markup=False)
        if show:
            console.print(yaml.safe_dump(loaded.resolved, sort_keys=False), markup=False)


@stage_app.command("run")
@user_errors
def stage_run(
    stage: Annotated[str, typer.Argument(help="Stage name (see `interiorfusion stage list`).")],
    config: ConfigOpt,
    output: OutputOpt,
    set_: SetOpt = None,
    input_: InputOpt = None,
    force: ForceOpt = False,
    restart: RestartOpt = False,
) -> None:
    """Run STAGE with a config, its upstream outputs and an output prefix.

    Writes artifacts then manifest.json (last) under --output. Rerunning the same command skips a completed
    run with the same config and inputs, and resumes an interrupted one from its latest checkpoint."""
    run_stage_command(stage, config, set_, input_, output, force, restart)


@stage_app.command("list")
def stage_list(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List installed stages, their config kinds and inputs (read from their schemas: no stage code imported)."""
    from interiorfusion_core.config import stage_specs
    from interiorfusion_core.registry import stage_names

    specs = stage_specs()
    rows = {
        name: {"config_kind": spec.config_kind, "inputs": dict(spec.inputs), "optional": dict(spec.optional_inputs),
               "description": spec.description}
        for name in stage_names() if (spec := specs.get(name)) is not None
    }
    if as_json:
        console.print_json(json.dumps(rows))
        return
    for name, row in rows.items():
        ins = ", ".join(f"{k}←{v}" for k, v in row["inputs"].items()) or "-"
        console.print(f"[bold]{name:10}[/] kind={row['config_kind']:14} inputs: {ins}  {row['description']}")


class _NoUserErrorTracebacks(logging.Filter):
    """Prefect logs every failed task/flow with its traceback; a user error (bad config, missing input) is one
    sentence, printed once at the end, so drop the traceback from those records."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, UserError):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_user_errors() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine"):
        logging.getLogger(name).addFilter(_NoUserErrorTracebacks())


def embedded_defaults() -> None:
    """With no servers configured, Prefect runs on a temporary local API whose state lives in the project's state
    dir; its start-up can take well over Prefect's 20 s default on a fresh machine, so allow more."""
    from interiorfusion_core.state import state_dir

    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(state_dir() / "prefect"))
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


@pipeline_app.command("run")
@user_errors
def pipeline_run(
    config: Annotated[Path, typer.Option("--config", "-c", help="Pipeline YAML (see configs/pipeline.yaml).")],
    only: Annotated[
        str | None, typer.Option("--only", help="Rerun just this stage against the latest run's upstream outputs.")
    ] = None,
    from_stage: Annotated[
        str | None, typer.Option("--from", help="Run this stage and everything after it.")
    ] = None,
    force: Annotated[
        list[str] | None, typer.Option("--force", help="Rerun this stage even if cached. Repeatable.")
    ] = None,
    upstream_run: Annotated[
        str | None, typer.Option("--upstream-run", help="With --only/--from: take upstream outputs from this run id.")
    ] = None,
) -> None:
    """Run the pipeline; unchanged stages are found in the cache and skipped."""
    if only and from_stage:
        raise UserError("use either --only or --from, not both")
    embedded_defaults()
    quiet_user_errors()
    from interiorfusion_core.tracking import tracking_uri, ui_path
    from interiorfusion_flows.pipeline import interiorfusion_pipeline, load_pipeline

    load_pipeline(config)  # validate the whole graph before Prefect starts, so a bad config fails in a second
    record = interiorfusion_pipeline(
        str(config), only=only, from_stage=from_stage, force=list(force or []), upstream_run=upstream_run
    )
    console.print(f"\n[bold]pipeline {record['pipeline']}[/] run {record['run_id']}")
    for name, uri in record["stages"].items():
        t = record["timings"].get(name)
        note = "from an earlier run" if t is None else ("cached" if t["cached"] else f"ran in {t['seconds']:.1f} s")
        console.print(f"  {name:10} {note:22} {uri}/manifest.json", markup=False)
    uri = tracking_uri()
    page = ui_path(_experiment_of(record.get("mlflow_parent_run_id"))) if record.get("mlflow_parent_run_id") else ""
    if uri.startswith("sqlite:"):
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        console.print(f"\nMLflow UI: {mlflow_bin} ui --backend-store-uri {uri}", markup=False)
        if page:
            console.print(f"  then open http://127.0.0.1:5000/{page}", markup=False)
    else:
        console.print(f"\nMLflow: {uri.rstrip('/')}/{page}", markup=False)


def _experiment_of(run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    from interiorfusion_core.tracking import tracking_uri

    return MlflowClient(tracking_uri=tracking_uri()).get_run(run_id).info.experiment_id


@app.command("plan")
@user_errors
def plan(
    config: Annotated[Path, typer.Argument(help="Stage config YAML.")],
    gpus: Annotated[int | None, typer.Option("--gpus", help="GPUs (default: the config's training.num_gpus).")] = None,
    gpu: Annotated[str, typer.Option("--gpu", help="a100-40gb, a100-80gb, h100-80gb, h200, rtx-4090, l40s.")] = (
        "a100-80gb"),
    price_per_hour: Annotated[
        float | None, typer.Option("--price-per-hour", help="USD per GPU-hour (default: the catalogue's).")
    ] = None,
    mfu: Annotated[float, typer.Option("--mfu", help="Model FLOPs utilisation assumed for step time.")] = 0.4,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    tokens_from: Annotated[str | None, typer.Option(
        "--tokens-from", help="Tokens per sample measured on this data (e.g. a VAE output URI: its latents' token "
        "counts per resolution) instead of the model's estimate, where the model supports it.")] = None,
) -> None:
    """Estimate parameters, memory per GPU (ZeRO-0/1/2/3, with and without activation checkpointing), FLOPs,
    step time, wall days and cost of a config, beside the seed's hardware table."""
    from interiorfusion_core.engine.planner import plan_command

    plan_command(config, gpus=gpus, gpu=gpu, price_per_hour=price_per_hour, mfu=mfu, overrides=tuple(set_ or ()),
                 as_json=as_json, tokens_from=tokens_from)


@app.command("view")
@user_errors
def view(
    uri: Annotated[str, typer.Argument(help="A stage output, a .glb, a viewer .html or a pipeline run (its folder "
                                            "pipelines/<name> or a runs/<id>.json record); path, file:// or s3://.")],
    stage: Annotated[str | None, typer.Option("--stage", help="With a pipeline run: the stage instance to show "
                                                             "(default: the last one with a viewer).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Which of the output's viewers/<name>.html "
                                                           "(default: the one its manifest names).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the page here (a .html path or a "
                                                                       "folder) instead of opening a browser.")] = None,
) -> None:
    """Open the interactive 3D viewer of URI in the local browser (or write it to --output; on a machine without
    a display it is written to ./<name>.html)."""
    from interiorfusion_flows.view import find_page, show

    found = find_page(uri, stage=stage, name=name)
    path, opened = show(found, output)
    size = path.stat().st_size / 2**20
    console.print(f"{'opened' if opened else 'wrote'} {path} ({size:.1f} MB)", markup=False)
    others = [c for c in found.choices if c != found.name and not found.name.endswith(c)]
    if others:
        console.print(f"  also here: {', '.join(others)}", markup=False)


def _mount_plugins() -> None:
    for ep in entry_points(group="interiorfusion.cli"):
        app.add_typer(ep.load(), name=ep.name)


_mount_plugins()


def main() -> None:
    app()
