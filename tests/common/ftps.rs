//! FTPS end to end (docs/ftps.md): ftp-alg ends the client's TLS in reverse and sidecar mode,
//! in front of a vsftpd that knows no TLS, with a certificate from a CA the test makes with the
//! `openssl` command-line tool. Real clients: lftp (`ftp:ssl-force`, certificate verified),
//! curl (`--ssl-reqd --cacert`; passive only: curl 7.88 cannot do active FTPS, see
//! TESTING-NOTES) and Python's `ftplib.FTP_TLS` with `prot_p()`.
//!
//! ftplib does not resume the control connection's TLS session on its data connections by
//! itself; [`FTPS_CLIENT`] passes `session=self.sock.session` in `ntransfercmd`, the usual
//! nudge, and its `fresh` mode leaves it out: that is the negative control for the resumption
//! requirement.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::faults::daemon_log_lines;
use super::{
    assert_same_bytes, ftplib_script, must, require_tool, DataMode, Family, Lab, Run, Server,
    ServerLog, Setup, Topology, DATA_FILE, DATA_LEN, G_LAN4, G_LAN6, S4, S6, UPLOAD_FILE,
    UPLOAD_LEN,
};

/// The implicit FTPS listener's port.
const IMPLICIT_PORT: u16 = 990;
/// An address of the client's namespace that no session uses: the intruder's.
const INTRUDER4: &str = "198.18.0.3";
/// Where the daemon serves its metrics, inside G.
const METRICS: &str = "127.0.0.1:9477";
/// curl's options in every FTPS test: quiet but for errors, bounded, logged in as anonymous.
const CURL: [&str; 11] = [
    "curl",
    "-q",
    // An IPv6 address in brackets is not a glob.
    "--globoff",
    "--silent",
    "--show-error",
    "--noproxy",
    "*",
    "--max-time",
    "15",
    "--user",
    "anonymous:e2e",
];
/// The comment of the counted rule that drops connections to the pinhole ports that no
/// pinhole let through.
const UNMARKED: &str = "e2e unmarked data";

/// A client that speaks FTPS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsClient {
    Lftp,
    Curl,
    Ftplib,
}

/// Python's FTP_TLS with `prot_p()`. `reuse`: the data connections resume the control
/// connection's TLS session (`session=self.sock.session`); `fresh`: ftplib's own behaviour, a
/// full handshake per data connection. `intrude`: before the first operation, a connection to
/// the announced passive port from [`INTRUDER4`], reported as `intruder: ...`.
pub(super) const FTPS_CLIENT: &str = r#"
"""usage: HOST PORT USER PASSWORD MODE REUSE CAFILE (LIST | RETR REMOTE LOCAL | STOR LOCAL REMOTE | INTRUDE ADDR | SLEEP SECS)..."""
import ftplib, socket, ssl, sys, time

host, port, user, password, mode, reuse, cafile, *ops = sys.argv[1:]
context = ssl.create_default_context(cafile=cafile)

class Client(ftplib.FTP_TLS):
    def ntransfercmd(self, cmd, rest=None):
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:
            session = self.sock.session if reuse == "reuse" else None
            conn = self.context.wrap_socket(conn, server_hostname=self.host, session=session)
        return conn, size

    def makepasv(self):
        if mode == "epsv":
            return ftplib.parse229(self.sendcmd("EPSV"), self.sock.getpeername())
        return super().makepasv()

ftp = Client(context=context, timeout=5)
ftp.connect(host, int(port))
ftp.auth()
ftp.login(user, password)
ftp.prot_p()
ftp.set_pasv(mode in ("pasv", "epsv"))
def extra(op, args):
    if op == "SLEEP":
        time.sleep(float(next(args)))
    elif op == "INTRUDE":
        source = next(args)
        _, data_port = ftp.makepasv()
        try:
            socket.create_connection((host, data_port), timeout=3, source_address=(source, 0))
            print("intruder: connected")
        except OSError as e:
            print("intruder: " + type(e).__name__)
    else:
        return False
    return True

run_ops(ftp, ops, extra)
ftp.quit()
"#;

/// The test CA and the certificate ftp-alg presents (for G's client-side addresses), and with
/// [`Pki::issue`] more certificates from the same CA (vsftpd's, for S4).
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    chain: PathBuf,
    key: PathBuf,
}

/// The elliptic-curve key options of every `openssl req` here.
const EC: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

fn openssl(args: &[&str]) {
    let mut cmd = Command::new("openssl");
    cmd.args(args);
    must(cmd);
}

impl Pki {
    /// A CA in the lab's directory `pki`, and ftp-alg's certificate for `sans` (IP addresses).
    fn make(lab: &Lab, sans: &[&str]) -> Pki {
        Pki::make_in(&lab.dir.join("pki"), sans)
    }

    fn make_in(dir: &Path, sans: &[&str]) -> Pki {
        require_tool("openssl");
        fs::create_dir_all(dir).expect("create the pki directory");
        let ca = dir.join("ca.pem");
        let ca_key = dir.join("ca.key");
        // Named after its directory: another CA of the same name would be taken for this one's
        // issuer and fail on its signature, not for being unknown.
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let subject = format!("/CN=ftp-alg e2e CA {name}");
        openssl(
            &[
                &["req", "-x509"][..],
                &EC,
                &["-keyout", &ca_key.to_string_lossy()],
                &["-out", &ca.to_string_lossy()],
                &["-days", "2", "-subj", &subject],
            ]
            .concat(),
        );
        let mut pki = Pki {
            dir: dir.to_owned(),
            ca,
            chain: PathBuf::new(),
            key: PathBuf::new(),
        };
        (pki.chain, pki.key) = pki.issue("server", sans);
        pki
    }

    /// A certificate from this CA named `name`, for the IP addresses `sans`: its chain as a
    /// server sends it (its own certificate, then the CA's) and its key.
    fn issue(&self, name: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        let file = |suffix: &str| self.dir.join(format!("{name}.{suffix}"));
        let path = |suffix: &str| file(suffix).to_string_lossy().into_owned();
        openssl(
            &[
                &["req"][..],
                &EC,
                &["-keyout", &path("key"), "-out", &path("csr")],
                &["-subj", "/CN=ftp-alg e2e"],
            ]
            .concat(),
        );
        let sans: Vec<String> = sans.iter().map(|a| format!("IP:{a}")).collect();
        fs::write(
            file("ext"),
            format!(
                "subjectAltName={}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
                sans.join(",")
            ),
        )
        .expect("write the extensions");
        let ca = self.ca.to_string_lossy();
        let ca_key = self.dir.join("ca.key").to_string_lossy().into_owned();
        openssl(&[
            "x509",
            "-req",
            "-in",
            &path("csr"),
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &path("ext"),
            "-out",
            &path("pem"),
        ]);
        let chain = [
            fs::read(file("pem")).expect("the certificate"),
            fs::read(&self.ca).expect("ca.pem"),
        ]
        .concat();
        fs::write(file("chain"), chain).expect("write the chain");
        (file("chain"), file("key"))
    }

    /// The daemon's `[tls]` section.
    fn section(&self) -> String {
        format!(
            "[tls]\ncertificate = {:?}\nkey = {:?}\n",
            self.chain.display().to_string(),
            self.key.display().to_string()
        )
    }
}

/// A lab in `topology` (reverse or sidecar) with vsftpd, which has no TLS, behind a daemon
/// configured with `config` (given the test's PKI). The pinholes' `ct mark` line in G's input
/// chain is counted, since a `PROT P` data connection ends at the relay on G; connections to
/// the pinhole ports that it does not accept are dropped by a counted rule ([`UNMARKED`]).
fn lab(topology: Topology, config: impl FnOnce(&Pki) -> String) -> (Lab, Pki) {
    lab_with_server(topology, |_| String::new(), config)
}

/// [`lab`] with `vsftpd_options` (given the test's PKI) at the end of vsftpd.conf.
fn lab_with_server(
    topology: Topology,
    vsftpd_options: impl FnOnce(&Pki) -> String,
    config: impl FnOnce(&Pki) -> String,
) -> (Lab, Pki) {
    let mut made = None;
    let mut lab = Lab::prepared(topology, Server::Vsftpd, Setup::AlgStopped, |lab| {
        let pki = Pki::make(lab, &[G_LAN4, G_LAN6]);
        let options = vsftpd_options(&pki);
        made = Some(pki);
        options
    });
    let pki = made.expect("the PKI is made before the server starts");
    lab.alg_config = format!("[metrics]\nlisten = \"{METRICS}\"\n{}", config(&pki));
    lab.count_mark_rule("input", "accept");
    let unmarked = format!(
        "tcp dport {}-{} counter drop comment \"{UNMARKED}\"",
        super::PINHOLE_PORTS.start(),
        super::PINHOLE_PORTS.end()
    );
    lab.nft(&["add rule inet gateway input", &unmarked]);
    let implicit = format!("tcp dport {IMPLICIT_PORT} accept");
    lab.nft(&["add rule inet gateway input", &implicit]);
    if let Topology::Sidecar(_) = topology {
        // An active PROT P data connection to the client starts at the relay on G, unmarked:
        // a default-deny output chain must let the daemon's own connections out.
        lab.nft(&["insert rule inet gateway output meta skuid 0 tcp sport >= 1024 accept"]);
    }
    lab.start_alg();
    (lab, pki)
}

/// The packets counted by the rule with `comment` in G's table `inet gateway`.
fn counted(lab: &Lab, comment: &str) -> u64 {
    counted_in(lab, "gateway", |rule| rule["comment"] == comment)
}

/// The packets counted by the rules of G's table `inet TABLE` that `pick` chooses (from
/// `nft -j`).
fn counted_in(lab: &Lab, table: &str, pick: impl Fn(&serde_json::Value) -> bool) -> u64 {
    let text = must(lab.exec(
        &lab.gateway_ns(),
        &["nft", "-j", "list", "table", "inet", table],
    ));
    let json: serde_json::Value = serde_json::from_str(&text).expect("nft -j output");
    json["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("rule"))
        .filter(|rule| pick(rule))
        .flat_map(|r| r["expr"].as_array().into_iter().flatten())
        .filter_map(|e| e.get("counter"))
        .map(|c| c["packets"].as_u64().unwrap_or(0))
        .sum()
}

/// One sample of the daemon's metrics, `name{labels}`, read over HTTP inside G.
fn metric(lab: &Lab, sample: &str) -> u64 {
    let text = must(lab.exec(
        &lab.gateway_ns(),
        &[
            "curl",
            "-s",
            "--noproxy",
            "*",
            &format!("http://{METRICS}/metrics"),
        ],
    ));
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
}

impl Lab {
    /// One FTPS session of `client` performing a listing, a download and an upload (curl: one
    /// session each); with `implicit`, lftp and curl dial the implicit FTPS listener
    /// ([`IMPLICIT_PORT`], `ftps://`) instead of sending AUTH TLS.
    fn ftps_session(
        &mut self,
        client: TlsClient,
        mode: DataMode,
        ca: &Path,
        implicit: bool,
    ) -> Vec<Run> {
        let dial = self.addrs().dial;
        let ip = match dial {
            SocketAddr::V4(v4) => v4.ip().to_string(),
            SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
        };
        let host = match implicit {
            true => format!("ftps://{ip}:{IMPLICIT_PORT}"),
            false => format!("ftp://{ip}"),
        };
        let ca = ca.to_string_lossy().into_owned();
        let download = self.download_path().to_string_lossy().into_owned();
        let upload = self.upload_source_path().to_string_lossy().into_owned();
        match client {
            TlsClient::Lftp => {
                let script = [
                    "set cmd:fail-exit yes".to_owned(),
                    "set net:timeout 3".into(),
                    "set net:max-retries 1".into(),
                    "set net:reconnect-interval-base 1".into(),
                    "set ftp:ssl-force yes".into(),
                    "set ftp:ssl-protect-data yes".into(),
                    "set ftp:ssl-auth TLS".into(),
                    "set ssl:verify-certificate yes".into(),
                    format!("set ssl:ca-file {ca}"),
                    "set ftp:use-site-utime no".into(),
                    "set ftp:use-site-utime2 no".into(),
                    "set xfer:clobber on".into(),
                    format!("set ftp:passive-mode {}", mode.passive()),
                    format!("set ftp:prefer-epsv {}", mode == DataMode::Epsv),
                    format!("open -u anonymous,e2e {host}"),
                    "ls".into(),
                    format!("get {DATA_FILE} -o {download}"),
                    format!("put {upload} -o up/{UPLOAD_FILE}"),
                    "bye".into(),
                ];
                let path = self.dir.join(format!("ftps-{}.lftp", self.runs));
                fs::write(&path, script.join("\n") + "\n").expect("write lftp script");
                let args = ["lftp", "-f", &path.to_string_lossy()].map(str::to_owned);
                vec![self.run_args(&args)]
            }
            TlsClient::Curl => {
                assert!(mode.passive(), "curl 7.88 cannot do active FTPS");
                let base: Vec<String> = CURL
                    .into_iter()
                    .chain(["--ssl-reqd", "--cacert", &ca])
                    .map(str::to_owned)
                    .collect();
                let mode_args = match mode {
                    DataMode::Pasv => &["--disable-epsv"][..],
                    _ => &["--ftp-pasv"],
                };
                let ops: [Vec<String>; 3] = [
                    vec![format!("{host}/")],
                    vec![format!("{host}/{DATA_FILE}"), "-o".into(), download],
                    vec!["-T".into(), upload, format!("{host}/up/{UPLOAD_FILE}")],
                ];
                ops.into_iter()
                    .map(|op| {
                        let args: Vec<String> = base
                            .iter()
                            .cloned()
                            .chain(mode_args.iter().map(|s| s.to_string()))
                            .chain(op)
                            .collect();
                        self.run_args(&args)
                    })
                    .collect()
            }
            TlsClient::Ftplib => {
                assert!(!implicit, "the ftplib client speaks explicit FTPS only");
                let ops = [
                    "LIST".to_owned(),
                    "RETR".into(),
                    DATA_FILE.into(),
                    download,
                    "STOR".into(),
                    upload,
                    format!("up/{UPLOAD_FILE}"),
                ];
                vec![self.ftplib_tls(mode, "reuse", &ca, &ops)]
            }
        }
    }

    /// [`Lab::ftps_session`], which must succeed: the listing names the served file, and the
    /// download and the upload arrive byte for byte.
    fn ftps_transfers(&mut self, client: TlsClient, mode: DataMode, ca: &Path, implicit: bool) {
        for run in self.ftps_session(client, mode, ca, implicit) {
            assert!(
                run.status.success(),
                "{client:?} {mode:?}: FTPS session failed\n{}",
                run.transcript
            );
        }
        let runs = self.runs;
        let listing = fs::read_to_string(self.dir.join("client-1.stdout")).unwrap_or_default();
        assert!(
            listing.contains(DATA_FILE),
            "{client:?}: the listing does not name {DATA_FILE} ({runs} runs)"
        );
        self.assert_files_moved();
    }

    /// No download arrived: its file is absent, or empty (a client may create it before the
    /// transfer starts).
    fn downloaded_nothing(&self) -> bool {
        !self.download_path().exists() || self.read(&self.download_path()).is_empty()
    }

    /// [`FTPS_CLIENT`] with `ops`.
    fn ftplib_tls(&mut self, mode: DataMode, reuse: &str, ca: &str, ops: &[String]) -> Run {
        let args = self.ftplib_tls_args(mode, reuse, ca, ops);
        self.run_args(&args)
    }

    /// [`FTPS_CLIENT`] with `ops` (passive, resuming the session), started without waiting for
    /// it.
    fn spawn_ftplib_tls(&self, ca: &str, ops: &[String]) -> std::process::Child {
        let args = self.ftplib_tls_args(DataMode::Pasv, "reuse", ca, ops);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.client_command(&args)
            .spawn()
            .expect("spawn the FTPS client")
    }

    /// The command line of [`FTPS_CLIENT`] with `ops`.
    fn ftplib_tls_args(
        &self,
        mode: DataMode,
        reuse: &str,
        ca: &str,
        ops: &[String],
    ) -> Vec<String> {
        require_tool("python3");
        let script = self.dir.join("ftps-client.py");
        fs::write(&script, ftplib_script(FTPS_CLIENT)).expect("write the FTPS client");
        let dial = self.addrs().dial;
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
            "anonymous".into(),
            "e2e".into(),
            mode.into(),
            reuse.into(),
            ca.into(),
        ];
        args.extend(ops.iter().cloned());
        args
    }

    fn run_args(&mut self, args: &[String]) -> Run {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd = self.client_command(&args);
        self.run_bounded(cmd, &args)
    }
}

/// A listing, a download and an upload over FTPS with `PROT P`, each checked byte for byte;
/// the server (no TLS) saw the scenario's data command; every data connection went through a
/// pinhole to the relay (counted on G's input chain), and the relay counted the bytes.
pub fn round_trip(topology: Topology, client: TlsClient, mode: DataMode) {
    round_trip_via(topology, client, mode, false);
}

/// [`round_trip`] through the implicit FTPS listener: TLS from the first byte, no AUTH.
pub fn implicit_round_trip(client: TlsClient, mode: DataMode) {
    round_trip_via(Topology::Reverse(Family::V4), client, mode, true);
}

fn round_trip_via(topology: Topology, client: TlsClient, mode: DataMode, implicit: bool) {
    let (mut lab, pki) = lab(topology, |pki| match implicit {
        true => format!(
            "{}implicit_listen = [\"{G_LAN4}:{IMPLICIT_PORT}\"]\n",
            pki.section()
        ),
        false => pki.section(),
    });
    let log = transfer_and_check(&mut lab, &pki, client, mode, implicit);
    if implicit {
        let implicit_sessions = daemon_log_lines(&lab, "implicit FTPS: TLS with the client");
        assert!(
            !implicit_sessions.is_empty(),
            "no session came in implicitly"
        );
    }
    for tls_verb in ["AUTH", "PBSZ", "PROT"] {
        assert!(
            !log.commands().iter().any(|c| c.starts_with(tls_verb)),
            "{tls_verb} reached the server, which knows no TLS: {:?}",
            log.commands()
        );
    }
    lab.assert_no_pinholes_left();
}

/// One session of `client` with its listing, download and upload checked byte for byte, every
/// data connection through a pinhole to the relay, the relay's byte counters covering the
/// files, and the scenario's data command seen by the server; its log, for more checks.
fn transfer_and_check(
    lab: &mut Lab,
    pki: &Pki,
    client: TlsClient,
    mode: DataMode,
    implicit: bool,
) -> ServerLog {
    lab.ftps_transfers(client, mode, &pki.ca, implicit);
    let marked = counted(lab, super::DATA_PATH);
    assert!(
        marked >= 3,
        "{client:?} {mode:?}: {marked} data connections went through a pinhole, not 3"
    );
    assert_eq!(counted(lab, UNMARKED), 0, "unmarked data connections");
    assert_relay_counted_files(lab);
    assert!(metric(lab, "ftp_alg_tls_data_connections_total") >= 3);
    let log = ServerLog::read(lab);
    let verbs = log.data_verbs();
    assert!(
        verbs.len() >= 3 && verbs.iter().all(|v| v == mode.verb()),
        "{client:?}: the server saw {verbs:?}, not {}",
        mode.verb()
    );
    log
}

/// `sessions list --json` of the daemon.
fn sessions_json(lab: &Lab) -> serde_json::Value {
    let text = must(lab.alg_cli(&["sessions", "list", "--json"]));
    serde_json::from_str(&text).expect("sessions list --json")
}

/// The relay's byte counters cover the download and the upload of a round trip.
fn assert_relay_counted_files(lab: &Lab) {
    let relayed = |direction: &str| {
        metric(
            lab,
            &format!("ftp_alg_tls_relay_bytes_total{{direction=\"{direction}\"}}"),
        )
    };
    let (to_client, to_server) = (relayed("to_client"), relayed("to_server"));
    assert!(
        to_client >= DATA_LEN as u64 && to_server >= UPLOAD_LEN as u64,
        "relay counted {to_client} bytes to the client, {to_server} to the server"
    );
}

/// vsftpd.conf lines for TLS with a certificate from `pki` for the server's address (S4 or S6
/// in reverse mode, G's client-side address for a sidecar: the certificate names them all):
/// anonymous
/// logins and their data connections must be TLS, and (vsftpd's default
/// `require_ssl_reuse=YES`, left as it is) every data connection must resume the control
/// connection's TLS session. `debug_ssl` puts
/// the TLS version and whether a data connection resumed into vsftpd's log.
fn vsftpd_tls(pki: &Pki) -> String {
    let (chain, key) = pki.issue("vsftpd", &[S4, S6, G_LAN4, G_LAN6]);
    format!(
        "ssl_enable=YES\nallow_anon_ssl=YES\nforce_anon_logins_ssl=YES\n\
         force_anon_data_ssl=YES\ndebug_ssl=YES\nrsa_cert_file={}\nrsa_private_key_file={}\n",
        chain.display(),
        key.display()
    )
}

/// The `[tls]` lines for a TLS upstream that `trust` verifies (`upstream_ca = ...` or
/// `upstream_pin = ...`).
fn upstream_section(pki: &Pki, trust: &str) -> String {
    format!("{}upstream = \"tls\"\n{trust}\n", pki.section())
}

/// The SHA-256 of a certificate, as `openssl x509 -fingerprint` prints it (`AB:CD:...`).
fn fingerprint(cert: &Path) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert);
    let out = must(cmd);
    out.trim()
        .rsplit_once('=')
        .map(|(_, hex)| hex.to_owned())
        .unwrap_or_else(|| panic!("no fingerprint in {out:?}"))
}

/// How the daemon verifies a TLS vsftpd in [`upstream_round_trip`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// `tls.upstream_ca`: the test CA, which signed vsftpd's certificate.
    Ca,
    /// `tls.upstream_pin`: the SHA-256 of vsftpd's certificate.
    Pin,
}

/// FTPS end to end with TLS on both sides: vsftpd with TLS required for logins and data (and
/// its default `require_ssl_reuse=YES`) behind ftp-alg with `tls.upstream = "tls"`. The
/// transfers are checked as in [`round_trip`], and vsftpd's log must show ftp-alg's own
/// `AUTH TLS`, `PBSZ 0` and `PROT P` before the login, once per session, and the scenario's data
/// command; every data connection resumed ftp-alg's session (vsftpd refuses it otherwise).
/// With `implicit`, lftp and curl dial the implicit FTPS listener: the client's handshake comes
/// first, then ftp-alg's negotiation with the server.
pub fn upstream_round_trip(
    topology: Topology,
    client: TlsClient,
    mode: DataMode,
    (trust, implicit): (Trust, bool),
) {
    let (mut lab, pki) = lab_with_server(topology, vsftpd_tls, |pki| {
        let mut lines = match trust {
            Trust::Ca => format!("upstream_ca = {:?}", pki.ca.display().to_string()),
            Trust::Pin => format!(
                "upstream_pin = \"sha256:{}\"",
                fingerprint(&pki.dir.join("vsftpd.pem"))
            ),
        };
        if implicit {
            lines += &format!("\nimplicit_listen = [\"{G_LAN4}:{IMPLICIT_PORT}\"]");
        }
        upstream_section(pki, &lines)
    });
    let log = transfer_and_check(&mut lab, &pki, client, mode, implicit);
    let commands = log.commands();
    let sessions = commands.iter().filter(|c| **c == "AUTH TLS").count();
    let expected = if client == TlsClient::Curl { 3 } else { 1 };
    assert_eq!(sessions, expected, "AUTH TLS per session: {commands:?}");
    for (i, session) in commands.split(|c| *c == "AUTH TLS").skip(1).enumerate() {
        assert_eq!(
            session.get(..2),
            Some(&["PBSZ 0", "PROT P"][..]),
            "session {i}: {commands:?}"
        );
        assert!(
            session.contains(&"USER anonymous"),
            "session {i}: {commands:?}"
        );
        assert!(
            !session[2..]
                .iter()
                .any(|c| c.starts_with("PBSZ") || c.starts_with("PROT") || c.starts_with("AUTH")),
            "the client's own TLS commands reached the server: {commands:?}"
        );
    }
    let secured = daemon_log_lines(&lab, "TLS with the server established");
    assert_eq!(secured.len(), expected, "{secured:?}");
    lab.assert_no_pinholes_left();
}

/// Many data connections in one session to a TLS upstream: each must resume ftp-alg's control
/// session with vsftpd (TLS 1.3 tickets are used once each, so the store must be refilled by the
/// tickets the data connections bring), and vsftpd's `debug_ssl` log says `reused` for every one.
pub fn upstream_many_transfers_resume() {
    const LISTINGS: usize = 12;
    let (mut lab, pki) = lab_with_server(Topology::Reverse(Family::V4), vsftpd_tls, |pki| {
        upstream_section(
            pki,
            &format!("upstream_ca = {:?}", pki.ca.display().to_string()),
        )
    });
    let ca = pki.ca.to_string_lossy().into_owned();
    let ops = vec!["LIST".to_owned(); LISTINGS];
    let run = lab.ftplib_tls(DataMode::Pasv, "reuse", &ca, &ops);
    assert!(run.status.success(), "{}", run.transcript);
    let log = fs::read_to_string(lab.dir.join("vsftpd.log")).expect("vsftpd's log");
    let data: Vec<&str> = log.lines().filter(|l| l.contains("SSL version:")).collect();
    // The control connection's own handshake is the first, a full one.
    assert_eq!(data.len(), LISTINGS + 1, "{data:#?}");
    assert!(
        data[1..].iter().all(|l| l.contains(", reused,")),
        "a data connection did not resume: {data:#?}"
    );
}

/// What is wrong with the TLS upstream in [`upstream_refused`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamFault {
    /// `tls.upstream_pin` names another certificate.
    WrongPin,
    /// `tls.upstream_ca` is a CA that did not sign vsftpd's certificate.
    OtherCa,
    /// vsftpd has no TLS at all (`ssl_enable=NO`): it refuses `AUTH TLS`.
    NoTls,
}

/// Negative controls of the TLS upstream: when ftp-alg cannot secure its connection to the
/// server, the client's first reply is a 421 within seconds (before it could send a password),
/// the server never sees anything after `AUTH TLS`, and the daemon says why.
pub fn upstream_refused(fault: UpstreamFault) {
    let (mut lab, _) = lab_with_server(
        Topology::Reverse(Family::V4),
        |pki| match fault {
            UpstreamFault::NoTls => String::new(),
            _ => vsftpd_tls(pki),
        },
        |pki| {
            let line = match fault {
                UpstreamFault::WrongPin => format!("upstream_pin = \"sha256:{}\"", "ab".repeat(32)),
                UpstreamFault::OtherCa => {
                    let other = Pki::make_in(&pki.dir.join("other"), &[S4]);
                    format!("upstream_ca = {:?}", other.ca.display().to_string())
                }
                UpstreamFault::NoTls => format!("upstream_ca = {:?}", pki.ca.display().to_string()),
            };
            upstream_section(pki, &line)
        },
    );
    let dial = lab.addrs().dial;
    let script = format!(
        "import socket\n\
         s = socket.create_connection(('{}', {}), timeout=15)\n\
         f = s.makefile('rb')\n\
         print(f.readline().decode().strip())\n\
         try:\n    s.sendall(b'USER anonymous\\r\\n')\n    rest = f.read().decode().strip()\n\
         except ConnectionResetError:\n    rest = ''\n\
         print('after:', rest or 'closed')\n",
        dial.ip(),
        dial.port()
    );
    let args = ["python3".to_owned(), "-c".into(), script];
    let run = lab.run_args(&args);
    assert!(run.status.success(), "{}", run.transcript);
    assert!(
        run.stdout.starts_with("421 ") && run.elapsed < Duration::from_secs(10),
        "{fault:?}: the client did not get a 421 at once\n{}",
        run.transcript
    );
    assert!(run.stdout.contains("after: closed"), "{}", run.transcript);
    assert_eq!(
        ServerLog::read(&lab).commands(),
        ["AUTH TLS"],
        "{fault:?}: the server saw more than ftp-alg's AUTH TLS"
    );
    let reason = match fault {
        UpstreamFault::NoTls => "reason=\"auth_refused\"",
        _ => "reason=\"handshake\"",
    };
    let why = match fault {
        UpstreamFault::WrongPin => "does not match tls.upstream_pin",
        UpstreamFault::OtherCa => "UnknownIssuer",
        UpstreamFault::NoTls => "the server refused AUTH TLS: 530",
    };
    let refused = daemon_log_lines(&lab, "cannot secure the connection to the server");
    assert!(
        refused
            .iter()
            .any(|l| l.contains(reason) && l.contains(why)),
        "{fault:?}: the daemon did not say why ({reason}, {why}): {refused:?}"
    );
    assert_eq!(metric(&lab, "ftp_alg_upstream_connect_failures_total"), 1);
}

/// `sessions list` shows that a session speaks TLS to the server: `private+up` in the table,
/// `"upstream_tls": true` in JSON, while an ftplib session with `PROT P` lingers.
pub fn upstream_shown_in_sessions_list() {
    let (lab, pki) = lab_with_server(Topology::Reverse(Family::V4), vsftpd_tls, |pki| {
        upstream_section(
            pki,
            &format!("upstream_ca = {:?}", pki.ca.display().to_string()),
        )
    });
    let ca = pki.ca.to_string_lossy().into_owned();
    let ops = ["LIST".to_owned(), "SLEEP".into(), "3".into()];
    let mut client = lab.spawn_ftplib_tls(&ca, &ops);
    let listed = || sessions_json(&lab);
    let seen = super::wait_for(Duration::from_secs(10), || {
        let sessions = listed();
        let up = sessions
            .as_array()?
            .iter()
            .any(|s| s["tls"] == "private" && s["upstream_tls"] == true);
        up.then_some(())
    });
    assert!(
        seen.is_some(),
        "no private upstream-TLS session listed: {}",
        listed()
    );
    let table = must(lab.alg_cli(&["sessions", "list"]));
    assert!(table.contains("private+up"), "{table}");
    assert!(client.wait().expect("wait for the client").success());
}

/// A client without TLS in front of a TLS upstream: its data connections are relayed, in clear
/// on its side and TLS on the server's (vsftpd requires it), so no client-side TLS data
/// connection is counted while the relay's byte counters cover the files.
pub fn upstream_plain_client() {
    let (mut lab, _) = lab_with_server(Topology::Reverse(Family::V4), vsftpd_tls, |pki| {
        upstream_section(
            pki,
            &format!("upstream_ca = {:?}", pki.ca.display().to_string()),
        )
    });
    let dial = lab.addrs().dial;
    let host = format!("ftp://{}", dial.ip());
    let download = lab.download_path().to_string_lossy().into_owned();
    let upload = lab.upload_source_path().to_string_lossy().into_owned();
    for op in [
        vec![format!("{host}/{DATA_FILE}"), "-o".into(), download],
        vec!["-T".into(), upload, format!("{host}/up/{UPLOAD_FILE}")],
    ] {
        let args: Vec<String> = CURL
            .into_iter()
            .map(str::to_owned)
            .chain(["--disable-epsv".to_owned()])
            .chain(op)
            .collect();
        let run = lab.run_args(&args);
        assert!(run.status.success(), "{}", run.transcript);
    }
    lab.assert_files_moved();
    let log = ServerLog::read(&lab);
    let secured = log.commands().iter().filter(|c| **c == "PROT P").count();
    assert_eq!(secured, 2, "{:?}", log.commands());
    assert_eq!(metric(&lab, "ftp_alg_tls_data_connections_total"), 0);
    assert_relay_counted_files(&lab);
    lab.assert_no_pinholes_left();
}

/// Negative controls of the relay, in one session of [`FTPS_CLIENT`] (passive):
/// - a connection to the announced data port from another address of the client's network is
///   dropped (counted), and the real client's download through the same announcement's
///   successor still works;
/// - a data connection that does a full handshake instead of resuming the control
///   connection's TLS session is refused, and the daemon says why.
pub fn relay_refuses_strangers() {
    let (mut lab, pki) = lab(Topology::Reverse(Family::V4), Pki::section);
    lab.ip(&[
        "-n",
        &lab.client_ns(),
        "addr",
        "add",
        &format!("{INTRUDER4}/24"),
        "dev",
        "eth0",
    ]);
    let ca = pki.ca.to_string_lossy().into_owned();
    let download = lab.download_path().to_string_lossy().into_owned();
    let ops = [
        "INTRUDE".to_owned(),
        INTRUDER4.into(),
        "RETR".into(),
        DATA_FILE.into(),
        download,
    ];
    let run = lab.ftplib_tls(DataMode::Pasv, "reuse", &ca, &ops);
    assert!(run.status.success(), "{}", run.transcript);
    assert!(
        run.stdout.contains("intruder: TimeoutError"),
        "the intruder's connection was not dropped\n{}",
        run.transcript
    );
    assert!(
        counted(&lab, UNMARKED) > 0,
        "the firewall dropped nothing, so the intruder failed for another reason"
    );
    assert_same_bytes(
        "download",
        &lab.read(&lab.download_path()),
        &lab.read(&lab.served_path()),
    );

    // ftplib's own behaviour: a fresh TLS session on the data connection.
    let _ = fs::remove_file(lab.download_path());
    let ops = [
        "RETR".to_owned(),
        DATA_FILE.into(),
        lab.download_path().to_string_lossy().into(),
    ];
    let run = lab.ftplib_tls(DataMode::Pasv, "fresh", &ca, &ops);
    assert!(
        !run.status.success(),
        "a data connection that did not resume the session was served\n{}",
        run.transcript
    );
    assert!(
        lab.downloaded_nothing(),
        "data arrived over a refused connection"
    );
    let refused = daemon_log_lines(&lab, "reason=\"not_resumed\"");
    assert!(!refused.is_empty(), "the daemon did not say why it refused");
    assert_eq!(
        metric(
            &lab,
            "ftp_alg_tls_data_refusals_total{reason=\"not_resumed\"}"
        ),
        1
    );
}

/// Where `[tls]` is off, a client that insists on TLS gets 534 and fails at once, before it
/// sends its password; where `policy.require_tls` is on, a client without TLS gets 530 and
/// the server never sees its USER.
pub fn tls_off_and_tls_required() {
    let (mut lab, pki) = lab(Topology::Reverse(Family::V4), |_| String::new());
    let ca = pki.ca.clone();
    for client in [TlsClient::Curl, TlsClient::Lftp] {
        let runs = lab.ftps_session(client, DataMode::Pasv, &ca, false);
        let run = &runs[0];
        assert!(
            !run.status.success() && run.elapsed.as_secs() < 10,
            "{client:?} insisted on TLS where it is off, and did not fail at once\n{}",
            run.transcript
        );
        if client == TlsClient::Curl {
            // CURLE_USE_SSL_FAILED.
            assert_eq!(run.status.code(), Some(64), "{}", run.transcript);
        }
    }
    assert!(
        !ServerLog::read(&lab)
            .commands()
            .iter()
            .any(|c| c.starts_with("PASS") || c.starts_with("USER")),
        "a login went to the server in clear"
    );
    assert!(!daemon_log_lines(&lab, "reason=\"tls_refused\"").is_empty());

    let (mut lab, _) = lab_required();
    let dial = lab.addrs().dial;
    let url = format!("ftp://{}/", dial.ip());
    let args: Vec<String> = CURL
        .into_iter()
        .chain([url.as_str()])
        .map(str::to_owned)
        .collect();
    let run = lab.run_args(&args);
    // CURLE_LOGIN_DENIED.
    assert_eq!(run.status.code(), Some(67), "{}", run.transcript);
    assert!(
        !ServerLog::read(&lab)
            .commands()
            .iter()
            .any(|c| c.starts_with("USER")),
        "USER reached the server without TLS"
    );
    assert!(!daemon_log_lines(&lab, "reason=\"tls_required\"").is_empty());
}

fn lab_required() -> (Lab, Pki) {
    lab(Topology::Reverse(Family::V4), |pki| {
        format!("{}[policy]\nrequire_tls = true\n", pki.section())
    })
}

/// An operator sees a session's TLS state: `sessions list` says `private` for a `PROT P`
/// session, and `sniff` on the client's side says that the connection started TLS (and so
/// that its announcements cannot be checked there). The negative control is the state before
/// AUTH: the same session listed as `plain` while it has not started TLS.
pub fn sessions_and_sniff_show_tls() {
    let (lab, pki) = lab(Topology::Reverse(Family::V4), Pki::section);
    let sniffer = super::sniff::Sniffer::start(&lab, "tls", &["--json", "--timeout", "30"]);
    let listed = || sessions_json(&lab);
    // A plain session first: a raw connection that only reads the greeting.
    let plain = [
        "python3",
        "-c",
        "import socket,time; s=socket.create_connection(('198.18.0.1',21)); s.recv(100); time.sleep(2)",
    ];
    let mut plain = lab
        .client_command(&plain)
        .spawn()
        .expect("spawn a plain client");
    let seen = super::wait_for(Duration::from_secs(10), || {
        let sessions = listed();
        (sessions[0]["tls"] == "plain").then_some(())
    });
    assert!(seen.is_some(), "no plain session listed: {}", listed());
    let _ = plain.wait();

    let ca = pki.ca.to_string_lossy().into_owned();
    let ops = ["LIST".to_owned(), "SLEEP".into(), "3".into()];
    let mut client = lab.spawn_ftplib_tls(&ca, &ops);
    let seen = super::wait_for(Duration::from_secs(10), || {
        let sessions = listed();
        let private = sessions.as_array()?.iter().any(|s| s["tls"] == "private");
        private.then_some(())
    });
    assert!(seen.is_some(), "no private session listed: {}", listed());
    let table = must(lab.alg_cli(&["sessions", "list"]));
    assert!(
        table.contains(" TLS ") && table.contains("private"),
        "{table}"
    );
    assert!(client.wait().expect("wait for the client").success());
    let note: serde_json::Value = sniffer.next_json();
    assert_eq!(note["tls"], "started", "{note}");
    assert_eq!(note["server"], format!("{G_LAN4}:21"), "{note}");
}

/// A gateway lab for FTPS straight to the server: vsftpd with TLS (its certificate for the
/// server's address from the test's CA, TLS required for logins and data, `require_ssl_reuse`
/// at its default), and the daemon passing AUTH (`policy.auth = "transparent"`), with or without
/// `policy.tls_window`. The shipped default-deny forward chain drops, counted ([`DATA_PATH`]),
/// every new connection that neither tcp/21 nor a pinhole or window lets through.
fn gateway_lab(family: Family, window: bool) -> (Lab, Pki) {
    let mut pki = None;
    let mut lab = Lab::prepared(
        Topology::Gateway(family),
        Server::Vsftpd,
        Setup::AlgStopped,
        |lab| {
            let server = lab.addrs().server.to_string();
            let made = Pki::make(lab, &[&server]);
            let options = format!(
                "ssl_enable=YES\nallow_anon_ssl=YES\nforce_anon_logins_ssl=YES\n\
                 force_anon_data_ssl=YES\nssl_ciphers=HIGH\nrsa_cert_file={}\n\
                 rsa_private_key_file={}\n",
                made.chain.display(),
                made.key.display()
            );
            pki = Some(made);
            options
        },
    );
    let pki = pki.expect("the PKI is made before the server starts");
    lab.alg_config = format!(
        "[metrics]\nlisten = \"{METRICS}\"\n[policy]\nauth = \"transparent\"\n\
         tls_window = {window}\n"
    );
    lab.start_alg();
    (lab, pki)
}

/// The packets counted by the daemon's own window rules (`@win_v4` and `@win_v6` in its
/// table): the first packet of every connection a window let through.
fn window_packets(lab: &Lab) -> u64 {
    counted_in(lab, "ftp_alg", |rule| {
        let expr = rule["expr"].to_string();
        expr.contains("@win_v4") || expr.contains("@win_v6")
    })
}

/// Gateway mode, `policy.tls_window`: `client` speaks FTPS (passive, `PROT P`) straight to a
/// vsftpd with TLS; ftp-alg reads nothing after AUTH, and the session's window lets the data
/// connections through the default-deny forward chain. A listing, a download and an upload,
/// byte for byte; every data connection went through the window and none was dropped; vsftpd
/// saw AUTH and PASV from the gateway's address, data connections included (it refuses data
/// from another address than the control connection's); the window went with the session.
pub fn through_window(family: Family, client: TlsClient) {
    let (mut lab, pki) = gateway_lab(family, true);
    let mode = match family {
        Family::V4 => DataMode::Pasv,
        Family::V6 => DataMode::Epsv,
    };
    lab.ftps_transfers(client, mode, &pki.ca, false);
    let through = window_packets(&lab);
    assert!(
        through >= 3,
        "{client:?}: {through} data connections went through the window, not 3"
    );
    assert_eq!(
        counted(&lab, super::DATA_PATH),
        0,
        "dropped data connections"
    );
    let log = ServerLog::read(&lab);
    assert!(
        log.commands().iter().any(|c| c.starts_with("AUTH")),
        "the server never saw AUTH: {:?}",
        log.commands()
    );
    let verbs = log.data_verbs();
    assert!(
        verbs.len() >= 3 && verbs.iter().all(|v| v == "PASV" || v == "EPSV"),
        "{client:?}: the server saw {verbs:?}"
    );
    assert!(metric(&lab, "ftp_alg_windows_opened_total") >= 1);
    let closed = super::wait_for(Duration::from_secs(10), || {
        (metric(&lab, "ftp_alg_windows_open") == 0).then_some(())
    });
    assert!(closed.is_some(), "a window outlived its session");
    lab.assert_no_pinholes_left();
}

/// The window as an operator sees it: while an FTPS session lives, `pinholes list` shows one
/// window for its client and server, ports 1024-65535, and the metrics count it open;
/// `pinholes close` on it ends the session (the client's next operation fails) and the window
/// is gone from the kernel.
pub fn window_listed_and_closed() {
    let (lab, pki) = gateway_lab(Family::V4, true);
    let ca = pki.ca.to_string_lossy().into_owned();
    let download = lab.download_path().to_string_lossy().into_owned();
    let ops = [
        "LIST".to_owned(),
        "SLEEP".into(),
        "8".into(),
        "RETR".into(),
        DATA_FILE.into(),
        download,
    ];
    let mut client = lab.spawn_ftplib_tls(&ca, &ops);
    let mut listed = Vec::new();
    let window = super::wait_for(Duration::from_secs(10), || {
        listed = lab.pinholes();
        listed.iter().find(|p| p.kind == "window").map(|p| {
            (
                p.id,
                p.state.clone(),
                p.client,
                p.server,
                p.dial,
                p.last_port,
            )
        })
    });
    let Some((id, state, client_ip, server_ip, dial, last_port)) = window else {
        let _ = client.kill();
        panic!("no window listed during the session: {listed:#?}");
    };
    assert_eq!(state, "open");
    assert_eq!(client_ip.to_string(), super::C4);
    assert_eq!(server_ip.to_string(), S4);
    assert_eq!(
        dial,
        format!("{S4}:1024").parse().expect("a socket address")
    );
    assert_eq!(last_port, Some(65535));
    assert_eq!(metric(&lab, "ftp_alg_windows_open"), 1);
    let id = id.expect("the daemon lists its window's id").to_string();
    must(lab.alg_cli(&["pinholes", "close", &id]));
    let status = client.wait().expect("wait for the FTPS client");
    assert!(
        !status.success(),
        "the session went on after its window was closed"
    );
    assert!(
        lab.downloaded_nothing(),
        "data arrived after the window was closed"
    );
    lab.assert_no_pinholes_left();
    assert_eq!(metric(&lab, "ftp_alg_windows_open"), 0);
}

/// The negative control of [`through_window`]: the same gateway and server without
/// `policy.tls_window`. The TLS session logs in and asks for a passive transfer (vsftpd saw
/// PASV), but the data connection is dropped by the forward chain (counted), and curl gives
/// up without data.
pub fn blocked_without_window() {
    let (mut lab, pki) = gateway_lab(Family::V4, false);
    // One download (a listing or an upload would wait out curl's --max-time as well).
    let args: Vec<String> = CURL
        .into_iter()
        .map(str::to_owned)
        .chain([
            "--ssl-reqd".into(),
            "--cacert".into(),
            pki.ca.to_string_lossy().into_owned(),
            "--disable-epsv".into(),
            format!("ftp://{S4}/{DATA_FILE}"),
            "-o".into(),
            lab.download_path().to_string_lossy().into_owned(),
        ])
        .collect();
    let run = lab.run_args(&args);
    assert!(
        !run.status.success(),
        "the download went through without a window\n{}",
        run.transcript
    );
    assert!(lab.downloaded_nothing(), "data arrived without a window");
    assert!(
        counted(&lab, super::DATA_PATH) > 0,
        "the forward chain dropped nothing, so the transfer failed for another reason"
    );
    assert!(
        ServerLog::read(&lab)
            .data_verbs()
            .iter()
            .any(|v| v == "PASV"),
        "the session did not get as far as PASV"
    );
    assert_eq!(window_packets(&lab), 0);
}
