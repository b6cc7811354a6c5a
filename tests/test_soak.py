"""The soak (bench/soak.py): its pure core on hand-made inputs, the replay's sender ledger, the /proc and
``ss`` parsers, and a short soak of the real system.

The short soak (marked ``soak``: ``pytest -m soak`` selects it, and it runs in the default suite too) is
``bench/soak.py --minutes 2.5 --mode single`` on MinAtar/Breakout-v0: one SIGKILL of each kind of role and
one SIGSTOP longer than the TCP keepalive, on loopback (the netns mode's 60 s cut does not fit in three
minutes). It fails on memory growth past its bound, fds or threads off their start after a fault, a role
not back, a learner stall outside the faults that cause one, or a transition lost without a kill or a cut.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))  # last: bench/replay_server.py must not hide the package

import soak_core as S  # noqa: E402
from procstat import draining_by_pid, parse_ss, parse_status, queues_by_pid  # noqa: E402

ROLES = ["evaluator", "replay_server", "learner", "actor-0", "actor-1"]


# ------------------------------------------------------------------------------------------ schedule

def test_schedule_is_the_seeds_and_faults_do_not_overlap() -> None:
    a = S.chaos_schedule(7, 3600, ROLES, 3, 35, 60, 60)
    assert a == S.chaos_schedule(7, 3600, ROLES, 3, 35, 60, 60)
    assert a != S.chaos_schedule(8, 3600, ROLES, 3, 35, 60, 60)
    kinds = [S.kind_of(f.role) for f in a if f.kind == "kill"]
    assert all(kinds.count(k) == 3 for k in S.KINDS) and len(kinds) == 12
    assert [f.kind for f in a].count("pause") == 1 and [f.kind for f in a].count("cut") == 1
    for f, g in zip(a, a[1:]):  # each fault has its duration and the recovery time to itself
        assert g.at >= f.at + f.duration + 60 - 0.2, (f, g)
    assert a[-1].at + a[-1].duration + 60 <= 3600 + 0.1


def test_schedule_that_cannot_fit_says_what_it_needs() -> None:
    with pytest.raises(ValueError, match=r"cannot hold 6 faults .*--minutes >= "):
        S.chaos_schedule(0, 100, ROLES, 1, 30, 60, 20)
    with pytest.raises(ValueError, match="every kind"):
        S.chaos_schedule(0, 1000, ["learner", "actor-0"], 1, 0, 0, 10)


def test_backoff_doubles_for_kills_in_a_row_only() -> None:
    # killed 10 s after its restart: in a row (2 s); then it runs past HEALTHY_AFTER_S (60 s): 1 s again
    assert S.backoffs([100, 111, 300]) == [1.0, 2.0, 1.0]


# -------------------------------------------------------------------------------------- metrics.csv

CSV = """time,step,tag,value
10.000,0,learner/steps,5
10.000,0,learner/loss,0.1
10.000,0,learner/steps,6
11.000,0,learner/steps,7
11.5"""


def test_rows_group_back_into_reports() -> None:
    msgs = S.read_messages(CSV)
    # the same time twice with a repeated tag: two reports; the half-written line is left out
    assert [(m.t, m.m) for m in msgs] == [(10.0, {"learner/steps": 5, "learner/loss": 0.1}),
                                          (10.0, {"learner/steps": 6}), (11.0, {"learner/steps": 7})]


def test_back_needs_two_reports_that_grow_after_the_fault() -> None:
    msgs = [S.Message(t, {"learner/steps": v}) for t, v in [(9, 90), (10, 100), (20, 80), (21, 80), (22, 85)]]
    assert S.back_at(msgs, "learner", 10.5) == 22  # 80 is the checkpoint's count restated, not a step


# -------------------------------------------------------------------------------------------- stalls

def test_stalls_are_the_times_between_growths_and_faults_excuse_theirs() -> None:
    pts = [(0, 1), (1, 2), (2, 3), (3, 3), (9, 3), (10, 4), (11, 1), (30, 2), (31, 3)]
    st = S.stalls(pts, 0, 40)
    assert [(s.start, s.end) for s in st] == [(0, 1), (1, 2), (2, 10), (10, 30), (30, 31), (31, 40)]
    kill = S.Done("kill", "replay_server", 10.5, 10.5, back=30)
    marked = [S.excuse(s, [kill], S.STALLS_LEARNER, [], 40, slack=2) for s in st]
    assert S.longest(marked, excused=False).seconds == 9   # 2..10: nothing explains it
    assert S.longest(marked, excused=True).excused == "kill replay_server"
    actor_kill = S.Done("kill", "actor-0", 2.5, 2.5, back=5)  # an actor's death stops no learner
    assert not S.excuse(S.Stall(2, 10), [actor_kill], S.STALLS_LEARNER, [], 40, 2).excused
    assert S.excuse(S.Stall(2, 10), [], S.STALLS_LEARNER, [(5, 7)], 40, 2).excused.startswith("no metrics")


# -------------------------------------------------------------------------------------------- memory

def test_growth_fits_one_slope_over_restarts_and_skips_warmup() -> None:
    # 1000 kB growing 10 kB/h... per process; the restarted process starts lower; warm-up samples are wild
    samples = [(t, 1, 1000 + 10 * t / 3600) for t in range(0, 3600, 60)]
    samples += [(t, 2, 500 + 10 * (t - 3600) / 3600 + (400 if t < 3700 else 0)) for t in range(3600, 7200, 60)]
    g = S.growth_pct_per_hour(samples, since=0, warmup_s=120)
    assert g == pytest.approx(10 / 750 * 100, rel=0.05)  # 10 kB/h on a mean of ~750 kB
    assert S.growth_pct_per_hour(samples[:3], 0, 120) is None


# -------------------------------------------------------------------------------------------- ledger

def _msgs(*reports: tuple[float, dict[str, float]]) -> list[S.Message]:
    return [S.Message(t, m) for t, m in reports]


def _actor(name: str, inc: int, chunks: int, per: int = 10) -> dict[str, float]:
    return {f"actor/{name}/incarnation": inc, f"actor/{name}/sent_chunks": chunks,
            f"actor/{name}/sent_transitions": chunks * per, f"actor/{name}/restart": 0}


def _replay(inc: float, *procs: tuple[str, int, int, int, int], per: int = 10) -> dict[str, float]:
    """A replay report: (sender, its incarnation, first_seq, last_seq, chunks) per sender process."""
    m = {"replay/incarnation": inc}
    for name, sinc, first, last, chunks in procs:
        p = f"replay/from/{name}/{sinc}/"
        m.update({p + "first_seq": first, p + "last_seq": last, p + "chunks": chunks, p + "transitions": chunks * per})
    return m


def test_ledger_names_the_cause_of_every_lost_chunk() -> None:
    a, b = 111, 222  # the incarnations of actor-0's two processes
    msgs = _msgs(
        (10, _actor("actor-0", a, 50)), (10.5, _replay(1, ("actor-0", a, 1, 48, 48))),
        # a cut at 20..80: chunks 101..103 skipped, seen when the connection is back
        (90, _actor("actor-0", a, 200)), (90.5, _replay(1, ("actor-0", a, 1, 200, 197))),
        # the replay killed at 100: it stored up to 210 in its last report; the new one starts at 216
        (99, _replay(1, ("actor-0", a, 1, 210, 207))),
        (110, _actor("actor-0", a, 300)), (110.5, _replay(2, ("actor-0", a, 216, 290, 75))),
        # a gap at 115 with no fault: unaccounted
        (116, _replay(2, ("actor-0", a, 216, 300, 83))),
        # actor-0 killed at 120 (sent 305 by its last report); its new process starts over, while what the
        # old one left in the kernel's buffers still arrives (up to 304: 305 was lost)
        (119, _actor("actor-0", a, 305)), (119.5, _replay(2, ("actor-0", a, 216, 302, 85))),
        (130, _actor("actor-0", b, 20)), (130.5, _replay(2, ("actor-0", a, 216, 304, 87), ("actor-0", b, 1, 18, 18))),
        (140, _actor("actor-0", b, 40)), (140.5, _replay(2, ("actor-0", a, 216, 304, 87), ("actor-0", b, 1, 36, 36))),
    )
    faults = [S.Done("cut", "link", 20, 80, back=90.5), S.Done("kill", "replay_server", 100, 100, back=108),
              S.Done("kill", "actor-0", 120, 120, back=128)]
    procs = S.actor_processes(msgs)
    assert [(p.incarnation, len(p.segments)) for p in procs["actor-0"]] == [(a, 2), (b, 1)]
    losses = S.ledger(procs, faults, horizon=150)
    got = {(x.restart, x.cause): x.chunks for x in losses}
    assert {(p.incarnation, x.cause): x.chunks for p in procs["actor-0"] for x in losses
            if x.incarnation == p.incarnation} == {
        (a, "cut link"): 3, (a, "kill replay_server"): 5,     # 211..215
        (a, "unaccounted: skipped while both ran"): 2,
        (a, "kill actor-0"): 1,                               # 305
        (b, "in flight at the end"): 4}                       # 37..40
    assert len(got) == 5
    v = S.verdict([], losses, S.Bounds())
    assert v.lost_unaccounted == 20 and not v.ok  # 2 chunks x 10 transitions


def test_ledger_of_a_clean_run_is_empty_but_for_what_is_in_flight() -> None:
    msgs = _msgs((10, _actor("actor-1", 5, 10)), (10.2, _replay(5, ("actor-1", 5, 1, 10, 10))),
                 (11, _actor("actor-1", 5, 25)), (11.2, _replay(5, ("actor-1", 5, 1, 22, 22))))
    losses = S.ledger(S.actor_processes(msgs), [], 12)
    assert [(x.cause, x.chunks, x.transitions, x.lost) for x in losses] == [("in flight at the end", 3, 30, False)]


# ------------------------------------------------------------------------------------------- verdict

def test_the_usual_counts_are_the_most_frequent() -> None:
    assert S.usual([(29, 7), (27, 7), (28, 8), (28, 7)]) == (28, 7)
    assert S.usual([(20, 4), (21, 5)]) == (21, 5)


def test_verdict_fails_on_each_bound_and_the_last_line_says_so() -> None:
    ok = S.RoleReport("learner", restarts=1, kills=1, back_s=[12.0], backoff_s=[1.0], growth=1.0,
                      stall=S.Stall(0, 2))
    v = S.verdict([ok], [], S.Bounds())
    assert v.ok and S.last_line(v, 3) == ("soak_ok=1 minutes=3 rss_growth_pct_per_h=1.00 stall_max_s=2.0 "
                                          "lost_unaccounted=0 restarts=1")
    bad = [S.RoleReport("learner", restarts=1, kills=1, back_s=[40.0], backoff_s=[1.0], growth=9.0, stall=S.Stall(0, 8)),
           S.RoleReport("actor-0", restarts=2, kills=1, back_s=[None], backoff_s=[1.0],
                        drift=S.drift((20, 9), [("kill learner", [(23, 9), (22, 9)]), ("pause x", [(21, 10), (20, 9)]),
                                                ("cut link", [(20, 10)]), ("kill evaluator", [])], S.Bounds()))]
    v = S.verdict(bad, [], S.Bounds())
    text = "\n".join(v.problems)
    assert "pause x" not in text and "kill evaluator" not in text  # back at the start; nothing sampled
    for expected in ("grows 9.0%/h", "back after 40.0s", "not back", "restarted 2 times, killed 1",
                     "22-23 fds after kill learner until the next fault, 20 at the start",
                     "10-10 threads after cut link", "no step for 8.0s"):
        assert expected in text, (expected, text)
    assert S.last_line(v, 3).startswith("soak_ok=0 ")


# -------------------------------------------------------------------------------------------- procstat

def test_proc_parsers() -> None:
    assert parse_status("Name:\tpython\nThreads:\t12\nVmRSS:\t  123456 kB\n") == (123456, 12)
    with pytest.raises(ValueError, match="VmRSS"):
        parse_status("Name:\tzombie\nThreads:\t1\n")
    text = ("ESTAB 0      0      127.0.0.1:1 127.0.0.1:2 users:((\"python\",pid=10,fd=5))\n"
            "ESTAB 300    0      127.0.0.1:2 127.0.0.1:1 users:((\"python\",pid=11,fd=6),(\"python\",pid=12,fd=6))\n"
            "ESTAB 0      4096   127.0.0.1:3 127.0.0.1:4 users:((\"python\",pid=11,fd=7))\n"
            "FIN-WAIT-1 0 9000   127.0.0.1:4 127.0.0.1:3\n"
            "garbage\n")
    socks = parse_ss(text)
    assert len(socks) == 4 and socks[3].pids == () and socks[1].pids == (11, 12)
    q = queues_by_pid(socks)
    assert set(q) == {10, 11, 12}
    assert (q[11].sockets, q[11].recv_max, q[11].send_max, q[11].largest) == (2, 300, 4096, 4096)
    assert q[12].recv_sum == 300 and q[10].largest == 0
    assert draining_by_pid(socks) == {11: 1}  # 127.0.0.1:4's process died: pid 11's fd 7 drains it


# ------------------------------------------------------------------------------------------ the soak

# Bounds of the short soak, looser than the hour's targets (5 %/h, 30 s, 5 s) because of what three minutes
# on two shared cores can tell: resident memory goes up and down by 5% over a minute (the evaluator's
# ~300 MB between its evaluations), which a fit over two minutes reads as hundreds of %/h where the hour's
# fit reads it as noise, so only a gross leak (> ~25 MB a minute) fails here; a restarted role imports torch
# beside four busy processes and whatever else shares the machine (8-15 s seen on 2 cores under another
# benchmark, so 60 s is slack, not the expectation); a learner step can wait seconds for a core. The fd and
# thread counts are exact: one that does not come back fails. The same soak with the hour's bounds:
# python bench/soak.py --minutes 60.
SHORT = ["--minutes", "2.5", "--mode", "single", "--seed", "1", "--kills-per-role", "1", "--pause-role", "actor-1",
         "--pause-s", "30", "--recover-s", "20", "--sample-period", "3", "--warmup-s", "40", "--settle-s", "5",
         "--max-growth", "500", "--max-back-s", "60", "--max-stall-s", "15", "--fd-tolerance", "0",
         "--thread-tolerance", "0"]


@pytest.mark.soak
@pytest.mark.timeout(480)
def test_short_soak(tmp_path: Path) -> None:
    pytest.importorskip("minatar")  # optional (APEX_NO_MINATAR=1): the soak runs MinAtar/Breakout-v0
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), *SHORT, "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=450,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    out = r.stdout + r.stderr
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    hit = re.fullmatch(r"soak_ok=(\d) minutes=\S+ rss_growth_pct_per_h=\S+ stall_max_s=\S+ "
                       r"lost_unaccounted=(\d+) restarts=(\d+)", last)
    assert hit, f"no verdict line (exit {r.returncode}):\n{out[-6000:]}"
    assert hit.group(1) == "1" and r.returncode == 0, f"the short soak failed:\n{out[-6000:]}"
    assert int(hit.group(3)) == 4, f"expected one restart per kill (4):\n{out[-6000:]}"
    print(r.stdout)  # the soak's report (pytest -s or -rP shows it)
