// Pure: what one `txn` frame does to the local tables (docs/protocol.md, "txn" and "Client algorithm").
// The applier (applier.ts) executes the plan in one Dexie transaction.

import type { Change } from './protocol.js';
import type { Row, SyncedRow } from './types.js';

/** The net effect of a frame on one row. */
export type RowEffect =
  | { kind: 'put'; row: SyncedRow }
  | { kind: 'delete' }
  /** Merge `row` into the stored row (an `unchanged` patch: the listed columns keep their local values). */
  | { kind: 'patch'; row: SyncedRow };

/** Per table, per row id: the effect after all of the frame's changes for it, in order. */
export type FramePlan = Map<string, Map<string, RowEffect>>;

function combine(prev: RowEffect | undefined, change: Change): RowEffect {
  if (change.op === 'delete') return { kind: 'delete' };
  if (change.op === 'update' && change.unchanged && change.unchanged.length > 0) {
    const patch: SyncedRow = { ...change.row };
    for (const c of change.unchanged) delete patch[c];
    if (prev?.kind === 'put') return { kind: 'put', row: { ...prev.row, ...patch } };
    if (prev?.kind === 'patch') return { kind: 'patch', row: { ...prev.row, ...patch } };
    return { kind: 'patch', row: patch };
  }
  return { kind: 'put', row: change.row };
}

/**
 * Folds the changes of the given subscriptions into one effect per row. Changes for other subscription ids (a
 * subscription this client no longer has) are ignored. One subscription per table means a row's changes arrive
 * once per database change, in transaction order.
 */
export function planFrame(changes: readonly Change[], subscriptions: ReadonlySet<string>): FramePlan {
  const plan: FramePlan = new Map();
  for (const change of changes) {
    if (!subscriptions.has(change.id)) continue;
    let rows = plan.get(change.table);
    if (!rows) {
      rows = new Map();
      plan.set(change.table, rows);
    }
    rows.set(change.row.id, combine(rows.get(change.row.id), change));
  }
  return plan;
}

/** Applies a patch effect to the stored row (none stored: the patch alone, which is all the client knows). */
export function applyPatch(stored: Row | undefined, patch: SyncedRow): SyncedRow {
  return stored ? ({ ...stored, ...patch } as SyncedRow) : patch;
}

/** Subscription ids that appear in a frame. */
export function subscriptionsIn(changes: readonly Change[]): Set<string> {
  return new Set(changes.map((c) => c.id));
}

/**
 * After a refetch's last snapshot frame and handoff: which stored ids to delete (stored but not in the new
 * snapshot, nor inserted by a handoff change).
 */
export function staleIds(stored: readonly string[], seen: ReadonlySet<string>): string[] {
  return stored.filter((id) => !seen.has(id));
}
