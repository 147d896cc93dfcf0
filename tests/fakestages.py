"""Tiny real stages for contract and pipeline tests: `echo` writes its text, `upper` reads it from its input."""

from __future__ import annotations

import os
from typing import ClassVar

from interiorfusion_core.config.base import StageConfig, Strict
from interiorfusion_core.contract import Stage, StageContext, StageResult
from interiorfusion_core.errors import UserError
from interiorfusion_core.registry import register_stage


class EchoSection(Strict):
    text: str = "hello"
    size_mb: int = 0
    fail: bool = False


class EchoConfig(StageConfig):
    kind: str | None = "echo"
    echo: EchoSection = EchoSection()


@register_stage
class EchoStage(Stage):
    """Writes its text (and optionally a big blob); downstream `upper` reads it."""

    name = "echo"
    config_kind = "echo"
    config_model = EchoConfig
    calls: ClassVar[int] = 0

    def run(self, ctx: StageContext) -> StageResult:
        EchoStage.calls += 1
        cfg = ctx.config.echo
        ctx.output.put_bytes("text.txt", cfg.text.encode())
        if cfg.size_mb:
            blob = ctx.work_dir / "blob.bin"
            blob.write_bytes(os.urandom(cfg.size_mb << 20))
            ctx.output.put_file("blob.bin", blob)
        if cfg.fail:
            raise UserError("echo was told to fail")
        ctx.tracker.log_metrics({"length": len(cfg.text)}, step=1)
        return StageResult(metrics={"length": float(len(cfg.text))}, outputs={"text": "text.txt"})


class UpperConfig(StageConfig):
    kind: str | None = "upper"


@register_stage
class UpperStage(Stage):
    name = "upper"
    config_kind = "upper"
    config_model = UpperConfig
    inputs: ClassVar[dict[str, str]] = {"source": "echo"}

    def run(self, ctx: StageContext) -> StageResult:
        text = ctx.inputs["source"].read_bytes("text.txt").decode()
        ctx.output.put_bytes("upper.txt", text.upper().encode())
        return StageResult(outputs={"text": "upper.txt"})


class LinkConfig(StageConfig):
    kind: str | None = "link"


@register_stage
class LinkStage(Stage):
    """Chains to another `link` instance (optional input): lets pipeline tests build cycles and fan-outs."""

    name = "link"
    config_kind = "link"
    config_model = LinkConfig
    optional_inputs: ClassVar[dict[str, str]] = {"prev": "link"}

    def run(self, ctx: StageContext) -> StageResult:
        ctx.output.put_bytes("link.txt", b"link")
        return StageResult()


class CountConfig(StageConfig):
    kind: str | None = "count"


@register_stage
class CountStage(Stage):
    """Reads a data stage's dataset.json and counts its samples: a cheap consumer of real scene shards."""

    name = "count"
    config_kind = "count"
    config_model = CountConfig
    inputs: ClassVar[dict[str, str]] = {"data": "data"}

    def run(self, ctx: StageContext) -> StageResult:
        import json

        dataset = json.loads(ctx.inputs["data"].read_bytes("dataset.json"))
        total = sum(int(s.get("num_samples", 0)) for s in dataset.get("splits", {}).values())
        ctx.output.put_bytes("count.txt", str(total).encode())
        return StageResult(metrics={"samples": float(total)})
