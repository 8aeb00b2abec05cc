// Blob helpers: report this device's CAS through `/v1/blobs/coordinate` (chunked to the server's limit), and the
// seed's unified BlobHandle, merged from the local copies of blobs_meta, device_blobs and assets (so it works
// offline and while the stream is down), or fetched from the server.

import type { Outcome, Transport } from './transport.js';
import type { BlobHandle, BlobRejection, BlobReport, CoordinateResult, JsonValue, Row } from './types.js';

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

const SHA256 = /^[0-9a-fA-F]{64}$/;
const I32_MAX = 2_147_483_647;
const HEALTH = new Set(['healthy', 'missing', 'modified', 'relocated']);
const COUNTS = ['page_count', 'image_width', 'image_height'] as const;
const TEXTS = ['mime', 'filename', 'path'] as const;
/** A UTF-16 surrogate without its other half: JSON escapes it, and the server's JSON parser refuses the whole body. */
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

/** A report as it will be sent, with the app's original and what was changed in it. */
export interface PreparedBlob {
  report: BlobReport;
  original: BlobReport;
  /** Fields removed because the server would refuse them (their message), empty when sent as given. */
  cleaned: string[];
}

/**
 * Pure: one report as `/v1/blobs/coordinate` accepts it (docs/api.md; the server's `DeviceBlobReport::check`), or
 * why it cannot be sent. Only what is certain is repaired: a sha256 in upper case is lowered; an optional field the
 * server would refuse (`page_count: -1`, a `path` holding U+0000, a number where a string belongs) is left out, as
 * if unknown; fields a report does not have are not sent (the server refuses unknown fields). A report whose
 * sha256 or size is wrong, or whose `health` is none of the four, is not sent at all (what it should say is not
 * known).
 */
export function prepareBlobReport(input: BlobReport): PreparedBlob | { refused: { code: string; message: string } } {
  const b = input as unknown as { [k: string]: unknown };
  if (typeof b !== 'object' || b === null || Array.isArray(b)) {
    return { refused: { code: 'invalid_request', message: 'a blob report must be an object' } };
  }
  const sha = b['sha256'];
  if (typeof sha !== 'string' || !SHA256.test(sha)) {
    return { refused: { code: 'invalid_sha256', message: 'sha256 must be 64 hexadecimal characters' } };
  }
  const size = b['size'];
  if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0) {
    return { refused: { code: 'invalid_value', message: 'size must be an integer from 0 to 2^53 - 1' } };
  }
  const health = b['health'];
  if (health !== undefined && health !== null && !(typeof health === 'string' && HEALTH.has(health))) {
    return { refused: { code: 'invalid_value', message: 'health must be healthy, missing, modified or relocated' } };
  }
  const report: BlobReport = { sha256: sha.toLowerCase(), size };
  const cleaned: string[] = [];
  for (const k of TEXTS) {
    const v = b[k];
    if (v === undefined) continue;
    if (v === null || (typeof v === 'string' && !v.includes('\0') && !LONE_SURROGATE.test(v))) report[k] = v;
    else cleaned.push(`${k} must be text without the character U+0000 or a lone surrogate (left out)`);
  }
  for (const k of COUNTS) {
    const v = b[k];
    if (v === undefined) continue;
    if (v === null || (typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= I32_MAX)) report[k] = v;
    else cleaned.push(`${k} must be an integer from 0 to ${I32_MAX} (left out)`);
  }
  if (health !== undefined) report.health = health as BlobReport['health'];
  return { report, original: input, cleaned };
}

/** How much a report says: its optional fields that are set. */
function known(r: BlobReport): number {
  return [...TEXTS, ...COUNTS, 'health' as const].filter((k) => r[k] !== undefined && r[k] !== null).length;
}

/**
 * Pure: the reports to send, at most one per sha256 (the server refuses a request that names one twice), and a
 * BlobRejection for each report not sent as given. Of two reports of one sha256 the one that says more is kept (the
 * first on a tie) and the other is told as `duplicate_sha256`, with `sent` the report kept.
 */
export function prepareBlobReports(blobs: readonly BlobReport[]): { prepared: PreparedBlob[]; refused: BlobRejection[] } {
  const prepared: PreparedBlob[] = [];
  const refused: BlobRejection[] = [];
  const bySha = new Map<string, number>();
  const duplicates: PreparedBlob[] = [];
  for (const blob of blobs) {
    const p = prepareBlobReport(blob);
    if ('refused' in p) {
      refused.push({ blob, sent: null, ...p.refused, status: 0 });
      continue;
    }
    const at = bySha.get(p.report.sha256);
    if (at === undefined) {
      bySha.set(p.report.sha256, prepared.length);
      prepared.push(p);
    } else if (known(p.report) > known(prepared[at]!.report)) {
      duplicates.push(prepared[at]!);
      prepared[at] = p;
    } else {
      duplicates.push(p);
    }
  }
  for (const p of prepared) {
    if (p.cleaned.length > 0) refused.push({ blob: p.original, sent: p.report, code: 'invalid_value', message: p.cleaned.join('; '), status: 0 });
  }
  for (const d of duplicates) {
    const kept = prepared[bySha.get(d.report.sha256)!]!.report;
    refused.push({ blob: d.original, sent: kept, code: 'duplicate_sha256', message: 'a sha256 appears twice; the report that says more was sent', status: 0 });
  }
  return { prepared, refused };
}

export interface CoordinateOptions {
  /** The list is everything the device holds (one request; the server marks the device's other blobs missing). */
  complete?: boolean;
  /** Blobs per request (the server's `--max-ops-per-batch`); a 413 halves it for the rest of the call. */
  maxPerRequest?: number;
  /** Sent only with a token of this user (else BlobError `other_user`, nothing sent). */
  asUser?: string;
  /** Told of every report not sent as given (`blobRejected`). */
  onRefused?: (rejection: BlobRejection) => void;
}

/**
 * Reports blobs for a device, in requests of at most `maxPerRequest` blobs. Each report is checked first
 * (`prepareBlobReports`): one the server would refuse is repaired where that is certain, else left out, and either
 * way `onRefused` is told. A request the server refuses because of one blob (400 or 422 with `blob_index`) is sent again
 * without it (told likewise), and a 413 halves the requests; so one bad report cannot block the others, or the guest
 * upgrade, for ever. Any other refusal, a network failure or a 5xx throws BlobError: nothing is left out for it, and
 * the call can simply be made again.
 *
 * `complete: true` (the list is everything the device holds) is only possible in one request, and with nothing left
 * out: a blob missing from the list would be marked missing on the device. Then a report that cannot be sent throws
 * BlobError (nothing sent), as do more blobs than fit in a request and a 413.
 */
export async function coordinate(
  transport: Transport,
  deviceId: string,
  blobs: readonly BlobReport[],
  opts: CoordinateOptions = {},
): Promise<CoordinateResult> {
  let max = Math.max(1, opts.maxPerRequest ?? 1000);
  // The request size before the halving that led to one report left out alone (too large, or refused by a
  // constraint): restored once it is left out, so the rest of the call does not go one blob per request. (If the
  // halving was for a lower limit of the server, that costs a few 413s again.)
  let beforeHalving: number | undefined;
  const complete = opts.complete ?? false;
  if (!Array.isArray(blobs)) throw new TypeError('coordinate: blobs must be an array of BlobReport');
  const { prepared, refused } = prepareBlobReports(blobs);
  if (complete) {
    const dropped = refused.find((r) => r.sent === null);
    if (dropped) {
      throw new BlobError(dropped.code, `complete: true needs every blob of the device, and one cannot be sent: ${dropped.message} (sha256 ${String(dropped.blob?.sha256)})`, 0);
    }
    if (prepared.length > max) {
      throw new BlobError(
        'too_many_blobs',
        `complete: true needs all blobs in one request (at most ${max}); report them with complete: false`,
        0,
      );
    }
  }
  for (const r of refused) opts.onRefused?.(r);
  const total: CoordinateResult = { txids: [], meta_created: 0, meta_updated: 0, devices_upserted: 0, marked_missing: 0 };
  const queue = [...prepared];
  // With complete: true one request, even an empty one; otherwise none for no blobs.
  for (let i = 0; i < queue.length || (complete && total.txids.length === 0); ) {
    const chunk = queue.slice(i, i + max);
    const outcome = await transport.coordinate({ device_id: deviceId, complete, blobs: chunk.map((p) => p.report) }, opts.asUser);
    if (outcome.kind === 'ok') {
      const r = outcome.value;
      total.txids.push(r.txid);
      total.meta_created += r.meta_created;
      total.meta_updated += r.meta_updated;
      total.devices_upserted += r.devices_upserted;
      total.marked_missing += r.marked_missing;
      i += chunk.length;
      continue;
    }
    if (complete) fail(outcome);
    const index = outcome.kind === 'rejected' ? outcome.error.blob_index : undefined;
    if (outcome.kind === 'rejected' && index !== undefined && Number.isInteger(index) && index >= 0 && index < chunk.length) {
      // The server recorded nothing of the request: send it again without that blob.
      leaveOut(queue, i + index, outcome.status, outcome.error, opts);
      continue;
    }
    // Refusals that one blob may cause without the answer saying which: a 413 (the server takes fewer blobs or
    // bytes per request than configured, or one report is too large alone: a path of megabytes), and a 422
    // `constraint_violation` (a check constraint added to the blob tables by SQL: Postgres writes a request's blobs
    // in one statement). Halve, as /v1/batch does, until the request is one blob; that one cannot be sent, ever,
    // and is left out. The halving was for it, not for a lower limit of the server: back to the size before it.
    // Any other refusal without an index is not a blob's and fails the call.
    const isolate =
      outcome.kind === 'too_large' ||
      (outcome.kind === 'rejected' && outcome.status === 422 && outcome.error.code === 'constraint_violation');
    if (isolate && chunk.length > 1) {
      beforeHalving ??= max;
      max = Math.max(1, Math.floor(chunk.length / 2));
      continue;
    }
    if (isolate) {
      leaveOut(queue, i, outcome.status, outcome.error, opts);
      if (beforeHalving !== undefined) max = beforeHalving;
      beforeHalving = undefined;
      continue;
    }
    fail(outcome);
  }
  return total;
}

function leaveOut(queue: PreparedBlob[], at: number, status: number, error: { code: string; message: string }, opts: CoordinateOptions): void {
  const [p] = queue.splice(at, 1);
  if (p) opts.onRefused?.({ blob: p.original, sent: null, code: error.code, message: error.message, status });
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
    devicesTruncated: false,
    assetsTruncated: false,
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
    devicesTruncated: v['devices_truncated'] === true,
    assetsTruncated: v['assets_truncated'] === true,
    availableOn: Array.isArray(available) ? available.filter((d): d is string => typeof d === 'string') : [],
    availableLocally,
  };
}
