// The test suite, as `npm test` runs it: every test/*.test.ts file (or the files named on
// the command line), three files at a time, the slowest first. While one file waits on
// sshd hosts, Slurm, a browser or a timeout, another uses the CPU: on 2 cores three at
// a time keep both busy (four end no sooner: the suite is then bound by CPU). Started
// first, the longest files do not decide alone when the run ends.
// DJS_TEST_CONCURRENCY=1 runs one file at a time.
//   node --import tsx test/run.ts [FILE...]
import { run } from 'node:test';
import { tap } from 'node:test/reporters';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));

/** The files that take longest here (30 s and more alone), longest first; the rest follow
 *  in name order. A new slow file belongs in this list. */
const SLOWEST = ['ssh-scale', 'newcomer', 'on-worker', 'transfer', 'slurm', 'crash', 'scale', 'hardening', 'bounded', 'campaign', 'dashboard', 'hardening3', 'firstday-env', 'ssh', 'http', 'cli', 'clipy'];

const stale = SLOWEST.filter((n) => !fs.existsSync(path.join(HERE, `${n}.test.ts`)));
assert.deepEqual(stale, [], 'SLOWEST names test files that are not there (renamed?)');

const rank = (file: string) => {
  const i = SLOWEST.indexOf(path.basename(file, '.test.ts'));
  return i < 0 ? SLOWEST.length : i;
};

const named = process.argv.slice(2).map((f) => path.resolve(f));
const files = (named.length ? named : fs.readdirSync(HERE).filter((f) => f.endsWith('.test.ts')).map((f) => path.join(HERE, f)))
  .sort((a, b) => rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0));
const concurrency = Number(process.env.DJS_TEST_CONCURRENCY ?? 3);
if (!Number.isInteger(concurrency) || concurrency < 1) {
  console.error(`error: DJS_TEST_CONCURRENCY must be a whole number of at least 1, not '${process.env.DJS_TEST_CONCURRENCY}'`);
  process.exit(2);
}

// When each file's process ended, from the start: printed last, to keep SLOWEST right.
// (Results are reported in file order, so test:pass comes late for a file that ended
// early; test:complete of the file's own entry, named by its path, comes when it ends.)
const t0 = Date.now(), ended = new Map<string, number>();
const stream = run({ files, concurrency });
stream.on('test:complete', (d: { file?: string; name: string }) => { if (d.file && d.name === d.file) ended.set(d.file, Date.now() - t0); });
stream.on('test:fail', () => { process.exitCode = 1; });
const out = stream.compose(tap);
out.pipe(process.stdout, { end: false });
out.on('end', () => {
  const last = [...ended].sort((a, b) => b[1] - a[1]).slice(0, 6).map(([f, ms]) => `${path.basename(f, '.test.ts')} ${(ms / 1000).toFixed(0)} s`);
  process.stdout.write(`# the last files to end, from the start: ${last.join(', ')}\n`);
});
