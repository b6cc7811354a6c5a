"""The one logger, and the evaluator's monitor in front of it: fixed tags, CSV headers, never a crash."""

from __future__ import annotations

import pytest

from apex_zmq.logger import Logger
from apex_zmq.wire import Telemetry, encode
from evaluator.monitor import RunMonitor


def test_csv_rows_keep_the_header_on_disk_when_a_run_resumes(tmp_path) -> None:
    import csv as _csv

    from apex_zmq.logger import Logger
    first = Logger(tmp_path, tensorboard=False)
    first.rows("eval", [{"time": 1.0, "mean": 2.0}])
    first.close()
    again = Logger(tmp_path, tensorboard=False)  # resumed under a protocol that reports more columns
    again.rows("eval", [{"time": 3.0, "mean": 4.0, "return_5min": 9.0}])
    again.close()
    with open(tmp_path / "eval.csv") as f:
        rows = list(_csv.reader(f))
    assert rows == [["time", "mean"], ["1.0", "2.0"], ["3.0", "4.0"]]


def test_logger_refuses_tags_outside_the_scheme(tmp_path) -> None:
    log = Logger(tmp_path, tensorboard=False)
    with pytest.raises(ValueError, match="must start with"):
        log.write({"relay/forwarded": 1.0}, 0)
    log.close()


def test_monitor_logs_only_the_tag_scheme_and_survives_other_roles_metrics(tmp_path) -> None:
    log = Logger(tmp_path, tensorboard=False)
    m = RunMonitor(log)
    # A relay reports relay/* counters: its heartbeat counts, its tags never reach the logger.
    m.on_telemetry(encode(Telemetry(sender="relay-b1", seq=1, role="relay", time=1.0,
                                    metrics={"relay/forwarded": 3.0, "perf/relay_lag": 0.5})))
    m.on_telemetry(encode(Telemetry(sender="replay", seq=1, role="replay", time=1.0,
                                    metrics={"replay/size": 7.0, "learner/steps": 99.0})))
    log.close()
    assert "relay-b1" in m.heartbeats
    text = (tmp_path / "metrics.csv").read_text()
    assert "perf/relay_lag" in text and "replay/size" in text
    assert "relay/forwarded" not in text and "learner/steps" not in text  # not the sender's family
