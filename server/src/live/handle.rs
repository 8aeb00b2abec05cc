//! Shape handles of the HTTP shape endpoint: stateless, signed, unique forever (docs/decisions.md, "Shape handles
//! and offsets").
//!
//! `<slot generation>-<nonce: 32 hex>-<tag: 32 hex>`, where the tag is an HMAC-SHA256 (truncated to 128 bits) over
//! the generation, the nonce, the user and the shape's definition hash, keyed with a secret kept in the database
//! (`deeprecall_shape_keys`, sql/0004). So:
//!
//! - a handle is bound to one user and one definition (table, canonical filter, columns, replica) without the
//!   server remembering anything: another user's handle, or one of another definition, does not verify;
//! - it survives a restart (the key is in the database) and works on every server of the same database;
//! - every snapshot mints a fresh nonce, so a handle is never issued twice — the client remembers expired handles
//!   per URL, not per user, and would take a reissued one for a stale cached response.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the signing key.
pub const KEY_BYTES: usize = 32;

/// The handle signing key.
#[derive(Clone)]
pub struct HandleKey([u8; KEY_BYTES]);

impl std::fmt::Debug for HandleKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandleKey(..)")
    }
}

/// A handle that is malformed, forged, or not for this user and definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown shape handle")]
pub struct BadHandle;

impl HandleKey {
    /// A key from its bytes (`None` unless exactly [`KEY_BYTES`]).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }

    fn tag(
        &self,
        generation: i64,
        nonce: &[u8; 16],
        user: Uuid,
        definition: &[u8; 32],
    ) -> HmacSha256 {
        // Any key length is valid for HMAC.
        let mut mac =
            <HmacSha256 as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(b"deeprecall-shape-handle/1\0");
        mac.update(&generation.to_be_bytes());
        mac.update(nonce);
        mac.update(user.as_bytes());
        mac.update(definition);
        mac
    }

    /// A new handle for `user`'s shape with `definition` hash in slot generation `generation`.
    pub fn mint(&self, generation: i64, user: Uuid, definition: &[u8; 32]) -> String {
        let nonce = *Uuid::new_v4().as_bytes();
        let tag = self
            .tag(generation, &nonce, user, definition)
            .finalize()
            .into_bytes();
        format!("{generation}-{}-{}", hex(&nonce), hex(&tag[..16]))
    }

    /// The generation of `handle` if this server issued it for `user` and `definition`.
    pub fn verify(
        &self,
        handle: &str,
        user: Uuid,
        definition: &[u8; 32],
    ) -> Result<i64, BadHandle> {
        let mut parts = handle.splitn(3, '-');
        let (Some(generation), Some(nonce), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(BadHandle);
        };
        let generation: i64 = generation.parse().map_err(|_| BadHandle)?;
        let nonce: [u8; 16] = unhex(nonce)
            .and_then(|n| n.try_into().ok())
            .ok_or(BadHandle)?;
        let tag = unhex(tag).filter(|t| t.len() == 16).ok_or(BadHandle)?;
        // Constant-time comparison of the truncated tag.
        self.tag(generation, &nonce, user, definition)
            .verify_truncated_left(&tag)
            .map_err(|_| BadHandle)?;
        Ok(generation)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_to_user_definition_and_key() {
        let key = HandleKey::from_bytes(&[7; 32]).unwrap();
        let (alice, bob) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let (works, notes) = ([1u8; 32], [2u8; 32]);
        let h = key.mint(3, alice, &works);
        assert_eq!(key.verify(&h, alice, &works), Ok(3));
        assert_eq!(key.verify(&h, bob, &works), Err(BadHandle));
        assert_eq!(key.verify(&h, alice, &notes), Err(BadHandle));
        let other = HandleKey::from_bytes(&[8; 32]).unwrap();
        assert_eq!(other.verify(&h, alice, &works), Err(BadHandle));
        // Unique per mint.
        assert_ne!(h, key.mint(3, alice, &works));
        // Tampering with the generation breaks the tag.
        let forged = h.replacen("3-", "4-", 1);
        assert_eq!(key.verify(&forged, alice, &works), Err(BadHandle));
        for junk in [
            "",
            "3",
            "3-zz-zz",
            "x-00-00",
            "3-00112233445566778899aabbccddeeff-00",
        ] {
            assert_eq!(key.verify(junk, alice, &works), Err(BadHandle), "{junk}");
        }
        assert!(HandleKey::from_bytes(&[0; 5]).is_none());
    }
}
