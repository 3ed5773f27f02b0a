// The benchmark suite: `npm run bench [-- [--quick] [--runs N] [NAME...]]`.
// Runs whole commands and servers from outside, each against baselines measured in the
// same invocation, prints one table per benchmark, and writes the machine description
// and the results to bench/last-run.md and bench/last-run.json.
//   NAME: dispatch, client, queue (= addcost), latency, durable, campaign,
//   placement; default all of these. Only when named: breakdown (where a start's CPU goes,
//   by process and kernel path; --patched copies too), primitives (what fork, exec and
//   file operations cost), dashboard (the HTTP side's reads with a million jobs) and ssh
//   (jobs over real loopback sshd hosts against GNU parallel; see bench/ssh.ts), stall
//   (how long a big request holds up the other clients; see bench/stall.ts), on-worker
//   (add_job --on-worker over 2 sshd hosts against parallel --controlmaster) and scale
//   (a big queue: status while a snapshot is written, filters, restart; bench/scale.ts).
//   --quick (or BENCH_QUICK=1): small sizes, one round: a smoke run of a minute or two.
//   --runs N: rounds of the whole-run measurements (default 3).
//   --patched PATH[,PATH...]: also run djs from other cli.ts files (modified copies) in the
//   same rounds, for before/after numbers (dispatch, latency, breakdown, and dispatch out
//   of the big queues). Each copy is labelled by its directory's name.
//   BENCH_SYSTEMS=REGEX limits which systems the dispatch benchmark runs.
//   DJS_BENCH_CLI=PATH: measure that cli.ts instead of this repository's.
//   DJS_NODE24=DIR: a directory with Node 24's `node` (else /tmp/djs-node24 is used,
//   installed there with npm when missing).
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { type BenchResult, type Opts, ROOT, killTracked, loadAvg, machine, now } from './lib.ts';
import { dispatch } from './dispatch.ts';
import { client } from './client.ts';
import { queue } from './queue.ts';
import { latency } from './latency.ts';
import { durable } from './durable.ts';
import { breakdown } from './breakdown.ts';
import { primitives } from './primitives.ts';
import { campaign } from './campaign.ts';
import { placement } from './placement.ts';
import { dashboard } from './dashboard.ts';
import { ssh } from './ssh.ts';
import { stall } from './stall.ts';
import { onWorkerBench } from './on-worker.ts';
import { scale } from './scale.ts';

const BENCHES: Record<string, (o: Opts) => Promise<BenchResult>> = { dispatch, client, queue, latency, durable, campaign, placement, breakdown, primitives, dashboard, ssh, stall, 'on-worker': onWorkerBench, scale };
const DEFAULT = ['dispatch', 'client', 'queue', 'latency', 'durable', 'campaign', 'placement'];
const ALIASES: Record<string, string> = { addcost: 'queue', 'add-cost': 'queue' };

/** A directory holding Node 24's `node`: DJS_NODE24, else the npm cache dir (installed on demand). */
function findNode24(log: (m: string) => void): string | null {
  const major = (dir: string) => {
    const r = spawnSync(path.join(dir, 'node'), ['--version'], { encoding: 'utf8' });
    return r.status === 0 ? Number(/^v(\d+)/.exec(r.stdout)?.[1]) : 0;
  };
  if (process.env.DJS_NODE24) return major(process.env.DJS_NODE24) >= 24 ? process.env.DJS_NODE24 : null;
  const prefix = '/tmp/djs-node24', dir = path.join(prefix, 'node_modules', '.bin');
  if (fs.existsSync(path.join(dir, 'node')) && major(dir) === 24) return dir;
  log(`installing Node 24 with: npm install --prefix ${prefix} node@24`);
  const r = spawnSync('npm', ['install', '--no-audit', '--no-fund', '--prefix', prefix, 'node@24'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  if (r.status === 0 && fs.existsSync(path.join(dir, 'node')) && major(dir) === 24) return dir;
  log(`Node 24 not available (npm exited ${r.status}); its measurements are skipped`);
  return null;
}

function table(columns: string[], rows: string[][]): string {
  const esc = (s: string) => s.replace(/\|/g, '\\|');
  return [`| ${columns.map(esc).join(' | ')} |`, `|${columns.map(() => '---').join('|')}|`, ...rows.map((r) => `| ${r.map(esc).join(' | ')} |`)].join('\n');
}

function render(r: BenchResult): string {
  const out = [`## ${r.title}`, ''];
  for (const s of r.sections) out.push(`${s.title}:`, '', table(s.columns, s.rows), '');
  if (r.targets.length) {
    out.push(table(['target', 'measured', 'limit', 'met'], r.targets.map((t) => [t.what, t.measured, t.limit, t.met === null ? '-' : t.met ? 'met' : '**MISSED**'])), '');
  }
  for (const n of r.notes) out.push(`- ${n}`);
  out.push('', `(${r.seconds.toFixed(0)} s)`, '');
  return out.join('\n');
}

async function main(): Promise<number> {
  const { values, positionals } = parseArgs({
    args: process.argv.slice(2), allowPositionals: true,
    options: { quick: { type: 'boolean' }, runs: { type: 'string' }, patched: { type: 'string' }, help: { type: 'boolean', short: 'h' } },
  });
  if (values.help) { process.stdout.write(fs.readFileSync(new URL(import.meta.url), 'utf8').split('\n').filter((l) => l.startsWith('//')).map((l) => l.slice(3)).join('\n') + '\n'); return 0; }
  const names = positionals.length ? positionals.map((p) => ALIASES[p] ?? p) : DEFAULT;
  for (const n of names) if (!BENCHES[n]) { process.stderr.write(`unknown benchmark '${n}'; known: ${[...Object.keys(BENCHES), ...Object.keys(ALIASES)].join(', ')}\n`); return 2; }
  const log = (m: string) => process.stderr.write(`[${new Date().toISOString().slice(11, 19)}] ${m}\n`);
  const quick = Boolean(values.quick) || process.env.BENCH_QUICK === '1';
  const runs = Number(values.runs ?? 3);
  // Each patched copy is labelled by its directory's name (e.g. /tmp/djs-P2/cli.ts → djs-P2).
  const patched = (values.patched ?? '').split(',').filter(Boolean).map((p) => ({ label: path.basename(path.dirname(path.resolve(p))), path: path.resolve(p) }));
  const o: Opts = { quick, runs, node24: findNode24(log), patched, log };
  const t0 = now();
  const mach = machine(o.node24);
  const command = `npm run bench${process.argv.length > 2 ? ' -- ' + process.argv.slice(2).join(' ') : ''}`;
  let md = `# djs benchmark run\n\ncommand: \`${command}\`${quick ? ' (quick: reduced sizes)' : ''}, started ${new Date().toISOString()}\n\n` +
    table(['machine', ''], Object.entries(mach)) + '\n\n';
  process.stdout.write(md);
  const results: BenchResult[] = [];
  const failures: string[] = [];
  for (const n of [...new Set(names)]) {
    log(`--- ${n}`);
    try {
      const r = await BENCHES[n](o);
      results.push(r);
      const text = render(r);
      md += text + '\n';
      process.stdout.write(text + '\n');
    } catch (e) {
      const msg = `benchmark ${n} failed: ${(e as Error).stack ?? e}`;
      failures.push(msg);
      log(msg);
      md += `## ${n}\n\nFAILED: ${(e as Error).message}\n\n`;
    }
  }
  const tail = `load average at end: ${loadAvg()}; total ${((now() - t0) / 1000).toFixed(0)} s\n`;
  md += tail;
  process.stdout.write(tail);
  fs.writeFileSync(path.join(ROOT, 'bench', 'last-run.md'), md);
  fs.writeFileSync(path.join(ROOT, 'bench', 'last-run.json'), JSON.stringify({ command, quick, runs, machine: mach, results, failures }, null, 2) + '\n');
  log('wrote bench/last-run.md and bench/last-run.json');
  return failures.length ? 1 : 0;
}

for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, () => { killTracked(); process.exit(130); });
main().then((code) => { killTracked(); process.exitCode = code; }, (e) => { killTracked(); process.stderr.write(`${(e as Error).stack ?? e}\n`); process.exitCode = 1; });
