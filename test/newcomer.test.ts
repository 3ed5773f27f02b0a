// What a newcomer meets in the first hour: settings that stick, commands that find their
// server, help that helps, and no silent hangs. Tier 1 (the pure parts: settings,
// waiting reasons, the progress line, suggestions, list's EXIT column, retry delays,
// $'...' quoting) and tier 2 (real servers and clients).
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import {
  bytesOf, undocumentedOptions, exitColumn, formatStatus, statusView, formatDuration, formatProgress, idRanges, jobView, nearest, newRuntime, newState, plan,
  resolveSettings, SETTINGS, splitWords, VERSION, whyWaiting, type WaitCounts,
} from '../cli.ts';
import {
  addJob, addWorkers, apply, GATED, release, ROOT, runCli, serve, spawnCli, socketClients, testDir, until, untilState, within,
  writeScript,
} from './server.ts';

const T0 = Date.UTC(2025, 0, 1, 12, 0, 0);

// ---- tier 1 -----------------------------------------------------------------------

describe('settings', () => {
  test('given beats kept beats initial; paths become absolute; what changed is named', () => {
    const first = resolveSettings(null, { DJS_LOG_DIR: 'rel/logs' });
    assert.equal(first.values.DJS_LOG_DIR, path.resolve('rel/logs'));
    assert.equal(first.values.DJS_KILL_GRACE, '10');
    assert.equal(first.values.DJS_SSH_CONFIG, '');
    assert.deepEqual(first.changed, [], 'a first start changes nothing');
    assert.deepEqual(Object.keys(first.values), SETTINGS.map((s) => s.env));

    const kept = { ...first.values, DJS_SSH_CONFIG: '/etc/ssh/lab', DJS_KILL_GRACE: '3' };
    const again = resolveSettings(kept, {});
    assert.deepEqual(again.values, kept, 'a start given nothing runs with what was kept');
    assert.deepEqual(again.changed, []);

    const changed = resolveSettings(kept, { DJS_SSH_CONFIG: '', DJS_KILL_GRACE: '7' });
    assert.equal(changed.values.DJS_SSH_CONFIG, '', 'an empty value given is a value');
    assert.deepEqual(changed.changed.map((c) => c[0]), ['kill grace (s)', 'ssh config']);
    assert.throws(() => resolveSettings(kept, { DJS_SSH_TIMEOUT: 'soon' }), /invalid DJS_SSH_TIMEOUT 'soon'/);
  });
});

describe('wait', () => {
  test('whyWaiting names what holds waiting jobs back: no workers, all down, paused starts, a pause', () => {
    const st = newState();
    const rt = newRuntime();
    assert.equal(whyWaiting(st, rt, T0), null, 'nothing waits');
    apply(st, { e: 'add', t: T0, id: 1, cwd: '/w', retries: 0, timeout: 0, jobs: [['/bin/true']] });
    assert.match(String(whyWaiting(st, rt, T0)), /no workers: add some with add_slave/);
    apply(st, { e: 'worker', t: T0, host: 'a', slots: 1, ssh: true }, { e: 'probe', t: T0, host: 'a', ok: false, err: 'refused' });
    assert.match(String(whyWaiting(st, rt, T0)), /all 1 worker is down/);
    apply(st, { e: 'probe', t: T0, host: 'a', ok: true });
    assert.equal(whyWaiting(st, rt, T0), null, 'a worker is up');
    rt.startsPausedUntil = T0 + 1000;
    assert.match(String(whyWaiting(st, rt, T0)), /starts pause/);
    apply(st, { e: 'pause', t: T0 });
    assert.match(String(whyWaiting(st, rt, T0)), /^paused: resume with cli\.ts resume$/);
  });

  test('idRanges packs ids into ascending [first, last] ranges', () => {
    assert.deepEqual(idRanges([]), []);
    assert.deepEqual(idRanges([7, 3, 4, 5, 9, 10, 1]), [[1, 1], [3, 5], [7, 7], [9, 10]]);
  });

  test('the progress line fits the width it is given, and says why jobs wait', () => {
    const c: WaitCounts = { waiting: 1234, running: 16, done: 20_000, failed: 12, killed: 3, total: 21_265, missing: 0 };
    for (const width of [200, 98, 79, 60, 40, 20]) {
      const line = formatProgress(c, 12.5, null, width);
      assert.ok(line.length <= width, `${line.length} > ${width}: ${line}`);
      assert.match(line, /^20015\/21265/);
    }
    assert.match(formatProgress(c, 12.5, null, 200), /20015\/21265 finished: 20000 done, 12 failed, 3 killed, 16 running, 1234 waiting — 12.5 jobs\/s, about 1m40s left/);
    assert.match(formatProgress(c, 0, 'no workers: add some with add_slave', 200), /waiting: no workers: add some with add_slave$/);
  });
});

describe('help and suggestions', () => {
  test('nearest finds typos and - for _, and nothing for far words', () => {
    const names = ['status', 'start', 'stop', 'add_job', 'add_jobs', 'add_slave', 'wait', 'list'];
    assert.equal(nearest('stauts', names), 'status');
    assert.equal(nearest('add-job', names), 'add_job');
    assert.equal(nearest('ADD-SLAVE', names), 'add_slave');
    assert.equal(nearest('frobnicate', names), undefined);
  });

  test('every command has help with its options and an example', () => {
    // Every option of every command is described (undocumentedOptions lists what is not).
    assert.deepEqual(undocumentedOptions(), []);
  });

  test('the header of cli.ts, help and the README name every setting and the new options', async () => {
    const cli = fs.readFileSync(path.join(ROOT, 'cli.ts'), 'utf8');
    const header = cli.slice(0, cli.indexOf('*/', cli.indexOf('djs — ')));
    const readme = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
    const help = (await runCli(['help'])).stdout;
    const forms: [string, string][] = [...SETTINGS.map((s): [string, string] => [s.env, s.env]), ['--retry-delay', '--retry-delay'], ['--version', '--version'], ['--all]', '--all'], ['--state S]...', '--state']];
    for (const [name, plain] of forms) {
      assert.ok(header.includes(name) || header.includes(plain), `the header names ${name}`);
      assert.ok(readme.includes(plain), `the README names ${plain}`);
      if (name.startsWith('DJS_')) assert.ok(help.includes(name), `help names ${name}`);
    }
  });

  test('the version is package.json\'s', () => {
    assert.equal(VERSION, JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')).version);
  });
});

describe('status', () => {
  test('the columns after the slot bars line up whatever the slot counts', () => {
    const st = newState();
    apply(st, { e: 'worker', t: T0, host: 'a', slots: 1, ssh: false }, { e: 'worker', t: T0, host: 'bb', slots: 8, ssh: false });
    const text = formatStatus(statusView(st), T0, false);
    const cols = text.split('\n').filter((l) => /^  (a|bb) /.test(l)).map((l) => l.indexOf('up'));
    assert.equal(cols.length, 2);
    assert.equal(cols[0], cols[1], text);
  });
});

describe('list and durations', () => {
  const baseJob = (over: Record<string, unknown>) => {
    const st = newState();
    apply(st, { e: 'add', t: T0, id: 7, cwd: '/', retries: 0, timeout: 0, jobs: [['/j.sh']] });
    const job = { ...st.jobs.get(7)!, state: 'failed' as const, run: 1, worker: 'a', slot: 0, startedAt: T0, endedAt: T0 + 1000, exitCode: 1 };
    return { ...jobView(st, job, T0 + 2000), ...over };
  };

  test('the EXIT column says why a job failed where its exit code does not', () => {
    assert.equal(exitColumn(baseJob({}), T0), '1');
    assert.equal(exitColumn(baseJob({ exitCode: 143, reason: 'timeout after 60s' }), T0), 'timeout');
    assert.equal(exitColumn(baseJob({ exitCode: 255, reason: 'exit 255 (worker failure) 5 times' }), T0), 'exit 255 x5');
    assert.equal(exitColumn(baseJob({ exitCode: null, reason: 'lost: its process ended and no exit code was recorded' }), T0), 'lost');
    assert.equal(exitColumn(baseJob({ exitCode: null, reason: 'dependency 7 failed' }), T0), 'dependency 7 failed');
    assert.equal(exitColumn(baseJob({ state: 'done', exitCode: 0 }), T0), '0');
    assert.equal(exitColumn(baseJob({ state: 'waiting', exitCode: 1, retryAt: new Date(T0 + 4000).toISOString() }), T0), 'retry 4.0s');
  });

  test('durations: tenths below ten seconds, never 10.0s', () => {
    assert.equal(formatDuration(9_940), '9.9s');
    assert.equal(formatDuration(9_960), '10s');
    assert.equal(formatDuration(10_000), '10s');
    assert.equal(formatDuration(59_400), '59s');
  });
});

describe('retries wait', () => {
  test('a retry waits --retry-delay, doubling; plan names when it is due; worker failures do not wait', () => {
    const st = newState();
    apply(st, { e: 'worker', t: T0, host: 'a', slots: 1, ssh: false },
      { e: 'add', t: T0, id: 1, cwd: '/w', retries: 2, timeout: 0, jobs: [['/j']], retryDelay: 3 });
    const rt = newRuntime();
    const startNow = (now: number) => { const p = plan(st, rt, now, 1000); apply(st, ...p.events); return p; };
    assert.equal(startNow(T0).events.length, 1);
    apply(st, { e: 'end', t: T0 + 100, id: 1, run: 1, code: 1 });
    let p = startNow(T0 + 100);
    assert.deepEqual(p.events, [], 'not at once');
    assert.equal(p.next, T0 + 100 + 3000, 'plan wakes when the retry is due');
    assert.equal(startNow(T0 + 3100).events.length, 1, 'started after 3 s');
    apply(st, { e: 'end', t: T0 + 4000, id: 1, run: 2, code: 1 });
    p = startNow(T0 + 4000 + 5999);
    assert.deepEqual(p.events, [], 'the second retry waits twice as long');
    assert.equal(p.next, T0 + 4000 + 6000);
    startNow(T0 + 10_000);
    apply(st, { e: 'end', t: T0 + 11_000, id: 1, run: 3, code: 255 });
    assert.equal(startNow(T0 + 11_000).events.length, 1, 'a worker failure is requeued at once');
  });
});

describe('$\'...\' in add_jobs lines', () => {
  test('what bash printf %q writes for any file name reads back as that name', () => {
    const names = ['run 1.txt', "it's.txt", 'a\nb.txt', 'tab\there', 'é ü', '$HOME', '*', 'x"y', '\x01ctl', 'back\\slash', '-x', '😀\n.txt'];
    for (const locale of ['C', 'C.UTF-8']) {
      const env = { LC_ALL: locale, PATH: process.env.PATH };
      const lines = execFileSync('bash', ['--norc', '-c', 'printf "./job.sh %q\\n" "$@"', 'bash', ...names], { env }).toString().split('\n').filter(Boolean);
      assert.deepEqual(lines.map((l) => splitWords(l)[1]), names, `locale ${locale}: ${JSON.stringify(lines)}`);
    }
    assert.deepEqual(splitWords("$'\\x41\\102\\u00e9\\n' plain"), ['AB\u00e9\n', 'plain']);
    assert.throws(() => splitWords("$'open"), /unterminated/);
    // A name that is not UTF-8 (Latin-1 é), as printf %q writes it in any locale: its bytes.
    assert.deepEqual(bytesOf(splitWords("$'\\351t\\351.txt'")[0]), Buffer.from([0xe9, 0x74, 0xe9, ...Buffer.from('.txt')]));
  });
});

// ---- tier 2 -----------------------------------------------------------------------

/** The client without --data-dir, as a user types it: in `cwd`, no DJS_DATA_DIR. */
function bare(args: string[], cwd: string, env: NodeJS.ProcessEnv = {}) {
  const { DJS_DATA_DIR: _d, DJS_SSH_CONFIG: _c, DJS_SSH_OPTIONS: _o, DJS_LOG_DIR: _l, DJS_KILL_GRACE: _k, ...rest } = process.env;
  return runCli(args, { cwd, env: { ...rest, ...env }, timeoutMs: 30_000 });
}
const statusJson = async (cwd: string) => {
  const r = await bare(['status', '--json'], cwd);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout);
};

describe('settings that stick, commands that find their server', () => {
  test('start keeps its settings in the data dir; the next start, from anywhere, runs with them; status shows them; a change is named; jobs get the ssh settings', { timeout: 60_000 }, async (t) => {
    const dir = testDir(t);
    const sub = path.join(dir, 'a', 'b');
    fs.mkdirSync(sub, { recursive: true });
    const cfg = path.join(dir, 'lab_config');
    fs.writeFileSync(cfg, 'Host node1\n  HostName 127.0.0.1\n  Port 1\n');
    const first = await bare(['start', '--detach', '--kill-grace', '3'], dir, { DJS_SSH_CONFIG: 'lab_config', DJS_SSH_OPTIONS: '-o LogLevel=ERROR' });
    assert.equal(first.code, 0, first.stderr);
    assert.doesNotMatch(first.stdout, /settings changed/, 'a first start changes nothing');
    let st = await statusJson(sub);
    assert.equal(st.server.dataDir, path.join(dir, '.data'), 'found from a subdirectory');
    assert.deepEqual(
      [st.server.settings.DJS_LOG_DIR, st.server.settings.DJS_KILL_GRACE, st.server.settings.DJS_SSH_CONFIG, st.server.settings.DJS_SSH_OPTIONS],
      [path.join(dir, 'logs'), '3', cfg, '-o LogLevel=ERROR'], 'paths kept absolute');
    const human = await bare(['status'], sub);
    assert.match(human.stdout, new RegExp(`DJS_SSH_CONFIG=${cfg.replace(/[.]/g, '\\.')}`));
    assert.equal((await bare(['stop'], sub)).code, 0);

    // Started again from a subdirectory, with none of it given: the same settings, the same
    // log dir; jobs see the kept ssh settings though the server's shell has none.
    const again = await bare(['start', '-d'], sub);
    assert.equal(again.code, 0, again.stderr);
    assert.doesNotMatch(again.stdout, /settings changed/);
    assert.match(again.stdout, new RegExp(`logs ${path.join(dir, 'logs')}`));
    st = await statusJson(dir);
    assert.equal(st.server.settings.DJS_SSH_CONFIG, cfg);
    assert.equal(st.server.settings.DJS_KILL_GRACE, '3');
    writeScript(dir, 'env.sh', 'env > "env.$JOB_ID"; echo "log of $JOB_ID"');
    assert.equal((await bare(['add_slave', '--skip_ssh_auth_check', 'w1'], sub)).code, 0);
    const id = (await bare(['add_job', '../../env.sh'], sub)).stdout.trim();
    assert.equal((await bare(['wait', id], sub)).code, 0);
    const env = fs.readFileSync(path.join(sub, `env.${id}`), 'utf8');
    assert.match(env, new RegExp(`^DJS_SSH_CONFIG=${cfg}$`, 'm'));
    assert.match(env, /^DJS_SSH_OPTIONS=-o LogLevel=ERROR$/m);
    const log = await bare(['log', id], path.join(dir, 'a'));
    assert.equal(log.stdout, `log of ${id}\n`, 'log finds the log in the kept log dir');
    assert.equal((await bare(['stop'], dir)).code, 0);

    // Given again, differently: the start says what changed; an empty value drops one.
    const changed = await bare(['start', '-d'], dir, { DJS_SSH_CONFIG: '', DJS_KILL_GRACE: '5' });
    assert.equal(changed.code, 0, changed.stderr);
    assert.match(changed.stdout, new RegExp(`settings changed: kill grace \\(s\\) was 3, now 5; ssh config was ${cfg.replace(/[.]/g, '\\.')}, now ''`));
    st = await statusJson(dir);
    assert.equal(st.server.settings.DJS_SSH_CONFIG, '');
    assert.equal((await bare(['stop'], dir)).code, 0);
  });

  test('jobs get the ssh settings the server runs with, kept or given, and none that were dropped', { timeout: 60_000 }, async (t) => {
    const dir = testDir(t);
    const cfg = path.join(dir, 'lab_config');
    fs.writeFileSync(cfg, '');
    writeScript(dir, 'env.sh', 'env > "env.$JOB_ID"');
    const envOf = async (s: Awaited<ReturnType<typeof serve>>) => {
      const id = await addJob(s, './env.sh');
      await untilState(s, id, 'done');
      return fs.readFileSync(path.join(dir, `env.${id}`), 'utf8');
    };
    let s = await serve(t, { dir, env: { DJS_SSH_CONFIG: cfg, DJS_SSH_TIMEOUT: '4' } });
    await addWorkers(s, 'w1');
    await s.stop();
    // Restarted from a shell without them: jobs still get them.
    s = await serve(t, { dir, env: { DJS_SSH_CONFIG: undefined, DJS_SSH_TIMEOUT: undefined } });
    const kept = await envOf(s);
    assert.match(kept, new RegExp(`^DJS_SSH_CONFIG=${cfg.replace(/[.]/g, '\\.')}$`, 'm'));
    assert.match(kept, /^DJS_SSH_TIMEOUT=4$/m);
    await s.stop();
    // Dropped (given empty): jobs do not get it, not even the empty variable.
    s = await serve(t, { dir, env: { DJS_SSH_CONFIG: '' } });
    assert.doesNotMatch(await envOf(s), /^DJS_SSH_CONFIG=/m);
  });

  test('add_slave checks logins with the server\'s kept ssh settings, not the client\'s, and its error shows the ssh command to run by hand', { timeout: 60_000 }, async (t) => {
    const dir = testDir(t);
    const cfg = path.join(dir, 'lab_config');
    // node1 is port 1 of this machine: refused. Without this config, ssh cannot even resolve it.
    fs.writeFileSync(cfg, 'Host node1\n  HostName 127.0.0.1\n  Port 1\n');
    assert.equal((await bare(['start', '-d'], dir, { DJS_SSH_CONFIG: cfg, DJS_SSH_TIMEOUT: '3' })).code, 0);
    assert.equal((await bare(['stop'], dir)).code, 0);
    assert.equal((await bare(['start', '-d'], dir)).code, 0, 'restarted from a shell without the variables');
    const r = await bare(['add_slave', 'node1:2'], dir, { DJS_SSH_CONFIG: '/nonexistent' });
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /ssh login check failed for 'node1' \(.*port 1: Connection refused\)/, 'the kept config was used');
    assert.match(r.stderr, new RegExp(`note: the server checks with DJS_SSH_CONFIG=${cfg.replace(/[.]/g, '\\.')}, not this shell's /nonexistent`));
    const by = /^hint: the server ran: (ssh .*)$/m.exec(r.stderr);
    assert.ok(by, `the hint names the ssh command: ${r.stderr}`);
    // The login check rides the worker's shared connection, whose config file includes the
    // kept ssh config (with sharing off, it is the kept config itself).
    const shown = new RegExp(`-o BatchMode=yes -o ConnectTimeout=3 .*-F (\\S+) -- node1 true$`).exec(by[1]);
    assert.ok(shown, by[1]);
    assert.ok(shown[1] === cfg || fs.readFileSync(shown[1], 'utf8').includes(`Include ${cfg}`), `${shown[1]} is the kept ssh config or includes it`);
    // Run by hand, it fails the same way.
    const byHand = execFileSync('sh', ['-c', `${by[1]} 2>&1 || true`]).toString();
    assert.match(byHand, /port 1: Connection refused/);
    assert.equal((await statusJson(dir)).workers.length, 0);
    assert.equal((await bare(['stop'], dir)).code, 0);
  });

  test('every "no server" error names the data dir it looked for; a data dir that is a file is no server (exit 3)', async (t) => {
    const dir = testDir(t);
    const r = await bare(['status'], dir);
    assert.equal(r.code, 3);
    assert.match(r.stderr, new RegExp(`no server is running on data dir '${path.join(dir, '.data')}'`));
    const file = path.join(dir, 'afile');
    fs.writeFileSync(file, 'x');
    const f = await bare(['--data-dir', file, 'list'], dir);
    assert.equal(f.code, 3, f.stderr);
    assert.match(f.stderr, /no server is running on data dir '.*afile' \(it is not a directory\)/);
  });

  test('start refuses a data dir it cannot use, at once and with the reason, and changes nothing of the user\'s', { timeout: 60_000 }, async (t) => {
    const dir = testDir(t);
    const home = path.join(dir, 'home');
    fs.mkdirSync(home, { mode: 0o755 });
    fs.chmodSync(home, 0o755);
    fs.writeFileSync(path.join(home, 'notes.txt'), 'mine');
    for (const detach of [[], ['--detach']]) {
      const r = await bare(['--data-dir', home, 'start', ...detach], dir);
      assert.equal(r.code, 1, r.stderr);
      assert.match(r.stderr, /the data dir '.*home' is not empty and was not made by djs \(it holds 'notes\.txt'\)/);
      assert.equal(fs.statSync(home).mode & 0o777, 0o755, 'not chmodded');
      assert.deepEqual(fs.readdirSync(home), ['notes.txt']);
    }
    const file = path.join(dir, 'afile');
    fs.writeFileSync(file, 'x');
    for (const bad of [file, '/proc/nope']) {
      const r = await within(bare(['--data-dir', bad, 'start', '--detach'], dir), 10_000, `start --detach on ${bad} to return`);
      assert.equal(r.code, 1, r.stderr);
      assert.match(r.stderr, /^error: (the data dir .* is not a directory|cannot create the data dir '\/proc\/nope': .*)$/m);
      assert.doesNotMatch(r.stderr, /internal error/);
    }
  });

  test('start --detach: a refused second start leaves the running server\'s log alone; a failed start\'s error is not shown again by the next', { timeout: 60_000 }, async (t) => {
    const dir = testDir(t);
    const data = path.join(dir, '.data');
    fs.mkdirSync(data, { mode: 0o700 });
    fs.writeFileSync(path.join(data, 'journal'), 'garbage\n');
    const broken = await bare(['start', '-d'], dir);
    assert.equal(broken.code, 1);
    assert.match(broken.stderr, /damaged state file/);
    fs.rmSync(path.join(data, 'journal'));
    // Another failure, one without a hint: what it shows is its own, nothing of the last.
    fs.rmSync(path.join(data, 'run'), { recursive: true, force: true });
    fs.writeFileSync(path.join(data, 'run'), '');
    const again = await bare(['start', '-d'], dir);
    assert.equal(again.code, 1);
    assert.deepEqual(again.stderr.split('\n').filter((l) => /^(error|hint)/.test(l)).map((l) => l.replace(/'.*'/, 'X')), ['error: the run dir X is not a directory']);
    fs.rmSync(path.join(data, 'run'));
    const ok = await bare(['start', '-d'], dir);
    assert.equal(ok.code, 0, ok.stderr);
    assert.doesNotMatch(ok.stderr, /error|hint|damaged/, 'nothing of the earlier failures');
    const log = path.join(dir, 'logs', 'server.log');
    const before = fs.readFileSync(log, 'utf8');
    const second = await bare(['start', '-d'], dir);
    assert.equal(second.code, 1);
    assert.match(second.stderr, /a server is already running on data dir '.*' \(pid \d+\)/);
    assert.equal(fs.readFileSync(log, 'utf8'), before, 'the running server\'s log is untouched');
    assert.equal((await bare(['stop'], dir)).code, 0);
  });
});

describe('no silent hangs', () => {
  test('wait and log -f with no server say at once that they wait, for how long, and for which data dir; a server that does not answer is announced within a second', { timeout: 60_000 }, async (t) => {
    const dir = testDir(t);
    const { DJS_DATA_DIR: _d, ...env } = process.env;
    for (const args of [['wait'], ['log', '-f', '1']]) {
      const c = spawnCli(args, { cwd: dir, env });
      await until(() => c.stderr().includes(`the server of data dir '${path.join(dir, '.data')}' is not running (yet); waiting up to 60s for one to answer`), `${args.join(' ')} to say it waits`, 10_000);
      assert.equal(c.exitCode(), undefined, 'it waits');
      c.proc.kill('SIGKILL');
      await c.done;
    }
    // A wait that comes before its server returns once the server answers.
    const early = spawnCli(['wait'], { cwd: dir, env });
    await until(() => /waiting up to 60s/.test(early.stderr()), 'wait to say it waits', 10_000);
    assert.equal((await bare(['start', '-d'], dir)).code, 0);
    const r = await within(early.done, 20_000, 'wait to end once a server answers');
    assert.equal(r.code, 0, r.stderr);
    assert.equal((await bare(['stop'], dir)).code, 0);
    fs.rmSync(path.join(dir, '.data'), { recursive: true });
    // A data dir owned by a live process that never listens: a server stuck starting.
    const data = path.join(dir, '.data');
    fs.mkdirSync(data, { mode: 0o700 });
    const ticks = fs.readFileSync('/proc/self/stat', 'utf8').split(') ')[1].split(' ')[19];
    fs.writeFileSync(path.join(data, 'server.pid'), `${process.pid} ${ticks}\n`);
    const client = spawnCli(['status'], { cwd: dir });
    await until(() => new RegExp(`waiting up to 60s for server ${process.pid}, which is still starting on data dir '${data}'`).test(client.stderr()), 'the client to say it waits', 15_000);
    assert.equal(client.exitCode(), undefined, 'and it waits');
    client.proc.kill('SIGKILL');
    await client.done;
  });

  test('wait says why its jobs do not start (no workers), and add_job says the jobs will wait', { timeout: 30_000 }, async (t) => {
    const s = await serve(t);
    const added = await s.cli(['add_job', '/bin/true']);
    assert.equal(added.code, 0);
    assert.match(added.stderr, /warning: no workers yet: the job waits until you add some with add_slave/);
    const w = spawnCli(['--data-dir', s.dataDir, 'wait'], { cwd: s.dir });
    await until(() => /waiting: no workers: add some with add_slave/.test(w.stderr()), 'wait to say why', 5000);
    await addWorkers(s, 'w1');
    const r = await within(w.done, 10_000, 'wait to end');
    assert.equal(r.code, 0, r.stderr);
  });
});

describe('wait counts the jobs it was called for', () => {
  test('after an earlier batch with failures, a new batch all done makes wait exit 0 with its own counts; --all counts every job; the jobs are the same after a restart', { timeout: 60_000 }, async (t) => {
    let s = await serve(t);
    writeScript(s.dir, 'block.sh', GATED);
    await addWorkers(s, 'w1:4');
    const old = (await s.ok(['add_jobs', '-'], { input: './block.sh 3\n./block.sh\n' })).trim().split('\n');
    for (const id of old) release(s, id);
    assert.equal((await s.cli(['wait', '--all'])).code, 1);
    const batch = (await s.ok(['add_jobs', '-'], { input: './block.sh\n./block.sh\n./block.sh\n' })).trim().split('\n');
    const w = spawnCli(['--data-dir', s.dataDir, 'wait'], { cwd: s.dir });
    await until(() => /finished:/.test(w.stderr()), 'wait to show its progress');
    // The server restarts under it: it asks again for the same three jobs.
    await s.stop();
    s = await s.restart();
    await until(() => socketClients(s.dataDir) === 1, 'wait to reconnect');
    const late = await addJob(s, './block.sh'); // not one wait was called for
    for (const id of batch) release(s, id);
    const r = await within(w.done, 15_000, 'wait to end');
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /3\/3 finished: 3 done, 0 failed, 0 killed\n$/);
    assert.equal((await s.job(late)).state, 'running', 'wait did not wait for a job added after it');
    release(s, late);
    const all = await s.cli(['wait', '--all']);
    assert.equal(all.code, 1);
    assert.match(all.stderr, /6\/6 finished: 5 done, 1 failed/);
  });

  test('a job that ended done and was cleaned away counts as done for a wait on it; wait --all names a paused tag, and elsewhere than a terminal repeats its line every 10 s', { timeout: 60_000 }, async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'block.sh', GATED);
    await addWorkers(s, 'w1:2');
    const [a, b] = (await s.ok(['add_jobs', '-'], { input: './block.sh\n./block.sh\n' })).trim().split('\n');
    const w = spawnCli(['--data-dir', s.dataDir, 'wait', a, b], { cwd: s.dir });
    await until(() => /finished:/.test(w.stderr()), 'wait to show its progress');
    release(s, a);
    await untilState(s, a, 'done');
    assert.match(await s.ok(['clean']), /forgot 1 finished job/);
    release(s, b);
    const r = await within(w.done, 15_000, 'wait to end');
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /2\/2 finished: 2 done, 0 failed, 0 killed\n$/);

    await s.ok(['pause', '--tag', 'later', '--ahead']);
    await s.ok(['add_job', '--tag', 'later', './block.sh']);
    const all = spawnCli(['--data-dir', s.dataDir, 'wait', '--all'], { cwd: s.dir });
    const line = /^1\/2 finished: .* — waiting: tag later is paused: resume with cli\.ts resume --tag later$/gm;
    await until(() => (all.stderr().match(line) ?? []).length >= 1, 'wait --all to name the paused tag', 5000);
    await until(() => (all.stderr().match(line) ?? []).length >= 2, 'the same line again after 10 s', 20_000, 500);
    all.proc.kill();
    await all.done;
  });

  test('wait --tag: the tag\'s jobs as of the call, the same after a restart; a paused tag is named on its progress line', { timeout: 60_000 }, async (t) => {
    let s = await serve(t);
    writeScript(s.dir, 'block.sh', GATED);
    await addWorkers(s, 'w1:4');
    await s.ok(['pause', '--tag', 'sweep', '--ahead']);
    const batch = (await s.ok(['add_jobs', '--tag', 'sweep', '-'], { input: './block.sh\n./block.sh\n' })).trim().split('\n');
    const w = spawnCli(['--data-dir', s.dataDir, 'wait', '--tag', 'sweep'], { cwd: s.dir });
    await until(() => /0\/2 finished: .*waiting: tag sweep is paused: resume with cli\.ts resume --tag sweep/.test(w.stderr()), 'wait to name the paused tag', 5000);
    const follow = spawnCli(['--data-dir', s.dataDir, 'log', '-f', batch[0]], { cwd: s.dir });
    await until(() => follow.stderr().includes(`job ${batch[0]} has not started (tag sweep paused); its log follows once it does\n`), 'log -f to say why there is no log yet', 5000);
    // A job tagged after the call is not one it waits for; the server restarts under it:
    // it asks again for the same two jobs, not the tag's jobs as of then.
    const late = await addJob(s, '--tag', 'sweep', './block.sh');
    await s.stop();
    s = await s.restart();
    await until(() => socketClients(s.dataDir) === 2, 'wait and log -f to reconnect');
    await s.ok(['resume', '--tag', 'sweep']);
    for (const id of batch) release(s, id);
    const r = await within(w.done, 15_000, 'wait to end');
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /2\/2 finished: 2 done, 0 failed, 0 killed\n$/);
    const f = await within(follow.done, 15_000, 'log -f to end');
    assert.equal(f.code, 0, f.stderr);
    assert.match(f.stdout, new RegExp(`job ${batch[0]} released`));
    assert.equal((await s.job(late)).state, 'running', 'wait did not wait for a job tagged after it');
    release(s, late);
  });
});

describe('help that helps', () => {
  test('help COMMAND and COMMAND --help show usage, options and an example; --version; unknown words get the nearest', async () => {
    for (const args of [['help', 'add_job'], ['add_job', '--help'], ['help', 'add-job']]) {
      const r = await runCli(args);
      assert.equal(r.code, args[1] === 'add-job' ? 2 : 0, r.stderr);
      if (r.code) { assert.match(r.stderr, /did you mean: cli\.ts add_job\?/); continue; }
      assert.match(r.stdout, /^usage: cli\.ts add_job /);
      assert.match(r.stdout, /--retries N/);
      assert.match(r.stdout, /--retry-delay SECONDS/);
      assert.match(r.stdout, /example:\n  cli\.ts add_job/);
    }
    const st = await runCli(['help', 'status']);
    assert.match(st.stdout, /^usage: cli\.ts status \[--tag TAG\] \[--json\]/);
    assert.doesNotMatch(st.stdout, /commands/, 'not the general help');
    const v = await runCli(['--version']);
    assert.equal(v.code, 0);
    assert.equal(v.stdout, `djs ${VERSION}\n`);
    const typo = await runCli(['stauts']);
    assert.equal(typo.code, 2);
    assert.match(typo.stderr, /^error: unknown command 'stauts'\nhint: did you mean: cli\.ts status\?/);
    const opt = await runCli(['list', '--stat', 'failed']);
    assert.equal(opt.code, 2);
    assert.match(opt.stderr, /did you mean --state\?/);
  });
});

describe('list, log -f, clean and retries', () => {
  test('list shows timeout and exit 255 x5 in its table, and takes several --state; log -f ends saying how the job ended, exiting like wait', { timeout: 60_000 }, async (t) => {
    const s = await serve(t, { env: { DJS_KILL_GRACE: '1' } });
    await addWorkers(s, 'w1:3');
    writeScript(s.dir, 'slow.sh', 'sleep 30');
    writeScript(s.dir, 'unreachable.sh', 'exit 255');
    writeScript(s.dir, 'fail.sh', 'echo failing; exit 3');
    const slow = await addJob(s, '--timeout', '1', './slow.sh');
    const lost = await addJob(s, './unreachable.sh');
    const fail = await addJob(s, './fail.sh');
    const ok = await addJob(s, '/bin/true');
    await untilState(s, slow, 'failed', 20_000);
    await untilState(s, lost, 'failed', 20_000);
    const f = await s.cli(['log', '-f', fail]);
    assert.equal(f.code, 1, 'a failed job: exit 1, like wait');
    assert.equal(f.stdout, 'failing\n');
    assert.match(f.stderr, new RegExp(`job ${fail} ended: failed \\(exit 3\\)`));
    const o = await s.cli(['log', '-f', ok]);
    assert.equal(o.code, 0);
    assert.match(o.stderr, new RegExp(`job ${ok} ended: done`));
    const list = await s.ok(['list']);
    assert.match(list, new RegExp(`^\\s*${slow}\\s+failed\\s+w1\\s+timeout\\s`, 'm'));
    assert.match(list, new RegExp(`^\\s*${lost}\\s+failed\\s+w1\\s+exit 255 x5\\s`, 'm'));
    assert.match(list, new RegExp(`^\\s*${fail}\\s+failed\\s+w1\\s+3\\s`, 'm'));
    const two = await s.ok(['list', '--state', 'done', '--state', 'failed', '--json']);
    assert.deepEqual(JSON.parse(two).map((j: any) => j.id).sort(), [slow, lost, fail, ok].map(Number).sort());
  });

  test('clean --logs also removes the logs of jobs an earlier clean forgot', async (t) => {
    const s = await serve(t);
    await addWorkers(s, 'w1');
    writeScript(s.dir, 'say.sh', 'echo hi');
    const a = await addJob(s, './say.sh');
    await untilState(s, a, 'done');
    const logA = path.join(s.logDir, `${a}.log`);
    assert.ok(fs.existsSync(logA));
    await s.ok(['clean']);
    assert.ok(fs.existsSync(logA), 'clean alone keeps logs');
    const b = await addJob(s, './say.sh');
    await untilState(s, b, 'done');
    fs.writeFileSync(path.join(s.logDir, 'notes.log'), 'not a job log');
    await s.ok(['clean', '--logs']);
    await until(() => !fs.existsSync(logA) && !fs.existsSync(path.join(s.logDir, `${b}.log`)), 'both logs to go');
    assert.ok(fs.existsSync(path.join(s.logDir, 'notes.log')), 'files that are no job log stay');
  });

  test('a retry waits --retry-delay before it starts', { timeout: 90_000 }, async (t) => {
    const s = await serve(t);
    await addWorkers(s, 'w1');
    writeScript(s.dir, 'fail.sh', 'exit 1');
    const id = await addJob(s, '--retries', '1', '--retry-delay', '8', './fail.sh');
    await until(async () => { const j = await s.job(id); return j.attempts === 1 && j.state === 'waiting'; }, 'the first attempt to fail');
    const list = await s.ok(['list']);
    assert.match(list, new RegExp(`^\\s*${id}\\s+waiting\\s+retry delay\\s+retry \\d`, 'm'), 'list says when the retry is due');
    const job = await untilState(s, id, 'failed', 15_000);
    const [first, second] = job.history;
    assert.ok(Date.parse(second.startedAt) - Date.parse(first.endedAt) >= 8000, `retried ${Date.parse(second.startedAt) - Date.parse(first.endedAt)} ms after the failure`);
  });
});
