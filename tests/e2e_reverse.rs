//! Reverse and sidecar modes end to end: a client in namespace C dials ftp-alg on G
//! (198.18.0.1:21), whose upstream is vsftpd in S (reverse) or on G itself (sidecar). Every
//! case also runs its negative control: the policy without its `ct mark` line.

// Each test binary uses its own part of the shared harness.
#[allow(dead_code)]
mod common;

use common::Client::{Curl, Lftp};
use common::DataMode::{Eprt, Epsv, Pasv, PasvSkipIp, Port};
use common::Topology::{Reverse, Sidecar};

common::scenarios! {
    checks: [round_trip, blocked_without_mark_rule];
    reverse_lftp_pasv: Reverse, Lftp, Pasv;
    reverse_lftp_port: Reverse, Lftp, Port;
    reverse_curl_epsv: Reverse, Curl, Epsv;
    reverse_curl_eprt: Reverse, Curl, Eprt;
    reverse_curl_pasv: Reverse, Curl, Pasv;
    reverse_curl_pasv_skip_ip: Reverse, Curl, PasvSkipIp;
    sidecar_lftp_pasv: Sidecar, Lftp, Pasv;
    sidecar_lftp_port: Sidecar, Lftp, Port;
}

#[test]
fn reverse_pinholes_follow_the_session() {
    common::pinholes_follow_session(Reverse);
}

#[test]
fn sidecar_pinholes_follow_the_session() {
    common::pinholes_follow_session(Sidecar);
}
