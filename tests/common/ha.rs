//! Beyond one machine (issue 14), end to end.
//!
//! **A gateway pair.** Clients on a LAN segment, two gateways, a server on a WAN segment: each
//! segment a bridge in a "switch" namespace, so that VRRP's multicast and gratuitous ARP reach
//! every host on it, and a pull of a gateway's cables is a switch port going down. Each gateway
//! runs keepalived (VRRPv3, one sync group for the LAN and WAN virtual addresses), conntrackd
//! (FTFW over a dedicated link) and ftp-alg in gateway mode with `proxy.upstream_source` set to
//! the WAN virtual address, behind the shipped default-deny policy. The primary fails under
//! load, killed (`kill -9` of keepalived and ftp-alg) or cut off (its links go down); transfers
//! under way must finish byte for byte through the standby, new sessions must succeed within
//! [`NEW_SESSION_WITHIN`], and no pinhole may be left on either node. The negative controls
//! fail over without conntrackd, or with upstream connections from the node's own address, and
//! the transfers under way must then break.
//!
//! **Sidecars scaled out.** Two pods (vsftpd and ftp-alg in sidecar mode, announcing the
//! Service address) behind one load-balancer namespace whose nftables rules are what kube-proxy's
//! nftables mode writes for a Service with `sessionAffinity: ClientIP`. Many client addresses
//! download in passive and active mode at once, and all succeed; without the affinity (the
//! endpoint picked per connection, round robin) every passive transfer lands on the other pod.
//!
//! docs/ha.md explains the configurations and carries the numbers these tests print.

use super::*;

/// The gateways' virtual addresses: the LAN one is the clients' default route, the WAN one the
/// server's, and the source of ftp-alg's upstream connections.
const VIP_LAN: &str = G_LAN4;
const VIP_WAN: &str = G_WAN4;
/// VRRP advertisement interval, seconds (VRRPv3 counts in centiseconds): a backup declares the
/// master dead after 3 intervals plus a skew of under one.
const ADVERT_INT: &str = "0.1";
/// conntrackd's port on the sync link.
const SYNC_PORT: u16 = 3780;
/// Short pinholes: the killed primary's table stays behind, its elements expire.
const PINHOLE_SECS: u64 = 5;
/// vsftpd's pace per session: data.bin (1 MiB) takes about 4 s, so the transfers are still
/// running when the primary fails about a second in.
const SLOW: &str = "anon_max_rate=250000\nmax_per_ip=0\n";
/// curl's and lftp's bound on a whole transfer: a client whose control connection went silent
/// (the links-down case) waits this long for the `226` that never comes.
const TRANSFER_LIMIT_SECS: u64 = 12;
/// The issue's bound from the failure to the first session served by the standby.
const NEW_SESSION_WITHIN: Duration = Duration::from_secs(3);

/// One gateway's addresses and VRRP priority.
struct NodePlan {
    name: &'static str,
    lan: &'static str,
    wan: &'static str,
    sync: &'static str,
    peer_sync: &'static str,
    priority: u8,
}

const NODES: [NodePlan; 2] = [
    NodePlan {
        name: "g1",
        lan: "198.18.0.11",
        wan: "203.0.113.11",
        sync: "198.19.255.1",
        peer_sync: "198.19.255.2",
        priority: 150,
    },
    NodePlan {
        name: "g2",
        lan: "198.18.0.12",
        wan: "203.0.113.12",
        sync: "198.19.255.2",
        peer_sync: "198.19.255.1",
        priority: 100,
    },
];

/// How the primary fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// `kill -9` of keepalived (both its processes) and ftp-alg: the kernel closes ftp-alg's
    /// sockets (FIN to the client and the server), the node keeps its addresses and forwards on.
    Killed,
    /// Its LAN, WAN and sync links go down: nothing it holds reaches anyone any more.
    LinksDown,
}

/// What the pair is given to carry transfers across the failover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carry {
    /// conntrackd syncs, ftp-alg's upstream connections start from the WAN virtual address.
    Everything,
    /// Negative control: no conntrackd, so the standby knows none of the data connections.
    NoSync,
    /// Negative control: no `proxy.upstream_source`, so the server answers the primary's own
    /// WAN address, which does not move.
    NodeAddress,
}

/// keepalived's notify script: the conntrackd calls of conntrackd's shipped
/// `primary-backup.sh`, but `-t` (flush the kernel table after `PurgeTimeout`) only when the
/// node steps down from primary. Run at every start-up's first "backup", it would flush the
/// entries a promotion within `PurgeTimeout` has just committed.
const NOTIFY: &str = r#"#!/bin/sh
conf=$1
state=$conf.state
case "$2" in
primary)
    conntrackd -C "$conf" -c
    conntrackd -C "$conf" -f
    conntrackd -C "$conf" -R
    conntrackd -C "$conf" -B
    ;;
backup)
    if [ "$(cat "$state" 2>/dev/null)" = primary ]; then
        conntrackd -C "$conf" -t
    fi
    conntrackd -C "$conf" -n
    ;;
esac
echo "$2" >"$state"
echo "$(date +%s.%N) $2" >>"$conf.transitions"
"#;

/// A gateway of the pair and the processes the test started in it.
struct Node {
    plan: &'static NodePlan,
    ns: String,
    keepalived: Option<Child>,
    conntrackd: Option<Child>,
    alg: Option<Child>,
}

/// The pair, its clients' and its server's namespaces, and the switch between them.
pub struct Pair {
    lab: Lab,
    switch: String,
    nodes: [Node; 2],
}

impl Drop for Pair {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            for child in [&mut node.alg, &mut node.keepalived, &mut node.conntrackd] {
                if let Some(mut child) = child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        // The lab's Drop then reports (on failure) and deletes the namespaces.
    }
}

impl Pair {
    fn new(carry: Carry) -> Pair {
        for tool in ["keepalived", "conntrackd"] {
            require_tool(tool);
        }
        let mut lab = Lab::empty(Topology::Gateway(Family::V4), Server::Vsftpd);
        let switch = format!("{}w", lab.prefix);
        let nodes = [
            Node {
                plan: &NODES[0],
                ns: lab.gateway_ns(),
                keepalived: None,
                conntrackd: None,
                alg: None,
            },
            Node {
                plan: &NODES[1],
                ns: format!("{}h", lab.prefix),
                keepalived: None,
                conntrackd: None,
                alg: None,
            },
        ];
        for ns in [
            switch.clone(),
            lab.client_ns(),
            lab.server_ns(),
            nodes[0].ns.clone(),
            nodes[1].ns.clone(),
        ] {
            lab.add_namespace(ns);
        }
        let mut pair = Pair { lab, switch, nodes };
        pair.build_network();
        pair.lab.write_files();
        pair.lab.start_server(SLOW);
        fs::write(pair.lab.dir.join("notify.sh"), NOTIFY).expect("write the notify script");
        fs::set_permissions(
            pair.lab.dir.join("notify.sh"),
            fs::Permissions::from_mode(0o755),
        )
        .expect("chmod the notify script");
        for i in 0..2 {
            pair.load_policy(i);
            if carry != Carry::NoSync {
                pair.start_conntrackd(i);
            }
        }
        // g1 first, and g2 only once g1 is primary: with `nopreempt`, a g2 whose keepalived
        // came up first on a busy machine would keep the addresses for good.
        pair.start_keepalived(0);
        let primary = wait_for(Duration::from_secs(10), || {
            (pair.holds_virtual_addresses(0)
                && pair.transitions(0).last().is_some_and(|t| t.1 == "primary"))
            .then_some(())
        });
        assert!(
            primary.is_some(),
            "g1 did not become primary: {:?}",
            pair.transitions(0)
        );
        pair.start_keepalived(1);
        let backup = wait_for(Duration::from_secs(10), || {
            pair.transitions(1)
                .last()
                .is_some_and(|t| t.1 == "backup")
                .then_some(())
        });
        assert!(
            backup.is_some(),
            "g2 did not become backup: {:?}",
            pair.transitions(1)
        );
        for i in 0..2 {
            pair.start_alg(i, carry != Carry::NodeAddress);
        }
        pair
    }

    fn ip(&self, ns: &str, args: &[&str]) {
        self.lab.ip(&[&["-n", ns], args].concat());
    }

    /// A veth from the switch's `bridge` (port `port`) to `dev` in `ns`.
    fn plug(&self, ns: &str, dev: &str, bridge: &str, port: &str) {
        let sw = self.switch.as_str();
        self.ip(
            sw,
            &[
                "link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns,
            ],
        );
        self.ip(sw, &["link", "set", port, "master", bridge, "up"]);
        self.ip(ns, &["link", "set", dev, "up"]);
    }

    fn build_network(&self) {
        let sw = self.switch.as_str();
        for bridge in ["lan", "wan"] {
            self.ip(sw, &["link", "add", bridge, "type", "bridge"]);
            self.ip(sw, &["link", "set", bridge, "up"]);
        }
        let (c, s) = (self.lab.client_ns(), self.lab.server_ns());
        self.plug(&c, "eth0", "lan", "c");
        self.plug(&s, "eth0", "wan", "s");
        self.ip(&c, &["addr", "add", &format!("{C4}/24"), "dev", "eth0"]);
        self.ip(&s, &["addr", "add", &format!("{S4}/24"), "dev", "eth0"]);
        self.ip(&c, &["route", "add", "default", "via", VIP_LAN]);
        self.ip(&s, &["route", "add", "default", "via", VIP_WAN]);
        let [g1, g2] = [&self.nodes[0].ns, &self.nodes[1].ns];
        self.ip(
            g1,
            &[
                "link", "add", "sync0", "type", "veth", "peer", "name", "sync0", "netns", g2,
            ],
        );
        for node in &self.nodes {
            let (ns, p) = (&node.ns, node.plan);
            self.plug(ns, "lan0", "lan", &format!("{}lan", p.name));
            self.plug(ns, "wan0", "wan", &format!("{}wan", p.name));
            self.ip(ns, &["link", "set", "sync0", "up"]);
            self.ip(
                ns,
                &["addr", "add", &format!("{}/24", p.lan), "dev", "lan0"],
            );
            self.ip(
                ns,
                &["addr", "add", &format!("{}/24", p.wan), "dev", "wan0"],
            );
            self.ip(
                ns,
                &["addr", "add", &format!("{}/30", p.sync), "dev", "sync0"],
            );
            must(
                self.lab
                    .exec(ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]),
            );
        }
    }

    fn nft(&self, i: usize, args: &[&str]) {
        must(self.lab.exec(&self.nodes[i].ns, &[&["nft"], args].concat()));
    }

    /// The shipped policy, plus VRRP and the sync link (which it has no reason to know), plus
    /// a counter at the head of the forward chain for the packets of ftp-alg's data
    /// connections (see [`Lab::data_path_packets_in`]): the standby's shows that the transfers
    /// went on through it, not through a primary that still forwards.
    fn load_policy(&self, i: usize) {
        self.nft(i, &["-f", POLICY]);
        let sync = format!("iifname \"sync0\" udp dport {SYNC_PORT} accept");
        self.nft(i, &["add rule inet gateway input ip protocol vrrp accept"]);
        self.nft(i, &["add rule inet gateway input", &sync]);
        let count = format!("ct mark 0x0000f7a0 counter comment \"{DATA_PATH}\"");
        self.nft(i, &["insert rule inet gateway forward", &count]);
    }

    fn file(&self, i: usize, what: &str) -> PathBuf {
        self.lab
            .dir
            .join(format!("{}-{what}", self.nodes[i].plan.name))
    }

    fn spawn(&self, i: usize, args: &[&str], log: &str) -> Child {
        self.lab
            .exec(&self.nodes[i].ns, args)
            .env("RUST_LOG", "ftp_alg=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(create(&self.file(i, log)))
            .stderr(create(&self.file(i, log)))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"))
    }

    fn conntrackd_conf(&self, i: usize) -> PathBuf {
        self.file(i, "conntrackd.conf")
    }

    /// conntrackd in the foreground, FTFW over the sync link. The filter keeps out every
    /// connection to or from a gateway's own or virtual address: the redirected control
    /// connections (their reply comes from the node's LAN address) and ftp-alg's upstream ones
    /// (from the WAN virtual address). Those end with the process that holds their sockets;
    /// synced, the standby would forward a client's control packets to the dead node's port
    /// 2121 instead of resetting them.
    fn start_conntrackd(&mut self, i: usize) {
        let p = self.nodes[i].plan;
        let ignore: String = ["127.0.0.1", "198.19.255.0/30", VIP_LAN, VIP_WAN]
            .into_iter()
            .chain(NODES.iter().flat_map(|n| [n.lan, n.wan]))
            .map(|a| format!("            IPv4_address {a}\n"))
            .collect();
        let conf = format!(
            "Sync {{\n    Mode FTFW {{\n        DisableExternalCache Off\n        \
             CommitTimeout 1800\n        PurgeTimeout 5\n    }}\n    UDP {{\n        \
             IPv4_address {}\n        IPv4_Destination_Address {}\n        Port {SYNC_PORT}\n        \
             Interface sync0\n        SndSocketBuffer 1249280\n        \
             RcvSocketBuffer 1249280\n        Checksum on\n    }}\n}}\n\
             General {{\n    Systemd off\n    HashSize 8192\n    HashLimit 65535\n    \
             LogFile {}\n    Syslog off\n    LockFile {}\n    UNIX {{\n        Path {}\n    }}\n    \
             NetlinkBufferSize 2097152\n    NetlinkBufferSizeMaxGrowth 8388608\n    \
             Filter From Userspace {{\n        Protocol Accept {{\n            TCP\n        }}\n        \
             Address Ignore {{\n{ignore}        }}\n    }}\n}}\n",
            p.sync,
            p.peer_sync,
            self.file(i, "conntrackd.log").display(),
            self.file(i, "conntrackd.lock").display(),
            self.file(i, "conntrackd.sock").display(),
        );
        let path = self.conntrackd_conf(i);
        fs::write(&path, conf).expect("write conntrackd.conf");
        let path = path.to_string_lossy().into_owned();
        let child = self.spawn(i, &["conntrackd", "-C", &path], "conntrackd.out");
        self.nodes[i].conntrackd = Some(child);
        let ready = wait_for(Duration::from_secs(10), || {
            self.lab
                .exec(&self.nodes[i].ns, &["conntrackd", "-C", &path, "-s"])
                .output()
                .is_ok_and(|o| o.status.success())
                .then_some(())
        });
        assert!(ready.is_some(), "conntrackd in {} did not start", p.name);
    }

    fn start_keepalived(&mut self, i: usize) {
        let p = self.nodes[i].plan;
        let notify = |state: &str| {
            format!(
                "\"{} {} {state}\"",
                self.lab.dir.join("notify.sh").display(),
                self.conntrackd_conf(i).display()
            )
        };
        let instance = |name: &str, dev: &str, id: u8, vip: &str| {
            format!(
                "vrrp_instance {name} {{\n    state BACKUP\n    interface {dev}\n    \
                 virtual_router_id {id}\n    priority {}\n    advert_int {ADVERT_INT}\n    \
                 nopreempt\n    virtual_ipaddress {{\n        {vip}/24 dev {dev}\n    }}\n}}\n",
                p.priority
            )
        };
        let conf = format!(
            "global_defs {{\n    router_id {}\n    vrrp_version 3\n    script_user root\n    \
             enable_script_security\n    vrrp_garp_master_delay 1\n    \
             vrrp_garp_master_repeat 3\n}}\n\
             vrrp_sync_group ftp {{\n    group {{\n        LAN\n        WAN\n    }}\n    \
             notify_master {}\n    notify_backup {}\n    notify_fault {}\n}}\n{}{}",
            p.name,
            notify("primary"),
            notify("backup"),
            notify("backup"),
            instance("LAN", "lan0", 51, VIP_LAN),
            instance("WAN", "wan0", 52, VIP_WAN),
        );
        let conf_path = self.file(i, "keepalived.conf");
        fs::write(&conf_path, conf).expect("write keepalived.conf");
        let file = |what: &str| self.file(i, what).to_string_lossy().into_owned();
        let child = self.spawn(
            i,
            &[
                "keepalived",
                "--dont-fork",
                "--log-console",
                "--log-detail",
                "--no-syslog",
                "--vrrp",
                "--use-file",
                &file("keepalived.conf"),
                "--pid",
                &file("keepalived.pid"),
                "--vrrp_pid",
                &file("keepalived-vrrp.pid"),
                "--checkers_pid",
                &file("keepalived-checkers.pid"),
            ],
            "keepalived.log",
        );
        self.nodes[i].keepalived = Some(child);
    }

    fn alg_log(&self, i: usize) -> PathBuf {
        self.file(i, "ftp-alg.log")
    }

    fn control_socket(&self, i: usize) -> PathBuf {
        self.file(i, "control.sock")
    }

    /// ftp-alg in gateway mode, the same policy on both nodes; `from_virtual`: upstream
    /// connections (and so the data connections' translations) from the WAN virtual address.
    fn start_alg(&mut self, i: usize, from_virtual: bool) {
        let source = if from_virtual {
            format!("upstream_source = [\"{VIP_WAN}\"]\n")
        } else {
            String::new()
        };
        let conf = format!(
            "[proxy]\nmode = \"gateway\"\nlisten = [\"0.0.0.0:2121\"]\nintercept = [\"lan0\"]\n\
             {source}[pinholes]\nport_min = {}\nport_max = {}\ntimeout_secs = {PINHOLE_SECS}\n\
             [control]\nsocket = {:?}\n",
            PINHOLE_PORTS.start(),
            PINHOLE_PORTS.end(),
            self.control_socket(i),
        );
        let path = self.file(i, "ftp-alg.toml");
        fs::write(&path, conf).expect("write ftp-alg.toml");
        let mut child = self.spawn(
            i,
            &[ALG, "run", "--config", &path.to_string_lossy()],
            "ftp-alg.log",
        );
        let ns = self.nodes[i].ns.clone();
        let ready = self
            .lab
            .wait_ready(&mut child, &ns, 2121, &self.alg_log(i), || true);
        self.nodes[i].alg = Some(child);
        if let Err(e) = ready {
            panic!("ftp-alg in {} {e}", self.nodes[i].plan.name);
        }
    }

    fn holds_virtual_addresses(&self, i: usize) -> bool {
        let out = must(self.lab.exec(&self.nodes[i].ns, &["ip", "-br", "addr"]));
        [VIP_LAN, VIP_WAN]
            .iter()
            .all(|vip| out.contains(&format!("{vip}/24")))
    }

    /// The node's state changes as its notify script recorded them: (Unix time, state).
    fn transitions(&self, i: usize) -> Vec<(f64, String)> {
        let path = format!("{}.transitions", self.conntrackd_conf(i).display());
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (at, state) = l.split_once(' ')?;
                Some((at.parse().ok()?, state.to_owned()))
            })
            .collect()
    }

    /// Connections the node's conntrackd holds from its peer: with the filter, ftp-alg's data
    /// connections.
    fn synced_data_connections(&self, i: usize) -> usize {
        let conf = self.conntrackd_conf(i).to_string_lossy().into_owned();
        let out = must(
            self.lab
                .exec(&self.nodes[i].ns, &["conntrackd", "-C", &conf, "-e"]),
        );
        out.lines().filter(|l| l.starts_with("tcp")).count()
    }

    /// `conntrackd -s` of both nodes, for a failure message.
    fn conntrackd_statistics(&self) -> String {
        (0..2)
            .map(|i| {
                let conf = self.conntrackd_conf(i).to_string_lossy().into_owned();
                let out = self
                    .lab
                    .exec(&self.nodes[i].ns, &["conntrackd", "-C", &conf, "-s"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                let external = self
                    .lab
                    .exec(&self.nodes[i].ns, &["conntrackd", "-C", &conf, "-e"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                format!(
                    "{}:\n{out}\nexternal cache:\n{external}",
                    self.nodes[i].plan.name
                )
            })
            .collect()
    }

    /// Elements in the sets of the node's `inet ftp_alg` table: pinholes and their translations.
    /// Read from the kernel, not from the daemon, which may be dead.
    fn pinhole_elements(&self, i: usize) -> usize {
        let out = self
            .lab
            .exec(
                &self.nodes[i].ns,
                &["nft", "-j", "list", "table", "inet", "ftp_alg"],
            )
            .output()
            .expect("run nft");
        if !out.status.success() {
            return 0;
        }
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("nft -j prints JSON");
        json["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o.get("set").or_else(|| o.get("map")))
            // `intercept_ifaces` holds configuration, not pinholes.
            .filter(|s| s["name"] != "intercept_ifaces")
            .map(|s| s["elem"].as_array().map_or(0, Vec::len))
            .sum()
    }

    fn fail(&mut self, failure: Failure) {
        match failure {
            Failure::Killed => {
                let node = &self.nodes[0];
                let vrrp = fs::read_to_string(self.file(0, "keepalived-vrrp.pid"))
                    .expect("keepalived's VRRP process id");
                let pids = [
                    node.keepalived.as_ref().map(Child::id),
                    node.alg.as_ref().map(Child::id),
                ]
                .map(|p| p.expect("g1's processes").to_string());
                let mut kill = Command::new("kill");
                kill.arg("-KILL").args(pids).arg(vrrp.trim());
                must(kill);
            }
            Failure::LinksDown => {
                self.ip(&self.switch, &["link", "set", "g1lan", "down"]);
                self.ip(&self.switch, &["link", "set", "g1wan", "down"]);
                self.ip(&self.nodes[0].ns, &["link", "set", "sync0", "down"]);
            }
        }
    }
}

/// A client process started by the test and what it must produce.
struct Transfer {
    name: &'static str,
    child: Child,
    /// The file the transfer writes: the client's copy, or the server's for an upload.
    got: PathBuf,
    want: PathBuf,
    stderr: PathBuf,
}

/// What became of a transfer.
struct Outcome {
    name: &'static str,
    status: ExitStatus,
    complete: bool,
    got_len: usize,
    stderr: String,
}

impl Transfer {
    fn start(lab: &Lab, name: &'static str, args: &[&str], got: PathBuf, want: PathBuf) -> Self {
        let stderr = lab.dir.join(format!("{name}.stderr"));
        let child = lab
            .client_command(args)
            .stdin(Stdio::null())
            .stdout(create(&lab.dir.join(format!("{name}.stdout"))))
            .stderr(create(&stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Transfer {
            name,
            child,
            got,
            want,
            stderr,
        }
    }

    fn has_data(&self) -> bool {
        fs::metadata(&self.got).is_ok_and(|m| m.len() > 0)
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    fn finish(mut self, within: Duration) -> Outcome {
        let status = wait_for(within, || self.child.try_wait().ok().flatten());
        let status = status.unwrap_or_else(|| {
            let _ = self.child.kill();
            panic!("{} still running after {within:?}", self.name)
        });
        let want = fs::read(&self.want).expect("read the file sent");
        // A client may exit before the server has written what is still in flight: curl
        // leaves an upload as soon as its control connection closes, while its last bytes are
        // in the socket buffers. Wait for them while the file still grows (at most 5 s).
        let mut got = fs::read(&self.got).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got != want && Instant::now() < deadline {
            sleep(Duration::from_millis(300));
            let now = fs::read(&self.got).unwrap_or_default();
            let grew = now.len() > got.len();
            got = now;
            if !grew {
                break;
            }
        }
        let complete = got == want;
        Outcome {
            name: self.name,
            status,
            complete,
            got_len: got.len(),
            stderr: fs::read_to_string(&self.stderr).unwrap_or_default(),
        }
    }
}

/// The transfers under way at the failure: curl downloads in passive (PASV) and active (PORT)
/// mode, a curl upload in passive mode, and an lftp download in passive mode.
fn start_transfers(lab: &Lab) -> Vec<Transfer> {
    let url = format!("ftp://{S4}/{DATA_FILE}");
    let limit = TRANSFER_LIMIT_SECS.to_string();
    let curl = |extra: &[&str]| -> Vec<String> {
        ["curl", "-sS", "--max-time", &limit, "--user", "anonymous:"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let path = |name: &str| lab.dir.join(name);
    let s = |p: &PathBuf| p.to_string_lossy().into_owned();
    let lftp_script = path("lftp-pasv.lftp");
    fs::write(
        &lftp_script,
        format!(
            "set cmd:fail-exit yes\nset net:timeout 3\nset net:max-retries 2\n\
             set net:reconnect-interval-base 1\nset net:reconnect-interval-max 1\n\
             set ftp:passive-mode yes\nset xfer:clobber on\nopen -u anonymous, ftp://{S4}\n\
             get {DATA_FILE} -o {}\nbye\n",
            s(&path("lftp-pasv.bin"))
        ),
    )
    .expect("write the lftp script");
    let served = lab.served_path();
    let specs: [(&'static str, Vec<String>, PathBuf, PathBuf); 4] = [
        (
            "curl-pasv",
            curl(&["--disable-epsv", &url, "-o", &s(&path("curl-pasv.bin"))]),
            path("curl-pasv.bin"),
            served.clone(),
        ),
        (
            "curl-port",
            curl(&[
                "--ftp-port",
                "-",
                "--disable-eprt",
                &url,
                "-o",
                &s(&path("curl-port.bin")),
            ]),
            path("curl-port.bin"),
            served.clone(),
        ),
        (
            "curl-pasv-upload",
            curl(&[
                "--disable-epsv",
                "-T",
                &s(&lab.upload_source_path()),
                &format!("ftp://{S4}/up/{UPLOAD_FILE}"),
            ]),
            lab.stored_upload_path(),
            lab.upload_source_path(),
        ),
        (
            "lftp-pasv",
            vec!["lftp".into(), "-f".into(), s(&lftp_script)],
            path("lftp-pasv.bin"),
            served,
        ),
    ];
    specs
        .into_iter()
        .map(|(name, args, got, want)| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Transfer::start(lab, name, &args, got, want)
        })
        .collect()
}

/// A new session (login and a passive listing) by curl, retried until one succeeds; the time
/// from `since` to its success, or `None` after 10 s.
fn first_new_session(lab: &Lab, since: Instant) -> Option<Duration> {
    let url = format!("ftp://{S4}/");
    wait_for(Duration::from_secs(10), || {
        let ok = lab
            .client_command(&[
                "curl",
                "-sS",
                "--max-time",
                "1",
                "--disable-epsv",
                "--user",
                "anonymous:",
                &url,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| since.elapsed())
    })
}

/// What a failover run measured.
pub struct Failover {
    pair: Pair,
    /// From the failure to the standby's notify script running "primary".
    promoted: Option<Duration>,
    /// From the failure to the first new session served, by the standby.
    new_session: Option<Duration>,
    outcomes: Vec<(&'static str, Outcome)>,
    /// Packets of ftp-alg's data connections the standby forwarded.
    standby_data_packets: u64,
}

/// Builds the pair with `carry`, starts the transfers, fails the primary in the middle of them,
/// and waits for the transfers to end.
pub fn failover(failure: Failure, carry: Carry) -> Failover {
    let mut pair = Pair::new(carry);
    let mut transfers = start_transfers(&pair.lab);
    let started = wait_for(Duration::from_secs(10), || {
        transfers.iter().all(Transfer::has_data).then_some(())
    });
    assert!(started.is_some(), "not every transfer got under way");
    if carry != Carry::NoSync {
        let synced = wait_for(Duration::from_secs(10), || {
            (pair.synced_data_connections(1) >= transfers.len()).then_some(())
        });
        assert!(
            synced.is_some(),
            "g2's conntrackd holds {} of the {} data connections; statistics:\n{}",
            pair.synced_data_connections(1),
            transfers.len(),
            pair.conntrackd_statistics()
        );
    }
    assert!(
        transfers.iter_mut().all(Transfer::running),
        "the transfers were to be under way at the failure"
    );
    let failed_at = Instant::now();
    let failed_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs_f64();
    pair.fail(failure);
    let new_session = first_new_session(&pair.lab, failed_at);
    // The script logs its state last, after the conntrackd calls: wait for it.
    let promoted = wait_for(Duration::from_secs(5), || {
        pair.transitions(1)
            .iter()
            .find(|(at, state)| state == "primary" && *at >= failed_wall)
            .map(|(at, _)| Duration::from_secs_f64(at - failed_wall))
    });
    let limit = Duration::from_secs(TRANSFER_LIMIT_SECS + 10);
    let outcomes = transfers
        .into_iter()
        .map(|t| (t.name, t.finish(limit)))
        .collect();
    let standby_data_packets = pair.lab.data_path_packets_in(&pair.nodes[1].ns);
    let run = Failover {
        pair,
        promoted,
        new_session,
        outcomes,
        standby_data_packets,
    };
    run.report(failure, carry);
    run
}

impl Failover {
    fn report(&self, failure: Failure, carry: Carry) {
        println!(
            "{failure:?}/{carry:?}: standby primary after {:?}, first new session after {:?}, \
             standby forwarded {} data packets",
            self.promoted, self.new_session, self.standby_data_packets
        );
        for (name, o) in &self.outcomes {
            println!(
                "  {name}: {} ({} bytes, complete: {}) {}",
                o.status,
                o.got_len,
                o.complete,
                o.stderr.lines().last().unwrap_or_default()
            );
        }
    }

    /// Transfers under way finished byte for byte through the standby, a new session came
    /// within [`NEW_SESSION_WITHIN`], and neither node keeps a pinhole.
    pub fn assert_everything_survived(&self) {
        for (name, o) in &self.outcomes {
            assert!(
                o.complete,
                "{name}: {} bytes, not the file ({}): {}",
                o.got_len, o.status, o.stderr
            );
        }
        let new_session = self.new_session.expect("no new session after the failure");
        assert!(
            new_session < NEW_SESSION_WITHIN,
            "first new session after {new_session:?}"
        );
        assert!(self.promoted.is_some(), "g2 never ran its notify script");
        assert!(
            self.standby_data_packets > 0,
            "the standby forwarded none of the data connections"
        );
        self.assert_no_pinholes_left();
    }

    /// The curl downloads under way broke, passive and active: the server's data reached
    /// nobody. (lftp reconnects through the standby and resumes with `REST`, which needs no
    /// state from the primary, and the upload's last bytes may be in the server's buffers
    /// before the failure: neither proves anything here.) New sessions still succeed.
    pub fn assert_transfers_broke(&self) {
        let downloads = self
            .outcomes
            .iter()
            .filter(|(name, _)| ["curl-pasv", "curl-port"].contains(name));
        for (name, o) in downloads {
            assert!(
                !o.complete && !o.status.success(),
                "{name} survived the failover ({}, {} bytes)",
                o.status,
                o.got_len
            );
        }
        assert!(
            self.new_session.is_some_and(|t| t < NEW_SESSION_WITHIN),
            "new sessions failed too: {:?}",
            self.new_session
        );
        self.assert_no_pinholes_left();
    }

    /// The exit status of each client, as docs/ha.md describes them.
    pub fn assert_clients_report(&self, curl: i32, lftp: i32) {
        for (name, o) in &self.outcomes {
            let want = if name.starts_with("lftp") { lftp } else { curl };
            assert_eq!(
                o.status.code(),
                Some(want),
                "{name}'s exit status: {}",
                o.stderr
            );
        }
    }

    /// Pinholes expire in the kernel on both nodes, the killed one's too; the standby's daemon
    /// also says it holds none.
    fn assert_no_pinholes_left(&self) {
        let bound = Duration::from_secs(PINHOLE_SECS * 3);
        for i in 0..2 {
            let gone = wait_for(bound, || (self.pair.pinhole_elements(i) == 0).then_some(()));
            assert!(
                gone.is_some(),
                "{} still holds {} pinhole elements after {bound:?}",
                self.pair.nodes[i].plan.name,
                self.pair.pinhole_elements(i)
            );
        }
        let socket = self.pair.control_socket(1);
        let mut cmd = self
            .pair
            .lab
            .exec(&self.pair.nodes[1].ns, &[ALG, "pinholes", "list", "--json"]);
        cmd.env("FTP_ALG_SOCKET", socket);
        let list = must(cmd);
        assert_eq!(list.trim(), "[]", "the standby's daemon lists pinholes");
    }
}

/// The Service's load-balanced address, announced by every pod's ftp-alg.
const SERVICE: &str = "203.0.113.10";
/// The Service's data ports, listed one by one as a Service must, and the pods' pinhole range.
const SERVICE_DATA_PORTS: [u16; 2] = [61000, 61001];
/// Pods behind the Service.
const PODS: usize = 2;
/// Client addresses: 198.18.0.10 and up, each downloading once passive and once active.
const SCALE_CLIENTS: usize = 12;

/// How the load balancer picks a pod for a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Affinity {
    /// kube-proxy's nftables rules for `sessionAffinity: ClientIP`: a client seen before goes
    /// to the pod it went to; a new one to a random pod, which is remembered.
    ClientIp,
    /// Negative control: every connection to the next pod in turn (`numgen inc`), so that a
    /// session's data connection, which follows its control connection, always lands on the
    /// other pod.
    None,
}

/// The load balancer's ruleset: what kube-proxy's nftables mode writes for one Service (the
/// names are simplified), with or without session affinity.
fn service_rules(affinity: Affinity) -> String {
    let pods: Vec<usize> = (1..=PODS).collect();
    let ports = std::iter::once(21)
        .chain(SERVICE_DATA_PORTS)
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut rules = String::from("table ip kube {\n");
    let sticky = affinity == Affinity::ClientIp;
    if sticky {
        for p in &pods {
            rules += &format!(
                "    set affinity-pod{p} {{ type ipv4_addr; flags dynamic,timeout; timeout 3h; }}\n"
            );
        }
    }
    rules += &format!(
        "    chain services {{\n        type nat hook prerouting priority dstnat; policy accept;\n        \
         ip daddr {SERVICE} tcp dport {{ {ports} }} jump svc\n    }}\n    chain svc {{\n"
    );
    if sticky {
        for p in &pods {
            rules += &format!("        ip saddr @affinity-pod{p} goto endpoint-pod{p}\n");
        }
    }
    let pick = if sticky { "random" } else { "inc" };
    let vmap = pods
        .iter()
        .map(|p| format!("{} : goto endpoint-pod{p}", p - 1))
        .collect::<Vec<_>>()
        .join(", ");
    rules += &format!("        numgen {pick} mod {PODS} vmap {{ {vmap} }}\n    }}\n");
    for p in &pods {
        let update = if sticky {
            format!("        update @affinity-pod{p} {{ ip saddr }}\n")
        } else {
            String::new()
        };
        rules += &format!(
            "    chain endpoint-pod{p} {{\n{update}        dnat to {}\n    }}\n",
            pod_address(*p)
        );
    }
    rules + "}\n"
}

fn pod_address(pod: usize) -> String {
    format!("198.19.{pod}.2")
}

fn client_address(i: usize) -> String {
    format!("198.18.0.{}", 10 + i)
}

/// Clients, a load balancer and [`PODS`] pods of vsftpd with ftp-alg in sidecar mode.
pub struct Service {
    lab: Lab,
    children: Vec<Child>,
}

impl Drop for Service {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Service {
    pub fn new(affinity: Affinity) -> Service {
        let lab = Lab::empty(Topology::Sidecar(Family::V4), Server::Vsftpd);
        let mut svc = Service {
            lab,
            children: Vec::new(),
        };
        let (c, lb) = (svc.lab.client_ns(), format!("{}b", svc.lab.prefix));
        svc.lab.add_namespace(c.clone());
        svc.lab.add_namespace(lb.clone());
        let ip = |ns: &str, args: &[&str]| svc.lab.ip(&[&["-n", ns], args].concat());
        ip(
            &lb,
            &[
                "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", &c,
            ],
        );
        ip(
            &lb,
            &["addr", "add", &format!("{VIP_LAN}/24"), "dev", "lan0"],
        );
        ip(&lb, &["link", "set", "lan0", "up"]);
        for i in 0..SCALE_CLIENTS {
            ip(
                &c,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", client_address(i)),
                    "dev",
                    "eth0",
                ],
            );
        }
        ip(&c, &["link", "set", "eth0", "up"]);
        ip(&c, &["route", "add", "default", "via", VIP_LAN]);
        must(
            svc.lab
                .exec(&lb, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]),
        );
        let rules = svc.lab.dir.join("service.nft");
        fs::write(&rules, service_rules(affinity)).expect("write the service rules");
        must(svc.lab.exec(&lb, &["nft", "-f", &rules.to_string_lossy()]));
        svc.lab.write_files();
        for pod in 1..=PODS {
            let ns = format!("{}p{pod}", svc.lab.prefix);
            svc.lab.add_namespace(ns.clone());
            let dev = format!("pod{pod}");
            let ip = |ns: &str, args: &[&str]| svc.lab.ip(&[&["-n", ns], args].concat());
            ip(
                &lb,
                &[
                    "link", "add", &dev, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            );
            ip(
                &lb,
                &["addr", "add", &format!("198.19.{pod}.1/24"), "dev", &dev],
            );
            ip(&lb, &["link", "set", &dev, "up"]);
            ip(
                &ns,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", pod_address(pod)),
                    "dev",
                    "eth0",
                ],
            );
            ip(&ns, &["link", "set", "eth0", "up"]);
            ip(
                &ns,
                &["route", "add", "default", "via", &format!("198.19.{pod}.1")],
            );
            svc.start_pod(pod, &ns);
        }
        svc
    }

    /// vsftpd on port 2100 of the pod's address, ftp-alg on port 21 in front of it, announcing
    /// the Service's address, as in deploy/k8s/vsftpd-sidecar.yaml.
    fn start_pod(&mut self, pod: usize, ns: &str) {
        let address = pod_address(pod);
        let bind: SocketAddr = format!("{address}:{SIDECAR_PORT}")
            .parse()
            .expect("a literal address");
        let name = format!("vsftpd-pod{pod}");
        let out = self.lab.dir.join(format!("{name}.out"));
        let mut server = self
            .lab
            .vsftpd_command_at(ns, bind, &name, "max_per_ip=0\nmax_clients=0\n")
            .stdin(Stdio::null())
            .stdout(create(&out))
            .stderr(create(&out))
            .spawn()
            .expect("spawn vsftpd");
        let ready = self
            .lab
            .wait_ready(&mut server, ns, SIDECAR_PORT, &out, || true);
        self.children.push(server);
        if let Err(e) = ready {
            panic!("vsftpd in pod {pod} {e}");
        }
        let conf = format!(
            "[proxy]\nmode = \"reverse\"\nlisten = [\"0.0.0.0:21\"]\nupstream = \"{bind}\"\n\
             announce = \"{SERVICE}\"\n[pinholes]\nport_min = {}\nport_max = {}\n\
             timeout_secs = {PINHOLE_SECS}\n[control]\nsocket = {:?}\n",
            SERVICE_DATA_PORTS[0],
            SERVICE_DATA_PORTS[1],
            self.lab.dir.join(format!("pod{pod}-control.sock")),
        );
        let path = self.lab.dir.join(format!("pod{pod}-ftp-alg.toml"));
        fs::write(&path, conf).expect("write ftp-alg.toml");
        let log = self.lab.dir.join(format!("pod{pod}-ftp-alg.log"));
        let mut alg = self
            .lab
            .exec(ns, &[ALG, "run", "--config", &path.to_string_lossy()])
            .env("RUST_LOG", "ftp_alg=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(create(&log))
            .stderr(create(&log))
            .spawn()
            .expect("spawn ftp-alg");
        let ready = self.lab.wait_ready(&mut alg, ns, 21, &log, || true);
        self.children.push(alg);
        if let Err(e) = ready {
            panic!("ftp-alg in pod {pod} {e}");
        }
    }

    /// A download of data.bin by client `i` through the Service, passive or active.
    fn download(&self, i: usize, passive: bool) -> Transfer {
        let from = client_address(i);
        let mode = if passive { "pasv" } else { "port" };
        let name: &'static str = if passive { "pasv" } else { "port" };
        let file = self.lab.dir.join(format!("client{i}-{mode}.bin"));
        let url = format!("ftp://{SERVICE}/{DATA_FILE}");
        let out = file.to_string_lossy().into_owned();
        let mode_args: &[&str] = if passive {
            &["--disable-epsv", "--no-ftp-skip-pasv-ip"]
        } else {
            &["--ftp-port", "-", "--disable-eprt"]
        };
        let args: Vec<&str> = [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--connect-timeout",
            "3",
            "--interface",
            &from,
            "--user",
            "anonymous:",
        ]
        .into_iter()
        .chain(mode_args.iter().copied())
        .chain([url.as_str(), "-o", &out])
        .collect();
        Transfer::start(&self.lab, name, &args, file.clone(), self.lab.served_path())
    }

    /// Downloads by every client in `mode` (`true`: passive), all at once or one after the
    /// other; how many came out whole.
    pub fn downloads(&self, passive: bool, at_once: bool) -> usize {
        let limit = Duration::from_secs(20);
        let outcomes: Vec<Outcome> = if at_once {
            let running: Vec<Transfer> = (0..SCALE_CLIENTS)
                .map(|i| self.download(i, passive))
                .collect();
            running.into_iter().map(|t| t.finish(limit)).collect()
        } else {
            (0..SCALE_CLIENTS)
                .map(|i| self.download(i, passive).finish(limit))
                .collect()
        };
        for o in outcomes.iter().filter(|o| !o.complete) {
            println!(
                "  {} failed: {} ({} bytes) {}",
                o.name,
                o.status,
                o.got_len,
                o.stderr.trim()
            );
        }
        outcomes.iter().filter(|o| o.complete).count()
    }

    /// How often each pod's vsftpd logged `text`.
    fn logged_per_pod(&self, text: &str) -> Vec<usize> {
        (1..=PODS)
            .map(|pod| {
                fs::read_to_string(self.lab.dir.join(format!("vsftpd-pod{pod}.log")))
                    .unwrap_or_default()
                    .matches(text)
                    .count()
            })
            .collect()
    }

    /// Downloads each pod's vsftpd served.
    pub fn served_per_pod(&self) -> Vec<usize> {
        self.logged_per_pod("OK DOWNLOAD")
    }

    /// PASV commands the pods' servers answered, all pods together: the control connections
    /// of passive sessions got through.
    pub fn passive_announcements(&self) -> usize {
        self.logged_per_pod("227 Entering Passive Mode")
            .iter()
            .sum()
    }

    pub fn clients(&self) -> usize {
        SCALE_CLIENTS
    }
}
