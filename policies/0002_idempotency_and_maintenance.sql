-- Idempotency records (sql/0003_client_sequences.sql) and the housekeeping role. Applied after every migration,
-- after 0001; idempotent by construction like it.
--
-- deeprecall_maintenance  server housekeeping (op-ledger retention, server/src/db/ledger.rs): may read and delete
--                         sync_applied_ops rows of every owner, and nothing else. The server's login role becomes a
--                         member and switches to it per transaction, as for the other two roles.

do $$
begin
  if not exists (select 1 from pg_roles where rolname = 'deeprecall_maintenance') then
    create role deeprecall_maintenance nologin nobypassrls;
  end if;
  -- Only when not yet a member: re-granting needs ADMIN OPTION, which a plain member does not have.
  if not exists (select 1 from pg_roles where rolname = current_user and rolsuper)
     and not pg_has_role(current_user, 'deeprecall_maintenance', 'member') then
    execute format('grant deeprecall_maintenance to %I', current_user);
  end if;
end
$$;

grant usage on schema public to deeprecall_maintenance;

-- sync_clients: one row per (owner, client_id) with the client's last applied seq. A user reads, creates and
-- advances only their own; the admin role may read them (support: "what did this device last send?").
alter table sync_clients enable row level security;
alter table sync_clients force row level security;
grant select, insert, update on sync_clients to deeprecall_user;
grant select on sync_clients to deeprecall_admin;
drop policy if exists owner_isolation on sync_clients;
create policy owner_isolation on sync_clients as permissive for all to deeprecall_user
  using (owner_id = deeprecall_current_user_id())
  with check (owner_id = deeprecall_current_user_id());
drop policy if exists admin_read on sync_clients;
create policy admin_read on sync_clients as permissive for select to deeprecall_admin
  using ((select deeprecall_reads_all()));

-- The pruner finds expired ledger rows of every owner (select) and deletes them (delete). It cannot insert or
-- update, and it has no grant on any synced table. Only a session switched to the role: the server's login role
-- inherits it, and unswitched must neither read nor delete the ledger (as for deeprecall_reads_all, 0001).
grant select, delete on sync_applied_ops to deeprecall_maintenance;
drop policy if exists retention_read on sync_applied_ops;
create policy retention_read on sync_applied_ops as permissive for select to deeprecall_maintenance
  using ((select current_user = 'deeprecall_maintenance'));
drop policy if exists retention_prune on sync_applied_ops;
create policy retention_prune on sync_applied_ops as permissive for delete to deeprecall_maintenance
  using ((select current_user = 'deeprecall_maintenance'));

-- The fast path of a sequence batch (sql/0003); runs as the caller, under the policies above.
grant execute on function deeprecall_claim_seq(uuid, bigint, bigint) to deeprecall_user;
