//! Beyond one machine (issue 14): an active/standby gateway pair with keepalived and
//! conntrackd, and sidecars scaled out behind one load-balanced address (bodies in
//! `common::ha`; docs/ha.md has the configurations and the numbers).

// Each test binary uses its own part of the shared harness.
#[allow(unused)]
mod common;

use common::ha::{failover, Carry, Failure};

#[test]
fn primary_killed_transfers_finish_through_the_standby() {
    let run = failover(Failure::Killed, Carry::Everything);
    run.assert_everything_survived();
    // The killed daemon's sockets closed: curl reads EOF where the 226 should be (56); lftp
    // reconnects through the standby, finds the file whole and exits 0.
    run.assert_clients_report(56, 0);
}

#[test]
fn primary_cut_off_transfers_finish_through_the_standby() {
    let run = failover(Failure::LinksDown, Carry::Everything);
    run.assert_everything_survived();
    // Nobody closes the cut-off daemon's sockets: curl waits for the 226 until --max-time (28);
    // lftp times out (net:timeout), reconnects through the standby and exits 0.
    run.assert_clients_report(28, 0);
}

#[test]
fn without_conntrackd_transfers_break() {
    let run = failover(Failure::LinksDown, Carry::NoSync);
    run.assert_transfers_broke();
}

#[test]
fn from_the_node_address_transfers_break() {
    let run = failover(Failure::LinksDown, Carry::NodeAddress);
    run.assert_transfers_broke();
}
