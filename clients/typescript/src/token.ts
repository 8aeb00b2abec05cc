// Token bookkeeping: reads the claims the client needs (`sub`, `exp`, `iat`) without verifying the token (the server
// does that), caches the current token, and decides when to fetch a new one.

/** Claims of an API token that the client uses. */
export interface TokenClaims {
  sub: string;
  /** Unix seconds. */
  exp: number;
  iat?: number;
}

function base64UrlDecode(part: string): string {
  const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
  const padded = b64 + '='.repeat((4 - (b64.length % 4)) % 4);
  const binary = atob(padded);
  const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
  return new TextDecoder().decode(bytes);
}

/** The claims of a JWT, or null when it is not a readable JWT with `sub` and `exp`. */
export function readClaims(token: string): TokenClaims | null {
  const parts = token.split('.');
  if (parts.length !== 3 || !parts[1]) return null;
  try {
    const claims: unknown = JSON.parse(base64UrlDecode(parts[1]));
    if (typeof claims !== 'object' || claims === null) return null;
    const { sub, exp, iat } = claims as Record<string, unknown>;
    if (typeof sub !== 'string' || typeof exp !== 'number') return null;
    return typeof iat === 'number' ? { sub, exp, iat } : { sub, exp };
  } catch {
    return null;
  }
}

/**
 * When (unix ms) a token should be replaced: a minute before `exp`, or after three quarters of its lifetime for
 * short-lived tokens, whichever comes first. `obtainedAtMs` stands in for a missing `iat`.
 */
export function refreshAtMs(claims: TokenClaims, obtainedAtMs: number): number {
  const expMs = claims.exp * 1000;
  const issuedMs = claims.iat !== undefined ? Math.min(claims.iat * 1000, obtainedAtMs) : obtainedAtMs;
  const lifetime = Math.max(0, expMs - issuedMs);
  const margin = Math.min(60_000, lifetime / 4);
  return expMs - margin;
}

/** Why a token could not be had. */
export type TokenProblem = 'signed_out' | 'unavailable' | 'malformed';

export type TokenResult =
  | { ok: true; token: string; claims: TokenClaims }
  | { ok: false; problem: TokenProblem; message: string };

/**
 * Caches the app's `getToken()`: hands out the current token while it is fresh, asks the app for a new one when it
 * is due or when the server refused it (`invalidate()`); concurrent callers share one `getToken()` call.
 */
export class TokenSource {
  private current: { token: string; claims: TokenClaims; refreshAt: number } | null = null;
  private pending: Promise<TokenResult> | null = null;

  constructor(
    private readonly getToken: () => Promise<string | null>,
    private readonly now: () => number = Date.now,
  ) {}

  /** A fresh token, or why there is none. */
  async get(): Promise<TokenResult> {
    const c = this.current;
    if (c && this.now() < c.refreshAt) return { ok: true, token: c.token, claims: c.claims };
    return this.fetchNew();
  }

  /** Forget the current token (the server refused it); the next `get()` asks the app. */
  invalidate(token?: string): void {
    if (!token || this.current?.token === token) this.current = null;
  }

  /** When the current token should be replaced (unix ms), if there is one. */
  refreshAt(): number | null {
    return this.current?.refreshAt ?? null;
  }

  /** Asks the app for a new token now (shared by concurrent callers). */
  fetchNew(): Promise<TokenResult> {
    if (!this.pending) {
      this.pending = this.ask().finally(() => {
        this.pending = null;
      });
    }
    return this.pending;
  }

  private async ask(): Promise<TokenResult> {
    let token: string | null;
    try {
      token = await this.getToken();
    } catch (e) {
      return { ok: false, problem: 'unavailable', message: `getToken() failed: ${(e as Error)?.message ?? String(e)}` };
    }
    if (token === null || token === undefined) {
      this.current = null;
      return { ok: false, problem: 'signed_out', message: 'getToken() returned null (signed out)' };
    }
    const claims = readClaims(token);
    if (!claims) {
      return { ok: false, problem: 'malformed', message: 'getToken() returned something that is not a JWT with sub and exp' };
    }
    const obtained = this.now();
    this.current = { token, claims, refreshAt: refreshAtMs(claims, obtained) };
    return { ok: true, token, claims };
  }
}
