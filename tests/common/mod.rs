//! End-to-end harness shared by the `e2e_*` tests: network namespaces, real FTP servers
//! (vsftpd, proftpd, pure-ftpd) and clients (lftp, curl, Python's ftplib), the shipped nftables
//! policy and the real `ftp-alg` binary. tests/README.md has the interop matrix that
//! [`scenarios!`] generates, and the combinations it leaves out.
//!
//! Every test builds its own namespaces (named `fa<pid>x<n>` plus one letter per host), so tests
//! run in parallel. [`Lab`]'s `Drop` stops every process the test started and deletes its
//! namespaces, also when the test panics; a failed test prints the daemon's log, the server's
//! logs, the client transcripts and the gateway's ruleset, and keeps its temporary directory.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, OnceLock};
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant};

const ALG: &str = env!("CARGO_BIN_EXE_ftp-alg");
const POLICY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/rules/gateway-policy.nft");
/// The one line of the shipped policy that lets ftp-alg's pinholes through.
const MARK_RULE: &str = "ct mark 0x0000f7a0 accept";
/// The comment of the counted rules that take the place of [`MARK_RULE`] on the data path
/// (see [`Setup`]).
const DATA_PATH: &str = "e2e data path";

const C4: &str = "198.18.0.2";
const G_LAN4: &str = "198.18.0.1";
const G_WAN4: &str = "203.0.113.1";
const S4: &str = "203.0.113.2";
const C6: &str = "2001:db8:a::2";
const G_LAN6: &str = "2001:db8:a::1";
const G_WAN6: &str = "2001:db8:b::1";
const S6: &str = "2001:db8:b::2";
/// Where the server listens in the sidecar topology, next to the ALG on G.
const SIDECAR_PORT: u16 = 2100;
/// Where `scripts/install-ftp-servers` unpacks proftpd and pure-ftpd, which conflict with vsftpd
/// (and with each other) in apt.
const SERVERS_PREFIX: &str = "/opt/ftp-alg-test-servers";
/// pure-ftpd's virtual user (see [`Server::login`]), whose password is stored as a SHA-512 crypt
/// hash (`openssl passwd -6 -salt ftpalg e2e`): pure-pw's own default hash costs about 2 s per
/// login on these machines.
const PURE_FTPD_USER: &str = "e2e";
const PURE_FTPD_PASSWORD: &str = "e2e";
const PURE_FTPD_HASH: &str =
    "$6$ftpalg$HOFrx1pwmgPlhOuMfugjBuRMLYNEfMwrh49vV7oXQZ01z3SDnpCi212G3kTIZ/vqsnzThPynFOcwaGd.9ip150";
/// Where [`SyslogSink`] writes what pure-ftpd logs, in the test directory.
const PURE_FTPD_LOG: &str = "pure-ftpd.log";
/// proftpd's `ExtendedLog`, in the test directory.
const PROFTPD_COMMAND_LOG: &str = "proftpd-commands.log";
/// Its `LogFormat`: peer, command line, reply code and text. `LogFormat` knows no escapes, so
/// the tabs that separate them are literal.
const PROFTPD_LOG_FORMAT: &str = "%a\t%r\t%s %S";

const DATA_FILE: &str = "data.bin";
const UPLOAD_FILE: &str = "upload.bin";
const DATA_LEN: usize = 1 << 20;
/// Not a multiple of any buffer size, so a short upload shows.
const UPLOAD_LEN: usize = (1 << 20) + 4099;
/// The servers' passive ports.
const PASV_PORTS: RangeInclusive<u16> = 40000..=40100;
/// The ALG's data ports (`pinholes.port_min`/`port_max`).
const PINHOLE_PORTS: RangeInclusive<u16> = 61000..=61999;
const PINHOLE_TIMEOUT_SECS: u64 = 30;
/// The port the test's raw client names in its PORT command (195 * 256 + 81).
const RAW_CLIENT_PORT: u16 = 50001;

/// The harness kills a client that runs longer; the clients' own timeouts are much shorter.
const CLIENT_LIMIT: Duration = Duration::from_secs(40);
/// curl's `--connect-timeout`: a dropped data connection fails after this. curl counts it
/// from the start of the operation, through the control connection and the login to the
/// data connection, so it leaves room for a slow login on a loaded machine: with 3 s, a
/// negative control once timed out before it sent the data connection's SYN at all.
const CURL_CONNECT_TIMEOUT: Duration = Duration::from_secs(8);
/// A client whose data connection is blocked must give up within this.
const BLOCKED_LIMIT: Duration = Duration::from_secs(20);
/// How long the pinhole list may take to empty after a session ends: a third of the pinholes'
/// kernel timeout, so that an empty list still shows the daemon removed them, with room for a
/// loaded machine.
const PINHOLES_GONE_WITHIN: Duration = Duration::from_secs(PINHOLE_TIMEOUT_SECS / 3);

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Address family of the FTP traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Where the ALG sits. One family throughout: a pinhole cannot join an IPv4 client to an IPv6
/// server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// C — G — S: the client dials the server, G redirects tcp/21 from lan0 to the ALG.
    Gateway(Family),
    /// C — G — S: the client dials G (198.18.0.1 or 2001:db8:a::1), the ALG's upstream is S
    /// (203.0.113.2:21 or [2001:db8:b::2]:21). S has no route to C: every data connection must
    /// be translated on G.
    Reverse(Family),
    /// C — G: the server runs on G itself (port 2100 of G's lan0 address) behind the ALG on
    /// port 21 of the same address.
    Sidecar(Family),
}

/// The real FTP server used. vsftpd comes from Debian's package, proftpd and pure-ftpd from
/// [`SERVERS_PREFIX`]. Each runs in the foreground with a configuration the test writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    Vsftpd,
    Proftpd,
    PureFtpd,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Vsftpd => "vsftpd",
            Server::Proftpd => "proftpd",
            Server::PureFtpd => "pure-ftpd",
        }
    }

    /// The user and password a client logs in with: anonymous, but for pure-ftpd, whose
    /// anonymous root is always the system user `ftp`'s home: it gets a virtual user instead.
    fn login(self) -> (&'static str, &'static str) {
        match self {
            Server::Vsftpd | Server::Proftpd => ("anonymous", "e2e"),
            Server::PureFtpd => (PURE_FTPD_USER, PURE_FTPD_PASSWORD),
        }
    }
}

/// The real FTP client used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    Lftp,
    Curl,
    /// Python's ftplib, driven by [`FTPLIB_CLIENT`].
    Ftplib,
}

/// How the data connection is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataMode {
    /// PASV; the client dials the address announced in the 227 reply. Through ftp-alg that
    /// address is always the client's control peer (the server's in gateway mode, the one the
    /// client dialled in reverse mode), so a client that ignores it (curl's and ftplib's
    /// default) dials the same endpoint: the matrix has no separate cell for that.
    Pasv,
    /// EPSV.
    Epsv,
    /// PORT (active).
    Port,
    /// EPRT (active).
    Eprt,
}

impl DataMode {
    /// The command the server must receive for this mode.
    fn verb(self) -> &'static str {
        match self {
            DataMode::Pasv => "PASV",
            DataMode::Epsv => "EPSV",
            DataMode::Port => "PORT",
            DataMode::Eprt => "EPRT",
        }
    }

    fn passive(self) -> bool {
        matches!(self, DataMode::Pasv | DataMode::Epsv)
    }
}

/// What G runs and lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    /// The shipped policy and the daemon; the `ct mark` line on the data connections' path
    /// also counts what it accepts.
    Alg,
    /// The daemon, but the `ct mark` line on the data connections' path drops what it matches,
    /// and counts it.
    AlgWithoutMarkRule,
    /// No daemon; the policy forwards tcp/21 so the control connection works without it, and
    /// drops, counted, every other new connection it forwards.
    AlgStopped,
}

/// One data operation of a client session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    List,
    Download,
    Upload,
}

/// One end-to-end case: a topology, a server, a client and a data connection mode.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    pub topology: Topology,
    pub server: Server,
    pub client: Client,
    pub mode: DataMode,
}

/// Generates the interop matrix of each topology it is given (`name: Topology(Family);`): a
/// module per topology, in it one per server, in that one per cell (a client and a data mode),
/// and in that one `#[test]` per check (a method of [`Scenario`]), e.g.
/// `gateway_v4::proftpd::ftplib_pasv::round_trip`, so that every case runs as its own test and
/// in parallel with the others.
///
/// Every cell runs `round_trip`. The checks listed in `negatives:` run in the curl cells only:
/// one client per server and mode is enough to show that the data connection is the
/// firewall's to block, and curl is the one client that speaks every mode in both families.
/// The rows are the cells each client can do in each family; [`Client::unsupported`] says why
/// the others are left out.
macro_rules! scenarios {
    (negatives: $negatives:tt; $($module:ident: $topology:ident($family:ident);)+) => {
        $(mod $module {
            $crate::common::scenarios!(@server vsftpd: Vsftpd, $topology($family), $negatives);
            $crate::common::scenarios!(@server proftpd: Proftpd, $topology($family), $negatives);
            $crate::common::scenarios!(@server pure_ftpd: PureFtpd, $topology($family), $negatives);
        })+
    };
    (@server $module:ident: $server:ident, $topology:ident($family:ident), $negatives:tt) => {
        mod $module {
            $crate::common::scenarios!(@$family $topology, $server, $negatives);
        }
    };
    (@V4 $topology:ident, $server:ident, $negatives:tt) => {
        $crate::common::scenarios!(@cells $topology(V4), $server;
            lftp_pasv: Lftp, Pasv, [];
            lftp_epsv: Lftp, Epsv, [];
            lftp_port: Lftp, Port, [];
            curl_pasv: Curl, Pasv, $negatives;
            curl_epsv: Curl, Epsv, $negatives;
            curl_port: Curl, Port, $negatives;
            curl_eprt: Curl, Eprt, $negatives;
            ftplib_pasv: Ftplib, Pasv, [];
            ftplib_epsv: Ftplib, Epsv, [];
            ftplib_port: Ftplib, Port, [];
            ftplib_eprt: Ftplib, Eprt, [];
        );
    };
    (@V6 $topology:ident, $server:ident, $negatives:tt) => {
        $crate::common::scenarios!(@cells $topology(V6), $server;
            lftp_epsv: Lftp, Epsv, [];
            lftp_eprt: Lftp, Eprt, [];
            curl_epsv: Curl, Epsv, $negatives;
            curl_eprt: Curl, Eprt, $negatives;
            ftplib_epsv: Ftplib, Epsv, [];
            ftplib_eprt: Ftplib, Eprt, [];
        );
    };
    (@cells $topology:ident($family:ident), $server:ident;
        $($name:ident: $client:ident, $mode:ident, [$($negative:ident),*];)+) => {
        $(mod $name {
            fn scenario() -> $crate::common::Scenario {
                $crate::common::Scenario {
                    topology: $crate::common::Topology::$topology(
                        $crate::common::Family::$family,
                    ),
                    server: $crate::common::Server::$server,
                    client: $crate::common::Client::$client,
                    mode: $crate::common::DataMode::$mode,
                }
            }

            #[test]
            fn round_trip() {
                scenario().round_trip()
            }

            $(
                #[test]
                fn $negative() {
                    scenario().$negative()
                }
            )*
        })+
    };
}
pub(crate) use scenarios;

impl Scenario {
    /// A listing, a download and an upload through the ALG, each checked byte for byte; the
    /// server must have received this scenario's data command and no other, and no pinhole may
    /// outlive a session.
    pub fn round_trip(self) {
        let mut lab = self.lab(Setup::Alg);
        let mut runs = Vec::new();
        for ops in self.client.sessions(&[Op::List, Op::Download, Op::Upload]) {
            let run = lab.client_session(self.client, self.mode, ops);
            assert!(
                run.status.success(),
                "{self:?}: client session {ops:?} failed\n{}",
                run.transcript
            );
            lab.assert_no_pinholes_left();
            runs.push((ops, run));
        }

        let (_, listing) = runs
            .iter()
            .find(|(ops, _)| ops.contains(&Op::List))
            .expect("a session lists the directory");
        assert!(
            listing.stdout.contains(DATA_FILE),
            "{self:?}: the listing does not name {DATA_FILE}\n{}",
            listing.transcript
        );
        lab.assert_files_moved();

        // Every data connection (a listing, a download, an upload) was let through by the
        // `ct mark` line: a pinhole was installed, and used.
        let marked = lab.data_path_packets();
        assert!(
            marked >= 3,
            "{self:?}: the policy's ct mark line let {marked} connections through, not one per \
             data operation: did the data bypass the pinholes?"
        );

        let log = ServerLog::read(&lab);
        let verbs = log.data_verbs();
        assert_eq!(
            verbs.iter().map(String::as_str).collect::<BTreeSet<_>>(),
            BTreeSet::from([self.mode.verb()]),
            "{self:?}: the server received other data commands than {}",
            self.mode.verb()
        );
        assert!(
            verbs.len() >= 3,
            "{self:?}: expected a {} per data operation, the server saw {verbs:?}",
            self.mode.verb()
        );
        log.assert_control_from(lab.addrs().server_sees);
    }

    /// The same download with the daemon running but the policy's `ct mark` line on the data
    /// connections' path turned into a counted drop: the control connection works, and the
    /// data connection, marked by its pinhole, is dropped there.
    pub fn blocked_without_mark_rule(self) {
        self.blocked(Setup::AlgWithoutMarkRule);
    }

    /// Gateway only: no daemon, tcp/21 forwarded by the policy so that the client talks to the
    /// server directly: the control connection works, and the data connection is dropped by a
    /// counted rule in front of the forward chain's policy.
    pub fn blocked_when_alg_stopped(self) {
        assert!(
            matches!(self.topology, Topology::Gateway(_)),
            "{self:?}: without the ALG only a gateway has a control path"
        );
        self.blocked(Setup::AlgStopped);
    }

    /// The download fails, and the firewall's drop is why: the counted rule dropped the data
    /// connection, and the client failed the way a dropped connection fails (curl's connect
    /// timed out, or the server's did and it answered 425). Curl cells only: exit code 28 is
    /// curl's "timeout".
    fn blocked(self, setup: Setup) {
        assert_eq!(
            self.client,
            Client::Curl,
            "{self:?}: negative controls run with curl"
        );
        let mut lab = self.lab(setup);
        assert_eq!(
            lab.data_path_packets(),
            0,
            "{self:?}: counted before any transfer"
        );
        let run = lab.client_session(self.client, self.mode, &[Op::Download]);
        assert!(
            !run.status.success(),
            "{self:?} {setup:?}: the download succeeded although the firewall should drop \
             the data connection\n{}",
            run.transcript
        );
        assert!(
            run.elapsed < BLOCKED_LIMIT,
            "{self:?} {setup:?}: the client took {:?} to give up",
            run.elapsed
        );
        let downloaded = fs::read(lab.download_path()).unwrap_or_default();
        assert!(
            downloaded != lab.read(&lab.served_path()),
            "{self:?} {setup:?}: the file arrived complete"
        );

        let log = ServerLog::read(&lab);
        assert!(
            log.responses().iter().any(|r| r.starts_with("230 ")),
            "{self:?} {setup:?}: the login failed, so the control connection did not work\n{}",
            run.transcript
        );
        assert!(
            log.accepted(self.mode.verb()),
            "{self:?} {setup:?}: the server never accepted a {} command: the failure is not \
             the data connection's\n{}",
            self.mode.verb(),
            run.transcript
        );
        assert!(
            !log.responses().iter().any(|r| r.starts_with("226")),
            "{self:?} {setup:?}: the server completed a transfer"
        );
        let dropped = lab.data_path_packets();
        assert!(
            dropped > 0,
            "{self:?} {setup:?}: the firewall dropped no data connection, so something else \
             failed\n{}",
            run.transcript
        );
        if self.mode.passive() {
            // A timeout is 28; curl 7.88 reports a timed-out EPSV data connection over IPv6 as
            // 8, "Failed to connect". A refused or unreachable port fails at once instead.
            let timed_out = matches!(run.status.code(), Some(28) | Some(8));
            assert!(
                timed_out && run.elapsed >= CURL_CONNECT_TIMEOUT,
                "{self:?} {setup:?}: curl should time out connecting to the dropped data port\n{}",
                run.transcript
            );
        } else {
            assert!(
                log.responses().iter().any(|r| r.starts_with("425")),
                "{self:?} {setup:?}: the server should answer 425 when its data connection is \
                 dropped: {:?}\n{}",
                log.responses(),
                run.transcript
            );
        }
        if setup == Setup::AlgStopped {
            log.assert_control_from(lab.addrs().client);
        } else {
            log.assert_control_from(lab.addrs().server_sees);
            lab.assert_no_pinholes_left();
        }
    }

    fn lab(self, setup: Setup) -> Lab {
        if let Some(why) = self.client.unsupported(self.mode, self.topology.family()) {
            panic!("{self:?} cannot be tested: {why}");
        }
        Lab::with_server(self.topology, self.server, setup)
    }
}

impl Client {
    /// The control sessions that perform `ops`: lftp and ftplib do all in one, curl one per URL.
    fn sessions(self, ops: &[Op]) -> Vec<&[Op]> {
        match self {
            Client::Lftp | Client::Ftplib => vec![ops],
            Client::Curl => ops.chunks(1).collect(),
        }
    }

    /// Why this client cannot set up a data connection in `mode` over `family`, if it cannot:
    /// the cells that [`scenarios!`] leaves out of the matrix.
    fn unsupported(self, mode: DataMode, family: Family) -> Option<&'static str> {
        match (self, mode, family) {
            (_, DataMode::Pasv | DataMode::Port, Family::V6) => {
                Some("the 227 reply to PASV and the PORT command carry IPv4 addresses only")
            }
            (Client::Lftp, DataMode::Eprt, Family::V4) => {
                Some("lftp 4.9 sends PORT for an IPv4 data address, never EPRT")
            }
            _ => None,
        }
    }
}

/// Who is where in a topology.
struct Addrs {
    /// The client's address.
    client: IpAddr,
    /// The control address the client dials.
    dial: SocketAddr,
    /// The server, as the ALG knows it (original destination or upstream).
    server: IpAddr,
    /// The server's control port.
    server_port: u16,
    /// The source of the control connection as the server sees it: the ALG's side towards it.
    server_sees: IpAddr,
    /// The address the client believes it talks to.
    client_sees: IpAddr,
    /// Whether the ALG replaces the server's 227 port with one of its own.
    rewrites_pasv: bool,
}

impl Topology {
    fn family(self) -> Family {
        match self {
            Topology::Gateway(f) | Topology::Reverse(f) | Topology::Sidecar(f) => f,
        }
    }

    fn addrs(self) -> Addrs {
        let ip = |s: &str| -> IpAddr { s.parse().expect("a literal address") };
        let (c, g_lan, g_wan, s) = match self.family() {
            Family::V4 => (ip(C4), ip(G_LAN4), ip(G_WAN4), ip(S4)),
            Family::V6 => (ip(C6), ip(G_LAN6), ip(G_WAN6), ip(S6)),
        };
        match self {
            Topology::Gateway(_) => Addrs {
                client: c,
                dial: SocketAddr::new(s, 21),
                server: s,
                server_port: 21,
                server_sees: g_wan,
                client_sees: s,
                rewrites_pasv: false,
            },
            Topology::Reverse(_) => Addrs {
                client: c,
                dial: SocketAddr::new(g_lan, 21),
                server: s,
                server_port: 21,
                server_sees: g_wan,
                client_sees: g_lan,
                rewrites_pasv: true,
            },
            Topology::Sidecar(_) => Addrs {
                client: c,
                dial: SocketAddr::new(g_lan, 21),
                server: g_lan,
                server_port: SIDECAR_PORT,
                server_sees: g_lan,
                client_sees: g_lan,
                rewrites_pasv: true,
            },
        }
    }
}

/// What a crashed daemon leaves behind, a table with a pinhole in it, is gone once the daemon
/// has started again: it replaces its table in the same transaction that loads it.
pub fn stale_pinholes_swept_at_start() {
    let mut lab = Lab::new(Topology::Gateway(Family::V4), Setup::AlgStopped);
    lab.nft(&[
        "add table inet ftp_alg; \
         add set inet ftp_alg pin_v4 { type ipv4_addr . ipv4_addr . inet_service; flags timeout; }; \
         add element inet ftp_alg pin_v4 { 203.0.113.2 . 203.0.113.1 . 61000 timeout 1h \
         comment \"session=1 client=198.18.0.2 server=203.0.113.2\" }",
    ]);
    let stale = lab.pinholes();
    assert_eq!(stale.len(), 1, "the planted pinhole: {stale:#?}");
    lab.start_alg();
    let left = lab.pinholes();
    assert!(left.is_empty(), "left after start-up: {left:#?}");
}

/// While a raw control session sits between PASV and its transfer (and then between PORT and
/// its transfer), `pinholes list --json` shows exactly the pinhole the mode table asks for;
/// after QUIT the list is empty. IPv4 topologies only (the raw client speaks PASV/PORT).
pub fn pinholes_follow_session(topology: Topology) {
    assert!(
        topology.family() == Family::V4,
        "the raw client speaks PASV and PORT: IPv4 only"
    );
    require_tool("python3");
    let lab = Lab::new(topology, Setup::Alg);
    let a = lab.addrs();
    let mut raw = RawSession::start(&lab);

    let reply = raw.next_reply();
    assert!(reply.starts_with("227 "), "PASV answered {reply:?}");
    let announced = parse_host_port(between(&reply, '(', ')'));
    let server_227 = ServerLog::read(&lab)
        .responses()
        .iter()
        .rev()
        .find(|r| r.starts_with("227 "))
        .map(|r| parse_host_port(between(r, '(', ')')))
        .expect("vsftpd answered PASV");
    assert_eq!(announced.ip(), a.client_sees, "227 address the client saw");
    if a.rewrites_pasv {
        assert!(PINHOLE_PORTS.contains(&announced.port()), "{announced}");
    } else {
        assert_eq!(announced, server_227, "a gateway forwards 227 unchanged");
    }
    let pinholes = lab.pinholes();
    let [p] = pinholes.as_slice() else {
        panic!("one pinhole expected after PASV, found {pinholes:#?}");
    };
    p.assert_label(&a);
    assert_eq!(p.source, a.client, "PASV pinhole source: {p:#?}");
    assert_eq!(p.dial, announced, "PASV pinhole dial: {p:#?}");
    assert_eq!(p.destination(), server_227, "PASV pinhole target: {p:#?}");
    assert_eq!(
        p.seen_source(),
        a.server_sees,
        "the server must see the data connection from its control peer: {p:#?}"
    );

    raw.proceed();
    let reply = raw.next_reply();
    assert!(reply.starts_with("200 "), "PORT answered {reply:?}");
    let log = ServerLog::read(&lab);
    let port_cmd = log
        .commands()
        .into_iter()
        .rev()
        .find(|c| c.starts_with("PORT "))
        .expect("vsftpd received PORT");
    let rewritten = parse_host_port(&port_cmd["PORT ".len()..]);
    assert_eq!(
        rewritten.ip(),
        a.server_sees,
        "PORT reaching the server: {port_cmd}"
    );
    assert!(PINHOLE_PORTS.contains(&rewritten.port()), "{port_cmd}");
    let pasv_session = p.session;
    let pinholes = lab.pinholes();
    let p = pinholes
        .iter()
        .find(|p| p.source == a.server)
        .unwrap_or_else(|| panic!("no pinhole from the server after PORT: {pinholes:#?}"));
    p.assert_label(&a);
    assert_eq!(
        p.session, pasv_session,
        "one control session, one session id"
    );
    assert_eq!(p.dial, rewritten, "PORT pinhole dial: {p:#?}");
    assert_eq!(
        p.destination(),
        SocketAddr::new(a.client, RAW_CLIENT_PORT),
        "PORT pinhole target: {p:#?}"
    );
    assert_eq!(
        p.seen_source(),
        a.client_sees,
        "the client must see the data connection from the address it dialled: {p:#?}"
    );

    raw.proceed();
    let reply = raw.next_reply();
    assert!(reply.starts_with("221"), "QUIT answered {reply:?}");
    raw.finish();
    lab.assert_no_pinholes_left();
}

/// A control session driven line by line by a Python ftplib script in the client namespace.
struct RawSession {
    child: Child,
    stdout: BufReader<ChildStdout>,
    stderr_path: PathBuf,
}

const RAW_CLIENT: &str = r#"
import ftplib, sys
ftp = ftplib.FTP()
ftp.connect(sys.argv[1], 21, timeout=10)
ftp.login()
print(ftp.sendcmd("PASV"), flush=True)
sys.stdin.readline()
host = ftp.sock.getsockname()[0].replace(".", ",")
print(ftp.sendcmd("PORT %s,%d,%d" % (host, int(sys.argv[2]) // 256, int(sys.argv[2]) % 256)), flush=True)
sys.stdin.readline()
print(ftp.quit(), flush=True)
"#;

impl RawSession {
    fn start(lab: &Lab) -> RawSession {
        let stderr_path = lab.dir.join("raw-client.stderr");
        let mut child = lab
            .client_command(&[
                "python3",
                "-c",
                RAW_CLIENT,
                &lab.addrs().dial.ip().to_string(),
                &RAW_CLIENT_PORT.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(create(&stderr_path))
            .spawn()
            .expect("spawn python3");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        RawSession {
            child,
            stdout,
            stderr_path,
        }
    }

    fn next_reply(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read python3");
        assert!(
            !line.is_empty(),
            "the raw FTP client ended early:\n{}",
            fs::read_to_string(&self.stderr_path).unwrap_or_default()
        );
        line.trim_end().to_owned()
    }

    fn proceed(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        stdin.write_all(b"\n").expect("write python3");
        stdin.flush().expect("flush python3");
    }

    fn finish(mut self) {
        let status = self.child.wait().expect("wait python3");
        assert!(
            status.success(),
            "the raw FTP client failed ({status}):\n{}",
            fs::read_to_string(&self.stderr_path).unwrap_or_default()
        );
    }
}

/// One control session of [`Client::Ftplib`]: log in, then LIST, RETR and STOR as the
/// arguments say, in the data connection mode MODE. ftplib sends PASV and PORT over IPv4,
/// EPSV and EPRT over IPv6; the two overrides make it send EPSV and EPRT over IPv4 too.
const FTPLIB_CLIENT: &str = r#"
"""usage: HOST PORT USER PASSWORD MODE (LIST | RETR REMOTE LOCAL | STOR LOCAL REMOTE)...
MODE: pasv (dial the 227 address), epsv, port, eprt"""
import ftplib, sys

host, port, user, password, mode, *ops = sys.argv[1:]

class Client(ftplib.FTP):
    def makepasv(self):
        if mode == "epsv":
            return ftplib.parse229(self.sendcmd("EPSV"), self.sock.getpeername())
        return super().makepasv()

    def sendport(self, host, port):
        if mode == "eprt":
            return self.sendeprt(host, port)
        return super().sendport(host, port)

ftp = Client(timeout=5)
ftp.trust_server_pasv_ipv4_address = mode == "pasv"
ftp.connect(host, int(port))
ftp.login(user, password)
ftp.set_pasv(mode in ("pasv", "epsv"))
run_ops(ftp, ops)
ftp.quit()
"#;

/// The operations loop both ftplib clients share ([`FTPLIB_CLIENT`] and the FTPS one), put in
/// front of each script by [`ftplib_script`]. `extra(op, args)` handles a script's own
/// operations and says whether it knew `op`.
const FTPLIB_OPS: &str = r#"
import sys

def run_ops(ftp, ops, extra=lambda op, args: False):
    args = iter(ops)
    for op in args:
        if op == "LIST":
            ftp.retrlines("LIST")
        elif op == "RETR":
            remote, local = next(args), next(args)
            with open(local, "wb") as f:
                ftp.retrbinary("RETR " + remote, f.write)
        elif op == "STOR":
            local, remote = next(args), next(args)
            with open(local, "rb") as f:
                ftp.storbinary("STOR " + remote, f)
        elif not extra(op, args):
            sys.exit("unknown operation " + op)
"#;

/// An ftplib client script: `main` after the shared [`FTPLIB_OPS`].
pub(crate) fn ftplib_script(main: &str) -> String {
    format!("{FTPLIB_OPS}{main}")
}

/// `sh -c PURE_FTPD_MOUNTS sh DIR PROGRAM ARGS...` runs PROGRAM with DIR as its /dev (the
/// device nodes pure-ftpd opens, bound from the real /dev, beside the test's socket as
/// /dev/log) and an empty /run (where pure-ftpd keeps a file per session). `ip netns exec`
/// gives each command a mount namespace of its own: neither the host nor any other process
/// sees these mounts.
const PURE_FTPD_MOUNTS: &str = r#"set -e
dev=$1
shift
for node in null random urandom; do
    : >"$dev/$node"
    mount --bind "/dev/$node" "$dev/$node"
done
mount --rbind "$dev" /dev
mount -t tmpfs tmpfs /run
exec "$@"
"#;

/// Collects what pure-ftpd logs to the test's syslog socket into [`PURE_FTPD_LOG`]. A thread
/// reads the socket as pure-ftpd writes: a datagram socket queues only
/// `net.unix.max_dgram_qlen` datagrams (10 here) before `syslog()` blocks the server.
struct SyslogSink {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    flushed: Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

/// A datagram the test sends to its own socket: once the thread has read it, it has read what
/// pure-ftpd logged before it. Syslog messages start with `<`, never with a NUL.
const SYSLOG_FLUSH: &[u8] = b"\0flush";

impl SyslogSink {
    fn start(socket: PathBuf, log: PathBuf) -> SyslogSink {
        let receiver = UnixDatagram::bind(&socket).expect("bind pure-ftpd's syslog socket");
        // pure-ftpd's session process connects again after it has dropped root.
        fs::set_permissions(&socket, fs::Permissions::from_mode(0o666)).expect("chmod");
        receiver
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("syslog socket timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let (flush_done, flushed) = mpsc::channel();
        let thread = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let mut log = create(&log);
                let mut datagram = [0; 4096];
                while !stop.load(Ordering::SeqCst) {
                    match receiver.recv(&mut datagram) {
                        Ok(n) if &datagram[..n] == SYSLOG_FLUSH => {
                            let _ = flush_done.send(());
                        }
                        Ok(n) => log
                            .write_all(&datagram[..n])
                            .and_then(|()| log.write_all(b"\n"))
                            .expect("append to pure-ftpd's log"),
                        // A read with a timeout fails with EINTR when the process is
                        // stopped and continued (signal(7)), even without a signal handler.
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                            ) => {}
                        Err(e) => panic!("read pure-ftpd's syslog: {e}"),
                    }
                }
            }
        });
        SyslogSink {
            socket,
            stop,
            flushed,
            thread: Some(thread),
        }
    }

    /// Returns once everything pure-ftpd logged before the call is in the log file.
    fn flush(&self) {
        UnixDatagram::unbound()
            .and_then(|s| s.send_to(SYSLOG_FLUSH, &self.socket))
            .expect("send to the syslog socket");
        self.flushed
            .recv_timeout(Duration::from_secs(5))
            .expect("the syslog thread has stopped");
    }
}

impl Drop for SyslogSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A pinhole as `ftp-alg pinholes list --json` reports it; written out here rather than
/// taken from the library, so that a change of the JSON interface fails these tests.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Pinhole {
    /// The daemon's id; `None` when listed from the kernel without the daemon.
    id: Option<u64>,
    /// `pinhole`, or `window` (`policy.tls_window`).
    kind: String,
    state: String,
    session: u64,
    client: IpAddr,
    server: IpAddr,
    source: IpAddr,
    dial: SocketAddr,
    /// A window's last port (its first is `dial`'s).
    last_port: Option<u16>,
    maps_to: Option<SocketAddr>,
    snat: Option<IpAddr>,
    seconds_left: u64,
}

impl Pinhole {
    /// Where the data connection ends up.
    fn destination(&self) -> SocketAddr {
        self.maps_to.unwrap_or(self.dial)
    }

    /// The source address the data connection's far end sees.
    fn seen_source(&self) -> IpAddr {
        self.snat.unwrap_or(self.source)
    }

    fn assert_label(&self, a: &Addrs) {
        assert_eq!(self.state, "waiting", "before its connection: {self:#?}");
        assert_eq!(self.client, a.client, "pinhole label client: {self:#?}");
        assert_eq!(self.server, a.server, "pinhole label server: {self:#?}");
        assert!(
            (1..=PINHOLE_TIMEOUT_SECS).contains(&self.seconds_left),
            "seconds_left out of 1..={PINHOLE_TIMEOUT_SECS}: {self:#?}"
        );
    }
}

/// Who said a line on a control connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Said {
    Command,
    Reply,
}

/// One command or reply line as the server logged it, with the control connection's peer.
#[derive(Debug)]
struct Event {
    said: Said,
    peer: IpAddr,
    text: String,
}

impl Event {
    fn new(said: Said, peer: &str, text: &str) -> Event {
        Event {
            said,
            peer: peer
                .parse()
                .unwrap_or_else(|e| panic!("the server logged peer {peer:?}: {e}")),
            text: text.to_owned(),
        }
    }
}

/// Reads one line of a server's log: the events on it, `None` for a line of another kind.
type LineParser = fn(&str) -> Option<Vec<Event>>;

/// What the server itself recorded of its control connections, in order: vsftpd's protocol
/// log (`log_ftp_protocol=YES`), proftpd's `ExtendedLog` (a line per command with its reply),
/// pure-ftpd's verbose syslog (`-d -d`). The server's word is what counts: curl silently falls
/// back from EPSV to PASV and from EPRT to PORT, and the ALG rewrites what the client sent.
struct ServerLog {
    events: Vec<Event>,
}

impl ServerLog {
    fn read(lab: &Lab) -> ServerLog {
        let (file, parse): (_, LineParser) = match lab.server {
            Server::Vsftpd => ("vsftpd.log", Self::vsftpd_line),
            Server::Proftpd => (PROFTPD_COMMAND_LOG, Self::proftpd_line),
            Server::PureFtpd => {
                lab.flush_syslog();
                (PURE_FTPD_LOG, Self::pure_ftpd_line)
            }
        };
        // Lossy: a server logs the bytes of a command as it got them, not always UTF-8.
        let text =
            String::from_utf8_lossy(&fs::read(lab.dir.join(file)).unwrap_or_default()).into_owned();
        ServerLog {
            events: text.lines().filter_map(parse).flatten().collect(),
        }
    }

    /// `... FTP command: Client "203.0.113.1", "PASV"`, and the same with `FTP response`.
    fn vsftpd_line(line: &str) -> Option<Vec<Event>> {
        [
            (Said::Command, "FTP command"),
            (Said::Reply, "FTP response"),
        ]
        .into_iter()
        .find_map(|(said, tag)| {
            let rest = line.split_once(&format!("{tag}: Client \""))?.1;
            let (peer, quoted) = rest.split_once("\", \"")?;
            Some(vec![Event::new(said, peer, quoted.strip_suffix('"')?)])
        })
    }

    /// `peer TAB command TAB reply`, as [`PROFTPD_LOG_FORMAT`] writes it.
    fn proftpd_line(line: &str) -> Option<Vec<Event>> {
        let mut fields = line.splitn(3, '\t');
        let (peer, command, reply) = (fields.next()?, fields.next()?, fields.next()?);
        Some(vec![
            Event::new(Said::Command, peer, command),
            Event::new(Said::Reply, peer, reply),
        ])
    }

    /// `<95>Nov 24 06:00:20 pure-ftpd: (user@peer) [DEBUG] Command [eprt] [|2|::1|34829|]`
    /// for a command (the verb in lower case), `... [DEBUG] 200 PORT command successful` for
    /// each line of a reply.
    fn pure_ftpd_line(line: &str) -> Option<Vec<Event>> {
        let (_, rest) = line.split_once(" pure-ftpd: (")?;
        let (who, said) = rest.split_once(") [DEBUG] ")?;
        let (_, peer) = who.rsplit_once('@')?;
        let event = match said.strip_prefix("Command [") {
            Some(command) => {
                let (verb, arg) = command.split_once("] [")?;
                let line = format!("{} {}", verb.to_ascii_uppercase(), arg.strip_suffix(']')?);
                Event::new(Said::Command, peer, line.trim_end())
            }
            None => Event::new(Said::Reply, peer, said),
        };
        Some(vec![event])
    }

    fn lines(&self, said: Said) -> Vec<&str> {
        self.events
            .iter()
            .filter(|e| e.said == said)
            .map(|e| e.text.as_str())
            .collect()
    }

    fn commands(&self) -> Vec<&str> {
        self.lines(Said::Command)
    }

    fn responses(&self) -> Vec<&str> {
        self.lines(Said::Reply)
    }

    /// The data connection commands received, in order.
    fn data_verbs(&self) -> Vec<String> {
        self.commands()
            .into_iter()
            .filter_map(|c| {
                let verb = c.split(' ').next()?.to_ascii_uppercase();
                ["PASV", "EPSV", "PORT", "EPRT", "LPSV", "LPRT"]
                    .contains(&verb.as_str())
                    .then_some(verb)
            })
            .collect()
    }

    /// Whether a `verb` command was answered with a 2xx reply.
    fn accepted(&self, verb: &str) -> bool {
        self.events.windows(2).any(|w| {
            w[0].said == Said::Command
                && w[0].text.split(' ').next() == Some(verb)
                && w[1].said == Said::Reply
                && w[1].text.starts_with('2')
        })
    }

    /// Asserts that every control connection reached the server from `peer`: from the ALG
    /// when it runs, from the client itself when it does not.
    fn assert_control_from(&self, peer: IpAddr) {
        let peers: BTreeSet<IpAddr> = self.events.iter().map(|e| e.peer).collect();
        assert_eq!(
            peers,
            BTreeSet::from([peer]),
            "control connections reached the server from {peers:?}, expected {peer}"
        );
    }
}

/// The namespaces, processes and files of one test.
struct Lab {
    topology: Topology,
    server: Server,
    prefix: String,
    dir: PathBuf,
    namespaces: Vec<String>,
    /// The FTP server's main process.
    server_process: Option<Child>,
    /// pure-ftpd's log (see [`Lab::pure_ftpd_command`]).
    syslog: Option<SyslogSink>,
    alg: Option<Child>,
    /// TOML laid over the harness's configuration of the daemon, key by key (see
    /// [`merge_toml`]): new sections such as `[limits]`, or keys that replace the harness's own,
    /// such as `[pinholes] timeout_secs`.
    alg_config: String,
    /// Environment variables the daemon is started with, beside the harness's own.
    alg_env: Vec<(String, String)>,
    /// A program and its arguments that run `ip netns exec ... ftp-alg run ...` (e.g. in a
    /// mount namespace of its own); empty for none.
    alg_prefix: Vec<String>,
    runs: u32,
}

/// A finished client run.
struct Run {
    status: ExitStatus,
    stdout: String,
    elapsed: Duration,
    /// Command, status, stdout and stderr, for failure messages.
    transcript: String,
}

impl Lab {
    /// A lab with vsftpd, the server the tests that are not about interop use.
    fn new(topology: Topology, setup: Setup) -> Lab {
        Lab::with_server(topology, Server::Vsftpd, setup)
    }

    fn with_server(topology: Topology, server: Server, setup: Setup) -> Lab {
        Lab::prepared(topology, server, setup, |_| String::new())
    }

    /// [`Lab::with_server`], with `prepare` run once the test's files are written and before
    /// the server starts: it may add files, and it returns lines for the end of vsftpd.conf
    /// (where a setting overrides the harness's; only vsftpd reads them).
    fn prepared(
        topology: Topology,
        server: Server,
        setup: Setup,
        prepare: impl FnOnce(&Lab) -> String,
    ) -> Lab {
        let mut lab = Lab::empty(topology, server);
        lab.build_network();
        lab.write_files();
        let vsftpd_options = prepare(&lab);
        lab.load_policy(setup);
        lab.start_server(&vsftpd_options);
        if setup != Setup::AlgStopped {
            lab.start_alg();
        }
        lab
    }

    /// A lab with its prefix and its (empty) directory, and nothing else yet: no namespace, no
    /// process. Suites that build a network of their own start here; `Drop` still cleans up
    /// every namespace added with [`Lab::add_namespace`].
    fn empty(topology: Topology, server: Server) -> Lab {
        preflight();
        let prefix = format!(
            "fa{}x{}",
            std::process::id(),
            NEXT_LAB.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(format!("ftp-alg-e2e-{prefix}"));
        if dir.exists() {
            fs::remove_dir_all(&dir).expect("remove a stale test directory");
        }
        fs::create_dir_all(&dir).expect("create the test directory");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        Lab {
            topology,
            server,
            prefix,
            dir,
            namespaces: Vec::new(),
            server_process: None,
            syslog: None,
            alg: None,
            alg_config: String::new(),
            alg_env: Vec::new(),
            alg_prefix: Vec::new(),
            runs: 0,
        }
    }

    fn addrs(&self) -> Addrs {
        self.topology.addrs()
    }

    fn client_ns(&self) -> String {
        format!("{}c", self.prefix)
    }

    fn gateway_ns(&self) -> String {
        format!("{}g", self.prefix)
    }

    /// The namespace the server runs in: G itself for a sidecar.
    fn server_ns(&self) -> String {
        match self.topology {
            Topology::Sidecar(_) => self.gateway_ns(),
            Topology::Gateway(_) | Topology::Reverse(_) => format!("{}s", self.prefix),
        }
    }

    fn ftp_root(&self) -> PathBuf {
        self.dir.join("ftp-root")
    }

    fn served_path(&self) -> PathBuf {
        self.ftp_root().join(DATA_FILE)
    }

    fn stored_upload_path(&self) -> PathBuf {
        self.ftp_root().join("up").join(UPLOAD_FILE)
    }

    fn upload_source_path(&self) -> PathBuf {
        self.dir.join(UPLOAD_FILE)
    }

    fn download_path(&self) -> PathBuf {
        self.dir.join("download.bin")
    }

    fn read(&self, path: &Path) -> Vec<u8> {
        fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    fn ip(&self, args: &[&str]) {
        let mut cmd = Command::new("ip");
        cmd.args(args);
        must(cmd);
    }

    fn exec(&self, ns: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(args);
        cmd
    }

    fn add_namespace(&mut self, ns: String) {
        self.ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        self.ip(&["-n", &ns, "link", "set", "lo", "up"]);
    }

    /// A veth pair from G (`g_if`) to `peer` (`eth0`) with one IPv4 and one IPv6 network.
    fn link(&self, g_if: &str, peer: &str, g_addrs: [&str; 2], peer_addrs: [&str; 2]) {
        let g = self.gateway_ns();
        self.ip(&[
            "-n", &g, "link", "add", g_if, "type", "veth", "peer", "name", "eth0", "netns", peer,
        ]);
        for (ns, dev, addrs) in [(g.as_str(), g_if, g_addrs), (peer, "eth0", peer_addrs)] {
            self.ip(&["-n", ns, "addr", "add", addrs[0], "dev", dev]);
            self.ip(&["-n", ns, "addr", "add", addrs[1], "dev", dev, "nodad"]);
            self.ip(&["-n", ns, "link", "set", dev, "up"]);
        }
    }

    fn build_network(&mut self) {
        let (c, g) = (self.client_ns(), self.gateway_ns());
        self.add_namespace(c.clone());
        self.add_namespace(g.clone());
        let lan = |a: &str, len: &str| format!("{a}/{len}");
        self.link(
            "lan0",
            &c,
            [&lan(G_LAN4, "24"), &lan(G_LAN6, "64")],
            [&lan(C4, "24"), &lan(C6, "64")],
        );
        self.ip(&["-n", &c, "route", "add", "default", "via", G_LAN4]);
        self.ip(&["-n", &c, "-6", "route", "add", "default", "via", G_LAN6]);
        if let Topology::Sidecar(_) = self.topology {
            return;
        }
        let s = self.server_ns();
        self.add_namespace(s.clone());
        self.link(
            "wan0",
            &s,
            [&lan(G_WAN4, "24"), &lan(G_WAN6, "64")],
            [&lan(S4, "24"), &lan(S6, "64")],
        );
        if let Topology::Gateway(_) = self.topology {
            self.ip(&["-n", &s, "route", "add", "default", "via", G_WAN4]);
            self.ip(&["-n", &s, "-6", "route", "add", "default", "via", G_WAN6]);
        }
        must(self.exec(
            &g,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
        ));
    }

    fn write_files(&self) {
        let root = self.ftp_root();
        let up = root.join("up");
        let empty = self.dir.join("empty");
        for d in [&root, &up, &empty] {
            fs::create_dir_all(d).expect("create the server's directories");
        }
        let seed = self.prefix.bytes().fold(0x9e37_79b9_7f4a_7c15_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        fs::write(self.served_path(), pseudo_random(DATA_LEN, seed)).expect("write data file");
        fs::write(self.upload_source_path(), pseudo_random(UPLOAD_LEN, !seed))
            .expect("write upload file");
        // vsftpd refuses a writable anonymous root; uploads go to up/.
        for (path, mode) in [
            (self.served_path(), 0o644),
            (root.clone(), 0o555),
            (empty, 0o555),
            (up, 0o777),
        ] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        }
    }

    fn nft(&self, args: &[&str]) {
        must(self.exec(&self.gateway_ns(), &[&["nft"], args].concat()));
    }

    /// Replaces the shipped `ct mark` accept rule of `chain` by the same match, counted, with
    /// `verdict` (and [`DATA_PATH`] for a comment), so that the test can tell how many
    /// connections the pinholes marked on the data path.
    fn count_mark_rule(&self, chain: &str, verdict: &str) {
        let listing = must(self.exec(
            &self.gateway_ns(),
            &["nft", "-a", "list", "chain", "inet", "gateway", chain],
        ));
        let handle = listing
            .lines()
            .find(|l| l.contains(MARK_RULE))
            .and_then(|l| l.rsplit_once("# handle "))
            .map(|(_, h)| h.trim().to_owned())
            .unwrap_or_else(|| panic!("no `{MARK_RULE}` rule in chain {chain}:\n{listing}"));
        let rule = format!("ct mark 0x0000f7a0 counter {verdict} comment \"{DATA_PATH}\"");
        self.nft(&[
            "replace", "rule", "inet", "gateway", chain, "handle", &handle, &rule,
        ]);
    }

    /// The packets counted so far by G's [`DATA_PATH`] rules. Only a connection's first
    /// packet reaches them (the policy accepts established ones before), so this is about the
    /// number of data connections that met them, counting retransmitted SYNs.
    fn data_path_packets(&self) -> u64 {
        self.data_path_packets_in(&self.gateway_ns())
    }

    /// [`Lab::data_path_packets`] of the policy in namespace `ns`.
    fn data_path_packets_in(&self, ns: &str) -> u64 {
        let text = must(self.exec(ns, &["nft", "-j", "list", "table", "inet", "gateway"]));
        let json: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("nft -j printed {text:?}: {e}"));
        let rules = json["nftables"].as_array().into_iter().flatten();
        rules
            .filter_map(|o| o.get("rule"))
            .filter(|r| r["comment"] == DATA_PATH)
            .flat_map(|r| r["expr"].as_array().into_iter().flatten())
            .filter_map(|e| e.get("counter"))
            .map(|c| c["packets"].as_u64().unwrap_or(0))
            .sum()
    }

    /// The shipped default-deny policy, plus what the topology needs, minus what `setup` takes
    /// away. Reverse and sidecar accept their control connection on tcp/21 (it is addressed to
    /// G). A sidecar's active data connection starts on G itself, so its policy also makes the
    /// output chain default-deny with the same `ct mark` line; without that the negative
    /// control of a sidecar's PORT would pass through the shipped policy's open output chain.
    /// Local traffic is accepted by destination (`fib daddr type local`), not by `oif lo`:
    /// the output hook still reports `lo` for a connection to G's own address that the
    /// pinhole's DNAT has just sent out of lan0. ICMP is accepted as in the shipped chains:
    /// IPv6 finds its neighbours with ICMPv6, which the output hook sees (ARP it does not).
    fn load_policy(&self, setup: Setup) {
        self.nft(&["-f", POLICY]);
        if matches!(self.topology, Topology::Reverse(_) | Topology::Sidecar(_)) {
            self.nft(&[
                "add", "rule", "inet", "gateway", "input", "tcp", "dport", "21", "accept",
            ]);
        }
        if let Topology::Sidecar(_) = self.topology {
            for rule in [
                "ct state established,related accept",
                "fib daddr type local accept",
                "meta l4proto { icmp, ipv6-icmp } accept",
                MARK_RULE,
            ] {
                self.nft(&["add rule inet gateway output", rule]);
            }
            self.nft(&["chain inet gateway output { policy drop; }"]);
        }
        // The chains a data connection's first packet crosses in G.
        let data_chains: &[&str] = match self.topology {
            Topology::Gateway(_) | Topology::Reverse(_) => &["forward"],
            Topology::Sidecar(_) => &["input", "output"],
        };
        match setup {
            Setup::Alg => {
                for chain in data_chains {
                    self.count_mark_rule(chain, "accept");
                }
            }
            Setup::AlgWithoutMarkRule => {
                for chain in data_chains {
                    self.count_mark_rule(chain, "drop");
                }
            }
            Setup::AlgStopped => {
                self.nft(&[
                    "add", "rule", "inet", "gateway", "forward", "tcp", "dport", "21", "accept",
                ]);
                // Every other new connection, the data connections among them, is dropped by
                // the chain's policy; this rule drops them first, and counts them.
                let rule =
                    format!("ct state new tcp dport != 21 counter drop comment \"{DATA_PATH}\"");
                self.nft(&["add rule inet gateway forward", &rule]);
            }
        }
    }

    /// Starts the FTP server on the server's address (see [`Addrs`]) and waits until it listens.
    fn start_server(&mut self, vsftpd_options: &str) {
        // proftpd opens an active data connection with a blocking connect() and no timeout of
        // its own: when a negative control drops its SYN, it would hold the session, and so
        // the pinhole's translation, through two minutes of SYN retries. With one retry it
        // gives up after 3 s, as vsftpd does with `connect_timeout=3`.
        must(self.exec(
            &self.server_ns(),
            &["sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"],
        ));
        let name = self.server.name();
        let mut cmd = match self.server {
            Server::Vsftpd => self.vsftpd_command(vsftpd_options),
            Server::Proftpd => self.proftpd_command(),
            Server::PureFtpd => self.pure_ftpd_command(),
        };
        let out = self.dir.join(format!("{name}.out"));
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(create(&out))
            .stderr(create(&out))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let port = self.addrs().server_port;
        let ready = self.wait_ready(&mut child, &self.server_ns(), port, &out, || true);
        self.server_process = Some(child);
        if let Err(e) = ready {
            panic!("{name} {e}");
        }
    }

    fn server_bind(&self) -> SocketAddr {
        let a = self.addrs();
        SocketAddr::new(a.server, a.server_port)
    }

    fn vsftpd_command(&self, options: &str) -> Command {
        self.vsftpd_command_at(&self.server_ns(), self.server_bind(), "vsftpd", options)
    }

    /// vsftpd in `ns`, listening on `bind`, serving the lab's root; its configuration and log
    /// are `NAME.conf` and `NAME.log` in the lab's directory.
    fn vsftpd_command_at(&self, ns: &str, bind: SocketAddr, name: &str, options: &str) -> Command {
        let listen = match bind {
            SocketAddr::V4(b) => format!("listen=YES\nlisten_address={}\n", b.ip()),
            SocketAddr::V6(b) => {
                format!("listen=NO\nlisten_ipv6=YES\nlisten_address6={}\n", b.ip())
            }
        };
        let conf = format!(
            "{listen}listen_port={port}\n\
             background=NO\n\
             seccomp_sandbox=NO\n\
             isolate=NO\n\
             isolate_network=NO\n\
             anonymous_enable=YES\n\
             local_enable=NO\n\
             no_anon_password=YES\n\
             ftp_username=ftp\n\
             anon_root={root}\n\
             write_enable=YES\n\
             anon_upload_enable=YES\n\
             anon_umask=022\n\
             secure_chroot_dir={empty}\n\
             pasv_min_port={pasv_min}\n\
             pasv_max_port={pasv_max}\n\
             connect_timeout=3\n\
             accept_timeout=5\n\
             log_ftp_protocol=YES\n\
             xferlog_enable=YES\n\
             xferlog_std_format=NO\n\
             vsftpd_log_file={log}\n\
             {options}",
            port = bind.port(),
            root = self.ftp_root().display(),
            empty = self.dir.join("empty").display(),
            pasv_min = PASV_PORTS.start(),
            pasv_max = PASV_PORTS.end(),
            log = self.dir.join(format!("{name}.log")).display(),
        );
        let conf_path = self.dir.join(format!("{name}.conf"));
        fs::write(&conf_path, conf).expect("write vsftpd.conf");
        self.exec(ns, &["vsftpd", &conf_path.to_string_lossy()])
    }

    /// proftpd in the foreground (`-n`), its scoreboard and PID file in the test directory,
    /// anonymous logins into the test's root, and an `ExtendedLog` of every command with its
    /// reply for [`ServerLog`]. `DelayEngine off`: mod_delay would slow every login down;
    /// `ControlsEngine off`: mod_ctrls would put its socket in the host's /run.
    fn proftpd_command(&self) -> Command {
        let bind = self.server_bind();
        let file = |name: &str| self.dir.join(name).display().to_string();
        let conf = format!(
            "ServerType standalone\n\
             DefaultServer on\n\
             UseIPv6 on\n\
             DefaultAddress {address}\n\
             SocketBindTight on\n\
             Port {port}\n\
             User nobody\n\
             Group nogroup\n\
             PidFile {pid}\n\
             ScoreboardFile {scoreboard}\n\
             DelayEngine off\n\
             ControlsEngine off\n\
             UseReverseDNS off\n\
             WtmpLog off\n\
             UseFtpUsers off\n\
             RequireValidShell off\n\
             PassivePorts {pasv_min} {pasv_max}\n\
             SystemLog {system_log}\n\
             TransferLog none\n\
             LogFormat commands \"{PROFTPD_LOG_FORMAT}\"\n\
             ExtendedLog {command_log} ALL commands\n\
             <Anonymous {root}>\n\
             User ftp\n\
             Group nogroup\n\
             UserAlias anonymous ftp\n\
             AllowOverwrite on\n\
             </Anonymous>\n",
            address = bind.ip(),
            port = bind.port(),
            pid = file("proftpd.pid"),
            scoreboard = file("proftpd.scoreboard"),
            pasv_min = PASV_PORTS.start(),
            pasv_max = PASV_PORTS.end(),
            system_log = file("proftpd.log"),
            command_log = file(PROFTPD_COMMAND_LOG),
            root = self.ftp_root().display(),
        );
        let conf_path = self.dir.join("proftpd.conf");
        fs::write(&conf_path, conf).expect("write proftpd.conf");
        self.exec(
            &self.server_ns(),
            &[
                &installed("usr/sbin/proftpd"),
                "-n",
                "-c",
                &conf_path.to_string_lossy(),
            ],
        )
    }

    /// pure-ftpd, configured on its command line. Its anonymous root is always the system user
    /// `ftp`'s home, so a virtual user (PureDB, see [`PURE_FTPD_HASH`]) gets the test's root.
    /// It logs only to syslog, that is to /dev/log, so it runs under [`PURE_FTPD_MOUNTS`] with
    /// a [`SyslogSink`]'s socket as /dev/log.
    fn pure_ftpd_command(&mut self) -> Command {
        let passwd = self.dir.join("pureftpd.passwd");
        let db = self.dir.join("pureftpd.pdb");
        // user:hash:uid:gid:gecos:home, then no limits; files belong to nobody (65534),
        // and the `/./` in the home chroots the user there.
        fs::write(
            &passwd,
            format!(
                "{PURE_FTPD_USER}:{PURE_FTPD_HASH}:65534:65534::{}/./::::::::::::\n",
                self.ftp_root().display()
            ),
        )
        .expect("write pure-ftpd's passwd file");
        let mut mkdb = Command::new(installed("usr/bin/pure-pw"));
        mkdb.arg("mkdb").arg(&db).arg("-f").arg(&passwd);
        must(mkdb);

        let dev = self.dir.join("dev");
        fs::create_dir(&dev).expect("create pure-ftpd's /dev");
        self.syslog = Some(SyslogSink::start(
            dev.join("log"),
            self.dir.join(PURE_FTPD_LOG),
        ));

        let bind = self.server_bind();
        self.exec(
            &self.server_ns(),
            &[
                "sh",
                "-c",
                PURE_FTPD_MOUNTS,
                "sh",
                &dev.to_string_lossy(),
                &installed("usr/sbin/pure-ftpd"),
                // Twice verbose: every command and every reply line.
                "-d",
                "-d",
                // No reverse DNS, no anonymous logins.
                "-H",
                "-E",
                "-l",
                &format!("puredb:{}", db.display()),
                "-S",
                &format!("{},{}", bind.ip(), bind.port()),
                "-p",
                &format!("{}:{}", PASV_PORTS.start(), PASV_PORTS.end()),
                "-g",
                &self.dir.join("pure-ftpd.pid").to_string_lossy(),
            ],
        )
    }

    /// Returns once everything pure-ftpd has logged is in [`PURE_FTPD_LOG`].
    fn flush_syslog(&self) {
        if let Some(syslog) = &self.syslog {
            syslog.flush();
        }
    }

    fn start_alg(&mut self) {
        let (mut child, log, earlier) = self.spawn_alg();
        let a = self.addrs();
        let port = match self.topology {
            Topology::Gateway(_) => 2121,
            Topology::Reverse(_) | Topology::Sidecar(_) => a.dial.port(),
        };
        let g = self.gateway_ns();
        let table_loaded = || {
            let logged_now = fs::read(&log).is_ok_and(|text| {
                let new = text.get(earlier as usize..).unwrap_or_default();
                String::from_utf8_lossy(new).contains("listening on")
            });
            logged_now
                && self
                    .exec(&g, &["nft", "list", "table", "inet", "ftp_alg"])
                    .output()
                    .is_ok_and(|o| o.status.success())
        };
        let ready = self.wait_ready(&mut child, &g, port, &log, table_loaded);
        self.alg = Some(child);
        if let Err(e) = ready {
            panic!("ftp-alg {e}");
        }
    }

    /// Writes the daemon's configuration and starts it in G without waiting for it: the
    /// process, its log, and the log's length before it started.
    fn spawn_alg(&mut self) -> (Child, PathBuf, u64) {
        let a = self.addrs();
        let proxy = match self.topology {
            Topology::Gateway(_) => "mode = \"gateway\"\n\
                 listen = [\"0.0.0.0:2121\", \"[::]:2121\"]\n\
                 intercept = [\"lan0\"]\n"
                .to_owned(),
            Topology::Reverse(_) | Topology::Sidecar(_) => format!(
                "mode = \"reverse\"\n\
                 listen = [\"{}\"]\n\
                 upstream = \"{}\"\n",
                a.dial,
                SocketAddr::new(a.server, a.server_port)
            ),
        };
        let conf = format!(
            "[proxy]\n{proxy}\n[pinholes]\nport_min = {}\nport_max = {}\ntimeout_secs = {}\n\
             [control]\nsocket = {:?}\n",
            PINHOLE_PORTS.start(),
            PINHOLE_PORTS.end(),
            PINHOLE_TIMEOUT_SECS,
            self.control_socket(),
        );
        let conf_path = self.dir.join("ftp-alg.toml");
        fs::write(&conf_path, merge_toml(&conf, &self.alg_config)).expect("write ftp-alg.toml");
        let log = self.dir.join("daemon.log");
        // A restarted daemon appends to the log of the one before it, and finds the table that
        // one left: only its own `listening on`, logged once it has replaced the table, says it
        // is ready.
        let earlier = fs::metadata(&log).map_or(0, |m| m.len());
        let conf_path = conf_path.to_string_lossy();
        let run = [ALG, "run", "--config", &conf_path];
        let mut command = match self.alg_prefix.split_first() {
            None => self.exec(&self.gateway_ns(), &run),
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args)
                    .args(["ip", "netns", "exec", &self.gateway_ns()])
                    .args(run);
                cmd
            }
        };
        let child = command
            .env("RUST_LOG", "ftp_alg=debug")
            .env("NO_COLOR", "1")
            .envs(self.alg_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(create(&log))
            .stderr(create(&log))
            .spawn()
            .expect("spawn ftp-alg");
        (child, log, earlier)
    }

    /// Sends `signal` (as kill(1) names it: `TERM`, `KILL`) to the daemon and waits up to
    /// `within` for it to exit. Its exit status, or `None` while it still runs (it is then
    /// left to `Drop`). Never panics: `Drop` uses it too.
    fn stop_alg(&mut self, signal: &str, within: Duration) -> Option<ExitStatus> {
        let alg = self.alg.as_mut()?;
        let _ = Command::new("kill")
            .args([format!("-{signal}"), alg.id().to_string()])
            .status();
        self.wait_alg(within)
    }

    /// The daemon's exit status once it has exited, or `None` if it still runs after `within`.
    fn wait_alg(&mut self, within: Duration) -> Option<ExitStatus> {
        let alg = self.alg.as_mut()?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = alg.try_wait().ok().flatten() {
                self.alg = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `child` listens on `port` in `ns` (or logs `listening on`) and `extra`
    /// holds; says why not if it exits or takes longer than 10 s.
    fn wait_ready(
        &self,
        child: &mut Child,
        ns: &str,
        port: u16,
        log: &Path,
        extra: impl Fn() -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Err(format!(
                    "exited at start-up ({status}):\n{}",
                    fs::read_to_string(log).unwrap_or_default()
                ));
            }
            let logged = fs::read_to_string(log).is_ok_and(|t| t.contains("listening on"));
            let sport = format!(":{port}");
            let listening = self
                .exec(ns, &["ss", "-Hltn", "sport", "=", &sport])
                .output()
                .is_ok_and(|o| !o.stdout.is_empty());
            if (logged || listening) && extra() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not ready after 10 s (listening: {listening}, extra check: {}):\n{}",
                    extra(),
                    fs::read_to_string(log).unwrap_or_default()
                ));
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// A command in the client namespace, without proxy variables or user configuration.
    fn client_command(&self, args: &[&str]) -> Command {
        let mut cmd = self.exec(&self.client_ns(), args);
        cmd.env("HOME", &self.dir);
        for var in [
            "ftp_proxy",
            "FTP_PROXY",
            "all_proxy",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    /// Runs one control session of `client` performing `ops` in `mode`.
    fn client_session(&mut self, client: Client, mode: DataMode, ops: &[Op]) -> Run {
        let dial = self.addrs().dial;
        let (user, password) = self.server.login();
        let host = match dial {
            SocketAddr::V4(v4) => v4.ip().to_string(),
            SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
        };
        let download = self.download_path().to_string_lossy().into_owned();
        let upload = self.upload_source_path().to_string_lossy().into_owned();
        let args: Vec<String> = match client {
            Client::Lftp => {
                let mut script = [
                    "set cmd:fail-exit yes",
                    "set net:timeout 3",
                    "set net:max-retries 1",
                    "set net:reconnect-interval-base 1",
                    "set net:reconnect-interval-max 1",
                    "set ftp:ssl-allow no",
                    "set ftp:use-site-utime no",
                    "set ftp:use-site-utime2 no",
                    "set ftp:fix-pasv-address no",
                    "set ftp:ignore-pasv-address no",
                    "set xfer:clobber on",
                ]
                .map(String::from)
                .to_vec();
                script.push(format!("set ftp:passive-mode {}", mode.passive()));
                script.push(format!("set ftp:prefer-epsv {}", mode == DataMode::Epsv));
                script.push(format!("open -u {user},{password} ftp://{host}"));
                for op in ops {
                    script.push(match op {
                        Op::List => "ls".to_owned(),
                        Op::Download => format!("get {DATA_FILE} -o {download}"),
                        Op::Upload => format!("put {upload} -o up/{UPLOAD_FILE}"),
                    });
                }
                script.push("bye".to_owned());
                let path = self.dir.join(format!("session-{}.lftp", self.runs));
                fs::write(&path, script.join("\n") + "\n").expect("write lftp script");
                vec![
                    "lftp".into(),
                    "-f".into(),
                    path.to_string_lossy().into_owned(),
                ]
            }
            Client::Curl => {
                let mut args: Vec<String> = [
                    "curl",
                    "-q",
                    "--silent",
                    "--show-error",
                    "--globoff",
                    "--noproxy",
                    "*",
                    "--max-time",
                    "15",
                    "--connect-timeout",
                    &CURL_CONNECT_TIMEOUT.as_secs().to_string(),
                    "--user",
                    &format!("{user}:{password}"),
                ]
                .map(String::from)
                .to_vec();
                args.extend(
                    match mode {
                        DataMode::Pasv => &["--disable-epsv", "--no-ftp-skip-pasv-ip"][..],
                        DataMode::Epsv => &["--ftp-pasv"],
                        DataMode::Port => &["--ftp-port", "-", "--disable-eprt"],
                        DataMode::Eprt => &["--ftp-port", "-"],
                    }
                    .iter()
                    .map(|s| s.to_string()),
                );
                let [op] = ops else {
                    panic!("curl performs one operation per session, not {ops:?}");
                };
                args.extend(match op {
                    Op::List => vec![format!("ftp://{host}/")],
                    Op::Download => {
                        vec![format!("ftp://{host}/{DATA_FILE}"), "-o".into(), download]
                    }
                    Op::Upload => {
                        vec![
                            "-T".into(),
                            upload,
                            format!("ftp://{host}/up/{UPLOAD_FILE}"),
                        ]
                    }
                });
                args
            }
            Client::Ftplib => {
                require_tool("python3");
                let script = self.dir.join("ftplib-client.py");
                fs::write(&script, ftplib_script(FTPLIB_CLIENT)).expect("write the ftplib client");
                let mode = match mode {
                    DataMode::Pasv => "pasv",
                    DataMode::Epsv => "epsv",
                    DataMode::Port => "port",
                    DataMode::Eprt => "eprt",
                };
                let mut args = vec![
                    "python3".to_owned(),
                    script.to_string_lossy().into_owned(),
                    dial.ip().to_string(),
                    dial.port().to_string(),
                    user.to_owned(),
                    password.to_owned(),
                    mode.to_owned(),
                ];
                for op in ops {
                    args.extend(match op {
                        Op::List => vec!["LIST".to_owned()],
                        Op::Download => vec!["RETR".into(), DATA_FILE.into(), download.clone()],
                        Op::Upload => {
                            vec!["STOR".into(), upload.clone(), format!("up/{UPLOAD_FILE}")]
                        }
                    });
                }
                args
            }
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd = self.client_command(&args);
        self.run_bounded(cmd, &args)
    }

    /// Runs a client to completion (killing it after [`CLIENT_LIMIT`]) and records a transcript.
    fn run_bounded(&mut self, mut cmd: Command, args: &[&str]) -> Run {
        self.runs += 1;
        let out_path = self.dir.join(format!("client-{}.stdout", self.runs));
        let err_path = self.dir.join(format!("client-{}.stderr", self.runs));
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(create(&out_path))
            .stderr(create(&err_path))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if started.elapsed() > CLIENT_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{args:?} still running after {CLIENT_LIMIT:?}");
            }
            sleep(Duration::from_millis(20));
        };
        let elapsed = started.elapsed();
        let stdout = fs::read_to_string(&out_path).unwrap_or_default();
        let stderr = fs::read_to_string(&err_path).unwrap_or_default();
        let script = args
            .iter()
            .find(|a| a.ends_with(".lftp"))
            .map(|p| fs::read_to_string(p).unwrap_or_default())
            .unwrap_or_default();
        let transcript = format!(
            "$ {}\n{script}exit: {status} after {elapsed:?}\n--- stdout\n{}\n--- stderr\n{stderr}",
            args.join(" "),
            stdout.chars().take(2000).collect::<String>()
        );
        fs::write(
            self.dir.join(format!("client-{}.txt", self.runs)),
            &transcript,
        )
        .expect("write transcript");
        Run {
            status,
            stdout,
            elapsed,
            transcript,
        }
    }

    /// The daemon's control socket, in the lab's directory: tests run in parallel.
    fn control_socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// `ftp-alg ARGS` in G, talking to this lab's daemon.
    fn alg_cli(&self, args: &[&str]) -> Command {
        let socket = self.control_socket();
        let mut cmd = self.exec(&self.gateway_ns(), &[ALG]);
        cmd.args(args).env("FTP_ALG_SOCKET", socket);
        cmd
    }

    /// The download arrived and the upload was stored, each byte for byte.
    fn assert_files_moved(&self) {
        assert_same_bytes(
            "download",
            &self.read(&self.download_path()),
            &self.read(&self.served_path()),
        );
        assert_same_bytes(
            "upload",
            &self.read(&self.stored_upload_path()),
            &self.read(&self.upload_source_path()),
        );
    }

    /// `ftp-alg pinholes list --json` in G.
    fn pinholes(&self) -> Vec<Pinhole> {
        let text = must(self.alg_cli(&["pinholes", "list", "--json"]));
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("pinholes list --json printed {text:?}: {e}"))
    }

    /// Waits until the kernel holds none of the daemon's pinholes, failing after
    /// [`PINHOLES_GONE_WITHIN`].
    fn assert_no_pinholes_left(&self) {
        let mut left = Vec::new();
        let gone = wait_for(PINHOLES_GONE_WITHIN, || {
            left = self.pinholes();
            left.is_empty().then_some(())
        });
        assert!(
            gone.is_some(),
            "pinholes still open {PINHOLES_GONE_WITHIN:?} after the session ended: {left:#?}"
        );
    }

    fn dump_diagnostics(&self) {
        eprintln!(
            "==== {} failed; files kept in {}",
            self.prefix,
            self.dir.display()
        );
        if self.namespaces.contains(&self.gateway_ns()) {
            let ruleset = self
                .exec(&self.gateway_ns(), &["nft", "list", "ruleset"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            eprintln!("==== nft list ruleset in G\n{ruleset}");
        }
        self.flush_syslog();
        let mut files: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map(|rd| rd.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default();
        files.sort();
        for path in files {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            // The daemon's and the server's logs and output, and the clients' transcripts.
            let shown = name.ends_with(".log")
                || name.ends_with(".out")
                || name == "raw-client.stderr"
                || (name.starts_with("client-") && name.ends_with(".txt"));
            if shown {
                let text =
                    String::from_utf8_lossy(&fs::read(&path).unwrap_or_default()).into_owned();
                eprintln!("==== {name}\n{text}");
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if failed {
            self.dump_diagnostics();
        }
        if self.stop_alg("TERM", Duration::from_secs(5)).is_none() {
            if let Some(mut alg) = self.alg.take() {
                let _ = alg.kill();
                let _ = alg.wait();
            }
        }
        if let Some(mut server) = self.server_process.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        for ns in self.namespaces.drain(..).rev() {
            // The server's session processes and anything else the test left inside.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill")
                        .args(["-KILL", pid])
                        .stderr(Stdio::null())
                        .status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        if !failed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Fails the test (once per binary, with a clear message) unless it runs as root with every
/// tool it needs.
fn preflight() {
    static RESULT: OnceLock<Result<(), String>> = OnceLock::new();
    let result = RESULT.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or("?")
            .to_owned();
        if uid != "0" {
            return Err(format!(
                "the end-to-end tests need root (network namespaces, nftables, vsftpd); uid is {uid}"
            ));
        }
        let missing: Vec<&str> = [
            "ip", "nft", "vsftpd", "lftp", "curl", "ss", "sysctl", "kill",
        ]
        .into_iter()
        .filter(|t| find_tool(t).is_none())
        .collect();
        if !missing.is_empty() {
            return Err(format!(
                "the end-to-end tests need these tools, not found in PATH: {missing:?} \
                 (Debian: iproute2 nftables vsftpd lftp curl procps)"
            ));
        }
        let ftp_user = Command::new("getent")
            .args(["passwd", "ftp"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ftp_user {
            return Err("vsftpd's anonymous user `ftp` does not exist (the Debian vsftpd \
                        package creates it)"
                .into());
        }
        Ok(())
    });
    if let Err(message) = result {
        panic!("{message}");
    }
}

/// A program that `scripts/install-ftp-servers` unpacks into [`SERVERS_PREFIX`].
fn installed(program: &str) -> String {
    let path = Path::new(SERVERS_PREFIX).join(program);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/install-ftp-servers (scripts/test does), which unpacks \
         proftpd and pure-ftpd into {SERVERS_PREFIX}",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

fn require_tool(tool: &str) {
    assert!(
        find_tool(tool).is_some(),
        "this test needs {tool}, not found in PATH"
    );
}

fn find_tool(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Runs `cmd` and returns its stdout; panics with its stderr unless it succeeds.
/// Calls `check` until it yields a value, every 50 ms, for at most `within`: tests wait for
/// the state they need, with a bound, instead of sleeping and sampling it once. `None` if it
/// never came.
fn wait_for<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(Duration::from_millis(50));
    }
}

fn must(mut cmd: Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn create(path: &Path) -> File {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()))
}

/// xorshift64* bytes: reproducible, incompressible, and different for every test.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: {} bytes received, {} sent; first difference at {first:?}",
            got.len(),
            want.len()
        );
    }
}

/// `overrides` laid over `base`, both TOML: a table is merged key by key, any other value
/// replaces the one in `base`. TOML itself refuses a key or a section given twice, so a test's
/// `[pinholes] timeout_secs` could not simply follow the harness's.
fn merge_toml(base: &str, overrides: &str) -> String {
    fn merge(into: &mut toml::Table, from: toml::Table) {
        for (key, value) in from {
            match (into.get_mut(&key), value) {
                (Some(toml::Value::Table(inner)), toml::Value::Table(value)) => merge(inner, value),
                (_, value) => {
                    into.insert(key, value);
                }
            }
        }
    }
    let parse = |text: &str| -> toml::Table {
        text.parse()
            .unwrap_or_else(|e| panic!("the daemon's configuration {text:?}: {e}"))
    };
    let mut merged = parse(base);
    merge(&mut merged, parse(overrides));
    merged.to_string()
}

/// The text between the first `open` and the following `close`.
fn between(s: &str, open: char, close: char) -> &str {
    s.split_once(open)
        .and_then(|(_, rest)| rest.split_once(close))
        .map(|(inner, _)| inner)
        .unwrap_or_else(|| panic!("no {open}...{close} in {s:?}"))
}

/// `h1,h2,h3,h4,p1,p2` as in PORT and 227.
fn parse_host_port(s: &str) -> SocketAddr {
    let n: Vec<u8> = s
        .trim()
        .split(',')
        .map(|x| x.trim().parse().unwrap_or_else(|e| panic!("{s:?}: {e}")))
        .collect();
    let [h1, h2, h3, h4, p1, p2] = n[..] else {
        panic!("not h1,h2,h3,h4,p1,p2: {s:?}");
    };
    SocketAddr::new(
        IpAddr::from([h1, h2, h3, h4]),
        u16::from(p1) << 8 | u16::from(p2),
    )
}

pub mod edge;
pub mod faults;
pub mod ftps;
pub mod guides;
pub mod ha;
pub mod handover;
pub mod hostile;
pub mod operate;
pub mod ports;
pub mod service;
pub mod sniff;
