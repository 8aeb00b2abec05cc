// Pure: which outbox ops go into the next `/v1/batch` request, and what the answer means for each of them.

import type { BatchOp, BatchResponse } from './transport.js';
import type { OpKind, Row } from './types.js';

/** The server's limits per request (docs/api.md, "Limits"). */
export interface BatchLimits {
  maxOps: number;
  maxBytes: number;
}

export const DEFAULT_LIMITS: BatchLimits = { maxOps: 1000, maxBytes: 8 * 1024 * 1024 };

/** The part of an outbox record a batch needs. */
export interface QueuedOp {
  /** Local position in the outbox. */
  seq: number;
  /** The seq sent with the batch's client_id (sequence.ts); absent for an op that goes by op_id alone. */
  wireSeq?: number;
  opId: string;
  table: string;
  kind: OpKind;
  row: Row;
}

export function toBatchOp(op: QueuedOp): BatchOp {
  const out: BatchOp = { op_id: op.opId, table: op.table, kind: op.kind, row: op.row };
  if (op.wireSeq !== undefined) out.seq = op.wireSeq;
  return out;
}

const encoder = new TextEncoder();
const bytes = (s: string): number => encoder.encode(s).length;

/**
 * The longest prefix of `ops` (already in outbox order) that fits the limits, or `tooLarge` when the first op alone
 * does not fit in a request. Order is never changed: an op never travels before one queued earlier.
 */
export function planChunk<T extends QueuedOp>(
  ops: readonly T[],
  deviceId: string,
  limits: BatchLimits,
  clientId?: string,
): { chunk: T[] } | { tooLarge: T } {
  // {"client_id":"…","device_id":"…","ops":[ … ]} plus commas between ops.
  const envelope = clientId === undefined ? { device_id: deviceId, ops: [] } : { client_id: clientId, device_id: deviceId, ops: [] };
  let size = bytes(JSON.stringify(envelope));
  const chunk: T[] = [];
  for (const op of ops) {
    if (chunk.length >= limits.maxOps) break;
    const opBytes = bytes(JSON.stringify(toBatchOp(op))) + (chunk.length > 0 ? 1 : 0);
    if (size + opBytes > limits.maxBytes) {
      if (chunk.length === 0) return { tooLarge: op };
      break;
    }
    size += opBytes;
    chunk.push(op);
  }
  return { chunk };
}

/** What a 200 answer means for each op of the chunk. */
export interface BatchSettlement {
  /** Committed in `txid`: keep the local effect until the stream brings `txid` back. */
  acked: number[];
  /** `duplicate`: committed by an earlier attempt whose answer was lost, in a transaction whose xid is unknown. */
  duplicate: number[];
  /** `not_found`: no row to change; nothing happened and nothing will come back. */
  notFound: number[];
  /** The transaction will appear on the stream only when at least one op was applied now. */
  echoExpected: boolean;
}

/**
 * Pairs results with ops by op_id (the server answers in request order, but matching by id costs nothing and
 * survives a reordering server). An op without a result is left pending and will be resent.
 */
export function settleBatch(chunk: readonly QueuedOp[], response: BatchResponse): BatchSettlement {
  const status = new Map(response.results.map((r) => [r.op_id, r.status]));
  const out: BatchSettlement = { acked: [], duplicate: [], notFound: [], echoExpected: false };
  for (const op of chunk) {
    const s = status.get(op.opId);
    if (s === 'applied') {
      out.acked.push(op.seq);
      out.echoExpected = true;
    } else if (s === 'duplicate') {
      out.duplicate.push(op.seq);
    } else if (s === 'not_found') {
      out.notFound.push(op.seq);
    }
  }
  return out;
}

/** After a 413: a smaller op count to try (halving), or null when one op per request is already too much. */
export function shrink(limits: BatchLimits, sent: number): BatchLimits | null {
  if (sent <= 1) return null;
  return { ...limits, maxOps: Math.max(1, Math.floor(sent / 2)) };
}
