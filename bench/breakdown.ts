// Where the CPU time of a job start goes. A fresh server (one worker of 8 slots) runs N
// trivial jobs (`cli.ts add_jobs` + `cli.ts wait`), and `xargs -P 8 -n 1` runs the same
// jobs in the same rounds, for this cli.ts and every --patched copy:
//   a. exact totals per job (/proc/PID/stat, no tracer): the server; its child processes
//      (the launcher) by themselves; everything they reaped (wrappers and job processes);
//      the clients (bash `times` around them).
//   b. by process role and kernel path: one more run of each under `perf record -a -g`
//      (CPU-clock samples every 0.25 ms of CPU, kernel call chains). Each sample goes to
//      the role of its process, found in the process tree that perf records (server; its
//      child processes = launcher; their descendants = wrappers, except the processes that
//      exec the job script = job, split at the exec), and to the syscall or kernel path
//      its kernel stack is in (user space when it has none).
//   c. syscalls per job by role: one smaller run of each under `strace -f -y` (counts
//      only; strace slows everything it traces).
// perf and strace parts are skipped (with a note) when the tool is missing.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { type BenchResult, type Opts, Server, childrenOf, fmt, median, now, parseTimes, run, sleep, tempDir, track, which, writeScript } from './lib.ts';

/** utime, stime, cutime, cstime of a process, in ms (zeros when it is gone). */
function statOf(pid: number): { u: number; s: number; cu: number; cs: number } {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ').map(Number);
    return { u: f[11] * 10, s: f[12] * 10, cu: f[13] * 10, cs: f[14] * 10 };
  } catch { return { u: 0, s: 0, cu: 0, cs: 0 }; }
}

type System = { label: string; cli?: string; tmpfs?: boolean };
type Exact = { wall: number; serverU: number; serverS: number; serverReaped: number; launcher: number; reaped: number; clients: number; own: number };

const ROLES = ['server', 'launcher', 'wrappers', 'job, before exec', 'job, the script', 'clients', 'rest of the machine'] as const;
type Role = typeof ROLES[number] | 'perf' | 'bench';
/** What each role is for xargs, whose tree is bash -c → seq, xargs → jobs. */
const XARGS_ROLE: Partial<Record<Role, string>> = { server: 'server (for xargs: its bash -c)', launcher: 'launcher (for xargs: xargs and seq)' };

// ---- the work: one run of a system ----------------------------------------------------

type Run = { dir: string; n: number };
function prepare(scratch: string[], n: number): Run {
  const dir = tempDir('djsb-b-');
  scratch.push(dir);
  writeScript(path.join(dir, 'job.sh'), `echo "\${JOB_ID:-$1}" >> ${path.join(dir, 'out.txt')}`);
  fs.writeFileSync(path.join(dir, 'jobs.txt'), './job.sh\n'.repeat(n));
  fs.writeFileSync(path.join(dir, 'out.txt'), '');
  return { dir, n };
}
function check(r: Run, label: string): void {
  const ids = new Set(fs.readFileSync(path.join(r.dir, 'out.txt'), 'utf8').split('\n').filter(Boolean));
  if (ids.size !== r.n) throw new Error(`${label}: ${ids.size} distinct ids instead of ${r.n}`);
}

/** Runs the jobs with xargs, under `tracer` (perf/strace) when given. */
async function runXargs(r: Run, tracer?: Tracer): Promise<Exact> {
  const script = `unset JOB_ID; seq 1 ${r.n} | xargs -P 8 -n 1 ./job.sh; times`;
  const timed = async () => {
    const t0 = now();
    let out: string;
    if (tracer?.kind === 'strace') {
      const res = await run(tracer.path, ['-f', '-qq', '-y', '-o', tracer.out, 'bash', '-c', script], { cwd: r.dir });
      if (res.code !== 0) throw new Error(`strace bash -c … exited ${res.code}: ${res.stderr.slice(0, 300)}`);
      out = res.stdout;
    } else {
      const child = track(spawn('bash', ['-c', script], { cwd: r.dir, stdio: ['ignore', 'pipe', 'pipe'] }));
      tracer?.roots.push(child.pid!);
      out = '';
      child.stdout!.setEncoding('utf8').on('data', (d) => { out += d; });
      const code = await new Promise<number | null>((ok) => child.on('close', ok));
      if (code !== 0) throw new Error(`xargs run exited ${code}`);
    }
    const own = parseTimes(out) * 1000;
    return { wall: now() - t0, serverU: NaN, serverS: NaN, serverReaped: NaN, launcher: NaN, reaped: own, clients: NaN, own };
  };
  return tracer?.kind === 'perf' ? underPerf(tracer, timed) : timed();
}

/** Runs the jobs on a fresh djs server, under `tracer` when given (attached once the
 *  server is up and has its worker, so that only the timed part is traced). */
async function runDjs(r: Run, sys: System, tracer: Tracer | undefined, scratch: string[]): Promise<Exact> {
  let home = r.dir;
  if (sys.tmpfs) scratch.push(home = fs.mkdtempSync('/dev/shm/djsb-b-'));
  const srv = new Server(home, undefined, sys.cli);
  await srv.start();
  let strace: ChildProcess | null = null;
  try {
    await srv.ok(['add_slave', '--skip_ssh_auth_check', 'w:8']);
    tracer?.roots.push(srv.pid);
    if (tracer?.kind === 'strace') strace = await attachStrace(tracer, srv.pid);
    const timed = async (): Promise<Exact> => {
      const s0 = statOf(srv.pid);
      const kids0 = new Map(childrenOf(srv.pid).map((p) => [p, statOf(p)]));
      const t0 = now();
      // The clients run under a bash whose `times` is their CPU (trampoline included).
      const res = await run('bash', ['-c', '"$1" --data-dir "$2" add_jobs "$3" >/dev/null && "$1" --data-dir "$2" wait; s=$?; times; exit $s', '_', srv.cliPath, srv.dataDir, path.join(r.dir, 'jobs.txt')], { cwd: r.dir, env: srv.env });
      const wall = now() - t0;
      if (res.code !== 0) throw new Error(`${sys.label}: add_jobs/wait exited ${res.code}: ${res.stderr.slice(0, 300)}`);
      const s1 = statOf(srv.pid);
      let launcher = 0, reaped = 0;
      for (const p of childrenOf(srv.pid)) {
        const a = statOf(p), b = kids0.get(p) ?? { u: 0, s: 0, cu: 0, cs: 0 };
        launcher += a.u + a.s - b.u - b.s;
        reaped += a.cu + a.cs - b.cu - b.cs;
      }
      const serverReaped = s1.cu + s1.cs - s0.cu - s0.cs;
      const e: Exact = { wall, serverU: s1.u - s0.u, serverS: s1.s - s0.s, serverReaped, launcher, reaped, clients: parseTimes(res.stdout) * 1000, own: 0 };
      e.own = e.serverU + e.serverS + serverReaped + launcher + reaped;
      return e;
    };
    return tracer?.kind === 'perf' ? await underPerf(tracer, timed) : await timed();
  } finally {
    if (strace) { strace.kill('SIGINT'); await new Promise((ok) => strace!.exitCode !== null || strace!.signalCode !== null ? ok(null) : strace!.once('exit', ok)); }
    await srv.close();
  }
}

// ---- tracers -------------------------------------------------------------------------------

type Tracer = { kind: 'perf' | 'strace'; path: string; out: string; roots: number[]; perfPid?: number; kids?: number[] };

async function attachStrace(t: Tracer, pid: number): Promise<ChildProcess> {
  // -f with -p attaches every thread of the server and of its child processes (the
  // launcher) and follows what they start.
  t.kids = childrenOf(pid);
  const child = track(spawn(t.path, ['-f', '-y', '-o', t.out, ...[pid, ...t.kids].flatMap((p) => ['-p', String(p)])], { stdio: ['ignore', 'ignore', 'pipe'] }));
  let err = '';
  child.stderr!.on('data', (d) => { err += d; });
  const deadline = Date.now() + 10_000;
  const attached = () => (err.match(/attached/g) ?? []).length > t.kids!.length;
  while (Date.now() < deadline && child.exitCode === null && !attached()) await sleep(20);
  if (child.exitCode !== null || !attached()) throw new Error(`strace could not attach: ${err.trim().slice(0, 300)}`);
  await sleep(200); // the other threads
  return child;
}

/** perf record over the whole machine while fn runs. */
async function underPerf<T>(t: Tracer, fn: () => Promise<T>): Promise<T> {
  const child = track(spawn(t.path, ['record', '-q', '-e', 'cpu-clock', '-c', String(PERIOD_NS), '-a', '-g', '--kernel-callchains', '-o', t.out], { stdio: ['ignore', 'ignore', 'pipe'] }));
  let err = '';
  child.stderr!.on('data', (d) => { err += d; });
  t.perfPid = child.pid;
  await sleep(1500); // perf first records every process there is
  if (child.exitCode !== null) throw new Error(`perf record failed: ${err.trim().slice(0, 300)}`);
  try {
    return await fn();
  } finally {
    child.kill('SIGINT');
    await new Promise((ok) => child.exitCode !== null ? ok(null) : child.once('exit', ok));
  }
}
const PERIOD_NS = 250_000;

// ---- perf: samples by role and kernel path --------------------------------------------

const SYSCALL_GROUPS: [RegExp, string][] = [
  [/^(clone|clone3|fork|vfork)$/, 'fork'],
  [/^(execve|execveat)$/, 'exec'],
  [/^(exit|exit_group)$/, 'exit'],
  [/^(wait4|waitid)$/, 'wait'],
  [/^(open|openat|openat2|creat)$/, 'open, create'],
  [/^(unlink|unlinkat)$/, 'unlink'],
  [/^(fsync|fdatasync)$/, 'fsync'],
  [/^(close|close_range)$/, 'close'],
  [/^(mmap|munmap|mprotect|brk|mremap|madvise)$/, 'mmap, brk'],
  [/^(rt_sig\w*|kill|tgkill|sigaltstack)$/, 'signals'],
  [/^(epoll_\w+|poll|ppoll|select|pselect6|io_uring_enter)$/, 'event wait'],
  [/^(newfstatat|fstat|statx|stat|lstat|access|faccessat2?|readlink|readlinkat|getdents64)$/, 'stat, access, readdir'],
];
/** The syscall or kernel path of a sample, from its kernel frames, leaf first. */
function category(frames: string[]): string {
  if (!frames.length) return 'user space';
  for (const f of frames) {
    if (/^(asm_sysvec_|sysvec_|asm_common_interrupt|common_interrupt|handle_softirqs|__do_softirq|irq_exit_rcu)/.test(f)) return 'irq, softirq, scheduling';
    if (f === 'exc_page_fault' || f === 'asm_exc_page_fault') return 'page faults';
    if (f === 'ret_from_fork' || f === 'ret_from_fork_asm' || f === 'schedule_tail') return 'fork';
    if (f === 'task_work_run') return 'close';
    if (f === 'do_exit' || f === 'do_group_exit') return 'exit';
    const m = /^__(?:x64|do|se)_sys_(\w+)$/.exec(f);
    if (m) {
      const name = m[1];
      if (/^(write|writev|pwrite64|read|readv|pread64)$/.test(name)) {
        const dir = name.includes('write') ? 'write' : 'read';
        return frames.some((g) => /^(pipe_(read|write)|unix_stream|sock_|__sys_(send|recv))/.test(g)) ? `${dir}, pipe or socket` : `${dir}, file`;
      }
      for (const [re, group] of SYSCALL_GROUPS) if (re.test(name)) return group;
      return 'other syscalls';
    }
  }
  return 'other kernel';
}
const FS_CATEGORIES = ['open, create', 'unlink', 'write, file', 'fsync', 'close'];

type PerfResult = { byRole: Map<string, Map<string, number>>; samples: number };

/** Reads `perf script` and sums samples by role and category. roots[0] is the system's root process. */
async function readPerf(t: Tracer, benchPid: number): Promise<PerfResult> {
  const child = spawn(t.path, ['script', '-i', t.out, '-F', 'comm,pid,tid,time,ip,sym', '--show-task-events'], { stdio: ['ignore', 'pipe', 'ignore'] });
  const rl = readline.createInterface({ input: child.stdout! });
  // Processes are keyed by pid and generation (pids are reused: pid_max may be 32768).
  const gen = new Map<number, number>(), parent = new Map<string, string>(), job = new Set<string>();
  const keyOf = (pid: number) => `${pid}.${gen.get(pid) ?? 0}`;
  const firstKey = new Map<number, string>();
  const counts = new Map<string, Map<string, number>>(); // process key → (pre|post):category → samples
  let cur: { key: string; post: boolean } | null = null;
  let frames: string[] = [];
  let samples = 0;
  const endSample = () => {
    if (!cur) return;
    const c = `${cur.post ? 'post' : 'pre'}:${category(frames)}`;
    let m = counts.get(cur.key);
    if (!m) counts.set(cur.key, (m = new Map()));
    m.set(c, (m.get(c) ?? 0) + 1);
    samples++;
    cur = null;
    frames = [];
  };
  const head = /^(.*?)\s+(-?\d+)\/(-?\d+)\s+\d+\.\d+:\s*(.*)$/;
  for await (const line of rl) {
    if (line.startsWith('\t') || line.startsWith(' ')) {
      if (cur) { const sym = line.trim().split(/\s+/)[1]; if (sym) frames.push(sym.replace(/\.(isra|constprop|part|cold)\.\d+$/, '')); }
      continue;
    }
    if (!line.trim()) { endSample(); continue; }
    endSample();
    const m = head.exec(line);
    if (!m) continue;
    const [, comm, pidText, , rest] = m;
    const pid = Number(pidText);
    if (rest.startsWith('PERF_RECORD_FORK')) {
      const f = /FORK\((\d+):(\d+)\):\((\d+):(\d+)\)/.exec(rest);
      if (f && f[1] !== f[3]) {
        const c = Number(f[1]);
        gen.set(c, (gen.get(c) ?? 0) + 1);
        parent.set(keyOf(c), keyOf(Number(f[3])));
        if (!firstKey.has(c)) firstKey.set(c, keyOf(c));
      }
      continue;
    }
    if (rest.startsWith('PERF_RECORD_COMM')) {
      const f = /PERF_RECORD_COMM exec: (.*):(\d+)\/(\d+)$/.exec(rest);
      if (f && f[1] === 'job.sh') job.add(keyOf(Number(f[2])));
      continue;
    }
    if (rest.startsWith('PERF_RECORD')) continue;
    if (pid <= 0) continue; // idle
    cur = { key: keyOf(pid), post: comm === 'job.sh' };
    if (!firstKey.has(pid)) firstKey.set(pid, keyOf(pid));
  }
  endSample();
  await new Promise((ok) => child.exitCode !== null ? ok(null) : child.once('exit', ok));
  const root = firstKey.get(t.roots[0]) ?? '', bench = firstKey.get(benchPid) ?? '', perf = firstKey.get(t.perfPid ?? -1) ?? '';
  /** The role of a process: walk up to the root, the bench or nothing. */
  const roleOf = (key: string, post: boolean): Role => {
    const chain: string[] = [];
    for (let k: string | undefined = key; k !== undefined && chain.length < 64; k = parent.get(k)) {
      chain.push(k);
      if (k === root) break;
      if (k === perf) return 'perf';
      if (k === bench) return chain.length === 1 ? 'bench' : 'clients';
    }
    if (chain[chain.length - 1] !== root) return 'rest of the machine';
    if (chain.length === 1) return 'server';
    if (chain.some((k) => job.has(k))) return job.has(key) && !post ? 'job, before exec' : 'job, the script';
    return chain.length === 2 ? 'launcher' : 'wrappers';
  };
  const byRole = new Map<string, Map<string, number>>();
  for (const [key, m] of counts) {
    for (const [pc, n] of m) {
      const [pp, cat] = [pc.slice(0, pc.indexOf(':')), pc.slice(pc.indexOf(':') + 1)];
      const role = roleOf(key, pp === 'post');
      let r = byRole.get(role);
      if (!r) byRole.set(role, (r = new Map()));
      r.set(cat, (r.get(cat) ?? 0) + n);
    }
  }
  return { byRole, samples };
}

// ---- strace: syscalls by role -----------------------------------------------------------------

/** Counts syscalls per role from `strace -f -y` output. `root`: the process strace was
 *  attached to (else the command it started, the first in the output), `kids` its child
 *  processes it was attached to as well; other tids it did not see start are the root's
 *  threads. */
function readStrace(file: string, root?: number, kids: number[] = []): Map<string, Map<string, number>> {
  const owner = new Map<number, number>();      // thread tid → the tid that created it
  const parent = new Map<number, number>();     // process tid → the tid that forked it
  const job = new Set<number>();                // tids that exec'd job.sh
  const pending = new Map<number, string>();    // tid → the start of an unfinished call
  const counts = new Map<number, Map<string, number>>(); // tid → "pre|post:name" → count
  let first = -1;
  for (const k of kids) parent.set(k, root!);
  const add = (tid: number, name: string) => {
    const k = `${job.has(tid) ? 'post' : 'pre'}:${name}`;
    let m = counts.get(tid);
    if (!m) counts.set(tid, (m = new Map()));
    m.set(k, (m.get(k) ?? 0) + 1);
  };
  const finished = (tid: number, call: string) => {
    const m = /^(clone3?|vfork|fork)\((.*)\)\s+=\s+(\d+)/s.exec(call);
    if (!m) return;
    if (/CLONE_THREAD/.test(m[2])) owner.set(Number(m[3]), tid); else parent.set(Number(m[3]), tid);
  };
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    const m = /^(\d+)\s+(.*)$/.exec(line);
    if (!m) continue;
    const tid = Number(m[1]), rest = m[2];
    if (first < 0) first = tid;
    if (rest.startsWith('---') || rest.startsWith('+++')) continue;
    const resumed = /^<\.\.\. (\w+) resumed>(.*)$/.exec(rest);
    if (resumed) {
      const start = pending.get(tid);
      pending.delete(tid);
      if (start) finished(tid, start + resumed[2]);
      continue;
    }
    const call = /^(\w+)\((.*)$/.exec(rest);
    if (!call) continue;
    const name = call[1];
    // The kind of file the first argument names (strace -y prints fds as N<path>).
    const fd = /^\d+<([^>]*)>/.exec(call[2])?.[1];
    let label = name;
    if (fd !== undefined && /^(read|write|close|fsync|fdatasync|readv|writev|pread64|pwrite64|fstat|lseek|dup2|dup3|fcntl)$/.test(name)) {
      label += fd.startsWith('pipe:') ? ' (pipe)' : fd.startsWith('socket:') || fd.startsWith('UNIX') ? ' (socket)' : fd === '/dev/null' ? ' (/dev/null)' : fd.startsWith('anon_inode:') ? ' (anon)' : ' (file)';
    } else if (/^(openat|open)$/.test(name)) {
      const file = /^[^,]*, "([^"]*)"/.exec(call[2])?.[1] ?? '';
      label += `${/O_CREAT/.test(call[2]) ? ' O_CREAT' : ''} (${file === '/dev/null' ? '/dev/null' : 'file'})`;
    }
    add(tid, label);
    if (name === 'execve' && /^"[^"]*job\.sh"/.test(call[2])) job.add(tid);
    if (rest.endsWith('<unfinished ...>')) pending.set(tid, rest.replace(/\s*<unfinished \.\.\.>$/, ''));
    else finished(tid, rest);
  }
  const top = root ?? first;
  // A tid seen neither forked nor created as a thread is a thread strace attached to: the root's.
  const procOf = (tid: number): number => {
    for (let t = tid, i = 0; i < 64; i++) { const o = owner.get(t); if (o === undefined) return parent.has(t) || t === top ? t : top; t = o; }
    return top;
  };
  const byRole = new Map<string, Map<string, number>>();
  for (const [tid, m] of counts) {
    const p = procOf(tid);
    const chain: number[] = [];
    for (let k: number | undefined = p; k !== undefined && chain.length < 64; k = parent.has(k) ? procOf(parent.get(k)!) : undefined) { chain.push(k); if (k === top) break; }
    const inJob = chain.some((k) => job.has(k));
    const role = chain.length === 1 ? 'server' : inJob ? 'job' : chain.length === 2 ? 'launcher' : 'wrappers';
    for (const [pk, n] of m) {
      const [pp, name] = [pk.slice(0, pk.indexOf(':')), pk.slice(pk.indexOf(':') + 1)];
      const r = role === 'job' ? (pp === 'post' || !job.has(p) ? 'job, the script' : 'job, before exec') : role;
      let rm = byRole.get(r);
      if (!rm) byRole.set(r, (rm = new Map()));
      rm.set(name, (rm.get(name) ?? 0) + n);
    }
  }
  return byRole;
}

// ---- the benchmark ------------------------------------------------------------------------------

export async function breakdown(o: Opts): Promise<BenchResult> {
  const t00 = now();
  const n = o.quick ? 300 : 3000;
  const nStrace = o.quick ? 50 : 300;
  const rounds = o.quick ? 1 : o.runs;
  const notes: string[] = [];
  const shm = fs.existsSync('/dev/shm');
  if (!shm) notes.push('no /dev/shm: the tmpfs control is skipped');
  const systems: System[] = [{ label: 'xargs -P 8 -n 1' }, { label: 'djs' }, ...(shm ? [{ label: 'djs, data+logs on tmpfs', tmpfs: true }] : []),
    ...o.patched.flatMap((p) => [{ label: `djs ${p.label}`, cli: p.path }, ...(shm ? [{ label: `djs ${p.label}, data+logs on tmpfs`, cli: p.path, tmpfs: true }] : [])])];
  const go = (s: System, r: Run, t?: Tracer) => (s.label.startsWith('xargs') ? runXargs(r, t) : runDjs(r, s, t, scratch));
  const scratch: string[] = [];
  const exact = new Map<string, Exact[]>(systems.map((s) => [s.label, []]));
  const perfs = new Map<string, PerfResult>();
  const straces = new Map<string, Map<string, Map<string, number>>>();
  const perfPath = which('perf'), stracePath = which('strace');
  try {
    // a. Exact totals, rounds interleaved.
    for (let r = 0; r < rounds; r++) {
      for (const s of systems) {
        const run1 = prepare(scratch, n);
        const e = await go(s, run1);
        check(run1, s.label);
        exact.get(s.label)!.push(e);
        o.log(`breakdown round ${r + 1}/${rounds}: ${s.label}: ${n} jobs in ${fmt(e.wall / 1000, 2)} s, own CPU ${fmt(e.own / n, 2)} ms/job`);
      }
    }
    // b. perf, one run each.
    if (!perfPath) notes.push('perf not installed (Debian package linux-perf): no split by role and kernel path');
    else {
      for (const s of systems) {
        const t: Tracer = { kind: 'perf', path: perfPath, out: path.join(tempDir('djsb-perf-'), 'perf.data'), roots: [] };
        scratch.push(path.dirname(t.out));
        const run1 = prepare(scratch, n);
        try {
          await underPerf(t, () => go(s, run1, t));
          check(run1, s.label);
          perfs.set(s.label, await readPerf(t, process.pid));
          o.log(`breakdown perf: ${s.label}: ${perfs.get(s.label)!.samples} samples`);
        } catch (e) {
          notes.push(`perf run of ${s.label} failed: ${(e as Error).message}`);
          o.log(`perf run of ${s.label} failed: ${(e as Error).message}`);
        } finally {
          fs.rmSync(path.dirname(t.out), { recursive: true, force: true });
        }
      }
    }
    // c. strace, one smaller run each.
    if (!stracePath) notes.push('strace not installed (Debian package strace): no syscall counts');
    else {
      for (const s of systems) {
        const t: Tracer = { kind: 'strace', path: stracePath, out: path.join(tempDir('djsb-strace-'), 'trace'), roots: [] };
        scratch.push(path.dirname(t.out));
        const run1 = prepare(scratch, nStrace);
        try {
          await go(s, run1, t);
          check(run1, s.label);
          straces.set(s.label, t.roots.length ? readStrace(t.out, t.roots[0], t.kids) : readStrace(t.out));
        } catch (e) {
          notes.push(`strace run of ${s.label} failed: ${(e as Error).message}`);
        }
      }
    }
  } finally {
    for (const d of scratch) fs.rmSync(d, { recursive: true, force: true });
  }

  // ---- tables
  const perJob = (x: number) => fmt(x / n, 3);
  const med = (label: string, f: (e: Exact) => number) => median(exact.get(label)!.map(f));
  const xWall = med(systems[0].label, (e) => e.wall);
  const sections: BenchResult['sections'] = [];
  sections.push({
    title: `a. exact CPU per job, ms (/proc; median of ${rounds} rounds of ${n} jobs)`,
    columns: ['system', 'wall s', 'jobs/s', '× xargs', 'server user', 'server sys', 'launcher itself', 'reaped by the launcher (wrappers + jobs)', 'total', 'clients (add_jobs + wait)'],
    rows: systems.map((s) => {
      const w = med(s.label, (e) => e.wall);
      return [s.label, fmt(w / 1000, 2), fmt(n / w * 1000, 0), fmt(xWall / w, 2), perJob(med(s.label, (e) => e.serverU)), perJob(med(s.label, (e) => e.serverS)),
        perJob(med(s.label, (e) => e.launcher)), perJob(med(s.label, (e) => e.reaped)), perJob(med(s.label, (e) => e.own)), perJob(med(s.label, (e) => e.clients))];
    }),
  });
  if (perfs.size) {
    const labels = [...perfs.keys()];
    const ms = (cnt: number) => cnt * PERIOD_NS / 1e6;
    const roleTotal = (p: PerfResult, role: string) => [...(p.byRole.get(role)?.values() ?? [])].reduce((a, b) => a + b, 0);
    // The headline: exact totals (a) split by perf's shares. For djs the server and the
    // launcher are exact, and the launcher's reaped time is split among wrappers and job
    // processes; for xargs all of its bash's reaped time is split among its roles.
    const OWN = ['server', 'launcher', 'wrappers', 'job, before exec', 'job, the script'] as const;
    const scaled = (l: string): Map<string, number> => { // role → exact ms per run, and the factor exact/perf per role
      const p = perfs.get(l)!, out = new Map<string, number>();
      const split = (roles: readonly string[], exactMs: number) => {
        const tot = roles.reduce((a, r) => a + roleTotal(p, r), 0);
        for (const r of roles) { out.set(r, tot ? exactMs * roleTotal(p, r) / tot : 0); out.set(`factor:${r}`, roleTotal(p, r) ? out.get(r)! / ms(roleTotal(p, r)) : 0); }
      };
      if (l.startsWith('xargs')) split(OWN, med(l, (e) => e.own));
      else if (med(l, (e) => e.serverReaped) <= 0.01 * med(l, (e) => e.own)) {
        split(['server'], med(l, (e) => e.serverU + e.serverS));
        split(['launcher'], med(l, (e) => e.launcher));
        split(['wrappers', 'job, before exec', 'job, the script'], med(l, (e) => e.reaped));
      } else {
        // The server reaps processes itself (no long-lived launcher, or one per job): all
        // but the server's own time is split by perf.
        split(['server'], med(l, (e) => e.serverU + e.serverS));
        split(['launcher', 'wrappers', 'job, before exec', 'job, the script'], med(l, (e) => e.launcher + e.reaped + e.serverReaped));
      }
      return out;
    };
    const fsOf = (l: string, roles: readonly string[], cats: string[]) => {
      const p = perfs.get(l)!, sc = scaled(l);
      let x = 0;
      for (const r of roles) for (const c of cats) x += ms(p.byRole.get(r)?.get(c) ?? 0) * (sc.get(`factor:${r}`) ?? 0);
      return x;
    };
    const START = ['server', 'launcher', 'wrappers', 'job, before exec'];
    const headRows: string[][] = [
      ['server (node) (xargs: its bash -c)', ...labels.map((l) => perJob(scaled(l).get('server')!))],
      ['launcher itself (xargs: xargs and seq)', ...labels.map((l) => perJob(scaled(l).get('launcher')!))],
      ['wrapper subshells', ...labels.map((l) => perJob(scaled(l).get('wrappers')!))],
      ['job processes before exec (the forked copy of their parent, the exec)', ...labels.map((l) => perJob(scaled(l).get('job, before exec')!))],
      ['job scripts after exec (sh start-up, the echo, exit)', ...labels.map((l) => perJob(scaled(l).get('job, the script')!))],
      ['total (exact)', ...labels.map((l) => perJob(med(l, (e) => e.own)))],
      ['of which file-system work of the start (all but the script): open/create', ...labels.map((l) => perJob(fsOf(l, START, ['open, create'])))],
      ['  … write to files', ...labels.map((l) => perJob(fsOf(l, START, ['write, file'])))],
      ['  … close (releasing the file, also at exit)', ...labels.map((l) => perJob(fsOf(l, START, ['close'])))],
      ['  … unlink', ...labels.map((l) => perJob(fsOf(l, START, ['unlink'])))],
      ['  … fsync', ...labels.map((l) => perJob(fsOf(l, START, ['fsync'])))],
      ['  … all of these', ...labels.map((l) => perJob(fsOf(l, START, FS_CATEGORIES)))],
      ['of which fork (parent and child side), all roles', ...labels.map((l) => perJob(fsOf(l, OWN, ['fork'])))],
      ['of which exec, all roles', ...labels.map((l) => perJob(fsOf(l, OWN, ['exec'])))],
      ['of which page faults, all roles', ...labels.map((l) => perJob(fsOf(l, OWN, ['page faults'])))],
      ['wall s (median)', ...labels.map((l) => fmt(med(l, (e) => e.wall) / 1000, 2))],
      ['clients (add_jobs + wait), not in the total', ...labels.map((l) => perJob(med(l, (e) => e.clients)))],
    ];
    sections.unshift({ title: `CPU per job by part, ms: exact totals (/proc, median of ${rounds} rounds of ${n} jobs) split by perf's shares (one run each)`, columns: ['part', ...labels], rows: headRows });
    const ours = (p: PerfResult) => ['server', 'launcher', 'wrappers', 'job, before exec', 'job, the script'].reduce((a, r) => a + roleTotal(p, r), 0);
    sections.push({
      title: `b. CPU per job by process role, ms (perf samples, one run of ${n} jobs each)`,
      columns: ['role', ...labels],
      rows: [
        ...ROLES.map((role) => [role === 'server' || role === 'launcher' ? `${role} (xargs: ${role === 'server' ? 'its bash -c' : 'xargs, seq'})` : role, ...labels.map((l) => perJob(ms(roleTotal(perfs.get(l)!, role))))]),
        ['all of the system\'s own (server … job)', ...labels.map((l) => perJob(ms(ours(perfs.get(l)!))))],
        ['the same, exact (table a, median)', ...labels.map((l) => perJob(med(l, (e) => e.own)))],
        ['file-system work of the start (open/create, unlink, file writes, fsync, close; not the script\'s)', ...labels.map((l) => {
          const p = perfs.get(l)!;
          let c = 0;
          for (const role of ['server', 'launcher', 'wrappers', 'job, before exec']) for (const cat of FS_CATEGORIES) c += p.byRole.get(role)?.get(cat) ?? 0;
          return perJob(ms(c));
        })],
        ['perf itself', ...labels.map((l) => perJob(ms(roleTotal(perfs.get(l)!, 'perf'))))],
      ],
    });
    for (const l of labels) {
      const p = perfs.get(l)!;
      const cats = new Map<string, number>();
      for (const role of ROLES.slice(0, 5)) for (const [c, v] of p.byRole.get(role) ?? []) cats.set(c, (cats.get(c) ?? 0) + v);
      const cols = [...cats.entries()].filter(([, v]) => ms(v) / n >= 0.005).sort((a, b) => b[1] - a[1]).map(([c]) => c);
      sections.push({
        title: `b (${l}). CPU per job by role and syscall or kernel path, ms (perf)`,
        columns: ['role', 'total', ...cols, 'rest'],
        rows: ROLES.slice(0, 5).map((role) => {
          const m = p.byRole.get(role) ?? new Map<string, number>();
          const tot = [...m.values()].reduce((a, b) => a + b, 0);
          const shown = cols.reduce((a, c) => a + (m.get(c) ?? 0), 0);
          return [l.startsWith('xargs') ? (XARGS_ROLE[role] ?? role) : role, perJob(ms(tot)), ...cols.map((c) => m.get(c) ? perJob(ms(m.get(c)!)) : ''), perJob(ms(tot - shown))];
        }),
      });
    }
  }
  if (straces.size) {
    const rows: string[][] = [];
    for (const [l, byRole] of straces) {
      for (const role of ROLES.slice(0, 5)) {
        const m = byRole.get(role);
        if (!m) continue;
        const tot = [...m.values()].reduce((a, b) => a + b, 0);
        const top = [...m.entries()].sort((a, b) => b[1] - a[1]).filter(([, v]) => v / nStrace >= 0.05).map(([k, v]) => `${k} ${fmt(v / nStrace, v / nStrace >= 10 ? 0 : 1)}`);
        rows.push([l, l.startsWith('xargs') ? (XARGS_ROLE[role as Role] ?? role) : role, fmt(tot / nStrace, 1), top.join(', ')]);
      }
    }
    sections.push({ title: `c. syscalls per job by role (strace -f -y, one run of ${nStrace} jobs each)`, columns: ['system', 'role', 'syscalls/job', 'by name (≥ 0.05/job; "(file)", "(pipe)": what the fd is)'], rows });
  }
  for (const p of o.patched) notes.push(`djs ${p.label} = ${p.path}.`);
  if (shm) notes.push('"data+logs on tmpfs": the same cli.ts with its data dir (journal, run files) and the job logs on /dev/shm: the file-system work of a start without the cost of this machine\'s ext4 (RESULTS.md, F7).');
  notes.push(`Each run: ${n} jobs over 8 slots, each the sh script \`echo "\${JOB_ID:-$1}" >> out.txt\`; djs: a fresh server, \`add_slave w:8\`, then \`add_jobs\` + \`wait\` (timed); xargs: \`seq 1 N | xargs -P 8 -n 1 ./job.sh\`. Directories are deleted after the last run (RESULTS.md, F7).`);
  notes.push('The first table: server and launcher are the exact numbers of table a; the time the launcher reaped (xargs: everything its bash reaped; a server that reaps processes itself: those and its child processes\' time) is split among the other roles in the proportions perf sampled; the "of which" rows are perf\'s samples in those kernel paths, scaled by each role\'s exact/perf ratio.');
  notes.push('a: "launcher itself" is the user + sys of the server\'s child processes (the launcher), "reaped by the launcher" their children\'s (wrappers and job processes, each with what it reaped); for xargs, everything its bash reaped (xargs, seq and the jobs). "clients" is `cli.ts add_jobs` + `cli.ts wait` with their trampoline, not part of "total".');
  notes.push(`b: every sample is ${PERIOD_NS / 1e6} ms of CPU time; the role of a process comes from the process tree perf recorded: the root (server, or xargs's bash) → its children (launcher; xargs and seq) → deeper (wrappers) → the process that execs job.sh (job: "before exec" while it still runs its parent's code, "the script" after). The kernel path is the syscall its kernel stack is in ("write, file" vs "write, pipe or socket"; "close" includes the deferred release of the file, also at exit; "fork" includes the child's first steps; "exec" includes the teardown of the old memory), or page faults, interrupts and scheduling; "user space" has no kernel stack. perf's own sampling slows the run; the totals beside the exact ones say how far to trust the split.`);
  notes.push('c: counts of syscalls per job (a job\'s "before exec" includes its execve). strace -p on the server follows every thread and process the server starts; the bash reading the launcher\'s pipe reads one byte per read(2).');
  return { name: 'breakdown', title: `8. Where a start's CPU goes (${n} trivial jobs, 8 slots)`, sections, targets: [], notes, seconds: (now() - t00) / 1000 };
}
