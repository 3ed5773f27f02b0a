// add_job --on-worker: a plain command run on the worker itself. Tier 2 on local workers
// (local, localN: this machine) and the bytes of its remote command line through every
// login shell here; tier 3 on real sshd hosts (127.0.0.2, ...): the command runs there,
// through the worker's shared ssh connection, and a kill, a timeout, a removed worker or a
// dead master connection leaves none of its processes behind. Also: bare command names
// found on PATH, --workdir, --name, and that such jobs survive a crash of the server.
import { after, before, describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { startHosts, sshSkip, type TestHosts } from './hosts.ts';
import { slurmSkip, startSlurm, type TestSlurm } from './slurm.ts';
import { serve, startServer, socketOp, testDir, until, untilState, writeScript, allPids, CLI } from './server.ts';
import { ON_WORKER_LINE, onWorkerInput, controlDirFor } from '../cli.ts';

/** Writes its working directory, then its arguments, NUL-separated, to FILE (bytes). */
const REC = `open(my $f, '>', shift) or die; binmode $f; print $f join("\\0", $ENV{PWD} // '', @ARGV)`;
/** Words that a shell would mangle, and bytes that are not UTF-8 (as latin1 strings). */
const NASTY = ['a b', "it's", 'say "hi"', '$HOME', '*', '~', 'new\nline', '', ' lead', 'tab\there', '`id`', '$(id)', '\\', '!', '%s', 'é', 'x;y&z|w', '#c'];

/** Pids of live processes whose environment holds every one of these NAME=VALUE words. */
function withEnv(...words: string[]): number[] {
  return allPids().filter((p) => {
    try {
      if (/^\S+ \(.*\) Z/.test(fs.readFileSync(`/proc/${p}/stat`, 'latin1'))) return false;
      const env = fs.readFileSync(`/proc/${p}/environ`, 'latin1').split('\0');
      return words.every((w) => env.includes(w));
    } catch { return false; }
  });
}

/** Adds workers over the socket without an ssh check (gpus: each worker's GPU count). */
async function workers(dataDir: string, hosts: string[], gpus = 0, env: string[] = []) {
  const r = await socketOp(dataDir, { op: 'add_workers', workers: hosts.map((h) => ({ host: h.split(':')[0], slots: Number(h.split(':')[1] ?? 1), auto: false, gpus, labels: [], env })), skipCheck: true });
  assert.ok(r.ok, r.error);
}

describe('tier 2: bare names, --on-worker on local workers, --name, --workdir', () => {
  test('a bare command name is found on PATH (add_job echo hi); ./x and /abs/x are paths; a name found nowhere is refused at once', async (t) => {
    const s = await serve(t);
    await workers(s.dataDir, ['local1']);
    const id = (await s.ok(['add_job', 'echo', 'hi', 'there'])).trim();
    const first = process.env.PATH!.split(':').map((d) => path.join(d, 'echo')).find((f) => fs.existsSync(f));
    assert.equal((await untilState(s, id, 'done')).script, first, 'the first echo on PATH');
    assert.equal(fs.readFileSync(path.join(s.logDir, `${id}.log`), 'utf8'), 'hi there\n');
    // A script in the current directory, named bare as before (not on PATH): still found there.
    writeScript(s.dir, 'mine.sh', 'echo mine');
    const mine = (await s.ok(['add_job', 'mine.sh'])).trim();
    assert.equal((await untilState(s, mine, 'done')).script, path.join(s.dir, 'mine.sh'));
    const none = await s.cli(['add_job', 'no-such-command-djs']);
    assert.equal(none.code, 1, none.stderr);
    assert.match(none.stderr, /no such script 'no-such-command-djs'/);
    // The same rule in an add_jobs file.
    const file = await s.cli(['add_jobs', '-'], { input: 'true\n./mine.sh\n' });
    assert.equal(file.code, 0, file.stderr);
    assert.equal((await s.cli(['wait'])).code, 0);
  });

  test('--on-worker on a local worker: the command runs here, in the directory it was queued in or --workdir (~ is home), with the job\'s environment and CUDA_VISIBLE_DEVICES', async (t) => {
    const dir = testDir(t);
    const home = path.join(dir, 'home');
    fs.mkdirSync(path.join(home, 'sub'), { recursive: true });
    const s = await serve(t, { dir, env: { HOME: home } });
    await workers(s.dataDir, ['local1:2'], 2, ['FROM_WORKER=w v']);
    const env = ['JOB_ID', 'SLAVE_IP', 'SLAVE_SLOT', 'SLAVE_SLOTS', 'SLAVE_GPUS', 'JOB_ATTEMPT', 'JOB_TIMEOUT', 'FROM_WORKER', 'FROM_JOB', 'CUDA_VISIBLE_DEVICES', 'PWD'];
    const show = 'env > env.$JOB_ID; echo PWD=$(pwd -P) >> env.$JOB_ID';
    fs.mkdirSync(path.join(s.dir, 'q'));
    const a = (await s.ok(['add_job', '--on-worker', '--gpus', '1', '--timeout', '60', '-e', 'FROM_JOB=j $x', 'sh', '-c', show], { cwd: path.join(s.dir, 'q') })).trim();
    const b = (await s.ok(['add_job', '--on-worker', '--workdir', '~/sub', 'sh', '-c', show])).trim();
    await untilState(s, a, 'done');
    await untilState(s, b, 'done');
    const got = (file: string) => {
      const all = new Map(fs.readFileSync(file, 'utf8').trim().split('\n').map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
      return Object.fromEntries(env.map((n) => [n, all.get(n) ?? 'unset']));
    };
    const ea = got(path.join(s.dir, 'q', `env.${a}`));
    assert.deepEqual(ea, {
      JOB_ID: a, SLAVE_IP: 'local1', SLAVE_SLOT: ea.SLAVE_SLOT, SLAVE_SLOTS: ea.SLAVE_SLOT, SLAVE_GPUS: ea.SLAVE_GPUS, JOB_ATTEMPT: '1', JOB_TIMEOUT: '60',
      FROM_WORKER: 'w v', FROM_JOB: 'j $x', CUDA_VISIBLE_DEVICES: ea.SLAVE_GPUS, PWD: fs.realpathSync(path.join(s.dir, 'q')),
    });
    assert.match(ea.SLAVE_GPUS, /^[01]$/);
    const eb = got(path.join(home, 'sub', `env.${b}`));
    assert.equal(eb.PWD, fs.realpathSync(path.join(home, 'sub')));
    assert.equal(eb.CUDA_VISIBLE_DEVICES, 'unset', 'no GPUs held, none visible');
    // list and status show where it runs; --json says so too.
    const job = await s.job(a);
    assert.equal(job.onWorker, true);
    assert.equal(job.runsOn, 'worker');
    assert.equal(job.script, 'sh');
    assert.equal((await s.job(b)).workdir, '~/sub');
    assert.match(await s.ok(['list']), new RegExp(`^\\s+${a}\\s+done .* --on-worker sh -c `, 'm'));
  });

  test('--on-worker: a command not found fails the job (127); exit codes pass through; --workdir needs --on-worker; bad names and huge commands are usage errors', async (t) => {
    const s = await serve(t);
    await workers(s.dataDir, ['local1']);
    const missing = (await s.ok(['add_job', '--on-worker', 'no-such-command-djs'])).trim();
    assert.equal((await untilState(s, missing, 'failed')).exitCode, 127);
    assert.match(fs.readFileSync(path.join(s.logDir, `${missing}.log`), 'utf8'), /cannot run no-such-command-djs/);
    const three = (await s.ok(['add_job', '--on-worker', 'sh', '-c', 'exit 3'])).trim();
    assert.equal((await untilState(s, three, 'failed')).exitCode, 3);
    const wd = await s.cli(['add_job', '--workdir', '/tmp', 'true']);
    assert.equal(wd.code, 2, wd.stderr);
    assert.match(wd.stderr, /--workdir is for --on-worker commands/);
    for (const name of ['12', '-x', 'a\nb', '']) {
      const r = await s.cli(['add_job', `--name=${name}`, 'true']);
      assert.equal(r.code, 2, `--name ${JSON.stringify(name)}: ${r.stderr}`);
      assert.match(r.stderr, /invalid job name/);
    }
    // A sweep whose values make a name a number is refused too.
    const numeric = await s.cli(['add_job', '--name', '{1}', 'true', ':::', '1', '2']);
    assert.equal(numeric.code, 2, numeric.stderr);
    // remove_job finds an --on-worker job by its command as given, a script by where add_job found it.
    await socketOp(s.dataDir, { op: 'pause' });
    const w1 = (await s.ok(['add_job', '--on-worker', 'echo', 'a b'])).trim();
    const w2 = (await s.ok(['add_job', 'echo', 'a b'])).trim();
    assert.equal(await s.ok(['remove_job', 'echo', 'a b']), `removed 2 jobs: ${w1} ${w2}\n`);
    await socketOp(s.dataDir, { op: 'resume' });
    const huge = await s.cli(['add_job', '--on-worker', 'echo', 'x'.repeat(70_000)]);
    assert.equal(huge.code, 2, huge.stderr);
    assert.match(huge.stderr, /more than the 60000 that go to the worker with it/);
    assert.equal((await s.status()).counts.total, 2, 'nothing of the refused ones was queued (and the removed ones are gone)');
  });

  test('--name: filled from the sweep, shown in list, status and --json, and taken by log, kill, wait, retry; a name of several jobs is an error naming them', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'gate.sh', 'echo "run $1 $2"; while [ ! -e "go.$JOB_ID" ]; do sleep 0.05; done');
    const ids = (await s.ok(['add_job', '--name', 'lr{1}-s{2}', './gate.sh', '{1}', '{2}', ':::', '0.1', '0.01', ':::', '1', '2'])).trim().split('\n');
    assert.equal(ids.length, 4);
    const jobs = await s.jobs();
    assert.deepEqual(jobs.map((j) => j.name), ['lr0.1-s1', 'lr0.1-s2', 'lr0.01-s1', 'lr0.01-s2']);
    const twice = (await s.ok(['add_job', '--name', 'same', 'true'])).trim();
    const again = (await s.ok(['add_job', '--name', 'same', 'true'])).trim();
    // status shows it in the queue; list in the command column.
    assert.match(await s.ok(['status']), /\[lr0\.1-s1\] .*gate\.sh 0\.1 1/);
    assert.match(await s.ok(['list']), /\[lr0\.01-s2\] .*gate\.sh 0\.01 2$/m);
    const both = await s.cli(['kill', 'same']);
    assert.equal(both.code, 1, both.stderr);
    assert.match(both.stderr, new RegExp(`2 jobs are named 'same': ${twice}, ${again}`));
    const nobody = await s.cli(['log', 'nobody']);
    assert.equal(nobody.code, 1);
    assert.match(nobody.stderr, /no job is named 'nobody'/);
    await workers(s.dataDir, ['local1:4']);
    await until(() => fs.existsSync(path.join(s.logDir, `${ids[2]}.log`)) && fs.readFileSync(path.join(s.logDir, `${ids[2]}.log`), 'utf8').includes('run'), 'lr0.01-s1 to start');
    assert.equal(await s.ok(['log', 'lr0.01-s1']), 'run 0.01 1\n');
    assert.equal((await s.cli(['kill', 'lr0.01-s1'])).code, 0);
    await untilState(s, ids[2], 'killed');
    for (const id of [ids[0], ids[1], ids[3]]) fs.writeFileSync(path.join(s.dir, `go.${id}`), '');
    const w = await s.cli(['wait', 'lr0.1-s1', 'lr0.1-s2', ids[3]]);
    assert.equal(w.code, 0, w.stderr);
    assert.equal((await s.cli(['retry', 'lr0.01-s1'])).code, 0);
    fs.writeFileSync(path.join(s.dir, `go.${ids[2]}`), '');
    await untilState(s, ids[2], 'done');
    // The dashboard's API has it, and its text filter finds jobs by name.
    assert.equal((await s.job(ids[1])).name, 'lr0.1-s2');
    const page = await socketOp(s.dataDir, { op: 'jobs', text: 'lr0.01' });
    assert.deepEqual(page.rows.map((j: any) => j.id).sort(), [Number(ids[2]), Number(ids[3])].sort());
  });

  test('a queued --on-worker job with --name and --workdir survives kill -9 of the server (journal) and a snapshot, and then runs on its worker', { timeout: 60_000 }, async (t) => {
    const dir = testDir(t);
    const home = path.join(dir, 'home');
    fs.mkdirSync(path.join(home, 'wd'), { recursive: true });
    let s = await startServer({ dir, env: { HOME: home, DJS_SNAPSHOT_MIN_BYTES: '1' } });
    const a = (await s.ok(['add_job', '--on-worker', '--name', 'kept', '--workdir', '~/wd', 'sh', '-c', 'pwd > out.$JOB_ID'])).trim();
    await s.crash();
    s = await startServer({ dir, env: { HOME: home } });
    let job = await s.job(a);
    assert.deepEqual([job.onWorker, job.workdir, job.name, job.script], [true, '~/wd', 'kept', 'sh']);
    // Past DJS_SNAPSHOT_MIN_BYTES the next change writes a snapshot; the job is in it.
    const b = (await s.ok(['add_job', '--on-worker', '--name', 'kept2', 'sh', '-c', 'pwd > out.$JOB_ID'])).trim();
    await s.stop();
    assert.ok(fs.existsSync(path.join(s.dataDir, 'snapshot')), 'a snapshot was written');
    assert.match(fs.readFileSync(path.join(s.dataDir, 'snapshot'), 'utf8'), /"onWorker":true,"workdir":"~\/wd","name":"kept"/);
    s = await startServer({ dir, env: { HOME: home } });
    job = await s.job(a);
    assert.deepEqual([job.onWorker, job.workdir, job.name], [true, '~/wd', 'kept']);
    await workers(s.dataDir, ['local1']);
    await untilState(s, a, 'done');
    await untilState(s, b, 'done');
    assert.equal(fs.readFileSync(path.join(home, 'wd', `out.${a}`), 'utf8'), path.join(home, 'wd') + '\n');
    assert.equal(fs.readFileSync(path.join(dir, `out.${b}`), 'utf8'), dir + '\n');
  });

  test('POST /api/add_jobs takes onWorker, workdir and name; a bare script name there is found on the server\'s PATH', async (t) => {
    const s = await serve(t, { args: ['--http', '0'] });
    const m = /^(http:\/\/127\.0\.0\.1:\d+)\/#token=([0-9a-f]+)$/.exec((await s.ok(['dashboard'])).trim());
    assert.ok(m);
    const post = async (body: object) => {
      const r = await fetch(`${m[1]}/api/add_jobs`, { method: 'POST', headers: { Authorization: `Bearer ${m[2]}`, 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
      return { status: r.status, json: await r.json() as any };
    };
    fs.mkdirSync(path.join(s.dir, 'wd'));
    const a = await post({ cwd: s.dir, jobs: [['sh', '-c', 'pwd -P > out.$JOB_ID']], onWorker: true, workdir: path.join(s.dir, 'wd'), name: 'api{1}', sweep: [['x']] });
    assert.equal(a.status, 200, JSON.stringify(a.json));
    const b = await post({ cwd: s.dir, jobs: [['echo', 'from', 'PATH']] });
    assert.equal(b.status, 200, JSON.stringify(b.json));
    const bad = await post({ cwd: s.dir, jobs: [['/bin/true']], workdir: '/tmp' });
    assert.equal(bad.status, 400, JSON.stringify(bad.json));
    assert.match(bad.json.error, /--workdir is for --on-worker/);
    await workers(s.dataDir, ['local1:2']);
    assert.equal((await s.cli(['wait'])).code, 0);
    assert.equal(fs.readFileSync(path.join(s.dir, 'wd', `out.${a.json.first}`), 'utf8'), fs.realpathSync(path.join(s.dir, 'wd')) + '\n');
    assert.equal((await s.job(a.json.first)).name, 'apix');
    assert.equal(path.basename((await s.job(b.json.first)).script), 'echo');
    assert.equal(fs.readFileSync(path.join(s.logDir, `${b.json.first}.log`), 'utf8'), 'from PATH\n');
  });

  test('the watcher notices its command end every time: 400 short commands, 40 at once, none left waiting', { timeout: 120_000 }, async () => {
    // A child that ends just before the watcher sleeps in poll must not be missed (its
    // SIGCHLD handler runs only between perl ops).
    const input = onWorkerInput(['true'], [], '/', 1);
    const one = () => new Promise<number>((resolve) => {
      const c = spawn('sh', ['-c', ON_WORKER_LINE], { stdio: ['pipe', 'pipe', 'pipe'] });
      c.stdin!.end(input);
      const timer = setTimeout(() => { c.kill('SIGKILL'); resolve(-1); }, 10_000);
      c.on('exit', (code) => { clearTimeout(timer); resolve(code ?? -2); });
    });
    const codes: number[] = [];
    for (let i = 0; i < 10; i++) codes.push(...await Promise.all(Array.from({ length: 40 }, one)));
    assert.deepEqual(codes.filter((c) => c !== 0), [], 'every one ended 0 within 10 s');
  });

  test('the remote command line carries every byte but NUL through any login shell here (sh, bash, dash, zsh, fish, tcsh)', async (t) => {
    const dir = testDir(t);
    const words = [...NASTY, '\xff\xfe', 'a\x01b'];
    // The same words as bytes: non-UTF-8 ones reach onWorkerInput as U+DC00+byte (textOf).
    const asText = (w: string) => (w === '\xff\xfe' ? '\udcff\udcfe' : w);
    const asBytes = (w: string) => (w === '\xff\xfe' ? Buffer.from([0xff, 0xfe]) : Buffer.from(w));
    const shells = ['sh', 'bash', 'dash', 'zsh', 'fish', 'tcsh', 'csh'].filter((sh) => spawnSync('sh', ['-c', `command -v ${sh}`]).status === 0);
    assert.ok(shells.length >= 2, `shells here: ${shells.join(' ')}`);
    for (const shell of shells) {
      const out = path.join(dir, `out.${shell}`);
      const input = onWorkerInput(['perl', '-e', REC, out, ...words.map(asText)], ['SLAVE_IP=here', 'ODD=$x "y"\nz'], dir, 1);
      assert.match(input, /^[0-9a-fx ]+$/, 'only hex words');
      const r = spawnSync(shell, ['-c', ON_WORKER_LINE], { cwd: '/', env: { ...process.env, PWD: '/' }, input });
      assert.equal(r.status, 0, `${shell}: ${r.stderr}`);
      const got = fs.readFileSync(out).toString('latin1').split('\0');
      assert.deepEqual(got.slice(1).map((w) => Buffer.from(w, 'latin1')), words.map(asBytes), `${shell}: the words arrive as they were`);
      // The directory is entered (perl's PWD is the one inherited, so ask the kernel).
      const pwd = spawnSync(shell, ['-c', ON_WORKER_LINE], { input: onWorkerInput(['sh', '-c', 'pwd -P; printf %s "$ODD"'], ['ODD=$x "y"\nz'], dir, 1) });
      assert.equal(pwd.stdout.toString(), `${fs.realpathSync(dir)}\n$x "y"\nz`, shell);
    }
    t.diagnostic(`shells: ${shells.join(' ')}`);
  });
});

/** ssh hosts and a server whose ssh reaches them (kill grace 2 s); all of it ends with the test. */
async function setup(t: TestContext, n: number) {
  const hosts = await startHosts(n);
  const s = await serve(t, { env: { DJS_SSH_CONFIG: hosts.sshConfig, DJS_SSH_TIMEOUT: '3', DJS_PROBE_BACKOFF_MAX: '2' }, args: ['--kill-grace', '2'] })
    .catch(async (e) => { await hosts.close(); throw e; });
  t.after(() => hosts.close());
  return { hosts, s };
}

describe('tier 3: --on-worker on real sshd hosts', { skip: sshSkip() }, () => {
  test('the command runs on the host through its shared connection, in the same directory path (or --workdir ~/DIR), every argument byte as given, with the job\'s environment', { timeout: 90_000 }, async (t) => {
    const { hosts, s } = await setup(t, 2);
    const [h0, h1] = hosts.hosts;
    await s.ok(['add_slave', '--gpus', '2', '-e', 'FROM_WORKER=w $v', `${h0.addr}:2`, `${h1.addr}:2`]);
    const before = h0.logins() + h1.logins();
    // Writes HOME (the host's own: its scratch), its directory and its arguments, NUL-separated.
    const rec = `open(my $f, '>', 'rec.' . $ENV{JOB_ID}) or die; binmode $f; chomp(my $d = qx(pwd -P)); print $f join("\\0", $ENV{HOME}, $d, @ARGV)`;
    const words = [...NASTY, '\udcff\udcfe', 'a\x01b'];
    // Through sh, which passes bytes that are not UTF-8 (node would send them as UTF-8).
    const sq = (w: string) => (w === '\udcff\udcfe' ? `"$(printf '\\377\\376')"` : `'${w.replace(/'/g, `'\\''`)}'`);
    const add = `for i in 1 2 3 4 5 6; do "${CLI}" --data-dir "${s.dataDir}" add_job --on-worker -e 'FROM_JOB=j "$x"' --gpus 1 --timeout 90 perl -e ${sq(rec)} ${words.map(sq).join(' ')} || exit; done`;
    const added = spawnSync('sh', ['-c', add], { cwd: s.dir, encoding: 'utf8' });
    assert.equal(added.status, 0, added.stderr);
    const ids = added.stdout.trim().split('\n');
    fs.mkdirSync(path.join(h0.scratch, 'sub'));
    fs.mkdirSync(path.join(h1.scratch, 'sub'));
    const show = 'env > "env.$JOB_ID"';
    const inHome = (await s.ok(['add_job', '--on-worker', '--workdir', '~/sub', '--host', h1.addr, 'sh', '-c', show])).trim();
    const here = (await s.ok(['add_job', '--on-worker', '--host', h0.addr, 'sh', '-c', show])).trim();
    const w = await s.cli(['wait']);
    assert.equal(w.code, 0, w.stderr + (await s.ok(['list'])));
    const bytes = (w: string) => (w === '\udcff\udcfe' ? Buffer.from([0xff, 0xfe]) : Buffer.from(w));
    for (const id of ids) {
      const job = await s.job(id);
      const got = fs.readFileSync(path.join(s.dir, `rec.${id}`)).toString('latin1').split('\0');
      const host = hosts.hosts.find((h) => h.addr === job.worker)!;
      assert.equal(got[0], host.scratch, 'run by the host\'s sshd (HOME is its scratch)');
      assert.equal(got[1], fs.realpathSync(s.dir), 'in the directory it was queued in');
      assert.deepEqual(got.slice(2).map((x) => Buffer.from(x, 'latin1')), words.map(bytes), `job ${id}: every argument as given`);
    }
    const envOf = (file: string) => new Map(fs.readFileSync(file, 'utf8').split('\n').map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
    const e1 = envOf(path.join(h1.scratch, 'sub', `env.${inHome}`));
    assert.equal(e1.get('PWD'), path.join(h1.scratch, 'sub'), '--workdir ~/sub is in the host\'s home');
    const e0 = envOf(path.join(s.dir, `env.${here}`));
    const job = await s.job(here);
    assert.deepEqual(['JOB_ID', 'SLAVE_IP', 'SLAVE_SLOT', 'SLAVE_SLOTS', 'SLAVE_GPUS', 'JOB_ATTEMPT', 'JOB_TIMEOUT', 'FROM_WORKER', 'CUDA_VISIBLE_DEVICES', 'DJS_TEST_HOSTS'].map((n) => e0.get(n)),
      [here, h0.addr, String(job.slot), String(job.slot), '', '1', '0', 'w $v', undefined, hosts.dir]);
    const gpuJob = await s.job(ids[0]);
    assert.equal(e0.get('DJS_SSH_SHARED_CONFIG'), undefined, 'no path of this machine');
    // One job of the GPU ones, again, printing its environment.
    const g = (await s.ok(['add_job', '--on-worker', '--gpus', '2', '-e', 'FROM_JOB=j "$x"', '--host', h1.addr, 'sh', '-c', show])).trim();
    await untilState(s, g, 'done', 30_000);
    const eg = envOf(path.join(s.dir, `env.${g}`));
    assert.deepEqual([eg.get('SLAVE_GPUS'), eg.get('CUDA_VISIBLE_DEVICES'), eg.get('FROM_JOB'), eg.get('SLAVE_IP')], ['0,1', '0,1', 'j "$x"', h1.addr]);
    assert.equal(gpuJob.gpus.length, 1);
    // Through the shared connections: a login per connection, not per job.
    const logins = h0.logins() + h1.logins() - before;
    assert.ok(logins <= 4, `${logins} logins for ${ids.length + 3} jobs`);
    // The list says where the command runs.
    assert.match(await s.ok(['list']), new RegExp(`^\\s+${here}\\s+done\\s+${h0.addr.replace(/\./g, '\\.')} .* --on-worker sh -c `, 'm'));
  });

  test('exit codes come back (255 as 254: not a worker failure); a --workdir missing on the host fails the job and says so', { timeout: 60_000 }, async (t) => {
    const { hosts, s } = await setup(t, 1);
    const h = hosts.hosts[0].addr;
    await s.ok(['add_slave', `${h}:2`]);
    const three = (await s.ok(['add_job', '--on-worker', 'sh', '-c', 'echo out; echo err >&2; exit 3'])).trim();
    const ff = (await s.ok(['add_job', '--on-worker', 'sh', '-c', 'exit 255'])).trim();
    const nodir = (await s.ok(['add_job', '--on-worker', '--workdir', '/no/such/dir', 'true'])).trim();
    const nocmd = (await s.ok(['add_job', '--on-worker', 'no-such-command-djs'])).trim();
    assert.equal((await untilState(s, three, 'failed', 30_000)).exitCode, 3);
    assert.equal(fs.readFileSync(path.join(s.logDir, `${three}.log`), 'utf8'), 'out\nerr\n');
    const j = await untilState(s, ff, 'failed', 30_000);
    assert.deepEqual([j.exitCode, j.attempts], [254, 1]);
    assert.equal((await untilState(s, nodir, 'failed', 30_000)).exitCode, 1);
    assert.match(fs.readFileSync(path.join(s.logDir, `${nodir}.log`), 'utf8'), new RegExp(`djs: cannot enter /no/such/dir on ${h.replace(/\./g, '\\.')}: No such file`));
    assert.equal((await untilState(s, nocmd, 'failed', 30_000)).exitCode, 127);
    // What the command leaves running in its group ends with it (else the ssh session
    // would wait for it to close its output).
    const left = (await s.ok(['add_job', '-e', 'DJS_ONW_MARK=left', '--on-worker', 'sh', '-c', 'sleep 600 & echo started'])).trim();
    await untilState(s, left, 'done', 30_000);
    assert.equal(fs.readFileSync(path.join(s.logDir, `${left}.log`), 'utf8'), 'started\n');
    await until(() => withEnv('DJS_ONW_MARK=left', `DJS_TEST_HOSTS=${hosts.dir}`).length === 0, 'the sleep it left to end', 10_000);
  });

  test('kill, a TERM-deaf command, --timeout, a killed master connection and remove_slave --kill leave no process of the command on the host', { timeout: 120_000 }, async (t) => {
    const { hosts, s } = await setup(t, 1);
    const h = hosts.hosts[0];
    await s.ok(['add_slave', `${h.addr}:6`]);
    const mark = (k: string) => `DJS_ONW_MARK=${k}`;
    const remote = (k: string) => withEnv(mark(k), `DJS_TEST_HOSTS=${hosts.dir}`);
    const add = async (k: string, ...args: string[]) => (await s.ok(['add_job', '-e', mark(k), ...args])).trim();
    const killed = await add('kill', '--on-worker', 'sh', '-c', 'sleep 600 & sleep 600; wait');
    const deaf = await add('deaf', '--on-worker', 'perl', '-e', '$SIG{TERM} = "IGNORE"; sleep 600');
    const timed = await add('timeout', '--timeout', '3', '--on-worker', 'sleep', '600');
    const lost = await add('lost', '--on-worker', 'sleep', '600');
    const gone = await add('gone', '--on-worker', 'sleep', '600');
    for (const k of ['kill', 'deaf', 'timeout', 'lost', 'gone']) await until(() => remote(k).length > 0 || null, `the ${k} command to run on the host`, 30_000);
    assert.equal(remote('kill').length, 3, 'sh and its two sleeps');
    // The job's settings are in no argument list, here or there (ps shows those to anyone).
    const secret = Buffer.from(mark('kill')).toString('hex');
    const shown = allPids().filter((p) => { try { return fs.readFileSync(`/proc/${p}/cmdline`, 'latin1').includes(secret); } catch { return false; } });
    assert.deepEqual(shown, [], 'no process shows the -e setting in its arguments');
    // kill: everything it started ends, well within the grace.
    let t0 = Date.now();
    await s.ok(['kill', killed, deaf]);
    await until(() => remote('kill').length === 0, 'the killed command to end on the host', 10_000);
    assert.ok(Date.now() - t0 < 2000, `ended in ${Date.now() - t0} ms`);
    await untilState(s, killed, 'killed');
    // A command that ignores SIGTERM gets SIGKILL after the kill grace (2 s).
    await until(() => remote('deaf').length === 0, 'the TERM-deaf command to end on the host', 10_000);
    assert.ok(Date.now() - t0 >= 1500, `SIGKILL came after the grace (${Date.now() - t0} ms)`);
    await untilState(s, deaf, 'killed');
    // --timeout
    await untilState(s, timed, 'failed', 30_000);
    assert.equal((await s.job(timed)).reason, 'timeout after 3s');
    assert.deepEqual(remote('timeout'), []);
    // The master connection dies: every command on it ends; the jobs go back to the queue
    // (ssh exits 255) and run again.
    const first = [...remote('lost'), ...remote('gone')];
    assert.equal(first.length, 2);
    const ctl = controlDirFor(s.dataDir, process.getuid!(), process.env.TMPDIR || '/tmp');
    const master = allPids().find((p) => { try { return /^ssh: .*\[mux\]/.test(fs.readFileSync(`/proc/${p}/cmdline`, 'utf8')) && fs.readFileSync(`/proc/${p}/cmdline`, 'utf8').includes(ctl); } catch { return false; } });
    assert.ok(master, `the master connection of ${ctl}`);
    process.kill(master, 'SIGKILL');
    t0 = Date.now();
    await until(() => first.every((p) => !fs.existsSync(`/proc/${p}`) || /^\S+ \(.*\) Z/.test(fs.readFileSync(`/proc/${p}/stat`, 'latin1'))), 'the commands on the dead master to end', 10_000);
    assert.ok(Date.now() - t0 < 2000, `ended in ${Date.now() - t0} ms`);
    await until(async () => (await s.job(lost)).attempts === 2 && (await s.job(gone)).attempts === 2 && remote('lost').length === 1 && remote('gone').length === 1, 'both to run again', 30_000);
    assert.match((await s.job(lost)).history[0].reason ?? 'exit 255', /255|worker/);
    // remove_slave --kill: requeued, nothing left on the host.
    await s.ok(['remove_slave', '--kill', h.addr]);
    await until(() => remote('lost').length + remote('gone').length === 0, 'the commands of the removed worker to end', 10_000);
    assert.equal((await s.job(gone)).state, 'waiting');
    await s.ok(['kill', lost, gone]);
  });
});

describe('tier 3: --on-worker on a real Slurm, here and through a login host', { skip: slurmSkip() || sshSkip(), concurrency: 1 }, () => {
  let slurm: TestSlurm;
  let hosts: TestHosts;
  before(async () => {
    [slurm, hosts] = await Promise.all([startSlurm({ cpus: 4 }), startHosts(1)]);
    // 127.0.0.2 is the cluster's login host: its sessions find this Slurm (its bin first on PATH).
    const bin = path.join(hosts.hosts[0].scratch, 'bin');
    fs.mkdirSync(bin);
    for (const cmd of ['sinfo', 'srun', 'scancel', 'squeue']) {
      fs.writeFileSync(path.join(bin, cmd), `#!/bin/sh\nSLURM_CONF=${slurm.env.SLURM_CONF} exec /usr/bin/${cmd} "$@"\n`, { mode: 0o755 });
    }
  });
  after(async () => { await Promise.all([slurm?.close(), hosts?.close()]); });

  const server = (t: TestContext, remote: boolean) =>
    serve(t, { env: { ...(remote ? {} : slurm.env), DJS_SSH_CONFIG: hosts.sshConfig, DJS_SSH_TIMEOUT: '5', DJS_SLURM_CHECK: '5' }, args: ['--kill-grace', '3'] });
  const show = 'echo "$SLURM_JOB_NAME $SLURM_CPUS_PER_TASK $JOB_ID $FROM_JOB"; pwd -P';

  for (const remote of [false, true]) {
    test(`${remote ? 'through a login host over ssh' : 'here'}: the command runs in srun (its name, CPUs, directory and environment); kill leaves no Slurm job`, { timeout: 120_000 }, async (t) => {
      const s = await server(t, remote);
      const worker = remote ? `slurm:debug@${hosts.hosts[0].addr}` : 'slurm:debug';
      await s.ok(['add_slave', `${worker}:2`]);
      const id = (await s.ok(['add_job', '--on-worker', '--slots', '2', '-e', 'FROM_JOB=a b', 'sh', '-c', show])).trim();
      await untilState(s, id, 'done', 60_000);
      assert.equal(fs.readFileSync(path.join(s.logDir, `${id}.log`), 'utf8'), `djs-${id} 2 ${id} a b\n${fs.realpathSync(s.dir)}\n`);
      const long = (await s.ok(['add_job', '--on-worker', '--timeout', '600', 'sleep', '600'])).trim();
      await until(async () => (await slurm.jobNames()).includes(`djs-${long}`), `Slurm to run djs-${long}`, 60_000);
      const q = await slurm.client('squeue', ['--noheader', '--format=%j %l']);
      assert.match(q.stdout, new RegExp(`djs-${long} 10:00`), 'its --timeout is the time limit');
      await s.ok(['kill', long]);
      await untilState(s, long, 'killed', 30_000);
      await until(async () => (await slurm.jobNames()).length === 0 || null, 'no Slurm job left', 30_000);
    });
  }
});
