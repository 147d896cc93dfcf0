"""The program the engine tests launch (plain `python`, `accelerate launch`), plus helpers the test modules share.

    python tests/engine/test_engine_program.py CONFIG.yaml OUTPUT [--restart]

runs the `engine-toy` stage through the real stage contract (`run_stage`, the `_run.json` marker, resume), exiting
with the CLI's exit codes. Test-only knobs come from the environment:

    ENGINE_TEST_KILL_AT=N        SIGKILL this process at the end of step N (rank 0)
    ENGINE_TEST_KILL_IN_CKPT=N   SIGKILL while checkpoint N is half-written (files uploaded, no index yet)
    ENGINE_TEST_PREEMPT_AT=N     SIGTERM to rank 0 during step N (every rank must stop after step N)
    ENGINE_TEST_NAN_AT=a,b       the loss of steps a and b (1-based) is NaN
    ENGINE_TEST_TASK=NAME        the task: toy (default), rollout (RolloutTask) or frozen (FrozenTeacherTask)
    ENGINE_TEST_FROZEN=PATH      FrozenTeacherTask: each rank writes what it saw of the frozen model to PATH.rankN
    ENGINE_TEST_RECORD=PATH      rank 0 writes every logged metric row (train and val) to PATH (JSON)
    ENGINE_TEST_MLFLOW=1         use the real MLflow tracker (else a NullTracker, for speed)

No test functions live here (pytest collects nothing); the name only follows the test directory's convention.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from interiorfusion_core.engine import Callback, StepContext
from interiorfusion_core.engine.toy import ToyMLP, ToyTask

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = Path(__file__).resolve()
PYTHONPATH = os.pathsep.join([str(ROOT / "stages/core/src"), str(ROOT / "flows/src")])


def child_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment of a launched run: this checkout first on the path, one thread, state under `tmp`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "ENGINE_TEST_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({
        "PYTHONPATH": PYTHONPATH + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        "OMP_NUM_THREADS": "1",  # 2 shared cores: OpenMP spinning in two ranks would crawl
        "INTERIORFUSION_HOME": str(tmp / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "INTERIORFUSION_PROGRESS": "log",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cpu",
    })
    env.update(extra)
    return env


def toy_config(**training: Any) -> dict[str, Any]:
    """A toy-stage config dict (small enough for ~1 ms steps)."""
    base = {
        "kind": "engine_toy",
        "model": {"in_dim": 8, "hidden": 16, "depth": 2},
        "optimizer": {"lr": 3.0e-3, "weight_decay": 0.01},
        "scheduler": {"type": "linear_warmup_cosine", "warmup_steps": 4},
        "data": {"num_samples": 96, "val_samples": 0},
        "training": {"batch_size": 8, "max_steps": 40, "log_every": 1, "checkpoint_every": 10,
                     "val_every": 1000, "mixed_precision": "no"},
    }
    for key, value in training.items():
        section, _, name = key.partition("__")
        if name:
            base.setdefault(section, {})[name] = value
        else:
            base["training"][key] = value
    return base


def write_config(path: Path, config: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_program(config: Path, output: Path, tmp: Path, *args: str, launcher: list[str] | None = None,
                timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), str(PROGRAM), str(config), str(output), *args]
    return subprocess.run(cmd, env=child_env(tmp, **env), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def accelerate_cmd() -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch"]


LAUNCHER_CONFIGS = {"zero3": "configs/accelerate_deepspeed.yaml", "zero2": "configs/accelerate_deepspeed_zero2.yaml"}


class RunRecorder(Callback):
    """Rank 0 writes the run's mode and every logged train row to `path` (JSON) as the run goes: what the
    distributed stage tests (tests/vae, tests/structure) compare between 1 process and 2 ZeRO-3 ranks."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {"rows": []}

    def on_fit_start(self, trainer: Any) -> None:
        rt = trainer.rt
        params = list(trainer.module.parameters())
        plugin = rt.accelerator.state.deepspeed_plugin if rt.deepspeed else None
        self.data |= {
            "mode": {"deepspeed": rt.deepspeed, "world_size": rt.world_size, "zero_stage": rt.zero_stage},
            "zero3_init": bool(plugin is not None and plugin.zero3_init_flag),
            "params": len(params),
            "partitioned_params": sum(1 for p in params if hasattr(p, "ds_status") and not p.ds_persist),
        }

    def on_log(self, trainer: Any, step: int, metrics: Any) -> None:
        if trainer.rt.is_main:
            self.data["rows"].append({"step": step, **metrics})
            self.path.write_text(json.dumps(self.data))


def recording_trainer(path: str | Path) -> type:
    """A Trainer subclass that adds a RunRecorder writing to `path`: patch it over a stage module's `Trainer`."""
    from interiorfusion_core.engine import Trainer

    recorder = RunRecorder(path)

    class RecordingTrainer(Trainer):
        def __init__(self, ctx: Any, task: Any, **kwargs: Any) -> None:
            super().__init__(ctx, task, callbacks=[*kwargs.pop("callbacks", ()), recorder], **kwargs)

    return RecordingTrainer


def launch_2_processes(kind: str, env: dict[str, str]) -> list[str]:
    """`accelerate launch` with 2 CPU processes: DeepSpeed `zero2`/`zero3` (the repo's launcher files) or `ddp`
    (CPU DDP needs ACCELERATE_USE_CPU, set into `env`), on a free port."""
    import socket

    if kind in LAUNCHER_CONFIGS:
        args = ["--config_file", str(ROOT / LAUNCHER_CONFIGS[kind]), "--num_processes", "2"]
    else:
        args = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]
        env["ACCELERATE_USE_CPU"] = "true"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    return [*accelerate_cmd(), *args, "--main_process_port", port]


class ForkRunner:
    """Runs the program in fresh processes forked from a forkserver that has already imported torch (and paid
    torch._dynamo's first-use import, ~5 s here): same code path as `run_program`, ~10x quicker to start.
    Each run is still its own process: SIGKILL kills it, exit codes are real."""

    PRELOAD = ("torch", "torch._dynamo", "interiorfusion_core.engine.toy", "interiorfusion_core.cli",
               "test_engine_program")

    def __init__(self) -> None:
        import multiprocessing

        self.mp = multiprocessing.get_context("forkserver")
        self.mp.set_forkserver_preload(list(self.PRELOAD))

    def run(self, config: Path, output: Path, tmp: Path, *args: str, timeout: float = 240,
            **env: str) -> tuple[int, str]:
        log = tmp / f"run-{os.urandom(4).hex()}.log"
        proc = self.mp.Process(target=_forked_main, args=([str(config), str(output), *args],
                                                          child_env(tmp, **env), str(log)))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise TimeoutError(f"program did not finish in {timeout} s:\n{log.read_text()[-3000:]}")
        return proc.exitcode, log.read_text()


def _forked_main(argv: list[str], env: dict[str, str], log: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    torch.set_num_threads(1)
    try:
        code = main(argv)
    except BaseException as exc:  # a traceback in the log beats a silent exit code
        import traceback

        traceback.print_exc()
        code = 1 if not isinstance(exc, SystemExit) else int(exc.code or 0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---------------------------------------------------------------------------------------------- the program
def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


class _Hooks(Callback):
    def __init__(self) -> None:
        self.kill_at = _int_env("ENGINE_TEST_KILL_AT")
        self.preempt_at = _int_env("ENGINE_TEST_PREEMPT_AT")
        self.record = os.environ.get("ENGINE_TEST_RECORD")
        self.rows: list[dict[str, float]] = []

    def on_fit_start(self, trainer: Any) -> None:
        trainer.task.next_step = trainer.state.step + 1
        if self.preempt_at is not None and trainer.rt.is_main and trainer.state.step == self.preempt_at - 1:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_step_end(self, trainer: Any, step: int) -> None:
        trainer.task.next_step = step + 1
        if self.kill_at == step and trainer.rt.is_main:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.preempt_at is not None and step == self.preempt_at - 1 and trainer.rt.is_main:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step preempt_at's bookkeeping → stop after it

    def on_log(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        if self.record and trainer.rt.is_main:
            self.rows.append({"step": step, **metrics})
            Path(self.record).write_text(json.dumps(self.rows))

    on_validation = on_log


def nan_task_class(nan_at: set[int]) -> type:
    """The toy task, with a NaN loss at the given (1-based) steps; a callback keeps `next_step` current."""
    from interiorfusion_core.engine import toy

    class Task(toy.ToyTask):
        next_step = 1

        def compute_losses(self, model: Any, batch: Any) -> Any:
            losses = super().compute_losses(model, batch)
            if model.training and self.next_step in nan_at:
                losses = {**losses, "loss": losses["loss"] + float("nan")}
            return losses

    return Task


class RolloutTask(ToyTask):
    """A train_step of its own: per micro-batch, two rounds of a rollout (a no-grad forward pass on inputs
    perturbed with torch noise) followed by a forward + backward on the rollout: four forward passes and two
    backward calls. `nan_at` (1-based steps): both losses of that step are NaN."""

    nan_at: frozenset[int] = frozenset()

    def train_step(self, step: StepContext) -> dict[str, torch.Tensor]:
        batch = step.next_batch()
        x, y = batch["x"], batch["y"]
        poison = float("nan") if step.step in self.nan_at else 1.0
        terms: dict[str, torch.Tensor] = {}
        for k in range(2):
            with torch.no_grad(), step.autocast():
                start = x + 0.05 * torch.randn_like(x)  # the training RNG stream: restored on resume
                guess = step.model(start)
            with step.autocast():
                pred = step.model(start)
                fit = F.mse_loss(pred.float(), y.float())
                drift = (pred.float() - guess.float()).abs().mean()  # dropout noise between two passes
                loss = (fit + drift) * poison
            step.backward(loss / 2)
            terms[f"fit{k}"] = fit.detach()
        return {"loss": (terms["fit0"] + terms["fit1"]) / 2 * poison, **terms}


class FrozenTeacherTask(ToyTask):
    """The toy student distilled from a frozen, randomly initialised teacher of the same shape. Its own step runs
    two loss groups per micro-batch, each a forward pass and a backward call: fit + distillation on x, then
    oddness on -x (the target is odd). `nan_at` (1-based steps): that step's losses are NaN."""

    nan_at: frozenset[int] = frozenset()

    def frozen_models(self, config: Any) -> dict[str, nn.Module]:
        return {"teacher": ToyMLP(config.model)}

    def compute_losses(self, model: Any, batch: Any) -> dict[str, torch.Tensor]:  # validation
        x, y = batch["x"], batch["y"]
        with torch.no_grad():
            target = self.frozen["teacher"](x)
        pred, mirror = model(x), model(-x)
        fit = F.mse_loss(pred.float(), y.float())
        odd = F.mse_loss(mirror.float(), -y.float())
        distill = F.mse_loss(pred.float(), target.float())
        return {"loss": fit + 0.5 * odd + 0.1 * distill, "fit": fit, "odd": odd, "distill": distill}

    def train_step(self, step: StepContext) -> dict[str, torch.Tensor]:
        assert step.frozen is self.frozen
        batch = step.next_batch()
        x, y = batch["x"], batch["y"]
        poison = float("nan") if step.step in self.nan_at else 1.0
        with torch.no_grad(), step.autocast():  # bf16 runs: the teacher's weights are bf16
            target = step.frozen["teacher"](x)
        with step.autocast():
            pred = step.model(x)
            fit = F.mse_loss(pred.float(), y.float())
            distill = F.mse_loss(pred.float(), target.float())
        step.backward((fit + 0.1 * distill) * poison)
        with step.autocast():
            odd = F.mse_loss(step.model(-x).float(), -y.float())
        step.backward(0.5 * odd * poison)
        loss = (fit + 0.5 * odd + 0.1 * distill).detach() * poison
        return {"loss": loss, "fit": fit.detach(), "odd": odd.detach(), "distill": distill.detach()}


def frozen_fingerprint(module: nn.Module) -> list[float]:
    return [float(p.detach().double().sum()) for p in module.parameters()]


class FrozenReport(Callback):
    """What each rank saw of the frozen teacher, at the start and at the last step."""

    def __init__(self, path: str):
        self.path = path
        self.report: dict[str, Any] = {}

    def on_fit_start(self, trainer: Any) -> None:
        teacher = trainer.task.frozen["teacher"]
        self.report["start"] = frozen_fingerprint(teacher)
        self.report["requires_grad"] = any(p.requires_grad for p in teacher.parameters())
        self.report["training"] = teacher.training
        self.report["dtypes"] = sorted({str(p.dtype) for p in teacher.parameters()})
        self.report["partitioned"] = any(hasattr(p, "ds_id") for p in teacher.parameters())
        self.report["model_partitioned"] = any(hasattr(p, "ds_id") for p in trainer.module.parameters())
        ids = {id(p) for p in teacher.parameters()}
        groups = [trainer.raw_optimizer.param_groups]
        inner = getattr(trainer.engine, "optimizer", None) if trainer.engine is not None else None
        if inner is not None:
            groups.append(inner.param_groups)
        self.report["in_optimizer"] = any(id(p) in ids for gs in groups for g in gs for p in g["params"])
        self.report["in_model"] = any(id(p) in ids for p in trainer.module.parameters())
        self.report["model_params"] = sum(1 for _ in trainer.module.parameters())

    def on_step_end(self, trainer: Any, step: int) -> None:
        if step == trainer.training.max_steps:
            teacher = trainer.task.frozen["teacher"]
            self.report["end"] = frozen_fingerprint(teacher)
            self.report["grads"] = any(p.grad is not None for p in teacher.parameters())
            Path(f"{self.path}.rank{trainer.rt.rank}").write_text(json.dumps(self.report))


TASKS = {"toy": None, "rollout": RolloutTask, "frozen": FrozenTeacherTask}


def main(argv: list[str]) -> int:
    import interiorfusion_core.contract as contract
    from interiorfusion_core import checkpoint
    from interiorfusion_core.cli import run_stage_command
    from interiorfusion_core.engine import toy
    from interiorfusion_core.errors import UserError
    from interiorfusion_core.tracking import NullTracker

    config, output, *rest = argv
    if os.environ.get("ENGINE_TEST_MLFLOW") != "1":
        contract.Tracker = NullTracker  # MLflow's SQLite set-up costs seconds per process
    nan_at = {int(s) for s in os.environ.get("ENGINE_TEST_NAN_AT", "").split(",") if s}

    kill_in_ckpt = _int_env("ENGINE_TEST_KILL_IN_CKPT")
    if kill_in_ckpt is not None:
        commit = checkpoint.CheckpointManager.commit

        def dying_commit(self: Any, step: int, files: Any, meta: Any) -> Any:
            if step == kill_in_ckpt:
                os.kill(os.getpid(), signal.SIGKILL)
            return commit(self, step, files, meta)

        checkpoint.CheckpointManager.commit = dying_commit  # type: ignore[method-assign]

    task = TASKS[os.environ.get("ENGINE_TEST_TASK", "toy")]
    if task is None:
        toy.ToyStage.task_factory = nan_task_class(nan_at)
    else:
        toy.ToyStage.task_factory = type(task.__name__, (task,), {"nan_at": frozenset(nan_at)})
    toy.ToyStage.callbacks = [_Hooks()]
    if os.environ.get("ENGINE_TEST_FROZEN"):
        toy.ToyStage.callbacks.append(FrozenReport(os.environ["ENGINE_TEST_FROZEN"]))
    try:
        run_stage_command("engine-toy", Path(config), None, None, output, False, "--restart" in rest)
    except UserError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
