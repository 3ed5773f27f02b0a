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
  applyEvent, undocumentedOptions, exitColumn, formatDuration, formatProgress, idRanges, jobView, nearest, newRuntime, newState, plan,
  resolveSettings, SETTINGS, splitWords, VERSION, whyWaiting, type Event, type State, type WaitCounts,
} from '../cli.ts';
import {
  addJob, addWorkers, CLI, delay, GATED, pidOf, release, ROOT, runCli, serve, spawnCli, socketClients, testDir, until, untilState, within,
  writeScript,
} from './server.ts';

const T0 = Date.UTC(2025, 0, 1, 12, 0, 0);
const apply = (st: State, ...evs: Event[]) => { for (const ev of evs) applyEvent(st, ev); };

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
  test('whyWaiting names what holds waiting jobs back: no workers, all down, paused starts', () => {
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

  test('the version is package.json\'s', () => {
    assert.equal(VERSION, JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')).version);
  });
});

describe('list and durations', () => {
  const baseJob = (over: Record<string, unknown>) => ({ ...jobView({
    id: 7, script: '/j.sh', args: [], cwd: '/', retries: 0, timeout: 0, state: 'failed', queuedAt: T0, run: 1, retriesUsed: 0, requeues: 0,
    worker: 'a', slot: 0, startedAt: T0, endedAt: T0 + 1000, exitCode: 1, reason: null, killing: null, killAt: 0, avoid: null, history: null,
    qtok: 0, retryDelay: 0, notBefore: 0,
  }, T0 + 2000), ...over });

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
    const names = ['run 1.txt', "it's.txt", 'a\nb.txt', 'tab\there', 'é ü', '$HOME', '*', 'x"y', '\x01ctl', 'back\\slash', '-x'];
    for (const locale of ['C', 'C.UTF-8']) {
      const env = { LC_ALL: locale, PATH: process.env.PATH };
      const lines = execFileSync('bash', ['--norc', '-c', 'printf "./job.sh %q\\n" "$@"', 'bash', ...names], { env }).toString().split('\n').filter(Boolean);
      assert.deepEqual(lines.map((l) => splitWords(l)[1]), names, `locale ${locale}: ${JSON.stringify(lines)}`);
    }
    assert.deepEqual(splitWords("$'\\x41\\102\\u00e9\\n' plain"), ['AB\u00e9\n', 'plain']);
    assert.throws(() => splitWords("$'open"), /unterminated/);
  });
});
