// Tier 1: what the HTTP side (start --http) decides from the state: pages of the job
// list, the address it serves and the Host headers it takes, the rate and time left,
// the counters, and the Prometheus text (checked by a parser here, and by promtool where
// the Debian package prometheus provides it).

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { describe, test } from 'node:test';
import {
  applyEvent, chartOf, countEvent, counts, formatMetrics, hostAllowed, newMetrics, newState, observe, pageJobs,
  PAGE_SCAN_BUDGET, parseHttpAddress, rateAndLeft, statusView, UserError, type Event, type State,
} from '../cli.ts';

const T0 = Date.UTC(2025, 0, 1, 12, 0, 0);

/** A state with `n` jobs of /bin/job.sh (argument `arg-ID`), all waiting, and workers. */
function stateWith(n: number, hosts: [string, number][] = []): State {
  const st = newState();
  applyEvent(st, { e: 'add', t: T0, id: 1, cwd: '/w', retries: 0, timeout: 0, jobs: Array.from({ length: n }, (_, i) => ['/bin/job.sh', `arg-${i + 1}`]) });
  for (const [host, slots] of hosts) applyEvent(st, { e: 'worker', t: T0, host, slots, ssh: false });
  return st;
}
const ids = (p: { rows: { id: number }[] }) => p.rows.map((r) => r.id);
const usageError = (fn: () => unknown, re: RegExp) => assert.throws(fn, (e: unknown) => e instanceof UserError && e.code === 2 && re.test(e.message));

describe('pageJobs', () => {
  test('pages run newest first, and each next is the before of the following page', () => {
    const st = stateWith(7);
    const p1 = pageJobs(st, { op: 'jobs', limit: 3 }, T0);
    assert.deepEqual(ids(p1), [7, 6, 5]);
    assert.equal(p1.total, 7);
    const p2 = pageJobs(st, { op: 'jobs', limit: 3, before: p1.next }, T0);
    assert.deepEqual(ids(p2), [4, 3, 2]);
    const p3 = pageJobs(st, { op: 'jobs', limit: 3, before: p2.next }, T0);
    assert.deepEqual(ids(p3), [1]);
    assert.equal(p3.next, null);
  });

  test('filters by state, worker, tag and text; total only where counts tell it', () => {
    const st = stateWith(6, [['n1', 1], ['n2', 1]]);
    applyEvent(st, { e: 'start', t: T0 + 1, id: 2, host: 'n1', slot: 0 });
    applyEvent(st, { e: 'start', t: T0 + 1, id: 5, host: 'n2', slot: 0 });
    applyEvent(st, { e: 'end', t: T0 + 2, id: 2, run: 1, code: 3 });
    applyEvent(st, { e: 'add', t: T0, id: 7, cwd: '/w', retries: 0, timeout: 0, tags: ['sweep'], jobs: [['/bin/job.sh', 'x']] });
    const failed = pageJobs(st, { op: 'jobs', state: 'failed' }, T0);
    assert.deepEqual(ids(failed), [2]);
    assert.equal(failed.total, 1);
    assert.deepEqual(ids(pageJobs(st, { op: 'jobs', worker: 'n2' }, T0)), [5]);
    assert.deepEqual(ids(pageJobs(st, { op: 'jobs', tag: 'sweep' }, T0)), [7]);
    const text = pageJobs(st, { op: 'jobs', text: 'arg-3' }, T0);
    assert.deepEqual(ids(text), [3]);
    assert.equal(text.total, null);
    assert.deepEqual(ids(pageJobs(st, { op: 'jobs', text: '6' }, T0)), [6], 'a number matches the id too');
    assert.deepEqual(ids(pageJobs(st, { op: 'jobs', state: 'running', worker: 'n1' }, T0)), []);
  });

  test('a filter that matches little answers in parts, each scanning a bounded number of ids', () => {
    const n = PAGE_SCAN_BUDGET + 10;
    const st = stateWith(n);
    applyEvent(st, { e: 'remove', t: T0, ids: [5] });
    for (const id of [6, n - PAGE_SCAN_BUDGET]) st.jobs.get(id)!.reason = 'needle';
    const p1 = pageJobs(st, { op: 'jobs', text: 'needle' }, T0);
    assert.deepEqual(ids(p1), [], 'nothing among the newest PAGE_SCAN_BUDGET ids matches');
    assert.equal(p1.next, n - PAGE_SCAN_BUDGET + 1, 'the first part stops at the budget');
    const p2 = pageJobs(st, { op: 'jobs', text: 'needle', before: p1.next! }, T0);
    assert.equal(p2.next, null);
    assert.deepEqual(ids(p2), [n - PAGE_SCAN_BUDGET, 6], 'the rest, past the removed job 5');
    assert.deepEqual(ids(pageJobs(st, { op: 'jobs', text: 'arg-5', limit: 3, before: 6 }, T0)), [], 'job 5 was removed');
  });

  test('bad filters are usage errors', () => {
    const st = stateWith(1);
    usageError(() => pageJobs(st, { op: 'jobs', state: 'sleeping' }, T0), /unknown state 'sleeping'/);
    usageError(() => pageJobs(st, { op: 'jobs', limit: 0 }, T0), /invalid limit/);
    usageError(() => pageJobs(st, { op: 'jobs', limit: 1001 }, T0), /invalid limit/);
    usageError(() => pageJobs(st, { op: 'jobs', before: 'x' }, T0), /invalid before/);
    usageError(() => pageJobs(st, { op: 'jobs', text: ['a'] }, T0), /invalid text/);
  });
});

describe('the HTTP address', () => {
  test('a port alone is loopback; a host may be named, IPv6 in brackets', () => {
    assert.deepEqual(parseHttpAddress('8080'), { host: '127.0.0.1', port: 8080 });
    assert.deepEqual(parseHttpAddress('0'), { host: '127.0.0.1', port: 0 });
    assert.deepEqual(parseHttpAddress('0.0.0.0:80'), { host: '0.0.0.0', port: 80 });
    assert.deepEqual(parseHttpAddress('localhost:9000'), { host: 'localhost', port: 9000 });
    assert.deepEqual(parseHttpAddress('[::1]:8080'), { host: '::1', port: 8080 });
    for (const bad of ['', 'http', '70000', ':80', '::1:80', 'a b:80', '-x:80', '80 ']) usageError(() => parseHttpAddress(bad), /invalid HTTP address/);
  });

  test('only Host headers naming the address served pass', () => {
    const names = ['127.0.0.1', 'localhost', '::1'];
    assert.ok(hostAllowed('127.0.0.1:8080', names, 8080));
    assert.ok(hostAllowed('LOCALHOST:8080', names, 8080));
    assert.ok(hostAllowed('[::1]:8080', names, 8080));
    assert.ok(hostAllowed('localhost', names, 80), 'port 80 may go unsaid');
    assert.ok(!hostAllowed('localhost', names, 8080));
    assert.ok(!hostAllowed('127.0.0.1:8081', names, 8080));
    assert.ok(!hostAllowed('evil.example:8080', names, 8080), 'a rebound name is refused');
    assert.ok(!hostAllowed(undefined, names, 8080));
    assert.ok(!hostAllowed('127.0.0.1:8080@evil', names, 8080));
  });
});

describe('rate, time left and the chart', () => {
  test('rateAndLeft is what wait shows', () => {
    assert.deepEqual(rateAndLeft(10, 5000, 20), { rate: 2, leftMs: 10_000 });
    assert.deepEqual(rateAndLeft(0, 5000, 20), { rate: 0, leftMs: null });
  });

  test('finished jobs count in their minute; the rate is over the last five minutes', () => {
    const st = stateWith(4, [['n1', 4]]);
    const m = newMetrics(T0);
    const events: Event[] = [1, 2, 3, 4].map((id) => ({ e: 'start', t: T0 + 1000, id, host: 'n1', slot: id - 1 }));
    events.push({ e: 'end', t: T0 + 30_000, id: 1, run: 1, code: 0 }, { e: 'end', t: T0 + 90_000, id: 2, run: 1, code: 1 });
    events.push({ e: 'end', t: T0 + 90_000, id: 2, run: 1, code: 1 }); // a stale repeat counts nothing
    for (const ev of events) { const c = counts(st, ev); applyEvent(st, ev); if (c) countEvent(m, st, ev); }
    assert.equal(m.starts, 4);
    assert.deepEqual(m.ends, { done: 1, failed: 1, killed: 0, requeued: 0 });
    assert.equal(m.queueWait.count, 4);
    const c = chartOf(m, st, T0 + 120_000);
    assert.deepEqual(c.perMinute.slice(-3), [1, 1, 0]);
    assert.equal(c.lastMinute, new Date(T0 + 120_000).toISOString());
    assert.equal(c.rate, 2 / 120, '2 jobs since the start of the first minute with one');
    assert.equal(c.leftMs, 2 / c.rate * 1000);
    // Hours later the window has moved on.
    const later = chartOf(m, st, T0 + 7 * 3600_000);
    assert.ok(later.perMinute.every((v) => v === 0));
    assert.equal(later.rate, 0);
  });
});

describe('metrics', () => {
  /** Parses the Prometheus text format strictly enough to catch what promtool would:
   *  every sample belongs to a family with one HELP and one TYPE before it. */
  function parseProm(text: string) {
    const types = new Map<string, string>(), samples = new Map<string, number>();
    for (const line of text.split('\n')) {
      if (line === '') continue;
      let m = /^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.+)$/.exec(line);
      if (m) {
        if (m[1] === 'TYPE') { assert.ok(!types.has(m[2]), `TYPE of ${m[2]} twice`); assert.match(m[3], /^(counter|gauge|histogram|summary|untyped)$/); types.set(m[2], m[3]); }
        continue;
      }
      m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*\})? (\S+)$/.exec(line);
      assert.ok(m, `not a sample line: ${line}`);
      const family = [...types.keys()].find((f) => m![1] === f || (types.get(f) === 'histogram' && /^_(bucket|sum|count)$/.test(m![1].slice(f.length)) && m![1].startsWith(f)));
      assert.ok(family, `${m[1]} has no TYPE before it`);
      if (types.get(family) === 'counter') assert.match(family, /_total$/, 'counters end in _total');
      assert.ok(!Number.isNaN(Number(m[3].replace(/^\+Inf$/, 'Infinity'))), `value of ${line}`);
      samples.set(m[1] + (m[2] ?? ''), Number(m[3]));
    }
    return { types, samples };
  }

  test('jobs, workers, slots, counters and histograms in the text format', () => {
    const st = stateWith(3, [['n1', 2], ['n"2', 1]]);
    const m = newMetrics(T0);
    for (const ev of [{ e: 'start', t: T0 + 2000, id: 1, host: 'n1', slot: 0 }, { e: 'end', t: T0 + 3000, id: 1, run: 1, code: 0 }, { e: 'start', t: T0 + 4000, id: 2, host: 'n1', slot: 0 }] as Event[]) {
      const c = counts(st, ev); applyEvent(st, ev); if (c) countEvent(m, st, ev);
    }
    observe(m.fsync, 0.002); observe(m.fsync, 3);
    const text = formatMetrics({ ...statusView(st), tags: [{ tag: 'a', waiting: 1, running: 1, done: 1, failed: 0, killed: 0, total: 3, paused: false }] }, m);
    const { types, samples } = parseProm(text);
    assert.equal(types.get('djs_jobs'), 'gauge');
    assert.equal(types.get('djs_job_starts_total'), 'counter');
    assert.equal(types.get('djs_journal_fsync_seconds'), 'histogram');
    assert.equal(samples.get('djs_jobs{state="done"}'), 1);
    assert.equal(samples.get('djs_jobs{state="running"}'), 1);
    assert.equal(samples.get('djs_jobs{state="waiting"}'), 1);
    assert.equal(samples.get('djs_tag_jobs{tag="a",state="done"}'), 1);
    assert.equal(samples.get('djs_job_starts_total'), 2);
    assert.equal(samples.get('djs_job_ends_total{outcome="done"}'), 1);
    assert.equal(samples.get('djs_workers{state="up"}'), 2);
    assert.equal(samples.get('djs_slots{state="used"}'), 1);
    assert.equal(samples.get('djs_slots{state="free"}'), 2);
    assert.equal(samples.get('djs_journal_fsync_seconds_bucket{le="0.0025"}'), 1);
    assert.equal(samples.get('djs_journal_fsync_seconds_bucket{le="+Inf"}'), 2);
    assert.equal(samples.get('djs_journal_fsync_seconds_count'), 2);
    assert.equal(samples.get('djs_queue_wait_seconds_bucket{le="1"}'), 0);
    assert.equal(samples.get('djs_queue_wait_seconds_bucket{le="5"}'), 2);
    const promtool = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8' });
    if (promtool.error) return; // no promtool here (Debian: apt-get install prometheus)
    assert.equal(promtool.status, 0, `promtool check metrics: ${promtool.stdout}${promtool.stderr}`);
  });
});
