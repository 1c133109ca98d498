// The bridge's dashboard.  It uses only the bridge's public API: REST with the caller's bearer
// token (Authorization header) and the websocket /ws (?access_token=, since a browser sets no
// headers on a websocket).  Everything the mesh says is shown as text, never as HTML.
"use strict";
(() => {
  const TOKEN_KEY = "mesh-token"; // shared with the API page at /docs
  const FEED_SIZE = 300; // stream entries kept on the page
  const AUDIT_SIZE = 200; // audit rows kept
  const WINDOW = 60; // seconds the chart shows
  const AUDIT_EVERY = 1000; // ms between audit polls
  const AUDIT_OVERLAP = 2000; // ms each poll reads again: records of several chains interleave
  const AUDIT_PAGES = 5; // pages of 500 one poll reads at most
  const AGENTS_EVERY = 10000; // ms between full registry reads (events keep it live between)
  const DEAD_EVERY = 15000;

  const $ = (id) => document.getElementById(id);
  const state = {
    token: "",
    running: false,
    socket: null,
    backoff: 1000,
    timers: [],
    agents: new Map(), // agent id -> Map(instance id -> instance record)
    patterns: [], // the topic patterns the bridge holds for us
    pending: new Map(), // subscribe op id -> patterns asked for
    nextOp: 1,
    feed: [], // entries waiting to be drawn
    paused: false,
    hidden: 0,
    buckets: new Map(), // Unix second -> {passed, denied}
    auditCursor: null, // newest audit entry's Redis time (ms) seen
    auditSeen: new Map(), // "chain/id" -> ms, for records read again in the overlap
    redactedRows: new Map(), // audit id -> stream row of a redacted message
  };

  // Elements

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null) continue;
      if (key.startsWith("data-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    node.append(...children.filter((child) => child !== null && child !== undefined));
    return node;
  }

  function toast(text, bad = false) {
    const box = $("toast");
    box.textContent = text;
    box.className = bad ? "toast bad" : "toast";
    box.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { box.hidden = true; }, bad ? 8000 : 3000);
  }

  const clock = (date) => date.toLocaleTimeString([], {hour12: false});
  const enc = encodeURIComponent;

  function short(value, limit = 400) {
    const text = typeof value === "string" ? value : JSON.stringify(value);
    return text === undefined ? "" : text.length > limit ? text.slice(0, limit) + " …" : text;
  }

  // A topic pattern as the broker matches it: * one word, # zero or more.
  function matches(pattern, topic) {
    const want = pattern.split(".");
    const words = topic.split(".");
    const at = (i, j) => {
      if (i === want.length) return j === words.length;
      if (want[i] === "#") return at(i + 1, j) || (j < words.length && at(i, j + 1));
      return j < words.length && (want[i] === "*" || want[i] === words[j]) && at(i + 1, j + 1);
    };
    return at(0, 0);
  }

  // REST

  async function api(method, path) {
    const headers = state.token ? {Authorization: `Bearer ${state.token}`} : {};
    let response;
    try {
      response = await fetch(path, {method, headers});
    } catch (error) {
      return {status: 0, ok: false, body: {error: `the bridge did not answer (${error.message})`}};
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = {error: `${response.status} ${response.statusText}`};
    }
    if (response.status === 401 && state.running) signOut(body.error);
    return {status: response.status, ok: response.ok, body};
  }

  const why = (result) => (result.body && result.body.error) || `HTTP ${result.status}`;

  // Signing in and out

  function tokenFromAddress() {
    const address = new URL(location.href);
    const token = address.searchParams.get("access_token");
    if (token) {
      sessionStorage.setItem(TOKEN_KEY, token);
      // Out of the address bar, the history and any screenshot.
      address.searchParams.delete("access_token");
      history.replaceState(null, "", address);
    }
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  async function begin() {
    const token = tokenFromAddress();
    const health = await api("GET", "/health");
    const open = health.ok && health.body.mode === "open";
    state.token = open ? "" : token;
    const topics = new URL(location.href).searchParams.get("topics");
    $("topics").value = topics || "#";
    if (!open && !state.token) {
      showLogin("");
      return;
    }
    const check = await api("GET", "/agents");
    if (check.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(why(check));
      return;
    }
    start(check);
  }

  function showLogin(error) {
    $("login").hidden = false;
    $("board").hidden = true;
    $("signout").hidden = true;
    $("login-error").textContent = error || "";
    $("token").focus();
  }

  async function signIn(event) {
    event.preventDefault();
    state.token = $("token").value.trim();
    const check = await api("GET", "/agents");
    if (!check.ok) {
      $("login-error").textContent = why(check);
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, state.token);
    $("token").value = "";
    start(check);
  }

  function signOut(reason) {
    state.running = false;
    state.timers.forEach(clearInterval);
    state.timers = [];
    if (state.socket) state.socket.close(1000);
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = "";
    setLink(false, "signed out");
    $("principal").textContent = "not signed in";
    showLogin(reason);
  }

  function start(agentsAnswer) {
    state.running = true;
    $("login").hidden = true;
    $("board").hidden = false;
    $("signout").hidden = !state.token; // open mode: nobody signs in
    showAgents(agentsAnswer);
    connect();
    pollAudit();
    loadDead();
    const every = (ms, job) => state.timers.push(setInterval(job, ms));
    every(AGENTS_EVERY, loadAgents);
    every(AUDIT_EVERY, pollAudit);
    every(DEAD_EVERY, loadDead);
    every(1000, drawChart);
    drawChart();
  }

  // The websocket

  function setLink(up, title) {
    const link = $("link");
    link.textContent = up ? "live" : "offline";
    link.className = up ? "pill on" : "pill off";
    link.title = title || "";
  }

  function send(frame) {
    if (state.socket && state.socket.readyState === WebSocket.OPEN) {
      state.socket.send(JSON.stringify(frame));
    }
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const query = state.token ? `?access_token=${enc(state.token)}` : "";
    const socket = new WebSocket(`${scheme}://${location.host}/ws${query}`);
    state.socket = socket;
    socket.onmessage = (event) => onFrame(JSON.parse(event.data));
    socket.onclose = (event) => {
      if (state.socket !== socket) return;
      const reason = `closed ${event.code}${event.reason ? ": " + event.reason : ""}`;
      setLink(false, reason);
      if (!state.running) return;
      if (event.code === 4401) {
        signOut(`the bridge closed the connection: ${event.reason || "the token was refused"}`);
        return;
      }
      // 4008: we read too slowly (a busy tab); 1001: the bridge stopped.  Come back.
      setTimeout(() => { if (state.running) connect(); }, state.backoff);
      state.backoff = Math.min(state.backoff * 2, 15000);
    };
  }

  function onFrame(frame) {
    switch (frame.type) {
      case "welcome":
        state.backoff = 1000;
        $("principal").textContent = `signed in as ${frame.principal}`;
        setLink(true, "connected");
        send({op: "subscribe", id: "agents", agents: true});
        loadAgents(); // what changed while we were away
        {
          // After a reconnection the bridge holds nothing for us: ask again for what it held.
          const again = state.patterns.length ? state.patterns : patternsTyped();
          state.patterns = [];
          subscribe(again);
        }
        break;
      case "subscribed":
        if (state.pending.has(frame.id)) subscribed(frame.id);
        break;
      case "message":
        onMessage(frame);
        break;
      case "agent":
        onAgentEvent(frame);
        break;
      case "error":
        if (state.pending.has(frame.id)) {
          state.pending.delete(frame.id);
          const held = state.patterns.length ? state.patterns.join(", ") : "nothing";
          $("filter-state").textContent = `refused: ${frame.error} (still subscribed to ${held})`;
          $("filter-state").className = "error";
        } else {
          toast(frame.error, true);
        }
        break;
    }
  }

  // The message stream

  function patternsTyped() {
    return $("topics").value.split(/[\s,]+/).filter(Boolean);
  }

  // Subscribes to the new patterns first and lets go of the old ones once that is granted, so
  // a refused filter leaves the stream as it was.
  function subscribe(patterns) {
    if (!patterns.length) return;
    const id = `topics-${state.nextOp++}`;
    state.pending.set(id, patterns);
    send({op: "subscribe", id, topics: patterns});
  }

  function subscribed(id) {
    const patterns = state.pending.get(id);
    state.pending.delete(id);
    const dropped = state.patterns.filter((p) => !patterns.includes(p));
    if (dropped.length) send({op: "unsubscribe", id: `drop-${id}`, topics: dropped});
    state.patterns = patterns;
    $("filter-state").textContent = `subscribed to ${patterns.join(", ")}`;
    $("filter-state").className = "muted";
  }

  function bucket(second) {
    let counts = state.buckets.get(second);
    if (!counts) {
      counts = {passed: 0, denied: 0};
      state.buckets.set(second, counts);
    }
    return counts;
  }

  function onMessage(frame) {
    bucket(Math.floor(Date.now() / 1000)).passed += 1;
    const redacted = frame.redacted && frame.redacted.length ? frame.redacted : null;
    const from = frame.on_behalf_of ? `${frame.on_behalf_of} via ${frame.sender}` : frame.sender;
    const row = el("li", {className: redacted ? "redacted" : "", "data-topic": frame.topic},
      el("div", {className: "head"},
        redacted ? el("span", {className: "tag redacted"}, "redacted") : null,
        el("span", {className: "topic"}, frame.topic),
        el("span", {className: "from"}, `from ${from || "?"}`),
        el("span", {className: "time"}, clock(frame.timestamp ? new Date(frame.timestamp) : new Date()))),
      el("div", {className: "payload"}, short(frame.payload)),
      redacted ? el("div", {className: "why"}, `masked by the gateway: ${redacted.join(", ")}`) : null);
    if (redacted && frame.audit_id) {
      state.redactedRows.set(frame.audit_id, row);
      if (state.redactedRows.size > FEED_SIZE) {
        state.redactedRows.delete(state.redactedRows.keys().next().value);
      }
    }
    queue(row);
  }

  function onDenied(entry) {
    const record = entry.record;
    const who = record.delegated_by ? `${record.principal} via ${record.delegated_by}` : record.principal;
    queue(el("li", {className: "denied", "data-topic": record.topic},
      el("div", {className: "head"},
        el("span", {className: "tag denied"}, "denied"),
        el("span", {className: "topic"}, record.topic),
        el("span", {className: "from"}, `from ${who || record.agent || "?"}`),
        el("span", {className: "time"}, clock(new Date(record.time * 1000)))),
      el("div", {className: "why"}, `${record.stage || "gateway"}: ${record.reason || "denied"}`)));
  }

  function queue(row) {
    if (state.paused) {
      state.hidden += 1;
      $("stream-count").textContent = `paused, ${state.hidden} not shown`;
      return;
    }
    state.feed.push(row);
    // A hidden tab draws no frames: keep only what the list would show.
    if (state.feed.length > FEED_SIZE) state.feed.shift();
    if (state.feed.length === 1) requestAnimationFrame(drawFeed);
  }

  // Drawn once a frame, however fast messages come.
  function drawFeed() {
    const list = $("messages");
    const rows = state.feed.splice(0).slice(-FEED_SIZE).reverse();
    list.prepend(...rows);
    while (list.children.length > FEED_SIZE) list.lastChild.remove();
    $("stream-count").textContent = `${list.children.length} shown`;
  }

  function togglePause() {
    state.paused = !state.paused;
    state.hidden = 0;
    $("pause").textContent = state.paused ? "Resume" : "Pause";
    $("stream-count").textContent = state.paused ? "paused" : "";
  }

  // Agents

  function showAgents(answer) {
    if (!answer.ok) {
      $("agents-error").textContent = why(answer);
      return;
    }
    $("agents-error").textContent = "";
    state.agents = new Map();
    for (const agent of answer.body.agents) setAgent(agent);
    drawAgents();
  }

  function setAgent(agent) {
    state.agents.set(agent.agent, new Map(agent.instances.map((i) => [i.instance, i])));
  }

  async function loadAgents() {
    if (state.running) showAgents(await api("GET", "/agents"));
  }

  async function loadAgent(id) {
    const answer = await api("GET", `/agents/${enc(id)}`);
    if (answer.ok) setAgent(answer.body);
    else if (answer.status === 404) state.agents.delete(id);
    drawAgents();
  }

  function onAgentEvent(frame) {
    const instances = state.agents.get(frame.agent) || new Map();
    if (frame.event === "leave") {
      instances.delete(frame.instance);
    } else if (frame.record) {
      instances.set(frame.instance, frame.record);
    }
    if (instances.size) state.agents.set(frame.agent, instances);
    else state.agents.delete(frame.agent);
    drawAgents();
  }

  async function control(agent, behaviour, command, button) {
    button.disabled = true;
    const path = `/agents/${enc(agent)}/behaviours/${enc(behaviour)}/${command}`;
    const answer = await api("POST", path);
    if (!answer.ok) {
      toast(`${command} ${agent} ${behaviour}: ${why(answer)}`, true);
    } else {
      const failed = answer.body.instances.filter((i) => !i.ok);
      if (failed.length) {
        toast(`${command} ${agent} ${behaviour}: ${failed.map((i) => `${i.instance}: ${i.error}`).join("; ")}`, true);
      } else {
        toast(`${command} ${agent} ${behaviour}: ${answer.body.instances.length} instance(s) answered`);
      }
    }
    await loadAgent(agent);
  }

  function drawAgents() {
    const box = $("agents");
    const names = [...state.agents.keys()].sort();
    $("agents-count").textContent = `${names.length} you may see`;
    const sections = names.map((name) => {
      const instances = [...state.agents.get(name).values()];
      const behaviours = new Map(); // name -> {kind, states: [[instance, state]]}
      for (const instance of instances) {
        for (const b of instance.behaviours) {
          if (!behaviours.has(b.name)) behaviours.set(b.name, {kind: b.kind, states: []});
          behaviours.get(b.name).states.push([instance.instance, b.state]);
        }
      }
      const rows = [...behaviours].map(([behaviour, info]) => {
        const running = info.states.filter(([, s]) => s === "running").length;
        const stop = el("button", {type: "button", className: "stop", disabled: running === 0}, "Stop");
        const go = el("button", {type: "button", className: "start", disabled: running === info.states.length}, "Start");
        stop.onclick = () => control(name, behaviour, "stop", stop);
        go.onclick = () => control(name, behaviour, "start", go);
        return el("tr", {"data-behaviour": behaviour},
          el("td", {className: "name"}, behaviour),
          el("td", {className: "kind"}, info.kind),
          el("td", {className: "states"}, ...info.states.map(([instance, s]) =>
            el("span", {className: `state ${s}`, title: `instance ${instance}`, "data-instance": instance}, s))),
          el("td", {className: "actions"}, stop, " ", go));
      });
      const capabilities = [...new Set(instances.flatMap((i) => i.capabilities))];
      return el("div", {className: "agent", "data-agent": name},
        el("h3", {}, name, " ",
          el("span", {className: "muted"}, capabilities.length ? `· ${capabilities.join(", ")}` : "")),
        el("div", {className: "instances"}, instances.map((i) =>
          `${i.instance} on ${i.host}:${i.pid}${i.version ? " v" + i.version : ""}${i.alive ? "" : " (lease lapsed)"}`).join(" · ")),
        el("table", {className: "behaviours"}, el("tbody", {}, ...rows)));
    });
    box.replaceChildren(...(sections.length ? sections : [el("p", {className: "muted"}, "no agents you may see")]));
  }

  // The audit trail

  const entryMs = (entry) => Number(entry.id.split("-")[0]);
  // Seconds with the half millisecond: the bridge turns them back into exactly this millisecond.
  const seconds = (ms) => ((ms + 0.5) / 1000).toFixed(4);

  async function readAudit() {
    const first = state.auditCursor === null;
    const since = first ? null : state.auditCursor - AUDIT_OVERLAP;
    const fresh = [];
    let until = null;
    for (let page = 0; page < (first ? 1 : AUDIT_PAGES); page += 1) {
      const query = new URLSearchParams({limit: first ? "100" : "500"});
      if (since !== null) query.set("since", seconds(since));
      if (until !== null) query.set("until", seconds(until));
      const answer = await api("GET", `/audit?${query}`);
      if (!answer.ok) throw new Error(why(answer));
      const records = answer.body.records;
      for (const entry of records) {
        const key = `${entry.chain}/${entry.id}`;
        if (!state.auditSeen.has(key)) {
          state.auditSeen.set(key, entryMs(entry));
          fresh.push(entry);
        }
      }
      if (first || answer.body.complete || !records.length) break;
      // The rest is older: until is exclusive, so the oldest's millisecond is read again.
      const next = entryMs(records[records.length - 1]) + 1;
      if (until !== null && next >= until) break;
      until = next;
    }
    return fresh;
  }

  async function pollAudit() {
    if (pollAudit.busy || !state.running) return;
    pollAudit.busy = true;
    try {
      const fresh = await readAudit();
      $("audit-error").textContent = "";
      if (!fresh.length) return;
      state.auditCursor = Math.max(state.auditCursor || 0, ...fresh.map(entryMs));
      const oldest = state.auditCursor - AUDIT_OVERLAP - 1000;
      for (const [key, ms] of state.auditSeen) if (ms < oldest) state.auditSeen.delete(key);
      fresh.sort((a, b) => entryMs(a) - entryMs(b)); // oldest first: each goes on top
      for (const entry of fresh) onAudit(entry);
    } catch (error) {
      $("audit-error").textContent = `the audit trail: ${error.message}`;
    } finally {
      pollAudit.busy = false;
    }
  }

  function onAudit(entry) {
    const record = entry.record;
    const findings = (record.findings || []).map((f) => `${f.kind} at ${f.path}`).join(", ");
    const reason = record.reason || findings;
    const who = record.delegated_by ? `${record.principal} via ${record.delegated_by}` : (record.principal || record.user || "");
    const rows = $("audit");
    rows.prepend(el("tr", {className: record.decision, "data-decision": record.decision},
      el("td", {className: "nowrap"}, clock(new Date(record.time * 1000))),
      el("td", {className: "decision nowrap"}, record.decision),
      el("td", {className: "nowrap"}, who),
      el("td", {className: "mono"}, record.topic),
      el("td", {}, record.stage || ""),
      el("td", {}, reason)));
    while (rows.children.length > AUDIT_SIZE) rows.lastChild.remove();
    if (record.decision === "denied") {
      bucket(Math.floor(record.time)).denied += 1;
      if (state.patterns.some((p) => matches(p, record.topic))) onDenied(entry);
    }
    const row = state.redactedRows.get(`${entry.chain}/${entry.id}`);
    if (row && record.decision === "redacted") {
      const kinds = [...new Set((record.findings || []).map((f) => f.kind))].join(", ");
      if (kinds) row.querySelector(".why").textContent += ` (${kinds})`;
    }
  }

  // Dead letters

  async function loadDead() {
    if (!state.running) return;
    const answer = await api("GET", "/dead");
    const status = $("dead-state");
    if (answer.status === 403 || answer.status === 404 || answer.status === 405) {
      status.textContent = answer.status === 403
        ? "not shown: the policy does not let you redrive dead letters"
        : "not available: this bridge serves no dead letters (GET /dead)";
      status.className = "muted";
      $("dead-table").hidden = true;
      return;
    }
    if (!answer.ok) {
      status.textContent = `dead letters: ${why(answer)}`;
      status.className = "error";
      return;
    }
    $("dead-table").hidden = false;
    const letters = answer.body.dead_letters;
    status.textContent = letters.length ? "" : "no dead letters";
    status.className = "muted";
    $("dead-count").textContent = letters.length ? `${letters.length}` : "";
    $("dead").replaceChildren(...letters.slice().reverse().map((dead) => {
      const again = Boolean(dead.redriven);
      const button = el("button", {type: "button", className: "redrive"},
        again ? "Redrive again" : "Redrive");
      button.onclick = () => redrive(dead.id, button, again);
      return el("tr", {"data-dead": dead.id},
        el("td", {className: "mono"}, String(dead.id)),
        el("td", {}, dead.filed_at ? clock(new Date(dead.filed_at)) : ""),
        el("td", {className: "mono"}, dead.topic),
        el("td", {className: "mono"}, dead.queue),
        el("td", {}, dead.reason),
        el("td", {}, button));
    }));
  }

  async function redrive(id, button, again) {
    button.disabled = true;
    const answer = await api("POST", `/dead/${enc(id)}/redrive${again ? "?again=true" : ""}`);
    if (answer.ok) toast(`dead letter ${id} redriven`);
    else toast(`redrive ${id}: ${why(answer)}`, true);
    await loadDead();
  }

  // The chart: passed and denied per second over the last minute, on a canvas.

  function drawChart() {
    const canvas = $("chart");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || canvas.width;
    const height = canvas.clientHeight || canvas.height;
    if (canvas.width !== Math.round(width * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    const now = Math.floor(Date.now() / 1000) - 1; // the last whole second
    for (const second of state.buckets.keys()) if (second < now - WINDOW * 2) state.buckets.delete(second);
    const seconds = Array.from({length: WINDOW}, (_, i) => now - WINDOW + 1 + i);
    const series = (kind) => seconds.map((s) => (state.buckets.get(s) || {})[kind] || 0);
    const passed = series("passed");
    const denied = series("denied");
    const top = niceMax(Math.max(1, ...passed, ...denied));
    const left = 34, right = 6, up = 6, down = 16;
    const x = (i) => left + (i / (WINDOW - 1)) * (width - left - right);
    const y = (v) => up + (1 - v / top) * (height - up - down);
    g.font = "10px system-ui, sans-serif";
    g.fillStyle = "#6b7280";
    g.strokeStyle = "#e3e6eb";
    g.lineWidth = 1;
    for (const v of [0, top / 2, top]) {
      g.beginPath();
      g.moveTo(left, y(v) + 0.5);
      g.lineTo(width - right, y(v) + 0.5);
      g.stroke();
      g.fillText(String(Math.round(v * 10) / 10), 4, y(v) + 3);
    }
    g.fillText("-60 s", left, height - 3);
    g.fillText("now", width - right - 20, height - 3);
    const line = (values, colour) => {
      g.strokeStyle = colour;
      g.lineWidth = 2;
      g.beginPath();
      values.forEach((v, i) => (i ? g.lineTo(x(i), y(v)) : g.moveTo(x(i), y(v))));
      g.stroke();
    };
    line(passed, "#1a9a5a");
    line(denied, "#d2393b");
    const sum = (values) => values.reduce((a, b) => a + b, 0);
    $("rate-passed").textContent = String(passed[passed.length - 1]);
    $("rate-denied").textContent = String(denied[denied.length - 1]);
    $("sum-passed").textContent = String(sum(passed));
    $("sum-denied").textContent = String(sum(denied));
  }

  function niceMax(value) {
    const step = 10 ** Math.floor(Math.log10(value));
    return [1, 2, 5, 10].map((m) => m * step).find((m) => m >= value);
  }

  // Wiring

  $("login").addEventListener("submit", signIn);
  $("signout").addEventListener("click", () => signOut(""));
  $("filter").addEventListener("submit", (event) => {
    event.preventDefault();
    subscribe(patternsTyped());
  });
  $("pause").addEventListener("click", togglePause);
  window.addEventListener("resize", drawChart);
  begin();
})();
