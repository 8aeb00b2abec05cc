// The live connection (`GET /v1/stream`, docs/protocol.md): one WebSocket, one subscription per table, resumed
// from stored offsets after every reconnect; the token refreshed on the open socket before it expires.
//
//            ┌──────────── backoff (jitter) ◀──── close 1001/1002/1013/4008/1006, failure before open ──┐
//            ▼                                                                                        │
//   idle ─▶ token? ─▶ open socket ─▶ subscribe all (offsets) ─▶ catching up ─▶ live ──────────────────┤
//            │                                                  (all up_to_date)                      │
//            │ null: signed out (stop)      4001: new token, reconnect at once ───────────────────────┘
//            │ throws: offline-ish, retry   4003: token of another user (stop, report)
//   browser offline: socket closed, wait for `online`
//
// 1013 is a server on standby (another server streams from the replication slot, e.g. during a rolling deploy):
// like 1001, the client backs off and resumes from its offsets, reaching the ready server through the load
// balancer. Messages are handed to the applier strictly in arrival order, one at a time. Once one fails to apply,
// nothing more from that socket is applied: it is closed, and the next one resumes from the stored offsets. The
// backoff grows with every reconnect and starts over only once a socket has stayed open for `healthyAfterMs` with
// nothing failed on it (a frame that fails again on every new socket backs off like a failure before open).

import type { Applier } from './applier.js';
import { backoffDelay } from './backoff.js';
import type { Emitter } from './events.js';
import { sleep } from './events.js';
import { CloseCode, parseServerMessage, streamUrl, type ClientMessage, type ServerMessage } from './protocol.js';
import type { TokenSource } from './token.js';
import type { SyncErrorEvent } from './types.js';

/** What the stream reports to the client. */
export type StreamStatus = 'connecting' | 'live' | 'offline' | 'stopped';

export interface StreamEvents {
  status: StreamStatus;
  error: SyncErrorEvent;
  /** The socket opened (counted for diagnostics). */
  opened: undefined;
  tokenRefreshed: { expiresAt: number };
  /** The stream stopped for good: `signed_out` (getToken returned null) or `other_user` (close 4003). */
  stopped: { reason: 'signed_out' | 'other_user' | 'closed' };
}

export interface StreamOptions {
  url: string;
  tokens: TokenSource;
  applier: Applier;
  /** The user this database belongs to: a token of anyone else is not used. */
  userId: string;
  events: Emitter<StreamEvents>;
  WebSocket?: typeof WebSocket;
  pingIntervalMs?: number;
  pongTimeoutMs?: number;
  /**
   * How long a socket must stay open with nothing failing on it before the reconnect backoff starts over (default
   * 10 s). Opening alone proves little: a frame the local database cannot store fails on every new socket.
   */
  healthyAfterMs?: number;
}

const RETRYABLE_SUBSCRIPTION_ERRORS = new Set(['stream_unavailable', 'database_error', 'too_many_snapshots']);

function isOnline(): boolean {
  const nav = globalThis.navigator as Navigator | undefined;
  return nav?.onLine ?? true;
}

export class LiveStream {
  private readonly opts: StreamOptions;
  private readonly WS: typeof WebSocket;
  private socket: WebSocket | null = null;
  private readonly stopper = new AbortController();
  private running: Promise<void> | null = null;
  private attempt = 0;
  private status: StreamStatus = 'stopped';
  /**
   * Retryable subscription errors in a row per table (`database_error`, `stream_unavailable`, …), so that the
   * resubscribes back off while an outage lasts; forgotten when the table is up to date.
   */
  private readonly subscribeRetries = new Map<string, number>();
  /** Wakes the loop early (back online). */
  private wake: AbortController = new AbortController();

  constructor(opts: StreamOptions) {
    this.opts = opts;
    const WS = opts.WebSocket ?? globalThis.WebSocket;
    if (!WS) throw new Error('no WebSocket implementation: pass options.WebSocket');
    this.WS = WS;
  }

  start(): void {
    if (this.running || this.stopper.signal.aborted) return;
    globalThis.addEventListener?.('online', this.onOnline);
    globalThis.addEventListener?.('offline', this.onOffline);
    this.running = this.loop().finally(() => {
      this.running = null;
    });
  }

  async stop(): Promise<void> {
    this.stopper.abort();
    this.wake.abort();
    globalThis.removeEventListener?.('online', this.onOnline);
    globalThis.removeEventListener?.('offline', this.onOffline);
    this.socket?.close(CloseCode.normal);
    await this.running;
    this.setStatus('stopped');
  }

  private readonly onOnline = (): void => {
    this.attempt = 0;
    this.wake.abort();
  };

  private readonly onOffline = (): void => {
    this.setStatus('offline');
    // The socket may linger half-open for a long time; do not wait for it.
    this.socket?.close(CloseCode.normal, 'offline');
  };

  private setStatus(s: StreamStatus): void {
    if (this.status === s) return;
    this.status = s;
    this.opts.events.emit('status', s);
  }

  private async pause(ms: number): Promise<void> {
    this.wake = new AbortController();
    const both = AbortSignal.any([this.wake.signal, this.stopper.signal]);
    await sleep(ms, both);
  }

  private async loop(): Promise<void> {
    while (!this.stopper.signal.aborted) {
      if (!isOnline()) {
        this.setStatus('offline');
        await this.pause(60_000);
        continue;
      }
      this.setStatus('connecting');
      const tok = await this.opts.tokens.get();
      if (this.stopper.signal.aborted) return;
      if (!tok.ok) {
        if (tok.problem === 'signed_out') {
          this.opts.events.emit('stopped', { reason: 'signed_out' });
          return;
        }
        this.opts.events.emit('error', { source: 'token', code: tok.problem, message: tok.message, retrying: true });
        this.setStatus('offline');
        await this.pause(backoffDelay(this.attempt++));
        continue;
      }
      if (tok.claims.sub !== this.opts.userId) {
        this.opts.events.emit('error', {
          source: 'token',
          code: 'other_user',
          message: `getToken() returned a token of user ${tok.claims.sub}, but this database belongs to ${this.opts.userId}`,
          retrying: false,
        });
        this.opts.events.emit('stopped', { reason: 'other_user' });
        return;
      }
      const result = await this.session(tok.token);
      if (this.stopper.signal.aborted) return;
      this.opts.applier.disconnected();
      switch (result.kind) {
        case 'never_opened':
          // Browsers hide the status of a failed upgrade: it may have been the token (docs/protocol.md).
          this.opts.tokens.invalidate(tok.token);
          break;
        case 'closed':
          if (result.code === CloseCode.otherUser) {
            this.opts.events.emit('error', {
              source: 'stream',
              code: 'other_user',
              message: 'the server closed the stream: a refreshed token belonged to another user (4003)',
              retrying: false,
            });
            this.opts.events.emit('stopped', { reason: 'other_user' });
            return;
          }
          if (result.code === CloseCode.tokenExpired) {
            this.opts.tokens.invalidate(tok.token);
            continue; // reconnect at once with a new token
          }
          if (result.code === CloseCode.tryAgainLater) {
            this.opts.events.emit('error', {
              source: 'stream',
              code: 'server_standby',
              message: 'the server is on standby (1013): another server streams from the replication slot; reconnecting',
              retrying: true,
            });
          }
          // 1001, 1013, 4008, 1002, 1006, …: back off, then resume from the stored offsets.
          break;
      }
      if (!isOnline()) continue;
      this.setStatus('connecting');
      await this.pause(backoffDelay(this.attempt++));
    }
  }

  /** One WebSocket connection from open to close. */
  private session(token: string): Promise<{ kind: 'never_opened' } | { kind: 'closed'; code: number }> {
    return new Promise((resolve) => {
      const { applier, events } = this.opts;
      let ws: WebSocket;
      try {
        ws = new this.WS(streamUrl(this.opts.url, token));
      } catch (e) {
        events.emit('error', { source: 'stream', code: 'connect_failed', message: String(e), retrying: true });
        resolve({ kind: 'never_opened' });
        return;
      }
      this.socket = ws;
      let opened = false;
      let chain: Promise<void> = Promise.resolve();
      // Set when something received on this socket could not be applied. The frames queued behind it depend on it: a
      // later `txn` of the same table would store an offset past the failed one, an `up_to_date` would delete the
      // rows of a failed `snapshot` frame as stale and store its offset. So nothing more from this socket is applied
      // (nor acted on); it is closed, and the next socket resumes from the stored offsets.
      let broken = false;
      let refreshTimer: ReturnType<typeof setTimeout> | undefined;
      let healthyTimer: ReturnType<typeof setTimeout> | undefined;
      let pingTimer: ReturnType<typeof setInterval> | undefined;
      let pongDeadline: ReturnType<typeof setTimeout> | undefined;
      const retryTimers = new Set<ReturnType<typeof setTimeout>>();

      const send = (m: ClientMessage): void => {
        if (ws.readyState === ws.OPEN) ws.send(JSON.stringify(m));
      };
      const cleanup = (): void => {
        clearTimeout(refreshTimer);
        clearTimeout(healthyTimer);
        clearInterval(pingTimer);
        clearTimeout(pongDeadline);
        for (const t of retryTimers) clearTimeout(t);
        if (this.socket === ws) this.socket = null;
      };

      // The local database failed (closed by close(), quota): drop this connection; the loop decides what next.
      const failed = (e: unknown): void => {
        broken = true;
        if (this.stopper.signal.aborted) return;
        events.emit('error', { source: 'stream', code: 'local_database', message: String(e), retrying: true });
        ws.close(4000, 'local database error');
      };
      const subscribe = async (table: string, known?: Map<string, string | null>): Promise<void> => {
        const offsets = known ?? (await applier.offsets());
        const offset = offsets.get(table) ?? null;
        applier.subscribing(table);
        send(offset ? { type: 'subscribe', id: table, table, offset } : { type: 'subscribe', id: table, table });
      };

      // The refresh time of the token that the refresh_token in flight replaces, and how many refreshes in a row
      // brought a token due no later than that one.
      let refreshedFrom: number | null = null;
      let staleRefreshes = 0;
      const scheduleRefresh = (): void => {
        clearTimeout(refreshTimer);
        const at = this.opts.tokens.refreshAt();
        if (at === null) return;
        const from = refreshedFrom;
        refreshedFrom = null;
        if (from !== null && at <= from) {
          // getToken() handed back a token due no later than the one it replaces (e.g. an app that caches its token
          // with a smaller margin than ours): its refresh time has passed, so asking again at once would loop. Ask
          // again after a growing pause (1 s, doubling, up to 30 s); should the token expire meanwhile, the server
          // closes with 4001 and the loop reconnects with a new one.
          refreshTimer = setTimeout(() => void refresh(0), Math.min(30_000, 1_000 * 2 ** Math.min(staleRefreshes++, 5)));
          return;
        }
        staleRefreshes = 0;
        refreshTimer = setTimeout(() => void refresh(0), Math.max(0, at - Date.now()));
      };
      const refresh = async (tries: number): Promise<void> => {
        const from = this.opts.tokens.refreshAt();
        const next = await this.opts.tokens.fetchNew();
        if (ws.readyState !== ws.OPEN) return;
        if (next.ok) {
          refreshedFrom = from;
          send({ type: 'refresh_token', access_token: next.token });
          return; // token_refreshed schedules the next one
        }
        events.emit('error', { source: 'token', code: next.problem, message: next.message, retrying: next.problem !== 'signed_out' });
        if (next.problem === 'signed_out') return; // the socket will close at exp (4001); the loop then stops
        // Try again soon; if exp passes first, the server closes with 4001 and the loop reconnects.
        refreshTimer = setTimeout(() => void refresh(tries + 1), Math.min(5_000, 500 * 2 ** tries));
      };

      const onMessage = (msg: ServerMessage): void => {
        if (broken) return;
        switch (msg.type) {
          case 'token_refreshed':
            events.emit('tokenRefreshed', { expiresAt: msg.expires_at });
            scheduleRefresh();
            return;
          case 'pong':
          case 'unsubscribed':
            return;
          case 'error':
            if (msg.id !== undefined) {
              const table = msg.id;
              const retry = RETRYABLE_SUBSCRIPTION_ERRORS.has(msg.code);
              events.emit('error', { source: 'stream', code: msg.code, message: `${table}: ${msg.message}`, retrying: retry });
              if (retry) {
                // 1-2 s at first, then growing (up to 30 s) while the errors go on: an outage of the database or of
                // the replication stream is not made worse by every client resubscribing every second or two.
                const n = this.subscribeRetries.get(table) ?? 0;
                this.subscribeRetries.set(table, n + 1);
                const t = setTimeout(() => {
                  retryTimers.delete(t);
                  subscribe(table).catch(failed);
                }, backoffDelay(n + 2));
                retryTimers.add(t);
              }
            } else {
              // An auth error answers a refresh_token: keep the old token's deadline and try again shortly.
              events.emit('error', { source: 'stream', code: msg.code, message: msg.message, retrying: true });
              refreshTimer = setTimeout(() => void refresh(1), 1_000);
            }
            return;
          case 'unknown':
            events.emit('error', { source: 'stream', code: 'unknown_message', message: msg.raw, retrying: true });
            return;
          default:
            chain = chain
              .then(async () => {
                if (broken) return; // an earlier frame failed: this one may depend on it
                await applier.handle(msg);
                if (msg.type === 'up_to_date') this.subscribeRetries.delete(msg.id);
                if (applier.allLive()) this.setStatus('live');
              })
              .catch((e: unknown) => {
                // The local database failed (quota, closed) or the frames broke the protocol (a transaction's last
                // part missing): apply nothing more from this socket; reconnect and resume from what was stored.
                broken = true;
                events.emit('error', { source: 'stream', code: 'apply_failed', message: String(e), retrying: true });
                ws.close(4000, 'apply failed');
              });
        }
      };

      ws.onopen = () => {
        opened = true;
        // The backoff starts over only once this socket has proved healthy: open for a while with nothing failed on
        // it. Reset at open, a frame that fails on every socket (a full disk) would reconnect every 250-500 ms.
        healthyTimer = setTimeout(() => {
          if (!broken) this.attempt = 0;
        }, this.opts.healthyAfterMs ?? 10_000);
        events.emit('opened', undefined);
        void (async () => {
          const offsets = await applier.offsets();
          for (const table of applier.db.syncedTables) await subscribe(table, offsets);
        })().catch(failed);
        scheduleRefresh();
        const interval = this.opts.pingIntervalMs ?? 25_000;
        pingTimer = setInterval(() => {
          send({ type: 'ping' });
          clearTimeout(pongDeadline);
          pongDeadline = setTimeout(() => ws.close(4000, 'no pong'), this.opts.pongTimeoutMs ?? 10_000);
        }, interval);
      };
      ws.onmessage = (ev: MessageEvent) => {
        clearTimeout(pongDeadline); // anything from the server proves the connection is alive
        if (typeof ev.data !== 'string') return;
        onMessage(parseServerMessage(ev.data));
      };
      ws.onclose = (ev: CloseEvent) => {
        cleanup();
        // Let the frames already received finish applying before reconnecting.
        void chain.then(() => resolve(opened ? { kind: 'closed', code: ev.code } : { kind: 'never_opened' }));
      };
      ws.onerror = () => {
        // onclose follows and decides.
      };
    });
  }
}
