"""Held-out evaluation of a trained VAE: per-sample reconstruction records and their summary, and the preview.

`evaluate_samples` scores one rank's share of the held-out samples; `summarize` reduces the records of every
rank into the report written as eval.json.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from interiorfusion_core.sparse import SparseTensor
from interiorfusion_data.loader import collate_scenes, open_dataset
from interiorfusion_vae.config import VAEPretrainConfig
from interiorfusion_vae.model import SLATInteriorVAE, lookup_rows
from interiorfusion_vae.render import soft_render
from interiorfusion_vae.task import sparse_batch


def scene_batch(sample: dict[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """One decoded sample as a collated batch of one, its tensors on `device`."""
    batch = collate_scenes([sample])
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def reconstruct(model: SLATInteriorVAE, batch: dict[str, Any]) -> tuple[SparseTensor, torch.Tensor, torch.Tensor,
                                                                       SparseTensor]:
    """Encode, then decode freely (pruning by the heads' own logits): → (pred voxels, material, logits, truth)."""
    occ, material = sparse_batch(batch)
    enc = model.encode(occ, material)
    out = model.decode(enc["mu"])
    keep = out.occupancy_logits > 0
    pred = SparseTensor(out.voxels.coords[keep], out.material[keep], occ.spatial_shape, batch_size=occ.batch_size)
    return pred, out.material[keep], out.occupancy_logits, occ


@torch.no_grad()
def evaluate_samples(model: SLATInteriorVAE, data_uri: str, config: VAEPretrainConfig, resolution: int,
                     indices: list[int], prior: torch.Tensor, device: torch.device | str = "cpu"
                     ) -> list[dict[str, Any]]:
    """One record per held-out sample in `indices`: its free-decode scores and the baselines' on the same data."""
    held = open_dataset(data_uri, config.encode.eval_split)
    prior = prior.to(device)
    records = []
    for i in indices:
        sample = held.get(i, resolution, fields=("voxels",))
        batch = scene_batch(sample, device)
        pred, pred_mat, _, truth = reconstruct(model, batch)
        rows = lookup_rows(pred.coords, truth.coords)
        inter = int((rows >= 0).sum())
        union = len(pred) + len(truth) - inter
        coarse = torch.unique(truth.coords[:, 1:] // config.model.compression, dim=0)
        record: dict[str, Any] = {
            "index": i, "key": sample["key"],
            "occupancy_iou": inter / max(union, 1),
            "baseline_occupancy_iou": len(truth) / (len(coarse) * config.model.compression**3),
        }
        true_mat = batch["feats"]
        if inter:
            hit, match = pred_mat[rows >= 0], true_mat[rows[rows >= 0]]
            record["material_l1"] = float((hit[:, :5] - match[:, :5]).abs().mean())
            cos = torch.nn.functional.cosine_similarity(hit[:, 5:8], match[:, 5:8], dim=1)
            record["normal_cosine_error"] = float((1 - cos).mean())
        record["baseline_material_l1"] = float((prior[None, :5] - true_mat[:, :5]).abs().mean())
        records.append(record)
    return records


def summarize(records: list[dict[str, Any]], config: VAEPretrainConfig, resolution: int) -> dict[str, Any]:
    """The eval.json report: the mean of each metric over the samples that have it."""
    records = sorted(records, key=lambda r: r["index"])

    def mean(name: str, missing: float) -> float:
        values = [r[name] for r in records if name in r]
        return float(np.mean(values)) if values else missing

    metrics = {
        "occupancy_iou": mean("occupancy_iou", 0.0),
        "baseline_occupancy_iou": mean("baseline_occupancy_iou", 0.0),
        "material_l1": mean("material_l1", 1.0),
        "baseline_material_l1": mean("baseline_material_l1", 1.0),
        "normal_cosine_error": mean("normal_cosine_error", 1.0),
    }
    return {"split": config.encode.eval_split, "resolution": resolution, "samples": len(records),
            "metrics": metrics, "per_sample": records}


def _colorize(depth: np.ndarray, lo: float, hi: float) -> np.ndarray:
    from matplotlib import colormaps

    norm = np.clip((depth - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = (colormaps["viridis"](norm)[..., :3] * 255).astype(np.uint8)
    rgb[depth <= 0] = 0
    return rgb


@torch.no_grad()
def preview(model: SLATInteriorVAE, data_uri: str, config: VAEPretrainConfig, resolution: int,
            device: torch.device | str = "cpu") -> bytes:
    """True depth | depth of the decoded surface, for the first views of a held-out scene (PNG bytes)."""
    from PIL import Image

    from interiorfusion_vae.losses import voxel_centres

    held = open_dataset(data_uri, config.encode.eval_split)
    sample = held.get(0, resolution, fields=("voxels", "views"))
    batch = scene_batch(sample, device)
    pred, _, _, _ = reconstruct(model, batch)
    centres = voxel_centres(pred.coords, batch["origin"].double(), batch["voxel_size"].double()).float()
    rows = []
    for v in range(min(batch["depth"].shape[1], 2)):
        true = batch["depth"][0, v].cpu().numpy()
        h, w = true.shape
        r = soft_render(centres, torch.ones(len(centres), device=centres.device), batch["intrinsics"][0, v],
                        batch["cam_to_world"][0, v], h, w, float(batch["voxel_size"][0]))
        lo, hi = float(true[true > 0].min(initial=0)), float(true.max())
        rows.append(np.concatenate([_colorize(true, lo, hi), _colorize(r.depth.cpu().numpy(), lo, hi)], axis=1))
    img = Image.fromarray(np.concatenate(rows, axis=0)).resize((rows[0].shape[1] * 4, len(rows) * rows[0].shape[0] * 4),
                                                               Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
