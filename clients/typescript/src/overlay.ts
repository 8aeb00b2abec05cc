// Pure: what the app sees = the synced rows (written only by the stream applier) with the pending local writes of
// the outbox laid over them, in outbox order. No I/O, no clock.
//
//   synced row (or none) ──applyOp(op1)──▶ … ──applyOp(opN)──▶ overlaid row, or null (deleted locally)
//
// The result for each row with pending ops is stored in the `local` table (database.ts) so that reading a table
// costs one pass over it, however long a guest's journal has grown.

import type { OpKind, Row } from './types.js';

/** The part of an outbox op the overlay needs. */
export interface OverlayOp {
  kind: OpKind;
  row: Row;
}

/**
 * The row after one more op, mirroring what the server does with it (docs/api.md, "POST /v1/batch"):
 * `undefined` = no row; `null` = deleted locally (hides a synced row until the delete comes back).
 */
export function applyOp(base: Row | null | undefined, op: OverlayOp): Row | null | undefined {
  const current = base ?? undefined;
  switch (op.kind) {
    case 'insert':
      // The server refuses an insert over an existing row (409); until it does, show what the user wrote.
      return { ...op.row };
    case 'upsert':
      return current ? { ...current, ...op.row } : { ...op.row };
    case 'update':
      // An update of a row that does not exist is `not_found` on the server: it changes nothing.
      return current ? { ...current, ...op.row } : base;
    case 'delete':
      return current ? null : base;
  }
}

/** The row after all pending ops for it, in order. */
export function overlayRow(synced: Row | undefined, ops: readonly OverlayOp[]): Row | null | undefined {
  let row: Row | null | undefined = synced;
  for (const op of ops) row = applyOp(row, op);
  return row;
}

/**
 * Local entry to store for a row: `undefined` when the row has no pending ops (nothing to lay over the synced
 * row), else the overlaid row or `null` for "hidden".
 */
export function localEntry(
  synced: Row | undefined,
  ops: readonly OverlayOp[],
): { row: Row | null } | undefined {
  if (ops.length === 0) return undefined;
  const row = overlayRow(synced, ops);
  return { row: row === undefined ? null : row };
}

/** Synced rows with the local entries laid over them (a `null` entry hides the row). */
export function mergeRows<R extends Row>(
  synced: readonly R[],
  local: ReadonlyArray<{ id: string; row: Row | null }>,
): R[] {
  const byId = new Map<string, R>();
  for (const r of synced) byId.set(String(r['id']), r);
  for (const entry of local) {
    if (entry.row === null) byId.delete(entry.id);
    else byId.set(entry.id, entry.row as R);
  }
  return [...byId.values()];
}

/** Columns the server sets itself and ignores in every op (docs/api.md, "Columns the client does not write"). */
export const SERVER_COLUMNS = ['owner_id'] as const;

/**
 * Normalises an app's op row: a plain JSON object (what is stored is exactly what is sent), without `owner_id`
 * (guests hold no owner ids; the server assigns it). Throws a TypeError naming the problem.
 */
export function normaliseRow(row: unknown, where: string): Row {
  if (typeof row !== 'object' || row === null || Array.isArray(row)) {
    throw new TypeError(`${where}: row must be an object`);
  }
  let json: unknown;
  try {
    json = JSON.parse(JSON.stringify(row));
  } catch (e) {
    throw new TypeError(`${where}: row is not JSON-serialisable (${(e as Error).message})`);
  }
  const out = json as Row;
  for (const c of SERVER_COLUMNS) delete out[c];
  return out;
}
