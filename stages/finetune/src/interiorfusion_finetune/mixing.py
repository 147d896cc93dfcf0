"""Batches from several resumable loaders mixed by weight (the LoRA stage's real scans and synthetic replay).

Each draw picks a source with probability weight / Σ weights from a generator seeded by (seed, epoch, draw), so the
sequence of sources is the same on every rerun and after a resume; a source that runs out starts its next epoch.
An epoch of the mix is as many draws as the first source has batches (the real scans set the pace). The state is
the mix's position plus every source's own state.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np


class MixedLoader:
    def __init__(self, loaders: Sequence[Any], weights: Sequence[float], seed: int):
        if len(loaders) != len(weights) or not loaders:
            raise ValueError("one weight per loader")
        total = float(sum(weights))
        if total <= 0:
            raise ValueError("the mixing weights add up to 0")
        self.loaders, self.probs, self.seed = list(loaders), np.asarray(weights, float) / total, seed
        self.epoch, self.consumed = 0, 0
        self.source_epochs = [0] * len(loaders)
        self._iters: list[Iterator[Any] | None] = [None] * len(loaders)

    def __len__(self) -> int:
        return len(self.loaders[0])

    def choice(self, epoch: int, draw: int) -> int:
        rng = np.random.default_rng([self.seed, epoch, draw, 0x4D1C])
        return int(rng.choice(len(self.loaders), p=self.probs))

    def _next_from(self, i: int) -> Any:
        for _ in range(2):  # a source at the end of its epoch starts the next one, once
            if self._iters[i] is None:
                self._iters[i] = iter(self.loaders[i])
            try:
                return next(self._iters[i])  # type: ignore[arg-type]
            except StopIteration:
                self.source_epochs[i] += 1
                self.loaders[i].set_epoch(self.source_epochs[i])
                self._iters[i] = None
        raise RuntimeError(f"mixed source {i} yields no batch")

    def __iter__(self) -> Iterator[Any]:
        while self.consumed < len(self):
            batch = self._next_from(self.choice(self.epoch, self.consumed))
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "source_epochs": list(self.source_epochs),
                "sources": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self.source_epochs = [int(e) for e in state["source_epochs"]]
        for loader, e, s in zip(self.loaders, self.source_epochs, state["sources"], strict=True):
            loader.set_epoch(e)
            loader.load_state_dict(s)
        self._iters = [None] * len(self.loaders)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = int(epoch), 0
        elif self.consumed >= len(self):
            self.consumed = 0


__all__ = ["MixedLoader"]
