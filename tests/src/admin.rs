//! Helpers for the metrics and admin tests: a `/metrics` listener in front of a [`TestEnv`]'s server, a parser for
//! the Prometheus text format, and a small blob inventory of two owners.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::{TestEnv, sha};

/// A metrics listener serving one test server's state on 127.0.0.1:0. Stops when dropped.
pub struct MetricsEndpoint {
    /// `http://127.0.0.1:PORT/metrics`.
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MetricsEndpoint {
    /// Installs the process-wide recorder (once) and serves `/metrics` for `env`'s current server. It keeps
    /// serving the same state (and pool) after `env.stop_server()`.
    pub async fn start(env: &TestEnv) -> Self {
        deeprecall_sync::metrics::install().expect("installing the Prometheus recorder");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = env.state.clone();
        let task = tokio::spawn(async move {
            let _ = deeprecall_sync::metrics::serve(listener, state, std::future::pending()).await;
        });
        Self {
            url: format!("http://{addr}/metrics"),
            task,
        }
    }

    /// Scrapes and parses.
    pub async fn scrape(&self) -> Scrape {
        let resp = reqwest::get(&self.url).await.expect("scrape");
        assert_eq!(resp.status(), 200, "GET /metrics");
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        Scrape::parse(&resp.text().await.expect("body"))
    }
}

/// A parsed Prometheus text exposition.
#[derive(Debug, Default)]
pub struct Scrape {
    /// The raw text.
    pub text: String,
    /// `# HELP` per metric family.
    pub help: BTreeMap<String, String>,
    /// `# TYPE` per metric family.
    pub types: BTreeMap<String, String>,
    /// Samples by `name{labels}` exactly as rendered (`name` alone without labels).
    pub samples: BTreeMap<String, f64>,
}

impl Scrape {
    /// Parses the text format (HELP, TYPE and sample lines; no timestamps).
    pub fn parse(text: &str) -> Self {
        let mut s = Scrape {
            text: text.to_owned(),
            ..Default::default()
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                s.help.insert(name.to_owned(), help.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line");
                s.types.insert(name.to_owned(), kind.to_owned());
            } else if !line.is_empty() && !line.starts_with('#') {
                let (series, value) = line.rsplit_once(' ').expect("sample line");
                let value = match value {
                    "+Inf" | "inf" => f64::INFINITY,
                    "-Inf" | "-inf" => f64::NEG_INFINITY,
                    v => v
                        .parse()
                        .unwrap_or_else(|_| panic!("bad value in {line:?}")),
                };
                s.samples.insert(series.to_owned(), value);
            }
        }
        s
    }

    /// The value of `series` (`name` or `name{label="value"}`), if present.
    pub fn get(&self, series: &str) -> Option<f64> {
        self.samples.get(series).copied()
    }

    /// The value of `series`, or 0 when absent (a counter not yet incremented).
    pub fn value(&self, series: &str) -> f64 {
        self.get(series).unwrap_or(0.0)
    }
}

/// Devices and blobs of [`seed_inventory`].
pub struct Inventory {
    /// Owner A: two devices, four blobs (two of them on no device).
    pub alice: Uuid,
    /// Owner B: one device, two blobs.
    pub bob: Uuid,
    /// Alice's laptop.
    pub laptop: Uuid,
    /// Alice's phone.
    pub phone: Uuid,
    /// Bob's desktop.
    pub desktop: Uuid,
}

/// Writes a known inventory through `POST /v1/blobs/coordinate`, as devices would:
///
/// | owner | sha | size | mime | laptop | phone | desktop |
/// |---|---|---|---|---|---|---|
/// | alice | sha(1) | 1000 | application/pdf | present | present | |
/// | alice | sha(2) | 200 | image/png | present | | |
/// | alice | sha(3) | 5000 | application/pdf | missing | | |
/// | alice | sha(4) | 10 | (none) | | missing | |
/// | bob | sha(5) | 300 | application/pdf | | | present |
/// | bob | sha(6) | 700 | application/epub+zip | | | present |
pub async fn seed_inventory(env: &TestEnv) -> Inventory {
    let inv = Inventory {
        alice: Uuid::new_v4(),
        bob: Uuid::new_v4(),
        laptop: Uuid::new_v4(),
        phone: Uuid::new_v4(),
        desktop: Uuid::new_v4(),
    };
    let reports = [
        (
            inv.alice,
            inv.laptop,
            json!([
                {"sha256": sha(1), "size": 1000, "mime": "application/pdf", "filename": "Attention Is All You Need.pdf"},
                {"sha256": sha(2), "size": 200, "mime": "image/png", "filename": "figure_1.png"},
                {"sha256": sha(3), "size": 5000, "mime": "application/pdf", "filename": "100%_lost.pdf", "health": "missing"},
            ]),
        ),
        (
            inv.alice,
            inv.phone,
            json!([
                {"sha256": sha(1), "size": 1000, "mime": "application/pdf"},
                {"sha256": sha(4), "size": 10, "health": "missing"},
            ]),
        ),
        (
            inv.bob,
            inv.desktop,
            json!([
                {"sha256": sha(5), "size": 300, "mime": "application/pdf", "filename": "bobs_notes.pdf"},
                {"sha256": sha(6), "size": 700, "mime": "application/epub+zip", "filename": "novel.epub"},
            ]),
        ),
    ];
    for (owner, device, blobs) in reports {
        let (status, body) = env
            .coordinate(owner, json!({"device_id": device, "blobs": blobs}))
            .await;
        assert_eq!(status, 200, "coordinate: {body}");
    }
    inv
}

/// `(owner_id, sha256)` of each item of an inventory page.
pub fn keys(page: &Value) -> Vec<(String, String)> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            (
                i["owner_id"].as_str().expect("owner_id").to_owned(),
                i["sha256"].as_str().expect("sha256").to_owned(),
            )
        })
        .collect()
}
