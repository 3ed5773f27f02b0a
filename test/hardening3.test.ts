// Tier 2: what another local user, or one client, could still do to a server: flood the
// start lock, use up its file descriptors, ask it to follow a log that cannot be read,
// plant entries where it makes its ssh control dir, send JSON nested too deep, put a
// symlink where server.log goes. Each gets an error or is shed; the server goes on.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';
import { connectionCaps, controlDirFor, formatStatus, nestedDeeper } from '../cli.ts';
import { launcherOf, rawRequest, runCli, serve, socketOp, testDir, until } from './server.ts';

const asRoot = process.getuid?.() === 0;

/** An HTTP request to a server started with --http 0, with its token. */
async function dashboardOf(s: { ok: (a: string[]) => Promise<string> }) {
  const url = (await s.ok(['dashboard'])).trim();
  const m = /^(http:\/\/127\.0\.0\.1:\d+)\/#token=([0-9a-f]+)$/.exec(url);
  assert.ok(m, `dashboard printed ${url}`);
  const headers = { Authorization: `Bearer ${m[2]}` };
  return {
    base: m[1],
    get: (p: string) => fetch(m[1] + p, { headers }),
    post: (op: string, body: string) => fetch(`${m[1]}/api/${op}`, { method: 'POST', headers: { ...headers, 'Content-Type': 'application/json' }, body }),
  };
}

test('JSON nested deeper than requests go is a usage error (exit code 2, HTTP 400), on the socket and over HTTP', { timeout: 60_000 }, async (t) => {
  const s = await serve(t, { args: ['--http', '0'] });
  const deep = (n: number) => '['.repeat(n) + ']'.repeat(n);
  for (const op of ['kill', 'wait', 'status', 'add_jobs']) {
    const { lines } = await rawRequest(s.dataDir, `{"op":"${op}","ids":${deep(5000)}}\n`);
    const r = JSON.parse(lines[0]);
    assert.deepEqual([r.ok, r.code], [false, 2], `${op}: ${r.error}`);
    assert.match(r.error, /nested deeper than 64/);
  }
  const d = await dashboardOf(s);
  const r = await d.post('kill', `{"ids":${deep(5000)}}`);
  assert.equal(r.status, 400);
  assert.match((await r.json()).error, /nested deeper than 64/);
  // What requests really nest still goes through, and brackets in strings do not count.
  assert.equal((await socketOp(s.dataDir, { op: 'kill', ids: [1] })).code, 1);
  const quoted = await socketOp(s.dataDir, { op: 'kill', tag: `a"\\${'['.repeat(200)}` });
  assert.doesNotMatch(quoted.error, /nested/);
});

test('nesting is measured on the text, brackets in strings left out', () => {
  assert.equal(nestedDeeper('{"a":[[]]}', 3), false);
  assert.equal(nestedDeeper('{"a":[[[]]]}', 3), true);
  assert.equal(nestedDeeper(`{"a":"${'['.repeat(10)}","b":"\\"}`, 1), false);
  assert.equal(nestedDeeper(`{"a":"\\"${'['.repeat(10)}"}`, 1), false);
  assert.equal(nestedDeeper(`{"a":"x\\\\",${'['.repeat(3)}`, 3), true);
});

test('a symlink, a directory or a FIFO where server.log goes: start --detach says what is wrong and where, in one line', { timeout: 60_000 }, async (t) => {
  const dir = testDir(t);
  const logs = path.join(dir, 'logs'), log = path.join(logs, 'server.log');
  fs.mkdirSync(logs, { mode: 0o700 });
  const plant: [string, () => void, RegExp][] = [
    ['symlink', () => fs.symlinkSync(path.join(dir, 'elsewhere'), log), /is a symbolic link/],
    ['directory', () => fs.mkdirSync(log), /is a directory/],
    ['FIFO', () => spawnSync('mkfifo', [log]), /is a FIFO/],
  ];
  for (const [what, make, said] of plant) {
    fs.rmSync(log, { recursive: true, force: true });
    make();
    const r = await runCli(['start', '--detach', path.join(dir, '.data'), logs], { cwd: dir });
    assert.equal(r.code, 1, `${what}: ${r.stderr}`);
    const first = r.stderr.split('\n')[0];
    assert.match(first, /^error: the server log '.*\/logs\/server\.log' /, what);
    assert.match(first, said, what);
    assert.doesNotMatch(r.stderr, /internal error/, what);
  }
  assert.ok(!fs.existsSync(path.join(dir, 'elsewhere')), 'nothing was written through the symlink');
});

test('whatever another user planted where the ssh control dir goes in /tmp, the server starts with another one', { timeout: 120_000 }, async (t) => {
  const dir = path.join(testDir(t), 'a-data-dir-path-too-long-for-ssh-sockets');
  fs.mkdirSync(dir);
  const planted = controlDirFor(path.join(dir, '.data'), process.getuid?.() ?? 0, process.env.TMPDIR || '/tmp');
  assert.ok(planted.startsWith('/tmp/'), planted);
  const made: string[] = [];
  t.after(() => { for (const p of [planted, ...made]) fs.rmSync(p, { recursive: true, force: true }); });
  const theirs = (p: string) => { if (asRoot) fs.lchownSync(p, 65534, 65534); };
  const kinds: [string, () => void][] = [
    ['a dangling symlink', () => { fs.symlinkSync('/nonexistent/djs-target', planted); theirs(planted); }],
    // (Another user's: one of one's own to a directory of one's own is one's own choice.)
    ...(asRoot ? [['a symlink to a directory', () => { fs.mkdirSync(`${planted}.target`, { mode: 0o700 }); made.push(`${planted}.target`); fs.symlinkSync(`${planted}.target`, planted); theirs(planted); }] as [string, () => void]] : []),
    ['a symlink to itself', () => { fs.symlinkSync(planted, planted); theirs(planted); }],
    ['a file', () => { fs.writeFileSync(planted, ''); theirs(planted); }],
    ['a FIFO', () => { spawnSync('mkfifo', [planted]); theirs(planted); }],
    ...(asRoot ? [['a directory of another user', () => { fs.mkdirSync(planted, { mode: 0o700 }); theirs(planted); }] as [string, () => void]] : []),
    ['a directory open to all', () => { fs.mkdirSync(planted); fs.chmodSync(planted, 0o777); theirs(planted); }],
  ];
  for (const [what, plant] of kinds) {
    fs.rmSync(planted, { recursive: true, force: true });
    plant();
    const before = fs.lstatSync(planted);
    const s = await serve(t, { dir });
    const m = /warning: .*; the ssh control dir is (\/tmp\/djs-\S+) instead/.exec(s.output());
    assert.ok(m, `${what}: ${s.output()}`);
    made.push(m[1]);
    assert.doesNotMatch(s.output(), /internal error/, what);
    assert.equal(fs.statSync(m[1]).mode & 0o777, 0o700, what);
    const after = fs.lstatSync(planted);
    assert.deepEqual([after.ino, after.mode, after.uid], [before.ino, before.mode, before.uid], `${what}: left as it was`);
    await s.stop();
  }
});

test('a followed log that is a directory, or a FIFO held open, ends that request with the error; the server goes on', { timeout: 60_000 }, async (t) => {
  const s = await serve(t, { args: ['--http', '0'] });
  const d = await dashboardOf(s);
  fs.writeFileSync(path.join(s.dir, 'job.sh'), '#!/bin/sh\necho hi\n', { mode: 0o755 });
  // Two jobs that wait (no worker), whose logs are taken by a directory and a FIFO.
  for (let i = 0; i < 2; i++) await s.ok(['add_job', './job.sh']);
  fs.mkdirSync(path.join(s.logDir, '1.log'));
  const fifo = path.join(s.logDir, '2.log');
  assert.equal(spawnSync('mkfifo', [fifo]).status, 0);
  const held = fs.openSync(fifo, 'r+'); // a writer that stays: the server's reads get ESPIPE
  t.after(() => fs.closeSync(held));
  for (const [id, error] of [[1, /EISDIR/], [2, /ESPIPE/]] as const) {
    const r = await d.get(`/api/jobs/${id}/log?follow=1`);
    assert.equal(r.status, 200);
    const text = await r.text(); // the stream ends
    const m = /event: end\ndata: (.*)\n/.exec(text);
    assert.ok(m, text);
    assert.match(JSON.parse(m[1]).error, error);
    assert.match(JSON.parse(m[1]).error, new RegExp(`cannot read the log '.*/${id}\\.log'`));
    const once = await d.get(`/api/jobs/${id}/log`);
    assert.equal(once.status, 409);
    assert.match((await once.json()).error, error);
    // The client reads the log itself: one line, exit code 1.
    for (const args of [['log', String(id)], ['log', '-f', String(id)]]) {
      if (args[1] === '-f') await s.ok(['kill', String(id)]); // -f follows until the job ends
      const c = await s.cli(args);
      assert.equal(c.code, 1, `${args.join(' ')}: ${c.stderr}`);
      assert.match(c.stderr, /^error: cannot read the log '.*'/);
      assert.doesNotMatch(c.stderr, /internal error|\n\s+at /);
    }
  }
  assert.equal(s.proc.exitCode, null, 'the server is up');
  assert.equal((await s.status()).counts.total, 2);
});

/** The abstract socket name of a running server's start lock, as anyone reads it in
 *  /proc/net/unix (here: computed as the server does, and checked to be listed). */
function lockName(dataDir: string): string {
  const token = fs.readFileSync(path.join(dataDir, 'lock.token'), 'utf8').trim(), d = fs.statSync(dataDir);
  const name = `djs-${createHash('sha256').update(`${token}-${d.dev}-${d.ino}`).digest('hex')}-`.padEnd(107, 'x');
  assert.ok(fs.readFileSync('/proc/net/unix', 'utf8').includes('@' + name), 'the server holds that name');
  return '\0' + name;
}

const fdsOf = (pid: number) => fs.readdirSync(`/proc/${pid}/fd`).length;
const rssMiBOf = (pid: number) => Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) / 1024;

test('the start lock, which anyone can reach, reads one short line per connection, for 2 s in all, 8 connections at once', { timeout: 60_000 }, async (t) => {
  const s = await serve(t);
  const pid = s.proc.pid!, name = lockName(s.dataDir);
  const rss0 = rssMiBOf(pid), fds0 = fdsOf(pid);
  const open: net.Socket[] = [];
  t.after(() => { for (const c of open) c.destroy(); });
  const connect = () => { const c = net.connect(name).on('error', () => {}); open.push(c); return c; };
  const closedWithin = (c: net.Socket, ms: number) => new Promise<boolean>((resolve) => {
    if (c.destroyed) return resolve(true);
    const timer = setTimeout(() => resolve(false), ms);
    c.once('close', () => { clearTimeout(timer); resolve(true); });
  });
  // Bytes without a newline, as fast as they go: closed at once, the server no bigger.
  const flood = connect();
  const chunk = Buffer.alloc(1 << 20, 'a');
  let sent = 0;
  const pour = () => { while (!flood.destroyed && flood.write(chunk)) sent += chunk.length; };
  flood.on('connect', pour).on('drain', pour);
  assert.ok(await closedWithin(flood, 3000), `a connection that sent ${sent >> 20} MiB without a newline is still open`);
  t.diagnostic(`${sent >> 20} MiB were sent before the lock closed the connection; server RSS ${rss0.toFixed(0)} -> ${rssMiBOf(pid).toFixed(0)} MiB`);
  assert.ok(rssMiBOf(pid) - rss0 < 50, `the server grew by ${(rssMiBOf(pid) - rss0).toFixed(0)} MiB`);
  // A byte every 200 ms: closed 2 s after it connected, not 2 s after it went quiet.
  const trickle = connect();
  const t0 = Date.now();
  const drip = setInterval(() => { if (!trickle.destroyed) trickle.write('a'); }, 200);
  const trickleClosed = await closedWithin(trickle, 4000);
  clearInterval(drip);
  assert.ok(trickleClosed, 'a connection trickling a byte every 200 ms is still open after 4 s');
  t.diagnostic(`the trickling connection was closed after ${Date.now() - t0} ms`);
  // Many at once: the server keeps at most 8 of them.
  const many = Array.from({ length: 200 }, connect);
  await until(() => many.every((c) => c.readyState !== 'opening'), 'the connections to be made');
  await until(() => fdsOf(pid) <= fds0 + 8 + 2, `the server to keep at most 8 lock connections (it has ${fdsOf(pid) - fds0} more descriptors)`, 1500);
  for (const c of many) c.destroy();
  // The owner is served throughout; a second start while connections keep every place of
  // the lock taken is refused, and does not take the busy lock for a squatted one (which
  // would give the running server's lock a new token).
  assert.equal((await s.cli(['status'])).code, 0);
  let flooding = true;
  const again = () => { if (flooding) connect().on('close', again); };
  for (let i = 0; i < 40; i++) again();
  const token = fs.readFileSync(path.join(s.dataDir, 'lock.token'), 'utf8');
  const second = await runCli(['start', s.dataDir, s.logDir], { cwd: s.dir });
  flooding = false;
  assert.equal(second.code, 1);
  assert.match(second.stderr, /already running/);
  assert.doesNotMatch(second.stderr, /cannot prove/);
  assert.equal(fs.readFileSync(path.join(s.dataDir, 'lock.token'), 'utf8'), token, 'the lock keeps its token');
});

test('connection caps come from the open-files limit, with a reserve: 256 files, 80 socket and 80 HTTP connections at once', () => {
  assert.deepEqual(connectionCaps(256), { socket: 80, http: 80, fdLimit: 256, reserve: 96, note: connectionCaps(256).note });
  assert.match(connectionCaps(256).note!, /at most 80 on the socket and 80 over HTTP, from the limit of 256 open files \(ulimit -n\) less 96/);
  const at1024 = connectionCaps(1024);
  assert.ok(at1024.socket + at1024.http + at1024.reserve <= 1024, JSON.stringify(at1024));
  assert.deepEqual([connectionCaps(20000).socket, connectionCaps(20000).http, connectionCaps(20000).note], [1000, 1064, null]);
  assert.deepEqual([connectionCaps(Infinity).socket, connectionCaps(Infinity).http], [1000, 1064]);
  assert.ok(connectionCaps(16).socket >= 1 && connectionCaps(16).http >= 1);
  // Given, as given; past what the limit leaves, with a warning.
  assert.deepEqual([connectionCaps(1024, 20).socket, connectionCaps(1024, 20).http, connectionCaps(1024, 20).note], [20, 84, null]);
  assert.match(connectionCaps(256, 1000).note!, /^warning: DJS_MAX_CONNECTIONS=1000 .* more than the 160 file descriptors/);
});

test('under ulimit -n 256, 300 socket and 300 HTTP connections without the token leave the owner\'s CLI served and the launcher room to restart', { timeout: 120_000 }, async (t) => {
  const s = await serve(t, { limitFiles: 256, args: ['--http', '0'] });
  const pid = s.proc.pid!;
  assert.match(s.output(), /at most 80 on the socket and 80 over HTTP, from the limit of 256 open files/);
  const port = Number(new URL((await dashboardOf(s)).base).port);
  const flood: net.Socket[] = [];
  t.after(() => { for (const c of flood) c.destroy(); });
  for (let i = 0; i < 300; i++) {
    flood.push(net.connect(path.join(s.dataDir, 'server.sock')).on('error', () => {}));
    flood.push(net.connect(port, '127.0.0.1').on('error', () => {}));
  }
  await until(() => flood.every((c) => c.readyState !== 'opening'), 'the connections to be made', 30_000);
  const fds = fdsOf(pid);
  t.diagnostic(`the server holds ${fds} descriptors of its 256`);
  assert.ok(fds <= 256 - 64, `the server holds ${fds} descriptors: no reserve left`);
  const r = await s.cli(['status', '--json']);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(JSON.parse(r.stdout).server.connections, { socket: 80, http: 80, openFiles: 256 });
  // The launcher must be started again for the next job: there are descriptors for it.
  process.kill(launcherOf(s), 'SIGKILL');
  await until(() => s.output().includes('the job launcher ended'), 'the server to see its launcher gone');
  fs.writeFileSync(path.join(s.dir, 'job.sh'), '#!/bin/sh\necho ran\n', { mode: 0o755 });
  await s.ok(['add_slave', '--skip_ssh_auth_check', 'w1']);
  const id = (await s.ok(['add_job', './job.sh'])).trim();
  assert.equal((await s.cli(['wait', id])).code, 0);
  assert.equal(s.proc.exitCode, null, 'the server is up');
});

test('a launcher that cannot be started (no file descriptor free) is tried again with a growing delay; status and server.log say why; its jobs wait, uncharged', { timeout: 120_000 }, async (t) => {
  // DJS_MAX_CONNECTIONS past what the limit leaves lets clients take every descriptor.
  const s = await serve(t, { limitFiles: 128, env: { DJS_MAX_CONNECTIONS: '100000' } });
  const pid = s.proc.pid!;
  assert.match(s.output(), /warning: DJS_MAX_CONNECTIONS=100000 lets clients hold/);
  fs.writeFileSync(path.join(s.dir, 'job.sh'), '#!/bin/sh\necho ran\n', { mode: 0o755 });
  await s.ok(['add_slave', '--skip_ssh_auth_check', 'w1']);
  // One connection of the owner's, made first, to speak to the server through it all.
  const ctl = net.connect(path.join(s.dataDir, 'server.sock'));
  t.after(() => ctl.destroy());
  const answers: any[] = [];
  let buf = '';
  ctl.setEncoding('utf8').on('data', (d: string) => { buf += d; let nl; while ((nl = buf.indexOf('\n')) >= 0) { answers.push(JSON.parse(buf.slice(0, nl))); buf = buf.slice(nl + 1); } });
  const ask = async (msg: object) => { const n = answers.length; ctl.write(JSON.stringify(msg) + '\n'); return until(() => answers[n], `an answer to ${JSON.stringify(msg)}`); };
  assert.equal((await ask({ op: 'ping' })).ok, true);
  assert.equal((await s.cli(['wait', (await s.ok(['add_job', './job.sh'])).trim()])).code, 0); // a job ran: the ssh config is written
  process.kill(launcherOf(s), 'SIGKILL');
  await until(() => s.output().includes('the job launcher ended'), 'the server to see its launcher gone');
  const flood: net.Socket[] = [];
  t.after(() => { for (const c of flood) c.destroy(); });
  for (let i = 0; i < 200; i++) flood.push(net.connect(path.join(s.dataDir, 'server.sock')).on('error', () => {}));
  await until(() => fdsOf(pid) >= 126, `the connections to take the server's descriptors (it has ${fdsOf(pid)})`, 30_000);
  const added = await ask({ op: 'add_jobs', cwd: s.dir, retries: 0, timeout: 0, jobs: [[path.join(s.dir, 'job.sh')]] });
  assert.equal(added.ok, true, added.error);
  await until(() => /cannot start the job launcher \(perl\): .*EMFILE.*; jobs wait, and it is tried again in/.test(s.output()), 'server.log to say the launcher cannot start').catch((e) => { throw new Error(`${e.message}; the server said:\n${s.output()}`); });
  const st = await ask({ op: 'status' });
  assert.match(st.server.launcher.error, /EMFILE/);
  assert.ok(Date.parse(st.server.launcher.retryAt) > Date.now() - 1000, st.server.launcher.retryAt);
  assert.equal(s.proc.exitCode, null, 'the server is up');
  for (const c of flood) c.destroy();
  assert.equal((await s.cli(['wait', String(added.first)])).code, 0);
  assert.match(s.output(), /the job launcher runs again, after \d+ failed start/);
  const job = await s.job(added.first);
  assert.deepEqual([job.state, job.attempts], ['done', 1]);
  assert.equal((await s.status()).server.launcher, null);
});

test('status says when jobs cannot start because the launcher does not', () => {
  const view = { counts: { waiting: 1, running: 0, done: 0, failed: 0, killed: 0, removed: 0, total: 1 }, workers: [], policy: 'fifo', paused: false, pausedTags: [], tags: [], queue: [] } as any;
  const text = formatStatus({ ...view, server: { pid: 7, dataDir: '/d', settings: {}, launcher: { error: 'spawn perl EMFILE', retryAt: new Date(10_000).toISOString() } } }, 4_000, false);
  assert.match(text, /jobs cannot start: the job launcher \(perl\) did not start \(spawn perl EMFILE\); next try in 6\.0s/);
  assert.doesNotMatch(formatStatus({ ...view, server: { pid: 7, dataDir: '/d', settings: {}, launcher: null } }, 4_000, false), /launcher/);
});

/** How many established TCP connections of the server listening on `port` have bytes
 *  in their send queue that the other end has not taken (its window is full). */
function stalledOn(port: number): number {
  const hexPort = port.toString(16).toUpperCase().padStart(4, '0');
  return fs.readFileSync('/proc/net/tcp', 'utf8').split('\n').slice(1).filter((l) => {
    const c = l.trim().split(/\s+/);
    return c[1]?.endsWith(`:${hexPort}`) && c[3] === '01' && parseInt(c[4].split(':')[0], 16) > 0;
  }).length;
}

test('followed logs whose readers do not keep up hold no file open while they wait', { timeout: 90_000 }, async (t) => {
  const s = await serve(t, { args: ['--http', '0'] });
  const url = (await s.ok(['dashboard'])).trim();
  const port = Number(new URL(url).port), token = url.split('#token=')[1];
  fs.writeFileSync(path.join(s.dir, 'job.sh'), '#!/bin/sh\necho hi\n', { mode: 0o755 });
  await s.ok(['add_job', './job.sh']); // waits: no worker
  const log = path.join(s.logDir, '1.log');
  fs.writeFileSync(log, Buffer.alloc(32 << 20, 'y'));
  const readers: net.Socket[] = [];
  t.after(() => { for (const c of readers) c.destroy(); });
  for (let i = 0; i < 5; i++) {
    const c = net.connect(port, '127.0.0.1').on('error', () => {});
    c.write(`GET /api/jobs/1/log?follow=1&offset=0 HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nAuthorization: Bearer ${token}\r\n\r\n`);
    c.pause(); // never reads
    readers.push(c);
  }
  const logFds = () => fs.readdirSync(`/proc/${s.proc.pid}/fd`).filter((f) => { try { return fs.readlinkSync(`/proc/${s.proc.pid}/fd/${f}`) === log; } catch { return false; } }).length;
  // Once every stream has filled what its reader's side takes, the server waits for
  // them with the log closed.
  let seen = '';
  await until(() => {
    const stalled = stalledOn(port), open = logFds();
    seen = `${stalled} streams stalled, ${open} descriptors of the log open`;
    return stalled === 5 && open === 0;
  }, 'the streams to wait with the log closed', 30_000).catch((e) => { throw new Error(`${e.message}: at last ${seen}`); });
  assert.equal(s.proc.exitCode, null);
});
