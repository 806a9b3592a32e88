//! Beyond one machine (issue 14): an active/standby gateway pair with keepalived and
//! conntrackd, and sidecars scaled out behind one load-balanced address (bodies in
//! `common::ha`; docs/ha.md has the configurations and the numbers).

// Each test binary uses its own part of the shared harness.
#[allow(unused)]
mod common;

use common::ha::{failover, Affinity, Carry, Failure, Service};

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

/// Passive and active downloads from many client addresses at once, through one Service
/// address with ClientIP affinity to two pods: every one succeeds, and both pods serve.
#[test]
fn sidecars_behind_a_service_with_client_ip_affinity() {
    let svc = Service::new(Affinity::ClientIp);
    let (pasv, port) = (svc.downloads(true, true), svc.downloads(false, true));
    let per_pod = svc.served_per_pod();
    println!(
        "ClientIp: {pasv} passive, {port} active of {} each; per pod {per_pod:?}",
        svc.clients()
    );
    assert_eq!((pasv, port), (svc.clients(), svc.clients()));
    assert!(
        per_pod.iter().all(|&n| n > 0),
        "a pod served nothing: {per_pod:?}"
    );
}

/// The same Service with the endpoint picked per connection (round robin): every passive data
/// connection reaches the pod that does not hold its pinhole and fails; active ones, which the
/// pod opens itself, still succeed.
#[test]
fn without_affinity_passive_transfers_fail() {
    let svc = Service::new(Affinity::None);
    let (pasv, port) = (svc.downloads(true, false), svc.downloads(false, false));
    println!(
        "no affinity: {pasv} passive, {port} active of {} each",
        svc.clients()
    );
    assert_eq!(pasv, 0, "passive downloads succeeded without affinity");
    assert_eq!(
        svc.passive_announcements(),
        svc.clients(),
        "every passive session's control connection got through: only its data connection failed"
    );
    assert_eq!(port, svc.clients(), "active downloads need no affinity");
}
