//! Bearer-token authentication.
//!
//! Tokens are JWTs signed with HS256 (shared secret) or RS256/ES256/EdDSA (a PEM public key or a JWKS file).
//! `sub` is the user's UUID and `exp` is required. NextAuth session cookies are encrypted JWEs, not JWTs: the app
//! must mint a signed API token for us (docs/api.md shows how).

mod jwt;

pub use jwt::{AuthConfig, AuthError, AuthUser, KeySource};

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use std::sync::Arc;

/// Extracts the authenticated user from `Authorization: Bearer <jwt>` (or, on `/v1/stream` only, for browsers'
/// WebSockets, which cannot set headers, the `access_token` query parameter).
impl<S> FromRequestParts<S> for AuthUser
where
    Arc<AuthConfig>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let config = Arc::<AuthConfig>::from_ref(state);
        // `verify` counts its own rejections; a missing or malformed header is counted here.
        let token = bearer_token(parts).inspect_err(|e| crate::metrics::jwt_rejected(e.code()))?;
        config.verify(&token)
    }
}

fn bearer_token(parts: &Parts) -> Result<String, AuthError> {
    if let Some(value) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| AuthError::MalformedHeader)?;
        let (scheme, token) = value.split_once(' ').ok_or(AuthError::MalformedHeader)?;
        if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
            return Err(AuthError::MalformedHeader);
        }
        return Ok(token.trim().to_owned());
    }
    // Only the WebSocket upgrade accepts a token in the URL (browsers cannot set headers there); elsewhere a
    // token in the URL would just end up in access logs.
    if let Some(query) = parts
        .uri
        .query()
        .filter(|_| parts.uri.path() == "/v1/stream")
    {
        for pair in query.split('&') {
            if let Some(v) = pair.strip_prefix("access_token=") {
                return Ok(v.to_owned());
            }
        }
    }
    Err(AuthError::Missing)
}
