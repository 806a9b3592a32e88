//! ftp-alg run as a service end to end: readiness and watchdog notifications, SIGHUP reload,
//! the table loaded again after a ruleset flush, and journal logging; the bodies are in
//! `common::service`.

// Each test binary uses its own part of the shared harness.
#[allow(unused)]
mod common;

use common::service;

#[test]
fn notify_ready_watchdog_and_stopping() {
    service::notify_ready_watchdog_and_stopping();
}

#[test]
fn sighup_reloads_policy_for_new_sessions() {
    service::sighup_reloads_policy_for_new_sessions();
}

#[test]
fn a_flushed_table_is_loaded_again() {
    service::a_flushed_table_is_loaded_again();
}

#[test]
fn journal_gets_priorities_and_session_fields() {
    service::journal_gets_priorities_and_session_fields();
}

#[test]
fn masked_ct_mark_keeps_the_other_bits() {
    service::masked_ct_mark_keeps_the_other_bits();
}

#[test]
fn full_ct_mark_overwrites_the_other_bits() {
    service::full_ct_mark_overwrites_the_other_bits();
}

#[test]
fn journald_filters_by_priority_and_session() {
    service::journald_filters_by_priority_and_session();
}

#[test]
fn sighup_hands_over_what_it_cannot_apply() {
    service::sighup_hands_over_what_it_cannot_apply();
}
