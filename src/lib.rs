//! ftp-alg: an FTP application layer gateway for Linux.
//!
//! Layers, each depending only on those above it in this list:
//! - [`ftp`]: the sans-IO protocol core (framing, typed commands and replies, host-port codecs);
//! - [`session`]: the per-control-connection state machine and its policy, still without I/O;
//! - [`ports`] and [`pinhole`]: the data ports handed out and the firewall pinholes, with the
//!   nftables backend in [`pinhole::nft`];
//! - [`proxy`]: the tokio listeners and connections that carry out each session's actions;
//! - [`config`] and [`cli`]: the TOML configuration and the command line.

pub mod cli;
pub mod config;
pub mod ftp;
pub mod origdst;
pub mod pinhole;
pub mod ports;
pub mod proxy;
pub mod session;
