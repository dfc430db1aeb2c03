//! Bodies stream: 1 GiB each way through the real binary with its RSS staying flat.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const GIB: u64 = 1 << 30;

#[test]
fn one_gib_up_and_down_with_flat_rss() {
    let b = TestBackend::start("a");
    let p = Process::start(&simple_config(&[&b]));
    let addr = p.addrs[0];
    // Warm up the pools and buffers, then take the baseline.
    for _ in 0..10 {
        assert_eq!(get(addr, "/big?bytes=1048576").status, 200);
    }
    let baseline = p.rss_kib();
    let peak = Arc::new(AtomicU64::new(baseline));
    let done = Arc::new(AtomicBool::new(false));
    let pid = p.child.id();
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    if let Some(kib) = s
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                    {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let total = download(addr, GIB);
    assert!(
        total > GIB && total < GIB + 1024,
        "downloaded {total} bytes"
    );

    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {GIB}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![b'y'; 1 << 16];
    for _ in 0..(GIB >> 16) {
        s.write_all(&chunk).unwrap();
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert_eq!(parse_reply(&out).body, GIB.to_string());

    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    eprintln!("RSS baseline {baseline} KiB, peak growth {growth} KiB over 2 GiB moved");
    assert!(
        growth < 32 * 1024,
        "RSS grew by {growth} KiB while streaming"
    );
}
