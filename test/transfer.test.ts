// add_job --on-worker with --transfer, --return, --return-optional and --cleanup: files for
// hosts without a shared disk, moved by rsync over the worker's shared ssh connection into
// the job's own directory there (~/.djs-work/$DJS_RUN_NAME). Tier 2: the usage errors and a
// local worker (the command runs in place); tier 3 on real sshd hosts, whose HOME is a
// scratch directory of their own: nothing is shared with here but what rsync sends.
import { describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { startHosts, sshSkip } from './hosts.ts';
import { serve, socketOp, until, untilState, allPids } from './server.ts';

/** Pids of live processes whose environment holds this NAME=VALUE word. */
function withEnv(word: string): number[] {
  return allPids().filter((p) => {
    try {
      if (/^\S+ \(.*\) Z/.test(fs.readFileSync(`/proc/${p}/stat`, 'latin1'))) return false;
      return fs.readFileSync(`/proc/${p}/environ`, 'latin1').split('\0').includes(word);
    } catch { return false; }
  });
}

/** Whether a job's command has begun on a host (it touches `started` in its directory). */
const started = (scratch: string) => fs.existsSync(path.join(scratch, '.djs-work')) && fs.readdirSync(path.join(scratch, '.djs-work')).some((d) => fs.existsSync(path.join(scratch, '.djs-work', d, 'started')));

/** A file name with a space, a quote, a double quote, a newline and é in it. */
const NASTY = 'in put\'s "x"\né.txt';

describe('tier 2: --transfer, --return, --cleanup refused without --on-worker; in place on a local worker', () => {
  test('usage errors, a missing --transfer file, and a local worker runs the command in place', async (t) => {
    const s = await serve(t);
    const r = await socketOp(s.dataDir, { op: 'add_workers', workers: [{ host: 'local1', slots: 1, auto: false, gpus: 0, labels: [], env: [] }], skipCheck: true });
    assert.ok(r.ok, r.error);
    for (const opt of [['--transfer', 'a'], ['--return', 'a'], ['--return-optional'], ['--cleanup']]) {
      const bad = await s.cli(['add_job', ...opt, 'true']);
      assert.equal(bad.code, 2, bad.stderr);
      assert.match(bad.stderr, /are for --on-worker commands/);
    }
    const dots = await s.cli(['add_job', '--on-worker', '--return', '../up', 'true']);
    assert.equal(dots.code, 2, dots.stderr);
    const abs = await s.cli(['add_job', '--on-worker', '--return', '/etc/passwd', 'true']);
    assert.equal(abs.code, 2, abs.stderr);
    const none = await s.cli(['add_job', '--on-worker', '--transfer', 'no-such-file', 'true']);
    assert.equal(none.code, 1, none.stderr);
    assert.match(none.stderr, /--transfer file 'no-such-file': no such file/);
    assert.equal((await s.ok(['list'])).includes('no-such-file'), false, 'nothing queued');
    // On a local worker: in place (this machine's disk is the queued directory's).
    fs.writeFileSync(path.join(s.dir, 'in.txt'), 'local\n');
    const id = (await s.ok(['add_job', '--on-worker', '--transfer', 'in.txt', '--return', 'out.txt', '--cleanup', 'sh', '-c', 'cat in.txt > out.txt'])).trim();
    await untilState(s, id, 'done');
    assert.equal(fs.readFileSync(path.join(s.dir, 'out.txt'), 'utf8'), 'local\n');
  });
});

async function setup(t: TestContext, n: number) {
  const hosts = await startHosts(n);
  t.after(() => hosts.close());
  const env = { DJS_SSH_CONFIG: hosts.sshConfig, DJS_SSH_TIMEOUT: '3', DJS_PROBE_BACKOFF_MAX: '2' };
  const s = await serve(t, { env, args: ['--kill-grace', '2'] });
  return { hosts, s, env };
}

describe('tier 3: --transfer and --return on real sshd hosts without a shared disk', { skip: sshSkip() }, () => {
  test('a file with a space, quotes, a newline and é goes to the job\'s own directory, the command runs there, its output comes back; --cleanup removes the directory', { timeout: 90_000 }, async (t) => {
    const { hosts, s } = await setup(t, 1);
    const h = hosts.hosts[0];
    await s.ok(['add_slave', h.addr]);
    fs.mkdirSync(path.join(s.dir, 'sub'));
    fs.writeFileSync(path.join(s.dir, 'sub', NASTY), 'hello é\n');
    fs.writeFileSync(path.join(s.dir, 'abs.txt'), 'absolute\n');
    const out = `out ${NASTY}`;
    const prog = 'mkdir res; cat "sub/$1" abs.txt > "res/$2"; pwd -P > where; echo "$DJS_RUN_NAME" >> where';
    fs.mkdirSync(path.join(s.dir, 'res'));
    const id = (await s.ok(['add_job', '--on-worker', '--transfer', `sub/${NASTY}`, '--transfer', path.join(s.dir, 'abs.txt'),
      '--return', `res/${out}`, '--return', 'where', 'sh', '-c', prog, 'sh', NASTY, out])).trim();
    const job = await untilState(s, id, 'done', 30_000).catch((e) => { throw new Error(e.message + fs.readFileSync(path.join(s.logDir, `${id}.log`), 'utf8')); });
    assert.equal(fs.readFileSync(path.join(s.dir, 'res', out), 'utf8'), 'hello é\nabsolute\n', 'the output came back to the queued directory');
    const [where, run] = fs.readFileSync(path.join(s.dir, 'where'), 'utf8').trim().split('\n');
    assert.equal(where, path.join(fs.realpathSync(h.scratch), '.djs-work', run), 'run in ~/.djs-work/$DJS_RUN_NAME on the host');
    assert.match(run, new RegExp(`-${id}-\\d+$`), job.worker);
    assert.ok(fs.existsSync(path.join(where, 'sub', NASTY)), 'kept without --cleanup');
    const listed = JSON.parse(await s.ok(['list', '--json'])).find((j: { id: number }) => String(j.id) === id);
    assert.deepEqual([listed.workdir, listed.transfer, listed.return], [`~/.djs-work/${run}`, [`sub/${NASTY}`, path.join(s.dir, 'abs.txt')], [`res/${out}`, 'where']]);
    // --cleanup: nothing left of the job on the host.
    const c = (await s.ok(['add_job', '--on-worker', '--cleanup', '--transfer', 'abs.txt', '--return', 'got', 'sh', '-c', 'cp abs.txt got; echo "$DJS_RUN_NAME" > name'])).trim();
    await untilState(s, c, 'done', 30_000);
    assert.equal(fs.readFileSync(path.join(s.dir, 'got'), 'utf8'), 'absolute\n');
    const left = fs.readdirSync(path.join(h.scratch, '.djs-work'));
    assert.deepEqual(left, [run], 'the --cleanup job left no directory');
  });

  test('two jobs of two servers at once, on the same host, do not share a directory', { timeout: 90_000 }, async (t) => {
    const { hosts, s, env } = await setup(t, 2);
    const s2 = await serve(t, { env, args: ['--kill-grace', '2'] });
    const [h0, h1] = hosts.hosts;
    for (const srv of [s, s2]) {
      await srv.ok(['add_slave', `${h0.addr}:1`, `${h1.addr}:1`]);
      fs.writeFileSync(path.join(srv.dir, 'in'), `${srv.dir}\n`);
    }
    // Both hold their directory until both are there, then each says what it found.
    const prog = 'touch here; n=0; while [ "$(ls -d ../*/here 2>/dev/null | wc -l)" -lt 2 ] && [ $n -lt 200 ]; do sleep 0.1; n=$((n+1)); done; ls > seen; pwd -P >> seen';
    const ids = [];
    for (const srv of [s, s2]) ids.push((await srv.ok(['add_job', '--on-worker', '--host', h0.addr, '--transfer', 'in', '--return', 'seen', 'sh', '-c', prog])).trim());
    await untilState(s, ids[0], 'done', 40_000);
    await untilState(s2, ids[1], 'done', 40_000);
    const seen = [s, s2].map((srv) => fs.readFileSync(path.join(srv.dir, 'seen'), 'utf8').trim().split('\n'));
    for (const x of seen) assert.deepEqual(x.slice(0, -1), ['here', 'in', 'seen'], 'only its own files in its directory');
    assert.notEqual(seen[0].at(-1), seen[1].at(-1), 'two directories');
    assert.equal(fs.readdirSync(path.join(h0.scratch, '.djs-work')).length, 2);
  });

  test('a missing --return file fails the job, with a reason in list and the log; --return-optional does not', { timeout: 90_000 }, async (t) => {
    const { hosts, s } = await setup(t, 1);
    await s.ok(['add_slave', hosts.hosts[0].addr]);
    const miss = (await s.ok(['add_job', '--on-worker', '--return', 'never', '--return', 'made', '--return', 'dir', 'sh', '-c', 'echo x > made; mkdir -p dir/e; echo y > dir/e/f'])).trim();
    const failed = await untilState(s, miss, 'failed', 30_000);
    assert.equal(failed.exitCode, 253);
    assert.match(failed.reason, /--return file is missing/);
    assert.match(await s.ok(['list']), /--return file is missing/);
    assert.match(fs.readFileSync(path.join(s.logDir, `${miss}.log`), 'utf8'), /djs: --return from .* failed/);
    assert.equal(fs.readFileSync(path.join(s.dir, 'made'), 'utf8'), 'x\n', 'the files that are there still come back');
    assert.equal(fs.readFileSync(path.join(s.dir, 'dir', 'e', 'f'), 'utf8'), 'y\n', 'a directory comes back whole');
    // A command that failed keeps its own code, and its files still come back.
    const own = (await s.ok(['add_job', '--on-worker', '--return', 'made2', 'sh', '-c', 'echo y > made2; exit 7'])).trim();
    assert.equal((await untilState(s, own, 'failed', 30_000)).exitCode, 7);
    assert.equal(fs.readFileSync(path.join(s.dir, 'made2'), 'utf8'), 'y\n');
    const opt = (await s.ok(['add_job', '--on-worker', '--return-optional', '--return', 'never', '--return', 'made3', 'sh', '-c', 'echo z > made3'])).trim();
    await untilState(s, opt, 'done', 30_000);
    assert.equal(fs.readFileSync(path.join(s.dir, 'made3'), 'utf8'), 'z\n');
  });

  test('a kill mid-run leaves no process of the job on the host, nor rsync here', { timeout: 90_000 }, async (t) => {
    const { hosts, s } = await setup(t, 1);
    await s.ok(['add_slave', hosts.hosts[0].addr]);
    fs.writeFileSync(path.join(s.dir, 'in'), 'x');
    const mark = `DJS_XFER_MARK=${process.pid}-${Date.now()}`;
    const id = (await s.ok(['add_job', '--on-worker', '-e', mark, '--transfer', 'in', '--return', 'out', '--cleanup', 'sh', '-c', 'touch started; sleep 600; echo > out'])).trim();
    await until(() => started(hosts.hosts[0].scratch), 'the command running on the host', 30_000);
    await s.ok(['kill', id]);
    await untilState(s, id, 'killed', 30_000);
    await until(() => withEnv(mark).length === 0, 'no process of the job left', 10_000);
    const rsyncs = () => allPids().filter((p) => { try { return fs.readFileSync(`/proc/${p}/cmdline`, 'latin1').startsWith('rsync\0') && fs.readFileSync(`/proc/${p}/cmdline`, 'latin1').includes(s.dir); } catch { return false; } });
    assert.deepEqual(rsyncs(), []);
  });

  test('a host that dies mid-run is a worker failure (exit 255): the job runs again and its files come back', { timeout: 90_000 }, async (t) => {
    const { hosts, s } = await setup(t, 1);
    const h = hosts.hosts[0];
    await s.ok(['add_slave', h.addr]);
    fs.writeFileSync(path.join(s.dir, 'in'), 'x\n');
    const mark = `DJS_XFER_MARK=${process.pid}-${Date.now()}`;
    const id = (await s.ok(['add_job', '--on-worker', '-e', mark, '--transfer', 'in', '--return', 'out', 'sh', '-c', 'if [ "$JOB_ATTEMPT" = 1 ]; then touch started; sleep 600; fi; echo "$JOB_ATTEMPT" | cat in - > out'])).trim();
    await until(() => started(hosts.hosts[0].scratch), 'the command running on the host', 30_000);
    await h.crash();
    await until(async () => (await s.job(id)).attempts === 2 || (await s.job(id)).state !== 'running', 'the job to leave its first attempt', 30_000);
    await h.restart();
    const job = await untilState(s, id, 'done', 60_000);
        assert.match(`${job.history[0].exitCode} ${job.history[0].reason}`, /255|worker/, 'a worker failure, not the job\'s');
    assert.equal(fs.readFileSync(path.join(s.dir, 'out'), 'utf8'), 'x\n2\n');
  });
});
