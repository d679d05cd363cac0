//! Paid MCP tools (`tower_x402::mcp`): a real rmcp server on streamable HTTP, driven by raw
//! JSON-RPC over HTTP (in Rust) and by the Python x402 SDK's MCP client
//! (`tests/clients/mcp_pay.py`). Every paid call signs the requirement taken from the
//! server's own payment-required result (challenge binding is on, as by default).
#![cfg(all(feature = "mcp", feature = "test-util", feature = "axum"))]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use common::process;
use http::Request;
use http_body_util::{BodyExt, Full};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Value, json};
use tower_x402::mcp::{PaidTool, tool_layer};
use tower_x402::nonce::{ClaimToken, NonceKey, Reservation, StoreError};
use tower_x402::proto::X402Version;
use tower_x402::proto::v2::PaymentRequirements;
use tower_x402::settle::{SettleError, Settlement, Settler};
use tower_x402::test_util::{demo_payer, pay};
use tower_x402::{MemoryNonceStore, NonceStore, PaymentLayerBuilder, VerifiedPayment};

const PAY_TO: &str = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC";
const NONCE_USED: &str = "invalid_exact_evm_nonce_already_used";

// ------------------------------------------------------------------------------------------------
// The server

/// A weather server: `ping` is free, `weather` is paid; `runs` counts the paid tool's runs.
/// `fail` makes the paid tool answer `isError: true`.
#[derive(Clone)]
struct Weather {
    paid: PaidTool,
    runs: Arc<AtomicUsize>,
    fail: bool,
}

fn object(value: Value) -> Arc<serde_json::Map<String, Value>> {
    Arc::new(value.as_object().cloned().unwrap_or_default())
}

impl ServerHandler for Weather {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _cx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(vec![
            Tool::new("ping", "free", object(json!({"type": "object"}))),
            Tool::new("weather", "paid", object(json!({"type": "object"}))),
        ]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        cx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if request.name == "ping" {
            return Ok(CallToolResponse::Complete(CallToolResult::success(vec![
                ContentBlock::text("pong"),
            ])));
        }
        let city = request
            .arguments
            .as_ref()
            .and_then(|a| a.get("city"))
            .and_then(Value::as_str)
            .unwrap_or("Paris")
            .to_owned();
        let runs = self.runs.clone();
        let fail = self.fail;
        let result = self
            .paid
            .call(&request, &cx, move |_payment| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                // Hold the run a little so that concurrent copies overlap it.
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(if fail {
                    CallToolResult::error(vec![ContentBlock::text("upstream down")])
                } else {
                    CallToolResult::success(vec![ContentBlock::text(format!(
                        "{city}: sunny, 21 °C"
                    ))])
                })
            })
            .await?;
        Ok(CallToolResponse::Complete(result))
    }
}

/// A memory nonce store that yields around every call, so that concurrent claims interleave.
struct Yielding(MemoryNonceStore);

#[async_trait]
impl NonceStore for Yielding {
    async fn reserve(&self, key: &NonceKey, expires_at: u64) -> Result<Reservation, StoreError> {
        tokio::task::yield_now().await;
        let r = self.0.reserve(key, expires_at).await;
        tokio::task::yield_now().await;
        r
    }
    async fn consume(&self, key: &NonceKey, token: ClaimToken) -> Result<(), StoreError> {
        tokio::task::yield_now().await;
        self.0.consume(key, token).await
    }
    async fn release(&self, key: &NonceKey, token: ClaimToken) -> Result<(), StoreError> {
        tokio::task::yield_now().await;
        self.0.release(key, token).await
    }
}

/// A nonce store that is down: every claim is refused as unavailable.
struct Down;

#[async_trait]
impl NonceStore for Down {
    async fn reserve(&self, _key: &NonceKey, _expires: u64) -> Result<Reservation, StoreError> {
        Err(StoreError::Unavailable {
            retry_after: Some(Duration::from_secs(7)),
            source: "store down".into(),
        })
    }
    async fn consume(&self, _key: &NonceKey, _token: ClaimToken) -> Result<(), StoreError> {
        Ok(())
    }
    async fn release(&self, _key: &NonceKey, _token: ClaimToken) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A settler whose settlement fails: refused (`unknown` false) or with an unknown outcome.
struct FailingSettle {
    unknown: bool,
}

#[async_trait]
impl Settler for FailingSettle {
    async fn settle(&self, _payment: &VerifiedPayment) -> Result<Settlement, SettleError> {
        Err(if self.unknown {
            SettleError::Unknown {
                transaction: None,
                retry_after: Some(Duration::from_secs(12)),
                source: "no receipt".into(),
            }
        } else {
            SettleError::Refused {
                reason: tower_x402::reason::Reason::from_wire("insufficient_funds")
                    .expect("a reason"),
                transaction: None,
            }
        })
    }
}

fn weather_layer() -> PaymentLayerBuilder {
    tool_layer("weather")
        .pay_to(PAY_TO.parse().expect("address"))
        .price("$0.001")
        .network(tower_x402::Network::BASE_SEPOLIA)
}

struct Server {
    addr: SocketAddr,
    runs: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

async fn serve_with(layer: PaymentLayerBuilder, fail: bool) -> Server {
    let layer = layer.build().expect("valid layer");
    let runs = Arc::new(AtomicUsize::new(0));
    let server = Weather {
        paid: PaidTool::new("weather", &layer),
        runs: runs.clone(),
        fail,
    };
    let mcp = StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let (addr, task) = common::serve(axum::Router::new().nest_service("/mcp", mcp)).await;
    Server {
        addr,
        runs,
        _task: task,
    }
}

async fn serve() -> Server {
    let store = Yielding(MemoryNonceStore::new());
    serve_with(weather_layer().nonce_store(store), false).await
}

// ------------------------------------------------------------------------------------------------
// A raw JSON-RPC client over streamable HTTP

/// One MCP session: `initialize` done, then requests by POST with the session id.
struct Session {
    http: common::WireClient,
    url: String,
    id: String,
}

/// What a POST answered: the HTTP status and the JSON-RPC message, if one came back.
struct Answer {
    status: u16,
    message: Option<Value>,
}

impl Session {
    async fn open(addr: SocketAddr) -> Session {
        let mut s = Session {
            http: common::client(),
            url: format!("http://{addr}/mcp"),
            id: String::new(),
        };
        let (status, headers, _) = s
            .post_raw(
                json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": {"name": "tests/mcp.rs", "version": "1"}}}),
            )
            .await;
        assert_eq!(status, 200, "initialize");
        s.id = headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .expect("a session id")
            .to_owned();
        let (status, _, _) = s
            .post_raw(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        assert_eq!(status, 202, "initialized notification");
        s
    }

    async fn post_raw(&self, body: Value) -> (u16, http::HeaderMap, String) {
        self.post_bytes(body.to_string().into_bytes()).await
    }

    async fn post_bytes(&self, body: Vec<u8>) -> (u16, http::HeaderMap, String) {
        let mut req = Request::post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-06-18");
        if !self.id.is_empty() {
            req = req.header("mcp-session-id", &self.id);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .expect("valid request");
        let res = self.http.request(req).await.expect("request over loopback");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.expect("body").to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    /// `tools/call` with `params` (name, arguments, `_meta` ...).
    async fn call(&self, params: Value) -> Answer {
        // Ids must be unique within a session: the server matches answers by id.
        static ID: AtomicUsize = AtomicUsize::new(100);
        let id = ID.fetch_add(1, Ordering::SeqCst);
        self.request(json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params}))
            .await
    }

    async fn request(&self, body: Value) -> Answer {
        let (status, _, text) = self.post_raw(body).await;
        Answer {
            status,
            message: message(&text),
        }
    }
}

/// The JSON-RPC message in an SSE stream (`data: {...}` lines) or a JSON body.
fn message(text: &str) -> Option<Value> {
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        return Some(v);
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find(|v| v.get("id").is_some())
}

impl Answer {
    fn result(&self) -> &Value {
        self.message
            .as_ref()
            .and_then(|m| m.get("result"))
            .unwrap_or_else(|| panic!("no result: {} {:?}", self.status, self.message))
    }
    fn error(&self) -> Option<&Value> {
        self.message.as_ref().and_then(|m| m.get("error"))
    }
    fn is_paid_success(&self) -> bool {
        self.message
            .as_ref()
            .and_then(|m| m.get("result"))
            .is_some_and(|r| {
                r["isError"] != json!(true)
                    && r["_meta"]["x402/payment-response"]["success"] == true
            })
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// The payment-required document of an unpaid call.
async fn challenge(s: &Session) -> Value {
    let a = s.call(json!({"name": "weather", "arguments": {}})).await;
    a.result()["structuredContent"].clone()
}

/// A v2 payment for the challenge's first requirement, as the `_meta["x402/payment"]` object,
/// echoing its `resource` as official clients do.
fn payment_for(doc: &Value) -> Value {
    let req: PaymentRequirements =
        serde_json::from_value(doc["accepts"][0].clone()).expect("requirements");
    payment_for_requirements(&req, doc)
}

fn payment_for_requirements(req: &PaymentRequirements, doc: &Value) -> Value {
    let (_, header) = pay(&demo_payer(), req, now(), X402Version::V2);
    let bytes = STANDARD.decode(header.as_bytes()).expect("base64");
    let mut payload: Value = serde_json::from_slice(&bytes).expect("json");
    payload["resource"] = doc["resource"].clone();
    payload
}

// ------------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_payment_gets_the_spec_payment_required_result() {
    let server = serve().await;
    let s = Session::open(server.addr).await;
    let a = s
        .call(json!({"name": "weather", "arguments": {"city": "Oslo"}}))
        .await;
    let r = a.result();
    assert_eq!(r["isError"], true, "{r:#}");
    let doc = &r["structuredContent"];
    assert_eq!(doc["x402Version"], 2);
    assert_eq!(doc["error"], "Payment required to access this tool");
    assert_eq!(doc["resource"]["url"], "mcp://tool/weather");
    assert_eq!(doc["resource"]["mimeType"], "application/json");
    let accept = &doc["accepts"][0];
    assert_eq!(accept["scheme"], "exact");
    assert_eq!(accept["network"], "eip155:84532");
    assert_eq!(accept["amount"], "1000");
    assert!(
        accept["payTo"]
            .as_str()
            .unwrap()
            .eq_ignore_ascii_case(PAY_TO)
    );
    assert!(
        accept["extra"]["challenge"].is_string(),
        "bound challenge id: {accept}"
    );
    // content[0].text is the same document as JSON text.
    let text = r["content"][0]["text"].as_str().expect("text content");
    assert_eq!(&serde_json::from_str::<Value>(text).unwrap(), doc);
    assert_eq!(server.runs.load(Ordering::SeqCst), 0);
    // A free tool stays free.
    let a = s.call(json!({"name": "ping", "arguments": {}})).await;
    assert_eq!(a.result()["content"][0]["text"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paid_call_runs_once_and_returns_the_receipt_then_replay_is_refused() {
    let server = serve().await;
    let s = Session::open(server.addr).await;
    let doc = challenge(&s).await;
    let meta = json!({"x402/payment": payment_for(&doc)});
    let a = s
        .call(json!({"name": "weather", "arguments": {"city": "Oslo"}, "_meta": meta}))
        .await;
    let r = a.result();
    assert_eq!(r["content"][0]["text"], "Oslo: sunny, 21 °C", "{r:#}");
    let receipt = &r["_meta"]["x402/payment-response"];
    assert_eq!(receipt["success"], true, "{r:#}");
    assert_eq!(receipt["network"], "eip155:84532");
    assert!(
        receipt["payer"]
            .as_str()
            .unwrap()
            .eq_ignore_ascii_case(&demo_payer().address().to_string())
    );
    assert_eq!(server.runs.load(Ordering::SeqCst), 1);

    let again = s
        .call(json!({"name": "weather", "arguments": {}, "_meta": meta}))
        .await;
    let r = again.result();
    assert_eq!(r["isError"], true);
    assert_eq!(r["structuredContent"]["error"], NONCE_USED, "{r:#}");
    assert_eq!(
        server.runs.load(Ordering::SeqCst),
        1,
        "a replay never runs the tool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_copies_of_one_payment_run_the_tool_once() {
    let server = serve().await;
    let first = Session::open(server.addr).await;
    let meta = json!({"x402/payment": payment_for(&challenge(&first).await)});
    let mut sessions = Vec::new();
    for _ in 0..8 {
        sessions.push(Arc::new(Session::open(server.addr).await));
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let s = sessions[i % sessions.len()].clone();
            let meta = meta.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                s.call(json!({"name": "weather", "arguments": {}, "_meta": meta}))
                    .await
            })
        })
        .collect();
    let mut paid = 0;
    for t in tasks {
        let a = t.await.expect("task");
        if a.is_paid_success() {
            paid += 1;
        } else {
            // Every other copy is refused: a payment-required result or a retry error.
            let refused = a.error().is_some()
                || a.message
                    .as_ref()
                    .and_then(|m| m.get("result"))
                    .is_some_and(|r| r["isError"] == true);
            assert!(refused, "{:?}", a.message);
        }
    }
    assert_eq!(paid, 1, "exactly one copy is served");
    assert_eq!(
        server.runs.load(Ordering::SeqCst),
        1,
        "one proof, one tool run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_payments_never_run_the_tool() {
    let server = serve().await;
    let s = Session::open(server.addr).await;
    let doc = challenge(&s).await;

    // A bad signature: the payer's signature with one byte changed.
    let mut bad_sig = payment_for(&doc);
    let sig = bad_sig["payload"]["signature"].as_str().unwrap().to_owned();
    let flipped = if sig.ends_with('0') { "1" } else { "0" };
    bad_sig["payload"]["signature"] = json!(format!("{}{flipped}", &sig[..sig.len() - 1]));
    // A wrong amount: the challenge's requirement, signed for less.
    let mut cheap: PaymentRequirements = serde_json::from_value(doc["accepts"][0].clone()).unwrap();
    cheap.amount = "1".parse().unwrap();
    let wrong_amount = payment_for_requirements(&cheap, &doc);
    // Another tool's resource.
    let mut other = payment_for(&doc);
    other["resource"]["url"] = json!("mcp://tool/other");

    for (what, payment) in [
        ("bad signature", bad_sig),
        ("wrong amount", wrong_amount),
        ("other resource", other),
    ] {
        let a = s
            .call(json!({"name": "weather", "arguments": {}, "_meta": {"x402/payment": payment}}))
            .await;
        let r = a.result();
        assert_eq!(r["isError"], true, "{what}: {r:#}");
        let reason = r["structuredContent"]["error"].as_str().unwrap_or("");
        assert!(!reason.is_empty(), "{what}: a reason: {r:#}");
        assert!(
            r["structuredContent"]["accepts"].is_array(),
            "{what}: a fresh challenge"
        );
        assert!(
            r.get("_meta")
                .is_none_or(|m| m.get("x402/payment-response").is_none())
        );
    }
    assert_eq!(server.runs.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_meta_gets_a_clear_error_never_a_panic() {
    let server = serve().await;
    let s = Session::open(server.addr).await;
    let huge = "A".repeat(256 * 1024);
    for (what, payment) in [
        ("number", json!(5)),
        ("array", json!([1, 2, 3])),
        ("bool", json!(true)),
        ("not json text", json!("{not json")),
        ("huge string", json!(huge)),
        ("huge object", json!({"x402Version": 2, "pad": huge})),
        (
            "wrong types",
            json!({"x402Version": "two", "accepted": 7, "payload": []}),
        ),
        (
            "nested deep",
            serde_json::from_str::<Value>(&format!("{}{}", "[".repeat(100), "]".repeat(100)))
                .unwrap(),
        ),
    ] {
        let a = s
            .call(json!({"name": "weather", "arguments": {}, "_meta": {"x402/payment": payment}}))
            .await;
        let r = a.result();
        assert_eq!(r["isError"], true, "{what}: {r:#}");
        let reason = r["structuredContent"]["error"].as_str().unwrap_or("");
        assert!(reason.starts_with("invalid"), "{what}: {reason} {r:#}");
    }
    // `_meta` itself not an object, `params` not an object: a JSON-RPC or HTTP error.
    for params in [
        json!({"name": "weather", "arguments": {}, "_meta": "x"}),
        json!({"name": "weather", "arguments": {}, "_meta": [1]}),
        json!("params"),
    ] {
        let a = s
            .request(json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": params}))
            .await;
        let clear = a.status >= 400 || a.error().is_some();
        assert!(clear, "{params}: {} {:?}", a.status, a.message);
    }
    let (status, _, _) = s
        .post_bytes(b"{\"jsonrpc\": \"2.0\", \"id\": 1, ".to_vec())
        .await;
    assert!(status >= 400, "a truncated body: {status}");
    // The server is still up, and nothing ran.
    let a = s.call(json!({"name": "ping", "arguments": {}})).await;
    assert_eq!(a.result()["content"][0]["text"], "pong");
    assert_eq!(server.runs.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_down_is_a_retry_error_and_the_tool_does_not_run() {
    let server = serve_with(weather_layer().nonce_store(Down), false).await;
    let s = Session::open(server.addr).await;
    let meta = json!({"x402/payment": payment_for(&challenge(&s).await)});
    let a = s
        .call(json!({"name": "weather", "arguments": {}, "_meta": meta}))
        .await;
    let e = a
        .error()
        .unwrap_or_else(|| panic!("an MCP error: {:?}", a.message));
    let text = e["message"].as_str().unwrap_or("");
    assert!(text.contains("retry"), "{e}");
    assert_eq!(e["data"]["retryAfter"], 7, "{e}");
    assert_eq!(server.runs.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_tool_is_not_charged_and_its_proof_can_be_retried() {
    // Two servers of the same tool sharing one nonce store: the first one's tool fails.
    let store = Arc::new(MemoryNonceStore::new());
    let failing = serve_with(weather_layer().nonce_store(store.clone()), true).await;
    let working = serve_with(weather_layer().nonce_store(store), false).await;
    let s = Session::open(failing.addr).await;
    let meta = json!({"x402/payment": payment_for(&challenge(&s).await)});
    let a = s
        .call(json!({"name": "weather", "arguments": {}, "_meta": meta.clone()}))
        .await;
    let r = a.result();
    // The tool's own error result, with no receipt: nothing was settled.
    assert_eq!(r["isError"], true, "{r:#}");
    assert_eq!(r["content"][0]["text"], "upstream down", "{r:#}");
    assert!(
        r.get("_meta")
            .is_none_or(|m| m.get("x402/payment-response").is_none())
    );
    assert_eq!(failing.runs.load(Ordering::SeqCst), 1);

    // The proof was given back: it still pays a run that works, once.
    let w = Session::open(working.addr).await;
    let a = w
        .call(json!({"name": "weather", "arguments": {}, "_meta": meta}))
        .await;
    assert!(a.is_paid_success(), "{:?}", a.message);
    assert_eq!(working.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_settlement_returns_the_payment_error_not_the_tools_content() {
    let server = serve_with(
        weather_layer().settler(FailingSettle { unknown: false }),
        false,
    )
    .await;
    let s = Session::open(server.addr).await;
    let meta = json!({"x402/payment": payment_for(&challenge(&s).await)});
    let a = s
        .call(json!({"name": "weather", "arguments": {}, "_meta": meta}))
        .await;
    let r = a.result();
    assert_eq!(r["isError"], true, "{r:#}");
    assert_eq!(
        r["structuredContent"]["error"], "insufficient_funds",
        "{r:#}"
    );
    assert_eq!(
        r["structuredContent"]["x402/payment-response"]["success"], false,
        "{r:#}"
    );
    assert!(!r.to_string().contains("sunny"), "no tool content: {r:#}");
    assert_eq!(server.runs.load(Ordering::SeqCst), 1);

    // Outcome unknown: an MCP error that says not to pay again.
    let server = serve_with(
        weather_layer().settler(FailingSettle { unknown: true }),
        false,
    )
    .await;
    let s = Session::open(server.addr).await;
    let meta = json!({"x402/payment": payment_for(&challenge(&s).await)});
    let a = s
        .call(json!({"name": "weather", "arguments": {}, "_meta": meta}))
        .await;
    let e = a
        .error()
        .unwrap_or_else(|| panic!("an MCP error: {:?}", a.message));
    assert_eq!(e["data"]["reason"], "settlement_outcome_unknown", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap_or("")
            .contains("do not pay again"),
        "{e}"
    );
    assert!(!a.message.as_ref().unwrap().to_string().contains("sunny"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_x402_mcp_client_pays_over_streamable_http_and_replay_is_refused() {
    let Some(deps) = process::test_deps("mcp_python", &["venv/bin/python"]) else {
        return;
    };
    let server = serve().await;
    let script = process::repo().join("tests/clients/mcp_pay.py");
    let python = deps.join("venv/bin/python");
    let url = format!("http://{}/mcp", server.addr);
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(python);
        cmd.arg(script)
            .args([
                "--url",
                &url,
                "--tool",
                "weather",
                "--args",
                r#"{"city":"Oslo"}"#,
            ])
            .arg("--replay")
            .env("X402_TEST_DEPS", &deps);
        process::run(&mut cmd, Duration::from_secs(90), String::new)
    })
    .await
    .expect("client task");
    let line = out.stdout.lines().last().unwrap_or("");
    let r: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("client output ({e}): {}\n{}", out.stdout, out.stderr));
    assert_eq!(r["error"], Value::Null, "{r:#}\n{}", out.stderr);
    assert_eq!(r["paymentMade"], true, "{r:#}");
    assert_eq!(r["isError"], false, "{r:#}");
    assert_eq!(r["content"][0]["text"], "Oslo: sunny, 21 °C", "{r:#}");
    assert_eq!(r["paymentResponse"]["success"], true, "{r:#}");
    assert_eq!(r["paymentResponse"]["network"], "eip155:84532", "{r:#}");
    assert_eq!(r["replay"]["isError"], true, "{r:#}");
    assert_eq!(
        r["replay"]["structuredContent"]["error"], NONCE_USED,
        "{r:#}"
    );
    assert_eq!(
        server.runs.load(Ordering::SeqCst),
        1,
        "one payment, one run"
    );
}
