// Pure: how the outbox numbers its ops for the server's per-client sequence idempotency (docs/api.md,
// "Idempotency: client_id + seq, or op_id"). No I/O, no clock.
//
// Every outbox (one per local database) has a `clientId`. Its ops have a local position `seq` (the outbox's key:
// strictly increasing, never reused, the send order). On the wire an op carries `seq - seqBase`: 1, 2, 3, … for
// each client id, one more per op, as the server requires.
//
//   local seq:   … 41 42 │ 43 44 45 46 …          seqFrom = 43, seqBase = 42
//   on the wire:  op_id   │  1  2  3  4 …          (ops before seqFrom were queued by a client version that sent
//                 only    │                         no seqs: they stay on the op_id path until they are settled)
//
// What keeps the numbering contiguous:
// - A rejected op (4xx naming it) keeps its seq, filled by a no-op (`fillerOp`): a delete of a fresh random id,
//   which the server answers `not_found` (or `duplicate`, if an earlier attempt carrying that seq committed after
//   all). No op ever changes its seq, so a request that may still commit late can never make the server skip a
//   real op (docs/decisions in README.md, "A refused op keeps its seq").
// - 409 `seq_gap` (the server's `last_seq` is behind what this client believes it sent): resend from
//   `last_seq + 1` when every op from there on is still in the outbox and was acknowledged under this client id;
//   otherwise continue the pending ops under a new client id from seq 1 (`planGap`).

import type { OpKind, Row } from './types.js';

/** The outbox's identity on the server and how local positions map to the server's seqs (in deeprecall_state). */
export interface Sequence {
  key: 'outbox';
  /** The outbox's `client_id` (a UUID). */
  clientId: string;
  /** Local position of the next queued op. */
  nextSeq: number;
  /** First local position sent with `clientId`; earlier ops go by op_id alone (queued before seqs were sent). */
  seqFrom: number;
  /** seq on the wire = local position - seqBase (the op at `seqFrom` is the client id's seq 1). */
  seqBase: number;
}

/** What an older version of the client stored (no seqFrom / seqBase: it never sent seqs). */
export interface StoredSequence {
  key: 'outbox';
  clientId: string;
  nextSeq: number;
  seqFrom?: number;
  seqBase?: number;
}

/**
 * The outbox's sequence as stored, or a new one. An outbox from a version that did not send seqs starts its
 * sequence at the next op it queues: the ops queued before may already have been sent by op_id, and must not be
 * sent again under a seq (the server does not relate the two, docs/api.md). A missing record (a cleared state
 * table) starts a new client id after the last op present, for the same reason.
 */
export function loadSequence(stored: StoredSequence | undefined, lastLocalSeq: number | undefined, newId: () => string): Sequence {
  if (stored) {
    const seqFrom = stored.seqFrom ?? stored.nextSeq;
    return {
      key: 'outbox',
      clientId: stored.clientId,
      nextSeq: stored.nextSeq,
      seqFrom,
      seqBase: stored.seqBase ?? seqFrom - 1,
    };
  }
  const next = (lastLocalSeq ?? 0) + 1;
  return { key: 'outbox', clientId: newId(), nextSeq: next, seqFrom: next, seqBase: next - 1 };
}

/** The seq an op carries on the wire, or undefined for an op that goes by op_id alone. */
export function wireSeq(s: Sequence, localSeq: number): number | undefined {
  return localSeq >= s.seqFrom ? localSeq - s.seqBase : undefined;
}

/**
 * Which of the pending ops (in outbox order) may go into one request: either the ops that go by op_id alone (all
 * of them come first), or a run of consecutive local positions under the client id. A hole in the positions (which
 * the client never makes, but a damaged store could hold) ends the run; the server then answers `seq_gap` for the
 * rest, and `planGap` moves them to a new client id.
 */
export function sendable<T extends { seq: number }>(pending: readonly T[], s: Sequence): { ops: T[]; clientId?: string } {
  const first = pending[0];
  if (!first) return { ops: [] };
  if (first.seq < s.seqFrom) return { ops: pending.filter((o) => o.seq < s.seqFrom) };
  const ops: T[] = [];
  for (const op of pending) {
    const prev = ops.at(-1);
    if (prev && op.seq !== prev.seq + 1) break;
    ops.push(op);
  }
  return { ops, clientId: s.clientId };
}

/** The part of an outbox record `planGap` looks at. */
export interface HeldOp {
  seq: number;
  status: 'pending' | 'acked';
  /** The client id of the batch whose answer settled the op. */
  ackedBy?: string;
}

export type GapPlan =
  /** Send these acknowledged ops (local positions) again: the server no longer has them. */
  | { kind: 'resend'; seqs: number[] }
  /** The ops from `seqFrom` on continue under a new client id from seq 1. */
  | { kind: 'rotate'; sequence: Sequence }
  /** The server is not behind the first pending op: nothing to repair. */
  | { kind: 'none' };

/**
 * After 409 `seq_gap` with the server's `lastSeq`: the server has not applied (any more) the ops between
 * `lastSeq + 1` and the first pending op, although this client saw them acknowledged. If the outbox still holds
 * every one of them, acknowledged under this client id, they are sent again from `lastSeq + 1`. Otherwise (they
 * are gone from the outbox, or were settled some other way, e.g. by op_id from an older tab) the pending ops
 * continue under a new client id: nothing before them is ever sent again.
 *
 * `held`: the outbox's ops with local positions from `s.seqFrom` up to `firstPending` (any order).
 */
export function planGap(s: Sequence, lastSeq: number, firstPending: number, held: readonly HeldOp[], newId: () => string): GapPlan {
  const from = lastSeq + 1 + s.seqBase; // local position of the server's next seq
  if (from >= firstPending) return { kind: 'none' };
  const byPos = new Map(held.map((o) => [o.seq, o]));
  const resend: number[] = [];
  let complete = from >= s.seqFrom;
  for (let pos = from; complete && pos < firstPending; pos++) {
    const op = byPos.get(pos);
    if (!op || op.status !== 'acked' || op.ackedBy !== s.clientId) complete = false;
    else resend.push(pos);
  }
  if (complete) return { kind: 'resend', seqs: resend };
  return { kind: 'rotate', sequence: rotate(s, firstPending, newId) };
}

/** A new client id whose seq 1 is the op at local position `from`. */
export function rotate(s: Sequence, from: number, newId: () => string): Sequence {
  return { key: 'outbox', clientId: newId(), nextSeq: s.nextSeq, seqFrom: from, seqBase: from - 1 };
}

/** A no-op that takes the seq of a refused op: a delete of a fresh random id, which matches no row. */
export interface FillerOp {
  table: string;
  kind: OpKind;
  rowId: string;
  row: Row;
}

/**
 * The filler for an op refused with `code`. Its table is the refused op's, unless the server refused that table
 * itself (`unknown_table`): then another of the client's tables.
 */
export function fillerOp(refused: { table: string }, code: string, tables: readonly string[], newId: () => string): FillerOp {
  const table = code === 'unknown_table' ? (tables.find((t) => t !== refused.table) ?? refused.table) : refused.table;
  const id = newId();
  return { table, kind: 'delete', rowId: id, row: { id } };
}
