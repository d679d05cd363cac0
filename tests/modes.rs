//! Settlement modes: when the money moves relative to the handler.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_x402::clock::FixedClock;
use tower_x402::primitives::{B256, address};
use tower_x402::proto::X402Version;
use tower_x402::settle::{SettleError, Settlement, SettlementMode, Settler};
use tower_x402::test_util::{demo_payer, pay};
use tower_x402::{ExactEvmVerifier, Network, PaymentLayer, VerifiedPayment};

const NOW: u64 = 1_760_000_000;

/// Records the order of events; refuses when told to.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<&'static str>>>);

struct RecordingSettler {
    log: Log,
    refuse: bool,
}

#[async_trait]
impl Settler for RecordingSettler {
    async fn settle(&self, _p: &VerifiedPayment) -> Result<Settlement, SettleError> {
        self.log.0.lock().unwrap().push("settle");
        if self.refuse {
            return Err(SettleError::Refused {
                reason: tower_x402::rejection::Reason::from_wire(
                    "invalid_exact_evm_insufficient_balance",
                )
                .expect("a catalogued reason"),
                transaction: None,
            });
        }
        Ok(Settlement {
            transaction: Some(B256::repeat_byte(0xab)),
            amount: None,
            ..Default::default()
        })
    }
}

async fn run(
    mode: SettlementMode,
    refuse: bool,
    status: StatusCode,
) -> (
    Response<tower_x402::body::ResponseBody<Full<Bytes>>>,
    Vec<&'static str>,
) {
    let log = Log::default();
    let layer = PaymentLayer::builder()
        .no_challenge_binding()
        .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
        .price("$0.001")
        .network(Network::BASE_SEPOLIA)
        .verifier(ExactEvmVerifier::new().with_clock(FixedClock::new(NOW)))
        .settler(RecordingSettler {
            log: log.clone(),
            refuse,
        })
        .settlement_mode(mode)
        .build()
        .unwrap();
    let handler_log = log.clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |_req: Request<()>| {
            let log = handler_log.clone();
            async move {
                log.0.lock().unwrap().push("handler");
                let mut res = Response::new(Full::new(Bytes::from_static(b"content")));
                *res.status_mut() = status;
                Ok::<_, Infallible>(res)
            }
        }));
    let option = tower_x402::PaymentOption::exact(
        &tower_x402::Asset::usdc_base_sepolia(),
        "$0.001",
        address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"),
    )
    .unwrap();
    let (name, value) = pay(&demo_payer(), option.requirements(), NOW, X402Version::V2);
    let req = Request::get("http://api.test/x")
        .header(name, value)
        .body(())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let events = log.0.lock().unwrap().clone();
    (res, events)
}

#[tokio::test]
async fn after_handler_settles_after_and_only_below_400() {
    let (res, events) = run(SettlementMode::AfterHandler, false, StatusCode::OK).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(events, ["handler", "settle"]);
    assert!(res.headers().contains_key("payment-response"));

    let (res, events) = run(
        SettlementMode::AfterHandler,
        false,
        StatusCode::INTERNAL_SERVER_ERROR,
    )
    .await;
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(events, ["handler"], "a failed handler is not settled");
    assert!(!res.headers().contains_key("payment-response"));
}

#[tokio::test]
async fn before_handler_settles_first_and_serves_after() {
    let (res, events) = run(SettlementMode::BeforeHandler, false, StatusCode::OK).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(events, ["settle", "handler"]);
    assert!(res.headers().contains_key("payment-response"));
    assert!(
        !res.body().is_from_layer(),
        "the handler's body streams through"
    );

    // Paid before it ran: a failing handler still carries the receipt of the money it got.
    let (res, events) = run(
        SettlementMode::BeforeHandler,
        false,
        StatusCode::INTERNAL_SERVER_ERROR,
    )
    .await;
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(events, ["settle", "handler"]);
    assert!(res.headers().contains_key("payment-response"));
}

#[tokio::test]
async fn before_handler_refused_settlement_never_runs_the_handler() {
    let (res, events) = run(SettlementMode::BeforeHandler, true, StatusCode::OK).await;
    assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(events, ["settle"], "no handler without money");
    let receipt = res
        .headers()
        .get("payment-response")
        .expect("failed receipt");
    use base64::Engine;
    let json: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(receipt)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(json["success"], false);
    assert_eq!(
        json["errorReason"],
        "invalid_exact_evm_insufficient_balance"
    );
}
