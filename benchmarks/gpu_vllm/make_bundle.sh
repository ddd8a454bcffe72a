#!/usr/bin/env bash
# make_bundle.sh [OUTDIR] [NAME=HF_MODEL_DIR ...]
#
# Run inside the project checkout on the CPU machine. Builds what the lent GPU machine needs to run the CUDA
# build of vLLM 0.33.0: a slimmed vllm wheel plus 29 pinned pure/abi3 wheels, packed as one tar.xz, split
# into 52 MiB parts, one part per carried folder: OUTDIR/c1/part0, OUTDIR/c2/part1, ... The last folder also
# gets SHA256SUMS, device_setup.sh, device_smoke.py and, when NAME=DIR pairs are given, assets.tar.xz
# (config.json + tokenizer files of each model folder, no weights). OUTDIR defaults to .gpu-vllm in the
# checkout and is added to .git/info/exclude. Prints the device calls to make.
#
# Environment: GPU_VLLM_CACHE (download cache; default ~/.cache/gpu-vllm; layout: <vllm wheel>, deps/*.whl),
# XZ_THREADS (default 0 = all cores), XZ_LEVEL (6), PART_MIB (52), PYTHON (python3).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(git rev-parse --show-toplevel)
OUTDIR=$ROOT/.gpu-vllm
if [[ $# -gt 0 && $1 != *=* ]]; then OUTDIR=$1; shift; fi
PY=${PYTHON:-python3}
CACHE=${GPU_VLLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gpu-vllm}
XZ_THREADS=${XZ_THREADS:-0}
XZ_LEVEL=${XZ_LEVEL:-6}
PART_MIB=${PART_MIB:-52}  # 52: the checkout's own files (8 MiB) travel with each part
LIMIT_MIB=64                       # what one device call may carry: repo files + carried folder
VLLM_WHL=vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl
DEPS=(cachetools==8.0.2 cbor2==6.3.0 msgspec==0.22.0 pybase64==1.5.1 partial_json_parser==0.2.1.1.post7
      pyzmq==27.3.0 fastapi==0.136.3 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5
      annotated_types==0.8.0 typing_inspection==0.4.5 openai==3.57.0 jiter==0.19.0 sniffio==1.3.1
      httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 oss_harmony==0.0.11 xgrammar==0.2.8
      apache_tvm_ffi==0.1.11 blake3==1.0.11 setproctitle==1.3.8
      # imported when vLLM 0.33 starts (llguidance, orjson), loads a model (compressed_tensors, which needs
      # loguru) or serves (uvicorn, watchfiles): each found missing by a failed GPU run (2026-11-30)
      llguidance==1.7.6 orjson==3.13.0 compressed_tensors==0.17.0 loguru==0.7.3 uvicorn==0.54.0 watchfiles==1.3.0)
PIP_PLATFORM=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
              --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
              --platform manylinux_2_26_x86_64
              --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
              --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)

for m in "$@"; do
  [[ $m == *=* && -f ${m#*=}/config.json ]] \
    || { echo "make_bundle: '$m' is not NAME=DIR with DIR/config.json" >&2; exit 2; }
done

# 1. Downloads (reused when already in the cache).
mkdir -p "$CACHE/deps"
whl_for() {  # DIR SPEC -> path of the cached wheel for SPEC (name==version), or nothing
  local name=${2%%==*} ver=${2#*==} f
  name=$(tr 'A-Z-' 'a-z_' <<<"$name")
  for f in "$1/$name-$ver-"*.whl; do if [ -f "$f" ]; then echo "$f"; break; fi; done
}
[ -f "$CACHE/$VLLM_WHL" ] || "$PY" -m pip download -q "${PIP_PLATFORM[@]}" -d "$CACHE" vllm==0.33.0
missing=()
for spec in "${DEPS[@]}"; do [ -n "$(whl_for "$CACHE/deps" "$spec")" ] || missing+=("$spec"); done
[ ${#missing[@]} -eq 0 ] || "$PY" -m pip download -q "${PIP_PLATFORM[@]}" -d "$CACHE/deps" "${missing[@]}"

# 2. Slim vllm wheel + the pinned deps -> whl/ -> bundle.tar.xz.
BUILD=$(mktemp -d -t gpu-vllm-build.XXXXXX)
trap 'rm -rf "$BUILD"' EXIT
mkdir "$BUILD/whl"
"$PY" "$HERE/slim_wheel.py" "$CACHE/$VLLM_WHL" "$BUILD/whl"
for spec in "${DEPS[@]}"; do
  w=$(whl_for "$CACHE/deps" "$spec"); [ -n "$w" ] || { echo "make_bundle: no wheel for $spec" >&2; exit 1; }
  cp "$w" "$BUILD/whl/"
done
echo "make_bundle: compressing $(du -sm "$BUILD/whl" | cut -f1) MiB of wheels (xz -$XZ_LEVEL -T$XZ_THREADS) ..."
tar -C "$BUILD" --sort=name --owner=0 --group=0 --numeric-owner --mtime=2026-01-01 -cf - whl \
  | xz -T"$XZ_THREADS" -"$XZ_LEVEL" -c > "$BUILD/bundle.tar.xz"
rm -rf "$BUILD/whl"

# 3. Parts, checksums, carried folders.
(cd "$BUILD" && split -b "${PART_MIB}M" -d -a 3 bundle.tar.xz part && rm bundle.tar.xz \
   && for f in part[0-9][0-9][0-9]; do mv "$f" "part$((10#${f#part}))"; done \
   && sha256sum $(ls part* | sort -V) > SHA256SUMS)
NPARTS=$(ls "$BUILD"/part* | wc -l)
mkdir -p "$OUTDIR"
OUT_ABS=$(cd "$OUTDIR" && pwd)
for d in "$OUT_ABS"/c[0-9]*; do  # an earlier bundle's folders (those holding a part) go
  if compgen -G "$d/part[0-9]*" > /dev/null; then rm -rf "$d"; fi
done
for ((i = 0; i < NPARTS; i++)); do mkdir "$OUT_ABS/c$((i + 1))"; mv "$BUILD/part$i" "$OUT_ABS/c$((i + 1))/"; done
LAST=$OUT_ABS/c$NPARTS
cp "$BUILD/SHA256SUMS" "$HERE/device_setup.sh" "$HERE/device_smoke.py" "$LAST/"
if [ $# -gt 0 ]; then  # configs and tokenizers only: device_smoke.py builds random weights from them
  mkdir "$BUILD/assets"
  declare -A seen=()   # identical files (a shared tokenizer) are stored once, as hard links
  for m in "$@"; do
    mkdir "$BUILD/assets/${m%%=*}"
    for f in config.json tokenizer.json tokenizer_config.json tokenizer.model vocab.json merges.txt \
             special_tokens_map.json added_tokens.json chat_template.jinja; do
      [ -f "${m#*=}/$f" ] || continue
      h=$(sha256sum < "${m#*=}/$f" | cut -c1-64)
      if [ -n "${seen[$h]:-}" ]; then ln "${seen[$h]}" "$BUILD/assets/${m%%=*}/$f"
      else cp "${m#*=}/$f" "$BUILD/assets/${m%%=*}/"; seen[$h]=$BUILD/assets/${m%%=*}/$f; fi
    done
  done
  tar -C "$BUILD/assets" --sort=name --owner=0 --group=0 --numeric-owner --mtime=2026-01-01 -cf - . \
    | xz -6 -T1 -c > "$LAST/assets.tar.xz"
fi

# 4. Keep OUTDIR out of git (so it travels only when carried) and check the per-call size limit.
REL=${OUT_ABS#"$ROOT"/}
if [ "$REL" = "$OUT_ABS" ]; then
  echo "make_bundle: WARNING: $OUT_ABS is outside the checkout; a device call cannot carry it" >&2
else
  EXCL=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$EXCL")"; touch "$EXCL"
  grep -qxF "/$REL/" "$EXCL" || echo "/$REL/" >> "$EXCL"
fi
REPO_BYTES=$(cd "$ROOT" && git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null \
             | awk '{s += $1} END {print s + 0}')
[ ! -d "$ROOT/shared" ] || REPO_BYTES=$((REPO_BYTES + $(du -sb "$ROOT/shared" | cut -f1)))
echo; echo "Parts ($NPARTS), repo files that travel with every call: $((REPO_BYTES / 1024)) KiB"
ok=1
for ((i = 1; i <= NPARTS; i++)); do
  b=$(du -sb "$OUT_ABS/c$i" | cut -f1); t=$((b + REPO_BYTES))
  awk -v r="$REL/c$i" -v b="$b" -v t="$t" \
    'BEGIN {printf "  %s: %6.2f MiB, with the repo %6.2f MiB\n", r, b / 1048576, t / 1048576}'
  [ "$t" -lt $((LIMIT_MIB * 1048576 - 262144)) ] \
    || { ok=0; echo "  ^ over the ${LIMIT_MIB} MiB a call may carry: rerun with a smaller PART_MIB" >&2; }
done
[ $ok = 1 ] || exit 1

# 5. The device calls.
C=$REL/c$NPARTS
OURO='{"speculative_config": {"method": "custom_class", "model": "ouroboros_vllm.OuroborosProposer",
 "num_speculative_tokens": 8}, "additional_config": {"ouroboros": {"draft_model": "@DRAFT"}}}'
DRAFT='{"speculative_config": {"method": "draft_model", "model": "@DRAFT", "num_speculative_tokens": 4}}'
Q05='{"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
 "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": true}'
NGRAM='{"speculative_config": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}}'
SMOKE="python3 $C/device_smoke.py"
if [ $# -gt 0 ]; then  # models from the assets: the first is the target; a second one drafts in two spec runs
  SMOKE+=" --model ${1%%=*}=${1%%=*}"
  if [ $# -gt 1 ]; then
    D=${2%%=*}
    SMOKE+=" --model $D=$D --spec 'ouro=${OURO//DRAFT/$D}' --spec 'draft=${DRAFT//DRAFT/$D}'"
  fi
else  # no assets: a Qwen2-0.5B-shaped model, random token ids, vLLM's own ngram method
  SMOKE+=" --model q05='$Q05' --spec 'ngram=$NGRAM'"
fi
SMOKE=${SMOKE//$'\n'/}
cat <<MSG

Device calls, made back to back: the machine stays warm only 30 s after a call and /tmp/stage is lost when
it goes cold (the last call then stops with rc 3: start again from call 1).
MSG
for ((i = 1; i < NPARTS; i++)); do
  echo "  call $i: carry [\"$REL/c$i\"], timeout_s 120, command:"
  echo "    mkdir -p /tmp/stage && cp $REL/c$i/part$((i - 1)) /tmp/stage/"
done
echo "  call $NPARTS: carry [\"$C\"], timeout_s 600, command:"
echo "    set -o pipefail; source $C/device_setup.sh && $SMOKE 2>&1 | tee \$OUT/smoke.log"
echo "  Results come back from \$OUT (at most 8 files): smoke.log and smoke.json."
echo "  or, for issue 13's measurements (the same carry and timeout): bash benchmarks/gpu_session.sh $C"
