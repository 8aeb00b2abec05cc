-- deeprecall-sync schema, version 1.
--
-- Every synced table is tenant-scoped: primary key (owner_id, id), and every foreign key includes owner_id.
-- Why (docs/schema.md has the long form):
--   * the primary key is the default replica identity, so a DELETE in the WAL carries owner_id and the stream can
--     route it without REPLICA IDENTITY FULL;
--   * a row can never reference another user's row (the composite foreign key cannot match across owners);
--   * two users may use the same client-generated id without colliding or learning of each other.
-- owner_id defaults to the session's app.user_id, set by the server with set_config(..., true) inside the write
-- transaction; row-level security (policies/) makes sure it can be nothing else.

-- The user id of the current transaction, or null when none is set. After a transaction that used
-- set_config(..., true) a pooled connection reads the setting as '' (not null): treat that as "no user" too.
create or replace function deeprecall_current_user_id() returns uuid
language sql stable parallel safe
as $$ select nullif(current_setting('app.user_id', true), '')::uuid $$;

-- Server clock for last-writer-wins: updated_at is always the commit-side time of the last write, whatever the
-- client sent.
create or replace function deeprecall_touch_updated_at() returns trigger
language plpgsql
as $$
begin
  new.updated_at := clock_timestamp();
  return new;
end
$$;

create table works (
  id            uuid        not null default gen_random_uuid(),
  owner_id      uuid        not null default deeprecall_current_user_id(),
  work_type     text        not null default 'paper',
  title         text        not null,
  subtitle      text,
  authors       jsonb       not null default '[]'::jsonb,
  year          integer,
  venue         text,
  publisher     text,
  doi           text,
  isbn          text,
  url           text,
  abstract      text,
  tags          text[]      not null default '{}',
  favorite      boolean     not null default false,
  read_status   text        not null default 'unread'
                check (read_status in ('unread', 'reading', 'read')),
  created_at    timestamptz not null default now(),
  updated_at    timestamptz not null default now(),
  primary key (owner_id, id)
);

create table blobs_meta (
  id            uuid        not null default gen_random_uuid(),
  owner_id      uuid        not null default deeprecall_current_user_id(),
  sha256        text        not null check (sha256 ~ '^[0-9a-f]{64}$'),
  size          bigint      not null check (size >= 0),
  mime          text,
  filename      text,
  page_count    integer     check (page_count >= 0),
  image_width   integer     check (image_width >= 0),
  image_height  integer     check (image_height >= 0),
  created_at    timestamptz not null default now(),
  updated_at    timestamptz not null default now(),
  primary key (owner_id, id),
  unique (owner_id, sha256)
);

create table device_blobs (
  id            uuid        not null default gen_random_uuid(),
  owner_id      uuid        not null default deeprecall_current_user_id(),
  device_id     uuid        not null,
  sha256        text        not null,
  path          text,
  present       boolean     not null default true,
  health        text        not null default 'healthy'
                check (health in ('healthy', 'missing', 'modified', 'relocated')),
  last_seen_at  timestamptz not null default now(),
  created_at    timestamptz not null default now(),
  updated_at    timestamptz not null default now(),
  primary key (owner_id, id),
  unique (owner_id, device_id, sha256),
  foreign key (owner_id, sha256) references blobs_meta (owner_id, sha256) on delete cascade
);

create table assets (
  id            uuid        not null default gen_random_uuid(),
  owner_id      uuid        not null default deeprecall_current_user_id(),
  sha256        text        not null,
  work_id       uuid,
  role          text        not null default 'main'
                check (role in ('main', 'supplement', 'slides', 'notes', 'thumbnail', 'other')),
  title         text,
  filename      text,
  favorite      boolean     not null default false,
  created_at    timestamptz not null default now(),
  updated_at    timestamptz not null default now(),
  primary key (owner_id, id),
  foreign key (owner_id, sha256) references blobs_meta (owner_id, sha256) on delete restrict,
  -- set null (work_id) only: a plain "set null" would also null owner_id.
  foreign key (owner_id, work_id) references works (owner_id, id) on delete set null (work_id)
);
create index assets_work_idx on assets (owner_id, work_id);
create index assets_sha256_idx on assets (owner_id, sha256);

create table annotations (
  id            uuid        not null default gen_random_uuid(),
  owner_id      uuid        not null default deeprecall_current_user_id(),
  work_id       uuid,
  asset_id      uuid,
  sha256        text        check (sha256 ~ '^[0-9a-f]{64}$'),
  page          integer     check (page >= 1),
  kind          text        not null default 'highlight'
                check (kind in ('highlight', 'underline', 'note', 'rect', 'ink')),
  geometry      jsonb       not null default '{}'::jsonb,
  style         jsonb       not null default '{}'::jsonb,
  quote         text,
  body          text,
  color         text,
  tags          text[]      not null default '{}',
  created_at    timestamptz not null default now(),
  updated_at    timestamptz not null default now(),
  primary key (owner_id, id),
  foreign key (owner_id, work_id) references works (owner_id, id) on delete cascade,
  foreign key (owner_id, asset_id) references assets (owner_id, id) on delete set null (asset_id)
);
create index annotations_work_idx on annotations (owner_id, work_id);
create index annotations_asset_idx on annotations (owner_id, asset_id);

create table activities (
  id            uuid        not null default gen_random_uuid(),
  owner_id      uuid        not null default deeprecall_current_user_id(),
  kind          text        not null default 'project'
                check (kind in ('course', 'project', 'reading_list', 'meeting', 'other')),
  title         text        not null,
  description   text,
  color         text,
  starts_at     timestamptz,
  ends_at       timestamptz,
  work_ids      uuid[]      not null default '{}',
  created_at    timestamptz not null default now(),
  updated_at    timestamptz not null default now(),
  primary key (owner_id, id),
  check (ends_at is null or starts_at is null or ends_at >= starts_at)
);

create table boards (
  id            uuid        not null default gen_random_uuid(),
  owner_id      uuid        not null default deeprecall_current_user_id(),
  title         text        not null default 'Untitled board',
  work_id       uuid,
  background    jsonb       not null default '{}'::jsonb,
  width         double precision,
  height        double precision,
  created_at    timestamptz not null default now(),
  updated_at    timestamptz not null default now(),
  primary key (owner_id, id),
  foreign key (owner_id, work_id) references works (owner_id, id) on delete set null (work_id)
);

create table strokes (
  id            uuid        not null default gen_random_uuid(),
  owner_id      uuid        not null default deeprecall_current_user_id(),
  board_id      uuid        not null,
  tool          text        not null default 'pen'
                check (tool in ('pen', 'highlighter', 'eraser', 'shape')),
  points        jsonb       not null default '[]'::jsonb,
  style         jsonb       not null default '{}'::jsonb,
  bbox          jsonb,
  z_index       integer     not null default 0,
  created_at    timestamptz not null default now(),
  updated_at    timestamptz not null default now(),
  primary key (owner_id, id),
  foreign key (owner_id, board_id) references boards (owner_id, id) on delete cascade
);
create index strokes_board_idx on strokes (owner_id, board_id);

create trigger works_touch before update on works for each row execute function deeprecall_touch_updated_at();
create trigger blobs_meta_touch before update on blobs_meta for each row execute function deeprecall_touch_updated_at();
create trigger device_blobs_touch before update on device_blobs for each row execute function deeprecall_touch_updated_at();
create trigger assets_touch before update on assets for each row execute function deeprecall_touch_updated_at();
create trigger annotations_touch before update on annotations for each row execute function deeprecall_touch_updated_at();
create trigger activities_touch before update on activities for each row execute function deeprecall_touch_updated_at();
create trigger boards_touch before update on boards for each row execute function deeprecall_touch_updated_at();
create trigger strokes_touch before update on strokes for each row execute function deeprecall_touch_updated_at();

-- Idempotency ledger for POST /v1/batch: one row per (owner, op_id) applied. Written in the same transaction as
-- the op itself, so "recorded" and "applied" can never disagree. Not synced (not in the publication).
create table sync_applied_ops (
  owner_id      uuid        not null default deeprecall_current_user_id(),
  op_id         uuid        not null,
  applied_at    timestamptz not null default now(),
  primary key (owner_id, op_id)
);

-- The synced tables are exactly the members of this publication. The server reads it (pg_publication_tables) to
-- learn which tables and columns /v1/batch may write, and the live stream replicates it: adding a synced table is
-- "create table ...; alter publication deeprecall_sync add table ..." in a new migration — SQL only; policies/
-- gives every member of the publication its row-level security on the next migrate.
create publication deeprecall_sync for table
  works, blobs_meta, device_blobs, assets, annotations, activities, boards, strokes;

-- Admin dashboards: one row per (owner, sha256). security_invoker makes the caller's row-level security apply, so
-- a user-scoped reader sees only their own blobs and the admin role (policies/) sees everyone's.
create view v_blob_inventory with (security_invoker = true) as
select
  m.owner_id,
  m.sha256,
  m.size,
  m.mime,
  m.filename,
  m.page_count,
  m.image_width,
  m.image_height,
  coalesce(d.device_count, 0)                     as device_count,
  coalesce(d.devices, '{}'::uuid[])               as devices,
  coalesce(d.missing_on, '{}'::uuid[])            as missing_on,
  coalesce(a.asset_count, 0)                      as asset_count,
  m.size * coalesce(d.device_count, 0)            as stored_bytes,
  d.last_seen_at,
  m.created_at,
  m.updated_at
from blobs_meta m
left join lateral (
  select
    count(*) filter (where db.present)::integer                                   as device_count,
    array_agg(db.device_id order by db.device_id) filter (where db.present)       as devices,
    array_agg(db.device_id order by db.device_id) filter (where not db.present)   as missing_on,
    max(db.last_seen_at)                                                          as last_seen_at
  from device_blobs db
  where db.owner_id = m.owner_id and db.sha256 = m.sha256
) d on true
left join lateral (
  select count(*)::integer as asset_count
  from assets a
  where a.owner_id = m.owner_id and a.sha256 = m.sha256
) a on true;
