"""`InMemoryLoader`: the reference implementation of the engine's resumable-loader contract (tests, toy runs).

Sharding keeps runs comparable across world sizes: each epoch draws one permutation of the dataset (seeded by
seed and epoch), cuts it into *global* batches of `batch_size × world_size` samples (the last partial one is
dropped), and rank r takes the r-th slice of each. So one process with batch 8 sees exactly the union of what two
processes with batch 4 see, step by step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch


def default_collate(samples: Sequence[Any]) -> Any:
    first = samples[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(samples))
    if isinstance(first, Mapping):
        return {k: default_collate([s[k] for s in samples]) for k in first}
    if isinstance(first, tuple | list):
        return type(first)(default_collate(list(parts)) for parts in zip(*samples, strict=True))
    if isinstance(first, int | float):
        return torch.tensor(samples)
    return list(samples)


class InMemoryLoader:
    def __init__(
        self,
        dataset: Sequence[Any],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        collate: Callable[[Sequence[Any]], Any] = default_collate,
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.collate = collate
        self.epoch = 0
        self.position = 0  # batches of this epoch already handed out
        global_batch = batch_size * world_size
        if len(dataset) < global_batch:
            raise ValueError(f"dataset of {len(dataset)} samples is smaller than one global batch ({global_batch})")

    def __len__(self) -> int:
        return len(self.dataset) // (self.batch_size * self.world_size)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.dataset)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def __iter__(self) -> Iterator[Any]:
        order = self._order()
        global_batch = self.batch_size * self.world_size
        while self.position < len(self):
            start = self.position * global_batch + self.rank * self.batch_size
            idx = order[start:start + self.batch_size]
            self.position += 1  # counted when handed out, so state_dict() between batches is exact
            yield self.collate([self.dataset[i] for i in idx])

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0


__all__ = ["InMemoryLoader", "default_collate"]
