"""The one training loop every stage runs on.

    class MyStage(Stage):
        def run(self, ctx: StageContext) -> StageResult:
            result = Trainer(ctx, MyTask(ctx.config)).fit()
            return StageResult(metrics=result.metrics, outputs={"checkpoint": result.checkpoint})

The trainer reads ctx.config.training / .optimizer / .scheduler, writes checkpoints under ctx.output/checkpoints,
logs to ctx.tracker, and runs unchanged in one process, under DDP and under DeepSpeed ZeRO (docs/engine.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from interiorfusion_core.checkpoint import (
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    EMA_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    CheckpointError,
    CheckpointInfo,
    CheckpointManager,
    capture_rng_state,
    export_model,
    load_state_dict,
    rank_file,
    restore_rng_state,
    save_state_dict,
    seed_everything,
    step_dir,
)
from interiorfusion_core.config.base import OptimizerConfig, SchedulerConfig, TrainableStageConfig, TrainingConfig
from interiorfusion_core.contract import StageContext
from interiorfusion_core.engine.callbacks import Callback
from interiorfusion_core.engine.distributed import (
    all_reduce,
    barrier,
    broadcast_object,
    gather_objects,
    make_runtime,
    model_init_context,
    unwrap,
)
from interiorfusion_core.engine.ema import EMA
from interiorfusion_core.engine.host_memory import keep_large_allocations
from interiorfusion_core.engine.schedule import (
    Phase,
    grendel_scaling,
    make_optimizer,
    make_scheduler,
    param_groups,
    phase_at,
    plan_phases,
)
from interiorfusion_core.engine.signals import Preempted, PreemptionGuard
from interiorfusion_core.engine.step import StepContext
from interiorfusion_core.engine.task import TrainTask
from interiorfusion_core.errors import UserError

log = logging.getLogger("interiorfusion.engine")


class NonFiniteError(UserError):
    """training.nonfinite_policy is abort (or the skip/rollback budget ran out) and a step was not finite."""

    exit_code = 3


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed (skipped non-finite steps count: they consumed data)
    phase: int = 0
    epoch: int = 0  # passes over the current phase's data (this rank)
    best_val_loss: float = math.inf
    nonfinite_events: int = 0
    rollbacks: int = 0
    samples_seen: int = 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["best_val_loss"] = None if math.isinf(self.best_val_loss) else self.best_val_loss
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainState:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if known.get("best_val_loss") is None:
            known["best_val_loss"] = math.inf
        return cls(**known)


@dataclass
class TrainResult:
    metrics: dict[str, float]
    # Key of the final checkpoint relative to the stage output, e.g. "checkpoints/step-00001000": put it in
    # StageResult.outputs["checkpoint"]. It always holds a single-file model.safetensors (ZeRO runs: consolidated).
    checkpoint: str
    step: int
    resumed_from: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def _rank_seed(seed: int, rank: int) -> int:
    # Distinct, reproducible training RNG streams per rank (dropout, noise), separate from the init stream.
    return seed + 1_000_003 * (rank + 1)


def cpu_threads(configured: int | None) -> int:
    """Intra-op threads per process on CPU: the config's, else OMP_NUM_THREADS, else the cores divided among the
    processes of this machine. More threads than cores makes OpenMP spin-wait against itself (measured here: a
    sparse-conv step 8× slower with two 2-thread processes on 2 cores than with 1 thread each)."""
    if configured:
        return configured
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return max(1, (os.cpu_count() or 1) // max(local, 1))


def peak_memory_gb(device: torch.device) -> float:
    """CUDA max_memory_allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


@contextmanager
def isolated_rng(seed: int) -> Any:
    """Validation draws from its own seeded RNG and leaves the training streams untouched."""
    saved = capture_rng_state()
    seed_everything(seed)
    try:
        yield
    finally:
        restore_rng_state(saved)


class Trainer:
    def __init__(self, ctx: StageContext, task: TrainTask, *, callbacks: Sequence[Callback] = ()):
        config = ctx.config
        if not isinstance(config, TrainableStageConfig):
            raise TypeError(
                f"the Trainer needs a config derived from interiorfusion_core.config.base.TrainableStageConfig "
                f"(optimizer, scheduler and training sections); {type(config).__name__} is not one"
            )
        self.ctx = ctx
        self.task = task
        self.config: TrainableStageConfig = config
        self.training: TrainingConfig = config.training
        self.opt_cfg: OptimizerConfig = config.optimizer
        self.sched_cfg: SchedulerConfig = config.scheduler
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callback {type(cb).__name__} is not an interiorfusion_core.engine.Callback; "
                                "derive it from Callback (its hooks default to no-ops)")
        self.callbacks = list(callbacks)
        self.tracker = ctx.tracker
        self.state = TrainState()
        self.guard = PreemptionGuard()
        self.history: list[dict[str, float]] = []
        self.resumed_from: int | None = None
        self._ready = False
        self._last_ckpt_step: int | None = None
        self._last_val_step: int | None = None
        self._last_val: dict[str, float] = {}
        self._last_train: dict[str, float] = {}
        self._resume_rng: Any = None
        self._resume_data: dict[str, Any] | None = None
        self._pbar: Any = None

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Build everything and resume from the newest complete checkpoint under the output, if any."""
        if self._ready:
            return
        t = self.training
        self.rt = rt = make_runtime(t)
        if rt.device.type == "cpu":
            torch.set_num_threads(cpu_threads(t.cpu_threads))
            keep_large_allocations()  # large activations reused from the heap, not faulted in every step
        if (self.ctx.rank, self.ctx.world_size) != (rt.rank, rt.world_size):
            log.warning("context says rank %s/%s, accelerate says %s/%s; using accelerate's",
                        self.ctx.rank, self.ctx.world_size, rt.rank, rt.world_size)
        if (t.nonfinite_policy == "skip" and rt.deepspeed and rt.zero_stage in (0, 1, 2) and t.grad_clip == 0):
            raise UserError(
                "training.nonfinite_policy: skip needs training.grad_clip > 0 under DeepSpeed ZeRO-0/1/2 (DeepSpeed "
                "only skips non-finite gradients there when it computes the norm); set grad_clip or use rollback"
            )
        self.global_batch = t.batch_size * rt.world_size * t.gradient_accumulation
        self.hp = grendel_scaling(self.opt_cfg, t.lr_scaling, self.global_batch)
        lr0 = self.config.base_lr
        self.base_lr = lr0 * self.hp.lr_factor
        self.phases: list[Phase] = plan_phases(t, lr0, self.hp.lr_factor)

        self.task.prepare(rt)
        seed_everything(t.seed)  # same initial weights on every rank and every world size
        with model_init_context(rt) if self.task.partition_at_init else contextlib.nullcontext():
            model = self.task.build_model(self.config)
        self.frozen = self._build_frozen(model)  # outside zero.Init: never partitioned, never trained
        groups = self.task.param_groups(model, self.opt_cfg.weight_decay) or param_groups(
            model, self.opt_cfg.weight_decay)
        self.raw_optimizer = make_optimizer(groups, self.base_lr, self.hp)
        self.scheduler = make_scheduler(self.raw_optimizer, self.phases, self.sched_cfg, self.base_lr)
        self.model, self.optimizer = rt.accelerator.prepare(model, self.raw_optimizer)
        self.module = unwrap(self.model)
        self.engine = self.model if rt.deepspeed else None
        self._ddp = rt.distributed and not rt.deepspeed
        self.step_context = StepContext(rt, self.model, self.module, self.frozen, t.gradient_accumulation,
                                        self._micro_batch, self.engine)
        self._params = [p for p in self.module.parameters() if p.requires_grad]
        self.ema = (
            EMA(self.module, t.ema.decay, t.ema.start_step, zero3=rt.zero_stage == 3) if t.ema is not None else None
        )
        work = Path(self.ctx.work_dir) / f"rank-{rt.rank:05d}"
        self.work_dir = work
        self.ckpt = CheckpointManager(self.ctx.output, keep_last=t.keep_last_checkpoints, work_dir=work)
        seed_everything(_rank_seed(t.seed, rt.rank))

        latest = self.ckpt.latest() if rt.is_main else None
        resume_step = broadcast_object(latest.step if latest is not None else None, rt)
        if resume_step is not None:
            info = latest if latest is not None else self.ckpt.get(resume_step)
            self._restore(info, full=True)
            self.resumed_from = info.step
        self._enter_phase(phase_at(self.phases, self.state.step), self._resume_data)
        self._has_val = self.task.val_batches(rt.rank, rt.world_size) is not None
        if self._resume_rng is not None:
            restore_rng_state(self._resume_rng)  # last: nothing after this may draw from the RNGs
        self._reset_window()
        self._ready = True
        self._announce()
        if t.nonfinite_policy == "rollback" and resume_step is None:
            self._save()  # something to roll back to before the first periodic checkpoint

    def _build_frozen(self, model: nn.Module) -> Mapping[str, nn.Module]:
        """The task's frozen models: the same weights on every rank (their own seeded RNG, which leaves the
        trained model's init stream alone), no gradients, eval mode, on the device in the run's precision."""
        rt = self.rt
        with isolated_rng(self.training.seed + 17):
            built = dict(self.task.frozen_models(self.config) or {})
        trained = {id(p) for p in model.parameters()}
        dtype = torch.bfloat16 if rt.precision == "bf16" else None
        for name, module in built.items():
            if not isinstance(module, nn.Module):
                raise TypeError(f"{type(self.task).__name__}.frozen_models: '{name}' is a {type(module).__name__}, "
                                "not an nn.Module")
            if any(id(p) in trained for p in module.parameters()):
                raise ValueError(f"{type(self.task).__name__}.frozen_models: '{name}' shares parameters with the "
                                 "trained model; a frozen model must be a separate module")
            module.requires_grad_(False).eval()
            module.to(rt.device)
            if dtype is not None:
                module.to(dtype)  # floating parameters and buffers only
        frozen = MappingProxyType(built)
        self.task.frozen = frozen
        return frozen

    def _announce(self) -> None:
        if not self.rt.is_main:
            return
        t, rt = self.training, self.rt
        mode = f"DeepSpeed ZeRO-{rt.zero_stage}" if rt.deepspeed else ("DDP" if rt.distributed else "1 process")
        hp = self.hp
        scaled = (f", Grendel-GS k={hp.k:g}: lr×{hp.lr_factor:.4g} betas={hp.betas} eps={hp.eps:.3g}"
                  if t.lr_scaling.enabled else "")
        precision = "bf16" if rt.precision == "bf16" else "fp32"
        resumed = f", resuming from step {self.resumed_from}" if self.resumed_from is not None else ""
        self._say(
            f"engine: {mode} on {rt.world_size}× {rt.device.type}, precision {precision}"
            f", global batch {self.global_batch} ({t.batch_size}×{rt.world_size}×{t.gradient_accumulation})"
            f", {t.max_steps} steps in {len(self.phases)} phase(s){scaled}{resumed}"
        )
        if t.num_gpus != rt.world_size:
            self._say(f"engine: config num_gpus={t.num_gpus} but {rt.world_size} process(es) run; the global batch "
                      "and the Grendel-GS scaling use the real world size")

    # ------------------------------------------------------------------------------------------ data
    def _enter_phase(self, phase: Phase, data_state: dict[str, Any] | None = None) -> None:
        rt = self.rt
        self.phase = phase
        self.state.phase = phase.index
        self.loader = self.task.make_loader(phase.spec, rt.rank, rt.world_size, self.training.seed)
        if data_state is not None and data_state.get("phase") == phase.index:
            self.state.epoch = int(data_state["epoch"])
            self.loader.set_epoch(self.state.epoch)
            self.loader.load_state_dict(data_state["loader"])
        else:
            if self.state.step == phase.start:
                self.state.epoch = 0  # a phase starts at its first epoch
            # else: a resume without this rank's data position (world size changed): restart the saved epoch
            self.loader.set_epoch(self.state.epoch)
        self._it = iter(self.loader)
        self.task.on_phase(phase.spec, self.model)

    def _next_batch(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            self.state.epoch += 1
            self.loader.set_epoch(self.state.epoch)
            self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                raise UserError(
                    f"the data loader of curriculum phase {self.phase.index} yields no batches on rank "
                    f"{self.rt.rank}; it needs at least one batch of {self.training.batch_size} samples"
                ) from None

    def _micro_batch(self, to_device: bool = True) -> Any:
        """The next batch for `StepContext.next_batch`: counted for samples/s and units/s, moved to the device."""
        task = self.task
        batch = self._next_batch()
        units = task.count_units(batch)
        if units is not None:
            self._win_units += float(units)
        bs = task.batch_size_of(batch)
        self._win_samples += bs if bs is not None else self.training.batch_size
        return task.to_device(batch, self.rt.device, self.rt.input_dtype) if to_device else batch

    # ------------------------------------------------------------------------------------------ one step
    def _train_step(self) -> tuple[bool, bool, dict[str, torch.Tensor], torch.Tensor]:
        rt, t, task, sc = self.rt, self.training, self.task, self.step_context
        ga = t.gradient_accumulation
        sc.step = self.state.step + 1
        sc.phase = self.phase.spec
        terms: dict[str, torch.Tensor] = {}
        for micro in range(ga):
            sc.micro = micro
            sc.backwards = 0
            if self._ddp and micro < ga - 1:
                with rt.accelerator.no_sync(self.model):  # gradients all-reduce in the last micro-batch only
                    losses = task.train_step(sc)
            else:
                losses = task.train_step(sc)
            if "loss" not in losses:
                raise KeyError(f"{type(task).__name__}.train_step must return a 'loss' entry (got {sorted(losses)})")
            if not sc.backwards:
                raise RuntimeError(f"{type(task).__name__}.train_step returned without calling step.backward()")
            if self.engine is not None:
                self.engine.step()  # applies (and clips) only at the accumulation boundary
            for k, v in losses.items():
                v = v.detach().float()
                terms[k] = terms[k] + v if k in terms else v
        if ga > 1:
            terms = {k: v / ga for k, v in terms.items()}

        if rt.deepspeed:
            norm = self.engine.get_global_grad_norm()
            gn = torch.as_tensor(float(norm) if norm is not None else 0.0, device=rt.device)
        else:
            grads = [p.grad for p in self._params if p.grad is not None]
            gn = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=rt.device)
        finite = torch.isfinite(terms["loss"]) & torch.isfinite(gn)
        # One small collective and one host sync per step: every rank agrees on "skip this step" and on "stop
        # after it", and the host learns the gradient norm (so clipping only touches the gradients when it clips).
        flags = torch.stack([(~finite).float(), torch.tensor(float(self.guard.requested), device=rt.device),
                             gn.detach().float()])
        bad_f, stop_f, norm = all_reduce(flags, rt, "max").tolist()
        bad, stop = bad_f > 0, stop_f > 0
        self._step_lr = self.raw_optimizer.param_groups[0]["lr"]  # the lr this step used
        if not rt.deepspeed:
            if not bad:
                # clip_grads_with_norm_ scales by min(1, clip / (norm + 1e-6)): a no-op below that threshold.
                if t.grad_clip > 0 and norm + 1e-6 > t.grad_clip:
                    torch.nn.utils.clip_grads_with_norm_(self._params, t.grad_clip, gn)
                self.raw_optimizer.step()
            self.raw_optimizer.zero_grad(set_to_none=True)
        # (DeepSpeed itself skipped the update when the global gradient norm was not finite.)
        if bad:
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" on a skipped first step
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        else:
            self.scheduler.step()
        return bad, stop, terms, gn

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        self.setup()
        self._open_progress()
        try:
            with self.guard:
                for cb in self.callbacks:
                    cb.on_fit_start(self)
                self._loop()
                return self._finish()
        finally:
            self._close_progress()
            self.tracker.flush()

    def _loop(self) -> None:
        t = self.training
        while self.state.step < t.max_steps:
            bad, stop, terms, gn = self._train_step()
            if bad:
                self.state.nonfinite_events += 1
                if self._on_nonfinite(terms, gn):
                    continue
            else:
                self._accumulate(terms, gn)
                if self.ema is not None:
                    self.ema.update(self.state.step + 1)
            self.state.step += 1
            self.state.samples_seen += self.global_batch
            step = self.state.step
            if self._pbar is not None:
                self._pbar.update(1)
            for cb in self.callbacks:
                cb.on_step_end(self, step)
            if step < t.max_steps and step >= self.phase.end:
                self._enter_phase(self.phases[self.phase.index + 1])
            if step % t.log_every == 0:
                self._log()
            if self._has_val and step % t.val_every == 0:
                self._validate()
            stopping = stop and step < t.max_steps
            if step % t.checkpoint_every == 0 or stopping:
                self._save()
            if stopping:
                self._preempted()

    def _preempted(self) -> None:
        signum = self.guard.signum or signal.SIGTERM
        key = f"{self.ckpt.prefix}/{step_dir(self.state.step)}"
        self.tracker.set_tags({"interiorfusion.preempted_at_step": self.state.step})
        self.tracker.flush()
        name = signal.Signals(signum).name
        raise Preempted(
            f"{self.ctx.stage}: stopped by {name} at step {self.state.step}; checkpoint "
            f"{self.ckpt.store.uri_for(step_dir(self.state.step))} is complete; rerun the same command to resume",
            signum, self.state.step, key,
        )

    # ------------------------------------------------------------------------------------------ non-finite
    def _on_nonfinite(self, terms: dict[str, torch.Tensor], gn: torch.Tensor) -> bool:
        """Apply training.nonfinite_policy. True when the run rolled back (the step is not counted)."""
        t, st = self.training, self.state
        what = "loss" if not bool(torch.isfinite(terms["loss"])) else "gradient norm"
        where = f"step {st.step + 1} (curriculum phase {self.phase.index}, epoch {st.epoch})"
        latest = self.ckpt.latest() if self.rt.is_main else None  # a rare event: listing the store is fine
        hint = f"; the last complete checkpoint is {latest.key}" if latest is not None else ""
        if t.nonfinite_policy == "abort":
            raise NonFiniteError(
                f"training stopped: the {what} was not finite at {where}; lower the learning rate, check the data, "
                f"or set training.nonfinite_policy to skip or rollback{hint}"
            )
        if st.nonfinite_events > t.max_nonfinite_skips:
            raise NonFiniteError(
                f"training stopped: {st.nonfinite_events} non-finite steps (more than training.max_nonfinite_skips="
                f"{t.max_nonfinite_skips}), the last at {where}{hint}"
            )
        self.tracker.log_metrics({"train/nonfinite_events": st.nonfinite_events}, step=st.step + 1)
        if t.nonfinite_policy == "skip":
            self._say(f"engine: non-finite {what} at {where}: update skipped ({st.nonfinite_events} so far)")
            return False
        step = broadcast_object(latest.step if latest is not None else None, self.rt)
        if step is None:
            raise NonFiniteError(f"training stopped: the {what} was not finite at {where} and there is no "
                                 "checkpoint to roll back to")
        info = latest if latest is not None else self.ckpt.get(step)
        self._say(f"engine: non-finite {what} at {where}: rolling back to step {info.step}; the data stream "
                  "moves on, so the offending batches are not replayed")
        self._restore(info, full=False)
        st.rollbacks += 1
        for cb in self.callbacks:
            cb.on_rollback(self, st.step)
        if self.phase.index != phase_at(self.phases, st.step).index:
            # The checkpoint is from an earlier phase: that phase's loader resumes where the checkpoint left it.
            self._enter_phase(phase_at(self.phases, st.step), self._read_data_state(info))
        if self._pbar is not None:
            self._pbar.n = st.step
            self._pbar.refresh()
        self._reset_window()
        return True

    # ------------------------------------------------------------------------------------------ metrics
    def _reset_window(self) -> None:
        self._win_terms: dict[str, torch.Tensor] = {}
        self._win_gn = torch.zeros((), device=self.rt.device)
        self._win_steps = 0
        self._win_samples = 0
        self._win_units = 0.0
        self._win_t0 = time.perf_counter()
        self._win_first_step = self.state.step

    def _accumulate(self, terms: dict[str, torch.Tensor], gn: torch.Tensor) -> None:
        for k, v in terms.items():
            self._win_terms[k] = self._win_terms[k] + v if k in self._win_terms else v
        self._win_gn = self._win_gn + gn
        self._win_steps += 1

    def _log(self) -> dict[str, float]:
        rt = self.rt
        names = sorted(self._win_terms)
        elapsed = max(time.perf_counter() - self._win_t0, 1e-9)
        vec = torch.stack([*(self._win_terms[k] for k in names), self._win_gn.float(),
                           torch.tensor(float(self._win_units), device=rt.device),
                           torch.tensor(float(self._win_samples), device=rt.device),
                           torch.tensor(float(self._win_steps), device=rt.device)])
        values = all_reduce(vec, rt, "sum").tolist()
        n = values[-1]  # good steps summed over ranks
        metrics: dict[str, float] = {}
        if n > 0:
            metrics.update({f"train/{k}": values[i] / n for i, k in enumerate(names)})
            metrics["train/grad_norm"] = values[len(names)] / n
        steps_in_window = max(self.state.step - self._win_first_step, 1)
        metrics["train/lr"] = float(self._step_lr)
        metrics["train/samples_per_s"] = values[-2] / elapsed
        if self.task.unit_name and values[-3] > 0:
            metrics[f"train/{self.task.unit_name}_per_s"] = values[-3] / elapsed
        metrics["train/step_time_s"] = elapsed / steps_in_window
        metrics["train/peak_mem_gb"] = peak_memory_gb(rt.device)
        metrics["train/epoch"] = float(self.state.epoch)
        metrics["train/phase"] = float(self.phase.index)
        metrics["train/nonfinite_events"] = float(self.state.nonfinite_events)
        self.tracker.log_metrics(metrics, step=self.state.step)
        self._last_train = metrics
        self.history.append({"step": float(self.state.step), **metrics})
        if self._pbar is not None:
            self._pbar.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.4g}", lr=f"{self._step_lr:.3g}",
                                   refresh=False)
        elif rt.is_main and self._progress_mode == "log":
            self._say(f"step {self.state.step}/{self.training.max_steps} loss {metrics.get('train/loss', math.nan):.5g}"
                      f" lr {self._step_lr:.3g} gn {metrics.get('train/grad_norm', math.nan):.3g}"
                      f" {metrics['train/samples_per_s']:.1f} samples/s")
        for cb in self.callbacks:
            cb.on_log(self, self.state.step, metrics)
        self._reset_window()
        return metrics

    # ------------------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def _validate(self) -> dict[str, float] | None:
        rt, t = self.rt, self.training
        batches = self.task.val_batches(rt.rank, rt.world_size)
        if batches is None:
            return None
        self.model.train(False)
        sums: dict[str, torch.Tensor] = {}
        count = 0
        with isolated_rng(t.seed + 7):
            it = iter(batches)
            for _ in range(t.val_batches):
                batch = next(it, None)
                have = torch.tensor(float(batch is not None), device=rt.device)
                if not all_reduce(have, rt, "min").item():  # ranks stop together (ZeRO-3 forwards are collective)
                    break
                batch = self.task.to_device(batch, rt.device, rt.input_dtype)
                with rt.autocast():
                    losses = self.task.compute_losses(self.model, batch)
                for k, v in losses.items():
                    v = v.detach().float()
                    sums[k] = sums[k] + v if k in sums else v
                count += 1
        self.model.train(True)
        if count == 0:
            return None
        names = sorted(sums)
        values = all_reduce(torch.stack([sums[k] for k in names]), rt, "sum").tolist()
        metrics = {f"val/{k}": v / (count * rt.world_size) for k, v in zip(names, values, strict=True)}
        val_loss = metrics.get("val/loss", math.nan)
        if math.isfinite(val_loss) and val_loss < self.state.best_val_loss:
            self.state.best_val_loss = val_loss
        metrics["val/best_loss"] = self.state.best_val_loss
        self.tracker.log_metrics(metrics, step=self.state.step)
        self._last_val, self._last_val_step = metrics, self.state.step
        for cb in self.callbacks:
            cb.on_validation(self, self.state.step, metrics)
        return metrics

    # ------------------------------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict[str, Any]:
        rt = self.rt
        return {
            "epoch": self.state.epoch,
            "phase": self.phase.index,
            "best_val_loss": None if math.isinf(self.state.best_val_loss) else self.state.best_val_loss,
            "world_size": rt.world_size,
            "distributed": rt.kind,
            "zero_stage": rt.zero_stage,
            "global_batch": self.global_batch,
            "precision": rt.precision,
            "trainer": self.state.to_json(),
            "metrics": {k: v for k, v in self._last_train.items() if math.isfinite(v)},
            "config": self.ctx.loaded.resolved,
        }

    def save_checkpoint(self) -> str:
        """Write a checkpoint of the current step now (collective). Returns its key under the output."""
        self._save()
        return f"{self.ckpt.prefix}/{step_dir(self.state.step)}"

    def _save(self) -> CheckpointInfo | None:
        rt, step = self.rt, self.state.step
        writer = self.ckpt.begin(step, clear=rt.is_main)
        barrier(rt)  # nobody writes before rank 0 cleared a stale directory of this step
        if rt.deepspeed:
            local = writer.local / "ds"
            local.mkdir(parents=True, exist_ok=True)
            self.engine.save_checkpoint(str(local), tag=DEEPSPEED_TAG, client_state={}, save_latest=True)
            writer.add_directory(DEEPSPEED_DIR, local)  # each rank uploads the shards it wrote
            shutil.rmtree(local, ignore_errors=True)
            if self.ema is not None:
                writer.add_state_dict(rank_file("ema", rt.rank, "safetensors"), self.ema.state_dict())
        elif rt.is_main:
            writer.add_state_dict(MODEL_FILE, self.module.state_dict())
            writer.add_torch(OPTIMIZER_FILE, self.raw_optimizer.state_dict())
            if self.ema is not None:
                writer.add_state_dict(EMA_FILE, self.ema.state_dict())
        if rt.is_main:
            writer.add_json(SCHEDULER_FILE, self.scheduler.state_dict())
        writer.add_torch(rank_file("rng", rt.rank, "pt"), capture_rng_state())
        writer.add_json(rank_file("data", rt.rank, "json"),
                        {"phase": self.phase.index, "epoch": self.state.epoch, "loader": self.loader.state_dict()})
        everyone = gather_objects(writer.infos, rt)
        info = None
        if rt.is_main:
            info = self.ckpt.commit(step, [i for infos in everyone for i in infos], self._meta())
        barrier(rt)
        self._last_ckpt_step = step
        return info

    def _read_data_state(self, info: CheckpointInfo) -> dict[str, Any] | None:
        name = rank_file("data", self.rt.rank, "json")
        if info.index.get("world_size") != self.rt.world_size or not info.has(name):
            return None
        return self.ckpt.read_json(info, name)

    def _restore(self, info: CheckpointInfo, *, full: bool) -> None:
        """Weights, optimizer, scheduler, EMA and counters from `info`; with `full` also this rank's RNG streams and
        data position (a resume). A rollback keeps the RNG and data moving forward."""
        rt = self.rt
        saved_world = info.index.get("world_size")
        if rt.deepspeed:
            if saved_world != rt.world_size or info.index.get("zero_stage") != rt.zero_stage:
                raise CheckpointError(
                    f"{self.ckpt.store.uri_for(info.dir)}: written by {saved_world} process(es) under ZeRO-"
                    f"{info.index.get('zero_stage')}; resume it with the same, or export its model "
                    "(interiorfusion_core.checkpoint.export_model) and start a new run from the weights"
                )
            local = self.work_dir / "ds-load" / info.dir
            shutil.rmtree(local, ignore_errors=True)
            mine = f"zero_pp_rank_{rt.rank}_"

            def keep(rel: str) -> bool:  # only this rank's shards (plus the shared files)
                return "zero_pp_rank_" not in rel or mine in rel

            self.ckpt.fetch_directory(info, DEEPSPEED_DIR, local, keep)
            self.engine.load_checkpoint(str(local), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                        load_lr_scheduler_states=False)
            shutil.rmtree(local, ignore_errors=True)
            if self.ema is not None:
                self.ema.load_state_dict(load_state_dict(self.ckpt.fetch(
                    info, rank_file("ema", rt.rank, "safetensors")), rt.device))
        else:
            if not info.has(MODEL_FILE) or not info.has(OPTIMIZER_FILE):
                raise CheckpointError(
                    f"{self.ckpt.store.uri_for(info.dir)}: holds DeepSpeed shards; resume it under the same "
                    "DeepSpeed launch, or export its model first"
                )
            self.module.load_state_dict(self.ckpt.load_state_dict(info, MODEL_FILE))
            self.raw_optimizer.load_state_dict(self.ckpt.load_torch(info, OPTIMIZER_FILE))
            if self.ema is not None and info.has(EMA_FILE):
                self.ema.load_state_dict(load_state_dict(self.ckpt.fetch(info, EMA_FILE), rt.device))
        self.scheduler.load_state_dict(self.ckpt.read_json(info, SCHEDULER_FILE))
        saved = TrainState.from_json(info.index.get("trainer", {}))
        self.state.step = info.step
        self.state.best_val_loss = saved.best_val_loss
        self.state.samples_seen = saved.samples_seen
        self._last_ckpt_step = info.step
        if not full:
            return
        self.state.nonfinite_events = saved.nonfinite_events
        self.state.rollbacks = saved.rollbacks
        self.state.epoch = int(info.index.get("epoch", 0))
        self._last_train = dict(info.index.get("metrics") or {})
        rng_name = rank_file("rng", rt.rank, "pt")
        self._resume_data = self._read_data_state(info)
        if saved_world == rt.world_size and info.has(rng_name):
            self._resume_rng = self.ckpt.load_torch(info, rng_name)
        else:
            self._say(f"engine: checkpoint written by {saved_world} process(es), resumed by {rt.world_size}: data "
                      "positions restart the current epoch and RNG streams are reseeded")

    # ------------------------------------------------------------------------------------------ the end
    def _finish(self) -> TrainResult:
        rt, step = self.rt, self.state.step
        if self._win_steps:
            self._log()
        if self._has_val and self._last_val_step != step:
            self._validate()
        if self._last_ckpt_step != step:
            self._save()
        key = f"{self.ckpt.prefix}/{step_dir(step)}"
        if rt.deepspeed:
            ema_full = self.ema.full_state_dict() if self.ema is not None else None  # collective
            if rt.is_main:
                info = export_model(self.ckpt, self.ckpt.get(step), work_dir=self.work_dir)
                if ema_full is not None:
                    path = self.work_dir / EMA_FILE
                    save_state_dict(ema_full, path)
                    info = self.ckpt.add_to(info, EMA_FILE, path)
                    path.unlink(missing_ok=True)
            barrier(rt)
        if rt.is_main:
            for s in self.ckpt.steps():
                self.ckpt.record_into(self.ckpt.get(s))
        metrics = {k.removeprefix("train/"): v for k, v in self._last_train.items()
                   if k.split("/")[-1] not in ("epoch", "phase")}
        metrics.update({k.replace("/", "_"): v for k, v in self._last_val.items()})
        metrics["steps"] = float(step)
        if math.isfinite(self.state.best_val_loss):
            metrics["best_val_loss"] = self.state.best_val_loss
        return TrainResult(metrics=metrics, checkpoint=key, step=step, resumed_from=self.resumed_from,
                           history=self.history)

    # ------------------------------------------------------------------------------------------ output
    @property
    def _progress_mode(self) -> str:
        mode = os.environ.get("INTERIORFUSION_PROGRESS", "auto").lower()
        if mode == "auto":
            return "bar" if sys.stderr.isatty() else "log"
        return mode

    def _open_progress(self) -> None:
        if self.rt.is_main and self._progress_mode == "bar":
            from tqdm.auto import tqdm

            self._pbar = tqdm(total=self.training.max_steps, initial=self.state.step, dynamic_ncols=True,
                              desc=self.ctx.stage, mininterval=0.5)

    def _close_progress(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None

    def _say(self, text: str) -> None:
        if not self.rt.is_main or self._progress_mode == "off":
            return
        if self._pbar is not None:
            self._pbar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)


__all__ = ["NonFiniteError", "TrainResult", "TrainState", "Trainer", "isolated_rng", "peak_memory_gb"]
