//! How a session with a receiver fails: the whole session, or one request of it.

use ferry_protocol::connection::ConnError;
use ferry_protocol::RelPath;

/// A session-level failure.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Connecting or the connection failed.
    #[error("{address}: {source}")]
    Conn {
        /// The receiver address.
        address: String,
        /// The cause.
        source: ConnError,
    },
    /// None of a target's gateways took the session; why, for each.
    #[error("no gateway took the session: {0}")]
    NoGateway(String),
    /// The connection was lost while a request was outstanding.
    #[error("{0}: connection lost")]
    Lost(String),
    /// The receiver refused one request (it answered `Failed`); the session goes on.
    #[error("{reason}")]
    Refused {
        /// What the request was about.
        path: RelPath,
        /// The receiver's reason (it names the path).
        reason: String,
    },
    /// The source could not be read as a whole (its root gone or unreadable); the session
    /// goes on and the work waits.
    #[error("source {}: {error}", path.display())]
    Source {
        /// The local path.
        path: std::path::PathBuf,
        /// Why.
        error: String,
    },
    /// The target cannot serve this request at all (an rsync target has no ferry session).
    #[error("{0}")]
    Unsupported(String),
    /// The receiver answered with something unexpected.
    #[error("{address}: protocol violation: {what}")]
    Protocol {
        /// The receiver address.
        address: String,
        /// What arrived.
        what: String,
    },
}

impl SessionError {
    /// True for errors that end the whole session (as opposed to one request failing).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            SessionError::Conn { .. }
                | SessionError::NoGateway(_)
                | SessionError::Lost(_)
                | SessionError::Protocol { .. }
        )
    }
}
