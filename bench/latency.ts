// 5. Latency with a free slot: add_job returning → the job's script running; and a
// job's end → the next job starting on the same slot (one slot, two jobs). With
// --patched, every copy of cli.ts gets a server of its own and the repetitions alternate
// between them.
import fs from 'node:fs';
import path from 'node:path';
import { type BenchResult, type Conn, type Opts, type Target, CLI, Server, fmt, median, now, quantile, tempDir, until, wallMs, writeScript } from './lib.ts';

const stamp = (file: string) => Number(fs.readFileSync(file, 'utf8').trim()) / 1e6; // ns → ms

type Version = { label: string; srv: Server; dir: string; ts: string; script: string; conn?: Conn; addCli: number[]; addSock: number[]; next: number[] };

/** One repetition of the three measurements on one version's server. */
async function measure(v: Version): Promise<void> {
  const { srv, dir, ts, script } = v;
  const conn = v.conn!;
  const waitFor = (id: number) => conn.request({ op: 'wait', ids: [id] });
  const started = (id: number) => until(() => fs.existsSync(path.join(ts, `${id}.end`)) && fs.statSync(path.join(ts, `${id}.end`)).size > 0, `job ${id} to run`, 10_000, 2);
  // a. through the real client: from the `cli.ts add_job` process's exit.
  const res = await srv.ok(['add_job', script], { cwd: dir });
  const id = Number(res.stdout.trim());
  await started(id);
  await waitFor(id);
  v.addCli.push(stamp(path.join(ts, `${id}.start`)) - res.endWall);
  // b. over the socket: from the answer's arrival.
  const a = await conn.request({ op: 'add_jobs', cwd: dir, jobs: [[script]] });
  const answered = wallMs();
  const id2 = Number(a.first);
  await started(id2);
  await waitFor(id2);
  v.addSock.push(stamp(path.join(ts, `${id2}.start`)) - answered);
  // c. end → next start: two jobs at once on the one slot.
  const b = await conn.request({ op: 'add_jobs', cwd: dir, jobs: [[script], [script]] });
  const j1 = Number(b.first), j2 = j1 + 1;
  await started(j2);
  await waitFor(j2);
  v.next.push(stamp(path.join(ts, `${j2}.start`)) - stamp(path.join(ts, `${j1}.end`)));
}

export async function latency(o: Opts): Promise<BenchResult> {
  const t00 = now();
  const reps = o.quick ? 5 : 20;
  const versions: Version[] = [{ label: '', cli: CLI }, ...o.patched.map((p) => ({ label: p.label, cli: p.path }))].map(({ label, cli }) => {
    const dir = tempDir('djsb-l-');
    const ts = path.join(dir, 'ts');
    fs.mkdirSync(ts);
    const script = writeScript(path.join(dir, 'lat.sh'), `date +%s%N > ${ts}/$JOB_ID.start\ndate +%s%N > ${ts}/$JOB_ID.end`);
    return { label, srv: new Server(dir, undefined, cli), dir, ts, script, addCli: [], addSock: [], next: [] };
  });
  try {
    for (const v of versions) {
      await v.srv.start();
      await v.srv.ok(['add_slave', '--skip_ssh_auth_check', 'w:1']);
      v.conn = await v.srv.connect();
    }
    for (let r = 0; r < reps; r++) for (const v of versions) await measure(v);
  } finally {
    for (const v of versions) {
      v.conn?.close();
      await v.srv.close();
      fs.rmSync(v.dir, { recursive: true, force: true });
    }
  }
  const row = (label: string, xs: number[]) => [label, String(xs.length), fmt(median(xs), 1), fmt(quantile(xs, 0.9), 1), fmt(Math.min(...xs), 1), fmt(Math.max(...xs), 1)];
  const rows: string[][] = [];
  const targets: Target[] = [];
  for (const v of versions) {
    const tag = v.label ? ` (${v.label})` : '';
    rows.push(row(`\`cli.ts add_job\` exits → script runs${tag}`, v.addCli), row(`add_jobs answer arrives on the socket → script runs${tag}`, v.addSock), row(`job 1 ends → job 2 starts on the same slot${tag}`, v.next));
    targets.push(
      { what: `add_job returning → script running (median, real client)${tag}`, measured: `${fmt(median(v.addCli), 1)} ms`, limit: '< 20 ms', met: median(v.addCli) < 20 },
      { what: `job end → next job running on that slot (median)${tag}`, measured: `${fmt(median(v.next), 1)} ms`, limit: '< 20 ms', met: median(v.next) < 20 },
    );
  }
  const notes = ['The server answers an add and starts the job in the same turn (events fsynced first), so the job can start before the client process has even exited: a negative value means the script ran first.'];
  for (const p of o.patched) notes.push(`(${p.label}) = ${p.path}, a server of its own; its repetitions alternate with the others'.`);
  return {
    name: 'latency', title: '5. Latency (one worker with one slot)',
    sections: [{ title: 'milliseconds; the script stamps `date +%s%N` first thing and last thing', columns: ['interval', 'n', 'median', 'p90', 'min', 'max'], rows }],
    targets, notes, seconds: (now() - t00) / 1000,
  };
}
