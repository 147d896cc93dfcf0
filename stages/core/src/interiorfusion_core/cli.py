"""Command-line pieces that live in core so every stage image can run itself without the flows package:
`python -m interiorfusion_<stage> --config F --input NAME=URI --output URI` is `interiorfusion stage run`."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from interiorfusion_core.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
console = Console(highlight=False, soft_wrap=True)


def user_errors(fn: F) -> F:
    """Turn a UserError into one line on stderr and its exit code; never a traceback for user errors."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            err_console.print(str(exc), markup=False)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def parse_inputs(items: list[str]) -> dict[str, str]:
    inputs: dict[str, str] = {}
    for item in items:
        name, sep, uri = item.partition("=")
        if not sep or not name or not uri:
            raise UserError(f"--input {item}: expected NAME=URI, e.g. --input data=s3://bucket/runs/data")
        inputs[name] = uri
    return inputs


ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Stage config YAML.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value: a.b.c=value (YAML-parsed). Repeatable."),
]
InputOpt = Annotated[
    list[str] | None,
    typer.Option("--input", "-i", help="An upstream stage output: NAME=URI (s3://… or file://…). Repeatable."),
]
OutputOpt = Annotated[str, typer.Option("--output", "-o", help="Output prefix URI (s3://… or file://… or a path).")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Run even if the output holds a completed run (replaces it).")
]
RestartOpt = Annotated[
    bool, typer.Option("--restart", help="Discard an interrupted run under the output instead of resuming it.")
]


def run_stage_command(
    stage: str, config: Path, set_: list[str] | None, input_: list[str] | None, output: str, force: bool, restart: bool
) -> None:
    from interiorfusion_core.contract import run_stage

    outcome = run_stage(
        stage, config, inputs=parse_inputs(input_ or []), output=output, overrides=tuple(set_ or ()),
        force=force, restart=restart,
    )
    if outcome.skipped:
        console.print(f"[bold]{stage}[/]: cached — {outcome.uri} already holds this run (use --force to rerun)")
    else:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(outcome.manifest.metrics.items())[:8])
        console.print(f"[bold]{stage}[/]: done → {outcome.uri}/manifest.json  {metrics}")


def module_main(stage: str) -> None:
    """Entry point of `python -m interiorfusion_<stage>` (container images)."""
    app = typer.Typer(
        add_completion=False, help=f"Run the '{stage}' stage (same as `interiorfusion stage run {stage}`)."
    )

    @app.command()
    @user_errors
    def main(
        config: ConfigOpt, output: OutputOpt, set_: SetOpt = None, input_: InputOpt = None,
        force: ForceOpt = False, restart: RestartOpt = False,
    ) -> None:
        run_stage_command(stage, config, set_, input_, output, force, restart)

    app(prog_name=f"python -m interiorfusion_{stage}", args=sys.argv[1:])
