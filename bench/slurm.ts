// Slurm's own job rate next to djs's, on this machine: which limit a user meets first.
//
//   node --import tsx bench/slurm.ts [N] [ROUNDS]     (default 200 jobs, 3 rounds)
//
// Starts the tests' one-node Slurm (test/slurm.ts: munged, slurmctld, slurmd from Debian's
// slurm-wlm and munge, 8 CPUs configured) and measures, round by round, interleaved:
//   slurm    N `srun --partition=debug true`, 8 at a time (xargs -P 8): Slurm alone, one
//            job (allocation + step) per srun, as example_job.sh runs work
//   djs      N trivial jobs on 8 slots of plain workers (--skip_ssh_auth_check): djs's own
//            rate, the baseline
//   djs+srun N djs jobs on the worker slurm:debug:8, each running `srun true` as above: the
//            rate a campaign on a Slurm worker gets
// Prints a Markdown table of jobs per second (median, min–max over the rounds).
import fs from 'node:fs';
import path from 'node:path';
import { Server, bash, envWithNode, fmt, max, median, min, now, tempDir, writeScript } from './lib.ts';
import { slurmMissing, startSlurm } from '../test/slurm.ts';

const n = Number(process.argv[2] ?? 200);
const rounds = Number(process.argv[3] ?? 3);
const SLOTS = 8;

async function main(): Promise<void> {
  const missing = slurmMissing();
  if (missing.length) {
    console.log(`skipped: a real Slurm needs ${missing.join(', ')} (apt-get install ${missing.join(' ')})`);
    return;
  }
  const slurm = await startSlurm({ cpus: SLOTS });
  const env = { ...envWithNode(null), ...slurm.env };
  const rates: Record<string, number[]> = { slurm: [], djs: [], 'djs+srun': [] };
  try {
    for (let r = 0; r < rounds; r++) {
      // Slurm alone.
      {
        const t0 = now();
        await bash(`seq ${n} | xargs -P ${SLOTS} -I{} srun --quiet --job-name=bench-{} --partition=${slurm.partition} --ntasks=1 --cpus-per-task=1 true`, { env });
        rates.slurm.push(n / ((now() - t0) / 1000));
      }
      // djs, plain workers; and djs with each job going through srun.
      for (const [name, workers, body] of [
        ['djs', Array.from({ length: SLOTS }, (_, i) => `w${i}`), 'exit 0'],
        ['djs+srun', [`slurm:${slurm.partition}:${SLOTS}`], `exec srun --quiet --job-name=djs-$JOB_ID --partition=${slurm.partition} --ntasks=1 --cpus-per-task=1 true`],
      ] as [string, string[], string][]) {
        const dir = tempDir('djsb-slurm-');
        const srv = new Server(dir, env);
        await srv.start();
        try {
          await srv.ok(['add_slave', ...(name === 'djs' ? ['--skip_ssh_auth_check'] : []), ...workers]);
          const job = writeScript(path.join(dir, 'job.sh'), body);
          fs.writeFileSync(path.join(dir, 'jobs.txt'), `${job}\n`.repeat(n));
          const t0 = now();
          await srv.ok(['add_jobs', path.join(dir, 'jobs.txt')], { cwd: dir, quiet: true });
          await srv.ok(['wait']);
          rates[name].push(n / ((now() - t0) / 1000));
        } finally {
          await srv.close();
          fs.rmSync(dir, { recursive: true, force: true });
        }
      }
      console.error(`round ${r + 1}/${rounds}: ${Object.entries(rates).map(([k, v]) => `${k} ${fmt(v.at(-1)!)}`).join(', ')} jobs/s`);
    }
  } finally {
    await slurm.close();
  }
  console.log(`\n${n} jobs per round, ${rounds} rounds, ${SLOTS} at a time; jobs/s, median (min–max)\n`);
  console.log('| system | jobs/s |\n|---|---|');
  for (const [name, xs] of Object.entries(rates)) console.log(`| ${name} | ${fmt(median(xs))} (${fmt(min(xs))}–${fmt(max(xs))}) |`);
}

main().then(() => process.exit(0), (e) => { console.error(e); process.exit(1); });
