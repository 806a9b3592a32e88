//! The sans-IO core of `sniff`: TCP segments of FTP control connections in, data endpoint
//! announcements out.
//!
//! [`FlowTable`] keeps, per control connection (keyed by its TCP 4-tuple), one
//! [`LineBuffer`] per direction, the next expected sequence number of each direction and the
//! server's [`ReplyTracker`], so that a line split across segments is still found, a
//! retransmitted segment is not read twice, and a reply-like line inside a multi-line reply
//! is not taken for a reply. Lines are parsed with the proxy's own parsers ([`Command`],
//! [`PassiveReply`]): sniff sees what ftp-alg would see.
//!
//! The table is bounded: at most `max_flows` connections (the least recently active one is
//! dropped for a new one), and [`FlowTable::expire`] drops connections idle for longer than
//! `idle`. Dropping a connection loses at most a partial line and an open multi-line reply;
//! its next segment starts it again. Time is passed in; nothing here reads a clock.
//!
//! Not here: capturing, parsing frames ([`super::packet`]), pinholes ([`super::report`]).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ftp::framing::text_of;
use crate::ftp::{Command, LineBuffer, PassiveReply, ReplyPosition, ReplyTracker};

use super::packet::Segment;

/// An FTP control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Flow {
    /// The end that sends commands.
    pub client: SocketAddr,
    /// The end on a control port, that sends replies.
    pub server: SocketAddr,
}

/// Which kind of line announced a data endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    /// The client's PORT: it listens there (active mode).
    #[serde(rename = "PORT")]
    Port,
    /// The client's EPRT: it listens there (active mode).
    #[serde(rename = "EPRT")]
    Eprt,
    /// The server's 227 reply to PASV: it listens there (passive mode).
    #[serde(rename = "227")]
    Pasv,
    /// The server's 229 reply to EPSV: it listens on this port of its control address.
    #[serde(rename = "229")]
    Epsv,
}

impl Kind {
    /// As printed: the verb or the reply code.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Port => "PORT",
            Kind::Eprt => "EPRT",
            Kind::Pasv => "227",
            Kind::Epsv => "229",
        }
    }
}

/// A data endpoint announced on a control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announcement {
    /// The control connection.
    pub flow: Flow,
    /// The line that announced it.
    pub kind: Kind,
    /// Where the data connection is to go: a 229 names only a port, of the server's control
    /// address (RFC 2428 §3).
    pub endpoint: SocketAddr,
}

/// What a segment revealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// The client sent PASV or EPSV: a 227 or 229 is likely to follow on this connection.
    /// (A gateway installs the pinhole just before it forwards that reply, and the transfer
    /// that follows may be over a few milliseconds later: it is worth looking at once.)
    PassiveRequested(Flow),
    /// A data endpoint was announced.
    Announced(Announcement),
    /// TLS started on this connection: the server accepted AUTH (234), or the client's first
    /// bytes were a TLS record (implicit FTPS). Nothing later on it can be read, so no
    /// announcement of it can be checked here.
    TlsStarted(Flow),
}

/// Limits of a [`FlowTable`].
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most connections tracked at once.
    pub max_flows: usize,
    /// A connection without a segment for this long is forgotten.
    pub idle: Duration,
    /// Longest line, in bytes before its LF (see [`LineBuffer::new`]).
    pub max_line: usize,
}

/// The control connections seen on an interface.
#[derive(Debug)]
pub struct FlowTable {
    control_ports: BTreeSet<u16>,
    limits: Limits,
    flows: HashMap<Flow, FlowState>,
}

#[derive(Debug)]
struct FlowState {
    to_server: Direction,
    to_client: Direction,
    replies: ReplyTracker,
    last_seen: Instant,
    /// TLS has started: the bytes are not read as lines any more.
    encrypted: bool,
    /// The client has sent payload before (a TLS record as its very first bytes is implicit
    /// FTPS; an FTP client's first bytes are a command).
    client_spoke: bool,
}

/// One direction of a connection.
#[derive(Debug)]
struct Direction {
    lines: LineBuffer,
    /// The sequence number of the next byte not yet read; `None` until the first segment.
    next_seq: Option<u32>,
    fin: bool,
}

impl Direction {
    fn new(max_line: usize) -> Direction {
        Direction {
            lines: LineBuffer::new(max_line),
            next_seq: None,
            fin: false,
        }
    }

    /// The part of `payload` (starting at sequence number `seq`) that has not been read yet.
    ///
    /// A segment that starts before the next expected byte is a retransmission: the bytes
    /// already read are skipped, and a segment holding nothing new is dropped. One that starts
    /// after it means bytes were lost (by the capture: the kernel drops packets when sniff
    /// falls behind): the line in progress is broken, so it is dropped and reading goes on
    /// from this segment. The first segment of a direction is taken to start a line, since
    /// FTP peers write one line (or a whole reply) per segment; a wrong guess garbles one
    /// line, which then parses as nothing.
    fn unread<'a>(&mut self, seq: u32, payload: &'a [u8], max_line: usize) -> &'a [u8] {
        // A segment's payload fits in an IP packet, far below 2^31 bytes.
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let end = seq.wrapping_add(len);
        let Some(next) = self.next_seq else {
            self.next_seq = Some(end);
            return payload;
        };
        // Serial number arithmetic (RFC 1982): how far `seq` lies ahead of `next`.
        let ahead = seq.wrapping_sub(next) as i32;
        if ahead > 0 {
            self.lines = LineBuffer::new(max_line);
            self.next_seq = Some(end);
            return payload;
        }
        let seen = usize::try_from(ahead.unsigned_abs()).unwrap_or(usize::MAX);
        match payload.get(seen..) {
            Some(new) if !new.is_empty() => {
                self.next_seq = Some(end);
                new
            }
            _ => &[],
        }
    }
}

impl FlowState {
    fn new(now: Instant, max_line: usize) -> FlowState {
        FlowState {
            to_server: Direction::new(max_line),
            to_client: Direction::new(max_line),
            replies: ReplyTracker::new(),
            last_seen: now,
            encrypted: false,
            client_spoke: false,
        }
    }
}

impl FlowTable {
    /// A table for connections to any of `control_ports`, in either direction.
    pub fn new(control_ports: impl IntoIterator<Item = u16>, limits: Limits) -> FlowTable {
        FlowTable {
            control_ports: control_ports.into_iter().collect(),
            limits,
            flows: HashMap::new(),
        }
    }

    /// Whether a segment between these ports may belong to a control connection: worth
    /// handing to [`FlowTable::handle`].
    pub fn is_control(&self, src_port: u16, dst_port: u16) -> bool {
        self.control_ports.contains(&src_port) || self.control_ports.contains(&dst_port)
    }

    /// Connections tracked.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no connection is tracked.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Read one segment seen at `now`; what it announced.
    pub fn handle(&mut self, now: Instant, seg: &Segment<'_>) -> Vec<Observation> {
        let as_request = Flow {
            client: seg.src,
            server: seg.dst,
        };
        let as_reply = Flow {
            client: seg.dst,
            server: seg.src,
        };
        // A connection already tracked keeps its orientation, which matters when both ports
        // are control ports (a proxy's port 2121 talking to a server's 21).
        let (flow, to_server) = if self.flows.contains_key(&as_request) {
            (as_request, true)
        } else if self.flows.contains_key(&as_reply) {
            (as_reply, false)
        } else if self.control_ports.contains(&seg.dst.port()) {
            (as_request, true)
        } else if self.control_ports.contains(&seg.src.port()) {
            (as_reply, false)
        } else {
            return Vec::new();
        };
        if seg.rst {
            self.flows.remove(&flow);
            return Vec::new();
        }
        let max_line = self.limits.max_line;
        if seg.syn && to_server {
            // A new connection on this 4-tuple: nothing of an old one applies.
            self.flows.remove(&flow);
        }
        if !self.flows.contains_key(&flow) {
            // Connections are tracked from their first byte of payload (or SYN): a stray ACK
            // or FIN costs no memory.
            if seg.payload.is_empty() && !seg.syn {
                return Vec::new();
            }
            self.make_room();
            self.flows.insert(flow, FlowState::new(now, max_line));
        }
        let Some(state) = self.flows.get_mut(&flow) else {
            return Vec::new();
        };
        state.last_seen = now;
        let direction = if to_server {
            &mut state.to_server
        } else {
            &mut state.to_client
        };
        let mut seen = Vec::new();
        if seg.syn {
            // The SYN takes one sequence number; data starts after it.
            *direction = Direction::new(max_line);
            direction.next_seq = Some(seg.seq.wrapping_add(1));
        } else {
            let new = direction.unread(seg.seq, seg.payload, max_line);
            if to_server && !state.client_spoke && !new.is_empty() {
                state.client_spoke = true;
                if new.first() == Some(&TLS_HANDSHAKE) && !state.encrypted {
                    state.encrypted = true;
                    seen.push(Observation::TlsStarted(flow));
                }
            }
            direction.lines.push(new);
        }
        direction.fin |= seg.fin;
        while let Some(line) = direction.lines.next_line().filter(|_| !state.encrypted) {
            // An over-long line is no PORT or 227 the peer would act on; framing goes on.
            let Ok(line) = line else { continue };
            let text = text_of(&line);
            let observed = if to_server {
                command(flow, &text)
            } else {
                reply(flow, &text, &mut state.replies)
            };
            state.encrypted |= matches!(observed, Some(Observation::TlsStarted(_)));
            seen.extend(observed);
        }
        if state.encrypted {
            // Ciphertext: never read as lines, and never held.
            state.to_server.lines.take_pending();
            state.to_client.lines.take_pending();
        }
        if state.to_server.fin && state.to_client.fin {
            self.flows.remove(&flow);
        }
        seen
    }

    /// Forget connections idle since before `now - idle`.
    pub fn expire(&mut self, now: Instant) {
        let idle = self.limits.idle;
        self.flows
            .retain(|_, state| now.saturating_duration_since(state.last_seen) < idle);
    }

    /// Drop the least recently active connections until one more fits.
    fn make_room(&mut self) {
        while self.flows.len() >= self.limits.max_flows.max(1) {
            let oldest = self
                .flows
                .iter()
                .min_by_key(|(_, state)| state.last_seen)
                .map(|(flow, _)| *flow);
            match oldest {
                Some(flow) => self.flows.remove(&flow),
                None => return,
            };
        }
    }
}

/// A client line: PORT and EPRT announce, PASV and EPSV ask for an announcement.
fn command(flow: Flow, text: &[u8]) -> Option<Observation> {
    let announced = |kind, endpoint| {
        Observation::Announced(Announcement {
            flow,
            kind,
            endpoint,
        })
    };
    match Command::parse(text) {
        Command::Port(addr) => Some(announced(Kind::Port, addr.into())),
        Command::Eprt(addr) => Some(announced(Kind::Eprt, addr)),
        Command::Pasv | Command::Epsv(_) => Some(Observation::PassiveRequested(flow)),
        Command::BadArgument { .. } | Command::Other { .. } => None,
    }
}

/// The first byte of a TLS handshake record (RFC 8446 §5.1, `handshake(22)`).
const TLS_HANDSHAKE: u8 = 0x16;

/// A server line: a one-line 227 or 229 reply announces, a one-line 234 starts TLS. As in the proxy, lines of a
/// multi-line reply are text, whatever they look like.
fn reply(flow: Flow, text: &[u8], replies: &mut ReplyTracker) -> Option<Observation> {
    let classified = replies.classify(text);
    if classified.position != ReplyPosition::Single {
        return None;
    }
    if classified.code == Some(234) {
        return Some(Observation::TlsStarted(flow));
    }
    let (kind, endpoint) = match PassiveReply::parse(text).ok()? {
        PassiveReply::Pasv { addr, .. } => (Kind::Pasv, addr.into()),
        PassiveReply::Epsv { port, .. } => (Kind::Epsv, SocketAddr::new(flow.server.ip(), port)),
    };
    Some(Observation::Announced(Announcement {
        flow,
        kind,
        endpoint,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ftp::framing::DEFAULT_MAX_LINE;
    use proptest::prelude::*;

    const CLIENT: &str = "198.18.0.2:40000";
    const SERVER: &str = "203.0.113.2:21";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn limits() -> Limits {
        Limits {
            max_flows: 16,
            idle: Duration::from_secs(60),
            max_line: DEFAULT_MAX_LINE,
        }
    }

    fn table() -> FlowTable {
        FlowTable::new([21, 2121], limits())
    }

    fn seg<'a>(src: &str, dst: &str, seq: u32, payload: &'a [u8]) -> Segment<'a> {
        Segment {
            src: addr(src),
            dst: addr(dst),
            seq,
            syn: false,
            fin: false,
            rst: false,
            payload,
        }
    }

    fn announced(client: &str, server: &str, kind: Kind, endpoint: &str) -> Observation {
        Observation::Announced(Announcement {
            flow: Flow {
                client: addr(client),
                server: addr(server),
            },
            kind,
            endpoint: addr(endpoint),
        })
    }

    /// Feeds `stream` from `src` to `dst` in the given pieces, consecutive in sequence space.
    fn feed(t: &mut FlowTable, src: &str, dst: &str, pieces: &[&[u8]]) -> Vec<Observation> {
        let now = Instant::now();
        let mut seq = 1000u32;
        let mut out = Vec::new();
        for piece in pieces {
            out.extend(t.handle(now, &seg(src, dst, seq, piece)));
            seq = seq.wrapping_add(piece.len() as u32);
        }
        out
    }

    fn flow() -> Flow {
        Flow {
            client: addr(CLIENT),
            server: addr(SERVER),
        }
    }

    /// After a 234 nothing more is read on the connection: ciphertext that happens to hold
    /// a PORT or a 227 announces nothing.
    #[test]
    fn a_234_ends_reading_the_connection() {
        let mut t = table();
        let now = Instant::now();
        assert_eq!(
            t.handle(now, &seg(CLIENT, SERVER, 1, b"AUTH TLS\r\n")),
            vec![]
        );
        assert_eq!(
            t.handle(
                now,
                &seg(SERVER, CLIENT, 1, b"234 Proceed.\r\n227 (1,2,3,4,5,6)\r\n")
            ),
            vec![Observation::TlsStarted(flow())]
        );
        let later = [
            t.handle(now, &seg(CLIENT, SERVER, 11, b"PORT 198,18,0,2,195,81\r\n")),
            t.handle(now, &seg(SERVER, CLIENT, 50, b"227 (203,0,113,2,4,1)\r\n")),
        ];
        assert_eq!(later, [vec![], vec![]]);
    }

    /// A client whose first bytes are a TLS handshake record speaks implicit FTPS.
    #[test]
    fn a_client_hello_first_is_implicit_tls() {
        let mut t = table();
        let got = feed(
            &mut t,
            CLIENT,
            SERVER,
            &[b"\x16\x03\x01\x02\x00PORT 198,18,0,2,195,81\r\n"],
        );
        assert_eq!(got, vec![Observation::TlsStarted(flow())]);
        // An FTP client's first bytes are a command, whatever follows.
        let mut t = table();
        let got = feed(&mut t, CLIENT, SERVER, &[b"NOOP\r\n", b"\x16\x03"]);
        assert_eq!(got, vec![]);
    }

    #[test]
    fn port_and_eprt_from_the_client() {
        let mut t = table();
        let got = feed(
            &mut t,
            CLIENT,
            SERVER,
            &[b"PORT 198,18,0,2,195,81\r\nEPRT |1|198.18.0.2|50002|\r\n"],
        );
        assert_eq!(
            got,
            [
                announced(CLIENT, SERVER, Kind::Port, "198.18.0.2:50001"),
                announced(CLIENT, SERVER, Kind::Eprt, "198.18.0.2:50002"),
            ]
        );
    }

    #[test]
    fn passive_replies_from_the_server() {
        let mut t = table();
        let got = feed(
            &mut t,
            SERVER,
            CLIENT,
            &[b"227 Entering Passive Mode (203,0,113,2,156,65).\r\n229 Entering Extended Passive Mode (|||40002|)\r\n"],
        );
        assert_eq!(
            got,
            [
                announced(CLIENT, SERVER, Kind::Pasv, "203.0.113.2:40001"),
                announced(CLIENT, SERVER, Kind::Epsv, "203.0.113.2:40002"),
            ]
        );
    }

    #[test]
    fn passive_requests_are_reported() {
        let mut t = table();
        let got = feed(&mut t, CLIENT, SERVER, &[b"pasv\r\nEPSV\r\nEPSV ALL\r\n"]);
        let flow = Flow {
            client: addr(CLIENT),
            server: addr(SERVER),
        };
        assert_eq!(got, [Observation::PassiveRequested(flow); 3]);
    }

    #[test]
    fn a_line_split_across_segments_is_found_at_every_cut() {
        let line = b"227 Entering Passive Mode (203,0,113,2,156,65)\r\n";
        for cut in 0..=line.len() {
            let mut t = table();
            let (a, b) = line.split_at(cut);
            let got = feed(&mut t, SERVER, CLIENT, &[a, b]);
            assert_eq!(
                got,
                [announced(CLIENT, SERVER, Kind::Pasv, "203.0.113.2:40001")],
                "cut at {cut}"
            );
        }
        // Byte by byte too.
        let mut t = table();
        let pieces: Vec<&[u8]> = line.chunks(1).collect();
        assert_eq!(
            feed(&mut t, SERVER, CLIENT, &pieces),
            [announced(CLIENT, SERVER, Kind::Pasv, "203.0.113.2:40001")]
        );
    }

    #[test]
    fn both_directions_of_one_connection_share_a_flow() {
        let mut t = table();
        let now = Instant::now();
        let mut got = t.handle(now, &seg(CLIENT, SERVER, 1, b"PORT 198,18,0,2,195,81\r\n"));
        got.extend(t.handle(
            now,
            &seg(SERVER, CLIENT, 9, b"200 ok\r\n227 (203,0,113,2,1,2)\r\n"),
        ));
        assert_eq!(t.len(), 1);
        assert_eq!(
            got,
            [
                announced(CLIENT, SERVER, Kind::Port, "198.18.0.2:50001"),
                announced(CLIENT, SERVER, Kind::Pasv, "203.0.113.2:258"),
            ]
        );
    }

    #[test]
    fn ipv6_eprt_and_229() {
        let c = "[2001:db8:a::2]:40000";
        let s = "[2001:db8:b::2]:21";
        let mut t = table();
        let mut got = feed(&mut t, c, s, &[b"EPRT |2|2001:db8:a::2|50001|\r\n"]);
        got.extend(feed(&mut t, s, c, &[b"229 Extended (!!!40003!)\r\n"]));
        assert_eq!(
            got,
            [
                announced(c, s, Kind::Eprt, "[2001:db8:a::2]:50001"),
                announced(c, s, Kind::Epsv, "[2001:db8:b::2]:40003"),
            ]
        );
    }

    #[test]
    fn extra_control_port_and_both_ports_control_ports() {
        let mut t = table();
        // A client of ftp-alg's own listener.
        let got = feed(
            &mut t,
            CLIENT,
            "198.18.0.1:2121",
            &[b"PORT 198,18,0,2,195,81\r\n"],
        );
        assert_eq!(got.len(), 1);
        // 2121 -> 21: the first segment's destination is the server, and stays so when the
        // reply comes back from port 21 to port 2121.
        let (a, b) = ("198.18.0.1:2121", "203.0.113.2:21");
        let mut got = feed(&mut t, a, b, &[b"PASV\r\n"]);
        got.extend(feed(&mut t, b, a, &[b"227 (203,0,113,2,1,2)\r\n"]));
        assert_eq!(
            got[1],
            announced(a, b, Kind::Pasv, "203.0.113.2:258"),
            "{got:?}"
        );
        // Not a control port at all.
        assert!(feed(
            &mut t,
            CLIENT,
            "203.0.113.2:8021",
            &[b"PORT 1,2,3,4,5,6\r\n"]
        )
        .is_empty());
    }

    #[test]
    fn retransmissions_are_read_once() {
        let mut t = table();
        let now = Instant::now();
        let line = b"PORT 198,18,0,2,195,81\r\n";
        assert_eq!(t.handle(now, &seg(CLIENT, SERVER, 100, line)).len(), 1);
        // The same segment again, and a retransmission that overlaps what was read.
        assert!(t.handle(now, &seg(CLIENT, SERVER, 100, line)).is_empty());
        let mut overlap = line[10..].to_vec();
        overlap.extend_from_slice(b"EPRT |1|198.18.0.2|50002|\r\n");
        let got = t.handle(now, &seg(CLIENT, SERVER, 110, &overlap));
        assert_eq!(
            got,
            [announced(CLIENT, SERVER, Kind::Eprt, "198.18.0.2:50002")]
        );
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut t = table();
        let now = Instant::now();
        let (a, b) = (&b"PORT 198,18,0,2,"[..], &b"195,81\r\n"[..]);
        let start = u32::MAX - 5;
        assert!(t.handle(now, &seg(CLIENT, SERVER, start, a)).is_empty());
        let after = start.wrapping_add(a.len() as u32);
        assert_eq!(t.handle(now, &seg(CLIENT, SERVER, after, b)).len(), 1);
        assert!(t.handle(now, &seg(CLIENT, SERVER, after, b)).is_empty());
    }

    #[test]
    fn a_gap_drops_the_broken_line_and_reading_goes_on() {
        let mut t = table();
        let now = Instant::now();
        assert!(t
            .handle(now, &seg(CLIENT, SERVER, 0, b"PORT 198,18"))
            .is_empty());
        // Bytes 11..20 were lost: the next segment starts a new line.
        let got = t.handle(now, &seg(CLIENT, SERVER, 20, b"PORT 198,18,0,2,195,81\r\n"));
        assert_eq!(
            got,
            [announced(CLIENT, SERVER, Kind::Port, "198.18.0.2:50001")]
        );
    }

    #[test]
    fn multi_line_replies_are_text() {
        let mut t = table();
        let got = feed(
            &mut t,
            SERVER,
            CLIENT,
            &[b"220-Welcome\r\n227 Entering Passive Mode (1,2,3,4,5,6)\r\n229 (|||1025|)\r\n220 ready\r\n"],
        );
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn non_ftp_payload_and_garbage() {
        let mut t = table();
        assert!(feed(
            &mut t,
            CLIENT,
            SERVER,
            &[b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]
        )
        .is_empty());
        assert!(feed(
            &mut t,
            CLIENT,
            SERVER,
            &[b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"]
        )
        .is_empty());
        assert!(feed(
            &mut t,
            SERVER,
            CLIENT,
            &[b"227 (999,1,1,1,1,1)\r\n229 (|||99999|)\r\n"]
        )
        .is_empty());
        assert!(feed(&mut t, CLIENT, SERVER, &[b"PORT 1,2,3\r\nEPRT |3|x|1|\r\n"]).is_empty());
    }

    #[test]
    fn over_long_lines_are_skipped() {
        let mut t = FlowTable::new(
            [21],
            Limits {
                max_line: 64,
                ..limits()
            },
        );
        let long = [b'A'; 100];
        let got = feed(
            &mut t,
            CLIENT,
            SERVER,
            &[&long, b"\r\nPORT 198,18,0,2,195,81\r\n"],
        );
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn rst_and_fins_end_a_flow_syn_restarts_it() {
        let mut t = table();
        let now = Instant::now();
        t.handle(now, &seg(CLIENT, SERVER, 0, b"PORT 198,18"));
        assert_eq!(t.len(), 1);
        t.handle(
            now,
            &Segment {
                rst: true,
                ..seg(SERVER, CLIENT, 0, b"")
            },
        );
        assert!(t.is_empty());

        t.handle(now, &seg(CLIENT, SERVER, 0, b"NOOP\r\n"));
        t.handle(
            now,
            &Segment {
                fin: true,
                ..seg(CLIENT, SERVER, 6, b"QUIT\r\n")
            },
        );
        assert_eq!(t.len(), 1);
        t.handle(
            now,
            &Segment {
                fin: true,
                ..seg(SERVER, CLIENT, 0, b"221 bye\r\n")
            },
        );
        assert!(t.is_empty());

        // A SYN on a tuple still tracked starts from scratch: the half line is gone, and the
        // data after the SYN is read from the SYN's sequence number on.
        t.handle(now, &seg(CLIENT, SERVER, 500, b"PORT 198,18"));
        t.handle(
            now,
            &Segment {
                syn: true,
                ..seg(CLIENT, SERVER, 9, b"")
            },
        );
        let got = t.handle(
            now,
            &seg(
                CLIENT,
                SERVER,
                10,
                b",0,2,195,81\r\nPORT 198,18,0,2,195,82\r\n",
            ),
        );
        assert_eq!(
            got,
            [announced(CLIENT, SERVER, Kind::Port, "198.18.0.2:50002")]
        );
    }

    #[test]
    fn stray_acks_are_not_tracked() {
        let mut t = table();
        t.handle(Instant::now(), &seg(CLIENT, SERVER, 0, b""));
        t.handle(
            Instant::now(),
            &Segment {
                fin: true,
                ..seg(CLIENT, SERVER, 0, b"")
            },
        );
        assert!(t.is_empty());
    }

    #[test]
    fn the_table_is_bounded_and_idle_flows_expire() {
        let mut t = FlowTable::new(
            [21],
            Limits {
                max_flows: 3,
                ..limits()
            },
        );
        let start = Instant::now();
        for i in 0..10u16 {
            let client = format!("198.18.0.2:{}", 40000 + i);
            let now = start + Duration::from_secs(u64::from(i));
            t.handle(now, &seg(&client, SERVER, 0, b"PORT 198,18"));
            assert!(t.len() <= 3);
        }
        // The most recent ones are kept: the last client's line completes.
        let later = start + Duration::from_secs(10);
        let got = t.handle(
            later,
            &seg("198.18.0.2:40009", SERVER, 11, b",0,2,195,81\r\n"),
        );
        assert_eq!(got.len(), 1);
        t.expire(later + Duration::from_secs(59));
        assert_eq!(
            t.len(),
            1,
            "only the client active at 10 s is younger than 60 s"
        );
        t.expire(later + Duration::from_secs(61));
        assert!(t.is_empty());
    }

    proptest! {
        #[test]
        fn any_segments_never_panic_and_stay_bounded(
            segs in proptest::collection::vec(
                (any::<bool>(), any::<u32>(), any::<u8>(), any::<u8>(),
                 proptest::collection::vec(any::<u8>(), 0..60)),
                0..40),
        ) {
            let mut t = FlowTable::new([21], Limits { max_flows: 4, ..limits() });
            let now = Instant::now();
            for (to_server, seq, port, flags, payload) in segs {
                let client = format!("198.18.0.{}:{}", port % 8, 40000 + u16::from(port));
                let (src, dst) = if to_server { (client.as_str(), SERVER) } else { (SERVER, client.as_str()) };
                let s = Segment {
                    syn: flags & 1 != 0,
                    fin: flags & 2 != 0,
                    rst: flags & 4 != 0,
                    ..seg(src, dst, seq, &payload)
                };
                let _ = t.handle(now, &s);
                prop_assert!(t.len() <= 4);
            }
        }

        #[test]
        fn any_split_of_a_session_gives_the_same_announcements(
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let stream: &[u8] = b"USER a\r\nPASS b\r\nPORT 198,18,0,2,195,81\r\nRETR x\r\n\
                EPRT |1|198.18.0.2|50002|\r\nQUIT\r\n";
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            points.sort_unstable();
            let mut pieces = Vec::new();
            let mut start = 0;
            for p in points {
                pieces.push(&stream[start..p]);
                start = p;
            }
            pieces.push(&stream[start..]);
            let got = feed(&mut table(), CLIENT, SERVER, &pieces);
            prop_assert_eq!(
                got,
                [
                    announced(CLIENT, SERVER, Kind::Port, "198.18.0.2:50001"),
                    announced(CLIENT, SERVER, Kind::Eprt, "198.18.0.2:50002"),
                ]
            );
        }
    }
}
