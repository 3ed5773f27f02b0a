// A user's first real day, the environment side: every run of a job has a name of its
// own (DJS_RUN_NAME), so two campaigns on one worker never touch each other's files; a
// start that failed keeps no settings; a job runs with the environment of the add_job
// that queued it, a worker's checks with that of its add_slave. Tier 1 (the pure parts)
// and tier 2 (real servers, real clients, example_job.sh on a local worker).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { applyEvent, decideAddJobs, decideLoadStatus, Journal, keptEnviron, loadState, newState, runName, type Event } from '../cli.ts';
import { startSlurm, slurmSkip, type TestSlurm } from './slurm.ts';
import { addJob, addWorkers, ROOT, runCli, serve, startServer, testDir, tempDir, until, untilState, writeScript } from './server.ts';

/** A client run from a shell whose environment is exactly `env` over a plain one: no
 *  DJS_* variable of the test's own shell reaches it. */
function bare(args: string[], cwd: string, env: NodeJS.ProcessEnv = {}) {
  const rest = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('DJS_')));
  return runCli(args, { cwd, env: { ...rest, ...env }, timeoutMs: 30_000 });
}

describe('DJS_RUN_NAME', () => {
  test('INSTANCE-ID-RUN: safe in a file name', () => {
    assert.equal(runName('ab12cd34', 7, 2), 'ab12cd34-7-2');
    assert.match(runName('ab12cd34', 7, 2), /^[A-Za-z0-9_][A-Za-z0-9_.-]*$/);
  });

  test('two servers (two data dirs, both with job 1) run example_job.sh on the same worker at the same time: each job keeps its own directory and result', { timeout: 90_000 }, async (t) => {
    const home = testDir(t, 'djsh-'); // the one worker's home, shared by both campaigns
    // example_job.sh with its WORK changed (as its header says to adapt it): the work
    // waits, polling, until the other campaign's job directory is there too (at most
    // 20 s, so a run that never sees it still ends), then counts the words.
    const wait = `n=0; while [ "$(ls -A .. | wc -l)" -lt 2 ] && [ $n -lt 400 ]; do sleep 0.05; n=$((n + 1)); done
words=$(wc -w < "$1") || exit
printf "%s\\n" $words > "$2"`;
    const text = fs.readFileSync(path.join(ROOT, 'example_job.sh'), 'utf8');
    const work = /^WORK='[^']*'$/m;
    assert.match(text, work, 'example_job.sh defines WORK on two lines');
    const script = text.replace(work, () => `WORK='${wait}'`);
    const servers = await Promise.all(['one two three', 'four five six seven eight'].map(async (words) => {
      const s = await serve(t, { env: { DJS_LOCAL_HOME: home } });
      fs.writeFileSync(path.join(s.dir, 'job.sh'), script, { mode: 0o755 });
      fs.writeFileSync(path.join(s.dir, 'in.txt'), `${words}\n`);
      await addWorkers(s, 'local1:1');
      return s;
    }));
    const ids = await Promise.all(servers.map((s) => addJob(s, 'job.sh', 'in.txt')));
    assert.deepEqual(ids, ['1', '1'], 'job ids start at 1 in every data dir');
    // Both works run at once: two job directories on the worker, named differently.
    const dirs: string[] = await until(() => {
      const d = fs.existsSync(path.join(home, '.djs-work')) ? fs.readdirSync(path.join(home, '.djs-work')) : [];
      return d.length === 2 ? d : null;
    }, 'both jobs to have made their directories', 30_000);
    for (const d of dirs) assert.match(d, /^[a-z0-9]{8}-1-1$/);
    for (const s of servers) await untilState(s, 1, 'done', 40_000);
    assert.equal(fs.readFileSync(path.join(servers[0].dir, 'finished_work', '1_in.txt.out'), 'utf8'), '3\n');
    assert.equal(fs.readFileSync(path.join(servers[1].dir, 'finished_work', '1_in.txt.out'), 'utf8'), '5\n');
    assert.deepEqual(fs.readdirSync(path.join(home, '.djs-work')), [], 'both cleaned up');
    // The name of a data dir stays across restarts.
    const instance = fs.readFileSync(path.join(servers[0].dataDir, 'instance'), 'utf8').trim();
    assert.ok(dirs.includes(`${instance}-1-1`), `${dirs.join(' ')} holds no ${instance}-1-1`);
    await servers[0].stop();
    const again = await servers[0].restart();
    assert.equal(fs.readFileSync(path.join(again.dataDir, 'instance'), 'utf8').trim(), instance);
    fs.writeFileSync(path.join(again.dir, 'name.sh'), '#!/bin/sh\necho "$DJS_RUN_NAME" > "name.$JOB_ID"\n', { mode: 0o755 });
    const id = await addJob(again, 'name.sh');
    await untilState(again, id, 'done');
    assert.equal(fs.readFileSync(path.join(again.dir, `name.${id}`), 'utf8'), `${instance}-${id}-1\n`);
    const refused = await again.cli(['add_job', '-e', 'DJS_RUN_NAME=x', 'name.sh']);
    assert.equal(refused.code, 2, 'a job cannot choose its own run name');
    assert.match(refused.stderr, /DJS_RUN_NAME is set by the server/);
  });
});

describe('a start that failed keeps no settings', () => {
  test('start -d --http PORT on a port in use fails, names the way out, and the next plain start runs', { timeout: 60_000 }, async (t) => {
    const dir = testDir(t);
    const taken = net.createServer();
    await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
    t.after(() => taken.close());
    const port = (taken.address() as net.AddressInfo).port;
    const failed = await bare(['start', '-d', '--http', String(port)], dir);
    assert.equal(failed.code, 1, failed.stderr);
    assert.match(failed.stderr, new RegExp(`cannot serve HTTP on 127\\.0\\.0\\.1:${port}: .*EADDRINUSE`));
    assert.match(failed.stderr, /DJS_HTTP= cli\.ts start -d/, 'the hint names how to drop a kept --http');
    const settings = path.join(dir, '.data', 'settings');
    assert.ok(!fs.existsSync(settings) || !fs.readFileSync(settings, 'utf8').includes(String(port)), 'the failed start kept its --http');

    const plain = await bare(['start', '-d'], dir);
    assert.equal(plain.code, 0, plain.stderr);
    const st = JSON.parse((await bare(['status', '--json'], dir)).stdout);
    assert.equal(st.server.settings.DJS_HTTP, '');
    assert.equal(st.server.http, null);
    assert.equal((await bare(['stop'], dir)).code, 0);
    // What the start that ran kept, the next start runs with.
    assert.match(fs.readFileSync(settings, 'utf8'), /"DJS_HTTP": ""/);
  });
});

// ---- the environment of a job: its add_job's ------------------------------------------

const T0 = Date.UTC(2026, 0, 1);
const CTX = { now: T0, killGraceMs: 1000, argSpace: 1 << 20, environSpace: 1 << 20 };
/** The variables a file of `env` output sets, by name. */
const envFile = (file: string) => new Map(fs.readFileSync(file, 'utf8').split('\n').filter((l) => l.includes('=')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
/** The records of one kind in a journal or snapshot file. */
const records = (file: string, has: (rec: any) => boolean) => fs.readFileSync(file, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l)).filter(has);

describe('the environment a job runs with', () => {
  test('keptEnviron: what describes the shell, the server\'s own variables and the ssh agent do not follow; the job\'s DJS_ variables do', () => {
    const words = ['PWD=/w', 'OLDPWD=/', 'SHLVL=2', '_=/usr/bin/cli.ts', 'TERM=xterm', 'SSH_TTY=/dev/pts/1', 'SSH_AUTH_SOCK=/tmp/a', 'SSH_AGENT_PID=9',
      'JOB_ID=4', 'SLAVE_IP=n1', 'DJS_RUN_NAME=x-4-1', 'DJS_DATA_DIR=/d', 'DJS_SSH_CONFIG=/c', 'DJS_HTTP=8080',
      'VIRTUAL_ENV=/venv', 'PATH=/venv/bin:/usr/bin', 'DJS_REMOTE_DIR=work', 'EMPTY=', 'A=b=c'];
    assert.deepEqual(keptEnviron(words), ['A=b=c', 'DJS_REMOTE_DIR=work', 'EMPTY=', 'PATH=/venv/bin:/usr/bin', 'VIRTUAL_ENV=/venv']);
  });

  test('add_jobs with an environ: one environ event per distinct environment, however many adds and jobs use it', () => {
    const st = newState();
    const decide = (environ: string[], jobs: string[][]) => {
      const d = decideAddJobs(st, { op: 'add_jobs', cwd: '/w', jobs, environ }, { ...CTX, now: CTX.now + st.seq });
      for (const ev of d.events) { applyEvent(st, ev); st.seq++; }
      return d.events;
    };
    const a = ['FOO=a', 'PATH=/usr/bin', 'PWD=/w'];
    const first = decide(a, [['/bin/true'], ['/bin/true', 'x']]);
    assert.deepEqual(first.map((e) => e.e), ['environ', 'add']);
    const again = decide([...a.slice(0, 2), 'PWD=/elsewhere', 'SHLVL=3'], [['/bin/true']]);
    assert.deepEqual(again.map((e) => e.e), ['add'], 'a shell that differs only in PWD and SHLVL shares the copy');
    const other = decide(['FOO=b', 'PATH=/usr/bin'], [['/bin/true']]);
    assert.deepEqual(other.map((e) => e.e), ['environ', 'add']);
    assert.equal(st.environs.size, 2);
    assert.deepEqual(st.environs.get(st.jobs.get(1)!.environ!), ['FOO=a', 'PATH=/usr/bin']);
    assert.equal(st.jobs.get(3)!.environ, st.jobs.get(1)!.environ);
    assert.notEqual(st.jobs.get(4)!.environ, st.jobs.get(1)!.environ);
    assert.throws(() => decideAddJobs(st, { op: 'add_jobs', cwd: '/w', jobs: [['/bin/true']], environ: ['=x'] }, CTX), /invalid environment word/);
    assert.throws(() => decideAddJobs(st, { op: 'add_jobs', cwd: '/w', jobs: [['/bin/true']], environ: ['BIG=' + 'x'.repeat(2 << 20)] }, CTX), /environment takes \d+ bytes/);
    // An exec must hold the environment beside the arguments.
    assert.throws(() => decideAddJobs(st, { op: 'add_jobs', cwd: '/w', jobs: [['/bin/true', 'y'.repeat(100_000)]], environ: ['E=' + 'x'.repeat(100_000)] }, { ...CTX, environSpace: 150_000 }), /an exec leaves/);
  });

  test('load_status (cli.py\'s state): its workers and waiting jobs get the environment of the load_status, kept once', () => {
    const st = newState();
    const status = {
      job_waitlist: [[['./job.sh', 'a'], ['FOO=1']], [['./job.sh', 'b'], []], [['./job.sh', 'c'], ['FOO=1']]],
      slaves: [{ ip: 'h1', envs: {}, status: 'idle', running_job: null }, { ip: 'h2', envs: { P: '1' }, status: 'idle', running_job: null }],
    };
    const d = decideLoadStatus(st, { op: 'load_status', cwd: '/w', status, alive: [], skipCheck: true, environ: ['ENVTEST_FOO=c', 'PWD=/w'] }, CTX);
    assert.deepEqual(d.events.filter((e) => e.e === 'environ').map((e) => (e as { vars: string[] }).vars), [['ENVTEST_FOO=c']], 'one copy for the three adds and two workers');
    for (const ev of d.events) applyEvent(st, ev);
    const ids = new Set([...st.jobs.values()].map((j) => j.environ).concat([...st.workers.values()].map((w) => w.environ)));
    assert.equal(ids.size, 1);
    assert.deepEqual(st.environs.get([...ids][0]!), ['ENVTEST_FOO=c']);
  });

  test('a snapshot keeps each environment some job or worker runs with, once, and drops the others', () => {
    const dir = tempDir('djse-');
    const st = newState();
    const evs: Event[] = [
      { e: 'environ', t: T0, id: 'aaaa', vars: ['FOO=a'] },
      { e: 'environ', t: T0, id: 'bbbb', vars: ['FOO=b'] },
      { e: 'environ', t: T0, id: 'cccc', vars: ['FOO=c'] },
      { e: 'add', t: T0, id: 1, cwd: '/w', retries: 0, timeout: 0, jobs: [['/bin/true']], sweep: [Array.from({ length: 1000 }, (_, i) => String(i))], environ: 'aaaa' },
      { e: 'worker', t: T0, host: 'w1', slots: 1, ssh: true, environ: 'bbbb' },
      { e: 'add', t: T0, id: 1001, cwd: '/w', retries: 0, timeout: 0, jobs: [['/bin/true']] },
    ];
    for (const ev of evs) applyEvent(st, ev);
    st.seq = evs.length;
    new Journal(dir, 0, 0).snapshot(st);
    const kept = records(path.join(dir, 'snapshot'), (r) => r.environ);
    assert.deepEqual(kept.map((r) => r.environ), [{ id: 'aaaa', vars: ['FOO=a'] }, { id: 'bbbb', vars: ['FOO=b'] }], 'one copy each, for 1000 jobs; none unused');
    const loaded = loadState(dir).state;
    assert.equal(loaded.jobs.get(1000)!.environ, 'aaaa');
    assert.equal(loaded.jobs.get(1001)!.environ, null, 'added without one: the server\'s');
    assert.equal(loaded.workers.get('w1')!.environ, 'bbbb');
    assert.deepEqual(loaded.environs.get('aaaa'), ['FOO=a']);
  });

  test('journals and snapshots of format 3 (the release before) load: their jobs and workers run with the server\'s environment', () => {
    for (const name of ['v3-journal', 'v3-snapshot']) {
      const loaded = loadState(path.join(ROOT, 'test', 'fixtures', name));
      assert.equal(loaded.version, 3, name);
      assert.deepEqual([...loaded.state.jobs.values()].map((j) => [j.id, j.state, j.env, j.environ]), [[1, 'done', null, null], [2, 'waiting', ['A=1'], null], [3, 'waiting', null, null]], name);
      assert.deepEqual([...loaded.state.workers.values()].map((w) => [w.host, w.env, w.environ]), [['w1', ['W=1'], null]], name);
      assert.equal(loaded.state.environs.size, 0);
    }
  });

  test('a server on a data dir of format 3 runs its waiting jobs with its own environment, and its worker\'s and their --env', { timeout: 60_000 }, async (t) => {
    const dir = testDir(t);
    fs.cpSync(path.join(ROOT, 'test', 'fixtures', 'v3-journal'), path.join(dir, '.data'), { recursive: true });
    fs.chmodSync(path.join(dir, '.data'), 0o700);
    const s = await serve(t, { dir, env: { ENVTEST_SERVER: 'srv' } });
    await s.ok(['resume']);
    assert.equal((await s.cli(['wait', '2', '3'])).code, 0);
    for (const id of [2, 3]) {
      const log = fs.readFileSync(path.join(s.logDir, `${id}.log`), 'utf8');
      assert.match(log, /^ENVTEST_SERVER=srv$/m, `job ${id}`);
      assert.match(log, /^W=1$/m, `job ${id}`);
    }
    assert.match(fs.readFileSync(path.join(s.logDir, '2.log'), 'utf8'), /^A=1$/m);
    assert.equal(JSON.parse(fs.readFileSync(path.join(s.dataDir, 'journal'), 'utf8').split('\n')[0]).version, 4);
  });

  test('each job runs with the environment of the add_job or add_jobs that queued it, not the server\'s; one copy per environment; adds over HTTP or a bare socket get the server\'s', { timeout: 90_000 }, async (t) => {
    assert.equal(process.env.ENVTEST_FOO, undefined);
    const s = await serve(t, { env: { ENVTEST_SERVER: 'srv', SSH_AUTH_SOCK: '/run/server-agent' }, args: ['--http', '0'] });
    writeScript(s.dir, 'env.sh', 'env > "env.$JOB_ID"');
    await addWorkers(s, 'w1:4');
    // Clients from shells of their own: FOO=a or FOO=b, and not the server's variable.
    // (The ssh agent of their terminal, which may be gone when the job runs, and the terminal do not follow.)
    const from = (foo: string, args: string[], input?: string) => runCli(['--data-dir', s.dataDir, ...args], { cwd: s.dir, env: { ENVTEST_FOO: foo, SSH_AUTH_SOCK: '/run/client-agent', TERM: 'xterm-client' }, input });
    const ids: Record<string, string[]> = { a: [], b: [] };
    for (const [foo, args, input] of [
      ['a', ['add_job', './env.sh']], ['a', ['add_job', './env.sh']], ['b', ['add_job', './env.sh', 'b']],
      ['a', ['add_jobs', '-'], './env.sh 1\n./env.sh 2\n./env.sh 3\n'], ['a', ['add_job', './env.sh', ':::', 'x', 'y']],
    ] as [string, string[], string?][]) {
      const r = await from(foo, args, input);
      assert.equal(r.code, 0, r.stderr);
      ids[foo].push(...r.stdout.trim().split('\n'));
    }
    // cli.py's state, loaded from a shell with FOO=a: its waiting job runs with that too.
    fs.writeFileSync(path.join(s.dir, 'st.json'), JSON.stringify({ job_waitlist: [[['./env.sh', 'loaded'], []]], slaves: [] }));
    const loaded = await from('a', ['load_status', 'st.json']);
    assert.equal(loaded.code, 0, loaded.stderr);
    ids.a.push(String((await s.jobs()).at(-1).id));
    const bare = await addJob(s, 'env.sh');
    const url = (await s.ok(['dashboard'])).trim();
    const [base, token] = url.split('/#token=');
    const post = (body: object) => fetch(`${base}/api/add_jobs`, { method: 'POST', headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
    const refused = await post({ cwd: s.dir, jobs: [[path.join(s.dir, 'env.sh')]], environ: ['ENVTEST_FOO=h'] });
    assert.equal(refused.status, 400, 'HTTP has no shell: it cannot give an environment');
    const viaHttp = await post({ cwd: s.dir, jobs: [[path.join(s.dir, 'env.sh')]] });
    assert.equal(viaHttp.status, 200);
    const httpId = String(((await viaHttp.json()) as { first: number }).first);
    assert.equal((await s.cli(['wait', '--all'])).code, 0);

    assert.equal(ids.a.length, 8);
    for (const foo of ['a', 'b']) {
      for (const id of ids[foo]) {
        const env = envFile(path.join(s.dir, `env.${id}`));
        assert.equal(env.get('ENVTEST_FOO'), foo, `job ${id}`);
        assert.equal(env.get('ENVTEST_SERVER'), undefined, `job ${id} got the server's environment`);
        assert.equal(env.get('DJS_DATA_DIR'), fs.realpathSync(s.dataDir), `job ${id}: what the server gives every job`);
        assert.match(env.get('DJS_RUN_NAME') ?? '', new RegExp(`-${id}-1$`));
        assert.equal(env.get('JOB_ID'), id);
        assert.equal(env.get('SSH_AUTH_SOCK'), '/run/server-agent', `job ${id}: the server's ssh agent`);
        assert.equal(env.get('TERM'), undefined, `job ${id}: no terminal`);
      }
    }
    for (const id of [bare, httpId]) {
      const env = envFile(path.join(s.dir, `env.${id}`));
      assert.deepEqual([env.get('ENVTEST_SERVER'), env.get('ENVTEST_FOO')], ['srv', undefined], `job ${id}`);
    }
    // One copy per environment in the journal, and in the snapshot a restart writes.
    const environs = (file: string) => records(file, (r) => r.e === 'environ' || r.environ?.vars).length;
    assert.equal(environs(path.join(s.dataDir, 'journal')), 2, 'FOO=a and FOO=b, once each');
    await s.stop();
    const again = await s.restart();
    t.after(() => again.crash());
    fs.rmSync(path.join(s.dir, `env.${ids.b[0]}`));
    await again.ok(['retry', ids.b[0]]);
    await untilState(again, ids.b[0], 'done');
    assert.equal(envFile(path.join(s.dir, `env.${ids.b[0]}`)).get('ENVTEST_FOO'), 'b', 'a retry runs with its add_job\'s environment, after a restart too');
    await again.stop();
    const third = await startServer({ dir: s.dir, env: { DJS_SNAPSHOT_MIN_BYTES: '1' } });
    t.after(() => third.crash());
    assert.equal(environs(path.join(s.dataDir, 'snapshot')), 2);
  });
});

describe('a worker\'s checks run with the environment of its add_slave', { skip: slurmSkip(), concurrency: 1 }, () => {
  let slurm: TestSlurm;
  before(async () => { slurm = await startSlurm({ cpus: 2 }); });
  after(async () => { await slurm?.close(); });

  test('a server started where no Slurm is known checks a Slurm worker (sinfo) with its add_slave\'s SLURM_CONF, and runs jobs with their add_job\'s', { timeout: 120_000 }, async (t) => {
    assert.equal(process.env.SLURM_CONF, undefined, 'the server here knows no Slurm');
    const s = await serve(t, { env: { DJS_SLURM_CHECK: '1', DJS_PROBE_BACKOFF_MAX: '1' } });
    const none = await s.cli(['add_slave', 'slurm:debug:1']);
    assert.equal(none.code, 1, 'from a shell without SLURM_CONF the check fails');
    await s.ok(['add_slave', 'slurm:debug:1'], { env: slurm.env });
    const worker = async () => (await s.status()).workers.find((w: any) => w.host === 'slurm:debug');
    // Its routine checks (every second) read Slurm too: a drained node takes it down, for
    // that reason (not "no configuration"), and back up once resumed.
    const drain = await slurm.client('scontrol', ['update', `nodename=${slurm.node}`, 'state=drain', 'reason=envtest']);
    assert.equal(drain.code, 0, drain.stderr);
    const down = await until(async () => { const w = await worker(); return w.state === 'down' && w; }, 'the worker to go down', 30_000);
    assert.match(down.error, /envtest|drain/i);
    const resume = await slurm.client('scontrol', ['update', `nodename=${slurm.node}`, 'state=resume']);
    assert.equal(resume.code, 0, resume.stderr);
    await until(async () => (await worker()).state === 'up', 'the worker to be up again', 30_000);
    writeScript(s.dir, 'part.sh', 'sinfo -h -o %P > "part.$JOB_ID"');
    const id = (await s.ok(['add_job', './part.sh'], { env: slurm.env })).trim();
    await untilState(s, id, 'done', 30_000);
    assert.equal(fs.readFileSync(path.join(s.dir, `part.${id}`), 'utf8').trim().replace('*', ''), 'debug');
  });
});
