//! The deployment guides' snippets, end to end (bodies in `common::guides`).

// Each test binary uses its own part of the shared harness.
#[allow(unused)]
mod common;

use common::guides;

#[test]
fn gateway_guide_strict_output_chain() {
    guides::gateway_strict_output_chain();
}

#[test]
fn gateway_guide_own_redirect() {
    guides::gateway_own_redirect();
}

#[test]
fn sidecar_guide_host_ruleset_reloads() {
    guides::sidecar_host_ruleset_reloads();
}

#[test]
fn gateway_guide_docker_user_v4() {
    guides::gateway_docker_user(common::Family::V4);
}

#[test]
fn gateway_guide_docker_user_v6() {
    guides::gateway_docker_user(common::Family::V6);
}

#[test]
fn gateway_guide_firewalld_v4() {
    guides::gateway_firewalld(common::Family::V4);
}

#[test]
fn gateway_guide_firewalld_v6() {
    guides::gateway_firewalld(common::Family::V6);
}

#[test]
fn reverse_guide_firewalld_ftp_service_breaks_passive() {
    guides::reverse_firewalld_ftp_service();
}
