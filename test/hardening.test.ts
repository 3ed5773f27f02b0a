// Tier 2: what one client can do to the server. Requests too large, answers not read,
// connections piled up, arrays nested to make the parser allocate: each gets an error
// or a closed connection, and the server keeps answering with its memory in bounds.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';
import { spawn, type ChildProcess } from 'node:child_process';
import { CLI, cleanUp, delay, launcherOf, moreChecks, rssMiB, runCli, socketOp, rawRequest, spawnCli, startServer, tempDir, until, writeScript, type TestServer } from './server.ts';

/** A raw connection to the server's socket, with what it has received so far. */
const connect = (s: TestServer) => connectTo({ path: path.join(s.dataDir, 'server.sock') });

/** A raw connection (Unix socket or TCP), with what it has received so far. */
function connectTo(to: net.NetConnectOpts): Promise<{ sock: net.Socket; got: () => string; closed: () => boolean }> {
  return new Promise((resolve, reject) => {
    const sock = net.connect(to);
    let got = '', closed = false;
    sock.on('data', (d) => { got += d; });
    sock.on('close', () => { closed = true; });
    sock.on('error', () => {});
    sock.once('connect', () => resolve({ sock, got: () => got, closed: () => closed }));
    sock.once('error', reject);
  });
}

/** The server's resident memory in MiB. */

test('a request line over 16 MiB, finished or not, is refused and its connection closed; the server goes on', { timeout: 60_000 }, async (t) => {
  let s: TestServer | undefined;
  t.after(() => cleanUp(s));
  s = await startServer();
  const big = Buffer.alloc((16 << 20) + 10, 'a');
  for (const tail of ['\n', '']) {
    const c = await connect(s);
    c.sock.write(big);
    c.sock.write(tail);
    await until(() => c.closed(), 'the connection to be closed', 20_000);
    assert.match(c.got(), /"ok":false.*request over 16 MiB/);
  }
  assert.equal((await s.status()).counts.total, 0);
});

test('arrays nested to make the parser allocate are refused without parsing', { timeout: 60_000 }, async (t) => {
  let s: TestServer | undefined;
  t.after(() => cleanUp(s));
  s = await startServer();
  const before = rssMiB(s);
  const c = await connect(s);
  c.sock.write('{"op":"status","x":[' + '[],'.repeat(3 << 20) + '[]]}\n');
  await until(() => c.got().includes('\n'), 'an answer');
  assert.match(c.got(), /malformed request/);
  t.diagnostic(`server RSS ${before.toFixed(0)} MiB before, grew by ${(rssMiB(s) - before).toFixed(0)} MiB`);
  assert.ok(rssMiB(s) - before < 100, `the server grew by ${rssMiB(s) - before} MiB`);
  c.sock.destroy();
});

test('a client that pipelines list requests and never reads costs the server one answer at a time', { timeout: 120_000 }, async (t) => {
  let s: TestServer | undefined;
  t.after(() => cleanUp(s));
  s = await startServer();
  const script = writeScript(s.dir, 'job.sh', 'exit 0');
  await s.ok(['add_jobs', '-'], { input: `${script} ${'x'.repeat(200)}\n`.repeat(20_000) });
  const before = rssMiB(s);
  const c = await connect(s);
  c.sock.pause(); // never reads
  c.sock.write('{"op":"list"}\n'.repeat(2000));
  // The first list fills the socket's buffers and waits for it to drain; the others wait
  // behind it, as request lines (a few bytes each), not as answers.
  await until(async () => (await s!.cli(['status'])).code === 0, 'the server to answer others');
  const grown = rssMiB(s) - before;
  t.diagnostic(`server RSS ${before.toFixed(0)} MiB before, grew by ${grown.toFixed(0)} MiB`);
  assert.ok(grown < 150, `the server grew by ${grown.toFixed(0)} MiB for one client that does not read`);
  c.sock.destroy();
  assert.equal((await s.status()).counts.waiting, 20_000);
});

test('one connection asking for wait and log -f many times in a row leaves no listener behind (no MaxListenersExceededWarning)', { timeout: 60_000 }, async (t) => {
  let s: TestServer | undefined;
  t.after(() => cleanUp(s));
  s = await startServer();
  const script = writeScript(s.dir, 'job.sh', 'exit 0');
  const id = (await s.ok(['add_job', script])).trim();
  await s.ok(['add_slave', '--skip_ssh_auth_check', 'w']);
  assert.equal((await s.cli(['wait', id])).code, 0);
  const c = await connect(s);
  const n = 40;
  c.sock.write(`{"op":"wait","ids":[${id}]}\n{"op":"log","id":${id},"follow":true}\n`.repeat(n));
  await until(() => c.got().split('\n').filter(Boolean).length >= 2 * n, `${2 * n} answers`);
  // A wait that is still open when the connection goes is let go too.
  const blocker = writeScript(s.dir, 'block.sh', `while [ ! -e "${s.dir}/go" ]; do sleep 0.05; done`);
  const open = (await s.ok(['add_job', blocker])).trim();
  c.sock.write(`{"op":"wait","ids":[${open}]}\n`);
  c.sock.destroy();
  fs.writeFileSync(path.join(s.dir, 'go'), '');
  assert.equal((await s.cli(['wait', open])).code, 0);
  assert.doesNotMatch(s.output(), /MaxListenersExceededWarning/);
});

test('connections beyond DJS_MAX_CONNECTIONS close the one idle the longest; the server keeps answering', { timeout: 60_000 }, async (t) => {
  let s: TestServer | undefined;
  t.after(() => cleanUp(s));
  s = await startServer({ env: { DJS_MAX_CONNECTIONS: '20' } });
  const conns: Awaited<ReturnType<typeof connect>>[] = [];
  for (let i = 0; i < 50; i++) conns.push(await connect(s));
  await until(() => conns.filter((c) => c.closed()).length >= 30, 'the oldest idle connections to be closed');
  assert.deepEqual(conns.slice(0, 30).map((c) => c.closed()), Array(30).fill(true), 'the oldest went first');
  assert.equal((await s.cli(['status'])).code, 0, 'a new client is served');
  for (const c of conns) c.sock.destroy();
});

test('a job\'s run time starts when its process does, not while its start waited in a stopped launcher', { timeout: 60_000 }, async (t) => {
  let s: TestServer | undefined;
  t.after(() => cleanUp(s));
  s = await startServer();
  const script = writeScript(s.dir, 'job.sh', 'exit 0');
  await s.ok(['add_slave', '--skip_ssh_auth_check', 'w1']);
  assert.equal((await s.cli(['wait', (await s.ok(['add_job', script])).trim()])).code, 0, 'the launcher is up');
  const launcher = launcherOf(s);
  process.kill(launcher, 'SIGSTOP');
  const id = (await s.ok(['add_job', script])).trim();
  await until(async () => (await s!.job(id)).state === 'running', 'the start to be handed to the stopped launcher');
  const handed = Date.now();
  await delay(1500); // the fault itself, not a wait for anything: the launcher stays stopped 1.5 s
  process.kill(launcher, 'SIGCONT');
  assert.equal((await s.cli(['wait', id])).code, 0);
  const job = await s.job(id);
  assert.ok(job.runtimeMs < 1000, `run time ${job.runtimeMs} ms counts the ${Date.now() - handed} ms the launcher was stopped`);
  assert.ok(Date.parse(job.history[0].startedAt) >= handed + 1000, 'the attempt started when its process did');
});

test('a launcher stopped with records unread, across a kill -9 and a new server: no job runs twice', { timeout: 90_000 }, async (t) => {
  let s: TestServer | undefined;
  t.after(() => cleanUp(s));
  s = await startServer();
  const dir = s.dir;
  const script = writeScript(dir, 'job.sh', `echo "$JOB_ID" >> "${dir}/started"; sleep 0.2`);
  await s.ok(['add_slave', '--skip_ssh_auth_check', 'w1:2']);
  await s.ok(['add_jobs', '-'], { input: `${script}\n`.repeat(30) });
  await until(() => fs.existsSync(path.join(dir, 'started')), 'jobs to start');
  const launcher = launcherOf(s);
  process.kill(launcher, 'SIGSTOP');
  // More slots: the server hands the stopped launcher records it cannot read yet.
  await s.ok(['add_slave', '--skip_ssh_auth_check', 'w2:6']);
  await until(async () => (await s!.status()).counts.running >= 6, 'starts to be handed to the stopped launcher');
  await s.crash();
  s = await s.restart();
  // The new server voids the runs the stopped launcher never read, and must keep those
  // claims while that launcher lives: give its sweeps (every second) time to go wrong.
  const voids = () => fs.readdirSync(path.join(s!.dataDir, 'run')).filter((f) => fs.readFileSync(path.join(s!.dataDir, 'run', f), 'utf8').startsWith('void'));
  await until(() => voids().length > 0, 'the unread runs to be voided');
  await moreChecks(s, 2, 'sweeps');
  assert.ok(voids().length > 0, 'void claims are kept while the old launcher lives');
  process.kill(launcher, 'SIGCONT');
  assert.equal((await s.cli(['wait'])).code, 0);
  const started = fs.readFileSync(path.join(dir, 'started'), 'utf8').trim().split('\n').map(Number);
  const counts = new Map<number, number>();
  for (const id of started) counts.set(id, (counts.get(id) ?? 0) + 1);
  assert.deepEqual([...counts].filter(([, n]) => n !== 1), [], 'every job started exactly once');
  assert.equal(counts.size, 30);
});

test('out of file descriptors while an adopted job ends: the job is neither taken as ended early nor run again', { timeout: 90_000 }, async (t) => {
  let s: TestServer | undefined;
  t.after(() => cleanUp(s));
  s = await startServer();
  const dir = s.dir;
  const script = writeScript(dir, 'job.sh', `echo "start" >> "${dir}/runs.$JOB_ID"; while [ ! -e "${dir}/go" ]; do sleep 0.05; done; exit 3`);
  await s.ok(['add_slave', '--skip_ssh_auth_check', 'w1']);
  await s.ok(['add_job', script]);
  await until(() => fs.existsSync(path.join(dir, 'runs.1')), 'the job to start');
  await s.crash();
  // A server with few file descriptors adopts the job; then every descriptor it has left
  // goes to connections, and the job ends meanwhile.
  s = await startServer({ dir, limitFiles: 60, env: { DJS_MAX_CONNECTIONS: '100000' } });
  assert.equal((await s.job(1)).state, 'running');
  const conns: net.Socket[] = [];
  for (let i = 0; i < 80; i++) conns.push(net.connect(path.join(s.dataDir, 'server.sock')).on('error', () => {}));
  await until(() => conns.filter((c) => c.readyState === 'open').length > 30, 'the connections to take the descriptors');
  fs.writeFileSync(path.join(dir, 'go'), '');
  // The job ends (its launcher, of the crashed server, records the code) while the
  // server cannot open a file; its checks of the job fail and must not count as "ended".
  await until(() => fs.readFileSync(path.join(s!.dataDir, 'run', '1.1.pid'), 'utf8').split('\n').length === 3, 'the job to end');
  // At least one check of the job meanwhile (status cannot be asked now: the server has
  // no descriptor left to accept with): one that failed for want of a descriptor says so
  // in server.log; one that found the job ended has let go of its run file.
  const failed = s.output().split('cannot check on job 1').length;
  const runFile = path.join(s.dataDir, 'run', '1.1.pid');
  await until(() => s!.output().split('cannot check on job 1').length > failed || !fs.existsSync(runFile), 'a check of the job since it ended');
  for (const c of conns) c.destroy();
  assert.equal((await s.cli(['wait', '1'])).code, 1);
  const job = await s.job(1);
  assert.deepEqual([job.state, job.exitCode, job.attempts], ['failed', 3, 1]);
  assert.equal(fs.readFileSync(path.join(dir, 'runs.1'), 'utf8'), 'start\n', 'the job ran once');
});

test('another user squatting the start lock after a stop does not keep the owner from starting; a second start of the owner is still refused', { timeout: 60_000, skip: process.getuid?.() !== 0 && 'needs root to act as another user' }, async (t) => {
  let s: TestServer | undefined;
  let squatter: ChildProcess | undefined;
  t.after(async () => { squatter?.kill('SIGKILL'); await cleanUp(s); });
  s = await startServer();
  // The name a server of this data dir binds, as anyone can read it in /proc/net/unix.
  const token = fs.readFileSync(path.join(s.dataDir, 'lock.token'), 'utf8').trim(), d = fs.statSync(s.dataDir);
  const name = `@djs-${createHash('sha256').update(`${token}-${d.dev}-${d.ino}`).digest('hex')}-`.padEnd(108, 'x');
  assert.ok(fs.readFileSync('/proc/net/unix', 'utf8').includes(name), 'the server holds that name');
  await s.stop();
  // Another user binds that name: it is listed for everyone in /proc/net/unix.
  squatter = spawn(process.execPath, ['-e', `require('net').createServer().listen('\\0' + process.argv[1], () => console.log('bound'))`, name.slice(1)], { uid: 65534, gid: 65534, stdio: ['ignore', 'pipe', 'inherit'] });
  let said = '';
  squatter.stdout!.on('data', (d) => { said += d; });
  await until(() => said.includes('bound'), 'the squatter to bind the name');
  s = await startServer({ dir: s.dir });
  assert.match(s.output(), /cannot prove it is a djs server of yours; taking a new one/);
  const second = await runCli(['start', s.dataDir, s.logDir], { cwd: s.dir });
  assert.equal(second.code, 1);
  assert.match(second.stderr, /already running/);
});

test('an empty run file left by a crash (its creator gone) does not leave the job running forever: it is claimed for the server and the job runs once', { timeout: 60_000 }, async (t) => {
  let s: TestServer | undefined;
  t.after(() => cleanUp(s));
  s = await startServer();
  const dir = s.dir;
  const script = writeScript(dir, 'job.sh', `echo run >> "${dir}/runs"`);
  await s.ok(['add_slave', '--skip_ssh_auth_check', 'w1']);
  const launcher = launcherOf(s);
  process.kill(launcher, 'SIGSTOP');
  await s.ok(['add_job', script]);
  await s.crash();
  process.kill(launcher, 'SIGKILL');
  fs.writeFileSync(path.join(s.dataDir, 'run', '1.1.pid'), ''); // created, its claim never written
  s = await s.restart();
  assert.equal((await s.cli(['wait', '1'])).code, 0);
  assert.equal(fs.readFileSync(path.join(dir, 'runs'), 'utf8'), 'run\n');
});

test('a server started through another spelling of the data dir (a symlink) still knows the jobs of the last one as running', { timeout: 60_000 }, async (t) => {
  let s: TestServer | undefined;
  s = await startServer();
  const dir = s.dir;
  t.after(() => cleanUp(s, dir));
  // The job closes every file it inherited, so only its environment tells it apart.
  const script = writeScript(dir, 'job.sh', `for fd in 3 4 5 6 7 8 9; do eval "exec $fd>&-"; done
echo run >> "${dir}/runs"; while [ ! -e "${dir}/go" ]; do sleep 0.05; done`);
  await s.ok(['add_slave', '--skip_ssh_auth_check', 'w1']);
  await s.ok(['add_job', '--retries', '1', script]);
  await until(() => fs.existsSync(path.join(dir, 'runs')), 'the job to run');
  await s.crash();
  fs.symlinkSync(dir, path.join(dir, 'link'));
  s = await startServer({ dir: path.join(dir, 'link') });
  await moreChecks(s, 2); // a check of the job or two
  assert.equal((await s.job(1)).state, 'running', 'the job is still running');
  fs.writeFileSync(path.join(dir, 'go'), '');
  assert.equal((await s.cli(['wait', '1'])).code, 0);
  assert.equal(fs.readFileSync(path.join(dir, 'runs'), 'utf8'), 'run\n', 'it ran once');
});

/** A server with one worker and job 1 running a script that waits for the file `go` in
 *  the server's dir. */
async function serverWithGatedJob(): Promise<TestServer> {
  const s = await startServer();
  const script = writeScript(s.dir, 'job.sh', `while [ ! -e "${s.dir}/go" ]; do sleep 0.02; done`);
  await s.ok(['add_slave', '--skip_ssh_auth_check', 'w1']);
  await s.ok(['add_job', script]);
  return s;
}

test('a job that ended while no server ran is recorded as ending when it did, not when a server looked', { timeout: 60_000 }, async (t) => {
  let s: TestServer | undefined;
  t.after(() => cleanUp(s));
  s = await serverWithGatedJob();
  const dir = s.dir;
  await until(async () => (await s!.job(1)).state === 'running', 'the job to run');
  await s.crash();
  fs.writeFileSync(path.join(dir, 'go'), '');
  const runFile = path.join(s.dataDir, 'run', '1.1.pid');
  await until(() => fs.readFileSync(runFile, 'utf8').split('\n').length === 3, 'the job to end and its code to be written');
  // It ended an hour before a server looked (its exit code written then).
  const endedAt = fs.statSync(runFile).mtimeMs - 3_600_000;
  fs.utimesSync(runFile, endedAt / 1000, endedAt / 1000);
  s = await s.restart();
  assert.equal((await s.cli(['wait', '1'])).code, 0);
  const job = await s.job(1);
  assert.ok(Math.abs(Date.parse(job.endedAt) - endedAt) < 50, `recorded end ${job.endedAt}, the job ended at ${new Date(endedAt).toISOString()}`);
});

test('wait rides out a server killed before it read the request, and finishes with the new server', { timeout: 60_000 }, async (t) => {
  let s: TestServer | undefined;
  t.after(() => cleanUp(s));
  s = await serverWithGatedJob();
  const dir = s.dir;
  process.kill(s.proc.pid!, 'SIGSTOP');
  const waiting = spawnCli(['--data-dir', s.dataDir, 'wait', '1'], { cwd: dir });
  // Its connection sits in the stopped server's backlog, its request unread.
  const hasSocket = (pid: number) => { try { return fs.readdirSync(`/proc/${pid}/fd`).some((fd) => fs.readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith('socket:')); } catch { return false; } };
  await until(() => hasSocket(waiting.proc.pid!), 'the client to connect to the stopped server');
  await s.crash();
  s = await s.restart();
  fs.writeFileSync(path.join(dir, 'go'), '');
  const r = await waiting.done;
  assert.equal(r.code, 0, r.stderr);
});

test('a job gets no file the server inherited, and every variable of the server\'s environment (DJS_KEPT_* and PERL* too)', { timeout: 60_000 }, async (t) => {
  const dir = tempDir();
  t.after(() => cleanUp(undefined, dir));
  const dataDir = path.join(dir, '.data'), logDir = path.join(dir, 'logs');
  fs.writeFileSync(path.join(dir, 'inherited'), '');
  // The server inherits a file on fd 7 from the shell that starts it.
  const server = spawn('sh', ['-c', 'exec 7<"$0"; exec "$@"', path.join(dir, 'inherited'), CLI, 'start', dataDir, logDir], { cwd: dir, env: { ...process.env, DJS_KEPT_X: 'kept', PERL5OPT: '-w' }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  server.stdout!.on('data', (d) => { out += d; });
  await until(() => out.includes('server ready'), 'the server to start');
  const script = writeScript(dir, 'job.sh', `ls -l /proc/$$/fd > "${dir}/fds.$JOB_ID"; echo "$DJS_KEPT_X $PERL5OPT" > "${dir}/env.$JOB_ID"`);
  const cli = (args: string[], env: NodeJS.ProcessEnv = {}) => runCli(['--data-dir', dataDir, ...args], { cwd: dir, env });
  await cli(['add_slave', '--skip_ssh_auth_check', 'w1']);
  // Job 1 runs with the server's environment (added bare on the socket), job 2 with its add_job's.
  assert.ok((await socketOp(dataDir, { op: 'add_jobs', cwd: dir, jobs: [[script]] })).ok);
  assert.equal((await cli(['wait', '1'])).code, 0);
  await cli(['add_job', script], { DJS_KEPT_X: 'kept2', PERL5OPT: '-W' });
  assert.equal((await cli(['wait', '2'])).code, 0);
  assert.equal(fs.readFileSync(path.join(dir, 'env.2'), 'utf8'), 'kept2 -W\n');
  const fds = fs.readFileSync(path.join(dir, 'fds.1'), 'utf8').split('\n').flatMap((l) => { const m = / (\d+) -> (.*)$/.exec(l); return m && Number(m[1]) > 2 ? [[m[1], m[2]]] : []; });
  // Besides stdin, stdout and stderr: its run file, and what sh opens itself (the script, a copy of stdout).
  const own = [path.join(dataDir, 'run', '1.1.pid'), script, path.join(logDir, '1.log')];
  assert.deepEqual(fds.filter(([, target]) => !own.includes(target)), [], `the job's files: ${JSON.stringify(fds)}`);
  assert.equal(fs.readFileSync(path.join(dir, 'env.1'), 'utf8'), 'kept -w\n');
  server.kill('SIGKILL');
});

// ---- what all clients together may cost: DJS_CLIENT_BYTES each way ----------------

const BUDGET = 24 << 20; // DJS_CLIENT_BYTES in these tests: small, so a few clients reach it

/** Lines of a connection's reply that are whole JSON answers ({ok}). */
const answers = (got: string) => got.split('\n').slice(0, -1).filter((l) => /^\{"ok":/.test(l));

test('clients that never read their answers cannot make the server hold more than DJS_CLIENT_BYTES: the one holding the most is closed, server.log says so, the others are served', { timeout: 120_000 }, async (t) => {
  let s: TestServer | undefined;
  t.after(() => cleanUp(s));
  s = await startServer({ env: { DJS_CLIENT_BYTES: String(BUDGET) } });
  const script = writeScript(s.dir, 'job.sh', 'exit 0');
  await s.ok(['add_jobs', '-'], { input: `${script} ${'x'.repeat(14_500)}\n`.repeat(200) }); // one page of them: 2.9 MB, so that the answers of two clients that pipeline four each fit in the budget with room to spare (a third of a page), and a third client's first answer does not: it is told why
  const before = rssMiB(s);
  const conns: Awaited<ReturnType<typeof connect>>[] = [];
  for (let i = 0; i < 12; i++) {
    const c = await connect(s);
    c.sock.pause(); // reads nothing
    c.sock.write('{"op":"jobs","limit":1000}\n'.repeat(4));
    conns.push(c);
  }
  // 12 clients × 4 answers of 2.9 MB: five times the budget.
  await until(() => /closed a socket connection that left .* MiB of answers unread, the most of any client/.test(s!.output()), 'server.log to say a client was closed');
  await until(async () => (await s!.cli(['status'])).code === 0, 'the server to answer others');
  t.diagnostic(`server RSS ${before.toFixed(0)} MiB before, grew by ${(rssMiB(s) - before).toFixed(0)} MiB`);
  // Now each reads: it gets its 4 answers, or it was closed; one that had nothing
  // unread when its answer did not fit is told why.
  for (const c of conns) c.sock.resume();
  await until(() => conns.every((c) => c.closed() || answers(c.got()).length === 4), 'every client to be served or closed', 30_000);
  const served = conns.filter((c) => !c.closed()), told = conns.filter((c) => c.closed() && answers(c.got()).some((a) => !JSON.parse(a).ok));
  t.diagnostic(`${served.length} served, ${told.length} closed with an error, ${12 - served.length - told.length} closed at once`);
  assert.ok(served.length >= 1 && served.length < 12, `${served.length} of 12 served`);
  assert.ok(told.length >= 1, 'some were told why');
  for (const c of served) for (const a of answers(c.got())) assert.equal(JSON.parse(a).rows.length, 200);
  for (const c of told) {
    const m = JSON.parse(answers(c.got()).at(-1)!);
    assert.equal(m.code, 1);
    assert.match(m.error, /the server holds at most 24\.0 MiB of unread answers for all its clients/);
  }
  for (const c of conns) c.sock.destroy();
  assert.equal(s.proc.exitCode, null, 'the server is still running');
});

test('unfinished request lines that together pass DJS_CLIENT_BYTES: the connection holding the most gets a one-line error and is closed; the others finish theirs', { timeout: 120_000 }, async (t) => {
  let s: TestServer | undefined;
  t.after(() => cleanUp(s));
  s = await startServer({ env: { DJS_CLIENT_BYTES: String(BUDGET) } });
  const conns: Awaited<ReturnType<typeof connect>>[] = [];
  // Each under the 16 MiB a request may hold; 6 of them hold 36 MiB.
  for (let i = 0; i < 6; i++) {
    const c = await connect(s);
    c.sock.write(`{"op":"ping","pad":"${'a'.repeat(6 << 20)}`);
    conns.push(c);
  }
  await until(() => /closed a socket connection that held .* MiB of unfinished requests/.test(s!.output()), 'server.log to say a client was closed');
  // Each client finishes its line: it is answered, or was refused (with one line) and closed.
  await until(() => conns.every((c) => c.sock.writableLength === 0), 'the requests to be sent');
  for (const c of conns) c.sock.write('"}\n');
  await until(() => conns.every((c) => answers(c.got()).length === 1), 'every client to get one answer');
  const results = conns.map((c) => JSON.parse(answers(c.got())[0]));
  const refused = results.filter((m) => !m.ok);
  t.diagnostic(`${refused.length} of 6 refused`);
  assert.ok(refused.length >= 1 && refused.length < 6, `${refused.length} of 6 refused`);
  for (const m of refused) {
    assert.equal(m.code, 1);
    assert.match(m.error, /the server holds at most 24\.0 MiB of unfinished requests for all its clients, and this connection held the most/);
  }
  await until(() => conns.every((c, i) => results[i].ok || c.closed()), 'the refused connections to be closed');
  for (const c of conns) c.sock.destroy();
  assert.equal((await s.cli(['status'])).code, 0);
});

test('HTTP clients count against DJS_CLIENT_BYTES too: bodies not yet whole and answers not read', { timeout: 120_000 }, async (t) => {
  let s: TestServer | undefined;
  t.after(() => cleanUp(s));
  s = await startServer({ env: { DJS_CLIENT_BYTES: String(BUDGET) }, args: ['--http', '0'] });
  const m = /^http:\/\/127\.0\.0\.1:(\d+)\/#token=([0-9a-f]+)$/.exec((await s.ok(['dashboard'])).trim())!;
  const port = Number(m[1]), token = m[2];
  const tcp = () => connectTo({ port, host: '127.0.0.1' });
  const head = (method: string, p: string, extra = '') => `${method} ${p} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nAuthorization: Bearer ${token}\r\n${extra}\r\n`;
  // Bodies: 6 POSTs of 8 MiB each, 6 MiB of each sent.
  const posts: Awaited<ReturnType<typeof tcp>>[] = [];
  for (let i = 0; i < 6; i++) {
    const c = await tcp();
    c.sock.write(head('POST', '/api/kill', `Content-Type: application/json\r\nContent-Length: ${8 << 20}\r\n`) + `{"ids":[1],"x":"` + 'a'.repeat(6 << 20));
    posts.push(c);
  }
  await until(() => posts.some((c) => /^HTTP\/1\.1 503 [^]*the server holds at most 24\.0 MiB of unfinished requests for all its clients/.test(c.got())), 'a POST to be refused');
  await until(() => /closed an HTTP connection that held .* MiB of unfinished requests/.test(s!.output()), 'server.log to say why');
  for (const c of posts) c.sock.destroy();
  // Answers: 200 jobs of 10 KB (2 MB a page); 16 clients ask for pages and read nothing.
  const script = writeScript(s.dir, 'job.sh', 'exit 0');
  await s.ok(['add_jobs', '-'], { input: `${script} ${'x'.repeat(10_000)}\n`.repeat(200) });
  const gets: Awaited<ReturnType<typeof tcp>>[] = [];
  for (let i = 0; i < 16; i++) {
    const c = await tcp();
    c.sock.pause();
    c.sock.write(head('GET', '/api/jobs?limit=1000').repeat(4));
    gets.push(c);
  }
  await until(() => /closed an HTTP connection that left .* MiB of answers unread/.test(s!.output()), 'server.log to say a reader was closed');
  for (const c of gets) c.sock.destroy();
  assert.equal((await fetch(`http://127.0.0.1:${port}/api/status`, { headers: { Authorization: `Bearer ${token}` } })).status, 200, 'a new HTTP client is served');
  assert.equal((await s.cli(['status'])).code, 0);
});

// ---- what one request may expand to ------------------------------------------------

test('a sweep whose jobs would hold more than 64 MiB of arguments is refused, by the client and by the server, saying the limit and how to split it; nothing is added', { timeout: 60_000 }, async (t) => {
  let s: TestServer | undefined;
  t.after(() => cleanUp(s));
  s = await startServer();
  const script = writeScript(s.dir, 'job.sh', 'exit 0');
  // 4 arguments of 1,000 placeholders, 200 values of 128 characters: 200 jobs of 512 KB.
  const template = [script, ...Array(4).fill('{}'.repeat(1000))];
  const values = Array.from({ length: 200 }, (_, i) => String(i).padStart(128, 'v'));
  const r = await socketOp(s.dataDir, { op: 'add_jobs', cwd: s.dir, jobs: [template], sweep: [values] });
  assert.equal(r.ok, false);
  assert.equal(r.code, 2);
  assert.match(r.error, /the sweep makes 200 jobs of 97\.7 MiB of arguments and environment in all, more than the 64 MiB one request may add/);
  assert.match(r.hint, /split it by the values of the first ::: list: 200 of them make 0\.5 MiB each on average, so about 131 at a time fit/);
  const cli = await s.cli(['add_job', ...template, ':::', ...values]);
  assert.equal(cli.code, 2, cli.stderr);
  assert.match(cli.stderr, /more than the 64 MiB one request may add/);
  // An --env setting each job keeps a copy of (once a snapshot is loaded) counts for each.
  const big = `BIG=${'e'.repeat(100_000)}`;
  const listed = await socketOp(s.dataDir, { op: 'add_jobs', cwd: s.dir, env: [big], jobs: Array.from({ length: 1000 }, (_, i) => [script, String(i)]) });
  assert.equal(listed.ok, false);
  assert.equal(listed.code, 2);
  assert.match(listed.error, /the 1000 jobs hold 95\.4 MiB of arguments and environment in all, more than the 64 MiB one request may add/);
  const env = await socketOp(s.dataDir, { op: 'add_jobs', cwd: s.dir, env: [big], jobs: [[script, '{}']], sweep: [Array.from({ length: 1000 }, String)] });
  assert.equal(env.ok, false);
  assert.match(env.error, /more than the 64 MiB one request may add/);
  assert.equal((await s.status()).counts.total, 0, 'nothing was added');
  // Just under the limit is fine.
  const under = await socketOp(s.dataDir, { op: 'add_jobs', cwd: s.dir, jobs: [template], sweep: [values.slice(0, 120)] });
  assert.equal(under.ok, true, JSON.stringify(under));
  assert.equal((await s.status()).counts.total, 120);
});

test('a journal that already holds a sweep over the limit (written before there was one) still loads', { timeout: 60_000 }, async (t) => {
  const dir = tempDir();
  let s: TestServer | undefined;
  t.after(() => cleanUp(s, dir));
  const data = path.join(dir, '.data');
  fs.mkdirSync(data, { mode: 0o700 });
  const values = Array.from({ length: 300 }, (_, i) => String(i).padStart(128, 'v'));
  const add = { n: 1, e: 'add', t: Date.now(), id: 1, cwd: '/', retries: 0, timeout: 0, jobs: [['/bin/true', ...Array(2).fill('{}'.repeat(1000))]], sweep: [values] };
  fs.writeFileSync(path.join(data, 'journal'), JSON.stringify({ format: 'djs-journal', version: 3, after: 0 }) + '\n' + JSON.stringify(add) + '\n');
  s = await startServer({ dir });
  assert.equal((await s.status()).counts.waiting, 300);
  const c = await connect(s);
  c.sock.write('{"op":"job","id":300}\n');
  await until(() => c.got().endsWith('\n'), 'the answer');
  c.sock.destroy();
  assert.deepEqual(JSON.parse(c.got()).job.args, Array(2).fill(values[299].repeat(1000)));
});

// ---- fields of a wrong type or value ------------------------------------------------

test('every field of a wrong type or value is a one-line usage error (code 2), on every operation', { timeout: 60_000 }, async (t) => {
  let s: TestServer | undefined;
  t.after(() => cleanUp(s));
  s = await startServer();
  const script = writeScript(s.dir, 'job.sh', 'exit 0');
  await s.ok(['add_job', '--tag', 'a', script]);
  const bad: Record<string, unknown>[] = [
    ...['x', {}, 1, null, [], true].map((ids) => ({ op: 'wait', ids })),
    { op: 'wait', tag: 1 }, { op: 'wait', all: 'yes' }, { op: 'wait', ranges: 'x' }, { op: 'wait', hosts: 'w1' }, { op: 'wait', hosts: [1] },
    { op: 'jobs', state: '' }, { op: 'jobs', state: ['done'] }, { op: 'jobs', tag: '' }, { op: 'jobs', worker: 1 }, { op: 'jobs', text: null }, { op: 'jobs', limit: '5' },
    { op: 'list', state: [] }, { op: 'list', state: '' }, { op: 'list', tag: null },
    { op: 'log', id: 1, follow: 'yes' }, { op: 'job', id: '1' },
    { op: 'kill', all: 'yes' }, { op: 'kill', ids: {} }, { op: 'kill', tag: ['a'] },
    { op: 'retry', failed: 1 }, { op: 'retry', killed: 'true', tag: 'a' }, { op: 'retry', ids: null },
    { op: 'clean', logs: 'yes' }, { op: 'clean', tag: 1 },
    { op: 'remove_jobs', ids: 'x' }, { op: 'set_priority', priority: '1', tag: 'a' },
    { op: 'pause', tag: null }, { op: 'resume', tag: '' }, { op: 'policy', name: 1 },
    { op: 'add_workers', workers: [{ host: 'w' }], skipCheck: 'yes' }, { op: 'add_workers', workers: [{ host: 'w' }], skipCheck: true, requeueOnDown: 1 },
    { op: 'remove_workers', hosts: ['w'], mode: 'later' },
    { op: 'add_jobs', cwd: s.dir, jobs: [[script]], tags: 'a' }, { op: 'add_jobs', cwd: s.dir, jobs: [[script]], sweep: 'x' },
    { op: 'add_jobs', cwd: s.dir, jobs: [[script]], retryDelay: '1' },
  ];
  for (const req of bad) {
    const r = await rawRequest(s.dataDir, JSON.stringify(req) + '\n');
    assert.equal(r.lines.length, 1, `an answer to ${JSON.stringify(req)}`);
    const m = JSON.parse(r.lines[0]);
    assert.deepEqual([m.ok, m.code], [false, 2], `${JSON.stringify(req)} answered ${r.lines[0]}`);
  }
  const m = await socketOp(s.dataDir, { op: 'wait', ids: 'x' });
  assert.deepEqual([m.error, m.hint], ['invalid ids \'"x"\' for wait', 'ids is a list of job ids, not empty']);
  const st = await s.status();
  assert.deepEqual([st.counts.total, st.workers.length, st.paused], [1, 0, false], 'nothing changed');
});
