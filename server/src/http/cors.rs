//! Cross-origin requests: browsers call `/v1/*` directly from the app's own origin (DeepRecall's pages are not
//! served by this server), so every response, errors included, carries CORS headers for allowed origins.
//!
//! Why on errors too: a browser hides a CORS-less 401 from the page as a network error, which clients retry for
//! ever instead of refreshing their token (Electric's client calls `onError` only for a readable 4xx).
//! `Authorization` is named explicitly in the preflight answer: `*` never covers it. No cookies are used, so
//! credentials are not allowed and an allowed origin is echoed back (with `Vary: Origin`).

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Which origins may call the API from a browser.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CorsOrigins {
    /// No cross-origin access (no CORS headers): the default of `serve`.
    #[default]
    None,
    /// Any origin (the default of `dev`).
    Any,
    /// Exactly these origins (`scheme://host[:port]`).
    List(Vec<String>),
}

impl CorsOrigins {
    /// From `--cors-origin` values: none = `fallback`; `*` = any; otherwise the list.
    pub fn from_flags(values: &[String], fallback: Self) -> Result<Self, String> {
        let values: Vec<&str> = values
            .iter()
            .map(|v| v.trim().trim_end_matches('/'))
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            return Ok(fallback);
        }
        if values.contains(&"*") {
            return Ok(Self::Any);
        }
        for v in &values {
            let ok = (v.starts_with("http://") || v.starts_with("https://"))
                && HeaderValue::from_str(v).is_ok()
                && !v["https://".len().min(v.len())..].contains('/');
            if !ok {
                return Err(format!(
                    "--cors-origin {v:?} is not an origin (scheme://host[:port], or * for any)"
                ));
            }
        }
        Ok(Self::List(values.into_iter().map(str::to_owned).collect()))
    }
}

/// Response headers a browser page may read: the Electric shape API's, plus `retry-after` and the request id.
pub const EXPOSED_HEADERS: [&str; 8] = [
    "electric-handle",
    "electric-offset",
    "electric-schema",
    "electric-cursor",
    "electric-up-to-date",
    "electric-has-data",
    "retry-after",
    "x-request-id",
];

/// The layer for `origins`; `None` when cross-origin access is off.
pub fn layer(origins: &CorsOrigins) -> Option<CorsLayer> {
    let allow = match origins {
        CorsOrigins::None => return None,
        CorsOrigins::Any => AllowOrigin::mirror_request(),
        CorsOrigins::List(list) => AllowOrigin::list(
            list.iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        ),
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("x-request-id"),
            ])
            .expose_headers(EXPOSED_HEADERS.map(HeaderName::from_static))
            .max_age(Duration::from_secs(86_400)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags() {
        assert_eq!(
            CorsOrigins::from_flags(&[], CorsOrigins::Any),
            Ok(CorsOrigins::Any)
        );
        assert_eq!(
            CorsOrigins::from_flags(&["*".into()], CorsOrigins::None),
            Ok(CorsOrigins::Any)
        );
        assert_eq!(
            CorsOrigins::from_flags(
                &[
                    "https://app.example.com/".into(),
                    "http://localhost:3000".into()
                ],
                CorsOrigins::None
            ),
            Ok(CorsOrigins::List(vec![
                "https://app.example.com".into(),
                "http://localhost:3000".into()
            ]))
        );
        assert!(CorsOrigins::from_flags(&["app.example.com".into()], CorsOrigins::None).is_err());
        assert!(
            CorsOrigins::from_flags(&["https://a.example/path".into()], CorsOrigins::None).is_err()
        );
    }
}
