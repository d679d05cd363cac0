//! Paid MCP tools: x402 prices on the tools of an [`rmcp`] server, paid through the same
//! [`PaymentLayer`] engine as HTTP routes (feature `mcp`).
//!
//! The wire format is the tool-result binding of the x402 MCP transport
//! (`specs/transports-v2/mcp.md`), as the reference SDKs (`@x402/mcp`, Python `x402.mcp`)
//! speak it:
//!
//! - a call without `params._meta["x402/payment"]` gets a tool result with `isError: true`
//!   whose `structuredContent` is the v2 `PaymentRequired` document (the one an HTTP 402
//!   carries in `PAYMENT-REQUIRED`, bound challenge ids included, `error` set to the
//!   reference's "Payment required to access this tool") and whose `content[0].text` is the
//!   same document as JSON text;
//! - a call with a `PaymentPayload` there is decoded, matched, verified, claimed and settled
//!   by the tool's layer (its verifier, nonce store, settler, hooks and alerts), the tool
//!   runs once, and the settlement response comes back in the result's
//!   `_meta["x402/payment-response"]`;
//! - a refused payment (bad signature, wrong amount, spent nonce, malformed payload, ...)
//!   gets the payment-required result again with the refusal's reason in its `error` field
//!   (`invalid_signature`, `nonce_already_used`, ...), and the tool does not run;
//! - a payment the server cannot judge now (store or chain down, overloaded: HTTP 503/429)
//!   is an MCP error (`-32603`) whose message says to retry and whose `data` carries
//!   `reason` and `retryAfter` seconds; the proof is not spent. A settlement whose outcome is
//!   unknown (`settlement_outcome_unknown`) is the same error saying *not* to pay again, with
//!   the receipt (if any) in `data["x402/payment-response"]`.
//!
//! # What is charged when
//!
//! Exactly what an HTTP route of the same layer charges: one proof buys one tool run. The
//! tool's answer plays the handler's status: a result with `isError: true` (or an `Err`)
//! is a failed handler (HTTP 5xx), so nothing is settled and the proof is given back, and
//! the tool's own result is returned unchanged. A settlement that fails after the tool ran
//! returns only the payment error, never the tool's content (as the spec says). With
//! [`SettlementMode::BeforeHandler`](crate::settle::SettlementMode) the payment is settled
//! before the tool runs.
//!
//! # How
//!
//! Each [`PaidTool`] owns a [`Payment`] service (its layer around a tiny service that runs
//! the tool). A call becomes an in-process `POST /{tool}` request carrying the payload as
//! `PAYMENT-SIGNATURE`; with the default resource base `mcp://tool` its `resource.url` is
//! `mcp://tool/{tool}`, the reference's name for a tool, so [`ResourceCheck`](crate::ResourceCheck)
//! and challenge binding hold as for HTTP. Layers of several tools share stores and settlers
//! as HTTP layers do (the default nonce store is already one per process).
//!
//! # Example
//!
//! ```no_run
//! use rmcp::model::{CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock};
//! use rmcp::service::RequestContext;
//! use rmcp::{ErrorData, RoleServer, ServerHandler};
//! use tower_x402::mcp::{PaidTool, tool_layer};
//! use tower_x402::Network;
//! use tower_x402::primitives::address;
//!
//! #[derive(Clone)]
//! struct Weather {
//!     paid: PaidTool,
//! }
//!
//! impl ServerHandler for Weather {
//!     async fn call_tool(
//!         &self,
//!         request: CallToolRequestParams,
//!         cx: RequestContext<RoleServer>,
//!     ) -> Result<CallToolResponse, ErrorData> {
//!         let city = request
//!             .arguments
//!             .as_ref()
//!             .and_then(|a| a.get("city"))
//!             .and_then(|c| c.as_str())
//!             .unwrap_or("Paris")
//!             .to_owned();
//!         // Runs the closure only for a verified, claimed payment; settles after it.
//!         let result = self
//!             .paid
//!             .call(&request, &cx, move |_payment| async move {
//!                 Ok(CallToolResult::success(vec![ContentBlock::text(format!(
//!                     "{city}: sunny, 21 °C"
//!                 ))]))
//!             })
//!             .await?;
//!         Ok(CallToolResponse::Complete(result))
//!     }
//! }
//!
//! let layer = tool_layer("weather")
//!     .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
//!     .price("$0.001")
//!     .network(Network::BASE_SEPOLIA)
//!     .build()
//!     .unwrap();
//! let weather = Weather { paid: PaidTool::new("weather", &layer) };
//! # let _ = weather;
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::Empty;
use rmcp::model::{CallToolRequestParams, CallToolResult, ContentBlock, MetaObject};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer};
use serde_json::{Map, Value};
use tower_layer::Layer;
use tower_service::Service;

use crate::alert::{Alert, alert};
use crate::proto::header::{PAYMENT_REQUIRED, PAYMENT_RESPONSE, PAYMENT_SIGNATURE};
use crate::{Payment, PaymentLayer, PaymentLayerBuilder, PaymentRejection, VerifiedPayment};

/// `params._meta` key of the client's `PaymentPayload`.
pub const PAYMENT_META_KEY: &str = "x402/payment";
/// `result._meta` key of the server's settlement response.
pub const PAYMENT_RESPONSE_META_KEY: &str = "x402/payment-response";
/// The resource base a [`PaidTool`] gets when its builder names none: tool `t` is the
/// resource `mcp://tool/t`, as in the reference SDKs.
pub const DEFAULT_RESOURCE_BASE: &str = "mcp://tool";

/// The `error` of the payment-required result of a call without payment (the reference's).
const NO_PAYMENT: &str = "Payment required to access this tool";

type ToolFuture = Pin<Box<dyn Future<Output = Result<CallToolResult, ErrorData>> + Send>>;
type Job = Box<dyn FnOnce(VerifiedPayment) -> ToolFuture + Send>;

/// One call's tool run, handed to [`RunTool`] through the request's extensions, and its
/// answer, read back after the layer returns.
#[derive(Clone, Default)]
struct Slot(Arc<Mutex<SlotState>>);

#[derive(Default)]
struct SlotState {
    job: Option<Job>,
    answer: Option<Result<CallToolResult, ErrorData>>,
}

impl Slot {
    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        // A panic elsewhere cannot leave the state half-written: take the guard anyway.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The handler behind a tool's layer: runs the call's job once, with the verified payment.
/// Its status is the tool's outcome, so the layer settles only a tool that succeeded.
#[derive(Clone, Copy, Debug, Default)]
struct RunTool;

impl<B> Service<Request<B>> for RunTool {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let slot = req.extensions().get::<Slot>().cloned();
        let payment = req.extensions().get::<VerifiedPayment>().cloned();
        Box::pin(async move {
            let status = |s: StatusCode| {
                let mut res = Response::new(Empty::new());
                *res.status_mut() = s;
                Ok(res)
            };
            // Only the layer calls this service, and only for a paid call: anything else
            // (a free pricing function, a second run) must not run the tool.
            let (Some(slot), Some(payment)) = (slot, payment) else {
                return status(StatusCode::INTERNAL_SERVER_ERROR);
            };
            let Some(job) = slot.state().job.take() else {
                return status(StatusCode::INTERNAL_SERVER_ERROR);
            };
            let answer = job(payment).await;
            let ok = matches!(&answer, Ok(r) if r.is_error != Some(true));
            slot.state().answer = Some(answer);
            status(if ok {
                StatusCode::OK
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            })
        })
    }
}

/// A layer builder with the reference's defaults for the tool `name`: the resource base
/// [`DEFAULT_RESOURCE_BASE`], the description `Tool: {name}` and the MIME type
/// `application/json`. Set the price, payee, verifier, stores and settler on it as for
/// HTTP, then give the built layer to [`PaidTool::new`].
pub fn tool_layer(name: &str) -> PaymentLayerBuilder {
    PaymentLayer::builder()
        .resource_base(DEFAULT_RESOURCE_BASE)
        .description(format!("Tool: {name}"))
        .mime_type("application/json")
}

/// One priced MCP tool: its name and the payment layer that guards it. Cheap to clone
/// (clones share the layer's stores). Call [`PaidTool::call`] from your
/// [`ServerHandler::call_tool`](rmcp::ServerHandler::call_tool).
#[derive(Clone)]
pub struct PaidTool {
    name: Arc<str>,
    uri: Uri,
    service: Payment<RunTool>,
}

impl std::fmt::Debug for PaidTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaidTool")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl PaidTool {
    /// Guards the tool `name` with `layer`: build it from [`tool_layer`] so that the
    /// resource URL is `mcp://tool/{name}`. A layer with another
    /// [`resource_base`](PaymentLayerBuilder::resource_base) names the tool
    /// `{base}/{name}`; one without any, `/{name}`.
    pub fn new(name: impl Into<String>, layer: &PaymentLayer) -> Self {
        let name: Arc<str> = name.into().into();
        Self {
            uri: tool_uri(&name),
            name,
            service: layer.layer(RunTool),
        }
    }

    /// The tool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `tool` if `request` (or its context `cx`, where rmcp puts a request's `_meta`)
    /// carries a payment that the layer accepts, and settles it as
    /// the layer says; otherwise answers with the payment-required result (see the
    /// [module docs](self)). `tool` gets the verified payment; it is called at most once
    /// and never for an unverified, refused or already used payment.
    ///
    /// `Err` is returned for an MCP-level failure: the payment service is unavailable (retry
    /// later, the proof is not spent), `tool` returned `Err`, or the answer of a spent proof
    /// cannot be returned.
    pub async fn call<F, Fut>(
        &self,
        request: &CallToolRequestParams,
        cx: &RequestContext<RoleServer>,
        tool: F,
    ) -> Result<CallToolResult, ErrorData>
    where
        F: FnOnce(VerifiedPayment) -> Fut + Send + 'static,
        Fut: Future<Output = Result<CallToolResult, ErrorData>> + Send + 'static,
    {
        // rmcp moves a request's `_meta` into its context; read both.
        let header =
            payment_header(request.meta.as_deref()).or_else(|| payment_header(Some(&cx.meta)));
        let Some(header) = header else {
            return self.payment_required(Some(NO_PAYMENT.to_owned())).await;
        };
        let slot = Slot::default();
        slot.state().job = Some(Box::new(move |payment| Box::pin(tool(payment))));
        let mut req = self.request();
        req.headers_mut().insert(PAYMENT_SIGNATURE, header);
        req.extensions_mut().insert(slot.clone());
        let res = self.run(req).await;
        let answer = slot.state().answer.take();
        let status = res.status();
        if status.is_success() {
            return self.paid(&res, answer);
        }
        let rejection = res.extensions().get::<PaymentRejection>().cloned();
        match (status, answer) {
            // The tool ran and failed: its own answer, nothing settled.
            (_, Some(answer)) if status.is_server_error() && rejection.is_none() => answer,
            (StatusCode::PAYMENT_REQUIRED, _) => Ok(required_result(&res, None)),
            (StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS, _) => {
                Err(unavailable(&res, rejection.as_ref()))
            }
            (s, _) if s.is_client_error() => {
                let reason = rejection
                    .as_ref()
                    .and_then(|r| r.reason.as_ref())
                    .map(|r| r.as_str().to_owned())
                    .unwrap_or_else(|| "invalid_payload".to_owned());
                self.payment_required(Some(reason)).await
            }
            _ => Err(ErrorData::internal_error(
                format!("paid tool {}: payment service failed ({status})", self.name),
                None,
            )),
        }
    }

    /// The payment-required result for this tool, with `reason` as its `error`.
    async fn payment_required(&self, reason: Option<String>) -> Result<CallToolResult, ErrorData> {
        let res = self.run(self.request()).await;
        if res.status() != StatusCode::PAYMENT_REQUIRED {
            return Err(ErrorData::internal_error(
                format!(
                    "paid tool {}: no payment challenge ({}); is the tool priced?",
                    self.name,
                    res.status()
                ),
                None,
            ));
        }
        Ok(required_result(&res, reason))
    }

    fn request(&self) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.uri.clone();
        req
    }

    async fn run(
        &self,
        req: Request<Empty<Bytes>>,
    ) -> Response<crate::body::ResponseBody<Empty<Bytes>>> {
        let mut service = self.service.clone();
        // RunTool is always ready and its error is Infallible: neither can fail.
        let ready = std::future::poll_fn(|cx| {
            <Payment<RunTool> as Service<Request<Empty<Bytes>>>>::poll_ready(&mut service, cx)
        });
        match ready.await {
            Ok(()) => {}
            Err(never) => match never {},
        }
        match service.call(req).await {
            Ok(res) => res,
            Err(never) => match never {},
        }
    }

    /// A settled (or verify-only) call: the tool's result with the receipt in its `_meta`.
    fn paid<B>(
        &self,
        res: &Response<B>,
        answer: Option<Result<CallToolResult, ErrorData>>,
    ) -> Result<CallToolResult, ErrorData> {
        let Some(answer) = answer else {
            // A 2xx without a run here: an idempotent replay of a stored HTTP answer, which
            // has no tool result to give back. The proof is already spent.
            return Err(ErrorData::internal_error(
                format!(
                    "paid tool {}: this payment was already used; its answer cannot be replayed over MCP",
                    self.name
                ),
                None,
            ));
        };
        let mut result = answer?;
        if let Some(receipt) = res.headers().get(PAYMENT_RESPONSE) {
            match decode_document(receipt) {
                Some(receipt) => {
                    result
                        .meta
                        .get_or_insert_with(MetaObject::default)
                        .insert(PAYMENT_RESPONSE_META_KEY.to_owned(), receipt);
                }
                None => alert!(
                    Alert::ReceiptEncoding,
                    "paid MCP tool {}: the receipt header could not be decoded; the tool's result goes back without its receipt",
                    self.name
                ),
            }
        }
        Ok(result)
    }
}

/// `/{name}`, every byte outside the unreserved set percent-encoded: always a valid URI.
fn tool_uri(name: &str) -> Uri {
    let mut path = String::with_capacity(name.len() + 1);
    path.push('/');
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            path.push(char::from(b));
        } else {
            path.push_str(&format!("%{b:02X}"));
        }
    }
    Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/"))
}

/// The `PAYMENT-SIGNATURE` header for `_meta["x402/payment"]`: the payload object as base64
/// JSON. `None` when absent or `null`. A string is taken as the payload's JSON text (as the
/// Python SDK does); any other value is passed on as JSON so that the layer's decoder
/// refuses it with its usual reason, like a malformed HTTP header.
fn payment_header(meta: Option<&MetaObject>) -> Option<HeaderValue> {
    let value = meta?.get(PAYMENT_META_KEY)?;
    let json = match value {
        Value::Null => return None,
        Value::String(text) => text.as_bytes().to_vec(),
        other => serde_json::to_vec(other).ok()?,
    };
    // base64 is always a valid header value.
    HeaderValue::from_str(&STANDARD.encode(json)).ok()
}

/// A base64 JSON header (`PAYMENT-REQUIRED`, `PAYMENT-RESPONSE`) as a JSON object.
fn decode_document(header: &HeaderValue) -> Option<Value> {
    let bytes = STANDARD.decode(header.as_bytes()).ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    value.is_object().then_some(value)
}

/// The spec's payment-required tool result from a 402 of the layer: `structuredContent` is
/// the `PaymentRequired` document, `content[0].text` the same as JSON text. `reason`, if
/// any, replaces its `error`; a settlement response the 402 carries goes in as
/// `x402/payment-response`, as the reference does.
fn required_result<B>(res: &Response<B>, reason: Option<String>) -> CallToolResult {
    let mut doc = res
        .headers()
        .get(PAYMENT_REQUIRED)
        .and_then(decode_document)
        .unwrap_or_else(|| Value::Object(Map::new()));
    if let Value::Object(doc) = &mut doc {
        if let Some(reason) = reason {
            doc.insert("error".to_owned(), Value::String(reason));
        }
        if let Some(receipt) = res
            .headers()
            .get(PAYMENT_RESPONSE)
            .and_then(decode_document)
        {
            doc.insert(PAYMENT_RESPONSE_META_KEY.to_owned(), receipt);
        }
    }
    let text = doc.to_string();
    let mut result = CallToolResult::error(vec![ContentBlock::text(text)]);
    result.structured_content = Some(doc);
    result
}

/// 503/429: the payment could not be judged now, or its settlement's outcome is unknown.
fn unavailable<B>(res: &Response<B>, rejection: Option<&PaymentRejection>) -> ErrorData {
    let reason = rejection
        .and_then(|r| r.reason.as_ref())
        .map_or("unavailable", |r| r.as_str());
    let retry_after = rejection.and_then(|r| r.retry_after).map(|d| d.as_secs());
    let receipt = res
        .headers()
        .get(PAYMENT_RESPONSE)
        .and_then(decode_document);
    let message = if reason == crate::reason::SETTLEMENT_OUTCOME_UNKNOWN.as_str() {
        // The proof is kept, never settled twice: retrying it cannot help, paying again may
        // pay twice.
        "payment settlement outcome unknown (settlement_outcome_unknown): do not pay again; the \
         payment may have moved, check the receipt's transaction"
            .to_owned()
    } else {
        match retry_after {
            Some(secs) => {
                format!("payment service unavailable ({reason}): retry the same call in {secs} s")
            }
            None => format!("payment service unavailable ({reason}): retry the same call later"),
        }
    };
    ErrorData::internal_error(
        message,
        Some(serde_json::json!({
            "reason": reason,
            "retryAfter": retry_after,
            PAYMENT_RESPONSE_META_KEY: receipt,
        })),
    )
}
