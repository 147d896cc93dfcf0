"""Condition batches of the data stage's edit pairs, for GRPO's edit-quality iterations (docs/finetune.md).

A pair names a `before` and an `after` sample of one room (docs/data-format.md, "Edit pairs"): the same cameras and
voxel frame, one object moved, removed or added. An edit iteration samples the policy on the `after` conditions
and scores each rollout's change against the reference policy's scene from the `before` conditions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from interiorfusion_core.errors import UserError
from interiorfusion_data.loader import SceneDataset, collate_scenes, open_dataset
from interiorfusion_structure.task import VIEW_FIELDS


def view_batch(samples: list[dict[str, Any]], resolution: int, compression: int) -> dict[str, Any]:
    """The structure task's condition fields (one view per sample) from decoded data samples, without latents."""
    views = collate_scenes(samples)
    cube = torch.tensor([float(s["meta"]["cube_size"]) for s in samples], dtype=torch.float32)
    return {
        "keys": views["keys"], "rgb": views["rgb"][:, 0], "depth": views["depth"][:, 0],
        "intrinsics": views["intrinsics"][:, 0], "cam_to_world": views["cam_to_world"][:, 0],
        "origin": torch.tensor(np.stack([np.asarray(s["meta"]["origin"], np.float64) for s in samples]),
                               dtype=torch.float32),
        "cube_size": cube, "voxel_size": cube / resolution, "resolution": resolution,
        "latent_resolution": resolution // compression, "compression": compression,
        "layout_text": views.get("layout_text", [""] * len(samples)),
        "has_layout": views.get("has_layout", torch.ones(len(samples), dtype=torch.bool)),
    }


@dataclass
class EditBatch:
    after: dict[str, Any]  # the pairs' `after` conditions, each repeated `group` times (the rollouts' batch)
    before: dict[str, Any]  # the pairs' `before` conditions, once each (the reference scenes' batch)
    boxes: list[np.ndarray]  # per pair [K, 2, 3]: the changed region, metres
    kinds: list[str]


class EditPairs:
    """The edit pairs of one split of a data-stage output, with random access to both sides' views."""

    def __init__(self, data_uri: str, split: str = "train"):
        base = open_dataset(data_uri, split)
        pairs = base.info.get("edits", {}).get(split, {}).get("pairs", [])
        if not pairs:
            raise UserError(f"{data_uri}: the dataset has no edit pairs in split '{split}', which rl.edit_every "
                            "needs: run the data stage with `edits:` (docs/data-format.md, \"Edit pairs\") and wire "
                            "it as the grpo stage's `data` input, or set rl.edit_every: 0")
        edited = open_dataset(data_uri, f"edits-{split}")
        self.uri = data_uri
        self.views = max(int(base.info.get("views") or 1), 1)
        self.pairs: list[dict[str, Any]] = pairs
        self._where: dict[str, tuple[SceneDataset, int]] = {}
        for ds in (base, edited):
            self._where |= {ref.key: (ds, i) for i, ref in enumerate(ds.refs)}
        missing = sorted({k for p in pairs for k in (p["before"], p["after"]) if k not in self._where})
        if missing:
            raise UserError(f"{data_uri}: edit pairs name samples the dataset lacks ({', '.join(missing[:3])})")

    def __len__(self) -> int:
        return len(self.pairs)

    def _view(self, key: str, view: int) -> dict[str, Any]:
        ds, i = self._where[key]
        return ds.get(i, None, fields=VIEW_FIELDS, views=[view])

    def batch(self, rng: np.random.Generator, count: int, group: int, resolution: int, compression: int
              ) -> EditBatch:
        """`count` pairs drawn by `rng` (with replacement beyond the pairs there are), one view each: the same
        camera on both sides."""
        chosen = rng.choice(len(self.pairs), size=count, replace=count > len(self.pairs))
        after, before, boxes, kinds = [], [], [], []
        for j in chosen.tolist():
            pair = self.pairs[j]
            view = int(rng.integers(self.views))
            a, b = self._view(pair["after"], view), self._view(pair["before"], view)
            after += [a] * group
            before.append(b)
            boxes.append(np.asarray(pair["boxes"], np.float64).reshape(-1, 2, 3))
            kinds.append(pair["kind"])
        return EditBatch(view_batch(after, resolution, compression), view_batch(before, resolution, compression),
                         boxes, kinds)


__all__ = ["EditBatch", "EditPairs", "view_batch"]
