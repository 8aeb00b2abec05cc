// The stream applier: the ONLY writer of the synced tables. Each server message is applied in one Dexie
// transaction together with what depends on it, so a reload (or crash) resumes exactly:
//
//   snapshot      rows upserted; ids remembered (first frame after subscribe / must_refetch starts a replacement)
//   up_to_date    replacement finished: stored rows not in the snapshot (nor added by handoff changes) deleted;
//                 offset stored; the subscription is live
//   txn           all changes of the frame + offsets of its live subscriptions + outbox ops acknowledged with this
//                 xid removed (their echo is here) + the local view of touched rows recomputed
//   txn, more     one part of a large transaction (docs/protocol.md, "Large transactions in parts"): its changes
//                 and the local view, in a transaction of its own; no offset (it has none), no outbox op removed.
//                 The last part (no `more`) does what a whole `txn` does, for every subscription any part touched
//   must_refetch  offset forgotten; the snapshot that follows replaces the table
//
// A transaction whose parts stop before its last one (the socket closed) leaves its parts applied and the offsets
// from before it stored: the resume answers `must_refetch`, and the snapshot replaces the partial state.
//
// A message that fails to apply (the local database failed, or frames were lost) stops the connection's messages:
// the ones behind it are refused until `disconnected()`, since they may depend on it (an `up_to_date` would delete
// the rows of a failed snapshot frame as stale; a later `txn` would store an offset past a failed one).
//
// One subscription per table, with the table's name as its id and no filter: the local table mirrors
// "my rows of that table".

import { LOCAL, OUTBOX, STATE, recomputeLocal, type SyncDatabase } from './database.js';
import type { Emitter, SerialQueue } from './events.js';
import { applyPatch, planFrame, staleIds, subscriptionsIn } from './frames.js';
import type { ServerMessage, TxnMessage } from './protocol.js';
import type { SyncedRow } from './types.js';

/** Events the applier reports. */
export interface ApplierEvents {
  applied: { xid: string };
  subscriptionLive: { table: string };
  refetch: { table: string; reason: string };
}

interface Subscription {
  table: string;
  live: boolean;
  /** Between the first snapshot frame and up_to_date: ids the replacement keeps. */
  seen: Set<string> | null;
  /** When the latest subscribe was sent (ms). */
  subscribedAt: number;
}

/** How many applied xids to remember for answers that arrive after their own echo, and for awaitTxId. */
const SEEN_XIDS = 10_000;

export class Applier {
  private readonly subs = new Map<string, Subscription>();
  private readonly seenXids = new Set<string>();
  private readonly waiters = new Map<string, Array<() => void>>();
  /** A transaction arriving in parts: its xid and the subscriptions its parts so far touched. */
  private partial: { xid: string; subscriptions: Set<string> } | null = null;
  /** A message of the current connection failed to apply: nothing more from it is (until `disconnected()`). */
  private failed: string | null = null;

  constructor(
    readonly db: SyncDatabase,
    private readonly writer: SerialQueue,
    private readonly events: Emitter<ApplierEvents>,
  ) {
    for (const table of db.syncedTables) this.subs.set(table, { table, live: false, seen: null, subscribedAt: 0 });
  }

  /** The stored offset of each table's subscription (null: take a snapshot). */
  async offsets(): Promise<Map<string, string | null>> {
    const out = new Map<string, string | null>();
    for (const table of this.subs.keys()) {
      const s = await this.db.state.get(`sub:${table}`);
      out.set(table, s && 'offset' in s ? s.offset : null);
    }
    return out;
  }

  /** The stream sent `subscribe` for this table (after a connect). */
  subscribing(table: string): void {
    const s = this.subs.get(table);
    if (!s) return;
    s.live = false;
    s.seen = null;
    s.subscribedAt = Date.now();
  }

  /** The connection is gone: nothing is live until the subscriptions are up to date again. */
  disconnected(): void {
    // The rest of a transaction in parts never comes on another connection (the resume refetches instead).
    this.partial = null;
    this.failed = null;
    for (const s of this.subs.values()) {
      s.live = false;
      s.seen = null;
    }
  }

  allLive(): boolean {
    for (const s of this.subs.values()) if (!s.live) return false;
    return true;
  }

  /** Whether a transaction with this xid has been applied (recently). */
  seen(xid: string): boolean {
    return this.seenXids.has(xid);
  }

  /** Another tab's applier applied `xid` to the shared database (see leader.ts). */
  noteApplied(xid: string): void {
    this.markSeen(xid);
  }

  /** Resolves when the transaction `xid` has been applied locally (or was part of a snapshot). */
  awaitTxId(xid: string, signal?: AbortSignal): Promise<void> {
    if (this.seenXids.has(xid)) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const list = this.waiters.get(xid) ?? [];
      const done = (): void => {
        signal?.removeEventListener('abort', abort);
        resolve();
      };
      const abort = (): void => {
        const l = this.waiters.get(xid);
        if (l) {
          const i = l.indexOf(done);
          if (i >= 0) l.splice(i, 1);
        }
        reject(signal?.reason ?? new Error('aborted'));
      };
      if (signal?.aborted) return abort();
      signal?.addEventListener('abort', abort, { once: true });
      list.push(done);
      this.waiters.set(xid, list);
    });
  }

  /** Applies one server message (the stream calls this in arrival order). */
  handle(msg: ServerMessage): Promise<void> {
    switch (msg.type) {
      case 'snapshot':
        return this.apply(() => this.snapshot(msg.id, msg.rows));
      case 'up_to_date':
        return this.apply(() => this.upToDate(msg.id, msg.offset));
      case 'txn':
        return this.apply(() => this.txn(msg));
      case 'must_refetch':
        return this.apply(() => this.mustRefetch(msg.id, msg.reason));
      default:
        return Promise.resolve();
    }
  }

  private apply(f: () => Promise<void>): Promise<void> {
    return this.writer.run(async () => {
      if (this.failed !== null) throw new Error(`not applied: an earlier message of this connection failed (${this.failed})`);
      try {
        await f();
      } catch (e) {
        this.failed = String(e);
        throw e;
      }
    });
  }

  /**
   * Drops acknowledged ops whose echo did not come once the stream is live: ops with a txid after `maxAgeMs` (their
   * transaction was part of a snapshot, or its echo came before the answer and fell out of memory), `duplicate`
   * ops (no txid: their transaction committed in an earlier attempt) after `duplicateAgeMs`.
   */
  sweep(maxAgeMs: number, duplicateAgeMs: number): Promise<void> {
    if (!this.allLive()) return Promise.resolve();
    const now = Date.now();
    return this.writer.run(() =>
      this.dropAcked(
        (op) =>
          // The echo of a transaction still arriving in parts is on its way (the server paces slow readers).
          (op.txid === undefined || op.txid !== this.partial?.xid) &&
          (op.ackedAt ?? 0) < now - (op.txid === undefined ? duplicateAgeMs : maxAgeMs),
      ),
    );
  }

  private tables(): string[] {
    return [OUTBOX, LOCAL, STATE, ...this.db.syncedTables];
  }

  private async snapshot(id: string, rows: SyncedRow[]): Promise<void> {
    const sub = this.subs.get(id);
    if (!sub) return;
    if (!sub.seen) sub.seen = new Set();
    const db = this.db;
    await db.transaction('rw', this.tables(), async () => {
      await db.synced(sub.table).bulkPut(rows);
      await recomputeLocal(db, await this.withLocal(sub.table, rows.map((r) => r.id)));
    });
    for (const r of rows) sub.seen.add(r.id);
  }

  private async upToDate(id: string, offset: string): Promise<void> {
    const sub = this.subs.get(id);
    if (!sub) return;
    const db = this.db;
    const seen = sub.seen;
    await db.transaction('rw', this.tables(), async () => {
      if (seen) {
        const stored = (await db.synced(sub.table).toCollection().primaryKeys()) as string[];
        const stale = staleIds(stored, seen);
        await db.synced(sub.table).bulkDelete(stale);
        await recomputeLocal(db, await this.withLocal(sub.table, stale));
      }
      await db.state.put({ key: `sub:${id}`, offset });
    });
    sub.seen = null;
    const wasLive = sub.live;
    sub.live = true;
    // Ops acknowledged before this subscribe was sent committed before its snapshot / replay position: whatever
    // they did is in the table now, whether or not their xid was seen.
    const before = sub.subscribedAt;
    await this.dropAcked((op) => op.table === sub.table && (op.ackedAt ?? Infinity) < before);
    if (!wasLive) this.events.emit('subscriptionLive', { table: sub.table });
  }

  private async txn(msg: TxnMessage): Promise<void> {
    const { xid, changes } = msg;
    if (this.partial && this.partial.xid !== xid) {
      // The server always sends a transaction's last part to a connection that got any of its parts: a new xid
      // here means frames were lost. Drop the connection; the resume from the stored offsets refetches.
      const open = this.partial.xid;
      this.partial = null;
      throw new Error(`transaction ${open} came in parts but its last part never arrived (next frame: ${xid})`);
    }
    const db = this.db;
    const ids = new Set<string>();
    for (const s of this.subs.keys()) ids.add(s);
    const plan = planFrame(changes, ids);
    // Subscriptions whose offset this transaction moves: those in this frame and in its earlier parts.
    const inTxn = this.partial?.subscriptions ?? new Set<string>();
    for (const id of subscriptionsIn(changes)) inTxn.add(id);
    // Only a frame that carries an offset completes a transaction (TxnMessage: `more` frames have none).
    const offset = msg.more === true ? null : msg.offset;
    await db.transaction('rw', this.tables(), async () => {
      const touched: Array<[string, string]> = [];
      for (const [table, effects] of plan) {
        const puts: SyncedRow[] = [];
        const deletes: string[] = [];
        for (const [rowId, effect] of effects) {
          if (effect.kind === 'put') puts.push(effect.row);
          else if (effect.kind === 'delete') deletes.push(rowId);
          else puts.push(applyPatch(await db.synced(table).get(rowId), effect.row));
        }
        await db.synced(table).bulkPut(puts);
        await db.synced(table).bulkDelete(deletes);
        touched.push(...(await this.withLocal(table, [...effects.keys()])));
      }
      if (offset !== null) {
        // The whole transaction is here: this device's own ops in it are settled.
        const echoed = await db.outbox.where('txid').equals(xid).toArray();
        await db.outbox.bulkDelete(echoed.map((o) => o.seq));
        for (const o of echoed) touched.push([o.table, o.rowId]);
        for (const id of inTxn) {
          if (this.subs.get(id)?.live) await db.state.put({ key: `sub:${id}`, offset });
        }
      }
      await recomputeLocal(db, touched);
    });
    // A replacement in progress keeps what its handoff changes inserted and forgets what they deleted.
    for (const [table, effects] of plan) {
      const seen = this.subs.get(table)?.seen;
      if (!seen) continue;
      for (const [rowId, effect] of effects) {
        if (effect.kind === 'delete') seen.delete(rowId);
        else seen.add(rowId);
      }
    }
    if (offset === null) {
      this.partial = { xid, subscriptions: inTxn };
      return;
    }
    this.partial = null;
    this.markSeen(xid);
  }

  private async mustRefetch(id: string, reason: string): Promise<void> {
    const sub = this.subs.get(id);
    if (!sub) return;
    sub.live = false;
    sub.seen = null;
    await this.db.state.put({ key: `sub:${id}`, offset: null });
    this.events.emit('refetch', { table: sub.table, reason });
  }

  /** Of these row ids, the keys that have a local entry (only those need recomputing). */
  private async withLocal(table: string, ids: readonly string[]): Promise<Array<[string, string]>> {
    if (ids.length === 0) return [];
    const keys = ids.map((id): [string, string] => [table, id]);
    const found = await this.db.local.bulkGet(keys);
    return keys.filter((_, i) => found[i] !== undefined);
  }

  private async dropAcked(pred: (op: { table: string; ackedAt?: number; txid?: string }) => boolean): Promise<void> {
    const db = this.db;
    const txids = await db.transaction('rw', this.tables(), async () => {
      const acked = (await db.outbox.where('[status+seq]').between(['acked', -Infinity], ['acked', Infinity]).toArray()).filter(pred);
      if (acked.length === 0) return [];
      await db.outbox.bulkDelete(acked.map((o) => o.seq));
      await recomputeLocal(db, acked.map((o): [string, string] => [o.table, o.rowId]));
      return acked.map((o) => o.txid).filter((t): t is string => t !== undefined);
    });
    for (const t of new Set(txids)) this.markSeen(t);
  }

  private markSeen(xid: string): void {
    if (!this.seenXids.has(xid)) {
      this.seenXids.add(xid);
      if (this.seenXids.size > SEEN_XIDS) {
        const oldest = this.seenXids.values().next().value;
        if (oldest !== undefined) this.seenXids.delete(oldest);
      }
    }
    const list = this.waiters.get(xid);
    if (list) {
      this.waiters.delete(xid);
      for (const w of list) w();
    }
    this.events.emit('applied', { xid });
  }
}
