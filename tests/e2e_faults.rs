//! Faults end to end: the daemon killed or stopped, nft or netlink failing at run time, an
//! unreachable upstream, a client that vanishes. Real vsftpd and Python clients through the daemon; the
//! bodies, and what each shows, are in `common::faults`.

// Each test binary uses its own part of the shared harness (this one not its macro).
#[allow(unused)]
mod common;

use common::faults;

#[test]
fn sigkill_during_a_transfer_leaves_the_data_flowing() {
    faults::daemon_killed_during_a_transfer();
}

#[test]
fn nft_failing_at_run_time_answers_425() {
    faults::nft_failing_at_run_time();
}

#[test]
fn netlink_failing_at_run_time_answers_425() {
    faults::netlink_failing_at_run_time();
}

#[test]
fn unreachable_upstream_answers_421() {
    faults::upstream_unreachable();
}

#[test]
fn unreachable_upstreams_leak_no_fds_or_tasks() {
    faults::unreachable_upstreams_leak_nothing();
}

#[test]
fn vanished_client_loses_its_pinholes() {
    faults::client_vanishing_mid_transfer();
}

#[test]
fn sigterm_removes_every_pinhole() {
    faults::sigterm_removes_every_pinhole();
}

#[test]
fn sigterm_leaves_running_transfers_alone() {
    faults::sigterm_during_a_transfer();
}

#[test]
fn sigterm_lets_open_sessions_finish() {
    faults::sigterm_lets_open_sessions_finish();
}

#[test]
fn sigterm_after_a_ruleset_flush_exits_0() {
    faults::sigterm_after_a_ruleset_flush();
}
