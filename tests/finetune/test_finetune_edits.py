"""GRPO's edit iterations: batches of the smoke data's edit pairs (both sides from one camera, each `after` repeated
per group), and one clear sentence where the data has no pairs or the reward no weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interiorfusion_core.errors import UserError
from interiorfusion_data.loader import open_dataset
from interiorfusion_finetune.config import RLConfig
from interiorfusion_finetune.edit_batches import EditPairs


def test_edit_batches_pair_both_sides_through_one_camera(smoke_data: str) -> None:
    pairs = EditPairs(smoke_data)
    info = open_dataset(smoke_data, "train").info
    assert len(pairs) == info["edits"]["train"]["num_pairs"] > 0
    group = 3
    batch = pairs.batch(np.random.default_rng(0), 2, group, 64, 4)
    assert len(batch.after["rgb"]) == 2 * group and len(batch.before["rgb"]) == 2
    for g in range(2):
        after = slice(g * group, (g + 1) * group)
        assert len(set(batch.after["keys"][after])) == 1
        assert batch.after["keys"][g * group] != batch.before["keys"][g]
        # One room, one camera, one frame: the pair's two sides are directly comparable.
        for field in ("cam_to_world", "intrinsics", "origin", "cube_size"):
            assert torch.equal(batch.after[field][g * group], batch.before[field][g]), field
        assert batch.boxes[g].shape[1:] == (2, 3) and batch.kinds[g] in ("move", "remove", "add")
    assert batch.after["resolution"] == 64 and batch.after["latent_resolution"] == 16
    # Seeded: the same generator state gives the same pairs and views.
    again = pairs.batch(np.random.default_rng(0), 2, group, 64, 4)
    assert again.after["keys"] == batch.after["keys"] and torch.equal(again.after["rgb"], batch.after["rgb"])


def test_data_without_edit_pairs_is_one_sentence(real_smoke_data: str) -> None:
    with pytest.raises(UserError, match=r"no edit pairs in split 'train'.*rl\.edit_every"):
        EditPairs(real_smoke_data)


def test_edit_iterations_need_a_weighted_edit_reward() -> None:
    assert RLConfig.model_validate({"edit_every": 3}).edit_every == 3
    with pytest.raises(ValueError, match="edit_quality is 0"):
        RLConfig.model_validate({"edit_every": 3, "reward_weights": {"edit_quality": 0.0}})
