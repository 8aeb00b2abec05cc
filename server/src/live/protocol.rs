//! The WebSocket protocol's wire format (docs/protocol.md): typed client messages, server control messages, and
//! the two data frames (`snapshot`, `txn`).
//!
//! Control messages go through serde. The data frames are appended by hand into one buffer: a `txn` frame is built
//! once per transaction per connection on the read path's hot loop, and the row JSON inside it was serialised once
//! by the router, so here it is only copied next to each subscription id that receives it. Those two builders are
//! the only place the frames are encoded.
//!
//! Key order inside objects is not significant to clients; control messages keep the sorted order they always had.

use std::io::Write as _;

use deeprecall_replication::Op;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::convert::{self, write_json_str};
use super::filter::Filter;
use super::offset::Offset;
use super::routing::UserTxn;

/// Close codes (docs/protocol.md, "Close codes").
pub mod close {
    /// Normal close (client asked).
    pub const NORMAL: u16 = 1000;
    /// Server shutting down: reconnect and resume with your offsets.
    pub const SHUTDOWN: u16 = 1001;
    /// Protocol violation (binary frame, oversized message).
    pub const PROTOCOL: u16 = 1002;
    /// The token expired and was not refreshed: reconnect with a fresh token and resume.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// A refreshed token belongs to another user.
    pub const USER_MISMATCH: u16 = 4003;
    /// The client did not keep up: reconnect and resume with your offsets.
    pub const TOO_SLOW: u16 = 4008;
    /// This server is on standby (another server streams from the replication slot): reconnect (through the
    /// load balancer) and resume with your offsets. The WebSocket standard's "try again later".
    pub const STANDBY: u16 = 1013;
    /// The user already has `--max-connections-per-user` sockets open.
    pub const TOO_MANY_CONNECTIONS: u16 = 4029;
    /// The replication stream restarted (slot recreated, or moved by another process) while a transaction was
    /// coming to this connection in parts, whose last part will not come: every subscription was told
    /// `must_refetch` first. The WebSocket standard's "service restart".
    pub const STREAM_RESTARTED: u16 = 1012;
}

/// A message from the client.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Start a subscription.
    Subscribe(Subscribe),
    /// End one.
    Unsubscribe {
        /// Subscription id (`None`: absent or not a string).
        #[serde(default, deserialize_with = "lenient_string")]
        id: Option<String>,
    },
    /// Extend the connection's lifetime with a new token.
    RefreshToken {
        /// The new token (`None`: absent or not a string).
        #[serde(default, deserialize_with = "lenient_string")]
        access_token: Option<String>,
    },
    /// Liveness check.
    Ping,
}

/// `subscribe`. Fields are lenient where the protocol's answer to a bad value is not "malformed message": a
/// missing or non-string `table` is an unknown table, an unusable `offset` a refetch.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Subscribe {
    /// Subscription id (`None`: absent or not a string).
    #[serde(default, deserialize_with = "lenient_string")]
    pub id: Option<String>,
    /// Table name (`None`: absent or not a string).
    #[serde(default, deserialize_with = "lenient_string")]
    pub table: Option<String>,
    /// The `where` filter in its JSON form (validated by [`Filter::parse`]).
    #[serde(default, rename = "where")]
    pub filter: Option<Value>,
    /// Resume position.
    #[serde(default)]
    pub offset: OffsetField,
}

/// A `subscribe`'s `offset`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OffsetField {
    /// Absent or null: take a snapshot.
    #[default]
    None,
    /// An offset this server issues.
    Valid(Offset),
    /// Anything else: the client must start over (`must_refetch` `invalid_offset`, then a snapshot).
    Invalid,
}

impl<'de> Deserialize<'de> for OffsetField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Null => Self::None,
            Value::String(s) => s.parse().map_or(Self::Invalid, Self::Valid),
            _ => Self::Invalid,
        })
    }
}

fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => Some(s),
        _ => None,
    })
}

/// A client message the server cannot act on: answered with an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    /// The subscription concerned, if the message named one.
    pub id: Option<String>,
    /// Error code.
    pub code: &'static str,
    /// Explanation.
    pub message: String,
}

impl ClientMessage {
    /// Parses one text frame.
    pub fn parse(text: &str) -> Result<Self, ProtocolError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ProtocolError {
            id: None,
            code: "invalid_message",
            message: format!("not JSON: {e}"),
        })?;
        // Every field is lenient, so the only way to fail here is a missing or unknown `type`.
        Self::deserialize(&value).map_err(|_| ProtocolError {
            id: value.get("id").and_then(Value::as_str).map(str::to_owned),
            code: "invalid_message",
            message: format!(
                "unknown message type {:?}",
                value.get("type").and_then(Value::as_str).unwrap_or("")
            ),
        })
    }
}

/// A server control message (everything but the `snapshot` and `txn` data frames).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ServerMessage<'a> {
    /// `{"type":"pong"}`.
    Pong {
        /// `pong`.
        #[serde(rename = "type")]
        kind: &'static str,
    },
    /// The subscription is complete and live at `offset`.
    UpToDate {
        /// Subscription id.
        id: &'a str,
        /// Its position.
        offset: String,
        /// `up_to_date`.
        #[serde(rename = "type")]
        kind: &'static str,
    },
    /// The subscription restarts (a snapshot follows).
    MustRefetch {
        /// Subscription id.
        id: &'a str,
        /// Why (docs/protocol.md, "`must_refetch` reasons").
        reason: &'a str,
        /// `must_refetch`.
        #[serde(rename = "type")]
        kind: &'static str,
    },
    /// Something the client asked for failed.
    Error {
        /// Error code.
        code: &'a str,
        /// The subscription concerned.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        /// Explanation.
        message: &'a str,
        /// `error`.
        #[serde(rename = "type")]
        kind: &'static str,
    },
    /// Answer to `unsubscribe`.
    Unsubscribed {
        /// Subscription id.
        id: &'a str,
        /// `unsubscribed`.
        #[serde(rename = "type")]
        kind: &'static str,
    },
    /// Answer to `refresh_token`.
    TokenRefreshed {
        /// The new token's `exp`.
        expires_at: u64,
        /// `token_refreshed`.
        #[serde(rename = "type")]
        kind: &'static str,
    },
}

impl<'a> ServerMessage<'a> {
    /// `pong`.
    pub fn pong() -> Self {
        Self::Pong { kind: "pong" }
    }

    /// `up_to_date` at `offset`.
    pub fn up_to_date(id: &'a str, offset: Offset) -> Self {
        Self::UpToDate {
            id,
            offset: offset.to_string(),
            kind: "up_to_date",
        }
    }

    /// `must_refetch` with `reason`.
    pub fn must_refetch(id: &'a str, reason: &'a str) -> Self {
        Self::MustRefetch {
            id,
            reason,
            kind: "must_refetch",
        }
    }

    /// `error`.
    pub fn error(id: Option<&'a str>, code: &'a str, message: &'a str) -> Self {
        Self::Error {
            code,
            id,
            message,
            kind: "error",
        }
    }

    /// `unsubscribed`.
    pub fn unsubscribed(id: &'a str) -> Self {
        Self::Unsubscribed {
            id,
            kind: "unsubscribed",
        }
    }

    /// `token_refreshed`.
    pub fn token_refreshed(expires_at: u64) -> Self {
        Self::TokenRefreshed {
            expires_at,
            kind: "token_refreshed",
        }
    }

    /// The frame's text.
    pub fn to_text(&self) -> String {
        // Serialising these plain structs cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Builds one `txn` frame for a connection: every change of one transaction for each of the connection's
/// subscriptions that receives it.
pub struct TxnFrame {
    out: Vec<u8>,
    /// Bytes of `out` before the changes (rewritten by [`TxnFrame::finish_as_part`]).
    header: usize,
    changes: usize,
}

/// Writes a `txn` frame's fields before its changes: the offset on the transaction's last part only; with `part`,
/// the part number, and `"more": true` unless `last`.
fn write_txn_header(out: &mut Vec<u8>, txn: &UserTxn, part: Option<u32>, last: bool) {
    let _ = write!(
        out,
        "{{\"type\":\"txn\",\"xid\":\"{}\",\"lsn\":\"{}\",",
        txn.xid, txn.commit_lsn,
    );
    if last {
        let _ = write!(
            out,
            "\"offset\":\"{}\",",
            Offset {
                generation: txn.generation,
                lsn: txn.end_lsn.0,
            }
        );
    }
    if let Some(part) = part {
        let _ = write!(out, "\"part\":{part},");
        if !last {
            out.extend_from_slice(b"\"more\":true,");
        }
    }
    out.extend_from_slice(b"\"changes\":[");
}

impl TxnFrame {
    /// Starts the frame of `txn`. A transaction that came in parts gets one frame per part: each says its `part`
    /// number, those before the last say `"more": true` and carry no offset (the transaction's end is not known
    /// yet, and a client holding only some parts has no resumable position).
    pub fn new(txn: &UserTxn) -> Self {
        Self::numbered(txn, txn.is_split().then_some(txn.part))
    }

    /// Starts the frame of `txn` as the connection's part `part` of it (`None`: the transaction comes whole).
    pub fn numbered(txn: &UserTxn, part: Option<u32>) -> Self {
        let mut out = Vec::with_capacity(256);
        // Written straight into the buffer: no temporary strings per frame.
        write_txn_header(&mut out, txn, part, txn.last);
        Self {
            header: out.len(),
            out,
            changes: 0,
        }
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.out.len()
    }

    /// Whether no subscription received anything yet.
    pub fn is_empty(&self) -> bool {
        self.changes == 0
    }

    /// The frame's text as part `part` of `txn`, with more of it to follow on this connection (`"more": true`, no
    /// offset), whatever the frame was started as.
    pub fn finish_as_part(mut self, txn: &UserTxn, part: u32) -> String {
        let mut header = Vec::with_capacity(self.header + 16);
        write_txn_header(&mut header, txn, Some(part), false);
        self.out.splice(..self.header, header);
        self.finish_even_if_empty()
    }

    /// Adds subscription `id`'s share of `txn` (its changes on `table` that `filter` lets through, as inserts,
    /// updates or deletes from the subscription's point of view).
    pub fn add_changes(&mut self, id: &str, table: &str, filter: &Filter, txn: &UserTxn) {
        for change in txn.changes.iter().filter(|c| &*c.table == table) {
            let Some(op) = change.for_filter(filter) else {
                continue;
            };
            if self.changes > 0 {
                self.out.push(b',');
            }
            self.changes += 1;
            self.out.extend_from_slice(b"{\"id\":");
            write_json_str(&mut self.out, id);
            self.out.extend_from_slice(b",\"table\":");
            write_json_str(&mut self.out, table);
            self.out.extend_from_slice(match op {
                Op::Insert => b",\"op\":\"insert\",\"row\":".as_slice(),
                Op::Update => b",\"op\":\"update\",\"row\":".as_slice(),
                Op::Delete => b",\"op\":\"delete\",\"row\":".as_slice(),
            });
            self.out.extend_from_slice(change.row_json.as_bytes());
            if !change.unchanged.is_empty() && op == Op::Update {
                self.out.extend_from_slice(b",\"unchanged\":");
                let _ = serde_json::to_writer(&mut self.out, &change.unchanged);
            }
            self.out.push(b'}');
        }
    }

    /// The frame's text, or `None` when no subscription received anything.
    pub fn finish(self) -> Option<String> {
        if self.changes == 0 {
            return None;
        }
        Some(self.finish_even_if_empty())
    }

    /// The frame's text, also with no change (the last part of a transaction whose earlier parts were sent: it
    /// tells the client the transaction is complete, and where it ends).
    pub fn finish_even_if_empty(mut self) -> String {
        self.out.extend_from_slice(b"]}");
        // Once per transaction per connection: no copy of the frame.
        convert::into_string(self.out)
    }
}

/// Rows per `snapshot` frame, at most.
pub const SNAPSHOT_FRAME_ROWS: usize = 500;

/// A `snapshot` frame also ends once it holds this many bytes (a frame holds at least one row, whatever its size).
/// Rows were counted, not bytes: 500 rows of 4 MB (a text value compresses to a few KiB on disk, so a user can store
/// such rows cheaply) made one frame of 2 GB, built in the server's memory and then sent as one WebSocket message
/// that no browser accepts.
pub const SNAPSHOT_FRAME_BYTES: usize = 1024 * 1024;

/// Builds `{"type":"snapshot","id":…,"rows":[…]}` by appending rows.
pub struct SnapshotFrame {
    out: Vec<u8>,
    rows: usize,
}

impl SnapshotFrame {
    /// An empty frame for subscription `id`.
    pub fn new(id: &str) -> Self {
        let mut out = Vec::with_capacity(64 * 1024);
        out.extend_from_slice(b"{\"type\":\"snapshot\",\"id\":");
        write_json_str(&mut out, id);
        out.extend_from_slice(b",\"rows\":[");
        Self { out, rows: 0 }
    }

    /// Appends one row (`(name, type OID, text output)` per column) as JSON-typed values.
    pub fn push_row<'a>(&mut self, columns: impl Iterator<Item = (&'a str, u32, Option<&'a str>)>) {
        if self.rows > 0 {
            self.out.push(b',');
        }
        convert::write_row(&mut self.out, columns);
        self.rows += 1;
    }

    /// Rows in the frame so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Whether the frame is full: [`SNAPSHOT_FRAME_ROWS`] rows or [`SNAPSHOT_FRAME_BYTES`].
    pub fn is_full(&self) -> bool {
        self.rows >= SNAPSHOT_FRAME_ROWS || self.out.len() >= SNAPSHOT_FRAME_BYTES
    }

    /// The frame's text.
    pub fn finish(mut self) -> String {
        self.out.extend_from_slice(b"]}");
        convert::into_string(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_client_messages() {
        assert_eq!(
            ClientMessage::parse(r#"{"type":"ping","extra":1}"#),
            Ok(ClientMessage::Ping)
        );
        let Ok(ClientMessage::Subscribe(s)) = ClientMessage::parse(
            r#"{"type":"subscribe","id":"a","table":"works","where":{"x":1},"offset":"1-00000000000000ff"}"#,
        ) else {
            panic!("subscribe")
        };
        assert_eq!(s.id.as_deref(), Some("a"));
        assert_eq!(s.table.as_deref(), Some("works"));
        assert_eq!(s.filter, Some(json!({"x": 1})));
        assert_eq!(
            s.offset,
            OffsetField::Valid(Offset {
                generation: 1,
                lsn: 255
            })
        );
        let Ok(ClientMessage::Subscribe(s)) =
            ClientMessage::parse(r#"{"type":"subscribe","id":5,"table":7,"offset":"nope"}"#)
        else {
            panic!("lenient subscribe")
        };
        assert_eq!(
            (s.id, s.table, s.offset),
            (None, None, OffsetField::Invalid)
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"refresh_token"}"#),
            Ok(ClientMessage::RefreshToken { access_token: None })
        );
    }

    #[test]
    fn bad_client_messages() {
        let e = ClientMessage::parse("{nope").unwrap_err();
        assert_eq!((e.code, e.id), ("invalid_message", None));
        assert!(e.message.starts_with("not JSON"));
        let e = ClientMessage::parse(r#"{"type":"dance","id":"d"}"#).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("d"));
        assert_eq!(e.message, "unknown message type \"dance\"");
        let e = ClientMessage::parse("[1]").unwrap_err();
        assert_eq!(e.message, "unknown message type \"\"");
    }

    #[test]
    fn control_messages_keep_their_wire_form() {
        assert_eq!(ServerMessage::pong().to_text(), r#"{"type":"pong"}"#);
        let offset = Offset {
            generation: 1,
            lsn: 0x1a08a28,
        };
        assert_eq!(
            ServerMessage::up_to_date("my-works", offset).to_text(),
            r#"{"id":"my-works","offset":"1-0000000001a08a28","type":"up_to_date"}"#
        );
        assert_eq!(
            ServerMessage::must_refetch("works", "truncated").to_text(),
            r#"{"id":"works","reason":"truncated","type":"must_refetch"}"#
        );
        assert_eq!(
            ServerMessage::error(Some("z"), "invalid_where", "bad").to_text(),
            r#"{"code":"invalid_where","id":"z","message":"bad","type":"error"}"#
        );
        assert_eq!(
            ServerMessage::error(None, "invalid_message", "bad").to_text(),
            r#"{"code":"invalid_message","message":"bad","type":"error"}"#
        );
        assert_eq!(
            ServerMessage::unsubscribed("a").to_text(),
            r#"{"id":"a","type":"unsubscribed"}"#
        );
        assert_eq!(
            ServerMessage::token_refreshed(17).to_text(),
            r#"{"expires_at":17,"type":"token_refreshed"}"#
        );
    }

    #[test]
    fn snapshot_frames() {
        let mut f = SnapshotFrame::new("s");
        assert_eq!(f.rows(), 0);
        f.push_row([("id", 23, Some("1")), ("t", 25, None)].into_iter());
        f.push_row([("id", 23, Some("2")), ("t", 25, Some("x"))].into_iter());
        assert_eq!(
            f.finish(),
            r#"{"type":"snapshot","id":"s","rows":[{"id":1,"t":null},{"id":2,"t":"x"}]}"#
        );
        assert_eq!(
            SnapshotFrame::new("e").finish(),
            r#"{"type":"snapshot","id":"e","rows":[]}"#
        );
    }
}
