//! A `batch-settlement` payment: the channel engine ([`crate::channel::Serve`]) in place of
//! verify → claim → settle. Its proof's fate is the channel's lease and the compare-and-set
//! commit of the charged amount (decided in `channel::serve`, not in `claim.rs`): a refusal or
//! a failed handler leaves the channel as it was, so the same voucher can be retried. The
//! `before_verify` hooks run (they see the decoded payload); `after_verify`, idempotency and
//! the verification cap do not (there is no `VerifiedPayment`, and a voucher costs one
//! signature recovery).

use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError};

use alloy_primitives::B256;
use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::flow::{Answer, Flow, stage};
use crate::body::ResponseBody;
use crate::channel::serve::{EscrowPayment, Mirror, Paid, PayError};
use crate::channel::store::ChannelState;
use crate::channel::verify::{self, BatchError, ChannelTerms};
use crate::channel::{self as ch, Handler, Serve};
use crate::config::Shared;
use crate::hooks::Stage;
use crate::kept::Kept;
use crate::option::PaymentOption;
use crate::proto::batch::BatchEvmPayload;
use crate::proto::v2::PaymentRequirements;
use crate::proto::{PaymentPayload, header};
use crate::rejection::{Rejection, reason};
use crate::response;
use crate::upto::Usage;

impl<'a> Flow<'a> {
    /// The flow of a request whose head is `parts`.
    pub(super) fn of(shared: &'a Shared, options: &'a [PaymentOption], parts: &Parts) -> Self {
        Flow::new(
            shared,
            options,
            response::Resource::of(parts),
            parts.method.clone(),
        )
    }
}

/// What the handler left: its response, or the service's error.
type Outcome<R, E> = Mutex<Option<Result<R, E>>>;

/// Serves a request paid on a channel, in stages: [`admit`] (select, terms, parse), then the
/// engine's cooperative [`refund`], or the paid request: the handler [`run`] inside the
/// engine's [`Serve::pay`] (lease, checks, deposit, commit), then its [`answer`].
pub(super) async fn channel<S, ReqB, ResB>(
    shared: Arc<Shared>,
    inner: S,
    mut parts: Parts,
    body: ReqB,
    options: Arc<[PaymentOption]>,
    payload: PaymentPayload,
) -> Result<Answer<ResB>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Send,
    S::Future: Send,
    S::Error: Send,
    ReqB: Send,
    ResB: Body<Data = Bytes> + Send,
{
    let flow = Flow::of(&shared, &options, &parts);
    let admitted = stage!(admit(&flow, &options, &parts, &payload).await);
    if matches!(*admitted.batch, BatchEvmPayload::Refund { .. }) {
        return Ok(refund(&flow, &admitted).await);
    }
    // The handler meters the call when it wants to charge less than the price.
    let meter = Usage::new(admitted.req().amount);
    parts.extensions.insert(meter.clone());
    let slot: Outcome<Response<ResB>, S::Error> = Mutex::new(None);
    let handler = run(&slot, &meter, inner, Request::from_parts(parts, body));
    let result = admitted.channels.pay(admitted.payment(), handler).await;
    let handled = slot.into_inner().unwrap_or_else(PoisonError::into_inner);
    answer(&flow, &admitted, result, handled, &meter).await
}

/// A channel payment past selection: the engine, the option it pays, that option's terms and
/// the parsed payload (the header decoder's, when it read a voucher on its way).
struct Admitted<'a, 'p> {
    channels: &'a dyn Serve,
    option: &'a PaymentOption,
    terms: Arc<ChannelTerms>,
    batch: Cow<'p, BatchEvmPayload>,
}

impl Admitted<'_, '_> {
    fn req(&self) -> &PaymentRequirements {
        self.option.requirements()
    }

    fn channel(&self) -> B256 {
        self.batch.voucher().channel_id
    }

    fn payment(&self) -> EscrowPayment<'_> {
        EscrowPayment {
            terms: &self.terms,
            payload: &self.batch,
        }
    }
}

/// A refusal with the scheme's reason.
fn refuse(error: BatchError) -> Rejection {
    Rejection::Pay {
        reason: Some(error.reason()),
    }
}

/// The store, the chain or the authorizer failed: 503, nothing charged, retry the same payload.
fn unavailable(flow: &Flow<'_>) -> Rejection {
    Rejection::Unavailable {
        retry_after: flow.shared.retry_after,
        reason: reason::SERVICE_UNAVAILABLE,
    }
}

/// The stages before the engine: the layer has channels, the `before_verify` hooks, the
/// route's option this payload pays (a v2 payload), its terms, the payload parsed.
async fn admit<'a, 'p, B: Send>(
    flow: &Flow<'a>,
    options: &Arc<[PaymentOption]>,
    parts: &Parts,
    payload: &'p PaymentPayload,
) -> Result<Admitted<'a, 'p>, Answer<B>> {
    let Some(channels) = flow.shared.channels.as_deref() else {
        let r = Rejection::Pay {
            reason: Some(reason::UNSUPPORTED_SCHEME),
        };
        return Err(flow.reject(Stage::Select, r, None, None).await);
    };
    flow.before_verify(parts, payload).await?;
    let candidates = flow.select(payload).await?;
    let PaymentPayload::V2(p) = payload else {
        // `select` refuses v1 already: channels are v2 only.
        let r = refuse(BatchError::PayloadType);
        return Err(flow.reject(Stage::Decode, r, None, None).await);
    };
    let Some(&option) = candidates.first() else {
        let r = Rejection::Pay {
            reason: Some(reason::INVALID_PAYMENT_REQUIREMENTS),
        };
        return Err(flow.reject(Stage::Select, r, None, None).await);
    };
    let terms = match terms_of(options, option) {
        Ok(t) => t,
        Err(e) => return Err(flow.reject(Stage::Select, refuse(e), None, None).await),
    };
    // Read by the header decoder already (a compact voucher), else parsed here.
    let batch = match p.payload.batch() {
        Some(batch) => Cow::Borrowed(batch),
        None => match verify::parse_raw(p.payload.get()) {
            Ok(batch) => Cow::Owned(batch),
            Err(e) => return Err(flow.reject(Stage::Decode, refuse(e), None, None).await),
        },
    };
    Ok(Admitted {
        channels,
        option,
        terms,
        batch,
    })
}

/// Options whose terms were read lately on this thread: the options they belong to (held,
/// so that their memory is not reused while kept: the same address is the same option), the
/// option's address in them, its terms. Reused round-robin.
type KeptTerms = (
    Arc<[PaymentOption]>,
    *const PaymentOption,
    Arc<ChannelTerms>,
);

/// How many options' terms a thread keeps (a server has a few channel routes).
const TERMS_SLOTS: usize = 4;

thread_local! {
    /// Reading an option's terms (its `extra` map's lookups, the authorizer's hex, two
    /// `String`s) cost every voucher ~1.6k instructions; a route's options are the same
    /// `Arc` for every request (a dynamic price makes new ones: those miss and are read).
    static TERMS: std::cell::RefCell<Kept<KeptTerms, TERMS_SLOTS>> =
        const { std::cell::RefCell::new(Kept::new()) };
}

/// The terms of `option`, one of `options`: kept per thread, as [`TERMS`] says.
fn terms_of(
    options: &Arc<[PaymentOption]>,
    option: &PaymentOption,
) -> Result<Arc<ChannelTerms>, BatchError> {
    let at: *const PaymentOption = option;
    let kept = TERMS.with_borrow(|kept| {
        kept.iter()
            .find(|(o, p, _)| Arc::ptr_eq(o, options) && std::ptr::eq(*p, at))
            .map(|(_, _, terms)| terms.clone())
    });
    if let Some(terms) = kept {
        return Ok(terms);
    }
    let terms = Arc::new(ChannelTerms::from_requirements(option.requirements())?);
    // Only an option of `options` is kept under their `Arc` (a caller's own copy is not).
    if options.iter().any(|o| std::ptr::eq(o, at)) {
        TERMS.with_borrow_mut(|kept| kept.keep((options.clone(), at, terms.clone())));
    }
    Ok(terms)
}

/// A `refund` payload: the engine's cooperative refund, no handler; 200 with its receipt.
async fn refund<B: Send>(flow: &Flow<'_>, a: &Admitted<'_, '_>) -> Answer<B> {
    match a.channels.refund(a.payment()).await {
        Ok(done) => {
            let receipt = Receipt {
                req: a.req(),
                batch: &a.batch,
                mirror: Some(done.mirror),
                amount: done.amount,
                extra: done.state.as_ref().map(|s| (None, a.channel(), s)),
            };
            let res = Response::new(ResponseBody::full(Bytes::new()));
            with_receipt(flow.shared, res, &receipt)
        }
        Err(e) => refused(flow, a.option, a.channel(), e.into_unit()).await,
    }
}

/// The handler as the engine calls it: the response (or error) left in `slot`; what it
/// charged is the metered total, or the most it may charge when it metered nothing; a
/// 4xx/5xx answer or an overrun meter charges nothing.
fn run<'a, S, ReqB, ResB>(
    slot: &'a Outcome<Response<ResB>, S::Error>,
    meter: &'a Usage,
    mut inner: S,
    req: Request<ReqB>,
) -> Handler<'a>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Send + 'a,
    S::Future: Send,
    S::Error: Send,
    ReqB: Send + 'a,
    ResB: Send,
{
    Box::new(move |max: u128| {
        Box::pin(async move {
            let res = inner.call(req).await;
            let ok = matches!(&res, Ok(r) if !r.status().is_client_error() && !r.status().is_server_error());
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(res);
            if !ok || meter.is_overrun() {
                return Err(());
            }
            // Unmetered: the full price.
            let total = u128::try_from(meter.total()).unwrap_or(u128::MAX);
            Ok(((), if total == 0 { max } else { total }))
        })
    })
}

/// The answer to a paid request: the handler's response with the receipt when the engine
/// committed; the handler's own answer (or error) when it failed, nothing charged.
async fn answer<B: Send, E>(
    flow: &Flow<'_>,
    a: &Admitted<'_, '_>,
    result: Result<Paid<()>, PayError<()>>,
    handled: Option<Result<Response<B>, E>>,
    meter: &Usage,
) -> Result<Answer<B>, E> {
    match result {
        Ok(paid) => {
            let Some(Ok(res)) = handled else {
                // The engine commits only after the handler answered Ok.
                return Ok(flow
                    .reject(Stage::Settle, unavailable(flow), None, None)
                    .await);
            };
            let receipt = Receipt {
                req: a.req(),
                batch: &a.batch,
                mirror: paid.deposit,
                amount: paid.charged,
                extra: Some((Some(paid.charged), a.channel(), &paid.state)),
            };
            // Charged: a body that fails now is raised as for a settled payment.
            Ok(with_receipt(
                flow.shared,
                res.map(ResponseBody::paid),
                &receipt,
            ))
        }
        // The handler failed: its own answer (or error), nothing charged.
        Err(PayError::Handler(())) => match handled {
            Some(Ok(res)) if !meter.is_overrun() => Ok(res.map(ResponseBody::inner)),
            Some(Err(e)) => Err(e),
            _ => {
                let r = refuse(BatchError::ChargeExceedsSignedCumulative);
                Ok(flow.reject(Stage::Settle, r, None, None).await)
            }
        },
        Err(e) => Ok(refused(flow, a.option, a.channel(), e).await),
    }
}

/// `res` with `receipt` as its `PAYMENT-RESPONSE` and the layer's marks.
fn with_receipt<B>(shared: &Shared, mut res: Answer<B>, receipt: &Receipt<'_>) -> Answer<B> {
    res.headers_mut().insert(
        header::PAYMENT_RESPONSE,
        header::encode_json(&receipt.json()),
    );
    response::mark(shared, res.headers_mut());
    res
}

/// The answer to a request the engine refused: a 402 with the reason (the corrective 402
/// with the server's channel state when the cumulative amount is off), 503 when the store or
/// the chain failed (nothing was charged: retry the same payload).
async fn refused<B: Send>(
    flow: &Flow<'_>,
    option: &PaymentOption,
    channel: B256,
    e: PayError<()>,
) -> Answer<B> {
    match e {
        PayError::Refused {
            error: BatchError::CumulativeAmountMismatch,
            state: Some(state),
        } => corrective(flow, option, channel, &state).await,
        PayError::Refused { error, .. } => {
            flow.reject(Stage::Verify, refuse(error), None, None).await
        }
        PayError::RefundUnsupported => {
            let r = refuse(BatchError::RefundPayload);
            flow.reject(Stage::Verify, r, None, None).await
        }
        PayError::Escrow(e) => {
            flow.reject(Stage::Settle, unavailable(flow), None, Some(&e))
                .await
        }
        PayError::Store(e) => {
            flow.reject(Stage::Reserve, unavailable(flow), None, Some(&e))
                .await
        }
        PayError::Authorizer(_) | PayError::Handler(()) => {
            flow.reject(Stage::Settle, unavailable(flow), None, None)
                .await
        }
    }
}

/// The corrective 402: the route's challenge, with the channel's option carrying
/// `extra.channelState` and `extra.voucherState`.
async fn corrective<B: Send>(
    flow: &Flow<'_>,
    option: &PaymentOption,
    channel: B256,
    state: &ChannelState,
) -> Answer<B> {
    let fixed: Vec<PaymentOption> = flow
        .options
        .iter()
        .map(|o| {
            if o == option {
                PaymentOption::with_requirements(ch::corrective_requirements(
                    o.requirements(),
                    channel,
                    state,
                ))
            } else {
                o.clone()
            }
        })
        .collect();
    let r = refuse(BatchError::CumulativeAmountMismatch);
    let res = response::reject(flow.shared, &fixed, &flow.resource, r);
    flow.failed(Stage::Verify, &res, None, None).await;
    res
}

/// The channel's part of a receipt: what the handler charged (`None`: a refund), the
/// channel and its record after the request.
type ReceiptExtra<'a> = (Option<u128>, B256, &'a ChannelState);

/// The receipt (`PAYMENT-RESPONSE`): the deposit's or refund's transaction, `""` for a
/// voucher alone, and the channel's `extra` ([`ch::receipt_extra`]).
struct Receipt<'a> {
    req: &'a PaymentRequirements,
    batch: &'a BatchEvmPayload,
    mirror: Option<Mirror>,
    amount: u128,
    extra: Option<ReceiptExtra<'a>>,
}

impl Receipt<'_> {
    /// The receipt's JSON, written straight into the bytes the header's base64 encodes, keys
    /// in the order of `serde_json`'s sorted map (the bytes are those of the
    /// `serde_json::Value` it replaces: `tests::receipt_is_serde_json`); building that
    /// `Value` (a tree of maps and strings) cost a voucher request ~20k instructions. Every
    /// value is a decimal, hex or CAIP-2 string: nothing to escape.
    fn json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(b"{\"amount\":\"");
        decimal(&mut out, self.amount);
        out.push(b'"');
        if let Some((charged, channel, state)) = self.extra {
            out.extend_from_slice(b",\"extra\":{\"channelState\":");
            channel_state(&mut out, channel, state);
            if let Some(charged) = charged {
                out.extend_from_slice(b",\"chargedAmount\":\"");
                decimal(&mut out, charged);
                out.push(b'"');
            }
            out.push(b'}');
        }
        tail(
            &mut out,
            self.req.network,
            self.batch.channel_config().payer,
        );
        if let Some(m) = self.mirror {
            hex(&mut out, &m.transaction.0);
        }
        out.extend_from_slice(b"\"}");
        out
    }
}

/// [`ch::channel_state_json`]'s object, keys sorted as `serde_json` sorts them.
fn channel_state(out: &mut Vec<u8>, channel: B256, state: &ChannelState) {
    out.extend_from_slice(b"{\"balance\":\"");
    decimal(out, state.balance);
    out.extend_from_slice(b"\",\"channelId\":\"");
    hex(out, &channel.0);
    out.extend_from_slice(b"\",\"chargedCumulativeAmount\":\"");
    decimal(out, state.charged_cumulative);
    out.extend_from_slice(b"\",\"refundNonce\":\"");
    match u128::try_from(state.refund_nonce) {
        Ok(n) => decimal(out, n),
        Err(_) => out.extend_from_slice(state.refund_nonce.to_string().as_bytes()),
    }
    out.extend_from_slice(b"\",\"totalClaimed\":\"");
    decimal(out, state.total_claimed);
    out.extend_from_slice(b"\",\"withdrawRequestedAt\":");
    decimal(out, u128::from(state.withdraw_requested_at));
    out.push(b'}');
}

/// Payers' receipt tails (see [`tail`]) by payer, with their network, remembered: a payer pays
/// many vouchers, and each EIP-55 checksum is a Keccak (~5k instructions a receipt), the
/// network's name a formatting. Bounded: emptied when full.
static TAILS: std::sync::LazyLock<Mutex<Tails>> = std::sync::LazyLock::new(Default::default);

/// Receipt tails by payer, each with its network.
type Tails = alloy_primitives::map::AddressMap<(crate::Network, Box<[u8]>)>;

/// Appends `,"network":"<CAIP-2>","payer":"<EIP-55>","success":true,"transaction":"`: the
/// part of a receipt that is the same for every voucher of a payer on a network.
fn tail(out: &mut Vec<u8>, network: crate::Network, payer: alloy_primitives::Address) {
    let tails = || TAILS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, known)) = tails().get(&payer).filter(|(n, _)| *n == network) {
        out.extend_from_slice(known);
        return;
    }
    let mut checksum = [0u8; 42];
    let _ = payer.to_checksum_raw(&mut checksum, None);
    let mut text = Vec::with_capacity(128);
    text.extend_from_slice(b",\"network\":\"");
    text.extend_from_slice(network.caip2().as_bytes());
    text.extend_from_slice(b"\",\"payer\":\"");
    text.extend_from_slice(&checksum);
    text.extend_from_slice(b"\",\"success\":true,\"transaction\":\"");
    out.extend_from_slice(&text);
    let mut tails = tails();
    if tails.len() >= 4096 {
        tails.clear();
    }
    tails.insert(payer, (network, text.into_boxed_slice()));
}

/// `n` in decimal; amounts fit a `u64` (one division per digit, not `u128`'s slow one).
fn decimal(out: &mut Vec<u8>, n: u128) {
    let mut digits = [0u8; 39];
    let mut at = digits.len();
    let mut push = |d: u8| {
        at -= 1;
        digits[at] = b'0' + d;
    };
    match u64::try_from(n) {
        Ok(mut n) => loop {
            push((n % 10) as u8);
            n /= 10;
            if n == 0 {
                break;
            }
        },
        Err(_) => {
            let mut n = n;
            loop {
                push((n % 10) as u8);
                n /= 10;
                if n == 0 {
                    break;
                }
            }
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// `0x` and lowercase hex of 32 bytes, as alloy's serializer writes a `B256`.
fn hex(out: &mut Vec<u8>, bytes: &[u8; 32]) {
    let mut text = [0u8; 66];
    text[..2].copy_from_slice(b"0x");
    // 64 characters for 32 bytes: the slice has exactly that room.
    let _ = alloy_primitives::hex::encode_to_slice(bytes, &mut text[2..]);
    out.extend_from_slice(&text);
}

impl<E> PayError<E> {
    /// The refusal without the handler's error type (the caller keeps the handler's own).
    fn into_unit(self) -> PayError<()> {
        match self {
            PayError::Refused { error, state } => PayError::Refused { error, state },
            PayError::RefundUnsupported => PayError::RefundUnsupported,
            PayError::Authorizer(e) => PayError::Authorizer(e),
            PayError::Escrow(e) => PayError::Escrow(e),
            PayError::Store(e) => PayError::Store(e),
            PayError::Handler(_) => PayError::Handler(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use alloy_primitives::{Address, U256};

    use super::*;
    use crate::proto::batch::{ChannelConfig, Voucher};

    /// The receipt as it was built before: a `serde_json::Value`, then serialized.
    fn through_value(r: &Receipt<'_>) -> Vec<u8> {
        let mut json = serde_json::json!({
            "success": true,
            "payer": r.batch.channel_config().payer.to_checksum(None),
            "transaction": r.mirror.map(|m| m.transaction.to_string()).unwrap_or_default(),
            "network": r.req.network.caip2(),
            "amount": r.amount.to_string(),
        });
        if let (Some((charged, channel, state)), Some(obj)) = (r.extra, json.as_object_mut()) {
            let extra = ch::receipt_extra(charged, channel, state);
            obj.insert("extra".into(), extra.into());
        }
        serde_json::to_vec(&json).unwrap_or_default()
    }

    /// Every width of amount, from zero to the `u128` and `U256` extremes.
    const AMOUNTS: [u128; 6] = [0, 7, 1_000, u64::MAX as u128, 1 << 64, u128::MAX];

    /// A channel record whose fields take the `i`-th widths.
    fn state(config: &ChannelConfig, i: usize) -> ChannelState {
        let n = AMOUNTS[i];
        ChannelState {
            config: config.clone(),
            charged_cumulative: n,
            signed_max_claimable: n,
            signature: Default::default(),
            balance: AMOUNTS[(i + 1) % AMOUNTS.len()],
            total_claimed: AMOUNTS[(i + 2) % AMOUNTS.len()],
            withdraw_requested_at: [0, 1_700_000_000, u64::MAX][i % 3],
            refund_nonce: [U256::ZERO, U256::from(n), U256::MAX][i % 3],
            onchain_synced_at: 0,
            last_request_at: 0,
        }
    }

    /// A voucher payload on `config` and a requirement on `network`.
    fn payment(
        config: &ChannelConfig,
        network: crate::Network,
    ) -> (BatchEvmPayload, PaymentRequirements) {
        let batch = BatchEvmPayload::Voucher {
            channel_config: config.clone(),
            voucher: Voucher {
                channel_id: B256::repeat_byte(0x5c),
                max_claimable_amount: U256::from(1_000),
                signature: Default::default(),
            },
        };
        let req = PaymentRequirements {
            scheme: crate::channel::SCHEME.into(),
            network,
            amount: U256::from(1_000),
            asset: Address::repeat_byte(4).into(),
            pay_to: Address::repeat_byte(2).into(),
            max_timeout_seconds: 60,
            extra: None,
        };
        (batch, req)
    }

    #[test]
    fn receipt_is_serde_json() {
        let config = ChannelConfig {
            payer: Address::repeat_byte(0xab),
            payer_authorizer: Address::repeat_byte(0x11),
            receiver: Address::repeat_byte(2),
            receiver_authorizer: Address::repeat_byte(3),
            token: Address::repeat_byte(4),
            withdraw_delay: 900,
            salt: B256::ZERO,
        };
        let mirror = Mirror {
            transaction: B256::repeat_byte(0xe7),
            balance: 0,
            total_claimed: 0,
        };
        let mut checked = 0;
        for network in [
            crate::Network::BASE_SEPOLIA,
            crate::Network::eip155(1),
            crate::Network::eip155(u64::MAX),
        ] {
            let (batch, req) = payment(&config, network);
            for i in 0..AMOUNTS.len() {
                let state = state(&config, i);
                let charged = AMOUNTS[(i + 3) % AMOUNTS.len()];
                for mirror in [None, Some(mirror)] {
                    for extra in [
                        None,
                        Some((None, B256::repeat_byte(0x5c), &state)),
                        Some((Some(charged), B256::ZERO, &state)),
                    ] {
                        let (req, batch, amount) = (&req, &batch, AMOUNTS[i]);
                        let r = Receipt {
                            req,
                            batch,
                            mirror,
                            amount,
                            extra,
                        };
                        assert_eq!(
                            String::from_utf8_lossy(&r.json()),
                            String::from_utf8_lossy(&through_value(&r))
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 3 * 6 * 2 * 3);
    }

    /// An option's terms are read once per thread while its options live; another option,
    /// or another `Arc` of equal options, gets its own (equal to a fresh reading).
    #[test]
    fn kept_terms_are_the_options() {
        let option = |max: u64| {
            PaymentOption::batch_settlement(
                &crate::Asset::usdc_base_sepolia(),
                U256::from(max),
                Address::repeat_byte(2),
                Address::repeat_byte(3),
                900,
                crate::channel::AssetTransferMethod::Eip3009,
            )
            .unwrap()
        };
        let options: Arc<[PaymentOption]> = Arc::from(vec![option(1_000), option(2_000)]);
        let again: Arc<[PaymentOption]> = Arc::from(options.to_vec());
        for _ in 0..2 {
            for set in [&options, &again] {
                for o in set.iter() {
                    let terms = terms_of(set, o).unwrap();
                    assert_eq!(
                        *terms,
                        ChannelTerms::from_requirements(o.requirements()).unwrap()
                    );
                    assert!(Arc::ptr_eq(&terms, &terms_of(set, o).unwrap()), "kept");
                }
            }
        }
        // An option outside the `Arc` is read, not kept.
        let lone = option(1_000);
        let terms = terms_of(&options, &lone).unwrap();
        assert!(!Arc::ptr_eq(&terms, &terms_of(&options, &lone).unwrap()));
        assert_eq!(terms.price, 1_000);
    }

    /// An escrow whose deposits land at once, into an empty channel.
    struct Landing;

    #[async_trait::async_trait]
    impl crate::channel::serve::Escrow for Landing {
        async fn deposit(
            &self,
            _: crate::channel::serve::EscrowChannel<'_>,
            deposit: &crate::proto::batch::Deposit,
        ) -> Result<Mirror, crate::channel::serve::EscrowError> {
            Ok(Mirror {
                transaction: B256::repeat_byte(0xde),
                balance: u128::try_from(deposit.amount).unwrap_or(u128::MAX),
                total_claimed: 0,
            })
        }

        async fn refund(
            &self,
            _: crate::channel::serve::EscrowChannel<'_>,
            _: crate::channel::serve::CooperativeRefund,
        ) -> Result<Mirror, crate::channel::serve::EscrowError> {
            Err(crate::channel::serve::EscrowError("no refunds here".into()))
        }
    }

    /// A layer's channels run on the engine's clock: a deposit signed valid until a time long
    /// past pays at that time on a fixed clock (the record stamped with it), and is refused as
    /// expired on the system clock.
    #[tokio::test]
    async fn channels_run_on_the_engines_clock() {
        use alloy_signer::SignerSync;
        use tower_layer::Layer;
        use tower_service::Service;

        use crate::channel::serve::Channels;
        use crate::channel::store::{ChannelStore, MemoryChannelStore};
        use crate::channel::{
            AssetTransferMethod, channel_id, deposit_nonce, receive_authorization_digest,
            token_domain, voucher_digest,
        };
        use crate::proto::batch::{Deposit, DepositAuthorization, Erc3009Authorization};

        const THEN: u64 = 1_000_000_000; // 2001: every system clock is past it
        let asset = crate::Asset::usdc_base_sepolia();
        let chain = asset.network.chain_id();
        let (receiver, authorizer) = (Address::repeat_byte(2), Address::repeat_byte(3));
        let option = PaymentOption::batch_settlement(
            &asset,
            U256::from(1_000),
            receiver,
            authorizer,
            900,
            AssetTransferMethod::Eip3009,
        )
        .unwrap();
        let payer = alloy_signer_local::PrivateKeySigner::random();
        let config = ChannelConfig {
            payer: payer.address(),
            payer_authorizer: payer.address(),
            receiver,
            receiver_authorizer: authorizer,
            token: asset.address,
            withdraw_delay: 900,
            salt: B256::repeat_byte(7),
        };
        let id = channel_id(chain, &config);
        let sign = |digest: B256| {
            let sig = payer.sign_hash_sync(&digest).unwrap();
            alloy_primitives::Bytes::from(sig.as_bytes().to_vec())
        };
        let (amount, valid_before, salt) = (U256::from(10_000), U256::from(THEN + 60), B256::ZERO);
        let digest = receive_authorization_digest(
            &token_domain(chain, asset.address, "USDC", "2"),
            payer.address(),
            amount,
            U256::ZERO,
            valid_before,
            deposit_nonce(id, salt),
        );
        let batch = BatchEvmPayload::Deposit {
            voucher: Voucher {
                channel_id: id,
                max_claimable_amount: U256::from(1_000),
                signature: sign(voucher_digest(chain, id, U256::from(1_000)).unwrap()),
            },
            deposit: Deposit {
                amount,
                authorization: DepositAuthorization {
                    erc3009_authorization: Some(Erc3009Authorization {
                        valid_after: U256::ZERO,
                        valid_before,
                        salt,
                        signature: sign(digest),
                    }),
                    permit2_authorization: None,
                },
            },
            channel_config: config,
        };
        let proof = serde_json::json!({
            "x402Version": 2,
            "accepted": option.requirements(),
            "payload": batch,
        });
        let header = header::encode_json(&serde_json::to_vec(&proof).unwrap());
        for fixed in [true, false] {
            let store = Arc::new(MemoryChannelStore::new());
            let channels = Channels::new(store.clone(), Landing);
            let channels = match fixed {
                true => channels.with_clock(crate::clock::FixedClock::new(THEN)),
                false => channels,
            };
            let layer = crate::PaymentLayer::builder()
                .no_challenge_binding()
                .accept(option.clone())
                .channels(channels)
                .build()
                .unwrap();
            let mut svc = layer.layer(tower::service_fn(|_: Request<String>| async {
                Ok::<_, std::convert::Infallible>(Response::new(String::from("paid")))
            }));
            let req = Request::get("http://api.example/paid")
                .header(header::PAYMENT_SIGNATURE, header.clone())
                .body(String::new())
                .unwrap();
            let res = svc.call(req).await.unwrap();
            let record = store.load(id).await.unwrap();
            if fixed {
                assert_eq!(res.status(), http::StatusCode::OK);
                let record = record.expect("the deposit opened the channel");
                assert_eq!(record.charged_cumulative, 1_000);
                assert_eq!(
                    (record.last_request_at, record.onchain_synced_at),
                    (THEN, THEN)
                );
            } else {
                assert_eq!(res.status(), http::StatusCode::PAYMENT_REQUIRED);
                let required = res.headers().get(header::PAYMENT_REQUIRED).unwrap();
                let required: serde_json::Value =
                    serde_json::from_slice(&header::decode_bytes(required, 1 << 16).unwrap())
                        .unwrap();
                assert_eq!(required["error"], BatchError::ValidBefore.code());
                assert_eq!(record, None, "nothing stored");
            }
        }
    }
}
