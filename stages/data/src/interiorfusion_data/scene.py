"""The in-memory scene every source produces and every consumer (voxeliser, renderer, writer) reads.

A scene is one triangle soup in metres, z up, with per-face class, instance and PBR material, plus the
structured annotations: room layout (walls, doors, windows) and oriented object boxes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Class 0 is "void": pixels that hit nothing, and never a face's class. Ids are append-only (a class keeps its
# id across format versions). 20–26 complete the ScanNet-18 detection set for imported scans (the generator does
# not build them); "unknown" marks surfaces without a label (unannotated scan segments, unnamed meshes, version-1
# samples). The mapping to NYU40 / ScanNet-18 / ADE20K-150 is in interiorfusion_data.classes.
CLASSES: tuple[str, ...] = (
    "void", "wall", "floor", "ceiling", "door", "window",
    "bed", "nightstand", "sofa", "chair", "table", "desk", "cabinet", "wardrobe", "shelf",
    "lamp", "plant", "tv", "picture", "other",
    "counter", "curtain", "refrigerator", "shower_curtain", "toilet", "sink", "bathtub",
    "unknown",
)
CLASS_ID: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
STRUCTURE_CLASSES = ("wall", "floor", "ceiling", "door", "window")
UNKNOWN = CLASS_ID["unknown"]
FURNITURE_CLASSES = tuple(c for c in CLASSES if c not in ("void", "unknown", *STRUCTURE_CLASSES))


@dataclass(frozen=True)
class Material:
    albedo: tuple[float, float, float]
    metallic: float = 0.0
    roughness: float = 0.8

    def row(self) -> list[float]:
        return [*self.albedo, self.metallic, self.roughness]


@dataclass
class ObjectBox:
    """An oriented 3D box: centre and full extents in metres, yaw (radians) about +z, SpatialLM's Bbox."""

    instance: int
    label: str
    center: np.ndarray
    size: np.ndarray
    yaw: float

    def to_json(self) -> dict[str, Any]:
        return {
            "instance": self.instance, "class": self.label, "class_id": CLASS_ID[self.label],
            "center": [round(float(v), 6) for v in self.center],
            "size": [round(float(v), 6) for v in self.size], "yaw": round(float(self.yaw), 6),
        }

    def corners2d(self) -> np.ndarray:
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        hx, hy = self.size[0] / 2, self.size[1] / 2
        local = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]])
        rot = np.array([[c, -s], [s, c]])
        return local @ rot.T + self.center[:2]


@dataclass
class Wall:
    """A wall's inner face runs from `a` to `b` (floor level); the wall extends `thickness` outward from it."""

    a: np.ndarray
    b: np.ndarray
    height: float
    thickness: float
    instance: int

    def to_json(self) -> dict[str, Any]:
        return {
            "a": [round(float(v), 6) for v in self.a], "b": [round(float(v), 6) for v in self.b],
            "height": round(float(self.height), 6), "thickness": round(float(self.thickness), 6),
            "instance": self.instance,
        }


@dataclass
class Opening:
    """A door or window: a box on wall `wall`; `center` is the centre of the opening on the wall's inner face."""

    kind: str
    wall: int
    center: np.ndarray
    width: float
    height: float
    instance: int

    def to_json(self) -> dict[str, Any]:
        return {
            "wall": self.wall, "center": [round(float(v), 6) for v in self.center],
            "width": round(float(self.width), 6), "height": round(float(self.height), 6),
            "instance": self.instance,
        }


@dataclass
class Camera:
    """Pinhole camera, OpenCV convention (x right, y down, z forward); pose maps camera to world."""

    K: np.ndarray  # (3, 3)
    pose: np.ndarray  # (4, 4) camera-to-world
    width: int
    height: int


@dataclass
class Scene:
    name: str
    vertices: np.ndarray  # (V, 3) float64, metres, z up
    faces: np.ndarray  # (F, 3) int64
    face_class: np.ndarray  # (F,) uint8
    face_instance: np.ndarray  # (F,) int32, 0 = no instance
    face_material: np.ndarray  # (F, 5) float32: albedo RGB, metallic, roughness
    objects: list[ObjectBox] = field(default_factory=list)
    walls: list[Wall] = field(default_factory=list)
    doors: list[Opening] = field(default_factory=list)
    windows: list[Opening] = field(default_factory=list)
    floor_polygon: np.ndarray | None = None  # (P, 2) counter-clockwise, when known
    cameras: list[Camera] | None = None  # given cameras (scans); else placed by the renderer
    meta: dict[str, Any] = field(default_factory=dict)
    # Captured frames (real scans), one per camera: RGB (H, W, 3) uint8 and z-depth (H, W) float32 metres (0 =
    # none), already resampled into that camera. They replace the renderer's colour and depth for those views.
    frames: list[tuple[np.ndarray, np.ndarray]] | None = None
    # Extra `present` flags of the sample (what a real scan lacks, e.g. {"materials": False, "layout": False}).
    present: dict[str, bool] = field(default_factory=dict)

    @property
    def triangles(self) -> np.ndarray:
        return self.vertices[self.faces]

    def face_normals(self) -> np.ndarray:
        tri = self.triangles
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        norm = np.linalg.norm(n, axis=1, keepdims=True)
        return n / np.maximum(norm, 1e-12)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.vertices.min(axis=0), self.vertices.max(axis=0)

    def instance_class(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for inst, cls in zip(self.face_instance.tolist(), self.face_class.tolist(), strict=True):
            if inst:
                out.setdefault(inst, CLASSES[cls])
        return out


class SceneBuilder:
    """Accumulates parts (vertices, faces, class, instance, material) into one Scene."""

    def __init__(self, name: str):
        self.name = name
        self._verts: list[np.ndarray] = []
        self._faces: list[np.ndarray] = []
        self._cls: list[np.ndarray] = []
        self._inst: list[np.ndarray] = []
        self._mat: list[np.ndarray] = []
        self._count = 0
        self.next_instance = 1

    def new_instance(self) -> int:
        self.next_instance += 1
        return self.next_instance - 1

    def add(
        self, vertices: np.ndarray, faces: np.ndarray, label: str, instance: int,
        material: Material | np.ndarray,
    ) -> None:
        nf = len(faces)
        self._verts.append(np.asarray(vertices, np.float64))
        self._faces.append(np.asarray(faces, np.int64) + self._count)
        self._count += len(vertices)
        self._cls.append(np.full(nf, CLASS_ID[label], np.uint8))
        self._inst.append(np.full(nf, instance, np.int32))
        if isinstance(material, Material):
            self._mat.append(np.tile(np.asarray(material.row(), np.float32), (nf, 1)))
        else:
            self._mat.append(np.asarray(material, np.float32).reshape(nf, 5))

    def build(self, **kwargs: Any) -> Scene:
        if not self._faces:
            raise ValueError(f"scene {self.name}: no geometry")
        return Scene(
            name=self.name,
            vertices=np.concatenate(self._verts), faces=np.concatenate(self._faces),
            face_class=np.concatenate(self._cls), face_instance=np.concatenate(self._inst),
            face_material=np.concatenate(self._mat), **kwargs,
        )


def yaw_matrix(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def obb_overlap(a: ObjectBox, b: ObjectBox, eps: float = 1e-6) -> bool:
    """True when the interiors of two yawed boxes intersect by more than `eps` (touching is fine)."""
    za = (a.center[2] - a.size[2] / 2, a.center[2] + a.size[2] / 2)
    zb = (b.center[2] - b.size[2] / 2, b.center[2] + b.size[2] / 2)
    if min(za[1], zb[1]) - max(za[0], zb[0]) <= eps:
        return False
    return polygons_overlap_2d(a.corners2d(), b.corners2d(), eps)


def polygons_overlap_2d(p: np.ndarray, q: np.ndarray, eps: float = 1e-6) -> bool:
    """Separating-axis test for two convex polygons; separated (or only touching) → False."""
    for poly in (p, q):
        edges = np.roll(poly, -1, axis=0) - poly
        for ex, ey in edges:
            axis = np.array([-ey, ex])
            norm = np.hypot(*axis)
            if norm < 1e-12:
                continue
            axis /= norm
            pa, qa = p @ axis, q @ axis
            if min(pa.max(), qa.max()) - max(pa.min(), qa.min()) <= eps:
                return False
    return True


def point_in_polygon(pts: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over points (N, 2)."""
    pts = np.atleast_2d(pts)
    x, y = pts[:, 0:1], pts[:, 1:2]
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    cond = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xint = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return np.count_nonzero(cond & (x < xint), axis=1) % 2 == 1
