//! `FacilitatorClient` against a scripted, fault-injecting facilitator: a raw TCP HTTP/1.1
//! server on a loopback port whose every answer is chosen by the test (slow, 5xx, 429, bad
//! JSON, hang mid-body, connection closed after the request, refused connections, refusals).
//!
//! Each case asserts the status and headers the paying client gets, whether the handler ran
//! (and that its body was withheld when settlement failed after it), and how often `/verify`
//! and `/settle` were called: a settlement whose outcome is unknown is never sent twice.
#![cfg(all(feature = "facilitator", feature = "test-util"))]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tower::Layer;
use tower_x402::Verifier;
use tower_x402::body::ResponseBody;
use tower_x402::facilitator::{AuthRequest, FacilitatorClient, auth_fn};
use tower_x402::verify::VerifyError;

/// Short deadlines keep the whole file to a few seconds.
const CALL_TIMEOUT: Duration = Duration::from_millis(400);
const TX: &str = "0x1111111111111111111111111111111111111111111111111111111111111111";

// ------------------------------------------------------------------------------------------------
// The scripted facilitator

/// How one call is answered.
#[derive(Clone, Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    delay: Duration,
    mode: Mode,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// The whole answer.
    Whole,
    /// Read the request, then close the connection without a word.
    Close,
    /// Headers and half the body, then nothing, forever.
    HangMidBody,
    /// Answer, after closing the listener: later connections are refused.
    ThenStop,
}

impl Answer {
    fn json(status: u16, body: Value) -> Self {
        Self::raw(status, &body.to_string())
    }
    fn raw(status: u16, body: &str) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
            delay: Duration::ZERO,
            mode: Mode::Whole,
        }
    }
    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
    fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
    fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
}

fn valid() -> Answer {
    Answer::json(
        200,
        json!({"isValid": true, "payer": payer().address().to_checksum(None)}),
    )
}

fn settled() -> Answer {
    Answer::json(
        200,
        json!({"success": true, "transaction": TX, "network": "eip155:84532",
               "payer": payer().address().to_checksum(None)}),
    )
}

fn supported_base_sepolia() -> Answer {
    Answer::json(
        200,
        json!({"kinds": [
            {"x402Version": 2, "scheme": "exact", "network": "eip155:84532"},
            {"x402Version": 1, "scheme": "exact", "network": "base-sepolia"}],
          "extensions": [], "signers": {"eip155:*": ["0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"]}}),
    )
}

/// Answers per endpoint: call n gets `answers[min(n, len - 1)]`.
#[derive(Clone)]
struct Script {
    verify: Vec<Answer>,
    settle: Vec<Answer>,
    supported: Vec<Answer>,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            verify: vec![valid()],
            settle: vec![settled()],
            supported: vec![supported_base_sepolia()],
        }
    }
}

/// One request the facilitator received.
#[derive(Clone, Debug)]
struct Call {
    path: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

struct State {
    script: Mutex<Script>,
    calls: Mutex<Vec<Call>>,
}

struct Fake {
    addr: SocketAddr,
    state: Arc<State>,
    stop: mpsc::Sender<oneshot::Sender<()>>,
}

impl Fake {
    async fn start(script: Script) -> Fake {
        let state = Arc::new(State {
            script: Mutex::new(script),
            calls: Mutex::default(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = Self::serve(listener, state.clone());
        Fake { addr, state, stop }
    }

    /// Listens again on the same port (after a `ThenStop`).
    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.expect("rebind");
        self.stop = Self::serve(listener, self.state.clone());
    }

    fn serve(listener: TcpListener, state: Arc<State>) -> mpsc::Sender<oneshot::Sender<()>> {
        let (stop_tx, mut stop_rx) = mpsc::channel::<oneshot::Sender<()>>(1);
        let stop = stop_tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((socket, _)) = accepted else { continue };
                        tokio::spawn(connection(socket, state.clone(), stop.clone()));
                    }
                    ack = stop_rx.recv() => {
                        drop(listener);
                        if let Some(ack) = ack {
                            let _ = ack.send(());
                        }
                        return;
                    }
                }
            }
        });
        stop_tx
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.state.script.lock().unwrap());
    }

    fn calls(&self, path: &str) -> Vec<Call> {
        let calls = self.state.calls.lock().unwrap();
        calls.iter().filter(|c| c.path == path).cloned().collect()
    }

    fn count(&self, path: &str) -> usize {
        self.calls(path).len()
    }
}

/// Reads one HTTP/1.1 request and answers it as scripted.
async fn connection(
    mut socket: TcpStream,
    state: Arc<State>,
    stop: mpsc::Sender<oneshot::Sender<()>>,
) {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let Ok(n) = socket.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let Ok(n) = socket.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
    let answer = {
        let mut calls = state.calls.lock().unwrap();
        let n = calls.iter().filter(|c| c.path == path).count();
        calls.push(Call {
            path: path.clone(),
            authorization: header("authorization"),
            body: buf[head_end..head_end + length].to_vec(),
        });
        let script = state.script.lock().unwrap();
        let list = match path.as_str() {
            "/verify" => &script.verify,
            "/settle" => &script.settle,
            "/supported" => &script.supported,
            _ => return,
        };
        list[n.min(list.len() - 1)].clone()
    };
    tokio::time::sleep(answer.delay).await;
    if answer.mode == Mode::ThenStop {
        let (ack_tx, ack_rx) = oneshot::channel();
        let _ = stop.send(ack_tx).await;
        let _ = ack_rx.await;
    }
    if answer.mode == Mode::Close {
        return;
    }
    let mut out = format!(
        "HTTP/1.1 {} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        answer.status,
        answer.body.len()
    );
    for (n, v) in &answer.headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if answer.mode == Mode::HangMidBody {
        bytes.extend_from_slice(&answer.body[..answer.body.len() / 2]);
        let _ = socket.write_all(&bytes).await;
        std::future::pending::<()>().await;
    }
    bytes.extend_from_slice(&answer.body);
    let _ = socket.write_all(&bytes).await;
    let _ = socket.shutdown().await;
}

// ------------------------------------------------------------------------------------------------
// The paid service

fn client(url: &str) -> FacilitatorClient {
    client_builder(url).build().expect("valid client")
}

/// [`client`] whose auth provider records the path of every attempt, the ones that never
/// reach the facilitator (refused connections) included.
fn counting_client(url: &str) -> (FacilitatorClient, Arc<Mutex<Vec<String>>>) {
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = attempts.clone();
    let auth = auth_fn(move |req: AuthRequest| {
        seen.lock().unwrap().push(req.uri.path().to_owned());
        async { Ok(HeaderMap::new()) }
    });
    let client = client_builder(url)
        .auth(auth)
        .build()
        .expect("valid client");
    (client, attempts)
}

fn attempts_at(attempts: &Mutex<Vec<String>>, path: &str) -> usize {
    attempts
        .lock()
        .unwrap()
        .iter()
        .filter(|p| *p == path)
        .count()
}

fn client_builder(url: &str) -> tower_x402::facilitator::FacilitatorClientBuilder {
    FacilitatorClient::builder(url)
        .connect_timeout(Duration::from_millis(100))
        .verify_timeout(CALL_TIMEOUT)
        .settle_timeout(CALL_TIMEOUT)
        .supported_timeout(CALL_TIMEOUT)
        .backoff(Duration::from_millis(10), Duration::from_millis(40))
        .clock(clock())
}

type Svc = tower::util::BoxCloneService<
    http::Request<axum::body::Body>,
    http::Response<ResponseBody<Full<Bytes>>>,
    std::convert::Infallible,
>;

/// The layer with `facilitator` as verifier and settler, over a counting handler.
struct Paid {
    svc: Svc,
    hits: Hits,
}

fn paid(facilitator: FacilitatorClient) -> Paid {
    let hits = Hits::new();
    let layer = builder(&clock())
        .verifier(facilitator.clone())
        .settler(facilitator)
        .build()
        .expect("valid layer");
    Paid {
        svc: Svc::new(layer.layer(plain_service(hits.clone()))),
        hits,
    }
}

impl Paid {
    async fn get(&self, proof: (HeaderName, HeaderValue)) -> Reply {
        get_with(&self.svc, "/paid", [proof]).await
    }
}

fn retry_after(r: &Reply) -> Option<u64> {
    r.header("retry-after")
        .map(|v| v.parse().expect("Retry-After is seconds"))
}

/// The handler ran but its answer did not go out.
fn assert_withheld(r: &Reply) {
    let body = String::from_utf8_lossy(&r.body);
    assert!(
        !body.contains("\"handler\":\"ran\""),
        "handler body leaked: {body}"
    );
}

// ------------------------------------------------------------------------------------------------
// The happy path and what is sent

#[tokio::test]
async fn paid_request_verifies_and_settles_the_same_documents() {
    let fake = Fake::start(Script::default()).await;
    let p = paid(client(&fake.url()));
    let r = p.get(proof_v2()).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(p.hits.get(), 1);
    let receipt = r.receipt();
    assert_eq!(receipt["success"], true);
    assert_eq!(receipt["transaction"], TX, "the facilitator's transaction");
    assert_eq!((fake.count("/verify"), fake.count("/settle")), (1, 1));

    // /settle carries the very bytes /verify approved: the server's requirements, not the
    // client's echo, and the client's payload.
    let verify = &fake.calls("/verify")[0].body;
    assert_eq!(verify, &fake.calls("/settle")[0].body);
    let sent: Value = serde_json::from_slice(verify).unwrap();
    assert_eq!(sent["x402Version"], 2);
    assert_eq!(sent["paymentRequirements"], json!(requirements()));
    assert_eq!(sent["paymentPayload"]["x402Version"], 2);
    assert_eq!(
        sent["paymentPayload"]["payload"]["authorization"]["from"]
            .as_str()
            .map(str::to_lowercase),
        Some(payer().address().to_string().to_lowercase())
    );
}

#[tokio::test]
async fn v1_payment_is_sent_in_the_v1_dialect() {
    let fake = Fake::start(Script::default()).await;
    let p = paid(client(&fake.url()));
    let r = p.get(proof_v1()).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.v1_receipt()["transaction"], TX);
    let sent: Value = serde_json::from_slice(&fake.calls("/verify")[0].body).unwrap();
    assert_eq!(sent["x402Version"], 1);
    let req = &sent["paymentRequirements"];
    assert_eq!(req["network"], "base-sepolia");
    assert_eq!(req["maxAmountRequired"], AMOUNT);
    assert!(
        req["resource"].as_str().is_some_and(|s| !s.is_empty()),
        "{req}"
    );
    assert_eq!(sent["paymentPayload"]["network"], "base-sepolia");
}

#[tokio::test]
async fn auth_headers_are_minted_per_call() {
    let fake = Fake::start(Script::default()).await;
    let minted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = minted.clone();
    let auth = auth_fn(move |req: AuthRequest| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        async move {
            let mut h = HeaderMap::new();
            let jwt = format!("Bearer jwt-{}-{}-{n}", req.method, req.uri.path());
            h.insert("authorization", HeaderValue::try_from(jwt)?);
            Ok(h)
        }
    });
    let facilitator = FacilitatorClient::builder(fake.url())
        .auth(auth)
        .clock(clock())
        .build()
        .unwrap();
    let p = paid(facilitator);
    assert_eq!(p.get(proof_v2()).await.status, StatusCode::OK);
    let auth_of = |path| fake.calls(path)[0].authorization.clone();
    assert_eq!(
        auth_of("/supported").as_deref(),
        Some("Bearer jwt-GET-/supported-1")
    );
    assert_eq!(
        auth_of("/verify").as_deref(),
        Some("Bearer jwt-POST-/verify-2")
    );
    assert_eq!(
        auth_of("/settle").as_deref(),
        Some("Bearer jwt-POST-/settle-3")
    );
}

#[tokio::test]
async fn failing_auth_provider_is_503_and_nothing_is_sent() {
    let fake = Fake::start(Script::default()).await;
    let facilitator = FacilitatorClient::builder(fake.url())
        .auth(auth_fn(|_req: AuthRequest| async {
            Err("key vault down".into())
        }))
        .backoff(Duration::from_millis(1), Duration::from_millis(2))
        .clock(clock())
        .build()
        .unwrap();
    let p = paid(facilitator);
    let r = p.get(proof_v2()).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("service_unavailable".into())
        )
    );
    assert_eq!(p.hits.get(), 0);
    assert_eq!(fake.count("/verify") + fake.count("/settle"), 0);
}

// ------------------------------------------------------------------------------------------------
// /supported

#[tokio::test]
async fn supported_is_fetched_once_and_refuses_early() {
    let fake = Fake::start(Script {
        supported: vec![Answer::json(
            200,
            json!({"kinds": [{"x402Version": 2, "scheme": "exact", "network": "eip155:8453"}]}),
        )],
        ..Script::default()
    })
    .await;
    let p = paid(client(&fake.url()));
    for _ in 0..3 {
        let r = p.get(proof_v2()).await;
        assert_eq!(
            r.outcome(),
            (StatusCode::PAYMENT_REQUIRED, Some("invalid_network".into()))
        );
    }
    let r = p.get(proof_v1()).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_x402_version".into())
        )
    );
    assert_eq!(fake.count("/supported"), 1, "cached");
    assert_eq!(fake.count("/verify"), 0, "refused before /verify");
    assert_eq!(p.hits.get(), 0);
}

#[tokio::test]
async fn supported_refreshes_in_the_background_without_blocking() {
    let fake = Fake::start(Script::default()).await;
    let facilitator = FacilitatorClient::builder(fake.url())
        .supported_refresh(Duration::ZERO)
        .clock(clock())
        .build()
        .unwrap();
    let p = paid(facilitator.clone());
    assert_eq!(p.get(proof_v2()).await.status, StatusCode::OK);
    assert_eq!(fake.count("/supported"), 1);
    // Due at once: the next request uses the cached copy, even though the refresh is slow
    // and fails.
    fake.set(|s| s.supported = vec![Answer::raw(500, "{}").delay(Duration::from_millis(300))]);
    let started = Instant::now();
    assert_eq!(p.get(proof_v2()).await.status, StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(fake.count("/supported") >= 2, "a refresh ran");
    assert_eq!(
        facilitator.cached_supported().map(|s| s.kinds.len()),
        Some(2),
        "a failed refresh keeps the copy"
    );
}

#[tokio::test]
async fn unreachable_supported_does_not_block_verify() {
    let fake = Fake::start(Script {
        supported: vec![Answer::raw(500, "{}")],
        ..Script::default()
    })
    .await;
    let p = paid(client(&fake.url()));
    assert_eq!(p.get(proof_v2()).await.status, StatusCode::OK);
    assert_eq!(p.get(proof_v2()).await.status, StatusCode::OK);
    assert_eq!(
        fake.count("/supported"),
        1,
        "one attempt while a payer waits, and not repeated per request"
    );
}

// ------------------------------------------------------------------------------------------------
// /verify faults: the handler never runs, nothing is settled

/// A verify fault: (status, reason) the client gets, /verify calls made; handler and /settle
/// never run.
async fn verify_fault(answers: Vec<Answer>) -> (Reply, usize) {
    let fake = Fake::start(Script {
        verify: answers,
        ..Script::default()
    })
    .await;
    let p = paid(client(&fake.url()));
    let r = p.get(proof_v2()).await;
    assert_eq!(p.hits.get(), 0, "handler ran on an unverified payment");
    assert_eq!(fake.count("/settle"), 0);
    assert!(r.has_no_receipt());
    (r, fake.count("/verify"))
}

#[tokio::test]
async fn verify_slower_than_the_timeout_is_retried_then_503() {
    let started = Instant::now();
    let (r, calls) = verify_fault(vec![valid().delay(Duration::from_secs(2))]).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("service_unavailable".into())
        )
    );
    assert_eq!(retry_after(&r), Some(5), "the layer's default");
    assert_eq!(calls, 3);
    assert!(
        started.elapsed() < Duration::from_millis(1800),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn verify_500_is_retried_and_can_recover() {
    let fake = Fake::start(Script {
        verify: vec![Answer::raw(500, "{\"error\":\"boom\"}"), valid()],
        ..Script::default()
    })
    .await;
    let p = paid(client(&fake.url()));
    let r = p.get(proof_v2()).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!((fake.count("/verify"), p.hits.get()), (2, 1));
}

#[tokio::test]
async fn verify_500_every_time_is_503_after_three_attempts() {
    let (r, calls) = verify_fault(vec![Answer::raw(500, "{}")]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry_after(&r), Some(5), "the layer's default");
    assert_eq!(calls, 3);
    // A facilitator asking for a longer pause than the backoff is not hammered, and its
    // Retry-After reaches the client.
    let (r, calls) = verify_fault(vec![Answer::raw(503, "{}").header("retry-after", "9")]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry_after(&r), Some(9));
    assert_eq!(calls, 1);
}

#[tokio::test]
async fn verify_429_is_429_with_its_retry_after_and_not_retried() {
    let (r, calls) = verify_fault(vec![Answer::raw(429, "{}").header("retry-after", "7")]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited".into()))
    );
    assert_eq!(retry_after(&r), Some(7));
    assert_eq!(calls, 1);

    let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
    let (r, _) = verify_fault(vec![Answer::raw(429, "{}").header("retry-after", &date)]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let wait = retry_after(&r).unwrap();
    assert!((28..=30).contains(&wait), "{wait}");

    let (r, _) = verify_fault(vec![Answer::raw(429, "{}").header("retry-after", "86400")]).await;
    assert_eq!(retry_after(&r), Some(60), "capped");
}

#[tokio::test]
async fn verify_malformed_replies_are_503() {
    for body in [
        "not json",
        "{\"isValid\": \"yes\"}",
        "{\"payer\": \"0x00\"}",
        "[true]",
        "",
    ] {
        let (r, calls) = verify_fault(vec![Answer::raw(200, body)]).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
        assert_eq!(calls, 1, "a malformed answer is not retried ({body:?})");
    }
}

#[tokio::test]
async fn verify_oversized_reply_is_503() {
    let huge = format!(
        "{{\"isValid\":true,\"pad\":\"{}\"}}",
        "x".repeat(100 * 1024)
    );
    let (r, _) = verify_fault(vec![Answer::raw(200, &huge)]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn verify_hanging_mid_body_is_503() {
    let (r, calls) = verify_fault(vec![valid().mode(Mode::HangMidBody)]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls, 3);
}

#[tokio::test]
async fn verify_connection_closed_is_retried_then_503() {
    let (r, calls) = verify_fault(vec![valid().mode(Mode::Close)]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls, 3);
}

#[tokio::test]
async fn verify_connection_refused_is_503() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let (facilitator, attempts) = counting_client(&url);
    let p = paid(facilitator);
    let r = p.get(proof_v2()).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("service_unavailable".into())
        )
    );
    assert_eq!(p.hits.get(), 0);
    assert_eq!(
        attempts_at(&attempts, "/verify"),
        3,
        "nothing sent: retried"
    );
}

#[tokio::test]
async fn is_valid_false_passes_known_reasons_and_hides_unknown_ones() {
    let refuse = |reason: &str| {
        Answer::json(
            200,
            json!({"isValid": false, "invalidReason": reason,
                                 "invalidMessage": "details", "payer": "0x00"}),
        )
    };
    let (r, calls) = verify_fault(vec![refuse("invalid_exact_evm_insufficient_balance")]).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_exact_evm_insufficient_balance".into())
        )
    );
    assert_eq!(calls, 1);
    let hostile = "<script>alert(1)</script> at /srv/facilitator.js:42";
    let (r, _) = verify_fault(vec![refuse(hostile)]).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("facilitator_rejected".into())
        )
    );
    let said = format!("{:?} {}", r.headers, String::from_utf8_lossy(&r.body));
    assert!(
        !said.contains("alert") && !said.contains("facilitator.js"),
        "{said}"
    );
    // A refusal in an error status is still a refusal.
    let (r, _) = verify_fault(vec![Answer::json(
        400,
        json!({"isValid": false, "invalidReason": "invalid_exact_evm_signature"}),
    )])
    .await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_exact_evm_signature".into())
        )
    );
}

#[tokio::test]
async fn unknown_reason_is_kept_for_logs_bounded() {
    let fake = Fake::start(Script {
        verify: vec![Answer::json(
            200,
            json!({"isValid": false, "invalidReason": "x".repeat(5000), "invalidMessage": "m"}),
        )],
        ..Script::default()
    })
    .await;
    let facilitator = client(&fake.url());
    let (_, proof) = proof_v2();
    let payload = decode_v2(&proof);
    let err = facilitator
        .verify(&payload, &requirements())
        .await
        .unwrap_err();
    let VerifyError::Rejected { reason, detail } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*reason, "facilitator_rejected");
    assert!(
        detail.starts_with("xxx") && detail.len() < 300,
        "{}",
        detail.len()
    );
}

#[tokio::test]
async fn verify_vouching_for_another_payer_is_refused() {
    let (r, _) = verify_fault(vec![Answer::json(
        200,
        json!({"isValid": true, "payer": "0x000000000000000000000000000000000000dEaD"}),
    )])
    .await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_exact_evm_signature".into())
        )
    );
}

#[tokio::test]
async fn verify_404_is_503() {
    let (r, calls) = verify_fault(vec![Answer::raw(404, "Cannot POST /verify")]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls, 1);
}

// ------------------------------------------------------------------------------------------------
// /settle faults: after the handler ran

/// A settle fault after a good verify: the reply, the /settle call count, the handler count.
async fn settle_fault(answers: Vec<Answer>) -> (Reply, Fake, Paid, (HeaderName, HeaderValue)) {
    let fake = Fake::start(Script {
        settle: answers,
        ..Script::default()
    })
    .await;
    let p = paid(client(&fake.url()));
    let proof = proof_v2();
    let r = p.get(proof.clone()).await;
    assert_eq!(
        p.hits.get(),
        1,
        "the handler ran (settlement comes after it)"
    );
    assert_withheld(&r);
    (r, fake, p, proof)
}

/// After an unknown outcome the proof stays spent: the same proof is refused, and /settle is
/// not called again.
async fn assert_kept(p: &Paid, fake: &Fake, proof: (HeaderName, HeaderValue)) {
    fake.set(|s| s.settle = vec![settled()]);
    let again = p.get(proof).await;
    assert_eq!(
        again.outcome(),
        (StatusCode::PAYMENT_REQUIRED, Some(NONCE_USED.into()))
    );
    assert_eq!(
        fake.count("/settle"),
        1,
        "a settlement in doubt is never sent twice"
    );
    assert_eq!(p.hits.get(), 1);
}

fn assert_unknown(r: &Reply) {
    assert_eq!(
        r.outcome(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("settlement_outcome_unknown".into())
        )
    );
    assert!(retry_after(r).is_some());
    assert_eq!(r.receipt()["success"], false);
}

#[tokio::test]
async fn settle_500_is_unknown_and_never_resent() {
    let (r, fake, p, proof) = settle_fault(vec![Answer::raw(500, "{\"error\":\"rpc\"}")]).await;
    assert_unknown(&r);
    assert_eq!(fake.count("/settle"), 1);
    assert_kept(&p, &fake, proof).await;
}

#[tokio::test]
async fn settle_slower_than_the_timeout_is_unknown_and_never_resent() {
    let (r, fake, p, proof) = settle_fault(vec![settled().delay(Duration::from_secs(1))]).await;
    assert_unknown(&r);
    // Even once the slow facilitator finished, nothing more was sent.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(fake.count("/settle"), 1);
    assert_kept(&p, &fake, proof).await;
}

#[tokio::test]
async fn settle_connection_closed_after_sending_is_unknown() {
    let (r, fake, p, proof) = settle_fault(vec![settled().mode(Mode::Close)]).await;
    assert_unknown(&r);
    assert_kept(&p, &fake, proof).await;
}

#[tokio::test]
async fn settle_hanging_mid_body_is_unknown() {
    let (r, fake, p, proof) = settle_fault(vec![settled().mode(Mode::HangMidBody)]).await;
    assert_unknown(&r);
    assert_kept(&p, &fake, proof).await;
}

#[tokio::test]
async fn settle_malformed_or_inconsistent_success_is_unknown() {
    for answer in [
        Answer::raw(200, "{\"success\": tru"),
        Answer::json(
            200,
            json!({"success": true, "transaction": "", "network": "eip155:84532"}),
        ),
        Answer::json(
            200,
            json!({"success": true, "transaction": TX, "network": "eip155:1"}),
        ),
    ] {
        let (r, fake, p, proof) = settle_fault(vec![answer]).await;
        assert_unknown(&r);
        assert_kept(&p, &fake, proof).await;
    }
}

#[tokio::test]
async fn settlement_pending_is_unknown_with_its_transaction() {
    let (r, fake, p, proof) = settle_fault(vec![Answer::json(
        200,
        json!({"success": false, "errorReason": "settlement_pending", "transaction": TX,
               "network": "eip155:84532"}),
    )])
    .await;
    assert_unknown(&r);
    assert_eq!(
        r.receipt()["transaction"],
        TX,
        "the client learns the pending transaction"
    );
    assert_kept(&p, &fake, proof).await;
}

#[tokio::test]
async fn settle_429_is_429_and_the_proof_is_released() {
    let (r, fake, p, proof) =
        settle_fault(vec![Answer::raw(429, "{}").header("retry-after", "3")]).await;
    assert_eq!(
        r.outcome(),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited".into()))
    );
    assert_eq!(retry_after(&r), Some(3));
    assert_eq!(fake.count("/settle"), 1);
    // Nothing moved: the same proof is served once the facilitator takes it.
    fake.set(|s| s.settle = vec![settled()]);
    let again = p.get(proof).await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    assert_eq!((fake.count("/settle"), p.hits.get()), (2, 2));
}

#[tokio::test]
async fn settle_refused_is_402_with_its_reason_and_the_body_withheld() {
    let (r, fake, _p, _) = settle_fault(vec![Answer::json(
        200,
        json!({"success": false, "errorReason": "invalid_exact_evm_insufficient_balance",
               "transaction": "", "network": "eip155:84532"}),
    )])
    .await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("invalid_exact_evm_insufficient_balance".into())
        )
    );
    let receipt = r.receipt();
    assert_eq!(receipt["success"], false);
    assert_eq!(
        receipt["errorReason"],
        "invalid_exact_evm_insufficient_balance"
    );
    assert_eq!(fake.count("/settle"), 1);

    let (r, _, _, _) = settle_fault(vec![Answer::json(
        200,
        json!({"success": false, "errorReason": "Error: nonce too low (0x1f) at relayer.ts",
               "transaction": ""}),
    )])
    .await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some("facilitator_rejected".into())
        )
    );
}

#[tokio::test]
async fn settle_connection_refused_is_retried_then_503_and_released() {
    // /verify answers, then the facilitator stops listening: /settle cannot connect.
    let mut fake = Fake::start(Script {
        verify: vec![valid().mode(Mode::ThenStop)],
        ..Script::default()
    })
    .await;
    let (facilitator, attempts) = counting_client(&fake.url());
    let p = paid(facilitator);
    let proof = proof_v2();
    let r = p.get(proof.clone()).await;
    assert_eq!(
        r.outcome(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("service_unavailable".into())
        )
    );
    assert_eq!(p.hits.get(), 1);
    assert_withheld(&r);
    assert_eq!(fake.count("/settle"), 0, "nothing reached the facilitator");
    // Surely not sent, so safe to repeat: three attempts, each refused.
    assert_eq!(attempts_at(&attempts, "/settle"), 3);
    // Nothing was sent, so the proof was released: once the facilitator is back, it pays.
    fake.set(|s| s.verify = vec![valid()]);
    fake.restart().await;
    let again = p.get(proof).await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    assert_eq!(fake.count("/settle"), 1);
}

#[tokio::test]
async fn settle_without_a_facilitator_verification_is_unavailable() {
    use tower_x402::settle::Settler;
    let fake = Fake::start(Script::default()).await;
    let facilitator = client(&fake.url());
    let verified = tower_x402::ExactEvmVerifier::new()
        .with_clock(clock())
        .verify_sync(&decode_v2(&proof_v2().1), &requirements())
        .unwrap();
    let err = facilitator.settle(&verified).await.unwrap_err();
    assert!(
        matches!(err, tower_x402::settle::SettleError::Unavailable { .. }),
        "{err:?}"
    );
    assert_eq!(fake.count("/settle"), 0);
}

fn decode_v2(value: &HeaderValue) -> tower_x402::proto::PaymentPayload {
    use base64::Engine as _;
    let json = base64::engine::general_purpose::STANDARD
        .decode(value.as_bytes())
        .unwrap();
    tower_x402::proto::PaymentPayload::V2(serde_json::from_slice(&json).unwrap())
}
