//! Reverse mode end to end: a client in namespace C dials ftp-alg on G (198.18.0.1:21 or
//! [2001:db8:a::1]:21), whose upstream is a server in S that has no route back to C.
//!
//! The interop matrix of tests/README.md, over IPv4 and IPv6: every server, every client, every
//! data mode the client can do. Its negative control, the policy without its `ct mark` line,
//! runs in the curl cells only: one client per server and mode, to save time.

// Each test binary uses its own part of the shared harness.
#[allow(dead_code)]
mod common;

common::scenarios! {
    negatives: [blocked_without_mark_rule];
    reverse_v4: Reverse(V4);
    reverse_v6: Reverse(V6);
}

#[test]
fn reverse_pinholes_follow_the_session() {
    common::pinholes_follow_session(common::Topology::Reverse(common::Family::V4));
}
