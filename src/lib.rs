//! ftp-alg: an FTP application layer gateway for Linux.
//!
//! The layers, from the bottom up:
//! - [`ftp`]: the sans-IO protocol core (framing, typed commands and replies, host-port codecs);
//! - [`ports`] and [`pinhole`]: the data ports handed out and the firewall pinholes, with the
//!   nftables backends in [`pinhole::netlink`] and [`pinhole::nft`], the only code that talks to
//!   the kernel firewall;
//! - [`session`]: the per-control-connection state machine and its policy, without I/O: it
//!   asks for pinholes with plain values ([`pinhole::PinholeRequest`]) and never calls the
//!   backend;
//! - [`proxy`]: the tokio listeners and connections that carry out each session's actions;
//!   [`registry`] keeps the live sessions;
//! - [`daemon`]: start-up and shutdown, and the [`handover`] of the listeners to a new
//!   process, with the [`control`] API for the CLI and the
//!   Prometheus [`metrics`]; every listener retries a failed accept as [`accept`] does;
//! - [`config`] and [`cli`]: the TOML configuration and the command line ([`manpage`] makes
//!   ftp-alg.toml(5) from README.md's key table); [`origdst`] reads a
//!   redirected connection's original destination, and [`upstream`] says where a gateway may
//!   connect on a client's behalf and connects there; [`upstream_tls`] is what ftp-alg says
//!   to a server it speaks TLS to before the session starts (sans-IO);
//! - [`notify`] (systemd readiness), [`reload`] (SIGHUP), [`heal`] (the table loaded again
//!   when it is deleted under the daemon) and [`logging`] (journal or stderr): operating it as
//!   a service;
//! - `demo` (cargo feature `demo`, on by default): `ftp-alg demo`, the whole thing in
//!   throw-away network namespaces;
//! - [`sniff`]: `ftp-alg sniff`, a read-only capture that says which announced data endpoints
//!   have a pinhole.

pub mod accept;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datarelay;
#[cfg(feature = "demo")]
pub mod demo;
pub mod ftp;
pub mod handover;
pub mod heal;
pub mod logging;
pub mod manpage;
pub mod metrics;
pub mod notify;
pub mod origdst;
pub mod pinhole;
pub mod ports;
#[cfg(test)]
mod proptest_reach;
pub mod proxy;
pub mod registry;
pub mod reload;
pub mod session;
pub mod sniff;
pub mod tls;
pub mod upstream;
pub mod upstream_tls;
