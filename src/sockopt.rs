//! Socket options socket2 has no setter for: the crate's one `unsafe` block,
//! kept here alone so that every other module can forbid unsafe code.
#![allow(unsafe_code)]

use std::io;

use socket2::Socket;

/// Wakes the listener only when a connection's first bytes have arrived, not at the end of its
/// TCP handshake (NGINX's `deferred`, HAProxy's `defer-accept`). Every HTTP and TLS client
/// speaks first, so the accept and the first read come in one wake-up instead of two, on the
/// balancer's core and on the one that delivers the client's packets. A client silent for a
/// second is accepted anyway (the kernel resends its SYN-ACK and takes the next ACK), and the
/// header timeout runs from there: one second is NGINX's choice too.
pub fn defer_accept(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let seconds: libc::c_int = 1;
    // SAFETY: the descriptor is an open socket borrowed for the call, and the option's value is
    // a c_int whose address and size are passed together; socket2 has no setter for this option.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&seconds as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
