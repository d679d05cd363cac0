//! Fault injection for tests: wrappers that fail on command around any [`NonceStore`],
//! [`IdempotencyStore`] and [`CreditLedger`], and a response body that errors mid-stream.
//!
//! Each wrapper holds a [`Faults`] switchboard (cheap to clone, shared with the test): arm a
//! failure with [`Faults::fail_next`] or [`Faults::fail_always`], clear every one with
//! [`Faults::heal`], and read how often each [`Op`] was called and failed. An injected
//! failure happens *before* the inner call, so the inner store is left as it was (a store
//! that is down), and is a [`StoreError::Unavailable`] with `Retry-After`
//! [`INJECTED_RETRY_AFTER`]. [`Faults::yield_each_call`] makes every call yield to the
//! scheduler before and after the inner call, so concurrent requests interleave there.
//!
//! ```
//! use tower_x402::MemoryNonceStore;
//! use tower_x402::test_util::faults::{FaultyNonceStore, Op};
//!
//! let store = FaultyNonceStore::new(MemoryNonceStore::new());
//! let faults = store.faults().clone();
//! faults.fail_next(Op::Consume); // the next consume fails, later ones pass
//! faults.fail_always(Op::Release);
//! faults.heal(); // everything passes again
//! assert_eq!(faults.calls(Op::Reserve), 0);
//! // PaymentLayer::builder()...nonce_store(store)
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use alloy_primitives::Address;
use async_trait::async_trait;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::idempotency::{Begin, Fingerprint, IdempotencyKey, IdempotencyStore, StoredResponse};
use crate::nonce::{ClaimToken, NonceKey, NonceStore, Reservation, StoreError};
use crate::prepaid::{CreditLedger, Debit, Grant};

/// `Retry-After` of every injected [`StoreError::Unavailable`]: distinct from the layer's
/// default (5 s), so a test can tell whose wait reached the client.
pub const INJECTED_RETRY_AFTER: Duration = Duration::from_secs(3);

/// An operation that can be made to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// [`NonceStore::reserve`].
    Reserve,
    /// [`NonceStore::consume`].
    Consume,
    /// [`NonceStore::release`].
    Release,
    /// [`IdempotencyStore::begin`].
    Begin,
    /// [`IdempotencyStore::complete`].
    Complete,
    /// [`IdempotencyStore::abort`].
    Abort,
    /// [`CreditLedger::grant`].
    Grant,
    /// [`CreditLedger::debit`].
    Debit,
    /// [`CreditLedger::refund`].
    Refund,
}

const OPS: usize = 9;

impl Op {
    const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The switchboard of injected failures, shared by the wrappers and the test.
#[derive(Clone, Default)]
pub struct Faults(Arc<Switches>);

struct Switches {
    next: [AtomicU64; OPS],
    always: [AtomicBool; OPS],
    calls: [AtomicU64; OPS],
    failures: [AtomicU64; OPS],
    yielding: AtomicBool,
}

impl Default for Switches {
    fn default() -> Self {
        Self {
            next: [const { AtomicU64::new(0) }; OPS],
            always: [const { AtomicBool::new(false) }; OPS],
            calls: [const { AtomicU64::new(0) }; OPS],
            failures: [const { AtomicU64::new(0) }; OPS],
            yielding: AtomicBool::new(false),
        }
    }
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faults").finish_non_exhaustive()
    }
}

impl Faults {
    /// No failure armed.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next call of `op` fails (each call adds one more failure to the queue).
    pub fn fail_next(&self, op: Op) {
        self.fail_next_n(op, 1);
    }

    /// The next `n` calls of `op` fail.
    pub fn fail_next_n(&self, op: Op, n: u64) {
        self.0.next[op.index()].fetch_add(n, Ordering::SeqCst);
    }

    /// Every call of `op` fails until [`Self::heal`].
    pub fn fail_always(&self, op: Op) {
        self.0.always[op.index()].store(true, Ordering::SeqCst);
    }

    /// Clears every armed failure (the counters are kept).
    pub fn heal(&self) {
        for i in 0..OPS {
            self.0.next[i].store(0, Ordering::SeqCst);
            self.0.always[i].store(false, Ordering::SeqCst);
        }
    }

    /// Every call yields to the scheduler before and after the inner call (default off), so
    /// concurrent requests interleave inside the store.
    pub fn yield_each_call(&self, on: bool) {
        self.0.yielding.store(on, Ordering::SeqCst);
    }

    /// Calls of `op` so far (failed ones included).
    pub fn calls(&self, op: Op) -> u64 {
        self.0.calls[op.index()].load(Ordering::SeqCst)
    }

    /// Injected failures of `op` so far.
    pub fn failures(&self, op: Op) -> u64 {
        self.0.failures[op.index()].load(Ordering::SeqCst)
    }

    /// Counts a call of `op` and decides whether it fails.
    async fn enter(&self, op: Op) -> Result<(), StoreError> {
        let i = op.index();
        self.0.calls[i].fetch_add(1, Ordering::SeqCst);
        self.pause().await;
        let queued = self.0.next[i]
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if queued || self.0.always[i].load(Ordering::SeqCst) {
            self.0.failures[i].fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Unavailable {
                retry_after: Some(INJECTED_RETRY_AFTER),
                source: format!("injected {op} failure").into(),
            });
        }
        Ok(())
    }

    async fn pause(&self) {
        if self.0.yielding.load(Ordering::SeqCst) {
            YieldNow(false).await;
        }
    }

    /// `call` (the wrapped store's operation `op`) between [`Faults::enter`], which may fail
    /// it instead, and a pause after it.
    async fn around<T>(
        &self,
        op: Op,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.enter(op).await?;
        let out = call.await;
        self.pause().await;
        out
    }
}

/// Returns `Pending` once (waking itself at once): lets the scheduler run other tasks.
struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// A fault wrapper of a store trait: the struct, and the trait's impl in which each listed
/// method (all return `Result<T, StoreError>`) asks the switchboard about its [`Op`] first.
macro_rules! wrapper {
    (
        $(#[$doc:meta])*
        $name:ident: $trait:ident {
            $($op:ident => fn $method:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*
        }
    ) => {
        $(#[$doc])*
        #[derive(Clone, Debug)]
        pub struct $name<S> {
            inner: S,
            faults: Faults,
        }

        impl<S> $name<S> {
            /// Wraps `inner` with a fresh switchboard.
            pub fn new(inner: S) -> Self {
                Self::with_faults(inner, Faults::new())
            }

            /// Wraps `inner` with `faults` (one switchboard may drive several wrappers).
            pub fn with_faults(inner: S, faults: Faults) -> Self {
                Self { inner, faults }
            }

            /// The switchboard.
            pub fn faults(&self) -> &Faults {
                &self.faults
            }

            /// The wrapped store.
            pub fn get_ref(&self) -> &S {
                &self.inner
            }
        }

        #[async_trait]
        impl<S: $trait> $trait for $name<S> {
            $(
                async fn $method(&self, $($arg: $ty),*) -> Result<$ret, StoreError> {
                    self.faults.around(Op::$op, self.inner.$method($($arg),*)).await
                }
            )*

            fn is_shared(&self) -> bool {
                self.inner.is_shared()
            }
        }
    };
}

wrapper! {
    /// A [`NonceStore`] whose `reserve`, `consume` and `release` fail on command.
    FaultyNonceStore: NonceStore {
        Reserve => fn reserve(key: &NonceKey, expires_at: u64) -> Reservation;
        Consume => fn consume(key: &NonceKey, token: ClaimToken) -> ();
        Release => fn release(key: &NonceKey, token: ClaimToken) -> ();
    }
}

wrapper! {
    /// An [`IdempotencyStore`] whose `begin`, `complete` and `abort` fail on command.
    FaultyIdempotencyStore: IdempotencyStore {
        Begin => fn begin(key: &IdempotencyKey, fingerprint: Fingerprint, expires_at: u64) -> Begin;
        Complete => fn complete(key: &IdempotencyKey, token: ClaimToken, response: &StoredResponse)
            -> ();
        Abort => fn abort(key: &IdempotencyKey, token: ClaimToken) -> ();
    }
}

wrapper! {
    /// A [`CreditLedger`] whose `grant`, `debit` and `refund` fail on command.
    FaultyLedger: CreditLedger {
        Grant => fn grant(payer: Address, grant: Grant, now: u64) -> ();
        Debit => fn debit(payer: Address, now: u64) -> Debit;
        Refund => fn refund(payer: Address) -> ();
    }
}

/// The error of a [`FailingBody`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("injected response body failure")]
pub struct BodyFault;

/// A response body that sends its chunks, then fails instead of ending (a handler whose
/// stream broke, a file that could not be read to the end).
///
/// Its size hint is exactly the bytes of its chunks, as a buffered body's would be (so the
/// layer may buffer it for idempotent replay); [`Self::unbounded`] makes it look like a
/// stream (no upper bound).
#[derive(Debug)]
pub struct FailingBody {
    chunks: VecDeque<Bytes>,
    hint: SizeHint,
}

impl FailingBody {
    /// Sends `chunks`, then fails.
    pub fn new<I>(chunks: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<Bytes>,
    {
        let chunks: VecDeque<Bytes> = chunks.into_iter().map(Into::into).collect();
        let len = chunks.iter().map(|c| c.len() as u64).sum();
        Self {
            chunks,
            hint: SizeHint::with_exact(len),
        }
    }

    /// No upper bound in the size hint: looks like a stream.
    pub fn unbounded(mut self) -> Self {
        self.hint = SizeHint::new();
        self
    }
}

impl Body for FailingBody {
    type Data = Bytes;
    type Error = BodyFault;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyFault>>> {
        Poll::Ready(Some(match self.chunks.pop_front() {
            Some(chunk) => Ok(Frame::data(chunk)),
            None => Err(BodyFault),
        }))
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

/// Receipt encodings left to fail (process-wide: receipts are encoded deep in the layer).
static RECEIPT_ENCODING_FAULTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Makes the next receipt encoding fail (the layer then sends a minimal receipt written by
/// hand and raises [`Alert::ReceiptEncoding`](crate::alert::Alert::ReceiptEncoding)).
/// Process-wide: tests that use it must not run beside other paid requests they assert on.
pub fn fail_next_receipt_encoding() {
    RECEIPT_ENCODING_FAULTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// Consumes one armed receipt-encoding fault, if any.
pub(crate) fn take_receipt_encoding_fault() -> bool {
    RECEIPT_ENCODING_FAULTS
        .fetch_update(
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
            |n| n.checked_sub(1),
        )
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryNonceStore;
    use alloy_primitives::B256;
    use http_body_util::BodyExt;

    fn block_on<F: Future>(f: F) -> F::Output {
        // The wrappers only yield (they wake themselves), so a spin of polls finishes them.
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
                return out;
            }
        }
    }

    #[test]
    fn switches_fail_the_armed_calls_and_count() {
        let store = FaultyNonceStore::new(MemoryNonceStore::new());
        let faults = store.faults().clone();
        faults.yield_each_call(true);
        let key = NonceKey {
            chain_id: 1,
            asset: Address::ZERO,
            from: Address::ZERO,
            nonce: B256::ZERO,
        };
        let far = u64::MAX / 2;
        faults.fail_next_n(Op::Reserve, 2);
        for _ in 0..2 {
            let e = block_on(store.reserve(&key, far)).unwrap_err();
            assert_eq!(e.retry_after(), Some(INJECTED_RETRY_AFTER));
        }
        let Ok(Reservation::Reserved(token)) = block_on(store.reserve(&key, far)) else {
            panic!("the third reserve passes: the failures left the store as it was");
        };
        faults.fail_always(Op::Consume);
        assert!(block_on(store.consume(&key, token)).is_err());
        assert!(block_on(store.consume(&key, token)).is_err());
        faults.heal();
        assert!(block_on(store.consume(&key, token)).is_ok());
        assert_eq!(
            (faults.calls(Op::Reserve), faults.failures(Op::Reserve)),
            (3, 2)
        );
        assert_eq!(
            (faults.calls(Op::Consume), faults.failures(Op::Consume)),
            (3, 2)
        );
        assert_eq!(faults.calls(Op::Release), 0);
    }

    #[test]
    fn failing_body_sends_its_chunks_then_fails() {
        let body = FailingBody::new(["ab", "cd"]);
        assert_eq!(body.size_hint().exact(), Some(4));
        assert_eq!(block_on(body.collect()).unwrap_err(), BodyFault);
        let mut body = FailingBody::new(["ab"]).unbounded();
        assert_eq!(body.size_hint().upper(), None);
        let first = block_on(body.frame()).unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"ab"));
        assert_eq!(block_on(body.frame()).unwrap().unwrap_err(), BodyFault);
    }
}
