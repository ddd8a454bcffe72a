#!/usr/bin/env bash
# Issue 13's measurements on a lent GPU machine, as one command (device time is about 15 minutes a session).
#
# On the CPU machine first (vLLM 0.33's CUDA wheel, slimmed, and the wheels it needs that the GPU image lacks):
#   XZ_THREADS=1 nice -n 19 benchmarks/gpu_vllm/make_bundle.sh .gpu-vllm \
#     T=$(ouroboros-vllm models path qwen2.5-coder-1.5b-instruct) D=$(ouroboros-vllm models path qwen2.5-coder-0.5b-instruct)
# then, per benchmarks/gpu_vllm/README.md, device call 1 (carry [".gpu-vllm/c1"]) stages part0, and call 2,
# within 30 s, carry [".gpu-vllm/c2"], timeout_s 600, runs:   bash benchmarks/gpu_session.sh .gpu-vllm/c2
# (the first session's figures are in docs/benchmarks/gpu/; an engine takes 45-65 s there, 20 of them imports).
#
# Order (what the issue's "done when" needs first; each step under its own timeout, sized from what is left of
# BUDGET seconds, results in $OUT after each step, one log for all of it):
#   1. engines through device_smoke.py at batch 1 and 16 (random bf16 weights built from the real configs), K=4:
#      plain eager (the smoke's reference), then with vLLM's CUDA graphs for the target (full decode graphs, no
#      torch.compile): plain; ours with default settings and vLLM's draft_model, both drafting with the random
#      0.5B (acceptance near 0: what drafting costs when it cannot pay); ours (fixed "greedy") and vLLM's
#      draft_model with the target as its own draft (acceptance near 1);
#   2. the plugin's own time per step at batch 16 (benchmarks.step_overhead, the target drafting for itself);
#   3. our draft forward, packed and static (CUDA graphs), 1-16 rows, on the 0.5B shape in bf16, if time is left
#      (benchmarks.draft_forward; the first session measured it).
# Everything is reported, nothing asserted: random weights leave bf16 near-ties that flip.
set -uo pipefail
C=${1:?usage: gpu_session.sh FOLDER_OF_THE_LAST_PART (e.g. .gpu-vllm/c2)}
BUDGET=${BUDGET:-570}  # seconds this script may take (the device call's limit is 600)
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1  # one log for all of it, in $OUT as it grows
T0=$SECONDS
# shellcheck disable=SC1091
source "$C/device_setup.sh" || exit $?
left() { echo $((BUDGET - (SECONDS - T0))); }
step() {  # NAME SECONDS COMMAND...: run it with a timeout, log its output and exit status
  local name=$1 limit=$2
  shift 2
  [ "$limit" -gt 20 ] || { echo "gpu_session: $name skipped (${limit} s left)"; return; }
  echo "gpu_session: $name (at most $limit s, $((SECONDS - T0)) s in)"
  timeout "$limit" "$@" 2>&1 | grep --line-buffered -v -e "^Loading" -e "it/s\]$"
  echo "gpu_session: $name exit ${PIPESTATUS[0]} after $((SECONDS - T0)) s"
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import importlib.metadata as m, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| vllm",
      m.version("vllm"), "| transformers", m.version("transformers"), "|", torch.cuda.get_device_name())'
} 2>&1 | tee "$OUT/device.txt"

ours() {  # LABEL DRAFT K MORE: our proposer as a --spec
  echo "$1={\"speculative_config\": {\"method\": \"custom_class\", \"model\": \"ouroboros_vllm.OuroborosProposer\",
 \"num_speculative_tokens\": $3}, \"additional_config\": {\"ouroboros\": {\"draft_model\": \"@$2\"$4}}}"
}
vllm_draft() {  # LABEL DRAFT K: vLLM's own draft_model method as a --spec
  echo "$1={\"speculative_config\": {\"method\": \"draft_model\", \"model\": \"@$2\", \"num_speculative_tokens\": $3}}"
}
FIXED=', "drafting": "greedy", "adaptive": false'
# vLLM's full CUDA graphs for decode steps (verification included), without torch.compile (minutes under gVisor).
GRAPHS='"enforce_eager": false, "compilation_config": {"mode": 0, "max_cudagraph_capture_size": 160}'
# A --spec with the graph settings added to its LLM() arguments, its outputs compared with plain's with graphs.
graphs() { echo "${1%\}}, $GRAPHS, \"_reference\": \"plain-graphs\"}"; }
SPECS=(
  --spec "plain-graphs={$GRAPHS}"
  --spec "$(graphs "$(ours ours-default-graphs D 4 '')")" --spec "$(graphs "$(vllm_draft vllm-draft-graphs D 4)")"
  --spec "$(graphs "$(ours ours-self-graphs T 4 "$FIXED")")" --spec "$(graphs "$(vllm_draft vllm-self-graphs T 4)")"
)

# 1. The engines, each in its own process (--timeout seconds each); builds /tmp/m/T and /tmp/m/D.
SMOKE=benchmarks/gpu_vllm/device_smoke.py  # the checkout's copy: it travels with every call
step smoke $(($(left) - 150)) python3 $SMOKE --assets "$C/assets.tar.xz" --model T=T --model D=D --batches 1,16 \
  --max-tokens 128 --timeout 90 --out "$OUT" "${SPECS[@]}"

# The random models the smoke builds, built here if it did not get that far.
[ -f /tmp/m/T/config.json ] && [ -f /tmp/m/D/config.json ] || step build-models 60 python3 - "$C" <<'PY'
import os, shutil, sys, tarfile
sys.path.insert(0, "benchmarks/gpu_vllm")
import device_smoke as smoke
assets = os.path.join(smoke.M, "_assets")
shutil.rmtree(assets, ignore_errors=True)
with tarfile.open(os.path.join(sys.argv[1], "assets.tar.xz")) as tar:
    tar.extractall(assets, filter="data")
for name in ("T", "D"):
    smoke.build(*smoke.resolve(f"{name}={name}", assets), seed=0)
PY

# 2. The plugin's own time per step at batch 16, the random 1.5B drafting for itself (every proposal accepted).
step step-overhead $(($(left) - 50)) python3 -m benchmarks.step_overhead --target /tmp/m/T \
  --batch-size 16 --max-tokens 48 -k 4 --settings '{"drafting": "greedy", "adaptive": false}' \
  --llm '{"dtype": "bfloat16", "gpu_memory_utilization": 0.5}' --out "$OUT/step_overhead.json"

# 3. Our draft forward alone, on the random 0.5B.
step draft-forward $(($(left) - 5)) python3 -m benchmarks.draft_forward --model /tmp/m/D --device cuda \
  --precision bfloat16 --rows 1 2 4 8 16 --context 512 --repeats 10 --out "$OUT/draft_forward.json"
echo "gpu_session: done in $((SECONDS - T0)) s; results in $OUT"
