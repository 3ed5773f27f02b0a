// 3. Add cost does not grow with the queue, and 4. scale. One server per queue size
// (0, 100,000 and 1,000,000 waiting jobs, no workers so nothing runs), all up at once so
// that the measurements can be interleaved across them: the machine's noise then hits
// every size alike. At each size: adding 1,000 more jobs, `status`, memory, restarts.
import fs from 'node:fs';
import path from 'node:path';
import { type BenchResult, type Opts, type Target, Conn, Server, bareCli, envWithNode, fmt, max, median, memOf, now, runOk, sleep, tempDir, writeScript } from './lib.ts';

type Level = {
  size: number; srv: Server;
  build: number[];              // ms of each bulk add_jobs call that built it
  socketAdds: number[];         // ms for 1,000 single-job add_jobs requests, per repetition
  socketPerAdd: number[];       // ms per request (all repetitions pooled)
  cliAdds: number[];            // ms for 10 × `cli.ts add_jobs` of 100 lines, per repetition
  statusRtt: number[];          // socket round trip of {"op":"status"}
  status20: number[]; status24: number[];
  rss: number; hwm: number;     // MiB before the restarts
  stop: number[]; start: number[]; rssAfter: number[]; hwmAfter: number[];
  journalMiB: number; snapshotMiB: number;
  queued: number;
  runs: Run[];                  // dispatch from this full queue, per cli.ts tried
};
type Run = { cli: string; rss: number; gaps: number[]; rate: number };

/** Lets the server run jobs out of its queue: first on one slot with the stamp flag on
 *  (gaps between one job's end and the next one's start), then on 8 slots without it,
 *  counting finished jobs over `windowMs`. Leaves the workers draining. */
async function drain(srv: Server, label: string, script: string, flag: string, ts: string, windowMs: number): Promise<Run> {
  const conn = await srv.connect();
  const done = async () => ((await conn.request({ op: 'status' })).counts as { done: number }).done;
  // Enough waiting jobs for both phases (the small queues get topped up).
  const waiting = ((await conn.request({ op: 'status' })).counts as { waiting: number }).waiting;
  const need = windowMs * 2 + 2000;
  if (waiting < need) await conn.request({ op: 'add_jobs', cwd: path.dirname(flag), jobs: Array.from({ length: need - waiting }, () => [script]) });
  const rss = memOf(srv.pid).rss;
  fs.writeFileSync(flag, '');
  for (const f of fs.readdirSync(ts)) fs.rmSync(path.join(ts, f));
  const d0 = await done();
  await srv.ok(['add_slave', '--skip_ssh_auth_check', 'one:1']);
  const deadline = Date.now() + 20_000;
  while ((await done()) < d0 + 31 && Date.now() < deadline) await sleep(50);
  await srv.ok(['remove_slave', '--wait', 'one']);
  await sleep(200);
  fs.rmSync(flag);
  const stamps = new Map<number, { s?: number; e?: number }>();
  for (const f of fs.readdirSync(ts)) {
    const m = /^(\d+)\.(s|e)$/.exec(f);
    const text = m ? fs.readFileSync(path.join(ts, f), 'utf8').trim() : '';
    if (!m || !text) continue;
    const rec = stamps.get(Number(m[1])) ?? {};
    rec[m[2] as 's' | 'e'] = Number(text) / 1e6;
    stamps.set(Number(m[1]), rec);
  }
  const gaps: number[] = [];
  for (const [id, rec] of stamps) { const nx = stamps.get(id + 1); if (rec.e !== undefined && nx?.s !== undefined) gaps.push(nx.s - rec.e); }
  await srv.ok(['add_slave', '--skip_ssh_auth_check', 'eight:8']);
  await sleep(1000);
  const a = await done(), t0 = now();
  await sleep(windowMs);
  const b = await done(), t1 = now();
  await srv.ok(['remove_slave', '--wait', 'eight']);
  await sleep(300);
  conn.close();
  return { cli: label, rss, gaps, rate: (b - a) / (t1 - t0) * 1000 };
}

const fileMiB = (f: string) => (fs.existsSync(f) ? fs.statSync(f).size / 2 ** 20 : 0);

export async function queue(o: Opts): Promise<BenchResult> {
  const t00 = now();
  const sizes = o.quick ? [0, 2_000, 10_000] : [0, 100_000, 1_000_000];
  const bulk = o.quick ? 1_000 : 100_000;
  const reps = o.quick ? 1 : o.runs;
  const dir = tempDir('djsb-q-');
  const notes: string[] = [];
  const env24 = o.node24 ? envWithNode(o.node24) : null;
  const bare24 = env24 ? bareCli(dir) : '';
  const levels: Level[] = sizes.map((size) => ({
    size, srv: new Server(path.join(dir, `q${size}`)), build: [], socketAdds: [], socketPerAdd: [], cliAdds: [], statusRtt: [], status20: [], status24: [],
    rss: 0, hwm: 0, stop: [], start: [], rssAfter: [], hwmAfter: [], journalMiB: 0, snapshotMiB: 0, queued: 0, runs: [],
  }));
  let peakHwm = 0;
  const peak = (srv: Server) => { const m = memOf(srv.pid); peakHwm = Math.max(peakHwm, m.hwm); return m; };
  try {
    // The jobs do nothing unless the flag file exists; then they stamp their start and end.
    const flag = path.join(dir, 'stamp'), ts = path.join(dir, 'ts');
    fs.mkdirSync(ts);
    const script = writeScript(path.join(dir, 'job.sh'), `[ -f ${flag} ] && { date +%s%N > ${ts}/$JOB_ID.s; date +%s%N > ${ts}/$JOB_ID.e; }\nexit 0`);
    // Realistic lines: a script with an input and an output argument.
    const line = (i: number) => `./job.sh /data/in/sample-${String(i).padStart(7, '0')}.dat --out /data/out/result-${String(i).padStart(7, '0')}\n`;
    const bulkFile = path.join(dir, 'bulk.txt');
    fs.writeFileSync(bulkFile, Array.from({ length: bulk }, (_, i) => line(i)).join(''));
    const smallFile = path.join(dir, 'small.txt');
    fs.writeFileSync(smallFile, Array.from({ length: 100 }, (_, i) => line(i)).join(''));
    for (const lv of levels) {
      fs.mkdirSync(path.dirname(lv.srv.dataDir), { recursive: true });
      await lv.srv.start();
      while (lv.queued < lv.size) {
        const r = await lv.srv.ok(['add_jobs', bulkFile], { cwd: dir, quiet: true });
        lv.queued += bulk;
        lv.build.push(r.ms);
        const m = peak(lv.srv);
        if ((lv.queued / bulk) % 2 === 0 || lv.queued >= lv.size) o.log(`queue: ${lv.queued} jobs queued (last add_jobs of ${bulk}: ${fmt(r.ms, 0)} ms, VmRSS ${fmt(m.rss, 0)} MiB)`);
      }
    }
    // 3. Adding 1,000 jobs, interleaved across the sizes in slices of 100 requests.
    const conns = await Promise.all(levels.map((lv) => lv.srv.connect()));
    for (let r = 0; r < reps; r++) {
      const sums = levels.map(() => 0);
      for (let slice = 0; slice < 10; slice++) {
        for (let k = 0; k < levels.length; k++) {
          const t0 = now();
          for (let i = 0; i < 100; i++) {
            const t1 = now();
            await conns[k].request({ op: 'add_jobs', cwd: dir, jobs: [[script, `/data/in/extra-${r}-${slice}-${i}.dat`]] });
            levels[k].socketPerAdd.push(now() - t1);
          }
          sums[k] += now() - t0;
        }
      }
      levels.forEach((lv, k) => { lv.socketAdds.push(sums[k]); lv.queued += 1000; });
      const cliSums = levels.map(() => 0);
      for (let i = 0; i < 10; i++) {
        for (let k = 0; k < levels.length; k++) {
          const res = await levels[k].srv.ok(['add_jobs', smallFile], { cwd: dir, quiet: true });
          cliSums[k] += res.ms;
        }
      }
      levels.forEach((lv, k) => { lv.cliAdds.push(cliSums[k]); lv.queued += 1000; });
      o.log(`queue: adds round ${r + 1}/${reps}: ${levels.map((lv) => `@${lv.size}: ${fmt(lv.socketAdds.at(-1)!, 0)} ms socket, ${fmt(lv.cliAdds.at(-1)!, 0)} ms cli`).join('; ')}`);
    }
    // 4. status, interleaved; then memory.
    for (let i = 0; i < 15; i++) {
      for (let k = 0; k < levels.length; k++) {
        const t0 = now();
        const s = await conns[k].request({ op: 'status' });
        levels[k].statusRtt.push(now() - t0);
        const waiting = (s.counts as { waiting: number }).waiting;
        if (waiting !== levels[k].queued) throw new Error(`status says ${waiting} waiting, expected ${levels[k].queued}`);
      }
    }
    conns.forEach((c: Conn) => c.close());
    for (let i = 0; i < 7; i++) {
      for (const lv of levels) {
        lv.status20.push((await lv.srv.ok(['status'])).ms);
        if (env24) lv.status24.push((await runOk(bare24, ['--data-dir', lv.srv.dataDir, 'status'], { env: env24 })).ms);
      }
    }
    for (const lv of levels) {
      ({ rss: lv.rss, hwm: lv.hwm } = peak(lv.srv));
      lv.journalMiB = fileMiB(path.join(lv.srv.dataDir, 'journal'));
      lv.snapshotMiB = fileMiB(path.join(lv.srv.dataDir, 'snapshot'));
    }
    // Restarts: stop, then start until the ready line, round-robin over the sizes.
    for (let r = 0; r < reps; r++) {
      for (const lv of levels) {
        lv.stop.push(await lv.srv.stop());
        lv.start.push(await lv.srv.start());
        const m = peak(lv.srv);
        lv.rssAfter.push(m.rss); lv.hwmAfter.push(m.hwm);
      }
    }
    // Dispatch out of the full queues: one slot (end → next start gaps), then 8 slots
    // (jobs/s), with this cli.ts and, when given, the patched one on the same data dir.
    const clis = [{ label: 'cli.ts', path: levels[0].srv.cliPath }, ...o.patched];
    for (const lv of levels) {
      for (const c of clis) {
        if (c.path !== lv.srv.cliPath) {
          await lv.srv.stop();
          const before = lv.srv.allOutput;
          lv.srv = new Server(path.dirname(lv.srv.dataDir), lv.srv.env, c.path);
          lv.srv.allOutput = before;
          await lv.srv.start();
        }
        lv.runs.push(await drain(lv.srv, c.label, script, flag, ts, o.quick ? 2_000 : 5_000));
        const r = lv.runs.at(-1)!;
        o.log(`queue @${lv.size} ${c.label}: RSS ${fmt(r.rss, 0)} MiB, end → next start ${fmt(median(r.gaps), 1)} ms (n=${r.gaps.length}), 8 slots ${fmt(r.rate, 0)} jobs/s`);
        peak(lv.srv);
      }
    }
    for (const lv of levels) {
      o.log(`queue @${lv.size}: status rtt ${fmt(median(lv.statusRtt))} ms, cli(20) ${fmt(median(lv.status20))} ms${env24 ? `, cli(24) ${fmt(median(lv.status24))} ms` : ''}; VmRSS ${fmt(lv.rss, 0)} MiB, HWM ${fmt(lv.hwm, 0)} MiB; restart ${fmt(median(lv.stop), 0)} + ${fmt(median(lv.start), 0)} ms`);
      const snaps = [...lv.srv.allOutput.matchAll(/snapshot of (\d+) jobs written in (\d+) ms/g)];
      if (snaps.length) notes.push(`server @${lv.size.toLocaleString('en')} wrote snapshots: ${snaps.map((m) => `${Number(m[1]).toLocaleString('en')} jobs in ${m[2]} ms`).join(', ')}`);
    }
  } finally {
    for (const lv of levels) await lv.srv.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }

  const first = levels[0], last = levels[levels.length - 1];
  const addRows = levels.map((l) => [
    l.size.toLocaleString('en'), fmt(median(l.socketAdds), 0), fmt(median(l.socketAdds) / median(first.socketAdds), 2),
    `${fmt(median(l.socketPerAdd), 2)} / ${fmt(max(l.socketPerAdd), 1)}`,
    fmt(median(l.cliAdds), 0), fmt(median(l.cliAdds) / median(first.cliAdds), 2),
  ]);
  const scaleRows = levels.map((l) => [
    l.size.toLocaleString('en'), fmt(median(l.statusRtt), 2), fmt(median(l.status20), 0), l.status24.length ? fmt(median(l.status24), 0) : '-',
    fmt(l.rss, 0), fmt(l.hwm, 0), fmt(median(l.stop), 0), fmt(median(l.start), 0), fmt(median(l.stop) + median(l.start), 0),
    `${fmt(median(l.rssAfter), 0)} / ${fmt(max(l.hwmAfter), 0)}`, `${fmt(l.journalMiB, 1)} / ${fmt(l.snapshotMiB, 1)}`,
  ]);
  const ratio = median(last.socketAdds) / median(first.socketAdds);
  const cliRatio = median(last.cliAdds) / median(first.cliAdds);
  const restart = median(last.stop) + median(last.start);
  const n = last.size.toLocaleString('en');
  const targets: Target[] = [
    { what: `add 1,000 jobs at ${n} vs empty (1,000 single adds over the socket)`, measured: `${fmt(ratio, 2)}×`, limit: '≤ 1.2×', met: ratio <= 1.2 },
    { what: `same, as 10 × \`cli.ts add_jobs\` of 100 (Node 20 client)`, measured: `${fmt(cliRatio, 2)}×`, limit: '≤ 1.2×', met: cliRatio <= 1.2 },
    { what: `status at ${n} jobs: socket round trip`, measured: `${fmt(median(last.statusRtt), 2)} ms`, limit: '≤ 200 ms', met: median(last.statusRtt) <= 200 },
  ];
  if (last.status24.length) targets.push({ what: `status at ${n} jobs: \`cli.ts status\` on Node 24`, measured: `${fmt(median(last.status24), 0)} ms (at 0 jobs: ${fmt(median(first.status24), 0)} ms)`, limit: '≤ 200 ms', met: median(last.status24) <= 200 });
  targets.push(
    { what: `status at ${n} jobs: \`cli.ts status\` on Node 20 (the cached JS copy)`, measured: `${fmt(median(last.status20), 0)} ms (at 0 jobs: ${fmt(median(first.status20), 0)} ms)`, limit: '≤ 200 ms', met: median(last.status20) <= 200 },
    { what: `restart (stop, then start until ready) at ${n} jobs`, measured: `${fmt(restart / 1000, 2)} s`, limit: '< 10 s', met: restart < 10_000 },
    { what: `server memory: peak VmHWM over all sizes, builds and restarts`, measured: `${fmt(peakHwm, 0)} MiB`, limit: '< 1024 MiB', met: peakHwm < 1024 },
  );
  for (const r of last.runs) {
    targets.push({ what: `${r.cli}: job end → next start on one slot, with ${n} jobs in the state`, measured: `${fmt(median(r.gaps), 1)} ms (empty: ${fmt(median(first.runs.find((x) => x.cli === r.cli)?.gaps ?? []), 1)} ms)`, limit: '< 20 ms', met: median(r.gaps) < 20 });
  }
  const builds = levels.flatMap((l) => l.build);
  if (builds.length) notes.push(`Queues were built with \`cli.ts add_jobs\` of ${bulk.toLocaleString('en')} lines each (median ${fmt(median(builds), 0)} ms per call = ${fmt(bulk / median(builds) * 1000, 0)} jobs/s), lines like \`./job.sh /data/in/sample-0000001.dat --out /data/out/result-0000001\`; no workers, so nothing ran.`);
  notes.push(`"1,000 socket adds": 1,000 single-job \`{"op":"add_jobs"}\` requests on one connection, one after another, each answered after its fdatasync; sent in slices of 100 rotating over the three servers. "10 × cli add_jobs": 10 runs of \`cli.ts add_jobs FILE\` with 100 lines (Node 20 client), rotating likewise. ${reps} repetitions; medians.`);
  notes.push('Dispatch out of the full queue runs after the restarts; a queue with fewer than 2 × window × 1 job/ms + 2,000 waiting jobs is first topped up with that many (so the "0" server then holds about 12,000). Rows named after a --patched copy restart the same data dir with that cli.ts.');
  notes.push('Restart = `cli.ts stop` (returns once the process is gone) + `cli.ts start` until its "server ready" line; RSS/HWM after restart are of the new process just after it is ready.');
  return {
    name: 'queue', title: '3. Add cost vs queue size, and 4. scale (status, restart, memory)',
    sections: [
      { title: 'adding 1,000 jobs into a queue that already holds N waiting jobs', columns: ['N waiting', '1,000 socket adds ms', '× empty', 'per add median / max ms', '10 × cli add_jobs(100) ms', '× empty'], rows: addRows },
      { title: 'dispatch out of the full queue (one slot: end of a job → start of the next, median of ~30; then 8 slots: finished jobs/s over a window)', columns: ['N jobs', 'cli.ts', 'server VmRSS MiB', 'end → next start ms', '8 slots jobs/s'],
        rows: levels.flatMap((l) => l.runs.map((r) => [l.size.toLocaleString('en'), r.cli, fmt(r.rss, 0), `${fmt(median(r.gaps), 1)} (n=${r.gaps.length})`, fmt(r.rate, 0)])) },
      { title: 'status, memory and restart', columns: ['N jobs', 'status rtt ms', 'cli status N20 ms', 'cli status N24 ms', 'VmRSS MiB', 'VmHWM MiB', 'stop ms', 'start ms', 'restart ms', 'after restart RSS / HWM MiB', 'journal / snapshot MiB'], rows: scaleRows },
    ],
    targets, notes, seconds: (now() - t00) / 1000,
  };
}
