"""Mixing loaders by weight (the LoRA stage's real scans and synthetic replay): the shares follow the weights, the
source sequence is reproducible, and a resumed mix continues exactly where the saved one was."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from interiorfusion_core.config import load_config
from interiorfusion_core.errors import ConfigError
from interiorfusion_finetune.mixing import MixedLoader


class Counting:
    """A resumable loader of `n` batches per epoch: ('name', epoch, index)."""

    def __init__(self, name: str, n: int):
        self.name, self.n, self.epoch, self.consumed = name, n, 0, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        while self.consumed < self.n:
            self.consumed += 1
            yield (self.name, self.epoch, self.consumed - 1)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = state["epoch"], state["consumed"]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0


def _mix(weights: tuple[float, float]) -> MixedLoader:
    return MixedLoader([Counting("real", 200), Counting("replay", 7)], list(weights), seed=3)


def test_shares_follow_the_weights_and_sources_roll_over() -> None:
    batches = list(_mix((3.0, 1.0)))
    assert len(batches) == 200  # the first source's epoch sets the pace
    share = Counter(b[0] for b in batches)["replay"] / len(batches)
    assert 0.17 < share < 0.33  # 1 / 4 expected
    replay = [b for b in batches if b[0] == "replay"]
    assert max(b[1] for b in replay) >= 5  # 7 batches per replay epoch: it rolled over several times
    assert [b[0] for b in list(_mix((3.0, 1.0)))] == [b[0] for b in batches]  # reproducible
    assert {b[0] for b in _mix((1.0, 0.0))} == {"real"}


def test_a_resumed_mix_continues_exactly() -> None:
    full = list(_mix((1.0, 1.0)))
    first = _mix((1.0, 1.0))
    it = iter(first)
    head = [next(it) for _ in range(37)]
    state = first.state_dict()
    second = _mix((1.0, 1.0))
    second.load_state_dict(state)
    assert head + list(second) == full


def test_zero_weights_everywhere_are_refused(tmp_path) -> None:
    path = tmp_path / "lora.yaml"
    path.write_text("kind: finetune_lora\ndata: {dataset: InteriorFusion-Real, weight: 0.0}\n")
    with pytest.raises(ConfigError, match="data.weight and replay.weight are both 0"):
        load_config(path)
