//! The deployment guides' nftables snippets, run as the guides print them: each is read from
//! its `<!-- snippet: NAME -->` block in `docs/`, loaded into the gateway's ruleset, and real
//! transfers (curl, passive and active) must go through it byte for byte. A guide that is
//! edited into something that no longer works fails here.

use super::*;

/// The body of the fenced block that follows `<!-- snippet: NAME -->` in `doc` (under
/// `docs/`).
fn snippet(doc: &str, name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join(doc);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let marker = format!("<!-- snippet: {name} -->");
    let after = text
        .split_once(&marker)
        .unwrap_or_else(|| panic!("{doc} has no {marker}"))
        .1;
    let body = after
        .split_once("```nft\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .unwrap_or_else(|| panic!("{doc}: no ```nft block after {marker}"))
        .0;
    body.to_owned()
}

/// Load a snippet into G's ruleset, from a file as an operator would.
fn load(lab: &Lab, doc: &str, name: &str) {
    let path = lab.dir.join(format!("{name}.nft"));
    fs::write(&path, snippet(doc, name)).expect("write the snippet");
    lab.nft(&["-f", &path.to_string_lossy()]);
}

/// A passive and an active download with curl, each byte for byte.
fn transfers_pass(lab: &mut Lab, what: &str) {
    for mode in [DataMode::Pasv, DataMode::Port] {
        let run = lab.client_session(Client::Curl, mode, &[Op::Download]);
        assert!(
            run.status.success(),
            "{what}, {mode:?}: the download failed\n{}",
            run.transcript
        );
        assert_same_bytes(
            "download",
            &lab.read(&lab.download_path()),
            &lab.read(&lab.served_path()),
        );
        lab.assert_no_pinholes_left();
    }
}

/// docs/gateway.md's strict output chain: policy drop, the daemon's marked connections to the
/// servers let out, and the replies on the redirected control connections (established).
pub fn gateway_strict_output_chain() {
    let mut lab = Lab::new(Topology::Gateway(Family::V4), Setup::Alg);
    load(&lab, "gateway.md", "strict-output");
    transfers_pass(&mut lab, "strict output chain");
}

/// docs/gateway.md's redirect for operators who leave `proxy.intercept` empty: it must mark
/// the connection it redirects, or the shipped input chain drops it.
pub fn gateway_own_redirect() {
    let mut lab = Lab::new(Topology::Gateway(Family::V4), Setup::AlgStopped);
    lab.alg_config = "[proxy]\nintercept = []\n".to_owned();
    load(&lab, "gateway.md", "own-redirect");
    lab.start_alg();
    transfers_pass(&mut lab, "own redirect");
}

/// docs/sidecar.md's host ruleset, loaded twice as a firewall reload would: the second load
/// replaces the table instead of appending a copy of every rule, and transfers pass through it
/// on a sidecar host.
pub fn sidecar_host_ruleset_reloads() {
    let mut lab = Lab::new(Topology::Sidecar(Family::V4), Setup::Alg);
    let rules = |lab: &Lab| {
        must(lab.exec(&lab.gateway_ns(), &["nft", "list", "table", "inet", "host"]))
            .lines()
            .filter(|l| l.contains("accept"))
            .count()
    };
    load(&lab, "sidecar.md", "sidecar-host");
    let once = rules(&lab);
    load(&lab, "sidecar.md", "sidecar-host");
    assert_eq!(rules(&lab), once, "a reload appended rules");
    transfers_pass(&mut lab, "sidecar host ruleset");
}

/// The ruleset Docker sets up in iptables' `filter` and `nat` tables (as `iptables-save`
/// shows it with one bridge network and no published port), for `iptables-restore` and, with
/// the IPv6 subnet, `ip6tables-restore`: FORWARD policy DROP, DOCKER-USER jumped to first and
/// ending in RETURN, the isolation chains, and the masquerade of the bridge's subnet (a
/// documentation range here; the bridge itself need not exist for the rules to load).
fn docker_ruleset(subnet: &str) -> String {
    format!(
        "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s {subnet} ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -i docker0 ! -o docker0 -j ACCEPT
-A FORWARD -i docker0 -o docker0 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
"
    )
}

/// The fenced ```` ```sh ```` block after `<!-- snippet: NAME -->` in `doc`.
fn shell_snippet(doc: &str, name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join(doc);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let marker = format!("<!-- snippet: {name} -->");
    text.split_once(&marker)
        .unwrap_or_else(|| panic!("{doc} has no {marker}"))
        .1
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .unwrap_or_else(|| panic!("{doc}: no ```sh block after {marker}"))
        .0
        .to_owned()
}

/// The data modes curl speaks over `family`, one passive and one active.
fn modes(family: Family) -> [DataMode; 2] {
    match family {
        Family::V4 => [DataMode::Pasv, DataMode::Port],
        Family::V6 => [DataMode::Epsv, DataMode::Eprt],
    }
}

/// docs/gateway.md's `DOCKER-USER` lines, on a gateway whose only firewall is Docker's
/// (iptables-nft, so `ip filter`/`ip6 filter` beside `inet ftp_alg`): without them Docker's
/// FORWARD policy drops both the passive and the active data connection; with them (and
/// nothing else: no ESTABLISHED line) both downloads pass byte for byte.
pub fn gateway_docker_user(family: Family) {
    assert!(
        find_tool("iptables-restore").is_some() && find_tool("ip6tables-restore").is_some(),
        "iptables-restore not found: install the Debian package iptables (scripts/test does)"
    );
    let mut lab = Lab::new(Topology::Gateway(family), Setup::AlgStopped);
    // No nftables policy of the operator's own: Docker's chains are the firewall.
    lab.nft(&["delete", "table", "inet", "gateway"]);
    let g = lab.gateway_ns();
    for (restore, subnet) in [
        ("iptables-restore", "198.19.0.0/16"),
        ("ip6tables-restore", "2001:db8:d0c::/64"),
    ] {
        let path = lab.dir.join(format!("{restore}.rules"));
        fs::write(&path, docker_ruleset(subnet)).expect("write Docker's ruleset");
        must(lab.exec(&g, &[restore, &path.to_string_lossy()]));
    }
    lab.start_alg();

    for mode in modes(family) {
        let run = lab.client_session(Client::Curl, mode, &[Op::Download]);
        assert!(
            !run.status.success(),
            "Docker's ruleset without the guide's line, {mode:?}: the download succeeded, so \
             the lab does not show what the line is for\n{}",
            run.transcript
        );
    }
    // What failed was the data connections: the server logged the logins and both data
    // commands, and completed no transfer.
    let log = ServerLog::read(&lab);
    assert!(
        log.responses().iter().any(|r| r.starts_with("230 ")),
        "no login through Docker's ruleset: the control connection failed"
    );
    for mode in modes(family) {
        assert!(
            log.accepted(mode.verb()),
            "the server never accepted {}: the failure was not the data connection's",
            mode.verb()
        );
    }
    assert!(
        !log.responses().iter().any(|r| r.starts_with("226")),
        "the server completed a transfer through Docker's FORWARD policy drop"
    );

    let script = lab.dir.join("docker-user.sh");
    fs::write(
        &script,
        format!("set -e\n{}", shell_snippet("gateway.md", "docker-user")),
    )
    .expect("write the snippet");
    must(lab.exec(&g, &["sh", &script.to_string_lossy()]));
    for mode in modes(family) {
        let run = lab.client_session(Client::Curl, mode, &[Op::Download]);
        assert!(
            run.status.success(),
            "Docker's ruleset with the guide's DOCKER-USER line, {mode:?}: the download \
             failed\n{}\n{}",
            run.transcript,
            must(lab.exec(&g, &["nft", "list", "ruleset"]))
        );
        assert_same_bytes(
            "download",
            &lab.read(&lab.download_path()),
            &lab.read(&lab.served_path()),
        );
        lab.assert_no_pinholes_left();
    }
}
