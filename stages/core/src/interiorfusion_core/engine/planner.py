"""`interiorfusion plan CONFIG --gpus N --gpu a100-80gb`: parameters, memory per GPU, FLOPs, step time, days, cost.

Formulas (per GPU; Ψ = parameters, Ψt = trainable parameters, G = GPUs; docs/engine.md "Planner"):

    bf16 mixed (DeepSpeed's layout)  weights 2Ψ  gradients 2Ψt  optimizer 12Ψt (fp32 master 4 + Adam m 4 + v 4)
    fp32 (mixed_precision: no)       weights 4Ψ  gradients 4Ψt  optimizer 8Ψt  (Adam m 4 + v 4)
    ZeRO-0 replicates all three; ZeRO-1 divides the optimizer by G; ZeRO-2 also the gradients; ZeRO-3 everything
    (plus ZeRO-3's gather buffer: ~2 × the largest parameter tensor in bf16).
    (Plain DDP with bf16 autocast keeps fp32 weights/grads + Adam m, v: 4 + 4 + 8 = the same 16 bytes/parameter.)
    activations: the model's own estimate (registered with its builder) for one micro-batch, with and without
    activation checkpointing; ZeRO does not shard them.
    FLOPs/sample = (4Ψ + 2Ψt)·tokens (= 6·Ψ·tokens when everything trains: forward 2Ψ, backward 4Ψ; frozen weights skip
    their weight gradients), + 2Ψ·tokens with activation checkpointing (the recomputed forward), unless the model
    registers its own flops_per_sample.
    A model that registers flop_terms (its FLOPs by term, e.g. linear / self-attention / cross-attention) is planned
    from their sum, and checkpointing adds one forward (a third of it); the plan lists each term per phase.
    step time = FLOPs/step ÷ (G × peak bf16 TFLOPs × MFU);  days = Σ phase steps × step time;  cost = G × hours × $/h.

Tokens per sample come from the model's estimate, or, with `--tokens-from URI` and a model that registers a
`tokens_from` hook, from real data (e.g. the VAE's latents: mean tokens per sample at each resolution). A model made
of parts registers `components` and the plan lists each part's parameters.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from interiorfusion_core.config import LoadedConfig, load_config
from interiorfusion_core.engine.models import get_model_spec
from interiorfusion_core.engine.schedule import plan_phases
from interiorfusion_core.errors import UserError

GIB = 2**30


@dataclass(frozen=True)
class GPUSpec:
    name: str
    label: str
    bf16_tflops: float  # dense tensor-core peak (no sparsity)
    memory_gib: float
    price_per_hour: float  # indicative on-demand USD per GPU-hour; override with --price-per-hour


# Spec-sheet peaks (dense bf16) and capacities; prices are rough late-2025 on-demand cloud rates.
GPUS: dict[str, GPUSpec] = {g.name: g for g in [
    GPUSpec("a100-40gb", "A100 40GB", 312.0, 40.0, 1.50),
    GPUSpec("a100-80gb", "A100 80GB", 312.0, 80.0, 1.80),
    GPUSpec("h100-80gb", "H100 80GB SXM", 989.0, 80.0, 2.50),
    GPUSpec("h200", "H200 141GB", 989.0, 141.0, 3.50),
    GPUSpec("rtx-4090", "RTX 4090 24GB", 165.2, 24.0, 0.40),
    GPUSpec("l40s", "L40S 48GB", 362.0, 48.0, 0.90),
]}
# Keep this share of GPU memory free for the CUDA context, allocator fragmentation and communication buffers.
HEADROOM = 0.10

# The seed's hardware table (docs/TRAINING.md), by config kind: GPUs, GPU, days, cost in USD.
SEED_TABLE: dict[str, tuple[str, int, str, float, float]] = {
    "vae_pretrain": ("VAE Pre-training", 8, "a100-80gb", 7, 15_000),
    "dit_structure": ("Structure DiT", 32, "a100-80gb", 14, 30_000),
    "dit_material": ("Material DiT", 16, "a100-80gb", 7, 15_000),
    "finetune_lora": ("Fine-tuning", 8, "a100-80gb", 3, 5_000),
}


@dataclass
class MemoryRow:
    zero: int
    checkpointing: bool
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float | None
    total_gib: float | None
    fits: bool | None


@dataclass
class PhaseRow:
    index: int
    resolution: int | None
    steps: int
    tokens_per_sample: float | None
    tflop_per_step: float | None
    step_time_s: float | None
    days: float | None
    # TFLOP per step by term, when the model registers flop_terms.
    tflop_terms: dict[str, float] | None = None
    # Where tokens_per_sample came from: "estimate" or "measured".
    tokens_source: str = "estimate"


@dataclass
class Plan:
    config: str
    kind: str
    gpu: str
    gpu_label: str
    gpus: int
    mfu: float
    price_per_hour: float
    params: int
    trainable: int
    largest_tensor: int
    precision: str
    micro_batch: int
    accumulation: int
    global_batch: int
    max_steps: int
    memory: list[MemoryRow] = field(default_factory=list)
    phases: list[PhaseRow] = field(default_factory=list)
    days: float | None = None
    days_with_checkpointing: float | None = None
    gpu_hours: float | None = None
    cost: float | None = None
    seed: dict[str, Any] | None = None
    # Parameters per component (None: left out of this build), when the model registers components.
    components: dict[str, int | None] | None = None
    tokens_from: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def memory_rows(params: int, trainable: int, largest: int, gpus: int, precision: str,
                activations: dict[bool, float | None], capacity_gib: float) -> list[MemoryRow]:
    w, g, o = (2, 2, 12) if precision == "bf16" else (4, 4, 8)
    rows = []
    for zero in (0, 1, 2, 3):
        weights = w * params / (gpus if zero == 3 else 1)
        if zero == 3 and gpus > 1:
            weights += 2 * 2 * largest  # gathered full tensors (prefetch + current), bf16
        grads = g * trainable / (gpus if zero >= 2 else 1)
        opt = o * trainable / (gpus if zero >= 1 else 1)
        for ckpt in (False, True):
            act = activations.get(ckpt)
            total = None if act is None else (weights + grads + opt + act) / GIB
            rows.append(MemoryRow(
                zero, ckpt, weights / GIB, grads / GIB, opt / GIB, None if act is None else act / GIB, total,
                None if total is None else total <= capacity_gib * (1 - HEADROOM),
            ))
    return rows


def plan(
    loaded: LoadedConfig,
    *,
    gpus: int | None = None,
    gpu: str = "a100-80gb",
    price_per_hour: float | None = None,
    mfu: float = 0.4,
    tokens_from: str | None = None,
) -> Plan:
    if gpu not in GPUS:
        raise UserError(f"--gpu {gpu}: unknown GPU (known: {', '.join(GPUS)})")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu}: must be in (0, 1]")
    spec_gpu = GPUS[gpu]
    config = loaded.model
    spec = get_model_spec(loaded.kind)
    training = getattr(config, "training", None)
    if training is None or not hasattr(training, "max_steps"):
        raise UserError(f"{loaded.path}: a '{loaded.kind}' config has no training.max_steps to plan")
    gpus = gpus or training.num_gpus
    if gpus < 1:
        raise UserError("--gpus must be at least 1")

    measured: dict[int, float] = {}
    if tokens_from is not None:
        if spec.tokens_from is None:
            raise UserError(f"--tokens-from: the model builder for '{loaded.kind}' cannot read token counts from data "
                            "(it registers no tokens_from hook)")
        measured = {int(k): float(v) for k, v in spec.tokens_from(config, tokens_from).items()}

    with torch.device("meta"):  # no memory, no init time: only shapes
        model = spec.build(config)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max((p.numel() for p in model.parameters()), default=0)
    precision = "bf16" if training.mixed_precision in ("bf16", "fp16") else "no"
    micro, ga = training.batch_size, training.gradient_accumulation
    global_batch = micro * gpus * ga
    out = Plan(
        config=loaded.path, kind=loaded.kind, gpu=gpu, gpu_label=spec_gpu.label, gpus=gpus, mfu=mfu,
        price_per_hour=price_per_hour if price_per_hour is not None else spec_gpu.price_per_hour,
        params=params, trainable=trainable, largest_tensor=largest, precision=precision, micro_batch=micro,
        accumulation=ga, global_batch=global_batch, max_steps=training.max_steps, tokens_from=tokens_from,
    )
    if spec.components is not None:
        out.components = dict(spec.components(model))
        left_out = [name for name, n in out.components.items() if n is None]
        if left_out:
            out.notes.append(f"parameters and memory leave out the components this build could not make: "
                             f"{', '.join(left_out)}")
    if gpus != training.num_gpus:
        out.notes.append(f"the config says num_gpus={training.num_gpus}; planned for {gpus} with the same per-GPU "
                         f"batch, so the global batch is {global_batch} (the learning rate does not follow unless "
                         "training.lr_scaling is on)")

    phases = plan_phases(training, 1.0)

    def measured_kw(resolution: int | None) -> dict[str, float]:
        return {"tokens": measured[resolution]} if resolution in measured else {}

    if tokens_from is not None:
        absent = sorted({p.resolution for p in phases if p.resolution not in measured}, key=lambda r: r or 0)
        if absent:
            out.notes.append(f"--tokens-from {tokens_from}: no token counts at resolution(s) "
                             f"{', '.join(str(r) for r in absent)}; those phases use the model's estimate")
    peak_phase = max(phases, key=lambda p: p.resolution or 0)
    peak = peak_phase.spec
    activations = {
        ckpt: (spec.activation_bytes(config, peak, micro, ckpt, **measured_kw(peak_phase.resolution))
               if spec.activation_bytes else None)
        for ckpt in (False, True)
    }
    if spec.activation_bytes is None:
        out.notes.append("activation memory: n/a (the model builder registers no activation_bytes estimate)")
    out.memory = memory_rows(params, trainable, largest, gpus, precision, activations, spec_gpu.memory_gib)

    flops_per_s = gpus * spec_gpu.bf16_tflops * 1e12 * mfu
    total_s = total_ckpt_s = 0.0
    known = True
    for phase in phases:
        kw = measured_kw(phase.resolution)
        tokens = spec.tokens_per_sample(config, phase.spec, **kw) if spec.tokens_per_sample else None
        terms = spec.flop_terms(config, phase.spec, **kw) if spec.flop_terms is not None else None
        if terms is not None:
            per_sample = sum(terms.values())
            recompute = per_sample / 3  # forward ≈ a third of forward + backward
        elif spec.flops_per_sample is not None:
            per_sample = spec.flops_per_sample(config, phase.spec, **kw)
            recompute = 2 * params * (tokens or 0)
        elif tokens is not None:
            per_sample = (4 * params + 2 * trainable) * tokens
            recompute = 2 * params * tokens
        else:
            per_sample = recompute = None
        if per_sample is None:
            known = False
            out.phases.append(PhaseRow(phase.index, phase.resolution, phase.steps, tokens, None, None, None,
                                       tokens_source="measured" if kw else "estimate"))
            continue
        step_flops = per_sample * global_batch
        step_s = step_flops / flops_per_s
        total_s += step_s * phase.steps
        total_ckpt_s += (per_sample + recompute) * global_batch / flops_per_s * phase.steps
        out.phases.append(PhaseRow(
            phase.index, phase.resolution, phase.steps, tokens, step_flops / 1e12, step_s, step_s * phase.steps / 86400,
            None if terms is None else {k: v * global_batch / 1e12 for k, v in terms.items()},
            "measured" if kw else "estimate"))
    if known:
        out.days = total_s / 86400
        out.days_with_checkpointing = total_ckpt_s / 86400
        out.gpu_hours = total_s / 3600 * gpus
        out.cost = out.gpu_hours * out.price_per_hour
    else:
        out.notes.append("FLOPs: n/a (the model builder registers neither tokens_per_sample nor flops_per_sample)")

    if loaded.kind in SEED_TABLE:
        label, s_gpus, s_gpu, s_days, s_cost = SEED_TABLE[loaded.kind]
        out.seed = {"stage": label, "gpus": s_gpus, "gpu": GPUS[s_gpu].label, "days": s_days, "cost": s_cost,
                    "implied_price_per_gpu_hour": s_cost / (s_gpus * s_days * 24)}
    return out


def _num(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


_gib = _num


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{_num(seconds / scale)} {unit}"
    return f"{_num(seconds / 1e-9)} ns"


def render(p: Plan, console: Any) -> None:
    from rich.table import Table

    g = GPUS[p.gpu]
    console.print(f"[bold]Plan[/] {p.config} ({p.kind}) on {p.gpus}× {p.gpu_label} "
                  f"({g.bf16_tflops:g} TFLOPs bf16 dense, {g.memory_gib:g} GiB), MFU {p.mfu:.0%}, "
                  f"${p.price_per_hour:.2f}/GPU-hour")
    console.print(f"parameters {p.params:,} ({p.trainable:,} trainable; built on the meta device); "
                  f"batch {p.micro_batch}/GPU × {p.gpus} GPUs × {p.accumulation} accumulation = {p.global_batch}/step; "
                  f"{p.max_steps:,} steps; {'bf16 mixed precision' if p.precision == 'bf16' else 'fp32'}")
    if p.components:
        console.print("components: " + "; ".join(
            f"{name} {'n/a (not built)' if n is None else f'{n:,}'}" for name, n in p.components.items()))
    mem = Table(title="memory per GPU (GiB)", title_justify="left")
    for col in ("ZeRO", "act. ckpt", "weights", "grads", "optimizer", "activations", "total", "fits"):
        mem.add_column(col, justify="right")
    for r in p.memory:
        fits = "n/a" if r.fits is None else ("yes" if r.fits else "NO")
        mem.add_row(str(r.zero), "on" if r.checkpointing else "off", _gib(r.weights_gib), _gib(r.grads_gib),
                    _gib(r.optimizer_gib), _gib(r.activations_gib), _gib(r.total_gib), fits)
    console.print(mem)
    comp = Table(title="compute", title_justify="left")
    for col in ("phase", "resolution", "steps", "tokens/sample", "TFLOP/step", "step time", "days"):
        comp.add_column(col, justify="right")
    for r in p.phases:
        comp.add_row(str(r.index), str(r.resolution or "-"), f"{r.steps:,}",
                     "n/a" if r.tokens_per_sample is None else f"{r.tokens_per_sample:,.0f}"
                     + (" (measured)" if r.tokens_source == "measured" else ""),
                     "n/a" if r.tflop_per_step is None else f"{r.tflop_per_step:,.3g}", _dur(r.step_time_s),
                     _num(r.days))
    console.print(comp)
    names = list(dict.fromkeys(k for r in p.phases for k in (r.tflop_terms or {})))
    if names:  # terms as rows, phases as columns: stays narrow however many terms a model has
        terms = Table(title="TFLOP/step by term (share of the phase's step)", title_justify="left")
        terms.add_column("term")
        for r in p.phases:
            terms.add_column(f"phase {r.index}" + (f" ({r.resolution})" if r.resolution else ""), justify="right")
        for name in names:
            cells = []
            for r in p.phases:
                t = r.tflop_terms or {}
                cells.append(f"{_num(t[name])} ({t[name] / (sum(t.values()) or 1.0):.0%})" if name in t else "-")
            terms.add_row(name.replace("_", " "), *cells)
        console.print(terms)
    if p.days is not None:
        console.print(f"[bold]estimate[/]: {_num(p.days)} days wall ({_num(p.days_with_checkpointing)} with activation "
                      f"checkpointing), {_num(p.gpu_hours)} GPU-hours, ${_num(p.cost)}")
    if p.seed is not None:
        s = p.seed
        console.print(f"[bold]seed table[/] ({s['stage']}): {s['gpus']}× {s['gpu']}, {s['days']:g} days, "
                      f"~${s['cost']:,.0f} (implies ${s['implied_price_per_gpu_hour']:.2f}/GPU-hour)")
    for note in p.notes:
        console.print(f"note: {note}", markup=False)


def plan_command(config: Path, *, gpus: int | None, gpu: str, price_per_hour: float | None, mfu: float,
                 overrides: tuple[str, ...] = (), as_json: bool = False, tokens_from: str | None = None) -> Plan:
    """What `interiorfusion plan` runs."""
    from interiorfusion_core.cli import console
    from interiorfusion_core.engine import toy  # noqa: F401 - registers the engine_toy kind and builder

    result = plan(load_config(config, overrides), gpus=gpus, gpu=gpu, price_per_hour=price_per_hour, mfu=mfu,
                  tokens_from=tokens_from)
    if as_json:
        console.print_json(json.dumps(result.to_json()))
    else:
        render(result, console)
    return result


__all__ = ["GPUS", "SEED_TABLE", "GPUSpec", "Plan", "memory_rows", "plan", "plan_command", "render"]
