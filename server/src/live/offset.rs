//! Stream offsets: opaque to clients, `<generation>-<lsn as 16 hex digits>` inside.
//!
//! The LSN is a position in the server's processed stream: a client holding offset O has received (or got in a
//! snapshot) every change of its subscription that committed with an end LSN <= O. The generation changes when
//! the replication slot had to be recreated: offsets of an older generation cannot be served (changes were lost
//! while the slot was gone) and get `must_refetch`.

use std::fmt;
use std::str::FromStr;

/// A resumable position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset {
    /// Slot generation.
    pub generation: i64,
    /// Stream position (WAL LSN).
    pub lsn: u64,
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{:016x}", self.generation, self.lsn)
    }
}

/// The offset string is not one this server issues.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed offset")]
pub struct BadOffset;

impl FromStr for Offset {
    type Err = BadOffset;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (generation, lsn) = s.split_once('-').ok_or(BadOffset)?;
        if lsn.len() != 16 {
            return Err(BadOffset);
        }
        Ok(Self {
            generation: generation.parse().map_err(|_| BadOffset)?,
            lsn: u64::from_str_radix(lsn, 16).map_err(|_| BadOffset)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let o = Offset {
            generation: 3,
            lsn: 0x16B3748,
        };
        assert_eq!(o.to_string(), "3-00000000016b3748");
        assert_eq!(o.to_string().parse::<Offset>(), Ok(o));
        for bad in [
            "",
            "3",
            "x-00000000016b3748",
            "3-16b3748",
            "3-zzzzzzzzzzzzzzzz",
        ] {
            assert_eq!(bad.parse::<Offset>(), Err(BadOffset), "{bad}");
        }
    }
}
