//! Admin surface: the blob inventory with filters, sorting and aggregates (`GET /v1/admin/blobs`), live server
//! figures (`GET /v1/admin/stats`) and the admin page (`GET /admin`), which uses both with an admin token that the
//! operator types into the page.
//!
//! Every query runs as the read-only role `deeprecall_admin` through `v_blob_inventory` (security_invoker), so the
//! policies, not this code, decide what an admin reads. The page is plain HTML + one JavaScript module embedded in
//! the binary: nothing is built or fetched at run time.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_postgres::types::{Json as PgJson, ToSql};
use uuid::Uuid;

use crate::auth::{AuthError, AuthUser};
use crate::db::{Scope, begin_scoped};
use crate::error::{ApiError, from_db};
use crate::http::blobs::{
    INVENTORY_PAGE_BYTES, InventoryPage, JsonRows, capped_rows, inventory_row_json, is_sha256,
};
use crate::state::AppState;

/// Longest search string accepted.
const MAX_SEARCH_CHARS: usize = 200;

/// An admin query may read every owner's blobs; it must not hold a connection for minutes.
const STATEMENT_TIMEOUT: &str = "30s";

/// Query parameters of `GET /v1/admin/blobs` (docs/api.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminBlobsQuery {
    /// Page size (or number of groups), 1..=1000, default 100.
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only this owner's blobs.
    pub owner_id: Option<Uuid>,
    /// Only blobs present on this device.
    pub device_id: Option<Uuid>,
    /// Exact MIME type, `type/*` for a prefix, or empty for blobs without one.
    pub mime: Option<String>,
    /// Case-insensitive substring of filename or MIME type, or prefix of sha256 or owner_id.
    pub q: Option<String>,
    /// `true`: only blobs present on no device; `false`: only blobs present on at least one.
    pub missing: Option<bool>,
    /// Sort column (default `owner_id`).
    pub sort: Option<String>,
    /// `asc` (default) or `desc`.
    pub order: Option<String>,
    /// Also answer `total`, the number of rows matching the filters.
    pub count: Option<bool>,
    /// `owner_id`, `device_id` or `mime`: answer aggregates instead of rows.
    pub group_by: Option<String>,
}

/// Columns the inventory can be sorted by, with a non-null sort expression and its SQL type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sort {
    OwnerId,
    Sha256,
    Size,
    StoredBytes,
    DeviceCount,
    AssetCount,
    Filename,
    Mime,
    LastSeenAt,
    CreatedAt,
    UpdatedAt,
}

impl Sort {
    const ALL: [Sort; 11] = [
        Sort::OwnerId,
        Sort::Sha256,
        Sort::Size,
        Sort::StoredBytes,
        Sort::DeviceCount,
        Sort::AssetCount,
        Sort::Filename,
        Sort::Mime,
        Sort::LastSeenAt,
        Sort::CreatedAt,
        Sort::UpdatedAt,
    ];

    fn name(self) -> &'static str {
        match self {
            Sort::OwnerId => "owner_id",
            Sort::Sha256 => "sha256",
            Sort::Size => "size",
            Sort::StoredBytes => "stored_bytes",
            Sort::DeviceCount => "device_count",
            Sort::AssetCount => "asset_count",
            Sort::Filename => "filename",
            Sort::Mime => "mime",
            Sort::LastSeenAt => "last_seen_at",
            Sort::CreatedAt => "created_at",
            Sort::UpdatedAt => "updated_at",
        }
    }

    fn parse(s: &str) -> Option<Sort> {
        Self::ALL.into_iter().find(|c| c.name() == s)
    }

    /// The sort expression (never NULL, so keyset comparisons work: missing names sort first, missing
    /// last_seen_at oldest) and the type its text form is cast back to in a cursor comparison.
    fn expr(self) -> (&'static str, &'static str) {
        match self {
            Sort::OwnerId => ("v.owner_id", "uuid"),
            Sort::Sha256 => ("v.sha256", "text"),
            Sort::Size => ("v.size", "bigint"),
            Sort::StoredBytes => ("v.stored_bytes", "numeric"),
            Sort::DeviceCount => ("v.device_count", "bigint"),
            Sort::AssetCount => ("v.asset_count", "bigint"),
            Sort::Filename => ("coalesce(v.filename, '')", "text"),
            Sort::Mime => ("coalesce(v.mime, '')", "text"),
            Sort::LastSeenAt => (
                "coalesce(v.last_seen_at, '-infinity'::timestamptz)",
                "timestamptz",
            ),
            Sort::CreatedAt => ("v.created_at", "timestamptz"),
            Sort::UpdatedAt => ("v.updated_at", "timestamptz"),
        }
    }
}

/// Aggregations of `group_by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Owner,
    Device,
    Mime,
}

/// Where a page starts: after this row in this order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
struct Cursor {
    #[serde(rename = "s")]
    sort: String,
    #[serde(rename = "d")]
    desc: bool,
    #[serde(rename = "k")]
    key: String,
    #[serde(rename = "o")]
    owner: Uuid,
    #[serde(rename = "h")]
    sha256: String,
    /// `key` is the first [`CURSOR_KEY_MAX`] bytes of the sort key, which the next page looks up by the row instead.
    #[serde(rename = "t", default, skip_serializing_if = "std::ops::Not::not")]
    cut: bool,
}

/// Most bytes of a sort key a cursor carries. A `filename` or `mime` is as long as its owner made it: carried whole,
/// a key of about 96 KB made a cursor longer than a request header may be, and the next page could not be asked for.
const CURSOR_KEY_MAX: usize = 1024;

impl Cursor {
    /// A cursor after the row `(key, owner, sha256)`, its key cut at [`CURSOR_KEY_MAX`] bytes if longer.
    fn after(sort: Sort, desc: bool, mut key: String, owner: Uuid, sha256: String) -> Self {
        let cut = key.len() > CURSOR_KEY_MAX;
        if cut {
            let mut end = CURSOR_KEY_MAX;
            while !key.is_char_boundary(end) {
                end -= 1;
            }
            key.truncate(end);
        }
        Self {
            sort: sort.name().into(),
            desc,
            key,
            owner,
            sha256,
            cut,
        }
    }

    /// The default order (owner_id, sha256 ascending) keeps the format `GET /v1/blobs` uses, so cursors issued
    /// before sorting existed stay valid; other orders carry their sort key.
    fn encode(&self) -> String {
        let text = if self.sort == Sort::OwnerId.name() && !self.desc {
            format!("{}/{}", self.owner, self.sha256)
        } else {
            serde_json::to_string(self).unwrap_or_default()
        };
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    }

    fn decode(cursor: &str) -> Option<Cursor> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(cursor)
            .ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let c = if text.starts_with('{') {
            serde_json::from_str::<Cursor>(&text).ok()?
        } else {
            let (owner, sha) = text.split_once('/')?;
            let owner = Uuid::parse_str(owner).ok()?;
            Cursor {
                sort: Sort::OwnerId.name().into(),
                desc: false,
                key: owner.to_string(),
                owner,
                sha256: sha.to_owned(),
                cut: false,
            }
        };
        (is_sha256(&c.sha256) && Sort::parse(&c.sort).is_some()).then_some(c)
    }
}

/// A validated request.
#[derive(Debug)]
struct Request {
    limit: i64,
    filters: Filters,
    sort: Sort,
    desc: bool,
    after: Option<Cursor>,
    count: bool,
    group: Option<Group>,
}

#[derive(Debug, Default)]
struct Filters {
    owner_id: Option<Uuid>,
    device_id: Option<Uuid>,
    mime: Option<String>,
    q: Option<String>,
    missing: Option<bool>,
}

fn invalid(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::unprocessable(code, message)
}

impl Request {
    fn parse(q: AdminBlobsQuery) -> Result<Self, ApiError> {
        let limit = q.limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(invalid("invalid_limit", "limit must be between 1 and 1000"));
        }
        let sort = match q.sort.as_deref() {
            None => Sort::OwnerId,
            Some(s) => Sort::parse(s).ok_or_else(|| {
                let names: Vec<&str> = Sort::ALL.iter().map(|c| c.name()).collect();
                invalid(
                    "invalid_sort",
                    format!("sort must be one of {}", names.join(", ")),
                )
            })?,
        };
        let desc = match q.order.as_deref() {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(_) => return Err(invalid("invalid_order", "order must be asc or desc")),
        };
        let group = match q.group_by.as_deref() {
            None => None,
            Some("owner_id") => Some(Group::Owner),
            Some("device_id") => Some(Group::Device),
            Some("mime") => Some(Group::Mime),
            Some(_) => {
                return Err(invalid(
                    "invalid_group_by",
                    "group_by must be owner_id, device_id or mime",
                ));
            }
        };
        if group.is_some()
            && (q.cursor.is_some() || q.sort.is_some() || q.order.is_some() || q.count.is_some())
        {
            return Err(invalid(
                "invalid_query",
                "group_by answers aggregates ordered by size; cursor, sort, order and count apply to rows only",
            ));
        }
        if let Some(s) = &q.q
            && s.chars().count() > MAX_SEARCH_CHARS
        {
            return Err(invalid(
                "invalid_query",
                format!("q is limited to {MAX_SEARCH_CHARS} characters"),
            ));
        }
        // Postgres's text cannot hold U+0000; refused here with the parameter's name instead of Postgres's
        // "invalid byte sequence".
        for (name, value) in [("q", &q.q), ("mime", &q.mime)] {
            if value.as_deref().is_some_and(|v| v.contains('\0')) {
                return Err(invalid(
                    "invalid_query",
                    format!("{name} must not contain U+0000"),
                ));
            }
        }
        let after = match &q.cursor {
            None => None,
            Some(c) => {
                let c = Cursor::decode(c).ok_or_else(|| {
                    invalid("invalid_cursor", "cursor is not one this server issued")
                })?;
                if c.sort != sort.name() || c.desc != desc {
                    return Err(invalid(
                        "invalid_cursor",
                        "cursor belongs to another sort order; start again without a cursor",
                    ));
                }
                Some(c)
            }
        };
        Ok(Self {
            limit,
            filters: Filters {
                owner_id: q.owner_id,
                device_id: q.device_id,
                mime: q.mime,
                q: q.q.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()),
                missing: q.missing,
            },
            sort,
            desc,
            after,
            count: q.count.unwrap_or(false),
            group,
        })
    }
}

/// A statement under construction: SQL text with numbered parameters.
#[derive(Default)]
struct Statement {
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Statement {
    /// Adds a parameter; returns its placeholder (`$n`).
    fn param(&mut self, value: impl ToSql + Sync + Send + 'static) -> String {
        self.params.push(Box::new(value));
        format!("${}", self.params.len())
    }

    fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

/// Escapes `%`, `_` and `\` for a LIKE pattern (backslash is LIKE's default escape character).
fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Filters {
    /// The `where` conditions over `v_blob_inventory v` (`true` when none).
    fn sql(&self, st: &mut Statement) -> String {
        let mut conds = Vec::new();
        if let Some(owner) = self.owner_id {
            conds.push(format!("v.owner_id = {}", st.param(owner)));
        }
        if let Some(device) = self.device_id {
            conds.push(format!("{} = any(v.devices)", st.param(device)));
        }
        match self.mime.as_deref() {
            None => {}
            Some("") => conds.push("v.mime is null".into()),
            Some(m) => match m.strip_suffix("/*") {
                Some(prefix) => conds.push(format!(
                    "v.mime like {}",
                    st.param(format!("{}/%", like_escape(prefix)))
                )),
                None => conds.push(format!("v.mime = {}", st.param(m.to_owned()))),
            },
        }
        if let Some(q) = &self.q {
            let within = st.param(format!("%{}%", like_escape(q)));
            let prefix = st.param(format!("{}%", like_escape(&q.to_lowercase())));
            conds.push(format!(
                "(v.filename ilike {within} or v.mime ilike {within} or v.sha256 like {prefix} \
                 or v.owner_id::text like {prefix})"
            ));
        }
        match self.missing {
            None => {}
            Some(true) => conds.push("v.device_count = 0".into()),
            Some(false) => conds.push("v.device_count > 0".into()),
        }
        if conds.is_empty() {
            "true".into()
        } else {
            conds.join(" and ")
        }
    }
}

/// Opens a read-only transaction as the admin role with a statement timeout.
async fn admin_tx<'a>(
    client: &'a mut deadpool_postgres::Object,
    user: &AuthUser,
) -> Result<deadpool_postgres::Transaction<'a>, ApiError> {
    let tx = begin_scoped(client, &Scope::admin(user.user_id).read_only(), &[])
        .await
        .map_err(|e| from_db(&e))?
        .tx;
    tx.execute(
        "select set_config('statement_timeout', $1, true)",
        &[&STATEMENT_TIMEOUT],
    )
    .await
    .map_err(|e| from_db(&e))?;
    Ok(tx)
}

/// An admin endpoint's error: the token is not an admin's (403), or the request is wrong or failed.
#[derive(Debug)]
pub enum AdminError {
    /// Authenticated, but without the admin claim.
    Auth(AuthError),
    /// Anything else.
    Api(ApiError),
}

impl From<ApiError> for AdminError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

impl From<deadpool_postgres::PoolError> for AdminError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Api(e.into())
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        match self {
            Self::Auth(e) => e.into_response(),
            Self::Api(e) => e.into_response(),
        }
    }
}

fn require_admin(user: &AuthUser) -> Result<(), AdminError> {
    if user.admin {
        Ok(())
    } else {
        Err(AdminError::Auth(AuthError::Forbidden))
    }
}

/// Handler for `GET /v1/admin/blobs` (admin token): inventory rows, or aggregates with `group_by`.
pub async fn blobs(
    State(state): State<AppState>,
    user: AuthUser,
    q: Result<Query<AdminBlobsQuery>, QueryRejection>,
) -> Result<Response, AdminError> {
    // The admin check comes first: a user token is refused whatever its query says.
    require_admin(&user)?;
    let Query(q) = q.map_err(|e| invalid("invalid_query", e.body_text()))?;
    let req = Request::parse(q)?;
    let mut client = state.pool.get().await?;
    let tx = admin_tx(&mut client, &user).await?;
    Ok(match req.group {
        None => Json(rows(&tx, &req).await?).into_response(),
        Some(group) => Json(groups(&tx, &req, group).await?).into_response(),
    })
}

async fn rows(
    tx: &deadpool_postgres::Transaction<'_>,
    req: &Request,
) -> Result<InventoryPage, ApiError> {
    let mut st = Statement::default();
    let filter = req.filters.sql(&mut st);
    let (expr, ty) = req.sort.expr();
    let (cmp, dir) = if req.desc {
        ("<", "desc")
    } else {
        (">", "asc")
    };
    if let Some(c) = &req.after {
        // A cursor's key is text cast back to the sort's type in the query. One that does not cast was not issued
        // here (base64 is not a signature): the documented `invalid_cursor`, not Postgres's words about a type.
        tx.query_one(&format!("select $1::text::{ty}"), &[&c.key])
            .await
            .map_err(|e| match e.code().map(|c| c.code()) {
                // Class 22, data exception: the key is no value of the type.
                Some(code) if code.starts_with("22") => {
                    invalid("invalid_cursor", "cursor is not one this server issued")
                }
                _ => from_db(&e),
            })?;
    }
    let after = match &req.after {
        None => "true".to_owned(),
        Some(c) => {
            let (key, owner, sha256) = (
                format!("{}::text::{ty}", st.param(c.key.clone())),
                st.param(c.owner),
                st.param(c.sha256.clone()),
            );
            // A cut key: the row's own key, looked up; its prefix only if the row is gone (then rows that share
            // the prefix may come again, as for any sort key that changed between pages).
            let key = if c.cut {
                let row_expr = expr.replace("v.", "w.");
                format!(
                    "coalesce((select {row_expr} from v_blob_inventory w
                                where w.owner_id = {owner} and w.sha256 = {sha256}), {key})"
                )
            } else {
                key
            };
            format!("({expr}, v.owner_id, v.sha256) {cmp} ({key}, {owner}, {sha256})")
        }
    };
    let limit = st.param(req.limit + 1);
    // Keyset paging on (sort key, owner_id, sha256): the last two are the unique key of blobs_meta, so the order
    // is total and stable while rows are inserted between pages.
    let sql = format!(
        "select {}, ({expr})::text, v.owner_id, v.sha256 from v_blob_inventory v
          where {filter} and {after}
          order by {expr} {dir}, v.owner_id {dir}, v.sha256 {dir}
          limit {limit}",
        inventory_row_json()
    );
    let (items, last, more) = capped_rows(
        tx,
        &sql,
        &st.refs(),
        req.limit as usize,
        INVENTORY_PAGE_BYTES,
    )
    .await?;
    let next_cursor = match (more, last) {
        (true, Some(r)) => {
            Some(Cursor::after(req.sort, req.desc, r.get(1), r.get(2), r.get(3)).encode())
        }
        _ => None,
    };
    let mut page = InventoryPage {
        items,
        next_cursor,
        total: None,
    };
    if req.count {
        let mut st = Statement::default();
        let filter = req.filters.sql(&mut st);
        let total: i64 = tx
            .query_one(
                &format!("select count(*) from v_blob_inventory v where {filter}"),
                &st.refs(),
            )
            .await
            .map_err(|e| from_db(&e))?
            .get(0);
        page.total = Some(total);
    }
    Ok(page)
}

async fn groups(
    tx: &deadpool_postgres::Transaction<'_>,
    req: &Request,
    group: Group,
) -> Result<GroupsPage, ApiError> {
    let mut st = Statement::default();
    let filter = req.filters.sql(&mut st);
    let limit = st.param(req.limit + 1);
    let base = format!(
        "with f as (select v.owner_id, v.sha256, v.size, v.mime, v.stored_bytes, v.device_count, v.devices,
                           v.missing_on
                      from v_blob_inventory v where {filter})"
    );
    // Each group is one JSON object built by Postgres, in the documented shape. Sums stay numeric (a sum of bigints
    // is one): sizes are bounded one by one (sql/0005), not their totals.
    let (select, name) = match group {
        Group::Owner => (
            format!(
                "{base},
                 devices as (select f.owner_id, count(distinct d) as n from f, unnest(f.devices) d group by 1)
                 select jsonb_build_object('owner_id', f.owner_id, 'blobs', count(*),
                          'bytes', sum(f.size), 'stored_bytes', sum(f.stored_bytes),
                          'devices', coalesce(max(devices.n), 0),
                          'missing_everywhere', count(*) filter (where f.device_count = 0))::text
                   from f left join devices using (owner_id)
                  group by f.owner_id
                  order by sum(f.stored_bytes) desc, sum(f.size) desc, f.owner_id
                  limit {limit}"
            ),
            "owner_id",
        ),
        Group::Device => (
            format!(
                "{base}
                 select jsonb_build_object('owner_id', f.owner_id, 'device_id', d.device_id,
                          'blobs', count(*) filter (where d.present),
                          'bytes', coalesce(sum(f.size) filter (where d.present), 0),
                          'missing', count(*) filter (where not d.present))::text
                   from f cross join lateral (
                          select x, true from unnest(f.devices) x
                          union all
                          select x, false from unnest(f.missing_on) x) d(device_id, present)
                  group by f.owner_id, d.device_id
                  order by coalesce(sum(f.size) filter (where d.present), 0) desc,
                           count(*) filter (where d.present) desc, f.owner_id, d.device_id
                  limit {limit}"
            ),
            "device_id",
        ),
        Group::Mime => (
            format!(
                "{base}
                 select jsonb_build_object('mime', f.mime, 'blobs', count(*),
                          'bytes', sum(f.size), 'stored_bytes', sum(f.stored_bytes),
                          'missing_everywhere', count(*) filter (where f.device_count = 0))::text
                   from f
                  group by f.mime
                  order by sum(f.stored_bytes) desc, sum(f.size) desc, f.mime nulls last
                  limit {limit}"
            ),
            "mime",
        ),
    };
    // A group's key is as long as its owner made it (`mime`): the list ends at `limit` groups or 4 MiB of them.
    let (groups, _, more) = capped_rows(
        tx,
        &select,
        &st.refs(),
        req.limit as usize,
        INVENTORY_PAGE_BYTES,
    )
    .await?;
    let totals_sql = format!(
        "{base}
         select jsonb_build_object('blobs', count(*),
                  'bytes', coalesce(sum(f.size), 0),
                  'stored_bytes', coalesce(sum(f.stored_bytes), 0),
                  'owners', count(distinct f.owner_id),
                  'devices', (select count(*) from (select distinct f.owner_id, d from f, unnest(f.devices) d) x),
                  'missing_everywhere', count(*) filter (where f.device_count = 0))
           from f"
    );
    // The limit parameter is not used by the totals; pass the filter parameters only.
    let refs = st.refs();
    let filter_params = &refs[..refs.len() - 1];
    let totals = tx
        .query_one(&totals_sql, filter_params)
        .await
        .map_err(|e| from_db(&e))?
        .get::<_, PgJson<Value>>(0)
        .0;
    Ok(GroupsPage {
        group_by: name,
        groups,
        more,
        totals,
    })
}

/// The answer of `GET /v1/admin/blobs?group_by=…`, each group passed on as the JSON text Postgres made of it.
#[derive(Debug, serde::Serialize)]
struct GroupsPage {
    group_by: &'static str,
    groups: JsonRows,
    /// `limit`, or the 4 MiB cap, left groups out.
    more: bool,
    totals: Value,
}

/// Handler for `GET /v1/admin/stats` (admin token): replication slot, stream, pool and totals, for the admin page's
/// live panel. Counters are process-wide totals; the page derives rates from two samples.
pub async fn stats(
    State(state): State<AppState>,
    user: AuthUser,
) -> Result<Json<Value>, AdminError> {
    require_admin(&user)?;
    let slot = crate::metrics::sample_slot(&state).await;
    if let Err(e) = &slot {
        tracing::warn!(error = %crate::error::Chain(&e), "admin stats: could not sample the replication slot");
    }
    let hub = state.hub.stats();
    let pool = state.pool.status();
    let totals = &crate::metrics::TOTALS;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let subscriptions: i64 = totals
        .subscriptions
        .iter()
        .map(|a| a.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let sampled_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Ok(Json(json!({
        "sampled_at_ms": sampled_at_ms,
        "database_up": slot.is_ok(),
        "slot": {
            "name": state.slot_name,
            "exists": slot.as_ref().ok().map(Option::is_some),
            "sample": slot.as_ref().ok().cloned().flatten(),
        },
        "stream": {
            "generation": hub.generation,
            "position": hub.position,
            "connections": hub.connections,
            "users": hub.users,
            "subscriptions": subscriptions.max(0),
            "history_users": hub.history_users,
            "history_bytes": hub.history_bytes,
            "transactions_total": load(&totals.transactions),
            "changes_total": load(&totals.changes),
            "frames_sent_total": load(&totals.frames),
            "sent_bytes_total": load(&totals.sent_bytes),
        },
        "pool": {
            "max_size": pool.max_size,
            "size": pool.size,
            "in_use": pool.size.saturating_sub(pool.available),
            "waiting": pool.waiting,
        },
    })))
}

// ---- The page. ----

const PAGE_HTML: &str = include_str!("admin/index.html");
const PAGE_JS: &str = include_str!("admin/app.js");
const PAGE_CSS: &str = include_str!("admin/app.css");

/// The page may only load its own script and style and talk to this server: a blob's filename (user data) can
/// never run as script, and the page cannot be framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Revalidate: after an upgrade the page and its script must come from the same binary.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// `GET /admin`: the admin page.
pub async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE_HTML)
}

/// `GET /admin/app.js`.
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", PAGE_JS)
}

/// `GET /admin/app.css`.
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", PAGE_CSS)
}

/// `GET /admin/`: to the page (relative, so it works under a path prefix too).
pub async fn page_slash() -> Response {
    (
        StatusCode::PERMANENT_REDIRECT,
        [(header::LOCATION, HeaderValue::from_static("../admin"))],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_keep_the_legacy_form() {
        let owner = Uuid::new_v4();
        let sha = "a".repeat(64);
        let legacy = Cursor {
            sort: "owner_id".into(),
            desc: false,
            key: owner.to_string(),
            owner,
            sha256: sha.clone(),
            cut: false,
        };
        let encoded = legacy.encode();
        let text = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&encoded)
            .unwrap();
        assert_eq!(String::from_utf8(text).unwrap(), format!("{owner}/{sha}"));
        assert_eq!(Cursor::decode(&encoded), Some(legacy));
        let sized = Cursor {
            sort: "size".into(),
            desc: true,
            key: "123".into(),
            owner,
            sha256: sha.clone(),
            cut: false,
        };
        assert_eq!(Cursor::decode(&sized.encode()), Some(sized));
        // A long key is cut on a character boundary, and says so.
        let long = Cursor::after(Sort::Filename, false, "é".repeat(1000), owner, sha);
        assert!(
            long.cut && long.key.len() <= CURSOR_KEY_MAX && long.key.len() >= CURSOR_KEY_MAX - 1
        );
        assert_eq!(Cursor::decode(&long.encode()), Some(long));
        assert_eq!(Cursor::decode("not base64!"), None);
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{owner}/{}", "x".repeat(64)));
        assert_eq!(Cursor::decode(&forged), None);
    }

    #[test]
    fn parse_refuses_what_it_cannot_do() {
        let q = |f: fn(&mut AdminBlobsQuery)| {
            let mut q = AdminBlobsQuery::default();
            f(&mut q);
            Request::parse(q).map(|_| ()).map_err(|e| e.code)
        };
        assert_eq!(q(|_| {}), Ok(()));
        assert_eq!(q(|q| q.limit = Some(0)), Err("invalid_limit"));
        assert_eq!(q(|q| q.sort = Some("owner".into())), Err("invalid_sort"));
        assert_eq!(q(|q| q.order = Some("up".into())), Err("invalid_order"));
        assert_eq!(
            q(|q| q.group_by = Some("size".into())),
            Err("invalid_group_by")
        );
        assert_eq!(
            q(|q| {
                q.group_by = Some("mime".into());
                q.sort = Some("size".into());
            }),
            Err("invalid_query")
        );
        assert_eq!(q(|q| q.q = Some("x".repeat(201))), Err("invalid_query"));
        let other_order = Cursor {
            sort: "size".into(),
            desc: false,
            key: "1".into(),
            owner: Uuid::nil(),
            sha256: "b".repeat(64),
            cut: false,
        }
        .encode();
        let mut wrong = AdminBlobsQuery {
            cursor: Some(other_order),
            ..Default::default()
        };
        assert_eq!(
            Request::parse(wrong.clone())
                .map(|_| ())
                .map_err(|e| e.code),
            Err("invalid_cursor")
        );
        wrong.sort = Some("size".into());
        assert!(Request::parse(wrong).is_ok());
    }

    #[test]
    fn like_patterns_are_escaped() {
        assert_eq!(like_escape(r"50%_a\b"), r"50\%\_a\\b");
    }
}
