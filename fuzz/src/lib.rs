//! Shared checks of the fuzz targets (also compiled into `tests/proptest.rs`).
mod checks;
pub use checks::*;
