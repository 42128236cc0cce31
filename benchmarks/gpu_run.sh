#!/usr/bin/env bash
# One GPU session: install, GPU tests, kernel benchmark, latency, throughput (with HF);
# STEPS=conformance runs the plugin conformance suite on the GPU.
# Usage on a GPU machine without network (extra wheels in .whl/):  bash benchmarks/gpu_run.sh [MODEL ...]
# A FlashAttention-3 library for the flash_attn backend travels as .fa3/_vllm_fa3_C.abi3.so.xz
# (carry .fa3; see docs/gpu.md). The structured step needs a tokenizer directory (carry .bench-tokenizer: SmolLM2's
# tokenizer.json + tokenizer_config.json).
# Results and logs go to $OUT (or ./gpu-out).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || exit 1
# FlashAttention-3 for the flash_attn backend: vLLM's prebuilt library, carried xz-packed in .fa3/.
if ls .fa3/*.so.xz >/dev/null 2>&1; then
    mkdir -p /tmp/fa3 && for f in .fa3/*.so.xz; do xz -dc "$f" > "/tmp/fa3/$(basename "${f%.xz}")"; done
    export KVLOOM_FLASH_ATTN_LIBRARY=$(ls /tmp/fa3/*.so | head -1)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
echo "${COMMIT:-unknown}" | tee "$OUT/commit.txt"

step() {  # name, timeout seconds, command...
    local name=$1 limit=$2; shift 2
    echo "=== $name"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name exit $status"
}

STEPS=${STEPS:-tests,kernels,latency,throughput}
MODELS=${*:-qwen2-0.5b}
if [[ $STEPS == *conformance* ]]; then  # the plugin conformance suite on the GPU, example included
    python3 -m pip install -q --no-deps --no-build-isolation -e examples/kvloom-plugin-example >/dev/null
    step conformance 500 python3 -m pytest -q -p no:cacheprovider --pyargs kvloom.testing --kvloom-device cuda -rs ${CONFORMANCE_ARGS:-}
fi
[[ $STEPS == *tests* ]] && step gpu_tests 300 python3 -m pytest -q -m gpu -p no:cacheprovider ${GPU_TESTS:-tests}
[[ $STEPS == *kernels* ]] && step kernels 240 python3 benchmarks/attention_kernels.py ${KERNEL_ARGS:-} --json "$OUT/kernels.json"
[[ $STEPS == *moe* ]] && step moe_layer 300 python3 benchmarks/moe_layer.py ${MOE_ARGS:-} --json "$OUT/moe_layer.json"
for model in $MODELS; do
    [[ $STEPS == *latency* ]] && step "latency_$model" 300 python3 benchmarks/latency.py --model "$model" --json "$OUT/latency_$model.json"
    [[ $STEPS == *profile* ]] && step "profile_$model" 240 python3 benchmarks/profile_step.py --model "$model" --batch 1 256 --steps 20
    [[ $STEPS == *serve* ]] && step "serve_$model" 400 python3 benchmarks/serve.py --model "$model" --json "$OUT/serve_$model.json"
    [[ $STEPS == *structured* ]] && step "structured_$model" 500 python3 benchmarks/structured_output.py --model "$model" --tokenizer "${TOKENIZER:-.bench-tokenizer}" ${STRUCTURED_ARGS:-} --json "$OUT/structured_$model.json"
    [[ $STEPS == *spec* ]] && step "spec_$model" 560 python3 benchmarks/spec_decode.py --model "$model" ${SPEC_ARGS:-} --json "$OUT/spec_$model.json"
    [[ $STEPS == *throughput* ]] && step "throughput_$model" 560 python3 benchmarks/throughput.py --model "$model" ${THROUGHPUT_ARGS:-} --json "$OUT/throughput_$model.json"
done
