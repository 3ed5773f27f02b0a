// Tier 2: frictions of a first day, through the real client and server: pause of a tag
// no job has, and a worker added again.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { addJob, serve, untilState, writeScript } from './server.ts';

describe('first day: pause of unknown tags, workers added again', { concurrency: 2 }, () => {
  test('pause --tag of a tag no job has is refused (a typo); --ahead pauses it before its jobs; resume of an unknown tag is refused', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'ok.sh', 'exit 0');
    await s.ok(['add_slave', '--skip_ssh_auth_check', 'w1:2']);
    const done = await addJob(s, '--tag', 'real', './ok.sh');
    await untilState(s, done, 'done');
    const typo = await s.cli(['pause', '--tag', 'nosuchtag']);
    assert.equal(typo.code, 1);
    assert.match(typo.stderr, /^error: no job has the tag 'nosuchtag'\n/);
    assert.match(typo.stderr, /pause --tag nosuchtag --ahead/, 'the hint names the way to pause it ahead');
    assert.deepEqual((await s.status()).pausedTags, [], 'nothing was paused');
    const resume = await s.cli(['resume', '--tag', 'nosuchtag2']);
    assert.equal(resume.code, 1);
    assert.match(resume.stderr, /^error: no job has the tag 'nosuchtag2'\n/);
    assert.equal((await s.cli(['resume', '--ahead'])).code, 2, 'resume takes no --ahead');
    assert.equal((await s.cli(['pause', '--ahead'])).code, 2, '--ahead needs --tag');
    assert.match(await s.ok(['pause', '--tag', 'real']), /^paused tag real \(running jobs go on\)$/m, 'a tag whose jobs all ended is known');
    assert.equal(await s.ok(['pause', '--tag', 'nightly', '--ahead']), 'paused tag nightly: no job has tag nightly yet; jobs added with --tag nightly will wait (resume --tag nightly)\n');
    assert.match(await s.ok(['pause', '--tag', 'nightly']), /^already paused: tag nightly/, 'a tag paused ahead is known');
    const late = await addJob(s, '--tag', 'nightly', './ok.sh');
    const plain = await addJob(s, './ok.sh');
    await untilState(s, plain, 'done');
    assert.equal((await s.job(late)).state, 'waiting');
    assert.equal((await s.job(late)).waitingFor, 'tag nightly paused');
    await s.ok(['resume', '--tag', 'nightly']);
    await untilState(s, late, 'done');
  });

  test('a host added again says what changed, and warns when waiting GPU jobs no longer fit any worker', async (t) => {
    const s = await serve(t);
    writeScript(s.dir, 'ok.sh', 'exit 0');
    assert.equal(await s.ok(['add_slave', '--skip_ssh_auth_check', '--label', 'gpu', '--gpus', '2', 'node3:3']), 'added worker node3 with 3 slots and 2 GPUs, labels gpu\n');
    await s.ok(['pause']);
    await s.ok(['add_job', '--gpus', '1', '--require', 'gpu', './ok.sh', ':::', 'a', 'b']);
    const r = await s.cli(['add_slave', '--skip_ssh_auth_check', 'node3:3']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'added worker node3 with 3 slots\nnode3: labels gpu -> none, gpus 2 -> 0\n');
    assert.equal(r.stderr, 'warning: 2 waiting jobs no longer fit any worker (1 GPU, label gpu); they wait until one is added\n');
    const back = await s.cli(['add_slave', '--skip_ssh_auth_check', '--label', 'gpu', '--gpus', '2', 'node3:3']);
    assert.deepEqual([back.stdout, back.stderr], ['added worker node3 with 3 slots and 2 GPUs, labels gpu\nnode3: labels none -> gpu, gpus 0 -> 2\n', '']);
    await s.ok(['resume']);
    assert.equal((await s.cli(['wait'])).code, 0);
  });
});
