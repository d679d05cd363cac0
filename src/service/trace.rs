//! Spans and events with the `tracing` feature. Without it, refusals and failures still go to
//! the `log` facade (target `tower_x402::payment`: `debug` for a refusal, `warn` for a 5xx
//! with a cause), so a server says why it refused with any logger, e.g.
//! `RUST_LOG=tower_x402::payment=debug` under `env_logger`.

#[cfg(feature = "tracing")]
mod imp {
    use std::error::Error as StdError;
    use std::future::Future;
    use std::time::Duration;

    use http::Response;
    use tracing::field::Empty;
    use tracing::{Instrument, Span};

    use crate::hooks::Stage;
    use crate::rejection::{PaymentRejection, Reason};
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
                    // Borrowed, not copied: recorded at once.
                    let outcome = res
                        .extensions()
                        .get::<PaymentRejection>()
                        .map_or("paid", |r| {
                            r.reason.as_ref().map_or("challenge", Reason::as_str)
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

    /// [`instrument`] for a flow already boxed (the paid flow is, being large).
    pub(in crate::service) fn boxed<B: 'static, E: 'static>(
        flow: super::Boxed<B, E>,
    ) -> super::Boxed<B, E> {
        Box::pin(instrument(flow))
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
    /// Without spans a boxed flow is sent as it is: no second box.
    pub(in crate::service) fn boxed<B, E>(flow: super::Boxed<B, E>) -> super::Boxed<B, E> {
        flow
    }
    pub(in crate::service) fn verified(_: &VerifiedPayment, _: Duration) {}
    pub(in crate::service) fn settled(_: &Settlement, _: Duration) {}
    pub(in crate::service) fn failed(
        stage: Stage,
        info: &PaymentRejection,
        error: Option<&(dyn StdError + Send + Sync)>,
    ) {
        let reason = info.reason.as_ref().map_or("challenge", |r| r.as_str());
        let status = info.status.as_u16();
        match error {
            Some(e) if info.status.is_server_error() => log::warn!(
                target: "tower_x402::payment",
                "x402 payment not served: stage={stage:?} reason={reason} status={status} error={e}"
            ),
            _ => log::debug!(
                target: "tower_x402::payment",
                "x402 payment refused: stage={stage:?} reason={reason} status={status}"
            ),
        }
    }
}

pub(super) use imp::*;

/// A boxed flow's type.
pub(super) type Boxed<B, E> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<http::Response<B>, E>> + Send>>;

#[cfg(all(test, not(feature = "tracing")))]
mod tests {
    use std::sync::Mutex;

    use http::StatusCode;

    use crate::hooks::Stage;
    use crate::reason::Reason;
    use crate::rejection::PaymentRejection;

    /// Keeps the records of the `tower_x402::payment` target.
    struct Capture(Mutex<Vec<(log::Level, String)>>);

    impl log::Log for Capture {
        fn enabled(&self, m: &log::Metadata<'_>) -> bool {
            m.target() == "tower_x402::payment"
        }
        fn log(&self, r: &log::Record<'_>) {
            if self.enabled(r.metadata()) {
                let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
                seen.push((r.level(), r.args().to_string()));
            }
        }
        fn flush(&self) {}
    }

    static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

    #[test]
    fn without_tracing_refusals_go_to_the_log_facade() {
        log::set_logger(&CAPTURE).expect("the only logger of this test binary");
        log::set_max_level(log::LevelFilter::Debug);
        let refusal = PaymentRejection {
            status: StatusCode::PAYMENT_REQUIRED,
            reason: Some(Reason::custom("test_only_refusal")),
            retry_after: None,
        };
        super::failed(Stage::Verify, &refusal, None);
        let outage = PaymentRejection {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: Some(Reason::custom("test_only_outage")),
            retry_after: None,
        };
        let cause = std::io::Error::other("store down");
        super::failed(Stage::Reserve, &outage, Some(&cause));

        let seen = CAPTURE.0.lock().unwrap().clone();
        let find = |reason: &str| {
            seen.iter()
                .find(|(_, m)| m.contains(reason))
                .cloned()
                .unwrap_or_else(|| panic!("no record for {reason}: {seen:?}"))
        };
        let (level, msg) = find("reason=test_only_refusal");
        assert_eq!(level, log::Level::Debug);
        assert!(
            msg.contains("stage=Verify") && msg.contains("status=402"),
            "{msg}"
        );
        let (level, msg) = find("reason=test_only_outage");
        assert_eq!(level, log::Level::Warn);
        assert!(
            msg.contains("status=503") && msg.contains("store down"),
            "{msg}"
        );
    }
}
