// The dashboard's access token over HTTP, without a browser: the challenge and response
// the page signs in by (GET /api/hello, then Authorization: DJS-Session S.KEY), done here
// as the page does it; sessions that die with their server and stay bounded in number;
// the token itself for API clients (curl); and `dashboard --new-token`, after which the
// old token, its sessions and its streams are refused at once.
// (test/dashboard.test.ts checks the page itself, against a server that is not djs.)

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { serve, until, type TestServer } from './server.ts';

/** GET or POST base+p with headers; the status and the JSON answer. */
async function call(base: string, p: string, headers: Record<string, string> = {}, body?: unknown): Promise<{ status: number; json: any }> {
  const r = await fetch(base + p, body === undefined ? { headers } : { method: 'POST', headers: { ...headers, 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
  return { status: r.status, json: await r.json() };
}

const mac = (token: string, label: string, host: string, client: string, server: string) =>
  crypto.createHmac('sha256', token).update(`${label}\n${host}\n${client}\n${server}`).digest('hex');

/** Signs in as the page does: a fresh nonce, the server's proof checked, the session key
 *  derived. Resolves to the Authorization header, or fails if the proof is wrong. */
async function signIn(base: string, token: string, host = new URL(base).host): Promise<Record<string, string>> {
  const nonce = crypto.randomBytes(32).toString('hex');
  const r = await call(base, `/api/hello?nonce=${nonce}&host=${encodeURIComponent(host)}`);
  assert.equal(r.status, 200, JSON.stringify(r.json));
  assert.match(r.json.session, /^[0-9a-f]{64}$/);
  assert.equal(r.json.proof, mac(token, 'djs-server-proof', host, nonce, r.json.session), 'the server proves it holds the token');
  return { Authorization: `DJS-Session ${r.json.session}.${mac(token, 'djs-session', host, nonce, r.json.session)}` };
}

async function dashboard(s: TestServer): Promise<{ base: string; token: string }> {
  const m = /^(http:\/\/127\.0\.0\.1:\d+)\/#token=([0-9a-f]+)$/.exec((await s.ok(['dashboard'])).trim());
  assert.ok(m);
  return { base: m[1], token: m[2] };
}

test('the page signs in by challenge and response; the session key works, nothing else derived from the token does', async (t) => {
  const s = await serve(t, { args: ['--http', '0'] });
  const { base, token } = await dashboard(s);
  const session = await signIn(base, token);
  assert.equal((await call(base, '/api/status', session)).status, 200);
  const added = await call(base, '/api/add_workers', session, { workers: [{ host: 'w1', slots: 1 }], skipCheck: true });
  assert.equal(added.status, 200, JSON.stringify(added.json));
  // API clients keep sending the token itself, on purpose.
  assert.equal((await call(base, '/api/status', { Authorization: `Bearer ${token}` })).json.workers[0].host, 'w1');

  // A wrong key, a made-up session, the proof as a key, the token as a key: refused.
  const [sid, key] = session.Authorization.slice('DJS-Session '.length).split('.');
  const wrong = [`${sid}.${'0'.repeat(64)}`, `${'1'.repeat(64)}.${key}`, `${sid}.${crypto.createHmac('sha256', token).update('x').digest('hex')}`, `${sid}.${token}`, `${sid}.${key}x`];
  for (const w of wrong) {
    const r = await call(base, '/api/status', { Authorization: `DJS-Session ${w}` });
    assert.equal(r.status, 401, w);
    assert.equal(r.json.ok, false);
  }
  assert.match((await call(base, '/api/status', { Authorization: `DJS-Session ${'1'.repeat(64)}.${key}` })).json.error, /^no such session/);

  // The hello itself: a nonce of hex digits, and only a host:port this server serves, so
  // that a server on another port cannot relay a page's challenge here and pass on the proof.
  const nonce = 'ab'.repeat(32), other = `127.0.0.1:${Number(new URL(base).port) + 1}`;
  const relayed = await call(base, `/api/hello?nonce=${nonce}&host=${encodeURIComponent(other)}`);
  assert.equal(relayed.status, 403);
  assert.equal(relayed.json.proof, undefined);
  // Nor any other name or address of this machine with another port; a name that is not
  // this machine's is a TLS proxy's, which passes requests on with the Host it is told.
  const port = Number(new URL(base).port) + 1;
  for (const h of [`localhost:${port}`, `127.0.0.2:${port}`, `[::1]:${port}`, `[::ffff:7f00:1]:${port}`, `app.localhost:${port}`, `${os.hostname()}:${port}`, `0.0.0.0:${port}`,
    ...Object.values(os.networkInterfaces()).flatMap((l) => l ?? []).map((a) => (a.family === 'IPv6' ? `[${a.address}]:${port}` : `${a.address}:${port}`))]) {
    assert.equal((await call(base, `/api/hello?nonce=${nonce}&host=${encodeURIComponent(h)}`)).status, 403, h);
  }
  const proxied = await signIn(base, token, 'djs.example.org');
  assert.equal((await call(base, '/api/status', proxied)).status, 200, 'through a proxy of another name');
  for (const bad of ['nonce=xyz&host=' + new URL(base).host, 'nonce=' + 'a'.repeat(31) + '&host=' + new URL(base).host, 'nonce=' + nonce, 'nonce=' + nonce + '&host=' + new URL(base).host + '&x=1']) {
    const r = await call(base, `/api/hello?${bad}`);
    assert.ok(r.status === 400 || r.status === 403, `${bad}: ${r.status}`);
    assert.equal(r.json.proof, undefined);
  }
  // Two hellos with the same nonce get different server nonces, proofs and keys.
  const a = await call(base, `/api/hello?nonce=${nonce}&host=${new URL(base).host}`), b = await call(base, `/api/hello?nonce=${nonce}&host=${new URL(base).host}`);
  assert.notEqual(a.json.session, b.json.session);
  assert.notEqual(a.json.proof, b.json.proof);
  // The proof for one session is no key for it.
  assert.equal((await call(base, '/api/status', { Authorization: `DJS-Session ${a.json.session}.${a.json.proof}` })).status, 401);

  // Strangers' hellos (no token needed for them) cannot push out a session in use; they
  // push out each other's unused ones, so their number stays bounded.
  const first = await signIn(base, token);
  for (let i = 0; i < 100; i++) await call(base, `/api/hello?nonce=${crypto.randomBytes(16).toString('hex')}&host=${new URL(base).host}`);
  assert.equal((await call(base, '/api/status', session)).status, 200, 'a session in use survives');
  assert.equal((await call(base, '/api/status', first)).status, 401, 'an unused one was pushed out');

  // A session dies with its server; the token lives on (for API clients) until renewed.
  await s.stop();
  const s2 = await s.restart();
  t.after(() => s2.stop());
  const again = await dashboard(s2);
  assert.equal(again.token, token);
  assert.equal((await call(again.base, '/api/status', session)).status, 401, 'the old session is refused by the new server');
  assert.equal((await call(again.base, '/api/status', await signIn(again.base, token))).status, 200);
});

/** Opens GET /api/events and resolves once its first event came; `closed` resolves when the server ends it. */
function openEvents(base: string, headers: Record<string, string>): Promise<{ closed: Promise<void> }> {
  return new Promise((resolve, reject) => {
    const req = http.get(`${base}/api/events`, { headers }, (res) => {
      if (res.statusCode !== 200) return reject(new Error(`events: ${res.statusCode}`));
      const closed = new Promise<void>((r) => { res.on('close', r); res.on('end', r); res.on('error', () => r()); });
      res.once('data', () => resolve({ closed }));
      res.resume();
    });
    req.on('error', reject);
  });
}

test('dashboard --new-token: the old token, its sessions and its streams are refused at once; the new one works', async (t) => {
  const s = await serve(t, { args: ['--http', '0'] });
  const { base, token } = await dashboard(s);
  const bearer = { Authorization: `Bearer ${token}` }, session = await signIn(base, token);
  const streams = [await openEvents(base, bearer), await openEvents(base, session)];
  let ended = 0;
  for (const st of streams) void st.closed.then(() => { ended++; });

  const printed = (await s.ok(['dashboard', '--new-token'])).trim();
  const m = /^(http:\/\/127\.0\.0\.1:\d+)\/#token=([0-9a-f]{48})$/.exec(printed);
  assert.ok(m, `dashboard --new-token printed ${printed}`);
  const fresh = m[2];
  assert.notEqual(fresh, token);
  // At once: the command has returned, so these are refused.
  assert.equal((await call(base, '/api/status', bearer)).status, 401, 'the old token');
  assert.equal((await call(base, '/api/status', { 'X-DJS-Token': token })).status, 401, 'the old token, in X-DJS-Token');
  assert.equal((await call(base, '/api/status', session)).status, 401, 'a session of the old token');
  await until(() => ended === 2, 'the streams opened with the old token to be closed');
  assert.notEqual(await fetch(`${base}/?token=${token}`, { redirect: 'manual' }).then((r) => r.status), 303, 'the old link');
  // The new one works, for API clients and for the page; the file holds it, for the owner only.
  assert.equal((await call(base, '/api/status', { Authorization: `Bearer ${fresh}` })).status, 200);
  assert.equal((await call(base, '/api/status', await signIn(base, fresh))).status, 200);
  const file = path.join(s.dataDir, 'http.token');
  assert.equal(fs.readFileSync(file, 'utf8').trim(), fresh);
  assert.equal(fs.statSync(file).mode & 0o777, 0o600);
  assert.equal((await s.ok(['dashboard'])).trim(), printed);
  assert.deepEqual(fs.readdirSync(s.dataDir).filter((f) => f.startsWith('http.token.')), [], 'no temporary file left');

  // With no server running, it replaces the file, which the next start uses.
  await s.stop();
  const r = await s.cli(['dashboard', '--new-token']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^new access token in .*http\.token \(no server runs now; the next start --http uses it\)\n$/);
  const third = fs.readFileSync(file, 'utf8').trim();
  assert.match(third, /^[0-9a-f]{48}$/);
  assert.notEqual(third, fresh);
  const s2 = await s.restart();
  t.after(() => s2.stop());
  const after = await dashboard(s2);
  assert.equal(after.token, third);
  assert.equal((await call(after.base, '/api/status', { Authorization: `Bearer ${fresh}` })).status, 401);
  assert.equal((await call(after.base, '/api/status', { Authorization: `Bearer ${third}` })).status, 200);

  // A server without --http: the token file is replaced all the same.
  const plain = await serve(t);
  const out = await plain.ok(['dashboard', '--new-token']);
  assert.match(out, /serves no dashboard now/);
  assert.match(fs.readFileSync(path.join(plain.dataDir, 'http.token'), 'utf8'), /^[0-9a-f]{48}\n$/);
});
