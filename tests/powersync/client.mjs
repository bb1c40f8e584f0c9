// The real PowerSync Node.js client against walsync, driven by tests/powersync.rs.
// Usage: node client.mjs <endpoint> <token> <database file>
// Prints one JSON line {"state": {...}} whenever the synced tables change; reads commands on
// stdin: "disconnect", "connect", "reconnect", "exec {sql, params}" (a local write, uploaded by
// uploadData), "subscribe {stream, params, priority, ttl}" and "unsubscribe {stream, params}"
// (Sync Streams), "streams" (the SDK's view of them), "internals" and "exit".
import { PowerSyncDatabase, Schema, SyncStreamConnectionMethod, Table, column } from '@powersync/node';
import * as path from 'node:path';
import * as readline from 'node:readline';

const [endpoint, token, dbPath] = process.argv.slice(2);
// WALSYNC_PS_TRANSPORT=websocket: RSocket over a WebSocket, as React Native connects; else HTTP.
const connectOptions = {
  connectionMethod: process.env.WALSYNC_PS_TRANSPORT === 'websocket'
    ? SyncStreamConnectionMethod.WEB_SOCKET
    : SyncStreamConnectionMethod.HTTP,
};

// The seed app's tables; columns beyond these are kept by the client but not compared.
const TABLES = {
  projects: ['name', 'description'],
  project_members: ['project_id', 'user_id', 'role'],
  stakeholders: ['user_id', 'name', 'title'],
  teams: ['project_id', 'name'],
  assessments: ['project_id', 'phase', 'tier'],
  assessment_responses: ['assessment_id', 'project_id', 'answer'],
  sow_section_approvals: ['project_id', 'section'],
  write_conflicts: ['table_name', 'row_id', 'column_name', 'client_value', 'server_value', 'scope', 'resolution'],
  rejected_writes: ['client_id', 'tx_key', 'code', 'message', 'op_id'],
};

// Responses keep the values an edit started from (`old` in their CRUD entries), so that
// walsync can tell a conflicting edit.
const TRACK_PREVIOUS = new Set(['assessment_responses']);

const schema = new Schema(
  Object.fromEntries(
    Object.entries(TABLES).map(([name, cols]) => [
      name,
      new Table(Object.fromEntries(cols.map((c) => [c, column.text])), {
        trackPrevious: TRACK_PREVIOUS.has(name),
      }),
    ]),
  ),
);

// The SDK's own log goes to stderr (stdout carries this script's JSON lines): warnings and
// errors, or with WALSYNC_PS_LOG=10 (trace) or 20 (debug) what it did with each line received.
const logLevel = Number(process.env.WALSYNC_PS_LOG ?? 40);
const logger = {
  minLevel: logLevel,
  log(r) {
    if (r.level >= logLevel) {
      process.stderr.write(`powersync[${r.level}] ${new Date().toISOString()} ${r.message}${r.error ? ' ' + r.error : ''}\n`);
    }
  },
};

const db = new PowerSyncDatabase({
  schema,
  database: { dbFilename: path.basename(dbPath), dbLocation: path.dirname(dbPath) },
  logger,
});

// The upload callback of README.md's "Writes" section: each CRUD transaction as it is.
const connector = {
  async fetchCredentials() {
    return { endpoint, token };
  },
  async uploadData(db) {
    for (let tx = await db.getNextCrudTransaction(); tx; tx = await db.getNextCrudTransaction()) {
      const res = await fetch(`${endpoint}/write`, {
        method: 'POST',
        headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
        body: JSON.stringify({ client_id: await db.getClientId(),
                               batch: [{ tx_id: tx.transactionId, ops: tx.crud.map((op) => op.toJSON()) }] }),
      });
      const [result] = (await res.json()).results;
      if (result.status === 'retryable') throw new Error(result.message); // the SDK retries later
      say({ uploaded: result });
      await tx.complete(); // applied, or rejected and kept in walsync.rejected_writes
    }
  },
};

function say(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

async function dump(ctx = db) {
  const out = {};
  for (const [name, cols] of Object.entries(TABLES)) {
    const rows = await ctx.getAll(`SELECT id, ${cols.join(', ')} FROM ${name} ORDER BY id`);
    out[name] = Object.fromEntries(rows.map((r) => [r.id, Object.fromEntries(cols.map((c) => [c, r[c] ?? null]))]));
  }
  return out;
}

await db.init();
db.registerListener({
  statusChanged: (s) => {
    if (s.dataFlowStatus?.downloadError) say({ error: String(s.dataFlowStatus.downloadError) });
  },
});
await db.connect(connector, connectOptions);

const subscriptions = new Map();
let last = '';
let stopping = false;
const rl = readline.createInterface({ input: process.stdin });
rl.on('line', async (line) => {
  try {
    if (line === 'disconnect') {
      await db.disconnect();
      say({ disconnected: true });
    } else if (line === 'connect') {
      await db.connect(connector, connectOptions);
      say({ connected: true });
    } else if (line === 'reconnect') {
      await db.disconnect();
      await db.connect(connector, connectOptions);
      say({ reconnected: true });
    } else if (line.startsWith('subscribe ')) {
      // A Sync Streams subscription: {stream, params, priority, ttl}; kept until unsubscribed.
      const { stream, params, priority, ttl } = JSON.parse(line.slice(10));
      const sub = await db.syncStream(stream, params ?? undefined).subscribe({ priority, ttl });
      subscriptions.set(JSON.stringify([stream, params ?? null]), sub);
      say({ subscribed: stream, params: params ?? null });
      sub.waitForFirstSync().then(() => say({ first_sync: stream, params: params ?? null }));
    } else if (line.startsWith('unsubscribe ')) {
      const { stream, params } = JSON.parse(line.slice(12));
      const key = JSON.stringify([stream, params ?? null]);
      subscriptions.get(key)?.unsubscribe();
      subscriptions.delete(key);
      say({ unsubscribed: stream, params: params ?? null });
    } else if (line === 'streams') {
      // What the SDK knows of its streams (from the service's checkpoint lines).
      const streams = (db.currentStatus.syncStreams ?? []).map((s) => ({
        name: s.subscription.name,
        parameters: s.subscription.parameters,
        active: s.subscription.active,
        is_default: s.subscription.isDefault,
        explicit: s.subscription.hasExplicitSubscription,
        synced: s.subscription.hasSynced,
      }));
      say({ streams });
    } else if (line.startsWith('exec ')) {
      // A local write, as the app makes it: uploaded by uploadData.
      const { sql, params } = JSON.parse(line.slice(5));
      await db.execute(sql, params);
    } else if (line === 'internals') {
      // The SDK's own bookkeeping, printed when the test gives up: what it received and applied.
      const tables = await db.getAll("SELECT name FROM sqlite_master WHERE name LIKE 'ps_%' AND type = 'table'");
      const out = {};
      for (const { name } of tables) {
        if (name.startsWith('ps_data')) continue;
        out[name] = await db.getAll(`SELECT * FROM ${name} LIMIT 400`);
      }
      out.projects = await db.getAll('SELECT * FROM projects');
      say({ internals: out });
    } else if (line === 'exit') {
      stopping = true;
      await db.disconnectAndClear();
      await db.close();
      process.exit(0);
    }
  } catch (e) {
    say({ error: String(e) });
  }
});

// One read per round, printed when it differs from the last printed. (Reading twice, printing the
// first and remembering the second lost a change applied between the two reads for good.)
while (!stopping) {
  if (db.currentStatus.hasSynced) {
    const tables = await dump();
    const key = JSON.stringify(tables);
    if (key !== last) {
      last = key;
      say({ state: tables, last_synced: String(db.currentStatus.lastSyncedAt) });
    }
  }
  await new Promise((r) => setTimeout(r, 100));
}
