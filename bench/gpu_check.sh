#!/usr/bin/env bash
# GPU readiness check (issue 13): on a machine with an NVIDIA GPU, build llama-cpp-python with CUDA
# in a fresh virtualenv, install this project in it, run a small sweep with every layer offloaded
# (model.n_gpu_layers=99), and print the baseline's, the trials' and the KLD comparison's tokens/s.
#
#   bench/gpu_check.sh [--model PATH.gguf] [--python PYTHON] [--out DIR] [--keep] [-- OVERRIDE ...]
#
#   --model   a GGUF to sweep (default: the built-in synthetic model, which checks the offload path
#             but is far too small for its tokens/s to mean anything)
#   --python  the interpreter the virtualenv is made from (default: python3; 3.11 or newer)
#   --out     where the venv, the sweep's outputs, logs and gpu_check.json go (default: a new
#             temporary folder)
#   --keep    keep the virtualenv (default: removed at exit; results and logs stay)
#   after --   more Hydra overrides for launch/sweep.py, e.g. search.types=[Q4_K_M] dataset.eval_chunks=8
#
# Needs: nvidia-smi (the driver), nvcc (the CUDA toolkit, for the build) and network access for pip.
# The CUDA build of llama.cpp takes several minutes; --no-cache-dir makes pip build it instead of
# reusing a CPU wheel it built earlier. Prints a summary and writes OUT/gpu_check.json.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() {
    echo "gpu_check: error: $*" >&2
    exit 1
}

say() {
    echo "gpu_check: $*" >&2
}

usage() {
    sed -n '2,18s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

# The llama-cpp-python version this project pins in pyproject.toml.
pinned_llama_version() {
    local py="$1"
    "$py" - "$ROOT/pyproject.toml" <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
pins = [m.group(1) for d in deps if (m := re.fullmatch(r"\s*llama-cpp-python\s*==\s*([^\s;,]+)\s*", d))]
if len(pins) != 1:
    sys.exit("pyproject.toml does not pin llama-cpp-python with ==")
print(pins[0])
EOF
}

check_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 ||
        die "nvidia-smi not found: this check needs a machine with an NVIDIA GPU and its driver"
    nvidia-smi -L >/dev/null 2>&1 ||
        die "nvidia-smi cannot talk to the driver ($(nvidia-smi -L 2>&1 | head -n 1))"
    if ! command -v nvcc >/dev/null 2>&1; then
        [[ -x /usr/local/cuda/bin/nvcc ]] ||
            die "nvcc not found: building llama-cpp-python with CUDA needs the CUDA toolkit (put its bin/ on PATH)"
        export PATH="/usr/local/cuda/bin:$PATH"
    fi
}

# Summary of a finished sweep under $1 (sweep.json, results.csv) and the KLD bench's JSON $2:
# prints it and writes $1/../gpu_check.json. Reads the files only; any python with pandas will do.
report() {
    local py="$1" out="$2" kld_json="$3" summary="$4"
    "$py" - "$out" "$kld_json" "$summary" <<'EOF'
import json, math, sys
from pathlib import Path

import pandas as pd

out, kld_json, summary = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
sweep = json.loads((out / "sweep.json").read_text())
base, prov = sweep["baseline"], sweep["provenance"]
if sweep.get("errors"):
    sys.exit(f"the sweep had failed trials: {sweep['errors']}")
if not base.get("computed"):
    sys.exit(f"the baseline was not computed in this run (loaded {base.get('loaded')} chunks): use a fresh cache_dir")
# The baseline stage: computed chunks of n_ctx tokens over the stage's seconds (model load included).
baseline_tps = base["computed"] * prov["n_ctx"] / base["seconds"]
rows = pd.read_csv(out / "results.csv")
trials = {str(r["label"]): float(r["eval_tokens_per_s"]) for _, r in rows.iterrows()}
kld = json.loads(kld_json.read_text())
result = {"model": prov["model"], "n_ctx": prov["n_ctx"], "n_batch": prov["n_batch"], "n_ubatch": prov["n_ubatch"],
          "baseline_chunks": base["computed"], "baseline_seconds": base["seconds"],
          "baseline_tokens_per_s": baseline_tps, "trial_eval_tokens_per_s": trials,
          "kld_tokens_per_s_1thread": kld["tokens_per_s_1thread"],
          "kld_tokens_per_s_2threads": kld["tokens_per_s_2threads"], "kld_vocab": kld.get("n_vocab"),
          "sweep_seconds": sweep.get("seconds"), "output_dir": str(out)}
summary.write_text(json.dumps(result, indent=2) + "\n")
print(f"model                     {prov['model']} (n_ctx {prov['n_ctx']}, n_batch {prov['n_batch']}, "
      f"n_ubatch {prov['n_ubatch']})")
print(f"baseline tokens/s         {baseline_tps:,.0f}  ({base['computed']} chunks in {base['seconds']:.2f} s, "
      "model load included)")
for label, tps in trials.items():
    print(f"trial tokens/s {label:<10} {tps:,.0f}" + ("" if math.isfinite(tps) else "  (nothing computed)"))
print(f"KLD tokens/s              {kld['tokens_per_s_1thread']:,.0f} (1 thread), "
      f"{kld['tokens_per_s_2threads']:,.0f} (2 threads)"
      + (f" at vocab {kld['n_vocab']:,}" if kld.get("n_vocab") else ""))
print(f"summary                   {summary}")
EOF
}

main() {
    local model="" python="python3" out="" keep=0
    local -a extra=()
    while (($#)); do
        case "$1" in
            --model) [[ $# -ge 2 ]] || die "--model needs a path"; model="$2"; shift 2 ;;
            --python) [[ $# -ge 2 ]] || die "--python needs an interpreter"; python="$2"; shift 2 ;;
            --out) [[ $# -ge 2 ]] || die "--out needs a folder"; out="$2"; shift 2 ;;
            --keep) keep=1; shift ;;
            -h | --help) usage; exit 0 ;;
            --) shift; extra=("$@"); break ;;
            *) die "unknown argument '$1' (see --help)" ;;
        esac
    done

    check_gpu
    command -v "$python" >/dev/null 2>&1 || die "python '$python' not found (use --python PATH)"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$python is Python $("$python" -c 'import platform; print(platform.python_version())'); 3.11 or newer is needed"
    if [[ -n "$model" ]]; then
        [[ -f "$model" ]] || die "model $model does not exist"
        model="$(cd "$(dirname "$model")" && pwd)/$(basename "$model")"
    fi
    local version
    version="$(pinned_llama_version "$python")" || die "cannot read the llama-cpp-python pin from $ROOT/pyproject.toml"

    out="${out:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
    mkdir -p "$out"
    out="$(cd "$out" && pwd)"
    local venv="$out/venv" logs="$out/logs"
    [[ ! -e "$venv" ]] || die "$venv already exists; choose another --out (the virtualenv must be fresh)"
    mkdir -p "$logs"
    if ((!keep)); then
        # shellcheck disable=SC2064  # expand now: $venv is local to main
        trap "rm -rf '$venv'" EXIT
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu_check: gpu /' >&2
    say "nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"

    say "virtualenv $venv ($("$python" -c 'import platform; print(platform.python_version())'))"
    "$python" -m venv "$venv" || die "cannot create a virtualenv with $python (Debian/Ubuntu: apt install python3-venv)"
    local vpy="$venv/bin/python"
    "$vpy" -m pip install --quiet --upgrade pip >"$logs/pip.log" 2>&1 ||
        die "pip upgrade failed; see $logs/pip.log"

    # Only this GPU's architecture (e.g. 9.0 -> 90): a much shorter build than llama.cpp's list.
    local cmake_args="-DGGML_CUDA=on" arch
    arch="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .' || true)"
    [[ "$arch" =~ ^[0-9]+$ ]] && cmake_args+=" -DCMAKE_CUDA_ARCHITECTURES=$arch"
    say "building llama-cpp-python==$version with $cmake_args (several minutes; log: $logs/llama_build.log)"
    CMAKE_ARGS="$cmake_args" FORCE_CMAKE=1 \
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$vpy" -m pip install --no-cache-dir --verbose "llama-cpp-python==$version" >"$logs/llama_build.log" 2>&1 ||
        die "the CUDA build of llama-cpp-python failed; see the end of $logs/llama_build.log"
    "$vpy" -c 'import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())' ||
        die "llama-cpp-python $version was built without GPU offload; see $logs/llama_build.log"

    say "installing ggufopt-ray from $ROOT"
    "$vpy" -m pip install -e "$ROOT" >>"$logs/pip.log" 2>&1 || die "pip install -e $ROOT failed; see $logs/pip.log"
    "$vpy" -c 'import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())' ||
        die "installing the project replaced the CUDA build of llama-cpp-python; see $logs/pip.log"

    # A small sweep: two quant types, few chunks, no early stopping (experiment=quick), every layer
    # on the GPU; Ray is told about the GPU so the baseline worker and each trial hold half of it.
    local -a sweep=(launch/sweep.py "output_dir=$out/sweep" "cache_dir=$out/cache" experiment=quick
        'search.types=[Q8_0,Q4_K_M]' model.n_gpu_layers=99 cluster.num_gpus=1 cluster.worker_gpus=0.5
        cluster.dashboard=false verbose=true)
    if [[ -n "$model" ]]; then
        # 16 chunks of 512 tokens: enough work that the GPU's rate shows through the model load.
        sweep+=(model=gguf "model.path=$model" model.n_ctx=512 model.n_batch=512 model.n_ubatch=512
            dataset.eval_chunks=16)
    fi
    sweep+=(${extra[@]+"${extra[@]}"})
    say "sweep: python ${sweep[*]} (log: $logs/sweep.log)"
    (cd "$ROOT" && "$vpy" "${sweep[@]}") >"$logs/sweep.log" 2>&1 ||
        die "the sweep failed; see the end of $logs/sweep.log"
    local offload
    offload="$(grep -m 1 -o 'offloaded [0-9]*/[0-9]* layers to GPU' "$logs/sweep.log" || true)"
    if [[ -n "$offload" ]]; then
        say "llama.cpp: $offload"
    else
        say "warning: no 'offloaded N/N layers to GPU' line in $logs/sweep.log; check that the GPU was used"
    fi

    # KLD statistics run on the CPU (numpy), at the model's vocabulary (default: 32000 and 128256).
    local -a vocab=()
    if [[ -n "$model" ]]; then
        vocab=(--vocab "$("$vpy" -c 'import sys; from ggufopt_ray.gguf.inspect import inspect_model
print(inspect_model(sys.argv[1]).vocab_size)' "$model")")
    fi
    say "KLD comparison throughput: bench/kld_throughput.py --quick ${vocab[*]} (log: $logs/kld.log)"
    (cd "$ROOT" && "$vpy" bench/kld_throughput.py --quick ${vocab[@]+"${vocab[@]}"} --json "$out/kld_throughput.json") \
        >"$logs/kld.log" 2>&1 || die "bench/kld_throughput.py failed; see $logs/kld.log"

    report "$vpy" "$out/sweep" "$out/kld_throughput.json" "$out/gpu_check.json" ||
        die "cannot read the sweep's results under $out/sweep"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
