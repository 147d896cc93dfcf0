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
from interiorfusion_data.scene import CLASSES
from interiorfusion_vae.config import VAEPretrainConfig
from interiorfusion_vae.losses import UNKNOWN_CLASS
from interiorfusion_vae.model import DecoderOutput, SLATInteriorVAE, child_targets, lookup_rows
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


MATERIAL_NAMES = ("albedo_r", "albedo_g", "albedo_b", "metallic", "roughness")
FSCORE_TAUS = (1, 2)  # voxels


def class_prior(data_uri: str, resolution: int, samples: int = 16) -> int:
    """The most frequent labelled class over the first training samples (the semantic baseline's prediction)."""
    dataset = open_dataset(data_uri, "train")
    counts = np.zeros(len(CLASSES), np.int64)
    for i in range(min(len(dataset), samples)):
        s = dataset.get(i, resolution, fields=("voxels",))
        if "labels" in s and s.get("present", {}).get("voxel_labels", True):
            counts += np.bincount(np.asarray(s["labels"], np.int64), minlength=len(CLASSES))[: len(CLASSES)]
    counts[UNKNOWN_CLASS] = 0
    return int(counts.argmax())


def surface_scores(pred: np.ndarray, truth: np.ndarray, voxel_size: float) -> dict[str, float]:
    """F-score at τ = 1 and 2 voxels and the Chamfer distance (metres) between two voxel-centre sets (voxel units
    in, [P, 3] and [T, 3]). Chamfer: the mean of the two directions' mean Euclidean nearest-neighbour distances.
    F-score: precision = share of predicted points within τ of the truth, recall the converse, F = 2PR/(P+R)."""
    from scipy.spatial import cKDTree

    if len(pred) == 0 or len(truth) == 0:
        return {f"fscore_{t}vox": 0.0 for t in FSCORE_TAUS}
    d_pred = cKDTree(truth).query(pred, k=1)[0]
    d_true = cKDTree(pred).query(truth, k=1)[0]
    out = {"chamfer_m": float(0.5 * (d_pred.mean() + d_true.mean()) * voxel_size)}
    for t in FSCORE_TAUS:
        p, r = float((d_pred <= t + 1e-6).mean()), float((d_true <= t + 1e-6).mean())
        out[f"fscore_{t}vox"] = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return out


def _pr(pred: int, true: int, hit: int) -> dict[str, float]:
    p, r = hit / max(pred, 1), hit / max(true, 1)
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r > 0 else 0.0}


def pruning_levels(model: SLATInteriorVAE, enc: dict[str, Any], free: DecoderOutput, truth: SparseTensor
                   ) -> dict[str, dict[str, float]]:
    """Per upsampling, named by its children's resolution: precision/recall/F1 of the children kept by a free
    decode (against the true children), by the heads on the true parents (teacher-forced: the upper bound of a
    free decode), and by an oracle that keeps all 8 children of the true parents (recall 1; beaten by any head
    that prunes well)."""
    structure = enc["structure"]
    forced = model.decode(enc["mu"], structure)  # type: ignore[arg-type]
    n_up = len(structure)
    out: dict[str, dict[str, float]] = {}
    for k in range(n_up):
        last = k == n_up - 1
        true_children = truth.coords if last else structure[k + 1][0]
        if last:
            kept = free.voxels.coords[free.occupancy_logits > 0]
        else:
            kept = free.parents[k + 1].coords
        hit = int((lookup_rows(kept, true_children) >= 0).sum())
        free_pr = _pr(len(kept), len(true_children), hit)
        coords, mask = structure[k]
        target = child_targets(forced.parents[k], coords, mask)
        logits = forced.occupancy_logits.reshape(-1, 8) if last else forced.child_logits[k]
        predicted = logits > 0
        forced_pr = _pr(int(predicted.sum()), int(target.sum()), int((predicted & target).sum()))
        oracle_pr = _pr(8 * len(coords), int(mask.sum()), int(mask.sum()))
        name = f"r{truth.spatial_shape[0] // 2 ** (n_up - 1 - k)}"
        out[name] = {**{f"free_{m}": v for m, v in free_pr.items()},
                     **{f"forced_{m}": v for m, v in forced_pr.items()},
                     **{f"oracle_{m}": v for m, v in oracle_pr.items()}}
    return out


@torch.no_grad()
def evaluate_samples(model: SLATInteriorVAE, data_uri: str, config: VAEPretrainConfig, resolution: int,
                     indices: list[int], prior: torch.Tensor, device: torch.device | str = "cpu",
                     majority_class: int | None = None) -> list[dict[str, Any]]:
    """One record per held-out sample in `indices`: its free-decode scores and each baseline's, on the same voxels.

    - occupancy IoU, F-score@1/2 voxels, Chamfer (m): free decode vs truth; baseline: every fine voxel of the
      occupied latent cells (what the latent coordinates alone give);
    - material L1 per channel (albedo RGB, metallic, roughness) on the matched voxels (decoded ∩ true), and the
      training set's mean material on exactly those voxels; samples without measured materials are skipped;
    - normals on the matched voxels: 1 − cos (signed) and 1 − |cos| (sign-free);
    - semantic accuracy on the matched voxels of labelled samples, and the training set's majority class there;
    - pruning per level (see `pruning_levels`).
    """
    held = open_dataset(data_uri, config.encode.eval_split)
    prior = prior.to(device)
    comp = config.model.compression
    records = []
    for i in indices:
        sample = held.get(i, resolution, fields=("voxels",))
        batch = scene_batch(sample, device)
        occ, material = sparse_batch(batch)
        enc = model.encode(occ, material)
        out = model.decode(enc["mu"])  # type: ignore[arg-type]
        keep = out.occupancy_logits > 0
        pred_coords = out.voxels.coords[keep]
        rows = lookup_rows(pred_coords, occ.coords)
        inter = int((rows >= 0).sum())
        truth_np = occ.coords[:, 1:].cpu().numpy()
        coarse = torch.unique(occ.coords[:, 1:] // comp, dim=0)
        fill = (coarse[:, None, :] * comp + _cell_offsets(comp, coarse.device)[None]).reshape(-1, 3)
        voxel_size = float(sample["voxel_size"])
        record: dict[str, Any] = {
            "index": i, "key": sample["key"], "voxels": len(occ), "decoded": len(pred_coords),
            "occupancy_iou": inter / max(len(pred_coords) + len(occ) - inter, 1),
            "baseline_occupancy_iou": len(occ) / max(len(fill), 1),
        }
        record |= surface_scores(pred_coords[:, 1:].cpu().numpy(), truth_np, voxel_size)
        record |= {f"baseline_{k}": v for k, v in surface_scores(fill.cpu().numpy(), truth_np, voxel_size).items()}
        matched = rows >= 0
        hit, true_rows = out.material[keep][matched], rows[matched]
        has_materials = bool(sample.get("present", {}).get("materials", True))
        if inter and has_materials:
            true_mat = material[true_rows]
            err = (hit[:, :5] - true_mat[:, :5]).abs().mean(0)
            base = (prior[None, :5] - true_mat[:, :5]).abs().mean(0)
            record["material_l1"] = float(err.mean())
            record["baseline_material_l1"] = float(base.mean())
            for j, name in enumerate(MATERIAL_NAMES):
                record[f"material_l1_{name}"] = float(err[j])
                record[f"baseline_material_l1_{name}"] = float(base[j])
        record["has_materials"] = has_materials
        if inter:
            cos = torch.nn.functional.cosine_similarity(hit[:, 5:8], material[true_rows, 5:8], dim=1)
            record["normal_error_signed"] = float((1 - cos).mean())
            record["normal_error_unsigned"] = float((1 - cos.abs()).mean())
        labelled = "labels" in batch and bool(sample.get("present", {}).get("voxel_labels", True))
        if inter and labelled and out.class_logits is not None:
            true_cls = batch["labels"][true_rows]
            known = true_cls != UNKNOWN_CLASS
            if bool(known.any()):
                pred_cls = out.class_logits[keep][matched].argmax(1)
                record["semantic_accuracy"] = float((pred_cls[known] == true_cls[known]).float().mean())
                if majority_class is not None:
                    record["baseline_semantic_accuracy"] = float((true_cls[known] == majority_class).float().mean())
        record["pruning"] = pruning_levels(model, enc, out, occ)
        records.append(record)
    return records


def _cell_offsets(comp: int, device: torch.device | str) -> torch.Tensor:
    r = torch.arange(comp, device=device)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)


def summarize(records: list[dict[str, Any]], config: VAEPretrainConfig, resolution: int) -> dict[str, Any]:
    """The eval.json report: the mean of each metric over the samples that have it (flat names, as logged), the
    pruning table per level, and the per-sample records."""
    records = sorted(records, key=lambda r: r["index"])
    names = sorted({k for r in records for k, v in r.items()
                    if isinstance(v, float) and k not in ("index",)})
    metrics = {k: float(np.mean([r[k] for r in records if k in r])) for k in names}
    levels: dict[str, dict[str, float]] = {}
    for level in sorted({lv for r in records for lv in r.get("pruning", {})}, key=lambda s: int(s[1:])):
        values = [r["pruning"][level] for r in records if level in r.get("pruning", {})]
        levels[level] = {m: float(np.mean([v[m] for v in values])) for m in values[0]}
        metrics |= {f"pruning_{level}_{m}": v for m, v in levels[level].items()}
    metrics["samples_without_materials"] = float(sum(1 for r in records if not r.get("has_materials", True)))
    return {"split": config.encode.eval_split, "resolution": resolution, "samples": len(records),
            "metrics": metrics, "pruning": levels, "per_sample": records}


def _colorize(depth: np.ndarray, lo: float, hi: float) -> np.ndarray:
    from matplotlib import colormaps

    norm = np.clip((depth - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = (colormaps["viridis"](norm)[..., :3] * 255).astype(np.uint8)
    rgb[depth <= 0] = 0
    return rgb


@torch.no_grad()
def reconstruction_panes(model: SLATInteriorVAE, data_uri: str, config: VAEPretrainConfig, resolution: int,
                         device: torch.device | str = "cpu", index: int = 0) -> list[Any]:
    """Viewer panes (interiorfusion_data.viewer) of held-out scene `index`: the input | its free decode (the
    decoded classes where the model has a semantic head, else the true class of the nearest input voxel)."""
    from scipy.spatial import cKDTree

    from interiorfusion_data.viewer import sample_camera, scene_pane

    held = open_dataset(data_uri, config.encode.eval_split)
    sample = held.get(index, resolution, fields=("voxels", "views"))
    batch = scene_batch(sample, device)
    occ, material = sparse_batch(batch)
    out = model.decode(model.encode(occ, material)["mu"])
    keep = out.occupancy_logits > 0
    coords = out.voxels.coords[keep][:, 1:].cpu().numpy()
    if out.class_logits is not None:
        classes = out.class_logits[keep].argmax(-1).cpu().numpy()
    else:
        nearest = cKDTree(sample["coords"]).query(coords, k=1)[1] if len(coords) else np.zeros(0, np.int64)
        classes = np.asarray(sample["labels"])[nearest]
    cam = sample_camera(sample, 0)
    truth = scene_pane("input", sample["coords"], sample["labels"], sample["origin"], float(sample["voxel_size"]),
                       materials=sample["feats"], camera=cam, metrics={"voxels": len(sample["coords"])})
    if not len(coords):
        return [truth]
    decoded = scene_pane("free decode", coords, classes, sample["origin"], float(sample["voxel_size"]),
                         materials=out.material[keep].float().cpu().numpy(), camera=cam,
                         metrics={"voxels": len(coords)})
    return [truth, decoded]


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
