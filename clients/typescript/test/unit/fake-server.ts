// A simulated `/v1/batch` that follows docs/api.md's contract, for the outbox's unit tests: per-client sequences
// (client_id + seq: duplicates, 409 seq_gap, contiguous seqs), the op_id ledger without client_id, whole-batch
// rejection with op_index (nothing recorded), insert/upsert/update/delete with `not_found` and 409 `conflict`.
// Faults: a request lost before it reaches the server, an answer lost after the commit, and a request held back
// and committed later (a "late" request, as a slow network can deliver one after the client gave up on it).
import type { BatchOp, BatchResponse } from '../../src/transport.js';
import type { Row } from '../../src/types.js';

export interface Refusal {
  status: number;
  code: string;
  message: string;
}

interface Body {
  client_id?: string;
  device_id?: string;
  ops: BatchOp[];
}

type Answer = { status: number; body: unknown };

export class FakeBatchServer {
  /** client_id -> last applied seq (`sync_clients`). */
  readonly clients = new Map<string, number>();
  /** op_ids applied without client_id (`sync_applied_ops`). */
  readonly ledger = new Set<string>();
  /** table -> id -> row. */
  rows = new Map<string, Map<string, Row>>();
  /** op_ids in the order they were applied (an op applied twice appears twice). */
  readonly applied: string[] = [];
  /** Every request that reached the server, with its answer's status. */
  readonly requests: Array<Body & { status: number }> = [];
  /**
   * What happens to the next requests, one entry each (then `pass`): `drop` never reaches the server, `lose` commits
   * but its answer is lost, `hold` is held back by the network until `deliverLate()`. The client sees a network
   * failure for all three.
   */
  faults: Array<'pass' | 'drop' | 'lose' | 'hold'> = [];
  private held: Body | null = null;
  private txid = 1000;

  constructor(
    /**
     * Refuses an op when Postgres would run it (only ops not applied before), e.g. a constraint; `table` reads the
     * rows as the batch has left them so far (a foreign key to a row inserted earlier in the same batch holds).
     */
    private readonly refuse: (op: BatchOp, table: (name: string) => Map<string, Row>) => Refusal | undefined = () => undefined,
    /** Refuses an op before anything runs (every op of the batch, duplicates included), e.g. a bad value. */
    private readonly invalid: (op: BatchOp) => Refusal | undefined = () => undefined,
  ) {}

  readonly fetch = (async (_url: string | URL | Request, init?: RequestInit) => {
    const body = JSON.parse(String(init?.body)) as Body;
    const fault = this.faults.shift() ?? 'pass';
    if (fault === 'drop') throw new TypeError('Failed to fetch');
    if (fault === 'hold') {
      this.held = body;
      throw new TypeError('Failed to fetch');
    }
    const answer = this.handle(body);
    if (fault === 'lose') throw new TypeError('network connection lost');
    return new Response(JSON.stringify(answer.body), { status: answer.status, headers: { 'content-type': 'application/json' } });
  }) as typeof fetch;

  /** Runs the held-back request now (its answer goes nowhere). */
  deliverLate(): Answer {
    const body = this.held;
    if (!body) throw new Error('no request was held back');
    this.held = null;
    return this.handle(body);
  }

  table(name: string): Map<string, Row> {
    let t = this.rows.get(name);
    if (!t) {
      t = new Map();
      this.rows.set(name, t);
    }
    return t;
  }

  handle(body: Body): Answer {
    const answer = this.run(body);
    this.requests.push({ ...body, status: answer.status });
    return answer;
  }

  private run(body: Body): Answer {
    const err = (status: number, code: string, message: string, extra: Record<string, unknown> = {}): Answer => ({
      status,
      body: { error: { code, message, ...extra } },
    });
    const ops = body.ops;
    const ids = new Set<string>();
    for (const [i, op] of ops.entries()) {
      if (typeof op.op_id !== 'string') return err(422, 'missing_op_id', 'every op needs an op_id', { op_index: i });
      if (ids.has(op.op_id)) return err(422, 'duplicate_op_id', `op_id ${op.op_id} appears twice`, { op_index: i });
      ids.add(op.op_id);
      if (body.client_id === undefined) {
        if (op.seq !== undefined) return err(422, 'missing_client_id', '`seq` needs the batch\'s `client_id`', { op_index: i });
      } else {
        if (!Number.isSafeInteger(op.seq) || (op.seq ?? 0) < 1) return err(422, 'missing_seq', 'with client_id, every op needs its seq', { op_index: i });
        const prev = ops[i - 1];
        if (prev && op.seq !== (prev.seq ?? 0) + 1) {
          return err(422, 'invalid_seq', `\`seq\` must grow by one from op to op: ${op.seq} follows ${prev.seq}`, { op_index: i });
        }
      }
      const bad = this.invalid(op);
      if (bad) return err(bad.status, bad.code, bad.message, { op_index: i });
    }
    let isNew: (op: BatchOp) => boolean;
    let last = 0;
    if (body.client_id !== undefined) {
      last = this.clients.get(body.client_id) ?? 0;
      const first = ops[0]?.seq;
      if (first !== undefined && first > last + 1) {
        return err(409, 'seq_gap', `this client's last applied seq is ${last}, but the batch starts at ${first}: resend from seq ${last + 1}`, {
          last_seq: last,
        });
      }
      isNew = (op) => (op.seq ?? 0) > last;
    } else {
      isNew = (op) => !this.ledger.has(op.op_id);
    }
    // Run on a copy: a refused batch changes nothing.
    const rows = new Map([...this.rows].map(([t, m]) => [t, new Map(m)]));
    const tableOf = (t: string): Map<string, Row> => {
      let m = rows.get(t);
      if (!m) {
        m = new Map();
        rows.set(t, m);
      }
      return m;
    };
    const results: BatchResponse['results'] = [];
    const appliedNow: string[] = [];
    for (const [i, op] of ops.entries()) {
      const withSeq = op.seq !== undefined ? { seq: op.seq } : {};
      if (!isNew(op)) {
        results.push({ op_id: op.op_id, ...withSeq, status: 'duplicate' });
        continue;
      }
      const refusal = this.refuse(op, tableOf);
      if (refusal) return err(refusal.status, refusal.code, refusal.message, { op_index: i });
      const t = tableOf(op.table);
      const id = String(op.row['id']);
      const existing = t.get(id);
      let status: 'applied' | 'not_found' = 'applied';
      switch (op.kind) {
        case 'insert':
          if (existing) return err(409, 'conflict', 'duplicate key value violates unique constraint', { op_index: i });
          t.set(id, { ...op.row });
          break;
        case 'upsert':
          t.set(id, { ...(existing ?? {}), ...op.row });
          break;
        case 'update':
          if (existing) t.set(id, { ...existing, ...op.row });
          else status = 'not_found';
          break;
        case 'delete':
          if (existing) t.delete(id);
          else status = 'not_found';
          break;
      }
      appliedNow.push(op.op_id);
      results.push({ op_id: op.op_id, ...withSeq, status });
    }
    // Commit.
    this.rows = rows;
    this.applied.push(...appliedNow);
    const response: BatchResponse = { txid: String(++this.txid), results };
    if (body.client_id !== undefined) {
      const top = ops.at(-1)?.seq ?? last;
      const next = Math.max(last, top);
      this.clients.set(body.client_id, next);
      response.last_seq = next;
    } else {
      for (const id of appliedNow) this.ledger.add(id);
    }
    return { status: 200, body: response };
  }
}

/** The user a request's bearer token is for (its `sub`, read without verifying, like the client does). */
export function tokenUser(init?: RequestInit): string {
  const auth = (init?.headers as Record<string, string> | undefined)?.['authorization'] ?? '';
  const payload = auth.replace(/^Bearer /, '').split('.')[1] ?? '';
  try {
    return String((JSON.parse(Buffer.from(payload, 'base64url').toString()) as { sub?: unknown }).sub);
  } catch {
    return '';
  }
}

interface CoordinateBody {
  device_id?: unknown;
  complete?: unknown;
  blobs?: unknown;
}

const BLOB_FIELDS = ['sha256', 'size', 'mime', 'filename', 'path', 'page_count', 'image_width', 'image_height', 'health'];
const I32_MAX = 2147483647;

/**
 * A simulated `/v1/blobs/coordinate` that follows docs/api.md and server/src/http/blobs.rs: at most `maxBlobs` per
 * request (413 `too_many_blobs`), fields of the wrong type or unknown are 422 `invalid_request` without an index
 * (serde), then `DeviceBlobReport::check` and the duplicate check in request order, with `blob_index`. A refused
 * request writes nothing. Each user's `blobs_meta` (filled, never overwritten) and `device_blobs` rows are kept.
 */
export class FakeCoordinateServer {
  /** user -> sha256 -> blobs_meta row. */
  readonly meta = new Map<string, Map<string, Row>>();
  /** user -> `${device}/${sha256}` -> device_blobs row. */
  readonly devices = new Map<string, Map<string, Row>>();
  /** Every request that reached the server: its body, the token's user, and the answer's status and error. */
  readonly requests: Array<{ user: string; body: CoordinateBody; status: number; error?: { code: string; blob_index?: number } }> = [];
  /**
   * What happens to the next requests, one entry each (then `pass`): `drop` never reaches the server (a network
   * failure), `unavailable` is answered 503 `database_unavailable` (nothing written).
   */
  faults: Array<'pass' | 'drop' | 'unavailable'> = [];
  /** `--max-body-bytes`: a larger body is 413 `payload_too_large`, nothing read. */
  maxBodyBytes = Infinity;
  /** Blobs an operator's own check constraint refuses (422 `constraint_violation`, no `blob_index`). */
  constraint: (blob: Record<string, unknown>) => boolean = () => false;
  private txid = 5000;

  constructor(
    public maxBlobs = 1000,
    /** A check of a newer server that the client does not know: refuses one blob (with `blob_index`). */
    private readonly refuse: (blob: Record<string, unknown>) => Refusal | undefined = () => undefined,
  ) {}

  readonly fetch = (async (_url: string | URL | Request, init?: RequestInit) => {
    const user = tokenUser(init);
    const body = JSON.parse(String(init?.body)) as CoordinateBody;
    const fault = this.faults.shift() ?? 'pass';
    if (fault === 'drop') throw new TypeError('Failed to fetch');
    const answer: Answer =
      fault === 'unavailable'
        ? { status: 503, body: { error: { code: 'database_unavailable', message: 'the database is unavailable; retry later' } } }
        : String(init?.body).length > this.maxBodyBytes
          ? { status: 413, body: { error: { code: 'payload_too_large', message: `request body over ${this.maxBodyBytes} bytes` } } }
          : hasLoneSurrogate(body)
          ? // serde_json refuses a \u escape of half a surrogate pair in a string: the body is not JSON to it.
            { status: 400, body: { error: { code: 'invalid_json', message: 'request body is not valid JSON: lone leading surrogate in hex escape' } } }
          : this.handle(user, body);
    const error = (answer.body as { error?: { code: string; blob_index?: number } }).error;
    this.requests.push({ user, body, status: answer.status, ...(error ? { error } : {}) });
    return new Response(JSON.stringify(answer.body), { status: answer.status, headers: { 'content-type': 'application/json' } });
  }) as typeof fetch;

  /** The user's blobs_meta sha256s, sorted. */
  shas(user: string): string[] {
    return [...(this.meta.get(user)?.keys() ?? [])].sort();
  }

  private handle(user: string, body: CoordinateBody): Answer {
    const err = (status: number, code: string, message: string, extra: Record<string, unknown> = {}): Answer => ({
      status,
      body: { error: { code, message, ...extra } },
    });
    const invalid = (m: string) => err(422, 'invalid_request', `invalid coordination request: ${m}`);
    for (const k of Object.keys(body)) if (!['device_id', 'complete', 'blobs'].includes(k)) return invalid(`unknown field \`${k}\``);
    if (typeof body.device_id !== 'string' || !/^[0-9a-f-]{36}$/i.test(body.device_id)) return invalid('UUID parsing failed');
    if (body.complete !== undefined && typeof body.complete !== 'boolean') return invalid('invalid type: expected a boolean');
    if (!Array.isArray(body.blobs)) return invalid('missing field `blobs`');
    const blobs = body.blobs as Array<Record<string, unknown>>;
    // Parsed as a stream: a shape error before blob max + 1 is met first; at blob max + 1 the parse stops.
    for (const [i, b] of blobs.entries()) {
      if (i >= this.maxBlobs) return err(413, 'too_many_blobs', `at most ${this.maxBlobs} blobs per request; split it`);
      if (typeof b !== 'object' || b === null || Array.isArray(b)) return invalid('invalid type: expected struct DeviceBlobReport');
      for (const k of Object.keys(b)) if (!BLOB_FIELDS.includes(k)) return invalid(`unknown field \`${k}\``);
      if (typeof b['sha256'] !== 'string') return invalid('missing field `sha256`');
      if (!Number.isSafeInteger(b['size'])) return invalid('invalid type for `size`: expected i64');
      for (const k of ['mime', 'filename', 'path', 'health']) {
        if (b[k] !== undefined && b[k] !== null && typeof b[k] !== 'string') return invalid(`invalid type for \`${k}\`: expected a string`);
      }
      for (const k of ['page_count', 'image_width', 'image_height']) {
        const v = b[k];
        if (v !== undefined && v !== null && !(Number.isInteger(v) && Math.abs(v as number) <= I32_MAX)) return invalid(`invalid value for \`${k}\`: expected i32`);
      }
    }
    if (/^0{8}-0{4}-0{4}-0{4}-0{12}$/.test(body.device_id)) return err(400, 'invalid_value', 'device_id must be the device\'s own persistent id, not the nil UUID');
    const seen = new Set<string>();
    for (const [i, b] of blobs.entries()) {
      const at = { blob_index: i };
      const sha = b['sha256'] as string;
      if (!/^[0-9a-f]{64}$/.test(sha)) return err(422, 'invalid_sha256', 'sha256 must be 64 lowercase hexadecimal characters', at);
      if ((b['size'] as number) < 0) return err(400, 'invalid_value', 'size must be >= 0', at);
      for (const k of ['page_count', 'image_width', 'image_height']) {
        if (typeof b[k] === 'number' && (b[k] as number) < 0) return err(400, 'invalid_value', `${k} must be >= 0`, at);
      }
      for (const k of ['mime', 'filename', 'path']) {
        if (typeof b[k] === 'string' && (b[k] as string).includes('\0')) {
          return err(400, 'invalid_value', `${k} cannot contain the character U+0000 (Postgres refuses it)`, at);
        }
      }
      const h = b['health'];
      if (typeof h === 'string' && !['healthy', 'missing', 'modified', 'relocated'].includes(h)) {
        return err(400, 'invalid_value', 'health must be healthy, missing, modified or relocated', at);
      }
      if (seen.has(sha)) return err(422, 'duplicate_sha256', 'a sha256 appears twice', at);
      const refusal = this.refuse(b);
      if (refusal) return err(refusal.status, refusal.code, refusal.message, at);
      seen.add(sha);
    }
    // A check constraint an operator added to blobs_meta by SQL: Postgres refuses the one statement that writes
    // every blob, so the answer names no blob (docs/api.md).
    if (blobs.some((b) => this.constraint(b))) {
      return err(422, 'constraint_violation', 'new row for relation "blobs_meta" violates check constraint "operator_check"');
    }
    const meta = this.meta.get(user) ?? new Map<string, Row>();
    this.meta.set(user, meta);
    const devices = this.devices.get(user) ?? new Map<string, Row>();
    this.devices.set(user, devices);
    let created = 0;
    let updated = 0;
    for (const b of blobs) {
      const sha = b['sha256'] as string;
      const old = meta.get(sha);
      const facts = ['mime', 'filename', 'page_count', 'image_width', 'image_height'];
      if (!old) {
        const row: Row = { sha256: sha, size: b['size'] as number };
        for (const k of facts) row[k] = (b[k] as Row[string] | undefined) ?? null;
        meta.set(sha, row);
        created++;
      } else if (facts.some((k) => old[k] === null && b[k] !== undefined && b[k] !== null)) {
        for (const k of facts) if (old[k] === null && b[k] !== undefined) old[k] = b[k] as Row[string];
        updated++;
      }
      const health = (b['health'] as string | null | undefined) ?? 'healthy';
      devices.set(`${body.device_id}/${sha}`, { device_id: body.device_id, sha256: sha, path: (b['path'] as string | null | undefined) ?? null, health, present: health !== 'missing' });
    }
    return {
      status: 200,
      body: { txid: String(++this.txid), meta_created: created, meta_updated: updated, devices_upserted: blobs.length, marked_missing: 0 },
    };
  }
}

function hasLoneSurrogate(v: unknown): boolean {
  if (typeof v === 'string') return /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/.test(v);
  if (Array.isArray(v)) return v.some(hasLoneSurrogate);
  if (typeof v === 'object' && v !== null) return Object.values(v).some(hasLoneSurrogate);
  return false;
}

/** One fetch for several fake endpoints, chosen by the request path. */
export function routes(table: { [path: string]: typeof fetch }): typeof fetch {
  return (async (url: string | URL | Request, init?: RequestInit) => {
    const path = new URL(String(url)).pathname;
    const f = table[path];
    if (!f) return new Response(JSON.stringify({ error: { code: 'not_found', message: `no route ${path}` } }), { status: 404 });
    return f(url, init);
  }) as typeof fetch;
}

/**
 * A socket that never opens (the user's database stays `connecting`); closed only by the client. Every one made is
 * in `all` (reset it per test).
 */
export class DeadSocket {
  static all: DeadSocket[] = [];
  readonly OPEN = 1;
  readyState = 0;
  onopen: (() => void) | null = null;
  onmessage: ((ev: { data: string }) => void) | null = null;
  onclose: ((ev: { code: number }) => void) | null = null;
  onerror: (() => void) | null = null;
  constructor(readonly url: string) {
    DeadSocket.all.push(this);
  }
  send(): void {}
  close(): void {
    if (this.readyState === 3) return;
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ code: 1006 }));
  }
}
