// 14. A plain command on ssh workers: N short jobs (200; BENCH_ONW_JOBS=N) over 2 sshd hosts
// on loopback (test/hosts.ts: 127.0.0.2-3, sshd's default limits) x 8 slots each. The
// systems, interleaved round by round:
//   djs --on-worker        add_job --on-worker true ::: 1..N (djs runs `true I` on the worker)
//   parallel -M            GNU parallel -S 8/HOST,... --controlmaster true ::: 1..N
//   djs example_job.sh     example_job.sh on N small files (copy in, wc -w, copy back): a
//                          script's five ssh sessions a job, for scale
// Reports jobs/s (from queueing the first job to the last one's end) and ssh logins per
// job (`Accepted publickey` lines in the hosts' sshd logs). Then where one --on-worker
// job's time goes: one session on an open shared connection running `true`, the same
// through the watcher (perl on the worker), and djs's own start-to-end with the session
// taken out, each measured one at a time. Needs openssh-server and GNU parallel.
import fs from 'node:fs';
import path from 'node:path';
import { startHosts, type TestHosts } from '../test/hosts.ts';
import { ON_WORKER_LINE, onWorkerInput } from '../cli.ts';
import { type BenchResult, type Opts, type Target, ROOT, Server, envWithNode, fmt, loadAvg, median, now, run, tempDir, which } from './lib.ts';

type System = { name: string; run: (dir: string, hosts: TestHosts, n: number) => Promise<number> };
const SLOTS = 8;
const seq = (n: number) => Array.from({ length: n }, (_, i) => String(i + 1));

/** djs over the hosts; `add` queues the n jobs and returns how to count the good ones. */
function djs(name: string, add: (srv: Server, dir: string, n: number) => Promise<() => number | Promise<number>>): System {
  return {
    name,
    async run(dir, hosts, n) {
      const srv = new Server(dir, { ...envWithNode(null), DJS_SSH_CONFIG: hosts.sshConfig });
      try {
        await srv.start();
        await srv.ok(['add_slave', ...hosts.hosts.map((h) => `${h.addr}:${SLOTS}`)]);
        const count = await add(srv, dir, n);
        await srv.cli(['wait'], { quiet: true });
        return await count();
      } finally {
        await srv.close();
      }
    },
  };
}

const onWorker = djs('djs --on-worker true', async (srv, dir, n) => {
  await srv.ok(['add_job', '--on-worker', 'true', ':::', ...seq(n)], { cwd: dir });
  return async () => (JSON.parse((await srv.ok(['list', '--json', '--state', 'done'])).stdout) as unknown[]).length;
});

const example = djs('djs example_job.sh (copy in, wc -w, copy back)', async (srv, dir, n) => {
  fs.copyFileSync(path.join(ROOT, 'example_job.sh'), path.join(dir, 'example_job.sh'));
  fs.mkdirSync(path.join(dir, 'input'));
  for (let i = 1; i <= n; i++) fs.writeFileSync(path.join(dir, 'input', `f${i}.txt`), 'a b c\n');
  await srv.ok(['add_jobs', '-'], { cwd: dir, input: seq(n).map((i) => `./example_job.sh input/f${i}.txt\n`).join('') });
  return () => fs.readdirSync(path.join(dir, 'finished_work')).length;
});

const parallel: System = {
  name: 'GNU parallel -S --controlmaster true',
  async run(dir, hosts, n) {
    const ssh = path.join(dir, 'ssh');
    fs.writeFileSync(ssh, `#!/bin/sh\nexec ssh -F ${hosts.sshConfig} "$@"\n`, { mode: 0o755 });
    const r = await run('parallel', ['--will-cite', '--controlmaster', '--ssh', ssh, '-S', hosts.hosts.map((h) => `${SLOTS}/${h.addr}`).join(','), '--joblog', path.join(dir, 'joblog'), 'true', ':::', ...seq(n)], { cwd: dir, quiet: true });
    if (r.code !== 0) process.stderr.write(`parallel exited ${r.code}: ${r.stderr.slice(0, 300)}\n`);
    return fs.readFileSync(path.join(dir, 'joblog'), 'utf8').trim().split('\n').slice(1).filter((l) => l.split('\t')[6] === '0').length;
  },
};

/** Milliseconds per run of `ssh -F CONFIG HOST LINE` on an open master, one at a time. */
async function session(config: string, host: string, line: string, k: number, input?: string): Promise<number> {
  await run('ssh', ['-F', config, host, 'true'], { quiet: true }); // opens the master
  const t0 = now();
  for (let i = 0; i < k; i++) {
    const r = await run('ssh', ['-F', config, host, line], { quiet: true, input });
    if (r.code !== 0) throw new Error(`ssh ${line.slice(0, 40)}: exit ${r.code}: ${r.stderr}`);
  }
  const ms = (now() - t0) / k;
  await run('ssh', ['-F', config, '-O', 'exit', host], { quiet: true });
  return ms;
}

export async function onWorkerBench(o: Opts): Promise<BenchResult> {
  const t00 = now();
  const n = Number(process.env.BENCH_ONW_JOBS ?? (o.quick ? 100 : 200));
  const rounds = o.quick ? 1 : o.runs;
  const systems: System[] = [onWorker, example];
  const notes: string[] = [`load average at the start: ${loadAvg()}`];
  if (which('parallel')) systems.splice(1, 0, parallel);
  else notes.push('GNU parallel is missing (apt-get install parallel): its row is skipped.');
  const rate = new Map<string, number[]>(), logins = new Map<string, number[]>();
  const hosts = await startHosts(2);
  const per: string[][] = [];
  try {
    for (let r = 0; r < rounds; r++) {
      for (const sys of systems) {
        const dir = tempDir('djsb-o-');
        try {
          const before = hosts.hosts.reduce((a, h) => a + h.logins(), 0);
          const t0 = now();
          const got = await sys.run(dir, hosts, n);
          const secs = (now() - t0) / 1000;
          if (got !== n) notes.push(`round ${r + 1}, ${sys.name}: ${got} of ${n} jobs came back right.`);
          const count = hosts.hosts.reduce((a, h) => a + h.logins(), 0) - before;
          (rate.get(sys.name) ?? rate.set(sys.name, []).get(sys.name)!).push(n / secs);
          (logins.get(sys.name) ?? logins.set(sys.name, []).get(sys.name)!).push(count / n);
          o.log(`on-worker round ${r + 1}: ${sys.name}: ${fmt(n / secs)} jobs/s, ${fmt(count / n, 2)} logins/job`);
        } finally {
          fs.rmSync(dir, { recursive: true, force: true });
        }
        for (const h of hosts.hosts) for (const f of fs.readdirSync(h.scratch)) fs.rmSync(path.join(h.scratch, f), { recursive: true, force: true });
      }
    }
    // Where one job's time goes: a bare session, the same through the watcher.
    const dir = tempDir('djsb-o-');
    try {
      const config = path.join(dir, 'config');
      fs.writeFileSync(config, `ControlMaster auto\nControlPath ${dir}/%C\nControlPersist 60\nBatchMode yes\nInclude ${hosts.sshConfig}\n`);
      const host = hosts.hosts[0].addr, k = o.quick ? 20 : 50;
      const bare = await session(config, host, 'true', k);
      const watched = await session(config, host, ON_WORKER_LINE, k, onWorkerInput(['true'], ['JOB_ID=1', 'SLAVE_IP=h'], '/tmp', 10));
      const perl = await session(config, host, `exec perl -e 'use IO::Poll; use Time::HiRes'`, k);
      per.push(['a session running `true` on the open master', fmt(bare)], ['the same through the watcher (perl, fork, exec, wait)', fmt(watched)], ['of which perl loading IO::Poll and Time::HiRes', fmt(perl - bare)]);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  } finally {
    await hosts.close();
  }
  const med = (m: Map<string, number[]>, name: string) => median(m.get(name) ?? []);
  const rows = systems.map((s) => [s.name, fmt(med(rate, s.name)), (rate.get(s.name) ?? []).map((x) => fmt(x)).join(', '), fmt(med(logins, s.name), 2)]);
  const targets: Target[] = [];
  if (systems.includes(parallel)) {
    const ratio = med(rate, onWorker.name) / med(rate, parallel.name);
    targets.push({ what: 'djs --on-worker ≥ 2 × GNU parallel --controlmaster', measured: `${fmt(ratio, 2)}×`, limit: '≥ 2×', met: ratio >= 2 });
  }
  targets.push({ what: 'ssh logins per --on-worker job', measured: fmt(med(logins, onWorker.name), 3), limit: '≤ 0.05', met: med(logins, onWorker.name) <= 0.05 });
  notes.push(`${n} jobs per run, 2 hosts × ${SLOTS} slots, ${rounds} round(s); logins counted in the hosts' sshd logs, add_slave's login checks included.`);
  return {
    name: 'on-worker', title: `14. A plain command on ssh workers: ${n} jobs, 2 loopback sshd hosts × ${SLOTS} slots`,
    sections: [
      { title: 'jobs per second (median of the rounds) and ssh logins per job', columns: ['system', 'jobs/s', 'rounds', 'logins/job'], rows },
      { title: 'one job at a time: milliseconds per ssh session', columns: ['what', 'ms'], rows: per },
    ],
    targets, notes, seconds: (now() - t00) / 1000,
  };
}
