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
  applyEvent, asCalled, commandHelp, decideClean, decideLoadStatus, decideRemoveJobs, formatJobRow, jobView, nearest, newState, optionsAfterScript, parseClipyStatus,
  UserError, type DecideContext,
} from '../cli.ts';
import { alive, CLI, readIf, run, runCli, serve, testDir, until, writeScript } from './server.ts';

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
    assert.match(rows[2], /^ {5}3  waiting  no worker has … .* \/w\/c\.sh  # no worker has 4 slots on one worker$/);
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
