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
