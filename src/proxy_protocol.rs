//! The PROXY protocol header (HAProxy's, versions 1 and 2) that an L4 load
//! balancer in front of bascule (an AWS NLB, HAProxy in TCP mode, stunnel)
//! sends before a connection's first byte, stating the client's address.
//! `ppp` parses it; this module reads exactly its bytes off the socket, no
//! more, so that TLS or HTTP starts on the byte after it untouched.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::v1::Addresses as V1;
use ppp::v2::{Addresses as V2, Command};
use ppp::HeaderResult;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Version 2's first twelve bytes.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The shortest header of either version: `PROXY UNKNOWN\r\n`.
const SHORTEST: usize = 15;
/// Version 1's longest header, its line end included (the specification's figure).
const V1_LONGEST: usize = 107;
/// Version 2's fixed part: signature, version and command, family, length.
const V2_FIXED: usize = 16;
/// The most of addresses and TLVs a version 2 header may carry here. The
/// specification allows 64 KiB; the TLVs senders use (ALPN, authority, a
/// unique id, an SSL summary) take a few hundred bytes.
const V2_MOST: usize = 4096;

/// Why a connection's header was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not a PROXY protocol header.
    Missing,
    /// A header `ppp` could not read, or one longer than bascule takes.
    Invalid(String),
    /// Not whole within the time given.
    Timeout(Duration),
}

impl Refused {
    /// For the metric's `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::Missing => "missing",
            Refused::Invalid(_) => "invalid",
            Refused::Timeout(_) => "timeout",
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Missing => f.write_str("no PROXY protocol header"),
            Refused::Invalid(why) => write!(f, "invalid PROXY protocol header: {why}"),
            Refused::Timeout(limit) => write!(f, "no whole PROXY protocol header within {limit:?}"),
        }
    }
}

/// The client's address a whole header states: `None` when it states none
/// (version 1's `UNKNOWN`, version 2's `LOCAL` command, such as a sender's
/// health check, or a family other than TCP over IP), when the connection's
/// own peer stands, as the specification asks.
pub fn stated_client(header: &[u8]) -> Result<Option<SocketAddr>, Refused> {
    match HeaderResult::parse(header) {
        HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            V1::Tcp4(a) => Some((a.source_address, a.source_port).into()),
            V1::Tcp6(a) => Some((a.source_address, a.source_port).into()),
            V1::Unknown => None,
        }),
        HeaderResult::V2(Ok(h)) => Ok(match (h.command, h.addresses) {
            (Command::Local, _) => None,
            (Command::Proxy, V2::IPv4(a)) => Some((a.source_address, a.source_port).into()),
            (Command::Proxy, V2::IPv6(a)) => Some((a.source_address, a.source_port).into()),
            (Command::Proxy, V2::Unix(_) | V2::Unspecified) => None,
        }),
        HeaderResult::V1(Err(e)) => Err(Refused::Invalid(e.to_string())),
        HeaderResult::V2(Err(e)) => Err(Refused::Invalid(e.to_string())),
    }
}

/// What the first bytes of a connection say of its header's length.
#[derive(Debug, PartialEq, Eq)]
enum Length {
    /// Version 2: the header is this long.
    Exactly(usize),
    /// Version 1: a line, to its `\n`.
    Line,
}

/// The header's length from its first `SHORTEST` bytes, or, for version 2,
/// its first `V2_FIXED`.
fn length(start: &[u8]) -> Result<Length, Refused> {
    if start.starts_with(b"PROXY ") {
        return Ok(Length::Line);
    }
    if start.len() < V2_FIXED || !start.starts_with(V2_SIGNATURE) {
        return Err(Refused::Missing);
    }
    let rest = u16::from_be_bytes([start[14], start[15]]) as usize;
    if rest > V2_MOST {
        return Err(Refused::Invalid(format!(
            "{rest} bytes of addresses and TLVs (at most {V2_MOST} taken)"
        )));
    }
    Ok(Length::Exactly(V2_FIXED + rest))
}

/// Reads the connection's header, and nothing after it, within `timeout`:
/// the client's address it states, or why the connection is to be closed.
pub async fn read(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<SocketAddr>, Refused> {
    match tokio::time::timeout(timeout, read_header(stream)).await {
        Ok(Ok(header)) => stated_client(&header),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Refused::Timeout(timeout)),
    }
}

async fn read_header(stream: &mut TcpStream) -> Result<Vec<u8>, Refused> {
    let closed = |e: std::io::Error| Refused::Invalid(e.to_string());
    // Every header is at least this long: reading it takes nothing of what follows.
    let mut header = vec![0; SHORTEST];
    stream.read_exact(&mut header).await.map_err(closed)?;
    if header.starts_with(V2_SIGNATURE) {
        header.resize(V2_FIXED, 0);
        stream
            .read_exact(&mut header[SHORTEST..])
            .await
            .map_err(closed)?;
    }
    match length(&header)? {
        Length::Exactly(len) => {
            let have = header.len();
            header.resize(len, 0);
            stream
                .read_exact(&mut header[have..])
                .await
                .map_err(closed)?;
        }
        Length::Line => {
            // Peeked, then read up to its end: what has been peeked without
            // an end is read, so the next peek waits for new bytes.
            let mut peeked = [0; V1_LONGEST];
            while !header.ends_with(b"\n") {
                let room = V1_LONGEST - header.len();
                if room == 0 {
                    return Err(Refused::Invalid(format!("a line over {V1_LONGEST} bytes")));
                }
                let n = stream.peek(&mut peeked[..room]).await.map_err(closed)?;
                if n == 0 {
                    return Err(Refused::Invalid("the connection closed".into()));
                }
                let take = peeked[..n]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(n, |i| i + 1);
                let have = header.len();
                header.resize(have + take, 0);
                stream
                    .read_exact(&mut header[have..])
                    .await
                    .map_err(closed)?;
            }
        }
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        h.extend_from_slice(addresses);
        h
    }

    #[test]
    fn version_1_states_the_client() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 80\r\n";
        assert_eq!(
            stated_client(h),
            Ok(Some("192.0.2.7:51000".parse().unwrap()))
        );
        let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n";
        assert_eq!(
            stated_client(h),
            Ok(Some("[2001:db8::7]:51000".parse().unwrap()))
        );
        assert_eq!(stated_client(b"PROXY UNKNOWN\r\n"), Ok(None));
        assert!(stated_client(b"PROXY TCP4 192.0.2.300 10.0.0.1 1 2\r\n").is_err());
    }

    #[test]
    fn version_2_states_the_client_unless_local() {
        let ipv4 = [192, 0, 2, 7, 10, 0, 0, 1, 0xc7, 0x38, 0, 80];
        let h = v2(1, 0x11, &ipv4);
        assert_eq!(
            stated_client(&h),
            Ok(Some("192.0.2.7:51000".parse().unwrap()))
        );
        assert_eq!(stated_client(&v2(0, 0x00, &[])), Ok(None));
        // Its TLVs follow the addresses and change nothing.
        let mut with_tlv = ipv4.to_vec();
        with_tlv.extend_from_slice(&[0x05, 0, 3, b'a', b'b', b'c']);
        assert_eq!(
            stated_client(&v2(1, 0x11, &with_tlv)),
            Ok(Some("192.0.2.7:51000".parse().unwrap()))
        );
    }

    #[test]
    fn the_length_comes_from_the_first_bytes() {
        assert_eq!(length(b"PROXY UNKNOWN\r\n"), Ok(Length::Line));
        assert_eq!(length(&v2(1, 0x11, &[0; 12])), Ok(Length::Exactly(28)));
        assert_eq!(length(b"GET / HTTP/1.1\r\n"), Err(Refused::Missing));
        let mut long = v2(1, 0x11, &[]);
        long[14..16].copy_from_slice(&5000u16.to_be_bytes());
        assert!(matches!(length(&long), Err(Refused::Invalid(_))));
    }
}
