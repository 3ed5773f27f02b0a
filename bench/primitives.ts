// Facts for the design of the job launcher: what the pieces of a job start cost on this
// machine, measured in isolation. CPU time per operation (user + sys of the whole process
// tree, from bash `times` after the tree has been reaped), net of the same interpreter
// running the same loop without the operation; wall time per operation beside it.
//   a. one process per job: a subshell fork in a small bash; fork + exec of a trivial
//      `#!/bin/sh` script from bash; both (the shape of a wrapper subshell that forks the
//      script); the same from a small perl (fork + exit; fork + exec); no modules.
//   b. a launcher reading job ids from a pipe and starting each job with one fork + exec:
//      xargs, a bash `while read` loop, a perl `while (<STDIN>)` loop (per job, gross).
//   c. file operations of a start (perl, one process, /proc/self/schedstat): create +
//      write + close of a small file, its unlink, creating a log file with O_APPEND, and
//      opening an existing one, on the temp dir's file system and on tmpfs (/dev/shm).
import fs from 'node:fs';
import path from 'node:path';
import { type BenchResult, type Opts, bash, fmt, median, min, max, now, parseTimes, tempDir, which, writeScript } from './lib.ts';

type Probe = { group: 'a' | 'b'; name: string; base?: string; cmd: (n: number) => string };

const q = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
const bashLoop = (body: string) => (n: number) => `bash --norc --noprofile -c ${q(`for ((i=0;i<${n};i++)); do ${body}; done`)}`;
const perlLoop = (body: string) => (n: number) => `perl -e ${q(`for my $i (1..${n}) { ${body} }`)}`;

const PROBES: Probe[] = [
  { group: 'a', name: 'bash: empty loop (the baseline)', cmd: bashLoop(':') },
  { group: 'a', name: 'bash: subshell fork `( : )`', base: 'bash: empty loop (the baseline)', cmd: bashLoop('( : )') },
  { group: 'a', name: 'bash: fork + exec of t.sh `./t.sh $i`', base: 'bash: empty loop (the baseline)', cmd: bashLoop('./t.sh $i') },
  { group: 'a', name: 'bash: subshell that forks + execs t.sh `( ./t.sh $i; : )`', base: 'bash: empty loop (the baseline)', cmd: bashLoop('( ./t.sh $i; : )') },
  { group: 'a', name: 'perl: empty loop (the baseline)', cmd: perlLoop('') },
  { group: 'a', name: 'perl: fork + exit + waitpid', base: 'perl: empty loop (the baseline)', cmd: perlLoop('my $p = fork; if (!$p) { exit 0 } waitpid $p, 0;') },
  { group: 'a', name: 'perl: fork + exec of t.sh + waitpid', base: 'perl: empty loop (the baseline)', cmd: perlLoop('my $p = fork; if (!$p) { exec "./t.sh", $i; exit 127 } waitpid $p, 0;') },
  { group: 'b', name: 'xargs -n 1 ./t.sh (one at a time)', cmd: (n) => `seq 1 ${n} | xargs -n 1 ./t.sh` },
  { group: 'b', name: 'xargs -P 8 -n 1 ./t.sh', cmd: (n) => `seq 1 ${n} | xargs -P 8 -n 1 ./t.sh` },
  { group: 'b', name: 'bash launcher: `while read -r i; do ./t.sh "$i" & done` (≤ 8 at a time)', cmd: (n) => `seq 1 ${n} | bash --norc --noprofile -c ${q('r=0; while read -r i; do ./t.sh "$i" & if (( ++r >= 8 )); then wait -n; ((r--)); fi; done; wait')}` },
  { group: 'b', name: 'bash: `read` of an 80-byte line from a pipe, no job (bash reads a pipe a byte at a time)', cmd: (n) => `seq -f '%080g' 1 ${n} | bash --norc --noprofile -c ${q('while read -r i; do :; done')}` },
  { group: 'b', name: 'perl launcher: `while (<STDIN>)` fork + exec (≤ 8 at a time)', cmd: (n) => `seq 1 ${n} | perl -e ${q('my $r = 0; while (my $i = <STDIN>) { chomp $i; my $p = fork; if (!$p) { exec "./t.sh", $i; exit 127 } if (++$r >= 8) { wait; $r-- } } 1 while wait != -1;')}` },
];

/** The file-operation loops: prints "phase nanoseconds-of-CPU wall-nanoseconds" lines. */
const FILE_OPS = `
use Time::HiRes qw(clock_gettime CLOCK_MONOTONIC);
my ($dir, $n) = @ARGV;
sub cpu { open my $f, '<', '/proc/self/schedstat' or die; my $l = <$f>; close $f; (split ' ', $l)[0] }
sub phase { my ($name, $code) = @_; my ($c, $w) = (cpu(), clock_gettime(CLOCK_MONOTONIC)); $code->(); printf "%s %d %d\\n", $name, cpu() - $c, (clock_gettime(CLOCK_MONOTONIC) - $w) * 1e9 }
my $buf = "12345\\n";
phase('base', sub { for my $i (1..$n) { my $p = "$dir/p$i.pid"; } });
# O_WRONLY|O_CREAT|O_EXCL = 193, O_WRONLY|O_CREAT|O_APPEND = 1089, O_WRONLY|O_APPEND = 1025 (Linux)
phase('create', sub { for my $i (1..$n) { sysopen(my $f, "$dir/p$i.pid", 193, 0644) or die "$!"; syswrite($f, $buf); close $f } });
phase('unlink', sub { for my $i (1..$n) { unlink("$dir/p$i.pid") or die "$!" } });
phase('log', sub { for my $i (1..$n) { sysopen(my $f, "$dir/l$i.log", 1089, 0644) or die "$!"; close $f } });
phase('reopen', sub { for my $i (1..$n) { sysopen(my $f, "$dir/l$i.log", 1025) or die "$!"; close $f } });
`;
const FILE_ROWS: [string, string][] = [
  ['create', 'create + write 6 bytes + close a new file (O_CREAT|O_EXCL: a pid file)'],
  ['unlink', 'unlink that file'],
  ['log', 'create a log file (O_CREAT|O_APPEND) + close'],
  ['reopen', 'open an existing file O_APPEND + close'],
];

export async function primitives(o: Opts): Promise<BenchResult> {
  const t00 = now();
  const n = o.quick ? 300 : 2000;
  const nFiles = o.quick ? 500 : 3000;
  const rounds = o.quick ? 1 : Math.max(o.runs, 5);
  const notes: string[] = [];
  if (!which('perl')) throw new Error('perl not found (Debian package perl-base)');
  // Every round's files go to directories of their own, all deleted after the last round:
  // on ext4 without a journal, deletes slow later creations down (RESULTS.md, F7).
  const scratch: string[] = [];
  const work = tempDir('djsb-p-');
  scratch.push(work);
  writeScript(path.join(work, 't.sh'), 'exit 0');
  const fsDirs: [string, string][] = [[`${path.dirname(work)} (${fsType(work)})`, path.dirname(work)]];
  if (fs.existsSync('/dev/shm')) fsDirs.push([`/dev/shm (${fsType('/dev/shm')})`, '/dev/shm']); else notes.push('no /dev/shm: the tmpfs rows are skipped');
  const cpu = new Map<string, number[]>(), wall = new Map<string, number[]>();
  const push = (m: Map<string, number[]>, k: string, v: number) => { if (!m.has(k)) m.set(k, []); m.get(k)!.push(v); };
  try {
    for (let r = 0; r < rounds; r++) {
      for (const p of PROBES) {
        const t0 = now();
        const res = await bash(`${p.cmd(n)}; times`, { cwd: work });
        push(wall, p.name, (now() - t0) / n);
        push(cpu, p.name, parseTimes(res.stdout) * 1000 / n);
      }
      for (const [label, parent] of fsDirs) {
        const d = fs.mkdtempSync(path.join(parent, 'djsb-pf-'));
        scratch.push(d);
        const res = await bash(`perl -e ${q(FILE_OPS)} ${q(d)} ${nFiles}`);
        for (const line of res.stdout.trim().split('\n')) {
          const [phase, c, w] = line.split(' ');
          push(cpu, `${label} ${phase}`, Number(c) / 1e6 / nFiles);
          push(wall, `${label} ${phase}`, Number(w) / 1e6 / nFiles);
        }
      }
      o.log(`primitives round ${r + 1}/${rounds} done`);
    }
  } finally {
    for (const d of scratch) fs.rmSync(d, { recursive: true, force: true });
  }
  const us = (x: number) => fmt(x * 1000, 0);
  const rowOf = (p: Probe) => {
    const c = cpu.get(p.name)!, w = wall.get(p.name)!;
    const net = p.base ? median(c) - median(cpu.get(p.base)!) : median(c);
    return [p.name, us(median(c)), `${us(min(c))}–${us(max(c))}`, p.base ? us(net) : '', us(median(w))];
  };
  const fileRows: string[][] = [];
  for (const [label] of fsDirs) {
    const base = median(cpu.get(`${label} base`)!);
    for (const [phase, what] of FILE_ROWS) {
      const c = cpu.get(`${label} ${phase}`)!, w = wall.get(`${label} ${phase}`)!;
      fileRows.push([label, what, us(median(c) - base), c.map((x) => us(x - base)).join(', '), us(median(w))]);
    }
  }
  notes.push(`t.sh is \`#!/bin/sh\\nexit 0\` (sh is ${fs.realpathSync(which('sh') ?? '/bin/sh')}); ${n} operations per loop, ${rounds} interleaved rounds, medians. CPU is user + sys of the loop process and every process it reaped (bash \`times\` in the shell that ran it), so a fork counts in the parent and the child's exec, run and exit in the child; the interpreter's start-up is in every row of a group and cancels out in "net".`);
  notes.push('a: loops that wait for each process before the next. b: a launcher reading one id per line from `seq` through a pipe, at most 8 jobs at a time, per job including the launcher\'s start-up (amortized over the loop). The bash launcher is the shape of a bash job launcher with no wrapper: the job forked and exec\'d straight from the loop.');
  notes.push(`c: ${nFiles} files per loop in a fresh directory per round and file system; CPU of the perl process only (/proc/self/schedstat), net of the same loop building the paths. Work the kernel defers to other threads (writeback of the dirty inodes and bitmaps; there is no journal) is not in it. The ext4 rows depend on how many files were deleted on the file system in the last minutes (RESULTS.md, F7), by this loop or by anything else on the machine: see how the rounds drift.`);
  return {
    name: 'primitives', title: '7. What the pieces of a start cost (fork, exec, files)',
    sections: [
      { title: 'a. one process per job, from a small bash or a small perl (µs per operation)', columns: ['operation', 'CPU µs (median)', 'range', 'net of empty loop', 'wall µs (median)'], rows: PROBES.filter((p) => p.group === 'a').map(rowOf) },
      { title: 'b. launchers: one fork + exec per job, ids read from a pipe (µs per job)', columns: ['launcher', 'CPU µs (median)', 'range', '', 'wall µs (median)'], rows: PROBES.filter((p) => p.group === 'b').map(rowOf) },
      { title: 'c. file operations of a start (µs per operation, net of the loop)', columns: ['file system', 'operation', 'CPU µs (median)', 'each round, in order', 'wall µs (median)'], rows: fileRows },
    ],
    targets: [], notes, seconds: (now() - t00) / 1000,
  };
}

function fsType(dir: string): string {
  try { return fs.readFileSync('/proc/self/mounts', 'utf8').split('\n').map((l) => l.split(' ')).filter((f) => f.length > 2 && (dir === f[1] || dir.startsWith(f[1] === '/' ? '/' : f[1] + '/'))).sort((a, b) => b[1].length - a[1].length)[0]?.[2] ?? '?'; } catch { return '?'; }
}
