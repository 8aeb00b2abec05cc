//! Helpers for `/v1/batch` tests: sequence-idempotency batches, and raw HTTP requests whose answer is never read
//! (a client that crashed or lost its connection after sending).

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::TestEnv;

/// `ops` with `seq` numbers `first`, `first + 1`, … added (a client's outbox, numbered when queued).
pub fn numbered(ops: &[Value], first: i64) -> Vec<Value> {
    ops.iter()
        .enumerate()
        .map(|(i, op)| {
            let mut op = op.clone();
            op["seq"] = json!(first + i as i64);
            op
        })
        .collect()
}

impl TestEnv {
    /// `POST /v1/batch` as `user` with sequence idempotency: `{"client_id": client, "ops": ops}` (the ops carry
    /// their `seq`).
    pub async fn seq_batch(&self, user: Uuid, client: Uuid, ops: &[Value]) -> (StatusCode, Value) {
        let token = self.token(user);
        self.post(
            "/v1/batch",
            Some(&token),
            &json!({"client_id": client, "ops": ops}),
        )
        .await
    }

    /// Sends `POST <path>` with `body` on a fresh TCP connection and returns the connection without reading the
    /// answer. Dropping it closes the connection, as a client that died or lost its network would.
    pub async fn send_unread(
        &self,
        path: &str,
        token: &str,
        body: &Value,
    ) -> tokio::net::TcpStream {
        let body = body.to_string();
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        let mut stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect to the server");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send the request");
        stream
    }
}
