// A real Slurm for tier-3 tests: one cluster of one node on this machine.
//
// startSlurm() starts munged, slurmctld and slurmd in the foreground (-F / -D), each from
// Debian's packages (munge, slurm-wlm), with a generated munge key and slurm.conf in one
// short temporary directory: the cluster `djstest` with one node, `djsnode` (CPUS cpus,
// whatever this machine has: slurmd takes the configured size), in one partition, `debug`.
// Clients (sinfo, srun, scancel, squeue, scontrol) find it through SLURM_CONF, which
// cluster.env holds: give it to the djs server and its clients. The cluster needs no
// systemd or cgroups (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none), so it runs
// in a container or VM as well; munged's socket is in the directory too (AuthInfo=socket=),
// so a munged of the machine's own is neither needed nor touched.
//
// Files, under the temporary directory: munge.key, munge.sock, slurm.conf, state/, spool/,
// and a log per daemon (munged.log, slurmctld.log, slurmd.log).
//
// Processes: close() kills the three daemons and everything that carries DJS_TEST_SLURM=<dir>
// in its environment (slurmd's slurmstepd processes and the job steps they started), then
// removes the directory. Process exit does the same for a cluster a test forgot to close.
// Linux only (/proc); the daemons run as the user running the tests (root in CI).

import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { allPids, packagesFor, removeDir, run, tempDir, until, which, type Run } from './server.ts';

/** A running cluster of one node. */
export interface TestSlurm {
  dir: string;
  /** The environment of a Slurm client: SLURM_CONF. */
  env: { SLURM_CONF: string };
  partition: string;
  node: string;
  cpus: number;
  /** Runs a Slurm client command (scontrol, squeue, scancel, srun ...) against this cluster. */
  client(cmd: string, args: string[]): Promise<Run>;
  /** Job names Slurm lists now (squeue), in any state. */
  jobNames(): Promise<string[]>;
  /** Kills every process of the cluster and removes its directory. */
  close(): Promise<void>;
  /** Stops slurmctld (SIGTERM; it saves its state) and waits until it exited: Slurm's
   *  clients then cannot reach the controller, while slurmd and running steps go on. */
  stopController(): Promise<void>;
  /** Starts slurmctld again (it recovers its state) and waits until sinfo answers. */
  startController(): Promise<void>;
}

const MARKER = 'DJS_TEST_SLURM';
const READY_MS = 30_000;
/** Where Debian keeps the daemons, off a normal user's PATH. */
const SBIN = ['/usr/sbin', '/sbin'];

/** Executables of the two packages, each with the package it comes in. */
const NEEDED: [string, string][] = [
  ['munged', 'munge'], ['slurmctld', 'slurm-wlm'], ['slurmd', 'slurm-wlm'], ['srun', 'slurm-wlm'], ['sinfo', 'slurm-wlm'],
];

/** Debian packages missing for a real Slurm: munge, slurm-wlm. */
export function slurmMissing(): string[] {
  return [...new Set(NEEDED.filter(([exe]) => !which(exe, SBIN)).map(([, pkg]) => pkg))];
}

const slurmPackages = packagesFor('tests on a real Slurm', slurmMissing);
const missingMessage = slurmPackages.message;
/** For `describe(name, { skip: slurmSkip() }, …)`: a message naming the missing packages, or
 *  false when all are there. Under CI (CI=true) never skips: startSlurm() then fails. */
export const slurmSkip = slurmPackages.skip;
/** Inside a test: skips it (returning true) when packages are missing; under CI a missing
 *  package fails the test instead. */
export const skipUnlessSlurm = slurmPackages.skipUnless;

// ---------------------------------------------------------------- processes

function envHas(pid: number, entry: string): boolean {
  try {
    return fs.readFileSync(`/proc/${pid}/environ`, 'latin1').split('\0').includes(entry);
  } catch {
    return false;
  }
}

/** SIGKILLs every process carrying the cluster's marker, and the daemons; returns how many
 *  live ones it found. */
function killCluster(dir: string, daemons: ChildProcess[]): number {
  let live = 0;
  const pids = new Set(allPids().filter((pid) => pid !== process.pid && envHas(pid, `${MARKER}=${dir}`)));
  for (const d of daemons) if (d.pid && d.exitCode === null && d.signalCode === null) pids.add(d.pid);
  for (const pid of pids) {
    try {
      if (fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.startsWith('Z')) continue;
      process.kill(pid, 'SIGKILL');
      live++;
    } catch {
      // gone
    }
  }
  return live;
}

const open = new Map<string, ChildProcess[]>();
process.on('exit', () => {
  for (const [dir, daemons] of open) {
    for (let i = 0; i < 10 && killCluster(dir, daemons) > 0; i++);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

function portFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

/** Two free ports next to each other, below Linux's ephemeral range (32768+). */
async function pickPorts(): Promise<number> {
  for (let i = 0; i < 50; i++) {
    const port = 16_000 + 2 * Math.floor(Math.random() * 1_900);
    if ((await portFree(port)) && (await portFree(port + 1))) return port;
  }
  throw new Error('no two free ports in 16000..19800');
}

// ---------------------------------------------------------------- the cluster

/** Starts munged, slurmctld and slurmd; resolves once the node is idle in its partition. */
export async function startSlurm(opts: { cpus?: number } = {}): Promise<TestSlurm> {
  const missing = slurmMissing();
  if (missing.length) throw new Error(missingMessage(missing));
  const dir = tempDir('djsl-');
  fs.chmodSync(dir, 0o700); // munged refuses a key or socket in a directory others can write
  const daemons: ChildProcess[] = [];
  open.set(dir, daemons);
  const cpus = opts.cpus ?? 8;
  const conf = path.join(dir, 'slurm.conf');
  const env = { SLURM_CONF: conf };
  const daemonEnv = { ...process.env, ...env, [MARKER]: dir };
  const user = os.userInfo().username, host = os.hostname();
  const partition = 'debug', node = 'djsnode';

  function daemon(name: string, exe: string, args: string[]): ChildProcess {
    const log = fs.openSync(path.join(dir, `${name}.out`), 'a');
    const child = spawn(which(exe, SBIN), args, { cwd: dir, env: daemonEnv, stdio: ['ignore', log, log] });
    fs.closeSync(log);
    child.on('error', () => {});
    child.unref();
    daemons.push(child);
    return child;
  }
  const client = (cmd: string, args: string[]) => run(cmd, args, { env, timeoutMs: 30_000 });

  try {
    const port = await pickPorts();
    fs.mkdirSync(path.join(dir, 'state'));
    fs.mkdirSync(path.join(dir, 'spool'));
    fs.writeFileSync(path.join(dir, 'munge.key'), Buffer.from(Array.from({ length: 1024 }, () => Math.floor(Math.random() * 256))), { mode: 0o600 });
    fs.writeFileSync(conf, [
      'ClusterName=djstest',
      `SlurmctldHost=${host}(127.0.0.1)`,
      `SlurmctldPort=${port}`,
      `SlurmdPort=${port + 1}`,
      `SlurmUser=${user}`,
      `SlurmdUser=${user}`,
      'AuthType=auth/munge',
      'CredType=cred/munge',
      `AuthInfo=socket=${dir}/munge.sock`,
      `StateSaveLocation=${dir}/state`,
      `SlurmdSpoolDir=${dir}/spool`,
      `SlurmctldPidFile=${dir}/slurmctld.pid`,
      `SlurmdPidFile=${dir}/slurmd.pid`,
      `SlurmctldLogFile=${dir}/slurmctld.log`,
      `SlurmdLogFile=${dir}/slurmd.log`,
      // No systemd, no cgroup delegation needed: processes tracked by parentage.
      'ProctrackType=proctrack/linuxproc',
      'TaskPlugin=task/none',
      'SelectType=select/cons_tres',
      'SelectTypeParameters=CR_CPU',
      'SlurmdParameters=config_overrides', // the node has the CPUs configured, whatever the machine has
      'ReturnToService=2',
      'MpiDefault=none',
      'JobCompType=jobcomp/none',
      'AccountingStorageType=accounting_storage/none',
      'SchedulerType=sched/backfill',
      'SlurmctldTimeout=30',
      'SlurmdTimeout=30',
      'KillWait=2', // a cancelled step gets SIGKILL 2 s after SIGTERM
      `NodeName=${node} NodeHostname=${host} NodeAddr=127.0.0.1 CPUs=${cpus} State=UNKNOWN`,
      `PartitionName=${partition} Nodes=${node} Default=YES MaxTime=INFINITE State=UP`,
      '',
    ].join('\n'));

    daemon('munged', 'munged', ['-F', '-f', `--socket=${dir}/munge.sock`, `--key-file=${dir}/munge.key`, `--pid-file=${dir}/munged.pid`,
      `--log-file=${dir}/munged.log`, `--seed-file=${dir}/munged.seed`]);
    await until(() => fs.existsSync(`${dir}/munge.sock`) || daemons[0].exitCode !== null, 'munged to listen', READY_MS);
    let ctld = daemon('slurmctld', 'slurmctld', ['-D', '-i']);
    daemon('slurmd', 'slurmd', ['-D', '-N', node]);
    await until(async () => {
      const dead = daemons.findIndex((d) => d.exitCode !== null);
      if (dead >= 0) return 'exited';
      const r = await client('sinfo', ['--noheader', `--partition=${partition}`, '--format=%T']);
      return r.code === 0 && r.stdout.trim() === 'idle' && 'ready';
    }, `Slurm's node ${node} to be idle`, READY_MS, 200).then((outcome) => {
      if (outcome !== 'exited') return;
      const logs = ['munged', 'slurmctld', 'slurmd'].map((n) => `${n}: ${fs.readFileSync(path.join(dir, `${n}.out`), 'utf8').trim().split('\n').slice(-2).join(' | ')}`);
      assert.fail(`a Slurm daemon exited: ${logs.join('; ')}`);
    });

    return {
      dir, env, partition, node, cpus, client,
      async jobNames() {
        const r = await client('squeue', ['--noheader', '--format=%j']);
        if (r.code !== 0) throw new Error(`squeue failed: ${r.stderr.trim()}`);
        return r.stdout.split('\n').map((l) => l.trim()).filter(Boolean);
      },
      async stopController() {
        const exited = new Promise<void>((resolve) => { if (ctld.exitCode !== null || ctld.signalCode !== null) resolve(); else ctld.once('exit', () => resolve()); });
        ctld.kill('SIGTERM');
        await exited;
      },
      async startController() {
        assert.ok(ctld.exitCode !== null || ctld.signalCode !== null, 'slurmctld is stopped');
        daemons.splice(daemons.indexOf(ctld), 1);
        ctld = daemon('slurmctld', 'slurmctld', ['-D', '-i']);
        await until(async () => {
          assert.equal(ctld.exitCode, null, 'slurmctld exited');
          return (await client('sinfo', ['--noheader', `--partition=${partition}`, '--format=%T'])).code === 0;
        }, 'slurmctld to answer again', READY_MS, 200);
      },
      async close() {
        await until(() => killCluster(dir, daemons) === 0, `the processes of the Slurm in '${dir}' to be gone`, 10_000, 20);
        open.delete(dir);
        await removeDir(dir);
      },
    };
  } catch (err) {
    killCluster(dir, daemons);
    open.delete(dir);
    await removeDir(dir);
    throw err;
  }
}
