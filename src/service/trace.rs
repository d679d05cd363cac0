//! Spans and events with the `tracing` feature; nothing without it.

#[cfg(feature = "tracing")]
mod imp {
    use std::error::Error as StdError;
    use std::future::Future;
    use std::time::Duration;

    use http::Response;
    use tracing::field::Empty;
    use tracing::{Instrument, Span};

    use crate::hooks::Stage;
    use crate::rejection::PaymentRejection;
    use crate::settle::Settlement;
    use crate::verify::VerifiedPayment;

    /// Runs the paid flow in an `x402.payment` span that ends with its outcome.
    pub(in crate::service) fn instrument<B, E>(
        flow: impl Future<Output = Result<Response<B>, E>> + Send,
    ) -> impl Future<Output = Result<Response<B>, E>> + Send {
        let span = tracing::info_span!(
            "x402.payment",
            payer = Empty,
            amount = Empty,
            network = Empty,
            verify_us = Empty,
            settle_us = Empty,
            transaction = Empty,
            status = Empty,
            outcome = Empty,
        );
        async move {
            let out = flow.await;
            let span = Span::current();
            match &out {
                Ok(res) => {
                    span.record("status", res.status().as_u16());
                    let outcome =
                        res.extensions()
                            .get::<PaymentRejection>()
                            .map_or("paid".to_owned(), |r| {
                                r.reason
                                    .as_ref()
                                    .map_or("challenge", |r| r.as_str())
                                    .to_owned()
                            });
                    span.record("outcome", outcome);
                }
                Err(_) => {
                    span.record("outcome", "handler_error");
                }
            }
            out
        }
        .instrument(span)
    }

    pub(in crate::service) fn verified(payment: &VerifiedPayment, elapsed: Duration) {
        let span = Span::current();
        span.record("payer", tracing::field::display(payment.payer));
        span.record("amount", tracing::field::display(payment.amount));
        span.record("network", tracing::field::display(payment.network));
        span.record("verify_us", elapsed.as_micros() as u64);
    }

    pub(in crate::service) fn settled(settlement: &Settlement, elapsed: Duration) {
        let span = Span::current();
        span.record("settle_us", elapsed.as_micros() as u64);
        if let Some(tx) = settlement.transaction {
            span.record("transaction", tracing::field::display(tx));
        }
    }

    pub(in crate::service) fn failed(
        stage: Stage,
        info: &PaymentRejection,
        error: Option<&(dyn StdError + Send + Sync)>,
    ) {
        let reason = info.reason.as_ref().map_or("challenge", |r| r.as_str());
        match error {
            Some(e) if info.status.is_server_error() => {
                tracing::warn!(?stage, reason, status = info.status.as_u16(), error = %e, "x402 payment not served")
            }
            _ => tracing::debug!(
                ?stage,
                reason,
                status = info.status.as_u16(),
                "x402 payment refused"
            ),
        }
    }
}

#[cfg(not(feature = "tracing"))]
mod imp {
    use std::error::Error as StdError;
    use std::time::Duration;

    use crate::hooks::Stage;
    use crate::rejection::PaymentRejection;
    use crate::settle::Settlement;
    use crate::verify::VerifiedPayment;

    pub(in crate::service) fn instrument<F>(flow: F) -> F {
        flow
    }
    pub(in crate::service) fn verified(_: &VerifiedPayment, _: Duration) {}
    pub(in crate::service) fn settled(_: &Settlement, _: Duration) {}
    pub(in crate::service) fn failed(
        _: Stage,
        _: &PaymentRejection,
        _: Option<&(dyn StdError + Send + Sync)>,
    ) {
    }
}

pub(super) use imp::*;
