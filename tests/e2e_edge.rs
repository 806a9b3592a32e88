//! Edge cases of the control channel end to end (issue 3, "Interop"): real vsftpd, lftp, curl
//! and Python's ftplib through the daemon, in gateway or reverse mode as each case needs. The
//! bodies are in `common::edge`, which also says which edge cases no real server produces.

// Each test binary uses its own part of the shared harness (this one not its macro).
#[allow(unused)]
mod common;

use common::edge;
use common::Family::V4;
use common::Topology::{Gateway, Reverse};

#[test]
fn multi_line_feat_passes_intact() {
    edge::feat_reply_passes_intact();
}

#[test]
fn reply_like_lines_in_a_multi_line_greeting_pass_intact() {
    edge::reply_like_lines_in_a_greeting_pass_intact();
}

#[test]
fn gateway_227_with_a_private_address() {
    edge::pasv_address_is_replaced(Gateway(V4), edge::UNREACHABLE4);
}

#[test]
fn gateway_227_with_address_zero() {
    edge::pasv_address_is_replaced(Gateway(V4), "0.0.0.0");
}

#[test]
fn reverse_227_with_a_private_address() {
    edge::pasv_address_is_replaced(Reverse(V4), edge::UNREACHABLE4);
}

#[test]
fn reverse_227_with_address_zero() {
    edge::pasv_address_is_replaced(Reverse(V4), "0.0.0.0");
}

#[test]
fn abor_as_urgent_line_from_ftplib() {
    edge::abor_from_ftplib();
}

#[test]
fn abor_with_telnet_synch_from_lftp() {
    edge::abor_from_lftp();
}

#[test]
fn rest_then_retr_resumes_a_download() {
    edge::rest_resumes_a_download();
}

#[test]
fn pipelined_commands_get_their_replies_in_order() {
    edge::pipelined_commands();
}

#[test]
fn rein_removes_the_pinhole_before_it() {
    edge::rein_voids_the_data_endpoint();
}

#[test]
fn epsv_all_and_epsv_with_an_unsupported_family() {
    edge::epsv_all_and_unsupported_family();
}

#[test]
fn passive_and_active_alternate_in_one_session() {
    edge::passive_and_active_alternate();
}

#[test]
fn fifty_transfers_in_one_session() {
    edge::fifty_transfers_in_one_session();
}

#[test]
fn session_limits_and_idle_timeout() {
    edge::session_limits_and_idle_timeout();
}

#[test]
fn read_only_policy_refuses_uploads() {
    edge::read_only_policy_refuses_uploads();
}

#[test]
fn denied_server_network_gets_421() {
    edge::denied_server_network_gets_421();
}

#[test]
fn gateway_does_not_proxy_to_its_own_addresses() {
    edge::gateway_does_not_proxy_to_itself();
}
