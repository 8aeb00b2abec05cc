// HTTP transport: `/v1/batch`, `/v1/blobs/coordinate`, `/v1/blobs/{sha256}`, with the token from the TokenSource.
// Every answer is classified once, here, into what the caller does next (docs/api.md, "Errors"):
//
//   ok ─ use it          rejected ─ definite 4xx: do not resend unchanged (op_index says which op, if any)
//   too_large ─ split    transient ─ network, 5xx, 409 `retry`, 429: back off and resend the same request
//   seq_gap ─ 409: the server's last seq for this client_id is behind the batch's first seq (`lastSeq`)
//   auth ─ no usable token even after asking the app for a fresh one
//
// A 401 `token_expired` (or `invalid_signature` / `unknown_key` after a key rotation) is answered by asking the
// app for a new token and resending once; resending a batch is always safe (client_id + seq, or op ids, make it
// idempotent).

import type { TokenSource, TokenProblem } from './token.js';
import type { JsonValue } from './types.js';

/** The parsed JSON error body the server sends with every error. */
export interface ServerError {
  code: string;
  message: string;
  op_index?: number;
  blob_index?: number;
  /** With `seq_gap`: the client's last applied seq on the server. */
  last_seq?: number;
}

export type Outcome<T> =
  | { kind: 'ok'; value: T }
  | { kind: 'rejected'; status: number; error: ServerError }
  | { kind: 'too_large'; status: number; error: ServerError }
  | { kind: 'transient'; status: number; error: ServerError; retryAfterMs?: number }
  | { kind: 'seq_gap'; status: number; error: ServerError; lastSeq: number }
  | { kind: 'auth'; problem: TokenProblem | 'refused' | 'other_user'; error: ServerError };

/** One op as `/v1/batch` takes it. */
export interface BatchOp {
  op_id: string;
  /** With the batch's `client_id` (and only then): the op's seq, one more than the op before it. */
  seq?: number;
  table: string;
  kind: string;
  row: { [column: string]: JsonValue };
}

/** `/v1/batch` response body. */
export interface BatchResponse {
  txid: string;
  /** With `client_id`: the client's last applied seq after this batch. */
  last_seq?: number;
  results: Array<{ op_id: string; seq?: number; status: 'applied' | 'duplicate' | 'not_found' }>;
}

const RETRY_TOKEN_CODES = new Set(['token_expired', 'invalid_signature', 'unknown_key']);

function parseError(body: unknown, status: number): ServerError {
  if (typeof body === 'object' && body !== null && 'error' in body) {
    const e = (body as { error: unknown }).error;
    if (typeof e === 'object' && e !== null) {
      const { code, message, op_index, blob_index, last_seq } = e as Record<string, unknown>;
      const err: ServerError = {
        code: typeof code === 'string' ? code : `http_${status}`,
        message: typeof message === 'string' ? message : `HTTP ${status}`,
      };
      if (typeof op_index === 'number') err.op_index = op_index;
      if (typeof blob_index === 'number') err.blob_index = blob_index;
      if (typeof last_seq === 'number' && Number.isSafeInteger(last_seq) && last_seq >= 0) err.last_seq = last_seq;
      return err;
    }
  }
  return { code: `http_${status}`, message: `HTTP ${status}` };
}

function retryAfter(res: Response): number | undefined {
  const v = res.headers.get('retry-after');
  if (!v) return undefined;
  const secs = Number(v);
  return Number.isFinite(secs) && secs >= 0 ? secs * 1000 : undefined;
}

/** Pure: what an HTTP status and error body mean for the caller (the 401 retry is handled by `Transport`). */
export function classify(status: number, error: ServerError): Exclude<Outcome<never>, { kind: 'ok' }> {
  if (status === 401) return { kind: 'auth', problem: 'refused', error };
  if (status === 413) return { kind: 'too_large', status, error };
  if (status === 409 && error.code === 'retry') return { kind: 'transient', status, error };
  if (status === 409 && error.code === 'seq_gap' && error.last_seq !== undefined) {
    return { kind: 'seq_gap', status, error, lastSeq: error.last_seq };
  }
  if (status === 408 || status === 425 || status === 429 || status >= 500) return { kind: 'transient', status, error };
  return { kind: 'rejected', status, error };
}

export class Transport {
  private readonly fetchImpl: typeof fetch;

  constructor(
    private readonly baseUrl: string,
    private readonly tokens: TokenSource,
    fetchImpl?: typeof fetch,
  ) {
    // Bind: calling an unbound `window.fetch` as a method of another object throws "Illegal invocation".
    this.fetchImpl = fetchImpl ?? globalThis.fetch.bind(globalThis);
  }

  /**
   * POST /v1/batch; with `clientId`, every op carries its `seq` (sequence idempotency). With `asUser`, the request
   * is sent only with a token of that user: a database's queued writes must never be sent as someone else (the
   * server would make them that user's rows).
   */
  batch(deviceId: string, ops: BatchOp[], clientId?: string, asUser?: string): Promise<Outcome<BatchResponse>> {
    const body = clientId === undefined ? { device_id: deviceId, ops } : { client_id: clientId, device_id: deviceId, ops };
    return this.request<BatchResponse>('POST', '/v1/batch', body, asUser);
  }

  /**
   * POST /v1/blobs/coordinate. With `asUser`, sent only with a token of that user, as `batch` (the guest upgrade:
   * the guest's blob shells belong to the user it upgrades to, whatever account the app's token has switched to).
   */
  coordinate(
    body: { device_id: string; complete: boolean; blobs: unknown[] },
    asUser?: string,
  ): Promise<Outcome<{ txid: string; meta_created: number; meta_updated: number; devices_upserted: number; marked_missing: number }>> {
    return this.request('POST', '/v1/blobs/coordinate', body, asUser);
  }

  /** GET /v1/blobs/{sha256}. */
  blob(sha256: string): Promise<Outcome<{ [key: string]: JsonValue }>> {
    return this.request('GET', `/v1/blobs/${encodeURIComponent(sha256)}`);
  }

  private async request<T>(method: 'GET' | 'POST', path: string, body?: unknown, asUser?: string): Promise<Outcome<T>> {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    for (let attempt = 0; ; attempt++) {
      const tok = await this.tokens.get();
      if (!tok.ok) {
        return { kind: 'auth', problem: tok.problem, error: { code: tok.problem, message: tok.message } };
      }
      if (asUser !== undefined && tok.claims.sub !== asUser) {
        return {
          kind: 'auth',
          problem: 'other_user',
          error: { code: 'other_user', message: `getToken() returned a token of user ${tok.claims.sub}, but these writes belong to ${asUser}` },
        };
      }
      let res: Response;
      try {
        const init: RequestInit = {
          method,
          headers: { authorization: `Bearer ${tok.token}`, 'content-type': 'application/json' },
          cache: 'no-store',
        };
        if (payload !== undefined) init.body = payload;
        res = await this.fetchImpl(new URL(path, this.baseUrl).toString(), init);
      } catch (e) {
        // fetch rejects only on network failure (offline, DNS, refused, CORS).
        return { kind: 'transient', status: 0, error: { code: 'network', message: (e as Error)?.message ?? String(e) } };
      }
      let json: unknown = null;
      try {
        json = await res.json();
      } catch {
        json = null;
      }
      if (res.ok) return { kind: 'ok', value: json as T };
      const error = parseError(json, res.status);
      if (res.status === 401 && attempt === 0 && RETRY_TOKEN_CODES.has(error.code)) {
        this.tokens.invalidate(tok.token);
        continue;
      }
      const outcome = classify(res.status, error);
      if (outcome.kind === 'transient') {
        const ra = retryAfter(res);
        if (ra !== undefined) outcome.retryAfterMs = ra;
      }
      return outcome;
    }
  }
}
