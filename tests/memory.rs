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

/// Idle keep-alive connections give their buffers back between requests
/// (server.rs parks them): 2 000 of them, each after one request, cost a few KiB
/// each, not the 40-odd KiB that hyper holds for a connection it keeps.
#[test]
fn idle_keep_alive_connections_hold_no_buffers() {
    let b = TestBackend::start("a");
    let p = Process::start(&simple_config(&[&b]));
    let addr = p.addrs[0];
    let mut warm = KeepAlive::new(addr);
    for _ in 0..50 {
        assert_eq!(warm.get("/").unwrap().0, 200);
    }
    let baseline = p.rss_kib();
    let mut idle = Vec::new();
    for _ in 0..2000 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        idle.push(s);
    }
    let per_conn = p.rss_kib().saturating_sub(baseline) / 2000;
    eprintln!("{per_conn} KiB per idle connection");
    assert!(per_conn <= 12, "{per_conn} KiB per idle connection");
    // Parked connections serve again, pipelined requests included.
    for s in idle.iter_mut().take(50) {
        s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.windows(12).filter(|w| w == b"HTTP/1.1 200").count() < 2 {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    }
}
