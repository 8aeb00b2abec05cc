//! pgoutput wire format, protocol version 1: one message's bytes in, one [`PgOutputMessage`] out.
//!
//! The layout follows PostgreSQL 15's "Logical Replication Message Formats" (section 55.9). Only the
//! messages protocol version 1 sends are decoded; the streaming (`S`, `E`, `c`, `A`) and two-phase
//! (`b`, `P`, `K`, `r`, `p`) messages of later versions or options are rejected, because accepting
//! them silently would mean interleaved, uncommitted changes slipping through as if committed.
//!
//! Decoding never panics and never trusts a length or count field: every read is checked against
//! the bytes that remain, and no allocation is sized by a field before the bytes backing it have
//! been seen. Column values are zero-copy slices of the input [`Bytes`].

use std::fmt;
use std::str::FromStr;

use bytes::{Buf, Bytes};

/// A position in the write-ahead log, shown the way Postgres shows it (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Why a string is not an LSN in Postgres' `X/X` notation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal numbers of 1 to 8 digits separated by '/'")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        // Same bounds as Postgres' pg_lsn_in: 1..=8 hex digits per half, nothing else
        // (from_str_radix alone would also accept a leading '+').
        let half = |part: &str| -> Result<u64, ParseLsnError> {
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u32::from_str_radix(part, 16)
                .map(u64::from)
                .map_err(|_| err())
        };
        Ok(Lsn((half(hi)? << 32) | half(lo)?))
    }
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputMessage {
    /// Start of a committed transaction; its changes follow, then [`PgOutputMessage::Commit`].
    Begin {
        /// LSN of the commit record (equal to the following Commit's `commit_lsn`).
        final_lsn: Lsn,
        /// Commit time in microseconds since 2000-01-01 00:00 UTC.
        commit_time_micros: i64,
        /// 32-bit transaction id.
        xid: u32,
    },
    /// End of the transaction opened by the last Begin.
    Commit {
        /// Unused by Postgres 15 (always 0).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// LSN just past the commit record: the position to acknowledge once handled.
        end_lsn: Lsn,
        /// Commit time in microseconds since 2000-01-01 00:00 UTC.
        commit_time_micros: i64,
    },
    /// The transaction was replayed from another node (replication origin).
    Origin {
        /// LSN of the commit on the origin server.
        lsn: Lsn,
        /// Name of the origin.
        name: String,
    },
    /// Describes a table; sent before its first change and again after DDL or reconnect.
    Relation(RelationBody),
    /// Describes a non-builtin data type used by a following Relation.
    Type {
        /// OID of the type.
        oid: u32,
        /// Schema of the type, empty for `pg_catalog`.
        namespace: String,
        /// Name of the type.
        name: String,
    },
    /// A row was inserted.
    Insert {
        /// OID of the table, as in the Relation message.
        relation_oid: u32,
        /// The new row.
        new: TupleData,
    },
    /// A row was updated.
    Update {
        /// OID of the table, as in the Relation message.
        relation_oid: u32,
        /// Full old row ('O'), sent under `REPLICA IDENTITY FULL`.
        old: Option<TupleData>,
        /// Old replica-identity key ('K'), sent when a key column changed; other columns are null.
        key: Option<TupleData>,
        /// The new row; may hold unchanged-TOAST placeholders.
        new: TupleData,
    },
    /// A row was deleted; exactly one of `old` and `key` is present.
    Delete {
        /// OID of the table, as in the Relation message.
        relation_oid: u32,
        /// Full old row ('O'), sent under `REPLICA IDENTITY FULL`.
        old: Option<TupleData>,
        /// Old replica-identity key ('K'); other columns are null.
        key: Option<TupleData>,
    },
    /// One TRUNCATE statement over one or more tables.
    Truncate {
        /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
        options: u8,
        /// OIDs of every truncated table.
        relation_oids: Vec<u32>,
    },
    /// A `pg_logical_emit_message` call.
    Message {
        /// Whether the message belongs to the surrounding transaction.
        transactional: bool,
        /// LSN of the message.
        lsn: Lsn,
        /// Prefix given by the caller.
        prefix: String,
        /// Arbitrary content.
        content: Vec<u8>,
    },
}

/// Body of a Relation message: a table's identity and columns as the stream will send them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationBody {
    /// OID of the table; changes refer to it.
    pub oid: u32,
    /// Schema name, empty for `pg_catalog`.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// `relreplident`: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Published columns in tuple order (generated columns are not sent).
    pub columns: Vec<ColumnDef>,
}

/// One column of a [`RelationBody`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnDef {
    /// Bit 1 set: the column is part of the replica identity key.
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// OID of the column's type.
    pub type_oid: u32,
    /// `atttypmod` of the column.
    pub type_modifier: i32,
}

impl ColumnDef {
    /// Whether the column is part of the replica identity key.
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// The column values of one tuple, in the Relation's column order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData(pub Vec<ColumnValue>);

/// One column value inside a [`TupleData`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnValue {
    /// SQL NULL ('n').
    Null,
    /// An out-of-line value the change did not touch ('u'); its content is not sent.
    UnchangedToast,
    /// Text-format value ('t'), in the server encoding.
    Text(Bytes),
    /// Binary-format value ('b'), only when the `binary` option is on.
    Binary(Bytes),
}

/// Why bytes are not a valid pgoutput v1 message. Never transient: the stream is corrupt or not
/// what this decoder supports, so retrying the same bytes cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended before a field was complete.
    #[error("message truncated reading {what}: needed {needed} bytes, {remaining} left")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes that were left.
        remaining: usize,
    },
    /// A string field has no terminating NUL.
    #[error("unterminated string reading {what}")]
    UnterminatedString {
        /// The field being read.
        what: &'static str,
    },
    /// A string field is not UTF-8.
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field being read.
        what: &'static str,
    },
    /// The first byte names no known message.
    #[error("unknown pgoutput message tag 0x{0:02x}")]
    UnknownTag(u8),
    /// A known message that protocol version 1 without streaming or two-phase never sends.
    #[error("unsupported pgoutput message {name} ('{}'): read the slot with proto_version 1, no streaming, no two_phase", char::from(*tag))]
    UnsupportedTag {
        /// The tag byte.
        tag: u8,
        /// What the tag means in later protocol versions.
        name: &'static str,
    },
    /// A column value's kind byte is not `n`, `u`, `t` or `b`.
    #[error("invalid tuple column kind 0x{0:02x}")]
    InvalidColumnKind(u8),
    /// A tuple marker (`N`, `K`, `O`) was expected but another byte was found.
    #[error("expected tuple marker {expected}, found 0x{found:02x}")]
    InvalidTupleMarker {
        /// Markers allowed at this point.
        expected: &'static str,
        /// The byte found.
        found: u8,
    },
    /// A length or count field is negative.
    #[error("negative {what}: {value}")]
    NegativeLength {
        /// The field being read.
        what: &'static str,
        /// The value read.
        value: i64,
    },
    /// Bytes remain after a complete message.
    #[error("{remaining} trailing bytes after message '{}'", char::from(*tag))]
    TrailingBytes {
        /// Tag of the message.
        tag: u8,
        /// Bytes left over.
        remaining: usize,
    },
}

/// Decodes one pgoutput message; copies `buf` once so values can be shared slices of it.
pub fn parse(buf: &[u8]) -> Result<PgOutputMessage, DecodeError> {
    parse_bytes(Bytes::copy_from_slice(buf))
}

/// Decodes one pgoutput message without copying column values out of `buf`.
pub fn parse_bytes(buf: Bytes) -> Result<PgOutputMessage, DecodeError> {
    let mut r = Reader { buf };
    let tag = r.u8("message tag")?;
    let msg = match tag {
        b'B' => PgOutputMessage::Begin {
            final_lsn: r.lsn("Begin final LSN")?,
            commit_time_micros: r.i64("Begin commit time")?,
            xid: r.u32("Begin xid")?,
        },
        b'C' => PgOutputMessage::Commit {
            flags: r.u8("Commit flags")?,
            commit_lsn: r.lsn("Commit LSN")?,
            end_lsn: r.lsn("Commit end LSN")?,
            commit_time_micros: r.i64("Commit time")?,
        },
        b'O' => PgOutputMessage::Origin {
            lsn: r.lsn("Origin LSN")?,
            name: r.string("Origin name")?,
        },
        b'R' => PgOutputMessage::Relation(relation(&mut r)?),
        b'Y' => PgOutputMessage::Type {
            oid: r.u32("Type OID")?,
            namespace: r.string("Type namespace")?,
            name: r.string("Type name")?,
        },
        b'I' => {
            let relation_oid = r.u32("Insert relation OID")?;
            r.marker(b"N", "'N'")?;
            PgOutputMessage::Insert {
                relation_oid,
                new: tuple(&mut r)?,
            }
        }
        b'U' => {
            let relation_oid = r.u32("Update relation OID")?;
            let (mut old, mut key) = (None, None);
            match r.marker(b"KON", "'K', 'O' or 'N'")? {
                b'K' => key = Some(tuple(&mut r)?),
                b'O' => old = Some(tuple(&mut r)?),
                _ => {} // 'N': no old data, the new tuple follows directly.
            }
            if old.is_some() || key.is_some() {
                r.marker(b"N", "'N'")?;
            }
            PgOutputMessage::Update {
                relation_oid,
                old,
                key,
                new: tuple(&mut r)?,
            }
        }
        b'D' => {
            let relation_oid = r.u32("Delete relation OID")?;
            let is_key = r.marker(b"KO", "'K' or 'O'")? == b'K';
            let data = tuple(&mut r)?;
            let (old, key) = if is_key {
                (None, Some(data))
            } else {
                (Some(data), None)
            };
            PgOutputMessage::Delete {
                relation_oid,
                old,
                key,
            }
        }
        b'T' => {
            let count = r.count_i32("Truncate relation count")?;
            let options = r.u8("Truncate options")?;
            // Check the whole OID array is present before allocating for it.
            r.need(count.saturating_mul(4), "Truncate relation OIDs")?;
            let mut relation_oids = Vec::with_capacity(count);
            for _ in 0..count {
                relation_oids.push(r.u32("Truncate relation OID")?);
            }
            PgOutputMessage::Truncate {
                options,
                relation_oids,
            }
        }
        b'M' => {
            let flags = r.u8("Message flags")?;
            let lsn = r.lsn("Message LSN")?;
            let prefix = r.string("Message prefix")?;
            let len = r.count_i32("Message content length")?;
            let content = r.take(len, "Message content")?.to_vec();
            PgOutputMessage::Message {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content,
            }
        }
        b'S' | b'E' | b'c' | b'A' | b'b' | b'P' | b'K' | b'r' | b'p' => {
            let name = match tag {
                b'S' => "Stream Start",
                b'E' => "Stream Stop",
                b'c' => "Stream Commit",
                b'A' => "Stream Abort",
                b'b' => "Begin Prepare",
                b'P' => "Prepare",
                b'K' => "Commit Prepared",
                b'r' => "Rollback Prepared",
                _ => "Stream Prepare",
            };
            return Err(DecodeError::UnsupportedTag { tag, name });
        }
        other => return Err(DecodeError::UnknownTag(other)),
    };
    if !r.buf.is_empty() {
        return Err(DecodeError::TrailingBytes {
            tag,
            remaining: r.buf.len(),
        });
    }
    Ok(msg)
}

fn relation(r: &mut Reader) -> Result<RelationBody, DecodeError> {
    let oid = r.u32("Relation OID")?;
    let namespace = r.string("Relation namespace")?;
    let name = r.string("Relation name")?;
    let replica_identity = r.u8("Relation replica identity")?;
    let count = usize::from(r.u16("Relation column count")?);
    // Each column takes at least 10 bytes (flags, NUL, type OID, typmod): bound the
    // allocation by what the buffer could hold, not by the count field.
    let mut columns = Vec::with_capacity(count.min(r.buf.len() / 10));
    for _ in 0..count {
        columns.push(ColumnDef {
            flags: r.u8("column flags")?,
            name: r.string("column name")?,
            type_oid: r.u32("column type OID")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(RelationBody {
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn tuple(r: &mut Reader) -> Result<TupleData, DecodeError> {
    let count = usize::from(r.u16("tuple column count")?);
    // Each value takes at least its kind byte.
    let mut values = Vec::with_capacity(count.min(r.buf.len()));
    for _ in 0..count {
        let value = match r.u8("tuple column kind")? {
            b'n' => ColumnValue::Null,
            b'u' => ColumnValue::UnchangedToast,
            b't' => {
                let len = r.count_i32("text value length")?;
                ColumnValue::Text(r.take(len, "text value")?)
            }
            b'b' => {
                let len = r.count_i32("binary value length")?;
                ColumnValue::Binary(r.take(len, "binary value")?)
            }
            other => return Err(DecodeError::InvalidColumnKind(other)),
        };
        values.push(value);
    }
    Ok(TupleData(values))
}

/// Checked big-endian reads over the unread rest of a message.
struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, needed: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.len() < needed {
            return Err(DecodeError::Truncated {
                what,
                needed,
                remaining: self.buf.len(),
            });
        }
        Ok(())
    }

    // Each getter checks the length first, so the `bytes::Buf` getters cannot panic.
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_i32())
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.need(8, what)?;
        Ok(self.buf.get_i64())
    }

    fn lsn(&mut self, what: &'static str) -> Result<Lsn, DecodeError> {
        self.need(8, what)?;
        Ok(Lsn(self.buf.get_u64()))
    }

    /// An Int32 length or count that must not be negative.
    fn count_i32(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let value = self.i32(what)?;
        usize::try_from(value).map_err(|_| DecodeError::NegativeLength {
            what,
            value: i64::from(value),
        })
    }

    fn take(&mut self, len: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        self.need(len, what)?;
        Ok(self.buf.split_to(len))
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::UnterminatedString { what })?;
        let raw = self.buf.split_to(end);
        self.buf.advance(1); // the NUL found above
        match std::str::from_utf8(&raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(DecodeError::InvalidUtf8 { what }),
        }
    }

    /// One tuple marker byte out of `allowed`.
    fn marker(&mut self, allowed: &[u8], expected: &'static str) -> Result<u8, DecodeError> {
        let found = self.u8("tuple marker")?;
        if allowed.contains(&found) {
            Ok(found)
        } else {
            Err(DecodeError::InvalidTupleMarker { expected, found })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds messages field by field, the way pgoutput writes them.
    struct Msg(Vec<u8>);

    impl Msg {
        fn tag(t: u8) -> Self {
            Msg(vec![t])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn u16(mut self, v: u16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn s(mut self, v: &str) -> Self {
            self.0.extend_from_slice(v.as_bytes());
            self.0.push(0);
            self
        }
        fn raw(mut self, v: &[u8]) -> Self {
            self.0.extend_from_slice(v);
            self
        }
        fn text(self, v: &str) -> Self {
            self.u8(b't').i32(v.len() as i32).raw(v.as_bytes())
        }
        fn done(self) -> Vec<u8> {
            self.0
        }
    }

    fn text(v: &str) -> ColumnValue {
        ColumnValue::Text(Bytes::copy_from_slice(v.as_bytes()))
    }

    /// Every message kind, for the prefix and trailing-byte sweeps.
    fn samples() -> Vec<Vec<u8>> {
        vec![
            begin_bytes(),
            commit_bytes(),
            Msg::tag(b'O').u64(0xABCD_EF01).s("upstream").done(),
            relation_bytes(),
            Msg::tag(b'Y').u32(16385).s("public").s("mood").done(),
            Msg::tag(b'I')
                .u32(16390)
                .u8(b'N')
                .u16(4)
                .text("1")
                .u8(b'n')
                .u8(b'u')
                .u8(b'b')
                .i32(2)
                .raw(&[0, 0xFF])
                .done(),
            Msg::tag(b'U')
                .u32(16390)
                .u8(b'K')
                .u16(2)
                .text("1")
                .u8(b'n')
                .u8(b'N')
                .u16(2)
                .text("2")
                .u8(b'u')
                .done(),
            Msg::tag(b'U')
                .u32(16390)
                .u8(b'O')
                .u16(1)
                .text("a")
                .u8(b'N')
                .u16(1)
                .text("b")
                .done(),
            Msg::tag(b'U').u32(16390).u8(b'N').u16(1).text("b").done(),
            Msg::tag(b'D').u32(16390).u8(b'K').u16(1).text("1").done(),
            Msg::tag(b'D').u32(16390).u8(b'O').u16(1).text("1").done(),
            Msg::tag(b'T').i32(2).u8(3).u32(16390).u32(16400).done(),
            Msg::tag(b'M')
                .u8(1)
                .u64(0x0153_66A8)
                .s("deeprecall")
                .i32(3)
                .raw(b"hey")
                .done(),
        ]
    }

    fn begin_bytes() -> Vec<u8> {
        Msg::tag(b'B')
            .u64(0x0000_0001_0153_5FF0)
            .u64(0x0003_044C_B8D9_DDEE)
            .u32(731)
            .done()
    }

    fn commit_bytes() -> Vec<u8> {
        Msg::tag(b'C')
            .u8(0)
            .u64(0x0153_5FF0)
            .u64(0x0153_6038)
            .u64(0x0003_044C_B8D9_DDEE)
            .done()
    }

    fn relation_bytes() -> Vec<u8> {
        Msg::tag(b'R')
            .u32(16390)
            .s("public")
            .s("items")
            .u8(b'd')
            .u16(2)
            .u8(1)
            .s("id")
            .u32(20)
            .i32(-1)
            .u8(0)
            .s("title")
            .u32(1043)
            .i32(68)
            .done()
    }

    #[test]
    fn lsn_display_matches_postgres() {
        assert_eq!(Lsn(0x16B_3748).to_string(), "0/16B3748");
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
    }

    #[test]
    fn lsn_parse_round_trips_and_rejects_garbage() {
        for lsn in [0, 0x16B_3748, 0x16_B374_D848, u64::MAX] {
            assert_eq!(Lsn(lsn).to_string().parse::<Lsn>(), Ok(Lsn(lsn)));
        }
        assert_eq!("16/b374d848".parse::<Lsn>(), Ok(Lsn(0x16_B374_D848)));
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "0",
            "0/0/0",
            "+1/0",
            "0/-1",
            "1 /0",
            "123456789/0",
            "g/0",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn begin_and_commit() {
        assert_eq!(
            parse(&begin_bytes()),
            Ok(PgOutputMessage::Begin {
                final_lsn: Lsn(0x0000_0001_0153_5FF0),
                commit_time_micros: 0x0003_044C_B8D9_DDEE,
                xid: 731,
            })
        );
        assert_eq!(
            parse(&commit_bytes()),
            Ok(PgOutputMessage::Commit {
                flags: 0,
                commit_lsn: Lsn(0x0153_5FF0),
                end_lsn: Lsn(0x0153_6038),
                commit_time_micros: 0x0003_044C_B8D9_DDEE,
            })
        );
    }

    #[test]
    fn origin_and_type() {
        assert_eq!(
            parse(&Msg::tag(b'O').u64(7).s("upstream").done()),
            Ok(PgOutputMessage::Origin {
                lsn: Lsn(7),
                name: "upstream".into()
            })
        );
        // Types in pg_catalog come with an empty namespace.
        assert_eq!(
            parse(&Msg::tag(b'Y').u32(16385).s("").s("mood").done()),
            Ok(PgOutputMessage::Type {
                oid: 16385,
                namespace: String::new(),
                name: "mood".into()
            })
        );
    }

    #[test]
    fn relation() {
        let PgOutputMessage::Relation(rel) = parse(&relation_bytes()).unwrap() else {
            panic!("not a relation");
        };
        assert_eq!(rel.oid, 16390);
        assert_eq!(rel.namespace, "public");
        assert_eq!(rel.name, "items");
        assert_eq!(rel.replica_identity, b'd');
        assert_eq!(
            rel.columns,
            vec![
                ColumnDef {
                    flags: 1,
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1
                },
                ColumnDef {
                    flags: 0,
                    name: "title".into(),
                    type_oid: 1043,
                    type_modifier: 68
                },
            ]
        );
        assert!(rel.columns[0].is_key());
        assert!(!rel.columns[1].is_key());
    }

    #[test]
    fn relation_with_no_columns() {
        let bytes = Msg::tag(b'R').u32(1).s("").s("t").u8(b'n').u16(0).done();
        let PgOutputMessage::Relation(rel) = parse(&bytes).unwrap() else {
            panic!("not a relation");
        };
        assert!(rel.columns.is_empty());
        assert_eq!(rel.namespace, "");
    }

    #[test]
    fn insert_with_every_column_kind() {
        let bytes = Msg::tag(b'I')
            .u32(16390)
            .u8(b'N')
            .u16(5)
            .text("1")
            .u8(b'n')
            .u8(b'u')
            .u8(b'b')
            .i32(2)
            .raw(&[0, 0xFF])
            .text("") // empty text is a value, not null
            .done();
        assert_eq!(
            parse(&bytes),
            Ok(PgOutputMessage::Insert {
                relation_oid: 16390,
                new: TupleData(vec![
                    text("1"),
                    ColumnValue::Null,
                    ColumnValue::UnchangedToast,
                    ColumnValue::Binary(Bytes::from_static(&[0, 0xFF])),
                    text(""),
                ]),
            })
        );
    }

    #[test]
    fn update_with_key_old_or_neither() {
        let with_key = Msg::tag(b'U')
            .u32(5)
            .u8(b'K')
            .u16(2)
            .text("1")
            .u8(b'n')
            .u8(b'N')
            .u16(2)
            .text("2")
            .u8(b'u')
            .done();
        assert_eq!(
            parse(&with_key),
            Ok(PgOutputMessage::Update {
                relation_oid: 5,
                old: None,
                key: Some(TupleData(vec![text("1"), ColumnValue::Null])),
                new: TupleData(vec![text("2"), ColumnValue::UnchangedToast]),
            })
        );

        let with_old = Msg::tag(b'U')
            .u32(5)
            .u8(b'O')
            .u16(1)
            .text("a")
            .u8(b'N')
            .u16(1)
            .text("b")
            .done();
        assert_eq!(
            parse(&with_old),
            Ok(PgOutputMessage::Update {
                relation_oid: 5,
                old: Some(TupleData(vec![text("a")])),
                key: None,
                new: TupleData(vec![text("b")]),
            })
        );

        let new_only = Msg::tag(b'U').u32(5).u8(b'N').u16(1).text("b").done();
        assert_eq!(
            parse(&new_only),
            Ok(PgOutputMessage::Update {
                relation_oid: 5,
                old: None,
                key: None,
                new: TupleData(vec![text("b")]),
            })
        );
    }

    #[test]
    fn update_rejects_missing_or_doubled_markers() {
        // 'K' tuple not followed by 'N'.
        let bytes = Msg::tag(b'U')
            .u32(5)
            .u8(b'K')
            .u16(1)
            .text("1")
            .u8(b'O')
            .u16(1)
            .text("1")
            .done();
        assert_eq!(
            parse(&bytes),
            Err(DecodeError::InvalidTupleMarker {
                expected: "'N'",
                found: b'O'
            })
        );
        let bytes = Msg::tag(b'U').u32(5).u8(b'X').done();
        assert!(matches!(
            parse(&bytes),
            Err(DecodeError::InvalidTupleMarker { found: b'X', .. })
        ));
    }

    #[test]
    fn delete_with_key_or_old() {
        let key = Msg::tag(b'D').u32(5).u8(b'K').u16(1).text("1").done();
        assert_eq!(
            parse(&key),
            Ok(PgOutputMessage::Delete {
                relation_oid: 5,
                old: None,
                key: Some(TupleData(vec![text("1")])),
            })
        );
        let old = Msg::tag(b'D').u32(5).u8(b'O').u16(1).u8(b'n').done();
        assert_eq!(
            parse(&old),
            Ok(PgOutputMessage::Delete {
                relation_oid: 5,
                old: Some(TupleData(vec![ColumnValue::Null])),
                key: None,
            })
        );
        // A delete always carries old data; 'N' is not allowed.
        let bad = Msg::tag(b'D').u32(5).u8(b'N').u16(0).done();
        assert!(matches!(
            parse(&bad),
            Err(DecodeError::InvalidTupleMarker { found: b'N', .. })
        ));
    }

    #[test]
    fn truncate() {
        let bytes = Msg::tag(b'T').i32(2).u8(3).u32(16390).u32(16400).done();
        assert_eq!(
            parse(&bytes),
            Ok(PgOutputMessage::Truncate {
                options: 3,
                relation_oids: vec![16390, 16400]
            })
        );
        let none = Msg::tag(b'T').i32(0).u8(0).done();
        assert_eq!(
            parse(&none),
            Ok(PgOutputMessage::Truncate {
                options: 0,
                relation_oids: vec![]
            })
        );
    }

    #[test]
    fn message_transactional_and_not() {
        let bytes = Msg::tag(b'M')
            .u8(1)
            .u64(9)
            .s("deeprecall")
            .i32(3)
            .raw(b"hey")
            .done();
        assert_eq!(
            parse(&bytes),
            Ok(PgOutputMessage::Message {
                transactional: true,
                lsn: Lsn(9),
                prefix: "deeprecall".into(),
                content: b"hey".to_vec()
            })
        );
        let bytes = Msg::tag(b'M')
            .u8(0)
            .u64(9)
            .s("p")
            .i32(2)
            .raw(&[0, 0xFF])
            .done();
        assert_eq!(
            parse(&bytes),
            Ok(PgOutputMessage::Message {
                transactional: false,
                lsn: Lsn(9),
                prefix: "p".into(),
                content: vec![0, 0xFF]
            })
        );
    }

    #[test]
    fn every_strict_prefix_is_an_error() {
        for sample in samples() {
            assert!(parse(&sample).is_ok(), "sample {sample:02x?} must parse");
            for len in 0..sample.len() {
                let prefix = sample.get(..len).unwrap();
                assert!(
                    parse(prefix).is_err(),
                    "prefix of {len} bytes of {sample:02x?} parsed"
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        for mut sample in samples() {
            let tag = sample[0];
            sample.push(0);
            assert_eq!(
                parse(&sample),
                Err(DecodeError::TrailingBytes { tag, remaining: 1 }),
            );
        }
    }

    #[test]
    fn truncated_reports_the_field() {
        assert_eq!(
            parse(&[]),
            Err(DecodeError::Truncated {
                what: "message tag",
                needed: 1,
                remaining: 0
            })
        );
        assert_eq!(
            parse(&[b'B', 0, 0]),
            Err(DecodeError::Truncated {
                what: "Begin final LSN",
                needed: 8,
                remaining: 2
            })
        );
    }

    #[test]
    fn unknown_and_unsupported_tags() {
        assert_eq!(parse(b"Z"), Err(DecodeError::UnknownTag(b'Z')));
        assert_eq!(parse(&[0]), Err(DecodeError::UnknownTag(0)));
        assert!(matches!(
            parse(b"S\0\0\0\x01\x01"),
            Err(DecodeError::UnsupportedTag {
                tag: b'S',
                name: "Stream Start"
            })
        ));
        for tag in *b"SEcAbPKrp" {
            assert!(matches!(
                parse(&[tag]),
                Err(DecodeError::UnsupportedTag { .. })
            ));
        }
    }

    #[test]
    fn invalid_column_kind() {
        let bytes = Msg::tag(b'I').u32(1).u8(b'N').u16(1).u8(b'x').done();
        assert_eq!(parse(&bytes), Err(DecodeError::InvalidColumnKind(b'x')));
    }

    #[test]
    fn strings_must_be_terminated_and_utf8() {
        let unterminated = Msg::tag(b'O').u64(1).raw(b"abc").done();
        assert_eq!(
            parse(&unterminated),
            Err(DecodeError::UnterminatedString {
                what: "Origin name"
            })
        );
        let latin1 = Msg::tag(b'O').u64(1).raw(&[0xE9, 0]).done();
        assert_eq!(
            parse(&latin1),
            Err(DecodeError::InvalidUtf8 {
                what: "Origin name"
            })
        );
    }

    #[test]
    fn huge_or_negative_lengths_do_not_allocate_or_panic() {
        // Lengths far beyond the buffer are truncation, not an allocation.
        let text = Msg::tag(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .i32(i32::MAX)
            .done();
        assert!(matches!(
            parse(&text),
            Err(DecodeError::Truncated {
                what: "text value",
                ..
            })
        ));
        let negative = Msg::tag(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b'b')
            .i32(-1)
            .done();
        assert_eq!(
            parse(&negative),
            Err(DecodeError::NegativeLength {
                what: "binary value length",
                value: -1
            })
        );
        let truncate = Msg::tag(b'T').i32(i32::MAX).u8(0).done();
        assert!(matches!(
            parse(&truncate),
            Err(DecodeError::Truncated {
                what: "Truncate relation OIDs",
                ..
            })
        ));
        let truncate = Msg::tag(b'T').i32(-5).u8(0).done();
        assert!(matches!(
            parse(&truncate),
            Err(DecodeError::NegativeLength { .. })
        ));
        let message = Msg::tag(b'M').u8(0).u64(0).s("").i32(i32::MAX).done();
        assert!(matches!(
            parse(&message),
            Err(DecodeError::Truncated { .. })
        ));
        let columns = Msg::tag(b'R')
            .u32(1)
            .s("")
            .s("t")
            .u8(b'd')
            .u16(u16::MAX)
            .done();
        assert!(matches!(
            parse(&columns),
            Err(DecodeError::Truncated { .. })
        ));
        let values = Msg::tag(b'I').u32(1).u8(b'N').u16(u16::MAX).done();
        assert!(matches!(parse(&values), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn values_share_the_input_buffer() {
        let bytes = Bytes::from(Msg::tag(b'I').u32(1).u8(b'N').u16(1).text("hello").done());
        let start = bytes.as_ptr() as usize;
        let Ok(PgOutputMessage::Insert { new, .. }) = parse_bytes(bytes.clone()) else {
            panic!("not an insert");
        };
        let [ColumnValue::Text(value)] = new.0.as_slice() else {
            panic!("not one text value");
        };
        assert_eq!(value.as_ptr() as usize, start + bytes.len() - 5);
    }

    #[test]
    fn pseudo_random_bytes_never_panic() {
        // Cheap in-tree stand-in for the fuzz target: mutate valid samples with a fixed LCG.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize
        };
        for sample in samples() {
            for _ in 0..2_000 {
                let mut bytes = sample.clone();
                for _ in 0..1 + next() % 4 {
                    let at = next() % bytes.len();
                    bytes[at] = next() as u8;
                }
                let _ = parse(&bytes);
            }
        }
    }
}
