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
 *   cli.ts start [-d] [--log-dir DIR] [--kill-grace S] [DATA_DIR] [LOG_DIR]
 *                                             run the server (-d: in the background)
 *   cli.ts stop                               stop it; running jobs keep running
 *   cli.ts add_slave [--skip_ssh_auth_check] [--requeue-on-down] [--slots N|auto] [--gpus N]
 *                    [--label L[,L]]... [-e|--env NAME=VALUE]... HOST[:SLOTS|:auto]...
 *   cli.ts policy [spread|pack|sequential|random]
 *   cli.ts remove_slave [--wait|--kill] HOST...
 *   cli.ts add_job [JOB OPTIONS] SCRIPT [ARGS...] [::: V... [::: W...]]   (a sweep: one
 *                                      job per combination; {1} {2} {} in ARGS replaced)
 *   cli.ts add_jobs [JOB OPTIONS] FILE|-
 *     JOB OPTIONS: --retries N, --timeout S, --tag TAG..., --priority N,
 *                  --after ID[,ID]..., -e|--env NAME=VALUE..., --slots K, --gpus G,
 *                  --require LABEL..., --avoid LABEL..., --host HOST...
 *   cli.ts remove_job SCRIPT [ARGS...] | --id ID... | --tag TAG
 *   cli.ts kill ID... | --tag TAG | --all
 *   cli.ts retry ID... | [--failed] [--killed] [--tag TAG]
 *   cli.ts set_priority N ID... | N --tag TAG
 *   cli.ts pause [--tag TAG]             cli.ts resume [--tag TAG]
 *   cli.ts status [--tag TAG] [--json]   cli.ts list [--state S] [--tag TAG] [--json]
 *   cli.ts log ID [-f]                   cli.ts wait [ID... | --tag TAG]
 *   cli.ts clean [--logs] [--tag TAG]
 *   Every command takes --data-dir DIR (env DJS_DATA_DIR, default ./.data).
 *
 * ENVIRONMENT (see ENVIRONMENT; `cli.ts help` lists them)
 *   DJS_DATA_DIR, DJS_LOG_DIR, DJS_KILL_GRACE; for the server's ssh: DJS_SSH_CONFIG,
 *   DJS_SSH_OPTIONS, DJS_SSH_TIMEOUT, DJS_SSH_SHARED, DJS_SSH_SESSIONS, DJS_HEARTBEAT,
 *   DJS_PROBE_BACKOFF_MAX; DJS_MAX_CONNECTIONS; DJS_SNAPSHOT_MIN_BYTES (tests); NO_COLOR.
 *   Jobs get JOB_ID, SLAVE_IP, SLAVE_SLOT, SLAVE_SLOTS, SLAVE_GPUS, JOB_ATTEMPT,
 *   DJS_DATA_DIR, DJS_SSH_SHARED_CONFIG, and the worker's and their own --env settings.
 *
 * FILES in the data dir (mode 0700)
 *   journal       one JSON event per line, appended and fsynced before a reply
 *   snapshot      the whole state as JSON lines; replaced by write-temp, fsync, rename
 *   server.sock   the Unix socket clients talk to (mode 0600)
 *   server.pid    "PID START_TICKS" of the server that owns the dir
 *   lock.token    names the lock a server holds on the dir while it runs (holdDirLock)
 *   run/ID.R.pid  the claim of run R of job ID: "PID LAUNCHER_PID" of its process (or
 *                 "void": a server claimed it, so it never ran), then its exit code
 *   ssh/          shared ssh connections (mode 0700): config.N, the ssh config of
 *                 connection N of each worker (slots N*8 .. N*8+7 by default), which
 *                 jobs get as DJS_SSH_SHARED_CONFIG; its control sockets, one per worker
 *                 and N (in a 0700 dir under /tmp when this path is too long for them)
 *   Job output goes to LOG_DIR/ID.log (default ./logs), mode 0600.
 *
 * STATE MACHINES
 *   job:    waiting -> running -> done (exit 0) | failed (exit != 0, timeout) | killed
 *           waiting -> failed   when a job it waits for (--after) ends failed or killed
 *           running -> waiting  when the worker failed (exit 255), a retry is due,
 *                               or the worker was removed with --kill
 *           done|failed|killed -> waiting  by `retry`
 *   worker: up -> down (a probe failed, or heartbeats went unanswered for 3 periods)
 *              -> up (probe answered, with backoff);
 *           up|down -> draining (remove --wait) -> gone when its last job ends
 *           A busy worker (running jobs, or jobs waiting) is checked every DJS_HEARTBEAT
 *           seconds over its shared connection; one not checked for two periods gets
 *           no job until a check answers. When it goes down, its running jobs run on to
 *           their own ssh timeouts (exit 255: requeued), or with --requeue-on-down are
 *           stopped and requeued at once.
 *
 * DESIGN
 *   Order: waiting jobs start by priority (higher first), then first come first served;
 *   a job requeued after a worker failure goes first within its priority. They wait in
 *   lanes, one per priority, tag set and need (slots, GPUs, labels, hosts), so a start
 *   reads lane heads only, a paused tag's lanes are skipped whole, and so is a lane no
 *   free worker fits; jobs held by --after are in no lane until their last dependency is
 *   done. Each job goes to a free worker its need admits, picked by the policy (spread
 *   by default); a job that fits nowhere yet holds back the worker it waits for.
 *
 *   All state changes are events applied by one pure function, applyEvent. The server
 *   appends each event to the journal and applies it; at start-up it loads the snapshot
 *   and replays the journal through the same function, so recovery is not a second
 *   code path. Every request is served through one table of operations (OPS): a read,
 *   a change decided by a pure function of (state, request, now) that returns events
 *   and an answer, a change that needs I/O first (ssh logins, executable scripts), a
 *   stream, or the shutdown. Every scheduling decision is another pure function, plan:
 *   which jobs to start on which slots, which to kill (timeouts) or SIGKILL, which
 *   workers to probe, and when the next of these falls due. The shell carries the
 *   decisions out (effectsOf names what each event calls for) and feeds outcomes (a
 *   process ended, a probe answered) back as events. One supervisor (checkRun) decides
 *   whether a job's process lives, ended, or never started.
 *
 *   Group commit: requests that arrive together are applied, written with one write
 *   and one fdatasync, and only then answered; effects (starting a process, signals)
 *   also wait for that flush, so nothing happens that the journal does not know of.
 *   If the write fails, the journal is cut back, the state reloaded from disk, the
 *   clients of that batch get an error, and the outcomes that were lost are retried.
 *
 *   Exactly once: "start run R of job J" is durable before J's process is forked. The
 *   launcher (one perl process; see LAUNCHER) forks the run's process, which first
 *   creates run/J.R.pid exclusively (O_EXCL), writes its pid and the launcher's there
 *   and keeps the file open across the exec of the script; the launcher reaps it and
 *   adds the exit code. A server that finds J running in its journal after a crash (or
 *   whose launcher died) asks checkRun: an exit code in the file means J ended; a live
 *   process of the run's group that holds that very file open or carries J's JOB_ID and
 *   data dir (so a reused pid does not count) means J runs: it is watched; so does a
 *   gone process whose launcher still lives (it is about to write the code); a gone
 *   process whose launcher is gone too means J ended with its code lost; no file means
 *   the run never started: the server creates the file itself, exclusively ("void"),
 *   so a late process finds it taken and exits without running the job, and J goes
 *   back to the queue. Either the run's process or the server wins that file, never
 *   both. A void claim is kept while any launcher of an earlier server lives, since
 *   only such a launcher could still try to claim it; a failed check of /proc (out of
 *   file descriptors, say) is "unknown" and asked again, never taken for "ended".
 *   The launcher is not the server, so a start costs the same however much memory the
 *   server holds: one fork of a small process and one exec.
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
/** Why a running job is being killed: by the user, by its --timeout, to requeue it (its
 *  worker was removed with --kill), or because its worker went down (--requeue-on-down). */
export type KillReason = 'user' | 'timeout' | 'requeue' | 'down';

/** 2: events `kill` (was `stop`) and `start` with host/slot (was w/s); jobs keep one
 *  start counter, `run`. 3: campaigns and placement: `add` with tags, priority, after,
 *  env, need and sweeps; `start` with slots and gpus; `end` with began; `worker` with
 *  labels, gpus and env; events `priority`, `pause`, `resume`, `policy`; `clean` of
 *  chosen ids. Data dirs of versions 1 and 2
 *  load too (see upgradeRecord); a program of version 2 refuses version 3, which it would
 *  misread (it would start a job before its dependencies). */
const FORMAT_VERSION = 3;
const EXIT_OK = 0, EXIT_FAILED = 1, EXIT_USAGE = 2, EXIT_NO_SERVER = 3;
/** What ssh exits with when it cannot reach a host: the worker failed, not the job. */
export const WORKER_FAILED_EXIT = 255;
/** Worker failures (exit 255) one job may suffer before it is failed for good. */
export const MAX_REQUEUES = 5;
export const PROBE_BACKOFF_MIN_MS = 5_000;
export const PROBE_BACKOFF_MAX_MS = 300_000;
const QUEUE_HEAD = 10;
/** Tags in the human status, at most. */
const TAGS_SHOWN = 20;
/** The journal is folded into a snapshot past this size (DJS_SNAPSHOT_MIN_BYTES lowers
 *  it, for tests). */
const SNAPSHOT_MIN_JOURNAL_BYTES = 32 << 20;
const MAX_HOST_LENGTH = 255;
const MAX_SLOTS = 10_000;
const MAX_GPUS = 1024;
/** Tags name campaigns on the command line and in status lines: short, plain words. */
const TAG_RE = /^[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,63}$/;
export const ENV_NAME_RE = /^[A-Za-z_][A-Za-z0-9_]*$/;
/** Variables the server sets for each job itself; a job's --env cannot replace them. */
const RESERVED_ENV = new Set(['JOB_ID', 'SLAVE_IP', 'SLAVE_SLOT', 'SLAVE_SLOTS', 'SLAVE_GPUS', 'JOB_ATTEMPT']);

export type Attempt = {
  n: number; worker: string; slot: number; startedAt: number; endedAt: number;
  exitCode: number | null; reason: string | null;
};

export type Job = {
  id: number; script: string; args: string[]; cwd: string;
  retries: number; timeout: number;      // timeout in seconds, 0 = none
  state: JobState;
  queuedAt: number;
  run: number;                           // starts ever made; numbers the run files, never reused
  retriesUsed: number;                   // failed attempts charged to --retries
  requeues: number;                      // worker failures, not charged to --retries
  worker: string | null; slot: number;   // of the current or last attempt
  startedAt: number; endedAt: number;
  exitCode: number | null; reason: string | null;
  killing: KillReason | null; killAt: number;
  avoid: string[] | null;                // workers this job failed on
  history: Attempt[] | null;             // earlier attempts, oldest first
  qtok: number;                          // which queue entry (> 0) or hold (< 0) is this job's live one
  tags: string[];                        // sorted; shared by the jobs of one add
  priority: number;                      // higher starts first
  after: number[] | null;                // jobs that must end `done` before this one starts
  env: string[] | null;                  // NAME=VALUE on top of the server's environment
  blockers: number;                      // of `after`, how many have not ended done yet
  need: Need;                            // what a worker must offer it; shared by the jobs of one add
  slots: number[] | null;                // all slots of the current or last attempt, when more than one
  gpus: number[] | null;                 // GPU indices of the current or last attempt
};

/** What a job needs of a worker: slots and GPUs on one worker, labels it must have
 *  (require) and must not have (exclude), and the workers it may run on (hosts; any
 *  when empty). */
export type Need = { slots: number; gpus: number; require: string[]; exclude: string[]; hosts: string[] };
export const PLAIN_NEED: Need = Object.freeze({ slots: 1, gpus: 0, require: [], exclude: [], hosts: [] }) as Need;
const isPlain = (n: Need) => n === PLAIN_NEED || (n.slots === 1 && n.gpus === 0 && !n.require.length && !n.exclude.length && !n.hosts.length);
export const POLICIES = ['spread', 'pack', 'sequential', 'random'] as const;
export type Policy = (typeof POLICIES)[number];
/** cloudmesh-job's names for two of them. */
const POLICY_ALIASES: Record<string, Policy> = { smart: 'spread', frugal: 'pack' };

export type Worker = {
  host: string; slots: number; state: WorkerState;
  ssh: boolean;                          // probed over ssh (not added with --skip_ssh_auth_check)
  requeueOnDown?: boolean;               // its running jobs are stopped and requeued when it goes down
  running: number[];                     // job id per slot, 0 = free (a job of K slots is in K)
  labels: string[];
  gpus: number;                          // GPUs, indices 0..gpus-1
  gpuJobs: number[];                     // job id per GPU index, 0 = free
  env: string[] | null;                  // NAME=VALUE for every job on it
  probeAt: number;                       // when to probe next, 0 = no probe due
  probeDelay: number;                    // current backoff
  error: string | null; since: number;
};

/** The waiting jobs of one priority and one set of tags, in the order they start:
 *  requeued ones in front (a stack), new ones behind. Entries of jobs that left are
 *  dropped lazily (see liveEntry). Waiting jobs are split into lanes so that a start
 *  looks only at the head of each lane, and a paused tag costs nothing: its lanes are
 *  skipped whole. */
export type Lane = {
  key: string; priority: number; tags: string[]; need: Need;
  front: number[]; frontTok: number[]; ids: number[]; toks: number[]; head: number;
};

export type Counts = Record<JobState, number>;

export type State = {
  seq: number; nextId: number; tok: number;
  jobs: Map<number, Job>;
  workers: Map<string, Worker>;
  lanes: Map<string, Lane>;
  prios: number[];                     // the priorities that have lanes, highest first
  counts: Counts;
  tagCounts: Map<string, Counts>;      // the same counts, per tag
  dependents: Map<number, number[]>;   // job id -> [id, hold token]... of jobs held for it
  forgotten: Set<number>;              // ids removed or cleaned before they ended done
  paused: boolean;                     // nothing new starts
  pausedTags: Set<string>;             // nothing new of these tags starts
  strings: Map<string, string>;        // see intern
  cascades: number;                    // jobs failed for a dependency so far (not kept; tells waiters)
  policy: Policy;                      // which free worker a job goes to
};

export type JobSpec = string[]; // [script, ...args]
export type Event =
  | {
    e: 'add'; t: number; id: number; cwd: string; retries: number; timeout: number; jobs: JobSpec[];
    tags?: string[]; priority?: number; after?: number[]; env?: string[];
    sweep?: string[][]; // jobs holds one template, and there is a job per combination (see sweepJobs)
    need?: Need;
  }
  | { e: 'remove'; t: number; ids: number[] }
  | { e: 'start'; t: number; id: number; host: string; slot: number; slots?: number[]; gpus?: number[] } // slots: all, when more than one
  | { e: 'unstart'; t: number; id: number; back?: boolean } // back: behind the others (its start failed)
  | { e: 'end'; t: number; id: number; run: number; code: number | null; why?: string; began?: number } // began: when its process was forked
  | { e: 'kill'; t: number; ids: number[]; why: KillReason; grace: number }
  | { e: 'retry'; t: number; ids: number[] }
  | { e: 'clean'; t: number; logs?: boolean; ids?: number[] } // ids: these only (else every finished job)
  | { e: 'priority'; t: number; ids: number[]; priority: number }
  | { e: 'pause'; t: number; tag?: string }
  | { e: 'resume'; t: number; tag?: string }
  | { e: 'worker'; t: number; host: string; slots: number; ssh: boolean; labels?: string[]; gpus?: number; env?: string[]; rod?: boolean } // rod: --requeue-on-down
  | { e: 'policy'; t: number; name: Policy }
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
    seq: 0, nextId: 1, tok: 0, jobs: new Map(), workers: new Map(), lanes: new Map(), prios: [],
    counts: noCounts(), tagCounts: new Map(), dependents: new Map(), forgotten: new Set(),
    paused: false, pausedTags: new Set(), strings: new Map(), cascades: 0, policy: 'spread',
  };
}
const noCounts = (): Counts => ({ waiting: 0, running: 0, done: 0, failed: 0, killed: 0 });

/** One copy of each script path and directory, however many jobs share it: a million
 *  jobs of one script would otherwise hold a million copies of its path. */
export function intern(st: State, s: string): string {
  const have = st.strings.get(s);
  if (have !== undefined) return have;
  st.strings.set(s, s);
  return s;
}

export const isFinished = (s: JobState) => s === 'done' || s === 'failed' || s === 'killed';

/** Counts a job in `state` (delta 1) or no longer (delta -1), overall and per tag. */
function count(st: State, job: Job, state: JobState, delta: number): void {
  st.counts[state] += delta;
  for (const tag of job.tags) {
    let c = st.tagCounts.get(tag);
    if (!c) st.tagCounts.set(tag, c = noCounts());
    c[state] += delta;
    if (delta < 0 && c.waiting + c.running + c.done + c.failed + c.killed === 0) st.tagCounts.delete(tag);
  }
}

function setJobState(st: State, job: Job, to: JobState): void {
  count(st, job, job.state, -1);
  count(st, job, to, 1);
  job.state = to;
}

/** Adds a job to the state's jobs, or takes it out (a removed or cleaned job). */
function addJob(st: State, job: Job): void { st.jobs.set(job.id, job); count(st, job, job.state, 1); }
function dropJob(st: State, job: Job): void {
  st.jobs.delete(job.id);
  st.dependents.delete(job.id); // a finished job's held dependents were told already
  count(st, job, job.state, -1);
  if (job.state !== 'done') st.forgotten.add(job.id);
}

/** Jobs share a lane when they share priority, tags and needs. */
const laneKey = (job: Job) => {
  let key = String(job.priority);
  if (job.tags.length) key += `\t${job.tags.join('\t')}`;
  if (!isPlain(job.need)) key += `\n${JSON.stringify(job.need)}`;
  return key;
};

function laneOf(st: State, job: Job): Lane {
  const key = laneKey(job);
  let lane = st.lanes.get(key);
  if (!lane) {
    lane = { key, priority: job.priority, tags: job.tags, need: job.need, front: [], frontTok: [], ids: [], toks: [], head: 0 };
    st.lanes.set(key, lane);
    if (!st.prios.includes(job.priority)) { st.prios.push(job.priority); st.prios.sort((a, b) => b - a); }
  }
  return lane;
}

/** Puts a waiting job in its lane: behind the others, or in front (requeued jobs). */
function enqueue(st: State, job: Job, inFront: boolean): void {
  job.qtok = ++st.tok;
  const lane = laneOf(st, job);
  if (inFront) { lane.front.push(job.id); lane.frontTok.push(job.qtok); }
  else { lane.ids.push(job.id); lane.toks.push(job.qtok); }
}

const liveEntry = (st: State, id: number, tok: number) => {
  const j = st.jobs.get(id);
  return j !== undefined && j.state === 'waiting' && j.qtok === tok ? j : undefined;
};

/** Drops entries of jobs that left a lane from both its ends, so its head stays cheap,
 *  and the lane itself once it is empty. */
function trimLane(st: State, lane: Lane): void {
  while (lane.front.length && !liveEntry(st, lane.front[lane.front.length - 1], lane.frontTok[lane.frontTok.length - 1])) {
    lane.front.pop(); lane.frontTok.pop();
  }
  while (lane.head < lane.ids.length && !liveEntry(st, lane.ids[lane.head], lane.toks[lane.head])) lane.head++;
  if (lane.front.length === 0 && lane.head === lane.ids.length) {
    st.lanes.delete(lane.key);
    for (const l of st.lanes.values()) if (l.priority === lane.priority) return;
    st.prios.splice(st.prios.indexOf(lane.priority), 1);
  } else if (lane.head > 4096 && lane.head * 2 > lane.ids.length) {
    lane.ids = lane.ids.slice(lane.head); lane.toks = lane.toks.slice(lane.head); lane.head = 0;
  }
}

function trimQueue(st: State): void {
  for (const lane of [...st.lanes.values()]) trimLane(st, lane);
}

/** Whether the jobs of a lane may start: the queue and none of the lane's tags paused. */
const laneRuns = (st: State, lane: Lane) => !st.paused && !lane.tags.some((t) => st.pausedTags.has(t));

/** Waiting jobs in the order they start: higher priority first; within one priority,
 *  requeued jobs first (the last requeued first), then first come first served, across
 *  all the lanes of that priority. `startable`: skips paused lanes. Jobs held by their
 *  dependencies are in no lane. Costs O(lanes) to begin and O(log lanes) per job. */
export function* waitingJobs(st: State, startable = false, skip?: Set<string>): Generator<Job> {
  for (const priority of [...st.prios]) {
    // One cursor per lane; the heap orders cursors by the key of their next entry:
    // front entries (newest requeue first) before back entries (oldest first).
    type Cursor = { lane: Lane; f: number; b: number; key: number };
    const keyOf = (c: Cursor) => (c.f >= 0 ? -c.lane.frontTok[c.f] - 2 ** 52 : c.b < c.lane.ids.length ? c.lane.toks[c.b] : Infinity);
    const heap: Cursor[] = [];
    for (const lane of st.lanes.values()) {
      if (lane.priority !== priority || (startable && !laneRuns(st, lane)) || skip?.has(lane.key)) continue;
      const c: Cursor = { lane, f: lane.front.length - 1, b: lane.head, key: 0 };
      c.key = keyOf(c);
      heap.push(c);
    }
    if (heap.length === 0) continue;
    heap.sort((a, b) => a.key - b.key);
    if (heap.length === 1) {
      // The common case, one lane: no heap work.
      const { lane } = heap[0];
      for (let i = lane.front.length - 1; i >= 0 && !skip?.has(lane.key); i--) { const j = liveEntry(st, lane.front[i], lane.frontTok[i]); if (j) yield j; }
      for (let i = lane.head; i < lane.ids.length && !skip?.has(lane.key); i++) { const j = liveEntry(st, lane.ids[i], lane.toks[i]); if (j) yield j; }
      continue;
    }
    while (heap.length && heap[0].key !== Infinity) {
      const c = heap[0];
      if (skip?.has(c.lane.key)) { c.key = Infinity; siftDown(heap, 0); continue; }
      const j = c.f >= 0 ? liveEntry(st, c.lane.front[c.f], c.lane.frontTok[c.f--]) : liveEntry(st, c.lane.ids[c.b], c.lane.toks[c.b++]);
      c.key = keyOf(c);
      siftDown(heap, 0);
      if (j) yield j;
    }
  }
}

function siftDown<T extends { key: number }>(heap: T[], i: number): void {
  for (;;) {
    const l = 2 * i + 1, r = l + 1;
    let m = i;
    if (l < heap.length && heap[l].key < heap[m].key) m = l;
    if (r < heap.length && heap[r].key < heap[m].key) m = r;
    if (m === i) return;
    [heap[i], heap[m]] = [heap[m], heap[i]];
    i = m;
  }
}

/** Whether dependency `id` has been met: it ended done (a job forgotten by `clean`
 *  after it ended done counts as done). */
function depDone(st: State, id: number): boolean {
  const dep = st.jobs.get(id);
  return dep ? dep.state === 'done' : id < st.nextId && !st.forgotten.has(id);
}

/** Queues a job that became waiting, or holds it until its dependencies are done. A
 *  held job is listed under each of its dependencies (done ones too: a retry of one makes
 *  it wait again). A hold has a token of its own, as a queue entry has, so the entries a
 *  job left behind in earlier holds (it was killed, then retried) count for nothing. */
function queueOrHold(st: State, job: Job, inFront: boolean): void {
  job.blockers = 0;
  for (const d of job.after ?? NO_IDS) if (!depDone(st, d)) job.blockers++;
  if (job.blockers === 0) { enqueue(st, job, inFront); return; }
  job.qtok = -(++st.tok);
  for (const d of job.after!) {
    if (!st.jobs.has(d)) continue; // cleaned after it ended done: done for good
    const list = st.dependents.get(d);
    if (list) list.push(job.id, job.qtok); else st.dependents.set(d, [job.id, job.qtok]);
  }
}
const NO_IDS: number[] = [];

/** The jobs held under dependency `dep` whose hold is still live, as [job, index]. */
function* heldFor(st: State, dep: number): Generator<Job> {
  const list = st.dependents.get(dep);
  if (!list) return;
  for (let i = 0; i < list.length; i += 2) {
    const job = st.jobs.get(list[i]);
    if (job && job.state === 'waiting' && job.qtok === list[i + 1]) yield job;
  }
}

/** A job ended for good (done, failed, killed) or left (removed): the jobs held for it
 *  are queued once their last dependency is done, or fail, and their own dependents
 *  after them. Only the jobs held for it are looked at (no scan of all jobs); a worklist,
 *  not recursion, so a chain of any length is fine. */
function releaseDependents(st: State, id: number, how: 'done' | 'failed' | 'removed', t: number): void {
  if (how === 'done') {
    const still: number[] = [];
    for (const job of heldFor(st, id)) {
      if (--job.blockers === 0) enqueue(st, job, false);
      else still.push(job.id, job.qtok);
    }
    if (still.length) st.dependents.set(id, still); else st.dependents.delete(id);
    return;
  }
  const work: [number, 'failed' | 'removed'][] = [[id, how]];
  while (work.length) {
    const [dep, outcome] = work.pop()!;
    const held = [...heldFor(st, dep)];
    st.dependents.delete(dep);
    for (const job of held) {
      job.blockers = 0;
      st.cascades++;
      job.reason = `dependency ${dep} ${outcome}`;
      job.endedAt = t;
      setJobState(st, job, 'failed');
      work.push([job.id, 'failed']);
    }
  }
}

/** A job that had ended done is queued again (retry): the jobs still held for others
 *  wait for it again. */
function reblockDependents(st: State, id: number): void {
  for (const job of heldFor(st, id)) job.blockers++;
}

/** The most jobs one sweep may make: a request costs the server what its jobs cost
 *  (~700 bytes each), so one request line of a few words must not ask for gigabytes. */
export const MAX_SWEEP_JOBS = 1_000_000;
const PLACEHOLDER_RE = /\{(\d*)\}/g;

/** Checks a sweep (`SCRIPT ARGS ::: V... ::: W...`): every list has values, every
 *  placeholder names a list, and the jobs number at most MAX_SWEEP_JOBS. Returns how
 *  many jobs it makes. */
export function checkSweep(template: string[], lists: string[][]): number {
  if (lists.length === 0) throw usage('a sweep needs at least one ::: list of values');
  let n = 1;
  lists.forEach((l, i) => {
    if (l.length === 0) throw usage(`::: list ${i + 1} has no values`, 'write the values after each :::, as in: add_job ./run.sh {1} ::: a b c');
    n *= l.length;
  });
  if (n > MAX_SWEEP_JOBS) throw usage(`the sweep makes ${n} jobs, more than the ${MAX_SWEEP_JOBS} one request may add`, 'split it: one add_job per value of the first list');
  for (const arg of template.slice(1)) {
    for (const m of arg.matchAll(PLACEHOLDER_RE)) {
      const k = m[1] === '' ? 1 : Number(m[1]);
      if (k < 1 || k > lists.length) throw usage(`placeholder {${m[1]}} in ${quoteForError(arg)} names no ::: list`, `there ${lists.length === 1 ? 'is 1 list' : `are ${lists.length} lists`}: {1}${lists.length > 1 ? ` to {${lists.length}}` : ''} (and {} for {1})`);
    }
  }
  return n;
}

/** The jobs of a sweep, in GNU parallel's order (the last list varies fastest): each
 *  combination replaces {1}, {2}, ... (and {}, which is {1}) in the template's arguments,
 *  or, where no argument holds a placeholder, is appended to them. */
export function* sweepJobs(template: string[], lists: string[][]): Generator<JobSpec> {
  const [script, ...args] = template;
  const placed = args.some((a) => a.search(PLACEHOLDER_RE) >= 0);
  const at = lists.map(() => 0);
  for (;;) {
    const values = lists.map((l, i) => l[at[i]]);
    yield placed
      ? [script, ...args.map((a) => a.replace(PLACEHOLDER_RE, (_m, k: string) => values[k === '' ? 0 : Number(k) - 1]))]
      : [script, ...args, ...values];
    let i = lists.length - 1;
    while (i >= 0 && ++at[i] === lists[i].length) at[i--] = 0;
    if (i < 0) return;
  }
}

/** How many jobs an add event makes. */
export const addCount = (ev: Extract<Event, { e: 'add' }>) => (ev.sweep ? ev.sweep.reduce((n, l) => n * l.length, 1) : ev.jobs.length);

function newJob(st: State, id: number, spec: JobSpec, ev: Extract<Event, { e: 'add' }>): Job {
  return {
    id, script: intern(st, spec[0]), args: spec.length > 1 ? spec.slice(1) : NO_ARGS, cwd: intern(st, ev.cwd),
    retries: ev.retries, timeout: ev.timeout, state: 'waiting', queuedAt: ev.t,
    run: 0, retriesUsed: 0, requeues: 0, worker: null, slot: -1, startedAt: 0, endedAt: 0,
    exitCode: null, reason: null, killing: null, killAt: 0, avoid: null, history: null, qtok: 0,
    tags: ev.tags ?? NO_TAGS, priority: ev.priority ?? 0, after: ev.after ?? null, env: ev.env ?? null, blockers: 0,
    need: ev.need ?? PLAIN_NEED, slots: null, gpus: null,
  };
}
const NO_ARGS: string[] = [];
const NO_TAGS: string[] = [];

function newWorker(ev: Extract<Event, { e: 'worker' }>): Worker {
  return {
    host: ev.host, slots: ev.slots, state: 'up', ssh: ev.ssh, running: new Array(ev.slots).fill(0), probeAt: 0, probeDelay: 0, error: null, since: ev.t,
    labels: ev.labels ?? NO_TAGS, gpus: ev.gpus ?? 0, gpuJobs: new Array(ev.gpus ?? 0).fill(0), env: ev.env ?? null,
    ...(ev.rod ? { requeueOnDown: true } : {}),
  };
}

/** The slots a running job holds (one, or all of a multi-slot job's). */
const slotsOf = (job: Job) => job.slots ?? [job.slot];

/** Lets go of the slots and GPUs of a job whose attempt ended. */
function freeSlot(st: State, job: Job): void {
  const w = job.worker === null ? undefined : st.workers.get(job.worker);
  if (!w) return;
  for (const s of slotsOf(job)) if (w.running[s] === job.id) w.running[s] = 0;
  for (const g of job.gpus ?? NO_IDS) if (w.gpuJobs[g] === job.id) w.gpuJobs[g] = 0;
  while (w.running.length > w.slots && w.running[w.running.length - 1] === 0) w.running.pop();
  while (w.gpuJobs.length > w.gpus && w.gpuJobs[w.gpuJobs.length - 1] === 0) w.gpuJobs.pop();
  if (w.state === 'draining' && w.running.every((id) => id === 0)) st.workers.delete(w.host);
}

/** Sends a job whose attempt ended back to the queue, or ends it in `to` (and tells
 *  the jobs held for it). */
function settle(st: State, job: Job, to: JobState | 'requeue', reason: string | null, t: number): void {
  job.reason = reason;
  job.endedAt = t;
  if (to === 'requeue') {
    setJobState(st, job, 'waiting');
    enqueue(st, job, true);
  } else {
    setJobState(st, job, to);
    job.blockers = 0; // a held job that was killed waits for nothing any more
    if (st.dependents.has(job.id)) releaseDependents(st, job.id, to === 'done' ? 'done' : 'failed', t);
  }
}

function avoidWorker(job: Job, host: string | null): void {
  if (host === null) return;
  if (!job.avoid) job.avoid = [host];
  else if (!job.avoid.includes(host)) job.avoid.push(host);
}

/** Attempts started so far: the ended ones in the history, and the one running. A start
 *  that was cut short before the job ran (`unstart`) is no attempt. */
export const attemptsOf = (job: Job) => (job.history?.length ?? 0) + (job.state === 'running' ? 1 : 0);

/** Decides how an attempt that ended counts: done, failed, killed, or back to the queue. */
function endAttempt(st: State, job: Job, code: number | null, why: string | undefined, t: number): void {
  const host = job.worker;
  (job.history ??= []).push({
    n: job.history.length + 1, worker: host ?? '', slot: job.slot, startedAt: job.startedAt, endedAt: t,
    exitCode: code, reason: job.killing === 'timeout' ? 'timeout' : job.killing === 'user' ? 'killed' : job.killing === 'down' ? 'worker down' : (why ?? null),
  });
  job.exitCode = code;
  freeSlot(st, job);
  const killing = job.killing;
  job.killing = null;
  job.killAt = 0;
  const failOrRetry = (reason: string | null) => {
    avoidWorker(job, host);
    if (job.retriesUsed < job.retries) { job.retriesUsed++; settle(st, job, 'requeue', reason, t); }
    else settle(st, job, 'failed', reason, t);
  };
  if (killing === 'user') settle(st, job, 'killed', 'killed', t);
  else if (killing === 'requeue') settle(st, job, 'requeue', 'worker removed', t);
  else if (killing === 'down' && code !== 0) {
    // Stopped because its worker went down: a worker failure, like exit 255.
    job.requeues++;
    avoidWorker(job, host);
    if (job.requeues >= MAX_REQUEUES) settle(st, job, 'failed', `worker down ${job.requeues} times`, t);
    else settle(st, job, 'requeue', 'worker down', t);
  }
  else if (killing === 'timeout') failOrRetry(`timeout after ${job.timeout}s`);
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
      let id = ev.id;
      for (const spec of ev.sweep ? sweepJobs(ev.jobs[0], ev.sweep) : ev.jobs) {
        const job = newJob(st, id++, spec, ev);
        addJob(st, job);
        queueOrHold(st, job, false);
      }
      st.nextId = Math.max(st.nextId, id);
      break;
    }
    case 'remove':
      for (const id of ev.ids) {
        const job = st.jobs.get(id);
        if (!job || job.state !== 'waiting') continue;
        if (st.dependents.has(id)) releaseDependents(st, id, 'removed', ev.t);
        dropJob(st, job);
      }
      trimQueue(st);
      break;
    case 'start': {
      const job = st.jobs.get(ev.id), w = st.workers.get(ev.host);
      if (!job || job.state !== 'waiting' || !w) break;
      setJobState(st, job, 'running');
      job.run++;
      job.worker = intern(st, ev.host); job.slot = ev.slot; job.startedAt = ev.t; job.endedAt = 0;
      job.exitCode = null; job.reason = null; job.killing = null; job.killAt = 0;
      job.slots = ev.slots ?? null; job.gpus = ev.gpus ?? null;
      for (const s of slotsOf(job)) {
        while (w.running.length <= s) w.running.push(0);
        w.running[s] = job.id;
      }
      for (const g of job.gpus ?? NO_IDS) {
        while (w.gpuJobs.length <= g) w.gpuJobs.push(0);
        w.gpuJobs[g] = job.id;
      }
      const lane = st.lanes.get(laneKey(job));
      if (lane) trimLane(st, lane);
      break;
    }
    case 'unstart': {
      const job = st.jobs.get(ev.id);
      if (!job || job.state !== 'running') break;
      freeSlot(st, job);
      const killed = job.killing === 'user';
      job.killing = null; job.killAt = 0;
      // A job the user killed before it got going stays killed.
      if (killed) settle(st, job, 'killed', 'killed before it started', ev.t);
      else { setJobState(st, job, 'waiting'); enqueue(st, job, !ev.back); }
      break;
    }
    case 'end': {
      const job = st.jobs.get(ev.id);
      if (!job || job.state !== 'running' || job.run !== ev.run) break;
      if (ev.began !== undefined && ev.began > job.startedAt && ev.began <= ev.t) job.startedAt = ev.began;
      endAttempt(st, job, ev.code, ev.why, ev.t);
      break;
    }
    case 'kill':
      // Highest id first: a job's dependents have higher ids than it, so each of them
      // ends `killed` itself rather than failed for its killed dependency.
      for (const id of [...ev.ids].sort((a, b) => b - a)) {
        const job = st.jobs.get(id);
        if (!job) continue;
        if (job.state === 'running' && (job.killing === null || ev.why === 'user')) {
          // A user's kill overrides a timeout or requeue under way (and keeps its deadline).
          if (job.killing === null) job.killAt = ev.t + ev.grace;
          job.killing = ev.why;
        } else if (job.state === 'waiting' && ev.why === 'user') {
          settle(st, job, 'killed', 'killed before it started', ev.t);
        }
      }
      trimQueue(st);
      break;
    case 'retry': {
      // All of them wait first, then each is queued or held: a job retried together with
      // its dependency waits for it, whichever id comes first.
      const again: Job[] = [];
      for (const id of ev.ids) {
        const job = st.jobs.get(id);
        if (!job || !isFinished(job.state)) continue;
        const wasDone = job.state === 'done';
        job.retriesUsed = 0; job.requeues = 0; job.reason = null; job.exitCode = null;
        job.queuedAt = ev.t;
        setJobState(st, job, 'waiting');
        if (wasDone) reblockDependents(st, id);
        again.push(job);
      }
      for (const job of again) queueOrHold(st, job, false);
      break;
    }
    case 'clean':
      if (ev.ids) {
        for (const id of ev.ids) { const job = st.jobs.get(id); if (job && isFinished(job.state)) dropJob(st, job); }
      } else {
        for (const job of st.jobs.values()) if (isFinished(job.state)) dropJob(st, job);
      }
      break;
    case 'priority':
      for (const id of ev.ids) {
        const job = st.jobs.get(id);
        if (!job || job.state !== 'waiting' || job.priority === ev.priority) continue;
        job.priority = ev.priority;
        // A queued job moves to the back of its new priority (its old entry dies); a held
        // one is queued there when its dependencies are done.
        if (job.blockers === 0) enqueue(st, job, false);
      }
      trimQueue(st);
      break;
    case 'pause':
      if (ev.tag === undefined) st.paused = true; else st.pausedTags.add(ev.tag);
      break;
    case 'policy':
      st.policy = ev.name;
      break;
    case 'resume':
      if (ev.tag === undefined) st.paused = false; else st.pausedTags.delete(ev.tag);
      break;
    case 'worker': {
      const w = st.workers.get(ev.host);
      if (!w) { st.workers.set(ev.host, newWorker(ev)); break; }
      // Added again: its slots, GPUs, labels, environment and flags are the new ones.
      w.slots = ev.slots; w.ssh = ev.ssh; w.labels = ev.labels ?? NO_TAGS; w.gpus = ev.gpus ?? 0; w.env = ev.env ?? null;
      if (ev.rod) w.requeueOnDown = true; else delete w.requeueOnDown;
      while (w.gpuJobs.length < w.gpus) w.gpuJobs.push(0);
      while (w.gpuJobs.length > w.gpus && w.gpuJobs[w.gpuJobs.length - 1] === 0) w.gpuJobs.pop();
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

export type Start = { id: number; host: string; slot: number; slots?: number[]; gpus?: number[] };

/** Whether a worker could ever hold a job with this need: its labels, its name, and its
 *  size (whatever runs there now). */
export function admits(w: Worker, need: Need): boolean {
  if (need.slots > w.slots || need.gpus > w.gpus) return false;
  if (need.hosts.length && !need.hosts.includes(w.host)) return false;
  for (const l of need.require) if (!w.labels.includes(l)) return false;
  for (const l of need.exclude) if (w.labels.includes(l)) return false;
  return true;
}

/** A schedulable worker's free slots and GPUs, as planStarts hands them out. */
type Free = { w: Worker; order: number; slots: number[]; gpus: number[] };

/** Among the workers a job fits on now, the one the policy picks: `spread` the most
 *  free slots, `pack` the fewest, `sequential` the first added, `random` any (by the
 *  job's id and run, so a plan is a function of the state). Workers the job failed on
 *  come last. Ties go to the worker added first. */
function pickWorker(fits: Free[], job: Job, policy: Policy): Free {
  let pool = fits;
  if (job.avoid) {
    const fresh = fits.filter((f) => !job.avoid!.includes(f.w.host));
    if (fresh.length) pool = fresh;
  }
  if (policy === 'random') return pool[(job.id * 2654435761 + job.run * 40503) % pool.length];
  const rank = (f: Free) => (policy === 'spread' ? -f.slots.length : policy === 'pack' ? f.slots.length : 0);
  let best = pool[0];
  for (const f of pool) {
    const d = rank(f) - rank(best);
    if (d < 0 || (d === 0 && f.order < best.order)) best = f;
  }
  return best;
}

/** Which waiting jobs to start on which free slots (and GPUs) now: in queue order
 *  (priority, then first come first served); each on a worker its need admits with
 *  enough free slots and GPUs, picked by the policy. A job that fits nowhere now makes
 *  its whole lane wait (its jobs need the same), so jobs nobody can take cost one look
 *  per lane; and when a worker could hold it once its running jobs end, that worker
 *  takes nothing more in this plan, so a big job is not overtaken for ever by a stream
 *  of small ones (other workers keep filling). Reads the state only. */
export function planStarts(st: State, unchecked?: ReadonlySet<string>): Start[] {
  const pool: Free[] = [];
  let freeSlots = 0, order = 0;
  for (const w of st.workers.values()) {
    order++;
    if (!schedulable(w) || unchecked?.has(w.host)) continue; // unchecked: see freshWorker
    const f: Free = { w, order, slots: [], gpus: [] };
    for (let s = 0; s < w.slots; s++) if (!w.running[s]) f.slots.push(s);
    for (let g = 0; g < w.gpus; g++) if (!w.gpuJobs[g]) f.gpus.push(g);
    freeSlots += f.slots.length;
    pool.push(f);
  }
  const starts: Start[] = [];
  if (freeSlots === 0) return starts;
  const skip = new Set<string>(), reserved = new Set<Free>();
  for (const job of waitingJobs(st, true, skip)) {
    const need = job.need;
    const fits = pool.filter((f) => !reserved.has(f) && f.slots.length >= need.slots && f.gpus.length >= need.gpus && admits(f.w, need));
    if (fits.length) {
      const f = pickWorker(fits, job, st.policy);
      const slots = f.slots.splice(0, need.slots), gpus = f.gpus.splice(0, need.gpus);
      const start: Start = { id: job.id, host: f.w.host, slot: slots[0] };
      if (slots.length > 1) start.slots = slots;
      if (gpus.length) start.gpus = gpus;
      starts.push(start);
      if ((freeSlots -= slots.length) <= 0) break;
      continue;
    }
    skip.add(laneKey(job));
    // The worker it is to wait for: of those that could hold it, the one closest to it.
    let wait: Free | null = null;
    for (const f of pool) if (!reserved.has(f) && admits(f.w, need) && (!wait || f.slots.length > wait.slots.length)) wait = f;
    if (wait) {
      reserved.add(wait);
      if ((freeSlots -= wait.slots.length) <= 0) break;
    }
  }
  return starts;
}

/** What the server is doing besides what the journal holds, which the core's decisions
 *  take into account: probes under way, jobs already sent SIGKILL, the pause of job
 *  starts after starts that failed for the scheduler's own reasons, and what the checks
 *  of each worker said (health). Not durable: a new server starts with none of it. */
export type Runtime = {
  probing: Set<string>; killSent: Set<number>; startFailures: number; startsPausedUntil: number;
  health: Map<string, Health>;
};
export const newRuntime = (): Runtime => ({ probing: new Set(), killSent: new Set(), startFailures: 0, startsPausedUntil: 0, health: new Map() });

/** The checks of one worker (heartbeats, probes, the login check), times in ms:
 *    okAt     when the last check that answered was sent (0: none yet)
 *    sentAt   when the last heartbeat was sent
 *    missingSince  when the oldest heartbeat sent since the last answer was sent (0: none)
 *    busy     a heartbeat is under way
 *    err      why the last one failed */
export type Health = { okAt: number; sentAt: number; missingSince: number; busy: boolean; err: string | null };
export const newHealth = (): Health => ({ okAt: 0, sentAt: 0, missingSince: 0, busy: false, err: null });

/** How workers are watched: a heartbeat every heartbeatMs (0: never) while a worker has
 *  running jobs or there is waiting work; down after HEARTBEAT_MISSES periods without an
 *  answer; probeMaxMs caps the backoff of probes of a down worker. */
export type HealthSettings = { heartbeatMs: number; probeMaxMs: number };
export const NO_HEARTBEAT: HealthSettings = { heartbeatMs: 0, probeMaxMs: PROBE_BACKOFF_MAX_MS };
export const HEARTBEAT_MISSES = 3;

/** A worker takes jobs only when a check answered within the last two periods: one idle
 *  longer (no heartbeats are sent then) is checked again before any job goes to it. */
export function freshWorker(w: Worker, rt: Runtime, now: number, hs: HealthSettings): boolean {
  if (!w.ssh || hs.heartbeatMs <= 0) return true;
  const h = rt.health.get(w.host);
  return h !== undefined && h.okAt > 0 && now - h.okAt <= 2 * hs.heartbeatMs;
}

/** The events that take a worker down: the failed check, and for a worker added with
 *  --requeue-on-down a kill of its running jobs, which then go back to the queue. */
export function downEvents(st: State, host: string, t: number, err: string, probeMaxMs: number, killGraceMs: number): Event[] {
  const events: Event[] = [{ e: 'probe', t, host, ok: false, err, max: probeMaxMs }];
  const w = st.workers.get(host);
  const running = w ? [...new Set(w.running)].filter((id) => id && st.jobs.get(id)?.state === 'running' && !st.jobs.get(id)!.killing) : [];
  if (w?.requeueOnDown && w.state === 'up' && running.length) events.push({ e: 'kill', t, ids: running, why: 'down', grace: killGraceMs });
  return events;
}

/** The longest pause of starts after failed starts. */
const START_PAUSE_MAX_MS = 60_000;

/** A start that failed for the scheduler's own reasons (its run file could not be made):
 *  starts pause, 0.5 s after the first failure in a row, doubling up to a minute, so a
 *  broken data dir does not spin through the queue. Returns the pause. */
export function pauseStarts(rt: Runtime, now: number): number {
  rt.startFailures++;
  const delay = Math.min(START_PAUSE_MAX_MS, 500 * 2 ** Math.min(7, rt.startFailures - 1));
  rt.startsPausedUntil = now + delay;
  return delay;
}

/** What the shell carries out, after the events that call for it are on disk. */
export type Effect =
  | { kind: 'launch'; id: number }                                   // hand a started job to the launcher
  | { kind: 'signal'; id: number; sig: 'SIGTERM' | 'SIGKILL' }       // to the job's process group
  | { kind: 'probe'; host: string }                                  // ssh login check of a worker
  | { kind: 'heartbeat'; host: string }                              // the same, of a worker that is up
  | { kind: 'forget-run'; id: number; run: number }                  // remove the run file of an ended run
  | { kind: 'remove-logs'; ids: number[] };

/** The effects an event calls for, read from the state after it was applied: a start is
 *  launched, a kill signals the jobs it stops, an end lets go of its run file. The run
 *  file goes only once the end is on disk: until then it is what tells a restarted
 *  server that the run happened. */
export function effectsOf(st: State, ev: Event): Effect[] {
  switch (ev.e) {
    case 'start': return st.jobs.get(ev.id)?.state === 'running' ? [{ kind: 'launch', id: ev.id }] : [];
    case 'kill': return ev.ids.filter((id) => st.jobs.get(id)?.state === 'running').map((id) => ({ kind: 'signal', id, sig: 'SIGTERM' }));
    case 'end': return [{ kind: 'forget-run', id: ev.id, run: ev.run }];
    default: return [];
  }
}

export type Plan = { events: Event[]; effects: Effect[]; next: number };

/** The scheduler's decisions at `now`, made once per turn of the server: jobs whose
 *  --timeout passed are killed; jobs still running a grace period after their kill get
 *  SIGKILL; workers whose probe is due are probed; busy workers whose heartbeat is due
 *  are checked, and those that missed their checks too long go down; free slots of
 *  workers checked lately get waiting jobs (unless starts pause); and `next` is when the
 *  earliest of these falls due next, counting what this plan starts and kills. Reads the
 *  state and the runtime only. */
export function plan(st: State, rt: Runtime, now: number, killGraceMs: number, hs: HealthSettings = NO_HEARTBEAT): Plan {
  const events: Event[] = [], effects: Effect[] = [];
  let next = Infinity;
  const at = (t: number) => { next = Math.min(next, t); };
  let stale: Set<string> | null = null;
  for (const w of st.workers.values()) {
    if (w.ssh && w.probeAt > 0 && !rt.probing.has(w.host)) {
      if (w.probeAt <= now) effects.push({ kind: 'probe', host: w.host }); else at(w.probeAt);
    }
    if (w.ssh && hs.heartbeatMs > 0 && w.state === 'up') {
      // Heartbeats: only while the worker has running jobs or jobs wait; one at a time,
      // none while a probe is due. Missed ones count even then: a probe of a hung host
      // takes its connect timeout to fail.
      const h = rt.health.get(w.host) ?? newHealth();
      const limit = h.missingSince > 0 ? h.missingSince + HEARTBEAT_MISSES * hs.heartbeatMs : Infinity;
      if (limit <= now) {
        const why = `no answer to checks for ${Math.round((now - h.missingSince) / 1000)}s${h.err ? ` (${h.err})` : ''}`;
        events.push(...downEvents(st, w.host, now, why, hs.probeMaxMs, killGraceMs));
        at(now); // plan again once it is down: its probes, its jobs' kills
        continue;
      }
      at(limit);
      if (w.probeAt === 0 && (w.running.some(Boolean) || st.counts.waiting > 0)) {
        const due = h.sentAt + hs.heartbeatMs;
        if (!h.busy) { if (due <= now) effects.push({ kind: 'heartbeat', host: w.host }); else at(due); }
      }
      if (!freshWorker(w, rt, now, hs)) (stale ??= new Set()).add(w.host);
    }
    for (let slot = 0; slot < w.running.length; slot++) {
      const id = w.running[slot], job = id ? st.jobs.get(id) : undefined;
      if (!job || job.state !== 'running' || job.slot !== slot) continue; // a job of K slots once
      if (job.killing) {
        if (rt.killSent.has(id)) continue;
        if (job.killAt <= now) effects.push({ kind: 'signal', id, sig: 'SIGKILL' }); else at(job.killAt);
      } else if (job.timeout > 0) {
        const due = job.startedAt + job.timeout * 1000;
        if (due <= now) { events.push({ e: 'kill', t: now, ids: [id], why: 'timeout', grace: killGraceMs }); at(now + killGraceMs); }
        else at(due);
      }
    }
  }
  if (now < rt.startsPausedUntil) {
    if (st.counts.waiting > 0) at(rt.startsPausedUntil);
  } else {
    // Workers not checked lately get no job: the heartbeat under way (or due) decides.
    for (const s of planStarts(st, stale ?? undefined)) {
      events.push({ e: 'start', t: now, ...s });
      const timeout = st.jobs.get(s.id)!.timeout;
      if (timeout > 0) at(now + timeout * 1000);
    }
  }
  return { events, effects, next };
}

// ---- requests: what each operation decides -------------------------------------
// Each decision is a pure function of the state, the request and `now`: the events to
// commit, the answer, and any effect of its own; or a UserError, and nothing changes.
// The server's operation table (OPS) names which one serves which op.

export type Request = Record<string, unknown> & { op: string };
export type Decision = { events: Event[]; answer: Record<string, unknown>; effects?: Effect[] };
/** What a decision may read besides the state and the request: the clock, the kill
 *  grace, and the bytes an exec leaves for a job's arguments (ARG_MAX less the
 *  environment jobs get). */
export type DecideContext = { now: number; killGraceMs: number; argSpace: number };

/** The kernel's limit on one argument or environment string (Linux MAX_ARG_STRLEN). */
export const MAX_ARG_BYTES = 128 * 1024 - 1;

/** A whole number from a request (JSON numbers only: "3" or [3] is no number). */
export const num = (v: unknown, name: string, min = 0, max = Number.MAX_SAFE_INTEGER): number => {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) throw usage(`invalid ${name} ${quoteForError(JSON.stringify(v) ?? String(v))}`);
  return v;
};
const idList = (v: unknown): number[] => {
  if (!Array.isArray(v) || v.length === 0) throw usage('no job ids given');
  return v.map((x) => num(x, 'job id', 1));
};
export function jobOrFail(st: State, id: number): Job {
  const job = st.jobs.get(id);
  if (!job) throw failure(`no such job '${id}'`, id >= st.nextId ? 'ids so far end at ' + (st.nextId - 1) : 'it may have been removed or cleaned');
  return job;
}
const strings = (v: unknown): v is string[] => Array.isArray(v) && v.every((w) => typeof w === 'string');

/** A tag from a request, checked. */
export function tagOf(v: unknown): string {
  if (typeof v !== 'string' || !TAG_RE.test(v)) {
    throw usage(`invalid tag ${quoteForError(typeof v === 'string' ? v : JSON.stringify(v) ?? String(v))}`, 'a tag is up to 64 letters, digits and _ . : + - (not starting with one of the last four)');
  }
  return v;
}

/** The ids of a request's jobs chosen by tag ({tag}) or by id ({ids}); `fits` says which
 *  of the tag's jobs the op acts on, and explains a job given by id that does not fit. */
function chosenJobs(st: State, req: Request, fits: (j: Job) => string | null): number[] {
  if (req.tag !== undefined) {
    const tag = tagOf(req.tag);
    const ids: number[] = [];
    for (const job of st.jobs.values()) if (job.tags.includes(tag) && fits(job) === null) ids.push(job.id);
    return ids;
  }
  const ids = idList(req.ids);
  for (const id of ids) {
    const why = fits(jobOrFail(st, id));
    if (why !== null) throw failure(why);
  }
  return ids;
}

export const PRIORITY_LIMIT = 1_000_000_000;
const priorityOf = (v: unknown) => num(v, 'priority', -PRIORITY_LIMIT, PRIORITY_LIMIT);

/** A job's --env words, checked: NAME=VALUE with a plain name, not one the server sets. */
export function envOf(v: unknown): string[] {
  if (!strings(v)) throw usage('env is a list of NAME=VALUE strings');
  for (const word of v) {
    const eq = word.indexOf('=');
    const name = eq < 0 ? word : word.slice(0, eq);
    if (eq < 0 || !ENV_NAME_RE.test(name)) throw usage(`invalid environment setting ${quoteForError(word)}`, 'write NAME=VALUE, with a name of letters, digits and _ (not starting with a digit)');
    if (RESERVED_ENV.has(name)) throw usage(`${name} is set by the server for each job; it cannot be given with --env`);
    if (word.includes('\0')) throw usage(`the value of ${name} holds a NUL byte, which no environment can hold`);
  }
  return v;
}

/** A job's dependencies, checked: each exists (or was cleaned after it ended done) and
 *  has not ended failed or killed. Sorted, without repeats. */
function afterOf(st: State, v: unknown): number[] {
  const ids = [...new Set(idList(v))].sort((a, b) => a - b);
  for (const id of ids) {
    const dep = st.jobs.get(id);
    if (!dep && (id >= st.nextId || st.forgotten.has(id))) {
      throw failure(`no such job '${id}' to wait for`, id >= st.nextId ? `ids so far end at ${st.nextId - 1}` : 'it was removed, or cleaned before it ended done');
    }
    if (dep && (dep.state === 'failed' || dep.state === 'killed')) throw failure(`job '${id}' has already ended ${dep.state}, so a job after it could never start`, `retry it first: retry ${id}`);
  }
  return ids;
}

/** A label (of a worker, or one a job requires or avoids), checked like a tag. */
export function labelOf(v: unknown): string {
  if (typeof v !== 'string' || !TAG_RE.test(v)) {
    throw usage(`invalid label ${quoteForError(typeof v === 'string' ? v : JSON.stringify(v) ?? String(v))}`, 'a label is up to 64 letters, digits and _ . : + - (not starting with one of the last four)');
  }
  return v;
}
const labelList = (v: unknown, name: string): string[] => {
  if (v === undefined) return [];
  if (!Array.isArray(v)) throw usage(`${name} is a list`);
  return [...new Set(v.map(labelOf))].sort();
};

/** What the jobs of an add_jobs request need of a worker (slots, gpus, require, avoid,
 *  hosts), checked. */
export function needOf(req: Request): Need {
  const slots = num(req.slots ?? 1, 'slot count', 1, MAX_SLOTS), gpus = num(req.gpus ?? 0, 'GPU count', 0, MAX_GPUS);
  const require = labelList(req.require, 'require'), exclude = labelList(req.avoid, 'avoid');
  if (req.hosts !== undefined && !strings(req.hosts)) throw usage('hosts is a list of host names');
  const hosts = [...new Set((req.hosts as string[] | undefined) ?? [])].sort();
  for (const h of hosts) validateHost(h);
  const both = require.find((l) => exclude.includes(l));
  if (both !== undefined) throw usage(`label ${quoteForError(both)} is both required and avoided`);
  const need = { slots, gpus, require, exclude, hosts };
  return isPlain(need) ? PLAIN_NEED : need;
}

/** A need in words, for messages: "4 slots, 2 GPUs, label gpu, not label slow". */
export function describeNeed(need: Need): string {
  const parts: string[] = [];
  if (need.slots > 1) parts.push(`${need.slots} slots on one worker`);
  if (need.gpus) parts.push(`${need.gpus} GPU${need.gpus === 1 ? '' : 's'}`);
  for (const l of need.require) parts.push(`label ${l}`);
  for (const l of need.exclude) parts.push(`not label ${l}`);
  if (need.hosts.length) parts.push(`host ${need.hosts.join(' or ')}`);
  return parts.join(', ') || 'one slot';
}

/** add_jobs {cwd, jobs: [[script, ...args]], retries, timeout, tags?, priority?, after?,
 *  env?, slots?, gpus?, require?, avoid?, hosts?}: the scripts were checked (absolute,
 *  executable) before; ids are handed out in order. */
export function decideAddJobs(st: State, req: Request, c: DecideContext): Decision {
  const { cwd, jobs } = req;
  if (typeof cwd !== 'string' || !path.isAbsolute(cwd) || cwd.includes('\0')) throw usage('add_jobs needs an absolute cwd');
  if (!Array.isArray(jobs) || jobs.length === 0) throw usage('no jobs given');
  if (req.tags !== undefined && !Array.isArray(req.tags)) throw usage('tags is a list');
  const tags = req.tags === undefined ? [] : [...new Set((req.tags as unknown[]).map(tagOf))].sort();
  const priority = priorityOf(req.priority ?? 0);
  const after = req.after === undefined || (Array.isArray(req.after) && req.after.length === 0) ? [] : afterOf(st, req.after);
  const env = req.env === undefined ? [] : envOf(req.env);
  const need = needOf(req);
  let envBytes = 0;
  for (const w of env) {
    const n = Buffer.byteLength(w);
    if (n > MAX_ARG_BYTES) throw usage(`an environment setting of ${n} bytes is longer than the system allows one (${MAX_ARG_BYTES} bytes)`, 'pass large data in a file instead');
    envBytes += n + 1 + 8;
  }
  let count = jobs.length;
  if (req.sweep !== undefined) {
    if (!Array.isArray(req.sweep) || !req.sweep.every(strings) || jobs.length !== 1 || !strings(jobs[0])) throw usage('a sweep is one job and lists of strings');
    count = checkSweep(jobs[0] as string[], req.sweep as string[][]);
  }
  for (const spec of req.sweep === undefined ? jobs : sweepJobs(jobs[0] as string[], req.sweep as string[][])) {
    if (!strings(spec) || spec.length === 0) throw usage('a job is a list of strings');
    if (spec.some((w) => w.includes('\0'))) throw usage("a job's words cannot hold NUL bytes");
    if (!path.isAbsolute(spec[0])) throw usage(`script path is not absolute: ${quoteForError(spec[0])}`);
    // An exec that the kernel refuses would fail the job every time it starts.
    let bytes = 0;
    for (const w of spec) {
      const n = Buffer.byteLength(w);
      if (n > MAX_ARG_BYTES) throw usage(`an argument of ${n} bytes is longer than the system allows one argument (${MAX_ARG_BYTES} bytes)`, 'pass large data in a file instead');
      bytes += n + 1 + 8;
    }
    if (bytes + envBytes > c.argSpace) throw usage(`a job's arguments${envBytes ? ' and --env settings' : ''} take ${bytes + envBytes} bytes, more than the ${c.argSpace} an exec leaves beside the environment (ARG_MAX)`, 'pass large data in a file instead');
  }
  const id = st.nextId;
  const ev: Extract<Event, { e: 'add' }> = { e: 'add', t: c.now, id, cwd, retries: num(req.retries ?? 0, 'retries'), timeout: num(req.timeout ?? 0, 'timeout'), jobs: jobs as JobSpec[] };
  // Campaign fields only where given, so plain jobs cost the journal nothing more.
  if (tags.length) ev.tags = tags;
  if (priority) ev.priority = priority;
  if (after.length) ev.after = after;
  if (env.length) ev.env = env;
  if (req.sweep !== undefined) ev.sweep = req.sweep as string[][];
  if (!isPlain(need)) ev.need = need;
  // Workers come and go, so such jobs are queued all the same; but say so.
  const answer: Record<string, unknown> = { first: id, count };
  if (!isPlain(need) && ![...st.workers.values()].some((w) => admits(w, need))) answer.warning = `no worker can take ${count === 1 ? 'this job' : 'these jobs'} now (${describeNeed(need)}); ${count === 1 ? 'it waits' : 'they wait'} until one is added`;
  return { events: [ev], answer };
}

/** Throws unless some job carries the tag (a typo should not look like "nothing to do"). */
function tagKnown(st: State, req: Request): void {
  if (req.tag !== undefined && !st.tagCounts.has(tagOf(req.tag))) throw failure(`no job has the tag ${quoteForError(String(req.tag))}`, 'see the tags in: cli.ts status');
}

/** remove_jobs {ids} | {tag} | {script, args}: waiting jobs only. Jobs held for a
 *  removed job fail (`dependency N removed`). */
export function decideRemoveJobs(st: State, req: Request, c: DecideContext): Decision {
  let ids: number[];
  if (req.ids !== undefined || req.tag !== undefined) {
    tagKnown(st, req);
    ids = chosenJobs(st, req, (job) => job.state === 'waiting' ? null : `job '${job.id}' is ${job.state}, not waiting${job.state === 'running' ? `; stop it with: kill ${job.id}` : ''}`);
  } else {
    const { script, args } = req;
    if (typeof script !== 'string' || !strings(args)) throw usage('remove_job needs a script and args');
    ids = [];
    for (const job of st.jobs.values()) {
      if (job.state === 'waiting' && job.script === script && job.args.length === args.length && job.args.every((a, i) => a === args[i])) ids.push(job.id);
    }
    if (ids.length === 0) throw failure(`no waiting job runs ${quoteForError([script, ...args].map(shellQuote).join(' '))}`);
  }
  return { events: ids.length ? [{ e: 'remove', t: c.now, ids }] : [], answer: { ids } };
}

/** kill {ids} | {all} | {tag}: running jobs get SIGTERM (then SIGKILL after the grace),
 *  waiting ones end `killed` without running. */
export function decideKill(st: State, req: Request, c: DecideContext): Decision {
  let ids: number[];
  if (req.all === true) ids = [...st.jobs.values()].filter((j) => !isFinished(j.state)).map((j) => j.id);
  else {
    tagKnown(st, req);
    ids = chosenJobs(st, req, (job) => isFinished(job.state) ? (req.tag !== undefined ? '' : `job '${job.id}' is not running (it is ${job.state})`) : null);
  }
  return { events: ids.length ? [{ e: 'kill', t: c.now, ids, why: 'user', grace: c.killGraceMs }] : [], answer: { ids } };
}

/** retry {ids} | {failed, killed, tag}: finished jobs go back to the queue (by tag
 *  alone: its failed and killed ones). A job whose dependency ended failed or killed is
 *  retried only together with it, else it would wait for ever. */
export function decideRetry(st: State, req: Request, c: DecideContext): Decision {
  let ids: number[];
  if (req.ids === undefined) {
    tagKnown(st, req);
    const tag = req.tag === undefined ? undefined : tagOf(req.tag);
    const either = req.failed !== true && req.killed !== true;
    if (either && tag === undefined) throw usage('retry needs ids, a tag, or failed/killed');
    ids = [];
    for (const j of st.jobs.values()) {
      if (tag !== undefined && !j.tags.includes(tag)) continue;
      if (((either || req.failed === true) && j.state === 'failed') || ((either || req.killed === true) && j.state === 'killed')) ids.push(j.id);
    }
  } else {
    ids = idList(req.ids);
    for (const id of ids) {
      const job = jobOrFail(st, id);
      if (!isFinished(job.state)) throw failure(`job '${id}' is ${job.state}; only finished jobs can be retried`);
    }
  }
  const set = new Set(ids);
  for (const id of ids) {
    for (const d of st.jobs.get(id)!.after ?? NO_IDS) {
      const dep = st.jobs.get(d);
      if (set.has(d) || depDone(st, d) || (dep && !isFinished(dep.state))) continue;
      throw failure(`job '${id}' waits for job ${d}, which ${dep ? `ended ${dep.state}` : 'was forgotten before it ended done'}`, dep ? `retry both: retry ${d} ${id}` : undefined);
    }
  }
  return { events: ids.length ? [{ e: 'retry', t: c.now, ids }] : [], answer: { ids } };
}

/** clean {logs, tag}: forgets finished jobs (of a tag) and removes their logs. */
export function decideClean(st: State, req: Request, c: DecideContext): Decision {
  tagKnown(st, req);
  const tag = req.tag === undefined ? undefined : tagOf(req.tag);
  const ids = [...st.jobs.values()].filter((j) => isFinished(j.state) && (tag === undefined || j.tags.includes(tag))).map((j) => j.id);
  const logs = req.logs === true;
  const ev: Extract<Event, { e: 'clean' }> = { e: 'clean', t: c.now, logs };
  if (tag !== undefined) ev.ids = ids;
  return {
    events: ids.length ? [ev] : [],
    answer: { count: ids.length },
    effects: logs && ids.length ? [{ kind: 'remove-logs', ids }] : [],
  };
}

/** set_priority {priority, ids | tag}: waiting jobs (held ones too) move to that
 *  priority, behind the jobs already there. */
export function decideSetPriority(st: State, req: Request, c: DecideContext): Decision {
  const priority = priorityOf(req.priority);
  tagKnown(st, req);
  const ids = chosenJobs(st, req, (job) => job.state === 'waiting' ? null : req.tag !== undefined ? '' : `job '${job.id}' is ${job.state}; only waiting jobs change priority`);
  return { events: ids.length ? [{ e: 'priority', t: c.now, ids, priority }] : [], answer: { ids } };
}

/** pause {tag?} / resume {tag?}: nothing new starts (of that tag); running jobs go on. */
export function decidePause(st: State, req: Request, c: DecideContext): Decision {
  const tag = req.tag === undefined ? undefined : tagOf(req.tag);
  const pause = req.op === 'pause';
  const was = tag === undefined ? st.paused : st.pausedTags.has(tag);
  const ev: Extract<Event, { e: 'pause' | 'resume' }> = { e: pause ? 'pause' : 'resume', t: c.now };
  if (tag !== undefined) ev.tag = tag;
  return { events: was === pause ? [] : [ev], answer: { changed: was !== pause, pausedTags: [...st.pausedTags] } };
}

/** A worker to add: `auto` asks the login check to read its CPUs and GPUs. */
export type WorkerSpec = { host: string; slots: number; gpus: number; labels: string[]; env: string[]; auto: boolean };

/** The workers of an add_workers request, checked (hosts, slot and GPU counts, labels,
 *  environment). */
export function workerSpecs(req: Request): WorkerSpec[] {
  const list = req.workers;
  if (!Array.isArray(list) || list.length === 0) throw usage('no hosts given');
  return list.map((w: { host?: unknown; slots?: unknown; gpus?: unknown; labels?: unknown; env?: unknown; auto?: unknown }) => {
    if (typeof w?.host !== 'string') throw usage('a worker needs a host');
    validateHost(w.host);
    const env = w.env === undefined ? [] : envOf(w.env);
    return {
      host: w.host, slots: num(w.slots ?? 1, 'slot count', 1, MAX_SLOTS), gpus: num(w.gpus ?? 0, 'GPU count', 0, MAX_GPUS),
      labels: labelList(w.labels, 'labels'), env, auto: w.auto === true,
    };
  });
}

/** add_workers {workers, skipCheck, requeueOnDown}: the ssh login check (unless skipped)
 *  passed before, and filled in the size of `auto` workers. */
export function decideAddWorkers(_st: State, req: Request, c: DecideContext): Decision {
  const workers = workerSpecs(req);
  const bad = workers.find((w) => w.auto);
  if (bad) throw usage(`${quoteForError(bad.host)}: auto needs the ssh login check, which reads the host's CPUs and GPUs`, 'drop --skip_ssh_auth_check, or give --slots N and --gpus N');
  return {
    events: workers.map((w) => {
      const ev: Extract<Event, { e: 'worker' }> = { e: 'worker', t: c.now, host: w.host, slots: w.slots, ssh: req.skipCheck !== true };
      if (w.labels.length) ev.labels = w.labels;
      if (w.gpus) ev.gpus = w.gpus;
      if (w.env.length) ev.env = w.env;
      if (req.requeueOnDown === true) ev.rod = true;
      return ev;
    }),
    answer: { added: workers.map((w) => ({ host: w.host, slots: w.slots, gpus: w.gpus, labels: w.labels })) },
  };
}

/** policy {name?}: shows or sets which free worker a job goes to. */
export function decidePolicy(st: State, req: Request, c: DecideContext): Decision {
  if (req.name === undefined) return { events: [], answer: { policy: st.policy } };
  const name = typeof req.name === 'string' ? (POLICY_ALIASES[req.name] ?? req.name) : '';
  if (!(POLICIES as readonly string[]).includes(name)) throw usage(`unknown policy ${quoteForError(String(req.name))}`, `policies: ${POLICIES.join(', ')} (smart = spread, frugal = pack)`);
  return { events: name === st.policy ? [] : [{ e: 'policy', t: c.now, name: name as Policy }], answer: { policy: name, was: st.policy } };
}

/** remove_workers {hosts, mode}: an idle worker goes at once; a busy one needs mode
 *  `wait` (drain: it takes nothing new and goes when its last job ends) or `kill` (its
 *  jobs are killed and queued again). */
export function decideRemoveWorkers(st: State, req: Request, c: DecideContext): Decision {
  if (!strings(req.hosts) || req.hosts.length === 0) throw usage('no hosts given');
  const events: Event[] = [], result: { host: string; running: number }[] = [];
  for (const host of new Set(req.hosts)) {
    const w = st.workers.get(host);
    if (!w) throw failure(`no such worker '${host}'`);
    const running = [...new Set(w.running.filter(Boolean))];
    if (running.length && req.mode !== 'wait' && req.mode !== 'kill') {
      throw failure(`worker '${host}' is running ${running.length} job(s)`, 'use --wait to let them finish first, or --kill to stop and requeue them');
    }
    result.push({ host, running: running.length });
    if (!running.length) { events.push({ e: 'unworker', t: c.now, host }); continue; }
    events.push({ e: 'drain', t: c.now, host });
    if (req.mode === 'kill') events.push({ e: 'kill', t: c.now, ids: running, why: 'requeue', grace: c.killGraceMs });
  }
  return { events, answer: { workers: result } };
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
/** Splits HOST[:SLOTS|:auto]; `auto` (or defaultAuto, from --slots auto, for a host
 *  without a count) leaves the size to the login check. */
export function parseWorkerArg(arg: string, defaultSlots: number, defaultAuto = false): { host: string; slots: number; auto: boolean } {
  const m = /^([\s\S]*?)(?::(\d+|auto))?$/.exec(arg)!;
  const host = m[1], auto = m[2] === 'auto' || (m[2] === undefined && defaultAuto);
  const slots = auto ? 1 : m[2] === undefined ? defaultSlots : Number(m[2]);
  validateHost(host);
  if (!Number.isSafeInteger(slots) || slots < 1 || slots > MAX_SLOTS) throw usage(`invalid slot count in ${quoteForError(arg)}`, `slots are 1 to ${MAX_SLOTS}, or auto`);
  return { host, slots, auto };
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
  if (/^[A-Za-z0-9_./:=@%+,-]+$/.test(word)) return word;
  // Bytes that are not UTF-8 (see textOf), as bash's $'\xHH', which pastes back exactly.
  if (LONE_ESCAPE.test(word)) return `$'${word.replace(/[\\']|[\x00-\x1f\x7f]|(?<![\ud800-\udbff])[\udc80-\udcff]/g, (c) => (c === '\\' || c === "'" ? `\\${c}` : `\\x${(c.charCodeAt(0) & 0xff).toString(16).padStart(2, '0')}`))}'`;
  return `'${word.replace(/'/g, `'\\''`)}'`;
}

function quoteForError(value: string): string {
  return `'${value.replace(/[\x00-\x1f\x7f]|(?<![\ud800-\udbff])[\udc80-\udcff]/g, (c) => `\\x${(c.charCodeAt(0) & 0xff).toString(16).padStart(2, '0')}`)}'`;
}

// ---- bytes that are not UTF-8 ---------------------------------------------------
// Arguments, directories and file lines are bytes, and need not be UTF-8 (a file name
// from an old Latin-1 archive, say). Inside, they are strings; a byte that is not part of
// valid UTF-8 is kept as the lone surrogate U+DC80..U+DCFF (Python's "surrogateescape"),
// which JSON carries as \udcXX, and turned back into that byte wherever the string
// becomes bytes again (the launcher's record, a path the client checks). So every byte
// sequence but NUL reaches the job exactly.

const LONE_ESCAPE = /(?<![\ud800-\udbff])[\udc80-\udcff]/;

/** Bytes as a string: valid UTF-8 decoded, every other byte B kept as U+DC00+B. */
export function textOf(buf: Buffer): string {
  const plain = buf.toString('utf8');
  if (!plain.includes('\ufffd') || Buffer.from(plain).equals(buf)) return plain;
  let out = '';
  for (let i = 0; i < buf.length;) {
    const b = buf[i];
    const n = b < 0x80 ? 1 : b >= 0xc2 && b <= 0xdf ? 2 : b >= 0xe0 && b <= 0xef ? 3 : b >= 0xf0 && b <= 0xf4 ? 4 : 0;
    if (n === 1) { out += String.fromCharCode(b); i++; continue; }
    let ok = n > 0 && i + n <= buf.length;
    for (let k = 1; ok && k < n; k++) ok = (buf[i + k] & 0xc0) === 0x80;
    if (ok) {
      // Overlong forms, UTF-16 surrogates and code points past U+10FFFF are not UTF-8.
      const c1 = buf[i + 1];
      if ((b === 0xe0 && c1 < 0xa0) || (b === 0xed && c1 >= 0xa0) || (b === 0xf0 && c1 < 0x90) || (b === 0xf4 && c1 >= 0x90)) ok = false;
    }
    if (ok) { out += buf.subarray(i, i + n).toString('utf8'); i += n; } else { out += String.fromCharCode(0xdc00 + b); i++; }
  }
  return out;
}

/** A string as the bytes it stands for (the inverse of textOf). */
export function bytesOf(s: string): Buffer {
  if (!LONE_ESCAPE.test(s)) return Buffer.from(s);
  const parts: Buffer[] = [];
  let from = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0xdc80 && c <= 0xdcff && !(i > 0 && s.charCodeAt(i - 1) >= 0xd800 && s.charCodeAt(i - 1) <= 0xdbff)) {
      parts.push(Buffer.from(s.slice(from, i)), Buffer.of(c - 0xdc00));
      from = i + 1;
    }
  }
  parts.push(Buffer.from(s.slice(from)));
  return Buffer.concat(parts);
}

/** Why waiting jobs that depend on nothing and are not paused are not running: no
 *  worker, none up, or no slot free (then they are next in line). Once per view. */
export function queueReason(st: State): string {
  if (st.workers.size === 0) return 'no workers';
  let up = false;
  for (const w of st.workers.values()) {
    if (!schedulable(w)) continue;
    up = true;
    if (w.running.length < w.slots || w.running.some((id) => id === 0)) return 'starting';
  }
  return up ? 'no worker free' : 'no worker up';
}

/** Why a waiting job is not running: the dependencies it waits for, a pause, or the
 *  queue's reason (queueReason). */
export function waitReason(st: State, job: Job, queue: string): string {
  if (job.blockers > 0) return `after ${(job.after ?? NO_IDS).filter((d) => !depDone(st, d)).join(',')}`;
  if (st.paused) return 'paused';
  const tag = job.tags.find((t) => st.pausedTags.has(t));
  if (tag !== undefined) return `tag ${tag} paused`;
  if (isPlain(job.need)) return queue;
  let admitted = false, up = false;
  for (const w of st.workers.values()) if (admits(w, job.need)) { admitted = true; if (schedulable(w)) up = true; }
  return !admitted ? `no worker has ${describeNeed(job.need)}` : !up ? `no worker up with ${describeNeed(job.need)}` : `waiting for ${describeNeed(job.need)}`;
}

/** The public view of a job (list --json, status --json); field names are stable.
 *  `queue` is queueReason(st), computed once for many jobs. */
export function jobView(st: State, job: Job, now: number, queue = queueReason(st)) {
  const end = job.state === 'running' ? now : job.endedAt;
  return {
    id: job.id, state: job.state, worker: job.worker, slot: job.slot >= 0 ? job.slot : null,
    exitCode: job.exitCode, reason: job.reason, attempts: attemptsOf(job),
    retries: job.retries, timeout: job.timeout || null,
    queuedAt: iso(job.queuedAt), startedAt: job.startedAt ? iso(job.startedAt) : null,
    endedAt: job.endedAt ? iso(job.endedAt) : null,
    runtimeMs: job.startedAt && end >= job.startedAt ? end - job.startedAt : null,
    script: job.script, args: job.args, cwd: job.cwd,
    tags: job.tags, priority: job.priority, after: job.after ?? [], env: job.env ?? [],
    need: { slots: job.need.slots, gpus: job.need.gpus, require: job.need.require, avoid: job.need.exclude, hosts: job.need.hosts },
    slots: job.slot >= 0 ? slotsOf(job) : [], gpus: job.gpus ?? [],
    waitingFor: job.state === 'waiting' ? waitReason(st, job, queue) : null,
    history: (job.history ?? []).map((a) => ({
      attempt: a.n, worker: a.worker, slot: a.slot, exitCode: a.exitCode, reason: a.reason,
      startedAt: iso(a.startedAt), endedAt: iso(a.endedAt),
    })),
  };
}
export type JobView = ReturnType<typeof jobView>;

function workerView(st: State, w: Worker, h: Health | undefined) {
  return {
    host: w.host, slots: w.slots, state: w.state, checking: w.state === 'up' && w.probeAt > 0,
    labels: w.labels, gpus: w.gpus, gpusUsed: w.gpuJobs.flatMap((id, g) => (id ? [g] : [])), env: w.env ?? [],
    error: w.error, since: iso(w.since), nextProbeAt: w.state === 'down' && w.probeAt ? iso(w.probeAt) : null,
    seenAt: h && h.okAt ? iso(h.okAt) : null,
    requeueOnDown: w.requeueOnDown === true,
    running: w.running.flatMap((id, slot) => (id ? [{ slot, id, command: commandOf(st.jobs.get(id)) }] : [])),
  };
}

const commandOf = (job: Job | undefined) => (job ? [job.script, ...job.args].map(shellQuote).join(' ') : '');
const iso = (t: number) => new Date(t).toISOString();

/** The status reply: counts, every worker with its slots, the head of the queue (the
 *  jobs that start next), what is paused, and the counts of each tag. */
export function statusView(st: State, health?: Map<string, Health>) {
  const queue: { id: number; command: string; queuedAt: string; attempts: number; priority: number; waitingFor: string }[] = [];
  const why = queueReason(st);
  for (const job of waitingJobs(st, true)) {
    if (queue.length >= QUEUE_HEAD) break;
    queue.push({ id: job.id, command: commandOf(job), queuedAt: iso(job.queuedAt), attempts: attemptsOf(job), priority: job.priority, waitingFor: waitReason(st, job, why) });
  }
  return {
    counts: { ...st.counts, total: st.jobs.size },
    workers: [...st.workers.values()].map((w) => workerView(st, w, health?.get(w.host))),
    queue,
    paused: st.paused,
    pausedTags: [...st.pausedTags].sort(),
    policy: st.policy,
    tags: [...st.tagCounts].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([tag, c]) => ({
      tag, ...c, total: c.waiting + c.running + c.done + c.failed + c.killed, paused: st.pausedTags.has(tag),
    })),
  };
}
export type StatusView = ReturnType<typeof statusView>;

// ============================================================================
// The journal: the state on disk
// ============================================================================

/** `version`: the oldest format version among the files read. */
export type LoadResult = { state: State; warnings: string[]; journalSize: number; snapshotSize: number; version: number };

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

/** Checks a state file's first line; returns its format version. */
function checkHeader(file: string, header: Record<string, unknown>, format: string): number {
  if (header.format !== format) throw damaged(file, 1, `not a ${format} file`);
  if (typeof header.version !== 'number' || header.version > FORMAT_VERSION) {
    throw new DamagedState(EXIT_FAILED, `state file '${file}' has format version ${String(header.version)}, newer than this program's ${FORMAT_VERSION}`, 'use a newer cli.ts; nothing was changed');
  }
  return header.version;
}

/** Brings a journal event or a snapshot job of format version 1 to this version's
 *  names: events `stop` -> `kill`, `start` {w, s} -> {host, slot}; jobs
 *  {attempts, runs, stopping} -> {run, killing} (attempts are counted from the history). */
export function upgradeRecord(rec: Record<string, unknown>, version: number): Record<string, unknown> {
  if (version >= 2) return rec;
  if (rec.e === 'stop') return { ...rec, e: 'kill' };
  if (rec.e === 'start' && 'w' in rec) { const { w, s, ...rest } = rec; return { ...rest, host: w, slot: s }; }
  if (rec.j && 'runs' in (rec.j as object)) {
    const { attempts: _attempts, runs, stopping, ...job } = rec.j as Record<string, unknown>;
    return { j: { ...job, run: runs, killing: stopping } };
  }
  return rec;
}

/** Loads the snapshot, then replays the journal after it. A journal whose last line
 *  was cut off by a crash loads up to there (with a warning); any other damage throws,
 *  naming the file and line, and nothing is written. */
export function loadState(dataDir: string, journalLimit = Infinity): LoadResult {
  const st = newState();
  const warnings: string[] = [];
  const snapFile = path.join(dataDir, 'snapshot'), journalFile = path.join(dataDir, 'journal');
  let snapshotSize = 0, journalSize = 0, oldest = FORMAT_VERSION;
  if (fs.existsSync(snapFile)) {
    snapshotSize = fs.statSync(snapFile).size;
    let complete = false, version = FORMAT_VERSION;
    // Waiting jobs are queued (or held) once every job is in, since holds look at their
    // dependencies: in the order of the `queue` records, the others (held) after them.
    // Snapshots of version 2 have no such records: their waiting jobs come in that order.
    const waiting: Job[] = [], order: number[] = [];
    const tagSets = new Map<string, string[]>(), needs = new Map<string, Need>(); // one copy each
    const { tail } = forEachLine(snapFile, Infinity, (line, no) => {
      const rec = upgradeRecord(parseLine(snapFile, line, no), version);
      if (no === 1) {
        version = checkHeader(snapFile, rec, 'djs-snapshot');
        oldest = Math.min(oldest, version);
        st.seq = Number(rec.seq); st.nextId = Number(rec.nextId);
        if (!Number.isSafeInteger(st.seq) || !Number.isSafeInteger(st.nextId)) throw damaged(snapFile, 1, 'bad header');
      } else if (rec.w) {
        const w = rec.w as Worker;
        if (typeof w.host !== 'string' || !Array.isArray(w.running)) throw damaged(snapFile, no, 'bad worker');
        // Version 2 workers have no placement fields.
        w.labels ??= NO_TAGS; w.gpus ??= 0; w.gpuJobs ??= new Array(w.gpus).fill(0); w.env ??= null;
        st.workers.set(w.host, w);
      } else if (rec.j) {
        const job = rec.j as Job;
        if (typeof job.id !== 'number' || !JOB_STATES.includes(job.state) || typeof job.script !== 'string' || !Array.isArray(job.args)) throw damaged(snapFile, no, 'bad job');
        if (job.args.length === 0) job.args = NO_ARGS;
        job.script = intern(st, job.script); job.cwd = intern(st, job.cwd);
        if (job.worker !== null) job.worker = intern(st, job.worker);
        // Version 2 jobs have no campaign fields.
        job.priority ??= 0; job.after ??= null; job.env ??= null; job.blockers = 0; job.slots ??= null; job.gpus ??= null;
        if (!job.need || isPlain(job.need)) job.need = PLAIN_NEED;
        else {
          const key = JSON.stringify(job.need);
          job.need = needs.get(key) ?? (needs.set(key, job.need), job.need);
        }
        if (!Array.isArray(job.tags) || job.tags.length === 0) job.tags = NO_TAGS;
        else {
          const key = job.tags.join('\t');
          job.tags = tagSets.get(key) ?? (tagSets.set(key, job.tags), job.tags);
        }
        addJob(st, job);
        if (job.state === 'waiting') waiting.push(job);
      } else if (rec.pause) {
        const p = rec.pause as { all?: unknown; tags?: unknown };
        st.paused = p.all === true;
        if (Array.isArray(p.tags)) for (const t of p.tags) st.pausedTags.add(String(t));
      } else if (rec.forgotten) {
        if (!Array.isArray(rec.forgotten)) throw damaged(snapFile, no, 'bad forgotten ids');
        for (const id of rec.forgotten) st.forgotten.add(Number(id));
      } else if (rec.queue) {
        if (!Array.isArray(rec.queue)) throw damaged(snapFile, no, 'bad queue');
        for (const id of rec.queue) order.push(Number(id));
      } else if (rec.end) {
        if (rec.jobs !== st.jobs.size) throw damaged(snapFile, no, 'job count does not match');
        const queued = new Set<Job>();
        for (const id of order) {
          const job = st.jobs.get(id);
          if (job?.state === 'waiting' && !queued.has(job)) { queued.add(job); queueOrHold(st, job, false); }
        }
        for (const job of waiting) if (!queued.has(job)) queueOrHold(st, job, false);
        complete = true;
      } else throw damaged(snapFile, no, 'unknown record');
    });
    if (tail.length || !complete) throw damaged(snapFile, 0, 'incomplete snapshot (no end record)');
  }
  if (fs.existsSync(journalFile)) {
    let lastNo = 0, version = FORMAT_VERSION;
    const { tail, tailAt } = forEachLine(journalFile, journalLimit, (line, no, end) => {
      lastNo = no;
      const rec = upgradeRecord(parseLine(journalFile, line, no), version);
      if (no === 1) {
        version = checkHeader(journalFile, rec, 'djs-journal');
        oldest = Math.min(oldest, version);
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
  return { state: st, warnings, journalSize, snapshotSize, version: oldest };
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
  snapshotMinBytes: number;
  constructor(dir: string, size: number, snapshotSize: number, snapshotMinBytes = SNAPSHOT_MIN_JOURNAL_BYTES) {
    this.dir = dir;
    this.snapshotMinBytes = snapshotMinBytes;
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
    return this.size > this.snapshotMinBytes && this.size > this.snapshotSize / 2;
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
      if (st.paused || st.pausedTags.size) put({ pause: { all: st.paused, tags: [...st.pausedTags] } });
      const forgotten = [...st.forgotten];
      for (let i = 0; i < forgotten.length; i += 10_000) put({ forgotten: forgotten.slice(i, i + 10_000) });
      // Every job in id order (as list shows them), then the queue's order of start.
      for (const j of st.jobs.values()) put({ j: { ...j, qtok: 0 } });
      let order: number[] = [];
      for (const j of waitingJobs(st)) {
        order.push(j.id);
        if (order.length === 10_000) { put({ queue: order }); order = []; }
      }
      if (order.length) put({ queue: order });
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

/** The launcher: one perl process for the life of the server that starts every job and
 *  reaps it. A start never forks the server (a fork costs time in proportion to the
 *  memory of the process that forks: milliseconds for a server holding a million jobs),
 *  and each job costs one fork and one exec. Perl, not bash: bash cannot wait for its
 *  input and its children at once (a trap cannot run while `read` blocks, and `wait -n`
 *  loses background jobs killed by a signal to job notification), and perl is on every
 *  system that has a package manager (Debian's perl-base is essential). It runs as
 *    perl -e 'eval of $DJS_LAUNCHER_CODE' djs-launcher DATA_DIR LOG_DIR SERVER_PID
 *  (the code comes through the environment, so `ps` shows a short line).
 *
 *  Input (from the server, binary-safe: nothing in it is ever evaluated): one record per
 *  job, `%08x` length, then `ID RUN SLOT ATTEMPT NENV LEN...\n` and the fields those
 *  lengths cut out of the bytes that follow: CWD, MARKER, WORKER, NENV `NAME=VALUE`
 *  words, SCRIPT, ARGS. Read in blocks, so a long argument costs what its bytes cost.
 *
 *  For each record the launcher forks a child in a process group of its own, which
 *    1. claims the run: creates run/ID.RUN.pid exclusively (O_EXCL, no symlink followed)
 *       and writes `PID LAUNCHER_PID` there, keeping the file open (also in the job,
 *       which is how a later server tells this run's process from any other);
 *    2. enters CWD, opens LOG_DIR/ID.log (append, no symlink, no FIFO: a log that would
 *       block fails the start instead), and makes it the job's stdout and stderr;
 *    3. sets JOB_ID, SLAVE_IP, SLAVE_SLOT, JOB_ATTEMPT and the NAME=VALUE words, and
 *       execs SCRIPT with ARGS (no shell).
 *  The launcher reaps each child, appends its exit code (128+N for signal N) to the run
 *  file if the claim there is the child's, and then tells the server. Before each fork
 *  it checks that its parent is still the server: the launcher of a server that is gone
 *  starts nothing more (the next server queues those jobs again), but goes on reaping
 *  and recording exit codes until its last job has ended.
 *
 *  Output (to the server; each line one write, so lines never interleave):
 *    s ID RUN PID     the run's process was forked (the server can now signal it)
 *    f ID RUN WHY     the run failed before the script ran: `taken` (a server claimed
 *                     the run first), `nowrite` (the run file could not be made),
 *                     `cwd`, `log`; comes before the run's `x`
 *    x ID RUN CODE    the run's process ended */
const LAUNCHER = String.raw`
use Fcntl qw(O_WRONLY O_CREAT O_EXCL O_APPEND O_NOFOLLOW O_NONBLOCK F_GETFL F_SETFL);
my (undef, $D, $L, $S, $SETSID) = @ARGV;   # @ARGV starts with the name djs-launcher
delete $ENV{DJS_LAUNCHER_CODE};
my @kept = grep { /^DJS_KEPT_/ } keys %ENV;
# Files the launcher inherited beyond stdin, stdout and stderr (from whatever started the
# server) are closed, so that no job gets them.
if (opendir(my $dh, '/proc/self/fd')) {
  my @fds = grep { /^\d+$/ && $_ > 2 && $_ != fileno($dh) } readdir($dh);
  closedir($dh);
  for my $fd (@fds) { (open(my $h, "<&=$fd") || open($h, ">&=$fd")) and close($h) }
}
$SIG{PIPE} = 'IGNORE';
$| = 1;
pipe(my $sr, my $sw) or die "djs-launcher: pipe: $!\n";
fcntl($sw, F_SETFL, fcntl($sw, F_GETFL, 0) | O_NONBLOCK);
$SIG{CHLD} = sub { syswrite($sw, 'c') };
my (%job, $buf);
my $alive = 1;
$buf = '';
sub fail { syswrite(STDOUT, "f $_[0] $_[1] $_[2]\n"); exit 1 }
sub child {
  my ($id, $run, $slot, $att, $nenv, $cwd, $marker, $worker, @w) = @_;
  $SIG{CHLD} = $SIG{PIPE} = 'DEFAULT';
  # A session of its own (setsid; its number per machine comes from the server), so the
  # job never shares a process group or session with the launcher.
  ($SETSID > 0 && syscall($SETSID) >= 0) or setpgrp(0, 0);
  $^F = 1023;   # what is opened from here on stays open across exec
  sysopen(my $pf, "$D/run/$id.$run.pid", O_WRONLY|O_CREAT|O_EXCL|O_NOFOLLOW, 0600)
    or fail($id, $run, $!{EEXIST} ? 'taken' : 'nowrite');
  syswrite($pf, "$$ " . getppid() . "\n") or fail($id, $run, 'nowrite');
  chdir($cwd) or fail($id, $run, 'cwd');
  sysopen(my $lf, "$L/$id.log", O_WRONLY|O_CREAT|O_APPEND|O_NOFOLLOW|O_NONBLOCK, 0600) or fail($id, $run, 'log');
  -f $lf or fail($id, $run, 'log');
  fcntl($lf, F_SETFL, fcntl($lf, F_GETFL, 0) & ~O_NONBLOCK);
  open(STDIN, '<', '/dev/null');
  open(STDOUT, '>&', $lf) and open(STDERR, '>&', $lf) or fail($id, $run, 'log');
  close($lf);
  syswrite(STDOUT, $marker) if length $marker;
  for my $k (@kept) { my $v = delete $ENV{$k}; $k =~ s/^DJS_KEPT_//; $ENV{$k} = $v }
  @ENV{qw(JOB_ID SLAVE_IP SLAVE_SLOT JOB_ATTEMPT)} = ($id, $worker, $slot, $att);
  for (1 .. $nenv) { my ($k, $v) = split /=/, shift(@w), 2; $ENV{$k} = $v }
  { exec { $w[0] } @w }
  my $err = $!;
  print STDERR "djs: cannot run $w[0]: $err\n";
  exit($!{ENOENT} ? 127 : 126);
}
sub take {
  while (length($buf) >= 8) {
    my $len = hex(substr($buf, 0, 8));
    return if length($buf) < 8 + $len;
    my $rec = substr($buf, 8, $len);
    substr($buf, 0, 8 + $len) = '';
    if (getppid() != $S) { $alive = 0; open(STDOUT, '>', '/dev/null'); return }
    my $nl = index($rec, "\n");
    my @f = split / /, substr($rec, 0, $nl);
    my ($o, @w) = ($nl + 1);
    for my $n (@f[5 .. $#f]) { push @w, substr($rec, $o, $n); $o += $n }
    my $pid = fork();
    if (!defined $pid) { print "f $f[0] $f[1] nowrite\nx $f[0] $f[1] 1\n"; next }
    child(@f[0 .. 4], @w) if $pid == 0;
    $job{$pid} = "$f[0] $f[1]";
    print "s $f[0] $f[1] $pid\n";
  }
}
sub reap {
  while ((my $pid = waitpid(-1, 1)) > 0) {
    my $r = delete $job{$pid};
    next unless defined $r;
    my $c = ($? & 127) ? 128 + ($? & 127) : $? >> 8;
    my ($id, $run) = split / /, $r;
    if (open(my $fh, '+<', "$D/run/$id.$run.pid")) {
      my $claim = <$fh> // '';
      if ($claim =~ /^$pid /) { seek($fh, 0, 2); print $fh "$c\n" }
      close($fh);
    }
    print "x $r $c\n";
  }
}
while ($alive || %job) {
  my $rin = '';
  vec($rin, fileno($sr), 1) = 1;
  vec($rin, 0, 1) = 1 if $alive;
  next if select(my $rout = $rin, undef, undef, undef) <= 0;
  if (vec($rout, fileno($sr), 1)) { sysread($sr, my $x, 4096); reap() }
  if ($alive && vec($rout, 0, 1)) {
    my $n = sysread(STDIN, $buf, 1 << 16, length $buf);
    if ($n) { take() }
    elsif (defined $n || !$!{EINTR}) { $alive = 0; open(STDOUT, '>', '/dev/null') }
  }
}
`;

/** Variables perl acts on at start-up: kept from the launcher (as DJS_KEPT_NAME) and
 *  given back to each job as they were; so is a variable whose name starts with
 *  DJS_KEPT_ itself, so that it reaches jobs unchanged. */
const keptFromLauncher = (name: string) => /^PERL/.test(name) || name.startsWith('DJS_KEPT_');

/** The launcher's environment and arguments (see LAUNCHER). */
export function launcherArgs(env: NodeJS.ProcessEnv, dataDir: string, logDir: string, serverPid: number): { env: NodeJS.ProcessEnv; args: string[] } {
  const own: NodeJS.ProcessEnv = { DJS_LAUNCHER_CODE: LAUNCHER, DJS_DATA_DIR: dataDir };
  for (const [name, value] of Object.entries(env)) {
    if (keptFromLauncher(name)) own[`DJS_KEPT_${name}`] = value; else own[name] ??= value;
  }
  return { env: own, args: ['-e', 'my $c = $ENV{DJS_LAUNCHER_CODE}; eval $c; die $@ if $@', 'djs-launcher', dataDir, logDir, String(serverPid), String(SETSID_SYSCALL[process.arch] ?? 0)] };
}

/** Linux's number of the setsid system call, by machine (perl has no setsid without its
 *  large POSIX module); elsewhere the launcher falls back to a process group of its own. */
const SETSID_SYSCALL: Record<string, number> = process.platform === 'linux'
  ? { x64: 112, arm64: 157, riscv64: 157, loong64: 157, ia32: 66, arm: 66, ppc64: 66, s390x: 66 }
  : {};

/** One job for the launcher (see LAUNCHER): its record, as bytes. */
export function launchRecord(j: { id: number; run: number; slot: number; attempt: number; cwd: string; marker: string; worker: string; env: string[]; script: string; args: string[] }): Buffer {
  const fields = [j.cwd, j.marker, j.worker, ...j.env, j.script, ...j.args].map(bytesOf);
  const head = Buffer.from(`${j.id} ${j.run} ${j.slot} ${j.attempt} ${j.env.length} ${fields.map((f) => f.length).join(' ')}\n`);
  let len = head.length;
  for (const f of fields) len += f.length;
  return Buffer.concat([Buffer.from(len.toString(16).padStart(8, '0')), head, ...fields]);
}

/** Run files are named by the job and its run number, which is never reused. */
const runFile = (dataDir: string, id: number, run: number) => path.join(dataDir, 'run', `${id}.${run}.pid`);

/** What a run file says: who claimed the run (`void`: a server, so it never ran; else
 *  the pid of the run's process and of the launcher that forked it; '' while the claim
 *  is being written) and, once the run ended, its exit code. Version 1 files hold only
 *  the pid on the first line. Throws the read error (ENOENT: no claim). */
function readRunFile(file: string): { claim: string; pid: number; launcher: number; code: number | null } {
  const [first, code] = fs.readFileSync(file, 'utf8').split('\n');
  const [pid, launcher] = first.trim().split(' ');
  return {
    claim: first.trim(), pid: /^\d+$/.test(pid) ? Number(pid) : 0, launcher: /^\d+$/.test(launcher ?? '') ? Number(launcher) : 0,
    code: /^\d+$/.test(code ?? '') ? Number(code) : null,
  };
}

const HAVE_PROC = fs.existsSync('/proc/self/stat');
const gone = (e: unknown) => ['ENOENT', 'ESRCH'].includes((e as NodeJS.ErrnoException).code ?? '');

/** The fields of /proc/PID/stat after the command name (0: state, 1: parent, 2: process
 *  group, 19: start time), or null if there is no such process. Other errors (out of
 *  file descriptors, say) are thrown: they say nothing about the process. */
function procStat(pid: number | string): string[] | null {
  let stat: string;
  try { stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8'); } catch (e) { if (gone(e)) return null; throw e; }
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
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

/** True if some process of group `pgid` (a run's process group) holds run file `file`
 *  open or carries this job's JOB_ID and data dir in its environment (a script that
 *  closed its inherited files, or a child it left behind); a zombie counts, since its
 *  exit code is still to be recorded by its parent. Neither a reused pid nor another
 *  job's process can pass. Throws when /proc cannot be read (then nothing is known). */
function runHolds(pgid: number, id: number, dataDir: string, file: fs.Stats): boolean {
  if (!HAVE_PROC) { try { process.kill(-pgid, 0); return true; } catch (e) { return (e as NodeJS.ErrnoException).code === 'EPERM'; } }
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const fields = procStat(name);
    if (fields === null || Number(fields[2]) !== pgid) continue;
    if (fields[0] === 'Z') return true;
    try {
      for (const fd of fs.readdirSync(`/proc/${name}/fd`)) {
        const held = fs.statSync(`/proc/${name}/fd/${fd}`);
        if (held.ino === file.ino && held.dev === file.dev) return true;
      }
      const env = fs.readFileSync(`/proc/${name}/environ`, 'utf8').split('\0');
      if (env.includes(`JOB_ID=${id}`) && sameDir(env.find((e) => e.startsWith('DJS_DATA_DIR='))?.slice(13), dataDir)) return true;
    } catch (e) { if (!gone(e)) throw e; }
  }
  return false;
}

/** True if two paths name one directory (a data dir may be spelled differently by two
 *  servers: through a symlink, say). */
function sameDir(a: string | undefined, b: string): boolean {
  if (a === undefined) return false;
  if (a === b) return true;
  try { const x = fs.statSync(a), y = fs.statSync(b); return x.dev === y.dev && x.ino === y.ino; } catch { return false; }
}

/** The pid of the process that created run file `file` and has not written its claim
 *  yet: a launcher's child before its exec (it runs the launcher's code, so its command
 *  line is the launcher's); or null. Throws when /proc cannot be read. */
function runCreator(file: fs.Stats, dataDir: string): number | null {
  if (!HAVE_PROC) return null;
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name) || !launcherAlive(Number(name), dataDir)) continue;
    try {
      for (const fd of fs.readdirSync(`/proc/${name}/fd`)) {
        const held = fs.statSync(`/proc/${name}/fd/${fd}`);
        if (held.ino === file.ino && held.dev === file.dev) return Number(name);
      }
    } catch (e) { if (!gone(e)) throw e; }
  }
  return null;
}

/** True while `pid` is a launcher of this data dir (or a child of one before its exec):
 *  it may still claim a run or record an exit code. */
function launcherAlive(pid: number, dataDir: string): boolean {
  if (pid <= 0) return false;
  let argv: string[];
  try { argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0'); } catch (e) { if (gone(e)) return false; throw e; }
  const at = argv.indexOf('djs-launcher');
  return at >= 0 && sameDir(argv[at + 1], dataDir);
}

/** What became of a run, as its run file and /proc tell:
 *   unclaimed  no process claimed it (no run file, or a server's `void`): it never ran
 *   running    its process (or the process about to record its exit) lives
 *   ended      it ended: with its exit code, or null when nobody recorded one
 *   unknown    the check itself failed (out of file descriptors, say): ask again later;
 *              never taken for "ended"
 *  The one place that decides whether a job's process lives, used at start-up, when the
 *  launcher dies, and for jobs whose launcher is not ours. */
export type RunCheck = { is: 'unclaimed' } | { is: 'running'; pid: number } | { is: 'ended'; code: number | null; at?: number } | { is: 'unknown'; why: string };

export function checkRun(dataDir: string, id: number, run: number): RunCheck {
  const file = runFile(dataDir, id, run);
  try {
    const r = readRunFile(file);
    // The exit code was appended when the run ended: that is when it ended, however late
    // a server looks.
    if (r.code !== null) return { is: 'ended', code: r.code, at: fs.statSync(file).mtimeMs };
    if (r.claim === 'void') return { is: 'unclaimed' };
    const stat = fs.statSync(file);
    if (r.pid === 0) {
      // Created, its claim not written yet: by a process that still holds it, or by one
      // that died before it got to run the job (then its claim never comes: the file
      // is read again after the search, in case the claim came meanwhile).
      const creator = runCreator(stat, dataDir);
      if (creator !== null) return { is: 'running', pid: creator };
      const again = readRunFile(file);
      return again.pid === 0 && again.claim !== 'void' ? { is: 'unclaimed' } : checkRun(dataDir, id, run);
    }
    // Its launcher lives: the run's process runs, or the launcher is about to record its
    // exit code (it is the process's parent). No need to look further.
    if (launcherAlive(r.launcher, dataDir)) {
      const again = readRunFile(file);
      return again.code !== null ? { is: 'ended', code: again.code } : { is: 'running', pid: r.pid };
    }
    if (runHolds(r.pid, id, dataDir, stat)) return { is: 'running', pid: r.pid };
    const last = readRunFile(file);
    return { is: 'ended', code: last.code };
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { is: 'unclaimed' };
    return { is: 'unknown', why: (e as Error).message };
  }
}

/** Claims a run for the server, so that no process can claim it after: true if the
 *  claim is the server's now (or was already), false if a process claimed it first. */
export function voidRun(dataDir: string, id: number, run: number): boolean {
  const file = runFile(dataDir, id, run);
  // Written aside and linked into place (which fails if the name exists), so the file
  // is never seen empty, whenever this process dies.
  const tmp = `${file}.void.${process.pid}`;
  fs.writeFileSync(tmp, 'void\n', { mode: 0o600 });
  try {
    fs.linkSync(tmp, file);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
  } finally {
    fs.rmSync(tmp, { force: true });
  }
  const r = readRunFile(file);
  if (r.claim === 'void') return true;
  if (r.pid !== 0 || runCreator(fs.statSync(file), dataDir) !== null) return false;
  // Created by a process that died before writing its claim (nothing holds it): it never
  // ran the job, and no process can write the file any more. Read again in case the claim
  // came while /proc was searched.
  if (readRunFile(file).claim !== '') return false;
  fs.writeFileSync(file, 'void\n', { mode: 0o600 });
  return true;
}

/** Signals a run's process group; a process that has not made its group yet (it was
 *  just forked) gets the signal itself. */
function signalGroup(pid: number, sig: NodeJS.Signals): void {
  try { process.kill(-pid, sig); } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ESRCH') try { process.kill(pid, sig); } catch { /* already gone */ }
  }
}

/** How the server (and the jobs) use ssh. `shared`: one authenticated connection per
 *  worker and group of `perConnection` slots, kept by OpenSSH (ControlMaster), whose
 *  control sockets and config files live in `controlDir` (set once the server knows its
 *  data dir); see sharedConfigText. `heartbeatMs`: how often busy workers are checked. */
export type SshSettings = {
  config: string | undefined; options: string[]; timeoutS: number;
  shared: boolean; perConnection: number; heartbeatMs: number; controlDir: string;
};

/** Default slots per shared connection: sshd's default MaxSessions is 10, and a job
 *  holds one session at a time (two while it stops its work), the heartbeat one more. */
export const SLOTS_PER_CONNECTION = 8;
/** How long a shared connection stays open with nothing on it, seconds. */
const CONTROL_PERSIST_S = 600;

/** The server's ssh settings, from DJS_SSH_CONFIG, DJS_SSH_OPTIONS, DJS_SSH_TIMEOUT,
 *  DJS_SSH_SHARED, DJS_SSH_SESSIONS and DJS_HEARTBEAT; throws a usage error on a bad value. */
export function sshSettings(env: NodeJS.ProcessEnv): SshSettings {
  const timeoutS = Number(env.DJS_SSH_TIMEOUT ?? 10);
  const whole = (name: string, dflt: number, min: number) => {
    const v = env[name];
    if (v === undefined || v === '') return dflt;
    if (!/^\d+$/.test(v) || Number(v) < min) throw usage(`invalid ${name} ${quoteForError(v)}`, `a whole number, at least ${min}`);
    return Number(v);
  };
  const shared = env.DJS_SSH_SHARED ?? '1';
  if (shared !== '0' && shared !== '1' && shared !== '') throw usage(`invalid DJS_SSH_SHARED ${quoteForError(shared)}`, '1 (shared connections, the default) or 0');
  return {
    config: env.DJS_SSH_CONFIG || undefined,
    options: (env.DJS_SSH_OPTIONS ?? '').split(/\s+/).filter(Boolean),
    timeoutS: Number.isFinite(timeoutS) && timeoutS > 0 ? timeoutS : 10,
    shared: shared !== '0',
    perConnection: whole('DJS_SSH_SESSIONS', SLOTS_PER_CONNECTION, 1),
    heartbeatMs: whole('DJS_HEARTBEAT', 30, 0) * 1000,
    controlDir: '',
  };
}

/** Which shared connection slot `slot` of a worker uses, and how many a worker of
 *  `slots` slots has. */
export const connectionOf = (slot: number, ssh: SshSettings) => Math.floor(slot / ssh.perConnection);
export const connectionsOf = (slots: number, ssh: SshSettings) => Math.max(1, Math.ceil(slots / ssh.perConnection));

/** A word for an ssh config file, in double quotes where it needs them. */
const sshConfigWord = (w: string) => (/^[A-Za-z0-9_.\/~%+,@=:-]+$/.test(w) ? w : `"${w.replace(/[\\"]/g, (c) => '\\' + c)}"`);

/** The ssh config of shared connection `n`: OpenSSH keeps one master connection per
 *  host (and user and port) with its control socket at CONTROL_DIR/%C.n; every ssh or
 *  rsync that uses this file rides on it (a new session, no new login), and the first
 *  that finds none, or a dead one, makes a new one (ControlMaster auto), which lives on
 *  in the background until idle for CONTROL_PERSIST_S. Keepalives end a master whose
 *  host went silent, and with it the sessions on it (exit 255). The user's own config
 *  (DJS_SSH_CONFIG, else ~/.ssh/config) and the system's follow, so User, Port,
 *  ProxyJump and IdentityFile there apply as ever. */
export function sharedConfigText(ssh: SshSettings, n: number): string {
  const alive = Math.max(1, Math.ceil(ssh.timeoutS / 2));
  return [
    '# Written by djs for its jobs and checks: ssh -F THIS_FILE HOST ...',
    'ControlMaster auto',
    `ControlPath ${sshConfigWord(`${ssh.controlDir}/%C.${n}`)}`,
    `ControlPersist ${CONTROL_PERSIST_S}`,
    'BatchMode yes',
    `ConnectTimeout ${ssh.timeoutS}`,
    `ServerAliveInterval ${alive}`,
    'ServerAliveCountMax 4',
    `Include ${sshConfigWord(ssh.config ?? '~/.ssh/config')}`,
    'Include /etc/ssh/ssh_config',
    '',
  ].join('\n');
}

/** Config files of shared connections written by this server (rewritten at each start,
 *  as the settings may have changed). */
const writtenConfigs = new Set<string>();

/** The ssh config file of shared connection n (see sharedConfigText), written once. */
export function sharedConfigFile(ssh: SshSettings, n: number): string {
  const file = path.join(ssh.controlDir, `config.${n}`);
  if (!writtenConfigs.has(file)) {
    replaceFile(file, (fd) => writeAll(fd, sharedConfigText(ssh, n)));
    writtenConfigs.add(file);
  }
  return file;
}

/** Where the control sockets go: DATA_DIR/ssh (mode 0700); when that path is too long
 *  for a socket (ssh adds 41 bytes plus a temporary suffix of 17 to a limit of 107) or
 *  holds characters ssh would read as tokens, a 0700 directory named by the data dir in
 *  the temporary directory instead. */
export function controlDirFor(dataDir: string, uid: number, tmp: string): string {
  const own = path.join(dataDir, 'ssh');
  if (own.length <= 44 && /^[A-Za-z0-9_.\/+,@=-]+$/.test(own)) return own;
  const hash = crypto.createHash('sha256').update(dataDir).digest('hex').slice(0, 12);
  const base = /^[A-Za-z0-9_.\/+,@=-]+$/.test(tmp) && tmp.length <= 20 ? tmp : '/tmp';
  return path.join(base, `djs-${uid}-${hash}`);
}

/** The ssh words of a login check or probe: through shared connection n when shared. */
function checkArgs(host: string, ssh: SshSettings, n: number, command: string): string[] {
  const args = ['-o', 'BatchMode=yes', '-o', `ConnectTimeout=${ssh.timeoutS}`];
  if (ssh.shared && ssh.controlDir) args.push('-F', sharedConfigFile(ssh, n));
  else {
    args.push('-o', 'ServerAliveInterval=5', '-o', 'ServerAliveCountMax=2');
    if (ssh.config) args.push('-F', ssh.config);
  }
  args.push(...ssh.options, '--', host, command);
  return args;
}

/** Checks that `ssh -o BatchMode=yes` logs in to host and runs `command` (its output to
 *  `result`), over each of the worker's shared connections (which this opens, or
 *  replaces, when missing or dead; the others run `true`); resolves to null or to why
 *  not. Never prompts; gives up after the connect timeout plus a margin. */
export async function probeHost(host: string, ssh: SshSettings, slots = 1, command = 'true', result?: { out: string }): Promise<string | null> {
  validateHost(host);
  const n = ssh.shared && ssh.controlDir ? connectionsOf(slots, ssh) : 1;
  const errs = await Promise.all(Array.from({ length: n }, (_, i) => checkOnce(checkArgs(host, ssh, i, i === 0 ? command : 'true'), ssh, i === 0 ? result : undefined)));
  return errs.find((e) => e !== null) ?? null;
}

function checkOnce(args: string[], ssh: SshSettings, result?: { out: string }): Promise<string | null> {
  return new Promise((resolve) => {
    let err = '', done = false;
    const child = spawn('ssh', args, { stdio: ['ignore', result ? 'pipe' : 'ignore', 'pipe'] });
    child.stdout?.on('data', (d) => { if (result && result.out.length < 65536) result.out += d; });
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

/** What `HOST:auto` runs on the host: its CPU count, then one line per GPU (none where
 *  nvidia-smi is missing or fails). */
export const SIZE_COMMAND = 'nproc; nvidia-smi -L 2>/dev/null || true';

/** The CPUs and GPUs SIZE_COMMAND printed, or null if it did not print a CPU count. */
export function parseSize(out: string): { cpus: number; gpus: number } | null {
  const lines = out.split('\n').map((l) => l.trim());
  const cpus = Number(lines[0]);
  if (!/^\d+$/.test(lines[0] ?? '') || cpus < 1) return null;
  return { cpus: Math.min(cpus, MAX_SLOTS), gpus: Math.min(MAX_GPUS, lines.filter((l) => /^GPU \d+:/.test(l)).length) };
}

// ============================================================================
// The server: the operation table, the flush loop, the process supervisor, the socket
// ============================================================================

type Reply = (msg: Record<string, unknown>) => void;
/** A client's connection, for operations that answer over time. */
/** A client's connection. `busy`: its request being served (until the final answer, one
 *  with `ok`); further request lines wait in line behind it, so one connection can never
 *  have the server work on more than one of its requests at a time. */
type Conn = { send: Reply; sock: net.Socket; busy: boolean; lastActive: number };
type Decide = (st: State, req: Request, c: DecideContext) => Decision;
/** Inputs wait in the inbox for the next flush: requests that change state (with the
 *  decision that serves them), facts (a process ended, a probe answered), and ticks (a
 *  timer fired). */
type Input = { kind: 'request'; req: Request; decide: Decide; reply: Reply } | { kind: 'fact'; ev: Event } | { kind: 'tick' };
/** A job's process as the supervisor knows it: `launched` by our launcher, whose lines
 *  tell its pid and its end; or `watched`, any other (it outlived an earlier server or
 *  our launcher), whose end its run file tells (checkRun). `failed`: why the launcher
 *  said it could not start; `signal`: one asked for before its pid was known. */
type Proc = { run: number; pid: number; how: 'launched' | 'watched'; failed: string | null; signal: NodeJS.Signals | null; began: number };
/** A `wait` client: for jobs (ids, or all when null), or for workers to be gone. */
type Waiter = { ids: Set<number> | null; pending: Set<number> | null; hosts: string[] | null; send: Reply; lastSent: number; lastKey: string; done: () => void };
type Follower = { id: number; send: Reply; done: () => void };
type ServerConfig = {
  dataDir: string; logDir: string; killGraceMs: number; probeMaxMs: number; snapshotMinBytes: number; ssh: SshSettings;
  maxConnections: number;
};

// All server state, in one place.
let cfg: ServerConfig;
let st: State;
let journal: Journal;
let server: net.Server;
let baseEnv: NodeJS.ProcessEnv;
const rt = newRuntime();
const inbox: Input[] = [];
let flushQueued = false;
let timer: NodeJS.Timeout | null = null;
let writeRetryMs = 0;
const procs = new Map<number, Proc>();     // processes of running jobs, by job id
let launcher: ChildProcess | null = null;
let watchedCheck: NodeJS.Timeout | null = null;
let voidsKept = false;                     // void claims wait in run/ for earlier launchers to end
let runDirWatch: fs.FSWatcher | null = null;
const waiters = new Set<Waiter>();
const followers = new Set<Follower>();
let shuttingDown = false;
let argSpace = 0;                          // bytes an exec leaves for a job's argv (see argSpaceOf)

const log = (msg: string) => process.stdout.write(`${new Date().toISOString()} ${msg}\n`);

function submit(input: Input): void {
  inbox.push(input);
  if (!flushQueued) { flushQueued = true; setImmediate(flush); }
}
const fact = (ev: Event) => submit({ kind: 'fact', ev });

// ---- the operation table --------------------------------------------------------

/** Every request the socket takes, and how it is served:
 *    read      answered at once from the state
 *    change    decided in the next flush, answered once its events are on disk
 *    check     I/O first (ssh logins, executable scripts), then decided like a change
 *    stream    answered over time (list in chunks, wait, log -f)
 *    shutdown  the server stops once the answer is out
 *  The client's COMMANDS table is the other end of most of these. */
type Op =
  | { kind: 'read'; answer: (req: Request) => Record<string, unknown> }
  | { kind: 'change'; decide: Decide }
  | { kind: 'check'; check: (req: Request) => Promise<Request>; decide: Decide }
  | { kind: 'stream'; open: (req: Request, conn: Conn) => void }
  | { kind: 'shutdown' };

const serverInfo = () => ({ pid: process.pid, dataDir: cfg.dataDir, logDir: cfg.logDir });

const OPS: Record<string, Op> = {
  ping: { kind: 'read', answer: serverInfo },
  status: { kind: 'read', answer: () => ({ server: serverInfo(), ...statusView(st, rt.health) }) },
  list: { kind: 'stream', open: streamJobs },
  log: { kind: 'stream', open: openLog },
  wait: { kind: 'stream', open: openWait },
  add_jobs: { kind: 'check', check: checkScripts, decide: decideAddJobs },
  remove_jobs: { kind: 'change', decide: decideRemoveJobs },
  kill: { kind: 'change', decide: decideKill },
  retry: { kind: 'change', decide: decideRetry },
  clean: { kind: 'change', decide: decideClean },
  set_priority: { kind: 'change', decide: decideSetPriority },
  pause: { kind: 'change', decide: decidePause },
  resume: { kind: 'change', decide: decidePause },
  policy: { kind: 'change', decide: decidePolicy },
  add_workers: { kind: 'check', check: checkLogins, decide: decideAddWorkers },
  remove_workers: { kind: 'change', decide: decideRemoveWorkers },
  stop: { kind: 'shutdown' },
};

/** One request line: parsed, looked up in OPS, served by its kind. Never throws. */
function handleRequestLine(line: string, conn: Conn): void {
  let req: Request;
  try {
    if (line.length > 1 << 20 && containers(line) > line.length / 8) throw new Error('too many arrays and objects');
    const v = JSON.parse(line);
    if (!v || typeof v !== 'object' || Array.isArray(v) || typeof v.op !== 'string') throw new Error('no op');
    req = v;
  } catch {
    conn.send({ ok: false, code: EXIT_USAGE, error: 'malformed request: expected one JSON object with an "op" per line' });
    return;
  }
  const op = Object.hasOwn(OPS, req.op) ? OPS[req.op] : undefined;
  try {
    if (!op) throw usage(`unknown request ${quoteForError(req.op)}`);
    switch (op.kind) {
      case 'read': return conn.send({ ok: true, ...op.answer(req) });
      case 'change': return submit({ kind: 'request', req, decide: op.decide, reply: conn.send });
      case 'check': return void op.check(req).then(
        (checked) => submit({ kind: 'request', req: checked, decide: op.decide, reply: conn.send }),
        (e) => sendError(conn.send, e));
      case 'stream': return op.open(req, conn);
      case 'shutdown': return void conn.sock.end(JSON.stringify({ ok: true, pid: process.pid }) + '\n', () => shutdown('stop requested'));
    }
  } catch (e) {
    sendError(conn.send, e);
  }
}

/** How many arrays and objects a request line may open at the most (an upper bound: it
 *  counts brackets in strings too). JSON.parse of `[[],[],...]` allocates about twenty
 *  times the bytes it reads; real requests open one array per job. */
function containers(line: string): number {
  let n = 0;
  for (let i = line.indexOf('['); i >= 0; i = line.indexOf('[', i + 1)) n++;
  for (let i = line.indexOf('{'); i >= 0; i = line.indexOf('{', i + 1)) n++;
  return n;
}

function sendError(reply: Reply, e: unknown): void {
  const err = asUserError(e);
  reply({ ok: false, error: err.message, hint: err.hint, code: err.code });
}

/** add_jobs, before deciding: every script is an executable regular file. */
async function checkScripts(req: Request): Promise<Request> {
  const seen = new Set<string>();
  for (const spec of Array.isArray(req.jobs) ? req.jobs : []) {
    const script = Array.isArray(spec) ? spec[0] : undefined;
    if (typeof script !== 'string' || !path.isAbsolute(script) || seen.has(script)) continue;
    seen.add(script);
    checkExecutable(script, script);
  }
  return req;
}

/** add_workers, before deciding: unless told to skip it, ssh logs in to every host (in
 *  parallel); if any fails, none is added. */
async function checkLogins(req: Request): Promise<Request> {
  const workers = workerSpecs(req);
  if (req.skipCheck === true) return { ...req, workers };
  const outs = workers.map(() => ({ out: '' }));
  const sent = Date.now();
  const errs = await Promise.all(workers.map((w, i) => probeHost(w.host, cfg.ssh, w.slots, w.auto ? SIZE_COMMAND : 'true', outs[i])));
  const bad = workers.flatMap((w, i) => (errs[i] === null ? [] : [`${quoteForError(w.host)} (${errs[i]})`]));
  if (!bad.length) for (const w of workers) answered(w.host, sent);
  if (bad.length) throw failure(`ssh login check failed for ${bad.join(', ')}; no worker added`, 'check with: ssh -o BatchMode=yes HOST true (keys, known_hosts), or add with --skip_ssh_auth_check');
  workers.forEach((w, i) => {
    if (!w.auto) return;
    const size = parseSize(outs[i].out);
    if (!size) throw failure(`cannot read the size of ${quoteForError(w.host)}: nproc printed ${quoteForError(outs[i].out.split('\n')[0] ?? '')}`, 'give the slots with HOST:N or --slots N');
    w.slots = size.cpus; w.gpus = size.gpus; w.auto = false;
  });
  return { ...req, workers };
}

/** Throws unless `abs` is an executable regular file; errors name it as `shown`. */
function checkExecutable(abs: string, shown: string, where = ''): void {
  let stat: fs.Stats;
  try { stat = fs.statSync(bytesOf(abs)); } catch { throw failure(`no such script ${quoteForError(shown)}${where}`); }
  if (!stat.isFile()) throw failure(`not a file: ${quoteForError(shown)}${where}`);
  try { fs.accessSync(bytesOf(abs), fs.constants.X_OK); } catch {
    throw failure(`script is not executable: ${quoteForError(shown)}${where}`, `make it executable with: chmod +x ${shellQuote(shown)}`);
  }
}

const asUserError = (e: unknown) => (e instanceof UserError ? e : new UserError(EXIT_FAILED, `internal error: ${(e as Error)?.message ?? String(e)}`));
const logFile = (id: number) => path.join(cfg.logDir, `${id}.log`);

// ---- the flush loop ------------------------------------------------------------

/** What one flush collects before it writes: journal lines, answers, effects. */
type Turn = { lines: string[]; answers: { reply: Reply; answer: Record<string, unknown> }[]; effects: Effect[]; facts: Event[]; touched: Set<number> | null };

/** Applies an event, numbers it for the journal, and notes its effects. */
function commit(turn: Turn, ev: Event): void {
  const cascades = st.cascades;
  applyEvent(st, ev);
  st.seq++;
  turn.lines.push(JSON.stringify({ n: st.seq, ...ev }));
  for (const fx of effectsOf(st, ev)) turn.effects.push(fx);
  if (waiters.size && turn.touched) { // only `wait` clients need to know which jobs changed
    const ids = st.cascades !== cascades ? 'all' : touchedBy(ev); // jobs failed for a dependency: any
    if (ids === 'all') turn.touched = null; else for (const id of ids) turn.touched.add(id);
  }
}

/** Ids of the jobs an event touches (for wait), or 'all'. */
function touchedBy(ev: Event): number[] | 'all' {
  switch (ev.e) {
    case 'add': return Array.from({ length: addCount(ev) }, (_, i) => ev.id + i);
    case 'remove': case 'kill': case 'retry': case 'priority': return ev.ids;
    case 'start': case 'unstart': case 'end': return [ev.id];
    case 'clean': return 'all';
    default: return [];
  }
}

/** One turn of the server. Nothing leaves it before its events are on disk:
 *    1. inputs to events: facts as they are, requests through their op's decision
 *    2. the scheduler's plan: timeouts, SIGKILLs, probes, starts, the next deadline
 *    3. append the events and fdatasync them (group commit)
 *    4. answer the requests
 *    5. carry out the effects
 *    6. arm the one timer for the plan's next deadline */
function flush(): void {
  flushQueued = false;
  if (shuttingDown) return;
  const now = Date.now();
  const turn: Turn = { lines: [], answers: [], effects: [], facts: [], touched: new Set() };
  for (const input of inbox.splice(0)) {
    if (input.kind === 'fact') { turn.facts.push(input.ev); commit(turn, input.ev); }
    else if (input.kind === 'request') {
      try {
        const d = input.decide(st, input.req, { now, killGraceMs: cfg.killGraceMs, argSpace });
        for (const ev of d.events) commit(turn, ev);
        if (d.effects) turn.effects.push(...d.effects);
        turn.answers.push({ reply: input.reply, answer: d.answer });
      } catch (e) {
        sendError(input.reply, e);
      }
    }
  }
  const p = plan(st, rt, now, cfg.killGraceMs, { heartbeatMs: cfg.ssh.heartbeatMs, probeMaxMs: cfg.probeMaxMs });
  for (const ev of p.events) {
    if (ev.e === 'probe' && !ev.ok) log(`worker ${ev.host} is down: ${ev.err}`);
    commit(turn, ev);
  }
  turn.effects.push(...p.effects);
  if (turn.lines.length) {
    try {
      journal.append(turn.lines.join('\n') + '\n');
      writeRetryMs = 0;
    } catch (e) {
      return recoverFromWriteFailure(e as NodeJS.ErrnoException, turn);
    }
  }
  for (const a of turn.answers) a.reply({ ok: true, ...a.answer });
  for (const fx of turn.effects) perform(fx);
  flushLaunches();
  if (turn.lines.length) notifyWatchers(now, turn.touched);
  if (journal.needsSnapshot()) takeSnapshot();
  armTimer(p.next);
}

/** The journal could not be written (disk full, read-only): memory is ahead of the
 *  disk, so reload the state from disk, refuse the requests of the turn, drop its
 *  effects, and retry the facts (processes did end; probes did answer) with a growing
 *  delay. */
function recoverFromWriteFailure(e: NodeJS.ErrnoException, turn: Turn): void {
  const what = `cannot write the journal '${path.join(cfg.dataDir, 'journal')}': ${e.message}`;
  log(`error: ${what}; ${turn.answers.length} request(s) refused, ${turn.facts.length} outcome(s) kept for retry`);
  try {
    st = loadState(cfg.dataDir, journal.size).state;
  } catch (e2) {
    log(`fatal: cannot reload the state after a failed write: ${(e2 as Error).message}; running jobs keep running`);
    process.exit(1);
  }
  for (const a of turn.answers) a.reply({ ok: false, code: EXIT_FAILED, error: what, hint: 'nothing was changed; free space or fix the data dir, then try again' });
  writeRetryMs = Math.min(30_000, writeRetryMs ? writeRetryMs * 2 : 250);
  setTimeout(() => { for (const ev of turn.facts) fact(ev); submit({ kind: 'tick' }); }, writeRetryMs);
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

/** Sets the one timer to the next deadline the plan named. */
function armTimer(next: number): void {
  if (timer) { clearTimeout(timer); timer = null; }
  if (next === Infinity) return;
  timer = setTimeout(() => { timer = null; submit({ kind: 'tick' }); }, Math.max(0, Math.min(next - Date.now(), 2 ** 31 - 1)));
}

/** Carries out one effect of a turn whose events are on disk. */
function perform(fx: Effect): void {
  switch (fx.kind) {
    case 'launch': return launchJob(fx.id);
    case 'signal':
      if (fx.sig === 'SIGKILL') rt.killSent.add(fx.id);
      return signalJob(fx.id, fx.sig);
    case 'probe':
      rt.probing.add(fx.host);
      return runProbe(fx.host);
    case 'heartbeat': return runHeartbeat(fx.host);
    case 'forget-run': return fs.unlink(runFile(cfg.dataDir, fx.id, fx.run), () => {});
    case 'remove-logs': for (const id of fx.ids) fs.rm(logFile(id), { force: true }, () => {}); return;
  }
}

// ---- the process supervisor ----------------------------------------------------

function ensureLauncher(): ChildProcess {
  if (launcher) return launcher;
  const { env, args } = launcherArgs(baseEnv, cfg.dataDir, cfg.logDir, process.pid);
  const l = spawn('perl', args, { detached: true, stdio: ['pipe', 'pipe', 'inherit'], env });
  l.stdin!.on('error', () => {});
  onLines(l.stdout!, launcherSaid);
  l.on('exit', () => launcherGone(l));
  l.on('error', (e) => { log(`error: cannot run the job launcher (perl): ${e.message}`); launcherGone(l); });
  launcher = l;
  return l;
}

/** Hands a job whose start is on disk to the launcher. */
function launchJob(id: number): void {
  const job = st.jobs.get(id);
  if (!job || job.state !== 'running' || job.worker === null) return;
  const attempt = attemptsOf(job);
  let marker = '';
  if (attempt > 1) {
    const prev = job.history?.at(-1);
    const was = prev ? `; attempt ${prev.n} on ${prev.worker}: ${prev.reason ?? `exit ${prev.exitCode}`}` : '';
    marker = `\n--- djs: attempt ${attempt} of job ${id} on ${job.worker} slot ${job.slot}, ${iso(Date.now())}${was} ---\n`;
  }
  procs.set(id, { run: job.run, pid: 0, how: 'launched', failed: null, signal: null, began: 0 });
  // The worker's environment, then the job's own (which wins), then the slots and GPUs,
  // and the shared ssh connection of its (first) slot.
  const env = [...(st.workers.get(job.worker)?.env ?? NO_ARGS), ...(job.env ?? NO_ARGS), `SLAVE_SLOTS=${slotsOf(job).join(',')}`, `SLAVE_GPUS=${(job.gpus ?? NO_IDS).join(',')}`];
  if (cfg.ssh.shared) env.push(`DJS_SSH_SHARED_CONFIG=${sharedConfigFile(cfg.ssh, connectionOf(job.slot, cfg.ssh))}`);
  launches.push(launchRecord({
    id, run: job.run, slot: job.slot, attempt, cwd: job.cwd, marker, worker: job.worker, env, script: job.script, args: job.args,
  }));
}
const launches: Buffer[] = [];

/** Hands the turn's launches to the launcher in one write. */
function flushLaunches(): void {
  if (launches.length === 0) return;
  ensureLauncher().stdin!.write(launches.length === 1 ? launches[0] : Buffer.concat(launches));
  launches.length = 0;
}

/** What the launcher says (see LAUNCHER): a run's pid, why it failed to start, its end. */
function launcherSaid(line: string): void {
  const [kind, idText, runText, what] = line.split(' ');
  const id = Number(idText), p = procs.get(id);
  if (!p || p.how !== 'launched' || p.run !== Number(runText)) return;
  if (kind === 's') {
    p.pid = Number(what);
    p.began = Date.now();
    if (p.signal) { signalGroup(p.pid, p.signal); p.signal = null; }
  } else if (kind === 'f') {
    p.failed = what;
  } else if (kind === 'x') {
    procs.delete(id);
    // The scheduler's own trouble (its run dir or log dir) is not the job's: it goes back
    // to the queue uncharged. A directory the job needs that is gone is the job's.
    if (p.failed === 'taken' || p.failed === 'nowrite') return startFailed(id, `its run file ${runFile(cfg.dataDir, id, p.run)} could not be created (is the data dir's disk full?)`);
    if (p.failed === 'log') return startFailed(id, `its log ${logFile(id)} could not be opened (is the log dir there and writable, and the log a plain file?)`);
    if (p.failed) return ended(id, p, null, `cannot start: cannot enter ${st.jobs.get(id)?.cwd ?? 'its directory'} (does it still exist?)`);
    if (rt.startFailures > 0) log(`jobs start again after ${rt.startFailures} failed start(s)`);
    rt.startFailures = 0;
    ended(id, p, Number(what));
  }
}

/** A start that failed for the scheduler's own reasons: the job never ran, so it goes
 *  back to the queue uncharged, behind the others (so that one job whose log cannot be
 *  opened does not hold up the rest), and starts pause (pauseStarts). */
function startFailed(id: number, why: string): void {
  const delay = pauseStarts(rt, Date.now());
  // Once per episode: the pauses that follow grow up to a minute.
  if (rt.startFailures === 1) log(`error: job ${id} did not start: ${why}; it is queued again, and starts pause (${delay} ms, growing while this lasts)`);
  try { fs.mkdirSync(path.join(cfg.dataDir, 'run'), { recursive: true, mode: 0o700 }); } catch { /* the next failure says so */ }
  fact({ e: 'unstart', t: Date.now(), id, back: true });
}

/** Records that a job's run ended, and forgets its process. */
function ended(id: number, p: Proc, code: number | null, why?: string, at?: number): void {
  if (procs.get(id) === p) procs.delete(id);
  rt.killSent.delete(id);
  const t = Math.round(Math.min(Date.now(), at ?? Infinity));
  const ev: Extract<Event, { e: 'end' }> = { e: 'end', t, id, run: p.run, code };
  if (why) ev.why = why;
  // When the launcher forked it: a start that waited in the launcher's input (a busy
  // machine, a burst of starts) does not count in the job's run time.
  if (p.began > 0) ev.began = p.began;
  fact(ev);
}

/** The launcher ended under a running server (killed): the runs it forked go on by
 *  themselves, so they are watched through their run files from now on; a new launcher
 *  starts with the next job. */
function launcherGone(l: ChildProcess): void {
  if (launcher !== l) return; // already handled (an error and an exit both come)
  launcher = null;
  if (shuttingDown) return;
  log('warning: the job launcher ended; the jobs it started are watched through their run files');
  pauseStarts(rt, Date.now()); // a launcher that cannot run must not spin through the queue
  for (const p of procs.values()) if (p.how === 'launched') p.how = 'watched';
  checkWatched();
}

/** Finds out what became of every watched run (checkRun) and acts on it: a run that
 *  ended is recorded; one never claimed is claimed for the server and its job queued
 *  again; one still running keeps being watched. While any run is watched, the run dir
 *  is watched for exit codes being written, and — a deliberate poll, since nothing
 *  tells this process when a process that is not its child dies — every run is checked
 *  again every WATCH_MS. */
function checkWatched(only?: number): void {
  for (const [id, p] of procs) {
    if (p.how !== 'watched' || (only !== undefined && id !== only)) continue;
    const r = checkRun(cfg.dataDir, id, p.run);
    if (r.is === 'running') {
      p.pid = r.pid;
      if (p.signal) { signalGroup(p.pid, p.signal); p.signal = null; }
    } else if (r.is === 'ended') {
      const job = st.jobs.get(id);
      let code = r.code;
      if (code === null && rt.killSent.has(id)) code = 128 + 9; // SIGKILLed by us, launcher and all
      ended(id, p, code, code === null && !job?.killing ? 'lost: its process ended and no exit code was recorded (its launcher was killed?)' : undefined, r.at);
    } else if (r.is === 'unclaimed') {
      let claimed: boolean;
      try { claimed = voidRun(cfg.dataDir, id, p.run); } catch (e) { log(`error: cannot claim run ${id}.${p.run}: ${(e as Error).message}; trying again`); continue; }
      if (!claimed) continue; // a process claimed it meanwhile: the next check finds it
      procs.delete(id);
      voidsKept = true;
      log(`job ${id} was about to start when its start was cut short; queued again`);
      fact({ e: 'unstart', t: Date.now(), id });
    } else {
      log(`warning: cannot check on job ${id}: ${r.why}; trying again`);
    }
  }
  const watching = [...procs.values()].some((p) => p.how === 'watched');
  if ((watching || voidsKept) && !watchedCheck) {
    watchedCheck = setInterval(() => { checkWatched(); if (voidsKept) sweepRunDir(); }, WATCH_MS);
  }
  if (watching && !runDirWatch) {
    try {
      runDirWatch = fs.watch(path.join(cfg.dataDir, 'run'), (_ev, name) => {
        const m = /^(\d+)\.\d+\.pid$/.exec(String(name ?? ''));
        if (m && procs.get(Number(m[1]))?.how === 'watched') checkWatched(Number(m[1]));
      });
    } catch { /* the poll still checks */ }
  }
  if (!watching && runDirWatch) { runDirWatch.close(); runDirWatch = null; }
  if (!watching && !voidsKept && watchedCheck) { clearInterval(watchedCheck); watchedCheck = null; }
}
const WATCH_MS = 1000;

function signalJob(id: number, sig: NodeJS.Signals): void {
  const p = procs.get(id);
  if (!p) return;
  if (p.pid > 0) signalGroup(p.pid, sig);
  else p.signal = sig; // sent once the launcher (or the run file) says which pid it is
}

function runProbe(host: string): void {
  const sent = Date.now();
  probeHost(host, cfg.ssh, st.workers.get(host)?.slots).then((err) => {
    rt.probing.delete(host);
    const w = st.workers.get(host);
    if (!w) return;
    if (err === null ? w.state === 'down' : w.state === 'up') log(`worker ${host} is ${err === null ? 'up again' : `down: ${err}`}`);
    if (err === null) { answered(host, sent); fact({ e: 'probe', t: Date.now(), host, ok: true }); }
    else for (const ev of downEvents(st, host, Date.now(), err, cfg.probeMaxMs, cfg.killGraceMs)) fact(ev);
  });
}

/** A check of host sent at `sent` answered: the worker is fresh, nothing is missing. */
function answered(host: string, sent: number): void {
  const h = rt.health.get(host) ?? newHealth();
  h.okAt = Math.max(h.okAt, sent); h.missingSince = 0; h.err = null;
  rt.health.set(host, h);
}

/** One heartbeat of a worker that is up (see plan): an answer is kept in the runtime
 *  (nothing goes to the journal), a failure takes the worker down; then the scheduler
 *  is asked again. */
function runHeartbeat(host: string): void {
  const h = rt.health.get(host) ?? newHealth();
  const sent = Date.now();
  h.busy = true; h.sentAt = sent;
  if (h.missingSince === 0) h.missingSince = sent;
  rt.health.set(host, h);
  probeHost(host, cfg.ssh, st.workers.get(host)?.slots).then((err) => {
    h.busy = false;
    if (err === null) answered(host, sent);
    else {
      // ssh said no (refused, or no answer within its timeout): down, as a failed probe
      // takes it; a check that just hangs counts against the limit (see plan).
      h.err = err;
      const w = st.workers.get(host);
      if (w && w.ssh && w.state === 'up') {
        log(`worker ${host} is down: ${err}`);
        for (const ev of downEvents(st, host, Date.now(), err, cfg.probeMaxMs, cfg.killGraceMs)) fact(ev);
      }
    }
    submit({ kind: 'tick' });
  });
}

// ---- streams: list, wait, log -f ------------------------------------------------

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
      if (w.hosts.every((h) => !st.workers.has(h))) { w.done(); w.send({ ok: true }); }
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
      w.done();
      w.send({ ok: true, counts: c, allDone: c.done === c.total });
    } else if (now - w.lastSent >= 250) {
      const c = waitCounts(w);
      const key = `${c.waiting}/${c.running}/${c.done}/${c.failed}/${c.killed}`;
      if (key !== w.lastKey) { w.lastKey = key; w.lastSent = now; w.send({ progress: c }); }
    }
  }
  for (const f of followers) {
    const job = st.jobs.get(f.id);
    if (!job || isFinished(job.state)) { f.done(); f.send({ ok: true, state: job?.state ?? 'removed', exitCode: job?.exitCode ?? null }); }
  }
}

/** wait {ids} | {tag} | {hosts}: answers when those jobs (all, without ids) have finished, or
 *  those workers are gone; progress lines meanwhile. */
function openWait(req: Request, conn: Conn): void {
  let ids: Set<number> | null = null;
  if (Array.isArray(req.ids) && req.ids.length) {
    ids = new Set(req.ids.map((x) => num(x, 'job id', 1)));
    for (const id of ids) jobOrFail(st, id);
  } else if (req.tag !== undefined) {
    // The tag's jobs as of now: wait --tag T returns once they have all ended.
    tagKnown(st, req);
    const tag = tagOf(req.tag);
    ids = new Set();
    for (const job of st.jobs.values()) if (job.tags.includes(tag)) ids.add(job.id);
  }
  const hosts = Array.isArray(req.hosts) ? req.hosts.map(String) : null;
  const w: Waiter = { ids, pending: ids && new Set([...ids].filter(unfinished)), hosts, send: conn.send, lastSent: 0, lastKey: '', done: () => {} };
  watchUntilClose(conn, waiters, w);
  notifyWatchers(Date.now(), new Set());
}

/** Adds a wait or log -f to `set` for as long as it lasts: its `done` takes it out, as
 *  the connection's close does; either way the close listener goes, so a connection
 *  that asks many times in a row keeps none behind. */
function watchUntilClose<T extends { done: () => void }>(conn: Conn, set: Set<T>, item: T): void {
  const drop = () => { set.delete(item); conn.sock.off('close', drop); };
  item.done = drop;
  set.add(item);
  conn.sock.on('close', drop);
}

/** log {id, follow}: where the job's log is; with follow, a last line when it ends. */
function openLog(req: Request, conn: Conn): void {
  const job = jobOrFail(st, num(req.id, 'job id', 1));
  const info = { path: logFile(job.id), state: job.state, exitCode: job.exitCode };
  if (req.follow !== true || isFinished(job.state)) return conn.send({ ok: true, ...info });
  conn.send({ info });
  const f: Follower = { id: job.id, send: conn.send, done: () => {} };
  watchUntilClose(conn, followers, f);
}

/** list {state}: rows in chunks, waiting for the socket to drain, so a million jobs
 *  need neither one giant string nor a blocked server. */
function streamJobs(req: Request, conn: Conn): void {
  const state = req.state;
  if (state !== undefined && !JOB_STATES.includes(state as JobState)) throw usage(`unknown state ${quoteForError(String(state))}`, `states are ${JOB_STATES.join(', ')}`);
  const tag = req.tag === undefined ? undefined : tagOf(req.tag);
  const it = st.jobs.values(), sock = conn.sock;
  const now = Date.now(), queue = queueReason(st);
  const pump = () => {
    for (;;) {
      const rows: JobView[] = [];
      for (let r = it.next(); !r.done; r = it.next()) {
        if ((state === undefined || r.value.state === state) && (tag === undefined || r.value.tags.includes(tag))) rows.push(jobView(st, r.value, now, queue));
        if (rows.length >= 2000) break;
      }
      if (rows.length === 0) { sock.end(JSON.stringify({ ok: true }) + '\n'); return; }
      if (!sock.write(JSON.stringify({ rows }) + '\n')) { sock.once('drain', pump); return; }
    }
  };
  pump();
}

// ---- the socket ------------------------------------------------------------------

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

/** What one client may cost the server: a request line of at most MAX_REQUEST_BYTES
 *  (more, even unfinished or queued, is refused and the connection closed); answers it
 *  does not read up to MAX_UNREAD_BYTES (then the connection is closed); and no more
 *  than cfg.maxConnections connections at once (then the one idle the longest goes). */
const MAX_REQUEST_BYTES = 16 << 20;
const MAX_UNREAD_BYTES = 64 << 20;
const connections = new Set<Conn>();

function onConnection(sock: net.Socket): void {
  const conn: Conn = {
    sock, busy: false, lastActive: Date.now(),
    send: (msg) => {
      if (sock.destroyed) return;
      if (sock.writableLength > MAX_UNREAD_BYTES) { sock.destroy(); return; } // it does not read
      sock.write(JSON.stringify(msg) + '\n');
      if (msg.ok !== undefined && conn.busy) { conn.busy = false; conn.lastActive = Date.now(); setImmediate(next); }
    },
  };
  sock.on('error', () => {});
  sock.on('close', () => connections.delete(conn));
  if (!admit(conn)) return;
  const lines: Buffer[] = [];
  let parts: Buffer[] = [], partBytes = 0, queuedBytes = 0;
  const refuse = (what: string) => {
    sock.removeAllListeners('data');
    lines.length = 0;
    if (!sock.destroyed) sock.end(JSON.stringify({ ok: false, code: EXIT_USAGE, error: what }) + '\n');
  };
  const next = () => {
    while (!conn.busy && lines.length && !sock.destroyed) {
      const line = lines.shift()!;
      queuedBytes -= line.length;
      conn.busy = true;
      conn.lastActive = Date.now();
      handleRequestLine(line.toString('utf8'), conn);
    }
    if (lines.length) sock.pause(); else if (!sock.destroyed) sock.resume();
  };
  sock.on('data', (chunk: Buffer) => {
    let start = 0, nl: number;
    while ((nl = chunk.indexOf(10, start)) >= 0) {
      const piece = chunk.subarray(start, nl);
      const line = parts.length ? Buffer.concat([...parts, piece]) : Buffer.from(piece);
      parts = []; partBytes = 0;
      start = nl + 1;
      if (line.length > MAX_REQUEST_BYTES) return refuse(`request over ${MAX_REQUEST_BYTES >> 20} MiB`);
      lines.push(line);
      queuedBytes += line.length;
    }
    if (start < chunk.length) { parts.push(chunk.subarray(start)); partBytes += chunk.length - start; }
    if (partBytes > MAX_REQUEST_BYTES || queuedBytes > MAX_REQUEST_BYTES) return refuse(`request over ${MAX_REQUEST_BYTES >> 20} MiB`);
    next();
  });
}

/** Takes a new connection in, closing the connection idle the longest when there are
 *  cfg.maxConnections already; if none is idle, the new one is refused. */
function admit(conn: Conn): boolean {
  if (connections.size >= cfg.maxConnections) {
    let oldest: Conn | undefined;
    for (const c of connections) if (!c.busy && (!oldest || c.lastActive < oldest.lastActive)) oldest = c;
    if (!oldest) {
      conn.sock.end(JSON.stringify({ ok: false, code: EXIT_FAILED, error: `the server has ${cfg.maxConnections} busy connections`, hint: 'try again later' }) + '\n');
      return false;
    }
    oldest.sock.destroy();
    connections.delete(oldest);
  }
  connections.add(conn);
  return true;
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
 *  Abstract sockets have no permissions and their names are listed in /proc/net/unix
 *  for every user to see, so another user can bind the name a server used once it has
 *  stopped. Hence the holder must prove itself: the name is a hash of a random token kept
 *  in the (0700) data dir with the dir's device and inode (a copy of the dir is another
 *  dir), and a start that finds the name taken sends the holder a random challenge that
 *  only a process that can read the token answers (an HMAC of it). A holder that cannot
 *  answer is a squatter: the token is replaced, which gives a new name. The name fills
 *  the whole address (108 bytes), the one form Node 20 and later versions bind alike.
 *  Elsewhere than Linux the pid file alone decides. */
async function holdDirLock(dataDir: string): Promise<void> {
  if (process.platform !== 'linux') return;
  const tokenFile = path.join(dataDir, 'lock.token');
  try { fs.writeFileSync(tokenFile, crypto.randomBytes(16).toString('hex') + '\n', { flag: 'wx', mode: 0o600 }); } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
  }
  for (let tries = 0; ; tries++) {
    const token = fs.readFileSync(tokenFile, 'utf8').trim();
    const dir = fs.statSync(dataDir);
    const name = `\0djs-${crypto.createHash('sha256').update(`${token}-${dir.dev}-${dir.ino}`).digest('hex')}-`.padEnd(108, 'x');
    const answer = (nonce: string) => crypto.createHmac('sha256', token).update(nonce).digest('hex');
    const lock = net.createServer((c) => {
      c.on('error', () => {});
      c.setTimeout(2000, () => c.destroy());
      onLines(c, (nonce) => c.end(answer(nonce) + '\n'));
    });
    try {
      await new Promise<void>((resolve, reject) => {
        lock.once('error', reject);
        lock.listen(name, () => resolve());
      });
      lock.unref();
      return;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EADDRINUSE') return;
    }
    const nonce = crypto.randomBytes(16).toString('hex');
    const reply = await new Promise<string>((resolve) => {
      const c = net.connect(name);
      let got = '';
      c.setTimeout(2000, () => c.destroy());
      c.on('connect', () => c.write(nonce + '\n'));
      c.on('data', (d) => { got += d; });
      c.on('error', () => {});
      c.on('close', () => resolve(got.trim()));
    });
    if (reply === answer(nonce)) {
      const pid = liveServerPid(dataDir);
      throw failure(`a server is already running on data dir '${dataDir}'${pid ? ` (pid ${pid})` : ''}`, 'stop it first with: cli.ts stop');
    }
    if (tries >= 2) throw failure(`cannot take the lock of data dir '${dataDir}': its name is held by a process that is not a djs server of yours`);
    process.stderr.write(`warning: the lock name of data dir '${dataDir}' is held by a process that cannot prove it is a djs server of yours; taking a new one\n`);
    const tmp = `${tokenFile}.${process.pid}`;
    fs.writeFileSync(tmp, crypto.randomBytes(16).toString('hex') + '\n', { flag: 'wx', mode: 0o600 });
    fs.renameSync(tmp, tokenFile);
  }
}

/** Where the socket of a data dir is, and how to reach it when its absolute path is too
 *  long for a Unix socket (about 107 bytes): by a path relative to the data dir. */
function socketPath(dataDir: string): { abs: string; usable: string; relative: boolean } {
  const abs = path.join(dataDir, 'server.sock');
  return Buffer.byteLength(abs) < 100 ? { abs, usable: abs, relative: false } : { abs, usable: 'server.sock', relative: true };
}

/** Makes `dir` (mode 0700, parents too) or checks the one that is there: a directory,
 *  this user's own, that no one else can write to. A directory another user made (in
 *  /tmp or a shared scratch dir, say) could hold files the server would trust, or take
 *  the place of ones it writes; so this runs before anything in it is read or written. */
export function ownDir(dir: string, what: string): void {
  try { fs.mkdirSync(dir, { recursive: true, mode: 0o700 }); } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw failure(`cannot create the ${what} '${dir}': ${(e as Error).message}`);
  }
  checkOwnDir(dir, what);
}

/** Throws unless `dir` (or the symlink that names it, and its target) is a directory of
 *  this user's that no one else can write to. */
export function checkOwnDir(dir: string, what: string): void {
  const uid = process.getuid?.();
  if (uid === undefined) return;
  const link = fs.lstatSync(dir);
  const stat = link.isSymbolicLink() ? fs.statSync(dir) : link;
  if (!stat.isDirectory()) throw failure(`the ${what} '${dir}' is not a directory`);
  for (const [s, name] of [[link, dir], [stat, dir]] as const) {
    if (s.uid !== uid) throw failure(`the ${what} '${name}' belongs to user ${s.uid}, not to you (user ${uid})`, 'someone else made it; choose another directory, or have it removed');
  }
  if (stat.mode & 0o022) throw failure(`the ${what} '${dir}' can be written by others (mode ${(stat.mode & 0o777).toString(8)})`, `make it yours alone with: chmod go-w ${shellQuote(dir)}`);
}

/** The bytes an exec of a job leaves for its argv: ARG_MAX (getconf; 2 MiB where it
 *  cannot be asked) less the environment a job gets and a margin for the variables djs
 *  adds (JOB_ID, SLAVE_IP, ...). */
function argSpaceOf(env: NodeJS.ProcessEnv): number {
  const r = spawnSync('getconf', ['ARG_MAX'], { encoding: 'utf8' });
  const argMax = Number(r.stdout) > 0 ? Number(r.stdout) : 2 << 20;
  let envBytes = 0;
  for (const [k, v] of Object.entries(env)) envBytes += Buffer.byteLength(k) + Buffer.byteLength(v ?? '') + 2 + 8;
  return Math.max(0, argMax - envBytes - 4096);
}

/** Jobs start through perl (see LAUNCHER): refuses to start without perl 5.10 or newer
 *  and its Fcntl module. */
function checkPerl(): void {
  const r = spawnSync('perl', ['-e', 'use Fcntl qw(O_NOFOLLOW); print $] >= 5.010 ? "ok" : $]'], { encoding: 'utf8', env: { PATH: process.env.PATH } });
  if (r.error) throw failure(`cannot run perl, which starts the jobs: ${r.error.message}`, 'install perl 5.10 or newer (Debian and Ubuntu always have it; elsewhere the package is perl or perl-interpreter)');
  if (r.stdout !== 'ok') throw failure(`perl 5.10 or newer with Fcntl is needed to start jobs; this perl says '${(r.stdout + r.stderr).trim().split('\n')[0]}'`);
}

async function runServer(config: ServerConfig): Promise<void> {
  cfg = config;
  checkPerl();
  ownDir(cfg.dataDir, 'data dir');
  // One spelling of the data dir for everything that names it (jobs' DJS_DATA_DIR, the
  // launcher's argv), whatever symlink the start went through.
  cfg = { ...cfg, dataDir: fs.realpathSync(cfg.dataDir) };
  fs.chmodSync(cfg.dataDir, 0o700);
  ownDir(path.join(cfg.dataDir, 'run'), 'run dir');
  if (cfg.ssh.shared) {
    cfg.ssh.controlDir = controlDirFor(cfg.dataDir, process.getuid?.() ?? 0, process.env.TMPDIR || '/tmp');
    ownDir(cfg.ssh.controlDir, 'ssh control dir');
    fs.chmodSync(cfg.ssh.controlDir, 0o700);
  }
  ownDir(cfg.logDir, 'log dir');
  await holdDirLock(cfg.dataDir); // held until this process ends
  lockDataDir(cfg.dataDir);
  try {
    const loaded = loadState(cfg.dataDir);
    // Two starts that both found a stale pid file can both think they took the dir:
    // check before writing anything, and again once the journal is open.
    if (liveServerPid(cfg.dataDir) !== process.pid) throw failure(`another server took data dir '${cfg.dataDir}' while this one started`);
    for (const w of loaded.warnings) process.stderr.write(`warning: ${w}\n`);
    st = loaded.state;
    journal = new Journal(cfg.dataDir, loaded.journalSize, loaded.snapshotSize, cfg.snapshotMinBytes);
    baseEnv = { ...process.env };
    argSpace = argSpaceOf(baseEnv);
    // A data dir of an earlier format is written anew in this one before anything is
    // appended to it, so no file mixes two versions.
    if (loaded.version < FORMAT_VERSION) journal.snapshot(st);
    sweepRunDir();
    watchRunningJobs();
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

/** Every job the journal says is running is watched (checkWatched): ended ones are
 *  recorded, live ones followed, ones whose start was cut short queued again. */
function watchRunningJobs(): void {
  for (const job of st.jobs.values()) {
    if (job.state === 'running') procs.set(job.id, { run: job.run, pid: 0, how: 'watched', failed: null, signal: null, began: 0 });
  }
  checkWatched();
}

/** Removes run files of runs that are not running (left by a crash after an end was
 *  recorded but before its file was removed). A server's `void` claim stays while a
 *  launcher of an earlier server lives: that launcher (stopped, say, with records still
 *  unread in its pipe) could otherwise claim the run and run the job a second time.
 *  Kept claims are swept again every WATCH_MS until no such launcher is left. */
function sweepRunDir(): void {
  const dir = path.join(cfg.dataDir, 'run');
  const keepVoid = otherLaunchers(cfg.dataDir);
  voidsKept = false;
  for (const name of fs.readdirSync(dir)) {
    const m = /^(\d+)\.(\d+)\.pid$/.exec(name);
    const job = m ? st.jobs.get(Number(m[1])) : undefined;
    if (job && job.state === 'running' && job.run === Number(m![2])) continue;
    if (keepVoid) { try { if (readRunFile(path.join(dir, name)).claim === 'void') { voidsKept = true; continue; } } catch { continue; } }
    fs.rmSync(path.join(dir, name), { force: true });
  }
}

/** True if a launcher of this data dir runs that is not this server's (or /proc cannot
 *  tell). */
function otherLaunchers(dataDir: string): boolean {
  if (!HAVE_PROC) return true;
  try {
    for (const name of fs.readdirSync('/proc')) {
      if (/^\d+$/.test(name) && Number(name) !== launcher?.pid && launcherAlive(Number(name), dataDir)) return true;
    }
    return false;
  } catch { return true; }
}

function shutdown(why: string): void {
  if (shuttingDown) return;
  if (inbox.length) flush(); // what was already asked is written and answered first
  shuttingDown = true;
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
    // A socket in a data dir someone else controls could be theirs: never talk to it.
    try { checkOwnDir(dataDir, 'data dir'); } catch (e) {
      return reject((e as NodeJS.ErrnoException).code === 'ENOENT' ? noServer(dataDir) : e);
    }
    let conn: net.Socket;
    if (sock.relative) {
      const here = process.cwd();
      try { process.chdir(dataDir); } catch { return reject(noServer(dataDir)); }
      try { conn = net.connect(sock.usable); } finally { process.chdir(here); }
    } else conn = net.connect(sock.usable);
    let settled = false;
    const settle = (fn: () => void) => { if (!settled) { settled = true; fn(); } };
    conn.on('connect', () => conn.write(JSON.stringify(msg) + '\n'));
    // A server that went away mid-request (reset, broken pipe) is a lost connection, which
    // the lasting commands (wait, log -f, remove_slave --wait) ride out like a close.
    conn.on('error', (e: NodeJS.ErrnoException) => settle(() => reject(
      e.code === 'ENOENT' || e.code === 'ECONNREFUSED' ? noServer(dataDir)
        : e.code === 'ECONNRESET' || e.code === 'EPIPE' ? new ConnectionLost(EXIT_FAILED, `the server went away: ${e.message}`)
        : failure(`cannot talk to the server: ${e.message}`))));
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
function parseCommand(args: string[], options: OptSpec, stopAtPositional: boolean, negatives = false): Parsed {
  const all = { ...GLOBAL_OPTIONS, ...options };
  if (negatives) {
    // Words like -5 are numbers here (set_priority -5 ID), not options: hidden from parseArgs
    // behind a NUL, which no command-line word can hold, and brought back after.
    const p = parseCommand(args.map((w) => (/^-\d+$/.test(w) ? `\0${w}` : w)), options, stopAtPositional);
    return { values: p.values, positionals: p.positionals.map((w) => (w.startsWith('\0') ? w.slice(1) : w)) };
  }
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
  out.push(`workers: ${s.workers.length}${s.workers.length ? `, policy ${s.policy}` : ' (add some with: cli.ts add_slave HOST)'}`);
  const width = Math.max(4, ...s.workers.map((w) => w.host.length));
  for (const w of s.workers) {
    const busy = new Set(w.running.map((r) => r.slot));
    const bar = '[' + Array.from({ length: Math.max(w.slots, ...w.running.map((r) => r.slot + 1)) }, (_, i) => (busy.has(i) ? '*' : '.')).join('') + ']';
    let state = c(STATE_COLORS[w.state], w.state.padEnd(8));
    if (w.checking) state = c('33', 'checking');
    let line = `  ${w.host.padEnd(width)}  ${bar}  ${state}`;
    if (w.gpus) line += `  gpus ${w.gpusUsed.length}/${w.gpus}`;
    if (w.labels.length) line += `  [${w.labels.join(',')}]`;
    if (w.running.length) line += `  ${[...new Set(w.running.map((r) => r.id))].join(' ')}`;
    if (w.state === 'down') line += `  ${w.error ?? ''}${w.nextProbeAt ? `; next check in ${formatDuration(Date.parse(w.nextProbeAt) - now)}` : ''}`;
    out.push(line.trimEnd());
  }
  if (s.paused || s.pausedTags.length) {
    out.push(`paused: ${[...(s.paused ? ['the queue (resume to start jobs again)'] : []), ...s.pausedTags.map((t) => `tag ${t}`)].join(', ')}`);
  }
  if (s.tags.length) {
    // The unfinished tags first; a screenful at most (status --json has them all).
    const shown = [...s.tags].sort((a, b) => Number(a.waiting + a.running === 0) - Number(b.waiting + b.running === 0)).slice(0, TAGS_SHOWN);
    out.push('tags:');
    const tw = Math.max(...shown.map((t) => t.tag.length));
    for (const t of shown) out.push(formatTagLine(t, tw, c));
    if (s.tags.length > shown.length) out.push(`  … and ${s.tags.length - shown.length} more tags (status --tag TAG, status --json)`);
  }
  if (s.queue.length) {
    out.push(`queue (${counts.waiting} waiting, next first):`);
    // A job that waits for a worker that fits it says so; the others wait their turn.
    const special = (q: StatusView['queue'][number]) => /^(no worker has|no worker up with|waiting for) /.test(q.waitingFor) ? `  (${q.waitingFor})` : '';
    for (const q of s.queue) out.push(`  ${String(q.id).padStart(6)}  ${formatDuration(now - Date.parse(q.queuedAt)).padStart(6)} ago  ${q.command}${special(q)}`);
    if (counts.waiting > s.queue.length) out.push(`  … and ${counts.waiting - s.queue.length} more`);
  }
  return out.join('\n') + '\n';
}

/** One tag's progress: a bar of its ended share, then its counts (as JuQueue shows an
 *  experiment). */
export function formatTagLine(t: StatusView['tags'][number], width: number, c: (code: string, s: string) => string): string {
  const ended = t.done + t.failed + t.killed, bar = 20;
  const full = t.total ? Math.round((ended / t.total) * bar) : 0;
  return `  ${t.tag.padEnd(width)}  [${'#'.repeat(full)}${'.'.repeat(bar - full)}] ${String(ended).padStart(String(t.total).length)}/${t.total}` +
    `  ${t.done} ${c(STATE_COLORS.done, 'done')}, ${t.failed} ${c(STATE_COLORS.failed, 'failed')}, ${t.killed} ${c(STATE_COLORS.killed, 'killed')}, ` +
    `${t.running} ${c(STATE_COLORS.running, 'running')}, ${t.waiting} ${c(STATE_COLORS.waiting, 'waiting')}${t.paused ? '  (paused)' : ''}`;
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
    String(j.id).padStart(6), c(STATE_COLORS[j.state], j.state.padEnd(7)), ((j.state === 'waiting' ? j.waitingFor : j.worker) ?? '-').padEnd(15), exit.padStart(7),
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
  const snapshotMinBytes = intOption(process.env.DJS_SNAPSHOT_MIN_BYTES, 'DJS_SNAPSHOT_MIN_BYTES', 1) ?? SNAPSHOT_MIN_JOURNAL_BYTES;
  const maxConnections = intOption(process.env.DJS_MAX_CONNECTIONS, 'DJS_MAX_CONNECTIONS', 1) ?? 1000;
  await runServer({ dataDir, logDir, killGraceMs: grace * 1000, probeMaxMs: probeMax * 1000, snapshotMinBytes, maxConnections, ssh: sshSettings(process.env) });
  return -1; // keeps running
}

/** start --detach: runs the server as a background process (its output appended to
 *  LOG_DIR/server.log), waits until it answers, prints its ready line, and returns. */
async function startDetached(dataDir: string, logDir: string, grace: number, ctx: Ctx): Promise<number> {
  ownDir(logDir, 'log dir');
  const logPath = path.join(logDir, 'server.log');
  const fd = fs.openSync(logPath, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_APPEND | fs.constants.O_NOFOLLOW, 0o600);
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

/** Comma lists in a repeatable option (--label a,b --label c), as one list. */
const commaList = (v: unknown) => (v === undefined ? [] : (v as string[]).flatMap((w) => w.split(',')).map((w) => w.trim()).filter(Boolean));

async function cmdAddWorkers(p: Parsed, ctx: Ctx): Promise<number> {
  if (!p.positionals.length) throw usage('add_slave needs at least one HOST[:SLOTS]');
  const auto = p.values.slots === 'auto', slots = auto ? 1 : intOption(p.values.slots, 'slot count', 1) ?? 1;
  const gpus = intOption(p.values.gpus, 'GPU count', 0) ?? 0;
  const labels = commaList(p.values.label).map(labelOf), env = envOf((p.values.env as string[] | undefined) ?? []);
  const workers = p.positionals.map((a) => ({ ...parseWorkerArg(a, slots, auto), gpus, labels, env }));
  const r = await request(ctx.dataDir, { op: 'add_workers', workers, skipCheck: Boolean(p.values.skip_ssh_auth_check), requeueOnDown: Boolean(p.values['requeue-on-down']) });
  for (const w of r.added as { host: string; slots: number; gpus: number; labels: string[] }[]) {
    ctx.out.write(`added worker ${w.host} with ${w.slots} slot${w.slots === 1 ? '' : 's'}${w.gpus ? ` and ${w.gpus} GPU${w.gpus === 1 ? '' : 's'}` : ''}${w.labels.length ? `, labels ${w.labels.join(',')}` : ''}\n`);
  }
  return EXIT_OK;
}

async function cmdPolicy(p: Parsed, ctx: Ctx): Promise<number> {
  if (p.positionals.length > 1) throw usage('policy takes at most one NAME', `usage: cli.ts ${COMMANDS.policy.synopsis}`);
  const r = await request(ctx.dataDir, { op: 'policy', ...(p.positionals.length ? { name: p.positionals[0] } : {}) });
  ctx.out.write(p.positionals.length && r.was !== r.policy ? `policy: ${r.policy} (was ${r.was})\n` : `policy: ${r.policy}\n`);
  return EXIT_OK;
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

/** The client's working directory, as bytes it is (see textOf). */
function workDir(): string {
  const here = process.cwd();
  if (!here.includes('\ufffd')) return here;
  try { return textOf(fs.readlinkSync('/proc/self/cwd', { encoding: 'buffer' })); } catch { return here; }
}

/** A whole number that may be negative (priorities). */
const signedOption = (v: unknown, name: string): number | undefined => {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (typeof v !== 'string' || !/^[-+]?\d+$/.test(v) || !Number.isSafeInteger(n) || Math.abs(n) > PRIORITY_LIMIT) throw usage(`invalid ${name} ${quoteForError(String(v))}`, `${name} takes a whole number, like 5 or -1`);
  return n;
};

/** The campaign options of add_job and add_jobs, as request fields. */
function jobOptions(p: Parsed): Record<string, unknown> {
  const list = (v: unknown) => (v === undefined ? [] : (v as string[]));
  const after = list(p.values.after).flatMap((w) => w.split(',')).map((w) => intOption(w.trim(), 'job id in --after', 1)!);
  const tags = list(p.values.tag).map(tagOf);
  const env = envOf(list(p.values.env));
  return {
    retries: intOption(p.values.retries, 'retries', 0) ?? 0,
    timeout: intOption(p.values.timeout, 'timeout', 1) ?? 0,
    ...(tags.length ? { tags } : {}),
    ...(p.values.priority !== undefined ? { priority: signedOption(p.values.priority, 'priority') } : {}),
    ...(after.length ? { after } : {}),
    ...(env.length ? { env } : {}),
    ...(p.values.slots !== undefined ? { slots: intOption(p.values.slots, 'slot count', 1) } : {}),
    ...(p.values.gpus !== undefined ? { gpus: intOption(p.values.gpus, 'GPU count', 0) } : {}),
    ...(p.values.require !== undefined ? { require: commaList(p.values.require).map(labelOf) } : {}),
    ...(p.values.avoid !== undefined ? { avoid: commaList(p.values.avoid).map(labelOf) } : {}),
    ...(p.values.host !== undefined ? { hosts: commaList(p.values.host) } : {}),
  };
}

async function sendJobs(ctx: Ctx, p: Parsed, jobs: JobSpec[], sweep?: string[][]): Promise<void> {
  const r = await request(ctx.dataDir, { op: 'add_jobs', cwd: workDir(), ...jobOptions(p), jobs, ...(sweep ? { sweep } : {}) });
  if (r.warning) ctx.err.write(`warning: ${r.warning}\n`);
  const first = Number(r.first), count = Number(r.count);
  let text = '';
  for (let i = 0; i < count; i++) {
    text += `${first + i}\n`;
    if (text.length > 65536) { ctx.out.write(text); text = ''; }
  }
  ctx.out.write(text);
}

/** Splits add_job's words at `:::` into the job's arguments and the sweep's lists. */
export function splitSweep(words: string[]): { args: string[]; lists: string[][] | undefined } {
  const at = words.indexOf(':::');
  if (at < 0) return { args: words, lists: undefined };
  const lists: string[][] = [];
  for (const w of words.slice(at)) {
    if (w === ':::') lists.push([]); else lists[lists.length - 1].push(w);
  }
  return { args: words.slice(0, at), lists };
}

async function cmdAddJob(p: Parsed, ctx: Ctx): Promise<number> {
  if (!p.positionals.length || p.positionals[0] === ':::') throw usage('add_job needs a SCRIPT', `usage: cli.ts ${COMMANDS.add_job.synopsis}`);
  const [script, ...words] = p.positionals;
  const { args, lists } = splitSweep(words);
  const spec = [resolveScript(script, workDir()), ...args];
  if (lists) checkSweep(spec, lists); // the server checks too; this fails before any I/O
  await sendJobs(ctx, p, [spec], lists);
  return EXIT_OK;
}

async function cmdAddJobs(p: Parsed, ctx: Ctx): Promise<number> {
  if (p.positionals.length !== 1) throw usage('add_jobs needs one FILE (or - for standard input)');
  const name = p.positionals[0];
  let text: string;
  try { text = textOf(fs.readFileSync(name === '-' ? 0 : bytesOf(name))); } catch (e) { throw failure(`cannot read ${quoteForError(name)}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`); }
  const jobs = parseJobsFile(text, workDir(), name === '-' ? 'standard input' : name);
  if (jobs.length === 0) throw failure(`no jobs in ${quoteForError(name)}`);
  await sendJobs(ctx, p, jobs);
  return EXIT_OK;
}

const parseIds = (words: string[]) => words.map((w) => intOption(w, 'job id', 1)!);

/** The --tag of a command that takes one, as a request field. */
const tagField = (p: Parsed) => (p.values.tag === undefined ? {} : { tag: tagOf(p.values.tag) });

async function cmdRemoveJob(p: Parsed, ctx: Ctx): Promise<number> {
  let msg: Record<string, unknown>;
  if (p.values.tag !== undefined) {
    if (p.values.id || p.positionals.length) throw usage('remove_job takes --tag TAG, --id ID... or SCRIPT [ARGS...], one of them');
    msg = { op: 'remove_jobs', ...tagField(p) };
  } else if (p.values.id) {
    msg = { op: 'remove_jobs', ids: parseIds(p.positionals) };
    if (!p.positionals.length) throw usage('remove_job --id needs at least one ID');
  } else {
    if (!p.positionals.length) throw usage('remove_job needs SCRIPT [ARGS...] or --id ID...');
    const [script, ...args] = p.positionals;
    msg = { op: 'remove_jobs', script: path.resolve(workDir(), script), args };
  }
  const r = await request(ctx.dataDir, msg);
  const ids = r.ids as number[];
  ctx.out.write(`removed ${ids.length} job${ids.length === 1 ? '' : 's'}: ${ids.join(' ')}\n`);
  return EXIT_OK;
}

async function cmdKill(p: Parsed, ctx: Ctx): Promise<number> {
  const ways = Number(Boolean(p.values.all)) + Number(p.values.tag !== undefined) + Number(p.positionals.length > 0);
  if (ways !== 1) throw usage(ways ? 'kill takes IDs, --tag TAG or --all, one of them' : 'kill needs IDs, --tag TAG or --all');
  const r = await request(ctx.dataDir, p.values.all ? { op: 'kill', all: true } : p.positionals.length ? { op: 'kill', ids: parseIds(p.positionals) } : { op: 'kill', ...tagField(p) });
  const ids = r.ids as number[];
  ctx.out.write(ids.length ? `killing ${ids.length} job${ids.length === 1 ? '' : 's'}: ${ids.join(' ')}\n` : 'no job to kill\n');
  return EXIT_OK;
}

async function cmdRetry(p: Parsed, ctx: Ctx): Promise<number> {
  const byState = Boolean(p.values.failed || p.values.killed || p.values.tag !== undefined);
  if (byState && p.positionals.length) throw usage('retry takes IDs or --failed/--killed/--tag, not both');
  if (!byState && !p.positionals.length) throw usage('retry needs IDs, --failed, --killed or --tag TAG');
  const r = await request(ctx.dataDir, byState ? { op: 'retry', failed: p.values.failed, killed: p.values.killed, ...tagField(p) } : { op: 'retry', ids: parseIds(p.positionals) });
  const ids = r.ids as number[];
  ctx.out.write(ids.length ? `queued again: ${ids.join(' ')}\n` : 'no job to retry\n');
  return EXIT_OK;
}

async function cmdStatus(p: Parsed, ctx: Ctx): Promise<number> {
  const tag = p.values.tag === undefined ? undefined : tagOf(p.values.tag);
  const r = await request(ctx.dataDir, { op: 'status' });
  if (tag !== undefined) {
    // One tag: its line only (and its entry only, with --json).
    const view = r as unknown as StatusView;
    const t = view.tags.find((x) => x.tag === tag);
    if (!t) throw failure(`no job has the tag ${quoteForError(tag)}`, 'see the tags in: cli.ts status');
    ctx.out.write(p.values.json ? JSON.stringify(t, null, 2) + '\n' : formatTagLine(t, tag.length, color(useColor(ctx.out))) + '\n');
    return EXIT_OK;
  }
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
  await request(ctx.dataDir, { op: 'list', state, ...tagField(p) }, (m) => {
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
  if (ids && p.values.tag !== undefined) throw usage('wait takes IDs or --tag TAG, not both');
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
  const r = await lastingRequest(ctx.dataDir, { op: 'wait', ids, ...tagField(p) }, (m) => {
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
  const r = await request(ctx.dataDir, { op: 'clean', logs: Boolean(p.values.logs), ...tagField(p) });
  ctx.out.write(`forgot ${r.count} finished job${r.count === 1 ? '' : 's'}${p.values.logs ? ' and their logs' : ''}\n`);
  return EXIT_OK;
}

async function cmdSetPriority(p: Parsed, ctx: Ctx): Promise<number> {
  const [n, ...rest] = p.positionals;
  if (n === undefined) throw usage('set_priority needs a PRIORITY', `usage: cli.ts ${COMMANDS.set_priority.synopsis}`);
  const priority = signedOption(n, 'priority');
  if ((p.values.tag !== undefined) === (rest.length > 0)) throw usage('set_priority takes IDs or --tag TAG, one of them');
  const r = await request(ctx.dataDir, { op: 'set_priority', priority, ...(rest.length ? { ids: parseIds(rest) } : tagField(p)) });
  const ids = r.ids as number[];
  ctx.out.write(ids.length ? `priority ${priority}: ${ids.length} waiting job${ids.length === 1 ? '' : 's'}\n` : 'no waiting job to change\n');
  return EXIT_OK;
}

async function cmdPause(p: Parsed, ctx: Ctx, op: 'pause' | 'resume'): Promise<number> {
  const tag = p.values.tag === undefined ? undefined : tagOf(p.values.tag);
  const r = await request(ctx.dataDir, { op, ...(tag === undefined ? {} : { tag }) });
  const what = tag === undefined ? 'the queue' : `tag ${tag}`;
  ctx.out.write(`${r.changed ? (op === 'pause' ? 'paused' : 'resumed') : `already ${op === 'pause' ? 'paused' : 'running'}:`} ${what}${op === 'pause' ? ' (running jobs go on)' : ''}\n`);
  const still = (r.pausedTags as string[]).filter((t) => t !== tag);
  if (op === 'resume' && tag === undefined && still.length) ctx.err.write(`still paused: tag${still.length === 1 ? '' : 's'} ${still.join(', ')} (resume --tag TAG)\n`);
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

type Command = { run: (p: Parsed, ctx: Ctx) => Promise<number>; options: OptSpec; jobArgs?: boolean; noArgs?: boolean; negatives?: boolean; synopsis: string };
const JOB_OPTIONS: OptSpec = {
  retries: { type: 'string' }, timeout: { type: 'string' }, tag: { type: 'string', multiple: true }, priority: { type: 'string' },
  after: { type: 'string', multiple: true }, env: { type: 'string', short: 'e', multiple: true },
  slots: { type: 'string' }, gpus: { type: 'string' }, require: { type: 'string', multiple: true }, avoid: { type: 'string', multiple: true },
  host: { type: 'string', multiple: true },
};
const JOB_SYNOPSIS = '[--retries N] [--timeout SECONDS] [--tag TAG]... [--priority N] [--after ID[,ID]]... [-e|--env NAME=VALUE]... ' +
  '[--slots K] [--gpus G] [--require LABEL]... [--avoid LABEL]... [--host HOST]...';
const TAG: OptSpec = { tag: { type: 'string' } };
const COMMANDS: Record<string, Command> = {
  start: { run: cmdStart, options: { 'log-dir': { type: 'string' }, 'kill-grace': { type: 'string' }, detach: { type: 'boolean', short: 'd' } }, synopsis: 'start [--detach] [--log-dir DIR] [--kill-grace SECONDS] [DATA_DIR] [LOG_DIR]' },
  stop: { run: cmdStop, options: {}, noArgs: true, synopsis: 'stop' },
  add_slave: {
    run: cmdAddWorkers,
    options: { skip_ssh_auth_check: { type: 'boolean' }, 'requeue-on-down': { type: 'boolean' }, slots: { type: 'string' }, gpus: { type: 'string' }, label: { type: 'string', multiple: true }, env: { type: 'string', short: 'e', multiple: true } },
    synopsis: 'add_slave [--skip_ssh_auth_check] [--requeue-on-down] [--slots N|auto] [--gpus N] [--label L[,L]]... [-e|--env NAME=VALUE]... HOST[:SLOTS|:auto]...',
  },
  remove_slave: { run: cmdRemoveWorkers, options: { wait: { type: 'boolean' }, kill: { type: 'boolean' } }, synopsis: 'remove_slave [--wait|--kill] HOST...' },
  add_job: { run: cmdAddJob, options: JOB_OPTIONS, jobArgs: true, synopsis: `add_job ${JOB_SYNOPSIS} SCRIPT [ARGS...] [::: V... [::: W...]]` },
  add_jobs: { run: cmdAddJobs, options: JOB_OPTIONS, synopsis: `add_jobs ${JOB_SYNOPSIS} FILE|-` },
  remove_job: { run: cmdRemoveJob, options: { id: { type: 'boolean' }, ...TAG }, jobArgs: true, synopsis: 'remove_job SCRIPT [ARGS...] | remove_job --id ID... | remove_job --tag TAG' },
  kill: { run: cmdKill, options: { all: { type: 'boolean' }, ...TAG }, synopsis: 'kill ID... | kill --tag TAG | kill --all' },
  retry: { run: cmdRetry, options: { failed: { type: 'boolean' }, killed: { type: 'boolean' }, ...TAG }, synopsis: 'retry ID... | retry [--failed] [--killed] [--tag TAG]' },
  set_priority: { run: cmdSetPriority, options: TAG, negatives: true, synopsis: 'set_priority N ID... | set_priority N --tag TAG' },
  pause: { run: (p, ctx) => cmdPause(p, ctx, 'pause'), options: TAG, noArgs: true, synopsis: 'pause [--tag TAG]' },
  resume: { run: (p, ctx) => cmdPause(p, ctx, 'resume'), options: TAG, noArgs: true, synopsis: 'resume [--tag TAG]' },
  policy: { run: cmdPolicy, options: {}, synopsis: 'policy [spread|pack|sequential|random]' },
  status: { run: cmdStatus, options: { json: { type: 'boolean' }, ...TAG }, noArgs: true, synopsis: 'status [--tag TAG] [--json]' },
  list: { run: cmdList, options: { state: { type: 'string' }, json: { type: 'boolean' }, ...TAG }, noArgs: true, synopsis: 'list [--state STATE] [--tag TAG] [--json]' },
  log: { run: cmdLog, options: { follow: { type: 'boolean', short: 'f' } }, synopsis: 'log ID [-f|--follow]' },
  wait: { run: cmdWait, options: TAG, synopsis: 'wait [ID... | --tag TAG]' },
  clean: { run: cmdClean, options: { logs: { type: 'boolean' }, ...TAG }, noArgs: true, synopsis: 'clean [--logs] [--tag TAG]' },
};
const ALIASES: Record<string, string> = { add_worker: 'add_slave', remove_worker: 'remove_slave' };

/** The environment variables the program reads (the header and the README list the same). */
const ENVIRONMENT: [string, string][] = [
  ['DJS_DATA_DIR', 'the data dir, as --data-dir (default ./.data)'],
  ['DJS_LOG_DIR', 'start: the log dir, as --log-dir (default ./logs)'],
  ['DJS_KILL_GRACE', 'start: seconds from SIGTERM to SIGKILL, as --kill-grace (default 10)'],
  ['DJS_SSH_CONFIG', 'start: an ssh config file for login checks, probes and jobs (ssh -F)'],
  ['DJS_SSH_OPTIONS', 'start: extra ssh words for login checks and probes'],
  ['DJS_SSH_TIMEOUT', 'start: ssh connect timeout of checks and probes, seconds (default 10)'],
  ['DJS_SSH_SHARED', 'start: 1 (default): one shared ssh connection per worker for checks and jobs; 0: none'],
  ['DJS_SSH_SESSIONS', 'start: slots of a worker that share one ssh connection (default 8; see sshd MaxSessions)'],
  ['DJS_HEARTBEAT', 'start: seconds between checks of busy workers (default 30; down on a failed check or 3 missed; 0: off)'],
  ['DJS_PROBE_BACKOFF_MAX', 'start: longest wait between probes of a down worker, seconds (default 300)'],
  ['DJS_SNAPSHOT_MIN_BYTES', 'start: journal size that calls for a snapshot (default 32 MiB; for tests)'],
  ['DJS_MAX_CONNECTIONS', 'start: client connections at once; the longest idle goes first (default 1000)'],
  ['NO_COLOR', 'no colours in status and list'],
];

function helpText(): string {
  return `usage: cli.ts [--data-dir DIR] COMMAND [OPTIONS] [ARGS]\n\ncommands:\n${Object.values(COMMANDS).map((c) => `  ${c.synopsis}`).join('\n')}\n\n` +
    `--data-dir DIR (env DJS_DATA_DIR, default ./.data) selects the server on every command.\n` +
    `environment:\n${ENVIRONMENT.map(([name, what]) => `  ${name.padEnd(23)}${what}`).join('\n')}\n` +
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
    const parsed = parseCommand(argv.slice(cmdToken.index + 1), cmd.options, cmd.jobArgs ?? false, cmd.negatives);
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

/** The command's words as the bytes it was given (see textOf): node decodes argv as
 *  UTF-8 and replaces what is not; Linux keeps the bytes in /proc/self/cmdline, whose
 *  last words are the command's. Anywhere else, or if the two disagree, argv as node has
 *  it. */
function rawArgs(): string[] {
  const args = process.argv.slice(2);
  if (!args.some((a) => a.includes('\ufffd'))) return args;
  try {
    const raw = fs.readFileSync('/proc/self/cmdline').toString('latin1').split('\0').slice(0, -1).slice(-args.length).map((w) => Buffer.from(w, 'latin1'));
    if (raw.length === args.length && raw.every((b, i) => b.toString('utf8') === args[i])) return raw.map(textOf);
    return args;
  } catch { return args; }
}

if (isMain) {
  process.stdout.on('error', (e: NodeJS.ErrnoException) => { if (e.code === 'EPIPE') process.exit(0); });
  main(rawArgs()).then((code) => {
    if (code >= 0) process.exitCode = code;
  });
}
