"""Sparse conv benchmark: one 32->32 kernel-3 submanifold conv, forward + backward, on a ~200k-voxel 256^3
interior shell (room walls/floor/ceiling plus furniture-box surfaces), per backend and thread count.

    python bench/sparse_conv.py [--json out.json] [--scene shell] [--resolution 256] [--voxels 200000]
    python bench/sparse_conv.py --device cuda [--json out.json]

On CUDA: the torch backend, spconv's own SubMConv3d with its Native algorithm and with its CUDA default
(MaskImplicitGemm), and the spconv backend (spconv's Native kernels on our maps), each timed with
torch.cuda.synchronize() around every run; --threads applies to CPU runs only.

Reports, per case, the neighbour-map build alone, forward+backward with the map cached (what every layer
after the first pays in a U-Net), and forward+backward including a fresh map build; each as the best and
median wall time of --reps runs plus the best process CPU time (steadier on a shared machine). The ratio
torch/spconv is computed from numbers measured in this same run. On CPU the torch backend is also set against its
floors, measured in the same run on the same blocks: its matmuls alone (the compute floor of gather -> matmul ->
scatter) and the bytes each pair must move at the machine's measured copy bandwidth; with its gathers and
scatters timed alone, they say which part bounds it at each thread count. Scenes are plain functions in SCENES;
the data stage's real scenes can be plugged in the same way.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "stages" / "core" / "src", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench._report import row, write_json  # noqa: E402
from interiorfusion_core.sparse import (  # noqa: E402
    SparseTensor,
    SubMConv3d,
    backend_status,
    coords_to_spconv,
    to_spconv,
)
from interiorfusion_core.sparse import backend_spconv as bspconv  # noqa: E402
from interiorfusion_core.sparse.maps import build_submanifold_map  # noqa: E402


# ---- scenes: (resolution, target voxel count, seed) -> int64 [N, 3] surface voxel coordinates -----------
def interior_shell(resolution: int = 256, voxels: int = 200_000, seed: int = 0) -> torch.Tensor:
    """A room's one-voxel-thick walls, floor and ceiling plus hollow furniture boxes standing on the floor,
    added until ``voxels`` surface voxels are reached (y is up)."""
    g = torch.Generator().manual_seed(seed)
    r = resolution
    occ = torch.zeros(r, r, r, dtype=torch.bool)
    x0, x1 = int(0.08 * r), int(0.86 * r)
    y0, y1 = int(0.04 * r), int(0.47 * r)
    z0, z1 = int(0.12 * r), int(0.82 * r)
    for axis, lo, hi in ((0, x0, x1), (1, y0, y1), (2, z0, z1)):
        for v in (lo, hi):
            idx = [slice(x0, x1 + 1), slice(y0, y1 + 1), slice(z0, z1 + 1)]
            idx[axis] = v
            occ[tuple(idx)] = True
    for _ in range(500):
        if int(occ.sum()) >= voxels:
            break
        sx, sy, sz = (torch.randint(max(r // 26, 3), max(r // 5, 4), (3,), generator=g)).tolist()
        sy = min(sy, y1 - y0 - 2)
        bx = int(torch.randint(x0 + 1, max(x1 - sx, x0 + 2), (1,), generator=g))
        bz = int(torch.randint(z0 + 1, max(z1 - sz, z0 + 2), (1,), generator=g))
        box = torch.ones(sx, sy, sz, dtype=torch.bool)
        box[1:-1, 1:-1, 1:-1] = False  # hollow: surfaces only
        occ[bx : bx + sx, y0 + 1 : y0 + 1 + sy, bz : bz + sz] |= box
    return occ.nonzero().contiguous()


SCENES: dict[str, Callable[[int, int, int], torch.Tensor]] = {"shell": interior_shell}


# ---- timing -----------------------------------------------------------------------------------------------
def sync() -> None:
    """Wait for queued CUDA work (no-op without CUDA), so wall times cover the kernels, not their launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], reps: int, warmup: int = 1, slow_s: float = 3.0) -> dict[str, float]:
    walls, cpus = [], []
    for _ in range(warmup):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if time.perf_counter() - t0 > slow_s:
            reps = min(reps, 2)  # a contended machine: keep the whole run near its time budget
    for _ in range(reps):
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"best_s": min(walls), "median_s": statistics.median(walls), "cpu_best_s": min(cpus), "runs": reps}


def ours_case(
    coords: torch.Tensor,
    feats: torch.Tensor,
    grad: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    resolution: int,
    backend: str,
    threads: int,
    reps: int,
) -> tuple[dict, torch.Tensor]:
    torch.set_num_threads(threads)
    conv = SubMConv3d(32, 32, 3, backend=backend).to(feats.device)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    f = feats.clone().requires_grad_()
    warm = SparseTensor(coords, f, resolution, batch_size=1)

    def step(x: SparseTensor) -> torch.Tensor:
        conv.zero_grad(set_to_none=True)
        f.grad = None
        y = conv(x)
        y.feats.backward(grad)
        return y.feats

    out = step(warm).detach()
    result = {
        "map_build": measure(lambda: build_submanifold_map(coords, (resolution,) * 3, 1, (3, 3, 3)), reps),
        "fwd_bwd_cached_map": measure(lambda: step(warm.replace(f)), reps),
        "fwd_bwd_with_map": measure(lambda: step(SparseTensor(coords, f, resolution, batch_size=1)), reps),
    }
    return result, out


def spconv_native_case(
    coords: torch.Tensor,
    feats: torch.Tensor,
    grad: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    resolution: int,
    reps: int,
    algo: str = "Native",
) -> tuple[dict, torch.Tensor]:
    """spconv's own SubMConv3d and map builder on [b, z, y, x] indices (1 thread: its CPU kernels race).
    ``algo``: spconv's ConvAlgo name; only Native exists on CPU, MaskImplicitGemm is its CUDA default."""
    import spconv.pytorch as spconv
    from spconv.pytorch import ops
    from spconv.pytorch.core import ConvAlgo

    torch.set_num_threads(1)
    conv_algo = getattr(ConvAlgo, algo)
    m = spconv.SubMConv3d(32, 32, 3, bias=True, indice_key="bench", algo=conv_algo).to(feats.device)
    with torch.no_grad():
        m.weight.copy_(to_spconv(weight, (3, 3, 3)))
        m.bias.copy_(bias)
    idx = coords_to_spconv(coords)
    f = feats.clone().requires_grad_()
    device = feats.device

    def step(st) -> torch.Tensor:
        m.zero_grad(set_to_none=True)
        f.grad = None
        with bspconv.cpu_guard(device):
            y = m(st)
            y.features.backward(grad)
        return y.features

    fresh = lambda: spconv.SparseConvTensor(f, idx, [resolution] * 3, 1)  # noqa: E731
    base = fresh()
    out = step(base).detach()  # fills base.indice_dict: later steps on base reuse spconv's map
    geometry = ([3] * 3, [1] * 3, [1] * 3, [1] * 3, [0] * 3)  # ksize, stride, padding, dilation, out_padding
    if conv_algo == ConvAlgo.Native:
        map_fn = lambda: ops.get_indice_pairs(idx, 1, [resolution] * 3, conv_algo, *geometry, subm=True)  # noqa: E731
    else:
        map_fn = lambda: ops.get_indice_pairs_implicit_gemm(  # noqa: E731
            idx, 1, [resolution] * 3, conv_algo, *geometry, subm=True, is_train=True
        )
    with bspconv.cpu_guard(device):
        map_build = measure(map_fn, reps)
    result = {
        "map_build": map_build,
        "fwd_bwd_cached_map": measure(lambda: step(base.replace_feature(f)), reps),
        "fwd_bwd_with_map": measure(lambda: step(fresh()), reps),
    }
    # spconv's rows are our rows (submanifold keeps the index order), so outputs compare directly.
    return result, out


def floors_case(
    feats: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, kmap, threads: int, reps: int
) -> dict:
    """What bounds the torch backend's forward+backward at `threads`, measured in this run on the same blocks:

    - ``gemm_s``: its matmuls alone (forward, input gradient, weight gradient; the identity offset included) on
      blocks of the sizes it uses, with nothing gathered or scattered: the compute floor of this algorithm;
    - ``gather_s`` / ``scatter_s``: its index_select and index_add_ alone (3 gathers and 2 scatters per pair);
    - ``bytes_floor_s``: the bytes every pair must move at least once (its input row read and its output row
      written, for each of the three products) at the copy bandwidth measured here (``copy_gb_s``).
    """
    from interiorfusion_core.sparse import backend_torch as bt

    torch.set_num_threads(threads)
    chunk = bt._chunk(feats.device, None)
    blocks = list(bt._blocks(kmap, chunk))
    cin, cout = weight.shape[1], weight.shape[2]
    m = max((b - a for _, a, b in blocks), default=1)
    a_in, a_out = feats.new_empty(m, cin), feats.new_empty(m, cout)
    grad_w = torch.zeros_like(weight)
    out = feats.new_zeros(kmap.n_out, cout)

    def gemms() -> None:
        feats @ weight[kmap.identity]
        grad @ weight[kmap.identity].t()
        feats.t() @ grad
        for k, a, b in blocks:
            n = b - a
            torch.mm(a_in[:n], weight[k], out=a_out[:n])  # forward
            torch.mm(a_out[:n], weight[k].t(), out=a_in[:n])  # input gradient
            grad_w[k].addmm_(a_in[:n].t(), a_out[:n])  # weight gradient

    def gathers() -> None:
        for _, a, b in blocks:
            n = b - a
            torch.index_select(feats, 0, kmap.in_idx[a:b], out=a_in[:n])
            torch.index_select(grad, 0, kmap.out_idx[a:b], out=a_out[:n])
            torch.index_select(feats, 0, kmap.in_idx[a:b], out=a_in[:n])

    def scatters() -> None:
        for _, a, b in blocks:
            n = b - a
            out.index_add_(0, kmap.out_idx[a:b], a_out[:n])
            out.index_add_(0, kmap.in_idx[a:b], a_in[:n])

    src = torch.empty(1 << 26, device=feats.device)  # 256 MiB: far beyond the caches
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), reps)["best_s"]
    copy_gb_s = 2 * src.numel() * src.element_size() / copy / 1e9  # read + write
    pairs = kmap.num_pairs()
    floor_bytes = 3 * pairs * (cin + cout) * feats.element_size()
    return {
        "threads": threads,
        "flops": 3 * 2 * pairs * cin * cout,
        "gemm_s": measure(gemms, reps)["best_s"],
        "gather_s": measure(gathers, reps)["best_s"],
        "scatter_s": measure(scatters, reps)["best_s"],
        "copy_gb_s": copy_gb_s,
        "bytes_floor_s": floor_bytes / (copy_gb_s * 1e9),
        "bytes": floor_bytes,
    }


def headline_rows(cases: list[dict], cuda: bool, voxels: int, resolution: int,
                  floors: list[dict] | None = None) -> list[dict]:
    """The table's rows: torch backend vs spconv's own module (best spconv case on CUDA), same run, best wall
    time of forward+backward with the map cached (the cost of every layer after the first) and with a fresh map;
    on CPU also the process CPU time at one thread (steadier on a shared machine), the speed-up from 1 to 2
    threads, and the 1-thread time against its floors (`floors_case`)."""
    conv = f"32→32 k3 submanifold conv, {voxels / 1000:.0f}k voxels in {resolution}³: fwd+bwd"
    key, fresh = "fwd_bwd_cached_map", "fwd_bwd_with_map"
    spconvs = [c for c in cases if c["backend"].startswith("spconv")]
    if cuda:
        ref = min(spconvs, key=lambda c: c[key]["best_s"]) if spconvs else None
    else:
        ref = next((c for c in spconvs if c["backend"] == "spconv-native"), spconvs[0] if spconvs else None)

    def base(case: dict | None, k: str, stat: str = "best_s") -> tuple[str | None, float | None]:
        if case is None:
            return None, None
        return case["backend"] + ("" if cuda else f", {case['threads']} thread"), case[k][stat]

    rows = []
    for c in (c for c in cases if c["backend"] == "torch"):
        where = "CUDA" if cuda else f"{c['threads']} thread{'s' if c['threads'] > 1 else ''}"
        target = "≤ 0.18 s (quiet machine)" if not cuda and c["threads"] == 1 else None
        rows.append(row(f"{'fwd+bwd' if rows else conv}, cached map, torch backend, {where}", c[key]["best_s"],
                        "s", *base(ref, key), target=target))
    one = next((c for c in cases if c["backend"] == "torch" and (cuda or c["threads"] == 1)), None)
    if one is not None:
        rows.append(row(f"fwd+bwd incl. map build, torch backend, {'CUDA' if cuda else '1 thread'}",
                        one[fresh]["best_s"], "s", *base(ref, fresh)))
        if not cuda:
            label, value = base(ref, key, "cpu_best_s")
            rows.append(row("fwd+bwd, cached map, torch backend, 1 thread, CPU time", one[key]["cpu_best_s"], "s",
                            label and f"{label}, CPU time", value))
    if not cuda and one is not None:
        two = next((c for c in cases if c["backend"] == "torch" and c["threads"] == 2), None)
        if two is not None:
            rows.append(row("speed-up of 2 threads over 1 (cached map)", one[key]["best_s"] / two[key]["best_s"],
                            "×", "1 thread", 1.0, target="≥ 1.5× (quiet machine)"))
        fl = next((f for f in floors or [] if f["threads"] == 1), None)
        if fl is not None:
            rows.append(row("fwd+bwd, 1 thread, against its matmuls alone (compute floor)", one[key]["best_s"], "s",
                            f"the same blocks' matmuls, {fl['flops'] / 1e9:.1f} GFLOP", fl["gemm_s"]))
            rows.append(row("fwd+bwd, 1 thread, against the bytes it must move", one[key]["best_s"], "s",
                            f"{fl['bytes'] / 1e9:.2f} GB at {fl['copy_gb_s']:.1f} GB/s (copy, same run)",
                            fl["bytes_floor_s"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scene", choices=sorted(SCENES), default="shell")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--voxels", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="thread counts for the torch backend on CPU"
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print(f"--device {args.device}: torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2
    if cuda:
        torch.cuda.set_device(device)
    threads_before = torch.get_num_threads()
    t0 = time.perf_counter()
    coords3 = SCENES[args.scene](args.resolution, args.voxels, 0)
    coords = torch.cat([torch.zeros(len(coords3), 1, dtype=torch.long), coords3], 1)
    n = coords.shape[0]
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(n, 32, generator=g)
    grad = torch.randn(n, 32, generator=g)
    weight = torch.randn(27, 32, 32, generator=g) / (27 * 32) ** 0.5
    bias = torch.randn(32, generator=g) * 0.1
    coords, feats, grad, weight, bias = (t.to(device) for t in (coords, feats, grad, weight, bias))
    kmap = build_submanifold_map(coords, (args.resolution,) * 3, 1, (3, 3, 3))
    pairs = kmap.num_pairs()
    print(
        f"scene={args.scene} resolution={args.resolution}^3 voxels={n} pairs={pairs} "
        f"({pairs / n:.2f} per voxel) scene build {time.perf_counter() - t0:.1f}s"
    )
    where = (
        f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
        if cuda
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads available"
    )
    print(
        f"torch {torch.__version__} on {device} ({where}); backends: "
        + ", ".join(f"{k}={'yes' if v is None else 'no'}" for k, v in backend_status().items())
    )

    cases: list[dict] = []
    reference: torch.Tensor | None = None

    def record(name: str, threads: int, result: dict, out: torch.Tensor, note: str) -> None:
        nonlocal reference
        if reference is None:
            reference = out
        diff = float((out - reference).abs().max())
        cases.append(
            {"backend": name, "threads": threads, "note": note, "max_abs_diff_vs_torch": diff, **result}
        )

    status = backend_status()
    # On CUDA the thread count does not matter for the kernels: one torch run, labelled with the threads it had.
    torch_threads = [threads_before] if cuda else args.threads
    for th in torch_threads:
        res, out = ours_case(coords, feats, grad, weight, bias, args.resolution, "torch", th, args.reps)
        record("torch", th, res, out, "pure PyTorch (reference)")
    if status["spconv"] is None:
        res, out = spconv_native_case(coords, feats, grad, weight, bias, args.resolution, args.reps)
        record("spconv-native", 1, res, out, "spconv's own module + maps, Native algo")
        if cuda:
            res, out = spconv_native_case(
                coords, feats, grad, weight, bias, args.resolution, args.reps, algo="MaskImplicitGemm"
            )
            record("spconv-igemm", 1, res, out, "spconv's own module + maps, MaskImplicitGemm (CUDA default)")
        res, out = ours_case(coords, feats, grad, weight, bias, args.resolution, "spconv", 1, args.reps)
        record("spconv", 1, res, out, "backend: spconv Native kernels on our maps")
    else:
        print(f"spconv: not usable here ({status['spconv']}); torch backend only")
    if status["minkowski"] is None:
        for th in torch_threads:
            res, out = ours_case(
                coords, feats, grad, weight, bias, args.resolution, "minkowski", th, args.reps
            )
            record("minkowski", th, res, out, "backend: MinkowskiEngine")
    else:
        print("minkowski: not installed (see docs/sparse.md for the source build)")
    floors = [floors_case(feats, grad, weight, kmap, th, args.reps) for th in torch_threads]
    torch.set_num_threads(threads_before)

    hdr = (
        f"{'backend':<14}{'thr':>4}{'map build':>11}{'fwd+bwd':>10}{'(median)':>10}{'(cpu)':>8}"
        f"{'fwd+bwd+map':>13}{'max|diff|':>11}  note"
    )
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for c in cases:
        print(
            f"{c['backend']:<14}{c['threads']:>4}{c['map_build']['best_s']:>11.4f}"
            f"{c['fwd_bwd_cached_map']['best_s']:>10.4f}{c['fwd_bwd_cached_map']['median_s']:>10.4f}"
            f"{c['fwd_bwd_cached_map']['cpu_best_s']:>8.3f}{c['fwd_bwd_with_map']['best_s']:>13.4f}"
            f"{c['max_abs_diff_vs_torch']:>11.1e}  {c['note']}"
            + (" [slow warm-up: 2 runs]" if c["fwd_bwd_cached_map"]["runs"] < args.reps else "")
        )
    print(
        f"(seconds; best wall of {args.reps} runs after a warm-up unless marked; cpu = best process CPU time"
        + ("; CUDA synchronised before and after every run)" if cuda else ")")
    )

    print("\nwhat bounds the torch backend (its parts alone, same blocks; best wall of each):")
    print(f"{'thr':>4}{'matmuls':>10}{'gathers':>10}{'scatters':>10}{'GFLOP/s':>9}{'bytes floor':>13}{'copy GB/s':>11}")
    for fl in floors:
        print(f"{fl['threads']:>4}{fl['gemm_s']:>10.4f}{fl['gather_s']:>10.4f}{fl['scatter_s']:>10.4f}"
              f"{fl['flops'] / fl['gemm_s'] / 1e9:>9.1f}{fl['bytes_floor_s']:>13.4f}{fl['copy_gb_s']:>11.1f}")

    ratios = {}
    torch_cases = [c for c in cases if c["backend"] == "torch"]
    for other in ("spconv-native", "spconv-igemm", "spconv"):
        ref = next((c for c in cases if c["backend"] == other), None)
        if ref is None:
            continue
        for c in torch_cases:
            tag = "" if cuda else f"_{c['threads']}t"
            for key in ("fwd_bwd_cached_map", "fwd_bwd_with_map"):
                ratios[f"torch{tag}/{other}{'' if cuda else '_1t'} {key}"] = c[key]["best_s"] / ref[key]["best_s"]
            if c["threads"] == 1 and not cuda:  # CPU time compares fairly only without thread parallelism
                key = "fwd_bwd_cached_map"
                r = c[key]["cpu_best_s"] / ref[key]["cpu_best_s"]
                ratios[f"torch_1t/{other}_1t {key} (cpu time)"] = r
    if ratios:
        print("\nratio torch / spconv, same run (best wall unless marked; > 1: spconv faster):")
        for k, v in ratios.items():
            print(f"  {k:<55} {v:6.2f}x")
    total = time.perf_counter() - t0
    print(f"\ntotal benchmark time {total:.0f}s")
    if args.json:
        key = "fwd_bwd_cached_map"
        best_torch = min(torch_cases, key=lambda c: c[key]["best_s"])
        spconvs = [c for c in cases if c["backend"].startswith("spconv")]
        best_sp = min(spconvs, key=lambda c: c[key]["best_s"]) if spconvs else None
        headline = {"device": device.type, "torch_fwd_bwd_s": round(best_torch[key]["best_s"], 5)}
        if best_sp is not None:
            headline |= {
                "spconv_fwd_bwd_s": round(best_sp[key]["best_s"], 5),
                "spconv_case": best_sp["backend"],
                "torch/spconv": round(best_torch[key]["best_s"] / best_sp[key]["best_s"], 3),
            }
        details = {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
            "scene": args.scene,
            "resolution": args.resolution,
            "voxels": n,
            "pairs": pairs,
            "torch": torch.__version__,
            "cases": cases,
            "floors": floors,
            "ratios": ratios,
            "total_s": total,
        }
        write_json(args.json, "sparse_conv", headline_rows(cases, cuda, n, args.resolution, floors), details,
                   headline=headline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
