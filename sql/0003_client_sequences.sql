-- Sequence idempotency for POST /v1/batch (docs/api.md, "Idempotency"; docs/decisions.md §13).
--
-- A batch that carries a client_id (one outbox: a device's local database) numbers its ops with seq, strictly
-- increasing by one per client. The server keeps one row per (owner, client) with the last applied seq, updated
-- once per batch in the batch's own transaction: an op with seq <= last_seq was applied before and is answered
-- `duplicate`; one row per batch instead of one indexed ledger row per op (sync_applied_ops, which batches without
-- client_id keep using). Not synced (not in the publication).
create table sync_clients (
  owner_id    uuid        not null default deeprecall_current_user_id(),
  client_id   uuid        not null,
  last_seq    bigint      not null check (last_seq >= 0),
  created_at  timestamptz not null default now(),
  updated_at  timestamptz not null default now(),
  primary key (owner_id, client_id)
) with (fillfactor = 50);
-- fillfactor 50: the row is rewritten on every batch; free room on its page keeps those updates HOT (no index
-- writes) and lets a page absorb many versions between vacuums.

-- Retention for the per-op ledger: the pruner deletes rows past --op-ledger-retention-days oldest first, found
-- through this index. Rows are appended in applied_at order, so inserts touch only the rightmost leaf page.
create index sync_applied_ops_applied_at_idx on sync_applied_ops (applied_at);

-- The common case of a sequence batch, in one statement: advance the client's last_seq from first - 1 to the
-- batch's last seq. The UPDATE takes the row lock itself (a concurrent batch of the same client waits for it, then
-- re-checks the condition against the committed value), so no separate SELECT ... FOR UPDATE (and its WAL record)
-- is needed. Raises, and so aborts the batch's transaction, when the batch does not continue the sequence: a retry
-- (overlap), a gap, or a client's first batch not starting at 1. The server then runs the batch again the careful
-- way, which answers duplicates and gaps (server/src/http/batch/execute.rs). Runs as the caller: row-level security
-- narrows every statement to the caller's own rows.
create function deeprecall_claim_seq(p_client uuid, p_first bigint, p_last bigint) returns bigint
language plpgsql
as $$
begin
  update sync_clients set last_seq = p_last, updated_at = now()
   where client_id = p_client and last_seq = p_first - 1;
  if found then
    return p_first - 1;
  end if;
  if p_first = 1 then
    -- The client's first batch. A concurrent first batch waits here for the other's commit, then does nothing.
    insert into sync_clients (client_id, last_seq) values (p_client, p_last)
      on conflict (owner_id, client_id) do nothing;
    if found then
      return 0;
    end if;
  end if;
  raise exception 'deeprecall: this batch (seq % to %) does not continue the sequence of client %',
    p_first, p_last, p_client
    using errcode = 'DRSEQ';
end
$$;
