// The real PowerSync Node.js client downloading a user's buckets from walsync, timed from
// connect() to its first complete sync (every checksum verified and the rows in SQLite).
// Usage: node download.mjs <endpoint> <token> <database file> <ndjson|bson|websocket>
// Prints {"ms": ..., "rows": ..., "encoding": the response's content type, or "rsocket"}.
import { PowerSyncDatabase, Schema, SyncStreamConnectionMethod, Table, column } from '@powersync/node';
import * as path from 'node:path';

const [endpoint, token, dbPath, mode] = process.argv.slice(2);

const schema = new Schema({
  projects: new Table({ description: column.text }),
  items: new Table({ project_id: column.integer, body: column.text }),
});

// The SDK asks for BSON (`Accept: bson;q=0.9, ndjson;q=0.8`); `ndjson` asks for NDJSON only.
// The sync stream's response type is reported, so the benchmark knows what it measured.
let encoding = mode === 'websocket' ? 'rsocket' : null;
const remoteOptions = {
  customFetch: async (url, init) => {
    const headers = new Headers(init?.headers);
    if (mode === 'ndjson' && headers.has('accept')) headers.set('accept', 'application/x-ndjson');
    const res = await fetch(url, { ...init, headers });
    if (String(url).endsWith('/sync/stream')) encoding = res.headers.get('content-type');
    return res;
  },
};

const db = new PowerSyncDatabase({
  schema,
  database: { dbFilename: path.basename(dbPath), dbLocation: path.dirname(dbPath) },
  remoteOptions,
});
await db.init();
const started = performance.now();
await db.connect(
  { fetchCredentials: async () => ({ endpoint, token }), uploadData: async () => {} },
  {
    connectionMethod: mode === 'websocket'
      ? SyncStreamConnectionMethod.WEB_SOCKET
      : SyncStreamConnectionMethod.HTTP,
  },
);
await db.waitForFirstSync();
const ms = performance.now() - started;
const { n } = await db.get('SELECT count(*) AS n FROM items');
process.stdout.write(JSON.stringify({ ms, rows: n, encoding }) + '\n');
await db.disconnectAndClear();
await db.close();
process.exit(0);
