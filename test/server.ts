// Test harness for tier-2 tests: a real cli.ts server in its own temporary directory,
// driven through the real client, with polling to deadlines instead of sleeps.
import assert from 'node:assert/strict';
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const CLI = path.join(ROOT, 'cli.ts');

export type Run = { code: number; stdout: string; stderr: string };

/** Polls fn until it returns a truthy value; fails with `what` after the deadline. */
export async function until<T>(fn: () => T | Promise<T>, what: string, timeoutMs = 15_000, everyMs = 25): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v as NonNullable<T>;
    } catch (e) { last = e; }
    if (Date.now() > deadline) assert.fail(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${(last as Error).message}` : ''}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** A fresh short temporary directory (Unix socket paths must stay short). */
export function tempDir(prefix = 'djs-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** Writes an executable sh script. */
export function writeScript(dir: string, name: string, body: string): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, `#!/bin/sh\n${body}\n`, { mode: 0o755 });
  return file;
}

/** Runs `cli.ts args` to completion. */
export function runCli(args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv; input?: string } = {}): Promise<Run> {
  return new Promise((resolve) => {
    const child = execFile(CLI, args, { cwd: opts.cwd, env: { ...process.env, NO_COLOR: '1', ...opts.env }, maxBuffer: 1 << 28 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
    });
    if (opts.input !== undefined) child.stdin!.end(opts.input);
  });
}

export type TestServer = {
  dir: string; dataDir: string; logDir: string;
  proc: ChildProcess;
  output: () => string;
  /** Runs the client against this server (cwd = the test dir unless given). */
  cli: (args: string[], opts?: { cwd?: string; env?: NodeJS.ProcessEnv; input?: string }) => Promise<Run>;
  /** Like cli, but fails the test unless it exits 0. */
  ok: (args: string[], opts?: { cwd?: string; env?: NodeJS.ProcessEnv; input?: string }) => Promise<string>;
  status: () => Promise<any>;
  jobs: () => Promise<any[]>;
  job: (id: number | string) => Promise<any>;
  /** SIGKILL, as a crash. */
  crash: () => Promise<void>;
  stop: () => Promise<void>;
  /** Starts a new server process on the same dirs. */
  restart: () => Promise<TestServer>;
  exited: Promise<number | null>;
};

/** Starts `cli.ts start` in a temp dir (or the given one) and resolves once it is ready. */
export async function startServer(opts: { dir?: string; env?: NodeJS.ProcessEnv; args?: string[]; limitFiles?: number } = {}): Promise<TestServer> {
  const dir = opts.dir ?? tempDir();
  const dataDir = path.join(dir, '.data'), logDir = path.join(dir, 'logs');
  const env = { ...process.env, NO_COLOR: '1', ...opts.env };
  const args = ['start', dataDir, logDir, ...(opts.args ?? [])];
  // limitFiles: the server runs with that many file descriptors at most (ulimit -n).
  const proc = opts.limitFiles
    ? spawn('sh', ['-c', `ulimit -n ${opts.limitFiles} && exec "$0" "$@"`, CLI, ...args], { cwd: dir, env, stdio: ['ignore', 'pipe', 'pipe'] })
    : spawn(CLI, args, { cwd: dir, env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  proc.stdout!.on('data', (d) => { out += d; });
  proc.stderr!.on('data', (d) => { out += d; });
  const exited = new Promise<number | null>((r) => proc.on('exit', (code) => r(code)));
  let gone = false;
  exited.then(() => { gone = true; });
  await until(() => out.includes('server ready') || gone, 'the server to be ready', 30_000);
  assert.match(out, /server ready/, 'the server did not start');
  const cli = (args: string[], o: { cwd?: string; env?: NodeJS.ProcessEnv; input?: string } = {}) =>
    runCli(['--data-dir', dataDir, ...args], { cwd: o.cwd ?? dir, env: { ...opts.env, ...o.env }, input: o.input });
  const s: TestServer = {
    dir, dataDir, logDir, proc, exited, output: () => out, cli,
    ok: async (args, o) => {
      const r = await cli(args, o);
      assert.equal(r.code, 0, `cli ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
      return r.stdout;
    },
    status: async () => JSON.parse(await s.ok(['status', '--json'])),
    jobs: async () => JSON.parse(await s.ok(['list', '--json'])),
    job: async (id) => (await s.jobs()).find((j) => j.id === Number(id)),
    crash: async () => { if (!gone) { proc.kill('SIGKILL'); await exited; } },
    stop: async () => { if (!gone) { proc.kill('SIGTERM'); await exited; } },
    restart: () => startServer({ ...opts, dir }),
  };
  return s;
}

/** Kills every process whose environment says it belongs to a test dir (jobs that a
 *  test left running), so test files do not leak processes into each other. */
export function killJobsUnder(dir: string): void {
  for (const pid of fs.readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
    try {
      const cwd = fs.readlinkSync(`/proc/${pid}/cwd`);
      if (cwd === dir || cwd.startsWith(dir + '/')) process.kill(Number(pid), 'SIGKILL');
    } catch { /* gone or not ours */ }
  }
}

/** A client started without waiting for it: its output so far, and its end. */
export type RunningCli = {
  proc: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  /** Resolves when the client exits. */
  done: Promise<Run>;
  /** The exit code once it exited, else undefined (for polling with until). */
  exitCode: () => number | undefined;
};

/** Starts `cli.ts args` and returns at once; output is collected as it arrives. */
export function spawnCli(args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv; input?: string } = {}): RunningCli {
  const proc = spawn(CLI, args, { cwd: opts.cwd, env: { ...process.env, NO_COLOR: '1', ...opts.env }, stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '', err = '', code: number | undefined;
  proc.stdout!.on('data', (d) => { out += d; });
  proc.stderr!.on('data', (d) => { err += d; });
  proc.stdin!.on('error', () => {});
  if (opts.input !== undefined) proc.stdin!.end(opts.input); else proc.stdin!.end();
  const done = new Promise<Run>((resolve) => proc.on('close', (c, sig) => {
    code = c ?? 128 + (sig === 'SIGKILL' ? 9 : 15);
    resolve({ code, stdout: out, stderr: err });
  }));
  return { proc, stdout: () => out, stderr: () => err, done, exitCode: () => code };
}

/** True if process `pid` exists and is not a zombie. */
export function alive(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch { return false; }
}

/** The parent, process group, session and controlling terminal of a process, from /proc/PID/stat. */
export function procIds(pid: number): { ppid: number; pgrp: number; session: number; tty: number } {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { ppid: Number(f[1]), pgrp: Number(f[2]), session: Number(f[3]), tty: Number(f[4]) };
}

/** How many clients are connected to the server socket of `dataDir` now (Linux: the
 *  accepted sockets in /proc/net/unix carry the listener's path, state 03). */
export function socketClients(dataDir: string): number {
  const sock = path.join(dataDir, 'server.sock');
  return fs.readFileSync('/proc/net/unix', 'utf8').split('\n')
    .filter((l) => l.endsWith(` ${sock}`) && l.split(/\s+/)[5] === '03').length;
}

/** Reads a file, or '' if it does not exist (yet). */
export function readIf(file: string): string {
  try { return fs.readFileSync(file, 'utf8'); } catch { return ''; }
}

/** Ends a test's server (SIGKILL), every process left under its dir, and the dir. */
export async function cleanUp(s: TestServer | undefined, dir = s?.dir): Promise<void> {
  await s?.crash();
  if (dir) {
    killJobsUnder(dir);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** Resolves like p, or fails naming `what` if p takes longer than ms. */
export function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  const late = new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms); });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

/** Lets a gated job (one that waits for the file go.ID in its dir) finish. */
export const release = (s: TestServer, id: string | number) => fs.writeFileSync(path.join(s.dir, `go.${id}`), '');

/** Waits until a job has written its pid to pid.ID in the test dir, and returns it. */
export const pidOf = async (s: TestServer, id: string | number) =>
  Number(await until(() => readIf(path.join(s.dir, `pid.${id}`)).trim(), `job ${id} to write its pid`));

/** Waits for job id to finish (with `wait`, so nothing polls) and checks how it ended. */
export async function untilState(s: TestServer, id: string | number, state: string, ms = 15_000) {
  await within(s.cli(['wait', String(id)]), ms, `job ${id} to finish`);
  const job = await s.job(id);
  assert.equal(job?.state, state, `job ${id} ended ${job?.state}, not ${state}`);
  return job;
}
