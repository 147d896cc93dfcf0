"""DiT block benchmark: forward + backward tokens/s of the Structure DiT's block (packed variable-length sequences,
3D RoPE, QK RMSNorm, per-token AdaLN modulation, cross-attention to condition tokens) against a plain SDPA DiT block
of the same shapes, and the same-run matmul rate, per thread count.

    python bench/dit_block.py [--json out.json] [--width 384] [--heads 6] [--mlp 1536] [--tokens 2048]
                              [--sequences 4] [--cond-tokens 256] [--reps 5] [--threads 1 2]

Ours: `interiorfusion_structure.dit.DiTBlock` (attention backend `sdpa`: segments grouped by length) on `--sequences`
packed sequences whose lengths are drawn within ±`--spread` of the mean (summing to `--tokens`), with the RoPE
angles and the token → sample map computed once outside the block (the DiT computes them once per forward for
all its blocks). Baseline: a plain DiT block, the same width / heads / MLP / AdaLN-single modulation and the same
cross-attention, with plain nn.Linear projections and one batched `scaled_dot_product_attention` over
[sequences, heads, length, head_dim] of equal-length sequences (no RoPE, no QK norm, no packing): the best case a
packed block could hope to match. Both run on the same total tokens, interleaved rep by rep so both see the same
machine; the ratio is ours / plain tokens/s at the best rep (target ≥ 0.9), by wall time and, at 1 thread, by process
CPU time (steadier when neighbours share the cores). Context: the GFLOP/s of one plain matmul
of the block's MLP shape ([tokens × width] · [width × mlp]) and the block's model-FLOP rate (fwd + bwd = 3 × the
forward's matmul FLOPs, planning.py's terms). A parity check first: ours without RoPE and QK norm on equal lengths
equals the plain block with the same weights.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "stages" / "core" / "src", ROOT / "stages" / "structure" / "src", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bench._report import row, write_json  # noqa: E402
from interiorfusion_structure.attention import Rope3D, Segments, attention_flops  # noqa: E402
from interiorfusion_structure.dit import Context, DiTBlock  # noqa: E402


# ---- the plain block --------------------------------------------------------------------------------------
class PlainBlock(nn.Module):
    """A DiT block over x [S, L, W] (S equal-length sequences): AdaLN-single modulation per sequence, self-attention
    with plain linears and one SDPA call, cross-attention to [S, K, W] condition tokens, GELU MLP."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.q, self.kv, self.cproj = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(width, mlp), nn.Linear(mlp, width)
        self.scale_shift_table = nn.Parameter(torch.randn(6, width) / width**0.5)

    def _heads(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        S, L, _ = x.shape
        return x.view(S, L, n, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, modulation: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        S, L, W = x.shape
        mod = (self.scale_shift_table[None] + modulation)[:, :, None]  # [S, 6, 1, W]: broadcast over the sequence
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(1)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        q, k, v = self._heads(self.qkv(h), 3)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(S, L, W)
        x = x + gate_msa * self.proj(a)
        (q,) = self._heads(self.q(self.norm2(x)), 1)
        k, v = self._heads(self.kv(cond), 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(S, L, W)
        x = x + self.cproj(a)
        h = self.norm3(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))

    def load_from(self, ours: DiTBlock) -> None:
        """The same weights as our block (so without RoPE / QK norm both compute the same thing)."""
        pairs = {"norm2": ours.norm2, "qkv": ours.attention.qkv, "proj": ours.attention.proj,
                 "q": ours.cross_attention.q, "kv": ours.cross_attention.kv, "cproj": ours.cross_attention.proj,
                 "fc1": ours.mlp.fc1, "fc2": ours.mlp.fc2}
        with torch.no_grad():
            for name, src in pairs.items():
                getattr(self, name).load_state_dict(src.state_dict())
            self.scale_shift_table.copy_(ours.scale_shift_table)


# ---- inputs -----------------------------------------------------------------------------------------------
def draw_lengths(tokens: int, sequences: int, spread: float, g: torch.Generator) -> list[int]:
    """`sequences` lengths within ±spread of the mean, summing to `tokens`."""
    mean = tokens / sequences
    raw = mean * (1 + spread * (2 * torch.rand(sequences, generator=g, dtype=torch.float64) - 1))
    lengths = [max(1, round(float(x))) for x in raw * tokens / raw.sum()]
    lengths[-1] += tokens - sum(lengths)
    return lengths


def grid_coords(lengths: list[int], grid: int, g: torch.Generator) -> torch.Tensor:
    """Distinct random cells of a grid³ per sequence: coords [T, 4] (sample, x, y, z)."""
    out = []
    for b, n in enumerate(lengths):
        cells = torch.randperm(grid**3, generator=g)[:n]
        xyz = torch.stack([cells // grid**2, cells // grid % grid, cells % grid], 1)
        out.append(torch.cat([torch.full((n, 1), b), xyz], 1))
    return torch.cat(out)


def block_forward_flops(lengths: list[int], width: int, mlp: int, cond: int) -> float:
    """Forward FLOPs of one block (planning.py's terms, per sequence): linears on tokens and on the condition
    tokens, self-attention over each sequence, cross-attention to its condition tokens."""
    total = 0.0
    for n in lengths:
        total += 2.0 * n * (6 * width * width + 2 * width * mlp) + 2.0 * cond * 2 * width * width
        total += attention_flops(n, width) + 4.0 * n * cond * width
    return total


# ---- timing -----------------------------------------------------------------------------------------------
def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Each function `reps` times, alternating (A B A B ...), so a busy neighbour slows both alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    walls: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
    return {k: {"best_s": min(walls[k]), "median_s": statistics.median(walls[k]), "cpu_best_s": min(cpus[k]),
                "runs": reps} for k in fns}


def matmul_rate(tokens: int, width: int, mlp: int, reps: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(tokens, width, generator=g), torch.randn(width, mlp, generator=g)
    t = interleaved({"mm": lambda: torch.mm(a, b)}, max(reps, 3) * 3)["mm"]
    flops = 2.0 * tokens * width * mlp
    return {"gflops": flops / t["best_s"] / 1e9, "best_s": t["best_s"], "flops": flops}


def run_case(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    W, H, M, K = args.width, args.heads, args.mlp, args.cond_tokens
    g = torch.Generator().manual_seed(0)
    lengths = draw_lengths(args.tokens, args.sequences, args.spread, g)
    S, T = len(lengths), sum(lengths)
    L = T // S
    equal = [L] * S

    torch.manual_seed(0)
    ours = DiTBlock(W, H, M, qk_norm=True, backend="sdpa")
    plain = PlainBlock(W, H, M)
    plain.load_from(ours)
    rope = Rope3D(W // H)
    segs = Segments.from_lengths(lengths)
    coords = grid_coords(lengths, args.grid, g)
    cos_sin = rope(coords[:, 1:])
    token_sample = segs.ids()
    modulation = torch.randn(S, 6, W, generator=g) * 0.1
    cond = torch.randn(S * K, W, generator=g)
    context = Context(cond, Segments.from_lengths([K] * S), torch.zeros(S, W))
    x = torch.randn(T, W, generator=g, requires_grad=True)
    gy = torch.randn(T, W, generator=g)
    xp = torch.randn(S, L, W, generator=g, requires_grad=True)
    gyp = torch.randn(S, L, W, generator=g)
    condp = cond[: S * K].view(S, K, W)

    def step_ours() -> None:
        ours.zero_grad(set_to_none=True)
        x.grad = None
        ours(x, token_sample, modulation, segs, cos_sin, None, context).backward(gy)

    def step_plain() -> None:
        plain.zero_grad(set_to_none=True)
        xp.grad = None
        plain(xp, modulation, condp).backward(gyp)

    # Parity: ours without RoPE / QK norm on equal lengths is the plain block.
    with torch.no_grad():
        bare = DiTBlock(W, H, M, qk_norm=False, backend="sdpa")
        bare.load_state_dict(ours.state_dict(), strict=False)
        eq = Segments.from_lengths(equal)
        got = bare(xp.reshape(-1, W), eq.ids(), modulation, eq, None, None, context).view(S, L, W)
        want = plain(xp, modulation, condp)
        parity = float((got - want).abs().max() / want.abs().max())

    times = interleaved({"ours": step_ours, "plain": step_plain}, args.reps)
    mm = matmul_rate(T, W, M, args.reps)
    flops_ours = 3 * block_forward_flops(lengths, W, M, K)
    flops_plain = 3 * block_forward_flops(equal, W, M, K)
    return {
        "threads": threads, "lengths": lengths, "tokens": T, "plain_lengths": equal, "parity_rel_err": parity,
        "ours": times["ours"] | {"tokens_per_s": T / times["ours"]["best_s"],
                                 "gflops": flops_ours / times["ours"]["best_s"] / 1e9, "flops": flops_ours},
        "plain": times["plain"] | {"tokens_per_s": S * L / times["plain"]["best_s"],
                                   "gflops": flops_plain / times["plain"]["best_s"] / 1e9, "flops": flops_plain},
        "matmul": mm,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--mlp", type=int, default=1536, help="MLP hidden width")
    ap.add_argument("--tokens", type=int, default=2048, help="latent tokens in the packed batch")
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--spread", type=float, default=0.3, help="lengths within ±spread × the mean")
    ap.add_argument("--cond-tokens", type=int, default=256, help="condition tokens per sequence")
    ap.add_argument("--grid", type=int, default=32, help="latent grid the coordinates are drawn from")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.width % args.heads or (args.width // args.heads) % 2:
        ap.error("--width must be divisible by --heads into an even head width")
    if args.grid**3 < args.tokens:
        ap.error("--grid³ must hold --tokens cells")

    threads_before = torch.get_num_threads()
    t0 = time.perf_counter()
    print(f"torch {torch.__version__} on {platform.processor() or platform.machine()}, {threads_before} threads "
          f"available; block W{args.width} H{args.heads} MLP{args.mlp}, {args.tokens} tokens in {args.sequences} "
          f"sequences, {args.cond_tokens} condition tokens each")
    cases = []
    with torch.autograd.set_grad_enabled(True):
        for th in args.threads:
            cases.append(run_case(args, th))
    torch.set_num_threads(threads_before)

    hdr = f"{'threads':>7}{'ours tok/s':>12}{'plain tok/s':>13}{'ratio':>7}{'ours GF/s':>11}{'plain GF/s':>12}" \
          f"{'matmul GF/s':>13}{'parity':>9}"
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for c in cases:
        o, p = c["ours"], c["plain"]
        print(f"{c['threads']:>7}{o['tokens_per_s']:>12,.0f}{p['tokens_per_s']:>13,.0f}"
              f"{o['tokens_per_s'] / p['tokens_per_s']:>7.3f}{o['gflops']:>11.1f}{p['gflops']:>12.1f}"
              f"{c['matmul']['gflops']:>13.1f}{c['parity_rel_err']:>9.1e}")
    print(f"(fwd+bwd, best wall of {args.reps} interleaved reps after a warm-up; lengths {cases[0]['lengths']}, "
          f"plain {cases[0]['plain_lengths']})")
    total = time.perf_counter() - t0
    print(f"\ntotal benchmark time {total:.0f}s")
    if args.json:
        shape = (f"W{args.width} H{args.heads} MLP{args.mlp}, {args.tokens} tokens in {args.sequences} packed "
                 f"sequences + {args.cond_tokens} cond tokens each")
        rows = []
        for i, c in enumerate(cases):
            where = f"{c['threads']} thread{'s' if c['threads'] > 1 else ''}"
            rows.append(row(f"{'DiT block fwd+bwd, ' + shape if i == 0 else 'DiT block fwd+bwd'}, {where}",
                            c["ours"]["tokens_per_s"], "tokens/s", f"plain SDPA block, equal lengths, {where}",
                            c["plain"]["tokens_per_s"], target="ratio ≥ 0.9"))
        one = next((c for c in cases if c["threads"] == 1), None)
        if one is not None:  # process CPU time: steadier than wall time on a shared machine, fair at 1 thread only
            rows.append(row("DiT block fwd+bwd, 1 thread, CPU time", one["tokens"] / one["ours"]["cpu_best_s"],
                            "tokens/s", "plain SDPA block, 1 thread, CPU time",
                            one["tokens"] / one["plain"]["cpu_best_s"], target="ratio ≥ 0.9"))
        for c in cases:
            where = f"{c['threads']} thread{'s' if c['threads'] > 1 else ''}"
            rows.append(row(f"DiT block model-FLOP rate, {where}", c["ours"]["gflops"], "GFLOP/s",
                            f"matmul {args.tokens}×{args.width}·{args.width}×{args.mlp}, {where}",
                            c["matmul"]["gflops"]))
        headline = {f"ratio_{c['threads']}t": c["ours"]["tokens_per_s"] / c["plain"]["tokens_per_s"] for c in cases}
        details = {"args": vars(args) | {"json": str(args.json)}, "cases": cases, "total_s": total,
                   "torch": torch.__version__}
        write_json(args.json, "dit_block", rows, details, headline=headline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
