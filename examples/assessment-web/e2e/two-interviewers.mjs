// Two interviewers of one project in headless Chromium, driven by tests/web.rs (which starts
// PostgreSQL, walsync and the app's files, and answers this script's questions about PostgreSQL).
//
// Environment: APP (the app's URL), CHROMIUM (the browser), SHOTS (a folder for screenshots),
// OWNER and VIEWER (the two users: the project's owner, and a member who may answer but not edit
// the project), PROJECT (their project's id), ASSESSMENT (one of its assessments).
// Talks JSON lines: prints {"ask": ...} and reads one answer line ({"ok": true} or {"error": ...});
// prints {"step": name, "ms": ...} for each step passed, and {"done": true} at the end.
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';

const { APP, CHROMIUM, SHOTS, OWNER, VIEWER, PROJECT, ASSESSMENT } = process.env;
fs.mkdirSync(SHOTS, { recursive: true });
const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const say = (o) => process.stdout.write(JSON.stringify(o) + '\n');

/** Asks the test to do or check something in PostgreSQL; fails the script if it could not. */
async function ask(question) {
  say({ ask: question });
  const { value } = await lines.next();
  const answer = JSON.parse(value);
  if (answer.error) throw new Error(`${question.what}: ${answer.error}`);
  return answer;
}

/** Polls `check` until it holds (30 s at most); returns how long that took. */
async function until(what, check, ms = 30_000) {
  const start = Date.now();
  let last;
  while (Date.now() - start < ms) {
    try {
      if (await check()) return Date.now() - start;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${what}: not within ${ms} ms${last ? ` (${last})` : ''}`);
}

let shot = 0;
async function step(name, pages, body) {
  const start = Date.now();
  await body();
  for (const [who, page] of Object.entries(pages)) {
    shot += 1;
    await page.screenshot({ path: path.join(SHOTS, `${String(shot).padStart(2, '0')}-${name}-${who}.png`), fullPage: true });
  }
  say({ step: name, ms: Date.now() - start });
}

const browsers = [];
async function open(user, query = '') {
  const dir = fs.mkdtempSync(path.join(SHOTS, `profile-${user}-`));
  const context = await chromium.launchPersistentContext(dir, {
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-quic',
           '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1280, height: 900 },
  });
  browsers.push(context);
  const page = context.pages()[0] ?? (await context.newPage());
  page.on('pageerror', (e) => process.stderr.write(`${user} page error: ${e.message}\n`));
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().includes('404')) process.stderr.write(`${user} console: ${m.text()}\n`);
  });
  return { context, page, user, query };
}

const status = (p) => p.page.getAttribute('[data-testid=status]', 'data-state');
const pending = async (p) => Number(await p.page.getAttribute('[data-testid=status]', 'data-pending'));
const answer = (p, id) => p.page.inputValue(`[data-testid=answer-${id}]`);
async function choose(p) {
  await until(`${p.user} sees project ${PROJECT}`, async () =>
    (await p.page.locator(`[data-testid=project] option[value="${PROJECT}"]`).count()) === 1);
  await p.page.selectOption('[data-testid=project]', PROJECT);
}
async function type(p, id, value) {
  await p.page.fill(`[data-testid=answer-${id}]`, value);
  await p.page.press(`[data-testid=answer-${id}]`, 'Tab');
}

try {
  const owner = await open(OWNER);
  const viewer = await open(VIEWER);

  // The viewer's browser held answers of the app's earlier, Dexie-based version: they are
  // uploaded once as new rows when the app first starts.
  await viewer.page.goto(`${APP}/config.json`);
  await viewer.page.evaluate(async ({ project, assessment }) => {
    await new Promise((resolve, reject) => {
      const open = indexedDB.open('assessment-app', 3);
      open.onupgradeneeded = () => open.result.createObjectStore('assessmentResponses', { keyPath: 'id', autoIncrement: true });
      open.onsuccess = () => {
        const tx = open.result.transaction('assessmentResponses', 'readwrite');
        for (let i = 1; i <= 3; i++) {
          tx.objectStore('assessmentResponses').add({
            assessmentId: Number(assessment), projectId: Number(project), questionId: `legacy-${i}`,
            questionText: `Legacy question ${i}`, answer: `typed before walsync ${i}`,
          });
        }
        tx.oncomplete = () => { open.result.close(); resolve(); };
        tx.onerror = () => reject(tx.error);
      };
      open.onerror = () => reject(open.error);
    });
  }, { project: PROJECT, assessment: ASSESSMENT });

  const sent = async () => Number((await ask({ what: 'bytes walsync sent', metric: 'walsync_sync_bytes_sent_total' })).value);
  const before = await sent();
  for (const p of [owner, viewer]) {
    await p.page.goto(`${APP}/?user=${p.user}`);
  }
  let initial;
  await step('both-online', { owner: owner.page, viewer: viewer.page }, async () => {
    for (const p of [owner, viewer]) {
      await until(`${p.user} online`, async () => (await status(p)) === 'online');
      await choose(p);
    }
    initial = (await sent()) - before;
    // The project's assessments head their responses.
    const groups = await ask({ what: 'assessments with responses', sql: `SELECT count(DISTINCT assessment_id)::text FROM assessment_responses WHERE project_id = ${PROJECT}` });
    for (const p of [owner, viewer]) {
      await until(`${p.user} shows the project's assessments`, async () =>
        String(await p.page.locator('tr.assessment').count()) === groups.value);
    }
  });

  await step('dexie-records-migrated-once', { viewer: viewer.page }, async () => {
    await until('the viewer uploaded the earlier records', async () => (await pending(viewer)) === 0);
    await ask({ what: 'legacy rows', sql: "SELECT count(*)::text FROM assessment_responses WHERE question_id LIKE 'legacy-%'", want: '3' });
    // A restart (the same profile) migrates nothing again.
    await viewer.page.reload();
    await until('the viewer online again', async () => (await status(viewer)) === 'online');
    await choose(viewer);
    await until('the viewer has nothing to upload', async () => (await pending(viewer)) === 0);
    await ask({ what: 'legacy rows after a restart', sql: "SELECT count(*)::text FROM assessment_responses WHERE question_id LIKE 'legacy-%'", want: '3' });
  });

  const { value: id } = await ask({ what: 'a response', sql: `SELECT min(id)::text FROM assessment_responses WHERE project_id = ${PROJECT}` });

  await step('typed-in-one-shown-in-the-other', { owner: owner.page, viewer: viewer.page }, async () => {
    await until('the owner sees the response', async () => (await owner.page.locator(`[data-testid=answer-${id}]`).count()) === 1);
    const typed = Date.now();
    await type(owner, id, 'live answer from the owner');
    await until('the viewer sees the owner\'s answer', async () => (await answer(viewer, id)) === 'live answer from the owner');
    say({ measured: 'typed to shown in the other browser', ms: Date.now() - typed });
  });

  await step('presence', { owner: owner.page }, async () => {
    await viewer.page.focus(`[data-testid=answer-${id}]`);
    await until('the owner sees the viewer here', async () =>
      (await owner.page.locator(`[data-testid=member-${VIEWER}]`).count()) === 1);
    await until('the owner sees where the viewer is', async () =>
      ((await owner.page.textContent(`[data-testid=here-${id}]`)) ?? '').includes(VIEWER));
    await viewer.page.locator('body').click({ position: { x: 5, y: 300 } });
  });

  await step('offline-edits-meet-a-manual-conflict', { owner: owner.page, viewer: viewer.page }, async () => {
    await viewer.page.click('[data-testid=offline]');
    await until('the viewer offline', async () => (await status(viewer)) === 'offline');
    await type(viewer, id, 'offline answer from the viewer');
    await type(owner, id, 'answer from the owner');
    await until('the owner uploaded', async () => (await pending(owner)) === 0);
    await ask({ what: "the owner's answer", sql: `SELECT answer FROM assessment_responses WHERE id = ${id}`, want: 'answer from the owner' });
    await viewer.page.click('[data-testid=offline]');
    for (const p of [owner, viewer]) {
      await until(`${p.user} sees the conflict`, async () =>
        (await p.page.locator(`[data-testid=conflict-${id}]`).count()) === 1);
    }
    // Answers are decided by a person (the seed's manual strategy): the server keeps the
    // owner's answer meanwhile.
    await ask({ what: 'the answer while undecided', sql: `SELECT answer FROM assessment_responses WHERE id = ${id}`, want: 'answer from the owner' });
  });

  await step('conflict-resolved-from-the-ui', { owner: owner.page, viewer: viewer.page }, async () => {
    await owner.page.click(`[data-testid=conflict-${id}] [data-testid=merge]`);
    const merged = 'answer from the owner / offline answer from the viewer';
    for (const p of [owner, viewer]) {
      await until(`${p.user} sees the conflict resolved`, async () =>
        (await p.page.locator(`[data-testid=conflict-${id}]`).count()) === 0 && (await answer(p, id)) === merged);
    }
    await ask({ what: 'the merged answer', sql: `SELECT answer FROM assessment_responses WHERE id = ${id}`, want: merged });
    await ask({ what: 'the resolution', sql: `SELECT resolution FROM write_conflicts WHERE row_id = '${id}'`, want: `merged by ${OWNER}` });
  });

  await step('a-denied-edit-shows-as-rejected', { viewer: viewer.page }, async () => {
    await viewer.page.fill('[data-testid=description]', 'renamed by a viewer');
    await viewer.page.press('[data-testid=description]', 'Tab');
    await until('the viewer sees the rejection', async () =>
      (await viewer.page.locator('#rejected li[data-code]').count()) >= 1);
    await ask({ what: 'the description', sql: `SELECT coalesce(description, '') FROM projects WHERE id = ${PROJECT}`, want: '' });
  });

  await step('a-reload-keeps-local-data', { viewer: viewer.page }, async () => {
    // Opened offline, from its local database alone.
    await viewer.page.goto(`${APP}/?user=${VIEWER}&offline=1`);
    await until('the viewer offline', async () => (await status(viewer)) === 'offline');
    await choose(viewer);
    await until('the viewer shows the merged answer offline', async () =>
      (await answer(viewer, id)) === 'answer from the owner / offline answer from the viewer');
    // Back online it resumes from what it holds: walsync sends a checkpoint, not the data again
    // (the first download of both interviewers' data is the yardstick).
    const resumed = await sent();
    await viewer.page.click('[data-testid=offline]');
    await until('the viewer online', async () => (await status(viewer)) === 'online');
    await until('the viewer synced', async () => (await viewer.page.getAttribute('[data-testid=status]', 'data-synced')) === 'yes');
    const again = (await sent()) - resumed;
    say({ measured: 'bytes sent to resume, against both first downloads', resume: again, first: initial });
    if (!(again * 4 < initial)) throw new Error(`resuming sent ${again} bytes; both first downloads took ${initial}`);
  });

  await step('removed-from-the-project', { owner: owner.page, viewer: viewer.page }, async () => {
    await viewer.page.focus(`[data-testid=answer-${id}]`);
    await until('the owner sees the viewer here', async () =>
      (await owner.page.locator(`[data-testid=member-${VIEWER}]`).count()) === 1);
    await ask({ what: 'remove the viewer', sql: `DELETE FROM project_members WHERE project_id = ${PROJECT} AND user_id = '${VIEWER}' RETURNING 'ok'`, want: 'ok' });
    await until('the project vanishes from the viewer\'s screen', async () =>
      (await viewer.page.locator(`[data-testid=project] option[value="${PROJECT}"]`).count()) === 0 &&
      (await viewer.page.locator(`[data-testid=answer-${id}]`).count()) === 0);
    await until('the viewer leaves the owner\'s presence', async () =>
      (await owner.page.locator(`[data-testid=member-${VIEWER}]`).count()) === 0);
  });
  say({ done: true });
} catch (e) {
  say({ failed: String(e?.stack ?? e) });
  process.exitCode = 1;
} finally {
  for (const b of browsers) await b.close().catch(() => {});
  process.exit();
}
