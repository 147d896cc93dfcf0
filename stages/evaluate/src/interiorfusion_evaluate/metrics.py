"""The seed's eight validation metrics as pure functions of arrays (docs/metrics.md), plus thin helpers that take a
`GeneratedScene` (stage 2's decoded voxels and classes in the metric frame).

Everything geometric is float64 metres in the shared metric frame (interiorfusion_data.frame: z up, the floor at
a fixed height, the room centred horizontally). No metric aligns, rescales or re-centres a scene: a generated
room that is off by a translation or a scale is scored as off, which is what the scale error is there to show.

    chamfer = chamfer_distance(sample_surface_points(pred_xyz), sample_surface_points(gt_xyz))   # m², both ways
    f = fscore(pred_xyz, gt_xyz, tau=0.1)                                    # precision / recall within 10 cm
    psnr(img, ref), ssim(img, ref), lpips_distance(img, ref, net)            # (H, W, 3) in [0, 1]
    layout_iou(scene_layout(pred), scene_layout(gt)).iou_3d                  # HorizonNet's 2D / 3D room IoU
    mean_average_precision([scene_instances(p)], [scene_instances(g)], 0.25).map
    scene_scale_error(pred, gt).error                                        # |ŝ − 1|
    passes("chamfer", chamfer.distance)                                      # against the seed's target
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import shapely
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from shapely.affinity import affine_transform
from shapely.geometry import MultiPolygon, Polygon
from shapely.ops import unary_union

from interiorfusion_data.classes import SCANNET18_BY_ID
from interiorfusion_data.scene import CLASS_ID, CLASSES, STRUCTURE_CLASSES

if TYPE_CHECKING:
    import torch

    from interiorfusion_structure.generate import GeneratedScene


# ------------------------------------------------------------------------------------------------ targets
@dataclass(frozen=True)
class Target:
    """One seed target: the metric passes when it is strictly beyond `threshold` in its better direction."""

    threshold: float
    higher_is_better: bool
    unit: str
    what: str


# The seed's validation table (seed/TRAINING.md, "Validation Metrics"), in its order.
TARGETS: Mapping[str, Target] = {
    "chamfer": Target(0.01, False, "m²", "symmetric Chamfer distance of surface points"),
    "fscore": Target(0.80, True, "", "F-score of surface points at τ = 0.1 m"),
    "lpips": Target(0.06, False, "", "LPIPS (VGG) of rendered views"),
    "psnr": Target(28.0, True, "dB", "PSNR of rendered views"),
    "ssim": Target(0.90, True, "", "SSIM of rendered views"),
    "layout_iou": Target(0.85, True, "", "3D room IoU (HorizonNet)"),
    "map": Target(0.70, True, "", "3D furniture detection mAP@0.25 (ScanNet-18 classes)"),
    "scale_error": Target(0.05, False, "", "|ŝ − 1|, ŝ = cube root of the room-volume ratio"),
}
METRIC_NAMES: tuple[str, ...] = tuple(TARGETS)


def passes(name: str, value: float) -> bool:
    """Whether `value` of metric `name` meets the seed's target (strictly, as the seed writes `<` / `>`).
    NaN (a metric that could not be computed, e.g. mAP of scenes without objects) never passes."""
    target = TARGETS[name]
    value = float(value)
    if math.isnan(value):
        return False
    return value > target.threshold if target.higher_is_better else value < target.threshold


@dataclass(frozen=True)
class MetricResult:
    """A metric's value with its target, for tables and logs."""

    name: str
    value: float

    @property
    def target(self) -> Target:
        return TARGETS[self.name]

    @property
    def passed(self) -> bool:
        return passes(self.name, self.value)


# ------------------------------------------------------------------------------------------------ surface
# Points per side for Chamfer / F-score, as the scene-generation protocols use (MIDI, SceneGen: 10–20k).
DEFAULT_NUM_POINTS = 10_000
FSCORE_TAU = 0.1  # metres (the seed's "F-Score @ 0.1")


class Chamfer(NamedTuple):
    distance: float  # pred_to_gt + gt_to_pred, m²
    pred_to_gt: float  # mean over predicted points of the squared distance to the nearest truth point
    gt_to_pred: float


class FScore(NamedTuple):
    fscore: float
    precision: float  # share of predicted points within τ of the truth
    recall: float  # share of truth points within τ of the prediction


def _points(points: np.ndarray) -> np.ndarray:
    p = np.asarray(points, np.float64)
    if p.ndim != 2 or p.shape[1] != 3 or len(p) == 0:
        raise ValueError(f"expected a non-empty (N, 3) point array, got shape {p.shape}")
    return p


def sample_surface_points(points: np.ndarray, n: int = DEFAULT_NUM_POINTS,
                          rng: np.random.Generator | int | None = 0) -> np.ndarray:
    """Exactly `n` of `points` (N, 3): a random subset without replacement when N ≥ n; otherwise every point once
    plus n − N drawn with replacement. Deterministic for a seed: the points are first put in lexicographic order,
    so the sample depends on the set of points, not on the order they are stored in (a voxel list that was
    permuted samples the same). Give each side its own generator from the same seed, so identical scenes draw
    identical samples."""
    p = _points(points)
    p = p[np.lexsort(p.T[::-1])]
    gen = np.random.default_rng(rng)
    if len(p) >= n:
        return p[np.sort(gen.choice(len(p), n, replace=False))]
    return np.concatenate([p, p[gen.integers(0, len(p), n - len(p))]])


def nearest_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For every point of `a`, the Euclidean distance (m) to its nearest point of `b`."""
    distance, _ = cKDTree(_points(b)).query(_points(a), k=1)
    return np.asarray(distance, np.float64)


def _chamfer(d_pred: np.ndarray, d_gt: np.ndarray) -> Chamfer:
    a, b = float(np.mean(d_pred**2)), float(np.mean(d_gt**2))
    return Chamfer(a + b, a, b)


def _fscore(d_pred: np.ndarray, d_gt: np.ndarray, tau: float) -> FScore:
    precision, recall = float(np.mean(d_pred < tau)), float(np.mean(d_gt < tau))
    total = precision + recall
    return FScore(2 * precision * recall / total if total > 0 else 0.0, precision, recall)


def chamfer_distance(pred: np.ndarray, gt: np.ndarray) -> Chamfer:
    """Symmetric Chamfer distance (m²): mean squared nearest-neighbour distance from each cloud to the other,
    the two directions summed (MIDI / SceneGen's protocol, without their per-scene alignment). Sample both clouds
    with `sample_surface_points` first for the protocol's fixed point count."""
    return _chamfer(nearest_distances(pred, gt), nearest_distances(gt, pred))


def fscore(pred: np.ndarray, gt: np.ndarray, tau: float = FSCORE_TAU) -> FScore:
    """F-score at distance τ (m) (Tatarchenko et al. 2019): F = 2PR / (P + R), 0 when P + R = 0; distances
    unsquared, "within" strict (d < τ)."""
    return _fscore(nearest_distances(pred, gt), nearest_distances(gt, pred), tau)


def surface_metrics(pred: np.ndarray, gt: np.ndarray, tau: float = FSCORE_TAU) -> tuple[Chamfer, FScore]:
    """Chamfer and F-score from one pair of nearest-neighbour queries."""
    d_pred, d_gt = nearest_distances(pred, gt), nearest_distances(gt, pred)
    return _chamfer(d_pred, d_gt), _fscore(d_pred, d_gt, tau)


# ------------------------------------------------------------------------------------------------ images
# PSNR of identical images is +inf; capped so that a mean over views stays finite. 100 dB is an RMS error of 1e-5,
# far below one 8-bit grey level (every pixel one level off is 48 dB).
PSNR_CAP_DB = 100.0


def _image(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, np.float64)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"{name}: expected an (H, W, 3) image, got shape {a.shape}")
    # Renders and decoders can overshoot [0, 1] by rounding; anything more is a caller's bug, not a colour.
    if a.size and (a.min() < -1e-6 or a.max() > 1 + 1e-6):
        raise ValueError(f"{name}: values must lie in [0, 1], got [{a.min():.4g}, {a.max():.4g}]")
    return np.clip(a, 0.0, 1.0)


def _pair(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray,
                                                                                    np.ndarray | None]:
    p, t = _image(pred, "pred"), _image(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} differ in shape")
    if mask is None:
        return p, t, None
    m = np.asarray(mask, bool)
    if m.shape != p.shape[:2]:
        raise ValueError(f"mask {m.shape} must be the images' (H, W) = {p.shape[:2]}")
    if not m.any():
        raise ValueError("mask selects no pixel")
    return p, t, m


def _nchw(a: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)[None]))


def psnr(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR (dB) of (H, W, 3) images in [0, 1], data range 1: 10·log10(1 / MSE), the MSE over all pixels and
    channels, or over the pixels where `mask` (H, W) is true. Capped at PSNR_CAP_DB (identical images)."""
    # torchmetrics is imported here, not at module import: it pulls in all of its domains (~10 s on a busy CPU),
    # which the geometric metrics do not need.
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio

    p, t, m = _pair(pred, target, mask)
    if m is not None:
        p, t = p[m], t[m]
    value = float(peak_signal_noise_ratio(torch.from_numpy(p), torch.from_numpy(t), data_range=1.0))
    return min(value, PSNR_CAP_DB)


def ssim(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """SSIM of (H, W, 3) images in [0, 1] with torchmetrics' defaults (Gaussian window σ = 1.5, 11 taps, K1 0.01,
    K2 0.03, data range 1; borders reflect-padded, so every pixel has a value). Without a mask: the mean of the
    per-pixel SSIM map over all pixels and channels (torchmetrics' value). With a mask (H, W): the mean of that same
    map over the masked pixels — each masked pixel's window still sees its unmasked neighbours in both images."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    p, t, m = _pair(pred, target, mask)
    value, full = structural_similarity_index_measure(_nchw(p), _nchw(t), data_range=1.0, return_full_image=True)
    if m is None:
        return float(value)
    per_pixel = full[0].mean(dim=0).numpy()  # (H, W): channels averaged, as the unmasked mean does
    return float(per_pixel[m].mean())


def lpips_distance(pred: np.ndarray, target: np.ndarray, net: torch.nn.Module) -> float:
    """LPIPS of (H, W, 3) images in [0, 1] with a caller-built `lpips.LPIPS` module (in eval mode: its dropout
    would otherwise make the value random). Inputs are mapped to [−1, 1] as LPIPS expects; the value is the
    network's spatial average. No mask: LPIPS's deep features see the whole image."""
    import torch

    if net.training:
        raise ValueError("the LPIPS network is in training mode (dropout on); call net.eval() first")
    p, t, _ = _pair(pred, target, None)
    param = next(net.parameters())
    with torch.no_grad():
        x, y = (_nchw(a).to(device=param.device, dtype=param.dtype) * 2 - 1 for a in (p, t))
        return float(net(x, y).mean())


# ------------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class RoomLayout:
    """A room as HorizonNet evaluates it: the floor footprint (x, y metres) extruded from floor to ceiling."""

    polygon: Polygon
    floor_z: float
    ceiling_z: float

    @property
    def height(self) -> float:
        """Floor-to-ceiling height (m); 0 when either is unknown (NaN) or the ceiling is below the floor."""
        h = self.ceiling_z - self.floor_z
        return float(h) if np.isfinite(h) and h > 0 else 0.0

    @property
    def area(self) -> float:
        return float(self.polygon.area) if self.polygon.is_valid else 0.0


class LayoutIoU(NamedTuple):
    iou_2d: float
    iou_3d: float


def _polygon(p: Polygon | np.ndarray | Sequence[Sequence[float]]) -> Polygon:
    return p if isinstance(p, Polygon) else Polygon(np.asarray(p, np.float64))


def polygon_iou(pred: Polygon | np.ndarray, gt: Polygon | np.ndarray) -> float:
    """2D IoU of two floor polygons (HorizonNet eval_general.py): |A ∩ B| / (|A| + |B| − |A ∩ B|). A truth that is
    not a valid polygon is an error (HorizonNet skips it); an invalid or empty prediction scores 0 (its except)."""
    a, b = _polygon(pred), _polygon(gt)
    if b.is_empty or not b.is_valid:
        raise ValueError(f"the truth floor polygon is not a valid polygon ({shapely.is_valid_reason(b)})")
    if a.is_empty or not a.is_valid:
        return 0.0
    inter = a.intersection(b).area
    union = a.area + b.area - inter
    return float(inter / union) if union > 0 else 0.0


def room_iou_3d(pred: RoomLayout, gt: RoomLayout) -> float:
    """3D IoU of two rooms, each its floor polygon extruded between its floor and ceiling heights:
    |A ∩ B|·h∩ / (|A|·h_A + |B|·h_B − |A ∩ B|·h∩), h∩ the overlap of the two height intervals. HorizonNet puts
    both floors at the camera height, so there h∩ = min(h_A, h_B); here floors may differ, hence the overlap."""
    a, b = pred.polygon, gt.polygon
    if b.is_empty or not b.is_valid or gt.height <= 0:
        raise ValueError("the truth room needs a valid floor polygon and a ceiling above its floor")
    if a.is_empty or not a.is_valid or pred.height <= 0:
        return 0.0
    overlap = max(0.0, min(pred.ceiling_z, gt.ceiling_z) - max(pred.floor_z, gt.floor_z))
    inter = a.intersection(b).area * overlap
    union = a.area * pred.height + b.area * gt.height - inter
    return float(inter / union) if union > 0 else 0.0


def layout_iou(pred: RoomLayout, gt: RoomLayout) -> LayoutIoU:
    """Both IoUs; the seed's "Layout IoU" is `iou_3d` (it also scores the room's height)."""
    return LayoutIoU(polygon_iou(pred.polygon, gt.polygon), room_iou_3d(pred, gt))


def _class_ids(names: Iterable[str]) -> np.ndarray:
    return np.asarray([CLASS_ID[n] for n in names], np.int64)


def _footprint_polygon(grid: np.ndarray) -> Polygon:
    """The union of a boolean (X, Y) grid's true cells as unit squares, in cell units: one rectangle per run of
    cells along y, unioned (exact, valid by construction, and ~100× faster than one square per cell)."""
    d = np.diff(grid.astype(np.int8), axis=1, prepend=0, append=0)
    xs, y0 = np.nonzero(d == 1)
    _, y1 = np.nonzero(d == -1)  # row-major order pairs each run's end with its start
    union = unary_union(shapely.box(xs, y0, xs + 1, y1))
    if isinstance(union, MultiPolygon):  # parts touching at a corner only: keep the largest
        union = max(union.geoms, key=lambda g: g.area)
    # The exterior ring only: holes filled (a room's footprint is simple; furniture does not make holes in it).
    return Polygon(union.exterior).simplify(0)  # simplify(0) drops the collinear vertices the runs leave


def floor_polygon_from_voxels(voxels: np.ndarray, classes: np.ndarray, *, origin: np.ndarray, voxel_size: float,
                              floor_classes: Sequence[str] = ("floor",), close: int = 1) -> Polygon:
    """The floor footprint (x, y metres) of a voxel scene: the (i, j) columns holding a floor voxel, rasterised to
    a 2D grid; gaps up to 2·`close` voxels wide bridged (binary closing, 3×3, `close` iterations: a generated
    floor loses voxels, e.g. under an object's outline); the largest 4-connected component kept (stray floor
    voxels elsewhere are not the room); its cells' union as squares, holes filled (a room's footprint is simple:
    furniture does not make holes in it). So the polygon follows voxel faces: exact areas on the voxel grid, within
    a voxel of the floor the voxeliser saw. Chosen over tracing contours (skimage find_contours), which cut every
    corner by half a voxel, give rings with arbitrary orientation and need a separate step for holes. Empty
    polygon when there is no floor voxel."""
    v = np.asarray(voxels, np.int64)
    cols = np.unique(v[np.isin(np.asarray(classes), _class_ids(floor_classes))][:, :2], axis=0)
    if len(cols) == 0:
        return Polygon()
    pad = close + 1  # room for the dilation, so that erosion never meets the grid's edge
    lo = cols.min(0) - pad
    grid = np.zeros(tuple(cols.max(0) - lo + 1 + pad), bool)
    grid[cols[:, 0] - lo[0], cols[:, 1] - lo[1]] = True
    if close > 0:
        grid = ndimage.binary_closing(grid, structure=np.ones((3, 3), bool), iterations=close)
    labels, count = ndimage.label(grid)  # 4-connectivity: cells sharing only a corner do not make one polygon
    if count > 1:
        grid = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    s = float(voxel_size)
    o = np.asarray(origin, np.float64)
    return affine_transform(_footprint_polygon(grid), [s, 0, 0, s, o[0] + lo[0] * s, o[1] + lo[1] * s])


def room_layout_from_voxels(voxels: np.ndarray, classes: np.ndarray, *, origin: np.ndarray, voxel_size: float,
                            close: int = 1) -> RoomLayout:
    """The room of a voxel scene: `floor_polygon_from_voxels`, the floor height = the median z of the floor voxels'
    centres, the ceiling height = the median z of the ceiling voxels' centres, or where the scene has none the
    highest wall voxel centre (a room generated without its ceiling). Medians, so stray voxels do not move them.
    Voxel centres on both: the half-voxel offset from the true surfaces cancels in the height. NaN when absent."""
    v = np.asarray(voxels, np.int64)
    c = np.asarray(classes)
    z = float(origin[2]) + (v[:, 2] + 0.5) * float(voxel_size)
    floor, ceiling, wall = (c == CLASS_ID[n] for n in ("floor", "ceiling", "wall"))
    floor_z = float(np.median(z[floor])) if floor.any() else math.nan
    if ceiling.any():
        ceiling_z = float(np.median(z[ceiling]))
    else:
        ceiling_z = float(z[wall].max()) if wall.any() else math.nan
    polygon = floor_polygon_from_voxels(v, c, origin=origin, voxel_size=voxel_size, close=close)
    return RoomLayout(polygon, floor_z, ceiling_z)


# ------------------------------------------------------------------------------------------------ scale
class ScaleError(NamedTuple):
    error: float  # |ŝ − 1|
    scale: float  # ŝ = (height ratio · area ratio)^(1/3)
    height_ratio: float  # h_pred / h_gt
    area_ratio: float  # floor area pred / gt


def scale_error(pred: RoomLayout, gt: RoomLayout) -> ScaleError:
    """How far the generated room's metric size is from the truth's: ŝ = cube root of the room-volume ratio
    (floor area × floor-to-ceiling height), error = |ŝ − 1|. A room scaled uniformly by s has volume ratio s³, so
    ŝ = s exactly (1.1× → 0.10); ŝ is the geometric mean of the two horizontal and the vertical scale factors.
    Lengths and areas do not depend on where the room is, so the error is translation-invariant: scaling about
    any point gives the same value (scaling about the floor centre is the one that keeps the metric frame's
    floor height and centring). Shape errors that keep the volume are left to the layout IoU. A prediction with
    no room (no floor or no height) has ŝ = 0, error 1."""
    if gt.area <= 0 or gt.height <= 0:
        raise ValueError("the truth room needs a floor polygon with an area and a ceiling above its floor")
    height_ratio, area_ratio = pred.height / gt.height, pred.area / gt.area
    s = float(np.cbrt(height_ratio * area_ratio))
    return ScaleError(abs(s - 1.0), s, height_ratio, area_ratio)


# ------------------------------------------------------------------------------------------------ detection
# The detected classes: every class with a ScanNet-18 id except the room's shell. The seed's mAP is "furniture
# detection"; door and window are ScanNet-18 classes but here part of the shell (STRUCTURE_CLASSES, voxelised
# onto the wall), which the layout IoU scores. Wall, floor and ceiling have no ScanNet-18 id anyway.
DETECTION_CLASSES: tuple[str, ...] = tuple(c for i, c in enumerate(CLASSES)
                                           if SCANNET18_BY_ID[i] >= 0 and c not in STRUCTURE_CLASSES)
# The 13 offsets of half the 26-neighbourhood: each neighbour pair is found once.
_HALF_26 = np.asarray([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1) if (i, j, k) > (0, 0, 0)],
                      np.int64)


@dataclass(frozen=True)
class Instance:
    """One object: a ScanNet-18 class index (0–17), an axis-aligned box (6,) = min xyz, max xyz in metres (the
    outer faces of its voxels), a confidence and its voxel count."""

    label: int
    box: np.ndarray
    score: float = 1.0
    num_voxels: int = 0


def connected_components_26(coords: np.ndarray) -> tuple[int, np.ndarray]:
    """Connected components of integer voxels (N, 3) under 26-connectivity: (count, label per voxel, 0-based).
    Sparse: neighbours are found by searching sorted linear keys, and the components of that graph by scipy's
    csgraph, so memory follows the voxel count, not the grid (a 256³ or 1024³ scene needs no dense grid)."""
    c = np.asarray(coords, np.int64)
    if len(c) == 0:
        return 0, np.zeros(0, np.int64)
    unique, inverse = np.unique(c, axis=0, return_inverse=True)  # a repeated voxel is one node
    u = unique - unique.min(0) + 1  # ≥ 1, and with `span` = max + 2 a ±1 step never wraps into another row
    span = u.max(0) + 2
    keys = (u[:, 0] * span[1] + u[:, 1]) * span[2] + u[:, 2]  # sorted, as np.unique sorted the rows
    rows, cols = [], []
    for off in _HALF_26:
        wanted = keys + (off[0] * span[1] + off[1]) * span[2] + off[2]
        pos = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        hit = keys[pos] == wanted
        rows.append(np.nonzero(hit)[0])
        cols.append(pos[hit])
    r, q = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), np.int8), (r, q)), shape=(len(u), len(u)))
    count, labels = connected_components(graph, directed=False)
    return int(count), labels[inverse.ravel()].astype(np.int64)


def instances_from_voxels(voxels: np.ndarray, classes: np.ndarray, probs: np.ndarray | None = None, *,
                          origin: np.ndarray, voxel_size: float,
                          object_classes: Sequence[str] = DETECTION_CLASSES, min_voxels: int = 1) -> list[Instance]:
    """Object instances of a labelled voxel scene: per class of `object_classes`, each 26-connected component of its
    voxels (at least `min_voxels` of them) is one instance, its box the axis-aligned bounds of its voxel cubes in
    metres, its class the ScanNet-18 index, its score the mean class probability of its voxels (`probs` [V], or
    [V, C] read at each voxel's class; 1.0 without probs). Classes without a ScanNet-18 id are skipped. Two objects
    of one class that touch are one instance: the voxels carry no instance ids to tell them apart."""
    v = np.asarray(voxels, np.int64)
    c = np.asarray(classes, np.int64)
    if probs is None:
        p = np.ones(len(v))
    else:
        p = np.asarray(probs, np.float64)
        p = p[np.arange(len(v)), c] if p.ndim == 2 else p
    o, s = np.asarray(origin, np.float64), float(voxel_size)
    out: list[Instance] = []
    for name in object_classes:
        cls = CLASS_ID[name]
        label = SCANNET18_BY_ID[cls]
        sel = np.nonzero(c == cls)[0]
        if label < 0 or len(sel) == 0:
            continue
        count, comp = connected_components_26(v[sel])
        order = np.argsort(comp, kind="stable")
        bounds = np.searchsorted(comp[order], np.arange(count + 1))
        for k in range(count):
            members = sel[order[bounds[k]:bounds[k + 1]]]
            if len(members) < min_voxels:
                continue
            lo, hi = v[members].min(0), v[members].max(0) + 1
            out.append(Instance(int(label), np.concatenate([o + lo * s, o + hi * s]), float(p[members].mean()),
                                len(members)))
    return out


def box_iou_3d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of axis-aligned boxes (…, 6) = min xyz, max xyz: (N, M) for a (N, 6) and b (M, 6); a single box (6,)
    counts as N = 1. Zero-volume unions give 0."""
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    lo = np.maximum(a[:, None, :3], b[None, :, :3])
    hi = np.minimum(a[:, None, 3:], b[None, :, 3:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    vol_a = np.prod(np.clip(a[:, 3:] - a[:, :3], 0, None), axis=-1)
    vol_b = np.prod(np.clip(b[:, 3:] - b[:, :3], 0, None), axis=-1)
    union = vol_a[:, None] + vol_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP (VOC2010+, VoteNet eval_det's voc_ap with use_07_metric=False): the area under
    the precision envelope (precision made monotonically non-increasing from the right) over recall."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def average_precision_voc(detections: Sequence[Sequence[tuple[np.ndarray, float]]],
                          truths: Sequence[Sequence[np.ndarray] | np.ndarray], iou_threshold: float) -> float:
    """VOC-style AP of one class over scenes: `detections[s]` = (box (6,), score) pairs of scene s, `truths[s]` its
    truth boxes. Detections of all scenes in descending score (ties in input order); each is matched to the truth
    box of its scene it overlaps most; it is a true positive when that IoU > `iou_threshold` (strictly, as VoteNet)
    and that truth is not yet taken, else a false positive (a duplicate of a found object is a false positive,
    even when another truth box also overlaps it). Recall = TP / number of truth boxes; AP by `voc_ap`.
    NaN when there is no truth box (the class is not evaluated)."""
    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} scenes of detections but {len(truths)} of truths")
    gts = [np.asarray(t, np.float64).reshape(-1, 6) for t in truths]
    npos = sum(len(g) for g in gts)
    if npos == 0:
        return math.nan
    flat = [(s, np.asarray(box, np.float64), float(score)) for s, dets in enumerate(detections) for box, score in dets]
    order = np.argsort(-np.asarray([d[2] for d in flat]), kind="stable")
    taken = [np.zeros(len(g), bool) for g in gts]
    tp = np.zeros(len(flat))
    for rank, index in enumerate(order):
        scene, box, _ = flat[index]
        if len(gts[scene]) == 0:
            continue
        ious = box_iou_3d(box, gts[scene])[0]
        best = int(np.argmax(ious))
        if ious[best] > iou_threshold and not taken[scene][best]:
            taken[scene][best] = True
            tp[rank] = 1.0
    tp_cum = np.cumsum(tp)
    fp_cum = np.cumsum(1.0 - tp)
    recall = tp_cum / npos
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    return voc_ap(recall, precision)


class DetectionResult(NamedTuple):
    map: float  # mean of `ap` (NaN when no scene has a truth object)
    ap: dict[int, float]  # ScanNet-18 class index → AP, for the classes present in the truth


def mean_average_precision(preds: Sequence[Sequence[Instance]], gts: Sequence[Sequence[Instance]],
                           iou_threshold: float = 0.25) -> DetectionResult:
    """mAP over scenes (`preds[s]`, `gts[s]` the instances of scene s): the mean of `average_precision_voc` over
    the classes present in the truth (as VoteNet's eval_det); predicted classes absent from every truth scene are
    not scored. The seed's mAP is at IoU 0.25 (ScanNet's mAP@0.25); 0.5 is the stricter companion."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} scenes of predictions but {len(gts)} of truths")
    labels = sorted({g.label for scene in gts for g in scene})
    ap = {}
    for label in labels:
        dets = [[(d.box, d.score) for d in scene if d.label == label] for scene in preds]
        truths = [np.asarray([g.box for g in scene if g.label == label]).reshape(-1, 6) for scene in gts]
        ap[label] = average_precision_voc(dets, truths, iou_threshold)
    return DetectionResult(float(np.mean(list(ap.values()))) if ap else math.nan, ap)


# ------------------------------------------------------------------------------------------------ scenes
def scene_points(scene: GeneratedScene, n: int = DEFAULT_NUM_POINTS, seed: int = 0) -> np.ndarray:
    """`n` surface points (m) of a scene: its occupied voxels' centres, every class, sampled by
    `sample_surface_points` with a fresh generator from `seed` (so two identical scenes draw the same sample)."""
    return sample_surface_points(scene.points(), n, np.random.default_rng(seed))


def scene_surface_metrics(pred: GeneratedScene, gt: GeneratedScene, n: int = DEFAULT_NUM_POINTS, seed: int = 0,
                          tau: float = FSCORE_TAU) -> tuple[Chamfer, FScore]:
    """Chamfer and F-score of two scenes' sampled voxel centres."""
    return surface_metrics(scene_points(pred, n, seed), scene_points(gt, n, seed), tau)


def _frame(scene: GeneratedScene) -> dict[str, Any]:
    return {"origin": np.asarray(scene.origin, np.float64), "voxel_size": float(scene.cube_size) / scene.resolution}


def scene_layout(scene: GeneratedScene, close: int = 1) -> RoomLayout:
    return room_layout_from_voxels(scene.voxels, scene.classes, close=close, **_frame(scene))


def scene_instances(scene: GeneratedScene, probs: np.ndarray | None = None, min_voxels: int = 1) -> list[Instance]:
    return instances_from_voxels(scene.voxels, scene.classes, probs, min_voxels=min_voxels, **_frame(scene))


def scene_layout_iou(pred: GeneratedScene, gt: GeneratedScene) -> LayoutIoU:
    return layout_iou(scene_layout(pred), scene_layout(gt))


def scene_scale_error(pred: GeneratedScene, gt: GeneratedScene) -> ScaleError:
    return scale_error(scene_layout(pred), scene_layout(gt))
