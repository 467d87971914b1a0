// dynvm's dashboard: polls the service's JSON every second and updates the page in place
// (rows are kept by key, so focus and a half-typed filter survive an update). The token,
// when the service asks for one, lives in sessionStorage and goes out as a bearer header;
// it is never put in a URL. The server decides what a token may do; the page only asks.
"use strict";

(() => {
  const POLL_MS = 1000;
  const PLOTS_MS = 30000;
  const TIMEOUT_MS = 4000;
  const EXTEND_MINUTES = 60;
  const TOKEN_KEY = "dynvm-token";
  // Okabe-Ito: told apart by colour-blind readers too
  const COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"];

  const $ = (id) => document.getElementById(id);
  const state = {
    offset: 0, // server clock minus ours, seconds
    page: 0,
    pageSize: 50,
    total: 0,
    user: "",
    os: "",
    span: "24h",
    lastOk: null,
    authRequired: false,
    plots: {},
    osColour: {},
    busy: new Set(), // leases whose release or extend is on its way: their buttons stay disabled
    dismissed: false, // the token dialog was closed without a token: do not open it again by itself
    again: false, // a refresh was asked for while one ran: run another after it
  };

  class Unreachable extends Error {}
  class NeedsToken extends Error {}

  // -- talking to the service ------------------------------------------------------------

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  async function api(path, options = {}) {
    const headers = { Accept: "application/json", ...(options.headers || {}) };
    const used = token();
    if (used) headers.Authorization = `Bearer ${used}`;
    let answer;
    try {
      answer = await fetch(path, { ...options, headers, signal: AbortSignal.timeout(TIMEOUT_MS) });
    } catch (e) {
      throw new Unreachable(e.name === "TimeoutError" ? "no answer within 4 s" : "the connection failed");
    }
    if (answer.status === 401) {
      const error = new NeedsToken(await problem(answer));
      error.token = used; // a refusal of a token since replaced says nothing of the new one
      throw error;
    }
    if (!answer.ok) {
      const error = new Error(await problem(answer));
      error.status = answer.status;
      throw error;
    }
    return answer.json();
  }

  async function problem(answer) {
    try {
      const body = await answer.json();
      return body.detail || body.title || `HTTP ${answer.status}`;
    } catch {
      return `HTTP ${answer.status}`;
    }
  }

  // -- formatting --------------------------------------------------------------------------

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }

  function seconds(value) {
    if (value === null || value === undefined) return "–";
    if (value < 1) return `${Math.round(value * 1000)} ms`;
    return value < 100 ? `${value.toFixed(1)} s` : duration(value);
  }

  // an axis label: 50ms, 2s, 5m
  function short(value) {
    if (value < 1) return value ? `${Math.round(value * 1000)}ms` : "0";
    return value < 60 ? `${value}s` : `${Math.round(value / 60)}m`;
  }

  function gib(bytes) {
    return `${(bytes / 2 ** 30).toFixed(bytes >= 100 * 2 ** 30 ? 0 : 1)} GiB`;
  }

  // "1 VM", "2 VMs", "0 VMs"
  function plural(n, one, many = `${one}s`) {
    return `${n} ${n === 1 ? one : many}`;
  }

  function now() {
    return Date.now() / 1000 + state.offset;
  }

  function clock(unix) {
    return new Date(unix * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function colour(os) {
    if (!(os in state.osColour)) state.osColour[os] = COLOURS[Object.keys(state.osColour).length % COLOURS.length];
    return state.osColour[os];
  }

  // -- keeping rows in place -----------------------------------------------------------------

  // Replace a table body's rows with one per item, reusing the row of the same key, and
  // touching a cell only when its text changed (so a focused button stays focused).
  function syncRows(tbody, items, key, cells) {
    const old = new Map([...tbody.rows].map((row) => [row.dataset.key, row]));
    const labels = [...(tbody.parentElement.tHead?.rows[0]?.cells || [])].map((th) => th.textContent.trim());
    let previous = null;
    for (const item of items) {
      const k = key(item);
      let row = old.get(k);
      old.delete(k);
      if (!row) {
        row = document.createElement("tr");
        row.dataset.key = k;
      }
      const values = cells(item, row);
      values.forEach((value, n) => {
        let cell = row.cells[n];
        if (!cell) {
          cell = row.insertCell(n);
          cell.dataset.label = labels[n] || ""; // a phone shows each cell under its column's name
        }
        if (value instanceof Node) {
          if (!cell.firstChild || !cell.firstChild.isEqualNode(value)) cell.replaceChildren(value);
          cell.className = value.dataset?.cell || "";
        } else if (value && typeof value === "object") {
          if (cell.innerHTML !== value.html) cell.innerHTML = value.html;
          if (value.className !== undefined) cell.className = value.className;
        } else if (cell.textContent !== String(value)) {
          cell.textContent = String(value);
        }
      });
      const next = previous ? previous.nextSibling : tbody.firstChild;
      if (next !== row) tbody.insertBefore(row, next);
      previous = row;
    }
    for (const row of old.values()) row.remove();
  }

  // Set an element's text only when it changes: a live region is announced on every change.
  function say(element, text) {
    if (element.textContent !== text) element.textContent = text;
  }

  function escape(text) {
    const div = document.createElement("div");
    div.textContent = text ?? "";
    return div.innerHTML;
  }

  // -- the first screen ------------------------------------------------------------------------

  function renderOverview(data) {
    state.authRequired = data.auth.required;
    const s = data.summary;
    say(
      $("summary"),
      `${s.hosts_up} of ${plural(s.hosts, "host")} up · ${plural(s.leased, "VM")} leased · ${s.ready} ready in pools` +
        (s.refilling ? ` (${s.refilling} being made)` : ""),
    );
    say($("who"), data.auth.user ? `signed in as ${data.auth.user}${data.auth.admin ? " (admin)" : ""}` : "");
    $("sign-in").hidden = Boolean(token());
    $("sign-out").hidden = !token();

    syncRows($("hosts").tBodies[0], data.hosts, (h) => h.ref, (h) => {
      const vcpus = Math.round(h.cpus * h.overcommit);
      const otherMemory = Math.max(0, h.memory_total - h.memory_free - h.dynvm.memory);
      const membersOut = (h.members_out || [])
        .map((m) => `<span class="why">${escape(m.name)} ${escape(m.reason)}</span>`)
        .join("");
      const stateCell = h.up
        ? { html: `<span class="state-up">up</span>${membersOut}`, className: "" }
        : h.same_pool_as
        ? { html: `<span class="state-same">same pool</span><span class="why">${escape(h.error)}</span>`, className: "" }
        : {
            html: `<span class="state-down">${escape(h.state)}</span><span class="why">${escape(h.error)}</span>`,
            className: "",
          };
      const cpu =
        `<span class="legend-dynvm">${h.dynvm.vcpus}</span> / <span class="legend-others">${h.others.vcpus}</span>` +
        ` / ${vcpus}` + bar(h.dynvm.vcpus, h.others.vcpus, vcpus);
      const memory =
        `<span class="legend-dynvm">${gib(h.dynvm.memory)}</span> / <span class="legend-others">${gib(otherMemory)}</span>` +
        ` / ${gib(h.memory_free)} free` + bar(h.dynvm.memory, otherMemory, h.memory_total);
      const room = Object.entries(h.capacity).map(([os, n]) => `${os} ${n}`).join(", ") || "–";
      return [
        { html: `<strong>${escape(h.ref)}</strong> ${escape(h.name)}<span class="why">${escape(h.url)}</span>` },
        stateCell,
        { html: cpu },
        { html: memory },
        room,
      ];
    });

    const pools = data.pools;
    $("pools").hidden = pools.length === 0;
    $("pools-empty").hidden = pools.length > 0;
    syncRows($("pools").tBodies[0], pools, (p) => p.os, (p) => [
      p.os,
      `${p.ready} / ${p.target}`,
      p.refilling,
      p.handed_out,
      p.recycled,
      p.sizing === "learned" && p.forecast
        ? `learned (${p.forecast.rate_per_hour.toFixed(1)} VMs/h)`
        : p.sizing,
    ]);
  }

  function bar(dynvm, others, total) {
    if (!total) return "";
    const pct = (x) => Math.min(100, Math.max(0, (100 * x) / total)).toFixed(1);
    return (
      `<span class="bar" aria-hidden="true"><span class="dynvm" style="width:${pct(dynvm)}%"></span>` +
      `<span class="others" style="width:${pct(others)}%"></span></span>`
    );
  }

  function renderQueue(data) {
    const items = data.items;
    $("queue").hidden = items.length === 0;
    $("queue-empty").hidden = items.length > 0;
    syncRows($("queue").tBodies[0], items, (q) => q.id, (q) => [
      q.position ?? "–",
      q.user,
      q.os,
      q.count,
      duration(q.age_seconds),
      q.eta ? `${clock(Date.parse(q.eta) / 1000)} (in ${duration(q.eta_seconds)})` : "not known yet",
    ]);
    const error = data.eta_error;
    const pct = (x) => `${Math.round(x * 100)} %`;
    $("eta-error").textContent = error && error.samples
      ? `ETA error over the last day: ${pct(error.p50)} median, ${pct(error.p90)} at p90 ` +
        `(${error.samples} request${error.samples === 1 ? "" : "s"} that waited)`
      : "ETA error: no request has waited in the last day.";
  }

  function renderLeases(data) {
    state.total = data.total;
    const select = $("filter-os");
    const wanted = ["", ...new Set([...data.oses, ...(state.os ? [state.os] : [])])].sort(); // the chosen OS stays
    if ([...select.options].map((o) => o.value).join() !== wanted.join()) {
      const chosen = select.value;
      select.replaceChildren(...wanted.map((os) => new Option(os || "any", os)));
      select.value = wanted.includes(chosen) ? chosen : "";
    }
    if (data.total && data.offset >= data.total) {
      // releases emptied this page: go to the last one that has leases
      state.page = Math.floor((data.total - 1) / state.pageSize);
      state.again = true;
    }
    syncRows($("lease-table").tBodies[0], data.items, (l) => l.name, (l, row) => {
      row.dataset.expires = l.expires_at;
      row.dataset.created = l.handed_out_at || l.created_at;
      return [
        l.name,
        l.caller || l.username,
        l.os,
        l.host,
        l.ip || "–",
        { html: `<span data-age>${duration(now() - (l.handed_out_at || l.created_at))}</span>` },
        { html: `<span data-left>${duration(l.expires_at - now())}</span>` },
        l.from_pool ? "ready pool" : "made for it",
        actions(l),
      ];
    });
    const first = data.total ? data.offset + 1 : 0;
    const last = Math.min(data.total, data.offset + data.items.length);
    say($("page-info"), `${first}–${last} of ${data.total.toLocaleString()}`);
    $("prev").disabled = data.offset === 0;
    $("next").disabled = last >= data.total;
  }

  function actions(lease) {
    const cell = document.createElement("span");
    cell.dataset.cell = "actions";
    const busy = state.busy.has(lease.name);
    const release = document.createElement("button");
    release.type = "button";
    release.dataset.action = "release";
    release.dataset.name = lease.name;
    release.textContent = "Release";
    release.setAttribute("aria-label", `Release ${lease.name}`);
    release.disabled = busy;
    const extend = document.createElement("button");
    extend.type = "button";
    extend.dataset.action = "extend";
    extend.dataset.name = lease.name;
    extend.textContent = `+${EXTEND_MINUTES} min`;
    extend.setAttribute("aria-label", `Extend ${lease.name} by ${EXTEND_MINUTES} minutes`);
    extend.disabled = busy;
    cell.append(release, extend);
    return cell;
  }

  // The countdowns move every second between polls.
  function tick() {
    for (const row of $("lease-table").tBodies[0].rows) {
      const left = Number(row.dataset.expires) - now();
      const leftCell = row.querySelector("[data-left]");
      if (leftCell) {
        leftCell.textContent = duration(left);
        leftCell.classList.toggle("soon", left < 600);
      }
      const age = row.querySelector("[data-age]");
      if (age) age.textContent = duration(now() - Number(row.dataset.created));
    }
    if (state.lastOk) say($("updated"), `updated ${clock(state.lastOk)}`);
  }

  // -- the plots -------------------------------------------------------------------------------

  function plotWidth(element) {
    return Math.max(280, element.clientWidth || element.parentElement.clientWidth || 600);
  }

  function drawPlot(id, options, data) {
    const element = $(id);
    if (typeof uPlot === "undefined") {
      element.innerHTML = '<p class="note">The plot library is missing from this installation: build the wheel where npm is available (docs/DEPLOY.md).</p>';
      return;
    }
    state.plots[id]?.destroy();
    element.replaceChildren();
    state.plots[id] = new uPlot({ width: plotWidth(element), height: 220, ...options }, data, element);
  }

  function renderUsage(data) {
    const oses = Object.keys(data.series);
    if (!oses.length) {
      state.plots["usage-plot"]?.destroy();
      delete state.plots["usage-plot"];
      $("usage-plot").innerHTML = '<p class="note">No VM in use in this span.</p>';
      return;
    }
    const latest = oses.map((os) => `${os} ${data.series[os].at(-1)}`).join(", ");
    const peaks = oses.map((os) => `${os} ${Math.max(...data.series[os])}`).join(", ");
    $("usage-plot").setAttribute(
      "aria-label",
      `VMs in use per OS over the last ${data.span === "7d" ? "7 days" : "24 hours"}: now ${latest}; at most ${peaks}`,
    );
    drawPlot(
      "usage-plot",
      {
        series: [{}, ...oses.map((os) => ({ label: os, stroke: colour(os), width: 2 }))],
        scales: { y: { range: (u, min, max) => [0, Math.max(1, max)] } },
        axes: [{}, { label: "VMs" }],
      },
      [data.times, ...oses.map((os) => data.series[os])],
    );
  }

  function renderDistribution(id, table, figures, edges) {
    const oses = Object.keys(figures).filter((os) => figures[os].n > 0);
    syncRows($(table).tBodies[0], oses, (os) => os, (os) => [
      os,
      figures[os].n,
      seconds(figures[os].p50),
      seconds(figures[os].p95),
    ]);
    if (!oses.length) {
      state.plots[id]?.destroy();
      delete state.plots[id];
      $(id).innerHTML = '<p class="note">Nothing in the last 7 days.</p>';
      return;
    }
    const xs = edges.map((_, n) => n);
    const share = (os) => figures[os].counts.map((c) => (100 * c) / figures[os].n);
    const position = (value) => {
      // where a value falls on the bin axis (bins are uneven: interpolate inside its bin)
      let n = 0;
      while (n + 1 < edges.length && edges[n + 1] <= value) n++;
      const width = n + 1 < edges.length ? edges[n + 1] - edges[n] : edges[n];
      return n + Math.min(1, (value - edges[n]) / width);
    };
    drawPlot(
      id,
      {
        series: [{}, ...oses.map((os) => ({ label: os, stroke: colour(os), width: 2, paths: uPlot.paths.stepped({ align: 1 }) }))],
        scales: { x: { time: false }, y: { range: (u, min, max) => [0, Math.max(10, max)] } },
        axes: [
          { values: (u, ticks) => ticks.map((t) => (Number.isInteger(t) && t < edges.length ? short(edges[t]) : "")) },
          { label: "% of requests" },
        ],
        hooks: {
          draw: [
            (u) => {
              // p50 (dashed) and p95 (dotted) of each OS, in its colour
              const ctx = u.ctx;
              ctx.save();
              oses.forEach((os) => {
                [["p50", [6, 4]], ["p95", [2, 3]]].forEach(([key, dash]) => {
                  if (figures[os][key] === null) return;
                  const x = u.valToPos(position(figures[os][key]), "x", true);
                  ctx.strokeStyle = colour(os);
                  ctx.setLineDash(dash);
                  ctx.lineWidth = 1.5;
                  ctx.beginPath();
                  ctx.moveTo(x, u.bbox.top);
                  ctx.lineTo(x, u.bbox.top + u.bbox.height);
                  ctx.stroke();
                });
              });
              ctx.restore();
            },
          ],
        },
      },
      [xs, ...oses.map(share)],
    );
  }

  function renderUsers(users) {
    syncRows($("users").tBodies[0], users, (u) => u.user, (u) => [u.user, u.vm_hours.toFixed(1), u.vms]);
  }

  function renderFailures(found) {
    for (const [table, group] of [["failures", "create_failed"], ["refusals", "refused"]]) {
      const rows = found.filter((f) => f.group === group);
      $(table).hidden = rows.length === 0;
      $(`${table}-empty`).hidden = rows.length > 0;
      syncRows($(table).tBodies[0], rows, (f) => f.reason, (f) => [
        f.label,
        f.count,
        `${clock(f.last_at)}: ${f.last_error}`,
      ]);
    }
  }

  async function refreshPlots() {
    try {
      const [usage, timings, users, failures] = await Promise.all([
        api(`/api/v1/dashboard/usage?span=${state.span}`),
        api("/api/v1/dashboard/timings"),
        api("/api/v1/dashboard/users"),
        api("/api/v1/dashboard/failures"),
      ]);
      renderUsage(usage);
      renderDistribution("ttv-plot", "ttv-table", timings.time_to_vm, timings.edges);
      renderDistribution("create-plot", "create-table", timings.create, timings.edges);
      renderUsers(users);
      renderFailures(failures);
    } catch (e) {
      plotsDue = Date.now() + 2000; // try again soon, not in 30 s
      handle(e);
    }
  }

  // -- the loop ----------------------------------------------------------------------------------

  function leasesPath() {
    const query = new URLSearchParams({ limit: state.pageSize, offset: state.page * state.pageSize });
    if (state.user) query.set("user", state.user);
    if (state.os) query.set("os", state.os);
    return `/api/v1/dashboard/leases?${query}`;
  }

  let polling = false;
  let plotsDue = 0;

  async function refresh() {
    if (polling) {
      state.again = true;
      return;
    }
    polling = true;
    state.again = false;
    const asked = token();
    try {
      const [overview, leases, queue] = await Promise.all([
        api("/api/v1/dashboard/overview"),
        api(leasesPath()),
        api("/api/v1/dashboard/queue"),
      ]);
      if (token() !== asked) {
        // signed out (or in as someone else) while it was asked: what the old token may see is never shown
        state.again = true;
        return;
      }
      state.offset = overview.time - Date.now() / 1000;
      renderOverview(overview);
      renderLeases(leases);
      renderQueue(queue);
      state.lastOk = overview.time;
      $("banner").hidden = true;
      if (Date.now() >= plotsDue) {
        plotsDue = Date.now() + PLOTS_MS;
        refreshPlots();
      }
    } catch (e) {
      handle(e);
    } finally {
      polling = false;
      if (state.again) refresh();
    }
  }

  function handle(error) {
    const banner = $("banner");
    if (error instanceof Unreachable) {
      const since = state.lastOk ? ` What you see is from ${clock(state.lastOk)}.` : "";
      say(banner, `dynvm at ${location.host} is unreachable (${error.message}); retrying every second.${since}`);
    } else if (error instanceof NeedsToken) {
      if (error.token !== token()) return; // asked with a token since replaced: the next refresh tells
      say(
        banner,
        token()
          ? `This token was refused (${error.message}). Sign in with another.`
          : "This dynvm asks for an API token: use “Sign in with a token” to see the lab.",
      );
      $("sign-in").hidden = false;
      if (!state.dismissed) askForToken(error.message);
    } else {
      say(banner, `dynvm answered with an error: ${error.message}`);
    }
    banner.hidden = false;
  }

  // -- signing in --------------------------------------------------------------------------------

  function askForToken(why) {
    const dialog = $("token-dialog");
    if (dialog.open) return;
    if (why) $("token-why").textContent = `${why}. A token (dynvm token create) is kept only for this tab's session.`;
    $("token-input").value = "";
    dialog.showModal();
    $("token-input").focus();
  }

  function setUp() {
    $("token-form").addEventListener("submit", () => {
      const value = $("token-input").value.trim();
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      state.dismissed = false;
      plotsDue = 0;
      refresh();
    });
    $("token-cancel").addEventListener("click", () => $("token-dialog").close());
    $("token-dialog").addEventListener("cancel", () => {
      state.dismissed = true; // Escape
    });
    $("token-cancel").addEventListener("click", () => {
      state.dismissed = true;
    });
    $("sign-in").addEventListener("click", () => {
      state.dismissed = false;
      askForToken("");
    });
    $("sign-out").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      $("who").textContent = "";
      state.dismissed = false;
      for (const body of document.querySelectorAll("tbody")) body.replaceChildren(); // nothing shown without a token
      refresh();
    });

    let typing;
    $("filter-user").addEventListener("input", (event) => {
      clearTimeout(typing);
      typing = setTimeout(() => {
        state.user = event.target.value.trim();
        state.page = 0;
        refresh();
      }, 250);
    });
    $("filter-os").addEventListener("change", (event) => {
      state.os = event.target.value;
      state.page = 0;
      refresh();
    });
    $("filters").addEventListener("submit", (event) => event.preventDefault());
    $("prev").addEventListener("click", () => {
      state.page = Math.max(0, state.page - 1);
      refresh();
    });
    $("next").addEventListener("click", () => {
      state.page += 1;
      refresh();
    });
    for (const radio of document.querySelectorAll('input[name="span"]')) {
      radio.addEventListener("change", (event) => {
        state.span = event.target.value;
        plotsDue = 0;
        refresh();
      });
    }

    $("lease-table").addEventListener("click", async (event) => {
      const button = event.target.closest("button[data-action]");
      if (!button) return;
      const name = button.dataset.name;
      const action = button.dataset.action;
      const status = $("status");
      if (state.busy.has(name)) return;
      try {
        if (action === "release") {
          if (!confirm(`Release ${name}? Its VM and disks are destroyed.`)) return;
          state.busy.add(name);
          button.disabled = true;
          status.textContent = `Releasing ${name}…`;
          await api(`/api/v1/leases/${encodeURIComponent(name)}`, { method: "DELETE" });
          status.textContent = `Released ${name}.`;
          status.focus(); // its row is gone: the focus goes to what happened
        } else {
          const row = button.closest("tr");
          const left = Math.max(0, Number(row.dataset.expires) - now()) / 60;
          state.busy.add(name);
          button.disabled = true;
          const lease = await api(`/api/v1/leases/${encodeURIComponent(name)}`, {
            method: "PATCH",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ expires_in_minutes: left + EXTEND_MINUTES }),
          });
          row.dataset.expires = lease.expires_at;
          status.textContent = `${name} now expires at ${clock(lease.expires_at)}.`;
        }
      } catch (e) {
        if (e instanceof NeedsToken) {
          status.textContent = `Sign in to ${action} ${name}.`;
          state.dismissed = false;
          askForToken(e.message);
        } else {
          status.textContent = `Could not ${action} ${name}: ${e.message}`;
        }
      } finally {
        state.busy.delete(name);
        button.disabled = false; // as the next answer draws it: the same button stays, focus and all
        refresh();
      }
    });

    window.addEventListener("resize", () => {
      for (const [id, plot] of Object.entries(state.plots)) plot.setSize({ width: plotWidth($(id)), height: 220 });
    });
  }

  setUp();
  refresh();
  setInterval(refresh, POLL_MS);
  setInterval(tick, 1000); // the countdowns move between answers, slow or not
})();
