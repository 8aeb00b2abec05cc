-- Blob sizes that no aggregate can overflow (docs/decisions.md 46).
--
-- `size` was only checked to be >= 0, and the inventory computed `stored_bytes` as `size * device_count` in bigint:
-- one user's blob of size 2^63 - 1 on two devices made every query of the view that touched its row fail with
-- "bigint out of range", the admin dashboard's totals included, for every admin.
--
-- 1. A size is at most 2^53 - 1 bytes (8 PiB): the largest integer a JavaScript client holds exactly, far past any
--    file. `not valid`: enforced for every row written from now on, without scanning (or refusing) existing ones.
-- 2. `stored_bytes` is numeric, which no product of a bigint and an integer overflows; the admin API sums it and
--    `size` as numeric too. A view's column cannot change type in place, so the view is recreated (same columns,
--    same order); policies/ grants it again on every migrate.

alter table blobs_meta
  add constraint blobs_meta_size_max check (size <= 9007199254740991) not valid;

drop view v_blob_inventory;

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
  m.size::numeric * coalesce(d.device_count, 0)   as stored_bytes,
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
