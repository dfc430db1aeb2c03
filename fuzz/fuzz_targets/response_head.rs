//! The backend response-head parser on arbitrary bytes: a head with a framing,
//! a wait for more, or an error (`bascule::pool::h1::check_response_head`,
//! which the property tests run too), never a panic.
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run response_head corpus/response_head`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = bascule::pool::h1::check_response_head(data) {
        panic!("{broken}");
    }
});
