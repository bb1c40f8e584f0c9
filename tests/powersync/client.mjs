// The real PowerSync Node.js client against walsync, driven by tests/powersync.rs.
// Usage: node client.mjs <endpoint> <token> <database file>
// Prints one JSON line {"state": {...}} whenever the synced tables change; reads commands
// "reconnect" and "exit" on stdin.
import { PowerSyncDatabase, Schema, Table, column } from '@powersync/node';
import * as path from 'node:path';
import * as readline from 'node:readline';

const [endpoint, token, dbPath] = process.argv.slice(2);

// The seed app's tables; columns beyond these are kept by the client but not compared.
const TABLES = {
  projects: ['name', 'description'],
  project_members: ['project_id', 'user_id', 'role'],
  stakeholders: ['user_id', 'name', 'title'],
  teams: ['project_id', 'name'],
  assessments: ['project_id', 'phase', 'tier'],
  assessment_responses: ['assessment_id', 'project_id', 'answer'],
  sow_section_approvals: ['project_id', 'section'],
};

const schema = new Schema(
  Object.fromEntries(
    Object.entries(TABLES).map(([name, cols]) => [
      name,
      new Table(Object.fromEntries(cols.map((c) => [c, column.text]))),
    ]),
  ),
);

const db = new PowerSyncDatabase({
  schema,
  database: { dbFilename: path.basename(dbPath), dbLocation: path.dirname(dbPath) },
});

const connector = {
  async fetchCredentials() {
    return { endpoint, token };
  },
  async uploadData() {},
};

function say(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

async function dump() {
  const out = {};
  for (const [name, cols] of Object.entries(TABLES)) {
    const rows = await db.getAll(`SELECT id, ${cols.join(', ')} FROM ${name} ORDER BY id`);
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
await db.connect(connector);

let last = '';
let stopping = false;
const rl = readline.createInterface({ input: process.stdin });
rl.on('line', async (line) => {
  try {
    if (line === 'reconnect') {
      await db.disconnect();
      await db.connect(connector);
      say({ reconnected: true });
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

while (!stopping) {
  const status = db.currentStatus;
  if (status.hasSynced) {
    const state = JSON.stringify({ state: await dump(), last_synced: String(status.lastSyncedAt) });
    const key = JSON.stringify(await dump());
    if (key !== last) {
      last = key;
      process.stdout.write(state + '\n');
    }
  }
  await new Promise((r) => setTimeout(r, 100));
}
