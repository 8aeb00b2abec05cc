// Public types of @deeprecall/sync-client. No `any`: rows are JSON objects, and an app can narrow them per table
// with its own schema type (see `SyncClient<Schema>`).

/** A JSON value as the server sends and accepts it. */
export type JsonValue = string | number | boolean | null | JsonValue[] | { [key: string]: JsonValue };

/** A row of a synced table: column name -> JSON value. Every synced row has a string `id` (a UUID). */
export type Row = { [column: string]: JsonValue };

/** A row as the server sends it, always with an id. */
export type SyncedRow = Row & { id: string };

/** The kinds of write `/v1/batch` knows (docs/api.md). */
export type OpKind = 'insert' | 'upsert' | 'update' | 'delete';

/** One write as the app hands it to `sync.write()`. `row.id` may be omitted for an insert (a UUID is generated). */
export interface WriteOp<Table extends string = string> {
  table: Table;
  kind: OpKind;
  row: Row;
}

/** A write after `sync.write()` accepted it: its row id and op id are fixed from now on (retries reuse them). */
export interface WrittenOp {
  opId: string;
  table: string;
  kind: OpKind;
  rowId: string;
  /** Position in this outbox, strictly increasing per outbox (see README, "Outbox"). */
  seq: number;
}

/**
 * Client state (README, "State machine"):
 * - `guest`: no token; writes stay in the guest database and are never sent;
 * - `connecting`: signed in, opening the stream or catching up (snapshot / resume) — or waiting to retry;
 * - `live`: every subscription is up to date and changes arrive as they commit;
 * - `offline`: the browser reports no network, or no token could be obtained; writes queue and are sent later.
 */
export type SyncState = 'guest' | 'connecting' | 'live' | 'offline';

/** A write the server refused (4xx naming the op): it was removed from the outbox and its local effect undone. */
export interface Rejection {
  op: { opId: string; table: string; kind: OpKind; row: Row };
  table: string;
  rowId: string;
  /** The server's stable error code, e.g. `constraint_violation`, `foreign_key_violation`, `conflict`. */
  code: string;
  /** The server's message, for humans. */
  message: string;
  /** HTTP status of the refusal (0 when the client refused the op itself, e.g. larger than a batch may be). */
  status: number;
}

/**
 * A write the server refused that the client changed and sent again instead of dropping it (event `repaired`).
 * Today one case: an annotation whose `asset_id` names an asset the server does not have (its insert was refused, e.g.
 * for want of its blob's shell, or it was deleted on another device) is sent with `asset_id: null`, keeping
 * everything else (`sha256`, `work_id`, `page`, `geometry`, …), as Postgres itself does when an asset is deleted.
 */
export interface Repair {
  /** The op as it was queued. */
  op: { opId: string; table: string; kind: OpKind; row: Row };
  table: string;
  rowId: string;
  /** The row as it is sent now (same op id, same seq). */
  row: Row;
  /** The server's code for the refusal that led to the repair, e.g. `foreign_key_violation`. */
  code: string;
  /** What was changed and why, with the server's message. */
  message: string;
  /** HTTP status of the refusal. */
  status: number;
}

/** A problem the client cannot attribute to one op; it keeps retrying where that makes sense. */
export interface SyncErrorEvent {
  /** Where it happened. */
  source: 'batch' | 'stream' | 'token' | 'upgrade' | 'blobs';
  code: string;
  message: string;
  /** True when the client retries on its own. */
  retrying: boolean;
}

/** One blob of the device's local content-addressed store, as `/v1/blobs/coordinate` takes it. */
export interface BlobReport {
  sha256: string;
  size: number;
  mime?: string | null;
  filename?: string | null;
  path?: string | null;
  page_count?: number | null;
  image_width?: number | null;
  image_height?: number | null;
  health?: 'healthy' | 'missing' | 'modified' | 'relocated';
}

/**
 * A blob report that was not sent as the app gave it (event `blobRejected`): repaired, merged into another report of
 * the same sha256, or left out. The other reports are sent regardless (a guest's sign-in goes on).
 */
export interface BlobRejection {
  /** The report as the app gave it (`localBlobs()` or `blobs.coordinate()`). */
  blob: BlobReport;
  /**
   * What was sent in its place: the report without the fields the server would refuse (`invalid_value`), or the
   * other report of the same sha256 (`duplicate_sha256`); null when nothing of it was sent.
   */
  sent: BlobReport | null;
  /** `invalid_sha256`, `invalid_value`, `duplicate_sha256`, or the server's code (e.g. `payload_too_large`). */
  code: string;
  /** What was wrong, for humans. */
  message: string;
  /** HTTP status of the server's refusal; 0 when the client found the problem before sending. */
  status: number;
}

/** The answer of `/v1/blobs/coordinate`, summed over the requests it took. */
export interface CoordinateResult {
  txids: string[];
  meta_created: number;
  meta_updated: number;
  devices_upserted: number;
  marked_missing: number;
}

/** The seed's unified view of one blob: the three tables merged, plus whether the bytes are on this device. */
export interface BlobHandle {
  sha256: string;
  meta: Row | null;
  devices: Row[];
  assets: Row[];
  /**
   * True when the server cut `devices` / `assets` (at most 1,000 rows and about 4 MiB of each per answer; see
   * docs/api.md). Always false for a handle merged from the local tables, which holds every row.
   */
  devicesTruncated: boolean;
  assetsTruncated: boolean;
  /** device ids whose `device_blobs` row says `present`. */
  availableOn: string[];
  /** Whether this device's CAS has the bytes (from the `hasLocalBlob` option; else whether this device's row says present). */
  availableLocally: boolean;
}

/** Options of `createSyncClient`. */
export interface SyncClientOptions {
  /** Server base URL, e.g. `https://sync.example.com` (http(s); the stream uses ws(s) on the same host). */
  url: string;
  /** Persistent device UUID (generate once, store locally; never "web" or "server"). */
  deviceId: string;
  /**
   * Returns the API token of the signed-in user, or null for a guest. Called at start, before a token expires, and
   * when the server refuses one. Throwing (e.g. offline) means "unknown": the client keeps the last known user.
   */
  getToken: () => Promise<string | null>;
  /** Synced tables to subscribe and write (default: the eight tables of schema version 1). */
  tables?: string[];
  /**
   * Lists the blobs in this device's CAS; `signIn()` reports them through `/v1/blobs/coordinate` first (a guest's
   * `assets` rows need their blob's shell). Configure it if guests can create assets.
   */
  localBlobs?: () => Promise<BlobReport[]>;
  /** Whether this device's CAS holds the bytes of a blob (for `BlobHandle.availableLocally`). */
  hasLocalBlob?: (sha256: string) => Promise<boolean>;
  /** Ops per `/v1/batch` request (default 1000, the server's default `--max-ops-per-batch`). */
  maxOpsPerBatch?: number;
  /** Bytes per `/v1/batch` body (default 8 MiB, the server's default `--max-body-bytes`). */
  maxBatchBytes?: number;
  /** How long `signIn()` waits for the user's database to catch up before switching to it anyway (default 30 s). */
  signInCatchUpMs?: number;
  /** Custom `fetch` (tests, instrumentation). */
  fetch?: typeof fetch;
  /** Custom WebSocket constructor (tests, Node). */
  WebSocket?: typeof WebSocket;
}

/** Counters for diagnostics and tests. */
export interface SyncStats {
  /** WebSocket connections opened (successfully) since start. */
  connections: number;
  /** `refresh_token` messages answered with `token_refreshed`. */
  tokenRefreshes: number;
  /** `/v1/batch` requests answered 200. */
  batchesSent: number;
  /** `txn` frames applied. */
  framesApplied: number;
}
