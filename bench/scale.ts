// A big queue without a stall: at 100,000 and 1,000,000 jobs (10,000 and 100,000 with
// --quick), for this cli.ts and each --patched copy (the same sizes one after the other,
// so the machine's load is shared): ten adds of a tenth each while a worker of 2 slots
// starts and ends jobs and a `status` is asked every 5 ms over another connection; the
// journal threshold (DJS_SNAPSHOT_MIN_BYTES) is set so that a snapshot is written during
// the ninth or tenth add. Then the filters' first answers (state, worker, tag, text; ten
// failed jobs are the oldest), the first row of `list --state failed` and of a whole
// `list`, a restart and its memory.
// Only when named: `npm run bench -- scale [--patched /tmp/djs-main/cli.ts]`.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { type BenchResult, type Opts, type Target, CLI, Server, envWithNode, fmt, memOf, now, quantile, sleep, tempDir, until, writeScript } from './lib.ts';

type Sample = { ms: number; snap: boolean };

/** Asks status over its own connection every 5 ms until stopped; each round trip, and
 *  whether a snapshot was being written (its temp file there) when it was asked or
 *  answered. */
async function probe(srv: Server): Promise<{ stop: () => Promise<Sample[]> }> {
  const conn = await srv.connect();
  const tmp = path.join(srv.dataDir, 'snapshot.tmp');
  const samples: Sample[] = [];
  let running = true;
  const done = (async () => {
    while (running) {
      const before = fs.existsSync(tmp), a = now();
      await conn.request({ op: 'status' });
      samples.push({ ms: now() - a, snap: before || fs.existsSync(tmp) });
      await sleep(5);
    }
  })();
  return { stop: async () => { running = false; await done; conn.close(); return samples; } };
}

/** The ms until the first line of an answer (a stream's first rows, or the whole answer). */
function firstLine(srv: Server, msg: object): Promise<{ ms: number; line: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const a = now();
    const sock = net.connect(srv.socket);
    let buf = '';
    sock.on('error', reject);
    sock.on('connect', () => sock.write(JSON.stringify(msg) + '\n'));
    sock.on('data', (d) => {
      buf += d;
      const nl = buf.indexOf('\n');
      if (nl >= 0) { const ms = now() - a; sock.destroy(); resolve({ ms, line: JSON.parse(buf.slice(0, nl)) }); }
    });
  });
}

export async function scale(o: Opts): Promise<BenchResult> {
  const t00 = now();
  const sizes = o.quick ? [10_000, 100_000] : [100_000, 1_000_000];
  const versions = [{ label: 'this', cli: CLI }, ...o.patched.map((p) => ({ label: p.label, cli: p.path }))];
  const rows: string[][] = [], filters: string[][] = [];
  const targets: Target[] = [];
  const notes: string[] = [];
  for (const n of sizes) {
    for (const v of versions) {
      const dir = tempDir('djsb-sc-');
      // The first 10 jobs fail, the rest succeed; one old job's argument is `needle`.
      const script = writeScript(path.join(dir, 'j'), '[ "$1" = fail ] && exit 1; exit 0');
      const part = n / 10;
      const jobsOf = (k: number) => Array.from({ length: part }, (_, i) => [script, k === 0 && i < 10 ? 'fail' : k === 0 && i === 20 ? 'needle' : String(k * part + i)]);
      const perAdd = Buffer.byteLength(JSON.stringify(jobsOf(1)));
      const env = { ...envWithNode(null), DJS_SNAPSHOT_MIN_BYTES: String(Math.round(perAdd * 8.5)) };
      const srv = new Server(dir, env, v.cli);
      try {
        await srv.start();
        o.log(`scale: ${v.label} at ${n.toLocaleString('en')} jobs`);
        const conn = await srv.connect();
        const p = await probe(srv);
        await sleep(100);
        const a = now();
        for (let k = 0; k < 10; k++) {
          await conn.request({ op: 'add_jobs', cwd: dir, jobs: jobsOf(k), ...(k === 9 ? { tags: ['last'] } : {}) });
          if (k === 0) await conn.request({ op: 'add_workers', workers: [{ host: 'w', slots: 2, auto: false, gpus: 0, labels: [], env: [] }], skipCheck: true });
        }
        const addMs = now() - a;
        const snapLog = () => /snapshot of (\d+) jobs written in (\d+) ms/.exec(srv.allOutput);
        await until(() => snapLog() && !fs.existsSync(path.join(srv.dataDir, 'snapshot.tmp')), 'the snapshot', 300_000, 50);
        await sleep(300);
        const samples = await p.stop();
        await conn.request({ op: 'pause' });
        await until(async () => (await conn.request({ op: 'status' }) as { counts: { failed: number; running: number } }).counts.running === 0, 'the running jobs to end', 60_000, 50);
        const st = await conn.request({ op: 'status' }) as { counts: Record<string, number> };
        conn.close();
        const worst = Math.max(...samples.map((s) => s.ms));
        const during = samples.filter((s) => s.snap).map((s) => s.ms);
        const hwm = memOf(srv.pid).hwm;
        // Filters: the first answer of each, and what it held.
        const ask = async (what: string, msg: Record<string, unknown>) => {
          const r = await firstLine(srv, msg);
          const got = Array.isArray(r.line.rows) ? (r.line.rows as unknown[]).length : 0;
          filters.push([n.toLocaleString('en'), v.label, what, fmt(r.ms, 1), String(got), String(r.line.next ?? (r.line.ok === undefined ? '(stream)' : 'null'))]);
          return r.ms;
        };
        const fms = [
          await ask('/api/jobs?state=failed', { op: 'jobs', state: 'failed' }),
          await ask('/api/jobs?worker=w', { op: 'jobs', worker: 'w' }),
          await ask('/api/jobs?tag=last&state=waiting', { op: 'jobs', tag: 'last', state: 'waiting' }),
          await ask('/api/jobs?text=needle', { op: 'jobs', text: 'needle' }),
          await ask('list --state failed: first rows', { op: 'list', state: 'failed' }),
          await ask('list: first rows', { op: 'list' }),
        ];
        const stopMs = await srv.stop();
        const readyMs = await srv.start();
        await sleep(500);
        const rss = memOf(srv.pid).rss;
        const sl = snapLog();
        rows.push([n.toLocaleString('en'), v.label, fmt(addMs, 0), sl ? `${sl[2]} (${Number(sl[1]).toLocaleString('en')} jobs)` : '-', String(samples.length),
          fmt(quantile(samples.map((s) => s.ms), 0.5), 1), fmt(quantile(samples.map((s) => s.ms), 0.99), 1), fmt(worst, 0),
          during.length ? `${fmt(Math.max(...during), 0)} (n=${during.length})` : '-', fmt(stopMs, 0), fmt(readyMs, 0), fmt(rss, 0), fmt(hwm, 0),
          `${st.counts.done}/${st.counts.failed}`]);
        targets.push({ what: `${n.toLocaleString('en')} jobs (${v.label}): slowest status while adds, starts, ends and a snapshot go on`, measured: `${fmt(worst, 0)} ms`, limit: '< 100 ms', met: worst < 100 });
        targets.push({ what: `${n.toLocaleString('en')} jobs (${v.label}): slowest first answer of a filter by state, worker, tag`, measured: `${fmt(Math.max(...fms.slice(0, 3)), 1)} ms`, limit: '< 50 ms', met: Math.max(...fms.slice(0, 3)) < 50 });
      } finally {
        await srv.close();
        fs.rmSync(dir, { recursive: true, force: true });
      }
    }
  }
  notes.push('Adds: 10 add_jobs requests of a tenth each over one connection (the first 10 jobs fail); a worker of 2 slots runs them meanwhile. DJS_SNAPSHOT_MIN_BYTES is 8.5 adds\' worth of journal, so a snapshot is due after the ninth add.');
  notes.push('"during snapshot": the status round trips asked or answered while DATA_DIR/snapshot.tmp existed. Filters are asked after the run, with the worker paused.');
  for (const p of o.patched) notes.push(`(${p.label}) = ${p.path}`);
  return {
    name: 'scale', title: '15. A big queue: status while a snapshot is written, filters, restart',
    sections: [
      { title: 'status every 5 ms over another connection while 10 adds run (ms; memory in MiB)', columns: ['jobs', 'cli.ts', 'adds took', 'snapshot took (log)', 'status answers', 'median', 'p99', 'slowest', 'slowest during snapshot', 'stop', 'restart (ready)', 'RSS after restart', 'peak RSS', 'done/failed'], rows },
      { title: 'first answer of each filter (ms until its first line; rows in it; its next)', columns: ['jobs', 'cli.ts', 'request', 'ms', 'rows', 'next'], rows: filters },
    ],
    targets, notes,
    seconds: (now() - t00) / 1000,
  };
}
