// Real ssh hosts for tier-3 tests: one sshd per loopback address.
//
// startHosts(n) starts n sshd processes as hosts 127.0.0.2, 127.0.0.3, …, all on one free
// port above 1024, each bound to its own address, with generated host keys, a generated user
// key and a generated ssh config: tests run `ssh -F hosts.sshConfig 127.0.0.2 …` and
// `rsync -e 'ssh -F …'`. Every host has a scratch directory standing in for its disk: each
// session runs in it with HOME set to it, so `ssh 127.0.0.2 pwd` prints host 2's scratch and
// `rsync f 127.0.0.2:sub/` lands in it. Faults are real: kill() refuses connections, stop()
// hangs the host (new connections never get a banner, open ones go silent), and hosts listed
// in noKeyHosts reject the user key. A host's scratch/bin, when it exists, comes first on
// the PATH of its sessions (for stand-ins of programs such as nvidia-smi).
//
// Files, under one short temporary directory (paths stay short and need no quoting):
//   user_key, user_key.pub, known_hosts, ssh_config, authorized_keys, session.sh
//   h2/host_key, h2/sshd_config, h2/sshd.log, h2/scratch/   (one hN per host: N = its index + 2,
//   the last octet of 127.0.0.N)
//
// Processes: sshd forks a process per connection, each in its own session, so killing the
// listener leaves them running. close() kills the listeners, the per-connection processes
// (descendants of a listener, remembered at kill()) and every session process (marked by
// DJS_TEST_HOSTS=<dir> in its environment), then removes the directory. Process exit does the
// same for hosts a test forgot to close.
//
// Works as root (creates /run/sshd, sshd's privilege separation directory, when missing) and
// as a normal user (sshd then runs unprivileged and admits only that user). Linux only (/proc).
// Processes, polling and /proc come from the shared harness, test/server.ts.

import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import type { TestContext } from 'node:test';
import { allPids, packagesFor, procStat, removeDir, ROOT, run, serve, tempDir, until, which, writeScript, type TestServer } from './server.ts';

// ---------------------------------------------------------------- vocabulary

/** One host: an sshd listening on its own loopback address. */
export interface TestHost {
  /** The host's address, e.g. '127.0.0.2'; also its name in the ssh config. */
  addr: string;
  /** The host's disk: working directory and HOME of every session on it. */
  scratch: string;
  /** Kills the listening sshd: new connections are refused; open sessions go on. */
  kill(): Promise<void>;
  /** Kills the listening sshd and every connection and session of the host, as when the
   *  machine dies: open connections are closed, new ones refused. restart() undoes it. */
  crash(): Promise<void>;
  /**
   * Hangs the host: SIGSTOPs its sshd and everything it started. New connections are
   * accepted but the banner never comes; open sessions go silent (ServerAlive notices).
   */
  stop(): void;
  /** Undoes stop(): SIGCONTs every process it stopped. */
  cont(): void;
  /** Starts the host's sshd again after kill(); resolves once it accepts logins. */
  restart(): Promise<void>;
  /** Logins so far (new connections authenticated), from the host's sshd log. */
  logins(): number;
  /** Connections sshd dropped so far for its MaxStartups limit, from its log. */
  drops(): number;
}

/** A set of hosts started together; close() ends every process they started. */
export interface TestHosts {
  /** ssh config file with a `Host <addr>` block per host: `ssh -F sshConfig <addr> …`. */
  sshConfig: string;
  /** The one port every host listens on. */
  port: number;
  /** The temporary directory holding keys, configs, logs and scratch directories. */
  dir: string;
  hosts: TestHost[];
  /** Kills every process of these hosts (listeners, connections, sessions); removes dir. */
  close(): Promise<void>;
}

export interface HostsOptions {
  /** Indexes into hosts whose sshd rejects the user key ("Permission denied"). */
  noKeyHosts?: number[];
  /**
   * sshd_config settings of every host, by keyword: each replaces the harness's own
   * (`MaxStartups: '10:30:100'` restores sshd's default limit of new connections) or
   * is added (`MaxSessions: '10'`).
   */
  sshd?: Record<string, string>;
  /** The hosts' addresses instead of 127.0.0.2, …: e.g. ['::1'] for an IPv6 host (see
   *  ipv6LoopbackMissing). Host I's files are then in h{I+2}. */
  addrs?: string[];
}

/** Why this machine cannot have an IPv6 loopback host ('' when it can): ::1 must be
 *  bindable. */
export async function ipv6LoopbackMissing(): Promise<string> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', (e: NodeJS.ErrnoException) => resolve(`this machine has no IPv6 loopback (::1: ${e.code ?? e.message})`));
    server.listen(0, '::1', () => server.close(() => resolve('')));
  });
}

const MARKER = 'DJS_TEST_HOSTS';
const READY_MS = 15_000;
const CLOSE_MS = 5_000;
const PORT_MIN = 20_000; // below Linux's ephemeral range (32768+), so outgoing connections don't hold it
const PORT_SPAN = 12_000;

// ---------------------------------------------------------------- tools present?

/** The sshd binary (sshd re-executes itself, so the path must be absolute), or ''. */
function sshdPath(): string {
  try {
    fs.accessSync('/usr/sbin/sshd', fs.constants.X_OK);
    return '/usr/sbin/sshd';
  } catch {
    return which('sshd');
  }
}

/** Debian packages missing for real ssh hosts: openssh-server, openssh-client, rsync. */
export function sshMissing(): string[] {
  const missing: string[] = [];
  if (!sshdPath()) missing.push('openssh-server');
  if (!which('ssh') || !which('ssh-keygen')) missing.push('openssh-client');
  if (!which('rsync')) missing.push('rsync');
  return missing;
}

const sshPackages = packagesFor('real ssh hosts', sshMissing);
const missingMessage = sshPackages.message;
/** For `describe(name, { skip: sshSkip() }, …)`: a skip message naming the missing
 *  packages, or false (under CI always false: startHosts() then fails). */
export const sshSkip = sshPackages.skip;
/** Inside a test: skips it (returning true) when packages are missing; under CI a missing
 *  package fails the test instead. */
export const skipUnlessSsh = sshPackages.skipUnless;

// ---------------------------------------------------------------- small process helpers

/** Resolves when CHILD has exited (at once if it already has). */
function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  child.ref(); // keep the event loop alive while someone waits for it
  return new Promise((resolve) => child.once('exit', () => resolve()));
}

function running(child: ChildProcess | undefined): child is ChildProcess {
  return child !== undefined && child.exitCode === null && child.signalCode === null;
}

interface Proc {
  pid: number;
  ppid: number;
  start: string; // start time in clock ticks: with pid, identifies a process across pid reuse
  zombie: boolean;
}

/** Every process in /proc (a snapshot; processes may vanish while it is read). */
function readProcs(): Proc[] {
  const procs: Proc[] = [];
  for (const pid of allPids()) {
    const s = procStat(pid);
    if (s) procs.push({ pid, ppid: s.ppid, start: s.start, zombie: s.state === 'Z' });
  }
  return procs;
}

function argvOf(pid: number): string[] {
  try {
    const raw = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    return raw.split('\0').slice(0, -1);
  } catch {
    return [];
  }
}

function envHas(pid: number, entry: string): boolean {
  try {
    return fs.readFileSync(`/proc/${pid}/environ`, 'latin1').split('\0').includes(entry);
  } catch {
    return false; // gone, or not ours to read
  }
}

/** ROOTS and all their descendants among PROCS. */
function withDescendants(roots: Set<number>, procs: Proc[]): Set<number> {
  const all = new Set(roots);
  let grew = true;
  while (grew) {
    grew = false;
    for (const p of procs) {
      if (!all.has(p.pid) && all.has(p.ppid)) {
        all.add(p.pid);
        grew = true;
      }
    }
  }
  return all;
}

/** Sends SIG to PID unless it is gone already. */
function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    // gone already
  }
}

/** Pids of live processes whose argv starts with exactly ARGV, e.g. ['sleep', '30.5']. */
export function findProcesses(argv: string[]): number[] {
  return readProcs()
    .filter((p) => !p.zombie && p.pid !== process.pid)
    .filter((p) => {
      const args = argvOf(p.pid);
      return argv.every((a, i) => args[i] === a);
    })
    .map((p) => p.pid);
}

// ---------------------------------------------------------------- starting hosts

const open = new Set<{ killAll(): number; dir: string }>();
let exitHookInstalled = false;

/** Kills what every unclosed TestHosts started when the test process exits. */
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const h of open) {
      h.killAll();
      fs.rmSync(h.dir, { recursive: true, force: true });
    }
  });
}

/** True when PORT can be bound on every one of ADDRS right now. */
async function portFree(port: number, addrs: string[]): Promise<boolean> {
  for (const addr of addrs) {
    const ok = await new Promise<boolean>((resolve) => {
      const server = net.createServer();
      server.once('error', () => resolve(false));
      server.listen(port, addr, () => server.close(() => resolve(true)));
    });
    if (!ok) return false;
  }
  return true;
}

async function pickPort(addrs: string[]): Promise<number> {
  for (let i = 0; i < 50; i++) {
    const port = PORT_MIN + Math.floor(Math.random() * PORT_SPAN);
    if (await portFree(port, addrs)) return port;
  }
  throw new Error(`no free port for ${addrs.join(', ')} in ${PORT_MIN}..${PORT_MIN + PORT_SPAN}`);
}

async function keygen(file: string): Promise<string> {
  const r = await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'djs-test', '-f', file]);
  if (r.code !== 0) throw new Error(`ssh-keygen failed for '${file}': ${r.stderr.trim()}`);
  return fs.readFileSync(`${file}.pub`, 'utf8').trim();
}

/** True when a connection to ADDR:PORT gets an SSH banner within a second. */
function bannerComes(addr: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, addr);
    const done = (ok: boolean) => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(1000, () => done(false));
    socket.once('data', (data) => done(data.toString('latin1').startsWith('SSH-')));
    socket.once('error', () => done(false));
  });
}

/**
 * Starts N hosts (127.0.0.2 … 127.0.0.{N+1}) and resolves once every one answers: a real
 * login for key hosts, an SSH banner for noKeyHosts. Rejects naming the package when ssh
 * tools are missing.
 */
export async function startHosts(n: number, options: HostsOptions = {}): Promise<TestHosts> {
  const missing = sshMissing();
  if (missing.length > 0) throw new Error(missingMessage(missing));
  if (!(n >= 1 && n <= 250)) throw new Error(`host count out of range '${n}'`);
  const sshd = sshdPath();
  if (process.getuid?.() === 0) fs.mkdirSync('/run/sshd', { recursive: true, mode: 0o755 });

  const dir = tempDir('djsh-');
  assert.match(dir, /^[\w/.-]+$/, 'the hosts dir goes into ssh and sshd configs unquoted');
  const user = os.userInfo().username;
  const addrs = options.addrs ?? Array.from({ length: n }, (_, i) => `127.0.0.${i + 2}`);
  if (addrs.length !== n) throw new Error(`${n} hosts, ${addrs.length} addresses`);
  const noKey = new Set(options.noKeyHosts ?? []);
  const orphans = new Map<number, string>(); // per-connection sshd processes of killed listeners
  const listeners: (ChildProcess | undefined)[] = [];
  const stopped = addrs.map(() => new Map<number, string>()); // pid → start, per host, by stop()

  /** SIGKILLs every process of these hosts; returns how many live ones it found. */
  function killAll(): number {
    const procs = readProcs();
    const byPid = new Map(procs.map((p) => [p.pid, p]));
    const roots = new Set<number>();
    for (const child of listeners) if (running(child) && child.pid) roots.add(child.pid);
    for (const [pid, start] of orphans) if (byPid.get(pid)?.start === start) roots.add(pid);
    for (const p of procs) if (!p.zombie && envHas(p.pid, `${MARKER}=${dir}`)) roots.add(p.pid);
    roots.delete(process.pid);
    let live = 0;
    for (const pid of withDescendants(roots, procs)) {
      if (byPid.get(pid)?.zombie) continue;
      live++;
      signal(pid, 'SIGKILL');
    }
    return live;
  }
  const handle = { killAll, dir };
  open.add(handle);
  installExitHook();

  try {
    const port = await pickPort(addrs);
    const userKey = path.join(dir, 'user_key');
    const authorizedKeys = path.join(dir, 'authorized_keys');
    const knownHosts = path.join(dir, 'known_hosts');
    const sshConfig = path.join(dir, 'ssh_config');
    const session = path.join(dir, 'session.sh');

    const hostDirs = addrs.map((_, i) => path.join(dir, `h${i + 2}`));
    for (const d of hostDirs) fs.mkdirSync(path.join(d, 'scratch'), { recursive: true });
    const [userPub, ...hostPubs] = await Promise.all([
      keygen(userKey),
      ...hostDirs.map((d) => keygen(path.join(d, 'host_key'))),
    ]);
    fs.writeFileSync(authorizedKeys, `${userPub}\n`, { mode: 0o600 });
    fs.writeFileSync(
      knownHosts,
      addrs.map((addr, i) => `[${addr}]:${port} ${hostPubs[i].split(' ').slice(0, 2).join(' ')}\n`).join(''),
    );
    // Every session runs this (ForceCommand) with its host's scratch dir as $1.
    fs.writeFileSync(
      session,
      [
        '#!/bin/sh',
        '# session.sh SCRATCH: runs the ssh command (or a login shell) in SCRATCH, with HOME=SCRATCH.',
        'cd "$1" || exit 1',
        'HOME=$1',
        '# A host\'s own programs (a stand-in nvidia-smi, say) go in SCRATCH/bin, first on its PATH.',
        '[ -d "$1/bin" ] && PATH="$1/bin:$PATH" && export PATH',
        `${MARKER}=${dir}`,
        `export HOME ${MARKER}`,
        'if [ -n "${SSH_ORIGINAL_COMMAND+set}" ]; then exec "${SHELL:-/bin/sh}" -c "$SSH_ORIGINAL_COMMAND"; fi',
        'exec "${SHELL:-/bin/sh}" -l',
        '',
      ].join('\n'),
      { mode: 0o755 },
    );
    fs.writeFileSync(
      sshConfig,
      addrs
        .map((addr) =>
          [
            `Host ${addr}`,
            `  Port ${port}`,
            `  User ${user}`,
            `  IdentityFile ${userKey}`,
            '  IdentitiesOnly yes',
            '  IdentityAgent none',
            `  UserKnownHostsFile ${knownHosts}`,
            '  GlobalKnownHostsFile /dev/null',
            '  StrictHostKeyChecking yes',
            '  UpdateHostKeys no',
            '  PasswordAuthentication no',
            '  KbdInteractiveAuthentication no',
            '  BatchMode yes',
            '  KexAlgorithms curve25519-sha256', // a third faster than the default: tests connect a lot
            '',
          ].join('\n'),
        )
        .join('\n'),
    );
    /** Replaces the lines of keywords in options.sshd, adds the others. */
    const withOptions = (lines: string[]) => {
      const extra = { ...options.sshd };
      const out = lines.map((line) => {
        const key = line.split(' ')[0];
        if (!Object.hasOwn(extra, key)) return line;
        const v = extra[key];
        delete extra[key];
        return `${key} ${v}`;
      });
      return [...Object.entries(extra).map(([k, v]) => `${k} ${v}`), ...out];
    };
    addrs.forEach((addr, i) => {
      fs.writeFileSync(
        path.join(hostDirs[i], 'sshd_config'),
        withOptions([
          `ListenAddress ${addr.includes(':') ? `[${addr}]` : addr}:${port}`,
          `HostKey ${path.join(hostDirs[i], 'host_key')}`,
          'PidFile none',
          `AuthorizedKeysFile ${noKey.has(i) ? 'none' : authorizedKeys}`,
          'PubkeyAuthentication yes',
          'PasswordAuthentication no',
          'KbdInteractiveAuthentication no',
          'PermitRootLogin prohibit-password',
          'UsePAM no',
          'StrictModes no',
          'UseDNS no',
          'PrintMotd no',
          'PrintLastLog no',
          'X11Forwarding no',
          'MaxStartups 200', // many jobs may connect at once (options.sshd may set sshd's default)
          'LoginGraceTime 30',
          // bash sources ~/.bashrc for commands run by sshd unless it is a nested shell;
          // a host's sessions must not run whatever the test user's rc files do (on this
          // kind of machine, a `pyenv rehash` that takes a lock every session shares).
          'SetEnv SHLVL=1',
          `ForceCommand ${session} ${path.join(hostDirs[i], 'scratch')}`,
          '',
        ]).join('\n'),
      );
    });

    /** Lines of host I's sshd log that match RE. */
    const countLog = (i: number, re: RegExp) =>
      fs.readFileSync(path.join(hostDirs[i], 'sshd.log'), 'utf8').split('\n').filter((l) => re.test(l)).length;

    /** Starts host I's sshd in the foreground (-D), logging to its sshd.log. */
    function spawnSshd(i: number): ChildProcess {
      const log = fs.openSync(path.join(hostDirs[i], 'sshd.log'), 'a');
      const child = spawn(sshd, ['-D', '-e', '-f', path.join(hostDirs[i], 'sshd_config')], {
        stdio: ['ignore', log, log],
      });
      fs.closeSync(log);
      child.on('error', () => {}); // shows up as an exit; waitReady reports the log
      child.unref(); // a forgotten close() must not keep the test process alive
      listeners[i] = child;
      return child;
    }

    /** Resolves once host I answers (a login, or a banner for a no-key host); rejects at
     *  the deadline (naming ssh's last complaint), or at once if its sshd exited. */
    async function waitReady(i: number): Promise<void> {
      const outcome = await until(async () => {
        if (!running(listeners[i])) return 'exited';
        if (noKey.has(i)) return (await bannerComes(addrs[i], port)) && 'ready';
        const r = await run('ssh', ['-F', sshConfig, '-o', 'ConnectTimeout=2', addrs[i], 'true'], { timeoutMs: 5000 });
        if (r.code !== 0) throw new Error(r.stderr.trim());
        return 'ready';
      }, `sshd for ${addrs[i]} to accept logins`, READY_MS);
      if (outcome === 'exited') {
        const log = fs.readFileSync(path.join(hostDirs[i], 'sshd.log'), 'utf8').trim();
        throw new Error(`sshd for ${addrs[i]} exited: ${log.split('\n').slice(-3).join(' | ')}`);
      }
    }

    const hosts: TestHost[] = addrs.map((addr, i) => ({
      addr,
      scratch: path.join(hostDirs[i], 'scratch'),
      async kill() {
        const child = listeners[i];
        if (!running(child)) return;
        const procs = readProcs();
        for (const pid of withDescendants(new Set([child.pid!]), procs)) {
          const p = procs.find((q) => q.pid === pid);
          if (pid !== child.pid && p && !p.zombie) orphans.set(pid, p.start);
        }
        child.kill('SIGKILL');
        await exited(child);
      },
      async crash() {
        const child = listeners[i];
        assert.ok(running(child), `host not running '${addr}'`);
        child.kill('SIGSTOP'); // first, so it forks nothing new
        for (const pid of withDescendants(new Set([child.pid!]), readProcs())) signal(pid, 'SIGKILL');
        await exited(child);
      },
      stop() {
        const child = listeners[i];
        assert.ok(running(child), `host not running '${addr}'`);
        child.kill('SIGSTOP'); // first, so it forks nothing new
        const procs = readProcs();
        for (const pid of withDescendants(new Set([child.pid!]), procs)) {
          const p = procs.find((q) => q.pid === pid);
          if (!p || p.zombie) continue;
          stopped[i].set(pid, p.start);
          signal(pid, 'SIGSTOP');
        }
      },
      cont() {
        const byPid = new Map(readProcs().map((p) => [p.pid, p]));
        for (const [pid, start] of stopped[i]) if (byPid.get(pid)?.start === start) signal(pid, 'SIGCONT');
        stopped[i].clear();
      },
      async restart() {
        assert.ok(!running(listeners[i]), `host still running '${addr}'`);
        spawnSshd(i);
        await waitReady(i);
      },
      logins: () => countLog(i, /Accepted publickey/),
      drops: () => countLog(i, /past MaxStartups/),
    }));

    addrs.forEach((_, i) => spawnSshd(i));
    await Promise.all(addrs.map((_, i) => waitReady(i)));

    return {
      sshConfig,
      port,
      dir,
      hosts,
      async close() {
        await until(() => killAll() === 0, `the processes of hosts in '${dir}' to be gone (they survive SIGKILL?)`, CLOSE_MS, 20);
        await Promise.all(listeners.map((child) => (child ? exited(child) : undefined)));
        open.delete(handle);
        await removeDir(dir);
      },
    };
  } catch (err) {
    killAll();
    open.delete(handle);
    await removeDir(dir);
    throw err;
  }
}

// ---------------------------------------------------------------- a server on the hosts

const EXAMPLE_JOB = path.join(ROOT, 'example_job.sh');
/** The ssh timeout (DJS_SSH_TIMEOUT, seconds) of a server of serveOnHosts. */
export const SSH_TIMEOUT_S = 2;

/** n ssh hosts and a server whose ssh reaches them (DJS_SSH_CONFIG, a 2 s ssh timeout,
 *  probes backing off to 2 s, and `env`), with example_job.sh in its dir; all of it ends
 *  with the test: the server (and its jobs) first, then the hosts. */
export async function serveOnHosts(t: TestContext, n: number, opts: HostsOptions & { env?: NodeJS.ProcessEnv } = {}): Promise<{ hosts: TestHosts; s: TestServer }> {
  const hosts = await startHosts(n, opts);
  const s = await serve(t, { env: { DJS_SSH_CONFIG: hosts.sshConfig, DJS_SSH_TIMEOUT: String(SSH_TIMEOUT_S), DJS_PROBE_BACKOFF_MAX: '2', ...opts.env } })
    .catch(async (e) => { await hosts.close(); throw e; });
  t.after(() => hosts.close());
  fs.copyFileSync(EXAMPLE_JOB, path.join(s.dir, 'example_job.sh'));
  fs.chmodSync(path.join(s.dir, 'example_job.sh'), 0o755);
  return { hosts, s };
}

/** A job script in `dir`: example_job.sh with some environment of its own (`env`, as
 *  NAME=VALUE words). */
export const exampleVariant = (dir: string, name: string, env: string) => writeScript(dir, name, `${env} exec ${JSON.stringify(EXAMPLE_JOB)} "$@"`);
