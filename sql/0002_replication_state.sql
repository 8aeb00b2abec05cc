-- Replication bookkeeping of deeprecall-sync (not synced, not in the publication).
--
-- generation counts how often the slot had to be created anew. Stream offsets carry it: an offset from an older
-- generation cannot be resumed (changes were lost while the slot was gone), so its subscription refetches.
create table deeprecall_replication_state (
  slot_name   text primary key,
  generation  bigint not null default 1,
  updated_at  timestamptz not null default now()
);

-- Synced tables log their whole old row on update and delete. The stream needs it to (a) know whether a row
-- left a subscription's filter (an update that moves an annotation to another work must reach the old
-- subscription as a delete), and (b) fill columns Postgres leaves out of an update when it did not touch their
-- out-of-line (TOASTed) value, so clients always get whole rows. The cost is a bigger WAL record for updates
-- and deletes; inserts are unaffected. policies/ re-applies this to every member of the publication.
alter table works replica identity full;
alter table blobs_meta replica identity full;
alter table device_blobs replica identity full;
alter table assets replica identity full;
alter table annotations replica identity full;
alter table activities replica identity full;
alter table boards replica identity full;
alter table strokes replica identity full;
