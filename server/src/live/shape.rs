//! `GET /v1/shape`: Electric's HTTP shape API (docs/electric.md) over the same core as `/v1/stream`: the snapshot
//! job with its barrier handoff, the subscription state, the per-user history for offsets, the filter with its
//! move-in/move-out rules and the must-refetch reasons. Every shape is limited to the token's user.
//!
//! ```text
//! offset=-1            register with the hub ─► snapshot job ─► report (S, L, B) ─► headers (offset = B)
//!                      body: rows as the job reads them, then the buffered transactions the rows miss (up to B),
//!                      then up-to-date
//! offset=O             history after O (whole transactions, filtered) then up-to-date; or 409
//! offset=O&live=true   the same; if nothing: hold (registered with the hub) until a change, a refetch (409),
//!                      the hold time (up-to-date at the current position) or shutdown
//! …&live_sse=true      the same as server-sent events for up to a minute
//! ```
//!
//! Handles are signed and stateless (handle.rs); definitions are compiled once and cached (their literals are
//! canonicalised through Postgres, which also validates them).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_postgres::types::Oid;
use uuid::Uuid;

use super::electric::{
    ShapeColumn, ShapeEncoder, format_offset, must_refetch_body, parse_offset, schema_header,
    write_up_to_date,
};
use super::filter::Filter;
use super::handle::{HandleKey, KEY_BYTES};
use super::hub::{CannotResume, ConnEvent, ConnQueue, Hub, LagSignal};
use super::job::{JobError, JobReport, JobSpec, Prepared, Purpose, SnapshotColumn};
use super::offset::Offset;
use super::routing::UserTxn;
use super::snapshot::{self, SinkGone, SnapshotSink, canonicalise};
use super::subscription::{MustRefetch, Subscription};
use super::where_sql::parse_where;
use crate::auth::{AuthError, AuthUser};
use crate::db::catalog::Table;
use crate::error::{ApiError, from_db};
use crate::state::AppState;

/// Timing of the shape endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapeConfig {
    /// How long a `live=true` request waits for a change before answering up-to-date (the client gives up after
    /// 45 s; Electric holds 20 s).
    pub live_hold: Duration,
    /// How long a server-sent-events response stays open.
    pub sse_duration: Duration,
    /// How often an idle server-sent-events response sends a keep-alive.
    pub sse_keepalive: Duration,
    /// Most bytes of compiled definitions kept, server-wide (estimated; 64 MiB by default).
    pub max_definition_bytes: usize,
}

impl Default for ShapeConfig {
    fn default() -> Self {
        Self {
            live_hold: Duration::from_secs(20),
            sse_duration: Duration::from_secs(60),
            sse_keepalive: Duration::from_secs(21),
            max_definition_bytes: MAX_DEFINITION_BYTES,
        }
    }
}

/// Most compiled definitions kept.
const MAX_DEFINITIONS: usize = 4096;
/// Most bytes of compiled definitions kept by default (their estimated [`ShapeDef::retained_bytes`] plus their keys).
/// A definition's `where` and `params` come in the request line (up to 64 KiB), so 4,096 of them could hold about
/// 550 MiB; one user could fill that in 40 s (decisions 41).
const MAX_DEFINITION_BYTES: usize = 64 * 1024 * 1024;
/// How long a request with an offset waits for a (re)starting stream to reach it.
const RESUME_WAIT: Duration = Duration::from_secs(10);
/// Bytes of rows collected before a chunk of a snapshot body is handed to the socket.
const BODY_CHUNK: usize = 64 * 1024;

/// The shape endpoint's shared state.
#[derive(Debug)]
pub struct Shapes {
    config: ShapeConfig,
    key: tokio::sync::OnceCell<HandleKey>,
    definitions: Mutex<Definitions<Arc<ShapeDef>>>,
    cursor: AtomicU64,
}

/// The compiled definitions, by [`ShapeRequest::definition_key`], bounded in count and in bytes; when full, the
/// least recently used quarter of the bytes goes.
#[derive(Debug)]
struct Definitions<T> {
    entries: HashMap<String, Cached<T>>,
    max_entries: usize,
    max_bytes: usize,
    bytes: usize,
    /// Bumped at every use: the recency of an entry.
    clock: u64,
}

#[derive(Debug)]
struct Cached<T> {
    def: T,
    bytes: usize,
    used: u64,
}

impl<T: Clone> Definitions<T> {
    fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            entries: HashMap::new(),
            max_entries,
            max_bytes,
            bytes: 0,
            clock: 0,
        }
    }

    fn get(&mut self, key: &str) -> Option<T> {
        self.clock += 1;
        let entry = self.entries.get_mut(key)?;
        entry.used = self.clock;
        Some(entry.def.clone())
    }

    /// Keeps `def` (about `bytes` large besides its key) under `key`, making room first.
    fn insert(&mut self, key: String, def: T, bytes: usize) {
        let (max_entries, max_bytes) = (self.max_entries, self.max_bytes);
        let bytes = key.len() + bytes;
        if let Some(old) = self.entries.remove(&key) {
            self.bytes -= old.bytes;
        }
        if self.entries.len() >= max_entries || self.bytes + bytes > max_bytes {
            // Oldest first, down to three quarters of each bound: eviction is rare and amortised.
            let mut by_age: Vec<(u64, &String, usize)> = self
                .entries
                .iter()
                .map(|(k, e)| (e.used, k, e.bytes))
                .collect();
            by_age.sort_unstable_by_key(|&(used, ..)| used);
            let (mut count, mut total) = (self.entries.len(), self.bytes);
            let mut gone = Vec::new();
            for (_, k, b) in by_age {
                if count < max_entries * 3 / 4 && total + bytes <= max_bytes * 3 / 4 {
                    break;
                }
                gone.push(k.clone());
                count -= 1;
                total -= b;
            }
            for k in gone {
                self.entries.remove(&k);
            }
            self.bytes = total;
        }
        self.clock += 1;
        self.bytes += bytes;
        let used = self.clock;
        self.entries.insert(key, Cached { def, bytes, used });
    }
}

impl Shapes {
    /// Empty state with `config`.
    pub fn new(config: ShapeConfig) -> Self {
        Self {
            config,
            key: tokio::sync::OnceCell::new(),
            definitions: Mutex::new(Definitions::new(
                MAX_DEFINITIONS,
                config.max_definition_bytes,
            )),
            cursor: AtomicU64::new(0),
        }
    }

    /// The timing.
    pub fn config(&self) -> ShapeConfig {
        self.config
    }

    /// How many compiled definitions are kept, and about how many bytes they hold.
    pub fn cached_definitions(&self) -> (usize, usize) {
        let defs = self.definitions.lock().unwrap_or_else(|e| e.into_inner());
        (defs.entries.len(), defs.bytes)
    }

    /// A cursor never handed out before, also across restarts (the client suppresses an up-to-date whose cursor
    /// it has seen within a minute): milliseconds since the epoch, or one more than the last one.
    fn next_cursor(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut current = self.cursor.load(Ordering::Relaxed);
        loop {
            let next = now.max(current + 1);
            match self
                .cursor
                .compare_exchange(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(actual) => current = actual,
            }
        }
    }

    /// The handle signing key, created in the database on first use.
    async fn key(&self, pool: &deadpool_postgres::Pool) -> Result<HandleKey, ApiError> {
        self.key
            .get_or_try_init(|| async {
                let client = pool.get().await?;
                let fresh: [u8; KEY_BYTES] = rand::random();
                client
                    .execute(
                        "insert into deeprecall_shape_keys (key) values ($1) on conflict (id) do nothing",
                        &[&fresh.as_slice()],
                    )
                    .await
                    .map_err(|e| from_db(&e))?;
                let key: Vec<u8> = client
                    .query_one("select key from deeprecall_shape_keys", &[])
                    .await
                    .map_err(|e| from_db(&e))?
                    .get(0);
                HandleKey::from_bytes(&key).ok_or_else(|| {
                    ApiError::internal_fault(
                        "the shape handle key in deeprecall_shape_keys is malformed",
                    )
                })
            })
            .await
            .cloned()
    }
}

/// A compiled shape definition.
#[derive(Debug)]
pub struct ShapeDef {
    table: Arc<Table>,
    filter: Filter,
    columns: Vec<ShapeColumn>,
    snapshot_columns: Arc<[SnapshotColumn]>,
    schema: String,
    replica_full: bool,
    /// What a handle is bound to, besides the user and the slot generation.
    hash: [u8; 32],
}

impl ShapeDef {
    /// About how many bytes the definition holds (its filter, column descriptions and schema header).
    fn retained_bytes(&self) -> usize {
        let column = |name: &str, typname: &str| {
            name.len() + typname.len() + std::mem::size_of::<ShapeColumn>()
        };
        std::mem::size_of::<Self>()
            + self.filter.retained_bytes()
            + self.schema.len()
            + self
                .columns
                .iter()
                .map(|c| column(&c.name, &c.typname))
                .sum::<usize>()
            + self
                .snapshot_columns
                .iter()
                .map(|c| column(&c.name, ""))
                .sum::<usize>()
    }

    fn encoder(&self) -> ShapeEncoder {
        ShapeEncoder::new(
            &self.table.schema,
            &self.table.name,
            self.columns.clone(),
            self.replica_full,
        )
    }
}

/// `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OffsetParam {
    /// `-1`: from the start.
    Initial,
    /// An offset this server issued.
    At(u64),
    /// Anything else: the client must start over (409).
    Malformed,
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ShapeRequest {
    table: String,
    offset: OffsetParam,
    handle: Option<String>,
    live: bool,
    sse: bool,
    where_: String,
    params: BTreeMap<usize, String>,
    columns: Option<String>,
    replica_full: bool,
}

impl ShapeRequest {
    /// The definition's cache key: everything that shapes the definition, as sent.
    fn definition_key(&self) -> String {
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "{}\0{}\0{}\0{}\0{}",
            self.table,
            self.where_,
            params.join("\u{1}"),
            self.columns.as_deref().unwrap_or("\u{2}"),
            self.replica_full
        )
    }
}

/// The query parameters [`parse_request`] reads (besides `params[n]`); any other is ignored.
const READ_PARAMETERS: [&str; 11] = [
    "table",
    "offset",
    "handle",
    "live",
    "live_sse",
    "experimental_live_sse",
    "where",
    "params",
    "columns",
    "replica",
    "log",
];

fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(code, message)
}

/// Parses the query string. Unknown parameters are ignored (the client adds `cursor`, `log`, `cache-buster`,
/// `expired_handle`, … and apps add their own).
///
/// A parameter this endpoint reads that is given twice with different values is refused: which one a proxy, a cache
/// or a log in front of the server took is unknowable, and the shape must be the one the client meant. The same value
/// twice is harmless and accepted. `params[n]` must be numbered 1, 2, … without gaps (Electric's rule); one that
/// `where` does not use is accepted, as Electric does.
fn parse_request(query: &str) -> Result<ShapeRequest, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
        .map_err(|e| bad_request("invalid_request", format!("malformed query string: {e}")))?;
    let mut last: HashMap<&str, &str> = HashMap::new();
    let mut params = BTreeMap::new();
    let twice = |k: &str| {
        bad_request(
            "invalid_request",
            format!("`{k}` is given twice with different values"),
        )
    };
    for (k, v) in &pairs {
        if let Some(n) = k.strip_prefix("params[").and_then(|r| r.strip_suffix(']')) {
            let n: usize = n.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                bad_request(
                    "invalid_params",
                    format!("`{k}`: use params[1], params[2], …"),
                )
            })?;
            if params.insert(n, v.clone()).is_some_and(|old| old != *v) {
                return Err(twice(k));
            }
        } else if last
            .insert(k.as_str(), v.as_str())
            .is_some_and(|old| old != v)
            && READ_PARAMETERS.contains(&k.as_str())
        {
            return Err(twice(k));
        }
    }
    if let Some((gap, _)) = params.keys().enumerate().find(|(i, n)| **n != i + 1) {
        return Err(bad_request(
            "invalid_params",
            format!(
                "params must be numbered 1, 2, … without gaps; params[{}] is missing",
                gap + 1
            ),
        ));
    }
    if last.contains_key("params") {
        return Err(bad_request(
            "invalid_params",
            "send `where` parameters as params[1]=…&params[2]=…",
        ));
    }
    let table = last
        .get("table")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad_request("invalid_request", "`table` is required"))?
        .to_string();
    let offset = match last.get("offset").copied() {
        None => {
            return Err(bad_request(
                "invalid_request",
                "`offset` is required (-1 to start)",
            ));
        }
        Some("-1") => OffsetParam::Initial,
        Some("now") => {
            return Err(bad_request(
                "invalid_request",
                "offset=now is not supported; start with offset=-1",
            ));
        }
        Some(o) => parse_offset(o).map_or(OffsetParam::Malformed, OffsetParam::At),
    };
    let flag = |name: &str| -> Result<bool, ApiError> {
        match last.get(name).copied() {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => Err(bad_request(
                "invalid_request",
                format!("`{name}` must be true or false, not {other:?}"),
            )),
        }
    };
    let live = flag("live")?;
    let sse = live && (flag("live_sse")? || flag("experimental_live_sse")?);
    let handle = last
        .get("handle")
        .filter(|h| !h.is_empty())
        .map(|h| h.to_string());
    if offset != OffsetParam::Initial && handle.is_none() {
        return Err(bad_request(
            "invalid_request",
            "`handle` is required with an offset other than -1",
        ));
    }
    if live && offset == OffsetParam::Initial {
        return Err(bad_request(
            "invalid_request",
            "live=true needs an offset and handle from an earlier response",
        ));
    }
    let replica_full = match last.get("replica").copied() {
        None | Some("default") => false,
        Some("full") => true,
        Some(other) => {
            return Err(bad_request(
                "invalid_request",
                format!("`replica` must be default or full, not {other:?}"),
            ));
        }
    };
    match last.get("log").copied() {
        None | Some("full") => {}
        Some(other) => {
            return Err(bad_request(
                "invalid_request",
                format!("log={other} is not supported; use log=full"),
            ));
        }
    }
    Ok(ShapeRequest {
        table,
        offset,
        handle,
        live,
        sse,
        where_: last.get("where").copied().unwrap_or("").to_owned(),
        params,
        columns: last.get("columns").map(|c| c.to_string()),
        replica_full,
    })
}

/// Splits a comma-separated list of SQL identifiers (`"id","owner_id"`, `id,title`); quoted ones are taken
/// verbatim (`""` is a quote), bare ones fold to lower case.
fn identifiers(list: &str, separator: char) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = list.trim().chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut name = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        name.push('"');
                    }
                    '"' => break,
                    c => name.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == separator || c.is_whitespace() {
                    break;
                }
                name.push(c.to_ascii_lowercase());
                chars.next();
            }
        }
        if name.is_empty() {
            return None;
        }
        out.push(name);
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next() {
            None => return Some(out),
            Some(c) if c == separator => continue,
            Some(_) => return None,
        }
    }
}

impl Shapes {
    /// The compiled definition of `req` (cached), or why the request is bad. Compiling takes one of `owner`'s
    /// pooled connections.
    async fn definition(
        &self,
        state: &AppState,
        owner: Uuid,
        req: &ShapeRequest,
    ) -> Result<Arc<ShapeDef>, ApiError> {
        let cache_key = req.definition_key();
        let catalog = state.catalog.get().await;
        let cached = self
            .definitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&cache_key);
        if let Some(def) = cached
            && catalog
                .table(&def.table.name)
                .is_some_and(|t| Arc::ptr_eq(t, &def.table))
        {
            return Ok(def);
        }
        let def = Arc::new(compile(state, owner, req).await?);
        self.definitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cache_key, def.clone(), def.retained_bytes());
        Ok(def)
    }
}

async fn compile(state: &AppState, owner: Uuid, req: &ShapeRequest) -> Result<ShapeDef, ApiError> {
    let parts = identifiers(&req.table, '.')
        .filter(|p| p.len() <= 2)
        .ok_or_else(|| {
            bad_request(
                "unknown_table",
                format!("`{}` is not a table name", req.table),
            )
        })?;
    let unknown = || {
        bad_request(
            "unknown_table",
            format!("`{}` is not a synced table", req.table),
        )
    };
    let (schema, name) = match parts.as_slice() {
        [name] => (None, name.as_str()),
        [schema, name] => (Some(schema.as_str()), name.as_str()),
        _ => return Err(unknown()),
    };
    let table = match state.catalog.get().await.table(name) {
        Some(t) => t.clone(),
        None => {
            let fresh = state.catalog.refresh_on_miss(&state.pool).await?;
            fresh.table(name).cloned().ok_or_else(unknown)?
        }
    };
    if schema.is_some_and(|s| s != table.schema) {
        return Err(unknown());
    }
    let filter = parse_where(&req.where_, &req.params, |c| table.column(c))
        .map_err(|e| bad_request("invalid_where", e.0))?;
    let mut client = state.user_pool.get(owner).await?;
    let filter = canonicalise(&*client, &filter).await.map_err(|e| match e {
        JobError::BadFilter(m) => {
            bad_request("invalid_where", format!("invalid `where` value: {m}"))
        }
        other => {
            tracing::warn!(error = %other, "canonicalising a shape's where failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database is unavailable; retry later",
            )
        }
    })?;
    let rows = client
        .query(
            "select a.attname::text, a.atttypid,
                    (case when t.typcategory = 'A' and et.oid is not null then et.typname else t.typname end)::text,
                    case when t.typcategory = 'A' and et.oid is not null then greatest(a.attndims, 1) else 0 end,
                    a.attnotnull, array_position(pk.conkey, a.attnum), a.attgenerated <> ''
               from pg_attribute a
               join pg_type t on t.oid = a.atttypid
               left join pg_type et on et.oid = t.typelem and t.typelem <> 0
               left join pg_constraint pk on pk.conrelid = a.attrelid and pk.contype = 'p'
              where a.attrelid = $1 and a.attnum > 0 and not a.attisdropped
              order by a.attnum",
            &[&(table.oid as Oid)],
        )
        .await
        .map_err(|e| from_db(&e))?;
    client.settled();
    let mut all: Vec<(ShapeColumn, bool)> = rows
        .iter()
        .map(|r| {
            let pk: Option<i32> = r.get(5);
            (
                ShapeColumn {
                    name: r.get(0),
                    type_oid: r.get(1),
                    typname: r.get(2),
                    dims: r.get(3),
                    not_null: r.get(4),
                    pk_index: pk.and_then(|p| usize::try_from(p - 1).ok()),
                },
                r.get(6),
            )
        })
        .collect();
    let columns: Vec<ShapeColumn> = match &req.columns {
        None => all
            .drain(..)
            .filter(|(_, generated)| !generated)
            .map(|(c, _)| c)
            .collect(),
        Some(list) => {
            let wanted = identifiers(list, ',').ok_or_else(|| {
                bad_request(
                    "invalid_columns",
                    "`columns` must be a comma-separated list of column names",
                )
            })?;
            for w in &wanted {
                match all.iter().find(|(c, _)| c.name == *w) {
                    None => {
                        return Err(bad_request(
                            "invalid_columns",
                            format!("unknown column `{w}` in `columns`"),
                        ));
                    }
                    Some((_, true)) => {
                        return Err(bad_request(
                            "invalid_columns",
                            format!("`{w}` is a generated column; it cannot be synced"),
                        ));
                    }
                    Some(_) => {}
                }
            }
            if let Some((missing, _)) = all
                .iter()
                .find(|(c, _)| c.pk_index.is_some() && !wanted.contains(&c.name))
            {
                return Err(bad_request(
                    "invalid_columns",
                    format!(
                        "`columns` must include the primary key (`{}` is missing)",
                        missing.name
                    ),
                ));
            }
            all.drain(..)
                .filter(|(c, _)| wanted.contains(&c.name))
                .map(|(c, _)| c)
                .collect()
        }
    };
    if !columns.iter().any(|c| c.pk_index.is_some()) {
        return Err(ApiError::internal_fault(&format!(
            "synced table {} has no primary key",
            table.name
        )));
    }
    let mut hash = Sha256::new();
    hash.update(b"deeprecall-shape/1\0");
    hash.update(table.oid.to_be_bytes());
    hash.update(table.schema.as_bytes());
    hash.update(b".");
    hash.update(table.name.as_bytes());
    hash.update(b"\0");
    hash.update(filter.canonical_text().as_bytes());
    hash.update(b"\0");
    for c in &columns {
        hash.update(c.name.as_bytes());
        hash.update(b",");
    }
    hash.update(if req.replica_full {
        b"\0full"
    } else {
        b"\0dflt"
    });
    Ok(ShapeDef {
        snapshot_columns: columns
            .iter()
            .map(|c| SnapshotColumn {
                name: c.name.clone(),
                type_oid: c.type_oid,
            })
            .collect(),
        schema: schema_header(&columns),
        columns,
        table,
        filter,
        replica_full: req.replica_full,
        hash: hash.finalize().into(),
    })
}

/// `GET /v1/shape`.
pub async fn get_shape(
    State(state): State<AppState>,
    user: Result<AuthUser, AuthError>,
    RawQuery(query): RawQuery,
) -> Response {
    let mut response = match user {
        Err(e) => e.into_response(),
        Ok(user) => match serve(&state, &user, query.as_deref().unwrap_or("")).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        },
    };
    // Per-user data behind URLs that do not name the user: never cacheable (a shared or browser cache would hand
    // one account's rows to another).
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn serve(state: &AppState, user: &AuthUser, query: &str) -> Result<Response, ApiError> {
    let req = parse_request(query)?;
    if let Some(refusal) = state.hub.standby_refusal() {
        return Ok(refusal);
    }
    let def = state.shapes.definition(state, user.user_id, &req).await?;
    let key = state.shapes.key(&state.pool).await?;
    let owner = user.user_id;
    // Every request holds one of its user's places: a snapshot until answered, a live long-poll while held, SSE until
    // its stream ends, and a body of changes until the socket has taken it (catch-ups were not counted, and one
    // user's unread catch-ups held gigabytes).
    let place = state
        .shape_requests_per_user
        .try_acquire(owner)
        .ok_or_else(|| too_many_of_user(state))?;
    let offset = match req.offset {
        OffsetParam::Initial => return snapshot_response(state, owner, &def, &key).await,
        OffsetParam::Malformed => return Ok(refetch(state, owner, &def, &key, "invalid_offset")),
        OffsetParam::At(lsn) => lsn,
    };
    let handle = req.handle.as_deref().unwrap_or("");
    let Ok(generation) = key.verify(handle, owner, &def.hash) else {
        // Another user's, another definition's, forged, or from another key.
        return Ok(refetch(state, owner, &def, &key, "unknown_handle"));
    };
    let from = Offset {
        generation,
        lsn: offset,
    };
    // Right after a restart the stream may not have started, or not reached an offset the previous process
    // issued: wait (bounded) rather than refuse a servable offset.
    state.hub.ready_for(from, RESUME_WAIT).await;
    if req.live && state.hub.stats_connections() >= state.limits.max_connections {
        return Err(too_many());
    }
    let mut feed = match Feed::open(state, owner, &def, from, req.live) {
        Ok(feed) => feed,
        Err(reason) => return Ok(refetch(state, owner, &def, &key, reason)),
    };
    if req.sse {
        feed._place = Some(place);
        return Ok(sse_response(state, handle, from, feed));
    }
    let cursor = req.live.then(|| state.shapes.next_cursor());
    if feed.has_changes() || !req.live {
        let offset = feed.offset();
        let up_to_date = feed.cut.is_none();
        return Ok(ok_response(
            &def,
            handle,
            (offset, up_to_date),
            req.live,
            cursor,
            body_holding(feed.finish_body(offset), place),
        ));
    }
    let outcome = feed.hold(state, state.shapes.config.live_hold).await;
    Ok(match outcome {
        Held::Answer(offset) => ok_response(
            &def,
            handle,
            (offset, true),
            true,
            cursor,
            body_holding(feed.finish_body(offset), place),
        ),
        Held::Refetch(reason) => refetch(state, owner, &def, &key, reason),
    })
}

/// 429: one user's requests that wait or stream are at `--max-shape-requests-per-user`. Retried by Electric's client
/// after `Retry-After`, with backoff.
fn too_many_of_user(state: &AppState) -> ApiError {
    crate::metrics::shape_request_refused();
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_requests",
        format!(
            "this user has {} shape requests waiting, streaming or being written, the most one user may hold (--max-shape-requests-per-user); retry after the Retry-After delay",
            state.shape_requests_per_user.limit()
        ),
    )
    .retry_after(1)
}

fn too_many() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        "the server is at its connection limit; retry later",
    )
}

/// A 409: the client drops its rows and starts over with the new handle.
fn refetch(
    state: &AppState,
    owner: Uuid,
    def: &ShapeDef,
    key: &HandleKey,
    reason: &'static str,
) -> Response {
    crate::metrics::must_refetch(reason);
    let handle = key.mint(state.hub.position().generation, owner, &def.hash);
    let mut response = (
        StatusCode::CONFLICT,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        must_refetch_body(reason),
    )
        .into_response();
    set(&mut response, "electric-handle", &handle);
    response
}

fn set(response: &mut Response, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(name), v);
    }
}

/// A response body that keeps the user's place until hyper asks for more after it: about when the socket has
/// taken the body, so one user's bodies waiting for readers count against `--max-shape-requests-per-user`.
fn body_holding(body: Vec<u8>, place: crate::live::admission::UserPermit) -> Body {
    Body::from_stream(futures::stream::unfold(
        (Some(Bytes::from(body)), place),
        |(chunk, place)| async move {
            let chunk = chunk?;
            Some((Ok::<_, std::io::Error>(chunk), (None, place)))
        },
    ))
}

/// `at`: the response's offset, and whether it is up to date there (it is not when a catch-up was cut at
/// [`RESPONSE_HISTORY_BYTES`]: the client asks again from that offset at once).
fn ok_response(
    def: &ShapeDef,
    handle: &str,
    at: (u64, bool),
    live: bool,
    cursor: Option<u64>,
    body: Body,
) -> Response {
    let mut response = (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    shape_headers(&mut response, def, handle, at, live, cursor);
    response
}

fn shape_headers(
    response: &mut Response,
    def: &ShapeDef,
    handle: &str,
    (offset, up_to_date): (u64, bool),
    live: bool,
    cursor: Option<u64>,
) {
    set(response, "electric-handle", handle);
    set(response, "electric-offset", &format_offset(offset));
    if up_to_date {
        set(response, "electric-up-to-date", "true");
    }
    if !live {
        set(response, "electric-schema", &def.schema);
    }
    if let Some(c) = cursor {
        set(response, "electric-cursor", &c.to_string());
    }
}

/// A subscription of one request after an offset: the history's share, then (when held) live transactions.
struct Feed {
    hub: Arc<Hub>,
    sub: Subscription,
    encoder: ShapeEncoder,
    /// Messages collected and not sent yet.
    messages: Vec<Vec<u8>>,
    /// The hub registration, queue and lag signal (only when the request may wait).
    live: Option<(super::hub::Registration, ConnQueue, Arc<LagSignal>)>,
    /// Counts the request as a live long-poll subscription while it may wait (metrics).
    _counted: Option<LongPollCount>,
    /// The user's place (`--max-shape-requests-per-user`), kept by an SSE stream for as long as it runs.
    _place: Option<crate::live::admission::UserPermit>,
    /// The history's transactions not rendered yet (after a cut).
    rest: std::collections::VecDeque<Arc<UserTxn>>,
    /// Where the history's share was cut at [`RESPONSE_HISTORY_BYTES`]: the end of the last transaction taken.
    cut: Option<u64>,
}

/// At most about this many bytes of changes from the history in one response: the history's share of a catch-up
/// (or of a live request that finds changes waiting) ends after the transaction that passes it, at that
/// transaction's end, without up-to-date, and the client asks again from there at once (Electric's client does so
/// for any response that is not up to date). The history holds up to 256 MiB of one user's transactions: rendered
/// whole into every request's body, 60 catch-ups that one client left unread held 3.1 GB of the server.
const RESPONSE_HISTORY_BYTES: usize = 4 << 20;

/// A live long-poll request, counted in the subscriptions gauge while it exists.
#[derive(Debug)]
struct LongPollCount;

impl LongPollCount {
    fn new() -> Self {
        crate::metrics::subscription_opened(crate::metrics::Transport::LongPoll);
        Self
    }
}

impl Drop for LongPollCount {
    fn drop(&mut self) {
        crate::metrics::subscription_closed(crate::metrics::Transport::LongPoll);
    }
}

/// How a hold ended.
enum Held {
    /// Answer 200 at this offset.
    Answer(u64),
    /// Answer 409 with this reason.
    Refetch(&'static str),
}

impl Feed {
    /// Registers (for a live request) before copying the history after `from`, so nothing published in between
    /// is missed; the watermark then drops what the copy already holds.
    fn open(
        state: &AppState,
        owner: Uuid,
        def: &ShapeDef,
        from: Offset,
        live: bool,
    ) -> Result<Self, &'static str> {
        let hub = state.hub.clone();
        let live = live.then(|| {
            let (registration, queue, _tx, lag) = hub.register_long_poll(owner);
            (registration, queue, lag)
        });
        let (txns, position) = hub
            .resume(owner, &def.table.name, from)
            .map_err(|CannotResume(reason)| reason)?;
        let mut sub =
            Subscription::pending(Arc::from(def.table.name.as_str()), def.filter.clone(), 0);
        sub.go_live_at(position);
        let mut feed = Self {
            hub,
            sub,
            encoder: def.encoder(),
            messages: Vec::new(),
            _counted: live.is_some().then(LongPollCount::new),
            live,
            _place: None,
            rest: txns.into(),
            cut: None,
        };
        feed.take_share();
        Ok(feed)
    }

    /// Renders the history's next share: its transactions until their changes pass [`RESPONSE_HISTORY_BYTES`];
    /// `cut` is then the end of the last one taken, if any remain.
    fn take_share(&mut self) {
        self.cut = None;
        let mut bytes = 0;
        while let Some(txn) = self.rest.pop_front() {
            let before = self.messages.len();
            self.add(&txn);
            bytes += self.messages[before..].iter().map(Vec::len).sum::<usize>();
            if bytes >= RESPONSE_HISTORY_BYTES && !self.rest.is_empty() {
                self.cut = Some(txn.end_lsn.0);
                return;
            }
        }
    }

    fn add(&mut self, txn: &UserTxn) {
        let messages = self.encoder.txn_messages(txn, &self.sub.filter);
        self.messages.extend(messages);
    }

    fn has_changes(&self) -> bool {
        !self.messages.is_empty()
    }

    /// Everything up to here has been looked at.
    fn offset(&self) -> u64 {
        self.cut
            .unwrap_or_else(|| self.sub.watermark().unwrap_or(0))
    }

    /// Offers queued transactions (without waiting); `Err` when a refetch of this shape is queued.
    fn drain(&mut self) -> Result<(), &'static str> {
        loop {
            let event = match self.live.as_mut() {
                Some((_, queue, _)) => queue.try_recv().ok(),
                None => None,
            };
            match event {
                None => return Ok(()),
                Some(event) => self.on_event(event)?,
            }
        }
    }

    fn on_event(&mut self, event: ConnEvent) -> Result<(), &'static str> {
        match event {
            ConnEvent::Txn(txn) => {
                if self.sub.offer(&txn) {
                    if txn.is_split() {
                        // A transaction too large to come whole is never in the history that a response's
                        // offset resumes from, and is too large for one response: the shape refetches (if the
                        // transaction touches it).
                        let touches = txn.changes.iter().any(|c| {
                            *c.table == *self.sub.table && c.for_filter(&self.sub.filter).is_some()
                        });
                        if touches {
                            return Err("transaction_too_large");
                        }
                        return Ok(());
                    }
                    self.add(&txn);
                }
                Ok(())
            }
            ConnEvent::Refetch(r) if self.sub.on_table(r.table.as_deref()) => Err(r.reason),
            ConnEvent::Refetch(_) | ConnEvent::Job(_) => Ok(()),
        }
    }

    /// After the last transaction offered, the position everything is covered up to: the hub's position read
    /// *before* draining the queue (publishing queues a transaction before it moves the position).
    fn settle(&mut self) -> Result<u64, &'static str> {
        let position = self.hub.position().lsn;
        self.drain()?;
        if self.lagged() {
            // A transaction of the user was lost to a full queue, and the position covers it: answer with what is
            // complete; the next request gets the rest from history.
            return Ok(self.offset());
        }
        Ok(position.max(self.offset()))
    }

    /// Whether the hub dropped a transaction for this feed (it queues nothing after that).
    fn lagged(&self) -> bool {
        self.live
            .as_ref()
            .is_some_and(|(_, _, lag)| lag.is_raised())
    }

    /// Waits up to `hold` for a change of the shape.
    async fn hold(&mut self, state: &AppState, hold: Duration) -> Held {
        let deadline = tokio::time::Instant::now() + hold;
        let mut shutdown = state.shutdown.clone();
        let hub = self.hub.clone();
        loop {
            let Some((_, queue, lag)) = self.live.as_mut() else {
                return Held::Answer(self.offset());
            };
            let lag = lag.clone();
            let event = tokio::select! {
                biased;
                () = crate::shutdown::until_true(&mut shutdown) => {
                    // The replicator acknowledges its final position: answer with it, so the client resumes
                    // exactly after the restart.
                    let _ = tokio::time::timeout(Duration::from_secs(5), hub.wait_closed()).await;
                    None
                }
                // Lost a transaction to a full queue: answer with what is complete; the rest comes from history.
                () = lag.wait() => return Held::Answer(self.offset()),
                () = tokio::time::sleep_until(deadline) => None,
                event = queue.recv() => match event {
                    Some(event) => Some(event),
                    None => return Held::Answer(self.offset()),
                },
            };
            let Some(event) = event else {
                return match self.settle() {
                    Ok(offset) => Held::Answer(offset),
                    Err(reason) => Held::Refetch(reason),
                };
            };
            if let Err(reason) = self.on_event(event) {
                return Held::Refetch(reason);
            }
            if self.has_changes() {
                // Whatever else is queued right now goes along.
                return match self.drain() {
                    Ok(()) => Held::Answer(self.offset()),
                    Err(reason) => Held::Refetch(reason),
                };
            }
        }
    }

    /// The JSON body: the messages collected so far, then up-to-date at `offset` (unless the history was cut).
    fn finish_body(&mut self, offset: u64) -> Vec<u8> {
        let mut body =
            Vec::with_capacity(self.messages.iter().map(|m| m.len() + 1).sum::<usize>() + 96);
        body.push(b'[');
        for m in self.messages.drain(..) {
            body.extend_from_slice(&m);
            body.push(b',');
        }
        if self.cut.is_none() {
            write_up_to_date(&mut body, offset);
        } else if body.len() > 1 {
            body.pop();
        }
        body.push(b']');
        body
    }

    /// The messages collected so far and up-to-date at `offset`, as server-sent events.
    fn finish_events(&mut self, offset: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for m in self.messages.drain(..) {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&m);
            out.extend_from_slice(b"\n\n");
        }
        out.extend_from_slice(b"data: ");
        write_up_to_date(&mut out, offset);
        out.extend_from_slice(b"\n\n");
        out
    }
}

/// Server-sent events: the history's changes, then live ones, each transaction followed by an up-to-date
/// carrying the offset it reaches (the client's offset moves only through those), for up to a minute.
fn sse_response(state: &AppState, handle: &str, from: Offset, feed: Feed) -> Response {
    // Two chunks ahead of the socket at most: a chunk is a transaction's events (a part of a large one: ~4 MiB), a
    // share of the history (~4 MiB), or what a keep-alive gathers from the queue (at most --queue-bytes).
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    let config = state.shapes.config;
    let shutdown = state.shutdown.clone();
    tokio::spawn(run_sse(feed, tx, config, shutdown, from.lsn));
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    }));
    let mut response = (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            // Proxies such as nginx must not buffer the stream.
            (
                HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        body,
    )
        .into_response();
    let cursor = state.shapes.next_cursor();
    set(&mut response, "electric-handle", handle);
    set(&mut response, "electric-offset", &format_offset(from.lsn));
    set(&mut response, "electric-cursor", &cursor.to_string());
    response
}

async fn run_sse(
    mut feed: Feed,
    tx: mpsc::Sender<Bytes>,
    config: ShapeConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    mut sent: u64,
) {
    enum Step {
        Shutdown,
        Lagged,
        End,
        Keepalive,
        Event(Option<ConnEvent>),
    }
    // The history first, in shares of RESPONSE_HISTORY_BYTES, each with an up-to-date at its end (the client's
    // offset moves only through those). One stream carries them all: ending it after a share would make Electric's
    // client count a short connection, and after three give up on SSE.
    if feed.has_changes() {
        loop {
            let offset = feed.offset();
            if send_events(&tx, &mut feed, offset).await.is_err() {
                return;
            }
            sent = offset;
            if feed.cut.is_none() {
                break;
            }
            feed.take_share();
        }
    }
    let hub = feed.hub.clone();
    let end = tokio::time::Instant::now() + config.sse_duration;
    let mut keepalive = tokio::time::interval_at(
        tokio::time::Instant::now() + config.sse_keepalive,
        config.sse_keepalive,
    );
    loop {
        let Some((_, queue, lag)) = feed.live.as_mut() else {
            return;
        };
        let lag = lag.clone();
        let step = tokio::select! {
            biased;
            () = crate::shutdown::until_true(&mut shutdown) => Step::Shutdown,
            // The client went away: give the hub registration back now.
            () = tx.closed() => return,
            () = lag.wait() => Step::Lagged,
            () = tokio::time::sleep_until(end) => Step::End,
            _ = keepalive.tick() => Step::Keepalive,
            event = queue.recv() => Step::Event(event),
        };
        match step {
            Step::Shutdown => {
                // The replicator acknowledges its final position; the client resumes from it after the restart.
                let _ = tokio::time::timeout(Duration::from_secs(5), hub.wait_closed()).await;
                let _ = settle_and_send(&tx, &mut feed, sent).await;
                return;
            }
            // Lost a transaction to a full queue: end here; the client reconnects from its offset.
            Step::Lagged => return,
            Step::End => {
                let _ = settle_and_send(&tx, &mut feed, sent).await;
                return;
            }
            Step::Keepalive => match settle_and_send(&tx, &mut feed, sent).await {
                Ok(Some(offset)) => sent = offset,
                Ok(None) => {
                    if send_bounded(&tx, Bytes::from_static(b": keep-alive\n\n"))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(()) => return,
            },
            // A refetch (or the queue closing) ends the stream: the client reconnects from its offset and gets
            // the 409 then.
            Step::Event(None) => return,
            Step::Event(Some(event)) => {
                if feed.on_event(event).is_err() {
                    return;
                }
                if feed.has_changes() {
                    let offset = feed.offset();
                    if send_events(&tx, &mut feed, offset).await.is_err() {
                        return;
                    }
                    sent = offset;
                }
            }
        }
    }
}

/// Sends the collected changes as events, then up-to-date at `offset`.
async fn send_events(tx: &mpsc::Sender<Bytes>, feed: &mut Feed, offset: u64) -> Result<(), ()> {
    send_bounded(tx, Bytes::from(feed.finish_events(offset))).await
}

/// Longest an SSE stream waits for its client to take a chunk: a client that reads nothing for this long is gone
/// or too slow, and its stream ends (it reconnects from its offset). Without it, a stream whose client stopped
/// reading waited for room for ever, past its one-minute end and the shutdown, holding its chunks: 10 such streams
/// of one user held 520 MB. The same bound as a WebSocket write's.
const SSE_SEND_TIMEOUT: Duration = Duration::from_secs(30);

async fn send_bounded(tx: &mpsc::Sender<Bytes>, chunk: Bytes) -> Result<(), ()> {
    match tokio::time::timeout(SSE_SEND_TIMEOUT, tx.send(chunk)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(()),
    }
}

/// Settles the position and, if it moved past `sent` (or there are changes), sends them and an up-to-date;
/// returns the new offset.
async fn settle_and_send(
    tx: &mpsc::Sender<Bytes>,
    feed: &mut Feed,
    sent: u64,
) -> Result<Option<u64>, ()> {
    let offset = feed.settle().map_err(|_| ())?;
    if offset <= sent && !feed.has_changes() {
        return Ok(None);
    }
    send_events(tx, feed, offset).await?;
    Ok(Some(offset))
}

/// A snapshot: rows streamed as the job reads them, then the handoff and up-to-date.
async fn snapshot_response(
    state: &AppState,
    owner: Uuid,
    def: &ShapeDef,
    key: &HandleKey,
) -> Result<Response, ApiError> {
    if state.hub.stats_connections() >= state.limits.max_connections {
        return Err(too_many());
    }
    let (registration, mut queue, queue_tx, lag) = state.hub.register_long_poll(owner);
    let (body_tx, body_rx) = mpsc::channel::<BodyPart>(4);
    let sub_id: Arc<str> = Arc::from("shape");
    let sink = ShapeSink {
        sub_id: sub_id.clone(),
        encoder: def.encoder(),
        queue: queue_tx,
        body: body_tx,
        buf: Vec::new(),
        rows: 0,
        prepared_sent: false,
    };
    let spec = JobSpec {
        owner,
        sub_id,
        epoch: 1,
        table: def.table.clone(),
        filter: def.filter.clone(),
        purpose: Purpose::Snapshot,
        columns: Some(def.snapshot_columns.clone()),
    };
    tokio::spawn(snapshot::run(
        state.snapshots.clone(),
        state.hub.clone(),
        state.barriers.clone(),
        spec,
        sink,
    ));
    // Every transaction of the user is buffered until the job reports S, L and B (through the same queue, so
    // the buffer then holds every transaction up to B).
    let mut sub = Subscription::pending(Arc::from(def.table.name.as_str()), def.filter.clone(), 1);
    let mut shutdown = state.shutdown.clone();
    let mut prepared: Prepared = loop {
        let event = tokio::select! {
            biased;
            () = crate::shutdown::until_true(&mut shutdown) => return Err(shutting_down()),
            event = queue.recv() => event,
        };
        match event {
            Some(ConnEvent::Txn(txn)) => {
                sub.offer(&txn);
            }
            Some(ConnEvent::Refetch(r)) if sub.on_table(r.table.as_deref()) => {
                return Ok(refetch(state, owner, def, key, r.reason));
            }
            Some(ConnEvent::Refetch(_)) => {}
            Some(ConnEvent::Job(report)) => match report.result {
                Ok(p) => break p,
                Err(e) => return job_error(state, owner, def, key, e).await,
            },
            None => return Err(shutting_down()),
        }
    };
    let Some(handoff) = prepared.handoff.clone() else {
        return Err(ApiError::internal_fault(
            "a shape snapshot ended without its handoff",
        ));
    };
    if lag.is_raised() {
        // A transaction of the handoff was lost to a full queue.
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "too many writes while the snapshot was taken; retry",
        ));
    }
    // `earlier`: streamed before this request registered, yet not seen by the snapshot (not buffered either).
    let earlier = std::mem::replace(&mut prepared.earlier, Ok(Vec::new()));
    let (missed, watermark) = match sub.go_live_after_snapshot(&handoff, true, earlier) {
        Ok(handed_over) => handed_over,
        // The snapshot lacks a transaction too large to have been buffered, or the look-back could not tell: a
        // newer snapshot will have it.
        Err(MustRefetch(reason)) => return Ok(refetch(state, owner, def, key, reason)),
    };
    drop(registration);
    drop(queue);
    let mut encoder = def.encoder();
    let mut tail = Vec::new();
    let mut first = true;
    for txn in &missed {
        encoder.write_txn(&mut tail, txn, &prepared.filter, &mut first);
    }
    if !first {
        tail.push(b',');
    }
    write_up_to_date(&mut tail, watermark);
    tail.push(b']');
    let handle = key.mint(prepared.generation, owner, &def.hash);
    let body = Body::from_stream(futures::stream::unfold(
        (body_rx, Some(tail)),
        |(mut rx, tail)| async move {
            let tail = tail?;
            match rx.recv().await {
                Some(BodyPart::Bytes(b)) => Some((Ok(b), (rx, Some(tail)))),
                Some(BodyPart::Done { ok: true, any_rows }) => {
                    let mut last = Vec::with_capacity(tail.len() + 1);
                    last.push(if any_rows { b',' } else { b'[' });
                    last.extend_from_slice(&tail);
                    Some((Ok(Bytes::from(last)), (rx, None)))
                }
                // The job failed half-way: break the response off, so the client retries instead of taking a
                // partial snapshot for a whole one.
                Some(BodyPart::Done { ok: false, .. }) | None => Some((
                    Err(std::io::Error::other("the snapshot failed")),
                    (rx, None),
                )),
            }
        },
    ));
    let mut response = (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    shape_headers(&mut response, def, &handle, (watermark, true), false, None);
    Ok(response)
}

fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "the server is shutting down; retry",
    )
}

async fn job_error(
    state: &AppState,
    owner: Uuid,
    def: &ShapeDef,
    key: &HandleKey,
    e: JobError,
) -> Result<Response, ApiError> {
    match e {
        JobError::BadFilter(m) => Err(bad_request(
            "invalid_where",
            format!("invalid `where` value: {m}"),
        )),
        JobError::SchemaChanged => {
            // The columns changed by plain DDL, which the catalog (and the definition compiled from it) learns only
            // at the table's next streamed change: reload it before answering, or the client's new request would
            // reuse the stale definition and get this 409 again, and again. A reload gives every table new entries,
            // so every cached definition is compiled afresh.
            state.catalog.refresh_on_miss(&state.pool).await?;
            Ok(refetch(state, owner, def, key, "schema_changed"))
        }
        JobError::StreamUnavailable => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stream_unavailable",
            "the live stream is not available; retry",
        )),
        JobError::Busy => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_snapshots",
            "too many snapshots are running for this user or server; retry after the Retry-After delay",
        )
        .retry_after(5)),
        JobError::Database(m) => {
            tracing::warn!(error = %m, "shape snapshot failed");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the snapshot failed; retry later",
            ))
        }
    }
}

/// What the snapshot job hands the response body.
enum BodyPart {
    Bytes(Bytes),
    Done { ok: bool, any_rows: bool },
}

/// Renders a job's rows as Electric insert messages into the response body; its report goes through the hub
/// queue before the first row (the handler needs the offset for the headers).
struct ShapeSink {
    sub_id: Arc<str>,
    encoder: ShapeEncoder,
    queue: mpsc::Sender<ConnEvent>,
    body: mpsc::Sender<BodyPart>,
    buf: Vec<u8>,
    rows: usize,
    prepared_sent: bool,
}

impl ShapeSink {
    async fn flush(&mut self) -> Result<(), SinkGone> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.body
            .send(BodyPart::Bytes(chunk))
            .await
            .map_err(|_| SinkGone)
    }
}

impl SnapshotSink for ShapeSink {
    async fn prepared(&mut self, prepared: &Prepared) -> Result<(), SinkGone> {
        self.prepared_sent = true;
        let report = JobReport {
            sub_id: self.sub_id.clone(),
            epoch: 1,
            result: Ok(prepared.clone()),
        };
        self.queue
            .send(ConnEvent::Job(Box::new(report)))
            .await
            .map_err(|_| SinkGone)
    }

    async fn row(
        &mut self,
        _columns: &[SnapshotColumn],
        row: &[Option<&str>],
    ) -> Result<(), SinkGone> {
        self.buf.push(if self.rows == 0 { b'[' } else { b',' });
        self.rows += 1;
        self.encoder
            .write_snapshot_row(&mut self.buf, |i| row.get(i).copied().flatten());
        if self.buf.len() >= BODY_CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    async fn closed(&self) {
        // The handler (waiting for the report) and then the response body hold the receiver: either ends when
        // the client disconnects.
        self.body.closed().await;
    }

    async fn finish(mut self, report: JobReport) {
        if !self.prepared_sent {
            let _ = self.queue.send(ConnEvent::Job(Box::new(report))).await;
            return;
        }
        let ok = report.result.is_ok();
        if ok && self.flush().await.is_err() {
            return;
        }
        let _ = self
            .body
            .send(BodyPart::Done {
                ok,
                any_rows: self.rows > 0,
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_parameters() {
        let r = parse_request(
            "table=works&offset=-1&where=year%20%3E%20%241&params%5B1%5D=2000&columns=%22id%22%2C%22owner_id%22&replica=full&log=full&cache-buster=x&expired_handle=y&whatever=1",
        )
        .unwrap();
        assert_eq!(r.table, "works");
        assert_eq!(r.offset, OffsetParam::Initial);
        assert_eq!(r.where_, "year > $1");
        assert_eq!(r.params.get(&1).map(String::as_str), Some("2000"));
        assert_eq!(r.columns.as_deref(), Some("\"id\",\"owner_id\""));
        assert!(r.replica_full && !r.live && !r.sse);
        let r = parse_request("table=works&offset=12_0&handle=h&live=true&cursor=&live_sse=true")
            .unwrap();
        assert_eq!(r.offset, OffsetParam::At(12));
        assert!(r.live && r.sse);
        // The same value twice, an ignored parameter twice, and a param `where` does not use are accepted.
        let r = parse_request(
            "table=works&table=works&offset=-1&cursor=1&cursor=2&params%5B1%5D=a&params%5B1%5D=a&params%5B2%5D=b",
        )
        .unwrap();
        assert_eq!(r.table, "works");
        assert_eq!(r.params.len(), 2);
        assert_eq!(
            parse_request("table=works&offset=0/1A&handle=h")
                .unwrap()
                .offset,
            OffsetParam::Malformed
        );
        for bad in [
            "offset=-1",
            "table=works",
            "table=works&offset=12_0",
            "table=works&offset=-1&live=true",
            "table=works&offset=-1&live=yes",
            "table=works&offset=-1&replica=half",
            "table=works&offset=-1&log=changes_only",
            "table=works&offset=-1&params%5B0%5D=x",
            "table=works&offset=-1&params=x",
            "table=works&offset=now",
            // Twice with different values (the same value twice is fine, below).
            "table=works&table=books&offset=-1",
            "table=works&offset=-1&where=year%3E%241&where=true",
            "table=works&offset=-1&params%5B1%5D=a&params%5B1%5D=b",
            // Numbered with a gap.
            "table=works&offset=-1&params%5B2%5D=x",
            "table=works&offset=-1&params%5B1%5D=x&params%5B3%5D=y",
        ] {
            let e = parse_request(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn identifier_lists() {
        assert_eq!(
            identifiers(r#""id","owner_id", Title ,"a""b""#, ','),
            Some(vec![
                "id".into(),
                "owner_id".into(),
                "title".into(),
                "a\"b".into()
            ])
        );
        assert_eq!(
            identifiers(r#""public"."works""#, '.'),
            Some(vec!["public".into(), "works".into()])
        );
        assert_eq!(identifiers("public.works", '.').map(|v| v.len()), Some(2));
        for bad in ["", "a,,b", "\"open", "a b"] {
            assert_eq!(identifiers(bad, ','), None, "{bad}");
        }
    }

    #[test]
    fn cursors_only_increase() {
        let s = Shapes::new(ShapeConfig::default());
        let a = s.next_cursor();
        let b = s.next_cursor();
        assert!(b > a);
    }

    #[test]
    fn definitions_are_bounded_in_bytes_and_count_and_the_least_recently_used_go() {
        let mut defs: Definitions<u32> = Definitions::new(100, 10_000);
        // 1000-byte entries (key "kNNN" of 4 bytes + 996) against a 10,000-byte budget.
        let key = |i: u32| format!("k{i:03}");
        for i in 0..9 {
            defs.insert(key(i), i, 996);
        }
        assert_eq!((defs.entries.len(), defs.bytes), (9, 9000));
        // Entry 0 is used: it is the most recent now, entry 1 the oldest.
        assert_eq!(defs.get(&key(0)), Some(0));
        defs.insert(key(9), 9, 996); // exactly full: nothing goes
        assert_eq!(defs.entries.len(), 10);
        defs.insert(key(10), 10, 996);
        // Down to three quarters (7,500) with the new entry: 1, 2, 3, 4 went, 0 stayed.
        let mut kept: Vec<u32> = defs.entries.values().map(|c| c.def).collect();
        kept.sort_unstable();
        assert_eq!(kept, [0, 5, 6, 7, 8, 9, 10]);
        assert_eq!(defs.bytes, 7000);
        // Replacing an entry does not count it twice.
        defs.insert(key(10), 11, 996);
        assert_eq!((defs.entries.len(), defs.bytes), (7, 7000));
        // The count bound: 4 entries at most; a full cache keeps fewer than 3 (three quarters), then the new one.
        let mut few: Definitions<u32> = Definitions::new(4, 10_000);
        for i in 0..5 {
            few.insert(key(i), i, 0);
        }
        let mut kept: Vec<u32> = few.entries.values().map(|c| c.def).collect();
        kept.sort_unstable();
        assert_eq!(kept, [2, 3, 4]);
        assert_eq!(few.bytes, 12);
        assert_eq!(few.get(&key(0)), None);
    }

    #[test]
    fn a_feed_that_lost_a_transaction_never_answers_past_it() {
        use crate::live::hub::{Hub, HubConfig};
        use crate::live::routing::{Routed, UserTxn};
        use deeprecall_replication::Lsn;

        let owner = Uuid::from_u128(9);
        // Per connection 100 bytes; every transaction is 60.
        let hub = Arc::new(Hub::new(HubConfig {
            queue_bytes: 100,
            ..HubConfig::default()
        }));
        hub.stream_started(1, 100);
        let publish = |commit: u64| {
            let txn = UserTxn {
                owner,
                xid: commit,
                generation: 1,
                commit_lsn: Lsn(commit),
                end_lsn: Lsn(commit + 8),
                changes: vec![],
                bytes: 60,
                part: 0,
                last: true,
            };
            let routed = Routed {
                per_owner: vec![txn],
                xid: commit,
                commit_lsn: commit,
                end_lsn: commit + 8,
                ..Routed::default()
            };
            hub.publish(routed, commit + 8);
        };
        let (registration, queue, _tx, lag) = hub.register(owner);
        let mut sub = Subscription::pending(Arc::from("works"), Filter::default(), 0);
        sub.go_live_at(100);
        let mut feed = Feed {
            hub: hub.clone(),
            sub,
            encoder: ShapeEncoder::new("public", "works", vec![], false),
            messages: Vec::new(),
            live: Some((registration, queue, lag.clone())),
            _counted: None,
            _place: None,
            rest: Default::default(),
            cut: None,
        };
        publish(200);
        publish(300); // lost: the connection's queue holds the first
        assert!(lag.is_raised());
        publish(400);
        // The hub's position is past all three; the answer stops where the feed is complete, after the first.
        assert_eq!(hub.position().lsn, 408);
        assert_eq!(feed.settle(), Ok(208));
    }
}
