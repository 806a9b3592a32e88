//! `ftp-alg sniff` end to end: the real binary captures on G's client-side interface (lan0)
//! while a real vsftpd session runs through G, with and without the daemon. One `pub fn` per
//! `#[test]` of `tests/e2e_sniff.rs`.
//!
//! The sessions are driven by [`PyClient`] scripts that stop at a checkpoint after each
//! announcement until sniff has printed it: a pinhole lives from its announcement until the
//! transfer's final reply, and a 1 MiB transfer through veth can be over before sniff has read
//! the pinholes once. Holding the session makes the verdict the test checks deterministic.

use super::edge::PyClient;
use super::*;

/// What sniff prints for an announcement without a pinhole (`sniff::report::NO_PINHOLE`).
const NO_PINHOLE: &str = "no pinhole: in a default-deny firewall this data connection will be \
                          dropped; is this session going through ftp-alg?";
/// Longest a sniff line may take to appear: its pinhole grace (2 s) and a margin for a loaded
/// machine.
const LINE_WITHIN: Duration = Duration::from_secs(15);

/// One line of `sniff --json`; written out here rather than taken from the library, so that a
/// change of the JSON interface fails this test.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Announcement {
    time: String,
    client: SocketAddr,
    server: SocketAddr,
    kind: String,
    endpoint: SocketAddr,
    pinhole: Option<Pinhole>,
}

/// A passive and an active download through the daemon: sniff on lan0 reports the 227 and the
/// PORT as the client sees them, each with the pinhole `pinholes list` shows.
pub fn gateway_announcements_have_pinholes() {
    let mut lab = Lab::new(Topology::Gateway(Family::V4), Setup::Alg);
    let a = lab.addrs();
    let mut json = Sniffer::start(&lab, "json", &["--json", "--count", "2"]);
    let human = Sniffer::start(&lab, "human", &["--count", "2"]);
    let mut client = PyClient::in_client(&mut lab, PASSIVE_THEN_ACTIVE);

    client.replies_until("passive");
    let pasv: Announcement = json.next_json();
    let expected_flow = (a.client, SocketAddr::new(a.server, 21));
    assert_eq!((pasv.client.ip(), pasv.server), expected_flow, "{pasv:#?}");
    assert_eq!(pasv.kind, "227", "{pasv:#?}");
    assert_eq!(pasv.endpoint.ip(), a.server, "{pasv:#?}");
    assert!(PASV_PORTS.contains(&pasv.endpoint.port()), "{pasv:#?}");
    let pinhole = pasv
        .pinhole
        .as_ref()
        .unwrap_or_else(|| panic!("sniff found no pinhole for the 227 through ftp-alg: {pasv:#?}"));
    assert_eq!(
        pinhole.dial, pasv.endpoint,
        "the passive pinhole is dialled: {pasv:#?}"
    );
    assert_eq!(pinhole.source, a.client, "{pasv:#?}");
    client.resume();

    client.replies_until("active");
    let port: Announcement = json.next_json();
    assert_eq!(
        (port.client, port.server),
        (pasv.client, pasv.server),
        "{port:#?}"
    );
    assert_eq!(port.kind, "PORT", "{port:#?}");
    assert_eq!(
        port.endpoint.ip(),
        a.client,
        "the client's own address: {port:#?}"
    );
    let pinhole = port.pinhole.as_ref().unwrap_or_else(|| {
        panic!("sniff found no pinhole for the PORT through ftp-alg: {port:#?}")
    });
    assert_eq!(pinhole.maps_to, Some(port.endpoint), "{port:#?}");
    assert_eq!(pinhole.state, "waiting", "{port:#?}");
    assert_eq!(
        pinhole.session,
        pasv.pinhole.as_ref().map_or(0, |p| p.session)
    );
    let listed = lab.pinholes();
    assert!(
        listed
            .iter()
            .any(|p| p.dial == pinhole.dial && p.maps_to == pinhole.maps_to),
        "sniff's pinhole {pinhole:#?} is not among those listed: {listed:#?}"
    );
    client.resume();
    client.finish();
    assert_same_bytes(
        "passive download",
        &lab.read(&lab.dir.join("passive.bin")),
        &lab.read(&lab.served_path()),
    );
    assert_same_bytes(
        "active download",
        &lab.read(&lab.dir.join("active.bin")),
        &lab.read(&lab.served_path()),
    );
    for announcement in [&pasv, &port] {
        assert!(announcement.time.ends_with('Z'), "{announcement:#?}");
    }
    assert!(
        json.finish().success(),
        "sniff --json --count 2 must exit 0"
    );

    let lines = human.lines_until_exit();
    println!("sniff on lan0, through ftp-alg:\n{}", lines.join("\n"));
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(
        lines[0].contains(" 227 ") && lines[1].contains(" PORT "),
        "{lines:#?}"
    );
    assert!(
        lines.iter().all(|l| l.contains("pinhole: session ")),
        "{lines:#?}"
    );
}

/// A passive download, then an active one, each held at a checkpoint after its announcement.
const PASSIVE_THEN_ACTIVE: &str = r#"
c = Control()
c.command("USER anonymous")
c.command("TYPE I")
data = passive(c.command("PASV"))
checkpoint("passive")
c.transfer(data, "passive.bin", "RETR data.bin")
listener, port = c.listen()
c.send(port)
c.reply()
checkpoint("active")
c.transfer(listener, "active.bin", "RETR data.bin")
c.command("QUIT")
"#;

/// Without the daemon the client talks straight to the server through G (the policy forwards
/// tcp/21): sniff reports the same announcements, without a pinhole, and says so.
pub fn bypassing_sessions_have_no_pinhole() {
    let mut lab = Lab::new(Topology::Gateway(Family::V4), Setup::AlgStopped);
    let a = lab.addrs();
    let mut json = Sniffer::start(&lab, "json", &["--json", "--count", "2"]);
    let human = Sniffer::start(&lab, "human", &["--count", "2"]);
    let replies = PyClient::in_client(&mut lab, ANNOUNCE_ONLY).finish();
    assert_eq!(
        replies.len(),
        5,
        "greeting, USER, PASV, PORT, QUIT: {replies:#?}"
    );

    let pasv: Announcement = json.next_json();
    let port: Announcement = json.next_json();
    for announcement in [&pasv, &port] {
        assert_eq!(announcement.client.ip(), a.client, "{announcement:#?}");
        assert_eq!(
            announcement.server,
            SocketAddr::new(a.server, 21),
            "{announcement:#?}"
        );
        assert!(announcement.pinhole.is_none(), "{announcement:#?}");
    }
    assert_eq!((pasv.kind.as_str(), pasv.endpoint.ip()), ("227", a.server));
    assert_eq!((port.kind.as_str(), port.endpoint.ip()), ("PORT", a.client));
    assert!(
        json.finish().success(),
        "sniff --json --count 2 must exit 0"
    );
    assert!(
        json.stderr().contains("table inet ftp_alg does not exist"),
        "sniff should say why nothing has a pinhole: {}",
        json.stderr()
    );

    let lines = human.lines_until_exit();
    println!("sniff on lan0, ftp-alg not running:\n{}", lines.join("\n"));
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines.iter().all(|l| l.ends_with(NO_PINHOLE)), "{lines:#?}");
}

/// With the daemon running, so that its table exists and holds a pinhole, a PORT that ftp-alg
/// refuses (it names the server, not the client) is reported with no pinhole, although it
/// names the very endpoint at which the session's passive pinhole waits: that pinhole admits
/// the client, and a PORT's data connection would come from the server.
pub fn a_refused_port_has_no_pinhole_while_the_table_exists() {
    let mut lab = Lab::new(Topology::Gateway(Family::V4), Setup::Alg);
    let a = lab.addrs();
    let json = Sniffer::start(&lab, "json", &["--json", "--count", "2"]);
    let mut client = PyClient::in_client(&mut lab, PASV_THEN_FOREIGN_PORT);

    client.replies_until("passive");
    let pasv: Announcement = json.next_json();
    assert_eq!(pasv.kind, "227", "{pasv:#?}");
    let waiting = pasv
        .pinhole
        .as_ref()
        .unwrap_or_else(|| panic!("sniff found no pinhole for the 227 through ftp-alg: {pasv:#?}"));
    assert_eq!(
        (waiting.source, waiting.dial),
        (a.client, pasv.endpoint),
        "{pasv:#?}"
    );
    client.resume();

    let refused = client.replies_until("refused");
    assert!(
        refused.last().is_some_and(|r| r.starts_with("501 ")),
        "ftp-alg must refuse a PORT naming the server: {refused:#?}"
    );
    let port: Announcement = json.next_json();
    assert_eq!(
        (port.kind.as_str(), port.endpoint),
        ("PORT", pasv.endpoint),
        "{port:#?}"
    );
    assert!(port.pinhole.is_none(), "{port:#?}");
    let listed = lab.pinholes();
    assert!(
        listed
            .iter()
            .any(|p| p.dial == pasv.endpoint && p.source == a.client),
        "the passive pinhole waits at the PORT's endpoint all along: {listed:#?}"
    );
    assert!(
        !json.stderr().contains("does not exist"),
        "the daemon's table exists: {}",
        json.stderr()
    );
    client.resume();
    client.finish();
}

/// PASV, then a PORT naming the 227's endpoint (the server's address), which ftp-alg refuses.
const PASV_THEN_FOREIGN_PORT: &str = r#"
c = Control()
c.command("USER anonymous")
reply = c.command("PASV")
checkpoint("passive")
c.command("PORT " + re.search(r"(\d+,\d+,\d+,\d+,\d+,\d+)", reply).group(1))
checkpoint("refused")
c.command("QUIT")
"#;

/// PASV and PORT, without any data connection (none could pass G without a pinhole).
const ANNOUNCE_ONLY: &str = r#"
c = Control()
c.command("USER anonymous")
c.command("PASV")
listener, port = c.listen()
c.send(port)
c.reply()
c.command("QUIT")
"#;

/// An unknown interface is named with those that exist; an unprivileged user is told what
/// sniff needs; `--timeout` before `--count` announcements exits 5.
pub fn errors_and_exit_codes() {
    let lab = Lab::new(Topology::Gateway(Family::V4), Setup::AlgStopped);
    let g = lab.gateway_ns();

    let out = lab
        .exec(&g, &[ALG, "sniff", "--interface", "eth9"])
        .output()
        .expect("run sniff");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no interface named \"eth9\"")
            && stderr.contains("lan0")
            && stderr.contains("wan0"),
        "{stderr}"
    );

    let out = lab
        .exec(
            &g,
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                ALG,
                "sniff",
                "--interface",
                "lan0",
            ],
        )
        .output()
        .expect("run sniff as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("capturing on lan0 needs root or CAP_NET_RAW"),
        "{stderr}"
    );

    let mut quiet = Sniffer::start(&lab, "timeout", &["--count", "1", "--timeout", "1"]);
    assert_eq!(quiet.finish().code(), Some(5), "{}", quiet.stderr());
}

/// `ftp-alg sniff --interface lan0` running in G.
pub(super) struct Sniffer {
    child: Child,
    lines: Receiver<String>,
    stderr_path: PathBuf,
}

impl Sniffer {
    /// Starts it with `args` (and a `--timeout` of a minute unless they set one), and waits
    /// until it captures; `name` names its stderr file.
    pub(super) fn start(lab: &Lab, name: &str, args: &[&str]) -> Sniffer {
        let stderr_path = lab.dir.join(format!("sniff-{name}.log"));
        let mut command = vec![ALG, "sniff", "--interface", "lan0"];
        command.extend(args);
        if !args.contains(&"--timeout") {
            command.extend(["--timeout", "60"]);
        }
        let mut child = lab
            .exec(&lab.gateway_ns(), &command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(create(&stderr_path))
            .spawn()
            .expect("spawn ftp-alg sniff");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let sniffer = Sniffer {
            child,
            lines,
            stderr_path,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sniffer.stderr().contains("capturing") {
            assert!(
                Instant::now() < deadline,
                "sniff did not start capturing: {}",
                sniffer.stderr()
            );
            sleep(Duration::from_millis(20));
        }
        sniffer
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn next_line(&self) -> String {
        self.lines.recv_timeout(LINE_WITHIN).unwrap_or_else(|e| {
            panic!(
                "no line from sniff within {LINE_WITHIN:?} ({e}): {}",
                self.stderr()
            )
        })
    }

    pub(super) fn next_json<T: serde::de::DeserializeOwned>(&self) -> T {
        let line = self.next_line();
        println!("sniff --json: {line}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("sniff printed {line:?}: {e}"))
    }

    /// Its exit status, once it has exited by itself (within [`LINE_WITHIN`]).
    fn finish(&mut self) -> ExitStatus {
        let deadline = Instant::now() + LINE_WITHIN;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "sniff still runs: {}",
                self.stderr()
            );
            sleep(Duration::from_millis(20));
        }
    }

    /// Every line it prints until it exits by itself.
    fn lines_until_exit(&self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(LINE_WITHIN) {
            lines.push(line);
        }
        lines
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Real clients, real transfers, nothing held: lftp (PASV, PORT) and curl (EPSV, EPRT)
/// download through the daemon. A pinhole can come and go within a few milliseconds here;
/// sniff must still find each one.
pub fn real_transfers_have_pinholes() {
    let mut lab = Lab::new(Topology::Gateway(Family::V4), Setup::Alg);
    let mut json = Sniffer::start(&lab, "json", &["--json", "--count", "4"]);
    let human = Sniffer::start(&lab, "human", &["--count", "4"]);
    let sessions = [
        (Client::Lftp, DataMode::Pasv, "227"),
        (Client::Lftp, DataMode::Port, "PORT"),
        (Client::Curl, DataMode::Epsv, "229"),
        (Client::Curl, DataMode::Eprt, "EPRT"),
    ];
    for (client, mode, kind) in sessions {
        let run = lab.client_session(client, mode, &[Op::Download]);
        assert!(run.status.success(), "{}", run.transcript);
        let seen: Announcement = json.next_json();
        assert_eq!(seen.kind, kind, "{client:?} {mode:?}: {seen:#?}");
        let pinhole = seen
            .pinhole
            .as_ref()
            .unwrap_or_else(|| panic!("{client:?} {mode:?}: sniff found no pinhole: {seen:#?}"));
        assert!(
            pinhole.dial == seen.endpoint || pinhole.maps_to == Some(seen.endpoint),
            "{client:?} {mode:?}: {seen:#?}"
        );
    }
    assert!(
        json.finish().success(),
        "sniff --json --count 4 must exit 0"
    );
    let lines = human.lines_until_exit();
    println!(
        "sniff on lan0, lftp and curl through ftp-alg:\n{}",
        lines.join("\n")
    );
    assert_eq!(lines.len(), 4, "{lines:#?}");
}
