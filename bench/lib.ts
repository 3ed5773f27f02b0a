// Shared helpers of the benchmark suite: processes, timing, statistics, servers,
// the socket protocol, and the result records every benchmark returns.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { onLines } from '../cli.ts';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
/** The cli.ts under test: this repository's, or DJS_BENCH_CLI (e.g. a patched copy, for before/after runs). */
export const CLI = process.env.DJS_BENCH_CLI ? path.resolve(process.env.DJS_BENCH_CLI) : path.join(ROOT, 'cli.ts');

// ---- options every benchmark gets ---------------------------------------------

export type Opts = {
  quick: boolean;
  runs: number;                 // repetitions of whole-run measurements
  node24: string | null;        // directory holding a Node 24 `node`, or null
  patched: { label: string; path: string }[];  // other cli.ts files to compare against (--patched PATH,...)
  log: (msg: string) => void;   // progress lines (stderr)
};

// ---- results ---------------------------------------------------------------------

export type Row = { label: string; value: string; detail?: string };
export type Target = { what: string; measured: string; limit: string; met: boolean | null };
export type Section = { title: string; columns: string[]; rows: string[][] };
export type BenchResult = {
  name: string; title: string;
  sections: Section[];
  targets: Target[];
  notes: string[];
  seconds: number;
};

// ---- statistics ------------------------------------------------------------------

export function median(xs: number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}
export function quantile(xs: number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))];
}
export const min = (xs: number[]) => Math.min(...xs);
export const max = (xs: number[]) => Math.max(...xs);
export const fmt = (x: number, digits = 1) => (Number.isFinite(x) ? x.toFixed(digits) : '-');
export const ms = (x: number, digits = 1) => `${fmt(x, digits)} ms`;
/** "median (min–max, n=K)" for a list of milliseconds. */
export const spread = (xs: number[], digits = 1) => `${fmt(median(xs), digits)} (${fmt(min(xs), digits)}–${fmt(max(xs), digits)}, n=${xs.length})`;

// ---- time --------------------------------------------------------------------------

/** Milliseconds on a monotonic clock. */
export const now = () => performance.now();
/** Wall clock in ms with sub-ms precision (comparable to `date +%s%N`). */
export const wallMs = () => performance.timeOrigin + performance.now();
export const sleep = (msec: number) => new Promise<void>((r) => setTimeout(r, msec));

export async function until<T>(fn: () => T | Promise<T>, what: string, timeoutMs = 30_000, everyMs = 10): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v as NonNullable<T>;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

// ---- processes -----------------------------------------------------------------------

export type RunResult = { code: number | null; stdout: string; stderr: string; ms: number; endWall: number };
type RunOpts = { cwd?: string; env?: NodeJS.ProcessEnv; input?: string; quiet?: boolean };

const children = new Set<ChildProcess>();
/** Processes we started that must not outlive the bench (servers, tracers). */
export function track(child: ChildProcess): ChildProcess {
  children.add(child);
  child.on('exit', () => children.delete(child));
  return child;
}
export function killTracked(): void {
  for (const c of children) if (c.pid && c.exitCode === null && c.signalCode === null) { try { c.kill('SIGTERM'); } catch { /* gone */ } }
}

/** Runs a program to completion, timing it from spawn to exit. */
export function run(cmd: string, args: string[], opts: RunOpts = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const t0 = now();
    const child = spawn(cmd, args, { cwd: opts.cwd, env: opts.env ?? process.env, stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
    let stdout = '', stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (d) => { if (!opts.quiet) stdout += d; });
    child.stderr!.setEncoding('utf8').on('data', (d) => { stderr += d; });
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr, ms: now() - t0, endWall: wallMs() }));
    if (opts.input !== undefined) child.stdin!.end(opts.input);
  });
}

/** Like run, but fails unless the program exits 0. */
export async function runOk(cmd: string, args: string[], opts: RunOpts = {}): Promise<RunResult> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}: ${r.stderr.trim().slice(0, 500)}`);
  return r;
}

/** Runs a shell command line (bash -c) to completion. */
export const bash = (script: string, opts: RunOpts = {}) => runOk('bash', ['-c', script], opts);

/** Full path of a program on PATH, or null. */
export function which(prog: string, env: NodeJS.ProcessEnv = process.env): string | null {
  for (const dir of (env.PATH ?? '').split(':')) {
    const f = path.join(dir || '.', prog);
    try { fs.accessSync(f, fs.constants.X_OK); if (fs.statSync(f).isFile()) return f; } catch { /* next */ }
  }
  return null;
}

export function tempDir(prefix = 'djsb-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export function writeScript(file: string, body: string): string {
  fs.writeFileSync(file, `#!/bin/sh\n${body}\n`, { mode: 0o755 });
  return file;
}

/** A copy of the cli.ts under test in a directory of its own, without node_modules: on
 *  Node >= 22.18 it runs with native type stripping, not the cached JS copy that runs on
 *  Node 20 leave in node_modules/.cache/djs (which any node would run). */
export function bareCli(dir: string): string {
  const d = path.join(dir, 'bare');
  fs.mkdirSync(d, { recursive: true });
  const file = path.join(d, 'cli.ts');
  fs.copyFileSync(CLI, file);
  fs.chmodSync(file, 0o755);
  return file;
}

/** Environment with Node 24's directory first on PATH (so ./cli.ts's `exec node` runs it). */
export function envWithNode(dir: string | null): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, NO_COLOR: '1' };
  if (dir) env.PATH = `${dir}:${env.PATH}`;
  return env;
}

// ---- /proc ------------------------------------------------------------------------------

/** VmRSS and VmHWM of a process, in MiB. */
export function memOf(pid: number): { rss: number; hwm: number } {
  const text = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? NaN);
  return { rss: kb('VmRSS') / 1024, hwm: kb('VmHWM') / 1024 };
}
/** CPU seconds (user + system) a process has used so far. */
export function cpuOf(pid: number, withReapedChildren = false): number {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12]) + (withReapedChildren ? Number(f[13]) + Number(f[14]) : 0)) / 100;
  } catch { return NaN; }
}
/** Pids of the children of a process (Linux). */
export function childrenOf(pid: number): number[] {
  const out: number[] = [];
  try {
    for (const t of fs.readdirSync(`/proc/${pid}/task`)) {
      const text = fs.readFileSync(`/proc/${pid}/task/${t}/children`, 'utf8').trim();
      if (text) out.push(...text.split(/\s+/).map(Number));
    }
  } catch { /* gone */ }
  return out;
}
/** Parses the second line of bash's `times` (the shell's reaped children): user + sys seconds. */
export function parseTimes(text: string): number {
  const lines = text.trim().split('\n');
  const last = lines[lines.length - 1] ?? '';
  const secs = [...last.matchAll(/(\d+)m([\d.]+)s/g)].map((m) => Number(m[1]) * 60 + Number(m[2]));
  return secs.length === 2 ? secs[0] + secs[1] : NaN;
}
/** CPU seconds the whole machine spent busy (all CPUs, everything but idle and iowait). */
export function machineBusy(): number {
  const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
  const total = f.slice(0, 8).reduce((a, b) => a + b, 0);
  return (total - f[3] - f[4]) / 100;
}
export function loadAvg(): string {
  return os.loadavg().map((x) => x.toFixed(2)).join(' ');
}

// ---- the djs server ------------------------------------------------------------------------

export class Server {
  dataDir: string; logDir: string;
  proc!: ChildProcess;
  pid = 0;
  output = '';      // this server process's output
  allOutput = '';   // output of every process started by this object
  env: NodeJS.ProcessEnv;
  cliPath: string;
  constructor(dir: string, env: NodeJS.ProcessEnv = envWithNode(null), cliPath: string = CLI) {
    this.dataDir = path.join(dir, 'data');
    this.logDir = path.join(dir, 'logs');
    this.env = env;
    this.cliPath = cliPath;
  }

  /** Starts `cli.ts start` (or `node ARGS cli.ts start` when nodeArgs are given) and
   *  resolves with the milliseconds until its "server ready" line. */
  async start(nodeArgs?: string[]): Promise<number> {
    const t0 = now();
    const [cmd, args] = nodeArgs
      ? ['node', [...nodeArgs, this.cliPath, 'start', this.dataDir, this.logDir]]
      : [this.cliPath, ['start', this.dataDir, this.logDir]];
    this.output = '';
    const proc = track(spawn(cmd, args, { cwd: ROOT, env: this.env, stdio: ['ignore', 'pipe', 'pipe'] }));
    this.proc = proc;
    const ready = new Promise<number>((resolve, reject) => {
      const onData = (d: Buffer) => {
        this.output += d;
        this.allOutput += d;
        const m = /server ready: pid (\d+)/.exec(this.output);
        if (m && !this.pid) { this.pid = Number(m[1]); resolve(now() - t0); }
      };
      proc.stdout!.on('data', onData);
      proc.stderr!.on('data', onData);
      proc.on('exit', (code) => reject(new Error(`server exited (${code}) before it was ready: ${this.output.trim().slice(-500)}`)));
    });
    this.pid = 0;
    return ready;
  }

  cli(args: string[], opts: { env?: NodeJS.ProcessEnv; cwd?: string; input?: string; quiet?: boolean } = {}): Promise<RunResult> {
    return run(this.cliPath, ['--data-dir', this.dataDir, ...args], { env: opts.env ?? this.env, cwd: opts.cwd, input: opts.input, quiet: opts.quiet });
  }
  async ok(args: string[], opts: { env?: NodeJS.ProcessEnv; cwd?: string; input?: string; quiet?: boolean } = {}): Promise<RunResult> {
    const r = await this.cli(args, opts);
    if (r.code !== 0) throw new Error(`cli.ts ${args.join(' ')} exited ${r.code}: ${r.stderr.trim().slice(0, 500)}`);
    return r;
  }

  /** `cli.ts stop`, then waits for the process to be gone; resolves with the ms it took. */
  async stop(): Promise<number> {
    const t0 = now();
    const exited = new Promise<void>((r) => { if (this.proc.exitCode !== null || this.proc.signalCode !== null) r(); else this.proc.once('exit', () => r()); });
    await this.ok(['stop']);
    await exited;
    return now() - t0;
  }

  /** Stops the server if it still runs (used in finally blocks). */
  async close(): Promise<void> {
    if (!this.proc || this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    try { await this.stop(); } catch { try { this.proc.kill('SIGTERM'); } catch { /* gone */ } }
  }

  get socket(): string { return path.join(this.dataDir, 'server.sock'); }
  connect(): Promise<Conn> { return Conn.open(this.socket); }
}

/** One client connection speaking the newline-delimited JSON protocol: one request at a
 *  time, each resolved with the answer line that carries `ok`. */
export class Conn {
  sock: net.Socket;
  waiting: { resolve: (m: Record<string, unknown>) => void; reject: (e: Error) => void; onLine?: (m: Record<string, unknown>) => void } | null = null;
  constructor(sock: net.Socket) {
    this.sock = sock;
    onLines(sock, (line) => {
      const m = JSON.parse(line) as Record<string, unknown>;
      const w = this.waiting;
      if (!w) return;
      if (m.ok === undefined) return w.onLine?.(m);
      this.waiting = null;
      if (m.ok) w.resolve(m); else w.reject(new Error(String(m.error)));
    });
    sock.on('error', (e) => { this.waiting?.reject(e); this.waiting = null; });
    sock.on('close', () => { this.waiting?.reject(new Error('connection closed')); this.waiting = null; });
  }
  static open(file: string): Promise<Conn> {
    return new Promise((resolve, reject) => {
      const s = net.connect(file);
      s.once('connect', () => resolve(new Conn(s)));
      s.once('error', reject);
    });
  }
  request(msg: Record<string, unknown>, onLine?: (m: Record<string, unknown>) => void): Promise<Record<string, unknown>> {
    if (this.waiting) throw new Error('one request at a time');
    return new Promise((resolve, reject) => {
      this.waiting = { resolve, reject, onLine };
      this.sock.write(JSON.stringify(msg) + '\n');
    });
  }
  close(): void { this.sock.end(); }
}

// ---- tracing fsyncs ---------------------------------------------------------------------

/** Counts fdatasync/fsync calls of a process's main thread with strace -c while fn runs.
 *  Returns null counts when strace is missing or cannot attach. */
export async function countSyncs<T>(pid: number, fn: () => Promise<T>, log: (m: string) => void): Promise<{ result: T; syncs: number | null; why?: string }> {
  const strace = which('strace');
  if (!strace) return { result: await fn(), syncs: null, why: 'strace not installed (Debian package strace)' };
  const out = path.join(tempDir('djsb-strace-'), 'out');
  const tracer = track(spawn(strace, ['-c', '-e', 'trace=fdatasync,fsync', '-o', out, '-p', String(pid)], { stdio: ['ignore', 'ignore', 'pipe'] }));
  let err = '';
  tracer.stderr!.on('data', (d) => { err += d; });
  const exited = new Promise<void>((r) => tracer.on('exit', () => r()));
  try {
    await until(() => /attached/.test(err) || tracer.exitCode !== null, 'strace to attach', 10_000);
  } catch { /* go on: counts may be missing */ }
  if (tracer.exitCode !== null) return { result: await fn(), syncs: null, why: `strace could not attach: ${err.trim()}` };
  const result = await fn();
  tracer.kill('SIGINT');
  await exited;
  const text = fs.existsSync(out) ? fs.readFileSync(out, 'utf8') : '';
  let syncs = 0;
  for (const m of text.matchAll(/^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?f(?:data)?sync\s*$/gm)) syncs += Number(m[1]);
  fs.rmSync(path.dirname(out), { recursive: true, force: true });
  if (!/sync/.test(text)) log(`strace output had no sync line: ${text.trim().slice(0, 300)}`);
  return { result, syncs };
}

// ---- machine -------------------------------------------------------------------------------

export function machine(node24: string | null): Record<string, string> {
  const cpuinfo = fs.readFileSync('/proc/cpuinfo', 'utf8');
  const model = /^model name\s*:\s*(.*)$/m.exec(cpuinfo)?.[1] ?? os.cpus()[0]?.model ?? '?';
  const memKb = Number(/^MemTotal:\s+(\d+)/m.exec(fs.readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0);
  const ver = (cmd: string, args: string[]) => {
    const r = spawnSync(cmd, args, { encoding: 'utf8' });
    return r.status === 0 ? (r.stdout || r.stderr).split('\n')[0].trim() : 'missing';
  };
  const tsxVersion = (() => { try { return JSON.parse(fs.readFileSync(path.join(ROOT, 'node_modules/tsx/package.json'), 'utf8')).version; } catch { return '?'; } })();
  return {
    nproc: String(os.availableParallelism?.() ?? os.cpus().length),
    'model name': model,
    memory: `${(memKb / 1024 / 1024).toFixed(1)} GiB`,
    kernel: `${os.type()} ${os.release()}`,
    'node (PATH)': ver('node', ['--version']),
    'node 24': node24 ? ver(path.join(node24, 'node'), ['--version']) : 'missing',
    tsx: tsxVersion,
    bash: ver('bash', ['--version']),
    'filesystem of the temp dirs': `${os.tmpdir()}: ${spawnSync('df', ['--output=fstype', os.tmpdir()], { encoding: 'utf8' }).stdout.split('\n')[1]?.trim() ?? '?'}`,
    'cli.ts under test': CLI,
    xargs: ver('xargs', ['--version']),
    parallel: ver('parallel', ['--version']),
    tsp: which('tsp') ? ver('tsp', ['-V']).replace(/ - .*/, '') : 'missing',
    'load average at start': loadAvg(),
  };
}
