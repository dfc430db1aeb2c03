//! The client request-head parser on arbitrary bytes: a request, a wait for
//! more, or a refusal with an error status (`bascule::http1::serve::check_request_head`,
//! which the property tests run too), never a panic.
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run request_head corpus/request_head`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = bascule::http1::serve::check_request_head(data) {
        panic!("{broken}");
    }
});
