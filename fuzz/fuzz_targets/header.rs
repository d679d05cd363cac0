//! The header decoder: base64 codec, size cap, canonical encoding, then the payload parser.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tower_x402_fuzz::header(data));
