// 6. Durable adds under load: 16 concurrent client processes each add 500 jobs one by
// one over the socket protocol (each add answered only after its fdatasync); adds per
// second, and fdatasync calls counted with strace to show group commit.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { type BenchResult, type Opts, type Target, ROOT, Server, countSyncs, fmt, median, now, quantile, tempDir, track, writeScript } from './lib.ts';

type Outcome = { ms: number; per: number[] };

/** Starts `clients` client processes, lets them all go at once, and resolves with the wall
 *  time from "go" until the last finished plus each client's per-add times. */
async function load(srv: Server, dir: string, script: string, clients: number, each: number, tag: string): Promise<{ ms: number; per: number[] }> {
  const procs = Array.from({ length: clients }, (_, c) => track(spawn('node', ['--import', 'tsx', path.join(ROOT, 'bench', 'durable-client.ts'), srv.socket, dir, script, String(each), `${tag}${c}`], { cwd: ROOT, stdio: ['pipe', 'pipe', 'inherit'] })));
  const outs = procs.map((p) => {
    let out = '';
    p.stdout!.setEncoding('utf8').on('data', (d) => { out += d; });
    const ready = new Promise<void>((resolve, reject) => {
      p.stdout!.on('data', () => { if (out.startsWith('ready\n')) resolve(); });
      p.on('exit', (code) => reject(new Error(`client exited ${code} before it was ready`)));
    });
    const done = new Promise<Outcome>((resolve, reject) => p.on('exit', (code) => {
      if (code !== 0) return reject(new Error(`client exited ${code}`));
      resolve(JSON.parse(out.split('\n').filter(Boolean).at(-1)!));
    }));
    return { p, ready, done };
  });
  await Promise.all(outs.map((x) => x.ready));
  const t0 = now();
  for (const x of outs) x.p.stdin!.end('go\n');
  const results = await Promise.all(outs.map((x) => x.done));
  return { ms: now() - t0, per: results.flatMap((r) => r.per) };
}

export async function durable(o: Opts): Promise<BenchResult> {
  const t00 = now();
  const clients = 16, each = o.quick ? 50 : 500;
  const reps = o.quick ? 1 : o.runs;
  const dir = tempDir('djsb-u-');
  const srv = new Server(dir);
  const notes: string[] = [];
  const rows: string[][] = [];
  const targets: Target[] = [];
  try {
    await srv.start();
    const script = writeScript(path.join(dir, 'job.sh'), 'true');
    let expected = 0;
    const rates: number[] = [];
    let per: number[] = [];
    for (let r = 0; r < reps; r++) {
      const res = await load(srv, dir, script, clients, each, `r${r}c`);
      expected += clients * each;
      rates.push(clients * each / res.ms * 1000);
      per = per.concat(res.per);
      o.log(`durable: ${clients} × ${each} adds in ${fmt(res.ms, 0)} ms = ${fmt(rates.at(-1)!, 0)} adds/s`);
    }
    rows.push([`${clients} clients × ${each} adds`, 'no', fmt(median(rates), 0), fmt(median(per), 2), fmt(quantile(per, 0.99), 2), '', '']);
    // The same with strace counting the server's fdatasync calls (strace slows every
    // syscall of the traced thread, so the rate here is lower).
    const traced = await countSyncs(srv.pid, () => load(srv, dir, script, clients, each, 'tc'), o.log);
    expected += clients * each;
    const tracedRate = clients * each / traced.result.ms * 1000;
    // One client alone: no concurrency, so one fsync per add is all group commit can do.
    const single = await countSyncs(srv.pid, () => load(srv, dir, script, 1, each, 'sc'), o.log);
    expected += each;
    const singleRate = each / single.result.ms * 1000;
    if (traced.syncs === null) notes.push(`fsyncs not counted: ${traced.why}`);
    const perSync = (adds: number, syncs: number | null) => (syncs ? fmt(adds / syncs, 1) : '-');
    rows.push([`${clients} clients × ${each} adds`, 'yes', fmt(tracedRate, 0), fmt(median(traced.result.per), 2), fmt(quantile(traced.result.per, 0.99), 2), traced.syncs === null ? '-' : String(traced.syncs), perSync(clients * each, traced.syncs)]);
    rows.push([`1 client × ${each} adds`, 'yes', fmt(singleRate, 0), fmt(median(single.result.per), 2), fmt(quantile(single.result.per, 0.99), 2), single.syncs === null ? '-' : String(single.syncs), perSync(each, single.syncs)]);
    const status = await srv.connect().then(async (c) => { const s = await c.request({ op: 'status' }); c.close(); return s; });
    const total = (status.counts as { total: number }).total;
    if (total !== expected) throw new Error(`server holds ${total} jobs, expected ${expected}`);
    notes.push(`Clients are ${clients} separate node processes (bench/durable-client.ts) speaking the socket protocol directly (\`{"op":"add_jobs","cwd":…,"jobs":[[script,arg]]}\` → one answer line), because spawning \`cli.ts add_job\` 8,000 times would measure process start-up (see 2), not the server. Every add is answered only after the fdatasync of the batch it was in. The server held all ${expected} jobs afterwards.`);
    if (traced.syncs !== null) {
      targets.push({ what: 'group commit: fdatasyncs per add with 16 concurrent clients', measured: `${traced.syncs} fdatasyncs for ${clients * each} adds (${perSync(clients * each, traced.syncs)} adds per fsync)`, limit: 'far fewer than 1 per add', met: traced.syncs < clients * each / 4 });
    }
    targets.push({ what: 'durable adds per second, 16 concurrent clients (no target set; informational)', measured: `${fmt(median(rates), 0)} adds/s`, limit: '-', met: null });
  } finally {
    await srv.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return {
    name: 'durable', title: '6. Durable adds under load (fsync on, group commit)',
    sections: [{ title: 'adds answered after fdatasync', columns: ['load', 'strace', 'adds/s', 'per add median ms', 'p99 ms', 'fdatasyncs', 'adds per fsync'], rows }],
    targets, notes, seconds: (now() - t00) / 1000,
  };
}
