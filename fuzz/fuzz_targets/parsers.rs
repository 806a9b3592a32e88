//! Every parser of the sans-IO core on arbitrary lines: none may panic, and whatever parses
//! must survive being encoded (or rewritten) and parsed again, since the proxy forwards its
//! own encoding of what it parsed.
//!
//! The input is cut at each LF into lines, as `LineBuffer` would; one `ReplyTracker` reads
//! them all, so that multi-line replies span several lines.

#![no_main]

use std::net::{IpAddr, SocketAddr, SocketAddrV4};

use ftp_alg::ftp::command::Command;
use ftp_alg::ftp::framing::text_of;
use ftp_alg::ftp::hostport::{encode_eprt, encode_host_port, parse_eprt, parse_host_port};
use ftp_alg::ftp::reply::{PassiveReply, ReplyError, ReplyPosition, ReplyTracker};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut tracker = ReplyTracker::new();
    let mut open = None;
    for line in data.split_inclusive(|&b| b == b'\n') {
        let text = text_of(line);
        check_text_of(line, &text);
        check_command(&text);
        check_tracker(&mut tracker, &mut open, &text);
        check_passive_reply(&text);
        if let Ok(text) = std::str::from_utf8(&text) {
            check_host_port(text);
        }
    }
});

/// Without Telnet commands (IAC, 0xFF), the text is the line less its LF and then its CR.
fn check_text_of(line: &[u8], text: &[u8]) {
    assert!(text.len() <= line.len());
    if !line.contains(&0xff) {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        assert_eq!(text, line.strip_suffix(b"\r").unwrap_or(line));
    }
}

fn check_command(text: &[u8]) {
    let command = Command::parse(text);
    if let Some(line) = command.encode() {
        assert!(line.ends_with(b"\r\n"), "{line:?}");
        assert_eq!(Command::parse(&text_of(&line)), command, "{line:?}");
    }
}

/// RFC 959 §4.2's multi-line replies: a code opens one, the same code closes it, and every
/// line in between is text.
fn check_tracker(tracker: &mut ReplyTracker, open: &mut Option<u16>, text: &[u8]) {
    let class = tracker.classify(text);
    match class.position {
        ReplyPosition::First => {
            assert!(open.is_none() && class.code.is_some(), "{class:?}");
            *open = class.code;
        }
        ReplyPosition::Last => {
            assert!(class.code.is_some(), "{class:?}");
            assert_eq!(class.code, open.take(), "{class:?}");
        }
        ReplyPosition::Continuation => assert!(open.is_some() && class.code.is_none()),
        ReplyPosition::Single => assert!(open.is_none(), "{class:?}"),
    }
}

/// A 227/229 rewritten to each of these endpoints parses back as the same reply with only the
/// endpoint changed: an IPv4 address, its IPv4-mapped IPv6 form (which a 227 writes as IPv4),
/// and an IPv6 address (which a 227 cannot carry); ports of 1 to 5 digits.
fn check_passive_reply(text: &[u8]) {
    let Ok(reply) = PassiveReply::parse(text) else {
        return;
    };
    let endpoints = [
        "198.18.0.2:61000",
        "[::ffff:198.18.0.2]:7",
        "[2001:db8::1]:1024",
    ];
    for endpoint in endpoints {
        let endpoint: SocketAddr = endpoint.parse().expect("a valid address");
        let rewritten = reply.rewrite(endpoint);
        let expected = match (&reply, endpoint.ip().to_canonical()) {
            (PassiveReply::Pasv { .. }, IpAddr::V6(ip)) => {
                assert_eq!(rewritten, Err(ReplyError::NotIpv4(ip)));
                continue;
            }
            (PassiveReply::Pasv { prefix, suffix, .. }, IpAddr::V4(ip)) => PassiveReply::Pasv {
                addr: SocketAddrV4::new(ip, endpoint.port()),
                prefix: prefix.clone(),
                suffix: suffix.clone(),
            },
            (
                PassiveReply::Epsv {
                    delimiter,
                    prefix,
                    suffix,
                    ..
                },
                _,
            ) => PassiveReply::Epsv {
                port: endpoint.port(),
                delimiter: *delimiter,
                prefix: prefix.clone(),
                suffix: suffix.clone(),
            },
        };
        let line = rewritten.expect("an IPv4 or 229 rewrite succeeds");
        let again = line
            .strip_suffix(b"\r\n")
            .expect("the rewrite ends in CRLF");
        assert_eq!(PassiveReply::parse(again), Ok(expected), "{line:?}");
    }
}

fn check_host_port(text: &str) {
    if let Ok(addr) = parse_host_port(text) {
        assert_eq!(parse_host_port(&encode_host_port(addr)), Ok(addr));
    }
    if let Ok(addr) = parse_eprt(text) {
        assert_eq!(parse_eprt(&encode_eprt(addr)), Ok(addr));
    }
}
