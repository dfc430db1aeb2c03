//! HTTP/2 from clients holds against the known floods: the limits set in
//! `server.rs` end an abusive connection, and everyone else is served.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Rapid reset (CVE-2023-44487): streams opened and reset at once, faster than
/// they can be served. The connection is told to go away long before its
/// thousands of streams reach a backend, and another client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_ends_the_connection_and_others_are_served() {
    let b = TestBackend::start("a");
    b.delay_ms.store(50, std::sync::atomic::Ordering::SeqCst);
    let lb = tokio::task::spawn_blocking({
        let yaml = simple_config(&[&b]);
        move || Balancer::start(&yaml)
    })
    .await
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let started = Instant::now();
    let mut reset = 0;
    for _ in 0..10_000 {
        let Ok(ready) = client.clone().ready().await else {
            break;
        };
        client = ready;
        let req = http::Request::get("http://x/slow").body(()).unwrap();
        let Ok((_, mut stream)) = client.send_request(req, true) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        reset += 1;
    }
    // bascule ends the connection: the client's connection task finishes with an error.
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the flooding connection was not ended");
    let err = ended
        .unwrap()
        .expect_err("the flooding connection was not ended in error");
    assert!(reset < 10_000, "all {reset} resets were taken");
    eprintln!(
        "rapid reset: ended after {reset} resets in {:?}: {err}",
        started.elapsed()
    );
    // Another client is served at once.
    let addr = lb.addr;
    let reply = tokio::task::spawn_blocking(move || get(addr, "/"))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    // Of the streams reset, few reached the backend.
    let seen = b.requests().len();
    assert!(seen < 1_000, "{seen} reset streams were forwarded");
    tokio::task::spawn_blocking(move || drop(lb)).await.unwrap();
}

/// HTTP/2 frames written by hand, for floods no well-behaved client library sends.
mod frames {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const HEADERS: u8 = 1;
    pub const SETTINGS: u8 = 4;
    pub const PING: u8 = 6;
    pub const GOAWAY: u8 = 7;
    pub const CONTINUATION: u8 = 9;
    pub const END_STREAM: u8 = 1;
    pub const END_HEADERS: u8 = 4;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    /// An HPACK integer with an `n`-bit prefix whose high bits are `first`.
    pub fn int(first: u8, n: u32, mut v: usize, out: &mut Vec<u8>) {
        let max = (1usize << n) - 1;
        if v < max {
            out.push(first | v as u8);
            return;
        }
        out.push(first | max as u8);
        v -= max;
        while v >= 128 {
            out.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        out.push(v as u8);
    }

    /// A literal field with a new name; `first` 0x40 adds it to the dynamic table, 0 does not.
    pub fn literal(first: u8, name: &str, value: &[u8], out: &mut Vec<u8>) {
        out.push(first);
        int(0, 7, name.len(), out);
        out.extend(name.as_bytes());
        int(0, 7, value.len(), out);
        out.extend(value);
    }

    /// `GET /` on `http`: the pseudo-fields from HPACK's static table.
    pub fn get_root() -> Vec<u8> {
        let mut block = vec![0x82, 0x86, 0x84];
        literal(0, ":authority", b"x", &mut block);
        block
    }

    /// Reads frames until GOAWAY or the end of the connection; returns what ended it.
    pub fn read_until_goaway(s: &mut std::net::TcpStream) -> String {
        use std::io::Read;
        let mut head = [0u8; 9];
        loop {
            if s.read_exact(&mut head).is_err() {
                return "closed".into();
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0; len];
            if s.read_exact(&mut payload).is_err() {
                return "closed".into();
            }
            if head[3] == GOAWAY && payload.len() >= 8 {
                let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                return format!("GOAWAY {code:#x}");
            }
        }
    }
}

/// How a flood ended: the bytes the balancer took, what stopped it, and the
/// connection, still open, so that memory is measured while it holds.
struct Flooded {
    sent: u64,
    how: String,
    _conn: std::net::TcpStream,
}

/// Floods one connection and reports how far it got: the bytes the balancer
/// took (the kernel's socket buffers included) before it ended the connection,
/// or before it stopped reading (a write blocked for a second). `reading`:
/// whether the client reads what comes back (only to see a GOAWAY).
fn flood(
    addr: std::net::SocketAddr,
    reading: bool,
    opening: Vec<u8>,
    next: impl Fn(usize) -> Vec<u8>,
) -> Flooded {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let ended = reading.then(|| {
        let mut reader = s.try_clone().unwrap();
        std::thread::spawn(move || frames::read_until_goaway(&mut reader))
    });
    let is_ended = || ended.as_ref().is_some_and(|e| e.is_finished());
    let mut sent = 0u64;
    let mut chunk = opening;
    for i in 0.. {
        if s.write_all(&chunk).is_err() || is_ended() || sent > 1 << 30 {
            break;
        }
        sent += chunk.len() as u64;
        chunk = next(i);
    }
    // A write fails when the balancer has closed the connection (a reset, with
    // the client's bytes unread), a moment before the reader sees it.
    if let Some(ended) = &ended {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !ended.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let how = match ended {
        Some(ended) if ended.is_finished() => ended.join().unwrap(),
        _ => "stopped reading".into(),
    };
    Flooded {
        sent,
        how,
        _conn: s,
    }
}

fn opening() -> Vec<u8> {
    let mut o = frames::PREFACE.to_vec();
    o.extend(frames::frame(frames::SETTINGS, 0, 0, &[]));
    o
}

/// The balancer's memory stays bounded and another client is served while
/// `attack` floods a connection.
fn holds_against(
    name: &str,
    attack: impl FnOnce(std::net::SocketAddr) -> Flooded + Send + 'static,
) {
    let b = TestBackend::start("a");
    let p = Process::start(&simple_config(&[&b]));
    let addr = p.addrs[0];
    assert_eq!(get(addr, "/").status, 200);
    let before = p.rss_kib();
    let flooding = std::thread::spawn(move || attack(addr));
    // Served while the flood goes on, and after.
    assert_eq!(get(addr, "/").status, 200);
    let flooded = flooding.join().unwrap();
    assert_eq!(get(addr, "/").status, 200);
    let grown = p.rss_kib().saturating_sub(before);
    let Flooded { sent, how, .. } = &flooded;
    eprintln!("{name}: {sent} bytes taken, then {how}; RSS grew {grown} KiB");
    assert!(grown < 32 * 1024, "{name}: RSS grew {grown} KiB");
    // Only the two plain requests and the warm-up reached the backend.
    assert_eq!(
        b.requests().len(),
        3,
        "{name}: a flooding request was forwarded"
    );
}

/// CONTINUATION flood (CVE-2024-27316): a header block that never ends. The
/// connection is told to go away once the block passes the header-list limit,
/// whether the frames are large or hold one field each.
#[test]
fn a_continuation_flood_ends_the_connection() {
    for (name, field_len) in [("large frames", 16_000), ("one small field a frame", 8)] {
        holds_against(name, move |addr| {
            let mut o = opening();
            o.extend(frames::frame(frames::HEADERS, 0, 1, &frames::get_root()));
            let value = vec![b'v'; field_len];
            let flooded = flood(addr, true, o, |i| {
                let mut block = Vec::new();
                frames::literal(0, &format!("x-{i}"), &value, &mut block);
                frames::frame(frames::CONTINUATION, 0, 1, &block)
            });
            let Flooded { sent, how, .. } = &flooded;
            // GOAWAY, or the connection reset with it unread.
            assert!(
                how.starts_with("GOAWAY") || how == "closed",
                "{name}: {how} after {sent} bytes"
            );
            // The limit is far below a megabyte; the kernel's buffers on loopback hold a few.
            assert!(*sent < 16 << 20, "{name}: {sent} bytes taken before {how}");
            flooded
        });
    }
}

/// HPACK bomb: one 4 KiB field put in the dynamic table, then named again in
/// one byte each, 16 000 times a frame: megabytes of fields from kilobytes
/// sent. The header-list limit counts the decoded size: the request is never
/// forwarded and the connection ends.
#[test]
fn an_hpack_bomb_is_refused_without_growing_memory() {
    holds_against("HPACK bomb", |addr| {
        let mut o = opening();
        let mut block = frames::get_root();
        frames::literal(0x40, "x-bomb", &[b'b'; 4000], &mut block);
        o.extend(frames::frame(frames::HEADERS, 0, 1, &block));
        // The newest dynamic entry is index 62.
        let refs = vec![0x80 | 62u8; 16_000];
        let flooded = flood(addr, true, o, |i| {
            let last = i == 200;
            let flags = if last {
                frames::END_HEADERS | frames::END_STREAM
            } else {
                0
            };
            if i > 200 {
                return frames::frame(frames::PING, 0, 0, &[0; 8]);
            }
            frames::frame(frames::CONTINUATION, flags, 1, &refs)
        });
        let Flooded { sent, how, .. } = &flooded;
        assert!(
            how.starts_with("GOAWAY") || how == "closed",
            "{how} after {sent} bytes"
        );
        flooded
    });
}

/// SETTINGS and PING floods: each is acknowledged before the next frame is
/// read, so a client that never reads the acknowledgements stalls its own
/// connection once the socket buffers fill; nothing queues in the balancer.
#[test]
fn settings_and_ping_floods_stall_only_their_own_connection() {
    for (name, kind) in [
        ("SETTINGS flood", frames::SETTINGS),
        ("PING flood", frames::PING),
    ] {
        holds_against(name, move |addr| {
            let payload: &[u8] = if kind == frames::PING {
                &[0; 8]
            } else {
                &[0, 3, 0, 0, 0, 100]
            };
            let batch: Vec<u8> = (0..1000)
                .flat_map(|_| frames::frame(kind, 0, 0, payload))
                .collect();
            let flooded = flood(addr, false, opening(), |_| batch.clone());
            let Flooded { sent, how, .. } = &flooded;
            assert!(*sent < 64 << 20, "{name}: {sent} bytes taken, then {how}");
            flooded
        });
    }
}
