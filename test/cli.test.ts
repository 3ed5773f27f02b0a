// Tier 2: the basics of cli.ts as a black box — a real server process per test, real
// job scripts on fake workers (added with --skip_ssh_auth_check), real signals.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { controlDirFor } from '../cli.ts';
import {
  CLI, GATED, addJob, addWorkers, alive, pidOf, procIds, rawRequest, readIf, release, run, runCli, serve, spawnCli, startServer, testDir, until, untilState, within, writeScript,
  type Run, type TestServer,
} from './server.ts';

/** Runs a shell command line with the given environment. */
const sh = (line: string, opts: { cwd?: string; env?: NodeJS.ProcessEnv }): Promise<Run> =>
  run('/bin/sh', ['-c', line], { ...opts, env: { NO_COLOR: '1', ...opts.env } });

// ---------------------------------------------------------------------------------

// Independent tests, each with its own server: run a few at once.
describe('cli.ts basics', { concurrency: 4 }, () => {
  test('runs from any cwd and through a symlink on PATH; help, unknown command, no server', async (t) => {
    const s = await serve(t);
    const elsewhere = path.join(s.dir, 'elsewhere'), bin = path.join(s.dir, 'bin');
    fs.mkdirSync(elsewhere);
    fs.mkdirSync(bin);
    fs.symlinkSync(CLI, path.join(bin, 'djs-link'));

    const help = await runCli(['help'], { cwd: elsewhere });
    assert.equal(help.code, 0, help.stderr);
    assert.match(help.stdout, /add_job/);

    const direct = await runCli(['--data-dir', s.dataDir, 'status', '--json'], { cwd: elsewhere });
    assert.equal(direct.code, 0, direct.stderr);
    assert.equal(JSON.parse(direct.stdout).counts.total, 0);

    const viaLink = await sh(`djs-link --data-dir '${s.dataDir}' status --json`, { cwd: elsewhere, env: { PATH: `${bin}:${process.env.PATH}` } });
    assert.equal(viaLink.code, 0, viaLink.stderr);
    assert.deepEqual(JSON.parse(viaLink.stdout).workers, []);

    const byEnv = await sh('djs-link status --json', { cwd: elsewhere, env: { PATH: `${bin}:${process.env.PATH}`, DJS_DATA_DIR: s.dataDir } });
    assert.equal(byEnv.code, 0, `DJS_DATA_DIR selects the server: ${byEnv.stderr}`);
    const byAlias = await runCli(['--server_data_dir', s.dataDir, 'status'], { cwd: elsewhere });
    assert.equal(byAlias.code, 0, `--server_data_dir selects the server: ${byAlias.stderr}`);

    const unknown = await runCli(['frobnicate'], { cwd: elsewhere });
    assert.equal(unknown.code, 2);
    assert.match(unknown.stderr, /^error: .*frobnicate/m);
    assert.equal(unknown.stdout, '');

    const none = await runCli(['--data-dir', path.join(s.dir, 'no-server-here'), 'status'], { cwd: elsewhere });
    assert.equal(none.code, 3);
    assert.match(none.stderr, /^error: /m);
    const noneViaLink = await sh(`djs-link --data-dir '${path.join(s.dir, 'nothing')}' list`, { cwd: elsewhere, env: { PATH: `${bin}:${process.env.PATH}` } });
    assert.equal(noneViaLink.code, 3);
  });

  test('start: one ready line, refuses a second server, recovers from a SIGKILLed one, private socket', async (t) => {
    const s = await serve(t);
    assert.equal(s.output().split('\n').filter((l) => /ready/.test(l)).length, 1, s.output());
    assert.equal(fs.statSync(path.join(s.dataDir, 'server.sock')).mode & 0o777, 0o600);
    assert.equal(fs.statSync(s.dataDir).mode & 0o777, 0o700);

    const second = spawnCli(['start', s.dataDir, s.logDir], { cwd: s.dir });
    t.after(() => { if (second.exitCode() === undefined) second.proc.kill('SIGKILL'); });
    const r = await within(second.done, 10_000, 'a second start to give up');
    assert.equal(r.code, 1, r.stdout + r.stderr);
    assert.match(r.stderr, new RegExp(`^error: .*\\b${s.proc.pid}\\b`, 'm'));
    assert.equal((await s.cli(['status'])).code, 0, 'the first server kept running');

    await s.crash();
    assert.ok(fs.existsSync(path.join(s.dataDir, 'server.pid')), 'a crash leaves the pid file');
    assert.ok(fs.existsSync(path.join(s.dataDir, 'server.sock')), 'a crash leaves the socket');
    assert.equal((await s.cli(['status'])).code, 3);

    const s2 = await s.restart();
    assert.equal((await s2.cli(['status'])).code, 0);
    assert.equal(fs.statSync(path.join(s2.dataDir, 'server.sock')).mode & 0o777, 0o600);

    const stop = await s2.cli(['stop']);
    assert.equal(stop.code, 0, stop.stderr);
    assert.equal(await s2.exited, 0);
    assert.equal((await s2.cli(['status'])).code, 3);
  });

  test('start: of starts racing for a data dir left by a crashed server, exactly one runs', async (t) => {
    const s = await serve(t);
    await s.crash(); // leaves its pid file and socket
    const starts = Array.from({ length: 4 }, () => spawnCli(['start', s.dataDir, s.logDir], { cwd: s.dir }));
    t.after(() => { for (const p of starts) if (p.exitCode() === undefined) p.proc.kill('SIGKILL'); });
    await until(() => starts.filter((p) => p.exitCode() !== undefined).length === 3, 'all but one start to give up', 30_000);
    const [winner] = starts.filter((p) => p.exitCode() === undefined);
    await until(() => /server ready/.test(winner.stdout() + winner.stderr()), 'the one left to be ready');
    for (const p of starts) {
      if (p === winner) continue;
      const r = await p.done;
      assert.equal(r.code, 1, r.stdout + r.stderr);
      assert.match(r.stderr, /already running|another server/);
      assert.doesNotMatch(r.stdout + r.stderr, /server ready/);
    }
    assert.equal((await s.cli(['status'])).code, 0);
    assert.equal((await s.cli(['stop'])).code, 0);
    assert.equal((await winner.done).code, 0);
  });

  test('start --detach: returns once the server answers; a client started at once waits for a server still starting', async (t) => {
    const dir = testDir(t); // removing it ends the detached server too
    const dataDir = path.join(dir, '.data');
    const r = await runCli(['start', '--detach'], { cwd: dir });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^djs server ready: pid \d+/);
    assert.equal((await runCli(['status'], { cwd: dir })).code, 0, 'the detached server answers');
    assert.match(fs.readFileSync(path.join(dir, 'logs', 'server.log'), 'utf8'), /server ready/);
    const again = await runCli(['start', '--detach'], { cwd: dir });
    assert.equal(again.code, 1);
    assert.match(again.stderr, /already running/);
    // Stop it, give it a journal that takes a while to replay, and start it again in the
    // foreground: a client that comes while it replays waits instead of saying "no server".
    assert.equal((await runCli(['stop'], { cwd: dir })).code, 0);
    const script = writeScript(dir, 'j.sh', 'true');
    const jobs = JSON.stringify(Array.from({ length: 300_000 }, (_, i) => [script, String(i)]));
    fs.appendFileSync(path.join(dataDir, 'journal'), `{"n":1,"e":"add","t":${Date.now()},"id":1,"cwd":"${dir}","retries":0,"timeout":0,"jobs":${jobs}}\n`);
    const server = spawnCli(['start'], { cwd: dir });
    t.after(() => server.proc.kill('SIGKILL'));
    await until(() => fs.existsSync(path.join(dataDir, 'server.pid')), 'the server to take the data dir');
    const st = await runCli(['status', '--json'], { cwd: dir });
    assert.equal(st.code, 0, st.stderr);
    assert.equal(JSON.parse(st.stdout).counts.total, 300_000);
  });

  test('a data dir or log dir under a directory someone else can change is refused, naming it, before anything is made there', async (t) => {
    const base = testDir(t);
    const open = path.join(base, 'open');
    fs.mkdirSync(open);
    fs.chmodSync(open, 0o777); // anyone could rename what is in it
    const refused = async (args: string[], what: RegExp) => {
      const r = await runCli(args, { cwd: base });
      assert.equal(r.code, 1, r.stderr);
      assert.match(r.stderr, what);
    };
    await refused(['--data-dir', path.join(open, 'me', 'data'), 'start'], /^error: the data dir '.*\/open\/me\/data' is under '.*\/open', which others can write to \(mode 777, not sticky\): they could put another directory in its place$/m);
    await refused(['--data-dir', path.join(base, 'data'), 'start', '--log-dir', path.join(open, 'logs')], /^error: the log dir '.*\/open\/logs' is under '.*\/open', which others can write to/m);
    assert.deepEqual(fs.readdirSync(open), [], 'nothing was made there');
    if (process.getuid?.() === 0) {
      // A group's scratch dir (not the user's own group): its members could rename it.
      const lab = path.join(base, 'lab');
      fs.mkdirSync(lab);
      fs.chmodSync(lab, 0o2775);
      fs.chownSync(lab, 0, 65534);
      await refused(['--data-dir', path.join(lab, 'me', 'data'), 'start'], /is under '.*\/lab', which others can write to \(mode 775, not sticky\)/);
      // Writable by the user's own group only: fine.
      fs.chownSync(lab, 0, process.getgid!());
      fs.chmodSync(lab, 0o2775);
      fs.mkdirSync(path.join(lab, 'me'));
      const mine = await startServer({ dir: path.join(lab, 'me') });
      assert.equal((await mine.cli(['status'])).code, 0, 'the group is the user\'s own: nothing to refuse');
      // Sticky and open to all like /tmp, but someone else's: its owner may rename anything.
      const theirs = path.join(base, 'theirs');
      fs.mkdirSync(theirs);
      fs.chmodSync(theirs, 0o1777);
      fs.chownSync(theirs, 65534, 65534);
      await refused(['--data-dir', path.join(theirs, 'data'), 'start'], /^error: the data dir '.*\/theirs\/data' is under '.*\/theirs', which belongs to user 65534: they could put another directory in its place$/m);
      // Reached through a symlink: the real path counts too.
      fs.symlinkSync(theirs, path.join(base, 'link'));
      fs.mkdirSync(path.join(theirs, 'mine'), { mode: 0o700 });
      await refused(['--data-dir', path.join(base, 'link', 'mine'), 'start'], /is under '.*\/theirs', which belongs to user 65534/);
    }
    // A sticky directory of root's or one's own, open to all (as /tmp), is fine.
    fs.chmodSync(open, 0o1777);
    const s = await startServer({ dir: open });
    assert.equal((await s.cli(['status'])).code, 0);
  });

  test('an ssh control dir in /tmp whose name another user took first does not keep the server from starting', { skip: process.getuid?.() !== 0 && 'needs root to act as another user' }, async (t) => {
    const dir = path.join(testDir(t), 'a-data-dir-path-too-long-for-ssh-sockets');
    fs.mkdirSync(dir);
    const squat = controlDirFor(path.join(dir, '.data'), 0, process.env.TMPDIR || '/tmp');
    assert.ok(squat.startsWith('/tmp/'), squat);
    fs.rmSync(squat, { recursive: true, force: true });
    fs.mkdirSync(squat, { mode: 0o700 });
    fs.chownSync(squat, 65534, 65534);
    t.after(() => fs.rmSync(squat, { recursive: true, force: true }));
    const s = await startServer({ dir });
    const m = /warning: the ssh control dir '.*' belongs to user 65534, not to you \(user 0\); the ssh control dir is (\/tmp\/djs-\S+) instead/.exec(s.output());
    assert.ok(m, s.output());
    t.after(() => fs.rmSync(m[1], { recursive: true, force: true }));
    assert.equal(fs.statSync(m[1]).mode & 0o777, 0o700);
    writeScript(dir, 'hi.sh', 'echo hi');
    await addWorkers(s, 'w1');
    assert.equal((await s.cli(['wait', (await s.ok(['add_job', './hi.sh'])).trim()])).code, 0);
    assert.deepEqual(fs.readdirSync(squat), [], 'nothing was put in the other user\'s directory');
  });

  test('a data dir whose socket path is longer than a Unix socket allows', async (t) => {
    const base = testDir(t);
    let dir = base;
    while (Buffer.byteLength(path.join(dir, '.data', 'server.sock')) <= 120) dir = path.join(dir, 'a-rather-long-directory-name');
    fs.mkdirSync(dir, { recursive: true });
    const s = await startServer({ dir });
    writeScript(dir, 'hi.sh', 'echo "hi from $JOB_ID"');
    await addWorkers(s, 'w1');
    const id = (await s.ok(['add_job', './hi.sh'])).trim();
    assert.equal((await s.cli(['wait', id])).code, 0);
    assert.equal((await s.job(id)).state, 'done');
    assert.match(readIf(path.join(s.logDir, `${id}.log`)), new RegExp(`hi from ${id}`));
  });

  test('add_job: prints the id; ids grow and are never reused, across clean and restarts', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'ok.sh', 'exit 0');
    const add = async (srv: TestServer) => {
      const r = await srv.cli(['add_job', './ok.sh']);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /^\d+\n$/, 'stdout is the id alone');
      return Number(r.stdout);
    };
    const ids = [await add(s), await add(s)];
    await addWorkers(s, 'w1:2');
    assert.equal((await s.cli(['wait'])).code, 0);
    assert.match((await s.cli(['clean'])).stdout, /\b2\b/);
    assert.deepEqual(await s.jobs(), []);
    ids.push(await add(s)); // after clean
    assert.equal((await s.cli(['wait'])).code, 0);
    assert.equal((await s.cli(['clean'])).code, 0);
    // A restart (here after a crash) that finds every job cleaned away still knows the ids.
    await s.crash();
    const s2 = await s.restart();
    ids.push(await add(s2));
    for (let i = 1; i < ids.length; i++) assert.ok(ids[i] > ids[i - 1], `ids grow: ${ids.join(' ')}`);
  });

  test('add_job: argv as given, submit dir, JOB_ID/SLAVE_IP/SLAVE_SLOT and the add_job\'s environment, log file', async (t) => {
    const s = await serve(t, { env: { DJS_TEST_MARKER: 'from-the-server' } });
    const sub = path.join(s.dir, 'sub'), bin = path.join(s.dir, 'bin');
    fs.mkdirSync(sub);
    fs.mkdirSync(bin);
    writeScript(bin, 'rec.sh', `printf '%s\\0' "$@" > "args.$JOB_ID"
pwd -P > "cwd.$JOB_ID"
printf '%s\\n' "$JOB_ID" "$SLAVE_IP" "$SLAVE_SLOT" "$DJS_TEST_MARKER" > "env.$JOB_ID"
echo "stdout of $JOB_ID"
echo "stderr of $JOB_ID" >&2`);
    await addWorkers(s, 'w1');
    const args = ['a b', `it's "quoted"`, '$HOME', '*', '--retries', '5', '-x', '', 'tab\there', '--',
      'new\nline', 'back\\slash\\', "$'x\\'", '\x01\x1f\x7f', 'é€😀', ' spaced ', '`id`', '$(id)', '\\x41', '-', 'a=b'];
    // Relative to the client's cwd, not the server's; the job runs with the client's environment.
    const r = await s.cli(['add_job', '../bin/rec.sh', ...args], { cwd: sub, env: { DJS_TEST_MARKER: 'from-the-client' } });
    assert.equal(r.code, 0, r.stderr);
    const id = r.stdout.trim();
    assert.equal((await s.cli(['wait', id])).code, 0);
    const got = readIf(path.join(sub, `args.${id}`)).split('\0');
    got.pop();
    assert.deepEqual(got, args);
    assert.equal(readIf(path.join(sub, `cwd.${id}`)).trim(), fs.realpathSync(sub));
    assert.deepEqual(readIf(path.join(sub, `env.${id}`)).trim().split('\n'), [id, 'w1', '0', 'from-the-client']);
    const log = readIf(path.join(s.logDir, `${id}.log`));
    assert.match(log, new RegExp(`stdout of ${id}`));
    assert.match(log, new RegExp(`stderr of ${id}`));
    const job = await s.job(id);
    assert.equal(job.script, path.join(bin, 'rec.sh'));
    assert.deepEqual(job.args, args);
  });

  test('the launcher keeps out of the jobs\' way: their environment is the server\'s but for exported functions, BASH_ENV read by the jobs only', async (t) => {
    const dir = testDir(t);
    const sourced = path.join(dir, 'sourced');
    fs.writeFileSync(path.join(dir, 'env.sh'), `echo "$$" >> '${sourced}'\n`);
    // Variables bash itself acts on, an exported function standing in for `cd` (what
    // `cd() { builtin cd /; }; export -f cd` exports), and names a shell script might use.
    // A HOME whose .bashrc would tell if the launcher read it (bash reads it when its
    // stdin is a socket and SHLVL says it is the first shell).
    fs.writeFileSync(path.join(dir, '.bashrc'), `echo "$$" >> '${dir}/bashrc-read'\n`);
    const env: Record<string, string> = {
      HOME: dir, BASH_ENV: path.join(dir, 'env.sh'), TMOUT: '1', SHLVL: '0', OLDPWD: '/old',
      'BASH_FUNC_cd%%': '() {  builtin cd /\n}', k: 'kay', D: 'dee', L: 'ell', line: 'lyne', c: 'see', f: 'eff', d: 'dea',
    };
    const s = await serve(t, { dir, env });
    const script = path.join(dir, 'b.sh');
    fs.writeFileSync(script, '#!/bin/bash\ntr "\\0" "\\n" < /proc/$$/environ > "env.$JOB_ID"\n', { mode: 0o755 });
    await addWorkers(s, 'w1');
    // Added bare on the socket, so the jobs run with the server's environment (add_job
    // would give them its own, without SHLVL and OLDPWD).
    await addJob(s, script);
    assert.equal((await s.cli(['wait'])).code, 0);
    // TMOUT=1 would end an idle launcher after a second: the next job still starts through it.
    const idle = Date.now() + 1500;
    await until(() => Date.now() > idle || /launcher ended/.test(s.output()), 'an idle second and a half');
    await addJob(s, script);
    assert.equal((await s.cli(['wait'])).code, 0);
    assert.doesNotMatch(s.output(), /launcher ended/);
    const seen = Object.fromEntries(readIf(path.join(dir, 'env.2')).trim().split('\n').map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
    for (const [name, value] of Object.entries(env)) assert.equal(seen[name], name.startsWith('BASH_FUNC_') ? undefined : value, name);
    assert.equal(readIf(sourced).trim().split('\n').filter(Boolean).length, 2, 'BASH_ENV read once by each job\'s bash, never by the launcher');
    assert.equal(fs.existsSync(path.join(dir, 'bashrc-read')), false, 'no ~/.bashrc read');
  });

  test('exit codes 253 and 254 are the script\'s own', async (t) => {
    const s = await serve(t);
    const script = writeScript(s.dir, 'code.sh', 'exit $1');
    await s.ok(['add_jobs', '-'], { input: Array.from({ length: 20 }, (_, i) => `${script} ${253 + (i % 2)}\n`).join('') });
    await addWorkers(s, 'w1:4');
    assert.equal((await s.cli(['wait', '--all'])).code, 1);
    const jobs = await s.jobs();
    assert.deepEqual(jobs.map((j: any) => [j.state, j.exitCode, j.attempts]), Array.from({ length: 20 }, (_, i) => ['failed', 253 + (i % 2), 1]));
  });

  test('a job whose directory is gone fails with the reason; one whose log cannot be opened (a directory, a FIFO) waits uncharged until it can, and runs once', async (t) => {
    const s = await serve(t, { env: { POSIXLY_CORRECT: 'y' } });
    const script = writeScript(s.dir, 'mark.sh', `echo "$POSIXLY_CORRECT" >> "${s.dir}/ran.$JOB_ID"`);
    const gone = path.join(s.dir, 'gone');
    fs.mkdirSync(gone);
    const ids = [(await s.ok(['add_job', script], { cwd: gone })).trim(), (await s.ok(['add_job', script])).trim(), (await s.ok(['add_job', script])).trim(), (await s.ok(['add_job', script])).trim()];
    fs.rmdirSync(gone);
    fs.mkdirSync(path.join(s.logDir, `${ids[1]}.log`), { recursive: true }); // a log that cannot be opened for writing
    execFileSync('mkfifo', [path.join(s.logDir, `${ids[3]}.log`)]);         // one that would block an open
    await addWorkers(s, 'w1');
    await until(async () => (await s.job(ids[2])).state === 'done', 'the job with a usable log to run');
    const [a, b, , d] = await Promise.all(ids.map((id) => s.job(id)));
    assert.equal(a.state, 'failed');
    assert.match(a.reason, /cannot enter .*gone/);
    // Such a job is retried while starts resume, so it may be caught between its start and its unstart.
    for (const j of [b, d]) assert.ok(j.state === 'waiting' && j.attempts === 0 || j.state === 'running' && j.attempts === 1, `jobs whose log cannot be opened wait, uncharged: ${j.state} ${j.attempts}`);
    assert.match(s.output(), /did not start: its log .* could not be opened/);
    const said = s.output().match(/did not start/g)!.length;
    const startsOf = (id: string) => fs.readFileSync(path.join(s.dataDir, 'journal'), 'utf8').split('\n').filter((l) => l.includes(`"e":"start"`) && l.includes(`"id":${id},`)).length;
    // Starts pause 0.5 s, 1 s, 2 s, ... while failures follow each other: a few more take seconds.
    await until(() => startsOf(ids[1]) >= 3, 'job 2 to fail to start a few more times', 40_000);
    assert.ok(s.output().match(/did not start/g)!.length <= said + 1, `said once per episode, not per failed start:\n${s.output()}`);
    fs.rmdirSync(path.join(s.logDir, `${ids[1]}.log`));
    fs.rmSync(path.join(s.logDir, `${ids[3]}.log`));
    assert.equal((await s.cli(['wait', ids[1], ids[2], ids[3]])).code, 0);
    assert.deepEqual(ids.map((id) => readIf(path.join(s.dir, `ran.${id}`))), ['', 'y\n', 'y\n', 'y\n'], 'each ran once; POSIXLY_CORRECT reaches the job');
    assert.deepEqual((await Promise.all(ids.slice(1).map((id) => s.job(id)))).map((j: any) => [j.state, j.attempts]), [['done', 1], ['done', 1], ['done', 1]], 'the failed starts were not charged');
    assert.match(s.output(), /jobs start again/);
  });


  test('add_job: the job runs in a process group of its own, in a session without a terminal', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'block.sh', GATED);
    await addWorkers(s, 'w1:2');
    const ids = [(await s.ok(['add_job', './block.sh'])).trim(), (await s.ok(['add_job', './block.sh'])).trim()];
    const pids = await Promise.all(ids.map((id) => pidOf(s, id)));
    const [a, b] = pids.map(procIds);
    const server = procIds(s.proc.pid!);
    assert.notEqual(a.session, server.session, 'not in the server\'s session');
    assert.notEqual(a.pgrp, server.pgrp, 'not in the server\'s process group');
    assert.notEqual(a.pgrp, procIds(process.pid).pgrp);
    assert.notEqual(a.pgrp, b.pgrp, 'each job has a group of its own');
    assert.equal(a.pgrp, pids[0], 'the job leads its group');
    assert.equal(a.tty, 0, 'no controlling terminal');
    for (const id of ids) release(s, id);
    assert.equal((await s.cli(['wait', ...ids])).code, 0);
  });

  test('add_job: a missing, non-executable or directory script is refused and nothing is queued', async (t) => {
    const s = await serve(t);
    fs.writeFileSync(path.join(s.dir, 'plain.sh'), '#!/bin/sh\nexit 0\n', { mode: 0o644 });
    fs.mkdirSync(path.join(s.dir, 'adir'));
    for (const [script, why] of [['./nope.sh', /nope\.sh/], ['./plain.sh', /executable.*plain\.sh|plain\.sh.*executable/], ['./adir', /adir/]] as const) {
      const r = await s.cli(['add_job', script, 'x']);
      assert.equal(r.code, 1, `${script}: ${r.stderr}`);
      assert.match(r.stderr, /^error: /m);
      assert.match(r.stderr, why);
      assert.equal(r.stdout, '');
    }
    // Relative to the client's cwd: only-here.sh exists in sub/ only.
    fs.mkdirSync(path.join(s.dir, 'sub'));
    writeScript(path.join(s.dir, 'sub'), 'only-here.sh', 'exit 0');
    assert.equal((await s.cli(['add_job', './only-here.sh'])).code, 1);
    assert.deepEqual(await s.jobs(), [], 'nothing was queued');
    assert.equal((await s.cli(['add_job', './only-here.sh'], { cwd: path.join(s.dir, 'sub') })).code, 0);
    assert.equal((await s.jobs())[0].script, path.join(s.dir, 'sub', 'only-here.sh'));
  });

  test('bytes that are not UTF-8 reach the job exactly: in arguments, in an add_jobs file, in the directory; list shows them as $\'\\xHH\'', async (t) => {
    const s = await serve(t);
    // Writes its directory and arguments, one per line, as bytes.
    writeScript(s.dir, 'rec.sh', `printf "%s\\n" "$PWD" "$@" > "${s.dir}/out.$JOB_ID"`);
    const env = {};
    const odd = Buffer.from([0x61, 0xff, 0x62]), surrogate = Buffer.from([0xed, 0xa0, 0x80]), cut = Buffer.from([0x78, 0xc3]);
    // The shell passes the bytes; node could not (it would send them as UTF-8).
    const q = (b: Buffer) => `"$(printf '${[...b].map((x) => `\\${x.toString(8).padStart(3, '0')}`).join('')}')"`;
    const one = await sh(`"${CLI}" --data-dir "${s.dataDir}" add_job ./rec.sh ${q(odd)} é ${q(surrogate)}`, { cwd: s.dir, env });
    assert.equal(one.code, 0, one.stderr);
    fs.writeFileSync(path.join(s.dir, 'jobs.txt'), Buffer.concat([Buffer.from('./rec.sh '), Buffer.from([0xfe, 0xff]), Buffer.from(' "'), cut, Buffer.from('"\n')]));
    const two = await s.cli(['add_jobs', 'jobs.txt'], { env });
    assert.equal(two.code, 0, two.stderr);
    const oddDir = Buffer.concat([Buffer.from(path.join(s.dir, 'dir')), Buffer.from([0xff])]);
    fs.mkdirSync(oddDir);
    const three = await sh(`cd ${q(oddDir)} && "${CLI}" --data-dir "${s.dataDir}" add_job ../rec.sh x`, { cwd: s.dir, env });
    assert.equal(three.code, 0, three.stderr);
    await addWorkers(s, 'w1');
    assert.equal((await s.cli(['wait'])).code, 0);
    const lines = (id: number) => {
      const out = fs.readFileSync(path.join(s.dir, `out.${id}`));
      const parts: Buffer[] = [];
      for (let i = 0, j; (j = out.indexOf(10, i)) >= 0; i = j + 1) parts.push(out.subarray(i, j));
      return parts;
    };
    assert.deepEqual(lines(1), [Buffer.from(s.dir), odd, Buffer.from('é'), surrogate]);
    assert.deepEqual(lines(2), [Buffer.from(s.dir), Buffer.from([0xfe, 0xff]), cut]);
    assert.deepEqual(lines(3), [oddDir, Buffer.from('x')]);
    const list = await s.ok(['list']);
    assert.match(list, /rec\.sh \$'a\\xffb' 'é' \$'\\xed\\xa0\\x80'$/m, 'shown so that pasting it gives the same bytes');
  });

  test('add_jobs FILE and -: quoting, comments, blank lines; a bad line queues nothing', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'rec.sh', 'exit 0');
    fs.mkdirSync(path.join(s.dir, 'sub'));
    writeScript(path.join(s.dir, 'sub'), 'other.sh', 'exit 0');
    fs.writeFileSync(path.join(s.dir, 'jobs.txt'), [
      '# a campaign',
      './rec.sh one \'two words\' "three \\"q\\"" # a trailing comment',
      '',
      '   ',
      '  ./rec.sh \'$HOME\' \'*\' x#y   --retries',
      '\t# indented comment',
      'sub/other.sh "" last',
    ].join('\n') + '\n');
    const r = await s.cli(['add_jobs', 'jobs.txt']);
    assert.equal(r.code, 0, r.stderr);
    const ids = r.stdout.trim().split('\n');
    assert.equal(ids.length, 3, r.stdout);
    for (const id of ids) assert.match(id, /^\d+$/);
    const jobs = await s.jobs();
    const byId = (id: string) => jobs.find((j) => j.id === Number(id));
    assert.deepEqual(byId(ids[0]).args, ['one', 'two words', 'three "q"']);
    assert.deepEqual(byId(ids[1]).args, ['$HOME', '*', 'x#y', '--retries']);
    assert.equal(byId(ids[1]).script, path.join(s.dir, 'rec.sh'));
    assert.equal(byId(ids[2]).script, path.join(s.dir, 'sub', 'other.sh'));
    assert.deepEqual(byId(ids[2]).args, ['', 'last']);

    const fromStdin = await s.cli(['add_jobs', '-'], { input: "./rec.sh 'a b'\n# nothing\n./rec.sh c\n" });
    assert.equal(fromStdin.code, 0, fromStdin.stderr);
    const more = fromStdin.stdout.trim().split('\n').map(Number);
    assert.equal(more.length, 2);
    assert.ok(more[0] > Number(ids[2]) && more[1] > more[0]);
    assert.deepEqual((await s.job(more[0])).args, ['a b']);

    const before = (await s.jobs()).length;
    const unterminated = await s.cli(['add_jobs', '-'], { input: "./rec.sh ok\n./rec.sh 'oops\n./rec.sh fine\n" });
    assert.equal(unterminated.code, 1);
    assert.match(unterminated.stderr, /^error: .*line 2/m);
    assert.equal(unterminated.stdout, '');
    fs.writeFileSync(path.join(s.dir, 'bad.txt'), './rec.sh ok\n\n./missing.sh x\n');
    const missing = await s.cli(['add_jobs', 'bad.txt']);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /^error: .*line 3/m);
    assert.match(missing.stderr, /missing\.sh/);
    assert.equal((await s.jobs()).length, before, 'a bad file queues nothing');
  });

  test('dispatch: 2 workers x 2 slots run 10 jobs, at most 4 at once, every slot used, first come first served', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'ts.sh', `b=$(date +%s%N); sleep 0.3; e=$(date +%s%N)
echo "$SLAVE_IP $SLAVE_SLOT $b $e" > "ts.$JOB_ID"`);
    await addWorkers(s, 'w1:2', 'w2:2');
    const ids = (await s.ok(['add_jobs', '-'], { input: './ts.sh\n'.repeat(10) })).trim().split('\n').map(Number);
    assert.equal(ids.length, 10);
    assert.equal((await s.cli(['wait', ...ids.map(String)])).code, 0);

    const runs = ids.map((id) => {
      const [host, slot, b, e] = readIf(path.join(s.dir, `ts.${id}`)).trim().split(' ');
      return { id, host, slot, b: BigInt(b), e: BigInt(e) };
    });
    const edges = runs.flatMap((r) => [{ t: r.b, d: 1 }, { t: r.e, d: -1 }]).sort((x, y) => (x.t === y.t ? x.d - y.d : x.t < y.t ? -1 : 1));
    let now = 0, most = 0;
    for (const e of edges) { now += e.d; most = Math.max(most, now); }
    assert.ok(most <= 4, `at most 4 at once, saw ${most}`);
    assert.equal(most, 4, 'all 4 slots ran at once');
    const slots = runs.map((r) => `${r.host}:${r.slot}`);
    assert.deepEqual([...new Set(slots)].sort(), ['w1:0', 'w1:1', 'w2:0', 'w2:1']);
    for (const slot of new Set(slots)) assert.ok(slots.filter((x) => x === slot).length >= 2, `slot ${slot} was refilled after its job ended`);
    const jobs = (await s.jobs()).filter((j) => ids.includes(j.id)).sort((a, b) => a.id - b.id);
    for (const j of jobs) assert.equal(j.state, 'done');
    for (let i = 1; i < jobs.length; i++) {
      assert.ok(Date.parse(jobs[i].startedAt) >= Date.parse(jobs[i - 1].startedAt), `job ${jobs[i].id} started before job ${jobs[i - 1].id}`);
    }

    // A slot is free now: a new job starts with no other trigger (watch its file, not the server).
    const id = (await s.ok(['add_job', './ts.sh'])).trim();
    await until(() => readIf(path.join(s.dir, `ts.${id}`)), 'a job added to an idle worker to run', 5000);
  });

  test('remove_job: by script and args (waiting ones only), by --id; an unknown id removes nothing', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 's.sh', GATED);
    writeScript(s.dir, 'o.sh', 'exit 0');
    await addWorkers(s, 'w1');
    const running = (await s.ok(['add_job', './s.sh', 'a'])).trim();
    await pidOf(s, running);
    const ids = (await s.ok(['add_jobs', '-'], { input: './s.sh a\n./s.sh a\n./s.sh b\n./s.sh a b\n./o.sh a\n./s.sh\n' })).trim().split('\n').map(Number);
    const [, , b, ab, oa, bare] = ids;
    const run = Number(running);
    /** The jobs the server still has, as id:state. */
    const left = async () => (await s.jobs()).sort((x, y) => x.id - y.id).map((j) => `${j.id}:${j.state}`);

    const r = await s.cli(['remove_job', './s.sh', 'a']);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(await left(), [`${run}:running`, `${b}:waiting`, `${ab}:waiting`, `${oa}:waiting`, `${bare}:waiting`],
      'both waiting "s.sh a" jobs are gone; the running one, other args and other scripts stay');

    const none = await s.cli(['remove_job', './s.sh', 'zzz']);
    assert.equal(none.code, 1);
    assert.match(none.stderr, /^error: /m);
    const unknown = await s.cli(['remove_job', '--id', String(b), '9999']);
    assert.equal(unknown.code, 1);
    assert.match(unknown.stderr, /^error: .*9999/m);
    const runningById = await s.cli(['remove_job', '--id', running]);
    assert.equal(runningById.code, 1, 'a running job is not removed');
    assert.deepEqual(await left(), [`${run}:running`, `${b}:waiting`, `${ab}:waiting`, `${oa}:waiting`, `${bare}:waiting`],
      'a failed remove_job removes nothing');

    assert.equal((await s.cli(['remove_job', '--id', String(b), String(bare)])).code, 0);
    assert.deepEqual(await left(), [`${run}:running`, `${ab}:waiting`, `${oa}:waiting`]);
    release(s, running);
    await untilState(s, running, 'done');
  });

  test('status, status --json, list, list --state failed --json, log', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'block.sh', GATED);
    await addWorkers(s, 'w1:2');
    const first = (await s.ok(['add_job', './block.sh'])).trim();
    await pidOf(s, first);

    const human1 = await s.ok(['status']);
    assert.match(human1, /\b1 running\b/);
    assert.match(human1, /^.*\bw1\b.*\[\*\.\].*$/m);

    const [second, third, fourth] = (await s.ok(['add_jobs', '-'], { input: './block.sh\n./block.sh 7\n./block.sh\n' })).trim().split('\n');
    await pidOf(s, second);
    const human2 = await s.ok(['status']);
    assert.match(human2, /\b2 running\b/);
    assert.match(human2, /\b2 waiting\b/);
    assert.match(human2, /\[\*\*\]/);
    assert.match(human2, new RegExp(`^\\s*${third}\\b.*block\\.sh 7`, 'm'), 'the queue head lists the waiting jobs');
    assert.match(human2, new RegExp(`^\\s*${fourth}\\b.*block\\.sh`, 'm'));

    // The harness asks over the socket; the client prints the same.
    const js = await s.status();
    assert.deepEqual(JSON.parse(await s.ok(['status', '--json'])), js);
    assert.equal(js.counts.running, 2);
    assert.equal(js.counts.waiting, 2);
    assert.equal(js.counts.total, 4);
    assert.equal(js.workers.length, 1);
    const w = js.workers[0];
    assert.equal(w.host, 'w1');
    assert.equal(w.slots, 2);
    assert.equal(w.state, 'up');
    assert.deepEqual(w.running.map((r: { id: number }) => r.id).sort(), [Number(first), Number(second)].sort());
    assert.deepEqual(js.queue.map((q: { id: number }) => q.id), [Number(third), Number(fourth)]);

    for (const id of [first, second, third, fourth]) release(s, id);
    assert.equal((await s.cli(['wait', '--all'])).code, 1, 'one job failed');

    const list = await s.ok(['list']);
    for (const id of [first, second, third, fourth]) assert.match(list, new RegExp(`^\\s*${id}\\s+(done|failed)\\b`, 'm'));
    assert.match(list, new RegExp(`^\\s*${third}\\s+failed\\b.*\\b7\\b`, 'm'));

    const failed = await s.cli(['list', '--state', 'failed', '--json']);
    assert.equal(failed.code, 0, failed.stderr);
    const rows = JSON.parse(failed.stdout);
    assert.equal(rows.length, 1);
    assert.equal(rows[0].id, Number(third));
    assert.equal(rows[0].state, 'failed');
    assert.equal(rows[0].exitCode, 7);
    assert.equal(rows[0].worker, 'w1');
    assert.equal((await s.cli(['list', '--state', 'bogus'])).code, 2);
    assert.deepEqual(JSON.parse(await s.ok(['list', '--json'])), await s.jobs());

    const log = await s.cli(['log', third]);
    assert.equal(log.code, 0, log.stderr);
    assert.match(log.stdout, new RegExp(`job ${third} running on w1\\njob ${third} released`));
    assert.equal((await s.cli(['log', '9999'])).code, 1);
  });

  test('stop: running jobs keep running; the next start adopts them and records their exit codes', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'block.sh', GATED);
    await addWorkers(s, 'w1:2');
    const [a, b] = (await s.ok(['add_jobs', '-'], { input: './block.sh 3\n./block.sh 0\n' })).trim().split('\n');
    const pidA = await pidOf(s, a), pidB = await pidOf(s, b);

    const stop = await s.cli(['stop']);
    assert.equal(stop.code, 0, stop.stderr);
    assert.equal(await s.exited, 0);
    assert.ok(alive(pidA) && alive(pidB), 'jobs outlive the server');
    release(s, b); // b ends while no server runs
    await until(() => !alive(pidB), 'job b to end');

    const s2 = await s.restart();
    const st = await s2.status();
    assert.deepEqual(st.workers[0].running.map((r: { id: number }) => r.id), [Number(a)]);
    assert.equal((await untilState(s2, b, 'done', 5000)).exitCode, 0, 'the exit code of a job that ended while no server ran');
    assert.ok(alive(pidA));
    release(s2, a);
    assert.equal((await untilState(s2, a, 'failed', 5000)).exitCode, 3, 'the exit code of an adopted job');
  });

  test('the server survives bad input on its socket', async (t) => {
    const s = await serve(t);
    const errorReply = async (data: string, what: RegExp | null = null) => {
      const r = await rawRequest(s.dataDir, data);
      assert.equal(r.lines.length, 1, `one reply to ${JSON.stringify(data)}`);
      const m = JSON.parse(r.lines[0]);
      assert.equal(m.ok, false, `an error reply to ${JSON.stringify(data)}`);
      assert.equal(typeof m.error, 'string');
      if (what) assert.match(m.error, what);
    };
    await errorReply('garbage\n');
    await errorReply('\x00\xff{{{\n');
    await errorReply('null\n');
    await errorReply('[1,2]\n');
    await errorReply('{"op":42}\n');

    const half = await rawRequest(s.dataDir, '{"op":"sta', { end: true });
    assert.deepEqual(half.lines, [], 'no answer to half a line');
    assert.ok(half.closed, 'the server closes a connection its client ended');

    await errorReply('{"op":"frobnicate"}\n', /frobnicate/);
    await errorReply(JSON.stringify({ op: 'add_jobs', cwd: s.dir, jobs: [['rel.sh']] }) + '\n', /absolute|rel\.sh/);
    await errorReply(JSON.stringify({ op: 'add_jobs', cwd: 'relative/dir', jobs: [['/bin/true']] }) + '\n');
    await errorReply(JSON.stringify({ op: 'add_jobs', cwd: s.dir, jobs: 'x' }) + '\n');
    await errorReply(JSON.stringify({ op: 'add_jobs', cwd: s.dir, jobs: [[]] }) + '\n');
    await errorReply(JSON.stringify({ op: 'add_jobs', cwd: s.dir, jobs: [[1, 2]] }) + '\n');
    await errorReply(JSON.stringify({ op: 'add_jobs', cwd: s.dir, jobs: [['/bin/true']], retries: -1 }) + '\n');
    await errorReply(JSON.stringify({ op: 'kill' }) + '\n');
    await errorReply(JSON.stringify({ op: 'kill', ids: ['x'] }) + '\n');
    await errorReply(JSON.stringify({ op: 'retry', ids: [] }) + '\n');
    await errorReply(JSON.stringify({ op: 'remove_jobs', ids: [0] }) + '\n');
    await errorReply(JSON.stringify({ op: 'remove_workers', hosts: [1] }) + '\n');
    await errorReply(JSON.stringify({ op: 'list', state: 'nope' }) + '\n');
    await errorReply(JSON.stringify({ op: 'log', id: 'abc' }) + '\n');
    await errorReply(JSON.stringify({ op: 'wait', ids: [0] }) + '\n');
    await errorReply(JSON.stringify({ op: 'add_workers', skipCheck: true, workers: [{ host: '-oProxyCommand=touch /tmp/pwned' }] }) + '\n');
    await errorReply(JSON.stringify({ op: 'add_workers', skipCheck: true, workers: 'w1' }) + '\n');
    await errorReply(JSON.stringify({ op: 'add_workers', skipCheck: true, workers: [null] }) + '\n');
    await errorReply(JSON.stringify({ op: 'add_workers', skipCheck: true, workers: [{ host: 'w1', slots: 0 }] }) + '\n');
    const st = await s.cli(['status', '--json']);
    assert.equal(st.code, 0, `status works afterwards: ${st.stderr}\n${s.output()}`);
    const view = JSON.parse(st.stdout);
    assert.equal(view.counts.total, 0, 'nothing was queued');
    assert.deepEqual(view.workers, [], 'no bad worker was added');
    assert.equal(s.proc.exitCode, null, 'the server is still running');
  });

  test('the server survives a slot count no client would send', async (t) => {
    const s = await serve(t);
    // The client caps slots; a raw request must get an answer (an error or an ack), not kill the server.
    const big = await rawRequest(s.dataDir, JSON.stringify({ op: 'add_workers', skipCheck: true, workers: [{ host: 'big', slots: 1_000_000_000 }] }) + '\n', { ms: 10_000 });
    assert.equal(big.lines.length, 1, `an answer to a huge slot count; server output:\n${s.output().slice(-300)}`);
    const st = await within(s.cli(['status', '--json']), 10_000, 'status after a huge slot count');
    assert.equal(st.code, 0, st.stderr);
    assert.equal(s.proc.exitCode, null, 'the server is still running');
  });
});
