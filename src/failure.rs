//! The one failure model of the request path: what went wrong, the status a
//! client is told, and whether (and where) the request may be sent again.
//!
//! A backend exchange that fails comes back as a [`Failure`]: its [`ProxyError`]
//! (which maps to the reply's status), its cause (for the log), and what is
//! left of the request ([`Resend`]). [`Failure::again`] is the retry policy,
//! asked both by the pool (another connection to the same backend) and by the
//! proxy (another backend); nothing else decides it.

use http::StatusCode;

use crate::http1::{BodyFailed, BoxError};

/// Why a request got no reply from a backend; each maps to one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this request")]
    NoRoute,
    #[error("no healthy backend is available")]
    NoBackend,
    /// Every backend it may use is at its `max_connections`, and `queue.size`
    /// requests wait already.
    #[error("every backend is at its connection limit and the queue is full")]
    QueueFull,
    #[error("no backend had room within the queue's timeout")]
    QueueTimeout,
    #[error("the backend could not be reached")]
    Connect,
    /// The request was sent, wholly or in part, and the connection ended
    /// before a byte of the response: a backend closing an idle connection
    /// looks like this.
    #[error("the backend closed the connection before answering")]
    Closed,
    #[error("the backend broke the exchange")]
    Broken,
    #[error("the backend did not answer in time")]
    Timeout,
    #[error("the request head is larger than this listener accepts")]
    HeadTooLarge,
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("the request body stopped arriving")]
    UploadTimedOut,
    #[error("the request body broke off or was malformed")]
    UploadBroken,
}

impl ProxyError {
    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::NoBackend | ProxyError::QueueFull | ProxyError::QueueTimeout => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Connect | ProxyError::Closed | ProxyError::Broken => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) | ProxyError::UploadBroken => StatusCode::BAD_REQUEST,
            ProxyError::UploadTimedOut => StatusCode::REQUEST_TIMEOUT,
            ProxyError::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }

    /// The short plain-text body: the status line, then why.
    pub fn body(self) -> String {
        let status = self.status();
        format!(
            "{} {}: {self}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
    }

    /// Turned away by the queue: worth trying again in a moment (`Retry-After`).
    pub fn is_queue(self) -> bool {
        matches!(self, ProxyError::QueueFull | ProxyError::QueueTimeout)
    }

    /// A failed exchange with a backend (rather than no backend to try, or a timeout).
    pub fn is_attempts(self) -> bool {
        matches!(
            self,
            ProxyError::Connect | ProxyError::Closed | ProxyError::Broken
        )
    }

    /// The client's doing or a request nobody could route: logged quietly,
    /// where a backend's failure is a warning.
    pub fn is_clients(self) -> bool {
        matches!(
            self,
            ProxyError::NoRoute
                | ProxyError::BadRequest(_)
                | ProxyError::HeadTooLarge
                | ProxyError::UploadTimedOut
                | ProxyError::UploadBroken
        )
    }
}

/// What is left of a request whose exchange failed.
#[derive(Debug)]
pub enum Resend<R> {
    /// Not a byte reached the backend: it comes back as it was.
    Unsent(Box<R>),
    /// The backend took it, or part of it, before failing; it has an
    /// idempotent method and no body, so it may be replayed.
    Replayable(Box<R>),
    /// It cannot go again: it had a body, or a method that is not idempotent.
    Never,
}

/// A failed exchange with a backend.
#[derive(Debug)]
pub struct Failure<R> {
    pub error: ProxyError,
    pub resend: Resend<R>,
    pub cause: BoxError,
}

/// Where the retry policy lets a failed request go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Again {
    /// Another connection to the same backend: the one used had gone stale in the pool.
    SameBackend,
    /// Another backend. `budgeted`: the request reached a backend, so a retry
    /// loads the fleet and must come out of the retry budget.
    OtherBackend {
        budgeted: bool,
    },
    No,
}

/// What the policy weighs beside the failure itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Attempt {
    /// The connection came from the pool (rather than being opened for this request).
    pub reused: bool,
    /// It had been idle long enough for the backend to have closed it.
    pub stale: bool,
    /// The upstream retries requests that reached a backend (`retries` > 0).
    pub replay: bool,
}

impl<R> Failure<R> {
    pub fn new(error: ProxyError, resend: Resend<R>, cause: impl Into<BoxError>) -> Self {
        Failure {
            error,
            resend,
            cause: cause.into(),
        }
    }

    /// The retry policy. A request that never left may always go again: on
    /// another connection to the same backend when the one it was given came
    /// from the pool (the backend may have closed it just then), else to
    /// another backend, free of the budget since it loaded nobody. One the
    /// backend took may go again only if it is replayable: to the same backend
    /// on another connection when a pooled connection closed before answering
    /// and the upstream retries or the connection was stale; to another
    /// backend when the upstream retries. A timeout, an upload that failed
    /// (the client's doing) and anything else go nowhere.
    pub fn again(&self, attempt: Attempt) -> Again {
        match (&self.resend, self.error) {
            (Resend::Unsent(_), _) if attempt.reused => Again::SameBackend,
            (Resend::Unsent(_), _) => Again::OtherBackend { budgeted: false },
            (Resend::Replayable(_), ProxyError::Closed)
                if attempt.reused && (attempt.replay || attempt.stale) =>
            {
                Again::SameBackend
            }
            (Resend::Replayable(_), ProxyError::Closed | ProxyError::Broken) if attempt.replay => {
                Again::OtherBackend { budgeted: true }
            }
            _ => Again::No,
        }
    }

    /// The request's body failed: the client's upload broke off, was
    /// malformed or stopped arriving. Nothing the backend did.
    pub fn upload(failed: BodyFailed) -> Self {
        let error = if failed.timed_out() {
            ProxyError::UploadTimedOut
        } else {
            ProxyError::UploadBroken
        };
        Failure::new(error, Resend::Never, failed)
    }

    /// The request, to send again where `again` allowed.
    pub fn into_request(self) -> Option<Box<R>> {
        match self.resend {
            Resend::Unsent(r) | Resend::Replayable(r) => Some(r),
            Resend::Never => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(error: ProxyError, resend: Resend<()>) -> Failure<()> {
        Failure::new(error, resend, "cause")
    }

    #[test]
    fn the_retry_policy() {
        let fresh = Attempt::default();
        let pooled = Attempt {
            reused: true,
            ..fresh
        };
        let unsent = || Resend::Unsent(Box::new(()));
        let replayable = || Resend::Replayable(Box::new(()));
        let f = failure(ProxyError::Connect, unsent());
        assert_eq!(f.again(pooled), Again::SameBackend);
        assert_eq!(f.again(fresh), Again::OtherBackend { budgeted: false });

        let closed = failure(ProxyError::Closed, replayable());
        assert_eq!(closed.again(pooled), Again::No);
        let stale = Attempt {
            stale: true,
            ..pooled
        };
        assert_eq!(closed.again(stale), Again::SameBackend);
        let replay = Attempt {
            replay: true,
            ..fresh
        };
        assert_eq!(closed.again(replay), Again::OtherBackend { budgeted: true });
        let broken = failure(ProxyError::Broken, replayable());
        assert_eq!(
            broken.again(Attempt {
                reused: true,
                ..replay
            }),
            Again::OtherBackend { budgeted: true }
        );
        assert_eq!(broken.again(stale), Again::No);
        for never in [
            failure(ProxyError::Broken, Resend::Never),
            failure(ProxyError::Timeout, replayable()),
            failure(ProxyError::UploadBroken, Resend::Never),
        ] {
            assert_eq!(never.again(replay), Again::No, "{:?}", never.error);
        }
    }
}
