// Tier 2: what the attack round of bench/RESULTS.md found (see "Hardening round 3"):
// files in the data dir that the server reads at start must not hang it or eat memory.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { runCli, testDir } from './server.ts';

test('a symlink (to /dev/zero, say), a FIFO or a directory at DATA_DIR/instance: start says so in one line, neither hangs nor reads it all', { timeout: 120_000 }, async (t) => {
  const dir = testDir(t);
  const data = path.join(dir, '.data'), logs = path.join(dir, 'logs'), instance = path.join(data, 'instance');
  fs.mkdirSync(data, { mode: 0o700 });
  const plant: [string, () => void, RegExp][] = [
    ['a symlink to /dev/zero', () => fs.symlinkSync('/dev/zero', instance), /is a symbolic link/],
    ['a FIFO', () => spawnSync('mkfifo', [instance]), /is not a plain file/],
    ['a directory', () => fs.mkdirSync(instance), /is not a plain file/],
  ];
  for (const [what, make, said] of plant) {
    fs.rmSync(instance, { recursive: true, force: true });
    make();
    const r = await runCli(['start', '--detach', data, logs], { cwd: dir, timeoutMs: 30_000 });
    assert.equal(r.code, 1, `${what}: exit ${r.code} ${r.signal ?? ''} ${r.stderr}`);
    const first = r.stderr.split('\n')[0];
    assert.match(first, /^error: the instance file '.*\/\.data\/instance' /, `${what}: ${r.stderr}`);
    assert.match(first, said, what);
  }
  // Removed, the next start makes it: a plain file of 8 letters and digits.
  fs.rmSync(instance, { recursive: true, force: true });
  const r = await runCli(['start', '--detach', data, logs], { cwd: dir, timeoutMs: 30_000 });
  assert.equal(r.code, 0, r.stderr);
  t.after(() => runCli(['--data-dir', data, 'stop']));
  assert.match(fs.readFileSync(instance, 'utf8'), /^[a-z0-9]{8}\n$/);
});
