// A user's first real day, the environment side: every run of a job has a name of its
// own (DJS_RUN_NAME), so two campaigns on one worker never touch each other's files; a
// start that failed keeps no settings; a job runs with the environment of the add_job
// that queued it, a worker's checks with that of its add_slave. Tier 1 (the pure parts)
// and tier 2 (real servers, real clients, example_job.sh on a local worker).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { describe, test } from 'node:test';
import { runName } from '../cli.ts';
import { addJob, addWorkers, ROOT, runCli, serve, testDir, until, untilState } from './server.ts';

/** A client run from a shell whose environment is exactly `env` over a plain one: no
 *  DJS_* variable of the test's own shell reaches it. */
function bare(args: string[], cwd: string, env: NodeJS.ProcessEnv = {}) {
  const rest = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('DJS_')));
  return runCli(args, { cwd, env: { ...rest, ...env }, timeoutMs: 30_000 });
}

describe('DJS_RUN_NAME', () => {
  test('INSTANCE-ID-RUN: safe in a file name', () => {
    assert.equal(runName('ab12cd34', 7, 2), 'ab12cd34-7-2');
    assert.match(runName('ab12cd34', 7, 2), /^[A-Za-z0-9_][A-Za-z0-9_.-]*$/);
  });

  test('two servers (two data dirs, both with job 1) run example_job.sh on the same worker at the same time: each job keeps its own directory and result', { timeout: 90_000 }, async (t) => {
    const home = testDir(t, 'djsh-'); // the one worker's home, shared by both campaigns
    // example_job.sh with its WORK changed (as its header says to adapt it): the work
    // waits, polling, until the other campaign's job directory is there too (at most
    // 20 s, so a run that never sees it still ends), then counts the words.
    const wait = `n=0; while [ "$(ls -A .. | wc -l)" -lt 2 ] && [ $n -lt 400 ]; do sleep 0.05; n=$((n + 1)); done
words=$(wc -w < "$1") || exit
printf "%s\\n" $words > "$2"`;
    const text = fs.readFileSync(path.join(ROOT, 'example_job.sh'), 'utf8');
    const work = /^WORK='[^']*'$/m;
    assert.match(text, work, 'example_job.sh defines WORK on two lines');
    const script = text.replace(work, () => `WORK='${wait}'`);
    const servers = await Promise.all(['one two three', 'four five six seven eight'].map(async (words) => {
      const s = await serve(t, { env: { DJS_LOCAL_HOME: home } });
      fs.writeFileSync(path.join(s.dir, 'job.sh'), script, { mode: 0o755 });
      fs.writeFileSync(path.join(s.dir, 'in.txt'), `${words}\n`);
      await addWorkers(s, 'local1:1');
      return s;
    }));
    const ids = await Promise.all(servers.map((s) => addJob(s, 'job.sh', 'in.txt')));
    assert.deepEqual(ids, ['1', '1'], 'job ids start at 1 in every data dir');
    // Both works run at once: two job directories on the worker, named differently.
    const dirs: string[] = await until(() => {
      const d = fs.existsSync(path.join(home, '.djs-work')) ? fs.readdirSync(path.join(home, '.djs-work')) : [];
      return d.length === 2 ? d : null;
    }, 'both jobs to have made their directories', 30_000);
    for (const d of dirs) assert.match(d, /^[a-z0-9]{8}-1-1$/);
    for (const s of servers) await untilState(s, 1, 'done', 40_000);
    assert.equal(fs.readFileSync(path.join(servers[0].dir, 'finished_work', '1_in.txt.out'), 'utf8'), '3\n');
    assert.equal(fs.readFileSync(path.join(servers[1].dir, 'finished_work', '1_in.txt.out'), 'utf8'), '5\n');
    assert.deepEqual(fs.readdirSync(path.join(home, '.djs-work')), [], 'both cleaned up');
    // The name of a data dir stays across restarts.
    const instance = fs.readFileSync(path.join(servers[0].dataDir, 'instance'), 'utf8').trim();
    assert.ok(dirs.includes(`${instance}-1-1`), `${dirs.join(' ')} holds no ${instance}-1-1`);
    await servers[0].stop();
    const again = await servers[0].restart();
    assert.equal(fs.readFileSync(path.join(again.dataDir, 'instance'), 'utf8').trim(), instance);
    fs.writeFileSync(path.join(again.dir, 'name.sh'), '#!/bin/sh\necho "$DJS_RUN_NAME" > "name.$JOB_ID"\n', { mode: 0o755 });
    const id = await addJob(again, 'name.sh');
    await untilState(again, id, 'done');
    assert.equal(fs.readFileSync(path.join(again.dir, `name.${id}`), 'utf8'), `${instance}-${id}-1\n`);
    const refused = await again.cli(['add_job', '-e', 'DJS_RUN_NAME=x', 'name.sh']);
    assert.equal(refused.code, 2, 'a job cannot choose its own run name');
    assert.match(refused.stderr, /DJS_RUN_NAME is set by the server/);
  });
});

describe('a start that failed keeps no settings', () => {
  test('start -d --http PORT on a port in use fails, names the way out, and the next plain start runs', { timeout: 60_000 }, async (t) => {
    const dir = testDir(t);
    const taken = net.createServer();
    await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
    t.after(() => taken.close());
    const port = (taken.address() as net.AddressInfo).port;
    const failed = await bare(['start', '-d', '--http', String(port)], dir);
    assert.equal(failed.code, 1, failed.stderr);
    assert.match(failed.stderr, new RegExp(`cannot serve HTTP on 127\\.0\\.0\\.1:${port}: .*EADDRINUSE`));
    assert.match(failed.stderr, /DJS_HTTP= cli\.ts start -d/, 'the hint names how to drop a kept --http');
    const settings = path.join(dir, '.data', 'settings');
    assert.ok(!fs.existsSync(settings) || !fs.readFileSync(settings, 'utf8').includes(String(port)), 'the failed start kept its --http');

    const plain = await bare(['start', '-d'], dir);
    assert.equal(plain.code, 0, plain.stderr);
    const st = JSON.parse((await bare(['status', '--json'], dir)).stdout);
    assert.equal(st.server.settings.DJS_HTTP, '');
    assert.equal(st.server.http, null);
    assert.equal((await bare(['stop'], dir)).code, 0);
    // What the start that ran kept, the next start runs with.
    assert.match(fs.readFileSync(settings, 'utf8'), /"DJS_HTTP": ""/);
  });
});
