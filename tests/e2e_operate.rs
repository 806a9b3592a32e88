//! The operator's CLI, metrics and logs end to end, against a daemon in namespaces; the
//! bodies are in `common::operate`.

// Each test binary uses its own part of the shared harness.
#[allow(unused)]
mod common;

use common::operate;

#[test]
fn operator_cli_against_a_running_daemon() {
    operate::operator_cli_against_a_running_daemon();
}

#[test]
fn cli_without_a_daemon_and_for_other_users() {
    operate::cli_without_a_daemon_and_for_other_users();
}

#[test]
fn a_client_that_does_not_read_can_still_be_killed() {
    operate::a_client_that_does_not_read_can_still_be_killed();
}

#[test]
fn sessions_and_pinholes_agree_after_a_kernel_timeout() {
    operate::sessions_and_pinholes_agree_after_a_kernel_timeout();
}
