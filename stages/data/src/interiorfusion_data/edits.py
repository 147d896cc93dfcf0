"""Edit pairs: one procedural room before and after one object was moved, removed or added.

An edit changes exactly one piece of furniture that stands on the floor with nothing resting on it (moving a table
without the lamp on it would leave the lamp floating). The edited scene keeps the original's voxel frame, cameras
and lights (pipeline.build_edit_sample), so both samples' condition views differ only where the object was or is,
and voxel (i, j, k) means the same place in both.

    remove  the object is gone                  (before: the original, after: the edited scene)
    add     the same pair read the other way    (before: the edited scene, after: the original)
    move    the object slid across the floor    (before: the original, after: the edited scene), its yaw kept

So one stored edited scene serves a remove and an add pair. A pair's `boxes` are the changed object's axis-aligned
boxes in metres, world frame (its old and new place for a move): the region that should change, and nothing else
(the GRPO stage's edit-quality reward, docs/finetune-rewards.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from interiorfusion_data.scene import ObjectBox, Scene, obb_overlap, point_in_polygon

KINDS = ("move", "remove", "add")
# An object counts as standing on the floor when its bottom is this close to z = 0 (procedural floors are at 0).
FLOOR_TOLERANCE_M = 0.05
WALL_CLEARANCE_M = 0.05
MOVE_TRIES = 60


def edit_rng(seed: int, index: int, k: int) -> np.random.Generator:
    # Its own stream: edits never shift the scene's geometry or cameras.
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 3, int(k)]))


@dataclass
class SceneEdit:
    kind: str  # "move" or "remove" (an "add" pair reads a removal backwards)
    instance: int
    label: str
    boxes: np.ndarray  # [K, 2, 3] the changed region: the object's old (and, moved, new) axis-aligned box, metres
    scene: Scene  # the edited scene

    def pairs(self, original_key: str, edited_key: str, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
        """The pair records this edit yields among `kinds` (JSON; keys name samples of the dataset)."""
        boxes = np.round(self.boxes, 6).tolist()
        common = {"instance": self.instance, "class": self.label, "boxes": boxes}
        if self.kind == "move":
            return [{"kind": "move", "before": original_key, "after": edited_key, **common}] if "move" in kinds else []
        out = []
        if "remove" in kinds:
            out.append({"kind": "remove", "before": original_key, "after": edited_key, **common})
        if "add" in kinds:
            out.append({"kind": "add", "before": edited_key, "after": original_key, **common})
        return out


def _instance_vertices(scene: Scene, instance: int) -> np.ndarray:
    return np.unique(scene.faces[scene.face_instance == instance])


def _aabb(points: np.ndarray) -> np.ndarray:
    return np.stack([points.min(0), points.max(0)])


def movable_objects(scene: Scene) -> list[ObjectBox]:
    """Objects on the floor that nothing rests on, and that own faces in the mesh."""
    out = []
    for obj in scene.objects:
        bottom = obj.center[2] - obj.size[2] / 2
        top = obj.center[2] + obj.size[2] / 2
        if bottom > FLOOR_TOLERANCE_M or not (scene.face_instance == obj.instance).any():
            continue
        supports = any(
            o is not obj and abs((o.center[2] - o.size[2] / 2) - top) < FLOOR_TOLERANCE_M
            and obb_overlap(replace(o, center=o.center - [0, 0, FLOOR_TOLERANCE_M]), obj)
            for o in scene.objects)
        if not supports:
            out.append(obj)
    return out


def remove_object(scene: Scene, obj: ObjectBox) -> Scene:
    keep = scene.face_instance != obj.instance
    used = np.unique(scene.faces[keep])
    remap = np.full(len(scene.vertices), -1, np.int64)
    remap[used] = np.arange(len(used))
    return replace(
        scene, vertices=scene.vertices[used], faces=remap[scene.faces[keep]], face_class=scene.face_class[keep],
        face_instance=scene.face_instance[keep], face_material=scene.face_material[keep],
        objects=[o for o in scene.objects if o is not obj], meta=dict(scene.meta))


def _fits(scene: Scene, box: ObjectBox, others: list[ObjectBox]) -> bool:
    if scene.floor_polygon is not None:
        # The footprint, grown by the clearance, inside the floor polygon (corners and edge midpoints).
        c = box.corners2d()
        centre = box.center[:2]
        grown = centre + (c - centre) * (1 + WALL_CLEARANCE_M / max(float(np.min(box.size[:2])) / 2, 1e-6))
        probe = np.concatenate([grown, (grown + np.roll(grown, -1, 0)) / 2])
        if not point_in_polygon(probe, scene.floor_polygon).all():
            return False
    return not any(obb_overlap(box, o) for o in others)


def move_object(scene: Scene, obj: ObjectBox, rng: np.random.Generator, shift_m: tuple[float, float]
                ) -> tuple[Scene, ObjectBox] | None:
    """The scene with `obj` slid by a random horizontal offset whose length is in `shift_m`, to a place inside the
    room that overlaps no other object; None when no try fits."""
    others = [o for o in scene.objects if o is not obj]
    for _ in range(MOVE_TRIES):
        angle = rng.uniform(0, 2 * np.pi)
        dist = rng.uniform(*shift_m)
        delta = np.array([np.cos(angle) * dist, np.sin(angle) * dist, 0.0])
        moved = replace(obj, center=obj.center + delta)
        if not _fits(scene, moved, others):
            continue
        vertices = scene.vertices.copy()
        vertices[_instance_vertices(scene, obj.instance)] += delta
        objects = [moved if o is obj else o for o in scene.objects]
        return replace(scene, vertices=vertices, objects=objects, meta=dict(scene.meta)), moved
    return None


def edit_scene(scene: Scene, rng: np.random.Generator, kinds: tuple[str, ...],
               shift_m: tuple[float, float] = (0.4, 1.2)) -> SceneEdit | None:
    """One edit of `scene` (kind drawn among those `kinds` allow; a move that finds no free place falls back to a
    removal when allowed); None when the scene has no movable object."""
    candidates = movable_objects(scene)
    if not candidates:
        return None
    obj = candidates[int(rng.integers(len(candidates)))]
    old = _aabb(scene.vertices[_instance_vertices(scene, obj.instance)])
    can_remove = "remove" in kinds or "add" in kinds
    choices = [k for k in ("move", "remove") if (k == "move" and "move" in kinds) or (k == "remove" and can_remove)]
    kind = choices[int(rng.integers(len(choices)))]
    if kind == "move":
        moved = move_object(scene, obj, rng, shift_m)
        if moved is not None:
            edited, _ = moved
            new = _aabb(edited.vertices[_instance_vertices(edited, obj.instance)])
            return SceneEdit("move", obj.instance, obj.label, np.stack([old, new]), edited)
        if not can_remove:
            return None
    return SceneEdit("remove", obj.instance, obj.label, old[None], remove_object(scene, obj))


__all__ = ["KINDS", "SceneEdit", "edit_rng", "edit_scene", "movable_objects", "move_object", "remove_object"]
