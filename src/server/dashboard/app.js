// eventqueue dashboard: the queue list and a queue's live page, over the public HTTP API.
//
// Event data only ever reaches the DOM through textContent / attributes set by property,
// never through innerHTML.
//
// Credentials: a token (token mode) is kept in sessionStorage and sent as
// `Authorization: Bearer` on fetches and as `?access_token=` on EventSource (which cannot set
// headers). Without a token (open mode) the tenant field is sent as `X-Tenant-ID` on fetches
// and `?tenant_id=` on EventSource; with a token it is sent as `?tenant_id=`, which only an
// admin token may use.
//
// Live updates of the queue list use short polling of `GET /events/queues` rather than SSE:
// much of what the list shows (subscriber count, cancellation, closed, last activity) is
// queue info that changes without any event, there is no tenant-wide stream, and one
// EventSource per queue would exhaust the browser's six HTTP/1.1 connections per server and
// count against the per-tenant stream limit. The list is paged on the server (newest activity
// first, LIST_PAGE queues a request) and filtered there (task id prefix, kind, state), so a
// poll costs the same for a tenant with ten queues or ten thousand; "Show more" adds a page,
// which later polls follow by cursor. A queue's latest state and progress are then read from
// its own stream only when its latest offset moved, from where the previous read stopped. The queue page uses SSE (EventSource), which resumes
// with Last-Event-ID after a disconnect or a server restart.
'use strict';

(function () {
  const LIST_POLL_MS = 2000;
  // Queues per list request; "Show more" adds this many.
  const LIST_PAGE = 50;
  // Typing in the search box waits this long for the next key before asking the server.
  const SEARCH_DEBOUNCE_MS = 200;
  const INFO_POLL_MS = 3000;
  const RECONNECT_MS = 2000;
  // On first sight of a queue, at most this many recent events are read for its summary.
  const SUMMARY_WINDOW = 1000;
  const SUMMARY_CONCURRENCY = 3;
  const TERMINAL_STATES = ['failed', 'cancelled'];
  const EVENT_TYPES = ['status', 'progress', 'artifact', 'error', 'complete'];

  const $ = (id) => document.getElementById(id);

  // ---- credentials ---------------------------------------------------------------------

  function readSetting(key) {
    try {
      return sessionStorage.getItem(key) || '';
    } catch (_) {
      return '';
    }
  }

  function writeSetting(key, value) {
    try {
      if (value) sessionStorage.setItem(key, value);
      else sessionStorage.removeItem(key);
    } catch (_) {
      // Storage may be disabled; the values then last until the page is left.
    }
  }

  const creds = {
    token: readSetting('eventqueue.token'),
    tenant: readSetting('eventqueue.tenant'),
  };
  // 'open' or 'token', from GET /dashboard/mode; null when unknown.
  let serverMode = null;

  function fetchHeaders(json) {
    const h = {};
    if (creds.token) h.Authorization = 'Bearer ' + creds.token;
    else if (creds.tenant) h['X-Tenant-ID'] = creds.tenant;
    if (json) h['Content-Type'] = 'application/json';
    return h;
  }

  // `path` with the query parameters that carry credentials where headers cannot.
  function withQuery(path, params, forEventSource) {
    const q = new URLSearchParams(params || {});
    if (creds.tenant && (creds.token || forEventSource)) q.set('tenant_id', creds.tenant);
    if (creds.token && forEventSource) q.set('access_token', creds.token);
    const s = q.toString();
    return s ? path + '?' + s : path;
  }

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
      this.detail = detail;
    }
  }

  async function api(method, path, body, params) {
    let resp;
    try {
      resp = await fetch(withQuery(path, params, false), {
        method,
        headers: fetchHeaders(body !== undefined),
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
      });
    } catch (_) {
      throw new ApiError(0, 'server unreachable');
    }
    if (resp.status === 204) return null;
    let data = null;
    try {
      data = await resp.json();
    } catch (_) {
      data = null;
    }
    if (!resp.ok) {
      const detail = data && typeof data.detail === 'string' ? data.detail : resp.statusText;
      throw new ApiError(resp.status, detail);
    }
    return data;
  }

  function explain(err) {
    if (!(err instanceof ApiError)) return String(err);
    if (err.status === 401) {
      return creds.token
        ? 'The token was refused (' + err.detail + '). Paste a valid token above.'
        : 'This server runs in token mode: paste a token above and press Connect.';
    }
    if (err.status === 403) return 'The token lacks the needed scope: ' + err.detail;
    if (err.status === 0) return 'The server is unreachable; retrying.';
    return err.detail + ' (HTTP ' + err.status + ')';
  }

  function showNotice(text) {
    const n = $('notice');
    n.textContent = text || '';
    n.hidden = !text;
  }

  // ---- formatting ----------------------------------------------------------------------

  function ago(ts) {
    const t = Date.parse(ts);
    if (Number.isNaN(t)) return '';
    const s = Math.max(0, Math.round((Date.now() - t) / 1000));
    if (s < 60) return s + ' s ago';
    if (s < 3600) return Math.floor(s / 60) + ' min ago';
    if (s < 86400) return Math.floor(s / 3600) + ' h ago';
    return Math.floor(s / 86400) + ' d ago';
  }

  function when(ts) {
    const d = new Date(ts);
    return Number.isNaN(d.getTime()) ? String(ts) : d.toLocaleString() + ' (' + ago(ts) + ')';
  }

  function clock(ts) {
    const d = new Date(ts);
    return Number.isNaN(d.getTime()) ? '' : d.toLocaleTimeString();
  }

  function pretty(value) {
    try {
      return JSON.stringify(value, null, 2);
    } catch (_) {
      return String(value);
    }
  }

  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function badge(text, className) {
    return el('span', 'badge ' + (className || ''), text);
  }

  function isObject(v) {
    return v !== null && typeof v === 'object' && !Array.isArray(v);
  }

  function isTerminal(ev) {
    return (
      ev.event_type === 'complete' ||
      (ev.event_type === 'error' && ev.recoverable === false) ||
      (ev.event_type === 'status' && TERMINAL_STATES.includes(ev.state))
    );
  }

  // A summary's state after `ev`.
  function stateAfter(state, ev) {
    if (ev.event_type === 'status' && typeof ev.state === 'string') return ev.state;
    if (ev.event_type === 'complete') return 'completed';
    if (ev.event_type === 'error' && ev.recoverable === false) return 'failed';
    return state;
  }

  function stateClass(state) {
    return 's-' + String(state || 'unknown').replace(/[^a-z-]/g, '');
  }

  function progressText(p) {
    if (!p) return 'no progress yet';
    let text = p.current + ' / ' + p.total + ' (' + Math.round(Number(p.percentage) || 0) + '%)';
    if (p.step) text += ' · ' + p.step;
    return text;
  }

  // ---- SSE over fetch (the list's summaries) -------------------------------------------

  // Splits an SSE byte stream into frames {id, event, data}.
  function frameParser(onFrame) {
    let buf = '';
    return (chunk) => {
      buf += chunk.replace(/\r\n?/g, '\n');
      let cut;
      while ((cut = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const frame = { id: null, event: 'message', data: [] };
        for (const line of block.split('\n')) {
          if (!line || line[0] === ':') continue;
          const i = line.indexOf(':');
          const field = i < 0 ? line : line.slice(0, i);
          let value = i < 0 ? '' : line.slice(i + 1);
          if (value[0] === ' ') value = value.slice(1);
          if (field === 'id') frame.id = value;
          else if (field === 'event') frame.event = value;
          else if (field === 'data') frame.data.push(value);
        }
        if (frame.data.length && onFrame(frame) === false) return false;
      }
      return true;
    };
  }

  // Reads the events of `task` from `summary.next` up to the latest offset the stream
  // announces, updating `summary`; then lets the stream go. (While it reads, the queue's
  // subscriber count includes it.)
  async function catchUp(task, summary) {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), 15000);
    try {
      const url = withQuery('/events/workflows/' + encodeURIComponent(task), {
        from_offset: String(summary.next),
      }, false);
      const resp = await fetch(url, { headers: fetchHeaders(false), signal: ctrl.signal, cache: 'no-store' });
      if (resp.status === 204 || !resp.ok || !resp.body) return;
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let target = null;
      const feed = frameParser((frame) => {
        let data;
        try {
          data = JSON.parse(frame.data.join('\n'));
        } catch (_) {
          return true;
        }
        if (frame.event === 'connected') {
          target = Number(data.latest_offset);
          return Number(data.offset) < target;
        }
        if (frame.event === 'gap' || !isObject(data) || typeof data.offset !== 'number') return true;
        summary.state = stateAfter(summary.state, data);
        if (data.event_type === 'progress') summary.progress = data;
        summary.next = data.offset + 1;
        return target === null || summary.next < target;
      });
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        if (!feed(decoder.decode(value, { stream: true }))) break;
      }
    } catch (_) {
      // Aborted or the server went away: the next poll tries again from summary.next.
    } finally {
      clearTimeout(timer);
      ctrl.abort();
    }
  }

  // ---- the queue list ------------------------------------------------------------------

  const list = {
    active: false,
    timer: null,
    summaries: new Map(), // task id -> {next, state, progress, busy}
    items: new Map(), // task id -> <li>
    running: 0,
    waiting: [],
    pages: 1, // pages of LIST_PAGE queues shown
    poll: 0, // number of the latest poll: an older poll's answers are dropped
    filter: { search: '', kinds: new Set(), states: new Set() },
    searchTimer: null,
  };

  // The query of one page of the list, after `cursor` (none: the first page).
  function listParams(cursor) {
    const q = { limit: String(LIST_PAGE) };
    if (cursor) q.cursor = cursor;
    if (list.filter.search) q.task_id_prefix = list.filter.search;
    if (list.filter.kinds.size) q.kind = [...list.filter.kinds].join(',');
    if (list.filter.states.size) q.state = [...list.filter.states].join(',');
    return q;
  }

  function filtering() {
    return Boolean(list.filter.search || list.filter.kinds.size || list.filter.states.size);
  }

  // The filter changed: show the first page of the new list at once.
  function refilter() {
    list.pages = 1;
    if (list.active) pollList();
  }

  function onSearchInput() {
    clearTimeout(list.searchTimer);
    list.searchTimer = setTimeout(() => {
      const value = $('search').value.trim();
      if (value === list.filter.search) return;
      list.filter.search = value;
      refilter();
    }, SEARCH_DEBOUNCE_MS);
  }

  function onFilterSubmit(e) {
    e.preventDefault();
    clearTimeout(list.searchTimer);
    list.filter.search = $('search').value.trim();
    refilter();
  }

  function onToggle(e) {
    const button = e.target.closest('button.toggle');
    if (!button) return;
    const pressed = button.getAttribute('aria-pressed') !== 'true';
    button.setAttribute('aria-pressed', String(pressed));
    const [set, value] = button.dataset.kind
      ? [list.filter.kinds, button.dataset.kind]
      : [list.filter.states, button.dataset.state];
    if (pressed) set.add(value);
    else set.delete(value);
    refilter();
  }

  function onMore() {
    list.pages += 1;
    pollList();
  }

  function startList() {
    list.active = true;
    $('list-view').hidden = false;
    pollList();
  }

  function stopList() {
    list.active = false;
    list.poll += 1;
    clearTimeout(list.timer);
    $('list-view').hidden = true;
  }

  // Reads the pages shown (the first, then each next by its cursor) and renders them. A poll
  // started later (a filter changed, "Show more") supersedes this one: its answers are
  // dropped and it schedules no further poll.
  async function pollList() {
    if (!list.active) return;
    clearTimeout(list.timer);
    const poll = ++list.poll;
    const current = () => list.active && poll === list.poll;
    try {
      const queues = [];
      let cursor = null;
      for (let n = 0; n < list.pages; n++) {
        const page = await api('GET', '/events/queues', undefined, listParams(cursor));
        if (!current()) return;
        if (page && Array.isArray(page.queues)) queues.push(...page.queues);
        cursor = page && typeof page.next_cursor === 'string' ? page.next_cursor : null;
        if (!cursor) break;
      }
      showNotice('');
      $('list-status').textContent = 'updated ' + new Date().toLocaleTimeString();
      renderList(queues, cursor !== null);
    } catch (err) {
      if (!current()) return;
      showNotice(explain(err));
      $('list-status').textContent = '';
    }
    if (current()) list.timer = setTimeout(pollList, LIST_POLL_MS);
  }

  // Shows `queues` in the server's order (newest activity first); `more`: the server has
  // more after them.
  function renderList(queues, more) {
    const ul = $('queues');
    const seen = new Set();
    let index = 0;
    for (const info of queues) {
      const task = String(info.task_id);
      // Pages never repeat a queue, but a list must never hold one twice.
      if (seen.has(task)) continue;
      seen.add(task);
      let s = list.summaries.get(task);
      if (!s || Number(info.latest_offset) < s.next) {
        // New, or deleted and created again: start over.
        s = {
          next: Math.max(Number(info.first_offset) || 0, (Number(info.latest_offset) || 0) - SUMMARY_WINDOW),
          state: null,
          progress: null,
          busy: false,
        };
        list.summaries.set(task, s);
      }
      let li = list.items.get(task);
      if (!li) {
        li = el('li', 'queue');
        li.dataset.task = task;
        list.items.set(task, li);
      }
      if (ul.children[index] !== li) ul.insertBefore(li, ul.children[index] || null);
      index += 1;
      fillItem(li, info, s);
      if (!s.busy && Number(info.latest_offset) > s.next) scheduleSummary(task, s);
    }
    for (const [task, li] of list.items) {
      if (!seen.has(task)) {
        li.remove();
        list.items.delete(task);
        list.summaries.delete(task);
      }
    }
    const empty = $('list-empty');
    empty.textContent = filtering() ? 'No queues match the filter.' : 'No queues for this tenant yet.';
    empty.hidden = seen.size > 0;
    $('more').hidden = !more;
    $('list-count').textContent = seen.size
      ? seen.size + (seen.size === 1 ? ' queue' : ' queues') + (more ? ' shown; more match' : '')
      : '';
  }

  // Builds an item's elements once and then only updates them, so that a focused link keeps
  // its focus across polls.
  function fillItem(li, info, s) {
    if (!li.parts) {
      const head = el('div', 'qhead');
      const link = el('a', 'qlink', info.task_id);
      link.href = '#/queue/' + encodeURIComponent(info.task_id);
      const kind = badge('', 'kind');
      const state = badge('', 'state');
      state.dataset.role = 'state';
      const flags = el('span', 'flags');
      head.append(link, kind, state, flags);
      const row = el('div', 'progress-row');
      const bar = el('progress');
      bar.max = 100;
      bar.setAttribute('aria-label', 'Progress of ' + info.task_id);
      const text = el('span', 'muted');
      row.append(bar, text);
      const meta = el('div', 'muted small');
      li.append(head, row, meta);
      li.parts = { kind, state, flags, bar, text, meta };
    }
    const p = li.parts;
    p.kind.textContent = info.kind;
    const state = s.state || (info.latest_offset > 0 ? 'working' : 'pending');
    p.state.textContent = state;
    p.state.className = 'badge state ' + stateClass(state);
    const flags = [];
    if (info.is_finished) flags.push(badge('finished', 'flag finished'));
    if (info.is_cancelled) flags.push(badge('cancel requested', 'flag cancelled'));
    if (info.is_closed) flags.push(badge('closed', 'flag closed'));
    p.flags.replaceChildren(...flags);
    p.bar.value = s.progress ? Number(s.progress.percentage) || 0 : 0;
    p.text.textContent = progressText(s.progress);
    p.meta.textContent = 'last activity ' + ago(info.last_activity) +
      ' · ' + info.subscriber_count + ' subscriber' + (info.subscriber_count === 1 ? '' : 's') +
      ' · ' + info.latest_offset + ' event' + (info.latest_offset === 1 ? '' : 's');
  }

  function scheduleSummary(task, s) {
    s.busy = true;
    list.waiting.push([task, s]);
    pumpSummaries();
  }

  function pumpSummaries() {
    while (list.running < SUMMARY_CONCURRENCY && list.waiting.length) {
      const [task, s] = list.waiting.shift();
      list.running += 1;
      catchUp(task, s).finally(() => {
        list.running -= 1;
        s.busy = false;
        pumpSummaries();
      });
    }
  }

  // ---- a queue's page ------------------------------------------------------------------

  const page = {
    task: null,
    es: null,
    info: null,
    last: -1, // offset of the last event shown
    ended: false,
    infoTimer: null,
    reconnectTimer: null,
    state: null,
    infoError: null, // HTTP status of the last failed info poll
  };

  function startQueue(task) {
    page.task = task;
    page.last = -1;
    page.ended = false;
    page.info = null;
    page.state = null;
    $('queue-view').hidden = false;
    $('queue-title').textContent = task;
    $('queue-kind').textContent = '';
    $('timeline').replaceChildren();
    $('result').hidden = true;
    $('cancel-status').textContent = '';
    $('cancel-reason').value = '';
    setProgress(null);
    setState(null);
    document.title = task + ' · eventqueue';
    pollInfo().then(() => {
      if (page.task === task && page.info) openStream();
    });
  }

  function stopQueue() {
    page.task = null;
    if (page.es) page.es.close();
    page.es = null;
    clearTimeout(page.infoTimer);
    clearTimeout(page.reconnectTimer);
    $('queue-view').hidden = true;
    document.title = 'eventqueue';
  }

  async function pollInfo() {
    const task = page.task;
    if (!task) return;
    clearTimeout(page.infoTimer);
    try {
      const info = await api('GET', '/events/queues/' + encodeURIComponent(task));
      if (page.task !== task) return;
      page.info = info;
      page.infoError = null;
      showNotice('');
      renderInfo(info);
    } catch (err) {
      if (page.task !== task) return;
      page.infoError = err instanceof ApiError ? err.status : 0;
      showNotice(explain(err));
      if (err.status === 404 && page.es) {
        page.es.close();
        page.es = null;
        page.ended = true;
        setStreamStatus('The queue no longer exists.');
      }
    }
    if (page.task === task) page.infoTimer = setTimeout(pollInfo, INFO_POLL_MS);
  }

  function renderInfo(info) {
    $('queue-kind').textContent = info.kind;
    const flags = $('queue-flags');
    flags.replaceChildren();
    if (info.is_finished) flags.append(badge('finished', 'flag finished'));
    if (info.is_cancelled) flags.append(badge('cancel requested', 'flag cancelled'));
    if (info.is_closed) flags.append(badge('closed', 'flag closed'));
    const meta = $('queue-meta');
    meta.replaceChildren();
    const rows = [
      ['Tenant', info.tenant_id],
      ['Events', info.latest_offset + ' (retained: ' + info.event_count + ', from offset ' + info.first_offset + ')'],
      ['Subscribers', info.subscriber_count],
      ['Created', when(info.created_at)],
      ['Last activity', when(info.last_activity)],
      ['TTL', info.ttl_minutes + ' min after last activity'],
    ];
    if (info.is_cancelled) rows.push(['Cancel reason', info.cancel_reason || '(none given)']);
    for (const [k, v] of rows) {
      const d = el('div');
      d.append(el('dt', null, k), el('dd', null, v));
      meta.append(d);
    }
    // A finished task cannot be cancelled (the server answers 409).
    $('cancel-form').hidden = Boolean(info.is_finished);
    if (info.is_cancelled) {
      $('cancel-status').textContent = 'Cancellation requested: ' + (info.cancel_reason || '(no reason)');
    }
  }

  function setStreamStatus(text) {
    $('stream-status').textContent = text;
  }

  function setProgress(p) {
    const bar = $('queue-progress');
    bar.value = p ? Number(p.percentage) || 0 : 0;
    $('queue-progress-text').textContent = progressText(p);
  }

  function setState(state) {
    const b = $('queue-state');
    b.textContent = state || 'no status yet';
    b.className = 'badge state ' + stateClass(state);
  }

  function openStream() {
    const task = page.task;
    if (!task || page.ended) return;
    const params = page.last >= 0 ? { from_offset: String(page.last + 1) } : {};
    const url = withQuery('/events/workflows/' + encodeURIComponent(task), params, true);
    const es = new EventSource(url);
    page.es = es;
    setStreamStatus('connecting…');
    es.addEventListener('connected', (e) => {
      const data = parse(e.data);
      setStreamStatus(data ? 'live · from offset ' + data.offset : 'live');
    });
    es.addEventListener('gap', (e) => {
      const data = parse(e.data);
      if (data) addGap(data);
    });
    for (const type of EVENT_TYPES) {
      es.addEventListener(type, (e) => {
        // `error` is also the name of EventSource's own connection-error event, which is not
        // a MessageEvent and carries no data.
        if (type === 'error' && !(e instanceof MessageEvent)) return;
        const ev = parse(e.data);
        if (ev) onEvent(ev);
      });
    }
    es.addEventListener('error', (e) => {
      if (e instanceof MessageEvent) return;
      if (page.es !== es) return;
      onStreamError(es);
    });
  }

  function parse(text) {
    try {
      const v = JSON.parse(text);
      return isObject(v) ? v : null;
    } catch (_) {
      return null;
    }
  }

  // A stream error: the server went away, answered with an error, or ended the stream.
  async function onStreamError(es) {
    const task = page.task;
    const gaveUp = es.readyState === EventSource.CLOSED;
    setStreamStatus('disconnected; reconnecting…');
    await pollInfo();
    if (page.task !== task || page.es !== es || page.ended) return;
    const info = page.info;
    if (gaveUp && [401, 403, 404].includes(page.infoError)) {
      // Refused credentials or the queue gone: retrying would not change the answer.
      es.close();
      page.ended = true;
      setStreamStatus('Stream stopped.');
      return;
    }
    if (info && (info.is_closed || info.is_finished) && page.last + 1 >= info.latest_offset) {
      // A closed queue's stream ends and would be reopened forever (a finished one answers
      // 204): stop once everything was shown.
      es.close();
      page.ended = true;
      setStreamStatus(info.is_closed ? 'The queue is closed; every event is shown.'
        : 'The task has finished; the stream has ended.');
      return;
    }
    if (gaveUp) {
      // The browser gave up (a 4xx/5xx answer, e.g. 503 while the server shuts down):
      // reconnect ourselves from the next offset. Otherwise the browser reconnects by
      // itself, with Last-Event-ID.
      clearTimeout(page.reconnectTimer);
      page.reconnectTimer = setTimeout(() => {
        if (page.task === task && page.es === es && !page.ended) openStream();
      }, RECONNECT_MS);
    }
  }

  function onEvent(ev) {
    addEvent(ev);
    if (typeof ev.offset === 'number') page.last = ev.offset;
    page.state = stateAfter(page.state, ev);
    setState(page.state);
    if (ev.event_type === 'progress') setProgress(ev);
    if (ev.event_type === 'complete') showResult(ev);
    if (isTerminal(ev)) {
      page.ended = true;
      if (page.es) page.es.close();
      setStreamStatus('The task has finished; the stream has ended.');
      pollInfo();
    }
  }

  function showResult(ev) {
    $('result').hidden = false;
    let summary = ev.summary ? String(ev.summary) : 'Completed.';
    if (typeof ev.execution_time_seconds === 'number') {
      summary += ' (' + ev.execution_time_seconds + ' s)';
    }
    $('result-summary').textContent = summary;
    $('result-json').textContent = pretty(ev.result);
  }

  // The page keeps the newest TIMELINE_MAX entries, so following a long-running task does not
  // grow the page without bound; a note at the top counts the ones taken off.
  const TIMELINE_MAX = 2000;

  function appendToTimeline(li) {
    const tl = $('timeline');
    tl.append(li);
    let note = tl.querySelector('li.trimmed');
    let excess = tl.children.length - (note ? 1 : 0) - TIMELINE_MAX;
    if (excess <= 0) return;
    if (!note) {
      note = el('li', 'trimmed');
      note.setAttribute('role', 'note');
      tl.prepend(note);
      page.trimmed = 0;
    }
    while (excess-- > 0 && note.nextElementSibling) {
      note.nextElementSibling.remove();
      page.trimmed++;
    }
    note.textContent = page.trimmed + ' earlier entries are no longer shown on this page; ' +
      'the queue still holds what its retention keeps (replay it with eventqueue watch --from N).';
  }

  function addGap(data) {
    const li = el('li', 'gap');
    li.setAttribute('role', 'note');
    const first = Number(data.first_available_offset);
    const req = Number(data.requested_offset);
    li.textContent = 'Events ' + req + '–' + (first - 1) +
      ' were dropped by retention before they could be shown; continuing at offset ' + first + '.';
    appendToTimeline(li);
  }

  function addEvent(ev) {
    const type = String(ev.event_type);
    const li = el('li', 'ev t-' + type.replace(/[^a-z]/g, ''));
    li.dataset.offset = String(ev.offset);
    li.dataset.type = type;
    const head = el('div', 'ev-head');
    head.append(el('span', 'off', '#' + ev.offset), badge(type, 't-' + type.replace(/[^a-z]/g, '')));
    const time = el('time', 'muted', clock(ev.timestamp));
    time.dateTime = String(ev.timestamp || '');
    head.append(time);
    let text = '';
    let body;
    let bodyLabel = '';
    if (type === 'status') {
      text = [ev.state, ev.phase, ev.message].filter(Boolean).join(' · ');
    } else if (type === 'progress') {
      text = progressText(ev);
      if (isObject(ev.details) && Object.keys(ev.details).length) {
        body = ev.details;
        bodyLabel = 'details';
      }
    } else if (type === 'artifact') {
      text = ev.artifact_type + ' ' + ev.artifact_id + (ev.is_partial ? ' (partial)' : '');
      body = ev.data;
      bodyLabel = 'data';
    } else if (type === 'error') {
      text = ev.error_type + ': ' + ev.error_message +
        (ev.error_code ? ' [' + ev.error_code + ']' : '') +
        (ev.recoverable === false ? ' (not recoverable)' : ' (recoverable)');
      if (isObject(ev.context) && Object.keys(ev.context).length) {
        body = ev.context;
        bodyLabel = 'context';
      }
    } else if (type === 'complete') {
      text = ev.summary || 'completed';
      body = ev.result;
      bodyLabel = 'result';
    }
    head.append(el('span', 'ev-text', text));
    li.append(head);
    if (body !== undefined) {
      const pre = el('pre', 'json', pretty(body));
      pre.setAttribute('aria-label', bodyLabel);
      li.append(pre);
    }
    appendToTimeline(li);
  }

  async function onCancel(e) {
    e.preventDefault();
    const task = page.task;
    if (!task) return;
    const reason = $('cancel-reason').value.trim();
    const button = $('cancel-button');
    button.disabled = true;
    $('cancel-status').textContent = 'cancelling…';
    try {
      const r = await api('POST', '/events/workflows/' + encodeURIComponent(task) + '/cancel',
        reason ? { reason } : {});
      $('cancel-status').textContent = (r && r.message) || 'Cancellation requested.';
    } catch (err) {
      $('cancel-status').textContent = explain(err);
    } finally {
      button.disabled = false;
    }
    pollInfo();
  }

  // ---- navigation ----------------------------------------------------------------------

  function route() {
    stopList();
    stopQueue();
    showNotice('');
    if (serverMode === 'token' && !creds.token) {
      // Asked before any API call, so the page never provokes a 401 by itself.
      showNotice('This server runs in token mode: paste a token above and press Connect.');
      return;
    }
    const hash = location.hash || '#/';
    const m = /^#\/queue\/(.+)$/.exec(hash);
    if (m) {
      let task;
      try {
        task = decodeURIComponent(m[1]);
      } catch (_) {
        task = m[1];
      }
      startQueue(task);
    } else {
      startList();
    }
  }

  function showMode() {
    if (serverMode === 'open' && creds.token) {
      $('mode').textContent = 'open mode: the token is not needed';
      return;
    }
    $('mode').textContent = creds.token
      ? 'token mode' + (creds.tenant ? ' · tenant ' + creds.tenant : '')
      : 'open mode · tenant ' + (creds.tenant || 'default');
  }

  function onConnect(e) {
    e.preventDefault();
    creds.tenant = $('tenant').value.trim();
    creds.token = $('token').value.trim();
    writeSetting('eventqueue.tenant', creds.tenant);
    writeSetting('eventqueue.token', creds.token);
    list.summaries.clear();
    for (const li of list.items.values()) li.remove();
    list.items.clear();
    list.pages = 1;
    showMode();
    route();
  }

  function init() {
    $('tenant').value = creds.tenant;
    $('token').value = creds.token;
    $('conn').addEventListener('submit', onConnect);
    $('cancel-form').addEventListener('submit', onCancel);
    $('filters').addEventListener('submit', onFilterSubmit);
    $('filters').addEventListener('click', onToggle);
    $('search').addEventListener('input', onSearchInput);
    $('more').addEventListener('click', onMore);
    window.addEventListener('hashchange', route);
    fetch('/dashboard/mode', { cache: 'no-store' })
      .then((r) => (r.ok ? r.json() : null))
      .catch(() => null)
      .then((m) => {
        serverMode = m && (m.mode === 'open' || m.mode === 'token') ? m.mode : null;
        showMode();
        route();
      });
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
