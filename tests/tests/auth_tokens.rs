//! Bearer tokens: every failure answers 401 with its own `error.code` and writes nothing; HS256, RS256 and EdDSA
//! (PEM public key or JWKS, keys generated with the `openssl` CLI at run time); `iss`/`aud` when configured; the
//! admin claim.

use std::path::Path;
use std::process::Command;

use deeprecall_sync::auth::{AuthConfig, AuthError, KeySource};
use deeprecall_tests::{EnvOptions, TEST_SECRET, TestEnv, count, error_code, insert, test_auth};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use uuid::Uuid;

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("sign")
}

fn hs256(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        None,
        claims,
        &EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
}

fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// An unsigned `alg: none` token (what an attacker sends).
fn alg_none(claims: &Value) -> String {
    let header = json!({"alg": "none", "typ": "JWT"});
    format!(
        "{}.{}.",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

/// Generates a private key with the openssl CLI; returns (private PEM, public PEM).
fn openssl_keypair(dir: &Path, name: &str, args: &[&str]) -> (Vec<u8>, Vec<u8>) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().expect(
            "the openssl CLI is needed to generate RSA/Ed25519 test keys (Debian package `openssl`)",
        );
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut gen_args = vec!["genpkey"];
    gen_args.extend_from_slice(args);
    gen_args.extend_from_slice(&["-out", private.to_str().unwrap()]);
    run(&gen_args);
    run(&[
        "pkey",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    (
        std::fs::read(private).unwrap(),
        std::fs::read(public).unwrap(),
    )
}

fn rsa(dir: &Path, name: &str) -> (Vec<u8>, Vec<u8>) {
    openssl_keypair(
        dir,
        name,
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    )
}

fn ed25519(dir: &Path, name: &str) -> (Vec<u8>, Vec<u8>) {
    openssl_keypair(dir, name, &["-algorithm", "ed25519"])
}

fn jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Jwk {
    let mut jwk = Jwk::from_encoding_key(key, alg).expect("jwk from key");
    jwk.common.key_id = Some(kid.to_owned());
    jwk
}

#[tokio::test]
async fn every_token_failure_is_401_with_its_reason_and_writes_nothing() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4().to_string();
    let t = now();
    let good = json!({"sub": user, "exp": t + 600});
    let mut tampered = hs256(&good);
    {
        // Same header and signature, different subject.
        let parts: Vec<&str> = tampered.split('.').collect();
        let forged = json!({"sub": Uuid::new_v4().to_string(), "exp": t + 600});
        tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64url(forged.to_string().as_bytes()),
            parts[2]
        );
    }
    let other_secret = EncodingKey::from_secret(b"another-secret-another-secret-another!");
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no header", None, "missing_token"),
        (
            "basic auth",
            Some("Basic dXNlcjpwYXNz".into()),
            "malformed_authorization_header",
        ),
        (
            "scheme only",
            Some("Bearer".into()),
            "malformed_authorization_header",
        ),
        (
            "other scheme",
            Some(format!("Token {}", hs256(&good))),
            "malformed_authorization_header",
        ),
        (
            "not a jwt",
            Some("Bearer not-a-jwt".into()),
            "malformed_token",
        ),
        (
            "garbage parts",
            Some("Bearer aaa.bbb.ccc".into()),
            "malformed_token",
        ),
        (
            "four parts",
            Some(format!("Bearer {}.x", hs256(&good))),
            "malformed_token",
        ),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                hs256(&json!({"sub": user, "exp": t - 3600}))
            )),
            "token_expired",
        ),
        (
            "not yet valid",
            Some(format!(
                "Bearer {}",
                hs256(&json!({"sub": user, "exp": t + 7200, "nbf": t + 3600}))
            )),
            "token_not_yet_valid",
        ),
        (
            "wrong secret",
            Some(format!(
                "Bearer {}",
                sign(Algorithm::HS256, None, &good, &other_secret)
            )),
            "invalid_signature",
        ),
        (
            "tampered claims",
            Some(format!("Bearer {tampered}")),
            "invalid_signature",
        ),
        (
            "alg none",
            Some(format!("Bearer {}", alg_none(&good))),
            "unsupported_algorithm",
        ),
        (
            "alg HS512 not configured",
            Some(format!(
                "Bearer {}",
                sign(
                    Algorithm::HS512,
                    None,
                    &good,
                    &EncodingKey::from_secret(TEST_SECRET.as_bytes())
                )
            )),
            "unsupported_algorithm",
        ),
        (
            "non-uuid sub",
            Some(format!(
                "Bearer {}",
                hs256(&json!({"sub": "alice@example.com", "exp": t + 600}))
            )),
            "invalid_subject",
        ),
        (
            "no exp",
            Some(format!("Bearer {}", hs256(&json!({"sub": user})))),
            "missing_claim",
        ),
        (
            "no sub",
            Some(format!("Bearer {}", hs256(&json!({"exp": t + 600})))),
            "missing_claim",
        ),
    ];
    let body = json!({"ops": [insert("works", json!({"title": "should not exist"}))]});
    for (name, authorization, want) in &cases {
        for path in ["/v1/batch", "/v1/blobs/coordinate"] {
            let (status, challenge, resp) = env
                .post_with_authorization(path, authorization.as_deref(), &body)
                .await;
            assert_eq!(status, 401, "{name} on {path}: {resp}");
            assert_eq!(error_code(&resp), *want, "{name} on {path}: {resp}");
            assert!(
                resp["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{name}: {resp}"
            );
            assert!(
                challenge.is_some_and(|c| c.starts_with("Bearer")),
                "{name}: WWW-Authenticate"
            );
        }
        let (status, resp) = env
            .get(&format!("/v1/blobs/{}", "a".repeat(64)), None)
            .await;
        assert_eq!((status.as_u16(), error_code(&resp)), (401, "missing_token"));
    }
    assert_eq!(count(&db, "select count(*) from works", &[]).await, 0);
    assert_eq!(
        count(&db, "select count(*) from sync_applied_ops", &[]).await,
        0
    );

    // The same request with a valid token goes through (so the 401s above were about the token alone).
    let (status, _, resp) = env
        .post_with_authorization(
            "/v1/batch",
            Some(&format!("Bearer {}", hs256(&good))),
            &body,
        )
        .await;
    assert_eq!(status, 200, "{resp}");
    // A token within the 30 s clock-skew leeway is still accepted.
    let skewed = hs256(&json!({"sub": user, "exp": t - 5}));
    let (status, resp) = env
        .post("/v1/batch", Some(&skewed), &json!({"ops": []}))
        .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(count(&db, "select count(*) from works", &[]).await, 1);
}

#[test]
fn issuer_and_audience_are_checked_only_when_configured() {
    let secret = KeySource::Secret(TEST_SECRET.as_bytes().to_vec());
    let strict = AuthConfig::new(
        vec![secret],
        Some("https://app.example".into()),
        Some("deeprecall-sync".into()),
        "role".into(),
        "admin".into(),
    )
    .unwrap();
    let lax = test_auth();
    let sub = Uuid::new_v4();
    let exp = now() + 600;
    let claims = |extra: Value| {
        let mut c = json!({"sub": sub.to_string(), "exp": exp});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        hs256(&c)
    };
    let ok = claims(json!({"iss": "https://app.example", "aud": "deeprecall-sync"}));
    assert_eq!(strict.verify(&ok).unwrap().user_id, sub);
    let aud_list =
        claims(json!({"iss": "https://app.example", "aud": ["other", "deeprecall-sync"]}));
    assert_eq!(strict.verify(&aud_list).unwrap().user_id, sub);
    let cases = [
        (
            json!({"iss": "https://evil.example", "aud": "deeprecall-sync"}),
            AuthError::InvalidIssuer,
        ),
        (
            json!({"aud": "deeprecall-sync"}),
            AuthError::MissingClaim("iss".into()),
        ),
        (
            json!({"iss": "https://app.example", "aud": "someone-else"}),
            AuthError::InvalidAudience,
        ),
        (
            json!({"iss": "https://app.example"}),
            AuthError::MissingClaim("aud".into()),
        ),
    ];
    for (extra, want) in cases {
        let token = claims(extra.clone());
        assert_eq!(strict.verify(&token), Err(want.clone()), "{extra}");
        assert_eq!(
            want.code(),
            match want {
                AuthError::InvalidIssuer => "invalid_issuer",
                AuthError::InvalidAudience => "invalid_audience",
                _ => "missing_claim",
            }
        );
        // Without iss/aud configured, the same token is fine.
        assert_eq!(lax.verify(&token).unwrap().user_id, sub, "{extra}");
    }
    // Minted tokens carry the configured iss/aud.
    assert_eq!(
        strict
            .verify(&strict.mint(sub, false, 60).unwrap())
            .unwrap()
            .user_id,
        sub
    );
    // A short HS256 secret is refused at configuration time.
    assert!(
        AuthConfig::new(
            vec![KeySource::Secret(b"short".to_vec())],
            None,
            None,
            "role".into(),
            "admin".into()
        )
        .is_err()
    );
}

#[test]
fn ed25519_pem_public_key_verifies_eddsa() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = ed25519(dir.path(), "ed");
    let (other_private, _) = ed25519(dir.path(), "ed2");
    let config = AuthConfig::new(
        vec![KeySource::PublicKeyPem(public)],
        None,
        None,
        "role".into(),
        "admin".into(),
    )
    .unwrap();
    let sub = Uuid::new_v4();
    let claims = json!({"sub": sub.to_string(), "exp": now() + 600, "role": "admin"});
    let user = config.verify(&sign(
        Algorithm::EdDSA,
        None,
        &claims,
        &EncodingKey::from_ed_pem(&private).unwrap(),
    ));
    let user = user.unwrap();
    assert_eq!(user.user_id, sub);
    assert!(user.admin);
    let forged = sign(
        Algorithm::EdDSA,
        None,
        &claims,
        &EncodingKey::from_ed_pem(&other_private).unwrap(),
    );
    assert_eq!(config.verify(&forged), Err(AuthError::InvalidSignature));
    // No HS256 secret configured: an HS256 token is not even considered.
    assert_eq!(
        config.verify(&hs256(&claims)).map_err(|e| e.code()),
        Err("unsupported_algorithm")
    );
}

#[tokio::test]
async fn rs256_and_eddsa_via_pem_and_jwks_with_issuer_and_audience() {
    let dir = tempfile::tempdir().unwrap();
    let (rsa_private, rsa_public) = rsa(dir.path(), "rsa");
    let (rsa2_private, _) = rsa(dir.path(), "rsa2");
    let (rogue_private, _) = rsa(dir.path(), "rogue");
    let (ed_private, _) = ed25519(dir.path(), "ed");
    let rsa_key = EncodingKey::from_rsa_pem(&rsa_private).unwrap();
    let rsa2_key = EncodingKey::from_rsa_pem(&rsa2_private).unwrap();
    let rogue_key = EncodingKey::from_rsa_pem(&rogue_private).unwrap();
    let ed_key = EncodingKey::from_ed_pem(&ed_private).unwrap();
    let jwks = JwkSet {
        keys: vec![
            jwk(&ed_key, Algorithm::EdDSA, "ed-1"),
            jwk(&rsa2_key, Algorithm::RS256, "rsa-2"),
        ],
    };
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, serde_json::to_string(&jwks).unwrap()).unwrap();

    let (iss, aud) = ("https://app.example", "deeprecall-sync");
    let auth = AuthConfig::new(
        vec![
            KeySource::PublicKeyPem(rsa_public.clone()),
            KeySource::Jwks(std::fs::read_to_string(&jwks_path).unwrap()),
        ],
        Some(iss.into()),
        Some(aud.into()),
        "role".into(),
        "admin".into(),
    )
    .unwrap();
    let env = TestEnv::start_with_auth(EnvOptions::default(), auth).await;
    let db = env.superuser().await;
    let claims = |sub: Uuid, extra: Value| {
        let mut c = json!({"sub": sub.to_string(), "exp": now() + 600, "iss": iss, "aud": aud});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };

    // Accepted: RS256 by the PEM key, RS256 and EdDSA by JWKS keys (chosen by kid); each write owned by its sub.
    let accepted = [
        (
            "RS256 via PEM",
            sign(
                Algorithm::RS256,
                None,
                &claims(Uuid::new_v4(), json!({})),
                &rsa_key,
            ),
        ),
        (
            "RS256 via JWKS",
            sign(
                Algorithm::RS256,
                Some("rsa-2"),
                &claims(Uuid::new_v4(), json!({})),
                &rsa2_key,
            ),
        ),
        (
            "EdDSA via JWKS",
            sign(
                Algorithm::EdDSA,
                Some("ed-1"),
                &claims(Uuid::new_v4(), json!({})),
                &ed_key,
            ),
        ),
    ];
    for (name, token) in &accepted {
        let sub: Uuid = env
            .auth
            .verify(token)
            .map(|u| u.user_id)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let id = Uuid::new_v4();
        let (status, body) = env
            .post(
                "/v1/batch",
                Some(token),
                &json!({"ops": [insert("works", json!({"id": id, "title": name}))]}),
            )
            .await;
        assert_eq!(status, 200, "{name}: {body}");
        let owner: Uuid = db
            .query_one("select owner_id from works where id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(owner, sub, "{name}");
    }

    let sub = Uuid::new_v4();
    let rejected = [
        (
            "unknown RSA key",
            sign(Algorithm::RS256, None, &claims(sub, json!({})), &rogue_key),
            "invalid_signature",
        ),
        (
            "unknown kid",
            sign(
                Algorithm::EdDSA,
                Some("ed-9"),
                &claims(sub, json!({})),
                &ed_key,
            ),
            "unknown_key",
        ),
        (
            "wrong issuer",
            sign(
                Algorithm::RS256,
                None,
                &claims(sub, json!({"iss": "https://evil.example"})),
                &rsa_key,
            ),
            "invalid_issuer",
        ),
        (
            "wrong audience",
            sign(
                Algorithm::RS256,
                None,
                &claims(sub, json!({"aud": "another-api"})),
                &rsa_key,
            ),
            "invalid_audience",
        ),
        (
            "no issuer",
            sign(
                Algorithm::RS256,
                None,
                &json!({"sub": sub.to_string(), "exp": now() + 600, "aud": aud}),
                &rsa_key,
            ),
            "missing_claim",
        ),
        (
            "expired RS256",
            sign(
                Algorithm::RS256,
                None,
                &claims(sub, json!({"exp": now() - 3600})),
                &rsa_key,
            ),
            "token_expired",
        ),
        (
            // Algorithm confusion: HMAC "signed" with the public key the server holds must not verify.
            "HS256 with the public key as secret",
            sign(
                Algorithm::HS256,
                None,
                &claims(sub, json!({})),
                &EncodingKey::from_secret(&rsa_public),
            ),
            "unsupported_algorithm",
        ),
        (
            "RS256 token labelled EdDSA key",
            sign(
                Algorithm::RS256,
                Some("ed-1"),
                &claims(sub, json!({})),
                &rogue_key,
            ),
            "invalid_signature",
        ),
    ];
    for (name, token, want) in &rejected {
        let (status, body) = env
            .post(
                "/v1/batch",
                Some(token),
                &json!({"ops": [insert("works", json!({"title": name}))]}),
            )
            .await;
        assert_eq!(
            (status.as_u16(), error_code(&body)),
            (401, *want),
            "{name}: {body}"
        );
    }
    assert_eq!(
        count(
            &db,
            "select count(*) from works where owner_id = $1",
            &[&sub]
        )
        .await,
        0
    );

    // The admin claim (default "role": "admin") opens the admin endpoint; without it: 403 forbidden.
    let admin = sign(
        Algorithm::EdDSA,
        Some("ed-1"),
        &claims(sub, json!({"role": "admin"})),
        &ed_key,
    );
    let (status, body) = env.get("/v1/admin/blobs", Some(&admin)).await;
    assert_eq!(status, 200, "{body}");
    let plain = sign(
        Algorithm::EdDSA,
        Some("ed-1"),
        &claims(sub, json!({"role": "user"})),
        &ed_key,
    );
    let (status, body) = env.get("/v1/admin/blobs", Some(&plain)).await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (403, "forbidden"),
        "{body}"
    );
    let listed = sign(
        Algorithm::RS256,
        None,
        &claims(sub, json!({"role": ["editor", "admin"]})),
        &rsa_key,
    );
    let (status, body) = env.get("/v1/admin/blobs", Some(&listed)).await;
    assert_eq!(status, 200, "array claim containing admin: {body}");
}
