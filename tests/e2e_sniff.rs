//! `ftp-alg sniff` end to end: a capture on the gateway's client-side interface while real
//! sessions run through the daemon, and while they bypass it. The bodies are in
//! `common::sniff`. Run with `--nocapture` to see sniff's own output.

// Each test binary uses its own part of the shared harness (this one not its macro).
#[allow(unused)]
mod common;

use common::sniff;

#[test]
fn gateway_announcements_have_pinholes() {
    sniff::gateway_announcements_have_pinholes();
}

#[test]
fn bypassing_sessions_have_no_pinhole() {
    sniff::bypassing_sessions_have_no_pinhole();
}

#[test]
fn a_refused_port_has_no_pinhole_while_the_table_exists() {
    sniff::a_refused_port_has_no_pinhole_while_the_table_exists();
}

#[test]
fn errors_and_exit_codes() {
    sniff::errors_and_exit_codes();
}

#[test]
fn real_transfers_have_pinholes() {
    sniff::real_transfers_have_pinholes();
}
