"""The VAE's losses, weighted by the config's `loss:` section.

    reconstruction      L1 on shape (occupancy probability of every decoded candidate vs the truth) + L1 on
                        material (albedo, metallic, roughness, normal of the true voxels)
    kl_divergence       KL(q(z|x) ‖ N(0, I)); the seed sums it, which makes its weight depend on scene size and
                        batch, so `kl_reduction: mean` (per latent element, the default) or `sum` (per sample,
                        the seed's formula) is a config choice
    depth_consistency   L1 between the decoded surface's soft-rendered depth and the sample's true depth
    normal_consistency  1 − |cos| between rendered decoded normals (rotated into the camera frame) and the view's
                        normal map (camera frame, flipped towards the camera, hence the sign-free cosine)
    edge_preservation   L1 between Sobel edge maps of rendered and true depth (in the seed's config, missing
                        from its code)
    pruning             BCE of every early-pruning head against the encoder's own subdivision, on the true
                        parents and on the heads' own false proposals (their targets: no children)
    semantic            cross-entropy of the geometry branch's class logits on the decoded true voxels of samples
                        with labels (class "unknown" ignored)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from interiorfusion_core.sparse import SparseTensor
from interiorfusion_data.scene import CLASSES
from interiorfusion_vae.model import DecoderOutput, child_targets, lookup_rows
from interiorfusion_vae.render import geometry_dtype, sobel_edges, soft_render


@dataclass
class VAETargets:
    """The true scene, aligned to what the decoder produced."""

    occupancy: torch.Tensor  # [V] float: is each decoded candidate voxel a true surface voxel?
    material_rows: torch.Tensor  # [V] row of each candidate in the true voxels (-1: not a true voxel)


def align_targets(out: DecoderOutput, truth: SparseTensor) -> VAETargets:
    rows = lookup_rows(out.voxels.coords, truth.coords)
    return VAETargets((rows >= 0).to(out.occupancy_logits.dtype), rows)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, batch_index: torch.Tensor, batch_size: int,
                  reduction: str) -> torch.Tensor:
    per_elem = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    if reduction == "mean":
        return per_elem.mean()
    per_sample = torch.zeros(batch_size, dtype=per_elem.dtype, device=per_elem.device)
    per_sample.index_add_(0, batch_index, per_elem.sum(1))
    return per_sample.mean()


def pruning_bce(out: DecoderOutput, structure: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean BCE over every pruning head except the last (the last one's targets are the occupancy itself,
    which the reconstruction term covers)."""
    terms = []
    for parents, logits, (truth_coords, truth_mask) in zip(out.parents[:-1], out.child_logits[:-1], structure[:-1],
                                                          strict=True):
        target = child_targets(parents, truth_coords, truth_mask).to(logits.dtype)
        terms.append(F.binary_cross_entropy_with_logits(logits, target))
    return torch.stack(terms).mean() if terms else out.occupancy_logits.sum() * 0


UNKNOWN_CLASS = CLASSES.index("unknown")


def semantic_ce(out: DecoderOutput, targets: VAETargets, batch: dict[str, Any]) -> torch.Tensor | None:
    """Cross-entropy of the class logits on decoded voxels that are true voxels of labelled samples; None when the
    model has no class head or the batch no labels."""
    if out.class_logits is None or "labels" not in batch:
        return None
    hit = targets.material_rows >= 0
    rows = targets.material_rows[hit]
    labels = batch["labels"].to(rows.device)[rows].clone()
    has_labels = batch.get("has_labels")
    if has_labels is not None:
        labelled = torch.as_tensor(has_labels, dtype=torch.bool, device=rows.device)
        labels[~labelled[out.voxels.coords[hit, 0].long()]] = UNKNOWN_CLASS
    if not bool((labels != UNKNOWN_CLASS).any()):
        return out.class_logits.sum() * 0
    return F.cross_entropy(out.class_logits[hit].float(), labels, ignore_index=UNKNOWN_CLASS)


def voxel_centres(coords: torch.Tensor, origin: torch.Tensor, voxel_size: torch.Tensor) -> torch.Tensor:
    """World positions of [b, x, y, z] voxel centres given each sample's grid origin (B, 3) and size (B,).

    Computed in float64 and returned in float32 (float64 for float64 inputs), never in the training dtype: near
    5 m bf16 values are 3.1 cm apart (three voxels of a 1024³ grid over 10.24 m), float32 values 0.5 µm."""
    b = coords[:, 0].long()
    centres = origin[b].double() + (coords[:, 1:].double() + 0.5) * voxel_size[b, None].double()
    return centres.to(geometry_dtype(origin, voxel_size))


def distance(pred: torch.Tensor, target: torch.Tensor, kind: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-element distance: `l1` (absolute) or `mse` (squared), as a loss term's `type:` asks; with `mask`
    (same shape, bool) the mean over the masked-in elements only."""
    diff = pred - target
    err = diff.abs() if kind == "l1" else diff.square()
    if mask is None:
        return err.mean()
    return (err * mask).sum() / mask.sum().clamp_min(1)


# Channels of the 8 per-voxel material features that real scans do not measure (albedo RGB, metallic, roughness);
# their normals (5:8) come from the reconstructed mesh and stay supervised.
PBR_CHANNELS = slice(0, 5)


def render_terms(out: DecoderOutput, batch: dict[str, Any], max_views: int, depth_type: str = "l1",
                 edge_type: str = "l1") -> dict[str, torch.Tensor]:
    """Depth, normal and edge consistency of the decoded surface against every (up to max_views) view; depth and
    edge terms use the configured distance (l1 or mse).

    Everything here runs in float32 (float64 for float64 inputs) with autocast off, whatever the model's dtype:
    centres, projections, true depth and its Sobel edges are metric quantities that bf16 rounds to centimetres.
    The terms come out in float32; gradients flow back into the bf16 logits and normals through the casts."""
    with torch.autocast(out.occupancy_logits.device.type, enabled=False):
        return _render_terms(out, batch, max_views, depth_type, edge_type,
                             geometry_dtype(out.occupancy_logits, batch["origin"]))


def _render_terms(out: DecoderOutput, batch: dict[str, Any], max_views: int, depth_type: str, edge_type: str,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    probs = torch.sigmoid(out.occupancy_logits.to(dtype))
    centres = voxel_centres(out.voxels.coords, batch["origin"], batch["voxel_size"]).to(dtype)
    normals = out.material[:, 5:8].to(dtype)
    depth_l, normal_l, edge_l = [], [], []
    b_index = out.voxels.coords[:, 0]
    depth_true_all = batch["depth"]
    for b in range(depth_true_all.shape[0]):
        sel = b_index == b
        for v in range(min(depth_true_all.shape[1], max_views)):
            true_depth = depth_true_all[b, v].to(dtype)
            h, w = true_depth.shape
            r = soft_render(centres[sel], probs[sel], batch["intrinsics"][b, v], batch["cam_to_world"][b, v], h, w,
                            float(batch["voxel_size"][b]), features=normals[sel])
            valid = true_depth > 0
            if not bool(valid.any()):
                continue
            depth_l.append(distance(r.depth[valid], true_depth[valid], depth_type))
            # The views' normal maps are in the camera frame and flipped to face the camera; voxel normals are
            # world-frame with the mesh's orientation. Rotate into the camera frame and compare up to sign.
            true_n = batch["normal"][b, v].to(dtype).permute(1, 2, 0)
            # Only pixels with a true normal: a captured frame's depth can see what the mesh lacks (normal 0).
            seen = valid & (r.alpha > 0.5) & (true_n.abs().sum(dim=-1) > 0)
            if bool(seen.any()):
                rot = batch["cam_to_world"][b, v][:3, :3].to(dtype)
                cos = F.cosine_similarity(r.features[seen] @ rot, true_n[seen], dim=-1, eps=1e-6)
                normal_l.append(1 - cos.abs().mean())
            edge_l.append(distance(sobel_edges(r.depth * valid)[valid], sobel_edges(true_depth * valid)[valid],
                                   edge_type))
    zero = probs.sum() * 0
    mean = lambda xs: torch.stack(xs).mean() if xs else zero  # noqa: E731
    return {"depth": mean(depth_l), "normal": mean(normal_l), "edge": mean(edge_l)}


def vae_losses(
    enc: dict[str, Any],
    out: DecoderOutput,
    truth: SparseTensor,
    true_material: torch.Tensor,
    batch: dict[str, Any],
    loss_cfg: Any,
    kl_reduction: str,
    render_views: int,
) -> dict[str, torch.Tensor]:
    targets = align_targets(out, truth)
    recon = loss_cfg.reconstruction.type
    # Logged as shape_l1 / material_l1 whatever the type (the held-out report compares L1 with its baselines).
    shape_l1 = distance(torch.sigmoid(out.occupancy_logits), targets.occupancy, recon)
    hit = targets.material_rows >= 0
    rows = targets.material_rows[hit]
    mask, skipped = None, None
    has_materials = batch.get("has_materials")
    if has_materials is not None:
        # Samples without measured materials (real scans) are not trained towards filler albedo/metallic/roughness.
        has_materials = torch.as_tensor(has_materials, dtype=torch.bool, device=rows.device)
        keep = has_materials[truth.coords[rows, 0].long()]
        mask = torch.ones(len(rows), true_material.shape[1], dtype=torch.bool, device=rows.device)
        mask[~keep, PBR_CHANNELS] = False
        skipped = (~has_materials).sum().float()
    material_l1 = distance(out.material[hit], true_material[rows], recon, mask)
    mu, logvar = enc["mu"], enc["logvar"]
    kl = kl_divergence(mu.feats, logvar.feats, mu.coords[:, 0].long(), mu.batch_size, kl_reduction)
    prune = pruning_bce(out, enc["structure"])
    semantic = semantic_ce(out, targets, batch)
    # BCE on the final occupancy too: L1 alone has vanishing gradients for confident mistakes.
    occ_bce = F.binary_cross_entropy_with_logits(out.occupancy_logits, targets.occupancy)
    terms = {
        "reconstruction": shape_l1 + material_l1,
        "kl_divergence": kl,
        "pruning": prune + occ_bce,
    }
    if semantic is not None and loss_cfg.semantic.weight > 0:
        terms["semantic"] = semantic
    if render_views > 0 and "depth" in batch:
        rendered = render_terms(out, batch, render_views, loss_cfg.depth_consistency.type,
                                loss_cfg.edge_preservation.type)
        terms |= {"depth_consistency": rendered["depth"], "normal_consistency": rendered["normal"],
                  "edge_preservation": rendered["edge"]}
    total = sum(getattr(loss_cfg, name).weight * value for name, value in terms.items())
    extra = {"samples_without_materials": skipped} if skipped is not None else {}
    return {"loss": total, **terms, "shape_l1": shape_l1.detach(), "material_l1": material_l1.detach(), **extra}
