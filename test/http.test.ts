// Tier 2: the HTTP side of a real server (start --http): the token and the Host check,
// the JSON API as a second door to the operations the CLI uses (same answers, same
// errors), log streams, /metrics, and bad input — malformed, oversized, slow, and a
// thousand event streams at once — that must leave the server up and its data whole.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { GATED, addWorkers, pidOf, release, serve, until, untilState, within, writeScript, type ServerOptions, type TestServer } from './server.ts';
import { OPS } from '../cli.ts';
import { ROOT } from './server.ts';

type Answer = { status: number; headers: http.IncomingHttpHeaders; text: string; json: any };

/** One HTTP request (node:http, so that any Host header can be sent); never rejects on a
 *  status, nor on a connection the server closes once it has answered. */
function httpRequest(url: string, opts: { method?: string; headers?: Record<string, string>; body?: string | Buffer } = {}): Promise<Answer> {
  return new Promise((resolve, reject) => {
    let answered = false;
    const req = http.request(url, { method: opts.method ?? 'GET', headers: opts.headers }, (res) => {
      answered = true;
      const parts: Buffer[] = [];
      res.on('data', (d) => parts.push(d));
      res.on('end', () => {
        const text = Buffer.concat(parts).toString('utf8');
        let json: any;
        try { json = JSON.parse(text); } catch { /* not JSON */ }
        resolve({ status: res.statusCode!, headers: res.headers, text, json });
      });
    });
    req.on('error', (e) => { if (!answered) reject(e); });
    req.end(opts.body);
  });
}

type Dash = { s: TestServer; base: string; token: string; auth: Record<string, string>; get: (p: string) => Promise<Answer>; post: (op: string, body: unknown) => Promise<Answer> };

/** A server with --http on a free port, its base URL and token from `dashboard`. */
async function serveHttp(t: TestContext, opts: ServerOptions = {}): Promise<Dash> {
  const s = await serve(t, { args: ['--http', '0'], ...opts });
  const url = (await s.ok(['dashboard'])).trim();
  const m = /^(http:\/\/127\.0\.0\.1:\d+)\/#token=([0-9a-f]+)$/.exec(url);
  assert.ok(m, `dashboard printed ${url}`);
  const auth = { Authorization: `Bearer ${m[2]}` };
  return {
    s, base: m[1], token: m[2], auth,
    get: (p) => httpRequest(m[1] + p, { headers: auth }),
    post: (op, body) => httpRequest(`${m[1]}/api/${op}`, { method: 'POST', headers: { ...auth, 'Content-Type': 'application/json' }, body: JSON.stringify(body) }),
  };
}

/** Inodes of the TCP sockets that listen on this machine now. */
function listeningInodes(): Set<string> {
  const inodes = new Set<string>();
  for (const f of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let text = '';
    try { text = fs.readFileSync(f, 'utf8'); } catch { continue; }
    for (const line of text.split('\n').slice(1)) {
      const c = line.trim().split(/\s+/);
      if (c[3] === '0A') inodes.add(c[9]);
    }
  }
  return inodes;
}
/** How many TCP sockets process pid listens on. */
function tcpListeners(pid: number): number {
  const listening = listeningInodes();
  return fs.readdirSync(`/proc/${pid}/fd`).filter((fd) => {
    try { const m = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/${pid}/fd/${fd}`)); return m !== null && listening.has(m[1]); } catch { return false; }
  }).length;
}

test('without --http nothing listens but the socket, and dashboard says how to turn it on', async (t) => {
  const s = await serve(t);
  const pid = Number(/pid (\d+)/.exec(s.output())![1]);
  assert.equal(tcpListeners(pid), 0, 'no TCP listener');
  const r = await s.cli(['dashboard']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^error: the server on data dir '.*' serves no dashboard\nhint: start it with --http PORT \(or DJS_HTTP=PORT\)/);
  assert.equal((await s.status()).server.http, null);
});

test('access needs the token in a header: 401 without it, never a cookie; the page is a shell with no data; a Host check', async (t) => {
  // DJS_HTTP, read like --http.
  const d = await serveHttp(t, { args: [], env: { DJS_HTTP: '127.0.0.1:0' } });
  const pid = Number(/pid (\d+)/.exec(d.s.output())![1]);
  assert.equal(tcpListeners(pid), 1, 'one TCP listener');
  const tokenFile = path.join(d.s.dataDir, 'http.token');
  assert.equal(fs.statSync(tokenFile).mode & 0o777, 0o600);
  assert.equal(fs.readFileSync(tokenFile, 'utf8').trim(), d.token);
  assert.equal((await d.s.status()).server.http, `${d.base}/`);
  await addWorkers(d.s, 'w1');
  const answers: Answer[] = [];
  const request = async (url: string, opts?: Parameters<typeof httpRequest>[1]) => { const r = await httpRequest(url, opts); answers.push(r); return r; };

  for (const p of ['/api/status', '/api/workers', '/api/jobs', '/api/jobs/1', '/api/jobs/1/log', '/metrics', '/api/events']) {
    const r = await request(d.base + p);
    assert.equal(r.status, 401, `${p} without a token`);
    assert.equal(r.json.code, 1);
    assert.match(r.json.hint, /cli\.ts dashboard/);
  }
  assert.equal((await request(`${d.base}/api/status`, { headers: { Authorization: `Bearer ${'0'.repeat(d.token.length)}` } })).status, 401, 'a wrong token');
  assert.equal((await request(`${d.base}/?token=nope`)).status, 401);
  assert.equal((await request(`${d.base}/api/status`, { headers: { 'X-DJS-Token': d.token } })).status, 200, 'the token in X-DJS-Token');

  // The page's shell is the same for anyone, and holds no data and no token.
  let page: Answer | undefined;
  for (const p of ['/', '/app.js', '/app.css', '/favicon.svg']) {
    const r = await request(d.base + p);
    if (p === '/') page = r;
    assert.equal(r.status, 200, `${p}: ${r.text.slice(0, 200)}`);
    assert.doesNotMatch(r.text, new RegExp(d.token), `${p} holds no token`);
    for (const data of [d.s.dataDir, 'w1', String(pid)]) assert.ok(!r.text.includes(data), `${p} holds no data (${data})`);
    assert.equal(r.text, (await request(d.base + p, { headers: d.auth })).text, `${p} is the same with the token`);
  }
  assert.ok(page);
  assert.match(String(page.headers['content-security-policy']), /default-src 'none'/);
  assert.match(page.text, /<script src="\/app\.js"/);
  assert.doesNotMatch(page.text, /https?:\/\/(?!www\.w3\.org)/, 'the page fetches nothing from elsewhere');

  // The link of older versions, /?token=T, is sent on to the fragment, which browsers
  // never send to a server; no cookie is set.
  const first = await request(`${d.base}/?token=${d.token}`);
  assert.equal(first.status, 303);
  assert.equal(first.headers.location, `/#token=${d.token}`);

  // A cookie never stands for the token: not for reads, not for changes.
  const port = new URL(d.base).port;
  for (const cookie of [`djs_${port}=${d.token}`, `djs=${d.token}`, `token=${d.token}`]) {
    const jar = { Cookie: cookie };
    assert.equal((await request(`${d.base}/api/status`, { headers: jar })).status, 401, `reads with the cookie ${cookie}`);
    assert.equal((await request(`${d.base}/metrics`, { headers: jar })).status, 401);
    const change = await request(`${d.base}/api/remove_workers`, { method: 'POST', headers: { ...jar, 'Content-Type': 'application/json' }, body: '{"hosts":["w1"]}' });
    assert.equal(change.status, 401, `a change with the cookie ${cookie}`);
  }
  assert.equal((await d.s.status()).workers.length, 1, 'the worker is still there');

  // DNS rebinding: the right token but a Host that is not the address served.
  for (const host of [`evil.example:${port}`, 'localhost', `127.0.0.1:${Number(port) + 1}`]) {
    for (const p of ['/api/status', '/']) {
      const r = await request(`${d.base}${p}`, { headers: { ...d.auth, Host: host } });
      assert.equal(r.status, 403, `Host ${host}`);
      assert.match(r.json.error, /refused Host/);
    }
  }
  assert.equal((await request(`${d.base}/api/status`, { headers: { ...d.auth, Host: `localhost:${port}` } })).status, 200);

  // Changes: POSTs only, with the token in a header.
  assert.equal((await request(`${d.base}/api/remove_workers?hosts=w1`, { headers: d.auth })).status, 404, 'no change by GET');
  assert.equal((await request(`${d.base}/api/remove_workers`, { method: 'PUT', headers: d.auth })).status, 405);
  assert.equal((await d.s.status()).workers.length, 1, 'the worker is still there');
  const ok = await d.post('remove_workers', { hosts: ['w1'] });
  assert.equal(ok.status, 200);
  assert.deepEqual(ok.json, { ok: true, workers: [{ host: 'w1', running: 0 }] });
  assert.equal((await d.s.status()).workers.length, 0);
  for (const r of answers) assert.equal(r.headers['set-cookie'], undefined, 'no answer sets a cookie');
});

test('a wrong token is a 401 whatever its bytes: non-ASCII of the same length in characters too', async (t) => {
  const d = await serveHttp(t);
  assert.equal(d.token.length, 48);
  // 48 characters as the server reads them (header values as Latin-1, the query as
  // UTF-8), but more than 48 bytes in UTF-8.
  const wrong = ['é'.repeat(48), 'Ã©'.repeat(24), 'ü'.repeat(47) + 'a', '\u00ff'.repeat(48)];
  for (const w of wrong) {
    for (const h of [{ Authorization: `Bearer ${w}` }, { 'X-DJS-Token': w }] as Record<string, string>[]) {
      const r = await httpRequest(`${d.base}/api/status`, { headers: h });
      assert.equal(r.status, 401, `${Object.keys(h)[0]} ${JSON.stringify(w)}: ${r.text}`);
      assert.match(r.json.error, /wrong access token/);
    }
  }
  for (const q of ['%C3%A9'.repeat(48), '%C3%A9'.repeat(24), '%E9'.repeat(48), '%F0%9F%98%80'.repeat(12), encodeURIComponent('€'.repeat(16))]) {
    const r = await httpRequest(`${d.base}/?token=${q}`);
    assert.equal(r.status, 401, `?token=${q}: ${r.text}`);
    assert.match(r.json.error, /wrong access token/);
  }
  assert.equal((await d.get('/api/status')).status, 200, 'the right token still works');
  assert.equal(d.s.proc.exitCode, null, 'the server is up');
});

test('the API serves the operations of the CLI, with its answers and its errors', async (t) => {
  const d = await serveHttp(t);
  const { s } = d;
  writeScript(s.dir, 'gated.sh', GATED);
  await addWorkers(s, 'local1:2', 'local2');

  // add_jobs: a script relative to cwd, as add_job takes it.
  const add = await d.post('add_jobs', { cwd: s.dir, jobs: [['./gated.sh', '0'], ['./gated.sh', '3'], ['./gated.sh', 'a b']], retries: 1 });
  assert.equal(add.status, 200, add.text);
  assert.deepEqual(add.json, { ok: true, first: 1, count: 3 });
  for (const id of [1, 2, 3]) await pidOf(s, id);

  // status and workers equal status --json.
  const status = await s.status();
  const api = (await d.get('/api/status')).json;
  assert.deepEqual({ counts: api.counts, workers: api.workers, queue: api.queue }, { counts: status.counts, workers: status.workers, queue: status.queue });
  assert.deepEqual((await d.get('/api/workers')).json.workers, status.workers);

  // One job and the list equal list --json; filters and pages.
  const list = await s.jobs();
  const { runtimeMs: _r1, ...one } = (await d.get('/api/jobs/2')).json.job;
  const { runtimeMs: _r2, ...listed } = list[1];
  assert.deepEqual(one, listed);
  const all = (await d.get('/api/jobs')).json;
  assert.deepEqual(all.rows.map((j: any) => j.id), [3, 2, 1]);
  assert.equal(all.total, 3);
  assert.equal(all.next, null);
  const p1 = (await d.get('/api/jobs?limit=2')).json;
  assert.deepEqual(p1.rows.map((j: any) => j.id), [3, 2]);
  const p2 = (await d.get(`/api/jobs?limit=2&before=${p1.next}`)).json;
  assert.deepEqual(p2.rows.map((j: any) => j.id), [1]);
  assert.deepEqual((await d.get('/api/jobs?text=a%20b')).json.rows.map((j: any) => j.id), [3]);
  assert.deepEqual((await d.get('/api/jobs?worker=local2')).json.rows.map((j: any) => j.id), list.filter((j: any) => j.worker === 'local2').map((j: any) => j.id));
  assert.deepEqual((await d.get('/api/jobs?state=done')).json.rows, []);

  // kill and retry, as the CLI's.
  const kill = await d.post('kill', { ids: [2] });
  assert.deepEqual(kill.json, { ok: true, ids: [2] });
  await untilState(s, 2, 'killed');
  release(s, 1);
  await untilState(s, 1, 'done');
  const log = await d.get('/api/jobs/1/log');
  assert.equal(log.status, 200);
  assert.equal(log.text, (await s.ok(['log', '1'])));
  assert.equal(log.headers['x-djs-job-state'], 'done');
  assert.equal(Number(log.headers['x-djs-log-next']), Buffer.byteLength(log.text));
  const tail = await d.get('/api/jobs/1/log?tail=9');
  assert.equal(tail.text, log.text.slice(-9));
  const retry = await d.post('retry', { ids: [1, 2] });
  assert.deepEqual(retry.json, { ok: true, ids: [1, 2] });
  await until(async () => (await d.get('/api/jobs/2')).json.job.attempts === 2, 'job 2 to run again');

  // Errors: the CLI's message and exit code (as `code`), and an HTTP status to match.
  const cases: [() => Promise<Answer>, string[], number][] = [
    [() => d.get('/api/jobs/99'), ['kill', '99'], 404],
    [() => d.post('kill', { ids: [99] }), ['kill', '99'], 404],
    [() => d.post('retry', { ids: [3] }), ['retry', '3'], 409],
    [() => d.post('remove_workers', { hosts: ['nope'] }), ['remove_slave', 'nope'], 404],
    [() => d.post('remove_workers', { hosts: ['local2'] }), ['remove_slave', 'local2'], 409],
    [() => d.get('/api/jobs?state=sleeping'), ['list', '--state', 'sleeping'], 400],
    [() => d.post('add_jobs', { cwd: s.dir, jobs: [[path.join(s.dir, 'missing.sh')]] }), ['add_job', path.join(s.dir, 'missing.sh')], 409],
  ];
  for (const [call, cli, status] of cases) {
    const r = await call();
    const c = await s.cli(cli);
    assert.equal(r.status, status, `${cli.join(' ')}: ${r.text}`);
    assert.equal(r.json.ok, false);
    assert.equal(r.json.code, c.code, `${cli.join(' ')}: the CLI's exit code`);
    assert.equal(c.stderr.split('\n')[0], `error: ${r.json.error}`, `${cli.join(' ')}: the CLI's message`);
  }
  assert.equal((await d.get('/api/nothing')).status, 404);
  const unknownOp = await d.post('stop', {});
  assert.equal(unknownOp.status, 404, 'stop is not served over HTTP');
  assert.match(unknownOp.json.hint, /operations: add_jobs/);
  // A POST takes the fields its socket request takes: --retry-delay, --requeue-on-down.
  const delayed = await d.post('add_jobs', { cwd: s.dir, jobs: [['./gated.sh']], retries: 1, retryDelay: 5 });
  assert.equal(delayed.status, 200, delayed.text);
  const added = await d.post('add_workers', { workers: [{ host: 'local3', slots: 1 }], skipCheck: true, requeueOnDown: true });
  assert.equal(added.status, 200, added.text);
  assert.equal((await s.status()).workers.find((w: any) => w.host === 'local3').requeueOnDown, true);
  for (const id of [1, 2, 3, delayed.json.first]) release(s, id);
});

test('a followed log arrives as server-sent events, then an end event', async (t) => {
  const d = await serveHttp(t);
  writeScript(d.s.dir, 'gated.sh', GATED);
  await addWorkers(d.s, 'local1');
  const id = (await d.post('add_jobs', { cwd: d.s.dir, jobs: [['./gated.sh', '4']] })).json.first;
  let text = '';
  const done = new Promise<void>((resolve, reject) => {
    http.get(`${d.base}/api/jobs/${id}/log?follow=1`, { headers: d.auth }, (res) => {
      assert.match(String(res.headers['content-type']), /^text\/event-stream/);
      res.setEncoding('utf8');
      res.on('data', (c) => { text += c; });
      res.on('end', resolve);
    }).on('error', reject);
  });
  await until(() => text.includes('"text":"job 1 running on local1\\n"'), 'the first line');
  assert.doesNotMatch(text, /released/);
  release(d.s, id);
  await within(done, 15_000, 'the stream to end');
  assert.match(text, /event: log\ndata: \{"offset":\d+,"text":"job 1 released\\n"\}/);
  assert.match(text, /event: end\ndata: \{"state":"failed","exitCode":4\}\n\n$/);
  assert.equal((await d.get('/api/jobs/7/log?follow=1')).status, 404, 'no such job: a JSON error, no stream');
});

test('/metrics follows the state in the Prometheus format', async (t) => {
  const d = await serveHttp(t);
  writeScript(d.s.dir, 'ok.sh', 'exit 0');
  writeScript(d.s.dir, 'bad.sh', 'exit 3');
  await addWorkers(d.s, 'local1:3');
  await d.post('add_jobs', { cwd: d.s.dir, jobs: [['./ok.sh'], ['./ok.sh'], ['./bad.sh']] });
  await d.s.ok(['wait']).catch(() => {});
  await until(async () => (await d.s.status()).counts.running === 0, 'all jobs to end');
  const r = await d.get('/metrics');
  assert.equal(r.status, 200);
  assert.match(String(r.headers['content-type']), /^text\/plain; version=0\.0\.4/);
  const sample = (name: string) => Number(new RegExp(`^${name.replace(/[{}]/g, '\\$&')} (\\S+)$`, 'm').exec(r.text)?.[1]);
  const status = await d.s.status();
  for (const k of ['waiting', 'running', 'done', 'failed', 'killed']) assert.equal(sample(`djs_jobs{state="${k}"}`), status.counts[k], k);
  assert.equal(sample('djs_job_starts_total'), 3);
  assert.equal(sample('djs_job_ends_total{outcome="done"}'), 2);
  assert.equal(sample('djs_job_ends_total{outcome="failed"}'), 1);
  assert.equal(sample('djs_workers{state="up"}'), 1);
  assert.equal(sample('djs_slots{state="free"}'), 3);
  assert.equal(sample('djs_queue_wait_seconds_count'), 3);
  assert.ok(sample('djs_journal_fsync_seconds_count') >= 3, 'the journal was flushed');
  const promtool = spawnSync('promtool', ['check', 'metrics'], { input: r.text, encoding: 'utf8' });
  if (!promtool.error) assert.equal(promtool.status, 0, promtool.stdout + promtool.stderr);
  else t.diagnostic('promtool not found: the format is checked by the core test parser only');
});

test('bad input gets a clear 4xx; a slow client holds nothing up; the data stays whole', async (t) => {
  const d = await serveHttp(t);
  writeScript(d.s.dir, 'ok.sh', 'exit 0');
  await d.post('add_jobs', { cwd: d.s.dir, jobs: [['./ok.sh']] });
  const before = await d.s.jobs();
  const post = (op: string, body: string | Buffer, type = 'application/json') =>
    httpRequest(`${d.base}/api/${op}`, { method: 'POST', headers: { ...d.auth, 'Content-Type': type }, body });

  const cases: [Promise<Answer>, number, RegExp][] = [
    [post('kill', '{"ids": [1'), 400, /malformed request body/],
    [post('kill', '[1, 2]'), 400, /malformed request body/],
    [post('kill', '{"ids": [1], "force": true}'), 400, /unknown field 'force' for kill/],
    [post('kill', '{"ids": ["1"]}'), 400, /invalid job id/],
    [post('kill', '{"ids": [1]}', 'text/plain'), 415, /must be JSON/],
    [post('add_jobs', JSON.stringify({ cwd: 'relative', jobs: [['/bin/true']] })), 400, /absolute cwd/],
    [post('add_jobs', '[' .repeat(3 << 20)), 400, /malformed request body/],
    [d.get('/api/jobs?limit=5000'), 400, /invalid limit/],
    [d.get('/api/jobs?color=red'), 400, /unknown parameter 'color'/],
    [d.get('/api/jobs/x'), 400, /invalid job id 'x'/],
  ];
  for (const [call, status, re] of cases) {
    const r = await call;
    assert.equal(r.status, status, r.text);
    assert.match(r.json.error, re);
    assert.equal(typeof r.json.code, 'number');
  }
  // A huge body: refused before it is read in full.
  const huge = await post('add_jobs', Buffer.alloc(17 << 20, 0x20));
  assert.equal(huge.status, 413);
  assert.match(huge.json.error, /over 16 MiB/);
  // One that sends without end (chunked, no length): refused once past the limit, then cut off.
  const endless = await within(new Promise<{ status: number; cut: boolean }>((resolve) => {
    let status = 0;
    const req = http.request(`${d.base}/api/add_jobs`, { method: 'POST', headers: { ...d.auth, 'Content-Type': 'application/json' } }, (res) => { status = res.statusCode!; res.resume(); });
    const chunk = Buffer.alloc(1 << 20, 0x20);
    const pump = () => { while (!req.destroyed && req.write(chunk)); };
    req.on('drain', pump);
    req.on('error', () => {});
    req.on('close', () => resolve({ status, cut: true }));
    pump();
  }), 30_000, 'the endless body to be cut off');
  assert.deepEqual(endless, { status: 413, cut: true });

  // Slow clients: one that never finishes its headers, one that never finishes its body.
  const port = Number(new URL(d.base).port);
  const slow1 = net.connect(port, '127.0.0.1', () => slow1.write('GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n'));
  const slow2 = net.connect(port, '127.0.0.1', () => slow2.write(`POST /api/kill HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nAuthorization: Bearer ${d.token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"ids"`));
  let said1 = '';
  slow1.on('data', (d) => { said1 += d; });
  for (const c of [slow1, slow2]) { c.on('error', () => {}); t.after(() => c.destroy()); }
  for (let i = 0; i < 5; i++) assert.equal((await d.get('/api/status')).status, 200, 'others are served meanwhile');
  assert.equal((await d.s.cli(['status'])).code, 0, 'and the socket too');
  // The one that never finished its headers is let go (headersTimeout, 10 s).
  await until(() => slow1.readableEnded, 'the server to drop the client that never finished its headers', 20_000, 100);
  assert.match(said1, /^HTTP\/1\.1 408 Request Timeout/);

  assert.deepEqual((await d.s.jobs()).map((j: any) => [j.id, j.state]), before.map((j: any) => [j.id, j.state]), 'nothing changed');
  assert.equal(d.s.proc.exitCode, null, 'the server is up');
});

test('clients that trickle headers without the token cannot lock out those with it, nor the socket', async (t) => {
  // DJS_MAX_CONNECTIONS=100: the HTTP side takes 164 connections at once.
  const d = await serveHttp(t, { env: { DJS_MAX_CONNECTIONS: '100' } });
  const port = Number(new URL(d.base).port);
  // A live view, open before the flood, stays open through it.
  let live = '';
  const view = http.get(`${d.base}/api/events`, { headers: d.auth }, (res) => { res.setEncoding('utf8'); res.on('data', (c) => { live += c; }); });
  view.on('error', () => {});
  t.after(() => view.destroy());
  await until(() => live.includes('event: status'), 'the live view');

  // 300 clients that never finish their headers (a line every half second), each one
  // back half a second after the server closes it.
  let stop = false, connected = 0, closedByServer = 0;
  const socks = new Set<net.Socket>();
  t.after(() => { stop = true; for (const c of socks) c.destroy(); });
  const slow = () => {
    if (stop) return;
    const c = net.connect(port, '127.0.0.1');
    socks.add(c);
    let timer: NodeJS.Timeout | undefined;
    c.on('connect', () => {
      connected++;
      c.write(`GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\n`);
      let n = 0;
      timer = setInterval(() => c.write(`X-Slow-${n++}: 1\r\n`), 500);
    });
    c.on('error', () => {});
    c.on('close', () => {
      clearInterval(timer); socks.delete(c);
      if (stop) return;
      closedByServer++;
      setTimeout(slow, 500);
    });
  };
  for (let i = 0; i < 300; i++) slow();
  await until(() => connected >= 300, 'the slow clients to connect');

  // Well within the headers timeout (10 s): requests with the token are served.
  const t0 = Date.now();
  for (let i = 0; i < 5; i++) {
    const r = await within(d.get('/api/status'), 5000, 'a request with the token');
    assert.equal(r.status, 200);
  }
  assert.ok(Date.now() - t0 < 8000, 'served before the slow clients time out');
  assert.equal((await d.s.cli(['status'])).code, 0, 'the socket answers');
  assert.ok(closedByServer > 0, 'slow clients without the token were let go to make room');
  const before = live.length;
  await d.s.ok(['add_slave', '--skip_ssh_auth_check', 'w1']);
  await until(() => live.slice(before).includes('"host":"w1"'), 'the live view opened before the flood to go on');
  stop = true;
  assert.equal(d.s.proc.exitCode, null, 'the server is up');
});

test('a thousand event streams at once: each gets the live status; the server stays up', async (t) => {
  const d = await serveHttp(t);
  const port = Number(new URL(d.base).port);
  const N = 1000;
  const streams: { sock: net.Socket; data: string }[] = [];
  t.after(() => { for (const st of streams) st.sock.destroy(); });
  for (let i = 0; i < N; i++) {
    const st = { sock: net.connect(port, '127.0.0.1'), data: '' };
    st.sock.setEncoding('utf8');
    st.sock.on('data', (c: string) => { st.data += c; });
    st.sock.on('error', () => {});
    st.sock.write(`GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nAuthorization: Bearer ${d.token}\r\n\r\n`);
    streams.push(st);
  }
  await until(() => streams.every((st) => st.data.includes('event: status')), 'every stream to get the status', 30_000, 100);
  assert.ok(streams.every((st) => st.data.startsWith('HTTP/1.1 200')));
  // One more is refused (the limit is DJS_MAX_CONNECTIONS), the API still answers.
  const extra = await d.get('/api/events');
  assert.equal(extra.status, 503);
  assert.match(extra.json.error, /1000 event streams are open/);
  const r = await within(d.s.cli(['add_slave', '--skip_ssh_auth_check', 'w9']), 10_000, 'a change while they are open');
  assert.equal(r.code, 0);
  await until(() => streams.every((st) => st.data.includes('"host":"w9"')), 'every stream to get the change', 30_000, 100);
  for (const st of streams) st.sock.destroy();
  assert.equal((await d.get('/api/status')).json.workers[0].host, 'w9');
  assert.equal(d.s.proc.exitCode, null, 'the server is up');
});

test('GET /api/openapi.json describes every route and every operation served over HTTP, with its fields and types', async (t) => {
  const d = await serveHttp(t);
  // No token needed: it holds no data.
  const r = await httpRequest(`${d.base}/api/openapi.json`);
  assert.equal(r.status, 200, r.text);
  assert.match(String(r.headers['content-type']), /^application\/json/);
  const doc = r.json;
  assert.ok(doc, 'valid JSON');
  assert.match(doc.openapi, /^3\.[01]\.\d+$/);
  assert.equal(typeof doc.info?.title, 'string');
  assert.equal(typeof doc.info?.version, 'string');
  assert.equal(typeof doc.paths, 'object');
  for (const scheme of doc.security) for (const name of Object.keys(scheme)) assert.ok(doc.components.securitySchemes[name], `security scheme ${name}`);

  // Every operation the socket serves over HTTP is a POST with exactly its fields, and
  // the type each field says is the one the server holds it to: a value of another
  // type is refused naming the field.
  const httpOps = Object.entries(OPS).filter(([, op]) => op.http);
  assert.ok(httpOps.length >= 10, 'the operations over HTTP');
  const other: Record<string, unknown> = { boolean: 'x', string: 1, number: 'x', integer: 'x', array: 'x', object: [] };
  for (const [name, op] of httpOps) {
    const post = doc.paths[`/api/${name}`]?.post;
    assert.ok(post, `POST /api/${name} is described`);
    const body = post.requestBody.content['application/json'].schema;
    assert.equal(body.additionalProperties, false, name);
    const fields = Object.entries(op.fields ?? {}).filter(([, f]) => !('socketOnly' in f)).map(([k]) => k);
    assert.deepEqual(Object.keys(body.properties).sort(), fields.sort(), `the fields of ${name}`);
    for (const [field, schema] of Object.entries<any>(body.properties)) {
      assert.ok(schema.type || schema.enum, `${name}.${field} has a type`);
      const wrong = schema.enum ? 'not one of them' : other[schema.type];
      const a = await d.post(name, { [field]: wrong });
      assert.equal(a.status, 400, `${name}.${field} = ${JSON.stringify(wrong)}: ${a.text}`);
      assert.match(a.json.error, new RegExp(`^invalid ${field} `), `${name}.${field}`);
    }
  }
  // Nothing else is a POST: an operation the socket keeps to itself is not described.
  const posts = Object.keys(doc.paths).filter((p) => doc.paths[p].post).map((p) => p.slice('/api/'.length));
  assert.deepEqual(posts.sort(), httpOps.map(([n]) => n).sort());

  // Every GET route is served, with the query parameters it is described with: an
  // unknown one is refused with the list of those it takes.
  const gets = Object.keys(doc.paths).filter((p) => doc.paths[p].get);
  for (const p of ['/api/status', '/api/workers', '/api/jobs', '/api/jobs/{id}', '/api/jobs/{id}/log', '/api/events', '/api/hello', '/metrics', '/api/openapi.json']) assert.ok(gets.includes(p), `GET ${p}`);
  for (const p of gets) {
    const get = doc.paths[p].get;
    const query = get.parameters.filter((q: any) => q.in === 'query').map((q: any) => q.name);
    const a = await d.get(`${p.replace('{id}', '1')}?zzz=1`);
    assert.equal(a.status, 400, `GET ${p}?zzz=1: ${a.text}`);
    const taken = /^parameters here: (.*)$/.exec(a.json.hint)?.[1].split(', ') ?? (a.json.hint === 'this takes no parameters' ? [] : [a.json.hint]);
    assert.deepEqual(taken.sort(), query.sort(), `GET ${p}: its parameters`);
    assert.equal(get.security?.length === 0, p === '/api/hello' || p === '/api/openapi.json', `GET ${p}: needs the token`);
  }

  // The README's API table names it, and every route it describes.
  const readme = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
  const table = readme.slice(readme.indexOf('| request | what it does (CLI) |'), readme.indexOf('Unknown fields and parameters are refused'));
  assert.match(table, /\| `GET \/api\/openapi\.json` \|/);
  for (const p of Object.keys(doc.paths)) assert.ok(table.includes(p.replace('{id}', 'ID')), `the README's API table names ${p}`);
});
