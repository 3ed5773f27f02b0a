// Campaigns at scale, each against a baseline measured in the same run:
//   1. adding 100,000 jobs as one sweep (`add_job ./job.sh {1} {2} ::: 1..1000 ::: 1..100`)
//      against the same 100,000 jobs as an `add_jobs` file, whole commands, interleaved;
//   2. dispatch (jobs/s over 8 slots) out of 1,000,000 waiting jobs spread over 10
//      priorities with 1,000 more held by a dependency that is not met, against dispatch
//      out of a plain queue of 1,000,000: two servers, windows interleaved;
//   3. adding one job (with a priority and a tag) at that 1,000,000-job server against an
//      empty one: 1,000 single requests each, interleaved;
//   4. `set_priority N --tag T` of a tag of 10,000 jobs in the big server, against
//      `set_priority N ID` of one job (the command's cost without the tag).
import fs from 'node:fs';
import path from 'node:path';
import { type BenchResult, type Conn, type Opts, type Target, Server, cpuOf, fmt, median, memOf, now, sleep, tempDir, writeScript } from './lib.ts';

const range = (n: number) => Array.from({ length: n }, (_, i) => String(i + 1));

/** Jobs finished per second over `windowMs` with 8 slots, and the server's own CPU time
 *  per job (ms) meanwhile, which the machine's other load disturbs far less than the
 *  rate; leaves no worker behind. */
async function rate(srv: Server, conn: Conn, windowMs: number): Promise<{ rate: number; cpu: number }> {
  const done = async () => ((await conn.request({ op: 'status' })).counts as { done: number }).done;
  await srv.ok(['add_slave', '--skip_ssh_auth_check', 'eight:8']);
  await sleep(1000);
  const a = await done(), t0 = now(), c0 = cpuOf(srv.pid);
  await sleep(windowMs);
  const b = await done(), t1 = now(), c1 = cpuOf(srv.pid);
  await srv.ok(['remove_slave', '--wait', 'eight']);
  return { rate: ((b - a) / (t1 - t0)) * 1000, cpu: ((c1 - c0) * 1000) / Math.max(1, b - a) };
}

export async function campaign(o: Opts): Promise<BenchResult> {
  const t00 = now();
  const big = o.quick ? 20_000 : 1_000_000, sweep = o.quick ? [100, 20] : [1000, 100];
  const rounds = o.quick ? 1 : o.runs;
  const dir = tempDir('djsb-c-');
  const script = writeScript(path.join(dir, 'job.sh'), 'exit 0');
  const notes: string[] = [];
  const servers: Server[] = [];
  const serve = async (name: string) => { const s = new Server(path.join(dir, name)); servers.push(s); await s.start(); return s; };
  const sweepJobs = sweep[0] * sweep[1];
  const addSweep: number[] = [], addFile: number[] = [], journalSweep: number[] = [], journalFile: number[] = [];
  const ratePlain: number[] = [], rateCampaign: number[] = [], cpuPlain: number[] = [], cpuCampaign: number[] = [];
  const addEmpty: number[] = [], addBig: number[] = [];
  const prioTag: number[] = [], prioOne: number[] = [];
  let rssPlain = 0, rssCampaign = 0;
  try {
    // 1. A sweep against a file of the same jobs, each into a server of its own.
    const file = path.join(dir, 'jobs.txt');
    let text = '';
    for (const a of range(sweep[0])) for (const b of range(sweep[1])) text += `./job.sh ${a} ${b}\n`;
    fs.writeFileSync(file, text);
    const [sw, sf] = [await serve('sweep'), await serve('file')];
    const journalOf = (s: Server) => fs.statSync(path.join(s.dataDir, 'journal')).size;
    for (let r = 0; r < rounds; r++) {
      let j0 = journalOf(sw);
      addSweep.push((await sw.ok(['add_job', './job.sh', '{1}', '{2}', ':::', ...range(sweep[0]), ':::', ...range(sweep[1])], { cwd: dir, quiet: true })).ms);
      journalSweep.push(journalOf(sw) - j0);
      j0 = journalOf(sf);
      addFile.push((await sf.ok(['add_jobs', file], { cwd: dir, quiet: true })).ms);
      journalFile.push(journalOf(sf) - j0);
      o.log(`campaign: ${sweepJobs} jobs as a sweep ${fmt(addSweep.at(-1)!, 0)} ms, as a file ${fmt(addFile.at(-1)!, 0)} ms`);
    }
    for (const s of [sw, sf]) await s.close();

    // 2. The two big queues. The campaign one: 10 priorities of big/10 jobs each (one sweep
    //    each), and 1,000 jobs held for a job of the lowest priority, which never runs here.
    const plain = await serve('plain'), camp = await serve('camp');
    const cp = await plain.connect(), cc = await camp.connect();
    const half = Math.sqrt(big / 10);
    const lists = [range(Math.ceil(half)), range(Math.floor(big / 10 / Math.ceil(half)))];
    for (let p = 0; p < 10; p++) {
      await cp.request({ op: 'add_jobs', cwd: dir, jobs: [[script, '{1}', '{2}']], sweep: lists });
      await cc.request({ op: 'add_jobs', cwd: dir, jobs: [[script, '{1}', '{2}']], sweep: lists, priority: p * 10 - 40, tags: [`p${p}`] });
    }
    const lowest = ((await cc.request({ op: 'add_jobs', cwd: dir, jobs: [[script, 'last']], priority: -100 })).first) as number;
    await cc.request({ op: 'add_jobs', cwd: dir, jobs: [[script, 'held', '{1}']], sweep: [range(1000)], after: [lowest], tags: ['held'] });
    await cc.request({ op: 'add_jobs', cwd: dir, jobs: [[script, 'ten', '{1}']], sweep: [range(10_000)], tags: ['ten'] });
    await cp.request({ op: 'add_jobs', cwd: dir, jobs: [[script, 'more', '{1}']], sweep: [range(11_001)] });
    const waiting = async (c: Conn) => ((await c.request({ op: 'status' })).counts as { waiting: number }).waiting;
    o.log(`campaign: queues built: plain ${await waiting(cp)} waiting, campaign ${await waiting(cc)} waiting (1,000 of them held)`);
    rssPlain = memOf(plain.pid).rss; rssCampaign = memOf(camp.pid).rss;
    for (let r = 0; r < rounds; r++) {
      for (const [srv, conn, rates, cpus] of [[plain, cp, ratePlain, cpuPlain], [camp, cc, rateCampaign, cpuCampaign]] as const) {
        const m = await rate(srv, conn, o.quick ? 2000 : 5000);
        rates.push(m.rate); cpus.push(m.cpu);
      }
      o.log(`campaign: dispatch round ${r + 1}: plain ${fmt(ratePlain.at(-1)!, 0)} jobs/s (${fmt(cpuPlain.at(-1)!, 2)} ms CPU/job), campaign ${fmt(rateCampaign.at(-1)!, 0)} jobs/s (${fmt(cpuCampaign.at(-1)!, 2)} ms CPU/job)`);
    }

    // 3. Adding one job at a time: the big campaign server against an empty one.
    const empty = await serve('empty');
    const ce = await empty.connect();
    for (let r = 0; r < rounds; r++) {
      // In slices of 100 requests, alternating, so the machine's noise hits both alike.
      const sums = [0, 0];
      for (let slice = 0; slice < 10; slice++) {
        for (const [k, c] of [ce, cc].entries()) {
          const t0 = now();
          for (let i = slice * 100; i < slice * 100 + 100; i++) await c.request({ op: 'add_jobs', cwd: dir, jobs: [[script, `x${i}`]], priority: i % 10, tags: ['adds'] });
          sums[k] += now() - t0;
        }
      }
      addEmpty.push(sums[0]); addBig.push(sums[1]);
      o.log(`campaign: 1,000 adds: empty ${fmt(addEmpty.at(-1)!, 0)} ms, at ${big} ${fmt(addBig.at(-1)!, 0)} ms`);
    }

    // 4. set_priority of a tag of 10,000 jobs, and of one job.
    const one = String((await cc.request({ op: 'add_jobs', cwd: dir, jobs: [[script, 'one']] })).first);
    for (let r = 0; r < rounds * 3; r++) {
      prioTag.push((await camp.ok(['set_priority', String(r % 2 ? 3 : 4), '--tag', 'ten'], { quiet: true })).ms);
      prioOne.push((await camp.ok(['set_priority', String(r % 2 ? 3 : 4), one], { quiet: true })).ms);
    }
    for (const c of [cp, cc, ce]) c.close();
  } finally {
    for (const s of servers) await s.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const ratio = median(cpuCampaign) / median(cpuPlain);
  const addRatio = median(addBig) / median(addEmpty);
  const targets: Target[] = [
    { what: 'dispatch out of 1,000,000 jobs over 10 priorities with 1,000 held, against a plain queue (server CPU per job)', measured: `${fmt(ratio, 2)}×`, limit: '≤ 1.1×', met: o.quick ? null : ratio <= 1.1 },
    { what: 'adding a job at 1,000,000 waiting (priorities, tags) against none', measured: `${fmt(addRatio, 2)}×`, limit: '≤ 1.2×', met: o.quick ? null : addRatio <= 1.2 },
  ];
  notes.push(`the campaign server held ${fmt(rssCampaign, 0)} MiB (VmRSS) against the plain one's ${fmt(rssPlain, 0)} MiB`);
  notes.push(`a sweep is journaled as its template and value lists: ${fmt(median(journalSweep) / 1024, 1)} KiB for ${sweepJobs.toLocaleString('en')} jobs, against ${fmt(median(journalFile) / 2 ** 20, 1)} MiB as a file`);
  return {
    name: 'campaign', title: 'Campaigns: sweeps, priorities, dependencies at scale',
    sections: [
      { title: `adding ${sweepJobs.toLocaleString('en')} jobs (whole command, ms; median of ${rounds})`, columns: ['as', 'ms', 'journal bytes', 'ratio'], rows: [
        ['one sweep (`::: ` lists)', fmt(median(addSweep), 0), String(median(journalSweep)), fmt(median(addSweep) / median(addFile), 2)],
        ['an add_jobs file', fmt(median(addFile), 0), String(median(journalFile)), '1.00'],
      ] },
      { title: `dispatch over 8 slots out of ${big.toLocaleString('en')} waiting jobs (median of ${rounds} windows, interleaved)`, columns: ['queue', 'jobs/s', 'server CPU ms/job', 'jobs/s per window'], rows: [
        ['plain (one priority)', fmt(median(ratePlain), 0), fmt(median(cpuPlain), 3), ratePlain.map((x) => fmt(x, 0)).join(' ')],
        ['10 priorities + 1,000 held by a dependency', fmt(median(rateCampaign), 0), fmt(median(cpuCampaign), 3), rateCampaign.map((x) => fmt(x, 0)).join(' ')],
        ['ratio', fmt(median(ratePlain) / median(rateCampaign), 2), fmt(ratio, 2), ''],
      ] },
      { title: '1,000 single-job adds with a priority and a tag (socket, ms)', columns: ['server', 'ms', 'ratio'], rows: [
        ['empty', fmt(median(addEmpty), 0), '1.00'],
        [`${big.toLocaleString('en')} waiting`, fmt(median(addBig), 0), fmt(addRatio, 2)],
      ] },
      { title: `set_priority (whole command, ms; median of ${prioTag.length}) in the ${big.toLocaleString('en')}-job server`, columns: ['of', 'ms'], rows: [
        ['a tag of 10,000 waiting jobs', fmt(median(prioTag), 0)],
        ['one job (the command\'s own cost)', fmt(median(prioOne), 0)],
      ] },
    ],
    targets, notes, seconds: (now() - t00) / 1000,
  };
}
