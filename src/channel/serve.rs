//! One paid request on a channel, start to end: authenticate the payload (no lease), take
//! the channel's lease, check the amounts against the stored state, submit a deposit through
//! the [`Escrow`], run the handler with the most it may charge, commit what it charged, give
//! the lease back. The layer's request path calls this (`PaymentLayerBuilder::channels`).
//!
//! Safety rules it keeps (the spec's "Request Processing"): one request per channel at a time
//! across instances (the lease; others get `channel_busy`), the handler never runs on a
//! payload that failed a check or on a deposit that did not land, and state is committed only
//! after the handler succeeded (a failed handler leaves the charge unchanged, so the same
//! voucher can be retried). A deposit that landed is mirrored even if the handler then fails.

use std::future::Future;

use alloy_primitives::{B256, Bytes, U256};
use async_trait::async_trait;

use super::store::{ChannelState, ChannelStore};
use super::verify::{self, Accepted, BatchError, ChannelTerms, Request};
use super::{ChannelClaim, ReceiverAuthorizer, claim_digest, refund_digest};
use crate::alert::{Alert, alert};
use crate::clock::{Clock, SystemClock};
use crate::proto::batch::{BatchEvmPayload, ChannelConfig, Deposit};
use crate::store::StoreError;

/// The escrow's state of a channel after a transaction, as the chain reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mirror {
    /// The transaction that changed it.
    pub transaction: B256,
    /// `balance` after it.
    pub balance: u128,
    /// `totalClaimed` after it.
    pub total_claimed: u128,
}

/// Why the escrow could not take a deposit.
#[derive(Debug, thiserror::Error)]
#[error("deposit failed: {0}")]
pub struct EscrowError(pub crate::store::BoxError);

/// A channel as the escrow names it: its config and id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EscrowChannel<'a> {
    /// The channel's config.
    pub config: &'a ChannelConfig,
    /// The channel's id (the config's EIP-712 hash).
    pub id: B256,
}

/// A client's payment as the engine hands it to an [`Escrow`]: the server's terms and the
/// checked payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EscrowPayment<'a> {
    /// The terms of the option paid.
    pub terms: &'a ChannelTerms,
    /// The payload, checked against the terms and the channel's state.
    pub payload: &'a BatchEvmPayload,
}

impl<'a> EscrowPayment<'a> {
    /// The payload's channel.
    pub fn channel(&self) -> EscrowChannel<'a> {
        EscrowChannel {
            config: self.payload.channel_config(),
            id: self.payload.voucher().channel_id,
        }
    }
}

/// A cooperative refund: first the claim of the channel's unclaimed charges (when given),
/// then `refundWithSignature(config, amount, nonce, signature)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CooperativeRefund {
    /// The claim and the receiver authorizer's `ClaimBatch` signature of it.
    pub claim: Option<(ChannelClaim, Bytes)>,
    /// The amount returned to the payer.
    pub amount: u128,
    /// The channel's `refundNonce`.
    pub nonce: U256,
    /// The receiver authorizer's signature of the refund ([`refund_digest`]).
    pub signature: Bytes,
}

/// Submits deposits into the escrow (our relayer, or a facilitator).
#[async_trait]
pub trait Escrow: Send + Sync + 'static {
    /// Sends `deposit` into `channel` and waits for it: the channel's state after it. An
    /// error caused by a [`BatchError`] is a refusal (402, nothing was sent, e.g. no Permit2
    /// allowance); any other is an outage (503).
    async fn deposit(
        &self,
        channel: EscrowChannel<'_>,
        deposit: &Deposit,
    ) -> Result<Mirror, EscrowError>;

    /// Sends the cooperative `refund` of `channel`: the channel's state after it.
    async fn refund(
        &self,
        channel: EscrowChannel<'_>,
        refund: CooperativeRefund,
    ) -> Result<Mirror, EscrowError>;

    /// Sends the deposit of `payment` (a `deposit` payload already checked against the terms
    /// and the channel's state): what [`Channels::pay`] calls. The default is
    /// [`Escrow::deposit`]; a backend that needs the whole payment (a facilitator re-verifies
    /// the voucher against the server's requirements) overrides it.
    async fn deposit_payment(&self, payment: EscrowPayment<'_>) -> Result<Mirror, EscrowError> {
        match payment.payload {
            BatchEvmPayload::Deposit { deposit, .. } => {
                self.deposit(payment.channel(), deposit).await
            }
            _ => Err(EscrowError("not a deposit payload".into())),
        }
    }

    /// The cooperative refund of `payment` (a `refund` payload): what [`Channels::refund`]
    /// calls. The default is [`Escrow::refund`]; a backend that needs the chain and the
    /// voucher (a facilitator) overrides it.
    async fn refund_payment(
        &self,
        payment: EscrowPayment<'_>,
        refund: CooperativeRefund,
    ) -> Result<Mirror, EscrowError> {
        self.refund(payment.channel(), refund).await
    }
}

#[async_trait]
impl<T: Escrow + ?Sized> Escrow for std::sync::Arc<T> {
    async fn deposit(&self, c: EscrowChannel<'_>, d: &Deposit) -> Landed {
        (**self).deposit(c, d).await
    }
    async fn refund(&self, c: EscrowChannel<'_>, r: CooperativeRefund) -> Landed {
        (**self).refund(c, r).await
    }
    async fn deposit_payment(&self, p: EscrowPayment<'_>) -> Landed {
        (**self).deposit_payment(p).await
    }
    async fn refund_payment(&self, p: EscrowPayment<'_>, r: CooperativeRefund) -> Landed {
        (**self).refund_payment(p, r).await
    }
}

/// What an [`Escrow`] call answers (the forwarding impl's shorthand).
type Landed = Result<Mirror, EscrowError>;

/// Why a paid request on a channel did not run (or did not commit).
#[derive(Debug, thiserror::Error)]
pub enum PayError<E> {
    /// A check failed; `state` is the server's record, for a corrective 402 when the error
    /// is [`BatchError::CumulativeAmountMismatch`].
    #[error("{error}")]
    Refused {
        /// What failed.
        error: BatchError,
        /// The server's record of the channel, if any.
        state: Option<Box<ChannelState>>,
    },
    /// A refund payload given to [`Channels::pay`] (use [`Channels::refund`]), or to a
    /// [`Channels`] without a receiver authorizer.
    #[error("refund payloads go to Channels::refund, with a receiver authorizer")]
    RefundUnsupported,
    /// The receiver authorizer could not sign.
    #[error("the receiver authorizer could not sign")]
    Authorizer(crate::store::BoxError),
    /// The deposit did not land, or the chain could not judge an EIP-1271 voucher: the
    /// handler did not run.
    #[error(transparent)]
    Escrow(EscrowError),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
    /// The handler failed: nothing was charged.
    #[error("the handler failed")]
    Handler(E),
}

/// A paid request that ran and committed.
#[derive(Debug)]
pub struct Paid<T> {
    /// The handler's answer.
    pub response: T,
    /// What the handler charged (at most the price).
    pub charged: u128,
    /// The deposit's transaction, if the payload carried one.
    pub deposit: Option<Mirror>,
    /// The channel's record after the request.
    pub state: ChannelState,
}

/// A cooperative refund that went through.
#[derive(Debug)]
pub struct Refunded {
    /// The refund transaction and the channel's state after it.
    pub mirror: Mirror,
    /// The amount returned to the payer.
    pub amount: u128,
    /// The channel's record after it (`None`: fully refunded, the record was deleted).
    pub state: Option<ChannelState>,
}

/// Serves paid requests on channels kept in a [`ChannelStore`].
pub struct Channels<S, X> {
    store: S,
    escrow: X,
    lease_seconds: u64,
    authorizer: Option<std::sync::Arc<dyn ReceiverAuthorizer>>,
    contracts: Option<std::sync::Arc<dyn crate::verify::wallet::ContractSignatures>>,
    clock: std::sync::Arc<dyn Clock>,
}

impl<S: std::fmt::Debug, X: std::fmt::Debug> std::fmt::Debug for Channels<S, X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels")
            .field("store", &self.store)
            .field("escrow", &self.escrow)
            .field("lease_seconds", &self.lease_seconds)
            .field("authorizer", &self.authorizer.is_some())
            .finish()
    }
}

impl<S: ChannelStore, X: Escrow> Channels<S, X> {
    /// Channels in `store`, deposits through `escrow`, leases of 60 seconds.
    pub fn new(store: S, escrow: X) -> Self {
        Self {
            store,
            escrow,
            lease_seconds: 60,
            authorizer: None,
            contracts: None,
            clock: std::sync::Arc::new(SystemClock),
        }
    }

    /// The clock a layer serving these channels reads the time of each request from: deposit
    /// and permit validity, the record's timestamps (default: the system clock; tests inject a
    /// [`FixedClock`](crate::clock::FixedClock)). Give it the clock the layer's verifier
    /// runs on. [`Channels::pay`] and [`Channels::refund`] take the time as an argument.
    #[must_use]
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = std::sync::Arc::new(clock);
        self
    }

    /// Now, by [`Self::with_clock`]'s clock.
    pub(crate) fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Checks vouchers of channels whose `payerAuthorizer` is zero with the payer's contract
    /// through the chain (EIP-1271), e.g. with an `OnchainSettler`; see
    /// [`verify::authenticate_with_contracts`]. Without it they are refused.
    pub fn with_contract_signatures(
        mut self,
        checker: impl crate::verify::wallet::ContractSignatures,
    ) -> Self {
        self.contracts = Some(std::sync::Arc::new(checker));
        self
    }

    /// [`verify::authenticate_with_contracts`] with this engine's checker.
    async fn authenticate<E>(
        &self,
        terms: &ChannelTerms,
        payload: &BatchEvmPayload,
        now: u64,
    ) -> Result<verify::Authentic, PayError<E>> {
        verify::authenticate_with_contracts(terms, payload, now, self.contracts.as_deref())
            .await
            .map_err(|e| match e {
                verify::ContractAuthError::Refused(error) => {
                    PayError::Refused { error, state: None }
                }
                verify::ContractAuthError::Unavailable(e) => {
                    PayError::Escrow(EscrowError(e.into()))
                }
            })
    }

    /// The server's receiver authorizer key: signs the claim and the refund of a
    /// cooperative refund ([`Channels::refund`]).
    pub fn with_authorizer(mut self, authorizer: impl ReceiverAuthorizer + 'static) -> Self {
        self.authorizer = Some(std::sync::Arc::new(authorizer));
        self
    }

    /// How long a request may hold a channel before another may take it over (the commit's
    /// compare-and-set still refuses the late holder's write).
    pub fn lease_seconds(mut self, seconds: u64) -> Self {
        self.lease_seconds = seconds;
        self
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Serves one request paid by `payload` at Unix time `now`. `handler` gets the most it
    /// may charge and answers with its response and what it charged.
    pub async fn pay<F, Fut, T, E>(
        &self,
        terms: &ChannelTerms,
        payload: &BatchEvmPayload,
        now: u64,
        handler: F,
    ) -> Result<Paid<T>, PayError<E>>
    where
        F: FnOnce(u128) -> Fut,
        Fut: Future<Output = Result<(T, u128), E>>,
    {
        if matches!(payload, BatchEvmPayload::Refund { .. }) {
            return Err(PayError::RefundUnsupported);
        }
        let authentic = self.authenticate(terms, payload, now).await?;
        let payment = EscrowPayment { terms, payload };
        self.leased(payment, move |stored| async move {
            let ready = self.ready(payment, authentic, stored, now).await?;
            let outcome = handler(ready.accepted.max_charge()).await;
            self.charge(ready, outcome, now).await
        })
        .await
    }

    /// Serves a `refund` payload (no handler): checks its zero-charge voucher against the
    /// channel's state under the lease, claims what is unclaimed (with that voucher), then
    /// refunds the requested amount (all that is refundable without one) with
    /// `refundWithSignature`, both signed by the receiver authorizer. A full refund deletes
    /// the channel's record.
    pub async fn refund(
        &self,
        terms: &ChannelTerms,
        payload: &BatchEvmPayload,
        now: u64,
    ) -> Result<Refunded, PayError<std::convert::Infallible>> {
        let (BatchEvmPayload::Refund { .. }, Some(authorizer)) = (payload, &self.authorizer) else {
            return Err(PayError::RefundUnsupported);
        };
        let authentic = self.authenticate(terms, payload, now).await?;
        let payment = EscrowPayment { terms, payload };
        self.leased(payment, |stored| {
            self.refund_held(payment, authentic, stored, authorizer.as_ref())
        })
        .await
    }

    /// Runs `held` under the channel's lease, with the channel's record as it stands then; a
    /// channel held by another request is `channel_busy`.
    async fn leased<T, E, Fut>(
        &self,
        payment: EscrowPayment<'_>,
        held: impl FnOnce(Option<ChannelState>) -> Fut,
    ) -> Result<T, PayError<E>>
    where
        Fut: Future<Output = Result<T, PayError<E>>>,
    {
        let channel = payment.payload.voucher().channel_id;
        let seconds = self.lease_seconds;
        let lease = now_or!(
            self.store.lock_now(channel, seconds),
            self.store.lock(channel, seconds)
        )
        .map_err(PayError::Store)?
        .ok_or(PayError::Refused {
            error: BatchError::ChannelBusy,
            state: None,
        })?;
        let stored = now_or!(self.store.load_now(channel), self.store.load(channel));
        let result = match stored {
            Ok(stored) => held(stored).await,
            Err(e) => Err(PayError::Store(e)),
        };
        if let Err(e) = now_or!(self.store.unlock_now(lease), self.store.unlock(lease)) {
            // The lease expires on its own; the channel is only blocked until then.
            alert!(
                Alert::ChannelState,
                cause = &e,
                "channel lease not released: the channel waits for its expiry"
            );
        }
        result
    }

    async fn refund_held(
        &self,
        payment: EscrowPayment<'_>,
        authentic: verify::Authentic,
        stored: Option<ChannelState>,
        authorizer: &dyn ReceiverAuthorizer,
    ) -> Result<Refunded, PayError<std::convert::Infallible>> {
        let accepted = against_state(payment, authentic, &stored)?;
        let (Request::Refund { amount }, Some(mut state)) = (&accepted.request, stored) else {
            return Err(PayError::RefundUnsupported);
        };
        let amount = *amount;
        let refund = cooperative(payment, &accepted, &state, amount, authorizer)?;
        let mirror = self
            .escrow
            .refund_payment(payment, refund)
            .await
            .map_err(escrow_refusal)?;
        let (channel, expected) = (accepted.channel_id, state.charged_cumulative);
        state.balance = mirror.balance;
        state.total_claimed = mirror.total_claimed;
        state.refund_nonce += U256::from(1);
        state.signed_max_claimable = accepted.max_claimable;
        state.signature = accepted.signature;
        let stored = if state.balance <= state.total_claimed {
            self.store.remove(channel, expected).await.map(|_| None)
        } else {
            self.store
                .commit(channel, Some(expected), state.clone())
                .await
                .map(|_| Some(state))
        };
        let state = stored.unwrap_or_else(|e| {
            // The refund is on chain; the next refresh mirrors it.
            alert!(
                Alert::ChannelState,
                cause = &e,
                "a refund's channel state was not stored"
            );
            None
        });
        Ok(Refunded {
            mirror,
            amount,
            state,
        })
    }

    /// The checks against the channel's `stored` record and the deposit, under the lease:
    /// what the handler may charge.
    async fn ready<E>(
        &self,
        payment: EscrowPayment<'_>,
        authentic: verify::Authentic,
        stored: Option<ChannelState>,
        now: u64,
    ) -> Result<Ready, PayError<E>> {
        let accepted = against_state(payment, authentic, &stored)?;
        let expected = stored.as_ref().map(|s| s.charged_cumulative);
        let mut state = stored.unwrap_or_else(|| fresh(&accepted, now));
        let deposit = self
            .deposit_held(payment, &accepted, expected, &mut state, now)
            .await?;
        let held = Held {
            channel: accepted.channel_id,
            expected,
            deposit,
        };
        Ok(Ready {
            accepted,
            state,
            held,
        })
    }

    /// Commits what the handler charged (at most its ceiling); a failed handler or an
    /// overcharge commits nothing but a deposit that landed.
    async fn charge<T, E>(
        &self,
        ready: Ready,
        outcome: Result<(T, u128), E>,
        now: u64,
    ) -> Result<Paid<T>, PayError<E>> {
        let Ready {
            accepted,
            mut state,
            held,
        } = ready;
        match outcome {
            Ok((response, charged)) if charged <= accepted.max_charge() => {
                state.charged_cumulative = accepted.charged_before + charged;
                state.signed_max_claimable = accepted.max_claimable;
                state.signature = accepted.signature;
                state.last_request_at = now;
                self.commit_charge(&held, &state).await?;
                Ok(Paid {
                    response,
                    charged,
                    deposit: held.deposit,
                    state,
                })
            }
            Ok(_) => {
                self.keep_deposit(&held, &state).await;
                Err(PayError::Refused {
                    error: BatchError::ChargeExceedsSignedCumulative,
                    state: None,
                })
            }
            Err(e) => {
                self.keep_deposit(&held, &state).await;
                Err(PayError::Handler(e))
            }
        }
    }

    /// Sends the deposit a `deposit` payload carries and mirrors the chain's answer into
    /// `state`; `None` for a voucher alone. A ceiling above what landed is refused (the
    /// deposit kept).
    async fn deposit_held<E>(
        &self,
        payment: EscrowPayment<'_>,
        accepted: &Accepted,
        expected: Option<u128>,
        state: &mut ChannelState,
        now: u64,
    ) -> Result<Option<Mirror>, PayError<E>> {
        let (Request::Deposit { .. }, BatchEvmPayload::Deposit { .. }) =
            (&accepted.request, payment.payload)
        else {
            return Ok(None);
        };
        let m = self
            .escrow
            .deposit_payment(payment)
            .await
            .map_err(escrow_refusal)?;
        state.balance = m.balance;
        state.total_claimed = m.total_claimed;
        state.onchain_synced_at = now;
        // The chain, not the payload, says what the channel holds now.
        if accepted.max_claimable > m.balance {
            let held = Held {
                channel: accepted.channel_id,
                expected,
                deposit: Some(m),
            };
            self.keep_deposit(&held, state).await;
            return Err(PayError::Refused {
                error: BatchError::CumulativeExceedsBalance,
                state: None,
            });
        }
        Ok(Some(m))
    }

    /// Commits the handler's charge; a record changed under the lease or a store failure
    /// refuses it (and is raised: the charge is not recorded).
    async fn commit_charge<E>(&self, held: &Held, state: &ChannelState) -> Result<(), PayError<E>> {
        match self.commit(held, state).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                alert!(
                    Alert::ChannelState,
                    "channel state changed under a held lease (it expired mid-handler): \
                     this request's charge is not recorded, the client is not charged twice"
                );
                Err(PayError::Refused {
                    error: BatchError::ChannelBusy,
                    state: None,
                })
            }
            Err(e) => {
                alert!(
                    Alert::ChannelState,
                    cause = &e,
                    "channel commit failed after the handler ran: the charge and voucher are lost"
                );
                Err(PayError::Store(e))
            }
        }
    }

    /// `state` committed as `held` expects.
    async fn commit(&self, held: &Held, state: &ChannelState) -> Result<bool, StoreError> {
        let (channel, expected) = (held.channel, held.expected);
        now_or!(
            self.store.commit_now(channel, expected, state),
            self.store.commit(channel, expected, state.clone())
        )
    }

    /// A deposit that landed is recorded even when the request fails afterwards (the money
    /// is in the escrow; the charge is unchanged).
    async fn keep_deposit(&self, held: &Held, state: &ChannelState) {
        if held.deposit.is_none() {
            return;
        }
        match self.commit(held, state).await {
            Ok(true) => {}
            Ok(false) => alert!(
                Alert::ChannelState,
                "channel state changed under a held lease: a deposit's balance is mirrored on the next refresh"
            ),
            Err(e) => alert!(
                Alert::ChannelState,
                cause = &e,
                "a deposit landed but its channel state was not stored"
            ),
        }
    }
}

/// A paid request checked under its lease, before its handler runs: the accepted payload,
/// the record to commit and what the commit expects.
struct Ready {
    accepted: Accepted,
    state: ChannelState,
    held: Held,
}

/// A request holding a channel's lease: the channel, the charged amount its commit expects
/// (`None`: no record yet) and the deposit that landed, if any.
struct Held {
    channel: B256,
    expected: Option<u128>,
    deposit: Option<Mirror>,
}

/// [`verify::against_state`] of `payment`; a refusal carries the server's record (for the
/// corrective 402).
fn against_state<E>(
    payment: EscrowPayment<'_>,
    authentic: verify::Authentic,
    stored: &Option<ChannelState>,
) -> Result<Accepted, PayError<E>> {
    verify::against_state(payment.terms, payment.payload, authentic, stored.as_ref()).map_err(
        |error| PayError::Refused {
            error,
            state: stored.clone().map(Box::new),
        },
    )
}

/// The cooperative refund of `amount` from `state`'s channel, signed by `authorizer`: with
/// the claim of its unclaimed charges (by the refund's zero-charge voucher) when there are any.
fn cooperative<E>(
    payment: EscrowPayment<'_>,
    accepted: &Accepted,
    state: &ChannelState,
    amount: u128,
    authorizer: &dyn ReceiverAuthorizer,
) -> Result<CooperativeRefund, PayError<E>> {
    let chain_id = payment.terms.chain_id;
    let claim = if state.charged_cumulative > state.total_claimed {
        let claim = ChannelClaim {
            config: accepted.config.clone(),
            max_claimable: accepted.max_claimable,
            signature: accepted.signature.clone(),
            total_claimed: state.charged_cumulative,
        };
        let signature = authorizer
            .sign_digest(claim_digest(chain_id, std::slice::from_ref(&claim)))
            .map_err(PayError::Authorizer)?;
        Some((claim, signature))
    } else {
        None
    };
    let digest = refund_digest(chain_id, accepted.channel_id, state.refund_nonce, amount);
    Ok(CooperativeRefund {
        claim,
        amount,
        nonce: state.refund_nonce,
        signature: authorizer
            .sign_digest(digest)
            .map_err(PayError::Authorizer)?,
    })
}

/// An escrow error caused by a [`BatchError`] (refused before sending) is a refusal.
fn escrow_refusal<E>(e: EscrowError) -> PayError<E> {
    match e.0.downcast_ref::<BatchError>() {
        Some(error) => PayError::Refused {
            error: *error,
            state: None,
        },
        None => PayError::Escrow(e),
    }
}

/// The record of a channel the server meets for the first time (a deposit).
fn fresh(accepted: &Accepted, now: u64) -> ChannelState {
    ChannelState {
        config: accepted.config.clone(),
        charged_cumulative: 0,
        signed_max_claimable: 0,
        signature: Default::default(),
        balance: 0,
        total_claimed: 0,
        withdraw_requested_at: 0,
        refund_nonce: Default::default(),
        onchain_synced_at: 0,
        last_request_at: now,
    }
}
