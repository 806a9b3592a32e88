//! The netlink transport: pinholes sent to nf_tables over a `NETLINK_NETFILTER` socket, with no
//! helper program.
//!
//! One transaction is one `send` of an nfnetlink batch: `NFNL_MSG_BATCH_BEGIN`, one
//! `NFT_MSG_NEWSETELEM` or `NFT_MSG_DELSETELEM` per `Change`, `NFNL_MSG_BATCH_END`. The kernel
//! applies the batch atomically, inside the send call, and has queued its answers on the socket
//! by the time the call returns, so a pinhole costs two system calls instead of an nft process.
//!
//! Elements are encoded as nft 1.0.6 encodes them (the tests compare with bytes captured from
//! nft), so `nft list` and `pinholes list` show them alike: concatenated keys with each field
//! padded to a 4-byte register, the timeout in milliseconds, and the label as the comment in
//! nftables' user-data TLV. The table itself is still loaded by nft ([`super::nft::load_table`]);
//! this module only adds and deletes elements.
//!
//! Written by hand on `libc`: the crates that speak nf_tables either bind the C library
//! libnftnl (a system library and pkg-config at build time) or are GPL-licensed with bindgen at
//! build time, and the generic netlink crates have no nf_tables set-element messages. Three
//! message types with a handful of attributes are less code than the glue to any of them.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::batch::{Change, Element, Transaction, Value, Verb};
use super::nft::TABLE;
use super::{BackendError, Firewall};

/// Constants of the kernel's UAPI headers (`linux/netlink.h`, `linux/netfilter/nfnetlink.h`,
/// `linux/netfilter/nf_tables.h`) and of libnftnl's `udata.h`, under their C names.
mod uapi {
    pub const NLMSG_HDRLEN: usize = 16;
    pub const NLMSG_ERROR: u16 = 2;
    pub const NLM_F_REQUEST: u16 = 0x1;
    pub const NLM_F_ACK: u16 = 0x4;
    pub const NLM_F_CREATE: u16 = 0x400;
    pub const NLA_F_NESTED: u16 = 0x8000;
    pub const NETLINK_CAP_ACK: libc::c_int = 10;

    pub const NFNETLINK_V0: u8 = 0;
    pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
    pub const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
    pub const NFNL_MSG_BATCH_END: u16 = 0x11;
    pub const NFPROTO_UNSPEC: u8 = 0;
    pub const NFPROTO_INET: u8 = 1;

    pub const NFT_MSG_NEWSETELEM: u16 = 12;
    pub const NFT_MSG_GETSETELEM: u16 = 13;
    pub const NFT_MSG_DELSETELEM: u16 = 14;
    pub const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
    pub const NFTA_SET_ELEM_LIST_SET: u16 = 2;
    pub const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
    pub const NFTA_LIST_ELEM: u16 = 1;
    pub const NFTA_SET_ELEM_KEY: u16 = 1;
    pub const NFTA_SET_ELEM_DATA: u16 = 2;
    pub const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
    pub const NFTA_SET_ELEM_USERDATA: u16 = 6;
    pub const NFTA_SET_ELEM_KEY_END: u16 = 10;
    pub const NFTA_DATA_VALUE: u16 = 1;

    pub const NFTNL_UDATA_SET_ELEM_COMMENT: u8 = 0;
    pub const NFTNL_UDATA_COMMENT_MAXLEN: usize = 128;
}

/// Longest wait for the kernel's answer to a batch, as for an nft run. The answer is queued
/// during the send call, so this only bounds the damage of a kernel that behaves otherwise.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Send and receive buffer of the socket: a batch must fit in the send buffer whole, and the
/// largest (512 requests of up to three elements, each added, deleted and added again) is
/// about 1 MiB; errors for many of its messages must fit in the receive buffer.
const SOCKET_BUFFER: libc::c_int = 4 << 20;
/// Receive buffer for one answer: with `NETLINK_CAP_ACK` an error carries only the header of
/// the message it answers, far less than this.
const ANSWER_BUFFER: usize = 8192;

/// Start a [`Firewall`] that applies pinholes over a netlink socket of its own.
pub fn backend() -> Result<Firewall, BackendError> {
    Ok(Firewall::start(Netlink::open()?))
}

/// An open `NETLINK_NETFILTER` socket and its sequence numbers.
struct Netlink {
    socket: AsyncFd<OwnedFd>,
    next_seq: u32,
    answer: Vec<u8>,
}

/// A new non-blocking NETLINK_NETFILTER socket (nf_tables requests and change notifications).
pub(crate) fn netfilter_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the descriptor it returns is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn os_error(action: &str, error: &io::Error) -> BackendError {
    BackendError::Netlink {
        action: action.to_owned(),
        errno: error.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// Set an integer socket option; whether the kernel took it.
pub(crate) fn set_option(
    socket: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> bool {
    // SAFETY: the pointer and length describe `value`, which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

impl Netlink {
    /// Open the socket; needs a tokio runtime.
    fn open() -> Result<Netlink, BackendError> {
        let socket =
            netfilter_socket().map_err(|e| os_error("opening a NETLINK_NETFILTER socket", &e))?;
        // Errors then echo only the header of the failed message, not the whole message.
        // Older kernels lack the option; the answers are then longer, and still parsed.
        set_option(&socket, libc::SOL_NETLINK, uapi::NETLINK_CAP_ACK, 1);
        // The FORCE options exceed the system-wide maximum, which CAP_NET_ADMIN (needed for
        // nf_tables anyway) allows; without it the plain options get what the system allows,
        // and a batch too large for that is refused with EMSGSIZE and retried request by
        // request.
        for (force, plain) in [
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        ] {
            if !set_option(&socket, libc::SOL_SOCKET, force, SOCKET_BUFFER) {
                set_option(&socket, libc::SOL_SOCKET, plain, SOCKET_BUFFER);
            }
        }
        // SAFETY: an OwnedFd keeps its descriptor open and always reports the same one while
        // the AsyncFd owns it.
        let socket = unsafe { AsyncFd::register(socket) }.map_err(|e| {
            os_error(
                "registering the netlink socket with tokio",
                &io::Error::from(e),
            )
        })?;
        Ok(Netlink {
            socket,
            next_seq: 1,
            answer: vec![0; ANSWER_BUFFER],
        })
    }

    async fn send(&self, batch: &[u8]) -> Result<(), BackendError> {
        let sent = self
            .socket
            .async_io(Interest::WRITABLE, |socket| {
                // SAFETY: the pointer and length describe `batch`, which outlives the call.
                let n = unsafe {
                    libc::send(socket.as_raw_fd(), batch.as_ptr().cast(), batch.len(), 0)
                };
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            })
            .await
            .map_err(|e| os_error("sending the batch", &e))?;
        if sent != batch.len() {
            // A netlink datagram goes whole or not at all; this would be a kernel bug.
            return Err(os_error(
                "sending the batch",
                &io::Error::from_raw_os_error(libc::EMSGSIZE),
            ));
        }
        Ok(())
    }

    /// Receive one datagram into `self.answer`; its length.
    ///
    /// ENOBUFS means answers were dropped because the receive buffer was full. Only errors come
    /// in numbers (a batch that succeeds is answered once), so the batch has failed.
    async fn receive(&mut self) -> Result<usize, BackendError> {
        let answer = &mut self.answer;
        let received = self
            .socket
            .async_io(Interest::READABLE, |socket| {
                // SAFETY: the pointer and length describe `answer`, which outlives the call.
                let n = unsafe {
                    libc::recv(
                        socket.as_raw_fd(),
                        answer.as_mut_ptr().cast(),
                        answer.len(),
                        0,
                    )
                };
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            })
            .await
            .map_err(|e| os_error("receiving the kernel's answer", &e))?;
        Ok(received.min(answer.len()))
    }

    /// Read answers until the batch that began with sequence number `begin` is settled.
    ///
    /// The kernel answers a message of a batch when it fails or when it asks for an
    /// acknowledgement (`NLM_F_ACK`), in message order, once the whole batch has been
    /// processed; a failure of the batch as a whole (such as a commit that runs out of memory)
    /// is an error answering the batch's begin message, sent before the others. Only the last
    /// change asks for an acknowledgement: its answer comes after every error of the batch, so
    /// it settles the batch, and a batch that succeeds costs one answer, not one per message.
    async fn settle(&mut self, begin: u32, changes: &[Change]) -> Result<(), BackendError> {
        let count = u32::try_from(changes.len()).unwrap_or(u32::MAX);
        let mut failure = None;
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        loop {
            let n = tokio::time::timeout_at(deadline, self.receive())
                .await
                .map_err(|_| BackendError::Netlink {
                    action: format!(
                        "waiting {} s for the kernel's answer",
                        ANSWER_TIMEOUT.as_secs()
                    ),
                    errno: libc::ETIMEDOUT,
                })??;
            for (seq, errno) in answers(&self.answer[..n]) {
                // Sequence numbers run on from batch to batch: anything outside this batch's
                // answers an earlier one that was settled before all its answers were read.
                let index = seq.wrapping_sub(begin);
                if index > count {
                    continue;
                }
                if errno != 0 && failure.is_none() {
                    let action = match index.checked_sub(1).and_then(|i| changes.get(i as usize)) {
                        Some(change) => describe(change),
                        None => format!("applying a batch of {} changes", changes.len()),
                    };
                    failure = Some(BackendError::Netlink { action, errno });
                }
                if index == count || (index == 0 && errno != 0) {
                    return failure.map_or(Ok(()), Err);
                }
            }
        }
    }
}

impl Netlink {
    /// Read the answers to the gets numbered from `first`, one per element: an acknowledgement
    /// (after the element itself, which is not read) when the element is there, ENOENT when it
    /// is not.
    async fn gather(
        &mut self,
        first: u32,
        elements: &[Element],
    ) -> Result<Vec<bool>, BackendError> {
        let mut found: Vec<Option<bool>> = vec![None; elements.len()];
        let mut left = elements.len();
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        while left > 0 {
            let n = tokio::time::timeout_at(deadline, self.receive())
                .await
                .map_err(|_| BackendError::Netlink {
                    action: "waiting for the kernel's answer to a get".to_owned(),
                    errno: libc::ETIMEDOUT,
                })??;
            for (seq, errno) in answers(&self.answer[..n]) {
                let index = seq.wrapping_sub(first) as usize;
                let Some(slot) = found.get_mut(index).filter(|slot| slot.is_none()) else {
                    continue;
                };
                *slot = Some(match errno {
                    0 => true,
                    libc::ENOENT => false,
                    errno => {
                        return Err(BackendError::Netlink {
                            action: format!("get element inet {TABLE} {}", elements[index]),
                            errno,
                        })
                    }
                });
                left -= 1;
            }
        }
        Ok(found.into_iter().map(|f| f == Some(true)).collect())
    }
}

impl Transaction for Netlink {
    fn commit(
        &mut self,
        changes: &[Change],
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        let begin = self.next_seq;
        let batch = encode(changes, begin);
        // Begin, one message per change, end.
        let used = u32::try_from(changes.len()).map_or(u32::MAX, |n| n.saturating_add(2));
        self.next_seq = begin.wrapping_add(used);
        async move {
            if changes.is_empty() {
                return Ok(());
            }
            self.send(&batch?).await?;
            self.settle(begin, changes).await
        }
    }

    /// One `NFT_MSG_GETSETELEM` per element, all in one datagram. Gets are not batched
    /// messages: the kernel answers each in turn, during the send call.
    fn present(
        &mut self,
        elements: &[Element],
    ) -> impl Future<Output = Result<Vec<bool>, BackendError>> + Send {
        let first = self.next_seq;
        let used = u32::try_from(elements.len()).unwrap_or(u32::MAX);
        self.next_seq = first.wrapping_add(used);
        let request = encode_gets(elements, first);
        async move {
            if elements.is_empty() {
                return Ok(Vec::new());
            }
            self.send(&request?).await?;
            self.gather(first, elements).await
        }
    }
}

/// A get of each element (its key only), numbered from `first`, each asking for an
/// acknowledgement so that a found element is answered too.
fn encode_gets(elements: &[Element], first: u32) -> Result<Vec<u8>, BackendError> {
    let mut w = Writer::default();
    let kind = (uapi::NFNL_SUBSYS_NFTABLES << 8) | uapi::NFT_MSG_GETSETELEM;
    for (i, e) in elements.iter().enumerate() {
        let seq = first.wrapping_add(u32::try_from(i).unwrap_or(u32::MAX));
        w.message(kind, uapi::NLM_F_ACK, seq, uapi::NFPROTO_INET, 0, |w| {
            w.string(uapi::NFTA_SET_ELEM_LIST_TABLE, TABLE)?;
            w.string(uapi::NFTA_SET_ELEM_LIST_SET, e.set)?;
            w.nest(uapi::NFTA_SET_ELEM_LIST_ELEMENTS, |w| {
                w.nest(uapi::NFTA_LIST_ELEM, |w| {
                    w.nest(uapi::NFTA_SET_ELEM_KEY, |w| {
                        w.attr(uapi::NFTA_DATA_VALUE, &key(e))
                    })
                })
            })
        })?;
    }
    Ok(w.buf)
}

/// What a change does, as the nft command that would do it.
fn describe(change: &Change) -> String {
    let verb = match change.verb {
        Verb::Add => "add",
        Verb::Delete => "delete",
    };
    format!("{verb} element inet {TABLE} {}", change.element)
}

/// (sequence number, errno) of each error message in a datagram; errno 0 is an
/// acknowledgement. Anything else, or anything malformed, is skipped.
fn answers(datagram: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while let Some(header) = rest.get(..uapi::NLMSG_HDRLEN) {
        let word = |at: usize| [header[at], header[at + 1], header[at + 2], header[at + 3]];
        let len = u32::from_ne_bytes(word(0)) as usize;
        if len < uapi::NLMSG_HDRLEN || len > rest.len() {
            break;
        }
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        let seq = u32::from_ne_bytes(word(8));
        if kind == uapi::NLMSG_ERROR {
            if let Some(error) = rest.get(uapi::NLMSG_HDRLEN..uapi::NLMSG_HDRLEN + 4) {
                let error = i32::from_ne_bytes([error[0], error[1], error[2], error[3]]);
                out.push((seq, error.saturating_neg()));
            }
        }
        rest = rest.get(align(len)..).unwrap_or_default();
    }
    out
}

/// Netlink aligns messages and attributes to 4 bytes.
fn align(len: usize) -> usize {
    len.div_ceil(4) * 4
}

/// The batch for `changes`: its begin message has sequence number `begin`, each change the
/// next one, then the end message. Only the last change asks for an acknowledgement (see
/// [`Netlink::settle`]).
fn encode(changes: &[Change], begin: u32) -> Result<Vec<u8>, BackendError> {
    let mut w = Writer::default();
    let batch_marker = |w: &mut Writer, kind, seq| {
        // The subsystem the batch is for travels big-endian in the res_id field.
        w.message(
            kind,
            0,
            seq,
            uapi::NFPROTO_UNSPEC,
            uapi::NFNL_SUBSYS_NFTABLES,
            |_| Ok(()),
        )
    };
    batch_marker(&mut w, uapi::NFNL_MSG_BATCH_BEGIN, begin)?;
    let mut seq = begin;
    for (i, change) in changes.iter().enumerate() {
        seq = seq.wrapping_add(1);
        let ack = if i + 1 == changes.len() {
            uapi::NLM_F_ACK
        } else {
            0
        };
        encode_change(&mut w, change, seq, ack)?;
    }
    batch_marker(&mut w, uapi::NFNL_MSG_BATCH_END, seq.wrapping_add(1))?;
    Ok(w.buf)
}

/// One NEWSETELEM or DELSETELEM message carrying one element.
fn encode_change(
    w: &mut Writer,
    change: &Change,
    seq: u32,
    flags: u16,
) -> Result<(), BackendError> {
    let e = &change.element;
    let (kind, flags) = match change.verb {
        // CREATE without EXCL: adding an element that is there already is not an error.
        Verb::Add => (uapi::NFT_MSG_NEWSETELEM, flags | uapi::NLM_F_CREATE),
        Verb::Delete => (uapi::NFT_MSG_DELSETELEM, flags),
    };
    let user_data = if change.verb == Verb::Add {
        Some(comment(e)?)
    } else {
        None
    };
    let kind = (uapi::NFNL_SUBSYS_NFTABLES << 8) | kind;
    w.message(kind, flags, seq, uapi::NFPROTO_INET, 0, |w| {
        w.string(uapi::NFTA_SET_ELEM_LIST_TABLE, TABLE)?;
        w.string(uapi::NFTA_SET_ELEM_LIST_SET, e.set)?;
        w.nest(uapi::NFTA_SET_ELEM_LIST_ELEMENTS, |w| {
            w.nest(uapi::NFTA_LIST_ELEM, |w| {
                if user_data.is_some() {
                    let millis = u64::from(e.timeout_secs) * 1000;
                    w.attr(uapi::NFTA_SET_ELEM_TIMEOUT, &millis.to_be_bytes())?;
                }
                w.nest(uapi::NFTA_SET_ELEM_KEY, |w| {
                    w.attr(uapi::NFTA_DATA_VALUE, &key(e))
                })?;
                // A range in an interval set with a concatenated key (a window) is its first
                // and its last key.
                if let Some(last) = e.last_port {
                    w.nest(uapi::NFTA_SET_ELEM_KEY_END, |w| {
                        w.attr(uapi::NFTA_DATA_VALUE, &key_with_port(e, last))
                    })?;
                }
                if let Some(user_data) = &user_data {
                    if let Some(value) = &e.value {
                        w.nest(uapi::NFTA_SET_ELEM_DATA, |w| {
                            w.attr(uapi::NFTA_DATA_VALUE, &value_data(value))
                        })?;
                    }
                    w.attr(uapi::NFTA_SET_ELEM_USERDATA, user_data)?;
                }
                Ok(())
            })
        })
    })
}

/// The key `source . address . port`: each field in network byte order, padded with zeros to
/// a multiple of 4 bytes (nf_tables registers), as nft concatenates.
fn key(e: &Element) -> Vec<u8> {
    key_with_port(e, e.dest.port())
}

/// The key with another port in its last field: a range's last key.
fn key_with_port(e: &Element, last: u16) -> Vec<u8> {
    let mut key = address(e.source);
    key.extend(address(e.dest.ip()));
    key.extend(port(last));
    key
}

fn value_data(value: &Value) -> Vec<u8> {
    match value {
        Value::Endpoint(to) => {
            let mut data = address(to.ip());
            data.extend(port(to.port()));
            data
        }
        Value::Address(from) => address(*from),
    }
}

fn address(ip: std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    }
}

fn port(port: u16) -> [u8; 4] {
    let [high, low] = port.to_be_bytes();
    [high, low, 0, 0]
}

/// The element's comment as nft stores it: a user-data TLV (type, length of one byte each) of
/// the NUL-terminated text, which nft and `pinholes list` read back.
fn comment(e: &Element) -> Result<Vec<u8>, BackendError> {
    let text = e.comment.as_bytes();
    if text.len() >= uapi::NFTNL_UDATA_COMMENT_MAXLEN || text.contains(&0) {
        return Err(BackendError::Invalid(format!(
            "element comment longer than {} bytes or with a NUL byte: {:?}",
            uapi::NFTNL_UDATA_COMMENT_MAXLEN - 1,
            e.comment
        )));
    }
    let mut tlv = vec![uapi::NFTNL_UDATA_SET_ELEM_COMMENT];
    // Shorter than NFTNL_UDATA_COMMENT_MAXLEN, so the length fits in its byte.
    tlv.push((text.len() + 1) as u8);
    tlv.extend_from_slice(text);
    tlv.push(0);
    Ok(tlv)
}

/// Appends netlink messages and attributes to one buffer, in host byte order where netlink
/// wants it, filling in each length once its contents are written.
#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// A message with the nfnetlink header (family, version, res_id) and the body `f` writes.
    fn message(
        &mut self,
        kind: u16,
        flags: u16,
        seq: u32,
        family: u8,
        res_id: u16,
        f: impl FnOnce(&mut Writer) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf
            .extend_from_slice(&(uapi::NLM_F_REQUEST | flags).to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&[family, uapi::NFNETLINK_V0]);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        f(self)?;
        let len = u32::try_from(self.buf.len() - start).map_err(|_| too_long())?;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        Ok(())
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> Result<(), BackendError> {
        let len = u16::try_from(4 + data.len()).map_err(|_| too_long())?;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align(self.buf.len()), 0);
        Ok(())
    }

    /// A NUL-terminated string attribute.
    fn string(&mut self, kind: u16, text: &str) -> Result<(), BackendError> {
        let mut data = Vec::with_capacity(text.len() + 1);
        data.extend_from_slice(text.as_bytes());
        data.push(0);
        self.attr(kind, &data)
    }

    /// A nested attribute holding what `f` writes.
    fn nest(
        &mut self,
        kind: u16,
        f: impl FnOnce(&mut Writer) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        f(self)?;
        let len = u16::try_from(self.buf.len() - start).map_err(|_| too_long())?;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.buf[start + 2..start + 4].copy_from_slice(&(uapi::NLA_F_NESTED | kind).to_ne_bytes());
        Ok(())
    }
}

fn too_long() -> BackendError {
    BackendError::Invalid("netlink attribute longer than 64 KiB".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pinhole::batch::{
        elements,
        tests::{pinhole, window},
    };

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// nft's batch turned into ours, which differs in two ways. nft names the set by its
    /// transaction id as well as by name (`NFTA_SET_ELEM_LIST_SET_ID`, so that a set created in
    /// the same batch can be found); the kernel finds an existing set by name, so ours has no
    /// id. And ours asks for an acknowledgement of its last change (see [`Netlink::settle`]).
    fn as_we_send(nft: &[u8]) -> Vec<u8> {
        let mut messages = Vec::new();
        let mut rest = nft;
        while !rest.is_empty() {
            let len = u32::from_ne_bytes(rest[..4].try_into().unwrap()) as usize;
            let (message, tail) = rest.split_at(align(len));
            rest = tail;
            let mut message = message.to_vec();
            let kind = u16::from_ne_bytes([message[4], message[5]]);
            if kind >> 8 == uapi::NFNL_SUBSYS_NFTABLES {
                let mut kept = message[..20].to_vec();
                let mut attrs = &message[20..];
                while !attrs.is_empty() {
                    let attr_len = align(usize::from(u16::from_ne_bytes([attrs[0], attrs[1]])));
                    let attr_kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
                    if attr_kind != 4 {
                        kept.extend_from_slice(&attrs[..attr_len]);
                    }
                    attrs = &attrs[attr_len..];
                }
                let len = kept.len() as u32;
                kept[..4].copy_from_slice(&len.to_ne_bytes());
                kept[6] |= uapi::NLM_F_ACK as u8;
                message = kept;
            }
            messages.extend(message);
        }
        messages
    }

    fn change(verb: Verb, element: Element) -> Change {
        Change { verb, element }
    }

    /// Bytes nft 1.0.6 sent (strace -e trace=sendmsg -e write=3) for
    /// `nft add element inet ftp_alg pin_v4 { 198.18.0.2 . 198.18.0.1 . 61000 timeout 30s
    /// comment "session=3 client=198.18.0.2 server=203.0.113.2" }`.
    const NFT_ADD_PIN_V4: &str = concat!(
        "140000001000010000000000000000000000000a940000000c0a01040100000000000000010000000c0001006674705f",
        "616c67000b00020070696e5f763400000800040000000002600003805c0001800c000400000000000000753014000180",
        "10000100c6120002c6120001ee48000035000600002f73657373696f6e3d3320636c69656e743d3139382e31382e302e",
        "32207365727665723d3230332e302e3131332e3200000000140000001100010002000000000000000000000a",
    );

    /// `nft add element inet ftp_alg dnat_v4 { 198.18.0.2 . 198.18.0.1 . 61000 timeout 30s
    /// comment "session=3 client=198.18.0.2 server=203.0.113.2" : 203.0.113.2 . 40000 }`.
    const NFT_ADD_DNAT_V4: &str = concat!(
        "140000001000010000000000000000000000000aa40000000c0a01040100000000000000010000000c0001006674705f",
        "616c67000c000200646e61745f7634000800040000000004700003806c0001800c000400000000000000753014000180",
        "10000100c6120002c6120001ee480000100002800c000100cb0071029c40000035000600002f73657373696f6e3d3320",
        "636c69656e743d3139382e31382e302e32207365727665723d3230332e302e3131332e32000000001400000011000100",
        "02000000000000000000000a",
    );

    /// `nft add element inet ftp_alg snat_v6 { 2001:db8:a::2 . 2001:db8:b::1 . 61000 timeout 1h
    /// comment "session=42 client=2001:db8:a::2 server=2001:db8:b::2" : 2001:db8:b::1 }`.
    const NFT_ADD_SNAT_V6: &str = concat!(
        "140000001000010000000000000000000000000ac80000000c0a01040100000000000000010000000c0001006674705f",
        "616c67000c000200736e61745f763600080004000000000794000380900001800c000400000000000036ee802c000180",
        "2800010020010db8000a0000000000000000000220010db8000b00000000000000000001ee4800001800028014000100",
        "20010db8000b000000000000000000013b000600003573657373696f6e3d343220636c69656e743d323030313a646238",
        "3a613a3a32207365727665723d323030313a6462383a623a3a320000140000001100010002000000000000000000000a",
    );

    /// `nft delete element inet ftp_alg pin_v4 { 198.18.0.2 . 198.18.0.1 . 61000 }`.
    const NFT_DELETE_PIN_V4: &str = concat!(
        "140000001000010000000000000000000000000a480000000e0a01000100000000000000010000000c0001006674705f",
        "616c67000b00020070696e5f763400001c000380180001801400018010000100c6120002c6120001ee48000014000000",
        "1100010002000000000000000000000a",
    );

    /// `nft add element inet ftp_alg win_v4 { 198.18.0.2 . 203.0.113.2 . 1024-65535 timeout 30s
    /// comment "session=3 client=198.18.0.2 server=203.0.113.2" : 203.0.113.1 }`.
    const NFT_ADD_WIN_V4: &str = concat!(
        "140000001000010000000000000000000000000ab40000000c0a01040100000000000000010000000c0001006674705f",
        "616c67000b00020077696e5f763400000800040000000003800003807c0001800c000400000000000000753014000180",
        "10000100c6120002cb0071020400000014000a8010000100c6120002cb007102ffff00000c00028008000100cb007101",
        "35000600002f73657373696f6e3d3320636c69656e743d3139382e31382e302e32207365727665723d3230332e302e31",
        "31332e3200000000140000001100010002000000000000000000000a",
    );

    /// `nft delete element inet ftp_alg win_v4 { 198.18.0.2 . 203.0.113.2 . 1024-65535 }`.
    const NFT_DELETE_WIN_V4: &str = concat!(
        "140000001000010000000000000000000000000a5c0000000e0a01000100000000000000010000000c0001006674705f",
        "616c67000b00020077696e5f76340000300003802c0001801400018010000100c6120002cb0071020400000014000a80",
        "10000100c6120002cb007102ffff0000140000001100010002000000000000000000000a",
    );

    #[test]
    fn a_window_is_encoded_as_nft_encodes_a_range() {
        let [mut window] = <[Element; 1]>::try_from(elements(&window()).unwrap()).unwrap();
        window.comment = "session=3 client=198.18.0.2 server=203.0.113.2".into();
        assert_eq!(
            encode(&[change(Verb::Add, window.clone())], 0).unwrap(),
            as_we_send(&hex(NFT_ADD_WIN_V4))
        );
        assert_eq!(
            encode(&[change(Verb::Delete, window)], 0).unwrap(),
            as_we_send(&hex(NFT_DELETE_WIN_V4))
        );
    }

    #[test]
    fn set_and_map_elements_are_encoded_as_nft_encodes_them() {
        let [mut pin, mut dnat, _] =
            <[Element; 3]>::try_from(elements(&pinhole()).unwrap()).unwrap();
        // The fixtures were recorded with the label alone; the owner's pid varies by run.
        for element in [&mut pin, &mut dnat] {
            element.comment = "session=3 client=198.18.0.2 server=203.0.113.2".into();
        }
        assert_eq!(
            encode(&[change(Verb::Add, pin.clone())], 0).unwrap(),
            as_we_send(&hex(NFT_ADD_PIN_V4))
        );
        assert_eq!(
            encode(&[change(Verb::Add, dnat)], 0).unwrap(),
            as_we_send(&hex(NFT_ADD_DNAT_V4))
        );
        assert_eq!(
            encode(&[change(Verb::Delete, pin)], 0).unwrap(),
            as_we_send(&hex(NFT_DELETE_PIN_V4))
        );
        let snat_v6 = Element {
            set: "snat_v6",
            source: "2001:db8:a::2".parse().unwrap(),
            dest: "[2001:db8:b::1]:61000".parse().unwrap(),
            last_port: None,
            value: Some(Value::Address("2001:db8:b::1".parse().unwrap())),
            timeout_secs: 3600,
            comment: "session=42 client=2001:db8:a::2 server=2001:db8:b::2".to_owned(),
        };
        assert_eq!(
            encode(&[change(Verb::Add, snat_v6)], 0).unwrap(),
            as_we_send(&hex(NFT_ADD_SNAT_V6))
        );
    }

    /// (type, flags, seq) of each message of a batch.
    fn headers(batch: &[u8]) -> Vec<(u16, u16, u32)> {
        let mut out = Vec::new();
        let mut rest = batch;
        while !rest.is_empty() {
            let len = u32::from_ne_bytes(rest[..4].try_into().unwrap()) as usize;
            out.push((
                u16::from_ne_bytes([rest[4], rest[5]]),
                u16::from_ne_bytes([rest[6], rest[7]]),
                u32::from_ne_bytes(rest[8..12].try_into().unwrap()),
            ));
            rest = &rest[len..];
        }
        out
    }

    #[test]
    fn a_batch_numbers_its_messages_and_asks_to_acknowledge_the_last() {
        let [pin, dnat, snat] = <[Element; 3]>::try_from(elements(&pinhole()).unwrap()).unwrap();
        let changes = [
            change(Verb::Add, pin),
            change(Verb::Delete, dnat),
            change(Verb::Add, snat),
        ];
        let (new, del) = (0x0a0c, 0x0a0e);
        assert_eq!(
            headers(&encode(&changes, u32::MAX).unwrap()),
            [
                (0x10, 0x1, u32::MAX),
                (new, 0x401, 0),
                (del, 0x1, 1),
                (new, 0x405, 2),
                (0x11, 0x1, 3),
            ]
        );
    }

    #[test]
    fn answers_are_read_from_error_messages() {
        let error = |seq: u32, errno: i32| {
            let mut m = 36u32.to_ne_bytes().to_vec();
            m.extend(uapi::NLMSG_ERROR.to_ne_bytes());
            m.extend(0x100u16.to_ne_bytes());
            m.extend(seq.to_ne_bytes());
            m.extend(0u32.to_ne_bytes());
            m.extend((-errno).to_ne_bytes());
            m.extend([0; 16]);
            m
        };
        let mut datagram = error(7, libc::ENOENT);
        datagram.extend(error(9, 0));
        assert_eq!(answers(&datagram), [(7, libc::ENOENT), (9, 0)]);
        // A truncated or garbled message ends the reading, without a panic.
        assert_eq!(answers(&datagram[..40]), [(7, libc::ENOENT)]);
        assert!(answers(&[0xff; 7]).is_empty());
        assert!(answers(&[0; 64]).is_empty());
    }

    #[test]
    fn a_comment_too_long_for_nft_is_refused() {
        let [mut pin, ..] = <[Element; 3]>::try_from(elements(&pinhole()).unwrap()).unwrap();
        pin.comment = "x".repeat(uapi::NFTNL_UDATA_COMMENT_MAXLEN);
        assert!(matches!(
            encode(&[change(Verb::Add, pin)], 0),
            Err(BackendError::Invalid(_))
        ));
    }

    /// The longest label a daemon can write: the largest process id Linux hands out
    /// (`pid_max` is at most 2^22), a session id no run reaches (10^12: a thousand sessions a
    /// second for 31 years; ids count up from 1), and two IPv6 addresses that do not shorten.
    #[test]
    fn the_longest_label_fits_in_a_comment() {
        let label = crate::pinhole::Label {
            session: 999_999_999_999,
            client: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap(),
            server: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe".parse().unwrap(),
        };
        assert!(label.to_comment(1 << 22).len() < uapi::NFTNL_UDATA_COMMENT_MAXLEN);
    }
}
