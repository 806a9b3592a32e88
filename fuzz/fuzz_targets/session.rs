//! The session state machine driven by a hostile client and server at once.
//!
//! Input: two bytes of configuration (see [`context`]), then steps, each a tag byte and its
//! operands: client data or server data (a length byte, then that many bytes), a pinhole
//! opened (two bytes: its port) or failed, end of the client's or of the server's stream, or
//! a well-formed announcement (see [`announcement`]). Steps come in any order, including
//! pinhole results nobody asked for and data after an end of stream: the session is a public
//! API and must not panic whatever its caller does.
//!
//! The announcement step is there because raw bytes alone seldom make one that the session
//! acts on (a PORT naming the client at a port of at least 1024, after a login): in a 20 s run
//! from an empty corpus, libFuzzer found none, and the checks below went unexercised.
//!
//! Checked after every step, on all the actions that come out:
//! - every pinhole joins the session's own client and server, at a data port of at least
//!   1024: whatever either peer says, no pinhole leads to a third host or a service port;
//! - nothing comes out between an `Open` and its result (the rewritten announcement must not
//!   overtake its pinhole), unless the server has closed and the session is winding down;
//! - every `Close` names pinholes that are open, each once.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use ftp_alg::config::{AuthPolicy, ForeignPasv, ForeignPort, Mode, PolicyConfig};
use ftp_alg::ftp::hostport::{encode_eprt, encode_host_port};
use ftp_alg::pinhole::{Opened, PinholeId};
use ftp_alg::session::{Action, Session, SessionContext, Side};
use libfuzzer_sys::fuzz_target;

/// The lowest data port a pinhole may lead to (the session's own constant is private).
const MIN_DATA_PORT: u16 = 1024;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let (Some(flags), Some(limits)) = (input.byte(), input.byte()) else {
        return;
    };
    let ctx = context(flags, limits);
    let mut watch = Watch {
        peers: [ctx.client.ip(), ctx.server.ip()],
        awaiting_open: false,
        server_closed: false,
        open: Vec::new(),
    };
    let mut session = Session::new(ctx);
    let mut next_id: PinholeId = 0;
    while let Some(tag) = input.byte() {
        match tag % 7 {
            0 => session.handle_client_data(input.chunk()),
            1 => session.handle_server_data(input.chunk()),
            2 => {
                next_id += 1;
                let dial_port = u16::from_be_bytes([input.byte_or_0(), input.byte_or_0()]);
                if std::mem::take(&mut watch.awaiting_open) {
                    watch.open.push(next_id);
                }
                session.handle_opened(Some(Opened {
                    id: next_id,
                    dial_port,
                }));
            }
            3 => {
                watch.awaiting_open = false;
                session.handle_opened(None);
            }
            4 => session.handle_eof(Side::Client),
            5 => {
                watch.server_closed = true;
                session.handle_eof(Side::Server);
            }
            _ => {
                let kind = input.byte_or_0();
                let port = u16::from_be_bytes([input.byte_or_0(), input.byte_or_0()]);
                match announcement(session.context(), kind, port) {
                    (Side::Client, line) => session.handle_client_data(&line),
                    (Side::Server, line) => session.handle_server_data(&line),
                }
            }
        }
        watch.drain(&mut session);
    }
});

/// The session's addresses and policy, from two bytes.
///
/// `flags`: bit 0 reverse mode; bit 1 `data_before_login`; bit 2 `foreign_port = "replace"`;
/// bit 3 `foreign_pasv = "refuse"`; bit 4 `auth = "transparent"`; bit 5 `read_only`; bits 6-7
/// the address families: all IPv4 (as in session.rs's tests), all IPv6, an IPv4 client with an
/// IPv6 server side, or all IPv4 but for an IPv6 address to announce in 227s. The mixed ones
/// reach the family checks, which a single family never does.
///
/// `limits`: bits 0-1 the pinholes a session may hold (1 to 4, so that the cap is reached);
/// bits 2-3 the longest line (32 to 256 bytes, so that over-long lines are common); bit 4 a
/// window for TLS (`policy.tls_window`, in a gateway that passes AUTH on).
fn context(flags: u8, limits: u8) -> SessionContext {
    let mode = if flags & 1 == 0 {
        Mode::Gateway
    } else {
        Mode::Reverse
    };
    let policy = PolicyConfig {
        data_before_login: flags & 2 != 0,
        foreign_port: if flags & 4 == 0 {
            ForeignPort::Refuse
        } else {
            ForeignPort::Replace
        },
        foreign_pasv: if flags & 8 == 0 {
            ForeignPasv::Replace
        } else {
            ForeignPasv::Refuse
        },
        auth: if flags & 16 == 0 {
            AuthPolicy::Refuse
        } else {
            AuthPolicy::Transparent
        },
        read_only: flags & 32 != 0,
        tls_window: mode == Mode::Gateway && flags & 16 != 0 && limits & 16 != 0,
        ..PolicyConfig::default()
    };
    let (client, client_local, server, upstream_local, announce) = match flags >> 6 {
        0 => (
            "198.18.0.2:50000",
            "198.18.0.1:21",
            "203.0.113.2:21",
            "203.0.113.1:45000",
            None,
        ),
        1 => (
            "[2001:db8:c::2]:50000",
            "[2001:db8:c::1]:21",
            "[2001:db8:5::2]:21",
            "[2001:db8:5::1]:45000",
            None,
        ),
        2 => (
            "198.18.0.2:50000",
            "198.18.0.1:21",
            "[2001:db8:5::2]:21",
            "[2001:db8:5::1]:45000",
            None,
        ),
        _ => (
            "198.18.0.2:50000",
            "198.18.0.1:21",
            "203.0.113.2:21",
            "203.0.113.1:45000",
            Some("2001:db8:a::1"),
        ),
    };
    let addr = |s: &str| s.parse::<SocketAddr>().expect("a valid address");
    SessionContext {
        id: 1,
        mode,
        client: addr(client),
        client_local: addr(client_local),
        server: addr(server),
        upstream_local: addr(upstream_local),
        announce: announce.map(|ip| ip.parse().expect("a valid address")),
        max_line: 32 << ((limits >> 2) & 3),
        policy: Arc::new(policy),
        max_pinholes: 1 + usize::from(limits & 3),
        max_windows: 1,
        tls: None,
    }
}

/// A PORT, EPRT, 227 or 229 line (`kind` bits 0-1) naming `port` and a host (bits 2-3): the
/// session's client, its server, a third host, or the unspecified address, in the family of
/// the session's client. A PORT or 227 cannot carry IPv6, and names the third IPv4 host then.
fn announcement(ctx: &SessionContext, kind: u8, port: u16) -> (Side, Vec<u8>) {
    let third_v4 = Ipv4Addr::new(192, 0, 2, 99);
    let (third, unspecified) = match ctx.client.ip() {
        IpAddr::V4(_) => (IpAddr::V4(third_v4), IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        IpAddr::V6(_) => (
            "2001:db8:99::1".parse().expect("a valid address"),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ),
    };
    let host = [ctx.client.ip(), ctx.server.ip(), third, unspecified][usize::from(kind >> 2 & 3)];
    let v4 = SocketAddrV4::new(
        match host {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(_) => third_v4,
        },
        port,
    );
    let (side, line) = match kind & 3 {
        0 => (Side::Client, format!("PORT {}", encode_host_port(v4))),
        1 => (
            Side::Client,
            format!("EPRT {}", encode_eprt(SocketAddr::new(host, port))),
        ),
        2 => (
            Side::Server,
            format!("227 Entering Passive Mode ({}).", encode_host_port(v4)),
        ),
        _ => (
            Side::Server,
            format!("229 Entering Extended Passive Mode (|||{port}|)"),
        ),
    };
    (side, format!("{line}\r\n").into_bytes())
}

/// The steps not yet read.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    /// A truncated input ends with zeros rather than being thrown away: its steps so far
    /// still count.
    fn byte_or_0(&mut self) -> u8 {
        self.byte().unwrap_or(0)
    }

    /// A length byte, then up to that many bytes.
    fn chunk(&mut self) -> &'a [u8] {
        let len = usize::from(self.byte_or_0()).min(self.0.len());
        let (chunk, rest) = self.0.split_at(len);
        self.0 = rest;
        chunk
    }
}

/// What the checks need to know of the session so far, as its proxy would.
struct Watch {
    /// The session's client and server: the only hosts a pinhole may join.
    peers: [IpAddr; 2],
    /// An `Open` came out and its result has not been reported.
    awaiting_open: bool,
    /// The server's end of stream was reported.
    server_closed: bool,
    /// Pinholes opened and not closed yet.
    open: Vec<PinholeId>,
}

impl Watch {
    fn drain(&mut self, session: &mut Session) {
        while let Some(action) = session.poll_action() {
            assert!(
                !self.awaiting_open || self.server_closed,
                "{action:?} came out before the pinhole's result"
            );
            match action {
                Action::Open(r) => {
                    assert!(self.peers.contains(&r.source), "{r:?}");
                    let target = r.dnat.map_or(r.dial_ip, |d| d.ip());
                    assert!(self.peers.contains(&target), "{r:?}");
                    assert!(r.dial_port.is_none_or(|p| p >= MIN_DATA_PORT), "{r:?}");
                    assert!(r.dnat.is_none_or(|d| d.port() >= MIN_DATA_PORT), "{r:?}");
                    self.awaiting_open = true;
                }
                Action::OpenWindow(w) => {
                    assert!(self.peers.contains(&w.label.client), "{w:?}");
                    assert!(self.peers.contains(&w.label.server), "{w:?}");
                    self.awaiting_open = true;
                }
                Action::Close(ids) => {
                    for id in ids {
                        let index = self.open.iter().position(|&o| o == id);
                        let index = index.unwrap_or_else(|| panic!("closes {id}, not open"));
                        self.open.swap_remove(index);
                    }
                }
                _ => {}
            }
        }
    }
}
