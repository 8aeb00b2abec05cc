// The outbox: every local write, in order, in IndexedDB, until the server has it and the stream has brought it back.
//
//   write() ──▶ [pending] ──/v1/batch 200──▶ [acked, txid] ──txn with that xid, last part (applier)──▶ removed
//                  │  ▲                  ├── duplicate ──▶ [acked, no txid] ──live for a moment (sweep)──▶ removed
//                  │  ▲                  └── not_found ──▶ removed (nothing happened, nothing will come back)
//                  │  └── network error, 5xx, 409 retry, 429: resend later, same op ids and seqs (backoff, jitter)
//                  │  └── 409 seq_gap: resend from the server's last_seq + 1, or continue under a new client id
//                  ├── 4xx naming the op (op_index) ──▶ replaced by a no-op filler with its seq, local effect
//                  │                                     undone, `rejected` event
//                  └── an annotation naming an asset the server lacks (foreign_key_violation) ──▶ sent again with
//                                                        asset_id null, as are the annotations after it naming that
//                                                        asset; `repaired` event (`detachAsset`)
//
// A guest's outbox is the same table, never flushed while a guest: `signIn()` sends it (guest.ts), then seals the
// database (no write is taken any more: GuestSealedError) and deletes it.
// Idempotency (docs/api.md): every batch carries the outbox's `client_id` and every op its `seq` (sequence.ts
// maps local positions to seqs), so a resent op is answered `duplicate` and applied once. Op ids are generated when
// an op is queued and sent too (the server requires them). Ops queued by a client version that sent no seqs go by
// op_id alone until they are settled.

import {
  DEFAULT_LIMITS,
  planChunk,
  settleBatch,
  shrink,
  toBatchOp,
  type BatchLimits,
} from './batching.js';
import { backoffDelay } from './backoff.js';
import { recomputeLocal, OUTBOX, LOCAL, STATE, type OutboxRecord, type SyncDatabase } from './database.js';
import { fillerOp, loadSequence, planGap, rotate, sendable, wireSeq, type GapPlan, type Sequence } from './sequence.js';
import { SerialQueue, sleep, type Emitter } from './events.js';
import { applyOp, normaliseRow } from './overlay.js';
import type { ServerError, Transport } from './transport.js';
import type { Rejection, Repair, Row, SyncErrorEvent, WriteOp, WrittenOp } from './types.js';

const KINDS = new Set(['insert', 'upsert', 'update', 'delete']);

/** Events the outbox reports. */
export interface OutboxEvents {
  rejected: Rejection;
  repaired: Repair;
  error: SyncErrorEvent;
  acked: { txid: string };
}

/** A flush that could not finish; the outbox keeps the ops and retries in the background when it can. */
export class FlushError extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly transient: boolean,
  ) {
    super(message);
    this.name = 'FlushError';
  }
}

/**
 * write() to a guest database that an upgrade has sealed: its work has been sent to `userId` and the database is
 * about to be deleted (guest.ts, `sealGuestWork`). Nothing was written; write to that user's database instead.
 */
export class GuestSealedError extends Error {
  constructor(readonly userId: string) {
    super(`this guest database was handed over to user ${userId} by a sign-in and is being deleted`);
    this.name = 'GuestSealedError';
  }
}

type Step =
  | { kind: 'empty' }
  | { kind: 'progress'; txid?: string }
  | { kind: 'retry'; error: ServerError; retryAfterMs?: number }
  | { kind: 'blocked'; error: ServerError };

export interface OutboxOptions {
  db: SyncDatabase;
  transport: Transport;
  deviceId: string;
  /** The single writer of the local database (shared with the applier). */
  writer: SerialQueue;
  events: Emitter<OutboxEvents>;
  /** xids the stream has already applied (an answer may arrive after its own echo). */
  seenXid: (xid: string) => boolean;
  limits?: Partial<BatchLimits>;
  /** The user whose writes these are (null: a guest's, sent only by the upgrade, which sets `sendAs`). */
  userId?: string | null;
}

function isOnline(): boolean {
  const nav = globalThis.navigator as Navigator | undefined;
  return nav?.onLine ?? true;
}

function newUuid(): string {
  return crypto.randomUUID();
}

export class Outbox {
  readonly db: SyncDatabase;
  private readonly transport: Transport;
  private readonly deviceId: string;
  private readonly writer: SerialQueue;
  private readonly events: Emitter<OutboxEvents>;
  private readonly seenXid: (xid: string) => boolean;
  private limits: BatchLimits;
  /** One request in flight at a time, in outbox order. */
  private readonly sender = new SerialQueue();
  private loop: Promise<void> | null = null;
  private again = false;
  /** seq -> txid of ops this client saw committed (bounded), so flush() can name the txids of its ops. */
  private readonly ackLog = new Map<number, string>();
  private attempt = 0;
  private readonly stopper = new AbortController();
  /** Aborted to cut a backoff short (back online, new write). */
  private wake = new AbortController();
  /** Whether the background loop may send (signed in, online). */
  private enabled = false;
  /** `seq_gap` answers in a row: a repair that does not help must not loop. */
  private gapStreak = 0;
  /** Requests go out only with a token of this user (a guest's outbox: the user it is being upgraded to). */
  sendAs: string | null;

  constructor(opts: OutboxOptions) {
    this.db = opts.db;
    this.transport = opts.transport;
    this.deviceId = opts.deviceId;
    this.writer = opts.writer;
    this.events = opts.events;
    this.seenXid = opts.seenXid;
    this.limits = { ...DEFAULT_LIMITS, ...opts.limits };
    this.sendAs = opts.userId ?? null;
  }

  /**
   * Queues ops and applies them to the local view in one transaction (all or none). Validates before touching
   * anything: unknown table, bad kind, missing id.
   */
  async enqueue(ops: readonly WriteOp[]): Promise<WrittenOp[]> {
    const db = this.db;
    const prepared = ops.map((op, i) => {
      const where = `write op ${i}`;
      if (typeof op !== 'object' || op === null) throw new TypeError(`${where}: must be an object`);
      if (!db.syncedTables.includes(op.table)) {
        throw new TypeError(`${where}: table ${JSON.stringify(op.table)} is not one of this client's tables (${db.syncedTables.join(', ')})`);
      }
      if (!KINDS.has(op.kind)) throw new TypeError(`${where}: kind must be insert, upsert, update or delete`);
      const row = normaliseRow(op.row, where);
      // A content hash in upper case is the same hash; the server takes a `sha256` column's value only in lower
      // case (docs/api.md), and refused the whole op (an asset, and with it its annotations' link) for the case.
      const sha = row['sha256'];
      if (typeof sha === 'string' && /^[0-9a-fA-F]{64}$/.test(sha)) row['sha256'] = sha.toLowerCase();
      if (row['id'] === undefined && op.kind === 'insert') row['id'] = newUuid();
      if (typeof row['id'] !== 'string' || row['id'] === '') throw new TypeError(`${where}: row.id must be a string (a UUID)`);
      if (op.kind === 'update' && Object.keys(row).length < 2) {
        throw new TypeError(`${where}: an update needs row.id and at least one column`);
      }
      return { table: op.table, kind: op.kind, row, rowId: row['id'] };
    });
    if (prepared.length === 0) return [];
    const tables = [...new Set(prepared.map((p) => p.table))];
    return this.writer.run(() =>
      db.transaction('rw', [db.table(OUTBOX), db.table(LOCAL), db.table(STATE), ...tables.map((t) => db.table(t))], async () => {
        // Checked in the same transaction as the write: the seal is set in one transaction with the check that
        // nothing is left unsent, so a write either is in the outbox before it (and sent) or refused after it.
        const sealed = await db.state.get('sealed');
        if (sealed && sealed.key === 'sealed') throw new GuestSealedError(sealed.userId);
        const meta = await outboxMeta(db);
        const written: WrittenOp[] = [];
        const now = Date.now();
        for (const p of prepared) {
          const seq = meta.nextSeq++;
          const record: OutboxRecord = {
            seq,
            opId: newUuid(),
            table: p.table,
            rowId: p.rowId,
            kind: p.kind,
            row: p.row,
            status: 'pending',
            createdAt: now,
          };
          await db.outbox.add(record);
          // Lay the op over the row's current view (local entry if any, else the synced row).
          const local = await db.local.get([p.table, p.rowId]);
          const base = local ? local.row : await db.synced(p.table).get(p.rowId);
          const next = applyOp(base, record);
          await db.local.put({ table: p.table, id: p.rowId, row: next === undefined ? null : next });
          written.push({ opId: record.opId, table: p.table, kind: p.kind, rowId: p.rowId, seq });
        }
        await db.state.put(meta);
        return written;
      }),
    );
  }

  /** Number of ops not yet committed by the server (fillers are not the app's ops). */
  pendingCount(): Promise<number> {
    return this.db.outbox
      .where('[status+seq]')
      .between(['pending', -Infinity], ['pending', Infinity])
      .filter((o) => !o.filler)
      .count();
  }

  /**
   * Continues the pending ops under a new client id from seq 1; nothing before them is ever sent again. For a
   * guest's work that goes to another user than an interrupted upgrade's (guest.ts).
   */
  restartSequence(): Promise<void> {
    const db = this.db;
    return withOutboxLock(db.name, () =>
      this.writer.run(() =>
        db.transaction('rw', [db.table(OUTBOX), db.table(STATE)], async () => {
          const s = await outboxMeta(db);
          const first = await firstPending(db);
          await db.state.put(rotate(s, first?.seq ?? s.nextSeq, newUuid));
        }),
      ),
    );
  }

  /** Allows (or stops) background sending; enabling starts a flush. */
  setEnabled(enabled: boolean): void {
    this.enabled = enabled;
    if (enabled) this.kick();
  }

  /** Something changed (a write, back online, reconnected): flush in the background soon. */
  kick(): void {
    if (!this.enabled || this.stopper.signal.aborted) return;
    this.again = true;
    this.wake.abort();
    if (this.loop) return;
    this.loop = this.runLoop().finally(() => {
      this.loop = null;
    });
  }

  /** Resets the backoff (the network is back). */
  resetBackoff(): void {
    this.attempt = 0;
  }

  /**
   * Sends every pending op now. Resolves with the txids of the requests that committed at least one op (each
   * will come back over the stream: `awaitTxId`). Rejections are reported through the `rejected` event and do not
   * stop the flush. Throws FlushError when a request could not be delivered (then retried in the background), or
   * (code `cancelled`) when `signal` aborts: no request is started after that.
   */
  async flush(opts: { retainSettled?: boolean; signal?: AbortSignal } = {}): Promise<string[]> {
    // The ops pending now: flush() is done when none of them is pending any more, whoever sent them (the
    // background loop may be sending one of their requests right now).
    const pendingNow = (await this.pendingSeqs()).map((o) => o.seq);
    const last = pendingNow.at(-1) ?? -Infinity;
    for (;;) {
      const left = await this.db.outbox.where('[status+seq]').between(['pending', -Infinity], ['pending', last], true, true).count();
      if (left === 0) break;
      if (opts.signal?.aborted) throw new FlushError('cancelled', 'the flush was cancelled', false);
      const step = await this.sender.run(() => this.step(opts.retainSettled ?? false, opts.signal));
      if (step.kind === 'empty' || step.kind === 'progress') continue;
      if (this.enabled) this.kick();
      throw new FlushError(step.error.code, step.error.message, step.kind === 'retry');
    }
    // Ours, and those of ops committed earlier (e.g. by the background loop just before) whose echo is still due.
    const txids: string[] = [];
    const add = (t: string | undefined): void => {
      if (t !== undefined && !txids.includes(t)) txids.push(t);
    };
    for (const seq of pendingNow) add(this.ackLog.get(seq));
    const waiting = await this.db.outbox.where('[status+seq]').between(['acked', -Infinity], ['acked', Infinity]).toArray();
    for (const op of waiting) add(op.txid);
    return txids;
  }

  private pendingSeqs(): Promise<OutboxRecord[]> {
    return this.db.outbox.where('[status+seq]').between(['pending', -Infinity], ['pending', Infinity]).toArray();
  }

  /** Stops background sending for good (the client is closing or switching databases). */
  stop(): void {
    this.enabled = false;
    this.stopper.abort();
  }

  private async runLoop(): Promise<void> {
    while (this.again && this.enabled && !this.stopper.signal.aborted) {
      this.again = false;
      for (;;) {
        if (!this.enabled || this.stopper.signal.aborted || !isOnline()) return;
        let step: Step;
        try {
          step = await this.sender.run(() => this.step(false));
        } catch (e) {
          // The local database failed (closed under us by close()/signOut(), or quota): nothing was lost (the
          // ops are still stored); try again later unless stopped.
          if (this.stopper.signal.aborted) return;
          step = { kind: 'retry', error: { code: 'local_database', message: String(e) } };
        }
        if (step.kind === 'empty') {
          this.attempt = 0;
          break;
        }
        if (step.kind === 'progress') {
          this.attempt = 0;
          continue;
        }
        const delay = Math.max(step.kind === 'retry' ? (step.retryAfterMs ?? 0) : 0, backoffDelay(this.attempt++, {
          baseMs: 500,
          // A request the server refuses as a whole (no op to blame) is a client or server configuration problem:
          // keep the data, retry slowly.
          maxMs: step.kind === 'blocked' ? 60_000 : 30_000,
        }));
        this.events.emit('error', {
          source: 'batch',
          code: step.error.code,
          message: step.error.message,
          retrying: true,
        });
        this.wake = new AbortController();
        await sleep(delay, AbortSignal.any([this.stopper.signal, this.wake.signal]));
        this.again = true;
        break;
      }
    }
  }

  /** One request: the next chunk of pending ops, and what its answer does to the outbox. */
  private step(retainSettled: boolean, signal?: AbortSignal): Promise<Step> {
    return withOutboxLock(this.db.name, () => this.stepLocked(retainSettled, signal));
  }

  private async stepLocked(retainSettled: boolean, signal?: AbortSignal): Promise<Step> {
    // Cancelled while waiting for the lock: read and send nothing more (a cancelled upgrade must not send what a
    // new guest session writes next into the same database).
    if (signal?.aborted) return { kind: 'empty' };
    const db = this.db;
    const pending = await db.outbox
      .where('[status+seq]')
      .between(['pending', -Infinity], ['pending', Infinity])
      .limit(this.limits.maxOps)
      .toArray();
    if (pending.length === 0) return { kind: 'empty' };
    // Read, not stored: an outbox from an older version gets its sequence stored by the next write() (only ops
    // queued from then on carry seqs, and they are the only ones that need it).
    const sequence = await outboxMeta(db);
    const { ops, clientId } = sendable(pending, sequence);
    const queued = ops.map((o) => {
      const w = clientId === undefined ? undefined : wireSeq(sequence, o.seq);
      return w === undefined ? o : { ...o, wireSeq: w };
    });
    const plan = planChunk(queued, this.deviceId, this.limits, clientId);
    if ('tooLarge' in plan) {
      await this.reject(plan.tooLarge, 0, {
        code: 'payload_too_large',
        message: `this op alone is larger than a batch may be (${this.limits.maxBytes} bytes)`,
      });
      return { kind: 'progress' };
    }
    const chunk = plan.chunk;
    if (this.sendAs === null) {
      // A guest's writes are never sent as anyone (guest.ts sets the user for the upgrade).
      return { kind: 'blocked', error: { code: 'guest', message: 'a guest outbox is sent only by signIn()' } };
    }
    const outcome = await this.transport.batch(this.deviceId, chunk.map(toBatchOp), clientId, this.sendAs);
    if (outcome.kind !== 'seq_gap') this.gapStreak = 0;
    switch (outcome.kind) {
      case 'ok': {
        const settlement = settleBatch(chunk, outcome.value);
        const txid = outcome.value.txid;
        // Which client id's sequence settled the ops (a seq_gap later resends only ops settled under the current one).
        const by = clientId === undefined ? {} : { ackedBy: clientId };
        await this.writer.run(() =>
          db.transaction('rw', [db.table(OUTBOX), db.table(LOCAL), ...db.syncedTables.map((t) => db.table(t))], async () => {
            const now = Date.now();
            const echoed = this.seenXid(txid);
            const touched: Array<[string, string]> = [];
            for (const op of chunk) {
              if (settlement.acked.includes(op.seq)) {
                if (echoed && !retainSettled) {
                  await db.outbox.delete(op.seq);
                  touched.push([op.table, op.rowId]);
                } else {
                  await db.outbox.update(op.seq, { status: 'acked', txid, ackedAt: now, ...by });
                }
              } else if (settlement.duplicate.includes(op.seq)) {
                // Committed earlier, in a transaction whose xid we never learnt: keep the local effect until the
                // applier's sweep (its echo is normally already on the way), so the row does not flicker.
                await db.outbox.update(op.seq, { status: 'acked', ackedAt: now, ...by });
              } else if (settlement.notFound.includes(op.seq)) {
                if (retainSettled) {
                  await db.outbox.update(op.seq, { status: 'acked', ackedAt: now, ...by });
                } else {
                  await db.outbox.delete(op.seq);
                  touched.push([op.table, op.rowId]);
                }
              }
            }
            await recomputeLocal(db, touched);
          }),
        );
        for (const seq of settlement.acked) this.ackLog.set(seq, txid);
        while (this.ackLog.size > 100_000) {
          const oldest = this.ackLog.keys().next().value;
          if (oldest === undefined) break;
          this.ackLog.delete(oldest);
        }
        if (settlement.echoExpected) this.events.emit('acked', { txid });
        return settlement.echoExpected ? { kind: 'progress', txid } : { kind: 'progress' };
      }
      case 'rejected': {
        const index = outcome.error.op_index;
        const op = index !== undefined ? chunk[index] : undefined;
        if (!op) return { kind: 'blocked', error: outcome.error };
        if (op.filler) {
          // A delete of a fresh id in a synced table cannot fail unless the server does not know the table:
          // a configuration problem (the client's `tables`). Keep everything and retry slowly.
          return {
            kind: 'blocked',
            error: {
              code: outcome.error.code,
              message: `the server refused the no-op that keeps a refused op's seq (${outcome.error.message}); check the client's tables`,
            },
          };
        }
        const asset = missingAsset(op, outcome.error);
        // Changes at least the refused op (still pending: this tab holds the outbox lock); if it did not, the
        // resend would meet the same refusal, so the op is rejected instead.
        if (asset !== null && (await this.detachAsset(op, asset, outcome.status, outcome.error)) > 0) return { kind: 'progress' };
        await this.reject(op, outcome.status, outcome.error);
        return { kind: 'progress' };
      }
      case 'seq_gap':
        return this.repairGap(outcome.lastSeq, outcome.error);
      case 'too_large': {
        const smaller = shrink(this.limits, chunk.length);
        const first = chunk[0];
        if (!smaller) {
          if (first) await this.reject(first, outcome.status, outcome.error);
          return { kind: 'progress' };
        }
        // The server's limits are lower than configured: remember the smaller size.
        this.limits = smaller;
        return { kind: 'progress' };
      }
      case 'transient':
        return outcome.retryAfterMs !== undefined
          ? { kind: 'retry', error: outcome.error, retryAfterMs: outcome.retryAfterMs }
          : { kind: 'retry', error: outcome.error };
      case 'auth':
        return { kind: 'blocked', error: outcome.error };
    }
  }

  /**
   * 409 `seq_gap`: the server's last seq for this client id is behind the ops this client saw acknowledged (a
   * restored database, or ops settled by op_id from a tab running an older version). Resend from `lastSeq + 1`,
   * or continue under a new client id (sequence.ts, `planGap`).
   */
  private async repairGap(lastSeq: number, error: ServerError): Promise<Step> {
    if (++this.gapStreak > 3) return { kind: 'blocked', error };
    const db = this.db;
    const plan = await this.writer.run(() =>
      db.transaction('rw', [db.table(OUTBOX), db.table(STATE)], async (): Promise<GapPlan> => {
        const s = await outboxMeta(db);
        const first = await firstPending(db);
        if (!first || first.seq < s.seqFrom) return { kind: 'none' };
        const held = await db.outbox.where('seq').between(s.seqFrom, first.seq, true, false).toArray();
        const plan = planGap(s, lastSeq, first.seq, held, newUuid);
        if (plan.kind === 'resend') {
          for (const seq of plan.seqs) {
            await db.outbox.update(seq, { status: 'pending', txid: undefined, ackedAt: undefined, ackedBy: undefined });
          }
        } else if (plan.kind === 'rotate') {
          await db.state.put(plan.sequence);
        }
        return plan;
      }),
    );
    if (plan.kind === 'none') return { kind: 'retry', error };
    this.events.emit('error', {
      source: 'batch',
      code: 'seq_gap',
      message:
        plan.kind === 'resend'
          ? `${error.message} (resending ${plan.seqs.length} acknowledged ops from seq ${lastSeq + 1})`
          : `${error.message} (the ops it lacks are no longer queued here; the pending ops continue under a new client id)`,
      retrying: true,
    });
    return { kind: 'progress' };
  }

  /**
   * The server says asset `assetId` does not exist where `refused` (an annotation naming it) would run: that op, and
   * every pending annotation op after it that names the same asset, is sent with `asset_id: null` instead of being
   * dropped, up to an op that creates that asset (an `assets` insert or upsert of that id: from there on it exists).
   * The annotations keep their `sha256`, `work_id`, geometry and the rest, as Postgres does when an asset is deleted
   * (`on delete set null (asset_id)`). The ops keep their op ids and seqs: the server recorded nothing of the refused
   * request, and a copy of it arriving late is answered `duplicate` like any resend. Each changed op is told through
   * `repaired`. Resolves with the number of ops changed.
   */
  private async detachAsset(refused: OutboxRecord, assetId: string, status: number, error: ServerError): Promise<number> {
    const db = this.db;
    const changed = await this.writer.run(() =>
      db.transaction('rw', [db.table(OUTBOX), db.table(LOCAL), ...db.syncedTables.map((t) => db.table(t))], async () => {
        const after = await db.outbox.where('[status+seq]').between(['pending', refused.seq], ['pending', Infinity]).toArray();
        const out: Array<{ op: OutboxRecord; row: Row }> = [];
        for (const op of after) {
          if (op.filler) continue;
          if (op.table === 'assets' && (op.kind === 'insert' || op.kind === 'upsert') && op.rowId.toLowerCase() === assetId) break;
          if (!namesAsset(op, assetId)) continue;
          const row: Row = { ...op.row, asset_id: null };
          await db.outbox.update(op.seq, { row });
          out.push({ op, row });
        }
        await recomputeLocal(db, out.map(({ op }) => [op.table, op.rowId] as const));
        return out;
      }),
    );
    for (const { op, row } of changed) {
      this.events.emit('repaired', {
        op: { opId: op.opId, table: op.table, kind: op.kind, row: op.row },
        table: op.table,
        rowId: op.rowId,
        row,
        code: error.code,
        message: `asset ${assetId} does not exist on the server (${error.message}); the annotation is sent with asset_id null`,
        status,
      });
    }
    return changed.length;
  }

  /**
   * Removes a refused op, undoes its local effect, tells the app. An op with a seq leaves a no-op in its place
   * (sequence.ts, `fillerOp`): the server's sequence must stay contiguous, and renumbering the ops behind it would
   * be wrong if a lost request carrying them committed after all.
   */
  private async reject(op: OutboxRecord, status: number, error: ServerError): Promise<void> {
    const db = this.db;
    await this.writer.run(() =>
      db.transaction('rw', [db.table(OUTBOX), db.table(LOCAL), db.table(STATE), ...db.syncedTables.map((t) => db.table(t))], async () => {
        const s = await outboxMeta(db);
        if (wireSeq(s, op.seq) === undefined) {
          await db.outbox.delete(op.seq);
        } else {
          const f = fillerOp(op, error.code, db.syncedTables, newUuid);
          await db.outbox.put({
            seq: op.seq,
            opId: newUuid(),
            table: f.table,
            rowId: f.rowId,
            kind: f.kind,
            row: f.row,
            status: 'pending',
            createdAt: Date.now(),
            filler: true,
          });
        }
        await recomputeLocal(db, [[op.table, op.rowId]]);
      }),
    );
    this.events.emit('rejected', {
      op: { opId: op.opId, table: op.table, kind: op.kind, row: op.row },
      table: op.table,
      rowId: op.rowId,
      code: error.code,
      message: error.message,
      status,
    });
  }
}

/** Whether an annotation op sets `asset_id` to this asset (lower-case id). */
function namesAsset(op: { table: string; kind: string; row: Row }, assetId: string): boolean {
  const v = op.row['asset_id'];
  return op.table === 'annotations' && op.kind !== 'delete' && typeof v === 'string' && v.toLowerCase() === assetId;
}

/** Postgres's words for a reference to a missing asset (docs/api.md: the constraint's name; the detail). */
const ASSET_FK = /"annotations_owner_id_asset_id_fkey"|is not present in table "assets"/;

/**
 * The asset (lower-case id) whose absence the server refused `op` for: an annotation insert, upsert or update naming
 * an `asset_id`, refused with `foreign_key_violation` on the annotations -> assets key. Null for anything else.
 */
export function missingAsset(op: { table: string; kind: string; row: Row; filler?: true }, error: ServerError): string | null {
  if (op.filler || error.code !== 'foreign_key_violation' || !ASSET_FK.test(error.message)) return null;
  const v = op.row['asset_id'];
  return namesAsset(op, typeof v === 'string' ? v.toLowerCase() : '') ? (v as string).toLowerCase() : null;
}

/** The outbox's sequence: client id, next local position, and how positions map to seqs (created on first use). */
async function outboxMeta(db: SyncDatabase): Promise<Sequence> {
  const stored = await db.state.get('outbox');
  if (stored && stored.key === 'outbox') return loadSequence(stored, undefined, newUuid);
  // Continue after any op already present (a state row lost to a manual clear must not reuse a position).
  const last = await db.outbox.orderBy('seq').last();
  return loadSequence(undefined, last?.seq, newUuid);
}

function firstPending(db: SyncDatabase): Promise<OutboxRecord | undefined> {
  return db.outbox.where('[status+seq]').between(['pending', -Infinity], ['pending', Infinity]).first();
}

/**
 * Several tabs of one app share the outbox: only one of them sends at a time (Web Locks), so no two requests
 * race with the same ops. Without Web Locks (old browsers, Node) each client sends on its own.
 */
async function withOutboxLock<T>(dbName: string, f: () => Promise<T>): Promise<T> {
  const locks = (globalThis.navigator as Navigator | undefined)?.locks;
  if (!locks) return f();
  return locks.request(`deeprecall-outbox:${dbName}`, () => f());
}
