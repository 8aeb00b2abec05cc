// Guest -> user upgrade, as the seed plans it (docs/api.md, "Guest -> user upgrade"):
//
//   guest: writes go to deeprecall_guest_<device> (outbox + local view), never sent, no owner ids anywhere
//   signIn():
//     1. token -> user id (the server will assign it as owner_id; nothing local is rewritten)
//     2. POST /v1/blobs/coordinate with the device's CAS blobs (first: assets reference blobs_meta)
//     3. POST /v1/batch with the guest's ops, in the order they were made, with the guest outbox's client_id and
//        the seqs and op ids they got then
//     4. open deeprecall_<user>_<device>, let it catch up, make it the app's database
//     5. delete the guest database
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
import { guestDbName } from './database.js';
import type { Outbox } from './outbox.js';
import type { Transport } from './transport.js';
import type { BlobReport } from './types.js';

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
}

/**
 * Steps 2 and 3: report the local blobs and send the guest's ops as the signed-in user. Throws (and can simply be
 * run again) when the server could not be reached; ops the server refuses are reported as rejections and dropped,
 * so one bad op cannot block the upgrade for ever.
 */
export async function flushGuestWork(input: UpgradeInput): Promise<{ txids: string[]; blobs: number }> {
  const { outbox } = input;
  outbox.sendAs = input.userId;
  const previous = await outbox.db.state.get('upgrade');
  if (previous && previous.key === 'upgrade' && previous.userId !== input.userId) await outbox.restartSequence();
  await outbox.db.state.put({ key: 'upgrade', userId: input.userId, startedAt: Date.now() });
  const blobs = input.localBlobs ? await input.localBlobs() : [];
  if (blobs.length > 0) {
    await coordinate(input.transport, input.deviceId, blobs, {
      complete: false,
      maxPerRequest: input.maxBlobsPerRequest ?? 1000,
    });
  }
  // Keep acknowledged ops (marked `acked`) in the guest database until it is deleted: the guest view stays intact
  // while the upgrade runs, and a rerun does not send them again.
  const txids = await outbox.flush({ retainSettled: true });
  return { txids, blobs: blobs.length };
}
