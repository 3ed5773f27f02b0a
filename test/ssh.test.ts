// Tier 3: the scheduler on real workers — real sshd hosts on 127.0.0.2, 127.0.0.3, …
// reached with real ssh and rsync by example_job.sh. Faults are real: a host's sshd is
// killed (refuses) or SIGSTOPped (hangs).
import { describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { skipUnlessSsh, findProcesses, serveOnHosts, exampleVariant, type TestHosts } from './hosts.ts';
import { startServer, writeScript, until, within } from './server.ts';

/** Input files of different sizes, some with spaces in their names; returns name → words. */
function makeInputs(dir: string, n: number): Map<string, number> {
  fs.mkdirSync(path.join(dir, 'input'), { recursive: true });
  const words = new Map<string, number>();
  for (let i = 1; i <= n; i++) {
    const name = i % 3 === 0 ? `part ${i} of run.txt` : `part${i}.txt`;
    const count = (i * 37) % 500 + (i === 1 ? 100_000 : 0);
    fs.writeFileSync(path.join(dir, 'input', name), Array.from({ length: count }, (_, k) => `w${k}`).join(i % 2 ? ' ' : '\n') + '\n');
    words.set(name, count);
  }
  return words;
}

const jobsFile = (names: Iterable<string>, script = './example_job.sh') =>
  [...names].map((n) => `${script} ${JSON.stringify(`input/${n}`)}`).join('\n') + '\n';

const addr = (hosts: TestHosts, i: number) => hosts.hosts[i].addr;

/** Runs 60 jobs over 3 hosts and breaks host 2 (index 1) mid-run with `fault`; every
 *  job must end done, the host must go down, and come back up once healed. */
async function runWithFault(t: TestContext, fault: (h: TestHosts['hosts'][number]) => Promise<void> | void, heal: (h: TestHosts['hosts'][number]) => Promise<void> | void) {
  const { hosts, s } = await serveOnHosts(t, 3);
  await s.ok(['add_slave', ...hosts.hosts.map((h) => `${h.addr}:2`)]);
  const words = makeInputs(s.dir, 60);
  const paced = exampleVariant(s.dir, 'paced_job.sh', 'DJS_EXAMPLE_SLEEP=0.3');
  const ids = (await s.ok(['add_jobs', '-'], { input: jobsFile(words.keys(), paced) })).trim().split('\n').map(Number);
  const broken = hosts.hosts[1];
  await until(async () => (await s.status()).counts.done >= 6, 'the run to get going', 60_000);
  await fault(broken);
  await until(async () => (await s.status()).workers.find((w: any) => w.host === broken.addr)?.state === 'down', `${broken.addr} to be down`, 60_000);
  const w = await s.cli(['wait']);
  assert.equal(w.code, 0, `wait: ${w.stderr}`);
  const jobs = await s.jobs();
  for (const [i, name] of [...words.keys()].entries()) {
    const job = jobs.find((j: any) => j.id === ids[i]);
    assert.equal(job.state, 'done', `job ${job.id}: ${job.reason}`);
    assert.equal(fs.readFileSync(path.join(s.dir, 'finished_work', `${ids[i]}_${name}.out`), 'utf8').trim(), String(words.get(name)));
  }
  const st = await s.status();
  const bw = st.workers.find((x: any) => x.host === broken.addr);
  assert.equal(bw.state, 'down');
  assert.ok(bw.error, 'a down worker says why');
  // Healed, it comes back by itself (probes back off, here to at most 2 s) and takes jobs again.
  await heal(broken);
  await until(async () => (await s.status()).workers.find((x: any) => x.host === broken.addr)?.state === 'up', `${broken.addr} to be up again`, 60_000, 200);
  const more = (await s.ok(['add_jobs', '-'], { input: jobsFile([...words.keys()].slice(0, 6), paced) })).trim().split('\n').map(Number);
  assert.equal((await s.cli(['wait', ...more.map(String)])).code, 0);
  const after = await s.jobs();
  assert.ok(after.some((j: any) => more.includes(j.id) && j.worker === broken.addr), 'the healed host took jobs');
}

// Much of each test is waiting (on ssh timeouts, probes, a paced run): three at once.
describe('the scheduler on real ssh hosts', { concurrency: 3 }, () => {
  test('add_slave checks ssh logins first: a host without key access, one that refuses and one that hangs are named, and none is added', { timeout: 60_000 }, async (t) => {
    if (skipUnlessSsh(t)) return;
    const { hosts, s } = await serveOnHosts(t, 4, { noKeyHosts: [1] });
    await hosts.hosts[2].kill();
    hosts.hosts[3].stop();
    t.after(() => hosts.hosts[3].cont());
    for (const [i, why] of [[1, /Permission denied/], [2, /refused/], [3, /timed out|no answer|banner/i]] as const) {
      const t0 = Date.now();
      const r = await s.cli(['add_slave', `${addr(hosts, 0)}:2`, addr(hosts, i)]);
      assert.equal(r.code, 1, r.stderr);
      assert.match(r.stderr, new RegExp(`'${addr(hosts, i).replace(/\./g, '\\.')}'`));
      assert.match(r.stderr, why);
      assert.doesNotMatch(r.stderr, new RegExp(`'${addr(hosts, 0).replace(/\./g, '\\.')}'`), 'the good host is not named');
      assert.ok(Date.now() - t0 < 15_000, `the check took ${Date.now() - t0} ms`);
      assert.equal((await s.status()).workers.length, 0, 'a worker was added although a check failed');
    }
    // Host strings that ssh could read as options never reach it.
    const marker = path.join(s.dir, 'pwned');
    for (const bad of [`-oProxyCommand=touch ${marker}`, 'a;b', 'a b', '$(x)', "a'b"]) {
      const r = await s.cli(['add_slave', '--skip_ssh_auth_check', '--', bad]);
      assert.equal(r.code, 2, `host ${bad}: ${r.stderr}`);
      assert.match(r.stderr, /invalid host/);
    }
    assert.equal(fs.existsSync(marker), false);
    await s.ok(['add_slave', `${addr(hosts, 0)}:2`]);
    assert.deepEqual((await s.status()).workers.map((w: any) => w.host), [addr(hosts, 0)]);
  });

  test('DJS_SSH_OPTIONS reaches the ssh of login checks and of probes', { timeout: 90_000 }, async (t) => {
    if (skipUnlessSsh(t)) return;
    // Options that point ssh at a closed port: the check fails, naming the host and the port.
    const { hosts, s: first } = await serveOnHosts(t, 1, { env: { DJS_SSH_OPTIONS: '-o Port=1' } });
    let s = first;
    const host = addr(hosts, 0);
    const hostNamed = new RegExp(`'${host.replace(/\./g, '\\.')}'`);
    const bad = await s.cli(['add_slave', host]);
    assert.equal(bad.code, 1, bad.stderr);
    assert.match(bad.stderr, hostNamed);
    assert.match(bad.stderr, /port 1: Connection refused/);
    assert.equal((await s.status()).workers.length, 0);
    /** The same data dir under a server with other ssh settings (settings not given are
     *  kept from the start before). */
    const restart = async (env: NodeJS.ProcessEnv) => {
      await s.stop();
      // No heartbeats: the job is sent to the worker unchecked, so that its exit 255 calls for the probe.
      s = await startServer({ dir: s.dir, env: { DJS_SSH_TIMEOUT: '2', DJS_PROBE_BACKOFF_MAX: '2', DJS_HEARTBEAT: '0', ...env } });
    };
    // Without the test hosts' ssh config the check fails; with only DJS_SSH_OPTIONS='-F CONFIG' it passes.
    await restart({ DJS_SSH_CONFIG: '', DJS_SSH_OPTIONS: '' });
    const lost = await s.cli(['add_slave', host]);
    assert.equal(lost.code, 1, `without the config file: ${lost.stderr}`);
    assert.match(lost.stderr, hostNamed);
    await restart({ DJS_SSH_CONFIG: '', DJS_SSH_OPTIONS: `-F ${hosts.sshConfig}` });
    await s.ok(['add_slave', host]);
    assert.deepEqual((await s.status()).workers.map((w: any) => [w.host, w.state]), [[host, 'up']]);

    // A job exits 255 (its first run): the probe, with the closed port again, takes the worker down.
    writeScript(s.dir, 'once255.sh', `n=$(( $(cat "count.$JOB_ID" 2>/dev/null || echo 0) + 1 ))
echo $n > "count.$JOB_ID"
[ $n -ge 2 ] || exit 255`);
    await restart({ DJS_SSH_CONFIG: hosts.sshConfig, DJS_SSH_OPTIONS: '-o Port=1' });
    const id = (await s.ok(['add_job', './once255.sh'])).trim();
    const down = await until(async () => (await s.status()).workers.find((w: any) => w.host === host && w.state === 'down'), `${host} to be down`, 20_000);
    assert.match(String(down.error), /port 1: Connection refused/);
    assert.equal((await s.job(id)).state, 'waiting', 'no job goes to a down worker');
    // With the options gone, the next probe answers, and the job runs again.
    await restart({ DJS_SSH_CONFIG: hosts.sshConfig, DJS_SSH_OPTIONS: '' });
    assert.equal((await within(s.cli(['wait', id]), 20_000, 'the job to run again')).code, 0);
    const job = await s.job(id);
    assert.deepEqual(job.history.map((h: any) => h.exitCode), [255, 0]);
    assert.equal((await s.status()).workers[0].state, 'up');
  });

  test('40 files over 3 hosts x 2 slots: every job done, right word counts, all hosts used; a failing remote command fails only its job', { timeout: 120_000 }, async (t) => {
    if (skipUnlessSsh(t)) return;
    const { hosts, s } = await serveOnHosts(t, 3);
    await s.ok(['add_slave', ...hosts.hosts.map((h) => `${h.addr}:2`)]);
    const words = makeInputs(s.dir, 40);
    const failing = exampleVariant(s.dir, 'failing_job.sh', 'DJS_EXAMPLE_FAIL=3');
    const ids = (await s.ok(['add_jobs', '-'], { input: jobsFile(words.keys()) + `${failing} input/part1.txt\n` })).trim().split('\n').map(Number);
    assert.equal(ids.length, 41);
    const w = await s.cli(['wait', '--all']);
    assert.equal(w.code, 1, 'one job failed, so wait exits 1');
    const jobs = await s.jobs();
    const failed = jobs.filter((j: any) => j.state !== 'done');
    assert.deepEqual(failed.map((j: any) => [j.id, j.state, j.exitCode]), [[ids[40], 'failed', 3]]);
    for (const [i, name] of [...words.keys()].entries()) {
      const out = path.join(s.dir, 'finished_work', `${ids[i]}_${name}.out`);
      assert.equal(fs.readFileSync(out, 'utf8').trim(), String(words.get(name)), `word count of ${name}`);
    }
    const used = new Set(jobs.map((j: any) => j.worker));
    assert.equal(used.size, 3, `jobs ran on ${[...used]}`);
    for (const h of hosts.hosts) {
      const work = path.join(h.scratch, '.djs-work');
      assert.deepEqual(fs.existsSync(work) ? fs.readdirSync(work) : [], [], `job dirs left on ${h.addr}`);
    }
  });

  test('kill during a long remote command leaves no process and no directory on the host', { timeout: 60_000 }, async (t) => {
    if (skipUnlessSsh(t)) return;
    const { hosts, s } = await serveOnHosts(t, 1);
    await s.ok(['add_slave', addr(hosts, 0)]);
    makeInputs(s.dir, 1);
    const slow = exampleVariant(s.dir, 'slow_job.sh', 'DJS_EXAMPLE_SLEEP=37.5');
    const id = (await s.ok(['add_job', slow, 'input/part1.txt'])).trim();
    await until(() => findProcesses(['sleep', '37.5']).length > 0, 'the remote sleep to run');
    const jobDir = path.join(hosts.hosts[0].scratch, '.djs-work', `${fs.readFileSync(path.join(s.dataDir, 'instance'), 'utf8').trim()}-${id}-1`); // DJS_RUN_NAME
    assert.ok(fs.existsSync(jobDir));
    await s.ok(['kill', id]);
    const job = await until(async () => { const j = await s.job(id); return j.state !== 'running' && j; }, 'the job to end');
    assert.equal(job.state, 'killed');
    await until(() => findProcesses(['sleep', '37.5']).length === 0, 'no remote process left');
    assert.equal(fs.existsSync(jobDir), false, 'the remote job dir was left behind');
  });

  test('a host whose sshd dies mid-run: the run finishes on the others, the host is down, then up again when sshd is back', { timeout: 180_000 }, async (t) => {
    if (skipUnlessSsh(t)) return;
    // All of its sshd: the listener and the connections open to it (shared ones included).
    await runWithFault(t, (h) => h.crash(), (h) => h.restart());
  });

  test('a host that hangs mid-run (SIGSTOP): no job stays stuck on it, the run finishes, the host comes back after SIGCONT', { timeout: 180_000 }, async (t) => {
    if (skipUnlessSsh(t)) return;
    await runWithFault(t, (h) => h.stop(), (h) => h.cont());
  });
});
