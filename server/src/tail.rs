//! `deeprecall-sync tail`: connects to a running server's `GET /v1/stream` with a token, subscribes to tables, and
//! prints every server frame as one JSON line on stdout (docs/protocol.md describes the frames).
//!
//! A watching tool, not a sync client: it keeps no state and does not reconnect. It exits 0 when the server
//! closes normally (1000) or shuts down (1001) and on Ctrl-C; any other close code, an HTTP error during the
//! handshake, a dropped connection, or the server refusing every subscription (an unknown `--table`, a bad
//! `--where`) is an error (exit status 1) that names the code and reason.

use std::io::Write;

use anyhow::{Context, bail};
use clap::Args;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Every synced table of sql/0001_schema.sql (the server does not list them).
pub const DEFAULT_TABLES: [&str; 8] = [
    "works",
    "blobs_meta",
    "device_blobs",
    "assets",
    "annotations",
    "activities",
    "boards",
    "strokes",
];

/// `tail` flags.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// Base URL of the server (http:// or ws://; `/v1/stream` is appended).
    #[arg(long, env = "DEEPRECALL_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Access token (a JWT whose `sub` is the user to watch), e.g. the dev token `dev` prints.
    #[arg(long, env = "DEEPRECALL_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Table to subscribe to (repeatable; subscription id = table name). Default: every synced table.
    #[arg(long = "table", value_name = "TABLE")]
    pub tables: Vec<String>,
    /// `where` filter as JSON, applied to every table, e.g. '{"work_id":"…"}' (docs/protocol.md).
    #[arg(long = "where", value_name = "JSON")]
    pub filter: Option<String>,
    /// Resume from this offset (the last `offset` a previous run printed) instead of starting with a snapshot.
    #[arg(long)]
    pub offset: Option<String>,
}

/// Runs `tail` until the server closes the stream or Ctrl-C.
pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    let filter: Option<Value> = match &args.filter {
        Some(text) => Some(
            serde_json::from_str(text).with_context(|| format!("--where is not JSON: {text}"))?,
        ),
        None => None,
    };
    let mut tables: Vec<String> = if args.tables.is_empty() {
        DEFAULT_TABLES.iter().map(|t| (*t).to_owned()).collect()
    } else {
        args.tables.clone()
    };
    // Once each: the id is the table's name, and a second subscribe with it is refused (`duplicate_subscription`),
    // which would count as the refusal of the first.
    let mut seen = std::collections::HashSet::new();
    tables.retain(|t| seen.insert(t.clone()));
    let url = stream_url(&args.url)?;
    let mut request = url
        .as_str()
        .into_client_request()
        .with_context(|| format!("invalid URL {url}"))?;
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", args.token.trim())
            .parse()
            .context("the token contains characters not allowed in an HTTP header")?,
    );
    // Snapshot and transaction frames can be large; the server bounds them, not this tool.
    let config = WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    let (ws, _) =
        match tokio_tungstenite::connect_async_with_config(request, Some(config), true).await {
            Ok(ok) => ok,
            Err(WsError::Http(response)) => {
                let body = response
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                bail!("{url}: HTTP {} {}", response.status(), body.trim());
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {url}")),
        };
    let (mut sink, mut stream) = ws.split();

    for table in &tables {
        let mut msg = json!({"type": "subscribe", "id": table, "table": table});
        if let Some(f) = &filter {
            msg["where"] = f.clone();
        }
        if let Some(o) = &args.offset {
            msg["offset"] = json!(o);
        }
        sink.send(Message::Text(msg.to_string().into()))
            .await
            .context("sending subscribe")?;
    }

    // Subscriptions the server has not refused. An `error` frame with a subscription's id ends it (protocol.md);
    // once none is left there is nothing to watch: `tail --table nosuch` printed the refusal and then waited for
    // ever.
    let mut live: std::collections::HashSet<&str> = tables.iter().map(String::as_str).collect();
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let msg = tokio::select! {
            _ = &mut ctrl_c => {
                // Say goodbye; wait briefly for the server's close reply, but exit 0 regardless.
                let _ = sink
                    .send(Message::Close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "bye".into(),
                    })))
                    .await;
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                    while let Some(Ok(m)) = stream.next().await {
                        if m.is_close() {
                            break;
                        }
                    }
                })
                .await;
                return Ok(());
            }
            msg = stream.next() => msg,
        };
        match msg {
            Some(Ok(Message::Text(text))) => {
                print_line(text.as_str())?;
                if let Some(refusal) = refused_subscription(text.as_str())
                    && live.remove(refusal.0.as_str())
                    && live.is_empty()
                {
                    let _ = sink.send(Message::Close(None)).await;
                    bail!(
                        "no subscription left: the server refused `{}` ({})",
                        refusal.0,
                        refusal.1
                    );
                }
            }
            Some(Ok(Message::Binary(bytes))) => {
                print_line(&json!({"type": "binary", "len": bytes.len()}).to_string())?
            }
            Some(Ok(Message::Close(frame))) => {
                // tungstenite has already queued the close reply; flush it (best effort).
                let _ = sink.close().await;
                return match frame {
                    Some(f) => {
                        let code = u16::from(f.code);
                        if code == 1000 || code == 1001 {
                            eprintln!("stream closed: {code} {}", f.reason);
                            Ok(())
                        } else {
                            bail!("stream closed with code {code}: {}", f.reason)
                        }
                    }
                    None => bail!("stream closed without a close code"),
                };
            }
            Some(Ok(_)) => {} // ping/pong: answered by the library
            Some(Err(e)) => return Err(e).context("stream connection failed"),
            None => bail!("connection dropped without a close frame"),
        }
    }
}

/// The id and the `code: message` of an `error` frame about a subscription.
fn refused_subscription(text: &str) -> Option<(String, String)> {
    if !text.contains(r#""error""#) {
        return None;
    }
    let frame: Value = serde_json::from_str(text).ok()?;
    if frame["type"] != "error" {
        return None;
    }
    let id = frame["id"].as_str()?.to_owned();
    let code = frame["code"].as_str().unwrap_or("error");
    let message = frame["message"].as_str().unwrap_or("");
    Some((id, format!("{code}: {message}")))
}

/// `http://host:port[/prefix]` → `ws://host:port[/prefix]/v1/stream` (a URL already ending in `/v1/stream` is kept).
fn stream_url(base: &str) -> anyhow::Result<String> {
    let base = base.trim().trim_end_matches('/');
    let rest = if let Some(r) = base.strip_prefix("http://") {
        format!("ws://{r}")
    } else if let Some(r) = base.strip_prefix("https://") {
        format!("wss://{r}")
    } else if base.starts_with("ws://") || base.starts_with("wss://") {
        base.to_owned()
    } else {
        bail!("--url must start with http://, https://, ws:// or wss:// (got {base:?})");
    };
    if rest.starts_with("wss://") {
        bail!(
            "`tail` has no TLS support; connect to the server directly (http://) or through a local tunnel"
        );
    }
    Ok(if rest.ends_with("/v1/stream") {
        rest
    } else {
        format!("{rest}/v1/stream")
    })
}

/// Prints one frame as one line. Server frames are compact JSON, except that a `json` column keeps the text it was
/// stored with, which may contain line breaks: such frames are re-serialised.
fn print_line(text: &str) -> anyhow::Result<()> {
    let line = if text.contains(['\n', '\r']) {
        match serde_json::from_str::<Value>(text) {
            Ok(v) => v.to_string(),
            Err(_) => json!({"type": "unparsed", "text": text}).to_string(),
        }
    } else {
        text.to_owned()
    };
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        // `tail | head`: the reader left; that is a normal end.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(e).context("writing to stdout"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_of_subscriptions_are_told_apart() {
        let refused = refused_subscription(
            r#"{"code":"unknown_table","id":"nosuch","message":"`nosuch` is not a synced table","type":"error"}"#,
        );
        assert_eq!(
            refused,
            Some((
                "nosuch".to_owned(),
                "unknown_table: `nosuch` is not a synced table".to_owned()
            ))
        );
        // An error about the connection (no id), and a row whose text says "error", are not.
        assert_eq!(
            refused_subscription(r#"{"code":"bad_message","message":"x","type":"error"}"#),
            None
        );
        assert_eq!(
            refused_subscription(r#"{"id":"works","type":"txn","changes":[{"title":"error"}]}"#),
            None
        );
    }

    #[test]
    fn stream_urls() {
        assert_eq!(
            stream_url("http://127.0.0.1:8080").unwrap(),
            "ws://127.0.0.1:8080/v1/stream"
        );
        assert_eq!(
            stream_url("http://h:1/sync/").unwrap(),
            "ws://h:1/sync/v1/stream"
        );
        assert_eq!(
            stream_url("ws://h:1/v1/stream").unwrap(),
            "ws://h:1/v1/stream"
        );
        assert!(stream_url("https://h").is_err());
        assert!(stream_url("h:1").is_err());
    }
}
