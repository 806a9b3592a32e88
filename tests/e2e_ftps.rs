//! FTPS end to end (docs/ftps.md): ftp-alg ends TLS in front of a vsftpd without TLS, in
//! reverse and sidecar mode, with lftp, curl and Python's ftplib, passive and active, `PROT P`
//! data relayed; the same with TLS towards a vsftpd that requires it (`tls.upstream = "tls"`);
//! and the negative controls of `tests/common/ftps.rs`.

// Each test binary uses its own part of the shared harness (this one not its macro).
#[allow(unused)]
mod common;

use common::ftps::{self, TlsClient, Trust, UpstreamFault};
use common::{DataMode, Family, Topology};

const REVERSE: Topology = Topology::Reverse(Family::V4);
const SIDECAR: Topology = Topology::Sidecar(Family::V4);
const REVERSE6: Topology = Topology::Reverse(Family::V6);

#[test]
fn reverse_lftp_pasv() {
    ftps::round_trip(REVERSE, TlsClient::Lftp, DataMode::Pasv);
}

#[test]
fn reverse_lftp_port() {
    ftps::round_trip(REVERSE, TlsClient::Lftp, DataMode::Port);
}

#[test]
fn reverse_curl_pasv() {
    ftps::round_trip(REVERSE, TlsClient::Curl, DataMode::Pasv);
}

#[test]
fn reverse_curl_epsv() {
    ftps::round_trip(REVERSE, TlsClient::Curl, DataMode::Epsv);
}

#[test]
fn reverse_ftplib_pasv() {
    ftps::round_trip(REVERSE, TlsClient::Ftplib, DataMode::Pasv);
}

#[test]
fn reverse_ftplib_port() {
    ftps::round_trip(REVERSE, TlsClient::Ftplib, DataMode::Port);
}

#[test]
fn sidecar_lftp_pasv() {
    ftps::round_trip(SIDECAR, TlsClient::Lftp, DataMode::Pasv);
}

#[test]
fn sidecar_lftp_port() {
    ftps::round_trip(SIDECAR, TlsClient::Lftp, DataMode::Port);
}

#[test]
fn sidecar_ftplib_port() {
    ftps::round_trip(SIDECAR, TlsClient::Ftplib, DataMode::Port);
}

#[test]
fn relay_refuses_strangers() {
    ftps::relay_refuses_strangers();
}

#[test]
fn tls_off_and_tls_required() {
    ftps::tls_off_and_tls_required();
}

#[test]
fn implicit_lftp_port() {
    ftps::implicit_round_trip(TlsClient::Lftp, DataMode::Port);
}

#[test]
fn implicit_curl_pasv() {
    ftps::implicit_round_trip(TlsClient::Curl, DataMode::Pasv);
}

#[test]
fn sessions_and_sniff_show_tls() {
    ftps::sessions_and_sniff_show_tls();
}

#[test]
fn gateway_window_lftp_pasv() {
    ftps::through_window(Family::V4, TlsClient::Lftp);
}

#[test]
fn gateway_window_curl_pasv() {
    ftps::through_window(Family::V4, TlsClient::Curl);
}

#[test]
fn gateway_window_ftplib_pasv() {
    ftps::through_window(Family::V4, TlsClient::Ftplib);
}

#[test]
fn gateway_window_listed_and_closed() {
    ftps::window_listed_and_closed();
}

#[test]
fn gateway_blocked_without_window() {
    ftps::blocked_without_window();
}

#[test]
fn reverse6_lftp_epsv() {
    ftps::round_trip(REVERSE6, TlsClient::Lftp, DataMode::Epsv);
}

#[test]
fn reverse6_curl_epsv() {
    ftps::round_trip(REVERSE6, TlsClient::Curl, DataMode::Epsv);
}

#[test]
fn reverse6_ftplib_eprt() {
    ftps::round_trip(REVERSE6, TlsClient::Ftplib, DataMode::Eprt);
}

#[test]
fn gateway6_window_lftp_epsv() {
    ftps::through_window(Family::V6, TlsClient::Lftp);
}

#[test]
fn upstream_lftp_pasv() {
    ftps::upstream_round_trip(REVERSE, TlsClient::Lftp, DataMode::Pasv, (Trust::Ca, false));
}

#[test]
fn upstream_lftp_port() {
    ftps::upstream_round_trip(REVERSE, TlsClient::Lftp, DataMode::Port, (Trust::Ca, false));
}

#[test]
fn upstream_curl_pasv() {
    ftps::upstream_round_trip(REVERSE, TlsClient::Curl, DataMode::Pasv, (Trust::Ca, false));
}

#[test]
fn upstream_ftplib_pasv_pinned() {
    ftps::upstream_round_trip(
        REVERSE,
        TlsClient::Ftplib,
        DataMode::Pasv,
        (Trust::Pin, false),
    );
}

#[test]
fn upstream_implicit_curl_pasv() {
    ftps::upstream_round_trip(REVERSE, TlsClient::Curl, DataMode::Pasv, (Trust::Ca, true));
}

#[test]
fn upstream_many_transfers_resume() {
    ftps::upstream_many_transfers_resume();
}

#[test]
fn upstream_sidecar_lftp_pasv() {
    ftps::upstream_round_trip(SIDECAR, TlsClient::Lftp, DataMode::Pasv, (Trust::Ca, false));
}

#[test]
fn upstream_sidecar_lftp_port() {
    ftps::upstream_round_trip(SIDECAR, TlsClient::Lftp, DataMode::Port, (Trust::Ca, false));
}

#[test]
fn upstream6_lftp_epsv() {
    ftps::upstream_round_trip(
        REVERSE6,
        TlsClient::Lftp,
        DataMode::Epsv,
        (Trust::Ca, false),
    );
}

#[test]
fn upstream6_ftplib_eprt() {
    ftps::upstream_round_trip(
        REVERSE6,
        TlsClient::Ftplib,
        DataMode::Eprt,
        (Trust::Pin, false),
    );
}

#[test]
fn upstream_plain_client() {
    ftps::upstream_plain_client();
}

#[test]
fn upstream_shown_in_sessions_list() {
    ftps::upstream_shown_in_sessions_list();
}

#[test]
fn upstream_refused_wrong_pin() {
    ftps::upstream_refused(UpstreamFault::WrongPin);
}

#[test]
fn upstream_refused_other_ca() {
    ftps::upstream_refused(UpstreamFault::OtherCa);
}

#[test]
fn upstream_refused_no_tls() {
    ftps::upstream_refused(UpstreamFault::NoTls);
}
