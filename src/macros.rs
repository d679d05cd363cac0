//! Macros used across the crate.

/// Builder methods that only store their argument. Each
/// `$(#[attr])* $vis fn name(arg: Type) => field = value;` becomes
/// `$(#[attr])* $vis fn name(mut self, arg: Type) -> Self { self.field = value; self }`
/// (`field` may be a path of fields: `config.gas_limit`),
/// its docs and attributes kept.
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
