//! A lean `/v1/stream` client: connects from one of several 127.0.0.x source addresses (so ephemeral ports do not
//! run out), subscribes, and reads frames without building more than it needs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// A client WebSocket over plain TCP.
pub(crate) type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Source addresses 127.0.0.2 ..= 127.0.0.(1 + SOURCES).
const SOURCES: u32 = 32;
static NEXT_SOURCE: AtomicU32 = AtomicU32::new(0);

/// Buffer sizes: `Small` for idle connections (memory), `Large` for the ones that receive a lot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Buffers {
    /// 4 KiB read buffer.
    Small,
    /// 128 KiB read buffer (tungstenite's default).
    Large,
}

/// Connects to `/v1/stream` with a bearer token, from the next source address in turn.
pub(crate) async fn connect(port: u16, token: &str, buffers: Buffers) -> anyhow::Result<Ws> {
    let k = 2 + NEXT_SOURCE.fetch_add(1, Ordering::Relaxed) % SOURCES;
    let socket = TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::from(([127, 0, 0, k as u8], 0)))
        .with_context(|| format!("binding 127.0.0.{k}:0"))?;
    let stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .context("TCP connect to the server")?;
    stream.set_nodelay(true)?;
    let mut req = format!("ws://127.0.0.1:{port}/v1/stream").into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let config = match buffers {
        Buffers::Small => WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0),
        Buffers::Large => WebSocketConfig::default().write_buffer_size(0),
    };
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(config))
        .await
        .context("WebSocket handshake")?;
    Ok(ws)
}

/// Sends a `subscribe` (with `offset` to resume).
pub(crate) async fn subscribe(
    ws: &mut Ws,
    id: &str,
    table: &str,
    offset: Option<&str>,
) -> anyhow::Result<()> {
    let mut msg = serde_json::json!({"type": "subscribe", "id": id, "table": table});
    if let Some(o) = offset {
        msg["offset"] = serde_json::json!(o);
    }
    ws.send(Message::Text(msg.to_string().into())).await?;
    Ok(())
}

/// What one server frame means to the benchmark.
#[derive(Debug, Default)]
pub(crate) struct Frame {
    /// `type`.
    pub(crate) kind: FrameKind,
    /// Rows it carries (snapshot rows or txn changes).
    pub(crate) rows: usize,
    /// The offset it carries (`txn` or `up_to_date`).
    pub(crate) offset: Option<String>,
}

/// Frame types the benchmark distinguishes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameKind {
    /// `snapshot`.
    Snapshot,
    /// `up_to_date`.
    UpToDate,
    /// `txn`.
    Txn,
    /// `must_refetch`.
    MustRefetch,
    /// `error`.
    Error,
    /// Anything else.
    #[default]
    Other,
}

/// Classifies a text frame cheaply: a `txn` frame is not parsed (its changes are counted by their `"op":"`
/// keys, which only change objects have), a snapshot frame is parsed only down to its raw rows.
pub(crate) fn classify(text: &str) -> anyhow::Result<Frame> {
    if text.starts_with("{\"type\":\"txn\"") {
        let offset = text
            .split_once("\"offset\":\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(o, _)| o.to_owned());
        return Ok(Frame {
            kind: FrameKind::Txn,
            rows: text.matches("\"op\":\"").count(),
            offset,
        });
    }
    let v: HashMap<String, Box<RawValue>> =
        serde_json::from_str(text).context("server sent a frame that is not a JSON object")?;
    let kind = match v.get("type").map(|t| t.get()) {
        Some("\"snapshot\"") => FrameKind::Snapshot,
        Some("\"up_to_date\"") => FrameKind::UpToDate,
        Some("\"txn\"") => FrameKind::Txn,
        Some("\"must_refetch\"") => FrameKind::MustRefetch,
        Some("\"error\"") => FrameKind::Error,
        _ => FrameKind::Other,
    };
    let rows = match (kind, v.get("rows")) {
        (FrameKind::Snapshot, Some(rows)) => serde_json::from_str::<Vec<&RawValue>>(rows.get())
            .map(|r| r.len())
            .unwrap_or(0),
        (FrameKind::Txn, _) => text.matches("\"op\":\"").count(),
        _ => 0,
    };
    let offset = v
        .get("offset")
        .and_then(|o| serde_json::from_str::<String>(o.get()).ok());
    if kind == FrameKind::Error {
        bail!("server sent an error frame: {text}");
    }
    Ok(Frame { kind, rows, offset })
}

/// The next text frame, or None when the connection closed. Errors on timeout.
pub(crate) async fn next_text(ws: &mut Ws, deadline: Instant) -> anyhow::Result<Option<String>> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = match tokio::time::timeout(left, ws.next()).await {
            Err(_) => bail!("timed out waiting for a frame"),
            Ok(None) | Ok(Some(Err(_))) => return Ok(None),
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Text(t) => return Ok(Some(t.as_str().to_owned())),
            Message::Close(_) => return Ok(None),
            _ => continue,
        }
    }
}

/// Reads until `up_to_date`; returns (rows received, offset).
pub(crate) async fn until_up_to_date(
    ws: &mut Ws,
    limit: Duration,
) -> anyhow::Result<(usize, String)> {
    let deadline = Instant::now() + limit;
    let mut rows = 0;
    loop {
        let Some(text) = next_text(ws, deadline).await? else {
            bail!("connection closed before up_to_date");
        };
        let f = classify(&text)?;
        match f.kind {
            FrameKind::UpToDate => return Ok((rows, f.offset.unwrap_or_default())),
            FrameKind::MustRefetch => rows = 0,
            _ => rows += f.rows,
        }
    }
}

/// Connects, subscribes to `table` and waits for `up_to_date`.
pub(crate) async fn connect_subscribed(
    port: u16,
    token: &str,
    table: &str,
    buffers: Buffers,
) -> anyhow::Result<(Ws, String)> {
    let mut ws = connect(port, token, buffers).await?;
    subscribe(&mut ws, "s", table, None).await?;
    let (_, offset) = until_up_to_date(&mut ws, Duration::from_secs(60)).await?;
    Ok((ws, offset))
}

/// Opens one idle connection per token, each subscribed to `table` and up to date, at most `concurrency` at a
/// time; keeps only the TCP socket of each (the WebSocket state is dropped, so the client side stays small).
/// Errors if it takes longer than `limit`.
pub(crate) async fn open_idle(
    port: u16,
    tokens: Vec<String>,
    table: &str,
    concurrency: usize,
    limit: Duration,
) -> anyhow::Result<Vec<TcpStream>> {
    let total = tokens.len();
    let opened = std::sync::atomic::AtomicUsize::new(0);
    let opening = futures::stream::iter(tokens)
        .map(|token| {
            let opened = &opened;
            async move {
                let (ws, _) = connect_subscribed(port, &token, table, Buffers::Small).await?;
                opened.fetch_add(1, Ordering::Relaxed);
                anyhow::Ok(ws.into_inner())
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>();
    let results = tokio::time::timeout(limit, opening)
        .await
        .with_context(|| {
            format!(
                "opening idle connections took longer than {limit:?} ({} of {total} opened)",
                opened.load(Ordering::Relaxed)
            )
        })?;
    let n = results.iter().filter(|r| r.is_ok()).count();
    results
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()
        .with_context(|| format!("opening idle connections: {n} of {total} succeeded"))
}
