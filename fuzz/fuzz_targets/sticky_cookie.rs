//! The sticky-cookie decoder on arbitrary input: whatever a client sends as a
//! Cookie header must be ignored or honoured, never crash the process.
//!
//! `cargo fuzz run sticky_cookie` (on a stable toolchain: `RUSTC_BOOTSTRAP=1 cargo fuzz run sticky_cookie`)
#![no_main]

use std::time::Duration;

use bascule::sticky::{open, seal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let secrets = [b"the secret".to_vec(), b"an older secret".to_vec()];
    // The value alone: without the secret, nothing opens.
    assert!(open(&secrets, "app", data, Duration::from_secs(3600), 1_800_000_000).is_err());
    // The whole header, as the request path reads it.
    if let Ok(value) = http::HeaderValue::from_bytes(data) {
        let req = http::Request::get("/").header("cookie", value).body(()).unwrap();
        if let Some(v) = bascule::hash_key::cookie(&req, "aff") {
            let _ = open(&secrets, "app", v, Duration::from_secs(3600), 1_800_000_000);
        }
    }
    // A sealed cookie always opens.
    let id = u64::from_le_bytes(data.get(..8).and_then(|b| b.try_into().ok()).unwrap_or([0; 8]));
    let sealed = seal(b"the secret", "app", id, 1_800_000_000);
    assert_eq!(open(&secrets, "app", sealed.as_bytes(), Duration::from_secs(60), 1_800_000_000), Ok(id));
});
