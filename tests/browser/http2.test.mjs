// More than six live SSE streams from one page, over HTTP/2: a real headless Chromium
// (Debian's /usr/bin/chromium, driven by playwright-core) against a real `eventqueue serve
// --tls-cert --tls-key` with a self-signed certificate made by openssl for this run.
//
// Over HTTP/1.1 a browser opens at most six connections per origin, so a seventh EventSource
// never connects; over HTTP/2 (which browsers speak only over TLS) all streams share one
// connection. Checks: the page was loaded over h2 (ALPN); eight EventSource streams of one
// page, to eight queues, all receive their `connected` frame, then each the event published
// to its queue from outside the browser. Chromium trusts the certificate through
// --ignore-certificate-errors; the test's own requests trust it as their CA.
//
// Server log: $CI_ARTIFACTS (default target/ci-artifacts/http2).
//
// Environment: EVENTQUEUE_BIN (default $CARGO_TARGET_DIR or target, then release/eventqueue),
// CHROMIUM (default /usr/bin/chromium). Exits 1 on any failure.

import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const TARGET = process.env.CARGO_TARGET_DIR || path.join(ROOT, 'target');
const BIN = process.env.EVENTQUEUE_BIN || path.join(TARGET, 'release', 'eventqueue');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const OUT = process.env.CI_ARTIFACTS || path.join(ROOT, 'target', 'ci-artifacts', 'http2');
// Generous: a condition that holds is seen within a second or two; this only bounds a hang.
const WAIT_MS = 30000;
// More than HTTP/1.1's six connections per origin.
const STREAMS = 8;

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

// One request to the server, trusting its certificate; resolves to [status, parsed body].
function request(base, ca, method, route, body) {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : JSON.stringify(body);
    const req = https.request(base + route, {
      method,
      ca,
      headers: data ? { 'Content-Type': 'application/json' } : {},
    }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (c) => { text += c; });
      res.on('end', () => resolve([res.statusCode, text ? JSON.parse(text) : null]));
    });
    req.on('error', reject);
    req.end(data);
  });
}

async function api(base, ca, method, route, body) {
  const [status, answer] = await request(base, ca, method, route, body);
  if (status >= 300) throw new Error(`${method} ${route}: ${status} ${JSON.stringify(answer)}`);
  return answer;
}

async function main() {
  check(fs.existsSync(BIN), `no eventqueue binary at ${BIN} (cargo build --release first)`);
  check(fs.existsSync(CHROMIUM), `no Chromium at ${CHROMIUM} (apt-get install chromium)`);
  fs.mkdirSync(OUT, { recursive: true });
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'eventqueue-http2-'));
  const cert = path.join(tmp, 'cert.pem');
  const key = path.join(tmp, 'key.pem');
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', key, '-out', cert, '-days', '1', '-subj', '/CN=127.0.0.1',
    '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost',
    '-addext', 'basicConstraints=critical,CA:FALSE',
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  const ca = fs.readFileSync(cert);

  const port = await freePort();
  const base = `https://127.0.0.1:${port}`;
  const logPath = path.join(OUT, 'server.log');
  const out = fs.openSync(logPath, 'w');
  const server = spawn(BIN, [
    'serve', '--data-dir', path.join(tmp, 'data'), '--bind', `127.0.0.1:${port}`,
    '--tls-cert', cert, '--tls-key', key,
  ], { stdio: ['ignore', out, out], env: { ...process.env, RUST_LOG: 'info' } });
  fs.closeSync(out);
  const exited = () => server.exitCode !== null || server.signalCode !== null;
  let browser;
  try {
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      if (exited()) throw new Error(`server exited; see ${logPath}`);
      try {
        const [status] = await request(base, ca, 'GET', '/healthz');
        if (status === 200) break;
      } catch (_) {
        // not listening yet
      }
      if (Date.now() > deadline) throw new Error(`server did not start; see ${logPath}`);
      await sleep(100);
    }
    log(`server on ${base}`);

    const tasks = Array.from({ length: STREAMS }, (_, i) => `h2-stream-${i}`);
    for (const task of tasks) await api(base, ca, 'POST', '/events/queues', { task_id: task });

    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: [
        '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync',
        // The certificate is self-signed: trusted for this run only.
        '--ignore-certificate-errors',
      ],
    });
    const page = await browser.newPage();
    const problems = [];
    // Errors of the page, and failed responses (but the favicon the browser asks for on its
    // own; the console's "Failed to load resource" lines repeat the responses, with no URL).
    page.on('console', (m) => {
      if (m.type() === 'error' && !/^Failed to load resource/.test(m.text())) problems.push(m.text());
    });
    page.on('pageerror', (e) => problems.push(e.message));
    page.on('response', (r) => {
      if (r.status() >= 400 && !r.url().endsWith('/favicon.ico')) {
        problems.push(`${r.status()} from ${r.url()}`);
      }
    });
    await page.goto(base + '/healthz');
    const protocol = await page.evaluate(
      () => performance.getEntriesByType('navigation')[0].nextHopProtocol);
    check(protocol === 'h2', `the page was loaded over h2 (ALPN), got ${protocol}`);
    log('page loaded over h2');

    // Eight streams from one page, each recording its frames.
    await page.evaluate((tasks) => {
      window.streams = tasks.map((task) => {
        const s = { task, connected: false, events: [] };
        const es = new EventSource(`/events/workflows/${task}`);
        es.addEventListener('connected', () => { s.connected = true; });
        es.addEventListener('status', (e) => s.events.push(JSON.parse(e.data)));
        s.es = es;
        return s;
      });
    }, tasks);
    await page.waitForFunction(
      (n) => window.streams.filter((s) => s.connected).length === n, STREAMS,
      { timeout: WAIT_MS },
    ).catch(async () => {
      const open = await page.evaluate(() => window.streams.filter((s) => s.connected).length);
      throw new Error(`only ${open} of ${STREAMS} streams connected`);
    });
    log(`${STREAMS} streams connected`);

    for (const task of tasks) {
      await api(base, ca, 'POST', `/events/queues/${task}/events`,
        { event_type: 'status', state: 'working', message: `hello ${task}` });
    }
    await page.waitForFunction(
      (n) => window.streams.filter((s) => s.events.some((e) => e.message === `hello ${s.task}`)).length === n,
      STREAMS, { timeout: WAIT_MS },
    ).catch(async () => {
      const got = await page.evaluate(() => window.streams.filter((s) => s.events.length > 0).length);
      throw new Error(`only ${got} of ${STREAMS} streams received their event`);
    });
    log(`all ${STREAMS} streams received their live event`);
    const info = await api(base, ca, 'GET', `/events/queues/${tasks[0]}`);
    check(info.subscriber_count === 1, `one subscriber per queue, got ${info.subscriber_count}`);
    check(problems.length === 0, 'page errors:\n  ' + problems.join('\n  '));
    log('PASS');
  } finally {
    if (browser) await browser.close().catch(() => {});
    if (!exited()) {
      const gone = new Promise((r) => server.once('exit', r));
      server.kill('SIGKILL');
      await gone;
    }
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error('FAIL: ' + (e && e.stack ? e.stack : e));
  process.exit(1);
});
