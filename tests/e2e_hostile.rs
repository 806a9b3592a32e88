//! Hostile control lines (issue 10, "a line means the same to ftp-alg as to the server"): each
//! server's own reading of control bytes, a per-line suite and a seeded differential through the
//! daemon against vsftpd, proftpd and pure-ftpd, and the three confirmed attacks in every
//! topology. Bodies in `common::hostile`; tests/README.md has the list.

// Each test binary uses its own part of the shared harness (this one not its macro).
#[allow(unused)]
mod common;

use common::hostile;
use common::Family::{V4, V6};
use common::Server;
use common::Topology::{Gateway, Reverse, Sidecar};

#[test]
fn vsftpd_reading() {
    hostile::server_readings(Server::Vsftpd);
}

#[test]
fn proftpd_reading() {
    hostile::server_readings(Server::Proftpd);
}

#[test]
fn pure_ftpd_reading() {
    hostile::server_readings(Server::PureFtpd);
}

#[test]
fn vsftpd_hostile_lines() {
    hostile::hostile_lines(Server::Vsftpd);
}

#[test]
fn proftpd_hostile_lines() {
    hostile::hostile_lines(Server::Proftpd);
}

#[test]
fn pure_ftpd_hostile_lines() {
    hostile::hostile_lines(Server::PureFtpd);
}

#[test]
fn vsftpd_differential() {
    hostile::differential(Server::Vsftpd);
}

#[test]
fn proftpd_differential() {
    hostile::differential(Server::Proftpd);
}

#[test]
fn pure_ftpd_differential() {
    hostile::differential(Server::PureFtpd);
}

#[test]
fn smuggled_227_gateway() {
    hostile::smuggled_announcement(Gateway(V4));
}

#[test]
fn smuggled_227_reverse() {
    hostile::smuggled_announcement(Reverse(V4));
}

#[test]
fn smuggled_227_sidecar() {
    hostile::smuggled_announcement(Sidecar(V4));
}

#[test]
fn smuggled_229_gateway_v6() {
    hostile::smuggled_announcement(Gateway(V6));
}

#[test]
fn smuggled_229_reverse_v6() {
    hostile::smuggled_announcement(Reverse(V6));
}

#[test]
fn smuggled_229_sidecar_v6() {
    hostile::smuggled_announcement(Sidecar(V6));
}

#[test]
fn port_behind_vt_gateway() {
    hostile::port_behind_vt(Gateway(V4));
}

#[test]
fn port_behind_vt_reverse() {
    hostile::port_behind_vt(Reverse(V4));
}

#[test]
fn port_behind_vt_sidecar() {
    hostile::port_behind_vt(Sidecar(V4));
}

#[test]
fn unsolicited_227_gateway() {
    hostile::unsolicited_227(Gateway(V4));
}

#[test]
fn unsolicited_227_reverse() {
    hostile::unsolicited_227(Reverse(V4));
}

#[test]
fn unsolicited_227_sidecar() {
    hostile::unsolicited_227(Sidecar(V4));
}

#[test]
fn vsftpd_takes_the_longest_lines_max_line_allows() {
    hostile::longest_lines_fit(Server::Vsftpd);
}

#[test]
fn proftpd_takes_the_longest_lines_max_line_allows() {
    hostile::longest_lines_fit(Server::Proftpd);
}
