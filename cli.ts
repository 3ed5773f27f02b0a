#!/bin/sh
":" /*
# The bootstrap (see BOOTSTRAP in the header). Paths go to node as data, never as code.
_djs_f=$(readlink -f "$0")
export DJS_PROG="$0"
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
 * A job added with --on-worker is a plain command instead, which djs runs on the worker
 * itself (see "commands run on the worker").
 *
 * THE FILE, top to bottom, in the order data flows (each part under a banner):
 *   this header and the bootstrap above it;
 *   Vocabulary: job and worker states, the events, limits, the one error type;
 *   the core, pure functions of the state (no fs, net, processes or clock): applyEvent,
 *     the queue, plan and planStarts, the health of workers; then what each operation
 *     decides, cli.py's state (load_status), bytes that are not UTF-8, the dashboard's
 *     reads;
 *   the journal: the state on disk, its loading and its writes;
 *   the runner: the launcher, run files and checkRun, process identity, ssh and Slurm
 *     checks of workers;
 *   the server: the operation table (OPS), the flush loop, the process supervisor,
 *     streams (list, wait, log -f), the socket and what its clients may cost, settings,
 *     HTTP (the API and its description, /metrics, the dashboard page), server life
 *     (start, recovery, stop);
 *   the client: each command, its options and its output, the help;
 *   main: parse, run, exit through one gate.
 *
 * SYNOPSIS
 *   cli.ts start [-d] [--log-dir DIR] [--kill-grace S] [--http [HOST:]PORT] [DATA_DIR] [LOG_DIR]
 *                                             run the server (-d: in the background;
 *                                             --http: also the dashboard, API, /metrics);
 *                                             refuses a data dir of cli.py
 *   cli.ts stop                               stop it; running jobs keep running
 *   cli.ts dashboard [--new-token]            the dashboard's URL, with its access token (after #);
 *                                             --new-token: a new token, the old one refused at once
 *   cli.ts add_slave [--skip_ssh_auth_check] [--requeue-on-down] [--slots N|auto] [--gpus N]
 *                    [--label L[,L]]... [-e|--env NAME=VALUE]... HOST[:SLOTS|:auto]...
 *                      (HOST slurm:PARTITION[@LOGIN_HOST]: a Slurm partition, checked
 *                      with sinfo; SLOTS = how many jobs may be in it at once)
 *   cli.ts policy [spread|pack|sequential|random]
 *   cli.ts remove_slave [--wait|--kill] HOST...
 *   cli.ts add_job [JOB OPTIONS] SCRIPT [ARGS...] [::: V... [::: W...]]   (a sweep: one
 *                                      job per combination; {1} {2} {} in ARGS replaced)
 *   cli.ts add_jobs [JOB OPTIONS] FILE|-
 *     JOB OPTIONS: --retries N, --timeout S, --retry-delay S, --tag TAG..., --priority N,
 *                  --after ID[,ID]..., --after-any ID[,ID]..., -e|--env NAME=VALUE...,
 *                  --slots K, --gpus G, --require LABEL..., --avoid LABEL..., --host HOST...,
 *                  --on-worker [--workdir DIR] (SCRIPT is a command run on the worker;
 *                  no shared disk: --transfer FILE..., --return FILE..., --return-optional,
 *                  --cleanup, through ~/.djs-work/$DJS_RUN_NAME there, by rsync);
 *                  a bare SCRIPT name is otherwise looked up on PATH), --name NAME
 *                  (a job's name works where an ID does, when one job has it)
 *   cli.ts remove_job [-e NAME=VALUE]... SCRIPT [ARGS...] | --id ID... | --tag TAG
 *   cli.ts kill ID... | --tag TAG | --all
 *   cli.ts retry ID... | [--failed] [--killed] [--tag TAG]
 *   cli.ts set_priority N ID... | N --tag TAG
 *   cli.ts pause [--tag TAG [--ahead]]   cli.ts resume [--tag TAG]
 *   cli.ts status [--tag TAG] [--json]   cli.ts list [--state S]... [--tag TAG] [--json]
 *   cli.ts log ID [-f]                   cli.ts wait [ID... | --tag TAG | --all]
 *   cli.ts clean [--logs] [--tag TAG] [--state done|failed|killed]...
 *   cli.ts help [COMMAND], COMMAND --help, --version
 *   cli.ts load_status [--skip_ssh_auth_check] FILE|-
 *                     the state of cli.py (the JSON its status printed): its workers and
 *                     waiting jobs, added in one step or not at all (decideLoadStatus)
 *   Every command takes --data-dir DIR (env DJS_DATA_DIR; default: the nearest .data
 *   that djs made, in the current directory or a parent, else ./.data).
 *   cli.py's spellings work too: --server_data_dir, --log_dir, --env,-e=NAME=VALUE.
 *
 * ENVIRONMENT (see ENVIRONMENT; `cli.ts help` lists them)
 *   DJS_DATA_DIR; the server's settings (SETTINGS: kept in the data dir by `start`, used
 *   by the next start unless given again) DJS_LOG_DIR, DJS_KILL_GRACE, DJS_HTTP, and for
 *   its ssh DJS_SSH_CONFIG, DJS_SSH_OPTIONS, DJS_SSH_TIMEOUT, DJS_SSH_SHARED,
 *   DJS_SSH_SESSIONS, DJS_HEARTBEAT, DJS_PROBE_BACKOFF_MAX, and DJS_SLURM_CHECK;
 *   DJS_MAX_CONNECTIONS; DJS_CLIENT_BYTES; DJS_SNAPSHOT_MIN_BYTES (tests); NO_COLOR. A job
 *   runs with the environment of the add_job that queued it (keptEnviron: not PWD, TERM,
 *   the ssh agent, the server's settings; over HTTP: the server's), a worker's checks with
 *   its add_slave's; jobs get JOB_ID,
 *   SLAVE_IP, SLAVE_SLOT, SLAVE_SLOTS, SLAVE_GPUS, JOB_ATTEMPT, JOB_TIMEOUT, DJS_DATA_DIR,
 *   DJS_RUN_NAME (INSTANCE-ID-RUN: no other server, job or run shares it; runName),
 *   DJS_SSH_SHARED_CONFIG, the worker's and their own --env settings, and the ssh
 *   settings as kept. An --on-worker command gets on its worker the job's variables, the
 *   --env settings and CUDA_VISIBLE_DEVICES (its GPUs), over the worker's own login
 *   environment.
 *
 * FILES in the data dir (mode 0700)
 *   journal       one JSON event per line, appended and fsynced before a reply
 *   snapshot      the whole state as JSON lines; replaced by write-temp, fsync, rename;
 *                 written a slice per turn, of one moment (see Journal.startSnapshot)
 *   journal.1     while a snapshot is written: the journal up to its moment
 *   server.sock   the Unix socket clients talk to (mode 0600)
 *   server.pid    "PID START_TICKS" of the server that owns the dir
 *   lock.token    names the lock a server holds on the dir while it runs (holdDirLock)
 *   instance      this data dir's random name, made by its first start (instanceOf)
 *   settings      the settings of the last start, JSON (see SETTINGS); a data dir that
 *                 is not empty and holds none of these files is not taken
 *   http.token    the access token of the dashboard and API (start --http; mode 0600;
 *                 dashboard --new-token replaces it)
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
 *                               (--after-any: any end of it will do)
 *           running -> waiting  when the worker failed (exit 255), a retry is due,
 *                               or the worker was removed with --kill
 *           done|failed|killed -> waiting  by `retry`
 *   worker: up -> down (a probe failed, or heartbeats went unanswered for 3 periods)
 *              -> up (probe answered, with backoff);
 *           a Slurm worker is probed (sinfo) while up too, every DJS_SLURM_CHECK seconds;
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
 *   whether a job's process lives, ended, or never started. Two doors lead to OPS: the
 *   Unix socket (one JSON object per line) and, with `start --http`, HTTP (a JSON API,
 *   the dashboard page and /metrics; see its section); both serve through serveRequest.
 *
 *   Group commit: requests that arrive together are applied, written with one write
 *   and one fdatasync, and only then answered; effects (starting a process, signals)
 *   also wait for that flush, so nothing happens that the journal does not know of.
 *   If the write fails, the journal is cut back, the state reloaded from disk, the
 *   clients of that batch get an error, and the outcomes that were lost are retried.
 *   No request holds the others up for long: a big add (a sweep of a million jobs) is
 *   checked in parts before its turn (checkJobList) and its jobs are made in parts after
 *   it (Expansion), other clients served in between; a `wait` for ranges of ids looks at
 *   the jobs that exist only (jobsInRanges).
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
 *   two words. sh also passes the name it was called by ($0; the copy's path is node's
 *   argv[1]) as DJS_PROG, so that hints say `djs ...` when that is what the user
 *   typed; main reads and deletes it (see progName).
 */

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { StringDecoder } from 'node:string_decoder';
import { parseArgs } from 'node:util';
import v8 from 'node:v8';
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
 *  chosen ids. 4: event `environ` (an environment, by content id), `add` and `worker`
 *  with environ, `add` with afterAny (--after-any), onw, workdir, name, xfer, ret, retopt and cleanup (--on-worker,
 *  --workdir, --name, --transfer, --return, --return-optional, --cleanup); snapshot records `environ`. Data dirs of versions 1 to 3 load too
 *  (see upgradeRecord; their jobs and workers run with the server's environment); a
 *  program of version 2 refuses version 3, which it would misread (it would start a job
 *  before its dependencies), and one of version 3 refuses 4 (its jobs would lose their
 *  environment, start before their --after-any ones, or run an --on-worker command here). */
const FORMAT_VERSION = 4;
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
/** A snapshot is written a slice of jobs per turn, of about this many ms of work. */
const SNAPSHOT_SLICE_MS = 8;
const MAX_HOST_LENGTH = 255;
const MAX_SLOTS = 10_000;
const MAX_GPUS = 1024;
/** Tags name campaigns on the command line and in status lines: short, plain words. */
const TAG_RE = /^[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,63}$/;
export const ENV_NAME_RE = /^[A-Za-z_][A-Za-z0-9_]*$/;
/** A word that reads as NAME=VALUE (cli.py's `--env A=1 B=2` took several at once). */
const ENV_WORD_RE = /^[A-Za-z_][A-Za-z0-9_]*=/;
/** Variables the server sets for each job itself; a job's --env cannot replace them. */
const RESERVED_ENV = new Set(['JOB_ID', 'SLAVE_IP', 'SLAVE_SLOT', 'SLAVE_SLOTS', 'SLAVE_GPUS', 'JOB_ATTEMPT', 'JOB_TIMEOUT', 'DJS_RUN_NAME']);
/** Variables of the shell that ran add_job or add_slave that do not follow its jobs and
 *  checks (see keptEnviron), besides the server's settings (SETTINGS):
 *  they describe that shell (its directory, depth, last command, terminal), are the
 *  server's (its data dir, its tuning, the launcher's), are set for each job anyway, or
 *  are the ssh agent, which is the server's (ENVIRON_FROM_SERVER). Other DJS_ variables
 *  (example_job.sh's DJS_REMOTE_DIR, DJS_LOCAL_HOME) are the job's: they follow. */
const ENVIRON_DROPPED = new Set([
  'PWD', 'OLDPWD', 'SHLVL', '_', 'TERM', 'SSH_TTY', 'SSH_AUTH_SOCK', 'SSH_AGENT_PID', ...RESERVED_ENV,
  'DJS_DATA_DIR', 'DJS_SSH_SHARED_CONFIG', 'DJS_MAX_CONNECTIONS', 'DJS_CLIENT_BYTES', 'DJS_SNAPSHOT_MIN_BYTES', 'DJS_BOOT_COPY', 'DJS_LAUNCHER_CODE',
]);
/** The ssh agent: jobs and checks get the server's, whatever environment they run with,
 *  so every ssh of djs (checks, shared connections, the jobs' own) logs in the same way,
 *  and a job that waited a day does not carry the socket of a terminal closed since. */
const ENVIRON_FROM_SERVER = ['SSH_AUTH_SOCK', 'SSH_AGENT_PID'];
/** The most bytes of the environment one request may carry (it must fit an exec too). */
export const MAX_ENVIRON_BYTES = 1 << 20;

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
  retryDelay: number;                    // seconds before the first retry, doubling after
  notBefore: number;                     // a retry waits until then (ms; 0 = ready)
  history: Attempt[] | null;             // earlier attempts, oldest first
  qtok: number;                          // which queue entry (> 0) or hold (< 0) is this job's live one
  tags: string[];                        // sorted; shared by the jobs of one add
  priority: number;                      // higher starts first
  after: number[] | null;                // jobs that must end `done` before this one starts
  afterAny: number[] | null;             // jobs that must have ended, however (--after-any)
  env: string[] | null;                  // NAME=VALUE on top of the server's environment
  environ: string | null;                // the environment it runs with (the id of its add's, in environs); null: the server's
  blockers: number;                      // of `after`, how many have not ended done yet; of `afterAny`, not ended
  need: Need;                            // what a worker must offer it; shared by the jobs of one add
  slots: number[] | null;                // all slots of the current or last attempt, when more than one
  gpus: number[] | null;                 // GPU indices of the current or last attempt
  // Only on the jobs that have them (a plain job costs no memory for them):
  onWorker?: true;                       // add_job --on-worker: script is a command run on the worker itself
  workdir?: string;                      // where an --on-worker command runs (absent: cwd; may start with ~)
  name?: string;                         // --name, its placeholders filled
  transfer?: string[];                   // --transfer: files sent to the job's directory on the worker (relative to cwd, or absolute)
  returns?: string[];                    // --return: files brought back from it into cwd (relative)
  returnOptional?: true;                 // --return-optional: a missing --return file is no failure
  cleanup?: true;                        // --cleanup: the job's directory on the worker is removed afterwards
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

/** A worker that is a Slurm partition: its jobs run through srun, on LOGIN_HOST over ssh
 *  when one is named, else here. */
export type SlurmTarget = { partition: string; login: string | null };
/** How often an up Slurm worker is asked (sinfo) whether its partition still takes jobs. */
export const SLURM_CHECK_MS = 30_000;

export type Worker = {
  host: string; slots: number; state: WorkerState;
  ssh: boolean;                          // probed over ssh, or with sinfo (not added with --skip_ssh_auth_check)
  slurm: SlurmTarget | null;             // a Slurm partition (named slurm:PARTITION[@LOGIN_HOST]), else an ssh host
  requeueOnDown?: boolean;               // its running jobs are stopped and requeued when it goes down
  running: number[];                     // job id per slot, 0 = free (a job of K slots is in K)
  labels: string[];
  gpus: number;                          // GPUs, indices 0..gpus-1
  gpuJobs: number[];                     // job id per GPU index, 0 = free
  env: string[] | null;                  // NAME=VALUE for every job on it
  environ: string | null;                // the environment its checks run with (its add_slave's, in environs); null: the server's
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
  environs: Map<string, string[]>;     // the environments of adds (keptEnviron), by content id; one copy each
  saving: Saving | null;               // a snapshot being written (see touch)
  byState: Record<JobState, IdBits>;   // the ids of the jobs in each state (for filters)
  byWorker: Map<string, IdBits>;       // the ids of the jobs whose current or last attempt ran there
  tagRanges: Map<string, number[]>;    // per tag, the id ranges [first, last, ...] of the adds that had it
};

/** A set of job ids as a bitmap (32 ids a word): a filter finds the matching ids of a
 *  million jobs by skipping empty words, and an update costs one bit. */
export class IdBits {
  w = new Int32Array(64);
  add(id: number): void {
    const i = Math.floor(id / 32);
    if (i >= this.w.length) { const w = new Int32Array(Math.max(i + 1, this.w.length * 2)); w.set(this.w); this.w = w; }
    this.w[i] |= 1 << (id % 32);
  }
  delete(id: number): void {
    const i = Math.floor(id / 32);
    if (i < this.w.length) this.w[i] &= ~(1 << (id % 32));
  }
  has(id: number): boolean { const i = Math.floor(id / 32); return i < this.w.length && (this.w[i] & (1 << (id % 32))) !== 0; }
}

/** A snapshot being written a slice per turn, of the state as it was at its start: the
 *  jobs below id `below` that changed since, as they were then (snapshot lines), and
 *  their queue token then (`was`: 0 when not waiting), for the queue's order then. */
export type Saving = {
  below: number; before: Map<number, string>; was: Map<number, number>;
  // The jobs are written in id order (the order of st.jobs) from the live map: those
  // that leave it before they are written wait in `dropped` from `dropHead` on (in id
  // order unless `unsorted`: a clean drops in id order, a remove highest first);
  // `at`: the last id written.
  at: number; dropped: Job[]; dropHead: number; unsorted: boolean;
};

export type JobSpec = string[]; // [script, ...args]
export type Event =
  | {
    e: 'add'; t: number; id: number; cwd: string; retries: number; timeout: number; jobs: JobSpec[];
    tags?: string[]; priority?: number; after?: number[]; env?: string[];
    environ?: string; // the id of the environment its jobs run with (an `environ` event before it)
    afterAny?: number[]; // --after-any: start once these ended, whatever the result (format 4)
    sweep?: string[][]; // jobs holds one template, and there is a job per combination (see sweepJobs)
    need?: Need;
    retryDelay?: number; // seconds before a first retry (see retryAt)
    onw?: true; workdir?: string; name?: string; // --on-worker, --workdir, --name (a template in a sweep)
    xfer?: string[]; ret?: string[]; retopt?: true; cleanup?: true; // --transfer, --return, --return-optional, --cleanup
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
  | { e: 'worker'; t: number; host: string; slots: number; ssh: boolean; labels?: string[]; gpus?: number; env?: string[]; rod?: boolean; environ?: string } // rod: --requeue-on-down; environ: of its checks
  | { e: 'environ'; t: number; id: string; vars: string[] } // an environment of adds, once for all that share it
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
    paused: false, pausedTags: new Set(), strings: new Map(), cascades: 0, policy: 'spread', environs: new Map(),
    saving: null,
    byState: { waiting: new IdBits(), running: new IdBits(), done: new IdBits(), failed: new IdBits(), killed: new IdBits() },
    byWorker: new Map(), tagRanges: new Map(),
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
  if (delta > 0) st.byState[state].add(job.id); else st.byState[state].delete(job.id);
  for (const tag of job.tags) {
    let c = st.tagCounts.get(tag);
    if (!c) st.tagCounts.set(tag, c = noCounts());
    c[state] += delta;
    if (delta < 0 && c.waiting + c.running + c.done + c.failed + c.killed === 0) st.tagCounts.delete(tag);
  }
}

/** The snapshot line of a job (its queue entry is made anew on load). */
export const snapshotLine = (job: Job) => JSON.stringify({ j: { ...job, qtok: 0 } });

/** Called before a job changes: while a snapshot is being written, keeps the job as it
 *  was when the snapshot began (copy on write), so the snapshot is of one moment. */
function touch(st: State, job: Job): void {
  const sv = st.saving;
  if (sv && job.id < sv.below && !sv.before.has(job.id)) { sv.before.set(job.id, snapshotLine(job)); remember(st, job); }
}
/** Called before a job's queue token changes or it leaves: see touch. */
function remember(st: State, job: Job): void {
  const sv = st.saving;
  if (sv && job.id < sv.below && !sv.was.has(job.id)) sv.was.set(job.id, job.state === 'waiting' ? job.qtok : 0);
}

function setJobState(st: State, job: Job, to: JobState): void {
  touch(st, job);
  count(st, job, job.state, -1);
  count(st, job, to, 1);
  job.state = to;
}

/** Adds a job to the state's jobs, or takes it out (a removed or cleaned job). */
function addJob(st: State, job: Job): void {
  st.jobs.set(job.id, job);
  count(st, job, job.state, 1);
  if (job.worker !== null) workerBits(st, job.worker).add(job.id);
  for (const tag of job.tags) {
    const r = st.tagRanges.get(tag);
    if (!r) st.tagRanges.set(tag, [job.id, job.id]);
    else if (r[r.length - 1] === job.id - 1) r[r.length - 1] = job.id;
    else if (r[r.length - 1] < job.id) r.push(job.id, job.id);
  }
}
function dropJob(st: State, job: Job): void {
  remember(st, job);
  const sv = st.saving;
  if (sv && job.id < sv.below && job.id > sv.at) {
    if (sv.dropped.length > sv.dropHead && sv.dropped[sv.dropped.length - 1].id > job.id) sv.unsorted = true;
    sv.dropped.push(job);
  }
  st.jobs.delete(job.id);
  if (job.worker !== null) st.byWorker.get(job.worker)?.delete(job.id);
  st.dependents.delete(job.id); // a finished job's held dependents were told already
  count(st, job, job.state, -1);
  if (job.state !== 'done') st.forgotten.add(job.id);
}

function workerBits(st: State, host: string): IdBits {
  let b = st.byWorker.get(host);
  if (!b) st.byWorker.set(host, b = new IdBits());
  return b;
}

/** Sets the worker of a job's current or last attempt. */
function setWorker(st: State, job: Job, host: string | null): void {
  if (job.worker !== null) st.byWorker.get(job.worker)?.delete(job.id);
  job.worker = host === null ? null : intern(st, host);
  if (host !== null) workerBits(st, host).add(job.id);
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
  remember(st, job);
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

/** The lanes as they are now, for waitingAt: their fronts copied (a requeue or a trim
 *  changes them in place), and of their backs the arrays and the part in use (they only
 *  grow at the end, and are replaced when trimmed). */
export type FrozenLane = { priority: number; front: number[]; frontTok: number[]; ids: number[]; toks: number[]; head: number; end: number };
export function frozenLanes(st: State): FrozenLane[] {
  const out: FrozenLane[] = [];
  for (const priority of st.prios) {
    for (const l of st.lanes.values()) {
      if (l.priority === priority) out.push({ priority, front: l.front.slice(), frontTok: l.frontTok.slice(), ids: l.ids, toks: l.toks, head: l.head, end: l.ids.length });
    }
  }
  return out;
}

/** The ids of the jobs waiting at the start of a snapshot, in the order they would have
 *  started then (as waitingJobs orders them), from the lanes frozen then: an entry was
 *  live when its job was waiting with that token (Saving.was for the jobs that changed
 *  since). Lanes come by priority, highest first. */
export function* waitingAt(st: State, sv: Saving, lanes: FrozenLane[]): Generator<number> {
  const live = (id: number, tok: number) => {
    const was = sv.was.get(id);
    if (was !== undefined) return was === tok;
    const j = st.jobs.get(id);
    return j !== undefined && j.state === 'waiting' && j.qtok === tok;
  };
  type Cursor = { lane: FrozenLane; f: number; b: number; key: number };
  const keyOf = (c: Cursor) => (c.f >= 0 ? -c.lane.frontTok[c.f] - 2 ** 52 : c.b < c.lane.end ? c.lane.toks[c.b] : Infinity);
  for (let i = 0; i < lanes.length;) {
    const priority = lanes[i].priority, heap: Cursor[] = [];
    for (; i < lanes.length && lanes[i].priority === priority; i++) {
      const c: Cursor = { lane: lanes[i], f: lanes[i].front.length - 1, b: lanes[i].head, key: 0 };
      c.key = keyOf(c);
      heap.push(c);
    }
    heap.sort((a, b) => a.key - b.key);
    while (heap.length && heap[0].key !== Infinity) {
      const c = heap[0];
      const [id, tok] = c.f >= 0 ? [c.lane.front[c.f], c.lane.frontTok[c.f--]] : [c.lane.ids[c.b], c.lane.toks[c.b++]];
      c.key = keyOf(c);
      if (heap.length > 1) siftDown(heap, 0);
      if (live(id, tok)) yield id;
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

/** Whether --after-any dependency `id` has been met: it ended, however (a job no longer
 *  here was cleaned after it ended, or removed before it ran: it ended too). */
function depEnded(st: State, id: number): boolean {
  const dep = st.jobs.get(id);
  return dep ? isFinished(dep.state) : id < st.nextId;
}

/** Whether `job` waits for `dep` through --after-any only: any end of it will do. */
const anyEndWill = (job: Job, dep: number) => job.afterAny !== null && job.afterAny.includes(dep) && !(job.after ?? NO_IDS).includes(dep);

/** Queues a job that became waiting, or holds it until its dependencies are done. A
 *  held job is listed under each of its dependencies (done ones too: a retry of one makes
 *  it wait again). A hold has a token of its own, as a queue entry has, so the entries a
 *  job left behind in earlier holds (it was killed, then retried) count for nothing. */
function queueOrHold(st: State, job: Job, inFront: boolean): void {
  job.blockers = 0;
  for (const d of job.after ?? NO_IDS) if (!depDone(st, d)) job.blockers++;
  for (const d of job.afterAny ?? NO_IDS) if (!depEnded(st, d)) job.blockers++;
  if (job.blockers === 0) { enqueue(st, job, inFront); return; }
  remember(st, job);
  job.qtok = -(++st.tok);
  for (const d of job.afterAny ? [...(job.after ?? NO_IDS), ...job.afterAny] : job.after!) {
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
 *  are queued once their last dependency is met (done, or for --after-any any end), or
 *  fail, and their own dependents after them. Those still held for others stay listed
 *  under it, so that a retry of it makes them wait again. Only the jobs held for it are
 *  looked at (no scan of all jobs); a worklist, not recursion, so a chain of any length
 *  is fine. */
function releaseDependents(st: State, id: number, how: 'done' | 'failed' | 'killed' | 'removed', t: number): void {
  const work: [number, 'done' | 'failed' | 'killed' | 'removed'][] = [[id, how]];
  while (work.length) {
    const [dep, outcome] = work.pop()!;
    const held = [...heldFor(st, dep)], still: number[] = [];
    for (const job of held) {
      if (outcome === 'done' || anyEndWill(job, dep)) {
        if (--job.blockers === 0) enqueue(st, job, false);
        else still.push(job.id, job.qtok);
        continue;
      }
      touch(st, job);
      job.blockers = 0;
      st.cascades++;
      job.reason = `dependency ${dep} ${outcome}`;
      job.endedAt = t;
      setJobState(st, job, 'failed');
      work.push([job.id, 'failed']);
    }
    if (still.length) st.dependents.set(dep, still); else st.dependents.delete(dep);
  }
}

/** A job that had ended is queued again (retry): the jobs still held for others wait
 *  for it again (those held through --after only if it had ended done: the others
 *  failed with it). */
function reblockDependents(st: State, id: number): void {
  for (const job of heldFor(st, id)) job.blockers++;
}

/** The most jobs one sweep may make: a request costs the server what its jobs cost
 *  (~700 bytes each), so one request line of a few words must not ask for gigabytes. */
export const MAX_SWEEP_JOBS = 1_000_000;
/** The most bytes of arguments and environment settings the jobs of one request may
 *  hold, all of them together: a job's arguments may take up to ARG_MAX (~2 MB), so a
 *  sweep of a few kilobytes could otherwise make gigabytes of jobs (and snapshots). */
export const MAX_ADD_BYTES = 64 << 20;
const PLACEHOLDER_RE = /\{(\d*)\}/g;

/** The bytes of arguments (not the script) that the jobs of a sweep hold, all of them
 *  together, counted from the template and the lengths of the values, without making a
 *  job: each value of list k is in N / (its length) of the N jobs, once per placeholder
 *  naming it (once, appended, where no argument holds one). Placeholders are checked. */
export function sweepBytes(template: string[], lists: string[][]): number {
  const n = lists.reduce((p, l) => p * l.length, 1);
  const perValue = lists.map((l) => l.reduce((b, v) => b + Buffer.byteLength(v), 0) * (n / l.length));
  let bytes = 0, placed = false;
  for (const arg of template.slice(1)) {
    bytes += n * Buffer.byteLength(arg.replace(PLACEHOLDER_RE, ''));
    for (const m of arg.matchAll(PLACEHOLDER_RE)) { placed = true; bytes += perValue[m[1] === '' ? 0 : Number(m[1]) - 1]; }
  }
  if (!placed) for (const b of perValue) bytes += b;
  return bytes;
}

/** Checks a sweep (`SCRIPT ARGS ::: V... ::: W...`): every list has values, every
 *  placeholder names a list, the jobs number at most MAX_SWEEP_JOBS, and their
 *  arguments, with `envBytes` of environment settings each, come to at most
 *  MAX_ADD_BYTES. Returns how many jobs it makes. */
export function checkSweep(template: string[], lists: string[][], envBytes = 0): number {
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
  const bytes = sweepBytes(template, lists) + n * envBytes;
  if (bytes > MAX_ADD_BYTES) {
    const first = lists[0].length;
    throw usage(`the sweep makes ${n} jobs of ${mib(bytes)} of arguments and environment in all, more than the ${MAX_ADD_BYTES >> 20} MiB one request may add`,
      first > 1 ? `split it by the values of the first ::: list: ${first} of them make ${mib(bytes / first)} each on average, so about ${Math.max(1, Math.floor(first * MAX_ADD_BYTES / bytes))} at a time fit; or pass large data in files` : 'pass large data in files, and their names as arguments');
  }
  return n;
}

/** A job of a sweep that is as long as its longest: each placeholder (or appended value)
 *  filled with the longest value of its list, every word as long as it gets in any job
 *  (each list's value is picked independently, so some job has them all), and any NUL
 *  byte of a value in it. What one job of it may cost, found without making the jobs. */
export function sweepWidest(template: string[], lists: string[][]): JobSpec {
  const widest = lists.map((l) => {
    let best = '';
    for (const v of l) if (Buffer.byteLength(v) > Buffer.byteLength(best)) best = v;
    const nul = l.find((v) => v.includes('\0'));
    return nul === undefined || best.includes('\0') ? best : best + '\0';
  });
  return sweepJobs(template, widest.map((v) => [v])).next().value as JobSpec;
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

/** The value combinations of a sweep, in sweepJobs' order. */
export function* sweepValues(lists: string[][]): Generator<string[]> {
  const at = lists.map(() => 0);
  for (;;) {
    yield lists.map((l, i) => l[at[i]]);
    let i = lists.length - 1;
    while (i >= 0 && ++at[i] === lists[i].length) at[i--] = 0;
    if (i < 0) return;
  }
}

/** A template with {1} {2} ... ({} = {1}) replaced by values; a placeholder past the
 *  values stays as it is. */
export const fillPlaceholders = (template: string, values: string[]) =>
  template.replace(PLACEHOLDER_RE, (m, k: string) => values[k === '' ? 0 : Number(k) - 1] ?? m);

/** How many jobs an add event makes. */
export const addCount = (ev: Extract<Event, { e: 'add' }>) => (ev.sweep ? ev.sweep.reduce((n, l) => n * l.length, 1) : ev.jobs.length);

function newJob(st: State, id: number, spec: JobSpec, ev: Extract<Event, { e: 'add' }>, name?: string): Job {
  const job: Job = {
    id, script: intern(st, spec[0]), args: spec.length > 1 ? spec.slice(1) : NO_ARGS, cwd: intern(st, ev.cwd),
    retries: ev.retries, timeout: ev.timeout, state: 'waiting', queuedAt: ev.t,
    run: 0, retriesUsed: 0, requeues: 0, worker: null, slot: -1, startedAt: 0, endedAt: 0,
    exitCode: null, reason: null, killing: null, killAt: 0, avoid: null, history: null, qtok: 0,
    tags: ev.tags ?? NO_TAGS, priority: ev.priority ?? 0, after: ev.after ?? null, afterAny: ev.afterAny ?? null, env: ev.env ?? null, blockers: 0,
    environ: ev.environ === undefined ? null : intern(st, ev.environ),
    need: ev.need ?? PLAIN_NEED, slots: null, gpus: null,
    retryDelay: ev.retryDelay ?? 0, notBefore: 0,
  };
  if (ev.onw) job.onWorker = true;
  if (ev.workdir !== undefined) job.workdir = ev.workdir;
  if (name !== undefined) job.name = name;
  if (ev.xfer) job.transfer = ev.xfer;
  if (ev.ret) job.returns = ev.ret;
  if (ev.retopt) job.returnOptional = true;
  if (ev.cleanup) job.cleanup = true;
  return job;
}

/** Seconds before a job's first retry when add_job is not told (--retry-delay). */
export const DEFAULT_RETRY_DELAY_S = 2;
/** The longest wait before a retry. */
const RETRY_DELAY_MAX_MS = 3_600_000;
/** When retry number n (from 1) of a job may start: --retry-delay S before the first,
 *  doubling for each one after, up to an hour. */
export const retryAt = (job: Job, n: number, t: number) =>
  (job.retryDelay ? t + Math.min(RETRY_DELAY_MAX_MS, job.retryDelay * 1000 * 2 ** Math.min(20, n - 1)) : 0);
const NO_ARGS: string[] = [];
const NO_TAGS: string[] = [];

function newWorker(ev: Extract<Event, { e: 'worker' }>): Worker {
  return {
    host: ev.host, slots: ev.slots, state: 'up', ssh: ev.ssh, running: new Array(ev.slots).fill(0), probeAt: 0, probeDelay: 0, error: null, since: ev.t,
    labels: ev.labels ?? NO_TAGS, gpus: ev.gpus ?? 0, gpuJobs: new Array(ev.gpus ?? 0).fill(0), env: ev.env ?? null,
    environ: ev.environ ?? null,
    slurm: slurmTarget(ev.host),
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
  touch(st, job);
  job.reason = reason;
  job.endedAt = t;
  job.notBefore = 0;
  if (to === 'requeue') {
    setJobState(st, job, 'waiting');
    enqueue(st, job, true);
  } else {
    setJobState(st, job, to);
    job.blockers = 0; // a held job that was killed waits for nothing any more
    if (st.dependents.has(job.id)) releaseDependents(st, job.id, to === 'done' ? 'done' : to === 'killed' ? 'killed' : 'failed', t);
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
  touch(st, job);
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
    if (job.retriesUsed < job.retries) { job.retriesUsed++; settle(st, job, 'requeue', reason, t); job.notBefore = retryAt(job, job.retriesUsed, t); }
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
  } else failOrRetry(code === RETURN_MISSING_EXIT && job.returns ? 'a --return file is missing on the worker (see the log)' : null);
}

/** An add event whose jobs are being made: `made` of them so far, in order. */
export type AddCursor = { ev: Extract<Event, { e: 'add' }>; specs: Iterator<JobSpec>; names: Iterator<string[]> | null; made: number; count: number };

/** The first step of applying an add event: its ids are taken (nextId moves past them),
 *  no job is made yet; makeJobs makes them. applyEvent does both at once; the server
 *  makes a big add's jobs a part per turn (see Expansion), so that other clients are
 *  served in between. */
export function beginAdd(st: State, ev: Extract<Event, { e: 'add' }>): AddCursor {
  const count = addCount(ev);
  st.nextId = Math.max(st.nextId, ev.id + count);
  // A sweep's names are its --name with each job's values filled in.
  const names = ev.name !== undefined && ev.sweep ? sweepValues(ev.sweep) : null;
  return { ev, specs: (ev.sweep ? sweepJobs(ev.jobs[0], ev.sweep) : ev.jobs.values()), names, made: 0, count };
}

/** Makes the next jobs of an add (at most `most`), in order; true once all are made. */
export function makeJobs(st: State, cur: AddCursor, most: number): boolean {
  for (let n = 0; n < most && cur.made < cur.count; n++) {
    const r = cur.specs.next();
    if (r.done) { cur.made = cur.count; break; }
    const name = cur.names ? fillPlaceholders(cur.ev.name!, cur.names.next().value as string[]) : cur.ev.name;
    const job = newJob(st, cur.ev.id + cur.made++, r.value, cur.ev, name);
    addJob(st, job);
    queueOrHold(st, job, false);
  }
  return cur.made >= cur.count;
}

/** Applies one event to the state. The only place state changes, live and at replay.
 *  Events that no longer fit (a job that is not running any more) change nothing. */
export function applyEvent(st: State, ev: Event): void {
  switch (ev.e) {
    case 'add':
      makeJobs(st, beginAdd(st, ev), Infinity);
      break;
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
      setWorker(st, job, ev.host); job.slot = ev.slot; job.startedAt = ev.t; job.endedAt = 0;
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
      touch(st, job);
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
      touch(st, job);
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
        touch(st, job);
        if (job.state === 'running' && (job.killing === null || ev.why === 'user')) {
          // A user's kill overrides a timeout or requeue under way (and keeps its deadline).
          if (job.killing === null) job.killAt = ev.t + ev.grace;
          job.killing = ev.why;
        } else if (job.state === 'waiting' && ev.why === 'user') {
          // Nothing of an earlier attempt (it is in the history) is this one's.
          job.startedAt = 0; setWorker(st, job, null); job.slot = -1;
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
        touch(st, job);
        job.retriesUsed = 0; job.requeues = 0; job.reason = null; job.exitCode = null;
        job.queuedAt = ev.t; job.notBefore = 0;
        setJobState(st, job, 'waiting');
        reblockDependents(st, id);
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
        touch(st, job);
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
    case 'environ':
      if (!st.environs.has(ev.id)) st.environs.set(ev.id, ev.vars);
      break;
    case 'worker': {
      const w = st.workers.get(ev.host);
      if (!w) { st.workers.set(ev.host, newWorker(ev)); break; }
      // Added again: its slots, GPUs, labels, environment and flags are the new ones.
      w.slots = ev.slots; w.ssh = ev.ssh; w.labels = ev.labels ?? NO_TAGS; w.gpus = ev.gpus ?? 0; w.env = ev.env ?? null;
      w.environ = ev.environ ?? null;
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
 *  of small ones (other workers keep filling). A retry waits out its --retry-delay
 *  (`due.next`: when the first such wait ends). Workers in `unchecked` get no job.
 *  Reads the state only. */
export function planStarts(st: State, now = Infinity, due = { next: Infinity }, unchecked?: ReadonlySet<string>): Start[] {
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
    // A retry waits out its delay (due.next: the earliest such wait to end).
    if (job.notBefore > now) { due.next = Math.min(due.next, job.notBefore); continue; }
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
  startsWaitFor: string | null;        // a directory starts need that is gone: starts wait for it
  slurmCheckAt: Map<string, number>;   // when an up Slurm worker is next asked (none yet: now)
  health: Map<string, Health>;
};
export const newRuntime = (): Runtime => ({ probing: new Set(), killSent: new Set(), startFailures: 0, startsPausedUntil: 0, startsWaitFor: null, slurmCheckAt: new Map(), health: new Map() });

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
  if (!w.ssh || w.slurm || hs.heartbeatMs <= 0) return true;
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

/** What the answer to a check of a worker calls for (runProbe, runHeartbeat carry it
 *  out): the events, and the line for server.log. A probe that answered brings a down
 *  (or being checked) worker up; one that failed takes it down, or keeps it down with a
 *  longer backoff (downEvents); a routine check that finds an up worker as it was changes
 *  nothing. A failed heartbeat takes an up ssh worker down; an answered one is only
 *  runtime (the shell keeps it in rt.health). */
export function checkOutcome(st: State, host: string, kind: 'probe' | 'heartbeat', err: string | null, t: number, probeMaxMs: number, killGraceMs: number): { events: Event[]; log: string | null } {
  const w = st.workers.get(host);
  if (!w) return { events: [], log: null };
  if (kind === 'heartbeat') {
    if (err === null || !w.ssh || w.state !== 'up') return { events: [], log: null };
    return { events: downEvents(st, host, t, err, probeMaxMs, killGraceMs), log: `worker ${host} is down: ${err}` };
  }
  if (err === null) {
    return { events: w.state === 'up' && w.probeAt === 0 ? [] : [{ e: 'probe', t, host, ok: true }], log: w.state === 'down' ? `worker ${host} is up again` : null };
  }
  return { events: downEvents(st, host, t, err, probeMaxMs, killGraceMs), log: w.state === 'up' ? `worker ${host} is down: ${err}` : null };
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

/** Why waiting jobs cannot start now, for the people waiting on them (wait's progress
 *  line), or null when nothing holds them back but busy slots. */
export function whyWaiting(st: State, rt: Runtime, now: number): string | null {
  if (st.counts.waiting === 0) return null;
  if (st.paused) return 'paused: resume with cli.ts resume';
  if (st.workers.size === 0) return 'no workers: add some with add_slave';
  let up = 0, down = 0;
  for (const w of st.workers.values()) { if (schedulable(w)) up++; else if (w.state === 'down') down++; }
  if (up === 0) return down === st.workers.size ? `all ${down} worker${down === 1 ? ' is' : 's are'} down (see status)` : 'no worker takes jobs now (down, draining or being checked; see status)';
  if (rt.startsWaitFor !== null) return `starts wait for ${rt.startsWaitFor} to be back (see server.log)`;
  if (now < rt.startsPausedUntil) return 'starts pause after failed starts (see server.log)';
  return null;
}

/** A set of ids as ranges [first, last], ascending: the jobs a `wait` waits for, sent to
 *  the client so that it can ask for the same ones again after a server restart. */
export function idRanges(ids: Iterable<number>): [number, number][] {
  const sorted = [...ids].sort((a, b) => a - b), out: [number, number][] = [];
  for (const id of sorted) {
    const last = out[out.length - 1];
    if (last && id <= last[1] + 1) last[1] = Math.max(last[1], id); else out.push([id, id]);
  }
  return out;
}

/** The jobs that exist among ranges [first, last] of ids (a `wait` asked again after a
 *  restart), and how many ids the ranges name, each once. The work is bounded by the
 *  jobs that exist, not by the numbers named: the ranges are merged, clipped to the ids
 *  handed out so far, and walked id by id only if that is fewer steps than the jobs;
 *  else each job is looked up in them. */
export function jobsInRanges(st: State, ranges: unknown[]): { ids: Set<number>; named: number } {
  const rs: [number, number][] = [];
  let sorted = true;
  for (const r of ranges) {
    if (!Array.isArray(r) || r.length !== 2) throw usage('ranges are [first, last] pairs');
    const first = num(r[0], 'job id', 1), last = num(r[1], 'job id', first);
    if (rs.length && first < rs[rs.length - 1][0]) sorted = false;
    rs.push([first, last]);
  }
  if (!sorted) rs.sort((a, b) => a[0] - b[0]);
  const merged: [number, number][] = [];
  for (const [a, b] of rs) {
    const top = merged[merged.length - 1];
    if (top && a <= top[1] + 1) top[1] = Math.max(top[1], b); else merged.push([a, b]);
  }
  let named = 0, steps = 0;
  const known = st.nextId - 1;
  for (const [a, b] of merged) { named += b - a + 1; steps += Math.max(0, Math.min(b, known) - a + 1); }
  const ids = new Set<number>();
  if (steps <= st.jobs.size) {
    for (const [a, b] of merged) for (let id = a, end = Math.min(b, known); id <= end; id++) if (st.jobs.has(id)) ids.add(id);
  } else {
    for (const id of st.jobs.keys()) {
      let lo = 0, hi = merged.length - 1;
      while (lo < hi) { const mid = (lo + hi + 1) >> 1; if (merged[mid][0] <= id) lo = mid; else hi = mid - 1; }
      if (merged[lo][0] <= id && id <= merged[lo][1]) ids.add(id);
    }
  }
  return { ids, named };
}

/** What the shell carries out, after the events that call for it are on disk. */
export type Effect =
  | { kind: 'launch'; id: number }                                   // hand a started job to the launcher
  | { kind: 'signal'; id: number; sig: 'SIGTERM' | 'SIGKILL' }       // to the job's process group
  | { kind: 'probe'; host: string }                                  // ssh login check of a worker (sinfo for Slurm)
  | { kind: 'heartbeat'; host: string }                              // the same, of a worker that is up
  | { kind: 'forget-run'; id: number; run: number }                  // remove the run file of an ended run
  | { kind: 'close-ssh'; host: string }                              // the shared connections of a worker that is gone
  | { kind: 'remove-logs'; ids: number[]; below?: number }; // below: also N.log of every N < below that is no job

/** The effects an event calls for, read from the state after it was applied: a start is
 *  launched, a kill signals the jobs it stops, an end lets go of its run file. The run
 *  file goes only once the end is on disk: until then it is what tells a restarted
 *  server that the run happened. A worker that is gone (removed, or drained by this
 *  end) has its shared ssh connections closed. */
export function effectsOf(st: State, ev: Event): Effect[] {
  switch (ev.e) {
    case 'start': return st.jobs.get(ev.id)?.state === 'running' ? [{ kind: 'launch', id: ev.id }] : [];
    case 'kill': return ev.ids.filter((id) => st.jobs.get(id)?.state === 'running').map((id) => ({ kind: 'signal', id, sig: 'SIGTERM' }));
    case 'end': {
      const host = st.jobs.get(ev.id)?.history?.at(-1)?.worker;
      const gone: Effect[] = host && !st.workers.has(host) ? [{ kind: 'close-ssh', host }] : [];
      return [{ kind: 'forget-run', id: ev.id, run: ev.run }, ...gone];
    }
    case 'unworker': return [{ kind: 'close-ssh', host: ev.host }];
    case 'drain': return st.workers.has(ev.host) ? [] : [{ kind: 'close-ssh', host: ev.host }];
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
    // A Slurm partition can go down with no job of ours failing (an admin drains it, its
    // nodes fail): an up Slurm worker is asked every so often too.
    if (w.slurm && w.ssh && w.state === 'up' && w.probeAt === 0 && !rt.probing.has(w.host)) {
      const due = rt.slurmCheckAt.get(w.host) ?? now;
      if (due <= now) effects.push({ kind: 'probe', host: w.host }); else at(due);
    }
    if (w.ssh && !w.slurm && hs.heartbeatMs > 0 && w.state === 'up') { // a Slurm worker has checks of its own (sinfo)
      // Heartbeats: only while the worker has running jobs or jobs wait; one at a time,
      // none while a probe is due. Missed ones count even then: a probe of a hung host
      // takes its connect timeout to fail.
      const h = rt.health.get(w.host) ?? newHealth();
      const limit = h.missingSince > 0 ? h.missingSince + HEARTBEAT_MISSES * hs.heartbeatMs : Infinity;
      if (limit <= now) {
        const why = `no answer to checks for ${Math.round((now - h.missingSince) / 1000)}s${h.err ? ` (${h.err})` : ''}`;
        events.push(...downEvents(st, w.host, now, why, hs.probeMaxMs, killGraceMs));
        at(now); // plan again once it is down: its probes, its jobs' kills
        // planStarts reads the state before these events: it must not start a job there.
        (stale ??= new Set()).add(w.host);
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
    const due = { next: Infinity };
    // Workers not checked lately get no job: the heartbeat under way (or due) decides.
    for (const s of planStarts(st, now, due, stale ?? undefined)) {
      events.push({ e: 'start', t: now, ...s });
      const timeout = st.jobs.get(s.id)!.timeout;
      if (timeout > 0) at(now + timeout * 1000);
    }
    at(due.next);
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
export type DecideContext = {
  now: number; killGraceMs: number; argSpace: number;
  environSpace?: number; // what an exec leaves for the argv and environment of a job that runs with its add's (argSpace where not given)
};

/** The kernel's limit on one argument or environment string (Linux MAX_ARG_STRLEN). */
export const MAX_ARG_BYTES = 128 * 1024 - 1;

/** A whole number from a request (JSON numbers only: "3" or [3] is no number). */
export const num = (v: unknown, name: string, min = 0, max = Number.MAX_SAFE_INTEGER): number => {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) throw usage(`invalid ${name} ${quoteForError(JSON.stringify(v) ?? String(v))}`);
  return v;
};
const idList = (v: unknown): number[] => {
  if (!Array.isArray(v) || v.length === 0) throw usage('no job ids given');
  return [...new Set(v.map((x) => num(x, 'job id', 1)))]; // each once, as given
};
/** find {names}: the id of the one job of each name (--name); a name no job has, or
 *  that several have, is an error naming them. One pass over the jobs. */
export function idsNamed(st: State, names: unknown): number[] {
  if (!strings(names)) throw usage('names is a list of job names');
  const want = new Map(names.map((n) => [n, [] as number[]]));
  for (const job of st.jobs.values()) if (job.name !== undefined) want.get(job.name)?.push(job.id);
  return names.map((n) => {
    const ids = want.get(n)!;
    if (ids.length === 1) return ids[0];
    if (!ids.length) throw failure(`no job is named ${quoteForError(n)}`, 'see the names in: cli.ts list');
    throw failure(`${ids.length} jobs are named ${quoteForError(n)}: ${ids.slice(0, 10).join(', ')}${ids.length > 10 ? ', …' : ''}`, 'give one of their ids, or a --tag');
  });
}

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

/** The environment of the shell that ran a command (NAME=VALUE words) as its jobs or
 *  checks keep it: without the variables that must not follow (ENVIRON_DROPPED, the
 *  server's settings), sorted, so that shells that differ only in those share one copy. */
export function keptEnviron(words: string[]): string[] {
  return words.filter((w) => {
    const name = w.slice(0, w.indexOf('='));
    return name !== '' && !ENVIRON_DROPPED.has(name) && !SETTINGS.some((set) => set.env === name);
  }).sort();
}

/** A request's `environ` (the client's environment, NAME=VALUE words), checked and
 *  kept (keptEnviron), with its content id and the bytes it takes in an exec. */
export function environOf(v: unknown): { id: string; vars: string[]; bytes: number } {
  if (!strings(v)) throw usage('environ is a list of NAME=VALUE strings');
  for (const w of v) {
    if (w.indexOf('=') < 1 || w.includes('\0')) throw usage(`invalid environment word ${quoteForError(w.slice(0, 64))}`, 'environ holds NAME=VALUE words, as an environment does');
  }
  const vars = keptEnviron(v);
  let bytes = 0;
  for (const w of vars) bytes += Buffer.byteLength(w) + 1 + 8;
  if (bytes > MAX_ENVIRON_BYTES) throw usage(`the environment takes ${bytes} bytes, more than the ${MAX_ENVIRON_BYTES} one add may keep`, 'unset the large variables before add_job or add_slave (env -u NAME ...)');
  return { id: crypto.createHash('sha256').update(vars.join('\0')).digest('hex').slice(0, 16), vars, bytes };
}

/** The event that makes an environment known, unless the state has it already. */
const environEvents = (st: State, environ: { id: string; vars: string[] } | null, t: number): Event[] =>
  (environ && !st.environs.has(environ.id) ? [{ e: 'environ', t, id: environ.id, vars: environ.vars }] : []);

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

/** A job's --after-any dependencies, checked: each is a job there is or was (one that
 *  ended, however, or was removed, counts as ended). Sorted, without repeats. */
function afterAnyOf(st: State, v: unknown): number[] {
  const ids = [...new Set(idList(v))].sort((a, b) => a - b);
  for (const id of ids) if (id >= st.nextId) throw failure(`no such job '${id}' to wait for`, `ids so far end at ${st.nextId - 1}`);
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
  for (const h of (req.hosts as string[] | undefined) ?? []) validateHost(h);
  const hosts = [...new Set(((req.hosts as string[] | undefined) ?? []).map(bareHost))].sort();
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

/** The jobs of an add_jobs request, checked: how many (at most MAX_SWEEP_JOBS), the
 *  bytes of all (MAX_ADD_BYTES), and each job's words (what an exec takes); a sweep's
 *  from its template and values. Returns the count. A generator that pauses every
 *  STEP_JOBS jobs, so that the server can check a big list in parts (checkScripts) and
 *  serve others in between; runSteps runs it through at once. */
export function* checkJobList(req: Request, envBytes: number, envText: number, argSpace: number): Generator<void, number> {
  const jobs = req.jobs as unknown[];
  // An --on-worker command needs a name, not an absolute path; it goes to the worker in
  // one environment variable (see onWorkerInput), with its directory.
  const onWorker = req.onWorker === true, place = String(req.workdir ?? req.cwd ?? '');
  let count = jobs.length;
  if (req.sweep !== undefined) {
    if (!Array.isArray(req.sweep) || !req.sweep.every(strings) || jobs.length !== 1 || !strings(jobs[0])) throw usage('a sweep is one job and lists of strings');
    count = checkSweep(jobs[0] as string[], req.sweep as string[][], envText);
  } else {
    // Each job keeps its own copy of the settings once a snapshot has been loaded.
    let bytes = count * envText;
    for (let k = 0; k < jobs.length; k++) {
      const spec = jobs[k];
      if (strings(spec)) for (let i = 1; i < spec.length; i++) bytes += Buffer.byteLength(spec[i]);
      if (k % STEP_JOBS === STEP_JOBS - 1) yield;
    }
    if (bytes > MAX_ADD_BYTES) throw usage(`the ${count} jobs hold ${mib(bytes)} of arguments and environment in all, more than the ${MAX_ADD_BYTES >> 20} MiB one request may add`, 'split them over several add_jobs, or pass large data in files');
  }
  if (count > MAX_SWEEP_JOBS) throw usage(`${count} jobs in one request, more than the ${MAX_SWEEP_JOBS} one request may add`, 'split them over several add_jobs');
  // A sweep's jobs are checked from its template and values (sweepWidest), not one by one.
  let k = 0;
  for (const spec of req.sweep === undefined ? jobs : [sweepWidest(jobs[0] as string[], req.sweep as string[][])]) {
    if (++k % STEP_JOBS === 0) yield;
    if (!strings(spec) || spec.length === 0) throw usage('a job is a list of strings');
    if (spec.some((w) => w.includes('\0'))) throw usage("a job's words cannot hold NUL bytes");
    if (onWorker ? spec[0] === '' : !path.isAbsolute(spec[0])) throw usage(onWorker ? 'an --on-worker command needs a name' : `script path is not absolute: ${quoteForError(spec[0])}`);
    // An exec that the kernel refuses would fail the job every time it starts.
    let bytes = 0;
    for (const w of spec) {
      const n = Buffer.byteLength(w);
      if (n > MAX_ARG_BYTES) throw usage(`an argument of ${n} bytes is longer than the system allows one argument (${MAX_ARG_BYTES} bytes)`, 'pass large data in a file instead');
      bytes += n + 1 + 8;
    }
    if (bytes + envBytes > argSpace) throw usage(`a job's arguments${envBytes ? ' and --env settings' : ''} take ${bytes + envBytes} bytes, more than the ${argSpace} an exec leaves beside the environment (ARG_MAX)`, 'pass large data in a file instead');
    if (onWorker && bytes + envText + Buffer.byteLength(place) > ON_WORKER_MAX_BYTES) {
      throw usage(`an --on-worker command with its arguments${envText ? ' and --env settings' : ''} takes ${bytes + envText} bytes, more than the ${ON_WORKER_MAX_BYTES} that go to the worker with it`, 'pass large data in a file instead');
    }
  }
  // Each job's name, filled from its sweep values, must still be a name.
  if (typeof req.name === 'string' && req.sweep !== undefined) {
    let n = 0;
    for (const values of sweepValues(req.sweep as string[][])) {
      nameOf(fillPlaceholders(req.name, values), false);
      if (++n % STEP_JOBS === 0) yield;
    }
  }
  return count;
}

/** What a job's --env settings cost: in its exec (each with its pointer), and as text. */
export function envCosts(env: string[]): [number, number] {
  let envBytes = 0, envText = 0;
  for (const w of env) {
    const n = Buffer.byteLength(w);
    if (n > MAX_ARG_BYTES) throw usage(`an environment setting of ${n} bytes is longer than the system allows one (${MAX_ARG_BYTES} bytes)`, 'pass large data in a file instead');
    envBytes += n + 1 + 8;
    envText += n;
  }
  return [envBytes, envText];
}

/** Jobs checked between two pauses of a long check (checkJobList, clipyStatusSteps). */
export const STEP_JOBS = 20_000;
/** Where a request's jobs were checked already, in parts (the server's check phase): their
 *  count (add_jobs), or the LoadPlan (load_status). A symbol: no JSON request carries it. */
export const JOBS_CHECKED = Symbol('jobs checked');
/** Runs a generator of steps (checkJobList) through at once, and returns its value. */
export function runSteps<T>(g: Generator<void, T>): T {
  for (;;) { const r = g.next(); if (r.done) return r.value; }
}

/** add_jobs {cwd, jobs: [[script, ...args]], retries, timeout, tags?, priority?, after?,
 *  afterAny?, env?, slots?, gpus?, require?, avoid?, hosts?}: the scripts were checked
 *  (absolute, executable) before; ids are handed out in order. */
export function decideAddJobs(st: State, req: Request, c: DecideContext): Decision {
  const { cwd, jobs } = req;
  if (typeof cwd !== 'string' || !path.isAbsolute(cwd) || cwd.includes('\0')) throw usage('add_jobs needs an absolute cwd');
  if (!Array.isArray(jobs) || jobs.length === 0) throw usage('no jobs given');
  if (req.tags !== undefined && !Array.isArray(req.tags)) throw usage('tags is a list');
  const tags = req.tags === undefined ? [] : [...new Set((req.tags as unknown[]).map(tagOf))].sort();
  const priority = priorityOf(req.priority ?? 0);
  const after = req.after === undefined || (Array.isArray(req.after) && req.after.length === 0) ? [] : afterOf(st, req.after);
  // A job named in both must end done (--after says more).
  const afterAny = req.afterAny === undefined || (Array.isArray(req.afterAny) && req.afterAny.length === 0) ? [] : afterAnyOf(st, req.afterAny).filter((d) => !after.includes(d));
  const env = req.env === undefined ? [] : envOf(req.env);
  const environ = req.environ === undefined ? null : environOf(req.environ);
  const space = environ ? (c.environSpace ?? c.argSpace) - environ.bytes : c.argSpace;
  const need = needOf(req);
  const onWorker = req.onWorker === true;
  if (req.onWorker !== undefined && typeof req.onWorker !== 'boolean') throw usage('onWorker is true or false');
  if (req.workdir !== undefined && !onWorker) throw usage('--workdir is for --on-worker commands', 'a script runs in the directory it was queued in; cd there in the script');
  const workdir = req.workdir === undefined ? undefined : workdirOf(req.workdir);
  const name = req.name === undefined ? undefined : nameOf(req.name, req.sweep !== undefined);
  const [envBytes, envText] = envCosts(env);
  const checked = (req as Record<symbol, unknown>)[JOBS_CHECKED];
  const count = typeof checked === 'number' ? checked : runSteps(checkJobList(req, envBytes, envText, space));
  const id = st.nextId;
  const ev: Extract<Event, { e: 'add' }> = { e: 'add', t: c.now, id, cwd, retries: num(req.retries ?? 0, 'retries'), timeout: num(req.timeout ?? 0, 'timeout'), jobs: jobs as JobSpec[] };
  const retryDelay = num(req.retryDelay ?? DEFAULT_RETRY_DELAY_S, 'retry delay', 0, 86_400);
  if (retryDelay) ev.retryDelay = retryDelay;
  // Campaign fields only where given, so plain jobs cost the journal nothing more.
  if (tags.length) ev.tags = tags;
  if (priority) ev.priority = priority;
  if (after.length) ev.after = after;
  if (afterAny.length) ev.afterAny = afterAny;
  if (env.length) ev.env = env;
  if (environ) ev.environ = environ.id;
  if (req.sweep !== undefined) ev.sweep = req.sweep as string[][];
  if (!isPlain(need)) ev.need = need;
  if (onWorker) ev.onw = true;
  if (workdir !== undefined) ev.workdir = workdir;
  if (name !== undefined) ev.name = name;
  Object.assign(ev, transferOf(req, onWorker));
  // Workers come and go, so such jobs are queued all the same; but say so.
  const answer: Record<string, unknown> = { first: id, count };
  // Jobs that nothing will run: the person adding them should know now, not at `wait`.
  if (st.workers.size === 0) answer.warning = `no workers yet: ${count === 1 ? 'the job waits' : 'the jobs wait'} until you add some with add_slave`;
  else if (![...st.workers.values()].some((w) => w.state !== 'draining')) answer.warning = 'no worker takes jobs (every one is being removed): add some with add_slave';
  else if (!isPlain(need) && ![...st.workers.values()].some((w) => admits(w, need))) answer.warning = `no worker can take ${count === 1 ? 'this job' : 'these jobs'} now (${describeNeed(need)}); ${count === 1 ? 'it waits' : 'they wait'} until one is added`;
  return { events: [...environEvents(st, environ, c.now), ev], answer };
}

/** What an --on-worker command, its arguments, --env settings and directory may hold in
 *  all, in bytes: hex-encoded, they must fit one environment variable of an exec
 *  (MAX_ARG_BYTES; see onWorkerInput), beside the worker's settings. */
export const ON_WORKER_MAX_BYTES = 60_000;
/** The longest --name. */
const MAX_NAME_LENGTH = 200;

/** The --transfer, --return, --return-optional and --cleanup of an add, checked, as the
 *  add event's fields. Only for --on-worker commands. (That a --transfer file exists now
 *  is checked before, with the scripts: checkScripts.) */
function transferOf(req: Request, onWorker: boolean): { xfer?: string[]; ret?: string[]; retopt?: true; cleanup?: true } {
  const files = (v: unknown, what: string) => {
    if (v === undefined) return [];
    if (!Array.isArray(v) || v.length > 1000 || !v.every((f) => typeof f === 'string')) throw usage(`${what} is a list of file names`);
    for (const f of v as string[]) {
      if (f === '' || f.includes('\0') || f.split('/').includes('..')) throw usage(`invalid ${what} file ${quoteForError(f)}`, 'a file name without .. in it');
      if (what === '--return' && path.isAbsolute(f)) throw usage(`invalid --return file ${quoteForError(f)}`, 'a --return file is a path in the job\'s directory on the worker, and comes back to the same path in the current directory');
    }
    return v as string[];
  };
  const xfer = files(req.transfer, '--transfer'), ret = files(req.return, '--return');
  for (const k of ['returnOptional', 'cleanup'] as const) if (req[k] !== undefined && typeof req[k] !== 'boolean') throw usage(`${k} is true or false`);
  const any = xfer.length > 0 || ret.length > 0 || req.returnOptional === true || req.cleanup === true;
  if (!any) return {};
  if (!onWorker) throw usage('--transfer, --return, --return-optional and --cleanup are for --on-worker commands', 'add --on-worker: the files go to the job\'s directory on the worker');
  return { ...(xfer.length ? { xfer } : {}), ...(ret.length ? { ret } : {}), ...(req.returnOptional ? { retopt: true as const } : {}), ...(req.cleanup ? { cleanup: true as const } : {}) };
}

/** A --workdir, checked: absolute, or ~ or ~/... (the worker's home directory). */
export function workdirOf(v: unknown): string {
  if (typeof v !== 'string' || !(v.startsWith('/') || v === '~' || v.startsWith('~/')) || v.includes('\0')) {
    throw usage(`invalid workdir ${quoteForError(typeof v === 'string' ? v : JSON.stringify(v) ?? String(v))}`, 'a workdir is an absolute path, or ~ or ~/DIR on the worker');
  }
  return v;
}

/** A --name, checked: up to MAX_NAME_LENGTH characters, no control characters, not a
 *  whole number (it would read as an id) and not starting with - (as an option would).
 *  A template (of a sweep) is checked again once filled. */
export function nameOf(v: unknown, template: boolean): string {
  const shown = typeof v === 'string' ? v : JSON.stringify(v) ?? String(v);
  if (typeof v !== 'string' || v === '' || v.length > MAX_NAME_LENGTH || /[\x00-\x1f\x7f]/.test(v) || v.startsWith('-') || (!template && /^\d+$/.test(v))) {
    throw usage(`invalid job name ${quoteForError(shown)}`, `a name is 1 to ${MAX_NAME_LENGTH} characters, without control characters, not a whole number (that is an id) and not starting with -`);
  }
  return v;
}

/** Throws unless some job carries the tag (a typo should not look like "nothing to do"). */
function tagKnown(st: State, req: Request): void {
  if (req.tag !== undefined && !st.tagCounts.has(tagOf(req.tag))) throw failure(`no job has the tag ${quoteForError(String(req.tag))}`, 'see the tags in: cli.ts status');
}

/** remove_jobs {ids} | {tag} | {script, args, env?}: waiting jobs only. Jobs held for a
 *  removed job fail (`dependency N removed`), but for --after-any, which goes on. */
export function decideRemoveJobs(st: State, req: Request, c: DecideContext): Decision {
  let ids: number[];
  if (req.ids !== undefined || req.tag !== undefined) {
    tagKnown(st, req);
    ids = chosenJobs(st, req, (job) => job.state === 'waiting' ? null : `job '${job.id}' is ${job.state}, not waiting${job.state === 'running' ? `; stop it with: kill ${job.id}` : ''}`);
  } else {
    const { script, args } = req;
    if (typeof script !== 'string' || !strings(args)) throw usage('remove_job needs a script and args');
    // With env (cli.py's remove_job -e), only jobs with exactly those settings.
    const env = req.env === undefined ? null : [...envOf(req.env)].sort().join('\0');
    ids = [];
    for (const job of st.jobs.values()) {
      if (job.state === 'waiting' && (job.onWorker ? job.script === (req.command ?? script) : job.script === script) && job.args.length === args.length && job.args.every((a, i) => a === args[i]) &&
        (env === null || [...(job.env ?? [])].sort().join('\0') === env)) ids.push(job.id);
    }
    if (ids.length === 0) {
      // `remove_job 3` means job 3 more often than a script named 3.
      const words = [path.basename(script), ...args];
      const byId = words.every((w) => /^\d+$/.test(w) && st.jobs.has(Number(w)));
      throw failure(`no waiting job runs ${quoteForError([script, ...args].map(shellQuote).join(' '))}`,
        byId ? `${words.length === 1 ? `${words[0]} is a job id` : `${words.join(' ')} are job ids`}: cli.ts remove_job --id ${words.join(' ')}` : undefined);
    }
  }
  // Later jobs first: one held for another that goes too (its dependencies have lower
  // ids) is removed with it, not failed for it.
  const order = [...ids].sort((a, b) => b - a);
  return { events: ids.length ? [{ e: 'remove', t: c.now, ids: order }] : [], answer: { ids: [...ids].sort((a, b) => a - b) } };
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
  // A job can run again only if each of its dependencies is done, still to end, or
  // retried with it (--after-any ones always can: any end will do). Asked for by id,
  // one that cannot is an error; asked for in bulk (--failed, --killed, --tag), it is
  // left out, and so are those that wait for it.
  const set = new Set(ids), skipped: { id: number; why: string; hint?: string }[] = [];
  for (let changed = true; changed;) {
    changed = false;
    for (const id of set) {
      for (const d of st.jobs.get(id)!.after ?? NO_IDS) {
        const dep = st.jobs.get(d);
        if (set.has(d) || depDone(st, d) || (dep && !isFinished(dep.state))) continue;
        const why = `job ${id} waits for job ${d}, which ${dep ? `ended ${dep.state}` : 'was forgotten before it ended done'}`;
        const hint = dep ? `retry both: retry ${d} ${id}` : undefined;
        if (req.ids !== undefined) throw failure(`job '${id}' ${why.slice(`job ${id} `.length)}`, hint);
        set.delete(id);
        skipped.push(hint ? { id, why, hint } : { id, why });
        changed = true;
        break;
      }
    }
  }
  const kept = ids.filter((id) => set.has(id));
  return { events: kept.length ? [{ e: 'retry', t: c.now, ids: kept }] : [], answer: skipped.length ? { ids: kept, skipped } : { ids: kept } };
}

/** The states `clean --state` takes: the finished ones. */
export const FINISHED_STATES = ['done', 'failed', 'killed'] as const;

/** clean {logs, tag, states}: forgets finished jobs (of a tag; in those states: done,
 *  failed, killed) and removes their logs (and, with logs, those left by jobs
 *  forgotten before). Answers how many of each state it forgot. */
export function decideClean(st: State, req: Request, c: DecideContext): Decision {
  tagKnown(st, req);
  const tag = req.tag === undefined ? undefined : tagOf(req.tag);
  let states: Set<JobState> | undefined;
  if (req.states !== undefined) {
    if (!strings(req.states) || req.states.length === 0) throw usage('states is a list of done, failed, killed');
    for (const s of req.states) if (!(FINISHED_STATES as readonly string[]).includes(s)) throw usage(`clean takes finished states, not ${quoteForError(s)}`, `states are ${FINISHED_STATES.join(', ')}`);
    states = new Set(req.states as JobState[]);
  }
  const ids: number[] = [], counts = { done: 0, failed: 0, killed: 0 };
  for (const j of st.jobs.values()) {
    if (!isFinished(j.state) || (states && !states.has(j.state)) || (tag !== undefined && !j.tags.includes(tag))) continue;
    ids.push(j.id);
    counts[j.state as keyof typeof counts]++;
  }
  const logs = req.logs === true;
  const ev: Extract<Event, { e: 'clean' }> = { e: 'clean', t: c.now, logs };
  if (tag !== undefined || states) ev.ids = ids;
  return {
    events: ids.length ? [ev] : [],
    answer: { count: ids.length, states: counts },
    effects: logs ? [{ kind: 'remove-logs', ids, below: st.nextId }] : [],
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

/** pause {tag?, ahead?} / resume {tag?}: nothing new starts (of that tag); running jobs
 *  go on. A tag no job has and that is not paused is refused (a typo would pause
 *  nothing), unless `ahead` asks to pause it before its jobs are queued. */
export function decidePause(st: State, req: Request, c: DecideContext): Decision {
  const tag = req.tag === undefined ? undefined : tagOf(req.tag);
  const pause = req.op === 'pause';
  const was = tag === undefined ? st.paused : st.pausedTags.has(tag);
  if (req.ahead === true && (!pause || tag === undefined)) throw usage('--ahead goes with pause --tag TAG');
  if (tag !== undefined && !was && !st.tagCounts.has(tag) && req.ahead !== true) {
    throw failure(`no job has the tag ${quoteForError(tag)}`, pause ? `to pause it before its jobs are added: cli.ts pause --tag ${tag} --ahead; the tags are in: cli.ts status` : 'see the tags in: cli.ts status');
  }
  const ev: Extract<Event, { e: 'pause' | 'resume' }> = { e: pause ? 'pause' : 'resume', t: c.now };
  if (tag !== undefined) ev.tag = tag;
  return { events: was === pause ? [] : [ev], answer: { changed: was !== pause, pausedTags: [...st.pausedTags], ...(tag !== undefined && !st.tagCounts.has(tag) ? { noJobs: true } : {}) } };
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
    if (w.auto === true && slurmTarget(w.host)) throw usage(`${quoteForError(w.host)}: a Slurm worker needs a slot count, not auto`, 'its slots are how many jobs may be in the partition at once: slurm:PARTITION:N');
    const host = bareHost(w.host);
    const env = w.env === undefined ? [] : envOf(w.env);
    return {
      host, slots: num(w.slots ?? 1, 'slot count', 1, MAX_SLOTS), gpus: num(w.gpus ?? 0, 'GPU count', 0, MAX_GPUS),
      labels: labelList(w.labels, 'labels'), env, auto: w.auto === true,
    };
  });
}

/** add_workers {workers, skipCheck, requeueOnDown}: the ssh login check (unless skipped)
 *  passed before, and filled in the size of `auto` workers. */
export function decideAddWorkers(st: State, req: Request, c: DecideContext): Decision {
  const workers = workerSpecs(req);
  const bad = workers.find((w) => w.auto);
  if (bad) throw usage(`${quoteForError(bad.host)}: auto needs the ssh login check, which reads the host's CPUs and GPUs`, 'drop --skip_ssh_auth_check, or give --slots N and --gpus N');
  const environ = req.environ === undefined ? null : environOf(req.environ);
  const d: Decision = {
    events: [...environEvents(st, environ, c.now), ...workers.map((w) => {
      const ev: Extract<Event, { e: 'worker' }> = { e: 'worker', t: c.now, host: w.host, slots: w.slots, ssh: req.skipCheck !== true };
      if (w.labels.length) ev.labels = w.labels;
      if (w.gpus) ev.gpus = w.gpus;
      if (w.env.length) ev.env = w.env;
      if (req.requeueOnDown === true) ev.rod = true;
      if (environ) ev.environ = environ.id;
      return ev;
    })],
    answer: { added: workers.map((w) => ({ host: w.host, slots: w.slots, gpus: w.gpus, labels: w.labels })) },
  };
  return { ...d, answer: { ...d.answer, ...reAdded(st, d.events.filter((e): e is Extract<Event, { e: 'worker' }> => e.e === 'worker')) } };
}

/** What adding workers again changes, since a worker added again takes only what this
 *  add gives (labels, GPUs, environment left out are dropped): one line per worker that
 *  changed ("node3: labels gpu -> none, gpus 2 -> 0"), and a warning when waiting jobs
 *  that some worker could hold before fit none after. */
export function reAdded(st: State, events: Extract<Event, { e: 'worker' }>[]): { changes?: string[]; warning?: string } {
  const changes: string[] = [];
  const after = new Map(st.workers);
  for (const ev of events) {
    const was = st.workers.get(ev.host), now = newWorker(ev);
    after.set(ev.host, now);
    if (!was) continue;
    const list = (xs: string[] | null) => (xs?.length ? xs.join(',') : 'none');
    const diff: string[] = [];
    if (was.slots !== now.slots) diff.push(`slots ${was.slots} -> ${now.slots}`);
    if (list(was.labels) !== list(now.labels)) diff.push(`labels ${list(was.labels)} -> ${list(now.labels)}`);
    if (was.gpus !== now.gpus) diff.push(`gpus ${was.gpus} -> ${now.gpus}`);
    if (list(was.env) !== list(now.env)) diff.push(`env ${list(was.env)} -> ${list(now.env)}`);
    if (Boolean(was.requeueOnDown) !== Boolean(now.requeueOnDown)) diff.push(`requeue-on-down ${was.requeueOnDown ? 'on -> off' : 'off -> on'}`);
    if (diff.length) changes.push(`${ev.host}: ${diff.join(', ')}`);
  }
  if (!changes.length) return {};
  // Each distinct need once (the jobs of one add share theirs): did it fit before, and now?
  const fit = new Map<Need, boolean>(), lost = new Map<Need, number>();
  for (const job of st.jobs.values()) {
    if (job.state !== 'waiting') continue;
    let now = fit.get(job.need);
    if (now === undefined) {
      const before = [...st.workers.values()].some((w) => admits(w, job.need));
      now = !before || [...after.values()].some((w) => admits(w, job.need));
      fit.set(job.need, now);
    }
    if (!now) lost.set(job.need, (lost.get(job.need) ?? 0) + 1);
  }
  if (!lost.size) return { changes };
  const n = [...lost.values()].reduce((a, b) => a + b, 0), needs = [...lost.keys()];
  const what = needs.slice(0, 3).map(describeNeed).join('; ') + (needs.length > 3 ? `; and ${needs.length - 3} more` : '');
  return { changes, warning: `${n} waiting job${n === 1 ? '' : 's'} no longer fit${n === 1 ? 's' : ''} any worker (${what}); ${n === 1 ? 'it waits' : 'they wait'} until one is added` };
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
  for (const host of new Set(req.hosts.map((h) => (st.workers.has(h) ? h : bareHost(h))))) {
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

/** load_status {cwd, status, alive, skipCheck}: cli.py's state (parseClipyStatus) in
 *  one decision, so one group commit holds all of it: its workers (1 slot each, their
 *  envs as worker --env) and its waiting jobs in order (their envs as job --env).
 *  `alive` names the cli.py jobs whose process still runs here (the check found them):
 *  such a job is not run again, and its worker is not added while it runs, since the
 *  job holds it; the answer says so. A job of cli.py that has ended is reported, not
 *  run again: cli.py kept no exit codes. A worker djs has already keeps its settings. */
export function decideLoadStatus(st: State, req: Request, c: DecideContext): Decision {
  if (typeof req.cwd !== 'string' || !path.isAbsolute(req.cwd)) throw usage('load_status needs an absolute cwd');
  const plan = ((req as Record<symbol, unknown>)[JOBS_CHECKED] as LoadPlan | undefined) ?? runSteps(loadPlanSteps(req.status, req.cwd, c.argSpace));
  const status = plan.status;
  const alive = new Set(strings(req.alive) ? req.alive : []);
  if (!status.workers.length && !status.jobs.length) throw failure('nothing to load: no slaves and no waiting jobs');
  const events: Event[] = [];
  const added: string[] = [], present: string[] = [], removing: string[] = [];
  const held: (ClipyRunning & { host: string; env: string[] })[] = [], ended: (ClipyRunning & { host: string })[] = [];
  const toAdd: Record<string, unknown>[] = [];
  for (const w of status.workers) {
    if (w.job && alive.has(w.job.id)) { held.push({ ...w.job, host: w.host, env: w.env }); continue; }
    if (w.job) ended.push({ ...w.job, host: w.host });
    if (w.removing) removing.push(w.host);
    else if (st.workers.has(w.host)) present.push(w.host);
    else { toAdd.push({ host: w.host, env: w.env }); added.push(w.host); }
  }
  // The workers' checks and the jobs run with the environment of the shell that loaded them.
  const environ = req.environ === undefined ? {} : { environ: req.environ };
  if (toAdd.length) events.push(...decideAddWorkers(st, { op: 'add_workers', workers: toAdd, skipCheck: req.skipCheck === true, ...environ }, c).events);
  // Jobs in a row with the same envs share one add; ids follow the waitlist's order.
  let nextId = st.nextId;
  for (const { env, jobs, count } of plan.groups) {
    // decideAddJobs numbers from st.nextId; the adds before this one in the same decision took those ids.
    const d = decideAddJobs({ ...st, nextId }, { op: 'add_jobs', cwd: req.cwd, jobs, ...(env.length ? { env } : {}), ...environ, [JOBS_CHECKED]: count }, c);
    events.push(...d.events.filter((ev) => ev.e !== 'environ' || !events.some((e) => e.e === 'environ' && e.id === ev.id)));
    nextId += count;
  }
  const changed = plan.changed;
  return {
    events,
    answer: {
      added, present, removing, held, ended, first: st.nextId, count: status.jobs.length,
      ...(changed ? { warning: `${changed} job${changed === 1 ? '' : 's'} of the waitlist ha${changed === 1 ? 's' : 've'} arguments a shell would have read differently (cli.py ran jobs through sh -c; djs passes each word as it is): check them with cli.ts list --state waiting` } : {}),
    },
  };
}

/** A cli.py state read and checked for load_status (loadPlanSteps): its waitlist in
 *  runs of jobs with the same envs (one add each, jobs checked: checkJobList), and how
 *  many jobs a shell would have read differently. */
export type LoadPlan = { status: ClipyStatus; groups: { env: string[]; jobs: JobSpec[]; count: number }[]; changed: number };

/** The LoadPlan of a cli.py state, pausing every STEP_JOBS jobs (see checkJobList). */
export function* loadPlanSteps(v: unknown, cwd: string, argSpace: number): Generator<void, LoadPlan> {
  const status = yield* clipyStatusSteps(v, cwd);
  const groups: LoadPlan['groups'] = [];
  let changed = 0;
  for (let i = 0, n = status.jobs.length; i < n;) {
    const key = status.jobs[i].env.join('\0');
    let j = i;
    for (; j < n && status.jobs[j].env.join('\0') === key; j++) {
      if (shellWouldChange(status.jobs[j].argv.slice(1))) changed++;
      if (j % STEP_JOBS === STEP_JOBS - 1) yield;
    }
    const env = status.jobs[i].env, jobs = status.jobs.slice(i, j).map((g) => g.argv);
    const [envBytes, envText] = envCosts(env);
    groups.push({ env, jobs, count: yield* checkJobList({ op: 'add_jobs', jobs }, envBytes, envText, argSpace) });
    i = j;
  }
  return { status, groups, changed };
}

/** Host strings reach ssh and scripts: a user@ prefix, a name or address, nothing a
 *  shell or ssh could read as an option or interpret. An IPv6 address is bare (ssh and
 *  SLAVE_IP get `::1`, which ssh takes as it is); `[::1]` is accepted as the same host. */
const HOST_RE = /^(?:[A-Za-z0-9_][A-Za-z0-9_.+-]*@)?(?:[A-Za-z0-9_][A-Za-z0-9_.-]*|(?:[0-9A-Fa-f.]*:){2,}[0-9A-Fa-f.]*(?:%[A-Za-z0-9_.-]+)?|\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?\])$/;

export function validateHost(host: string): void {
  if (host.length === 0) throw usage(`empty host name`);
  if (host.startsWith(SLURM_PREFIX)) return validateSlurmWorker(host);
  if (host.length > MAX_HOST_LENGTH || !HOST_RE.test(host)) {
    throw usage(`invalid host ${quoteForError(host)}`, 'a host is a name or address with an optional user@, like node7, alice@10.0.0.5 or ::1');
  }
}

/** Workers named slurm:PARTITION[@LOGIN_HOST] are Slurm partitions (see SlurmTarget). */
const SLURM_PREFIX = 'slurm:';
const SLURM_RE = /^slurm:([A-Za-z0-9_][A-Za-z0-9_.-]*)(?:@([\s\S]+))?$/;

/** The partition and login host a worker's name points at, or null for an ssh host. */
export function slurmTarget(host: string): SlurmTarget | null {
  const m = SLURM_RE.exec(host);
  return m ? { partition: m[1], login: m[2] ?? null } : null;
}

/** A Slurm worker's name: a plain partition name, and a login host that is a valid ssh host. */
function validateSlurmWorker(host: string): void {
  const target = slurmTarget(host);
  if (host.length > MAX_HOST_LENGTH || !target || (target.login !== null && !HOST_RE.test(target.login))) {
    throw usage(`invalid Slurm worker ${quoteForError(host)}`, 'a Slurm worker is slurm:PARTITION or slurm:PARTITION@LOGIN_HOST, like slurm:gpu@alice@login.cluster.org');
  }
}

/** A worker's name as ssh gets it: `[v6]` and `user@[v6]` lose their brackets. */
export const bareHost = (host: string) => host.replace(/^([^@[\]]*@)?\[([^\]]*)\]$/, '$1$2');

/** Slot counts above this, read from HOST:N when the login check is skipped, are more
 *  likely a port (cli.py took any string as a worker's name: user1@199:1000). */
export const PLAUSIBLE_SLOTS = 256;

/** Splits HOST[:SLOTS|:auto]; `auto` (or defaultAuto, from --slots auto, for a host
 *  without a count) leaves the size to the login check. IPv6: `[::1]:4` (host `::1`, 4
 *  slots); a bare address (`::1`, `fe80::1`) is all host, its slots from --slots. */
export function parseWorkerArg(arg: string, defaultSlots: number, defaultAuto = false): { host: string; slots: number; auto: boolean } {
  const v6 = /^([^@[\]]*@)?\[([^\]]*)\](?::(\d+|auto))?$/.exec(arg);
  const m: (string | undefined)[] = v6 ? [arg, bareHost(arg.slice(0, arg.indexOf(']') + 1)), v6[3]]
    : /^(?:[^:]*@)?(?:[0-9A-Fa-f.]*:){2,}/.test(arg) ? [arg, arg, undefined]
    : /^([\s\S]*?)(?::(\d+|auto))?$/.exec(arg)!;
  const host = m[1]!, auto = m[2] === 'auto' || (m[2] === undefined && defaultAuto);
  const slots = auto ? 1 : m[2] === undefined ? defaultSlots : Number(m[2]);
  validateHost(host);
  if (!Number.isSafeInteger(slots) || slots < 1 || slots > MAX_SLOTS) throw usage(`invalid slot count in ${quoteForError(arg)}`, `slots are 1 to ${MAX_SLOTS}, or auto`);
  return { host, slots, auto };
}

/** A warning for HOST:N with N above PLAUSIBLE_SLOTS when no login check reads the
 *  host's size: cli.py's users wrote ports there. Null when the count is plausible. */
export function manySlotsWarning(arg: string, slots: number, skipCheck: boolean): string | null {
  if (!skipCheck || slots <= PLAUSIBLE_SLOTS || !/:\d+$/.test(arg)) return null;
  const host = arg.slice(0, arg.lastIndexOf(':'));
  return `${quoteForError(arg)} is worker ${quoteForError(host)} with ${slots} slots; if ${slots} is a port, not a slot count, ` +
    `put it in ~/.ssh/config (Host ... Port ${slots}) or in the worker's environment (-e PORT=${slots}), and give slots with --slots N`;
}

// ---- cli.py's state: what load_status reads ---------------------------------------
// cli.py (the Python scheduler djs replaces) printed its state with `status` as
// {"job_waitlist": [[ARGV, ENVS], ...], "slaves": [{"ip", "envs", "status",
// "running_job": null | {"id", "script", "envs", "pid", "log_file"},
// "remove_after_finish"?}]}; ARGV is the script and its arguments, ENVS NAME=VALUE
// strings. A running job's "script" is the job's environment ({NAME: VALUE}) and its
// "envs" the ARGV: cli.py builds its JobInfo with the two swapped, so that is what it
// prints (test/fixtures/clipy holds real output); the names as meant (script: ARGV)
// load too. Its README shows older waitlist entries as bare ARGV lists, and slaves
// without envs; both load.

/** A job cli.py was running when its state was printed. */
export type ClipyRunning = { id: string; argv: string[]; jobEnv: string[]; pid: number; log: string };
export type ClipyWorker = { host: string; env: string[]; removing: boolean; job: ClipyRunning | null };
export type ClipyStatus = { workers: ClipyWorker[]; jobs: { argv: string[]; env: string[] }[] };

/** cli.py's status JSON (parsed), checked and read into workers and waiting jobs; a
 *  relative script is resolved against cwd. Errors name the entry. */
export const parseClipyStatus = (v: unknown, cwd: string): ClipyStatus => runSteps(clipyStatusSteps(v, cwd));

/** parseClipyStatus, pausing every STEP_JOBS entries of the waitlist (see checkJobList). */
export function* clipyStatusSteps(v: unknown, cwd: string): Generator<void, ClipyStatus> {
  const at = <T>(where: string, fn: () => T): T => {
    try { return fn(); } catch (e) {
      const u = e instanceof UserError ? e : failure(String((e as Error)?.message ?? e));
      throw new UserError(EXIT_FAILED, `${where}: ${u.message}`, u.hint);
    }
  };
  const obj = (x: unknown): x is Record<string, unknown> => typeof x === 'object' && x !== null && !Array.isArray(x);
  if (!obj(v) || !Array.isArray(v.job_waitlist) || !Array.isArray(v.slaves)) {
    if (obj(v) && obj(v.counts) && Array.isArray(v.workers)) {
      throw failure("this is the status of djs, not of cli.py", "to move a djs server, stop it and move its data dir; see 'Coming from cli.py' in the README");
    }
    throw failure('not the status of cli.py: expected {"job_waitlist": [...], "slaves": [...]}', 'make it with: ./cli.py status > st.json');
  }
  if (v.job_waitlist.length > MAX_SWEEP_JOBS) {
    throw usage(`the waitlist holds ${v.job_waitlist.length} jobs, more than the ${MAX_SWEEP_JOBS} one command may add`, 'split it: load_status a file with part of the waitlist at a time (the slaves in the first)');
  }
  const scripts = new Map<string, string>(); // resolved once per script, not per job
  const argvOf = (x: unknown): string[] => {
    if (!strings(x) || x.length === 0 || x[0] === '') throw failure('a job is a non-empty list of strings: the script, then its arguments');
    if (x.some((w) => w.includes('\0'))) throw failure("a job's words cannot hold NUL bytes");
    let script = scripts.get(x[0]);
    if (script === undefined) scripts.set(x[0], script = path.resolve(cwd, x[0]));
    const argv = x.slice();
    argv[0] = script;
    return argv;
  };
  const envDict = (x: unknown): string[] => {
    if (x === undefined || x === null) return [];
    if (!obj(x) || !Object.values(x).every((y) => typeof y === 'string')) throw failure('envs is an object of NAME: VALUE strings');
    return envOf(Object.entries(x).map(([k, y]) => `${k}=${y}`));
  };
  const jobs: ClipyStatus['jobs'] = [];
  for (let i = 0; i < v.job_waitlist.length; i++) {
    const entry: unknown = v.job_waitlist[i];
    jobs.push(at(`job_waitlist[${i}]`, () => {
      if (Array.isArray(entry) && Array.isArray(entry[0])) {
        if (entry.length > 2) throw failure('expected [ARGV, ENVS]');
        return { argv: argvOf(entry[0]), env: entry[1] === undefined ? [] : envOf(entry[1]) };
      }
      return { argv: argvOf(entry), env: [] };
    }));
    if (i % STEP_JOBS === STEP_JOBS - 1) yield;
  }
  const seen = new Set<string>();
  const workers = v.slaves.map((x, i) => at(`slaves[${i}]`, (): ClipyWorker => {
    if (!obj(x) || typeof x.ip !== 'string') throw failure('a slave is an object with an "ip"');
    const host = at('ip', () => {
      validateHost(x.ip as string);
      return bareHost(x.ip as string);
    });
    if (seen.has(host)) throw failure(`${quoteForError(host)} is listed twice`);
    seen.add(host);
    const r = x.running_job;
    let job: ClipyRunning | null = null;
    if (r !== undefined && r !== null) {
      job = at('running_job', () => {
        if (!obj(r) || (typeof r.id !== 'string' && typeof r.id !== 'number')) throw failure('a running job has an "id"');
        if (typeof r.pid !== 'number' || !Number.isSafeInteger(r.pid) || r.pid < 1) throw failure(`invalid pid ${quoteForError(String(r.pid))}`);
        // cli.py's own output has ARGV under "envs" and the environment under "script".
        const [argvField, envField] = !strings(r.script) && strings(r.envs) ? ['envs', 'script'] : ['script', 'envs'];
        const argv = argvOf(r[argvField]), e = r[envField];
        const jobEnv = at(envField, () => (strings(e) ? envOf(e) : envDict(e)));
        return { id: String(r.id), argv, jobEnv, pid: r.pid, log: typeof r.log_file === 'string' ? r.log_file : '' };
      });
    }
    return { host, env: at('envs', () => envDict(x.envs)), removing: x.remove_after_finish === true, job };
  }));
  return { workers, jobs };
}

/** Words a shell would have read differently from how they are written: cli.py ran a
 *  job as `sh -c "ARGV joined by spaces"`; djs passes the words as they are. */
const SHELL_SPECIAL_RE = /[\s'"\\$`*?[\]~;&|<>(){}#!]/;
export const shellWouldChange = (argv: string[]) => argv.some((w) => w === '' || SHELL_SPECIAL_RE.test(w));

/** Splits one line of an add_jobs file into words like a POSIX shell would, without
 *  expansions: 'single', "double" (with \" \\ \$ \` escapes), backslash escapes,
 *  bash's $'...' (what `printf %q` writes for names with control characters), and
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
    } else if (c === '$' && line[i + 1] === "'") {
      const [text, end] = ansiCQuoted(line, i + 2);
      cur += text; inWord = true; i = end;
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

const C_ESCAPES: Record<string, number> = { a: 7, b: 8, e: 27, E: 27, f: 12, n: 10, r: 13, t: 9, v: 11, '\\': 92, "'": 39, '"': 34, '?': 63 };

/** The text of a $'...' quote whose body starts at `from`, and where the word goes on.
 *  Escapes give bytes (\xHH, \NNN octal, \n ...), read as text at the closing quote
 *  (textOf: bytes that are not UTF-8 are kept, as printf %q of such a name meant). */
function ansiCQuoted(line: string, from: number): [string, number] {
  const bytes: number[] = [];
  let i = from;
  for (;;) {
    if (i >= line.length) throw new Error("unterminated $' quote");
    const c = line[i];
    if (c === "'") return [textOf(Buffer.from(bytes)), i + 1];
    if (c !== '\\') { const ch = String.fromCodePoint(line.codePointAt(i)!); bytes.push(...bytesOf(ch)); i += ch.length; continue; }
    const d = line[i + 1] ?? '';
    let m: RegExpExecArray | null;
    if (d in C_ESCAPES) { bytes.push(C_ESCAPES[d]); i += 2; }
    else if ((m = /^x([0-9A-Fa-f]{1,2})/.exec(line.slice(i + 1, i + 4)))) { bytes.push(parseInt(m[1], 16)); i += 1 + m[0].length; }
    else if ((m = /^[0-7]{1,3}/.exec(line.slice(i + 1, i + 4)))) { bytes.push(parseInt(m[0], 8) & 255); i += 1 + m[0].length; }
    else if ((m = /^(u[0-9A-Fa-f]{1,4}|U[0-9A-Fa-f]{1,8})/.exec(line.slice(i + 1, i + 10)))) { bytes.push(...Buffer.from(String.fromCodePoint(parseInt(m[0].slice(1), 16)))); i += 1 + m[0].length; }
    else { bytes.push(92); i++; } // an unknown escape stays as it is, backslash and all
  }
}

/** Quotes a word for a shell only when it needs it, for showing commands to people. */
export function shellQuote(word: string): string {
  if (/^[A-Za-z0-9_./:=@%+,-]+$/.test(word)) return word;
  // Bytes that are not UTF-8 (see textOf), and control characters, as bash's $'\xHH',
  // which pastes back exactly and keeps a shown command on one line.
  if (LONE_ESCAPE.test(word) || /[\x00-\x1f\x7f]/.test(word)) return `$'${word.replace(/[\\']|[\x00-\x1f\x7f]|(?<![\ud800-\udbff])[\udc80-\udcff]/g, (c) => (c === '\\' || c === "'" ? `\\${c}` : `\\x${(c.charCodeAt(0) & 0xff).toString(16).padStart(2, '0')}`))}'`;
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
  if (job.blockers > 0) {
    const ok = (job.after ?? NO_IDS).filter((d) => !depDone(st, d)), any = (job.afterAny ?? NO_IDS).filter((d) => !depEnded(st, d));
    return [...(ok.length ? [`after ${ok.join(',')}`] : []), ...(any.length ? [`after-any ${any.join(',')}`] : [])].join('; ');
  }
  if (st.paused) return 'paused';
  const tag = job.tags.find((t) => st.pausedTags.has(t));
  if (tag !== undefined) return `tag ${tag} paused`;
  if (isPlain(job.need)) return queue;
  let admitted = false, up = false;
  for (const w of st.workers.values()) if (admits(w, job.need)) { admitted = true; if (schedulable(w)) up = true; }
  return !admitted ? `no worker has ${describeNeed(job.need)}` : !up ? `no worker up with ${describeNeed(job.need)}` : `waiting for ${describeNeed(job.need)}`;
}

/** Why none of the waiting jobs among `ids` can start, for a wait none of whose jobs
 *  runs: their tag is paused, no worker has what they need or none such is up, or they
 *  wait for dependencies; null when one of them is only waiting its turn. Looks at the
 *  first `sample` waiting ones; the two most common reasons, with a way out. */
export function whyHeld(st: State, ids: Iterable<number>, sample = 1000): string | null {
  const queue = queueReason(st), counts = new Map<string, number>();
  let seen = 0;
  for (const id of ids) {
    const job = st.jobs.get(id);
    if (!job || job.state !== 'waiting') continue;
    const r = waitReason(st, job, queue);
    let why: string;
    if (r.startsWith('after')) why = `their ${/^after /.test(r) ? '--after' : '--after-any'} dependencies have not all ended`;
    else if (r.startsWith('tag ')) { const tag = job.tags.find((t) => st.pausedTags.has(t)); why = `tag ${tag} is paused: resume with cli.ts resume --tag ${tag}`; }
    else if (r.startsWith('no worker has ')) why = `${r}: add one with add_slave`;
    else if (r.startsWith('no worker up with ')) why = `${r} (see status)`;
    else return null; // next in line, or held by the whole queue's reason (whyWaiting)
    counts.set(why, (counts.get(why) ?? 0) + 1);
    if (++seen >= sample) break;
  }
  if (counts.size === 0) return null;
  return [...counts].sort((a, b) => b[1] - a[1]).slice(0, 2).map(([why]) => why).join('; ');
}

/** Where an --on-worker job with files to move runs, when not in --workdir: its own
 *  directory on the worker (null: none, or a local worker, where it runs in place). */
function jobDirOf(job: Job): string | null {
  if (!(job.transfer || job.returns || job.cleanup) || (job.worker !== null && isLocalWorker(job.worker))) return null;
  return `~/${JOB_DIR_PARENT}/${job.run > 0 && cfg ? runName(cfg.instance, job.id, job.run) : '$DJS_RUN_NAME'}`;
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
    // Where the command runs: on the worker (--on-worker, in workdir), or here, a script given SLAVE_IP.
    name: job.name ?? null, onWorker: job.onWorker === true, workdir: job.onWorker ? job.workdir ?? jobDirOf(job) ?? job.cwd : null, transfer: job.transfer ?? [], return: job.returns ?? [], runsOn: job.onWorker ? 'worker' : 'here',
    tags: job.tags, priority: job.priority, after: job.after ?? [], afterAny: job.afterAny ?? [], env: job.env ?? [],
    need: { slots: job.need.slots, gpus: job.need.gpus, require: job.need.require, avoid: job.need.exclude, hosts: job.need.hosts },
    slots: job.slot >= 0 ? slotsOf(job) : [], gpus: job.gpus ?? [],
    waitingFor: job.state === 'waiting' ? (job.notBefore > now ? 'retry delay' : waitReason(st, job, queue)) : null,
    retryAt: job.state === 'waiting' && job.notBefore ? iso(job.notBefore) : null,
    history: (job.history ?? []).map((a) => ({
      attempt: a.n, worker: a.worker, slot: a.slot, exitCode: a.exitCode, reason: a.reason,
      startedAt: iso(a.startedAt), endedAt: iso(a.endedAt),
    })),
  };
}
export type JobView = ReturnType<typeof jobView>;

function workerView(st: State, w: Worker, h: Health | undefined) {
  return {
    host: w.host, slots: w.slots, state: w.state, checking: w.state === 'up' && w.probeAt > 0, slurm: w.slurm,
    labels: w.labels, gpus: w.gpus, gpusUsed: w.gpuJobs.flatMap((id, g) => (id ? [g] : [])), env: w.env ?? [],
    error: w.error, since: iso(w.since), nextProbeAt: w.state === 'down' && w.probeAt ? iso(w.probeAt) : null,
    seenAt: h && h.okAt ? iso(h.okAt) : null,
    requeueOnDown: w.requeueOnDown === true,
    running: w.running.flatMap((id, slot) => (id ? [{ slot, id, command: commandOf(st.jobs.get(id)) }] : [])),
  };
}

const commandOf = (job: Job | undefined) => (job ? commandText(job) : '');
/** A job's command as list and status show it: `[NAME] ` first when named, and
 *  `--on-worker ` when it runs on the worker itself rather than here. */
export const commandText = (j: { script: string; args: string[]; name?: string | null; onWorker?: boolean }) =>
  `${j.name ? `[${j.name}] ` : ''}${j.onWorker ? '--on-worker ' : ''}${[j.script, ...j.args].map(shellQuote).join(' ')}`;
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

// ---- the dashboard's reads: pages of jobs, progress, metrics -------------------------
// What the HTTP side (start --http) shows, decided here from the state: a page of the
// job list, the rate and the time left, the address it serves, the metrics' text.

/** How many ids one `jobs` request looks at, at the most: a filter that matches little
 *  of a million jobs answers in parts (each with a `next` to go on from), so a request
 *  never holds the server up for long. */
export const PAGE_SCAN_BUDGET = 50_000;
export const PAGE_LIMIT_MAX = 1000;

const optText = (v: unknown, name: string): string | undefined => {
  if (v === undefined) return undefined;
  if (typeof v !== 'string' || v === '' || v.length > 4096) throw usage(`invalid ${name} ${quoteForError(JSON.stringify(v) ?? String(v))}`, v === '' ? `leave ${name} out to filter nothing` : undefined);
  return v;
};

/** The ids of jobs in `states` (any state when undefined), on `worker`, of an add that
 *  had `tag`, in [lo, hi]: highest first (down) or lowest first, from the indexes (a
 *  million jobs are 31,250 words of bits, most skipped whole). */
export function* matchingIds(st: State, f: { states?: readonly JobState[]; worker?: string; tag?: string }, lo: number, hi: number, down = true): Generator<number> {
  // (The bitmaps are read as they are now: a list goes on over turns, and they grow.)
  const of = (f.states ?? JOB_STATES).map((x) => st.byState[x]);
  const wk = f.worker === undefined ? null : st.byWorker.get(f.worker) ?? new IdBits();
  const word = (i: number) => {
    let x = 0;
    for (const b of of) if (i < b.w.length) x |= b.w[i];
    if (wk) x &= i < wk.w.length ? wk.w[i] : 0;
    return x;
  };
  const ranges = f.tag === undefined ? [lo, hi] : st.tagRanges.get(f.tag) ?? [];
  const n = ranges.length / 2;
  for (let k = 0; k < n; k++) {
    const r = down ? n - 1 - k : k;
    const a = Math.max(lo, ranges[2 * r]), z = Math.min(hi, ranges[2 * r + 1]);
    if (a > z) continue;
    const first = Math.floor(a / 32), last = Math.floor(z / 32);
    for (let i = down ? last : first; down ? i >= first : i <= last; down ? i-- : i++) {
      const x = word(i);
      if (x === 0) continue;
      for (let j = 0; j < 32; j++) {
        const bit = down ? 31 - j : j, id = i * 32 + bit;
        if ((x & (1 << bit)) !== 0 && id >= a && id <= z) yield id;
      }
    }
  }
}

/** jobs {state, tag, worker, text, before, limit}: one page of the job list, newest
 *  first: up to `limit` jobs with ids below `before` that match every filter given
 *  (`text`: a substring of the script, an argument or the reason, or the id itself).
 *  State, worker and tag come from indexes, so the page holds every match up to the
 *  limit; `text` is looked for in the jobs that match the others until `over(n)` says
 *  the n looked at are enough for one answer (by default PAGE_SCAN_BUDGET; the server
 *  gives a time), and the page holds what was found by then. `next` is the `before` of
 *  the following page (null at the end); `total`, the number of matches, is known only
 *  when no filter but `state` is given. */
export function pageJobs(st: State, req: Request, now: number, over: (looked: number) => boolean = (n) => n >= PAGE_SCAN_BUDGET) {
  const state = optText(req.state, 'state');
  if (state !== undefined && !JOB_STATES.includes(state as JobState)) throw usage(`unknown state ${quoteForError(state)}`, `states are ${JOB_STATES.join(', ')}`);
  const tag = optText(req.tag, 'tag'), worker = optText(req.worker, 'worker'), text = optText(req.text, 'text');
  const limit = num(req.limit ?? 50, 'limit', 1, PAGE_LIMIT_MAX);
  const before = num(req.before ?? st.nextId, 'before', 1);
  const textId = text !== undefined && /^\d+$/.test(text) ? Number(text) : -1;
  const rows: JobView[] = [], why = queueReason(st);
  let next: number | null = null, looked = 0;
  for (const id of matchingIds(st, { states: state === undefined ? undefined : [state as JobState], worker, tag }, 1, Math.min(before, st.nextId) - 1)) {
    if (rows.length >= limit || (text !== undefined && over(looked))) { next = id + 1; break; }
    const job = st.jobs.get(id)!;
    if (text !== undefined) {
      looked++;
      if (id !== textId && !job.script.includes(text) && !(job.reason !== null && job.reason.includes(text)) && !job.name?.includes(text)) {
        let hit = false;
        for (let i = 0; i < job.args.length && !hit; i++) hit = job.args[i].includes(text);
        if (!hit) continue;
      }
    }
    rows.push(jobView(st, job, now, why));
  }
  const filtered = tag !== undefined || worker !== undefined || text !== undefined;
  return {
    rows, next,
    total: filtered ? null : state !== undefined ? st.counts[state as JobState] : st.jobs.size,
  };
}

/** The rate jobs finish at and the time left, as `wait` and the dashboard show them:
 *  `ended` jobs finished in `ms`, `left` still to run. */
export function rateAndLeft(ended: number, ms: number, left: number): { rate: number; leftMs: number | null } {
  const rate = ended / Math.max(0.001, ms / 1000);
  return { rate, leftMs: rate > 0 ? (left / rate) * 1000 : null };
}

/** Parses `start --http [HOST:]PORT`: a port alone serves on 127.0.0.1; an IPv6 host
 *  goes in brackets ([::1]:8080). Port 0 takes any free port (`dashboard` tells which). */
export function parseHttpAddress(text: string): { host: string; port: number } {
  const m = /^(?:(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_][A-Za-z0-9_.-]*):)?(\d{1,5})$/.exec(text);
  const port = m ? Number(m[2]) : -1;
  if (!m || port > 65535) throw usage(`invalid HTTP address ${quoteForError(text)}`, 'give a port, or HOST:PORT, like 8080, 127.0.0.1:8080, [::1]:8080 or 0.0.0.0:8080');
  return { host: m[1] ? m[1].replace(/^\[|\]$/g, '') : '127.0.0.1', port };
}

/** True if an HTTP Host header names the address served: one of `names` (host names or
 *  addresses, IPv6 ones without brackets) with the port (which a browser leaves out for
 *  port 80). Anything else is refused, so a page of another site that a DNS rebinding
 *  points at this address cannot talk to it. */
export function hostAllowed(header: string | undefined, names: readonly string[], port: number): boolean {
  if (!header) return false;
  const m = /^(\[[0-9a-f:.]+\]|[^:\[\]]+)(?::(\d+))?$/i.exec(header.trim());
  if (!m || Number(m[2] ?? 80) !== port) return false;
  const name = m[1].replace(/^\[|\]$/g, '').toLowerCase();
  return names.some((n) => n.toLowerCase() === name);
}

/** Prometheus histograms and counters the server keeps from the events it commits,
 *  since it started; and jobs finished per minute over the last CHART_MINUTES. */
export const CHART_MINUTES = 360;
export type Histogram = { bounds: number[]; counts: number[]; sum: number; count: number };
export type Metrics = {
  starts: number; ends: Record<string, number>;
  fsync: Histogram; queueWait: Histogram;
  minutes: number[]; minute: number; // finished jobs per minute; minutes[CHART_MINUTES - 1] is minute `minute`
  startedAt: number;
};
const histogram = (bounds: number[]): Histogram => ({ bounds, counts: new Array(bounds.length).fill(0), sum: 0, count: 0 });

export function newMetrics(now: number): Metrics {
  return {
    starts: 0, ends: { done: 0, failed: 0, killed: 0, requeued: 0 },
    fsync: histogram([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]),
    queueWait: histogram([1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400]),
    minutes: new Array(CHART_MINUTES).fill(0), minute: Math.floor(now / 60_000), startedAt: now,
  };
}

export function observe(h: Histogram, v: number): void {
  const i = h.bounds.findIndex((b) => v <= b);
  if (i >= 0) h.counts[i]++;
  h.sum += v;
  h.count++;
}

/** Moves the per-minute window so that it ends at time t's minute. */
function chartTo(m: Metrics, t: number): void {
  const minute = Math.floor(t / 60_000), shift = minute - m.minute;
  if (shift <= 0) return;
  if (shift >= CHART_MINUTES) m.minutes.fill(0);
  else { m.minutes.copyWithin(0, shift); m.minutes.fill(0, CHART_MINUTES - shift); }
  m.minute = minute;
}

/** Counts a job that finished at t in the per-minute chart. */
export function chartFinished(m: Metrics, t: number): void {
  chartTo(m, Math.max(t, m.minute * 60_000));
  const i = CHART_MINUTES - 1 - (m.minute - Math.floor(t / 60_000));
  if (i >= 0) m.minutes[i]++;
}

/** The per-minute chart up to `now`, and the rate and time left over its last five
 *  minutes. */
export function chartOf(m: Metrics, st: State, now: number) {
  chartTo(m, now);
  // Over the last five minutes, or from the first of them in which a job finished.
  let ended = 0, from = now;
  for (let i = CHART_MINUTES - 5; i < CHART_MINUTES; i++) {
    if (m.minutes[i] && from === now) from = (m.minute - (CHART_MINUTES - 1 - i)) * 60_000;
    ended += m.minutes[i];
  }
  const windowMs = Math.max(1000, now - from);
  return { perMinute: m.minutes.slice(), lastMinute: new Date(m.minute * 60_000).toISOString(), ...rateAndLeft(ended, windowMs, st.counts.waiting + st.counts.running) };
}

/** True if a start or an end still fits the state, so that applyEvent acts on it (the
 *  same conditions); countEvent counts only those. */
export function counts(st: State, ev: Event): boolean {
  const job = ev.e === 'start' || ev.e === 'end' ? st.jobs.get(ev.id) : undefined;
  if (ev.e === 'start') return job?.state === 'waiting' && st.workers.has(ev.host);
  return ev.e === 'end' && job?.state === 'running' && job.run === ev.run;
}

/** Counts what a start or an end that fitted (counts) did once applied to st: a start,
 *  and how long its job had waited; the end of an attempt, and its outcome. */
export function countEvent(m: Metrics, st: State, ev: Event): void {
  if (ev.e === 'start') {
    const job = st.jobs.get(ev.id);
    if (!job) return;
    m.starts++;
    observe(m.queueWait, Math.max(0, ev.t - Math.max(job.queuedAt, job.history?.at(-1)?.endedAt ?? 0)) / 1000);
  } else if (ev.e === 'end') {
    const job = st.jobs.get(ev.id);
    if (!job) return;
    const outcome = job.state === 'waiting' ? 'requeued' : job.state;
    m.ends[outcome] = (m.ends[outcome] ?? 0) + 1;
    if (outcome !== 'requeued') chartFinished(m, ev.t);
  }
}

/** A number as Prometheus writes it. */
const promNumber = (v: number) => (Number.isFinite(v) ? String(v) : v > 0 ? '+Inf' : v < 0 ? '-Inf' : 'NaN');
const promLabel = (v: string) => v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');

/** The Prometheus text format (version 0.0.4) of a status reply (statusView, with
 *  `tags` where the state has them) and the server's counters. */
export function formatMetrics(s: StatusView & { tags?: unknown }, m: Metrics): string {
  const out: string[] = [];
  const family = (name: string, type: string, help: string, samples: [Record<string, string>, number][]) => {
    out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    for (const [labels, v] of samples) {
      const l = Object.entries(labels).map(([k, x]) => `${k}="${promLabel(x)}"`).join(',');
      out.push(`${name}${l ? `{${l}}` : ''} ${promNumber(v)}`);
    }
  };
  const hist = (name: string, help: string, h: Histogram) => {
    out.push(`# HELP ${name} ${help}`, `# TYPE ${name} histogram`);
    let acc = 0;
    h.bounds.forEach((b, i) => { acc += h.counts[i]; out.push(`${name}_bucket{le="${b}"} ${acc}`); });
    out.push(`${name}_bucket{le="+Inf"} ${h.count}`, `${name}_sum ${promNumber(h.sum)}`, `${name}_count ${h.count}`);
  };
  family('djs_jobs', 'gauge', 'Jobs by state.', JOB_STATES.map((k) => [{ state: k }, s.counts[k]]));
  const tags = Array.isArray(s.tags) ? s.tags as Record<string, unknown>[] : [];
  if (tags.length) {
    family('djs_tag_jobs', 'gauge', 'Jobs of each tag by state.', tags.flatMap((t) =>
      JOB_STATES.filter((k) => typeof t[k] === 'number').map((k): [Record<string, string>, number] => [{ tag: String(t.tag), state: k }, t[k] as number])));
  }
  family('djs_job_starts_total', 'counter', 'Job attempts started since the server started.', [[{}, m.starts]]);
  family('djs_job_ends_total', 'counter', 'Job attempts ended since the server started, by outcome (requeued: back to the queue for a retry or after a worker failure).',
    Object.entries(m.ends).map(([outcome, v]) => [{ outcome }, v]));
  const wstates: Record<string, number> = { up: 0, down: 0, draining: 0 };
  let slotsUsed = 0, slotsFree = 0, gpusUsed = 0, gpusFree = 0;
  for (const w of s.workers as (Omit<StatusView['workers'][number], 'gpus' | 'gpusUsed'> & { gpus?: unknown; gpusUsed?: unknown })[]) {
    wstates[w.state] = (wstates[w.state] ?? 0) + 1;
    slotsUsed += w.running.length;
    if (w.state === 'up') slotsFree += Math.max(0, w.slots - w.running.length);
    const gpus = typeof w.gpus === 'number' ? w.gpus : Array.isArray(w.gpus) ? w.gpus.length : 0;
    const used = typeof w.gpusUsed === 'number' ? w.gpusUsed : Array.isArray(w.gpusUsed) ? w.gpusUsed.length : 0;
    gpusUsed += used;
    if (w.state === 'up') gpusFree += Math.max(0, gpus - used);
  }
  family('djs_workers', 'gauge', 'Workers by state.', Object.entries(wstates).map(([state, v]) => [{ state }, v]));
  family('djs_slots', 'gauge', 'Worker slots in use, and free on workers that are up.', [[{ state: 'used' }, slotsUsed], [{ state: 'free' }, slotsFree]]);
  family('djs_gpus', 'gauge', 'GPUs in use, and free on workers that are up.', [[{ state: 'used' }, gpusUsed], [{ state: 'free' }, gpusFree]]);
  hist('djs_journal_fsync_seconds', 'Time to append a batch of events to the journal and fdatasync it.', m.fsync);
  hist('djs_queue_wait_seconds', 'Time a job waited in the queue before it started.', m.queueWait);
  family('djs_server_start_time_seconds', 'gauge', 'When the server started, in seconds since the epoch.', [[{}, Math.floor(m.startedAt / 1000)]]);
  return out.join('\n') + '\n';
}

// ============================================================================
// The journal: the state on disk
// ============================================================================

/** `version`: the oldest format version among the files read. */
export type LoadResult = { state: State; warnings: string[]; journalSize: number; snapshotSize: number; version: number };

class DamagedState extends UserError {}
const damaged = (file: string, line: number, what: string) =>
  new DamagedState(EXIT_FAILED, `damaged state file '${file}' line ${line}: ${what}`,
    'nothing was changed; move the file aside or repair it, then start again');

/** Cuts chunks of a stream (a file, a socket, a pipe) into '\n'-terminated lines, the
 *  one splitter of this file, for chunks of bytes or of text (`join` joins the pieces of
 *  a line: Buffer.concat, or joinText): `push` calls `fn` with each line a chunk
 *  completes, without its newline (a line cut by a chunk's end waits for the next
 *  chunk), and stops at a line for which `fn` returns false. Each chunk is scanned once,
 *  so a line may be many megabytes, far longer than a chunk. A line of bytes may be a
 *  view of its chunk. `pending` is the length of the unfinished line; `rest` takes it. */
export function lineSplitter<T extends Buffer | string>(join: (parts: T[]) => T, fn: (line: T) => boolean | void) {
  let parts: T[] = [], pending = 0;
  return {
    get pending() { return pending; },
    push(chunk: T): void {
      let start = 0, nl: number;
      // (A Buffer finds the byte 10 several times faster than the string '\n'.)
      while ((nl = typeof chunk === 'string' ? chunk.indexOf('\n', start) : chunk.indexOf(10, start)) >= 0) {
        const piece = chunk.slice(start, nl) as T;
        const line = parts.length ? join([...parts, piece]) : piece;
        parts = []; pending = 0;
        start = nl + 1;
        if (fn(line) === false) return;
      }
      if (start < chunk.length) { parts.push(chunk.slice(start) as T); pending += chunk.length - start; }
    },
    rest(): T {
      const r = join(parts);
      parts = []; pending = 0;
      return r;
    },
  };
}
const joinText = (parts: string[]) => parts.join('');

/** Calls fn(line, lineNo, endOffset) for every '\n'-terminated line in the first `limit`
 *  bytes of a file, reading it in chunks (a line may be far longer than a chunk); returns
 *  the bytes after the last newline, if any, and where they start. */
function forEachLine(file: string, limit: number, fn: (line: string, no: number, end: number) => void): { tail: Buffer; tailAt: number } {
  const fd = fs.openSync(file, 'r');
  try {
    let offset = 0, no = 0, n: number, read = 0;
    const lines = lineSplitter<Buffer>(Buffer.concat, (line) => { offset += line.length + 1; fn(line.toString('utf8'), ++no, offset); });
    for (;;) {
      const chunk = Buffer.allocUnsafe(1 << 20);
      if ((n = fs.readSync(fd, chunk, 0, Math.min(chunk.length, limit - read), null)) <= 0) break;
      read += n;
      lines.push(chunk.subarray(0, n));
    }
    return { tail: lines.rest(), tailAt: offset };
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
  /** Applies one journal event, unless the snapshot holds it already. */
  const replayLine = (file: string, rec: Record<string, unknown>, no: number) => {
    const n = rec.n;
    if (typeof n !== 'number') throw damaged(file, no, 'event without a sequence number');
    if (n <= st.seq) return;
    if (n !== st.seq + 1) throw damaged(file, no, `event ${n} follows event ${st.seq}`);
    try { applyEvent(st, rec as unknown as Event); } catch (e) { throw damaged(file, no, (e as Error).message); }
    st.seq = n;
  };
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
        w.environ ??= null; // before version 4: the server's
        st.workers.set(w.host, w);
      } else if (rec.j) {
        const job = rec.j as Job;
        if (typeof job.id !== 'number' || !JOB_STATES.includes(job.state) || typeof job.script !== 'string' || !Array.isArray(job.args)) throw damaged(snapFile, no, 'bad job');
        if (job.args.length === 0) job.args = NO_ARGS;
        job.retryDelay ??= 0; job.notBefore ??= 0; // snapshots written before retries waited
        job.script = intern(st, job.script); job.cwd = intern(st, job.cwd);
        if (job.worker !== null) job.worker = intern(st, job.worker);
        // Version 2 jobs have no campaign fields.
        job.priority ??= 0; job.after ??= null; job.afterAny ??= null; job.env ??= null; job.blockers = 0; job.slots ??= null; job.gpus ??= null;
        job.environ = typeof job.environ === 'string' ? intern(st, job.environ) : null; // before version 4: the server's
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
      } else if (rec.environ) {
        const e = rec.environ as { id?: unknown; vars?: unknown };
        if (typeof e.id !== 'string' || !strings(e.vars)) throw damaged(snapFile, no, 'bad environment');
        st.environs.set(e.id, e.vars);
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
  /** Replays a journal file (after its header, which must not start after the state's
   *  last event); what ends it short of a newline is the caller's to judge. */
  const replayJournal = (file: string, limit: number) => {
    let lastNo = 0, version = FORMAT_VERSION, size = 0;
    const { tail, tailAt } = forEachLine(file, limit, (line, no, end) => {
      lastNo = no;
      const rec = upgradeRecord(parseLine(file, line, no), version);
      if (no === 1) {
        version = checkHeader(file, rec, 'djs-journal');
        oldest = Math.min(oldest, version);
        if (Number(rec.after) > st.seq) throw damaged(file, 1, `starts after event ${String(rec.after)} but the snapshot ends at ${st.seq}`);
      } else replayLine(file, rec, no);
      size = end;
    });
    return { tail, tailAt, lastNo, size };
  };
  // A snapshot being written when the server stopped left the journal of before its
  // start as journal.1 (see Journal.startSnapshot): its events come first.
  const earlier = path.join(dataDir, 'journal.1');
  if (fs.existsSync(earlier)) {
    const { tail, lastNo } = replayJournal(earlier, Infinity);
    if (tail.length) throw damaged(earlier, lastNo + 1, 'cut-off line');
  }
  if (fs.existsSync(journalFile)) {
    const { tail, tailAt, lastNo, size } = replayJournal(journalFile, journalLimit);
    journalSize = size;
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
  saving: Saving | null = null; // the snapshot being written (startSnapshot)
  stuck = false;                // one failed part-way: no other until the next start-up
  sliceMs = SNAPSHOT_SLICE_MS;
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
    return !this.saving && !this.stuck && this.size > this.snapshotMinBytes && this.size > this.snapshotSize / 2;
  }

  /** Writes the whole state as a new snapshot at once, then starts an empty journal
   *  after it (at start-up). A crash between the two renames leaves a snapshot and an
   *  old journal whose events it already holds; loadState skips them by sequence number. */
  snapshot(st: State): void {
    const file = path.join(this.dir, 'snapshot');
    let written = 0;
    const parts = snapshotParts(st);
    replaceFile(file, (fd) => {
      let buf = parts.head;
      for (const j of parts.jobs) {
        buf += snapshotLine(j) + '\n';
        if (buf.length > 1 << 20) { writeAll(fd, buf); written += Buffer.byteLength(buf); buf = ''; }
      }
      buf += parts.tail;
      writeAll(fd, buf); written += Buffer.byteLength(buf);
    });
    const jfile = path.join(this.dir, 'journal');
    replaceFile(jfile, (fd) => writeAll(fd, journalHeader(st.seq)));
    fs.rmSync(path.join(this.dir, 'journal.1'), { force: true });
    const fd = fs.openSync(jfile, 'r+');
    fs.closeSync(this.fd);
    this.fd = fd;
    this.size = fs.fstatSync(this.fd).size;
    this.snapshotSize = written;
    this.stuck = false;
  }

  /** Starts a snapshot of the state as it is now, written a slice of jobs per turn so
   *  that requests are answered meanwhile; resolves with its size once it replaced the
   *  old one. At its start the journal so far becomes journal.1 and a new journal
   *  begins after this moment's event; jobs that change meanwhile are written as they
   *  were (State.saving). Once the snapshot is complete (temp file, fsync, rename)
   *  journal.1 is deleted. A crash at any point loads the old snapshot (or the new) and
   *  both journals, skipping the events a snapshot holds. A snapshot that fails part-way
   *  leaves both journals, and no other is started until the next start-up. */
  startSnapshot(st: State): Promise<number> {
    const file = path.join(this.dir, 'snapshot'), tmp = `${file}.tmp`;
    const jfile = path.join(this.dir, 'journal'), earlier = path.join(this.dir, 'journal.1');
    const parts = snapshotParts(st, false);
    try {
      if (this.mustCut) { fs.ftruncateSync(this.fd, this.size); this.mustCut = false; }
      fs.renameSync(jfile, earlier);
      replaceFile(jfile, (fd) => writeAll(fd, journalHeader(st.seq)));
      const fd = fs.openSync(jfile, 'r+');
      fs.closeSync(this.fd);
      this.fd = fd;
      this.size = fs.fstatSync(fd).size;
    } catch (e) {
      this.stuck = true;
      return Promise.reject(e);
    }
    const sv: Saving = { below: st.nextId, before: new Map(), was: new Map(), at: 0, dropped: [], dropHead: 0, unsorted: false };
    st.saving = this.saving = sv;
    const lanes = frozenLanes(st), count = st.jobs.size;
    const live = () => { if (this.saving !== sv) throw new Error('stopped (the state was reloaded)'); };
    const write = async () => {
      let written = 0;
      const fh = await fs.promises.open(tmp, 'w', 0o600);
      try {
        const put = async (text: string) => { const b = Buffer.from(text); await fh.writeFile(b); written += b.length; };
        await put(parts.head);
        // The jobs of that moment in id order: the live map's (it is in id order; the
        // jobs added since come after them), and those that left it meanwhile.
        const it = st.jobs.values();
        let next = it.next(), left = count;
        const lineOf = (j: Job) => {
          // Never twice nor out of order: such a snapshot would not load, so it is dropped.
          if (j.id <= sv.at) throw new Error(`job ${j.id} after job ${sv.at}`);
          left--; sv.at = j.id;
          return (sv.before.get(j.id) ?? snapshotLine(j)) + '\n';
        };
        while (left > 0) {
          live();
          const t0 = performance.now();
          let buf = '';
          do {
            if (sv.unsorted) { sv.dropped = sv.dropped.slice(sv.dropHead).sort((a, b) => a.id - b.id); sv.dropHead = 0; sv.unsorted = false; }
            for (let k = 0; k < 200 && left > 0; k++) {
              const j = !next.done && next.value.id < sv.below ? next.value : null;
              const d = sv.dropHead < sv.dropped.length ? sv.dropped[sv.dropHead] : null;
              if (d && (!j || d.id <= j.id)) {
                if (j && j.id === d.id) next = it.next(); // read last turn, dropped since: once
                buf += lineOf(d); sv.dropHead++; continue;
              }
              if (!j) throw new Error(`${left} jobs of the snapshot not found`);
              buf += lineOf(j);
              next = it.next();
            }
          } while (left > 0 && performance.now() - t0 < this.sliceMs);
          await put(buf);
        }
        // The queue's order then, a slice per turn too.
        const order = waitingAt(st, sv, lanes);
        for (let done = false; !done;) {
          live();
          const t0 = performance.now();
          let buf = '';
          do {
            const ids: number[] = [];
            for (let r = order.next(); ; r = order.next()) {
              if (r.done) { done = true; break; }
              ids.push(r.value);
              if (ids.length === 10_000) break;
            }
            if (ids.length) buf += JSON.stringify({ queue: ids }) + '\n';
          } while (!done && performance.now() - t0 < this.sliceMs);
          await put(buf);
        }
        await put(JSON.stringify({ end: true, jobs: count }) + '\n');
        await fh.sync();
      } finally {
        await fh.close();
      }
      live();
      // In place, then journal.1 goes (a crash between: its events are in the snapshot).
      const syncDir = async () => { const d = await fs.promises.open(this.dir, 'r'); try { await d.sync(); } finally { await d.close(); } };
      await fs.promises.rename(tmp, file);
      await syncDir();
      await fs.promises.rm(earlier, { force: true });
      await syncDir();
      this.snapshotSize = written;
      return written;
    };
    return write().then((n) => n, (e) => { this.stuck = true; throw e; }).finally(() => {
      if (st.saving === sv) st.saving = null;
      if (this.saving === sv) this.saving = null;
    });
  }

  /** Drops the snapshot under way (its state is no longer the server's). */
  stopSnapshot(): void { this.saving = null; }
}

/** A snapshot of the state now: the lines before the jobs, the jobs (in id order, as
 *  list shows them), and the lines after them (the queue's order of start, the end;
 *  only when `whole`: a snapshot written a slice per turn makes them itself). */
function snapshotParts(st: State, whole = true): { head: string; jobs: Job[]; tail: string } {
  const lines: string[] = [JSON.stringify({ format: 'djs-snapshot', version: FORMAT_VERSION, seq: st.seq, nextId: st.nextId })];
  const put = (rec: unknown) => { lines.push(JSON.stringify(rec)); };
  // The environments some job or worker runs with, once each; the others are dropped
  // (at once only: one written a slice per turn keeps them all, since an add made
  // meanwhile may use one that no job used when it began).
  if (whole) {
    const used = new Set<string>();
    for (const w of st.workers.values()) if (w.environ) used.add(w.environ);
    for (const j of st.jobs.values()) if (j.environ) used.add(j.environ);
    for (const id of st.environs.keys()) if (!used.has(id)) st.environs.delete(id);
  }
  for (const [id, vars] of st.environs) put({ environ: { id, vars } });
  for (const w of st.workers.values()) put({ w });
  if (st.paused || st.pausedTags.size) put({ pause: { all: st.paused, tags: [...st.pausedTags] } });
  const forgotten = [...st.forgotten];
  for (let i = 0; i < forgotten.length; i += 10_000) put({ forgotten: forgotten.slice(i, i + 10_000) });
  const head = lines.join('\n') + '\n';
  lines.length = 0;
  if (!whole) return { head, jobs: [], tail: '' };
  let order: number[] = [];
  for (const j of waitingJobs(st)) {
    order.push(j.id);
    if (order.length === 10_000) { put({ queue: order }); order = []; }
  }
  if (order.length) put({ queue: order });
  put({ end: true, jobs: st.jobs.size });
  // In id order, as the jobs are made (a snapshot written a slice per turn counts on it).
  const jobs = [...st.jobs.values()];
  for (let i = 1; i < jobs.length; i++) if (jobs[i].id < jobs[i - 1].id) { jobs.sort((a, b) => a.id - b.id); break; }
  return { head, jobs, tail: lines.join('\n') + '\n' };
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
 *    3. sets the NAME=VALUE words (after a word `=`, they replace its environment
 *       instead: a job that runs with its add's), JOB_ID, SLAVE_IP, SLAVE_SLOT and
 *       JOB_ATTEMPT, and execs SCRIPT with ARGS (no shell).
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
  # A word '=' (no name) empties the environment: the words after it are all of it.
  for (1 .. $nenv) { my ($k, $v) = split /=/, shift(@w), 2; if ($k eq '') { %ENV = () } else { $ENV{$k} = $v } }
  @ENV{qw(JOB_ID SLAVE_IP SLAVE_SLOT JOB_ATTEMPT)} = ($id, $worker, $slot, $att);
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
export function launchRecord(j: { id: number; run: number; slot: number; attempt: number; cwd: string; marker: string; worker: string; env: (string | Buffer)[]; script: string; args: string[] }): Buffer {
  const fields = [j.cwd, j.marker, j.worker, ...j.env, j.script, ...j.args].map((f) => (typeof f === 'string' ? bytesOf(f) : f));
  const head = Buffer.from(`${j.id} ${j.run} ${j.slot} ${j.attempt} ${j.env.length} ${fields.map((f) => f.length).join(' ')}\n`);
  let len = head.length;
  for (const f of fields) len += f.length;
  return Buffer.concat([Buffer.from(len.toString(16).padStart(8, '0')), head, ...fields]);
}

// ---- commands run on the worker (add_job --on-worker) -------------------------------
// A job added with --on-worker names a command that runs on its worker, not a script run
// here. The launcher still starts it here, as some process it can signal and reap:
//   - a local worker (named local or localN, as in example_job.sh): the command itself,
//     in its workdir (~ is this user's home);
//   - a Slurm worker without a login host: srun, with the flags example_job.sh gives it;
//   - an ssh worker (and a Slurm worker's login host, which then runs srun): ssh through
//     the worker's shared connection, running ON_WORKER_WATCHER there.
// ssh forwards no signals without a tty, and sshd runs the remote line through the
// user's login shell, whichever it is (bash, zsh, fish, tcsh). So the line holds only
// `exec perl -e '...' CODE` (the watcher's code, hex-encoded): no shell quotes or expands
// anything in it. The job itself (its directory, environment, command and arguments)
// goes to the watcher on ssh's standard input, as words of [0-9a-fx] (each hex-encoded,
// after an x so that an empty one is a word too), so that every byte but NUL arrives as
// it was, and so that no one else on either machine reads the job's --env settings in
// the argument list of ssh or perl (`ps`); here, `sh -c 'printf ... | ssh ...'` writes it
// from its environment. The watcher reads it to its end, sets the environment, enters the directory,
// forks the command in a process group of its own and waits for it, watching its own
// stdout and stderr: sshd closes them when the session ends (the job was killed here,
// its ssh process ended, the master connection died), and then the watcher sends the
// group SIGTERM, and SIGKILL after the kill grace. Its SIGCHLD handler wakes it when the
// command ends; perl runs that handler between ops only, so an end that comes just before
// it sleeps in poll is seen at the next 200 ms timeout instead. It exits with the
// command's code (128+N for signal N; 254 for 255, which means "worker failed" to the
// scheduler), and sends SIGTERM to what the command left running in its group.

/** The watcher (see above), run by perl on the worker as `perl -e CODE`, with on its
 *  standard input: GRACE NENV xDIR xNAME=VALUE... xCOMMAND xARG...   (x then hex bytes) */
const ON_WORKER_WATCHER = String.raw`
use IO::Poll qw(POLLIN POLLHUP POLLERR); use Time::HiRes ();
my ($g, $n, @w) = split / /, do { local $/; <STDIN> } // '';
defined $n or do { print STDERR "djs: no job came on standard input
"; exit 1 };
$_ = pack('H*', substr($_, 1)) for @w;
my $d = shift @w;
for (1 .. $n) { my ($k, $v) = split /=/, shift(@w), 2; $ENV{$k} = $v }
$d = $ENV{HOME} . ($1 // '') if $d =~ m{^~(/.*)?\z}s;
chdir($d) or do { print STDERR "djs: cannot enter $d on $ENV{SLAVE_IP}: $!\n"; exit 1 };
pipe(my $r, my $s) or die "djs: pipe: $!\n";
$SIG{CHLD} = sub { syswrite($s, 'c') };
my $pid = fork() // die "djs: fork: $!\n";
if (!$pid) {
  $SIG{CHLD} = 'DEFAULT'; close($r); close($s);
  setpgrp(0, 0);
  open(STDIN, '<', '/dev/null');
  { exec { $w[0] } @w }
  print STDERR "djs: cannot run $w[0] on $ENV{SLAVE_IP}: $!\n";
  exit($!{ENOENT} ? 127 : 126);
}
setpgrp($pid, $pid);
my ($end, $c) = (0);
while (1) {
  if (waitpid($pid, 1) == $pid) { $c = $?; last }
  my @p = (fileno($r), POLLIN);
  push @p, 1, 0, 2, 0 unless $end;
  IO::Poll::_poll($end ? 100 : 200, @p);
  sysread($r, my $x, 64) if $p[1] & POLLIN;
  if (!$end && (($p[3] | $p[5]) & (POLLHUP | POLLERR))) { kill('TERM', -$pid); $end = Time::HiRes::time() + $g }
  kill('KILL', -$pid) if $end && Time::HiRes::time() >= $end;
}
kill('TERM', -$pid);
exit(($c & 127) ? 128 + ($c & 127) : ($c >> 8) == 255 ? 254 : $c >> 8);
`;
const ON_WORKER_CODE_HEX = Buffer.from(ON_WORKER_WATCHER).toString('hex');

/** The shell line that runs the watcher on an ssh worker. Safe in any login shell: it
 *  holds no quote but the pair around the perl code, and only hex digits after that. */
export const ON_WORKER_LINE = `exec perl -e 'eval pack(q(H*),shift);die $@' ${ON_WORKER_CODE_HEX}`;

/** What the watcher reads on its standard input: run `words` in `dir` (absolute, or ~ or
 *  ~/...) with `env` (NAME=VALUE) set, stopped within graceS seconds of its ssh session
 *  ending. */
export function onWorkerInput(words: string[], env: string[], dir: string, graceS: number): string {
  const hex = (w: string) => 'x' + bytesOf(w).toString('hex');
  return `${Math.max(0, Math.round(graceS))} ${env.length} ${[dir, ...env, ...words].map(hex).join(' ')}`;
}
/** How an --on-worker job's ssh gets the watcher's input: from the environment of the
 *  sh that starts it (private to this user, unlike an argument list). */
const ON_WORKER_SH = 'printf %s "$DJS_ON_WORKER_INPUT" | exec ssh "$@"';

/** Workers that are this machine: no ssh (as example_job.sh treats them). */
export const isLocalWorker = (host: string) => /^local\d*$/.test(host);

/** srun's words for a job on a Slurm partition (as example_job.sh runs its work): one
 *  task of as many CPUs as the job has slots, its GPUs, its --timeout as the time limit
 *  in minutes, named djs-ID. */
export function srunWords(partition: string, j: { id: number; slots: number; gpus: number; timeout: number }): string[] {
  const words = ['srun', `--job-name=djs-${j.id}`, `--partition=${partition}`, '--ntasks=1', `--cpus-per-task=${j.slots}`];
  if (j.gpus) words.push(`--gpus=${j.gpus}`);
  if (j.timeout > 0) words.push(`--time=${Math.ceil(j.timeout / 60)}`);
  return words;
}

/** What the launcher runs for an --on-worker job (see above): the program, its
 *  arguments, the directory here to start it in, and more environment for it. `env` is
 *  what the job gets (JOB_ID... included); `sshWords` are ssh's options for this slot. */
export function onWorkerLaunch(j: { id: number; script: string; args: string[]; cwd: string; workdir?: string; slots: number; gpus: number[]; timeout: number } & TransferJob,
  worker: { host: string; slurm: SlurmTarget | null }, env: string[], sshWords: string[], graceS: number, home: string, xfer?: { run: string }): { script: string; args: string[]; cwd: string; env: string[] } {
  const dir = j.workdir ?? j.cwd;
  const cuda = j.gpus.length && !worker.slurm ? [`CUDA_VISIBLE_DEVICES=${j.gpus.join(',')}`] : [];
  if (isLocalWorker(worker.host)) {
    return { script: j.script, args: j.args, cwd: dir === '~' || dir.startsWith('~/') ? home + dir.slice(1) : dir, env: cuda };
  }
  const srun = worker.slurm ? srunWords(worker.slurm.partition, { id: j.id, slots: j.slots, gpus: j.gpus.length, timeout: j.timeout }) : [];
  if (worker.slurm && worker.slurm.login === null) {
    const chdir = dir === '~' || dir.startsWith('~/') ? home + dir.slice(1) : dir;
    return { script: srun[0], args: [...srun.slice(1), `--chdir=${chdir}`, j.script, ...j.args], cwd: j.cwd, env: [] };
  }
  const host = worker.slurm?.login ?? worker.host;
  if (xfer) {
    const input = onWorkerInput([...srun, j.script, ...j.args], [...env, ...cuda], j.workdir ?? `~/${JOB_DIR_PARENT}/${xfer.run}`, graceS);
    return { script: '/bin/sh', args: ['-c', transferSh(j, host, xfer), 'djs-on-worker', ...sshWords], cwd: '/', env: [`DJS_ON_WORKER_INPUT=${input}`] };
  }
  const input = onWorkerInput([...srun, j.script, ...j.args], [...env, ...cuda], dir, graceS);
  return { script: '/bin/sh', args: ['-c', ON_WORKER_SH, 'djs-on-worker', ...sshWords, '--', host, ON_WORKER_LINE], cwd: '/', env: [`DJS_ON_WORKER_INPUT=${input}`] };
}

// ---- files for hosts without a shared disk (--transfer, --return, --cleanup) -----------
// Such a job's ssh worker gets a small sh program here in place of the plain ssh: it makes
// the job's directory on the worker (~/.djs-work/DJS_RUN_NAME, as example_job.sh), sends
// the --transfer files there with rsync over the same ssh connection and options, runs the
// command there (or in --workdir) through the watcher, brings the --return files back into
// the directory the job was queued in (also when the command failed), removes the job's
// directory if --cleanup, and exits with the command's code. rsync -rs (-r: a directory goes whole; -s: --protect-args,
// called --secluded-args since 3.2.6, which still takes -s) sends file names as bytes, not
// through the worker's shell. A kill here ends the whole process group: sh, rsync and ssh
// (and so, through the watcher, the command). A connection failure of ssh or rsync exits
// 255 (the worker failed: the job is requeued); the command's own 253 and 255 come back
// as 254, and 253 means a --return file was missing.

/** Fields of a job with files to move. */
type TransferJob = { transfer?: string[]; returns?: string[]; returnOptional?: true; cleanup?: true };
/** The exit code of a job whose command ended but a --return file was missing. */
export const RETURN_MISSING_EXIT = 253;
/** Where the job directories are, in the worker's home directory. */
const JOB_DIR_PARENT = '.djs-work';

/** The sh program (see above) of a job with files to move, run as
 *  `sh -c PROGRAM djs-on-worker SSH_OPTIONS...` with the watcher's input in its
 *  environment. */
export function transferSh(j: { cwd: string } & TransferJob, host: string, xfer: { run: string }): string {
  const q = (w: string) => `'${w.replace(/'/g, `'\\''`)}'`; // POSIX sh's quoting (shellQuote's $'...' is bash's)
  const dir = `${JOB_DIR_PARENT}/${xfer.run}`; // relative: in the home directory, for ssh and rsync alike
  // rsync's -e is split on spaces by rsync itself, which honours single and double quotes.
  const sshCmd = String.raw`e="ssh"; for w in "$@"; do case $w in *\'*) e="$e \"$w\"";; *) e="$e '$w'";; esac; done`;
  const link = (c: string) => `case ${c} in 5|10|12|30|35|255) exit 255;; esac`; // rsync's codes of a failed connection
  const lines = [sshCmd, `ssh "$@" -- ${q(host)} ${q(`mkdir -p ${dir}`)} </dev/null || exit 255`];
  if (j.transfer?.length) {
    const from = j.transfer.map((f) => { const abs = path.resolve(j.cwd, f); return path.isAbsolute(f) ? `${path.dirname(abs)}/./${path.basename(abs)}` : `${j.cwd}/./${path.normalize(f)}`; });
    lines.push(`rsync -rsR -e "$e" -- ${from.map(q).join(' ')} ${q(`${host}:${dir}/`)} </dev/null; c=$?`,
      `if [ $c != 0 ]; then ${link('$c')}; echo "djs: --transfer to ${host} failed (rsync exit $c)" >&2; exit 1; fi`);
  }
  lines.push(`printf %s "$DJS_ON_WORKER_INPUT" | ssh "$@" -- ${q(host)} ${q(ON_WORKER_LINE)}; code=$?`,
    'case $code in 255) exit 255;; 253) code=254;; esac');
  if (j.returns?.length) {
    const from = j.returns.map((f) => `${host}:${dir}/./${path.normalize(f)}`);
    lines.push(`rsync -rsR -e "$e" ${j.returnOptional ? '--ignore-missing-args ' : ''}-- ${from.map(q).join(' ')} ${q(`${j.cwd}/`)} </dev/null; c=$?`,
      `if [ $c != 0 ]; then ${link('$c')}; echo "djs: --return from ${host} failed (rsync exit $c): a file is missing or unreadable there" >&2; [ $code = 0 ] && code=${RETURN_MISSING_EXIT}; fi`);
  }
  if (j.cleanup) lines.push(`ssh "$@" -- ${q(host)} ${q(`rm -rf ${dir}`)} </dev/null`);
  lines.push('exit $code');
  return lines.join('\n');
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
      if (holdsOpen(name, file)) return true;
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
      if (holdsOpen(name, file)) return Number(name);
    } catch (e) { if (!gone(e)) throw e; }
  }
  return null;
}

/** True if process `pid` holds `file` open (a descriptor of it is that inode). Throws
 *  what reading its /proc entries throws: the caller tells a process gone meanwhile
 *  (gone) from /proc that cannot be read. */
function holdsOpen(pid: string, file: fs.Stats): boolean {
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    const held = fs.statSync(`/proc/${pid}/fd/${fd}`);
    if (held.ino === file.ino && held.dev === file.dev) return true;
  }
  return false;
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
export function sshSettings(env: Record<string, string | undefined>): SshSettings {
  const timeoutS = Number(env.DJS_SSH_TIMEOUT ?? initialOf('DJS_SSH_TIMEOUT'));
  const whole = (name: string, dflt: number, min: number) => {
    const v = env[name];
    if (v === undefined || v === '') return dflt;
    if (!/^\d+$/.test(v) || Number(v) < min) throw usage(`invalid ${name} ${quoteForError(v)}`, `a whole number, at least ${min}`);
    return Number(v);
  };
  const shared = env.DJS_SSH_SHARED ?? initialOf('DJS_SSH_SHARED');
  if (shared !== '0' && shared !== '1' && shared !== '') throw usage(`invalid DJS_SSH_SHARED ${quoteForError(shared)}`, '1 (shared connections, the default) or 0');
  return {
    config: env.DJS_SSH_CONFIG || undefined,
    options: (env.DJS_SSH_OPTIONS ?? '').split(/\s+/).filter(Boolean),
    timeoutS: Number.isFinite(timeoutS) && timeoutS > 0 ? timeoutS : Number(initialOf('DJS_SSH_TIMEOUT')),
    shared: shared !== '0',
    perConnection: whole('DJS_SSH_SESSIONS', Number(initialOf('DJS_SSH_SESSIONS')), 1),
    heartbeatMs: whole('DJS_HEARTBEAT', Number(initialOf('DJS_HEARTBEAT')), 0) * 1000,
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

/** The control dir `dir` (see controlDirFor), made or checked; one in the temporary
 *  directory that someone else took first (its name can be foreseen) is not given up
 *  for: whatever is there instead of a directory of this user's alone (another user's
 *  directory, a symlink, dangling or not, a file, a FIFO), a new one with a random
 *  suffix is made in /tmp instead. */
export function ownControlDir(dir: string, dataDir: string): string {
  if (dir === path.join(dataDir, 'ssh')) { ownDir(dir, 'ssh control dir'); return dir; }
  try { ownDir(dir, 'ssh control dir'); return dir; } catch (e) {
    let why = (e as Error).message;
    if (!(e instanceof UserError)) {
      let kind = 'something';
      try { const l = fs.lstatSync(dir); kind = l.isSymbolicLink() ? 'a symbolic link' : l.isDirectory() ? 'a directory' : 'a file'; } catch { /* gone meanwhile */ }
      why = `the ssh control dir '${dir}' is taken by ${kind} that djs cannot use (${(e as NodeJS.ErrnoException).code ?? why})`;
    }
    const other = fs.mkdtempSync(path.join('/tmp', `${path.basename(dir)}-`));
    log(`warning: ${why}; the ssh control dir is ${other} instead`);
    return other;
  }
}

/** The ssh words of a login check or probe: through shared connection n when shared. */
function checkArgs(host: string, ssh: SshSettings, n: number, command: string): string[] {
  const args = ['-o', 'BatchMode=yes', '-o', `ConnectTimeout=${ssh.timeoutS}`];
  if (ssh.shared && ssh.controlDir) {
    // Not written (no file descriptor free, a full disk): ssh says so, as the check's error.
    let file = path.join(ssh.controlDir, `config.${n}`);
    try { file = sharedConfigFile(ssh, n); } catch { /* that error */ }
    args.push('-F', file);
  } else {
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
export async function probeHost(host: string, ssh: SshSettings, slots = 1, command = 'true', result?: { out: string }, env?: NodeJS.ProcessEnv): Promise<string | null> {
  validateHost(host);
  const n = ssh.shared && ssh.controlDir ? connectionsOf(slots, ssh) : 1;
  const errs = await Promise.all(Array.from({ length: n }, (_, i) => checkOnce(checkArgs(host, ssh, i, i === 0 ? command : 'true'), ssh, i === 0 ? result : undefined, env)));
  return errs.find((e) => e !== null) ?? null;
}

/** Ends the shared connections to host (ssh -O exit with each config in the control
 *  dir): a removed worker keeps no login open. A host with none costs a failed local
 *  call of ssh per config. */
export function closeShared(host: string, ssh: SshSettings): void {
  if (!ssh.shared || !ssh.controlDir) return;
  let names: string[];
  try { names = fs.readdirSync(ssh.controlDir).filter((n) => /^config\.\d+$/.test(n)); } catch { return; }
  for (const name of names) {
    const child = spawn('ssh', ['-F', path.join(ssh.controlDir, name), '-O', 'exit', '--', host], { stdio: 'ignore' });
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    child.on('error', () => clearTimeout(timer)).on('close', () => clearTimeout(timer));
  }
}

/** The words of the login check of host as add_slave runs it (its first connection),
 *  for errors to show the command to be run by hand. */
export const probeArgs = (host: string, ssh: SshSettings, command = 'true') => checkArgs(host, ssh, 0, command);

/** Runs one ssh login check (checkArgs); see runCheck. */
const checkOnce = (args: string[], ssh: SshSettings, result?: { out: string }, env?: NodeJS.ProcessEnv) =>
  runCheck('ssh', args, ssh.timeoutS, { result, env, noAnswer: 'no answer', counts: (line) => !line.startsWith('Warning: Permanently added') });

/** Runs a check of a worker (ssh, or sinfo), its output (64 KiB at the most) into
 *  `result` when given, killed if it has not ended in timeoutS + 5 s. Resolves to null
 *  once it exits 0, else to why not: the last line of its stderr that `counts` (or that
 *  it exited with N), that it gave no answer in time, or that it could not be run. */
function runCheck(cmd: string, args: string[], timeoutS: number, o: { result?: { out: string }; env?: NodeJS.ProcessEnv; noAnswer: string; counts?: (line: string) => boolean }): Promise<string | null> {
  const { result, env, counts = () => true } = o;
  return new Promise((resolve) => {
    let err = '', done = false;
    const child = spawn(cmd, args, { stdio: ['ignore', result ? 'pipe' : 'ignore', 'pipe'], env });
    child.stdout?.on('data', (d) => { if (result && result.out.length < 65536) result.out += d; });
    const finish = (why: string | null) => { if (!done) { done = true; clearTimeout(timer); resolve(why); } };
    const timer = setTimeout(() => { child.kill('SIGKILL'); finish(`${o.noAnswer} within ${timeoutS + 5}s`); }, (timeoutS + 5) * 1000);
    child.stderr?.on('data', (d) => { if (err.length < 4096) err += d; }); // none if it did not start
    child.on('error', (e) => finish(`cannot run ${cmd}: ${e.message}`));
    child.on('close', (code) => {
      if (code === 0) return finish(null);
      const lines = err.split('\n').map((l) => l.trim()).filter((l) => l && counts(l));
      finish(lines.at(-1) ?? `${cmd} exited with ${code}`);
    });
  });
}

/** Asks Slurm whether a partition takes jobs: `sinfo` here, or on the login host over ssh
 *  (with the same settings as probeHost); resolves to null or to why not (Slurm's own
 *  words: the partition's state, the nodes' state and reason, or sinfo's error). */
export function probeSlurm(target: SlurmTarget, ssh: SshSettings, gpus = 0, env?: NodeJS.ProcessEnv): Promise<string | null> {
  // With gpus (add_slave --gpus N): each line starts with its node count and gres (%D/%G).
  const args = ['--noheader', `--partition=${target.partition}`, gpus > 0 ? '--format=%D/%G/%a/%T/%E' : '--format=%a/%T/%E'];
  const result = { out: '' };
  const asked = target.login === null ? runSinfo(args, ssh.timeoutS, result, env) : probeHost(target.login, ssh, 1, ['sinfo', ...args].join(' '), result, env);
  return asked.then((err) => {
    if (err !== null || gpus === 0) return err ?? sinfoVerdict(result.out, target.partition);
    const lines = result.out.split('\n').filter((l) => l.trim());
    const rest = lines.map((l) => l.split('/').slice(2).join('/')).join('\n');
    return sinfoVerdict(rest, target.partition) ?? slurmGpuVerdict(lines.map((l) => l.split('/').slice(0, 2).join('/')), target.partition, gpus);
  });
}

/** Whether a partition has the GPUs a worker is added with (--gpus N), from sinfo's
 *  `%D/%G` of each group of nodes (node count / generic resources, like `2/gpu:a100:4(S:0-1)`
 *  or `1/(null)`): null if it has at least N in all, else why not. Without this, every
 *  srun of a GPU job would be refused (Invalid generic resource specification). */
export function slurmGpuVerdict(lines: string[], partition: string, gpus: number): string | null {
  let total = 0;
  const seen: string[] = [];
  for (const line of lines) {
    const slash = line.indexOf('/'), nodes = Number(line.slice(0, slash)) || 0, gres = line.slice(slash + 1).trim();
    if (!seen.includes(gres)) seen.push(gres);
    for (const m of gres.matchAll(/(?:^|,)gpu(?::[^:,()]+)?:(\d+)/g)) total += nodes * Number(m[1]);
  }
  if (total >= gpus) return null;
  return `--gpus ${gpus}, but Slurm partition '${partition}' has ${total === 0 ? 'no GPUs' : `${total} GPU${total === 1 ? '' : 's'}`} (sinfo's gres: ${seen.join(', ') || 'none'})`;
}

/** Runs sinfo ARGS here, its output into result; resolves to null or to why it failed. */
const runSinfo = (args: string[], timeoutS: number, result: { out: string }, env?: NodeJS.ProcessEnv) =>
  runCheck('sinfo', args, timeoutS, { result, env, noAnswer: 'sinfo gave no answer' });

/** Node states (sinfo %T, without its suffixes) in which a node takes or runs jobs. */
const SLURM_NODE_USABLE = new Set(['idle', 'mixed', 'allocated', 'completing', 'planned', 'reserved']);

/** What `sinfo --format=%a/%T/%E` printed for a partition (a line per group of nodes:
 *  availability/state/reason) says: null when the partition is up and has a node that
 *  takes jobs, else why not. A node state ending in `*` does not respond. */
export function sinfoVerdict(out: string, partition: string): string | null {
  const lines = out.split('\n').map((l) => l.trim()).filter(Boolean).map((l) => {
    const [avail, state] = l.split('/', 2);
    return { avail, state, reason: l.slice(avail.length + state.length + 2) };
  });
  if (!lines.length) return `Slurm has no partition '${partition}'`;
  const off = lines.find((l) => l.avail !== 'up');
  if (off) return `Slurm partition '${partition}' is ${off.avail}`;
  if (lines.some((l) => SLURM_NODE_USABLE.has(l.state.replace(/[~#!%$@^+-]+$/, '')))) return null;
  const why = lines.find((l) => l.reason && l.reason !== 'none') ?? lines[0];
  return `no node of Slurm partition '${partition}' takes jobs: ${why.state}${why.reason && why.reason !== 'none' ? ` (${why.reason})` : ''}`;
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
/** A `wait` client: for jobs (ids, or all when null), or for workers to be gone;
 *  `absent` counts the ids it named that were no job when asked (they count as removed);
 *  `forgotten` counts its jobs that a clean forgot, by how they ended, and `held` is
 *  what holds its jobs (whyHeld) as of event `seq`. */
type Waiter = {
  ids: Set<number> | null; absent: number; pending: Set<number> | null; hosts: string[] | null; send: Reply; lastSent: number; lastKey: string; done: () => void;
  forgotten?: { done: number; failed: number; killed: number };
  held?: { seq: number; why: string | null };
};
type Follower = { id: number; send: Reply; done: () => void };
type ServerConfig = {
  dataDir: string; logDir: string; killGraceMs: number; probeMaxMs: number; snapshotMinBytes: number; ssh: SshSettings;
  maxConnections: number; clientBytes: number; settings: Settings; changed: [string, string, string][];
  http: { host: string; port: number } | null; slurmCheckMs: number;
  httpMaxConnections: number; caps: ConnectionCaps;
  instance: string; // this data dir's name among all servers (see instanceOf)
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
const checks = { runs: 0, sweeps: 0 };    // checks of watched runs and sweeps of run/ made: status's server.checks
const waiters = new Set<Waiter>();
const followers = new Set<Follower>();
let shuttingDown = false;
let argSpace = 0;                          // bytes an exec leaves for a job's argv (see argSpaceOf)
let environSpace = 0;                      // the same for a job that runs with its add's environment
/** What a job that runs with its add's environment gets from the server: its data dir,
 *  its ssh settings (as baseEnv has them) and its ssh agent (ENVIRON_FROM_SERVER). */
let serverWords: string[] = [];
const metrics = newMetrics(Date.now());    // counters for /metrics and the dashboard's chart

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
/** The type of each field an operation reads (an Op's `fields`), checked before it is
 *  served (socket and HTTP alike), so that a field of the wrong type is a usage error rather than taken
 *  as absent or as something else (`ids: "x"` waiting on every job). Values are the
 *  operation's to check (ranges, known states, tags); an absent field is undefined,
 *  and null is a value (of the wrong type, except where it is listed). On the socket,
 *  fields not listed are ignored, as a client of another release may send some; a POST
 *  over HTTP may carry no others. */
type FieldType = { ok: (v: unknown) => boolean; what: string; schema?: Record<string, unknown> };
const BOOL: FieldType = { ok: (v) => typeof v === 'boolean', what: 'true or false', schema: { type: 'boolean' } };
const TEXT: FieldType = { ok: (v) => typeof v === 'string', what: 'a string', schema: { type: 'string' } };
const NUMBER: FieldType = { ok: (v) => typeof v === 'number', what: 'a number', schema: { type: 'number' } };
const LIST: FieldType = { ok: Array.isArray, what: 'a list', schema: { type: 'array' } };
const IDS: FieldType = { ok: (v) => Array.isArray(v) && v.length > 0, what: 'a list of job ids, not empty', schema: { type: 'array', items: { type: 'integer' }, minItems: 1 } };
const OBJECT: FieldType = { ok: (v) => typeof v === 'object' && v !== null && !Array.isArray(v), what: 'an object', schema: { type: 'object' } };
/** The environment of the client's shell (NAME=VALUE words): the socket's only, since
 *  over HTTP there is no shell (POST refuses it; such adds run with the server's). */
const ENVIRON: FieldType & { socketOnly: true } = { ok: (v) => Array.isArray(v), what: 'a list of NAME=VALUE words', socketOnly: true };

type Op = (
  | { kind: 'read'; answer: (req: Request) => Record<string, unknown> }
  | { kind: 'change'; decide: Decide }
  | { kind: 'check'; check: (req: Request) => Promise<Request>; decide: Decide }
  | { kind: 'stream'; open: (req: Request, conn: Conn) => void }
  | { kind: 'shutdown' }
) & {
  /** The fields it reads, by type. */
  fields?: Record<string, FieldType>;
  /** Served as POST /api/OP too, with a JSON object of its fields (no others). */
  http?: true;
};

const serverInfo = () => ({
  pid: process.pid, dataDir: cfg.dataDir, logDir: cfg.logDir, settings: cfg.settings, http: httpUrl(),
  connections: { socket: cfg.maxConnections, http: cfg.httpMaxConnections, openFiles: Number.isFinite(cfg.caps.fdLimit) ? cfg.caps.fdLimit : null },
  launcher: launcherDown ? { error: launcherDown.why, failedStarts: launcherDown.tries, retryAt: iso(launcherDown.retryAt) } : null,
  checks: { ...checks },
});

export const OPS: Record<string, Op> = {
  ping: { kind: 'read', answer: serverInfo },
  new_token: { kind: 'read', answer: renewHttpToken },   // socket only; no job or worker changes, so nothing to journal
  status: { kind: 'read', answer: () => ({ server: serverInfo(), ...statusView(st, rt.health) }) },
  list: { kind: 'stream', open: streamJobs, fields: { state: { ok: (v) => typeof v === 'string' || (Array.isArray(v) && v.length > 0), what: 'a state, or a list of states' }, tag: TEXT } },
  jobs: { kind: 'read', answer: (req) => pageJobs(st, req, Date.now(), textBudget()), fields: { state: TEXT, tag: TEXT, worker: TEXT, text: TEXT, limit: NUMBER, before: NUMBER } },
  job: { kind: 'read', answer: (req) => ({ job: jobView(st, jobOrFail(st, num(req.id, 'job id', 1)), Date.now()) }), fields: { id: NUMBER } },
  find: { kind: 'read', answer: (req) => ({ ids: idsNamed(st, req.names) }), fields: { names: { ok: (v) => Array.isArray(v) && v.length > 0 && v.length <= 1000 && v.every((n) => typeof n === 'string'), what: 'a list of 1 to 1000 job names' } } },
  log: { kind: 'stream', open: openLog, fields: { id: NUMBER, follow: BOOL } },
  wait: { kind: 'stream', open: openWait, fields: { ids: IDS, tag: TEXT, ranges: LIST, all: BOOL, hosts: { ok: (v) => Array.isArray(v) && v.length > 0 && v.every((h) => typeof h === 'string'), what: 'a list of host names' } } },
  add_jobs: {
    kind: 'check', check: checkScripts, decide: decideAddJobs, http: true, fields: {
      cwd: TEXT, jobs: LIST, retries: NUMBER, timeout: NUMBER, retryDelay: NUMBER, tags: LIST, priority: NUMBER, after: LIST, afterAny: LIST, env: LIST,
      sweep: LIST, slots: NUMBER, gpus: NUMBER, require: LIST, avoid: LIST, hosts: LIST, environ: ENVIRON, onWorker: BOOL, workdir: TEXT, name: TEXT,
      transfer: LIST, return: LIST, returnOptional: BOOL, cleanup: BOOL,
    },
  },
  remove_jobs: { kind: 'change', decide: decideRemoveJobs, http: true, fields: { ids: IDS, tag: TEXT, script: TEXT, command: TEXT, args: LIST, env: LIST } },
  kill: { kind: 'change', decide: decideKill, http: true, fields: { ids: IDS, all: BOOL, tag: TEXT } },
  retry: { kind: 'change', decide: decideRetry, http: true, fields: { ids: IDS, failed: BOOL, killed: BOOL, tag: TEXT } },
  clean: { kind: 'change', decide: decideClean, http: true, fields: { logs: BOOL, tag: TEXT, states: LIST } },
  set_priority: { kind: 'change', decide: decideSetPriority, http: true, fields: { ids: IDS, tag: TEXT, priority: NUMBER } },
  pause: { kind: 'change', decide: decidePause, http: true, fields: { tag: TEXT, ahead: BOOL } },
  resume: { kind: 'change', decide: decidePause, http: true, fields: { tag: TEXT } },
  policy: { kind: 'change', decide: decidePolicy, http: true, fields: { name: TEXT } },
  add_workers: { kind: 'check', check: checkLogins, decide: decideAddWorkers, http: true, fields: { workers: LIST, skipCheck: BOOL, requeueOnDown: BOOL, environ: ENVIRON } },
  remove_workers: { kind: 'change', decide: decideRemoveWorkers, http: true, fields: { hosts: LIST, mode: { ok: (v) => v === null || v === 'wait' || v === 'kill', what: '"wait", "kill" or null', schema: { enum: ['wait', 'kill', null] } } } },
  load_status: { kind: 'check', check: checkLoadStatus, decide: decideLoadStatus, fields: { cwd: TEXT, status: OBJECT, alive: LIST, skipCheck: BOOL, environ: ENVIRON } },
  stop: { kind: 'shutdown' },
};

/** Throws a usage error naming the first field of `req` of a type its op does not take. */
export function checkFields(req: Request, fields: Record<string, FieldType> = {}): void {
  for (const [name, type] of Object.entries(fields)) {
    const v = req[name];
    if (v !== undefined && !type.ok(v)) throw usage(`invalid ${name} ${quoteForError(JSON.stringify(v) ?? String(v))} for ${req.op}`, `${name} is ${type.what}`);
  }
}

/** One request line: parsed, looked up in OPS, served by its kind. Never throws. */
function handleRequestLine(line: string, conn: Conn): void {
  let req: Request;
  try {
    if (line.length > 1 << 20 && containers(line) > line.length / 8) throw new Error('too many arrays and objects');
    if (nestedDeeper(line, MAX_NESTING)) return conn.send({ ok: false, code: EXIT_USAGE, error: `malformed request: arrays and objects nested deeper than ${MAX_NESTING}` });
    const v = JSON.parse(line);
    if (!v || typeof v !== 'object' || Array.isArray(v) || typeof v.op !== 'string') throw new Error('no op');
    req = v;
  } catch {
    conn.send({ ok: false, code: EXIT_USAGE, error: 'malformed request: expected one JSON object with an "op" per line' });
    return;
  }
  serveRequest(req, conn);
}

/** How deep the arrays and objects of a request may nest: real ones go 5 deep (a
 *  cli.py status file); deeper ones would overflow the stack of the checks that walk
 *  them (an error message that quotes the value, say). */
const MAX_NESTING = 64;

/** Whether the JSON text `text` opens arrays and objects more than `max` deep (the
 *  outermost counts; brackets in strings do not). One pass over the text, before it is
 *  parsed: a fraction of what JSON.parse costs. */
export function nestedDeeper(text: string, max: number): boolean {
  let depth = 0, inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 0x5c) i++; // \ escapes the next character
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) inString = true;
    else if (c === 0x5b || c === 0x7b) { if (++depth > max) return true; }
    else if (c === 0x5d || c === 0x7d) depth--;
  }
  return false;
}

/** Serves one request through OPS, for the socket and for HTTP alike. Never throws. */
function serveRequest(req: Request, conn: Conn): void {
  const op = Object.hasOwn(OPS, req.op) ? OPS[req.op] : undefined;
  try {
    if (!op) throw usage(`unknown request ${quoteForError(req.op)}`);
    checkFields(req, op.fields);
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

/** add_jobs, before deciding: every script is an executable regular file, and the jobs
 *  pass checkJobList, checked in parts with other clients served in between (a list of
 *  a million jobs takes a second), so that the decision need not check them again. */
async function checkScripts(req: Request): Promise<Request> {
  const seen = new Set<string>();
  // The files an --on-worker job sends to its worker must be here now.
  if (req.onWorker === true && Array.isArray(req.transfer) && typeof req.cwd === 'string') {
    for (const f of req.transfer) {
      if (typeof f !== 'string') continue; // transferOf says what is wrong
      try { fs.statSync(path.resolve(req.cwd, f)); } catch (e) { throw failure(`--transfer file ${quoteForError(f)}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (e as Error).message}`); }
    }
  }
  // An --on-worker command is found on the worker, when it runs: nothing to check here.
  for (const spec of Array.isArray(req.jobs) && req.onWorker !== true ? req.jobs : []) {
    const script = Array.isArray(spec) ? spec[0] : undefined;
    if (typeof script !== 'string' || !path.isAbsolute(script) || seen.has(script)) continue;
    seen.add(script);
    checkExecutable(script, script);
  }
  if (Array.isArray(req.jobs) && req.jobs.length) {
    const [envBytes, envText] = envCosts(req.env === undefined ? [] : envOf(req.env));
    return { ...req, [JOBS_CHECKED]: await stepsApart(checkJobList(req, envBytes, envText, spaceFor(req))) };
  }
  return req;
}

/** What an exec leaves for a job's argv and --env: beside the server's environment, or
 *  beside the one of the add that queued it (see decideAddJobs). */
const spaceFor = (req: Request) => (req.environ === undefined ? argSpace : environSpace - environOf(req.environ).bytes);

/** Runs a generator of steps (checkJobList) with a turn of the event loop after each. */
async function stepsApart<T>(g: Generator<void, T>): Promise<T> {
  for (;;) {
    const r = g.next();
    if (r.done) return r.value;
    await new Promise((resolve) => setImmediate(resolve));
  }
}

/** add_workers, before deciding: unless told to skip it, ssh logs in to every host (in
 *  parallel); if any fails, none is added. */
async function checkLogins(req: Request): Promise<Request> {
  const workers = workerSpecs(req);
  if (req.skipCheck === true) return { ...req, workers };
  const outs = workers.map(() => ({ out: '' }));
  const sent = Date.now();
  const env = req.environ === undefined ? undefined : checkEnv(environOf(req.environ).vars);
  const errs = await Promise.all(workers.map((w, i) => {
    const slurm = slurmTarget(w.host);
    return slurm ? probeSlurm(slurm, cfg.ssh, w.gpus, env) : probeHost(w.host, cfg.ssh, w.slots, w.auto ? SIZE_COMMAND : 'true', outs[i], env);
  }));
  const bad = workers.flatMap((w, i) => (errs[i] === null ? [] : [`${quoteForError(w.host)} (${errs[i]})`]));
  if (!bad.length) for (const w of workers) answered(w.host, sent);
  if (bad.length && workers.every((w, k) => errs[k] === null || slurmTarget(w.host))) {
    throw failure(`Slurm check failed for ${bad.join(', ')}; no worker added`, 'check with: sinfo -p PARTITION (on the login host), or add with --skip_ssh_auth_check');
  }
  const i = errs.findIndex((e, k) => e !== null && !slurmTarget(workers[k].host));
  if (i >= 0) {
    const by = ['ssh', ...probeArgs(workers[i].host, cfg.ssh, workers[i].auto ? SIZE_COMMAND : 'true')].map(shellQuote).join(' ');
    throw failure(`ssh login check failed for ${bad.join(', ')}; no worker added`,
      `the server ran: ${by}\nrun that by hand to see why (keys, known_hosts, ssh config); the server's ssh settings are in \`cli.ts status\` and change with \`cli.ts stop\` and a \`start\` given new ones; or add with --skip_ssh_auth_check`);
  }
  workers.forEach((w, i) => {
    if (!w.auto) return;
    const size = parseSize(outs[i].out);
    if (!size) throw failure(`cannot read the size of ${quoteForError(w.host)}: nproc printed ${quoteForError(outs[i].out.split('\n')[0] ?? '')}`, 'give the slots with HOST:N or --slots N');
    w.slots = size.cpus; w.gpus = size.gpus; w.auto = false;
  });
  return { ...req, workers };
}

/** load_status, before deciding: the state is read and its jobs checked in parts
 *  (loadPlanSteps, handed to the decision), the waitlist's scripts are executable, the jobs cli.py
 *  was running are looked up here (alive: see clipyJobAlive), and the workers to add
 *  pass the login check (unless skipped), all of them or none. */
async function checkLoadStatus(req: Request): Promise<Request> {
  if (typeof req.cwd !== 'string' || !path.isAbsolute(req.cwd)) throw usage('load_status needs an absolute cwd');
  const plan = await stepsApart(loadPlanSteps(req.status, req.cwd, spaceFor(req))), status = plan.status;
  for (const script of new Set(status.jobs.map((j) => j.argv[0]))) checkExecutable(script, script, ' (in the waitlist)');
  const alive = status.workers.flatMap((w) => (w.job && clipyJobAlive(w.job.pid, w.job.id) ? [w.job.id] : []));
  const workers = status.workers.filter((w) => !w.removing && !(w.job && alive.includes(w.job.id)) && !st.workers.has(w.host)).map((w) => ({ host: w.host, env: w.env }));
  if (workers.length && req.skipCheck !== true) await checkLogins({ op: 'add_workers', workers, environ: req.environ });
  return { ...req, alive, [JOBS_CHECKED]: plan };
}

/** Whether cli.py's job `id` still runs as process `pid` here: the process lives and
 *  carries JOB_ID=id (cli.py set it), so a reused pid does not count. A process that is
 *  not ours to read counts as alive: better to leave a worker out than to overload it. */
function clipyJobAlive(pid: number, id: string): boolean {
  try { process.kill(pid, 0); } catch (e) { return (e as NodeJS.ErrnoException).code === 'EPERM'; }
  try { return fs.readFileSync(`/proc/${pid}/environ`, 'latin1').split('\0').includes(`JOB_ID=${id}`); } catch (e) {
    return (e as NodeJS.ErrnoException).code !== 'ENOENT';
  }
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

/** What one flush collects before it writes: journal lines, answers (an answer that
 *  `waits` goes out once that expansion is done), effects, and the big adds it began. */
type Turn = {
  lines: string[]; answers: { reply: Reply; answer: Record<string, unknown>; waits?: Expansion }[]; effects: Effect[]; facts: Event[];
  touched: Set<number> | null; expanding: Expansion[];
};

/** A big add (more than EXPAND_AT jobs) whose jobs are made a part per turn, after its
 *  event is on disk, so that other clients are served in between (about 20 ms of work a
 *  turn): a sweep of 1,000,000 jobs takes seconds to make. Until its last job is made,
 *  the client that asked gets no answer, no other add is decided (ids and queue order
 *  stay what a replay makes), and no snapshot is written (it would miss the rest); with
 *  --after nothing else is decided or recorded either, since a dependency that ended
 *  meanwhile would hold the rest for ever where a replay fails them. Reads are served
 *  all along and may see part of its jobs. */
type Expansion = { cur: AddCursor; replies: { reply: Reply; answer: Record<string, unknown> }[] };
const expansions: Expansion[] = [];
const EXPAND_AT = 5000, EXPAND_STEP = 1000, EXPAND_MS = 20;

/** Makes jobs of the pending expansions for about EXPAND_MS; answers those that are done. */
function expand(): void {
  const t0 = performance.now();
  while (expansions.length && performance.now() - t0 < EXPAND_MS) {
    const x = expansions[0];
    if (!makeJobs(st, x.cur, EXPAND_STEP)) continue;
    expansions.shift();
    for (const a of x.replies) a.reply({ ok: true, ...a.answer });
    dashboardChanged();
  }
}

/** Whether an input waits for the pending expansions (see Expansion). */
function waitsForExpansion(input: Input, pending: Expansion[]): boolean {
  if (!pending.length || input.kind === 'tick') return false;
  if (pending.some((x) => x.cur.ev.after)) return true;
  return input.kind === 'request' && (input.decide === decideAddJobs || input.decide === decideLoadStatus);
}

/** Applies an event, numbers it for the journal, and notes its effects. */
function commit(turn: Turn, ev: Event): void {
  const cascades = st.cascades;
  const counted = counts(st, ev);
  if (ev.e === 'clean' && waiters.size) noteForgotten(ev);
  if (ev.e === 'add' && (expansions.length || turn.expanding.length || addCount(ev) > EXPAND_AT)) {
    turn.expanding.push({ cur: beginAdd(st, ev), replies: [] });
  } else applyEvent(st, ev);
  if (counted) countEvent(metrics, st, ev);
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
    case 'add': return []; // new ids: no wait holds them (a wait names jobs that exist)
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
  if (expansions.length) expand();
  const turn: Turn = { lines: [], answers: [], effects: [], facts: [], touched: new Set(), expanding: [] };
  const later: Input[] = [];
  for (const input of inbox.splice(0)) {
    if (waitsForExpansion(input, expansions.length ? expansions : turn.expanding)) later.push(input);
    else if (input.kind === 'fact') { turn.facts.push(input.ev); commit(turn, input.ev); }
    else if (input.kind === 'request') {
      try {
        const began = turn.expanding.length;
        const d = input.decide(st, input.req, { now, killGraceMs: cfg.killGraceMs, argSpace, environSpace });
        for (const ev of d.events) commit(turn, ev);
        if (d.effects) turn.effects.push(...d.effects);
        turn.answers.push({ reply: input.reply, answer: d.answer, waits: turn.expanding.length > began ? turn.expanding.at(-1) : undefined });
      } catch (e) {
        sendError(input.reply, e);
      }
    }
  }
  inbox.unshift(...later);
  const p = plan(st, rt, now, cfg.killGraceMs, { heartbeatMs: cfg.ssh.heartbeatMs, probeMaxMs: cfg.probeMaxMs });
  for (const ev of p.events) {
    if (ev.e === 'probe' && !ev.ok) log(`worker ${ev.host} is down: ${ev.err}`);
    commit(turn, ev);
  }
  turn.effects.push(...p.effects);
  if (turn.lines.length) {
    try {
      const t0 = performance.now();
      journal.append(turn.lines.join('\n') + '\n');
      observe(metrics.fsync, (performance.now() - t0) / 1000);
      writeRetryMs = 0;
    } catch (e) {
      return recoverFromWriteFailure(e as NodeJS.ErrnoException, turn);
    }
  }
  for (const a of turn.answers) if (a.waits) a.waits.replies.push(a); else a.reply({ ok: true, ...a.answer });
  expansions.push(...turn.expanding);
  for (const fx of turn.effects) perform(fx);
  flushLaunches();
  if (turn.lines.length) { notifyWatchers(now, turn.touched); dashboardChanged(); }
  if (journal.needsSnapshot() && !expansions.length) takeSnapshot();
  armTimer(p.next);
  if (expansions.length) submit({ kind: 'tick' }); // the next part, after the others' I/O
}

/** The journal could not be written (disk full, read-only): memory is ahead of the
 *  disk, so reload the state from disk, refuse the requests of the turn, drop its
 *  effects, and retry the facts (processes did end; probes did answer) with a growing
 *  delay. */
function recoverFromWriteFailure(e: NodeJS.ErrnoException, turn: Turn): void {
  const what = `cannot write the journal '${path.join(cfg.dataDir, 'journal')}': ${e.message}`;
  log(`error: ${what}; ${turn.answers.length} request(s) refused, ${turn.facts.length} outcome(s) kept for retry`);
  try {
    journal.stopSnapshot();
    st = loadState(cfg.dataDir, journal.size).state;
  } catch (e2) {
    log(`fatal: cannot reload the state after a failed write: ${(e2 as Error).message}; running jobs keep running`);
    process.exit(1);
  }
  for (const a of turn.answers) a.reply({ ok: false, code: EXIT_FAILED, error: what, hint: 'nothing was changed; free space or fix the data dir, then try again' });
  // Adds of earlier turns are on disk, so the state just loaded holds all their jobs.
  for (const x of expansions.splice(0)) for (const a of x.replies) a.reply({ ok: true, ...a.answer });
  writeRetryMs = Math.min(30_000, writeRetryMs ? writeRetryMs * 2 : 250);
  setTimeout(() => { for (const ev of turn.facts) fact(ev); submit({ kind: 'tick' }); }, writeRetryMs);
}

/** Starts a snapshot, written a slice per turn while requests are served; or, at
 *  start-up (`now`), writes it before the server is ready. */
function takeSnapshot(now = false): void {
  const t0 = Date.now(), jobs = st.jobs.size;
  if (now) {
    try {
      journal.snapshot(st);
      log(`snapshot of ${jobs} jobs written in ${Date.now() - t0} ms`);
    } catch (e) {
      log(`warning: cannot write a snapshot: ${(e as Error).message}; the journal keeps growing`);
    }
    return;
  }
  journal.startSnapshot(st).then(
    (bytes) => log(`snapshot of ${jobs} jobs written in ${Date.now() - t0} ms (${bytes} bytes, a slice per turn)`),
    (e) => log(`warning: cannot write a snapshot: ${(e as Error).message}; the journal keeps growing until the next start`));
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
    case 'close-ssh': return closeShared(fx.host, cfg.ssh);
    case 'remove-logs':
      for (const id of fx.ids) fs.rm(logFile(id), { force: true }, () => {});
      if (fx.below) removeForgottenLogs(fx.below);
      return;
  }
}

/** Removes LOG_DIR/N.log of every N below `below` that is no job (any more): logs of
 *  jobs forgotten by a `clean` without --logs. Ids are never reused, so no later job
 *  can own such a file. */
function removeForgottenLogs(below: number): void {
  fs.readdir(cfg.logDir, (err, names) => {
    if (err) return;
    for (const name of names) {
      const m = /^(\d+)\.log$/.exec(name);
      if (m && Number(m[1]) < below && !st.jobs.has(Number(m[1]))) fs.rm(path.join(cfg.logDir, name), { force: true }, () => {});
    }
  });
}

// ---- the process supervisor ----------------------------------------------------

/** The launcher, started if none runs; null while it cannot be started (see
 *  launcherFailed) until its next try. */
function ensureLauncher(): ChildProcess | null {
  if (launcher) return launcher;
  if (launcherFailing || (launcherDown && Date.now() < launcherDown.retryAt)) return null;
  const { env, args } = launcherArgs(baseEnv, cfg.dataDir, cfg.logDir, process.pid);
  let l: ChildProcess;
  try { l = spawn('perl', args, { detached: true, stdio: ['pipe', 'pipe', 'inherit'], env }); } catch (e) {
    launcherFailed((e as Error).message);
    return null;
  }
  if (l.pid === undefined) {
    // It did not start (no file descriptor free, say): its error, next, says why.
    launcherFailing = true;
    l.on('error', (e) => { launcherFailing = false; launcherFailed(e.message); });
    return null;
  }
  l.stdin!.on('error', () => {});
  onLines(l.stdout!, launcherSaid);
  l.on('exit', () => launcherGone(l));
  l.on('error', (e) => { log(`error: cannot run the job launcher (perl): ${e.message}`); launcherGone(l); });
  if (launcherDown) {
    log(`the job launcher runs again, after ${launcherDown.tries} failed start(s)`);
    if (launcherDown.timer) clearTimeout(launcherDown.timer);
    launcherDown = null;
  }
  launcher = l;
  return l;
}

/** Why the launcher could not be started, how many times in a row, and when it is
 *  tried again; null while it runs (or has not been needed since). status shows it. */
let launcherDown: { why: string; tries: number; retryAt: number; timer: NodeJS.Timeout | null } | null = null;
let launcherFailing = false; // a spawn failed, its error not yet come
const LAUNCHER_RETRY_MAX_MS = 30_000;

/** The launcher could not be started (spawn failed: no file descriptor free, no perl):
 *  the starts waiting for it never reached a launcher, so their jobs go back to the
 *  queue uncharged; starts pause until the next try, 0.5 s later, doubling up to 30 s
 *  while it lasts; server.log and status say why. */
function launcherFailed(why: string): void {
  const tries = (launcherDown?.tries ?? 0) + 1;
  const ms = Math.min(LAUNCHER_RETRY_MAX_MS, 500 * 2 ** Math.min(10, tries - 1));
  if (launcherDown?.timer) clearTimeout(launcherDown.timer);
  const retryAt = Date.now() + ms;
  const timer = setTimeout(() => { if (launcherDown) launcherDown.timer = null; if (!shuttingDown) { ensureLauncher(); flushLaunches(); } }, ms);
  launcherDown = { why, tries, retryAt, timer };
  log(`error: cannot start the job launcher (perl): ${why}; jobs wait, and it is tried again in ${formatDuration(ms)}`);
  launches.length = 0;
  const t = Date.now();
  for (const [id, p] of procs) {
    if (p.how !== 'launched') continue;
    procs.delete(id);
    fact({ e: 'unstart', t, id, back: true });
  }
  rt.startsPausedUntil = Math.max(rt.startsPausedUntil, retryAt);
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
  let shared: string | null = null;
  if (cfg.ssh.shared) {
    try { shared = sharedConfigFile(cfg.ssh, connectionOf(job.slot, cfg.ssh)); } catch (e) {
      return startFailed(id, `the ssh config of its connection could not be written (${(e as Error).message})`, path.join(cfg.dataDir, 'ssh'));
    }
  }
  procs.set(id, { run: job.run, pid: 0, how: 'launched', failed: null, signal: null, began: 0 });
  // The worker's environment, then the job's own (which wins), then the slots and GPUs,
  // this run's name, and the shared ssh connection of its (first) slot.
  const env: (string | Buffer)[] = [...(st.workers.get(job.worker)?.env ?? NO_ARGS), ...(job.env ?? NO_ARGS), `SLAVE_SLOTS=${slotsOf(job).join(',')}`, `SLAVE_GPUS=${(job.gpus ?? NO_IDS).join(',')}`, `JOB_TIMEOUT=${job.timeout}`];
  const run = runName(cfg.instance, id, job.run);
  env.push(`DJS_RUN_NAME=${run}`);
  let { script, args, cwd } = job;
  if (job.onWorker) {
    // The command runs on the worker: it gets the job's environment there (not this
    // server's, nor its add's, nor the path of a config file here).
    const w = st.workers.get(job.worker) ?? { host: job.worker, slurm: null };
    const ours = [`JOB_ID=${id}`, `SLAVE_IP=${job.worker}`, `SLAVE_SLOT=${job.slot}`, `JOB_ATTEMPT=${attempt}`, ...(env as string[])];
    const moves = job.transfer || job.returns || job.cleanup ? { run } : undefined;
    const launch = onWorkerLaunch({ ...job, slots: slotsOf(job).length, gpus: job.gpus ?? NO_IDS }, w, ours, onWorkerSshWords(job.slot), cfg.killGraceMs / 1000, os.homedir(), moves);
    ({ script, args, cwd } = launch);
    env.push(...launch.env);
  }
  // A job added with its shell's environment runs with that instead of the server's
  // (see the launcher's word `=`), with what the server gives every job (serverWords).
  const environ = job.environ === null ? undefined : environWords(job.environ);
  if (environ) env.unshift(...environ);
  if (shared) env.push(`DJS_SSH_SHARED_CONFIG=${shared}`);
  launches.push(launchRecord({
    id, run: job.run, slot: job.slot, attempt, cwd, marker, worker: job.worker, env, script, args,
  }));
}

/** ssh's options for an --on-worker job on slot `slot`: its shared connection, else
 *  the settings example_job.sh uses (never prompt; give up on a silent host after
 *  about twice DJS_SSH_TIMEOUT). */
function onWorkerSshWords(slot: number): string[] {
  if (cfg.ssh.shared && cfg.ssh.controlDir) return ['-F', sharedConfigFile(cfg.ssh, connectionOf(slot, cfg.ssh)), ...cfg.ssh.options];
  const words = ['-o', 'BatchMode=yes', '-o', `ConnectTimeout=${cfg.ssh.timeoutS}`, '-o', `ServerAliveInterval=${Math.ceil(cfg.ssh.timeoutS / 2)}`, '-o', 'ServerAliveCountMax=4'];
  if (cfg.ssh.config) words.push('-F', cfg.ssh.config);
  return [...words, ...cfg.ssh.options];
}
const launches: Buffer[] = [];

/** The launcher's words of a job that runs with environment `id` ('=', its variables,
 *  serverWords), encoded once for all the jobs that share it. */
function environWords(id: string): Buffer[] | undefined {
  let words = environBytes.get(id);
  if (words) return words;
  const vars = st.environs.get(id);
  if (!vars) return undefined;
  if (environBytes.size >= 64) environBytes.clear(); // a cache, not a second copy of every environment
  words = ['=', ...vars, ...serverWords].map(bytesOf);
  environBytes.set(id, words);
  return words;
}
const environBytes = new Map<string, Buffer[]>();

/** DJS_RUN_NAME: `INSTANCE-ID-RUN`, a name no other server (instanceOf), job or run of
 *  this user shares, and safe in a file name: what a job names its files on a worker by. */
export const runName = (instance: string, id: number, run: number) => `${instance}-${id}-${run}`;

/** Hands the turn's launches to the launcher in one write. */
function flushLaunches(): void {
  if (launches.length === 0) return;
  const l = ensureLauncher();
  if (!l) return; // kept until a launcher runs, or given back (launcherFailed)
  l.stdin!.write(launches.length === 1 ? launches[0] : Buffer.concat(launches));
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
    if (p.failed === 'taken' || p.failed === 'nowrite') return startFailed(id, `its run file ${runFile(cfg.dataDir, id, p.run)} could not be created (is the data dir's disk full?)`, path.join(cfg.dataDir, 'run'));
    if (p.failed === 'log') return startFailed(id, `its log ${logFile(id)} could not be opened (is the log dir there and writable, and the log a plain file?)`, cfg.logDir);
    if (p.failed) return ended(id, p, null, `cannot start: cannot enter ${st.jobs.get(id)?.cwd ?? 'its directory'} (does it still exist?)`);
    if (rt.startFailures > 0) log(`jobs start again after ${rt.startFailures} failed start(s)`);
    rt.startFailures = 0;
    ended(id, p, Number(what));
  }
}

/** A start that failed for the scheduler's own reasons: the job never ran, so it goes
 *  back to the queue uncharged, behind the others (so that one job whose log cannot be
 *  opened does not hold up the rest). If `dir` (the log dir, the run dir) is gone or not
 *  writable, starts wait until it is back (waitForDir), however long that takes; else
 *  (a log that is a FIFO, a full disk) starts pause, longer each time (pauseStarts). */
function startFailed(id: number, why: string, dir: string): void {
  try { fs.mkdirSync(path.join(cfg.dataDir, 'run'), { recursive: true, mode: 0o700 }); } catch { /* the next failure says so */ }
  fact({ e: 'unstart', t: Date.now(), id, back: true });
  if (rt.startsWaitFor !== null) return;
  if (!usableDir(dir)) {
    log(`error: job ${id} did not start: ${why}; it is queued again, and starts wait until ${dir} is a writable directory again (checked every ${DIR_CHECK_MS} ms)`);
    return waitForDir(dir);
  }
  const delay = pauseStarts(rt, Date.now());
  // Once per episode: the pauses that follow grow up to a minute.
  if (rt.startFailures === 1) log(`error: job ${id} did not start: ${why}; it is queued again, and starts pause (${delay} ms, growing while this lasts)`);
}

/** How often a directory that starts wait for is looked at. */
const DIR_CHECK_MS = 500;
const usableDir = (dir: string) => {
  try { return fs.statSync(dir).isDirectory() && (fs.accessSync(dir, fs.constants.W_OK | fs.constants.X_OK), true); } catch { return false; }
};

/** Holds starts until `dir` is a writable directory again, looked at every DIR_CHECK_MS
 *  (a deliberate poll: nothing tells a process that a directory was made again); then
 *  they go on at once, with no pause left over from the failures. */
function waitForDir(dir: string): void {
  rt.startsWaitFor = dir;
  rt.startsPausedUntil = Infinity;
  const look = () => {
    if (shuttingDown) return;
    if (!usableDir(dir)) { setTimeout(look, DIR_CHECK_MS).unref(); return; }
    log(`${dir} is back: jobs start again`);
    rt.startsWaitFor = null;
    rt.startsPausedUntil = 0;
    rt.startFailures = 0;
    submit({ kind: 'tick' });
  };
  setTimeout(look, DIR_CHECK_MS).unref();
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
    checks.runs++;
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

/** A probe of a worker (see plan): its answer goes to the journal as the worker's state. */
function runProbe(host: string): void {
  const sent = Date.now();
  const slurm = st.workers.get(host)?.slurm, env = workerEnv(host);
  (slurm ? probeSlurm(slurm, cfg.ssh, 0, env) : probeHost(host, cfg.ssh, st.workers.get(host)?.slots, 'true', undefined, env)).then((err) => {
    rt.probing.delete(host);
    if (slurm) rt.slurmCheckAt.set(host, Date.now() + cfg.slurmCheckMs);
    if (!st.workers.has(host)) return;
    if (err === null) answered(host, sent);
    const out = checkOutcome(st, host, 'probe', err, Date.now(), cfg.probeMaxMs, cfg.killGraceMs);
    if (out.log) log(out.log);
    // A Slurm worker's routine check that finds it as it was changes nothing: no journal
    // line, just a turn, which sets the timer of its next check.
    if (!out.events.length) return submit({ kind: 'tick' });
    for (const ev of out.events) fact(ev);
  });
}

/** The environment a check runs with: `vars` (an add_slave's, kept), with the server's
 *  ssh settings and agent (serverWords). */
function checkEnv(vars: string[]): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const w of [...vars, ...serverWords]) { const eq = w.indexOf('='); env[w.slice(0, eq)] = w.slice(eq + 1); }
  return env;
}

/** The environment of a worker's checks: its add_slave's, or (undefined) the server's. */
function workerEnv(host: string): NodeJS.ProcessEnv | undefined {
  const id = st.workers.get(host)?.environ;
  const vars = id ? st.environs.get(id) : undefined;
  return vars ? checkEnv(vars) : undefined;
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
  probeHost(host, cfg.ssh, st.workers.get(host)?.slots, 'true', undefined, workerEnv(host)).then((err) => {
    h.busy = false;
    if (err === null) answered(host, sent);
    else h.err = err;
    // ssh said no (refused, or no answer within its timeout): down, as a failed probe
    // takes it; a check that just hangs counts against the limit (see plan).
    const out = checkOutcome(st, host, 'heartbeat', err, Date.now(), cfg.probeMaxMs, cfg.killGraceMs);
    if (out.log) log(out.log);
    for (const ev of out.events) fact(ev);
    submit({ kind: 'tick' });
  });
}

// ---- streams: list, wait, log -f ------------------------------------------------

function waitCounts(w: Waiter) {
  if (!w.ids) return { ...st.counts, total: st.jobs.size, missing: 0 };
  const c = { waiting: 0, running: 0, done: 0, failed: 0, killed: 0, total: w.ids.size + w.absent, missing: w.absent };
  for (const id of w.ids) {
    const job = st.jobs.get(id);
    if (job) c[job.state]++; else c.missing++;
  }
  // Jobs that ended and were then cleaned away count as they ended, not as removed.
  if (w.forgotten) for (const k of ['done', 'failed', 'killed'] as const) { c[k] += w.forgotten[k]; c.missing -= w.forgotten[k]; }
  return c;
}

/** What holds a wait's jobs (whyHeld), looked at again only after an event. */
function heldWhy(w: Waiter): string | null {
  if (w.held?.seq !== st.seq) w.held = { seq: st.seq, why: whyHeld(st, w.pending ?? waitingIds()) };
  return w.held.why;
}
function* waitingIds(): Generator<number> {
  for (const job of st.jobs.values()) if (job.state === 'waiting') yield job.id;
}

/** Before a clean forgets finished jobs: each wait that counts some of them keeps how
 *  they ended (ids are never reused, so a forgotten job never comes back). */
function noteForgotten(ev: Extract<Event, { e: 'clean' }>): void {
  const only = ev.ids ? new Set(ev.ids) : null; // else every finished job goes
  for (const w of waiters) {
    if (!w.ids) continue;
    for (const id of only && only.size < w.ids.size ? only : w.ids) {
      const job = st.jobs.get(id);
      if (!job || !isFinished(job.state) || !w.ids.has(id) || (only && !only.has(id))) continue;
      (w.forgotten ??= { done: 0, failed: 0, killed: 0 })[job.state as 'done' | 'failed' | 'killed']++;
    }
  }
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
      const why = c.waiting ? whyWaiting(st, rt, now) ?? (c.running === 0 ? heldWhy(w) : null) : null;
      const key = `${c.waiting}/${c.running}/${c.done}/${c.failed}/${c.killed}/${why}`;
      if (key !== w.lastKey) { w.lastKey = key; w.lastSent = now; w.send(why ? { progress: c, why } : { progress: c }); }
    }
  }
  for (const f of followers) {
    const job = st.jobs.get(f.id);
    if (!job || isFinished(job.state)) { f.done(); f.send({ ok: true, state: job?.state ?? 'removed', exitCode: job?.exitCode ?? null, reason: job?.reason ?? null }); }
  }
}

/** wait {ids} | {tag} | {ranges} | {all} | {} | {hosts}: answers when those jobs have
 *  finished (ids; the tag's jobs as of now; ranges [first, last] of ids, of which the
 *  ones that are no job when asked count as removed (jobsInRanges); every job, with all; without any of these, the jobs that had
 *  not finished when it was asked), or when those workers are gone; progress lines
 *  meanwhile. The ids of a tag's wait and of one without ids go to the client first, as
 *  ranges, for it to ask for the same jobs again if the server restarts. */
function openWait(req: Request, conn: Conn): void {
  let ids: Set<number> | null = null, absent = 0;
  const hosts = req.hosts === undefined ? null : (req.hosts as string[]);
  if (req.ids !== undefined) {
    ids = new Set(idList(req.ids));
    for (const id of ids) jobOrFail(st, id);
  } else if (req.tag !== undefined) {
    // The tag's jobs as of now: wait --tag T returns once they have all ended.
    tagKnown(st, req);
    const tag = tagOf(req.tag);
    ids = new Set();
    for (const job of st.jobs.values()) if (job.tags.includes(tag)) ids.add(job.id);
    conn.send({ ranges: idRanges(ids) });
  } else if (Array.isArray(req.ranges)) {
    const r = jobsInRanges(st, req.ranges);
    ids = r.ids;
    absent = r.named - r.ids.size;
  } else if (req.all !== true && !hosts) {
    ids = new Set();
    for (const job of st.jobs.values()) if (!isFinished(job.state)) ids.add(job.id);
    conn.send({ ranges: idRanges(ids) });
  }
  if (hosts) conn.send({ draining: hosts });
  const w: Waiter = { ids, absent, pending: ids && new Set([...ids].filter(unfinished)), hosts, send: conn.send, lastSent: 0, lastKey: '', done: () => {} };
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
  const info = { path: logFile(job.id), state: job.state, exitCode: job.exitCode, reason: job.reason, waitsFor: job.state === 'waiting' ? waitReason(st, job, queueReason(st)) : null };
  if (req.follow !== true || isFinished(job.state)) return conn.send({ ok: true, ...info });
  conn.send({ info });
  const f: Follower = { id: job.id, send: conn.send, done: () => {} };
  watchUntilClose(conn, followers, f);
}

/** How long one `jobs` answer looks for a `text` (ms): what it found by then is the page,
 *  with a `next` to go on from. */
const TEXT_PAGE_MS = 30;
function textBudget(): (looked: number) => boolean {
  const end = performance.now() + TEXT_PAGE_MS;
  return (n) => n % 256 === 0 && n > 0 && performance.now() > end;
}

function* matchingJobs(ids: Iterator<number>): Generator<Job> {
  for (let r = ids.next(); !r.done; r = ids.next()) {
    const job = st.jobs.get(r.value);
    if (job) yield job;
  }
}

/** list {state}: rows in chunks, waiting for the socket to drain, so a million jobs
 *  need neither one giant string nor a blocked server. */
function streamJobs(req: Request, conn: Conn): void {
  // state: one state, or a list of them.
  const wanted = req.state === undefined ? null : Array.isArray(req.state) ? req.state : [req.state];
  for (const one of wanted ?? []) if (!JOB_STATES.includes(one as JobState)) throw usage(`unknown state ${quoteForError(String(one))}`, `states are ${JOB_STATES.join(', ')}`);
  const states = wanted && new Set(wanted as JobState[]);
  tagKnown(st, req); // as every command that takes --tag
  const tag = req.tag === undefined ? undefined : tagOf(req.tag);
  // Filtered: the ids from the indexes, in id order (the order of st.jobs), so a few
  // matches among a million jobs come at once.
  const it = states || tag !== undefined ? matchingJobs(matchingIds(st, { states: states ? [...states] : undefined, tag }, 1, st.nextId, false)) : st.jobs.values();
  const sock = conn.sock;
  const now = Date.now(), queue = queueReason(st);
  let chunk = 100; // the first rows go out at once; then chunks of 2,000
  const pump = () => {
    while (!sock.destroyed) {
      const rows: JobView[] = [];
      for (let r = it.next(); !r.done; r = it.next()) {
        if ((!states || states.has(r.value.state)) && (tag === undefined || r.value.tags.includes(tag))) rows.push(jobView(st, r.value, now, queue));
        if (rows.length >= chunk) break;
      }
      chunk = 2000;
      if (rows.length === 0) { sock.end(JSON.stringify({ ok: true }) + '\n'); return; }
      const text = JSON.stringify({ rows }) + '\n';
      if (!roomFor(sock, text.length)) return;
      const more = sock.write(text);
      recount(sock);
      if (!more) { sock.once('drain', pump); return; }
    }
  };
  pump();
}

// ---- the socket ------------------------------------------------------------------

/** Both ends of the socket speak newline-delimited JSON: calls fn with each line of a
 *  stream, as text (see lineSplitter). */
export function onLines(sock: Readable, fn: (line: string) => void): void {
  const lines = lineSplitter(joinText, (line) => { fn(line); });
  sock.setEncoding('utf8');
  sock.on('data', (chunk: string) => lines.push(chunk));
}

/** What one client may cost the server: a request line of at most MAX_REQUEST_BYTES
 *  (more, even unfinished or queued, is refused and the connection closed); answers it
 *  does not read up to MAX_UNREAD_BYTES (then the connection is closed); and no more
 *  than cfg.maxConnections connections at once (then the one idle the longest goes).
 *  What all of them hold together has a budget too (see Holder). */
const MAX_REQUEST_BYTES = 16 << 20;
const MAX_UNREAD_BYTES = 64 << 20;
const connections = new Set<Conn>();

/** A client of the socket: its request lines served one at a time, in order, within
 *  what one client may cost (above) and what all of them may (hold, recount, roomFor). */
function onConnection(sock: net.Socket): void {
  const lines: Buffer[] = [];
  let queuedBytes = 0, refused = false;
  const conn: Conn = {
    sock, busy: false, lastActive: Date.now(),
    send: (msg) => {
      if (sock.destroyed) return;
      if (sock.writableLength > MAX_UNREAD_BYTES) { sock.destroy(); return; } // it does not read
      const text = JSON.stringify(msg) + '\n';
      if (!roomFor(sock, text.length)) return;
      sock.write(text);
      recount(sock);
      if (msg.ok !== undefined && conn.busy) { conn.busy = false; conn.lastActive = Date.now(); setImmediate(next); }
    },
  };
  sock.on('error', () => {});
  sock.on('close', () => connections.delete(conn));
  if (!admit(conn)) return;
  const refuse = (error: string, code = EXIT_USAGE, hint?: string) => {
    sock.removeAllListeners('data');
    refused = true;
    lines.length = 0; split.rest(); queuedBytes = 0;
    if (!sock.destroyed) sock.end(JSON.stringify({ ok: false, code, error, hint }) + '\n');
  };
  hold({
    kind: 'socket', sock, out: () => sock.writableLength, in: () => split.pending + queuedBytes, counted: { out: 0, in: 0 }, closing: false,
    // An error line would wait behind answers left unread.
    drop: (way, error, hint) => (way === 'in' || sock.writableLength === 0 ? refuse(error, EXIT_FAILED, hint) : sock.destroy()),
  });
  sock.on('drain', () => recount(sock));
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
  // A queued line is a copy: a view would keep its whole chunk in memory.
  const split = lineSplitter<Buffer>(Buffer.concat, (line) => {
    if (line.length > MAX_REQUEST_BYTES) { refuse(`request over ${MAX_REQUEST_BYTES >> 20} MiB`); return false; }
    lines.push(Buffer.from(line));
    queuedBytes += line.length;
  });
  sock.on('data', (chunk: Buffer) => {
    split.push(chunk);
    if (refused) return;
    if (split.pending > MAX_REQUEST_BYTES || queuedBytes > MAX_REQUEST_BYTES) return refuse(`request over ${MAX_REQUEST_BYTES >> 20} MiB`);
    recount(sock);
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

// ---- what all clients may cost together -----------------------------------------------

/** A client connection (socket or HTTP) as the budget sees it: the bytes the server
 *  holds for it each way, `out` (answers written that it has not read: in the socket's
 *  buffer, or in HTTP answers waiting for the socket) and `in` (requests not yet whole:
 *  a line without its newline, lines queued behind the one served, an HTTP body on its
 *  way); what they were when last counted; and how to let it go (`drop`: with a
 *  one-line error where one can still reach it, else at once).
 *
 *  Each way, all clients together may hold cfg.clientBytes (DJS_CLIENT_BYTES; 256 MiB,
 *  or an eighth of the heap if that is less): the limits of one connection times
 *  cfg.maxConnections would be far more than the heap.
 *   - out: an answer that does not fit is not written. The connection that holds the
 *     most unread goes, and so does the one asking (its answer would not fit before the
 *     memory of the first is free, which is once its socket has closed: until then
 *     its bytes still count). Closing connections after the fact is not enough: many
 *     answers can be written in one turn of the event loop, and what a closed socket
 *     held is freed only in a later one.
 *   - in: what arrived is in memory already; over the budget, the connections holding
 *     the most go until the rest fit.
 *  server.log says which and why. The totals add up what each connection held when
 *  last counted (after each write and each chunk read); what a client has read since
 *  only lowers the truth, so a total over the budget is counted afresh before anything
 *  is closed. */
type Holder = {
  kind: 'socket' | 'HTTP'; sock: net.Socket; out: () => number; in: () => number;
  counted: { out: number; in: number }; closing: boolean;
  drop: (way: Way, error: string, hint: string, res?: http.ServerResponse) => void;
};
type Way = 'out' | 'in';
const holders = new Set<Holder>();
const heldBytes = { out: 0, in: 0 };
/** The holder of each client socket (the Unix socket's, and HTTP's TCP ones). */
const holderOf = new WeakMap<net.Socket, Holder>();

/** DJS_CLIENT_BYTES unless given: 256 MiB, or an eighth of the heap if that is less. */
export const defaultClientBytes = () => Math.min(256 << 20, Math.floor(v8.getHeapStatistics().heap_size_limit / 8));

const mib = (n: number) => `${(n / 2 ** 20).toFixed(1)} MiB`;
const connName = (h: Holder) => (h.kind === 'HTTP' ? 'an HTTP connection' : 'a socket connection');
const WHOSE = { out: 'unread answers', in: 'unfinished requests' };

function hold(h: Holder): void {
  holders.add(h);
  holderOf.set(h.sock, h);
  // What a closed socket held is freed once it has closed, not before.
  h.sock.once('close', () => {
    if (!holders.delete(h)) return;
    heldBytes.out -= h.counted.out;
    heldBytes.in -= h.counted.in;
  });
}

/** Counts one holder anew (a destroyed socket keeps its count until it has closed). */
function countHolder(h: Holder): void {
  if (h.sock.destroyed) return;
  const o = h.out(), i = h.in();
  heldBytes.out += o - h.counted.out;
  heldBytes.in += i - h.counted.in;
  h.counted.out = o;
  h.counted.in = i;
}

function countAll(): void {
  for (const h of holders) countHolder(h);
}

/** The open connection holding the most bytes `way`, if any holds some. */
function topHolder(way: Way): Holder | undefined {
  let top: Holder | undefined;
  for (const h of holders) if (!h.sock.destroyed && !h.closing && h.counted[way] > 0 && (!top || h.counted[way] > top.counted[way])) top = h;
  return top;
}

/** Closes a connection for the budget, saying so in server.log. */
function shed(h: Holder, way: Way, why: string, asking = false, res?: http.ServerResponse): void {
  log(`closed ${connName(h)} that ${why}: all clients' ${WHOSE[way]} came to ${mib(heldBytes[way])}, and the server holds at most ${mib(cfg.clientBytes)} for them (DJS_CLIENT_BYTES)`);
  h.closing = true;
  h.drop(way, `the server holds at most ${mib(cfg.clientBytes)} of ${WHOSE[way]} for all its clients, and ${asking ? 'they hold that now' : 'this connection held the most'}`, 'try again later, or ask for less at once', res);
  countHolder(h);
}

/** Counts what the client of `sock` holds now, after it wrote or read; over the budget
 *  the connections holding the most go, until the rest fit. */
function recount(sock: net.Socket | null | undefined): void {
  const h = sock && holderOf.get(sock);
  if (!h || !holders.has(h)) return;
  countHolder(h);
  for (const way of ['in', 'out'] as const) {
    if (heldBytes[way] <= cfg.clientBytes) continue;
    countAll();
    for (let top = topHolder(way); top && heldBytes[way] > cfg.clientBytes; top = topHolder(way)) {
      shed(top, way, way === 'in' ? `held ${mib(top.counted.in)} of unfinished requests, the most of any client` : `left ${mib(top.counted.out)} of answers unread, the most of any client`);
    }
  }
}

/** Whether an answer of n bytes to the client of `sock` fits in the budget; if it
 *  does not, the client holding the most unread goes, this one too (with a one-line
 *  error if it has nothing unread; `res` is its HTTP answer), and false says so. */
function roomFor(sock: net.Socket | null | undefined, n: number, res?: http.ServerResponse): boolean {
  const h = sock && holderOf.get(sock);
  if (!h || !holders.has(h)) return true;
  if (h.sock.destroyed || h.closing) return false;
  if (heldBytes.out + n <= cfg.clientBytes) return true;
  countAll();
  if (heldBytes.out + n <= cfg.clientBytes) return true;
  const top = topHolder('out');
  if (top && top !== h) shed(top, 'out', `left ${mib(top.counted.out)} of answers unread, the most of any client`);
  shed(h, 'out', `was to get an answer of ${mib(n)}${h.counted.out ? ` beside the ${mib(h.counted.out)} it left unread` : ''}`, true, res);
  return false;
}

// ---- settings --------------------------------------------------------------------

/** A setting of the server: given to `start` by an option or an environment variable,
 *  kept in DATA_DIR/settings, and used by every later `start` on that data dir unless
 *  given again (an empty value given is a value: DJS_SSH_CONFIG= means none). `value`
 *  checks what was given and returns the form kept (paths absolute, against the
 *  directory `start` runs in); `initial` is the value of a data dir that never had one.
 *  `jobs`: every job gets the variable set to the kept value (unset when empty), so a
 *  job script's ssh is the ssh the server checks workers with. A new setting is one
 *  more entry here (and a line in ENVIRONMENT). */
type Setting = {
  env: string; option?: string; what: string; jobs?: boolean;
  initial: () => string; value: (given: string, name: string) => string;
};
export type Settings = Record<string, string>; // by variable name

const wholeNumber = (min: number) => (v: string, name: string) => String(intOption(v, name, min));

export const SETTINGS: Setting[] = [
  { env: 'DJS_LOG_DIR', option: 'log-dir', what: 'log dir', initial: () => path.resolve('logs'), value: (v) => path.resolve(v) },
  { env: 'DJS_KILL_GRACE', option: 'kill-grace', what: 'kill grace (s)', initial: () => '10', value: wholeNumber(0) },
  { env: 'DJS_SSH_CONFIG', what: 'ssh config', jobs: true, initial: () => '', value: (v) => (v ? path.resolve(v) : '') },
  { env: 'DJS_SSH_OPTIONS', what: 'ssh options', jobs: true, initial: () => '', value: (v) => v.trim() },
  { env: 'DJS_SSH_TIMEOUT', what: 'ssh timeout (s)', jobs: true, initial: () => '10', value: wholeNumber(1) },
  { env: 'DJS_PROBE_BACKOFF_MAX', what: 'probe backoff max (s)', initial: () => String(PROBE_BACKOFF_MAX_MS / 1000), value: wholeNumber(1) },
  { env: 'DJS_HTTP', option: 'http', what: 'http', initial: () => '', value: (v) => (v ? (parseHttpAddress(v), v) : '') },
  { env: 'DJS_SLURM_CHECK', what: 'slurm check (s)', initial: () => String(SLURM_CHECK_MS / 1000), value: wholeNumber(1) },
  { env: 'DJS_SSH_SHARED', what: 'shared ssh connections', jobs: false, initial: () => '1', value: (v, name) => { if (v !== '0' && v !== '1') throw usage(`invalid ${name} ${quoteForError(v)}`, '1 (shared connections, the default) or 0'); return v; } },
  { env: 'DJS_SSH_SESSIONS', what: 'slots per ssh connection', initial: () => String(SLOTS_PER_CONNECTION), value: wholeNumber(1) },
  { env: 'DJS_HEARTBEAT', what: 'heartbeat (s)', initial: () => '30', value: wholeNumber(0) },
];

/** The initial value of setting `env`, what a data dir that never had one gets: each
 *  default is written once, in SETTINGS, and read from there by sshSettings and by the
 *  help's list of variables (ENVIRONMENT). */
export const initialOf = (env: string) => SETTINGS.find((s) => s.env === env)!.initial();

/** The settings a start runs with: each one given (checked), else the kept one, else
 *  its initial value; and what differs from the kept ones, as [what, was, now]. */
export function resolveSettings(kept: Settings | null, given: Settings): { values: Settings; changed: [string, string, string][] } {
  const values: Settings = {}, changed: [string, string, string][] = [];
  for (const s of SETTINGS) {
    const was = kept?.[s.env] === undefined ? undefined : s.value(kept[s.env], `kept ${s.env}`);
    const v = given[s.env] !== undefined ? s.value(given[s.env], s.option ? `--${s.option}` : s.env) : was ?? s.initial();
    values[s.env] = v;
    if (was !== undefined && was !== v) changed.push([s.what, was, v]);
  }
  return { values, changed };
}

/** What a start was given: options first, then the environment. */
function givenSettings(p: Parsed, env: NodeJS.ProcessEnv): Settings {
  const given: Settings = {};
  for (const s of SETTINGS) {
    const v = (s.option ? p.values[s.option] : undefined) ?? env[s.env];
    if (typeof v === 'string') given[s.env] = v;
  }
  return given;
}

const settingsFile = (dataDir: string) => path.join(dataDir, 'settings');

/** The settings kept in a data dir, or null if it has none (new, or from a version that
 *  kept none). A damaged file stops the start, naming it. */
export function readSettings(dataDir: string): Settings | null {
  const file = settingsFile(dataDir);
  const text = readSmallFile(file, 1 << 20, 'the settings', 'move it aside (the next start writes a new one from what it is given), then start again');
  if (text === null) return null;
  let v: unknown;
  try { v = JSON.parse(text); } catch { v = null; }
  const rec = v as { format?: unknown; values?: unknown } | null;
  if (!rec || rec.format !== 'djs-settings' || !rec.values || typeof rec.values !== 'object') {
    throw failure(`damaged settings file '${file}'`, 'move it aside (the next start writes a new one from what it is given), then start again');
  }
  const out: Settings = {};
  for (const [k, val] of Object.entries(rec.values as object)) if (typeof val === 'string') out[k] = val;
  return out;
}

function writeSettings(dataDir: string, values: Settings): void {
  replaceFile(settingsFile(dataDir), (fd) => writeAll(fd, JSON.stringify({ format: 'djs-settings', version: 1, values }, null, 1) + '\n'));
}

/** "log dir was '/a/logs', now '/b/logs'; ..." */
export const describeChanges = (changed: [string, string, string][]) =>
  changed.map(([what, was, now]) => `${what} was ${shellQuote(was)}, now ${shellQuote(now)}`).join('; ');

// ---- HTTP: the dashboard, the JSON API and /metrics ------------------------------------
// `start --http [HOST:]PORT` also serves, on 127.0.0.1 unless a host is given: a page
// (its HTML, CSS, JavaScript and SVG are the strings at the end of this section; nothing
// is fetched from elsewhere), a JSON API, and metrics in the Prometheus text format.
// The API is a second door to OPS: every route builds a request and serves it through
// serveRequest, so its changes take the same flush, journal and answers as the socket's,
// and nothing the HTTP side does can hold the scheduler up for long (pages of jobs scan
// a bounded number of ids; logs are read asynchronously; slow readers are dropped).
// Access needs the random token in DATA_DIR/http.token (mode 0600), in a header
// (`Authorization: Bearer T` or `X-DJS-Token: T`) and nowhere else. Never in a cookie:
// browsers send a cookie to every port of its host (SameSite ignores ports too), so a
// web server of another local user on another port would get it. The page's shell (its
// HTML, CSS, script and icon) holds no data and is served to anyone, as is the API's
// description (GET /api/openapi.json, made from OPS and GET_ROUTES); its script takes the
// token from the URL's fragment (`/#token=T`, which browsers never send to a server),
// keeps it in memory, and sends a session key (below) in a header on every request, its
// live streams included (read with fetch: EventSource cannot send headers). `/?token=T`,
// the link of older versions, is sent on to `/#token=T`. Changes are POSTs, and a
// request forged by another site cannot carry the header; a Host header that does not
// name the address served is refused (DNS rebinding).
// The page never sends the token itself: a tab left open across `stop` would send it
// to whatever listens on the port next. It signs in by a challenge and response
// (GET /api/hello, see helloHttp): the server proves that it holds the token with an
// HMAC over a nonce the page chose, and the page then sends a session key derived from
// the token and both nonces, which only this server process knows and which dies with
// it. API clients (curl, Prometheus) may still send the token, which they hold on purpose.

let httpServer: http.Server | null = null;
let httpToken = '';
let httpNames: string[] = [];
let httpPort = 0;
let httpHostShown = '';
const eventStreams = new Set<http.ServerResponse>();
let eventsTimer: NodeJS.Timeout | null = null;
let eventsPing: NodeJS.Timeout | null = null;
const logStreams = new Set<LogStream>();
let logDirWatch: fs.FSWatcher | null = null;
/** A client following a job's log: the bytes sent so far, and how the job ended once it has. */
type LogStream = { id: number; file: string; res: http.ServerResponse; offset: number; reading: boolean; again: boolean; decoder: StringDecoder; end: Record<string, unknown> | null };

/** The query parameters of GET /api/jobs (the `jobs` operation). */
const JOBS_QUERY = ['state', 'tag', 'worker', 'text', 'before', 'limit'];
const MAX_EVENT_BACKLOG = 1 << 20;   // bytes an event stream may leave unread before it is dropped
const LOG_CHUNK = 1 << 20;            // bytes of a log one answer or one event carries at the most

const httpUrl = () => (httpServer ? `http://${httpHostShown}:${httpPort}/` : null);

/** HTTP connections: a cap of their own (the Unix socket's connections are counted
 *  apart, so HTTP clients never take its place), and two kinds. A connection is
 *  `trusted` once a request on it has carried the token; until then it is `untrusted`,
 *  which is how every connection starts, slow or not, with or without the token to come.
 *  At the cap, a new connection closes the oldest untrusted one: clients without the
 *  token, however many and however slowly they trickle their headers, only ever push
 *  each other out, while a client with the token needs its connection to live only
 *  from its connect to its headers (a local round trip) to become trusted, and a
 *  trusted connection (an open live view, say) is never closed for a newcomer. When
 *  every connection is trusted, a new one is refused. Untrusted connections also go
 *  by the headers timeout (10 s) and the keep-alive timeout. */
const httpUntrusted = new Set<net.Socket>();
const httpTrusted = new Set<net.Socket>();
const httpMaxConnections = () => cfg.httpMaxConnections;

function admitHttp(sock: net.Socket): void {
  if (httpUntrusted.size + httpTrusted.size >= httpMaxConnections()) {
    const oldest = httpUntrusted.values().next().value;
    if (!oldest) return void sock.destroy();
    httpUntrusted.delete(oldest);
    oldest.destroy();
  }
  httpUntrusted.add(sock);
  sock.once('close', () => { httpUntrusted.delete(sock); httpTrusted.delete(sock); });
}

/** A request on this connection carried the token. */
function trustHttp(sock: net.Socket): void {
  if (httpUntrusted.delete(sock)) httpTrusted.add(sock);
}

/** Listens on the address asked for, with the token of the data dir (made on first use). */
async function startHttp(addr: { host: string; port: number }): Promise<void> {
  const tokenFile = path.join(cfg.dataDir, 'http.token');
  try { fs.writeFileSync(tokenFile, crypto.randomBytes(24).toString('hex') + '\n', { flag: 'wx', mode: 0o600 }); } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
  }
  const stat = fs.lstatSync(tokenFile);
  if (!stat.isFile() || stat.mode & 0o077) throw failure(`the HTTP token file '${tokenFile}' is not a plain file that only you can read`, `remove it; the next start makes a new one`);
  httpToken = fs.readFileSync(tokenFile, 'utf8').trim();
  if (!/^[0-9a-f]{32,}$/.test(httpToken)) throw failure(`the HTTP token file '${tokenFile}' holds no token`, 'remove it; the next start makes a new one');
  const s = http.createServer({ maxHeaderSize: 16 << 10, connectionsCheckingInterval: 1000 }, serveHttp);
  s.headersTimeout = 10_000;      // a client that never finishes its headers goes
  s.requestTimeout = 60_000;      // nor its body (event streams have their headers by then)
  s.keepAliveTimeout = 5_000;
  s.on('connection', (sock: net.Socket) => { admitHttp(sock); if (!sock.destroyed) holdHttp(sock); });
  s.on('clientError', (e: NodeJS.ErrnoException, sock) => {
    if (!sock.writable) return void sock.destroy();
    sock.end(e.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 'HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n' : 'HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n');
  });
  await new Promise<void>((resolve, reject) => {
    s.once('error', (e) => reject(failure(`cannot serve HTTP on ${addr.host.includes(':') ? `[${addr.host}]` : addr.host}:${addr.port}: ${e.message}`, 'choose another port with --http PORT, or stop what listens there; to start without HTTP (and drop a kept --http): DJS_HTTP= cli.ts start -d')));
    s.listen({ port: addr.port, host: addr.host, backlog: 4096 }, () => resolve());
  });
  s.on('error', (e) => log(`HTTP error: ${e.message}`));
  httpServer = s;
  httpPort = (s.address() as net.AddressInfo).port;
  const wildcard = addr.host === '0.0.0.0' || addr.host === '::';
  const loopback = wildcard || /^(127\.|::1$|localhost$)/i.test(addr.host);
  httpNames = [addr.host, ...(loopback ? ['localhost', '127.0.0.1', '::1'] : [])];
  if (wildcard) {
    httpNames.push(os.hostname());
    for (const list of Object.values(os.networkInterfaces())) for (const a of list ?? []) httpNames.push(a.address);
  }
  httpHostShown = wildcard ? '127.0.0.1' : addr.host.includes(':') ? `[${addr.host}]` : addr.host;
  for (const job of st.jobs.values()) if (isFinished(job.state) && job.endedAt > Date.now() - CHART_MINUTES * 60_000) chartFinished(metrics, job.endedAt);
  eventsPing = setInterval(() => { for (const res of eventStreams) sendEvent(res, ': ping\n\n'); }, 20_000);
  eventsPing.unref();
}

/** An HTTP connection as the client budget sees it (Holder): `out` is what its socket
 *  has not sent yet and the answers waiting for the socket (pipelined requests), `in`
 *  the body being received, if any (its `refuse` answers 503 and stops reading). */
type HttpHolder = Holder & { waiting: Set<http.ServerResponse>; body: number; refuse: ((error: string, hint: string) => void) | null };

function holdHttp(sock: net.Socket): void {
  const h: HttpHolder = {
    kind: 'HTTP', sock, waiting: new Set(), body: 0, refuse: null, counted: { out: 0, in: 0 }, closing: false,
    out: () => {
      let n = sock.writableLength;
      for (const res of h.waiting) if (!res.socket) n += res.writableLength;
      return n;
    },
    in: () => h.body,
    drop: (way, error, hint, res) => {
      if (way === 'in' && h.refuse) return h.refuse(error, hint);
      // An answer can still say why if nothing waits before it.
      if (res && !res.headersSent && sock.writableLength === 0 && h.waiting.size === 1) {
        res.setHeader('Connection', 'close');
        return sendBody(res, 503, { 'Content-Type': 'application/json; charset=utf-8' }, JSON.stringify({ ok: false, error, hint, code: EXIT_FAILED }) + '\n', true);
      }
      sock.destroy();
    },
  };
  hold(h);
  sock.on('drain', () => recount(sock));
}

/** Answers an HTTP request with a whole body, if the client budget has room for it
 *  (`anyway`: a short error that must go out). */
function sendBody(res: http.ServerResponse, status: number, headers: http.OutgoingHttpHeaders, body: string | Buffer, anyway = false): void {
  const n = typeof body === 'string' ? Buffer.byteLength(body) : body.length;
  if (!anyway && !roomFor(res.req.socket as net.Socket | null, n, res)) return;
  res.writeHead(status, { ...SECURITY_HEADERS, ...headers, 'Content-Length': n });
  res.end(res.req.method === 'HEAD' ? undefined : body);
  recount(res.req.socket as net.Socket | null);
}

/** Whether a token given is the token, compared as bytes (UTF-8) in constant time. Bytes,
 *  not characters: a string of the token's length can be longer in bytes (non-ASCII),
 *  and timingSafeEqual throws on buffers of unequal length. */
function sameToken(given: string | undefined | null): boolean {
  if (typeof given !== 'string') return false;
  const a = Buffer.from(given, 'utf8'), b = Buffer.from(httpToken, 'utf8');
  return a.length === b.length && crypto.timingSafeEqual(a, b);
}

/** The page's sessions (see helloHttp), by the server's nonce: `fresh` ones not used
 *  yet, which anyone may open (GET /api/hello needs no token) and which therefore only
 *  push out each other, and `used` ones, kept while the server runs, least recently
 *  used first. They live in memory only: a session dies with the server that made it. */
type HttpSession = { key: Buffer };
const sessionsFresh = new Map<string, HttpSession>();
const sessionsUsed = new Map<string, HttpSession>();
const MAX_FRESH_SESSIONS = 64, MAX_USED_SESSIONS = 256;

/** HMAC-SHA256 with the token over the labelled handshake values, as the page computes
 *  it (DASHBOARD_JS: hmacHex). The label keeps a proof from ever serving as a key. */
const handshakeMac = (label: 'djs-server-proof' | 'djs-session', host: string, client: string, server: string) =>
  crypto.createHmac('sha256', httpToken).update(`${label}\n${host}\n${client}\n${server}`).digest();

/** Whether a page at host:port h may sign in here: the address served, or a name that is
 *  not this machine's at all, a proxy's (a TLS proxy passes requests on with the Host it
 *  is told, and the page knows only its own name). This machine's names and addresses
 *  with another port are refused: that is where another user's relay would come from. */
function helloHostAllowed(h: string): boolean {
  if (hostAllowed(h, httpNames, httpPort)) return true;
  const m = /^(\[[0-9a-f:.]+\]|[^:\[\]]+)(?::(\d+))?$/i.exec(h);
  if (!m) return false;
  const name = m[1].replace(/^\[|\]$/g, '');
  if (/^(localhost|.*\.localhost|127\..*|::1|::ffff:127\..*|::ffff:7f[0-9a-f]{2}:[0-9a-f]{1,4}|::|0+(\.0+)*)$/.test(name)) return false;
  const mine = [...httpNames, os.hostname(), os.hostname().split('.')[0], ...Object.values(os.networkInterfaces()).flatMap((list) => (list ?? []).map((a) => a.address))];
  return !mine.some((n) => n.toLowerCase() === name);
}

/** GET /api/hello?nonce=C&host=H, open to anyone: the server's half of the page's sign-in.
 *  The page sends a fresh random nonce C and the host:port it talks to, H; the server
 *  answers a nonce S of its own and proof = HMAC(token, "djs-server-proof" H C S). Only
 *  if the proof is right does the page go on, with the session key HMAC(token,
 *  "djs-session" H C S) in its requests (Authorization: DJS-Session S.KEY). So a server
 *  that does not hold the token (another user's, on the port after a stop) gets nothing
 *  derived from the token but a key for a session that it cannot prove to anyone; and
 *  since H is in both MACs and checked here, it cannot relay the page's challenge to
 *  the real server on another port either: that server refuses a host it does not serve. */
function helloHttp(res: http.ServerResponse, q: URLSearchParams): void {
  onlyParams(q, ['nonce', 'host']);
  const client = q.get('nonce') ?? '', host = (q.get('host') ?? '').toLowerCase();
  if (!/^[0-9a-f]{32,128}$/.test(client)) throw usage('invalid nonce', 'nonce is 32 to 128 hex digits');
  if (!helloHostAllowed(host)) return httpError(res, 403, EXIT_FAILED, `this server does not serve ${quoteForError(host)}`, `use the address the server serves: ${httpUrl()}`);
  const server = crypto.randomBytes(32).toString('hex');
  if (sessionsFresh.size >= MAX_FRESH_SESSIONS) sessionsFresh.delete(sessionsFresh.keys().next().value!);
  sessionsFresh.set(server, { key: handshakeMac('djs-session', host, client, server) });
  sendJson(res, 200, { ok: true, session: server, proof: handshakeMac('djs-server-proof', host, client, server).toString('hex') });
}

/** Whether a request carries a key of a live session (Authorization: DJS-Session S.KEY);
 *  a fresh session becomes used. */
function sessionAccepted(req: http.IncomingMessage): boolean {
  const m = /^DJS-Session ([0-9a-f]{64})\.([0-9a-f]{64})$/.exec(req.headers.authorization ?? '');
  if (!m) return false;
  const session = sessionsUsed.get(m[1]) ?? sessionsFresh.get(m[1]);
  if (!session || !crypto.timingSafeEqual(session.key, Buffer.from(m[2], 'hex'))) return false;
  sessionsFresh.delete(m[1]); sessionsUsed.delete(m[1]);
  sessionsUsed.set(m[1], session);
  if (sessionsUsed.size > MAX_USED_SESSIONS) sessionsUsed.delete(sessionsUsed.keys().next().value!);
  return true;
}

/** A new random token in DATA_DIR/http.token (mode 0600, put in place by a rename). */
function writeHttpToken(dataDir: string): string {
  const token = crypto.randomBytes(24).toString('hex');
  const file = path.join(dataDir, 'http.token'), tmp = `${file}.${process.pid}`;  // a temporary name DATA_DIR_NAME knows
  fs.rmSync(tmp, { force: true });
  fs.writeFileSync(tmp, token + '\n', { flag: 'wx', mode: 0o600 });
  fs.renameSync(tmp, file);
  return token;
}

/** `dashboard --new-token` (the new_token operation): a new token, in use at once; the
 *  old one, every session signed in with it and every stream it opened end now. */
function renewHttpToken(): Record<string, unknown> {
  const token = writeHttpToken(cfg.dataDir);
  if (httpServer) {
    httpToken = token;
    sessionsFresh.clear(); sessionsUsed.clear();
    for (const res of eventStreams) res.destroy();
    for (const ls of logStreams) ls.res.destroy();
  }
  log('made a new HTTP access token (dashboard --new-token); the old one is refused from now on');
  return { token, url: httpUrl() };
}

/** The token a request carries in a header, or null. */
function headerToken(req: http.IncomingMessage): string | null {
  const auth = req.headers.authorization;
  if (auth?.startsWith('Bearer ')) return auth.slice(7).trim();
  const h = req.headers['x-djs-token'];
  return typeof h === 'string' ? h.trim() : null;
}

const SECURITY_HEADERS = {
  'X-Content-Type-Options': 'nosniff', 'Referrer-Policy': 'no-referrer', 'Cache-Control': 'no-store',
  'X-Frame-Options': 'DENY',
};

function sendJson(res: http.ServerResponse, status: number, body: Record<string, unknown>): void {
  if (res.headersSent) { res.destroy(); return; }
  sendBody(res, status, { 'Content-Type': 'application/json; charset=utf-8' }, JSON.stringify(body) + '\n');
}

/** An error the HTTP side finds itself, as the socket's errors look: {ok, error, hint, code}. */
const httpError = (res: http.ServerResponse, status: number, code: number, error: string, hint?: string) => sendJson(res, status, { ok: false, error, hint, code });

/** The HTTP status of an answer of OPS: 200; 400 for a usage error (exit code 2); 404
 *  for an unknown job or worker and 409 for any other failure (exit code 1). The body
 *  keeps the exit code the CLI would give, as `code`. */
function httpStatusOf(m: Record<string, unknown>): number {
  if (m.ok) return 200;
  if (m.code === EXIT_USAGE) return 400;
  return /^no such (job|worker) /.test(String(m.error)) ? 404 : 409;
}

/** Serves a request through OPS and answers with its reply as JSON. */
function callOp(req: http.IncomingMessage, res: http.ServerResponse, request: Request, pick?: (m: Record<string, unknown>) => Record<string, unknown>): void {
  let answered = false;
  const send: Reply = (m) => {
    if (answered || m.ok === undefined) return;
    answered = true;
    sendJson(res, httpStatusOf(m), m.ok && pick ? { ok: true, ...pick(m) } : m);
  };
  serveRequest(request, { send, sock: req.socket, busy: true, lastActive: Date.now() });
}

/** Every HTTP request: the Host check, the token, then the route. Never throws. */
function serveHttp(req: http.IncomingMessage, res: http.ServerResponse): void {
  res.on('error', () => {});
  // A connection closed for the budget may still have pipelined requests parsed.
  const holder = holderOf.get(req.socket) as HttpHolder | undefined;
  if (req.socket.destroyed || !holder || holder.closing) return void res.destroy();
  holder.waiting.add(res);
  const done = () => holder.waiting.delete(res);
  res.once('finish', done).once('close', done);
  try {
    if (shuttingDown) return httpError(res, 503, EXIT_NO_SERVER, 'the server is stopping');
    if (!hostAllowed(req.headers.host, httpNames, httpPort)) return httpError(res, 403, EXIT_FAILED, `refused Host ${quoteForError(String(req.headers.host ?? ''))}`, `use the address the server serves: ${httpUrl()}`);
    const url = new URL(req.url ?? '/', 'http://djs');
    const given = headerToken(req);
    if (req.method === 'GET' && url.pathname === '/' && url.searchParams.has('token')) {
      // The link of older versions: on to the fragment, which the page reads.
      if (!sameToken(url.searchParams.get('token'))) return httpError(res, 401, EXIT_FAILED, 'wrong access token', 'open the URL that cli.ts dashboard prints');
      res.writeHead(303, { ...SECURITY_HEADERS, Location: `/#token=${httpToken}` });
      return void res.end();
    }
    const asset = Object.hasOwn(ASSETS, url.pathname) ? ASSETS[url.pathname] : undefined;
    if (asset && (req.method === 'GET' || req.method === 'HEAD')) return serveAsset(req, res, url, asset);
    if (req.method === 'GET' && url.pathname === '/api/hello') return helloHttp(res, url.searchParams);
    if (req.method === 'GET' && url.pathname === '/api/openapi.json') { onlyParams(url.searchParams, []); return sendJson(res, 200, openApi()); }
    if (!sameToken(given) && !sessionAccepted(req)) {
      res.setHeader('WWW-Authenticate', 'Bearer realm="djs"');
      if (/^DJS-Session /.test(req.headers.authorization ?? '')) return httpError(res, 401, EXIT_FAILED, 'no such session: the server restarted, or made a new token, since the page signed in', 'sign in again: open the URL that cli.ts dashboard prints');
      return httpError(res, 401, EXIT_FAILED, given !== null ? 'wrong access token' : 'this needs the access token', 'open the URL that cli.ts dashboard prints, or send the token of DATA_DIR/http.token as Authorization: Bearer TOKEN');
    }
    trustHttp(req.socket);
    if (req.method === 'POST') {
      const m = /^\/api\/([a-z_]+)$/.exec(url.pathname);
      if (!m) return httpError(res, 404, EXIT_USAGE, `no such resource ${quoteForError(url.pathname)}`);
      return postOp(req, res, m[1]);
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') return httpError(res, 405, EXIT_USAGE, `method ${quoteForError(String(req.method))} not allowed`, 'reads are GETs, changes are POSTs to /api/OPERATION');
    return getRoute(req, res, url);
  } catch (e) {
    const err = asUserError(e);
    httpError(res, err.code === EXIT_USAGE ? 400 : 500, err.code, err.message, err.hint);
  }
}

/** Refuses query parameters other than `names`. */
function onlyParams(q: URLSearchParams, names: string[]): void {
  for (const k of q.keys()) if (!names.includes(k)) throw usage(`unknown parameter ${quoteForError(k)}`, names.length ? `parameters here: ${names.join(', ')}` : 'this takes no parameters');
}

/** The page's shell: the same text for everyone, with no data in it (and no token). */
function serveAsset(req: http.IncomingMessage, res: http.ServerResponse, url: URL, asset: { type: string; body: string }): void {
  onlyParams(url.searchParams, []);
  sendBody(res, 200, {
    'Content-Type': asset.type,
    'Content-Security-Policy': "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
  }, asset.body);
}

/** The GET routes of the API and /metrics (the token checked). */
function getRoute(req: http.IncomingMessage, res: http.ServerResponse, url: URL): void {
  const p = url.pathname, q = url.searchParams;
  const only = (names: string[]) => onlyParams(q, names);
  if (p === '/metrics') {
    only([]);
    const text = formatMetrics(statusAnswer(), metrics);
    return sendBody(res, 200, { 'Content-Type': 'text/plain; version=0.0.4; charset=utf-8' }, text);
  }
  if (p === '/api/status') { only([]); return callOp(req, res, { op: 'status' }); }
  if (p === '/api/workers') { only([]); return callOp(req, res, { op: 'status' }, (m) => ({ workers: m.workers })); }
  if (p === '/api/events') { only([]); return openEvents(res); }
  if (p === '/api/jobs') {
    only(JOBS_QUERY);
    const r: Request = { op: 'jobs' };
    // An empty filter (a form's ?state=) filters nothing.
    for (const [k, v] of q) if (v !== '' || k === 'before' || k === 'limit') r[k] = k === 'before' || k === 'limit' ? numberParam(v, k) : v;
    return callOp(req, res, r);
  }
  const m = /^\/api\/jobs\/([^/]+)(\/log)?$/.exec(p);
  if (m) {
    const id = numberParam(m[1], 'job id');
    if (!m[2]) { only([]); return callOp(req, res, { op: 'job', id }); }
    only(['offset', 'tail', 'follow']);
    const offset = q.has('offset') ? numberParam(q.get('offset')!, 'offset') : null;
    const tail = q.has('tail') ? numberParam(q.get('tail')!, 'tail') : null;
    return openJobLog(req, res, id, offset, tail, q.get('follow') === '1' || q.get('follow') === 'true');
  }
  httpError(res, 404, EXIT_USAGE, `no such resource ${quoteForError(p)}`, 'see the README for the routes of the API');
}

/** The GET routes that getRoute and serveHttp serve, for the API's description: what
 *  each answers, its query parameters (each refused unless listed here), and whether it
 *  goes without the token. The POST routes come from OPS (its `http` operations). */
const GET_ROUTES: Record<string, { summary: string; query?: Record<string, Record<string, unknown>>; answer: 'json' | 'text' | 'events' | 'metrics'; open?: true }> = {
  '/api/hello': { summary: "the page's sign-in: {session, proof}", query: { nonce: { type: 'string', pattern: '^[0-9a-f]{32,128}$' }, host: { type: 'string' } }, answer: 'json', open: true },
  '/api/openapi.json': { summary: 'this description of the API', answer: 'json', open: true },
  '/api/status': { summary: 'status --json, plus server.http', answer: 'json' },
  '/api/workers': { summary: 'the workers of status --json', answer: 'json' },
  '/api/jobs': {
    summary: 'one page of jobs, newest first: {rows, next, total}', answer: 'json',
    query: { state: { type: 'string' }, tag: { type: 'string' }, worker: { type: 'string' }, text: { type: 'string' }, limit: { type: 'integer', minimum: 1, maximum: 1000 }, before: { type: 'integer' } },
  },
  '/api/jobs/{id}': { summary: 'one job, as in list --json', answer: 'json' },
  '/api/jobs/{id}/log': {
    summary: 'its log as text from offset (or its last tail bytes); with follow=1, server-sent events log and end', answer: 'text',
    query: { offset: { type: 'integer' }, tail: { type: 'integer' }, follow: { enum: ['1', 'true'] } },
  },
  '/api/events': { summary: 'server-sent events: status now and after every change', answer: 'events' },
  '/metrics': { summary: 'Prometheus metrics', answer: 'metrics' },
};

/** GET /api/openapi.json: the API as OpenAPI 3.1, made from OPS and GET_ROUTES. */
export function openApi(): Record<string, unknown> {
  const json = (schema: Record<string, unknown>) => ({ content: { 'application/json': { schema } } });
  const failed = { description: 'an error, with the exit code the CLI gives for it', ...json({ $ref: '#/components/schemas/Error' }) };
  const errors = { 400: failed, 401: failed, 403: failed, 404: failed, 409: failed, 503: failed };
  const paths: Record<string, Record<string, unknown>> = {};
  const content = { json: 'application/json', text: 'text/plain', events: 'text/event-stream', metrics: 'text/plain; version=0.0.4' };
  for (const [p, r] of Object.entries(GET_ROUTES)) {
    const parameters = [
      ...(p.includes('{id}') ? [{ name: 'id', in: 'path', required: true, schema: { type: 'integer', minimum: 1 } }] : []),
      ...Object.entries(r.query ?? {}).map(([name, schema]) => ({ name, in: 'query', required: false, schema })),
    ];
    paths[p] = { get: { summary: r.summary, parameters, ...(r.open ? { security: [] } : {}), responses: { 200: { description: r.summary, content: { [content[r.answer]]: {} } }, ...errors } } };
  }
  for (const [name, op] of Object.entries(OPS)) {
    if (!op.http) continue;
    const properties = Object.fromEntries(Object.entries(op.fields ?? {}).filter(([, t]) => !('socketOnly' in t)).map(([k, t]) => [k, { ...t.schema, description: t.what }]));
    paths[`/api/${name}`] = { post: {
      operationId: name, summary: `the operation ${name}, as the CLI sends it over the socket`,
      requestBody: { required: true, ...json({ type: 'object', properties, additionalProperties: false }) },
      responses: { 200: { description: 'done', ...json({ type: 'object', properties: { ok: { const: true } }, required: ['ok'] }) }, 413: failed, 415: failed, ...errors },
    } };
  }
  return {
    openapi: '3.1.0',
    info: { title: 'djs', version: '1', description: 'The JSON API of a djs server started with --http: a second door to the operations of its Unix socket. See the README.' },
    components: {
      securitySchemes: { bearer: { type: 'http', scheme: 'bearer', description: 'the token of DATA_DIR/http.token' }, header: { type: 'apiKey', in: 'header', name: 'X-DJS-Token' } },
      schemas: { Error: { type: 'object', properties: { ok: { const: false }, error: { type: 'string' }, hint: { type: 'string' }, code: { type: 'integer' } }, required: ['ok', 'error', 'code'] } },
    },
    security: [{ bearer: [] }, { header: [] }],
    paths,
  };
}

/** A whole number from a query or a path (the operation checks its range). */
function numberParam(v: string, name: string): number {
  if (!/^\d{1,15}$/.test(v)) throw usage(`invalid ${name} ${quoteForError(v)}`);
  return Number(v);
}

const statusAnswer = () => (OPS.status as Extract<Op, { kind: 'read' }>).answer({ op: 'status' }) as StatusView & { tags?: unknown };

/** POST /api/OP: a JSON object of the operation's fields, served through OPS. */
function postOp(req: http.IncomingMessage, res: http.ServerResponse, name: string): void {
  // The operations marked http in OPS, with the fields OPS names for them (no others).
  const op = Object.hasOwn(OPS, name) ? OPS[name] : undefined;
  const fields = op?.http ? Object.entries(op.fields ?? {}).filter(([, t]) => !('socketOnly' in t)).map(([k]) => k) : undefined;
  if (!fields) return httpError(res, 404, EXIT_USAGE, `unknown operation ${quoteForError(name)}`, `operations: ${Object.keys(OPS).filter((k) => OPS[k].http).join(', ')}`);
  if (!/^application\/json\b/i.test(req.headers['content-type'] ?? '')) return httpError(res, 415, EXIT_USAGE, 'a request body must be JSON', 'send Content-Type: application/json');
  const declared = Number(req.headers['content-length'] ?? 0);
  const tooBig = () => {
    httpError(res, 413, EXIT_USAGE, `request body over ${MAX_REQUEST_BYTES >> 20} MiB`);
    // Drop what still comes for a moment (closing on unread bytes resets the connection,
    // which can lose the answer on its way), then close.
    req.resume();
    setTimeout(() => req.destroy(), 2000).unref();
  };
  if (declared > MAX_REQUEST_BYTES) return tooBig();
  const parts: Buffer[] = [];
  let bytes = 0, over = false;
  // The body counts against the client budget while it comes in.
  const holder = holderOf.get(req.socket) as HttpHolder;
  let counted = true;
  const received = () => {
    if (!counted) return;
    counted = false;
    holder.body -= bytes;
    if (holder.refuse === refuse) holder.refuse = null;
    recount(req.socket);
  };
  const refuse = (error: string, hint: string) => {
    over = true; parts.length = 0; received();
    res.setHeader('Connection', 'close');
    sendBody(res, 503, { 'Content-Type': 'application/json; charset=utf-8' }, JSON.stringify({ ok: false, error, hint, code: EXIT_FAILED }) + '\n', true);
    req.resume();
    setTimeout(() => req.destroy(), 2000).unref();
  };
  holder.refuse = refuse;
  req.on('close', received);
  req.on('data', (d: Buffer) => {
    if (over) return;
    bytes += d.length;
    holder.body += d.length;
    if (bytes > MAX_REQUEST_BYTES) { over = true; parts.length = 0; received(); return tooBig(); }
    parts.push(d);
    recount(req.socket);
  });
  req.on('end', () => {
    received();
    if (over || res.headersSent) return;
    const text = Buffer.concat(parts).toString('utf8');
    let body: unknown;
    try {
      if (text.length > 1 << 20 && containers(text) > text.length / 8) throw new Error('too many arrays and objects');
      if (nestedDeeper(text, MAX_NESTING)) return httpError(res, 400, EXIT_USAGE, `malformed request body: arrays and objects nested deeper than ${MAX_NESTING}`);
      body = JSON.parse(text || '{}');
    } catch {
      return httpError(res, 400, EXIT_USAGE, 'malformed request body: expected one JSON object');
    }
    if (!body || typeof body !== 'object' || Array.isArray(body)) return httpError(res, 400, EXIT_USAGE, 'malformed request body: expected one JSON object');
    for (const k of Object.keys(body)) {
      if (!fields.includes(k)) return httpError(res, 400, EXIT_USAGE, `unknown field ${quoteForError(k)} for ${name}`, `fields of ${name}: ${fields.join(', ')}`);
    }
    const request: Request = { ...(body as Record<string, unknown>), op: name };
    // Scripts named relative to the job's directory, as add_job takes them from a shell.
    // A bare name is looked up on the server's PATH first; an --on-worker command stays as
    // it is, for the worker to find.
    if (name === 'add_jobs' && typeof request.cwd === 'string' && path.isAbsolute(request.cwd) && Array.isArray(request.jobs) && request.onWorker !== true) {
      request.jobs = request.jobs.map((j: unknown) => (Array.isArray(j) && typeof j[0] === 'string' && j[0] && !path.isAbsolute(j[0]) ? [findScript(j[0], request.cwd as string, baseEnv.PATH), ...j.slice(1)] : j));
    }
    callOp(req, res, request);
  });
}

/** Writes to an event stream; one that has left too much unread is dropped. */
function sendEvent(res: http.ServerResponse, text: string): void {
  if (res.destroyed) return;
  if (res.writableLength > MAX_EVENT_BACKLOG) { res.destroy(); return; }
  if (!roomFor(res.req.socket as net.Socket | null, text.length)) return;
  res.write(text);
  recount(res.req.socket as net.Socket | null);
}

function startEvents(res: http.ServerResponse): void {
  res.writeHead(200, { ...SECURITY_HEADERS, 'Content-Type': 'text/event-stream; charset=utf-8', 'X-Accel-Buffering': 'no' });
  res.socket?.setTimeout(0);
  res.write('retry: 2000\n\n');
}

/** The dashboard's view: the status reply, the chart and rate, the journal's count. */
function dashboardView() {
  return { ...statusAnswer(), ...chartOf(metrics, st, Date.now()), seq: st.seq, now: iso(Date.now()) };
}

/** GET /api/events: server-sent events, `status` (dashboardView) now and after changes. */
function openEvents(res: http.ServerResponse): void {
  if (eventStreams.size >= cfg.maxConnections) return httpError(res, 503, EXIT_FAILED, `${eventStreams.size} event streams are open already`, 'close some dashboards, or raise DJS_MAX_CONNECTIONS');
  startEvents(res);
  eventStreams.add(res);
  res.on('close', () => eventStreams.delete(res));
  sendEvent(res, `event: status\ndata: ${JSON.stringify(dashboardView())}\n\n`);
}

/** Called after every flush that wrote events: the event streams get the new view, at
 *  most four times a second, built once for all of them. */
function dashboardChanged(): void {
  if (!eventStreams.size || eventsTimer) return;
  eventsTimer = setTimeout(() => {
    eventsTimer = null;
    const text = `event: status\ndata: ${JSON.stringify(dashboardView())}\n\n`;
    for (const res of eventStreams) sendEvent(res, text);
  }, 250);
}

/** GET /api/jobs/ID/log: the log from `offset` (or its last `tail` bytes) as text, with
 *  headers X-DJS-Log-Offset (where the text starts), X-DJS-Log-Next (where it ends) and
 *  X-DJS-Job-State; with follow=1, server-sent events instead: `log` ({offset, text})
 *  as the log grows, and `end` ({state, exitCode}) once the job has finished. */
function openJobLog(req: http.IncomingMessage, res: http.ServerResponse, id: number, offset: number | null, tail: number | null, follow: boolean): void {
  let ls: LogStream | null = null;
  const send: Reply = (m) => {
    const info = (m.info ?? (m.ok ? m : null)) as { path: string; state: string; exitCode: number | null } | null;
    if (!ls) {
      if (!info) return sendJson(res, httpStatusOf(m), m);
      let size = 0;
      try { size = fs.statSync(info.path).size; } catch { /* no log yet */ }
      const from = offset ?? (tail !== null ? Math.max(0, size - tail) : 0);
      if (!follow) return void sendLogText(res, info.path, from, info.state);
      ls = { id: Number(id), file: info.path, res, offset: from, reading: false, again: false, decoder: new StringDecoder('utf8'), end: null };
      startEvents(res);
      logStreams.add(ls);
      const me = ls;
      res.on('close', () => { logStreams.delete(me); if (!logStreams.size && logDirWatch) { logDirWatch.close(); logDirWatch = null; } });
      watchLogDir();
    }
    if (m.ok !== undefined) ls.end = { state: m.state, exitCode: m.exitCode };
    void pumpLog(ls);
  };
  serveRequest({ op: 'log', id, follow }, { send, sock: req.socket, busy: true, lastActive: Date.now() });
}

/** Reads one piece of a log and answers with it as text. */
async function sendLogText(res: http.ServerResponse, file: string, from: number, state: string): Promise<void> {
  let text = Buffer.alloc(0);
  try {
    const fh = await fs.promises.open(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
    try {
      const buf = Buffer.alloc(LOG_CHUNK);
      const { bytesRead } = await fh.read(buf, 0, LOG_CHUNK, from);
      text = buf.subarray(0, bytesRead);
    } finally { await fh.close().catch(() => {}); }
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT' && !res.destroyed) return httpError(res, 409, EXIT_FAILED, cannotReadLog(file, e)); // ENOENT: no log (yet)
  }
  if (res.destroyed) return;
  sendBody(res, 200, {
    'Content-Type': 'text/plain; charset=utf-8', 'X-DJS-Log-Offset': from, 'X-DJS-Log-Next': from + text.length, 'X-DJS-Job-State': state,
  }, text);
}

/** One watch of the log dir for every followed log. */
function watchLogDir(): void {
  if (logDirWatch) return;
  try {
    logDirWatch = fs.watch(cfg.logDir, (_ev, name) => {
      const m = /^(\d+)\.log$/.exec(String(name ?? ''));
      for (const ls of logStreams) if (!m || ls.id === Number(m[1])) void pumpLog(ls);
    });
    logDirWatch.on('error', () => { logDirWatch?.close(); logDirWatch = null; });
  } catch { /* without a watch, logs arrive when their job ends */ }
}

/** Errors of opening a log that mean not now (no file descriptor free): a followed log
 *  is read again shortly. ENOENT is no log (yet); any other error ends the request
 *  that reads it, with the error. */
const LOG_NOT_NOW = new Set(['EMFILE', 'ENFILE', 'EAGAIN']);
const cannotReadLog = (file: string, e: unknown) => `cannot read the log '${file}': ${(e as NodeJS.ErrnoException).code === 'ELOOP' ? 'it is a symbolic link' : (e as Error).message}`;

/** Sends what a followed log gained since the last time; once its job has ended, the
 *  rest and an `end` event. One read at a time per stream; a reader that does not keep
 *  up is paused on (backpressure), not buffered for. */
async function pumpLog(ls: LogStream): Promise<void> {
  if (ls.reading) { ls.again = true; return; }
  ls.reading = true;
  let failed: string | null = null, notNow = false;
  try {
    do {
      ls.again = false;
      let fh: fs.promises.FileHandle, blocked = false;
      try { fh = await fs.promises.open(ls.file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK); } catch (e) {
        const code = (e as NodeJS.ErrnoException).code ?? '';
        if (LOG_NOT_NOW.has(code)) notNow = true;
        else if (code !== 'ENOENT') failed = cannotReadLog(ls.file, e);
        break;
      }
      try {
        const buf = Buffer.alloc(64 << 10);
        for (;;) {
          const { bytesRead } = await fh.read(buf, 0, buf.length, ls.offset);
          if (bytesRead === 0 || ls.res.destroyed) break;
          const text = ls.decoder.write(buf.subarray(0, bytesRead));
          ls.offset += bytesRead;
          const event = `event: log\ndata: ${JSON.stringify({ offset: ls.offset, text })}\n\n`;
          if (!roomFor(ls.res.req.socket as net.Socket | null, event.length)) break;
          const more = ls.res.write(event);
          recount(ls.res.req.socket as net.Socket | null);
          if (!more) { blocked = true; break; }
        }
      } catch (e) {
        failed = cannotReadLog(ls.file, e);
      } finally { await fh.close().catch(() => {}); }
      // A reader that does not keep up holds no file open while it catches up.
      if (blocked && !ls.res.destroyed) {
        if (ls.res.writableNeedDrain) {
          await new Promise<void>((r) => {
            const done = () => { ls.res.off('drain', done); ls.res.off('close', done); r(); };
            ls.res.on('drain', done); ls.res.on('close', done);
          });
        }
        ls.again = true;
      }
    } while (ls.again && !failed && !ls.res.destroyed);
  } finally { ls.reading = false; }
  if (notNow && !ls.res.destroyed) { setTimeout(() => void pumpLog(ls), 250); return; } // no descriptor free: soon again
  if (failed) {
    // Its reader gets the error and the stream ends; the server goes on.
    logStreams.delete(ls);
    const job = st.jobs.get(ls.id);
    if (!ls.res.destroyed) ls.res.end(`event: end\ndata: ${JSON.stringify({ state: job?.state ?? null, exitCode: job?.exitCode ?? null, error: failed })}\n\n`);
    return;
  }
  if (ls.end && !ls.again && !ls.res.destroyed) {
    const rest = ls.decoder.end();
    if (rest) ls.res.write(`event: log\ndata: ${JSON.stringify({ offset: ls.offset, text: rest })}\n\n`);
    ls.res.end(`event: end\ndata: ${JSON.stringify(ls.end)}\n\n`);
  } else if (ls.again) void pumpLog(ls);
}


// The page: a shell with no data and no token in it (see the top of this section for
// how its script gets the token, and sends it).
// Everything a job or a worker says is put in the page as text, never as HTML.
const DASHBOARD_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>djs</title>
<link rel="icon" href="/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/app.css">
<script src="/app.js" defer></script>
</head>
<body>
<header>
  <a class="brand" href="#/"><img src="/favicon.svg" alt="" width="22" height="22"> djs</a>
  <span id="server"></span>
  <span id="queue-pause"></span>
  <span id="live" class="live off" title="live updates">connecting</span>
</header>
<main id="signin" hidden>
  <section class="panel"><h2>Access token needed</h2>
    <p id="signin-why">This page needs the dashboard's access token.</p>
    <p>Open the URL that <code>cli.ts dashboard</code> prints (it ends in <code>#token=...</code>).</p>
  </section>
</main>
<main id="main-view" hidden>
  <section id="summary" aria-label="jobs by state"></section>
  <section class="panel"><h2>Finished per minute</h2><div id="chart"></div></section>
  <section class="panel" id="tags-panel" hidden><h2>Tags</h2><div id="tags"><div id="tags-now"></div>
    <details id="tags-finished" hidden><summary id="tags-finished-count"></summary><div id="tags-done"></div></details></div></section>
  <section class="panel"><h2>Workers</h2><div id="workers"></div></section>
  <section class="panel"><h2>Jobs</h2>
    <form id="filters" role="search">
      <label>state <select name="state"><option value="">all</option><option>waiting</option><option>running</option><option>done</option><option>failed</option><option>killed</option></select></label>
      <label id="tag-filter" hidden>tag <select name="tag"><option value="">all</option></select></label>
      <label>worker <select name="worker"><option value="">all</option></select></label>
      <label class="grow">text <input name="text" type="search" placeholder="id, script, argument, reason"></label>
    </form>
    <div id="jobs"></div>
    <nav class="pager"><button id="newer" type="button">&larr; newer</button><span id="page-info"></span><button id="older" type="button">older &rarr;</button></nav>
  </section>
</main>
<main id="job-view" hidden>
  <p><a href="#/">&larr; all jobs</a></p>
  <section class="panel" id="job"></section>
  <section class="panel"><h2>Attempts</h2><div id="attempts"></div></section>
  <section class="panel"><h2>Log <span id="log-state"></span></h2><pre id="log" tabindex="0"></pre></section>
</main>
<dialog id="confirm"><form method="dialog"><p id="confirm-text"></p><menu><button value="no" type="submit">Cancel</button> <button value="yes" class="danger" id="confirm-yes" type="submit">OK</button></menu></form></dialog>
<div id="toast" role="status" hidden></div>
</body>
</html>
`;

const DASHBOARD_CSS = `
:root { --bg: #f6f7f9; --panel: #fff; --ink: #1d2330; --dim: #6b7385; --line: #dde1e8;
  --waiting: #8a93a6; --running: #1f7ae0; --done: #1a9b5b; --failed: #d43d3d; --killed: #c98a12;
  --up: #1a9b5b; --down: #d43d3d; --draining: #c98a12; }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; background: var(--bg); color: var(--ink); }
header { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; padding: 10px 16px; background: #1d2330; color: #fff; }
header .brand { color: #fff; font-weight: 700; font-size: 17px; text-decoration: none; display: flex; gap: 6px; align-items: center; }
#server { color: #b8c0d0; font-size: 12px; flex: 1; overflow-wrap: anywhere; }
.live { font-size: 12px; padding: 2px 8px; border-radius: 10px; background: #2e7d4f; }
.live.off { background: #7d2e2e; }
main { max-width: 1200px; margin: 0 auto; padding: 12px; }
.panel { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 12px; margin: 12px 0; overflow-x: auto; }
h2 { font-size: 15px; margin: 0 0 8px; }
#summary { display: grid; grid-template-columns: repeat(auto-fit, minmax(110px, 1fr)); gap: 8px; }
.count { text-decoration: none; color: inherit; background: var(--panel); border: 1px solid var(--line); border-left: 5px solid var(--c, var(--dim)); border-radius: 8px; padding: 8px 10px; }
.count b { display: block; font-size: 22px; font-variant-numeric: tabular-nums; }
.count span { color: var(--dim); }
.count.eta { --c: #1d2330; grid-column: span 2; }
.state { display: inline-block; min-width: 62px; padding: 1px 6px; border-radius: 4px; color: #fff; font-size: 12px; text-align: center; background: var(--dim); }
.s-waiting { background: var(--waiting); } .s-running { background: var(--running); } .s-done { background: var(--done); }
.s-failed { background: var(--failed); } .s-killed { background: var(--killed); }
.s-up { background: var(--up); } .s-down { background: var(--down); } .s-draining { background: var(--draining); } .s-checking { background: var(--killed); }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--dim); font-weight: 600; font-size: 12px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.cmd { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; overflow-wrap: anywhere; min-width: 200px; }
a { color: #1f5fbf; }
button { font: inherit; padding: 3px 10px; border-radius: 5px; border: 1px solid #b9c0cc; background: #fff; cursor: pointer; }
button:hover { background: #eef2f8; } button:disabled { opacity: .45; cursor: default; }
button.danger { border-color: var(--failed); color: var(--failed); }
.slots { display: inline-flex; gap: 2px; vertical-align: middle; flex-wrap: wrap; max-width: 260px; }
.slot { width: 12px; height: 14px; border-radius: 2px; background: #e3e7ee; border: 1px solid #cdd3dd; }
.slot.busy { background: var(--running); border-color: var(--running); }
.bar { position: relative; display: flex; height: 14px; min-width: 160px; border-radius: 4px; overflow: hidden; background: #e3e7ee; }
.bar i { display: block; height: 100%; }
.reason { color: var(--failed); font-size: 12px; }
.dim { color: var(--dim); }
.chip { display: inline-block; padding: 0 6px; margin: 1px 2px; border: 1px solid var(--line); border-radius: 9px; font-size: 11px; color: var(--dim); }
#chart svg { width: 100%; height: 120px; display: block; border-bottom: 1px solid #cdd3dd; }
#chart .b { fill: var(--done); }
#chart .axis { display: flex; justify-content: space-between; color: var(--dim); font-size: 11px; }
#filters { display: flex; flex-wrap: wrap; gap: 8px 14px; margin-bottom: 8px; }
#filters label { display: flex; gap: 6px; align-items: center; color: var(--dim); }
#filters .grow { flex: 1; min-width: 180px; } #filters input { flex: 1; }
select, input { font: inherit; padding: 3px 6px; border: 1px solid #b9c0cc; border-radius: 5px; background: #fff; }
.pager { display: flex; gap: 10px; align-items: center; justify-content: flex-end; margin-top: 8px; }
#log { background: #10141c; color: #dfe5ef; padding: 10px; border-radius: 6px; max-height: 60vh; overflow: auto; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 12px; margin: 0; min-height: 3em; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 4px 14px; margin: 0; }
dl.kv dt { color: var(--dim); } dl.kv dd { margin: 0; overflow-wrap: anywhere; }
.actions { display: flex; gap: 6px; flex-wrap: wrap; margin-top: 10px; }
td .actions { margin-top: 0; }
dialog { border: 1px solid var(--line); border-radius: 8px; max-width: 420px; }
dialog menu { display: flex; justify-content: flex-end; gap: 8px; padding: 0; }
#toast { position: fixed; bottom: 16px; left: 50%; transform: translateX(-50%); background: #1d2330; color: #fff; padding: 8px 14px; border-radius: 6px; max-width: 90vw; }
#toast.error { background: var(--failed); }
#tags-finished summary { cursor: pointer; color: var(--dim); margin-top: 6px; }
#tags td:first-child, #workers td:first-child { overflow-wrap: anywhere; } #tags td:first-child { min-width: 7em; }
#filters label { max-width: 100%; min-width: 0; } #filters select { min-width: 0; max-width: 100%; }
@media (max-width: 640px) {
  main { padding: 6px; } .panel { padding: 8px; }
  .hide-narrow { display: none; }
  .count.eta { grid-column: 1 / -1; }
  td.cmd { min-width: 140px; }
  .bar { min-width: 60px; }
  th, td { padding: 5px 4px; }
  /* A phone: each job is a card of two lines, its figures and buttons above its
     command, so nothing scrolls sideways and every button is on screen. */
  #job-table, #job-table tbody { display: block; }
  #job-table thead { display: none; }
  #job-table tr { display: grid; grid-template-columns: auto auto minmax(0, 1fr) auto auto auto; gap: 2px 8px; align-items: center; padding: 6px 0; border-bottom: 1px solid var(--line); }
  #job-table td { padding: 0; border: 0; min-width: 0; overflow-wrap: anywhere; }
  #job-table td:nth-child(4)::before { content: "exit "; color: var(--dim); }
  #job-table td.cmd { grid-column: 1 / -1; grid-row: 2; min-width: 0; }
}
`;

const FAVICON_SVG = `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="6" fill="#1f7ae0"/><rect x="6" y="7" width="20" height="4" rx="1" fill="#fff"/><rect x="6" y="14" width="14" height="4" rx="1" fill="#fff"/><rect x="6" y="21" width="8" height="4" rx="1" fill="#fff"/></svg>
`;

// The page's script: plain JavaScript with no template literals (this is one itself).
const DASHBOARD_JS = String.raw`'use strict';
// The token: from the URL's fragment (#token=T, never sent to a server), then kept in this
// tab's memory only, and never sent anywhere either. The page signs in by a challenge
// and response (hello): it sends a random nonce, the server must answer with an HMAC of
// it under the token, and only then does the page send anything derived from the token:
// the session key of every request (Authorization: DJS-Session S.KEY). A server that
// cannot prove it holds the token (another user's, on this port after a stop) gets the
// nonce and nothing else. The session (not the token) is kept in sessionStorage, so a
// reload goes on with it; it dies with the server that made it, and then a reloaded tab
// needs the URL again, while one that kept the token in memory signs in by itself.
var TOKEN = null, SESSION = null, HELLO = null;
function takeToken() {
  try { sessionStorage.removeItem('djs-token'); } catch (e) { /* what older versions kept */ }
  var m = /^#token=([0-9A-Za-z%]*)/.exec(location.hash);
  if (m) {
    TOKEN = decodeURIComponent(m[1]) || null; SESSION = null;
    try { sessionStorage.removeItem('djs-session'); } catch (e) { /* none */ }
    history.replaceState(null, '', location.pathname + '#/');
    return true;
  }
  if (!SESSION) try { SESSION = sessionStorage.getItem('djs-session'); } catch (e) { /* none */ }
  return false;
}
function headers(session) { return { Authorization: 'DJS-Session ' + session }; }
// SHA-256 and HMAC in plain JavaScript: crypto.subtle exists only in a secure context,
// which http://127.0.0.1:PORT and http://localhost:PORT are but a server reached over
// the network by plain http (--http 0.0.0.0:PORT, http://192.0.2.7:PORT) is not.
var SHA_K = [], SHA_H = [];
(function () {
  for (var n = 2; SHA_K.length < 64; n++) {
    var d = 2; while (d * d <= n && n % d) d++;
    if (d * d <= n) continue;
    if (SHA_H.length < 8) SHA_H.push((Math.pow(n, 1 / 2) % 1) * 4294967296 | 0);
    SHA_K.push((Math.pow(n, 1 / 3) % 1) * 4294967296 | 0);
  }
})();
function ror(x, n) { return x >>> n | x << (32 - n); }
/** The SHA-256 of a list of bytes, as a list of bytes. */
function sha256(msg) {
  var h = SHA_H.slice(), w = [], bits = msg.length * 8, hi = Math.floor(bits / 4294967296), m = msg.concat([0x80]), i;
  while (m.length % 64 !== 56) m.push(0);
  m.push(hi >>> 24 & 255, hi >>> 16 & 255, hi >>> 8 & 255, hi & 255, bits >>> 24 & 255, bits >>> 16 & 255, bits >>> 8 & 255, bits & 255);
  for (var o = 0; o < m.length; o += 64) {
    for (i = 0; i < 64; i++) {
      if (i < 16) { w[i] = m[o + 4 * i] << 24 | m[o + 4 * i + 1] << 16 | m[o + 4 * i + 2] << 8 | m[o + 4 * i + 3]; continue; }
      var a = w[i - 15], b = w[i - 2];
      w[i] = (ror(a, 7) ^ ror(a, 18) ^ a >>> 3) + w[i - 16] + (ror(b, 17) ^ ror(b, 19) ^ b >>> 10) + w[i - 7] | 0;
    }
    var A = h[0], B = h[1], C = h[2], D = h[3], E = h[4], F = h[5], G = h[6], H = h[7];
    for (i = 0; i < 64; i++) {
      var t1 = H + (ror(E, 6) ^ ror(E, 11) ^ ror(E, 25)) + (E & F ^ ~E & G) + SHA_K[i] + w[i] | 0;
      var t2 = (ror(A, 2) ^ ror(A, 13) ^ ror(A, 22)) + (A & B ^ A & C ^ B & C) | 0;
      H = G; G = F; F = E; E = D + t1 | 0; D = C; C = B; B = A; A = t1 + t2 | 0;
    }
    h = [h[0] + A | 0, h[1] + B | 0, h[2] + C | 0, h[3] + D | 0, h[4] + E | 0, h[5] + F | 0, h[6] + G | 0, h[7] + H | 0];
  }
  var out = [];
  h.forEach(function (x) { out.push(x >>> 24 & 255, x >>> 16 & 255, x >>> 8 & 255, x & 255); });
  return out;
}
function utf8(text) { return Array.prototype.slice.call(new TextEncoder().encode(text)); }
function hex(bytes) { return bytes.map(function (b) { return (b < 16 ? '0' : '') + b.toString(16); }).join(''); }
/** HMAC-SHA256 (RFC 2104) of text under key, both strings (UTF-8), in hex. */
function hmacHex(key, text) {
  var k = utf8(key);
  if (k.length > 64) k = sha256(k);
  while (k.length < 64) k.push(0);
  var inner = sha256(k.map(function (b) { return b ^ 0x36; }).concat(utf8(text)));
  return hex(sha256(k.map(function (b) { return b ^ 0x5c; }).concat(inner)));
}
function randomHex(n) { return hex(Array.prototype.slice.call(crypto.getRandomValues(new Uint8Array(n)))); }
/** The session to send: the one kept, or a new one from hello. One hello at a time. */
function session() {
  if (SESSION) return Promise.resolve(SESSION);
  if (!TOKEN) return Promise.reject(Unauthorized('no access token'));
  if (!HELLO) HELLO = hello().then(function (s) { HELLO = null; return s; }, function (e) { HELLO = null; throw e; });
  return HELLO;
}
/** The challenge and response: the server must prove that it holds the token (an HMAC
 *  over the page's fresh nonce, its own nonce and the host:port the page talks to, so
 *  that a proof relayed from a server on another port does not fit) before the page
 *  derives a session key from it. Anything else (no answer, a wrong proof, an error) is
 *  no proof, and the page sends nothing more. */
function hello() {
  var token = TOKEN, nonce = randomHex(32), host = location.host;
  return fetch('/api/hello?nonce=' + nonce + '&host=' + encodeURIComponent(host), { cache: 'no-store' }).then(function (r) {
    return r.json().catch(function () { return {}; });
  }).then(function (j) {
    j = j || {};
    var proof = /^[0-9a-f]{64}$/.test(j.session) ? hmacHex(token, 'djs-server-proof\n' + host + '\n' + nonce + '\n' + j.session) : null;
    if (!proof || j.proof !== proof) { unproven(); throw Unproven(); }
    if (token !== TOKEN) throw Unauthorized('the token changed while signing in');
    SESSION = j.session + '.' + hmacHex(token, 'djs-session\n' + host + '\n' + nonce + '\n' + j.session);
    try { sessionStorage.setItem('djs-session', SESSION); } catch (e) { /* kept in memory only */ }
    return SESSION;
  });
}
/** Forgets the session (the token, if the tab has it, makes a new one). */
function dropSession() {
  SESSION = null;
  try { sessionStorage.removeItem('djs-session'); } catch (e) { /* none */ }
}
/** The server refused the session or the token (or there is none): say how to get in, and stop. */
function signIn(why) {
  TOKEN = null; dropSession();
  clearTimeout(S.timers.proof);
  if (S.live) { S.live.close(); S.live = null; }
  if (S.logES) { S.logES.close(); S.logES = null; }
  if (why) $('signin-why').textContent = why;
  $('signin').hidden = false; $('main-view').hidden = true; $('job-view').hidden = true;
  $('live').className = 'live off'; $('live').textContent = 'no token';
}
/** The server here did not prove that it holds the token: show nothing, keep the token,
 *  and try again now and then (the real server may come back on this port). */
function unproven() {
  if (S.live) { S.live.close(); S.live = null; }
  if (S.logES) { S.logES.close(); S.logES = null; }
  $('signin-why').textContent = 'The server at ' + location.host + ' did not prove that it holds this page\'s access token, so the page sent it nothing. Either the token is wrong or was replaced (cli.ts dashboard --new-token): open the URL that cli.ts dashboard prints; or what listens there is not your djs server (it stopped, and something else took its port). Trying again every 5 s.';
  $('signin').hidden = false; $('main-view').hidden = true; $('job-view').hidden = true;
  $('live').className = 'live off'; $('live').textContent = 'not verified';
  retryHello();
}
function retryHello() {
  clearTimeout(S.timers.proof);
  S.timers.proof = setTimeout(function () {
    if (TOKEN) session().then(function () { route(); }, function (e) { if (!e.unproven) retryHello(); });
  }, 5000);
}
function Unproven() { var e = new Error('the server did not prove that it holds the token'); e.unauthorized = true; e.unproven = true; return e; }
function Unauthorized(msg) { var e = new Error(msg); e.unauthorized = true; return e; }
/** A request failed: say why (a refused token has said so already). */
function failed(e) { if (!e.unauthorized) toast(e.message, true); }
var STATES = ['waiting', 'running', 'done', 'failed', 'killed'];
var S = { status: null, seq: -1, before: null, cursors: [], page: null, jobId: null, job: null, live: null, logES: null, logOffset: 0, busy: {}, timers: {} };
function $(id) { return document.getElementById(id); }
function el(tag, attrs) {
  var e = document.createElement(tag);
  for (var k in attrs || {}) {
    var v = attrs[k];
    if (v === null || v === undefined || v === false) continue;
    if (k === 'text') e.textContent = v; else if (k === 'style') e.style.cssText = v; else if (k.slice(0, 2) === 'on') e.addEventListener(k.slice(2), v); else e.setAttribute(k, v === true ? '' : v);
  }
  for (var i = 2; i < arguments.length; i++) { var c = arguments[i]; if (c === null || c === undefined) continue; e.append(c); }
  return e;
}
function svg(tag, attrs) { var e = document.createElementNS('http://www.w3.org/2000/svg', tag); for (var k in attrs) e.setAttribute(k, attrs[k]); return e; }
function fill(node) { node.replaceChildren.apply(node, Array.prototype.slice.call(arguments, 1).filter(function (c) { return c !== null && c !== undefined; })); }
/** Shows table in box, keeping the rows of the table there (known by data-id, data-host
 *  or data-tag) and, in them, every cell that has not changed: a live update never
 *  replaces the link or button under the pointer, so no click is lost to it. */
function putTable(box, table) {
  var cur = box.children.length === 1 ? box.firstElementChild : null;
  var same = cur && cur.tagName === 'TABLE' && cur.id === table.id && (cur.tHead ? cur.tHead.isEqualNode(table.tHead) : !table.tHead);
  if (!same) return fill(box, table);
  var body = cur.tBodies[0], rows = Array.prototype.slice.call(table.tBodies[0].children), old = {};
  var key = function (tr) { return tr.getAttribute('data-id') || tr.getAttribute('data-host') || tr.getAttribute('data-tag'); };
  Array.prototype.forEach.call(body.children, function (tr) { old[key(tr)] = tr; });
  rows.forEach(function (tr, i) {
    var want = old[key(tr)] ? keepRow(old[key(tr)], tr) : tr;
    if (body.children[i] !== want) body.insertBefore(want, body.children[i] || null);
  });
  while (body.children.length > rows.length) body.lastElementChild.remove();
}
/** Row was, made to show what tr shows: its attributes, and the cells that differ. */
function keepRow(was, tr) {
  if (was.cells.length !== tr.cells.length) return tr;
  Array.prototype.slice.call(was.attributes).forEach(function (a) { if (!tr.hasAttribute(a.name)) was.removeAttribute(a.name); });
  Array.prototype.forEach.call(tr.attributes, function (a) { if (was.getAttribute(a.name) !== a.value) was.setAttribute(a.name, a.value); });
  var olds = Array.prototype.slice.call(was.cells), news = Array.prototype.slice.call(tr.cells);
  news.forEach(function (td, i) { if (!olds[i].isEqualNode(td)) was.replaceChild(td, olds[i]); });
  return was;
}
function duration(ms) {
  if (ms === null || ms === undefined) return '-';
  if (ms < 10000) return (Math.max(0, ms) / 1000).toFixed(1) + 's';
  var s = Math.round(ms / 1000);
  if (s < 60) return s + 's';
  if (s < 3600) return Math.floor(s / 60) + 'm' + String(s % 60).padStart(2, '0') + 's';
  return Math.floor(s / 3600) + 'h' + String(Math.floor((s % 3600) / 60)).padStart(2, '0') + 'm';
}
function when(iso) { if (!iso) return '-'; var d = new Date(iso); return d.toDateString() === new Date().toDateString() ? d.toTimeString().slice(0, 8) : d.toISOString().slice(5, 16).replace('T', ' '); }
function quote(w) { return /^[A-Za-z0-9_.\/:=@%+,-]+$/.test(w) ? w : "'" + w.replace(/'/g, "'\\''") + "'"; }
function command(j) { return (j.name ? '[' + j.name + '] ' : '') + (j.onWorker ? '--on-worker ' : '') + [j.script].concat(j.args).map(quote).join(' '); }
function stateBadge(s) { return el('span', { class: 'state s-' + s, text: s }); }
function toast(msg, error) {
  var t = $('toast'); t.textContent = msg; t.className = error ? 'error' : ''; t.hidden = false;
  clearTimeout(S.timers.toast); S.timers.toast = setTimeout(function () { t.hidden = true; }, error ? 6000 : 2500);
}
/** A request with the session; a refused session is made anew once, if the tab has the
 *  token (the server restarted), else the page shows how to sign in. */
function api(method, path, body, again) {
  return session().then(function (sess) {
    var opts = { method: method, headers: headers(sess), cache: 'no-store' };
    if (method === 'POST') { opts.headers['Content-Type'] = 'application/json'; opts.body = JSON.stringify(body || {}); }
    return fetch(path, opts).then(function (r) { return answer(r, sess); });
  }).then(function (j) {
    return j === AGAIN ? (again ? Promise.reject(Unauthorized('refused again')) : api(method, path, body, true)) : j;
  });
}
/** A reply as JSON; AGAIN if the server refused the session and the tab can make a new one. */
var AGAIN = {};
function answer(r, sess) {
  return r.json().then(function (j) {
    if (r.status === 401) {
      if (SESSION === sess) dropSession();
      if (TOKEN) return AGAIN;
      signIn('The server refused this page\'s session (' + j.error + ').'); throw Unauthorized(j.error);
    }
    if (!j.ok) throw new Error(j.error + (j.hint ? ' (' + j.hint + ')' : ''));
    return j;
  });
}
/** Server-sent events read with fetch, so that the request carries the session in a header
 *  (EventSource cannot send one): on[EVENT](data) for each event; onend(error) once the
 *  stream ends or fails, unless close() ended it. A refused session shows the sign-in,
 *  unless the tab has the token to make a new one (on the next try). */
function events(path, on, onend) {
  var ctl = new AbortController(), closed = false;
  function finish(e) { if (closed) return; closed = true; ctl.abort(); if (e && e.unauthorized) return; if (onend) onend(e); }
  session().then(function (sess) {
    if (closed) return null;
    return fetch(path, { headers: headers(sess), cache: 'no-store', signal: ctl.signal }).then(function (r) { return r.status === 401 ? answer(r, sess) : r; });
  }).then(function (r) {
    if (closed || !r) return;
    if (r === AGAIN) throw new Error('the session ended');
    if (!r.ok || !r.body) throw new Error('HTTP ' + r.status);
    var reader = r.body.getReader(), dec = new TextDecoder(), buf = '';
    function pump() {
      return reader.read().then(function (x) {
        if (closed) return;
        if (x.done) return finish(null);
        buf += dec.decode(x.value, { stream: true });
        var i;
        while (!closed && (i = buf.indexOf('\n\n')) >= 0) {
          var block = buf.slice(0, i), name = 'message', data = [];
          buf = buf.slice(i + 2);
          block.split('\n').forEach(function (line) {
            if (line.slice(0, 6) === 'event:') name = line.slice(6).trim();
            else if (line.slice(0, 5) === 'data:') data.push(line.slice(5).replace(/^ /, ''));
          });
          if (data.length && on[name]) on[name](data.join('\n'));
        }
        return pump();
      });
    }
    return pump();
  }).catch(function (e) { finish(e); });
  return { close: function () { closed = true; ctl.abort(); } };
}
/** Asks before an action that stops work; resolves to true if the user agreed. */
function confirmed(text, yes) {
  var d = $('confirm');
  $('confirm-text').textContent = text; $('confirm-yes').textContent = yes || 'OK';
  return new Promise(function (resolve) {
    d.addEventListener('close', function once() { d.removeEventListener('close', once); resolve(d.returnValue === 'yes'); });
    d.returnValue = ''; d.showModal();
  });
}
function act(op, body, done, ask, yes) {
  (ask ? confirmed(ask, yes) : Promise.resolve(true)).then(function (ok) {
    if (!ok) return;
    api('POST', '/api/' + op, body).then(function (r) { toast(done(r)); refreshSoon(0); }, failed);
  });
}
function killJob(id) { act('kill', { ids: [id] }, function () { return 'killing job ' + id; }, 'Kill job ' + id + '? If it runs, it gets SIGTERM, then SIGKILL after the grace period.', 'Kill'); }
function retryJob(id) { act('retry', { ids: [id] }, function () { return 'job ' + id + ' queued again'; }, 'Run job ' + id + ' again? It goes back to the queue and starts anew.', 'Retry'); }
function jobButtons(j) {
  var b = [];
  if (j.state === 'waiting' || j.state === 'running') b.push(el('button', { type: 'button', class: 'danger', 'data-action': 'kill', onclick: function () { killJob(j.id); }, text: 'kill' }));
  else b.push(el('button', { type: 'button', 'data-action': 'retry', onclick: function () { retryJob(j.id); }, text: 'retry' }));
  return b;
}

// ---- the main view
function renderStatus() {
  var s = S.status; if (!s) return;
  fill($('server'), 'pid ' + s.server.pid + ' \u00b7 ' + s.server.dataDir);
  var c = s.counts, boxes = STATES.map(function (k) {
    return el('a', { class: 'count', href: '#/?state=' + k, style: '--c: var(--' + k + ')', 'data-state': k }, el('b', { text: String(c[k]) }), el('span', { text: k }));
  });
  boxes.push(el('div', { class: 'count', 'data-state': 'total' }, el('b', { text: String(c.total) }), el('span', { text: 'in all' })));
  var eta = s.rate > 0 ? (s.rate * 60).toFixed(1) + ' jobs/min' + (s.leftMs !== null && c.waiting + c.running > 0 ? ', about ' + duration(s.leftMs) + ' left' : '') : (c.waiting + c.running > 0 ? 'no job finished lately' : 'nothing left to run');
  boxes.push(el('div', { class: 'count eta', id: 'eta' }, el('b', { text: eta }), el('span', { text: 'rate over the last 5 minutes' })));
  fill.apply(null, [$('summary')].concat(boxes));
  if (typeof s.paused === 'boolean') {
    fill($('queue-pause'), el('button', { type: 'button', id: 'pause-queue', onclick: function () {
      act(s.paused ? 'resume' : 'pause', {}, function () { return s.paused ? 'queue resumed' : 'queue paused'; });
    }, text: s.paused ? 'resume queue' : 'pause queue' }), s.paused ? el('span', { class: 'chip', text: 'paused' }) : null);
  } else fill($('queue-pause'));
  renderChart(s); renderTags(s); renderWorkers(s);
}
function renderChart(s) {
  var m = s.perMinute || [], n = m.length, first = n;
  for (var i = 0; i < n; i++) if (m[i]) { first = i; break; }
  var span = Math.min(n, Math.max(60, Math.ceil((n - first) / 30) * 30)), data = m.slice(n - span), max = Math.max.apply(null, data.concat([1]));
  var W = 720, H = 120, bw = W / span, g = svg('svg', { viewBox: '0 0 ' + W + ' ' + H, preserveAspectRatio: 'none', role: 'img', 'aria-label': 'jobs finished per minute' });
  data.forEach(function (v, i) {
    if (!v) return;
    var h = (H - 4) * v / max, r = svg('rect', { class: 'b', x: (i * bw).toFixed(2), y: (H - h).toFixed(2), width: Math.max(1, bw - 0.5).toFixed(2), height: h.toFixed(2) });
    var t = svg('title', {}); t.textContent = v + ' at ' + new Date(Date.parse(s.lastMinute) - (span - 1 - i) * 60000).toTimeString().slice(0, 5); r.append(t); g.append(r);
  });
  fill($('chart'), el('div', { class: 'axis' }, el('span', { text: 'max ' + max + ' per minute' })), g,
    el('div', { class: 'axis' }, el('span', { text: (span >= 120 ? span / 60 + ' h' : span + ' min') + ' ago' }), el('span', { text: 'now' })));
}
/** The tags: those with jobs still to run first, the finished ones (nothing waiting or
 *  running) folded under a toggle, so that a long campaign's past does not push the
 *  workers and jobs down the page. */
function renderTags(s) {
  var tags = Array.isArray(s.tags) ? s.tags : [];
  $('tags-panel').hidden = !tags.length; $('tag-filter').hidden = !tags.length;
  syncOptions(document.querySelector('#filters [name=tag]'), tags.map(function (t) { return t.tag; }));
  if (!tags.length) return;
  var active = tags.filter(function (t) { return (t.waiting || 0) + (t.running || 0) > 0; });
  var finished = tags.filter(function (t) { return (t.waiting || 0) + (t.running || 0) === 0; });
  if (active.length) tagTable($('tags-now'), active, 'tags-active'); else fill($('tags-now'), el('p', { class: 'dim', text: 'No tag has jobs waiting or running.' }));
  $('tags-finished').hidden = !finished.length;
  fill($('tags-finished-count'), finished.length + ' finished tag' + (finished.length === 1 ? '' : 's'));
  if (finished.length) tagTable($('tags-done'), finished, 'tags-ended');
}
function tagTable(box, tags, id) {
  putTable(box, el('table', { id: id }, el('tbody', {}, ...tags.map(function (t) {
    var total = t.total || STATES.reduce(function (a, k) { return a + (t[k] || 0); }, 0), bar = el('div', { class: 'bar', title: STATES.map(function (k) { return (t[k] || 0) + ' ' + k; }).join(', ') });
    ['done', 'failed', 'killed', 'running'].forEach(function (k) { if (t[k]) bar.append(el('i', { style: 'width:' + (100 * t[k] / Math.max(1, total)) + '%; background: var(--' + k + ')' })); });
    var ended = (t.done || 0) + (t.failed || 0) + (t.killed || 0), btn = null;
    if (typeof t.paused === 'boolean') btn = el('button', { type: 'button', 'data-tag': t.tag, onclick: function () {
      act(t.paused ? 'resume' : 'pause', { tag: t.tag }, function () { return 'tag ' + t.tag + (t.paused ? ' resumed' : ' paused'); });
    }, text: t.paused ? 'resume' : 'pause' });
    return el('tr', { 'data-tag': t.tag }, el('td', {}, el('a', { href: '#/?tag=' + encodeURIComponent(t.tag), text: t.tag }), t.paused ? el('span', { class: 'chip', text: 'paused' }) : null),
      el('td', { style: 'width:50%' }, bar), el('td', { class: 'num', text: ended + '/' + total }), el('td', {}, btn));
  }))));
}
function syncOptions(select, values) {
  var have = Array.prototype.slice.call(select.options, 1).map(function (o) { return o.value; });
  if (have.join('\n') === values.join('\n')) return;
  var cur = select.value;
  fill.apply(null, [select, el('option', { value: '', text: 'all' })].concat(values.map(function (v) { return el('option', { value: v, text: v }); })));
  select.value = values.indexOf(cur) >= 0 ? cur : '';
}
function renderWorkers(s) {
  syncOptions(document.querySelector('#filters [name=worker]'), s.workers.map(function (w) { return w.host; }));
  if (!s.workers.length) return fill($('workers'), el('p', { class: 'dim', text: 'No workers yet: add some with cli.ts add_slave HOST[:SLOTS].' }));
  var rows = s.workers.map(function (w) {
    var busy = {}; w.running.forEach(function (r) { busy[r.slot] = r.id; });
    var n = Math.max(w.slots, w.running.length ? Math.max.apply(null, w.running.map(function (r) { return r.slot + 1; })) : 0), bar;
    if (n <= 48) { bar = el('span', { class: 'slots' }); for (var i = 0; i < n; i++) bar.append(el('span', { class: 'slot' + (busy[i] ? ' busy' : ''), title: busy[i] ? 'slot ' + i + ': job ' + busy[i] : 'slot ' + i + ' free' })); }
    else bar = el('div', { class: 'bar' }, el('i', { style: 'width:' + (100 * w.running.length / n) + '%; background: var(--running)' }));
    var state = w.checking ? 'checking' : w.state, why = null;
    if (w.state === 'down') why = el('div', { class: 'reason', text: (w.error || 'unreachable') + (w.nextProbeAt ? '; next check in ' + duration(Date.parse(w.nextProbeAt) - Date.now()) : '') });
    var extra = [];
    var gpus = Array.isArray(w.gpus) ? w.gpus.length : w.gpus || 0, gpusUsed = Array.isArray(w.gpusUsed) ? w.gpusUsed.length : w.gpusUsed || 0;
    if (gpus) extra.push(el('span', { class: 'chip', title: 'GPUs in use', text: 'GPU ' + gpusUsed + '/' + gpus }));
    (Array.isArray(w.labels) ? w.labels : []).forEach(function (l) { extra.push(el('span', { class: 'chip', text: l })); });
    var jobs = el('span', {}); w.running.forEach(function (r) { jobs.append(el('a', { href: '#/job/' + r.id, text: String(r.id) }), ' '); });
    // A button outlives renders that leave it as it was (putTable): it reads the worker
    // as the last status shows it when clicked.
    var buttons = el('span', { class: 'actions' }), now = function () { return S.status.workers.find(function (x) { return x.host === w.host; }) || w; };
    if (w.state !== 'draining') buttons.append(el('button', { type: 'button', 'data-action': 'drain', onclick: function () {
      var n = now().running.length;
      act('remove_workers', { hosts: [w.host], mode: 'wait' }, function () { return 'draining ' + w.host; }, 'Drain ' + w.host + '? It starts no new job and goes once its ' + n + ' running job(s) end.', 'Drain');
    }, text: 'drain' }));
    buttons.append(el('button', { type: 'button', class: 'danger', 'data-action': 'remove', onclick: function () {
      var n = now().running.length;
      act('remove_workers', n ? { hosts: [w.host], mode: 'kill' } : { hosts: [w.host] }, function () { return 'removed ' + w.host; },
        n ? 'Remove ' + w.host + ' now? Its ' + n + ' running job(s) are killed and queued again.' : 'Remove ' + w.host + '?', 'Remove');
    }, text: 'remove' }));
    return el('tr', { 'data-host': w.host }, el('td', { text: w.host }), el('td', {}, bar, el('span', { class: 'dim', text: ' ' + w.running.length + '/' + w.slots })),
      el('td', {}, stateBadge(state), why), el('td', { class: 'hide-narrow' }, ...extra), el('td', { class: 'hide-narrow' }, jobs), el('td', {}, buttons));
  });
  putTable($('workers'), el('table', {}, el('thead', {}, el('tr', {}, ...['host', 'slots', 'state', '', 'running', ''].map(function (h, i) { return el('th', { class: i === 3 || i === 4 ? 'hide-narrow' : null, text: h }); }))), el('tbody', {}, ...rows)));
}
function filters() {
  var f = new FormData($('filters')), q = new URLSearchParams();
  ['state', 'tag', 'worker', 'text'].forEach(function (k) { var v = f.get(k); if (v) q.set(k, v); });
  return q;
}
/** One page of 50: a filter that matches little comes in parts (the server scans a
 *  bounded number of ids per request), fetched one after another until the page is full. */
function fetchPage(q, before, rows, parts) {
  q.set('limit', String(50 - rows.length)); if (before) q.set('before', before);
  return api('GET', '/api/jobs?' + q).then(function (p) {
    rows = rows.concat(p.rows);
    if (rows.length < 50 && p.next !== null && parts < 40) return fetchPage(q, p.next, rows, parts + 1);
    return { rows: rows, next: p.next, total: p.total };
  });
}
function refreshJobs() {
  var q = filters(), key = q.toString() + '/' + S.before; S.jobsKey = key;
  return fetchPage(q, S.before, [], 1).then(function (page) { if (S.jobsKey === key) { S.page = page; renderJobs(); } }, failed);
}
function renderJobs() {
  var p = S.page; if (!p) return;
  $('newer').disabled = !S.cursors.length; $('older').disabled = p.next === null;
  fill($('page-info'), p.rows.length ? 'ids ' + p.rows[0].id + '\u2013' + p.rows[p.rows.length - 1].id + (p.total !== null ? ' of ' + p.total : '') : (p.next !== null ? 'none here; look further' : 'no jobs'));
  var head = ['id', 'state', 'worker', 'exit', 'tries', 'queued', 'runtime', 'command', ''];
  putTable($('jobs'), el('table', { id: 'job-table' }, el('thead', {}, el('tr', {}, ...head.map(function (h, i) { return el('th', { class: i === 4 || i === 5 ? 'hide-narrow' : null, text: h }); }))),
    el('tbody', {}, ...p.rows.map(function (j) {
      var exit = j.exitCode === null ? (j.reason && j.state !== 'waiting' ? j.reason.split(' ')[0] : '-') : String(j.exitCode);
      return el('tr', { 'data-id': j.id, 'data-state': j.state, 'data-attempts': j.attempts }, el('td', { class: 'num' }, el('a', { href: '#/job/' + j.id, text: String(j.id) })), el('td', {}, stateBadge(j.state)),
        el('td', { text: j.worker || '-' }), el('td', { class: 'num', text: exit, title: j.reason || null }), el('td', { class: 'num hide-narrow', text: String(j.attempts) }),
        el('td', { class: 'hide-narrow', text: when(j.queuedAt) }), el('td', { class: 'num', text: duration(j.runtimeMs) }),
        el('td', { class: 'cmd' }, command(j), ...(Array.isArray(j.tags) ? j.tags.map(function (t) { return el('span', { class: 'chip', text: t }); }) : [])), el('td', {}, ...jobButtons(j)));
    }))));
}

// ---- the job view
function renderJob() {
  var j = S.job; if (!j) return;
  var kv = el('dl', { class: 'kv' });
  function row(k, v) { kv.append(el('dt', { text: k }), el('dd', {}, v)); }
  row('state', stateBadge(j.state)); row('command', el('code', { text: command(j) })); row('directory', j.cwd);
  row('worker', j.worker ? j.worker + ' slot ' + j.slot : '-'); row('exit code', j.exitCode === null ? '-' : String(j.exitCode));
  if (j.reason) row('reason', j.reason);
  row('attempts', j.attempts + ' (retries ' + j.retries + ')'); if (j.timeout) row('timeout', j.timeout + 's');
  if (Array.isArray(j.tags) && j.tags.length) row('tags', j.tags.join(', '));
  row('queued', when(j.queuedAt)); row('started', when(j.startedAt)); row('ended', when(j.endedAt)); row('runtime', duration(j.runtimeMs));
  fill($('job'), el('h2', { text: 'Job ' + j.id }), kv, el('div', { class: 'actions' }, ...jobButtons(j)));
  var hist = j.history.slice();
  if (j.state === 'running') hist.push({ attempt: j.attempts, worker: j.worker, slot: j.slot, exitCode: null, reason: 'running', startedAt: j.startedAt, endedAt: null });
  fill($('attempts'), hist.length ? el('table', {}, el('thead', {}, el('tr', {}, ...['#', 'worker', 'exit', 'reason', 'started', 'ended'].map(function (h) { return el('th', { text: h }); }))),
    el('tbody', {}, ...hist.map(function (a) {
      return el('tr', {}, el('td', { class: 'num', text: String(a.attempt) }), el('td', { text: a.worker + ' slot ' + a.slot }), el('td', { class: 'num', text: a.exitCode === null ? '-' : String(a.exitCode) }),
        el('td', { text: a.reason || '' }), el('td', { text: when(a.startedAt) }), el('td', { text: when(a.endedAt) }));
    }))) : el('p', { class: 'dim', text: 'not started yet' }));
  fill($('log-state'), j.state === 'running' ? el('span', { class: 'chip', id: 'following', text: 'following' }) : null);
}
function refreshJob() {
  var id = S.jobId;
  return api('GET', '/api/jobs/' + id).then(function (r) {
    if (S.jobId !== id) return;
    var was = S.job && S.job.state; S.job = r.job; renderJob();
    if (r.job.state === 'running' && was !== 'running' && !S.logES) followLog(); // started (again): follow its new output
  }, failed);
}
function followLog(reset) {
  if (S.logES) { S.logES.close(); S.logES = null; }
  var id = S.jobId, url = '/api/jobs/' + id + '/log?follow=1&' + (reset || !S.logOffset ? 'tail=262144' : 'offset=' + S.logOffset);
  if (reset) { $('log').textContent = ''; S.logOffset = 0; }
  var es = events(url, {
    log: function (data) {
      var m = JSON.parse(data), pre = $('log'), atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.append(m.text); S.logOffset = m.offset;
      if (pre.textContent.length > 2000000) pre.textContent = pre.textContent.slice(-1000000);
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    },
    end: function () { es.close(); if (S.logES === es) S.logES = null; refreshJob(); },
  }, function () { if (S.logES === es) { S.logES = null; setTimeout(function () { if (S.jobId === id && !S.logES && (TOKEN || SESSION)) followLog(); }, 2000); } });
  S.logES = es;
}

// ---- live updates and navigation
function refreshSoon(ms) {
  clearTimeout(S.timers.refresh);
  S.timers.refresh = setTimeout(function () { if (S.jobId) refreshJob(); else refreshJobs(); }, ms);
}
function connect() {
  if (S.live) S.live.close();
  var es = S.live = events('/api/events', {
    status: function (data) {
      var s = JSON.parse(data); S.status = s;
      $('live').className = 'live'; $('live').textContent = 'live';
      if (!S.jobId) renderStatus();
      if (s.seq !== S.seq) { S.seq = s.seq; refreshSoon(150); }
    },
  }, function () {
    if (S.live !== es) return;
    $('live').className = 'live off'; $('live').textContent = 'reconnecting';
    S.live = null;
    // The server went away: whatever answers next proves itself before it gets a key.
    if (TOKEN) dropSession();
    setTimeout(function () { if (!S.live && (TOKEN || SESSION)) connect(); }, 2000);
  });
}
function route() {
  var fresh = takeToken();
  if (S.logES) { S.logES.close(); S.logES = null; }
  if (!TOKEN && !SESSION) return signIn();
  clearTimeout(S.timers.proof);
  $('signin').hidden = true;
  if (fresh || !S.live) connect();
  var h = location.hash.replace(/^#\/?/, ''), m = /^job\/(\d+)/.exec(h);
  if (m) {
    S.jobId = Number(m[1]); S.job = null; S.logOffset = 0;
    $('main-view').hidden = true; $('job-view').hidden = false;
    fill($('job'), el('p', { class: 'dim', text: 'loading job ' + S.jobId + '\u2026' })); fill($('attempts')); $('log').textContent = '';
    refreshJob().then(function () { if (S.job && !S.logES) followLog(true); });
    return;
  }
  S.jobId = null; $('job-view').hidden = true; $('main-view').hidden = false;
  var q = new URLSearchParams(h.replace(/^[^?]*\??/, '')), form = $('filters');
  ['state', 'tag', 'worker', 'text'].forEach(function (k) { if (q.has(k)) { var f = form.elements[k]; if (f.tagName === 'SELECT' && !Array.prototype.some.call(f.options, function (o) { return o.value === q.get(k); })) f.append(el('option', { value: q.get(k), text: q.get(k) })); f.value = q.get(k); } });
  S.before = null; S.cursors = [];
  renderStatus(); refreshJobs();
}
function filtersChanged() {
  var q = filters(); S.before = null; S.cursors = [];
  history.replaceState(null, '', '#/' + (q.toString() ? '?' + q : '')); refreshJobs();
}
$('filters').addEventListener('change', filtersChanged);
$('filters').addEventListener('input', function (e) { if (e.target.name === 'text') { clearTimeout(S.timers.text); S.timers.text = setTimeout(filtersChanged, 300); } });
$('filters').addEventListener('submit', function (e) { e.preventDefault(); });
$('older').addEventListener('click', function () { if (!S.page || S.page.next === null) return; S.cursors.push(S.before); S.before = S.page.next; refreshJobs(); });
$('newer').addEventListener('click', function () { if (!S.cursors.length) return; S.before = S.cursors.pop(); refreshJobs(); });
window.addEventListener('hashchange', route);
route();
`;

const ASSETS: Record<string, { type: string; body: string }> = {
  '/': { type: 'text/html; charset=utf-8', body: DASHBOARD_HTML },
  '/app.css': { type: 'text/css; charset=utf-8', body: DASHBOARD_CSS },
  '/app.js': { type: 'text/javascript; charset=utf-8', body: DASHBOARD_JS },
  '/favicon.svg': { type: 'image/svg+xml', body: FAVICON_SVG },
};

// ---- server life -------------------------------------------------------------

/** The pid of the live server that owns a data dir (by its pid file, checked against
 *  the process's start time so a reused pid does not count), or null. */
function liveServerPid(dataDir: string): number | null {
  let text: string | null;
  try { text = readSmallFile(path.join(dataDir, 'server.pid'), 64, 'the pid file', ''); } catch { return null; }
  if (text === null) return null;
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

/** What the lock (holdDirLock) gives anyone who connects: a line of at most this many
 *  bytes (a challenge is 32), this long in all, and this many connections at once. */
const LOCK_LINE_BYTES = 64, LOCK_DEADLINE_MS = 2000, LOCK_CONNECTIONS = 8;

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
    const text = readSmallFile(tokenFile, 256, 'the lock file', 'remove it (no server runs on this data dir while it is not a plain file), then start again');
    if (text === null) throw failure(`the lock file '${tokenFile}' went away while this server started`, 'start again');
    const token = text.trim();
    const dir = fs.statSync(dataDir);
    const name = `\0djs-${crypto.createHash('sha256').update(`${token}-${dir.dev}-${dir.ino}`).digest('hex')}-`.padEnd(108, 'x');
    const answer = (nonce: string) => crypto.createHmac('sha256', token).update(nonce).digest('hex');
    // Anyone can connect: each connection may send one challenge line of LOCK_LINE_BYTES
    // and has LOCK_DEADLINE_MS in all (however it trickles); LOCK_CONNECTIONS at once.
    const lock = net.createServer((c) => {
      c.on('error', () => {});
      const deadline = setTimeout(() => c.destroy(), LOCK_DEADLINE_MS);
      c.on('close', () => clearTimeout(deadline));
      let got = '';
      c.setEncoding('utf8');
      c.on('data', (d: string) => {
        got += d;
        const nl = got.indexOf('\n');
        if (nl >= 0 && nl <= LOCK_LINE_BYTES) { c.removeAllListeners('data'); c.end(answer(got.slice(0, nl)) + '\n'); }
        else if (got.length > LOCK_LINE_BYTES) c.destroy();
      });
    });
    lock.maxConnections = LOCK_CONNECTIONS;
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
    // No answer, but the pid file names a live server: the lock is busy (every
    // connection it keeps taken, by another user, say), not squatted; its token stays.
    const pid = liveServerPid(dataDir);
    if (reply === answer(nonce) || pid !== null) {
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
  const uid = process.getuid?.();
  if (uid !== undefined) checkPathTo(dir, what, uid, true); // before anything is made there
  try { makeDirs(dir); } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw failure(`cannot create the ${what} '${dir}': ${(e as Error).message}`);
  }
  checkOwnDir(dir, what);
}

/** mkdir -p, mode 0700. Not fs.mkdirSync's `recursive`, which loops forever where the
 *  kernel answers ENOENT for a parent that exists (/proc/nope). */
function makeDirs(dir: string): void {
  try { fs.mkdirSync(dir, { mode: 0o700 }); } catch (e) {
    const parent = path.dirname(dir);
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT' || parent === dir) throw e;
    try { makeDirs(parent); } catch (e2) { if ((e2 as NodeJS.ErrnoException).code !== 'EEXIST') throw e2; }
    fs.mkdirSync(dir, { mode: 0o700 });
  }
}

/** The name of a data dir among all servers of this user: random, made by its first
 *  start and kept in DATA_DIR/instance, so it stays across restarts and differs between
 *  data dirs (whose job ids all start at 1). Jobs get it in DJS_RUN_NAME. */
function instanceOf(dataDir: string): string {
  const file = path.join(dataDir, 'instance');
  const kept = readSmallFile(file, 64, 'the instance file', 'remove it: the next start makes a new one')?.trim();
  if (kept !== undefined && /^[a-z0-9]{8}$/.test(kept)) return kept;
  const made = crypto.randomBytes(4).toString('hex');
  replaceFile(file, (fd) => writeAll(fd, made + '\n'));
  return made;
}

/** A small file of the data dir (instance, settings, lock.token, server.pid), read as a
 *  plain file of at most `max` bytes: never through a symlink, nor from a FIFO (which
 *  would hang the start) or a device (/dev/zero would be read until memory runs out).
 *  null if there is none; anything else is a one-line error naming it as `what`. */
function readSmallFile(file: string, max: number, what: string, hint: string): string | null {
  let fd: number | null = null;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
    const stat = fs.fstatSync(fd);
    if (!stat.isFile()) throw failure(`${what} '${file}' is not a plain file`, hint);
    if (stat.size > max) throw failure(`${what} '${file}' holds ${stat.size} bytes, more than the ${max} djs writes there`, hint);
    const buf = Buffer.alloc(max);
    return buf.subarray(0, fs.readSync(fd, buf, 0, max, 0)).toString('utf8');
  } catch (e) {
    if (e instanceof UserError) throw e;
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return null;
    if (code === 'ELOOP') throw failure(`${what} '${file}' is a symbolic link; djs reads only a plain file there`, hint);
    throw failure(`cannot read ${what} '${file}': ${(e as Error).message}`, hint);
  } finally {
    if (fd !== null) fs.closeSync(fd);
  }
}

/** Names djs makes in a data dir (and their temporary files). */
const DATA_DIR_NAME = /^(journal|snapshot|settings|server\.pid|server\.sock|lock\.token|http\.token|instance|run|ssh)(\.(tmp|\d+))?$/;

/** The data dir: made, or checked (ownDir); one that holds files djs did not make is
 *  refused (a directory given by mistake, a home or a logs dir), so that nothing of
 *  the user's is taken over or has its mode changed. */
export function ownDataDir(dir: string): void {
  ownDir(dir, 'data dir');
  const names = fs.readdirSync(dir);
  const foreign = names.filter((n) => !DATA_DIR_NAME.test(n));
  if (foreign.length && !names.includes('journal')) {
    throw failure(`the data dir '${dir}' is not empty and was not made by djs (it holds ${quoteForError(foreign[0])}${foreign.length > 1 ? ` and ${foreign.length - 1} more` : ''})`,
      'give a new or empty directory with --data-dir DIR (the default is ./.data)');
  }
}

/** Throws unless `dir` (or the symlink that names it, and its target) is a directory of
 *  this user's that no one else can write to, on a path no one else can change (see
 *  checkPathTo). */
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
  checkPathTo(dir, what, uid);
}

/** Throws unless every directory above `dir`, on the path as given and on the real one,
 *  belongs to root or to this user and, if others may write to it (all, or a group not
 *  this user's own), is sticky (as /tmp):
 *  whoever may rename entries of a directory above could move the user's directory away
 *  and put one of their own in its place, after any check of the directory itself (as
 *  ssh's StrictModes, which looks at the parents of ~/.ssh). */
export function checkPathTo(dir: string, what: string, uid: number, missingOk = false): void {
  const hint = 'use a directory under one that only you (or root) can change, such as your home';
  const above = (p: string) => {
    for (let cur = path.dirname(p), prev = p; cur !== prev; prev = cur, cur = path.dirname(cur)) {
      let s: fs.Stats;
      try { s = fs.lstatSync(cur); } catch (e) {
        if (missingOk && (e as NodeJS.ErrnoException).code === 'ENOENT') continue; // to be made, this user's
        throw failure(`cannot check '${cur}', above the ${what} '${dir}': ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
      }
      if (s.uid !== 0 && s.uid !== uid) throw failure(`the ${what} '${dir}' is under '${cur}', which belongs to user ${s.uid}: they could put another directory in its place`, hint);
      // Writable by its group only, where that is this user's own group (a home of mode
      // 775 with a group of one): no one else.
      const others = s.mode & 0o002 || (s.mode & 0o020 && s.gid !== process.getgid?.());
      if (!s.isSymbolicLink() && others && !(s.mode & 0o1000)) {
        throw failure(`the ${what} '${dir}' is under '${cur}', which others can write to (mode ${(s.mode & 0o777).toString(8)}, not sticky): they could put another directory in its place`, hint);
      }
    }
  };
  const abs = path.resolve(dir);
  above(abs);
  let real: string;
  try { real = fs.realpathSync(abs); } catch (e) {
    if (missingOk && (e as NodeJS.ErrnoException).code === 'ENOENT') return; // checked again once made
    throw failure(`cannot check the ${what} '${dir}': ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  if (real !== abs) above(real);
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

/** What a start reads from the environment besides its settings (ENVIRONMENT). */
type Tuning = { snapshotMinBytes: number; maxConnections: number; httpMaxConnections: number; caps: ConnectionCaps; clientBytes: number };

/** The soft limit of open files of this process (ulimit -n), from /proc/self/limits
 *  (Node has no getrlimit); Infinity where it cannot be read or has none. */
function openFilesLimit(): number {
  try {
    const m = /^Max open files\s+(\d+|unlimited)\s/m.exec(fs.readFileSync('/proc/self/limits', 'utf8'));
    return m && m[1] !== 'unlimited' ? Number(m[1]) : Infinity;
  } catch { return Infinity; }
}

export type ConnectionCaps = { socket: number; http: number; fdLimit: number; reserve: number; note: string | null };

/** How many client connections the server keeps at once, from the file descriptors it
 *  may have (`fdLimit`): first a reserve for its own, 64 and an eighth of the limit (the
 *  owner's next CLI connection, the job launcher and its pipes, job starts, ssh masters
 *  and probes, the journal, logs being read, the start lock's LOCK_CONNECTIONS); the
 *  rest half to the socket and half to HTTP, at most 1,000 and 1,064. So clients, with
 *  the token or not, never take the descriptors the server needs. DJS_MAX_CONNECTIONS
 *  (`given`) sets the socket's cap as given (HTTP: 64 more), whatever the limit; `note`
 *  says when it goes past what the limit leaves, or when the limit lowers the caps. */
export function connectionCaps(fdLimit: number, given?: number): ConnectionCaps {
  const reserve = Number.isFinite(fdLimit) ? 64 + Math.ceil(fdLimit / 8) : 0;
  const room = Number.isFinite(fdLimit) ? Math.max(2, fdLimit - reserve) : Infinity;
  if (given !== undefined) {
    const over = given + given + 64 > room;
    return { socket: given, http: given + 64, fdLimit, reserve, note: over ? `warning: DJS_MAX_CONNECTIONS=${given} lets clients hold ${given} socket and ${given + 64} HTTP connections, more than the ${room} file descriptors the limit of ${fdLimit} open files (ulimit -n) leaves beside the ${reserve} the server keeps for its own: clients could leave it none` : null };
  }
  const socket = Math.min(1000, Math.max(1, Math.floor(room / 2)));
  const http = Math.min(1064, Math.max(1, room - socket));
  const lowered = socket < 1000 || http < 1064;
  return { socket, http, fdLimit, reserve, note: lowered ? `connections at once: at most ${socket} on the socket and ${http} over HTTP, from the limit of ${fdLimit} open files (ulimit -n) less ${reserve} the server keeps for its own` : null };
}

/** The server's configuration: its settings (resolveSettings) and tuning. */
function serverConfig(dataDir: string, values: Settings, changed: [string, string, string][], tuning: Tuning): ServerConfig {
  return {
    dataDir, logDir: values.DJS_LOG_DIR, killGraceMs: Number(values.DJS_KILL_GRACE) * 1000, probeMaxMs: Number(values.DJS_PROBE_BACKOFF_MAX) * 1000,
    ssh: sshSettings(values), settings: values, changed, ...tuning,
    http: values.DJS_HTTP ? parseHttpAddress(values.DJS_HTTP) : null, slurmCheckMs: Number(values.DJS_SLURM_CHECK) * 1000,
    instance: '',
  };
}

async function runServer(dataDir: string, given: Settings, tuning: Tuning): Promise<void> {
  checkPerl();
  ownDataDir(dataDir);
  // One spelling of the data dir for everything that names it (jobs' DJS_DATA_DIR, the
  // launcher's argv), whatever symlink the start went through.
  const realDir = fs.realpathSync(dataDir);
  const { values, changed } = resolveSettings(readSettings(realDir), given);
  cfg = serverConfig(realDir, values, changed, tuning);
  fs.chmodSync(cfg.dataDir, 0o700);
  ownDir(path.join(cfg.dataDir, 'run'), 'run dir');
  if (cfg.ssh.shared) {
    cfg.ssh.controlDir = ownControlDir(controlDirFor(cfg.dataDir, process.getuid?.() ?? 0, process.env.TMPDIR || '/tmp'), cfg.dataDir);
    fs.chmodSync(cfg.ssh.controlDir, 0o700);
  }
  ownDir(cfg.logDir, 'log dir');
  await holdDirLock(cfg.dataDir); // held until this process ends
  lockDataDir(cfg.dataDir);
  try {
    cfg.instance = instanceOf(cfg.dataDir);
    const loaded = loadState(cfg.dataDir);
    // Two starts that both found a stale pid file can both think they took the dir:
    // check before writing anything, and again once the journal is open.
    if (liveServerPid(cfg.dataDir) !== process.pid) throw failure(`another server took data dir '${cfg.dataDir}' while this one started`);
    for (const w of loaded.warnings) process.stderr.write(`warning: ${w}\n`);
    st = loaded.state;
    journal = new Journal(cfg.dataDir, loaded.journalSize, loaded.snapshotSize, cfg.snapshotMinBytes);
    // Jobs use the ssh the server checks workers with.
    baseEnv = { ...process.env };
    for (const set of SETTINGS) {
      if (!set.jobs) continue;
      if (cfg.settings[set.env]) baseEnv[set.env] = cfg.settings[set.env]; else delete baseEnv[set.env];
    }
    argSpace = argSpaceOf(baseEnv);
    const fromServer = ['DJS_DATA_DIR', ...SETTINGS.filter((set) => set.jobs).map((set) => set.env), ...ENVIRON_FROM_SERVER];
    serverWords = fromServer.flatMap((name) => (name === 'DJS_DATA_DIR' ? [`${name}=${cfg.dataDir}`] : baseEnv[name] === undefined ? [] : [`${name}=${baseEnv[name]}`]));
    environSpace = argSpaceOf(Object.fromEntries(serverWords.map((w) => [w.slice(0, w.indexOf('=')), w.slice(w.indexOf('=') + 1)])));
    // A data dir of an earlier format is written anew in this one before anything is
    // appended to it, so no file mixes two versions.
    if (loaded.version < FORMAT_VERSION) journal.snapshot(st);
    // A snapshot cut short by a stop or crash left the journal of before it (journal.1):
    // it is folded in now, so that the next snapshot has a place for its own.
    else if (fs.existsSync(path.join(cfg.dataDir, 'journal.1'))) journal.snapshot(st);
    sweepRunDir();
    watchRunningJobs();
    if (liveServerPid(cfg.dataDir) !== process.pid) throw failure(`another server took data dir '${cfg.dataDir}' while this one started`);
  } catch (e) {
    if (liveServerPid(cfg.dataDir) === process.pid) fs.rmSync(path.join(cfg.dataDir, 'server.pid'), { force: true });
    throw e;
  }
  if (cfg.http) {
    try { await startHttp(cfg.http); } catch (e) {
      fs.rmSync(path.join(cfg.dataDir, 'server.pid'), { force: true });
      throw e;
    }
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
  // Kept only now that this start is up: a start that failed (a port in use) keeps
  // nothing, so the next plain start does not fail the same way.
  writeSettings(cfg.dataDir, cfg.settings);
  server.on('error', (e) => log(`socket error: ${e.message}`));
  for (const sig of ['SIGTERM', 'SIGINT'] as const) process.on(sig, () => shutdown(sig));
  process.on('SIGHUP', () => {});
  ensureLauncher();
  if (journal.needsSnapshot()) takeSnapshot(true);
  if (cfg.changed.length) log(`settings changed: ${describeChanges(cfg.changed)}`);
  if (cfg.caps.note) log(cfg.caps.note);
  log(`djs server ready: pid ${process.pid}, data ${cfg.dataDir}, logs ${cfg.logDir}, ${st.jobs.size} jobs, ${st.workers.size} workers${cfg.http ? `; dashboard at ${httpUrl()} (its token: cli.ts dashboard)` : ''}`);
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
  checks.sweeps++;
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

/** searched: the data dir was looked for (findDataDir), not named. */
type Ctx = { dataDir: string; out: NodeJS.WriteStream; err: NodeJS.WriteStream; searched?: boolean };

/** The data dir of a command that names none: the nearest `.data` that djs made, here
 *  or in a parent directory (as git finds .git), so that a command run in a
 *  subdirectory of a project finds its server; ./.data if there is none. */
export function findDataDir(cwd: string): string {
  for (let dir = cwd; ; dir = path.dirname(dir)) {
    const candidate = path.join(dir, '.data');
    if (['journal', 'settings', 'server.pid'].some((f) => fs.existsSync(path.join(candidate, f)))) return candidate;
    if (path.dirname(dir) === dir) return path.join(cwd, '.data');
  }
}

/** Sends one request and calls onLine for every line before the final answer, which
 *  the promise resolves to. ok:false answers become UserErrors. */
export async function request(dataDir: string, msg: Record<string, unknown>, onLine?: (m: Record<string, unknown>) => void): Promise<Record<string, unknown>> {
  // A server that is still starting (replaying a big journal) owns the data dir but does
  // not listen yet: wait for it rather than say there is none.
  const t0 = Date.now();
  let told = false;
  for (;;) {
    try {
      return await requestOnce(dataDir, msg, onLine);
    } catch (e) {
      if (!(e instanceof UserError && e.code === EXIT_NO_SERVER)) throw e;
      const pid = liveServerPid(dataDir);
      if (pid === null) throw e;
      if (Date.now() - t0 > START_WAIT_MS) throw noServer(dataDir, ` (server ${pid} owns it but did not answer within ${START_WAIT_MS / 1000}s)`);
      if (!told && Date.now() - t0 > 500) {
        told = true;
        process.stderr.write(`waiting up to ${START_WAIT_MS / 1000}s for server ${pid}, which is still starting on data dir '${dataDir}'\n`);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}
/** How long a client waits for a server that is starting, or coming back. */
const START_WAIT_MS = 60_000;

function requestOnce(dataDir: string, msg: Record<string, unknown>, onLine?: (m: Record<string, unknown>) => void): Promise<Record<string, unknown>> {
  const sock = socketPath(dataDir);
  return new Promise((resolve, reject) => {
    // A socket in a data dir someone else controls could be theirs: never talk to it.
    let isDir: boolean;
    try { isDir = fs.statSync(dataDir).isDirectory(); } catch { return reject(noServer(dataDir)); }
    if (!isDir) return reject(noServer(dataDir, ' (it is not a directory)'));
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
  let lostAt = 0, reached = false;
  for (;;) {
    try {
      return await request(dataDir, msg, (m) => { reached = true; lostAt = 0; onLine?.(m); });
    } catch (e) {
      if (!(e instanceof ConnectionLost || (e instanceof UserError && e.code === EXIT_NO_SERVER))) throw e;
      // A server that is not there (yet: one may be starting) or went away is waited for,
      // and the wait said at once, with its limit.
      if (!lostAt) {
        lostAt = Date.now();
        const what = reached || e instanceof ConnectionLost ? 'went away' : 'is not running (yet)';
        process.stderr.write(`${process.stderr.isTTY && reached ? '\n' : ''}the server of data dir '${dataDir}' ${what}; waiting up to ${START_WAIT_MS / 1000}s for one to answer (Ctrl-C to give up)\n`);
      }
      if (Date.now() - lostAt > START_WAIT_MS) throw noServer(dataDir, ` (none answered within ${START_WAIT_MS / 1000}s)`);
      await new Promise((r) => setTimeout(r, 250));
    }
  }
}

const noServer = (dataDir: string, why = '') => new UserError(EXIT_NO_SERVER, `no server is running on data dir '${dataDir}'${why}`,
  `start one with: cli.ts start${dataDir === path.resolve('.data') ? '' : ` ${shellQuote(dataDir)}`} (a command without --data-dir uses the nearest .data here or above)`);

type OptSpec = Record<string, { type: 'string' | 'boolean'; short?: string; multiple?: boolean }>;
type Parsed = { values: Record<string, string | boolean | string[] | undefined>; positionals: string[] };

const GLOBAL_OPTIONS: OptSpec = {
  'data-dir': { type: 'string' }, server_data_dir: { type: 'string' }, help: { type: 'boolean', short: 'h' },
};

/** Parses a command's words with node's parseArgs. With `stopAtPositional`, the first
 *  positional word and everything after it are left alone (they belong to the job). */
function parseCommand(args: string[], options: OptSpec, stopAtPositional: boolean, negatives = false, command?: string): Parsed {
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
    throw argsError(e as NodeJS.ErrnoException, all, command);
  }
}

/** parseArgs's errors, as one short line each. */
function argsError(e: NodeJS.ErrnoException, options: OptSpec, command?: string): UserError {
  const word = /'([^']*)'/.exec(e.message)?.[1] ?? '';
  const see = command ? `see: cli.ts help ${command}` : 'see: cli.ts help';
  switch (e.code) {
    case 'ERR_PARSE_ARGS_UNKNOWN_OPTION': {
      const near = word.startsWith('--') ? nearest(word.slice(2).split('=')[0], Object.keys(options).filter((o) => o.length > 1)) : undefined;
      return usage(`unknown option ${quoteForError(word)}`, near ? `did you mean --${near}? (${see})` : see);
    }
    case 'ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL': return usage(`unexpected argument ${quoteForError(word)}`, see);
    case 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE': {
      const option = word.split(' ')[0];
      if (!/argument missing/.test(e.message)) return usage(`option ${quoteForError(option)} needs a value`, `write ${option}=VALUE for a value that starts with '-'`);
      // Nothing after it: how the value is written (--http [HOST:]PORT).
      const form = (command ? COMMAND_HELP[command]?.options ?? [] : []).map(([o]) => o.split(' (')[0]).find((o) => o.split(/[ ,]+/).includes(option));
      return usage(`option ${quoteForError(option)} needs a value`, `${form ? `as in: ${form.replace(/^-\w, /, '')}` : `write ${option} VALUE`} (${see})`);
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
  const abs = findScript(script, cwd);
  checkExecutable(abs, script, where);
  return abs;
}

/** Where a script named as given is: a path (with a /) from cwd; a bare name on PATH,
 *  as a shell finds a command (`add_job echo hi`), else in cwd, as djs took it before. */
export function findScript(script: string, cwd: string, pathVar = process.env.PATH ?? ''): string {
  if (script.includes('/') || script === '') return path.resolve(cwd, script);
  for (const dir of pathVar.split(':')) {
    const file = path.resolve(cwd, dir || '.', script); // an empty entry is the current directory
    try {
      if (!fs.statSync(bytesOf(file)).isFile()) continue;
      fs.accessSync(bytesOf(file), fs.constants.X_OK);
      return file;
    } catch { /* not here */ }
  }
  return path.resolve(cwd, script);
}

/** Reads an add_jobs file into job specs; an error names the line. */
export function parseJobsFile(text: string, cwd: string, name: string, onWorker = false): JobSpec[] {
  const jobs: JobSpec[] = [];
  const scripts = new Map<string, string>();
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    let words: string[];
    if (lines[i].includes('\0')) throw failure(`${name} line ${i + 1}: a NUL byte, which no argument can hold (is it a text file?)`);
    try { words = splitWords(lines[i]); } catch (e) { throw failure(`${name} line ${i + 1}: ${(e as Error).message}`); }
    if (words.length === 0) continue;
    if (onWorker) { jobs.push(words); continue; } // found on the worker
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
  // Tenths below ten seconds (9.94 s is 9.9s; 9.95 s rounds to 10s, not 10.0s).
  if (ms < 9_950) return `${(Math.max(0, ms) / 1000).toFixed(1)}s`;
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

/** The human status: counts, one line per worker with its slot bar, the queue head. */
export function formatStatus(s: StatusView & { server?: { pid: number; dataDir: string; settings?: Settings; launcher?: { error: string; retryAt: string } | null } }, now: number, colorOn: boolean): string {
  const c = color(colorOn);
  const out: string[] = [];
  const counts = s.counts;
  out.push(`jobs: ${JOB_STATES.map((k) => `${counts[k]} ${c(STATE_COLORS[k], k)}`).join(', ')} (${counts.total} in all)`);
  out.push(`workers: ${s.workers.length}${s.workers.length ? `, policy ${s.policy}` : ' (add some with: cli.ts add_slave HOST)'}`);
  const width = Math.max(4, ...s.workers.map((w) => w.host.length));
  const barWidth = Math.max(0, ...s.workers.map((w) => Math.max(w.slots, ...w.running.map((r) => r.slot + 1)))) + 2;
  for (const w of s.workers) {
    const busy = new Set(w.running.map((r) => r.slot));
    const bar = ('[' + Array.from({ length: Math.max(w.slots, ...w.running.map((r) => r.slot + 1)) }, (_, i) => (busy.has(i) ? '*' : '.')).join('') + ']').padEnd(barWidth);
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
  if (s.server) {
    out.push(`server: pid ${s.server.pid}, data ${s.server.dataDir}`);
    const down = s.server.launcher;
    if (down) out.push(c('31', `jobs cannot start: the job launcher (perl) did not start (${down.error}); next try in ${formatDuration(Date.parse(down.retryAt) - now)}`));
    const set = s.server.settings ?? {};
    out.push(`settings (kept in the data dir; a start given others changes them):`);
    for (const name of Object.keys(set)) out.push(`  ${name}=${shellQuote(set[name])}`);
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

/** The EXIT column of list: the exit code, or why the job failed when the code does not
 *  say it (timeout, exit 255 xN, lost, dependency N failed, ...), or when a waiting
 *  job's retry is due. */
export function exitColumn(j: JobView, now: number): string {
  if (j.state === 'waiting') {
    if (j.retryAt && Date.parse(j.retryAt) > now) return `retry ${formatDuration(Date.parse(j.retryAt) - now)}`;
    return j.exitCode === null ? '-' : String(j.exitCode);
  }
  const r = j.reason;
  if (r && j.state === 'failed') {
    if (r.startsWith('timeout')) return 'timeout';
    const m = /^exit 255 \(worker failure\) (\d+) times/.exec(r);
    if (m) return `exit 255 x${m[1]}`;
    if (r.startsWith('lost')) return 'lost';
    if (r.startsWith('cannot start')) return 'no start';
    if (j.exitCode === null) return r.split(':')[0];
  }
  return j.exitCode === null ? (r && j.state !== 'running' ? r.split(' ')[0] : '-') : String(j.exitCode);
}

/** One row of list: one line whatever the job holds (control characters in its words or
 *  reason are escaped), each column within its width. What a column cannot hold, why a
 *  job waits or ended (`dependency 3 failed`, `cannot start: cannot enter DIR`), follows
 *  the command in full, as a shell comment: `# dependency 3 failed`. */
export function formatJobRow(j: JobView, now: number, c: (code: string, s: string) => string): string {
  const exit = visible(exitColumn(j, now)), where = visible((j.state === 'waiting' ? j.waitingFor : j.worker) ?? '-');
  const cmd = commandText(j);
  const fit = (text: string, width: number) => (text.length > width ? (text.slice(0, width - 1).trimEnd() + '…').padEnd(width) : text.padEnd(width));
  const reason = j.state === 'waiting' ? (where.length > 15 ? where : null) : isFinished(j.state) && j.reason !== null && j.reason !== j.state && (visible(j.reason) !== exit || exit.length > 11) ? visible(j.reason) : null;
  return [
    String(j.id).padStart(6), c(STATE_COLORS[j.state], j.state.padEnd(7)), fit(where, 15), fit(exit, 11),
    String(j.attempts).padStart(5), formatTime(j.queuedAt, now).padEnd(11), (j.runtimeMs === null ? '-' : formatDuration(j.runtimeMs)).padStart(7), cmd,
  ].join('  ') + (reason === null ? '' : `  # ${reason}`);
}

/** Text with its control characters (and bytes that are not UTF-8) as \xHH, for a line
 *  that must stay one line. */
const visible = (text: string) => text.replace(/[\x00-\x1f\x7f]|(?<![\ud800-\udbff])[\udc80-\udcff]/g, (ch) => `\\x${(ch.charCodeAt(0) & 0xff).toString(16).padStart(2, '0')}`);

/** The files cli.py (the Python scheduler djs replaces) keeps in its data dir. */
const CLIPY_FILES = ['commands_fifo', 'service_pid', 'server_context.pkl'];

/** Throws when `dataDir` holds cli.py's files: a djs server there would run beside a
 *  cli.py server (both default to ./.data), or leave its state behind unread. */
export function refuseClipyDataDir(dataDir: string): void {
  const found = CLIPY_FILES.filter((f) => { try { fs.lstatSync(path.join(dataDir, f)); return true; } catch { return false; } });
  if (!found.length) return;
  let running = '', pid = 0;
  try { pid = Number(fs.readFileSync(path.join(dataDir, 'service_pid'), 'utf8').trim()); } catch { /* no pid file */ }
  if (Number.isSafeInteger(pid) && pid > 0) {
    try { process.kill(pid, 0); running = `, and its server (pid ${pid}) is running`; } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EPERM') running = `, and its server (pid ${pid}) is running`;
    }
  }
  const dir = shellQuote(dataDir);
  throw failure(`data dir ${quoteForError(dataDir)} belongs to cli.py (it holds ${found.join(', ')})${running}`,
    `to move to djs: ./cli.py status > st.json; ./cli.py stop; mv ${dir} ${shellQuote(dataDir + '.clipy')}; ./cli.ts start; ./cli.ts load_status st.json (or start djs on another --data-dir)`);
}

async function cmdStart(p: Parsed, ctx: Ctx): Promise<number> {
  if (p.positionals.length > 2) throw usage('start takes at most DATA_DIR and LOG_DIR');
  const dataDir = path.resolve(p.positionals[0] ?? ctx.dataDir);
  refuseClipyDataDir(dataDir);
  if (p.values['log-dir'] === undefined && p.values.log_dir !== undefined) p.values['log-dir'] = p.values.log_dir; // cli.py's spelling
  const given = givenSettings(p, process.env);
  if (p.positionals[1] !== undefined) given.DJS_LOG_DIR = p.positionals[1];
  if (p.values.detach) return startDetached(dataDir, given, ctx);
  const snapshotMinBytes = intOption(process.env.DJS_SNAPSHOT_MIN_BYTES, 'DJS_SNAPSHOT_MIN_BYTES', 1) ?? SNAPSHOT_MIN_JOURNAL_BYTES;
  const caps = connectionCaps(openFilesLimit(), intOption(process.env.DJS_MAX_CONNECTIONS, 'DJS_MAX_CONNECTIONS', 1));
  const clientBytes = intOption(process.env.DJS_CLIENT_BYTES, 'DJS_CLIENT_BYTES', 1 << 20) ?? defaultClientBytes();
  await runServer(dataDir, given, { snapshotMinBytes, maxConnections: caps.socket, httpMaxConnections: caps.http, caps, clientBytes });
  return -1; // keeps running
}

/** start --detach: checks what the server would refuse (no perl, a data dir or log dir
 *  it cannot use, a server already running) here, so that the error comes at once and
 *  lands on the terminal, not in a running server's log; runs the server as a
 *  background process (its output appended to LOG_DIR/server.log) with the settings
 *  resolved here; waits until it answers, prints its ready line, and returns. */
async function startDetached(dataDir: string, given: Settings, ctx: Ctx): Promise<number> {
  checkPerl();
  ownDataDir(dataDir);
  const running = liveServerPid(dataDir);
  if (running !== null) throw failure(`a server is already running on data dir '${dataDir}' (pid ${running})`, 'stop it first with: cli.ts stop');
  const { values, changed } = resolveSettings(readSettings(dataDir), given);
  const logDir = values.DJS_LOG_DIR;
  ownDir(logDir, 'log dir');
  const logPath = path.join(logDir, 'server.log');
  const fd = openServerLog(logPath);
  const from = fs.fstatSync(fd).size; // what earlier servers wrote is not this start's news
  const child = spawn(process.execPath, [...process.execArgv, process.argv[1], 'start', dataDir], {
    detached: true, stdio: ['ignore', fd, fd], env: { ...process.env, ...values },
  });
  fs.closeSync(fd);
  let exited: number | null = null;
  child.on('exit', (code) => { exited = code ?? 1; });
  child.unref();
  const t0 = Date.now();
  let told = false;
  for (;;) {
    try {
      const r = await requestOnce(dataDir, { op: 'ping' });
      if (Number(r.pid) === child.pid) break; // else another server answered: ours will refuse and exit
    } catch { /* not listening yet */ }
    if (exited !== null) {
      const text = fs.readFileSync(logPath).subarray(from).toString('utf8');
      const tail = text.trim().split('\n').filter((l) => l.startsWith('error') || l.startsWith('hint'));
      for (const line of tail.slice(-2)) ctx.err.write(line + '\n');
      if (!tail.length) ctx.err.write(`error: the server exited with ${exited} before it answered; its output is in ${logPath}\n`);
      return exited || EXIT_FAILED;
    }
    if (!told && Date.now() - t0 > 1000) {
      told = true;
      ctx.err.write(`the server (pid ${child.pid}) is loading data dir '${dataDir}'; waiting until it answers (its output goes to ${logPath})\n`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  if (changed.length) ctx.out.write(`settings changed: ${describeChanges(changed)}\n`);
  ctx.out.write(`djs server ready: pid ${child.pid}, data ${dataDir}, logs ${logDir}; its output goes to ${logPath}\n`);
  return EXIT_OK;
}

/** Opens LOG_DIR/server.log to append to (made if missing, mode 0600): a plain file,
 *  never through a symlink (one planted there would send the server's output, and its
 *  mode change, elsewhere), nor a FIFO or a directory. Errors name the path and what is
 *  wrong with it. */
function openServerLog(logPath: string): number {
  const c = fs.constants;
  let fd: number;
  try { fd = fs.openSync(logPath, c.O_WRONLY | c.O_CREAT | c.O_APPEND | c.O_NOFOLLOW | c.O_NONBLOCK, 0o600); } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const hint = `remove it, or give another log dir with --log-dir DIR`;
    if (code === 'ELOOP') throw failure(`the server log '${logPath}' is a symbolic link; djs writes only to a plain file there`, hint);
    if (code === 'EISDIR') throw failure(`the server log '${logPath}' is a directory, not a file`, hint);
    if (code === 'ENXIO') throw failure(`the server log '${logPath}' is a FIFO, not a file`, hint);
    throw failure(`cannot open the server log '${logPath}': ${(e as Error).message}`);
  }
  if (!fs.fstatSync(fd).isFile()) {
    fs.closeSync(fd);
    throw failure(`the server log '${logPath}' is not a plain file`, 'remove it, or give another log dir with --log-dir DIR');
  }
  return fd;
}

/** The -e/--env words of a command, with cli.py's spelling `--env,-e=NAME=VALUE`. */
const envWords = (p: Parsed) => [...((p.values.env as string[] | undefined) ?? []), ...((p.values['env,-e'] as string[] | undefined) ?? [])];

/** Comma lists in a repeatable option (--label a,b --label c), as one list. */
const commaList = (v: unknown) => (v === undefined ? [] : (v as string[]).flatMap((w) => w.split(',')).map((w) => w.trim()).filter(Boolean));

/** dashboard: the URL of the running server's dashboard, with its access token in the fragment (#token=).
 *  --new-token: the running server makes a new token and refuses the old one from then on;
 *  with no server running, the token file is replaced, for the next start. */
async function cmdDashboard(p: Parsed, ctx: Ctx): Promise<number> {
  if (p.values['new-token']) {
    let r: Record<string, unknown>;
    try { r = await request(ctx.dataDir, { op: 'new_token' }); } catch (e) {
      if (!(e instanceof UserError && e.code === EXIT_NO_SERVER) || !fs.existsSync(path.join(ctx.dataDir, 'journal'))) throw e;
      checkOwnDir(ctx.dataDir, 'data dir');
      writeHttpToken(ctx.dataDir);
      ctx.out.write(`new access token in ${path.join(ctx.dataDir, 'http.token')} (no server runs now; the next start --http uses it)\n`);
      return EXIT_OK;
    }
    if (typeof r.token !== 'string') throw failure(`the server on data dir '${ctx.dataDir}' cannot make a new token`, 'it is of an older version: stop it and start it again');
    ctx.out.write(typeof r.url === 'string' ? `${r.url}#token=${r.token}\n` : `new access token in ${path.join(ctx.dataDir, 'http.token')} (the server serves no dashboard now; start it with --http)\n`);
    return EXIT_OK;
  }
  const r = await request(ctx.dataDir, { op: 'ping' });
  if (typeof r.http !== 'string') throw failure(`the server on data dir '${ctx.dataDir}' serves no dashboard`, 'start it with --http PORT (or DJS_HTTP=PORT), e.g. cli.ts stop && cli.ts start --detach --http 8080');
  let token: string;
  try { token = fs.readFileSync(path.join(ctx.dataDir, 'http.token'), 'utf8').trim(); } catch (e) {
    throw failure(`cannot read the dashboard's token '${path.join(ctx.dataDir, 'http.token')}': ${(e as Error).message}`);
  }
  ctx.out.write(`${r.http}#token=${token}\n`);
  return EXIT_OK;
}

async function cmdAddWorkers(p: Parsed, ctx: Ctx): Promise<number> {
  if (!p.positionals.length) throw usage('add_slave needs at least one HOST[:SLOTS]');
  const auto = p.values.slots === 'auto', slots = auto ? 1 : intOption(p.values.slots, 'slot count', 1) ?? 1;
  const gpus = intOption(p.values.gpus, 'GPU count', 0) ?? 0;
  const labels = commaList(p.values.label).map(labelOf), env = envOf(envWords(p));
  const skipCheck = Boolean(p.values.skip_ssh_auth_check);
  const workers = p.positionals.map((a) => {
    if (ENV_WORD_RE.test(a)) throw usage(`invalid host ${quoteForError(a)}`, 'give each environment setting its own -e: -e A=1 -e B=2 HOST');
    const w = { ...parseWorkerArg(a, slots, auto), gpus, labels, env };
    const warning = manySlotsWarning(a, w.slots, skipCheck);
    if (warning) ctx.err.write(`warning: ${warning}\n`);
    return w;
  });
  let r: Record<string, unknown>;
  try {
    r = await request(ctx.dataDir, { op: 'add_workers', workers, skipCheck, requeueOnDown: Boolean(p.values['requeue-on-down']), environ: clientEnviron() });
  } catch (e) {
    if (e instanceof UserError && e.code === EXIT_FAILED && /^ssh login check failed/.test(e.message)) await noteSshDifference(ctx);
    throw e;
  }
  for (const w of r.added as { host: string; slots: number; gpus: number; labels: string[] }[]) {
    ctx.out.write(`added worker ${w.host} with ${w.slots} slot${w.slots === 1 ? '' : 's'}${w.gpus ? ` and ${w.gpus} GPU${w.gpus === 1 ? '' : 's'}` : ''}${w.labels.length ? `, labels ${w.labels.join(',')}` : ''}\n`);
  }
  for (const line of (r.changes as string[] | undefined) ?? []) ctx.out.write(`${line}\n`);
  if (r.warning) ctx.err.write(`warning: ${r.warning}\n`);
  return EXIT_OK;
}

async function cmdPolicy(p: Parsed, ctx: Ctx): Promise<number> {
  if (p.positionals.length > 1) throw usage('policy takes at most one NAME', `usage: cli.ts ${COMMANDS.policy.synopsis}`);
  const r = await request(ctx.dataDir, { op: 'policy', ...(p.positionals.length ? { name: p.positionals[0] } : {}) });
  ctx.out.write(p.positionals.length && r.was !== r.policy ? `policy: ${r.policy} (was ${r.was})\n` : `policy: ${r.policy}\n`);
  return EXIT_OK;
}

/** After a failed login check: ssh settings in this shell that differ from the server's
 *  (which the check used) are pointed out, with how to change the server's. */
async function noteSshDifference(ctx: Ctx): Promise<void> {
  let kept: Settings;
  try { kept = ((await requestOnce(ctx.dataDir, { op: 'ping' })).settings ?? {}) as Settings; } catch { return; }
  for (const s of SETTINGS) {
    const mine = process.env[s.env];
    if (!s.jobs || mine === undefined || kept[s.env] === undefined) continue;
    let value: string;
    try { value = s.value(mine, s.env); } catch { continue; }
    if (value !== kept[s.env]) {
      ctx.err.write(`note: the server checks with ${s.env}=${shellQuote(kept[s.env])}, not this shell's ${shellQuote(value)}; to change it: cli.ts stop, then ${s.env}=${shellQuote(value)} cli.ts start -d\n`);
    }
  }
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
  const afterAny = list(p.values['after-any']).flatMap((w) => w.split(',')).map((w) => intOption(w.trim(), 'job id in --after-any', 1)!);
  const tags = list(p.values.tag).map(tagOf);
  const env = envOf(envWords(p));
  return {
    retries: intOption(p.values.retries, 'retries', 0) ?? 0,
    timeout: intOption(p.values.timeout, 'timeout', 1) ?? 0,
    ...(p.values['retry-delay'] !== undefined ? { retryDelay: intOption(p.values['retry-delay'], 'retry delay', 0) } : {}),
    ...(tags.length ? { tags } : {}),
    ...(p.values.priority !== undefined ? { priority: signedOption(p.values.priority, 'priority') } : {}),
    ...(after.length ? { after } : {}),
    ...(afterAny.length ? { afterAny } : {}),
    ...(env.length ? { env } : {}),
    ...(p.values.slots !== undefined ? { slots: intOption(p.values.slots, 'slot count', 1) } : {}),
    ...(p.values.gpus !== undefined ? { gpus: intOption(p.values.gpus, 'GPU count', 0) } : {}),
    ...(p.values.require !== undefined ? { require: commaList(p.values.require).map(labelOf) } : {}),
    ...(p.values.avoid !== undefined ? { avoid: commaList(p.values.avoid).map(labelOf) } : {}),
    ...(p.values.host !== undefined ? { hosts: commaList(p.values.host) } : {}),
    ...(p.values['on-worker'] ? { onWorker: true } : {}),
    ...(p.values.workdir !== undefined ? { workdir: workdirGiven(p.values.workdir as string, Boolean(p.values['on-worker'])) } : {}),
    ...(p.values.name !== undefined ? { name: p.values.name } : {}),
    ...(p.values.transfer !== undefined ? { transfer: p.values.transfer } : {}),
    ...(p.values.return !== undefined ? { return: p.values.return } : {}),
    ...(p.values['return-optional'] ? { returnOptional: true } : {}),
    ...(p.values.cleanup ? { cleanup: true } : {}),
  };
}

/** This shell's environment, as a request's `environ`: the jobs and checks of what it
 *  adds run with it (keptEnviron says what does not follow). */
const clientEnviron = () => keptEnviron(Object.entries(process.env).flatMap(([k, v]) => (v === undefined ? [] : [`${k}=${v}`])));

/** --workdir as given: ~ and ~/DIR stay for the worker; another path is taken from the
 *  current directory. */
function workdirGiven(dir: string, onWorker: boolean): string {
  if (!onWorker) throw usage('--workdir is for --on-worker commands', 'a script runs in the directory it was queued in; cd there in the script');
  if (dir === '~' || dir.startsWith('~/')) return dir;
  if (dir === '' || dir.startsWith('~')) throw usage(`invalid workdir ${quoteForError(dir)}`, 'a workdir is a path, or ~ or ~/DIR on the worker');
  return path.resolve(workDir(), dir);
}

async function sendJobs(ctx: Ctx, p: Parsed, jobs: JobSpec[], sweep?: string[][]): Promise<void> {
  const r = await request(ctx.dataDir, { op: 'add_jobs', cwd: workDir(), ...jobOptions(p), jobs, ...(sweep ? { sweep } : {}), environ: clientEnviron() });
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

/** The words after SCRIPT that spell an option of `command` (or --data-dir), with the
 *  option's value, and the other words: djs gives them all to the job, but such words
 *  are most likely meant for djs (cli.py took its options from anywhere on the line).
 *  `-e` counts only before NAME=VALUE; --help, and anything after `--` or `:::`, not. */
export function optionsAfterScript(words: string[], options: OptSpec): { found: string[][]; rest: string[] } {
  const all: OptSpec = { ...GLOBAL_OPTIONS, ...options };
  const short = new Map(Object.entries(all).flatMap(([name, o]) => (o.short ? [[o.short, name]] : [])));
  const found: string[][] = [], rest: string[] = [];
  for (let i = 0; i < words.length; i++) {
    const w = words[i];
    if (w === '--' || w === ':::') { rest.push(...words.slice(i)); break; }
    const long = /^--([^=]+)(=?)/.exec(w), name = long ? long[1] : /^-[A-Za-z]/.test(w) ? short.get(w[1]) : undefined;
    const inline = long ? long[2] === '=' : w.length > 2;
    const spec = name === undefined || name === 'help' || !Object.hasOwn(all, name) ? undefined : all[name];
    const value = spec?.type === 'string' && !inline ? words[i + 1] : undefined;
    if (!spec || (spec.type === 'string' && !inline && value === undefined) || (!long && !ENV_WORD_RE.test(inline ? w.slice(2) : value ?? ''))) { rest.push(w); continue; }
    found.push(value === undefined ? [w] : [w, value]);
    if (value !== undefined) i++;
  }
  return { found, rest };
}

/** Warns (the job still gets them) of words after SCRIPT that spell options of djs
 *  (optionsAfterScript), with the line that gives them to djs. */
function warnOptionsAfterScript(command: string, options: OptSpec, script: string, words: string[], ctx: Ctx): void {
  const { found, rest } = optionsAfterScript(words, options);
  if (!found.length) return;
  const shown = found.map((f) => quoteForError(f.join(' ')));
  const line = [command, ...found.flat(), script, ...rest].map(shellQuote).join(' ');
  ctx.err.write(`warning: ${shown.length === 1 ? `${shown[0]} comes after SCRIPT, so it is an argument of the job` : `${shown.slice(0, -1).join(', ')} and ${shown[shown.length - 1]} come after SCRIPT, so they are arguments of the job`}; ` +
    `options of djs go before SCRIPT, as in: cli.ts ${line}\n`);
}

/** The same for the lines of an add_jobs file: one warning, with how many jobs and the
 *  first of them. */
function warnOptionsInJobs(jobs: JobSpec[], name: string, ctx: Ctx): void {
  let count = 0, first: { spec: JobSpec; found: string[][] } | undefined;
  for (const spec of jobs) {
    const { found } = optionsAfterScript(spec.slice(1), JOB_OPTIONS);
    if (found.length && count++ === 0) first = { spec, found };
  }
  if (!first) return;
  const many = count > 1;
  ctx.err.write(`warning: ${count} job${many ? 's' : ''} of ${quoteForError(name)} ha${many ? 've' : 's'} words after SCRIPT that spell options of djs ` +
    `(${many ? 'the first: ' : ''}${quoteForError(first.spec.map(shellQuote).join(' '))}); the job${many ? 's get them as arguments' : ' gets them as its arguments'}; ` +
    `options of djs go on the command line, as in: cli.ts add_jobs ${first.found.flat().map(shellQuote).join(' ')} ${shellQuote(name)}\n`);
}

async function cmdAddJob(p: Parsed, ctx: Ctx): Promise<number> {
  if (!p.positionals.length || p.positionals[0] === ':::') throw usage('add_job needs a SCRIPT', `usage: cli.ts ${COMMANDS.add_job.synopsis}`);
  const [script, ...words] = p.positionals;
  const { args, lists } = splitSweep(words);
  if (ENV_WORD_RE.test(script) && !fs.existsSync(bytesOf(script))) throw usage(`no such script ${quoteForError(script)}`, 'give each environment setting its own -e: -e A=1 -e B=2 SCRIPT');
  warnOptionsAfterScript('add_job', JOB_OPTIONS, script, words, ctx);
  // An --on-worker command is found on the worker, when it runs; a script here, now.
  const spec = [p.values['on-worker'] ? script : resolveScript(script, workDir()), ...args];
  if (lists) checkSweep(spec, lists, envWords(p).reduce((n, w) => n + Buffer.byteLength(w), 0)); // the server checks too; this fails before any I/O
  await sendJobs(ctx, p, [spec], lists);
  return EXIT_OK;
}

async function cmdAddJobs(p: Parsed, ctx: Ctx): Promise<number> {
  if (p.positionals.length !== 1) throw usage('add_jobs needs one FILE (or - for standard input)');
  const name = p.positionals[0];
  let text: string;
  try { text = textOf(fs.readFileSync(name === '-' ? 0 : bytesOf(name))); } catch (e) { throw failure(`cannot read ${quoteForError(name)}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`); }
  const jobs = parseJobsFile(text, workDir(), name === '-' ? 'standard input' : name, Boolean(p.values['on-worker']));
  if (jobs.length === 0) throw failure(`no jobs in ${quoteForError(name)}`);
  warnOptionsInJobs(jobs, name, ctx);
  await sendJobs(ctx, p, jobs);
  return EXIT_OK;
}

const parseIds = (words: string[]) => words.map((w) => intOption(w, 'job id', 1)!);

/** Job ids from words that are ids or job names (--name): names are asked of the server,
 *  and each must name one job. */
async function idsOf(ctx: Ctx, words: string[]): Promise<number[]> {
  const names = words.filter((w) => !/^\d+$/.test(w));
  if (!names.length) return parseIds(words);
  const r = await request(ctx.dataDir, { op: 'find', names });
  const found = new Map(names.map((n, i) => [n, (r.ids as number[])[i]]));
  return words.map((w) => found.get(w) ?? intOption(w, 'job id', 1)!);
}

/** The --tag of a command that takes one, as a request field. */
const tagField = (p: Parsed) => (p.values.tag === undefined ? {} : { tag: tagOf(p.values.tag) });

async function cmdRemoveJob(p: Parsed, ctx: Ctx): Promise<number> {
  let msg: Record<string, unknown>;
  if (p.values.tag !== undefined) {
    if (p.values.id || p.positionals.length) throw usage('remove_job takes --tag TAG, --id ID... or SCRIPT [ARGS...], one of them');
    msg = { op: 'remove_jobs', ...tagField(p) };
  } else if (p.values.id) {
    msg = { op: 'remove_jobs', ids: await idsOf(ctx, p.positionals) };
    if (!p.positionals.length) throw usage('remove_job --id needs at least one ID');
  } else {
    if (!p.positionals.length) throw usage('remove_job needs SCRIPT [ARGS...] or --id ID...');
    const [script, ...args] = p.positionals;
    // Its --id and --tag exclude a SCRIPT: only -e (which picks among its jobs) is meant here.
    warnOptionsAfterScript('remove_job', { env: JOB_OPTIONS.env, 'env,-e': JOB_OPTIONS['env,-e'] }, script, args, ctx);
    const env = envWords(p);
    // The script as add_job found it, or (for an --on-worker job) the command as given.
    msg = { op: 'remove_jobs', script: findScript(script, workDir()), command: script, args, ...(env.length ? { env: envOf(env) } : {}) };
  }
  const r = await request(ctx.dataDir, msg);
  const ids = r.ids as number[];
  ctx.out.write(ids.length ? `removed ${ids.length} job${ids.length === 1 ? '' : 's'}: ${ids.join(' ')}\n` : 'no waiting job to remove\n');
  return EXIT_OK;
}

async function cmdKill(p: Parsed, ctx: Ctx): Promise<number> {
  const ways = Number(Boolean(p.values.all)) + Number(p.values.tag !== undefined) + Number(p.positionals.length > 0);
  if (ways !== 1) throw usage(ways ? 'kill takes IDs, --tag TAG or --all, one of them' : 'kill needs IDs, --tag TAG or --all');
  const r = await request(ctx.dataDir, p.values.all ? { op: 'kill', all: true } : p.positionals.length ? { op: 'kill', ids: await idsOf(ctx, p.positionals) } : { op: 'kill', ...tagField(p) });
  const ids = r.ids as number[];
  ctx.out.write(ids.length ? `killing ${ids.length} job${ids.length === 1 ? '' : 's'}: ${ids.join(' ')}\n` : 'no job to kill\n');
  return EXIT_OK;
}

async function cmdRetry(p: Parsed, ctx: Ctx): Promise<number> {
  const byState = Boolean(p.values.failed || p.values.killed || p.values.tag !== undefined);
  if (byState && p.positionals.length) throw usage('retry takes IDs or --failed/--killed/--tag, not both');
  if (!byState && !p.positionals.length) throw usage('retry needs IDs, --failed, --killed or --tag TAG');
  const r = await request(ctx.dataDir, byState ? { op: 'retry', failed: p.values.failed, killed: p.values.killed, ...tagField(p) } : { op: 'retry', ids: await idsOf(ctx, p.positionals) });
  const ids = r.ids as number[], skipped = (r.skipped ?? []) as { id: number; why: string }[];
  ctx.out.write(ids.length ? `queued again: ${ids.join(' ')}\n` : 'no job to retry\n');
  for (const k of skipped) ctx.err.write(`not retried: ${k.why}\n`);
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
  const states = (p.values.state as string[] | undefined) ?? [];
  for (const st of states) if (!JOB_STATES.includes(st as JobState)) throw usage(`unknown state ${quoteForError(st)}`, `states are ${JOB_STATES.join(', ')}`);
  const state = states.length === 0 ? undefined : states.length === 1 ? states[0] : states;
  const now = Date.now(), c = color(useColor(ctx.out)), json = Boolean(p.values.json);
  let first = true, begun = false;
  // Nothing is printed before the server answers, so "no server" leaves stdout empty.
  const begin = () => {
    if (begun) return;
    begun = true;
    ctx.out.write(json ? '[' : `${'ID'.padStart(6)}  ${'STATE'.padEnd(7)}  ${'WORKER'.padEnd(15)}  ${'EXIT'.padEnd(11)}  TRIES  ${'QUEUED'.padEnd(11)}  RUNTIME  COMMAND\n`);
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
  const [id] = await idsOf(ctx, p.positionals);
  const follow = Boolean(p.values.follow);
  let file = '', offset = 0;
  const watch: { dir?: fs.FSWatcher } = {};
  // A log that cannot be read (a directory, a FIFO, a symlink in its place) is an error
  // once the request is over; until then it is not read again.
  let unreadable: string | null = null;
  const pump = () => {
    if (unreadable) return;
    let fd: number;
    try { fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK); } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') unreadable = cannotReadLog(file, e);
      return;
    }
    try {
      const buf = Buffer.allocUnsafe(1 << 16);
      let n: number;
      while ((n = fs.readSync(fd, buf, 0, buf.length, offset)) > 0) { ctx.out.write(buf.subarray(0, n)); offset += n; }
    } catch (e) {
      unreadable = cannotReadLog(file, e);
    } finally { fs.closeSync(fd); }
  };
  let told = false;
  const r = await (follow ? lastingRequest : request)(ctx.dataDir, { op: 'log', id, follow }, (m) => {
    const info = m.info as { path: string; waitsFor: string | null };
    file = info.path;
    if (info.waitsFor && !told) { told = true; ctx.err.write(`job ${id} has not started (${info.waitsFor}); its log follows once it does\n`); }
    pump();
    watch.dir?.close();
    try { watch.dir = fs.watch(path.dirname(file), (_ev, name) => { if (!name || name === path.basename(file)) pump(); }); } catch { /* no watch: final read only */ }
  });
  watch.dir?.close();
  if (!file) file = String(r.path);
  pump();
  if (unreadable) throw failure(unreadable);
  if (!fs.existsSync(file)) {
    // A job that never ran has no log; djs knows why (follow says it in its last line).
    const why = follow ? null : r.state === 'waiting' ? `it has not started (${String(r.waitsFor)})` : r.reason ? `it ended ${String(r.state)}: ${String(r.reason)}` : null;
    ctx.err.write(why ? `note: job ${id} has no log: ${visible(why)}\n` : `note: job ${id} has no log (yet): ${file}\n`);
  }
  if (!follow) return EXIT_OK;
  // How the job ended, and an exit code like wait's for it.
  const how = r.state === 'done' ? 'done' : r.state === 'removed' ? 'removed before it ran'
    : `${r.state}${r.reason ? ` (${r.reason})` : r.exitCode !== null && r.exitCode !== undefined ? ` (exit ${r.exitCode})` : ''}`;
  ctx.err.write(`job ${id} ended: ${how}\n`);
  return r.state === 'done' ? EXIT_OK : EXIT_FAILED;
}

export type WaitCounts = Record<JobState | 'total' | 'missing', number>;

/** wait's progress line, in the first of its forms (long to short) that fits `width`
 *  columns (cut to fit at the last). */
export function formatProgress(c: WaitCounts, rate: number, why: string | null, width: number): string {
  const ended = c.done + c.failed + c.killed + c.missing;
  const left = c.waiting + c.running;
  const eta = rate > 0 && left > 0 ? formatDuration((left / rate) * 1000) : '';
  const held = why ? ` — waiting: ${why}` : '';
  const forms = [
    `${ended}/${c.total} finished: ${c.done} done, ${c.failed} failed, ${c.killed} killed, ${c.running} running, ${c.waiting} waiting — ${rate.toFixed(1)} jobs/s${eta ? `, about ${eta} left` : ''}${held}`,
    `${ended}/${c.total} finished: ${c.done} done, ${c.failed} failed, ${c.killed} killed, ${c.running} running, ${c.waiting} waiting${eta ? `, ${eta} left` : ''}${held}`,
    `${ended}/${c.total} finished: ${c.done} done, ${c.failed + c.killed} failed/killed, ${c.running} running${eta ? `, ${eta} left` : ''}${held}`,
    `${ended}/${c.total}: ${c.done} ok ${c.failed + c.killed} bad ${c.running} run${eta ? ` ${eta}` : ''}${held}`,
  ];
  const fit = forms.find((f) => f.length <= width);
  return fit ?? (forms[forms.length - 1].slice(0, Math.max(1, width - 1)) + '…');
}

async function cmdWait(p: Parsed, ctx: Ctx): Promise<number> {
  if (p.values.all && p.positionals.length) throw usage('wait takes IDs or --all, not both');
  const ids = p.positionals.length ? await idsOf(ctx, p.positionals) : undefined;
  if (ids && p.values.tag !== undefined) throw usage('wait takes IDs or --tag TAG, not both');
  const tty = Boolean(ctx.err.isTTY);
  const t0 = Date.now();
  let firstEnded = -1, lastPlain = 0, lastWhy: string | null = null;
  let last: { c: WaitCounts; why: string | null } | null = null;
  const show = (c: WaitCounts, why: string | null, force: boolean) => {
    const ended = c.done + c.failed + c.killed + c.missing;
    if (firstEnded < 0) firstEnded = ended;
    const rate = (ended - firstEnded) / Math.max(0.001, (Date.now() - t0) / 1000);
    if (tty) ctx.err.write(`\r\x1b[K${formatProgress(c, rate, why, (ctx.err.columns || 80) - 1)}`);
    else if (force || Date.now() - lastPlain >= 10_000 || why !== lastWhy) { lastPlain = Date.now(); ctx.err.write(formatProgress(c, rate, why, Infinity) + '\n'); }
    lastWhy = why;
  };
  // Elsewhere than a terminal, a line every 10 s even when nothing changed (the server
  // sends changes only): a log shows the wait is alive.
  const every = tty ? null : setInterval(() => { if (last && Date.now() - lastPlain >= 10_000) show(last.c, last.why, true); }, 1000);
  every?.unref();
  const msg: Record<string, unknown> = { op: 'wait', ids, ...tagField(p), all: p.values.all === true || undefined };
  const r = await lastingRequest(ctx.dataDir, msg, (m) => {
    // The jobs this wait is for: asked for again by these ids if the server restarts.
    if (m.ranges) { msg.ranges = m.ranges; delete msg.tag; return; }
    if (!m.progress) return;
    last = { c: m.progress as WaitCounts, why: (m.why as string | undefined) ?? null };
    show(last.c, last.why, false);
  }).finally(() => { if (every) clearInterval(every); });
  type Counts = WaitCounts;
  const c = r.counts as Counts;
  if (tty) ctx.err.write('\r\x1b[K');
  ctx.err.write(`${c.done + c.failed + c.killed + c.missing}/${c.total} finished: ${c.done} done, ${c.failed} failed, ${c.killed} killed${c.missing ? `, ${c.missing} removed` : ''}\n`);
  return r.allDone ? EXIT_OK : EXIT_FAILED;
}

async function cmdClean(p: Parsed, ctx: Ctx): Promise<number> {
  const states = [...new Set((p.values.state as string[] | undefined) ?? [])];
  for (const s of states) if (!(FINISHED_STATES as readonly string[]).includes(s)) throw usage(`clean takes finished states, not ${quoteForError(s)}`, `states are ${FINISHED_STATES.join(', ')}`);
  const r = await request(ctx.dataDir, { op: 'clean', logs: Boolean(p.values.logs), ...tagField(p), ...(states.length ? { states } : {}) });
  // How many of each state: a failed job forgotten can no longer be retried.
  const by = r.states as Record<string, number> | undefined, n = Number(r.count);
  const parts = by ? FINISHED_STATES.filter((s) => by[s] > 0).map((s) => `${by[s]} ${s}`) : [];
  ctx.out.write(`forgot ${n} finished job${n === 1 ? '' : 's'}${parts.length ? ` (${parts.join(', ')})` : ''}${p.values.logs ? ' and their logs' : ''}\n`);
  return EXIT_OK;
}

async function cmdSetPriority(p: Parsed, ctx: Ctx): Promise<number> {
  const [n, ...rest] = p.positionals;
  if (n === undefined) throw usage('set_priority needs a PRIORITY', `usage: cli.ts ${COMMANDS.set_priority.synopsis}`);
  const priority = signedOption(n, 'priority');
  if ((p.values.tag !== undefined) === (rest.length > 0)) throw usage('set_priority takes IDs or --tag TAG, one of them');
  const r = await request(ctx.dataDir, { op: 'set_priority', priority, ...(rest.length ? { ids: await idsOf(ctx, rest) } : tagField(p)) });
  const ids = r.ids as number[];
  ctx.out.write(ids.length ? `priority ${priority}: ${ids.length} waiting job${ids.length === 1 ? '' : 's'}\n` : 'no waiting job to change\n');
  return EXIT_OK;
}

async function cmdPause(p: Parsed, ctx: Ctx, op: 'pause' | 'resume'): Promise<number> {
  const tag = p.values.tag === undefined ? undefined : tagOf(p.values.tag);
  const r = await request(ctx.dataDir, { op, ...(tag === undefined ? {} : { tag }), ...(p.values.ahead ? { ahead: true } : {}) });
  const what = tag === undefined ? 'the queue' : `tag ${tag}`;
  if (op === 'pause' && r.noJobs) ctx.out.write(`${r.changed ? 'paused' : 'already paused:'} ${what}: no job has tag ${tag} yet; jobs added with --tag ${tag} will wait (resume --tag ${tag})\n`);
  else ctx.out.write(`${r.changed ? (op === 'pause' ? 'paused' : 'resumed') : `already ${op === 'pause' ? 'paused' : 'running'}:`} ${what}${op === 'pause' ? ' (running jobs go on)' : ''}\n`);
  const still = (r.pausedTags as string[]).filter((t) => t !== tag);
  if (op === 'resume' && tag === undefined && still.length) ctx.err.write(`still paused: tag${still.length === 1 ? '' : 's'} ${still.join(', ')} (resume --tag TAG)\n`);
  return EXIT_OK;
}

/** load_status FILE: cli.py's state (its `status` output) into this server, at once. */
async function cmdLoadStatus(p: Parsed, ctx: Ctx): Promise<number> {
  if (p.positionals.length !== 1) throw usage('load_status needs one FILE', 'make it with: ./cli.py status > st.json');
  const name = p.positionals[0], cwd = workDir();
  let status: unknown;
  try { status = JSON.parse(fs.readFileSync(name === '-' ? 0 : bytesOf(name), 'utf8')); } catch (e) {
    const err = e as NodeJS.ErrnoException;
    throw failure(err.code ? `cannot read ${quoteForError(name)}: ${err.code}` : `${quoteForError(name)} is not JSON: ${err.message}`, err.code ? undefined : 'make it with: ./cli.py status > st.json');
  }
  parseClipyStatus(status, cwd); // the server checks too; this fails before any I/O
  const r = await request(ctx.dataDir, { op: 'load_status', cwd, status, skipCheck: Boolean(p.values.skip_ssh_auth_check), environ: clientEnviron() });
  const hosts = (k: string) => r[k] as string[];
  const plural = (n: number, what: string) => `${n} ${what}${n === 1 ? '' : 's'}`;
  if (hosts('added').length) ctx.out.write(`added ${plural(hosts('added').length, 'worker')}: ${hosts('added').join(' ')}\n`);
  if (hosts('present').length) ctx.out.write(`kept ${plural(hosts('present').length, 'worker')} already here, with their settings: ${hosts('present').join(' ')}\n`);
  if (hosts('removing').length) ctx.out.write(`left out ${plural(hosts('removing').length, 'worker')} cli.py was removing: ${hosts('removing').join(' ')}\n`);
  const count = Number(r.count), first = Number(r.first);
  ctx.out.write(count ? `queued ${plural(count, 'waiting job')}: ids ${first}${count > 1 ? `-${first + count - 1}` : ''}, in the waitlist's order\n` : 'queued no jobs: the waitlist is empty\n');
  const command = (argv: string[]) => [path.relative(cwd, argv[0]).startsWith('..') ? argv[0] : './' + path.relative(cwd, argv[0]), ...argv.slice(1)].map(shellQuote).join(' ');
  for (const h of r.held as (ClipyRunning & { host: string; env: string[] })[]) {
    ctx.out.write(asCalled(`not added: worker ${h.host}, which cli.py job ${h.id} (pid ${h.pid}) still runs on; djs leaves that job alone (its output: ${h.log || 'unknown'}). ` +
      `Once it ends: cli.ts add_slave ${h.env.map((e) => `-e ${shellQuote(e)} `).join('')}${shellQuote(h.host)}\n`));
  }
  for (const e of r.ended as (ClipyRunning & { host: string })[]) {
    ctx.out.write(asCalled(`not run again: cli.py job ${e.id} on ${e.host} (pid ${e.pid} has ended; cli.py kept no exit code; its output: ${e.log || 'unknown'}). To run it again: cli.ts add_job ${e.jobEnv.map((v) => `-e ${shellQuote(v)} `).join('')}${command(e.argv)}\n`));
  }
  if (r.warning) ctx.err.write(`warning: ${r.warning}\n`);
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
  retries: { type: 'string' }, timeout: { type: 'string' }, 'retry-delay': { type: 'string' }, tag: { type: 'string', multiple: true }, priority: { type: 'string' },
  after: { type: 'string', multiple: true }, 'after-any': { type: 'string', multiple: true },
  env: { type: 'string', short: 'e', multiple: true }, 'env,-e': { type: 'string', multiple: true },
  slots: { type: 'string' }, gpus: { type: 'string' }, require: { type: 'string', multiple: true }, avoid: { type: 'string', multiple: true },
  host: { type: 'string', multiple: true },
  'on-worker': { type: 'boolean' }, workdir: { type: 'string' }, name: { type: 'string' },
  transfer: { type: 'string', multiple: true }, return: { type: 'string', multiple: true }, 'return-optional': { type: 'boolean' }, cleanup: { type: 'boolean' },
};
const JOB_SYNOPSIS = '[--retries N] [--timeout SECONDS] [--retry-delay S] [--tag TAG]... [--priority N] [--after ID[,ID]]... [--after-any ID[,ID]]... [-e|--env NAME=VALUE]... ' +
  '[--slots K] [--gpus G] [--require LABEL]... [--avoid LABEL]... [--host HOST]... [--on-worker [--workdir DIR] [--transfer FILE]... [--return FILE]... [--return-optional] [--cleanup]] [--name NAME]';
const TAG: OptSpec = { tag: { type: 'string' } };
const COMMANDS: Record<string, Command> = {
  start: { run: cmdStart, options: { 'log-dir': { type: 'string' }, log_dir: { type: 'string' }, 'kill-grace': { type: 'string' }, detach: { type: 'boolean', short: 'd' }, http: { type: 'string' } }, synopsis: 'start [--detach] [--log-dir DIR] [--kill-grace SECONDS] [--http [HOST:]PORT] [DATA_DIR] [LOG_DIR]' },
  stop: { run: cmdStop, options: {}, noArgs: true, synopsis: 'stop' },
  dashboard: { run: cmdDashboard, options: { 'new-token': { type: 'boolean' } }, noArgs: true, synopsis: 'dashboard [--new-token]' },
  add_slave: {
    run: cmdAddWorkers,
    options: { skip_ssh_auth_check: { type: 'boolean' }, 'requeue-on-down': { type: 'boolean' }, slots: { type: 'string' }, gpus: { type: 'string' }, label: { type: 'string', multiple: true }, env: { type: 'string', short: 'e', multiple: true }, 'env,-e': { type: 'string', multiple: true } },
    synopsis: 'add_slave [--skip_ssh_auth_check] [--requeue-on-down] [--slots N|auto] [--gpus N] [--label L[,L]]... [-e|--env NAME=VALUE]... HOST[:SLOTS|:auto]...',
  },
  remove_slave: { run: cmdRemoveWorkers, options: { wait: { type: 'boolean' }, kill: { type: 'boolean' } }, synopsis: 'remove_slave [--wait|--kill] HOST...' },
  add_job: { run: cmdAddJob, options: JOB_OPTIONS, jobArgs: true, synopsis: `add_job ${JOB_SYNOPSIS} SCRIPT [ARGS...] [::: V... [::: W...]]` },
  add_jobs: { run: cmdAddJobs, options: JOB_OPTIONS, synopsis: `add_jobs ${JOB_SYNOPSIS} FILE|-` },
  remove_job: {
    run: cmdRemoveJob, options: { id: { type: 'boolean' }, ...TAG, env: { type: 'string', short: 'e', multiple: true }, 'env,-e': { type: 'string', multiple: true } }, jobArgs: true,
    synopsis: 'remove_job [-e|--env NAME=VALUE]... SCRIPT [ARGS...] | remove_job --id ID... | remove_job --tag TAG',
  },
  kill: { run: cmdKill, options: { all: { type: 'boolean' }, ...TAG }, synopsis: 'kill ID... | kill --tag TAG | kill --all' },
  retry: { run: cmdRetry, options: { failed: { type: 'boolean' }, killed: { type: 'boolean' }, ...TAG }, synopsis: 'retry ID... | retry [--failed] [--killed] [--tag TAG]' },
  set_priority: { run: cmdSetPriority, options: TAG, negatives: true, synopsis: 'set_priority N ID... | set_priority N --tag TAG' },
  pause: { run: (p, ctx) => cmdPause(p, ctx, 'pause'), options: { ...TAG, ahead: { type: 'boolean' } }, noArgs: true, synopsis: 'pause [--tag TAG [--ahead]]' },
  resume: { run: (p, ctx) => cmdPause(p, ctx, 'resume'), options: TAG, noArgs: true, synopsis: 'resume [--tag TAG]' },
  policy: { run: cmdPolicy, options: {}, synopsis: 'policy [spread|pack|sequential|random]' },
  status: { run: cmdStatus, options: { json: { type: 'boolean' }, ...TAG }, noArgs: true, synopsis: 'status [--tag TAG] [--json]' },
  list: { run: cmdList, options: { state: { type: 'string', multiple: true }, json: { type: 'boolean' }, ...TAG }, noArgs: true, synopsis: 'list [--state STATE]... [--tag TAG] [--json]' },
  log: { run: cmdLog, options: { follow: { type: 'boolean', short: 'f' } }, synopsis: 'log ID [-f|--follow]' },
  wait: { run: cmdWait, options: { all: { type: 'boolean' }, ...TAG }, synopsis: 'wait [ID... | --tag TAG | --all]' },
  clean: { run: cmdClean, options: { logs: { type: 'boolean' }, ...TAG, state: { type: 'string', multiple: true } }, noArgs: true, synopsis: 'clean [--logs] [--tag TAG] [--state done|failed|killed]...' },
  load_status: { run: cmdLoadStatus, options: { skip_ssh_auth_check: { type: 'boolean' } }, synopsis: 'load_status [--skip_ssh_auth_check] FILE|-   (the JSON of cli.py status)' },
};
const ALIASES: Record<string, string> = { add_worker: 'add_slave', remove_worker: 'remove_slave' };

/** What `help COMMAND` and `COMMAND --help` print besides the synopsis: what it does,
 *  each option (every option in COMMANDS has a line here), and examples. */
const COMMAND_HELP: Record<string, { about: string; options: [string, string][]; examples: string[] }> = {
  start: {
    about: 'Runs the server on a data dir. Its settings (the options and variables below) are kept in the data dir and used by the next start unless given again; status shows them.',
    options: [
      ['-d, --detach', 'run in the background (output to LOG_DIR/server.log); return once it answers'],
      ['--log-dir DIR (--log_dir)', 'where job logs go (env DJS_LOG_DIR; first default ./logs)'],
      ['--kill-grace SECONDS', 'from SIGTERM to SIGKILL when a job is stopped (env DJS_KILL_GRACE; first default 10)'],
      ['--http [HOST:]PORT', 'also serve the dashboard, the JSON API and /metrics (env DJS_HTTP; on 127.0.0.1 unless a host is given; empty: off)'],
      ['DATA_DIR, LOG_DIR', 'the data dir and log dir, as --data-dir and --log-dir'],
    ],
    examples: ['cli.ts start --detach', 'DJS_SSH_CONFIG=~/.ssh/lab_config cli.ts start -d   # kept for later starts'],
  },
  stop: { about: 'Stops the server; running jobs keep running and the next start adopts them.', options: [], examples: ['cli.ts stop'] },
  dashboard: {
    about: 'Prints the URL of the running server\'s dashboard, with its access token after # (http://127.0.0.1:PORT/#token=...; the page keeps it in memory and never sends it: it signs in by challenge and response), or says how to turn it on (start it with --http).',
    options: [['--new-token', 'make a new access token (DATA_DIR/http.token): the old one, and every page and stream signed in with it, is refused at once; prints the new URL']],
    examples: ['cli.ts dashboard', 'cli.ts dashboard --new-token', 'cli.ts stop && cli.ts start -d --http 8080   # kept for later starts'],
  },
  add_slave: {
    about: 'Adds workers (alias add_worker): hosts, each with a number of slots. First checks, in parallel, that ssh logs in to every host with the server\'s ssh settings, and adds none if any fails. Its checks run with this shell\'s environment (SLURM_CONF, say), as jobs do with their add_job\'s. A known host added again takes only what this add_slave gives (left-out labels, GPUs, environment are dropped); what changed is printed.',
    options: [
      ['--skip_ssh_auth_check', 'add without the ssh check; such workers are never probed'],
      ['--requeue-on-down', 'when the worker goes down (a failed check, or heartbeats unanswered), stop its running jobs and queue them again at once'],
      ['--slots N|auto', 'slots of hosts given without :SLOTS (default 1; auto: nproc, read over ssh)'],
      ['--gpus N', 'GPUs of each host (indices 0..N-1; with auto, nvidia-smi -L counts them; a Slurm partition must have N in sinfo\'s gres)'],
      ['--label L[,L]', 'labels that jobs can --require or --avoid (repeatable)'],
      ['-e, --env NAME=VALUE (--env,-e=NAME=VALUE)', 'environment of every job on these workers (repeatable)'],
    ],
    examples: ['cli.ts add_slave node1:8 node2:8 alice@gpu-box:2', 'cli.ts add_slave --skip_ssh_auth_check local1:2'],
  },
  remove_slave: {
    about: 'Removes workers (alias remove_worker). A busy worker needs --wait or --kill.',
    options: [['--wait', 'let its jobs finish, start nothing new there, return once it is gone'], ['--kill', 'stop its jobs (they are queued again) and remove it']],
    examples: ['cli.ts remove_slave --wait node3'],
  },
  add_job: {
    about: 'Queues one job and prints its id. Everything after SCRIPT belongs to the job, even words starting with - (a word that spells an option of djs, like --tag X, gets a warning). The job runs with this shell\'s environment (an activated virtualenv too; not PWD, TERM or the ssh agent, which is the server\'s).',
    options: [
      ['--retries N', 'run a failed job again up to N times, on another worker when one is free'],
      ['--timeout SECONDS', 'stop a job running longer; it ends failed (reason timeout)'],
      ['--retry-delay SECONDS', 'wait before a retry: this long before the first, doubling after (default 2)'],
      ['--tag TAG', 'name the campaign (repeatable); status, list, wait, kill, retry, clean take --tag too'],
      ['--priority N', 'higher starts first (default 0; may be negative)'],
      ['--after ID[,ID]', 'start only once those jobs ended done (repeatable); if one fails, this one fails'],
      ['--after-any ID[,ID]', 'start once those jobs ended, whatever the result (repeatable)'],
      ['-e, --env NAME=VALUE (--env,-e=NAME=VALUE)', 'more environment for the job (repeatable)'],
      ['--slots K', 'K slots of one worker (env SLAVE_SLOTS lists them)'],
      ['--gpus G', 'G GPUs of one worker (env SLAVE_GPUS lists them)'],
      ['--require LABEL', 'only workers with this label (repeatable)'],
      ['--avoid LABEL', 'no worker with this label (repeatable)'],
      ['--host HOST', 'only one of these workers (repeatable)'],
      ['--on-worker', 'SCRIPT is a command to run on the worker itself (ssh: through its shared connection, perl needed there; local/localN: here; Slurm: in srun), in the same directory path, with the job\'s environment; no script needed on a shared disk'],
      ['--workdir DIR', 'where an --on-worker command runs (default: the current directory\'s path; ~/DIR: in the worker\'s home)'],
      ['--transfer FILE', 'no shared disk: send FILE or directory (rsync, through the same ssh) to the job\'s own directory on the worker, ~/.djs-work/$DJS_RUN_NAME, where the command then runs (repeatable; --on-worker, ssh workers; local and Slurm ones run in place)'],
      ['--return FILE', 'bring FILE (or directory) back from the job\'s directory into the current directory after the command ends, failed or not; missing: the job fails, exit 253 (repeatable)'],
      ['--return-optional', 'a missing --return file is not an error'],
      ['--cleanup', 'remove the job\'s directory on the worker afterwards'],
      ['--name NAME', 'name the job ({1} {2} {} filled from a sweep); log, kill, wait, retry take a name that is unique'],
      ['::: V... [::: W...]', 'a sweep: one job per combination; {1}, {2} ({} = {1}) in ARGS are replaced, else the values are appended'],
    ],
    examples: ['cli.ts add_job --on-worker --name lr{1} python train.py --lr {1} ::: 0.1 0.01', 'cli.ts add_job --retries 2 ./example_job.sh "data/run 1.txt"', 'cli.ts add_job --tag prep ./example_job.sh ::: data/*.txt', 'id=$(cli.ts add_job ./example_job.sh data/a.txt)'],
  },
  add_jobs: {
    about: 'Queues one job per line of FILE (- for standard input): SCRIPT ARGS..., quoted like a shell (\'...\', "...", \\, $\'...\'), # comments. Prints the ids.',
    options: [
      ['--retries N', 'as add_job'], ['--timeout SECONDS', 'as add_job'], ['--retry-delay SECONDS', 'as add_job'], ['--tag TAG', 'as add_job'],
      ['--priority N', 'as add_job'], ['--after ID[,ID]', 'as add_job'], ['--after-any ID[,ID]', 'as add_job'], ['-e, --env NAME=VALUE (--env,-e=NAME=VALUE)', 'as add_job'],
      ['--slots K', 'as add_job'], ['--gpus G', 'as add_job'], ['--require LABEL', 'as add_job'], ['--avoid LABEL', 'as add_job'], ['--host HOST', 'as add_job'],
      ['--on-worker', 'as add_job: each line is a command run on the worker'], ['--workdir DIR', 'as add_job'], ['--name NAME', 'as add_job: every job of the file gets it'],
      ['--transfer FILE', 'as add_job'], ['--return FILE', 'as add_job'], ['--return-optional', 'as add_job'], ['--cleanup', 'as add_job'],
    ],
    examples: ["printf './example_job.sh %q\\n' data/*.txt | cli.ts add_jobs -"],
  },
  remove_job: {
    about: 'Removes waiting jobs: every one with exactly that script and those args, or those ids.',
    options: [['--id', 'the words are job ids'], ['--tag TAG', 'every waiting job of that tag'], ['-e, --env NAME=VALUE (--env,-e=NAME=VALUE)', 'only jobs with exactly these --env settings (repeatable)']],
    examples: ['cli.ts remove_job ./example_job.sh data/a.txt', 'cli.ts remove_job --id 12 13'],
  },
  kill: {
    about: 'Stops jobs: SIGTERM to the job\'s process group, SIGKILL after the kill grace; they end killed. A waiting job is killed without running.',
    options: [['--all', 'every running and waiting job'], ['--tag TAG', 'every running and waiting job of that tag']],
    examples: ['cli.ts kill 7', 'cli.ts kill --all'],
  },
  retry: {
    about: 'Queues finished jobs again (same id, a new attempt).',
    options: [['--failed', 'every failed job'], ['--killed', 'every killed job'], ['--tag TAG', 'only that tag\'s (alone: its failed and killed jobs)']],
    examples: ['cli.ts retry 7', 'cli.ts retry --failed'],
  },
  status: {
    about: 'Counts by state, every worker with its slot bar and running jobs, the head of the queue, and the server\'s settings.',
    options: [['--json', 'one JSON object (see the README)'], ['--tag TAG', 'that tag\'s progress line only']],
    examples: ['cli.ts status'],
  },
  list: {
    about: 'One row per job: id, state, worker, exit code or why it failed, attempts, time queued, run time, command.',
    options: [['--state STATE', 'only jobs in that state (repeatable): waiting, running, done, failed, killed'], ['--tag TAG', 'only jobs of that tag'], ['--json', 'an array of jobs (see the README)']],
    examples: ['cli.ts list --state failed'],
  },
  log: {
    about: 'Prints a job\'s output.',
    options: [['-f, --follow', 'follow it until the job ends, then say how it ended; exit 0 if done, 1 otherwise (like wait)']],
    examples: ['cli.ts log -f 42'],
  },
  wait: {
    about: 'Waits until jobs have ended: those ids, or (without ids) the jobs not ended when it was called. Exit 0 if all ended done, 1 otherwise. Shows a progress line, and why jobs do not start.',
    options: [['--all', 'every job the data dir has'], ['--tag TAG', 'the jobs of that tag when wait is called (the same after a server restart)']],
    examples: ['cli.ts wait && echo "all done"', 'cli.ts wait 40 41 42 || cli.ts list --state failed'],
  },
  set_priority: {
    about: 'Changes the priority of waiting jobs (higher starts first).',
    options: [['--tag TAG', 'every waiting job of that tag']],
    examples: ['cli.ts set_priority 10 41 42', 'cli.ts set_priority -1 --tag backlog'],
  },
  pause: {
    about: 'Stops starting new jobs (all, or a tag\'s); running jobs go on. resume undoes it.',
    options: [['--tag TAG', 'only that tag\'s jobs (a tag no job has is refused, as a typo)'], ['--ahead', 'with --tag: pause it even though no job has it yet, so that jobs added with it wait']],
    examples: ['cli.ts pause', 'cli.ts pause --tag lr-sweep', 'cli.ts pause --tag nightly --ahead   # before queuing into it'],
  },
  resume: {
    about: 'Starts new jobs again after pause (all, or a tag\'s).',
    options: [['--tag TAG', 'only that tag\'s jobs']],
    examples: ['cli.ts resume'],
  },
  policy: {
    about: 'Shows or sets which free worker gets a job: spread (the most free slots; also smart), pack (the fewest; also frugal), sequential (the first added), random.',
    options: [],
    examples: ['cli.ts policy', 'cli.ts policy pack'],
  },
  clean: {
    about: 'Forgets finished jobs (all of them: done, failed and killed) and says how many of each; ids are never reused. A forgotten job cannot be retried: --state done keeps the failed ones for retry --failed.',
    options: [['--logs', 'also delete their logs, and those of jobs forgotten earlier'], ['--tag TAG', 'only finished jobs of that tag'], ['--state STATE', 'only jobs in that state: done, failed or killed (repeatable)']],
    examples: ['cli.ts clean --logs', 'cli.ts clean --state done'],
  },
  load_status: {
    about: "Loads the state of cli.py (the JSON its status printed) into this server, all or nothing: its slaves as workers of 1 slot with their envs, its waitlist in order with its envs. A job cli.py still runs is left alone, and its worker left out until it ends.",
    options: [['--skip_ssh_auth_check', 'add the workers without the ssh check, as add_slave']],
    examples: ['./cli.py status > st.json; ./cli.py stop; mv .data .data.clipy; cli.ts start -d; cli.ts load_status st.json'],
  },
};

/** The version of this program. */
export const VERSION = '0.1.0';

/** The name among `names` nearest to `word` (- and _ alike), if near enough to be a typo,
 *  or else the nearest that begins as `word` does but for its last letter (--retry:
 *  --retries, not --retry-delay). */
export function nearest(word: string, names: string[]): string | undefined {
  const norm = (w: string) => w.toLowerCase().replace(/-/g, '_');
  const stem = word.length >= 4 ? norm(word).slice(0, -1) : null;
  // The word's plural or singular first (--retry: --retries, though --return is one edit nearer).
  const w = norm(word), forms = [w + 's', w + 'es', w.replace(/y$/, 'ies'), w.replace(/e?s$/, ''), w.replace(/ies$/, 'y')];
  const other = names.some((name) => norm(name) === w) ? undefined : names.find((name) => forms.includes(norm(name)));
  if (other !== undefined) return other;
  let best: string | undefined, bestD = Infinity, begun: string | undefined, begunD = Infinity;
  for (const name of names) {
    const d = editDistance(norm(word), norm(name));
    if (d < bestD) { best = name; bestD = d; }
    if (stem !== null && norm(name).startsWith(stem) && d < begunD) { begun = name; begunD = d; }
  }
  return best !== undefined && bestD <= Math.max(2, Math.floor(word.length / 3)) ? best : begun;
}

/** Levenshtein distance, with a swap of two neighbours counting as one edit. */
function editDistance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => [i, ...new Array(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0][j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i][j] = Math.min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.length][b.length];
}

/** `help COMMAND`, `COMMAND --help`: synopsis, what it does, options, examples. */
export function commandHelp(name: string): string {
  const cmd = COMMANDS[name], h = COMMAND_HELP[name];
  const alias = Object.keys(ALIASES).find((a) => ALIASES[a] === name);
  const lines = [`usage: cli.ts ${cmd.synopsis}`, '', h.about];
  if (alias) lines.push(`Also called ${alias}.`);
  const options: [string, string][] = [...h.options, ['--data-dir DIR', 'the server\'s data dir (env DJS_DATA_DIR; default: the nearest .data here or above)']];
  // An option too long for its column has its words on the next line.
  lines.push('', 'options:', ...options.map(([o, what]) => (o.length < 24 ? `  ${o.padEnd(24)}${what}` : `  ${o}\n  ${''.padEnd(24)}${what}`)));
  lines.push('', 'example:', ...h.examples.map((e) => `  ${e}`));
  return lines.join('\n') + '\n';
}

/** What COMMAND_HELP misses: commands, options of COMMANDS it does not describe,
 *  commands without an example (the tests want none). */
export function undocumentedOptions(): string[] {
  const out: string[] = [];
  for (const [name, cmd] of Object.entries(COMMANDS)) {
    const h = COMMAND_HELP[name];
    if (!h) { out.push(name); continue; }
    const described = h.options.map((o) => o[0]).join(' ');
    for (const opt of Object.keys(cmd.options)) if (!described.includes(`--${opt}`)) out.push(`${name} --${opt}`);
    if (!h.examples.length) out.push(`${name}: no example`);
  }
  return out;
}

const unknownCommand = (word: string) => {
  const near = nearest(word, [...Object.keys(COMMANDS), ...Object.keys(ALIASES), 'help']);
  return usage(`unknown command ${quoteForError(word)}`, near ? `did you mean: cli.ts ${near}?` : `commands: ${Object.keys(COMMANDS).join(', ')} (see: cli.ts help)`);
};

/** The environment variables the program reads (the header and the README list the same). */
const ENVIRONMENT: [string, string][] = [
  ['DJS_DATA_DIR', 'the data dir, as --data-dir (default: the nearest .data here or above)'],
  ['DJS_LOG_DIR', 'start, kept: the log dir, as --log-dir (first default ./logs)'],
  ['DJS_KILL_GRACE', `start, kept: seconds from SIGTERM to SIGKILL, as --kill-grace (default ${initialOf('DJS_KILL_GRACE')})`],
  ['DJS_HTTP', 'start, kept: serve the dashboard, API and metrics on [HOST:]PORT, as --http (empty: off)'],
  ['DJS_SSH_CONFIG', 'start, kept: an ssh config file for checks, probes and jobs (ssh -F)'],
  ['DJS_SSH_OPTIONS', 'start, kept: extra ssh words for checks and probes; jobs get it'],
  ['DJS_SSH_TIMEOUT', `start, kept: ssh connect timeout, seconds (default ${initialOf('DJS_SSH_TIMEOUT')}); jobs get it`],
  ['DJS_PROBE_BACKOFF_MAX', `start, kept: longest wait between probes of a down worker, s (default ${initialOf('DJS_PROBE_BACKOFF_MAX')})`],
  ['DJS_SLURM_CHECK', `start, kept: how often an up Slurm worker (slurm:PARTITION) is asked with sinfo, s (default ${initialOf('DJS_SLURM_CHECK')})`],
  ['DJS_SSH_SHARED', 'start, kept: 1 (default): one shared ssh connection per worker for checks and jobs; 0: none'],
  ['DJS_SSH_SESSIONS', `start, kept: slots of a worker that share one ssh connection (default ${initialOf('DJS_SSH_SESSIONS')}; see sshd MaxSessions)`],
  ['DJS_HEARTBEAT', `start, kept: seconds between checks of busy workers (default ${initialOf('DJS_HEARTBEAT')}; down on a failed check or ${HEARTBEAT_MISSES} missed; 0: off)`],
  ['DJS_SNAPSHOT_MIN_BYTES', 'start: journal size that calls for a snapshot (default 32 MiB; for tests)'],
  ['DJS_MAX_CONNECTIONS', 'start: client connections at once; the longest idle goes first (default: what the open-files limit leaves, at most 1000)'],
  ['DJS_CLIENT_BYTES', 'start: bytes held for all clients together, each way: unread answers, unfinished requests (default 256 MiB, or 1/8 of the heap if less)'],
  ['NO_COLOR', 'no colours in status and list'],
];

function helpText(): string {
  return `usage: cli.ts [--data-dir DIR] COMMAND [OPTIONS] [ARGS]\n\ncommands (cli.ts help COMMAND, or COMMAND --help, for more):\n${Object.values(COMMANDS).map((c) => `  ${c.synopsis}`).join('\n')}\n\n` +
    `--data-dir DIR (env DJS_DATA_DIR; default: the nearest .data in this directory or above, else ./.data)\n` +
    `selects the server on every command. --version prints the version.\n` +
    `cli.py's spellings work too: --server_data_dir, --log_dir, --env,-e=NAME=VALUE.\n` +
    `environment:\n${ENVIRONMENT.map(([name, what]) => `  ${name.padEnd(23)}${what}`).join('\n')}\n` +
    `"kept": start keeps the value in the data dir; later starts use it unless given another.\n` +
    `jobs run with the environment of the add_job that queued them, plus JOB_ID, SLAVE_IP, DJS_RUN_NAME (a name\n` +
    `no other server, job or run shares) and more (README: Jobs); a worker's checks with its add_slave's.\n` +
    `exit codes: 0 ok, 1 failed, 2 usage error, 3 no server running.\n`;
}

// ============================================================================
// main: parse, run, exit through one gate
// ============================================================================

/** The name hints give this program: the one it was called by (`djs` through a symlink
 *  on PATH), else cli.ts. Set from DJS_PROG (see BOOTSTRAP) or argv[1] when run. */
let progName = 'cli.ts';

/** Text for the user with `cli.ts` (or `./cli.ts`) as a command word, in hints and
 *  examples, in the name this program was called by. */
export function asCalled(text: string, name = progName): string {
  if (name === 'cli.ts') return text;
  return text.replace(/(^|[\s(:;,`"'])(?:\.\/)?cli\.ts(?= )/gm, (_m, before: string) => before + shellQuote(name));
}

/** stderr with its lines in the name this program was called by (asCalled). */
function calledStream(stream: NodeJS.WriteStream): NodeJS.WriteStream {
  if (progName === 'cli.ts') return stream;
  const s = Object.create(stream) as NodeJS.WriteStream;
  const write = stream.write.bind(stream) as (chunk: unknown, ...rest: unknown[]) => boolean;
  s.write = ((chunk: unknown, ...rest: unknown[]) => write(typeof chunk === 'string' ? asCalled(chunk) : chunk, ...rest)) as NodeJS.WriteStream['write'];
  return s;
}

/** The one exit: prints an error (one line, plus a hint) and returns the exit code. */
function reportError(e: unknown, err: NodeJS.WriteStream): number {
  const u = asUserError(e);
  err.write(`error: ${u.message}\n`);
  for (const line of u.hint?.split('\n') ?? []) err.write(`hint: ${line}\n`);
  return u.code;
}

export async function main(argv: string[]): Promise<number> {
  const err = calledStream(process.stderr), out = process.stdout;
  try {
    const { tokens } = parseArgs({ args: argv, options: GLOBAL_OPTIONS, strict: false, allowPositionals: true, tokens: true });
    const cmdToken = tokens.find((t) => t.kind === 'positional');
    const globals = parseCommand(cmdToken ? argv.slice(0, cmdToken.index) : argv, { version: { type: 'boolean', short: 'V' } }, false);
    if (globals.values.version) { out.write(`djs ${VERSION}\n`); return EXIT_OK; }
    if (cmdToken?.value === 'help' && !globals.values.help) {
      const rest = argv.slice(cmdToken.index + 1).filter((a) => !a.startsWith('-'));
      if (rest.length) {
        const name = ALIASES[rest[0]] ?? rest[0];
        if (!COMMANDS[name]) throw unknownCommand(rest[0]);
        out.write(asCalled(commandHelp(name)));
        return EXIT_OK;
      }
    }
    if (!cmdToken || globals.values.help || cmdToken.value === 'help') {
      const asked = Boolean(cmdToken || globals.values.help);
      (asked ? out : err).write(asCalled(helpText()));
      return asked ? EXIT_OK : EXIT_USAGE;
    }
    if (globals.positionals.length) throw usage(`unexpected ${quoteForError(globals.positionals[0])}`);
    const name = ALIASES[cmdToken.value] ?? cmdToken.value;
    const cmd = COMMANDS[name];
    if (!cmd) throw unknownCommand(cmdToken.value);
    const parsed = parseCommand(argv.slice(cmdToken.index + 1), cmd.options, cmd.jobArgs ?? false, cmd.negatives, name);
    if (parsed.values.help) { out.write(asCalled(commandHelp(name))); return EXIT_OK; }
    if (cmd.noArgs && parsed.positionals.length) throw usage(`${name} takes no arguments, not ${quoteForError(parsed.positionals[0])}`, `usage: cli.ts ${cmd.synopsis}`);
    const named = (parsed.values['data-dir'] ?? parsed.values.server_data_dir ?? globals.values['data-dir'] ?? globals.values.server_data_dir ?? process.env.DJS_DATA_DIR) as string | undefined;
    const dataDir = named !== undefined ? path.resolve(named) : findDataDir(process.cwd());
    return await cmd.run(parsed, { dataDir, out, err, searched: named === undefined });
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
  // argv[1] is the plain-JS copy (BOOTSTRAP) in a server that start --detach started: not a name anyone typed.
  const argv1 = process.argv[1] && !/[\\/]\.cache[\\/]djs[\\/]cli-[^/]*\.mjs$/.test(process.argv[1]) ? process.argv[1] : '';
  progName = path.basename(process.env.DJS_PROG || argv1 || 'cli.ts');
  delete process.env.DJS_PROG; // neither the server nor its jobs inherit it
  process.stdout.on('error', (e: NodeJS.ErrnoException) => { if (e.code === 'EPIPE') process.exit(0); });
  main(rawArgs()).then((code) => {
    if (code >= 0) process.exitCode = code;
  });
}
