#!/usr/bin/env bash
# GPU check: one command on a CUDA machine, run from the repository root.
#
#   bash bench/gpu_check.sh                         # results in ./gpu-check-out (or $OUT)
#   GPU_CHECK_ALLOW_CPU=1 bash bench/gpu_check.sh   # no GPU: the same steps on CPU, small sizes (tests the script)
#
# 1. environment: nvidia-smi, python/torch/CUDA versions, the project's dependencies (checked up front)
# 2. parity (bench/gpu_check.py --checks parity): sparse convs and a tiny VAE step, torch backend on CUDA vs CPU
#    float64, spconv on CUDA vs torch on CUDA, forward and every gradient; any failure makes the script exit 1
#    VAE bf16 step and encode job (bench/gpu_check.py --checks bf16,encode): the smoke VAE's training step in bf16
#    as the engine runs it (autocast; DeepSpeed-style bf16 weights and inputs), finite losses and gradients, time
#    per step; the stage's encode job with the model on the device, time per sample; a failure also exits 1
#    structure DiT (bench/gpu_check.py --checks dit): the seed-size latent DiT's bf16 training step under DeepSpeed
#    ZeRO-3 (one process) on 2 × 8k packed tokens, time per step and MFU against the GPU's dense bf16 peak
#    (target ≥ 45 %, reported); a tiny DiT with a bf16 stand-in on CPU; non-finite losses or gradients exit 1
# 3. bench/sparse_conv.py --device cuda: one 32->32 k3 submanifold conv on a 200k-voxel 256³ shell
# 4. bench/vae_scaling.py --device cuda: VAE train step at 64³/128³/256³, smoke widths (and the torch backend
#    beside spconv when spconv is there), then the default widths [32, 64, 128, 256, 512] x 2 blocks
# Everything goes to $OUT: gpu-check.log, nvidia-smi.txt, parity.json, vae_bf16_encode.json, dit_zero3.json,
# sparse_conv.json,
# vae_scaling*.json, summary.json. Nothing is downloaded: the machine may have no network.
#
# Python: $GPU_CHECK_PYTHON, else the first of python3 / ./.venv/bin/python that imports torch. A venv
# ($GPU_CHECK_VENV, default .interiorfusion/gpu-check-venv) is made on top of it with --system-site-packages
# (plus a .pth to the interpreter's own site-packages when that interpreter is itself a venv, whose packages
# --system-site-packages would not see) and the stage packages are installed into it with
# `pip install --no-deps -e`. If either step fails, the checks run on that interpreter with the stage sources on
# PYTHONPATH instead (the benchmarks import them from the checkout either way).
# Missing packages (spconv-cu126, or a dependency below): put wheels in ./gpu-check-wheels ($GPU_CHECK_WHEELS,
# relative to the repository root), fetched with `pip download` on a connected machine for the GPU machine's
# Python (see docs/sparse.md, "GPU check"); every wheel there whose distribution is not installed yet is
# installed from that folder alone (--no-index --no-deps), so nothing already there (numpy, torch) is replaced.
#
# GPU_CHECK_BUDGET_S (default 600) caps the whole run: each step's timeout is cut to the time left.
# Exit status: 0 all passed; 1 a parity, bf16-step, encode or DiT-step check failed; 2 a benchmark failed or timed out (parity passed);
# 3 no usable Python/torch or a dependency missing; 4 no CUDA device (and GPU_CHECK_ALLOW_CPU unset).

set -uo pipefail

OUT="${OUT:-./gpu-check-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu-check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 3
VENV="${GPU_CHECK_VENV:-.interiorfusion/gpu-check-venv}"
WHEELS="${GPU_CHECK_WHEELS:-gpu-check-wheels}"
REQUIRED="torch numpy pydantic yaml PIL tqdm trimesh"   # import names: torch numpy pydantic pyyaml pillow tqdm trimesh
export PYTHONUNBUFFERED=1
SRC_PATH="$ROOT/stages/core/src:$ROOT/stages/data/src:$ROOT/stages/vae/src:$ROOT/stages/structure/src"
export PYTHONPATH="$SRC_PATH${PYTHONPATH:+:$PYTHONPATH}"
STARTED=$(date +%s)

section() { printf '\n=== %s (%ss)\n' "$1" "$(($(date +%s) - STARTED))"; }
die() { echo "GPU CHECK FAILED: $2"; exit "$1"; }

section "machine"
date -u +"%Y-%m-%dT%H:%M:%SZ"
uname -srm
if command -v git >/dev/null 2>&1 && git rev-parse --git-dir >/dev/null 2>&1; then
    echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')"
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
    nvidia-smi -q >>"$OUT/nvidia-smi.txt" 2>&1
else
    echo "nvidia-smi: not found" | tee "$OUT/nvidia-smi.txt"
fi

section "python"
PY=""
for cand in ${GPU_CHECK_PYTHON:-} python3 ./.venv/bin/python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import torch' >/dev/null 2>&1; then
        PY="$(command -v "$cand")"
        break
    fi
done
[ -n "$PY" ] || die 3 "no Python that imports torch (tried: ${GPU_CHECK_PYTHON:-} python3 ./.venv/bin/python); \
install torch for this machine's CUDA, or set GPU_CHECK_PYTHON to an interpreter that has it"
echo "base interpreter: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"

# A venv on top of it, with the stage packages installed editable; any failure falls back to PYTHONPATH.
make_venv() {
    "$PY" -m venv --system-site-packages "$VENV" || return 1
    local vpy="$VENV/bin/python"
    # From a venv interpreter, --system-site-packages reaches the base installation, not that venv's packages.
    "$PY" - "$VENV" <<'EOF' || return 1
import site, sys, sysconfig, pathlib, subprocess
if sys.prefix != sys.base_prefix:
    venv = pathlib.Path(sys.argv[1])
    target = subprocess.check_output([str(venv / "bin" / "python"), "-c",
                                      "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True)
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                           *site.getsitepackages()])
    pathlib.Path(target.strip(), "_gpu_check_base.pth").write_text("\n".join(paths) + "\n")
    print(f"venv sees the base interpreter's packages through _gpu_check_base.pth ({sys.prefix})")
EOF
    "$vpy" -c 'import torch' || return 1
    "$vpy" -m pip install --no-deps --no-index --no-build-isolation --disable-pip-version-check -q \
        -e stages/core -e stages/data -e stages/vae -e stages/structure || return 1
    return 0
}
if make_venv; then
    PY="$VENV/bin/python"
    echo "venv: $VENV (project packages installed editable, --no-deps)"
    PIP_TARGET=()
else
    echo "venv or editable install not possible here (see above): running on $PY with the stage sources on PYTHONPATH"
    SITE="$ROOT/.interiorfusion/gpu-check-site"
    export PYTHONPATH="$SITE:$PYTHONPATH"
    PIP_TARGET=(--target "$SITE")
fi

# Install, from the local wheel folder only, every wheel there whose distribution is not installed yet (so a
# numpy or torch already present is never replaced), without dependency resolution: the folder is expected to
# hold what `pip download` resolved (the wanted packages and their dependencies).
install_wheels() {
    [ -d "$WHEELS" ] || return 0
    local todo
    todo="$("$PY" - "$WHEELS" <<'EOF'
import importlib.metadata as md, pathlib, re, sys
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        print(whl)
EOF
)"
    if [ -z "$todo" ]; then
        echo "$WHEELS: every wheel there is installed already"
        return 0
    fi
    echo "installing from $WHEELS (no index, no dependency resolution):" $todo
    # shellcheck disable=SC2086
    "$PY" -m pip install --no-index --no-deps --disable-pip-version-check -q "${PIP_TARGET[@]}" $todo \
        || echo "pip could not install the wheels from $WHEELS"
}
missing_modules() {  # those of the named modules that do not import (absent, or broken: an ABI mismatch, say)
    "$PY" - "$@" <<'EOF' 2>/dev/null
import importlib, sys
missing = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        missing.append(name)
print(" ".join(missing))
EOF
}

section "dependencies"
MISSING="$(missing_modules $REQUIRED)"
if [ -n "$MISSING" ]; then
    declare -A DIST=([yaml]=pyyaml [PIL]=pillow)
    PKGS=""
    for m in $MISSING; do PKGS="$PKGS ${DIST[$m]:-$m}"; done
    echo "missing: $PKGS"
    install_wheels
    MISSING="$(missing_modules $REQUIRED)"
fi
"$PY" - <<'EOF'
import importlib
for m in ("torch", "numpy", "pydantic", "yaml", "PIL", "tqdm", "trimesh", "spconv", "cumm"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m:<9} {getattr(mod, '__version__', '?')}")
    except Exception as exc:
        print(f"  {m:<9} -- ({type(exc).__name__}: {exc})")
EOF
if [ -n "$MISSING" ]; then
    die 3 "missing Python modules: $MISSING. The checks need torch, numpy, pydantic, pyyaml, pillow, tqdm and \
trimesh. Without network: on a connected machine, pip download --only-binary=:all: --python-version X.Y \
--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d gpu-check-wheels <packages> (X.Y = this \
machine's Python), copy gpu-check-wheels/ into the checkout here and rerun"
fi

section "torch and CUDA"
"$PY" -c '
import torch
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
print(f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, sm {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB,",
          f"{p.multi_processor_count} SMs")
'
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    DEVICE=cuda
elif [ "${GPU_CHECK_ALLOW_CPU:-0}" = "1" ]; then
    DEVICE=cpu
    export OMP_NUM_THREADS=1  # shared CPUs: one thread is the stable configuration (docs/sparse.md)
    echo "NO CUDA: GPU_CHECK_ALLOW_CPU=1, so every step runs on CPU at small sizes, 1 thread (tests this script," \
        "measures no GPU)"
else
    die 4 "torch sees no CUDA device (driver missing, CUDA_VISIBLE_DEVICES empty, or a CPU-only torch build). \
Set GPU_CHECK_ALLOW_CPU=1 to run the same steps on CPU."
fi

section "spconv"
[ -n "$(missing_modules spconv)" ] && install_wheels
if "$PY" - <<'EOF'; then
import sys
from interiorfusion_core.sparse import backend_status
why = backend_status()["spconv"]
print("spconv backend:", "usable" if why is None else f"not usable ({why})")
sys.exit(why is not None)
EOF
    HAVE_SPCONV=1
else
    HAVE_SPCONV=0
    cat <<'EOF'
SKIP: spconv is not importable here, so the spconv parity cases and benchmark columns are skipped (torch backend only).
To provide it without network: on a connected machine with this machine's Python version X.Y run
    pip download --only-binary=:all: --python-version X.Y --platform manylinux_2_28_x86_64 \
        --platform manylinux2014_x86_64 -d gpu-check-wheels spconv-cu126
(spconv-cu126 pulls cumm-cu126 <0.8 and its pure-Python dependencies; ~100 MB), copy gpu-check-wheels/ into this
checkout (or point GPU_CHECK_WHEELS at it) and rerun: it is installed from that folder only.
EOF
fi

STATUS=0
BENCH_FAILED=""
BUDGET="${GPU_CHECK_BUDGET_S:-600}"  # whole script; each step's timeout is cut to what is left
run_step() {  # name, timeout seconds, command...
    local name="$1" limit="$2"
    shift 2
    section "$name"
    local left=$((BUDGET - ($(date +%s) - STARTED)))
    if [ "$left" -lt 30 ]; then
        echo "$name: skipped, the ${BUDGET}s budget is spent (GPU_CHECK_BUDGET_S)"
        return 124
    fi
    [ "$left" -lt "$limit" ] && limit="$left"
    echo "+ $*"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    [ "$rc" -eq 124 ] && echo "$name: timed out after ${limit}s"
    [ "$rc" -ne 0 ] && echo "$name: exit $rc"
    return "$rc"
}

run_step "parity ($DEVICE)" 300 "$PY" bench/gpu_check.py --device "$DEVICE" --checks parity \
    --json "$OUT/parity.json"
PARITY_RC=$?
[ "$PARITY_RC" -ne 0 ] && STATUS=1
run_step "VAE bf16 training step and encode job ($DEVICE)" 240 "$PY" bench/gpu_check.py --device "$DEVICE" \
    --checks bf16,encode --json "$OUT/vae_bf16_encode.json"
TRAIN_RC=$?
[ "$TRAIN_RC" -ne 0 ] && STATUS=1
run_step "structure DiT bf16 ZeRO-3 step, MFU ($DEVICE)" 300 "$PY" bench/gpu_check.py --device "$DEVICE" \
    --checks dit --json "$OUT/dit_zero3.json"
DIT_RC=$?
[ "$DIT_RC" -ne 0 ] && STATUS=1

if [ "$DEVICE" = cuda ]; then
    SPARSE_ARGS=()
    VAE_ARGS=()
else  # CPU fallback: same code paths, small sizes, one thread
    SPARSE_ARGS=(--resolution 128 --voxels 40000 --reps 2 --threads 1)
    VAE_ARGS=(--resolutions 32 64 128 --reps 1 --budget-s 20)
fi
run_step "sparse conv benchmark ($DEVICE)" 240 "$PY" bench/sparse_conv.py --device "$DEVICE" \
    "${SPARSE_ARGS[@]}" --json "$OUT/sparse_conv.json" || BENCH_FAILED="$BENCH_FAILED sparse_conv"
run_step "VAE scaling, smoke widths ($DEVICE)" 240 "$PY" bench/vae_scaling.py --device "$DEVICE" \
    "${VAE_ARGS[@]}" --json "$OUT/vae_scaling.json" || BENCH_FAILED="$BENCH_FAILED vae_scaling"
if [ "$HAVE_SPCONV" = 1 ] && [ "$DEVICE" = cuda ]; then  # on CPU the default backend is torch already
    run_step "VAE scaling, smoke widths, torch backend ($DEVICE)" 240 "$PY" bench/vae_scaling.py \
        --device "$DEVICE" --backend torch "${VAE_ARGS[@]}" --json "$OUT/vae_scaling_torch.json" \
        || BENCH_FAILED="$BENCH_FAILED vae_scaling_torch"
fi
if [ "$DEVICE" = cuda ]; then
    run_step "VAE scaling, default widths ($DEVICE)" 300 "$PY" bench/vae_scaling.py --device "$DEVICE" \
        --channels 32 64 128 256 512 --blocks 2 --latent-dim 64 --json "$OUT/vae_scaling_full.json" \
        || BENCH_FAILED="$BENCH_FAILED vae_scaling_full"
else
    section "VAE scaling, default widths"
    echo "skipped on CPU (minutes per step at 256³); runs on CUDA only"
fi

section "summary"
"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
summary = {}
for name in ("parity", "vae_bf16_encode", "dit_zero3", "sparse_conv", "vae_scaling", "vae_scaling_torch", "vae_scaling_full"):
    path = out / f"{name}.json"
    if path.exists():
        data = json.loads(path.read_text())
        summary[name] = data.get("headline", {})
        print(f"  {name:<18} {json.dumps(summary[name])}")
(out / "summary.json").write_text(json.dumps(summary, indent=2))
EOF
[ -n "$BENCH_FAILED" ] && echo "benchmarks that failed:$BENCH_FAILED"
echo "results in $OUT (log: $LOG); total $(($(date +%s) - STARTED))s"
if [ "$STATUS" -ne 0 ]; then
    if [ "$PARITY_RC" -eq 1 ]; then
        echo "GPU CHECK FAILED: parity (see the FAIL rows above and $OUT/parity.json)"
    elif [ "$PARITY_RC" -ne 0 ]; then
        echo "GPU CHECK FAILED: the parity step did not complete (exit $PARITY_RC; 124 = timed out or out of budget)"
    fi
    if [ "$TRAIN_RC" -eq 1 ]; then
        echo "GPU CHECK FAILED: VAE bf16 step / encode job (see the FAIL rows above and $OUT/vae_bf16_encode.json)"
    elif [ "$TRAIN_RC" -ne 0 ]; then
        echo "GPU CHECK FAILED: the VAE bf16 step / encode job did not complete (exit $TRAIN_RC; 124 = timed out or" \
            "out of budget)"
    fi
    if [ "$DIT_RC" -eq 1 ]; then
        echo "GPU CHECK FAILED: structure DiT bf16 step (see the FAIL rows above and $OUT/dit_zero3.json)"
    elif [ "$DIT_RC" -ne 0 ]; then
        echo "GPU CHECK FAILED: the structure DiT step did not complete (exit $DIT_RC; 124 = timed out or out of" \
            "budget)"
    fi
    exit 1
fi
[ -n "$BENCH_FAILED" ] && exit 2
echo "GPU CHECK PASSED ($DEVICE)"
exit 0
