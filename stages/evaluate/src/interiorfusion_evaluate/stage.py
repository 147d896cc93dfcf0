"""Stage 5: generate held-out scenes from their condition views and score the seed's eight validation metrics.

For each held-out sample (its view 0 is the condition): stage 2 generates the geometry (the merged weights of a
`grpo` / `lora` input when given, the most tuned first), stage 3 textures it when a `material` input is given; the
scene is scored against the sample's truth beside two reference points computed the same way:

- `vae`: the frozen VAE's reconstruction of the truth (its stored latents, which the VAE encoded from the truth,
  decoded): an upper bound, since it sees the answer.
- `baseline`: `nearest` (the training scene whose condition image is nearest) or `mean` (the training set's most
  frequently occupied voxels), both placed in the held-out scene's frame, as stage 2's own eval.json does.

Images: the prediction and the truth are rendered through the same voxel splatter from the held-out cameras, so a
difference is the voxels' and not the renderer's (the stored RGB views come from meshes: a perfect voxel scene
would not reach them). With a material input every scene is shaded (`shade_torch`) by its materials under the
sample's stored lights, the truth by its stored materials; without one every scene shows its class colours.

Outputs: metrics.json (per-scene records, the means, the config of the comparison), report.md (the table against
the seed's targets), previews/{best,median,worst}-<key>.png by generation F-score, and the same scenes in 3D:
viewers/{best,median,worst}-<key>.html (generation | ground truth, docs/viewer.md).
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interiorfusion_core.contract import Stage, StageContext, StageInput, StageResult
from interiorfusion_core.errors import UserError
from interiorfusion_data.viewer import batch_camera, publish_scenes, scene_pane
from interiorfusion_evaluate.config import EvaluateConfig
from interiorfusion_evaluate.metrics import (
    METRIC_NAMES,
    TARGETS,
    Instance,
    lpips_distance,
    mean_average_precision,
    passes,
    psnr,
    sample_surface_points,
    scene_instances,
    scene_layout_iou,
    scene_scale_error,
    ssim,
    surface_metrics,
)
from interiorfusion_structure.conditions import retrieval_feature
from interiorfusion_structure.generate import STRUCTURE_SOURCES, GeneratedScene, Generator

log = logging.getLogger("interiorfusion_evaluate")

METHODS = ("generation", "vae", "baseline")
# MLflow prefix per method: eval/<metric> for generation, eval_vae/ and eval_baseline/ for the reference points.
TRACK_PREFIX = {"generation": "eval", "vae": "eval_vae", "baseline": "eval_baseline"}
IMAGE_METRICS = ("lpips", "psnr", "ssim")
MAP_IOU = 0.25  # the seed's mAP is mAP@0.25 (docs/metrics.md)


@dataclass
class Scored:
    """One method's prediction of one held-out scene: geometry and classes, materials when shaded."""

    scene: GeneratedScene
    materials: np.ndarray | None = None


class EvaluateStage(Stage):
    config_model = EvaluateConfig  # name, kind and inputs: EvaluateConfig.stage

    def run(self, ctx: StageContext) -> StageResult:
        cfg: EvaluateConfig = ctx.config
        if not ctx.is_main:  # one process scores; nothing here is worth sharding over ranks
            return StageResult()
        from interiorfusion_material.perceptual import build_lpips, check_lpips_weights

        check_lpips_weights(cfg.lpips_weights, cfg.lpips_network)  # one sentence before any model is built
        started = time.perf_counter()
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        source = structure_source(ctx)
        gen = load_generator_for(source, device, ctx.work_dir)
        latents_uri = ctx.inputs["structure"].manifest.inputs["latents"].uri
        data_uri = ctx.inputs["data"].uri if "data" in ctx.inputs else None
        held, split, notes = open_held_out(latents_uri, cfg, gen.resolution, data_uri)
        material = load_material(ctx, latents_uri, device)
        with torch.random.fork_rng(devices=[]):  # a random-init backbone (smoke) is then the same every run
            torch.manual_seed(cfg.seed)
            lpips_net = build_lpips(cfg.lpips_weights, cfg.lpips_network).to(device)
        baseline = (None if cfg.baseline == "none" else
                    Baseline(cfg, latents_uri, gen, data_uri))
        if material is None:
            notes.append("no material input: every scene (generated, reference and truth) is rendered with its class "
                         "colours, unshaded, so the image metrics score geometry and classes, not materials")
        evaluator = Evaluator(cfg, gen, held, material, lpips_net, baseline, latents_uri)
        records = evaluator.run()
        if evaluator.view_note:
            notes.append(evaluator.view_note)
        summary = summarize(records, evaluator.instances)
        report = {
            "format": "interiorfusion.evaluation/1", "split": split, "samples": len(records),
            "resolution": gen.resolution, "structure": source.uri, "structure_stage": source.manifest.stage,
            "material": ctx.inputs["material"].uri if material is not None else None,
            "shaded": material is not None, "views": cfg.views, "baseline": cfg.baseline,
            "points": cfg.points, "fscore_tau": cfg.fscore_tau, "notes": notes,
            "lpips_calibrated": not cfg.lpips_weights.random_init,
            "metrics": summary, "targets": {k: {"threshold": t.threshold, "higher_is_better": t.higher_is_better,
                                                "unit": t.unit} for k, t in TARGETS.items()},
            "records": records, "seconds": time.perf_counter() - started,
        }
        previews, viewers = write_previews(ctx, evaluator, records)
        markdown = report_markdown(report, previews, viewers)
        ctx.output.put_json("metrics.json", report)
        ctx.output.put_bytes("report.md", markdown.encode())
        for method in METHODS:
            values = {f"{TRACK_PREFIX[method]}/{k}": v for k, v in summary.get(method, {}).items() if _finite(v)}
            ctx.tracker.log_metrics(values, step=0)
        ctx.tracker.log_dict(report, "metrics.json")
        ctx.tracker.log_artifact(_write(ctx.work_dir / "report.md", markdown))
        result = {f"{TRACK_PREFIX[m]}_{k}": float(v) for m in METHODS for k, v in summary.get(m, {}).items()
                  if _finite(v)}
        outputs = {"metrics": "metrics.json", "report": "report.md", **{f"viewer_{k}": v for k, v in viewers.items()}}
        return StageResult(metrics=result, outputs=outputs)


# ------------------------------------------------------------------------------------------------ inputs
def structure_source(ctx: StageContext) -> StageInput:
    """The most tuned structure weights among the inputs (grpo > lora > structure, as generation picks them); a
    tuned input must have been tuned from the given structure run."""
    base = ctx.inputs["structure"]
    for stage in STRUCTURE_SOURCES:
        given = ctx.inputs.get(stage)
        if given is None or stage == "structure":
            continue
        own = _base_structure(given, ctx)
        if own is not None and own != base.manifest.digest:
            raise UserError(f"{given.uri}: this {stage} run tuned another structure run than input 'structure' "
                            f"({base.uri}); pass the structure run it was tuned from")
        return given
    return base


def _base_structure(given: StageInput, ctx: StageContext) -> str | None:
    """The digest of the structure run a lora/grpo output was tuned from (GRPO after LoRA: the LoRA's base)."""
    if "structure" in given.manifest.inputs:
        return given.manifest.inputs["structure"].digest
    lora = ctx.inputs.get("lora")
    if lora is not None and "lora" in given.manifest.inputs:
        return _base_structure(lora, ctx)
    return None


def load_generator_for(source: StageInput, device: str, work_dir: Path) -> Generator:
    from interiorfusion_structure.generate import load_generator

    return load_generator(source.uri, device, work_dir)


def open_held_out(latents_uri: str, cfg: EvaluateConfig, resolution: int, data_uri: str | None
                  ) -> tuple[Any, str, list[str]]:
    """The held-out split's latents joined with their data (StructureData), the split used, notes for the report.
    An empty `split` falls back to `fallback_split`; an unknown one, or no sample in either, is one sentence."""
    from interiorfusion_structure.task import StructureData

    notes: list[str] = []
    held = _open_split(latents_uri, cfg.split, resolution, data_uri)
    split = cfg.split
    if len(held) == 0 and cfg.fallback_split and cfg.fallback_split != cfg.split:
        fallback = _open_split(latents_uri, cfg.fallback_split, resolution, data_uri)
        if len(fallback):
            notes.append(f"split '{cfg.split}' holds no sample: scored split '{cfg.fallback_split}' instead")
            held, split = fallback, cfg.fallback_split
    if len(held) == 0:
        raise UserError(f"{latents_uri}: split '{split}' holds no sample to evaluate (set split: to a split with "
                        "samples)")
    assert isinstance(held, StructureData)
    return held, split, notes


def _open_split(latents_uri: str, split: str, resolution: int, data_uri: str | None) -> Any:
    from interiorfusion_structure.task import StructureData

    try:
        return StructureData(latents_uri, split, resolution, data_uri)
    except UserError as exc:
        raise UserError(f"evaluate: cannot open held-out split '{split}' of the structure run's latents "
                        f"({exc})") from None


def load_material(ctx: StageContext, latents_uri: str, device: str) -> Any:
    """The material generator of input `material`, which must sample on the structure run's latents."""
    given = ctx.inputs.get("material")
    if given is None:
        return None
    own = given.manifest.inputs["latents"].uri
    if own != latents_uri:
        raise UserError(f"{given.uri}: this material run was trained on the latents {own}, the structure run on "
                        f"{latents_uri}; evaluate stages of one pipeline")
    from interiorfusion_material.generate import load_material_generator

    return load_material_generator(given.uri, device, ctx.work_dir)


# ------------------------------------------------------------------------------------------------ truth
def truth_scene(sample: Mapping[str, Any], frame: Any, resolution: int) -> Scored:
    """A data sample's voxels (at the structure's resolution) with their classes and stored materials, in the
    latents' frame."""
    coords = np.asarray(sample["coords"], np.int64)
    labels = sample.get("labels")
    classes = np.zeros(len(coords), np.int64) if labels is None else np.asarray(labels, np.int64)
    scene = GeneratedScene(np.zeros((0, 3), np.int64), coords, classes, resolution,
                           np.asarray(frame.origin, np.float64), float(frame.cube_size))
    return Scored(scene, np.asarray(sample["feats"], np.float64))


def eval_views(num_views: int, which: str) -> tuple[list[int], str | None]:
    """The stored views the image metrics render: every view but the condition view 0, unless there is only one."""
    if which == "all":
        return list(range(num_views)), None
    if num_views <= 1:
        return [0], "samples store one view: the image metrics render the condition view 0 itself"
    return list(range(1, num_views)), None


# ------------------------------------------------------------------------------------------------ baselines
class Baseline:
    """The trivial predictions: `nearest` retrieves the training scene whose condition image is nearest by the
    frozen image encoder's mean token (the downsampled image when the config has none), as stage 2's Baselines;
    `mean` is the training set's most frequently occupied voxels (as many as a training scene has on average), each
    with its most frequent class and mean material. Both are placed in the held-out scene's frame."""

    def __init__(self, cfg: EvaluateConfig, latents_uri: str, gen: Generator, data_uri: str | None):
        from interiorfusion_structure.task import StructureData, batch_to_device

        self.kind, self.gen = cfg.baseline, gen
        N = self.resolution = gen.resolution
        train = StructureData(latents_uri, "train", N, data_uri)
        n = len(train) if cfg.baseline_samples == 0 else min(len(train), cfg.baseline_samples)
        if n == 0:
            raise UserError(f"{latents_uri}: the training split is empty: no baseline to compare with (set "
                            "baseline: none)")
        self.scenes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        feats = []
        for i in range(n):
            s = train.data.get(int(train.latents.refs[i].index), N, fields=("voxels",))
            labels = s.get("labels")
            coords = np.asarray(s["coords"], np.int64)
            self.scenes.append((coords, np.zeros(len(coords), np.int64) if labels is None
                                else np.asarray(labels, np.int64), np.asarray(s["feats"], np.float64)))
            if self.kind == "nearest":
                batch = batch_to_device(train.collate([train.sample(i)]), gen.device)
                feats.append(retrieval_feature(gen.frozen, batch, 0))
        self.features = torch.stack(feats) if feats else None
        if self.kind == "mean":
            self._mean_scene()

    def _mean_scene(self) -> None:
        N = self.resolution
        flat = np.concatenate([np.ravel_multi_index(tuple(c.T), (N,) * 3) for c, _, _ in self.scenes])
        classes = np.concatenate([k for _, k, _ in self.scenes])
        mats = np.concatenate([m for _, _, m in self.scenes])
        cells, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
        size = int(np.mean([len(c) for c, _, _ in self.scenes]))
        keep = np.argsort(-counts, kind="stable")[:size]
        # Per kept voxel: its most frequent class (a joint (cell, class) count) and its mean material.
        n_cls = int(classes.max()) + 1 if len(classes) else 1
        joint = np.zeros((len(cells), n_cls), np.int64)
        np.add.at(joint, (inverse, classes), 1)
        mean_mat = np.zeros((len(cells), mats.shape[1]))
        np.add.at(mean_mat, inverse, mats)
        mean_mat /= counts[:, None]
        self.mean = (np.stack(np.unravel_index(cells[keep], (N,) * 3), 1).astype(np.int64), joint[keep].argmax(1),
                     mean_mat[keep])

    def predict(self, batch: Mapping[str, Any], b: int, truth: GeneratedScene) -> Scored:
        if self.kind == "mean":
            coords, classes, mats = self.mean
        else:
            assert self.features is not None
            best = int((self.features @ retrieval_feature(self.gen.frozen, batch, b)).argmax())
            coords, classes, mats = self.scenes[best]
        return Scored(GeneratedScene(np.zeros((0, 3), np.int64), coords, classes, truth.resolution, truth.origin,
                                     truth.cube_size), mats)


# ------------------------------------------------------------------------------------------------ scoring
class Evaluator:
    """Generates, reconstructs and scores every held-out sample; keeps what the previews and mAP need."""

    def __init__(self, cfg: EvaluateConfig, gen: Generator, held: Any, material: Any, lpips_net: torch.nn.Module,
                 baseline: Baseline | None, latents_uri: str):
        self.cfg, self.gen, self.held, self.material = cfg, gen, held, material
        self.lpips_net, self.baseline, self.latents_uri = lpips_net, baseline, latents_uri
        self.instances: dict[str, tuple[list[list[Instance]], list[list[Instance]]]] = {}
        self.kept: dict[str, dict[str, Any]] = {}  # per key: what a preview needs
        self.view_note: str | None = None

    def run(self) -> list[dict[str, Any]]:
        from rich.progress import track

        from interiorfusion_structure.task import batch_to_device

        held, n = self.held, min(len(self.held), self.cfg.samples)
        records: list[dict[str, Any]] = []
        # One scene per ODE: the sampler draws its noise for the whole batch, so a scene generated beside others
        # would change with `samples` and the split's order; alone it depends on its condition and the seed only.
        step = 1
        for start in track(range(0, n, step), description="evaluate", transient=True):
            chunk = list(range(start, min(start + step, n)))
            batch = batch_to_device(held.collate([held.sample(i) for i in chunk]), self.gen.device)
            preds = self.predictions(batch, chunk)
            for b, i in enumerate(chunk):
                records.append(self.score(i, batch, b, {m: p[b] for m, p in preds.items()}))
        return records

    @torch.no_grad()  # decode_materials keeps the material branch's graph for training; nothing here learns
    def predictions(self, batch: Mapping[str, Any], chunk: Sequence[int]) -> dict[str, list[Scored]]:
        """Per method, one prediction per sample of `batch`."""
        from interiorfusion_structure.generate import decode_scenes, generate_scenes

        gen, N = self.gen, self.gen.resolution
        scenes = generate_scenes(gen, batch)
        out: dict[str, list[Scored]] = {}
        if self.material is not None:
            from interiorfusion_material.generate import texture_scenes

            out["generation"] = [Scored(_as_scene(t, s), t.materials)
                                 for t, s in zip(texture_scenes(self.material, batch, scenes), scenes, strict=True)]
        else:
            out["generation"] = [Scored(s) for s in scenes]
        if self.cfg.reference_vae:
            # The stored latents are the frozen VAE's encoding of the truth: decoding them is its reconstruction.
            recon = decode_scenes(gen.vae, batch["coords"].to(gen.device), batch["num_tokens"],
                                  batch["feats"].to(gen.device).float(), gen.stats[N], gen.compression, N, batch, {})
            out["vae"] = (self.vae_materials(batch, chunk, recon) if self.material is not None
                          else [Scored(s) for s in recon])
        return out

    def vae_materials(self, batch: Mapping[str, Any], chunk: Sequence[int], recon: list[GeneratedScene]
                      ) -> list[Scored]:
        """The VAE's reconstruction with materials: both stored latent halves decoded freely."""
        from interiorfusion_material.task import decode_materials, latent_stats

        gen, N = self.gen, self.gen.resolution
        lat = [self.held.latents[i] for i in chunk]
        if any("material" not in x for x in lat):
            return [Scored(s) for s in recon]
        stats = latent_stats(self.latents_uri, N)
        geo = torch.cat([torch.as_tensor(x["geometry"]) for x in lat]).float()
        mat = torch.cat([torch.as_tensor(x["material"]) for x in lat]).float()
        geo = geo * stats["geometry"][1] + stats["geometry"][0]
        mat = mat * stats["material"][1] + stats["material"][0]
        decoded, mats = decode_materials(gen.vae, batch["coords"], geo, mat, len(lat), N // gen.compression,
                                         gen.compression)
        keep = decoded.occupancy_logits.reshape(-1) > 0
        vox = decoded.voxels.coords[keep].cpu()
        mats = mats[keep].float().cpu().numpy()
        classes = (decoded.class_logits[keep].argmax(-1).cpu() if decoded.class_logits is not None
                   else torch.zeros(int(keep.sum()), dtype=torch.long)).numpy()
        out = []
        for b, s in enumerate(recon):
            rows = (vox[:, 0] == b).numpy()
            out.append(Scored(GeneratedScene(s.cells, vox[rows, 1:].numpy().astype(np.int64), classes[rows],
                                             s.resolution, s.origin, s.cube_size), mats[rows]))
        return out

    def score(self, i: int, batch: Mapping[str, Any], b: int, preds: dict[str, Scored]) -> dict[str, Any]:
        held, N = self.held, self.gen.resolution
        sample = held.data.get(int(held.latents.refs[i].index), N, fields=("voxels", "views"))
        truth = truth_scene(sample, held.latents.frame(i), N)
        if self.baseline is not None:
            preds["baseline"] = self.baseline.predict(batch, b, truth.scene)
        views, note = eval_views(len(sample.get("rgb", [])), self.cfg.views)
        self.view_note = self.view_note or note
        lights = np.asarray(sample.get("lights", np.zeros((0, 4))), np.float64).reshape(-1, 4)
        shaded = self.material is not None
        if shaded and not len(lights):
            lights = _default_lights(truth.scene)
        render = self._renderer(sample, views, lights, shaded)
        truth_images = [render(truth, v) for v in views]
        key = batch["keys"][b]
        record: dict[str, Any] = {"key": key, "index": i, "views": views, "true_voxels": len(truth.scene.voxels)}
        first: dict[str, np.ndarray | None] = {"truth": truth_images[0] if truth_images else None}
        for method, pred in preds.items():
            images = [render(pred, v) for v in views]
            values = self.geometry_metrics(pred.scene, truth.scene)
            values |= {"psnr": _mean(psnr(p, t) for p, t in zip(images, truth_images, strict=True)),
                       "ssim": _mean(ssim(p, t) for p, t in zip(images, truth_images, strict=True)),
                       "lpips": _mean(lpips_distance(p, t, self.lpips_net)
                                      for p, t in zip(images, truth_images, strict=True))}
            pi = scene_instances(pred.scene)
            ti = scene_instances(truth.scene)
            values["map"] = mean_average_precision([pi], [ti], MAP_IOU).map  # this scene alone; the split pools
            preds_, truths_ = self.instances.setdefault(method, ([], []))
            preds_.append(pi)
            truths_.append(ti)
            record[method] = {"voxels": len(pred.scene.voxels), **values}
            first[method] = images[0] if images else None
        self.kept[key] = {"condition": batch["rgb"][b].float().cpu().permute(1, 2, 0).numpy().clip(0, 1),
                          "images": first, "generation": preds["generation"], "truth": truth,
                          "camera": batch_camera(batch, b)}
        return record

    def geometry_metrics(self, pred: GeneratedScene, truth: GeneratedScene) -> dict[str, float]:
        cfg = self.cfg
        if not len(pred.voxels):  # nothing generated: no distance to measure, nothing found, no room
            return {"chamfer": math.nan, "fscore": 0.0, "layout_iou": 0.0, "scale_error": 1.0}
        p = sample_surface_points(pred.points(), cfg.points, np.random.default_rng(cfg.seed))
        t = sample_surface_points(truth.points(), cfg.points, np.random.default_rng(cfg.seed))
        chamfer, f = surface_metrics(p, t, cfg.fscore_tau)
        try:
            layout = scene_layout_iou(pred, truth).iou_3d
            scale = scene_scale_error(pred, truth).error
        except ValueError:  # a truth without a valid floor polygon (e.g. a scan): no room to compare with
            layout, scale = math.nan, math.nan
        return {"chamfer": float(chamfer.distance), "fscore": float(f.fscore), "layout_iou": float(layout),
                "scale_error": float(scale)}

    def _renderer(self, sample: Mapping[str, Any], views: Sequence[int], lights: np.ndarray, shaded: bool
                  ) -> Callable[[Scored, int], np.ndarray]:
        """float (H, W, 3) in [0, 1] of a scene from stored view v: shaded by its materials, or class colours."""
        from interiorfusion_material.export import shaded_image
        from interiorfusion_structure.generate import render_scene

        H, W = np.asarray(sample["rgb"]).shape[1:3]

        def render(s: Scored, v: int) -> np.ndarray:
            K, pose = sample["intrinsics"][v], sample["cam_to_world"][v]
            if shaded and s.materials is not None and len(s.scene.voxels):
                return shaded_image(s.scene.voxels, s.materials, s.scene.origin, s.scene.voxel_size, K, pose, H, W,
                                    lights)
            rgb, _ = render_scene(s.scene, torch.as_tensor(K), torch.as_tensor(pose), H, W)
            return rgb.astype(np.float64) / 255.0

        return render


def _as_scene(textured: Any, geometry: GeneratedScene) -> GeneratedScene:
    return GeneratedScene(geometry.cells, textured.voxels, textured.classes, textured.resolution, textured.origin,
                          textured.cube_size, textured.meta, geometry.latents)


def _default_lights(scene: GeneratedScene) -> np.ndarray:
    from interiorfusion_material.cli import default_lights

    return np.asarray(default_lights(scene), np.float64)


def _mean(values: Any) -> float:
    vals = list(values)
    return float(np.mean(vals)) if vals else math.nan


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def summarize(records: list[dict[str, Any]], instances: Mapping[str, tuple[list[Any], list[Any]]]
              ) -> dict[str, dict[str, float]]:
    """Per method: the mean over scenes of each metric (NaN scenes left out; NaN when none is finite), except mAP,
    which pools every scene's detections (docs/metrics.md)."""
    out: dict[str, dict[str, float]] = {}
    for method in METHODS:
        rows = [r[method] for r in records if method in r]
        if not rows:
            continue
        means = {}
        for name in METRIC_NAMES:
            vals = [float(r[name]) for r in rows if math.isfinite(float(r[name]))]
            means[name] = float(np.mean(vals)) if vals else math.nan
        preds, truths = instances[method]
        means["map"] = float(mean_average_precision(preds, truths, MAP_IOU).map)
        out[method] = means
    return out


# ------------------------------------------------------------------------------------------------ report
def write_previews(ctx: StageContext, ev: Evaluator, records: list[dict[str, Any]]
                   ) -> tuple[dict[str, str], dict[str, str]]:
    """previews/{best,median,worst}-<key>.png by generation F-score: condition | generation | VAE | baseline |
    truth, from the first evaluated view, and viewers/{best,median,worst}-<key>.html (generation | truth in 3D).
    Returns (label → preview key, label → viewer key; no viewer where the JavaScript is not built)."""
    from PIL import Image

    order = sorted(records, key=lambda r: r["generation"]["fscore"], reverse=True)
    picks = {"best": order[0], "median": order[len(order) // 2], "worst": order[-1]}
    out: dict[str, str] = {}
    viewers: dict[str, str] = {}
    for label, rec in picks.items():
        kept = ev.kept[rec["key"]]
        tiles = [kept["condition"]] + [kept["images"].get(m) for m in (*METHODS, "truth")]
        tiles = [t for t in tiles if t is not None]
        side = 160
        sheet = Image.new("RGB", (side * len(tiles), side), "white")
        for j, t in enumerate(tiles):
            img = Image.fromarray((np.clip(t, 0, 1) * 255).astype(np.uint8)).resize((side, side), Image.NEAREST)
            sheet.paste(img, (j * side, 0))
        buf = io.BytesIO()
        sheet.save(buf, format="PNG")
        key = f"previews/{label}-{rec['key']}.png"
        ctx.output.put_bytes(key, buf.getvalue())
        ctx.tracker.log_image(buf.getvalue(), f"evaluate_{label}.png")  # images/evaluate_best.png, ...
        out[label] = key
        viewer = publish_scenes(ctx, f"{label}-{rec['key']}", scored_panes(kept, rec["generation"]),
                                title=f"evaluate · {label} by F-score · {rec['key']}: generation | ground truth")
        if viewer:
            viewers[label] = viewer
    return out, viewers


VIEWER_METRICS = ("fscore", "chamfer", "psnr", "lpips", "map")


def scored_panes(kept: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[Any]:
    """Viewer panes of a kept scene: its generation (with its metrics) | the ground truth."""
    panes = []
    for label, scored, shown in (("generation", kept["generation"], metrics), ("ground truth", kept["truth"], {})):
        scene = scored.scene
        if not len(scene.voxels):
            continue
        values = {k: float(shown[k]) for k in VIEWER_METRICS if _finite(shown.get(k))}
        panes.append(scene_pane(label, scene.voxels, scene.classes, scene.origin, scene.voxel_size,
                                materials=scored.materials, camera=kept["camera"], metrics=values))
    return panes


def _fmt(v: float | None, name: str) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.4f}" if name in ("chamfer", "lpips", "scale_error") else f"{v:.3f}"


def report_markdown(report: Mapping[str, Any], previews: Mapping[str, str],
                    viewers: Mapping[str, str] | None = None) -> str:
    """The validation table: metric | generation | VAE recon | baseline | seed target | pass/fail (generation)."""
    m = report["metrics"]
    lines = [
        "# Validation metrics", "",
        f"Split `{report['split']}`, {report['samples']} scenes at {report['resolution']}³; structure "
        f"({report['structure_stage']}) {report['structure']}; "
        + (f"materials {report['material']}." if report["shaded"] else "no material stage (class colours)."),
        f"Baseline: `{report['baseline']}`. Images: {'shaded' if report['shaded'] else 'class colours'}, "
        f"views `{report['views']}`, the same voxel renderer for prediction and truth.", "",
        "| metric | generation | VAE recon | baseline | seed target | pass |",
        "|---|---|---|---|---|---|",
    ]
    for name in METRIC_NAMES:
        t = TARGETS[name]
        g = m.get("generation", {}).get(name)
        cells = [_fmt(m.get(k, {}).get(name), name) for k in METHODS]
        target = f"{'>' if t.higher_is_better else '<'} {t.threshold:g}{(' ' + t.unit) if t.unit else ''}"
        verdict = "pass" if g is not None and passes(name, g) else "fail"
        if name == "lpips" and not report["lpips_calibrated"]:
            verdict = f"{verdict} (uncalibrated)"  # a random backbone's LPIPS says nothing about the target
        lines.append(f"| {name} | {' | '.join(cells)} | {target} | {verdict} |")
    lines += ["", "Chamfer in m², F-score at τ = "
              f"{report['fscore_tau']:g} m, mAP@{MAP_IOU:g} pooled over scenes, the rest the mean over scenes "
              "(docs/metrics.md, docs/evaluate.md)."]
    if not report["lpips_calibrated"]:
        lines.append("LPIPS uses a random-initialised backbone (lpips_weights.random_init): not comparable with "
                     "published LPIPS.")
    for note in report["notes"]:
        lines.append(f"Note: {note}.")
    lines += ["", "## Previews (condition | generation | VAE recon | baseline | truth)", ""]
    for label, key in previews.items():
        view = f" · [turn it around in 3D]({viewers[label]})" if viewers and label in viewers else ""
        lines.append(f"- {label} F-score: ![{label}]({key}){view}")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


__all__ = ["EvaluateStage", "Evaluator", "open_held_out", "report_markdown", "structure_source", "summarize"]
