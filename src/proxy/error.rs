//! The replies bascule makes itself, and the one mapping from failure to status.

use http::StatusCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this request")]
    NoRoute,
    #[error("no healthy backend is available")]
    NoBackend,
    #[error("the backend could not be reached")]
    Connect,
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
            ProxyError::NoBackend => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect | ProxyError::Broken => StatusCode::BAD_GATEWAY,
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
}
