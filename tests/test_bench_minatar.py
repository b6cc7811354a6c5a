"""bench/minatar_compare.py: the cross-invocation judgements (rainbow/iqn against dqn, a3c against Y&T)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from conftest import ROOT


def _load():
    spec = importlib.util.spec_from_file_location("minatar_compare", ROOT / "bench" / "minatar_compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _curve(points: list[tuple[float, float]]) -> list[dict]:
    return [{"t": t, "mean": m, "se": 0.1, "std": 0.5, "episodes": 30} for t, m in points]


def _doc(game: str, algos: dict[str, list[tuple[float, float]]], anchor: list[tuple[float, float]] | None = None,
         dueling: bool = False) -> dict:
    return {"games": {f"MinAtar/{game}-v0": {"anchor": {"curve": _curve(anchor)} if anchor else None, "ours": {
        a: {"curve": _curve(c), "frames": 1000, "learner_steps": 10, "dueling": dueling} for a, c in algos.items()}}}}


def test_compare_counts_rainbow_within_slack_and_not_iqn(tmp_path: Path, capsys) -> None:
    mc = _load()
    dqn = [(20, 1.0), (300, 10.0), (600, 9.0), (900, 10.0)]  # final 10, first reached at 300 s
    first = tmp_path / "a.json"
    first.write_text(json.dumps(_doc("Breakout", {"dqn": dqn, "a3c": [(100, 5.0), (900, 9.95)]})))
    second = tmp_path / "b.json"  # rainbow reaches 10 at 450 s (1.5x: met), iqn at 451 s (not), a3c's SI below
    second.write_text(json.dumps(_doc("Breakout", {"rainbow": [(450, 10.0), (900, 8.0)],
                                                   "iqn": [(451, 12.0)]})))
    third = tmp_path / "c.json"
    third.write_text(json.dumps(_doc("SpaceInvaders", {"a3c": [(900, 51.0)]})))
    mc.main([str(first), str(second), str(third)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == ("minatar_compare rainbow_games_within_1.5x=1/1 iqn_games_within_1.5x=0/1 a3c_met=1/2 "
                    "dqn_within_third_of_anchor=0/0")


def test_dqn_against_an_anchor_from_another_file_and_dueling_runs_apart(tmp_path: Path, capsys) -> None:
    mc = _load()
    anchor = [(60, 1.0), (600, 6.0), (900, 5.0)]  # final 5.0, first reached at 600 s: a third is 200 s
    (tmp_path / "old.json").write_text(json.dumps(_doc("Breakout", {"dqn": [(250, 5.0), (900, 9.0)]},
                                                       anchor=anchor, dueling=True)))
    (tmp_path / "new.json").write_text(json.dumps(_doc("Breakout", {"dqn": [(100, 2.0), (200, 5.5), (900, 20.0)]})))
    # Rainbow reaches the dueling run's 9.0 early, but is judged against the current dqn's 20.0: never.
    (tmp_path / "rb.json").write_text(json.dumps(_doc("Breakout", {"rainbow": [(300, 9.0), (900, 11.0)]})))
    legacy = _doc("SpaceInvaders", {"dqn": [(900, 30.0)]}, anchor=[(300, 20.0)])
    del legacy["games"]["MinAtar/SpaceInvaders-v0"]["ours"]["dqn"]["dueling"]  # a file from before the field
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    mc.main([str(p) for p in sorted(tmp_path.glob("*.json"))])
    out = capsys.readouterr().out
    assert "Breakout       dqn         anchor final   5.00 reached at 600 s; dqn reached it at 200 s (ratio 0.33)  met: True" in out
    assert "dqn-dueling reached it at 250 s (ratio 0.42)  met: False" in out
    assert "SpaceInvaders  dqn-dueling" in out and "SpaceInvaders  dqn " not in out
    assert out.strip().splitlines()[-1] == ("minatar_compare rainbow_games_within_1.5x=0/1 iqn_games_within_1.5x=0/0 "
                                            "a3c_met=0/0 dqn_within_third_of_anchor=1/1")


def test_never_reaching_counts_the_budget_and_median_run_is_used(tmp_path: Path) -> None:
    mc = _load()
    dqn = {"curve": _curve([(100, 5.0), (900, 5.0)])}
    c = mc.against(dqn, {"curve": _curve([(900, 4.9)])}, budget=900.0)
    assert c["other_s"] is None and c["ratio"] == 9.0 and not c["met"]
    runs = [{"curve": _curve([(900, x)])} for x in (3.0, 1.0, 2.0)]
    assert mc.final(mc.median_run(runs)["curve"])["mean"] == 2.0
