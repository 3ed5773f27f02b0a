// Tier 3: ssh at scale on real sshd hosts — shared connections (one login per worker for
// checks, heartbeats and every job's ssh and rsync), sshd's default limits, workers
// watched while they run jobs (heartbeats, --requeue-on-down), and add_slave of many hosts.
import { describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startHosts, skipUnlessSsh, serveOnHosts, exampleVariant, SSH_TIMEOUT_S } from './hosts.ts';
import { allPids, run, serve, until, ROOT, type TestServer } from './server.ts';

const EXAMPLE = path.join(ROOT, 'example_job.sh');

/** n small input files; returns their names. */
function makeInputs(dir: string, n: number): string[] {
  fs.mkdirSync(path.join(dir, 'input'), { recursive: true });
  return Array.from({ length: n }, (_, i) => {
    const name = `f${i + 1}.txt`;
    fs.writeFileSync(path.join(dir, 'input', name), 'w '.repeat(i + 1) + '\n');
    return name;
  });
}

/** Queues example_job.sh (or `script`) once per input; returns the ids. */
async function addJobs(s: TestServer, names: string[], script = './example_job.sh'): Promise<number[]> {
  const out = await s.ok(['add_jobs', '-'], { input: names.map((n) => `${script} input/${n}\n`).join('') });
  return out.trim().split('\n').map(Number);
}

/** Every job done after exactly one successful attempt, with its right word count. */
async function checkAllDoneOnce(s: TestServer, ids: number[], names: string[]): Promise<any[]> {
  const jobs = await s.jobs();
  ids.forEach((id, i) => {
    const job = jobs.find((j: any) => j.id === id);
    assert.equal(job.state, 'done', `job ${id}: ${job.reason}`);
    assert.equal(job.history.filter((h: any) => h.exitCode === 0).length, 1, `job ${id} ran to its end once`);
    assert.equal(fs.readFileSync(path.join(s.dir, 'finished_work', `${id}_${names[i]}.out`), 'utf8').trim(), String(i + 1));
  });
  return jobs;
}

const workerOf = async (s: TestServer, host: string) => (await s.status()).workers.find((w: any) => w.host === host);

/** Pids of the ssh master processes ("ssh: PATH [mux]") whose control socket is in dir. */
function masters(dir: string): number[] {
  return allPids().filter((pid) => {
    try {
      const cmd = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      return cmd.includes(`${dir}/`) && cmd.includes('[mux]');
    } catch { return false; }
  });
}

/** Runs 36 paced jobs over 3 hosts x 2 slots, stops host 2 (SIGSTOP) while it runs jobs
 *  and checks: down within the heartbeat limit, none of its jobs running past that plus
 *  ssh's own timeout, every job done exactly once; after SIGCONT it is up by itself. */
async function hangMidRun(t: TestContext, requeueOnDown: boolean) {
  const HEARTBEAT_S = 1;
  const { hosts, s } = await serveOnHosts(t, 3, { env: { DJS_HEARTBEAT: String(HEARTBEAT_S) } });
  const hung = hosts.hosts[1];
  await s.ok(['add_slave', ...(requeueOnDown ? ['--requeue-on-down'] : []), ...hosts.hosts.map((h) => `${h.addr}:2`)]);
  const names = makeInputs(s.dir, 36);
  const ids = await addJobs(s, names, exampleVariant(s.dir, 'paced.sh', 'DJS_EXAMPLE_SLEEP=1'));
  await until(async () => (await s.status()).counts.done >= 6 && (await workerOf(s, hung.addr)).running.length === 2, 'the run to get going on every host', 60_000);
  const stoppedAt = Date.now();
  hung.stop();
  t.after(() => hung.cont());
  const limitMs = 3 * HEARTBEAT_S * 1000;
  // Times as the server recorded them (the clients that poll may lag on a busy machine).
  const down = await until(async () => { const w = await workerOf(s, hung.addr); return w.state === 'down' && w; }, `${hung.addr} to be down`, 30_000, 100);
  const downMs = Date.parse(down.since) - stoppedAt;
  // Down within the limit (after the last answer, a check every period): allow one period
  // for the first check to be sent, and a second of slack for a loaded machine.
  assert.ok(downMs <= limitMs + 2 * HEARTBEAT_S * 1000 + 1000, `down after ${downMs} ms`);
  assert.match(String(down.error), /no answer to checks|Timeout|timed out|closed/);
  await until(async () => (await workerOf(s, hung.addr)).running.length === 0, `no job running on ${hung.addr}`, 30_000, 100);
  const w = await s.cli(['wait']);
  assert.equal(w.code, 0, `wait: ${w.stderr}`);
  const jobs = await checkAllDoneOnce(s, ids, names);
  const onHung = jobs.flatMap((j: any) => j.history).filter((h: any) => h.worker === hung.addr && h.exitCode !== 0);
  assert.ok(onHung.length > 0, 'jobs were cut off on the hung host');
  // Its jobs end by ssh's keepalives of the shared connection (about 2 x DJS_SSH_TIMEOUT),
  // or, with --requeue-on-down, by SIGTERM when it is down (their cleanup then waits on
  // the same keepalives).
  const lastEnd = Math.max(...onHung.map((h: any) => Date.parse(h.endedAt))) - stoppedAt;
  assert.ok(lastEnd <= downMs + (2 * SSH_TIMEOUT_S + 3) * 1000, `jobs ran on ${hung.addr} for ${lastEnd} ms`);
  // Stopped when the host went down (or cut off by ssh's keepalives just before).
  if (requeueOnDown) {
    assert.ok(onHung.some((h: any) => h.reason === 'worker down'), JSON.stringify(onHung));
    assert.ok(onHung.every((h: any) => h.reason === 'worker down' || h.exitCode === 255), JSON.stringify(onHung));
  } else assert.ok(onHung.every((h: any) => h.exitCode === 255), JSON.stringify(onHung));
  assert.ok(jobs.every((j: any) => j.history.every((h: any) => h.worker === hung.addr || h.exitCode === 0)), 'no job failed on a healthy host');
  hung.cont();
  await until(async () => (await workerOf(s, hung.addr)).state === 'up', `${hung.addr} to be up again`, 30_000, 200);
}

describe('ssh at scale on real hosts', { concurrency: 3 }, () => {
  test('one login per worker serves its login check, heartbeats and every job; a dead master (its socket left behind) makes no job fail and is replaced; remove_slave closes them', { timeout: 120_000 }, async (t) => {
    if (skipUnlessSsh(t)) return;
    const { hosts, s } = await serveOnHosts(t, 2, { env: { DJS_HEARTBEAT: '1' } });
    const [h0, h1] = hosts.hosts;
    const before = hosts.hosts.map((h) => h.logins()); // the harness's own check of each host
    await s.ok(['add_slave', ...hosts.hosts.map((h) => `${h.addr}:4`)]);
    const controlDir = path.join(s.dataDir, 'ssh');
    assert.equal(fs.statSync(controlDir).mode & 0o777, 0o700);
    assert.equal(masters(controlDir).length, 2, 'the login check opened one connection per host');
    const names = makeInputs(s.dir, 40);
    const paced = exampleVariant(s.dir, 'paced.sh', 'DJS_EXAMPLE_SLEEP=0.1');
    const first = await addJobs(s, names.slice(0, 20), paced);
    assert.equal((await s.cli(['wait'])).code, 0);
    // Kill host 1's master: its control socket stays behind, dead.
    const config = path.join(controlDir, 'config.0');
    const master = await run('ssh', ['-F', config, '-O', 'check', h1.addr]);
    const pid = Number(/pid=(\d+)/.exec(master.stderr)?.[1]);
    assert.ok(pid > 0, `a master for ${h1.addr}: ${master.stderr}`);
    process.kill(pid, 'SIGKILL');
    await until(() => masters(controlDir).length === 1, 'the master to be gone');
    assert.equal(fs.readdirSync(controlDir).filter((f) => !f.startsWith('config')).length, 2, 'the dead socket stays');
    const second = await addJobs(s, names.slice(20), paced);
    assert.equal((await s.cli(['wait'])).code, 0);
    const jobs = await checkAllDoneOnce(s, [...first, ...second], names);
    assert.ok(jobs.every((j: any) => j.history.length === 1), 'no job was cut off or failed');
    assert.equal(new Set(jobs.map((j: any) => j.worker)).size, 2);
    // A new master took the dead one's place.
    const check = await run('ssh', ['-F', config, '-O', 'check', h1.addr]);
    assert.equal(check.code, 0, check.stderr);
    assert.notEqual(Number(/pid=(\d+)/.exec(check.stderr)?.[1]), pid);
    // Host 0: 20 jobs of 5 sessions each, the login check and heartbeats every second,
    // over one login. Host 1: one more for the new master, and a burst while it logs in:
    // every ssh that finds no live socket then (each slot's next session, a heartbeat)
    // logs in by itself, once or twice each on a loaded machine. Far below the 100 logins
    // of 20 jobs x 5 sessions unshared: the burst ends once the new master is up.
    assert.equal(h0.logins() - before[0], 1, 'host 0 logins');
    const again = h1.logins() - before[1];
    assert.ok(again >= 2 && again <= 1 + 2 * 4 + 2, `host 1 logins: ${again}`);
    for (const h of hosts.hosts) assert.equal((await workerOf(s, h.addr)).state, 'up');
    // Removed workers keep no login open.
    await s.ok(['remove_slave', h0.addr, h1.addr]);
    await until(() => masters(controlDir).length === 0, 'the masters of removed workers to end');
  });

  test("the user's own ssh config still applies (Port, User, IdentityFile, ProxyJump): a worker reached through a jump host shares one connection too", { timeout: 90_000 }, async (t) => {
    if (skipUnlessSsh(t)) return;
    const hosts = await startHosts(2);
    t.after(() => hosts.close());
    const [target, jump] = hosts.hosts;
    // A name only this config knows: the target host, reached through the jump host, which
    // the hosts' own config (included) describes.
    const config = path.join(hosts.dir, 'user_config');
    fs.writeFileSync(config, [
      `Include ${hosts.sshConfig}`, '', 'Host far-node', `  HostName ${target.addr}`, `  Port ${hosts.port}`, `  User ${os.userInfo().username}`, `  ProxyJump ${jump.addr}`,
      `  IdentityFile ${path.join(hosts.dir, 'user_key')}`, '  IdentitiesOnly yes', `  UserKnownHostsFile ${path.join(hosts.dir, 'known_hosts')}`,
      ''].join('\n'));
    const s = await serve(t, { env: { DJS_SSH_CONFIG: config, DJS_SSH_TIMEOUT: String(SSH_TIMEOUT_S), DJS_HEARTBEAT: '1' } });
    fs.copyFileSync(EXAMPLE, path.join(s.dir, 'example_job.sh'));
    const before = [target.logins(), jump.logins()];
    await s.ok(['add_slave', 'far-node:2']);
    const names = makeInputs(s.dir, 8);
    const ids = await addJobs(s, names);
    assert.equal((await s.cli(['wait'])).code, 0);
    const jobs = await checkAllDoneOnce(s, ids, names);
    assert.ok(jobs.every((j: any) => j.worker === 'far-node'));
    assert.equal(fs.readdirSync(path.join(target.scratch, '.djs-work')).length, 0, 'the jobs ran on the target host');
    assert.deepEqual([target.logins() - before[0], jump.logins() - before[1]], [1, 1], 'one login at each end, for the check and all jobs');
  });

  test('sshd at its default limits (MaxStartups 10:30:100, MaxSessions 10): 120 example_job.sh jobs on 16 slots of one host, no exit 255, nothing charged to the worker', { timeout: 240_000 }, async (t) => {
    if (skipUnlessSsh(t)) return;
    const { hosts, s } = await serveOnHosts(t, 1, { sshd: { MaxStartups: '10:30:100', MaxSessions: '10' }, env: { DJS_HEARTBEAT: '2' } });
    const [h] = hosts.hosts;
    const before = h.logins();
    await s.ok(['add_slave', `${h.addr}:16`]);
    const names = makeInputs(s.dir, 120);
    const ids = await addJobs(s, names);
    const w = await s.cli(['wait'], { timeoutMs: 230_000 });
    assert.equal(w.code, 0, `wait: ${w.stderr}`);
    const jobs = await checkAllDoneOnce(s, ids, names);
    const cut = jobs.flatMap((j: any) => j.history).filter((a: any) => a.exitCode !== 0);
    assert.deepEqual(cut, [], 'no attempt ended other than 0');
    const worker = await workerOf(s, h.addr);
    assert.equal(worker.state, 'up');
    assert.equal(h.drops(), 0, 'sshd dropped no connection');
    // 16 slots in two groups of 8 (DJS_SSH_SESSIONS): two connections, each under MaxSessions.
    assert.equal(h.logins() - before, 2, 'logins');
  });

  test('a host that hangs mid-run (SIGSTOP) without --timeout: down within the heartbeat limit, its jobs end by ssh and run again elsewhere, each done once; up again after SIGCONT', { timeout: 150_000 }, async (t) => {
    if (skipUnlessSsh(t)) return;
    await hangMidRun(t, false);
  });

  test('the same with --requeue-on-down: the hung host\'s jobs are stopped and requeued as soon as it is down', { timeout: 150_000 }, async (t) => {
    if (skipUnlessSsh(t)) return;
    await hangMidRun(t, true);
  });

  test('a host that dies while idle is down before any job is sent to it', { timeout: 120_000 }, async (t) => {
    if (skipUnlessSsh(t)) return;
    const { hosts, s } = await serveOnHosts(t, 3, { env: { DJS_HEARTBEAT: '1' } });
    const dead = hosts.hosts[1];
    await s.ok(['add_slave', ...hosts.hosts.map((h) => `${h.addr}:2`)]);
    await dead.crash();
    // Idle: no checks are sent. Once its last answer is two periods old, it is not trusted.
    await until(async () => Date.now() - Date.parse((await workerOf(s, dead.addr)).seenAt) > 2500, 'the last check to be old', 20_000, 100);
    assert.equal((await workerOf(s, dead.addr)).state, 'up', 'an idle host is not checked');
    const names = makeInputs(s.dir, 12);
    const ids = await addJobs(s, names);
    await until(async () => (await workerOf(s, dead.addr)).state === 'down', `${dead.addr} to be down`, 30_000, 100);
    const w = await s.cli(['wait']);
    assert.equal(w.code, 0, `wait: ${w.stderr}`);
    const jobs = await checkAllDoneOnce(s, ids, names);
    assert.deepEqual(jobs.flatMap((j: any) => j.history).filter((a: any) => a.worker === dead.addr), [], 'a job went to the dead host');
    await dead.restart();
    await until(async () => (await workerOf(s, dead.addr)).state === 'up', `${dead.addr} to be up again`, 30_000, 200);
  });

  test('add_slave of 10 hosts, one hanging: checked in parallel, bounded by the ssh timeout, none added; without it, the checks open the connections the jobs then use', { timeout: 120_000 }, async (t) => {
    if (skipUnlessSsh(t)) return;
    const { hosts, s } = await serveOnHosts(t, 10);
    const hung = hosts.hosts[9];
    hung.stop();
    t.after(() => hung.cont());
    const t0 = Date.now();
    const r = await s.cli(['add_slave', ...hosts.hosts.map((h) => `${h.addr}:2`)]);
    const ms = Date.now() - t0;
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, new RegExp(`'${hung.addr.replace(/\./g, '\\.')}'`));
    assert.equal((r.stderr.match(/'127\.0\.0\.\d+'/g) ?? []).length, 1, `only the hung host is named: ${r.stderr}`);
    // One connect timeout and the check's margin (5 s), not ten.
    assert.ok(ms < (SSH_TIMEOUT_S + 5) * 1000 + 3000, `the check took ${ms} ms`);
    assert.equal((await s.status()).workers.length, 0);
    const good = hosts.hosts.slice(0, 9);
    const before = good.map((h) => h.logins());
    await s.ok(['add_slave', ...good.map((h) => `${h.addr}:2`)]);
    const names = makeInputs(s.dir, 36);
    const ids = await addJobs(s, names);
    assert.equal((await s.cli(['wait'])).code, 0);
    const jobs = await checkAllDoneOnce(s, ids, names);
    assert.equal(new Set(jobs.map((j: any) => j.worker)).size, 9, 'every host ran jobs');
    // The first check's failure left connections open to the good hosts; the second
    // check and all jobs used them.
    assert.deepEqual(good.map((h, i) => h.logins() - before[i]), good.map(() => 0), 'no new logins');
  });
});
