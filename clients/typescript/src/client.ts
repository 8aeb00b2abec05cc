// The client: wires one session (database + applier + outbox + stream) for the current identity, and moves
// between identities (guest -> user on signIn, user -> guest on signOut). The state machine is in README.md.

import { Dexie } from 'dexie';
import { Applier, type ApplierEvents } from './applier.js';
import { coordinate, fetchBlobHandle, mergeBlobHandle } from './blobs.js';
import { DEFAULT_TABLES, SyncDatabase, guestDbName, userDbName } from './database.js';
import { Emitter, SerialQueue } from './events.js';
import { deleteSealedGuest, flushGuestWork, guestDatabaseExists, sealGuestWork, type UpgradeInput } from './guest.js';
import { GuestSealedError, Outbox, type OutboxEvents } from './outbox.js';
import { mergeRows } from './overlay.js';
import { TabLeadership } from './leader.js';
import { LiveStream, type StreamEvents, type StreamStatus } from './stream.js';
import { TokenSource } from './token.js';
import { Transport } from './transport.js';
import type {
  BlobHandle,
  BlobRejection,
  BlobReport,
  CoordinateResult,
  Rejection,
  Repair,
  Row,
  SyncClientOptions,
  SyncErrorEvent,
  SyncState,
  SyncStats,
  WriteOp,
  WrittenOp,
} from './types.js';

/** Events of a SyncClient (`sync.on(name, listener)`; each returns an unsubscribe function). */
export interface SyncEvents {
  /** `sync.state` changed. */
  state: SyncState;
  /** A write was refused by the server; it is gone from the outbox and its local effect undone. */
  rejected: Rejection;
  /**
   * A blob report (`localBlobs()` at sign-in, or `blobs.coordinate()`) was not sent as given: repaired, merged with
   * another report of its sha256, or left out (`sent: null`). The other reports went on.
   */
  blobRejected: BlobRejection;
  /**
   * A write the server refused was changed and sent again instead of dropped: an annotation naming an asset the
   * server does not have goes with `asset_id: null` (its other columns, `sha256` included, unchanged).
   */
  repaired: Repair;
  /** Something went wrong that is not one op's fault (the client retries where it can). */
  error: SyncErrorEvent;
  /** A transaction from the stream was applied to the local database. */
  applied: { xid: string };
  /** `sync.db` is now another database (after signIn / signOut): re-run your queries. */
  database: { name: string; userId: string | null };
  /** The guest's work was sent and now belongs to this user (the guest database is deleted). */
  upgraded: { userId: string; txids: string[] };
  /** getToken() returned null while signed in: the stream stopped; writes still queue. Call signIn() or signOut(). */
  signedOut: { userId: string };
}

/** Rows of a table, narrowed by an app-provided schema (table name -> row type). */
export type TableRows<Schema, T extends string> = T extends keyof Schema ? Schema[T] : Row;

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
/** Acknowledged ops whose echo never matched are dropped after this long while live (see applier.sweep). */
const ACK_ECHO_GRACE_MS = 15_000;
/** `duplicate` ops (no xid to wait for) keep their local effect this long while live. */
const DUPLICATE_GRACE_MS = 2_000;

interface Session {
  mode: 'guest' | 'user';
  userId: string | null;
  db: SyncDatabase;
  applier: Applier;
  outbox: Outbox;
  stream: LiveStream | null;
  leadership: TabLeadership | null;
  applierEvents: Emitter<ApplierEvents>;
  streamStatus: StreamStatus | 'signed_out';
  unsubscribe: Array<() => void>;
  sweepTimer?: ReturnType<typeof setInterval>;
  /**
   * A guest session whose database another tab deleted (its sign-in sent the work to a user, guest.ts): it takes no
   * more writes, and `handover` is the switch to that user (writes wait for it and go there).
   */
  handover?: Promise<unknown>;
}

function lastUserKey(deviceId: string): string {
  return `deeprecall-sync:last-user:${deviceId}`;
}

function storage(): Storage | null {
  try {
    return (globalThis as { localStorage?: Storage }).localStorage ?? null;
  } catch {
    return null;
  }
}

/**
 * Thrown by signIn() when no token can be had or the guest's work could not be sent (run it again later), or with
 * code `cancelled` when signOut() was called before it finished.
 */
export class SignInError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'SignInError';
  }
}

export class SyncClient<Schema extends { [table: string]: Row } = { [table: string]: Row }> {
  readonly deviceId: string;
  readonly tables: readonly string[];
  /** Counters for diagnostics. */
  readonly stats: SyncStats = { connections: 0, tokenRefreshes: 0, batchesSent: 0, framesApplied: 0 };

  private readonly options: SyncClientOptions;
  private readonly tokens: TokenSource;
  private readonly transport: Transport;
  private readonly events = new Emitter<SyncEvents>();
  private session!: Session;
  private currentState: SyncState = 'guest';
  /**
   * Database switches run one at a time: two at once (signOut() racing a signIn()) would both close the same old
   * session, and one of the new ones would keep running unseen.
   */
  private readonly switches = new SerialQueue();
  /** Writes wait while the database is being switched (their target would be deleted under them). */
  private switching: Promise<unknown> | null = null;
  private signingIn: Promise<void> | null = null;
  /** Aborted by signOut(): the sign-in in flight stops before it switches to its user. */
  private signInAbort: AbortController | null = null;
  private signingOut: Promise<void> | null = null;
  private closed = false;
  private readonly onOnline = (): void => {
    this.session?.outbox.resetBackoff();
    this.session?.outbox.kick();
    if (this.session?.mode === 'user' && this.guestLeftover) void this.finishLeftoverUpgrade();
  };
  private readonly onOffline = (): void => this.updateState();
  private guestLeftover = false;
  /** This client among the tabs (leader.ts): its own relayed events are not heard twice. */
  private readonly tabId = Math.random().toString(36).slice(2) + Date.now().toString(36);
  private leftoverRunning: Promise<void> | null = null;
  /** Aborted by signOut(): the resumed upgrade stops before it sends anything more or seals the guest database. */
  private leftoverAbort: AbortController | null = null;

  /** Use `createSyncClient()`. */
  constructor(options: SyncClientOptions) {
    if (typeof options.url !== 'string' || !/^https?:\/\//.test(options.url)) {
      throw new TypeError('createSyncClient: url must be an http(s) URL of the sync server');
    }
    if (typeof options.deviceId !== 'string' || !UUID.test(options.deviceId)) {
      throw new TypeError('createSyncClient: deviceId must be a persistent UUID (generate it once and store it)');
    }
    if (typeof options.getToken !== 'function') throw new TypeError('createSyncClient: getToken must be a function');
    this.options = options;
    this.deviceId = options.deviceId.toLowerCase();
    this.tables = [...new Set(options.tables ?? DEFAULT_TABLES)];
    if (this.tables.length === 0) throw new TypeError('createSyncClient: tables must not be empty');
    this.tokens = new TokenSource(options.getToken);
    this.transport = new Transport(options.url, this.tokens, options.fetch);
  }

  /** Opens the right database for whoever getToken() says is signed in; finishes an interrupted guest upgrade. */
  async start(): Promise<void> {
    const tok = await this.tokens.get();
    let userId: string | null = null;
    if (tok.ok) {
      userId = tok.claims.sub;
      storage()?.setItem(lastUserKey(this.deviceId), userId);
    } else if (tok.problem === 'signed_out') {
      storage()?.removeItem(lastUserKey(this.deviceId));
    } else {
      // No answer (offline?): keep working in the last signed-in user's database, its outbox included.
      userId = storage()?.getItem(lastUserKey(this.deviceId)) ?? null;
      this.events.emit('error', { source: 'token', code: tok.problem, message: tok.message, retrying: true });
    }
    globalThis.addEventListener?.('online', this.onOnline);
    globalThis.addEventListener?.('offline', this.onOffline);
    if (userId) {
      this.guestLeftover = await guestDatabaseExists(this.deviceId);
      this.setSession(this.openUser(userId));
      if (this.guestLeftover) void this.finishLeftoverUpgrade();
    } else {
      await deleteSealedGuest(this.deviceId);
      this.setSession(this.openGuest());
    }
  }

  /** The app's Dexie database: `deeprecall_guest_<deviceId>` or `deeprecall_<userId>_<deviceId>`. Read only. */
  get db(): Dexie {
    return this.session.db;
  }

  /** `guest`, `connecting`, `live` or `offline`. */
  get state(): SyncState {
    return this.currentState;
  }

  /** The signed-in user's id (the token's `sub`), or null for a guest. */
  get userId(): string | null {
    return this.session.userId;
  }

  on<K extends keyof SyncEvents>(event: K, listener: (value: SyncEvents[K]) => void): () => void {
    return this.events.on(event, listener);
  }

  /** Rejected writes (the op, its table and row id, the server's code and message). Returns an unsubscribe. */
  onRejected(listener: (rejection: Rejection) => void): () => void {
    return this.events.on('rejected', listener);
  }

  /** State changes. Returns an unsubscribe. */
  onStateChange(listener: (state: SyncState) => void): () => void {
    return this.events.on('state', listener);
  }

  /**
   * Applies ops locally at once (all or none) and, signed in, queues them for the server (flushed in the
   * background); a guest's ops stay local until signIn(). Resolves with each op's id, row id and seq.
   */
  async write(ops: ReadonlyArray<WriteOp<Extract<keyof Schema, string>>> | WriteOp<Extract<keyof Schema, string>>): Promise<WrittenOp[]> {
    this.assertOpen();
    const list: readonly WriteOp[] = Array.isArray(ops) ? ops : [ops as WriteOp];
    for (;;) {
      while (this.switching) await this.switching.catch(() => undefined);
      const session = this.session;
      try {
        const written = await session.outbox.enqueue(list);
        if (session.mode === 'user') session.outbox.kick();
        return written;
      } catch (e) {
        if (session.handover) {
          // Another tab deleted this guest database under the write (nothing of it was stored): write to where the
          // guest's work went.
          await session.handover;
          if (this.session === session) throw e; // the switch failed: do not retry on the closed database
          continue;
        }
        if (!(e instanceof GuestSealedError)) throw e;
        // Another tab's signIn() sent this guest database's work to a user and is deleting it (guest.ts): continue
        // as that user, whose database now holds that work, and write there (the app hears `database`).
        await this.switchTo(async (current) => {
          if (current !== session) return null;
          storage()?.setItem(lastUserKey(this.deviceId), e.userId);
          this.guestLeftover = await guestDatabaseExists(this.deviceId);
          return this.openUser(e.userId);
        });
      }
    }
  }

  /** The current rows of a table: synced rows with pending local writes laid over them. */
  async rows<T extends Extract<keyof Schema, string>>(table: T): Promise<Array<TableRows<Schema, T>>> {
    this.assertTable(table);
    const db = this.session.db;
    return db.transaction('r', [db.synced(table), db.local], async () => {
      const synced = await db.synced(table).toArray();
      const local = await db.local.where('table').equals(table).toArray();
      return mergeRows(synced, local) as unknown as Array<TableRows<Schema, T>>;
    });
  }

  /** One row as the app should see it, or undefined. */
  async row<T extends Extract<keyof Schema, string>>(table: T, id: string): Promise<TableRows<Schema, T> | undefined> {
    this.assertTable(table);
    const db = this.session.db;
    return db.transaction('r', [db.synced(table), db.local], async () => {
      const local = await db.local.get([table, id]);
      if (local) return (local.row ?? undefined) as TableRows<Schema, T> | undefined;
      return (await db.synced(table).get(id)) as TableRows<Schema, T> | undefined;
    });
  }

  /** Ops in the outbox (not yet committed, or committed and not yet back from the stream), oldest first. */
  async pendingOps(table?: string): Promise<WrittenOp[]> {
    const all = await this.session.db.outbox.orderBy('seq').toArray();
    return all
      .filter((o) => !o.filler && (table === undefined || o.table === table))
      .map((o) => ({ opId: o.opId, table: o.table, kind: o.kind, rowId: o.rowId, seq: o.seq }));
  }

  /** Ops not yet committed by the server (a guest's: all of them). */
  pendingCount(): Promise<number> {
    return this.session.outbox.pendingCount();
  }

  /**
   * Sends the outbox now. Resolves with the txids of the requests that committed ops (each comes back over the
   * stream: `awaitTxId`). A guest has nothing to send: resolves `[]`. Throws FlushError when the server could not
   * be reached (the ops stay queued and are retried in the background).
   */
  async flush(): Promise<string[]> {
    this.assertOpen();
    while (this.switching) await this.switching.catch(() => undefined);
    if (this.session.mode === 'guest') return [];
    return this.session.outbox.flush();
  }

  /** Resolves when the transaction `txid` (from flush()) has come back over the stream and is in the local database. */
  awaitTxId(txid: string, opts: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<void> {
    const signals: AbortSignal[] = [];
    if (opts.signal) signals.push(opts.signal);
    if (opts.timeoutMs !== undefined) signals.push(AbortSignal.timeout(opts.timeoutMs));
    const signal = signals.length === 0 ? undefined : signals.length === 1 ? signals[0] : AbortSignal.any(signals);
    return this.session.applier.awaitTxId(String(txid), signal);
  }

  /**
   * getToken() now returns a token. As a guest: report the local blobs, send the guest's work through /v1/batch
   * (the server assigns the owner), switch to the user's database and delete the guest's. Safe to run twice or
   * after an interruption: nothing is created twice. Signed in already: makes sure the stream runs.
   */
  signIn(): Promise<void> {
    this.assertOpen();
    // A sign-in that signOut() cancelled is not this one: signOut(); signIn() (an "other account" button) starts a
    // new sign-in, after the cancelled one has settled (and, in doSignIn, after the sign-out).
    if (!this.signingIn || this.signInAbort?.signal.aborted) {
      // What must finish first is taken now, not later: a signOut() that comes after this one waits for this
      // sign-in, so this sign-in must not wait for that sign-out.
      const before = [this.signingIn, this.signingOut];
      const abort = new AbortController();
      this.signInAbort = abort;
      const run: Promise<void> = this.doSignIn(abort.signal, before).finally(() => {
        if (this.signingIn === run) this.signingIn = null;
        if (this.signInAbort === abort) this.signInAbort = null;
      });
      this.signingIn = run;
    }
    return this.signingIn;
  }

  /**
   * Back to guest mode: stops syncing and opens a fresh guest database. The user's database stays on the device
   * (with any writes not yet sent; they go out at the next sign-in). A signIn() still running stops before it
   * switches to its user (it rejects with SignInError `cancelled`); when this resolves, the client is a guest and
   * no user session runs.
   */
  async signOut(): Promise<void> {
    this.assertOpen();
    storage()?.removeItem(lastUserKey(this.deviceId));
    this.tokens.invalidate();
    this.signInAbort?.abort();
    this.leftoverAbort?.abort();
    const run = this.doSignOut();
    this.signingOut = run;
    try {
      await run;
    } finally {
      if (this.signingOut === run) this.signingOut = null;
    }
  }

  /** Blob helpers. */
  readonly blobs = {
    /**
     * Reports blobs of a device's CAS through /v1/blobs/coordinate (chunked). Needs a signed-in user. Reports that
     * cannot be sent as given are repaired or left out and told through `blobRejected` (blobs.ts, `coordinate`).
     */
    coordinate: (deviceId: string, blobs: BlobReport[], opts: { complete?: boolean } = {}): Promise<CoordinateResult> =>
      coordinate(this.transport, deviceId, blobs, {
        ...(opts.complete !== undefined ? { complete: opts.complete } : {}),
        maxPerRequest: this.options.maxOpsPerBatch ?? 1000,
        onRefused: (r) => this.events.emit('blobRejected', r),
      }),
    /** The merged BlobHandle from the local tables (works offline and for guests). */
    handle: async (sha256: string): Promise<BlobHandle> => {
      const rows = async (t: string): Promise<Row[]> => (this.tables.includes(t) ? this.rows(t as Extract<keyof Schema, string>) : []);
      const local = (await this.options.hasLocalBlob?.(sha256)) ?? false;
      const handle = mergeBlobHandle(sha256, await rows('blobs_meta'), await rows('device_blobs'), await rows('assets'), local);
      if (!this.options.hasLocalBlob) {
        handle.availableLocally = handle.devices.some((d) => d['device_id'] === this.deviceId && d['present'] === true);
      }
      return handle;
    },
    /** The server's BlobHandle (GET /v1/blobs/{sha256}); null when the user has no row for it. */
    fetchHandle: async (sha256: string): Promise<BlobHandle | null> =>
      fetchBlobHandle(this.transport, sha256, (await this.options.hasLocalBlob?.(sha256)) ?? false),
  };

  /** Stops everything and closes the database (the data stays). */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    globalThis.removeEventListener?.('online', this.onOnline);
    globalThis.removeEventListener?.('offline', this.onOffline);
    // A sign-in or resumed upgrade still running would open (or send from) a database after this: stop them first.
    this.signInAbort?.abort();
    this.leftoverAbort?.abort();
    await this.signingIn?.catch(() => undefined);
    await this.leftoverRunning;
    await this.closeSession(this.session);
    this.events.clear();
  }

  // --- internals -------------------------------------------------------------------------------------------

  private assertOpen(): void {
    if (this.closed) throw new Error('this SyncClient is closed');
  }

  private assertTable(table: string): void {
    this.assertOpen();
    if (!this.tables.includes(table)) {
      throw new TypeError(`table ${JSON.stringify(table)} is not one of this client's tables (${this.tables.join(', ')})`);
    }
  }

  private newDb(name: string): SyncDatabase {
    return new SyncDatabase(name, this.tables);
  }

  private openGuest(): Session {
    const db = this.newDb(guestDbName(this.deviceId));
    const session = this.buildSession('guest', null, db);
    // Another tab's signIn() (or resumed upgrade) deletes this database once it has sent its work and sealed it.
    // Dexie's default would close it and reopen it by name at the next use, creating a new, empty guest database
    // that no seal guards: this tab would go on writing there, unsent, and its view would lose the guest's work.
    // Instead: read the seal (who the work went to) while the connection is still open, close it for good, and
    // continue as that user, as a write that meets the seal does (`write`).
    db.on('versionchange', (ev: IDBVersionChangeEvent) => {
      if (ev.newVersion !== null && ev.newVersion > 0) return undefined; // a schema upgrade: Dexie's default
      if (session.handover) return false;
      let done!: (userId: string | null) => void;
      const sealedFor = new Promise<string | null>((resolve) => (done = resolve));
      session.handover = this.handOver(session, sealedFor);
      db.state
        .get('sealed')
        .then(
          (r) => (r && r.key === 'sealed' ? r.userId : null),
          () => null,
        )
        .then((userId) => {
          db.close({ disableAutoOpen: true });
          done(userId);
        });
      return false; // not Dexie's default close (which reopens on next use)
    });
    // Opened now, so that a deletion by another tab reaches this tab even before its first read or write.
    db.open().catch(() => undefined);
    return session;
  }

  /**
   * The guest database of `session` was deleted by another tab: switch to the user its work went to (`sealedFor`,
   * else the last signed-in user), or, signed out meanwhile (no user remembered), to a fresh guest database.
   */
  private handOver(session: Session, sealedFor: Promise<string | null>): Promise<unknown> {
    return this.switchTo(async (current) => {
      const sealed = await sealedFor;
      if (current !== session) return null;
      const st = storage();
      const remembered = st ? st.getItem(lastUserKey(this.deviceId)) : null;
      // A sign-in remembers its user before it seals; a sign-out (or a start without a token) forgets it.
      const userId = st && remembered === null ? null : (sealed ?? remembered);
      if (!userId) return this.openGuest();
      storage()?.setItem(lastUserKey(this.deviceId), userId);
      // The tab that deleted it had sealed it: nothing in it was left unsent.
      this.guestLeftover = false;
      return this.openUser(userId);
    }).catch(() => undefined);
  }

  private openUser(userId: string): Session {
    const db = this.newDb(userDbName(userId, this.deviceId));
    const session = this.buildSession('user', userId, db);
    const streamEvents = new Emitter<StreamEvents>();
    session.stream = new LiveStream({
      url: this.options.url,
      tokens: this.tokens,
      applier: session.applier,
      userId,
      events: streamEvents,
      ...(this.options.WebSocket ? { WebSocket: this.options.WebSocket } : {}),
    });
    const stream = session.stream;
    const leadership = new TabLeadership(db.name, {
      lead: () => stream.start(),
      status: (s) => {
        // The leader's stream stopped for good (`signed_out`, `other_user`): this tab is as stopped as the leader,
        // and hears `signedOut` as the leader does.
        const stopped = s === 'signed_out' || s === 'other_user';
        const stoppedNow = stopped && session.streamStatus !== 'signed_out';
        session.streamStatus = stopped ? 'signed_out' : (s as StreamStatus);
        this.updateState();
        if (stoppedNow && s === 'signed_out') this.events.emit('signedOut', { userId });
      },
      applied: (xid) => session.applier.noteApplied(xid),
      event: (name, value) => {
        if (name === 'rejected') this.events.emit('rejected', value as Rejection);
        else if (name === 'repaired') this.events.emit('repaired', value as Repair);
      },
      restart: () => {
        // A follower's signIn() after the stream stopped: getToken() has a token again (or will say why not).
        if (session.streamStatus !== 'signed_out' || this.session !== session) return;
        session.streamStatus = 'connecting';
        leadership.publishStatus('connecting');
        this.updateState();
        stream.start();
      },
    }, this.tabId);
    session.leadership = leadership;
    session.unsubscribe.push(
      session.applierEvents.on('applied', ({ xid }) => leadership.publishApplied(xid)),
      streamEvents.on('status', (s) => {
        session.streamStatus = s;
        leadership.publishStatus(s);
        this.updateState();
      }),
      streamEvents.on('opened', () => {
        this.stats.connections++;
        session.outbox.resetBackoff();
        session.outbox.kick();
        if (this.guestLeftover) void this.finishLeftoverUpgrade();
      }),
      streamEvents.on('tokenRefreshed', () => {
        this.stats.tokenRefreshes++;
      }),
      streamEvents.on('error', (e) => this.events.emit('error', e)),
      streamEvents.on('stopped', ({ reason }) => {
        session.streamStatus = 'signed_out';
        // The other tabs follow this one's stream: they stop with it (and hear `signedOut` too).
        leadership.publishStatus(reason === 'other_user' ? 'other_user' : 'signed_out');
        this.updateState();
        if (reason === 'signed_out') this.events.emit('signedOut', { userId });
      }),
    );
    leadership.start();
    session.outbox.setEnabled(true);
    session.sweepTimer = setInterval(() => {
      if (leadership.isLeader) void session.applier.sweep(ACK_ECHO_GRACE_MS, DUPLICATE_GRACE_MS).catch(() => undefined);
    }, 1_000);
    return session;
  }

  private buildSession(mode: 'guest' | 'user', userId: string | null, db: SyncDatabase): Session {
    const writer = new SerialQueue();
    const applierEvents = new Emitter<ApplierEvents>();
    const applier = new Applier(db, writer, applierEvents);
    const outboxEvents = new Emitter<OutboxEvents>();
    const outboxLimits: { maxOps?: number; maxBytes?: number } = {};
    if (this.options.maxOpsPerBatch !== undefined) outboxLimits.maxOps = this.options.maxOpsPerBatch;
    if (this.options.maxBatchBytes !== undefined) outboxLimits.maxBytes = this.options.maxBatchBytes;
    const outbox = new Outbox({
      db,
      transport: this.transport,
      deviceId: this.deviceId,
      writer,
      events: outboxEvents,
      seenXid: (x) => applier.seen(x),
      limits: outboxLimits,
      userId,
    });
    const session: Session = {
      mode,
      userId,
      db,
      applier,
      applierEvents,
      outbox,
      stream: null,
      leadership: null,
      streamStatus: 'connecting',
      unsubscribe: [],
    };
    session.unsubscribe.push(
      applierEvents.on('applied', (e) => {
        this.stats.framesApplied++;
        this.events.emit('applied', e);
      }),
      // Heard in every tab of the app, not only in the one whose outbox happened to send the op (leader.ts).
      outboxEvents.on('rejected', (r) => {
        this.events.emit('rejected', r);
        session.leadership?.publishEvent('rejected', r);
      }),
      outboxEvents.on('repaired', (r) => {
        this.events.emit('repaired', r);
        session.leadership?.publishEvent('repaired', r);
      }),
      outboxEvents.on('error', (e) => this.events.emit('error', e)),
      outboxEvents.on('acked', () => {
        this.stats.batchesSent++;
      }),
    );
    return session;
  }

  private setSession(session: Session): void {
    this.session = session;
    this.events.emit('database', { name: session.db.name, userId: session.userId });
    this.updateState();
  }

  private updateState(): void {
    const s = this.session;
    if (!s) return;
    let next: SyncState;
    if (s.mode === 'guest') next = 'guest';
    else if (!((globalThis.navigator as Navigator | undefined)?.onLine ?? true)) next = 'offline';
    else if (s.streamStatus === 'live') next = 'live';
    else if (s.streamStatus === 'offline' || s.streamStatus === 'signed_out') next = 'offline';
    else next = 'connecting';
    if (next !== this.currentState) {
      this.currentState = next;
      this.events.emit('state', next);
    }
  }

  private async closeSession(s: Session): Promise<void> {
    clearInterval(s.sweepTimer);
    s.outbox.stop();
    await s.stream?.stop();
    await s.leadership?.stop();
    for (const u of s.unsubscribe) u();
    s.db.close();
  }

  /**
   * Runs `open` with writes held back (it gets the current session and returns the next one, or null to stay), then
   * makes its session current and closes the old one. One switch at a time, in call order.
   */
  private async switchTo(open: (current: Session) => Promise<Session | null>): Promise<Session | null> {
    const run = this.switches.run(async () => {
      const old = this.session;
      const next = await open(old);
      if (!next) return null;
      this.setSession(next);
      await this.closeSession(old);
      return next;
    });
    this.switching = run;
    try {
      return await run;
    } finally {
      if (this.switching === run) this.switching = null;
    }
  }

  private async doSignOut(): Promise<void> {
    // Both were told to stop (signOut()); wait until they have, so that neither switches or sends after this.
    await this.signingIn?.catch(() => undefined);
    await this.leftoverRunning;
    await this.switchTo(async (current) => {
      if (current.mode === 'guest') return null;
      // A resumed upgrade may have sealed the guest database and stopped before deleting it.
      await deleteSealedGuest(this.deviceId);
      return this.openGuest();
    });
    // A sign-in that finished before it saw the sign-out remembered its user.
    storage()?.removeItem(lastUserKey(this.deviceId));
  }

  private async doSignIn(signal: AbortSignal, before: Array<Promise<void> | null>): Promise<void> {
    // A signOut() still running came first, or a sign-in it cancelled: let them finish, then sign in.
    for (const p of before) await p?.catch(() => undefined);
    const cancelled = (): SignInError => new SignInError('cancelled', 'signIn: signOut() was called before the sign-in finished');
    // The app's getToken() may never settle (an interactive login left open): a sign-out does not wait for it.
    const aborted = new Promise<'aborted'>((resolve) => {
      if (signal.aborted) resolve('aborted');
      else signal.addEventListener('abort', () => resolve('aborted'), { once: true });
    });
    const tok = await Promise.race([this.tokens.fetchNew(), aborted]);
    if (tok === 'aborted' || signal.aborted) throw cancelled();
    if (!tok.ok) throw new SignInError(tok.problem, tok.message);
    const userId = tok.claims.sub;
    storage()?.setItem(lastUserKey(this.deviceId), userId);
    let upgraded = null as { guest: Session; txids: string[] } | null;
    await this.switchTo(async (current) => {
      if (signal.aborted) throw cancelled();
      if (current.mode === 'user') {
        // Same user: nothing to do, unless the stream had stopped because the app had signed out (start it again).
        if (current.userId === userId && current.streamStatus !== 'signed_out') return null;
        if (current.userId === userId && current.leadership && !current.leadership.isLeader) {
          // Another tab leads this database and its stream stopped: a new session here would only queue for the
          // lock that tab still holds. Ask it to start the stream again; this tab follows its status.
          current.leadership.requestRestart();
          return null;
        }
        return this.openUser(userId);
      }
      // Guest -> user, as one switch: writes wait until it is done (one made now would land in a database about to
      // go; another tab's writes are dealt with by the seal, guest.ts).
      const input: UpgradeInput = {
        outbox: current.outbox,
        transport: this.transport,
        deviceId: this.deviceId,
        userId,
        ...(this.options.localBlobs ? { localBlobs: this.options.localBlobs } : {}),
        maxBlobsPerRequest: this.options.maxOpsPerBatch ?? 1000,
        onBlobRefused: (r) => this.events.emit('blobRejected', r),
        signal,
      };
      const failed = (e: unknown): SignInError => {
        if (signal.aborted) return cancelled();
        const err = e as { code?: string; message?: string };
        this.events.emit('error', { source: 'upgrade', code: err.code ?? 'upgrade_failed', message: String(err.message ?? e), retrying: false });
        return new SignInError(err.code ?? 'upgrade_failed', `signIn: the guest's work could not be sent yet (${err.message ?? String(e)}); call signIn() again`);
      };
      let txids: string[];
      try {
        txids = (await flushGuestWork(input)).txids;
      } catch (e) {
        // Another tab's sign-in finished first and deleted the guest database (its work is sent): just switch.
        if (current.handover) return this.openUser(userId);
        throw failed(e);
      }
      const user = this.openUser(userId);
      try {
        await this.waitLive(user, this.options.signInCatchUpMs ?? 30_000, signal);
        if (signal.aborted) throw cancelled();
        try {
          // Writes of other guest tabs since the flush began are sent too; then the guest database takes no more.
          txids.push(...(await sealGuestWork(input)));
        } catch (e) {
          // Another tab's sign-in sealed and deleted the guest database meanwhile (its work is sent): switch.
          if (current.handover && !signal.aborted) return user;
          throw failed(e);
        }
      } catch (e) {
        await this.closeSession(user);
        throw e;
      }
      upgraded = { guest: current, txids };
      return user;
    });
    if (upgraded) {
      await Dexie.delete(upgraded.guest.db.name);
      this.guestLeftover = false;
      this.events.emit('upgraded', { userId, txids: upgraded.txids });
    }
  }

  /**
   * Resolves when the session's subscriptions are all live, or after `ms`, or at once when waiting cannot help
   * (offline, no token): the rows then arrive when the stream connects.
   */
  private waitLive(s: Session, ms: number, signal?: AbortSignal): Promise<void> {
    const settled = (): boolean =>
      signal?.aborted === true ||
      s.streamStatus === 'live' ||
      s.streamStatus === 'signed_out' ||
      s.streamStatus === 'offline' ||
      !((globalThis.navigator as Navigator | undefined)?.onLine ?? true);
    return new Promise((resolve) => {
      if (settled()) return resolve();
      const timer = setTimeout(done, ms);
      const poll = setInterval(() => {
        if (settled()) done();
      }, 50);
      function done(): void {
        clearTimeout(timer);
        clearInterval(poll);
        resolve();
      }
    });
  }

  /**
   * Signed in with a guest database still on the device: an upgrade was interrupted (or the guest worked and the
   * app started already signed in). Send its work as this user, then delete it. Retried on reconnect / online.
   */
  private finishLeftoverUpgrade(): Promise<void> {
    if (this.leftoverRunning) return this.leftoverRunning;
    // Signing out: the guest database is about to become the new guest's; nothing of it may go to this user now.
    if (this.signingOut) return Promise.resolve();
    const abort = new AbortController();
    this.leftoverAbort = abort;
    this.leftoverRunning = (async () => {
      const session = this.session;
      if (session.mode !== 'user' || !session.userId || !this.guestLeftover) return;
      const guestDb = this.newDb(guestDbName(this.deviceId));
      const writer = new SerialQueue();
      const applier = new Applier(guestDb, writer, new Emitter<ApplierEvents>());
      const outboxEvents = new Emitter<OutboxEvents>();
      const offs = [
        outboxEvents.on('rejected', (r) => this.events.emit('rejected', r)),
        outboxEvents.on('repaired', (r) => this.events.emit('repaired', r)),
      ];
      const outbox = new Outbox({
        db: guestDb,
        transport: this.transport,
        deviceId: this.deviceId,
        writer,
        events: outboxEvents,
        seenXid: (x) => applier.seen(x),
        limits: {
          ...(this.options.maxOpsPerBatch !== undefined ? { maxOps: this.options.maxOpsPerBatch } : {}),
          ...(this.options.maxBatchBytes !== undefined ? { maxBytes: this.options.maxBatchBytes } : {}),
        },
      });
      const input: UpgradeInput = {
        outbox,
        transport: this.transport,
        deviceId: this.deviceId,
        userId: session.userId,
        ...(this.options.localBlobs ? { localBlobs: this.options.localBlobs } : {}),
        maxBlobsPerRequest: this.options.maxOpsPerBatch ?? 1000,
        onBlobRefused: (r) => this.events.emit('blobRejected', r),
        signal: abort.signal,
      };
      try {
        const flushed = await flushGuestWork(input);
        // Sealed first (guest.ts): a guest tab may be writing to this database, and its writes must not be lost.
        const more = await sealGuestWork(input);
        guestDb.close();
        await Dexie.delete(guestDb.name);
        this.guestLeftover = false;
        this.events.emit('upgraded', { userId: session.userId, txids: [...flushed.txids, ...more] });
      } catch (e) {
        guestDb.close();
        // signOut(): the guest database stays (the new guest session's now); its unsent ops wait for a sign-in.
        if (abort.signal.aborted) return;
        const err = e as { code?: string; message?: string };
        this.events.emit('error', {
          source: 'upgrade',
          code: err.code ?? 'upgrade_failed',
          message: `the unfinished guest upgrade could not be completed yet: ${err.message ?? String(e)}`,
          retrying: true,
        });
      } finally {
        for (const off of offs) off();
        outbox.stop();
      }
    })().finally(() => {
      this.leftoverRunning = null;
      if (this.leftoverAbort === abort) this.leftoverAbort = null;
    });
    return this.leftoverRunning;
  }
}

/**
 * Creates and starts a client: opens the guest or the user's database (whoever getToken() says is signed in),
 * connects the stream and the outbox when signed in, and finishes an interrupted guest upgrade.
 */
export async function createSyncClient<Schema extends { [table: string]: Row } = { [table: string]: Row }>(
  options: SyncClientOptions,
): Promise<SyncClient<Schema>> {
  const client = new SyncClient<Schema>(options);
  await client.start();
  return client;
}
