"""bench/gpu_check.sh's CPU-side plumbing: the dry run writes every file with numbers in it, a failing
variant is recorded while the others run, the existing .venv is reused, the time budget holds."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess

import pytest

from conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.sh"
DRY_BUDGET_S = 200  # the dry run's default APEX_GPU_BUDGET_S


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert os.access(SCRIPT, os.X_OK)


def test_usage_without_outdir():
    r = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv: the dry run would build one (./test.sh makes it)")
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    stamps = {p: p.stat().st_mtime for p in (ROOT / ".venv").glob(".apex-installed-*")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("APEX_GPU_")}
    # One variant fails on purpose: it is recorded and the variants after it still run.
    env.update(APEX_GPU_DRY_RUN="1", APEX_GPU_INJECT_FAIL="bf16_graph")
    r = subprocess.run([str(SCRIPT), str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    after = {p: p.stat().st_mtime for p in (ROOT / ".venv").glob(".apex-installed-*")}
    return out, r, stamps, after


def test_dry_run_succeeds_and_reuses_the_venv(dry_run):
    out, r, stamps, after = dry_run
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    # The machine line comes first.
    assert r.stdout.splitlines()[0].startswith("gpu_check:")
    assert re.search(r"^cpu: .*\(\d+ cores\)", r.stdout, re.M)
    assert re.search(r"^gpu: ", r.stdout, re.M)
    summary = (out / "summary.txt").read_text()
    assert "step setup: ok (.venv exists, reused)" in summary
    assert stamps == after  # ensure_venv did not run (no new or touched stamp)


def test_dry_run_steps_within_budget(dry_run):
    out, *_ = dry_run
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    steps = {name: (rc, int(secs), int(limit)) for name, rc, secs, limit in rows}
    assert list(steps) == ["info", "setup", "torch_info", "standalone", "standalone_async", "standalone_rainbow",
                           "standalone_iqn", "pipeline", "pong"]
    assert all(rc == "0" for rc, _, _ in steps.values()), steps
    assert sum(secs for _, secs, _ in steps.values()) <= DRY_BUDGET_S
    for name in ("torch_info", "standalone", "pipeline", "pong"):
        assert 0 < steps[name][2] <= DRY_BUDGET_S
        assert (out / "logs" / f"{name}.log").exists()


@pytest.mark.parametrize("algo", ["rainbow", "iqn"])
def test_dry_run_standalone_figures_of_the_other_learning_rules(dry_run, algo: str):
    out, *_ = dry_run
    s = json.loads((out / f"standalone_{algo}.json").read_text())
    assert s["algo"] == algo and s["device"] == "cpu" and s["batch"] == 8
    assert set(s["variants"]) == {"fp32", "bf16"}
    for v in s["variants"].values():
        assert v["status"] == "ok" and v["steps_per_s"] > 0
    summary = (out / "summary.txt").read_text()
    assert f"standalone {algo} fp32: steps_per_s=" in summary
    assert json.loads((out / "summary.json").read_text())[f"standalone_{algo}"]["bf16"] > 0


def test_dry_run_standalone_figures_without_a_host_sync(dry_run):
    """The learner program's step (priorities back behind an event) beside bf16 read back every step; the
    --compile variant (CUDA graphs) is skipped on the CPU."""
    out, *_ = dry_run
    s = json.loads((out / "standalone_async.json").read_text())
    assert s["device"] == "cpu" and s["batch"] == 8
    v = s["variants"]
    assert set(v) == {"bf16", "bf16_async", "bf16_async_compile"}
    for name in ("bf16", "bf16_async"):
        assert v[name]["status"] == "ok" and v[name]["steps_per_s"] > 0 and v[name]["loss_finite"]
    assert v["bf16_async"]["compile"] is False and v["bf16_async"]["loss_every"] == 1  # the CPU reads every loss
    assert v["bf16_async_compile"]["status"] == "skipped"
    summary = (out / "summary.txt").read_text()
    assert "standalone async bf16_async: steps_per_s=" in summary
    assert re.search(r"standalone async: no_sync_vs_sync=[0-9.]+$", summary, re.M)
    assert number(json.loads((out / "summary.json").read_text())["standalone_async"]["bf16_async"])


def test_dry_run_standalone_figures(dry_run):
    out, *_ = dry_run
    s = json.loads((out / "standalone.json").read_text())
    assert s["device"] == "cpu" and s["batch"] == 8
    v = s["variants"]
    assert set(v) == {"fp32", "bf16", "bf16_graph", "bf16_compile"}
    for name in ("fp32", "bf16"):
        assert v[name]["status"] == "ok"
        assert number(v[name]["steps_per_s"]) and v[name]["steps_per_s"] > 0
        assert number(v[name]["ms_per_step"]) and v[name]["loss_finite"]
    assert v["bf16"]["amp"] and v["bf16"]["channels_last"] and not v["fp32"]["amp"]
    assert v["bf16_graph"]["status"] == "error" and "injected" in v["bf16_graph"]["error"]
    assert v["bf16_compile"]["status"] == "skipped"  # after the failure: still reached
    assert s["best"]["variant"] in ("fp32", "bf16")
    info = json.loads((out / "torch_info.json").read_text())
    assert info["torch"] and info["cuda_available"] in (True, False)


def test_dry_run_pipeline_figures(dry_run):
    out, *_ = dry_run
    p = json.loads((out / "pipeline.json").read_text())
    assert p["status"] == "ok", p.get("error")
    for k in ("learner_steps_per_s", "standalone_steps_per_s", "efficiency"):
        assert number(p[k]) and p[k] > 0, k
    assert p["efficiency"] == pytest.approx(p["learner_steps_per_s"] / p["standalone_steps_per_s"])
    assert p["loader_threads"] >= 1 and p["batch"] == 8
    assert 0 <= p["system"]["wait_fraction"] <= 1
    assert "learner/steps_per_s" in p["system"]["telemetry_medians"]["learner"]


def test_dry_run_training_run(dry_run):
    out, *_ = dry_run
    g = json.loads((out / "pong.json").read_text())
    assert g["status"] == "ok" and g["env"] == "CartPole-v1"
    assert g["eval_rows"] >= 1
    for k in ("last_eval_mean", "best_eval_mean", "learner_steps", "max_seconds"):
        assert number(g[k]), k
    assert number(g["median_rates_second_half"]["learner/steps_per_s"])
    with open(out / "eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == g["eval_rows"] and all(number(float(r["mean"])) for r in rows)
    with open(out / "metrics_tail.csv", newline="") as f:
        tail = list(csv.DictReader(f))
    assert tail and set(tail[0]) >= {"time", "step", "tag", "value"}
    assert {p.name for p in (out / "pong_logs").iterdir()} >= {"learner.log", "evaluator.log", "actor-0.log"}
    assert not (out / "pong" / "checkpoints").exists()  # kept out of OUTDIR by default


def test_dry_run_summary(dry_run):
    out, *_ = dry_run
    text = (out / "summary.txt").read_text()
    figures = dict(re.findall(r"(\w+)=(-?[0-9.]+(?:e-?\d+)?)\b", text))
    for k in ("steps_per_s", "efficiency", "learner_steps_per_s", "standalone_steps_per_s",
              "last_eval_mean", "best_eval_mean", "eval_rows", "total_s"):
        assert k in figures and math.isfinite(float(figures[k])), k
    assert "standalone bf16_graph: error" in text
    s = json.loads((out / "summary.json").read_text())
    assert number(s["pipeline"]["efficiency"]) and number(s["standalone"]["fp32"])
    assert number(s["pong"]["last_eval_mean"]) and number(s["total_s"])
