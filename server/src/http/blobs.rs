//! Blob shells: coordination from devices, the unified BlobHandle, and the inventory.
//!
//! The bytes stay on devices. Postgres keeps three tables with different cardinalities (the seed's decision):
//! `blobs_meta` (one per owner and sha256), `device_blobs` (one per owner, device and sha256) and `assets` (many
//! per blob). The API merges them logically into a BlobHandle; the tables stay separate.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio_postgres::types::Json as PgJson;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::db::{Session, begin_scoped};
use crate::error::{ApiError, from_db};
use crate::http::batch::{Bounded, parse_off_runtime, read_body};
use crate::state::AppState;

/// Whether `s` is a sha256 in the canonical form: 64 lowercase hex characters.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_sha256(s: &str) -> Result<(), ApiError> {
    if is_sha256(s) {
        Ok(())
    } else {
        Err(ApiError::unprocessable(
            "invalid_sha256",
            "sha256 must be 64 lowercase hexadecimal characters",
        ))
    }
}

/// The largest `size` a blob can have (`blobs_meta_size_max`, sql/0005): 2^53 - 1, the largest integer a JavaScript
/// client holds exactly, and small enough that the inventory's sums never overflow (docs/decisions.md 46).
pub const MAX_BLOB_SIZE: i64 = (1 << 53) - 1;

/// One blob a device reports.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceBlobReport {
    /// Content hash.
    pub sha256: String,
    /// Size in bytes.
    pub size: i64,
    /// MIME type.
    #[serde(default)]
    pub mime: Option<String>,
    /// Original file name.
    #[serde(default)]
    pub filename: Option<String>,
    /// Where the device keeps it.
    #[serde(default)]
    pub path: Option<String>,
    /// Pages (PDFs).
    #[serde(default)]
    pub page_count: Option<i32>,
    /// Pixels (images).
    #[serde(default)]
    pub image_width: Option<i32>,
    /// Pixels (images).
    #[serde(default)]
    pub image_height: Option<i32>,
    /// `healthy` (default), `missing`, `modified` or `relocated`.
    #[serde(default)]
    pub health: Option<String>,
}

impl DeviceBlobReport {
    /// Everything Postgres would refuse, refused first with a message that names the field (the caller adds
    /// `blob_index`).
    fn check(&self) -> Result<(), ApiError> {
        check_sha256(&self.sha256)?;
        if self.size < 0 {
            return Err(ApiError::invalid_value("size must be >= 0"));
        }
        if self.size > MAX_BLOB_SIZE {
            return Err(ApiError::invalid_value(
                "size must be at most 9007199254740991 (2^53 - 1, 8 PiB)",
            ));
        }
        for (name, count) in [
            ("page_count", self.page_count),
            ("image_width", self.image_width),
            ("image_height", self.image_height),
        ] {
            if count.is_some_and(|n| n < 0) {
                return Err(ApiError::invalid_value(format!("{name} must be >= 0")));
            }
        }
        for (name, text) in [
            ("mime", &self.mime),
            ("filename", &self.filename),
            ("path", &self.path),
        ] {
            if text.as_deref().is_some_and(|t| t.contains('\0')) {
                return Err(ApiError::invalid_value(format!(
                    "{name} cannot contain the character U+0000 (Postgres refuses it)"
                )));
            }
        }
        if let Some(h) = &self.health
            && !["healthy", "missing", "modified", "relocated"].contains(&h.as_str())
        {
            return Err(ApiError::invalid_value(
                "health must be healthy, missing, modified or relocated",
            ));
        }
        Ok(())
    }
}

/// Body of `POST /v1/blobs/coordinate`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinateRequest {
    /// The reporting device's persistent id.
    pub device_id: Uuid,
    /// True when `blobs` is everything the device holds: its other blobs are then marked not present.
    #[serde(default)]
    pub complete: bool,
    /// The blobs.
    pub blobs: Vec<DeviceBlobReport>,
}

/// Parses a coordination body as a stream (like `/v1/batch`, docs/api.md "Limits"): `blobs` is counted while it is
/// read, and the parse stops at blob `max + 1` with 413 `too_many_blobs`, before the rest of the body is looked at.
/// Not JSON is 400 `invalid_json`; JSON of the wrong shape 422 `invalid_request`.
fn parse_coordinate(body: &[u8], max: usize) -> Result<CoordinateRequest, ApiError> {
    let exceeded = std::cell::Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = serde::de::DeserializeSeed::deserialize(
        CoordinateSeed {
            max,
            exceeded: &exceeded,
        },
        &mut de,
    )
    .and_then(|req| de.end().map(|()| req));
    match parsed {
        _ if exceeded.get() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_blobs",
            format!("at most {max} blobs per request; split it"),
        )),
        Err(e) if e.is_syntax() || e.is_eof() => Err(ApiError::bad_request(
            "invalid_json",
            format!("request body is not valid JSON: {e}"),
        )),
        Err(e) => Err(ApiError::unprocessable(
            "invalid_request",
            format!("invalid coordination request: {e}"),
        )),
        Ok(req) => Ok(req),
    }
}

/// [`CoordinateRequest`]'s fields, with `blobs` read through [`Bounded`].
struct CoordinateSeed<'f> {
    max: usize,
    exceeded: &'f std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for CoordinateSeed<'_> {
    type Value = CoordinateRequest;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        const FIELDS: &[&str] = &["device_id", "complete", "blobs"];
        d.deserialize_struct("CoordinateRequest", FIELDS, self)
    }
}

impl<'de> serde::de::Visitor<'de> for CoordinateSeed<'_> {
    type Value = CoordinateRequest;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object with `device_id` and `blobs`")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error;
        let (mut device_id, mut complete, mut blobs) = (None, None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "device_id" if device_id.is_none() => device_id = Some(map.next_value::<Uuid>()?),
                "complete" if complete.is_none() => complete = Some(map.next_value::<bool>()?),
                "blobs" if blobs.is_none() => {
                    blobs = Some(map.next_value_seed(Bounded::<DeviceBlobReport>::new(
                        self.max,
                        self.exceeded,
                        "an array of blobs",
                    ))?);
                }
                "device_id" | "complete" | "blobs" => {
                    return Err(A::Error::custom(format!("duplicate field `{key}`")));
                }
                other => {
                    return Err(A::Error::unknown_field(
                        other,
                        &["device_id", "complete", "blobs"],
                    ));
                }
            }
        }
        Ok(CoordinateRequest {
            device_id: device_id.ok_or_else(|| A::Error::missing_field("device_id"))?,
            complete: complete.unwrap_or(false),
            blobs: blobs.ok_or_else(|| A::Error::missing_field("blobs"))?,
        })
    }
}

/// Response of `POST /v1/blobs/coordinate`.
#[derive(Debug, Clone, Serialize)]
pub struct CoordinateResponse {
    /// Transaction id (matches the stream's `txn.xid`).
    pub txid: String,
    /// `blobs_meta` rows created.
    pub meta_created: u64,
    /// `blobs_meta` rows whose empty fields were filled in.
    pub meta_updated: u64,
    /// `device_blobs` rows inserted or changed for this device (an unchanged report whose row was seen within
    /// the last hour is not rewritten).
    pub devices_upserted: u64,
    /// This device's other blobs marked not present (`complete: true`).
    pub marked_missing: u64,
}

/// Handler for `POST /v1/blobs/coordinate`.
pub async fn coordinate(
    State(state): State<AppState>,
    user: AuthUser,
    request: axum::extract::Request,
) -> Result<Json<CoordinateResponse>, ApiError> {
    // Held until the coordination is answered.
    let (body, _permit) = read_body(&state, user.user_id, request).await?;
    let max = state.limits.max_ops_per_batch;
    let req = parse_off_runtime(body, move |bytes| parse_coordinate(bytes, max)).await?;
    if req.device_id.is_nil() {
        return Err(ApiError::invalid_value(
            "device_id must be the device's own persistent id, not the nil UUID",
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, b) in req.blobs.iter().enumerate() {
        b.check().map_err(|e| e.at_blob(i))?;
        if !seen.insert(b.sha256.as_str()) {
            return Err(
                ApiError::unprocessable("duplicate_sha256", "a sha256 appears twice").at_blob(i),
            );
        }
    }

    // Validated in request order (blob_index refers to it); written in sha256 order so that every request locks
    // blobs_meta rows in the same order: two devices reporting the same library concurrently in different orders
    // would otherwise deadlock (40P01).
    let mut req = req;
    req.blobs.sort_unstable_by(|a, b| a.sha256.cmp(&b.sha256));

    let mut client = state.user_pool.get(user.user_id).await?;
    let scope = client.scope().with_txid();
    let Session { tx, txid, .. } = begin_scoped(&mut client, &scope, &[])
        .await
        .map_err(|e| from_db(&e))?;
    let txid = txid.unwrap_or_default();
    let blobs = serde_json::to_value(&req.blobs).map_err(|e| ApiError::internal(&e))?;
    let blobs = PgJson(&blobs);
    const INPUT: &str = "jsonb_to_recordset($1) as x(sha256 text, size bigint, mime text, filename text, \
         path text, page_count integer, image_width integer, image_height integer, health text)";
    // Create what is missing; fill fields an earlier report left empty; never overwrite known metadata (the
    // same content has the same facts, and a no-op must not produce a change on the stream). The one exception is
    // a size past 2^53 - 1 written before sql/0005 bounded it: any update of such a row fails the (not valid)
    // bound, so the reported size replaces it, rather than one old row failing every report that names it.
    let meta_sql = format!(
        "insert into blobs_meta (sha256, size, mime, filename, page_count, image_width, image_height)
         select sha256, size, mime, filename, page_count, image_width, image_height from {INPUT}
         on conflict (owner_id, sha256) do update set
           size = case when blobs_meta.size > {MAX_BLOB_SIZE} then excluded.size else blobs_meta.size end,
           mime = coalesce(blobs_meta.mime, excluded.mime),
           filename = coalesce(blobs_meta.filename, excluded.filename),
           page_count = coalesce(blobs_meta.page_count, excluded.page_count),
           image_width = coalesce(blobs_meta.image_width, excluded.image_width),
           image_height = coalesce(blobs_meta.image_height, excluded.image_height)
         where blobs_meta.size > {MAX_BLOB_SIZE}
            or (blobs_meta.mime is null and excluded.mime is not null)
            or (blobs_meta.filename is null and excluded.filename is not null)
            or (blobs_meta.page_count is null and excluded.page_count is not null)
            or (blobs_meta.image_width is null and excluded.image_width is not null)
            or (blobs_meta.image_height is null and excluded.image_height is not null)
         returning (xmax = 0)"
    );
    let meta_rows = tx
        .query(&meta_sql, &[&blobs])
        .await
        .map_err(|e| from_db(&e))?;
    let meta_created = meta_rows.iter().filter(|r| r.get::<_, bool>(0)).count() as u64;
    let meta_updated = meta_rows.len() as u64 - meta_created;
    let device_sql = format!(
        "insert into device_blobs (device_id, sha256, path, present, health, last_seen_at)
         select $2, sha256, path, coalesce(health, 'healthy') <> 'missing', coalesce(health, 'healthy'), now()
           from {INPUT}
         on conflict (owner_id, device_id, sha256) do update set
           path = excluded.path, present = excluded.present, health = excluded.health,
           last_seen_at = excluded.last_seen_at
         -- A rescan that finds nothing new writes nothing (no WAL, no stream traffic to every device), except
         -- to refresh last_seen_at once it is older than the resolution anyone needs: an hour.
         where device_blobs.path is distinct from excluded.path
            or device_blobs.present <> excluded.present
            or device_blobs.health <> excluded.health
            or device_blobs.last_seen_at < excluded.last_seen_at - interval '1 hour'"
    );
    let devices_upserted = tx
        .execute(&device_sql, &[&blobs, &req.device_id])
        .await
        .map_err(|e| from_db(&e))?;
    let marked_missing = if req.complete {
        let hashes: Vec<&str> = req.blobs.iter().map(|b| b.sha256.as_str()).collect();
        tx.execute(
            "update device_blobs set present = false, health = 'missing'
              where device_id = $1 and present and not (sha256 = any($2::text[]))",
            &[&req.device_id, &hashes],
        )
        .await
        .map_err(|e| from_db(&e))?
    } else {
        0
    };
    tx.commit().await.map_err(|e| from_db(&e))?;
    client.settled();
    Ok(Json(CoordinateResponse {
        txid,
        meta_created,
        meta_updated,
        devices_upserted,
        marked_missing,
    }))
}

/// At most this many `devices` and `assets` rows in one BlobHandle.
pub const HANDLE_MAX_ROWS: usize = 1000;
/// At most this many bytes of JSON in either list of one BlobHandle (or its one first row, if that is larger).
///
/// A user decides how many rows one sha256 has (assets are written through `/v1/batch`, a thousand per request) and
/// how long their text is; the server decides how much of that one request holds. Without the caps, 200,000 assets
/// of one blob made an 83 MB answer and took the server from 407 to 1,000 MB per request (docs/decisions.md 46).
pub const HANDLE_MAX_LIST_BYTES: usize = 4 << 20;

/// The caller's BlobHandle: `devices` and `assets` capped by [`HANDLE_MAX_ROWS`] and [`HANDLE_MAX_LIST_BYTES`]
/// (`*_truncated` says a list was cut), every row passed on as the JSON text Postgres made of it.
#[derive(Debug, Serialize)]
pub struct BlobHandle {
    sha256: String,
    meta: Option<Box<serde_json::value::RawValue>>,
    devices: JsonRows,
    devices_truncated: bool,
    assets: JsonRows,
    assets_truncated: bool,
    available_on: Vec<Uuid>,
}

/// Rows of JSON text passed on as they are (no JSON tree).
pub type JsonRows = Vec<Box<serde_json::value::RawValue>>;

/// The rows of `sql` (its first column JSON `text`), kept while the list stays within `max_rows` and `max_bytes`;
/// with the last row kept (for a cursor) and whether a row was left out.
///
/// Read through a portal, a few rows at a time (the next fetch sized by the rows so far), so a list cut for its bytes
/// also stops Postgres: a plain query ran to its `limit`, and with rows of a megabyte (a user's filenames) Postgres
/// built and sent a gigabyte that the server then threw away, holding the pooled connection meanwhile.
pub(crate) async fn capped_rows(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    max_rows: usize,
    max_bytes: usize,
) -> Result<(JsonRows, Option<tokio_postgres::Row>, bool), ApiError> {
    let portal = tx.bind(sql, params).await.map_err(|e| from_db(&e))?;
    let (mut rows, mut last, mut bytes) = (Vec::new(), None, 0usize);
    let mut fetch = 8usize;
    loop {
        let batch = tx
            .query_portal(&portal, i32::try_from(fetch).unwrap_or(i32::MAX))
            .await
            .map_err(|e| from_db(&e))?;
        let exhausted = batch.len() < fetch;
        for row in batch {
            let text: String = row.get(0);
            // A row that would take the list past its bytes is left out, unless it is the first (a list is never
            // empty for its bytes alone).
            if rows.len() >= max_rows || (!rows.is_empty() && bytes + text.len() > max_bytes) {
                return Ok((rows, last, true));
            }
            bytes += text.len();
            rows.push(
                serde_json::value::RawValue::from_string(text)
                    .map_err(|e| ApiError::internal(&e))?,
            );
            last = Some(row);
        }
        if exhausted {
            return Ok((rows, last, false));
        }
        // As many rows as the room left holds at the average size so far (one more, to see the cut), 1..=256.
        let average = (bytes / rows.len().max(1)).max(1);
        fetch = (max_bytes.saturating_sub(bytes) / average + 1)
            .min(max_rows + 1 - rows.len().min(max_rows))
            .clamp(1, 256);
    }
}

/// Handler for `GET /v1/blobs/{sha256}`: the caller's BlobHandle.
pub async fn get_blob(
    State(state): State<AppState>,
    user: AuthUser,
    sha256: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<BlobHandle>, ApiError> {
    // A path segment that is not UTF-8 once decoded (`%FF`) is not a sha256 either: the same JSON error, not
    // axum's plain-text rejection.
    let sha256 = sha256.map(|Path(s)| s).unwrap_or_default();
    check_sha256(&sha256)?;
    let mut client = state.user_pool.get(user.user_id).await?;
    let scope = client.scope().read_only();
    let session = begin_scoped(&mut client, &scope, &[])
        .await
        .map_err(|e| from_db(&e))?;
    let tx = &session.tx;
    let meta: Option<String> = tx
        .query_opt(
            "select ((to_jsonb(m) - 'owner_id' - 'sha256'))::text from blobs_meta m where m.sha256 = $1",
            &[&sha256],
        )
        .await
        .map_err(|e| from_db(&e))?
        .map(|row| row.get(0));
    let limit = HANDLE_MAX_ROWS + 1;
    let (devices, _, devices_truncated) = capped_rows(
        tx,
        &format!(
            "select (to_jsonb(d) - 'owner_id' - 'sha256' - 'id')::text from device_blobs d
              where d.sha256 = $1 order by d.device_id limit {limit}"
        ),
        &[&sha256],
        HANDLE_MAX_ROWS,
        HANDLE_MAX_LIST_BYTES,
    )
    .await?;
    let (assets, _, assets_truncated) = capped_rows(
        tx,
        &format!(
            "select (to_jsonb(a) - 'owner_id' - 'sha256')::text from assets a
              where a.sha256 = $1 order by a.created_at, a.id limit {limit}"
        ),
        &[&sha256],
        HANDLE_MAX_ROWS,
        HANDLE_MAX_LIST_BYTES,
    )
    .await?;
    // Its own query: `devices` may be cut, the devices that hold the bytes must not be.
    let available_on: Vec<Uuid> = tx
        .query(
            &format!(
                "select device_id from device_blobs where sha256 = $1 and present
                  order by device_id limit {HANDLE_MAX_ROWS}"
            ),
            &[&sha256],
        )
        .await
        .map_err(|e| from_db(&e))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    // Read-only: dropped, it queues its ROLLBACK, and nothing else runs on the connection.
    drop(session);
    client.settled();
    if meta.is_none() && devices.is_empty() && assets.is_empty() {
        // Same answer whether the blob does not exist or belongs to someone else.
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no blob with this sha256",
        ));
    }
    let meta = meta
        .map(serde_json::value::RawValue::from_string)
        .transpose()
        .map_err(|e| ApiError::internal(&e))?;
    Ok(Json(BlobHandle {
        sha256,
        meta,
        devices,
        devices_truncated,
        assets,
        assets_truncated,
        available_on,
    }))
}

/// Paging parameters of the inventory endpoints.
#[derive(Debug, Clone, Deserialize)]
pub struct InventoryQuery {
    /// Page size, 1..=1000 (default 100).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Admin only: restrict to one owner.
    pub owner_id: Option<Uuid>,
}

fn query_error(e: QueryRejection) -> ApiError {
    ApiError::unprocessable("invalid_query", e.body_text())
}

/// Handler for `GET /v1/blobs`: the caller's own inventory rows.
pub async fn my_inventory(
    State(state): State<AppState>,
    user: AuthUser,
    q: Result<Query<InventoryQuery>, QueryRejection>,
) -> Result<Json<InventoryPage>, ApiError> {
    let Query(mut q) = q.map_err(query_error)?;
    q.owner_id = None;
    inventory(&state, user.user_id, q).await
}

async fn inventory(
    state: &AppState,
    user: Uuid,
    q: InventoryQuery,
) -> Result<Json<InventoryPage>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::unprocessable(
            "invalid_limit",
            "limit must be between 1 and 1000",
        ));
    }
    let (after_owner, after_sha) = match &q.cursor {
        None => (None, None),
        Some(c) => {
            let (o, s) = decode_cursor(c).ok_or_else(|| {
                ApiError::unprocessable("invalid_cursor", "cursor is not one this server issued")
            })?;
            (Some(o), Some(s))
        }
    };
    let mut client = state.user_pool.get(user).await?;
    let scope = client.scope().read_only();
    let Session { tx, .. } = begin_scoped(&mut client, &scope, &[])
        .await
        .map_err(|e| from_db(&e))?;
    // Keyset paging on (owner_id, sha256), the unique key of blobs_meta: stable under concurrent inserts.
    let (items, last, more) = capped_rows(
        &tx,
        &format!(
            "select {}, v.owner_id, v.sha256 from v_blob_inventory v
              where ($1::uuid is null or v.owner_id = $1)
                and ($2::uuid is null or (v.owner_id, v.sha256) > ($2, $3::text))
              order by v.owner_id, v.sha256
              limit $4",
            inventory_row_json()
        ),
        &[&q.owner_id, &after_owner, &after_sha, &(limit + 1)],
        limit as usize,
        INVENTORY_PAGE_BYTES,
    )
    .await?;
    drop(tx);
    client.settled();
    let next_cursor = match (more, last) {
        (true, Some(r)) => Some(encode_cursor(r.get(1), r.get::<_, String>(2).as_str())),
        _ => None,
    };
    Ok(Json(InventoryPage {
        items,
        next_cursor,
        total: None,
    }))
}

/// At most this many bytes of rows in one page of the inventory (`GET /v1/blobs`, `GET /v1/admin/blobs`): a page
/// ends at `limit` rows or here, whichever comes first (a first row larger than this comes alone), and its
/// `next_cursor` goes on after its last row. A user decides how long a blob's `filename` and `mime` are (nothing
/// but the request body bounds them); the server decides how much of that one request holds (docs/decisions.md 46).
pub const INVENTORY_PAGE_BYTES: usize = 4 << 20;

/// At most this many ids in an inventory row's `devices`, and as many in its `missing_on`; `devices_truncated` /
/// `missing_on_truncated` say a list was cut. A user decides how many devices report one blob; `device_count` and
/// the admin's `device_id` filter still count and search them all.
pub const INVENTORY_MAX_DEVICES: usize = 100;

/// The JSON text of an inventory row `v` as the API answers it: the view's columns with `devices` and `missing_on`
/// cut at [`INVENTORY_MAX_DEVICES`], and the two `*_truncated` flags.
pub(crate) fn inventory_row_json() -> String {
    let n = INVENTORY_MAX_DEVICES;
    format!(
        "(to_jsonb(v) || jsonb_build_object(
            'devices', to_jsonb(v.devices[1:{n}]), 'devices_truncated', cardinality(v.devices) > {n},
            'missing_on', to_jsonb(v.missing_on[1:{n}]), 'missing_on_truncated', cardinality(v.missing_on) > {n}
         ))::text"
    )
}

/// A page of inventory rows, each passed on as the JSON text Postgres made of it.
#[derive(Debug, Serialize)]
pub struct InventoryPage {
    pub items: JsonRows,
    pub next_cursor: Option<String>,
    /// Rows matching the filters (`GET /v1/admin/blobs?count=true` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<i64>,
}

fn encode_cursor(owner: Uuid, sha256: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{owner}/{sha256}"))
}

fn decode_cursor(cursor: &str) -> Option<(Uuid, String)> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (owner, sha) = text.split_once('/')?;
    is_sha256(sha).then(|| Some((Uuid::parse_str(owner).ok()?, sha.to_owned())))?
}
