// Tier 3 groundwork: the ssh test hosts of test/hosts.ts behave like real hosts.

import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { findProcesses, sshSkip, startHosts, type TestHosts } from './hosts.ts';
import { removeDir, run, tempDir, until } from './server.ts';

const CONNECT_TIMEOUT_S = 3;

describe('ssh test hosts', { skip: sshSkip() }, () => {
  let h: TestHosts;
  let local: string;

  before(async () => {
    h = await startHosts(3, { noKeyHosts: [2] });
    local = tempDir('djst-');
  });
  after(async () => {
    await h?.close();
    if (local) await removeDir(local);
  });

  /** ssh to ADDR in batch mode with a short connect timeout. */
  const ssh = (addr: string, command: string) =>
    run('ssh', ['-F', h.sshConfig, '-o', 'BatchMode=yes', '-o', `ConnectTimeout=${CONNECT_TIMEOUT_S}`, addr, command], {
      timeoutMs: 20_000,
    });

  test('each host runs commands in its own scratch dir, which is also HOME', async () => {
    for (const host of h.hosts.slice(0, 2)) {
      const r = await ssh(host.addr, 'pwd; echo "$HOME"');
      assert.equal(r.code, 0, r.stderr);
      assert.deepEqual(r.stdout.trim().split('\n'), [host.scratch, host.scratch]);
    }
    assert.notEqual(h.hosts[0].scratch, h.hosts[1].scratch);
  });

  test('rsync moves a file with a space in its name to a host and back', async () => {
    const host = h.hosts[1];
    const name = 'a file.txt';
    fs.writeFileSync(path.join(local, name), 'one two three\n');
    const rsh = `ssh -F ${h.sshConfig}`;
    const there = await run('rsync', ['-s', '-e', rsh, `./${name}`, `${host.addr}:sub/`], { cwd: local });
    assert.equal(there.code, 0, there.stderr);
    assert.equal(fs.readFileSync(path.join(host.scratch, 'sub', name), 'utf8'), 'one two three\n');

    const back = await run('rsync', ['-s', '-e', rsh, `${host.addr}:sub/${name}`, 'back/'], { cwd: local });
    assert.equal(back.code, 0, back.stderr);
    assert.equal(fs.readFileSync(path.join(local, 'back', name), 'utf8'), 'one two three\n');
  });

  test('a killed host refuses connections (ssh exits 255 at once) until restarted', async () => {
    const host = h.hosts[0];
    await host.kill();
    try {
      const r = await ssh(host.addr, 'true');
      assert.equal(r.code, 255);
      assert.match(r.stderr, /refused/);
      assert.ok(r.ms < CONNECT_TIMEOUT_S * 1000, `took ${r.ms} ms`);
    } finally {
      await host.restart();
    }
    const again = await ssh(host.addr, 'echo back');
    assert.equal(again.code, 0, again.stderr);
    assert.equal(again.stdout, 'back\n');
  });

  test('a stopped host hangs: ssh gives up with 255 after ConnectTimeout, and works after cont', async () => {
    const host = h.hosts[1];
    host.stop();
    try {
      const r = await ssh(host.addr, 'true');
      assert.equal(r.code, 255);
      assert.match(r.stderr, /timed out/);
      assert.ok(r.ms >= (CONNECT_TIMEOUT_S - 1) * 1000, `gave up too early: ${r.ms} ms`);
      assert.ok(r.ms < (CONNECT_TIMEOUT_S + 3) * 1000, `took ${r.ms} ms`);
    } finally {
      host.cont();
    }
    const again = await ssh(host.addr, 'echo back');
    assert.equal(again.code, 0, again.stderr);
  });

  test('a stopped host silences open sessions: ServerAlive gives up with 255', async () => {
    const host = h.hosts[1];
    const session = run(
      'ssh',
      ['-F', h.sshConfig, '-o', 'ServerAliveInterval=1', '-o', 'ServerAliveCountMax=2', host.addr, 'touch up; sleep 20'],
      { timeoutMs: 20_000 },
    );
    await until(() => fs.existsSync(path.join(host.scratch, 'up')), 'the session to start', 5000);
    host.stop();
    try {
      const r = await session;
      assert.equal(r.code, 255);
      assert.match(r.stderr, /Timeout/);
      assert.ok(r.ms < 10_000, `took ${r.ms} ms`);
    } finally {
      host.cont();
    }
  });

  test('a host without the key rejects the login with 255 and "Permission denied"', async () => {
    const r = await ssh(h.hosts[2].addr, 'true');
    assert.equal(r.code, 255);
    assert.match(r.stderr, /Permission denied/);
  });

  test('close() leaves no process behind, even sessions of a killed host', async () => {
    const own = await startHosts(1);
    const marker = `${900 + Math.floor(Math.random() * 99)}.${process.pid}`;
    // A session that outlives its connection: a detached remote sleep.
    const r = await run('ssh', ['-F', own.sshConfig, own.hosts[0].addr, `sleep ${marker} </dev/null >/dev/null 2>&1 &`]);
    assert.equal(r.code, 0, r.stderr);
    await until(() => findProcesses(['sleep', marker]).length === 1, 'the remote sleep', 5000);
    await own.hosts[0].kill();
    assert.equal(findProcesses(['sleep', marker]).length, 1, 'kill() stops the listener only');
    await own.close();
    assert.deepEqual(findProcesses(['sleep', marker]), []);
    assert.equal(fs.existsSync(own.dir), false);
  });
});
