//! One Solana JSON-RPC call over HTTP, for the settler (feature `svm-settle`) and the paying
//! client (feature `svm-client`): both need the same request, the same bounded read and the
//! same split between "not sent" and "maybe processed".

use serde_json::{Value, json};

use crate::store::BoxError;

/// How one RPC call failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Nothing reached the endpoint (connection refused, an HTTP error status).
    NotSent(BoxError),
    /// The request may have been processed (timeout, reset, an unreadable reply).
    Lost(BoxError),
    /// A JSON-RPC error object (its message cut at 300 characters).
    Rpc { code: i64, message: String },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotSent(e) | Self::Lost(e) => e.fmt(f),
            Self::Rpc { code, message } => write!(f, "RPC error {code}: {message}"),
        }
    }
}

/// Calls `method` with `params` at `url`, reading at most `max_reply` bytes of the answer:
/// its `result` (`null` when it has none).
pub(crate) async fn call(
    http: &reqwest::Client,
    url: &str,
    method: &str,
    params: Value,
    max_reply: usize,
) -> Result<Value, Failure> {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let res = http
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| {
            if e.is_connect() {
                Failure::NotSent(e.into())
            } else {
                Failure::Lost(e.into())
            }
        })?;
    if !res.status().is_success() {
        return Err(Failure::NotSent(
            format!("RPC answered HTTP {}", res.status()).into(),
        ));
    }
    let bytes = res.bytes().await.map_err(|e| Failure::Lost(e.into()))?;
    if bytes.len() > max_reply {
        return Err(Failure::Lost("RPC reply too large".into()));
    }
    let mut reply: Value = serde_json::from_slice(&bytes).map_err(|e| Failure::Lost(e.into()))?;
    if let Some(err) = reply.get("error") {
        return Err(Failure::Rpc {
            code: err.get("code").and_then(Value::as_i64).unwrap_or_default(),
            message: err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect(),
        });
    }
    Ok(reply.get_mut("result").map(Value::take).unwrap_or_default())
}
