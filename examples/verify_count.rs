//! Exactly K operations of the paid path, for instruction counting (`scripts/callgrind`).
//!
//! ```sh
//! verify_count verify K    # K × (header decode + EvmVerifier verification)
//! verify_count recover K   # K × signature recovery alone (libsecp256k1 + address keccak)
//! verify_count decode K    # K × header decode alone (header lookup, base64, typed JSON)
//! verify_count challenge K # K × PaymentLayer answering a request without payment (402)
//! verify_count bare K      # K × the same inner service without the layer (baseline)
//! verify_count paid K N    # K × PaymentLayer's whole paid path (memory store, verify-only),
//!                          # K distinct payments out of N signed ones (N ≥ K, default K)
//! verify_count voucher K   # K × a batch-settlement voucher's in-process check (channel id,
//!                          # voucher digest, recovery: `channel::verify::authenticate`)
//! ```
//!
//! Setup is the same for every K (64 pre-made payloads, cycled; `paid` signs N whatever K),
//! so the difference between two runs divided by the difference of their K is the cost of
//! one operation, setup and process start cancelled out. The layer modes call the tower
//! service directly (no HTTP): every future there completes without waiting.

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use tower::{Layer, Service, ServiceExt};
use tower_x402::clock::FixedClock;
use tower_x402::nonce::MemoryNonceStore;
use tower_x402::primitives::{B256, Bytes, address};
use tower_x402::proto::PaymentPayload;
use tower_x402::proto::header::PAYMENT_SIGNATURE;
use tower_x402::proto::header::{Limits, decode_payload};
use tower_x402::test_util::{demo_payer, encode, exact_payload, pay_upto, upto_payload, v2_json};
use tower_x402::verify::exact::{domain_separator, recover_signer, signing_hash};
use tower_x402::{Asset, EvmVerifier, PaymentLayer, PaymentOption};

const NOW: u64 = 1_760_000_000;
const MADE: usize = 64;

/// The layer's decode: one header, base64, the typed payload of its version (one JSON pass).
fn decode(header: &HeaderValue) -> Option<PaymentPayload> {
    let mut headers = HeaderMap::new();
    headers.insert(PAYMENT_SIGNATURE, header.clone());
    decode_payload(&headers, Limits::default()).ok().flatten()
}

/// Polls a future that completes without waiting.
fn now_or_never<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("future did not complete immediately"),
    }
}

type Ready = std::future::Ready<Result<Response<String>, std::convert::Infallible>>;

/// The handler: "hello".
fn hello(_req: Request<String>) -> Ready {
    std::future::ready(Ok(Response::new("hello".to_owned())))
}

/// K requests through `svc`, each with the header `header(i)`, all answered `want`.
fn call_k<S, B>(
    mut svc: S,
    k: usize,
    header: impl Fn(usize) -> Option<HeaderValue>,
    want: StatusCode,
) -> usize
where
    S: Service<Request<String>, Response = Response<B>, Error = std::convert::Infallible>,
{
    let mut ok = 0;
    for i in 0..k {
        let mut req = Request::get("/weather")
            .header(http::header::HOST, "127.0.0.1:4021")
            .body(String::new())
            .expect("request");
        if let Some(h) = header(i) {
            req.headers_mut().insert(PAYMENT_SIGNATURE, h);
        }
        let ready = now_or_never(svc.ready()).expect("infallible");
        let res = now_or_never(ready.call(black_box(req))).expect("infallible");
        ok += usize::from(res.status() == want);
    }
    ok
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(mode), Some(k)) = (
        args.first(),
        args.get(1).and_then(|k| k.parse::<usize>().ok()),
    ) else {
        eprintln!(
            "usage: verify_count <verify|verify-upto|recover|decode|bare|challenge|paid|voucher> <K>"
        );
        std::process::exit(2);
    };
    let pay_to = address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
    let option =
        PaymentOption::exact(&Asset::usdc_base_sepolia(), "$0.001", pay_to).expect("option");
    let req = option.requirements().clone();
    let signer = demo_payer();
    let payloads: Vec<_> = (0..MADE)
        .map(|_| exact_payload(&signer, &req, NOW))
        .collect();
    let headers: Vec<HeaderValue> = payloads
        .iter()
        .map(|p| encode(&v2_json(&req, p, None)))
        .collect();
    let sep = domain_separator("USDC", "2", 84532, req.asset.evm().unwrap_or_default());
    let digests: Vec<(B256, Bytes)> = payloads
        .iter()
        .map(|p| (signing_hash(sep, &p.authorization), p.signature.clone()))
        .collect();
    // The layer's default: exact and upto, each by its own verifier.
    let verifier = EvmVerifier::new().with_clock(FixedClock::new(NOW));
    // Warm the verifier's domain-separator cache: the steady state of a server.
    let first = decode(&headers[0]).expect("decodes");
    verifier.verify_sync(&first, &req).expect("valid");

    let layer = || {
        PaymentLayer::builder()
            // Proofs are signed from requirements built here, not from a 402.
            .no_challenge_binding()
            .pay_to(pay_to)
            .price("$0.001")
            .network(tower_x402::Network::BASE_SEPOLIA)
            .nonce_store(MemoryNonceStore::new())
            .build()
            .expect("layer")
    };

    let mut ok = 0usize;
    match mode.as_str() {
        "bare" => ok = call_k(tower::service_fn(hello), k, |_| None, StatusCode::OK),
        "challenge" => {
            let svc = layer().layer(tower::service_fn(hello));
            ok = call_k(svc, k, |_| None, StatusCode::PAYMENT_REQUIRED);
        }
        "paid" => {
            // Valid at the system clock (the layer's verifier uses it).
            let n = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(k).max(k);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_secs();
            let signed: Vec<HeaderValue> = (0..n)
                .map(|_| encode(&v2_json(&req, &exact_payload(&signer, &req, now), None)))
                .collect();
            let svc = layer().layer(tower::service_fn(hello));
            ok = call_k(svc, k, |i| Some(signed[i].clone()), StatusCode::OK);
        }
        "verify" => {
            for i in 0..k {
                let payload = decode(black_box(&headers[i % MADE])).expect("decodes");
                ok += usize::from(verifier.verify_sync(&payload, &req).is_ok());
            }
        }
        "verify-upto" => {
            // The same, for a Permit2 `upto` proof of the same payer.
            let upto = PaymentOption::upto(&Asset::usdc_base_sepolia(), "$0.05", pay_to, pay_to)
                .expect("upto option");
            let upto_req = upto.requirements().clone();
            let headers: Vec<HeaderValue> = (0..MADE)
                .map(|_| pay_upto(&upto_req, &upto_payload(&signer, &upto_req, NOW)).1)
                .collect();
            for i in 0..k {
                let payload = decode(black_box(&headers[i % MADE])).expect("decodes");
                ok += usize::from(verifier.verify_sync(&payload, &upto_req).is_ok());
            }
        }
        "recover" => {
            for i in 0..k {
                let (digest, sig) = &digests[i % MADE];
                ok += usize::from(recover_signer(black_box(*digest), black_box(sig)).is_ok());
            }
        }
        "voucher" => ok = vouchers(&signer, k),
        "decode" => {
            for i in 0..k {
                ok += usize::from(decode(black_box(&headers[i % MADE])).is_some());
            }
        }
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
    assert_eq!(ok, k, "every operation must succeed");
    println!("{mode} {k} ok");
}

/// K voucher checks (`channel::verify::authenticate`) over 64 pre-signed vouchers of one
/// channel: how many succeed.
fn vouchers(signer: &tower_x402::test_util::PrivateKeySigner, k: usize) -> usize {
    use alloy_signer::SignerSync;
    use tower_x402::channel::{self, AssetTransferMethod, verify};
    use tower_x402::primitives::U256;
    use tower_x402::proto::batch::{BatchEvmPayload, ChannelConfig, Voucher};
    let pay_to = address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
    let authorizer = address!("0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc");
    let option = PaymentOption::batch_settlement(
        &Asset::usdc_base_sepolia(),
        U256::from(1_000),
        pay_to,
        authorizer,
        900,
        AssetTransferMethod::Eip3009,
    )
    .expect("option");
    let terms = verify::ChannelTerms::from_requirements(option.requirements()).expect("terms");
    let config = ChannelConfig {
        payer: signer.address(),
        payer_authorizer: signer.address(),
        receiver: pay_to,
        receiver_authorizer: authorizer,
        token: terms.token,
        withdraw_delay: 900,
        salt: B256::ZERO,
    };
    let id = channel::channel_id(terms.chain_id, &config);
    let payloads: Vec<BatchEvmPayload> = (1..=MADE as u128)
        .map(|n| {
            let ceiling = U256::from(n * 1_000);
            let digest = channel::voucher_digest(terms.chain_id, id, ceiling).expect("u128");
            let signature = signer.sign_hash_sync(&digest).expect("sign").as_bytes();
            BatchEvmPayload::Voucher {
                channel_config: config.clone(),
                voucher: Voucher {
                    channel_id: id,
                    max_claimable_amount: ceiling,
                    signature: Bytes::from(signature.to_vec()),
                },
            }
        })
        .collect();
    (0..k)
        .filter(|i| verify::authenticate(&terms, black_box(&payloads[i % MADE]), NOW).is_ok())
        .count()
}
