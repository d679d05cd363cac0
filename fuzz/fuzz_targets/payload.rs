//! The payload parser: v1/v2 payloads, the exact EVM payload, challenges; round-trips and verification.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tower_x402_fuzz::payload(data));
