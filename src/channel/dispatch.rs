//! [`Channels`] behind one object-safe trait, so a `PaymentLayer` holds any store and escrow
//! (`PaymentLayerBuilder::channels`). The layer's request path (`service::channel`) calls it
//! in place of verify → claim → settle: for a channel, the proof's fate is the channel's
//! lease and its compare-and-set commit, not a nonce claim.

use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;

use super::serve::{Channels, Escrow, Paid, PayError, Refunded};
use super::store::ChannelStore;
use super::verify::ChannelTerms;
use crate::proto::batch::BatchEvmPayload;

/// The handler as the engine sees it: the most it may charge in, what it charged out (`Err`:
/// it failed, nothing is charged). The response itself stays with the caller.
pub(crate) type Handler<'a> = Box<
    dyn FnOnce(u128) -> Pin<Box<dyn Future<Output = Result<((), u128), ()>> + Send + 'a>>
        + Send
        + 'a,
>;

/// The layer's view of [`Channels`].
#[async_trait]
pub(crate) trait Serve: Send + Sync + 'static {
    async fn pay<'a>(
        &'a self,
        terms: &'a ChannelTerms,
        payload: &'a BatchEvmPayload,
        now: u64,
        handler: Handler<'a>,
    ) -> Result<Paid<()>, PayError<()>>;

    async fn refund(
        &self,
        terms: &ChannelTerms,
        payload: &BatchEvmPayload,
        now: u64,
    ) -> Result<Refunded, PayError<std::convert::Infallible>>;
}

#[async_trait]
impl<S: ChannelStore, X: Escrow> Serve for Channels<S, X> {
    async fn pay<'a>(
        &'a self,
        terms: &'a ChannelTerms,
        payload: &'a BatchEvmPayload,
        now: u64,
        handler: Handler<'a>,
    ) -> Result<Paid<()>, PayError<()>> {
        Channels::pay(self, terms, payload, now, handler).await
    }

    async fn refund(
        &self,
        terms: &ChannelTerms,
        payload: &BatchEvmPayload,
        now: u64,
    ) -> Result<Refunded, PayError<std::convert::Infallible>> {
        Channels::refund(self, terms, payload, now).await
    }
}
