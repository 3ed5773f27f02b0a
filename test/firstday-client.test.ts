// A user's first real day, the client's side: load_status of what cli.py really prints,
// warnings for djs options written after SCRIPT, remove_job's hint, log and list
// reasons and layout, --after-any, clean --state, and small help and hint fixes.
//   tier 1: the pure functions, fed literal states
//   tier 2: the real cli.ts, with a real server

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import {
  applyEvent, asCalled, commandHelp, decideAddJobs, decideClean, decideLoadStatus, decideRemoveJobs, decideRetry, formatJobRow, jobView, nearest, newState,
  optionsAfterScript, parseClipyStatus, planStarts, UserError, waitReason, queueReason, whyHeld, type DecideContext, type Event, type State,
} from '../cli.ts';
import { addWorkers, alive, CLI, GATED, pidOf, readIf, release, run, runCli, serve, testDir, until, untilState, writeScript } from './server.ts';

const T0 = Date.UTC(2026, 0, 1);
const C: DecideContext = { now: T0, killGraceMs: 1000, argSpace: 1 << 20 };
const FIXTURES = path.join(path.dirname(fileURLToPath(import.meta.url)), 'fixtures', 'clipy');
/** A status JSON that the real cli.py printed (see test/fixtures/clipy/README.md). */
const clipyFixture = (name: string) => JSON.parse(fs.readFileSync(path.join(FIXTURES, name), 'utf8'));

// ---------------------------------------------------------------- load_status

describe('load_status of what cli.py really prints', () => {
  test('a busy slave (ARGV under "envs", environment under "script") and an idle one load; the documented names too', () => {
    const s = parseClipyStatus(clipyFixture('status-busy-idle.json'), '/w');
    assert.deepEqual(s.workers.map((w) => [w.host, w.job?.argv ?? null, w.job?.jobEnv ?? null, w.removing]), [
      ['node-a', ['/w/job.sh', 'a'], [], false], ['node-b', null, null, false],
    ]);
    const s2 = parseClipyStatus(clipyFixture('status-busy-waitlist.json'), '/w');
    assert.deepEqual(s2.jobs, [{ argv: ['/w/job.sh', 'd e'], env: [] }, { argv: ['/w/job.sh', 'c'], env: [] }]);
    assert.deepEqual(s2.workers.map((w) => [w.host, w.job?.argv, w.removing]), [['node-a', ['/w/job.sh', 'a'], false], ['node-b', ['/w/job.sh', 'b'], true]]);
    // A job environment, as cli.py would print one (a dict under "script"), and the names as meant.
    const one = (running_job: unknown) => parseClipyStatus({ job_waitlist: [], slaves: [{ ip: 'h', envs: {}, status: 'busy', running_job }] }, '/w').workers[0].job;
    assert.deepEqual(one({ id: '1', script: { FOO: '1' }, envs: ['./j', 'x'], pid: 5, log_file: 'l' }), { id: '1', argv: ['/w/j', 'x'], jobEnv: ['FOO=1'], pid: 5, log: 'l' });
    assert.deepEqual(one({ id: '1', script: ['./j'], envs: { FOO: '2' }, pid: 5 })?.jobEnv, ['FOO=2']);
    assert.deepEqual(one({ id: '1', script: ['./j'], pid: 5 })?.jobEnv, []);
    assert.throws(() => one({ id: '1', script: { JOB_ID: '1' }, envs: ['./j'], pid: 5 }), /slaves\[0\]: running_job: script: JOB_ID is set by the server/);
    assert.throws(() => one({ id: '1', script: {}, envs: [], pid: 5 }), /running_job: a job is a non-empty list/);
    // The decision: the ended job's worker is added, with the idle one.
    const d = decideLoadStatus(newState(), { op: 'load_status', cwd: '/w', status: clipyFixture('status-busy-idle.json'), alive: [] }, C);
    assert.deepEqual(d.answer.added, ['node-a', 'node-b']);
    assert.deepEqual((d.answer.ended as { argv: string[] }[]).map((e) => e.argv), [['/w/job.sh', 'a']]);
  });

  test('load_status FILE of cli.py with a busy slave: its job left alone while it runs, its worker out; the idle one and the waitlist added', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'job.sh', 'echo "job $1 on $SLAVE_IP"');
    // cli.py's job a on node-a, still running here (cli.py set its JOB_ID).
    const status = clipyFixture('status-busy-waitlist.json');
    const id = status.slaves[0].running_job.id;
    const py = spawn('sleep', ['30'], { stdio: 'ignore', env: { ...process.env, JOB_ID: id } });
    t.after(() => { py.kill('SIGKILL'); });
    status.slaves[0].running_job.pid = py.pid;
    fs.writeFileSync(path.join(s.dir, 'st.json'), JSON.stringify(status));
    const r = await s.cli(['load_status', '--skip_ssh_auth_check', 'st.json']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`not added: worker node-a, which cli.py job ${id} \\(pid ${py.pid}\\) still runs on`));
    assert.match(r.stdout, /left out 1 worker cli.py was removing: node-b/);
    assert.match(r.stdout, /not run again: cli.py job \d+ on node-b .* To run it again: cli.ts add_job \.\/job\.sh b$/m);
    assert.match(r.stdout, /queued 2 waiting jobs: ids 1-2/);
    assert.ok(alive(py.pid!));
    // The other file: node-a's job ended (its pid is long gone), node-b idle: both added.
    fs.copyFileSync(path.join(FIXTURES, 'status-busy-idle.json'), path.join(s.dir, 'st2.json'));
    const r2 = await s.cli(['load_status', '--skip_ssh_auth_check', 'st2.json']);
    assert.equal(r2.code, 0, r2.stderr);
    assert.match(r2.stdout, /added 2 workers: node-a node-b/);
    assert.match(r2.stdout, /not run again: cli.py job \d+ on node-a .* To run it again: cli.ts add_job \.\/job\.sh a$/m);
    await s.ok(['wait']);
    assert.deepEqual((await s.jobs()).map((j) => [j.args, j.state]), [[['d e'], 'done'], [['c'], 'done']]);
  });
});

// ---------------------------------------------------------------- options after SCRIPT, remove_job N

describe('words after SCRIPT that spell options of djs', () => {
  test('found with their values; -e only before NAME=VALUE; not --help, nor after -- or :::', () => {
    const opts = { tag: { type: 'string' as const, multiple: true }, env: { type: 'string' as const, short: 'e', multiple: true }, id: { type: 'boolean' as const } };
    assert.deepEqual(optionsAfterScript(['--tag', 'oops', 'x', '-e', 'FOO=1', '-e', 'notenv', '--help', '-eB=2', '--tag=t', '--id', '--data-dir', '/d', '--', '--tag', 'y'], opts), {
      found: [['--tag', 'oops'], ['-e', 'FOO=1'], ['-eB=2'], ['--tag=t'], ['--id'], ['--data-dir', '/d']],
      rest: ['x', '-e', 'notenv', '--help', '--', '--tag', 'y'],
    });
    assert.deepEqual(optionsAfterScript(['a', ':::', '--tag', 'b'], opts), { found: [], rest: ['a', ':::', '--tag', 'b'] });
    assert.deepEqual(optionsAfterScript(['--tag'], opts), { found: [], rest: ['--tag'] }, 'no value: the job\'s own');
  });

  test('add_job warns, naming the line that gives them to djs, and queues them as the job\'s arguments; remove_job N hints --id N', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'train.sh', 'echo "$@"');
    const r = await s.cli(['add_job', './train.sh', '--tag', 'oops', 'x', '-e', 'FOO=1']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /^warning: '--tag oops' and '-e FOO=1' come after SCRIPT, so they are arguments of the job; options of djs go before SCRIPT, as in: cli\.ts add_job --tag oops -e FOO=1 \.\/train\.sh x$/m);
    const r2 = await s.cli(['add_job', './train.sh', '--data-dir', '/tmp/x']);
    assert.match(r2.stderr, /^warning: '--data-dir \/tmp\/x' comes after SCRIPT, so it is an argument of the job; .* as in: cli\.ts add_job --data-dir \/tmp\/x \.\/train\.sh$/m);
    const r3 = await s.cli(['add_job', './train.sh', '--help', '-e', 'x']);
    assert.doesNotMatch(r3.stderr, /after SCRIPT/, 'a script\'s own options get no warning');
    const jobs = await s.jobs();
    assert.deepEqual(jobs.map((j) => [j.args, j.tags, j.env]), [
      [['--tag', 'oops', 'x', '-e', 'FOO=1'], [], []], [['--data-dir', '/tmp/x'], [], []], [['--help', '-e', 'x'], [], []],
    ]);
    // An add_jobs file: one warning for all its jobs, naming the first.
    fs.writeFileSync(path.join(s.dir, 'jobs.txt'), './train.sh a\n./train.sh b --tag t\n\n./train.sh c --retries 2\n');
    const file = await s.cli(['add_jobs', 'jobs.txt']);
    assert.equal(file.code, 0, file.stderr);
    assert.match(file.stderr, /^warning: 2 jobs of 'jobs\.txt' have words after SCRIPT that spell options of djs \(the first: '.*\/train\.sh b --tag t'\); the jobs get them as arguments; options of djs go on the command line, as in: cli\.ts add_jobs --tag t jobs\.txt$/m);
    assert.deepEqual((await s.jobs()).slice(3).map((j) => j.args), [['a'], ['b', '--tag', 't'], ['c', '--retries', '2']]);
    await s.ok(['remove_job', '--id', '4', '5', '6']);
    // remove_job 2: no script is named 2, and 2 is a job.
    const rm = await s.cli(['remove_job', '2']);
    assert.equal(rm.code, 1);
    assert.match(rm.stderr, /^error: no waiting job runs '.*\/2'\nhint: 2 is a job id: cli\.ts remove_job --id 2$/m);
    const rm2 = await s.cli(['remove_job', '99']);
    assert.doesNotMatch(rm2.stderr, /hint/, 'no job 99: no hint');
    // remove_job's --tag excludes a SCRIPT: only its -e is meant for djs; the words match job 1.
    const rm3 = await s.cli(['remove_job', './train.sh', '--tag', 'oops', 'x', '-e', 'FOO=1']);
    assert.match(rm3.stderr, /^warning: '-e FOO=1' comes after SCRIPT, .* as in: cli\.ts remove_job -e FOO=1 \.\/train\.sh --tag oops x$/m);
    assert.match(rm3.stdout, /removed 1 job: 1/);
  });

  test('decideRemoveJobs: the hint only for words that are ids of jobs', () => {
    const st = newState();
    applyEvent(st, { e: 'add', t: T0, id: 1, cwd: '/w', retries: 0, timeout: 0, jobs: [['/w/a.sh'], ['/w/a.sh'], ['/w/a.sh']] });
    const hint = (script: string, args: string[]) => {
      try { decideRemoveJobs(st, { op: 'remove_jobs', script, args }, C); } catch (e) { assert.ok(e instanceof UserError); return e.hint; }
      assert.fail('no error');
    };
    assert.equal(hint('/w/3', []), '3 is a job id: cli.ts remove_job --id 3');
    assert.equal(hint('/w/2', ['3']), '2 3 are job ids: cli.ts remove_job --id 2 3');
    assert.equal(hint('/w/4', []), undefined);
    assert.equal(hint('/w/3', ['x']), undefined);
  });
});

// ---------------------------------------------------------------- small ones

describe('help and hints', () => {
  test('an option too long for its column has its words on the next line; --retry: did you mean --retries; djs for cli.ts', () => {
    const help = commandHelp('add_job');
    assert.match(help, /\n  -e, --env NAME=VALUE \(--env,-e=NAME=VALUE\)\n {26}more environment for the job/);
    for (const line of help.split('\n')) assert.doesNotMatch(line, /\)[a-z]/, line);
    assert.equal(nearest('retry', ['retries', 'retry-delay', 'timeout', 'tag']), 'retries');
    assert.equal(nearest('frobnicate', ['retries', 'status']), undefined);
    assert.equal(asCalled('hint: start one with: cli.ts start (see: cli.ts help); ./cli.ts stop; /home/me/cli.ts x', 'djs'),
      'hint: start one with: djs start (see: djs help); djs stop; /home/me/cli.ts x');
    assert.equal(asCalled('see: cli.ts help', 'cli.ts'), 'see: cli.ts help');
  });

  test('--http with no value: how to write it; --retry 2: did you mean --retries', async () => {
    const r = await runCli(['start', '--http']);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /^error: option '--http' needs a value\nhint: as in: --http \[HOST:\]PORT \(see: cli\.ts help start\)$/m);
    const r2 = await runCli(['start', '--http', '-d']);
    assert.match(r2.stderr, /hint: write --http=VALUE for a value that starts with '-'/, 'a value that looks like an option');
    const r3 = await runCli(['add_job', '--retry', '2', './x.sh']);
    assert.equal(r3.code, 2);
    assert.match(r3.stderr, /hint: did you mean --retries\?/);
  });

  test('called as djs through a symlink, hints and help say djs; the server and its jobs do not inherit the name', async (t) => {
    const dir = testDir(t), bin = path.join(dir, 'bin');
    fs.mkdirSync(bin);
    fs.symlinkSync(CLI, path.join(bin, 'djs'));
    const env = { PATH: `${bin}:${process.env.PATH}`, NO_COLOR: '1' };
    const djs = (line: string) => run('/bin/sh', ['-c', line], { cwd: dir, env });
    for (let i = 0; i < 2; i++) { // the first run may make the plain-JS copy, the second runs it
      const r = await djs('djs --data-dir nothere status');
      assert.equal(r.code, 3);
      assert.match(r.stderr, /^hint: start one with: djs start /m);
      assert.doesNotMatch(r.stderr, /cli\.ts/);
    }
    assert.match((await djs('djs help kill')).stdout, /^usage: djs kill /);
    assert.match((await djs('djs frobnicate')).stderr, /\(see: djs help\)/);
    // A server started as djs: its job's environment has no DJS_PROG.
    writeScript(dir, 'env.sh', 'env > "env.$JOB_ID"');
    const start = await djs('djs --data-dir .data start -d');
    assert.equal(start.code, 0, start.stderr);
    t.after(() => djs('djs --data-dir .data stop'));
    assert.equal((await djs('djs --data-dir .data add_slave --skip_ssh_auth_check local1')).code, 0);
    assert.equal((await djs('djs --data-dir .data add_job ./env.sh && djs --data-dir .data wait')).code, 0);
    const jobEnv = await until(() => readIf(path.join(dir, 'env.1')), 'the job to write its environment');
    assert.match(jobEnv, /^JOB_ID=1$/m);
    assert.doesNotMatch(jobEnv, /DJS_PROG/);
  });
});

// ---------------------------------------------------------------- log and list: reasons, one line per job

describe('why a job never ran, in log and list', () => {
  test('list: one line per job, columns in their widths, the whole reason after the command', () => {
    const st = newState();
    applyEvent(st, { e: 'worker', t: T0, host: 'w1', slots: 1, ssh: false });
    applyEvent(st, { e: 'add', t: T0, id: 1, cwd: '/w', retries: 0, timeout: 0, jobs: [['/w/a.sh', 'line\nbreak']] });
    applyEvent(st, { e: 'add', t: T0, id: 2, cwd: '/w', retries: 0, timeout: 0, jobs: [['/w/b.sh']], after: [1] });
    applyEvent(st, { e: 'add', t: T0, id: 3, cwd: '/w', retries: 0, timeout: 0, jobs: [['/w/c.sh']], need: { slots: 4, gpus: 0, require: [], exclude: [], hosts: [] } });
    applyEvent(st, { e: 'start', t: T0, id: 1, host: 'w1', slot: 0 });
    applyEvent(st, { e: 'end', t: T0 + 1000, id: 1, run: 1, code: 1 });
    const rows = [1, 2, 3].map((id) => formatJobRow(jobView(st, st.jobs.get(id)!, T0 + 2000), T0 + 2000, (_c, x) => x));
    for (const row of rows) assert.doesNotMatch(row, /\n/, row);
    assert.match(rows[0], /a\.sh \$'line\\x0abreak'$/);
    assert.match(rows[1], /^ {5}2  failed   -  +dependency…  .* \/w\/b\.sh  # dependency 1 failed$/);
    assert.match(rows[2], /^ {5}3  waiting  no worker has…  .* \/w\/c\.sh  # no worker has 4 slots on one worker$/);
    // The columns line up: every command starts where the header says.
    const at = (row: string, cmd: string) => row.indexOf(cmd);
    assert.equal(at(rows[1], '/w/b.sh'), at(rows[0], '/w/a.sh'));
    assert.equal(at(rows[2], '/w/c.sh'), at(rows[0], '/w/a.sh'));
  });

  test('log ID of a job that never ran says why; list keeps one line per job with the reason in full', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'fail.sh', 'exit 1');
    writeScript(s.dir, 'ok.sh', 'echo ok');
    const gone = path.join(s.dir, 'gone\ndir');
    fs.mkdirSync(gone);
    const noDir = (await s.ok(['add_job', path.join(s.dir, 'ok.sh')], { cwd: gone })).trim();
    fs.rmdirSync(gone);
    const first = (await s.ok(['add_job', './fail.sh'])).trim();
    const dep = (await s.ok(['add_job', '--after', first, './ok.sh'])).trim();
    const waiting = await s.cli(['log', dep]);
    assert.equal(waiting.code, 0);
    assert.match(waiting.stderr, new RegExp(`^note: job ${dep} has no log: it has not started \\(after ${first}\\)$`, 'm'));
    await s.ok(['add_slave', '--skip_ssh_auth_check', 'local1']);
    await s.cli(['wait', '--all']);
    const l1 = await s.cli(['log', dep]);
    assert.match(l1.stderr, new RegExp(`^note: job ${dep} has no log: it ended failed: dependency ${first} failed$`, 'm'));
    const l2 = await s.cli(['log', noDir]);
    assert.match(l2.stderr, new RegExp(`^note: job ${noDir} has no log: it ended failed: cannot start: cannot enter .*/gone\\\\x0adir \\(does it still exist\\?\\)$`, 'm'));
    const list = (await s.ok(['list'])).split('\n').filter(Boolean);
    assert.equal(list.length, 4, list.join('\n'));
    assert.match(list.find((r) => r.startsWith(noDir.padStart(6)))!, /  no start  .*ok\.sh  # cannot start: cannot enter .*gone\\x0adir/);
    assert.match(list.find((r) => r.startsWith(dep.padStart(6)))!, new RegExp(`ok\\.sh  # dependency ${first} failed$`));
  });
});

// ---------------------------------------------------------------- clean --state

describe('clean --state', () => {
  test('decideClean: only the finished jobs of those states (and tag); counts per state; waiting and running refused', () => {
    const st = newState();
    applyEvent(st, { e: 'worker', t: T0, host: 'w', slots: 4, ssh: false });
    applyEvent(st, { e: 'add', t: T0, id: 1, cwd: '/w', retries: 0, timeout: 0, jobs: [['/w/a'], ['/w/b'], ['/w/c'], ['/w/d']], tags: ['x'] });
    for (const id of [1, 2, 3]) applyEvent(st, { e: 'start', t: T0, id, host: 'w', slot: id - 1 });
    applyEvent(st, { e: 'end', t: T0, id: 1, run: 1, code: 0 });
    applyEvent(st, { e: 'end', t: T0, id: 2, run: 1, code: 1 });
    applyEvent(st, { e: 'kill', t: T0, ids: [4], why: 'user', grace: 0 });
    const d = decideClean(st, { op: 'clean', states: ['done', 'killed'] }, C);
    assert.deepEqual(d.answer, { count: 2, states: { done: 1, failed: 0, killed: 1 } });
    assert.deepEqual(d.events, [{ e: 'clean', t: T0, logs: false, ids: [1, 4] }]);
    assert.deepEqual(decideClean(st, { op: 'clean' }, C).answer, { count: 3, states: { done: 1, failed: 1, killed: 1 } }, 'without states: every finished job, as before');
    assert.deepEqual(decideClean(st, { op: 'clean' }, C).events, [{ e: 'clean', t: T0, logs: false }]);
    assert.deepEqual(decideClean(st, { op: 'clean', states: ['failed'], tag: 'x' }, C).events, [{ e: 'clean', t: T0, logs: false, ids: [2] }]);
    assert.throws(() => decideClean(st, { op: 'clean', states: ['running'] }, C), /clean takes finished states, not 'running'/);
    assert.throws(() => decideClean(st, { op: 'clean', states: [] }, C), /states is a list/);
    for (const ev of d.events) applyEvent(st, ev);
    assert.deepEqual([...st.jobs.keys()], [2, 3], 'the failed and the running job stay');
  });

  test('clean --state done keeps the failed jobs for retry --failed, and says what it forgot', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'ok.sh', 'exit 0');
    writeScript(s.dir, 'fail.sh', 'exit 3');
    await s.ok(['add_slave', '--skip_ssh_auth_check', 'local1:2']);
    await s.ok(['add_job', './ok.sh']);
    await s.ok(['add_job', './ok.sh']);
    const bad = (await s.ok(['add_job', './fail.sh'])).trim();
    await s.cli(['wait', '--all']);
    const bogus = await s.cli(['clean', '--state', 'waiting']);
    assert.equal(bogus.code, 2);
    assert.match(bogus.stderr, /^error: clean takes finished states, not 'waiting'\nhint: states are done, failed, killed$/m);
    assert.equal(await s.ok(['clean', '--state', 'done']), 'forgot 2 finished jobs (2 done)\n');
    assert.deepEqual((await s.jobs()).map((j) => [j.id, j.state]), [[Number(bad), 'failed']]);
    assert.match(await s.ok(['retry', '--failed']), new RegExp(`queued again: ${bad}`));
    await s.cli(['wait', '--all']);
    assert.equal(await s.ok(['clean', '--state', 'done', '--state', 'killed']), 'forgot 0 finished jobs\n');
    assert.equal(await s.ok(['clean']), 'forgot 1 finished job (1 failed)\n');
  });
});

// ---------------------------------------------------------------- --after-any

describe('--after-any: start once those jobs ended, whatever the result', () => {
  /** A state with one worker of `slots` slots and jobs 1..n of /w/jN, added one by one. */
  const withJobs = (n: number, slots = 4) => {
    const st = newState();
    applyEvent(st, { e: 'worker', t: T0, host: 'w', slots, ssh: false });
    for (let id = 1; id <= n; id++) applyEvent(st, { e: 'add', t: T0, id, cwd: '/w', retries: 0, timeout: 0, jobs: [[`/w/j${id}`]] });
    return st;
  };
  const add = (st: State, req: Record<string, unknown>) => { const d = decideAddJobs(st, { op: 'add_jobs', cwd: '/w', jobs: [['/w/x']], ...req }, C); for (const ev of d.events) applyEvent(st, ev); return d.events[0] as Extract<Event, { e: 'add' }>; };
  const run1 = (st: State, id: number, code: number) => {
    applyEvent(st, { e: 'start', t: T0, id, host: 'w', slot: [...st.workers.get('w')!.running].indexOf(0) });
    applyEvent(st, { e: 'end', t: T0 + 1, id, run: st.jobs.get(id)!.run, code });
  };
  const starts = (st: State) => planStarts(st, T0 + 10).map((s) => s.id);

  test('held until every one ended, failed and killed too; --after beside it still fails for a failure', () => {
    const st = withJobs(3);
    const ev = add(st, { afterAny: [2, 1, 2], after: [3] });
    assert.deepEqual([ev.after, ev.afterAny], [[3], [1, 2]]);
    const any = add(st, { afterAny: [1, 2] }).id;
    const both = add(st, { after: [1], afterAny: [1] });
    assert.deepEqual([both.after, both.afterAny], [[1], undefined], 'named in both: it must end done');
    assert.equal(waitReason(st, st.jobs.get(4)!, queueReason(st)), 'after 3; after-any 1,2');
    assert.deepEqual(starts(st).sort(), [1, 2, 3]);
    run1(st, 1, 1); // failed
    assert.equal(st.jobs.get(any)!.state, 'waiting');
    assert.equal(waitReason(st, st.jobs.get(any)!, queueReason(st)), 'after-any 2');
    assert.match(whyHeld(st, [any])!, /their --after-any dependencies have not all ended/);
    assert.deepEqual([st.jobs.get(6)!.state, st.jobs.get(6)!.reason], ['failed', 'dependency 1 failed'], '--after fails as before');
    applyEvent(st, { e: 'kill', t: T0 + 2, ids: [2], why: 'user', grace: 0 }); // waiting: killed without running
    assert.equal(st.jobs.get(2)!.state, 'killed');
    assert.ok(starts(st).includes(any), 'both ended: it starts');
    assert.ok(!starts(st).includes(4), 'job 4 still waits for 3 (--after)');
    run1(st, 3, 0);
    assert.ok(starts(st).includes(4));
  });

  test('a dependency removed before it ran counts as ended; an ended one is met at once; an unknown id is refused', () => {
    const st = withJobs(2);
    const j = add(st, { afterAny: [1] }).id;
    applyEvent(st, { e: 'remove', t: T0, ids: [1] });
    assert.deepEqual([st.jobs.get(j)!.state, starts(st).includes(j)], ['waiting', true]);
    run1(st, 2, 1);
    const k = add(st, { afterAny: [2] }).id;
    assert.ok(starts(st).includes(k), 'its dependency had already failed: met');
    assert.throws(() => decideAddJobs(st, { op: 'add_jobs', cwd: '/w', jobs: [['/w/x']], afterAny: [99] }, C), /no such job '99' to wait for/);
    assert.throws(() => decideAddJobs(st, { op: 'add_jobs', cwd: '/w', jobs: [['/w/x']], afterAny: ['1'] }, C), /invalid job id/);
  });

  test('retry: a retried dependency is waited for again; the job itself may be retried whatever its dependencies did', () => {
    const st = withJobs(2);
    const j = add(st, { afterAny: [1, 2] }).id;
    run1(st, 1, 1);
    applyEvent(st, { e: 'retry', t: T0 + 2, ids: [1] });
    assert.equal(waitReason(st, st.jobs.get(j)!, queueReason(st)), 'after-any 1,2', 'waits for the retried one again');
    run1(st, 1, 1);
    run1(st, 2, 0);
    assert.ok(starts(st).includes(j));
    run1(st, j, 0);
    const d = decideRetry(st, { op: 'retry', ids: [j] }, C);
    assert.deepEqual(d.answer, { ids: [j] }, 'job 1 failed, which --after-any does not mind');
    for (const ev of d.events) applyEvent(st, ev);
    assert.ok(starts(st).includes(j));
  });

  test('add_job, add_jobs and sweeps take it; the summary runs after a sweep with failures; HTTP takes afterAny; it survives kill -9 of the server', async (t) => {
    // A snapshot at every chance: the restart below reads the held jobs from one.
    const s = await serve(t, { args: ['--http', '0'], env: { DJS_SNAPSHOT_MIN_BYTES: '1' } });
    writeScript(s.dir, 'exit.sh', 'exit "$1"');
    writeScript(s.dir, 'gated.sh', GATED);
    writeScript(s.dir, 'summary.sh', 'echo "summary $JOB_ID" > "summary.$JOB_ID"');
    const sweep = (await s.ok(['add_job', '--tag', 'sw', './exit.sh', ':::', '0', '3', '0'])).trim().split('\n');
    const gate = (await s.ok(['add_job', './gated.sh'])).trim();
    const ids = [...sweep, gate].join(',');
    const summary = (await s.ok(['add_job', '--after-any', ids, './summary.sh'])).trim();
    fs.writeFileSync(path.join(s.dir, 'jobs.txt'), './summary.sh\n');
    const fromFile = (await s.ok(['add_jobs', '--after-any', sweep[1], '--after-any', gate, 'jobs.txt'])).trim();
    const many = (await s.ok(['add_job', '--after-any', gate, './summary.sh', ':::', 'a', 'b'])).trim().split('\n');
    const url = (await s.ok(['dashboard'])).trim(), [base, token] = url.split('/#token=');
    const res = await fetch(`${base}/api/add_jobs`, {
      method: 'POST', headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ cwd: s.dir, jobs: [['./summary.sh']], afterAny: [Number(gate)] }),
    });
    assert.equal(res.status, 200, await res.clone().text());
    const viaHttp = String(((await res.json()) as { first: number }).first);
    const bad = await s.cli(['add_job', '--after-any', '999', './summary.sh']);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /error: no such job '999' to wait for/);
    await addWorkers(s, 'w1:4');
    await untilState(s, sweep[1], 'failed');
    await pidOf(s, gate);
    assert.equal((await s.job(summary)).waitingFor, `after-any ${gate}`);
    assert.match((await s.ok(['list'])), new RegExp(`^\\s*${summary}\\s+waiting\\s+after-any ${gate}\\s`, 'm'));
    // kill -9 of the server while they wait: the restarted one still holds them.
    await s.crash();
    assert.ok(fs.existsSync(path.join(s.dataDir, 'snapshot')), 'a snapshot was written');
    const s2 = await s.restart();
    assert.equal((await s2.job(summary)).waitingFor, `after-any ${gate}`);
    assert.deepEqual((await s2.job(summary)).afterAny, [...sweep, gate].map(Number));
    const kill = await s2.cli(['kill', gate]);
    assert.equal(kill.code, 0, kill.stderr);
    for (const id of [summary, fromFile, ...many, viaHttp]) await untilState(s2, id, 'done');
    assert.equal((await s2.job(gate)).state, 'killed');
    assert.match(readIf(path.join(s.dir, `summary.${summary}`)), /summary/);
    release(s2, gate);
  });
});
