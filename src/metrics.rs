//! Payment metrics through the [`metrics`](https://docs.rs/metrics) facade: counters and
//! latency histograms for any exporter (Prometheus, StatsD, OpenTelemetry, ...).
//!
//! [`PaymentMetrics`] is a [hook](crate::hooks): add it to the layer and install a recorder
//! (an exporter) once in `main`. Without a recorder the calls cost next to nothing.
//!
//! ```
//! use tower_x402::metrics::PaymentMetrics;
//! use tower_x402::primitives::address;
//! use tower_x402::{Network, PaymentLayer};
//!
//! let paywall = PaymentLayer::builder()
//!     .pay_to(address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"))
//!     .price("$0.001")
//!     .network(Network::BASE_SEPOLIA)
//!     .hook(PaymentMetrics::new().with_label("api", "weather"))
//!     .build()?;
//! # Ok::<_, tower_x402::error::ConfigError>(())
//! ```
//!
//! `examples/metrics.rs` serves a Prometheus `/metrics` endpoint next to a paid route.
//!
//! ## Metrics
//!
//! Every metric also carries the labels given with [`PaymentMetrics::with_label`].
//!
//! | name | type | labels | counts / measures |
//! |---|---|---|---|
//! | `x402_challenges_total` | counter | — | 402 challenges sent to requests without payment |
//! | `x402_payments_verified_total` | counter | `network`, `asset`, `version` | proofs that verified (a hook, a replay or the settler's check may still refuse them) |
//! | `x402_payments_rejected_total` | counter | `status`, `reason`, `stage` | answers the layer sent in place of the handler: every row of the [failure table](crate::rejection) but the plain challenge, hook refusals (`reason` `refused_by_hook`) and settlement failures included |
//! | `x402_payments_settled_total` | counter | `network`, `asset` | payments settled (with [`VerifyOnly`](crate::settle::VerifyOnly): accepted, no money moved) |
//! | `x402_settlement_failures_total` | counter | `reason` | settlements that failed after being attempted (stage `settle`); `reason` as sent: the settler's refusal reason, `rate_limited`, `service_unavailable` (nothing sent) or `settlement_outcome_unknown` |
//! | `x402_amount_received_total` | counter | `network`, `asset` | atomic token units settled (USDC: millionths of a dollar) |
//! | `x402_verify_duration_seconds` | histogram | `network` | verification time of proofs that verified |
//! | `x402_settle_duration_seconds` | histogram | `network` | settlement time of payments that settled |
//! | `x402_onchain_transactions_sent_total` | counter | — | with `onchain`, fed by [`PaymentMetrics::record_onchain`]: transactions the settler sent |
//! | `x402_onchain_gas_used_total` | counter | — | same: gas used by every mined settlement, reverted ones included |
//! | `x402_onchain_fees_wei_total` | counter | — | same: fees paid by the relayer, in wei |
//! | `x402_channel_rounds_total` | counter | — | with `onchain`: rounds of the payment-channel manager (`settle::onchain::ChannelManager`) |
//! | `x402_channels_claimed_total` | counter | — | same: channels claimed |
//! | `x402_channels_refunded_total` | counter | — | same: idle channels refunded |
//! | `x402_channel_amount_total` | counter | `op` | same: atomic units claimed, settled or refunded (`op` `claim`, `settle`, `refund`) |
//! | `x402_channel_transactions_total` | counter | `op` | same: transactions mined, by `op` |
//! | `x402_channel_failures_total` | counter | `op` | same: failed steps (`op` `round`), or rounds that could not list the channels (`list`); each raised an alert |
//! | `x402_channel_unknown_total` | counter | — | same: sends whose outcome was unknown, reconciled from the chain next round |
//! | `x402_channel_gas_used_total` | counter | — | same: gas used by claims and settles |
//!
//! Label values: `network` is CAIP-2 (`eip155:84532`), `asset` the checksummed token address,
//! `version` `1` or `2`, `status` the HTTP status code, `reason` the x402 reason code (`none`
//! when there is none), `stage` where the flow stopped ([`Stage`], snake case: `decode`,
//! `select`, `verify`, `hook`, `reserve`, `check`, `settle`, `overload`). All are bounded sets
//! chosen by the server, never by the client: no payer address, no path.
//!
//! ## Gaps
//!
//! * A [`Settlement`] does not carry gas, so gas is not a per-payment metric: with the
//!   `onchain` feature, call [`PaymentMetrics::record_onchain`] with
//!   [`OnchainSettler::stats`][crate::settle::onchain::OnchainSettler::stats] (for instance
//!   when `/metrics` is scraped). A facilitator pays its own gas.
//! * The hooks see the time of successful verifications and settlements only, so the
//!   histograms leave refused proofs out.
//! * Amounts are `u64` counters: a single payment above `u64::MAX` atomic units (1.8 × 10¹³
//!   USDC) is counted as `u64::MAX`. Prometheus stores counters as `f64`, exact up to 2⁵³
//!   atomic units in total (9 × 10⁹ USDC).
//!
//!
#![cfg_attr(
    not(feature = "onchain"),
    doc = "[crate::settle::onchain::OnchainSettler::stats]: https://docs.rs/tower-x402/latest/tower_x402/settle/onchain/struct.OnchainSettler.html#method.stats"
)]
#![cfg_attr(
    not(feature = "onchain"),
    doc = "[`PaymentMetrics::record_onchain`]: https://docs.rs/tower-x402/latest/tower_x402/metrics/struct.PaymentMetrics.html#method.record_onchain"
)]

use std::time::Duration;

use ::metrics::{Label, SharedString, counter, histogram};
use async_trait::async_trait;
use http::{Method, Uri};

use crate::hooks::{PaymentFailure, PaymentHooks, Stage};
use crate::proto::X402Version;
use crate::settle::Settlement;
use crate::verify::VerifiedPayment;

/// Metric names, for dashboards and tests. See the [module docs](self) for their labels.
pub mod name {
    /// Counter: 402 challenges sent to requests without payment.
    pub const CHALLENGES: &str = "x402_challenges_total";
    /// Counter: proofs that verified.
    pub const VERIFIED: &str = "x402_payments_verified_total";
    /// Counter: answers sent in place of the handler, by status, reason and stage.
    pub const REJECTED: &str = "x402_payments_rejected_total";
    /// Counter: payments settled.
    pub const SETTLED: &str = "x402_payments_settled_total";
    /// Counter: settlements that failed, by reason.
    pub const SETTLEMENT_FAILURES: &str = "x402_settlement_failures_total";
    /// Counter: atomic token units settled, by network and asset.
    pub const AMOUNT_RECEIVED: &str = "x402_amount_received_total";
    /// Histogram: seconds to verify a proof.
    pub const VERIFY_DURATION: &str = "x402_verify_duration_seconds";
    /// Histogram: seconds to settle a payment.
    pub const SETTLE_DURATION: &str = "x402_settle_duration_seconds";
    /// Counter (absolute): transactions an on-chain settler sent.
    pub const ONCHAIN_SENT: &str = "x402_onchain_transactions_sent_total";
    /// Counter (absolute): gas used by an on-chain settler's mined transactions.
    pub const ONCHAIN_GAS_USED: &str = "x402_onchain_gas_used_total";
    /// Counter (absolute): fees an on-chain settler's relayer paid, in wei.
    pub const ONCHAIN_FEES_WEI: &str = "x402_onchain_fees_wei_total";
    /// Counter: channel manager rounds run.
    pub const CHANNEL_ROUNDS: &str = "x402_channel_rounds_total";
    /// Counter: channels claimed by the channel manager.
    pub const CHANNELS_CLAIMED: &str = "x402_channels_claimed_total";
    /// Counter: idle channels the channel manager refunded.
    pub const CHANNELS_REFUNDED: &str = "x402_channels_refunded_total";
    /// Counter: atomic units the channel manager claimed, settled or refunded, by `op`.
    pub const CHANNEL_AMOUNT: &str = "x402_channel_amount_total";
    /// Counter: channel manager transactions mined, by `op` (`claim`, `settle`, `refund`).
    pub const CHANNEL_TRANSACTIONS: &str = "x402_channel_transactions_total";
    /// Counter: failed channel manager steps, by `op` (`round`, `list`).
    pub const CHANNEL_FAILURES: &str = "x402_channel_failures_total";
    /// Counter: channel manager sends whose outcome was unknown (reconciled next round).
    pub const CHANNEL_UNKNOWN: &str = "x402_channel_unknown_total";
    /// Counter: gas used by the channel manager's claims and settles.
    pub const CHANNEL_GAS_USED: &str = "x402_channel_gas_used_total";
}

/// A [hook](crate::hooks) that records every payment in the `metrics` facade. See the
/// [module docs](self) for the metrics.
#[derive(Clone, Debug, Default)]
pub struct PaymentMetrics {
    labels: Vec<Label>,
}

impl PaymentMetrics {
    /// Metrics with no extra label.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a constant label to every metric (to tell apart several paywalls in one process,
    /// e.g. `("api", "weather")`). Keep the value set small: each value is a time series.
    pub fn with_label(
        mut self,
        key: impl Into<SharedString>,
        value: impl Into<SharedString>,
    ) -> Self {
        self.labels.push(Label::new(key, value));
        self
    }

    /// Publishes an on-chain settler's counters (sent transactions, gas, fees), which a
    /// [`Settlement`] does not carry. The counters are set to the snapshot's absolute values,
    /// so call it as often as convenient, e.g. on each scrape; fees above `u64::MAX` wei are
    /// published as `u64::MAX`.
    #[cfg(feature = "onchain")]
    #[cfg_attr(docsrs, doc(cfg(feature = "onchain")))]
    pub fn record_onchain(&self, stats: &crate::settle::onchain::OnchainStats) {
        counter!(name::ONCHAIN_SENT, self.labels(&[])).absolute(stats.sent);
        counter!(name::ONCHAIN_GAS_USED, self.labels(&[])).absolute(stats.gas_used);
        let fees = u64::try_from(stats.fees_wei).unwrap_or(u64::MAX);
        counter!(name::ONCHAIN_FEES_WEI, self.labels(&[])).absolute(fees);
    }

    /// The constant labels followed by `extra`.
    fn labels(&self, extra: &[(&'static str, SharedString)]) -> Vec<Label> {
        let mut labels = Vec::with_capacity(self.labels.len() + extra.len());
        labels.extend(self.labels.iter().cloned());
        labels.extend(extra.iter().map(|(k, v)| Label::new(*k, v.clone())));
        labels
    }

    fn paid_labels(
        &self,
        payment: &VerifiedPayment,
        extra: &[(&'static str, SharedString)],
    ) -> Vec<Label> {
        let mut all = vec![
            ("network", SharedString::from(payment.network.to_string())),
            ("asset", SharedString::from(payment.asset.to_checksum(None))),
        ];
        all.extend(extra.iter().cloned());
        self.labels(&all)
    }
}

/// The `stage` label.
fn stage_label(stage: Stage) -> &'static str {
    match stage {
        Stage::Decode => "decode",
        Stage::Select => "select",
        Stage::Verify => "verify",
        Stage::Hook => "hook",
        Stage::Reserve => "reserve",
        Stage::Check => "check",
        Stage::Settle => "settle",
        Stage::Overload => "overload",
    }
}

#[async_trait]
impl PaymentHooks for PaymentMetrics {
    async fn on_challenge(&self, _method: &Method, _uri: &Uri) {
        counter!(name::CHALLENGES, self.labels(&[])).increment(1);
    }

    async fn after_verify(
        &self,
        payment: &VerifiedPayment,
        elapsed: Duration,
    ) -> Result<(), http::Response<bytes::Bytes>> {
        let version = SharedString::const_str(match payment.version {
            X402Version::V1 => "1",
            X402Version::V2 => "2",
        });
        counter!(
            name::VERIFIED,
            self.paid_labels(payment, &[("version", version)])
        )
        .increment(1);
        let network = SharedString::from(payment.network.to_string());
        histogram!(name::VERIFY_DURATION, self.labels(&[("network", network)]))
            .record(elapsed.as_secs_f64());
        Ok(())
    }

    async fn after_settle(
        &self,
        payment: &VerifiedPayment,
        settlement: &Settlement,
        elapsed: Duration,
    ) {
        let labels = self.paid_labels(payment, &[]);
        counter!(name::SETTLED, labels.clone()).increment(1);
        let amount = settlement.amount.unwrap_or(payment.amount);
        counter!(name::AMOUNT_RECEIVED, labels).increment(amount.saturating_to::<u64>());
        let network = SharedString::from(payment.network.to_string());
        histogram!(name::SETTLE_DURATION, self.labels(&[("network", network)]))
            .record(elapsed.as_secs_f64());
    }

    async fn on_failure(&self, failure: &PaymentFailure<'_>) {
        let rejection = failure.rejection;
        let reason = match &rejection.reason {
            None => SharedString::const_str("none"),
            Some(r) => r.as_static().map_or_else(
                || SharedString::from(r.as_str().to_owned()),
                SharedString::const_str,
            ),
        };
        counter!(
            name::REJECTED,
            self.labels(&[
                (
                    "status",
                    SharedString::from(rejection.status.as_str().to_owned())
                ),
                ("reason", reason.clone()),
                ("stage", SharedString::const_str(stage_label(failure.stage))),
            ])
        )
        .increment(1);
        if failure.stage == Stage::Settle {
            counter!(
                name::SETTLEMENT_FAILURES,
                self.labels(&[("reason", reason)])
            )
            .increment(1);
        }
    }
}
