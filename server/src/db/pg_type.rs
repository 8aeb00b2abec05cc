//! Built-in PostgreSQL type OIDs (`pg_type.oid`, fixed across versions) that the read path (rendering text output
//! as JSON) and the write path (decoding JSON into typed parameters) both need, and the element type of the array
//! types a schema commonly uses. One table, so the two paths cannot disagree on what an OID is.

/// `boolean`.
pub const BOOL: u32 = 16;
/// `name`.
pub const NAME: u32 = 19;
/// `bigint`.
pub const INT8: u32 = 20;
/// `smallint`.
pub const INT2: u32 = 21;
/// `integer`.
pub const INT4: u32 = 23;
/// `text`.
pub const TEXT: u32 = 25;
/// `oid`.
pub const OID: u32 = 26;
/// `json`.
pub const JSON: u32 = 114;
/// `real`.
pub const FLOAT4: u32 = 700;
/// `double precision`.
pub const FLOAT8: u32 = 701;
/// `character`.
pub const BPCHAR: u32 = 1042;
/// `character varying`.
pub const VARCHAR: u32 = 1043;
/// `date`.
pub const DATE: u32 = 1082;
/// `time without time zone`.
pub const TIME: u32 = 1083;
/// `timestamp without time zone`.
pub const TIMESTAMP: u32 = 1114;
/// `timestamp with time zone`.
pub const TIMESTAMPTZ: u32 = 1184;
/// `time with time zone`.
pub const TIMETZ: u32 = 1266;
/// `numeric`.
pub const NUMERIC: u32 = 1700;
/// `uuid`.
pub const UUID: u32 = 2950;
/// `jsonb`.
pub const JSONB: u32 = 3802;

/// The element type of a one-dimensional array type, for the array types of the types above.
pub fn array_element(type_oid: u32) -> Option<u32> {
    Some(match type_oid {
        1000 => BOOL,
        1003 => NAME,
        1005 => INT2,
        1007 => INT4,
        1016 => INT8,
        1009 => TEXT,
        1014 => BPCHAR,
        1015 => VARCHAR,
        1021 => FLOAT4,
        1022 => FLOAT8,
        199 => JSON,
        3807 => JSONB,
        1182 => DATE,
        1115 => TIMESTAMP,
        1185 => TIMESTAMPTZ,
        1231 => NUMERIC,
        2951 => UUID,
        _ => return None,
    })
}
