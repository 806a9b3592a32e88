//! The one reading of a control line that every peer shares.
//!
//! FTP servers disagree on what a command line is. proftpd ends a command only at CR LF (a bare
//! LF stays inside the argument) and ends the verb at any `isspace()` byte, VT and FF included;
//! vsftpd ends a command at LF and splits the verb at SP; pure-ftpd turns control bytes into
//! `_`. A line whose meaning depends on the reader lets a client show ftp-alg one thing and the
//! server another: a PORT hidden from ftp-alg behind a VT, or a fake 227 smuggled into an error
//! reply that echoes its argument. So ftp-alg forwards only lines that every server reads the
//! same way, in a form it writes itself:
//!
//! - a command is `VERB` or `VERB SP argument`, the verb ASCII letters only;
//! - no C0 control byte (NUL, CR, LF, TAB, VT, FF, ESC, ...) and no DEL anywhere but the
//!   terminator, so there is nothing for a server to split on but SP, and nothing to end the line
//!   but its end;
//! - Telnet commands (RFC 854: IAC sequences) are removed, and a literal 0xFF (IAC IAC) is
//!   refused: servers that interpret Telnet and servers that do not would read it differently;
//! - the line is re-terminated with CR LF, whatever ended it.
//!
//! Server replies get the same care the other way: [`reply`] re-terminates a reply line with CR
//! LF and blanks its control bytes, so a client reads exactly the lines ftp-alg read.
//!
//! Not here: cutting the stream into lines ([`super::framing`]) and what a verb means
//! ([`super::command`]).

use thiserror::Error;

use super::framing::text_of;

/// Why a client line has no single reading, so ftp-alg refuses it instead of forwarding it.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum Ambiguity {
    /// A control byte inside the line: proftpd splits the verb at VT and FF, vsftpd does not;
    /// proftpd reads past a bare LF, vsftpd ends the command there.
    #[error("control byte 0x{0:02x} inside a command")]
    ControlByte(u8),
    /// A literal 0xFF (Telnet IAC IAC): a server that interprets Telnet reads one byte, one that
    /// does not reads two.
    #[error("a literal 0xFF byte (Telnet IAC IAC) inside a command")]
    LiteralIac,
    /// The line does not start with a letters-only verb (empty line, leading blank, digits or
    /// punctuation in the verb): servers disagree on what such a line is, and some answer nothing.
    #[error("a command must start with its name, letters only")]
    BadVerb,
}

/// The text ftp-alg reads and forwards for a client line (`raw` as framed, terminator
/// included), without its terminator: the caller forwards it followed by CR LF.
pub fn command(raw: &[u8]) -> Result<Vec<u8>, Ambiguity> {
    let text = text_of(raw);
    if let Some(&b) = text.iter().find(|&&b| is_control(b)) {
        return Err(Ambiguity::ControlByte(b));
    }
    if text.contains(&0xff) {
        return Err(Ambiguity::LiteralIac);
    }
    let verb = text.split(|&b| b == b' ').next().unwrap_or_default();
    if verb.is_empty() || !verb.iter().all(u8::is_ascii_alphabetic) {
        return Err(Ambiguity::BadVerb);
    }
    Ok(text)
}

/// A server line as the client must receive it: its text with every control byte but TAB
/// replaced by a space, re-terminated with CR LF. The Telnet bytes of the line are kept (clients
/// interpret them, and a reply's IAC IAC is how a server sends a 0xFF in a file name).
pub fn reply(raw: &[u8]) -> Vec<u8> {
    let line = raw.strip_suffix(b"\n").unwrap_or(raw);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut out: Vec<u8> = line
        .iter()
        .map(|&b| if is_control(b) && b != b'\t' { b' ' } else { b })
        .collect();
    out.extend_from_slice(b"\r\n");
    out
}

/// C0 controls and DEL (what C's `iscntrl()` says in the C locale).
fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ordinary_commands_keep_their_text() {
        for (raw, text) in [
            (&b"NOOP\r\n"[..], &b"NOOP"[..]),
            (b"NOOP\n", b"NOOP"),
            (b"RETR  a file name \r\n", b"RETR  a file name "),
            (
                b"CWD \xe6\x97\xa5\xe6\x9c\xac\r\n",
                b"CWD \xe6\x97\xa5\xe6\x9c\xac",
            ),
            (b"\xff\xf4\xff\xf2ABOR\r\n", b"ABOR"),
            (b"PO\xff\xf1RT 1,2,3,4,5,6\r\n", b"PORT 1,2,3,4,5,6"),
        ] {
            assert_eq!(command(raw), Ok(text.to_vec()), "{raw:?}");
        }
    }

    #[test]
    fn lines_that_servers_read_differently_are_refused() {
        use Ambiguity::*;
        for (raw, why) in [
            (&b"PORT\x0b203,0,113,1,238,72\r\n"[..], ControlByte(0x0b)),
            (b"STOR\x0cx\r\n", ControlByte(0x0c)),
            (b"CWD nx\x00\r\n", ControlByte(0)),
            (b"CWD a\rb\r\n", ControlByte(b'\r')),
            (b"CWD a\r\r\n", ControlByte(b'\r')),
            (b"PORT\t1,2,3,4,5,6\r\n", ControlByte(b'\t')),
            (b"RETR a\x1b[2J\r\n", ControlByte(0x1b)),
            (b"RETR a\x7f\r\n", ControlByte(0x7f)),
            (b"RETR a\xff\xffb\r\n", LiteralIac),
            (b"\r\n", BadVerb),
            (b" PORT 1,2,3,4,5,6\r\n", BadVerb),
            (b"227 Entering Passive Mode (1,2,3,4,5,6)\r\n", BadVerb),
            (b"X-1 a\r\n", BadVerb),
            (b"\xc3\xa9TAT\r\n", BadVerb),
        ] {
            assert_eq!(command(raw), Err(why), "{raw:?}");
        }
    }

    #[test]
    fn replies_are_re_terminated_and_lose_their_control_bytes() {
        assert_eq!(reply(b"200 ok\n"), b"200 ok\r\n");
        assert_eq!(reply(b"200 ok\r\n"), b"200 ok\r\n");
        assert_eq!(
            reply(b"550 nx\x00\x0b\rx\x1b[2J:\tno\r\n"),
            b"550 nx   x [2J:\tno\r\n"
        );
        assert_eq!(reply(b"257 \"a\xff\xffb\"\r\n"), b"257 \"a\xff\xffb\"\r\n");
    }

    proptest! {
        /// What ftp-alg forwards has exactly one reading: one line, its verb split at the only
        /// kind of blank in it, nothing any server would strip or split on.
        #[test]
        fn a_forwarded_command_is_one_plain_line(raw in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(text) = command(&raw) {
                prop_assert!(text.iter().all(|&b| !is_control(b) && b != 0xff));
                let verb = text.split(|&b| b == b' ').next().unwrap_or_default();
                prop_assert!(!verb.is_empty() && verb.iter().all(u8::is_ascii_alphabetic));
            }
        }

        #[test]
        fn a_forwarded_reply_is_one_line(raw in proptest::collection::vec(any::<u8>(), 0..80)) {
            let out = reply(&raw);
            prop_assert!(out.ends_with(b"\r\n"));
            let body = &out[..out.len() - 2];
            prop_assert!(body.iter().all(|&b| !is_control(b) || b == b'\t'));
        }
    }
}
