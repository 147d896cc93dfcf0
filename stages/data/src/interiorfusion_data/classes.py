"""The class table: each project class (interiorfusion_data.scene.CLASSES) mapped to external label sets.

Plain data, one place. Per class:

- `nyu40`: the NYU Depth v2 40-class id (1 wall … 40 otherprop; 0 = unannotated), the ids ScanNet ships in
  `scannetv2-labels.combined.tsv` (column `nyu40id`).
- `scannet18`: the index (0–17) in the ScanNet 3D-detection benchmark's 18 classes (VoteNet / ScanNet
  `DC.nyu40ids` order: cabinet, bed, chair, sofa, table, door, window, bookshelf, picture, counter, desk,
  curtain, refrigerator, shower curtain, toilet, sink, bathtub, otherfurniture = NYU40 ids 3 4 5 6 7 8 9 10 11
  12 14 16 24 28 33 34 36 39), or None when the class is not one of them (detection ignores it).
- `ade20k`: the ADE20K SceneParsing-150 id as in its `objectInfo150.csv` (`Idx`, 1-based: 1 wall, 4 floor,
  6 ceiling, …; 0 = "other"/unlabelled). Mask2Former's ADE20K-150 heads predict `ade20k - 1` (0-based, with
  `reduce_zero_label`); `ade20k_train_id()` returns that, or None.

Sources: NYU40 names from Gupta et al.'s 40-class mapping of NYU Depth v2 as used by ScanNet; the ScanNet-18 list
from the ScanNet benchmark / VoteNet `scannet_utils`; ADE20K-150 from `objectInfo150.csv` of the MIT Scene
Parsing benchmark. Choices where no set has the class: wardrobe → NYU40 otherfurniture (39, as ScanNet's
mapping files it); the generator's shelf is a bookshelf with books → NYU40 bookshelf (10), ADE20K bookcase (63);
nightstand → NYU40 night stand (32, not a ScanNet-18 class), ADE20K chest of drawers (45); "other" (a labelled
object outside the table) → NYU40 otherprop (40), no ScanNet-18 or ADE20K class.
"""

from __future__ import annotations

from interiorfusion_data.scene import CLASSES

# The 18 ScanNet detection classes, by NYU40 id, in benchmark order.
SCANNET18_NYU40 = (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
SCANNET18_NAMES = ("cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture", "counter",
                   "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink", "bathtub",
                   "otherfurniture")

NYU40_NAMES = (
    "unannotated", "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat",
    "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel", "shower curtain", "box",
    "whiteboard", "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure",
    "otherfurniture", "otherprop",
)

# Names of the ADE20K-150 ids used below (objectInfo150.csv, first name of each row).
ADE20K_NAMES = {
    1: "wall", 4: "floor", 6: "ceiling", 8: "bed", 9: "windowpane", 11: "cabinet", 15: "door", 16: "table",
    18: "plant", 19: "curtain", 20: "chair", 23: "painting", 24: "sofa", 34: "desk", 36: "wardrobe", 37: "lamp",
    38: "bathtub", 45: "chest of drawers", 46: "counter", 48: "sink", 51: "refrigerator", 63: "bookcase",
    66: "toilet", 90: "television receiver",
}

# class → (nyu40, ade20k). ScanNet-18 follows from nyu40.
_TABLE: dict[str, tuple[int, int]] = {
    "void": (0, 0),
    "wall": (1, 1),
    "floor": (2, 4),
    "ceiling": (22, 6),
    "door": (8, 15),
    "window": (9, 9),
    "bed": (4, 8),
    "nightstand": (32, 45),
    "sofa": (6, 24),
    "chair": (5, 20),
    "table": (7, 16),
    "desk": (14, 34),
    "cabinet": (3, 11),
    "wardrobe": (39, 36),
    "shelf": (10, 63),
    "lamp": (35, 37),
    "plant": (40, 18),
    "tv": (25, 90),
    "picture": (11, 23),
    "other": (40, 0),
    "counter": (12, 46),
    "curtain": (16, 19),
    "refrigerator": (24, 51),
    "shower_curtain": (28, 19),
    "toilet": (33, 66),
    "sink": (34, 48),
    "bathtub": (36, 38),
    "unknown": (0, 0),
}

NYU40: dict[str, int] = {c: _TABLE[c][0] for c in CLASSES}
ADE20K: dict[str, int] = {c: _TABLE[c][1] for c in CLASSES}
SCANNET18: dict[str, int | None] = {
    c: (SCANNET18_NYU40.index(n) if n in SCANNET18_NYU40 else None) for c, n in NYU40.items()
}
# Ids (index = project class id) for vectorised lookups: np.asarray(NYU40_BY_ID)[labels].
NYU40_BY_ID: tuple[int, ...] = tuple(NYU40[c] for c in CLASSES)
ADE20K_BY_ID: tuple[int, ...] = tuple(ADE20K[c] for c in CLASSES)
SCANNET18_BY_ID: tuple[int, ...] = tuple(-1 if SCANNET18[c] is None else SCANNET18[c] for c in CLASSES)


def ade20k_train_id(name: str) -> int | None:
    """The 0-based ADE20K-150 index a Mask2Former head predicts for class `name`, or None (no ADE class)."""
    idx = ADE20K[name]
    return idx - 1 if idx else None


def table_rows() -> list[dict[str, object]]:
    """The table as rows (for docs and reports)."""
    return [{"id": i, "class": c, "nyu40": NYU40[c], "nyu40_name": NYU40_NAMES[NYU40[c]],
             "scannet18": SCANNET18[c], "ade20k": ADE20K[c], "ade20k_name": ADE20K_NAMES.get(ADE20K[c])}
            for i, c in enumerate(CLASSES)]
