// Tier 2 and 3: placement through the real CLI — worker labels, GPUs by index, per-worker
// environment, multi-slot jobs, --require/--avoid/--host, policies, no starvation of big
// jobs — on fake workers (--skip_ssh_auth_check), and HOST:auto on real sshd hosts with a
// stand-in nvidia-smi.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { GATED, idsOf, order, pidOf, readIf, release, serve, untilState, writeScript, type TestServer } from './server.ts';
import { skipUnlessSsh, startHosts } from './hosts.ts';

/** Records where and with what it ran: "SLAVE_IP|SLAVE_SLOT|SLAVE_SLOTS|SLAVE_GPUS|CUDA_HOME|MODE"
 *  in where.$JOB_ID, then waits for its go-file like GATED. */
const PLACED = `printf '%s|%s|%s|%s|%s|%s\\n' "$SLAVE_IP" "$SLAVE_SLOT" "$SLAVE_SLOTS" "$SLAVE_GPUS" "$CUDA_HOME" "$MODE" > "where.$JOB_ID"
echo "$JOB_ID" >> order.txt
${GATED}`;
const where = (s: TestServer, id: number | string) => readIf(path.join(s.dir, `where.${id}`)).trim().split('|');
const addWorker = (s: TestServer, ...args: string[]) => s.ok(['add_slave', '--skip_ssh_auth_check', ...args]);

describe('placement', { concurrency: 4 }, () => {
  test('GPUs by index: each job gets free indices as SLAVE_GPUS, never one another job holds; status shows them', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'placed.sh', PLACED);
    assert.match(await addWorker(s, '--label', 'gpu,big', '--gpus', '2', 'g1:4'), /added worker g1 with 4 slots and 2 GPUs, labels big,gpu/);
    await addWorker(s, 'c1:2');
    const gpuJobs = idsOf(await s.ok(['add_job', '--gpus', '1', './placed.sh', ':::', 'a', 'b', 'c']));
    const [cpu] = idsOf(await s.ok(['add_job', './placed.sh', 'cpu']));
    await Promise.all([gpuJobs[0], gpuJobs[1], cpu].map((id) => pidOf(s, id)));
    const held = [where(s, gpuJobs[0])[3], where(s, gpuJobs[1])[3]].sort();
    assert.deepEqual(held, ['0', '1'], 'two jobs, two different GPUs');
    assert.deepEqual(where(s, gpuJobs[0]).slice(0, 1), ['g1']);
    assert.equal(where(s, cpu)[3], '', 'a job without --gpus gets an empty SLAVE_GPUS');
    const st = await s.status();
    const g1 = st.workers.find((w: any) => w.host === 'g1');
    assert.deepEqual([g1.gpus, g1.gpusUsed, g1.labels], [2, [0, 1], ['big', 'gpu']]);
    assert.match(await s.ok(['status']), /g1 .* gpus 2\/2 {2}\[big,gpu\]/);
    const third = await s.job(gpuJobs[2]);
    assert.deepEqual([third.state, third.waitingFor], ['waiting', 'waiting for 1 GPU']);
    const freed = where(s, gpuJobs[0])[3];
    release(s, gpuJobs[0]);
    await pidOf(s, gpuJobs[2]);
    assert.equal(where(s, gpuJobs[2])[3], freed, 'the third job gets the index the first one let go of');
    for (const id of [...gpuJobs, cpu]) release(s, id);
    assert.equal((await s.cli(['wait'])).code, 0);
  });

  test('--slots K takes K slots of one worker (SLAVE_SLOT the first, SLAVE_SLOTS all); worker -e reaches its jobs, a job\'s own -e wins', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'placed.sh', PLACED);
    await addWorker(s, '-e', 'CUDA_HOME=/opt/cuda', '--env', 'MODE=worker', 'w:3');
    const [wide] = idsOf(await s.ok(['add_job', '--slots', '2', './placed.sh']));
    const [narrow] = idsOf(await s.ok(['add_job', '-e', 'MODE=job', './placed.sh']));
    await Promise.all([wide, narrow].map((id) => pidOf(s, id)));
    assert.deepEqual(where(s, wide), ['w', '0', '0,1', '', '/opt/cuda', 'worker']);
    assert.deepEqual(where(s, narrow), ['w', '2', '2', '', '/opt/cuda', 'job']);
    assert.match(await s.ok(['status']), /w +\[\*\*\*\] +up .*\b1 2$/m, 'the status bar shows both slots taken, the job once');
    const [tooWide] = idsOf((await s.cli(['add_job', '--slots', '4', './placed.sh'])).stdout);
    const r = await s.cli(['add_job', '--require', 'gpu', './placed.sh']);
    assert.equal(r.code, 0, 'queued all the same');
    assert.match(r.stderr, /^warning: no worker can take this job now \(label gpu\); it waits until one is added$/m);
    const list = await s.ok(['list']);
    assert.match(list, new RegExp(`^\\s*${tooWide}\\s+waiting\\s+no worker has….*  # no worker has 4 slots on one worker$`, 'm'));
    for (const id of [wide, narrow]) release(s, id);
    await untilState(s, wide, 'done');
  });

  test('--require, --avoid and --host send each job to the workers it may use', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'placed.sh', PLACED);
    await addWorker(s, '--label', 'gpu', 'gpu1:2');
    await addWorker(s, '--label', 'fast', 'cpu1:2', 'cpu2:2');
    await addWorker(s, '--label', 'slow', 'old:4');
    const req = idsOf(await s.ok(['add_job', '--require', 'gpu', './placed.sh', ':::', 'a', 'b']));
    const notSlow = idsOf(await s.ok(['add_job', '--avoid', 'slow', '--avoid', 'gpu', './placed.sh', ':::', 'a', 'b', 'c', 'd']));
    const pinned = idsOf(await s.ok(['add_job', '--host', 'old', './placed.sh', ':::', 'a', 'b']));
    for (const id of [...req, ...notSlow, ...pinned]) release(s, id);
    assert.equal((await s.cli(['wait'])).code, 0);
    for (const id of req) assert.equal(where(s, id)[0], 'gpu1');
    for (const id of notSlow) assert.match(where(s, id)[0], /^cpu[12]$/);
    for (const id of pinned) assert.equal(where(s, id)[0], 'old');
  });

  test('no starvation: a 4-slot job starts as soon as the 4 running jobs end, before any of 20 later 1-slot jobs', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'placed.sh', PLACED);
    await addWorker(s, 'w:4');
    const first = idsOf(await s.ok(['add_job', './placed.sh', ':::', 'a', 'b', 'c', 'd']));
    await Promise.all(first.map((id) => pidOf(s, id)));
    const [big] = idsOf(await s.ok(['add_job', '--slots', '4', './placed.sh', 'big']));
    const later = idsOf(await s.ok(['add_job', './placed.sh', ':::', ...Array.from({ length: 20 }, (_, i) => `x${i}`)]));
    for (const id of first) {
      release(s, id);
      await untilState(s, id, 'done');
    }
    await pidOf(s, big);
    assert.deepEqual(order(s).slice(4), [big], 'nothing overtook the big job');
    assert.deepEqual(order(s).slice(0, 4).sort((a, b) => a - b), first);
    release(s, big);
    for (const id of later) release(s, id);
    assert.equal((await s.cli(['wait'])).code, 0);
  });

  test('policy shows and sets where jobs go, is kept across a restart, and takes the cloudmesh names', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'placed.sh', PLACED);
    assert.equal((await s.ok(['policy'])).trim(), 'policy: spread');
    assert.equal((await s.ok(['policy', 'frugal'])).trim(), 'policy: pack (was spread)');
    const bad = await s.cli(['policy', 'fastest']);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /unknown policy 'fastest'/);
    await s.stop();
    const s2 = await s.restart();
    assert.equal((await s2.status()).policy, 'pack');
    await addWorker(s2, 'a:4', 'b:2');
    const ids = idsOf(await s2.ok(['add_job', './placed.sh', ':::', 'a', 'b']));
    await Promise.all(ids.map((id) => pidOf(s2, id)));
    assert.deepEqual(ids.map((id) => where(s2, id)[0]), ['b', 'b'], 'pack fills the smaller worker first');
    for (const id of ids) release(s2, id);
    assert.equal((await s2.cli(['wait'])).code, 0);
  });

  test('HOST:auto reads the host\'s CPUs (nproc) and GPUs (nvidia-smi -L) over ssh; GPU jobs go there', { timeout: 120_000 }, async (t) => {
    if (skipUnlessSsh(t)) return;
    const hosts = await startHosts(2);
    t.after(() => hosts.close());
    const s = await serve(t, { env: { DJS_SSH_CONFIG: hosts.sshConfig, DJS_SSH_TIMEOUT: '5' } });
    const [gpuHost, cpuHost] = hosts.hosts;
    // A stand-in nvidia-smi on the first host only, listing two GPUs.
    fs.mkdirSync(path.join(gpuHost.scratch, 'bin'));
    writeScript(path.join(gpuHost.scratch, 'bin'), 'nvidia-smi', `[ "$1" = -L ] || exit 9
echo 'GPU 0: NVIDIA Stand-In (UUID: GPU-00000000-0000-0000-0000-000000000000)'
echo 'GPU 1: NVIDIA Stand-In (UUID: GPU-00000000-0000-0000-0000-000000000001)'`);
    const cpus = Number(fs.readFileSync('/proc/cpuinfo', 'utf8').match(/^processor\s*:/gm)!.length);
    const out = await s.ok(['add_slave', '--label', 'lab', `${gpuHost.addr}:auto`]);
    assert.match(out, new RegExp(`added worker ${gpuHost.addr.replace(/\./g, '\\.')} with \\d+ slots? and 2 GPUs`));
    await s.ok(['add_slave', '--slots', 'auto', cpuHost.addr]);
    const workers = (await s.status()).workers;
    const g = workers.find((w: any) => w.host === gpuHost.addr), c = workers.find((w: any) => w.host === cpuHost.addr);
    assert.ok(g.slots >= 1 && g.slots <= cpus, `slots from nproc: ${g.slots}`);
    assert.deepEqual([g.gpus, c.gpus, c.slots], [2, 0, g.slots], 'no nvidia-smi: no GPUs');
    writeScript(s.dir, 'placed.sh', PLACED);
    const [job] = idsOf(await s.ok(['add_job', '--gpus', '2', './placed.sh']));
    await pidOf(s, job);
    assert.deepEqual(where(s, job).slice(0, 4), [gpuHost.addr, '0', '0', '0,1']);
    release(s, job);
    await untilState(s, job, 'done');
    const skip = await s.cli(['add_slave', '--skip_ssh_auth_check', 'x:auto']);
    assert.equal(skip.code, 2);
    assert.match(skip.stderr, /auto needs the ssh login check/);
  });
});
