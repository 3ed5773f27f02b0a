#!/bin/sh
":" /*
# The bootstrap (see BOOTSTRAP in the header). Paths go to node as data, never as code.
_djs_f=$(readlink -f "$0")
_djs_k=$(cksum < "$_djs_f")
_djs_c=${_djs_f%/*}/node_modules/.cache/djs/cli-${_djs_k% *}-${_djs_k#* }.mjs
[ -s "$_djs_c" ] && exec node "$_djs_c" "$@"
export DJS_BOOT_COPY="$_djs_c"
exec node --disable-warning=ExperimentalWarning --import 'data:text/javascript,
import fs from "node:fs"; import mod from "node:module"; import path from "node:path";
import { pathToFileURL } from "node:url";
const copy = process.env.DJS_BOOT_COPY;
delete process.env.DJS_BOOT_COPY;
if (mod.enableCompileCache) mod.enableCompileCache();
if (!process.features.typescript) {
  const file = fs.realpathSync(process.argv[1]), dir = path.dirname(file);
  const load = (p) => import(pathToFileURL(path.join(dir, "node_modules", p)).href);
  await load("tsx/dist/loader.mjs").catch(() => {
    process.stderr.write("error: this Node.js cannot run TypeScript by itself: run npm ci in "
      + dir + " (for tsx), or use Node 22.18 or newer\n");
    process.exit(2);
  });
  if (copy) try {
    const esbuild = (await load("esbuild/lib/main.js")).default;
    const js = esbuild.transformSync(fs.readFileSync(file, "utf8"), { loader: "ts", format: "esm" }).code;
    const cache = path.dirname(copy), tmp = copy + "." + process.pid;
    fs.mkdirSync(cache, { recursive: true });
    const fd = fs.openSync(tmp, "w");
    fs.writeSync(fd, js); fs.fsyncSync(fd); fs.closeSync(fd); fs.renameSync(tmp, copy);
    for (const name of fs.readdirSync(cache)) {
      const old = path.join(cache, name);
      if (old !== copy && fs.statSync(old).mtimeMs < Date.now() - 864e5) fs.rmSync(old, { force: true });
    }
  } catch {}
}' "$0" "$@"
*/
/*
 * djs — a distributed job scheduler for the machines you can ssh into.
 *
 * One file is both the background server and its client. The server keeps a list of
 * workers (hosts with slots) and a queue of jobs, and starts each waiting job on a free
 * slot by running the user's job script here with JOB_ID, SLAVE_IP and SLAVE_SLOT set;
 * the script moves data and runs work on the worker itself (rsync/ssh, or anything).
 *
 * SYNOPSIS
 *   cli.ts start [-d] [DATA_DIR] [LOG_DIR]    run the server (-d: in the background)
 *   cli.ts stop                               stop it; running jobs keep running
 *   cli.ts add_slave [--skip_ssh_auth_check] [--slots N] HOST[:SLOTS]...
 *   cli.ts remove_slave [--wait|--kill] HOST...
 *   cli.ts add_job [--retries N] [--timeout S] SCRIPT [ARGS...]
 *   cli.ts add_jobs [--retries N] [--timeout S] FILE|-
 *   cli.ts remove_job SCRIPT [ARGS...] | --id ID...
 *   cli.ts kill ID... | --all            cli.ts retry ID... | [--failed] [--killed]
 *   cli.ts status [--json]               cli.ts list [--state S] [--json]
 *   cli.ts log ID [-f]                   cli.ts wait [ID...]
 *   cli.ts clean [--logs]
 *   Every command takes --data-dir DIR (env DJS_DATA_DIR, default ./.data).
 *
 * FILES in the data dir (mode 0700)
 *   journal       one JSON event per line, appended and fsynced before a reply
 *   snapshot      the whole state as JSON lines; replaced by write-temp, fsync, rename
 *   server.sock   the Unix socket clients talk to (mode 0600)
 *   server.pid    "PID START_TICKS" of the server that owns the dir
 *   lock.token    names the lock a server holds on the dir while it runs (holdDirLock)
 *   run/ID.R.pid  created by the wrapper of start R of job ID as it claims the run: its
 *                 pid, and a second line with the job's exit code when it ends
 *   Job output goes to LOG_DIR/ID.log (default ./logs).
 *
 * STATE MACHINES
 *   job:    waiting -> running -> done (exit 0) | failed (exit != 0, timeout) | killed
 *           running -> waiting  when the worker failed (exit 255), a retry is due,
 *                               or the worker was removed with --kill
 *           done|failed|killed -> waiting  by `retry`
 *   worker: up -> down (probe failed) -> up (probe answered, with backoff);
 *           up|down -> draining (remove --wait) -> gone when its last job ends
 *
 * DESIGN
 *   All state changes are events applied by one pure function, applyEvent. The server
 *   appends each event to the journal and applies it; at start-up it loads the snapshot
 *   and replays the journal through the same function, so recovery is not a second
 *   code path. Scheduling is a pure function of the state (planStarts) that says which
 *   job to start on which slot; timers come from another (dueActions) that names the
 *   next deadline. The shell carries the decisions out and feeds outcomes (a process
 *   exited, a probe answered) back as events.
 *
 *   Group commit: requests that arrive together are applied, written with one write
 *   and one fdatasync, and only then answered; effects (starting a process, signals)
 *   also wait for that flush, so nothing happens that the journal does not know of.
 *   If the write fails, the journal is cut back, the state reloaded from disk, the
 *   clients of that batch get an error, and the outcomes that were lost are retried.
 *
 *   Exactly once: "start job J (its R-th start)" is durable before J's process is
 *   spawned. The process is a wrapper (a bash subshell forked by the launcher, in a
 *   process group of its own) that first creates run/J.R.pid exclusively (O_EXCL),
 *   keeps it open and writes its pid there, then runs the script, then adds the exit
 *   code. A server that finds J running in its journal after a crash (or whose
 *   launcher died) looks there: a pid file naming a live process that holds that very
 *   file open (so neither a reused pid nor a clock step fools it) means J runs: adopt
 *   it; a pid file without such a process means J ended: record the code from the
 *   file (or "lost" without one); no pid file means the wrapper never started the job:
 *   the server creates the pid file itself, exclusively, so a late wrapper finds it
 *   taken and exits without running the job, and J goes back to the queue. Either the
 *   wrapper or the server wins that file, never both, so J is neither lost nor run
 *   twice. The launcher is one bash process, not the server, so a start costs the same
 *   however much memory the server holds, and no more than a fork of a small shell.
 *
 * EXIT CODES of the client
 *   0 success, 1 the operation failed, 2 usage error, 3 no server on that data dir.
 *
 * BOOTSTRAP (the lines above this comment; Node >= 20.11 for --disable-warning)
 *   To sh, line 2 is the no-op `:` and the lines after it are shell; to JavaScript it
 *   is a string and a comment that hides them. sh finds the real file (through a
 *   symlink on PATH) and names its plain-JS copy by content:
 *   node_modules/.cache/djs/cli-CRC-SIZE.mjs (cksum). If that copy exists, node runs
 *   it, and Node 20 skips tsx. Otherwise node runs this file after a small loader, a
 *   data: URL, which turns on the compile cache (Node >= 22.1) and, on a Node without
 *   native TypeScript, loads tsx and writes the copy (temp file, fsync, rename),
 *   removing copies older than a day. Paths reach the loader only as data: this file as
 *   argv[1], the copy as DJS_BOOT_COPY, which the loader deletes so that neither the
 *   server nor its jobs inherit it (a server that `start --detach` starts through the
 *   loader runs it again, from execArgv, without the variable, and writes no copy). The
 *   loader's text is a URL: it holds no `#`, `%` or `?`, no `'` (sh quotes it), and
 *   since the URL parser drops its newlines, no // comment and no line break between
 *   two words.
 */

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';

// ============================================================================
// Vocabulary: states, events, limits
// ============================================================================

export const JOB_STATES = ['waiting', 'running', 'done', 'failed', 'killed'] as const;
export type JobState = (typeof JOB_STATES)[number];
export type WorkerState = 'up' | 'down' | 'draining';
/** Why a running job is being stopped: by the user, by its --timeout, or to requeue it. */
export type StopReason = 'user' | 'timeout' | 'requeue';

const FORMAT_VERSION = 1;
const EXIT_OK = 0, EXIT_FAILED = 1, EXIT_USAGE = 2, EXIT_NO_SERVER = 3;
/** What ssh exits with when it cannot reach a host: the worker failed, not the job. */
export const WORKER_FAILED_EXIT = 255;
/** Worker failures (exit 255) one job may suffer before it is failed for good. */
export const MAX_REQUEUES = 5;
export const PROBE_BACKOFF_MIN_MS = 5_000;
export const PROBE_BACKOFF_MAX_MS = 300_000;
const QUEUE_HEAD = 10;
const SNAPSHOT_MIN_JOURNAL_BYTES = 32 << 20;
const MAX_HOST_LENGTH = 255;
const MAX_SLOTS = 10_000;

export type Attempt = {
  n: number; worker: string; slot: number; startedAt: number; endedAt: number;
  exitCode: number | null; reason: string | null;
};

export type Job = {
  id: number; script: string; args: string[]; cwd: string;
  retries: number; timeout: number;      // timeout in seconds, 0 = none
  state: JobState;
  queuedAt: number;
  attempts: number;                      // attempts started so far
  runs: number;                          // starts ever made; names the run files, never reused
  retriesUsed: number;                   // failed attempts charged to --retries
  requeues: number;                      // worker failures, not charged to --retries
  worker: string | null; slot: number;   // of the current or last attempt
  startedAt: number; endedAt: number;
  exitCode: number | null; reason: string | null;
  stopping: StopReason | null; killAt: number;
  avoid: string[] | null;                // workers this job failed on
  history: Attempt[] | null;             // earlier attempts, oldest first
  qtok: number;                          // which queue entry is this job's live one
};

export type Worker = {
  host: string; slots: number; state: WorkerState;
  ssh: boolean;                          // probed over ssh (not added with --skip_ssh_auth_check)
  running: number[];                     // job id per slot, 0 = free
  probeAt: number;                       // when to probe next, 0 = no probe due
  probeDelay: number;                    // current backoff
  error: string | null; since: number;
};

/** The queue of waiting jobs: requeued ones in front (a stack), new ones behind. */
export type Queue = { front: number[]; frontTok: number[]; ids: number[]; toks: number[]; head: number };

export type State = {
  seq: number; nextId: number; tok: number;
  jobs: Map<number, Job>;
  workers: Map<string, Worker>;
  queue: Queue;
  counts: Record<JobState, number>;
  strings: Map<string, string>; // see intern
};

export type JobSpec = string[]; // [script, ...args]
export type Event =
  | { e: 'add'; t: number; id: number; cwd: string; retries: number; timeout: number; jobs: JobSpec[] }
  | { e: 'remove'; t: number; ids: number[] }
  | { e: 'start'; t: number; id: number; w: string; s: number }
  | { e: 'unstart'; t: number; id: number }
  | { e: 'end'; t: number; id: number; run: number; code: number | null; why?: string }
  | { e: 'stop'; t: number; ids: number[]; why: StopReason; grace: number }
  | { e: 'retry'; t: number; ids: number[] }
  | { e: 'clean'; t: number }
  | { e: 'worker'; t: number; host: string; slots: number; ssh: boolean }
  | { e: 'drain'; t: number; host: string }
  | { e: 'unworker'; t: number; host: string }
  | { e: 'probe'; t: number; host: string; ok: boolean; err?: string; max?: number }; // max: backoff cap, ms

/** The one error type: a user-facing message, the exit code it maps to, and a hint. */
export class UserError extends Error {
  code: number;
  hint: string | undefined;
  constructor(code: number, message: string, hint?: string) {
    super(message);
    this.code = code;
    this.hint = hint;
  }
}
const usage = (msg: string, hint?: string) => new UserError(EXIT_USAGE, msg, hint);
const failure = (msg: string, hint?: string) => new UserError(EXIT_FAILED, msg, hint);

// ============================================================================
// The core: pure functions of the state. No fs, net, processes or clock here.
// ============================================================================

export function newState(): State {
  return {
    seq: 0, nextId: 1, tok: 0, jobs: new Map(), workers: new Map(),
    queue: { front: [], frontTok: [], ids: [], toks: [], head: 0 },
    counts: { waiting: 0, running: 0, done: 0, failed: 0, killed: 0 },
    strings: new Map(),
  };
}

/** One copy of each script path and directory, however many jobs share it: a million
 *  jobs of one script would otherwise hold a million copies of its path. */
export function intern(st: State, s: string): string {
  const have = st.strings.get(s);
  if (have !== undefined) return have;
  st.strings.set(s, s);
  return s;
}

export const isFinished = (s: JobState) => s === 'done' || s === 'failed' || s === 'killed';

function setJobState(st: State, job: Job, to: JobState): void {
  st.counts[job.state]--;
  st.counts[to]++;
  job.state = to;
}

/** Puts a waiting job in the queue: behind the others, or in front (requeued jobs). */
function enqueue(st: State, job: Job, inFront: boolean): void {
  job.qtok = ++st.tok;
  const q = st.queue;
  if (inFront) { q.front.push(job.id); q.frontTok.push(job.qtok); }
  else { q.ids.push(job.id); q.toks.push(job.qtok); }
}

const liveEntry = (st: State, id: number, tok: number) => {
  const j = st.jobs.get(id);
  return j !== undefined && j.state === 'waiting' && j.qtok === tok ? j : undefined;
};

/** Drops entries of jobs that left the queue from both ends, so the head stays cheap. */
function trimQueue(st: State): void {
  const q = st.queue;
  while (q.front.length && !liveEntry(st, q.front[q.front.length - 1], q.frontTok[q.frontTok.length - 1])) {
    q.front.pop(); q.frontTok.pop();
  }
  while (q.head < q.ids.length && !liveEntry(st, q.ids[q.head], q.toks[q.head])) q.head++;
  if (q.head > 4096 && q.head * 2 > q.ids.length) {
    q.ids = q.ids.slice(q.head); q.toks = q.toks.slice(q.head); q.head = 0;
  }
}

/** Waiting jobs in the order they start: requeued ones first, then first come first served. */
export function* waitingJobs(st: State): Generator<Job> {
  const q = st.queue;
  for (let i = q.front.length - 1; i >= 0; i--) {
    const j = liveEntry(st, q.front[i], q.frontTok[i]);
    if (j) yield j;
  }
  for (let i = q.head; i < q.ids.length; i++) {
    const j = liveEntry(st, q.ids[i], q.toks[i]);
    if (j) yield j;
  }
}

function newJob(st: State, id: number, spec: JobSpec, ev: Extract<Event, { e: 'add' }>): Job {
  return {
    id, script: intern(st, spec[0]), args: spec.length > 1 ? spec.slice(1) : NO_ARGS, cwd: intern(st, ev.cwd),
    retries: ev.retries, timeout: ev.timeout, state: 'waiting', queuedAt: ev.t,
    attempts: 0, runs: 0, retriesUsed: 0, requeues: 0, worker: null, slot: -1, startedAt: 0, endedAt: 0,
    exitCode: null, reason: null, stopping: null, killAt: 0, avoid: null, history: null, qtok: 0,
  };
}
const NO_ARGS: string[] = [];

function newWorker(host: string, slots: number, ssh: boolean, t: number): Worker {
  return { host, slots, state: 'up', ssh, running: new Array(slots).fill(0), probeAt: 0, probeDelay: 0, error: null, since: t };
}

function freeSlot(st: State, job: Job): void {
  const w = job.worker === null ? undefined : st.workers.get(job.worker);
  if (!w || w.running[job.slot] !== job.id) return;
  w.running[job.slot] = 0;
  while (w.running.length > w.slots && w.running[w.running.length - 1] === 0) w.running.pop();
  if (w.state === 'draining' && w.running.every((id) => id === 0)) st.workers.delete(w.host);
}

/** Sends a job whose attempt ended back to the queue, or ends it in `to`. */
function settle(st: State, job: Job, to: JobState | 'requeue', reason: string | null, t: number): void {
  job.reason = reason;
  job.endedAt = t;
  if (to === 'requeue') {
    setJobState(st, job, 'waiting');
    enqueue(st, job, true);
  } else {
    setJobState(st, job, to);
  }
}

function avoidWorker(job: Job, host: string | null): void {
  if (host === null) return;
  if (!job.avoid) job.avoid = [host];
  else if (!job.avoid.includes(host)) job.avoid.push(host);
}

/** Decides how an attempt that ended counts: done, failed, killed, or back to the queue. */
function endAttempt(st: State, job: Job, code: number | null, why: string | undefined, t: number): void {
  const host = job.worker;
  (job.history ??= []).push({
    n: job.attempts, worker: host ?? '', slot: job.slot, startedAt: job.startedAt, endedAt: t,
    exitCode: code, reason: job.stopping === 'timeout' ? 'timeout' : job.stopping === 'user' ? 'killed' : (why ?? null),
  });
  job.exitCode = code;
  freeSlot(st, job);
  const stopping = job.stopping;
  job.stopping = null;
  job.killAt = 0;
  const failOrRetry = (reason: string | null) => {
    avoidWorker(job, host);
    if (job.retriesUsed < job.retries) { job.retriesUsed++; settle(st, job, 'requeue', reason, t); }
    else settle(st, job, 'failed', reason, t);
  };
  if (stopping === 'user') settle(st, job, 'killed', 'killed', t);
  else if (stopping === 'requeue') settle(st, job, 'requeue', 'worker removed', t);
  else if (stopping === 'timeout') failOrRetry(`timeout after ${job.timeout}s`);
  else if (why !== undefined) failOrRetry(why);
  else if (code === 0) settle(st, job, 'done', null, t);
  else if (code === WORKER_FAILED_EXIT) {
    job.requeues++;
    avoidWorker(job, host);
    const w = host === null ? undefined : st.workers.get(host);
    if (w && w.ssh && w.state === 'up' && w.probeAt === 0) w.probeAt = t;
    if (job.requeues >= MAX_REQUEUES) settle(st, job, 'failed', `exit 255 (worker failure) ${job.requeues} times`, t);
    else settle(st, job, 'requeue', 'exit 255: worker failure', t);
  } else failOrRetry(null);
}

/** Applies one event to the state. The only place state changes, live and at replay.
 *  Events that no longer fit (a job that is not running any more) change nothing. */
export function applyEvent(st: State, ev: Event): void {
  switch (ev.e) {
    case 'add': {
      for (let i = 0; i < ev.jobs.length; i++) {
        const job = newJob(st, ev.id + i, ev.jobs[i], ev);
        st.jobs.set(job.id, job);
        st.counts.waiting++;
        enqueue(st, job, false);
      }
      st.nextId = Math.max(st.nextId, ev.id + ev.jobs.length);
      break;
    }
    case 'remove':
      for (const id of ev.ids) {
        const job = st.jobs.get(id);
        if (job && job.state === 'waiting') { st.counts.waiting--; st.jobs.delete(id); }
      }
      trimQueue(st);
      break;
    case 'start': {
      const job = st.jobs.get(ev.id), w = st.workers.get(ev.w);
      if (!job || job.state !== 'waiting' || !w) break;
      setJobState(st, job, 'running');
      job.attempts++;
      job.runs++;
      job.worker = intern(st, ev.w); job.slot = ev.s; job.startedAt = ev.t; job.endedAt = 0;
      job.exitCode = null; job.reason = null; job.stopping = null; job.killAt = 0;
      while (w.running.length <= ev.s) w.running.push(0);
      w.running[ev.s] = job.id;
      trimQueue(st);
      break;
    }
    case 'unstart': {
      const job = st.jobs.get(ev.id);
      if (!job || job.state !== 'running') break;
      freeSlot(st, job);
      job.attempts--;
      const killed = job.stopping === 'user';
      job.stopping = null; job.killAt = 0;
      // A job the user killed before it got going stays killed.
      if (killed) settle(st, job, 'killed', 'killed before it started', ev.t);
      else { setJobState(st, job, 'waiting'); enqueue(st, job, true); }
      break;
    }
    case 'end': {
      const job = st.jobs.get(ev.id);
      if (job && job.state === 'running' && job.runs === ev.run) endAttempt(st, job, ev.code, ev.why, ev.t);
      break;
    }
    case 'stop':
      for (const id of ev.ids) {
        const job = st.jobs.get(id);
        if (!job) continue;
        if (job.state === 'running' && (job.stopping === null || ev.why === 'user')) {
          // A user's kill overrides a timeout or requeue under way (and keeps its deadline).
          if (job.stopping === null) job.killAt = ev.t + ev.grace;
          job.stopping = ev.why;
        } else if (job.state === 'waiting' && ev.why === 'user') {
          settle(st, job, 'killed', 'killed before it started', ev.t);
        }
      }
      trimQueue(st);
      break;
    case 'retry':
      for (const id of ev.ids) {
        const job = st.jobs.get(id);
        if (!job || !isFinished(job.state)) continue;
        job.retriesUsed = 0; job.requeues = 0; job.reason = null; job.exitCode = null;
        job.queuedAt = ev.t;
        setJobState(st, job, 'waiting');
        enqueue(st, job, false);
      }
      break;
    case 'clean':
      for (const [id, job] of st.jobs) {
        if (isFinished(job.state)) { st.counts[job.state]--; st.jobs.delete(id); }
      }
      break;
    case 'worker': {
      const w = st.workers.get(ev.host);
      if (!w) { st.workers.set(ev.host, newWorker(ev.host, ev.slots, ev.ssh, ev.t)); break; }
      w.slots = ev.slots; w.ssh = ev.ssh;
      // Added again, so it passed the login check (or needs none): up, with no probe due.
      if (w.state === 'down') { w.state = 'up'; w.since = ev.t; w.probeAt = 0; w.probeDelay = 0; w.error = null; }
      while (w.running.length < ev.slots) w.running.push(0);
      while (w.running.length > w.slots && w.running[w.running.length - 1] === 0) w.running.pop();
      if (w.state === 'draining') { w.state = 'up'; w.since = ev.t; }
      if (!ev.ssh) { w.probeAt = 0; w.probeDelay = 0; w.error = null; } // a probe under way is moot
      break;
    }
    case 'drain': {
      const w = st.workers.get(ev.host);
      if (!w) break;
      w.state = 'draining'; w.since = ev.t;
      if (w.running.every((id) => id === 0)) st.workers.delete(ev.host);
      break;
    }
    case 'unworker':
      st.workers.delete(ev.host);
      break;
    case 'probe': {
      const w = st.workers.get(ev.host);
      if (!w || !w.ssh) break;
      if (ev.ok) {
        if (w.state === 'down') { w.state = 'up'; w.since = ev.t; }
        w.probeAt = 0; w.probeDelay = 0; w.error = null;
      } else {
        if (w.state === 'up') { w.state = 'down'; w.since = ev.t; }
        w.error = ev.err ?? 'unreachable';
        const max = ev.max ?? PROBE_BACKOFF_MAX_MS;
        w.probeDelay = Math.min(max, w.probeDelay ? w.probeDelay * 2 : PROBE_BACKOFF_MIN_MS);
        w.probeAt = ev.t + w.probeDelay;
      }
      break;
    }
    default:
      throw new Error(`unknown event '${(ev as { e: unknown }).e}'`);
  }
}

/** A worker takes new jobs when it is up and not waiting for a probe's answer. */
const schedulable = (w: Worker) => w.state === 'up' && w.probeAt === 0;

export type Start = { id: number; host: string; slot: number };

/** Which waiting jobs to start on which free slots now: first come, first served;
 *  slots are taken across workers before a second slot of the same worker, and a job
 *  avoids workers it failed on when another slot is free. Reads the state only. */
export function planStarts(st: State): Start[] {
  const free: { host: string; slot: number }[] = [];
  const workers = [...st.workers.values()].filter(schedulable);
  let maxSlots = 0;
  for (const w of workers) maxSlots = Math.max(maxSlots, w.slots);
  for (let s = 0; s < maxSlots; s++) {
    for (const w of workers) if (s < w.slots && !w.running[s]) free.push({ host: w.host, slot: s });
  }
  const starts: Start[] = [];
  if (free.length === 0) return starts;
  for (const job of waitingJobs(st)) {
    let pick = 0;
    if (job.avoid) {
      const better = free.findIndex((f) => !job.avoid!.includes(f.host));
      if (better >= 0) pick = better;
    }
    const [slot] = free.splice(pick, 1);
    starts.push({ id: job.id, host: slot.host, slot: slot.slot });
    if (free.length === 0) break;
  }
  return starts;
}

export type Due = { kind: 'timeout'; id: number } | { kind: 'sigkill'; id: number } | { kind: 'probe'; host: string };

/** What is due at `now` (timeouts, SIGKILLs after the grace period, probes) and when
 *  the next thing falls due. `busy` names what the shell is already doing. */
export function dueActions(
  st: State, now: number, busy: { probing: ReadonlySet<string>; sigkilled: ReadonlySet<number> },
): { due: Due[]; next: number } {
  const due: Due[] = [];
  let next = Infinity;
  const at = (t: number, d: Due) => { if (t <= now) due.push(d); else next = Math.min(next, t); };
  for (const w of st.workers.values()) {
    if (w.ssh && w.probeAt > 0 && !busy.probing.has(w.host)) at(w.probeAt, { kind: 'probe', host: w.host });
    for (const id of w.running) {
      const job = id ? st.jobs.get(id) : undefined;
      if (!job || job.state !== 'running') continue;
      if (job.stopping) { if (!busy.sigkilled.has(id)) at(job.killAt, { kind: 'sigkill', id }); }
      else if (job.timeout > 0) at(job.startedAt + job.timeout * 1000, { kind: 'timeout', id });
    }
  }
  return { due, next };
}

/** Host strings reach ssh and scripts: a user@ prefix, a name or address, nothing a
 *  shell or ssh could read as an option or interpret. */
const HOST_RE = /^(?:[A-Za-z0-9_][A-Za-z0-9_.+-]*@)?(?:[A-Za-z0-9_][A-Za-z0-9_.-]*|\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?\])$/;

export function validateHost(host: string): void {
  if (host.length === 0) throw usage(`empty host name`);
  if (host.length > MAX_HOST_LENGTH || !HOST_RE.test(host)) {
    throw usage(`invalid host ${quoteForError(host)}`, 'a host is a name or address with an optional user@, like node7 or alice@10.0.0.5');
  }
}

/** Splits HOST[:SLOTS] into its parts; `[v6]:SLOTS` keeps the brackets on the host. */
export function parseWorkerArg(arg: string, defaultSlots: number): { host: string; slots: number } {
  const m = /^([\s\S]*?)(?::(\d+))?$/.exec(arg)!;
  const host = m[1], slots = m[2] === undefined ? defaultSlots : Number(m[2]);
  validateHost(host);
  if (!Number.isSafeInteger(slots) || slots < 1 || slots > MAX_SLOTS) throw usage(`invalid slot count in ${quoteForError(arg)}`, `slots are 1 to ${MAX_SLOTS}`);
  return { host, slots };
}

/** Splits one line of an add_jobs file into words like a POSIX shell would, without
 *  expansions: 'single', "double" (with \" \\ \$ \` escapes), backslash escapes, and
 *  # comments at the start of a word. A blank or comment-only line gives []. */
export function splitWords(line: string): string[] {
  const words: string[] = [];
  let cur = '', inWord = false, i = 0;
  while (i < line.length) {
    const c = line[i];
    if (c === ' ' || c === '\t' || c === '\r') {
      if (inWord) { words.push(cur); cur = ''; inWord = false; }
      i++;
    } else if (c === '#' && !inWord) {
      break;
    } else if (c === "'") {
      const end = line.indexOf("'", i + 1);
      if (end < 0) throw new Error('unterminated single quote');
      cur += line.slice(i + 1, end); inWord = true; i = end + 1;
    } else if (c === '"') {
      i++; inWord = true;
      for (;;) {
        if (i >= line.length) throw new Error('unterminated double quote');
        const d = line[i];
        if (d === '"') { i++; break; }
        if (d === '\\' && i + 1 < line.length && '"\\$`'.includes(line[i + 1])) { cur += line[i + 1]; i += 2; }
        else { cur += d; i++; }
      }
    } else if (c === '\\') {
      if (i + 1 >= line.length) throw new Error('backslash at end of line');
      cur += line[i + 1]; inWord = true; i += 2;
    } else {
      cur += c; inWord = true; i++;
    }
  }
  if (inWord) words.push(cur);
  return words;
}

/** Quotes a word for a shell only when it needs it, for showing commands to people. */
export function shellQuote(word: string): string {
  return /^[A-Za-z0-9_./:=@%+,-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

function quoteForError(value: string): string {
  return `'${value.replace(/[\x00-\x1f\x7f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`)}'`;
}

/** The public view of a job (list --json, status --json); field names are stable. */
export function jobView(job: Job, now: number) {
  const end = job.state === 'running' ? now : job.endedAt;
  return {
    id: job.id, state: job.state, worker: job.worker, slot: job.slot >= 0 ? job.slot : null,
    exitCode: job.exitCode, reason: job.reason, attempts: job.attempts,
    retries: job.retries, timeout: job.timeout || null,
    queuedAt: iso(job.queuedAt), startedAt: job.startedAt ? iso(job.startedAt) : null,
    endedAt: job.endedAt ? iso(job.endedAt) : null,
    runtimeMs: job.startedAt && end >= job.startedAt ? end - job.startedAt : null,
    script: job.script, args: job.args, cwd: job.cwd,
    history: (job.history ?? []).map((a) => ({
      attempt: a.n, worker: a.worker, slot: a.slot, exitCode: a.exitCode, reason: a.reason,
      startedAt: iso(a.startedAt), endedAt: iso(a.endedAt),
    })),
  };
}
export type JobView = ReturnType<typeof jobView>;

function workerView(st: State, w: Worker) {
  return {
    host: w.host, slots: w.slots, state: w.state, checking: w.state === 'up' && w.probeAt > 0,
    error: w.error, since: iso(w.since), nextProbeAt: w.state === 'down' && w.probeAt ? iso(w.probeAt) : null,
    running: w.running.flatMap((id, slot) => (id ? [{ slot, id, command: commandOf(st.jobs.get(id)) }] : [])),
  };
}

const commandOf = (job: Job | undefined) => (job ? [job.script, ...job.args].map(shellQuote).join(' ') : '');
const iso = (t: number) => new Date(t).toISOString();

/** The status reply: counts, every worker with its slots, and the head of the queue. */
export function statusView(st: State) {
  const queue: { id: number; command: string; queuedAt: string; attempts: number }[] = [];
  for (const job of waitingJobs(st)) {
    if (queue.length >= QUEUE_HEAD) break;
    queue.push({ id: job.id, command: commandOf(job), queuedAt: iso(job.queuedAt), attempts: job.attempts });
  }
  return {
    counts: { ...st.counts, total: st.jobs.size },
    workers: [...st.workers.values()].map((w) => workerView(st, w)),
    queue,
  };
}
export type StatusView = ReturnType<typeof statusView>;

// ============================================================================
// The journal: the state on disk
// ============================================================================

export type LoadResult = { state: State; warnings: string[]; journalSize: number; snapshotSize: number };

class DamagedState extends UserError {}
const damaged = (file: string, line: number, what: string) =>
  new DamagedState(EXIT_FAILED, `damaged state file '${file}' line ${line}: ${what}`,
    'nothing was changed; move the file aside or repair it, then start again');

/** Calls fn(line, lineNo, endOffset) for every '\n'-terminated line in the first `limit`
 *  bytes of a file, reading it in chunks (a line may be far longer than a chunk); returns
 *  the bytes after the last newline, if any, and where they start. */
function forEachLine(file: string, limit: number, fn: (line: string, no: number, end: number) => void): { tail: Buffer; tailAt: number } {
  const fd = fs.openSync(file, 'r');
  try {
    let parts: Buffer[] = [], offset = 0, no = 0, n: number, read = 0;
    for (;;) {
      const chunk = Buffer.allocUnsafe(1 << 20);
      if ((n = fs.readSync(fd, chunk, 0, Math.min(chunk.length, limit - read), null)) <= 0) break;
      read += n;
      let start = 0, nl: number;
      while ((nl = chunk.indexOf(10, start)) >= 0 && nl < n) {
        const piece = chunk.subarray(start, nl);
        const line = parts.length ? Buffer.concat([...parts, piece]) : piece;
        parts = [];
        offset += line.length + 1;
        fn(line.toString('utf8'), ++no, offset);
        start = nl + 1;
      }
      if (start < n) parts.push(chunk.subarray(start, n));
    }
    return { tail: Buffer.concat(parts), tailAt: offset };
  } finally {
    fs.closeSync(fd);
  }
}

function parseLine(file: string, line: string, no: number): Record<string, unknown> {
  try {
    const v = JSON.parse(line);
    if (v && typeof v === 'object' && !Array.isArray(v)) return v;
  } catch { /* reported below */ }
  throw damaged(file, no, 'not a JSON object');
}

function checkHeader(file: string, header: Record<string, unknown>, format: string): void {
  if (header.format !== format) throw damaged(file, 1, `not a ${format} file`);
  if (typeof header.version !== 'number' || header.version > FORMAT_VERSION) {
    throw new DamagedState(EXIT_FAILED, `state file '${file}' has format version ${String(header.version)}, newer than this program's ${FORMAT_VERSION}`, 'use a newer cli.ts; nothing was changed');
  }
}

/** Loads the snapshot, then replays the journal after it. A journal whose last line
 *  was cut off by a crash loads up to there (with a warning); any other damage throws,
 *  naming the file and line, and nothing is written. */
export function loadState(dataDir: string, journalLimit = Infinity): LoadResult {
  const st = newState();
  const warnings: string[] = [];
  const snapFile = path.join(dataDir, 'snapshot'), journalFile = path.join(dataDir, 'journal');
  let snapshotSize = 0, journalSize = 0;
  if (fs.existsSync(snapFile)) {
    snapshotSize = fs.statSync(snapFile).size;
    let complete = false;
    const { tail } = forEachLine(snapFile, Infinity, (line, no) => {
      const rec = parseLine(snapFile, line, no);
      if (no === 1) {
        checkHeader(snapFile, rec, 'djs-snapshot');
        st.seq = Number(rec.seq); st.nextId = Number(rec.nextId);
        if (!Number.isSafeInteger(st.seq) || !Number.isSafeInteger(st.nextId)) throw damaged(snapFile, 1, 'bad header');
      } else if (rec.w) {
        const w = rec.w as Worker;
        if (typeof w.host !== 'string' || !Array.isArray(w.running)) throw damaged(snapFile, no, 'bad worker');
        st.workers.set(w.host, w);
      } else if (rec.j) {
        const job = rec.j as Job;
        if (typeof job.id !== 'number' || !JOB_STATES.includes(job.state) || typeof job.script !== 'string' || !Array.isArray(job.args)) throw damaged(snapFile, no, 'bad job');
        if (job.args.length === 0) job.args = NO_ARGS;
        job.script = intern(st, job.script); job.cwd = intern(st, job.cwd);
        if (job.worker !== null) job.worker = intern(st, job.worker);
        st.jobs.set(job.id, job);
        st.counts[job.state]++;
        if (job.state === 'waiting') enqueue(st, job, false);
      } else if (rec.end) {
        if (rec.jobs !== st.jobs.size) throw damaged(snapFile, no, 'job count does not match');
        complete = true;
      } else throw damaged(snapFile, no, 'unknown record');
    });
    if (tail.length || !complete) throw damaged(snapFile, 0, 'incomplete snapshot (no end record)');
  }
  if (fs.existsSync(journalFile)) {
    let lastNo = 0;
    const { tail, tailAt } = forEachLine(journalFile, journalLimit, (line, no, end) => {
      lastNo = no;
      const rec = parseLine(journalFile, line, no);
      if (no === 1) {
        checkHeader(journalFile, rec, 'djs-journal');
        if (Number(rec.after) > st.seq) throw damaged(journalFile, 1, `starts after event ${String(rec.after)} but the snapshot ends at ${st.seq}`);
      } else {
        const n = rec.n;
        if (typeof n !== 'number') throw damaged(journalFile, no, 'event without a sequence number');
        if (n <= st.seq) { journalSize = end; return; }
        if (n !== st.seq + 1) throw damaged(journalFile, no, `event ${n} follows event ${st.seq}`);
        try { applyEvent(st, rec as unknown as Event); } catch (e) { throw damaged(journalFile, no, (e as Error).message); }
        st.seq = n;
      }
      journalSize = end;
    });
    if (lastNo === 0 && tail.length === 0) journalSize = 0;
    if (tail.length) {
      if (lastNo === 0) throw damaged(journalFile, 1, 'cut-off header');
      warnings.push(`journal '${journalFile}' ends in a cut-off line ${lastNo + 1} (${tail.length} bytes, from a crash during a write); loaded everything before it`);
      journalSize = tailAt;
    }
  }
  return { state: st, warnings, journalSize, snapshotSize };
}

function fsyncDir(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  try { fs.fsyncSync(fd); } finally { fs.closeSync(fd); }
}

/** Writes data to fd completely (writeSync may write less than asked). */
function writeAll(fd: number, data: string | Buffer): void {
  const buf = typeof data === 'string' ? Buffer.from(data) : data;
  let off = 0;
  while (off < buf.length) off += fs.writeSync(fd, buf, off, buf.length - off);
}

/** Writes a file by temp-write, fsync, rename, fsync of the directory. */
function replaceFile(file: string, write: (fd: number) => void): void {
  const tmp = `${file}.tmp`;
  const fd = fs.openSync(tmp, 'w', 0o600);
  try { write(fd); fs.fsyncSync(fd); } finally { fs.closeSync(fd); }
  fs.renameSync(tmp, file);
  fsyncDir(path.dirname(file));
}

/** The append-only event log of a data dir, with its snapshot. */
export class Journal {
  dir: string;
  fd: number;
  size: number;
  snapshotSize: number;
  mustCut = false; // a failed write could not be cut back yet: the file is longer than `size`
  constructor(dir: string, size: number, snapshotSize: number) {
    this.dir = dir;
    const file = path.join(dir, 'journal');
    if (!fs.existsSync(file) || size === 0) replaceFile(file, (fd) => writeAll(fd, journalHeader(0)));
    this.fd = fs.openSync(file, 'r+');
    this.size = size || fs.fstatSync(this.fd).size;
    if (fs.fstatSync(this.fd).size > this.size) { fs.ftruncateSync(this.fd, this.size); fs.fdatasyncSync(this.fd); }
    this.snapshotSize = snapshotSize;
  }

  /** Appends lines and flushes them to disk. On failure, cuts the journal back to where
   *  it was, so a half-written batch never stays on disk, and throws. */
  append(text: string): void {
    const buf = Buffer.from(text);
    if (this.mustCut) { fs.ftruncateSync(this.fd, this.size); this.mustCut = false; }
    try {
      let off = 0;
      while (off < buf.length) off += fs.writeSync(this.fd, buf, off, buf.length - off, this.size + off);
      fs.fdatasyncSync(this.fd);
      this.size += buf.length;
    } catch (e) {
      try { fs.ftruncateSync(this.fd, this.size); } catch { this.mustCut = true; }
      throw e;
    }
  }

  needsSnapshot(): boolean {
    return this.size > SNAPSHOT_MIN_JOURNAL_BYTES && this.size > this.snapshotSize / 2;
  }

  /** Writes the whole state as a new snapshot, then starts an empty journal after it.
   *  A crash between the two renames leaves a snapshot and an old journal whose events
   *  it already holds; loadState skips them by sequence number. */
  snapshot(st: State): void {
    const file = path.join(this.dir, 'snapshot');
    let written = 0;
    replaceFile(file, (fd) => {
      let buf = JSON.stringify({ format: 'djs-snapshot', version: FORMAT_VERSION, seq: st.seq, nextId: st.nextId }) + '\n';
      const put = (rec: unknown) => {
        buf += JSON.stringify(rec) + '\n';
        if (buf.length > 1 << 20) { writeAll(fd, buf); written += Buffer.byteLength(buf); buf = ''; }
      };
      for (const w of st.workers.values()) put({ w });
      for (const j of waitingJobs(st)) put({ j: { ...j, qtok: 0 } });
      for (const j of st.jobs.values()) if (j.state !== 'waiting') put({ j });
      put({ end: true, jobs: st.jobs.size });
      writeAll(fd, buf); written += Buffer.byteLength(buf);
    });
    const jfile = path.join(this.dir, 'journal');
    replaceFile(jfile, (fd) => writeAll(fd, journalHeader(st.seq)));
    const fd = fs.openSync(jfile, 'r+');
    fs.closeSync(this.fd);
    this.fd = fd;
    this.size = fs.fstatSync(this.fd).size;
    this.snapshotSize = written;
  }
}
const journalHeader = (after: number) => JSON.stringify({ format: 'djs-journal', version: FORMAT_VERSION, after }) + '\n';

// ============================================================================
// The runner: job processes, probes, process identity
// ============================================================================

/** The launcher: one bash process for the life of the server that starts every job, so
 *  that a start never forks the server (a fork costs time in proportion to the memory of
 *  the process that forks: milliseconds for a server holding a million jobs) and costs
 *  no new shell either. It runs as
 *    bash --norc --noprofile -c 'eval "$DJS_LAUNCHER_CODE"' djs-launcher DATA_DIR LOG_DIR
 *         [NAME=VALUE | -NAME]...
 *  (the code comes in through the environment, so `ps` shows a short line; the NAME
 *  words are what the jobs' environment must say but the launcher's must not, see
 *  launcherArgs). The server writes one line per job,
 *  `j ID RUN CWD MARKER WORKER SLOT ATTEMPT SCRIPT ARGS...`, every word quoted with
 *  bashWord (short lines: bash reads a pipe one byte at a time).
 *
 *  `j` forks the job's wrapper: a subshell in a process group of its own (job control is
 *  on), in the launcher's session, which has no terminal. The wrapper claims the run by
 *  creating its pid file exclusively and keeps it open on fd 4 (which is how a later
 *  server tells this run's wrapper from any other process), writes its pid there, runs
 *  the script with the job's argv, adds the exit code on a second line (one file per
 *  run: creating and deleting files is a good part of a start's cost), and then tells
 *  the server. TERM/INT/HUP are trapped, not ignored, so the script gets them with
 *  default handling while the wrapper lives on to record the code; one that comes
 *  before the script starts stops it from starting. The launcher's own variables start
 *  with __djs_, so that no variable of the server's environment gets in their way.
 *
 *  Lines to the server (each one write, well under PIPE_BUF, so they never interleave;
 *  an `x` may come before its `s`):
 *    s ID RUN PID      the wrapper of that run was forked
 *    x ID RUN CODE     it ended: the script's exit code, 128+N for signal N
 *    x ID RUN - WHY    the job did not start: WHY is `log` or `cwd` (no claim made),
 *                      `taken` (a server claimed the run first) or `nowrite` (the pid
 *                      file could not be created)
 *  When its input ends (the server is gone) the launcher stays until its wrappers have
 *  ended: a process group whose parent leaves the session is orphaned, and the kernel
 *  sends SIGHUP to an orphaned group that holds a stopped process (a job paused with
 *  SIGSTOP would die of it). */
const LAUNCHER = `unset DJS_LAUNCHER_CODE
__djs_D=$1 __djs_L=$2; shift 2
__djs_env=("$@")
export DJS_DATA_DIR="$__djs_D"
set -m
exec 3>&1 4>&-
j() {
  (
    __djs_k=
    trap '__djs_k=1' TERM INT HUP
    __djs_p=$__djs_D/run/$1.$2.pid
    export JOB_ID=$1 SLAVE_IP=$5 SLAVE_SLOT=$6 JOB_ATTEMPT=$7
    exec </dev/null
    { exec >>"$__djs_L/$1.log"; } 2>/dev/null || { echo "x $1 $2 - log" >&3; exit 1; }
    exec 2>&1
    cd -- "$3" 2>/dev/null || { echo "x $1 $2 - cwd" >&3; exit 1; }
    if ! { set -C; exec 4>"$__djs_p"; } 2>/dev/null; then
      __djs_q=; read -r __djs_q < "$__djs_p" 2>/dev/null
      [ -n "$__djs_q" ] && echo "x $1 $2 - taken" >&3 && exit 1
      echo "djs: cannot create $__djs_p (disk full?); the job was not started"
      echo "x $1 $2 - nowrite" >&3; exit 1
    fi
    set +C
    echo $BASHPID >&4 || { echo "djs: cannot write $__djs_p (disk full?); the job was not started"; echo "x $1 $2 - nowrite" >&3; exit 1; }
    [ -z "$4" ] || printf %s "$4"
    __djs_i=$1 __djs_r=$2; shift 7
    for __djs_v in "\${__djs_env[@]}"; do
      if [ "\${__djs_v#-}" != "$__djs_v" ]; then unset -v "\${__djs_v#-}"; else export "$__djs_v"; fi
    done
    if [ -z "$__djs_k" ]; then "$@" 3>&- 4>&-; __djs_c=$?; else __djs_c=143; fi
    echo $__djs_c >&4
    echo "x $__djs_i $__djs_r $__djs_c" >&3
  ) & disown
  echo "s $1 $2 $!"
}
while IFS= read -r __djs_line; do eval "$__djs_line"; done
exec 1>/dev/null 3>&-
while :; do
  __djs_n=0
  for __djs_f in /proc/[0-9]*/stat; do
    read -r __djs_s < "$__djs_f" 2>/dev/null || continue
    __djs_s=\${__djs_s##*) }; __djs_s=\${__djs_s#* }
    [ "\${__djs_s%% *}" = $$ ] && __djs_n=1 && break
  done
  [ $__djs_n = 0 ] && exit 0
  sleep 1
done`;
/** A word for the launcher: plain if it is safe so, else $'...' with backslashes and
 *  quotes escaped and every byte outside printable ASCII written as \xHH (so any string
 *  stays one word on one line, whatever the locale's multibyte encoding). */
export const bashWord = (s: string): string =>
  /^[\w/.,:@%+=-]+$/.test(s) ? s : `$'${s.replace(/[\\']|[^\x20-\x7e]/gu, (c) =>
    c === '\\' || c === "'" ? '\\' + c : [...Buffer.from(c, 'utf8')].map((b) => '\\x' + b.toString(16).padStart(2, '0')).join(''))}'`;

/** Variables bash acts on (at start-up or when set) or sets itself: kept from the
 *  launcher, and set (or unset) again in each wrapper just before the script runs, as
 *  they were in the server's environment. */
const FOR_JOBS_ONLY = ['BASH_ENV', 'POSIXLY_CORRECT', 'TMOUT', 'SHLVL', 'OLDPWD'];
/** ... and what neither gets: SHELLOPTS and BASHOPTS (bash makes them read-only), and
 *  functions exported from bash (BASH_FUNC_*), which could stand in for the builtins the
 *  launcher uses. */
const keptFromLauncher = (name: string) => FOR_JOBS_ONLY.includes(name) || name === 'SHELLOPTS' || name === 'BASHOPTS' || name.startsWith('BASH_FUNC_');

/** The launcher's environment and its arguments after the code (see LAUNCHER). */
function launcherArgs(env: NodeJS.ProcessEnv, dataDir: string, logDir: string): { env: NodeJS.ProcessEnv; args: string[] } {
  const forJobs = FOR_JOBS_ONLY.map((name) => (env[name] === undefined ? `-${name}` : `${name}=${env[name]}`));
  return {
    env: { ...Object.fromEntries(Object.entries(env).filter(([name]) => !keptFromLauncher(name))), DJS_LAUNCHER_CODE: LAUNCHER },
    // --norc: its stdin is a socket, and bash given one reads ~/.bashrc as if run by sshd.
    args: ['--norc', '--noprofile', '-c', 'eval "$DJS_LAUNCHER_CODE"', 'djs-launcher', dataDir, logDir, ...forJobs],
  };
}

/** Run files are named by the job and its start count, which is never reused. (`exit`
 *  files hold the exit codes of wrappers of earlier versions, which had two files.) */
const runFile = (dataDir: string, id: number, run: number, kind: 'pid' | 'exit') =>
  path.join(dataDir, 'run', `${id}.${run}.${kind}`);

/** What a pid file says: its first line ('' while being written, 'void' when a server
 *  claimed the run, else the wrapper's pid), and the exit code once the job ended. */
function readRunFile(pidFile: string): { claim: string; code: number | null } | null {
  let text: string;
  try { text = fs.readFileSync(pidFile, 'utf8'); } catch { return null; }
  const [claim, code] = text.split('\n');
  return { claim: claim.trim(), code: /^\d+$/.test(code ?? '') ? Number(code) : null };
}

const HAVE_PROC = fs.existsSync('/proc/self/stat');

/** The fields of /proc/PID/stat after the command name (0: state, 1: parent, 2: process
 *  group, 19: start time), or null if there is no such process. */
function procStat(pid: number | string): string[] | null {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  } catch { return null; }
}

/** A process's start time in clock ticks since boot, from /proc (it does not move when
 *  the wall clock is set); '' where there is no /proc but the process exists; null if
 *  there is no such process (or only a zombie). */
export function processStartTicks(pid: number): string | null {
  if (HAVE_PROC) {
    const fields = procStat(pid);
    return fields === null || fields[0] === 'Z' ? null : fields[19];
  }
  try { process.kill(pid, 0); return ''; } catch (e) { return (e as NodeJS.ErrnoException).code === 'EPERM' ? '' : null; }
}

/** True if `pid` is the live wrapper of the run whose pid file is `pidFile`: it holds that
 *  very file open on fd 4 (or, for a wrapper of an earlier version, names it in its
 *  argv), so neither a reused pid nor a clock step can fool it. Without /proc, only
 *  existence can be checked. */
function isWrapper(pid: number, pidFile: string, file?: fs.Stats): boolean {
  if (!HAVE_PROC) return processStartTicks(pid) !== null;
  try {
    const held = fs.statSync(`/proc/${pid}/fd/4`), f = file ?? fs.statSync(pidFile);
    if (held.ino === f.ino && held.dev === f.dev) return true;
  } catch { /* no such process, no fd 4, or no pid file */ }
  try { return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes(pidFile); } catch { return false; }
}

/** The pid of the live wrapper of a run (for a pid file that its wrapper created but had
 *  not written yet), or null. */
function findWrapper(pidFile: string): number | null {
  if (!HAVE_PROC) return null;
  let file: fs.Stats;
  try { file = fs.statSync(pidFile); } catch { return null; }
  for (const name of fs.readdirSync('/proc')) {
    if (/^\d+$/.test(name) && isWrapper(Number(name), pidFile, file)) return Number(name);
  }
  return null;
}

/** True while a process of job `id` lives on in the process group its wrapper `pgid` led
 *  (a script whose wrapper was killed): a live (not zombie) member of that group whose
 *  environment names this job and data dir, so that neither a reused pid nor a process
 *  of another job counts. Without /proc: whether the group exists at all. */
function jobGroupAlive(id: number, pgid: number, dataDir: string): boolean {
  try { process.kill(-pgid, 0); } catch (e) { if ((e as NodeJS.ErrnoException).code !== 'EPERM') return false; }
  if (!HAVE_PROC) return true;
  const marks = [`JOB_ID=${id}`, `DJS_DATA_DIR=${dataDir}`];
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const fields = procStat(name);
    if (fields === null || fields[0] === 'Z' || Number(fields[2]) !== pgid) continue;
    try {
      const env = fs.readFileSync(`/proc/${name}/environ`, 'utf8').split('\0');
      if (marks.every((m) => env.includes(m))) return true;
    } catch { /* gone, or not ours */ }
  }
  return false;
}

function signalGroup(pid: number, sig: NodeJS.Signals): void {
  try { process.kill(-pid, sig); } catch { /* already gone */ }
}

export type SshSettings = { config: string | undefined; options: string[]; timeoutS: number };

export function sshSettings(env: NodeJS.ProcessEnv): SshSettings {
  const timeoutS = Number(env.DJS_SSH_TIMEOUT ?? 10);
  return {
    config: env.DJS_SSH_CONFIG || undefined,
    options: (env.DJS_SSH_OPTIONS ?? '').split(/\s+/).filter(Boolean),
    timeoutS: Number.isFinite(timeoutS) && timeoutS > 0 ? timeoutS : 10,
  };
}

/** Checks that `ssh -o BatchMode=yes` logs in to host and runs `true`; resolves to
 *  null or to why not. Never prompts; gives up after the connect timeout plus a margin. */
export function probeHost(host: string, ssh: SshSettings): Promise<string | null> {
  validateHost(host);
  const args = ['-o', 'BatchMode=yes', '-o', `ConnectTimeout=${ssh.timeoutS}`, '-o', 'ServerAliveInterval=5', '-o', 'ServerAliveCountMax=2'];
  if (ssh.config) args.push('-F', ssh.config);
  args.push(...ssh.options, '--', host, 'true');
  return new Promise((resolve) => {
    let err = '', done = false;
    const child = spawn('ssh', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    const finish = (why: string | null) => { if (!done) { done = true; clearTimeout(timer); resolve(why); } };
    const timer = setTimeout(() => { child.kill('SIGKILL'); finish(`no answer within ${ssh.timeoutS + 5}s`); }, (ssh.timeoutS + 5) * 1000);
    child.stderr!.on('data', (d) => { if (err.length < 4096) err += d; });
    child.on('error', (e) => finish(`cannot run ssh: ${e.message}`));
    child.on('close', (code) => {
      if (code === 0) return finish(null);
      const lines = err.split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('Warning: Permanently added'));
      finish(lines.at(-1) ?? `ssh exited with ${code}`);
    });
  });
}

// ============================================================================
// The server: the socket, the flush loop, effects
// ============================================================================

type Reply = (msg: Record<string, unknown>) => void;
type Request = Record<string, unknown> & { op: string };
/** Inputs wait in the inbox for the next flush: client requests that change state,
 *  outcomes (facts) from processes and probes, and ticks (a timer fired). */
type Input = { kind: 'request'; req: Request; reply: Reply } | { kind: 'fact'; ev: Event } | { kind: 'tick' };
/** A job's process as the server knows it: started by our launcher (its wrapper reports
 *  its end), or adopted (watched through its run files). `missed`: a launched wrapper
 *  was found gone once; `unheard`: its re-adoption failed and is tried again (see
 *  watchProcs). */
type Proc = { pid: number; run: number; launched: boolean; pendingSignal: NodeJS.Signals | null; missed: boolean; unheard?: boolean };
/** A `wait` client: for jobs (ids, or all when null), or for workers to be gone. */
type Waiter = { ids: Set<number> | null; pending: Set<number> | null; hosts: string[] | null; send: Reply; lastSent: number; lastKey: string };
type Follower = { id: number; send: Reply };
type ServerConfig = { dataDir: string; logDir: string; killGraceMs: number; probeMaxMs: number; ssh: SshSettings };

// All server state, in one place.
let cfg: ServerConfig;
let st: State;
let journal: Journal;
let server: net.Server;
let baseEnv: NodeJS.ProcessEnv;
const inbox: Input[] = [];
let flushQueued = false;
let timer: NodeJS.Timeout | null = null;
let writeRetryMs = 0;
const procs = new Map<number, Proc>();     // processes of running jobs, by job id
let launcher: ChildProcess | null = null;
const probing = new Set<string>();
const sigkilled = new Set<number>();
const waiters = new Set<Waiter>();
const followers = new Set<Follower>();
let adoptWatch: fs.FSWatcher | null = null;
let procTimer: NodeJS.Timeout | null = null;
let stopping = false;
let startFailures = 0;           // wrappers in a row that could not claim their run
let startsPausedUntil = 0;

const log = (msg: string) => process.stdout.write(`${new Date().toISOString()} ${msg}\n`);

function submit(input: Input): void {
  inbox.push(input);
  if (!flushQueued) { flushQueued = true; setImmediate(flush); }
}
const fact = (ev: Event) => submit({ kind: 'fact', ev });

/** Ids of the jobs an event touches (for wait), or 'all'. */
function touchedBy(ev: Event): number[] | 'all' {
  switch (ev.e) {
    case 'add': return Array.from({ length: ev.jobs.length }, (_, i) => ev.id + i);
    case 'remove': case 'stop': case 'retry': return ev.ids;
    case 'start': case 'unstart': case 'end': return [ev.id];
    case 'clean': return 'all';
    default: return [];
  }
}

/** One turn of the server: apply every queued input, start what can start, write all
 *  resulting events with one write and one fdatasync, then answer and carry out the
 *  effects. Nothing leaves the server before its events are on disk. */
function flush(): void {
  flushQueued = false;
  if (stopping) return;
  const now = Date.now();
  const lines: string[] = [];
  const answers: { reply: Reply; answer: Record<string, unknown> }[] = [];
  const effects: (() => void)[] = [];
  const facts: Event[] = [];
  const touched = new Set<number>();
  let touchedAll = false;
  const commit = (ev: Event) => {
    applyEvent(st, ev);
    st.seq++;
    lines.push(JSON.stringify({ n: st.seq, ...ev }));
    if (waiters.size) { // only `wait` clients need to know which jobs changed
      const ids = touchedBy(ev);
      if (ids === 'all') touchedAll = true; else for (const id of ids) touched.add(id);
    }
    // The run files of an attempt go only once its end is on disk: until then they are
    // what tells a restarted server that the attempt ran.
    if (ev.e === 'end') effects.push(() => removeRunFiles(ev.id, ev.run));
    if (ev.e === 'unstart') sigkilled.delete(ev.id);
  };

  // 1. Requests and facts, in arrival order.
  for (const input of inbox.splice(0)) {
    if (input.kind === 'tick') continue;
    if (input.kind === 'fact') { facts.push(input.ev); commit(input.ev); continue; }
    try {
      answers.push({ reply: input.reply, answer: handleChange(input.req, now, commit, effects) });
    } catch (e) {
      sendError(input.reply, e);
    }
  }
  // 2. Deadlines: timeouts become stops; SIGKILLs and probes are effects.
  const { due } = dueActions(st, now, { probing, sigkilled });
  for (const d of due) {
    if (d.kind === 'timeout') {
      commit({ e: 'stop', t: now, ids: [d.id], why: 'timeout', grace: cfg.killGraceMs });
      effects.push(() => signalJob(d.id, 'SIGTERM'));
    } else if (d.kind === 'sigkill') {
      sigkilled.add(d.id);
      effects.push(() => signalJob(d.id, 'SIGKILL'));
    } else {
      probing.add(d.host);
      effects.push(() => runProbe(d.host));
    }
  }
  // 3. Scheduling: fill the free slots (unless starts pause after wrapper failures).
  for (const s of now < startsPausedUntil ? [] : planStarts(st)) {
    commit({ e: 'start', t: now, id: s.id, w: s.host, s: s.slot });
    effects.push(() => startJob(s.id));
  }
  // 4. Make it durable; then answer and act.
  if (lines.length) {
    try {
      journal.append(lines.join('\n') + '\n');
      writeRetryMs = 0;
    } catch (e) {
      for (const d of due) if (d.kind === 'probe') probing.delete(d.host); else if (d.kind === 'sigkill') sigkilled.delete(d.id);
      recoverFromWriteFailure(e as NodeJS.ErrnoException, answers.map((a) => a.reply), facts);
      return;
    }
  }
  for (const a of answers) a.reply({ ok: true, ...a.answer });
  for (const fx of effects) fx();
  if (lines.length) notifyWatchers(now, touchedAll ? null : touched);
  if (journal.needsSnapshot()) takeSnapshot();
  armTimer();
}

/** The journal could not be written (disk full, read-only): memory is ahead of the
 *  disk, so reload the state from disk, refuse the requests of the batch, and retry the
 *  facts (processes did end; probes did answer) with a growing delay. */
function recoverFromWriteFailure(e: NodeJS.ErrnoException, refused: Reply[], facts: Event[]): void {
  const what = `cannot write the journal '${path.join(cfg.dataDir, 'journal')}': ${e.message}`;
  log(`error: ${what}; ${refused.length} request(s) refused, ${facts.length} outcome(s) kept for retry`);
  try {
    st = loadState(cfg.dataDir, journal.size).state;
  } catch (e2) {
    log(`fatal: cannot reload the state after a failed write: ${(e2 as Error).message}; running jobs keep running`);
    process.exit(1);
  }
  for (const reply of refused) reply({ ok: false, code: EXIT_FAILED, error: what, hint: 'nothing was changed; free space or fix the data dir, then try again' });
  writeRetryMs = Math.min(30_000, writeRetryMs ? writeRetryMs * 2 : 250);
  setTimeout(() => { for (const ev of facts) fact(ev); submit({ kind: 'tick' }); }, writeRetryMs);
}

function sendError(reply: Reply, e: unknown): void {
  const err = asUserError(e);
  reply({ ok: false, error: err.message, hint: err.hint, code: err.code });
}

function takeSnapshot(): void {
  const t0 = Date.now();
  try {
    journal.snapshot(st);
    log(`snapshot of ${st.jobs.size} jobs written in ${Date.now() - t0} ms`);
  } catch (e) {
    log(`warning: cannot write a snapshot: ${(e as Error).message}; the journal keeps growing`);
  }
}

/** Sets the one timer to the next deadline the core names. */
function armTimer(): void {
  if (timer) { clearTimeout(timer); timer = null; }
  const now = Date.now();
  const { due, next: deadline } = dueActions(st, now, { probing, sigkilled });
  // Something fell due while the flush ran (fsync, spawns): take it now.
  if (due.length) return submit({ kind: 'tick' });
  const next = startsPausedUntil > now && st.counts.waiting > 0 ? Math.min(deadline, startsPausedUntil) : deadline;
  if (next === Infinity) return;
  timer = setTimeout(() => { timer = null; submit({ kind: 'tick' }); }, Math.max(0, Math.min(next - now, 2 ** 31 - 1)));
}

// ---- state-changing requests ------------------------------------------------

const num = (v: unknown, name: string, min = 0, max = Number.MAX_SAFE_INTEGER): number => {
  const n = typeof v === 'number' ? v : Number(v);
  if (!Number.isSafeInteger(n) || n < min || n > max) throw usage(`invalid ${name} ${quoteForError(String(v))}`);
  return n;
};
const idList = (v: unknown): number[] => {
  if (!Array.isArray(v) || v.length === 0) throw usage('no job ids given');
  return v.map((x) => num(x, 'job id', 1));
};
function jobOrFail(id: number): Job {
  const job = st.jobs.get(id);
  if (!job) throw failure(`no such job '${id}'`, id >= st.nextId ? 'ids so far end at ' + (st.nextId - 1) : 'it may have been removed or cleaned');
  return job;
}

/** Validates one state-changing request against the state, commits its events, and
 *  returns the answer. Throws UserError (nothing committed) when the request is wrong. */
function handleChange(req: Request, now: number, commit: (ev: Event) => void, effects: (() => void)[]): Record<string, unknown> {
  switch (req.op) {
    case 'add_jobs': {
      const cwd = req.cwd, jobs = req.jobs;
      if (typeof cwd !== 'string' || !path.isAbsolute(cwd) || cwd.includes('\0')) throw usage('add_jobs needs an absolute cwd');
      if (!Array.isArray(jobs) || jobs.length === 0) throw usage('no jobs given');
      const checked = new Set<string>();
      for (const spec of jobs) {
        if (!Array.isArray(spec) || spec.length === 0 || !spec.every((w) => typeof w === 'string')) throw usage('a job is a list of strings');
        if (spec.some((w) => w.includes('\0'))) throw usage('a job\'s words cannot hold NUL bytes');
        if (!checked.has(spec[0])) { checkScript(spec[0]); checked.add(spec[0]); }
      }
      const id = st.nextId;
      commit({ e: 'add', t: now, id, cwd, retries: num(req.retries ?? 0, 'retries'), timeout: num(req.timeout ?? 0, 'timeout'), jobs: jobs as JobSpec[] });
      return { first: id, count: jobs.length };
    }
    case 'remove_jobs': {
      let ids: number[];
      if (req.ids !== undefined) {
        ids = idList(req.ids);
        for (const id of ids) {
          const job = jobOrFail(id);
          if (job.state !== 'waiting') throw failure(`job '${id}' is ${job.state}, not waiting`, job.state === 'running' ? `stop it with: kill ${id}` : undefined);
        }
      } else {
        const script = req.script, args = req.args;
        if (typeof script !== 'string' || !Array.isArray(args)) throw usage('remove_job needs a script and args');
        ids = [];
        for (const job of waitingJobs(st)) {
          if (job.script === script && job.args.length === args.length && job.args.every((a, i) => a === args[i])) ids.push(job.id);
        }
        if (ids.length === 0) throw failure(`no waiting job runs ${quoteForError([script, ...args.map(String)].map(shellQuote).join(' '))}`);
      }
      commit({ e: 'remove', t: now, ids });
      return { ids };
    }
    case 'kill': {
      const ids = req.all ? [...st.jobs.values()].filter((j) => j.state === 'running' || j.state === 'waiting').map((j) => j.id) : idList(req.ids);
      if (!req.all) for (const id of ids) {
        const job = jobOrFail(id);
        if (isFinished(job.state)) throw failure(`job '${id}' is not running (it is ${job.state})`);
      }
      if (ids.length) commit({ e: 'stop', t: now, ids, why: 'user', grace: cfg.killGraceMs });
      for (const id of ids) if (st.jobs.get(id)?.state === 'running') effects.push(() => signalJob(id, 'SIGTERM'));
      return { ids };
    }
    case 'retry': {
      const byState = req.failed || req.killed;
      const ids = byState ? [...st.jobs.values()].filter((j) => (req.failed && j.state === 'failed') || (req.killed && j.state === 'killed')).map((j) => j.id) : idList(req.ids);
      if (!byState) for (const id of ids) {
        const job = jobOrFail(id);
        if (!isFinished(job.state)) throw failure(`job '${id}' is ${job.state}; only finished jobs can be retried`);
      }
      if (ids.length) commit({ e: 'retry', t: now, ids });
      return { ids };
    }
    case 'clean': {
      const ids = [...st.jobs.values()].filter((j) => isFinished(j.state)).map((j) => j.id);
      if (ids.length) commit({ e: 'clean', t: now });
      if (req.logs) effects.push(() => { for (const id of ids) fs.rm(logFile(id), { force: true }, () => {}); });
      return { count: ids.length };
    }
    case 'add_workers': {
      const list = req.workers as { host: string; slots: number }[];
      for (const w of list) commit({ e: 'worker', t: now, host: w.host, slots: w.slots, ssh: !req.skipCheck });
      return { added: list.map((w) => w.host) };
    }
    case 'remove_workers': {
      if (!Array.isArray(req.hosts) || !req.hosts.every((h) => typeof h === 'string')) throw usage('no hosts given');
      const hosts = [...new Set(req.hosts as string[])];
      const result: { host: string; running: number }[] = [];
      for (const host of hosts) {
        const w = st.workers.get(host);
        if (!w) throw failure(`no such worker '${host}'`);
        const running = w.running.filter(Boolean);
        if (running.length && req.mode !== 'wait' && req.mode !== 'kill') {
          throw failure(`worker '${host}' is running ${running.length} job(s)`, 'use --wait to let them finish first, or --kill to stop and requeue them');
        }
        result.push({ host, running: running.length });
      }
      for (const { host } of result) {
        const w = st.workers.get(host)!;
        const running = w.running.filter(Boolean);
        if (!running.length) { commit({ e: 'unworker', t: now, host }); continue; }
        commit({ e: 'drain', t: now, host });
        if (req.mode === 'kill') {
          commit({ e: 'stop', t: now, ids: running, why: 'requeue', grace: cfg.killGraceMs });
          for (const id of running) effects.push(() => signalJob(id, 'SIGTERM'));
        }
      }
      return { workers: result };
    }
    default:
      throw usage(`unknown request '${req.op}'`);
  }
}

/** A job's script must be an executable regular file, named by an absolute path. */
function checkScript(script: string): void {
  if (!path.isAbsolute(script)) throw usage(`script path is not absolute: ${quoteForError(script)}`);
  checkExecutable(script, script);
}

/** Throws unless `abs` is an executable regular file; errors name it as `shown`. */
function checkExecutable(abs: string, shown: string, where = ''): void {
  let stat: fs.Stats;
  try { stat = fs.statSync(abs); } catch { throw failure(`no such script ${quoteForError(shown)}${where}`); }
  if (!stat.isFile()) throw failure(`not a file: ${quoteForError(shown)}${where}`);
  try { fs.accessSync(abs, fs.constants.X_OK); } catch {
    throw failure(`script is not executable: ${quoteForError(shown)}${where}`, `make it executable with: chmod +x ${shellQuote(shown)}`);
  }
}

const asUserError = (e: unknown) => (e instanceof UserError ? e : new UserError(EXIT_FAILED, `internal error: ${(e as Error)?.message ?? String(e)}`));
const logFile = (id: number) => path.join(cfg.logDir, `${id}.log`);

// ---- effects ---------------------------------------------------------------

function ensureLauncher(): ChildProcess {
  if (launcher) return launcher;
  const { env, args } = launcherArgs(baseEnv, cfg.dataDir, cfg.logDir);
  const l = spawn('bash', args, { detached: true, stdio: ['pipe', 'pipe', 'inherit'], env });
  l.stdin!.on('error', () => {});
  onLines(l.stdout!, launcherSaid);
  l.on('exit', () => launcherGone(l));
  l.on('error', (e) => { log(`error: cannot run the job launcher (bash): ${e.message}`); launcherGone(l); });
  launcher = l;
  return l;
}

/** Starts the process of a job whose start is durable: hands it to the launcher. */
function startJob(id: number): void {
  const job = st.jobs.get(id);
  if (!job || job.state !== 'running' || job.worker === null) return;
  const run = job.runs, attempt = job.attempts;
  let marker: string | undefined;
  if (attempt > 1) {
    const prev = job.history?.at(-1);
    const was = prev ? `; attempt ${prev.n} on ${prev.worker}: ${prev.reason ?? `exit ${prev.exitCode}`}` : '';
    marker = `\n--- djs: attempt ${attempt} of job ${id} on ${job.worker} slot ${job.slot}, ${iso(Date.now())}${was} ---\n`;
  }
  procs.set(id, { pid: 0, run, launched: true, pendingSignal: null, missed: false });
  const words = [job.cwd, marker ?? '', job.worker, String(job.slot), String(attempt), job.script, ...job.args];
  ensureLauncher().stdin!.write(`j ${id} ${run} ${words.map(bashWord).join(' ')}\n`);
  if (!procTimer) watchProcs();
}

/** What the launcher and the wrappers report (see LAUNCHER): a wrapper's pid, or its end. */
function launcherSaid(line: string): void {
  const [kind, idText, runText, what, why] = line.split(' ');
  const id = Number(idText), p = procs.get(id);
  if (!p || p.run !== Number(runText) || !p.launched) return;
  if (kind === 's') {
    p.pid = Number(what);
    if (p.pendingSignal) { signalGroup(p.pid, p.pendingSignal); p.pendingSignal = null; }
    return;
  }
  if (what === '-') {
    if (why === 'taken' || why === 'nowrite') return wrapperFailed(id, p);
    const job = st.jobs.get(id);
    return endProc(id, p, null, why === 'log' ? `cannot open the log ${logFile(id)}` : `cannot start: cannot enter ${job?.cwd ?? 'its directory'} (does it still exist?)`);
  }
  const code = Number(what);
  startFailures = 0;
  endProc(id, p, code);
}

/** The launcher ended under a running server (killed, crashed): the wrappers it forked
 *  run on by themselves, so their jobs are adopted (a wrapper that had not claimed its
 *  run yet never will: the server claims it); a new launcher starts with the next job. */
function launcherGone(l: ChildProcess): void {
  if (launcher !== l) return; // already handled (an error and an exit both come)
  launcher = null;
  if (stopping) return;
  log('warning: the job launcher ended; the jobs it started are watched through their run files');
  pauseStarts(); // a launcher that cannot run must not spin through the queue
  for (const [id, p] of procs) if (p.launched) readopt(id, p);
  watchProcs();
}

/** Pauses job starts for a growing delay after starts that failed; returns the delay. */
function pauseStarts(): number {
  startFailures++;
  const delay = Math.min(60_000, 500 * 2 ** Math.min(7, startFailures - 1));
  startsPausedUntil = Date.now() + delay;
  return delay;
}

/** The wrapper could not claim its run (run/ gone, disk full; or a server claimed it
 *  first): the job never started, so it goes back to the queue uncharged, and starts
 *  pause with a growing delay so that a broken data dir does not spin through the queue. */
function wrapperFailed(id: number, proc: Proc): void {
  if (procs.get(id) === proc) procs.delete(id);
  const delay = pauseStarts();
  log(`error: job ${id} did not start (its run file could not be written, see its log, or a server claimed its run); starts pause for ${delay} ms`);
  try { fs.mkdirSync(path.join(cfg.dataDir, 'run'), { recursive: true, mode: 0o700 }); } catch { /* reported by the next failure */ }
  fact({ e: 'unstart', t: Date.now(), id });
}

/** Records that the process of a job ended, and forgets it. */
function endProc(id: number, proc: Proc, code: number | null, why?: string): void {
  if (procs.get(id) === proc) procs.delete(id);
  sigkilled.delete(id);
  const t = Date.now();
  fact(why ? { e: 'end', t, id, run: proc.run, code, why } : { e: 'end', t, id, run: proc.run, code });
}

function removeRunFiles(id: number, run: number): void {
  fs.unlink(runFile(cfg.dataDir, id, run, 'pid'), () => {}); // (an earlier version's exit file goes at the next start)
}

function signalJob(id: number, sig: NodeJS.Signals): void {
  const proc = procs.get(id);
  if (!proc) return;
  if (proc.pid > 0) signalGroup(proc.pid, sig);
  else proc.pendingSignal = sig; // sent once the launcher says which pid it is
}

function runProbe(host: string): void {
  probeHost(host, cfg.ssh).then((err) => {
    probing.delete(host);
    const w = st.workers.get(host);
    if (!w) return;
    if (err === null ? w.state === 'down' : w.state === 'up') log(`worker ${host} is ${err === null ? 'up again' : `down: ${err}`}`);
    fact(err === null ? { e: 'probe', t: Date.now(), host, ok: true } : { e: 'probe', t: Date.now(), host, ok: false, err, max: cfg.probeMaxMs });
  });
}

// ---- adoption of jobs that outlived a server ---------------------------------

/** For every job the journal says is running, finds out what became of its process:
 *  ended (record its code), alive (adopt it), or never started (back to the queue). */
function adoptRunningJobs(): void {
  for (const job of st.jobs.values()) if (job.state === 'running') adoptJob(job);
  watchProcs();
}

/** Finds out what became of the process of one running job that no launcher of ours
 *  started: never started (queued again), alive (watched), or ended (recorded). */
function adoptJob(job: Job): void {
  const id = job.id, run = job.runs, now = Date.now();
  const pidFile = runFile(cfg.dataDir, id, run, 'pid');
  try {
    // Claim the run for the server: if this succeeds, the wrapper never got to run
    // the job and never will (its own exclusive create will fail).
    fs.writeFileSync(pidFile, 'void\n', { flag: 'wx' });
    log(`job ${id} was about to start when its start was cut short; queued again`);
    fact({ e: 'unstart', t: now, id });
    return;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw failure(`cannot check on running job ${id}: ${(e as Error).message}`, 'nothing was changed; fix the data dir and start again');
  }
  const claim = () => readRunFile(pidFile)?.claim ?? '';
  const text = claim();
  if (text === 'void') return fact({ e: 'unstart', t: now, id }); // an earlier server's claim
  // An empty file: the wrapper created it and had not written its pid yet.
  let pid = /^\d+$/.test(text) ? Number(text) : findWrapper(pidFile) ?? 0;
  // The wrapper may have written its pid (and even ended) while we looked for it.
  if (pid === 0) { const again = claim(); if (/^\d+$/.test(again)) pid = Number(again); }
  const proc: Proc = { pid, run, launched: false, pendingSignal: null, missed: false };
  if (pid > 0 && procAlive(id, proc)) procs.set(id, proc);
  else if (pid === 0) fact({ e: 'unstart', t: now, id }); // its wrapper died before running the job
  else finishAdopted(id, proc);
}

/** Records the end of an adopted job from its pid file (or as lost, without a code). */
function finishAdopted(id: number, proc: Proc): void {
  const run = readRunFile(runFile(cfg.dataDir, id, proc.run, 'pid'));
  if (run?.claim !== String(proc.pid)) {
    // Its wrapper could not create its pid file, or died before writing its pid: the
    // job never started.
    if (procs.get(id) === proc) procs.delete(id);
    return fact({ e: 'unstart', t: Date.now(), id });
  }
  let code = run.code;
  if (code === null) {
    try {
      const text = fs.readFileSync(runFile(cfg.dataDir, id, proc.run, 'exit'), 'utf8').trim();
      if (/^\d+$/.test(text)) code = Number(text);
    } catch { /* no exit file */ }
  }
  if (code === null && sigkilled.has(id)) code = 128 + 9; // we killed it, wrapper and all
  const job = st.jobs.get(id);
  const why = code === null && !job?.stopping ? 'lost: its wrapper ended without recording an exit code (killed?)' : undefined;
  endProc(id, proc, code, why);
}

/** A launched job whose notices will not come (its launcher or its wrapper is gone):
 *  found out again from its run files, as after a restart. */
function readopt(id: number, p: Proc): void {
  procs.delete(id);
  const job = st.jobs.get(id);
  if (job?.state !== 'running') return;
  try {
    adoptJob(job);
  } catch (e) {
    // Its run could not be claimed for the server (disk full): the next checks try again.
    if (!p.unheard) log(`error: ${(e as Error).message}; trying again every second`);
    procs.set(id, { ...p, unheard: true, missed: true });
    return;
  }
  const q = procs.get(id);
  if (q && p.pendingSignal) signalGroup(q.pid, p.pendingSignal); // a kill asked for meanwhile
}

/** True while the job of a proc runs: its wrapper lives (known by its pid file; a
 *  launched one also before it has claimed its run), or, when the wrapper was killed
 *  before it could record an exit code, the script lives on. */
function procAlive(id: number, p: Proc): boolean {
  const pidFile = runFile(cfg.dataDir, id, p.run, 'pid');
  if (isWrapper(p.pid, pidFile)) return true;
  if (p.launched && processStartTicks(p.pid) !== null) return true;
  return readRunFile(pidFile)?.code === null && jobGroupAlive(id, p.pid, cfg.dataDir);
}

/** Jobs whose end no notice may tell: adopted ones (not our children), and launched ones
 *  whose wrapper was killed outright (SIGKILL), which cannot send its own. Every second
 *  each is checked with procAlive; one that is gone is found out from its run files (a
 *  launched one only when found gone twice in a row, so that a notice still on its way
 *  is read first; one whose re-adoption failed, every other check). While adopted jobs
 *  run, the run dir is also watched, so that an exit code they write is taken at once.
 *  Both stop when no job runs. */
function watchProcs(): void {
  const check = (adoptedOnly: boolean) => {
    for (const [id, p] of procs) {
      if (!p.launched) {
        // A run-dir event only looks for an exit code (cheap); the timer checks the rest.
        const ended = adoptedOnly ? readRunFile(runFile(cfg.dataDir, id, p.run, 'pid'))?.code != null : !procAlive(id, p);
        if (ended) finishAdopted(id, p);
      } else if (!adoptedOnly) {
        if (!p.unheard && (p.pid === 0 || procAlive(id, p))) p.missed = false;
        else if (!p.missed) p.missed = true;
        else readopt(id, p);
      }
    }
    if (adoptWatch && ![...procs.values()].some((p) => !p.launched)) { adoptWatch.close(); adoptWatch = null; }
    if (procTimer && procs.size === 0) { clearInterval(procTimer); procTimer = null; }
  };
  if (!procTimer && procs.size) procTimer = setInterval(() => check(false), 1000);
  if (!adoptWatch && [...procs.values()].some((p) => !p.launched)) {
    try { adoptWatch = fs.watch(path.join(cfg.dataDir, 'run'), () => check(true)); } catch { /* the timer still checks */ }
  }
}

// ---- watchers: wait and log -f -----------------------------------------------

function waitCounts(w: Waiter) {
  if (!w.ids) return { ...st.counts, total: st.jobs.size, missing: 0 };
  const c = { waiting: 0, running: 0, done: 0, failed: 0, killed: 0, total: w.ids.size, missing: 0 };
  for (const id of w.ids) {
    const job = st.jobs.get(id);
    if (job) c[job.state]++; else c.missing++;
  }
  return c;
}

const unfinished = (id: number) => { const j = st.jobs.get(id); return j !== undefined && !isFinished(j.state); };

/** Tells every wait and log -f client what changed; ends those whose jobs finished.
 *  `touched` names the jobs this flush changed (null: maybe all). */
function notifyWatchers(now: number, touched: Set<number> | null): void {
  for (const w of waiters) {
    if (w.hosts) {
      if (w.hosts.every((h) => !st.workers.has(h))) { waiters.delete(w); w.send({ ok: true }); }
      continue;
    }
    if (w.ids && w.pending) {
      for (const id of touched ?? w.ids) {
        if (!w.ids.has(id)) continue;
        if (unfinished(id)) w.pending.add(id); else w.pending.delete(id);
      }
    }
    const finished = w.pending ? w.pending.size === 0 : st.counts.waiting + st.counts.running === 0;
    if (finished) {
      const c = waitCounts(w);
      waiters.delete(w);
      w.send({ ok: true, counts: c, allDone: c.done === c.total });
    } else if (now - w.lastSent >= 250) {
      const c = waitCounts(w);
      const key = `${c.waiting}/${c.running}/${c.done}/${c.failed}/${c.killed}`;
      if (key !== w.lastKey) { w.lastKey = key; w.lastSent = now; w.send({ progress: c }); }
    }
  }
  for (const f of followers) {
    const job = st.jobs.get(f.id);
    if (!job || isFinished(job.state)) { followers.delete(f); f.send({ ok: true, state: job?.state ?? 'removed', exitCode: job?.exitCode ?? null }); }
  }
}

// ---- read-only requests --------------------------------------------------------

/** Answers a request that changes nothing, at once. Streams long answers in chunks. */
function handleRead(req: Request, send: Reply, sock: net.Socket): boolean {
  switch (req.op) {
    case 'ping':
      send({ ok: true, pid: process.pid, dataDir: cfg.dataDir, logDir: cfg.logDir });
      return true;
    case 'status':
      send({ ok: true, server: { pid: process.pid, dataDir: cfg.dataDir, logDir: cfg.logDir }, ...statusView(st) });
      return true;
    case 'list': {
      const state = req.state;
      if (state !== undefined && !JOB_STATES.includes(state as JobState)) throw usage(`unknown state ${quoteForError(String(state))}`, `states are ${JOB_STATES.join(', ')}`);
      streamJobs(sock, state as JobState | undefined);
      return true;
    }
    case 'log': {
      const job = jobOrFail(num(req.id, 'job id', 1));
      const info = { path: logFile(job.id), state: job.state, exitCode: job.exitCode };
      if (!req.follow || isFinished(job.state)) { send({ ok: true, ...info }); return true; }
      send({ info });
      const f: Follower = { id: job.id, send };
      followers.add(f);
      sock.on('close', () => followers.delete(f));
      return true;
    }
    case 'wait': {
      let ids: Set<number> | null = null;
      if (Array.isArray(req.ids) && req.ids.length) {
        ids = new Set(idList(req.ids));
        for (const id of ids) jobOrFail(id);
      }
      const hosts = Array.isArray(req.hosts) ? req.hosts.map(String) : null;
      const w: Waiter = { ids, pending: ids && new Set([...ids].filter(unfinished)), hosts, send, lastSent: 0, lastKey: '' };
      waiters.add(w);
      sock.on('close', () => waiters.delete(w));
      notifyWatchers(Date.now(), new Set());
      return true;
    }
    default:
      return false;
  }
}

/** Sends list rows in chunks, waiting for the socket to drain, so a million jobs need
 *  neither one giant string nor a blocked server. */
function streamJobs(sock: net.Socket, state: JobState | undefined): void {
  const it = st.jobs.values();
  const now = Date.now();
  const pump = () => {
    for (;;) {
      const rows: JobView[] = [];
      for (let r = it.next(); !r.done; r = it.next()) {
        if (state === undefined || r.value.state === state) rows.push(jobView(r.value, now));
        if (rows.length >= 2000) break;
      }
      if (rows.length === 0) { sock.end(JSON.stringify({ ok: true }) + '\n'); return; }
      if (!sock.write(JSON.stringify({ rows }) + '\n')) { sock.once('drain', pump); return; }
    }
  };
  pump();
}

/** Both ends of the socket speak newline-delimited JSON: splits a stream into lines,
 *  scanning each chunk once (a request line may be many megabytes). */
export function onLines(sock: Readable, fn: (line: string) => void): void {
  let parts: string[] = [];
  sock.setEncoding('utf8');
  sock.on('data', (chunk: string) => {
    let start = 0, nl: number;
    while ((nl = chunk.indexOf('\n', start)) >= 0) {
      const piece = chunk.slice(start, nl);
      const line = parts.length ? parts.join('') + piece : piece;
      parts = [];
      start = nl + 1;
      fn(line);
    }
    if (start < chunk.length) parts.push(chunk.slice(start));
  });
}

function onConnection(sock: net.Socket): void {
  const send: Reply = (msg) => { if (!sock.destroyed) sock.write(JSON.stringify(msg) + '\n'); };
  sock.on('error', () => {});
  onLines(sock, (line) => handleRequestLine(line, send, sock));
}

function handleRequestLine(line: string, send: Reply, sock: net.Socket): void {
  let req: Request;
  try {
    const v = JSON.parse(line);
    if (!v || typeof v !== 'object' || typeof v.op !== 'string') throw new Error('no op');
    req = v;
  } catch {
    send({ ok: false, code: EXIT_USAGE, error: 'malformed request: expected one JSON object with an "op" per line' });
    return;
  }
  try {
    if (req.op === 'stop') { sock.end(JSON.stringify({ ok: true, pid: process.pid }) + '\n', () => shutdown('stop requested')); return; }
    if (handleRead(req, send, sock)) return;
    if (req.op === 'add_workers') return void addWorkers(req, send);
    submit({ kind: 'request', req, reply: send });
  } catch (e) {
    sendError(send, e);
  }
}

/** add_slave: validate every host, check ssh logins in parallel unless told not to,
 *  and add all of them or none. */
function addWorkers(req: Request, send: Reply): void {
  const list = req.workers;
  if (!Array.isArray(list) || list.length === 0) throw usage('no hosts given');
  const workers = list.map((w: { host?: unknown; slots?: unknown }) => {
    if (typeof w?.host !== 'string') throw usage('a worker needs a host');
    validateHost(w.host);
    return { host: w.host, slots: num(w.slots ?? 1, 'slot count', 1, MAX_SLOTS) };
  });
  const go = () => submit({ kind: 'request', req: { ...req, workers }, reply: send });
  if (req.skipCheck) return go();
  Promise.all(workers.map((w) => probeHost(w.host, cfg.ssh))).then((errs) => {
    const bad = workers.flatMap((w, i) => (errs[i] === null ? [] : [`${quoteForError(w.host)} (${errs[i]})`]));
    if (bad.length === 0) return go();
    send({ ok: false, code: EXIT_FAILED, error: `ssh login check failed for ${bad.join(', ')}; no worker added`, hint: 'check with: ssh -o BatchMode=yes HOST true (keys, known_hosts), or add with --skip_ssh_auth_check' });
  });
}

// ---- server life -------------------------------------------------------------

/** The pid of the live server that owns a data dir (by its pid file, checked against
 *  the process's start time so a reused pid does not count), or null. */
function liveServerPid(dataDir: string): number | null {
  let text: string;
  try { text = fs.readFileSync(path.join(dataDir, 'server.pid'), 'utf8'); } catch { return null; }
  const [pidText, ticks] = text.trim().split(' ');
  const pid = Number(pidText), now = pid > 0 ? processStartTicks(pid) : null;
  if (now === null) return null;
  return now === '' || !ticks || now === ticks ? pid : null;
}

/** Takes the data dir for this server: refuses if a live server owns it; clears what
 *  a dead one left (its pid file; the socket goes when the new one listens). */
function lockDataDir(dataDir: string): void {
  const pidFile = path.join(dataDir, 'server.pid');
  for (let tries = 0; tries < 3; tries++) {
    try {
      fs.writeFileSync(pidFile, `${process.pid} ${processStartTicks(process.pid) ?? ''}\n`, { flag: 'wx', mode: 0o600 });
      return;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
    const pid = liveServerPid(dataDir);
    if (pid !== null) throw failure(`a server is already running on data dir '${dataDir}' (pid ${pid})`, 'stop it first with: cli.ts stop');
    fs.rmSync(pidFile, { force: true });
  }
  throw failure(`cannot lock data dir '${dataDir}'`);
}

/** A lock that the kernel lets go of when this process ends, however it ends: an abstract
 *  Unix socket (Linux). Of two starts racing for one data dir (both finding the pid file
 *  of a crashed server) only one can hold it; the pid file then names the holder.
 *  Abstract sockets have no permissions, so the name comes from a random token kept in
 *  the (0700) data dir, which no other user can read, with the dir's device and inode
 *  (a copy of the dir is another dir); it fills the whole address (108 bytes), which is
 *  the one form Node 20 and later Node versions bind alike. Elsewhere the pid file alone
 *  decides. */
async function holdDirLock(dataDir: string): Promise<void> {
  if (process.platform !== 'linux') return;
  const tokenFile = path.join(dataDir, 'lock.token');
  try { fs.writeFileSync(tokenFile, crypto.randomBytes(16).toString('hex') + '\n', { flag: 'wx', mode: 0o600 }); } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
  }
  const dir = fs.statSync(dataDir);
  const name = `\0djs-${fs.readFileSync(tokenFile, 'utf8').trim()}-${dir.dev}-${dir.ino}-`.padEnd(108, 'x');
  const lock = net.createServer((c) => c.destroy());
  try {
    await new Promise<void>((resolve, reject) => {
      lock.once('error', reject);
      lock.listen(name, () => resolve());
    });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EADDRINUSE') return;
    const pid = liveServerPid(dataDir);
    throw failure(`a server is already running on data dir '${dataDir}'${pid ? ` (pid ${pid})` : ''}`, 'stop it first with: cli.ts stop');
  }
  lock.unref();
}

/** Where the socket of a data dir is, and how to reach it when its absolute path is too
 *  long for a Unix socket (about 107 bytes): by a path relative to the data dir. */
function socketPath(dataDir: string): { abs: string; usable: string; relative: boolean } {
  const abs = path.join(dataDir, 'server.sock');
  return Buffer.byteLength(abs) < 100 ? { abs, usable: abs, relative: false } : { abs, usable: 'server.sock', relative: true };
}

/** Jobs start through bash (see LAUNCHER): refuses to start without bash 4 or newer. */
function checkBash(): void {
  const r = spawnSync('bash', ['-c', 'echo "${BASH_VERSINFO[0]}"'], { encoding: 'utf8', env: { PATH: process.env.PATH } });
  if (r.error) throw failure(`cannot run bash, which starts the jobs: ${r.error.message}`, 'install bash 4 or newer (it is on the PATH of most systems)');
  if (!(Number(r.stdout) >= 4)) throw failure(`bash 4 or newer is needed to start jobs; this bash says version '${r.stdout.trim()}'`);
}

async function runServer(config: ServerConfig): Promise<void> {
  cfg = config;
  checkBash();
  fs.mkdirSync(cfg.dataDir, { recursive: true, mode: 0o700 });
  fs.chmodSync(cfg.dataDir, 0o700);
  fs.mkdirSync(path.join(cfg.dataDir, 'run'), { recursive: true, mode: 0o700 });
  fs.mkdirSync(cfg.logDir, { recursive: true });
  await holdDirLock(cfg.dataDir); // held until this process ends
  lockDataDir(cfg.dataDir);
  try {
    const loaded = loadState(cfg.dataDir);
    // Two starts that both found a stale pid file can both think they took the dir:
    // check before writing anything, and again once the journal is open.
    if (liveServerPid(cfg.dataDir) !== process.pid) throw failure(`another server took data dir '${cfg.dataDir}' while this one started`);
    for (const w of loaded.warnings) process.stderr.write(`warning: ${w}\n`);
    st = loaded.state;
    journal = new Journal(cfg.dataDir, loaded.journalSize, loaded.snapshotSize);
    baseEnv = { ...process.env };
    adoptRunningJobs();
    sweepRunDir();
    if (liveServerPid(cfg.dataDir) !== process.pid) throw failure(`another server took data dir '${cfg.dataDir}' while this one started`);
  } catch (e) {
    if (liveServerPid(cfg.dataDir) === process.pid) fs.rmSync(path.join(cfg.dataDir, 'server.pid'), { force: true });
    throw e;
  }
  process.chdir(cfg.dataDir);
  const sock = socketPath(cfg.dataDir);
  fs.rmSync(sock.abs, { force: true });
  server = net.createServer(onConnection);
  await new Promise<void>((resolve, reject) => {
    const old = process.umask(0o177);
    server.once('error', reject);
    server.listen(sock.relative ? sock.usable : sock.abs, () => resolve());
    process.umask(old);
  });
  fs.chmodSync(sock.abs, 0o600);
  server.on('error', (e) => log(`socket error: ${e.message}`));
  for (const sig of ['SIGTERM', 'SIGINT'] as const) process.on(sig, () => shutdown(sig));
  process.on('SIGHUP', () => {});
  ensureLauncher();
  if (journal.needsSnapshot()) takeSnapshot();
  log(`djs server ready: pid ${process.pid}, data ${cfg.dataDir}, logs ${cfg.logDir}, ${st.jobs.size} jobs, ${st.workers.size} workers`);
  submit({ kind: 'tick' });
}

/** Removes run files of attempts that are not running (left by a crash after an end
 *  was recorded but before its files were removed). */
function sweepRunDir(): void {
  for (const name of fs.readdirSync(path.join(cfg.dataDir, 'run'))) {
    const m = /^(\d+)\.(\d+)\.(pid|exit)$/.exec(name);
    const job = m ? st.jobs.get(Number(m[1])) : undefined;
    if (!job || job.state !== 'running' || job.runs !== Number(m![2])) fs.rmSync(path.join(cfg.dataDir, 'run', name), { force: true });
  }
}

function shutdown(why: string): void {
  if (stopping) return;
  if (inbox.length) flush(); // what was already asked is written and answered first
  stopping = true;
  log(`stopping (${why}); ${procs.size} running job(s) keep running`);
  server.close();
  try { fs.rmSync(socketPath(cfg.dataDir).abs, { force: true }); } catch { /* gone */ }
  try { fs.rmSync(path.join(cfg.dataDir, 'server.pid'), { force: true }); } catch { /* gone */ }
  try { fs.closeSync(journal.fd); } catch { /* closed */ }
  process.exit(0);
}

// ============================================================================
// The client: commands and their output
// ============================================================================

type Ctx = { dataDir: string; out: NodeJS.WriteStream; err: NodeJS.WriteStream };

/** Sends one request and calls onLine for every line before the final answer, which
 *  the promise resolves to. ok:false answers become UserErrors. */
export async function request(dataDir: string, msg: Record<string, unknown>, onLine?: (m: Record<string, unknown>) => void): Promise<Record<string, unknown>> {
  // A server that is still starting (replaying a big journal) owns the data dir but does
  // not listen yet: wait for it rather than say there is none.
  const deadline = Date.now() + 60_000;
  for (;;) {
    try {
      return await requestOnce(dataDir, msg, onLine);
    } catch (e) {
      if (!(e instanceof UserError && e.code === EXIT_NO_SERVER) || liveServerPid(dataDir) === null || Date.now() > deadline) throw e;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

function requestOnce(dataDir: string, msg: Record<string, unknown>, onLine?: (m: Record<string, unknown>) => void): Promise<Record<string, unknown>> {
  const sock = socketPath(dataDir);
  return new Promise((resolve, reject) => {
    let conn: net.Socket;
    if (sock.relative) {
      const here = process.cwd();
      try { process.chdir(dataDir); } catch { return reject(noServer(dataDir)); }
      try { conn = net.connect(sock.usable); } finally { process.chdir(here); }
    } else conn = net.connect(sock.usable);
    let settled = false;
    const settle = (fn: () => void) => { if (!settled) { settled = true; fn(); } };
    conn.on('connect', () => conn.write(JSON.stringify(msg) + '\n'));
    conn.on('error', (e: NodeJS.ErrnoException) => settle(() => reject(
      e.code === 'ENOENT' || e.code === 'ECONNREFUSED' ? noServer(dataDir) : failure(`cannot talk to the server: ${e.message}`))));
    onLines(conn, (line) => {
      const m = JSON.parse(line) as Record<string, unknown>;
      if (m.ok === undefined) return onLine?.(m);
      conn.end();
      settle(() => (m.ok ? resolve(m) : reject(new UserError(Number(m.code) || EXIT_FAILED, String(m.error), m.hint as string | undefined))));
    });
    conn.on('close', () => settle(() => reject(new ConnectionLost(EXIT_FAILED, 'the server closed the connection without an answer'))));
  });
}
class ConnectionLost extends UserError {}

/** Like request, for commands that wait long (wait, log -f, remove_slave --wait): when
 *  the server goes away (stopped, restarted), asks again once one answers, for a minute. */
async function lastingRequest(dataDir: string, msg: Record<string, unknown>, onLine?: (m: Record<string, unknown>) => void): Promise<Record<string, unknown>> {
  let lostAt = 0;
  for (;;) {
    try {
      return await request(dataDir, msg, (m) => { lostAt = 0; onLine?.(m); });
    } catch (e) {
      if (!(e instanceof ConnectionLost || (e instanceof UserError && e.code === EXIT_NO_SERVER))) throw e;
      lostAt ||= Date.now();
      if (Date.now() - lostAt > 60_000) throw noServer(dataDir);
      await new Promise((r) => setTimeout(r, 250));
    }
  }
}

const noServer = (dataDir: string) => new UserError(EXIT_NO_SERVER, `no server is running on data dir '${dataDir}'`, `start one with: cli.ts start ${shellQuote(dataDir)}`);

type OptSpec = Record<string, { type: 'string' | 'boolean'; short?: string; multiple?: boolean }>;
type Parsed = { values: Record<string, string | boolean | string[] | undefined>; positionals: string[] };

const GLOBAL_OPTIONS: OptSpec = {
  'data-dir': { type: 'string' }, server_data_dir: { type: 'string' }, help: { type: 'boolean', short: 'h' },
};

/** Parses a command's words with node's parseArgs. With `stopAtPositional`, the first
 *  positional word and everything after it are left alone (they belong to the job). */
function parseCommand(args: string[], options: OptSpec, stopAtPositional: boolean): Parsed {
  const all = { ...GLOBAL_OPTIONS, ...options };
  let own = args, rest: string[] = [];
  if (stopAtPositional) {
    const { tokens } = parseArgs({ args, options: all, strict: false, allowPositionals: true, tokens: true });
    const first = tokens.find((t) => t.kind === 'positional' || t.kind === 'option-terminator');
    if (first) {
      own = args.slice(0, first.index);
      rest = args.slice(first.kind === 'option-terminator' ? first.index + 1 : first.index);
    }
  }
  try {
    const { values, positionals } = parseArgs({ args: own, options: all, strict: true, allowPositionals: !stopAtPositional });
    return { values: values as Parsed['values'], positionals: [...positionals, ...rest] };
  } catch (e) {
    throw argsError(e as NodeJS.ErrnoException);
  }
}

/** parseArgs's errors, as one short line each. */
function argsError(e: NodeJS.ErrnoException): UserError {
  const word = /'([^']*)'/.exec(e.message)?.[1] ?? '';
  switch (e.code) {
    case 'ERR_PARSE_ARGS_UNKNOWN_OPTION': return usage(`unknown option ${quoteForError(word)}`, 'see: cli.ts help');
    case 'ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL': return usage(`unexpected argument ${quoteForError(word)}`, 'see: cli.ts help');
    case 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE': {
      const option = word.split(' ')[0];
      return usage(`option ${quoteForError(option)} needs a value`, `write ${option}=VALUE for a value that starts with '-'`);
    }
    default: return usage(e.message.split('\n')[0]);
  }
}

const intOption = (v: unknown, name: string, min: number): number | undefined => {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (typeof v !== 'string' || !/^\d+$/.test(v) || !Number.isSafeInteger(n) || n < min) throw usage(`invalid ${name} ${quoteForError(String(v))}`, `${name} takes a whole number${min ? ` of at least ${min}` : ''}`);
  return n;
};

/** Resolves a script against the submitting directory and checks it can run. */
function resolveScript(script: string, cwd: string, where = ''): string {
  const abs = path.resolve(cwd, script);
  checkExecutable(abs, script, where);
  return abs;
}

/** Reads an add_jobs file into job specs; an error names the line. */
export function parseJobsFile(text: string, cwd: string, name: string): JobSpec[] {
  const jobs: JobSpec[] = [];
  const scripts = new Map<string, string>();
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    let words: string[];
    if (lines[i].includes('\0')) throw failure(`${name} line ${i + 1}: a NUL byte, which no argument can hold (is it a text file?)`);
    try { words = splitWords(lines[i]); } catch (e) { throw failure(`${name} line ${i + 1}: ${(e as Error).message}`); }
    if (words.length === 0) continue;
    let abs = scripts.get(words[0]);
    if (abs === undefined) { abs = resolveScript(words[0], cwd, ` (${name} line ${i + 1})`); scripts.set(words[0], abs); }
    words[0] = abs;
    jobs.push(words);
  }
  return jobs;
}

const color = (on: boolean) => (code: string, s: string) => (on ? `\x1b[${code}m${s}\x1b[0m` : s);
const STATE_COLORS: Record<string, string> = { waiting: '2', running: '36', done: '32', failed: '31', killed: '33', up: '32', down: '31', draining: '33' };

function useColor(stream: NodeJS.WriteStream): boolean {
  return Boolean(stream.isTTY) && !process.env.NO_COLOR && process.env.TERM !== 'dumb';
}

export function formatDuration(ms: number): string {
  if (ms < 10_000) return `${(Math.max(0, ms) / 1000).toFixed(1)}s`;
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

/** The human status: counts, one line per worker with its slot bar, the queue head. */
export function formatStatus(s: StatusView, now: number, colorOn: boolean): string {
  const c = color(colorOn);
  const out: string[] = [];
  const counts = s.counts;
  out.push(`jobs: ${JOB_STATES.map((k) => `${counts[k]} ${c(STATE_COLORS[k], k)}`).join(', ')} (${counts.total} in all)`);
  out.push(`workers: ${s.workers.length}${s.workers.length ? '' : ' (add some with: cli.ts add_slave HOST)'}`);
  const width = Math.max(4, ...s.workers.map((w) => w.host.length));
  for (const w of s.workers) {
    const busy = new Set(w.running.map((r) => r.slot));
    const bar = '[' + Array.from({ length: Math.max(w.slots, ...w.running.map((r) => r.slot + 1)) }, (_, i) => (busy.has(i) ? '*' : '.')).join('') + ']';
    let state = c(STATE_COLORS[w.state], w.state.padEnd(8));
    if (w.checking) state = c('33', 'checking');
    let line = `  ${w.host.padEnd(width)}  ${bar}  ${state}`;
    if (w.running.length) line += `  ${w.running.map((r) => r.id).join(' ')}`;
    if (w.state === 'down') line += `  ${w.error ?? ''}${w.nextProbeAt ? `; next check in ${formatDuration(Date.parse(w.nextProbeAt) - now)}` : ''}`;
    out.push(line.trimEnd());
  }
  if (s.queue.length) {
    out.push(`queue (${counts.waiting} waiting, next first):`);
    for (const q of s.queue) out.push(`  ${String(q.id).padStart(6)}  ${formatDuration(now - Date.parse(q.queuedAt)).padStart(6)} ago  ${q.command}`);
    if (counts.waiting > s.queue.length) out.push(`  … and ${counts.waiting - s.queue.length} more`);
  }
  return out.join('\n') + '\n';
}

function formatTime(isoTime: string | null, now: number): string {
  if (!isoTime) return '-';
  const d = new Date(isoTime), today = new Date(now);
  const hms = d.toTimeString().slice(0, 8);
  return d.toDateString() === today.toDateString() ? hms : `${d.toISOString().slice(5, 10)} ${hms.slice(0, 5)}`;
}

export function formatJobRow(j: JobView, now: number, c: (code: string, s: string) => string): string {
  const exit = j.exitCode === null ? (j.reason && j.state !== 'waiting' ? j.reason.split(' ')[0] : '-') : String(j.exitCode);
  const cmd = [j.script, ...j.args].map(shellQuote).join(' ');
  return [
    String(j.id).padStart(6), c(STATE_COLORS[j.state], j.state.padEnd(7)), (j.worker ?? '-').padEnd(15), exit.padStart(7),
    String(j.attempts).padStart(5), formatTime(j.queuedAt, now).padEnd(11), (j.runtimeMs === null ? '-' : formatDuration(j.runtimeMs)).padStart(7), cmd,
  ].join('  ');
}

async function cmdStart(p: Parsed, ctx: Ctx): Promise<number> {
  if (p.positionals.length > 2) throw usage('start takes at most DATA_DIR and LOG_DIR');
  const dataDir = path.resolve(p.positionals[0] ?? ctx.dataDir);
  const logDir = path.resolve(p.positionals[1] ?? (p.values['log-dir'] as string | undefined) ?? process.env.DJS_LOG_DIR ?? 'logs');
  const grace = intOption(p.values['kill-grace'] ?? process.env.DJS_KILL_GRACE, 'kill grace', 0) ?? 10;
  const probeMax = intOption(process.env.DJS_PROBE_BACKOFF_MAX, 'DJS_PROBE_BACKOFF_MAX', 1) ?? PROBE_BACKOFF_MAX_MS / 1000;
  if (p.values.detach) return startDetached(dataDir, logDir, grace, ctx);
  await runServer({ dataDir, logDir, killGraceMs: grace * 1000, probeMaxMs: probeMax * 1000, ssh: sshSettings(process.env) });
  return -1; // keeps running
}

/** start --detach: runs the server as a background process (its output appended to
 *  LOG_DIR/server.log), waits until it answers, prints its ready line, and returns. */
async function startDetached(dataDir: string, logDir: string, grace: number, ctx: Ctx): Promise<number> {
  fs.mkdirSync(logDir, { recursive: true });
  const logPath = path.join(logDir, 'server.log');
  const fd = fs.openSync(logPath, 'a');
  const child = spawn(process.execPath, [...process.execArgv, process.argv[1], 'start', '--kill-grace', String(grace), dataDir, logDir], {
    detached: true, stdio: ['ignore', fd, fd],
  });
  fs.closeSync(fd);
  let exited: number | null = null;
  child.on('exit', (code) => { exited = code ?? 1; });
  child.unref();
  for (;;) {
    try {
      const r = await requestOnce(dataDir, { op: 'ping' });
      if (Number(r.pid) === child.pid) break; // else another server answered: ours will refuse and exit
    } catch { /* not listening yet */ }
    if (exited !== null) {
      const tail = fs.readFileSync(logPath, 'utf8').trim().split('\n').filter((l) => l.startsWith('error') || l.startsWith('hint'));
      for (const line of tail.slice(-2)) ctx.err.write(line + '\n');
      return exited || EXIT_FAILED;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  ctx.out.write(`djs server ready: pid ${child.pid}, data ${dataDir}, logs ${logDir}; its output goes to ${logPath}\n`);
  return EXIT_OK;
}

async function cmdAddWorkers(p: Parsed, ctx: Ctx): Promise<number> {
  if (!p.positionals.length) throw usage('add_slave needs at least one HOST[:SLOTS]');
  const slots = intOption(p.values.slots, 'slot count', 1) ?? 1;
  const workers = p.positionals.map((a) => parseWorkerArg(a, slots));
  const r = await request(ctx.dataDir, { op: 'add_workers', workers, skipCheck: Boolean(p.values.skip_ssh_auth_check) });
  for (const w of workers) ctx.out.write(`added worker ${w.host} with ${w.slots} slot${w.slots === 1 ? '' : 's'}\n`);
  return r.ok ? EXIT_OK : EXIT_FAILED;
}

async function cmdRemoveWorkers(p: Parsed, ctx: Ctx): Promise<number> {
  if (!p.positionals.length) throw usage('remove_slave needs at least one HOST');
  if (p.values.wait && p.values.kill) throw usage('--wait and --kill exclude each other');
  for (const h of p.positionals) validateHost(h);
  const mode = p.values.wait ? 'wait' : p.values.kill ? 'kill' : null;
  const r = await request(ctx.dataDir, { op: 'remove_workers', hosts: p.positionals, mode });
  const draining: string[] = [];
  for (const w of r.workers as { host: string; running: number }[]) {
    if (w.running === 0) ctx.out.write(`removed worker ${w.host}\n`);
    else if (mode === 'kill') ctx.out.write(`stopping ${w.running} job(s) on worker ${w.host} (they are queued again); it is removed when they end\n`);
    else { ctx.err.write(`draining worker ${w.host}: waiting for its ${w.running} running job(s) to end\n`); draining.push(w.host); }
  }
  // --wait returns once the workers are gone, so `remove_slave --wait h && poweroff h` is safe.
  if (draining.length) {
    await lastingRequest(ctx.dataDir, { op: 'wait', hosts: draining });
    for (const host of draining) ctx.out.write(`removed worker ${host}\n`);
  }
  return EXIT_OK;
}

async function sendJobs(ctx: Ctx, p: Parsed, jobs: JobSpec[]): Promise<void> {
  const retries = intOption(p.values.retries, 'retries', 0) ?? 0;
  const timeout = intOption(p.values.timeout, 'timeout', 1) ?? 0;
  const r = await request(ctx.dataDir, { op: 'add_jobs', cwd: process.cwd(), retries, timeout, jobs });
  const first = Number(r.first);
  let text = '';
  for (let i = 0; i < jobs.length; i++) {
    text += `${first + i}\n`;
    if (text.length > 65536) { ctx.out.write(text); text = ''; }
  }
  ctx.out.write(text);
}

async function cmdAddJob(p: Parsed, ctx: Ctx): Promise<number> {
  if (!p.positionals.length) throw usage('add_job needs a SCRIPT', 'usage: cli.ts add_job [--retries N] [--timeout S] SCRIPT [ARGS...]');
  const [script, ...args] = p.positionals;
  await sendJobs(ctx, p, [[resolveScript(script, process.cwd()), ...args]]);
  return EXIT_OK;
}

async function cmdAddJobs(p: Parsed, ctx: Ctx): Promise<number> {
  if (p.positionals.length !== 1) throw usage('add_jobs needs one FILE (or - for standard input)');
  const name = p.positionals[0];
  let text: string;
  try { text = fs.readFileSync(name === '-' ? 0 : name, 'utf8'); } catch (e) { throw failure(`cannot read ${quoteForError(name)}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`); }
  const jobs = parseJobsFile(text, process.cwd(), name === '-' ? 'standard input' : name);
  if (jobs.length === 0) throw failure(`no jobs in ${quoteForError(name)}`);
  await sendJobs(ctx, p, jobs);
  return EXIT_OK;
}

const parseIds = (words: string[]) => words.map((w) => intOption(w, 'job id', 1)!);

async function cmdRemoveJob(p: Parsed, ctx: Ctx): Promise<number> {
  let msg: Record<string, unknown>;
  if (p.values.id) {
    msg = { op: 'remove_jobs', ids: parseIds(p.positionals) };
    if (!p.positionals.length) throw usage('remove_job --id needs at least one ID');
  } else {
    if (!p.positionals.length) throw usage('remove_job needs SCRIPT [ARGS...] or --id ID...');
    const [script, ...args] = p.positionals;
    msg = { op: 'remove_jobs', script: path.resolve(process.cwd(), script), args };
  }
  const r = await request(ctx.dataDir, msg);
  const ids = r.ids as number[];
  ctx.out.write(`removed ${ids.length} job${ids.length === 1 ? '' : 's'}: ${ids.join(' ')}\n`);
  return EXIT_OK;
}

async function cmdKill(p: Parsed, ctx: Ctx): Promise<number> {
  if (p.values.all && p.positionals.length) throw usage('kill takes IDs or --all, not both');
  if (!p.values.all && !p.positionals.length) throw usage('kill needs IDs or --all');
  const r = await request(ctx.dataDir, p.values.all ? { op: 'kill', all: true } : { op: 'kill', ids: parseIds(p.positionals) });
  const ids = r.ids as number[];
  ctx.out.write(ids.length ? `killing ${ids.length} job${ids.length === 1 ? '' : 's'}: ${ids.join(' ')}\n` : 'no job to kill\n');
  return EXIT_OK;
}

async function cmdRetry(p: Parsed, ctx: Ctx): Promise<number> {
  const byState = Boolean(p.values.failed || p.values.killed);
  if (byState && p.positionals.length) throw usage('retry takes IDs or --failed/--killed, not both');
  if (!byState && !p.positionals.length) throw usage('retry needs IDs, --failed or --killed');
  const r = await request(ctx.dataDir, byState ? { op: 'retry', failed: p.values.failed, killed: p.values.killed } : { op: 'retry', ids: parseIds(p.positionals) });
  const ids = r.ids as number[];
  ctx.out.write(ids.length ? `queued again: ${ids.join(' ')}\n` : 'no job to retry\n');
  return EXIT_OK;
}

async function cmdStatus(p: Parsed, ctx: Ctx): Promise<number> {
  const r = await request(ctx.dataDir, { op: 'status' });
  if (p.values.json) { const { ok: _ok, ...rest } = r; ctx.out.write(JSON.stringify(rest, null, 2) + '\n'); }
  else ctx.out.write(formatStatus(r as unknown as StatusView, Date.now(), useColor(ctx.out)));
  return EXIT_OK;
}

async function cmdList(p: Parsed, ctx: Ctx): Promise<number> {
  const state = p.values.state as string | undefined;
  if (state !== undefined && !JOB_STATES.includes(state as JobState)) throw usage(`unknown state ${quoteForError(state)}`, `states are ${JOB_STATES.join(', ')}`);
  const now = Date.now(), c = color(useColor(ctx.out)), json = Boolean(p.values.json);
  let first = true, begun = false;
  // Nothing is printed before the server answers, so "no server" leaves stdout empty.
  const begin = () => {
    if (begun) return;
    begun = true;
    ctx.out.write(json ? '[' : `${'ID'.padStart(6)}  ${'STATE'.padEnd(7)}  ${'WORKER'.padEnd(15)}  ${'EXIT'.padStart(7)}  TRIES  ${'QUEUED'.padEnd(11)}  RUNTIME  COMMAND\n`);
  };
  await request(ctx.dataDir, { op: 'list', state }, (m) => {
    begin();
    const rows = m.rows as JobView[];
    let text = '';
    for (const row of rows) {
      if (json) { text += (first ? '\n' : ',\n') + JSON.stringify(row); first = false; }
      else text += formatJobRow(row, now, c) + '\n';
    }
    ctx.out.write(text);
  });
  begin();
  if (json) ctx.out.write(first ? ']\n' : '\n]\n');
  return EXIT_OK;
}

async function cmdLog(p: Parsed, ctx: Ctx): Promise<number> {
  if (p.positionals.length !== 1) throw usage('log needs one job ID');
  const [id] = parseIds(p.positionals);
  const follow = Boolean(p.values.follow);
  let file = '', offset = 0;
  const watch: { dir?: fs.FSWatcher } = {};
  const pump = () => {
    let fd: number;
    try { fd = fs.openSync(file, 'r'); } catch { return; }
    try {
      const buf = Buffer.allocUnsafe(1 << 16);
      let n: number;
      while ((n = fs.readSync(fd, buf, 0, buf.length, offset)) > 0) { ctx.out.write(buf.subarray(0, n)); offset += n; }
    } finally { fs.closeSync(fd); }
  };
  const r = await (follow ? lastingRequest : request)(ctx.dataDir, { op: 'log', id, follow }, (m) => {
    file = (m.info as { path: string }).path;
    pump();
    watch.dir?.close();
    try { watch.dir = fs.watch(path.dirname(file), (_ev, name) => { if (!name || name === path.basename(file)) pump(); }); } catch { /* no watch: final read only */ }
  });
  watch.dir?.close();
  if (!file) file = String(r.path);
  pump();
  return EXIT_OK;
}

async function cmdWait(p: Parsed, ctx: Ctx): Promise<number> {
  const ids = p.positionals.length ? parseIds(p.positionals) : undefined;
  const tty = Boolean(ctx.err.isTTY);
  const t0 = Date.now();
  let firstEnded = -1, lastPlain = 0;
  type Counts = Record<JobState | 'total' | 'missing', number>;
  const describe = (c: Counts) => {
    const ended = c.done + c.failed + c.killed + c.missing;
    if (firstEnded < 0) firstEnded = ended;
    const rate = (ended - firstEnded) / Math.max(0.001, (Date.now() - t0) / 1000);
    const left = c.waiting + c.running;
    const eta = rate > 0 ? `, about ${formatDuration((left / rate) * 1000)} left` : '';
    return `${ended}/${c.total} finished: ${c.done} done, ${c.failed} failed, ${c.killed} killed, ${c.running} running, ${c.waiting} waiting — ${rate.toFixed(1)} jobs/s${eta}`;
  };
  const r = await lastingRequest(ctx.dataDir, { op: 'wait', ids }, (m) => {
    const line = describe(m.progress as Counts);
    if (tty) ctx.err.write(`\r\x1b[K${line}`);
    else if (Date.now() - lastPlain >= 10_000) { lastPlain = Date.now(); ctx.err.write(line + '\n'); }
  });
  const c = r.counts as Counts;
  if (tty) ctx.err.write('\r\x1b[K');
  ctx.err.write(`${c.done + c.failed + c.killed + c.missing}/${c.total} finished: ${c.done} done, ${c.failed} failed, ${c.killed} killed${c.missing ? `, ${c.missing} removed` : ''}\n`);
  return r.allDone ? EXIT_OK : EXIT_FAILED;
}

async function cmdClean(p: Parsed, ctx: Ctx): Promise<number> {
  const r = await request(ctx.dataDir, { op: 'clean', logs: Boolean(p.values.logs) });
  ctx.out.write(`forgot ${r.count} finished job${r.count === 1 ? '' : 's'}${p.values.logs ? ' and their logs' : ''}\n`);
  return EXIT_OK;
}

async function cmdStop(_p: Parsed, ctx: Ctx): Promise<number> {
  const r = await request(ctx.dataDir, { op: 'stop' });
  // The server answers before it exits; wait until its socket is gone so that a
  // `start` right after this one does not find it still there.
  const pid = Number(r.pid);
  const deadline = Date.now() + 10_000;
  while (processStartTicks(pid) !== null && Date.now() < deadline) await new Promise((res) => setTimeout(res, 20));
  ctx.out.write(`stopped server ${pid}\n`);
  return EXIT_OK;
}

type Command = { run: (p: Parsed, ctx: Ctx) => Promise<number>; options: OptSpec; jobArgs?: boolean; noArgs?: boolean; synopsis: string };
const JOB_OPTIONS: OptSpec = { retries: { type: 'string' }, timeout: { type: 'string' } };
const COMMANDS: Record<string, Command> = {
  start: { run: cmdStart, options: { 'log-dir': { type: 'string' }, 'kill-grace': { type: 'string' }, detach: { type: 'boolean', short: 'd' } }, synopsis: 'start [--detach] [--log-dir DIR] [--kill-grace SECONDS] [DATA_DIR] [LOG_DIR]' },
  stop: { run: cmdStop, options: {}, noArgs: true, synopsis: 'stop' },
  add_slave: { run: cmdAddWorkers, options: { skip_ssh_auth_check: { type: 'boolean' }, slots: { type: 'string' } }, synopsis: 'add_slave [--skip_ssh_auth_check] [--slots N] HOST[:SLOTS]...' },
  remove_slave: { run: cmdRemoveWorkers, options: { wait: { type: 'boolean' }, kill: { type: 'boolean' } }, synopsis: 'remove_slave [--wait|--kill] HOST...' },
  add_job: { run: cmdAddJob, options: JOB_OPTIONS, jobArgs: true, synopsis: 'add_job [--retries N] [--timeout SECONDS] SCRIPT [ARGS...]' },
  add_jobs: { run: cmdAddJobs, options: JOB_OPTIONS, synopsis: 'add_jobs [--retries N] [--timeout SECONDS] FILE|-' },
  remove_job: { run: cmdRemoveJob, options: { id: { type: 'boolean' } }, jobArgs: true, synopsis: 'remove_job SCRIPT [ARGS...] | remove_job --id ID...' },
  kill: { run: cmdKill, options: { all: { type: 'boolean' } }, synopsis: 'kill ID... | kill --all' },
  retry: { run: cmdRetry, options: { failed: { type: 'boolean' }, killed: { type: 'boolean' } }, synopsis: 'retry ID... | retry [--failed] [--killed]' },
  status: { run: cmdStatus, options: { json: { type: 'boolean' } }, noArgs: true, synopsis: 'status [--json]' },
  list: { run: cmdList, options: { state: { type: 'string' }, json: { type: 'boolean' } }, noArgs: true, synopsis: 'list [--state STATE] [--json]' },
  log: { run: cmdLog, options: { follow: { type: 'boolean', short: 'f' } }, synopsis: 'log ID [-f|--follow]' },
  wait: { run: cmdWait, options: {}, synopsis: 'wait [ID...]' },
  clean: { run: cmdClean, options: { logs: { type: 'boolean' } }, noArgs: true, synopsis: 'clean [--logs]' },
};
const ALIASES: Record<string, string> = { add_worker: 'add_slave', remove_worker: 'remove_slave' };

function helpText(): string {
  return `usage: cli.ts [--data-dir DIR] COMMAND [OPTIONS] [ARGS]\n\ncommands:\n${Object.values(COMMANDS).map((c) => `  ${c.synopsis}`).join('\n')}\n\n` +
    `--data-dir DIR (env DJS_DATA_DIR, default ./.data) selects the server on every command.\n` +
    `exit codes: 0 ok, 1 failed, 2 usage error, 3 no server running.\n`;
}

// ============================================================================
// main: parse, run, exit through one gate
// ============================================================================

/** The one exit: prints an error (one line, plus a hint) and returns the exit code. */
function reportError(e: unknown, err: NodeJS.WriteStream): number {
  const u = asUserError(e);
  err.write(`error: ${u.message}\n`);
  if (u.hint) err.write(`hint: ${u.hint}\n`);
  return u.code;
}

export async function main(argv: string[]): Promise<number> {
  const err = process.stderr, out = process.stdout;
  try {
    const { tokens } = parseArgs({ args: argv, options: GLOBAL_OPTIONS, strict: false, allowPositionals: true, tokens: true });
    const cmdToken = tokens.find((t) => t.kind === 'positional');
    const globals = parseCommand(cmdToken ? argv.slice(0, cmdToken.index) : argv, {}, false);
    if (!cmdToken || globals.values.help || cmdToken.value === 'help') {
      const asked = Boolean(cmdToken || globals.values.help);
      (asked ? out : err).write(helpText());
      return asked ? EXIT_OK : EXIT_USAGE;
    }
    if (globals.positionals.length) throw usage(`unexpected ${quoteForError(globals.positionals[0])}`);
    const name = ALIASES[cmdToken.value] ?? cmdToken.value;
    const cmd = COMMANDS[name];
    if (!cmd) throw usage(`unknown command ${quoteForError(cmdToken.value)}`, `commands: ${Object.keys(COMMANDS).join(', ')}`);
    const parsed = parseCommand(argv.slice(cmdToken.index + 1), cmd.options, cmd.jobArgs ?? false);
    if (parsed.values.help) { out.write(`usage: cli.ts ${cmd.synopsis}\n`); return EXIT_OK; }
    if (cmd.noArgs && parsed.positionals.length) throw usage(`${name} takes no arguments, not ${quoteForError(parsed.positionals[0])}`, `usage: cli.ts ${cmd.synopsis}`);
    const dataDir = path.resolve(
      (parsed.values['data-dir'] ?? parsed.values.server_data_dir ?? globals.values['data-dir'] ?? globals.values.server_data_dir ?? process.env.DJS_DATA_DIR ?? '.data') as string);
    return await cmd.run(parsed, { dataDir, out, err });
  } catch (e) {
    return reportError(e, err);
  }
}

const isMain = (() => {
  try { return fs.realpathSync(process.argv[1] ?? '') === fs.realpathSync(fileURLToPath(import.meta.url)); } catch { return false; }
})();

if (isMain) {
  process.stdout.on('error', (e: NodeJS.ErrnoException) => { if (e.code === 'EPIPE') process.exit(0); });
  main(process.argv.slice(2)).then((code) => {
    if (code >= 0) process.exitCode = code;
  });
}
