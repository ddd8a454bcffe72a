#!/usr/bin/env bash
# Issue 13's measurements on a lent GPU machine, as one command (device time is about 15 minutes a session).
#
# On the CPU machine first: XZ_THREADS=1 nice -n 19 ../shared/tools/gpu-vllm/make_bundle.sh .gpu-vllm \
#   T=$(ouroboros-vllm models path qwen2.5-coder-1.5b-instruct) D=$(ouroboros-vllm models path qwen2.5-coder-0.5b-instruct)
# then, per that tool's README, device call 1 (carry .gpu-vllm/c1) stages part0, and call 2, within 30 s,
# carry [".gpu-vllm/c2"], timeout_s 600, runs:   bash benchmarks/gpu_session.sh .gpu-vllm/c2
#
# Order (the cheapest and most telling first, each step under its own timeout, results in $OUT after each):
#   1. our draft forward, packed and static (CUDA graphs), 1-16 rows, on the 0.5B shape in bf16
#      (benchmarks.draft_forward; checks graph replays against the grid run eagerly);
#   2. engines through device_smoke.py at batch 1 and 16 (random bf16 weights built from the real configs):
#      plain; vLLM's draft_model and ours ("greedy", fixed K) with the target as its own draft (acceptance
#      near 1) and with the random 0.5B (near 0); ours with default settings.
# Everything is reported, nothing asserted: random weights leave bf16 near-ties that flip.
set -uo pipefail
C=${1:?usage: gpu_session.sh FOLDER_OF_THE_LAST_PART (e.g. .gpu-vllm/c2)}
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
# shellcheck disable=SC1091
source "$C/device_setup.sh" || exit $?
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"

SMOKE=(python3 "$C/device_smoke.py" --model T=T --model D=D --batches 1,16 --max-tokens 64 --timeout 100)
ours() {  # LABEL DRAFT K MORE: our proposer as a --spec
  echo "$1={\"speculative_config\": {\"method\": \"custom_class\", \"model\": \"ouroboros_vllm.OuroborosProposer\",
 \"num_speculative_tokens\": $3}, \"additional_config\": {\"ouroboros\": {\"draft_model\": \"@$2\"$4}}}"
}
vllm_draft() {  # LABEL DRAFT K: vLLM's own draft_model method as a --spec
  echo "$1={\"speculative_config\": {\"method\": \"draft_model\", \"model\": \"@$2\", \"num_speculative_tokens\": $3}}"
}
FIXED=', "drafting": "greedy", "adaptive": false'
SPECS=(
  --spec "$(vllm_draft vllm-self T 4)" --spec "$(ours ours-self T 4 "$FIXED")"
  --spec "$(vllm_draft vllm-random D 4)" --spec "$(ours ours-random D 4 "$FIXED")"
  --spec "$(ours ours-default D 8 '')"
)

# 1. The draft forward alone, on the 0.5B shape built with random bf16 weights as device_smoke builds it.
timeout 120 python3 - "$C" <<'PY' 2>&1 | tee "$OUT/build.log"
import os, shutil, sys, tarfile
sys.path.insert(0, sys.argv[1])
import device_smoke as smoke
assets = os.path.join(smoke.M, "_assets")
shutil.rmtree(assets, ignore_errors=True)
with tarfile.open(os.path.join(sys.argv[1], "assets.tar.xz")) as tar:
    tar.extractall(assets, filter="data")
smoke.build(*smoke.resolve("D=D", assets), seed=0)
PY
timeout 120 python3 -m benchmarks.draft_forward --model /tmp/m/D --device cuda --precision bfloat16 \
  --rows 1 2 4 8 16 --context 512 --out "$OUT/draft_forward.json" 2>&1 | grep -v "^Loading" | tee "$OUT/draft_forward.log"

# 2. The engines (each in its own process, --timeout seconds each).
timeout 420 "${SMOKE[@]}" "${SPECS[@]}" --out "$OUT" 2>&1 | tee "$OUT/smoke.log"
echo "gpu_session: done; results in $OUT"
