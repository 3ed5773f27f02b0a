// Tier 2: steering a run — kill, retries, worker failures (exit 255), timeouts, retry,
// removing workers, wait, log -f and clean — and campaigns: sweeps, tags, priorities,
// dependencies, pause and resume, per-job environment; on fake workers
// (--skip_ssh_auth_check).

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import {
  GATED, addJob, addWorkers, alive, idsOf, order, pidOf, readIf, release, serve, socketClients, spawnCli, until, untilState, within, writeScript, type TestServer,
} from './server.ts';

/** Counts its runs in count.$JOB_ID and fails (exit $1, default 1) until run $2 (default 3). */
const FLAKY = `n=$(( $(cat "count.$JOB_ID" 2>/dev/null || echo 0) + 1 ))
echo $n > "count.$JOB_ID"
echo "try $n on $SLAVE_IP"
[ "$n" -ge "\${2:-3}" ] || exit "\${1:-1}"`;

const workerHosts = async (s: TestServer) => (await s.status()).workers.map((w: { host: string }) => w.host).sort();

describe('steering a campaign', { concurrency: 4 }, () => {
  test('kill ID: SIGTERM to the whole process group; kill --all; a finished job cannot be killed', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'term.sh', `trap 'echo "TERM received" > "term.$JOB_ID"; exit 143' TERM
sleep 300 &
echo $! > "child.$JOB_ID"
echo $$ > "pid.$JOB_ID"
wait`);
    writeScript(s.dir, 'block.sh', GATED);
    await addWorkers(s, 'w1:2');
    const id = await addJob(s, './term.sh');
    const pid = await pidOf(s, id);
    const child = Number(await until(() => readIf(path.join(s.dir, `child.${id}`)).trim(), 'the child sleep'));
    assert.ok(alive(child));
    const r = await s.cli(['kill', id]);
    assert.equal(r.code, 0, r.stderr);
    await untilState(s, id, 'killed');
    assert.match(readIf(path.join(s.dir, `term.${id}`)), /TERM received/);
    await until(() => !alive(pid) && !alive(child), 'the script and its child to be gone', 5000);

    const [a, b, c] = (await s.ok(['add_jobs', '-'], { input: './block.sh\n./block.sh\n./block.sh\n' })).trim().split('\n');
    const pids = [await pidOf(s, a), await pidOf(s, b)];
    assert.equal((await s.job(c)).state, 'waiting');
    const all = await s.cli(['kill', '--all']);
    assert.equal(all.code, 0, all.stderr);
    assert.equal((await within(s.cli(['wait', a, b, c]), 15_000, 'the killed jobs to end')).code, 1);
    const jobs = (await s.jobs()).filter((j) => [a, b, c].includes(String(j.id)));
    assert.deepEqual(jobs.map((j) => j.state), ['killed', 'killed', 'killed']);
    await until(() => pids.every((p) => !alive(p)), 'killed jobs to be gone', 5000);
    assert.equal(jobs[2].attempts, 0, 'a waiting job is killed without running');
    assert.equal(fs.existsSync(path.join(s.dir, `pid.${c}`)), false);
    // retry --killed brings them back (retry --failed does not touch them).
    assert.match(await s.ok(['retry', '--failed']), /no job to retry/);
    const back = await s.ok(['retry', '--killed']);
    for (const k of [id, a, b, c]) assert.match(back, new RegExp(`\\b${k}\\b`), `job ${k} queued again`);
    await pidOf(s, id);
    await s.ok(['kill', '--all']);
    assert.equal((await within(s.cli(['wait', a, b, c]), 15_000, 'the killed jobs to end again')).code, 1);

    const again = await s.cli(['kill', id]);
    assert.equal(again.code, 1, 'a finished job cannot be killed');
    assert.match(again.stderr, /^error: /m);
    assert.equal((await s.cli(['kill', '9999'])).code, 1);
    assert.equal((await s.job(id)).state, 'killed');
  });

  /** A job that ignores SIGTERM, so only SIGKILL ends it; writes its pid to pid.ID. */
  const STUBBORN = `trap '' TERM
echo $$ > "pid.$JOB_ID"
while :; do sleep 0.05; done`;

  test('kill ID: a job that ignores SIGTERM gets SIGKILL after the grace period', async (t) => {
    const s = await serve(t, { args: ['--kill-grace', '2'] });
    writeScript(s.dir, 'stubborn.sh', STUBBORN);
    await addWorkers(s, 'w1');
    const id = await addJob(s, './stubborn.sh');
    const pid = await pidOf(s, id);
    const t0 = Date.now();
    assert.equal((await s.cli(['kill', id])).code, 0);
    assert.ok(alive(pid) || Date.now() - t0 > 1500, 'SIGTERM alone does not stop it');
    await untilState(s, id, 'killed', 8000); // well before the default grace of 10 s
    assert.equal(alive(pid), false);
    const job = await s.job(id);
    assert.equal(job.exitCode, 128 + 9, 'ended by SIGKILL');
  });

  test('DJS_KILL_GRACE in the environment of start: SIGKILL comes that many seconds after SIGTERM, not sooner', async (t) => {
    const s = await serve(t, { env: { DJS_KILL_GRACE: '2' } });
    writeScript(s.dir, 'stubborn.sh', STUBBORN);
    await addWorkers(s, 'w1');
    const id = await addJob(s, './stubborn.sh');
    const pid = await pidOf(s, id);
    const asked = Date.now();
    assert.equal((await s.cli(['kill', id])).code, 0);
    const answered = Date.now();
    await until(() => !alive(pid), 'the job that ignores SIGTERM to be gone', 15_000, 10);
    const gone = Date.now();
    assert.ok(gone - asked >= 2000, `it was gone ${gone - asked} ms after the kill was asked for, before the grace of 2 s was over`);
    assert.ok(gone - answered < 4000, `it was gone ${gone - answered} ms after the kill was answered, long after the grace of 2 s (the default is 10 s)`);
    const job = await untilState(s, id, 'killed');
    assert.equal(job.exitCode, 128 + 9, 'ended by SIGKILL');
  });

  test('kill and --timeout reach jobs that a restarted server adopted', async (t) => {
    const s = await serve(t, { args: ['--kill-grace', '1'] });
    writeScript(s.dir, 'block.sh', GATED);
    writeScript(s.dir, 'stubborn.sh', STUBBORN);
    await addWorkers(s, 'w1:3');
    const k = await addJob(s, './block.sh');
    const hard = await addJob(s, './stubborn.sh');
    const slow = await addJob(s, '--timeout', '3', './block.sh');
    const pids = [await pidOf(s, k), await pidOf(s, hard), await pidOf(s, slow)];
    assert.equal((await s.cli(['stop'])).code, 0);
    await s.exited;
    assert.ok(pids.every(alive));
    const s2 = await s.restart();
    assert.equal((await s2.cli(['kill', k, hard])).code, 0);
    await untilState(s2, k, 'killed', 5000);
    await untilState(s2, hard, 'killed', 8000);
    await untilState(s2, slow, 'failed', 10_000);
    assert.match(String((await s2.job(slow)).reason), /timeout/);
    await until(() => pids.every((p) => !alive(p)), 'the adopted jobs to be gone', 5000);
  });

  test('--retries 2: fails twice, done on the third attempt, the retry on another worker; history and log', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'flaky.sh', FLAKY);
    await addWorkers(s, 'w1', 'w2');
    const id = await addJob(s, '--retries', '2', './flaky.sh');
    const never = await addJob(s, '--retries', '1', './flaky.sh', '4', '99');
    assert.equal((await s.cli(['wait', id])).code, 0);
    const job = await s.job(id);
    assert.equal(job.state, 'done');
    assert.equal(job.attempts, 3);
    assert.equal(job.history.length, 3);
    assert.deepEqual(job.history.map((h: { exitCode: number }) => h.exitCode), [1, 1, 0]);
    for (const h of job.history) assert.ok(['w1', 'w2'].includes(h.worker), JSON.stringify(h));
    assert.notEqual(job.history[1].worker, job.history[0].worker, 'the retry ran on another worker');
    const log = (await s.ok(['log', id])).split('\n');
    assert.deepEqual(log.filter((l) => /^try \d/.test(l)).map((l) => l.slice(0, 5)), ['try 1', 'try 2', 'try 3']);
    for (const n of [2, 3]) assert.ok(log.some((l) => !l.startsWith('try') && new RegExp(`attempt ${n}\\b`).test(l)), `a marker line for attempt ${n}`);

    assert.equal((await s.cli(['wait', never])).code, 1);
    const failed = await s.job(never);
    assert.equal(failed.state, 'failed');
    assert.equal(failed.attempts, 2, '--retries 1 means two attempts');
    assert.equal(failed.exitCode, 4);
  });

  test('exit 255 requeues without counting against --retries; repeated 255s fail the job', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'flaky.sh', FLAKY);
    writeScript(s.dir, 'unreachable.sh', 'echo "cannot reach $SLAVE_IP"; exit 255');
    await addWorkers(s, 'w1', 'w2');
    const once = await addJob(s, './flaky.sh', '255', '2');
    assert.equal((await s.cli(['wait', once])).code, 0);
    const job = await s.job(once);
    assert.equal(job.state, 'done');
    assert.equal(job.retries, 0);
    assert.equal(job.attempts, 2);
    assert.deepEqual(job.history.map((h: { exitCode: number }) => h.exitCode), [255, 0]);
    assert.notEqual(job.history[1].worker, job.history[0].worker, 'requeued on the other worker');

    const always = await addJob(s, '--retries', '1', './unreachable.sh');
    assert.equal((await s.cli(['wait', always])).code, 1);
    const bad = await s.job(always);
    assert.equal(bad.state, 'failed');
    assert.match(String(bad.reason), /255/);
    assert.ok(bad.attempts > 2, `worker failures do not use up --retries (attempts ${bad.attempts})`);
    assert.ok(bad.history.every((h: { exitCode: number }) => h.exitCode === 255));
    assert.deepEqual((await s.status()).workers.map((w: { state: string }) => w.state), ['up', 'up'], 'fake workers are never probed');
  });

  test('--timeout 1 stops a job that runs too long: failed, reason timeout, processes gone', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'slow.sh', `echo $$ > "pid.$JOB_ID"
sleep 30 &
echo $! > "child.$JOB_ID"
wait`);
    await addWorkers(s, 'w1');
    const t0 = Date.now();
    const id = await addJob(s, '--timeout', '1', './slow.sh');
    const pid = await pidOf(s, id);
    const child = Number(await until(() => readIf(path.join(s.dir, `child.${id}`)).trim(), 'the child sleep'));
    assert.equal((await s.cli(['wait', id])).code, 1);
    assert.ok(Date.now() - t0 < 15_000, 'stopped long before the sleep ends');
    const job = await s.job(id);
    assert.equal(job.state, 'failed');
    assert.match(String(job.reason), /timeout/);
    assert.ok(job.runtimeMs >= 900, `ran about a second, not ${job.runtimeMs} ms`);
    await until(() => !alive(pid) && !alive(child), 'the timed-out processes to be gone', 5000);
  });

  test('retry ID and retry --failed queue finished jobs again under the same id', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'flaky.sh', FLAKY);
    writeScript(s.dir, 'block.sh', GATED);
    await addWorkers(s, 'w1:2');
    const [a, b] = (await s.ok(['add_jobs', '-'], { input: './flaky.sh 1 2\n./flaky.sh 1 2\n' })).trim().split('\n');
    assert.equal((await s.cli(['wait', a, b])).code, 1);
    assert.equal((await s.job(a)).state, 'failed');

    const r = await s.cli(['retry', a]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal((await s.cli(['wait', a])).code, 0);
    const ja = await s.job(a);
    assert.equal(ja.state, 'done');
    assert.equal(ja.attempts, 2);
    assert.equal((await s.job(b)).state, 'failed', 'retry ID touches only that job');

    const ids = (await s.jobs()).map((j) => j.id);
    assert.equal((await s.cli(['retry', '--failed'])).code, 0);
    assert.equal((await s.cli(['wait', b])).code, 0);
    const jb = await s.job(b);
    assert.equal(jb.state, 'done');
    assert.equal(jb.attempts, 2);
    assert.deepEqual((await s.jobs()).map((j) => j.id), ids, 'no new ids');

    assert.equal((await s.cli(['retry', a])).code, 0, 'a done job can be run again');
    assert.equal((await s.cli(['wait', a])).code, 0);
    assert.equal((await s.job(a)).attempts, 3);

    const running = await addJob(s, './block.sh');
    await pidOf(s, running);
    const busy = await s.cli(['retry', running]);
    assert.equal(busy.code, 1, 'a running job cannot be retried');
    assert.match(busy.stderr, /^error: /m);
    assert.equal((await s.cli(['retry', '9999'])).code, 1);
    release(s, running);
    assert.equal((await s.cli(['wait', running])).code, 0);
  });

  test('remove_slave: busy needs a flag; --wait drains (status shows draining); an idle worker goes at once', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'block.sh', GATED);
    await addWorkers(s, 'wa', 'idle');
    assert.deepEqual(await workerHosts(s), ['idle', 'wa']);
    const gone = await s.cli(['remove_slave', 'idle']);
    assert.equal(gone.code, 0, gone.stderr);
    assert.deepEqual(await workerHosts(s), ['wa'], 'an idle worker is removed at once');

    const first = await addJob(s, './block.sh');
    await pidOf(s, first);
    const next = await addJob(s, './block.sh');

    const refused = await s.cli(['remove_slave', 'wa']);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /^error: .*wa/m);
    assert.equal((await s.status()).workers[0].state, 'up');

    // --wait blocks until the worker is drained and gone.
    const drain = spawnCli(['--data-dir', s.dataDir, 'remove_slave', '--wait', 'wa'], { cwd: s.dir });
    t.after(() => drain.proc.kill('SIGKILL'));
    await until(async () => (await s.status()).workers[0]?.state === 'draining', 'the worker to be draining');
    assert.match(await s.ok(['status']), /^\s*wa\b.*\bdraining\b/m);
    assert.equal((await s.job(first)).state, 'running', 'its job goes on');
    assert.equal(drain.exitCode(), undefined, 'remove_slave --wait returned before the worker was drained');

    release(s, first);
    const drained = await within(drain.done, 10_000, 'remove_slave --wait to return');
    assert.equal(drained.code, 0, drained.stderr);
    assert.match(drained.stdout, /removed worker wa/);
    assert.deepEqual(await workerHosts(s), [], 'the drained worker is gone when remove_slave --wait returns');
    const waiting = await s.job(next);
    assert.equal(waiting.state, 'waiting', 'nothing new started on a draining worker');
    assert.equal(waiting.attempts, 0);

    await addWorkers(s, 'wb');
    await pidOf(s, next);
    assert.equal((await s.job(next)).worker, 'wb');
    release(s, next);
    assert.equal((await s.cli(['wait', next])).code, 0);
  });

  test('remove_slave --wait returns once the worker is gone, also when its job went back to the queue', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'unreachable.sh', 'while [ ! -e "go.$JOB_ID" ]; do sleep 0.02; done; exit 255');
    await addWorkers(s, 'only');
    const id = await addJob(s, './unreachable.sh');
    await until(async () => (await s.job(id)).state === 'running', 'the job to run');
    const drain = spawnCli(['--data-dir', s.dataDir, 'remove_slave', '--wait', 'only'], { cwd: s.dir });
    t.after(() => drain.proc.kill('SIGKILL'));
    await until(async () => (await s.status()).workers[0]?.state === 'draining', 'the worker to be draining');
    release(s, id);
    const r = await within(drain.done, 10_000, 'remove_slave --wait to return');
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(await workerHosts(s), []);
    assert.equal((await s.job(id)).state, 'waiting', 'exit 255 sent the job back to the queue');
  });

  test('remove_slave --kill stops its job, which is queued again and runs on another worker', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'block.sh', GATED);
    await addWorkers(s, 'wa');
    const id = await addJob(s, './block.sh');
    const pid1 = await pidOf(s, id);
    await addWorkers(s, 'wb');
    const r = await s.cli(['remove_slave', '--kill', 'wa']);
    assert.equal(r.code, 0, r.stderr);
    const pid2 = Number(await until(() => {
      const p = Number(readIf(path.join(s.dir, `pid.${id}`)).trim());
      return p && p !== pid1 ? p : 0;
    }, 'the job to start again'));
    assert.equal(alive(pid1), false, 'the first run was stopped');
    await until(async () => (await workerHosts(s)).join() === 'wb', 'the worker to be gone', 5000, 200);
    const job = await s.job(id);
    assert.equal(job.state, 'running');
    assert.equal(job.worker, 'wb');
    assert.ok(alive(pid2));
    release(s, id);
    assert.equal((await s.cli(['wait', id])).code, 0);
    const done = await s.job(id);
    assert.equal(done.state, 'done');
    assert.deepEqual(done.history.map((h: { worker: string }) => h.worker), ['wa', 'wb']);
  });

  test('wait: 0 when all done, 1 when one failed, returns promptly after the last job ends; --all waits for all', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'block.sh', GATED);
    await addWorkers(s, 'w1:3');
    const [a, b, c] = (await s.ok(['add_jobs', '-'], { input: './block.sh\n./block.sh\n./block.sh 3\n' })).trim().split('\n');
    for (const id of [a, b, c]) await pidOf(s, id);

    const waitAB = spawnCli(['--data-dir', s.dataDir, 'wait', a, b], { cwd: s.dir });
    await until(() => socketClients(s.dataDir) >= 1, 'wait to connect');
    release(s, a);
    await untilState(s, a, 'done');
    assert.equal(waitAB.exitCode(), undefined, 'wait goes on while a job it waits for runs');
    const t0 = Date.now();
    release(s, b);
    const r = await within(waitAB.done, 10_000, 'wait to return');
    assert.equal(r.code, 0, r.stderr);
    assert.ok(Date.now() - t0 < 2000, `wait returned ${Date.now() - t0} ms after the last job ended`);

    const waitAll = spawnCli(['--data-dir', s.dataDir, 'wait', '--all'], { cwd: s.dir });
    await until(() => socketClients(s.dataDir) >= 1, 'wait to connect');
    const d = await addJob(s, './block.sh');
    await pidOf(s, d);
    release(s, c);
    await untilState(s, c, 'failed');
    assert.equal(waitAll.exitCode(), undefined, 'wait --all waits for every job, also ones added later');
    const t1 = Date.now();
    release(s, d);
    const all = await within(waitAll.done, 10_000, 'wait to return');
    assert.equal(all.code, 1, 'one job failed');
    assert.ok(Date.now() - t1 < 2000, `wait returned ${Date.now() - t1} ms after the last job ended`);

    assert.equal((await s.cli(['wait', a, b])).code, 0, 'finished jobs: returns at once');
    assert.equal((await s.cli(['wait', a, c])).code, 1);
    assert.equal((await s.cli(['wait', '9999'])).code, 1);
  });

  test('log -f streams the output of a running job and ends with it', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'talk.sh', `echo "first line"
while [ ! -e "step.$JOB_ID" ]; do sleep 0.02; done
echo "second line"
while [ ! -e "go.$JOB_ID" ]; do sleep 0.02; done
echo "last line"`);
    await addWorkers(s, 'w1');
    const id = await addJob(s, './talk.sh');
    await until(() => readIf(path.join(s.logDir, `${id}.log`)).includes('first line'), 'the first line in the log');
    const f = spawnCli(['--data-dir', s.dataDir, 'log', '-f', id], { cwd: s.dir });
    await until(() => f.stdout().includes('first line'), 'log -f to print what is there');
    assert.ok(!f.stdout().includes('second line'));
    fs.writeFileSync(path.join(s.dir, `step.${id}`), '');
    await until(() => f.stdout().includes('second line'), 'log -f to print a line written after it started', 5000);
    assert.equal(f.exitCode(), undefined, 'log -f goes on while the job runs');
    release(s, id);
    const r = await within(f.done, 5000, 'log -f to end with the job');
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /first line\nsecond line\nlast line\n/);
    const plain = await s.ok(['log', id]);
    assert.equal(plain, 'first line\nsecond line\nlast line\n');
  });

  test('wait and log -f outlast a server stop and start: they end when their jobs do, with the right exit code and every line once', async (t) => {
    let s = await serve(t);
    writeScript(s.dir, 'talk.sh', `echo "first line of $JOB_ID"
while [ ! -e "step.$JOB_ID" ]; do sleep 0.02; done
echo "second line of $JOB_ID"
while [ ! -e "go.$JOB_ID" ]; do sleep 0.02; done
echo "last line of $JOB_ID"
exit "$1"`);
    await addWorkers(s, 'w1:2');
    const a = await addJob(s, './talk.sh', '0');
    const b = await addJob(s, './talk.sh', '5');
    const logA = path.join(s.logDir, `${a}.log`);
    await until(() => readIf(logA).includes('first line') && readIf(path.join(s.logDir, `${b}.log`)).includes('first line'), 'both jobs to say their first line');
    const waitA = spawnCli(['--data-dir', s.dataDir, 'wait', a], { cwd: s.dir });
    const waitAB = spawnCli(['--data-dir', s.dataDir, 'wait', a, b], { cwd: s.dir });
    const follow = spawnCli(['--data-dir', s.dataDir, 'log', '-f', a], { cwd: s.dir });
    const followB = spawnCli(['--data-dir', s.dataDir, 'log', '-f', b], { cwd: s.dir });
    // Each has its first answer (a progress line, the log so far): the server has taken
    // every request before it stops.
    await until(() => follow.stdout().includes('first line') && followB.stdout().includes('first line'), 'log -f to print what is there');
    await until(() => /finished:/.test(waitA.stderr()) && /finished:/.test(waitAB.stderr()), 'wait to print its progress');

    // The server stops; job a says more and ends while no server runs.
    await s.stop();
    fs.writeFileSync(path.join(s.dir, `step.${a}`), '');
    await until(() => readIf(logA).includes('second line'), 'job a to write while no server runs');
    await until(() => follow.stdout().includes('second line'), 'log -f to go on printing while no server runs', 5000);
    release(s, a);
    await until(() => readIf(logA).includes('last line'), 'job a to end while no server runs');
    const clients = [waitA, waitAB, follow, followB];
    assert.deepEqual(clients.map((c) => c.exitCode()), [undefined, undefined, undefined, undefined], `no client gave up when the server went: ${clients.map((c) => c.stderr()).join('')}`);

    // The next server records a's end: wait a and log -f a end; wait a b and log -f b go
    // on until b, which ran on through the restart, ends.
    s = await s.restart();
    const wa = await within(waitA.done, 15_000, 'wait a to end after the restart');
    assert.equal(wa.code, 0, wa.stderr);
    const fa = await within(follow.done, 15_000, 'log -f a to end after the restart');
    assert.equal(fa.code, 0, fa.stderr);
    assert.equal(fa.stdout, `first line of ${a}\nsecond line of ${a}\nlast line of ${a}\n`, 'every line once, in order');
    assert.equal(waitAB.exitCode(), undefined, 'wait a b goes on while b runs');
    await until(() => socketClients(s.dataDir) === 2, 'wait a b and log -f b to reconnect');
    fs.writeFileSync(path.join(s.dir, `step.${b}`), '');
    await until(() => followB.stdout().includes('second line'), 'log -f b to print a line written after the restart', 5000);
    release(s, b);
    const wab = await within(waitAB.done, 15_000, 'wait a b to end');
    assert.equal(wab.code, 1, `b failed, so wait a b exits 1: ${wab.stderr}`);
    assert.match(wab.stderr, /2\/2 finished: 1 done, 1 failed/);
    const fb = await within(followB.done, 15_000, 'log -f b to end');
    assert.equal(fb.code, 1, `b failed, so log -f b exits 1: ${fb.stderr}`);
    assert.match(fb.stderr, new RegExp(`job ${b} ended: failed \\(exit 5\\)`));
    assert.equal(fb.stdout, `first line of ${b}\nsecond line of ${b}\nlast line of ${b}\n`, 'every line once, in order, across the reconnect');
  });

  test('clean forgets finished jobs (waiting and running stay); clean --logs deletes their logs', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'block.sh', GATED);
    await addWorkers(s, 'w1');
    const [ok, bad] = (await s.ok(['add_jobs', '-'], { input: './block.sh\n./block.sh 3\n' })).trim().split('\n');
    release(s, ok);
    release(s, bad);
    assert.equal((await s.cli(['wait', ok, bad])).code, 1);
    const [run, wait] = (await s.ok(['add_jobs', '-'], { input: './block.sh\n./block.sh\n' })).trim().split('\n');
    await pidOf(s, run);
    const logOf = (id: string) => path.join(s.logDir, `${id}.log`);
    assert.ok(fs.existsSync(logOf(ok)) && fs.existsSync(logOf(bad)));

    const r = await s.cli(['clean']);
    assert.equal(r.code, 0, r.stderr);
    const ids = async () => (await s.jobs()).map((j) => String(j.id)).sort();
    assert.deepEqual(await ids(), [run, wait].sort());
    assert.doesNotMatch(await s.ok(['list']), new RegExp(`^\\s*(${ok}|${bad})\\s`, 'm'));
    assert.equal((await s.cli(['log', ok])).code, 1, 'a forgotten job has no log command');
    assert.ok(fs.existsSync(logOf(ok)), 'clean without --logs keeps the files');
    assert.equal((await s.job(run)).state, 'running');
    assert.equal((await s.job(wait)).state, 'waiting');

    release(s, run);
    await pidOf(s, wait);
    assert.equal((await s.job(run)).state, 'done');
    assert.equal((await s.cli(['clean', '--logs'])).code, 0);
    assert.deepEqual(await ids(), [wait]);
    await until(() => !fs.existsSync(logOf(run)), 'the log of a cleaned job to be deleted', 5000);
    assert.ok(fs.existsSync(logOf(wait)), 'the log of a running job stays');
    release(s, wait);
    assert.equal((await s.cli(['wait', wait])).code, 0);
  });
});

// ---- campaigns: sweeps, tags, priorities, dependencies, pause, env ------------------

/** Records its run: "JOB_ID ARGS..." appended to order.txt, its arguments one per line in
 *  args.$JOB_ID, its LR and MSG variables in env.$JOB_ID; exits with $EXIT_WITH or 0. */
const RECORD = `echo "$JOB_ID $*" >> order.txt
printf '%s\\n' "$@" > "args.$JOB_ID"
printf 'LR=%s\\nMSG=%s\\n' "$LR" "$MSG" > "env.$JOB_ID"
exit "\${EXIT_WITH:-0}"`;

describe('campaigns', { concurrency: 4 }, () => {
  test('a sweep queues one job per combination in one request; {1} {2} {} are replaced, or the values appended; any file name works', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'rec.sh', RECORD);
    const ids = idsOf(await s.ok(['add_job', '--tag', 'grid', './rec.sh', '--lr={1}', '--seed', '{2}', ':::', '0.1', '0.01', ':::', '1', '2', '3']));
    assert.equal(ids.length, 6);
    assert.deepEqual(ids, ids.map((_, i) => ids[0] + i), 'consecutive ids, all printed');
    assert.equal(fs.readFileSync(path.join(s.dataDir, 'journal'), 'utf8').split('\n').filter((l) => l.includes('"e":"add"')).length, 1, 'one add event');
    // Files with spaces, quotes and a leading dash, as `add_job ./rec.sh ::: data/*` gives them.
    fs.mkdirSync(path.join(s.dir, 'data'));
    const names = ['run 1.txt', "it's.txt", '-dash.txt', 'x{1}.txt'].sort();
    for (const n of names) fs.writeFileSync(path.join(s.dir, 'data', n), '');
    const files = idsOf(await s.ok(['add_job', './rec.sh', ':::', ...names.map((n) => `data/${n}`)]));
    await addWorkers(s, 'w1:3');
    assert.equal((await s.cli(['wait'])).code, 0);
    const argsOf = (id: number) => readIf(path.join(s.dir, `args.${id}`)).split('\n').slice(0, -1);
    assert.deepEqual(ids.map(argsOf), [
      ['--lr=0.1', '--seed', '1'], ['--lr=0.1', '--seed', '2'], ['--lr=0.1', '--seed', '3'],
      ['--lr=0.01', '--seed', '1'], ['--lr=0.01', '--seed', '2'], ['--lr=0.01', '--seed', '3'],
    ]);
    assert.deepEqual(files.map(argsOf), names.map((n) => [`data/${n}`]), 'one job per file, the name one argument, as it is');
    const bad = [
      [['add_job', './rec.sh', ':::'], /::: list 1 has no values/],
      [['add_job', './rec.sh', '{3}', ':::', 'a', ':::', 'b'], /placeholder \{3\}/],
      [['add_job', ':::', 'a'], /needs a SCRIPT/],
    ] as const;
    const before = (await s.jobs()).length;
    for (const [args, msg] of bad) {
      const r = await s.cli([...args]);
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, msg);
      assert.equal(r.stderr.split('\n').filter((l) => l.startsWith('error:')).length, 1, 'one error line');
    }
    assert.equal((await s.jobs()).length, before, 'bad sweeps queue nothing');
  });

  test('tags: status shows a progress line per tag; list, wait, kill, retry, remove_job and clean act on one tag', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'rec.sh', RECORD);
    writeScript(s.dir, 'block.sh', GATED);
    const a = idsOf(await s.ok(['add_job', '--tag', 'a', './rec.sh', ':::', '1', '2', '3']));
    const failing = idsOf(await s.ok(['add_job', '--tag', 'a', '--tag', 'f', '-e', 'EXIT_WITH=4', './rec.sh', 'x']));
    const [blocked] = idsOf(await s.ok(['add_job', '--tag', 'b', './block.sh']));
    const [blocked2] = idsOf(await s.ok(['add_job', '--tag', 'b', './block.sh']));
    const human = await s.ok(['status']);
    assert.match(human, /^tags:$/m);
    assert.match(human, /^\s+a\s+\[\.+\] 0\/4 .*4 waiting/m);
    assert.match(human, /^\s+b\s+\[\.+\] 0\/2 /m);
    await addWorkers(s, 'w1:3');
    const w = await s.cli(['wait', '--tag', 'a']);
    assert.equal(w.code, 1, 'a tag with a failed job: wait exits 1');
    assert.match(w.stderr, /4\/4 finished: 3 done, 1 failed/);
    assert.deepEqual((await s.ok(['list', '--tag', 'f', '--json'])).length > 0 && JSON.parse(await s.ok(['list', '--tag', 'f', '--json'])).map((j: any) => [j.id, j.state, j.tags]), [[failing[0], 'failed', ['a', 'f']]]);
    const typo = await s.cli(['list', '--tag', 'nosuch']);
    assert.deepEqual([typo.code, typo.stdout], [1, ''], 'a tag no job has is an error, as for every other command');
    assert.match(typo.stderr, /^error: no job has the tag 'nosuch'$/m);
    const st = JSON.parse(await s.ok(['status', '--tag', 'a', '--json']));
    assert.deepEqual([st.tag, st.done, st.failed, st.total], ['a', 3, 1, 4]);
    assert.match(await s.ok(['retry', '--tag', 'a']), new RegExp(`queued again: ${failing[0]}$`, 'm'));
    await until(async () => (await s.job(failing[0])).state === 'failed' && (await s.job(failing[0])).attempts === 2, 'the retried job to fail again');
    await pidOf(s, blocked);
    await pidOf(s, blocked2);
    assert.match(await s.ok(['remove_job', '--tag', 'b']), /^no waiting job to remove$/m, 'running jobs are not waiting');
    await s.ok(['kill', '--tag', 'b']);
    assert.equal((await s.cli(['wait', '--tag', 'b'])).code, 1);
    assert.deepEqual([(await s.job(blocked)).state, (await s.job(blocked2)).state], ['killed', 'killed']);
    assert.match(await s.ok(['clean', '--tag', 'b']), /forgot 2 finished jobs/);
    assert.deepEqual((await s.jobs()).map((j) => j.id).sort((x, y) => x - y), [...a, ...failing]);
    const unknown = await s.cli(['kill', '--tag', 'nope']);
    assert.equal(unknown.code, 1);
    assert.match(unknown.stderr, /no job has the tag 'nope'/);
    assert.equal((await s.cli(['add_job', '--tag', 'a b', './rec.sh'])).code, 2);
    assert.equal(a.every((id) => readIf(path.join(s.dir, `args.${id}`)) !== ''), true);
  });

  test('priorities: higher first, first come first served within one; set_priority reorders waiting jobs', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'rec.sh', RECORD);
    writeScript(s.dir, 'block.sh', GATED);
    await addWorkers(s, 'w1');
    const gate = await addJob(s, './block.sh');
    await pidOf(s, gate);
    const low = idsOf(await s.ok(['add_job', './rec.sh', ':::', 'l1', 'l2']));
    const high = idsOf(await s.ok(['add_job', '--priority', '10', './rec.sh', ':::', 'h1', 'h2']));
    const neg = idsOf(await s.ok(['add_job', '--priority=-5', './rec.sh', 'n']));
    const mid = idsOf(await s.ok(['add_job', '--priority', '3', './rec.sh', 'm']));
    assert.match(await s.ok(['set_priority', '20', String(low[1])]), /priority 20: 1 waiting job/);
    assert.match(await s.ok(['set_priority', '-10', String(mid[0])]), /priority -10: 1 waiting job/, 'a negative priority is a number, not an option');
    const head = JSON.parse(await s.ok(['status', '--json'])).queue.map((q: { id: number }) => q.id);
    assert.deepEqual(head, [low[1], ...high, low[0], ...neg, ...mid], 'status shows the queue in start order');
    release(s, gate);
    assert.equal((await s.cli(['wait'])).code, 0);
    assert.deepEqual(order(s), [low[1], ...high, low[0], ...neg, ...mid]);
    const r = await s.cli(['set_priority', '5', String(high[0])]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /only waiting jobs change priority/);
    assert.equal((await s.cli(['add_job', '--priority', '1.5', './rec.sh'])).code, 2);
  });

  test('dependencies: --after waits for every dependency to end done; a failure fails the chain with the reason; list says why a job waits', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'rec.sh', RECORD);
    writeScript(s.dir, 'block.sh', GATED);
    const [p1, p2] = idsOf(await s.ok(['add_jobs', '-'], { input: './block.sh\n./block.sh\n' }));
    const [sum] = idsOf(await s.ok(['add_job', '--after', `${p1},${p2}`, './rec.sh', 'summary']));
    const [bad] = idsOf(await s.ok(['add_job', '-e', 'EXIT_WITH=3', './rec.sh', 'bad']));
    const [x] = idsOf(await s.ok(['add_job', '--after', String(bad), './rec.sh', 'x']));
    const [y] = idsOf(await s.ok(['add_job', '--after', String(x), '--after', String(sum), './rec.sh', 'y']));
    await addWorkers(s, 'w1:4');
    await pidOf(s, p1);
    await untilState(s, bad, 'failed');
    const list = await s.ok(['list']);
    assert.match(list, new RegExp(`^\\s*${sum}\\s+waiting\\s+after ${p1},${p2}\\s`, 'm'), 'list says what the job waits for');
    const jx = await s.job(x), jy = await s.job(y);
    assert.deepEqual([jx.state, jx.reason, jy.state, jy.reason], ['failed', `dependency ${bad} failed`, 'failed', `dependency ${x} failed`]);
    release(s, p1);
    await untilState(s, p1, 'done');
    assert.equal((await s.job(sum)).waitingFor, `after ${p2}`);
    assert.ok(!order(s).includes(sum), 'not started while one dependency runs');
    release(s, p2);
    await untilState(s, sum, 'done');
    // Retry of the chain: alone refused; with its failed dependency, it waits for it.
    const alone = await s.cli(['retry', String(x)]);
    assert.equal(alone.code, 1);
    assert.match(alone.stderr, new RegExp(`waits for job ${bad}, which ended failed`));
    assert.match(alone.stderr, new RegExp(`retry both: retry ${bad} ${x}`));
    assert.equal((await s.cli(['add_job', '--after', '999', './rec.sh'])).code, 1);
    assert.equal((await s.cli(['add_job', '--after', 'x1', './rec.sh'])).code, 2);
    const failedDep = await s.cli(['add_job', '--after', String(bad), './rec.sh']);
    assert.equal(failedDep.code, 1);
    assert.match(failedDep.stderr, /already ended failed/);
    assert.deepEqual(order(s).filter((id) => id === x || id === y), [], 'the failed chain never ran');
  });

  test('pause and resume, of everything or of a tag, hold across a restart; running jobs go on', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'rec.sh', RECORD);
    writeScript(s.dir, 'block.sh', GATED);
    await addWorkers(s, 'w1:3');
    const running = await addJob(s, './block.sh');
    await pidOf(s, running);
    assert.match(await s.ok(['pause']), /paused the queue/);
    assert.match(await s.ok(['pause', '--tag', 'late', '--ahead']), /paused tag late: no job has tag late yet; jobs added with --tag late will wait/);
    const [plain] = idsOf(await s.ok(['add_job', './rec.sh', 'plain']));
    const [late] = idsOf(await s.ok(['add_job', '--tag', 'late', './rec.sh', 'late']));
    release(s, running);
    await untilState(s, running, 'done');
    assert.match(await s.ok(['status']), /^paused: the queue .*tag late/m);
    await s.stop();
    const s2 = await s.restart();
    assert.deepEqual([(await s2.status()).paused, (await s2.status()).pausedTags], [true, ['late']], 'pauses are durable');
    assert.equal((await s2.job(plain)).waitingFor, 'paused');
    const r = await s2.cli(['resume']);
    assert.match(r.stdout, /resumed the queue/);
    assert.match(r.stderr, /still paused: tag late/);
    await untilState(s2, plain, 'done');
    assert.equal((await s2.job(late)).state, 'waiting');
    assert.equal((await s2.job(late)).waitingFor, 'tag late paused');
    await s2.ok(['resume', '--tag', 'late']);
    await untilState(s2, late, 'done');
    assert.match(await s2.ok(['resume']), /already running: the queue/);
  });

  test('-e/--env NAME=VALUE reaches the job on top of the server\'s environment, across a restart; bad settings are refused', async (t) => {
    const s = await serve(t, { env: { MSG: 'from the server', LR: 'server' } });
    writeScript(s.dir, 'rec.sh', RECORD);
    const [id] = idsOf(await s.ok(['add_job', '-e', 'LR=0.1', '--env', 'MSG=a b=c \'"$x', './rec.sh']));
    const [plain] = idsOf(await s.ok(['add_job', './rec.sh']));
    await s.stop();
    const s2 = await s.restart();
    await addWorkers(s2, 'w1');
    assert.equal((await s2.cli(['wait'])).code, 0);
    assert.equal(readIf(path.join(s.dir, `env.${id}`)), 'LR=0.1\nMSG=a b=c \'"$x\n');
    assert.equal(readIf(path.join(s.dir, `env.${plain}`)), 'LR=server\nMSG=from the server\n');
    assert.deepEqual((await s2.job(id)).env, ['LR=0.1', 'MSG=a b=c \'"$x']);
    for (const [setting, msg] of [['JOB_ID=7', /set by the server/], ['1X=2', /invalid environment setting/], ['NOVALUE', /invalid environment setting/]] as const) {
      const r = await s2.cli(['add_job', '-e', setting, './rec.sh']);
      assert.equal(r.code, 2, setting);
      assert.match(r.stderr, msg);
    }
  });
});
