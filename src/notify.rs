//! systemd's service notification protocol (`sd_notify(3)`), for `Type=notify` units: READY=1
//! once the table is loaded and every listener is bound, STATUS= lines with the sessions and
//! pinholes, WATCHDOG=1 keep-alives when the unit sets `WatchdogSec=`, RELOADING=1 around a
//! SIGHUP reload and STOPPING=1 at shutdown.
//!
//! The protocol is one Unix datagram of `KEY=value` lines to the socket named in
//! `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`); without the
//! variable every call does nothing, so the daemon runs the same outside systemd. It is written
//! here rather than taken from a crate: it is a dozen lines over std's `UnixDatagram`, which
//! knows abstract addresses, and the `sd-notify` crate would add a dependency for no more.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The environment variable that names systemd's notification socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` is set but names no usable socket address.
    #[error("NOTIFY_SOCKET={value:?} is not a socket path or an @abstract name")]
    BadAddress { value: String },
    /// Sending the datagram failed.
    #[error("notifying systemd at {value:?}: {source}")]
    Send { value: String, source: io::Error },
}

/// A channel to the service manager; `None` inside when not started by one.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(SocketAddr, String)>,
    socket: Option<UnixDatagram>,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` asks for. The variable is left in the environment: nothing
    /// the daemon starts (nft) reads it.
    pub fn from_env() -> Result<Notifier, NotifyError> {
        match std::env::var(NOTIFY_SOCKET) {
            Ok(value) if !value.is_empty() => Notifier::to(&value),
            _ => Ok(Notifier::disabled()),
        }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            socket: None,
        }
    }

    /// A notifier for the socket `value` names (a path, or `@name` for an abstract socket).
    pub fn to(value: &str) -> Result<Notifier, NotifyError> {
        let bad = || NotifyError::BadAddress {
            value: value.to_owned(),
        };
        let address = match value.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
            None if value.starts_with('/') => SocketAddr::from_pathname(value),
            None => return Err(bad()),
        }
        .map_err(|_| bad())?;
        let socket = UnixDatagram::unbound().map_err(|source| NotifyError::Send {
            value: value.to_owned(),
            source,
        })?;
        Ok(Notifier {
            target: Some((address, value.to_owned())),
            socket: Some(socket),
        })
    }

    /// Whether notifications go anywhere.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Send `state` (newline-separated `KEY=value` assignments) as one datagram.
    pub fn notify(&self, state: &str) -> Result<(), NotifyError> {
        let (Some((address, value)), Some(socket)) = (&self.target, &self.socket) else {
            return Ok(());
        };
        socket
            .send_to_addr(state.as_bytes(), address)
            .map(|_| ())
            .map_err(|source| NotifyError::Send {
                value: value.clone(),
                source,
            })
    }

    /// [`Notifier::notify`], logging a failure instead of returning it: a service manager
    /// that stopped listening is no reason to stop serving.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.notify(state) {
            tracing::warn!(error = %e, "cannot notify the service manager");
        }
    }
}

/// How often to send WATCHDOG=1: half of `$WATCHDOG_USEC`, as `sd_watchdog_enabled(3)`
/// advises, when it is set for this process (`$WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// How often STATUS= is refreshed.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(10);

/// Until the task is aborted: STATUS= (from `status`) every [`STATUS_INTERVAL`], and
/// WATCHDOG=1 at [`watchdog_interval`] if the unit has a watchdog. The keep-alive comes from
/// the daemon's one runtime thread, so a runtime that stops turning stops it too.
pub async fn heartbeat(notifier: std::sync::Arc<Notifier>, status: impl Fn() -> String) {
    let watchdog = watchdog_interval();
    let every = watchdog.map_or(STATUS_INTERVAL, |w| w.min(STATUS_INTERVAL));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match watchdog {
            Some(_) => notifier.send(&format!("WATCHDOG=1\n{}", status())),
            None => notifier.send(&status()),
        }
    }
}

/// The STATUS= line systemctl shows.
pub fn status_line(sessions: usize, pinholes: u64) -> String {
    format!("STATUS={sessions} sessions, {pinholes} pinholes open")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_reach_a_path_socket_and_an_abstract_one() {
        let dir = std::env::temp_dir().join(format!("ftp-alg-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        let abstract_name = format!("ftp-alg-notify-test-{}", std::process::id());
        let abstract_listener = UnixDatagram::bind_addr(
            &SocketAddr::from_abstract_name(abstract_name.as_bytes()).unwrap(),
        )
        .unwrap();
        for (value, socket) in [
            (path.to_string_lossy().into_owned(), &listener),
            (format!("@{abstract_name}"), &abstract_listener),
        ] {
            let notifier = Notifier::to(&value).unwrap();
            assert!(notifier.enabled());
            notifier.notify("READY=1\nSTATUS=ok").unwrap();
            let mut buf = [0u8; 64];
            let n = socket.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"READY=1\nSTATUS=ok", "{value}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_relative_address_is_refused_and_none_sends_nothing() {
        assert!(matches!(
            Notifier::to("relative/path"),
            Err(NotifyError::BadAddress { .. })
        ));
        let off = Notifier::disabled();
        assert!(!off.enabled());
        off.notify("READY=1").unwrap();
    }
}
