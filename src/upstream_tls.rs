//! What ftp-alg says to a server before a session starts, when it speaks TLS to it
//! (`tls.upstream = "tls"`): the sans-IO negotiation of RFC 4217 from the client's side.
//!
//! The server's greeting is held back from the client; ftp-alg answers it with `AUTH TLS`, does
//! the handshake as TLS client once the server says `234`, then sends `PBSZ 0` and `PROT P`, so
//! that the server's data connections are TLS whatever the client chose (vsftpd's
//! `force_local_data_ssl` and `force_anon_data_ssl` refuse clear data), and only then hands the
//! greeting to the session ([`crate::session::Session`]), which goes on as with a plain server:
//! the client's own `AUTH`, `PBSZ` and `PROT` are still answered by ftp-alg and never reach the
//! server. The replies to ftp-alg's own commands are swallowed here; none reaches the client.
//!
//! Any other answer ends the session before the client has sent anything: a server that
//! refuses `AUTH TLS` (or `PBSZ`, or `PROT P`) would otherwise get the client's password in
//! clear, which is exactly what `tls.upstream = "tls"` rules out. The client then gets a `421`
//! and the daemon logs the reason ([`Refusal`]). A greeting that is not `220` (a server that is
//! full says `421`) reaches the client as the server sent it.
//!
//! Bytes in, outputs out ([`Negotiation::poll_output`]); no socket, no clock, no rustls: the
//! proxy carries out [`Output::StartTls`] and bounds the whole negotiation in time.

use std::collections::VecDeque;

use crate::ftp::reply::{ReplyPosition, ReplyTracker};
use crate::ftp::{canonical, framing, LineBuffer};

/// The reply to the client when ftp-alg cannot secure the connection to the server.
pub const REFUSED_REPLY: &[u8] =
    b"421 Service not available: the FTP gateway cannot secure its connection to the server.\r\n";

/// What the proxy must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Write these bytes to the server (in clear before [`Output::StartTls`], over TLS after).
    ToServer(Vec<u8>),
    /// Do the TLS handshake with the server, as TLS client, then call
    /// [`Negotiation::handle_tls`] with the result.
    StartTls,
    /// The connection to the server is secured: the session starts, and gets these bytes (the
    /// server's greeting) as the first it read from the server.
    Ready(Vec<u8>),
    /// Give the client this reply and end the session, for this reason.
    Refuse(Vec<u8>, Refusal),
}

/// Why the connection to the server could not be secured; each is logged with its reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The server's greeting was not `220`; the client gets it as it is.
    #[error("the server's greeting is not 220: {0}")]
    Greeting(String),
    /// The server answered `AUTH TLS` with something else than `234`: it has no TLS, or not
    /// for this client.
    #[error("the server refused AUTH TLS: {0}")]
    AuthRefused(String),
    /// The TLS handshake failed: the server's certificate did not verify, or the server
    /// spoke no TLS.
    #[error("TLS handshake with the server failed: {0}")]
    Handshake(String),
    /// The server refused `PBSZ 0` or `PROT P`: its data connections would be in clear.
    #[error("the server refused {command}: {reply}")]
    DataProtection {
        /// `PBSZ 0` or `PROT P`.
        command: &'static str,
        /// The server's reply.
        reply: String,
    },
    /// The server sent something after `234` before the handshake: it cannot be part of it.
    #[error("the server sent more after 234 before the TLS handshake")]
    BytesAfter234,
    /// A reply line longer than the limit.
    #[error("a reply line longer than the limit")]
    LineTooLong,
    /// The server closed the connection (or it failed) before the negotiation was done.
    #[error("the server closed the connection during the TLS negotiation")]
    Closed,
    /// The negotiation took longer than `proxy.connect_timeout_secs` (the proxy's clock).
    #[error("the TLS negotiation with the server timed out")]
    Timeout,
}

impl Refusal {
    /// For logs: a short name of the reason.
    pub fn as_str(&self) -> &'static str {
        match self {
            Refusal::Greeting(_) => "greeting",
            Refusal::AuthRefused(_) => "auth_refused",
            Refusal::Handshake(_) => "handshake",
            Refusal::DataProtection { .. } => "data_protection",
            Refusal::BytesAfter234 => "bytes_after_234",
            Refusal::LineTooLong => "line_too_long",
            Refusal::Closed => "closed",
            Refusal::Timeout => "timeout",
        }
    }
}

/// Where the negotiation stands: which reply it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Greeting,
    Auth,
    Handshake,
    Pbsz,
    Prot,
    Done,
}

/// The negotiation with one server.
#[derive(Debug)]
pub struct Negotiation {
    step: Step,
    lines: LineBuffer,
    replies: ReplyTracker,
    /// The lines of the reply being read, as received.
    reply: Vec<u8>,
    /// The server's greeting, as received, for the session.
    greeting: Vec<u8>,
    outputs: VecDeque<Output>,
}

impl Negotiation {
    /// A negotiation that waits for the server's greeting; `max_line` as the session's.
    pub fn new(max_line: usize) -> Negotiation {
        Negotiation {
            step: Step::Greeting,
            lines: LineBuffer::new(max_line),
            replies: ReplyTracker::new(),
            reply: Vec::new(),
            greeting: Vec::new(),
            outputs: VecDeque::new(),
        }
    }

    /// Whether it has ended (ready or refused): nothing more comes out.
    pub fn done(&self) -> bool {
        self.step == Step::Done
    }

    /// Bytes read from the server (decrypted, once TLS is on).
    pub fn handle_server_data(&mut self, data: &[u8]) {
        if self.done() {
            return;
        }
        self.lines.push(data);
        while !self.done() {
            match self.lines.next_line() {
                Some(Ok(raw)) => self.line(raw),
                Some(Err(_)) => self.refuse(REFUSED_REPLY.to_vec(), Refusal::LineTooLong),
                None => break,
            }
        }
    }

    /// The server closed its side, or the connection failed.
    pub fn handle_eof(&mut self) {
        if !self.done() {
            self.refuse(REFUSED_REPLY.to_vec(), Refusal::Closed);
        }
    }

    /// The result of [`Output::StartTls`]: `Err` carries why the handshake failed.
    pub fn handle_tls(&mut self, result: Result<(), String>) {
        if self.step != Step::Handshake {
            return;
        }
        match result {
            Ok(()) => {
                self.step = Step::Pbsz;
                self.outputs
                    .push_back(Output::ToServer(b"PBSZ 0\r\n".to_vec()));
            }
            Err(why) => self.refuse(REFUSED_REPLY.to_vec(), Refusal::Handshake(why)),
        }
    }

    /// The next thing to do, or `None` until more input arrives.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// One line from the server: the replies of a negotiation are read whole (a multi-line
    /// greeting is common), and each final reply moves it on.
    fn line(&mut self, raw: Vec<u8>) {
        let reply = self.replies.classify(&framing::text_of(&raw));
        self.reply.extend_from_slice(&raw);
        let code = match (reply.position, reply.code) {
            (ReplyPosition::Single | ReplyPosition::Last, Some(code)) => code,
            _ => return,
        };
        let whole = std::mem::take(&mut self.reply);
        if (100..200).contains(&code) {
            // A preliminary reply (`120 Service ready in nnn minutes`) before the greeting:
            // the greeting is still to come, and the client gets both.
            if self.step == Step::Greeting {
                self.greeting.extend_from_slice(&whole);
            }
            return;
        }
        let text = first_line(&whole);
        match (self.step, code) {
            (Step::Greeting, 220) => {
                self.greeting.extend_from_slice(&whole);
                self.step = Step::Auth;
                self.outputs
                    .push_back(Output::ToServer(b"AUTH TLS\r\n".to_vec()));
            }
            (Step::Greeting, _) => {
                self.greeting.extend_from_slice(&whole);
                let greeting = std::mem::take(&mut self.greeting);
                let to_client = greeting
                    .split_inclusive(|&b| b == b'\n')
                    .flat_map(canonical::reply)
                    .collect();
                self.refuse(to_client, Refusal::Greeting(text));
            }
            (Step::Auth, 234) if self.lines.pending() > 0 => {
                self.refuse(REFUSED_REPLY.to_vec(), Refusal::BytesAfter234)
            }
            (Step::Auth, 234) => {
                self.step = Step::Handshake;
                self.outputs.push_back(Output::StartTls);
            }
            (Step::Auth, _) => self.refuse(REFUSED_REPLY.to_vec(), Refusal::AuthRefused(text)),
            (Step::Pbsz, 200..=299) => {
                self.step = Step::Prot;
                self.outputs
                    .push_back(Output::ToServer(b"PROT P\r\n".to_vec()));
            }
            (Step::Prot, 200..=299) => {
                self.step = Step::Done;
                // Whatever the server sent after it is the session's.
                let mut greeting = std::mem::take(&mut self.greeting);
                greeting.extend(self.lines.take_pending());
                self.outputs.push_back(Output::Ready(greeting));
            }
            (Step::Pbsz | Step::Prot, _) => {
                let command = match self.step {
                    Step::Pbsz => "PBSZ 0",
                    _ => "PROT P",
                };
                self.refuse(
                    REFUSED_REPLY.to_vec(),
                    Refusal::DataProtection {
                        command,
                        reply: text,
                    },
                );
            }
            // A reply while the handshake runs cannot happen (the proxy reads nothing then),
            // and after the end nothing is read.
            (Step::Handshake | Step::Done, _) => {}
        }
    }

    fn refuse(&mut self, reply: Vec<u8>, why: Refusal) {
        self.step = Step::Done;
        self.outputs.push_back(Output::Refuse(reply, why));
    }
}

/// The first line of a reply, as text for a log line (without control characters).
fn first_line(reply: &[u8]) -> String {
    let line = reply.split(|&b| b == b'\n').next().unwrap_or_default();
    String::from_utf8_lossy(&framing::text_of(line))
        .chars()
        .filter(|c| !c.is_control())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(n: &mut Negotiation) -> Vec<Output> {
        std::iter::from_fn(|| n.poll_output()).collect()
    }

    fn to_server(line: &str) -> Output {
        Output::ToServer(line.as_bytes().to_vec())
    }

    /// A negotiation that has sent AUTH TLS after a (multi-line) greeting.
    fn after_greeting() -> Negotiation {
        let mut n = Negotiation::new(2048);
        n.handle_server_data(b"220-Welcome\r\n220 ");
        assert_eq!(drain(&mut n), vec![]);
        n.handle_server_data(b"(vsFTPd 3.0.3)\r\n");
        assert_eq!(drain(&mut n), vec![to_server("AUTH TLS\r\n")]);
        n
    }

    #[test]
    fn auth_handshake_pbsz_prot_then_the_greeting() {
        let mut n = after_greeting();
        n.handle_server_data(b"234 Proceed with negotiation.\r\n");
        assert_eq!(drain(&mut n), vec![Output::StartTls]);
        // Nothing is read while the handshake runs; its result moves on.
        n.handle_tls(Ok(()));
        assert_eq!(drain(&mut n), vec![to_server("PBSZ 0\r\n")]);
        n.handle_server_data(b"200 PBSZ set to 0.\r\n");
        assert_eq!(drain(&mut n), vec![to_server("PROT P\r\n")]);
        assert!(!n.done());
        n.handle_server_data(b"200 PROT now Private.\r\n");
        assert_eq!(
            drain(&mut n),
            vec![Output::Ready(
                b"220-Welcome\r\n220 (vsFTPd 3.0.3)\r\n".to_vec()
            )]
        );
        assert!(n.done());
        // Whatever comes later is the session's, not the negotiation's.
        n.handle_server_data(b"500 x\r\n");
        n.handle_eof();
        assert_eq!(drain(&mut n), vec![]);
    }

    #[test]
    fn every_refusal_ends_with_421_and_its_reason() {
        let refused = |n: &mut Negotiation| match drain(n).as_slice() {
            [Output::Refuse(reply, why)] => {
                assert_eq!(reply, REFUSED_REPLY);
                assert!(n.done());
                why.clone()
            }
            other => panic!("{other:?}"),
        };
        let mut n = after_greeting();
        n.handle_server_data(b"530 Please login with USER and PASS.\r\n");
        assert_eq!(
            refused(&mut n),
            Refusal::AuthRefused("530 Please login with USER and PASS.".into())
        );

        let mut n = after_greeting();
        n.handle_server_data(b"234 Proceed.\r\n");
        drain(&mut n);
        n.handle_tls(Err("invalid peer certificate: UnknownIssuer".into()));
        let why = refused(&mut n);
        assert_eq!(why.as_str(), "handshake");
        assert!(why.to_string().contains("UnknownIssuer"), "{why}");

        for (pbsz, prot, command) in [
            ("504 PBSZ not understood.\r\n", "", "PBSZ 0"),
            ("200 ok\r\n", "536 PROT P refused.\r\n", "PROT P"),
        ] {
            let mut n = after_greeting();
            n.handle_server_data(b"234 Proceed.\r\n");
            n.handle_tls(Ok(()));
            drain(&mut n);
            n.handle_server_data(pbsz.as_bytes());
            n.handle_server_data(prot.as_bytes());
            let outputs = drain(&mut n);
            let Some(Output::Refuse(_, Refusal::DataProtection { command: c, .. })) =
                outputs.last()
            else {
                panic!("{outputs:?}");
            };
            assert_eq!(*c, command);
        }

        // Bytes behind the 234 cannot be the server's part of a handshake the client starts.
        let mut n = after_greeting();
        n.handle_server_data(b"234 Proceed.\r\n\x16\x03\x01");
        assert_eq!(refused(&mut n), Refusal::BytesAfter234);

        let mut n = after_greeting();
        n.handle_eof();
        assert_eq!(refused(&mut n), Refusal::Closed);

        let mut n = Negotiation::new(64);
        n.handle_server_data(&[b'x'; 100]);
        assert_eq!(refused(&mut n), Refusal::LineTooLong);
    }

    #[test]
    fn a_greeting_other_than_220_reaches_the_client_as_sent() {
        let mut n = Negotiation::new(2048);
        n.handle_server_data(b"421-Too many\r\n421 users.\x07\r\n");
        assert_eq!(
            drain(&mut n),
            vec![Output::Refuse(
                b"421-Too many\r\n421 users. \r\n".to_vec(),
                Refusal::Greeting("421-Too many".into())
            )]
        );
    }

    #[test]
    fn a_preliminary_greeting_waits_for_the_real_one() {
        let mut n = Negotiation::new(2048);
        n.handle_server_data(b"120 Ready in 1 minute.\r\n");
        assert_eq!(drain(&mut n), vec![]);
        n.handle_server_data(b"220 Ready.\r\n234 Proceed.\r\n");
        assert_eq!(
            drain(&mut n),
            vec![to_server("AUTH TLS\r\n"), Output::StartTls]
        );
        n.handle_tls(Ok(()));
        n.handle_server_data(b"200 PBSZ=0\r\n200 PROT P\r\n");
        let outputs = drain(&mut n);
        assert_eq!(
            outputs.last(),
            Some(&Output::Ready(
                b"120 Ready in 1 minute.\r\n220 Ready.\r\n".to_vec()
            ))
        );
    }

    #[test]
    fn any_split_of_the_server_stream_gives_the_same_outputs() {
        let stream: &[u8] = b"220-a\r\n220 b\r\n234 c\r\n";
        for split in 0..=stream.len() {
            let mut n = Negotiation::new(2048);
            n.handle_server_data(&stream[..split]);
            n.handle_server_data(&stream[split..]);
            assert_eq!(
                drain(&mut n),
                vec![to_server("AUTH TLS\r\n"), Output::StartTls],
                "split at {split}"
            );
        }
    }
}
