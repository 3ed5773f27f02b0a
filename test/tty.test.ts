// Tier 2: what a person sees on a terminal. util-linux `script` gives the client a real
// pseudo-terminal, so the client's own isTTY checks decide, as they would for a user.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { addWorkers, serve, writeScript, until, launch, CLI, type Running } from './server.ts';

/** Starts cli.ts on a pseudo-terminal; what it prints there is the stdout of `script`. */
function onTerminal(args: string[], env: NodeJS.ProcessEnv, cwd: string): Running {
  const cmd = [CLI, ...args].map((a) => `'${a.replace(/'/g, `'\\''`)}'`).join(' ');
  return launch('script', ['-qec', cmd, '/dev/null'], { cwd, env: { TERM: 'xterm', ...env }, timeoutMs: 60_000 });
}

const ESC = '\x1b[';

test('status uses colours on a terminal only, and never with NO_COLOR', { timeout: 60_000 }, async (t) => {
  const s = await serve(t);
  await addWorkers(s, 'a:2');
  const env = { NO_COLOR: '' };
  const tty = await onTerminal(['--data-dir', s.dataDir, 'status'], env, s.dir).done;
  assert.equal(tty.code, 0);
  assert.ok(tty.stdout.includes(ESC), `no colour on a terminal: ${JSON.stringify(tty.stdout)}`);
  assert.match(tty.stdout, /\[\.\.\]/);
  const noColor = await onTerminal(['--data-dir', s.dataDir, 'status'], { NO_COLOR: '1' }, s.dir).done;
  assert.ok(!noColor.stdout.includes(ESC), 'colour despite NO_COLOR');
  const piped = await s.cli(['status'], { env: { NO_COLOR: '' } });
  assert.ok(!piped.stdout.includes(ESC), 'colour into a pipe');
});

test('wait shows one live progress line on a terminal and plain lines elsewhere', { timeout: 60_000 }, async (t) => {
  const s = await serve(t);
  await addWorkers(s, 'a:2');
  const gate = path.join(s.dir, 'go');
  const job = writeScript(s.dir, 'gated.sh', `while [ ! -e "${gate}" ]; do sleep 0.05; done`);
  for (let i = 0; i < 4; i++) await s.ok(['add_job', job]);
  const waiting = onTerminal(['--data-dir', s.dataDir, 'wait'], {}, s.dir);
  await until(() => /2 running/.test(waiting.stdout()), 'wait to show two jobs running');
  fs.writeFileSync(gate, '');
  const { code, stdout: out } = await waiting.done;
  assert.equal(code, 0);
  // Progress lines are redrawn in place (carriage return, clear line), then a summary.
  assert.match(out, /\r\x1b\[K\d+\/4 finished: .* running, .* waiting/);
  assert.match(out, /4\/4 finished: 4 done, 0 failed, 0 killed/);
  const plain = await s.cli(['wait', '--all']);
  assert.equal(plain.code, 0);
  assert.ok(!plain.stderr.includes('\r'), 'carriage returns into a pipe');
  assert.match(plain.stderr, /^4\/4 finished: 4 done/m);
});
