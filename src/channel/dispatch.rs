//! [`Channels`] behind one object-safe trait, so a `PaymentLayer` holds any store and escrow
//! (`PaymentLayerBuilder::channels`). The layer's request path (`service::channel`) calls it
//! in place of verify → claim → settle: for a channel, the proof's fate is the channel's
//! lease and its compare-and-set commit, not a nonce claim.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;

use super::serve::{Channels, Escrow, EscrowPayment, Paid, PayError, Refunded};
use super::store::ChannelStore;

/// The handler as the engine sees it: the most it may charge in, what it charged out (`Err`:
/// it failed, nothing is charged). The response itself stays with the caller.
pub(crate) type Handler<'a> = Box<
    dyn FnOnce(u128) -> Pin<Box<dyn Future<Output = Result<((), u128), ()>> + Send + 'a>>
        + Send
        + 'a,
>;

/// The layer's view of [`Channels`], at the time of the engine's clock
/// ([`Channels::with_clock`]).
#[async_trait]
pub(crate) trait Serve: Send + Sync + 'static {
    async fn pay<'a>(
        &'a self,
        payment: EscrowPayment<'a>,
        handler: Handler<'a>,
    ) -> Result<Paid<()>, PayError<()>>;

    async fn refund(&self, payment: EscrowPayment<'_>) -> Result<Refunded, PayError<Infallible>>;
}

#[async_trait]
impl<S: ChannelStore, X: Escrow> Serve for Channels<S, X> {
    async fn pay<'a>(
        &'a self,
        p: EscrowPayment<'a>,
        handler: Handler<'a>,
    ) -> Result<Paid<()>, PayError<()>> {
        Channels::pay(self, p.terms, p.payload, self.now(), handler).await
    }

    async fn refund(&self, p: EscrowPayment<'_>) -> Result<Refunded, PayError<Infallible>> {
        Channels::refund(self, p.terms, p.payload, self.now()).await
    }
}
