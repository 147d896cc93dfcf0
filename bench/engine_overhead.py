"""Engine overhead: step time of the Trainer vs a bare forward/backward/AdamW loop, same model and batch, same run.

    python bench/engine_overhead.py [--steps 120] [--rounds 3] [--width 1024] [--json out.json]

Both loops train the same MLP (`engine_toy`) on the same batch (the engine's loader hands out one prebuilt batch, so
data loading is not measured) with the same loss, interleaved step by step (a bare step runs after every engine
step) so both see the same machine. The engine runs as configured by default: grad clipping 1.0,
the non-finite guard, loss/grad-norm bookkeeping, metrics every 10 steps to a tracker, the schedule, progress
output; no checkpoints or validation inside the timed window. Per-step times are compared at their 20th percentile
(interference on a shared machine only adds time) and at their median. Target: ratio ≤ 1.05.

On a CPU the clock is the process's CPU time (one thread): on a shared machine wall time mostly measures the
neighbours. On CUDA it is wall time after a synchronize.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for sub in ("stages/core/src", "flows/src", ""):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))

import torch  # noqa: E402

from bench._report import row, write_json  # noqa: E402
from interiorfusion_core.engine import Callback, Trainer, local_context  # noqa: E402
from interiorfusion_core.engine.toy import ToyEngineConfig, ToyTask  # noqa: E402
from interiorfusion_core.tracking import NullTracker  # noqa: E402


class MemoryTracker(NullTracker):
    """Keeps metrics in memory: the engine's logging path without a server's latency."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: Any, step: int) -> None:
        self.rows.append((step, dict(metrics)))


class OneBatchLoader:
    """A resumable loader that hands out the same batch `length` times per epoch."""

    def __init__(self, batch: Any, length: int):
        self.batch, self.length, self.position, self.epoch = batch, length, 0, 0

    def __iter__(self) -> Any:
        while self.position < self.length:
            self.position += 1
            yield self.batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0


class BenchTask(ToyTask):
    def __init__(self, config: ToyEngineConfig, batch: Any):
        super().__init__(config)
        self.batch = batch

    def make_loader(self, phase: Any, rank: int, world_size: int, seed: int) -> OneBatchLoader:
        return OneBatchLoader(self.batch, 10**9)


def clock() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


class StepClock(Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_step_end(self, trainer: Any, step: int) -> None:
        self.stamps.append(clock())


def make_config(args: argparse.Namespace, steps: int) -> ToyEngineConfig:
    return ToyEngineConfig.model_validate({
        "model": {"in_dim": args.width // 4, "hidden": args.width, "depth": args.depth, "out_dim": args.width // 4},
        "data": {"num_samples": args.batch, "val_samples": 0},
        "scheduler": {"type": "linear_warmup_cosine", "warmup_steps": 10},
        "training": {"batch_size": args.batch, "max_steps": steps, "log_every": 10, "checkpoint_every": 10**8,
                     "val_every": 10**8, "mixed_precision": "bf16", "grad_clip": 1.0},
    })


def make_batch(cfg: ToyEngineConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    m = cfg.model
    return {"x": torch.randn(cfg.training.batch_size, m.in_dim, generator=g),
            "y": torch.randn(cfg.training.batch_size, m.out_dim, generator=g)}


class BareLoop:
    """forward → loss → backward → AdamW step → zero_grad, nothing else (`clip`: + clip_grad_norm_)."""

    def __init__(self, cfg: ToyEngineConfig, batch: Any, clip: float = 0.0):
        self.clip = clip
        self.task = ToyTask(cfg)
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = self.task.build_model(cfg).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.optimizer.lr, betas=cfg.optimizer.betas,
                                     weight_decay=cfg.optimizer.weight_decay)
        self.batch = {k: v.to(device) for k, v in batch.items()}
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
                         else contextlib.nullcontext())

    def step(self) -> float:
        start = clock()
        with self.autocast:
            loss = self.task.compute_losses(self.model, self.batch)["loss"]
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return clock() - start


class Interleaved(Callback):
    """After every engine step, one bare step: both see the same machine, step by step. The engine's time is
    everything from the end of one bare step to the start of the next (its whole loop iteration)."""

    def __init__(self, bare: BareLoop, clipped: BareLoop):
        self.bare, self.clipped = bare, clipped
        self.engine: list[float] = []
        self.bare_times: list[float] = []
        self.clipped_times: list[float] = []
        self.mark = 0.0

    def on_fit_start(self, trainer: Any) -> None:
        self.mark = clock()

    def on_step_end(self, trainer: Any, step: int) -> None:
        self.engine.append(clock() - self.mark)
        self.bare_times.append(self.bare.step())
        self.clipped_times.append(self.clipped.step())
        self.mark = clock()


def run_round(cfg: ToyEngineConfig, batch: Any) -> tuple[list[float], list[float], list[float]]:
    probe = Interleaved(BareLoop(cfg, batch), BareLoop(cfg, batch, clip=cfg.training.grad_clip))
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        ctx = local_context(cfg, Path(tmp) / "out", tracker=MemoryTracker(), work_dir=Path(tmp) / "work")
        Trainer(ctx, BenchTask(cfg, batch), callbacks=[probe]).fit()
    return probe.bare_times, probe.clipped_times, probe.engine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("INTERIORFUSION_PROGRESS", "off")
    torch.set_num_threads(args.threads)
    cfg = make_config(args, args.warmup + args.steps)
    batch = make_batch(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = sum(p.numel() for p in ToyTask(cfg).build_model(cfg).parameters())
    what = "wall time" if device == "cuda" else "CPU time"
    print(f"engine overhead: MLP {params / 1e6:.2f}M params, batch {args.batch}, {args.steps} timed steps after "
          f"{args.warmup} warm-up, {args.rounds} rounds, {device}, {args.threads} thread(s), {what} per step")
    bare: list[float] = []
    clipped: list[float] = []
    engine: list[float] = []
    def med(xs: list[float]) -> float:
        # 20th percentile: on a shared machine interference only ever adds time, so the low quantile is the
        # stable estimate of a step's own cost (the median is printed too).
        return statistics.quantiles(xs, n=5)[0]

    for r in range(args.rounds):
        b, c, e = (x[args.warmup:] for x in run_round(cfg, batch))
        bare, clipped, engine = bare + b, clipped + c, engine + e
        print(f"  round {r + 1}: bare {med(b) * 1e3:7.2f}  bare+clip {med(c) * 1e3:7.2f}  engine {med(e) * 1e3:7.2f}"
              f" ms/step   ratio {med(e) / med(b):.3f}")
    mb, mc, me = med(bare), med(clipped), med(engine)
    ratio = me / mb
    md = statistics.median
    print(f"median step: bare {md(bare) * 1e3:.2f} ms, bare+clip {md(clipped) * 1e3:.2f} ms, engine "
          f"{md(engine) * 1e3:.2f} ms (ratio {md(engine) / md(bare):.3f})")
    print(f"p20 step:    bare {mb * 1e3:.2f} ms, bare+clip {mc * 1e3:.2f} ms, engine {me * 1e3:.2f} ms")
    print(f"engine / bare = {ratio:.3f} ({(ratio - 1) * 100:+.1f}% overhead; target ≤ +5%); "
          f"engine / bare+clip = {me / mc:.3f}")
    if args.json:
        model = f"{params / 1e6:.1f}M-param MLP"
        rows = [
            row(f"engine step, {model}, p20 of {what} per step", me * 1e3, "ms", "bare fwd/bwd/AdamW loop",
                mb * 1e3, target="≤ 1.05×"),
            row(f"engine step, median of {what} per step", md(engine) * 1e3, "ms", "bare loop", md(bare) * 1e3),
            row(f"engine step, p20 of {what} per step", me * 1e3, "ms", "bare loop that also clips gradients",
                mc * 1e3),
        ]
        write_json(args.json, "engine_overhead", rows, headline={"engine_over_bare_p20": round(ratio, 4),
                                                                  "engine_over_bare_clip_p20": round(me / mc, 4)},
                   details={"config": {k: v for k, v in vars(args).items() if k != "json"}, "params": params,
                            "device": device, "clock": what,
                            "ms_per_step": {"p20": {"bare": mb * 1e3, "bare_clip": mc * 1e3, "engine": me * 1e3},
                                            "median": {"bare": md(bare) * 1e3, "bare_clip": md(clipped) * 1e3,
                                                       "engine": md(engine) * 1e3}},
                            "steps_s": {"bare": bare, "bare_clip": clipped, "engine": engine}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
