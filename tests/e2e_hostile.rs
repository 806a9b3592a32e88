//! Hostile control lines (issue 10): bodies in `common::hostile`.

// Each test binary uses its own part of the shared harness (this one not its macro).
#[allow(unused)]
mod common;

use common::hostile;
use common::Server;

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
