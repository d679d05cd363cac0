//! The whole layer fed arbitrary payment headers (raw, JSON, or edits of a valid signed proof).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tower_x402_fuzz::layer(data));
