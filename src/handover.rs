//! Hand-over: a new daemon process takes the listening sockets of the running one, so that a
//! restart (a binary upgrade, a configuration change SIGHUP cannot apply) refuses no client and
//! cuts no session.
//!
//! The new process (`ftp-alg run --take-over`) connects to the running daemon's control socket
//! and asks for a hand-over. The running daemon answers with one JSON line naming its listeners,
//! and their file descriptors alongside (SCM_RIGHTS). The new process takes them, says
//! `confirm`, and starts accepting at once; only then does the old process stop accepting. While
//! both hold the sockets, a connection is accepted by one of them or waits in the listen
//! backlog: none is refused. The old process then serves its open sessions to their natural
//! end (bounded by `limits.handover_grace_secs`), removes its own pinholes, and exits.
//!
//! The file descriptors travel with `sendmsg`/`recvmsg` written here by hand: std's
//! `SocketAncillary` is unstable, and two calls do not justify a large dependency.
//!
//! Not here: what the daemons do before and after (daemon.rs), the nftables table that both
//! generations share (`pinhole::nft::prepare_table`).

use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long either side waits for the other during the exchange.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// More listening sockets than a daemon has (its listen addresses and the metrics listener).
const MAX_FDS: usize = 32;
/// The request line, as the control API's JSON form of `Request::HandOver`.
const REQUEST: &str = "{\"request\":\"hand_over\"}\n";
/// What the new process says once it holds the sockets.
const CONFIRM: &str = "confirm\n";

/// What the old process hands over: the addresses, in the order of the descriptors that travel
/// with this message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The old process's id, for logs.
    pub pid: u32,
    /// The FTP listeners' addresses.
    pub listeners: Vec<SocketAddr>,
    /// The metrics listener's address, if it has one (its descriptor comes last).
    pub metrics: Option<SocketAddr>,
}

/// A listening socket the new process received.
#[derive(Debug)]
pub struct Received {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The socket.
    pub fd: OwnedFd,
}

/// What the new process took over.
#[derive(Debug)]
pub struct Taken {
    /// The old process's id.
    pub pid: u32,
    /// Its FTP listeners.
    pub listeners: Vec<Received>,
    /// Its metrics listener.
    pub metrics: Option<Received>,
    /// The connection to the old process: [`Taken::confirm`] tells it to stop accepting.
    stream: UnixStream,
}

/// Why a hand-over did not happen.
#[derive(Debug, thiserror::Error)]
pub enum HandOverError {
    /// No daemon answers at the control socket.
    #[error("no running ftp-alg answers at {path}: {source}")]
    NotRunning { path: String, source: io::Error },
    /// The exchange failed half-way.
    #[error("hand-over: {0}")]
    Io(#[from] io::Error),
    /// The other side said something else than the protocol.
    #[error("hand-over: unexpected message: {0}")]
    Protocol(String),
}

/// New process: ask the daemon at `socket` for its listeners.
pub fn take(socket: &Path) -> Result<Taken, HandOverError> {
    let stream = UnixStream::connect(socket).map_err(|source| HandOverError::NotRunning {
        path: socket.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    stream.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
    (&stream).write_all(REQUEST.as_bytes())?;
    let mut buf = vec![0u8; 64 * 1024];
    let (len, mut fds) = recv_with_fds(&stream, &mut buf)?;
    let text = buf.get(..len).unwrap_or_default();
    let line = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let offer: Offer = serde_json::from_slice(line).map_err(|e| {
        HandOverError::Protocol(format!("{e}: {:?}", String::from_utf8_lossy(text)))
    })?;
    let expected = offer.listeners.len() + usize::from(offer.metrics.is_some());
    if fds.len() != expected {
        return Err(HandOverError::Protocol(format!(
            "{} descriptors for {expected} listeners",
            fds.len()
        )));
    }
    let metrics = match offer.metrics {
        Some(addr) => fds.pop().map(|fd| Received { addr, fd }),
        None => None,
    };
    let listeners = offer
        .listeners
        .iter()
        .zip(fds)
        .map(|(&addr, fd)| Received { addr, fd })
        .collect();
    Ok(Taken {
        pid: offer.pid,
        listeners,
        metrics,
        stream,
    })
}

impl Taken {
    /// Tell the old process that the sockets are taken: it stops accepting.
    pub fn confirm(self) -> io::Result<()> {
        (&self.stream).write_all(CONFIRM.as_bytes())
    }
}

/// Old process: offer `listeners` (and the metrics listener) on `stream`, the connection on
/// which the hand-over was asked, and wait for the new process to confirm. Blocking: call it
/// from a blocking task.
pub fn give(
    stream: UnixStream,
    offer: &Offer,
    listeners: &[RawFd],
    metrics: Option<RawFd>,
) -> Result<(), HandOverError> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    stream.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
    let mut line = serde_json::to_vec(offer).map_err(io::Error::other)?;
    line.push(b'\n');
    let fds: Vec<RawFd> = listeners.iter().copied().chain(metrics).collect();
    send_with_fds(&stream, &line, &fds)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    if answer == CONFIRM {
        Ok(())
    } else {
        Err(HandOverError::Protocol(format!(
            "{answer:?} instead of confirm"
        )))
    }
}

/// The path of this process's executable file. After a package upgrade has replaced the file,
/// the kernel names the old one `PATH (deleted)`; the path then holds the new binary.
fn executable() -> io::Result<(std::path::PathBuf, bool)> {
    let link = std::fs::read_link("/proc/self/exe")?;
    let text = link.to_string_lossy();
    match text.strip_suffix(" (deleted)") {
        Some(path) => Ok((std::path::PathBuf::from(path), true)),
        None => Ok((link.clone(), false)),
    }
}

/// Whether the executable file this process runs has been replaced since it started (an
/// upgrade): then a reload hands over to the new binary.
pub fn binary_replaced() -> bool {
    executable().is_ok_and(|(_, replaced)| replaced)
}

/// Start the executable file (the new binary after an upgrade) as `run --config CONFIG
/// --take-over`: it takes this process's listeners over. It shares this process's standard
/// output and error (the journal under systemd) and environment (`NOTIFY_SOCKET`, with which it
/// tells systemd it is the service's main process now). Its id.
pub fn spawn_successor(config: &Path) -> io::Result<u32> {
    let (exe, _) = executable()?;
    let child = std::process::Command::new(exe)
        .arg("run")
        .arg("--config")
        .arg(config)
        .arg("--take-over")
        // systemd's watchdog names the main process; the successor is about to become it.
        .env_remove("WATCHDOG_PID")
        .stdin(std::process::Stdio::null())
        .spawn()?;
    Ok(child.id())
}

/// `sendmsg` of `data` with `fds` as SCM_RIGHTS.
fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::other("too many descriptors to hand over"));
    }
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at a buffer of CMSG_SPACE(fd_bytes) bytes, so the first
        // header and its data (fd_bytes) fit in it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
    }
    // SAFETY: msg is fully initialised and its buffers live until the call returns.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    match usize::try_from(sent) {
        Ok(n) if n == data.len() => Ok(()),
        Ok(_) => Err(io::Error::other("short send of the hand-over offer")),
        Err(_) => Err(io::Error::last_os_error()),
    }
}

/// `recvmsg` into `buf`, taking ownership of the descriptors that came with it.
fn recv_with_fds(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let fd_bytes = MAX_FDS * std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg describes buffers that live until the call returns; MSG_CMSG_CLOEXEC keeps
    // the received descriptors from leaking into the nft processes the daemon starts.
    let received = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    let len = usize::try_from(received).map_err(|_| io::Error::last_os_error())?;
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with well-formed headers, walked with the CMSG
    // macros; each SCM_RIGHTS payload is an array of descriptors that are now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..payload / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("hand-over descriptors truncated"));
    }
    Ok((len, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// Listeners cross a socket pair and still accept: a connection to the original address
    /// is accepted on the received descriptor.
    #[test]
    fn listeners_cross_with_their_addresses() {
        let (old_side, new_side) = UnixStream::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let offer = Offer {
            pid: 42,
            listeners: vec![addr],
            metrics: None,
        };
        let fd = listener.as_fd().as_raw_fd();
        let giver = std::thread::spawn(move || give(old_side, &offer, &[fd], None));
        new_side.set_read_timeout(Some(EXCHANGE_TIMEOUT)).unwrap();
        let mut buf = vec![0u8; 4096];
        let (len, fds) = recv_with_fds(&new_side, &mut buf).unwrap();
        let offer: Offer = serde_json::from_slice(&buf[..len - 1]).unwrap();
        assert_eq!(offer.listeners, vec![addr]);
        assert_eq!(fds.len(), 1);
        (&new_side).write_all(CONFIRM.as_bytes()).unwrap();
        giver.join().unwrap().unwrap();
        drop(listener);
        let received = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        let _client = std::net::TcpStream::connect(addr).unwrap();
        received.accept().unwrap();
    }
}
