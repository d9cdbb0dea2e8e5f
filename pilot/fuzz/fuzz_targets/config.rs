//! The YAML → model path with arbitrary input: what pilot does on a
//! reload (parse, accept, build and decode every proxy's view) and what
//! `meshctl analyze` says of the same text. Neither may panic, hang or
//! exhaust memory, and a refusal must say why.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshctl::analyze::fuzz_config(data));
