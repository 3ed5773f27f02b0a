// Placement at scale, each against a baseline measured in the same run:
//   1. dispatch of 5,000 plain jobs over 8 slots with 100,000 waiting jobs ahead of them
//      that require a label no worker has, against the same 5,000 with nothing ahead:
//      two servers, rounds interleaved; wall time from the workers' arrival to the last
//      end, and the server's CPU time per job;
//   2. adding one job with requirements (1,000 single requests) at a server holding
//      1,000,000 waiting jobs with requirements (10 kinds), against an empty server.
import fs from 'node:fs';
import path from 'node:path';
import { type BenchResult, type Opts, type Target, Server, cpuOf, fmt, median, now, tempDir, writeScript } from './lib.ts';

const range = (n: number) => Array.from({ length: n }, (_, i) => String(i + 1));

export async function placement(o: Opts): Promise<BenchResult> {
  const t00 = now();
  const plain = o.quick ? 1_000 : 5_000, ahead = o.quick ? 10_000 : 100_000, big = o.quick ? 20_000 : 1_000_000;
  const rounds = o.quick ? 1 : o.runs;
  const dir = tempDir('djsb-p-');
  const script = writeScript(path.join(dir, 'job.sh'), 'exit 0');
  const servers: Server[] = [];
  const serve = async (name: string) => { const s = new Server(path.join(dir, name)); servers.push(s); await s.start(); return s; };
  const msWith: number[] = [], msWithout: number[] = [], cpuWith: number[] = [], cpuWithout: number[] = [];
  const addEmpty: number[] = [], addBig: number[] = [];
  try {
    // 1. Each round: a fresh pair of servers (so the 5,000 are always behind the same queue).
    for (let r = 0; r < rounds; r++) {
      for (const withAhead of [true, false]) {
        const s = await serve(`d${r}${withAhead ? 'a' : 'b'}`);
        const c = await s.connect();
        if (withAhead) await c.request({ op: 'add_jobs', cwd: dir, jobs: [[script, 'gpu', '{1}']], sweep: [range(ahead)], require: ['gpu'] });
        const first = (await c.request({ op: 'add_jobs', cwd: dir, jobs: [[script, '{1}']], sweep: [range(plain)] })).first as number;
        const ids = Array.from({ length: plain }, (_, i) => first + i);
        const c0 = cpuOf(s.pid), t0 = now();
        await s.ok(['add_slave', '--skip_ssh_auth_check', 'a:4', 'b:4']);
        await c.request({ op: 'wait', ids });
        const ms = now() - t0, cpu = ((cpuOf(s.pid) - c0) * 1000) / plain;
        (withAhead ? msWith : msWithout).push(ms);
        (withAhead ? cpuWith : cpuWithout).push(cpu);
        c.close();
        await s.close();
        fs.rmSync(path.dirname(s.dataDir), { recursive: true, force: true });
      }
      o.log(`placement: ${plain} plain jobs: ${fmt(msWith.at(-1)!, 0)} ms behind ${ahead} that no worker takes (${fmt(cpuWith.at(-1)!, 2)} ms CPU/job), ${fmt(msWithout.at(-1)!, 0)} ms alone (${fmt(cpuWithout.at(-1)!, 2)} ms CPU/job)`);
    }
    // 2. Adds at 1,000,000 waiting jobs with requirements, against none.
    const full = await serve('full'), empty = await serve('empty');
    const cf = await full.connect(), ce = await empty.connect();
    const kinds = [{ require: ['gpu'] }, { gpus: 1 }, { gpus: 2 }, { slots: 4 }, { avoid: ['slow'] }, { hosts: ['gpu1'] }, { require: ['a', 'b'] }, { slots: 2, gpus: 1 }, { require: ['big'] }, { slots: 8 }];
    for (const k of kinds) await cf.request({ op: 'add_jobs', cwd: dir, jobs: [[script, '{1}']], sweep: [range(big / kinds.length)], ...k });
    for (let r = 0; r < rounds; r++) {
      // In slices of 100 requests, alternating, so the machine's noise hits both alike.
      const sums = [0, 0];
      for (let slice = 0; slice < 10; slice++) {
        for (const [k, c] of [ce, cf].entries()) {
          const t0 = now();
          for (let i = slice * 100; i < slice * 100 + 100; i++) await c.request({ op: 'add_jobs', cwd: dir, jobs: [[script, `x${i}`]], ...kinds[i % kinds.length] });
          sums[k] += now() - t0;
        }
      }
      addEmpty.push(sums[0]); addBig.push(sums[1]);
      o.log(`placement: 1,000 adds with requirements: empty ${fmt(addEmpty.at(-1)!, 0)} ms, at ${big} ${fmt(addBig.at(-1)!, 0)} ms`);
    }
    cf.close(); ce.close();
  } finally {
    for (const s of servers) await s.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const cpuRatio = median(cpuWith) / median(cpuWithout), msRatio = median(msWith) / median(msWithout), addRatio = median(addBig) / median(addEmpty);
  const targets: Target[] = [
    { what: `dispatch of ${plain.toLocaleString('en')} jobs behind ${ahead.toLocaleString('en')} that no worker takes, against none (server CPU per job)`, measured: `${fmt(cpuRatio, 2)}×`, limit: '≤ 1.1×', met: o.quick ? null : cpuRatio <= 1.1 },
    { what: `the same, wall time to the last end`, measured: `${fmt(msRatio, 2)}×`, limit: '≤ 1.1×', met: o.quick ? null : msRatio <= 1.1 },
    { what: `adding a job with requirements at ${big.toLocaleString('en')} waiting against none`, measured: `${fmt(addRatio, 2)}×`, limit: '≤ 1.2×', met: o.quick ? null : addRatio <= 1.2 },
  ];
  return {
    name: 'placement', title: 'Placement: jobs nobody can take, and adds with requirements',
    sections: [
      { title: `dispatch of ${plain.toLocaleString('en')} plain jobs over 8 slots (median of ${rounds}, interleaved)`, columns: ['queue ahead of them', 'ms to the last end', 'server CPU ms/job'], rows: [
        [`${ahead.toLocaleString('en')} jobs requiring a label no worker has`, fmt(median(msWith), 0), fmt(median(cpuWith), 3)],
        ['none', fmt(median(msWithout), 0), fmt(median(cpuWithout), 3)],
        ['ratio', fmt(msRatio, 2), fmt(cpuRatio, 2)],
      ] },
      { title: '1,000 single-job adds with requirements (socket, ms)', columns: ['server', 'ms', 'ratio'], rows: [
        ['empty', fmt(median(addEmpty), 0), '1.00'],
        [`${big.toLocaleString('en')} waiting, 10 kinds of requirement`, fmt(median(addBig), 0), fmt(addRatio, 2)],
      ] },
    ],
    targets, notes: [], seconds: (now() - t00) / 1000,
  };
}
