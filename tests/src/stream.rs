//! A WebSocket client for `/v1/stream` that keeps what it received: the state a real client would build from
//! snapshots and transactions, every frame, and the offsets.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// Close frame with code and reason.
    Code(u16, String),
    /// The socket ended without a close frame.
    Eof,
}

/// A connected stream client.
pub struct StreamClient {
    ws: Ws,
    /// Every server frame received, parsed.
    pub frames: Vec<Value>,
    /// Per subscription id: rows keyed by `id`, built only from what arrived.
    pub state: BTreeMap<String, BTreeMap<String, Value>>,
    /// Per subscription id: the last offset received (txn or up_to_date).
    pub offsets: BTreeMap<String, String>,
    /// Set when the server closed the connection.
    pub closed: Option<Closed>,
}

impl StreamClient {
    /// Connects with a bearer header.
    pub async fn connect(base: &str, token: &str) -> Self {
        let url = format!("{}/v1/stream", base.replace("http://", "ws://"));
        let mut req = url.into_client_request().expect("request");
        req.headers_mut().insert(
            "Authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("websocket connect");
        Self::from_ws(ws)
    }

    /// Connects with `?access_token=` (the browser way).
    pub async fn connect_query(base: &str, token: &str) -> Self {
        let url = format!(
            "{}/v1/stream?access_token={token}",
            base.replace("http://", "ws://")
        );
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connect");
        Self::from_ws(ws)
    }

    fn from_ws(ws: Ws) -> Self {
        Self {
            ws,
            frames: Vec::new(),
            state: BTreeMap::new(),
            offsets: BTreeMap::new(),
            closed: None,
        }
    }

    /// Sends a JSON message.
    pub async fn send(&mut self, msg: Value) {
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .expect("send");
    }

    /// Subscribes (fresh: snapshot).
    pub async fn subscribe(&mut self, id: &str, table: &str, filter: Value) {
        self.send(json!({"type": "subscribe", "id": id, "table": table, "where": filter}))
            .await;
    }

    /// Subscribes from an offset (resume).
    pub async fn resume(&mut self, id: &str, table: &str, filter: Value, offset: &str) {
        self.send(json!({"type": "subscribe", "id": id, "table": table, "where": filter, "offset": offset})).await;
    }

    /// Receives one frame (applying it to the state), or None on timeout / close.
    pub async fn next(&mut self, timeout: Duration) -> Option<Value> {
        if self.closed.is_some() {
            return None;
        }
        loop {
            let msg = match tokio::time::timeout(timeout, self.ws.next()).await {
                Err(_) => return None,
                Ok(None) | Ok(Some(Err(_))) => {
                    self.closed.get_or_insert(Closed::Eof);
                    return None;
                }
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(text) => {
                    let v: Value = serde_json::from_str(text.as_str()).expect("server sent JSON");
                    self.apply(&v);
                    self.frames.push(v.clone());
                    return Some(v);
                }
                Message::Close(frame) => {
                    self.closed = Some(match frame {
                        Some(f) => Closed::Code(f.code.into(), f.reason.to_string()),
                        None => Closed::Eof,
                    });
                    return None;
                }
                _ => continue,
            }
        }
    }

    /// Receives until `pred` matches a frame (returned) or `timeout` passes (panics with what arrived).
    pub async fn until(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(v) if pred(&v) => return v,
                Some(_) => {}
                None => panic!(
                    "expected frame not received (closed: {:?}); last frames: {:#?}",
                    self.closed,
                    &self.frames[self.frames.len().saturating_sub(5)..]
                ),
            }
        }
    }

    /// Waits for `up_to_date` of subscription `id`.
    pub async fn up_to_date(&mut self, id: &str) -> Value {
        let id = id.to_owned();
        self.until(Duration::from_secs(30), move |v| {
            v["type"] == "up_to_date" && v["id"] == id.as_str()
        })
        .await
    }

    /// Reads frames until nothing arrives for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) {
        while self.next(quiet).await.is_some() {}
    }

    /// Closes the socket politely.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }

    fn apply(&mut self, v: &Value) {
        match v["type"].as_str() {
            Some("snapshot") => {
                let id = v["id"].as_str().unwrap_or_default().to_owned();
                let rows = self.state.entry(id).or_default();
                for row in v["rows"].as_array().into_iter().flatten() {
                    rows.insert(
                        row["id"].as_str().unwrap_or_default().to_owned(),
                        row.clone(),
                    );
                }
            }
            Some("must_refetch") => {
                let id = v["id"].as_str().unwrap_or_default().to_owned();
                self.state.insert(id.clone(), BTreeMap::new());
                self.offsets.remove(&id);
            }
            Some("up_to_date") => {
                let id = v["id"].as_str().unwrap_or_default().to_owned();
                self.offsets
                    .insert(id, v["offset"].as_str().unwrap_or_default().to_owned());
            }
            Some("txn") => {
                // A part of a transaction that comes in parts, before its last, has no offset: keep the last one.
                let offset = v["offset"].as_str().map(str::to_owned);
                for change in v["changes"].as_array().into_iter().flatten() {
                    let sub = change["id"].as_str().unwrap_or_default().to_owned();
                    let rows = self.state.entry(sub.clone()).or_default();
                    let row = &change["row"];
                    let key = row["id"].as_str().unwrap_or_default().to_owned();
                    match change["op"].as_str() {
                        Some("delete") => {
                            rows.remove(&key);
                        }
                        Some("update") if change.get("unchanged").is_some() => {
                            // A patch: keep the columns it says are unchanged.
                            let merged = rows.entry(key).or_insert_with(|| json!({}));
                            for (k, val) in row.as_object().into_iter().flatten() {
                                merged[k] = val.clone();
                            }
                        }
                        _ => {
                            rows.insert(key, row.clone());
                        }
                    }
                    if let Some(offset) = &offset {
                        self.offsets.insert(sub, offset.clone());
                    }
                }
            }
            _ => {}
        }
    }
}
