//! The chunked decoder, which reads client uploads and backend responses
//! alike, on arbitrary bytes: the same data and trailers (or the same error)
//! however the reads split them, never more data out than in, never a panic
//! (`bascule::http1::check_chunked`, which the property tests run too). The
//! first byte picks the read size.
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run chunked corpus/chunked`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, body)) = data.split_first() else {
        return;
    };
    if let Err(broken) = bascule::http1::check_chunked(body, usize::from(step % 32) + 1) {
        panic!("{broken}");
    }
});
