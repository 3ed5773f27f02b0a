// Tier 2: the README's Guarantees under real crashes. The server is killed with
// SIGKILL at random moments while clients add jobs and jobs finish; restarted servers
// must adopt what runs, record what ended, and run every acknowledged job exactly once.
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { applyEvent, newState, upgradeRecord, type Event } from '../cli.ts';
import {
  GATED, addJob, addWorkers, launcherOf, alive, delay, moreChecks, pidOf, procIds, readIf, release, removeDir, runCli, socketOp, startServer, tempDir, testDir, until, untilState,
  writeScript,
} from './server.ts';

/** The exit code a job script picks for its id, so the test can check what was recorded. */
const codeFor = (id: number) => [0, 0, 1, 0, 7][id % 5];

function jobScript(dir: string): string {
  // Appends its id when it starts and again when it ends (and both, as "S id" and
  // "E id", to one trace, which orders them); sleeps a little (one in seven long enough
  // to outlive a server), then exits with the code picked for its id.
  return writeScript(dir, 'job.sh', `
echo "$JOB_ID" >> "${dir}/started"
echo "S $JOB_ID" >> "${dir}/trace"
sleep 0.0$(( JOB_ID % 10 ))
[ $(( JOB_ID % 7 )) -eq 0 ] && sleep 0.4
echo "$JOB_ID" >> "${dir}/ended"
echo "E $JOB_ID" >> "${dir}/trace"
case $(( JOB_ID % 5 )) in 2) exit 1;; 4) exit 7;; *) exit 0;; esac`);
}

const readIds = (file: string) => (fs.existsSync(file) ? fs.readFileSync(file, 'utf8').split('\n').filter(Boolean).map(Number) : []);

function countsOf(ids: number[]): Map<number, number> {
  const m = new Map<number, number>();
  for (const id of ids) m.set(id, (m.get(id) ?? 0) + 1);
  return m;
}

test('kill -9 at random moments: every acknowledged job runs exactly once, exit codes recorded, no slot leaks; priorities and dependencies hold', { timeout: 300_000 }, async (t) => {
  const dir = testDir(t);
  const script = jobScript(dir);
  const acked = new Set<number>();
  const rounds = Number(process.env.DJS_TORTURE_ROUNDS ?? 30);
  let seed = 12345;
  const rand = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  const t0 = Date.now();
  let startingMs = 0; // of which servers spent starting up
  // Clients of crashed servers wind down while the next server starts (a client that
  // reaches the next one has its add acknowledged like any other); their errors are
  // kept for the end.
  const windingDown: Promise<unknown>[] = [];
  const clientErrors: unknown[] = [];
  for (let round = 0; round < rounds; round++) {
    const started = Date.now();
    const server = await startServer({ dir });
    startingMs += Date.now() - started;
    // Enough slots that jobs do not queue for long: kills land while jobs start and end.
    if (round === 0) {
      await addWorkers(server, 'w2:12');
      await server.ok(['add_slave', '--skip_ssh_auth_check', '--gpus', '3', 'w1:12']); // GPU jobs go here
    }
    const dataDir = server.dataDir;
    let stopClients = false;
    // The real client, and (to make many requests per round, at less cost than a node
    // process each) clients that speak the socket protocol directly: single adds and
    // small batches.
    const cliClient = async () => {
      while (!stopClients) {
        const r = rand() < 0.5
          ? await runCli(['--data-dir', dataDir, 'add_jobs', '-'], { cwd: dir, input: `${script} a\n${script} b\n${script} 'c d'\n` })
          : await runCli(['--data-dir', dataDir, 'add_job', script, 'x'], { cwd: dir });
        if (r.code === 0) for (const id of r.stdout.split('\n').filter(Boolean)) acked.add(Number(id));
        else if (r.code !== 3 && r.code !== 1) throw new Error(`client failed unexpectedly (${r.code}): ${r.stderr}`);
        else break; // the server is gone
      }
    };
    const socketClient = async (k: number) => {
      while (!stopClients) {
        const n = 1 + Math.floor(rand() * 3);
        let a: any;
        try { a = await socketOp(dataDir, { op: 'add_jobs', cwd: dir, jobs: Array.from({ length: n }, () => [script, String(k)]) }); } catch { break; }
        if (!a.ok) throw new Error(`add refused: ${a.error}`);
        for (let i = 0; i < a.count; i++) acked.add(a.first + i);
        await delay(20 + Math.floor(rand() * 80)); // the pace of a busy user, not a flood
      }
    };
    // Campaign jobs: priorities, a tag, and dependencies on jobs acknowledged earlier (a
    // dependency that already failed is refused, as it should be).
    const campaignClient = async () => {
      while (!stopClients) {
        // Recent ones, often not ended yet, so failures cascade; half the time one whose
        // script fails (codeFor), so that some chains fail in every run, not just most.
        const pool = [...acked].slice(-30), failing = pool.filter((id) => codeFor(id) !== 0);
        const from = failing.length && rand() < 0.5 ? failing : pool;
        const after = from.length && rand() < 0.6 ? [from[Math.floor(rand() * from.length)]] : [];
        const need = [{}, {}, { slots: 3 }, { gpus: 1 }, { gpus: 2, slots: 2 }][Math.floor(rand() * 5)];
        const req = { op: 'add_jobs', cwd: dir, jobs: [[script, 'camp']], priority: [0, 5, -3, 9][Math.floor(rand() * 4)], tags: ['camp'], ...need, ...(after.length ? { after } : {}) };
        let a: any;
        try { a = await socketOp(dataDir, req); } catch { break; }
        if (!a.ok && /already ended (failed|killed)/.test(a.error)) continue;
        if (!a.ok) throw new Error(`campaign add refused: ${a.error}`);
        acked.add(a.first);
        await delay(30 + Math.floor(rand() * 80));
      }
    };
    const clients = [cliClient(), socketClient(1), socketClient(2), campaignClient()];
    // Kill at a random moment: sometimes right away (mid-start-up work: adoption,
    // recording ends), sometimes in the middle of bursts of adds and completions.
    await delay(Math.floor(rand() * 800));
    await server.crash();
    stopClients = true;
    windingDown.push(Promise.all(clients).catch((e) => clientErrors.push(e)));
  }
  await Promise.all(windingDown);
  assert.deepEqual(clientErrors, [], 'clients saw answers no crash explains');
  const crashedAt = Date.now();
  // A last server runs everything that is left to the end.
  const server = await startServer({ dir });
  const w = await server.cli(['wait']);
  assert.ok(w.code === 0 || w.code === 1, `wait failed: ${w.stderr}`);
  const jobs: any[] = await server.jobs();
  const byId = new Map(jobs.map((j) => [j.id, j]));
  const started = countsOf(readIds(path.join(dir, 'started')));
  const ended = countsOf(readIds(path.join(dir, 'ended')));
  t.diagnostic(`${rounds} crashes in ${crashedAt - t0} ms (${startingMs} ms of it starting servers), then the rest ran in ${Date.now() - crashedAt} ms; ${acked.size} acknowledged jobs, ${jobs.length} in the state`);
  assert.ok(acked.size > rounds * 5, `too few acknowledged adds to mean anything: ${acked.size}`);
  // Dependencies: a job whose dependency failed never ran and says which; every other
  // job ran after each of its dependencies had ended (by the trace's order).
  const trace = fs.readFileSync(path.join(dir, 'trace'), 'utf8').split('\n').filter(Boolean);
  const at = new Map(trace.map((l, i) => [l, i]));
  let chained = 0, failedChains = 0;
  const neverRan = new Set<number>();
  for (const job of jobs) {
    if (!job.after.length) continue;
    const why = /^dependency (\d+) (failed|killed)$/.exec(job.reason ?? '');
    if (why) {
      failedChains++;
      neverRan.add(job.id);
      assert.ok(job.after.includes(Number(why[1])), `job ${job.id}: ${job.reason}, but it waits for ${job.after}`);
      assert.equal(byId.get(Number(why[1]))?.state, why[2], `job ${job.id}: ${job.reason}`);
      assert.equal(started.get(job.id), undefined, `job ${job.id} ran although dependency ${why[1]} failed`);
      assert.equal(job.state, 'failed');
      continue;
    }
    chained++;
    for (const d of job.after) {
      assert.equal(byId.get(d)?.state, 'done', `job ${job.id} ran, but its dependency ${d} is ${byId.get(d)?.state}`);
      assert.ok(at.get(`E ${d}`)! < at.get(`S ${job.id}`)!, `job ${job.id} started before its dependency ${d} ended`);
    }
  }
  // Priorities: replaying the journal, every start is of a job of the highest priority
  // among the jobs that could start then on that kind of slot; and no slot or GPU is
  // ever held by two jobs (tracked here from the start, end and unstart events alone).
  const st0 = newState();
  let starts = 0, version = 3, multi = 0;
  const holder = new Map<string, number>(), holding = new Map<number, { run: number; keys: string[] }>(), runs = new Map<number, number>();
  const letGo = (id: number) => { for (const k of holding.get(id)?.keys ?? []) holder.delete(k); holding.delete(id); };
  for (const line of fs.readFileSync(path.join(server.dataDir, 'journal'), 'utf8').split('\n').filter(Boolean)) {
    const rec = JSON.parse(line);
    if (rec.format) { version = rec.version; continue; }
    const ev = upgradeRecord(rec, version) as unknown as Event;
    if (ev.e === 'start' && st0.jobs.get(ev.id)!.state === 'waiting') {
      const run = (runs.get(ev.id) ?? 0) + 1;
      runs.set(ev.id, run);
      const keys = [...(ev.slots ?? [ev.slot]).map((x) => `${ev.host}/slot ${x}`), ...(ev.gpus ?? []).map((g) => `${ev.host}/GPU ${g}`)];
      if (keys.length > 1) multi++;
      for (const k of keys) {
        assert.equal(holder.get(k), undefined, `job ${ev.id} started on ${k}, which job ${holder.get(k)} held`);
        holder.set(k, ev.id);
      }
      holding.set(ev.id, { run, keys });
    }
    if (ev.e === 'end' && holding.get(ev.id)?.run === ev.run) letGo(ev.id);
    if (ev.e === 'unstart') letGo(ev.id);
    if (ev.e === 'start') {
      const job = st0.jobs.get(ev.id)!;
      if (job.state === 'waiting') {
        starts++;
        // Recounted here, not asked of the core's queue. Jobs needing GPUs or several
        // slots are another kind of job: a plain one may start while they wait for room.
        const ready = (j: typeof job) => j.state === 'waiting' && (j.after ?? []).every((d) => st0.jobs.get(d)?.state === 'done');
        const kind = (j: typeof job) => `${j.need.slots}/${j.need.gpus}`;
        assert.ok(ready(job), `job ${ev.id} started while waiting for a dependency`);
        for (const other of st0.jobs.values()) {
          if (ready(other) && kind(other) === kind(job) && other.priority > job.priority) assert.fail(`job ${ev.id} (priority ${job.priority}) started while job ${other.id} (priority ${other.priority}) waited`);
        }
      }
    }
    applyEvent(st0, ev);
  }
  assert.ok(!fs.existsSync(path.join(server.dataDir, 'snapshot')), 'the journal holds the whole history');
  t.diagnostic(`${chained} jobs ran after their dependencies, ${failedChains} failed for a dependency; ${starts} starts checked for priority, ${multi} of them of several slots or GPUs`);
  assert.ok(chained > 5 && failedChains > 0 && multi > 5, 'the campaign client exercised little');
  for (const id of acked) {
    const job = byId.get(id);
    assert.ok(job, `acknowledged job ${id} was lost`);
    if (neverRan.has(id)) continue;
    assert.equal(started.get(id), 1, `job ${id} started ${started.get(id) ?? 0} times`);
    assert.equal(ended.get(id), 1, `job ${id} ended ${ended.get(id) ?? 0} times`);
    assert.equal(job.exitCode, codeFor(id), `job ${id}: recorded exit ${job.exitCode}, script chose ${codeFor(id)}`);
    assert.equal(job.state, codeFor(id) === 0 ? 'done' : 'failed', `job ${id} state`);
  }
  // Jobs whose add was durable but not acknowledged may exist; they too ran once.
  for (const [id, n] of started) assert.equal(n, 1, `job ${id} started ${n} times`);
  for (const job of jobs) if (!neverRan.has(job.id)) assert.equal(started.get(job.id), 1, `job ${job.id} (${job.state}) in the state did not run exactly once`);
  // No slot leaks: nothing runs, and status agrees with the files.
  const st = await server.status();
  assert.equal(st.counts.running, 0);
  assert.equal(st.counts.waiting, 0);
  assert.equal(st.counts.total, jobs.length);
  assert.equal(st.counts.done + st.counts.failed, started.size + neverRan.size);
  for (const wk of st.workers) assert.deepEqual(wk.running, [], `worker ${wk.host} still has jobs in its slots`);
  // No run files left behind: a run's file goes once its end is on disk, and a claim a
  // server made on a run that never spawned (a tombstone against a late launcher) once no
  // launcher of an earlier server is left; the server sweeps those every second.
  const runDir = path.join(server.dataDir, 'run');
  const left = () => fs.readdirSync(runDir).map((f) => `${f}: ${JSON.stringify(readIf(path.join(runDir, f)))}`);
  await until(() => left().length === 0, 'run files to be removed', 15_000).catch(() => {});
  assert.deepEqual(left(), [], `run files left behind; the last server said:\n${server.output()}`);
});

/** True if this process may mount a tmpfs (root, and not forbidden by the container). */
async function canMount(): Promise<boolean> {
  if (process.getuid?.() !== 0) return false;
  const probe = tempDir('djs-m-');
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', probe], { stdio: 'ignore' });
    execFileSync('umount', [probe], { stdio: 'ignore' });
    return true;
  } catch { return false; } finally { await removeDir(probe); }
}

// The rest wait on their jobs more than they work: a few at once.
describe('crashes, adoption and a damaged data dir', { concurrency: 4 }, () => {
  test('a server killed while 8 jobs run: those that end with no server are recorded, the rest adopted, slots refilled', { timeout: 60_000 }, async (t) => {
    const dir = testDir(t);
    // Each job waits for its own go-file, then exits with a code of its own.
    const script = writeScript(dir, 'gated.sh', `
echo $$ > "${dir}/pid.$JOB_ID"
while [ ! -e "${dir}/go.$JOB_ID" ]; do sleep 0.05; done
exit $(( JOB_ID + 10 ))`);
    let s = await startServer({ dir });
    await addWorkers(s, 'a:4', 'b:4');
    for (let i = 0; i < 12; i++) await s.ok(['add_job', script]);
    await until(async () => (await s.status()).counts.running === 8, '8 running jobs');
    await until(() => [1, 2, 3, 4, 5, 6, 7, 8].every((id) => fs.existsSync(path.join(dir, `pid.${id}`))), 'all 8 scripts to start');
    await s.crash();
    // Half of them end while no server runs.
    for (const id of [1, 3, 5, 7]) fs.writeFileSync(path.join(dir, `go.${id}`), '');
    await until(() => [1, 3, 5, 7].every((id) => {
      const pid = Number(fs.readFileSync(path.join(dir, `pid.${id}`), 'utf8'));
      return !alive(pid);
    }), 'the released jobs to exit');
    s = await s.restart();
    const running = (await s.jobs()).filter((j) => j.state === 'running').map((j) => j.id).sort((a, b) => a - b);
    // The ended ones are recorded at once; their slots go to jobs 9..12.
    await until(async () => {
      const jobs = await s.jobs();
      return [1, 3, 5, 7].every((id) => jobs.find((j) => j.id === id)?.state === 'failed');
    }, 'the jobs that ended without a server to be recorded');
    await until(async () => (await s.status()).counts.running === 8, 'freed slots to be refilled');
    assert.ok([2, 4, 6, 8].every((id) => running.includes(id)), `adopted jobs shown running after restart: ${running}`);
    for (let id = 1; id <= 12; id++) fs.writeFileSync(path.join(dir, `go.${id}`), '');
    const w = await s.cli(['wait', '--all']);
    assert.equal(w.code, 1); // exit codes are 11.., so not done
    const jobs = await s.jobs();
    for (let id = 1; id <= 12; id++) {
      const job = jobs.find((j) => j.id === id);
      assert.equal(job.exitCode, id + 10, `job ${id} exit code`);
      assert.equal(job.attempts, 1, `job ${id} attempts`);
    }
    const st = await s.status();
    for (const wk of st.workers) assert.deepEqual(wk.running, []);
  });

  test('a reused pid is not taken for an adopted job', { timeout: 30_000 }, async (t) => {
    const dir = testDir(t);
    const script = writeScript(dir, 'long.sh', `while [ ! -e "${dir}/go" ]; do sleep 0.05; done`);
    let s = await startServer({ dir });
    await addWorkers(s, 'a');
    await s.ok(['add_job', script]);
    await until(async () => (await s.job(1))?.state === 'running', 'job 1 to run');
    await s.crash();
    // The job ends while no server runs, and its pid file is made to name a live
    // process that started long after the file was written (a reused pid).
    const pidFile = fs.readdirSync(path.join(s.dataDir, 'run')).find((n) => n.endsWith('.pid'))!;
    const wrapperPid = Number(fs.readFileSync(path.join(s.dataDir, 'run', pidFile), 'utf8'));
    fs.writeFileSync(path.join(dir, 'go'), '');
    await until(() => !alive(wrapperPid), 'the job to end');
    fs.writeFileSync(path.join(s.dataDir, 'run', pidFile), `${process.pid}\n`); // and no exit code
    const old = new Date(Date.now() - 3600_000);
    fs.utimesSync(path.join(s.dataDir, 'run', pidFile), old, old);
    s = await s.restart();
    const job = await until(async () => { const j = await s.job(1); return j.state !== 'running' && j; }, 'job 1 to be recorded as ended');
    assert.equal(job.state, 'failed');
    assert.match(job.reason, /lost/);
  });

  test('a start that was journaled but never spawned is run once after a crash', { timeout: 30_000 }, async (t) => {
    // Simulates a crash between "start is durable" and "process spawned": the journal
    // says job 1 runs, but no wrapper ever claimed it.
    const dir = testDir(t);
    const script = writeScript(dir, 'once.sh', `echo "$JOB_ID" >> "${dir}/ran"`);
    let s = await startServer({ dir });
    await addWorkers(s, 'a');
    await s.stop();
    const journal = path.join(s.dataDir, 'journal');
    const lines = fs.readFileSync(journal, 'utf8').split('\n').filter(Boolean);
    const n = lines.length; // header + events so far: the next event is n
    const now = Date.now();
    fs.appendFileSync(journal, [
      JSON.stringify({ n, e: 'add', t: now, id: 1, cwd: dir, retries: 0, timeout: 0, jobs: [[script]] }),
      JSON.stringify({ n: n + 1, e: 'start', t: now, id: 1, w: 'a', s: 0 }),
    ].join('\n') + '\n');
    s = await s.restart();
    await until(async () => (await s.job(1))?.state === 'done', 'job 1 to run after the restart');
    assert.deepEqual(readIds(path.join(dir, 'ran')), [1]);
    const job = await s.job(1);
    assert.equal(job.attempts, 1);
  });

  test('damaged state: a cut-off last line loads with a warning; garbage in the middle or a newer version stops start and changes nothing', { timeout: 60_000 }, async (t) => {
    const dir = testDir(t);
    let s = await startServer({ dir });
    const journal = path.join(s.dataDir, 'journal');
    await addWorkers(s, 'a', 'b', 'c');
    await s.stop();
    // Cut off: half a line at the end.
    fs.appendFileSync(journal, '{"n":99,"e":"wor');
    s = await s.restart();
    assert.match(s.output(), /cut-off line/);
    assert.equal((await s.status()).workers.length, 3);
    await s.stop();
    // Garbage in the middle: start refuses, names file and line, changes no file.
    const good = fs.readFileSync(journal, 'utf8').split('\n');
    good.splice(2, 0, 'this is not json');
    fs.writeFileSync(journal, good.join('\n'));
    const before = fs.readFileSync(journal);
    const r = await runCli(['start', s.dataDir, s.logDir], { cwd: dir });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /journal' line 3/);
    assert.deepEqual(fs.readFileSync(journal), before);
    assert.ok(!fs.existsSync(path.join(s.dataDir, 'server.pid')), 'a refused start left its pid file');
    // A newer format version.
    const lines = before.toString().split('\n');
    lines.splice(2, 1);
    lines[0] = lines[0].replace(/"version":\d+/, '"version":99');
    fs.writeFileSync(journal, lines.join('\n'));
    const r2 = await runCli(['start', s.dataDir, s.logDir], { cwd: dir });
    assert.equal(r2.code, 1);
    assert.match(r2.stderr, /version 99/);
  });

  test('disk trouble: a full data dir refuses changes, keeps the state, and recovers', { timeout: 60_000 }, async (t) => {
    if (!(await canMount())) {
      if (process.env.CI === 'true') assert.fail('this test needs root and tmpfs mounts in CI');
      t.skip('needs root to mount a small tmpfs');
      return;
    }
    const dir = testDir(t); // removing it unmounts the tmpfs too
    const dataDir = path.join(dir, '.data');
    fs.mkdirSync(dataDir);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=2m,mode=0700', 'tmpfs', dataDir]);
    const script = writeScript(dir, 'gate.sh', `while [ ! -e "${dir}/go" ]; do sleep 0.05; done; exit 3`);
    let s = await startServer({ dir });
    await addWorkers(s, 'a');
    await s.ok(['add_job', script]);
    await until(async () => (await s.job(1))?.state === 'running', 'job 1 to run');
    for (let i = 0; i < 10; i++) await s.ok(['add_job', script]); // waiting behind job 1
    // Fill the disk.
    const filler = path.join(dataDir, 'filler');
    try { execFileSync('dd', ['if=/dev/zero', `of=${filler}`, 'bs=64k'], { stdio: 'ignore' }); } catch { /* ENOSPC ends dd */ }
    // An argument larger than a page, so the write cannot fit in the journal's last page.
    const r = await s.cli(['add_job', script, 'x'.repeat(10_000)]);
    assert.equal(r.code, 1, `add on a full disk: ${r.stdout} ${r.stderr}`);
    assert.match(r.stderr, /cannot write the journal/);
    // Use up the rest of the journal's last page: adds, then smaller kills, until refused.
    let total = 11;
    for (let i = 0; i < 100; i++) {
      const a = await socketOp(s.dataDir, { op: 'add_jobs', cwd: dir, jobs: [[script, 'x'.repeat(200)]] });
      if (!a.ok) { assert.match(a.error, /cannot write the journal/); break; }
      total++;
    }
    for (let id = 2; id < 12; id++) {
      const k = await socketOp(s.dataDir, { op: 'kill', ids: [id] });
      if (!k.ok) { assert.match(k.error, /cannot write the journal/); break; }
    }
    assert.equal((await s.status()).counts.total, total, 'a refused add changed the state');
    // Job 1 ends while the disk is full: its end (and the next start) cannot be written
    // now, and are written once there is room again.
    fs.writeFileSync(path.join(dir, 'go'), '');
    await until(() => /[1-9]\d* outcome\(s\) kept for retry/.test(s.output()), 'the end of job 1 to be refused by the full disk');
    assert.equal((await s.job(1)).state, 'running', 'an end that was not written is not shown: ' + s.output());
    fs.rmSync(filler);
    const job = await until(async () => { const j = await s.job(1); return j.state === 'failed' && j; }, 'the end of job 1 to be recorded');
    assert.equal(job.exitCode, 3);
    assert.equal((await s.ok(['add_job', script])).trim(), String(total + 1));
    total++;
    await s.cli(['wait']);
    await s.stop();
    s = await startServer({ dir });
    assert.equal((await s.status()).counts.total, total, 'the state after restart');
  });

  test('the job launcher killed under a running server: its running jobs are watched until they end (their exit codes die with it), new ones start', { timeout: 60_000 }, async (t) => {
    const dir = testDir(t);
    const script = writeScript(dir, 'gated.sh', `echo $$ > "${dir}/pid.$JOB_ID"; while [ ! -e "${dir}/go.$JOB_ID" ]; do sleep 0.05; done; exit $(( JOB_ID + 20 ))`);
    const s = await startServer({ dir });
    await addWorkers(s, 'a:2');
    for (let i = 0; i < 4; i++) await s.ok(['add_job', script]);
    await pidOf(s, 1); await pidOf(s, 2);
    process.kill(launcherOf(s), 'SIGKILL');
    await until(() => /launcher ended/.test(s.output()), 'the server to notice');
    // Jobs 1 and 2 still run: they must stay running, holding their slots, across checks.
    await moreChecks(s, 4);
    assert.deepEqual((await s.jobs()).map((j: any) => j.state), ['running', 'running', 'waiting', 'waiting']);
    for (let id = 1; id <= 4; id++) release(s, id);
    assert.equal((await s.cli(['wait', '--all'])).code, 1);
    const jobs = await s.jobs();
    assert.deepEqual(jobs.map((j: any) => [j.id, j.state, j.exitCode]), [[1, 'failed', null], [2, 'failed', null], [3, 'failed', 23], [4, 'failed', 24]]);
    assert.match(jobs[0].reason, /lost/);
  });

  test('a job orphaned by its launcher is still running to a restarted server, and only once it has ended is it recorded lost and retried', { timeout: 60_000 }, async (t) => {
    const dir = testDir(t);
    const script = writeScript(dir, 'gated.sh', `echo "start $$" >> "${dir}/log.$JOB_ID"; echo $$ > "${dir}/pid.$JOB_ID"
while [ ! -e "${dir}/go.$JOB_ID" ]; do sleep 0.05; done; echo "end $$" >> "${dir}/log.$JOB_ID"`);
    let s = await startServer({ dir });
    await addWorkers(s, 'a:2');
    await s.ok(['add_job', '--retries', '1', script]);
    await pidOf(s, 1);
    process.kill(launcherOf(s), 'SIGKILL');
    await until(() => /launcher ended/.test(s.output()), 'the server to notice');
    await s.crash();
    s = await s.restart();
    await moreChecks(s, 2); // a check of the job or two
    assert.equal((await s.job(1)).state, 'running', 'a restarted server sees job 1 running');
    fs.rmSync(path.join(dir, 'pid.1'));
    release(s, 1);
    assert.equal((await s.cli(['wait', '1'])).code, 0);
    const one = await s.job(1);
    assert.equal(one.attempts, 2, 'retried once its first run had ended');
    assert.match(one.history[0].reason, /lost/);
    const log = fs.readFileSync(path.join(dir, 'log.1'), 'utf8').trim().split('\n').map((l) => l.split(' ')[0]);
    assert.deepEqual(log, ['start', 'end', 'start', 'end'], 'the two attempts never overlapped');
  });

  test('a job stopped with SIGSTOP survives a server stop and start, and its exit code is recorded', { timeout: 60_000 }, async (t) => {
    const dir = testDir(t);
    const script = writeScript(dir, 'gated.sh', `echo $$ > "${dir}/pid.$JOB_ID"; while [ ! -e "${dir}/go.$JOB_ID" ]; do sleep 0.05; done; exit 7`);
    let s = await startServer({ dir });
    await addWorkers(s, 'a');
    await s.ok(['add_job', script]);
    const pid = await pidOf(s, 1);
    const group = procIds(pid).pgrp; // its own
    assert.equal(group, pid);
    const launcher = procIds(pid).ppid;
    process.kill(-group, 'SIGSTOP');
    await s.stop();
    const sawEnd = () => { try { return fs.readlinkSync(`/proc/${launcher}/fd/1`) === '/dev/null'; } catch { return true; } };
    await until(() => !alive(launcher) || sawEnd(), 'the launcher to see its input end');
    process.kill(-group, 'SIGCONT');
    release(s, 1);
    s = await s.restart();
    assert.equal((await s.cli(['wait', '1'])).code, 1);
    const job = await s.job(1);
    assert.equal(job.exitCode, 7, `ended by its own exit, not by a hangup (${job.reason ?? ''})`);
  });

  test('a start that fails for the scheduler\'s own reasons is not charged: starts wait for a missing run dir until it is back, and pause (from 0.5 s) for a log that cannot be opened', { timeout: 60_000 }, async (t) => {
    const dir = testDir(t);
    const script = writeScript(dir, 'mark.sh', `echo "$JOB_ID $(date +%s%3N)" >> "${dir}/ran"`);
    const ran = () => readIf(path.join(dir, 'ran')).trim().split('\n').filter(Boolean).map((l) => l.split(' ').map(Number));
    const s = await startServer({ dir });
    await addWorkers(s, 'a');
    const runDir = path.join(s.dataDir, 'run');
    /** The run dir becomes a plain file: no wrapper can create its pid file in it, and the server cannot make it again. */
    const breakRunDir = () => { fs.rmSync(runDir, { recursive: true }); fs.writeFileSync(runDir, ''); };
    const mendRunDir = () => { fs.rmSync(runDir); fs.mkdirSync(runDir, { mode: 0o700 }); };
    const said = (re: RegExp) => until(() => re.exec(s.output()), `the server to say ${re}`, 10_000);

    // The run dir gone: starts wait until it is back, whatever the time, with no pause left over.
    breakRunDir();
    const first = Number(await addJob(s, script));
    await said(new RegExp(`job ${first} did not start: .*starts wait until ${runDir.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} is a writable directory again`));
    const job = await until(async () => { const j = await s.job(first); return j.state === 'waiting' && j; }, 'job 1 to be back in the queue');
    assert.equal(job.attempts, 0, 'a start that failed is not charged to the job');
    assert.deepEqual(ran(), [], 'the script did not run');
    const mendedAt = Date.now();
    mendRunDir();
    await untilState(s, first, 'done');
    assert.equal((await s.job(first)).attempts, 1);
    assert.ok(ran()[0][1] >= mendedAt - 5, 'job 1 ran once the run dir was back');

    // A log that cannot be opened (a FIFO in its place) is not a missing directory:
    // starts pause, 0.5 s after the first failure.
    const second = first + 1, fifo = path.join(s.logDir, `${second}.log`);
    execFileSync('mkfifo', [fifo]);
    assert.equal(Number(await addJob(s, script)), second);
    const m = await said(new RegExp(`job ${second} did not start: .*starts pause \\((\\d+) ms`));
    assert.equal(Number(m[1]), 500, 'starts pause 0.5 s after the first failure');
    const job2 = await until(async () => { const j = await s.job(second); return j.state === 'waiting' && j; }, 'job 2 to be back in the queue');
    assert.equal(job2.attempts, 0, 'a start that failed is not charged to the job');
    fs.rmSync(fifo);
    await untilState(s, second, 'done');
    assert.deepEqual(ran().map(([id]) => id), [first, second], 'each job ran once');
  });

  test('past DJS_SNAPSHOT_MIN_BYTES of journal the server writes a snapshot and cuts the journal back; a restart loads every job and state', { timeout: 60_000 }, async (t) => {
    const dir = testDir(t);
    let s = await startServer({ dir, env: { DJS_SNAPSHOT_MIN_BYTES: '65536' } });
    const journal = path.join(s.dataDir, 'journal'), snapshot = path.join(s.dataDir, 'snapshot');
    writeScript(dir, 'code.sh', 'exit "$1"');
    writeScript(dir, 'gated.sh', GATED);
    await addWorkers(s, 'w1:2');
    // Jobs in every state: done and failed, two running (holding both slots), many
    // waiting, one killed before it ran, one removed.
    const [done, failed] = (await s.ok(['add_jobs', '-'], { input: './code.sh 0\n./code.sh 3\n' })).trim().split('\n');
    assert.equal((await s.cli(['wait', done, failed])).code, 1);
    const running = [await addJob(s, './gated.sh'), await addJob(s, './gated.sh')];
    for (const id of running) await pidOf(s, id);
    assert.equal(fs.existsSync(snapshot), false, 'no snapshot of a small journal');
    // One add of some 80 KB: the journal passes 64 KiB.
    const pad = 'p'.repeat(100);
    const waiting = (await s.ok(['add_jobs', '-'], { input: Array.from({ length: 600 }, (_, i) => `./code.sh 0 ${pad}${i}\n`).join('') })).trim().split('\n');
    await until(() => fs.existsSync(snapshot), 'the server to write a snapshot', 5000);
    assert.ok(fs.statSync(journal).size < 65536, `the journal was not cut back: ${fs.statSync(journal).size} bytes`);
    // Changes after the snapshot are in the journal only.
    await s.ok(['kill', waiting[0]]);
    await s.ok(['remove_job', '--id', waiting[1]]);
    const last = await addJob(s, './code.sh', '0', 'after the snapshot');
    // (in id order: the order of list is not pinned, and it changes with a snapshot)
    const view = (jobs: any[]) => jobs.map((j) => ({ id: j.id, state: j.state, exitCode: j.exitCode, attempts: j.attempts, worker: j.worker, args: j.args }))
      .sort((a, b) => a.id - b.id);
    const before = view(await s.jobs());
    assert.equal(before.length, 2 + 2 + 600 - 1 + 1);
    assert.deepEqual(before.filter((j) => j.state !== 'waiting').map((j) => [String(j.id), j.state]),
      [[done, 'done'], [failed, 'failed'], [running[0], 'running'], [running[1], 'running'], [waiting[0], 'killed']]);

    // Restarted with the default threshold (32 MiB): everything is there, ids go on.
    await s.stop();
    s = await startServer({ dir });
    assert.deepEqual(view(await s.jobs()), before, 'the jobs after the restart');
    assert.equal(await addJob(s, './code.sh', '0'), String(Number(last) + 1));
    // ... and a journal past 64 KiB (and past half the snapshot) is no reason for a snapshot now.
    const snapped = fs.statSync(snapshot);
    await s.ok(['add_jobs', '-'], { input: Array.from({ length: 1500 }, (_, i) => `./code.sh 0 ${pad}${i}\n`).join('') });
    await s.ok(['status']); // (a snapshot is written in the same turn as the add it follows)
    const now = fs.statSync(snapshot);
    assert.deepEqual([now.ino, now.mtimeMs], [snapped.ino, snapped.mtimeMs], 'a snapshot under the default threshold');
    const grown = fs.statSync(journal).size;
    assert.ok(grown > 65536 && grown > snapped.size / 2, `the journal grew to ${grown} bytes only, the snapshot has ${snapped.size}`);
  });
});
