#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR -- the GPU figures of issue 12 in one prepared run (<= 9.5 min in all).
#
#   step        what                                                          timeout
#   info        CPU, cores, GPU (nvidia-smi -L), printed first                   10 s
#   setup       .venv from the repo (scripts/venv.sh ensure_venv); reused       330 s (0 s when it exists)
#   torch_info  torch / CUDA / GPU facts (no torch: the rest is skipped)         30 s
#   standalone  learner steps/s, batch 512, Nature dueling CNN, random uint8     90 s
#               batches on the GPU: fp32, bf16 (autocast + channels-last, as
#               the learner), bf16 + one CUDA graph per step, bf16 +
#               torch.compile; each variant guarded, a failure is recorded
#   standalone_async  the learner program's own step (priorities back behind an       75 s
#               event, no host sync per step) without and with --compile (torch.compile
#               reduce-overhead: CUDA graphs), next to bf16 read back every step
#               (standalone_async.json)
#   standalone_rainbow, standalone_iqn: the same for --algo rainbow and iqn,       40 s each
#               fp32 and bf16 (standalone_<algo>.json)
#   pipeline    the learner program in a live system (replay server, a          75 s
#               producer of real Pong chunks, the launcher's loader threads)
#               against its own step standalone = efficiency
#   pong        ./run.sh --env ALE/Pong-v5 --max-seconds S (S <= 420) with      S + 25 s
#               cores - 4 actors, --device cuda; eval.csv, metrics tail, logs
#
# The whole run keeps to APEX_GPU_BUDGET_S (570 s) from its start: each step's timeout is cut to what
# is left, and the Pong run gets what the earlier steps left (at most 420 s; less when the venv had
# to be built; skipped under 60 s). With the venv in place and every step at its timeout, Pong still
# gets ~180 s: 10 + 30 + 90 + 75 + 2 x 40 + 75 + (180 + 25) + 5 = 570 s; typically the steps finish early and
# Pong gets ~345 s (10 + 5 + ~60 + ~45 + ~50 + ~50 + 345 + 5).
#
# OUTDIR gets: system.txt, torch_info.json, standalone.json, standalone_async.json, standalone_rainbow.json,
# standalone_iqn.json, pipeline.json, pong.json, eval.csv,
# metrics_tail.csv, pong/ (the run directory, less its checkpoints), pong_logs/ (role log tails),
# logs/<step>.log, steps.tsv (step, rc, seconds, timeout), summary.txt (key=value figures) and
# summary.json. Exit status 0 when every step succeeded.
#
# APEX_GPU_DRY_RUN=1 bench/gpu_check.sh OUTDIR: the same steps and files on the CPU with tiny settings
# (device cpu, batch 8, a few steps, no torch.compile, budget 200 s, the training run = CartPole-v1 for 25 s with one
# actor; 25 s: a loaded 2-core machine takes ~10 s to start the learner), to test the plumbing without a GPU (tests/test_gpu_check.py).
# Other knobs: APEX_GPU_BUDGET_S, APEX_GPU_PONG_SECONDS (420), APEX_GPU_ACTORS (cores - 4),
# APEX_GPU_VARIANTS (fp32,bf16,bf16_graph,bf16_compile; also fp32_graph, bf16_compile_max,
# bf16_compile_ro), APEX_GPU_COMPILE_MODE (mode of bf16_compile, e.g. max-autotune-no-cudagraphs),
# APEX_GPU_PIPELINE (auto: bench/learner_pipeline.py when it takes --device, else our own; own; bench),
# APEX_GPU_PYTHON (an interpreter that has the requirements: no venv is built, roles run with it),
# APEX_GPU_KEEP_CKPT=1 (keep pong/checkpoints), APEX_GPU_SETUP_ONLY=1 (only info and setup).
set -uo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: bench/gpu_check.sh OUTDIR   (APEX_GPU_DRY_RUN=1 for the CPU dry run)" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
mkdir -p "$OUT/logs"
cd "$ROOT" || exit 2
DRY="${APEX_GPU_DRY_RUN:-0}"
[ "$DRY" = 0 ] || DRY=1
CORES="$(nproc 2>/dev/null || echo 1)"
START=$SECONDS
FAILED=0

if [ "$DRY" = 1 ]; then
  DEVICE=cpu BATCH=8 TRAIN_ENV=CartPole-v1 ACTORS="${APEX_GPU_ACTORS:-1}"
  BUDGET="${APEX_GPU_BUDGET_S:-200}" PONG_MAX="${APEX_GPU_PONG_SECONDS:-25}" PONG_MIN=10
  T_STANDALONE=45 T_PIPELINE=70 T_ALGO=40 T_ASYNC=40
  STANDALONE_FLAGS=(--seconds 0.5 --min-steps 3 --warmup 1 --no-compile)
  PIPELINE_FLAGS=(--fill 256 --pool 2 --envs 4 --seconds 3 --standalone-seconds 0.5 --warmup-steps 3 --timeout 40)
  PIPELINE_MODE="${APEX_GPU_PIPELINE:-own}"  # learner_pipeline.py's 40 x 32-env chunks take minutes here
  TRAIN_FLAGS=(--device cpu --envs-per-actor 4)
else
  DEVICE=cuda BATCH=512 TRAIN_ENV=ALE/Pong-v5
  ACTORS="${APEX_GPU_ACTORS:-$(( CORES > 5 ? CORES - 4 : 1 ))}"
  BUDGET="${APEX_GPU_BUDGET_S:-570}" PONG_MAX="${APEX_GPU_PONG_SECONDS:-420}" PONG_MIN=60
  T_STANDALONE=90 T_PIPELINE=75 T_ALGO=40 T_ASYNC=75
  STANDALONE_FLAGS=(--seconds 4 --min-steps 10 --warmup 5)
  PIPELINE_FLAGS=(--fill 50000 --pool 12 --envs 32 --seconds 15 --standalone-seconds 5 --warmup-steps 20 --timeout 40)
  PIPELINE_MODE="${APEX_GPU_PIPELINE:-auto}"
  TRAIN_FLAGS=(--device cuda)
fi
VARIANTS="${APEX_GPU_VARIANTS:-fp32,bf16,bf16_graph,bf16_compile}"
[ -n "${APEX_GPU_COMPILE_MODE:-}" ] && [ "$APEX_GPU_COMPILE_MODE" != default ] &&
  STANDALONE_FLAGS+=(--compile-mode "$APEX_GPU_COMPILE_MODE")
SLACK=25        # the training run's start and orderly stop beyond --max-seconds
RESERVE=10      # kept back at the end for the copies and the summary

: >"$OUT/steps.tsv"
: >"$OUT/summary.txt"
left() { echo $(( BUDGET - (SECONDS - START) )); }
say() { echo "gpu_check: $*"; echo "$*" >>"$OUT/summary.txt"; }
record() { printf '%s\t%s\t%s\t%s\n' "$@" >>"$OUT/steps.tsv"; }

# run_step NAME TIMEOUT CMD...: output to logs/NAME.log (its tail echoed), one line in steps.tsv.
run_step() {
  local name="$1" limit="$2" rc t0=$SECONDS what=ok
  shift 2
  local cap=$(( $(left) - RESERVE ))
  (( limit > cap )) && limit=$cap
  if (( limit < 5 )); then
    record "$name" skipped 0 "$limit"
    say "step $name: skipped, the time budget is spent ($(left)s left)"
    FAILED=1
    return 99
  fi
  echo "=== gpu_check: $name (timeout ${limit}s, $(left)s of the budget left) ==="
  timeout -k 10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  tail -n 12 "$OUT/logs/$name.log" | sed "s/^/  [$name] /"
  record "$name" "$rc" $(( SECONDS - t0 )) "$limit"
  if (( rc == 124 || rc == 137 )); then what="TIMED OUT"; elif (( rc != 0 )); then what=FAILED; fi
  (( rc != 0 )) && FAILED=1
  say "step $name: $what (rc=$rc, $(( SECONDS - t0 ))s of ${limit}s)"
  return $rc
}

# ---- info: first, before anything can fail
{
  echo "gpu_check: $(date -u +%FT%TZ) dry_run=$DRY budget=${BUDGET}s repo=$ROOT"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//') ($CORES cores)"
  echo "cpu flags: $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' |
    grep -E '^(avx2|avx512f|avx512_bf16|avx512_vnni|avx_vnni|amx_bf16|amx_tile)$' | tr '\n' ' ')"
  echo "memory: $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB"}')"
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu: $(timeout 10 nvidia-smi -L 2>&1 | tr '\n' ';')"
    timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm \
      --format=csv,noheader 2>&1 | sed 's/^/gpu details: /'
  else
    echo "gpu: nvidia-smi not found"
  fi
  echo "python3: $(python3 --version 2>&1)"
  echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo ' (with local changes)')"
} >"$OUT/system.txt" 2>&1
cat "$OUT/system.txt"
record info 0 $(( SECONDS - START )) 10
say "gpu_check dry_run=$DRY device=$DEVICE batch=$BATCH budget=${BUDGET}s cores=$CORES actors=$ACTORS"
say "$(grep -m1 '^cpu:' "$OUT/system.txt")"
say "$(grep -m1 '^gpu:' "$OUT/system.txt")"

# ---- setup: the venv from the repo, reused when scripts/venv.sh's stamp (with or without the test
# requirements: either venv has all of requirements.txt; the files in scripts/venv.sh's order) says it is complete
stamp() { cat "$@" | sha256sum | cut -c1-16; }
if [ -n "${APEX_GPU_PYTHON:-}" ]; then
  PY="$APEX_GPU_PYTHON"
  LAUNCH=("$PY" -m apex_zmq.launch)
  record setup 0 0 0
  say "step setup: skipped, APEX_GPU_PYTHON=$PY"
else
  PY="$ROOT/.venv/bin/python"
  LAUNCH=(./run.sh)
  if [ -f "$ROOT/.venv/.apex-installed-$(stamp requirements.txt pyproject.toml requirements-minatar.txt)" ] ||
     [ -f "$ROOT/.venv/.apex-installed-$(stamp requirements.txt pyproject.toml requirements-minatar.txt requirements-dev.txt)" ]; then
    record setup 0 0 0
    say "step setup: ok (.venv exists, reused)"
  else
    run_step setup 330 bash -c 'source scripts/venv.sh && ensure_venv'
  fi
fi
if [ "${APEX_GPU_SETUP_ONLY:-0}" = 1 ]; then
  say "setup only (APEX_GPU_SETUP_ONLY=1): total_s=$(( SECONDS - START ))"
  exit "$FAILED"
fi
export PYTHONUNBUFFERED=1

TORCH_OK=0
if [ -x "$PY" ] || command -v "$PY" >/dev/null 2>&1; then
  run_step torch_info 30 "$PY" bench/gpu_learner.py info --out "$OUT/torch_info.json" && TORCH_OK=1
fi
if [ "$TORCH_OK" = 0 ]; then
  say "torch does not import with $PY: standalone, pipeline and pong are skipped"
  for s in standalone pipeline pong; do record "$s" skipped 0 0; done
  FAILED=1
elif [ "$DRY" = 0 ] && ! grep -q '"cuda_available": true' "$OUT/torch_info.json" 2>/dev/null; then
  NO_CUDA=1
  say "WARNING: torch sees no CUDA device ($(grep -o '"torch": "[^"]*"' "$OUT/torch_info.json")): the cuda steps will fail"
fi

if [ "$TORCH_OK" = 1 ]; then
  # ---- (a) standalone learner step variants (their own budget: the step's timeout less 10 s)
  run_step standalone "$T_STANDALONE" "$PY" bench/gpu_learner.py standalone --device "$DEVICE" --batch "$BATCH" \
    --variants "$VARIANTS" --budget $(( T_STANDALONE - 10 )) "${STANDALONE_FLAGS[@]}" --out "$OUT/standalone.json"

  # ---- (a1) the learner program's step: priorities back without a host sync, without and with --compile
  # (the compiled one is compile time plus a few seconds: the compile floor is what its budget leaves)
  run_step standalone_async "$T_ASYNC" "$PY" bench/gpu_learner.py standalone --device "$DEVICE" --batch "$BATCH" \
    --variants bf16,bf16_async,bf16_async_compile --budget $(( T_ASYNC - 10 )) --compile-min-s 20 \
    "${STANDALONE_FLAGS[@]}" --out "$OUT/standalone_async.json"

  # ---- (a2) the other learning rules' standalone steps (float32 and bf16 mixed precision)
  for ALGO in rainbow iqn; do
    run_step "standalone_$ALGO" "$T_ALGO" "$PY" bench/gpu_learner.py standalone --algo "$ALGO" --device "$DEVICE" \
      --batch "$BATCH" --variants fp32,bf16 --budget $(( T_ALGO - 10 )) "${STANDALONE_FLAGS[@]}" \
      --out "$OUT/standalone_$ALGO.json"
  done

  # ---- (b) learner pipeline efficiency: bench/learner_pipeline.py when it takes --device, else ours
  LP_FLAGS_KNOWN="$(timeout 30 "$PY" bench/learner_pipeline.py --help 2>/dev/null | grep -o -- '--[a-z][a-z-]*' | sort -u | tr '\n' ' ')"
  if [ "$PIPELINE_MODE" = bench ] || { [ "$PIPELINE_MODE" = auto ] && [[ " $LP_FLAGS_KNOWN " == *" --device "* ]]; }; then
    LP_FLAGS=(--device "$DEVICE" --batch "$BATCH" --seconds "$([ "$DRY" = 1 ] && echo 4 || echo 15)")
    [ "$DRY" = 1 ] && LP_FLAGS+=(--fill 1024)
    run_step pipeline "$T_PIPELINE" "$PY" bench/learner_pipeline.py "${LP_FLAGS[@]}"
    "$PY" bench/gpu_learner.py parse-pipeline "$OUT/logs/pipeline.log" --flags "${LP_FLAGS[*]}" \
      --device "$DEVICE" --batch "$BATCH" --out "$OUT/pipeline.json" || FAILED=1
  else
    run_step pipeline "$T_PIPELINE" "$PY" bench/gpu_learner.py pipeline --device "$DEVICE" --batch "$BATCH" \
      --num-actors "$ACTORS" "${PIPELINE_FLAGS[@]}" --bench-flags "$LP_FLAGS_KNOWN" --log-dir "$OUT/logs" \
      --out "$OUT/pipeline.json"
  fi

  # ---- (c) the training run with ./run.sh, as long as the budget allows (at most PONG_MAX)
  PONG_S=$(( $(left) - RESERVE - SLACK ))
  (( PONG_S > PONG_MAX )) && PONG_S=$PONG_MAX
  RUN_DIR="$OUT/pong"
  if [ "${NO_CUDA:-0}" = 1 ]; then
    record pong skipped 0 0
    say "step pong: skipped, no CUDA device (its learner would only restart)"
    FAILED=1
  elif (( PONG_S < PONG_MIN )); then
    record pong skipped 0 0
    say "step pong: skipped, ${PONG_S}s left for it (under ${PONG_MIN}s)"
    FAILED=1
  else
    [ -e "$RUN_DIR" ] && mv "$RUN_DIR" "$RUN_DIR.old.$(date +%s)"  # a fresh run, not a resumed one
    PORT="$("$PY" -c 'import sys; sys.path.insert(0, "tests"); from conftest import free_port_base; print(free_port_base())')"
    run_step pong $(( PONG_S + SLACK )) "${LAUNCH[@]}" --env "$TRAIN_ENV" --max-seconds "$PONG_S" --run-dir "$RUN_DIR" \
      --dashboard-port 0 --num-actors "$ACTORS" --port-base "$PORT" "${TRAIN_FLAGS[@]}"
    [ -f "$RUN_DIR/eval.csv" ] && cp "$RUN_DIR/eval.csv" "$OUT/eval.csv"
    if [ -f "$RUN_DIR/metrics.csv" ]; then
      { head -n 1 "$RUN_DIR/metrics.csv"; tail -n +2 "$RUN_DIR/metrics.csv" | tail -n 400; } >"$OUT/metrics_tail.csv"
    fi
    mkdir -p "$OUT/pong_logs"
    for f in "$RUN_DIR"/logs/*.log; do
      [ -f "$f" ] && tail -n 200 "$f" >"$OUT/pong_logs/$(basename "$f")"
    done
    if [ "${APEX_GPU_KEEP_CKPT:-0}" != 1 ] && [ -d "$RUN_DIR/checkpoints" ]; then
      say "pong checkpoints removed from OUTDIR ($(du -sh "$RUN_DIR/checkpoints" | cut -f1); APEX_GPU_KEEP_CKPT=1 keeps them)"
      rm -rf "$RUN_DIR/checkpoints"
    fi
    if ! timeout 30 "$PY" bench/gpu_learner.py pong-summary "$RUN_DIR" --env "$TRAIN_ENV" --max-seconds "$PONG_S" \
         --out "$OUT/pong.json" >"$OUT/logs/pong_summary.log" 2>&1; then
      say "pong summary: no evaluation rows (logs/pong_summary.log)"
      FAILED=1
    fi
  fi
fi

# ---- summary: key figures as key=value lines (summary.txt) and one JSON (summary.json)
timeout 20 "$PY" - "$OUT" "$(( SECONDS - START ))" >>"$OUT/summary.txt" <<'EOF' || FAILED=1
import json, math, sys
from pathlib import Path
out, total = Path(sys.argv[1]), float(sys.argv[2])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return {}
s, p, g, info = load("standalone.json"), load("pipeline.json"), load("pong.json"), load("torch_info.json")
lines, summary = [], {"total_s": total, "torch": info, "standalone": {}, "pipeline": {}, "pong": {}}
for name, v in s.get("variants", {}).items():
    if v.get("status") == "ok":
        speedup = s.get("speedup_vs_bf16", {}).get(name)
        lines.append(f"standalone {name}: steps_per_s={v['steps_per_s']:.1f} ms_per_step={v['ms_per_step']:.3f} "
                     f"warmup_s={v['warmup_s']:.1f}" + (f" speedup_vs_bf16={speedup:.2f}" if speedup else ""))
        summary["standalone"][name] = v["steps_per_s"]
    else:
        why = "cut off by the step's timeout" if v.get("status") == "running" else v.get("error") or v.get("reason") or ""
        lines.append(f"standalone {name}: {v.get('status')} {why}".rstrip())
        summary["standalone"][name] = v.get("status")
if not s.get("variants"):
    lines.append(f"standalone: {s.get('status', 'missing')} {s.get('error', '')}".rstrip())
if "best" in s:
    lines.append(f"standalone best: {s['best']['variant']} steps_per_s={s['best']['steps_per_s']:.1f} "
                 f"(device={s.get('device')} batch={s.get('batch')})")
a = load("standalone_async.json")  # the learner program's step: no host sync, without and with --compile
summary["standalone_async"] = {}
for name, v in a.get("variants", {}).items():
    ok = v.get("status") == "ok"
    summary["standalone_async"][name] = v["steps_per_s"] if ok else v.get("status")
    lines.append(f"standalone async {name}: " + (f"steps_per_s={v['steps_per_s']:.1f} "
                 f"ms_per_step={v['ms_per_step']:.3f}" if ok else f"{v.get('status')} "
                 f"{v.get('error') or v.get('reason') or ''}".rstrip()))
rates = summary["standalone_async"]
if all(isinstance(rates.get(k), float) for k in ("bf16", "bf16_async")):
    lines.append(f"standalone async: no_sync_vs_sync={rates['bf16_async'] / rates['bf16']:.2f}" +
                 (f" compile_vs_no_compile={rates['bf16_async_compile'] / rates['bf16_async']:.2f}"
                  if isinstance(rates.get("bf16_async_compile"), float) else ""))
if not a.get("variants"):
    lines.append(f"standalone async: {a.get('status', 'missing')}")
for algo in ("rainbow", "iqn"):  # the other learning rules' steps, float32 and bf16
    a = load(f"standalone_{algo}.json")
    summary[f"standalone_{algo}"] = {}
    for name, v in a.get("variants", {}).items():
        ok = v.get("status") == "ok"
        summary[f"standalone_{algo}"][name] = v["steps_per_s"] if ok else v.get("status")
        lines.append(f"standalone {algo} {name}: " + (f"steps_per_s={v['steps_per_s']:.1f} "
                     f"ms_per_step={v['ms_per_step']:.3f}" if ok else f"{v.get('status')} {v.get('error') or ''}"))
    if not a.get("variants"):
        lines.append(f"standalone {algo}: {a.get('status', 'missing')}")
if p.get("status") == "ok":
    wait = p.get("system", {}).get("wait_fraction", math.nan)
    lines.append(f"pipeline: learner_steps_per_s={p['learner_steps_per_s']:.1f} "
                 f"standalone_steps_per_s={p['standalone_steps_per_s']:.1f} efficiency={p['efficiency']:.2f} "
                 f"loader_threads={p.get('loader_threads')} wait_fraction={wait:.2f} ({p.get('source')})")
    summary["pipeline"] = {k: p[k] for k in ("learner_steps_per_s", "standalone_steps_per_s", "efficiency")}
    summary["pipeline"]["loader_threads"] = p.get("loader_threads")
else:
    lines.append(f"pipeline: {p.get('status', 'missing')} {p.get('error', '')}".rstrip())
if g.get("status") == "ok":
    rate = g.get("median_rates_second_half", {}).get("learner/steps_per_s", math.nan)
    lines.append(f"pong: env={g.get('env')} max_seconds={g.get('max_seconds'):.0f} eval_rows={g['eval_rows']} "
                 f"last_eval_mean={g['last_eval_mean']:.2f} best_eval_mean={g['best_eval_mean']:.2f} "
                 f"learner_steps={g.get('learner_steps', math.nan):.0f} learner_steps_per_s={rate:.1f}")
    summary["pong"] = {k: g.get(k) for k in ("env", "max_seconds", "eval_rows", "first_eval_mean",
                                             "last_eval_mean", "best_eval_mean", "learner_steps")}
    summary["pong"]["learner_steps_per_s"] = rate
else:
    lines.append(f"pong: {g.get('status', 'missing')} {g.get('error', '')}".rstrip())
lines.append(f"total_s={total:.0f}")
(out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
print("\n".join(lines))
EOF
echo "=== gpu_check: summary ($OUT/summary.txt) ==="
cat "$OUT/summary.txt"
exit "$FAILED"
