// Tier 2: random and mutated requests, built from the real request shapes, against a
// live server for a bounded time. After each burst the server must answer, and its state
// must equal a replay of its journal (the data dir loaded afresh by the core).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';
import { loadState } from '../cli.ts';
import { cleanUp, prng, startServer, until, writeScript, type TestServer } from './server.ts';

const SECONDS = Number(process.env.DJS_FUZZ_SECONDS ?? 6);

test(`fuzz: ${SECONDS} s of random and mutated requests; the server answers and equals a replay of its journal`, { timeout: (SECONDS + 60) * 1000 }, async (t) => {
  let s: TestServer | undefined;
  t.after(() => cleanUp(s));
  s = await startServer({ env: { DJS_KILL_GRACE: '1' } });
  const script = writeScript(s.dir, 'job.sh', 'sleep 0.$(( JOB_ID % 7 )); exit $(( JOB_ID % 3 ))');
  const seed = Number(process.env.DJS_FUZZ_SEED ?? Date.now() % 100000);
  t.diagnostic(`seed ${seed} (DJS_FUZZ_SEED=${seed} repeats this run)`);
  const rand = prng(seed);
  const pick = <T>(xs: T[]): T => xs[Math.floor(rand() * xs.length)];
  const anyValue = (): unknown => pick([0, -1, 1, 2 ** 53, 1.5, NaN, '', '1', 'x'.repeat(300), null, true, [], [1], [[1]], {}, { a: 1 }, '\u0000', '../..', -0]);
  let lastId = 1; // the highest id an add was answered with
  const id = () => (rand() < 0.85 ? 1 + Math.floor(rand() * (lastId + 2)) : anyValue());
  const addJobs = () => ({ op: 'add_jobs', cwd: s!.dir, jobs: Array.from({ length: 1 + Math.floor(rand() * 4) }, () => [script, String(Math.floor(rand() * 9))]), retries: Math.floor(rand() * 2), timeout: pick([0, 0, 1, 5]) });
  const shapes: (() => Record<string, unknown>)[] = [
    addJobs, addJobs, addJobs,
    () => ({ op: 'remove_jobs', ids: [id(), id()] }),
    () => ({ op: 'remove_jobs', script, args: [String(Math.floor(rand() * 9))] }),
    () => ({ op: 'kill', ids: [id()] }), () => ({ op: 'kill', ids: [id()] }), () => ({ op: 'kill', ids: [id()] }),
    () => ({ op: 'kill', all: rand() < 0.1 }),
    () => ({ op: 'retry', ids: [id()] }), () => ({ op: 'retry', ids: [id()] }),
    () => ({ op: 'retry', failed: true }),
    () => ({ op: 'clean', logs: rand() < 0.5 }),
    () => ({ op: 'add_workers', workers: [{ host: pick(['w1', 'w2', 'w3']), slots: 1 + Math.floor(rand() * 3) }], skipCheck: true }),
    () => ({ op: 'remove_workers', hosts: [pick(['w1', 'w2', 'w3'])], mode: pick([undefined, 'wait', 'kill', 'x']) }),
    () => ({ op: 'status' }), () => ({ op: 'ping' }), () => ({ op: 'list', state: pick([undefined, 'done', 'bogus']) }),
    () => ({ op: 'log', id: id() }),
    () => ({ op: pick(['', 'nope', '__proto__', 'constructor', 'toString', 'hasOwnProperty']) }),
  ];
  /** A request from a real shape, sometimes with one field replaced, dropped or added. */
  const request = (): string => {
    if (rand() < 0.05) return pick(['', '{', 'null', '[]', '"op"', '{"op":1}', '{"op":"status"', '\u00ff\u00fe', '{"__proto__":{"op":"kill","all":true}}']);
    const req = pick(shapes)();
    if (rand() < 0.3) {
      const keys = Object.keys(req).filter((k) => k !== 'op');
      const k = keys.length && rand() < 0.7 ? pick(keys) : pick(['extra', 'ids', 'jobs', 'cwd', '__proto__']);
      if (rand() < 0.3) delete req[k]; else req[k] = anyValue();
    }
    return JSON.stringify(req);
  };
  /** Sends lines on one connection and resolves once each got its final answer (or the
   *  server closed the connection, which it may for a list). */
  const burst = (lines: string[]) => new Promise<string[]>((resolve, reject) => {
    const sock = net.connect(path.join(s!.dataDir, 'server.sock'));
    const answers: string[] = [];
    let buf = '';
    sock.on('connect', () => sock.write(lines.map((l) => l + '\n').join('')));
    sock.on('data', (d) => {
      buf += d;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const line = buf.slice(0, nl); buf = buf.slice(nl + 1);
        const m = JSON.parse(line);
        if (m.ok !== undefined) answers.push(line);
        if (m.ok === true && typeof m.first === 'number') lastId = Math.max(lastId, m.first + m.count - 1);
        if (answers.length === lines.length) sock.end();
      }
    });
    sock.on('close', () => resolve(answers));
    sock.on('error', reject);
  });
  const deadline = Date.now() + SECONDS * 1000;
  let bursts = 0, requests = 0;
  while (Date.now() < deadline) {
    const lines = Array.from({ length: 1 + Math.floor(rand() * 30) }, request).filter((l) => !l.includes('"op":"list"') || rand() < 0.5);
    if (!lines.length) continue; // nothing to answer: the connection would wait for ever
    const answers = await burst(lines);
    // Every request is answered (a list may end its connection early), and every answer is
    // a success or a refusal that says why with an exit code: never an internal error.
    if (!lines.some((l) => l.includes('"op":"list"'))) assert.equal(answers.length, lines.length, `answers to a burst of ${lines.length} (seed ${seed})`);
    for (const a of answers) {
      const m = JSON.parse(a);
      if (m.ok === true) continue;
      assert.equal(m.ok, false, `not an answer: ${a.slice(0, 200)}`);
      assert.ok(typeof m.error === 'string' && m.error && !/internal error/.test(m.error), `a refusal without a reason, or an internal error (seed ${seed}): ${a.slice(0, 200)}`);
      assert.ok(m.code === 1 || m.code === 2, `a refusal's code is 1 or 2 (seed ${seed}): ${a.slice(0, 200)}`);
    }
    requests += lines.length; bursts++;
    // The server answers, and what it holds is what its journal says.
    const status = await s.status();
    assert.equal(typeof status.counts.total, 'number');
    await until(async () => {
      const jobs = await s!.jobs();
      const mine = jobs.map((j) => `${j.id}:${j.state}:${j.attempts}`);
      const replay = loadState(s!.dataDir).state;
      const theirs = [...replay.jobs.values()].map((j) => `${j.id}:${j.state}:${(j.history?.length ?? 0) + (j.state === 'running' ? 1 : 0)}`);
      return mine.sort().join(' ') === theirs.sort().join(' ');
    }, `the server's state after burst ${bursts} (seed ${seed}) to equal a replay of its journal`, 15_000);
  }
  const kinds = new Map<string, number>();
  for (const line of fs.readFileSync(path.join(s.dataDir, 'journal'), 'utf8').split('\n').slice(1, -1)) { const e = JSON.parse(line).e; kinds.set(e, (kinds.get(e) ?? 0) + 1); }
  t.diagnostic(`${bursts} bursts, ${requests} requests; events: ${[...kinds].map(([k, n]) => `${n} ${k}`).join(', ')}`);
  assert.ok(requests > 50, `only ${requests} requests were sent`);
  assert.equal(s.proc.exitCode, null, 'the server is still running');
});
