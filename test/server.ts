// The test harness of tiers 2 and 3: processes, polling, temporary directories, and real
// cli.ts servers driven through the real client (test/hosts.ts adds real ssh hosts).
//
// Rules it carries out for every test file:
//  - Wait for an outcome by polling to a deadline (until, within), never by sleeping.
//  - Every test removes what it creates: testDir(t) and serve(t) register their removal
//    with t.after; removeDir kills every process that belongs to the directory (servers,
//    launchers, jobs, clients: by working directory or by DJS_DATA_DIR), unmounts what
//    is mounted in it, and deletes it. When a test file's process exits, whatever is
//    left (a directory no test removed, a server no test stopped) goes the same way.
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';
import { applyEvent, type Event, type State } from '../cli.ts';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
/** The cli.ts under test: this checkout's, or another build's (DJS_TEST_CLI=/path/to/cli.ts,
 *  e.g. to check that a change of cli.ts keeps what these black-box tests pin, or that a
 *  test fails when the behaviour it checks is broken in a scratch copy). */
export const CLI = process.env.DJS_TEST_CLI ? path.resolve(process.env.DJS_TEST_CLI) : path.join(ROOT, 'cli.ts');

// ---------------------------------------------------------------- polling

/** Polls fn until it returns a truthy value and resolves to it; fails naming `what`
 *  after `ms` (with the last error fn threw, if any). fn may throw while not ready. */
export async function until<T>(fn: () => T | Promise<T>, what: string, ms = 15_000, everyMs = 25): Promise<NonNullable<T>> {
  const deadline = Date.now() + ms;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v as NonNullable<T>;
    } catch (e) { last = e; }
    if (Date.now() > deadline) assert.fail(`timed out after ${ms} ms waiting for ${what}${last ? `: ${(last as Error).message}` : ''}`);
    await delay(everyMs);
  }
}

/** Resolves like p, or fails naming `what` if p takes longer than ms. */
export function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  const late = new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms); });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

/** Waits ms. Only for timing a test chooses on purpose (a random moment to crash, the
 *  pace of a client); to wait for something to happen, use until. */
export const delay = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------- processes

/** A finished process: its exit code (128+N when signal N ended it), its output, how long it ran. */
export type Run = { code: number; signal: NodeJS.Signals | null; stdout: string; stderr: string; ms: number };

/** A process started without waiting for it: its output so far, and its end. */
export type Running = {
  proc: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  /** Resolves when the process has exited and its output is read. */
  done: Promise<Run>;
  /** The exit code once it exited, else undefined (for polling with until). */
  exitCode: () => number | undefined;
};

export type RunOptions = {
  cwd?: string;
  /** Added to (or overriding) this process's environment. */
  env?: NodeJS.ProcessEnv;
  /** Written to its stdin, which is then closed (closed at once without it). */
  input?: string;
  /** SIGKILL after this long (default: never). */
  timeoutMs?: number;
};

/** Starts cmd args and returns at once; output is collected as it arrives. */
export function launch(cmd: string, args: string[], opts: RunOptions = {}): Running {
  const started = Date.now();
  const proc = spawn(cmd, args, { cwd: opts.cwd, env: { ...process.env, ...opts.env }, stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '', err = '', code: number | undefined;
  proc.stdout!.setEncoding('utf8').on('data', (d: string) => { out += d; });
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => { err += d; });
  proc.stdin!.on('error', () => {});
  proc.stdin!.end(opts.input);
  const timer = opts.timeoutMs === undefined ? undefined : setTimeout(() => {
    err += `\n(test harness: ${cmd} ${args.join(' ')} killed after ${opts.timeoutMs} ms)\n`;
    proc.kill('SIGKILL');
  }, opts.timeoutMs);
  const done = new Promise<Run>((resolve) => {
    proc.on('error', (e) => { err += String(e); });
    proc.on('close', (c, sig) => {
      clearTimeout(timer);
      code = c ?? 128 + (sig ? os.constants.signals[sig] : 0);
      resolve({ code, signal: sig, stdout: out, stderr: err, ms: Date.now() - started });
    });
  });
  return { proc, stdout: () => out, stderr: () => err, done, exitCode: () => code };
}

/** Runs cmd args to completion (SIGKILL after opts.timeoutMs, default 60 s); never rejects. */
export function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<Run> {
  return launch(cmd, args, { timeoutMs: 60_000, ...opts }).done;
}

/** Runs `cli.ts args` to completion, without colours. */
export function runCli(args: string[], opts: RunOptions = {}): Promise<Run> {
  return run(CLI, args, { ...opts, env: { NO_COLOR: '1', ...opts.env } });
}

/** Starts `cli.ts args` (wait, log -f, a second start ...) and returns at once. */
export function spawnCli(args: string[], opts: RunOptions = {}): Running {
  return launch(CLI, args, { ...opts, env: { NO_COLOR: '1', ...opts.env } });
}

/** What /proc/PID/stat says of a process (state 'Z' is a zombie), or null if there is none. */
export function procStat(pid: number | string): { state: string; ppid: number; pgrp: number; session: number; tty: number; start: string } | null {
  let stat: string;
  try { stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1'); } catch { return null; }
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // fields 3… of proc(5)
  return { state: f[0], ppid: Number(f[1]), pgrp: Number(f[2]), session: Number(f[3]), tty: Number(f[4]), start: f[19] };
}

/** The parent, process group, session and controlling terminal of a live process. */
export function procIds(pid: number): { ppid: number; pgrp: number; session: number; tty: number } {
  const s = procStat(pid);
  assert.ok(s, `no process ${pid}`);
  return { ppid: s.ppid, pgrp: s.pgrp, session: s.session, tty: s.tty };
}

/** True if process `pid` exists and is not a zombie. */
export function alive(pid: number): boolean {
  const s = procStat(pid);
  return s !== null && s.state !== 'Z';
}

/** Pids of every process in /proc now. */
export const allPids = (): number[] => fs.readdirSync('/proc').filter((p) => /^\d+$/.test(p)).map(Number);

/** Live processes that belong to dir: their working directory is in it, or their
 *  environment names a data dir in it (a job that changed directory, its launcher). */
export function processesUnder(dir: string): number[] {
  const inDir = (p: string) => p === dir || p.startsWith(dir + '/');
  return allPids().filter((pid) => {
    if (pid === process.pid || !alive(pid)) return false;
    try { if (inDir(fs.readlinkSync(`/proc/${pid}/cwd`))) return true; } catch { return false; }
    try {
      return fs.readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0').some((v) => v.startsWith('DJS_DATA_DIR=') && inDir(v.slice(13)));
    } catch { return false; }
  });
}

/** SIGKILLs every process of dir; returns how many it found. */
function killUnder(dir: string): number {
  const pids = processesUnder(dir);
  for (const pid of pids) { try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ } }
  return pids.length;
}

// ---------------------------------------------------------------- directories

const liveDirs = new Set<string>();
const liveServers = new Set<TestServer>();

/** A fresh short temporary directory (Unix socket paths must stay short). The caller
 *  removes it with removeDir; testDir does that by itself. */
/** Absolute path of an executable NAME on PATH (then in `more` directories), or ''. */
export function which(name: string, more: string[] = []): string {
  for (const dir of [...(process.env.PATH ?? '').split(':'), ...more]) {
    const file = path.join(dir || '.', name);
    try {
      fs.accessSync(file, fs.constants.X_OK);
      if (fs.statSync(file).isFile()) return path.resolve(file);
    } catch {
      // not in this directory
    }
  }
  return '';
}

/** The Debian packages a kind of test needs (`what`, e.g. "real ssh hosts"): `message`
 *  names the missing ones; `skip()` is for `describe(name, { skip: … })`; `skipUnless(t)`
 *  skips a test (returning true). Under CI (CI=true) nothing is skipped: a missing
 *  package fails the test instead. */
export function packagesFor(what: string, missing: () => string[]) {
  const message = (m: string[]) => `${what} need ${m.join(', ')}: apt-get install ${m.join(' ')}`;
  return {
    message,
    skip(): string | false {
      const m = missing();
      return m.length === 0 || process.env.CI === 'true' ? false : message(m);
    },
    skipUnless(t: TestContext): boolean {
      const m = missing();
      if (m.length === 0) return false;
      if (process.env.CI === 'true') throw new Error(message(m));
      t.skip(message(m));
      return true;
    },
  };
}

export function tempDir(prefix = 'djs-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  liveDirs.add(dir);
  return dir;
}

/** Mount points in dir, deepest first. */
function mountsUnder(dir: string): string[] {
  let text = '';
  try { text = fs.readFileSync('/proc/self/mounts', 'utf8'); } catch { return []; }
  return text.split('\n').map((l) => l.split(' ')[1]?.replace(/\\040/g, ' ')).filter((m): m is string => !!m && m.startsWith(dir + '/')).sort().reverse();
}

/** Unmounts (lazily) whatever is mounted in dir; synchronous, as removeDir also runs at exit. */
function unmountUnder(dir: string): void {
  for (const m of mountsUnder(dir)) {
    if (spawnSync('umount', ['-l', m], { stdio: 'ignore' }).status !== 0) throw new Error(`cannot unmount '${m}'`);
  }
}

/** Ends every process of dir (servers first, so nothing new starts), unmounts what is
 *  mounted in it, and deletes it. */
export async function removeDir(dir: string): Promise<void> {
  for (const s of liveServers) if (s.dir === dir || s.dir.startsWith(dir + '/')) await s.crash();
  await until(() => killUnder(dir) === 0, `the processes of '${dir}' to be gone`, 10_000, 20);
  unmountUnder(dir);
  fs.rmSync(dir, { recursive: true, force: true, maxRetries: 5 });
  liveDirs.delete(dir);
}

/** Ends a server (SIGKILL) and removes its dir (or `dir`) with every process in it. */
export async function cleanUp(s: TestServer | undefined, dir = s?.dir): Promise<void> {
  await s?.crash();
  if (dir) await removeDir(dir);
}

/** A temporary directory for one test, removed (with its processes) when the test ends. */
export function testDir(t: TestContext, prefix = 'djs-'): string {
  const dir = tempDir(prefix);
  t.after(() => removeDir(dir));
  return dir;
}

// A test that failed before its t.after ran, or a file that forgot one: when the test
// file's process ends, nothing it started stays behind.
process.on('exit', () => {
  for (const s of liveServers) s.proc.kill('SIGKILL');
  for (const dir of liveDirs) {
    for (let i = 0; i < 10 && killUnder(dir) > 0; i++);
    try { unmountUnder(dir); fs.rmSync(dir, { recursive: true, force: true }); } catch { /* best effort at exit */ }
  }
});

// ---------------------------------------------------------------- files

/** Writes an executable sh script. */
export function writeScript(dir: string, name: string, body: string): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, `#!/bin/sh\n${body}\n`, { mode: 0o755 });
  return file;
}

/** Reads a file, or '' if it does not exist (yet). */
export function readIf(file: string): string {
  try { return fs.readFileSync(file, 'utf8'); } catch { return ''; }
}

/** The job ids a client printed, one a line (add_job, add_jobs). */
export const idsOf = (out: string) => out.trim().split('\n').map(Number);

/** The job ids in the order their runs wrote them to order.txt in the test dir, one
 *  line each, the id first (`echo "$JOB_ID ..." >> order.txt`). */
export const order = (s: TestServer) => readIf(path.join(s.dir, 'order.txt')).trim().split('\n').filter(Boolean).map((l) => Number(l.split(' ')[0]));

/** A job that writes its pid to pid.$JOB_ID in its directory, says it runs, waits until
 *  the file go.$JOB_ID appears there (see release), says so, and exits with $1 if that
 *  is a number, else 0. pidOf and release expect it to run in the server's test dir. */
export const GATED = `echo $$ > "pid.$JOB_ID"
echo "job $JOB_ID running on $SLAVE_IP"
while [ ! -e "go.$JOB_ID" ]; do sleep 0.02; done
echo "job $JOB_ID released"
case "$1" in [0-9]*) exit "$1" ;; esac`;

// ---------------------------------------------------------------- servers

export type TestServer = {
  dir: string; dataDir: string; logDir: string;
  proc: ChildProcess;
  output: () => string;
  /** Runs the client against this server (cwd = the test dir unless given). */
  cli: (args: string[], opts?: RunOptions) => Promise<Run>;
  /** Like cli, but fails the test unless it exits 0; resolves to its stdout. */
  ok: (args: string[], opts?: RunOptions) => Promise<string>;
  /** What `status --json` and `list --json` print, asked over the socket (no client
   *  process: cheap enough to poll); `cli(['status', '--json'])` tests the client. */
  status: () => Promise<any>;
  jobs: () => Promise<any[]>;
  job: (id: number | string) => Promise<any>;
  /** SIGKILL, as a crash. */
  crash: () => Promise<void>;
  /** SIGTERM, and waits for the exit. */
  stop: () => Promise<void>;
  /** Starts a new server process on the same dirs. */
  restart: () => Promise<TestServer>;
  exited: Promise<number | null>;
};

export type ServerOptions = {
  /** The test dir (DATA_DIR is dir/.data, LOG_DIR dir/logs); a new temporary one without it. */
  dir?: string;
  /** Added to the server's environment, and to its clients'. */
  env?: NodeJS.ProcessEnv;
  /** More words for `start`. */
  args?: string[];
  /** The server runs with at most this many file descriptors (ulimit -n). */
  limitFiles?: number;
};

/** Starts `cli.ts start` and resolves once it printed its ready line. The caller ends it
 *  (removeDir of its dir does); serve ties that to a test. */
export async function startServer(opts: ServerOptions = {}): Promise<TestServer> {
  const dir = opts.dir ?? tempDir();
  const dataDir = path.join(dir, '.data'), logDir = path.join(dir, 'logs');
  const args = ['start', dataDir, logDir, ...(opts.args ?? [])];
  const spawnOpts = { cwd: dir, env: { ...process.env, NO_COLOR: '1', ...opts.env }, stdio: ['ignore', 'pipe', 'pipe'] as ('ignore' | 'pipe')[] };
  const proc = opts.limitFiles
    ? spawn('sh', ['-c', `ulimit -n ${opts.limitFiles} && exec "$0" "$@"`, CLI, ...args], spawnOpts)
    : spawn(CLI, args, spawnOpts);
  let out = '';
  proc.stdout!.on('data', (d) => { out += d; });
  proc.stderr!.on('data', (d) => { out += d; });
  let gone = false;
  const exited = new Promise<number | null>((r) => proc.on('exit', (code) => { gone = true; r(code); }));
  const cli = (args: string[], o: RunOptions = {}) =>
    runCli(['--data-dir', dataDir, ...args], { ...o, cwd: o.cwd ?? dir, env: { ...opts.env, ...o.env } });
  const s: TestServer = {
    dir, dataDir, logDir, proc, exited, output: () => out, cli,
    ok: async (args, o) => {
      const r = await cli(args, o);
      assert.equal(r.code, 0, `cli ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
      return r.stdout;
    },
    status: async () => { const { ok, ...rest } = await socketOp(dataDir, { op: 'status' }); assert.ok(ok, rest.error); return rest; },
    jobs: async () => {
      const rows: any[] = [], end = await socketOp(dataDir, { op: 'list' }, (m) => rows.push(...m.rows));
      assert.ok(end.ok, end.error);
      return rows;
    },
    job: async (id) => (await s.jobs()).find((j) => j.id === Number(id)),
    crash: async () => { if (!gone) proc.kill('SIGKILL'); await exited; },
    stop: async () => { if (!gone) proc.kill('SIGTERM'); await exited; },
    restart: () => startServer({ ...opts, dir }),
  };
  liveServers.add(s);
  exited.then(() => liveServers.delete(s));
  await until(() => out.includes('server ready') || gone, 'the server to be ready', 30_000);
  assert.match(out, /server ready/, 'the server did not start');
  return s;
}

/** A server for one test, in a new testDir unless opts.dir names one (which must be a
 *  testDir of the same test): when the test ends, the dir goes, and with it this server,
 *  its restarts and its jobs. */
export async function serve(t: TestContext, opts: ServerOptions = {}): Promise<TestServer> {
  return startServer({ ...opts, dir: opts.dir ?? testDir(t) });
}

/** The pid of a server's job launcher (its child running djs-launcher). */
export function launcherOf(s: TestServer): number {
  const pid = allPids().find((p) => {
    try { return fs.readFileSync(`/proc/${p}/cmdline`, 'utf8').includes('djs-launcher') && procIds(p).ppid === s.proc.pid; } catch { return false; }
  });
  assert.ok(pid, 'the server has a launcher process');
  return pid;
}

/** Adds workers that need no ssh, as `add_slave --skip_ssh_auth_check HOST[:SLOTS]...`
 *  does, over the socket (a client process less: the client's add_slave is tested
 *  on its own). */
export async function addWorkers(s: TestServer, ...hosts: string[]): Promise<void> {
  const workers = hosts.map((h) => {
    const [, host, slots] = /^(.+?)(?::(\d+))?$/.exec(h)!;
    return { host, slots: Number(slots ?? 1), auto: false, gpus: 0, labels: [], env: [] };
  });
  const r = await socketOp(s.dataDir, { op: 'add_workers', workers, skipCheck: true });
  assert.ok(r.ok, `add_workers ${hosts.join(' ')}: ${r.error}`);
}

/** add_job ARGS...; resolves to the new job's id. A plain `SCRIPT ARGS...` goes over the
 *  socket as the client would send it (the script resolved from the test dir); one with
 *  options goes through the client, which parses them. */
export async function addJob(s: TestServer, ...args: string[]): Promise<string> {
  if (args[0].startsWith('-') || args.includes(':::')) return (await s.ok(['add_job', ...args])).trim();
  const [script, ...rest] = args;
  const r = await socketOp(s.dataDir, { op: 'add_jobs', cwd: s.dir, retries: 0, timeout: 0, jobs: [[path.resolve(s.dir, script), ...rest]] });
  assert.ok(r.ok, `add_job ${args.join(' ')}: ${r.error}`);
  return String(r.first);
}

/** Lets a GATED job (one that waits for the file go.ID in the test dir) finish. */
export const release = (s: TestServer, id: string | number) => fs.writeFileSync(path.join(s.dir, `go.${id}`), '');

/** Waits until a job has written its pid to pid.ID in the test dir, and returns it. */
export const pidOf = async (s: TestServer, id: string | number) =>
  Number(await until(() => readIf(path.join(s.dir, `pid.${id}`)).trim(), `job ${id} to write its pid`));

/** Waits for job id to finish (with the wait operation, so nothing polls) and checks how
 *  it ended. */
export async function untilState(s: TestServer, id: string | number, state: string, ms = 15_000) {
  await socketOp(s.dataDir, { op: 'wait', ids: [Number(id)] }, () => {}, ms).catch((e) => { throw new Error(`job ${id} to finish: ${e.message}`); });
  const job = await s.job(id);
  assert.equal(job?.state, state, `job ${id} ended ${job?.state}, not ${state}`);
  return job;
}

/** Waits until the server has made `n` more checks of its watched runs (or, with
 *  `sweeps`, sweeps of its run dir) than when called: the counts of status's
 *  server.checks. What a test waits for instead of sleeping "a check or two". */
export async function moreChecks(s: TestServer, n: number, kind: 'runs' | 'sweeps' = 'runs', ms = 15_000): Promise<void> {
  const from: number = (await s.status()).server.checks[kind];
  await until(async () => (await s.status()).server.checks[kind] >= from + n, `${n} more ${kind === 'runs' ? 'checks of watched runs' : 'sweeps of the run dir'}`, ms, 50);
}

// ---------------------------------------------------------------- the socket, bare

/** Connects to the server socket of dataDir; a path too long for a socket address is
 *  reached from the data dir, as the client does. */
function connectTo(dataDir: string): net.Socket {
  const sock = path.join(dataDir, 'server.sock');
  if (Buffer.byteLength(sock) < 100) return net.connect(sock);
  const here = process.cwd();
  process.chdir(dataDir);
  try { return net.connect('server.sock'); } finally { process.chdir(here); }
}

/** Sends raw bytes to the server socket of dataDir, without a client process; resolves
 *  to the reply lines once `lines` (default 1) arrived, the server closed the connection,
 *  or `ms` (default 5 s) passed. Rejects if it cannot connect. */
export function rawRequest(dataDir: string, data: string, opts: { end?: boolean; lines?: number; ms?: number } = {}): Promise<{ lines: string[]; closed: boolean }> {
  return new Promise((resolve, reject) => {
    const c = connectTo(dataDir);
    let buf = '', closed = false, done = false;
    const finish = () => { if (!done) { done = true; clearTimeout(timer); c.destroy(); resolve({ lines: buf.split('\n').filter(Boolean), closed }); } };
    const timer = setTimeout(finish, opts.ms ?? 5000);
    c.on('error', (e) => { if (!done) { done = true; clearTimeout(timer); reject(e); } });
    c.on('connect', () => { if (opts.end) c.end(data); else c.write(data); });
    c.on('data', (d) => { buf += d; if (buf.split('\n').filter(Boolean).length >= (opts.lines ?? 1)) finish(); });
    c.on('close', () => { closed = true; finish(); });
  });
}

/** One operation over the socket, as the client sends it, without a client process (cheap
 *  enough to poll): resolves to its answer (the line with `ok`, true or false) once it
 *  comes, after handing each streamed line before it to onLine; rejects when the server
 *  closes without an answer or takes longer than ms (default 30 s). */
export function socketOp(dataDir: string, msg: object, onLine: (m: any) => void = () => {}, ms = 30_000): Promise<any> {
  return new Promise((resolve, reject) => {
    const c = connectTo(dataDir);
    let buf = '', done = false, answer: any;
    const finish = (fn: () => void) => { if (!done) { done = true; clearTimeout(timer); c.destroy(); fn(); } };
    const timer = setTimeout(() => finish(() => reject(new Error(`no answer to ${JSON.stringify(msg)} in ${ms} ms`))), ms);
    c.on('error', (e) => finish(() => reject(e)));
    c.on('connect', () => c.write(JSON.stringify(msg) + '\n'));
    c.on('data', (d) => {
      buf += d;
      let nl;
      while (answer === undefined && (nl = buf.indexOf('\n')) >= 0) {
        const m = JSON.parse(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
        if (m.ok === undefined) onLine(m);
        else { answer = m; c.end(); }
      }
    });
    // Resolved once the server has closed its end too, so that a test counting the
    // server's clients (socketClients) right after does not count this one.
    c.on('close', () => finish(() => (answer !== undefined ? resolve(answer)
      : reject(new Error(`the server closed the connection without answering ${JSON.stringify(msg)}`)))));
  });
}

/** How many clients are connected to the server socket of `dataDir` now (Linux: the
 *  accepted sockets in /proc/net/unix carry the listener's path, state 03). */
export function socketClients(dataDir: string): number {
  const sock = path.join(dataDir, 'server.sock');
  return fs.readFileSync('/proc/net/unix', 'utf8').split('\n')
    .filter((l) => l.endsWith(` ${sock}`) && l.split(/\s+/)[5] === '03').length;
}

/** A server's resident memory in MiB. */
export const rssMiB = (s: TestServer) => Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${s.proc.pid}/status`, 'utf8'))![1]) / 1024;

// ---------------------------------------------------------------- tier 1: the pure core

/** Applies events to a state in order (the core's applyEvent, as a replay does). */
export const apply = (st: State, ...evs: Event[]) => { for (const ev of evs) applyEvent(st, ev); };

/** mulberry32: a small seeded PRNG, so that a failure can be replayed from its seed. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
