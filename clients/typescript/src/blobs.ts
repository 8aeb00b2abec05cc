// Blob helpers: report this device's CAS through `/v1/blobs/coordinate` (chunked to the server's limit), and the
// seed's unified BlobHandle, merged from the local copies of blobs_meta, device_blobs and assets (so it works
// offline and while the stream is down), or fetched from the server.

import type { Outcome, Transport } from './transport.js';
import type { BlobHandle, BlobReport, CoordinateResult, JsonValue, Row } from './types.js';

/** A failed blob request. */
export class BlobError extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly status: number,
  ) {
    super(message);
    this.name = 'BlobError';
  }
}

function fail(outcome: Exclude<Outcome<unknown>, { kind: 'ok' }>): never {
  const status = 'status' in outcome ? outcome.status : 401;
  throw new BlobError(outcome.error.code, outcome.error.message, status);
}

/** Pure: splits reports into requests of at most `max` blobs. */
export function chunkBlobs(blobs: readonly BlobReport[], max: number): BlobReport[][] {
  const out: BlobReport[][] = [];
  for (let i = 0; i < blobs.length; i += max) out.push(blobs.slice(i, i + max));
  return out;
}

/**
 * Reports blobs for a device. `complete: true` (the list is everything the device holds; the server marks the
 * device's other blobs missing) is only possible in one request: with more blobs than fit, it is refused here
 * rather than silently marking the first requests' blobs missing. With `asUser`, every request goes out only with a
 * token of that user (else BlobError `other_user`, nothing sent).
 */
export async function coordinate(
  transport: Transport,
  deviceId: string,
  blobs: readonly BlobReport[],
  opts: { complete?: boolean; maxPerRequest?: number; asUser?: string } = {},
): Promise<CoordinateResult> {
  const max = opts.maxPerRequest ?? 1000;
  const complete = opts.complete ?? false;
  if (complete && blobs.length > max) {
    throw new BlobError(
      'too_many_blobs',
      `complete: true needs all blobs in one request (at most ${max}); report them with complete: false`,
      0,
    );
  }
  const total: CoordinateResult = { txids: [], meta_created: 0, meta_updated: 0, devices_upserted: 0, marked_missing: 0 };
  const chunks = blobs.length === 0 ? (complete ? [[]] : []) : chunkBlobs(blobs, max);
  for (const chunk of chunks) {
    const outcome = await transport.coordinate({ device_id: deviceId, complete, blobs: chunk }, opts.asUser);
    if (outcome.kind !== 'ok') fail(outcome);
    const r = outcome.value;
    total.txids.push(r.txid);
    total.meta_created += r.meta_created;
    total.meta_updated += r.meta_updated;
    total.devices_upserted += r.devices_upserted;
    total.marked_missing += r.marked_missing;
  }
  return total;
}

const str = (v: JsonValue | undefined): string => (typeof v === 'string' ? v : '');

/** Pure: the BlobHandle of one sha256 from rows of the three tables (any order, any owner-less local rows). */
export function mergeBlobHandle(
  sha256: string,
  meta: readonly Row[],
  devices: readonly Row[],
  assets: readonly Row[],
  availableLocally: boolean,
): BlobHandle {
  const mine = (r: Row): boolean => r['sha256'] === sha256;
  const devs = devices.filter(mine).sort((a, b) => str(a['device_id']).localeCompare(str(b['device_id'])));
  const assetRows = assets
    .filter(mine)
    .sort((a, b) => str(a['created_at']).localeCompare(str(b['created_at'])) || str(a['id']).localeCompare(str(b['id'])));
  return {
    sha256,
    meta: meta.find(mine) ?? null,
    devices: devs,
    assets: assetRows,
    availableOn: devs.filter((d) => d['present'] === true).map((d) => str(d['device_id'])),
    availableLocally,
  };
}

/** The server's BlobHandle (`GET /v1/blobs/{sha256}`), or null when the user has no row for it. */
export async function fetchBlobHandle(transport: Transport, sha256: string, availableLocally: boolean): Promise<BlobHandle | null> {
  const outcome = await transport.blob(sha256);
  if (outcome.kind !== 'ok') {
    if (outcome.kind === 'rejected' && outcome.status === 404) return null;
    fail(outcome);
  }
  const v = outcome.value;
  const rows = (x: JsonValue | undefined): Row[] =>
    Array.isArray(x) ? x.filter((r): r is Row => typeof r === 'object' && r !== null && !Array.isArray(r)) : [];
  const meta = v['meta'];
  const available = v['available_on'];
  return {
    sha256,
    meta: typeof meta === 'object' && meta !== null && !Array.isArray(meta) ? meta : null,
    devices: rows(v['devices']),
    assets: rows(v['assets']),
    availableOn: Array.isArray(available) ? available.filter((d): d is string => typeof d === 'string') : [],
    availableLocally,
  };
}
