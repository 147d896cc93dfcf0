"""The pipeline config (`kind: pipeline`): a graph of named stage instances.

    stages:
      synthetic: {stage: data, config: data.yaml}
      real_scans: {stage: data, config: scans.yaml}
      vae: {config: vae.yaml, inputs: {data: synthetic}}

An instance's `stage` defaults to its name (so `vae: {config: vae.yaml}` is the vae stage) and each of the stage's
inputs defaults to the one instance of the stage that produces it; when there are several, `inputs:` must say
which. Unknown instances, inputs of the wrong stage and cycles are errors at load, before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from interiorfusion_core.config.base import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    StageConfig,
    StageSpec,
    Strict,
)
from interiorfusion_core.config.kinds import broken_stage_note, stage_specs
from interiorfusion_core.config.yamlio import did_you_mean
from interiorfusion_core.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# Canonical stage order: instances with no dependency between them run in this order, then by name.
PIPELINE_ORDER = ("data", "vae", "structure", "material", "lora", "grpo", "evaluate")


class PipelineStageEntry(Strict):
    """One stage instance of a pipeline and how it runs."""

    # The stage this instance runs (default: the instance's name).
    stage: str | None = Field(default=None, pattern=NAME_PATTERN)
    config: str
    # Input name → the instance whose output feeds it (default: the one instance of the producing stage).
    inputs: dict[str, str] = Field(default_factory=dict)
    enabled: bool = True
    executor: Literal["inprocess", "subprocess", "docker", "kubernetes"] = "inprocess"
    # `--set` overrides applied on top of the stage config.
    set: list[str] = Field(default_factory=list)
    # subprocess: processes for `accelerate launch` (1 = plain `python -m`), and its launcher config.
    num_processes: PositiveInt = 1
    accelerate_config: str | None = None
    # docker/kubernetes: the stage image (default interiorfusion/<stage>:latest) and GPUs to request.
    image: str | None = None
    gpus: NonNegativeInt = 0
    # Retries for infrastructure faults (never for user errors such as a bad config).
    retries: NonNegativeInt = Field(default=2, le=20)
    retry_delay_seconds: NonNegativeFloat = 10.0


class PipelineConfig(StageConfig):
    kind: Literal["pipeline"] | None = None
    signature: ClassVar[tuple[str, ...]] = ("stages",)
    name: str = Field(default="default", pattern=NAME_PATTERN)
    # Where stage outputs go; default `$INTERIORFUSION_ARTIFACT_ROOT` or the local state dir.
    artifact_root: str | None = None
    experiment: str = "interiorfusion"
    stages: dict[str, PipelineStageEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _instance_names(self) -> PipelineConfig:
        import re

        for name in self.stages:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"stages.{name}: an instance name is letters, digits, '.', '_' or '-'")
        return self

    def stage_of(self, instance: str) -> str:
        return self.stages[instance].stage or instance

    def enabled(self) -> list[str]:
        return [n for n, e in self.stages.items() if e.enabled]


class PipelineGraph:
    """The resolved graph: each enabled instance's stage spec and its input wiring, in a topological order."""

    def __init__(self, cfg: PipelineConfig, specs: dict[str, StageSpec], where: str):
        self.cfg = cfg
        self.specs: dict[str, StageSpec] = {}
        self.inputs: dict[str, dict[str, str]] = {}
        enabled = cfg.enabled()
        for name in enabled:
            stage = cfg.stage_of(name)
            if stage not in specs:
                raise ValueError(
                    f"{where}: stages.{name}: stage '{stage}' is not installed{did_you_mean(stage, specs)} "
                    f"(installed: {', '.join(sorted(specs)) or 'none'}){broken_stage_note()}"
                )
            self.specs[name] = specs[stage]
        for name in enabled:
            self.inputs[name] = self._wire(name, enabled, where)
        self.order = self._topological(enabled, where)

    def _wire(self, name: str, enabled: list[str], where: str) -> dict[str, str]:
        spec, entry = self.specs[name], self.cfg.stages[name]
        wired: dict[str, str] = {}
        for inp, upstream in entry.inputs.items():
            at = f"{where}: stages.{name}.inputs.{inp}"
            if inp not in spec.all_inputs:
                raise ValueError(f"{at}: stage '{spec.name}' takes no input '{inp}' (its inputs: "
                                 f"{', '.join(spec.all_inputs) or 'none'})")
            if upstream not in self.cfg.stages:
                raise ValueError(f"{at}: no instance named '{upstream}' in this pipeline "
                                 f"(instances: {', '.join(self.cfg.stages)})")
            if upstream not in enabled:
                raise ValueError(f"{at}: instance '{upstream}' is disabled (enabled: false)")
            got, want = self.specs[upstream].name, spec.all_inputs[inp]
            if got != want:
                raise ValueError(f"{at}: '{upstream}' is a '{got}' instance, but input '{inp}' of stage "
                                 f"'{spec.name}' needs a '{want}' output")
            wired[inp] = upstream
        for inp, want in spec.all_inputs.items():
            if inp in wired:
                continue
            producers = [n for n in enabled if self.specs[n].name == want and n != name]
            if len(producers) == 1:
                wired[inp] = producers[0]
            elif len(producers) > 1:
                raise ValueError(f"{where}: stages.{name}.inputs: input '{inp}' could come from any of "
                                 f"{', '.join(producers)}; say which with inputs: {{{inp}: <instance>}}")
            elif inp in spec.inputs:
                raise ValueError(f"{where}: stages.{name}: stage '{spec.name}' needs input '{inp}' from a '{want}' "
                                 "instance, and this pipeline has none enabled")
        return wired

    def _topological(self, enabled: list[str], where: str) -> list[str]:
        rank = {s: i for i, s in enumerate(PIPELINE_ORDER)}
        written = {n: i for i, n in enumerate(self.cfg.stages)}

        def key(n: str) -> tuple[int, int]:  # independent instances: pipeline stage order, then as written
            return rank.get(self.specs[n].name, len(rank)), written[n]

        done: list[str] = []
        state: dict[str, int] = {}  # 1 = on the current path, 2 = finished

        def visit(n: str, path: list[str]) -> None:
            if state.get(n) == 2:
                return
            if state.get(n) == 1:
                cycle = [*path[path.index(n):], n]
                raise ValueError(f"{where}: stages: the inputs form a cycle: {' → '.join(cycle)}")
            state[n] = 1
            for up in sorted(set(self.inputs[n].values()), key=key):
                visit(up, [*path, n])
            state[n] = 2
            done.append(n)

        for n in sorted(enabled, key=key):
            visit(n, [])
        return done

    def upstream_of(self, name: str) -> set[str]:
        seen: set[str] = set()
        todo = list(self.inputs[name].values())
        while todo:
            u = todo.pop()
            if u not in seen:
                seen.add(u)
                todo += self.inputs[u].values()
        return seen

    def downstream_of(self, name: str) -> set[str]:
        return {n for n in self.order if name in self.upstream_of(n)}


def pipeline_graph(cfg: PipelineConfig, where: str = "pipeline") -> PipelineGraph:
    """Resolve and check the instance graph against the installed stages (no stage code imported)."""
    try:
        return PipelineGraph(cfg, stage_specs(), where)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _relative_to(pipeline_path: str | Path, config: str) -> Path:
    """Stage configs are named relative to the pipeline file (or the working directory, if found there)."""
    p = Path(config)
    if p.is_absolute() or p.exists():
        return p
    return Path(pipeline_path).parent / p


def load_pipeline(path: str | Path) -> tuple[PipelineConfig, PipelineGraph]:
    """The pipeline config with its stage-config paths resolved, its instance graph, and every enabled instance's
    stage config validated as that stage's kind (no torch, no stage code imported)."""
    from interiorfusion_core.config.loader import load_config

    cfg = load_config(path, kind="pipeline").model
    assert isinstance(cfg, PipelineConfig)
    graph = pipeline_graph(cfg, str(path))
    for name in graph.order:
        entry = cfg.stages[name]
        config = str(_relative_to(path, entry.config))
        cfg.stages[name] = entry.model_copy(update={"config": config})
        load_config(config, tuple(entry.set), graph.specs[name].config_kind)
    return cfg, graph


__all__ = ["PIPELINE_ORDER", "PipelineConfig", "PipelineGraph", "PipelineStageEntry", "load_pipeline",
           "pipeline_graph"]
