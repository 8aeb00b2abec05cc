// Guest -> user upgrade, as the seed plans it (docs/api.md, "Guest -> user upgrade"):
//
//   guest: writes go to deeprecall_guest_<device> (outbox + local view), never sent, no owner ids anywhere
//   signIn():
//     1. token -> user id (the server will assign it as owner_id; nothing local is rewritten)
//     2. POST /v1/blobs/coordinate with the device's CAS blobs (first: assets reference blobs_meta)
//     3. POST /v1/batch with the guest's ops, in the order they were made, with the guest outbox's client_id and
//        the seqs and op ids they got then
//     4. open deeprecall_<user>_<device>, let it catch up
//     5. seal the guest database: in one transaction, check that its outbox holds nothing unsent and mark it sealed
//        (from then on write() refuses it); what another guest tab wrote since step 3 began is sent first
//     6. make the user's database the app's database, and delete the guest database
//
// Why the seal: the flush in step 3 covers the ops pending when it starts, and step 4 can take up to
// `signInCatchUpMs`. Another tab still working as a guest (or, for a resumed upgrade, anything else writing to the
// guest database) may write meanwhile, and deleting the database would lose those writes silently. Checking "nothing
// unsent" and then deleting is not enough on its own (a write can land between the two, from another tab); the seal
// makes the check and the end of writing one atomic step, and every write checks the seal in its own transaction
// (outbox.ts, `enqueue`). A tab whose write meets the seal continues as the user the work went to (client.ts,
// `write`). A sealed guest database holds nothing that is not the user's already, so whoever meets it later (a
// crash before the deletion) may delete it.
//
// Interrupted anywhere (page closed, network gone), the guest database is still there; the next start with a token
// (or the next signIn()) runs the same steps again. Step 2 is idempotent on the server; in step 3 the guest
// outbox's ops carry its client_id and their seqs, so ops already committed answer `duplicate` (and ops whose
// answer did arrive are marked acked and not sent again): nothing is created twice.
//
// If the rerun is for another user than the interrupted one (the person signed in with another account), the ops
// not yet sent continue under a new client id: the server keeps sequences per user, and what the first user
// received is not sent to the second.

import { Dexie } from 'dexie';
import { coordinate } from './blobs.js';
import { OUTBOX, STATE, guestDbName, type SyncDatabase } from './database.js';
import { FlushError, type Outbox } from './outbox.js';
import type { Transport } from './transport.js';
import type { BlobRejection, BlobReport } from './types.js';

/** Whether an unfinished (or never started) guest session left a database on this device. */
export function guestDatabaseExists(deviceId: string): Promise<boolean> {
  return Dexie.exists(guestDbName(deviceId));
}

export interface UpgradeInput {
  /** The guest database's outbox (its ops are the guest's work, in order). */
  outbox: Outbox;
  transport: Transport;
  deviceId: string;
  userId: string;
  localBlobs?: () => Promise<BlobReport[]>;
  maxBlobsPerRequest?: number;
  /** Told of each blob report not sent as `localBlobs()` gave it (repaired, merged or left out; blobs.ts). */
  onBlobRefused?: (rejection: BlobRejection) => void;
  /** Aborts the upgrade (signOut()): no request is started after that, and the guest database is not sealed. */
  signal?: AbortSignal;
}

/** Rounds of "send what came in, check again" before the upgrade gives up for now (a guest tab that keeps writing). */
const SEAL_ROUNDS = 10;

/**
 * Steps 2 and 3: report the local blobs and send the guest's ops as the signed-in user. Throws (and can simply be
 * run again) when the server could not be reached; ops the server refuses are reported as rejections and dropped,
 * and so are blob reports the server refuses one by one (`onBlobRefused`; others are repaired first where that is
 * certain), so neither one bad op nor one bad blob report can block the upgrade for ever.
 */
export async function flushGuestWork(input: UpgradeInput): Promise<{ txids: string[]; blobs: number }> {
  const { outbox } = input;
  outbox.sendAs = input.userId;
  const previous = await outbox.db.state.get('upgrade');
  if (previous && previous.key === 'upgrade' && previous.userId !== input.userId) await outbox.restartSequence();
  await outbox.db.state.put({ key: 'upgrade', userId: input.userId, startedAt: Date.now() });
  const blobs = input.localBlobs ? await input.localBlobs() : [];
  if (blobs.length > 0) {
    // As the user the upgrade is for, like the ops (outbox.sendAs): if the app's token has switched to another
    // account meanwhile, the guest's blob shells must not become that account's.
    await coordinate(input.transport, input.deviceId, blobs, {
      complete: false,
      maxPerRequest: input.maxBlobsPerRequest ?? 1000,
      asUser: input.userId,
      ...(input.onBlobRefused ? { onRefused: input.onBlobRefused } : {}),
    });
  }
  // Keep acknowledged ops (marked `acked`) in the guest database until it is deleted: the guest view stays intact
  // while the upgrade runs, and a rerun does not send them again.
  const txids = await outbox.flush({ retainSettled: true, signal: input.signal });
  return { txids, blobs: blobs.length };
}

/**
 * Step 5: seals the guest database once its outbox holds nothing unsent, sending what was written since the flush
 * began (another guest tab) first. Resolves with the txids of those sends; throws FlushError when they could not be
 * sent, when writes keep coming, or (`cancelled`) when `signal` aborts. Only after this may the database be deleted.
 */
export async function sealGuestWork(input: UpgradeInput): Promise<string[]> {
  const { outbox, signal } = input;
  const txids: string[] = [];
  for (let round = 0; ; round++) {
    if (signal?.aborted) throw new FlushError('cancelled', 'the upgrade was cancelled', false);
    if (await sealIfSent(outbox.db, input.userId)) return txids;
    if (round === SEAL_ROUNDS) {
      throw new FlushError('guest_busy', 'guest writes keep coming in (another tab?); the upgrade finishes later', true);
    }
    txids.push(...(await outbox.flush({ retainSettled: true, signal })));
  }
}

/** In one transaction: if no op is pending, mark the database sealed (or leave it sealed). */
function sealIfSent(db: SyncDatabase, userId: string): Promise<boolean> {
  return db.transaction('rw', [db.table(OUTBOX), db.table(STATE)], async () => {
    const pending = await db.outbox.where('[status+seq]').between(['pending', -Infinity], ['pending', Infinity]).count();
    if (pending > 0) return false;
    if (!(await db.state.get('sealed'))) await db.state.put({ key: 'sealed', userId, sealedAt: Date.now() });
    return true;
  });
}

/**
 * Deletes the guest database if an upgrade sealed it and stopped before deleting it (its work is a user's already),
 * so that a new guest session starts empty instead of in a database that refuses writes.
 */
export async function deleteSealedGuest(deviceId: string): Promise<void> {
  const name = guestDbName(deviceId);
  if (!(await Dexie.exists(name))) return;
  // Opened as it is (no schema of ours): reading must not upgrade it.
  const db = new Dexie(name);
  let sealed = false;
  try {
    await db.open();
    if (db.tables.some((t) => t.name === STATE)) sealed = (await db.table(STATE).get('sealed')) !== undefined;
  } finally {
    db.close();
  }
  if (sealed) await Dexie.delete(name);
}
