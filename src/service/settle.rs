//! The stages from the claim on: claim → check → settle-first | run → settle-after | metered.
//!
//! Each ends the proof's [`Claim`] with the [`fate`] of how it ended; nothing here decides a
//! fate itself.

use std::error::Error as StdError;
use std::time::{Duration, Instant};

use http::request::Parts;
use http::{Request, Response};
use tower_service::Service;

use super::claim::{Claim, End, fate};
use super::flow::{Answer, Flow, stage};
use super::trace;
use crate::alert::{Alert, alert};
use crate::body::ResponseBody;
use crate::config::Shared;
use crate::hooks::Stage;
use crate::nonce::Reservation;
use crate::proto::SettleResponse;
use crate::rejection::{self, Rejection, reason};
use crate::response;
use crate::settle::{SettleError, Settlement, SettlementMode};
use crate::upto::Usage;
use crate::verify::VerifiedPayment;

/// Claims the proof, runs the handler and settles. The flag says whether the proof is spent
/// (its fate is not release): then a retry must see this very response; otherwise the claim
/// went back and a retry may run afresh. A service error carries the same flag.
pub(super) async fn serve<S, ReqB, ResB>(
    flow: &Flow<'_>,
    mut inner: S,
    mut parts: Parts,
    body: ReqB,
    verified: &VerifiedPayment,
) -> Result<(Answer<ResB>, bool), (S::Error, bool)>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Send,
{
    let shared = flow.shared;
    let claim = match claim(flow, verified).await {
        Ok(claim) => claim,
        Err(res) => return Ok((res, false)),
    };
    let checked = now_or!(
        shared.settler.check_now(verified),
        shared.settler.check(verified)
    );
    if let Err(e) = checked {
        // Nothing moved and the handler did not run: the proof may be retried (e.g. after
        // topping up the balance).
        claim.end(fate(End::Refused)).await;
        let rejection = rejection::of_settle(&e, shared.retry_after);
        let res = flow
            .reject(Stage::Check, rejection, Some(verified), Some(&e))
            .await;
        return Ok((res, false));
    }
    parts.extensions.insert(verified.clone());
    // upto: the handler meters the call; the amount to settle is known only afterwards.
    let meter = verified.is_upto().then(|| Usage::new(verified.amount));
    if let Some(meter) = &meter {
        parts.extensions.insert(meter.clone());
    }
    let req = Request::from_parts(parts, body);
    if shared.mode == SettlementMode::BeforeHandler && meter.is_none() {
        return settle_first(flow, inner, req, verified, claim).await;
    }
    let res = match inner.call(req).await {
        Ok(res) => res,
        Err(e) => {
            claim.end(fate(End::HandlerFailed)).await;
            return Err((e, false));
        }
    };
    if res.status().is_client_error() || res.status().is_server_error() {
        claim.end(fate(End::HandlerFailed)).await;
        let mut res = res.map(ResponseBody::inner);
        response::mark(shared, res.headers_mut());
        return Ok((res, false));
    }
    Ok(match meter {
        None => settle_after(flow, res, verified, claim).await,
        Some(meter) => metered(flow, res, verified, &meter, claim).await,
    })
}

/// Reserves the proof's key: one winner across every instance sharing the store.
async fn claim<'f, B: Send>(
    flow: &Flow<'f>,
    verified: &VerifiedPayment,
) -> Result<Claim<'f>, Answer<B>> {
    let store = &*flow.shared.store;
    let key = verified.nonce_key();
    let reserved = now_or!(
        store.reserve_now(&key, verified.valid_before),
        store.reserve(&key, verified.valid_before)
    );
    let (rejection, e) = match reserved {
        Ok(Reservation::Reserved(token)) => return Ok(Claim::new(store, key, token)),
        Ok(Reservation::InUse | Reservation::Used) => (
            Rejection::Pay {
                // Each chain's reference code for a proof already used.
                reason: Some(match verified.svm() {
                    Some(_) => reason::DUPLICATE_SETTLEMENT,
                    None => reason::NONCE_ALREADY_USED,
                }),
            },
            None,
        ),
        Err(e) => (rejection::of_store(&e, flow.shared.retry_after), Some(e)),
    };
    let e = e.as_ref().map(|e| e as &(dyn StdError + Send + Sync));
    Err(flow
        .reject(Stage::Reserve, rejection, Some(verified), e)
        .await)
}

/// Settles first; the handler runs only once the money moved, and its answer, whatever it
/// is, was paid for.
async fn settle_first<S, ReqB, ResB>(
    flow: &Flow<'_>,
    mut inner: S,
    req: Request<ReqB>,
    verified: &VerifiedPayment,
    claim: Claim<'_>,
) -> Result<(Answer<ResB>, bool), (S::Error, bool)>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Send,
{
    let started = Instant::now();
    let result = settle(flow.shared, verified).await;
    let elapsed = started.elapsed();
    let fate = fate(End::Settled {
        handler_ran: false,
        result: result.as_ref().map(|_| ()),
    });
    claim.end(fate).await;
    let settlement = stage!(match result {
        Ok(s) => Ok(s),
        Err(e) => Err((settle_failed(flow, verified, &e).await, fate.spent())),
    });
    after_settle(flow.shared, verified, &settlement, elapsed).await;
    let res = match inner.call(req).await {
        Ok(res) => res,
        Err(e) => {
            // The error goes to the server as any service error would; what it cannot tell
            // is that this one was paid for.
            alert!(
                Alert::ResponseBody,
                "a settle-first payment's service failed after settlement: the client paid and \
                 got no answer (retries with its payment id get 503 until the id expires); \
                 refund or serve it by hand"
            );
            return Err((e, true));
        }
    };
    Ok((settled(flow.shared, res, verified, settlement), true))
}

/// Settles what the handler's answer (below 400) was sold for.
async fn settle_after<B: Send>(
    flow: &Flow<'_>,
    res: Response<B>,
    payment: &VerifiedPayment,
    claim: Claim<'_>,
) -> (Answer<B>, bool) {
    let started = Instant::now();
    let result = settle(flow.shared, payment).await.map(|mut s| {
        if payment.is_upto() {
            s.amount = Some(payment.amount);
        }
        s
    });
    let elapsed = started.elapsed();
    let fate = fate(End::Settled {
        handler_ran: true,
        result: result.as_ref().map(|_| ()),
    });
    claim.end(fate).await;
    match result {
        Ok(settlement) => {
            after_settle(flow.shared, payment, &settlement, elapsed).await;
            (settled(flow.shared, res, payment, settlement), true)
        }
        // The handler's body is withheld: it was not paid for.
        Err(e) => (settle_failed(flow, payment, &e).await, fate.spent()),
    }
}

/// upto: settles what the handler metered, nothing when it used nothing, and withholds the
/// body of a handler that metered past the signed maximum.
async fn metered<B: Send>(
    flow: &Flow<'_>,
    res: Response<B>,
    verified: &VerifiedPayment,
    meter: &Usage,
    claim: Claim<'_>,
) -> (Answer<B>, bool) {
    match meter.settle_amount() {
        Err(_overrun) => {
            // Nothing is settled above the maximum, nothing below it either (the body is
            // withheld, unpaid).
            claim.end(fate(End::ServedUnsettled)).await;
            let refused = SettleError::Refused {
                reason: crate::upto::SETTLEMENT_EXCEEDS_AMOUNT,
                transaction: None,
            };
            (settle_failed(flow, verified, &refused).await, true)
        }
        Ok(total) if total.is_zero() => {
            // Nothing used, nothing to move: no transaction at all.
            claim.end(fate(End::ServedUnsettled)).await;
            let settlement = Settlement {
                transaction: None,
                amount: Some(total),
                ..Default::default()
            };
            after_settle(flow.shared, verified, &settlement, Duration::ZERO).await;
            (settled(flow.shared, res, verified, settlement), true)
        }
        Ok(total) => {
            let mut metered = verified.clone();
            metered.amount = total;
            settle_after(flow, res, &metered, claim).await
        }
    }
}

/// The settler's answer: at once when it has one (`Settler::settle_now`), else awaited.
async fn settle(shared: &Shared, payment: &VerifiedPayment) -> Result<Settlement, SettleError> {
    now_or!(
        shared.settler.settle_now(payment),
        shared.settler.settle(payment)
    )
}

async fn after_settle(
    shared: &Shared,
    verified: &VerifiedPayment,
    settlement: &Settlement,
    elapsed: Duration,
) {
    trace::settled(settlement, elapsed);
    if let Some(prepaid) = &shared.prepaid {
        prepaid.granted(verified.payer).await;
    }
    for hook in shared.hooks.iter() {
        hook.after_settle(verified, settlement, elapsed).await;
    }
}

/// The handler's response with the success receipt.
fn settled<B>(
    shared: &Shared,
    res: Response<B>,
    verified: &VerifiedPayment,
    settlement: Settlement,
) -> Answer<B> {
    let receipt = SettleResponse {
        success: true,
        error_reason: None,
        payer: Some(verified.payer_account()),
        transaction: settlement.transaction,
        signature: settlement.signature,
        network: verified.network,
        amount: settlement.amount,
    };
    let mut res = res.map(ResponseBody::paid);
    response::attach_receipt(res.headers_mut(), verified.version, &receipt);
    response::mark(shared, res.headers_mut());
    res
}

/// 402, 429 or 503 with a `success: false` receipt.
async fn settle_failed<B: Send>(
    flow: &Flow<'_>,
    verified: &VerifiedPayment,
    e: &SettleError,
) -> Answer<B> {
    let rejection = rejection::of_settle(e, flow.shared.retry_after);
    let mut out = response::reject(flow.shared, flow.options, &flow.resource, rejection);
    let receipt = SettleResponse {
        success: false,
        error_reason: Some(e.reason().to_string()),
        payer: Some(verified.payer_account()),
        transaction: e.transaction(),
        signature: None,
        network: verified.network,
        amount: None,
    };
    response::attach_receipt(out.headers_mut(), verified.version, &receipt);
    flow.failed(Stage::Settle, &out, Some(verified), Some(e))
        .await;
    out
}
