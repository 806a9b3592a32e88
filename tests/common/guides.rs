//! The deployment guides' nftables snippets, run as the guides print them: each is read from
//! its `<!-- snippet: NAME -->` block in `docs/`, loaded into the gateway's ruleset, and real
//! transfers (curl, passive and active) must go through it byte for byte. A guide that is
//! edited into something that no longer works fails here.

use super::*;
use std::os::unix::process::CommandExt;

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

/// A firewalld of the test's own in G: a private system bus (`dbus-daemon`, its socket in the
/// test's directory) and, in a private mount namespace, a tmpfs over /run and the test's
/// directory over /etc/firewalld, so nothing of the host's is read or written. firewalld's
/// nftables table is in G's network namespace. Killed (its process group) when dropped.
struct Firewalld {
    ns: String,
    bus: String,
    child: Child,
}

impl Firewalld {
    fn start(lab: &Lab) -> Firewalld {
        let dir = lab.dir.join("firewalld");
        let etc = dir.join("etc");
        fs::create_dir_all(&etc).expect("create firewalld's directory");
        // The stock configuration, nftables backend.
        fs::copy("/etc/firewalld/firewalld.conf", etc.join("firewalld.conf"))
            .expect("copy /etc/firewalld/firewalld.conf (package firewalld)");
        let socket = dir.join("bus");
        fs::write(
            dir.join("bus.conf"),
            format!(
                "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"
 \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context=\"default\">
    <allow user=\"*\"/>
    <allow own=\"*\"/>
    <allow send_destination=\"*\"/>
    <allow receive_sender=\"*\"/>
  </policy>
</busconfig>
",
                socket.display()
            ),
        )
        .expect("write the bus configuration");
        let bus = format!("unix:path={}", socket.display());
        let out = dir.join("firewalld.out");
        let ns = lab.gateway_ns();
        let child = lab
            .exec(
                &ns,
                &[
                    "unshare",
                    "-m",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    "set -e; mount -t tmpfs tmpfs /run; mount --bind \"$0/etc\" /etc/firewalld; \
                     dbus-daemon --config-file=\"$0/bus.conf\" --nofork --nopidfile --nosyslog & \
                     for i in $(seq 200); do [ -S \"$0/bus\" ] && break; sleep 0.05; done; \
                     exec firewalld --nofork --nopid --log-target console",
                    &dir.to_string_lossy(),
                ],
            )
            .env("DBUS_SYSTEM_BUS_ADDRESS", &bus)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(create(&out))
            .stderr(create(&out))
            .spawn()
            .expect("start firewalld");
        let firewalld = Firewalld { ns, bus, child };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = firewalld.cmd(lab).arg("--state").output();
            if state.is_ok_and(|o| o.status.success()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "firewalld did not start within 60 s:\n{}",
                fs::read_to_string(&out).unwrap_or_default()
            );
            sleep(Duration::from_millis(200));
        }
        firewalld
    }

    /// `firewall-cmd` in G, on this firewalld's bus.
    fn cmd(&self, lab: &Lab) -> Command {
        let mut cmd = lab.exec(&self.ns, &["firewall-cmd"]);
        cmd.env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus);
        cmd
    }

    /// Runs `script` (shell, its `firewall-cmd`s on this firewalld's bus) in G.
    fn run(&self, lab: &Lab, name: &str, script: &str) {
        let path = lab.dir.join(format!("{name}.sh"));
        fs::write(&path, format!("set -e\n{script}")).expect("write the script");
        let mut cmd = lab.exec(&self.ns, &["sh", &path.to_string_lossy()]);
        cmd.env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus);
        must(cmd);
    }
}

impl Drop for Firewalld {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["--", &group]).status();
        let _ = self.child.wait();
    }
}

/// Downloads with curl in `family`'s passive and active mode: whether each passed.
fn downloads(lab: &mut Lab, family: Family) -> Vec<(DataMode, bool)> {
    modes(family)
        .into_iter()
        .map(|mode| {
            let run = lab.client_session(Client::Curl, mode, &[Op::Download]);
            let ok = run.status.success()
                && lab.read(&lab.download_path()) == lab.read(&lab.served_path());
            eprintln!("{mode:?}: {}", if ok { "passed" } else { "failed" });
            (mode, ok)
        })
        .collect()
}

/// docs/gateway.md's firewalld section, on a gateway whose only firewall is firewalld 1.3
/// (nftables backend; lan0 in zone internal, wan0 in zone external, nothing else set up):
/// - as it comes, the active data connection passes (ftp-alg's pinhole DNATs it to the client,
///   and firewalld's forward chain accepts `ct status dnat`) and the passive one is rejected
///   (client to server, only its source translated);
/// - a direct rule accepting the mark changes nothing: it lands in iptables' `ip filter`, and
///   firewalld's own table still rejects (firewalld.direct(5));
/// - the guide's policy (internal to external, target ACCEPT) lets both through.
pub fn gateway_firewalld(family: Family) {
    assert!(
        find_tool("firewalld").is_some() && find_tool("dbus-daemon").is_some(),
        "firewalld or dbus-daemon not found: install the Debian packages firewalld and dbus \
         (scripts/test does)"
    );
    let mut lab = Lab::new(Topology::Gateway(family), Setup::AlgStopped);
    lab.nft(&["delete", "table", "inet", "gateway"]);
    let firewalld = Firewalld::start(&lab);
    firewalld.run(
        &lab,
        "zones",
        "firewall-cmd --permanent --zone=internal --add-interface=lan0\n\
         firewall-cmd --permanent --zone=external --add-interface=wan0\n\
         firewall-cmd --reload\n",
    );
    lab.start_alg();
    let [passive, active] = modes(family);
    let ruleset = |lab: &Lab| must(lab.exec(&lab.gateway_ns(), &["nft", "list", "ruleset"]));
    let stock = downloads(&mut lab, family);
    assert_eq!(
        stock,
        [(passive, false), (active, true)],
        "firewalld as it comes: the passive download should be rejected, the active one \
         (DNATed by the pinhole) accepted\n{}",
        ruleset(&lab)
    );

    let (ip, table) = match family {
        Family::V4 => ("ipv4", "ip"),
        Family::V6 => ("ipv6", "ip6"),
    };
    firewalld.run(
        &lab,
        "direct",
        &format!(
            "firewall-cmd --permanent --direct --add-rule {ip} filter FORWARD 0 \
             -m connmark --mark 0xf7a0/0xffffffff -j ACCEPT\nfirewall-cmd --reload\n"
        ),
    );
    let listing = must(lab.exec(
        &lab.gateway_ns(),
        &["nft", "list", "table", table, "filter"],
    ));
    assert!(
        listing.contains("0xf7a0"),
        "the direct rule is not in {table} filter:\n{listing}"
    );
    assert_eq!(
        downloads(&mut lab, family),
        stock,
        "a direct rule changed what firewalld's own table rejects\n{}",
        ruleset(&lab)
    );

    firewalld.run(
        &lab,
        "firewalld-guide",
        &shell_snippet("gateway.md", "firewalld"),
    );
    assert_eq!(
        downloads(&mut lab, family),
        [(passive, true), (active, true)],
        "firewalld with the guide's policy\n{}",
        ruleset(&lab)
    );
    lab.assert_no_pinholes_left();
}

/// docs/gateway.md's warning about firewalld's `ftp` service, on a reverse proxy (the clients
/// dial G's tcp/21, which firewalld must open; lan0 in zone internal, wan0 in zone public):
/// with `--add-port=21/tcp` both downloads pass. With `--add-service=ftp` instead, firewalld
/// attaches the kernel's FTP helper to the clients' control connections to ftp-alg; the helper
/// reads the 227 ftp-alg rewrote and expects the client's data connection, which ftp-alg's
/// table then does not source-translate (`ct status expected`): the server gets its SYN from
/// the client's own address, which it cannot answer, and the passive download fails. The active
/// one still passes (the server's connection matches no expectation).
pub fn reverse_firewalld_ftp_service() {
    let family = Family::V4;
    let mut lab = Lab::new(Topology::Reverse(family), Setup::AlgStopped);
    lab.nft(&["delete", "table", "inet", "gateway"]);
    let firewalld = Firewalld::start(&lab);
    firewalld.run(
        &lab,
        "zones",
        "firewall-cmd --permanent --zone=internal --add-interface=lan0\n\
         firewall-cmd --permanent --zone=public --add-interface=wan0\n\
         firewall-cmd --permanent --zone=internal --add-port=21/tcp\n\
         firewall-cmd --reload\n",
    );
    lab.start_alg();
    // In S: count what arrives from the client's own address (untranslated).
    let s = lab.server_ns();
    let rule = format!("ip saddr {C4} counter");
    must(lab.exec(
        &s,
        &[
            "nft",
            &format!(
                "add table inet seen; add chain inet seen input {{ type filter hook input \
                 priority 0; policy accept; }}; add rule inet seen input {rule}"
            ),
        ],
    ));
    let untranslated = |lab: &Lab| {
        let chain = must(lab.exec(&s, &["nft", "list", "chain", "inet", "seen", "input"]));
        !chain.contains("packets 0 ")
    };
    let [passive, active] = modes(family);
    assert_eq!(
        downloads(&mut lab, family),
        [(passive, true), (active, true)],
        "firewalld with tcp/21 opened as a port"
    );
    assert!(
        !untranslated(&lab),
        "the server got packets from the client's address"
    );

    firewalld.run(
        &lab,
        "service",
        "firewall-cmd --permanent --zone=internal --remove-port=21/tcp\n\
         firewall-cmd --permanent --zone=internal --add-service=ftp\n\
         firewall-cmd --reload\n",
    );
    let ruleset = must(lab.exec(&lab.gateway_ns(), &["nft", "list", "ruleset"]));
    assert!(
        ruleset.contains("tcp dport 21 ct helper set \"helper-ftp-tcp\""),
        "firewalld's ftp service assigns no helper:\n{ruleset}"
    );
    assert_eq!(
        downloads(&mut lab, family),
        [(passive, false), (active, true)],
        "firewalld with the ftp service: the helper should break the passive download"
    );
    assert!(
        untranslated(&lab),
        "the passive download failed, but not because its source went untranslated"
    );
}
