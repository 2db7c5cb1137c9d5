// The dashboard in a real headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core) against a real `eventqueue serve`: a built binary on a temporary data
// directory and a free loopback port.
//
// Checks, in token mode: the list shows a queue created through the API; posting progress
// moves its bar; the queue page shows events arriving live; after the server is killed
// (SIGKILL) and restarted on the same port and data directory the page resumes without
// duplicate or missing events; the cancel button cancels (queue info shows it); a gap notice
// and the final result are rendered. In open mode: the tenant field selects the tenant, and
// closing a queue ends the page's stream. A tenant with 10,000 queues: the list shows its first
// page (newest activity first) quickly — the time is printed, and bounded generously since CI
// machines are noisy — "Show more" adds a page, and the search box and the kind / state
// toggles narrow the list on the server. No console errors or uncaught page errors anywhere
// (but the failed requests the browser logs while the server is down).
//
// Screenshots of every page go to $CI_ARTIFACTS (default target/ci-artifacts/dashboard).
//
// Environment: EVENTQUEUE_BIN (default $CARGO_TARGET_DIR or target, then release/eventqueue),
// CHROMIUM (default /usr/bin/chromium). Exits 1 on any failure.

import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const TARGET = process.env.CARGO_TARGET_DIR || path.join(ROOT, 'target');
const BIN = process.env.EVENTQUEUE_BIN || path.join(TARGET, 'release', 'eventqueue');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const OUT = process.env.CI_ARTIFACTS || path.join(ROOT, 'target', 'ci-artifacts', 'dashboard');
// Generous: a condition that holds is seen within a second or two; this only bounds a hang.
const WAIT_MS = 30000;
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

const started = Date.now();
function log(msg) {
  console.log(`[${((Date.now() - started) / 1000).toFixed(1)}s] ${msg}`);
}

function check(cond, msg) {
  if (!cond) throw new Error('check failed: ' + msg);
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// One `eventqueue serve` process.
class Server {
  constructor({ dataDir, port, secretFile, logName, extraArgs }) {
    this.extraArgs = extraArgs || [];
    this.dataDir = dataDir;
    this.port = port;
    this.secretFile = secretFile;
    this.logPath = path.join(OUT, logName);
    this.base = `http://127.0.0.1:${port}`;
    this.proc = null;
  }

  async start() {
    const args = ['serve', '--data-dir', this.dataDir, '--bind', `127.0.0.1:${this.port}`];
    if (this.secretFile) args.push('--jwt-secret-file', this.secretFile);
    args.push(...this.extraArgs);
    const out = fs.openSync(this.logPath, 'a');
    this.proc = spawn(BIN, args, {
      stdio: ['ignore', out, out],
      env: { ...process.env, RUST_LOG: 'info' },
    });
    fs.closeSync(out);
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      if (this.exited()) {
        const how = this.proc.exitCode ?? this.proc.signalCode;
        throw new Error(`server exited (${how}); see ${this.logPath}`);
      }
      try {
        const r = await fetch(this.base + '/healthz');
        if (r.ok) return;
      } catch (_) {
        // not listening yet
      }
      if (Date.now() > deadline) throw new Error(`server did not start; see ${this.logPath}`);
      await sleep(100);
    }
  }

  exited() {
    return !this.proc || this.proc.exitCode !== null || this.proc.signalCode !== null;
  }

  async kill() {
    if (this.exited()) return;
    const exited = new Promise((r) => this.proc.once('exit', r));
    this.proc.kill('SIGKILL');
    await exited;
  }
}

// A client of the API, for the producer side of the test.
function apiClient(server, { token, tenant }) {
  return async (method, route, body) => {
    const headers = { 'Content-Type': 'application/json' };
    if (token) headers.Authorization = 'Bearer ' + token;
    if (tenant) headers['X-Tenant-ID'] = tenant;
    const r = await fetch(server.base + route, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await r.text();
    if (!r.ok) throw new Error(`${method} ${route}: ${r.status} ${text}`);
    return text ? JSON.parse(text) : null;
  };
}

function waitFor(page, fn, arg, what) {
  return page.waitForFunction(fn, arg, { timeout: WAIT_MS }).catch((e) => {
    throw new Error(`timed out waiting for ${what}: ${e.message.split('\n')[0]}`);
  });
}

async function shot(page, name) {
  const file = path.join(OUT, name);
  await page.screenshot({ path: file, fullPage: true });
  log(`screenshot ${file}`);
}

// The offsets the queue page's timeline shows, in order.
function timelineOffsets(page) {
  return page.$$eval('#timeline li.ev', (lis) => lis.map((li) => Number(li.dataset.offset)));
}

// Waits for the list to hold exactly `want` (task ids, in order); returns how long that took.
async function listShows(page, want, what) {
  const t = Date.now();
  await waitFor(page, (w) => {
    const tasks = [...document.querySelectorAll('#queues li.queue')].map((li) => li.dataset.task);
    return JSON.stringify(tasks) === JSON.stringify(w);
  }, want, what);
  return Date.now() - t;
}

const pad = (i) => 'q-' + String(i).padStart(5, '0');

// A tenant of 10,000 queues in the open-mode server, on `page`.
async function bigTenant(server, page) {
  const N = 10000;
  const KINDS = ['workflow', 'ingestion', 'task'];
  const big = apiClient(server, { tenant: 'big' });
  let next = 0;
  let t = Date.now();
  await Promise.all(Array.from({ length: 32 }, async () => {
    while (next < N) {
      const i = next++;
      await big('POST', '/events/queues', { task_id: pad(i), kind: KINDS[i % 3] });
    }
  }));
  log(`created ${N} queues of tenant big in ${Date.now() - t} ms`);
  // One queue in each state but running; then q-00007 is the most recently active.
  await big('POST', '/events/queues/q-00042/events', { event_type: 'complete', result: {} });
  await big('POST', '/events/workflows/q-00043/cancel', { reason: 'test' });
  await big('POST', '/events/queues/q-00044/close');
  await big('POST', '/events/queues/q-00007/events', { event_type: 'progress', current: 1, total: 2 });
  const size = async (query) => {
    const r = await fetch(server.base + '/events/queues' + query, { headers: { 'X-Tenant-ID': 'big' } });
    return (await r.arrayBuffer()).byteLength;
  };
  log(`one list poll: ${await size('?limit=50')} bytes paged, ${await size('')} bytes for the whole list`);

  // The first page: 50 queues, newest activity first. (The queues were created concurrently,
  // so their creation order is the server's to say.)
  const [firstPage, cursor] = await serverPage(server, 'limit=50');
  check(firstPage[0] === pad(7), `the most recently active queue first, got ${firstPage[0]}`);
  await page.goto(server.base + '/#/');
  await page.fill('#tenant', 'big');
  t = Date.now();
  await page.click('#conn button[type=submit]');
  await listShows(page, firstPage, 'the first page of tenant big');
  const connectMs = Date.now() - t;
  t = Date.now();
  await page.reload();
  await listShows(page, firstPage, 'the first page of tenant big after a reload');
  const loadMs = Date.now() - t;
  log(`10,000 queues: first page shown ${connectMs} ms after Connect, ${loadMs} ms after a page load`);
  // The issue asks for 1 s; CI machines are noisy, so only a hang or a full-list download fails.
  check(connectMs < 5000 && loadMs < 5000, 'the first page of 10,000 queues within 5 s');
  check(!(await page.isHidden('#more')), 'a "Show more" button');
  check(/50 queues shown; more match/.test(await page.textContent('#list-count')), 'the count line');
  await shot(page, 'list-10k.png');

  await page.click('#more');
  const [secondPage] = await serverPage(server, 'limit=50&cursor=' + cursor);
  const twoPages = firstPage.concat(secondPage);
  check(new Set(twoPages).size === 100, 'two pages of distinct queues');
  await listShows(page, twoPages, 'a second page after "Show more"');
  log('"Show more" added the second page');

  // The search box narrows the list on the server.
  await page.fill('#search', 'q-0999');
  const [nines] = await serverPage(server, 'limit=50&task_id_prefix=q-0999');
  check(JSON.stringify(nines.slice().sort().reverse()) ===
    JSON.stringify(Array.from({ length: 10 }, (_, i) => pad(9999 - i))), `q-0999*, got ${nines}`);
  const searchMs = await listShows(page, nines, 'the list narrowed to q-0999*');
  log(`search "q-0999" narrowed 10,000 queues to 10 in ${searchMs} ms (with the search box's 200 ms typing pause)`);
  check(searchMs < 5000, 'the search narrows the list within 5 s');
  check(await page.isHidden('#more'), 'no "Show more" when everything is shown');
  await page.fill('#search', 'nothing-like-this');
  await waitFor(page, () => !document.getElementById('list-empty').hidden &&
    /match the filter/.test(document.getElementById('list-empty').textContent), null, 'the no-match note');
  await page.fill('#search', '');
  await listShows(page, firstPage, 'the first page again without a search');

  // Kind and state toggles.
  await page.click('button.toggle[data-kind="workflow"]');
  await waitFor(page, () => {
    const lis = [...document.querySelectorAll('#queues li.queue')];
    return lis.length === 50 && lis[0].dataset.task === 'q-00042' &&
      lis.every((li) => li.querySelector('.badge.kind').textContent === 'workflow');
  }, null, 'workflows only');
  check(await page.getAttribute('button.toggle[data-kind="workflow"]', 'aria-pressed') === 'true',
    'the toggle says it is pressed');
  await page.click('button.toggle[data-state="finished"]');
  await listShows(page, [pad(42)], 'finished workflows');
  await page.click('button.toggle[data-kind="workflow"]');
  await page.click('button.toggle[data-state="cancelled"]');
  await page.click('button.toggle[data-state="closed"]');
  const [settled] = await serverPage(server, 'limit=10&state=finished,cancelled,closed');
  check(JSON.stringify(settled.slice().sort()) === JSON.stringify([pad(42), pad(43), pad(44)]),
    `the server's finished, cancelled and closed queues, got ${JSON.stringify(settled)}`);
  await listShows(page, settled, 'finished, cancelled and closed queues');
  await shot(page, 'list-10k-filtered.png');
  for (const st of ['finished', 'cancelled', 'closed']) await page.click(`button.toggle[data-state="${st}"]`);
  await page.click('button.toggle[data-state="running"]');
  await waitFor(page, () => {
    const tasks = [...document.querySelectorAll('#queues li.queue')].map((li) => li.dataset.task);
    return tasks.length === 50 && tasks[0] === 'q-00007' && !tasks.some((t) => ['q-00042', 'q-00043', 'q-00044'].includes(t));
  }, null, 'running queues only');
  log('search box, kind and state toggles narrow the list');
}

// A page of tenant big's list straight from the server: its task ids and next cursor.
async function serverPage(server, query) {
  const r = await fetch(`${server.base}/events/queues?${query}`, { headers: { 'X-Tenant-ID': 'big' } });
  check(r.ok, `GET /events/queues?${query}: ${r.status}`);
  const page = await r.json();
  return [page.queues.map((q) => q.task_id), page.next_cursor];
}

async function main() {
  check(fs.existsSync(BIN), `no eventqueue binary at ${BIN} (cargo build --release first)`);
  check(fs.existsSync(CHROMIUM), `no Chromium at ${CHROMIUM} (apt-get install chromium)`);
  fs.mkdirSync(OUT, { recursive: true });
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'eventqueue-dashboard-'));
  const secretFile = path.join(tmp, 'jwt.secret');
  fs.writeFileSync(secretFile, 'dashboard-browser-test-secret-0123456789abcdef\n', { mode: 0o600 });
  const token = execFileSync(BIN, [
    'token', '--jwt-secret-file', secretFile, '--tenant', 'acme',
    '--scope', 'subscribe publish', '--ttl', '1h',
  ]).toString().trim();

  const servers = [];
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
  });
  const problems = [];
  // Console errors and uncaught exceptions of every page, each with what the test was doing.
  // While the server is down (killed, until the page is live again) the browser itself logs
  // the failed requests (connection refused, the cut stream): those and only those are
  // expected.
  let phase = 'start';
  function watch(page) {
    page.on('console', (m) => {
      if (m.type() !== 'error') return;
      if (phase === 'server down' && /^Failed to load resource: net::ERR_/.test(m.text())) return;
      problems.push(`[${phase}] console error: ${m.text()}`);
    });
    page.on('pageerror', (e) => problems.push(`[${phase}] page error: ${e.message}`));
  }

  try {
    // ---- token mode ------------------------------------------------------------------
    const port = await freePort();
    const server = new Server({
      dataDir: path.join(tmp, 'data'), port, secretFile, logName: 'server-token.log',
    });
    servers.push(server);
    await server.start();
    log(`server (token mode) on ${server.base}`);
    const api = apiClient(server, { token });

    await api('POST', '/events/queues', { task_id: 'wf-alpha', kind: 'workflow' });
    await api('POST', '/events/queues/wf-alpha/events', {
      events: [
        { event_type: 'status', state: 'working', phase: 'planning', message: 'started' },
        { event_type: 'progress', current: 1, total: 4, step: 'search' },
      ],
    });

    const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
    const page = await context.newPage();
    watch(page);
    phase = 'list';
    await page.goto(server.base + '/');
    // Without a token the page says what it needs.
    await waitFor(page, () => /token/.test(document.getElementById('notice').textContent),
      null, 'the token-mode notice');
    // Keyboard only: focus the token field, type, Enter submits the form.
    await page.focus('#token');
    await page.keyboard.type(token);
    await page.keyboard.press('Enter');
    const bar = (task) => `li[data-task="${task}"] progress`;
    await waitFor(page, (sel) => {
      const p = document.querySelector(sel);
      return p && p.value === 25;
    }, bar('wf-alpha'), 'wf-alpha at 25% in the list');
    log('list shows wf-alpha at 25%');
    check(await page.textContent('li[data-task="wf-alpha"]').then((t) => t.includes('working')),
      'the list shows the state');
    check(await page.evaluate(() => sessionStorage.getItem('eventqueue.token') !== null),
      'the token is kept in sessionStorage');

    await api('POST', '/events/queues/wf-alpha/events',
      { event_type: 'progress', current: 3, total: 4, step: 'rank' });
    await waitFor(page, (sel) => {
      const p = document.querySelector(sel);
      return p && p.value === 75;
    }, bar('wf-alpha'), 'wf-alpha to move to 75%');
    log('posting progress moved the bar to 75%');
    await shot(page, 'list-laptop.png');
    await page.setViewportSize({ width: 390, height: 844 });
    await shot(page, 'list-phone.png');
    await page.setViewportSize({ width: 1280, height: 860 });

    // ---- the queue page, live ----------------------------------------------------------
    phase = 'queue page';
    // Keyboard: a focused link keeps its focus while the list refreshes, and Enter opens it.
    await page.focus('li[data-task="wf-alpha"] a.qlink');
    const polled = await page.textContent('#list-status');
    await waitFor(page, (before) => document.getElementById('list-status').textContent !== before,
      polled, 'the next poll of the list');
    check(await page.evaluate(() => document.activeElement.matches('li[data-task="wf-alpha"] a.qlink')),
      'the focused link keeps its focus across a poll');
    await page.keyboard.press('Enter');
    await waitFor(page, () => document.querySelectorAll('#timeline li.ev').length === 3,
      null, 'the three retained events');
    await api('POST', '/events/queues/wf-alpha/events', {
      events: [
        { event_type: 'artifact', artifact_type: 'report', data: { title: 'draft <b>1</b>', pages: [1, 2] } },
        {
          event_type: 'error', error_type: 'Timeout', error_message: 'search backend slow',
          context: { retry: 1 }, recoverable: true,
        },
      ],
    });
    await waitFor(page, () => document.querySelectorAll('#timeline li.ev').length === 5,
      null, 'live events 3 and 4');
    const artifactPre = await page.textContent('#timeline li[data-offset="3"] pre');
    check(artifactPre.includes('"title": "draft <b>1</b>"'),
      `artifact data pretty-printed and escaped, got ${artifactPre}`);
    check(await page.$('#timeline li[data-offset="3"] b') === null, 'event data is not HTML');
    check((await page.textContent('#timeline li[data-offset="4"]')).includes('search backend slow'),
      'the error is shown');
    check(await page.$eval('#queue-progress', (p) => p.value) === 75, 'page progress bar at 75%');
    log('queue page shows events arriving live');

    // ---- kill -9 and restart -----------------------------------------------------------
    phase = 'server down';
    await server.kill();
    log('server killed (SIGKILL)');
    await waitFor(page, () => /reconnecting/.test(document.getElementById('stream-status').textContent),
      null, 'the page to notice the disconnect');
    await server.start();
    log('server restarted on the same port and data directory');
    await waitFor(page, () => /^live/.test(document.getElementById('stream-status').textContent),
      null, 'the page to reconnect');
    phase = 'server restarted';
    await api('POST', '/events/queues/wf-alpha/events', {
      events: [
        { event_type: 'status', state: 'working', phase: 'writing', message: 'after restart' },
        { event_type: 'progress', current: 4, total: 4, step: 'write' },
      ],
    });
    await waitFor(page, () => document.querySelectorAll('#timeline li.ev').length >= 7,
      null, 'events 5 and 6 after the restart');
    // More live events once the stream is back, then the complete list must be 0..=7.
    await api('POST', '/events/queues/wf-alpha/events',
      { event_type: 'artifact', artifact_type: 'summary', data: { words: 1200 } });
    await waitFor(page, () => document.querySelectorAll('#timeline li.ev').length >= 8,
      null, 'event 7');
    // One stream delivers in offset order, so a duplicate replayed on the reconnect would
    // already be on the page before event 7.
    const offsets = await timelineOffsets(page);
    check(JSON.stringify(offsets) === JSON.stringify([0, 1, 2, 3, 4, 5, 6, 7]),
      `timeline after restart must be offsets 0..=7 exactly once, got ${JSON.stringify(offsets)}`);
    check(await page.$eval('#queue-progress', (p) => p.value) === 100, 'page progress bar at 100%');
    log('after the restart the page resumed without duplicates or holes');

    // ---- cancel ------------------------------------------------------------------------
    phase = 'cancel';
    await page.fill('#cancel-reason', 'stopped from the dashboard');
    await page.focus('#cancel-button');
    await page.keyboard.press('Enter');
    await waitFor(page, () => /cancellation requested/i.test(document.getElementById('cancel-status').textContent),
      null, 'the cancel confirmation');
    const info = await api('GET', '/events/queues/wf-alpha');
    check(info.is_cancelled === true, 'queue info says cancelled');
    check(info.cancel_reason === 'stopped from the dashboard', `cancel reason, got ${info.cancel_reason}`);
    await waitFor(page, () => document.querySelector('#queue-flags .flag.cancelled') !== null,
      null, 'the cancelled badge');
    // The producer sees the token and reports it: the stream ends on the terminal status.
    await api('POST', '/events/queues/wf-alpha/events',
      { event_type: 'status', state: 'cancelled', message: 'stopped by user' });
    await waitFor(page, () => /finished/.test(document.getElementById('stream-status').textContent),
      null, 'the stream to end on the terminal event');
    check(await page.textContent('#queue-state') === 'cancelled', 'state badge says cancelled');
    await waitFor(page, () => getComputedStyle(document.getElementById('cancel-form')).display === 'none', null,
      'the cancel form to go once the task finished');
    log('the cancel button cancelled the task (queue info shows it)');
    await shot(page, 'queue-laptop.png');
    await page.setViewportSize({ width: 390, height: 844 });
    await shot(page, 'queue-phone.png');
    await page.setViewportSize({ width: 1280, height: 860 });

    // ---- gap notice and final result ---------------------------------------------------
    phase = 'gap and result';
    await api('POST', '/events/queues', { task_id: 'ingest-7', kind: 'ingestion', max_buffer_size: 3 });
    const events = [];
    for (let i = 1; i <= 5; i++) events.push({ event_type: 'progress', current: i, total: 5, step: `file ${i}` });
    events.push({
      event_type: 'complete', result: { files: 5, index: { name: 'docs', vectors: 5120 } },
      summary: 'ingested 5 files', execution_time_seconds: 12.5,
    });
    await api('POST', '/events/queues/ingest-7/events', { events });
    await page.goto(server.base + '/#/queue/ingest-7');
    await waitFor(page, () => !document.getElementById('result').hidden, null, 'the result panel');
    const gap = await page.textContent('#timeline li.gap');
    check(/Events 0–2 were dropped/.test(gap), `gap notice, got ${gap}`);
    check(JSON.stringify(await timelineOffsets(page)) === '[3,4,5]', 'retained events after the gap');
    const result = await page.textContent('#result-json');
    check(result.includes('"vectors": 5120'), `pretty-printed result, got ${result}`);
    check((await page.textContent('#result-summary')).includes('ingested 5 files'), 'result summary');
    log('gap notice and final result rendered');
    await shot(page, 'queue-gap-result.png');

    // The list shows both queues with their badges.
    phase = 'list again';
    await page.goto(server.base + '/#/');
    await waitFor(page, () => {
      const li = document.querySelector('li[data-task="ingest-7"]');
      return li && li.querySelector('.flag.finished') && li.querySelector('progress').value === 100;
    }, null, 'ingest-7 finished at 100% in the list');
    await waitFor(page, () => {
      const li = document.querySelector('li[data-task="wf-alpha"]');
      return li && li.querySelector('.flag.cancelled') && /cancelled/.test(li.querySelector('[data-role=state]').textContent);
    }, null, 'wf-alpha cancelled in the list');
    await shot(page, 'list-final.png');
    await context.close();
    await server.kill();

    // ---- open mode ---------------------------------------------------------------------
    phase = 'open mode';
    const openServer = new Server({
      dataDir: path.join(tmp, 'data-open'), port: await freePort(), logName: 'server-open.log',
      // Above the 10,000 queues of tenant big: creations racing at the limit can be refused
      // early (a finished creation counts as existing and as in flight for a moment).
      extraArgs: ['--max-queues-per-tenant', '10100'],
    });
    servers.push(openServer);
    await openServer.start();
    log(`server (open mode) on ${openServer.base}`);
    const teamA = apiClient(openServer, { tenant: 'team-a' });
    await teamA('POST', '/events/queues', { task_id: 'job-a' });
    await teamA('POST', '/events/queues/job-a/events', { event_type: 'progress', current: 1, total: 2 });
    const ctx2 = await browser.newContext({ viewport: { width: 1280, height: 700 } });
    const page2 = await ctx2.newPage();
    watch(page2);
    await page2.goto(openServer.base + '/');
    await waitFor(page2, () => !document.getElementById('list-empty').hidden, null,
      'an empty list for tenant default');
    await page2.fill('#tenant', 'team-a');
    await page2.click('#conn button[type=submit]');
    await waitFor(page2, () => {
      const p = document.querySelector('li[data-task="job-a"] progress');
      return p && p.value === 50;
    }, null, 'job-a of tenant team-a at 50%');
    await page2.click('li[data-task="job-a"] a.qlink');
    await waitFor(page2, () => document.querySelectorAll('#timeline li.ev').length === 1, null,
      'job-a timeline over EventSource with ?tenant_id=');
    log('open mode: the tenant field selects the tenant');
    // Closing the queue ends its stream; the page stops instead of reconnecting forever.
    await teamA('POST', '/events/queues/job-a/close');
    await waitFor(page2, () => /queue is closed/.test(document.getElementById('stream-status').textContent),
      null, 'the page to stop following the closed queue');
    await shot(page2, 'open-mode-queue.png');
    // A long stream: the page keeps the newest 2000 entries and says how many it took off.
    await teamA('POST', '/events/queues', { task_id: 'job-long', max_buffer_size: 10000 });
    await page2.goto(openServer.base + '/#/queue/job-long');
    await waitFor(page2, () => /^live/.test(document.getElementById('stream-status').textContent),
      null, 'the job-long stream');
    for (let b = 0; b < 3; b++) {
      const evs = [];
      for (let i = 0; i < 700; i++) evs.push({ event_type: 'progress', current: 1, total: 2, step: `s${b}-${i}` });
      await teamA('POST', '/events/queues/job-long/events', { events: evs });
    }
    await waitFor(page2, () => {
      const last = document.querySelector('#timeline li.ev:last-child');
      return last && last.dataset.offset === '2099';
    }, null, 'the 2100th event on the page');
    const kept = await timelineOffsets(page2);
    check(kept.length === 2000 && kept[0] === 100 && kept[1999] === 2099,
      `the timeline keeps offsets 100..=2099, got ${kept.length} from ${kept[0]} to ${kept[kept.length - 1]}`);
    const trimmedNote = await page2.textContent('#timeline li.trimmed');
    check(/^100 earlier entries/.test(trimmedNote), `note on the entries taken off, got ${trimmedNote}`);
    log('a long stream keeps the page at 2000 entries');
    phase = 'big tenant';
    await bigTenant(openServer, page2);
    await ctx2.close();

    check(problems.length === 0, 'console errors:\n  ' + problems.join('\n  '));
    log('no console errors');
    log('PASS');
  } finally {
    await browser.close().catch(() => {});
    for (const s of servers) await s.kill();
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error('FAIL: ' + (e && e.stack ? e.stack : e));
  process.exit(1);
});
