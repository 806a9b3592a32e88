//! Gateway mode end to end: a client in namespace C dials a server in S through G, where
//! ftp-alg intercepts tcp/21 and opens pinholes in the shipped default-deny policy.
//!
//! The interop matrix of tests/README.md, over IPv4 and IPv6: every server, every client, every
//! data mode the client can do. Its two negative controls, the policy without its `ct mark`
//! line and no ALG at all, run in the curl cells only: one client per server and mode, to save
//! time.

// Each test binary uses its own part of the shared harness.
#[allow(dead_code)]
mod common;

use common::Family::V4;
use common::Topology::Gateway;

common::scenarios! {
    negatives: [blocked_without_mark_rule, blocked_when_alg_stopped];
    gateway_v4: Gateway(V4);
    gateway_v6: Gateway(V6);
}

#[test]
fn v4_pinholes_follow_the_session() {
    common::pinholes_follow_session(Gateway(V4));
}

#[test]
fn stale_pinholes_are_swept_at_start() {
    common::stale_pinholes_swept_at_start();
}
