//! TLS to Postgres: libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` in DATABASE_URL, with rustls.
//!
//! ```text
//!  DATABASE_URL ──► split_url ──► URL without ssl* params ──► tokio_postgres::Config (ssl_mode: disable/prefer/require)
//!                        └──────► TlsSettings (mode, root, client cert) ──┬─► connector(): pool, watcher, slot admin
//!                                                                         └─► StreamConfig.tls: replication
//! ```
//!
//! `tokio-postgres` parses `sslmode` itself but knows only `disable`, `prefer` and `require`, and no `sslrootcert`:
//! it rejects `verify-full` and every other `ssl*` key. So the TLS parameters are taken out of the URL here, the
//! rest goes to `tokio-postgres`, and its `ssl_mode` is set to what it can express (`require` for the verifying
//! modes: a connection attempted without our connector then fails instead of falling back to plain TCP). What is
//! verified lives in the rustls configuration built by [`connector`]:
//!
//! - `disable`: no TLS; `prefer`: TLS when the server offers it; `require`: always TLS. Without a root certificate
//!   these encrypt without verifying the server (as libpq does). With one (explicit, or libpq's default
//!   `~/.postgresql/root.crt`), the chain is verified, as libpq does.
//! - `verify-ca`: the chain must lead to a root in `sslrootcert`; the host name is not checked.
//! - `verify-full`: chain as `verify-ca`, and the certificate must name the host of the URL (`host`, not `hostaddr`;
//!   an IP address is checked against the certificate's IP addresses).
//! - `sslrootcert=system`: the operating system's CA bundle (found the way OpenSSL finds it).
//!
//! One crypto provider, `ring`, is named explicitly: `pgwire-replication` (the replication connection) uses it, and
//! naming it keeps the process-wide default out of the picture.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use deeprecall_replication::stream::{SslMode, TlsSettings};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The connector every ordinary (non-replication) connection to Postgres uses.
pub type PgConnector = MakeRustlsConnect;

/// DATABASE_URL cannot be used as given.
#[derive(Debug, thiserror::Error)]
pub enum DbUrlError {
    /// `tokio-postgres` rejected the URL (after the TLS parameters were taken out).
    #[error("{0}")]
    Invalid(#[from] tokio_postgres::Error),
    /// A TLS parameter has a value we do not understand, or is not supported.
    #[error("{0}")]
    Tls(String),
}

/// libpq's TLS parameters that this module handles; `sslnegotiation` stays with `tokio-postgres`.
const TLS_KEYS: &[&str] = &["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// libpq TLS parameters we do not implement: refused by name rather than reported as "unknown option".
const UNSUPPORTED_TLS_KEYS: &[&str] = &[
    "sslcrl",
    "sslcrldir",
    "sslpassword",
    "sslcertmode",
    "sslcompression",
    "sslsni",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "requiressl",
];

/// Splits DATABASE_URL (`postgres://…` or libpq's `key=value` form) into the `tokio-postgres` settings and the TLS
/// settings.
pub fn split_url(url: &str) -> Result<(tokio_postgres::Config, TlsSettings), DbUrlError> {
    let (rest, params) = if let Some(body) = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    {
        let scheme = &url[..url.len() - body.len()];
        let (rest, params) = split_uri_params(body)?;
        (format!("{scheme}{rest}"), params)
    } else {
        split_key_value_params(url)?
    };
    let mut config: tokio_postgres::Config = rest.parse()?;
    let tls = tls_settings(&params)?;
    config.ssl_mode(match tls.mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    });
    Ok((config, tls))
}

/// Takes the TLS parameters out of a URL's query string (the part after the credentials and host, as
/// `tokio-postgres` reads it: credentials end at the first `@`, the query starts at the next `?`).
fn split_uri_params(body: &str) -> Result<(String, Vec<(String, String)>), DbUrlError> {
    let after_credentials = body.find('@').map_or(0, |at| at + 1);
    let Some(q) = body[after_credentials..].find('?') else {
        return Ok((body.to_owned(), Vec::new()));
    };
    let q = after_credentials + q;
    let (head, query) = (&body[..q], &body[q + 1..]);
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(key)?;
        if TLS_KEYS.contains(&key.as_str()) || UNSUPPORTED_TLS_KEYS.contains(&key.as_str()) {
            taken.push((key, decode(value)?));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        head.to_owned()
    } else {
        format!("{head}?{}", kept.join("&"))
    };
    Ok((rest, taken))
}

fn decode(s: &str) -> Result<String, DbUrlError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| {
            DbUrlError::Tls(format!(
                "DATABASE_URL: {s:?} is not valid percent-encoded UTF-8"
            ))
        })
}

/// Takes the TLS parameters out of libpq's `key=value key='quoted value'` form.
fn split_key_value_params(s: &str) -> Result<(String, Vec<(String, String)>), DbUrlError> {
    // A tokenizer for libpq's connection-string syntax: written out because no crate parses it on its own, and
    // tokio-postgres's parser is private. Whitespace around `=` is allowed; a value is either bare (up to the next
    // whitespace) or single-quoted with `\'` and `\\` escapes.
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut kept: Vec<&str> = Vec::new();
    let mut taken = Vec::new();
    let bad =
        || DbUrlError::Tls("DATABASE_URL is neither a postgres:// URL nor key=value pairs".into());
    loop {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= bytes.len() {
            break;
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &s[start..i];
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= bytes.len() || bytes[i] != b'=' || key.is_empty() {
            return Err(bad());
        }
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => return Err(bad()),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < bytes.len() => {
                        value.push(bytes[i + 1] as char);
                        i += 2;
                    }
                    Some(_) => {
                        let ch = s[i..].chars().next().ok_or_else(bad)?;
                        value.push(ch);
                        i += ch.len_utf8();
                    }
                }
            }
        } else {
            let vstart = i;
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            value.push_str(&s[vstart..i]);
        }
        if TLS_KEYS.contains(&key) || UNSUPPORTED_TLS_KEYS.contains(&key) {
            taken.push((key.to_owned(), value));
        } else {
            kept.push(&s[start..i]);
        }
    }
    Ok((kept.join(" "), taken))
}

/// The TLS settings the parameters ask for; checks that the files they name exist.
fn tls_settings(params: &[(String, String)]) -> Result<TlsSettings, DbUrlError> {
    let mut mode = SslMode::Prefer;
    let mut root: Option<String> = None;
    let mut cert: Option<PathBuf> = None;
    let mut key: Option<PathBuf> = None;
    for (k, v) in params {
        match k.as_str() {
            "sslmode" => mode = v.parse().map_err(DbUrlError::Tls)?,
            "sslrootcert" => root = Some(v.clone()),
            "sslcert" => cert = Some(PathBuf::from(v)),
            "sslkey" => key = Some(PathBuf::from(v)),
            other => {
                return Err(DbUrlError::Tls(format!(
                    "DATABASE_URL parameter {other} is not supported by deeprecall-sync (supported: sslmode, \
                     sslrootcert, sslcert, sslkey)"
                )));
            }
        }
    }
    let root_cert = match root.as_deref() {
        Some("system") => Some(system_bundle()?),
        Some(path) => Some(PathBuf::from(path)),
        // libpq's default location; used when present, as libpq does.
        None => default_root_cert().filter(|p| p.is_file() && mode != SslMode::Disable),
    };
    if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && root_cert.is_none() {
        return Err(DbUrlError::Tls(format!(
            "sslmode={mode} needs the CA that signed the server's certificate: add sslrootcert=/path/to/ca.pem to \
             DATABASE_URL (or sslrootcert=system for the operating system's trusted CAs)"
        )));
    }
    if let Some(path) = &root_cert
        && !path.is_file()
    {
        return Err(DbUrlError::Tls(format!(
            "sslrootcert {} is not a readable file",
            path.display()
        )));
    }
    let client_cert = match (cert, key) {
        (None, None) => None,
        (Some(c), Some(k)) => Some((c, k)),
        _ => {
            return Err(DbUrlError::Tls(
                "sslcert and sslkey go together: give both (client certificate and its private key) or neither"
                    .into(),
            ));
        }
    };
    Ok(TlsSettings {
        mode,
        root_cert,
        client_cert,
    })
}

fn default_root_cert() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".postgresql").join("root.crt"))
}

fn system_bundle() -> Result<PathBuf, DbUrlError> {
    openssl_probe::probe().cert_file.ok_or_else(|| {
        DbUrlError::Tls(
            "sslrootcert=system: no CA bundle found (install ca-certificates, or set SSL_CERT_FILE, or name the CA \
             file in sslrootcert)"
                .into(),
        )
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the `tokio-postgres` connector for `tls`. Reads the certificate files now, so a missing or unreadable
/// file is reported at start, not at the first connection.
pub fn connector(tls: &TlsSettings) -> Result<PgConnector, DbUrlError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| DbUrlError::Tls(format!("TLS setup: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match (&tls.root_cert, tls.verifies_chain()) {
        (Some(path), true) => {
            let roots = load_roots(path)?;
            let inner =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| DbUrlError::Tls(format!("TLS setup: {e}")))?;
            Arc::new(PgVerifier {
                inner,
                check_host_name: tls.verifies_host_name(),
            })
        }
        _ => Arc::new(EncryptOnly { provider }),
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match &tls.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = load_certs(cert, "sslcert")?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                DbUrlError::Tls(format!(
                    "sslkey {}: no usable private key: {e}",
                    key.display()
                ))
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| DbUrlError::Tls(format!("sslcert/sslkey: {e}")))?
        }
    };
    Ok(MakeRustlsConnect::new(config))
}

fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, DbUrlError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| DbUrlError::Tls(format!("{what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(DbUrlError::Tls(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore, DbUrlError> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(load_certs(path, "sslrootcert")?);
    if added == 0 {
        return Err(DbUrlError::Tls(format!(
            "sslrootcert {}: none of its certificates is usable as a CA",
            path.display()
        )));
    }
    Ok(roots)
}

/// `err` and its causes on one line, with a certificate failure worded for the operator: which setting decided and
/// what to change. (`tokio-postgres` keeps the TLS error in `source()`, and rustls prints an unknown issuer as
/// `UnknownIssuer`.)
pub fn explain(err: &(dyn std::error::Error + 'static), tls: &TlsSettings) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(rustls_error) = as_rustls(e) {
            parts.push(explain_rustls(rustls_error, tls));
            break;
        }
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}

fn as_rustls<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    e.downcast_ref::<rustls::Error>().or_else(|| {
        e.downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    })
}

fn explain_rustls(e: &rustls::Error, tls: &TlsSettings) -> String {
    let roots = tls
        .root_cert
        .as_ref()
        .map_or_else(|| "(none)".to_owned(), |p| p.display().to_string());
    match e {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
            "the server's certificate is not signed by a CA in sslrootcert {roots} (sslmode={}): wrong CA file, or \
             the server presents a certificate from another CA",
            tls.mode
        ),
        rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected,
            presented,
        }) => format!(
            "the server's certificate is not valid for host {:?} (it names {}); sslmode=verify-full checks the host \
             in DATABASE_URL: connect by a name the certificate lists, or use sslmode=verify-ca to check the CA only",
            expected.to_str(),
            presented.join(", ")
        ),
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName) => {
            "the server's certificate is not valid for the host in DATABASE_URL (sslmode=verify-full)".to_owned()
        }
        other => format!("TLS: {other}"),
    }
}

/// `verify-ca` and `verify-full` (and `prefer`/`require` with a root certificate): the chain must lead to a root in
/// `roots`; the host name is checked only for `verify-full`.
#[derive(Debug)]
struct PgVerifier {
    inner: Arc<WebPkiServerVerifier>,
    check_host_name: bool,
}

impl ServerCertVerifier for PgVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            // webpki checks the name after the chain, so a name error means the chain verified.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_host_name => Ok(ServerCertVerified::assertion()),
            result => result,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a root certificate: encrypt, but accept any certificate (libpq's behaviour; it
/// protects against passive eavesdropping only). The handshake signature is still checked, so the server holds
/// the key of the certificate it sent.
#[derive(Debug)]
struct EncryptOnly {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(url: &str) -> (String, Vec<(String, String)>) {
        let body = url.strip_prefix("postgres://").unwrap();
        split_uri_params(body).unwrap()
    }

    #[test]
    fn takes_tls_keys_out_of_the_query_and_keeps_the_rest() {
        let (rest, taken) = params(
            "postgres://u:p%3Fw@db.example:5432/app?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3",
        );
        assert_eq!(
            rest,
            "u:p%3Fw@db.example:5432/app?application_name=x&connect_timeout=3"
        );
        assert_eq!(
            taken,
            vec![
                ("sslmode".to_owned(), "verify-full".to_owned()),
                ("sslrootcert".to_owned(), "/etc/ca.pem".to_owned())
            ]
        );
    }

    #[test]
    fn a_question_mark_in_the_password_is_not_the_query() {
        let (rest, taken) = params("postgres://u:p?w@h/db?sslmode=require");
        assert_eq!(rest, "u:p?w@h/db");
        assert_eq!(taken, vec![("sslmode".to_owned(), "require".to_owned())]);
    }

    #[test]
    fn urls_without_tls_keys_are_unchanged() {
        assert_eq!(params("postgres://u@h/db").0, "u@h/db");
        assert_eq!(params("postgres://u@h/db?x=1").0, "u@h/db?x=1");
    }

    #[test]
    fn key_value_form() {
        let (rest, taken) = split_key_value_params(
            "host=db port = 5432 sslmode=verify-ca sslrootcert='/path with/it\\'s.pem' dbname=app",
        )
        .unwrap();
        assert_eq!(rest, "host=db port = 5432 dbname=app");
        assert_eq!(
            taken,
            vec![
                ("sslmode".to_owned(), "verify-ca".to_owned()),
                ("sslrootcert".to_owned(), "/path with/it's.pem".to_owned())
            ]
        );
        assert!(split_key_value_params("host=db sslmode='x").is_err());
        assert!(split_key_value_params("nonsense").is_err());
    }

    #[test]
    fn maps_modes_onto_tokio_postgres() {
        use tokio_postgres::config::SslMode as T;
        let mode = |url: &str| split_url(url).map(|(c, t)| (c.get_ssl_mode(), t.mode));
        assert_eq!(
            mode("postgres://u@h/db?sslmode=disable").unwrap(),
            (T::Disable, SslMode::Disable)
        );
        assert_eq!(
            mode("postgres://u@h/db?sslmode=require").unwrap(),
            (T::Require, SslMode::Require)
        );
        // No sslmode: libpq's default.
        assert_eq!(mode("postgres://u@h/db").unwrap().1, SslMode::Prefer);
        let err = mode("postgres://u@h/db?sslmode=verify-full")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslrootcert"), "{err}");
        let err = mode("postgres://u@h/db?sslmode=allow")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported sslmode"), "{err}");
        let err = mode("postgres://u@h/db?sslcrl=/x").unwrap_err().to_string();
        assert!(err.contains("sslcrl is not supported"), "{err}");
        let err = mode("postgres://u@h/db?sslmode=require&sslcert=/x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("go together"), "{err}");
        let err = mode("postgres://u@h/db?sslmode=verify-ca&sslrootcert=/does/not/exist.pem")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a readable file"), "{err}");
    }
}
