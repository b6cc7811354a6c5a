// apex-zmq dashboard: polls api/state once a second and updates the figures and charts in place.
"use strict";
(function () {
  const POLL_MS = 1000;
  const $ = id => document.getElementById(id);

  // Figures are shown exactly enough to be checked against the run's metrics.csv.
  const fmtInt = v => v == null ? "-" : Math.round(v).toLocaleString("en-US");
  const fmtRate = v => v == null ? "-" : (Math.abs(v) >= 100 ? fmtInt(v) : v.toFixed(1));
  const fmtSig = v => v == null ? "-" : Number(v).toPrecision(3);
  const fmtReturn = v => v == null ? "-" : v.toFixed(1);
  const fmtDuration = s => {
    s = Math.max(0, Math.floor(s));
    const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), sec = s % 60;
    return `${h}:${String(m).padStart(2, "0")}:${String(sec).padStart(2, "0")}`;
  };
  const setText = (id, text) => { const el = $(id); if (el.textContent !== text) el.textContent = text; };

  // ---------------------------------------------------------------- charts

  const charts = {};
  const width = el => Math.max(300, el.parentElement.clientWidth - 30);

  function makeChart(id, series, opts = {}) {
    const el = $(id);
    const data = series.map(() => []);
    charts[id] = new uPlot(Object.assign({width: width(el), height: 240, series}, opts), data, el);
  }

  const yAxis = (extra = {}) => Object.assign({size: 64}, extra);  // room for "2,000,000" beside its label
  const line = (label, stroke, extra = {}) => Object.assign({label, stroke, width: 1.5, spanGaps: true}, extra);

  makeChart("chart-ladder", [{label: "epsilon"},
    {label: "recent mean return", stroke: "#1f6feb", paths: () => null,
     points: {show: true, size: 8, fill: "#1f6feb"}}],
    {scales: {x: {time: false, distr: 3, log: 10}},
     axes: [{label: "epsilon (log)"}, yAxis({label: "return"})], cursor: {drag: {x: false, y: false}}});
  makeChart("chart-eval", [{label: "time"}, line("mean", "#1f6feb", {width: 2, points: {show: true}}),
    line("min", "#8a9aab", {dash: [4, 4]}), line("max", "#8a9aab", {dash: [4, 4]})],
    {axes: [{}, yAxis({label: "return"})]});
  makeChart("chart-learner", [{label: "time"}, line("steps/s", "#1f6feb"),
    line("loss", "#d4761c", {scale: "loss"})],
    {axes: [{}, yAxis({label: "steps/s"}), yAxis({scale: "loss", side: 1, label: "loss", grid: {show: false}})]});
  makeChart("chart-replay", [{label: "time"}, line("size", "#1f6feb"),
    line("inserted/s", "#1a7f37", {scale: "rate"}), line("sampled/s", "#d4761c", {scale: "rate"}),
    line("updated/s", "#8250df", {scale: "rate"})],
    {axes: [{}, yAxis({label: "transitions"}), yAxis({scale: "rate", side: 1, label: "per s", grid: {show: false}})]});
  makeChart("chart-gradients", [{label: "time"}, line("staleness", "#1f6feb"),
    line("entropy", "#d4761c", {scale: "entropy"})],
    {axes: [{}, yAxis({label: "updates behind"}), yAxis({scale: "entropy", side: 1, label: "policy entropy",
     grid: {show: false}})]});
  makeChart("chart-actor", [{label: "time"}, line("env steps/s", "#1f6feb")], {axes: [{}, yAxis({label: "steps/s"})]});

  window.addEventListener("resize", () => {
    for (const u of Object.values(charts)) u.setSize({width: width(u.root), height: 240});
  });

  // ---------------------------------------------------------------- tables

  const domId = s => s.replace(/[^A-Za-z0-9_-]/g, "_");  // senders come from the network: text only

  function row(tbody, id, cells) {
    let tr = $(id);
    if (!tr) {
      tr = document.createElement("tr");
      tr.id = id;
      for (const c of cells) { const td = document.createElement("td"); td.className = c; tr.appendChild(td); }
      tbody.appendChild(tr);
    }
    return tr;
  }

  function cell(tr, cls, text) {
    const td = tr.querySelector("." + cls);
    if (td.textContent !== text) td.textContent = text;
  }

  function renderHeartbeats(rows) {
    const tbody = document.querySelector("#heartbeat-table tbody");
    for (const h of rows) {
      const tr = row(tbody, "heartbeat-" + domId(h.sender), ["sender", "role", "age", "status"]);
      tr.className = h.up ? "up" : "down";
      cell(tr, "sender", h.sender);
      cell(tr, "role", h.role);
      cell(tr, "age", `${h.age_s.toFixed(1)} s ago`);
      cell(tr, "status", h.up ? "up" : "down");
    }
  }

  function renderLadder(points) {
    const tbody = document.querySelector("#ladder-table tbody");
    let episodes = 0;
    for (const p of points) {
      const tr = row(tbody, "ladder-slot-" + p.slot, ["slot", "epsilon", "return", "episodes"]);
      cell(tr, "slot", String(p.slot));
      cell(tr, "epsilon", fmtSig(p.epsilon));
      cell(tr, "return", fmtReturn(p.recent_mean_return));
      cell(tr, "episodes", String(p.episodes));
      episodes += p.episodes;
    }
    setText("ladder-slots", String(points.length));
    setText("ladder-episodes", fmtInt(episodes));
    // The chart draws in x order; a slot shows once it has reported an episode (its epsilon known).
    const known = points.filter(p => p.epsilon != null && p.epsilon > 0).sort((a, b) => a.epsilon - b.epsilon);
    charts["chart-ladder"].setData([known.map(p => p.epsilon), known.map(p => p.recent_mean_return)]);
  }

  // ---------------------------------------------------------------- state

  function render(s) {
    const m = s.latest;
    setText("env", s.env || "");
    setText("run-dir", s.run_dir || "");
    setText("uptime", fmtDuration(s.now - s.started));
    setText("updated", new Date(s.now * 1000).toLocaleTimeString("en-GB"));
    setText("heartbeat-timeout", String(s.heartbeat_timeout_s));
    setText("ladder-window", String(s.ladder_window));

    const ev = s.eval.latest;
    setText("eval-latest", ev ? fmtReturn(ev.mean) : "-");
    setText("eval-steps", ev ? fmtInt(ev.learner_steps) : "-");
    setText("eval-count", String(s.eval.count));
    $("eval-hns-line").hidden = !(ev && ev.hns != null);  // Atari only
    setText("eval-hns", ev && ev.hns != null ? `${(100 * ev.hns).toFixed(1)}%` : "-");
    setText("eval-protocol", ev && ev.protocol ? `${ev.protocol} protocol` : "");
    setText("learner-steps", fmtInt(m["learner/steps"]));
    setText("learner-steps-per-s", fmtRate(m["learner/steps_per_s"]));
    setText("learner-loss", fmtSig(m["learner/loss"]));
    setText("replay-size", fmtInt(m["replay/size"]));
    setText("replay-inserted-per-s", fmtRate(m["replay/inserted_per_s"]));
    setText("replay-sampled-per-s", fmtRate(m["replay/sampled_per_s"]));
    setText("replay-updated-per-s", fmtRate(m["replay/updated_per_s"]));
    // Sharded replay (--replay-shards N): each shard's size; the figures above are the totals.
    const shards = s.replay_shards || [];
    $("replay-shards-line").hidden = shards.length === 0;
    setText("replay-shards", shards.map(x => x.size == null ? "down" : fmtInt(x.size)).join(" · "));
    setText("actor-steps-per-s", fmtRate(m["actor/steps_per_s"]));
    const spi = m["replay/samples_per_insert"], target = m["replay/samples_per_insert_target"];
    setText("replay-spi", spi == null ? "-" : spi.toFixed(2));
    setText("replay-spi-target", target ? `(held to ${target})` : "(not limited)");
    const bits = m["actor/acting_bits"];
    setText("actor-acting", bits == null ? "-" :
            ({32: "float32", 16: "bfloat16", 8: "int8", 7: "int8 (7-bit)"}[bits] || `${bits}-bit`));
    // actor.main.EXPLORATION_CODES: with noisy layers alone every slot acts greedily (epsilon 0).
    const exploration = m["actor/exploration"];
    setText("actor-exploration", exploration == null ? "-" :
            (["epsilon ladder", "noisy layers (epsilon 0)", "epsilon ladder + noisy layers",
              "sampled from the policy (epsilon 0)", "epsilon annealed from 1 to 0.1 / 0.01 / 0.5"][exploration] || "?"));
    // The asynchronous family (no replay server): gradient updates instead of replay figures.
    const isAsync = m["learner/updates_per_s"] != null;
    $("card-gradients").hidden = $("chart-box-gradients").hidden = !isAsync;
    $("card-replay").hidden = $("chart-box-replay").hidden = isAsync;
    setText("algo", s.algo || "-");
    setText("learner-updates-per-s", fmtRate(m["learner/updates_per_s"]));
    setText("learner-staleness", fmtSig(m["learner/staleness"]));
    setText("learner-staleness-max", fmtInt(m["learner/staleness_max"]));
    setText("learner-stale-dropped", fmtInt(m["learner/stale_dropped"]));
    setText("learner-entropy", fmtSig(m["learner/entropy"]));
    setText("actor-epsilon-mean", fmtSig(m["actor/epsilon_mean"]));
    const agree = m["actor/acting_agreement"];
    setText("actor-agreement", agree == null ? "-" : `${(100 * agree).toFixed(0)}%`);

    renderHeartbeats(s.heartbeats);
    renderLadder(s.ladder);

    const pts = s.eval.points;
    charts["chart-eval"].setData([pts.map(p => p.time), pts.map(p => p.mean), pts.map(p => p.min),
                                  pts.map(p => p.max)]);
    const L = s.series.learner, R = s.series.replay, A = s.series.actor;
    charts["chart-learner"].setData([L.t, L.steps_per_s, L.loss]);
    charts["chart-replay"].setData([R.t, R.size, R.inserted_per_s, R.sampled_per_s, R.updated_per_s]);
    charts["chart-actor"].setData([A.t, A.steps_per_s]);
    if (isAsync) charts["chart-gradients"].setData([L.t, L.staleness, L.entropy]);
  }

  async function poll() {
    try {
      const r = await fetch("api/state", {cache: "no-store"});
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      const s = await r.json();
      render(s);
      window.apexDashboard.state = s;  // what the page shows, for debugging from the console
      setText("status", "live");
      $("status").className = "up";
    } catch (e) {
      setText("status", `no answer from the evaluator (${e.message}); retrying`);
      $("status").className = "down";
    } finally {
      setTimeout(poll, POLL_MS);  // after the answer, so slow answers never pile up
    }
  }

  window.apexDashboard = {charts, state: null};
  poll();
})();
