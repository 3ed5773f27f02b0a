// 2. One client call per job: `./cli.ts add_job` spawned once per job, sequentially,
// next to bare `node -e 0` (and `node --import tsx empty.ts` on Node 20) measured in the
// same loop, so noise hits the command and its floor alike.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { type BenchResult, type Opts, type Target, CLI, ROOT, Server, bareCli, envWithNode, fmt, median, now, quantile, run, tempDir, writeScript } from './lib.ts';

type Probe = { label: string; cmd: string; args: string[]; env: NodeJS.ProcessEnv; cwd: string; check?: (out: string) => boolean };

export async function client(o: Opts): Promise<BenchResult> {
  const t00 = now();
  const dir = tempDir('djsb-c-');
  const notes: string[] = [];
  const srv = new Server(dir);
  const n24 = o.quick ? 30 : 1000;
  const n20 = o.quick ? 15 : 400;
  const every = 5; // a floor measurement every `every` calls
  try {
    await srv.start();
    const script = writeScript(path.join(dir, 'job.sh'), 'true');
    const empty = path.join(dir, 'empty.ts');
    fs.writeFileSync(empty, '');
    const env20 = envWithNode(null);
    // What Node 20 would cost without tsx: the same file with its types stripped ahead of
    // time (by Node 24's module.stripTypeScriptTypes), run as plain JS.
    let stripped: string | null = null;
    if (o.node24) {
      const js = path.join(dir, 'cli-stripped.mjs');
      const r = spawnSync(path.join(o.node24, 'node'), ['--no-warnings', '-e', `const m=require('node:module'),fs=require('fs');fs.writeFileSync(${JSON.stringify(js)}, m.stripTypeScriptTypes(fs.readFileSync(${JSON.stringify(CLI)},'utf8')))`], { encoding: 'utf8' });
      if (r.status === 0) stripped = js; else notes.push(`could not strip types with Node 24: ${r.stderr.trim().slice(0, 200)}`);
    }
    const addJob = (env: NodeJS.ProcessEnv, cli = CLI): Probe => ({
      label: '', cmd: cli, args: ['--data-dir', srv.dataDir, 'add_job', script, 'x'], env, cwd: dir, check: (out) => /^\d+\n$/.test(out),
    });
    type Series = { label: string; node: string; main: Probe; floors: Probe[]; n: number };
    const series: Series[] = [{
      label: 'Node 20 (the cached JS copy)', node: '20', n: n20,
      main: { ...addJob(env20), label: 'cli.ts add_job' },
      floors: [
        { label: 'node -e 0', cmd: 'node', args: ['-e', '0'], env: env20, cwd: dir },
        { label: 'node --import tsx empty.ts', cmd: 'node', args: ['--import', 'tsx', empty], env: env20, cwd: ROOT },
        { label: 'cli.ts help (no server call)', cmd: CLI, args: ['help'], env: env20, cwd: dir },
        ...(stripped ? [{ label: 'node cli-stripped.mjs add_job (types stripped by Node 24, for comparison)', cmd: 'node', args: [stripped, '--data-dir', srv.dataDir, 'add_job', script, 'x'], env: env20, cwd: dir, check: (out: string) => /^\d+\n$/.test(out) }] : []),
      ],
    }];
    if (o.node24) {
      const env24 = envWithNode(o.node24), bare = bareCli(dir);
      series.push({
        label: 'Node 24 (native type stripping)', node: '24', n: n24,
        main: { ...addJob(env24, bare), label: 'cli.ts add_job' },
        floors: [
          { label: 'node -e 0', cmd: 'node', args: ['-e', '0'], env: env24, cwd: dir },
          { label: 'cli.ts help (no server call)', cmd: bare, args: ['help'], env: env24, cwd: dir },
        ],
      });
    } else notes.push('Node 24 missing: its series was skipped (install with `npm install --prefix /tmp/djs-node24 node@24` or set DJS_NODE24=DIR)');

    const rows: string[][] = [];
    const targets: Target[] = [];
    let added = 0;
    for (const s of series) {
      const times = new Map<string, number[]>([[s.main.label, []], ...s.floors.map((f) => [f.label, []] as [string, number[]])]);
      const once = async (p: Probe) => {
        const r = await run(p.cmd, p.args, { env: p.env, cwd: p.cwd });
        if (r.code !== 0 || (p.check && !p.check(r.stdout))) throw new Error(`${p.label} failed (exit ${r.code}): ${r.stderr.trim().slice(0, 300)} ${r.stdout.slice(0, 100)}`);
        times.get(p.label)!.push(r.ms);
      };
      // Warm-up: tsx's transform cache and Node's compile cache.
      for (const p of [s.main, ...s.floors]) await once(p);
      for (const v of times.values()) v.length = 0;
      const t0 = now();
      for (let i = 0; i < s.n; i++) {
        await once(s.main);
        added++;
        if (i % every === 0) for (const f of s.floors) await once(f);
        if ((i + 1) % 100 === 0) o.log(`client ${s.label}: ${i + 1}/${s.n} add_job calls, median ${fmt(median(times.get(s.main.label)!))} ms`);
      }
      const loopS = (now() - t0) / 1000;
      const med = (l: string) => median(times.get(l)!);
      for (const [label, xs] of times) {
        rows.push([s.label, label, String(xs.length), fmt(median(xs)), fmt(quantile(xs, 0.9)), fmt(median(xs) - med('node -e 0'))]);
      }
      notes.push(`${s.label}: ${s.n} add_job calls in ${fmt(loopS, 1)} s (with the floor probes interleaved, one every ${every} calls).`);
      const main = med(s.main.label);
      if (s.node === '24') {
        const bare = med('node -e 0');
        targets.push({ what: 'Node 24: add_job median ≤ 1.5 × bare node + 30 ms', measured: `${fmt(main)} ms (bare node ${fmt(bare)} ms)`, limit: `≤ ${fmt(1.5 * bare + 30)} ms`, met: main <= 1.5 * bare + 30 });
      } else {
        const floor = med('node --import tsx empty.ts');
        targets.push({ what: 'Node 20: add_job median ≤ tsx floor + 30 ms', measured: `${fmt(main)} ms (node --import tsx empty.ts ${fmt(floor)} ms)`, limit: `≤ ${fmt(floor + 30)} ms`, met: main <= floor + 30 });
      }
    }
    const status = await srv.ok(['status', '--json']);
    const total = JSON.parse(status.stdout).counts.total;
    if (total < added) throw new Error(`server holds ${total} jobs, expected at least ${added}`);
    return {
      name: 'client', title: '2. One client call per job (sequential `cli.ts add_job`, each spawned from node)',
      sections: [{ title: 'wall time of one call, spawn → exit', columns: ['runtime', 'command', 'n', 'median ms', 'p90 ms', 'median − bare node ms'], rows }],
      targets, notes, seconds: (now() - t00) / 1000,
    };
  } finally {
    await srv.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
