// One client of the durable-adds benchmark (spawned by durable.ts): connects to the
// server's socket, says "ready", waits for "go" on stdin, then adds COUNT jobs one by
// one (each request waits for its answer, which comes after the fsync), and prints
// {"ms":…,"per":[…]} on stdout.
import { Conn, now } from './lib.ts';

const [sock, cwd, script, countText, tag] = process.argv.slice(2);
const count = Number(countText);
const conn = await Conn.open(sock);
process.stdout.write('ready\n');
await new Promise<void>((resolve) => process.stdin.once('data', () => resolve()));
const per: number[] = [];
const t0 = now();
for (let i = 0; i < count; i++) {
  const t1 = now();
  await conn.request({ op: 'add_jobs', cwd, jobs: [[script, `${tag}-${i}`]] });
  per.push(now() - t1);
}
const ms = now() - t0;
conn.close();
process.stdout.write(JSON.stringify({ ms, per }) + '\n');
