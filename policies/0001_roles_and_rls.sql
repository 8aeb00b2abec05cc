-- Row-level security for deeprecall-sync. Applied after every migration; idempotent by construction
-- (create role only when missing, drop policy if exists; create policy).
--
-- deeprecall_user   user-scoped work: batch writes, snapshots, BlobHandle reads. Cannot bypass RLS, so Postgres
--                   itself restricts every statement to owner_id = app.user_id.
-- deeprecall_admin  read-only reporting (v_blob_inventory, admin endpoints): reads every owner, writes nothing.
-- The server's login role becomes a member of both and switches with set_config('role', ..., true) per transaction.

do $$
begin
  if not exists (select 1 from pg_roles where rolname = 'deeprecall_user') then
    create role deeprecall_user nologin nobypassrls;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'deeprecall_admin') then
    create role deeprecall_admin nologin nobypassrls;
  end if;
end
$$;

-- The role running migrations (the server's role in a default setup) may switch to both.
do $$
begin
  -- Only when not yet a member: re-granting needs ADMIN OPTION, which a plain member does not have.
  if not exists (select 1 from pg_roles where rolname = current_user and rolsuper) then
    if not pg_has_role(current_user, 'deeprecall_user', 'member') then
      execute format('grant deeprecall_user to %I', current_user);
    end if;
    if not pg_has_role(current_user, 'deeprecall_admin', 'member') then
      execute format('grant deeprecall_admin to %I', current_user);
    end if;
  end if;
end
$$;

grant usage on schema public to deeprecall_user, deeprecall_admin;

-- Whether the session reads every owner's rows as the reporting role. A policy "to deeprecall_admin" applies to
-- every role that inherits it, and the server's login role is a member of deeprecall_admin (and inherits, the
-- default): with "using (true)" a session of the server's role that had not switched roles, or an operator's psql as
-- that role, read every user's rows. So the policy holds only for a session switched to deeprecall_admin (the
-- server's admin requests), or for a role that can report and cannot act as a user (a BI tool's login role: a member
-- of deeprecall_admin, not of deeprecall_user, docs/operations.md). Used as "(select deeprecall_reads_all())" so
-- that it runs once per statement, not once per row.
create or replace function deeprecall_reads_all() returns boolean
  language sql stable
  as $fn$ select current_user = 'deeprecall_admin' or not pg_has_role(current_user, 'deeprecall_user', 'MEMBER') $fn$;
grant execute on function deeprecall_reads_all() to deeprecall_admin;
grant execute on function deeprecall_current_user_id() to deeprecall_user, deeprecall_admin;
grant select, insert on sync_applied_ops to deeprecall_user;
grant select on v_blob_inventory to deeprecall_user, deeprecall_admin;

-- Every synced table and the op ledger get the same two policies. A synced table is a member of the publication
-- with an id, an owner_id and a primary key (the rule of server/src/db/catalog.rs): a member without them is not
-- synced (the server ignores its changes, check warns about it) and gets nothing here. Without owner_id the policy
-- below cannot even be created, and every migrate (serve --migrate included) failed on such a member.
do $$
declare
  t record;
begin
  for t in
    select n.nspname as schemaname, c.relname as tablename
      from pg_publication_tables pt
      join pg_namespace n on n.nspname = pt.schemaname
      join pg_class c on c.relnamespace = n.oid and c.relname = pt.tablename
     where pt.pubname = 'deeprecall_sync'
       and exists (select 1 from pg_attribute a
                    where a.attrelid = c.oid and a.attname = 'id' and a.attnum > 0 and not a.attisdropped)
       and exists (select 1 from pg_attribute a
                    where a.attrelid = c.oid and a.attname = 'owner_id' and a.attnum > 0 and not a.attisdropped)
       and exists (select 1 from pg_constraint k where k.conrelid = c.oid and k.contype = 'p')
    union
    select 'public', 'sync_applied_ops'
  loop
    execute format('alter table %I.%I enable row level security', t.schemaname, t.tablename);
    -- force: the table owner is subject to the policies too; only superusers still bypass them.
    execute format('alter table %I.%I force row level security', t.schemaname, t.tablename);
    if t.tablename <> 'sync_applied_ops' then
      execute format('grant select, insert, update, delete on %I.%I to deeprecall_user', t.schemaname, t.tablename);
    end if;
    execute format('grant select on %I.%I to deeprecall_admin', t.schemaname, t.tablename);
    if t.tablename <> 'sync_applied_ops' then
      -- The live stream routes and filters on the old row (sql/0002_replication_state.sql says why).
      execute format('alter table %I.%I replica identity full', t.schemaname, t.tablename);
    end if;

    -- using: which rows a user sees, updates or deletes. with check: what a user may write. Without the check a
    -- client could insert or move a row to another owner. An empty or missing app.user_id makes
    -- deeprecall_current_user_id() null, and "owner_id = null" matches no row.
    execute format('drop policy if exists owner_isolation on %I.%I', t.schemaname, t.tablename);
    execute format(
      'create policy owner_isolation on %I.%I as permissive for all to deeprecall_user '
      'using (owner_id = deeprecall_current_user_id()) '
      'with check (owner_id = deeprecall_current_user_id())',
      t.schemaname, t.tablename);

    execute format('drop policy if exists admin_read on %I.%I', t.schemaname, t.tablename);
    execute format(
      'create policy admin_read on %I.%I as permissive for select to deeprecall_admin '
      'using ((select deeprecall_reads_all()))',
      t.schemaname, t.tablename);
  end loop;
end
$$;
