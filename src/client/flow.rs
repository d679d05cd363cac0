//! One call: send, pay once on 402, retry 429/5xx, never sign twice.

use std::sync::Arc;

use alloy_primitives::U256;
use alloy_signer::Signer;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use tower_service::Service;

use super::challenge::{self, Challenge, MAX_CHALLENGE_BYTES};
use super::channel;
use super::error::{ChallengeError, Error, Refusals};
use super::layer::Shared;
use super::policy::{Budget, Refusal};
use super::retry::is_retryable_server_error;
use super::signer::{self, Proof};
use super::{PaymentOutcome, PaymentReport};
use crate::body::ResponseBody;
use crate::proto::{SettleResponse, X402Version};
use crate::reason::{DUPLICATE_SETTLEMENT, NONCE_ALREADY_USED};
use crate::verify::BoxError;

pub(crate) async fn run<S, Sg, B, ResBody>(
    shared: Arc<Shared<Sg>>,
    mut svc: S,
    req: Request<B>,
) -> Result<Response<ResponseBody<ResBody>>, Error>
where
    S: Service<Request<B>, Response = Response<ResBody>, Error: Into<BoxError>>,
    B: Clone,
    ResBody: Body<Data = Bytes, Error: Into<BoxError>>,
    Sg: Signer + Send + Sync,
{
    let retry = &shared.retry;
    // The one proof of this call, once signed; every later attempt resends it unchanged.
    let mut paid: Option<(Proof, PaymentReport)> = None;
    // A paid attempt ended without a definite answer (5xx, transport error).
    let mut unknown = false;
    let (mut rate_limited, mut server_errors) = (0u32, 0u32);
    let mut readied = true;
    // A channel payment recovered from a corrective 402 (at most once per call).
    let mut recovered = false;
    loop {
        let mut attempt = req.clone();
        if let Some((proof, report)) = &mut paid {
            attempt
                .headers_mut()
                .insert(proof.name.clone(), proof.value.clone());
            report.attempts += 1;
        }
        let sent = send(&mut svc, attempt, readied).await;
        readied = false;
        let res = match sent {
            Ok(res) => res,
            Err(e) => {
                let Some((proof, mut report)) = paid.take() else {
                    return Err(Error::Transport(e));
                };
                // The proof may have reached the server: only ever resend this same one.
                unknown = true;
                match retry.server_error_delay(server_errors, None) {
                    Some(wait) => {
                        server_errors += 1;
                        paid = Some((proof, report));
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    None => {
                        report.outcome = PaymentOutcome::Unknown;
                        return Err(Error::OutcomeUnknown {
                            report: Box::new(report),
                            source: e,
                        });
                    }
                }
            }
        };
        let status = res.status();
        if status == StatusCode::PAYMENT_REQUIRED {
            let Some((proof, report)) = paid.take() else {
                let challenge = read_challenge(res, shared.only_version).await?;
                paid = Some(pay(&shared, &challenge).await?);
                continue;
            };
            // A channel's corrective 402, once: adopt the server's charged amount if a voucher
            // this client signed backs it, and pay again on top of it.
            if let (Some(ticket), false) = (&proof.channel, recovered)
                && let Ok(Some(challenge)) = Challenge::from_headers(res.headers())
                && channel::recover(&shared, ticket, &challenge)
            {
                recovered = true;
                drop((proof, report, res));
                paid = Some(pay(&shared, &challenge).await?);
                continue;
            }
            // Paid and asked to pay again: stop. One call never signs twice.
            let mut res = refused(res, report, unknown).await;
            channel_after(&shared, proof.channel.as_ref(), &mut res);
            return Ok(res);
        }
        let wait = if status == StatusCode::TOO_MANY_REQUESTS {
            let wait = retry.rate_limit_delay(rate_limited, res.headers());
            rate_limited += 1;
            wait
        } else if is_retryable_server_error(status) {
            let wait = retry.server_error_delay(server_errors, Some(res.headers()));
            server_errors += 1;
            // A proof was sent and the server failed: it may or may not have settled. A 503
            // `settlement_outcome_unknown` may name the pending transaction: keep it.
            if let Some((_, report)) = &mut paid {
                unknown = true;
                report.receipt = decoded_receipt(res.headers()).or(report.receipt.take());
            }
            wait
        } else {
            None
        };
        if let Some(wait) = wait {
            drop(res);
            tokio::time::sleep(wait).await;
            continue;
        }
        let (proof, report) = paid.map_or((None, None), |(p, r)| (Some(p), Some(r)));
        let mut res = finish(res, report, unknown, shared.policy.shared_budget());
        channel_after(&shared, proof.and_then(|p| p.channel).as_ref(), &mut res);
        return Ok(res);
    }
}

/// Advances a channel payment's record from the final answer (its report in `res`).
fn channel_after<Sg, B>(
    shared: &Shared<Sg>,
    ticket: Option<&channel::Ticket>,
    res: &mut Response<B>,
) {
    let Some(ticket) = ticket else { return };
    let headers = res.headers().clone();
    if let Some(report) = res.extensions_mut().get_mut::<PaymentReport>() {
        channel::after(shared, ticket, &headers, report);
    }
}

/// A cooperative refund of the caller's channel with the server at `req`'s URL.
pub(crate) async fn refund<S, Sg, B, ResBody>(
    shared: &Shared<Sg>,
    svc: &mut S,
    req: Request<B>,
    amount: Option<U256>,
) -> Result<channel::ChannelRefund, Error>
where
    S: Service<Request<B>, Response = Response<ResBody>, Error: Into<BoxError>>,
    B: Clone,
    ResBody: Body<Data = Bytes, Error: Into<BoxError>>,
    Sg: Signer + Send + Sync,
{
    let res = send(svc, req.clone(), false)
        .await
        .map_err(Error::Transport)?;
    if res.status() != StatusCode::PAYMENT_REQUIRED {
        return Err(ChallengeError::Missing.into());
    }
    let mut challenge = read_challenge(res, Some(X402Version::V2)).await?;
    let mut recovered = false;
    loop {
        let (name, value, ticket) = channel::refund_proof(shared, &challenge, amount).await?;
        let mut attempt = req.clone();
        attempt.headers_mut().insert(name, value);
        let res = send(svc, attempt, false).await.map_err(Error::Transport)?;
        // A corrective 402, once: adopt the server's charged amount within the record, retry.
        if res.status() == StatusCode::PAYMENT_REQUIRED
            && !recovered
            && let Ok(Some(corrective)) = Challenge::from_headers(res.headers())
            && channel::refund_recover(shared, &ticket, &corrective)
        {
            recovered = true;
            challenge = corrective;
            continue;
        }
        return channel::refunded(shared, ticket, res.status(), res.headers());
    }
}

/// Waits for readiness (except for the first attempt, readied by the caller) and calls.
async fn send<S, B, R>(svc: &mut S, req: Request<B>, readied: bool) -> Result<R, BoxError>
where
    S: Service<Request<B>, Response = R, Error: Into<BoxError>>,
{
    if !readied {
        std::future::poll_fn(|cx| svc.poll_ready(cx))
            .await
            .map_err(Into::into)?;
    }
    svc.call(req).await.map_err(Into::into)
}

/// Reads the body, at most `MAX_CHALLENGE_BYTES`.
async fn read_body<B>(body: B) -> Result<Bytes, BoxError>
where
    B: Body<Data = Bytes, Error: Into<BoxError>>,
{
    Ok(Limited::new(body, MAX_CHALLENGE_BYTES)
        .collect()
        .await?
        .to_bytes())
}

/// The challenge of a 402: the v2 header, else a v1 JSON body (only one of them when the
/// client speaks only one version).
async fn read_challenge<B>(res: Response<B>, only: Option<X402Version>) -> Result<Challenge, Error>
where
    B: Body<Data = Bytes, Error: Into<BoxError>>,
{
    if only != Some(X402Version::V1)
        && let Some(c) = Challenge::from_headers(res.headers())?
    {
        return Ok(c);
    }
    if only == Some(X402Version::V2) {
        return Err(ChallengeError::Missing.into());
    }
    let body = read_body(res.into_body())
        .await
        .map_err(ChallengeError::Body)?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ChallengeError::Missing.into());
    }
    let c = Challenge::from_json(&body)?;
    if only.is_some_and(|v| v != c.version) {
        return Err(ChallengeError::Missing.into());
    }
    Ok(c)
}

/// Chooses an offer within the policy, cheapest first (an `upto` offer costs its maximum),
/// counts it against the budget and signs it.
async fn pay<Sg>(
    shared: &Shared<Sg>,
    challenge: &Challenge,
) -> Result<(Proof, PaymentReport), Error>
where
    Sg: Signer + Send + Sync,
{
    let policy = &shared.policy;
    let svm = shared.svm_key();
    let mut verdicts: Vec<Option<Refusal>> = challenge
        .offers
        .iter()
        .map(|o| match o {
            Ok(offer) => policy.refusal(challenge.version, &offer.requirements, svm),
            Err(r) => Some(*r),
        })
        .collect();
    let mut candidates: Vec<_> = challenge
        .offers
        .iter()
        .enumerate()
        .filter_map(|(i, o)| Some((i, o.as_ref().ok()?)))
        .filter(|(i, _)| verdicts.get(*i).is_some_and(Option::is_none))
        .collect();
    candidates.sort_by_key(|(_, o)| o.requirements.amount);
    let refusals = |v: &[Option<Refusal>]| Refusals(v.iter().flatten().copied().collect());
    let Some(cheapest) = candidates.first().map(|(_, o)| o.requirements.amount) else {
        return Err(Error::NoAcceptableOption(refusals(&verdicts)));
    };
    // Cheap check first, so a spent budget costs no balance lookup.
    if let Some(budget) = policy.shared_budget() {
        let remaining = budget.remaining();
        if cheapest > remaining {
            return Err(Error::BudgetExceeded {
                amount: cheapest,
                remaining,
            });
        }
    }
    let payer = shared.signer.address();
    let mut chosen = None;
    for (i, offer) in candidates {
        // The balance source reads EVM tokens; a Solana offer is not looked up.
        let solana = offer.requirements.network.is_solana();
        if let (Some(source), false) = (&shared.balance, solana) {
            let r = &offer.requirements;
            let balance = source
                .balance(r.network, r.asset.evm().unwrap_or_default(), payer)
                .await
                .map_err(Error::Balance)?;
            if balance.is_some_and(|b| b < r.amount) {
                if let Some(v) = verdicts.get_mut(i) {
                    *v = Some(Refusal::InsufficientBalance);
                }
                continue;
            }
        }
        chosen = Some(offer);
        break;
    }
    let Some(offer) = chosen else {
        return Err(Error::NoAcceptableOption(refusals(&verdicts)));
    };
    let amount = offer.requirements.amount;
    if let Some(budget) = policy.shared_budget() {
        budget
            .try_spend(amount)
            .map_err(|remaining| Error::BudgetExceeded { amount, remaining })?;
    }
    let now = shared.clock.now();
    let signed = match (offer.requirements.network.is_solana(), svm) {
        #[cfg(feature = "svm-client")]
        (true, Some(_)) => match &shared.svm {
            Some(payer) => payer
                .proof(challenge, offer, now)
                .await
                .map_err(Error::from),
            None => Err(alloy_signer::Error::other("no Solana payer").into()),
        },
        // The policy refuses Solana offers without a payer; never sign one with an EVM key.
        (true, _) => Err(alloy_signer::Error::other("no Solana payer").into()),
        (false, _) if offer.requirements.scheme == crate::channel::SCHEME => {
            channel::proof(shared, challenge, offer, now)
                .await
                .map(|c| Proof {
                    name: c.name,
                    value: c.value,
                    authorization: c.authorization,
                    permit: None,
                    payment_id: c.payment_id,
                    channel: Some(c.ticket),
                })
        }
        (false, _) => signer::proof(&*shared.signer, challenge, offer, now)
            .await
            .map_err(Error::from),
    };
    let proof = match signed {
        Ok(proof) => proof,
        Err(e) => {
            // Nothing was signed: give the amount back.
            if let Some(budget) = policy.shared_budget() {
                budget.refund(amount);
            }
            return Err(e);
        }
    };
    let report = PaymentReport {
        version: challenge.version,
        requirements: offer.requirements.clone(),
        authorization: proof.authorization.clone(),
        permit2: proof.permit.clone(),
        svm_payer: svm.filter(|_| offer.requirements.network.is_solana()),
        payment_id: proof.payment_id.clone(),
        channel: proof.channel.as_ref().map(channel::Ticket::payment),
        attempts: 0,
        receipt: None,
        outcome: PaymentOutcome::Unknown,
    };
    Ok((proof, report))
}

/// A 402 to a paid attempt: returned to the caller with why.
async fn refused<B>(
    res: Response<B>,
    mut report: PaymentReport,
    unknown: bool,
) -> Response<ResponseBody<B>>
where
    B: Body<Data = Bytes, Error: Into<BoxError>>,
{
    let (mut parts, body) = res.into_parts();
    let receipt = decoded_receipt(&parts.headers);
    let mut reason = receipt.as_ref().and_then(|r| r.error_reason.clone());
    let body = match Challenge::from_headers(&parts.headers) {
        Ok(Some(c)) => {
            reason = reason.or(c.error);
            ResponseBody::inner(body)
        }
        // v1 (or no header): the reason is in the JSON body, which the caller still gets.
        _ => match read_body(body).await {
            Ok(bytes) => {
                if reason.is_none() {
                    reason = Challenge::from_json(&bytes)
                        .ok()
                        .and_then(|c| c.error)
                        .or_else(|| challenge::body_reason(&bytes));
                }
                ResponseBody::full(bytes)
            }
            Err(_) => ResponseBody::full(Bytes::new()),
        },
    };
    // Without a receipt now, keep the one an earlier (outcome unknown) answer gave.
    report.receipt = receipt.or(report.receipt.take());
    let used = [NONCE_ALREADY_USED.as_str(), DUPLICATE_SETTLEMENT.as_str()];
    report.outcome = if unknown && reason.as_deref().is_some_and(|r| used.contains(&r)) {
        // An earlier attempt with this very proof may have gone through: spent or pending.
        PaymentOutcome::AlreadyUsed
    } else {
        PaymentOutcome::Refused { reason }
    };
    parts.extensions.insert(report);
    Response::from_parts(parts, body)
}

/// The final answer; with a report when a proof was sent. A settled `upto` payment gives the
/// unsettled part of its maximum back to the budget.
fn finish<B>(
    res: Response<B>,
    report: Option<PaymentReport>,
    unknown: bool,
    budget: Option<&Budget>,
) -> Response<ResponseBody<B>> {
    let (mut parts, body) = res.into_parts();
    if let Some(mut report) = report {
        let earlier = report.receipt.take();
        report.receipt = decoded_receipt(&parts.headers);
        let status = parts.status;
        report.outcome = match &report.receipt {
            Some(r) if r.success => PaymentOutcome::Settled,
            // A 5xx (even with a failed receipt, as for `settlement_outcome_unknown`) does not
            // say the money did not move.
            _ if status.is_server_error() => PaymentOutcome::Unknown,
            Some(r) => PaymentOutcome::Refused {
                reason: r.error_reason.clone(),
            },
            None if status.is_success() || status.is_redirection() => PaymentOutcome::Accepted,
            None if unknown => PaymentOutcome::Unknown,
            None => PaymentOutcome::NotCharged,
        };
        report.receipt = report.receipt.take().or(earlier);
        if let (Some(budget), Some(unused)) = (budget, unsettled(&report)) {
            budget.refund(unused);
        }
        parts.extensions.insert(report);
    }
    Response::from_parts(parts, ResponseBody::inner(body))
}

/// What a settled `upto` payment did not use of its maximum (counted when it was signed):
/// `max − amount` when the answer's successful receipt states the settled `amount`. `None`
/// for `exact`, and when the receipt is missing, failed or silent on the amount (the permit
/// may still be settled up to its maximum).
fn unsettled(report: &PaymentReport) -> Option<U256> {
    if !report.is_upto() || report.outcome != PaymentOutcome::Settled {
        return None;
    }
    let settled = report.settled_amount()?;
    Some(report.max_amount().saturating_sub(settled))
}

fn decoded_receipt(headers: &http::HeaderMap) -> Option<SettleResponse> {
    challenge::receipt(headers).and_then(Result::ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FixedClock;
    use crate::proto::SettleResponse;
    use crate::{Asset, Network, PaymentOption};
    use alloy_primitives::{Address, B256};
    use alloy_signer_local::PrivateKeySigner;
    use serde_json::json;

    use super::super::Policy;

    const NOW: u64 = 1_750_000_000;

    fn shared(policy: Policy) -> Shared<PrivateKeySigner> {
        Shared {
            signer: Arc::new(PrivateKeySigner::random()),
            policy,
            retry: super::super::RetryPolicy::none(),
            clock: Arc::new(FixedClock::new(NOW)),
            balance: None,
            only_version: None,
            #[cfg(feature = "svm-client")]
            svm: None,
            channels: None,
        }
    }

    fn exact(price: u64) -> serde_json::Value {
        let opt =
            PaymentOption::exact_atomic(&Asset::usdc_base_sepolia(), U256::from(price), PAY_TO)
                .unwrap();
        json!(opt.requirements())
    }

    fn upto(max: u64) -> serde_json::Value {
        let opt = PaymentOption::upto_atomic(
            &Asset::usdc_base_sepolia(),
            U256::from(max),
            PAY_TO,
            Address::repeat_byte(0xfa),
        )
        .unwrap();
        json!(opt.requirements())
    }

    const PAY_TO: Address = Address::repeat_byte(0x11);

    fn challenge(accepts: &[serde_json::Value]) -> Challenge {
        let doc = json!({"x402Version": 2, "resource": {"url": "http://x/y"}, "accepts": accepts});
        Challenge::from_json(&serde_json::to_vec(&doc).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn cheapest_first_compares_exact_prices_with_upto_maxima() {
        let allow = || Policy::new(U256::from(100_000)).allow_upto();
        let (_, r) = pay(&shared(allow()), &challenge(&[exact(10_000), upto(5_000)]))
            .await
            .unwrap();
        assert!(r.is_upto());
        assert_eq!(r.max_amount(), U256::from(5_000));
        let permit = r.permit2.as_ref().unwrap();
        assert_eq!(permit.permitted.amount, U256::from(5_000));
        assert_eq!(r.authorization.nonce, B256::from(permit.nonce));

        let (_, r) = pay(&shared(allow()), &challenge(&[upto(5_000), exact(3_000)]))
            .await
            .unwrap();
        assert!(!r.is_upto() && r.permit2.is_none());
        assert_eq!(r.amount(), U256::from(3_000));

        // Without allow_upto the cheaper upto offer is passed over.
        let s = shared(Policy::new(U256::from(100_000)));
        let (_, r) = pay(&s, &challenge(&[upto(5_000), exact(10_000)]))
            .await
            .unwrap();
        assert!(!r.is_upto());
        // And an upto-only challenge is refused before signing.
        let err = pay(&s, &challenge(&[upto(5_000)])).await.unwrap_err();
        match err {
            Error::NoAcceptableOption(r) => assert_eq!(r.0, vec![Refusal::UptoNotAllowed]),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn the_budget_counts_the_maximum_and_refuses_when_it_does_not_fit() {
        let budget = Budget::new(U256::from(7_000));
        let s = shared(Policy::new(U256::MAX).allow_upto().budget(budget.clone()));
        let (_, r) = pay(&s, &challenge(&[upto(5_000)])).await.unwrap();
        assert_eq!(budget.spent(), U256::from(5_000), "the maximum is reserved");
        assert_eq!(r.amount(), U256::from(5_000), "no receipt yet: the maximum");
        let err = pay(&s, &challenge(&[upto(5_000)])).await.unwrap_err();
        assert!(err.is_budget_exceeded(), "{err:?}");
        assert_eq!(budget.spent(), U256::from(5_000));
    }

    fn receipt(success: bool, amount: Option<u64>) -> SettleResponse {
        SettleResponse {
            success,
            error_reason: None,
            payer: None,
            transaction: None,
            signature: None,
            network: Network::BASE_SEPOLIA,
            amount: amount.map(U256::from),
        }
    }

    #[tokio::test]
    async fn a_settled_upto_gives_back_what_it_did_not_use() {
        let budget = Budget::new(U256::from(100_000));
        let s = shared(Policy::new(U256::MAX).allow_upto().budget(budget.clone()));
        let (_, mut r) = pay(&s, &challenge(&[upto(50_000)])).await.unwrap();
        assert_eq!(budget.spent(), U256::from(50_000));

        // Nothing to give back without a definite, successful, stated amount.
        r.outcome = PaymentOutcome::Settled;
        assert_eq!(unsettled(&r), None, "no receipt");
        r.receipt = Some(receipt(true, None));
        assert_eq!(unsettled(&r), None, "receipt without amount");
        r.receipt = Some(receipt(false, Some(1_234)));
        r.outcome = PaymentOutcome::Refused { reason: None };
        assert_eq!(unsettled(&r), None, "failed receipt");
        r.receipt = Some(receipt(true, Some(1_234)));
        r.outcome = PaymentOutcome::Unknown;
        assert_eq!(unsettled(&r), None, "outcome unknown");

        r.outcome = PaymentOutcome::Settled;
        assert_eq!(unsettled(&r), Some(U256::from(50_000 - 1_234)));
        assert_eq!(r.settled_amount(), Some(U256::from(1_234)));
        assert_eq!(r.amount(), U256::from(1_234));
        assert_eq!(r.max_amount(), U256::from(50_000));
        // Through finish, as a call ends.
        let mut h = http::HeaderMap::new();
        h.insert(
            crate::proto::header::PAYMENT_RESPONSE,
            crate::proto::header::encode_json(
                &serde_json::to_vec(&json!({
                    "success": true, "transaction": "", "network": "eip155:84532",
                    "amount": "1234",
                }))
                .unwrap(),
            ),
        );
        let mut res = Response::new(String::new());
        *res.headers_mut() = h;
        r.receipt = None;
        let res = finish(res, Some(r.clone()), false, Some(&budget));
        let report = res.extensions().get::<PaymentReport>().unwrap();
        assert_eq!(report.outcome, PaymentOutcome::Settled);
        assert_eq!(
            budget.spent(),
            U256::from(1_234),
            "the budget spent the usage"
        );

        // Zero usage gives the whole maximum back; an amount above it (a broken server)
        // gives nothing back.
        r.receipt = Some(receipt(true, Some(0)));
        assert_eq!(unsettled(&r), Some(U256::from(50_000)));
        assert_eq!(r.amount(), U256::ZERO);
        r.receipt = Some(receipt(true, Some(60_000)));
        assert_eq!(unsettled(&r), Some(U256::ZERO));
        assert_eq!(r.amount(), U256::from(50_000));

        // exact: the price stays counted whatever the receipt says.
        let (_, mut e) = pay(&s, &challenge(&[exact(2_000)])).await.unwrap();
        e.outcome = PaymentOutcome::Settled;
        e.receipt = Some(receipt(true, Some(2_000)));
        assert_eq!(unsettled(&e), None);
    }
}
