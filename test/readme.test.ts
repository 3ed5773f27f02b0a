// The README, run: every command of its "Quick start" and of the steps of "Running on
// your machines", in order, as a user pastes them into bash, in a directory set up like
// a fresh checkout; the workers node1, node2 and node3 are real sshd hosts (tier 3). So
// the README cannot drift from the tool: a command it shows that fails, fails this test.
//
// What stands in for the user's machine: `~/.ssh/config` is a config naming node1..3
// (ssh cannot be pointed at another home), given to the shell as a function `ssh`
// that adds `-F CONFIG`, and to the server and its jobs as DJS_SSH_CONFIG, exported in
// the shell, as the README's settings allow. The key is the test hosts' key, so the two
// lines that make and copy a key are the only ones not run (and the test counts them).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { skipUnlessSsh, startHosts } from './hosts.ts';
import { CLI, ROOT, run, testDir, type Run } from './server.ts';

/** The sh code blocks of a README section: from its heading to the next heading of the
 *  same or a higher level (`##`), or of `stopAt`'s level. */
function shBlocks(readme: string, heading: string, stopAt = /^#{2} /): string[][] {
  const lines = readme.split('\n');
  const from = lines.findIndex((l) => l.trim() === heading);
  assert.ok(from >= 0, `the README has a section '${heading}'`);
  const blocks: string[][] = [];
  let block: string[] | null = null;
  for (const raw of lines.slice(from + 1)) {
    const line = raw.trim();
    if (!block && stopAt.test(raw)) break;
    if (!block && line === '```sh') { block = []; continue; }
    if (block && line === '```') { blocks.push(block); block = null; continue; }
    if (block) block.push(line);
  }
  return blocks;
}

/** The commands of those blocks: one a line, comment-only and blank lines left out. */
const commandsOf = (blocks: string[][]) => blocks.flat().filter((l) => l && !l.startsWith('#'));

test('the README\'s quick start and "Running on your machines", pasted line by line, work', { timeout: 300_000 }, async (t) => {
  if (skipUnlessSsh(t)) return;
  const readme = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
  const quick = commandsOf(shBlocks(readme, '## Quick start (on one machine, no ssh needed)'));
  const machines = commandsOf(shBlocks(readme, '## Running on your machines', /^#{2,3} /));

  // A checkout: cli.ts (through a symlink, as from a clone with its node_modules) and
  // example_job.sh, in a directory of its own.
  const home = testDir(t, 'djs-readme-');
  const checkout = path.join(home, 'djs');
  fs.mkdirSync(checkout);
  fs.symlinkSync(CLI, path.join(checkout, 'cli.ts'));
  fs.copyFileSync(path.join(ROOT, 'example_job.sh'), path.join(checkout, 'example_job.sh'));
  fs.chmodSync(path.join(checkout, 'example_job.sh'), 0o755);

  const hosts = await startHosts(3);
  t.after(async () => {
    await run('bash', ['--norc', '--noprofile', '-c', './cli.ts stop'], { cwd: checkout, env: userEnv });
    await hosts.close();
  });
  // The user's ~/.ssh/config: node1..3 are the test hosts.
  const config = path.join(home, 'ssh_config');
  fs.writeFileSync(config, fs.readFileSync(hosts.sshConfig, 'utf8').replace(/^Host 127\.0\.0\.(\d+)$/gm, (_m, n) => `Host node${Number(n) - 1}\n  HostName 127.0.0.${n}`));

  // The user's shell: none of the test runner's djs variables, local workers' files here.
  const userEnv: NodeJS.ProcessEnv = { DJS_LOCAL_HOME: path.join(home, 'local-workers'), BASH_ENV: '' };
  for (const name of Object.keys(process.env)) if (name.startsWith('DJS_')) userEnv[name] = undefined;
  const paste = async (line: string, prelude = ''): Promise<Run> => {
    const env = Object.fromEntries(Object.entries({ ...process.env, ...userEnv }).filter(([, v]) => v !== undefined));
    const r = await run('bash', ['--norc', '--noprofile', '-c', `${prelude}\n${line}`], { cwd: checkout, env: { ...env }, timeoutMs: 120_000 });
    t.diagnostic(`$ ${line}  -> exit ${r.code}`);
    return r;
  };
  const mustPass = async (line: string, prelude = '') => {
    const r = await paste(line, prelude);
    assert.equal(r.code, 0, `'${line}' exited ${r.code}: ${r.stderr}`);
    return r;
  };
  const jobs = async () => JSON.parse((await mustPass('./cli.ts list --json')).stdout);
  const status = async () => JSON.parse((await mustPass('./cli.ts status --json')).stdout);

  // ---- Quick start -----------------------------------------------------------------
  assert.ok(quick.some((l) => l.startsWith('./cli.ts remove_slave local1 local2')), 'the quick start removes its local workers');
  for (const line of quick) {
    if (line === './cli.ts stop') {
      // Before the last line: everything ran, and no worker is left to take real jobs.
      const all = await jobs();
      assert.deepEqual(all.map((j: any) => j.state), Array(6).fill('done'));
      assert.deepEqual((await status()).workers, [], 'the local workers are gone');
    }
    const r = await mustPass(line);
    // (Jobs that ended before `wait` was called are not its business.)
    if (line.startsWith('./cli.ts wait')) assert.match(r.stderr, /^(\d)\/\1 finished: \1 done, 0 failed, 0 killed$/m);
    if (line.startsWith('cat finished_work')) {
      assert.deepEqual(r.stdout.trim().split('\n').map(Number).sort((a, b) => a - b), [1000, 2000, 3000, 4000, 5000, 6000]);
    }
  }

  // ---- Running on your machines --------------------------------------------------
  // The user's data, with names that a naive recipe breaks on.
  const data = path.join(checkout, 'data');
  fs.mkdirSync(data);
  const names = ['plain.txt', 'run 1.txt', "it's.txt", 'tab\there.txt', 'new\nline.txt', 'ünïcode *.txt'];
  names.forEach((n, i) => fs.writeFileSync(path.join(data, n), 'w '.repeat(i + 3)));
  const shell = `export DJS_SSH_CONFIG=${config}\nssh() { command ssh -F "$DJS_SSH_CONFIG" "$@"; }`;
  const skipped = machines.filter((l) => /^ssh-keygen\b|ssh-copy-id/.test(l));
  assert.equal(skipped.length, 2, `the key lines (${skipped.join(' | ')}) are the only ones not run`);
  for (const line of machines) {
    if (skipped.includes(line)) continue;
    const r = await mustPass(line, shell);
    if (line.startsWith('ssh -o BatchMode=yes node1 true')) assert.equal(r.stdout, 'ok\n');
    if (line === './cli.ts start --detach') assert.match(r.stdout, /settings changed: ssh config was '', now /, 'the start says the ssh config is new');
    if (line.startsWith('./cli.ts add_slave')) {
      assert.deepEqual((await status()).workers.map((w: any) => [w.host, w.state]), [['node1', 'up'], ['node2', 'up'], ['node3', 'up']]);
    }
    if (line.startsWith('./cli.ts wait')) assert.equal(r.stdout, 'all done\n');
  }
  // Step 6 shows two ways to queue the files (a sweep, and a file of commands quoted by
  // printf %q); both ran: each file was queued twice.
  assert.equal((await paste('./cli.ts wait --all')).code, 0, 'every job ended done');
  const real = (await jobs()).filter((j: any) => j.id > 6);
  assert.deepEqual(real.map((j: any) => [j.state, j.args[0]]).sort(), [...names, ...names].map((n) => ['done', `data/${n}`]).sort(), 'one job per file and way, each name as it is');
  assert.ok(real.every((j: any) => /^node[123]$/.test(j.worker)), 'only the real workers ran them');
  for (const j of real) {
    const name = path.basename(j.args[0]);
    const out = fs.readFileSync(path.join(checkout, 'finished_work', `${j.id}_${name}.out`), 'utf8');
    assert.equal(Number(out), names.indexOf(name) + 3, `the word count of ${JSON.stringify(name)}`);
  }
});
