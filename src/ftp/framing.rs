//! Line framing of the FTP control channel.
//!
//! [`LineBuffer`] cuts one direction of a control connection into lines and
//! hands each one back byte for byte as received, so that every line the
//! proxy does not rewrite is forwarded unchanged. [`text_of`] then gives the
//! text a parser should look at.
//!
//! Reads from a TCP socket need not line up with line ends (RFC 1123
//! §4.1.2.10 forbids assuming they do): one read may hold several commands
//! or part of one, hence a buffer rather than per-read parsing.
//!
//! Not here: parsing commands or replies ([`super::command`],
//! [`super::reply`]), answering Telnet option negotiation (the proxy only
//! forwards it), and any I/O.

use std::collections::VecDeque;

use thiserror::Error;

/// Default longest line accepted, in bytes before its LF.
///
/// RFC 959 sets no limit. Real commands and replies are far shorter (a path
/// name is the longest argument), so 2 KiB leaves ample room while bounding
/// what a peer can make the proxy buffer.
pub const DEFAULT_MAX_LINE: usize = 2048;

/// Telnet "Interpret As Command" escape (RFC 854).
const IAC: u8 = 255;
/// Telnet WILL; WILL, WONT, DO and DONT (251..=254) each take an option byte.
const WILL: u8 = 251;
/// Telnet DONT, the last of the option negotiation verbs.
const DONT: u8 = 254;

/// Framing failures; the stream itself stays usable after each of them.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FramingError {
    /// A line held more than `max` bytes before its LF; it was dropped.
    #[error("line longer than {max} bytes")]
    LineTooLong {
        /// The limit the buffer was created with.
        max: usize,
    },
}

/// Reassembles lines from the reads of one direction of a control
/// connection.
#[derive(Debug)]
pub struct LineBuffer {
    buf: VecDeque<u8>,
    max_line: usize,
    /// Inside an over-long line that was already reported: bytes are dropped
    /// up to and including its LF.
    skipping: bool,
}

impl LineBuffer {
    /// A buffer accepting lines of at most `max_line` bytes before the LF.
    pub fn new(max_line: usize) -> Self {
        Self {
            buf: VecDeque::new(),
            max_line,
            skipping: false,
        }
    }

    /// Append bytes read from the socket.
    pub fn push(&mut self, data: &[u8]) {
        let data = if self.skipping {
            // The rest of an over-long line is discarded as it arrives, so a
            // peer that never sends LF cannot make the buffer grow.
            let mut halves = data.splitn(2, |&b| b == b'\n');
            let _skipped = halves.next();
            match halves.next() {
                Some(after_lf) => {
                    self.skipping = false;
                    after_lf
                }
                None => return,
            }
        } else {
            data
        };
        self.buf.extend(data);
    }

    /// Next complete line, including its terminator, exactly as received.
    ///
    /// A line ends at LF: RFC 959 prescribes CRLF, but real clients send a
    /// bare LF and servers accept it, so the proxy must see the same lines.
    /// `None` means more data is needed. A line longer than the limit is
    /// reported once as [`FramingError::LineTooLong`] and dropped through its
    /// LF, whenever that arrives; framing then resumes. Whether a line is too
    /// long does not depend on how the stream was split into reads.
    pub fn next_line(&mut self) -> Option<Result<Vec<u8>, FramingError>> {
        let too_long = FramingError::LineTooLong { max: self.max_line };
        match self.buf.iter().position(|&b| b == b'\n') {
            Some(lf) => {
                let line: Vec<u8> = self.buf.drain(..=lf).collect();
                if lf > self.max_line {
                    Some(Err(too_long))
                } else {
                    Some(Ok(line))
                }
            }
            None if self.buf.len() > self.max_line => {
                self.buf.clear();
                self.skipping = true;
                Some(Err(too_long))
            }
            None => None,
        }
    }

    /// Bytes buffered but not yet returned as a line.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Remove and return the buffered bytes (for pass-through at the end of
    /// the stream).
    pub fn take_pending(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf).into()
    }
}

/// The text of a line for parsing: the trailing LF and CR removed, and the
/// Telnet commands removed.
///
/// RFC 959 §4 runs the control connection over the Telnet protocol, and
/// §4.1.3 has a client precede ABOR with the Telnet "Interrupt Process" (IP)
/// and "Synch" (IAC DM) signals. Per RFC 854, IAC IAC stands for a data byte
/// 255, IAC WILL/WONT/DO/DONT take an option byte (3 bytes in all), and any
/// other IAC command is 2 bytes. A truncated sequence at the end is dropped.
pub fn text_of(line: &[u8]) -> Vec<u8> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut text = Vec::with_capacity(line.len());
    let mut bytes = line.iter().copied();
    while let Some(b) = bytes.next() {
        if b != IAC {
            text.push(b);
            continue;
        }
        match bytes.next() {
            Some(IAC) => text.push(IAC),
            Some(WILL..=DONT) => {
                let _option = bytes.next();
            }
            _ => {}
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Frame `chunks` in order, collecting every line and error.
    fn frame<'a>(
        max: usize,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> Vec<Result<Vec<u8>, FramingError>> {
        let mut lb = LineBuffer::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            lb.push(chunk);
            while let Some(item) = lb.next_line() {
                out.push(item);
            }
        }
        out
    }

    fn ok_lines(lines: &[&[u8]]) -> Vec<Result<Vec<u8>, FramingError>> {
        lines.iter().map(|l| Ok(l.to_vec())).collect()
    }

    #[test]
    fn crlf_and_bare_lf_both_end_a_line() {
        let got = frame(64, [&b"USER a\r\nPASS b\nQUIT\r\n"[..]]);
        assert_eq!(got, ok_lines(&[b"USER a\r\n", b"PASS b\n", b"QUIT\r\n"]));
    }

    #[test]
    fn incomplete_line_waits_and_stays_pending() {
        let mut lb = LineBuffer::new(64);
        lb.push(b"NOOP\r\nSTO");
        assert_eq!(lb.next_line(), Some(Ok(b"NOOP\r\n".to_vec())));
        assert_eq!(lb.next_line(), None);
        assert_eq!(lb.pending(), 3);
        assert_eq!(lb.take_pending(), b"STO");
        assert_eq!(lb.pending(), 0);
    }

    #[test]
    fn a_lone_cr_does_not_end_a_line() {
        assert_eq!(frame(64, [&b"A\rB\r\n"[..]]), ok_lines(&[b"A\rB\r\n"]));
    }

    #[test]
    fn every_split_of_pipelined_commands_gives_the_same_lines() {
        let stream = b"user anonymous\r\nPASS x\nTYPE I\r\nPORT 10,0,0,1,4,1\r\nLIST\r\n";
        let whole = frame(DEFAULT_MAX_LINE, [&stream[..]]);
        assert_eq!(whole.len(), 5);
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(frame(DEFAULT_MAX_LINE, [a, b]), whole, "cut at {cut}");
        }
        // Byte by byte too.
        assert_eq!(frame(DEFAULT_MAX_LINE, stream.chunks(1)), whole);
    }

    #[test]
    fn over_long_line_is_reported_once_and_framing_resumes() {
        let mut lb = LineBuffer::new(8);
        lb.push(b"0123456789");
        assert_eq!(
            lb.next_line(),
            Some(Err(FramingError::LineTooLong { max: 8 }))
        );
        assert_eq!(lb.pending(), 0);
        // The rest of the long line is skipped, without a second report.
        lb.push(b"abcdefghijklmnop");
        assert_eq!(lb.next_line(), None);
        assert_eq!(lb.pending(), 0);
        lb.push(b"qrs\r\nNOOP\r\n");
        assert_eq!(lb.next_line(), Some(Ok(b"NOOP\r\n".to_vec())));
        assert_eq!(lb.next_line(), None);
    }

    #[test]
    fn over_long_complete_line_is_an_error_too() {
        // Same verdict as when the long line arrives in pieces.
        let stream = b"0123456789\r\nok\r\n";
        let expected = vec![
            Err(FramingError::LineTooLong { max: 8 }),
            Ok(b"ok\r\n".to_vec()),
        ];
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(frame(8, [a, b]), expected, "cut at {cut}");
        }
    }

    #[test]
    fn line_of_exactly_max_bytes_is_accepted() {
        assert_eq!(frame(4, [&b"ABCD\n"[..]]), ok_lines(&[b"ABCD\n"]));
        assert_eq!(
            frame(4, [&b"ABCDE\n"[..]]),
            vec![Err(FramingError::LineTooLong { max: 4 })]
        );
    }

    #[test]
    fn zero_limit_accepts_only_empty_lines() {
        assert_eq!(
            frame(0, [&b"\nX\n\n"[..]]),
            vec![
                Ok(b"\n".to_vec()),
                Err(FramingError::LineTooLong { max: 0 }),
                Ok(b"\n".to_vec()),
            ]
        );
    }

    #[test]
    fn text_of_strips_terminators() {
        assert_eq!(text_of(b"NOOP\r\n"), b"NOOP");
        assert_eq!(text_of(b"NOOP\n"), b"NOOP");
        assert_eq!(text_of(b"NOOP"), b"NOOP");
        assert_eq!(text_of(b"A\r\r\n"), b"A\r");
        assert_eq!(text_of(b"\r\n"), b"");
    }

    #[test]
    fn text_of_removes_telnet_commands() {
        // ABOR preceded by IAC IP and the Synch's IAC DM (RFC 959 §4.1.3).
        assert_eq!(text_of(b"\xff\xf4\xff\xf2ABOR\r\n"), b"ABOR");
        // IAC IAC is a literal 0xFF.
        assert_eq!(text_of(b"RETR a\xff\xffb\r\n"), b"RETR a\xffb");
        // Option negotiation is three bytes.
        assert_eq!(text_of(b"\xff\xfd\x01NOOP\xff\xfb\x03\r\n"), b"NOOP");
        // Truncated sequences at the end vanish.
        assert_eq!(text_of(b"NOOP\xff"), b"NOOP");
        assert_eq!(text_of(b"NOOP\xff\xfe\r\n"), b"NOOP");
    }

    proptest! {
        #[test]
        fn every_split_gives_the_same_lines(
            stream in proptest::collection::vec(
                prop_oneof![Just(b'\n'), Just(b'\r'), any::<u8>()], 0..200),
            max in 0usize..32,
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let whole = frame(max, [&stream[..]]);
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for p in points {
                chunks.push(&stream[start..p]);
                start = p;
            }
            chunks.push(&stream[start..]);
            prop_assert_eq!(frame(max, chunks), whole);
        }

        #[test]
        fn lines_plus_pending_reassemble_the_stream_when_nothing_is_too_long(
            stream in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut lb = LineBuffer::new(usize::MAX);
            lb.push(&stream);
            let mut joined = Vec::new();
            while let Some(line) = lb.next_line() {
                let line = line.unwrap();
                prop_assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
                prop_assert_eq!(line.last(), Some(&b'\n'));
                joined.extend(line);
            }
            joined.extend(lb.take_pending());
            prop_assert_eq!(joined, stream);
        }

        #[test]
        fn text_of_never_panics_and_never_grows(line in proptest::collection::vec(any::<u8>(), 0..200)) {
            prop_assert!(text_of(&line).len() <= line.len());
        }
    }
}
