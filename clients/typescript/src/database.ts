// The local database (Dexie over IndexedDB). One database per identity and device:
//   deeprecall_guest_<deviceId>          while a guest (the seed's plan: nothing in it has an owner)
//   deeprecall_<userId>_<deviceId>       signed in
// Tables:
//   <synced table> (works, annotations, …)  key `id`; written ONLY by the stream applier (applier.ts)
//   deeprecall_outbox                       pending writes in order (outbox.ts); a guest's writes wait here unsent
//   deeprecall_local                        each row with pending writes, as the app should see it (overlay.ts)
//   deeprecall_state                        subscription offsets and the outbox's sequence (client id, seqs; sequence.ts)

import { Dexie, type Table } from 'dexie';
import { localEntry } from './overlay.js';
import type { StoredSequence } from './sequence.js';
import type { OpKind, Row, SyncedRow } from './types.js';

/** The eight synced tables of schema version 1 (sql/0001_schema.sql). */
export const DEFAULT_TABLES = [
  'works',
  'blobs_meta',
  'device_blobs',
  'assets',
  'annotations',
  'activities',
  'boards',
  'strokes',
] as const;

export const OUTBOX = 'deeprecall_outbox';
export const LOCAL = 'deeprecall_local';
export const STATE = 'deeprecall_state';
const RESERVED = new Set([OUTBOX, LOCAL, STATE]);

/** An op in the outbox. */
export interface OutboxRecord {
  /**
   * Position in the outbox: strictly increasing per outbox (never reused), the send order. The seq sent to the
   * server is derived from it (sequence.ts, `wireSeq`) and never changes either.
   */
  seq: number;
  /** Generated when the op was queued; sent unchanged on every retry (the server still requires op ids). */
  opId: string;
  table: string;
  rowId: string;
  kind: OpKind;
  row: Row;
  /** `pending`: not yet committed by the server. `acked`: committed in `txid`, waiting for its echo. */
  status: 'pending' | 'acked';
  txid?: string;
  /** When the server's answer arrived (ms), for acked ops. */
  ackedAt?: number;
  /** The `client_id` of the batch whose answer settled the op (absent: settled by op_id alone). */
  ackedBy?: string;
  /**
   * A no-op holding the seq of an op the server refused (sequence.ts, `fillerOp`): sent like any op, never shown
   * to the app, never laid over a row.
   */
  filler?: true;
  createdAt: number;
}

/** A row with pending writes as the app should see it; `row: null` hides the synced row. */
export interface LocalRecord {
  table: string;
  id: string;
  row: Row | null;
}

/** deeprecall_state rows. */
export type StateRecord =
  | StoredSequence
  | { key: `sub:${string}`; offset: string | null }
  | { key: 'identity'; deviceId: string; userId: string | null }
  | { key: 'upgrade'; userId: string; startedAt: number }
  /** A guest database whose work an upgrade has sent to `userId`, about to be deleted: takes no more writes. */
  | { key: 'sealed'; userId: string; sealedAt: number };

export function guestDbName(deviceId: string): string {
  return `deeprecall_guest_${deviceId}`;
}

export function userDbName(userId: string, deviceId: string): string {
  return `deeprecall_${userId}_${deviceId}`;
}

/** A Dexie database with typed access to the client's own tables. */
export class SyncDatabase extends Dexie {
  readonly outbox: Table<OutboxRecord, number>;
  readonly local: Table<LocalRecord, [string, string]>;
  readonly state: Table<StateRecord, string>;
  readonly syncedTables: readonly string[];

  constructor(name: string, tables: readonly string[], options?: { indexedDB?: IDBFactory; IDBKeyRange?: typeof IDBKeyRange }) {
    super(name, options);
    for (const t of tables) {
      if (RESERVED.has(t)) throw new TypeError(`table name ${t} is reserved by the sync client`);
    }
    const schema: Record<string, string> = {
      [OUTBOX]: 'seq, &opId, [table+rowId], txid, [status+seq]',
      [LOCAL]: '[table+id], table',
      [STATE]: 'key',
    };
    for (const t of tables) schema[t] = 'id';
    // Dexie 4 upgrades a schema that differs from the installed one without a version bump (tables added to
    // `tables` later simply appear), so one version number is enough.
    this.version(1).stores(schema);
    this.outbox = this.table(OUTBOX);
    this.local = this.table(LOCAL);
    this.state = this.table(STATE);
    this.syncedTables = [...tables];
  }

  /** A synced table (read it freely; only the applier writes it). */
  synced(table: string): Table<SyncedRow, string> {
    return this.table(table);
  }
}

/**
 * Recomputes the app's view of the given rows from the synced row and the ops still in the outbox. Call inside a
 * transaction that covers the outbox, the local table and the rows' synced tables.
 */
export async function recomputeLocal(db: SyncDatabase, keys: Iterable<readonly [string, string]>): Promise<void> {
  const done = new Set<string>();
  for (const [table, id] of keys) {
    const k = `${table}\u0000${id}`;
    if (done.has(k)) continue;
    done.add(k);
    const synced = db.syncedTables.includes(table) ? await db.synced(table).get(id) : undefined;
    const ops = (await db.outbox.where('[table+rowId]').equals([table, id]).sortBy('seq')).filter((o) => !o.filler);
    const entry = localEntry(synced, ops);
    if (entry) await db.local.put({ table, id, row: entry.row });
    else await db.local.delete([table, id]);
  }
}
