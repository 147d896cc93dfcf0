"""`interiorfusion eval`: the evaluate stage on any checkpoints. The structure source may be a structure, LoRA or
GRPO output, a pipeline run record (…/runs/<id>.json) or a pipeline prefix (its latest run); the stage inputs are
derived from it (a tuned output's own structure run becomes input `structure`), and a pipeline's material stage is
used unless --material or --untextured says otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from interiorfusion_core.cli import console, user_errors
from interiorfusion_core.errors import UserError

app = typer.Typer(help="Score trained checkpoints on a held-out split against the seed's validation targets.",
                  invoke_without_command=True, no_args_is_help=True)

DEFAULT_CONFIG = Path("configs/evaluate.yaml")


def stage_inputs(structure: str, material: str | None, data: str | None, untextured: bool) -> dict[str, str]:
    """The evaluate stage's inputs from what a user has (see the module docstring)."""
    from interiorfusion_core.manifest import read_manifest
    from interiorfusion_core.storage import open_store
    from interiorfusion_material.generate import resolve_stage_uri

    tuned = resolve_stage_uri(structure, "structure")
    if tuned is None:
        raise UserError(f"{structure}: has no structure stage output to evaluate")
    inputs: dict[str, str] = {}
    uri = tuned
    # Walk a tuned output down to its structure run: grpo → (lora →) structure.
    while True:
        manifest = read_manifest(open_store(uri))
        if manifest.stage == "structure":
            inputs["structure"] = uri
            break
        if manifest.stage not in ("lora", "grpo"):
            raise UserError(f"{uri}: is an output of stage '{manifest.stage}', not of a structure, lora or grpo stage")
        inputs.setdefault(manifest.stage, uri)
        below = manifest.inputs.get("structure") or manifest.inputs.get("lora")
        if below is None:
            raise UserError(f"{uri}: this {manifest.stage} run names no structure input")
        uri = below.uri
    found = material or (None if untextured else resolve_stage_uri(structure, "material"))
    if found is not None and not untextured:
        inputs["material"] = resolve_stage_uri(found, "material") or found
    if data is not None:
        inputs["data"] = data
    return inputs


@app.callback()
@user_errors
def evaluate(
    structure: Annotated[str, typer.Option("--structure", help="A structure, LoRA or GRPO stage output, a pipeline "
                                           "run record (…/runs/<id>.json) or a pipeline prefix (its latest run).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output prefix URI (s3://…, file://… or a path).")],
    material: Annotated[str | None, typer.Option("--material", help="A material stage output (textures the "
                                                 "generated scenes; default: the pipeline's, if any).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="The held-out data (default: the data the structure "
                                             "run's latents were encoded from).")] = None,
    split: Annotated[str | None, typer.Option("--split", help="Held-out split (default: the config's).")] = None,
    samples: Annotated[int | None, typer.Option("--samples", help="At most this many scenes.")] = None,
    config: Annotated[Path, typer.Option("--config", "-c", help="Evaluate config YAML.")] = DEFAULT_CONFIG,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config value: a.b=value.")
                    ] = None,
    untextured: Annotated[bool, typer.Option(help="Ignore a pipeline's material stage (class colours).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a completed run under --output.")] = False,
) -> None:
    """Generate held-out scenes with the given checkpoints and write metrics.json and report.md under OUTPUT."""
    from interiorfusion_core.contract import run_stage

    overrides = list(set_ or [])
    if split is not None:
        overrides.append(f"split={split}")
    if samples is not None:
        overrides.append(f"samples={samples}")
    inputs = stage_inputs(structure, material, data, untextured)
    outcome = run_stage("evaluate", config, inputs=inputs, output=output, overrides=tuple(overrides), force=force)
    state = "cached" if outcome.skipped else "done"
    console.print(f"[bold]evaluate[/]: {state} → {outcome.uri}/report.md")
    shown = {k: v for k, v in sorted(outcome.manifest.metrics.items()) if k.startswith("eval_")}
    if shown:
        console.print(", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
