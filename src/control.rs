//! The control API: how the CLI asks a running daemon for its status, its sessions and its
//! pinholes, and tells it to end a session or close pinholes.
//!
//! The daemon serves a Unix socket (`[control] socket`, mode 0600) and answers only root or
//! its own user, checked with the peer's credentials (SO_PEERCRED), so that a permissive
//! directory cannot widen access. Each connection carries one request: a JSON object on one
//! line, answered by one JSON line. This module holds the message types, the server loop and
//! the client; what each request does is the daemon's business (`daemon.rs`).

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::config::Mode;
use crate::pinhole::{PinholeEntry, PinholeId};
use crate::registry::{SessionId, SessionInfo};

/// A request is one line; longer is not a request.
const MAX_REQUEST: u64 = 4096;
/// How long the daemon waits for a request, and the CLI for an answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// What the CLI asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// The daemon's configuration summary and counts.
    Status,
    /// Every live session.
    Sessions,
    /// End a session: its client gets 421, its pinholes are removed.
    KillSession {
        /// The session.
        id: SessionId,
    },
    /// Every pinhole in the kernel, with the daemon's ids.
    Pinholes,
    /// Remove one pinhole now.
    ClosePinhole {
        /// The pinhole.
        id: PinholeId,
    },
    /// Remove every pinhole the daemon holds.
    FlushPinholes,
    /// A new daemon process asks for the listening sockets (see `handover`): the connection
    /// goes to the daemon, which answers on it with the sockets themselves.
    HandOver,
}

/// What the daemon answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    /// To [`Request::Status`].
    Status(Status),
    /// To [`Request::Sessions`].
    Sessions {
        /// By id.
        sessions: Vec<SessionInfo>,
    },
    /// To [`Request::Pinholes`].
    Pinholes {
        /// As the kernel holds them.
        pinholes: Vec<PinholeEntry>,
    },
    /// To [`Request::KillSession`]: the session is ending.
    Killed {
        /// The session.
        id: SessionId,
    },
    /// To [`Request::ClosePinhole`] and [`Request::FlushPinholes`]: these were removed.
    Closed {
        /// The pinholes.
        ids: Vec<PinholeId>,
    },
    /// The request failed.
    Error {
        /// What kind of failure, for exit codes.
        kind: ErrorKind,
        /// What happened, for people.
        message: String,
    },
}

/// Kinds of failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No session or pinhole with that id.
    NotFound,
    /// The request could not be read.
    BadRequest,
    /// The peer is neither root nor the daemon's user.
    PermissionDenied,
    /// The daemon tried and failed (the firewall refused, say).
    Failed,
}

/// The daemon's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// ftp-alg's version.
    pub version: String,
    /// The daemon's process id.
    pub pid: u32,
    /// `gateway` or `reverse`.
    pub mode: Mode,
    /// Where it accepts control connections.
    pub listen: Vec<SocketAddr>,
    /// Reverse mode: the server it proxies to.
    pub upstream: Option<SocketAddr>,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// Sessions open now.
    pub sessions: usize,
    /// Sessions admitted since start.
    pub sessions_total: u64,
    /// `limits.max_sessions`.
    pub max_sessions: usize,
    /// Pinholes the daemon holds now.
    pub pinholes_open: u64,
    /// Pinholes installed since start.
    pub pinholes_opened: u64,
    /// `pinholes.timeout_secs`.
    pub pinhole_timeout_secs: u64,
    /// `pinholes.port_min..=port_max`.
    pub ports: (u16, u16),
    /// The metrics listener, if any.
    pub metrics: Option<SocketAddr>,
}

/// Why the CLI got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens at the socket: the daemon is not running (or uses another socket).
    #[error("ftp-alg is not running: cannot connect to {path}: {source}")]
    NotRunning {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The socket exists but this user may not use it.
    #[error("permission denied on {path}: the control socket is for root only")]
    PermissionDenied { path: PathBuf },
    /// The conversation failed half-way.
    #[error("talking to ftp-alg at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The answer was not one.
    #[error("unexpected answer from ftp-alg at {path}: {message}")]
    Protocol { path: PathBuf, message: String },
}

/// Errors setting up the server side.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another daemon answers at the path.
    #[error("another ftp-alg already serves {0}")]
    InUse(PathBuf),
    /// Something other than a socket is in the way; it is left alone.
    #[error("{0} exists and is not a socket; choose another control.socket")]
    NotASocket(PathBuf),
    /// The socket could not be created.
    #[error("cannot create the control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Send one request to the daemon at `socket` and read its answer.
pub async fn call(socket: &Path, request: &Request) -> Result<Answer, ClientError> {
    let io = |source| ClientError::Io {
        path: socket.to_owned(),
        source,
    };
    let stream = UnixStream::connect(socket).await.map_err(|source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            ClientError::PermissionDenied {
                path: socket.to_owned(),
            }
        } else {
            ClientError::NotRunning {
                path: socket.to_owned(),
                source,
            }
        }
    })?;
    let exchange = async {
        let (rx, mut tx) = stream.into_split();
        let mut line = serde_json::to_vec(request).map_err(|e| io(e.into()))?;
        line.push(b'\n');
        tx.write_all(&line).await.map_err(io)?;
        let mut answer = String::new();
        BufReader::new(rx)
            .read_line(&mut answer)
            .await
            .map_err(io)?;
        serde_json::from_str(&answer).map_err(|e| ClientError::Protocol {
            path: socket.to_owned(),
            message: format!("{e}: {answer:?}"),
        })
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| io(std::io::ErrorKind::TimedOut.into()))?
}

/// Create the socket at `path`, replacing a stale one, readable and writable by its owner
/// only.
pub async fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    let bind_error = |source| ServeError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(bind_error)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(bind_error)?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServeError::NotASocket(path.to_owned()));
        }
        if UnixStream::connect(path).await.is_ok() {
            return Err(ServeError::InUse(path.to_owned()));
        }
        // A socket left by a daemon that did not exit cleanly.
        std::fs::remove_file(path).map_err(bind_error)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    Ok(listener)
}

/// Create the socket at `path` for a daemon that took over from the one serving it there: that
/// one keeps answering on the socket it holds, which no longer has a name.
pub fn bind_replacing(path: &Path) -> Result<UnixListener, ServeError> {
    let bind_error = |source| ServeError::Bind {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ServeError::NotASocket(path.to_owned()))
        }
        Ok(_) => std::fs::remove_file(path).map_err(bind_error)?,
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    Ok(listener)
}

/// Answer requests on `listener` with `handle` until the task is dropped. A hand-over request
/// from root or the daemon's user is not answered here: its connection goes to `hand_over`.
pub async fn serve<H, F>(
    listener: UnixListener,
    handle: H,
    hand_over: tokio::sync::mpsc::Sender<UnixStream>,
) where
    H: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Answer> + Send,
{
    loop {
        let (stream, _) = crate::accept::next("control socket", || listener.accept()).await;
        let handle = handle.clone();
        let hand_over = hand_over.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, handle, hand_over).await {
                tracing::debug!(error = %e, "control request failed");
            }
        });
    }
}

async fn answer<H, F>(
    stream: UnixStream,
    handle: H,
    hand_over: tokio::sync::mpsc::Sender<UnixStream>,
) -> std::io::Result<()>
where
    H: Fn(Request) -> F,
    F: Future<Output = Answer>,
{
    let allowed = stream.peer_cred().map(|cred| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        cred.uid() == 0 || cred.uid() == me
    })?;
    let (rx, mut tx) = stream.into_split();
    // The request is read even from a caller who will be refused, so that the refusal reaches
    // it rather than a reset.
    let mut line = String::new();
    let mut reader = BufReader::new(rx).take(MAX_REQUEST);
    let request = match tokio::time::timeout(TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(_)) => serde_json::from_str::<Request>(&line)
            .map_err(|e| error(ErrorKind::BadRequest, format!("not a request: {e}"))),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
            Err(error(ErrorKind::BadRequest, "not a request: not UTF-8"))
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => Err(error(
            ErrorKind::BadRequest,
            "no request within the timeout",
        )),
    };
    let answer = match request {
        _ if !allowed => {
            tracing::warn!("control request from a user other than root refused");
            error(
                ErrorKind::PermissionDenied,
                "the control socket is for root only",
            )
        }
        Ok(Request::HandOver) => {
            tracing::info!("control request: hand-over to a new daemon process");
            // Nothing was read past the request line: the new process waits for the offer.
            let stream = reader
                .into_inner()
                .into_inner()
                .reunite(tx)
                .map_err(std::io::Error::other)?;
            return match hand_over.send(stream).await {
                Ok(()) => Ok(()),
                Err(_) => Err(std::io::Error::other("the daemon is not taking hand-overs")),
            };
        }
        Ok(request) => {
            // Orders are worth a line each; questions (`--watch` asks every second) are not.
            match request {
                Request::Status | Request::Sessions | Request::Pinholes => {
                    tracing::debug!(?request, "control request")
                }
                _ => tracing::info!(?request, "control request"),
            }
            handle(request).await
        }
        Err(refusal) => refusal,
    };
    let mut line = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
    line.push(b'\n');
    tx.write_all(&line).await
}

/// An [`Answer::Error`].
pub fn error(kind: ErrorKind, message: impl Into<String>) -> Answer {
    Answer::Error {
        kind,
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        for (request, wire) in [
            (Request::Status, r#"{"request":"status"}"#),
            (
                Request::KillSession { id: 7 },
                r#"{"request":"kill_session","id":7}"#,
            ),
            (
                Request::ClosePinhole { id: 3 },
                r#"{"request":"close_pinhole","id":3}"#,
            ),
            (Request::FlushPinholes, r#"{"request":"flush_pinholes"}"#),
        ] {
            assert_eq!(serde_json::to_string(&request).unwrap(), wire);
            assert_eq!(serde_json::from_str::<Request>(wire).unwrap(), request);
        }
    }

    #[tokio::test]
    async fn a_request_is_answered_and_garbage_is_refused() {
        let dir = std::env::temp_dir().join(format!("ftp-alg-control-{}", std::process::id()));
        let path = dir.join("control.sock");
        let listener = bind(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind(&path).await, Err(ServeError::InUse(_))));
        let (hand_over, mut handed) = tokio::sync::mpsc::channel(1);
        let server = tokio::spawn(serve(
            listener,
            |request| async move {
                match request {
                    Request::KillSession { id } => Answer::Killed { id },
                    _ => error(ErrorKind::NotFound, "nothing here"),
                }
            },
            hand_over,
        ));
        let answer = call(&path, &Request::KillSession { id: 9 }).await.unwrap();
        assert_eq!(answer, Answer::Killed { id: 9 });

        // A hand-over request is not answered here: its connection goes to the daemon.
        let mut asking = UnixStream::connect(&path).await.unwrap();
        asking
            .write_all(b"{\"request\":\"hand_over\"}\n")
            .await
            .unwrap();
        let mut given = tokio::time::timeout(Duration::from_secs(5), handed.recv())
            .await
            .unwrap()
            .unwrap();
        given.write_all(b"offer\n").await.unwrap();
        let mut offer = [0u8; 6];
        asking.read_exact(&mut offer).await.unwrap();
        assert_eq!(&offer, b"offer\n");

        let mut raw = UnixStream::connect(&path).await.unwrap();
        raw.write_all(b"{\"request\":\"reboot\"}\n").await.unwrap();
        let mut line = String::new();
        BufReader::new(raw).read_line(&mut line).await.unwrap();
        let answer: Answer = serde_json::from_str(&line).unwrap();
        assert!(
            matches!(
                answer,
                Answer::Error {
                    kind: ErrorKind::BadRequest,
                    ..
                }
            ),
            "{answer:?}"
        );
        let mut raw = UnixStream::connect(&path).await.unwrap();
        raw.write_all(b"\xff\xfe\n").await.unwrap();
        let mut line = String::new();
        BufReader::new(raw).read_line(&mut line).await.unwrap();
        assert!(line.contains("not UTF-8"), "{line:?}");
        server.abort();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            call(&path, &Request::Status).await,
            Err(ClientError::NotRunning { .. })
        ));
    }
}
