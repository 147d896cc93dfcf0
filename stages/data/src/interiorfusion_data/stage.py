"""The data stage: build the scene dataset (procedural or imported) as shards + dataset.json + preview, and the
first scenes as a 3D viewer page (viewers/scenes.html, docs/viewer.md)."""

from __future__ import annotations

import logging
from typing import Any

from interiorfusion_core.contract import Stage, StageContext, StageResult
from interiorfusion_data.config import DataStageConfig
from interiorfusion_data.pipeline import SPLITS, ShardPlan, write_dataset

log = logging.getLogger("interiorfusion_data")


class DataStage(Stage):
    config_model = DataStageConfig  # name, kind and inputs: DataStageConfig.stage

    def run(self, ctx: StageContext) -> StageResult:
        cfg: DataStageConfig = ctx.config
        if not ctx.is_main:
            # One writer: scene building parallelises over `num_workers` processes, not over launcher ranks.
            return StageResult()
        step = {"n": 0}

        def on_shard(plan: ShardPlan, idx: dict[str, Any], stats: dict[str, float]) -> None:
            n = max(len(idx["samples"]), 1)
            step["n"] += len(idx["samples"])
            metrics = {f"shard/{k}": v / n for k, v in stats.items()}
            metrics["progress/samples"] = float(step["n"])
            ctx.tracker.log_metrics(metrics, step=step["n"])
            log.info("wrote %s (%d samples)", plan.key, len(idx["samples"]))

        summary = write_dataset(ctx.output, cfg, ctx.work_dir, resumed=ctx.resumed, on_shard=on_shard)
        ctx.tracker.log_metrics(summary.metrics, step=step["n"])
        outputs = {s: s for s in SPLITS if summary.dataset["splits"][s]["shards"]}
        outputs["dataset"] = "dataset.json"
        if cfg.preview_samples:
            from interiorfusion_data.loader import open_dataset
            from interiorfusion_data.preview import contact_sheet, png

            split = next((s for s in SPLITS if summary.dataset["splits"][s]["num_samples"]), "train")
            ds = open_dataset(ctx.output.inner, split, require_manifest=False)
            samples = [ds.get(i) for i in range(min(cfg.preview_samples, len(ds)))]
            data = png(contact_sheet(samples))
            ctx.output.put_bytes("preview.png", data)
            ctx.tracker.log_image(data, "data_preview.png")
            outputs["preview"] = "preview.png"
            from interiorfusion_data.viewer import publish_scenes, sample_pane

            # The first two scenes in 3D (a page stays a few MB: each scene is about 0.5 MB inlined).
            panes = [sample_pane(s, f"{split} · {s['key']}") for s in samples[:2]]
            viewer = publish_scenes(ctx, "scenes", panes, title=f"data · ground truth ({split})")
            if viewer:
                outputs["viewer"] = viewer
        return StageResult(metrics=summary.metrics, outputs=outputs)
