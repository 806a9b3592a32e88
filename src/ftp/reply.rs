//! Server replies: where each line sits in a (possibly multi-line) reply,
//! and the two passive-mode replies the gateway rewrites, 227 (PASV) and
//! 229 (EPSV).
//!
//! Not here: matching replies to the commands they answer, or deciding
//! what a code means for the session; that is the session's job.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4};

use thiserror::Error;

use super::hostport::{self, HostPortError};

/// Length of a reply code: "a three digit number" (RFC 959 §4.2).
const CODE_LEN: usize = 3;

/// Where a line sits in a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyPosition {
    /// A one-line reply "nnn text", or a line that is no reply at all.
    Single,
    /// "nnn-text": opens a multi-line reply.
    First,
    /// Any line inside a multi-line reply; its text is not a reply code.
    Continuation,
    /// "nnn text" with the opening code: closes the multi-line reply.
    Last,
}

/// The classification of one server line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyLine {
    /// The reply code for `Single`, `First` and `Last` lines; `None` for
    /// continuations and for lines outside a reply that carry no code.
    pub code: Option<u16>,
    /// Where the line sits.
    pub position: ReplyPosition,
}

/// Follows multi-line replies across the lines of one server stream.
///
/// RFC 959 §4.2: "the first line will begin with the exact required reply
/// code, followed immediately by a Hyphen, "-" (also known as Minus),
/// followed by text. The last line will begin with the same code, followed
/// immediately by Space \<SP>". Lines in between are text, even when they
/// start with digits: "123 x" inside a 211 reply is text.
#[derive(Debug, Default)]
pub struct ReplyTracker {
    /// The code of the multi-line reply being read, if any.
    open: Option<u16>,
}

impl ReplyTracker {
    /// A tracker outside any reply.
    pub fn new() -> Self {
        Self::default()
    }

    /// Classify the next server line (text without CRLF or Telnet commands).
    ///
    /// A line that is exactly the opening code, with no text at all, also
    /// closes a multi-line reply: RFC 959 wants the SP, but a reader that
    /// missed the end would treat every later reply as text.
    pub fn classify(&mut self, text: &[u8]) -> ReplyLine {
        let parsed = reply_code(text);
        let (code, position) = match (self.open, parsed) {
            (Some(open), Some((code, [] | [b' ', ..]))) if code == open => {
                self.open = None;
                (Some(code), ReplyPosition::Last)
            }
            (Some(_), _) => (None, ReplyPosition::Continuation),
            (None, Some((code, [b'-', ..]))) => {
                self.open = Some(code);
                (Some(code), ReplyPosition::First)
            }
            (None, Some((code, [] | [b' ', ..]))) => (Some(code), ReplyPosition::Single),
            (None, _) => (None, ReplyPosition::Single),
        };
        ReplyLine { code, position }
    }

    /// Forget any open multi-line reply (e.g. after REIN).
    pub fn reset(&mut self) {
        self.open = None;
    }
}

/// The leading three-digit code of a line and the bytes after it.
fn reply_code(text: &[u8]) -> Option<(u16, &[u8])> {
    let (digits, rest) = text.split_first_chunk::<CODE_LEN>()?;
    let code = hostport::parse_decimal(digits, CODE_LEN).ok()?;
    Some((u16::try_from(code).ok()?, rest))
}

/// Why a passive-mode reply could not be parsed or rewritten.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ReplyError {
    /// The line is not a 227 or 229 reply.
    #[error("not a 227 or 229 reply")]
    NotPassive,
    /// The reply holds no endpoint in the expected form.
    #[error("no endpoint found in the reply")]
    NoEndpoint,
    /// The endpoint found is malformed or out of range.
    #[error("bad endpoint in the reply: {0}")]
    Endpoint(#[from] HostPortError),
    /// Clients would read another endpoint than ftp-alg (or fail where ftp-alg would not): a
    /// sign or blank inside the numbers, non-ASCII text, a 229 whose first `(` is not the
    /// endpoint.
    #[error("the reply can be read in more than one way")]
    Ambiguous,
    /// A 227 reply can carry only an IPv4 address.
    #[error("a 227 reply cannot carry the IPv6 address {0}")]
    NotIpv4(Ipv6Addr),
}

/// A parsed 227 or 229 reply line, keeping the original text around the
/// numbers so that a rewrite changes only the numbers.
///
/// `prefix` and `suffix` are raw bytes: reply text need not be UTF-8 and is
/// preserved exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassiveReply {
    /// 227: the first "h1,h2,h3,h4,p1,p2" in the text after the code.
    Pasv {
        /// The endpoint the server listens on.
        addr: SocketAddrV4,
        /// Everything before the first number, code included.
        prefix: Vec<u8>,
        /// Everything after the last number.
        suffix: Vec<u8>,
    },
    /// 229: `(<d><d><d>port<d>)`.
    Epsv {
        /// The port the server listens on.
        port: u16,
        /// The delimiter the server used.
        delimiter: char,
        /// Everything before the port, `(<d><d><d>` included.
        prefix: Vec<u8>,
        /// Everything after the port, `<d>)` included.
        suffix: Vec<u8>,
    },
}

impl PassiveReply {
    /// Parse the text (no CRLF) of a 227 or 229 reply line.
    ///
    /// The first line of a multi-line reply ("227-...") is accepted too.
    pub fn parse(text: &[u8]) -> Result<PassiveReply, ReplyError> {
        match reply_code(text) {
            Some((227, [] | [b' ' | b'-', ..])) => parse_227(text),
            Some((229, [] | [b' ' | b'-', ..])) => parse_229(text),
            _ => Err(ReplyError::NotPassive),
        }
    }

    /// The full line, with CRLF, announcing `addr` instead.
    ///
    /// A 227 takes the address and port; an IPv4-mapped IPv6 address is
    /// written as IPv4, any other IPv6 address is [`ReplyError::NotIpv4`].
    /// A 229 takes only the port: it carries no address (RFC 2428 §3: "the
    /// network address used to establish the data connection will be the
    /// same network address used for the control connection").
    pub fn rewrite(&self, addr: SocketAddr) -> Result<Vec<u8>, ReplyError> {
        let (prefix, numbers, suffix) = match self {
            PassiveReply::Pasv { prefix, suffix, .. } => {
                let ip = match addr.ip() {
                    IpAddr::V4(ip) => ip,
                    IpAddr::V6(ip) => ip.to_ipv4_mapped().ok_or(ReplyError::NotIpv4(ip))?,
                };
                let numbers = hostport::encode_host_port(SocketAddrV4::new(ip, addr.port()));
                (prefix, numbers, suffix)
            }
            PassiveReply::Epsv { prefix, suffix, .. } => (prefix, addr.port().to_string(), suffix),
        };
        Ok([prefix.as_slice(), numbers.as_bytes(), suffix, b"\r\n"].concat())
    }

    /// The port the reply announces.
    pub fn port(&self) -> u16 {
        match self {
            PassiveReply::Pasv { addr, .. } => addr.port(),
            PassiveReply::Epsv { port, .. } => *port,
        }
    }
}

/// RFC 1123 §4.1.2.6: "The format of the 227 reply to a PASV command is not
/// well standardized. In particular, an FTP client cannot assume that the
/// parentheses shown on page 40 of RFC-959 will be present ... Therefore, a
/// User-FTP program that interprets the PASV reply must scan the reply for
/// the first digit of the host and port numbers."
///
/// ftp-alg must act on the endpoint every client will dial, and clients scan
/// differently: curl tries `sscanf("%u,%u,%u,%u,%u,%u")` at every position after
/// the code, lftp the same `%d` scan at every digit, and both let blanks and a
/// sign stand before each number; Python's ftplib takes the first match of
/// `\d+,\d+,\d+,\d+,\d+,\d+` (Unicode digits included). So the endpoint is
/// the first place where the `sscanf` reading succeeds, and the reply is refused
/// as [`ReplyError::Ambiguous`] unless that reading is also the strict one
/// (digits and commas only, after any leading blanks) and the text is ASCII.
/// Then no reader finds another tuple first: an earlier strict or lenient match
/// would be an earlier `sscanf` success. Trailing text is kept, whatever it holds.
fn parse_227(text: &[u8]) -> Result<PassiveReply, ReplyError> {
    if !text.is_ascii() {
        return Err(ReplyError::Ambiguous);
    }
    let after_code = text.get(CODE_LEN..).ok_or(ReplyError::NoEndpoint)?;
    let (offset, len) = (0..after_code.len())
        .find_map(|at| {
            let tail = after_code.get(at..)?;
            scanf_six(tail).map(|len| (at, len))
        })
        .ok_or(ReplyError::NoEndpoint)?;
    let read = after_code
        .get(offset..offset + len)
        .ok_or(ReplyError::NoEndpoint)?;
    let blanks = read.iter().take_while(|b| is_c_space(**b)).count();
    let numbers = read.get(blanks..).ok_or(ReplyError::NoEndpoint)?;
    if !numbers.iter().all(|b| b.is_ascii_digit() || *b == b',') {
        return Err(ReplyError::Ambiguous);
    }
    let start = CODE_LEN + offset + blanks;
    let end = CODE_LEN + offset + len;
    // Only ASCII digits and commas: always valid UTF-8.
    let numbers = std::str::from_utf8(numbers).map_err(|_| ReplyError::NoEndpoint)?;
    Ok(PassiveReply::Pasv {
        addr: hostport::parse_host_port(numbers)?,
        prefix: text.get(..start).ok_or(ReplyError::NoEndpoint)?.to_vec(),
        suffix: text.get(end..).ok_or(ReplyError::NoEndpoint)?.to_vec(),
    })
}

/// C's `isspace()` in the C locale: ASCII whitespace and VT, which `%u` skips.
fn is_c_space(b: u8) -> bool {
    b.is_ascii_whitespace() || b == 0x0b
}

/// Whether C's `sscanf(s, "%u,%u,%u,%u,%u,%u")` reads six numbers from the start of `s`, and
/// if so how many bytes it consumed. Each `%u` skips `isspace()` bytes and takes an optional
/// sign and at least one digit; each `,` must follow its number at once.
fn scanf_six(s: &[u8]) -> Option<usize> {
    let mut at = 0;
    for field in 0..6 {
        if field > 0 {
            (s.get(at) == Some(&b',')).then_some(())?;
            at += 1;
        }
        at += s.get(at..)?.iter().take_while(|b| is_c_space(**b)).count();
        if matches!(s.get(at), Some(b'+' | b'-')) {
            at += 1;
        }
        let digits = s
            .get(at..)?
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        (digits > 0).then_some(())?;
        at += digits;
    }
    Some(at)
}

/// RFC 2428 §3: "The text returned in response to the EPSV command MUST be:
/// `<text indicating server is entering extended passive mode>
/// (<d><d><d><tcp-port><d>)` ... The first two fields contained in the
/// parenthesis MUST be blank."
///
/// curl and lftp read the endpoint after the first `(` only, and Python's ftplib splits the
/// text between the first `(` and the next `)` at the character after the `(`. So the first
/// `(` must open the endpoint: three equal delimiters (ASCII 33..=126, as for EPRT, but not a
/// digit or a parenthesis, which those readers split differently), the port in digits only,
/// then `<d>)`. Anything else is refused rather than guessed at.
fn parse_229(text: &[u8]) -> Result<PassiveReply, ReplyError> {
    if !text.is_ascii() {
        return Err(ReplyError::Ambiguous);
    }
    let tail = text.get(CODE_LEN..).ok_or(ReplyError::NoEndpoint)?;
    let open = CODE_LEN
        + tail
            .iter()
            .position(|&b| b == b'(')
            .ok_or(ReplyError::NoEndpoint)?;
    let after_paren = text.get(open + 1..).ok_or(ReplyError::NoEndpoint)?;
    let [d, d2, d3, field @ ..] = after_paren else {
        return Err(ReplyError::NoEndpoint);
    };
    let usable = hostport::is_delimiter(*d) && !d.is_ascii_digit() && !matches!(d, b'(' | b')');
    if d != d2 || d != d3 || !usable {
        return Err(ReplyError::NoEndpoint);
    }
    let digits_len = field
        .windows(2)
        .position(|w| w == [*d, b')'])
        .ok_or(HostPortError::BadDelimiter)?;
    let digits = field.get(..digits_len).ok_or(ReplyError::NoEndpoint)?;
    let start = open + 4;
    Ok(PassiveReply::Epsv {
        port: hostport::parse_port(digits)?,
        delimiter: char::from(*d),
        prefix: text.get(..start).ok_or(ReplyError::NoEndpoint)?.to_vec(),
        suffix: text
            .get(start + digits_len..)
            .ok_or(ReplyError::NoEndpoint)?
            .to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ftp::framing::{text_of, LineBuffer, DEFAULT_MAX_LINE};
    use proptest::prelude::*;
    use ReplyPosition::*;

    fn line(code: Option<u16>, position: ReplyPosition) -> ReplyLine {
        ReplyLine { code, position }
    }

    fn classify_all(lines: &[&[u8]]) -> Vec<ReplyLine> {
        let mut t = ReplyTracker::new();
        lines.iter().map(|l| t.classify(l)).collect()
    }

    #[test]
    fn single_line_replies() {
        assert_eq!(
            classify_all(&[b"220 ready", b"331", b"230 ok"]),
            vec![
                line(Some(220), Single),
                line(Some(331), Single),
                line(Some(230), Single)
            ]
        );
    }

    #[test]
    fn feat_with_reply_like_text_inside() {
        let got = classify_all(&[
            b"211-Features:",
            b" EPRT",
            b"227 Entering Passive Mode (1,2,3,4,5,6)",
            b"211-still text",
            b"211x still text",
            b"",
            b"211 End",
            b"227 Entering Passive Mode (10,0,0,1,4,1)",
        ]);
        assert_eq!(
            got,
            vec![
                line(Some(211), First),
                line(None, Continuation),
                line(None, Continuation),
                line(None, Continuation),
                line(None, Continuation),
                line(None, Continuation),
                line(Some(211), Last),
                line(Some(227), Single),
            ]
        );
    }

    #[test]
    fn bare_code_closes_a_multi_line_reply() {
        assert_eq!(
            classify_all(&[b"214-Help", b"214"]),
            vec![line(Some(214), First), line(Some(214), Last)]
        );
    }

    #[test]
    fn garbage_outside_a_reply_has_no_code() {
        assert_eq!(
            classify_all(&[b"hello", b"22", b"2270 x", b"\xff\xfe\xfd", b""]),
            vec![line(None, Single); 5]
        );
    }

    #[test]
    fn reset_forgets_an_open_reply() {
        let mut t = ReplyTracker::new();
        assert_eq!(t.classify(b"150-opening"), line(Some(150), First));
        t.reset();
        assert_eq!(t.classify(b"220 ready"), line(Some(220), Single));
    }

    /// Frame and classify a server stream delivered in `chunks`.
    fn frame_and_classify<'a>(
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> Vec<(Vec<u8>, ReplyLine)> {
        let mut lb = LineBuffer::new(DEFAULT_MAX_LINE);
        let mut tracker = ReplyTracker::new();
        let mut out = Vec::new();
        for chunk in chunks {
            lb.push(chunk);
            while let Some(l) = lb.next_line() {
                let l = l.unwrap();
                let class = tracker.classify(&text_of(&l));
                out.push((l, class));
            }
        }
        out
    }

    const SERVER_STREAM: &[u8] =
        b"211-Features:\r\n EPRT\r\n227 Entering Passive Mode (1,2,3,4,5,6)\r\n\
211 End\r\n230-Welcome\n230 ok\r\n227 Entering Passive Mode (10,0,0,1,4,1).\r\n";

    #[test]
    fn every_split_of_a_multi_line_stream_classifies_the_same() {
        let whole = frame_and_classify([SERVER_STREAM]);
        assert_eq!(whole.len(), 7);
        assert_eq!(whole[2].1, line(None, Continuation));
        assert_eq!(whole[3].1, line(Some(211), Last));
        assert_eq!(whole[6].1, line(Some(227), Single));
        for cut in 0..=SERVER_STREAM.len() {
            let (a, b) = SERVER_STREAM.split_at(cut);
            assert_eq!(frame_and_classify([a, b]), whole, "cut at {cut}");
        }
        assert_eq!(frame_and_classify(SERVER_STREAM.chunks(1)), whole);
    }

    #[test]
    fn every_prefix_of_a_multi_line_stream_gives_a_prefix_of_the_lines() {
        let whole = frame_and_classify([SERVER_STREAM]);
        for n in 0..=SERVER_STREAM.len() {
            let prefix = &SERVER_STREAM[..n];
            let complete = prefix.iter().filter(|&&b| b == b'\n').count();
            assert_eq!(
                frame_and_classify([prefix]),
                whole[..complete],
                "prefix {n}"
            );
        }
    }

    fn pasv(text: &[u8]) -> Result<PassiveReply, ReplyError> {
        PassiveReply::parse(text)
    }

    #[test]
    fn parses_227_in_its_many_forms() {
        let addr: SocketAddrV4 = "192.168.1.2:1025".parse().unwrap();
        let expect = |prefix: &[u8], suffix: &[u8]| {
            Ok(PassiveReply::Pasv {
                addr,
                prefix: prefix.to_vec(),
                suffix: suffix.to_vec(),
            })
        };
        assert_eq!(
            pasv(b"227 Entering Passive Mode (192,168,1,2,4,1)."),
            expect(b"227 Entering Passive Mode (", b").")
        );
        assert_eq!(
            pasv(b"227 Entering Passive Mode 192,168,1,2,4,1"),
            expect(b"227 Entering Passive Mode ", b"")
        );
        assert_eq!(
            pasv(b"227 =192,168,1,2,4,1, have fun"),
            expect(b"227 =", b", have fun")
        );
        assert_eq!(
            pasv(b"227 Mode v2 (192,168,001,002,004,001) trailing 7,8"),
            Ok(PassiveReply::Pasv {
                addr,
                prefix: b"227 Mode v2 (".to_vec(),
                suffix: b") trailing 7,8".to_vec(),
            })
        );
        assert_eq!(
            pasv(b"227 Entering Passive Mode (  192,168,1,2,4,1)"),
            expect(b"227 Entering Passive Mode (  ", b")")
        );
    }

    #[test]
    fn rejects_bad_227() {
        assert_eq!(
            pasv(b"227 Entering Passive Mode"),
            Err(ReplyError::NoEndpoint)
        );
        assert_eq!(pasv(b"227"), Err(ReplyError::NoEndpoint));
        assert_eq!(pasv(b"227 1 2 3 4 5 6"), Err(ReplyError::NoEndpoint));
        assert_eq!(
            pasv(b"227 (192,168,1,256,4,1)"),
            Err(ReplyError::Endpoint(HostPortError::OctetOutOfRange(256)))
        );
        assert_eq!(pasv(b"227 (192,168,1,2,4)"), Err(ReplyError::NoEndpoint));
        assert_eq!(pasv(b"227 (192,168,,1,2,4,1)"), Err(ReplyError::NoEndpoint));
    }

    /// curl and lftp scan with `sscanf`, which takes blanks and a sign before each number;
    /// ftplib matches digits and commas only. Where they could disagree, ftp-alg refuses.
    #[test]
    fn refuses_227s_that_clients_read_differently() {
        for text in [
            &b"227 Entering Passive Mode (10, 0, 0, 5, 0, 80) (1,2,3,4,5,6)"[..],
            b"227 (10,0,0,5,0, 80)",
            b"227 (10,0,0,5,0,\x0b80)",
            b"227 (-1,2,3,4,5,6) (1,2,3,4,5,6)",
            b"227 (+10,0,0,5,0,80)",
            b"227 (10,0,0,5,0,-80)",
            b"227 \xd9\xa1,2,3,4,5,6 (10,0,0,5,0,80)",
            b"227-\xe9t\xe9 (192,168,1,2,4,1)",
        ] {
            assert_eq!(
                pasv(text),
                Err(ReplyError::Ambiguous),
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
        // Blanks before the first number only: every reader finds the same six numbers.
        assert!(pasv(b"227 Entering Passive Mode ( 10,0,0,5,0,80)").is_ok());
        assert_eq!(pasv(b"200 (192,168,1,2,4,1)"), Err(ReplyError::NotPassive));
        assert_eq!(pasv(b"2270 (192,168,1,2,4,1)"), Err(ReplyError::NotPassive));
        assert_eq!(pasv(b""), Err(ReplyError::NotPassive));
    }

    #[test]
    fn parses_229_with_any_delimiter() {
        let epsv = |d: char, prefix: &[u8], suffix: &[u8]| {
            Ok(PassiveReply::Epsv {
                port: 6446,
                delimiter: d,
                prefix: prefix.to_vec(),
                suffix: suffix.to_vec(),
            })
        };
        assert_eq!(
            pasv(b"229 Entering Extended Passive Mode (|||6446|)"),
            epsv('|', b"229 Entering Extended Passive Mode (|||", b"|)")
        );
        assert_eq!(
            pasv(b"229 Entering Extended Passive Mode (!!!6446!)."),
            epsv('!', b"229 Entering Extended Passive Mode (!!!", b"!).")
        );
        assert_eq!(pasv(b"229 (%%%6446%)"), epsv('%', b"229 (%%%", b"%)"));
    }

    /// The readers take the first `(` as the endpoint's, and split parentheses and digits
    /// differently when they are the delimiter.
    #[test]
    fn refuses_229s_that_clients_read_differently() {
        for text in [
            &b"229 ()))6446))"[..],
            b"229 (((6446()",
            b"229 (11164461)",
            b"229 see (RFC 2428) (|||6446|)",
        ] {
            assert_eq!(pasv(text), Err(ReplyError::NoEndpoint), "{text:?}");
        }
        assert_eq!(pasv(b"229 \xe9 (|||6446|)"), Err(ReplyError::Ambiguous));
    }

    #[test]
    fn rejects_bad_229() {
        use HostPortError::*;
        assert_eq!(
            pasv(b"229 Entering Extended Passive Mode"),
            Err(ReplyError::NoEndpoint)
        );
        assert_eq!(pasv(b"229 (||!6446|)"), Err(ReplyError::NoEndpoint));
        assert_eq!(pasv(b"229 (   6446 )"), Err(ReplyError::NoEndpoint));
        assert_eq!(
            pasv(b"229 (|||6446!)"),
            Err(ReplyError::Endpoint(BadDelimiter))
        );
        assert_eq!(
            pasv(b"229 (|||6446|"),
            Err(ReplyError::Endpoint(BadDelimiter))
        );
        assert_eq!(
            pasv(b"229 (|||65536|)"),
            Err(ReplyError::Endpoint(PortOutOfRange(65536)))
        );
        assert_eq!(pasv(b"229 (|||+1|)"), Err(ReplyError::Endpoint(BadNumber)));
        assert_eq!(pasv(b"229 (||||)"), Err(ReplyError::Endpoint(BadNumber)));
    }

    #[test]
    fn rewrite_changes_only_the_numbers() {
        let reply = pasv(b"227 Entering Passive Mode (192,168,1,2,4,1). 7,8").unwrap();
        assert_eq!(reply.port(), 1025);
        let new: SocketAddr = "198.18.0.2:61000".parse().unwrap();
        assert_eq!(
            reply.rewrite(new),
            Ok(b"227 Entering Passive Mode (198,18,0,2,238,72). 7,8\r\n".to_vec())
        );
        let mapped: SocketAddr = "[::ffff:198.18.0.2]:61000".parse().unwrap();
        assert_eq!(reply.rewrite(mapped), reply.rewrite(new));
        let v6: SocketAddr = "[2001:db8::1]:61000".parse().unwrap();
        assert_eq!(
            reply.rewrite(v6),
            Err(ReplyError::NotIpv4("2001:db8::1".parse().unwrap()))
        );

        let reply = pasv(b"229 Entering Extended Passive Mode (!!!6446!)").unwrap();
        assert_eq!(reply.port(), 6446);
        assert_eq!(
            reply.rewrite(v6),
            Ok(b"229 Entering Extended Passive Mode (!!!61000!)\r\n".to_vec())
        );
    }

    /// If `text` parses, rewriting it and parsing the result again gives
    /// the same reply with only the endpoint changed.
    fn check_rewrite_reparses(text: &[u8]) -> Result<(), TestCaseError> {
        let Ok(reply) = PassiveReply::parse(text) else {
            return Ok(());
        };
        let new = SocketAddrV4::new([198, 18, 0, 2].into(), 61000);
        let line = reply.rewrite(new.into()).unwrap();
        let again = PassiveReply::parse(line.strip_suffix(b"\r\n").unwrap());
        let expected = match reply {
            PassiveReply::Pasv { prefix, suffix, .. } => PassiveReply::Pasv {
                addr: new,
                prefix,
                suffix,
            },
            PassiveReply::Epsv {
                delimiter,
                prefix,
                suffix,
                ..
            } => PassiveReply::Epsv {
                port: new.port(),
                delimiter,
                prefix,
                suffix,
            },
        };
        prop_assert_eq!(again, Ok(expected));
        Ok(())
    }

    proptest! {
        #[test]
        fn parsers_never_panic(text in proptest::collection::vec(any::<u8>(), 0..120)) {
            let class = ReplyTracker::new().classify(&text);
            prop_assert!(matches!(class.position, Single | First));
            check_rewrite_reparses(&text)?;
        }

        #[test]
        fn near_miss_227s_rewrite_cleanly(
            text in "227[ -][a-z (=,.+-]{0,8}F(,F){5}(,F)?[a-z ).,]{0,8}"
                .replace('F', "([0-9]{1,2}|1[0-9]{2}|2[0-4][0-9]|25[0-6]|0[0-9]{2})")
                .as_str(),
        ) {
            check_rewrite_reparses(text.as_bytes())?;
        }

        #[test]
        fn near_miss_229s_rewrite_cleanly(
            prefix in "[a-z (|]{0,8}",
            d in prop_oneof![Just(b'|'), Just(b'!'), Just(b'1'), 32u8..=127],
            port in "[0-9]{0,6}",
            closed in prop_oneof![3 => Just(true), 1 => Just(false)],
            suffix in "[a-z ).|]{0,8}",
        ) {
            let d = char::from(d);
            let close = if closed { ")" } else { "" };
            let text = format!("229 {prefix}({d}{d}{d}{port}{d}{close}{suffix}");
            check_rewrite_reparses(text.as_bytes())?;
        }

        #[test]
        fn tracker_never_panics_on_line_sequences(
            lines in proptest::collection::vec("(211|227|[0-9]{0,4})[ -]?[a-z0-9 ]{0,5}", 0..20),
        ) {
            let mut t = ReplyTracker::new();
            let mut open = None;
            for l in &lines {
                let class = t.classify(l.as_bytes());
                match class.position {
                    First => {
                        prop_assert!(open.is_none() && class.code.is_some());
                        open = class.code;
                    }
                    Last => prop_assert_eq!(class.code, open.take()),
                    Continuation => prop_assert!(open.is_some() && class.code.is_none()),
                    Single => prop_assert!(open.is_none()),
                }
            }
        }

        #[test]
        fn pasv_rewrite_round_trips(
            prefix in "[A-Za-z (=.]{0,20}",
            suffix in "[A-Za-z ).]{0,20}",
            old in any::<([u8; 4], u16)>(),
            new in any::<([u8; 4], u16)>(),
        ) {
            let old = SocketAddrV4::new(old.0.into(), old.1);
            let new = SocketAddrV4::new(new.0.into(), new.1);
            let text = format!("227 {prefix}{}{suffix}", hostport::encode_host_port(old));
            let reply = PassiveReply::parse(text.as_bytes()).unwrap();
            prop_assert_eq!(reply.port(), old.port());
            let rewritten = reply.rewrite(new.into()).unwrap();
            let expected = format!("227 {prefix}{}{suffix}\r\n", hostport::encode_host_port(new));
            prop_assert_eq!(&rewritten, expected.as_bytes());
            match PassiveReply::parse(&text_of(&rewritten)).unwrap() {
                PassiveReply::Pasv { addr, prefix: p, suffix: s } => {
                    prop_assert_eq!(addr, new);
                    prop_assert_eq!(p, format!("227 {prefix}").into_bytes());
                    prop_assert_eq!(s, suffix.into_bytes());
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn epsv_rewrite_round_trips(
            d in (33u8..=126).prop_filter("a usable delimiter", |d| !d.is_ascii_digit() && !matches!(d, b'(' | b')')),
            old in any::<u16>(),
            new in any::<u16>(),
        ) {
            let d = char::from(d);
            let text = format!("229 Entering Extended Passive Mode ({d}{d}{d}{old}{d})");
            let reply = PassiveReply::parse(text.as_bytes()).unwrap();
            prop_assert_eq!(reply.port(), old);
            let rewritten = reply.rewrite(SocketAddr::from(([0, 0, 0, 0], new))).unwrap();
            let expected = format!("229 Entering Extended Passive Mode ({d}{d}{d}{new}{d})\r\n");
            prop_assert_eq!(&rewritten, expected.as_bytes());
        }
    }
}
