//! End-to-end harness shared by `e2e_gateway` and `e2e_reverse`: network namespaces, a real
//! vsftpd, real lftp and curl, the shipped nftables policy and the real `ftp-alg` binary.
//!
//! Every test builds its own namespaces (named `fa<pid>x<n>` plus one letter per host), so tests
//! run in parallel. [`Lab`]'s `Drop` stops every process the test started and deletes its
//! namespaces, also when the test panics; a failed test prints the daemon's log, vsftpd's log,
//! the client transcripts and the gateway's ruleset, and keeps its temporary directory.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

const ALG: &str = env!("CARGO_BIN_EXE_ftp-alg");
const POLICY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/rules/gateway-policy.nft");
/// The one line of the shipped policy that lets ftp-alg's pinholes through.
const MARK_RULE: &str = "ct mark 0x0000f7a0 accept";

const C4: &str = "198.18.0.2";
const G_LAN4: &str = "198.18.0.1";
const G_WAN4: &str = "203.0.113.1";
const S4: &str = "203.0.113.2";
const C6: &str = "2001:db8:a::2";
const G_LAN6: &str = "2001:db8:a::1";
const G_WAN6: &str = "2001:db8:b::1";
const S6: &str = "2001:db8:b::2";
/// Where vsftpd listens in the sidecar topology, next to the ALG on G.
const SIDECAR_PORT: u16 = 2100;

const DATA_FILE: &str = "data.bin";
const UPLOAD_FILE: &str = "upload.bin";
const DATA_LEN: usize = 1 << 20;
/// Not a multiple of any buffer size, so a short upload shows.
const UPLOAD_LEN: usize = (1 << 20) + 4099;
/// vsftpd's passive ports (`pasv_min_port`/`pasv_max_port`).
const PASV_PORTS: RangeInclusive<u16> = 40000..=40100;
/// The ALG's data ports (`pinholes.port_min`/`port_max`).
const PINHOLE_PORTS: RangeInclusive<u16> = 61000..=61999;
const PINHOLE_TIMEOUT_SECS: u64 = 30;
/// The port the test's raw client names in its PORT command (195 * 256 + 81).
const RAW_CLIENT_PORT: u16 = 50001;

/// The harness kills a client that runs longer; the clients' own timeouts are much shorter.
const CLIENT_LIMIT: Duration = Duration::from_secs(40);
/// A client whose data connection is blocked must give up within this.
const BLOCKED_LIMIT: Duration = Duration::from_secs(20);
/// How long the pinhole list may take to empty after a session ends.
const PINHOLES_GONE_WITHIN: Duration = Duration::from_secs(2);

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Address family of the FTP traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Where the ALG sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// C — G — S: the client dials the server, G redirects tcp/21 from lan0 to the ALG.
    Gateway(Family),
    /// C — G — S: the client dials G (198.18.0.1), the ALG's upstream is S (203.0.113.2:21).
    /// S has no route to C: every data connection must be translated on G.
    Reverse,
    /// C — G: vsftpd runs on G itself (198.18.0.1:2100) behind the ALG on 198.18.0.1:21.
    Sidecar,
}

/// The real FTP client used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    Lftp,
    Curl,
}

/// How the data connection is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataMode {
    /// PASV; the client dials the address announced in the 227 reply.
    Pasv,
    /// PASV; the client ignores the 227 address and dials its control peer (curl's default).
    PasvSkipIp,
    /// EPSV.
    Epsv,
    /// PORT (active).
    Port,
    /// EPRT (active).
    Eprt,
}

impl DataMode {
    /// The command vsftpd must receive for this mode.
    fn verb(self) -> &'static str {
        match self {
            DataMode::Pasv | DataMode::PasvSkipIp => "PASV",
            DataMode::Epsv => "EPSV",
            DataMode::Port => "PORT",
            DataMode::Eprt => "EPRT",
        }
    }

    fn passive(self) -> bool {
        matches!(self, DataMode::Pasv | DataMode::PasvSkipIp | DataMode::Epsv)
    }
}

/// What G runs and lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    /// The shipped policy and the daemon.
    Alg,
    /// The daemon, but the policy lacks the `ct mark` line on the data connections' path.
    AlgWithoutMarkRule,
    /// No daemon; the policy forwards tcp/21 so the control connection works without it.
    AlgStopped,
}

/// One data operation of a client session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    List,
    Download,
    Upload,
}

/// One end-to-end case: a topology, a client and a data connection mode.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    pub topology: Topology,
    pub client: Client,
    pub mode: DataMode,
}

/// Generates one module per scenario with one `#[test]` per listed check (a method of
/// [`Scenario`]), so every case runs as its own test and in parallel with the others.
macro_rules! scenarios {
    (checks: $checks:tt; $($name:ident: $topology:expr, $client:expr, $mode:expr;)+) => {
        $($crate::common::scenarios!(@one $name, $topology, $client, $mode, $checks);)+
    };
    (@one $name:ident, $topology:expr, $client:expr, $mode:expr, [$($check:ident),+]) => {
        mod $name {
            use super::*;
            $(
                #[test]
                fn $check() {
                    $crate::common::Scenario {
                        topology: $topology,
                        client: $client,
                        mode: $mode,
                    }
                    .$check()
                }
            )+
        }
    };
}
pub(crate) use scenarios;

impl Scenario {
    /// A listing, a download and an upload through the ALG, each checked byte for byte; the
    /// server must have received this scenario's data command and no other, and no pinhole may
    /// outlive a session.
    pub fn round_trip(self) {
        let mut lab = Lab::new(self.topology, Setup::Alg);
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
        assert_same_bytes(
            "download",
            &lab.read(&lab.download_path()),
            &lab.read(&lab.served_path()),
        );
        assert_same_bytes(
            "upload",
            &lab.read(&lab.stored_upload_path()),
            &lab.read(&lab.upload_source_path()),
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

    /// The same download with the daemon running but the policy's `ct mark` accept line
    /// removed from the data connections' path: the control connection works, the data
    /// connection does not.
    pub fn blocked_without_mark_rule(self) {
        self.blocked(Setup::AlgWithoutMarkRule);
    }

    /// Gateway only: no daemon, tcp/21 forwarded by the policy so that the client talks to the
    /// server directly: the control connection works, the data connection does not.
    pub fn blocked_when_alg_stopped(self) {
        assert!(
            matches!(self.topology, Topology::Gateway(_)),
            "{self:?}: without the ALG only a gateway has a control path"
        );
        self.blocked(Setup::AlgStopped);
    }

    fn blocked(self, setup: Setup) {
        let mut lab = Lab::new(self.topology, setup);
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
            !log.text.contains("OK DOWNLOAD"),
            "{self:?} {setup:?}: the server completed a download"
        );
        if setup == Setup::AlgStopped {
            log.assert_control_from(lab.addrs().client);
        } else {
            log.assert_control_from(lab.addrs().server_sees);
            lab.assert_no_pinholes_left();
        }
    }
}

impl Client {
    /// The control sessions that perform `ops`: lftp does all in one, curl one per URL.
    fn sessions(self, ops: &[Op]) -> Vec<&[Op]> {
        match self {
            Client::Lftp => vec![ops],
            Client::Curl => ops.chunks(1).collect(),
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
    /// vsftpd's control port.
    server_port: u16,
    /// The source of the control connection as the server sees it: the ALG's side towards it.
    server_sees: IpAddr,
    /// The address the client believes it talks to.
    client_sees: IpAddr,
    /// Whether the ALG replaces the server's 227 port with one of its own.
    rewrites_pasv: bool,
}

impl Topology {
    fn addrs(self) -> Addrs {
        let ip = |s: &str| -> IpAddr { s.parse().expect("a literal address") };
        match self {
            Topology::Gateway(Family::V4) => Addrs {
                client: ip(C4),
                dial: SocketAddr::new(ip(S4), 21),
                server: ip(S4),
                server_port: 21,
                server_sees: ip(G_WAN4),
                client_sees: ip(S4),
                rewrites_pasv: false,
            },
            Topology::Gateway(Family::V6) => Addrs {
                client: ip(C6),
                dial: SocketAddr::new(ip(S6), 21),
                server: ip(S6),
                server_port: 21,
                server_sees: ip(G_WAN6),
                client_sees: ip(S6),
                rewrites_pasv: false,
            },
            Topology::Reverse => Addrs {
                client: ip(C4),
                dial: SocketAddr::new(ip(G_LAN4), 21),
                server: ip(S4),
                server_port: 21,
                server_sees: ip(G_WAN4),
                client_sees: ip(G_LAN4),
                rewrites_pasv: true,
            },
            Topology::Sidecar => Addrs {
                client: ip(C4),
                dial: SocketAddr::new(ip(G_LAN4), 21),
                server: ip(G_LAN4),
                server_port: SIDECAR_PORT,
                server_sees: ip(G_LAN4),
                client_sees: ip(G_LAN4),
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
        topology != Topology::Gateway(Family::V6),
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

/// A pinhole as `ftp-alg pinholes list --json` reports it; written out here rather than
/// taken from the library, so that a change of the JSON interface fails these tests.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Pinhole {
    state: String,
    session: u64,
    client: IpAddr,
    server: IpAddr,
    source: IpAddr,
    dial: SocketAddr,
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

/// vsftpd's protocol log (`log_ftp_protocol=YES`).
struct ServerLog {
    text: String,
}

impl ServerLog {
    fn read(lab: &Lab) -> ServerLog {
        ServerLog {
            text: fs::read_to_string(lab.dir.join("vsftpd.log")).unwrap_or_default(),
        }
    }

    /// `(kind, client, text)` for each command and response line, in order.
    fn events(&self) -> Vec<(&str, &str, &str)> {
        self.text
            .lines()
            .filter_map(|line| {
                let (kind, rest) = ["FTP command", "FTP response"]
                    .into_iter()
                    .find_map(|k| Some((k, line.split_once(&format!("{k}: Client \""))?.1)))?;
                let (client, quoted) = rest.split_once("\", \"")?;
                Some((kind, client, quoted.strip_suffix('"')?))
            })
            .collect()
    }

    fn commands(&self) -> Vec<&str> {
        self.events()
            .into_iter()
            .filter(|(kind, _, _)| *kind == "FTP command")
            .map(|(_, _, text)| text)
            .collect()
    }

    fn responses(&self) -> Vec<&str> {
        self.events()
            .into_iter()
            .filter(|(kind, _, _)| *kind == "FTP response")
            .map(|(_, _, text)| text)
            .collect()
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
        let events = self.events();
        events.windows(2).any(|w| {
            w[0].0 == "FTP command"
                && w[0].2.split(' ').next() == Some(verb)
                && w[1].0 == "FTP response"
                && w[1].2.starts_with('2')
        })
    }

    /// Asserts that every control connection reached the server from `peer`: from the ALG
    /// when it runs, from the client itself when it does not.
    fn assert_control_from(&self, peer: IpAddr) {
        let peers: BTreeSet<IpAddr> = self
            .events()
            .into_iter()
            .map(|(_, client, _)| {
                client
                    .parse()
                    .unwrap_or_else(|e| panic!("vsftpd logged client {client:?}: {e}"))
            })
            .collect();
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
    prefix: String,
    dir: PathBuf,
    namespaces: Vec<String>,
    vsftpd: Option<Child>,
    alg: Option<Child>,
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
    fn new(topology: Topology, setup: Setup) -> Lab {
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
        let mut lab = Lab {
            topology,
            prefix,
            dir,
            namespaces: Vec::new(),
            vsftpd: None,
            alg: None,
            runs: 0,
        };
        lab.build_network();
        lab.write_files();
        lab.load_policy(setup);
        lab.start_vsftpd();
        if setup != Setup::AlgStopped {
            lab.start_alg();
        }
        lab
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

    /// The namespace vsftpd runs in: G itself for a sidecar.
    fn server_ns(&self) -> String {
        match self.topology {
            Topology::Sidecar => self.gateway_ns(),
            Topology::Gateway(_) | Topology::Reverse => format!("{}s", self.prefix),
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
        if self.topology == Topology::Sidecar {
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
            fs::create_dir_all(d).expect("create vsftpd directories");
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

    /// Deletes the shipped `ct mark` accept rule from `chain`.
    fn delete_mark_rule(&self, chain: &str) {
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
        self.nft(&[
            "delete", "rule", "inet", "gateway", chain, "handle", &handle,
        ]);
    }

    /// The shipped default-deny policy, plus what the topology needs, minus what `setup` takes
    /// away. Reverse and sidecar accept their control connection on tcp/21 (it is addressed to
    /// G). A sidecar's active data connection starts on G itself, so its policy also makes the
    /// output chain default-deny with the same `ct mark` line; without that the negative
    /// control of a sidecar's PORT would pass through the shipped policy's open output chain.
    /// Local traffic is accepted by destination (`fib daddr type local`), not by `oif lo`:
    /// the output hook still reports `lo` for a connection to G's own address that the
    /// pinhole's DNAT has just sent out of lan0.
    fn load_policy(&self, setup: Setup) {
        self.nft(&["-f", POLICY]);
        if matches!(self.topology, Topology::Reverse | Topology::Sidecar) {
            self.nft(&[
                "add", "rule", "inet", "gateway", "input", "tcp", "dport", "21", "accept",
            ]);
        }
        if self.topology == Topology::Sidecar {
            for rule in [
                "ct state established,related accept",
                "fib daddr type local accept",
                MARK_RULE,
            ] {
                self.nft(&["add rule inet gateway output", rule]);
            }
            self.nft(&["chain inet gateway output { policy drop; }"]);
        }
        match setup {
            Setup::Alg => {}
            Setup::AlgWithoutMarkRule => match self.topology {
                Topology::Gateway(_) | Topology::Reverse => self.delete_mark_rule("forward"),
                Topology::Sidecar => {
                    self.delete_mark_rule("input");
                    self.delete_mark_rule("output");
                }
            },
            Setup::AlgStopped => {
                self.nft(&[
                    "add", "rule", "inet", "gateway", "forward", "tcp", "dport", "21", "accept",
                ]);
            }
        }
    }

    fn start_vsftpd(&mut self) {
        let a = self.addrs();
        let listen = match self.topology {
            Topology::Gateway(Family::V6) => "listen=NO\nlisten_ipv6=YES\n".to_owned(),
            Topology::Gateway(Family::V4) | Topology::Reverse => "listen=YES\n".to_owned(),
            Topology::Sidecar => {
                format!("listen=YES\nlisten_address={G_LAN4}\nlisten_port={SIDECAR_PORT}\n")
            }
        };
        let conf = format!(
            "{listen}background=NO\n\
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
             vsftpd_log_file={log}\n",
            root = self.ftp_root().display(),
            empty = self.dir.join("empty").display(),
            pasv_min = PASV_PORTS.start(),
            pasv_max = PASV_PORTS.end(),
            log = self.dir.join("vsftpd.log").display(),
        );
        let conf_path = self.dir.join("vsftpd.conf");
        fs::write(&conf_path, conf).expect("write vsftpd.conf");
        let out = self.dir.join("vsftpd.out");
        let mut child = self
            .exec(&self.server_ns(), &["vsftpd", &conf_path.to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(create(&out))
            .stderr(create(&out))
            .spawn()
            .expect("spawn vsftpd");
        let ready = self.wait_ready(&mut child, &self.server_ns(), a.server_port, &out, || true);
        self.vsftpd = Some(child);
        if let Err(e) = ready {
            panic!("vsftpd {e}");
        }
    }

    fn start_alg(&mut self) {
        let a = self.addrs();
        let proxy = match self.topology {
            Topology::Gateway(_) => "mode = \"gateway\"\n\
                 listen = [\"0.0.0.0:2121\", \"[::]:2121\"]\n\
                 intercept = [\"lan0\"]\n"
                .to_owned(),
            Topology::Reverse | Topology::Sidecar => format!(
                "mode = \"reverse\"\n\
                 listen = [\"{}\"]\n\
                 upstream = \"{}\"\n",
                a.dial,
                SocketAddr::new(a.server, a.server_port)
            ),
        };
        let conf = format!(
            "[proxy]\n{proxy}\n[pinholes]\nport_min = {}\nport_max = {}\ntimeout_secs = {}\n",
            PINHOLE_PORTS.start(),
            PINHOLE_PORTS.end(),
            PINHOLE_TIMEOUT_SECS
        );
        let conf_path = self.dir.join("ftp-alg.toml");
        fs::write(&conf_path, conf).expect("write ftp-alg.toml");
        let log = self.dir.join("daemon.log");
        let mut child = self
            .exec(
                &self.gateway_ns(),
                &[ALG, "run", "--config", &conf_path.to_string_lossy()],
            )
            .env("RUST_LOG", "ftp_alg=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(create(&log))
            .stderr(create(&log))
            .spawn()
            .expect("spawn ftp-alg");
        let port = match self.topology {
            Topology::Gateway(_) => 2121,
            Topology::Reverse | Topology::Sidecar => a.dial.port(),
        };
        let g = self.gateway_ns();
        let table_loaded = || {
            self.exec(&g, &["nft", "list", "table", "inet", "ftp_alg"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let ready = self.wait_ready(&mut child, &g, port, &log, table_loaded);
        self.alg = Some(child);
        if let Err(e) = ready {
            panic!("ftp-alg {e}");
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
                    "set xfer:clobber on",
                ]
                .map(String::from)
                .to_vec();
                script.push(format!("set ftp:passive-mode {}", mode.passive()));
                script.push(format!("set ftp:prefer-epsv {}", mode == DataMode::Epsv));
                script.push(format!(
                    "set ftp:ignore-pasv-address {}",
                    mode == DataMode::PasvSkipIp
                ));
                script.push(format!("open -u anonymous,e2e ftp://{host}"));
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
                    "10",
                    "--connect-timeout",
                    "3",
                ]
                .map(String::from)
                .to_vec();
                args.extend(
                    match mode {
                        DataMode::Pasv => &["--disable-epsv", "--no-ftp-skip-pasv-ip"][..],
                        DataMode::PasvSkipIp => &["--disable-epsv", "--ftp-skip-pasv-ip"],
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

    /// `ftp-alg pinholes list --json` in G.
    fn pinholes(&self) -> Vec<Pinhole> {
        let text = must(self.exec(&self.gateway_ns(), &[ALG, "pinholes", "list", "--json"]));
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("pinholes list --json printed {text:?}: {e}"))
    }

    fn assert_no_pinholes_left(&self) {
        let deadline = Instant::now() + PINHOLES_GONE_WITHIN;
        loop {
            let left = self.pinholes();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pinholes still open {PINHOLES_GONE_WITHIN:?} after the session ended: {left:#?}"
            );
            sleep(Duration::from_millis(100));
        }
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
        let mut files: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map(|rd| rd.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default();
        files.sort();
        for path in files {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let shown = [
                "daemon.log",
                "vsftpd.log",
                "vsftpd.out",
                "raw-client.stderr",
            ]
            .contains(&name.as_ref())
                || (name.starts_with("client-") && name.ends_with(".txt"));
            if shown {
                let text = fs::read_to_string(&path).unwrap_or_default();
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
        if let Some(mut alg) = self.alg.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &alg.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while alg.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                sleep(Duration::from_millis(20));
            }
            let _ = alg.kill();
            let _ = alg.wait();
        }
        if let Some(mut vsftpd) = self.vsftpd.take() {
            let _ = vsftpd.kill();
            let _ = vsftpd.wait();
        }
        for ns in self.namespaces.drain(..).rev() {
            // vsftpd's session processes and anything else the test left inside.
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
