// Pure: exponential backoff with jitter, for reconnects and batch retries. "Equal jitter": half the exponential
// delay is fixed, half random, so retries of many clients spread out but none retries at once in a tight loop.

/** Backoff settings in milliseconds. */
export interface BackoffPolicy {
  baseMs: number;
  maxMs: number;
}

export const DEFAULT_BACKOFF: BackoffPolicy = { baseMs: 500, maxMs: 30_000 };

/** Delay before retry number `attempt` (0 = first retry). `random` returns a number in [0, 1). */
export function backoffDelay(attempt: number, policy: BackoffPolicy = DEFAULT_BACKOFF, random: () => number = Math.random): number {
  const exp = Math.min(policy.maxMs, policy.baseMs * 2 ** Math.max(0, Math.min(attempt, 30)));
  const half = exp / 2;
  return Math.round(half + half * random());
}
