//! `LineBuffer` against a model of its contract, fed in reads cut at arbitrary points.
//!
//! Input: `[max_line, count, plan × count, stream...]`. Each plan byte makes one read of
//! `plan % 16` bytes of the stream (0 is an empty read), followed by `plan / 16` calls to
//! `next_line` (15: until it has nothing more); the rest of the stream is then one last read.
//! Not draining after every read matters: the session leaves lines buffered while it waits
//! for a pinhole or for the server's replies, and keeps pushing what the socket brings.

#![no_main]

use ftp_alg::ftp::framing::{FramingError, LineBuffer};
use libfuzzer_sys::fuzz_target;

type Item = Result<Vec<u8>, FramingError>;

fuzz_target!(|data: &[u8]| {
    let [max, count, rest @ ..] = data else {
        return;
    };
    let max = usize::from(*max);
    let (plan, stream) = rest.split_at(usize::from(*count).min(rest.len()));

    let chunked = frame_in_reads(max, plan, stream);
    for line in chunked.0.iter().flatten() {
        // `max` counts the bytes before the LF, CR included.
        assert!(
            line.len() <= max + 1,
            "line of {} bytes, max {max}",
            line.len()
        );
    }
    let whole = frame_in_reads(max, &[], stream);
    assert_eq!(
        chunked, whole,
        "the lines depend on how the stream was split"
    );
    assert_eq!(whole, model(max, stream));
});

/// Frame `stream` in the reads that `plan` describes; the items, then what stays pending.
fn frame_in_reads(max: usize, plan: &[u8], mut stream: &[u8]) -> (Vec<Item>, Vec<u8>) {
    let mut buffer = LineBuffer::new(max);
    let mut items = Vec::new();
    for &step in plan {
        let (read, rest) = stream.split_at(usize::from(step % 16).min(stream.len()));
        stream = rest;
        buffer.push(read);
        let pulls = match step / 16 {
            15 => usize::MAX,
            n => n.into(),
        };
        items.extend(std::iter::from_fn(|| buffer.next_line()).take(pulls));
    }
    buffer.push(stream);
    items.extend(std::iter::from_fn(|| buffer.next_line()));
    let pending = buffer.take_pending();
    (items, pending)
}

/// The contract, from the whole stream at once: every LF ends a line, returned byte for byte
/// unless more than `max` bytes precede its LF, in which case it is one `LineTooLong`. An
/// unterminated tail stays pending, unless it is too long already: then it is reported and
/// dropped.
fn model(max: usize, stream: &[u8]) -> (Vec<Item>, Vec<u8>) {
    let too_long = || Err(FramingError::LineTooLong { max });
    let mut items = Vec::new();
    let mut pending = Vec::new();
    for segment in stream.split_inclusive(|&b| b == b'\n') {
        match segment.split_last() {
            Some((b'\n', before)) if before.len() <= max => items.push(Ok(segment.to_vec())),
            Some((b'\n', _)) => items.push(too_long()),
            _ if segment.len() > max => items.push(too_long()),
            _ => pending = segment.to_vec(),
        }
    }
    (items, pending)
}
