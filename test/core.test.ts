// Tier 1: the pure core of cli.ts, fed literal states and events with a fixed clock,
// plus the journal (loadState, Journal) against real temporary directories.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import {
  applyEvent, attemptsOf, plan, newRuntime, pauseStarts, effectsOf, launchRecord, type Runtime, formatStatus,
  decideAddJobs, decideRemoveJobs, decideKill, decideRetry, decideClean, decideAddWorkers, decideRemoveWorkers,
  type Decision, type DecideContext, type Request, Journal, jobView, loadState, MAX_REQUEUES, newState, parseJobsFile,
  parseWorkerArg, planStarts, PROBE_BACKOFF_MAX_MS, PROBE_BACKOFF_MIN_MS, splitWords, statusView, UserError,
  validateHost, waitingJobs, JOB_STATES, type Event, type Job, type JobState, type State, type KillReason,
  commandText, idsNamed, sweepValues, fillPlaceholders, onWorkerLaunch, onWorkerInput, ON_WORKER_LINE, srunWords, isLocalWorker, workdirOf, nameOf, ON_WORKER_MAX_BYTES,
  admits, lineSplitter, textOf, bytesOf, shellQuote, checkSweep, sweepBytes, MAX_ADD_BYTES, manySlotsWarning, sweepJobs, decideSetPriority, decidePolicy, parseSize, needOf, describeNeed, PLAIN_NEED, decidePause, envOf, waitReason, queueReason, splitSweep, whyHeld,
} from '../cli.ts';
import { prng } from './server.ts';

const T0 = Date.UTC(2025, 0, 1, 12, 0, 0);
const busy = (probing: string[], killSent: number[]): Runtime => ({ ...newRuntime(), probing: new Set(probing), killSent: new Set(killSent) });

// ---- helpers -----------------------------------------------------------------

/** Checks what must hold after every event: counts are a recount of job states; every
 *  running job holds exactly one slot of an existing worker; every taken slot holds a
 *  running job; the queue yields exactly the waiting jobs, once each. */
function checkInvariants(st: State): void {
  const recount: Record<JobState, number> = { waiting: 0, running: 0, done: 0, failed: 0, killed: 0 };
  for (const [id, j] of st.jobs) {
    assert.equal(j.id, id);
    assert.ok(JOB_STATES.includes(j.state), `job ${id} has state ${j.state}`);
    assert.ok(id < st.nextId, `job ${id} is not below nextId ${st.nextId}`);
    recount[j.state]++;
  }
  assert.deepEqual(st.counts, recount, 'counts equal a recount of job states');

  const seen = new Map<number, number>();
  for (const w of st.workers.values()) {
    assert.ok(w.running.length >= w.slots, `worker ${w.host} has a slot array shorter than its slots`);
    w.running.forEach((id, slot) => {
      if (id === 0) return;
      const j = st.jobs.get(id);
      assert.ok(j, `worker ${w.host} slot ${slot} holds unknown job ${id}`);
      assert.equal(j.state, 'running', `worker ${w.host} slot ${slot} holds job ${id} which is ${j.state}`);
      assert.equal(j.worker, w.host);
      assert.ok((j.slots ?? [j.slot]).includes(slot), `job ${id} in slot ${slot} of ${w.host} does not list it`);
      seen.set(id, (seen.get(id) ?? 0) + 1);
    });
    w.gpuJobs.forEach((id, g) => {
      if (id === 0) return;
      const j = st.jobs.get(id);
      assert.ok(j && j.state === 'running' && j.worker === w.host && (j.gpus ?? []).includes(g), `GPU ${g} of ${w.host} holds job ${id}, which does not hold it`);
    });
    if (w.state === 'draining') assert.ok(w.running.some(Boolean), `draining worker ${w.host} has no jobs but still exists`);
  }
  for (const j of st.jobs.values()) {
    if (j.state === 'running') {
      assert.equal(seen.get(j.id), j.need.slots, `running job ${j.id} holds ${seen.get(j.id) ?? 0} slots, not ${j.need.slots}`);
      assert.equal((j.gpus ?? []).length, j.need.gpus, `running job ${j.id} holds ${(j.gpus ?? []).length} GPUs, not ${j.need.gpus}`);
      for (const g of j.gpus ?? []) assert.equal(st.workers.get(j.worker!)!.gpuJobs[g], j.id, `job ${j.id} lists GPU ${g}, which is not its`);
    }
    assert.ok(j.retriesUsed <= j.retries, `job ${j.id} used ${j.retriesUsed} of ${j.retries} retries`);
    assert.ok(j.requeues <= MAX_REQUEUES, `job ${j.id} has ${j.requeues} requeues`);
  }

  const inQueue = [...waitingJobs(st)];
  const queued = inQueue.map((j) => j.id);
  assert.equal(new Set(queued).size, queued.length, 'no job is queued twice');
  const waiting = [...st.jobs.values()].filter((j) => j.state === 'waiting' && j.blockers === 0).map((j) => j.id);
  assert.deepEqual([...queued].sort((a, b) => a - b), waiting.sort((a, b) => a - b), 'the queue holds exactly the waiting jobs that wait for no dependency');
  for (let i = 1; i < inQueue.length; i++) assert.ok(inQueue[i - 1].priority >= inQueue[i].priority, 'the queue yields higher priorities first');
  for (const j of st.jobs.values()) {
    if (j.blockers > 0) {
      assert.equal(j.state, 'waiting', `job ${j.id} has blockers but is ${j.state}`);
      const unmet = (j.after ?? []).filter((d) => { const dep = st.jobs.get(d); return dep ? dep.state !== 'done' : st.forgotten.has(d); });
      assert.equal(j.blockers, unmet.length, `job ${j.id} counts ${j.blockers} blockers, ${unmet.length} unmet`);
      for (const d of unmet) assert.ok(!['failed', 'killed'].includes(st.jobs.get(d)?.state ?? ''), `job ${j.id} is held for job ${d}, which ended ${st.jobs.get(d)?.state}`);
    }
  }
  const tagRecount = new Map<string, Record<JobState, number>>();
  for (const j of st.jobs.values()) {
    for (const tag of j.tags) {
      if (!tagRecount.has(tag)) tagRecount.set(tag, { waiting: 0, running: 0, done: 0, failed: 0, killed: 0 });
      tagRecount.get(tag)![j.state]++;
    }
  }
  assert.deepEqual(new Map([...st.tagCounts].sort()), new Map([...tagRecount].sort()), 'tag counts equal a recount');
}

/** A comparable, deep-copied picture of the state (queue internals and tokens aside). */
function view(st: State) {
  return JSON.parse(JSON.stringify({
    seq: st.seq, nextId: st.nextId, counts: st.counts,
    jobs: [...st.jobs.values()].sort((a, b) => a.id - b.id).map((j) => ({ ...j, qtok: 0 })),
    workers: [...st.workers.values()].sort((a, b) => (a.host < b.host ? -1 : 1)),
    queue: [...waitingJobs(st)].map((j) => j.id),
    paused: st.paused, pausedTags: [...st.pausedTags].sort(), forgotten: [...st.forgotten].sort((a, b) => a - b),
    tagCounts: [...st.tagCounts].sort(),
  }));
}

function step(st: State, ...evs: Event[]): void {
  for (const ev of evs) { applyEvent(st, ev); checkInvariants(st); }
}
const addEv = (st: State, n: number, o: { retries?: number; timeout?: number; t?: number } = {}): Event => ({
  e: 'add', t: o.t ?? T0, id: st.nextId, cwd: '/work', retries: o.retries ?? 0, timeout: o.timeout ?? 0,
  jobs: Array.from({ length: n }, (_, i) => ['/bin/job.sh', `arg${st.nextId + i}`]),
});
/** Queues n jobs and returns their ids. */
function add(st: State, n: number, o: { retries?: number; timeout?: number; t?: number } = {}): number[] {
  const first = st.nextId;
  step(st, addEv(st, n, o));
  return Array.from({ length: n }, (_, i) => first + i);
}
function worker(st: State, host: string, slots = 1, ssh = false, t = T0): void {
  step(st, { e: 'worker', t, host, slots, ssh });
}
function start(st: State, id: number, host: string, slot = 0, t = T0): void {
  step(st, { e: 'start', t, id, host: host, slot: slot });
}
function end(st: State, id: number, code: number | null, t = T0 + 1000, why?: string): void {
  const run = st.jobs.get(id)!.run;
  step(st, why === undefined ? { e: 'end', t, id, run, code } : { e: 'end', t, id, run, code, why });
}
function stop(st: State, ids: number[], why: KillReason, t = T0 + 500, grace = 5000): void {
  step(st, { e: 'kill', t, ids, why, grace });
}
const job = (st: State, id: number): Job => {
  const j = st.jobs.get(id);
  assert.ok(j, `job ${id} exists`);
  return j;
};
const queue = (st: State) => [...waitingJobs(st)].map((j) => j.id);

const tmpDirs: string[] = [];
function tempDir(): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'djs-core-'));
  tmpDirs.push(d);
  return d;
}
after(() => { for (const d of tmpDirs) fs.rmSync(d, { recursive: true, force: true }); });

// ---- applyEvent ----------------------------------------------------------------

describe('applyEvent', () => {
  test('add gives consecutive ids, counts them, and queues them first come first served', () => {
    const st = newState();
    assert.deepEqual(add(st, 3, { retries: 2, timeout: 60, t: T0 + 7 }), [1, 2, 3]);
    assert.deepEqual(add(st, 2), [4, 5]);
    assert.equal(st.nextId, 6);
    assert.equal(st.counts.waiting, 5);
    assert.deepEqual(queue(st), [1, 2, 3, 4, 5]);
    const j = job(st, 2);
    assert.deepEqual([j.script, ...j.args], ['/bin/job.sh', 'arg2']);
    assert.equal(j.cwd, '/work');
    assert.equal(j.retries, 2);
    assert.equal(j.timeout, 60);
    assert.equal(j.queuedAt, T0 + 7);
    assert.equal(j.state, 'waiting');
  });

  test('remove removes only waiting jobs and keeps the counts', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 4);
    start(st, 1, 'a');
    end(st, 1, 0);
    start(st, 2, 'a');
    step(st, { e: 'remove', t: T0, ids: [1, 2, 3, 99] });
    assert.deepEqual([...st.jobs.keys()].sort(), [1, 2, 4]);
    assert.equal(job(st, 1).state, 'done');
    assert.equal(job(st, 2).state, 'running');
    assert.deepEqual(st.counts, { waiting: 1, running: 1, done: 1, failed: 0, killed: 0 });
    assert.deepEqual(queue(st), [4]);
  });

  test('start takes the slot; exit 0 is done, non-zero is failed, and the slot is free again', () => {
    const st = newState();
    worker(st, 'a', 2);
    add(st, 2);
    start(st, 1, 'a', 0, T0 + 10);
    start(st, 2, 'a', 1, T0 + 20);
    const j1 = job(st, 1);
    assert.equal(j1.state, 'running');
    assert.equal(attemptsOf(j1), 1);
    assert.equal(j1.run, 1);
    assert.equal(j1.worker, 'a');
    assert.equal(j1.startedAt, T0 + 10);
    assert.deepEqual(st.workers.get('a')!.running, [1, 2]);
    assert.deepEqual(queue(st), []);

    end(st, 1, 0, T0 + 100);
    assert.equal(j1.state, 'done');
    assert.equal(j1.exitCode, 0);
    assert.equal(j1.endedAt, T0 + 100);
    assert.deepEqual(st.workers.get('a')!.running, [0, 2]);

    end(st, 2, 3, T0 + 200);
    assert.equal(job(st, 2).state, 'failed');
    assert.equal(job(st, 2).exitCode, 3);
    assert.deepEqual(st.workers.get('a')!.running, [0, 0]);
    assert.deepEqual(st.counts, { waiting: 0, running: 0, done: 1, failed: 1, killed: 0 });
    assert.equal(job(st, 2).history!.length, 1);
  });

  test('--retries: a failed job goes to the front of the queue, avoiding the worker it failed on', () => {
    const st = newState();
    worker(st, 'a');
    worker(st, 'b');
    add(st, 1, { retries: 1 });
    add(st, 2);
    start(st, 1, 'a');
    end(st, 1, 7);
    const j = job(st, 1);
    assert.equal(j.state, 'waiting');
    assert.equal(j.retriesUsed, 1);
    assert.deepEqual(j.avoid, ['a']);
    assert.deepEqual(queue(st), [1, 2, 3], 'the retry goes first');
    assert.equal(st.counts.failed, 0);

    start(st, 1, 'b');
    assert.equal(attemptsOf(j), 2);
    end(st, 1, 7);
    assert.equal(j.state, 'failed', 'no retries left');
    assert.equal(j.retriesUsed, 1);
    assert.deepEqual(j.avoid, ['a', 'b']);
    assert.equal(j.history!.length, 2);
    assert.deepEqual(queue(st), [2, 3]);
  });

  test('exit 255 requeues without charging retries and has the ssh worker checked', () => {
    const st = newState();
    worker(st, 'ssh-host', 1, true);
    worker(st, 'plain', 1, false);
    add(st, 3);
    start(st, 1, 'ssh-host');
    start(st, 2, 'plain');
    end(st, 1, 255, T0 + 1234);
    const j = job(st, 1);
    assert.equal(j.state, 'waiting');
    assert.equal(j.retriesUsed, 0);
    assert.equal(j.requeues, 1);
    assert.deepEqual(j.avoid, ['ssh-host']);
    assert.deepEqual(queue(st), [1, 3], 'requeued in front');
    assert.equal(st.workers.get('ssh-host')!.probeAt, T0 + 1234, 'the ssh worker is to be probed now');

    end(st, 2, 255, T0 + 2000);
    assert.equal(job(st, 2).state, 'waiting');
    assert.equal(st.workers.get('plain')!.probeAt, 0, 'a worker added without ssh is never probed');
    assert.deepEqual(queue(st), [2, 1, 3]);
  });

  test(`after ${MAX_REQUEUES} worker failures the job is failed with a reason`, () => {
    const st = newState();
    worker(st, 'a');
    add(st, 1, { retries: 3 });
    const j = job(st, 1);
    for (let i = 1; i <= MAX_REQUEUES; i++) {
      assert.equal(j.state, 'waiting');
      start(st, 1, 'a', 0, T0 + i * 10);
      end(st, 1, 255, T0 + i * 10 + 5);
    }
    assert.equal(j.state, 'failed');
    assert.equal(j.requeues, MAX_REQUEUES);
    assert.equal(j.retriesUsed, 0);
    assert.match(j.reason ?? '', /255/);
    assert.deepEqual(st.counts, { waiting: 0, running: 0, done: 0, failed: 1, killed: 0 });
  });

  test('stop by the user: a running job is killed when it ends, a waiting one at once', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 3);
    start(st, 1, 'a');
    stop(st, [1, 2], 'user', T0 + 500, 5000);
    const j1 = job(st, 1);
    assert.equal(j1.state, 'running', 'still running until its process ends');
    assert.equal(j1.killing, 'user');
    assert.equal(j1.killAt, T0 + 5500);
    assert.equal(job(st, 2).state, 'killed');
    assert.deepEqual(queue(st), [3]);
    end(st, 1, 143);
    assert.equal(j1.state, 'killed');
    assert.deepEqual(st.counts, { waiting: 1, running: 0, done: 0, failed: 0, killed: 2 });
  });

  test('stop by timeout fails the job with reason timeout, or retries it when retries are left', () => {
    const st = newState();
    worker(st, 'a');
    worker(st, 'b');
    add(st, 1, { timeout: 10 });
    add(st, 1, { timeout: 10, retries: 1 });
    start(st, 1, 'a');
    start(st, 2, 'b');
    stop(st, [1, 2], 'timeout');
    end(st, 1, null);
    end(st, 2, 143);
    assert.equal(job(st, 1).state, 'failed');
    assert.match(job(st, 1).reason ?? '', /timeout/);
    assert.equal(job(st, 2).state, 'waiting');
    assert.equal(job(st, 2).retriesUsed, 1);
    assert.deepEqual(job(st, 2).avoid, ['b']);
    assert.match(job(st, 2).history![0].reason ?? '', /timeout/);
  });

  test('stop to requeue sends a running job back to the front without a failure', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 2);
    start(st, 1, 'a');
    stop(st, [1, 2], 'requeue');
    assert.equal(job(st, 2).state, 'waiting', 'a waiting job is not touched by a requeue stop');
    end(st, 1, 143);
    const j = job(st, 1);
    assert.equal(j.state, 'waiting');
    assert.equal(j.retriesUsed, 0);
    assert.equal(j.requeues, 0);
    assert.deepEqual(queue(st), [1, 2]);
    assert.equal(st.counts.failed, 0);
  });

  test('stop for timeout or requeue does nothing to waiting or finished jobs', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 2);
    start(st, 1, 'a');
    end(st, 1, 0);
    const before = view(st);
    stop(st, [1, 2], 'timeout');
    stop(st, [1, 2], 'requeue');
    assert.deepEqual(view(st), before);
  });

  test('unstart puts a job back at the front and frees its slot', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 3);
    start(st, 1, 'a');
    step(st, { e: 'unstart', t: T0, id: 1 });
    const j = job(st, 1);
    assert.equal(j.state, 'waiting');
    assert.equal(attemptsOf(j), 0);
    assert.deepEqual(st.workers.get('a')!.running, [0]);
    assert.deepEqual(queue(st), [1, 2, 3]);
    assert.deepEqual(planStarts(st), [{ id: 1, host: 'a', slot: 0 }]);
    start(st, 1, 'a');
    assert.equal(j.run, 2, 'a new start gets a new run number');
    assert.equal(attemptsOf(j), 1);
  });

  test('retry queues finished jobs again at the back with fresh retries', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 1, { retries: 1 });
    add(st, 2);
    start(st, 1, 'a'); end(st, 1, 1);
    start(st, 1, 'a'); end(st, 1, 1);
    assert.equal(job(st, 1).state, 'failed');
    assert.equal(job(st, 1).retriesUsed, 1);
    start(st, 2, 'a');
    step(st, { e: 'retry', t: T0 + 9000, ids: [1, 2, 3] });
    const j = job(st, 1);
    assert.equal(j.state, 'waiting');
    assert.equal(j.retriesUsed, 0);
    assert.equal(j.queuedAt, T0 + 9000);
    assert.equal(job(st, 2).state, 'running', 'retry ignores a running job');
    assert.deepEqual(queue(st), [3, 1], 'behind the jobs already waiting');
    assert.deepEqual(st.counts, { waiting: 2, running: 1, done: 0, failed: 0, killed: 0 });
  });

  test('clean forgets finished jobs and never reuses their ids', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 4);
    start(st, 1, 'a'); end(st, 1, 0);
    start(st, 2, 'a'); end(st, 2, 1);
    stop(st, [3], 'user');
    start(st, 4, 'a');
    step(st, { e: 'clean', t: T0 });
    assert.deepEqual([...st.jobs.keys()], [4]);
    assert.deepEqual(st.counts, { waiting: 0, running: 1, done: 0, failed: 0, killed: 0 });
    assert.equal(st.nextId, 5);
    assert.deepEqual(add(st, 1), [5]);
  });

  test('worker: add, change slots, drain until the last job ends, remove', () => {
    const st = newState();
    worker(st, 'a', 2, true, T0);
    const w = st.workers.get('a')!;
    assert.equal(w.state, 'up');
    assert.deepEqual(w.running, [0, 0]);
    assert.equal(w.ssh, true);

    worker(st, 'a', 3, true);
    assert.equal(st.workers.get('a')!.slots, 3);
    assert.deepEqual(st.workers.get('a')!.running, [0, 0, 0]);

    add(st, 3);
    start(st, 1, 'a', 0);
    start(st, 2, 'a', 2);
    worker(st, 'a', 1, true);
    assert.deepEqual(st.workers.get('a')!.running, [1, 0, 2], 'a busy slot above the new count stays until its job ends');
    assert.deepEqual(planStarts(st), [], 'only one slot now, and it is busy');
    end(st, 2, 0);
    assert.deepEqual(st.workers.get('a')!.running, [1]);

    step(st, { e: 'drain', t: T0, host: 'a' });
    assert.equal(st.workers.get('a')!.state, 'draining');
    end(st, 1, 0);
    assert.ok(!st.workers.has('a'), 'a draining worker goes when its last job ends');

    worker(st, 'b', 1);
    step(st, { e: 'drain', t: T0, host: 'b' });
    assert.ok(!st.workers.has('b'), 'an idle worker is removed by drain at once');

    worker(st, 'c', 1);
    step(st, { e: 'unworker', t: T0, host: 'c' });
    assert.ok(!st.workers.has('c'), 'unworker removes the worker');
  });

  test('unstart of the last job of a draining worker removes it', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 1);
    start(st, 1, 'a');
    step(st, { e: 'drain', t: T0, host: 'a' });
    step(st, { e: 'unstart', t: T0, id: 1 });
    assert.ok(!st.workers.has('a'), 'the drained worker is gone');
    assert.deepEqual(queue(st), [1]);
  });

  test('probes: a failure takes the worker down with doubling backoff up to the limit; success brings it up', () => {
    const st = newState();
    worker(st, 'a', 1, true);
    const delays: number[] = [];
    let t = T0;
    for (let i = 0; i < 10; i++) {
      t += 1000;
      step(st, { e: 'probe', t, host: 'a', ok: false, err: 'Connection refused' });
      const w = st.workers.get('a')!;
      assert.equal(w.state, 'down');
      assert.equal(w.error, 'Connection refused');
      assert.equal(w.probeAt, t + w.probeDelay);
      delays.push(w.probeDelay);
    }
    const expected: number[] = [];
    for (let d = PROBE_BACKOFF_MIN_MS; expected.length < 10; d *= 2) expected.push(Math.min(d, PROBE_BACKOFF_MAX_MS));
    assert.deepEqual(delays, expected);
    assert.equal(delays[0], PROBE_BACKOFF_MIN_MS);
    assert.equal(delays.at(-1), PROBE_BACKOFF_MAX_MS);

    step(st, { e: 'probe', t: t + 1, host: 'a', ok: true });
    const w = st.workers.get('a')!;
    assert.equal(w.state, 'up');
    assert.equal(w.probeAt, 0);
    assert.equal(w.probeDelay, 0);
    assert.equal(w.error, null);
    assert.equal(w.since, t + 1);

    step(st, { e: 'probe', t: t + 2, host: 'a', ok: false });
    assert.equal(st.workers.get('a')!.probeDelay, PROBE_BACKOFF_MIN_MS, 'backoff starts over after a success');
  });

  test('re-adding a worker with --skip_ssh_auth_check while it is being checked makes it usable again', () => {
    // The worker was checked over ssh (exit 255 set probeAt); the user then re-adds it
    // without ssh. Workers without ssh are never probed (plan skips them), so
    // unless the re-add clears the check, nothing ever will: the worker takes no jobs.
    const st = newState();
    worker(st, 'a', 1, true);
    add(st, 2);
    start(st, 1, 'a');
    end(st, 1, 255);
    assert.ok(st.workers.get('a')!.probeAt > 0, 'the worker is being checked');
    worker(st, 'a', 1, false);
    assert.deepEqual(plan(st, newRuntime(), T0 + 10_000_000, 5000).effects, [], 'a worker without ssh is never probed');
    assert.equal(planStarts(st).length, 1, 'so it must be schedulable');
  });

  test('a probe failure arriving after the worker was re-added without ssh does not leave it down forever', () => {
    const st = newState();
    worker(st, 'a', 1, true);
    add(st, 1);
    start(st, 1, 'a');
    end(st, 1, 255);               // probe started now
    worker(st, 'a', 1, false);     // add_slave --skip_ssh_auth_check a
    step(st, { e: 'probe', t: T0 + 5000, host: 'a', ok: false, err: 'timeout' }); // the probe in flight answers
    const { effects, next } = plan(st, newRuntime(), T0 + 10_000_000, 5000);
    const w = st.workers.get('a')!;
    assert.ok(w.state === 'up' && w.probeAt === 0 || effects.length > 0 || next < Infinity,
      `worker is ${w.state} with no probe ever due: it is stuck`);
  });

  test('an end whose run is not the current one changes nothing', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 1, { retries: 1 });
    start(st, 1, 'a');
    end(st, 1, 1);
    start(st, 1, 'a');
    assert.equal(job(st, 1).run, 2);
    const before = view(st);
    step(st, { e: 'end', t: T0 + 5000, id: 1, run: 1, code: 0 });
    step(st, { e: 'end', t: T0 + 5000, id: 1, run: 3, code: 0 });
    assert.deepEqual(view(st), before);
    step(st, { e: 'end', t: T0 + 5000, id: 1, run: 2, code: 0 });
    assert.equal(job(st, 1).state, 'done');
  });

  test('events about unknown jobs, hosts or jobs in the wrong state change nothing', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 3);
    start(st, 1, 'a');
    end(st, 1, 0);
    start(st, 2, 'a');
    const before = view(st);
    const noops: Event[] = [
      { e: 'remove', t: T0, ids: [99] },
      { e: 'start', t: T0, id: 99, host: 'a', slot: 0 },
      { e: 'start', t: T0, id: 3, host: 'nohost', slot: 0 },
      { e: 'unstart', t: T0, id: 99 },
      { e: 'unstart', t: T0, id: 3 },
      { e: 'end', t: T0, id: 99, run: 1, code: 0 },
      { e: 'end', t: T0, id: 3, run: 0, code: 0 },
      { e: 'kill', t: T0, ids: [99], why: 'user', grace: 1 },
      { e: 'retry', t: T0, ids: [99, 3] },
      { e: 'drain', t: T0, host: 'nohost' },
      { e: 'unworker', t: T0, host: 'nohost' },
      { e: 'probe', t: T0, host: 'nohost', ok: false },
    ];
    for (const ev of noops) {
      step(st, ev);
      assert.deepEqual(view(st), before, `${JSON.stringify(ev)} changed the state`);
    }
  });

  test('an unknown event kind throws', () => {
    assert.throws(() => applyEvent(newState(), { e: 'bogus' } as unknown as Event), /unknown event 'bogus'/);
  });
});

// ---- the invariants under random events --------------------------------------

/** Picks one valid or invalid event for the state; `invalid` is true for events that
 *  must change nothing. */
function randomEvent(st: State, rnd: () => number, t: number): { ev: Event; invalid: boolean } {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)];
  const jobsIn = (s: JobState) => [...st.jobs.values()].filter((j) => j.state === s);
  const hosts = ['h1', 'h2', 'h3', 'h4'];
  const r = rnd();
  if (r < 0.10) {
    const ev = addEv(st, 1 + Math.floor(rnd() * 3), { retries: pick([0, 0, 1, 2]), timeout: pick([0, 30]), t }) as Extract<Event, { e: 'add' }>;
    const tags = pick([[], [], ['a'], ['b'], ['a', 'b']]);
    if (tags.length) ev.tags = tags;
    const priority = pick([0, 0, 0, 1, -1, 5]);
    if (priority) ev.priority = priority;
    const need = pick([null, null, null, { slots: 2, gpus: 0, require: [], exclude: [], hosts: [] }, { slots: 1, gpus: 1, require: ['gpu'], exclude: [], hosts: [] },
      { slots: 1, gpus: 0, require: [], exclude: ['slow'], hosts: [] }, { slots: 1, gpus: 0, require: [], exclude: [], hosts: ['h2'] }]);
    if (need) ev.need = need;
    const deps = [...st.jobs.values()].filter((j) => j.state !== 'failed' && j.state !== 'killed');
    if (deps.length && rnd() < 0.3) ev.after = [...new Set([pick(deps).id, pick(deps).id])].sort((a, b) => a - b);
    return { ev, invalid: false };
  }
  if (r < 0.12) {
    const waiting = jobsIn('waiting');
    if (waiting.length) return { ev: { e: 'priority', t, ids: [pick(waiting).id], priority: pick([0, 1, 2, -1]) }, invalid: false };
  }
  if (r < 0.13) return { ev: { e: rnd() < 0.15 ? 'pause' : 'resume', t, ...(rnd() < 0.7 ? { tag: pick(['a', 'b']) } : {}) }, invalid: false };
  if (r < 0.30) {
    const s = planStarts(st);
    if (s.length) { const p = pick(s); return { ev: { e: 'start', t, ...p }, invalid: false }; }
  }
  if (r < 0.50) {
    const running = jobsIn('running');
    if (running.length) {
      const j = pick(running);
      const code = pick([0, 0, 1, 2, 255, 255, null]);
      if (rnd() < 0.1) return { ev: { e: 'end', t, id: j.id, run: j.run, code: null, why: 'lost' }, invalid: false };
      if (rnd() < 0.1) return { ev: { e: 'end', t, id: j.id, run: j.run - 1 - Math.floor(rnd() * 2), code }, invalid: true };
      return { ev: { e: 'end', t, id: j.id, run: j.run, code }, invalid: false };
    }
  }
  if (r < 0.55) {
    const running = jobsIn('running');
    if (running.length) return { ev: { e: 'unstart', t, id: pick(running).id }, invalid: false };
  }
  if (r < 0.63) {
    const live = [...st.jobs.values()].filter((j) => !['done', 'failed', 'killed'].includes(j.state));
    if (live.length) return { ev: { e: 'kill', t, ids: [pick(live).id, pick(live).id], why: pick(['user', 'timeout', 'requeue'] as const), grace: 3000 }, invalid: false };
  }
  if (r < 0.67) {
    const waiting = jobsIn('waiting');
    if (waiting.length) return { ev: { e: 'remove', t, ids: [pick(waiting).id] }, invalid: false };
  }
  if (r < 0.71) {
    // As decideRetry allows: no dependency that ended failed or killed, or was forgotten.
    const fin = [...st.jobs.values()].filter((j) => ['done', 'failed', 'killed'].includes(j.state) &&
      (j.after ?? []).every((d) => { const dep = st.jobs.get(d); return dep ? dep.state !== 'failed' && dep.state !== 'killed' : !st.forgotten.has(d); }));
    if (fin.length) return { ev: { e: 'retry', t, ids: [pick(fin).id] }, invalid: false };
  }
  if (r < 0.73) return { ev: { e: 'clean', t }, invalid: false };
  if (r < 0.78) {
    const ev: Event = { e: 'worker', t, host: pick(hosts), slots: 1 + Math.floor(rnd() * 3), ssh: rnd() < 0.6 };
    const labels = pick([[], [], ['gpu'], ['slow'], ['gpu', 'slow']]);
    if (labels.length) ev.labels = labels;
    if (labels.includes('gpu')) ev.gpus = 1 + Math.floor(rnd() * 2);
    return { ev, invalid: false };
  }
  if (r < 0.81) {
    const ws = [...st.workers.keys()];
    if (ws.length) return { ev: { e: 'drain', t, host: pick(ws) }, invalid: false };
  }
  if (r < 0.83) {
    const idle = [...st.workers.values()].filter((w) => w.running.every((id) => id === 0));
    if (idle.length) return { ev: { e: 'unworker', t, host: pick(idle).host }, invalid: false };
  }
  if (r < 0.90) {
    const ws = [...st.workers.keys()];
    if (ws.length) return { ev: { e: 'probe', t, host: pick(ws), ok: rnd() < 0.5, err: 'refused' }, invalid: false };
  }
  // Events that no longer fit: unknown ids and hosts, jobs in the wrong state.
  const notWaiting = [...st.jobs.values()].filter((j) => j.state !== 'waiting');
  const notRunning = [...st.jobs.values()].filter((j) => j.state !== 'running');
  const notFinished = [...st.jobs.values()].filter((j) => j.state === 'waiting' || j.state === 'running');
  const unknown = st.nextId + 5 + Math.floor(rnd() * 10);
  const bad: Event[] = [
    { e: 'end', t, id: unknown, run: 1, code: 0 },
    { e: 'start', t, id: unknown, host: pick(hosts), slot: 0 },
    { e: 'unstart', t, id: unknown },
    { e: 'kill', t, ids: [unknown], why: 'user', grace: 1 },
    { e: 'retry', t, ids: [unknown] },
    { e: 'remove', t, ids: [unknown] },
    { e: 'drain', t, host: 'nohost' },
    { e: 'unworker', t, host: 'nohost' },
    { e: 'probe', t, host: 'nohost', ok: true },
    { e: 'start', t, id: [...st.jobs.keys()][0] ?? unknown, host: 'nohost', slot: 0 },
  ];
  if (notWaiting.length) {
    const j = pick(notWaiting);
    bad.push({ e: 'remove', t, ids: [j.id] });
    const w = [...st.workers.values()].find((x) => x.running.includes(0));
    if (w) bad.push({ e: 'start', t, id: j.id, host: w.host, slot: w.running.indexOf(0) });
  }
  if (notRunning.length) {
    const j = pick(notRunning);
    bad.push({ e: 'unstart', t, id: j.id }, { e: 'end', t, id: j.id, run: j.run, code: 0 });
  }
  if (notFinished.length) bad.push({ e: 'retry', t, ids: [pick(notFinished).id] });
  return { ev: pick(bad), invalid: true };
}

describe('invariants under random events', () => {
  for (const seed of [1, 2, 3]) {
    test(`seed ${seed}: counts, slots and queue stay consistent; replay from the journal gives the same state`, () => {
      const rnd = prng(seed);
      const st = newState();
      const dir = tempDir();
      const journal = new Journal(dir, 0, 0);
      let lines = '';
      let t = T0;
      let invalidSeen = 0, startsSeen = 0;
      const EVENTS = 1000;
      try {
        for (let i = 0; i < EVENTS; i++) {
          t += Math.floor(rnd() * 5000);
          const { ev, invalid } = randomEvent(st, rnd, t);
          const before = invalid ? view(st) : null;
          applyEvent(st, ev);
          try {
            checkInvariants(st);
            if (before) { invalidSeen++; assert.deepEqual(view(st), before, 'an event that does not fit changed the state'); }
          } catch (e) {
            (e as Error).message = `seed ${seed}, event ${i} ${JSON.stringify(ev)}: ${(e as Error).message}`;
            throw e;
          }
          if (ev.e === 'start') startsSeen++;
          st.seq++;
          lines += JSON.stringify({ n: st.seq, ...ev }) + '\n';

          // planStarts: queue order, only free slots (and GPUs) of schedulable workers that
          // admit the job; with plain jobs only, exactly the queue's head, one per free slot.
          const plan = planStarts(st);
          const queued = [...waitingJobs(st, true)].map((j) => j.id);
          let free = 0;
          for (const w of st.workers.values()) {
            if (w.state !== 'up' || w.probeAt > 0) continue;
            for (let s = 0; s < w.slots; s++) if (!w.running[s]) free++;
          }
          let at = 0;
          for (const p of plan) {
            at = queued.indexOf(p.id, at);
            assert.ok(at >= 0, `planned start of job ${p.id} is out of queue order`);
          }
          const taken = new Set<string>();
          for (const p of plan) {
            const w = st.workers.get(p.host)!, j = st.jobs.get(p.id)!;
            const slots = p.slots ?? [p.slot];
            assert.equal(slots.length, j.need.slots);
            assert.equal((p.gpus ?? []).length, j.need.gpus);
            assert.ok(admits(w, j.need), `job ${p.id} planned on ${p.host}, which does not admit it`);
            for (const s of slots) {
              assert.ok(w.state === 'up' && w.probeAt === 0 && s < w.slots && !w.running[s] && !taken.has(`${p.host}/${s}`), `planned start ${JSON.stringify(p)} is not on a free slot of a schedulable worker`);
              taken.add(`${p.host}/${s}`);
            }
            for (const g of p.gpus ?? []) {
              assert.ok(g < w.gpus && !w.gpuJobs[g] && !taken.has(`${p.host}/gpu${g}`), `planned GPU ${g} of ${p.host} is not free`);
              taken.add(`${p.host}/gpu${g}`);
            }
          }
          if ([...st.jobs.values()].every((j) => j.need.slots === 1 && j.need.gpus === 0 && !j.need.require.length && !j.need.exclude.length && !j.need.hosts.length)) {
            assert.deepEqual(plan.map((p) => p.id), queued.slice(0, Math.min(free, queued.length)));
          }

          if (i === EVENTS / 2) { journal.append(lines); lines = ''; journal.snapshot(st); }
          else if (lines.length > 20_000) { journal.append(lines); lines = ''; }
        }
        journal.append(lines);
      } finally {
        fs.closeSync(journal.fd);
      }
      assert.ok(invalidSeen > 80 && startsSeen > 50, `the generator exercised little (${invalidSeen} invalid, ${startsSeen} starts)`);
      const loaded = loadState(dir);
      assert.deepEqual(loaded.warnings, []);
      checkInvariants(loaded.state);
      assert.deepEqual(view(loaded.state), view(st), 'snapshot + journal replay equals the live state');
    });
  }
});

// ---- planStarts ----------------------------------------------------------------

describe('planStarts', () => {
  test('first come, first served, one job per free slot', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 3);
    assert.deepEqual(planStarts(st), [{ id: 1, host: 'a', slot: 0 }]);
    worker(st, 'b');
    assert.deepEqual(planStarts(st).map((s) => s.id), [1, 2]);
  });

  test('spreads over workers before taking a second slot of one', () => {
    const st = newState();
    worker(st, 'a', 2);
    worker(st, 'b', 2);
    add(st, 3);
    const plan = planStarts(st);
    assert.equal(plan.length, 3);
    assert.notEqual(plan[0].host, plan[1].host);
    assert.deepEqual(plan.map((s) => s.slot), [0, 0, 1]);
  });

  test('a worker with a busy slot 0 still gets the next jobs after the idle workers', () => {
    const st = newState();
    worker(st, 'a', 2);
    worker(st, 'b', 2);
    add(st, 4);
    start(st, 1, 'a', 0);
    const plan = planStarts(st);
    assert.deepEqual(plan.map((s) => `${s.id}@${s.host}/${s.slot}`), ['2@b/0', '3@a/1', '4@b/1']);
  });

  test('honours slots and returns nothing when no slot is free', () => {
    const st = newState();
    worker(st, 'a', 2);
    add(st, 5);
    const plan = planStarts(st);
    assert.deepEqual(plan, [{ id: 1, host: 'a', slot: 0 }, { id: 2, host: 'a', slot: 1 }]);
    for (const s of plan) start(st, s.id, s.host, s.slot);
    assert.deepEqual(planStarts(st), []);
    assert.deepEqual(planStarts(newState()), [], 'no workers');
  });

  test('skips down, draining and being-checked workers', () => {
    const st = newState();
    worker(st, 'down', 1, true);
    worker(st, 'drain', 2);
    worker(st, 'check', 1, true);
    add(st, 4);
    step(st, { e: 'probe', t: T0, host: 'down', ok: false });
    start(st, 1, 'drain', 0);
    step(st, { e: 'drain', t: T0, host: 'drain' });
    start(st, 2, 'check', 0);
    end(st, 2, 255);             // check: up, probeAt > 0
    assert.equal(st.workers.get('check')!.state, 'up');
    assert.deepEqual(planStarts(st), []);
    worker(st, 'ok');
    assert.deepEqual(planStarts(st), [{ id: 2, host: 'ok', slot: 0 }]);
    step(st, { e: 'probe', t: T0 + 2000, host: 'check', ok: true });
    assert.deepEqual(planStarts(st).map((s) => s.host).sort(), ['check', 'ok']);
  });

  test('a job avoids the worker it failed on if another is free, but runs there if it is the only one', () => {
    const st = newState();
    worker(st, 'a');
    worker(st, 'b');
    add(st, 1, { retries: 2 });
    start(st, 1, 'a');
    end(st, 1, 1);
    assert.deepEqual(job(st, 1).avoid, ['a']);
    assert.deepEqual(planStarts(st), [{ id: 1, host: 'b', slot: 0 }]);

    add(st, 1);                  // job 2 takes b
    start(st, 2, 'b');
    assert.deepEqual(planStarts(st), [{ id: 1, host: 'a', slot: 0 }]);
  });
});

// ---- plan: deadlines, kills and probes ----------------------------------------

describe('plan: deadlines, kills and probes', () => {
  test('nothing pending: nothing due and next is Infinity', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 2);
    start(st, 1, 'a');
    assert.deepEqual(plan(st, newRuntime(), T0 + 1e9, 5000), { events: [], effects: [], next: Infinity });
  });

  test('a timeout is due at start + timeout and named as the next deadline before', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 1, { timeout: 10 });
    start(st, 1, 'a', 0, T0);
    assert.deepEqual(plan(st, newRuntime(), T0 + 9_999, 5000), { events: [], effects: [], next: T0 + 10_000 });
    const p = plan(st, newRuntime(), T0 + 10_000, 5000);
    assert.deepEqual(p.events, [{ e: 'kill', t: T0 + 10_000, ids: [1], why: 'timeout', grace: 5000 }]);
    assert.deepEqual(p.effects, []);
  });

  test('a stopping job gets SIGKILL after killAt unless already sent, and no timeout', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 1, { timeout: 1 });
    start(st, 1, 'a', 0, T0);
    stop(st, [1], 'user', T0 + 100, 5000);
    assert.deepEqual(plan(st, newRuntime(), T0 + 2000, 5000), { events: [], effects: [], next: T0 + 5100 });
    const p = plan(st, newRuntime(), T0 + 5100, 5000);
    assert.deepEqual(p.events, [], 'no timeout kill of a job being killed');
    assert.deepEqual(p.effects, [{ kind: 'signal', id: 1, sig: 'SIGKILL' }]);
    assert.deepEqual(plan(st, busy([], [1]), T0 + 9000, 5000), { events: [], effects: [], next: Infinity });
  });

  test('probes are due at probeAt unless one is already running', () => {
    const st = newState();
    worker(st, 'a', 1, true);
    worker(st, 'b', 1, true);
    add(st, 1);
    start(st, 1, 'a');
    end(st, 1, 255, T0 + 50);
    step(st, { e: 'probe', t: T0, host: 'b', ok: false });
    assert.deepEqual(plan(st, newRuntime(), T0 + 50, 5000), { events: [], effects: [{ kind: 'probe', host: 'a' }], next: T0 + PROBE_BACKOFF_MIN_MS });
    assert.deepEqual(plan(st, busy(['a'], []), T0 + 50, 5000), { events: [], effects: [], next: T0 + PROBE_BACKOFF_MIN_MS });
    const p = plan(st, busy(['a'], []), T0 + PROBE_BACKOFF_MIN_MS, 5000);
    assert.deepEqual(p.events, []);
    assert.deepEqual(p.effects, [{ kind: 'probe', host: 'b' }]);
  });
});

// ---- the operations' decisions -------------------------------------------------

describe('operations (pure decisions of the operation table)', () => {
  const C = { now: T0 + 1000, killGraceMs: 7000, argSpace: 200_000 };
  /** Decides and, unless it throws, applies the events; returns the decision. */
  function run(st: State, decide: (st: State, req: Request, c: DecideContext) => Decision, req: Record<string, unknown>): Decision {
    const d = decide(st, { op: 'x', ...req }, C);
    step(st, ...d.events);
    return d;
  }
  /** Decides expecting a UserError with that exit code and message; the state is untouched. */
  function refused(st: State, decide: (st: State, req: Request, c: DecideContext) => Decision, req: Record<string, unknown>, code: number, msg: RegExp): void {
    const before = view(st);
    assert.throws(() => decide(st, { op: 'x', ...req }, C), (e: unknown) => e instanceof UserError && e.code === code && msg.test(e.message));
    assert.deepEqual(view(st), before);
  }

  test('add_jobs hands out ids in order and records retries and timeout', () => {
    const st = newState();
    add(st, 2);
    const d = run(st, decideAddJobs, { cwd: '/w', jobs: [['/bin/a.sh', 'x'], ['/bin/b.sh']], retries: 2, timeout: 30 });
    assert.deepEqual([d.answer.first, d.answer.count], [3, 2]);
    assert.match(String(d.answer.warning), /no workers yet/, 'jobs that nothing will run are pointed out');
    assert.deepEqual([job(st, 3).args, job(st, 4).script, job(st, 4).retries, job(st, 4).timeout], [['x'], '/bin/b.sh', 2, 30]);
  });

  test('add_jobs refuses bad shapes: no cwd, no jobs, a non-string word, a NUL, a relative script, a string number', () => {
    const st = newState();
    refused(st, decideAddJobs, { jobs: [['/a']] }, 2, /absolute cwd/);
    refused(st, decideAddJobs, { cwd: '/w', jobs: [] }, 2, /no jobs/);
    refused(st, decideAddJobs, { cwd: '/w', jobs: [['/a', 3]] }, 2, /list of strings/);
    refused(st, decideAddJobs, { cwd: '/w', jobs: [['/a', 'x\0y']] }, 2, /NUL/);
    refused(st, decideAddJobs, { cwd: '/w', jobs: [['a.sh']] }, 2, /not absolute/);
    refused(st, decideAddJobs, { cwd: '/w', jobs: [['/a']], retries: '3' }, 2, /invalid retries/);
    refused(st, decideAddJobs, { cwd: '/w', jobs: [['/a', 'x'.repeat(131_072)]] }, 2, /argument of 131072 bytes is longer than the system allows one argument \(131071 bytes\)/);
    refused(st, decideAddJobs, { cwd: '/w', jobs: [['/a', ...Array(3).fill('y'.repeat(100_000))]] }, 2, /more than the 200000 an exec leaves/);
    assert.equal(decideAddJobs(st, { op: 'x', cwd: '/w', jobs: [['/a', 'x'.repeat(131_071)]] }, C).events.length, 1);
  });

  test('remove_jobs by ids or by exact command, waiting jobs only', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 3);
    start(st, 1, 'a');
    refused(st, decideRemoveJobs, { ids: [1] }, 1, /job '1' is running, not waiting/);
    refused(st, decideRemoveJobs, { ids: [9] }, 1, /no such job '9'/);
    refused(st, decideRemoveJobs, { ids: [[2]] }, 2, /invalid job id/);
    refused(st, decideRemoveJobs, { script: '/bin/job.sh', args: ['nope'] }, 1, /no waiting job runs/);
    assert.deepEqual(run(st, decideRemoveJobs, { script: '/bin/job.sh', args: ['arg3'] }).answer, { ids: [3] });
    assert.deepEqual(run(st, decideRemoveJobs, { ids: [2] }).answer, { ids: [2] });
    assert.deepEqual([...st.jobs.keys()], [1]);
  });

  test('kill: a running job is being killed with the grace period, a waiting one ends killed, a finished one is refused', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 3);
    start(st, 1, 'a');
    const d = run(st, decideKill, { ids: [1, 2] });
    assert.deepEqual(d.events, [{ e: 'kill', t: C.now, ids: [1, 2], why: 'user', grace: 7000 }]);
    assert.deepEqual(effectsOf(st, d.events[0]), [{ kind: 'signal', id: 1, sig: 'SIGTERM' }]);
    assert.deepEqual([job(st, 1).state, job(st, 1).killing, job(st, 1).killAt, job(st, 2).state], ['running', 'user', C.now + 7000, 'killed']);
    refused(st, decideKill, { ids: [2] }, 1, /not running \(it is killed\)/);
    assert.deepEqual(run(st, decideKill, { all: true }).answer, { ids: [1, 3] });
    assert.deepEqual(decideKill(newState(), { op: 'kill', all: true }, C), { events: [], answer: { ids: [] } });
  });

  test('retry: finished jobs by id, or every failed and/or killed one', () => {
    const st = newState();
    worker(st, 'a', 3);
    add(st, 4);
    start(st, 1, 'a', 0); start(st, 2, 'a', 1); start(st, 3, 'a', 2);
    end(st, 1, 1); end(st, 2, 0);
    stop(st, [4], 'user');
    refused(st, decideRetry, { ids: [3] }, 1, /job '3' is running; only finished jobs/);
    assert.deepEqual(run(st, decideRetry, { failed: true }).answer, { ids: [1] });
    assert.deepEqual(run(st, decideRetry, { ids: [2] }).answer, { ids: [2] });
    assert.deepEqual(run(st, decideRetry, { killed: true }).answer, { ids: [4] });
    assert.deepEqual(queue(st), [1, 2, 4]);
  });

  test('clean forgets finished jobs and, with logs, names their logs for removal', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 2);
    start(st, 1, 'a');
    end(st, 1, 0);
    const d = run(st, decideClean, { logs: true });
    assert.deepEqual([d.answer, d.effects], [{ count: 1, states: { done: 1, failed: 0, killed: 0 } }, [{ kind: 'remove-logs', ids: [1], below: 3 }]]);
    assert.deepEqual([...st.jobs.keys()], [2]);
    assert.deepEqual(decideClean(st, { op: 'clean' }, C), { events: [], answer: { count: 0, states: { done: 0, failed: 0, killed: 0 } }, effects: [] });
  });

  test('add_workers and remove_workers: idle goes at once; busy needs --wait (drain) or --kill (requeue)', () => {
    const st = newState();
    run(st, decideAddWorkers, { workers: [{ host: 'a', slots: 2 }, { host: 'b' }], skipCheck: true });
    assert.deepEqual([...st.workers.values()].map((w) => [w.host, w.slots, w.ssh]), [['a', 2, false], ['b', 1, false]]);
    refused(st, decideAddWorkers, { workers: [{ host: '-oProxyCommand=x' }] }, 2, /invalid host/);
    refused(st, decideAddWorkers, { workers: [{ host: 'c', slots: '3' }] }, 2, /invalid slot count/);
    add(st, 2);
    start(st, 1, 'a'); start(st, 2, 'b');
    refused(st, decideRemoveWorkers, { hosts: ['a'] }, 1, /worker 'a' is running 1 job/);
    refused(st, decideRemoveWorkers, { hosts: ['zz'] }, 1, /no such worker 'zz'/);
    run(st, decideRemoveWorkers, { hosts: ['a'], mode: 'wait' });
    assert.equal(st.workers.get('a')!.state, 'draining');
    const d = run(st, decideRemoveWorkers, { hosts: ['b'], mode: 'kill' });
    assert.deepEqual(d.events.map((e) => e.e), ['drain', 'kill']);
    assert.equal(job(st, 2).killing, 'requeue');
    end(st, 2, 143);
    assert.deepEqual([job(st, 2).state, st.workers.has('b')], ['waiting', false]);
  });
});

describe('plan (the scheduler\'s decisions) and effectsOf', () => {
  test('starts pause after a failed start and resume when the pause ends; the pause is the next deadline', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 1);
    const rt = newRuntime();
    assert.equal(pauseStarts(rt, T0), 500);
    assert.deepEqual(plan(st, rt, T0 + 100, 5000), { events: [], effects: [], next: T0 + 500 });
    assert.deepEqual(plan(st, rt, T0 + 500, 5000).events, [{ e: 'start', t: T0 + 500, id: 1, host: 'a', slot: 0 }]);
    assert.equal(pauseStarts(rt, T0), 1000, 'a second failure in a row doubles the pause');
  });

  test('a start\'s timeout counts in the next deadline of the plan that starts it', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 1, { timeout: 30 });
    const p = plan(st, newRuntime(), T0, 5000);
    assert.equal(p.next, T0 + 30_000);
    step(st, ...p.events);
    assert.deepEqual(effectsOf(st, p.events[0]), [{ kind: 'launch', id: 1 }]);
  });

  test('an end lets go of its run file', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 1);
    start(st, 1, 'a');
    const ev: Event = { e: 'end', t: T0, id: 1, run: 1, code: 0 };
    step(st, ev);
    assert.deepEqual(effectsOf(st, ev), [{ kind: 'forget-run', id: 1, run: 1 }]);
  });

  test('a worker that is gone has its shared connections closed: removed idle, or drained by its last job\'s end', () => {
    const st = newState();
    worker(st, 'a', 2);
    worker(st, 'b');
    add(st, 2);
    start(st, 1, 'a');
    start(st, 2, 'a', 1);
    const drain: Event = { e: 'drain', t: T0, host: 'a' };
    step(st, drain);
    assert.deepEqual(effectsOf(st, drain), [], 'a is busy: it stays until its jobs end');
    const end1: Event = { e: 'end', t: T0, id: 1, run: 1, code: 0 };
    step(st, end1);
    assert.deepEqual(effectsOf(st, end1), [{ kind: 'forget-run', id: 1, run: 1 }]);
    const end2: Event = { e: 'end', t: T0, id: 2, run: 1, code: 0 };
    step(st, end2);
    assert.deepEqual(effectsOf(st, end2), [{ kind: 'forget-run', id: 2, run: 1 }, { kind: 'close-ssh', host: 'a' }]);
    const gone: Event = { e: 'unworker', t: T0, host: 'b' };
    step(st, gone);
    assert.deepEqual(effectsOf(st, gone), [{ kind: 'close-ssh', host: 'b' }]);
  });
});

describe('launchRecord', () => {
  test('length, header and fields, byte for byte, for any bytes but NUL', () => {
    const args = ['', 'a b', "it's", '\n\r\t', 'é€😀', '$(id)', 'x'.repeat(70_000)];
    const rec = launchRecord({ id: 7, run: 2, slot: 1, attempt: 3, cwd: '/w d', marker: '', worker: 'h', env: ['A=1'], script: '/s.sh', args });
    const len = parseInt(rec.subarray(0, 8).toString(), 16);
    assert.equal(len, rec.length - 8);
    const body = rec.subarray(8), nl = body.indexOf(10);
    const head = body.subarray(0, nl).toString().split(' ').map(Number);
    assert.deepEqual(head.slice(0, 5), [7, 2, 1, 3, 1]);
    const fields: string[] = [];
    let o = nl + 1;
    for (const n of head.slice(5)) { fields.push(body.subarray(o, o + n).toString()); o += n; }
    assert.equal(o, body.length);
    assert.deepEqual(fields, ['/w d', '', 'h', 'A=1', '/s.sh', ...args]);
  });
});

// ---- parsing -------------------------------------------------------------------

describe('splitWords', () => {
  test('splits like a shell without expansions', () => {
    assert.deepEqual(splitWords('a b\tc'), ['a', 'b', 'c']);
    assert.deepEqual(splitWords(`  ./run.sh 'two words' "dq \\"x\\" \\\\ \\$HOME" back\\ slash  `), ['./run.sh', 'two words', 'dq "x" \\ $HOME', 'back slash']);
    assert.deepEqual(splitWords(`'a'"b"c`), ['abc']);
    assert.deepEqual(splitWords(`'' ""`), ['', '']);
    assert.deepEqual(splitWords(`"a\\nb"`), ['a\\nb'], 'backslash stays before other letters in double quotes');
    assert.deepEqual(splitWords(`'$x \\ "'`), ['$x \\ "']);
    assert.deepEqual(splitWords('a\r'), ['a']);
  });

  test('comments and blank lines', () => {
    assert.deepEqual(splitWords(''), []);
    assert.deepEqual(splitWords('   \t '), []);
    assert.deepEqual(splitWords('# all comment'), []);
    assert.deepEqual(splitWords('a b # c d'), ['a', 'b']);
    assert.deepEqual(splitWords('a#b'), ['a#b'], '# inside a word is not a comment');
    assert.deepEqual(splitWords(`'#' x`), ['#', 'x']);
  });

  test('unterminated quotes and a trailing backslash are errors', () => {
    assert.throws(() => splitWords(`a 'b c`), /unterminated single quote/);
    assert.throws(() => splitWords(`a "b c`), /unterminated double quote/);
    assert.throws(() => splitWords(`a "b\\"`), /unterminated double quote/);
    assert.throws(() => splitWords('a b\\'), /backslash/);
  });
});

describe('parseJobsFile', () => {
  const dir = tempDir();
  const script = path.join(dir, 'job.sh');
  fs.writeFileSync(script, '#!/bin/sh\nexit 0\n', { mode: 0o755 });
  fs.writeFileSync(path.join(dir, 'plain.txt'), 'x\n', { mode: 0o644 });

  test('resolves scripts against cwd and splits the arguments, skipping comments and blank lines', () => {
    const text = `# jobs\n\n./job.sh a 'b c'\r\n  job.sh "d"   # tail\n${script}\n`;
    assert.deepEqual(parseJobsFile(text, dir, 'jobs.txt'), [[script, 'a', 'b c'], [script, 'd'], [script]]);
  });

  test('errors name the file and the line', () => {
    const err = (text: string) => {
      try { parseJobsFile(text, dir, 'jobs.txt'); } catch (e) { assert.ok(e instanceof UserError, String(e)); return e; }
      assert.fail('no error');
    };
    const missing = err('./job.sh 1\n# c\n./missing.sh x\n');
    assert.equal(missing.code, 1);
    assert.match(missing.message, /missing\.sh/);
    assert.match(missing.message, /jobs\.txt line 3/);
    assert.match(err(`./job.sh ok\n./job.sh 'open\n`).message, /jobs\.txt line 2: unterminated single quote/);
    assert.match(err('./plain.txt\n').message, /not executable.*line 1/);
    assert.match(err('.\n').message, /not a file.*line 1/);
  });
});

describe('validateHost and parseWorkerArg', () => {
  test('accepts names, user@address, slots and IPv6 addresses, bare or bracketed', () => {
    for (const h of ['node7', 'alice@10.0.0.5', 'a-b.example.org', '[::1]', 'bob@[fe80::1%eth0]', '::1', 'fe80::1', 'bob@fe80::1%eth0', '2001:db8::7']) assert.doesNotThrow(() => validateHost(h), h);
    assert.deepEqual(parseWorkerArg('node7', 1), { host: 'node7', slots: 1, auto: false });
    assert.deepEqual(parseWorkerArg('alice@10.0.0.5', 3), { host: 'alice@10.0.0.5', slots: 3, auto: false });
    assert.deepEqual(parseWorkerArg('127.0.0.2:4', 1), { host: '127.0.0.2', slots: 4, auto: false });
    // IPv6: the name ssh and SLAVE_IP get is the bare address.
    assert.deepEqual(parseWorkerArg('[::1]:2', 1), { host: '::1', slots: 2, auto: false });
    assert.deepEqual(parseWorkerArg('[::1]', 5), { host: '::1', slots: 5, auto: false });
    assert.deepEqual(parseWorkerArg('::1', 3), { host: '::1', slots: 3, auto: false }, 'a bare address takes --slots');
    assert.deepEqual(parseWorkerArg('fe80::1:4', 1), { host: 'fe80::1:4', slots: 1, auto: false }, 'a bare address is all host');
    assert.deepEqual(parseWorkerArg('bob@[fe80::1%eth0]:4', 1), { host: 'bob@fe80::1%eth0', slots: 4, auto: false });
    assert.deepEqual(parseWorkerArg('[2001:db8::7]:auto', 1), { host: '2001:db8::7', slots: 1, auto: true });
    assert.deepEqual(parseWorkerArg('gpu1:auto', 1), { host: 'gpu1', slots: 1, auto: true });
    assert.deepEqual(parseWorkerArg('gpu1', 1, true), { host: 'gpu1', slots: 1, auto: true }, '--slots auto');
    assert.deepEqual(parseWorkerArg('gpu1:3', 1, true), { host: 'gpu1', slots: 3, auto: false }, 'a count wins over --slots auto');
  });

  test('rejects anything ssh or a shell could interpret, empty hosts and zero slots', () => {
    const bad = ['-oProxyCommand=x', 'a b', 'a;b', '$(x)', 'a\'b', 'a`b`', 'a|b', 'a\x00b', 'a\x1bb', 'a\tb', '', '@host', 'a@-b', 'a:b', '[::1', '::1]', '[a b]', 'x'.repeat(300)];
    for (const h of [...bad, 'a\nb', 'node7\n', 'a\rb']) {
      assert.throws(() => validateHost(h), (e: unknown) => e instanceof UserError && e.code === 2, JSON.stringify(h));
    }
    for (const h of bad) assert.throws(() => parseWorkerArg(h, 1), (e: unknown) => e instanceof UserError && e.code === 2, JSON.stringify(h));
    for (const a of ['host:0', 'host:', 'host:-1', 'host:1x', ':3', 'host:99999']) {
      assert.throws(() => parseWorkerArg(a, 1), (e: unknown) => e instanceof UserError && e.code === 2, a);
    }
    assert.throws(() => parseWorkerArg('host', 0), UserError, 'a default of 0 slots is refused too');
  });

  test('parseWorkerArg refuses a host with a line break as a usage error, not a TypeError', () => {
    // `add_slave $'a\nb'` must say "invalid host 'a\x0ab'" and exit 2.
    for (const h of ['a\nb', 'node7\n', 'a\rb:2', 'a\u2028b']) {
      assert.throws(() => parseWorkerArg(h, 1), (e: unknown) => e instanceof UserError && e.code === 2, JSON.stringify(h));
    }
  });

  test('a slot count from HOST:N above a plausible size warns, naming --slots, only when no login check reads the size', () => {
    const w = manySlotsWarning('user1@199:1000', 1000, true);
    assert.match(w ?? '', /'user1@199' with 1000 slots/);
    assert.match(w ?? '', /--slots N/);
    assert.equal(manySlotsWarning('user1@199:1000', 1000, false), null, 'the login check is on');
    assert.equal(manySlotsWarning('big:256', 256, true), null, 'plausible');
    assert.equal(manySlotsWarning('big', 1000, true), null, 'from --slots: meant');
    assert.equal(manySlotsWarning('[::1]:300', 300, true) !== null, true);
  });

  test('remove_workers finds an IPv6 worker by its bare or bracketed address', () => {
    const st = newState();
    applyEvent(st, { e: 'worker', t: T0, host: '::1', slots: 1, ssh: true });
    const d = decideRemoveWorkers(st, { op: 'remove_workers', hosts: ['[::1]'] }, { now: T0, killGraceMs: 0, argSpace: 1e6 });
    assert.deepEqual(d.events, [{ e: 'unworker', t: T0, host: '::1' }]);
    const added = decideAddWorkers(newState(), { op: 'add_workers', workers: [{ host: '[::1]' }] }, { now: T0, killGraceMs: 0, argSpace: 1e6 });
    assert.equal((added.events[0] as { host: string }).host, '::1');
  });

  test('the error shows control characters escaped', () => {
    assert.throws(() => validateHost('a\nb'), (e: unknown) => e instanceof UserError && e.message.includes('a\\x0ab') && !e.message.includes('\n'));
  });
});

// ---- loadState and Journal -----------------------------------------------------

/** A journal in a temp dir that mirrors a live state the way the server does. */
function journalled() {
  const dir = tempDir();
  const st = newState();
  let journal = new Journal(dir, 0, 0);
  const commit = (...evs: Event[]) => {
    let text = '';
    for (const ev of evs) { applyEvent(st, ev); st.seq++; text += JSON.stringify({ n: st.seq, ...ev }) + '\n'; }
    journal.append(text);
  };
  const reopen = (size: number, snapshotSize: number) => { fs.closeSync(journal.fd); journal = new Journal(dir, size, snapshotSize); };
  const close = () => fs.closeSync(journal.fd);
  return { dir, st, commit, reopen, close, journal: () => journal };
}

/** A run of events covering every kind, valid against the state they are applied to. */
function someHistory(st: State, commit: (...evs: Event[]) => void): void {
  commit({ e: 'worker', t: T0, host: 'a', slots: 2, ssh: true }, { e: 'worker', t: T0, host: 'b', slots: 1, ssh: false });
  commit(addEv(st, 5, { retries: 1, timeout: 30 }));
  commit({ e: 'start', t: T0 + 1, id: 1, host: 'a', slot: 0 }, { e: 'start', t: T0 + 1, id: 2, host: 'b', slot: 0 }, { e: 'start', t: T0 + 1, id: 3, host: 'a', slot: 1 });
  commit({ e: 'end', t: T0 + 2, id: 1, run: 1, code: 0 }, { e: 'end', t: T0 + 2, id: 2, run: 1, code: 1 });
  commit({ e: 'end', t: T0 + 3, id: 3, run: 1, code: 255 }, { e: 'probe', t: T0 + 4, host: 'a', ok: false, err: 'refused' });
  commit({ e: 'start', t: T0 + 5, id: 2, host: 'b', slot: 0 }, { e: 'kill', t: T0 + 6, ids: [2, 4], why: 'user', grace: 1000 });
  commit({ e: 'end', t: T0 + 7, id: 2, run: 2, code: 143 }, { e: 'remove', t: T0 + 8, ids: [5] });
  commit(addEv(st, 2), { e: 'retry', t: T0 + 9, ids: [2] }, { e: 'start', t: T0 + 10, id: 3, host: 'b', slot: 0 });
  commit({ e: 'unstart', t: T0 + 11, id: 3 }, { e: 'clean', t: T0 + 12 }, { e: 'probe', t: T0 + 13, host: 'a', ok: true });
  commit({ e: 'start', t: T0 + 14, id: 6, host: 'a', slot: 1 }, { e: 'drain', t: T0 + 15, host: 'a' });
}

/** Every file of a dir with its bytes. */
const filesOf = (dir: string) => Object.fromEntries(fs.readdirSync(dir).sort().map((f) => [f, fs.readFileSync(path.join(dir, f))]));

describe('loadState and Journal', () => {
  test('a fresh data dir loads as an empty state', () => {
    const r = loadState(tempDir());
    assert.deepEqual(view(r.state), view(newState()));
    assert.deepEqual(r.warnings, []);
  });

  test('replaying the journal gives the live state', () => {
    const j = journalled();
    someHistory(j.st, j.commit);
    j.close();
    assert.ok(j.st.jobs.size > 0 && j.st.workers.get('a')!.state === 'draining' && j.st.seq > 20, 'the history leaves jobs and a draining worker');
    const r = loadState(j.dir);
    assert.deepEqual(r.warnings, []);
    assert.deepEqual(view(r.state), view(j.st));
    assert.equal(r.journalSize, fs.statSync(path.join(j.dir, 'journal')).size);
  });

  test('snapshot, then more events: the reload equals the live state and ids are not reused', () => {
    const j = journalled();
    someHistory(j.st, j.commit);
    j.journal().snapshot(j.st);
    const header = JSON.parse(fs.readFileSync(path.join(j.dir, 'journal'), 'utf8').split('\n')[0]);
    assert.equal(header.after, j.st.seq, 'the new journal starts after the snapshot');
    const nextId = j.st.nextId;
    j.commit(addEv(j.st, 1), { e: 'start', t: T0 + 20, id: nextId, host: 'b', slot: 0 });
    j.close();
    const r = loadState(j.dir);
    assert.deepEqual(r.warnings, []);
    assert.deepEqual(view(r.state), view(j.st));
    assert.ok(r.snapshotSize > 0, 'a snapshot was loaded');

    // Reload from the snapshot alone (no job of the newest id kept): nextId survives.
    const j2 = journalled();
    j2.commit(addEv(j2.st, 3), { e: 'kill', t: T0, ids: [1, 2, 3], why: 'user', grace: 0 }, { e: 'clean', t: T0 });
    j2.journal().snapshot(j2.st);
    j2.close();
    const r2 = loadState(j2.dir);
    assert.equal(r2.state.jobs.size, 0);
    assert.equal(r2.state.nextId, 4);
  });

  test('the queue order survives a snapshot, front-queued jobs included; jobs stay in id order', () => {
    const j = journalled();
    j.commit({ e: 'worker', t: T0, host: 'a', slots: 2, ssh: false }, addEv(j.st, 4));
    j.commit({ e: 'start', t: T0, id: 1, host: 'a', slot: 0 }, { e: 'start', t: T0, id: 2, host: 'a', slot: 1 });
    j.commit({ e: 'end', t: T0, id: 2, run: 1, code: 255 }, { e: 'unstart', t: T0, id: 1 });
    assert.deepEqual(queue(j.st), [1, 2, 3, 4]);
    j.journal().snapshot(j.st);
    j.commit(addEv(j.st, 1), { e: 'start', t: T0, id: 1, host: 'a', slot: 0 }, { e: 'end', t: T0, id: 1, run: 2, code: 255 });
    j.close();
    const r = loadState(j.dir);
    assert.deepEqual(queue(r.state), [1, 2, 3, 4, 5]);
    assert.deepEqual(view(r.state), view(j.st));
    // Priorities and a finished job ahead of the queue: jobs still come in id order (as
    // list shows them), the queue in its own.
    const k = journalled();
    k.commit({ e: 'worker', t: T0, host: 'a', slots: 1, ssh: false }, addEv(k.st, 2));
    k.commit({ ...addEv(k.st, 2), priority: 5 } as Event);
    k.commit({ e: 'start', t: T0, id: 3, host: 'a', slot: 0 }, { e: 'end', t: T0, id: 3, run: 1, code: 0 });
    k.journal().snapshot(k.st);
    k.close();
    const r2 = loadState(k.dir);
    assert.deepEqual([...r2.state.jobs.keys()], [1, 2, 3, 4]);
    assert.deepEqual(queue(r2.state), [4, 1, 2]);
  });

  test('a journal whose last line was cut off loads the rest with a warning, and the next journal cuts it off', () => {
    const j = journalled();
    someHistory(j.st, j.commit);
    j.close();
    const file = path.join(j.dir, 'journal');
    const goodSize = fs.statSync(file).size;
    const expected = view(j.st);
    fs.appendFileSync(file, JSON.stringify({ n: j.st.seq + 1, e: 'clean', t: T0 }).slice(0, 12));
    const r = loadState(j.dir);
    assert.equal(r.warnings.length, 1);
    assert.match(r.warnings[0], /cut-off/);
    assert.deepEqual(view(r.state), expected);
    assert.equal(r.journalSize, goodSize);

    // The next server opens the journal at the good size and appends after it.
    const journal = new Journal(j.dir, r.journalSize, r.snapshotSize);
    const st = r.state;
    const ev: Event = { e: 'clean', t: T0 + 99 };
    applyEvent(st, ev); st.seq++;
    journal.append(JSON.stringify({ n: st.seq, ...ev }) + '\n');
    fs.closeSync(journal.fd);
    const r2 = loadState(j.dir);
    assert.deepEqual(r2.warnings, []);
    assert.deepEqual(view(r2.state), view(st));
  });

  test('a garbage line in the middle is an error naming file and line, and nothing is written', () => {
    const j = journalled();
    j.commit(addEv(j.st, 2));
    j.journal().append('{"n": 2, "e": "clea\n');
    j.commit({ e: 'clean', t: T0 });
    j.close();
    const before = filesOf(j.dir);
    assert.throws(() => loadState(j.dir), (e: unknown) => {
      assert.ok(e instanceof UserError, String(e));
      assert.equal(e.code, 1);
      assert.ok(e.message.includes(path.join(j.dir, 'journal')), e.message);
      assert.match(e.message, /line 3\b/);
      return true;
    });
    assert.deepEqual(filesOf(j.dir), before);
  });

  test('an event out of sequence is an error naming the line', () => {
    const j = journalled();
    j.commit(addEv(j.st, 1));
    j.journal().append(JSON.stringify({ n: 5, e: 'clean', t: T0 }) + '\n');
    j.close();
    assert.throws(() => loadState(j.dir), /journal' line 3: event 5 follows event 1/);
  });

  test('a header from a newer version is refused, naming the version', () => {
    const dir = tempDir();
    fs.writeFileSync(path.join(dir, 'journal'), JSON.stringify({ format: 'djs-journal', version: 99, after: 0 }) + '\n');
    const before = filesOf(dir);
    assert.throws(() => loadState(dir), (e: unknown) => e instanceof UserError && /version 99/.test(e.message) && e.message.includes('journal'));
    assert.deepEqual(filesOf(dir), before);

    const dir2 = tempDir();
    fs.writeFileSync(path.join(dir2, 'snapshot'),
      JSON.stringify({ format: 'djs-snapshot', version: 99, seq: 0, nextId: 1 }) + '\n' + JSON.stringify({ end: true, jobs: 0 }) + '\n');
    assert.throws(() => loadState(dir2), (e: unknown) => e instanceof UserError && /version 99/.test(e.message) && e.message.includes('snapshot'));
  });

  test('a snapshot without its end record is refused', () => {
    const j = journalled();
    someHistory(j.st, j.commit);
    j.journal().snapshot(j.st);
    j.close();
    const file = path.join(j.dir, 'snapshot');
    const lines = fs.readFileSync(file, 'utf8').split('\n');
    fs.writeFileSync(file, lines.slice(0, -2).join('\n') + '\n');
    assert.throws(() => loadState(j.dir), /snapshot.*incomplete/);
  });

  test('a crash between the snapshot rename and the journal reset loads the same state', () => {
    const j = journalled();
    someHistory(j.st, j.commit);
    const jfile = path.join(j.dir, 'journal');
    const oldJournal = fs.readFileSync(jfile);
    j.journal().snapshot(j.st);
    fs.writeFileSync(jfile, oldJournal);   // as if the journal was never reset
    j.close();
    const r = loadState(j.dir);
    assert.deepEqual(r.warnings, []);
    assert.deepEqual(view(r.state), view(j.st));

    // And the next server goes on from there.
    const journal = new Journal(j.dir, r.journalSize, r.snapshotSize);
    const st = r.state;
    const ev = addEv(st, 1);
    applyEvent(st, ev); st.seq++;
    journal.append(JSON.stringify({ n: st.seq, ...ev }) + '\n');
    fs.closeSync(journal.fd);
    assert.deepEqual(view(loadState(j.dir).state), view(st));
  });
});

// ---- views -----------------------------------------------------------------------

describe('statusView and formatStatus', () => {
  test('slot bars, down workers, running jobs and the queue head', () => {
    const st = newState();
    worker(st, 'node1', 2);
    worker(st, 'node2', 1, true);
    worker(st, 'node3', 1, true);
    add(st, 4, { t: T0 });
    start(st, 1, 'node1', 0, T0);
    step(st, { e: 'probe', t: T0, host: 'node2', ok: false, err: 'Connection refused' });
    start(st, 2, 'node3', 0, T0);
    end(st, 2, 255, T0 + 10);    // node3 is being checked; job 2 back to the front
    const sv = statusView(st);
    assert.deepEqual(sv.counts, { waiting: 3, running: 1, done: 0, failed: 0, killed: 0, total: 4 });
    assert.deepEqual(sv.queue.map((q) => q.id), [2, 3, 4]);
    const text = formatStatus(sv, T0 + 60_000, false);
    const lines = text.split('\n');
    const line = (host: string) => lines.find((l) => l.includes(host)) ?? assert.fail(`no line for ${host} in:\n${text}`);
    assert.match(line('node1'), /\[\*\.\]/);
    assert.match(line('node1'), /up/);
    assert.match(line('node1'), /\b1\b/);
    assert.match(line('node2'), /\[\.\]/);
    assert.match(line('node2'), /down/);
    assert.match(line('node2'), /Connection refused/);
    assert.match(line('node3'), /checking/);
    assert.match(text, /queue/);
    const qi = lines.findIndex((l) => /queue/.test(l));
    assert.match(lines[qi + 1], /^\s+2\s.*\/bin\/job\.sh arg2$/);
    assert.match(lines[qi + 2], /^\s+3\s/);
    assert.match(lines[0], /1 running/);
    assert.match(lines[0], /3 waiting/);
    assert.doesNotMatch(text, /\x1b\[/, 'no colour when off');
  });

  test('the queue head is capped and the rest counted', () => {
    const st = newState();
    add(st, 25);
    const sv = statusView(st);
    assert.ok(sv.queue.length < 25, 'the queue head is capped');
    assert.deepEqual(sv.queue.map((q) => q.id), Array.from({ length: sv.queue.length }, (_, i) => i + 1));
    assert.match(formatStatus(sv, T0, false), new RegExp(`and ${25 - sv.queue.length} more`));
  });
});

describe('jobView', () => {
  test('run time counts to now while running and to the end afterwards', () => {
    const st = newState();
    worker(st, 'a');
    add(st, 1, { timeout: 0 });
    start(st, 1, 'a', 0, T0);
    const running = jobView(st, job(st, 1), T0 + 4000);
    assert.equal(running.runtimeMs, 4000);
    assert.equal(running.state, 'running');
    assert.equal(running.worker, 'a');
    assert.equal(running.slot, 0);
    assert.equal(running.timeout, null);
    end(st, 1, 0, T0 + 2500);
    const done = jobView(st, job(st, 1), T0 + 99_000);
    assert.equal(done.runtimeMs, 2500);
    assert.equal(done.exitCode, 0);
    assert.equal(done.history.length, 1);
    assert.equal(done.history[0].worker, 'a');
  });
});


// ---- campaigns -----------------------------------------------------------------

describe('campaigns: sweeps, priorities, pause, dependencies, tags, env', () => {
  const C = { now: T0 + 1000, killGraceMs: 7000, argSpace: 200_000 };
  const decideAndApply = (st: State, decide: (st: State, req: Request, c: DecideContext) => Decision, req: Record<string, unknown>) => {
    const d = decide(st, { op: 'x', ...req }, C);
    step(st, ...d.events);
    return d;
  };
  const refusedBy = (st: State, decide: (st: State, req: Request, c: DecideContext) => Decision, req: Record<string, unknown>, msg: RegExp) => {
    const before = view(st);
    assert.throws(() => decide(st, { op: 'x', ...req }, C), (e: unknown) => e instanceof UserError && msg.test(e.message), `refused: ${msg}`);
    assert.deepEqual(view(st), before, 'a refused request changes nothing');
  };
  /** Adds jobs through the add_jobs decision with campaign fields; returns their ids. */
  const addC = (st: State, n: number, fields: Record<string, unknown> = {}) => {
    const d = decideAndApply(st, decideAddJobs, { cwd: '/w', jobs: Array.from({ length: n }, (_, i) => ['/bin/j.sh', `x${i}`]), ...fields });
    return Array.from({ length: Number(d.answer.count) }, (_, i) => Number(d.answer.first) + i);
  };
  const startable = (st: State) => [...waitingJobs(st, true)].map((j) => j.id);

  test('a sweep is the cartesian product in GNU parallel\'s order; placeholders are replaced, else values appended', () => {
    const jobs = (t: string[], l: string[][]) => [...sweepJobs(t, l)];
    assert.deepEqual(jobs(['/s', '--lr', '{1}', '--seed={2}'], [['0.1', '0.01'], ['1', '2', '3']]), [
      ['/s', '--lr', '0.1', '--seed=1'], ['/s', '--lr', '0.1', '--seed=2'], ['/s', '--lr', '0.1', '--seed=3'],
      ['/s', '--lr', '0.01', '--seed=1'], ['/s', '--lr', '0.01', '--seed=2'], ['/s', '--lr', '0.01', '--seed=3'],
    ]);
    assert.deepEqual(jobs(['/s', 'in/{}.txt', 'out/{}-{1}'], [['a b', "it's"]]), [['/s', 'in/a b.txt', 'out/a b-a b'], ['/s', "in/it's.txt", "out/it's-it's"]]);
    assert.deepEqual(jobs(['/s', '-v'], [['f1', 'f2'], ['x']]), [['/s', '-v', 'f1', 'x'], ['/s', '-v', 'f2', 'x']], 'no placeholder: values appended');
    assert.equal(checkSweep(['/s'], [['a', 'b'], ['1', '2', '3'], ['x']]), 6);
    for (const [t, l, msg] of [
      [['/s', '{3}'], [['a'], ['b']], /placeholder \{3\}.*names no ::: list/],
      [['/s', '{0}'], [['a']], /placeholder \{0\}/],
      [['/s'], [['a'], []], /::: list 2 has no values/],
      [['/s'], [], /at least one ::: list/],
      [['/s'], [Array.from({ length: 1001 }, String), Array.from({ length: 1000 }, String)], /makes 1001000 jobs, more than the 1000000 one request may add/],
    ] as const) assert.throws(() => checkSweep([...t], l.map((x) => [...x])), (e: unknown) => e instanceof UserError && e.code === 2 && msg.test(e.message), String(msg));
    assert.deepEqual(splitSweep(['a', ':::', '1', '2', ':::', 'x']), { args: ['a'], lists: [['1', '2'], ['x']] });
    assert.deepEqual(splitSweep(['a', 'b']), { args: ['a', 'b'], lists: undefined });
  });

  test('the bytes a sweep expands to are counted from its template and value lengths, as its jobs would hold them', () => {
    const expanded = (t: string[], l: string[][]) => [...sweepJobs(t, l)].reduce((n, j) => n + j.slice(1).reduce((b, a) => b + Buffer.byteLength(a), 0), 0);
    for (const [t, l] of [
      [['/s', '--lr', '{1}', '--seed={2}'], [['0.1', '0.01'], ['1', '2', '3']]],
      [['/s', 'in/{}.txt', 'out/{}-{1}-{2}{2}'], [['a b', "it's", 'é'], ['x', 'yy']]],
      [['/s', '-v'], [['f1', 'f2'], ['x'], ['ü', 'vvv', '']]],
      [['/s'], [['a']]],
      [['/s', '{3}{1}', 'plain'], [['1', '22'], ['333'], ['4444', '', '€']]],
    ] as const) assert.equal(sweepBytes([...t], l.map((x) => [...x])), expanded([...t], l.map((x) => [...x])), JSON.stringify([t, l]));
    // 14 arguments of 1,000 placeholders over 300 values of 128 characters: 67 KB asking for 512 MB.
    const big = (k: number) => [['/s', ...Array(14).fill('{}'.repeat(1000))], [Array.from({ length: k }, (_, i) => String(i).padStart(128, 'v'))]] as const;
    assert.equal(sweepBytes([...big(300)[0]], [[...big(300)[1][0]]]), 300 * 14 * 1000 * 128);
    assert.throws(() => checkSweep([...big(300)[0]], [[...big(300)[1][0]]]), (e: unknown) => e instanceof UserError && e.code === 2 && /the sweep makes 300 jobs of 512\.7 MiB .* more than the 64 MiB one request may add/.test(e.message) && /about 37 at a time fit/.test(e.hint ?? ''));
    assert.equal(checkSweep([...big(37)[0]], [[...big(37)[1][0]]]), 37);
    assert.throws(() => checkSweep(['/s', '{}'], [Array.from({ length: 1000 }, String)], MAX_ADD_BYTES / 1000), /more than the 64 MiB/, 'environment settings count for each job');
  });

  test('a sweep through add_jobs: one event, one job per combination, the journal holds the template only', () => {
    const st = newState();
    const d = decideAndApply(st, decideAddJobs, { cwd: '/w', jobs: [['/s', '{1}-{2}']], sweep: [['a', 'b'], ['1', '2']] });
    assert.equal(d.events.length, 1);
    assert.deepEqual([d.answer.first, d.answer.count], [1, 4]);
    assert.deepEqual((d.events[0] as { jobs: unknown }).jobs, [['/s', '{1}-{2}']]);
    assert.deepEqual([1, 2, 3, 4].map((id) => job(st, id).args), [['a-1'], ['a-2'], ['b-1'], ['b-2']]);
    refusedBy(st, decideAddJobs, { cwd: '/w', jobs: [['/s', '{2}']], sweep: [['a']] }, /names no ::: list/);
    refusedBy(st, decideAddJobs, { cwd: '/w', jobs: [['/s']], sweep: [['a', 'x'.repeat(200_000)]] }, /longer than the system allows/);
  });

  test('priorities: higher first, first come first served within one, a requeued job first within its own', () => {
    const st = newState();
    const low = addC(st, 2);                     // 1 2, priority 0
    const high = addC(st, 2, { priority: 5 });   // 3 4
    const neg = addC(st, 1, { priority: -1 });   // 5
    const high2 = addC(st, 1, { priority: 5, tags: ['t'] }); // 6: another lane of priority 5
    assert.deepEqual(queue(st), [...high, ...high2, ...low, ...neg]);
    worker(st, 'a');
    start(st, 4, 'a');
    end(st, 4, 255, T0 + 1000);                  // worker failure: back in front of priority 5
    assert.deepEqual(queue(st), [4, 3, 6, 1, 2, 5]);
    decideAndApply(st, decideSetPriority, { priority: 9, ids: [2] });
    assert.deepEqual(queue(st), [2, 4, 3, 6, 1, 5]);
    decideAndApply(st, decideSetPriority, { priority: -1, tag: 't' });
    assert.deepEqual(queue(st), [2, 4, 3, 1, 5, 6], 'a job given a new priority goes behind the jobs already there');
    assert.deepEqual(planStarts(st).map((p) => p.id), [2]);
    refusedBy(st, decideSetPriority, { priority: 1.5, ids: [1] }, /invalid priority/);
    refusedBy(st, decideSetPriority, { priority: '3', ids: [1] }, /invalid priority/);
    start(st, 2, 'a');
    refusedBy(st, decideSetPriority, { priority: 1, ids: [2] }, /only waiting jobs/);
    refusedBy(st, decideAddJobs, { cwd: '/w', jobs: [['/s']], priority: 2 ** 40 }, /invalid priority/);
  });

  test('pause and resume: of everything or of a tag; paused lanes are skipped, running jobs untouched', () => {
    const st = newState();
    worker(st, 'a', 4);
    const [a1] = addC(st, 1, { tags: ['a'] });
    const [b1] = addC(st, 1, { tags: ['b'] });
    const [ab] = addC(st, 1, { tags: ['a', 'b'] });
    const [plain] = addC(st, 1);
    decideAndApply(st, decidePause, { op: 'pause', tag: 'a' });
    assert.deepEqual(startable(st), [b1, plain], 'jobs with a paused tag do not start, whatever their other tags');
    assert.equal(waitReason(st, job(st, ab), queueReason(st)), 'tag a paused');
    const again = decidePause(st, { op: 'pause', tag: 'a' }, C);
    assert.deepEqual([again.events, again.answer.changed], [[], false], 'pausing twice changes nothing');
    decideAndApply(st, decidePause, { op: 'pause' });
    assert.deepEqual(planStarts(st), []);
    assert.equal(waitReason(st, job(st, b1), queueReason(st)), 'paused');
    decideAndApply(st, decidePause, { op: 'resume' });
    assert.deepEqual(startable(st), [b1, plain], 'resume lifts the pause of the queue; the tag stays paused');
    decideAndApply(st, decidePause, { op: 'resume', tag: 'a' });
    assert.deepEqual(startable(st), [a1, b1, ab, plain]);
    assert.equal(statusView(st).paused, false);
    refusedBy(st, decidePause, { op: 'pause', tag: 'bad tag' }, /invalid tag/);
  });

  test('dependencies: held until every one is done; a failure fails the chain at once, each with its reason', () => {
    const st = newState();
    worker(st, 'a', 2);
    const [d1, d2] = addC(st, 2);
    const [x] = addC(st, 1, { after: [d2, d1, d1] });
    const [y] = addC(st, 1, { after: [x] });
    const [z] = addC(st, 1, { after: [y] });
    assert.deepEqual(job(st, x).after, [d1, d2], 'sorted, without repeats');
    assert.deepEqual(queue(st), [d1, d2], 'held jobs are in no lane');
    assert.equal(waitReason(st, job(st, x), queueReason(st)), `after ${d1},${d2}`);
    start(st, d1, 'a', 0); start(st, d2, 'a', 1);
    end(st, d1, 0);
    assert.equal(waitReason(st, job(st, x), queueReason(st)), `after ${d2}`);
    assert.deepEqual(queue(st), []);
    end(st, d2, 0);
    assert.deepEqual(queue(st), [x], 'queued once its last dependency is done');
    start(st, x, 'a', 0);
    end(st, x, 3);
    assert.deepEqual([y, z].map((id) => [job(st, id).state, job(st, id).reason]), [['failed', `dependency ${x} failed`], ['failed', `dependency ${y} failed`]]);
    // Retry: alone it is refused (it would wait for ever); together with its dependency it waits.
    refusedBy(st, decideRetry, { ids: [y] }, new RegExp(`waits for job ${x}, which ended failed`));
    decideAndApply(st, decideRetry, { ids: [z, y, x] });
    assert.deepEqual(queue(st), [x]);
    assert.deepEqual([job(st, y).blockers, job(st, z).blockers], [1, 1]);
    // Unknown, failed and forgotten dependencies are refused at add.
    refusedBy(st, decideAddJobs, { cwd: '/w', jobs: [['/s']], after: [99] }, /no such job '99' to wait for/);
    const [f] = addC(st, 1);
    stop(st, [f], 'user');
    refusedBy(st, decideAddJobs, { cwd: '/w', jobs: [['/s']], after: [f] }, /has already ended killed/);
    refusedBy(st, decideAddJobs, { cwd: '/w', jobs: [['/s']], after: ['1'] }, /invalid job id/);
  });

  test('bulk retry leaves out the jobs that cannot run again (and says why); remove of a job with its dependent removes both; a killed dependency is named killed; a job killed while waiting shows no earlier run', () => {
    const st = newState();
    worker(st, 'a', 4);
    const [long] = addC(st, 1);
    const [after] = addC(st, 1, { after: [long] });
    const [bad] = addC(st, 1);
    start(st, long, 'a', 0); start(st, bad, 'a', 1);
    end(st, bad, 3);
    stop(st, [long], 'user');
    end(st, long, 143);
    assert.deepEqual([job(st, after).state, job(st, after).reason], ['failed', `dependency ${long} killed`]);
    // --failed: job `after` waits for a killed job no one retries: left out, the rest go.
    const d = decideAndApply(st, decideRetry, { failed: true });
    assert.deepEqual(d.answer, { ids: [bad], skipped: [{ id: after, why: `job ${after} waits for job ${long}, which ended killed`, hint: `retry both: retry ${long} ${after}` }] });
    assert.equal(job(st, bad).state, 'waiting');
    refusedBy(st, decideRetry, { ids: [after] }, new RegExp(`^job '${after}' waits for job ${long}, which ended killed$`));
    // Removed together, a job and the one held for it both go, whatever the order given.
    step(st, { e: 'pause', t: T0 });
    const [p] = addC(st, 1);
    const [q] = addC(st, 1, { after: [p] });
    const r = decideAndApply(st, decideRemoveJobs, { ids: [p, q, p] });
    assert.deepEqual(r.answer, { ids: [p, q] });
    assert.deepEqual([st.jobs.has(p), st.jobs.has(q)], [false, false]);
    // A job killed while it waits (after an earlier run) has no run time or worker of its own.
    decideAndApply(st, decideRetry, { ids: [long, after] });
    step(st, { e: 'kill', t: T0 + 9000, ids: [long], why: 'user', grace: 1000 });
    const v = jobView(st, job(st, long), T0 + 9000);
    assert.deepEqual([v.state, v.reason, v.runtimeMs, v.worker, v.attempts], ['killed', 'killed before it started', null, null, 1]);
  });

  test('dependencies: a job cleaned after it ended done counts as done; a removed one fails its dependents', () => {
    const st = newState();
    worker(st, 'a');
    const [d] = addC(st, 1);
    start(st, d, 'a'); end(st, d, 0);
    decideAndApply(st, decideClean, {});
    const [after] = addC(st, 1, { after: [d] });
    assert.deepEqual(queue(st), [after], 'a cleaned done job is done');
    const [w] = addC(st, 1);
    const [held] = addC(st, 1, { after: [w] });
    decideAndApply(st, decideRemoveJobs, { ids: [w] });
    assert.deepEqual([job(st, held).state, job(st, held).reason], ['failed', `dependency ${w} removed`]);
    refusedBy(st, decideAddJobs, { cwd: '/w', jobs: [['/s']], after: [w] }, new RegExp(`no such job '${w}' to wait for`));
  });

  test('dependencies: kill of a job and its dependents kills each; a retried done dependency holds its dependents again', () => {
    const st = newState();
    worker(st, 'a');
    const [d] = addC(st, 1, { tags: ['c'] });
    const [e] = addC(st, 1, { tags: ['c'], after: [d] });
    decideAndApply(st, decideKill, { tag: 'c' });
    assert.deepEqual([job(st, d).state, job(st, e).state], ['killed', 'killed']);
    const [p, q] = addC(st, 2);
    const [r] = addC(st, 1, { after: [p, q] });
    start(st, p, 'a'); end(st, p, 0);
    assert.equal(job(st, r).blockers, 1);
    decideAndApply(st, decideRetry, { ids: [p] });
    assert.equal(job(st, r).blockers, 2, 'it waits for the new run of its dependency');
    assert.equal(waitReason(st, job(st, r), queueReason(st)), `after ${p},${q}`);
  });

  test('tags: ops act on one tag, counts per tag, an unknown tag is an error', () => {
    const st = newState();
    worker(st, 'a', 2);
    const [a1, a2, a3] = addC(st, 3, { tags: ['sweep', 'lr'] });
    const [b1] = addC(st, 1, { tags: ['other'] });
    start(st, a1, 'a', 0); end(st, a1, 1);
    start(st, a2, 'a', 0);
    assert.deepEqual(statusView(st).tags.map((t) => [t.tag, t.failed, t.running, t.waiting, t.total]),
      [['lr', 1, 1, 1, 3], ['other', 0, 0, 1, 1], ['sweep', 1, 1, 1, 3]]);
    assert.deepEqual(decideKill(st, { op: 'kill', tag: 'sweep' }, C).answer.ids, [a2, a3], 'kill --tag: its running and waiting jobs');
    assert.deepEqual(decideRemoveJobs(st, { op: 'remove_jobs', tag: 'sweep' }, C).answer.ids, [a3]);
    assert.deepEqual(decideRetry(st, { op: 'retry', tag: 'sweep' }, C).answer.ids, [a1]);
    assert.deepEqual(decideClean(st, { op: 'clean', tag: 'other' }, C).answer.count, 0);
    decideAndApply(st, decideClean, { tag: 'sweep' });
    assert.ok(st.jobs.has(a2) && !st.jobs.has(a1) && st.jobs.has(b1), 'clean --tag forgets only that tag\'s finished jobs');
    refusedBy(st, decideKill, { tag: 'nope' }, /no job has the tag 'nope'/);
    refusedBy(st, decideAddJobs, { cwd: '/w', jobs: [['/s']], tags: ['-x'] }, /invalid tag/);
  });

  test('status shows a screenful of tags, the unfinished first, and counts the rest', () => {
    const st = newState();
    worker(st, 'w', 1);
    for (let i = 0; i < 25; i++) addC(st, 1, { tags: [`t${String(i).padStart(2, '0')}`] });
    start(st, 1, 'w'); end(st, 1, 0);
    const text = formatStatus(statusView(st), T0, false);
    const lines = text.split('\n').filter((l) => /^ {2}t\d\d /.test(l));
    assert.equal(lines.length, 20);
    assert.ok(!lines.some((l) => l.startsWith('  t00 ')), 'the finished tag t00 gives way to unfinished ones');
    assert.match(text, /… and 5 more tags/);
  });

  test('env: NAME=VALUE with a plain name, never a variable the server sets; values keep any byte but NUL', () => {
    assert.deepEqual(envOf(['A=1', 'B_2=x=y', 'C=', 'D=\u00e9 \n\t\'"']), ['A=1', 'B_2=x=y', 'C=', 'D=\u00e9 \n\t\'"']);
    for (const [bad, msg] of [['1A=x', /invalid environment setting/], ['A', /invalid environment setting/], ['A-B=1', /invalid/], ['JOB_ID=3', /set by the server/], ['SLAVE_IP=h', /set by the server/], ['A=\0', /NUL/]] as const) {
      assert.throws(() => envOf([bad]), (e: unknown) => e instanceof UserError && e.code === 2 && msg.test(e.message), bad);
    }
    const st = newState();
    const [id] = addC(st, 1, { env: ['LR=0.1'] });
    assert.deepEqual(job(st, id).env, ['LR=0.1']);
  });
});

// ---- placement -------------------------------------------------------------------

describe('placement: labels, GPUs, multi-slot jobs, requirements, policies, no starvation', () => {
  const C = { now: T0 + 1000, killGraceMs: 7000, argSpace: 200_000 };
  const apply = (st: State, d: Decision) => { step(st, ...d.events); return d; };
  const addW = (st: State, workers: Record<string, unknown>[]) => apply(st, decideAddWorkers(st, { op: 'add_workers', workers, skipCheck: true }, C));
  const addN = (st: State, n: number, fields: Record<string, unknown> = {}) => {
    const d = apply(st, decideAddJobs(st, { op: 'add_jobs', cwd: '/w', jobs: Array.from({ length: n }, (_, i) => ['/bin/j.sh', `x${i}`]), ...fields }, C));
    return Array.from({ length: Number(d.answer.count) }, (_, i) => Number(d.answer.first) + i);
  };
  /** Applies the plan's starts; returns them as "id@host:slots/gpus". */
  const run = (st: State) => {
    const plan = planStarts(st);
    for (const p of plan) step(st, { e: 'start', t: T0, ...p });
    return plan.map((p) => `${p.id}@${p.host}:${(p.slots ?? [p.slot]).join(',')}${p.gpus ? `/${p.gpus.join(',')}` : ''}`);
  };

  test('labels, --require, --avoid and --host choose the workers a job may run on', () => {
    const st = newState();
    addW(st, [{ host: 'gpu1', slots: 2, labels: ['gpu', 'fast'] }, { host: 'cpu1', slots: 2, labels: ['fast'] }, { host: 'old', slots: 2, labels: ['slow'] }]);
    const [g] = addN(st, 1, { require: ['gpu'] });
    const [notSlow1, notSlow2, notSlow3] = addN(st, 3, { avoid: ['slow'] });
    const [onOld] = addN(st, 1, { hosts: ['old'] });
    const started = run(st);
    const where = new Map(started.map((x) => [Number(x.split('@')[0]), x.split('@')[1].split(':')[0]]));
    assert.equal(where.get(g), 'gpu1');
    for (const id of [notSlow1, notSlow2, notSlow3]) assert.notEqual(where.get(id), 'old', `job ${id} avoids label slow`);
    assert.equal(where.get(onOld), 'old');
    assert.equal(started.length, 5);
    assert.equal(admits(st.workers.get('cpu1')!, needOf({ op: 'x', require: ['fast'], avoid: ['gpu'] })), true);
    assert.equal(admits(st.workers.get('gpu1')!, needOf({ op: 'x', require: ['fast'], avoid: ['gpu'] })), false);
    assert.throws(() => needOf({ op: 'x', require: ['a'], avoid: ['a'] }), /both required and avoided/);
    assert.throws(() => needOf({ op: 'x', slots: 0 }), /invalid slot count/);
    assert.equal(needOf({ op: 'x' }), PLAIN_NEED);
  });

  test('GPUs by index: a job gets free indices of one worker; no index is ever held twice', () => {
    const st = newState();
    addW(st, [{ host: 'g', slots: 8, gpus: 4, labels: ['gpu'] }]);
    const [a, b, c, d] = [addN(st, 1, { gpus: 2 })[0], addN(st, 1, { gpus: 1 })[0], addN(st, 1, { gpus: 2 })[0], addN(st, 1, { gpus: 1 })[0]];
    assert.deepEqual(run(st), [`${a}@g:0/0,1`, `${b}@g:1/2`], 'job c (2 GPUs) does not fit in the one GPU left, and d, behind it, does not take it');
    end(st, a, 0);
    assert.deepEqual(run(st), [`${c}@g:0/0,1`, `${d}@g:2/3`]);
    assert.deepEqual(st.workers.get('g')!.gpuJobs, [c, c, b, d]);
  });

  test('a job of K slots takes K slots of one worker, never spread over two', () => {
    const st = newState();
    addW(st, [{ host: 'a', slots: 2 }, { host: 'b', slots: 3 }]);
    const [big] = addN(st, 1, { slots: 3 });
    const [small] = addN(st, 1);
    assert.deepEqual(run(st), [`${big}@b:0,1,2`, `${small}@a:0`]);
    const [tooBig] = addN(st, 1, { slots: 4 });
    assert.equal(waitReason(st, job(st, tooBig), queueReason(st)), 'no worker has 4 slots on one worker');
    const warned = decideAddJobs(st, { op: 'add_jobs', cwd: '/w', jobs: [['/s']], slots: 4 }, C);
    assert.match(String(warned.answer.warning), /no worker can take this job now \(4 slots on one worker\)/);
    end(st, big, 0);
    assert.deepEqual(st.workers.get('b')!.running, [0, 0, 0], 'all its slots are free again');
  });

  test('policies: spread takes the most free slots, pack the fewest that fit, sequential the first added; aliases; durable', () => {
    const mk = (policy?: string) => {
      const st = newState();
      addW(st, [{ host: 'a', slots: 4 }, { host: 'b', slots: 2 }, { host: 'c', slots: 3 }]);
      if (policy) apply(st, decidePolicy(st, { op: 'policy', name: policy }, C));
      addN(st, 3);
      return run(st).map((x) => x.split('@')[1].split(':')[0]);
    };
    // a has 4 free, c 3, b 2; ties go to the worker added first.
    assert.deepEqual(mk(), ['a', 'a', 'c'], 'spread is the default');
    assert.deepEqual(mk('pack'), ['b', 'b', 'c']);
    assert.deepEqual(mk('frugal'), ['b', 'b', 'c'], 'frugal = pack');
    assert.deepEqual(mk('smart'), ['a', 'a', 'c'], 'smart = spread');
    assert.deepEqual(mk('sequential'), ['a', 'a', 'a']);
    const r = mk('random');
    assert.equal(r.length, 3);
    const st = newState();
    assert.deepEqual(decidePolicy(st, { op: 'policy' }, C).answer, { policy: 'spread' });
    assert.throws(() => decidePolicy(st, { op: 'policy', name: 'fastest' }, C), /unknown policy 'fastest'/);
  });

  test('no starvation: a 4-slot job waiting for a busy worker starts before any of 100 later 1-slot jobs', () => {
    const st = newState();
    addW(st, [{ host: 'w', slots: 4 }]);
    const first = addN(st, 4);
    run(st);
    const [big] = addN(st, 1, { slots: 4 });
    const later = addN(st, 100);
    for (const id of first) {
      end(st, id, 0);
      const started = run(st);
      if (id !== first[3]) assert.deepEqual(started, [], `a slot freed by job ${id} is kept for the 4-slot job`);
      else assert.deepEqual(started, [`${big}@w:0,1,2,3`]);
    }
    end(st, big, 0);
    assert.equal(run(st).length, 4);
    assert.ok(later.slice(0, 4).every((id) => job(st, id).state === 'running'));
  });

  test('no starvation, and other workers keep filling: the waiting big job holds back only the worker it waits for', () => {
    const st = newState();
    addW(st, [{ host: 'big', slots: 4 }, { host: 'small', slots: 2 }]);
    const first = addN(st, 4, { hosts: ['big'] });
    run(st);
    const [bigJob] = addN(st, 1, { slots: 4 });
    const later = addN(st, 3);
    end(st, first[0], 0);
    assert.deepEqual(run(st), [`${later[0]}@small:0`, `${later[1]}@small:1`], 'the small worker takes small jobs; the big one, one slot free, takes nothing');
    assert.equal(waitReason(st, job(st, bigJob), queueReason(st)), 'waiting for 4 slots on one worker');
  });

  test('jobs nobody can take cost one look per lane: 10,000 of them ahead do not keep plain jobs waiting', () => {
    const st = newState();
    addW(st, [{ host: 'w', slots: 2 }]);
    addN(st, 10_000, { require: ['gpu'] });
    const plain = addN(st, 2);
    assert.deepEqual(run(st), [`${plain[0]}@w:0`, `${plain[1]}@w:1`]);
    assert.equal(waitReason(st, job(st, 1), queueReason(st)), 'no worker has label gpu');
    assert.match(formatStatus(statusView(st), T0, false), /^ +1 .*j\.sh x0 {2}\(no worker has label gpu\)$/m, 'status says why the head of the queue waits');
    assert.equal(describeNeed(needOf({ op: 'x', slots: 2, gpus: 1, require: ['a'], avoid: ['b'], hosts: ['h'] })), '2 slots on one worker, 1 GPU, label a, not label b, host h');
  });

  test('whyHeld says why none of a wait\'s jobs can start, with the way out, and nothing while one is only waiting its turn', () => {
    const st = newState();
    addW(st, [{ host: 'w', slots: 1 }]);
    const [busy] = addN(st, 1);
    run(st);
    const sweep = addN(st, 3, { tags: ['sweep'] });
    assert.equal(whyHeld(st, sweep), null, 'next in line: the queue decides');
    step(st, { e: 'pause', t: T0, tag: 'sweep' });
    assert.equal(whyHeld(st, sweep), 'tag sweep is paused: resume with cli.ts resume --tag sweep');
    const gpu = addN(st, 2, { require: ['gpu'] });
    assert.equal(whyHeld(st, [...gpu, ...sweep]), 'tag sweep is paused: resume with cli.ts resume --tag sweep; no worker has label gpu: add one with add_slave', 'the two reasons, the most common first');
    const later = addN(st, 1, { after: [busy] });
    assert.equal(whyHeld(st, later), 'their --after dependencies have not all ended');
    assert.equal(whyHeld(st, [busy, 999]), null, 'a running job and an unknown id hold nothing');
    step(st, { e: 'resume', t: T0, tag: 'sweep' });
    assert.equal(whyHeld(st, [...gpu, ...sweep]), null, 'one of them only waits its turn');
  });

  test('a worker added again gets the new labels, GPUs and environment; auto needs the login check; the size a host prints', () => {
    const st = newState();
    addW(st, [{ host: 'h', slots: 2, labels: ['a'], gpus: 2, env: ['CUDA_HOME=/opt/cuda'] }]);
    addW(st, [{ host: 'h', slots: 4, labels: ['b'] }]);
    const w = st.workers.get('h')!;
    assert.deepEqual([w.slots, w.labels, w.gpus, w.env], [4, ['b'], 0, null]);
    assert.throws(() => decideAddWorkers(st, { op: 'add_workers', workers: [{ host: 'x', auto: true }], skipCheck: true }, C), /auto needs the ssh login check/);
    assert.throws(() => decideAddWorkers(st, { op: 'add_workers', workers: [{ host: 'x', env: ['JOB_ID=1'] }], skipCheck: true }, C), /set by the server/);
    assert.deepEqual(parseSize('16\nGPU 0: NVIDIA A100 (UUID: GPU-1)\nGPU 1: NVIDIA A100 (UUID: GPU-2)\n'), { cpus: 16, gpus: 2 });
    assert.deepEqual(parseSize('8\n'), { cpus: 8, gpus: 0 });
    assert.equal(parseSize('bash: nproc: command not found\n'), null);
  });
});

describe('textOf and bytesOf: bytes that are not UTF-8', () => {
  test('any bytes survive the trip through a string and JSON; valid UTF-8 is plain text', () => {
    const rnd = prng(7);
    for (let n = 0; n < 2000; n++) {
      const buf = Buffer.from(Array.from({ length: Math.floor(rnd() * 12) }, () => (rnd() < 0.5 ? Math.floor(rnd() * 256) : [0xc3, 0xa9, 0xe2, 0x82, 0xac, 0xf0, 0x9f, 0x98, 0x80, 0xed, 0xa0, 0x80, 0xc0, 0xaf][Math.floor(rnd() * 14)])));
      const text = textOf(buf);
      assert.deepEqual(bytesOf(JSON.parse(JSON.stringify(text))), buf, `bytes ${buf.toString('hex')}`);
    }
    assert.equal(textOf(Buffer.from('plain é € 😀')), 'plain é € 😀');
    assert.equal(textOf(Buffer.from([0x61, 0xff])), 'a\udcff');
    assert.equal(textOf(Buffer.from([0xc0, 0xaf])), '\udcc0\udcaf', 'an overlong form is two bytes');
    assert.deepEqual(bytesOf('😀'), Buffer.from([0xf0, 0x9f, 0x98, 0x80]), 'a surrogate pair is a character, not two escapes');
    assert.equal(shellQuote('a\udcffb'), "$'a\\xffb'");
    assert.equal(shellQuote("it's\udcfe"), "$'it\\'s\\xfe'");
  });
});

// ---- the first day: a worker taken down gets no job; re-adding a host; unknown tags ----

import { newHealth as newHealthM3, HEARTBEAT_MISSES as MISSES_M3, reAdded, checkOutcome } from '../cli.ts';

describe('first day: plan, re-added workers, pause of an unknown tag', () => {
  test('a worker whose heartbeats missed their limit goes down and gets no job in the same plan, even with a free slot', () => {
    const st = newState();
    worker(st, 'a', 2, true);
    add(st, 2);
    start(st, 1, 'a');
    const H = 30_000, now = T0 + 200_000;
    const rt = newRuntime();
    // The last answer came before the heartbeats that went unanswered for 100 s.
    rt.health.set('a', { ...newHealthM3(), okAt: now - 130_000, sentAt: now - 100_000, missingSince: now - 100_000, busy: true });
    assert.ok(100_000 >= MISSES_M3 * H, 'the limit has passed');
    const p = plan(st, rt, now, 5000, { heartbeatMs: H, probeMaxMs: PROBE_BACKOFF_MAX_MS });
    assert.deepEqual(p.events.map((e) => e.e), ['probe'], 'only the down event: no start on the worker it takes down');
    step(st, ...p.events);
    assert.equal(st.workers.get('a')!.state, 'down');
    assert.equal(job(st, 2).state, 'waiting');
  });

  test('pause --tag of a tag no job has is refused, unless --ahead pauses it before its jobs; resume of an unknown tag is refused', () => {
    const st = newState();
    worker(st, 'a', 2);
    const C = { now: T0, killGraceMs: 5000, argSpace: 200_000 };
    const refused = (req: Request, re: RegExp) => assert.throws(() => decidePause(st, req, C), (e: unknown) => e instanceof UserError && e.code === 1 && re.test(e.message));
    refused({ op: 'pause', tag: 'nosuchtag' }, /^no job has the tag 'nosuchtag'$/);
    refused({ op: 'resume', tag: 'nosuchtag2' }, /^no job has the tag 'nosuchtag2'$/);
    assert.throws(() => decidePause(st, { op: 'pause', ahead: true }, C), /--ahead goes with pause --tag/);
    const d = decidePause(st, { op: 'pause', tag: 'nightly', ahead: true }, C);
    assert.deepEqual([d.events, d.answer.noJobs], [[{ e: 'pause', t: T0, tag: 'nightly' }], true]);
    step(st, ...d.events);
    const again = decidePause(st, { op: 'pause', tag: 'nightly' }, C);
    assert.deepEqual([again.events, again.answer.changed], [[], false], 'a paused tag is known: pausing it again changes nothing');
    const nightly = st.nextId;
    step(st, { e: 'add', t: T0, id: nightly, cwd: '/w', retries: 0, timeout: 0, jobs: [['/bin/j.sh']], tags: ['nightly'] });
    const [plain] = add(st, 1);
    assert.deepEqual(planStarts(st).map((s) => s.id), [plain], 'the job of the tag paused ahead waits; others start');
    const r = decidePause(st, { op: 'resume', tag: 'nightly' }, C);
    step(st, ...r.events);
    assert.deepEqual(planStarts(st).map((s) => s.id), [nightly, plain]);
  });
  test('a worker added again says what changed, and warns when waiting jobs no longer fit any worker', () => {
    const st = newState();
    const C = { now: T0, killGraceMs: 5000, argSpace: 200_000 };
    const addW = (workers: Record<string, unknown>[]) => { const d = decideAddWorkers(st, { op: 'add_workers', workers, skipCheck: true }, C); step(st, ...d.events); return d.answer; };
    assert.deepEqual(addW([{ host: 'node3', slots: 3, labels: ['gpu'], gpus: 2 }, { host: 'cpu', slots: 2 }]).changes, undefined, 'new workers change nothing');
    const gpuJobs = decideAddJobs(st, { op: 'add_jobs', cwd: '/w', jobs: [['/bin/j.sh', 'a'], ['/bin/j.sh', 'b']], gpus: 1, require: ['gpu'] }, C);
    step(st, ...gpuJobs.events);
    add(st, 3); // plain jobs: they fit the cpu worker
    const again = addW([{ host: 'node3', slots: 3 }]);
    assert.deepEqual(again.changes, ['node3: labels gpu -> none, gpus 2 -> 0']);
    assert.equal(again.warning, '2 waiting jobs no longer fit any worker (1 GPU, label gpu); they wait until one is added');
    assert.deepEqual([st.workers.get('node3')!.labels, st.workers.get('node3')!.gpus], [[], 0], 'the re-add still takes only what it gives');
    const back = addW([{ host: 'node3', slots: 4, labels: ['gpu'], gpus: 2, env: ['A=1'] }]);
    assert.deepEqual(back, { added: [{ host: 'node3', slots: 4, gpus: 2, labels: ['gpu'] }], changes: ['node3: slots 3 -> 4, labels none -> gpu, gpus 0 -> 2, env none -> A=1'] }, 'jobs that fit again: no warning');
    assert.deepEqual(addW([{ host: 'node3', slots: 4, labels: ['gpu'], gpus: 2, env: ['A=1'] }]).changes, undefined, 'the same again: nothing changed');
    assert.deepEqual(reAdded(st, [{ e: 'worker', t: T0, host: 'cpu', slots: 1, ssh: false }]), { changes: ['cpu: slots 2 -> 1'] }, 'plain jobs still fit a smaller worker');
  });
  test('the answer to a check: a probe brings a worker up or takes it down; a failed heartbeat takes an up ssh worker down; a routine answer changes nothing', () => {
    const st = newState();
    worker(st, 'a', 2, true);
    step(st, { e: 'worker', t: T0, host: 'r', slots: 1, ssh: true, rod: true });
    worker(st, 'plain', 1, false);
    const [id] = add(st, 1);
    start(st, id, 'r');
    const out = (host: string, kind: 'probe' | 'heartbeat', err: string | null, t = T0 + 1000) => checkOutcome(st, host, kind, err, t, 60_000, 5000);
    assert.deepEqual(out('a', 'probe', null), { events: [], log: null }, 'an up worker found as it was');
    assert.deepEqual(out('a', 'heartbeat', null), { events: [], log: null });
    assert.deepEqual(out('gone', 'probe', 'refused'), { events: [], log: null }, 'a worker removed meanwhile');
    assert.deepEqual(out('plain', 'heartbeat', 'refused'), { events: [], log: null }, 'a worker added without the check is never taken down');
    const down = out('a', 'heartbeat', 'Connection refused');
    assert.deepEqual(down, { events: [{ e: 'probe', t: T0 + 1000, host: 'a', ok: false, err: 'Connection refused', max: 60_000 }], log: 'worker a is down: Connection refused' });
    step(st, ...down.events);
    assert.equal(st.workers.get('a')!.state, 'down');
    assert.deepEqual(out('a', 'heartbeat', 'Connection refused'), { events: [], log: null }, 'a late heartbeat of a down worker changes nothing');
    const again = out('a', 'probe', 'Connection refused', T0 + 7000);
    assert.deepEqual([again.events.map((e) => e.e), again.log], [['probe'], null], 'still down: a longer backoff, no new line');
    step(st, ...again.events);
    assert.equal(st.workers.get('a')!.probeDelay, 10_000);
    const up = out('a', 'probe', null, T0 + 20_000);
    assert.deepEqual(up, { events: [{ e: 'probe', t: T0 + 20_000, host: 'a', ok: true }], log: 'worker a is up again' });
    step(st, ...up.events);
    assert.equal(st.workers.get('a')!.state, 'up');
    const rod = out('r', 'probe', 'no answer within 15s');
    assert.deepEqual(rod.events.map((e) => e.e), ['probe', 'kill'], 'with --requeue-on-down its running job is stopped to be queued again');
    assert.equal(rod.log, 'worker r is down: no answer within 15s');
  });
});

describe('--on-worker, --workdir and --name in the core', () => {
  const C2: DecideContext = { now: T0, argSpace: 2_000_000 } as DecideContext;
  const apply = (st: State, d: Decision) => { for (const e of d.events) applyEvent(st, e); return d; };

  test('add_jobs with onWorker takes a bare command and keeps onWorker, workdir and the names (filled per sweep job) in the add event and the jobs', () => {
    const st = newState();
    const d = apply(st, decideAddJobs(st, { op: 'add_jobs', cwd: '/w', jobs: [['python', 'train.py', '--lr', '{1}', '--seed', '{2}']], sweep: [['0.1', '0.01'], ['1', '2']], onWorker: true, workdir: '~/runs', name: 'lr{1}-s{2}' }, C2));
    const ev = d.events[0] as Extract<Event, { e: 'add' }>;
    assert.deepEqual([ev.onw, ev.workdir, ev.name], [true, '~/runs', 'lr{1}-s{2}']);
    assert.deepEqual([...st.jobs.values()].map((j) => [j.script, j.args[2], j.args[4], j.name, j.onWorker, j.workdir]), [
      ['python', '0.1', '1', 'lr0.1-s1', true, '~/runs'], ['python', '0.1', '2', 'lr0.1-s2', true, '~/runs'],
      ['python', '0.01', '1', 'lr0.01-s1', true, '~/runs'], ['python', '0.01', '2', 'lr0.01-s2', true, '~/runs'],
    ]);
    const view = jobView(st, st.jobs.get(1)!, T0);
    assert.deepEqual([view.name, view.onWorker, view.workdir, view.runsOn], ['lr0.1-s1', true, '~/runs', 'worker']);
    assert.equal(commandText(view), "[lr0.1-s1] --on-worker python train.py --lr 0.1 --seed 1");
    // A script job: runs here, no name, and its add event carries none of the new fields.
    const plain = decideAddJobs(st, { op: 'add_jobs', cwd: '/w', jobs: [['/bin/true']] }, C2).events[0] as Extract<Event, { e: 'add' }>;
    assert.deepEqual([plain.onw, plain.workdir, plain.name], [undefined, undefined, undefined]);
    apply(st, { events: [plain], answer: {} });
    const pv = jobView(st, st.jobs.get(5)!, T0);
    assert.deepEqual([pv.name, pv.onWorker, pv.workdir, pv.runsOn], [null, false, null, 'here']);
    assert.equal(JSON.stringify(st.jobs.get(5)).includes('onWorker'), false, 'a script job costs the snapshot nothing more');
  });

  test('refusals: a relative script without onWorker, --workdir without --on-worker, bad workdirs and names, a name a sweep makes a number, a command too long for ssh', () => {
    const st = newState();
    const refused = (req: Record<string, unknown>, re: RegExp) => assert.throws(() => decideAddJobs(st, { op: 'add_jobs', cwd: '/w', jobs: [['x']], ...req } as Request, C2), (e: UserError) => e.code === 2 && re.test(e.message));
    refused({}, /script path is not absolute/);
    refused({ jobs: [['/bin/x']], workdir: '/tmp' }, /--workdir is for --on-worker/);
    for (const w of ['rel', '~user/x', '', 5]) refused({ onWorker: true, workdir: w }, /invalid workdir/);
    for (const n of ['7', '-x', 'a\nb', '', 'x'.repeat(201), 3]) refused({ onWorker: true, name: n }, /invalid job name/);
    refused({ onWorker: true, name: '{1}', jobs: [['x', '{1}']], sweep: [['a', '2']] }, /invalid job name '2'/);
    refused({ onWorker: true, jobs: [['']] }, /needs a name/);
    refused({ onWorker: true, jobs: [['echo', 'x'.repeat(ON_WORKER_MAX_BYTES)]] }, /that go to the worker with it/);
    assert.equal(decideAddJobs(st, { op: 'add_jobs', cwd: '/w', jobs: [['echo', 'x'.repeat(ON_WORKER_MAX_BYTES - 100)]], onWorker: true }, C2).events.length, 1);
    assert.equal(workdirOf('~'), '~');
    assert.equal(nameOf('{1}', true), '{1}');
  });

  test('idsNamed: one id per name; none or several is an error that names them', () => {
    const st = newState();
    apply(st, decideAddJobs(st, { op: 'add_jobs', cwd: '/w', jobs: [['/a']], name: 'a' }, C2));
    apply(st, decideAddJobs(st, { op: 'add_jobs', cwd: '/w', jobs: [['/b'], ['/b']], name: 'b' }, C2));
    assert.deepEqual(idsNamed(st, ['a']), [1]);
    assert.throws(() => idsNamed(st, ['b']), /2 jobs are named 'b': 2, 3/);
    assert.throws(() => idsNamed(st, ['c']), /no job is named 'c'/);
    assert.deepEqual([...sweepValues([['x', 'y'], ['1']])], [['x', '1'], ['y', '1']]);
    assert.equal(fillPlaceholders('{}-{2}-{3}', ['a', 'b']), 'a-b-{3}');
  });

  test('onWorkerLaunch: a local worker runs the command itself; Slurm without a login host srun; an ssh worker (or a login host) ssh with a line of hex words', () => {
    const j = { id: 7, script: 'python', args: ['t.py', 'a b'], cwd: '/w', slots: 2, gpus: [1, 3], timeout: 90 };
    const env = ['JOB_ID=7', 'SLAVE_IP=h'];
    assert.deepEqual(onWorkerLaunch(j, { host: 'local2', slurm: null }, env, ['-F', 'cfg'], 5, '/home/me'),
      { script: 'python', args: ['t.py', 'a b'], cwd: '/w', env: ['CUDA_VISIBLE_DEVICES=1,3'] });
    assert.equal(onWorkerLaunch({ ...j, workdir: '~/r' }, { host: 'local', slurm: null }, env, [], 5, '/home/me').cwd, '/home/me/r');
    assert.deepEqual(onWorkerLaunch(j, { host: 'slurm:gpu', slurm: { partition: 'gpu', login: null } }, env, [], 5, '/home/me'), {
      script: 'srun', args: ['--job-name=djs-7', '--partition=gpu', '--ntasks=1', '--cpus-per-task=2', '--gpus=2', '--time=2', '--chdir=/w', 'python', 't.py', 'a b'], cwd: '/w', env: [],
    });
    // ssh's argument list holds the watcher's code only; the job goes on its standard input,
    // from the environment of the sh that starts it.
    const ssh = onWorkerLaunch(j, { host: 'node1', slurm: null }, env, ['-F', 'cfg'], 5, '/home/me');
    assert.deepEqual([ssh.script, ssh.args[0], ...ssh.args.slice(2), ssh.cwd], ['/bin/sh', '-c', 'djs-on-worker', '-F', 'cfg', '--', 'node1', ON_WORKER_LINE, '/']);
    assert.match(ON_WORKER_LINE, /^exec perl -e '[^']*' [0-9a-f]+$/);
    assert.deepEqual(ssh.env, [`DJS_ON_WORKER_INPUT=${onWorkerInput(['python', 't.py', 'a b'], [...env, 'CUDA_VISIBLE_DEVICES=1,3'], '/w', 5)}`]);
    assert.match(ssh.env[0], /^DJS_ON_WORKER_INPUT=5 3 x2f77( x[0-9a-f]+)+$/);
    const login = onWorkerLaunch(j, { host: 'slurm:cpu@login1', slurm: { partition: 'cpu', login: 'login1' } }, env, [], 5, '/home/me');
    assert.deepEqual(login.args.slice(3), ['--', 'login1', ON_WORKER_LINE]);
    assert.deepEqual(login.env, [`DJS_ON_WORKER_INPUT=${onWorkerInput(['srun', '--job-name=djs-7', '--partition=cpu', '--ntasks=1', '--cpus-per-task=2', '--gpus=2', '--time=2', 'python', 't.py', 'a b'], env, '/w', 5)}`], 'Slurm sets the GPUs itself');
    assert.deepEqual(srunWords('p', { id: 1, slots: 1, gpus: 0, timeout: 0 }), ['srun', '--job-name=djs-1', '--partition=p', '--ntasks=1', '--cpus-per-task=1']);
    assert.equal(isLocalWorker('local12'), true);
    assert.equal(isLocalWorker('localhost'), false);
  });
});

// ---- lineSplitter ----------------------------------------------------------------

describe('lineSplitter: the one line splitter (journal, socket requests, onLines)', () => {
  test('lines cut anywhere by chunk ends come out whole, bytes or text; the unfinished rest waits', () => {
    const text = 'first\n\nthird line, longer than a chunk\nä€😀 last\nunfinished';
    for (const size of [1, 2, 3, 7, 64]) {
      const bytes = Buffer.from(text);
      const got: string[] = [];
      const b = lineSplitter<Buffer>(Buffer.concat, (l) => { got.push(l.toString('utf8')); });
      for (let i = 0; i < bytes.length; i += size) b.push(bytes.subarray(i, i + size));
      assert.deepEqual(got, ['first', '', 'third line, longer than a chunk', 'ä€😀 last'], `chunks of ${size} bytes`);
      assert.equal(b.pending, Buffer.byteLength('unfinished'));
      assert.equal(b.rest().toString(), 'unfinished');
      assert.equal(b.pending, 0);
      const words: string[] = [];
      const t = lineSplitter((p: string[]) => p.join(''), (l: string) => { words.push(l); });
      for (let i = 0; i < text.length; i += size) t.push(text.slice(i, i + size));
      assert.deepEqual(words, got, `text in chunks of ${size}`);
    }
  });

  test('a line for which fn returns false stops the chunk there', () => {
    const got: string[] = [];
    const s = lineSplitter<Buffer>(Buffer.concat, (l) => { got.push(l.toString()); return l.toString() !== 'stop'; });
    s.push(Buffer.from('a\nstop\nb\nc\n'));
    assert.deepEqual(got, ['a', 'stop']);
  });
});
