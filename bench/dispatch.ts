// 1. Dispatch throughput: N trivial jobs over 8 slots, from submit until the last one
// has finished, against xargs -P 8 -n 1 (the limit: one fork + exec of the job script per
// job, the id as its argument), GNU parallel -j 8 and task-spooler. The job script reads
// `${JOB_ID:-$1}`, so each system passes the id the cheapest way it can.
import fs from 'node:fs';
import path from 'node:path';
import { type BenchResult, type Opts, Server, bash, childrenOf, cpuOf, machineBusy, parseTimes, fmt, median, min, max, now, tempDir, which, writeScript } from './lib.ts';

type System = { name: string; missing?: string; run: (dir: string, n: number) => Promise<{ ms: number; serverCpu?: number; treeCpu?: number }> };

/** Checks that out.txt holds exactly the ids 1..n, once each. */
function checkIds(file: string, n: number): string | null {
  const ids = fs.readFileSync(file, 'utf8').split('\n').filter(Boolean);
  const set = new Set(ids);
  if (ids.length !== n) return `${ids.length} lines instead of ${n}`;
  if (set.size !== n) return `${set.size} distinct ids instead of ${n}`;
  for (let i = 1; i <= n; i++) if (!set.has(String(i))) return `id ${i} missing`;
  return null;
}

/** A djs system; `tmpfs`: its data and log dirs on /dev/shm instead of beside the jobs. */
function djs(name: string, workers: string[], cli?: string, tmpfs = false): System {
  return {
    name,
    missing: tmpfs && !fs.existsSync('/dev/shm') ? 'no /dev/shm: the tmpfs control row is skipped' : undefined,
    run: async (dir, n) => {
      const srv = new Server(tmpfs ? scratch(fs.mkdtempSync('/dev/shm/djsb-')) : dir, undefined, cli);
      await srv.start();
      try {
        await srv.ok(['add_slave', '--skip_ssh_auth_check', ...workers]);
        const cpu0 = cpuOf(srv.pid), reaped0 = cpuOf(srv.pid, true);
        const t0 = now();
        await srv.ok(['add_jobs', path.join(dir, 'jobs.txt')], { cwd: dir, quiet: true });
        await srv.ok(['wait']);
        const ms = now() - t0;
        // The server's children (its launcher) reap the jobs, so their reaped-children
        // time holds every job process; they end with the server, so read them now.
        const serverCpu = cpuOf(srv.pid) - cpu0;
        const treeCpu = cpuOf(srv.pid, true) - reaped0 + childrenOf(srv.pid).reduce((sum, p) => sum + cpuOf(p, true), 0);
        return { ms, serverCpu, treeCpu };
      } finally {
        await srv.close();
      }
    },
  };
}

/** Directories of the runs, deleted only after the last round: deleting thousands of files
 *  between runs would change the file system under the runs that follow (see RESULTS.md). */
const scratchDirs: string[] = [];
const scratch = (dir: string) => { scratchDirs.push(dir); return dir; };

export async function dispatch(o: Opts): Promise<BenchResult> {
  const t00 = now();
  // 3,000 jobs, as in the measurement of issue #10 that set the target (its best of 3
  // rounds); the median is shown beside the best.
  const n = o.quick ? 300 : 3000;
  const runs = o.quick ? 1 : o.runs;
  const notes: string[] = [];
  const systems: System[] = [
    {
      name: 'xargs -P 8 -n 1',
      missing: which('xargs') ? undefined : 'xargs not installed (Debian package findutils)',
      run: async (dir, n) => {
        const t0 = now();
        const r = await bash(`unset JOB_ID; seq 1 ${n} | xargs -P 8 -n 1 ./job.sh; times`, { cwd: dir });
        return { ms: now() - t0, treeCpu: parseTimes(r.stdout) };
      },
    },
    djs('djs, w:8', ['w:8']),
    djs('djs, 2×4', ['w1:4', 'w2:4']),
    djs('djs, w:8, data+logs on tmpfs', ['w:8'], undefined, true),
    ...o.patched.flatMap((p) => [djs(`djs ${p.label}, w:8`, ['w:8'], p.path), djs(`djs ${p.label}, 2×4`, ['w1:4', 'w2:4'], p.path), djs(`djs ${p.label}, w:8, data+logs on tmpfs`, ['w:8'], p.path, true)]),
    {
      name: 'task-spooler (tsp -S 8)',
      missing: which('tsp') ? undefined : 'tsp not installed (Debian package task-spooler); skipped',
      run: async (dir, n) => {
        // One tsp call per job (it has no batch submit); a last job that needs all 8
        // slots runs only after every earlier one has finished; `tsp -w` waits for it.
        const tmp = path.join(dir, 'tsp');
        fs.mkdirSync(tmp);
        const env = { ...process.env, TS_SOCKET: path.join(tmp, 'sock'), TMPDIR: tmp, TS_SLOTS: '8', TS_MAXFINISHED: String(n + 10) };
        await bash('tsp -S 8', { env });
        const t0 = now();
        await bash(`unset JOB_ID; for i in $(seq 1 ${n}); do tsp ./job.sh $i >/dev/null; done; tsp -N 8 true >/dev/null; tsp -w`, { cwd: dir, env });
        const ms = now() - t0;
        await bash('tsp -K', { env });
        return { ms };
      },
    },
    {
      name: 'GNU parallel -j 8',
      missing: which('parallel') ? undefined : 'parallel not installed (Debian package parallel); skipped',
      run: async (dir, n) => {
        const t0 = now();
        const r = await bash(`unset JOB_ID; seq 1 ${n} | parallel --will-cite -j 8 ./job.sh; times`, { cwd: dir });
        return { ms: now() - t0, treeCpu: parseTimes(r.stdout) };
      },
    },
  ];
  for (const s of systems) if (s.missing && !notes.includes(s.missing)) { notes.push(s.missing); o.log(s.missing); }
  const only = process.env.BENCH_SYSTEMS ? new RegExp(process.env.BENCH_SYSTEMS, 'i') : null;
  const live = systems.filter((s) => !s.missing && (!only || only.test(s.name)));
  const times = new Map<string, number[]>(live.map((s) => [s.name, []]));
  const cpus = new Map<string, number[]>(live.map((s) => [s.name, []]));
  const busy = new Map<string, number[]>(live.map((s) => [s.name, []]));
  const trees = new Map<string, number[]>(live.map((s) => [s.name, []]));
  // Rounds interleave the systems so that a noisy minute hits all of them.
  try {
    for (let r = 0; r < runs; r++) {
      for (const s of live) {
        const dir = scratch(tempDir('djsb-d-'));
        const out = path.join(dir, 'out.txt');
        writeScript(path.join(dir, 'job.sh'), `echo "\${JOB_ID:-$1}" >> ${out}`);
        fs.writeFileSync(path.join(dir, 'jobs.txt'), './job.sh\n'.repeat(n));
        fs.writeFileSync(out, '');
        const b0 = machineBusy();
        const { ms, serverCpu, treeCpu } = await s.run(dir, n);
        if (treeCpu !== undefined && Number.isFinite(treeCpu)) trees.get(s.name)!.push(treeCpu);
        busy.get(s.name)!.push(machineBusy() - b0);
        const bad = checkIds(out, n);
        if (bad) throw new Error(`${s.name}: ${bad}`);
        times.get(s.name)!.push(ms);
        if (serverCpu !== undefined) cpus.get(s.name)!.push(serverCpu);
        o.log(`dispatch round ${r + 1}/${runs}: ${s.name}: ${n} jobs in ${fmt(ms / 1000, 2)} s = ${fmt(n / ms * 1000, 0)} jobs/s`);
      }
    }
  } finally {
    for (const dir of scratchDirs.splice(0)) fs.rmSync(dir, { recursive: true, force: true });
  }
  // Rates by the best round (issue #10 measured best of 3) and by the median round.
  const best = (name: string) => n / min(times.get(name)!) * 1000;
  const rate = (name: string) => n / median(times.get(name)!) * 1000;
  const X = 'xargs -P 8 -n 1';
  const hasX = times.has(X);
  const xBest = hasX ? best(X) : NaN, xMed = hasX ? rate(X) : NaN;
  const rows = live.map((s) => {
    const t = times.get(s.name)!;
    const c = cpus.get(s.name)!;
    return [s.name, fmt(min(t) / 1000, 2), fmt(median(t) / 1000, 2), fmt(max(t) / 1000, 2),
      fmt(best(s.name), 0), fmt(best(s.name) / xBest, 2), fmt(rate(s.name), 0), fmt(rate(s.name) / xMed, 2),
      c.length ? fmt(median(c) * 1000 / n, 2) : '',
      trees.get(s.name)!.length ? fmt(median(trees.get(s.name)!) * 1000 / n, 2) : '',
      fmt(median(busy.get(s.name)!) * 1000 / n, 2)];
  });
  const targets = [];
  for (const d of ['djs, w:8', 'djs, 2×4', ...o.patched.flatMap((p) => [`djs ${p.label}, w:8`, `djs ${p.label}, 2×4`])]) {
    if (!times.has(d)) continue;
    const b = best(d), r = rate(d);
    targets.push({ what: `${d}: ≥ 0.75 × the rate of xargs -P 8 -n 1 (best of ${runs}; median beside it)`,
      measured: `${fmt(b, 0)} jobs/s = ${fmt(b / xBest, 2)} × xargs (median: ${fmt(r, 0)} = ${fmt(r / xMed, 2)} ×)`,
      limit: `≥ ${fmt(xBest * 0.75, 0)} jobs/s`, met: hasX ? b >= xBest * 0.75 : null });
    for (const peer of ['task-spooler (tsp -S 8)', 'GNU parallel -j 8']) {
      if (!times.has(peer)) { targets.push({ what: `${d}: above ${peer}`, measured: fmt(b, 0), limit: 'peer missing', met: null }); continue; }
      targets.push({ what: `${d}: above ${peer} (best of ${runs})`, measured: `${fmt(b, 0)} vs ${fmt(best(peer), 0)} jobs/s (${fmt(b / best(peer), 2)}×)`, limit: `> ${fmt(best(peer), 0)} jobs/s`, met: b > best(peer) });
    }
  }
  for (const p of o.patched) notes.push(`djs ${p.label} = ${p.path} (a modified copy of cli.ts, for before/after), run in the same rounds.`);
  notes.push(`N = ${n} jobs over 8 slots, each the sh script \`echo "\${JOB_ID:-$1}" >> out.txt\`; ${runs} interleaved rounds; time from submit until the last job finished; every run checked for ${n} distinct ids. "best" is the fastest round (the measure of issue #10's target), "median" the middle one.`);
  notes.push(`How each system runs the jobs: xargs \`seq 1 N | xargs -P 8 -n 1 ./job.sh\` (one fork + exec of the script per job, the id as its argument: the limit); djs \`cli.ts add_jobs FILE\` (N lines \`./job.sh\`, JOB_ID in the environment) + \`cli.ts wait\` on a fresh server with one worker of 8 slots (w:8) or two of 4 (2×4); tsp N calls \`tsp ./job.sh ID\` (each client forks and execs the script) and a last \`tsp -N 8 true\` waited for with \`tsp -w\`; GNU parallel \`seq 1 N | parallel -j 8 ./job.sh\` (parallel always starts a command through a shell: \`bash -c './job.sh ID'\`, which execs the script). djs and tsp keep a log file per job, xargs and parallel do not.`);
  notes.push('"server CPU ms/job": user + sys of the djs server process during the run, per job. "own CPU ms/job": CPU time (user + sys) of the system\'s own processes per job, immune to other load on the machine: for xargs and parallel their shell\'s reaped children (bash `times`), for djs the server (with any children it reaped) plus its child processes (the launcher) with their reaped children (every job process); the `add_jobs`/`wait` clients are not included. tsp runs jobs from daemonized clients, so it has none.');
  notes.push('"machine CPU ms/job": busy CPU time of the whole machine (/proc/stat, both cores) during the run divided by N; it includes whatever else ran on the shared machine, so compare it within a round.');
  if (times.has('djs, w:8, data+logs on tmpfs')) notes.push('"data+logs on tmpfs": the same djs (this cli.ts, and each --patched copy) with its data dir and the job logs on /dev/shm, a control for the file system under the data dir (a start creates and deletes files there).');
  return {
    name: 'dispatch', title: `1. Dispatch throughput (${n} trivial jobs, 8 slots)`,
    sections: [{ title: 'submit → last job finished', columns: ['system', 'best s', 'median s', 'worst s', 'jobs/s (best)', '× xargs (best)', 'jobs/s (median)', '× xargs (median)', 'server CPU ms/job', 'own CPU ms/job', 'machine CPU ms/job'], rows }],
    targets, notes, seconds: (now() - t00) / 1000,
  };
}
