//! Sidecar mode end to end: a client in namespace C dials ftp-alg on G (port 21), whose
//! upstream is a server on G itself (port 2100 of the same address), so that a passive data
//! connection ends in G's input chain and an active one starts in G's output chain.
//!
//! The interop matrix of tests/README.md, over IPv4 and IPv6: every server, every client, every
//! data mode the client can do. Its negative control, the policy without its `ct mark` line,
//! runs in the curl cells only: one client per server and mode, to save time.

// Each test binary uses its own part of the shared harness.
#[allow(dead_code)]
mod common;

common::scenarios! {
    negatives: [blocked_without_mark_rule];
    sidecar_v4: Sidecar(V4);
    sidecar_v6: Sidecar(V6);
}

#[test]
fn sidecar_pinholes_follow_the_session() {
    common::pinholes_follow_session(common::Topology::Sidecar(common::Family::V4));
}
