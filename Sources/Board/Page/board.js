// provision board: follows /events (server-sent events, one JSON snapshot per message)
// and redraws the tiles. No framework and no build step; everything comes from the board.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const sections = { slot: $("slots"), tegra: $("tegra"), manual: $("manual") };
  let source = null;
  let lastMessage = Date.now();
  let boardProblem = null;
  let daemonProblem = null;

  function clock(seconds) {
    const s = Math.max(0, Math.round(seconds));
    const h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, r = s % 60;
    const two = (n) => String(n).padStart(2, "0");
    return h > 0 ? `${h}:${two(m)}:${two(r)}` : `${m}:${two(r)}`;
  }

  function element(tag, cls, parent) {
    const e = document.createElement(tag);
    e.className = cls;
    if (parent) parent.appendChild(e);
    return e;
  }

  function makeTile(key) {
    const tile = element("article", "tile");
    tile.dataset.key = key;
    const head = element("div", "head", tile);
    element("span", "name", head);
    element("span", "unit", head);
    element("div", "word", tile);
    const bar = element("div", "bar", tile);
    element("div", "fill", bar);
    const figures = element("div", "figures", tile);
    element("span", "percent", figures);
    element("span", "rate", figures);
    element("span", "eta", figures);
    element("div", "detail", tile);
    element("div", "meta", tile);
    return tile;
  }

  function setText(tile, cls, text) {
    const e = tile.querySelector("." + cls);
    if (e.textContent !== text) e.textContent = text;
    e.hidden = text === "";
  }

  function updateTile(tile, t) {
    tile.dataset.tone = t.tone;
    tile.dataset.word = t.word;
    setText(tile, "name", t.name);
    setText(tile, "unit", t.unit || "");
    setText(tile, "word", t.word);
    const running = t.percent !== undefined && t.percent !== null;
    tile.querySelector(".bar").hidden = !running;
    tile.querySelector(".fill").style.width = running ? `${t.percent}%` : "0";
    const active = t.tone !== "done" && running;
    setText(tile, "percent", active ? `${t.percent.toFixed(t.percent < 10 ? 1 : 0)}%` : "");
    setText(tile, "rate", active && t.megabytesPerSecond ? `${t.megabytesPerSecond.toFixed(1)} MB/s` : "");
    setText(tile, "eta", active && t.secondsRemaining !== undefined && t.secondsRemaining !== null ? `${clock(t.secondsRemaining)} left` : "");
    tile.querySelector(".figures").hidden = !active;
    setText(tile, "detail", t.detail || "");
    setText(tile, "meta", [t.device, t.image, t.job ? `job ${t.job}` : ""].filter(Boolean).join(" · "));
  }

  function render(snapshot) {
    $("station").textContent = snapshot.station || "provision";
    document.title = `${snapshot.station || "provision"} — board`;
    $("done-today").textContent = snapshot.doneToday;
    $("failed-today").textContent = snapshot.failedToday;
    daemonProblem = snapshot.connected ? null : (snapshot.problem || "provisiond does not answer");
    const existing = new Map();
    document.querySelectorAll(".tile").forEach((t) => existing.set(t.dataset.key, t));
    const seen = new Set();
    for (const t of snapshot.tiles) {
      let tile = existing.get(t.key);
      if (!tile) tile = makeTile(t.key);
      updateTile(tile, t);
      sections[t.kind].appendChild(tile); // appending in order keeps the config's order
      seen.add(t.key);
    }
    existing.forEach((tile, key) => { if (!seen.has(key)) tile.remove(); });
    $("tegra-heading").hidden = !snapshot.tiles.some((t) => t.kind === "tegra");
    $("manual-heading").hidden = !snapshot.tiles.some((t) => t.kind === "manual");
    renderLab(snapshot.lab);
    showBanner();
  }

  // The lab's view (a station on a shared ledger): every station, its day and its
  // unfinished jobs, as the lab's database has them. Rebuilt whole (a few stations), but
  // only when it changed: every job event and progress report sends the whole snapshot.
  let shownLab;
  function renderLab(lab) {
    const text = JSON.stringify(lab || null);
    if (text === shownLab) return;
    shownLab = text;
    $("lab").hidden = !lab;
    if (!lab) return;
    $("lab-summary").textContent = `— ${lab.stations.length} station${lab.stations.length === 1 ? "" : "s"}, ${lab.unitsNumbered} units numbered`;
    $("lab-problem").textContent = lab.problem ? `Lab view not current: ${lab.problem}` : "";
    $("lab-problem").hidden = !lab.problem;
    const box = $("lab-stations");
    box.replaceChildren();
    for (const s of lab.stations) {
      const card = element("article", "station", box);
      card.dataset.station = s.name;
      card.dataset.live = String(s.live);
      card.dataset.here = String(s.here);
      element("div", "station-name", card).textContent = s.name + (s.here ? " (this station)" : "");
      const unsent = s.unsent > 0 ? ` · ${s.unsent} rows not yet sent` : "";
      element("div", "station-figures", card).textContent =
        `${s.seen} · ${s.doneToday} done, ${s.failedToday} failed today · ${s.running.length} running${unsent}`;
      for (const t of s.running) {
        const row = element("div", "job", card);
        row.dataset.tone = t.tone;
        element("span", "job-slot", row).textContent = t.name;
        element("span", "job-word", row).textContent = t.word;
        element("span", "job-unit", row).textContent = t.unit || "";
      }
    }
  }

  function showBanner() {
    const banner = $("banner");
    const text = boardProblem
      ? boardProblem
      : daemonProblem ? `provisiond unreachable — reconnecting. ${daemonProblem}` : "";
    banner.textContent = text;
    banner.hidden = text === "";
    document.body.classList.toggle("stale", text !== "");
  }

  function connect() {
    if (source) source.close();
    source = new EventSource("/events");
    source.onmessage = (message) => {
      lastMessage = Date.now();
      boardProblem = null;
      render(JSON.parse(message.data));
    };
    source.onerror = () => {
      boardProblem = "The board's server does not answer — reconnecting…";
      showBanner();
      // EventSource retries by itself unless the answer was not an event stream.
      if (source.readyState === EventSource.CLOSED) setTimeout(connect, 2000);
    };
  }

  // The board sends a snapshot at least every 10 s; silence for longer means a dead
  // connection that the browser has not noticed (a sleeping laptop, a dropped Wi-Fi).
  setInterval(() => {
    if (Date.now() - lastMessage > 25000) {
      boardProblem = "No news from the board for 25 s — reconnecting…";
      showBanner();
      lastMessage = Date.now();
      connect();
    }
  }, 5000);
  connect();
})();
