// Tier 2: the first lines of cli.ts (the sh/JS bootstrap), run as a new user would run
// them: a checkout whose path holds a space, `#`, `'`, `%41` and `é`, reached through a
// symlink `djs` on PATH from another directory; on a Node without native TypeScript
// (Node 20: tsx, then the cached plain-JS copy) and on Node 24 natively, with no install.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, test, type TestContext } from 'node:test';
import { ROOT, removeDir, run, within, type Run } from './server.ts';

/** Every character that once broke the bootstrap (spliced into JS source and a data: URL). */
const AWKWARD = "djs boot #'%41é ";

const hasNativeTs = (process.features as { typescript?: unknown }).typescript;

/** A directory with a `node` that lacks native TypeScript (runs cli.ts through tsx), or null. */
const nodeWithoutTs = hasNativeTs ? null : path.dirname(process.execPath);

/** A directory with a `node` >= 22.18 (native type stripping): DJS_NODE24, the one CI
 *  installs in /tmp/djs-node24, or this one; null if none. */
const nodeWithTs = (() => {
  const candidates = [process.env.DJS_NODE24, '/tmp/djs-node24/node_modules/.bin', hasNativeTs ? path.dirname(process.execPath) : undefined];
  for (const dir of candidates) {
    if (!dir) continue;
    const r = spawnSync(path.join(dir, 'node'), ['-p', 'process.features.typescript'], { encoding: 'utf8' });
    if (r.status === 0 && r.stdout.trim() === 'strip') return dir;
  }
  return null;
})();

type Checkout = { dir: string; bin: string; work: string };

/** A copy of this checkout's cli.ts and package.json in a fresh directory whose path
 *  holds AWKWARD, with a bin dir holding the symlink `djs` -> its cli.ts and an empty
 *  working dir. withModules: a node_modules of its own (so its cache starts empty)
 *  whose entries link to the real ones (tsx, esbuild). Removed, with every process
 *  left running under it, when the test ends. */
function checkout(t: TestContext, withModules: boolean): Checkout {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), AWKWARD));
  t.after(() => removeDir(root));
  const dir = path.join(root, 'src'), bin = path.join(root, 'bin'), work = path.join(root, 'work');
  for (const d of [dir, bin, work]) fs.mkdirSync(d);
  fs.copyFileSync(path.join(ROOT, 'cli.ts'), path.join(dir, 'cli.ts'));
  fs.chmodSync(path.join(dir, 'cli.ts'), 0o755);
  fs.copyFileSync(path.join(ROOT, 'package.json'), path.join(dir, 'package.json'));
  fs.symlinkSync(path.join(dir, 'cli.ts'), path.join(bin, 'djs'));
  if (withModules) {
    const real = path.join(ROOT, 'node_modules');
    fs.mkdirSync(path.join(dir, 'node_modules'));
    for (const name of fs.readdirSync(real)) {
      if (name !== '.cache') fs.symlinkSync(path.join(real, name), path.join(dir, 'node_modules', name));
    }
  }
  return { dir, bin, work };
}

/** Runs `djs ARGS` from a shell (/bin/sh), in c.work, with c.bin and then nodeDir
 *  first on PATH. */
function djs(c: Checkout, nodeDir: string, args: string[]): Promise<Run> {
  return run('/bin/sh', ['-c', 'djs "$@"', 'sh', ...args], { cwd: c.work, env: { NO_COLOR: '1', PATH: `${c.bin}:${nodeDir}:${process.env.PATH}` } });
}

function assertHelp(r: Run, what: string): void {
  assert.equal(r.code, 0, `${what}: exit ${r.code}: ${r.stderr}`);
  assert.match(r.stdout, /add_job/, `${what}: no usage in ${JSON.stringify(r.stdout)}`);
}

/** The cached copy's name for the content of `file`: cli-CRC-SIZE.mjs, as POSIX cksum says. */
function copyName(file: string): string {
  const [crc, size] = spawnSync('cksum', [file], { encoding: 'utf8' }).stdout.trim().split(' ');
  return `cli-${crc}-${size}.mjs`;
}

/** A whole round through the server: start --detach (a background server started the
 *  way this run was started), a fake worker, a job that prints its environment, stop.
 *  Returns the job's log. */
async function round(c: Checkout, nodeDir: string): Promise<string> {
  const data = path.join(c.work, 'd'), logs = path.join(c.work, 'l'), script = path.join(c.work, "env job #'.sh");
  fs.writeFileSync(script, '#!/bin/sh\nenv\n', { mode: 0o755 });
  const run = async (args: string[]) => {
    const r = await within(djs(c, nodeDir, args), 20_000, `djs ${args.join(' ')}`);
    assert.equal(r.code, 0, `djs ${args.join(' ')}: exit ${r.code}: ${r.stderr}`);
    return r.stdout;
  };
  assert.match(await run(['start', '--detach', data, logs]), /server ready/);
  try {
    await run(['--data-dir', data, 'add_slave', '--skip_ssh_auth_check', 'w1:1']);
    const id = (await run(['--data-dir', data, 'add_job', script])).trim();
    await run(['--data-dir', data, 'wait', id]);
    return await run(['--data-dir', data, 'log', id]);
  } finally {
    await run(['--data-dir', data, 'stop']);
  }
}

/** Fails if the bootstrap's variables reached a job (they would reach every job). */
function assertCleanEnv(jobLog: string): void {
  assert.match(jobLog, /^JOB_ID=1$/m, `not the job's environment: ${jobLog}`);
  assert.doesNotMatch(jobLog, /^(DJS_BOOT|_djs_)/m, 'a bootstrap variable reached the job');
}

describe('the bootstrap (first lines of cli.ts)', { concurrency: true }, () => {
  test('Node without native TypeScript: through tsx with an empty cache, then the cached copy', { skip: !nodeWithoutTs && 'no Node without native TypeScript here', timeout: 60_000 }, async (t) => {
    const c = checkout(t, true);
    const cache = path.join(c.dir, 'node_modules', '.cache', 'djs');
    const stale = path.join(cache, 'cli-1-1.mjs'), fresh = path.join(cache, 'cli-2-2.mjs');
    fs.mkdirSync(cache, { recursive: true });
    fs.writeFileSync(stale, '');
    fs.writeFileSync(fresh, '');
    const twoDaysAgo = new Date(Date.now() - 2 * 864e5);
    fs.utimesSync(stale, twoDaysAgo, twoDaysAgo);

    assertHelp(await djs(c, nodeWithoutTs!, ['help']), 'cold');
    const copy = path.join(cache, copyName(path.join(c.dir, 'cli.ts')));
    assert.ok(fs.statSync(copy).size > 0, 'no cached copy written');
    assert.deepEqual(fs.readdirSync(cache).sort(), [path.basename(fresh), path.basename(copy)].sort(), 'a day-old copy kept, or a temp file left');

    // The warm run must run that copy: mark it and look for the mark.
    fs.appendFileSync(copy, '\nprocess.stderr.write("ran the cached copy\\n");\n');
    const warm = await djs(c, nodeWithoutTs!, ['help']);
    assertHelp(warm, 'warm');
    assert.match(warm.stderr, /ran the cached copy/);
  });

  test('Node without native TypeScript, empty cache: a detached server and its jobs', { skip: !nodeWithoutTs && 'no Node without native TypeScript here', timeout: 60_000 }, async (t) => {
    const c = checkout(t, true);
    assertCleanEnv(await round(c, nodeWithoutTs!));
  });

  test('Node without native TypeScript and no node_modules: names the real checkout to run npm ci in', { skip: !nodeWithoutTs && 'no Node without native TypeScript here', timeout: 60_000 }, async (t) => {
    const c = checkout(t, false);
    const r = await djs(c, nodeWithoutTs!, ['help']);
    assert.equal(r.code, 2, r.stderr);
    assert.ok(r.stderr.includes(`run npm ci in ${fs.realpathSync(c.dir)} (for tsx)`), r.stderr);
  });

  test('Node 24 natively, with no node_modules at all: help, and a detached server and its jobs', { skip: !nodeWithTs && 'no Node >= 22.18 found (set DJS_NODE24=DIR)', timeout: 60_000 }, async (t) => {
    const c = checkout(t, false);
    assertHelp(await djs(c, nodeWithTs!, ['help']), 'native');
    assertCleanEnv(await round(c, nodeWithTs!));
    assert.ok(!fs.existsSync(path.join(c.dir, 'node_modules')), 'node_modules created');
  });
});
