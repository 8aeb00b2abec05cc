// Several tabs of one app open the same database. Only one of them may run the stream: two appliers writing the
// same tables from two sockets could store an older frame over a newer one. The tab that holds the Web Lock
// `deeprecall-stream:<db name>` is the leader and runs the stream; the others follow: they read and write the
// same IndexedDB (Dexie's liveQuery sees the leader's changes), their outbox sends under the outbox lock, and they
// learn the stream's state and applied xids over a BroadcastChannel. When the leader's tab closes, the lock passes
// to a follower, which starts its own stream and resumes from the stored offsets.
//
// Without Web Locks (Node, very old browsers) every client leads.

/** Messages between tabs. */
type TabMessage =
  | { type: 'status'; status: string }
  | { type: 'applied'; xid: string }
  | { type: 'hello' }
  /** A follower's signIn(): the leader's stream had stopped (signed out), start it again. */
  | { type: 'restart' }
  /** An event of the app's (`rejected`, `repaired`) that the outbox of the tab `from` emitted: every tab hears it. */
  | { type: 'event'; from: string; name: TabEventName; value: unknown };

/** Events of one tab's outbox that every tab's listeners hear. */
export type TabEventName = 'rejected' | 'repaired';

export interface LeaderCallbacks {
  /** This tab became the leader: start the stream. Resolves when it has stopped (after `release`). */
  lead: () => void;
  /** The leader's stream status changed (followers only). */
  status: (status: string) => void;
  /** The leader applied a transaction (followers only). */
  applied: (xid: string) => void;
  /** A follower asks for the stream to be started again after it stopped (signed out; leader only). */
  restart?: () => void;
  /** Another tab's outbox emitted `rejected` / `repaired` (every tab, leader or not). */
  event?: (name: TabEventName, value: unknown) => void;
}

export class TabLeadership {
  private readonly abort = new AbortController();
  private release: (() => void) | null = null;
  private readonly channel: BroadcastChannel | null;
  private leading = false;
  private lastStatus: string | null = null;
  private done: Promise<void> = Promise.resolve();

  constructor(
    private readonly dbName: string,
    private readonly callbacks: LeaderCallbacks,
    /** This tab (one id per client): its own events coming back through another of its channels are ignored. */
    private readonly tabId: string = Math.random().toString(36).slice(2),
  ) {
    const BC = (globalThis as { BroadcastChannel?: typeof BroadcastChannel }).BroadcastChannel;
    this.channel = BC ? new BC(`deeprecall-sync:${dbName}`) : null;
    if (this.channel) this.channel.onmessage = (ev: MessageEvent<TabMessage>) => this.onMessage(ev.data);
  }

  /** Whether this tab runs the stream. */
  get isLeader(): boolean {
    return this.leading;
  }

  /** Competes for leadership (at once if no other tab holds it). */
  start(): void {
    const locks = (globalThis.navigator as Navigator | undefined)?.locks;
    if (!locks) {
      this.becomeLeader();
      return;
    }
    this.done = locks
      .request(`deeprecall-stream:${this.dbName}`, { signal: this.abort.signal }, () => {
        this.becomeLeader();
        return new Promise<void>((resolve) => {
          this.release = resolve;
        });
      })
      .then(
        () => undefined,
        () => undefined, // AbortError: closed before it got the lock
      );
    // Ask a current leader for its state.
    this.post({ type: 'hello' });
  }

  /** Tells the followers (leader only). */
  publishStatus(status: string): void {
    this.lastStatus = status;
    if (this.leading) this.post({ type: 'status', status });
  }

  publishApplied(xid: string): void {
    if (this.leading) this.post({ type: 'applied', xid });
  }

  /** Tells every other tab of an event its listeners should hear too (any tab: the one whose outbox sent). */
  publishEvent(name: TabEventName, value: unknown): void {
    this.post({ type: 'event', from: this.tabId, name, value });
  }

  /** Asks the leader to start its stream again (a follower's signIn() after the stream stopped). */
  requestRestart(): void {
    if (this.leading) this.callbacks.restart?.();
    else this.post({ type: 'restart' });
  }

  /** Gives up leadership (or the wait for it); the caller stops its stream first. */
  async stop(): Promise<void> {
    this.abort.abort();
    this.release?.();
    this.release = null;
    this.leading = false;
    await this.done;
    this.channel?.close();
  }

  private becomeLeader(): void {
    this.leading = true;
    this.callbacks.lead();
  }

  private onMessage(m: TabMessage): void {
    if (m.type === 'event') {
      if (m.from !== this.tabId) this.callbacks.event?.(m.name, m.value);
      return;
    }
    if (this.leading) {
      if (m.type === 'hello' && this.lastStatus) this.post({ type: 'status', status: this.lastStatus });
      else if (m.type === 'restart') this.callbacks.restart?.();
      return;
    }
    if (m.type === 'status') this.callbacks.status(m.status);
    else if (m.type === 'applied') this.callbacks.applied(m.xid);
  }

  private post(m: TabMessage): void {
    try {
      this.channel?.postMessage(m);
    } catch {
      // closed channel: nothing to tell
    }
  }
}
