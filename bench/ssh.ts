// 9. Jobs over real ssh: N jobs (600; --quick 120; BENCH_SSH_JOBS=N) over 3 sshd hosts on
// loopback (test/hosts.ts: 127.0.0.2-4) x 4 slots each. Each job copies a small input
// file to its worker, runs `wc -w` there and copies the result back (example_job.sh's
// shape). The systems, interleaved round by round:
//   djs shared      djs running example_job.sh, with shared connections (the default)
//   djs unshared    the same with DJS_SSH_SHARED=0: every ssh and rsync logs in anew
//   parallel        GNU parallel -S 4/HOST,... --trc {}.out "wc -w < {} > {}.out"
//   parallel -M     the same with --controlmaster
// (parallel's --ssh is a one-line wrapper script running `ssh -F CONFIG "$@"`: given
// words with spaces, its --controlmaster starts no master and every ssh logs in anew.)
// Reports jobs/s (from queueing the first job to the last one's end) and ssh logins per
// job, counted in the hosts' sshd logs (`Accepted publickey` lines). Needs openssh-server,
// rsync and GNU parallel (`apt-get install openssh-server rsync parallel`); without
// parallel its rows are skipped.
import fs from 'node:fs';
import path from 'node:path';
import { startHosts, type TestHosts } from '../test/hosts.ts';
import { type BenchResult, type Opts, type Target, ROOT, Server, envWithNode, fmt, median, now, run, tempDir, which } from './lib.ts';

/** A system runs n jobs in dir and returns how many results came back right. */
type System = { name: string; run: (dir: string, hosts: TestHosts, n: number) => Promise<number> };

const SLOTS = 4;

/** n input files of 200 words each in dir/input. */
function inputs(dir: string, n: number): string[] {
  fs.mkdirSync(path.join(dir, 'input'), { recursive: true });
  const text = Array.from({ length: 200 }, (_, i) => `word${i}`).join(' ') + '\n';
  return Array.from({ length: n }, (_, i) => {
    const name = `f${i + 1}.txt`;
    fs.writeFileSync(path.join(dir, 'input', name), text);
    return name;
  });
}

/** How many *.out files in dir hold the right count (200 words). */
function results(dir: string): number {
  return fs.readdirSync(dir).filter((f) => f.endsWith('.out') && fs.readFileSync(path.join(dir, f), 'utf8').trim() === '200').length;
}

/** djs with example_job.sh over the hosts; env adds to the server's environment. */
function djs(name: string, env: NodeJS.ProcessEnv): System {
  return {
    name,
    async run(dir, hosts, n) {
      fs.copyFileSync(path.join(ROOT, 'example_job.sh'), path.join(dir, 'example_job.sh'));
      const srv = new Server(dir, { ...envWithNode(null), DJS_SSH_CONFIG: hosts.sshConfig, ...env });
      try {
        await srv.start();
        await srv.ok(['add_slave', ...hosts.hosts.map((h) => `${h.addr}:${SLOTS}`)]);
        const names = inputs(dir, n);
        await srv.ok(['add_jobs', '-'], { cwd: dir, input: names.map((f) => `./example_job.sh input/${f}\n`).join('') });
        await srv.cli(['wait'], { quiet: true });
        return results(path.join(dir, 'finished_work'));
      } finally {
        await srv.close();
      }
    },
  };
}

/** GNU parallel over the same hosts and slots, moving files with --trc. */
function parallel(name: string, extra: string[]): System {
  return {
    name,
    async run(dir, hosts, n) {
      // The inputs in the working directory itself: with input/NAME, parallel's --cleanup
      // of one job removes input/ on the worker while another job copies into it.
      const names = inputs(dir, n);
      const cwd = path.join(dir, 'input');
      // --ssh names one program: parallel execs its ssh master (--controlmaster) without a
      // shell, so "ssh -F FILE" would never start one.
      const ssh = path.join(dir, 'ssh');
      fs.writeFileSync(ssh, `#!/bin/sh\nexec ssh -F ${hosts.sshConfig} "$@"\n`, { mode: 0o755 });
      const args = ['--will-cite', ...extra, '--ssh', ssh, '-S', hosts.hosts.map((h) => `${SLOTS}/${h.addr}`).join(','),
        '--trc', '{}.out', 'wc -w < {} > {}.out', ':::', ...names];
      const r = await run('parallel', args, { cwd, quiet: true });
      if (r.code !== 0) process.stderr.write(`${name}: parallel exited ${r.code}: ${r.stderr.slice(0, 300)}\n`);
      return results(cwd);
    },
  };
}

export async function ssh(o: Opts): Promise<BenchResult> {
  const t00 = now();
  const n = Number(process.env.BENCH_SSH_JOBS ?? (o.quick ? 120 : 600));
  const rounds = o.quick ? 1 : o.runs;
  const systems: System[] = [
    djs('djs, example_job.sh, shared connections', {}),
    djs('djs, example_job.sh, DJS_SSH_SHARED=0 (no shared connections)', { DJS_SSH_SHARED: '0' }),
  ];
  const notes: string[] = [];
  if (which('parallel')) systems.push(parallel('GNU parallel -S --trc', []), parallel('GNU parallel -S --trc --controlmaster', ['--controlmaster']));
  else notes.push('GNU parallel is missing (apt-get install parallel): its rows are skipped.');
  const rate = new Map<string, number[]>(), logins = new Map<string, number[]>();
  const hosts = await startHosts(3);
  try {
    for (let r = 0; r < rounds; r++) {
      for (const sys of systems) {
        const dir = tempDir('djsb-s-');
        try {
          const before = hosts.hosts.reduce((a, h) => a + h.logins(), 0);
          const t0 = now();
          const got = await sys.run(dir, hosts, n);
          const secs = (now() - t0) / 1000;
          if (got !== n) notes.push(`round ${r + 1}, ${sys.name}: ${got} of ${n} results came back right.`);
          const count = hosts.hosts.reduce((a, h) => a + h.logins(), 0) - before;
          (rate.get(sys.name) ?? rate.set(sys.name, []).get(sys.name)!).push(n / secs);
          (logins.get(sys.name) ?? logins.set(sys.name, []).get(sys.name)!).push(count / n);
          o.log(`ssh round ${r + 1}: ${sys.name}: ${fmt(n / secs)} jobs/s, ${fmt(count / n, 2)} logins/job`);
        } finally {
          fs.rmSync(dir, { recursive: true, force: true });
        }
        // Whatever the run left on the hosts (parallel's and the jobs' work dirs) goes.
        for (const h of hosts.hosts) for (const f of fs.readdirSync(h.scratch)) fs.rmSync(path.join(h.scratch, f), { recursive: true, force: true });
      }
    }
  } finally {
    await hosts.close();
  }
  const med = (m: Map<string, number[]>, name: string) => median(m.get(name) ?? []);
  const rows = systems.map((s) => [s.name, fmt(med(rate, s.name)), (rate.get(s.name) ?? []).map((x) => fmt(x)).join(', '), fmt(med(logins, s.name), 2)]);
  const shared = med(rate, systems[0].name), unshared = med(rate, systems[1].name);
  const targets: Target[] = [{ what: 'djs with shared connections ≥ 2 × without', measured: `${fmt(shared / unshared, 2)}×`, limit: '≥ 2×', met: shared >= 2 * unshared }];
  if (systems.length > 2) {
    const pm = med(rate, systems[3].name);
    targets.push({ what: 'djs ≥ GNU parallel --controlmaster', measured: `${fmt(shared / pm, 2)}×`, limit: '≥ 1×', met: shared >= pm });
  }
  notes.push(`${n} jobs per run, 3 hosts × ${SLOTS} slots, ${rounds} round(s); logins counted in the hosts' sshd logs, the login checks of add_slave included.`);
  return {
    name: 'ssh', title: `9. Jobs over ssh: ${n} jobs, 3 loopback sshd hosts × ${SLOTS} slots, copy in, wc -w, copy back`,
    sections: [{ title: 'jobs per second (median of the rounds) and ssh logins per job', columns: ['system', 'jobs/s', 'rounds', 'logins/job'], rows }],
    targets, notes, seconds: (now() - t00) / 1000,
  };
}
