//! A proof's claim in the nonce store, and the one rule that decides its fate.
//!
//! Every paid request that gets past verification holds a [`Claim`]: the proof's key,
//! reserved once across every instance sharing the store. The claim ends in exactly one of
//! three ways, chosen by [`fate`] from how the request ended, and nowhere else:
//!
//! | how the request ended ([`End`]) | fate | why |
//! |---|---|---|
//! | refused before the handler, nothing sent (pre-check) | release | nothing moved, nothing served: the client may retry the proof |
//! | handler error or status >= 400 | release | nothing settled: the client keeps its money |
//! | handler ran, nothing to settle (metered zero) or must not be (metered overrun) | consume | the same proof would buy the same run again |
//! | settled | consume | the money moved |
//! | settlement refused after the handler ran | consume | the same proof would buy the handler again |
//! | settlement refused before the handler (settle-first) | release | nothing moved, nothing served |
//! | settler unavailable or rate-limited, nothing sent | release | the client retries the same proof |
//! | settlement outcome unknown | keep | the money may have moved: blocked until it expires, never settled twice |

use crate::alert::{Alert, alert};
use crate::nonce::{ClaimToken, NonceKey, NonceStore};
use crate::settle::SettleError;

/// What becomes of a claimed proof.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Spent: it stays used until it expires.
    Consume,
    /// Given back: the client may use the same proof again.
    Release,
    /// Left reserved until it expires: its outcome is unknown.
    Keep,
}

impl Fate {
    /// True when the proof can never buy anything again (a retry must see this answer).
    pub(crate) fn spent(self) -> bool {
        !matches!(self, Self::Release)
    }
}

/// How a request holding a claim ended, as far as the proof's fate goes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum End<'a> {
    /// Refused before the handler ran; nothing was sent (the settler's pre-check).
    Refused,
    /// The handler failed (an error, or a status >= 400): nothing is settled.
    HandlerFailed,
    /// The handler ran and nothing is settled: metered usage of zero, or past the maximum.
    ServedUnsettled,
    /// A settlement was attempted, before the handler (`handler_ran: false`) or after it.
    Settled {
        /// Whether the handler had run.
        handler_ran: bool,
        /// The settlement's result.
        result: Result<(), &'a SettleError>,
    },
}

/// The one place that decides a proof's fate (see the module table).
pub(crate) fn fate(end: End<'_>) -> Fate {
    match end {
        End::Refused | End::HandlerFailed => Fate::Release,
        End::ServedUnsettled | End::Settled { result: Ok(()), .. } => Fate::Consume,
        End::Settled { result: Err(e), .. } if e.is_unknown() => Fate::Keep,
        End::Settled {
            handler_ran: true,
            result: Err(SettleError::Refused { .. }),
        } => Fate::Consume,
        End::Settled { .. } => Fate::Release,
    }
}

/// A reservation this request holds. It must end in [`consume`](Self::consume),
/// [`release`](Self::release) or [`keep`](Self::keep), each taking the claim by value; a
/// claim dropped unended (the request's future was cancelled mid-flight) is kept, which is
/// safe: the proof stays blocked until it expires.
#[must_use = "a claim must end in consume, release or keep"]
pub(crate) struct Claim<'s> {
    store: &'s dyn NonceStore,
    key: NonceKey,
    token: ClaimToken,
}

impl<'s> Claim<'s> {
    pub(crate) fn new(store: &'s dyn NonceStore, key: NonceKey, token: ClaimToken) -> Self {
        Self { store, key, token }
    }

    /// Ends the claim as `fate` says.
    pub(crate) async fn end(self, fate: Fate) {
        match fate {
            Fate::Consume => self.consume().await,
            Fate::Release => self.release().await,
            Fate::Keep => self.keep(),
        }
    }

    /// Marks the proof used. A failure leaves it reserved until it expires: still never
    /// accepted twice, so it is raised, not returned.
    pub(crate) async fn consume(self) {
        let done = now_or!(
            self.store.consume_now(&self.key, self.token),
            self.store.consume(&self.key, self.token)
        );
        if let Err(e) = done {
            alert!(
                Alert::NonceConsume,
                cause = &e,
                "nonce store could not mark a spent proof used (it stays reserved until it expires)"
            );
        }
    }

    /// Gives the proof back. A failure leaves it blocked until it expires (the client signs a
    /// new one; never charged twice), so it is raised, not returned.
    pub(crate) async fn release(self) {
        let done = now_or!(
            self.store.release_now(&self.key, self.token),
            self.store.release(&self.key, self.token)
        );
        if let Err(e) = done {
            alert!(
                Alert::NonceRelease,
                cause = &e,
                "nonce store could not give a proof back (blocked until it expires)"
            );
        }
    }

    /// Leaves the proof reserved until it expires.
    pub(crate) fn keep(self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn refused() -> SettleError {
        SettleError::Refused {
            reason: crate::reason::Reason::InsufficientFunds,
            transaction: None,
        }
    }
    fn unavailable() -> SettleError {
        SettleError::Unavailable {
            retry_after: None,
            source: "down".into(),
        }
    }
    fn rate_limited() -> SettleError {
        SettleError::RateLimited {
            retry_after: Some(Duration::from_secs(2)),
        }
    }
    fn unknown() -> SettleError {
        SettleError::Unknown {
            transaction: None,
            retry_after: None,
            source: "no receipt".into(),
        }
    }

    /// Every way a claimed request can end, with the fate the module table promises.
    #[test]
    fn fate_table() {
        let (r, u, l, k) = (refused(), unavailable(), rate_limited(), unknown());
        let settled = |handler_ran, result| End::Settled {
            handler_ran,
            result,
        };
        let rows: [(&str, End<'_>, Fate); 12] = [
            ("pre-check refused", End::Refused, Fate::Release),
            ("handler failed", End::HandlerFailed, Fate::Release),
            (
                "metered zero / overrun",
                End::ServedUnsettled,
                Fate::Consume,
            ),
            ("settled first", settled(false, Ok(())), Fate::Consume),
            ("settled after", settled(true, Ok(())), Fate::Consume),
            ("refused first", settled(false, Err(&r)), Fate::Release),
            ("refused after", settled(true, Err(&r)), Fate::Consume),
            ("unavailable first", settled(false, Err(&u)), Fate::Release),
            ("unavailable after", settled(true, Err(&u)), Fate::Release),
            ("rate-limited after", settled(true, Err(&l)), Fate::Release),
            ("unknown first", settled(false, Err(&k)), Fate::Keep),
            ("unknown after", settled(true, Err(&k)), Fate::Keep),
        ];
        for (name, end, want) in rows {
            assert_eq!(fate(end), want, "{name}");
            assert_eq!(fate(end).spent(), want != Fate::Release, "{name}");
        }
    }
}
