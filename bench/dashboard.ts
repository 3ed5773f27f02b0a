// What the dashboard's reads cost with a million jobs, in the server's own terms: the
// core functions that answer GET /api/jobs (pageJobs), the event streams' view and
// /metrics, timed in this process on a state of 1,000,000 jobs built with applyEvent,
// against the status reply (`cli.ts status`) measured in the same run as the baseline.
// Only when named: `npm run bench -- dashboard`.
import { applyEvent, chartOf, formatMetrics, newMetrics, newState, pageJobs, statusView, type Event } from '../cli.ts';
import { type BenchResult, type Opts, fmt, median, now } from './lib.ts';

export async function dashboard(o: Opts): Promise<BenchResult> {
  const t0 = now();
  const n = o.quick ? 100_000 : 1_000_000;
  const st = newState(), T = Date.UTC(2026, 0, 1);
  o.log(`dashboard: building a state of ${n} jobs`);
  applyEvent(st, { e: 'add', t: T, id: 1, cwd: '/w', retries: 0, timeout: 0, jobs: Array.from({ length: n }, (_, i) => ['/w/job.sh', `input-${i + 1}.txt`]) });
  for (let w = 0; w < 30; w++) applyEvent(st, { e: 'worker', t: T, host: `node${w}`, slots: 8, ssh: false });
  // Most jobs done, a few failed (every 1,000th), 240 running.
  let t = T;
  for (let id = 1; id <= n - 10_000; id++) {
    const host = `node${id % 30}`;
    const evs: Event[] = [{ e: 'start', t: ++t, id, host, slot: 0 }, { e: 'end', t: ++t, id, run: 1, code: id % 1000 === 0 ? 1 : 0 }];
    for (const ev of evs) applyEvent(st, ev);
  }
  for (let i = 0; i < 240; i++) applyEvent(st, { e: 'start', t: ++t, id: n - 10_000 + 1 + i, host: `node${i % 30}`, slot: Math.floor(i / 30) });
  const m = newMetrics(t);
  const reps = o.quick ? 5 : 20;
  const time = (fn: () => unknown) => {
    const xs: number[] = [];
    for (let r = 0; r < reps; r++) { const a = now(); fn(); xs.push(now() - a); }
    return median(xs);
  };
  const base = time(() => JSON.stringify(statusView(st)));
  const rows: [string, number][] = [
    ['status reply (baseline: what `cli.ts status` gets)', base],
    ['GET /api/jobs: newest 50', time(() => JSON.stringify(pageJobs(st, { op: 'jobs' }, t)))],
    ['GET /api/jobs: 50 from the middle (before=n/2)', time(() => JSON.stringify(pageJobs(st, { op: 'jobs', before: n / 2 }, t)))],
    ['GET /api/jobs?state=failed (1 in 1,000): 50', time(() => JSON.stringify(pageJobs(st, { op: 'jobs', state: 'failed' }, t)))],
    ['GET /api/jobs?worker=node7: 50', time(() => JSON.stringify(pageJobs(st, { op: 'jobs', worker: 'node7' }, t)))],
    ['GET /api/jobs?text=nothing (no match: one part, PAGE_SCAN_BUDGET ids)', time(() => JSON.stringify(pageJobs(st, { op: 'jobs', text: 'nothing' }, t)))],
    ['event stream view (status + chart)', time(() => JSON.stringify({ ...statusView(st), ...chartOf(m, st, t) }))],
    ['GET /metrics', time(() => formatMetrics(statusView(st), m))],
  ];
  return {
    name: 'dashboard', title: `Dashboard reads with ${n.toLocaleString('en')} jobs (in-process, median of ${reps})`,
    sections: [{ title: 'one answer, built and serialised', columns: ['read', 'ms', '× status'], rows: rows.map(([what, v]) => [what, fmt(v, 2), fmt(v / base, 1)]) }],
    targets: [],
    notes: ['The reads run in the server process between flushes; this times the core functions and JSON.stringify, not the HTTP round trip.'],
    seconds: (now() - t0) / 1000,
  };
}
