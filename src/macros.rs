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
