//! Macros used across the crate.

/// Builder methods that only store their argument, docs and attributes kept:
/// `$(#[attr])* $vis fn name(arg: Type) => field = value;` is
/// `$(#[attr])* $vis fn name(mut self, arg: Type) -> Self { self.field = value; self }`,
/// where `field` may be a path (`config.gas_limit`). Anything more is written out.
macro_rules! setters {
    ($(
        $(#[$attr:meta])*
        $vis:vis fn $name:ident($arg:ident: $ty:ty) => $($field:ident).+ = $value:expr;
    )*) => {
        $(
            $(#[$attr])*
            $vis fn $name(mut self, $arg: $ty) -> Self {
                self.$($field).+ = $value;
                self
            }
        )*
    };
}

/// `now_or!(a.thing_now(x), a.thing(x))`: the answer a store, verifier or settler gave at
/// once (its `*_now` method: what needs no I/O skips a boxed future per call), else the async
/// method's, awaited (it runs only then). A macro, not an `async fn`: a wrapping future moved
/// its own state along with the caller's (~0.5k instructions a paid request).
macro_rules! now_or {
    ($now:expr, $later:expr) => {
        match $now {
            Some(answer) => answer,
            None => $later.await,
        }
    };
}
