// Moving an existing install of the seed app (Dexie over IndexedDB, auto-increment ids) onto
// walsync, once.
//
// The old app kept its answers in the IndexedDB database `assessment-app`, object store
// `assessmentResponses` ({id (auto-increment), assessmentId, projectId, questionId, answer, …}).
// Its ids are only unique on that device, so each record becomes a new row with an id of its own
// (a random integer far above any server sequence), written to the local database together with
// the record of what was migrated, in one local transaction: interrupted, nothing was written and
// the next start does it again; committed, the next start skips those records. The upload is the
// SDK's own queue: walsync applies each client transaction once however often it is retried
// (idempotent by client id and transaction id), so an interrupted upload makes no duplicate
// either.
import { AbstractPowerSyncDatabase } from '@powersync/web';

const LEGACY_DB = 'assessment-app';
const LEGACY_STORE = 'assessmentResponses';

interface LegacyResponse {
  id: number;
  assessmentId: number;
  projectId: number;
  questionId: string;
  questionText?: string;
  answer?: string;
}

/** The old app's records, or none when it never ran in this browser. */
async function legacyResponses(): Promise<LegacyResponse[]> {
  const known = (await indexedDB.databases?.()) ?? [];
  if (!known.some((d) => d.name === LEGACY_DB)) return [];
  return new Promise((resolve, reject) => {
    const open = indexedDB.open(LEGACY_DB);
    open.onerror = () => reject(open.error);
    open.onsuccess = () => {
      const idb = open.result;
      if (!idb.objectStoreNames.contains(LEGACY_STORE)) {
        idb.close();
        return resolve([]);
      }
      const all = idb.transaction(LEGACY_STORE).objectStore(LEGACY_STORE).getAll();
      all.onsuccess = () => {
        idb.close();
        resolve(all.result as LegacyResponse[]);
      };
      all.onerror = () => reject(all.error);
    };
  });
}

/** A new row id: 2^50 and above, where the server's sequences never reach. */
function newId(): number {
  return 2 ** 50 + Math.floor(Math.random() * 2 ** 52);
}

export async function migrateFromDexie(db: AbstractPowerSyncDatabase, user: string) {
  const records = await legacyResponses();
  if (records.length === 0) return;
  // What was migrated is kept in the local database itself (a local-only table), so that it is
  // committed with the rows or not at all.
  await db.execute(
    'CREATE TABLE IF NOT EXISTS dexie_migrated (legacy_id INTEGER PRIMARY KEY, row_id INTEGER NOT NULL, migrated_by TEXT)',
  );
  const done = new Set(
    (await db.getAll<{ legacy_id: number }>('SELECT legacy_id FROM dexie_migrated')).map((r) => r.legacy_id),
  );
  const todo = records.filter((r) => !done.has(r.id));
  if (todo.length === 0) return;
  await db.writeTransaction(async (tx) => {
    for (const r of todo) {
      const id = newId();
      await tx.execute(
        `INSERT INTO assessment_responses (id, assessment_id, project_id, question_id, question_text, answer)
         VALUES (?, ?, ?, ?, ?, ?)`,
        [String(id), r.assessmentId, r.projectId, r.questionId, r.questionText ?? null, r.answer ?? null],
      );
      await tx.execute('INSERT INTO dexie_migrated (legacy_id, row_id, migrated_by) VALUES (?, ?, ?)', [r.id, id, user]);
    }
  });
  console.info(`migrated ${todo.length} answers from the earlier app`);
}
