"""Exponential moving average of the trainable weights (fp32 shadow copies).

Under ZeRO-3 each rank averages only its own partition (`param.ds_tensor`), so the EMA is sharded like the model;
`full_state_dict()` all-gathers it (a collective: every rank calls it)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, module: nn.Module, decay: float, start_step: int = 0, *, zero3: bool = False):
        self.decay = decay
        self.start_step = start_step
        self.zero3 = zero3
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.shadow = {n: self._local(p).detach().float().clone() for n, p in self.params.items()}

    def _local(self, p: nn.Parameter) -> torch.Tensor:
        return p.ds_tensor if self.zero3 else p  # type: ignore[attr-defined]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step number `step` (1-based): track the weights until `start_step`, then average."""
        if step <= self.start_step:
            for n, p in self.params.items():
                self.shadow[n].copy_(self._local(p))
            return
        names = list(self.params)
        shadows = [self.shadow[n] for n in names]
        current = [self._local(self.params[n]).float() for n in names]
        torch._foreach_lerp_(shadows, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's shadow tensors (the full EMA unless ZeRO-3)."""
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameter(s), e.g. {sorted(missing)[0]}")
        for n, t in self.shadow.items():
            t.copy_(state[n])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole EMA model (ZeRO-3: gathered from every rank's partition; collective)."""
        if not self.zero3:
            return {n: t.cpu() for n, t in self.shadow.items()}
        import torch.distributed as dist

        world = dist.get_world_size()
        out: dict[str, torch.Tensor] = {}
        for n, p in self.params.items():
            part = self.shadow[n]
            parts = [torch.empty_like(part) for _ in range(world)]
            dist.all_gather(parts, part)
            numel = p.ds_numel  # type: ignore[attr-defined]
            out[n] = torch.cat(parts)[:numel].view(p.ds_shape).cpu()  # type: ignore[attr-defined]
        return out


__all__ = ["EMA"]
