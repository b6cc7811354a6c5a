"""MinAtar: the issue's targets that compare runs of different invocations of ``bench/minatar.py``.

``bench/minatar.py`` runs one game's algorithms one after the other, 15 minutes each; a whole matrix does
not fit one sitting, so its invocations write one ``minatar.json`` each. This reads several and judges:

- **rainbow and iqn against dqn**: dqn's 15-minute return on a game (its last evaluation) and the
  seconds dqn took to first reach it; the seconds rainbow (iqn) took to reach that same return, and
  their ratio to dqn's. Target: at most 1.5x dqn's time on at least three games.
- **a3c against Young & Tian's actor-critic at 1M frames** (Breakout 9.9, SpaceInvaders 51.7): a3c's
  last evaluation and the seconds to first reach the published level.
- **dqn against Young & Tian's DQN** at 1M and 5M frames: dqn's last evaluation beside them.
- **dqn against the anchor** (Stable-Baselines3's DQN set up as Young & Tian's, from any file of the game):
  the seconds dqn took to first reach the anchor's final return, against the anchor's own. Target: at most
  a third of the anchor's time.

dqn runs with the dueling head (the MinAtar preset's before it took Young & Tian's single head; files
without the record's ``dueling`` are from then) are shown apart as ``dqn-dueling`` and are not the dqn the
others are judged against.

Every figure is read from the JSON files' curves (evaluation mean at wall time ``t``); nothing is
re-measured. Where one game and algorithm appears in several files, each counts as one run and the
median run (by final return) is used, the number of runs shown. Last line::

    minatar_compare rainbow_games_within_1.5x=<n>/<games measured> iqn_games_within_1.5x=<n>/<m> a3c_met=<n>/<m> dqn_within_third_of_anchor=<n>/<m>

    .venv/bin/python bench/minatar_compare.py docs/minatar-*.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Optional

# bench/minatar.py shares its name with the ``minatar`` package: load it by path, under another name.
_spec = importlib.util.spec_from_file_location("minatar_bench", Path(__file__).resolve().parent / "minatar.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
YT_AC_1M, YT_DQN_PUBLISHED = _bench.YT_AC_1M, _bench.YT_DQN_PUBLISHED
final, fmt, seconds_to, short_name = _bench.final, _bench.fmt_s, _bench.seconds_to, _bench.short_name

SLACK = 1.5  # rainbow / iqn may take up to this times dqn's time to dqn's return
ANCHOR_SHARE = 1 / 3  # dqn may take up to this share of the anchor's time to the anchor's return
LAST_LINE_NAMES = {"rainbow": "games_within_1.5x", "iqn": "games_within_1.5x", "a3c": "met",
                   "dqn": "within_third_of_anchor"}


def algo_label(algo: str, rec: dict) -> str:
    """``dqn-dueling`` for a dqn run with the dueling head (a record without ``dueling``: one from before
    the field, when every MinAtar dqn run had that head), else ``algo``."""
    return "dqn-dueling" if algo == "dqn" and rec.get("dueling", True) else algo


def load_runs(paths: list[Path]) -> dict[str, dict[str, list[dict]]]:
    """game -> algo (``algo_label``) -> the runs (each ``bench/minatar.py``'s per-algorithm record) found in
    ``paths``; the anchor's runs under "anchor"."""
    runs: dict[str, dict[str, list[dict]]] = {}
    for path in paths:
        doc = json.loads(path.read_text())
        for env_id, game in doc["games"].items():
            records = [(algo_label(algo, rec), rec) for algo, rec in game["ours"].items()]
            records += [("anchor", game["anchor"])] if game.get("anchor") else []
            for label, rec in records:
                if rec.get("curve"):
                    runs.setdefault(short_name(env_id), {}).setdefault(label, []).append(
                        {**rec, "source": str(path)})
    return runs


def median_run(runs: list[dict]) -> dict:
    """The run whose final return is the median (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: final(r["curve"])["mean"])
    return ordered[(len(ordered) - 1) // 2]


def against(reference: dict, other: dict, budget: float, slack: float = SLACK) -> dict:
    """``reference``'s final return and its time to it; ``other``'s time to that return, the ratio (the
    budget if never) and whether it is within ``slack`` times the reference's time."""
    target = final(reference["curve"])["mean"]
    ref_s = seconds_to(reference["curve"], target)
    other_s = seconds_to(other["curve"], target)
    ratio = (budget if other_s is None else other_s) / ref_s if ref_s else float("nan")
    return {"ref_final": target, "ref_s": ref_s, "other_s": other_s, "ratio": ratio,
            "other_final": final(other["curve"])["mean"], "met": other_s is not None and ratio <= slack}


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", type=Path, help="minatar.json files written by bench/minatar.py")
    ap.add_argument("--budget", type=float, default=900.0, help="seconds per run (for runs that never reach)")
    args = ap.parse_args(argv)
    runs = load_runs(args.json)
    budget = args.budget
    counts = {"rainbow": [0, 0], "iqn": [0, 0], "a3c": [0, 0], "dqn": [0, 0]}  # [met, measured]

    print("dqn against Young & Tian's DQN (training returns at epsilon 0.1):")
    for game, by_algo in sorted(runs.items()):
        for algo in ("dqn", "dqn-dueling"):
            if algo in by_algo:
                d = median_run(by_algo[algo])
                yt = YT_DQN_PUBLISHED.get(game, {})
                f = final(d["curve"])
                print(f"  {game:14s} {algo:11s} {f['mean']:6.2f} +- {f['se']:.2f} ({len(by_algo[algo])} run(s))   "
                      f"Y&T 1M {yt.get('1M')}  5M {yt.get('5M')}  1M met: {f['mean'] >= (yt.get('1M') or 0)}  "
                      f"5M met: {f['mean'] >= (yt.get('5M') or 0)}")

    print(f"\ndqn against the anchor (seconds to the anchor's final return; target <= {ANCHOR_SHARE:.3g} of the "
          f"anchor's):")
    for game, by_algo in sorted(runs.items()):
        if "anchor" not in by_algo:
            continue
        anchor = median_run(by_algo["anchor"])
        for algo in ("dqn", "dqn-dueling"):
            if algo not in by_algo:
                continue
            c = against(anchor, median_run(by_algo[algo]), budget, ANCHOR_SHARE)
            if algo == "dqn":
                counts["dqn"][1] += 1
                counts["dqn"][0] += c["met"]
            print(f"  {game:14s} {algo:11s} anchor final {c['ref_final']:6.2f} reached at {fmt(c['ref_s'], budget)} s; "
                  f"{algo} reached it at {fmt(c['other_s'], budget)} s (ratio {c['ratio']:.2f})  met: {c['met']}")

    print(f"\nrainbow and iqn against dqn (seconds to dqn's 15-minute return; target <= {SLACK}x dqn's):")
    for game, by_algo in sorted(runs.items()):
        for algo in ("rainbow", "iqn"):
            if algo not in by_algo or "dqn" not in by_algo:
                continue
            c = against(median_run(by_algo["dqn"]), median_run(by_algo[algo]), budget)
            counts[algo][1] += 1
            counts[algo][0] += c["met"]
            print(f"  {game:14s} {algo:8s} dqn final {c['ref_final']:6.2f} reached at {fmt(c['ref_s'], budget)} s; "
                  f"{algo} reached it at {fmt(c['other_s'], budget)} s (ratio {c['ratio']:.2f}), "
                  f"its own final {c['other_final']:.2f}  met: {c['met']}")

    print("\na3c against Young & Tian's actor-critic at 1M frames:")
    for game, by_algo in sorted(runs.items()):
        if "a3c" in by_algo and game in YT_AC_1M:
            a = median_run(by_algo["a3c"])
            f = final(a["curve"])
            reach = seconds_to(a["curve"], YT_AC_1M[game])
            met = f["mean"] >= YT_AC_1M[game]
            counts["a3c"][1] += 1
            counts["a3c"][0] += met
            print(f"  {game:14s} a3c {f['mean']:6.2f} +- {f['se']:.2f} after {a['frames']:,} frames "
                  f"({len(by_algo['a3c'])} run(s)); Y&T AC 1M {YT_AC_1M[game]:g}, first reached at "
                  f"{fmt(reach, budget)} s  met: {met}")

    print("minatar_compare " + " ".join(f"{k}_{LAST_LINE_NAMES[k]}={v[0]}/{v[1]}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
