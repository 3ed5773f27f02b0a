// Tier 3: example_job.sh run directly (not through the scheduler) against real ssh hosts.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { findProcesses, sshSkip, startHosts, type TestHosts } from './hosts.ts';
import { launch, ROOT, removeDir, run, tempDir, testDir, until } from './server.ts';

const SCRIPT = path.join(ROOT, 'example_job.sh');
const SSH_TIMEOUT_S = 2;

describe('example_job.sh on real ssh hosts', { skip: sshSkip() }, () => {
  let h: TestHosts;
  let cwd: string;

  before(async () => {
    h = await startHosts(2);
    cwd = tempDir('djsj-');
  });
  after(async () => {
    await h?.close();
    if (cwd) await removeDir(cwd);
  });

  /** The environment the scheduler would give job ID on host ADDR, plus EXTRA. */
  const jobEnv = (id: number, addr: string, extra: Record<string, string> = {}) => ({
    ...process.env,
    JOB_ID: String(id),
    SLAVE_IP: addr,
    DJS_SSH_CONFIG: h.sshConfig,
    DJS_SSH_TIMEOUT: String(SSH_TIMEOUT_S),
    DJS_RUN_NAME: `run-${id}`,
    ...extra,
  });
  const remoteDir = (hostIndex: number, id: number) => path.join(h.hosts[hostIndex].scratch, '.djs-work', `run-${id}`);

  test('counts the words of a file whose name has spaces and quotes; cleans up on the worker', async () => {
    const name = `my "odd" file's name: v1.txt`;
    fs.mkdirSync(path.join(cwd, 'in put'), { recursive: true });
    fs.writeFileSync(path.join(cwd, 'in put', name), 'the quick brown fox\njumps over\n\n the lazy dog\n');
    const r = await run(SCRIPT, [`in put/${name}`], { cwd, env: jobEnv(11, h.hosts[0].addr) });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(fs.readFileSync(path.join(cwd, 'finished_work', `11_${name}.out`), 'utf8'), '9\n');
    assert.equal(fs.existsSync(remoteDir(0, 11)), false, 'job dir left on the worker');
  });

  test('honours DJS_REMOTE_DIR and user@host', async () => {
    fs.writeFileSync(path.join(cwd, 'two.txt'), 'two words\n');
    const env = jobEnv(12, `${os.userInfo().username}@${h.hosts[1].addr}`, { DJS_REMOTE_DIR: 'elsewhere/j 12' });
    const r = await run(SCRIPT, ['two.txt'], { cwd, env });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(fs.readFileSync(path.join(cwd, 'finished_work', '12_two.txt.out'), 'utf8'), '2\n');
    assert.ok(fs.existsSync(path.join(h.hosts[1].scratch, 'elsewhere')), 'DJS_REMOTE_DIR not used');
    assert.equal(fs.existsSync(path.join(h.hosts[1].scratch, 'elsewhere', 'j 12')), false);
  });

  test('honours DJS_SSH_OPTIONS, as the scheduler\'s login checks do', async () => {
    fs.writeFileSync(path.join(cwd, 'opts.txt'), 'three little words\n');
    // Port 1 refuses: the options reach ssh, so the worker is unreachable (255).
    const refused = await run(SCRIPT, ['opts.txt'], { cwd, env: jobEnv(13, h.hosts[0].addr, { DJS_SSH_OPTIONS: '-o Port=1' }) });
    assert.equal(refused.code, 255, refused.stderr);
    assert.match(refused.stderr, /port 1: Connection refused/);
    const ok = await run(SCRIPT, ['opts.txt'], { cwd, env: jobEnv(14, h.hosts[0].addr, { DJS_SSH_OPTIONS: '-o LogLevel=ERROR  -o Compression=yes' }) });
    assert.equal(ok.code, 0, ok.stderr);
    assert.equal(fs.readFileSync(path.join(cwd, 'finished_work', '14_opts.txt.out'), 'utf8'), '3\n');
  });

  test('SIGTERM stops the work on the worker and removes its directory', async (t) => {
    const seconds = `30.${process.pid}${Math.floor(Math.random() * 1000)}`; // unique: finds the remote sleep
    fs.writeFileSync(path.join(cwd, 'long.txt'), 'a b c\n');
    const child = spawn(SCRIPT, ['long.txt'], {
      cwd,
      env: jobEnv(13, h.hosts[0].addr, { DJS_EXAMPLE_SLEEP: seconds }),
      detached: true, // its own process group, like a job under the scheduler
      stdio: 'ignore',
    });
    const exit = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    t.after(() => {
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        // ended already
      }
    });
    await until(() => findProcesses(['sleep', seconds]).length === 1, 'the remote sleep', 10_000);
    assert.ok(fs.existsSync(path.join(remoteDir(0, 13), '.pgid')));

    process.kill(-child.pid!, 'SIGTERM');
    const code = await exit;
    assert.equal(code, 143);
    await until(() => findProcesses(['sleep', seconds]).length === 0, 'the remote sleep to end', 5_000);
    assert.equal(fs.existsSync(remoteDir(0, 13)), false, 'job dir left on the worker');
    assert.equal(fs.existsSync(path.join(cwd, 'finished_work', '13_long.txt.out')), false);
  });

  test('a worker whose sshd is gone: exit 255 at once', async () => {
    fs.writeFileSync(path.join(cwd, 'w.txt'), 'w\n');
    await h.hosts[1].kill();
    try {
      const r = await run(SCRIPT, ['w.txt'], { cwd, env: jobEnv(14, h.hosts[1].addr) });
      assert.equal(r.code, 255, r.stderr);
      assert.match(r.stderr, /refused/);
      assert.ok(r.ms < SSH_TIMEOUT_S * 1000, `took ${r.ms} ms`);
    } finally {
      await h.hosts[1].restart();
    }
  });

  test('a worker that hangs: exit 255 after the connect timeout, not later', async () => {
    fs.writeFileSync(path.join(cwd, 'w.txt'), 'w\n');
    h.hosts[1].stop();
    try {
      const r = await run(SCRIPT, ['w.txt'], { cwd, env: jobEnv(15, h.hosts[1].addr), timeoutMs: 30_000 });
      assert.equal(r.code, 255, r.stderr);
      assert.ok(r.ms < (SSH_TIMEOUT_S + 3) * 1000, `took ${r.ms} ms`);
    } finally {
      h.hosts[1].cont();
    }
  });

  test('a worker that hangs mid-job: exit 255 within about twice the ssh timeout', async (t) => {
    const seconds = `40.${process.pid}${Math.floor(Math.random() * 1000)}`;
    fs.writeFileSync(path.join(cwd, 'w.txt'), 'w\n');
    const host = h.hosts[1];
    const job = run(SCRIPT, ['w.txt'], { cwd, env: jobEnv(21, host.addr, { DJS_EXAMPLE_SLEEP: seconds }), timeoutMs: 30_000 });
    t.after(() => {
      host.cont();
      for (const pid of findProcesses(['sleep', seconds])) process.kill(pid, 'SIGKILL'); // the work outlives the hang
    });
    await until(() => findProcesses(['sleep', seconds]).length === 1, 'the remote sleep', 10_000);
    const hung = Date.now();
    host.stop();
    const r = await job;
    assert.equal(r.code, 255, r.stderr);
    const ms = Date.now() - hung;
    assert.ok(ms < (2 * SSH_TIMEOUT_S + 4) * 1000, `took ${ms} ms`);
  });

  test('the work failing on the worker: its own exit code, never 255; cleaned up', async () => {
    fs.writeFileSync(path.join(cwd, 'f.txt'), 'f\n');
    const seven = await run(SCRIPT, ['f.txt'], { cwd, env: jobEnv(16, h.hosts[0].addr, { DJS_EXAMPLE_FAIL: '7' }) });
    assert.equal(seven.code, 7, seven.stderr);
    assert.equal(fs.existsSync(remoteDir(0, 16)), false, 'job dir left on the worker');
    assert.equal(fs.existsSync(path.join(cwd, 'finished_work', '16_f.txt.out')), false);

    const own255 = await run(SCRIPT, ['f.txt'], { cwd, env: jobEnv(17, h.hosts[0].addr, { DJS_EXAMPLE_FAIL: '255' }) });
    assert.equal(own255.code, 254, own255.stderr);
  });

  test('a missing input file fails at once with 1; bad environment is a usage error (2)', async () => {
    const missing = await run(SCRIPT, ['nope.txt'], { cwd, env: jobEnv(19, h.hosts[0].addr) });
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /cannot read input file 'nope.txt'/);
    const noHost = await run(SCRIPT, ['f.txt'], { cwd, env: { ...jobEnv(20, ''), SLAVE_IP: '' } });
    assert.equal(noHost.code, 2);
  });
});

describe('example_job.sh on a local worker (no ssh)', () => {
  test('a worker named localN runs the same steps here; SIGTERM stops the work and cleans up', async (t) => {
    const cwd = testDir(t, 'djsl-');
    const home = path.join(cwd, 'home');
    fs.writeFileSync(path.join(cwd, 'a file.txt'), 'one two three\nfour\n');
    const env = { ...process.env, JOB_ID: '21', SLAVE_IP: 'local1', DJS_LOCAL_HOME: home };
    const r = await run(SCRIPT, ['a file.txt'], { cwd, env });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(fs.readFileSync(path.join(cwd, 'finished_work', '21_a file.txt.out'), 'utf8'), '4\n');
    assert.deepEqual(fs.readdirSync(path.join(home, '.djs-work')), [], 'job dir left behind');
    const seconds = `31.${process.pid}`;
    const child = spawn(SCRIPT, ['a file.txt'], { cwd, env: { ...env, JOB_ID: '22', DJS_EXAMPLE_SLEEP: seconds }, detached: true, stdio: 'ignore' });
    const exit = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    await until(() => findProcesses(['sleep', seconds]).length > 0, 'the local work to run', 10_000);
    process.kill(-child.pid!, 'SIGTERM');
    assert.equal(await exit, 143);
    await until(() => findProcesses(['sleep', seconds]).length === 0, 'the local work to stop', 10_000);
    assert.deepEqual(fs.readdirSync(path.join(home, '.djs-work')), []);
  });
});

describe('example_job.sh names its directory on the worker by DJS_RUN_NAME', () => {
  test('two runs of the same JOB_ID at once (two campaigns) each keep their own directory; by hand, without DJS_RUN_NAME, too', async (t) => {
    const cwd = testDir(t, 'djsn-');
    const home = path.join(cwd, 'home');
    fs.writeFileSync(path.join(cwd, 'in.txt'), 'one two three\n');
    const seconds = `32.${process.pid}`;
    const env = { ...process.env, JOB_ID: '1', SLAVE_IP: 'local1', DJS_LOCAL_HOME: home, DJS_EXAMPLE_SLEEP: seconds };
    const named = launch(SCRIPT, ['in.txt'], { cwd, env: { ...env, DJS_RUN_NAME: 'ab12cd34-1-1' } });
    const byHand = launch(SCRIPT, ['in.txt'], { cwd, env });
    // Both are in their work at once, each in a directory of its own.
    await until(() => findProcesses(['sleep', seconds]).length === 2, 'both runs to work', 10_000);
    const dirs = fs.readdirSync(path.join(home, '.djs-work')).sort();
    assert.equal(dirs.length, 2, dirs.join(' '));
    assert.ok(dirs.includes('ab12cd34-1-1'), dirs.join(' '));
    assert.match(dirs.find((d) => d !== 'ab12cd34-1-1')!, /^job-1-.+-\d+$/);
    for (const pid of findProcesses(['sleep', seconds])) process.kill(pid, 'SIGTERM');
    // The sleeps were cut short: the work goes on to count, and both end done.
    for (const r of [await named.done, await byHand.done]) assert.equal(r.code, 0, r.stderr);
    assert.equal(fs.readFileSync(path.join(cwd, 'finished_work', '1_in.txt.out'), 'utf8'), '3\n');
    assert.deepEqual(fs.readdirSync(path.join(home, '.djs-work')), [], 'job dirs left behind');

    const bad = await run(SCRIPT, ['in.txt'], { cwd, env: { ...env, DJS_RUN_NAME: '../x' } });
    assert.equal(bad.code, 2, bad.stderr);
    assert.match(bad.stderr, /DJS_RUN_NAME must be/);
  });
});
