// The seed app in a browser: its local database is PowerSync's web SDK syncing from walsync's
// HTTP stream; edits are local writes, uploaded through walsync's POST /write; conflicts left for
// a person and rejected uploads arrive as ordinary synced rows; presence is walsync's.
//
// The page is opened as `/?user=<id>`; `/config.json` (served beside the page by `walsync demo
// --web` or by the end-to-end test) gives walsync's URL and a token for each user. A real app gets
// its token from its own login instead.
import {
  AbstractPowerSyncDatabase,
  PowerSyncDatabase,
  Schema,
  SyncStatus,
  Table,
  column,
} from '@powersync/web';
import { migrateFromDexie } from './migrate';

interface Config {
  endpoint: string;
  tokens: Record<string, string>;
}

const text = column.text;
const integer = column.integer;

// Responses keep the values an edit started from (`old` in their CRUD entries), so that walsync
// can tell an edit made on a stale answer (a conflict) from one made on the current answer.
export const schema = new Schema({
  projects: new Table({ name: text, description: text, organization_name: text }),
  project_members: new Table({ project_id: integer, user_id: text, role: text }),
  assessments: new Table({ project_id: integer, phase: text, tier: text }),
  assessment_responses: new Table(
    { assessment_id: integer, project_id: integer, question_id: text, question_text: text, answer: text },
    { trackPrevious: true },
  ),
  write_conflicts: new Table({
    table_name: text, row_id: text, column_name: text, client_value: text, server_value: text,
    scope: integer, user_id: text, resolution: text, created_at: text,
  }),
  rejected_writes: new Table({ client_id: text, code: text, message: text, ops: text, rejected_at: text }),
});

const params = new URLSearchParams(location.search);
const user = params.get('user') ?? 'ada';
const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

async function main() {
  const config: Config = await (await fetch('/config.json')).json();
  const endpoint = config.endpoint;
  const token = config.tokens[user];
  if (!token) throw new Error(`no token for ${user}`);
  $('who').textContent = user;

  const db = new PowerSyncDatabase({
    schema,
    // One tab syncs by itself (no shared worker), so that the app's own "work offline" switch
    // ends its stream.
    database: { dbFilename: `assessments-${user}.sqlite`, enableMultiTabs: false },
  });
  await db.init();
  (window as unknown as { db: AbstractPowerSyncDatabase }).db = db;

  // walsync takes the SDK's CRUD transactions as they are (README, "Writes").
  const connector = {
    async fetchCredentials() {
      return { endpoint, token };
    },
    async uploadData(db: AbstractPowerSyncDatabase) {
      for (let tx = await db.getNextCrudTransaction(); tx; tx = await db.getNextCrudTransaction()) {
        const res = await fetch(`${endpoint}/write`, {
          method: 'POST',
          headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
          body: JSON.stringify({
            client_id: await db.getClientId(),
            batch: [{ tx_id: tx.transactionId, ops: tx.crud.map((op) => op.toJSON()) }],
          }),
        });
        if (!res.ok) throw new Error(`upload refused for now: ${res.status}`); // the SDK retries
        const [result] = (await res.json()).results;
        if (result.status === 'retryable') throw new Error(result.message);
        // Applied, or rejected: a rejection is kept by walsync and syncs back (rejected_writes).
        await tx.complete();
      }
    },
  };

  // Records of the app's earlier, Dexie-based version upload once as new rows (src/migrate.ts).
  await migrateFromDexie(db, user);

  let online = params.get('offline') !== '1';
  const offline = $<HTMLButtonElement>('offline');
  const setOnline = async (on: boolean) => {
    online = on;
    offline.textContent = on ? 'Work offline' : 'Go online';
    if (on) await db.connect(connector);
    else await db.disconnect();
    await showStatus(db.currentStatus);
  };
  offline.onclick = () => setOnline(!online);

  const showStatus = async (s: SyncStatus) => {
    const pending = (await db.get<{ n: number }>('SELECT count(*) AS n FROM ps_crud')).n;
    const state = !online ? 'offline' : s.connected ? (s.dataFlowStatus.downloading ? 'syncing' : 'online') : 'connecting';
    const last = s.lastSyncedAt ? s.lastSyncedAt.toLocaleTimeString() : 'never';
    $('status').textContent = `${state} · ${pending} pending upload${pending === 1 ? '' : 's'} · last synced ${last}`;
    $('status').dataset.state = state;
    $('status').dataset.synced = online && s.connected && !s.dataFlowStatus.downloading && s.hasSynced ? 'yes' : 'no';
    $('status').dataset.pending = String(pending);
  };
  db.registerListener({ statusChanged: (s) => void showStatus(s) });
  db.onChange({ onChange: () => void showStatus(db.currentStatus) }, { tables: ['ps_crud'], rawTableNames: true });

  projects(db);
  await setOnline(online);
}

/** The project picker; choosing one shows its responses, conflicts and presence. */
function projects(db: AbstractPowerSyncDatabase) {
  const select = $<HTMLSelectElement>('project');
  let shown: string | null = null;
  let stop: (() => void) | null = null;
  const choose = (id: string | null) => {
    if (id === shown) return;
    shown = id;
    stop?.();
    stop = id ? showProject(db, id) : null;
    if (!id) $('responses').querySelector('tbody')!.replaceChildren();
  };
  select.onchange = () => choose(select.value);
  watch(db, 'SELECT id, name FROM projects ORDER BY name', [], (rows: { id: string; name: string }[]) => {
    const want = rows.some((r) => r.id === select.value) ? select.value : rows[0]?.id ?? null;
    select.replaceChildren(...rows.map((r) => new Option(r.name, r.id, false, r.id === want)));
    $('no-projects').hidden = rows.length > 0;
    choose(want);
  });
}

function showProject(db: AbstractPowerSyncDatabase, projectId: string): () => void {
  const stops: (() => void)[] = [];
  const room = `user_projects[${projectId}]`;
  const presence = new Presence(room);
  stops.push(() => presence.close());

  const description = $<HTMLInputElement>('description');
  description.onchange = () =>
    void db.execute('UPDATE projects SET description = ? WHERE id = ?', [description.value, projectId]);
  stops.push(
    watch(db, 'SELECT description FROM projects WHERE id = ?', [projectId], (rows: { description: string | null }[]) => {
      if (document.activeElement !== description) description.value = rows[0]?.description ?? '';
    }),
  );

  // The project's assessments, each with its responses under it.
  const body = $('responses').querySelector('tbody')!;
  body.replaceChildren();
  const inputs = new Map<string, HTMLInputElement>();
  const headers = new Map<string, HTMLTableRowElement>();
  type Row = {
    id: string; question_id: string; question_text: string | null; answer: string | null;
    assessment_id: string | null; phase: string | null; tier: string | null;
  };
  stops.push(
    watch(
      db,
      `SELECT r.id, r.question_id, r.question_text, r.answer, r.assessment_id, a.phase, a.tier
         FROM assessment_responses r LEFT JOIN assessments a ON a.id = r.assessment_id
        WHERE r.project_id = ? ORDER BY CAST(r.assessment_id AS INTEGER), CAST(r.id AS INTEGER)`,
      [projectId],
      (rows: Row[]) => {
        const order: HTMLTableRowElement[] = [];
        const seen = new Set<string>();
        const seenHeaders = new Set<string>();
        for (const r of rows) {
          const group = r.assessment_id ?? '';
          if (!seenHeaders.has(group)) {
            seenHeaders.add(group);
            let header = headers.get(group);
            if (!header) {
              header = document.createElement('tr');
              header.className = 'assessment';
              header.dataset.testid = `assessment-${group}`;
              headers.set(group, header);
            }
            header.innerHTML = '<th colspan="3"></th>';
            header.querySelector('th')!.textContent =
              `Assessment ${group}` + [r.phase, r.tier].filter(Boolean).map((t) => ` · ${t}`).join('');
            order.push(header);
          }
          seen.add(r.id);
          let input = inputs.get(r.id);
          if (!input) {
            const tr = document.createElement('tr');
            tr.dataset.id = r.id;
            const q = document.createElement('td');
            q.className = 'question';
            q.textContent = r.question_text ?? r.question_id;
            const a = document.createElement('td');
            input = document.createElement('input');
            input.dataset.testid = `answer-${r.id}`;
            const id = r.id;
            const field = input;
            field.onchange = () =>
              void db.execute('UPDATE assessment_responses SET answer = ? WHERE id = ?', [field.value, id]);
            field.onfocus = () => presence.update({ response_id: id, question_id: r.question_id, status: 'answering' });
            field.onblur = () => presence.update({ status: 'idle' });
            a.append(field);
            const who = document.createElement('td');
            who.className = 'who';
            who.dataset.testid = `here-${r.id}`;
            tr.append(q, a, who);
            inputs.set(r.id, field);
          }
          order.push(input.closest('tr')!);
          if (document.activeElement !== input) input.value = r.answer ?? '';
        }
        for (const [id, input] of inputs) {
          if (!seen.has(id)) {
            input.closest('tr')?.remove();
            inputs.delete(id);
          }
        }
        for (const [group, header] of headers) {
          if (!seenHeaders.has(group)) {
            header.remove();
            headers.delete(group);
          }
        }
        // Rows move only when the order changed (an assessment moved, a response came or
        // went), so that the field being typed in keeps its focus otherwise.
        const same = order.length === body.children.length && order.every((tr, i) => body.children[i] === tr);
        if (!same) body.replaceChildren(...order);
        presence.render();
      },
    ),
  );

  // Conflicts left for a person (the seed's manual strategy for answers): the two versions, and
  // a resolution that is an ordinary upload (the answer chosen, and the conflict marked).
  stops.push(
    watch(
      db,
      `SELECT c.id, c.row_id, c.user_id, c.client_value, c.server_value, r.answer,
              coalesce(r.question_text, r.question_id) AS question
         FROM write_conflicts c LEFT JOIN assessment_responses r ON r.id = c.row_id
        WHERE c.scope = ? AND c.resolution IS NULL AND c.table_name = 'assessment_responses' ORDER BY c.created_at`,
      [projectId],
      (rows: {
        id: string; row_id: string; user_id: string; client_value: string; server_value: string;
        answer: string; question: string | null;
      }[]) => {
        $('conflicts').replaceChildren(
          ...rows.map((c) => {
            const li = document.createElement('li');
            li.className = 'conflict';
            li.dataset.testid = `conflict-${c.row_id}`;
            const mine = c.user_id === user ? 'your version' : `${c.user_id}'s version`;
            li.innerHTML = `<div class="question"></div><div><b>${mine}:</b> <span class="client"></span></div>
              <div><b>server version:</b> <span class="server"></span></div>`;
            li.querySelector('.question')!.textContent = `Answer to ${c.question ?? c.row_id}`;
            li.querySelector('.client')!.textContent = c.client_value;
            li.querySelector('.server')!.textContent = c.answer ?? c.server_value;
            const resolve = (value: string, how: string) =>
              db.writeTransaction(async (tx) => {
                await tx.execute('UPDATE assessment_responses SET answer = ? WHERE id = ?', [value, c.row_id]);
                await tx.execute('UPDATE write_conflicts SET resolution = ? WHERE id = ?', [`${how} by ${user}`, c.id]);
              });
            const button = (label: string, testid: string, act: () => Promise<unknown>) => {
              const b = document.createElement('button');
              b.textContent = label;
              b.dataset.testid = testid;
              b.onclick = () => void act();
              li.append(b);
            };
            button(`Keep ${mine}`, 'keep-client', () => resolve(c.client_value, `kept ${mine}`));
            button('Keep server version', 'keep-server', () => resolve(c.answer ?? c.server_value, 'kept the server version'));
            button('Merge', 'merge', () => resolve(`${c.answer ?? c.server_value} / ${c.client_value}`, 'merged'));
            return li;
          }),
        );
      },
    ),
  );
  return () => stops.forEach((s) => s());
}

/** Rows of `sql`, now and after every change of the tables it reads. */
function watch<T>(db: AbstractPowerSyncDatabase, sql: string, args: unknown[], show: (rows: T[]) => void): () => void {
  const abort = new AbortController();
  db.watch(sql, args, { onResult: (r) => show((r.rows?._array ?? []) as T[]) }, { signal: abort.signal });
  return () => abort.abort();
}

/** Who else is in the project's room, over walsync's presence API (NDJSON over fetch). */
class Presence {
  private members = new Map<string, { user_id: string; client_id: string; state: Record<string, unknown> }>();
  private abort = new AbortController();
  private state: Record<string, unknown> = { status: 'idle' };
  private clientId = `${user}-${Math.random().toString(36).slice(2, 8)}`;
  private heartbeat: number;

  constructor(private room: string) {
    void this.post({ action: 'join', room, state: this.state });
    void this.follow();
    this.heartbeat = window.setInterval(() => void this.post({ action: 'heartbeat' }), 10_000);
    window.addEventListener('pagehide', () => this.close());
  }

  update(state: Record<string, unknown>) {
    this.state = state;
    void this.post({ action: 'update', room: this.room, state });
  }

  close() {
    window.clearInterval(this.heartbeat);
    this.abort.abort();
    void this.post({ action: 'leave', room: this.room });
  }

  private async post(action: Record<string, unknown>) {
    const { endpoint, token } = await credentials();
    await fetch(`${endpoint}/presence`, {
      method: 'POST',
      keepalive: true,
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body: JSON.stringify({ client_id: this.clientId, ...action }),
    }).catch(() => undefined);
  }

  private async follow() {
    const { endpoint, token } = await credentials();
    while (!this.abort.signal.aborted) {
      try {
        const res = await fetch(`${endpoint}/presence/stream?room=${encodeURIComponent(this.room)}`, {
          headers: { authorization: `Bearer ${token}` },
          signal: this.abort.signal,
        });
        if (!res.ok || !res.body) throw new Error(`presence: ${res.status}`);
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffered = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffered += value;
          let nl;
          while ((nl = buffered.indexOf('\n')) >= 0) {
            const line = buffered.slice(0, nl).trim();
            buffered = buffered.slice(nl + 1);
            if (line) this.event(JSON.parse(line));
          }
        }
      } catch {
        // Offline or refused: try again shortly.
      }
      if (!this.abort.signal.aborted) await new Promise((r) => setTimeout(r, 1000));
    }
  }

  private event(e: { type: string; members?: any[]; member?: any; user_id?: string; client_id?: string }) {
    const key = (m: { user_id: string; client_id: string }) => `${m.user_id}/${m.client_id}`;
    if (e.type === 'members') {
      this.members = new Map(e.members!.map((m) => [key(m), m]));
    } else if (e.type === 'join' || e.type === 'update') {
      this.members.set(key(e.member), e.member);
    } else if (e.type === 'leave') {
      this.members.delete(key(e as { user_id: string; client_id: string }));
    } else if (e.type === 'closed') {
      this.members.clear();
    }
    this.render();
  }

  render() {
    const others = [...this.members.values()].filter((m) => m.client_id !== this.clientId);
    $('presence').replaceChildren(
      ...others.map((m) => {
        const li = document.createElement('li');
        li.dataset.testid = `member-${m.user_id}`;
        const on = m.state?.question_id ? ` on ${m.state.question_id}` : '';
        li.textContent = `${m.user_id}${on} (${m.state?.status ?? 'here'})`;
        return li;
      }),
    );
    document.querySelectorAll<HTMLElement>('td.who').forEach((td) => (td.textContent = ''));
    for (const m of others) {
      const id = m.state?.response_id;
      const td = id ? document.querySelector<HTMLElement>(`[data-testid="here-${id}"]`) : null;
      if (td) td.textContent = `${m.user_id} ${m.state.status ?? ''}`;
    }
  }
}

let configured: Promise<{ endpoint: string; token: string }> | null = null;
function credentials() {
  configured ??= fetch('/config.json')
    .then((r) => r.json())
    .then((c: Config) => ({ endpoint: c.endpoint, token: c.tokens[user] }));
  return configured;
}

/** Rejected uploads of this user, from walsync's dead letters (synced through the `me` bucket). */
function rejected(db: AbstractPowerSyncDatabase) {
  watch(db, 'SELECT id, code, message, ops, rejected_at FROM rejected_writes ORDER BY rejected_at DESC', [], (rows: any[]) => {
    $('rejected').replaceChildren(
      ...rows.map((r) => {
        const li = document.createElement('li');
        li.className = 'rejected';
        li.dataset.testid = `rejected-${r.id}`;
        li.dataset.code = r.code;
        let what = '';
        try {
          what = JSON.parse(r.ops)
            .map((op: any) => `${op.op} ${op.type} ${op.id}`)
            .join(', ');
        } catch {
          what = '';
        }
        li.textContent = `${what}: ${r.message} (${r.code})`;
        return li;
      }),
    );
  });
}

main()
  .then(() => rejected((window as unknown as { db: AbstractPowerSyncDatabase }).db))
  .catch((e) => {
    $('status').textContent = `error: ${e}`;
    console.error(e);
  });
