"""Procedural interiors: rectangular and L-shaped rooms with doors, windows and furniture built from primitives.

Everything is drawn from one `numpy.random.Generator` seeded by (dataset seed, scene index), so a scene is a
pure function of its seed. Furniture is placed against walls or free-standing, and every placement is checked
against the room polygon and against the oriented boxes of everything placed before (plus clearance boxes in
front of doors and windows), so nothing interpenetrates.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from interiorfusion_data.config import ARCHETYPES
from interiorfusion_data.primitives import Mesh, box, box_between, cylinder, ellipsoid, merge, quad
from interiorfusion_data.scene import (
    Material,
    ObjectBox,
    Opening,
    Scene,
    SceneBuilder,
    Wall,
    obb_overlap,
    point_in_polygon,
    yaw_matrix,
)

Part = tuple[Mesh, Material]

# ---------------------------------------------------------------------------------------------- materials
WOODS = [(0.55, 0.38, 0.22), (0.72, 0.55, 0.36), (0.36, 0.23, 0.13), (0.84, 0.71, 0.53), (0.26, 0.17, 0.11)]
FABRICS = [(0.28, 0.33, 0.5), (0.6, 0.6, 0.58), (0.45, 0.52, 0.4), (0.72, 0.62, 0.46), (0.58, 0.27, 0.2),
           (0.22, 0.22, 0.24), (0.78, 0.74, 0.68), (0.35, 0.45, 0.55), (0.62, 0.5, 0.58)]
PAINTS = [(0.92, 0.91, 0.87), (0.86, 0.89, 0.92), (0.91, 0.86, 0.78), (0.76, 0.82, 0.74), (0.82, 0.76, 0.71),
          (0.68, 0.74, 0.82), (0.88, 0.84, 0.7)]
LACQUERS = [(0.93, 0.93, 0.91), (0.1, 0.1, 0.1), (0.45, 0.47, 0.5), (0.2, 0.3, 0.42), (0.62, 0.68, 0.62)]
METALS = [(0.76, 0.76, 0.78), (0.83, 0.67, 0.38), (0.12, 0.12, 0.12)]
LEAVES = [(0.16, 0.42, 0.13), (0.23, 0.52, 0.19), (0.11, 0.32, 0.13), (0.3, 0.48, 0.16)]
POTS = [(0.72, 0.37, 0.22), (0.9, 0.9, 0.88), (0.38, 0.38, 0.4), (0.2, 0.2, 0.22)]
FLOORS = [("wood", (0.6, 0.42, 0.25), 0.45), ("wood", (0.78, 0.62, 0.42), 0.5), ("wood", (0.4, 0.27, 0.16), 0.4),
          ("tile", (0.78, 0.77, 0.74), 0.25), ("tile", (0.42, 0.42, 0.42), 0.3), ("carpet", (0.5, 0.47, 0.44), 0.95),
          ("carpet", (0.35, 0.38, 0.45), 0.95), ("concrete", (0.58, 0.57, 0.55), 0.7)]


def vary(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float = 0.06) -> tuple[float, ...]:
    """Jitter hue, saturation and value a little so no two instances share a colour exactly."""
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    h = (h + rng.uniform(-amount, amount) * 0.3) % 1.0
    s = float(np.clip(s * rng.uniform(1 - amount * 2, 1 + amount * 2), 0, 1))
    v = float(np.clip(v * rng.uniform(1 - amount * 2, 1 + amount * 2), 0, 1))
    return tuple(round(c, 4) for c in colorsys.hsv_to_rgb(h, s, v))


def pick(rng: np.random.Generator, items: list) -> object:
    return items[int(rng.integers(len(items)))]


def wood(rng: np.random.Generator) -> Material:
    return Material(vary(rng, pick(rng, WOODS)), 0.0, round(float(rng.uniform(0.45, 0.75)), 3))


def fabric(rng: np.random.Generator) -> Material:
    return Material(vary(rng, pick(rng, FABRICS)), 0.0, round(float(rng.uniform(0.85, 0.98)), 3))


def lacquer(rng: np.random.Generator) -> Material:
    return Material(vary(rng, pick(rng, LACQUERS), 0.03), 0.0, round(float(rng.uniform(0.25, 0.5)), 3))


def metal(rng: np.random.Generator) -> Material:
    return Material(vary(rng, pick(rng, METALS), 0.03), 0.9, round(float(rng.uniform(0.2, 0.45)), 3))


def frame_material(rng: np.random.Generator) -> Material:
    return wood(rng) if rng.random() < 0.5 else (metal(rng) if rng.random() < 0.4 else lacquer(rng))


# ---------------------------------------------------------------------------------------------- furniture
# Builders work in a local frame: footprint centred on the origin, standing on z = 0, front facing +y.
Builder = Callable[[np.random.Generator], list[Part]]


def u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def legs(w: float, d: float, h: float, t: float, inset: float, mat: Material, round_legs: bool = False) -> list[Part]:
    out = []
    for sx in (-1, 1):
        for sy in (-1, 1):
            x, y = sx * (w / 2 - inset - t / 2), sy * (d / 2 - inset - t / 2)
            mesh = cylinder(x, y, 0.0, t / 2, h, 8) if round_legs else box((x, y, h / 2), (t, t, h))
            out.append((mesh, mat))
    return out


def build_bed(rng: np.random.Generator) -> list[Part]:
    w = float(pick(rng, [0.9, 1.2, 1.4, 1.6, 1.8])) + u(rng, 0, 0.05)
    length, frame_h, matt_h = u(rng, 1.95, 2.1), u(rng, 0.25, 0.35), u(rng, 0.18, 0.25)
    frame = wood(rng) if rng.random() < 0.7 else fabric(rng)
    sheet, cover = Material((0.93, 0.93, 0.9), 0, 0.9), fabric(rng)
    head_t, head_h = 0.06, u(rng, 0.85, 1.15)
    y0 = -length / 2
    parts: list[Part] = [
        (box_between((-w / 2, y0 + head_t, 0.08), (w / 2, length / 2, frame_h)), frame),
        (box_between((-w / 2, y0, 0.0), (w / 2, y0 + head_t, head_h)), frame),
        (box_between((-w / 2 + 0.02, y0 + head_t + 0.02, frame_h), (w / 2 - 0.02, length / 2 - 0.02,
                                                                      frame_h + matt_h)), sheet),
        (box_between((-w / 2 + 0.01, y0 + head_t + 0.6, frame_h + matt_h),
                     (w / 2 - 0.01, length / 2 - 0.01, frame_h + matt_h + 0.04)), cover),
    ]
    parts += legs(w, length - head_t, 0.08, 0.06, 0.02, frame)
    parts[-4:] = [((v + np.array([0.0, head_t / 2, 0.0]), f), m) for (v, f), m in parts[-4:]]
    n_pillows = 1 if w < 1.3 else 2
    pw = (w - 0.1) / n_pillows - 0.05
    for i in range(n_pillows):
        cx = -w / 2 + 0.05 + (i + 0.5) * (w - 0.1) / n_pillows
        parts.append((box((cx, y0 + head_t + 0.3, frame_h + matt_h + 0.06), (pw, 0.4, 0.12)), sheet))
    return parts


def build_nightstand(rng: np.random.Generator) -> list[Part]:
    w, d, h = u(rng, 0.4, 0.55), u(rng, 0.35, 0.45), u(rng, 0.45, 0.6)
    body, handle = wood(rng) if rng.random() < 0.6 else lacquer(rng), metal(rng)
    parts: list[Part] = [(box_between((-w / 2, -d / 2, 0.05), (w / 2, d / 2, h)), body)]
    parts += legs(w, d, 0.05, 0.04, 0.01, body)
    n = int(rng.integers(1, 3))
    dh = (h - 0.1) / n
    for i in range(n):
        z0 = 0.07 + i * dh
        parts.append((box_between((-w / 2 + 0.02, d / 2, z0), (w / 2 - 0.02, d / 2 + 0.015, z0 + dh - 0.03)), body))
        parts.append((box((0, d / 2 + 0.025, z0 + dh / 2), (0.1, 0.02, 0.02)), handle))
    return parts


def build_sofa(rng: np.random.Generator) -> list[Part]:
    w, d, h = u(rng, 1.6, 2.4), u(rng, 0.85, 1.0), u(rng, 0.75, 0.9)
    cloth, foot = fabric(rng), wood(rng)
    seat_h, arm_w, back_t = u(rng, 0.38, 0.45), u(rng, 0.12, 0.22), u(rng, 0.18, 0.25)
    parts: list[Part] = [
        (box_between((-w / 2, -d / 2, 0.08), (w / 2, d / 2, seat_h - 0.1)), cloth),
        (box_between((-w / 2, -d / 2, seat_h - 0.1), (w / 2, -d / 2 + back_t, h)), cloth),
        (box_between((-w / 2, -d / 2 + back_t, seat_h - 0.1), (-w / 2 + arm_w, d / 2, seat_h + 0.2)), cloth),
        (box_between((w / 2 - arm_w, -d / 2 + back_t, seat_h - 0.1), (w / 2, d / 2, seat_h + 0.2)), cloth),
    ]
    parts += legs(w, d, 0.08, 0.05, 0.03, foot)
    n = 2 if w < 2.0 else 3
    inner = w - 2 * arm_w
    cushion = Material(vary(rng, cloth.albedo, 0.03), 0.0, cloth.roughness)
    for i in range(n):
        x0 = -w / 2 + arm_w + i * inner / n
        parts.append((box_between((x0 + 0.01, -d / 2 + back_t, seat_h - 0.1), (x0 + inner / n - 0.01, d / 2 - 0.02,
                                                                                 seat_h)), cushion))
    return parts


def build_chair(rng: np.random.Generator) -> list[Part]:
    w, d = u(rng, 0.42, 0.52), u(rng, 0.44, 0.54)
    seat_h, back_h = u(rng, 0.43, 0.48), u(rng, 0.8, 1.0)
    frame = wood(rng) if rng.random() < 0.6 else metal(rng)
    seat = fabric(rng) if rng.random() < 0.5 else frame
    t = u(rng, 0.03, 0.045)
    parts: list[Part] = [(box_between((-w / 2, -d / 2, seat_h - 0.05), (w / 2, d / 2, seat_h)), seat)]
    parts += legs(w, d, seat_h - 0.05, t, 0.0, frame, round_legs=frame.metallic > 0.5)
    # Backrest at the back (-y): two posts and a panel.
    for x0 in (-w / 2, w / 2 - t):
        parts.append((box_between((x0, -d / 2, seat_h), (x0 + t, -d / 2 + t, back_h)), frame))
    parts.append((box_between((-w / 2 + t, -d / 2, back_h - 0.25), (w / 2 - t, -d / 2 + 0.025, back_h - 0.02)), seat))
    return parts


def build_table(rng: np.random.Generator, coffee: bool = False) -> list[Part]:
    top_mat = wood(rng) if rng.random() < 0.7 else lacquer(rng)
    leg_mat = top_mat if rng.random() < 0.6 else metal(rng)
    if coffee:
        w, d, h = u(rng, 0.8, 1.2), u(rng, 0.5, 0.7), u(rng, 0.35, 0.45)
    else:
        w, d, h = u(rng, 1.1, 1.8), u(rng, 0.75, 1.0), u(rng, 0.72, 0.77)
    t = u(rng, 0.03, 0.05)
    if not coffee and rng.random() < 0.25:
        r = u(rng, 0.45, 0.6)
        return [(cylinder(0, 0, h - t, r, t, 24), top_mat), (cylinder(0, 0, 0.03, 0.05, h - t - 0.03, 10), leg_mat),
                (cylinder(0, 0, 0, 0.25, 0.03, 16), leg_mat)]
    parts: list[Part] = [(box_between((-w / 2, -d / 2, h - t), (w / 2, d / 2, h)), top_mat)]
    parts += legs(w, d, h - t, u(rng, 0.04, 0.07), 0.04, leg_mat, round_legs=leg_mat.metallic > 0.5)
    if coffee and rng.random() < 0.5:
        parts.append((box_between((-w / 2 + 0.06, -d / 2 + 0.06, 0.1), (w / 2 - 0.06, d / 2 - 0.06, 0.12)), top_mat))
    return parts


def build_desk(rng: np.random.Generator) -> list[Part]:
    w, d, h = u(rng, 1.0, 1.6), u(rng, 0.55, 0.75), u(rng, 0.72, 0.76)
    top, body, handle = wood(rng), lacquer(rng) if rng.random() < 0.5 else wood(rng), metal(rng)
    dw = u(rng, 0.35, 0.45)
    parts: list[Part] = [
        (box_between((-w / 2, -d / 2, h - 0.03), (w / 2, d / 2, h)), top),
        (box_between((-w / 2, -d / 2, 0), (-w / 2 + 0.03, d / 2, h - 0.03)), body),
        (box_between((w / 2 - dw, -d / 2, 0), (w / 2, d / 2, h - 0.03)), body),
        (box_between((-w / 2 + 0.03, -d / 2, h - 0.35), (w / 2 - dw, -d / 2 + 0.02, h - 0.03)), body),
    ]
    for i in range(3):
        z0 = 0.04 + i * (h - 0.08) / 3
        parts.append((box_between((w / 2 - dw + 0.02, d / 2, z0), (w / 2 - 0.02, d / 2 + 0.012,
                                                                     z0 + (h - 0.08) / 3 - 0.02)), body))
        parts.append((box((w / 2 - dw / 2, d / 2 + 0.02, z0 + (h - 0.08) / 6), (0.12, 0.016, 0.016)), handle))
    return parts


def build_cabinet(rng: np.random.Generator, low: bool = False) -> list[Part]:
    w, d = u(rng, 0.8, 1.8), u(rng, 0.4, 0.5)
    h = u(rng, 0.45, 0.6) if low else u(rng, 0.7, 1.0)
    body, handle = wood(rng) if rng.random() < 0.5 else lacquer(rng), metal(rng)
    parts: list[Part] = [(box_between((-w / 2, -d / 2, 0.08), (w / 2, d / 2, h)), body)]
    parts += legs(w, d, 0.08, 0.04, 0.03, handle if rng.random() < 0.5 else body)
    n = max(2, round(w / 0.45))
    dw = (w - 0.02) / n
    door = Material(vary(rng, body.albedo, 0.03), body.metallic, body.roughness)
    for i in range(n):
        x0 = -w / 2 + 0.01 + i * dw
        parts.append((box_between((x0 + 0.005, d / 2, 0.1), (x0 + dw - 0.005, d / 2 + 0.015, h - 0.02)), door))
        hx = x0 + dw - 0.04 if i % 2 == 0 else x0 + 0.04
        parts.append((box((hx, d / 2 + 0.025, h - 0.15), (0.015, 0.02, 0.1)), handle))
    return parts


def build_wardrobe(rng: np.random.Generator) -> list[Part]:
    w, d, h = u(rng, 0.9, 2.0), u(rng, 0.55, 0.62), u(rng, 1.9, 2.2)
    body, handle = wood(rng) if rng.random() < 0.5 else lacquer(rng), metal(rng)
    parts: list[Part] = [(box_between((-w / 2, -d / 2, 0.0), (w / 2, d / 2, h)), body)]
    n = max(2, round(w / 0.5))
    dw = (w - 0.02) / n
    door = Material(vary(rng, body.albedo, 0.04), body.metallic, body.roughness)
    for i in range(n):
        x0 = -w / 2 + 0.01 + i * dw
        parts.append((box_between((x0 + 0.004, d / 2, 0.08), (x0 + dw - 0.004, d / 2 + 0.018, h - 0.03)), door))
        hx = x0 + dw - 0.05 if i % 2 == 0 else x0 + 0.05
        parts.append((box((hx, d / 2 + 0.03, h * 0.5), (0.018, 0.024, 0.3)), handle))
    return parts


def build_shelf(rng: np.random.Generator) -> list[Part]:
    w, d, h = u(rng, 0.6, 1.2), u(rng, 0.28, 0.36), u(rng, 1.2, 2.0)
    body = wood(rng) if rng.random() < 0.6 else lacquer(rng)
    t = 0.025
    parts: list[Part] = [
        (box_between((-w / 2, -d / 2, 0), (-w / 2 + t, d / 2, h)), body),
        (box_between((w / 2 - t, -d / 2, 0), (w / 2, d / 2, h)), body),
        (box_between((-w / 2 + t, -d / 2, 0), (w / 2 - t, -d / 2 + 0.01, h)), body),
    ]
    n = max(3, int(h / 0.35))
    step = (h - t) / n
    for i in range(n + 1):
        z = i * step
        parts.append((box_between((-w / 2 + t, -d / 2 + 0.01, z), (w / 2 - t, d / 2, z + t)), body))
        if i == n:
            break
        # Books: a run of thin boxes of random height and colour on each board.
        x = -w / 2 + t + 0.01
        while rng.random() < 0.93:
            bw = u(rng, 0.02, 0.05)
            if x + bw > w / 2 - t - 0.01:
                break
            bh = min(step - t - 0.02, u(rng, 0.15, 0.3))
            book = Material(vary(rng, pick(rng, FABRICS + LACQUERS), 0.15), 0.0, 0.6)
            front = d / 2 - u(rng, 0.02, 0.08)
            parts.append((box_between((x, -d / 2 + 0.02, z + t), (x + bw, front, z + t + bh)), book))
            x += bw + (u(rng, 0.05, 0.2) if rng.random() < 0.1 else 0.002)
    return parts


def build_lamp(rng: np.random.Generator, table: bool = False) -> list[Part]:
    base, shade = metal(rng), Material(vary(rng, (0.95, 0.9, 0.78), 0.04), 0.0, 0.9)
    if table:
        pole_h, shade_r, shade_h, base_r = u(rng, 0.18, 0.3), u(rng, 0.1, 0.15), u(rng, 0.14, 0.2), u(rng, 0.06, 0.09)
    else:
        pole_h, shade_r, shade_h, base_r = u(rng, 1.2, 1.5), u(rng, 0.16, 0.24), u(rng, 0.22, 0.3), u(rng, 0.13, 0.17)
    return [
        (cylinder(0, 0, 0, base_r, 0.03, 16), base),
        (cylinder(0, 0, 0.03, 0.012 if not table else 0.015, pole_h, 8), base),
        (cylinder(0, 0, 0.03 + pole_h - shade_h * 0.4, shade_r, shade_h, 20, top_scale=0.7), shade),
    ]


def build_plant(rng: np.random.Generator) -> list[Part]:
    pot_r, pot_h = u(rng, 0.1, 0.2), u(rng, 0.2, 0.4)
    pot = Material(vary(rng, pick(rng, POTS)), 0.0, u(rng, 0.3, 0.8))
    leaf = Material(vary(rng, pick(rng, LEAVES), 0.08), 0.0, 0.75)
    parts: list[Part] = [(cylinder(0, 0, 0, pot_r, pot_h, 16, top_scale=1.15), pot)]
    tall = rng.random() < 0.5
    if tall:
        stem_h = u(rng, 0.4, 0.9)
        parts.append((cylinder(0, 0, pot_h, 0.015, stem_h, 6), Material((0.35, 0.25, 0.15), 0.0, 0.8)))
        base_z, r = pot_h + stem_h, u(rng, 0.25, 0.4)
    else:
        base_z, r = pot_h + 0.05, u(rng, 0.22, 0.35)
    for _ in range(int(rng.integers(2, 5))):
        c = (u(rng, -0.3, 0.3) * r, u(rng, -0.3, 0.3) * r, base_z + u(rng, 0.0, 0.5) * r)
        parts.append((ellipsoid(c, (r * u(rng, 0.6, 1.0), r * u(rng, 0.6, 1.0), r * u(rng, 0.5, 0.9))),
                      Material(vary(rng, leaf.albedo, 0.05), 0.0, 0.75)))
    return parts


def build_tv(rng: np.random.Generator, stand: bool = True) -> list[Part]:
    w = u(rng, 0.8, 1.5)
    h, t = w * 0.5625, 0.05
    shell, screen = Material((0.04, 0.04, 0.045), 0.2, 0.3), Material((0.02, 0.025, 0.04), 0.0, 0.08)
    z0 = 0.08 if stand else 0.0
    parts: list[Part] = [
        (box_between((-w / 2, -t / 2, z0), (w / 2, t / 2, z0 + h)), shell),
        (box_between((-w / 2 + 0.02, t / 2, z0 + 0.02), (w / 2 - 0.02, t / 2 + 0.003, z0 + h - 0.02)), screen),
    ]
    if stand:
        parts += [(box_between((-0.2, -0.12, 0), (0.2, 0.12, 0.015)), shell),
                  (box_between((-0.03, -0.02, 0.015), (0.03, 0.02, z0)), shell)]
    return parts


def build_picture(rng: np.random.Generator) -> list[Part]:
    w, h = u(rng, 0.4, 1.2), u(rng, 0.3, 0.9)
    frame = frame_material(rng)
    t = 0.03
    parts: list[Part] = [(box_between((-w / 2, -t / 2, 0), (w / 2, t / 2, h)), frame)]
    # Canvas: a few coloured bands so pictures read as art, not as holes.
    n = int(rng.integers(1, 4))
    inner_w = w - 0.08
    for i in range(n):
        col = Material(vary(rng, tuple(rng.uniform(0.1, 0.95, 3)), 0.0), 0.0, 0.7)
        parts.append((box_between((-inner_w / 2 + i * inner_w / n, t / 2, 0.04),
                                  (-inner_w / 2 + (i + 1) * inner_w / n, t / 2 + 0.004, h - 0.04)), col))
    return parts


BUILDERS: dict[str, Builder] = {
    "bed": build_bed, "nightstand": build_nightstand, "sofa": build_sofa, "chair": build_chair,
    "table": build_table, "coffee_table": lambda r: build_table(r, coffee=True), "desk": build_desk,
    "cabinet": build_cabinet, "tv_stand": lambda r: build_cabinet(r, low=True), "wardrobe": build_wardrobe,
    "shelf": build_shelf, "lamp": build_lamp, "table_lamp": lambda r: build_lamp(r, table=True),
    "plant": build_plant, "tv": build_tv, "wall_tv": lambda r: build_tv(r, stand=False), "picture": build_picture,
}
# Builder name → class label.
LABEL = {"coffee_table": "table", "tv_stand": "cabinet", "table_lamp": "lamp", "wall_tv": "tv"}


@dataclass
class Item:
    """A built piece of furniture in its local frame, recentred: footprint centre at origin, bottom at z = 0."""

    label: str
    parts: list[Part]
    size: np.ndarray


def make_item(rng: np.random.Generator, kind: str) -> Item:
    parts = BUILDERS[kind](rng)
    allv = np.concatenate([m[0] for m, _ in parts])
    lo, hi = allv.min(axis=0), allv.max(axis=0)
    shift = np.array([-(lo[0] + hi[0]) / 2, -(lo[1] + hi[1]) / 2, -lo[2]])
    parts = [((v + shift, f), mat) for (v, f), mat in parts]
    return Item(LABEL.get(kind, kind), parts, hi - lo)


# ---------------------------------------------------------------------------------------------- room
@dataclass
class RoomSpec:
    polygon: np.ndarray  # (P, 2) counter-clockwise
    height: float
    kind: str  # "rect" | "lshape"
    floor_tris: np.ndarray  # (T, 3, 2)


def make_room(rng: np.random.Generator, kinds: tuple[str, ...], size_range: tuple[float, float]) -> RoomSpec:
    kind = str(pick(rng, list(kinds)))
    lo, hi = size_range
    height = u(rng, 2.5, 3.2)
    if kind == "rect":
        w, d = u(rng, lo, hi), u(rng, lo, hi)
        poly = np.array([[0, 0], [w, 0], [w, d], [0, d]], np.float64)
        tris = np.array([[[0, 0], [w, 0], [w, d]], [[0, 0], [w, d], [0, d]]], np.float64)
    else:
        w, d = u(rng, max(lo, 4.0), hi + 1.0), u(rng, max(lo, 4.0), hi + 1.0)
        cw, cd = w * u(rng, 0.3, 0.55), d * u(rng, 0.3, 0.55)
        poly = np.array([[0, 0], [w, 0], [w, d - cd], [w - cw, d - cd], [w - cw, d], [0, d]], np.float64)
        tris = np.array([
            [[0, 0], [w, 0], [w, d - cd]], [[0, 0], [w, d - cd], [0, d - cd]],
            [[0, d - cd], [w - cw, d - cd], [w - cw, d]], [[0, d - cd], [w - cw, d], [0, d]],
        ], np.float64)
        # Random quarter turn so the cut corner is not always the same one.
        k = int(rng.integers(4))
        rot = np.array([[0, -1], [1, 0]], np.float64)
        for _ in range(k):
            poly, tris = poly @ rot.T, tris @ rot.T
        off = poly.min(axis=0)
        poly, tris = poly - off, tris - off
    return RoomSpec(np.round(poly, 6), height, kind, np.round(tris, 6))


def wall_frames(poly: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
    """(a, b, unit direction, inward normal, length) per wall of a counter-clockwise polygon."""
    out = []
    for i in range(len(poly)):
        a, b = poly[i], poly[(i + 1) % len(poly)]
        d = b - a
        length = float(np.hypot(*d))
        dirn = d / length
        out.append((a, dirn, np.array([-dirn[1], dirn[0]]), length))
    return out


def yaw_facing(normal: np.ndarray) -> float:
    """Yaw that turns local +y (an item's front) to `normal`."""
    return float(math.atan2(-normal[0], normal[1]))


class Placer:
    def __init__(self, rng: np.random.Generator, room: RoomSpec):
        self.rng = rng
        self.room = room
        self.walls = wall_frames(room.polygon)
        self.obstacles: list[ObjectBox] = []
        self.reflex = self._reflex_vertices()

    def _reflex_vertices(self) -> np.ndarray:
        p = self.room.polygon
        prev, nxt = np.roll(p, 1, axis=0), np.roll(p, -1, axis=0)
        cross = (p[:, 0] - prev[:, 0]) * (nxt[:, 1] - p[:, 1]) - (p[:, 1] - prev[:, 1]) * (nxt[:, 0] - p[:, 0])
        return p[cross < 0]

    def fits(self, box: ObjectBox) -> bool:
        if box.center[2] + box.size[2] / 2 > self.room.height - 0.05:
            return False
        corners = box.corners2d()
        centre = corners.mean(axis=0)
        shrunk = centre + (corners - centre) * (1 - 1e-4)
        if not point_in_polygon(shrunk, self.room.polygon).all():
            return False
        for r in self.reflex:
            if point_in_polygon(r[None], shrunk)[0]:
                return False
        return not any(obb_overlap(box, o) for o in self.obstacles)

    def box_at(self, size: np.ndarray, xy: np.ndarray, yaw: float, z0: float = 0.0) -> ObjectBox:
        return ObjectBox(0, "", np.array([xy[0], xy[1], z0 + size[2] / 2]), np.asarray(size, np.float64), yaw)

    def on_wall(self, size: np.ndarray, wall: int, t: float, gap: float, z0: float = 0.0) -> ObjectBox:
        a, dirn, normal, _ = self.walls[wall]
        xy = a + dirn * t + normal * (size[1] / 2 + gap)
        return self.box_at(size, xy, yaw_facing(normal), z0)

    def against_wall(self, size: np.ndarray, tries: int = 40, gap: float = 0.02, z0: float = 0.0,
                     wall: int | None = None, t: float | None = None) -> ObjectBox | None:
        lengths = np.array([w[3] for w in self.walls])
        for _ in range(tries):
            wi = wall if wall is not None else int(self.rng.choice(len(self.walls), p=lengths / lengths.sum()))
            length = self.walls[wi][3]
            if length < size[0] + 0.02:
                continue
            tt = t if t is not None else u(self.rng, size[0] / 2 + 0.01, length - size[0] / 2 - 0.01)
            box = self.on_wall(size, wi, tt, gap, z0)
            if self.fits(box):
                return box
            if t is not None:
                return None
        return None

    def free(self, size: np.ndarray, tries: int = 40, yaw: float | None = None,
             margin: float = 0.4) -> ObjectBox | None:
        lo, hi = self.room.polygon.min(axis=0) + margin, self.room.polygon.max(axis=0) - margin
        if (hi <= lo).any():
            return None
        for _ in range(tries):
            xy = self.rng.uniform(lo, hi)
            yy = yaw if yaw is not None else float(pick(self.rng, [0.0, math.pi / 2])) + u(self.rng, -0.05, 0.05)
            box = self.box_at(size, xy, yy)
            # Free-standing furniture keeps a walkway to the walls.
            grown = ObjectBox(0, "", box.center, box.size + np.array([2 * margin, 2 * margin, 0.0]), box.yaw)
            if self.fits(box) and self.fits_room_only(grown):
                return box
        return None

    def fits_room_only(self, box: ObjectBox) -> bool:
        corners = box.corners2d()
        if not point_in_polygon(corners, self.room.polygon).all():
            return False
        return not any(point_in_polygon(r[None], corners)[0] for r in self.reflex)


# ---------------------------------------------------------------------------------------------- scene


@dataclass
class ProceduralOptions:
    room_kinds: tuple[str, ...] = ("rect", "lshape")
    size_range: tuple[float, float] = (3.0, 7.0)
    archetypes: tuple[str, ...] = ARCHETYPES
    min_objects: int = 4
    max_objects: int = 18


class _Composer:
    def __init__(self, rng: np.random.Generator, name: str, room: RoomSpec, opts: ProceduralOptions):
        self.rng, self.room, self.opts = rng, room, opts
        self.sb = SceneBuilder(name)
        self.placer = Placer(rng, room)
        self.objects: list[ObjectBox] = []
        self.walls: list[Wall] = []
        self.doors: list[Opening] = []
        self.windows: list[Opening] = []

    # -- structure
    def structure(self) -> None:
        rng, room, sb = self.rng, self.room, self.sb
        h = room.height
        wall_mat = Material(vary(rng, pick(rng, PAINTS), 0.03), 0.0, u(rng, 0.8, 0.95))
        kind, rgb, rough = pick(rng, FLOORS)
        floor_mat = Material(vary(rng, rgb, 0.05), 0.0, rough)
        ceil_mat = Material(vary(rng, (0.94, 0.94, 0.93), 0.01), 0.0, 0.9)
        for a, dirn, _normal, length in self.placer.walls:
            b = a + dirn * length
            inst = sb.new_instance()
            p0, p1 = np.array([*a, 0.0]), np.array([*b, 0.0])
            up = np.array([0, 0, h])
            # Wound so the face normal (right-hand rule) points into the room.
            v, f = quad(p1, p0, p0 + up, p1 + up)
            sb.add(v, f, "wall", inst, wall_mat)
            self.walls.append(Wall(p0, p1, h, 0.1, inst))
        tris = room.floor_tris
        fi = sb.new_instance()
        v = np.concatenate([tris.reshape(-1, 2), np.zeros((tris.size // 2, 1))], axis=1)
        f = np.arange(len(v)).reshape(-1, 3)
        sb.add(v, f, "floor", fi, floor_mat)
        ci = sb.new_instance()
        vc = v.copy()
        vc[:, 2] = h
        sb.add(vc, f[:, ::-1], "ceiling", ci, ceil_mat)
        self.meta = {"floor_material": kind}

    def openings(self) -> None:
        rng, placer = self.rng, self.placer
        walls = placer.walls
        order = rng.permutation(len(walls))
        n_doors = 1 if rng.random() < 0.75 else 2
        n_windows = int(rng.integers(0, 4))
        used: dict[int, list[tuple[float, float]]] = {}
        door_mat = Material(vary(rng, pick(rng, WOODS + LACQUERS), 0.04), 0.0, 0.5)
        frame_mat = Material(vary(rng, (0.93, 0.93, 0.9), 0.02), 0.0, 0.4)
        glass = Material((0.72, 0.84, 0.96), 0.0, 0.05)
        plan = ["door"] * n_doors + ["window"] * n_windows
        for j, kind in enumerate(plan):
            for attempt in range(12):
                wi = int(order[(j + attempt) % len(order)])
                _, _, _, length = walls[wi]
                if kind == "door":
                    w, h, z0 = u(rng, 0.8, 1.0), u(rng, 2.0, 2.1), 0.0
                else:
                    w, h, z0 = u(rng, 0.8, 2.0), u(rng, 1.0, 1.5), u(rng, 0.8, 1.0)
                    h = min(h, self.room.height - z0 - 0.25)
                if length < w + 0.5:
                    continue
                t = u(rng, w / 2 + 0.2, length - w / 2 - 0.2)
                if any(t + w / 2 + 0.15 > s and t - w / 2 - 0.15 < e for s, e in used.get(wi, [])):
                    continue
                used.setdefault(wi, []).append((t - w / 2, t + w / 2))
                self._add_opening(kind, wi, t, w, h, z0, door_mat if kind == "door" else glass, frame_mat)
                break

    def _add_opening(self, kind: str, wi: int, t: float, w: float, h: float, z0: float, panel: Material,
                     frame: Material) -> None:
        sb, placer = self.sb, self.placer
        a, dirn, normal, _ = placer.walls[wi]
        inst = sb.new_instance()
        yaw = yaw_facing(normal)
        rot = yaw_matrix(yaw)
        origin = np.array([*(a + dirn * t), z0])
        # Local frame: x along the wall, +y into the room, z up; the wall's inner face is y = 0.
        fw = 0.06
        parts: list[Mesh] = []
        if kind == "door":
            panel_mesh = box_between((-w / 2, 0, 0), (w / 2, 0.04, h))
            handle = box((w / 2 - 0.08, 0.06, 1.0), (0.12, 0.04, 0.025))
            frame_meshes = [box_between((-w / 2 - fw, 0, 0), (-w / 2, 0.02, h + fw)),
                            box_between((w / 2, 0, 0), (w / 2 + fw, 0.02, h + fw)),
                            box_between((-w / 2, 0, h), (w / 2, 0.02, h + fw))]
            meshes = [(panel_mesh, panel), (handle, Material((0.75, 0.75, 0.77), 0.9, 0.3))]
        else:
            panel_mesh = box_between((-w / 2, 0, 0), (w / 2, 0.01, h))
            frame_meshes = [box_between((-w / 2 - fw, 0, -fw), (-w / 2, 0.05, h + fw)),
                            box_between((w / 2, 0, -fw), (w / 2 + fw, 0.05, h + fw)),
                            box_between((-w / 2, 0, h), (w / 2, 0.05, h + fw)),
                            box_between((-w / 2 - fw, 0, -fw), (w / 2 + fw, 0.08, 0.0))]
            if w > 1.2:
                frame_meshes.append(box_between((-0.02, 0, 0), (0.02, 0.04, h)))
            meshes = [(panel_mesh, panel)]
        meshes += [(m, frame) for m in frame_meshes]
        for (v, f), mat in meshes:
            sb.add(v @ rot.T + origin, f, kind, inst, mat)
            parts.append((v, f))
        allv = np.concatenate([v for v, _ in parts])
        lo, hi = allv.min(axis=0), allv.max(axis=0)
        centre_local = (lo + hi) / 2
        obstacle = ObjectBox(inst, kind, rot @ centre_local + origin, hi - lo, yaw)
        placer.obstacles.append(obstacle)
        # Keep the space in front free: a walkway for doors, no tall furniture in front of windows.
        depth = 0.9 if kind == "door" else 0.45
        clear_lo = np.array([lo[0], 0.0, lo[2]])
        clear_hi = np.array([hi[0], depth, hi[2]])
        placer.obstacles.append(ObjectBox(0, "clearance", rot @ ((clear_lo + clear_hi) / 2) + origin,
                                          clear_hi - clear_lo, yaw))
        op = Opening(kind, wi, np.array([*(a + dirn * t), z0 + h / 2]), w, h, inst)
        (self.doors if kind == "door" else self.windows).append(op)

    # -- furniture
    def commit(self, item: Item, box: ObjectBox) -> ObjectBox:
        inst = self.sb.new_instance()
        rot = yaw_matrix(box.yaw)
        origin = np.array([box.center[0], box.center[1], box.center[2] - box.size[2] / 2])
        for (v, f), mat in item.parts:
            self.sb.add(v @ rot.T + origin, f, item.label, inst, mat)
        placed = ObjectBox(inst, item.label, box.center.copy(), item.size.copy(), box.yaw)
        self.objects.append(placed)
        self.placer.obstacles.append(placed)
        return placed

    def item(self, kind: str) -> Item:
        return make_item(self.rng, kind)

    def place_wall(self, kind: str, gap: float = 0.02, **kw) -> tuple[ObjectBox, Item] | None:
        it = self.item(kind)
        box = self.placer.against_wall(it.size, gap=gap, **kw)
        return (self.commit(it, box), it) if box is not None else None

    def place_on(self, kind: str, support: ObjectBox, offset: float = 0.0) -> ObjectBox | None:
        """Put an item on top of another (a lamp on a nightstand, a tv on a stand)."""
        it = self.item(kind)
        if it.size[0] > support.size[0] or it.size[1] > support.size[1]:
            return None
        rot = yaw_matrix(support.yaw)
        room = support.size[0] / 2 - it.size[0] / 2
        local = np.array([np.clip(offset, -room, room), 0.0, 0.0])
        xy = (rot @ local)[:2] + support.center[:2]
        box = self.placer.box_at(it.size, xy, support.yaw, support.center[2] + support.size[2] / 2)
        return self.commit(it, box) if self.placer.fits(box) else None

    def place_front(self, kind: str, anchor: ObjectBox, distance: float, facing_back: bool = False) -> ObjectBox | None:
        """Place an item in front of `anchor` (a chair at a desk, a coffee table before a sofa)."""
        it = self.item(kind)
        rot = yaw_matrix(anchor.yaw)
        local = np.array([0.0, anchor.size[1] / 2 + distance + it.size[1] / 2, 0.0])
        xy = (rot @ local)[:2] + anchor.center[:2]
        yaw = anchor.yaw + (math.pi if facing_back else 0.0)
        box = self.placer.box_at(it.size, xy, yaw)
        return self.commit(it, box) if self.placer.fits(box) else None

    def place_beside(self, kind: str, anchor: ObjectBox, side: int, gap: float = 0.05) -> ObjectBox | None:
        """Against the same wall as `anchor`, to its left (-1) or right (+1)."""
        it = self.item(kind)
        rot = yaw_matrix(anchor.yaw)
        back = anchor.center[:2] + (rot @ np.array([0.0, -anchor.size[1] / 2, 0.0]))[:2]
        local = np.array([side * (anchor.size[0] / 2 + gap + it.size[0] / 2), it.size[1] / 2, 0.0])
        xy = back + (rot @ local)[:2]
        box = self.placer.box_at(it.size, xy, anchor.yaw)
        return self.commit(it, box) if self.placer.fits(box) else None

    def place_free(self, kind: str, **kw) -> ObjectBox | None:
        it = self.item(kind)
        box = self.placer.free(it.size, **kw)
        return self.commit(it, box) if box is not None else None

    def place_picture(self) -> ObjectBox | None:
        it = self.item("picture")
        z0 = u(self.rng, 1.3, 1.7) - it.size[2] / 2
        box = self.placer.against_wall(it.size, gap=0.0, z0=z0, tries=20)
        return self.commit(it, box) if box is not None else None

    def around_table(self, table: ObjectBox) -> None:
        rot = yaw_matrix(table.yaw)
        sides = [(0, 1), (0, -1)]
        if table.size[0] > 1.0:
            sides += [(1, 0), (-1, 0)]
        for sx, sy in sides:
            if self.rng.random() < 0.15:
                continue
            it = self.item("chair")
            n = 2 if sy and table.size[0] > 1.4 else 1
            for k in range(n):
                along = (k - (n - 1) / 2) * table.size[0] / 2 if sy else 0.0
                dist = 0.08
                if sy:
                    local = np.array([along, sy * (table.size[1] / 2 + dist + it.size[1] / 2), 0.0])
                else:
                    local = np.array([sx * (table.size[0] / 2 + dist + it.size[1] / 2), 0.0, 0.0])
                xy = (rot @ local)[:2] + table.center[:2]
                # The chair's front (+y) faces the table.
                to_table = table.center[:2] - xy
                yaw = yaw_facing(to_table / np.linalg.norm(to_table))
                box = self.placer.box_at(it.size, xy, yaw)
                if self.placer.fits(box):
                    self.commit(it, box)
                    it = self.item("chair")

    def furnish(self, archetype: str) -> None:
        r = self.rng
        if archetype == "bedroom":
            bed = self.place_wall("bed")
            if bed:
                for side in (-1, 1):
                    if r.random() < 0.8 and (ns := self.place_beside("nightstand", bed[0], side)) and r.random() < 0.7:
                        self.place_on("table_lamp", ns)
            if r.random() < 0.7:
                self.place_wall("wardrobe")
            if r.random() < 0.4 and (desk := self.place_wall("desk")):
                self.place_front("chair", desk[0], 0.1, facing_back=True)
        elif archetype == "living_room":
            sofa = self.place_wall("sofa")
            if sofa and r.random() < 0.8:
                self.place_front("coffee_table", sofa[0], u(r, 0.3, 0.45))
            if r.random() < 0.8 and (stand := self.place_wall("tv_stand")):
                self.place_on("tv", stand[0])
            elif r.random() < 0.5:
                self.place_wall("wall_tv", gap=0.0, z0=u(r, 0.9, 1.2), tries=20)
            if r.random() < 0.6:
                self.place_wall("shelf")
            if r.random() < 0.5:
                self.place_free("chair", yaw=u(r, -math.pi, math.pi))
        elif archetype == "dining_room":
            table = self.place_free("table", margin=0.75)
            if table:
                self.around_table(table)
            if r.random() < 0.7:
                self.place_wall("cabinet")
        else:  # office
            for _ in range(int(r.integers(1, 3))):
                if desk := self.place_wall("desk"):
                    self.place_front("chair", desk[0], 0.1, facing_back=True)
                    if r.random() < 0.5:
                        self.place_on("table_lamp", desk[0], offset=-desk[0].size[0] / 2)
            for _ in range(int(r.integers(1, 3))):
                self.place_wall("shelf")
            if r.random() < 0.6:
                self.place_wall("cabinet")
        # Extras for every room: plants, floor lamps, pictures, shelves, up to the object budget.
        target = int(r.integers(self.opts.min_objects, self.opts.max_objects + 1))
        extras = ["plant", "lamp", "picture", "picture", "shelf", "cabinet", "plant", "chair"]
        attempts = 0
        while len(self.objects) < target and attempts < 3 * target:
            attempts += 1
            kind = str(pick(r, extras))
            if kind == "picture":
                self.place_picture()
            elif kind == "chair":
                self.place_free("chair", yaw=u(r, -math.pi, math.pi))
            else:
                self.place_wall(kind, tries=15)

    def build(self, archetype: str, seed_info: dict) -> Scene:
        # "oriented": every face is wound outward (boxes) or into the room (walls), so back faces can be culled.
        meta = {"source": "procedural", "oriented": True, "room_type": self.room.kind, "archetype": archetype,
                "room_height": round(self.room.height, 6), **self.meta, **seed_info}
        return self.sb.build(objects=self.objects, walls=self.walls, doors=self.doors, windows=self.windows,
                             floor_polygon=self.room.polygon.copy(), meta=meta)


def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def generate_scene(seed: int, index: int, opts: ProceduralOptions | None = None) -> Scene:
    """Scene `index` of the procedural dataset with base `seed`: the same arguments give the same scene."""
    opts = opts or ProceduralOptions()
    rng = scene_rng(seed, index)
    room = make_room(rng, opts.room_kinds, opts.size_range)
    archetype = str(pick(rng, list(opts.archetypes)))
    comp = _Composer(rng, f"scene-{index:06d}", room, opts)
    comp.structure()
    comp.openings()
    comp.furnish(archetype)
    return comp.build(archetype, {"seed": int(seed), "index": int(index)})


def room_polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return float(0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


__all__ = ["ARCHETYPES", "ProceduralOptions", "generate_scene", "make_item", "merge", "room_polygon_area"]
