// The dashboard in a real browser: Debian's chromium, headless, driven by playwright-core
// (a dev dependency that downloads no browser of its own). The page is loaded from a real
// server (start --http), checked against `status --json`, and used as a person would:
// kill and retry by clicking (with the confirmation), a job's state and log followed live
// (server-sent events, no reload), and screenshots of the main views at desktop and
// phone widths written to DJS_SCREENSHOT_DIR (default: TMPDIR/djs-screenshots). And the
// token: it must reach no other port of the host, as a cookie would (browsers send
// cookies to every port), and a page without it shows nothing.

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { chromium, type Page } from 'playwright-core';
import { GATED, pidOf, release, serve, startServer, until, writeScript } from './server.ts';

const CHROMIUM = process.env.DJS_CHROMIUM ?? '/usr/bin/chromium';
const SHOTS = path.resolve(process.env.DJS_SCREENSHOT_DIR ?? path.join(os.tmpdir(), 'djs-screenshots'));
const DESKTOP = { width: 1280, height: 900 }, PHONE = { width: 390, height: 844 };

/** The counts the page shows, by state. */
const shownCounts = (page: Page) => page.$$eval('#summary [data-state]', (boxes) =>
  Object.fromEntries(boxes.map((b) => [b.getAttribute('data-state'), Number(b.querySelector('b')!.textContent)])));

test('the dashboard shows the run, kills and retries by click, and follows a job live', { skip: !fs.existsSync(CHROMIUM) && `no chromium at ${CHROMIUM} (apt-get install chromium)`, timeout: 240_000 }, async (t) => {
  const t0 = Date.now();
  const mark = (what: string) => t.diagnostic(`${what} at ${Date.now() - t0} ms`);
  const s = await serve(t, { args: ['--http', '0'] });
  writeScript(s.dir, 'gated.sh', GATED);
  writeScript(s.dir, 'quick.sh', 'echo "quick $1"; exit "$1"');
  const url = (await s.ok(['dashboard'])).trim();
  // The rest of the setup goes through the API: one client process less per step.
  const token = /#token=([0-9a-f]+)$/.exec(url)![1];
  const api = async (p: string, body?: unknown) => {
    const r = await fetch(new URL(p, url), body === undefined ? { headers: { Authorization: `Bearer ${token}` } }
      : { method: 'POST', headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
    const j = await r.json();
    assert.ok(j.ok, `${p}: ${j.error}`);
    return j;
  };
  const job = async (id: number) => (await api(`/api/jobs/${id}`)).job;
  await api('/api/add_workers', { workers: [{ host: 'local1', slots: 2 }, { host: 'local2', slots: 2 }], skipCheck: true });
  await api('/api/add_jobs', { cwd: s.dir, jobs: [0, 0, 0, 0, 0, 1].map((code) => ['./quick.sh', String(code)]), tags: ['quick'] });
  await until(async () => (await api('/api/status')).counts.running === 0, 'the quick jobs to end');
  const first = (await api('/api/add_jobs', { cwd: s.dir, jobs: ['0', '0', '3', '0', '0'].map((code) => ['./gated.sh', code]), tags: ['train'] })).first;
  const gated = [0, 1, 2, 3, 4].map((i) => first + i);
  const [kill, live, fail, follow, queued] = gated; // 4 slots: the fifth waits
  for (const id of [kill, live, fail, follow]) await pidOf(s, id);
  release(s, fail);
  await until(async () => (await job(fail)).state === 'failed', 'the failing job to fail');

  mark('server and jobs ready');
  const browser = await chromium.launch({ executablePath: CHROMIUM });
  t.after(() => browser.close());
  const page = await browser.newPage({ viewport: DESKTOP });
  const problems: string[] = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') problems.push(`console ${m.type()}: ${m.text()}`); });
  page.on('requestfailed', (r) => { if (!r.url().includes('/api/')) problems.push(`request failed: ${r.url()}`); });
  fs.mkdirSync(SHOTS, { recursive: true });
  t.diagnostic(`screenshots in ${SHOTS}`);

  // The token comes once in the URL and leaves it.
  await page.goto(url);
  assert.doesNotMatch(page.url(), /token/, 'the token is gone from the address bar');
  await page.waitForSelector(`#job-table tr[data-id="${queued}"]`);
  await page.evaluate(() => { (window as any).notReloaded = true; });
  mark('page loaded');

  // What it shows is what status --json says.
  const st = await s.status(); // nothing changes now: gated jobs run until released
  await until(async () => {
    const shown = await shownCounts(page);
    return ['waiting', 'running', 'done', 'failed', 'killed', 'total'].every((k) => shown[k] === st.counts[k]);
  }, 'the counts on the page to equal status --json');
  for (const w of st.workers) {
    const row = page.locator(`#workers tr[data-host="${w.host}"]`);
    assert.equal(await row.locator('.slot').count(), w.slots, `${w.host}: one box per slot`);
    assert.equal(await row.locator('.slot.busy').count(), w.running.length, `${w.host}: busy slots`);
    assert.equal(await row.locator('.state').textContent(), w.state);
  }
  const rows = await page.$$eval('#job-table tbody tr', (trs) => trs.map((tr) => [Number(tr.getAttribute('data-id')), tr.getAttribute('data-state')]));
  const jobs = await s.jobs();
  assert.deepEqual(rows, jobs.map((j: any) => [j.id, j.state]).reverse(), 'the job list, newest first');
  await page.screenshot({ path: path.join(SHOTS, 'main-desktop.png'), fullPage: true });

  // One progress bar per tag, from the status reply; pause and resume a tag by click.
  // A finished tag (nothing waiting or running) is folded away under a toggle.
  assert.equal(await page.isVisible('#tags tr[data-tag="quick"]'), false, 'the finished tag is folded away');
  assert.equal(await page.textContent('#tags-finished-count'), '1 finished tag');
  await page.click('#tags-finished-count');
  const tagRow = page.locator('#tags tr[data-tag="quick"]');
  assert.equal(await tagRow.locator('td.num').textContent(), '6/6');
  await tagRow.locator('button').click();
  await until(async () => (await api('/api/status')).pausedTags.includes('quick'), 'the tag to be paused');
  await page.waitForSelector('#tags tr[data-tag="quick"] .chip');
  await page.click('#tags tr[data-tag="quick"] button');
  await until(async () => (await api('/api/status')).pausedTags.length === 0, 'the tag to be resumed');

  mark('main view checked');
  // Kill: asks first; Cancel changes nothing, OK kills; the row follows live.
  await page.click(`#job-table tr[data-id="${kill}"] button[data-action="kill"]`);
  await page.waitForSelector('#confirm[open]');
  assert.match(await page.textContent('#confirm-text') ?? '', new RegExp(`Kill job ${kill}\\?`));
  await page.click('#confirm button[value="no"]');
  assert.equal((await job(kill)).state, 'running', 'Cancel kills nothing');
  await page.click(`#job-table tr[data-id="${kill}"] button[data-action="kill"]`);
  await page.click('#confirm-yes');
  await page.waitForSelector(`#job-table tr[data-id="${kill}"][data-state="killed"]`, { timeout: 20_000 });
  assert.equal((await job(kill)).state, 'killed');

  // Retry the failed job by click, which asks first (Cancel changes nothing); it goes back
  // to the queue and runs again (and, already released, fails again at once).
  await page.click(`#job-table tr[data-id="${fail}"] button[data-action="retry"]`);
  await page.waitForSelector('#confirm[open]');
  assert.match(await page.textContent('#confirm-text') ?? '', new RegExp(`Run job ${fail} again\\?`));
  await page.click('#confirm button[value="no"]');
  assert.equal((await job(fail)).attempts, 1, 'Cancel retries nothing');
  await page.click(`#job-table tr[data-id="${fail}"] button[data-action="retry"]`);
  await page.click('#confirm-yes');
  await until(async () => (await job(fail)).attempts === 2, 'the failed job to run again');
  await page.waitForSelector(`#job-table tr[data-id="${fail}"][data-attempts="2"]`, { timeout: 20_000 });

  // A job's state changes on the page as it changes in the server; what did not change
  // stays the same element (a click on a running job's link is never lost to the redraw).
  await page.$eval(`#job-table tr[data-id="${follow}"] a`, (a) => { (a as any).kept = true; });
  release(s, live);
  await page.waitForSelector(`#job-table tr[data-id="${live}"][data-state="done"]`, { timeout: 20_000 });
  assert.equal(await page.$eval(`#job-table tr[data-id="${follow}"] a`, (a) => (a as any).kept), true, 'the link of a running job was not redrawn');
  await until(async () => (await shownCounts(page)).done === (await api('/api/status')).counts.done, 'the done count to follow');

  mark('kill, retry and a live change done');
  // A job's page: its attempts, and its log followed while it runs.
  await page.click(`#job-table tr[data-id="${follow}"] a`);
  await page.waitForSelector('#following');
  await page.waitForFunction((id) => document.getElementById('log')!.textContent!.includes(`job ${id} running on`), follow);
  assert.doesNotMatch(await page.textContent('#log') ?? '', /released/);
  assert.equal(await page.locator('#attempts tbody tr').count(), 1);
  await page.screenshot({ path: path.join(SHOTS, 'job-desktop.png'), fullPage: true });
  release(s, follow);
  await page.waitForFunction((id) => document.getElementById('log')!.textContent!.includes(`job ${id} released`), follow, { timeout: 20_000 });
  await page.waitForSelector('#job .state.s-done', { timeout: 20_000 });
  assert.equal(await page.textContent('#log'), fs.readFileSync(path.join(s.logDir, `${follow}.log`), 'utf8'), 'the whole log, once');
  assert.equal(await page.evaluate(() => (window as any).notReloaded), true, 'all of it live, without a reload');

  // The retried job's page lists both attempts.
  await page.goto(new URL(`#/job/${fail}`, url).href);
  await page.waitForSelector('#attempts tbody tr:nth-child(2)');

  mark('job page followed');
  // Phone width.
  await page.setViewportSize(PHONE);
  await page.goto(new URL('#/', url).href);
  await page.waitForSelector(`#job-table tr[data-id="${queued}"]`);
  await page.waitForSelector('#toast', { state: 'hidden' });
  assert.deepEqual(await sideways(page), [], 'the main view at 390 px');
  await page.screenshot({ path: path.join(SHOTS, 'main-phone.png'), fullPage: true });
  await page.goto(new URL(`#/job/${follow}`, url).href);
  await page.waitForFunction(() => document.getElementById('log')!.textContent!.includes('released'));
  await page.screenshot({ path: path.join(SHOTS, 'job-phone.png'), fullPage: true });
  const wide = await page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(wide <= PHONE.width + 1, `the page fits a phone's width (${wide} px)`);

  assert.deepEqual(problems, [], 'no errors in the page');
  for (const id of gated) release(s, id);
});

test('the token reaches no other port of the host: kept by the page, sent in a header, never a cookie', { skip: !fs.existsSync(CHROMIUM) && `no chromium at ${CHROMIUM} (apt-get install chromium)`, timeout: 120_000 }, async (t) => {
  const s = await serve(t, { args: ['--http', '0'] });
  await s.ok(['add_slave', '--skip_ssh_auth_check', 'w1']);
  const url = (await s.ok(['dashboard'])).trim();
  const base = new URL(url).origin;
  const token = fs.readFileSync(path.join(s.dataDir, 'http.token'), 'utf8').trim();

  // Another local user's web server, on another port of the same host: it keeps all it
  // is sent, and its page reports what the browser lets a script of its origin read.
  const got: string[] = [];
  const other = http.createServer((req, res) => {
    let body = '';
    req.on('data', (c) => { body += c; });
    req.on('end', () => {
      got.push(JSON.stringify({ method: req.method, url: req.url, headers: req.headers, body }));
      res.writeHead(200, { 'Content-Type': 'text/html' });
      res.end(req.url === '/' ? `<img src="/pixel.png"><script>
fetch('/report', { method: 'POST', credentials: 'include', body: JSON.stringify({ cookie: document.cookie, session: Object.assign({}, sessionStorage), local: Object.assign({}, localStorage) }) });
</script>` : 'ok');
    });
  });
  await new Promise<void>((resolve) => other.listen(0, '127.0.0.1', resolve));
  t.after(() => { other.closeAllConnections(); other.close(); });
  const otherBase = `http://127.0.0.1:${(other.address() as import('node:net').AddressInfo).port}`;

  const browser = await chromium.launch({ executablePath: CHROMIUM });
  t.after(() => browser.close());
  const context = await browser.newContext();
  const page = await context.newPage();
  // The API requests the page made and had an answer to (one cut short by a navigation
  // may show the browser's provisional headers only).
  const apiRequests: { url: string; status: number; headers: Promise<Record<string, string>> }[] = [];
  page.on('response', (r) => { if (r.url().startsWith(`${base}/api/`)) apiRequests.push({ url: r.url(), status: r.status(), headers: r.request().allHeaders() }); });

  // The link of older versions and the one `dashboard` prints: both end on the page, its
  // data shown and the token out of the address bar; a reload keeps it; it stays live.
  assert.match(url, /^http:\/\/127\.0\.0\.1:\d+\/#token=[0-9a-f]{48}$/);
  for (const u of [`${base}/?token=${token}`, url]) {
    await page.goto(u);
    await page.waitForSelector('#workers tr[data-host="w1"]');
    assert.doesNotMatch(page.url(), /token/, `${u}: the token is gone from the address bar`);
  }
  await page.reload();
  await page.waitForSelector('#workers tr[data-host="w1"]');
  await s.ok(['add_slave', '--skip_ssh_auth_check', 'w2']);
  await page.waitForSelector('#workers tr[data-host="w2"]', { timeout: 20_000 });
  assert.ok(apiRequests.length >= 3, 'the page called the API');
  for (const r of apiRequests) {
    assert.equal(r.status, 200, r.url);
    const h = await r.headers;
    if (r.url.includes('/api/hello')) assert.equal(h.authorization, undefined, `${r.url} carries nothing`);
    else assert.match(h.authorization, /^DJS-Session [0-9a-f]{64}\.[0-9a-f]{64}$/, `${r.url} carries a session key in a header`);
    assert.ok(!JSON.stringify({ url: r.url, h }).includes(token), `${r.url} does not carry the token`);
    assert.equal(h.cookie, undefined, `${r.url} carries no cookie`);
  }

  // The browser then visits the other port, in the same tab and in a new one.
  await page.goto(`${otherBase}/`);
  await until(() => got.filter((g) => g.includes('"url":"/report"')).length === 1, 'the report of the first visit');
  const tab = await context.newPage();
  await tab.goto(`${otherBase}/`);
  await until(() => got.filter((g) => g.includes('"url":"/report"')).length === 2, 'the report of the second visit');
  await tab.goto(`${otherBase}/again?x=1`);
  assert.ok(got.length >= 5, `the other server was visited (${got.length} requests)`);
  for (const g of got) assert.ok(!g.includes(token), `the other port got the token: ${g}`);
  assert.deepEqual((await context.cookies()).filter((c) => c.value.includes(token)), [], 'no cookie holds the token');
  assert.deepEqual(await context.cookies(), [], 'no cookie at all');

  // A page opened without the token shows no data and says how to get it; with a wrong
  // token, that the server refused it.
  const stranger = await (await browser.newContext()).newPage();
  await stranger.goto(`${base}/`);
  await stranger.waitForSelector('#signin:not([hidden])');
  assert.equal(await stranger.isHidden('#main-view'), true);
  assert.equal(await stranger.isHidden('#job-view'), true);
  assert.equal(await stranger.locator('#workers tr').count(), 0, 'no data');
  await stranger.goto(`${base}/#token=${'0'.repeat(48)}`);
  await stranger.waitForFunction(() => /did not prove/.test(document.getElementById('signin-why')!.textContent!));
  assert.equal(await stranger.isHidden('#main-view'), true);
  assert.equal(await stranger.locator('#workers tr').count(), 0, 'no data');
});

/** What scrolls sideways in the page as shown: the page itself, any element of the view
 *  shown whose content is wider than its box, and any button not wholly on screen. */
const sideways = (page: Page) => page.evaluate(() => {
  const out: string[] = [];
  const doc = document.documentElement;
  if (doc.scrollWidth > window.innerWidth) out.push(`the page is ${doc.scrollWidth} px wide`);
  for (const e of document.querySelectorAll('header *, main:not([hidden]) *')) {
    const box = e.getBoundingClientRect();
    if (!box.width || ['INPUT', 'SELECT', 'OPTION'].includes(e.tagName)) continue;
    const name = e.tagName.toLowerCase() + (e.id ? `#${e.id}` : '') + (e.className && typeof e.className === 'string' ? `.${e.className.split(' ').join('.')}` : '') + (e.querySelector('h2') ? ` (${e.querySelector('h2')!.textContent})` : '');
    if (e.scrollWidth > e.clientWidth + 1 && e.clientWidth > 0 && getComputedStyle(e).overflowX !== 'visible') out.push(`${name} scrolls: ${e.scrollWidth} px in ${e.clientWidth}`);
    if (e.tagName === 'BUTTON' && (box.left < 0 || box.right > window.innerWidth)) out.push(`${name} "${e.textContent}" is off-screen (${Math.round(box.left)}..${Math.round(box.right)} px)`);
  }
  return out;
});

test('a phone-width page never scrolls sideways, and finished tags keep out of the way', { skip: !fs.existsSync(CHROMIUM) && `no chromium at ${CHROMIUM} (apt-get install chromium)`, timeout: 120_000 }, async (t) => {
  const s = await serve(t, { args: ['--http', '0'] });
  writeScript(s.dir, 'gated.sh', GATED);
  writeScript(s.dir, 'quick.sh', 'echo "quick $*"; exit "$1"');
  const url = (await s.ok(['dashboard'])).trim();
  const token = /#token=([0-9a-f]+)$/.exec(url)![1];
  const api = async (p: string, body: unknown) => {
    const j = await (await fetch(new URL(p, url), { method: 'POST', headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' }, body: JSON.stringify(body) })).json();
    assert.ok(j.ok, `${p}: ${j.error}`);
    return j;
  };
  await api('/api/add_workers', { workers: [{ host: 'local1', slots: 2 }], skipCheck: true });
  // A campaign of 14 tags, all finished, and one still running.
  for (let i = 1; i <= 14; i++) await api('/api/add_jobs', { cwd: s.dir, jobs: [['./quick.sh', String(i % 5 ? 0 : 1)]], tags: [`sweep-${String(i).padStart(2, '0')}`] });
  await until(async () => (await s.status()).counts.running + (await s.status()).counts.waiting === 0, 'the tagged jobs to end');
  // Jobs with long arguments: a word of 300 characters, a long path, many words.
  const long = [['./quick.sh', '0', 'x'.repeat(300)], ['./quick.sh', '0', `--output=${'/very-long-directory-name'.repeat(8)}/result.csv`], ['./quick.sh', '1', ...Array.from({ length: 40 }, (_, i) => `--option-${i}=value-${i}`)]];
  const { first } = await api('/api/add_jobs', { cwd: s.dir, jobs: long, tags: ['a-campaign-with-a-rather-long-name-for-a-phone'] });
  await until(async () => (await s.status()).counts.running === 0, 'the long jobs to end');
  const gated = (await api('/api/add_jobs', { cwd: s.dir, jobs: [['./gated.sh', '0']], tags: ['still-running'] })).first;
  await pidOf(s, gated);

  const browser = await chromium.launch({ executablePath: CHROMIUM });
  t.after(() => browser.close());
  const page = await browser.newPage({ viewport: DESKTOP });
  const problems: string[] = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  await page.goto(url);
  await page.waitForSelector(`#job-table tr[data-id="${gated}"]`);

  // The running tag is shown; the 15 finished ones are one line, opened by a click; the
  // workers stay in the first screen.
  assert.deepEqual(await page.$$eval('#tags-now tr', (trs) => trs.map((tr) => tr.getAttribute('data-tag'))), ['still-running']);
  assert.equal(await page.textContent('#tags-finished-count'), '15 finished tags');
  assert.equal(await page.isVisible('#tags tr[data-tag="sweep-01"]'), false);
  const workersTop = await page.$eval('#workers', (e) => e.getBoundingClientRect().top);
  assert.ok(workersTop + 100 < DESKTOP.height, `the workers are in the first screen (${workersTop} px down)`);
  await page.screenshot({ path: path.join(SHOTS, 'tags-desktop.png') });
  await page.click('#tags-finished-count');
  assert.equal(await page.locator('#tags-done tr').count(), 15);
  assert.equal(await page.isVisible('#tags tr[data-tag="sweep-01"]'), true);
  // Opened, it stays open across live updates; and a tag that starts again moves up.
  await api('/api/add_jobs', { cwd: s.dir, jobs: [['./gated.sh', '0']], tags: ['sweep-07'] });
  await page.waitForSelector('#tags-now tr[data-tag="sweep-07"]', { timeout: 20_000 });
  assert.equal(await page.textContent('#tags-finished-count'), '14 finished tags');
  assert.equal(await page.isVisible('#tags-done tr[data-tag="sweep-01"]'), true, 'the toggle stayed open');
  await page.click('#tags-finished-count');

  // At 390 px wide: the main view, filtered and not, and a long job's page.
  await page.setViewportSize(PHONE);
  await page.waitForFunction(() => document.documentElement.scrollWidth <= window.innerWidth);
  await page.screenshot({ path: path.join(SHOTS, 'long-phone.png'), fullPage: true });
  assert.deepEqual(await sideways(page), [], 'the main view at 390 px');
  for (const id of [first, first + 1, first + 2, gated]) {
    const button = page.locator(`#job-table tr[data-id="${id}"] button`);
    assert.equal(await button.isVisible(), true);
    const box = (await button.boundingBox())!;
    assert.ok(box.x >= 0 && box.x + box.width <= PHONE.width, `job ${id}'s button is on screen (${box.x}..${box.x + box.width})`);
  }
  await page.goto(new URL(`#/?tag=a-campaign-with-a-rather-long-name-for-a-phone`, url).href);
  await page.waitForFunction((id) => document.querySelectorAll('#job-table tbody tr').length === 3 && !!document.querySelector(`#job-table tr[data-id="${id}"]`), first);
  assert.deepEqual(await sideways(page), [], 'the filtered view at 390 px');
  await page.goto(new URL(`#/job/${first + 2}`, url).href);
  await page.waitForFunction(() => document.getElementById('log')!.textContent!.includes('option-39'));
  assert.deepEqual(await sideways(page), [], 'a job page at 390 px');
  assert.deepEqual(problems, []);
  release(s, gated);
});

/** A TCP port free on 127.0.0.1 now. */
async function freePort(): Promise<number> {
  const srv = http.createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const port = (srv.address() as import('node:net').AddressInfo).port;
  await new Promise((resolve) => srv.close(resolve));
  return port;
}

test('a tab left open across stop gives the token to no server that cannot prove it holds it, and signs in again by itself', { skip: !fs.existsSync(CHROMIUM) && `no chromium at ${CHROMIUM} (apt-get install chromium)`, timeout: 180_000 }, async (t) => {
  const port = await freePort();
  const s = await serve(t, { args: ['--http', String(port)] });
  await s.ok(['add_slave', '--skip_ssh_auth_check', 'w1']);
  const url = (await s.ok(['dashboard'])).trim();
  const token = /#token=([0-9a-f]+)$/.exec(url)![1];
  const browser = await chromium.launch({ executablePath: CHROMIUM });
  t.after(() => browser.close());
  const page = await browser.newPage();
  await page.goto(url);
  await page.waitForSelector('#workers tr[data-host="w1"]');
  await page.waitForSelector('#live:not(.off)');

  // The page's HMAC-SHA256 (plain JavaScript, for contexts without crypto.subtle) is the
  // server's: keys and messages around the block size, long ones, and UTF-8.
  const cases: [string, string][] = [['', ''], ['key', 'The quick brown fox jumps over the lazy dog'], [token, 'x'.repeat(55)], [token, 'x'.repeat(56)],
    ['k'.repeat(64), 'y'.repeat(64)], ['k'.repeat(65), 'y'.repeat(119)], ['ключ', 'сообщение ✓ 🚀'], [token, 'z'.repeat(5000)]];
  assert.deepEqual(await page.evaluate((c) => c.map(([k, m]) => (window as any).hmacHex(k, m)), cases),
    cases.map(([k, m]) => crypto.createHmac('sha256', k).update(m).digest('hex')));
  assert.ok(!JSON.stringify(await page.evaluate(() => ({ ...sessionStorage }))).includes(token), 'the token is not in sessionStorage');

  // The server stops; another user's server takes its port. It keeps all it is sent; it
  // answers hellos with a made-up proof, any other request with 401 (to draw a new
  // hello), and once the real server runs again on another port, it relays the page's
  // hellos there and passes the answers on.
  await s.stop();
  const got: { at: number; method: string; url: string; headers: http.IncomingHttpHeaders; body: string }[] = [];
  let relayTo: string | null = null;
  const impostor = http.createServer((req, res) => {
    let body = '';
    req.on('data', (c) => { body += c; });
    req.on('end', async () => {
      got.push({ at: Date.now(), method: req.method!, url: req.url!, headers: req.headers, body });
      try {
        if (req.url!.startsWith('/api/hello') && relayTo) {
          const r = await fetch(relayTo + req.url);
          res.writeHead(r.status, { 'Content-Type': 'application/json' });
          return void res.end(await r.text());
        }
        if (req.url!.startsWith('/api/hello')) {
          res.writeHead(200, { 'Content-Type': 'application/json' });
          return void res.end(JSON.stringify({ ok: true, session: crypto.randomBytes(32).toString('hex'), proof: crypto.randomBytes(32).toString('hex') }));
        }
        res.writeHead(401, { 'Content-Type': 'application/json' });
        res.end(JSON.stringify({ ok: false, error: 'wrong access token' }));
      } catch { res.destroy(); }
    });
  });
  await new Promise<void>((resolve) => impostor.listen(port, '127.0.0.1', resolve));
  t.after(() => { impostor.closeAllConnections(); impostor.close(); });
  const hellos = () => got.filter((g) => g.url.startsWith('/api/hello')).length;
  await until(() => hellos() >= 2, 'the page to try the server on its port twice', 30_000);
  await page.waitForFunction(() => /did not prove/.test(document.getElementById('signin-why')!.textContent!) && !document.getElementById('signin')!.hidden);
  assert.equal(await page.isHidden('#main-view'), true, 'the page shows nothing from it');
  // Nor does the tab keep anything that a script of whatever serves this origin now (on
  // a reload) could read and use: the session went with the server, the token is in memory.
  assert.deepEqual(await page.evaluate(() => ({ ...sessionStorage })), {}, 'sessionStorage is empty');

  // The real server starts again, on another port; the impostor relays the page's hellos
  // there, which refuses them (they name the impostor's port).
  const s2 = await startServer({ dir: s.dir, args: ['--http', '0'] });
  t.after(() => s2.stop());
  const real = /^(http:\/\/127\.0\.0\.1:\d+)\//.exec((await s2.ok(['dashboard'])).trim())![1];
  relayTo = real;
  const relayedFrom = hellos();
  await until(() => hellos() >= relayedFrom + 2, 'the page to try twice more, relayed', 30_000);
  assert.equal(await page.isHidden('#main-view'), true);

  // What the impostor got: never the token, nor anything that opens the real server.
  const firstHello = got.find((g) => g.url.startsWith('/api/hello'))!.at;
  for (const g of got) {
    assert.ok(!JSON.stringify(g).includes(token), `the impostor got the token: ${JSON.stringify(g)}`);
    if (g.at >= firstHello) assert.equal(g.headers.authorization ?? g.headers['x-djs-token'], undefined, `after a hello that proved nothing, the page sent a credential: ${JSON.stringify(g)}`);
    for (const h of [g.headers.authorization, g.headers['x-djs-token']].filter((h): h is string => typeof h === 'string')) {
      const r = await fetch(`${real}/api/status`, { headers: { Authorization: h } });
      assert.equal(r.status, 401, `what the impostor got opens the real server: ${h}`);
    }
  }
  t.diagnostic(`the impostor got ${got.length} requests, ${hellos()} of them hellos`);

  // The impostor goes and the real server comes back on the port: the tab, which kept the
  // token in memory, signs in by itself and is live again.
  impostor.closeAllConnections(); impostor.close();
  await s2.stop();
  const s3 = await startServer({ dir: s.dir, args: ['--http', String(port)] });
  t.after(() => s3.stop());
  await page.waitForSelector('#workers tr[data-host="w1"]', { timeout: 30_000 });
  await page.waitForSelector('#live:not(.off)', { timeout: 30_000 });
  await s3.ok(['add_slave', '--skip_ssh_auth_check', 'w2']);
  await page.waitForSelector('#workers tr[data-host="w2"]', { timeout: 20_000 });
  // A reload goes on with the session (the token is not kept for it); once that server
  // stops, the reloaded tab cannot sign in by itself: it says so, and how.
  await page.reload();
  await page.waitForSelector('#workers tr[data-host="w2"]');
  await s3.stop();
  const s4 = await startServer({ dir: s.dir, args: ['--http', String(port)] });
  t.after(() => s4.stop());
  await page.waitForFunction(() => /refused this page's session/.test(document.getElementById('signin-why')!.textContent!) && !document.getElementById('signin')!.hidden, null, { timeout: 30_000 });
  assert.equal(await page.isHidden('#main-view'), true);
});

test('the page signs in where crypto.subtle is missing: a server reached by a network address over plain http', { skip: !fs.existsSync(CHROMIUM) && `no chromium at ${CHROMIUM} (apt-get install chromium)`, timeout: 120_000 }, async (t) => {
  const address = Object.values(os.networkInterfaces()).flat().find((a) => a && a.family === 'IPv4' && !a.internal)?.address;
  if (!address) return t.skip('this machine has no network address but loopback');
  const s = await serve(t, { args: ['--http', `${address}:0`] });
  await s.ok(['add_slave', '--skip_ssh_auth_check', 'w1']);
  const url = (await s.ok(['dashboard'])).trim();
  assert.ok(url.startsWith(`http://${address}:`), url);
  const browser = await chromium.launch({ executablePath: CHROMIUM });
  t.after(() => browser.close());
  const page = await browser.newPage();
  await page.goto(url);
  assert.deepEqual(await page.evaluate(() => [window.isSecureContext, typeof crypto.subtle]), [false, 'undefined'], 'not a secure context');
  await page.waitForSelector('#workers tr[data-host="w1"]');
  await page.waitForSelector('#live:not(.off)');
});
