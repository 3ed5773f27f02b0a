// How long one big request holds up the other clients: a `status` is asked again and
// again from another connection while the server serves (a) a `wait` of 285 bytes that
// names 200,000,000 ids, (b) a sweep of 1,000,000 jobs, (c) a `load_status` of a cli.py
// state with 1,000,000 waiting jobs (13 MB, through the real client); the slowest status
// round trip is the stall. Target: no request stalls the others for more than 100 ms
// (the parse of the request line itself excepted: see the floor row). With --patched,
// each copy of cli.ts is measured the same way, for before/after numbers.
// Only when named: `npm run bench -- stall`.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { type BenchResult, type Opts, type Target, CLI, Server, fmt, memOf, now, quantile, sleep, tempDir, writeScript } from './lib.ts';

type Probe = { stop: () => Promise<number[]> };

/** Asks status over its own connection every 5 ms until stopped; the round trips, ms. */
async function probe(srv: Server): Promise<Probe> {
  const conn = await srv.connect();
  const times: number[] = [];
  let running = true;
  const done = (async () => {
    while (running) {
      const a = now();
      await conn.request({ op: 'status' });
      times.push(now() - a);
      await sleep(5);
    }
  })();
  return { stop: async () => { running = false; await done; conn.close(); return times; } };
}

/** Sends one request line as it is (no JSON work in this process, which runs the probe)
 *  and resolves at the first line that comes back. */
function rawLine(srv: Server, line: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const sock = net.connect(srv.socket);
    sock.on('error', reject);
    sock.on('connect', () => sock.write(line + '\n'));
    sock.on('data', (d) => { if (d.includes(10)) { sock.destroy(); resolve(); } });
  });
}

type Case = { what: string; run: (srv: Server, dir: string) => Promise<void> };

export async function stall(o: Opts): Promise<BenchResult> {
  const t00 = now();
  const n = o.quick ? 100_000 : 1_000_000;
  const side = Math.round(Math.sqrt(n));
  const values = Array.from({ length: side }, (_, i) => String(i));
  const cases: Case[] = [
    // 285 bytes, not the 805 of the tests: the server before this change took 17 s for this
    // one alone on an idle machine (and the 805 bytes 50 s).
    { what: 'wait, 285 bytes: [1,10000000] 20 times (until its first line)', run: (srv) => rawLine(srv, JSON.stringify({ op: 'wait', ranges: Array.from({ length: 20 }, () => [1, 10_000_000]) })) },
    { what: `add_job sweep of ${(side * side).toLocaleString('en')} jobs (::: ${side} values ::: ${side} values)`, run: async (srv, dir) => {
      const c = await srv.connect();
      await c.request({ op: 'add_jobs', cwd: dir, jobs: [[path.join(dir, 'j'), '{1}', '{2}']], sweep: [values, values] });
      c.close();
    } },
    { what: `floor: a ping whose line is as long as the load_status below (parsed, nothing else)`, run: (srv, dir) => rawLine(srv, `{"op":"ping","cwd":${JSON.stringify(dir)},"status":${fs.readFileSync(path.join(dir, 'st.json'), 'utf8')}}`) },
    { what: `load_status of ${n.toLocaleString('en')} waiting jobs (cli.ts load_status FILE)`, run: async (srv, dir) => {
      await srv.ok(['load_status', 'st.json'], { cwd: dir });
    } },
  ];
  const versions = [{ label: 'this', cli: CLI }, ...o.patched.map((p) => ({ label: p.label, cli: p.path }))];
  const rows: string[][] = [];
  const targets: Target[] = [];
  for (const c of cases) {
    for (const v of versions) {
      const dir = tempDir('djsb-s-');
      writeScript(path.join(dir, 'j'), 'exit 0');
      if (c.what.startsWith('floor') || c.what.startsWith('load_status')) {
        fs.writeFileSync(path.join(dir, 'st.json'), JSON.stringify({ job_waitlist: Array.from({ length: n }, (_, i) => ['j', String(i % 100)]), slaves: [] }));
      }
      const srv = new Server(dir, undefined, v.cli);
      try {
        await srv.start();
        if (c.what.startsWith('wait')) await srv.ok(['add_jobs', '-'], { cwd: dir, input: './j\n'.repeat(3) });
        await sleep(200);
        const rss0 = memOf(srv.pid).rss;
        o.log(`stall: ${v.label}: ${c.what}`);
        const p = await probe(srv);
        await sleep(100);
        const a = now();
        await c.run(srv, dir);
        const took = now() - a;
        await sleep(100);
        const times = await p.stop();
        const rss1 = memOf(srv.pid).rss;
        const worst = Math.max(...times);
        rows.push([c.what, v.label, fmt(took, 0), String(times.length), fmt(quantile(times, 0.5), 1), fmt(quantile(times, 0.99), 1), fmt(worst, 0), fmt(rss1 - rss0, 0)]);
        if (!c.what.startsWith('floor')) targets.push({ what: `${c.what} (${v.label}): slowest status`, measured: `${fmt(worst, 0)} ms`, limit: '< 100 ms', met: worst < 100 });
      } finally {
        await srv.close();
        fs.rmSync(dir, { recursive: true, force: true });
      }
    }
  }
  return {
    name: 'stall', title: '14. Stalls: one big request, and a status asked from another client meanwhile',
    sections: [{ title: 'a status every 5 ms over another connection, during the request; ms (RSS in MiB)', columns: ['request', 'cli.ts', 'request took', 'status answers', 'status median', 'p99', 'slowest', 'RSS grown'], rows }],
    targets,
    notes: [
      'The floor row is what no server can split: JSON.parse of a request line of that length (the load_status line, sent as a ping, which reads none of it).',
      ...o.patched.map((p) => `(${p.label}) = ${p.path}`),
    ],
    seconds: (now() - t00) / 1000,
  };
}
