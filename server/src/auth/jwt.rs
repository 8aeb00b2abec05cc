//! JWT verification and (for development) minting.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Value, json};
use uuid::Uuid;

/// Where verification keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// HS256 shared secret (raw bytes of the configured string).
    Secret(Vec<u8>),
    /// A PEM public key (RSA → RS256/384/512, EC → ES256/384, Ed25519 → EdDSA).
    PublicKeyPem(Vec<u8>),
    /// A JWKS document (`{"keys": [...]}`), selected by the token's `kid`.
    Jwks(String),
}

struct VerifyKey {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// Verification settings (from `serve`/`dev` flags).
pub struct AuthConfig {
    keys: Vec<VerifyKey>,
    issuer: Option<String>,
    audience: Option<String>,
    admin_claim: String,
    admin_value: String,
    leeway_secs: u64,
    signing_secret: Option<Vec<u8>>,
    verified: std::sync::Mutex<Verified>,
}

/// Tokens verified recently. A client sends the same token with every request for most of its lifetime; checking
/// it again each time (two header parses, the signature, the claims as a JSON tree) cost about 20 µs of the ~250 µs
/// of server CPU a 1-op batch takes. Only successes are kept, keyed by the whole token (never a hash of it: a
/// collision must not authenticate a different token), each until its `exp` (plus the leeway) or [`VERIFIED_TTL`],
/// whichever comes first. The keys cannot change while the process runs, so a cached answer is the one a fresh
/// check would give: the expiry is the only thing that changes with time (`nbf` only becomes more true). Bounded
/// in entries and in token size; when full, expired entries go, and if none had, all of them (the next requests
/// verify as if there were no cache).
#[derive(Default)]
struct Verified {
    /// Token → (caller, unix second from which the entry no longer counts).
    tokens: std::collections::HashMap<Box<str>, (AuthUser, u64)>,
}

/// How long a verified token is taken on trust before it is checked again, seconds.
const VERIFIED_TTL: u64 = 60;
/// Verified tokens kept at most.
const VERIFIED_MAX_ENTRIES: usize = 10_000;
/// Longer tokens are verified every time (10,000 × 2 KiB bounds the cache at about 20 MiB).
const VERIFIED_MAX_TOKEN_BYTES: usize = 2048;

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("admin_claim", &self.admin_claim)
            .finish_non_exhaustive()
    }
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthUser {
    /// The user's id (`sub`).
    pub user_id: Uuid,
    /// Whether the admin claim is present.
    pub admin: bool,
    /// Token expiry (unix seconds).
    pub expires_at: u64,
}

/// Why a request was not authenticated. Every variant answers 401 with `{"error": {"code", "message"}}`, except
/// `Forbidden` (403: authenticated but not allowed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token at all.
    #[error("missing bearer token: send `Authorization: Bearer <jwt>`")]
    Missing,
    /// The Authorization header is not `Bearer <token>`.
    #[error("malformed Authorization header: expected `Bearer <jwt>`")]
    MalformedHeader,
    /// Not a JWT (three base64url parts with JSON header and claims).
    #[error("malformed token: {0}")]
    Malformed(String),
    /// `alg: none` or an algorithm the configured keys do not support.
    #[error("unsupported token algorithm `{0}`")]
    UnsupportedAlgorithm(String),
    /// Signature does not verify.
    #[error("invalid token signature")]
    InvalidSignature,
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not yet valid (nbf is in the future)")]
    NotYetValid,
    /// A required claim is missing.
    #[error("token lacks the required claim `{0}`")]
    MissingClaim(String),
    /// `iss` does not match.
    #[error("token issuer is not accepted")]
    InvalidIssuer,
    /// `aud` does not match.
    #[error("token audience is not accepted")]
    InvalidAudience,
    /// `sub` is not a UUID in canonical form.
    #[error("token subject (sub) must be a UUID in canonical form (lowercase, hyphenated)")]
    InvalidSubject,
    /// The header has a `crit` parameter (extensions this server does not understand).
    #[error("token header has critical extensions (crit) this server does not support")]
    UnsupportedCritical,
    /// No key matches the token's `kid`.
    #[error("no verification key for this token's kid")]
    UnknownKey,
    /// Authenticated, but the operation needs the admin claim.
    #[error("this endpoint requires an admin token")]
    Forbidden,
}

impl AuthError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing => "missing_token",
            Self::MalformedHeader => "malformed_authorization_header",
            Self::Malformed(_) => "malformed_token",
            Self::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            Self::InvalidSignature => "invalid_signature",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::MissingClaim(_) => "missing_claim",
            Self::InvalidIssuer => "invalid_issuer",
            Self::InvalidAudience => "invalid_audience",
            Self::InvalidSubject => "invalid_subject",
            Self::UnsupportedCritical => "unsupported_critical_header",
            Self::UnknownKey => "unknown_key",
            Self::Forbidden => "forbidden",
        }
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let status = if self == Self::Forbidden {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNAUTHORIZED
        };
        let body = Json(json!({ "error": { "code": self.code(), "message": self.to_string() } }));
        let mut resp = (status, body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"deeprecall-sync\""),
            );
        }
        resp
    }
}

/// Error building an [`AuthConfig`] from operator settings.
#[derive(Debug, thiserror::Error)]
#[error("invalid JWT configuration: {0}")]
pub struct ConfigError(String);

impl AuthConfig {
    /// Builds the verifier. `admin_claim`/`admin_value`: the claim that marks an admin (default `"role": "admin"`;
    /// an array claim containing the value counts too).
    pub fn new(
        sources: Vec<KeySource>,
        issuer: Option<String>,
        audience: Option<String>,
        admin_claim: String,
        admin_value: String,
    ) -> Result<Self, ConfigError> {
        let mut keys = Vec::new();
        let mut signing_secret = None;
        for source in sources {
            match source {
                KeySource::Secret(secret) => {
                    if secret.len() < 32 {
                        return Err(ConfigError(
                            "the HS256 secret must be at least 32 bytes".into(),
                        ));
                    }
                    keys.push(VerifyKey {
                        kid: None,
                        key: DecodingKey::from_secret(&secret),
                        algorithms: vec![Algorithm::HS256],
                    });
                    signing_secret = Some(secret);
                }
                KeySource::PublicKeyPem(pem) => keys.push(pem_key(&pem)?),
                KeySource::Jwks(text) => {
                    let set: JwkSet = serde_json::from_str(&text)
                        .map_err(|e| ConfigError(format!("JWKS is not valid: {e}")))?;
                    for jwk in &set.keys {
                        let key = DecodingKey::from_jwk(jwk)
                            .map_err(|e| ConfigError(format!("JWKS key unusable: {e}")))?;
                        let algorithms = match jwk.common.key_algorithm {
                            Some(alg) => {
                                vec![alg.to_string().parse::<Algorithm>().map_err(|_| {
                                    ConfigError(format!("JWKS key algorithm {alg} unsupported"))
                                })?]
                            }
                            None => family_algorithms(key.family()),
                        };
                        keys.push(VerifyKey {
                            kid: jwk.common.key_id.clone(),
                            key,
                            algorithms,
                        });
                    }
                }
            }
        }
        if keys.is_empty() {
            return Err(ConfigError(
                "no verification key: set --jwt-secret, --jwt-public-key-file or --jwks-file"
                    .into(),
            ));
        }
        Ok(Self {
            keys,
            issuer,
            audience,
            admin_claim,
            admin_value,
            leeway_secs: 30,
            signing_secret,
            verified: std::sync::Mutex::default(),
        })
    }

    /// Verifies a token and returns the caller. Every rejection is counted by reason (`metrics::jwt_rejected`).
    pub fn verify(&self, token: &str) -> Result<AuthUser, AuthError> {
        self.verify_at(token, jsonwebtoken::get_current_timestamp())
    }

    /// [`Self::verify`], with `now` (unix seconds) deciding whether a cached answer still counts and how long a new
    /// one is kept; the full check itself reads the clock, as jsonwebtoken does.
    fn verify_at(&self, token: &str, now: u64) -> Result<AuthUser, AuthError> {
        if let Ok(verified) = self.verified.lock()
            && let Some((user, until)) = verified.tokens.get(token)
            && now < *until
        {
            return Ok(user.clone());
        }
        let user = self
            .verify_uncounted(token)
            .inspect_err(|e| crate::metrics::jwt_rejected(e.code()))?;
        // jsonwebtoken rejects a token once `exp < now - leeway`, so it is valid through `exp + leeway`.
        let until = (now + VERIFIED_TTL).min(user.expires_at.saturating_add(self.leeway_secs + 1));
        if token.len() <= VERIFIED_MAX_TOKEN_BYTES
            && until > now
            && let Ok(mut verified) = self.verified.lock()
        {
            if verified.tokens.len() >= VERIFIED_MAX_ENTRIES {
                verified.tokens.retain(|_, (_, until)| now < *until);
                if verified.tokens.len() >= VERIFIED_MAX_ENTRIES {
                    verified.tokens.clear();
                }
            }
            verified.tokens.insert(token.into(), (user.clone(), until));
        }
        Ok(user)
    }

    fn verify_uncounted(&self, token: &str) -> Result<AuthUser, AuthError> {
        let alg = header_alg(token)?;
        if alg.eq_ignore_ascii_case("none") {
            return Err(AuthError::UnsupportedAlgorithm(alg));
        }
        let algorithm: Algorithm = alg
            .parse()
            .map_err(|_| AuthError::UnsupportedAlgorithm(alg.clone()))?;
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            // The library's text stays in the log: a client learns what is wrong, not how we parse.
            tracing::debug!(error = %e, "token header rejected");
            AuthError::Malformed("the header is not a valid JWT header".into())
        })?;
        let candidates: Vec<&VerifyKey> = self
            .keys
            .iter()
            .filter(|k| k.algorithms.contains(&algorithm))
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(
                if self.keys.iter().any(|k| k.algorithms.contains(&algorithm)) {
                    AuthError::UnknownKey
                } else {
                    AuthError::UnsupportedAlgorithm(alg)
                },
            );
        }
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.leeway_secs;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        if let Some(aud) = &self.audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        } else {
            validation.validate_aud = false;
        }
        validation.set_required_spec_claims(&required);
        let mut last = AuthError::InvalidSignature;
        for key in candidates {
            match jsonwebtoken::decode::<Value>(token, &key.key, &validation) {
                Ok(data) => return self.user_from_claims(&data.claims),
                Err(e) => {
                    last = map_error(e.kind());
                    if last != AuthError::InvalidSignature {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    fn user_from_claims(&self, claims: &Value) -> Result<AuthUser, AuthError> {
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or(AuthError::InvalidSubject)?;
        let user_id = Uuid::parse_str(sub).map_err(|_| AuthError::InvalidSubject)?;
        // One user, one spelling: `Uuid::parse_str` also takes uppercase, braces, `urn:uuid:` and unhyphenated
        // forms, which would let differently written subjects (perhaps different users to the token issuer)
        // silently become the same user here.
        if user_id.hyphenated().to_string() != sub {
            return Err(AuthError::InvalidSubject);
        }
        let admin = match claims.get(&self.admin_claim) {
            Some(Value::String(s)) => *s == self.admin_value,
            Some(Value::Array(items)) => items
                .iter()
                .any(|v| v.as_str() == Some(self.admin_value.as_str())),
            Some(Value::Bool(b)) => *b && self.admin_value == "true",
            _ => false,
        };
        let expires_at = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
        Ok(AuthUser {
            user_id,
            admin,
            expires_at,
        })
    }

    /// Mints an HS256 token with the configured secret (development and tests; production tokens come from the
    /// app's auth backend). Returns None when no secret is configured.
    pub fn mint(&self, user_id: Uuid, admin: bool, ttl_secs: u64) -> Option<String> {
        let secret = self.signing_secret.as_ref()?;
        let now = jsonwebtoken::get_current_timestamp();
        let mut claims =
            json!({ "sub": user_id.to_string(), "iat": now, "exp": now.saturating_add(ttl_secs) });
        if admin {
            claims[&self.admin_claim] = json!(self.admin_value);
        }
        if let Some(iss) = &self.issuer {
            claims["iss"] = json!(iss);
        }
        if let Some(aud) = &self.audience {
            claims["aud"] = json!(aud);
        }
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .ok()
    }
}

/// A `DecodingKey::from_*_pem` constructor.
type PemParser = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;

fn pem_key(pem: &[u8]) -> Result<VerifyKey, ConfigError> {
    let text = String::from_utf8_lossy(pem);
    let attempts: [(PemParser, AlgorithmFamily); 3] = [
        (DecodingKey::from_rsa_pem, AlgorithmFamily::Rsa),
        (DecodingKey::from_ed_pem, AlgorithmFamily::Ed),
        (DecodingKey::from_ec_pem, AlgorithmFamily::Ec),
    ];
    for (parse, family) in attempts {
        if let Ok(key) = parse(pem) {
            return Ok(VerifyKey {
                kid: None,
                key,
                algorithms: family_algorithms(family),
            });
        }
    }
    let first = text.lines().next().unwrap_or("");
    Err(ConfigError(format!(
        "public key is not an RSA, EC or Ed25519 PEM public key (starts with {first:?})"
    )))
}

fn family_algorithms(family: AlgorithmFamily) -> Vec<Algorithm> {
    match family {
        AlgorithmFamily::Hmac => vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
        AlgorithmFamily::Rsa => vec![Algorithm::RS256, Algorithm::RS384, Algorithm::RS512],
        AlgorithmFamily::Ec => vec![Algorithm::ES256, Algorithm::ES384],
        AlgorithmFamily::Ed => vec![Algorithm::EdDSA],
    }
}

/// Reads `alg` from the header ourselves: jsonwebtoken cannot represent `none`, and we want to say so.
fn header_alg(token: &str) -> Result<String, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed(
            "a JWT has three dot-separated parts".into(),
        ));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed("header is not base64url".into()))?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|_| AuthError::Malformed("header is not JSON".into()))?;
    // RFC 7515 §4.1.11: a recipient must reject a token whose `crit` names extensions it does not understand, and
    // this server understands none.
    if value.get("crit").is_some() {
        return Err(AuthError::UnsupportedCritical);
    }
    value
        .get("alg")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| AuthError::Malformed("header has no alg".into()))
}

fn map_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::InvalidSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::InvalidIssuer,
        ErrorKind::InvalidAudience => AuthError::InvalidAudience,
        ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName => AuthError::UnsupportedAlgorithm("mismatch".into()),
        ErrorKind::InvalidClaimFormat(c) => {
            AuthError::Malformed(format!("claim `{c}` has the wrong type"))
        }
        other => {
            tracing::debug!(error = ?other, "token rejected");
            AuthError::Malformed("the token could not be decoded".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AuthConfig {
        AuthConfig::new(
            vec![KeySource::Secret(
                b"0123456789abcdef0123456789abcdef".to_vec(),
            )],
            None,
            None,
            "role".into(),
            "admin".into(),
        )
        .unwrap()
    }

    fn sign(claims: Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn a_verified_token_is_kept_until_its_expiry_or_the_ttl() {
        let c = config();
        let now = jsonwebtoken::get_current_timestamp();
        let id = Uuid::new_v4();
        let secret = b"0123456789abcdef0123456789abcdef";
        let long = sign(json!({"sub": id.to_string(), "exp": now + 3600}), secret);
        let short = sign(json!({"sub": id.to_string(), "exp": now + 5}), secret);
        assert_eq!(c.verify_at(&long, now).unwrap().user_id, id);
        assert_eq!(c.verify_at(&short, now).unwrap().user_id, id);
        let until = |t: &str| c.verified.lock().unwrap().tokens.get(t).map(|e| e.1);
        assert_eq!(until(&long), Some(now + VERIFIED_TTL));
        // Valid through exp + leeway, as jsonwebtoken counts it: never longer from the cache.
        assert_eq!(until(&short), Some(now + 5 + c.leeway_secs + 1));
        // Another token of the same user, or the cached one altered, is checked on its own.
        let mut forged = long.clone();
        forged.pop();
        // The last of an HS256 signature's 43 base64url characters carries 4 bits and two zero bits: 'A' (000000) and
        // 'E' (000100) both keep those zero, so the signature still decodes and is merely wrong. ('B' did not: the
        // test failed as "malformed" whenever the signature happened to end in 'A', one run in sixteen.)
        forged.push(if long.ends_with('A') { 'E' } else { 'A' });
        assert_eq!(c.verify_at(&forged, now), Err(AuthError::InvalidSignature));
        assert!(until(&forged).is_none());
        // Past the entry's end it is verified again (here: still valid on the real clock) and kept anew.
        assert!(c.verify_at(&long, now + VERIFIED_TTL).is_ok());
        assert_eq!(until(&long), Some(now + 2 * VERIFIED_TTL));
    }

    #[test]
    fn rejected_tokens_are_not_kept_and_the_cache_is_bounded() {
        let c = config();
        let now = jsonwebtoken::get_current_timestamp();
        let secret = b"0123456789abcdef0123456789abcdef";
        let expired = sign(
            json!({"sub": Uuid::new_v4().to_string(), "exp": now - 3600}),
            secret,
        );
        assert!(c.verify_at(&expired, now).is_err());
        assert!(c.verified.lock().unwrap().tokens.is_empty());
        for i in 0..=VERIFIED_MAX_ENTRIES as u64 {
            let token = sign(
                json!({"sub": Uuid::new_v4().to_string(), "exp": now + 3600 + i}),
                secret,
            );
            c.verify_at(&token, now).unwrap();
        }
        let kept = c.verified.lock().unwrap().tokens.len();
        assert!((1..=VERIFIED_MAX_ENTRIES).contains(&kept), "{kept}");
    }

    #[test]
    fn minted_token_verifies_with_admin_flag() {
        let c = config();
        let id = Uuid::new_v4();
        let user = c.verify(&c.mint(id, true, 60).unwrap()).unwrap();
        assert_eq!(user.user_id, id);
        assert!(user.admin);
        assert!(!c.verify(&c.mint(id, false, 60).unwrap()).unwrap().admin);
    }

    #[test]
    fn each_failure_has_its_reason() {
        let c = config();
        let now = jsonwebtoken::get_current_timestamp();
        let secret = b"0123456789abcdef0123456789abcdef";
        let sub = Uuid::new_v4().to_string();
        assert_eq!(
            c.verify(&sign(json!({"sub": sub, "exp": now - 3600}), secret)),
            Err(AuthError::Expired)
        );
        assert_eq!(
            c.verify(&sign(
                json!({"sub": sub, "exp": now + 3600, "nbf": now + 1800}),
                secret
            )),
            Err(AuthError::NotYetValid)
        );
        assert_eq!(
            c.verify(&sign(
                json!({"sub": sub, "exp": now + 60}),
                b"another-secret-another-secret-xx"
            )),
            Err(AuthError::InvalidSignature)
        );
        assert_eq!(
            c.verify(&sign(json!({"sub": "alice", "exp": now + 60}), secret)),
            Err(AuthError::InvalidSubject)
        );
        assert_eq!(
            c.verify(&sign(json!({"sub": sub}), secret)),
            Err(AuthError::MissingClaim("exp".into()))
        );
        assert!(matches!(c.verify("abc"), Err(AuthError::Malformed(_))));
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&json!({"sub": sub, "exp": now + 60}))
        );
        assert_eq!(
            c.verify(&none),
            Err(AuthError::UnsupportedAlgorithm("none".into()))
        );
    }

    #[test]
    fn non_canonical_subjects_and_critical_headers_are_refused() {
        let c = config();
        let now = jsonwebtoken::get_current_timestamp();
        let secret = b"0123456789abcdef0123456789abcdef";
        let id = Uuid::new_v4();
        for sub in [
            id.hyphenated().to_string().to_uppercase(),
            format!("{{{id}}}"),
            format!("urn:uuid:{id}"),
            id.simple().to_string(),
        ] {
            assert_eq!(
                c.verify(&sign(json!({"sub": sub, "exp": now + 60}), secret)),
                Err(AuthError::InvalidSubject),
                "{sub}"
            );
        }
        let mut header = Header::new(Algorithm::HS256);
        header.crit = Some(vec!["exp".into()]);
        let crit = jsonwebtoken::encode(
            &header,
            &json!({"sub": id.to_string(), "exp": now + 60}),
            &EncodingKey::from_secret(secret),
        )
        .unwrap();
        assert_eq!(c.verify(&crit), Err(AuthError::UnsupportedCritical));
        assert_eq!(
            c.verify(&sign(
                json!({"sub": id.to_string(), "exp": now + 60}),
                secret
            ))
            .map(|u| u.user_id),
            Ok(id)
        );
    }
}
