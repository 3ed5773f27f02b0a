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

test('a FIFO, a symlink or a device in place of the settings, the lock file or the pid file of a stopped server: start neither hangs nor reads it all', { timeout: 180_000 }, async (t) => {
  const dir = testDir(t);
  const data = path.join(dir, '.data'), logs = path.join(dir, 'logs');
  assert.equal((await runCli(['start', '--detach', data, logs], { cwd: dir, timeoutMs: 30_000 })).code, 0);
  assert.equal((await runCli(['--data-dir', data, 'stop'], { cwd: dir, timeoutMs: 30_000 })).code, 0);
  const kept = { settings: fs.readFileSync(path.join(data, 'settings')), 'lock.token': fs.readFileSync(path.join(data, 'lock.token')) };
  for (const [name, what] of [['settings', 'the settings'], ['lock.token', 'the lock file']] as const) {
    const file = path.join(data, name);
    for (const [kind, make, said] of [
      ['a FIFO', () => spawnSync('mkfifo', [file]), /is not a plain file/],
      ['a symlink to /dev/zero', () => fs.symlinkSync('/dev/zero', file), /is a symbolic link/],
    ] as [string, () => void, RegExp][]) {
      fs.rmSync(file, { force: true });
      make();
      const r = await runCli(['start', '--detach', data, logs], { cwd: dir, timeoutMs: 30_000 });
      assert.equal(r.code, 1, `${name} as ${kind}: exit ${r.code} ${r.signal ?? ''} ${r.stderr}`);
      const first = r.stderr.split('\n')[0];
      assert.ok(first.startsWith(`error: ${what} '${file}' `), `${name} as ${kind}: ${r.stderr}`);
      assert.match(first, said, `${name} as ${kind}`);
    }
    fs.rmSync(file, { force: true });
    fs.writeFileSync(file, kept[name], { mode: 0o600 });
  }
  // The pid file only says whether a server runs: one that is not a plain file says no.
  const pid = path.join(data, 'server.pid');
  fs.rmSync(pid, { force: true });
  spawnSync('mkfifo', [pid]);
  const r = await runCli(['start', '--detach', data, logs], { cwd: dir, timeoutMs: 30_000 });
  t.after(() => runCli(['--data-dir', data, 'stop']));
  assert.equal(r.code, 0, r.stderr);
  assert.ok(fs.lstatSync(pid).isFile(), 'the new server wrote its pid file over the FIFO');
});
