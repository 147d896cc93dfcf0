"""The evaluation metrics against independent references: brute-force distances (cdist), scikit-image's SSIM, the
PSNR closed form, shapely areas, scipy.ndimage's labelling, hand-computed IoUs and APs; identical scenes score
the ideal value of every metric and a room scaled by 1.1 a scale error of 0.10."""

from __future__ import annotations

import math
import warnings

import lpips
import numpy as np
import pytest
import shapely
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist
from shapely.geometry import Polygon
from skimage.metrics import structural_similarity

from interiorfusion_data.scene import CLASS_ID
from interiorfusion_evaluate.metrics import (
    DEFAULT_NUM_POINTS,
    DETECTION_CLASSES,
    METRIC_NAMES,
    PSNR_CAP_DB,
    TARGETS,
    Instance,
    MetricResult,
    RoomLayout,
    average_precision_voc,
    box_iou_3d,
    chamfer_distance,
    connected_components_26,
    floor_polygon_from_voxels,
    fscore,
    instances_from_voxels,
    layout_iou,
    lpips_distance,
    mean_average_precision,
    passes,
    polygon_iou,
    psnr,
    room_iou_3d,
    room_layout_from_voxels,
    sample_surface_points,
    scene_instances,
    scene_layout,
    scene_layout_iou,
    scene_points,
    scene_scale_error,
    scene_surface_metrics,
    ssim,
    surface_metrics,
)
from interiorfusion_structure.generate import GeneratedScene

FLOOR, WALL, CEILING, CHAIR, TABLE, LAMP, DOOR = (CLASS_ID[c] for c in
                                                  ("floor", "wall", "ceiling", "chair", "table", "lamp", "door"))


# ------------------------------------------------------------------------------------------------ fixtures
def box_room(nx: int, ny: int, nz: int, res: int = 64, k0: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and classes of an nx × ny room, centred in a res² grid: a floor layer at k0, a ceiling layer nz
    above it, walls on the ring of columns just outside the floor from floor to ceiling."""
    x0, y0 = res // 2 - nx // 2, res // 2 - ny // 2
    i, j = np.meshgrid(np.arange(x0, x0 + nx), np.arange(y0, y0 + ny), indexing="ij")
    cols = np.c_[i.ravel(), j.ravel()]
    ring_i, ring_j = np.meshgrid(np.arange(x0 - 1, x0 + nx + 1), np.arange(y0 - 1, y0 + ny + 1), indexing="ij")
    outside = (ring_i < x0) | (ring_i >= x0 + nx) | (ring_j < y0) | (ring_j >= y0 + ny)
    ring = np.c_[ring_i[outside], ring_j[outside]]
    parts = [(np.c_[cols, np.full(len(cols), k0)], FLOOR), (np.c_[cols, np.full(len(cols), k0 + nz)], CEILING)]
    parts += [(np.c_[np.repeat(ring, nz + 1, 0), np.tile(np.arange(k0, k0 + nz + 1), len(ring))], WALL)]
    voxels = np.concatenate([p for p, _ in parts]).astype(np.int64)
    classes = np.concatenate([np.full(len(p), c) for p, c in parts]).astype(np.int64)
    return voxels, classes


def block(lo: tuple[int, int, int], size: tuple[int, int, int]) -> np.ndarray:
    g = np.meshgrid(*(np.arange(a, a + n) for a, n in zip(lo, size, strict=True)), indexing="ij")
    return np.stack([x.ravel() for x in g], 1).astype(np.int64)


def furnished_scene() -> GeneratedScene:
    """A 4.0 × 3.0 × 2.0 m room at 0.1 m voxels (6.4 m cube at 64³) with two chairs and a table."""
    voxels, classes = box_room(40, 30, 20)
    objects = [(block((20, 25, 3), (4, 4, 8)), CHAIR), (block((40, 25, 3), (4, 4, 8)), CHAIR),
               (block((28, 32, 3), (8, 6, 7)), TABLE)]
    voxels = np.concatenate([voxels, *(o for o, _ in objects)])
    classes = np.concatenate([classes, *(np.full(len(o), c) for o, c in objects)])
    return GeneratedScene(np.zeros((0, 3), np.int64), voxels, classes, 64, np.zeros(3), 6.4)


def image(seed: int, size: int = 48) -> np.ndarray:
    """A smooth colour image in [0, 1] with some texture (SSIM needs structure to compare)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.5 + 0.3 * np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)], -1)
    return np.clip(base + 0.05 * rng.standard_normal(base.shape), 0, 1)


@pytest.fixture(scope="module")
def lpips_net() -> torch.nn.Module:
    # A random VGG backbone (pnet_rand: nothing downloaded) with the linear layers the lpips wheel ships.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()


# ------------------------------------------------------------------------------------------------ targets
def test_targets_are_the_seeds_eight_with_their_directions() -> None:
    assert METRIC_NAMES == ("chamfer", "fscore", "lpips", "psnr", "ssim", "layout_iou", "map", "scale_error")
    lower = {n for n, t in TARGETS.items() if not t.higher_is_better}
    assert lower == {"chamfer", "lpips", "scale_error"}
    assert passes("chamfer", 0.0099) and not passes("chamfer", 0.01) and not passes("chamfer", 0.02)
    assert passes("psnr", 28.1) and not passes("psnr", 28.0) and passes("psnr", math.inf)
    assert passes("scale_error", 0.049) and not passes("scale_error", 0.051)
    assert passes("map", 0.71) and not passes("map", 0.69) and not passes("map", math.nan)
    result = MetricResult("ssim", 0.95)
    assert result.passed and result.target.threshold == 0.90


# ------------------------------------------------------------------------------------------------ surface
def test_chamfer_and_fscore_match_brute_force_distances() -> None:
    rng = np.random.default_rng(1)
    pred, gt = rng.random((300, 3)) * 2, rng.random((250, 3)) * 2 + 0.05
    d = cdist(pred, gt)  # every pair: the reference, no tree
    to_gt, to_pred = d.min(1), d.min(0)
    chamfer = chamfer_distance(pred, gt)
    assert chamfer.pred_to_gt == pytest.approx(np.mean(to_gt**2), rel=1e-12)
    assert chamfer.gt_to_pred == pytest.approx(np.mean(to_pred**2), rel=1e-12)
    assert chamfer.distance == pytest.approx(np.mean(to_gt**2) + np.mean(to_pred**2), rel=1e-12)
    for tau in (0.1, 0.2):
        p, r = np.mean(to_gt < tau), np.mean(to_pred < tau)
        f = fscore(pred, gt, tau)
        assert (f.precision, f.recall) == (pytest.approx(p), pytest.approx(r))
        assert f.fscore == pytest.approx(2 * p * r / (p + r))
    both = surface_metrics(pred, gt, 0.1)
    assert both == (chamfer, fscore(pred, gt, 0.1))


def test_grid_shifted_by_d_has_chamfer_2d2() -> None:
    # Spacing 0.5, |d| = 0.05 < 0.25: every point's nearest neighbour is its own shifted copy, both ways.
    g = np.stack(np.meshgrid(*[np.arange(6) * 0.5] * 3, indexing="ij"), -1).reshape(-1, 3)
    d = np.array([0.03, 0.04, 0.0])
    chamfer = chamfer_distance(g + d, g)
    assert chamfer.pred_to_gt == pytest.approx(0.0025) and chamfer.gt_to_pred == pytest.approx(0.0025)
    assert chamfer.distance == pytest.approx(2 * 0.05**2)
    assert fscore(g + d, g, tau=0.06).fscore == 1.0
    assert fscore(g + d, g, tau=0.04) == (0.0, 0.0, 0.0)  # P + R = 0 → F = 0
    assert chamfer_distance(g, g).distance == 0.0


def test_sampling_is_seeded_sized_and_order_free() -> None:
    rng = np.random.default_rng(2)
    pts = rng.random((500, 3))
    a = sample_surface_points(pts, 100, 7)
    assert a.shape == (100, 3) and len(np.unique(a, axis=0)) == 100
    assert np.array_equal(a, sample_surface_points(pts[::-1].copy(), 100, 7))  # storage order does not matter
    assert not np.array_equal(a, sample_surface_points(pts, 100, 8))
    assert (cdist(a, pts).min(1) == 0).all()  # a subset
    up = sample_surface_points(pts[:40], 100, 7)  # fewer points than asked: each once, the rest repeats
    assert up.shape == (100, 3) and len(np.unique(up, axis=0)) == 40
    assert DEFAULT_NUM_POINTS == 10_000
    with pytest.raises(ValueError, match="non-empty"):
        sample_surface_points(np.zeros((0, 3)), 10)


# ------------------------------------------------------------------------------------------------ images
def test_psnr_is_the_closed_form_masked_or_not_and_capped() -> None:
    a, b = image(0), image(1)
    # rel 1e-6: torchmetrics takes ln 10 as a float32 constant (4e-8 relative), whatever the images' dtype.
    assert psnr(a, b) == pytest.approx(10 * np.log10(1 / np.mean((a - b) ** 2)), rel=1e-6)
    mask = np.zeros(a.shape[:2], bool)
    mask[5:30, 10:40] = True
    assert psnr(a, b, mask) == pytest.approx(10 * np.log10(1 / np.mean((a[mask] - b[mask]) ** 2)), rel=1e-6)
    assert abs(psnr(a, b, mask) - psnr(a, b)) > 0.01  # the mask changes the value
    assert psnr(a, a) == PSNR_CAP_DB
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        psnr(a * 2, b)


def test_ssim_matches_scikit_image() -> None:
    a, b = image(0), image(1)
    reference = structural_similarity(a, b, channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
    # scikit-image averages over the pixels at least 5 from the border (its 11-tap window's radius), where neither
    # library pads; over exactly those pixels (the mask) the two agree to rounding.
    interior = np.zeros(a.shape[:2], bool)
    interior[5:-5, 5:-5] = True
    assert ssim(a, b, interior) == pytest.approx(reference, abs=1e-8)
    # Unmasked, torchmetrics also scores the reflect-padded border windows: close, not equal.
    assert ssim(a, b) == pytest.approx(reference, abs=0.02)
    assert 0.2 < reference < 0.95  # a real test: the images are neither equal nor unrelated
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_lpips_maps_unit_images_to_the_networks_range(lpips_net: torch.nn.Module) -> None:
    a, b = image(0, 64), image(1, 64)
    d = lpips_distance(a, b, lpips_net)
    # The package's own [0, 1] → [−1, 1] path (normalize=True) is the reference for the mapping.
    t = [torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32)) for x in (a, b)]
    with torch.no_grad():
        assert d == pytest.approx(float(lpips_net(*t, normalize=True)), rel=1e-5)
    assert d > 0 and lpips_distance(a, a, lpips_net) == pytest.approx(0.0, abs=1e-7)
    lpips_net.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            lpips_distance(a, b, lpips_net)
    finally:
        lpips_net.eval()


# ------------------------------------------------------------------------------------------------ layout
L_ROOM = [(0, 0), (4, 0), (4, 2), (2, 2), (2, 4), (0, 4)]  # 4 × 4 less a 2 × 2 corner: area 12


def test_polygon_iou_of_an_l_room_and_a_rectangle() -> None:
    rect = [(1, 1), (5, 1), (5, 3), (1, 3)]  # area 8
    # L ∩ rect = [1, 4] × [1, 2] (3) + [1, 2] × [2, 3] (1) = 4; union 12 + 8 − 4 = 16.
    assert Polygon(L_ROOM).intersection(Polygon(rect)).area == pytest.approx(4.0)
    assert polygon_iou(np.asarray(rect, float), L_ROOM) == pytest.approx(4 / 16)
    assert polygon_iou(L_ROOM, L_ROOM) == 1.0
    assert polygon_iou([(0, 0), (1, 1), (1, 0), (0, 1)], L_ROOM) == 0.0  # a bow-tie prediction is invalid: 0
    with pytest.raises(ValueError, match="truth"):
        polygon_iou(L_ROOM, [(0, 0), (1, 1), (1, 0), (0, 1)])


def test_room_iou_3d_of_two_offset_boxes() -> None:
    a = RoomLayout(shapely.box(0, 0, 4, 3), 0.0, 2.5)  # 12 m² × 2.5 m = 30 m³
    b = RoomLayout(shapely.box(1, 0, 5, 3), 0.5, 3.0)  # 12 m² × 2.5 m = 30 m³
    # Footprints overlap in [1, 4] × [0, 3] = 9 m², heights in [0.5, 2.5] = 2 m: 18 m³ of 30 + 30 − 18 = 42.
    assert room_iou_3d(a, b) == pytest.approx(18 / 42)
    assert layout_iou(a, b) == (pytest.approx(9 / 15), pytest.approx(18 / 42))
    # With a common floor the overlap is HorizonNet's min(h_a, h_b): 12·2 / (30 + 24 − 24).
    assert room_iou_3d(RoomLayout(shapely.box(0, 0, 4, 3), 0.0, 2.0), a) == pytest.approx(24 / 30)
    assert room_iou_3d(RoomLayout(Polygon(), math.nan, math.nan), a) == 0.0


def columns_inside(polygon: Polygon, s: float, n: int = 100) -> np.ndarray:
    """The (i, j) columns of an n² grid of s-metre cells whose centres lie inside `polygon` (grid origin 0)."""
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    inside = shapely.contains_xy(polygon, (i.ravel() + 0.5) * s, (j.ravel() + 0.5) * s)
    return np.c_[i.ravel()[inside], j.ravel()[inside]]


@pytest.mark.parametrize("truth", [
    shapely.affinity.rotate(shapely.box(1.13, 1.27, 5.13, 4.27), 30, origin="centroid"),  # off-grid, rotated
    shapely.affinity.translate(Polygon(L_ROOM), 1.04, 0.97),
], ids=["rotated-rectangle", "l-room"])
def test_floor_polygon_recovers_a_voxelised_room(truth: Polygon) -> None:
    s = 0.1
    cols = columns_inside(truth, s)
    floor = np.c_[cols, np.full(len(cols), 2)]
    # What a generated floor looks like: a chair's outline takes floor voxels, a one-voxel line is missing, and
    # a stray floor patch floats far away (neither is the room).
    centre = np.floor(np.r_[truth.centroid.x, truth.centroid.y] / s).astype(np.int64)  # well inside both rooms
    under_chair = (np.abs(floor[:, 0] - centre[0]) <= 2) & (np.abs(floor[:, 1] - centre[1]) <= 2)
    floor = floor[~under_chair & (floor[:, 0] != centre[0] + 8)]
    stray = block((90, 90, 2), (3, 3, 1))
    voxels = np.concatenate([floor, stray, np.c_[cols[:20], np.full(20, 25)]])
    classes = np.r_[np.full(len(floor) + len(stray), FLOOR), np.full(20, WALL)]
    got = floor_polygon_from_voxels(voxels, classes, origin=np.zeros(3), voxel_size=s)
    assert got.is_valid and got.geom_type == "Polygon" and not got.interiors
    assert polygon_iou(got, truth) > 0.95
    assert got.hausdorff_distance(truth) <= s * math.sqrt(2)  # within a voxel (its diagonal) everywhere
    assert floor_polygon_from_voxels(voxels, np.full(len(voxels), WALL), origin=np.zeros(3), voxel_size=s).is_empty


def test_room_heights_from_floor_and_ceiling_or_wall_top() -> None:
    voxels, classes = box_room(10, 8, 15, res=32)
    origin = np.array([-1.0, -2.0, -0.3])
    room = room_layout_from_voxels(voxels, classes, origin=origin, voxel_size=0.2)
    assert room.floor_z == pytest.approx(-0.3 + 2.5 * 0.2) and room.height == pytest.approx(15 * 0.2)
    assert room.area == pytest.approx(10 * 8 * 0.04)
    no_ceiling = classes != CEILING
    room = room_layout_from_voxels(voxels[no_ceiling], classes[no_ceiling], origin=origin, voxel_size=0.2)
    assert room.height == pytest.approx(15 * 0.2)  # the walls' top layer


# ------------------------------------------------------------------------------------------------ detection
def test_box_iou_3d_by_hand() -> None:
    unit = np.array([0, 0, 0, 1, 1, 1.0])
    half = unit + np.r_[0.5, 0, 0, 0.5, 0, 0]  # overlap 0.5 of union 1.5
    ious = box_iou_3d(np.stack([unit, half]), np.stack([unit, half, unit + 5]))
    assert ious.shape == (2, 3)
    np.testing.assert_allclose(ious, [[1, 1 / 3, 0], [1 / 3, 1, 0]])
    assert box_iou_3d(np.zeros(6), unit)[0, 0] == 0.0  # a zero-volume box


def test_map_with_a_duplicate_and_a_missed_object() -> None:
    chair, table, unused = 2, 4, 7  # ScanNet-18 indices; `unused` appears in no truth
    g1, g2, g3 = (np.array([x, 0, 0, x + 0.5, 0.5, 0.9]) for x in (0.0, 2.0, 4.0))
    gts = [[Instance(chair, g1), Instance(chair, g2)], [Instance(chair, g3), Instance(table, np.r_[0, 0, 0, 1, 1, 1.])]]
    preds = [
        [Instance(chair, g1, 0.9), Instance(chair, g1 + 0.01, 0.8)],  # a hit on g1 and its duplicate; g2 missed
        [Instance(chair, g3, 0.7), Instance(chair, g3 + np.r_[9, 9, 0, 9, 9, 0], 0.6),  # a hit on g3, one on nothing
         Instance(table, np.r_[0.5, 0, 0, 1.5, 1, 1.], 0.5), Instance(unused, g3, 0.99)],  # table IoU 1/3
    ]
    # Chairs by score: TP, FP (duplicate), TP, FP; 3 truths. Recall 1/3, 1/3, 2/3, 2/3; precision 1, 1/2, 2/3, 1/2;
    # its envelope 1, 2/3, 2/3, 1/2. All-point AP = 1/3·1 + (2/3 − 1/3)·2/3 = 5/9 (recall never reaches 1).
    chair_dets = [[(d.box, d.score) for d in s if d.label == chair] for s in preds]
    chair_gts = [np.stack([g.box for g in s if g.label == chair]) for s in gts]
    assert average_precision_voc(chair_dets, chair_gts, 0.25) == pytest.approx(5 / 9)
    at_25 = mean_average_precision(preds, gts, 0.25)
    assert at_25.ap == {table: pytest.approx(1.0), chair: pytest.approx(5 / 9)}  # `unused`: not scored
    assert at_25.map == pytest.approx(7 / 9)
    at_50 = mean_average_precision(preds, gts, 0.5)  # the table's 1/3 overlap no longer counts
    assert at_50.ap[table] == 0.0 and at_50.map == pytest.approx(5 / 18)
    assert math.isnan(mean_average_precision([[]], [[]]).map)
    # IoU exactly at the threshold is no match (VoteNet's `ovmax > ovthresh`).
    unit, double = np.r_[0, 0, 0, 1, 1, 1.0], np.r_[0, 0, 0, 2, 1, 1.0]  # IoU 1/2
    assert average_precision_voc([[(double, 1.0)]], [unit[None]], 0.5) == 0.0
    assert average_precision_voc([[(double, 1.0)]], [unit[None]], 0.49) == 1.0


def test_components_match_ndimage_labelling_with_26_neighbours() -> None:
    grid = np.random.default_rng(3).random((18, 18, 18)) < 0.12  # sparse: many small components, some touching
    reference, count = ndimage.label(grid, structure=np.ones((3, 3, 3)))
    coords = np.argwhere(grid)
    got_count, got = connected_components_26(coords[::-1])  # input order does not matter either
    got = got[::-1]
    assert got_count == count > 50
    pairs = np.unique(np.c_[got, reference[tuple(coords.T)]], axis=0)
    assert len(pairs) == count  # one-to-one: the same partition


def test_instances_are_components_of_furniture_classes() -> None:
    room, room_classes = box_room(20, 20, 10)
    chair_a, chair_b = block((25, 25, 3), (2, 2, 3)), block((35, 25, 3), (3, 2, 2))  # apart: two chairs
    table = np.concatenate([block((25, 35, 3), (2, 2, 2)), block((27, 37, 5), (2, 2, 2))])  # touch at a corner
    lamp, door = block((30, 30, 3), (1, 1, 4)), block((22, 22, 3), (1, 3, 5))  # no ScanNet-18 id; the shell
    parts = [(room, None), (chair_a, CHAIR), (chair_b, CHAIR), (table, TABLE), (lamp, LAMP), (door, DOOR)]
    voxels = np.concatenate([p for p, _ in parts])
    classes = np.concatenate([room_classes, *(np.full(len(p), c) for p, c in parts[1:])])
    probs = np.where(classes == CHAIR, 0.5, 1.0)
    probs[len(room):len(room) + len(chair_a)] = 0.9
    origin, s = np.array([-3.2, -3.2, -0.245]), 0.1
    found = instances_from_voxels(voxels, classes, probs, origin=origin, voxel_size=s)
    assert sorted(i.label for i in found) == [2, 2, 4]  # chair, chair, table (ScanNet-18); no lamp, door, shell
    chairs = sorted((i for i in found if i.label == 2), key=lambda i: i.box[0])
    np.testing.assert_allclose(chairs[0].box, np.r_[origin + np.r_[25, 25, 3] * s, origin + np.r_[27, 27, 6] * s])
    np.testing.assert_allclose(chairs[1].box, np.r_[origin + np.r_[35, 25, 3] * s, origin + np.r_[38, 27, 5] * s])
    assert (chairs[0].score, chairs[1].score) == (pytest.approx(0.9), pytest.approx(0.5))
    assert chairs[0].num_voxels == 12
    (tab,) = (i for i in found if i.label == 4)
    assert tab.num_voxels == 16 and tab.score == 1.0
    assert "door" not in DETECTION_CLASSES and "lamp" not in DETECTION_CLASSES and "chair" in DETECTION_CLASSES
    per_class = np.zeros((len(voxels), 28))
    per_class[np.arange(len(voxels)), classes] = probs  # [V, C] probabilities give the same scores
    again = instances_from_voxels(voxels, classes, per_class, origin=origin, voxel_size=s)
    assert [i.score for i in again] == [i.score for i in found]
    assert len(instances_from_voxels(voxels, classes, origin=origin, voxel_size=s, min_voxels=13)) == 1


# ------------------------------------------------------------------------------------------------ scenes
def test_identical_scenes_score_the_ideal_value_of_every_metric(lpips_net: torch.nn.Module) -> None:
    gt = furnished_scene()
    perm = np.random.default_rng(4).permutation(len(gt.voxels))
    pred = GeneratedScene(gt.cells, gt.voxels[perm], gt.classes[perm], gt.resolution, gt.origin, gt.cube_size)
    chamfer, f = scene_surface_metrics(pred, gt)  # 10k samples of a ~6k-voxel scene: up-sampled, same draw
    assert chamfer.distance == 0.0 and f.fscore == 1.0
    assert np.array_equal(scene_points(pred, 500), scene_points(gt, 500))
    view = image(5, 64)
    assert psnr(view, view) == PSNR_CAP_DB and ssim(view, view) == pytest.approx(1.0)
    assert lpips_distance(view, view, lpips_net) == pytest.approx(0.0, abs=1e-7)
    assert scene_layout_iou(pred, gt) == (1.0, 1.0)
    instances = scene_instances(gt)
    assert len(instances) == 3
    assert mean_average_precision([scene_instances(pred)], [instances], 0.25).map == 1.0
    assert mean_average_precision([scene_instances(pred)], [instances], 0.5).map == 1.0
    assert scene_scale_error(pred, gt).error == 0.0


def test_a_room_scaled_by_1_1_has_scale_error_0_10() -> None:
    def scene(voxels: np.ndarray, classes: np.ndarray) -> GeneratedScene:
        return GeneratedScene(np.zeros((0, 3), np.int64), voxels, classes, 64, np.zeros(3), 6.4)

    gt = scene(*box_room(40, 30, 20))  # 4.0 × 3.0 m, 2.0 m high
    big = scene(*box_room(44, 33, 22))  # the same room scaled by 1.1 about its floor centre
    err = scene_scale_error(big, gt)
    assert err.error == pytest.approx(0.10, abs=1e-12) and err.scale == pytest.approx(1.1)
    assert err.height_ratio == pytest.approx(1.1) and err.area_ratio == pytest.approx(1.21)
    assert scene_scale_error(gt, big).error == pytest.approx(1 - 1 / 1.1)
    # Scaling the voxel centres themselves and re-voxelising leaves gaps every ~10th column and loses the outer
    # half-voxels: ±1 voxel per side of a 30–40 voxel room, so within 0.015.
    room = scene_layout(gt)
    centre = np.r_[room.polygon.centroid.x, room.polygon.centroid.y, room.floor_z]
    scaled = centre + 1.1 * (gt.points() - centre)
    voxels, first = np.unique(np.floor(scaled / 0.1).astype(np.int64), axis=0, return_index=True)
    assert scene_scale_error(scene(voxels, gt.classes[first]), gt).error == pytest.approx(0.10, abs=0.015)
