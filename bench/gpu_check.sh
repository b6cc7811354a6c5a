#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR -- the GPU figures of issue 12 in one prepared run (<= 9.5 min in all):
#   info        CPU, cores, GPU (nvidia-smi -L), printed first              timeout   10 s
#   setup       .venv from the repo (scripts/venv.sh ensure_venv; reused)   timeout  330 s (0 s if it exists)
#   torch_info  torch / CUDA / GPU facts                                     timeout   60 s
#   standalone  learner step/s, batch 512, Nature dueling CNN: fp32, bf16,  timeout   90 s
#               bf16 + CUDA graph, bf16 + torch.compile (each guarded)
#   pipeline    learner program in a live system (replay server, producer,  timeout   75 s
#               the launcher's loader threads) against standalone
#   pong        ./run.sh --env ALE/Pong-v5 --max-seconds <=420, eval.csv    timeout   max-seconds + 25 s
# The whole run holds to APEX_GPU_BUDGET_S (570 s) from its start: the Pong run gets what the earlier
# steps left, at most 420 s (less when the venv had to be built), and is skipped under 60 s.
# Every step has its own `timeout`; a failed step is recorded and the next one runs.
#
# OUTDIR gets: system.txt, torch_info.json, standalone.json, pipeline.json, pong.json, eval.csv,
# metrics_tail.csv, pong/ (the run directory, less its checkpoints), pong_logs/ (role log tails),
# logs/<step>.log, steps.tsv (step, rc, seconds, timeout) and summary.txt / summary.json.
#
# APEX_GPU_DRY_RUN=1 bench/gpu_check.sh OUTDIR: the same steps and files on the CPU with tiny settings
# (device cpu, batch 8, a few steps, no torch.compile, the training run = CartPole-v1 for 20 s with one
# actor), to test the plumbing without a GPU (tests/test_gpu_check.py).
# Other knobs: APEX_GPU_BUDGET_S, APEX_GPU_PONG_SECONDS (420), APEX_GPU_ACTORS (cores - 4),
# APEX_GPU_VARIANTS (fp32,bf16,bf16_graph,bf16_compile), APEX_GPU_COMPILE_MODE (default|max-autotune-no-cudagraphs),
# APEX_GPU_KEEP_CKPT=1 (keep pong/checkpoints), APEX_GPU_SETUP_ONLY=1 (only info + setup).
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
PY="$ROOT/.venv/bin/python"
DRY="${APEX_GPU_DRY_RUN:-0}"
[ "$DRY" = 0 ] || DRY=1
CORES="$(nproc 2>/dev/null || echo 1)"
START=$SECONDS

if [ "$DRY" = 1 ]; then
  DEVICE=cpu BATCH=8 TRAIN_ENV=CartPole-v1 ACTORS="${APEX_GPU_ACTORS:-1}"
  BUDGET="${APEX_GPU_BUDGET_S:-170}" PONG_MAX="${APEX_GPU_PONG_SECONDS:-20}" PONG_MIN=10
  T_STANDALONE=45 T_PIPELINE=70
  VARIANTS="${APEX_GPU_VARIANTS:-fp32,bf16,bf16_graph,bf16_compile}"
  STANDALONE_FLAGS=(--seconds 0.5 --min-steps 3 --warmup 1 --no-compile)
  PIPELINE_FLAGS=(--fill 256 --pool 2 --envs 4 --seconds 4 --standalone-seconds 0.5 --warmup-steps 3 --timeout 40)
  TRAIN_FLAGS=(--device cpu --envs-per-actor 4)
else
  DEVICE=cuda BATCH=512 TRAIN_ENV=ALE/Pong-v5
  ACTORS="${APEX_GPU_ACTORS:-$(( CORES > 5 ? CORES - 4 : 1 ))}"
  BUDGET="${APEX_GPU_BUDGET_S:-570}" PONG_MAX="${APEX_GPU_PONG_SECONDS:-420}" PONG_MIN=60
  T_STANDALONE=90 T_PIPELINE=75
  VARIANTS="${APEX_GPU_VARIANTS:-fp32,bf16,bf16_graph,bf16_compile}"
  STANDALONE_FLAGS=(--seconds 4 --min-steps 10 --warmup 5)
  [ -n "${APEX_GPU_COMPILE_MODE:-}" ] && [ "${APEX_GPU_COMPILE_MODE}" != default ] &&
    STANDALONE_FLAGS+=(--compile-mode "$APEX_GPU_COMPILE_MODE")
  PIPELINE_FLAGS=(--fill 50000 --pool 12 --envs 32 --seconds 15 --standalone-seconds 5 --warmup-steps 20 --timeout 40)
  TRAIN_FLAGS=(--device cuda)
fi
T_STANDALONE_BUDGET=$(( T_STANDALONE - 10 ))  # the variants' own budget, inside the step's timeout
SLACK=25        # the training run's start and orderly stop beyond --max-seconds
RESERVE=10      # kept back at the end for the summary

: >"$OUT/steps.tsv"
: >"$OUT/summary.txt"
left() { echo $(( BUDGET - (SECONDS - START) )); }
say() { echo "gpu_check: $*"; echo "$*" >>"$OUT/summary.txt"; }

# run_step NAME TIMEOUT CMD...: output to logs/NAME.log (tail echoed), one line in steps.tsv.
run_step() {
  local name="$1" limit="$2" rc t0=$SECONDS
  shift 2
  local cap=$(( $(left) - RESERVE ))
  (( limit > cap )) && limit=$cap
  if (( limit < 5 )); then
    printf '%s\t%s\t%s\t%s\n' "$name" skipped 0 "$limit" >>"$OUT/steps.tsv"
    say "step $name skipped: time budget spent ($(left)s left)"
    return 99
  fi
  echo "=== gpu_check: $name (timeout ${limit}s, $(left)s of the budget left) ==="
  timeout -k 10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  tail -n 12 "$OUT/logs/$name.log" | sed "s/^/  [$name] /"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $(( SECONDS - t0 )) "$limit" >>"$OUT/steps.tsv"
  local what=ok
  (( rc == 124 || rc == 137 )) && what="TIMED OUT"
  (( rc != 0 )) && [ "$what" = ok ] && what="FAILED"
  say "step $name: $what (rc=$rc, $(( SECONDS - t0 ))s of ${limit}s)"
  return $rc
}

# ---- info: first, before anything can fail
{
  echo "gpu_check: $(date -u +%FT%TZ) dry_run=$DRY budget=${BUDGET}s repo=$ROOT"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//') ($CORES cores)"
  echo "cpu flags: $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512_bf16|avx512_vnni|avx_vnni|amx_bf16|amx_tile)$' | tr '\n' ' ')"
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
printf '%s\t%s\t%s\t%s\n' info 0 $(( SECONDS - START )) 10 >>"$OUT/steps.tsv"
say "gpu_check dry_run=$DRY device=$DEVICE batch=$BATCH budget=${BUDGET}s cores=$CORES"
say "$(grep -m1 '^cpu:' "$OUT/system.txt")"
say "$(grep -m1 '^gpu:' "$OUT/system.txt")"

# ---- setup: the venv from the repo (returns at once when its stamp exists)
# scripts/venv.sh's stamps: without or with the test requirements (either venv has all of requirements.txt).
stamp() { cat "$@" | sha256sum | cut -c1-16; }
if [ -f "$ROOT/.venv/.apex-installed-$(stamp requirements.txt pyproject.toml)" ] ||
   [ -f "$ROOT/.venv/.apex-installed-$(stamp requirements.txt pyproject.toml requirements-dev.txt)" ]; then
  printf '%s\t%s\t%s\t%s\n' setup 0 0 0 >>"$OUT/steps.tsv"
  say "step setup: ok (.venv exists, reused)"
else
  run_step setup 330 bash -c 'source scripts/venv.sh && ensure_venv'
fi
if [ "${APEX_GPU_SETUP_ONLY:-0}" = 1 ]; then
  say "setup only (APEX_GPU_SETUP_ONLY=1): $(( SECONDS - START ))s"
  exit 0
fi
if [ ! -x "$PY" ]; then
  say "no $PY: nothing else can run"
  exit 1
fi
export PYTHONUNBUFFERED=1

run_step torch_info 60 "$PY" bench/gpu_learner.py info --out "$OUT/torch_info.json"
if [ "$DRY" = 0 ] && ! grep -q '"cuda_available": true' "$OUT/torch_info.json" 2>/dev/null; then
  say "WARNING: torch sees no CUDA device ($(grep -o '"torch": "[^"]*"' "$OUT/torch_info.json" 2>/dev/null)); the cuda steps will fail"
fi

# ---- (a) standalone learner step variants
run_step standalone "$T_STANDALONE" "$PY" bench/gpu_learner.py standalone --device "$DEVICE" --batch "$BATCH" \
  --variants "$VARIANTS" --budget "$T_STANDALONE_BUDGET" "${STANDALONE_FLAGS[@]}" --out "$OUT/standalone.json"

# ---- (b) learner pipeline efficiency: bench/learner_pipeline.py when it takes --device, else ours
if "$PY" bench/learner_pipeline.py --help 2>/dev/null | grep -q -- '--device'; then
  LP_FLAGS=(--device "$DEVICE" --batch "$BATCH" --seconds "$([ "$DRY" = 1 ] && echo 4 || echo 15)")
  [ "$DRY" = 1 ] && LP_FLAGS+=(--fill 1024)
  run_step pipeline "$T_PIPELINE" "$PY" bench/learner_pipeline.py "${LP_FLAGS[@]}"
  "$PY" bench/gpu_learner.py parse-pipeline "$OUT/logs/pipeline.log" --flags "${LP_FLAGS[*]}" \
    --device "$DEVICE" --batch "$BATCH" --out "$OUT/pipeline.json"
else
  run_step pipeline "$T_PIPELINE" "$PY" bench/gpu_learner.py pipeline --device "$DEVICE" --batch "$BATCH" \
    --num-actors "$ACTORS" "${PIPELINE_FLAGS[@]}" --log-dir "$OUT/logs" --out "$OUT/pipeline.json"
fi

# ---- (c) the training run with ./run.sh, as long as the budget allows (at most PONG_MAX)
PONG_S=$(( $(left) - RESERVE - SLACK ))
(( PONG_S > PONG_MAX )) && PONG_S=$PONG_MAX
RUN_DIR="$OUT/pong"
if (( PONG_S < PONG_MIN )); then
  printf '%s\t%s\t%s\t%s\n' pong skipped 0 0 >>"$OUT/steps.tsv"
  say "step pong skipped: ${PONG_S}s left for it, under ${PONG_MIN}s"
else
  [ -e "$RUN_DIR" ] && mv "$RUN_DIR" "$RUN_DIR.old.$(date +%s)"  # a fresh run, not a resumed one
  PORT="$("$PY" -c 'import sys; sys.path.insert(0, "tests"); from conftest import free_port_base; print(free_port_base())')"
  run_step pong $(( PONG_S + SLACK )) ./run.sh --env "$TRAIN_ENV" --max-seconds "$PONG_S" --run-dir "$RUN_DIR" \
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
  timeout 30 "$PY" bench/gpu_learner.py pong-summary "$RUN_DIR" --env "$TRAIN_ENV" --max-seconds "$PONG_S" \
    --out "$OUT/pong.json" >"$OUT/logs/pong_summary.log" 2>&1 || say "pong summary: no evaluation rows"
fi

# ---- summary: key figures as key=value lines (summary.txt) and one JSON (summary.json)
timeout 20 "$PY" - "$OUT" "$(( SECONDS - START ))" >>"$OUT/summary.txt" <<'EOF'
import json, sys
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
        lines.append(f"standalone {name}: steps_per_s={v['steps_per_s']:.1f} ms_per_step={v['ms_per_step']:.3f} "
                     f"warmup_s={v['warmup_s']:.1f}")
        summary["standalone"][name] = v["steps_per_s"]
    else:
        lines.append(f"standalone {name}: {v.get('status')} {v.get('error') or v.get('reason') or ''}".rstrip())
        summary["standalone"][name] = v.get("status")
if "best" in s:
    lines.append(f"standalone best: {s['best']['variant']} steps_per_s={s['best']['steps_per_s']:.1f} "
                 f"(device={s.get('device')} batch={s.get('batch')})")
if p.get("status") == "ok":
    lines.append(f"pipeline: learner_steps_per_s={p['learner_steps_per_s']:.1f} "
                 f"standalone_steps_per_s={p['standalone_steps_per_s']:.1f} efficiency={p['efficiency']:.2f} "
                 f"loader_threads={p.get('loader_threads')} wait_fraction={p.get('system', {}).get('wait_fraction', float('nan')):.2f}")
    summary["pipeline"] = {k: p[k] for k in ("learner_steps_per_s", "standalone_steps_per_s", "efficiency")}
    summary["pipeline"]["loader_threads"] = p.get("loader_threads")
else:
    lines.append(f"pipeline: {p.get('status', 'missing')} {p.get('error', '')}".rstrip())
if g.get("status") == "ok":
    lines.append(f"pong: env={g.get('env')} max_seconds={g.get('max_seconds'):.0f} eval_rows={g['eval_rows']} "
                 f"last_eval_mean={g['last_eval_mean']:.2f} best_eval_mean={g['best_eval_mean']:.2f} "
                 f"learner_steps={g.get('learner_steps', float('nan')):.0f} "
                 f"learner_steps_per_s={g.get('median_rates_second_half', {}).get('learner/steps_per_s', float('nan')):.1f}")
    summary["pong"] = {k: g.get(k) for k in ("env", "max_seconds", "eval_rows", "first_eval_mean",
                                             "last_eval_mean", "best_eval_mean", "learner_steps")}
else:
    lines.append(f"pong: {g.get('status', 'missing')} {g.get('error', '')}".rstrip())
lines.append(f"total_s={total:.0f}")
(out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
print("\n".join(lines))
EOF
echo "=== gpu_check: summary ($OUT/summary.txt) ==="
cat "$OUT/summary.txt"
