//! Helpers for `GET /v1/shape` tests: raw requests, a log that applies Electric messages the way `Shape` does (and
//! checks that nothing arrives twice), the truth as the endpoint renders it, and a second listener with other
//! shape timings.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use deeprecall_sync::live::shape::{ShapeConfig, Shapes};
use deeprecall_sync::state::AppState;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::Value;
use uuid::Uuid;

use crate::TestEnv;

/// One response of the shape endpoint.
#[derive(Debug, Clone)]
pub struct ShapeResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body text.
    pub text: String,
}

impl ShapeResponse {
    /// A header's value (`None`: absent).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON (panics with the text if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text))
    }

    /// The body's messages (panics unless it is a JSON array).
    pub fn messages(&self) -> Vec<Value> {
        match self.json() {
            Value::Array(a) => a,
            other => panic!("body is not an array: {other}"),
        }
    }

    /// `electric-handle` (panics if absent).
    pub fn handle(&self) -> String {
        self.header("electric-handle")
            .unwrap_or_else(|| panic!("no electric-handle: {self:?}"))
            .to_owned()
    }

    /// `electric-offset` (panics if absent).
    pub fn offset(&self) -> String {
        self.header("electric-offset")
            .unwrap_or_else(|| panic!("no electric-offset: {self:?}"))
            .to_owned()
    }
}

/// Percent-encodes a query value.
pub fn enc(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `GET {base}/v1/shape?{query}` with a bearer token (none: unauthenticated) and extra headers.
pub async fn get(
    http: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    query: &str,
    extra: &[(&str, &str)],
) -> ShapeResponse {
    let mut req = http.get(format!("{base}/v1/shape?{query}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("shape request");
    ShapeResponse {
        status: resp.status(),
        headers: resp.headers().clone(),
        text: resp.text().await.expect("shape body"),
    }
}

/// The rows of a shape, keyed by message key, built from messages the way `@electric-sql/client`'s `Shape`
/// builds them, with the checks a demanding client would make.
#[derive(Debug, Default, Clone)]
pub struct ShapeLog {
    /// Rows by key.
    pub rows: BTreeMap<String, BTreeMap<String, Value>>,
    /// Every change message applied.
    pub changes: Vec<Value>,
    /// Whether the last batch ended with up-to-date.
    pub up_to_date: bool,
}

impl ShapeLog {
    /// Applies a batch; panics on an insert of a key already held, or an update/delete of one never received.
    pub fn apply(&mut self, messages: &[Value]) {
        self.up_to_date = false;
        for m in messages {
            if let Some(control) = m["headers"]["control"].as_str() {
                match control {
                    "up-to-date" => self.up_to_date = true,
                    "must-refetch" => self.rows.clear(),
                    other => panic!("unknown control {other}"),
                }
                continue;
            }
            let key = m["key"].as_str().expect("key").to_owned();
            let value: BTreeMap<String, Value> = m["value"]
                .as_object()
                .expect("value object")
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for v in value.values() {
                assert!(v.is_string() || v.is_null(), "values are text or null: {m}");
            }
            match m["headers"]["operation"].as_str() {
                Some("insert") => {
                    assert!(
                        self.rows.insert(key.clone(), value).is_none(),
                        "insert of a row already held (duplicate): {m}"
                    );
                }
                Some("update") => {
                    let row = self
                        .rows
                        .get_mut(&key)
                        .unwrap_or_else(|| panic!("update of a row never received: {m}"));
                    row.extend(value);
                }
                Some("delete") => {
                    assert!(
                        self.rows.remove(&key).is_some(),
                        "delete of a row never received: {m}"
                    );
                }
                other => panic!("unknown operation {other:?}: {m}"),
            }
            self.changes.push(m.clone());
        }
    }

    /// Rows by their `id` value.
    pub fn by_id(&self) -> BTreeMap<String, BTreeMap<String, Value>> {
        self.rows
            .values()
            .map(|r| (r["id"].as_str().unwrap_or_default().to_owned(), r.clone()))
            .collect()
    }
}

/// A shape followed like the client follows it: snapshot, then catch-up requests (and live ones on demand).
#[derive(Debug, Clone)]
pub struct Follower {
    /// Base URL.
    pub base: String,
    /// Token.
    pub token: String,
    /// `table=…&where=…` etc. (without offset, handle, live).
    pub shape: String,
    /// Current handle.
    pub handle: String,
    /// Current offset.
    pub offset: String,
    /// Last cursor.
    pub cursor: String,
    /// The rows.
    pub log: ShapeLog,
}

impl Follower {
    /// Takes the snapshot (`offset=-1`); panics unless 200.
    pub async fn start(http: &reqwest::Client, base: &str, token: &str, shape: &str) -> Self {
        let r = get(http, base, Some(token), &format!("{shape}&offset=-1"), &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
        let mut log = ShapeLog::default();
        log.apply(&r.messages());
        assert!(log.up_to_date, "a snapshot ends up-to-date: {}", r.text);
        Self {
            base: base.to_owned(),
            token: token.to_owned(),
            shape: shape.to_owned(),
            handle: r.handle(),
            offset: r.offset(),
            cursor: String::new(),
            log,
        }
    }

    /// One request from the current position (`live` or not); applies a 200, returns the response.
    pub async fn poll(&mut self, http: &reqwest::Client, live: bool) -> ShapeResponse {
        let mut q = format!(
            "{}&offset={}&handle={}",
            self.shape,
            self.offset,
            enc(&self.handle)
        );
        if live {
            q.push_str(&format!("&live=true&cursor={}", self.cursor));
        }
        let r = get(http, &self.base, Some(&self.token), &q, &[]).await;
        if r.status == 200 {
            self.log.apply(&r.messages());
            self.offset = r.offset();
            if let Some(c) = r.header("electric-cursor") {
                self.cursor = c.to_owned();
            }
        }
        r
    }
}

/// `user`'s rows of `table` matching the SQL condition `cond` (true: all), as the endpoint renders them (each
/// column's text output), keyed by `id`. Reads as superuser.
pub async fn truth_text(
    env: &TestEnv,
    table: &str,
    user: Uuid,
    cond: &str,
) -> BTreeMap<String, BTreeMap<String, Value>> {
    let db = env.superuser().await;
    let columns: Vec<String> = db
        .query(
            "select attname::text from pg_attribute
              where attrelid = $1::text::regclass and attnum > 0 and not attisdropped and attgenerated = ''
              order by attnum",
            &[&table],
        )
        .await
        .expect("columns")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let list: Vec<String> = columns
        .iter()
        .map(|c| {
            let c = deeprecall_sync::db::catalog::quote_ident(c);
            format!("case when {c} is null then null else format('%s', {c}) end")
        })
        .collect();
    let sql = format!(
        "select {} from {} where owner_id = $1 and ({cond})",
        list.join(", "),
        deeprecall_sync::db::catalog::quote_ident(table)
    );
    let mut out = BTreeMap::new();
    for row in db.query(&sql, &[&user]).await.expect("truth query") {
        let mut r = BTreeMap::new();
        for (i, c) in columns.iter().enumerate() {
            let v: Option<String> = row.get(i);
            r.insert(c.clone(), v.map_or(Value::Null, Value::String));
        }
        out.insert(r["id"].as_str().unwrap_or_default().to_owned(), r);
    }
    out
}

/// A second HTTP listener on the same server state, with other shape timings (e.g. a short live hold). Stops with
/// the environment's server.
pub async fn listener_with(env: &TestEnv, config: ShapeConfig) -> String {
    listener_with_shapes(env, Arc::new(Shapes::new(config))).await
}

/// [`listener_with`] for shape state the test keeps a handle on (e.g. to read its cache).
pub async fn listener_with_shapes(env: &TestEnv, shapes: Arc<Shapes>) -> String {
    let mut shared = (*env.state).clone();
    shared.shapes = shapes;
    let state = AppState::new(shared);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        let _ = deeprecall_sync::app::serve(listener, state, async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await;
    });
    format!("http://{addr}")
}

/// A config with a short live hold.
pub fn short_hold(hold: Duration) -> ShapeConfig {
    ShapeConfig {
        live_hold: hold,
        ..Default::default()
    }
}
