// The data dir format: data dirs written by earlier releases (format version 1: events
// `stop` and `start` {w, s}, jobs with `attempts` and `runs`, run files holding a
// wrapper's pid and exit code; version 2: no campaign fields) load into this one,
// through the core (tier 1) and through a real server (tier 2), which then writes them
// anew in the current format.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { attemptsOf, loadState, waitingJobs, type State } from '../cli.ts';
import { cleanUp, ROOT, startServer, tempDir, type TestServer } from './server.ts';

const FIXTURES = path.join(ROOT, 'test', 'fixtures');
/** This release's format version (3: campaigns; 4: the environments of adds, --after-any, --on-worker). */
const FORMAT = 4;

/** The jobs of a state as [id, state, exit code, attempts, run, worker]. */
const summary = (st: State) => [...st.jobs.values()].sort((a, b) => a.id - b.id)
  .map((j) => [j.id, j.state, j.exitCode, attemptsOf(j), j.run, j.worker]);

// What the previous release had recorded when it stopped: jobs 8 and 9 were running.
const EXPECTED = [
  [1, 'done', 0, 1, 1, 'w1'], [2, 'failed', 3, 2, 2, 'w1'], [3, 'done', 0, 1, 1, 'w1'], [4, 'killed', 143, 1, 1, 'w1'],
  [5, 'killed', 143, 1, 1, 'w2'], [6, 'killed', 143, 1, 1, 'w1'], [7, 'failed', 5, 1, 1, 'w1'],
  [8, 'running', null, 1, 1, 'w1'], [9, 'running', null, 1, 1, 'w1'], [10, 'waiting', null, 0, 0, null],
];

test('a version 1 journal, and a version 1 snapshot, load into the same state', () => {
  for (const name of ['v1-journal', 'v1-snapshot']) {
    const loaded = loadState(path.join(FIXTURES, name));
    assert.equal(loaded.version, 1, name);
    assert.deepEqual(summary(loaded.state), EXPECTED, name);
    assert.deepEqual([...loaded.state.workers.values()].map((w) => [w.host, w.slots, w.running]), [['w1', 2, [8, 9]]], name);
    const two = loaded.state.jobs.get(2)!;
    assert.deepEqual(two.history!.map((a) => [a.n, a.exitCode]), [[1, 3], [2, 3]], name);
    assert.equal(loaded.state.jobs.get(4)!.killing, null, name);
    assert.deepEqual(loaded.state.jobs.get(10)!.args, ['0', "x'y", 'é'], name);
  }
});

for (const name of ['v1-journal', 'v1-snapshot']) {
  test(`a server started on a ${name} data dir of the previous release records what ended meanwhile and writes the dir anew in its own format`, { timeout: 60_000 }, async (t) => {
    const dir = tempDir();
    let s: TestServer | undefined;
    t.after(() => cleanUp(s, dir));
    fs.cpSync(path.join(FIXTURES, name), path.join(dir, '.data'), { recursive: true });
    fs.chmodSync(path.join(dir, '.data'), 0o700);
    s = await startServer({ dir });
    // Jobs 8 and 9 ended while no server ran; their wrappers left exit code 4 in the run
    // files. Job 10's directory does not exist here: it fails, saying so.
    await s.cli(['wait']);
    const jobs = (await s.jobs()).sort((a, b) => a.id - b.id);
    assert.deepEqual(jobs.map((j) => [j.id, j.state, j.exitCode, j.attempts]), [
      [1, 'done', 0, 1], [2, 'failed', 3, 2], [3, 'done', 0, 1], [4, 'killed', 143, 1], [5, 'killed', 143, 1],
      [6, 'killed', 143, 1], [7, 'failed', 5, 1], [8, 'failed', 4, 1], [9, 'failed', 4, 1], [10, 'failed', null, 1],
    ]);
    assert.match(jobs[9].reason, /cannot enter \/nonexistent\/djs-fixture/);
    const header = (file: string) => JSON.parse(fs.readFileSync(path.join(s!.dataDir, file), 'utf8').split('\n')[0]);
    assert.equal(header('snapshot').version, FORMAT);
    assert.equal(header('journal').version, FORMAT);
    await s.stop();
    s = await s.restart();
    assert.deepEqual((await s.jobs()).sort((a, b) => a.id - b.id).map((j) => [j.id, j.state, j.exitCode]), jobs.map((j) => [j.id, j.state, j.exitCode]));
  });
}

// Version 2, written by the release before campaigns (fixtures made by its own server:
// three jobs ran on w1, the worker went, then two jobs were queued and one killed).
const EXPECTED_V2 = [
  [1, 'done', 0, 1, 1, 'w1'], [2, 'failed', 1, 1, 1, 'w1'], [3, 'done', 0, 1, 1, 'w1'],
  [4, 'waiting', null, 0, 0, null], [5, 'killed', null, 0, 0, null], [6, 'waiting', null, 0, 0, null],
];

test('a version 2 journal, and a version 2 snapshot, load with no campaign fields: no tags, priority 0, nothing held', () => {
  for (const name of ['v2-journal', 'v2-snapshot']) {
    const loaded = loadState(path.join(FIXTURES, name));
    assert.equal(loaded.version, 2, name);
    assert.deepEqual(summary(loaded.state), EXPECTED_V2, name);
    for (const j of loaded.state.jobs.values()) assert.deepEqual([j.tags, j.priority, j.after, j.env, j.blockers], [[], 0, null, null, 0], `${name} job ${j.id}`);
    assert.deepEqual([...waitingJobs(loaded.state)].map((j) => j.id), [4, 6], `${name}: the queue, in order`);
    assert.deepEqual(loaded.state.jobs.get(4)!.args, ['x y', 'é'], name);
    assert.deepEqual([loaded.state.paused, loaded.state.tagCounts.size], [false, 0], name);
  }
});

test('a server started on a version 2 data dir runs its waiting jobs and writes the dir anew in its own format', { timeout: 60_000 }, async (t) => {
  const dir = tempDir();
  let s: TestServer | undefined;
  t.after(() => cleanUp(s, dir));
  fs.cpSync(path.join(FIXTURES, 'v2-snapshot'), path.join(dir, '.data'), { recursive: true });
  fs.chmodSync(path.join(dir, '.data'), 0o700);
  s = await startServer({ dir });
  const header = (file: string) => JSON.parse(fs.readFileSync(path.join(s!.dataDir, file), 'utf8').split('\n')[0]);
  assert.equal(header('journal').version, FORMAT);
  await s.ok(['add_slave', '--skip_ssh_auth_check', 'w2']);
  await s.ok(['add_job', '--tag', 'new', '--after', '4', '/bin/true', 'after 4']);
  assert.equal((await s.cli(['wait', '4', '6', '7'])).code, 0, 'the old jobs run, and the new one after job 4');
});
