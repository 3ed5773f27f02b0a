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
import { decideLoadStatus, newState, parseClipyStatus, type DecideContext } from '../cli.ts';
import { alive, serve, writeScript } from './server.ts';

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
