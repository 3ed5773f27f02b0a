// A million jobs without a stall: snapshots written a slice per turn (tier 1 against
// real temporary directories, and tier 2: a kill -9 of the server while one is written),
// and filters answered from per-state indexes.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { applyEvent, Journal, JOB_STATES, loadState, matchingIds, newState, pageJobs, waitingJobs, type Event, type State } from '../cli.ts';
import { addWorkers, serve, socketOp, startServer, testDir, until, writeScript } from './server.ts';

const T0 = Date.UTC(2025, 0, 1, 12, 0, 0);

const tmpDirs: string[] = [];
function tempDir(): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'djs-scale-'));
  tmpDirs.push(d);
  return d;
}
after(() => { for (const d of tmpDirs) fs.rmSync(d, { recursive: true, force: true }); });

/** A comparable, deep-copied picture of the state (queue internals and tokens aside). */
function view(st: State) {
  return JSON.parse(JSON.stringify({
    seq: st.seq, nextId: st.nextId, counts: st.counts,
    jobs: [...st.jobs.values()].sort((a, b) => a.id - b.id).map((j) => ({ ...j, qtok: 0, blockers: 0 })),
    workers: [...st.workers.values()].sort((a, b) => (a.host < b.host ? -1 : 1)),
    queue: [...waitingJobs(st)].map((j) => j.id),
    paused: st.paused, pausedTags: [...st.pausedTags].sort(), forgotten: [...st.forgotten].sort((a, b) => a - b),
    tagCounts: [...st.tagCounts].sort(),
  }));
}

const addEv = (st: State, n: number, o: { retries?: number; after?: number[] } = {}): Event => ({
  e: 'add', t: T0, id: st.nextId, cwd: '/work', retries: o.retries ?? 0, timeout: 0, tags: ['x'],
  jobs: Array.from({ length: n }, (_, i) => ['/bin/job.sh', `arg${st.nextId + i}`]), ...(o.after ? { after: o.after } : {}),
});

/** A state with a journal in a temporary dir; commit applies events and appends them. */
function journalled() {
  const dir = tempDir();
  const st = newState();
  const journal = new Journal(dir, 0, 0);
  const commit = (...evs: Event[]) => {
    let text = '';
    for (const ev of evs) { applyEvent(st, ev); st.seq++; text += JSON.stringify({ n: st.seq, ...ev }) + '\n'; }
    journal.append(text);
  };
  return { dir, st, journal, commit };
}

/** Every file of a dir, copied to a new dir: the disk as a kill -9 would leave it. */
function crashCopy(dir: string): string {
  const to = tempDir();
  for (const f of fs.readdirSync(dir)) fs.copyFileSync(path.join(dir, f), path.join(to, f));
  return to;
}

const turn = () => new Promise<void>((resolve) => setImmediate(resolve));

describe('snapshots written a slice per turn', () => {
  test('events of every kind while a snapshot is written: the snapshot is of its start, and a crash at any moment loses nothing', async () => {
    const j = journalled();
    const { st, commit } = j;
    commit({ e: 'worker', t: T0, host: 'a', slots: 4, ssh: false });
    commit(addEv(st, 5000, { retries: 1 }));
    commit(addEv(st, 3, { after: [1] })); // held for job 1
    for (let id = 1; id <= 4; id++) commit({ e: 'start', t: T0 + 1, id, host: 'a', slot: id - 1 });
    commit({ e: 'end', t: T0 + 2, id: 2, run: 1, code: 0 }, { e: 'end', t: T0 + 2, id: 3, run: 1, code: 7 }, { e: 'end', t: T0 + 2, id: 3, run: 1, code: 7 });
    commit({ e: 'priority', t: T0 + 2, ids: [100, 101], priority: 2 }); // two lanes, one requeued job in front
    const before = view(st);
    j.journal.sliceMs = 0; // 200 jobs a turn: the events below come while it is written
    const saved = j.journal.startSnapshot(st);
    assert.ok(fs.existsSync(path.join(j.dir, 'journal.1')), 'the journal so far is kept until the snapshot is complete');
    // One event of each kind per turn, each touching jobs the snapshot has not written yet
    // and jobs it has; after each, the disk as a crash would leave it.
    const last = 5000;
    const steps: Event[][] = [
      [{ e: 'end', t: T0 + 3, id: 1, run: 1, code: 1 }],                 // a retry, and its held dependents stay held
      [{ e: 'start', t: T0 + 4, id: 1, host: 'a', slot: 0 }, { e: 'start', t: T0 + 4, id: last, host: 'a', slot: 1 }],
      [{ e: 'kill', t: T0 + 5, ids: [4, last - 1], why: 'user', grace: 1000 }],
      [{ e: 'end', t: T0 + 6, id: 4, run: 1, code: 143 }, { e: 'end', t: T0 + 6, id: 1, run: 2, code: 2 }], // 1 fails: its dependents fail
      [{ e: 'retry', t: T0 + 7, ids: [3, 4] }],
      [{ e: 'unstart', t: T0 + 8, id: last }],
      [{ e: 'priority', t: T0 + 9, ids: [last - 2, 10, 100], priority: 5 }],
      [{ e: 'remove', t: T0 + 10, ids: [last - 3, 11, 3000, 3001] }],
      [addEv(st, 5)],
      [{ e: 'clean', t: T0 + 11 }],
      [{ e: 'pause', t: T0 + 12, tag: 'x' }],
    ];
    // The job the writer is to write next (read from the map before its turn ended)
    // removed before it is written: written once, as it was.
    while (st.saving!.at <= 100) await new Promise((resolve) => setTimeout(resolve, 1));
    const pending = st.saving!.at + 1;
    assert.equal(st.jobs.get(pending)?.state, 'waiting');
    commit({ e: 'remove', t: T0 + 2, ids: [pending] });
    const crashes: { dir: string; view: unknown }[] = [{ dir: crashCopy(j.dir), view: view(st) }];
    for (const evs of steps) {
      await turn();
      if (evs[0].e === 'add') (evs[0] as { id: number }).id = st.nextId;
      commit(...evs);
      crashes.push({ dir: crashCopy(j.dir), view: view(st) });
    }
    assert.ok(st.saving, 'the events came while the snapshot was being written');
    const bytes = await saved;
    assert.ok(bytes > 0 && st.saving === null);
    assert.ok(!fs.existsSync(path.join(j.dir, 'journal.1')), 'the earlier journal is gone once the snapshot is in place');
    crashes.push({ dir: crashCopy(j.dir), view: view(st) });
    fs.closeSync(j.journal.fd);

    // The snapshot alone is the state at its start.
    const only = crashCopy(j.dir);
    fs.rmSync(path.join(only, 'journal'));
    assert.deepEqual(view(loadState(only).state), before);
    // Snapshot and journal: the live state; so is every crash copy.
    assert.deepEqual(view(loadState(j.dir).state), view(st));
    for (const [i, c] of crashes.entries()) {
      const r = loadState(c.dir);
      assert.deepEqual(r.warnings, []);
      assert.deepEqual(view(r.state), c.view, `crash after step ${i}`);
    }
  });

  test('a snapshot that fails part-way keeps both journals, and the next start folds them in', async () => {
    const j = journalled();
    const { st, commit } = j;
    commit(addEv(st, 5000));
    const saved = j.journal.startSnapshot(st);
    commit(addEv(st, 2), { e: 'remove', t: T0 + 1, ids: [5] });
    j.journal.stopSnapshot(); // as when the state is reloaded after a failed write
    await assert.rejects(saved, /stopped/);
    assert.ok(j.journal.stuck && !j.journal.needsSnapshot(), 'no other snapshot would take journal.1 away');
    commit({ e: 'remove', t: T0 + 2, ids: [6] });
    fs.closeSync(j.journal.fd);
    const r = loadState(j.dir);
    assert.deepEqual(view(r.state), view(st));
    const journal = new Journal(j.dir, r.journalSize, r.snapshotSize);
    journal.snapshot(r.state);
    fs.closeSync(journal.fd);
    assert.ok(!fs.existsSync(path.join(j.dir, 'journal.1')));
    assert.deepEqual(view(loadState(j.dir).state), view(st));
  });
});

describe('a server writing a snapshot', () => {
  test('answers requests while it writes one, and a kill -9 part-way loses nothing it acknowledged', { timeout: 120_000 }, async (t) => {
    const dir = testDir(t);
    const s = await startServer({ dir, env: { DJS_SNAPSHOT_MIN_BYTES: '65536' } });
    const script = writeScript(dir, 'x.sh', 'exit 0');
    const tmp = path.join(s.dataDir, 'snapshot.tmp'), earlier = path.join(s.dataDir, 'journal.1');
    // 101,000 waiting jobs (no worker): the journal passes 64 KiB, and a snapshot of them
    // takes many turns.
    const values = (n: number) => Array.from({ length: n }, (_, i) => String(i));
    const big = await socketOp(s.dataDir, { op: 'add_jobs', cwd: dir, jobs: [[script, '{1}', '{2}']], sweep: [values(400), values(250)] }, () => {}, 100_000);
    assert.ok(big.ok, big.error);
    // A sweep is one short line in the journal: 1,000 jobs of long arguments pass 64 KiB.
    const filler = await socketOp(s.dataDir, { op: 'add_jobs', cwd: dir, jobs: Array.from({ length: 1000 }, (_, i) => [script, 'p'.repeat(100) + i]) });
    assert.ok(filler.ok, filler.error);
    await until(() => fs.existsSync(tmp), 'the server to be writing a snapshot', 30_000, 2);
    // Asked and answered while it is written: a status, a kill of two jobs the snapshot
    // holds (one it may have written already), a removal, an add.
    const acked: string[] = [];
    const status = await s.status();
    assert.equal(status.counts.waiting, 101_000);
    acked.push('status');
    assert.ok((await socketOp(s.dataDir, { op: 'kill', ids: [1, 99_999] })).ok); acked.push('kill');
    assert.ok((await socketOp(s.dataDir, { op: 'remove_jobs', ids: [50] })).ok); acked.push('remove');
    const small = await socketOp(s.dataDir, { op: 'add_jobs', cwd: dir, jobs: [[script, 'late'], [script, 'later']] });
    assert.ok(small.ok); acked.push('add');
    assert.ok(fs.existsSync(earlier) && fs.existsSync(tmp), `the snapshot was still being written after ${acked.join(', ')} were answered`);
    await s.crash();
    assert.ok(fs.existsSync(earlier), 'the crash came before the snapshot was complete');

    const again = await startServer({ dir });
    const counts = (await again.status()).counts;
    assert.deepEqual({ waiting: counts.waiting, killed: counts.killed }, { waiting: 101_000 - 3 + 2, killed: 2 });
    const jobs = await again.jobs();
    const byId = new Map(jobs.map((j) => [j.id, j]));
    assert.equal(byId.get(1).state, 'killed');
    assert.equal(byId.get(99_999).state, 'killed');
    assert.equal(byId.has(50), false);
    assert.deepEqual([byId.get(small.first).args, byId.get(small.first + 1).args], [['late'], ['later']]);
    assert.equal(fs.existsSync(earlier), false, 'the start folded the earlier journal into a snapshot');
    await again.stop();
  });
});

/** Checks every index against a scan of the jobs: ids by state, by worker, by tag, and
 *  the first page of each filter of the dashboard. */
function checkIndexes(st: State, when: string): void {
  const jobs = [...st.jobs.values()].sort((a, b) => a.id - b.id);
  const all = (f: Parameters<typeof matchingIds>[1]) => [...matchingIds(st, f, 1, st.nextId, false)];
  for (const state of JOB_STATES) {
    assert.deepEqual(all({ states: [state] }), jobs.filter((j) => j.state === state).map((j) => j.id), `${when}: ${state} jobs`);
    const page = pageJobs(st, { op: 'jobs', state, limit: 5 }, T0).rows.map((r) => r.id);
    assert.deepEqual(page, jobs.filter((j) => j.state === state).map((j) => j.id).reverse().slice(0, 5), `${when}: the page of ${state} jobs`);
  }
  assert.deepEqual(all({}), jobs.map((j) => j.id), `${when}: all jobs`);
  for (const w of new Set(jobs.map((j) => j.worker).filter((w) => w !== null))) {
    assert.deepEqual(all({ worker: w! }), jobs.filter((j) => j.worker === w).map((j) => j.id), `${when}: jobs on ${w}`);
  }
  for (const tag of ['x', 'y']) {
    assert.deepEqual(all({ tag }), jobs.filter((j) => j.tags.includes(tag)).map((j) => j.id), `${when}: jobs tagged ${tag}`);
    assert.deepEqual(all({ tag, states: ['failed', 'killed'] }), jobs.filter((j) => j.tags.includes(tag) && (j.state === 'failed' || j.state === 'killed')).map((j) => j.id), `${when}: ended badly, tagged ${tag}`);
  }
}

describe('indexes of jobs by state, worker and tag', () => {
  test('stay right through events of every kind, and a reload builds the same', () => {
    const j = journalled();
    const { st } = j;
    const steps: [string, () => Event[]][] = [
      ['workers', () => [{ e: 'worker', t: T0, host: 'a', slots: 3, ssh: false }, { e: 'worker', t: T0, host: 'b', slots: 2, ssh: false }]],
      ['add', () => [addEv(st, 40, { retries: 1 })]],
      ['add of another tag, held', () => [{ ...addEv(st, 3, { after: [1] }), tags: ['y'] }]],
      ['start', () => [1, 2, 3].map((id, i): Event => ({ e: 'start', t: T0 + 1, id, host: 'a', slot: i })).concat([{ e: 'start', t: T0 + 1, id: 35, host: 'b', slot: 0 }])],
      ['end: done, failed (retried), worker failure', () => [{ e: 'end', t: T0 + 2, id: 2, run: 1, code: 0 }, { e: 'end', t: T0 + 2, id: 3, run: 1, code: 4 }, { e: 'end', t: T0 + 2, id: 35, run: 1, code: 255 }]],
      ['start again on b', () => [{ e: 'start', t: T0 + 3, id: 3, host: 'b', slot: 0 }, { e: 'start', t: T0 + 3, id: 35, host: 'b', slot: 1 }]],
      ['end: failed for good, its dependents fail', () => [{ e: 'end', t: T0 + 4, id: 3, run: 2, code: 4 }, { e: 'end', t: T0 + 4, id: 1, run: 1, code: 9 }, { e: 'end', t: T0 + 4, id: 1, run: 1, code: 9 }]],
      ['kill: running and waiting', () => [{ e: 'kill', t: T0 + 5, ids: [35, 10, 11], why: 'user', grace: 1000 }]],
      ['unstart', () => [{ e: 'start', t: T0 + 6, id: 12, host: 'a', slot: 1 }, { e: 'unstart', t: T0 + 6, id: 12 }]],
      ['end of the killed one', () => [{ e: 'end', t: T0 + 7, id: 35, run: 2, code: 143 }]],
      ['retry', () => [{ e: 'retry', t: T0 + 8, ids: [1, 3, 10] }]],
      ['kill of a waiting job that ran before', () => [{ e: 'kill', t: T0 + 8, ids: [3], why: 'user', grace: 1000 }]],
      ['priority', () => [{ e: 'priority', t: T0 + 9, ids: [20, 21], priority: 3 }]],
      ['remove', () => [{ e: 'remove', t: T0 + 10, ids: [20, 30, 31] }]],
      ['clean of some', () => [{ e: 'clean', t: T0 + 11, ids: [2] }]],
      ['clean', () => [{ e: 'clean', t: T0 + 12 }]],
      ['add after a clean', () => [addEv(st, 2)]],
    ];
    for (const [what, evs] of steps) {
      j.commit(...evs());
      checkIndexes(st, what);
    }
    assert.ok(st.counts.failed + st.counts.killed === 0 && st.counts.waiting > 30, 'the history ends with a clean');
    fs.closeSync(j.journal.fd);
    checkIndexes(loadState(j.dir).state, 'replayed');
    const k = new Journal(j.dir, 0, 0);
    k.snapshot(loadState(j.dir).state);
    fs.closeSync(k.fd);
    checkIndexes(loadState(j.dir).state, 'loaded from a snapshot');
  });

  test('a page of a filter holds every match up to its limit, however few among many', () => {
    const st = newState();
    applyEvent(st, { e: 'worker', t: T0, host: 'a', slots: 1, ssh: false });
    applyEvent(st, addEv(st, 100_000));
    // Ten failed jobs, all among the oldest; one job that ran on a.
    for (let id = 1; id <= 10; id++) {
      applyEvent(st, { e: 'start', t: T0, id, host: 'a', slot: 0 });
      applyEvent(st, { e: 'end', t: T0, id, run: 1, code: 1 });
    }
    const failed = pageJobs(st, { op: 'jobs', state: 'failed' }, T0);
    assert.deepEqual(failed.rows.map((r) => r.id), [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]);
    assert.equal(failed.next, null);
    assert.deepEqual(pageJobs(st, { op: 'jobs', worker: 'a', limit: 3 }, T0).rows.map((r) => r.id), [10, 9, 8]);
    // A text filter looks as far as its budget allows, and what it found is the page.
    st.jobs.get(5)!.reason = 'needle';
    const text = pageJobs(st, { op: 'jobs', text: 'needle' }, T0, () => false);
    assert.deepEqual(text.rows.map((r) => r.id), [5]);
  });
});

describe('filters of a server with 100,000 jobs', () => {
  test('10 failed jobs among 100,000 come in the first answer: the API\'s jobs by state and by worker, and list --state', { timeout: 120_000 }, async (t) => {
    const s = await serve(t);
    const fail = writeScript(s.dir, 'fail.sh', 'exit 1');
    await socketOp(s.dataDir, { op: 'add_jobs', cwd: s.dir, jobs: Array.from({ length: 10 }, () => [fail]) });
    await addWorkers(s, 'w1:2');
    await until(async () => (await s.status()).counts.failed === 10, 'the 10 jobs to fail', 30_000);
    await s.ok(['pause']);
    const values = Array.from({ length: 400 }, (_, i) => String(i));
    const big = await socketOp(s.dataDir, { op: 'add_jobs', cwd: s.dir, jobs: [[fail, '{1}', '{2}']], sweep: [values, values.slice(0, 250)] }, () => {}, 100_000);
    assert.ok(big.ok, big.error);
    assert.equal((await s.status()).counts.waiting, 100_000);
    const ten = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1];
    const failed = await socketOp(s.dataDir, { op: 'jobs', state: 'failed' });
    assert.deepEqual(failed.rows.map((r: { id: number }) => r.id), ten, 'GET /api/jobs?state=failed');
    assert.equal(failed.next, null);
    const onW1 = await socketOp(s.dataDir, { op: 'jobs', worker: 'w1' });
    assert.deepEqual(onW1.rows.map((r: { id: number }) => r.id), ten, 'GET /api/jobs?worker=w1');
    const chunks: { id: number }[][] = [];
    const end = await socketOp(s.dataDir, { op: 'list', state: 'failed' }, (m) => chunks.push(m.rows));
    assert.ok(end.ok);
    assert.deepEqual(chunks.map((c) => c.map((r) => r.id)), [ten.slice().reverse()], 'list --state failed: one chunk of the 10');
    const out = await s.ok(['list', '--state', 'failed', '--json']);
    assert.equal(JSON.parse(out).length, 10);
  });
});
