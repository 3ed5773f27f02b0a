// Coming from cli.py (the Python scheduler djs replaces): its commands and spellings, its
// state brought over with load_status, its data dir refused by start, and a job script in
// its style on real sshd hosts (IPv6 loopback too).
//   tier 1: parseClipyStatus and decideLoadStatus, fed literal states
//   tier 2: the real cli.ts, driven with the original's words
//   tier 3: real sshd hosts (test/hosts.ts)

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test, type TestContext } from 'node:test';
import {
  applyEvent, decideLoadStatus, newState, parseClipyStatus, refuseClipyDataDir, UserError, type DecideContext, type Event,
} from '../cli.ts';
import { findProcesses, ipv6LoopbackMissing, skipUnlessSsh, startHosts, type TestHosts } from './hosts.ts';
import { alive, readIf, runCli, serve, testDir, until, untilState, writeScript, type TestServer } from './server.ts';

const T0 = Date.UTC(2026, 0, 1);
const C: DecideContext = { now: T0, killGraceMs: 1000, argSpace: 1 << 20 };

/** A status JSON as cli.py's `status` prints it. */
const clipyStatus = (over: Record<string, unknown> = {}) => ({
  job_waitlist: [
    [['./job.sh', 'a'], ['FOO=1']],
    [['./job.sh', 'b'], ['FOO=1']],
    [['./job.sh', 'c'], []],
    ['job.sh', 'd'], // the README's older form: ARGV alone
  ],
  slaves: [
    { ip: 'h1', envs: { PORT: '1000' }, status: 'idle', running_job: null },
    { ip: 'h2', envs: {}, status: 'busy', running_job: { id: '1640569405834', script: ['./job.sh', 'x'], envs: {}, pid: 4242, log_file: 'logs/job_1640569405834.txt' } },
    { ip: 'h3', status: 'busy', running_job: { id: '1640601291867', script: ['./job.sh', 'y'], pid: 4343, log_file: 'logs/job_1640601291867.txt' }, remove_after_finish: true },
  ],
  ...over,
});

describe('load_status, decided (tier 1)', () => {
  test('reads workers with their envs and the waitlist in order; older forms too; relative scripts against cwd', () => {
    const s = parseClipyStatus(clipyStatus(), '/w');
    assert.deepEqual(s.jobs, [
      { argv: ['/w/job.sh', 'a'], env: ['FOO=1'] }, { argv: ['/w/job.sh', 'b'], env: ['FOO=1'] },
      { argv: ['/w/job.sh', 'c'], env: [] }, { argv: ['/w/job.sh', 'd'], env: [] },
    ]);
    assert.deepEqual(s.workers.map((w) => [w.host, w.env, w.removing, w.job?.id ?? null]), [
      ['h1', ['PORT=1000'], false, null], ['h2', [], false, '1640569405834'], ['h3', [], true, '1640601291867'],
    ]);
    assert.equal(parseClipyStatus({ job_waitlist: [], slaves: [{ ip: '[::1]', envs: {}, status: 'idle', running_job: null }] }, '/w').workers[0].host, '::1');
  });

  test('one decision holds every worker and every add, so one group commit writes all of it', () => {
    const st = newState();
    applyEvent(st, { e: 'worker', t: T0, host: 'h9', slots: 1, ssh: true });
    const d = decideLoadStatus(st, { op: 'load_status', cwd: '/w', status: clipyStatus(), alive: ['1640569405834'] }, C);
    const kinds = d.events.map((e) => e.e);
    assert.deepEqual(kinds, ['worker', 'add', 'add'], 'h1 (h2 is held, h3 was being removed); two adds: the envs differ');
    const w = d.events[0] as Extract<Event, { e: 'worker' }>;
    assert.deepEqual([w.host, w.slots, w.env, w.ssh], ['h1', 1, ['PORT=1000'], true]);
    const [a1, a2] = d.events.slice(1) as Extract<Event, { e: 'add' }>[];
    assert.deepEqual([a1.id, a1.jobs, a1.env], [1, [['/w/job.sh', 'a'], ['/w/job.sh', 'b']], ['FOO=1']]);
    assert.deepEqual([a2.id, a2.jobs, a2.env], [3, [['/w/job.sh', 'c'], ['/w/job.sh', 'd']], undefined]);
    assert.deepEqual((d.answer.held as { host: string }[]).map((h) => h.host), ['h2']);
    assert.deepEqual((d.answer.ended as { host: string }[]).map((h) => h.host), ['h3'], 'its pid is gone: reported, not run again');
    assert.deepEqual(d.answer.removing, ['h3']);
    for (const ev of d.events) applyEvent(st, ev);
    assert.deepEqual([...st.jobs.values()].map((j) => [j.id, j.args[0], j.env]), [[1, 'a', ['FOO=1']], [2, 'b', ['FOO=1']], [3, 'c', null], [4, 'd', null]]);
    // A job whose pid has ended frees its worker: it is added.
    const d2 = decideLoadStatus(newState(), { op: 'load_status', cwd: '/w', status: clipyStatus(), alive: [] }, C);
    assert.deepEqual(d2.answer.added, ['h1', 'h2']);
    assert.deepEqual(decideLoadStatus(st, { op: 'load_status', cwd: '/w', status: clipyStatus(), alive: [] }, C).answer.present, ['h1', 'h2'].filter((h) => st.workers.has(h)));
  });

  test('anything wrong anywhere refuses the whole load, naming the entry', () => {
    const bad: [Record<string, unknown>, RegExp][] = [
      [{ job_waitlist: [[['./job.sh'], ['JOB_ID=3']]] }, /job_waitlist\[0\]: JOB_ID is set by the server/],
      [{ job_waitlist: [[['./job.sh'], ['NOEQUALS']]] }, /job_waitlist\[0\]: invalid environment setting 'NOEQUALS'/],
      [{ job_waitlist: [[]] }, /job_waitlist\[0\]: a job is a non-empty list/],
      [{ slaves: [{ ip: 'user1@199:1000', envs: {} }] }, /slaves\[0\]: ip: invalid host 'user1@199:1000'/],
      [{ slaves: [{ ip: 'a' }, { ip: 'a' }] }, /slaves\[1\]: 'a' is listed twice/],
      [{ slaves: [{ ip: 'a', running_job: { id: '1', script: ['./j'], pid: 'x' } }] }, /slaves\[0\]: running_job: invalid pid/],
    ];
    for (const [over, re] of bad) {
      assert.throws(() => decideLoadStatus(newState(), { op: 'load_status', cwd: '/w', status: clipyStatus(over), alive: [] }, C), (e: unknown) => e instanceof UserError && re.test(e.message), String(re));
    }
    assert.throws(() => parseClipyStatus({ jobs: [] }, '/w'), /not the status of cli.py/);
    assert.throws(() => parseClipyStatus({ counts: { total: 0 }, workers: [] }, '/w'), /this is the status of djs, not of cli.py/);
    assert.throws(() => decideLoadStatus(newState(), { op: 'load_status', cwd: '/w', status: { job_waitlist: [], slaves: [] } }, C), /nothing to load/);
  });
});

// ---------------------------------------------------------------- tier 2

/** Writes cli.py's data dir files (as a stopped or running cli.py leaves them). */
function clipyDataDir(dir: string, pid: number): void {
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'service_pid'), String(pid));
  fs.writeFileSync(path.join(dir, 'server_context.pkl'), '\x80\x04');
  fs.writeFileSync(path.join(dir, 'commands_fifo'), ''); // a fifo in life; any file counts
}

describe('start refuses a data dir of cli.py', () => {
  test('naming its files, its running server, and how to move to djs; the dir is left as it was', async (t) => {
    const dir = testDir(t);
    const data = path.join(dir, '.data');
    const py = spawn('sleep', ['30'], { stdio: 'ignore' }); // stands in for a running cli.py server
    t.after(() => { py.kill('SIGKILL'); });
    clipyDataDir(data, py.pid!);
    const before = fs.readdirSync(data).sort();
    for (const args of [['start'], ['start', '--detach'], ['--server_data_dir', '.data', 'start', '--log_dir', 'L']]) {
      const r = await runCli(args, { cwd: dir });
      assert.equal(r.code, 1, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, /error: data dir '.*\.data' belongs to cli.py \(it holds commands_fifo, service_pid, server_context.pkl\), and its server \(pid \d+\) is running/);
      assert.match(r.stderr, /hint: .*\.\/cli\.py status > st\.json; \.\/cli\.py stop; .*\.\/cli\.ts load_status st\.json/);
    }
    assert.deepEqual(fs.readdirSync(data).sort(), before, 'nothing of djs was written there');
    assert.equal(fs.existsSync(path.join(dir, 'L')), false);
    // Stopped (its pid gone), the files still say whose dir it is.
    const reaped = new Promise((r) => py.once('exit', r));
    py.kill('SIGKILL');
    await reaped;
    assert.throws(() => refuseClipyDataDir(data), (e: unknown) => e instanceof UserError && e.code === 1 && !/is running/.test(e.message));
    fs.rmSync(path.join(data, 'service_pid'));
    assert.throws(() => refuseClipyDataDir(data), /holds commands_fifo, server_context.pkl\)$/);
    assert.doesNotThrow(() => refuseClipyDataDir(path.join(dir, 'nothing-here')));
  });
});

describe("the original's commands and spellings", () => {
  test('start --log_dir, --server_data_dir anywhere, add_slave --skip_ssh_auth_check -e/--env/--env,-e, add_job and remove_job with envs, remove_slave --wait/--kill, status, stop', async (t) => {
    const dir = testDir(t);
    const data = path.join(dir, 'srv');
    const cli = (args: string[]) => runCli(args, { cwd: dir });
    const ok = async (args: string[]) => {
      const r = await cli(args);
      assert.equal(r.code, 0, `${args.join(' ')}: ${r.stderr}`);
      return r;
    };
    writeScript(dir, 'job.sh', 'echo "$1 FOO=$FOO BAR=$BAR PORT=$PORT USER_=$USER_"; [ -e hold ] && while [ ! -e go ]; do sleep 0.02; done; exit 0');
    // The original: ./cli.py start [--server_data_dir=DIR] [--log_dir=DIR]; the global option before the command.
    const server = spawn(path.join(import.meta.dirname, '..', 'cli.ts'), ['--server_data_dir=srv', 'start', '--log_dir=L'], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    server.stdout.on('data', (d) => { out += d; });
    t.after(async () => { if (server.exitCode === null) { server.kill('SIGKILL'); await new Promise((r) => server.once('exit', r)); } });
    await until(() => out.includes('server ready'), 'the server to start');
    assert.match(out, new RegExp(`data ${data}, logs ${path.join(dir, 'L')}`));
    // --server_data_dir after the command, in both forms; -e, --env and the README's --env,-e=.
    await ok(['add_slave', '--server_data_dir', 'srv', '--skip_ssh_auth_check', '-e', 'USER_=user1', '--env', 'PORT=1000', 'w199']);
    await ok(['add_slave', '--server_data_dir=srv', '--skip_ssh_auth_check', '--env,-e=PORT=1001', 'w200']);
    const st = JSON.parse((await ok(['status', '--server_data_dir', 'srv', '--json'])).stdout);
    assert.deepEqual(st.workers.map((w: any) => [w.host, w.env]), [['w199', ['USER_=user1', 'PORT=1000']], ['w200', ['PORT=1001']]]);
    // HOST:N with a port-like N, as its README wrote worker names: a warning naming --slots.
    const big = await ok(['--server_data_dir=srv', 'add_slave', '--skip_ssh_auth_check', 'user1@w201:1000']);
    assert.match(big.stderr, /warning: 'user1@w201:1000' is worker 'user1@w201' with 1000 slots; .*--slots N/);
    await ok(['--server_data_dir=srv', 'remove_slave', 'user1@w201']);
    // argparse took options after the positional words too, and several hosts at once.
    assert.match((await ok(['add_slave', 'w300', 'w301', '--skip_ssh_auth_check', '--server_data_dir=srv'])).stdout, /added worker w300 .*\nadded worker w301 /);
    assert.match((await ok(['remove_slave', 'w300', 'w301', '--server_data_dir', 'srv'])).stdout, /removed worker w300\nremoved worker w301/);
    // add_job with envs in every spelling; the job sees them.
    fs.writeFileSync(path.join(dir, 'hold'), '');
    const id1 = (await ok(['--server_data_dir=srv', 'add_job', '--env,-e=FOO=1', '-e', 'BAR=2', 'job.sh', 'one'])).stdout.trim();
    const id2 = (await ok(['--server_data_dir=srv', 'add_job', '--env', 'FOO=3', './job.sh', 'two'])).stdout.trim();
    // cli.py's --env took several values at once; djs says to repeat -e.
    const many = await cli(['--server_data_dir=srv', 'add_job', '--env', 'FOO=1', 'BAR=2', './job.sh']);
    assert.equal(many.code, 2);
    assert.match(many.stderr, /error: no such script 'BAR=2'\nhint: give each environment setting its own -e: -e A=1 -e B=2 SCRIPT/);
    // cli.py took its options from anywhere; after SCRIPT they are the job's, and djs says so.
    const late = await ok(['--server_data_dir=srv', 'add_job', './job.sh', 'late', '--server_data_dir=srv']);
    assert.match(late.stderr, /warning: '--server_data_dir=srv' comes after SCRIPT, so it is an argument of the job; options of djs go before SCRIPT/);
    assert.equal((await ok(['--server_data_dir=srv', 'remove_job', '--id', late.stdout.trim()])).code, 0);
    const many2 = await cli(['--server_data_dir=srv', 'add_slave', '--skip_ssh_auth_check', '-e', 'A=1', 'B=2', 'w9']);
    assert.equal(many2.code, 2);
    assert.match(many2.stderr, /hint: give each environment setting its own -e/);
    // Both run (hold), then three more wait: remove_job by script, args and envs (cli.py's remove_job -e).
    await until(async () => JSON.parse((await ok(['--server_data_dir=srv', 'status', '--json'])).stdout).counts.running === 2, 'two jobs to run');
    const w1 = (await ok(['--server_data_dir=srv', 'add_job', '-e', 'FOO=9', 'job.sh', 'three'])).stdout.trim();
    const w2 = (await ok(['--server_data_dir=srv', 'add_job', 'job.sh', 'three'])).stdout.trim();
    const removed = await ok(['--server_data_dir=srv', 'remove_job', '-e', 'FOO=9', 'job.sh', 'three']);
    assert.equal(removed.stdout.trim(), `removed 1 job: ${w1}`, 'only the job with those envs');
    assert.equal((await ok(['--server_data_dir=srv', 'remove_job', './job.sh', 'three'])).stdout.trim(), `removed 1 job: ${w2}`);
    // remove_slave --wait (drains) and --kill (stops and requeues) on busy workers.
    const jobs = JSON.parse((await ok(['--server_data_dir=srv', 'list', '--json'])).stdout);
    const on = (id: string) => jobs.find((j: any) => j.id === Number(id)).worker;
    const killed = await ok(['--server_data_dir=srv', 'remove_slave', '--kill', on(id2)]);
    assert.match(killed.stdout, /stopping 1 job\(s\) on worker/);
    const waiting = runCli(['--server_data_dir=srv', 'remove_slave', '--wait', on(id1)], { cwd: dir });
    await until(async () => JSON.parse((await ok(['--server_data_dir=srv', 'status', '--json'])).stdout).workers.some((w: any) => w.state === 'draining'), 'a draining worker');
    fs.writeFileSync(path.join(dir, 'go'), '');
    assert.equal((await waiting).code, 0);
    const log1 = readIf(path.join(dir, 'L', `${id1}.log`));
    assert.match(log1, /one FOO=1 BAR=2 PORT=100[01]/, 'job and worker envs');
    // status (the human view; --json for a machine) and stop.
    assert.match((await ok(['--server_data_dir=srv', 'status'])).stdout, /jobs: /);
    await ok(['--server_data_dir=srv', 'stop']);
    await until(() => server.exitCode !== null, 'the server to exit');
  });

  test('load_status FILE: workers with their envs and the waitlist with its envs, at once; a job still running under cli.py is left alone and its worker out', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'job.sh', 'echo "$1 FOO=$FOO PORT=$PORT on $SLAVE_IP"');
    const py = spawn('sleep', ['30'], { stdio: 'ignore', env: { ...process.env, JOB_ID: '1640569405834' } }); // a job of cli.py, still running
    t.after(() => { py.kill('SIGKILL'); });
    const status = clipyStatus();
    (status.slaves as any[])[1].running_job.pid = py.pid;
    (status.slaves as any[])[2].running_job.pid = 999_999_999; // ended
    (status.slaves as any[])[2].remove_after_finish = false;
    fs.writeFileSync(path.join(s.dir, 'st.json'), JSON.stringify(status, null, 2));
    const r = await s.cli(['load_status', '--skip_ssh_auth_check', 'st.json']);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^added 2 workers: h1 h3$/m);
    assert.match(r.stdout, /^queued 4 waiting jobs: ids 1-4, in the waitlist's order$/m);
    assert.match(r.stdout, /not added: worker h2, which cli.py job 1640569405834 \(pid \d+\) still runs on; djs leaves that job alone .* Once it ends: cli.ts add_slave h2/);
    assert.match(r.stdout, /not run again: cli.py job 1640601291867 on h3 .* To run it again: cli.ts add_job \.\/job\.sh y/);
    assert.ok(alive(py.pid!), 'the running job of cli.py was not touched');
    await s.ok(['wait']);
    const jobs = await s.jobs();
    assert.deepEqual(jobs.map((j: any) => [j.id, j.args, j.env, j.state]), [
      [1, ['a'], ['FOO=1'], 'done'], [2, ['b'], ['FOO=1'], 'done'], [3, ['c'], [], 'done'], [4, ['d'], [], 'done'],
    ]);
    assert.ok(jobs.every((j: any) => j.script === path.join(s.dir, 'job.sh')));
    assert.match(readIf(path.join(s.logDir, '1.log')), /^a FOO=1 PORT=(1000 on h1|) ?/);
    const workers = (await s.status()).workers;
    assert.deepEqual(workers.map((w: any) => [w.host, w.slots, w.env]), [['h1', 1, ['PORT=1000']], ['h3', 1, []]]);
    // Loaded again: the workers are kept as they are, and it says so.
    const again = await s.ok(['load_status', '--skip_ssh_auth_check', 'st.json']);
    assert.match(again, /kept 2 workers already here, with their settings: h1 h3/);
  });

  test('load_status is all or nothing: a bad script or a failed login adds no worker and no job', async (t) => {
    const s = await serve(t, { env: { DJS_SSH_TIMEOUT: '2' } });
    writeScript(s.dir, 'job.sh', 'exit 0');
    fs.writeFileSync(path.join(s.dir, 'notexec.sh'), '#!/bin/sh\n');
    const write = (st: unknown) => fs.writeFileSync(path.join(s.dir, 'st.json'), JSON.stringify(st));
    write({ job_waitlist: [[['./job.sh', '1'], []], [['./notexec.sh'], []]], slaves: [{ ip: 'h1', envs: {}, status: 'idle', running_job: null }] });
    const r1 = await s.cli(['load_status', '--skip_ssh_auth_check', 'st.json']);
    assert.equal(r1.code, 1);
    assert.match(r1.stderr, /error: script is not executable: '.*notexec\.sh' \(in the waitlist\)/);
    // The ssh login check, as add_slave does it: one host that cannot be reached, nothing added.
    write({ job_waitlist: [[['./job.sh', '1'], []]], slaves: [{ ip: 'h1.invalid', envs: {}, status: 'idle', running_job: null }] });
    const r2 = await s.cli(['load_status', 'st.json']);
    assert.equal(r2.code, 1);
    assert.match(r2.stderr, /ssh login check failed for 'h1\.invalid'/);
    write({ job_waitlist: [[['./job.sh', '1'], ['JOB_ID=1']]], slaves: [{ ip: 'h1', envs: {}, status: 'idle', running_job: null }] });
    const r3 = await s.cli(['load_status', '--skip_ssh_auth_check', 'st.json']);
    assert.equal(r3.code, 1, 'the file is wrong, not the command line');
    assert.match(r3.stderr, /error: job_waitlist\[0\]: JOB_ID is set by the server/);
    fs.writeFileSync(path.join(s.dir, 'st.json'), '{"job_waitlist": [');
    const r4 = await s.cli(['load_status', 'st.json']);
    assert.equal(r4.code, 1);
    assert.match(r4.stderr, /error: 'st\.json' is not JSON: .*\nhint: make it with: \.\/cli\.py status > st\.json/);
    const st = await s.status();
    assert.deepEqual([st.workers.length, st.counts.total], [0, 0], 'nothing was added');
  });
});

// ---------------------------------------------------------------- tier 3

/** A directory with an `ssh` that reads the hosts' ssh config: on the PATH of the server
 *  and its jobs, the job scripts stay as their users wrote them (rsync calls it too). */
function sshOnPath(t: TestContext, hosts: TestHosts): string {
  const bin = testDir(t, 'djsb-');
  writeScript(bin, 'ssh', `exec /usr/bin/ssh -F ${hosts.sshConfig} "$@"`);
  return `${bin}:${process.env.PATH}`;
}

/** A job script in cli.py's style (its example_job.sh): rsync -aP in, ssh -t -t for the
 *  work, rsync back. Its EXIT trap is the README's fix: `kill 0` on TERM and INT only.
 *  PAUSE (a test hook) makes the work sleep first. */
const ORIGINAL_STYLE = (trap: string) => `#! /bin/bash
${trap}
set -e
echo "Starting job input_file=$1 as $JOB_ID"
INPUT_FILE=$1
REMOTE_DIR=jobs
echo "Copying $INPUT_FILE to $SLAVE_IP:$REMOTE_DIR"
ssh -t -t $SLAVE_IP mkdir -p $REMOTE_DIR
rsync -aP $INPUT_FILE $SLAVE_IP:$REMOTE_DIR
echo "File copied"
echo "Counting words"
ssh -t -t $SLAVE_IP "sleep \${PAUSE:-0}; wc $REMOTE_DIR/$INPUT_FILE > $REMOTE_DIR/$JOB_ID.out"
echo "Job done"
mkdir -p finished_work
rsync -aP $SLAVE_IP:$REMOTE_DIR/$JOB_ID.out finished_work
mv finished_work/$JOB_ID.out finished_work/\${JOB_ID}_$(basename $1).out
echo "Bye"
`;
const FIXED_TRAP = "trap 'trap - TERM INT; kill 0' TERM INT";
const ORIGINAL_TRAP = 'trap "trap - SIGTERM && kill -- -$$" SIGINT SIGTERM EXIT';

describe('on real sshd hosts', () => {
  test("a job script in cli.py's style, with the README's trap fix: jobs end done, a dead host's jobs are requeued, kill stops the remote work", async (t) => {
    if (skipUnlessSsh(t)) return;
    const hosts = await startHosts(2);
    t.after(() => hosts.close());
    const s: TestServer = await serve(t, { env: { PATH: sshOnPath(t, hosts), DJS_SSH_CONFIG: hosts.sshConfig, DJS_SSH_TIMEOUT: '2', DJS_PROBE_BACKOFF_MAX: '2' } });
    fs.writeFileSync(path.join(s.dir, 'job.sh'), ORIGINAL_STYLE(FIXED_TRAP), { mode: 0o755 });
    fs.writeFileSync(path.join(s.dir, 'unfixed.sh'), ORIGINAL_STYLE(ORIGINAL_TRAP), { mode: 0o755 });
    const files = Array.from({ length: 6 }, (_, i) => `in${i}.txt`);
    files.forEach((f, i) => fs.writeFileSync(path.join(s.dir, f), 'w '.repeat(i + 1) + '\n'));
    const [a, b] = hosts.hosts;
    await s.ok(['add_slave', a.addr, b.addr]);
    // The unchanged trap fails a job whose work was done (its EXIT trap signals the script itself).
    const unfixed = (await s.ok(['add_job', './unfixed.sh', files[0]])).trim();
    const job = await untilState(s, unfixed, 'failed', 30_000);
    assert.equal(job.exitCode, 143);
    // A dead host (its sshd and every connection to it gone, the server's shared one
    // too): its jobs exit 255 (ssh), are requeued on the other, and it goes down.
    await a.crash();
    const ids = (await s.ok(['add_jobs', '-'], { input: files.map((f) => `./job.sh ${f}`).join('\n') })).trim().split('\n');
    assert.equal((await s.cli(['wait', ...ids], { timeoutMs: 90_000 })).code, 0);
    const jobs = await s.jobs();
    ids.forEach((id, i) => {
      const j = jobs.find((x: any) => x.id === Number(id));
      assert.equal(j.state, 'done', `job ${id}: ${j.reason}`);
      assert.equal(j.worker, b.addr);
      assert.match(readIf(path.join(s.dir, 'finished_work', `${id}_${files[i]}.out`)), new RegExp(`^\\s*1\\s+${i + 1}\\s`), 'wc of its file');
    });
    assert.ok(jobs.some((j: any) => j.attempts > 1), 'some job was requeued from the dead host');
    assert.equal((await s.status()).workers.find((w: any) => w.host === a.addr).state, 'down');
    // kill: the work on the worker stops too (ssh -t -t: the remote side gets a hangup).
    const pause = `30.${process.pid}`;
    const long = (await s.ok(['add_job', '-e', `PAUSE=${pause}`, './job.sh', files[0]])).trim();
    await until(() => findProcesses(['sleep', pause]).length > 0, 'the remote work to start', 30_000);
    await s.ok(['kill', long]);
    await untilState(s, long, 'killed', 30_000);
    await until(() => findProcesses(['sleep', pause]).length === 0, 'the remote work to stop', 15_000);
  });

  test('IPv6: ::1 with --slots and [::1]:N; ssh and SLAVE_IP get the bare address', async (t) => {
    if (skipUnlessSsh(t)) return;
    const missing = await ipv6LoopbackMissing();
    if (missing) { t.skip(missing); return; }
    const hosts = await startHosts(1, { addrs: ['::1'] });
    t.after(() => hosts.close());
    const s = await serve(t, { env: { PATH: sshOnPath(t, hosts), DJS_SSH_CONFIG: hosts.sshConfig, DJS_SSH_TIMEOUT: '2' } });
    writeScript(s.dir, 'where.sh', 'ssh "$SLAVE_IP" "echo \\$HOME" > "at.$JOB_ID" && echo "$SLAVE_IP" >> "at.$JOB_ID"');
    assert.match(await s.ok(['add_slave', '--slots', '2', '::1']), /added worker ::1 with 2 slots/, 'the login check over ssh to ::1 passed');
    assert.match(await s.ok(['add_slave', '[::1]:3']), /added worker ::1 with 3 slots/, 'the same worker, its size changed');
    const ids = (await s.ok(['add_job', './where.sh', ':::', '1', '2', '3'])).trim().split('\n');
    assert.equal((await s.cli(['wait', ...ids])).code, 0);
    for (const id of ids) assert.equal(readIf(path.join(s.dir, `at.${id}`)), `${hosts.hosts[0].scratch}\n::1\n`);
    assert.deepEqual((await s.status()).workers.map((w: any) => [w.host, w.slots]), [['::1', 3]]);
    assert.match(await s.ok(['remove_slave', '[::1]']), /removed worker ::1/);
  });
});
