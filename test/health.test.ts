// Tier 1: how the pure core watches workers (heartbeats, down, --requeue-on-down) and how
// the ssh settings become the shared connections' config; literal states, a fixed clock.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  applyEvent, connectionOf, connectionsOf, controlDirFor, HEARTBEAT_MISSES, newHealth, newRuntime, newState, plan,
  sharedConfigText, sshSettings, UserError, type Health, type HealthSettings, type Runtime, type State,
} from '../cli.ts';
import { apply } from './server.ts';

const T0 = Date.UTC(2026, 0, 1, 12, 0, 0);
const H = 1000; // heartbeat period of these tests
const HS: HealthSettings = { heartbeatMs: H, probeMaxMs: 60_000 };

/** Workers a (ssh, 2 slots), b (ssh, 2 slots, --requeue-on-down) and c (no ssh); jobs 1..n waiting. */
function setup(jobs: number): State {
  const st = newState();
  applyEvent(st, { e: 'worker', t: T0, host: 'a', slots: 2, ssh: true });
  applyEvent(st, { e: 'worker', t: T0, host: 'b', slots: 2, ssh: true, rod: true });
  applyEvent(st, { e: 'worker', t: T0, host: 'c', slots: 1, ssh: false });
  if (jobs) applyEvent(st, { e: 'add', t: T0, id: 1, cwd: '/w', retries: 0, timeout: 0, jobs: Array.from({ length: jobs }, (_, i) => ['/bin/job', String(i)]) });
  return st;
}
const runtime = (health: Record<string, Partial<Health>>): Runtime => {
  const rt = newRuntime();
  for (const [host, h] of Object.entries(health)) rt.health.set(host, { ...newHealth(), ...h });
  return rt;
};
const beats = (p: ReturnType<typeof plan>) => p.effects.filter((f) => f.kind === 'heartbeat').map((f) => (f as { host: string }).host).sort();
const startedOn = (p: ReturnType<typeof plan>) => p.events.filter((e) => e.e === 'start').map((e) => (e as { host: string }).host).sort();

describe('heartbeats', () => {
  test('idle workers with no waiting work are not checked; workers with running jobs or waiting work are, one check at a time, every period', () => {
    const st = setup(0);
    const rt = runtime({ a: { okAt: T0, sentAt: T0 }, b: { okAt: T0, sentAt: T0 } });
    const idle = plan(st, rt, T0 + 10 * H, 5000, HS);
    assert.deepEqual(beats(idle), [], 'nothing runs or waits: no checks');
    assert.equal(idle.next, Infinity);

    apply(st, { e: 'add', t: T0, id: 1, cwd: '/w', retries: 0, timeout: 0, jobs: [['/bin/job']] });
    const soon = plan(st, rt, T0 + H / 2, 5000, HS);
    assert.deepEqual(beats(soon), [], 'not due yet');
    assert.equal(soon.next, T0 + H, 'the next check is due one period after the last');
    assert.deepEqual(beats(plan(st, rt, T0 + H, 5000, HS)), ['a', 'b'], 'c has no ssh and is never checked');
    rt.health.get('a')!.busy = true;
    assert.deepEqual(beats(plan(st, rt, T0 + 5 * H, 5000, HS)), ['b'], 'a check under way is not doubled');
    assert.deepEqual(beats(plan(st, rt, T0 + 5 * H, 5000, { ...HS, heartbeatMs: 0 })), [], 'DJS_HEARTBEAT=0: no checks');
  });

  test('a worker not checked for two periods gets no job until a check answers; one without ssh always does', () => {
    const st = setup(10);
    const rt = runtime({ a: { okAt: T0, sentAt: T0 }, b: { okAt: T0 - 10 * H, sentAt: T0 - 10 * H } });
    const p = plan(st, rt, T0 + H / 2, 5000, HS);
    assert.deepEqual(startedOn(p), ['a', 'a', 'c'], 'b was last heard of long ago');
    assert.deepEqual(beats(p), ['b'], 'b is checked first');
    // Its check answers: it takes jobs.
    Object.assign(rt.health.get('b')!, { okAt: T0 + H / 2, sentAt: T0 + H / 2 });
    apply(st, ...p.events);
    assert.deepEqual(startedOn(plan(st, rt, T0 + H, 5000, HS)), ['b', 'b']);
    // A new server knows nothing of its workers: each is checked before its first job.
    const fresh = plan(setup(3), newRuntime(), T0, 5000, HS);
    assert.deepEqual(startedOn(fresh), ['c']);
    assert.deepEqual(beats(fresh), ['a', 'b']);
  });

  test(`a worker whose checks go unanswered for ${HEARTBEAT_MISSES} periods goes down, saying why; its jobs run on, unless it was added with --requeue-on-down`, () => {
    const st = setup(5);
    const rt = runtime({ a: { okAt: T0, sentAt: T0 }, b: { okAt: T0, sentAt: T0 } });
    apply(st, ...plan(st, rt, T0, 5000, HS).events);
    assert.deepEqual([...st.workers.values()].map((w) => w.running.filter(Boolean).length), [2, 2, 1]);
    // Checks sent at T0 + H have not answered (one hangs, one was refused).
    Object.assign(rt.health.get('a')!, { sentAt: T0 + H, missingSince: T0 + H, busy: true });
    Object.assign(rt.health.get('b')!, { sentAt: T0 + H, missingSince: T0 + H, busy: false, err: 'Connection refused' });
    const before = plan(st, rt, T0 + H + HEARTBEAT_MISSES * H - 1, 5000, HS);
    assert.equal(before.events.filter((e) => e.e === 'probe').length, 0, 'not yet');
    assert.deepEqual(beats(before), ['b'], 'b is checked again; the check of a is still under way');
    assert.equal(before.next, T0 + H + HEARTBEAT_MISSES * H, 'the limit is next');
    const at = T0 + H + HEARTBEAT_MISSES * H;
    const p = plan(st, rt, at, 5000, HS);
    const downs = p.events.filter((e) => e.e === 'probe');
    assert.deepEqual(downs.map((e) => [e.host, (e as { ok: boolean }).ok]), [['a', false], ['b', false]]);
    assert.match(String((downs[1] as { err?: string }).err), /no answer to checks for 3s \(Connection refused\)/);
    const kills = p.events.filter((e) => e.e === 'kill');
    assert.deepEqual(kills.map((e) => [(e as { ids: number[] }).ids, (e as { why: string }).why]), [[st.workers.get('b')!.running.filter(Boolean), 'down']],
      'only b (--requeue-on-down) has its jobs stopped');
    apply(st, ...p.events);
    assert.equal(st.workers.get('a')!.state, 'down');
    assert.equal(st.workers.get('b')!.state, 'down');
    assert.ok(st.workers.get('a')!.probeAt > at, 'a down worker is probed with backoff');
    // b's jobs end (SIGTERM): back to the front of the queue, not charged; one that
    // finished its work anyway is done.
    const [j1, j2] = st.workers.get('b')!.running.filter(Boolean);
    apply(st, { e: 'end', t: at + 10, id: j1, run: 1, code: 143 }, { e: 'end', t: at + 10, id: j2, run: 1, code: 0 });
    assert.deepEqual([st.jobs.get(j1)!.state, st.jobs.get(j1)!.reason, st.jobs.get(j1)!.retriesUsed, st.jobs.get(j1)!.avoid], ['waiting', 'worker down', 0, ['b']]);
    assert.equal(st.jobs.get(j1)!.history!.at(-1)!.reason, 'worker down');
    assert.equal(st.jobs.get(j2)!.state, 'done');
    // a's jobs ran on; they end with ssh's 255 later and are requeued as ever.
    assert.equal(st.workers.get('a')!.running.filter(Boolean).length, 2);
    assert.equal(plan(st, rt, at + 20, 5000, HS).events.filter((e) => e.e === 'probe').length, 0, 'a down worker is not taken down again');
  });

  test('a probe under way (a job exited 255) sends no heartbeat, but missed ones still take the worker down', () => {
    const st = setup(2);
    const rt = runtime({ a: { okAt: T0, sentAt: T0 + H, missingSince: T0 + H, busy: true } });
    apply(st, { e: 'start', t: T0, id: 1, host: 'a', slot: 0 }, { e: 'end', t: T0 + H, id: 1, run: 1, code: 255 });
    assert.ok(st.workers.get('a')!.probeAt > 0);
    rt.probing.add('a');
    rt.health.get('a')!.busy = false;
    const p = plan(st, rt, T0 + 2 * H, 5000, HS);
    assert.deepEqual(beats(p).filter((h) => h === 'a'), [], 'the probe is the check');
    const late = plan(st, rt, T0 + H + HEARTBEAT_MISSES * H, 5000, HS);
    assert.deepEqual(late.events.filter((e) => e.e === 'probe').map((e) => e.host), ['a']);
  });
});

describe('shared ssh connections', () => {
  test('settings: defaults, DJS_SSH_SHARED, DJS_SSH_SESSIONS, DJS_HEARTBEAT; bad values are usage errors', () => {
    const d = sshSettings({});
    assert.deepEqual([d.shared, d.perConnection, d.heartbeatMs, d.timeoutS], [true, 8, 30_000, 10]);
    const s = sshSettings({ DJS_SSH_SHARED: '0', DJS_SSH_SESSIONS: '4', DJS_HEARTBEAT: '0' });
    assert.deepEqual([s.shared, s.perConnection, s.heartbeatMs], [false, 4, 0]);
    for (const env of [{ DJS_SSH_SHARED: 'yes' }, { DJS_SSH_SESSIONS: '0' }, { DJS_HEARTBEAT: '-1' }, { DJS_HEARTBEAT: '1.5' }]) {
      assert.throws(() => sshSettings(env), (e: unknown) => e instanceof UserError && e.code === 2 && /invalid DJS_/.test(e.message), JSON.stringify(env));
    }
  });

  test('slots share connections in groups of DJS_SSH_SESSIONS', () => {
    const s = sshSettings({ DJS_SSH_SESSIONS: '8' });
    assert.deepEqual([0, 7, 8, 15, 16].map((slot) => connectionOf(slot, s)), [0, 0, 1, 1, 2]);
    assert.deepEqual([1, 8, 9, 16, 30].map((slots) => connectionsOf(slots, s)), [1, 1, 2, 2, 4]);
  });

  test("the config: a master per host and group in the control dir, the user's config and the system's after it", () => {
    const s = { ...sshSettings({ DJS_SSH_TIMEOUT: '4' }), controlDir: '/d/.data/ssh' };
    const text = sharedConfigText(s, 1);
    assert.match(text, /^ControlMaster auto$/m);
    assert.match(text, /^ControlPath \/d\/\.data\/ssh\/%C\.1$/m);
    assert.match(text, /^ControlPersist \d+$/m);
    assert.match(text, /^ServerAliveInterval 2$/m);
    assert.match(text, /^Include ~\/\.ssh\/config\nInclude \/etc\/ssh\/ssh_config$/m);
    const own = sharedConfigText({ ...s, config: '/home/me/my "ssh" config' }, 0);
    assert.match(own, /^Include "\/home\/me\/my \\"ssh\\" config"$/m, 'a path with spaces and quotes is quoted');
    // Options are taken first-come in ssh: ours precede the included files.
    assert.ok(own.indexOf('ControlPath') < own.indexOf('Include'));
  });

  test('control sockets go in DATA_DIR/ssh unless that path is too long or odd for a socket', () => {
    assert.equal(controlDirFor('/home/me/.data', 1000, '/tmp'), '/home/me/.data/ssh');
    const long = '/home/me/projects/some/deep/directory/for/the/run/.data';
    assert.match(controlDirFor(long, 1000, '/tmp'), /^\/tmp\/djs-1000-[0-9a-f]{12}$/);
    assert.match(controlDirFor('/home/me/my data', 1000, '/tmp'), /^\/tmp\/djs-1000-/);
    assert.notEqual(controlDirFor(long, 1000, '/tmp'), controlDirFor(long + '2', 1000, '/tmp'));
  });
});
