#!/usr/bin/env bash
# Issue 25, item 5: everything a lent GPU should check, in one run under 7 minutes, results in "$OUT":
#   $OUT/gpu_check.log   every command's output
#   $OUT/gpu_results.md  versions, test counts, the short runs (wall time, steps/s, final losses), bench tables
# Stages, each under its own `timeout` cut to the time left (BUDGET seconds in all), so one hang cannot eat the
# rest: (d) versions, (a1) the cuda-marked tests, (a2) the not-slow CPU suite in parallel shards (one per test
# file group, OMP 1 each; before the timings, which it would disturb), (b) short real runs on CUDA, (c)
# scripts/bench.py --switches against the hand loop (dcgan every switch, then wgan_gp and vae off/bf16).
# Expects torch with CUDA and the project's dependencies importable (hydra-core, omegaconf, hydra-zen, ... on
# PYTHONPATH); run from anywhere:  OUT=/some/dir bash scripts/gpu_check.sh
# The recipes ship as the package gantrain.configs, which only an install of the project provides: without one,
# the script installs it (pip -e, no network) or, where pip cannot, links gantrain/configs to configs/.
# CPU dry run of the argument paths (no compile: minutes on a CPU):
#   OUT=/tmp/x DEVICE=cpu RUN_STEPS=2 BENCH_STEPS=2 SUITE=0 BENCH_ARGS="--settings off channels_last" bash scripts/gpu_check.sh
set -u
: "${OUT:?set OUT to the folder the results go to}"
PY=${PY:-python3}  # the device image's python3 holds torch; `python` may not exist there
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-380}           # seconds for the whole script (the caller's limit is 7 minutes)
RUN_STEPS=${RUN_STEPS:-200}     # (b) generator steps of each short run
BENCH_STEPS=${BENCH_STEPS:-100} # (c) steps timed after the first, per cell
SUITE=${SUITE:-1}               # (a2) 0: skip the not-slow suite
SHARDS=${SHARDS:-12}            # (a2) pytest processes at once
SUITE_CAP=${SUITE_CAP:-110}     # (a2) seconds for the whole suite
BENCH_ARGS=${BENCH_ARGS:-}      # (c) appended to each bench.py command (a later --settings wins)
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
LOG="$OUT/gpu_check.log"
MD="$OUT/gpu_results.md"
mkdir -p "$OUT"
cd "$REPO" || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1
: >"$LOG"
: >"$MD"
if ! "$PY" -c "import gantrain.configs" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$REPO" >>"$LOG" 2>&1 ||
    ln -sfn ../configs "$REPO/gantrain/configs"
  "$PY" -c "import gantrain.configs" >>"$LOG" 2>&1 || { echo "gantrain.configs does not import: see $LOG"; exit 1; }
fi

left() { echo $((BUDGET - SECONDS)); }
output() { sed -n "/^== $1 (/,/^== $1:/p" "$LOG" | grep -v "^=="; }  # what stage NAME printed
# stage NAME CAP CMD...: CMD under timeout min(CAP, time left - 5 s); its output to the log; its status echoed
stage() {
  local name=$1 cap=$2; shift 2
  local t=$(($(left) - 5)); ((t > cap)) && t=$cap
  if ((t < 10)); then echo "== $name: skipped, $(left) s left" | tee -a "$LOG"; echo "| $name | skipped (no time left) |" >>"$MD"; return 99; fi
  echo "== $name (timeout ${t}s): $*" >>"$LOG"
  local start=$SECONDS
  timeout --kill-after=5 "$t" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s$([ $rc = 124 ] && echo ' (TIMED OUT)')" | tee -a "$LOG"
  return $rc
}

echo "# gpu_check $(date -u +%FT%TZ), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)" >>"$MD"
# (d) versions
stage versions 30 "$PY" -c "
import torch, platform
print('torch', torch.__version__, '| cuda', torch.version.cuda, '| python', platform.python_version())
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')
import hydra, omegaconf, hydra_zen; print('hydra', hydra.__version__, 'omegaconf', omegaconf.__version__)"
{ echo; echo '```'; output versions | grep -E "^(torch|device|hydra) "; echo '```'; } >>"$MD"
command -v nvidia-smi >/dev/null && nvidia-smi -L >>"$LOG" 2>&1

# (a1) the tests that need CUDA
echo -e "\n## tests\n\n| stage | result |\n| --- | --- |" >>"$MD"
stage "pytest -m cuda" 90 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests
echo "| pytest -m cuda (rc $?) | $(output "pytest -m cuda" | grep -E ' in [0-9.]+s' | tail -1) |" >>"$MD"

# (a2) the default suite, sharded over the cores (no xdist here): each shard its own timeout, its log appended
if [ "$SUITE" = 1 ]; then
  echo "== pytest not slow: $SHARDS shards" >>"$LOG"
  mapfile -t files < <(ls tests/test_*.py)
  t=$(($(left) - 5)); ((t > SUITE_CAP)) && t=$SUITE_CAP
  for ((k = 0; k < SHARDS; k++)); do
    shard=(); for ((i = k; i < ${#files[@]}; i += SHARDS)); do shard+=("${files[i]}"); done
    ((${#shard[@]})) || continue
    echo "${shard[*]}" >"$WORK/shard_$k.files"
    OMP_NUM_THREADS=1 timeout --kill-after=5 "$t" "$PY" -m pytest -q -m "not slow and not cuda" -p no:cacheprovider \
      "${shard[@]}" >"$WORK/shard_$k.log" 2>&1 &
  done
  wait
  echo -e "\n## default suite (CPU tests, -m 'not slow and not cuda', $SHARDS shards, ${t}s limit)\n" >>"$MD"
  for f in "$WORK"/shard_*.log; do
    echo "== shard ${f%.log}: $(cat "${f%.log}.files")" >>"$LOG"
    cat "$f" >>"$LOG"
    last=$(grep -E ' in [0-9.]+s' "$f" | tail -1)
    dots=$(grep -E '^[.sxXFE]+( +\[ *[0-9]+%\])?$' "$f" | tr -cd '.sxXFE')
    cut="cut by the time limit after ${#dots} tests, $(tr -cd F <<<"$dots" | wc -c) failed"
    echo "- $(cat "${f%.log}.files"): ${last:-$cut}" >>"$MD"
    grep -E '^FAILED|^ERROR' "$f" >>"$MD"
  done
fi

# (b) short real runs on the device: autocast, per-phase scalers, the deferred non-finite reads
echo -e "\n## short runs ($RUN_STEPS steps, $DEVICE, data=digits)\n\n| run | exit | wall s | steps/s | last progress line |\n| --- | --- | ---: | ---: | --- |" >>"$MD"
run() {
  local name=$1; shift
  local dir="$WORK/run_$name" start=$SECONDS
  stage "run $name" 40 "$PY" -m gantrain "$@" data=digits "trainer.max_steps=$RUN_STEPS" "trainer.device=$DEVICE" \
    trainer.progress_bar=false trainer.log_every_n_steps=50 "hydra.run.dir=$dir"
  local rc=$? wall=$((SECONDS - start))
  local last; last=$(grep -ho "step [0-9]*/[0-9]*: .*" "$dir/train.log" 2>/dev/null | tail -1)
  echo "| $name: \`$*\` | $rc | $wall | $(awk -v s="$RUN_STEPS" -v w="$wall" 'BEGIN{printf "%.1f", (w > 0 ? s / w : 0)}') | $last |" >>"$MD"
}
run dcgan +experiment=dcgan
run wgan_gp_fp16 +experiment=wgan_gp trainer.precision=16-mixed
run wgan_gp_bf16 +experiment=wgan_gp trainer.precision=bf16-mixed
run vae +experiment=vae
echo -e "\n(steps/s counts the whole process, start-up included.)" >>"$MD"

# (c) gantrain against the hand loop with each switch off and on (one fresh process per cell)
bench() {
  local name=$1 cap=$2; shift 2
  stage "$name" "$cap" "$PY" scripts/bench.py --device "$DEVICE" --rounds 0 --detail-rounds 0 --switches \
    --switch-steps "$BENCH_STEPS" "$@" $BENCH_ARGS
  echo -e "\n## $name (rc $?)\n" >>"$MD"
  output "$name" | grep -E '^\||^`|^Machine|^Speed|^bench.py' >>"$MD"  # bench.py: lines survive a timeout
}
# augmentation's cost on the device (ADA once made ~100 blocking host copies a call): one round, whole processes
stage "bench augment" 70 "$PY" scripts/bench.py --device "$DEVICE" --rounds 0 --detail-rounds 0 --augment --ada \
  --label-rounds 1 --recipes dcgan
echo -e "\n## bench augment (rc $?)\n" >>"$MD"
output "bench augment" | grep -E '^\||^`|^Machine|^[A-Z][a-zA-Z]*.s cost' >>"$MD"
bench "bench dcgan" $(($(left) - 45)) --recipes dcgan
bench "bench wgan_gp vae" 45 --recipes wgan_gp vae --settings off bf16-mixed

echo -e "\nTotal: $SECONDS s of a $BUDGET s budget." >>"$MD"
rm -rf "$WORK"
echo "done in $SECONDS s; results: $MD"
