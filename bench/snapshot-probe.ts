// How long a snapshot written a slice per turn holds the event loop, in-process: a state
// of N waiting jobs (default 1,000,000), Journal.startSnapshot, then the longest gap of
// a 1 ms timer while it writes (and the gaps over 40 ms).
//   node --import tsx bench/snapshot-probe.ts [N]
import { applyEvent, Journal, newState } from '../cli.ts';
import fs from 'node:fs'; import os from 'node:os'; import path from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
const n = Number(process.argv[2] ?? 1000000);
const st = newState();
for (let k = 0; k < 10; k++) applyEvent(st, { e: 'add', t: 0, id: st.nextId, cwd: '/w', retries: 0, timeout: 0, jobs: Array.from({ length: n / 10 }, (_, i) => ['/tmp/djsb-sc-xxxx/j', String(k * n / 10 + i)]) });
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snapprobe-'));
const j = new Journal(dir, 0, 0);
let t = performance.now();
const p = j.startSnapshot(st);
console.log('sync start ms', (performance.now() - t).toFixed(1));
const h = monitorEventLoopDelay({ resolution: 1 }); h.enable();
let worst = 0, last = performance.now();
const gaps: number[] = []; const iv = setInterval(() => { const x = performance.now(); if (x - last > 40) gaps.push(Math.round(x - last)); worst = Math.max(worst, x - last); last = x; }, 1);
t = performance.now();
await p;
clearInterval(iv); h.disable();
console.log(gaps.join(","), "async ms", (performance.now() - t).toFixed(0), 'worst gap ms', worst.toFixed(1), 'max delay', (h.max / 1e6).toFixed(1));
fs.rmSync(dir, { recursive: true });
