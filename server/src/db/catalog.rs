//! The catalog of synced tables, read from Postgres rather than hard-coded.
//!
//! A synced table is a member of the `deeprecall_sync` publication (sql/0001_schema.sql). Its columns, types and
//! primary key come from `pg_attribute` / `pg_constraint`, so adding a synced table or column needs only SQL. The
//! server loads the catalog at start, after an in-process migration, when a `deeprecall_schema_changed`
//! notification arrives, and (rate-limited) when a request names a table or column it does not know yet.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, RwLock};
use tokio_postgres::Client;

/// Name of the publication whose members are the synced tables.
pub const PUBLICATION: &str = "deeprecall_sync";

/// Columns Postgres assigns; a client never writes them (ignored if sent).
pub const SERVER_COLUMNS: &[&str] = &["owner_id", "created_at", "updated_at"];

/// One column of a synced table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// `format_type()` of the column, e.g. `uuid`, `text[]`, `timestamp with time zone`.
    pub type_name: String,
    /// Type OID (`atttypid`), as in pgoutput Relation messages.
    pub type_oid: u32,
    /// The type under a domain (through domains over domains), e.g. `jsonb` for a domain over `jsonb`; the same
    /// as `type_oid` for a column whose type is not a domain.
    pub base_type_oid: u32,
    /// `not null` constraint.
    pub not_null: bool,
    /// Generated column (never writable, not in the WAL stream either).
    pub generated: bool,
    /// `generated always as identity`: Postgres assigns it and refuses a written value (428C9), so it is not
    /// writable either; unlike a generated column it is in the WAL stream. (`by default` identity is writable.)
    pub identity_always: bool,
}

impl Column {
    /// Whether Postgres refuses a value written to this column.
    pub fn read_only(&self) -> bool {
        self.generated || self.identity_always
    }
}

/// A synced table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Relation OID (matches pgoutput Relation messages).
    pub oid: u32,
    /// Schema name.
    pub schema: String,
    /// Table name (the API's `table`).
    pub name: String,
    /// Columns in attribute order.
    pub columns: Vec<Column>,
    /// Name of the primary-key constraint (upsert conflict target).
    pub primary_key: String,
}

impl Table {
    /// The column called `name`, if any.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Whether a client may write this column.
    pub fn is_writable(&self, name: &str) -> bool {
        self.column(name).is_some_and(|c| !c.read_only()) && !SERVER_COLUMNS.contains(&name)
    }

    /// `"schema"."name"`, quoted.
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// All synced tables by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    tables: HashMap<String, Arc<Table>>,
}

impl Catalog {
    /// The synced table called `name`.
    pub fn table(&self, name: &str) -> Option<&Arc<Table>> {
        self.tables.get(name)
    }

    /// The synced table with relation OID `oid`.
    pub fn by_oid(&self, oid: u32) -> Option<&Arc<Table>> {
        self.tables.values().find(|t| t.oid == oid)
    }

    /// All synced tables.
    pub fn tables(&self) -> impl Iterator<Item = &Arc<Table>> {
        self.tables.values()
    }

    /// Names of all synced tables, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tables.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Reads the catalog from the database.
    pub async fn load(client: &Client) -> Result<Self, tokio_postgres::Error> {
        let rows = client
            .query(
                "select c.oid, n.nspname::text, c.relname::text, a.attname::text,
                        format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attgenerated <> '',
                        coalesce(pk.conname::text, ''), a.atttypid,
                        (with recursive d(t) as (
                           select a.atttypid
                            union all
                           select y.typbasetype from d join pg_type y on y.oid = d.t and y.typtype = 'd')
                         select d.t from d join pg_type y on y.oid = d.t where y.typtype <> 'd'),
                        a.attidentity = 'a'
                   from pg_publication_tables pt
                   join pg_namespace n on n.nspname = pt.schemaname
                   join pg_class c on c.relnamespace = n.oid and c.relname = pt.tablename
                   join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
                   left join pg_constraint pk on pk.conrelid = c.oid and pk.contype = 'p'
                  where pt.pubname = $1
                  order by c.oid, a.attnum",
                &[&PUBLICATION],
            )
            .await?;
        let mut tables: HashMap<String, Table> = HashMap::new();
        for row in rows {
            let oid: u32 = row.get(0);
            let name: String = row.get(2);
            let table = tables.entry(name.clone()).or_insert_with(|| Table {
                oid,
                schema: row.get(1),
                name,
                columns: Vec::new(),
                primary_key: row.get(7),
            });
            table.columns.push(Column {
                name: row.get(3),
                type_name: row.get(4),
                not_null: row.get(5),
                generated: row.get(6),
                type_oid: row.get(8),
                base_type_oid: row.get(9),
                identity_always: row.get(10),
            });
        }
        // A table is synced only if it follows the convention the router and RLS rely on.
        tables.retain(|name, t| {
            let ok = t.column("id").is_some() && t.column("owner_id").is_some() && !t.primary_key.is_empty();
            if !ok {
                tracing::warn!(table = %name, "publication member lacks id, owner_id or a primary key; not synced");
            }
            ok
        });
        Ok(Self {
            tables: tables.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        })
    }
}

/// A publication member whose membership has a row filter or a column list (PostgreSQL 15: `add table t where
/// (...)`, `add table t (a, b)`). The server needs every change of every column of a synced table: a row filter
/// drops changes without a trace (the WAL is not filtered by owner anyway), a column list makes every change look
/// like a schema change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilteredMember {
    /// Table name (as in the [`Catalog`]).
    pub table: String,
    /// `schema.table`, quoted where needed (for SQL in a fix).
    pub qualified: String,
    /// The row filter, as `pg_get_expr` prints it.
    pub row_filter: Option<String>,
    /// The published columns, when a column list limits them.
    pub columns: Option<Vec<String>>,
}

impl FilteredMember {
    /// `row filter where (false)`, `column list (id, owner_id)`, or both.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(filter) = &self.row_filter {
            parts.push(format!("row filter where {filter}"));
        }
        if let Some(columns) = &self.columns {
            parts.push(format!("column list ({})", columns.join(", ")));
        }
        parts.join(" and ")
    }
}

/// Members of the publication with a row filter or a column list (none before PostgreSQL 15, which added both).
pub async fn publication_filters(
    client: &Client,
) -> Result<Vec<FilteredMember>, tokio_postgres::Error> {
    let version: i32 = client
        .query_one("select current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    if version < 150_000 {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "select c.relname::text, format('%I.%I', n.nspname, c.relname),
                    pg_get_expr(pr.prqual, pr.prrelid),
                    case when pr.prattrs is not null then
                      array(select a.attname::text from unnest(pr.prattrs::int2[]) with ordinality k(num, ord)
                              join pg_attribute a on a.attrelid = pr.prrelid and a.attnum = k.num
                             order by k.ord)
                    end
               from pg_publication_rel pr
               join pg_publication p on p.oid = pr.prpubid
               join pg_class c on c.oid = pr.prrelid
               join pg_namespace n on n.oid = c.relnamespace
              where p.pubname = $1 and (pr.prqual is not null or pr.prattrs is not null)
              order by 2",
            &[&PUBLICATION],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| FilteredMember {
            table: r.get(0),
            qualified: r.get(1),
            row_filter: r.get(2),
            columns: r.get(3),
        })
        .collect())
}

/// Quotes an SQL identifier (doubling embedded quotes). Only ever applied to names read from the catalog.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Why a reload on a miss failed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// No pooled connection (the database is down, or every connection stayed busy).
    #[error("no database connection for the catalog reload: {0}")]
    Pool(deadpool_postgres::PoolError),
    /// The catalog query failed.
    #[error("catalog reload failed: {0}")]
    Db(tokio_postgres::Error),
}

/// The shared, refreshable catalog.
#[derive(Debug)]
pub struct CatalogHandle {
    current: RwLock<Arc<Catalog>>,
    /// The last reload, held for a whole reload so that reloads take turns.
    last_refresh: Mutex<LastReload>,
}

/// When the last reload began to read the catalog, and when it ended.
#[derive(Debug, Clone, Copy)]
struct LastReload {
    /// Decides whether a miss is answered by it (see [`CatalogHandle::refresh_on_miss`]).
    began: Instant,
    /// Spaces reloads after a miss [`MISS_REFRESH_INTERVAL`] apart (from the end: a slow load does not shorten
    /// the pause).
    ended: Instant,
}

impl LastReload {
    fn now() -> Self {
        let now = Instant::now();
        Self {
            began: now,
            ended: now,
        }
    }
}

/// Refreshes on an unknown name happen at most this often, so bad requests cannot hammer the catalog.
const MISS_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

impl CatalogHandle {
    /// Wraps a loaded catalog.
    pub fn new(catalog: Catalog) -> Self {
        Self {
            current: RwLock::new(Arc::new(catalog)),
            last_refresh: Mutex::new(LastReload::now()),
        }
    }

    /// The current catalog.
    pub async fn get(&self) -> Arc<Catalog> {
        self.current.read().await.clone()
    }

    /// Reads the catalog again and installs it if it differs from the current one (kept as it is otherwise: shape
    /// definitions compiled from its tables stay valid); true when it changed. Loads and swaps under
    /// `last_refresh`, as every reload does, so a load that finished earlier never replaces a newer catalog.
    pub async fn refresh(&self, client: &Client) -> Result<bool, tokio_postgres::Error> {
        let mut last = self.last_refresh.lock().await;
        let began = Instant::now();
        let changed = self.swap_if_changed(Catalog::load(client).await?).await.1;
        *last = LastReload {
            began,
            ended: Instant::now(),
        };
        Ok(changed)
    }

    /// Installs `fresh` unless it equals the current catalog; the catalog now in use, and whether it changed.
    async fn swap_if_changed(&self, fresh: Catalog) -> (Arc<Catalog>, bool) {
        let mut current = self.current.write().await;
        if **current == fresh {
            return (current.clone(), false);
        }
        *current = Arc::new(fresh);
        (current.clone(), true)
    }

    /// Reloads after a request named a table or column we do not know, and returns the catalog to use.
    ///
    /// Reloads happen at most once per interval, so bad requests cannot hammer the database; a request that
    /// arrives sooner waits for the next allowed reload rather than being refused with a stale answer (a column
    /// added by plain DDL a moment ago must be writable). Concurrent misses share one reload.
    ///
    /// The waiting holds no database connection: only the request that reloads takes one from `pool`, after the
    /// wait and for the one query. (It used to be taken first: 48 connections of one user naming made-up tables
    /// kept the pool's connections asleep here and another user's 1-op batch took 3 s instead of 0.7 ms.)
    pub async fn refresh_on_miss(
        &self,
        pool: &deadpool_postgres::Pool,
    ) -> Result<Arc<Catalog>, RefreshError> {
        let asked = Instant::now();
        let mut last = self.last_refresh.lock().await;
        if last.began >= asked {
            // A reload that began after we asked ran while we waited for the lock: it saw our change. (One that
            // began before may have read the catalog before the DDL committed, so when a reload began decides,
            // not when it ended: a reload under way when a column was dropped by hand, ending after a batch
            // missed it, answered that batch with the column still there, a 500.)
            return Ok(self.get().await);
        }
        let since = last.ended.elapsed();
        if since < MISS_REFRESH_INTERVAL {
            tokio::time::sleep(MISS_REFRESH_INTERVAL - since).await;
        }
        let client = pool.get().await.map_err(RefreshError::Pool)?;
        let began = Instant::now();
        let fresh = Catalog::load(&client).await.map_err(RefreshError::Db)?;
        let current = self.swap_if_changed(fresh).await.0;
        *last = LastReload {
            began,
            ended: Instant::now(),
        };
        Ok(current)
    }
}

/// How often the catalog watcher reads the catalog again, whether or not it was notified.
///
/// DDL run by hand, without `migrate` and its notification, otherwise stays unseen until a change of the table is
/// streamed (the replicator reloads on a new column list) or a request names something unknown: meanwhile a column
/// retyped from `smallint` to `text` kept refusing `"abc"`, and a dropped column failed every snapshot that selected
/// it. One catalog query every 30 s costs nothing next to that.
const CATALOG_POLL: Duration = Duration::from_secs(30);

/// Keeps the catalog fresh: LISTENs for `deeprecall_schema_changed` (sent by every `migrate`) on a dedicated
/// connection and reloads, and reads it again every [`CATALOG_POLL`] in case DDL ran without the notification.
/// Reconnects after errors; runs until the process ends.
pub async fn watch(
    target: crate::db::PgTarget,
    catalog: Arc<CatalogHandle>,
    pool: deadpool_postgres::Pool,
) {
    use futures::StreamExt;
    loop {
        match target.config.connect(target.connector()).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(Ok(msg)) = messages.next().await {
                        if let tokio_postgres::AsyncMessage::Notification(_) = msg {
                            let _ = tx.send(());
                        }
                    }
                });
                if client
                    .batch_execute("listen deeprecall_schema_changed")
                    .await
                    .is_ok()
                {
                    let mut poll = tokio::time::interval_at(
                        tokio::time::Instant::now() + CATALOG_POLL,
                        CATALOG_POLL,
                    );
                    loop {
                        let notified = tokio::select! {
                            notified = rx.recv() => match notified {
                                Some(()) => true,
                                None => break,
                            },
                            _ = poll.tick() => false,
                        };
                        let Ok(conn) = pool.get().await else { continue };
                        match catalog.refresh(&conn).await {
                            Ok(true) if !notified => tracing::info!(
                                "the schema changed without a notification (DDL outside `migrate`); catalog reloaded"
                            ),
                            Ok(_) if notified => tracing::info!("schema changed; catalog reloaded"),
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %crate::error::Chain(&e), "catalog reload failed")
                            }
                        }
                    }
                }
                driver.abort();
            }
            Err(e) => {
                tracing::debug!(error = %crate::error::Chain(&e), "catalog watcher cannot connect; retrying")
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}
