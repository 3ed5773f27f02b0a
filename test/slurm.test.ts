// Slurm partitions as workers. Tier 1: worker names, sinfo's verdict, and the plan that asks
// an up Slurm worker every so often. Tier 3: a real Slurm of one node (test/slurm.ts) beside
// real ssh hosts (test/hosts.ts), driven through the real CLI and example_job.sh.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test, type TestContext } from 'node:test';
import { applyEvent, newRuntime, newState, parseWorkerArg, plan, sinfoVerdict, slurmTarget, validateHost, type State } from '../cli.ts';
import { slurmGpuVerdict } from '../cli.ts';
import { sshSkip, startHosts, type TestHosts } from './hosts.ts';
import { findProcesses } from './hosts.ts';
import { idsOf, ROOT, serve, testDir, until, untilState, type TestServer } from './server.ts';
import { alive, processesUnder } from './server.ts';
import { slurmSkip, startSlurm, type TestSlurm } from './slurm.ts';

const SCRIPT = path.join(ROOT, 'example_job.sh');

// ---------------------------------------------------------------- tier 1

describe('Slurm workers in the core', () => {
  test('slurm:PARTITION[@LOGIN_HOST] names a partition; the slot count follows', () => {
    assert.deepEqual(slurmTarget('slurm:debug'), { partition: 'debug', login: null });
    assert.deepEqual(slurmTarget('slurm:gpu.a100@alice@login.hpc.org'), { partition: 'gpu.a100', login: 'alice@login.hpc.org' });
    assert.equal(slurmTarget('node7'), null);
    assert.deepEqual(parseWorkerArg('slurm:debug:20', 1), { host: 'slurm:debug', slots: 20, auto: false });
    assert.deepEqual(parseWorkerArg('slurm:debug@login:4', 1), { host: 'slurm:debug@login', slots: 4, auto: false });
    assert.deepEqual(parseWorkerArg('slurm:debug', 3), { host: 'slurm:debug', slots: 3, auto: false });
    for (const bad of ['slurm:', 'slurm:-p', 'slurm:a b', 'slurm:x@-oProxyCommand=y', 'slurm:x@', 'slurm:x;y', 'slurm:x@a:b']) {
      assert.throws(() => validateHost(bad), /invalid Slurm worker/, bad);
    }
  });

  test('sinfo\'s lines say whether the partition takes jobs, and if not, why', () => {
    assert.equal(sinfoVerdict('up/idle/none\n', 'debug'), null);
    assert.equal(sinfoVerdict('up/mixed/none\nup/drained/disk full\n', 'debug'), null, 'one usable node is enough');
    assert.equal(sinfoVerdict('up/idle~/none\n', 'debug'), null, 'a powered-down cloud node starts when needed');
    assert.equal(sinfoVerdict('', 'gpu'), "Slurm has no partition 'gpu'");
    assert.equal(sinfoVerdict('down/idle/none\n', 'debug'), "Slurm partition 'debug' is down");
    assert.equal(sinfoVerdict('inact/idle/none\n', 'debug'), "Slurm partition 'debug' is inact");
    assert.equal(sinfoVerdict('up/drained/disk broken / replaced soon\n', 'debug'), "no node of Slurm partition 'debug' takes jobs: drained (disk broken / replaced soon)");
    assert.equal(sinfoVerdict('up/idle*/none\n', 'debug'), "no node of Slurm partition 'debug' takes jobs: idle*", 'not responding');
  });

  test('an up Slurm worker is asked when its check falls due; an ssh worker only after a failure', () => {
    const st: State = newState();
    applyEvent(st, { e: 'worker', t: 0, host: 'slurm:debug', slots: 2, ssh: true });
    applyEvent(st, { e: 'worker', t: 0, host: 'node1', slots: 2, ssh: true });
    applyEvent(st, { e: 'worker', t: 0, host: 'slurm:unchecked', slots: 2, ssh: false });
    assert.deepEqual(st.workers.get('slurm:debug')!.slurm, { partition: 'debug', login: null });
    assert.equal(st.workers.get('node1')!.slurm, null);
    const rt = newRuntime();
    assert.deepEqual(plan(st, rt, 1000, 5000).effects, [{ kind: 'probe', host: 'slurm:debug' }]);
    rt.slurmCheckAt.set('slurm:debug', 31_000);
    const later = plan(st, rt, 1000, 5000);
    assert.deepEqual([later.effects, later.next], [[], 31_000]);
    rt.probing.add('slurm:debug');
    assert.deepEqual(plan(st, rt, 40_000, 5000).effects, [], 'not while a check is under way');
    // A failed check makes it down, with Slurm's reason, and probes it with backoff.
    applyEvent(st, { e: 'probe', t: 2000, host: 'slurm:debug', ok: false, err: "Slurm partition 'debug' is down" });
    const w = st.workers.get('slurm:debug')!;
    assert.deepEqual([w.state, w.error, w.probeAt], ['down', "Slurm partition 'debug' is down", 7000]);
    applyEvent(st, { e: 'probe', t: 7000, host: 'slurm:debug', ok: true });
    assert.deepEqual([w.state, w.error, w.probeAt], ['up', null, 0]);
  });
});

// ---------------------------------------------------------------- tier 3

const skip = slurmSkip() || sshSkip();

describe('Slurm partitions as workers, on a real Slurm', { skip, concurrency: 1 }, () => {
  let slurm: TestSlurm;
  let hosts: TestHosts;

  before(async () => {
    [slurm, hosts] = await Promise.all([startSlurm({ cpus: 8 }), startHosts(2)]);
    // 127.0.0.3 is also a cluster's login host: its sessions find this Slurm (its bin comes
    // first on their PATH).
    const bin = path.join(hosts.hosts[1].scratch, 'bin');
    fs.mkdirSync(bin);
    for (const cmd of ['sinfo', 'srun', 'scancel', 'squeue']) {
      fs.writeFileSync(path.join(bin, cmd), `#!/bin/sh\nSLURM_CONF=${slurm.env.SLURM_CONF} exec /usr/bin/${cmd} "$@"\n`, { mode: 0o755 });
    }
  });
  after(async () => {
    await Promise.all([slurm?.close(), hosts?.close()]);
  });

  /** A server whose jobs reach this Slurm (SLURM_CONF; not with `remote`: then only the
   *  login host's sessions know it) and the ssh hosts, whose Slurm workers are checked every
   *  second and work in the test's home/ (DJS_SLURM_HOME). */
  async function server(t: TestContext, remote = false): Promise<TestServer> {
    const dir = testDir(t);
    fs.mkdirSync(path.join(dir, 'home'));
    return serve(t, {
      dir,
      env: {
        ...(remote ? {} : slurm.env), DJS_SSH_CONFIG: hosts.sshConfig, DJS_SSH_TIMEOUT: '5', DJS_SLURM_CHECK: '1', DJS_PROBE_BACKOFF_MAX: '1',
        DJS_SLURM_HOME: path.join(dir, 'home'),
      },
    });
  }
  /** Input files in/f1.txt … in/fN.txt, file i holding i words. */
  function inputs(s: TestServer, n: number): string[] {
    fs.mkdirSync(path.join(s.dir, 'in'), { recursive: true });
    return Array.from({ length: n }, (_, i) => {
      fs.writeFileSync(path.join(s.dir, 'in', `f${i + 1}.txt`), 'w '.repeat(i + 1) + '\n');
      return `f${i + 1}.txt`;
    });
  }
  const worker = async (s: TestServer, host: string) => (await s.status()).workers.find((w: any) => w.host === host);
  const [ssh1, ssh2] = [0, 1].map((i) => `127.0.0.${i + 2}`);

  test('a campaign of 40 jobs over two ssh hosts and a Slurm partition: each done once, results from all three', { timeout: 240_000 }, async (t) => {
    const s = await server(t);
    assert.match(await s.ok(['add_slave', `${ssh1}:3`, `${ssh2}:3`, 'slurm:debug:4']), /added worker slurm:debug with 4 slots/);
    assert.deepEqual((await worker(s, 'slurm:debug')).slurm, { partition: 'debug', login: null });
    const files = inputs(s, 40);
    const ids = idsOf(await s.ok(['add_job', '-e', 'DJS_EXAMPLE_SLEEP=0.5', SCRIPT, 'in/{}', ':::', ...files]));
    assert.equal(ids.length, 40);
    assert.equal((await s.cli(['wait'], { timeoutMs: 200_000 })).code, 0);
    const jobs = await s.jobs();
    assert.deepEqual(jobs.map((j: any) => j.state), Array(40).fill('done'));
    assert.deepEqual(new Set(jobs.map((j: any) => j.worker)), new Set([ssh1, ssh2, 'slurm:debug']), 'every worker ran some');
    ids.forEach((id, i) => {
      assert.equal(fs.readFileSync(path.join(s.dir, 'finished_work', `${id}_f${i + 1}.txt.out`), 'utf8'), `${i + 1}\n`);
    });
    assert.equal(fs.readdirSync(path.join(s.dir, 'finished_work')).length, 40, 'one result per job');
    assert.deepEqual(await slurm.jobNames(), [], 'no Slurm job left');
  });

  test('kill of a job running under Slurm leaves no Slurm job', { timeout: 120_000 }, async (t) => {
    const s = await server(t);
    await s.ok(['add_slave', 'slurm:debug:2']);
    const [file] = inputs(s, 1);
    const id = Number((await s.ok(['add_job', '--timeout', '600', '-e', 'DJS_EXAMPLE_SLEEP=120', SCRIPT, `in/${file}`])).trim());
    await until(async () => (await slurm.jobNames()).includes(`djs-${id}`), `Slurm to run djs-${id}`, 60_000);
    const r = await slurm.client('squeue', ['--noheader', '--format=%j %l %C']);
    assert.match(r.stdout, new RegExp(`djs-${id} 10:00 1\\b`), 'its --timeout is the time limit, its slot a CPU');
    await s.ok(['kill', String(id)]);
    await untilState(s, id, 'killed', 30_000);
    assert.deepEqual(await slurm.jobNames(), [], 'the killed job\'s Slurm job is gone');
  });

  test('a partition set DOWN (or a node drained) makes the worker down with Slurm\'s reason; jobs go to the ssh host; it comes back', { timeout: 180_000 }, async (t) => {
    const s = await server(t);
    await s.ok(['add_slave', `${ssh1}:2`, 'slurm:debug:2']);
    t.after(async () => {
      await slurm.client('scontrol', ['update', 'PartitionName=debug', 'State=UP']);
      await slurm.client('scontrol', ['update', `NodeName=${slurm.node}`, 'State=RESUME']);
    });
    const scontrol = async (...args: string[]) => {
      const r = await slurm.client('scontrol', ['update', ...args]);
      assert.equal(r.code, 0, r.stderr);
    };
    await scontrol('PartitionName=debug', 'State=DOWN');
    await until(async () => (await worker(s, 'slurm:debug')).state === 'down', 'the Slurm worker to be down', 30_000);
    assert.equal((await worker(s, 'slurm:debug')).error, "Slurm partition 'debug' is down");
    assert.match(await s.ok(['status']), /slurm:debug .*down/);
    const files = inputs(s, 4);
    const ids = idsOf(await s.ok(['add_job', SCRIPT, 'in/{}', ':::', ...files]));
    assert.equal((await s.cli(['wait'])).code, 0);
    for (const id of ids) assert.equal((await s.job(id)).worker, ssh1);
    await scontrol('PartitionName=debug', 'State=UP');
    await until(async () => (await worker(s, 'slurm:debug')).state === 'up', 'the Slurm worker to be up again', 30_000);
    const back = idsOf(await s.ok(['add_job', '--host', 'slurm:debug', SCRIPT, 'in/{}', ':::', ...files.slice(0, 2)]));
    assert.equal((await s.cli(['wait', ...back.map(String)])).code, 0);
    for (const id of back) assert.equal((await s.job(id)).worker, 'slurm:debug');
    // Its only node drained: down, with the node's reason; resumed: up.
    await scontrol(`NodeName=${slurm.node}`, 'State=DRAIN', 'Reason=djs_test_maintenance');
    await until(async () => (await worker(s, 'slurm:debug')).state === 'down', 'the Slurm worker to be down (drained)', 30_000);
    assert.match((await worker(s, 'slurm:debug')).error, /drained \(djs_test_maintenance\)/);
    await scontrol(`NodeName=${slurm.node}`, 'State=RESUME');
    await until(async () => (await worker(s, 'slurm:debug')).state === 'up', 'the Slurm worker to be up after RESUME', 60_000);
  });

  test('a job whose Slurm job is cancelled from outside (scancel) is requeued as a worker failure', { timeout: 120_000 }, async (t) => {
    const s = await server(t);
    await s.ok(['add_slave', 'slurm:debug:1']);
    const [file] = inputs(s, 1);
    const pause = `120.${process.pid}`;
    const id = Number((await s.ok(['add_job', '-e', `DJS_EXAMPLE_SLEEP=${pause}`, SCRIPT, `in/${file}`])).trim());
    await until(async () => (await slurm.jobNames()).includes(`djs-${id}`), `Slurm to run djs-${id}`, 60_000);
    // Cancelled while the work runs: Slurm's step was launched, so it is CANCELLED (before
    // that, srun says the step's credential was revoked, or its launch was aborted).
    await until(() => findProcesses(['sleep', pause]).length > 0, 'the work to run', 60_000);
    const r = await slurm.client('scancel', ['--name', `djs-${id}`]);
    assert.equal(r.code, 0, r.stderr);
    const job = await until(async () => {
      const j = await s.job(id);
      return j.history.length === 1 && j.state === 'running' && j;
    }, 'the job to run again', 60_000);
    assert.deepEqual([job.history[0].exitCode, job.history[0].worker, job.attempts], [255, 'slurm:debug', 2]);
    assert.equal((await worker(s, 'slurm:debug')).state, 'up');
    assert.match(fs.readFileSync(path.join(s.logDir, `${id}.log`), 'utf8'),
      new RegExp(`STEP \\d+\\.0 ON ${slurm.node} CANCELLED|srun: error: .*Job credential revoked|srun: .*StepId=\\d+\\.0 aborted before step completely launched`), 'srun\'s output is in the job\'s log');
    await s.ok(['kill', String(id)]);
    await untilState(s, id, 'killed', 30_000);
  });

  test('slurm:PARTITION@LOGIN_HOST: checked with sinfo over ssh, the work runs through srun there; bad partitions are refused', { timeout: 120_000 }, async (t) => {
    const s = await server(t, true);
    assert.equal(process.env.SLURM_CONF, undefined, 'the server here knows no Slurm');
    const login = `slurm:debug@${ssh2}`;
    assert.match(await s.ok(['add_slave', `${login}:2`]), new RegExp(`added worker ${login.replace(/\./g, '\\.')} with 2 slots`));
    const [file] = inputs(s, 3).slice(2);
    const id = Number((await s.ok(['add_job', '--slots', '2', SCRIPT, `in/${file}`])).trim());
    await untilState(s, id, 'done', 60_000);
    assert.equal(fs.readFileSync(path.join(s.dir, 'finished_work', `${id}_${file}.out`), 'utf8'), '3\n');
    assert.equal(fs.existsSync(path.join(hosts.hosts[1].scratch, '.djs-work', `${fs.readFileSync(path.join(s.dataDir, 'instance'), 'utf8').trim()}-${id}-1`)), false, 'job dir left on the login host');
    const none = await s.cli(['add_slave', `slurm:nosuch@${ssh2}:2`]);
    assert.equal(none.code, 1);
    assert.match(none.stderr, /Slurm check failed for 'slurm:nosuch@127\.0\.0\.3' \(Slurm has no partition 'nosuch'\); no worker added/);
    const auto = await s.cli(['add_slave', 'slurm:debug:auto']);
    assert.equal(auto.code, 2);
    assert.match(auto.stderr, /a Slurm worker needs a slot count/);
    assert.equal((await s.status()).workers.length, 1);
  });

  test('--gpus on a partition without GPUs is refused when the worker is added; a job whose request srun refuses fails, not its worker', { timeout: 120_000 }, async (t) => {
    const s = await server(t);
    const r = await s.cli(['add_slave', '--gpus', '2', 'slurm:debug:2']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /Slurm check failed for 'slurm:debug' \(--gpus 2, but Slurm partition 'debug' has no GPUs \(sinfo's gres: \(null\)\)\); no worker added/);
    assert.equal((await s.status()).workers.length, 0);
    // Added without the check, as a user may: srun refuses every GPU job's request.
    await s.ok(['add_slave', '--skip_ssh_auth_check', '--gpus', '2', 'slurm:debug:2']);
    const [file] = inputs(s, 1);
    const id = Number((await s.ok(['add_job', '--gpus', '1', SCRIPT, `in/${file}`])).trim());
    const job = await untilState(s, id, 'failed', 60_000);
    assert.deepEqual([job.exitCode, job.attempts], [1, 1], 'the job failed once, with srun\'s code; it was not requeued as a worker failure');
    assert.equal((await worker(s, 'slurm:debug')).state, 'up');
    const log = fs.readFileSync(path.join(s.logDir, `${id}.log`), 'utf8');
    assert.match(log, /srun: error: Invalid generic resource \(gres\) specification/);
    assert.match(log, /Slurm refused what this job asks for/);
    // A plain job on the same worker still runs.
    const plain = Number((await s.ok(['add_job', SCRIPT, `in/${file}`])).trim());
    await untilState(s, plain, 'done', 60_000);
  });

  test('a kill while slurmctld is down is recorded after the grace; the work is cancelled once the controller answers again', { timeout: 240_000 }, async (t) => {
    const s = await server(t);
    await s.ok(['add_slave', 'slurm:debug:1']);
    const [file] = inputs(s, 1);
    const pause = `300.${process.pid}`;
    const id = Number((await s.ok(['add_job', '-e', `DJS_EXAMPLE_SLEEP=${pause}`, SCRIPT, `in/${file}`])).trim());
    const work = await until(() => findProcesses(['sleep', pause])[0], 'the work to run under Slurm', 60_000);
    let down = false;
    t.after(async () => { if (down) await slurm.startController(); });
    await slurm.stopController();
    down = true;
    const killedAt = Date.now();
    await s.ok(['kill', String(id)]);
    await untilState(s, id, 'killed', 30_000);
    assert.ok(Date.now() - killedAt < 25_000, 'recorded killed within the grace (and a little)');
    // The job's own processes give up on Slurm: no srun of this test is left, yet the
    // work runs on, since only the controller can end it.
    const ours = (argv0: string) => findProcesses([argv0]).filter((p) => { try { return fs.readlinkSync(`/proc/${p}/cwd`).startsWith(s.dir); } catch { return false; } });
    await until(() => ours('srun').length === 0, 'the job\'s srun to be gone', 120_000, 200);
    assert.ok(alive(work), 'the work still runs while slurmctld is down');
    await slurm.startController();
    down = false;
    const back = Date.now();
    await until(() => !alive(work), 'the work to be cancelled once slurmctld answers', 20_000, 100);
    t.diagnostic(`the work ended ${Date.now() - back} ms after slurmctld answered again`);
    await until(async () => (await slurm.jobNames()).length === 0, 'Slurm to list no job', 20_000, 200);
    const canceller = () => processesUnder(s.dir).filter((p) => { try { return fs.readFileSync(`/proc/${p}/cmdline`, 'utf8').includes('86400'); } catch { return false; } });
    await until(() => canceller().length === 0, 'the canceller to end once Slurm no longer lists the job', 20_000, 200);
  });
});

describe('Slurm workers added with --gpus', () => {
  test('sinfo\'s node counts and gres say whether a partition has the GPUs a worker is added with', () => {
    assert.equal(slurmGpuVerdict(['1/(null)'], 'debug', 2), "--gpus 2, but Slurm partition 'debug' has no GPUs (sinfo's gres: (null))");
    assert.equal(slurmGpuVerdict(['2/gpu:a100:4(S:0-1)', '3/(null)'], 'gpu', 8), null, 'two nodes of 4');
    assert.equal(slurmGpuVerdict(['1/gpu:2,mps:200'], 'gpu', 3), "--gpus 3, but Slurm partition 'gpu' has 2 GPUs (sinfo's gres: gpu:2,mps:200)");
    assert.equal(slurmGpuVerdict(['1/gpu:tesla:1(S:0),gpu:v100:2'], 'gpu', 3), null, 'GPUs of two types on a node add up');
    assert.equal(slurmGpuVerdict(['4/mps:100'], 'gpu', 1), "--gpus 1, but Slurm partition 'gpu' has no GPUs (sinfo's gres: mps:100)");
  });
});
