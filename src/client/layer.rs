//! [`PayingLayer`] and the [`Paying`] service it builds.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use alloy_signer::Signer;
use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use super::balance::BalanceSource;
use super::error::Error;
use super::flow;
use super::policy::{Budget, Policy};
use super::retry::RetryPolicy;
use crate::body::ResponseBody;
use crate::clock::{Clock, SystemClock};
use crate::proto::X402Version;
use crate::verify::BoxError;

/// A tower layer for outgoing HTTP requests that pays x402 challenges. See the
/// [module docs](super).
pub struct PayingLayer<Sg> {
    shared: Shared<Sg>,
}

impl<Sg> Clone for PayingLayer<Sg> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<Sg> fmt::Debug for PayingLayer<Sg> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.shared;
        f.debug_struct("PayingLayer")
            .field("policy", &s.policy)
            .field("retry", &s.retry)
            .field("balance_check", &s.balance.is_some())
            .finish_non_exhaustive()
    }
}

impl<Sg: Signer + Send + Sync + 'static> PayingLayer<Sg> {
    /// Pays with `signer` (any alloy [`Signer`]: a local key, a Ledger, AWS KMS, ...) within
    /// `policy`, with the default [`RetryPolicy`], the system clock and no balance check.
    pub fn new(signer: Sg, policy: Policy) -> Self {
        Self {
            shared: Shared {
                signer: Arc::new(signer),
                policy,
                retry: RetryPolicy::default(),
                clock: Arc::new(SystemClock),
                balance: None,
                only_version: None,
                #[cfg(feature = "svm-client")]
                svm: None,
                channels: None,
            },
        }
    }

    /// Also pays `batch-settlement` offers (x402 payment channels, EVM, v2) within the same
    /// [`Policy`] and [`Budget`]: a deposit into the escrow on the first call (at most the
    /// policy's cap), then one cumulative voucher per call. See [`ChannelPolicy`] and the
    /// module `channel` notes in the [client docs](super). Default: such offers are refused
    /// ([`Refusal::Scheme`](super::Refusal)).
    ///
    /// [`ChannelPolicy`]: super::ChannelPolicy
    #[must_use]
    pub fn channels(mut self, policy: super::ChannelPolicy) -> Self {
        self.shared.policy.channels = true;
        self.shared.channels = Some(Arc::new(super::channel::Channels::new(policy)));
        self
    }

    setters! {
        /// Also pays Solana `exact` offers, with `payer` (an ed25519 key and the RPC the
        /// transaction is built against), within the same [`Policy`] and [`Budget`] as EVM
        /// offers. Default: Solana offers are refused ([`Refusal::Network`](super::Refusal)).
        ///
        /// The transaction is the official client's: compute-unit limit and price, one
        /// `TransferChecked` to `payTo`'s associated token account, a memo; its fee payer is the
        /// server's `extra.feePayer` (an offer naming the payer's own key is refused), signed by
        /// the payer as the transfer authority only. The [`BalanceSource`] is not consulted for
        /// Solana offers.
        #[cfg(feature = "svm-client")]
        #[cfg_attr(docsrs, doc(cfg(feature = "svm-client")))]
        #[must_use]
        pub fn svm(payer: super::SvmPayer) => shared.svm = Some(Arc::new(payer));

        /// Replaces the retry rules. Default: [`RetryPolicy::default`].
        #[must_use]
        pub fn retry(retry: RetryPolicy) => shared.retry = retry;

        /// The clock the validity window is computed from. Default: the system clock.
        #[must_use]
        pub fn clock(clock: impl Clock) => shared.clock = Arc::new(clock);

        /// Checks the payer's balance before signing. Default: no check.
        #[must_use]
        pub fn balance_source(source: impl BalanceSource)
            => shared.balance = Some(Arc::new(source));

        /// Speaks only `version`: reads only its form of the challenge (v2 `PAYMENT-REQUIRED`
        /// header, v1 JSON body) and pays in it. Default: both, preferring v2 when a server offers
        /// both forms. Useful for a server that advertises both forms but accepts only v1.
        #[must_use]
        pub fn only_version(version: X402Version) => shared.only_version = Some(version);
    }

    /// The shared budget, to read what was spent.
    pub fn budget(&self) -> Option<&Budget> {
        self.shared.policy.shared_budget()
    }
}

impl<Sg> PayingLayer<Sg> {
    /// The configuration every call of a built client shares.
    pub(crate) fn shared(&self) -> Shared<Sg> {
        self.shared.clone()
    }
}

impl<S, Sg> Layer<S> for PayingLayer<Sg> {
    type Service = Paying<S, Sg>;

    fn layer(&self, inner: S) -> Self::Service {
        Paying {
            inner,
            shared: Arc::new(self.shared()),
        }
    }
}

/// Per-service configuration, one refcount bump per call.
pub(crate) struct Shared<Sg> {
    pub(crate) signer: Arc<Sg>,
    pub(crate) policy: Policy,
    pub(crate) retry: RetryPolicy,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) balance: Option<Arc<dyn BalanceSource>>,
    pub(crate) only_version: Option<X402Version>,
    #[cfg(feature = "svm-client")]
    pub(crate) svm: Option<Arc<super::SvmPayer>>,
    pub(crate) channels: Option<Arc<super::channel::Channels>>,
}

// By hand: the signer is shared behind its `Arc`, it need not be `Clone` itself.
impl<Sg> Clone for Shared<Sg> {
    fn clone(&self) -> Self {
        Self {
            signer: self.signer.clone(),
            policy: self.policy.clone(),
            retry: self.retry.clone(),
            clock: self.clock.clone(),
            balance: self.balance.clone(),
            only_version: self.only_version,
            #[cfg(feature = "svm-client")]
            svm: self.svm.clone(),
            channels: self.channels.clone(),
        }
    }
}

impl<Sg> Shared<Sg> {
    /// The Solana payer's key, if the layer pays Solana offers.
    pub(crate) fn svm_key(&self) -> Option<crate::proto::svm::Pubkey> {
        #[cfg(feature = "svm-client")]
        return self.svm.as_ref().map(|p| p.pubkey());
        #[cfg(not(feature = "svm-client"))]
        None
    }
}

/// The service built by [`PayingLayer`]. See the [module docs](super).
pub struct Paying<S, Sg> {
    inner: S,
    shared: Arc<Shared<Sg>>,
}

impl<S: Clone, Sg> Clone for Paying<S, Sg> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, Sg> fmt::Debug for Paying<S, Sg> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Paying")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, Sg, B, ResBody> Service<Request<B>> for Paying<S, Sg>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Clone + Send + 'static,
    ResBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static,
    Sg: Signer + Send + Sync + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = Error;
    type Future = ResponseFuture<ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| Error::Transport(e.into()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The readied instance goes into the future; the clone waits for the next poll_ready.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            inner: Box::pin(flow::run(self.shared.clone(), inner, req)),
        }
    }
}

impl<S, Sg> Paying<S, Sg> {
    /// Asks the server at `req`'s URL for a cooperative refund of the unspent deposit of this
    /// client's channel with it (all of it, or `amount`): sends `req` unpaid, reads the
    /// `batch-settlement` offer of its 402, and resends it with a `refund` payload (a
    /// zero-charge voucher at the charged amount). The server runs no handler. A corrective
    /// 402 (the record is behind, e.g. a receipt was lost) is adopted once when an earlier
    /// voucher of this client covers the server's charged amount, and the refund asked again.
    /// The channel's record is updated from the receipt (deleted after a full refund).
    ///
    /// # Errors
    /// [`Error::Channel`]: no channel, nothing refundable, or the server refused
    /// ([`ChannelError::RefundRefused`](super::ChannelError)); transport and challenge errors
    /// as for a call.
    pub async fn refund_channel<B, ResBody>(
        &mut self,
        req: Request<B>,
        amount: Option<alloy_primitives::U256>,
    ) -> Result<super::ChannelRefund, Error>
    where
        S: Service<Request<B>, Response = Response<ResBody>, Error: Into<BoxError>>,
        B: Clone,
        ResBody: Body<Data = Bytes, Error: Into<BoxError>>,
        Sg: Signer + Send + Sync,
    {
        flow::refund(&self.shared, &mut self.inner, req, amount).await
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The future of [`Paying`]: the whole call, retries included.
// Boxed: the call awaits the network, a signer and timers, so one allocation is noise, and a
// hand-written state machine over a generic async `Signer` would be large.
pub struct ResponseFuture<ResBody> {
    inner: BoxFuture<Result<Response<ResponseBody<ResBody>>, Error>>,
}

impl<ResBody> fmt::Debug for ResponseFuture<ResBody> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<ResBody> Future for ResponseFuture<ResBody> {
    type Output = Result<Response<ResponseBody<ResBody>>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
