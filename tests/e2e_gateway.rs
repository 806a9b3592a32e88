//! Gateway mode end to end: a client in namespace C dials a vsftpd in S through G, where
//! ftp-alg intercepts tcp/21 and opens pinholes in the shipped default-deny policy. Every case
//! also runs its two negative controls: the policy without its `ct mark` line, and no ALG.

// Each test binary uses its own part of the shared harness.
#[allow(dead_code)]
mod common;

use common::Client::{Curl, Lftp};
use common::DataMode::{Eprt, Epsv, Pasv, PasvSkipIp, Port};
use common::Family::{V4, V6};
use common::Topology::Gateway;

common::scenarios! {
    checks: [round_trip, blocked_without_mark_rule, blocked_when_alg_stopped];
    v4_lftp_pasv: Gateway(V4), Lftp, Pasv;
    v4_lftp_port: Gateway(V4), Lftp, Port;
    v4_curl_epsv: Gateway(V4), Curl, Epsv;
    v4_curl_eprt: Gateway(V4), Curl, Eprt;
    v4_curl_pasv: Gateway(V4), Curl, Pasv;
    v4_curl_pasv_skip_ip: Gateway(V4), Curl, PasvSkipIp;
    v6_lftp_epsv: Gateway(V6), Lftp, Epsv;
    v6_lftp_eprt: Gateway(V6), Lftp, Eprt;
    v6_curl_epsv: Gateway(V6), Curl, Epsv;
    v6_curl_eprt: Gateway(V6), Curl, Eprt;
}

#[test]
fn v4_pinholes_follow_the_session() {
    common::pinholes_follow_session(Gateway(V4));
}

#[test]
fn stale_pinholes_are_swept_at_start() {
    common::stale_pinholes_swept_at_start();
}
