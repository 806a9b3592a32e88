//! The sans-IO core of the FTP control channel: framing, commands, replies
//! and the host-port encodings they carry.
//!
//! Everything here is pure: bytes in, values out, values in, bytes out. It
//! opens no socket, reads no clock and keeps no state beyond one connection
//! direction's line buffer ([`LineBuffer`]) and multi-line reply state
//! ([`ReplyTracker`]). Deciding what to do with a parsed command or reply
//! (policy, pinholes, NAT) belongs to the session and proxy modules.
//!
//! Every parser takes arbitrary bytes from the network, so none may panic:
//! outside tests clippy rejects the usual panic sources below. Numbers read
//! from the input use checked arithmetic; the only other arithmetic is on
//! positions inside a buffer, which cannot overflow.

#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic
    )
)]

pub mod canonical;
pub mod command;
pub mod framing;
pub mod hostport;
pub mod reply;

pub use command::Command;
pub use framing::{FramingError, LineBuffer};
pub use hostport::HostPortError;
pub use reply::{PassiveReply, ReplyError, ReplyLine, ReplyPosition, ReplyTracker};
