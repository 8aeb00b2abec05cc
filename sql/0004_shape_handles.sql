-- Signing key of the shape handles of GET /v1/shape (server/src/live/handle.rs; docs/decisions.md, "Shape handles
-- and offsets"). Handles are stateless: a handle names its user and shape definition through an HMAC with this key,
-- so they survive a server restart and work on every server of this database. The server creates the key on first
-- use (one row). Deleting the row rotates it: every handle then answers 409 and clients refetch their shapes.
-- Not synced and not granted to deeprecall_user: only the server's own role reads it.
create table deeprecall_shape_keys (
  id          boolean     primary key default true check (id),
  key         bytea       not null check (length(key) = 32),
  created_at  timestamptz not null default now()
);
