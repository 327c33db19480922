#!/usr/bin/env bash
# One command that runs every GPU-only path of nnperf for real and prints a pass/fail table:
#   benchmarks/gpu_acceptance.sh [OUT_DIR] [--cpu-dry-run] [--only NAME,...]
# OUT_DIR defaults to /tmp/nnperf-gpu-acceptance; everything (runs, dataset cache, plots, logs,
# matplotlib/torch caches) is written under it and nowhere else. Without a CUDA/ROCm GPU it refuses
# with one line and exit 2, unless --cpu-dry-run (same checks on the CPU, tiny sizes, vendor energy
# SKIP). Exit 0 all PASS/SKIP, 1 any FAIL, 2 no GPU or bad usage.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${NNPERF_PYTHON:-$root/.venv/bin/python}"
[[ -x "$py" ]] || py="$(command -v python3)"

out="/tmp/nnperf-gpu-acceptance"
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu-dry-run) args+=("--cpu-dry-run") ;;
        --only) shift; args+=("--only" "${1:?--only needs a value}") ;;
        -h|--help) sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_acceptance: unknown option $1" >&2; exit 2 ;;
        *) out="$1" ;;
    esac
    shift
done

mkdir -p "$out"
out="$(cd "$out" && pwd)"
# Keep every cache and temporary file inside the output folder.
export MPLCONFIGDIR="$out/.cache/matplotlib" XDG_CACHE_HOME="$out/.cache" TMPDIR="$out/.tmp" \
       TORCHINDUCTOR_CACHE_DIR="$out/.cache/inductor" TRITON_CACHE_DIR="$out/.cache/triton" \
       NNPERF_CACHE="$out/cache" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
mkdir -p "$MPLCONFIGDIR" "$TMPDIR"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"

exec "$py" "$here/gpu_acceptance.py" "$out" ${args[@]+"${args[@]}"}
