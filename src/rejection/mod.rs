//! The one table from refusal to HTTP response: status, reason code, `Retry-After`.
//!
//! This is the catalogue of every answer the layer sends in place of the handler. `reason` is
//! the `error` field of the 402 challenge (v2 `PAYMENT-REQUIRED` header and v1 JSON body) or
//! of the JSON body `{error, message}` of a 400/429/431/503; `Retry-After` is in seconds.
//! `tests/catalogue.rs` drives the layer into every row and checks the status, reason and
//! `Retry-After` it really sends, so this table cannot drift from the code.
//!
//! | Situation | Status | Reason | Retry-After | What the client does |
//! |---|---|---|---|---|
//! | no payment header on a priced route | 402 | — | no | pay: the challenge lists what to pay (v2 `PAYMENT-REQUIRED` header + v1 JSON body) |
//! | header not canonical base64 / not UTF-8 x402 JSON / repeated / both v1 and v2 headers | 400 | `invalid_payload` | no | fix the client |
//! | the scheme payload is not an exact-EVM (or upto-EVM) payload ([`VerifyError::InvalidPayload`](crate::verify::VerifyError::InvalidPayload)) | 400 | `invalid_payload` | no | fix the client |
//! | header longer than the limit ([`max_header_bytes`](crate::layer::PaymentLayerBuilder::max_header_bytes)) | 431 | `invalid_payload` | no | fix the client |
//! | `x402Version` wrong for the header, or the route does not speak it | 402 | `invalid_x402_version` | no | pay again with a version the challenge offers |
//! | scheme not offered by this route | 402 | `unsupported_scheme` | no | pay again with an offered option |
//! | network not offered by this route | 402 | `invalid_network` | no | pay again with an offered option |
//! | echoed requirements (asset, payTo, amount) not offered by this route | 402 | `invalid_payment_requirements` | no | pay again with an offered option |
//! | v2 proof whose echoed `resource.url` names another path or query than the request (another origin too with [`ResourceCheck::Url`](crate::ResourceCheck)) | 402 | `resource_mismatch` | no | pay again against this resource's challenge |
//! | proof does not verify ([`VerifyError::reason`](crate::verify::VerifyError::reason)) | 402 | `invalid_exact_evm_scheme`, `invalid_exact_evm_network_mismatch`, `invalid_exact_evm_missing_eip712_domain`, `invalid_exact_evm_recipient_mismatch`, `invalid_exact_evm_authorization_value`, `invalid_exact_evm_payload_authorization_valid_after`, `invalid_exact_evm_payload_authorization_valid_before`, `invalid_exact_evm_signature` (with [smart wallets](crate::verify::ExactEvmVerifier::with_contract_signatures): also when the chain refuses a contract signature), `eip6492_factory_not_allowed` (an undeployed wallet's factory is not allowlisted) | no | sign a new, correct proof |
//! | a remote verifier (facilitator) refuses the proof | 402 | its code when it is one of [`KNOWN`][crate::facilitator::wire::reason::KNOWN], else `facilitator_rejected` | no | sign a new, correct proof |
//! | proof already used, or in use by a concurrent request | 402 | `invalid_exact_evm_nonce_already_used`; a Solana proof: `duplicate_settlement` | no | sign a new proof |
//! | the settler refuses: in its pre-check (handler not run), or at settlement (handler ran, its body withheld, failed receipt) | 402 | `insufficient_funds`, `invalid_exact_evm_insufficient_balance`, `invalid_exact_evm_nonce_already_used`, `invalid_exact_evm_payload_authorization_valid_before`, `invalid_exact_evm_payload_authorization_valid_after`, `invalid_exact_evm_signature`, `invalid_exact_evm_transaction_failed`, `invalid_network`, `asset_not_deployed_contract`, `eip6492_factory_not_allowed`, `smart_wallet_deployment_failed`, `invalid_exact_evm_payload_undeployed_smart_wallet` (a deferred settler's batches do not deploy wallets) ([`onchain::reason`][crate::settle::onchain::reason]); a facilitator's [`KNOWN`][crate::facilitator::wire::reason::KNOWN] code | no | fix the cause (e.g. top up), sign a new proof |
//! | too many verifications in flight ([`max_concurrent_verifications`](crate::layer::PaymentLayerBuilder::max_concurrent_verifications)) | 503 | `overloaded` | yes | retry the same proof after `Retry-After` |
//! | nonce store, verifier or settler unavailable, nothing sent | 503 | `service_unavailable` | yes | retry the same proof after `Retry-After` (the proof was released) |
//! | verifier or settler rate-limits the server | 429 | `rate_limited` | yes | retry the same proof after `Retry-After` |
//! | settlement sent, outcome unknown (no receipt in time) | 503 | `settlement_outcome_unknown` | yes | do **not** pay again: the proof stays spent; check the receipt's transaction |
//! | a [hook](crate::hooks) refused | the hook's | `refused_by_hook` | the hook's | as the hook's response says |
//!
//! Opt-in features add their own answers. Each row is driven by the feature's own test
//! (`tests/challenge.rs`, `tests/idempotency.rs`, `tests/prepaid.rs`, `tests/upto.rs`,
//! `tests/upto_chain.rs`); `tests/catalogue.rs`
//! checks that every reason code the layer defines is in one of the two tables.
//!
//! | Opt-in situation | Status | Reason | Retry-After | What the client does |
//! |---|---|---|---|---|
//! | bound challenges on ([`crate::challenge`]): `accepted.extra.challenge` missing, tampered, unknown key, or issued for another resource, method or price | 402 | `invalid_challenge` | no | pay again against the fresh challenge |
//! | bound challenges on: the echoed challenge id expired | 402 | `challenge_expired` | no | pay again against the fresh challenge |
//! | [idempotency](crate::idempotency) required, v2 payload without a `payment-identifier` id ([`idempotency_required`](crate::layer::PaymentLayerBuilder::idempotency_required)) | 400 | `payment_identifier_required` | no | send an id |
//! | `payment-identifier` id not 16–128 characters of `[A-Za-z0-9_-]` | 400 | `invalid_payment_identifier` | no | fix the client |
//! | same id, same proof, first request still running | 503 | `payment_in_progress` | yes | retry the same request |
//! | same id, another proof or another request target | 409 | `payment_identifier_conflict` | no | pick a new id for a new payment |
//! | same id, same proof, first request finished | the first answer's | — | the first answer's | the stored response, replayed as is (no second handler run or settlement) |
//! | a custom verifier refuses by policy ([`VerifyError::Policy`](crate::verify::VerifyError::Policy)), e.g. a deny-list (tested in `tests/custom_verifier.rs`) | its 4xx (403 for any other status) | its code (often a [`Reason::Custom`]) | no | as its message says; the proof is not spent |
//! | [idempotency](crate::idempotency) on: the paid handler's body failed after settlement (buffered, bounded bodies) | 500 | `response_body_failed` | no | the receipt says it was paid: do not pay again; the same id replays this answer (the seller refunds or serves by hand) |
//! | [prepaid](crate::prepaid) route: `SIGN-IN-WITH-X` header unreadable | 400 | `invalid_siwx_payload`, `invalid_siwx_malformed_signature` | no | fix the client (431 `invalid_payload` when too large) |
//! | prepaid route: sign-in for another domain/uri/chain, forged or expired nonce, wrong signer | 401 | `invalid_siwx_*` (see [`crate::prepaid`]) | no | sign in again against a fresh challenge (`WWW-Authenticate: SIWX`) |
//! | prepaid route: sign-in nonce already used (replayed message) | 401 | `invalid_siwx_nonce_reused` | no | sign in again with a fresh nonce |
//! | prepaid route: valid sign-in, credit used up / expired | 402 | `prepaid_credit_exhausted`, `prepaid_credit_expired` | no | buy the bundle again (fresh challenge, fresh sign-in nonce) |
//! | [`upto`](crate::upto) route: the Permit2 permit does not verify ([`verify::upto::reason`](crate::verify::upto::reason)) | 402 | `invalid_upto_evm_scheme`, `invalid_upto_evm_network_mismatch`, `invalid_permit2_spender`, `invalid_permit2_recipient_mismatch`, `upto_facilitator_mismatch`, `permit2_deadline_expired`, `permit2_deadline_too_far`, `permit2_not_yet_valid`, `permit2_amount_mismatch`, `permit2_token_mismatch`, `invalid_permit2_signature` | no | sign a new, correct permit |
//! | upto route, on-chain pre-check (handler not run): no Permit2 allowance, low balance, Permit2 nonce used | 402 | `permit2_allowance_required`, `insufficient_funds`, `invalid_exact_evm_nonce_already_used` | no | approve Permit2 / top up, sign a new permit |
//! | upto route: the handler metered more than the signed maximum (body withheld, nothing settled) | 402 | `invalid_upto_evm_payload_settlement_exceeds_amount` | no | authorise a higher maximum if the route offers one |
//! | upto route: settlement refused by Permit2 or the proxy (handler ran, body withheld) | 402 | `permit2_invalid_nonce`, `permit2_deadline_expired`, `invalid_permit2_signature`, `permit2_payment_too_early`, `upto_facilitator_mismatch`, `invalid_exact_evm_transaction_failed` | no | sign a new permit |
//! | [Solana](crate::verify::svm) `exact` route (feature `svm`): the transaction does not verify ([`SvmError`](crate::verify::svm::SvmError), tested in `tests/svm.rs`) | 402 | `invalid_exact_svm_unsupported_scheme`, `invalid_exact_svm_network_mismatch`, `invalid_exact_svm_payload_missing_fee_payer`, `invalid_exact_svm_fee_payer_not_managed_by_facilitator`, `invalid_exact_svm_payload_transaction_could_not_be_decoded`, `invalid_exact_svm_payload_signature_invalid`, `invalid_exact_svm_payload_excessive_signers`, `invalid_exact_svm_fee_payer_mismatch`, `invalid_exact_svm_smart_wallet_alt_resolution_not_available`, `invalid_exact_svm_payload_transaction_instructions_length`, `invalid_exact_svm_payload_transaction_instructions_compute_limit_instruction`, `invalid_exact_svm_payload_transaction_instructions_compute_limit_instruction_too_high`, `invalid_exact_svm_payload_transaction_instructions_compute_price_instruction`, `invalid_exact_svm_payload_transaction_instructions_compute_price_instruction_too_high`, `invalid_exact_svm_payload_no_transfer_instruction`, `invalid_exact_svm_payload_transaction_fee_payer_transferring_funds`, `invalid_exact_svm_smart_wallet_fee_payer_not_isolated`, `invalid_exact_svm_payload_mint_mismatch`, `invalid_exact_svm_payload_recipient_mismatch`, `invalid_exact_svm_payload_amount_mismatch`, `invalid_exact_svm_payload_unknown_fourth_instruction`, `invalid_exact_svm_payload_unknown_fifth_instruction`, `invalid_exact_svm_payload_unknown_sixth_instruction`, `invalid_exact_svm_payload_unknown_seventh_instruction`, `invalid_exact_svm_payload_memo_count`, `invalid_exact_svm_payload_memo_mismatch` | no | sign a new, correct transaction |
//! | [channel](crate::channel) route (`batch-settlement`, [`channels`](crate::layer::PaymentLayerBuilder::channels), tested over HTTP in `tests/channel_http.rs`): the payload, its channel config, voucher or deposit does not verify, or its amounts do not fit the channel's state ([`BatchError`](crate::channel::verify::BatchError)) | 402 | `invalid_batch_settlement_evm_channel_id_mismatch`, `invalid_batch_settlement_evm_cumulative_exceeds_balance`, `invalid_batch_settlement_evm_deposit_payload`, `invalid_batch_settlement_evm_erc3009_authorization_required`, `invalid_batch_settlement_evm_missing_channel`, `invalid_batch_settlement_evm_payload_authorization_valid_after`, `invalid_batch_settlement_evm_payload_authorization_valid_before`, `invalid_batch_settlement_evm_payload_type`, `invalid_batch_settlement_evm_receive_authorization_signature`, `invalid_batch_settlement_evm_receiver_authorizer_mismatch`, `invalid_batch_settlement_evm_receiver_mismatch`, `invalid_batch_settlement_evm_refund_payload`, `invalid_batch_settlement_evm_token_mismatch`, `invalid_batch_settlement_evm_voucher_payload`, `invalid_batch_settlement_evm_voucher_signature`, `invalid_batch_settlement_evm_withdraw_delay_mismatch`, `invalid_batch_settlement_evm_refund_amount_invalid`, `invalid_batch_settlement_evm_refund_no_balance` | no | sign a new, correct payload |
//! | channel route, Permit2 deposit (`assetTransferMethod: "permit2"`, tested in `tests/channel_permit2.rs`): the permit's spender, amount, deadline or signature does not verify (a wrong token or channel: the row above) | 402 | `invalid_batch_settlement_evm_permit2_invalid_spender`, `invalid_batch_settlement_evm_permit2_amount_mismatch`, `invalid_batch_settlement_evm_permit2_deadline_expired`, `invalid_batch_settlement_evm_permit2_invalid_signature` | no | sign a new, correct payload |
//! | channel route, Permit2 deposit through `OnchainSettler`: the payer's Permit2 allowance is below the deposit (read before sending; nothing sent, handler not run) | 402 | `invalid_batch_settlement_evm_permit2_allowance_required` | no | approve Permit2 on the token, then pay again |
//! | channel route, checks of the engine that the layer's `select` and the option already make (scheme, network, EIP-712 domain, delay range) or that need a claim on chain first (tested on the engine in `tests/channel.rs` where reachable) | 402 | `invalid_batch_settlement_evm_scheme`, `invalid_batch_settlement_evm_network_mismatch`, `invalid_batch_settlement_evm_missing_eip712_domain`, `invalid_batch_settlement_evm_withdraw_delay_out_of_range`, `invalid_batch_settlement_evm_cumulative_below_claimed`, `invalid_batch_settlement_evm_channel_not_found` | no | sign a new, correct payload |
//! | channel route: the voucher's cumulative amount is not the server's charged amount plus the price | 402 | `invalid_batch_settlement_evm_cumulative_amount_mismatch` (the corrective 402: the option's `extra` carries `channelState` and `voucherState`) | no | check the server's last voucher, adopt its charged amount, sign the next voucher |
//! | channel route: another request holds the channel (its lease) | 402 | `invalid_batch_settlement_evm_channel_busy` | no | retry after the other request |
//! | channel route: the handler metered more than the price (body withheld, nothing charged) | 402 | `invalid_batch_settlement_evm_charge_exceeds_signed_cumulative` | no | as for `upto` |
//! | channel route: the channel store, the escrow (deposit, refund) or the receiver authorizer failed; nothing charged | 503 | `service_unavailable` | yes | retry the same payload after `Retry-After` |
//! | prepaid route with [`contract_signatures`](crate::prepaid::Prepaid::contract_signatures): the chain's ERC-1271/6492 check failed or timed out | 503 | `service_unavailable` | yes | retry the same sign-in header after `Retry-After` (its nonce was not spent) |
//!
//! `Retry-After` is the backend's suggestion when it gave one, else
//! [`PaymentLayerBuilder::retry_after`](crate::layer::PaymentLayerBuilder::retry_after)
//! (5 s by default). A hook's refusal is its own response, sent as is: `refused_by_hook` is
//! only in the [`PaymentRejection`] extension, not in the body.
//!
//! A settlement that fails after the handler ran also carries a failed receipt
//! (`PAYMENT-RESPONSE`, v1 `X-PAYMENT-RESPONSE`, `success: false`) whose `errorReason` is the
//! [`SettleError::reason`](crate::settle::SettleError::reason):
//!
//! | Settlement failure | Status | Receipt `errorReason` |
//! |---|---|---|
//! | refused | 402 | the refusal's reason (rows above) |
//! | backend unavailable, nothing sent | 503 | `unexpected_settle_error` |
//! | backend rate-limits the server | 429 | `rate_limited` |
//! | outcome unknown | 503 | `settlement_outcome_unknown` |
//!
//! [`VerifyError::Unavailable`](crate::verify::VerifyError::Unavailable) has the x402 code
//! `unexpected_verify_error` (what a facilitator reports); the layer answers it with 503
//! `service_unavailable`, as every dependency outage.
//!
//! Every such response carries `Cache-Control: no-store` and a [`PaymentRejection`] in its
//! extensions, so outer layers (logging, metrics) can see why.
//!
#![cfg_attr(
    not(feature = "facilitator"),
    doc = "[crate::facilitator::wire::reason::KNOWN]: https://docs.rs/tower-x402/latest/tower_x402/facilitator/wire/reason/constant.KNOWN.html"
)]
#![cfg_attr(
    not(feature = "onchain"),
    doc = "[crate::settle::onchain::reason]: https://docs.rs/tower-x402/latest/tower_x402/settle/onchain/reason/index.html"
)]

use std::time::Duration;

use http::StatusCode;

pub use crate::reason::{self, Reason};

/// Why the layer answered in place of the handler (in the response's extensions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentRejection {
    /// The status sent.
    pub status: StatusCode,
    /// The reason code sent (`None` for a plain first challenge).
    pub reason: Option<Reason>,
    /// The `Retry-After` sent, if any.
    pub retry_after: Option<Duration>,
}

/// A refusal, before it becomes a response.
#[derive(Debug)]
pub(crate) enum Rejection {
    /// 402 and a fresh challenge.
    Pay { reason: Option<Reason> },
    /// 400: the proof is malformed.
    BadRequest { reason: Reason, message: String },
    /// 431: the payment header is too large.
    TooLarge { message: String },
    /// 503: a dependency is down, the layer is overloaded, or a settlement is in doubt.
    Unavailable {
        retry_after: Duration,
        reason: Reason,
    },
    /// 429: a dependency rate-limits us.
    RateLimited { retry_after: Duration },
    /// 409: the payment identifier is bound to another proof.
    Conflict { reason: Reason },
    /// 401: a sign-in proof (prepaid routes) is invalid or replayed.
    Unauthorized { reason: Reason, message: String },
    /// A custom verifier's policy refusal, with its own status (e.g. 403).
    Policy {
        status: StatusCode,
        reason: Reason,
        message: String,
    },
}

impl Rejection {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::Pay { .. } => StatusCode::PAYMENT_REQUIRED,
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::TooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::Policy { status, .. } => *status,
        }
    }

    pub(crate) fn reason(&self) -> Option<Reason> {
        match self {
            Self::Pay { reason } => reason.clone(),
            Self::TooLarge { .. } => Some(reason::INVALID_PAYLOAD),
            Self::RateLimited { .. } => Some(reason::RATE_LIMITED),
            Self::BadRequest { reason, .. }
            | Self::Unavailable { reason, .. }
            | Self::Conflict { reason }
            | Self::Unauthorized { reason, .. }
            | Self::Policy { reason, .. } => Some(reason.clone()),
        }
    }

    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Unavailable { retry_after, .. } | Self::RateLimited { retry_after } => {
                Some(*retry_after)
            }
            _ => None,
        }
    }

    pub(crate) fn info(&self) -> PaymentRejection {
        PaymentRejection {
            status: self.status(),
            reason: self.reason(),
            retry_after: self.retry_after(),
        }
    }
}

impl From<crate::proto::header::HeaderError> for Rejection {
    fn from(e: crate::proto::header::HeaderError) -> Self {
        use crate::proto::header::HeaderError;
        match e {
            HeaderError::TooLarge { .. } => Self::TooLarge {
                message: e.to_string(),
            },
            HeaderError::Version { .. } => Self::Pay {
                reason: Some(reason::INVALID_X402_VERSION),
            },
            _ => Self::BadRequest {
                reason: e.reason(),
                message: e.to_string(),
            },
        }
    }
}

/// The one mapping from a verifier's error: 503 for a verifier that is down, 429 when it
/// rate-limits us, 400 for a malformed proof, 402 with its reason for a refusal.
pub(crate) fn of_verify(e: &crate::verify::VerifyError, default_wait: Duration) -> Rejection {
    let retry_after = e.retry_after().unwrap_or(default_wait);
    if let crate::verify::VerifyError::Policy {
        status,
        reason,
        message,
    } = e
    {
        // A policy answer is a client error: anything else is sent as 403.
        let status = if status.is_client_error() {
            *status
        } else {
            StatusCode::FORBIDDEN
        };
        return Rejection::Policy {
            status,
            reason: reason.clone(),
            message: message.clone(),
        };
    }
    if e.is_rate_limited() {
        Rejection::RateLimited { retry_after }
    } else if e.is_retryable() {
        Rejection::Unavailable {
            retry_after,
            reason: reason::SERVICE_UNAVAILABLE,
        }
    } else if e.is_malformed() {
        Rejection::BadRequest {
            reason: e.reason(),
            message: e.to_string(),
        }
    } else {
        Rejection::Pay {
            reason: Some(e.reason()),
        }
    }
}

/// The one mapping from a settler's error: 402 with the reason for a refusal, 429 when
/// rate-limited, 503 for a settler that is down or whose outcome is unknown.
pub(crate) fn of_settle(e: &crate::settle::SettleError, default_wait: Duration) -> Rejection {
    use crate::settle::SettleError;
    let retry_after = e.retry_after().unwrap_or(default_wait);
    match e {
        SettleError::Refused { reason, .. } => Rejection::Pay {
            reason: Some(reason.clone()),
        },
        SettleError::RateLimited { .. } => Rejection::RateLimited { retry_after },
        SettleError::Unknown { .. } => Rejection::Unavailable {
            retry_after,
            reason: reason::SETTLEMENT_OUTCOME_UNKNOWN,
        },
        SettleError::Unavailable { .. } => Rejection::Unavailable {
            retry_after,
            reason: reason::SERVICE_UNAVAILABLE,
        },
    }
}

/// The one mapping from a store's error (nonce, idempotency, credit): the store is down or
/// full, the request fails closed with 503 and the store's wait, else the layer's.
pub(crate) fn of_store(e: &crate::nonce::StoreError, default_wait: Duration) -> Rejection {
    Rejection::Unavailable {
        retry_after: e.retry_after().unwrap_or(default_wait),
        reason: reason::SERVICE_UNAVAILABLE,
    }
}

/// The one mapping from a refused sign-in (prepaid routes): where the flow stopped, the
/// refusal, and the error for hooks and traces.
pub(crate) fn of_prepaid(
    refusal: crate::prepaid::Refusal,
    default_wait: Duration,
) -> (
    crate::hooks::Stage,
    Rejection,
    Option<Box<dyn std::error::Error + Send + Sync>>,
) {
    use crate::hooks::Stage;
    use crate::prepaid::{Refusal, reason as prepaid, siwx};
    match refusal {
        Refusal::Siwx(siwx::SiwxError::Header(e)) if e.is_too_large() => {
            (Stage::Decode, e.into(), None)
        }
        Refusal::Siwx(e) if e.is_malformed() => (
            Stage::Decode,
            Rejection::BadRequest {
                reason: e.reason(),
                message: e.to_string(),
            },
            None,
        ),
        Refusal::Siwx(e) => (
            Stage::Verify,
            Rejection::Unauthorized {
                reason: e.reason(),
                message: e.to_string(),
            },
            Some(Box::new(e)),
        ),
        Refusal::Replayed => (
            Stage::Reserve,
            Rejection::Unauthorized {
                reason: siwx::reason::NONCE_REUSED,
                message: "this sign-in message was already used: sign a fresh challenge".into(),
            },
            None,
        ),
        Refusal::Exhausted => (
            Stage::Check,
            Rejection::Pay {
                reason: Some(prepaid::CREDIT_EXHAUSTED),
            },
            None,
        ),
        Refusal::Expired => (
            Stage::Check,
            Rejection::Pay {
                reason: Some(prepaid::CREDIT_EXPIRED),
            },
            None,
        ),
        Refusal::Unavailable(e) => (
            Stage::Reserve,
            of_store(&e, default_wait),
            Some(Box::new(e)),
        ),
        Refusal::Chain(e) => (
            Stage::Verify,
            Rejection::Unavailable {
                retry_after: default_wait,
                reason: reason::SERVICE_UNAVAILABLE,
            },
            Some(Box::new(e)),
        ),
    }
}
