//! Listening sockets handed over at start by systemd's socket activation
//! (`LISTEN_FDS`, and `LISTEN_PID` when set), read by `listenfd`. A listener
//! whose bind is one of their addresses uses it instead of binding: the
//! socket outlives bascule's restarts, and connections that arrive while
//! bascule is down wait in its backlog instead of being refused.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::SockRef;

/// The sockets inherited at start, kept for the process's life: a reload that
/// adds a listener on one of their addresses uses it again.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Vec<(SocketAddr, TcpListener)>,
}

impl Inherited {
    /// Takes the sockets the environment names and removes its variables, so
    /// that no child takes them for its own. Call it before any thread starts
    /// (it changes the environment). A descriptor that is not a listening TCP
    /// socket is left alone and named in the log.
    pub fn from_env() -> Inherited {
        let mut fds = listenfd::ListenFd::from_env();
        let mut sockets = Vec::new();
        for i in 0..fds.len() {
            match fds.take_tcp_listener(i) {
                Ok(Some(socket)) => match socket.local_addr() {
                    Ok(addr) => sockets.push((addr, socket)),
                    Err(e) => tracing::warn!("inherited socket {i}: {e}"),
                },
                Ok(None) => {}
                Err(e) => tracing::warn!("inherited socket {i} left unused: {e}"),
            }
        }
        Inherited { sockets }
    }

    /// Addresses inherited, for the log.
    pub fn addresses(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.sockets.iter().map(|(addr, _)| *addr)
    }

    /// For a listener bound at `bind`: a descriptor of the inherited socket
    /// at that address for each of `workers`, set up as bascule's own sockets
    /// are; `None` when none was inherited there. The workers share its one
    /// accept queue (where sockets bascule binds have one each).
    pub fn sockets_for(
        &self,
        bind: SocketAddr,
        workers: usize,
    ) -> Option<io::Result<Vec<TcpListener>>> {
        let (_, socket) = self.sockets.iter().find(|(addr, _)| *addr == bind)?;
        Some(set_up(socket).and_then(|()| (0..workers).map(|_| socket.try_clone()).collect()))
    }
}

/// What `bind_reuseport` sets on the sockets bascule binds, on one handed to it.
fn set_up(socket: &TcpListener) -> io::Result<()> {
    socket.set_nonblocking(true)?;
    let socket = SockRef::from(socket);
    socket.set_tcp_nodelay(true)?;
    crate::sockopt::defer_accept(&socket)
}
