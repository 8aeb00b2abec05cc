// @deeprecall/sync-client: public entry point.

export { createSyncClient, SyncClient, SignInError } from './client.js';
export type { SyncEvents, TableRows } from './client.js';
export { FlushError } from './outbox.js';
export { BlobError } from './blobs.js';
export { DEFAULT_TABLES, guestDbName, userDbName } from './database.js';
export type {
  BlobHandle,
  BlobRejection,
  BlobReport,
  CoordinateResult,
  JsonValue,
  OpKind,
  Rejection,
  Repair,
  Row,
  SyncClientOptions,
  SyncErrorEvent,
  SyncState,
  SyncStats,
  SyncedRow,
  WriteOp,
  WrittenOp,
} from './types.js';
