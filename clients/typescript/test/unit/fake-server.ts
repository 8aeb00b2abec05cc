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
    /** Refuses an op when Postgres would run it (only ops not applied before), e.g. a constraint. */
    private readonly refuse: (op: BatchOp) => Refusal | undefined = () => undefined,
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
      const refusal = this.refuse(op);
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
