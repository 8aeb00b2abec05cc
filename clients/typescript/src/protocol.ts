// The live-stream wire format (docs/protocol.md), typed, and a parser that never throws on what the server sends:
// an unknown or malformed message becomes `{ type: 'unknown' }` so a newer server cannot crash an older client.

import type { Row, SyncedRow } from './types.js';

/** One change inside a `txn` frame. */
export interface Change {
  /** Subscription id. */
  id: string;
  table: string;
  op: 'insert' | 'update' | 'delete';
  row: SyncedRow;
  /** Columns left out of `row` (only on `update`, only without full replica identity): keep the local values. */
  unchanged?: string[];
}

/**
 * A `txn` frame: a whole transaction, or one part of a large one (docs/protocol.md, "Large transactions in
 * parts"). Every part but the last says `more: true` and has no offset; the last part (no `more`) carries the
 * transaction's offset, like a whole transaction's frame.
 */
export type TxnMessage =
  | { type: 'txn'; xid: string; lsn: string; offset: string; changes: Change[]; part?: number; more?: false }
  | { type: 'txn'; xid: string; lsn: string; changes: Change[]; part?: number; more: true };

export type ServerMessage =
  | { type: 'snapshot'; id: string; rows: SyncedRow[] }
  | { type: 'up_to_date'; id: string; offset: string }
  | TxnMessage
  | { type: 'must_refetch'; id: string; reason: string }
  | { type: 'error'; id?: string; code: string; message: string }
  | { type: 'unsubscribed'; id: string }
  | { type: 'token_refreshed'; expires_at: number }
  | { type: 'pong' }
  | { type: 'unknown'; raw: string };

export type ClientMessage =
  | { type: 'subscribe'; id: string; table: string; where?: Row; offset?: string }
  | { type: 'unsubscribe'; id: string }
  | { type: 'refresh_token'; access_token: string }
  | { type: 'ping' };

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
const isString = (v: unknown): v is string => typeof v === 'string';
const isRow = (v: unknown): v is SyncedRow => isObject(v) && isString(v['id']);

function parseChange(v: unknown): Change | null {
  if (!isObject(v)) return null;
  const { id, table, op, row, unchanged } = v;
  if (!isString(id) || !isString(table) || !isRow(row)) return null;
  if (op !== 'insert' && op !== 'update' && op !== 'delete') return null;
  const change: Change = { id, table, op, row };
  if (Array.isArray(unchanged) && unchanged.every(isString)) change.unchanged = unchanged;
  return change;
}

/** Parses one text frame from the server. */
export function parseServerMessage(text: string): ServerMessage {
  const unknown: ServerMessage = { type: 'unknown', raw: text.length > 200 ? `${text.slice(0, 200)}…` : text };
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return unknown;
  }
  if (!isObject(v)) return unknown;
  switch (v['type']) {
    case 'snapshot': {
      const { id, rows } = v;
      if (!isString(id) || !Array.isArray(rows) || !rows.every(isRow)) return unknown;
      return { type: 'snapshot', id, rows };
    }
    case 'up_to_date': {
      const { id, offset } = v;
      if (!isString(id) || !isString(offset)) return unknown;
      return { type: 'up_to_date', id, offset };
    }
    case 'txn': {
      const { xid, lsn, offset, changes, part, more } = v;
      if (!isString(xid) || !Array.isArray(changes)) return unknown;
      if (more !== undefined && typeof more !== 'boolean') return unknown;
      if (part !== undefined && !(typeof part === 'number' && Number.isInteger(part) && part >= 0)) return unknown;
      // A complete transaction (or a large one's last part) always carries its offset; a part followed by `more`
      // has none, and any it might carry is ignored: a client holding only some parts has no resumable position.
      if (more !== true && !isString(offset)) return unknown;
      const parsed: Change[] = [];
      for (const c of changes) {
        const change = parseChange(c);
        if (!change) return unknown;
        parsed.push(change);
      }
      const common = { type: 'txn' as const, xid, lsn: isString(lsn) ? lsn : '', changes: parsed };
      const numbered = typeof part === 'number' ? { part } : {};
      if (more === true) return { ...common, ...numbered, more: true };
      return { ...common, ...numbered, offset: offset as string };
    }
    case 'must_refetch': {
      const { id, reason } = v;
      if (!isString(id)) return unknown;
      return { type: 'must_refetch', id, reason: isString(reason) ? reason : '' };
    }
    case 'error': {
      const { id, code, message } = v;
      const err: ServerMessage = {
        type: 'error',
        code: isString(code) ? code : 'unknown',
        message: isString(message) ? message : '',
      };
      if (isString(id)) err.id = id;
      return err;
    }
    case 'unsubscribed':
      return isString(v['id']) ? { type: 'unsubscribed', id: v['id'] } : unknown;
    case 'token_refreshed':
      return typeof v['expires_at'] === 'number' ? { type: 'token_refreshed', expires_at: v['expires_at'] } : unknown;
    case 'pong':
      return { type: 'pong' };
    default:
      return unknown;
  }
}

/** WebSocket close codes the server uses (docs/protocol.md, "Close codes"). */
export const CloseCode = {
  normal: 1000,
  goingAway: 1001,
  protocolError: 1002,
  tokenExpired: 4001,
  otherUser: 4003,
  tooSlow: 4008,
  /** The server is on standby (another server streams from the slot): reconnect with backoff, resume. */
  tryAgainLater: 1013,
} as const;

/** `ws(s)://host/v1/stream?access_token=…` for a server base URL. */
export function streamUrl(baseUrl: string, token: string): string {
  const u = new URL('/v1/stream', baseUrl);
  u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
  // JWTs need no encoding and the server takes the value verbatim (docs/protocol.md).
  return `${u.toString()}?access_token=${token}`;
}
