//! ftp-alg as a service, end to end: systemd's readiness protocol (read from a `NOTIFY_SOCKET`
//! the test binds), SIGHUP reloads, the table loaded again after `nft flush ruleset`, and logs
//! to the journal (journald's native socket, replaced by the test's own in a private mount
//! namespace) or to a file without colour. One `pub fn` per `#[test]` of
//! `tests/e2e_service.rs`, all in the gateway topology with vsftpd.

use super::edge::PyClient;
use super::*;

/// How long the daemon may take to send READY=1 after it starts, and to load its table again.
const WITHIN: Duration = Duration::from_secs(10);
/// The bound on noticing a flushed table and loading it again: notifications arrive at once,
/// the daemon waits 100 ms for the change to settle, then runs nft twice.
const HEALED_WITHIN: Duration = Duration::from_secs(3);
/// `WATCHDOG_USEC` given to the daemon: a keep-alive every 200 ms.
const WATCHDOG_USEC: &str = "400000";

/// A gateway lab with vsftpd whose daemon is not started yet.
fn lab() -> Lab {
    lab_in(Topology::Gateway(Family::V4))
}

/// A lab of `topology` with vsftpd whose daemon is not started yet.
fn lab_in(topology: Topology) -> Lab {
    Lab::prepared(topology, Server::Vsftpd, Setup::AlgStopped, |_| {
        String::new()
    })
}

/// A datagram socket in the test directory, read with a timeout.
fn datagram_socket(lab: &Lab, name: &str) -> (UnixDatagram, PathBuf) {
    let path = lab.dir.join(name);
    let socket = UnixDatagram::bind(&path).expect("bind a datagram socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("set a read timeout");
    (socket, path)
}

/// The next datagram, or `None` if none comes within the socket's read timeout.
fn next_datagram(socket: &UnixDatagram) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 1 << 16];
    let n = socket.recv(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// Reads notifications until one satisfies `wanted`, failing after `within`; every one read,
/// in order.
fn notifications_until(
    socket: &UnixDatagram,
    within: Duration,
    what: &str,
    mut wanted: impl FnMut(&str) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        if let Some(datagram) = next_datagram(socket) {
            let text = String::from_utf8_lossy(&datagram).into_owned();
            let done = wanted(&text);
            seen.push(text);
            if done {
                return seen;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {within:?}; notifications: {seen:#?}"
        );
    }
}

/// Whether the daemon in G listens on 2121 in both families and its table is loaded.
fn listening_with_table(lab: &Lab) -> (bool, bool) {
    let g = lab.gateway_ns();
    let listeners = lab
        .exec(&g, &["ss", "-Hltn", "sport", "=", ":2121"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .unwrap_or(0);
    let table = lab
        .exec(&g, &["nft", "list", "table", "inet", "ftp_alg"])
        .output()
        .is_ok_and(|o| o.status.success());
    (listeners == 2, table)
}

/// Waits until the daemon's log has `count` lines containing `text`.
fn wait_for_log(lab: &Lab, text: &str, count: usize, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let lines: Vec<String> = fs::read_to_string(lab.dir.join("daemon.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(text))
            .map(str::to_owned)
            .collect();
        if lines.len() >= count {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not log {text:?} {count} times within {within:?}"
        );
        sleep(Duration::from_millis(50));
    }
}

fn signal_alg(lab: &Lab, signal: &str) {
    let pid = lab.alg.as_ref().expect("the daemon runs").id().to_string();
    must({
        let mut cmd = Command::new("kill");
        cmd.args([format!("-{signal}"), pid]);
        cmd
    });
}

/// `Type=notify`: READY=1 comes only once both listeners accept and the table is loaded, with a
/// STATUS= line; WATCHDOG=1 keeps coming at half `WATCHDOG_USEC`; SIGTERM sends STOPPING=1. The
/// daemon's log, a file, carries no ANSI colour although `NO_COLOR` is empty (not set).
pub fn notify_ready_watchdog_and_stopping() {
    let mut lab = lab();
    let (socket, path) = datagram_socket(&lab, "notify.sock");
    lab.alg_env = vec![
        ("NOTIFY_SOCKET".into(), path.to_string_lossy().into_owned()),
        ("WATCHDOG_USEC".into(), WATCHDOG_USEC.into()),
        ("NO_COLOR".into(), String::new()),
    ];
    let (child, _, _) = lab.spawn_alg();
    lab.alg = Some(child);
    let mut state_at_ready = None;
    let seen = notifications_until(&socket, WITHIN, "READY=1", |text| {
        let ready = text.lines().any(|l| l == "READY=1");
        if ready {
            state_at_ready = Some(listening_with_table(&lab));
        }
        ready
    });
    assert_eq!(
        state_at_ready,
        Some((true, true)),
        "at READY=1 both listeners and the table must be up; notifications: {seen:#?}"
    );
    let ready = seen.last().expect("READY=1");
    assert!(
        ready
            .lines()
            .any(|l| l == "STATUS=0 sessions, 0 pinholes open"),
        "READY=1 with a STATUS= line: {ready:?}"
    );
    // Two keep-alives, each with the status, within a second of READY=1.
    let started = Instant::now();
    for _ in 0..2 {
        notifications_until(&socket, Duration::from_secs(1), "WATCHDOG=1", |text| {
            text.starts_with("WATCHDOG=1\nSTATUS=")
        });
    }
    assert!(started.elapsed() < Duration::from_secs(1));

    let status = lab.stop_alg("TERM", Duration::from_secs(5));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "exit status");
    let after: Vec<String> = std::iter::from_fn(|| next_datagram(&socket))
        .map(|d| String::from_utf8_lossy(&d).into_owned())
        .collect();
    assert!(
        after.iter().any(|t| t == "STOPPING=1"),
        "STOPPING=1 at SIGTERM: {after:#?}"
    );
    let log = fs::read(lab.dir.join("daemon.log")).expect("the daemon's log");
    assert!(!log.contains(&0x1b), "an ANSI escape in a log file");
}

/// Uploads `up/NAME` after a checkpoint; on a refusal, reports the reply and quits.
const UPLOAD_AFTER_CHECKPOINT: &str = r#"
ftp = RecordingFTP()
ftp.connect(HOST, 21, timeout=10)
ftp.login()
checkpoint("logged in")
try:
    with open(os.path.join(DIR, "upload.bin"), "rb") as f:
        ftp.storbinary("STOR up/" + NAME, f)
except ftplib.error_perm as e:
    pass
ftp.quit()
"#;

fn uploader(lab: &mut Lab, name: &str) -> PyClient {
    PyClient::in_client(lab, &format!("NAME = {name:?}\n{UPLOAD_AFTER_CHECKPOINT}"))
}

/// SIGHUP: `policy.read_only` turned on reaches a session that starts afterwards (its STOR gets
/// 550) and not the one already open (its STOR is stored); a file that does not parse is logged
/// and changes nothing. (A key a reload cannot apply: `sighup_hands_over_what_it_cannot_apply`.)
pub fn sighup_reloads_policy_for_new_sessions() {
    let mut lab = lab();
    lab.start_alg();
    let conf = lab.dir.join("ftp-alg.toml");
    let original = fs::read_to_string(&conf).expect("the daemon's configuration");

    let mut old = uploader(&mut lab, "old.bin");
    old.replies_until("logged in");
    fs::write(&conf, merge_toml(&original, "[policy]\nread_only = true\n"))
        .expect("rewrite the configuration");
    signal_alg(&lab, "HUP");
    let applied = wait_for_log(&lab, "SIGHUP: configuration reloaded", 1, WITHIN);
    assert!(
        applied[0].contains("policy.read_only"),
        "the applied keys: {applied:?}"
    );

    let mut new = uploader(&mut lab, "new.bin");
    new.replies_until("logged in");
    new.resume();
    let replies = new.finish();
    assert!(
        replies.iter().any(|r| r.starts_with("550")),
        "a new session's STOR is refused: {replies:#?}"
    );
    old.resume();
    let replies = old.finish();
    assert!(
        replies.iter().any(|r| r.starts_with("226")),
        "the session opened before the reload keeps its policy: {replies:#?}"
    );
    let stored = lab.ftp_root().join("up");
    assert!(stored.join("old.bin").exists(), "old.bin was stored");
    assert!(!stored.join("new.bin").exists(), "new.bin was not stored");

    // A broken file: logged, and the running configuration (read-only) stays.
    fs::write(&conf, "[proxy\n").expect("write a broken configuration");
    signal_alg(&lab, "HUP");
    wait_for_log(&lab, "configuration not reloaded", 1, WITHIN);
    let mut after = uploader(&mut lab, "after.bin");
    after.replies_until("logged in");
    after.resume();
    let replies = after.finish();
    assert!(
        replies.iter().any(|r| r.starts_with("550")),
        "still read-only after a broken file: {replies:#?}"
    );
}

/// Stops the successor a reload started, by pid, also when the test fails.
struct Successor(Option<u32>);

impl Drop for Successor {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
}

/// A session that lists the directory after a checkpoint.
const LIST_AFTER_CHECKPOINT: &str = r#"
ftp = RecordingFTP()
ftp.connect(HOST, 21, timeout=10)
ftp.login()
checkpoint("logged in")
ftp.retrlines("LIST", lambda line: None)
ftp.quit()
"#;

/// SIGHUP after a change a reload cannot apply (here the port range): the daemon starts a new
/// process, which takes its listeners over and tells systemd it is the main process now
/// (`MAINPID=`, then `READY=1`); a new session is served by it, with a port of the new range,
/// while the session open before goes on in the old process, which exits 0 once it has ended.
pub fn sighup_hands_over_what_it_cannot_apply() {
    let mut lab = lab();
    let (socket, path) = datagram_socket(&lab, "notify.sock");
    lab.alg_env = vec![("NOTIFY_SOCKET".into(), path.to_string_lossy().into_owned())];
    let (child, _, _) = lab.spawn_alg();
    let old_pid = child.id();
    lab.alg = Some(child);
    notifications_until(&socket, WITHIN, "READY=1", |t| t.contains("READY=1"));
    let conf = lab.dir.join("ftp-alg.toml");
    let original = fs::read_to_string(&conf).expect("the daemon's configuration");

    let mut open = PyClient::in_client(&mut lab, LIST_AFTER_CHECKPOINT);
    open.replies_until("logged in");
    fs::write(
        &conf,
        merge_toml(
            &original,
            "[pinholes]\nport_min = 63000\nport_max = 63009\n",
        ),
    )
    .expect("rewrite the configuration");
    signal_alg(&lab, "HUP");
    let mut successor = Successor(None);
    let seen = notifications_until(&socket, WITHIN, "MAINPID=", |t| t.contains("MAINPID="));
    let announced = seen.last().expect("MAINPID=");
    let new_pid: u32 = announced
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("a pid in {announced:?}"));
    successor.0 = Some(new_pid);
    assert_ne!(new_pid, old_pid, "the main process must be a new one");
    assert!(
        announced.lines().any(|l| l == "READY=1"),
        "MAINPID= comes with READY=1: {announced:?}"
    );
    let handing = wait_for_log(&lab, "handing over to a new process", 1, WITHIN);
    assert!(
        handing[0].contains("pinholes.port_max") && handing[0].contains("pinholes.port_min"),
        "the keys that need a new process: {handing:?}"
    );

    // A new session: served by the new process, whose pinholes use the new range.
    let run = lab.client_session(Client::Curl, DataMode::Port, &[Op::Download]);
    assert!(
        run.status.success(),
        "a new session after the hand-over:\n{}",
        run.transcript
    );
    let log = fs::read_to_string(lab.dir.join("daemon.log")).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("rewrote active announcement") && l.contains(":6300")),
        "the new session's PORT names a port of the new range"
    );

    // The session opened before: still served, by the old process, which then leaves.
    open.resume();
    let replies = open.finish();
    assert!(
        replies.iter().any(|r| r.starts_with("226")),
        "the session open during the hand-over: {replies:#?}"
    );
    let status = lab
        .wait_alg(WITHIN)
        .expect("the old process exits once its last session has ended");
    assert_eq!(status.code(), Some(0), "the old process's exit status");
    let _ = Command::new("kill")
        .args(["-TERM", &new_pid.to_string()])
        .status();
    successor.0 = None;
    let deadline = Instant::now() + WITHIN;
    while Path::new(&format!("/proc/{new_pid}")).exists() {
        assert!(Instant::now() < deadline, "the new process did not stop");
        sleep(Duration::from_millis(50));
    }
}

/// Holds a passive announcement open (a pinhole waits for it) at a checkpoint.
const PASV_HELD: &str = r#"
ftp = RecordingFTP()
ftp.connect(HOST, 21, timeout=10)
ftp.login()
ftp.voidcmd("TYPE I")
ftp.sendcmd("PASV")
checkpoint("announced")
ftp.quit()
"#;

/// A firewall reload (`nft flush ruleset`, then the policy loaded again) deletes ftp-alg's
/// table: the daemon loads it again within [`HEALED_WITHIN`], logs it once with the open pinhole
/// counted as lost, and a new passive download through it works. Then one of its chains is
/// flushed: that is noticed and repaired as well.
pub fn a_flushed_table_is_loaded_again() {
    // Reverse mode: the held session's control connection is not translated. A gateway's
    // redirected one can be cut by the flush itself, if a packet of it (a delayed ACK) crosses
    // G while no NAT chain is registered: that is the flush's doing, not the daemon's.
    let mut lab = lab_in(Topology::Reverse(Family::V4));
    lab.start_alg();
    let mut held = PyClient::in_client(&mut lab, PASV_HELD);
    held.replies_until("announced");
    assert_eq!(lab.pinholes().len(), 1, "one pinhole waits");

    let flushed = Instant::now();
    lab.nft(&["flush", "ruleset"]);
    lab.load_policy(Setup::Alg);
    let deadline = flushed + HEALED_WITHIN;
    while !listening_with_table(&lab).1 {
        assert!(
            Instant::now() < deadline,
            "the table is not back within {HEALED_WITHIN:?}"
        );
        sleep(Duration::from_millis(20));
    }
    eprintln!("table back {:?} after the flush", flushed.elapsed());
    let logged = wait_for_log(&lab, "loaded it again", 1, WITHIN);
    assert_eq!(logged.len(), 1, "one log line: {logged:?}");
    assert!(
        logged[0].contains("was deleted") && logged[0].contains("1 open pinholes were lost"),
        "{logged:?}"
    );
    held.resume();
    held.finish();

    let run = lab.client_session(Client::Curl, DataMode::Pasv, &[Op::Download]);
    assert!(
        run.status.success(),
        "a passive download after the table came back\n{}",
        run.transcript
    );
    assert_same_bytes(
        "download",
        &lab.read(&lab.download_path()),
        &lab.read(&lab.served_path()),
    );
    ServerLog::read(&lab).assert_control_from(lab.addrs().server_sees);

    // A change that leaves the table in place but empties a chain is noticed too.
    lab.nft(&["flush", "chain", "inet", "ftp_alg", "pinhole_prerouting"]);
    let changed = wait_for_log(&lab, "was changed under ftp-alg", 1, HEALED_WITHIN);
    assert!(changed[0].contains("loaded it again"), "{changed:?}");
    let chain = must(lab.exec(
        &lab.gateway_ns(),
        &[
            "nft",
            "list",
            "chain",
            "inet",
            "ftp_alg",
            "pinhole_prerouting",
        ],
    ));
    assert!(
        chain.contains("@pin_v4"),
        "the chain's rules are back:\n{chain}"
    );
}

/// One journal entry as journald's native protocol sends it: `KEY=value` lines, or `KEY`, a
/// 64-bit little-endian length and that many bytes of value.
fn journal_fields(mut datagram: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    while let Some(end) = datagram.iter().position(|b| *b == b'\n') {
        let line = &datagram[..end];
        if let Some(eq) = line.iter().position(|b| *b == b'=') {
            fields.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
            datagram = &datagram[end + 1..];
            continue;
        }
        let rest = &datagram[end + 1..];
        let Some(len) = rest.get(..8) else { break };
        let len = u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize;
        let Some(value) = rest.get(8..8 + len) else {
            break;
        };
        fields.push((
            String::from_utf8_lossy(line).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
        datagram = rest.get(8 + len + 1..).unwrap_or_default();
    }
    fields
}

/// Sets `JOURNAL_STREAM` for the daemon to name its stderr, the log file (created here); the
/// log's path.
fn journal_stream(lab: &mut Lab) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let log = lab.dir.join("daemon.log");
    drop(create(&log));
    let meta = fs::metadata(&log).expect("stat the log");
    lab.alg_env = vec![(
        "JOURNAL_STREAM".into(),
        format!("{}:{}", meta.dev(), meta.ino()),
    )];
    log
}

/// A prefix for [`Lab::alg_prefix`]: `script` run by sh in a private mount namespace with
/// `args` as $0, $1, ..., then the daemon's command line as its remaining arguments.
fn in_mount_namespace(script: &str, args: &[&str]) -> Vec<String> {
    [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
    ]
    .iter()
    .chain(args)
    .map(|a| (*a).to_owned())
    .collect()
}

/// The value of `key` in a journal entry.
fn field(entry: &[(String, String)], key: &str) -> Option<String> {
    entry.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

/// Reads journal entries (keeping every datagram in `datagrams`) until one whose MESSAGE
/// satisfies `wanted`, failing after [`WITHIN`].
fn journal_entry(
    socket: &UnixDatagram,
    datagrams: &mut Vec<Vec<u8>>,
    what: &str,
    wanted: impl Fn(&str) -> bool,
) -> Vec<(String, String)> {
    let deadline = Instant::now() + WITHIN;
    loop {
        if let Some(d) = next_datagram(socket) {
            datagrams.push(d);
        }
        let entries: Vec<Vec<(String, String)>> =
            datagrams.iter().map(|d| journal_fields(d)).collect();
        if let Some(entry) = entries
            .iter()
            .find(|e| field(e, "MESSAGE").is_some_and(|m| wanted(&m)))
        {
            return entry.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {what} in the journal: {entries:#?}"
        );
    }
}

/// With `JOURNAL_STREAM` naming its stderr, the daemon writes to journald's native socket
/// (here the test's own socket, at /run/systemd/journal/socket in a private mount namespace):
/// each entry with its syslog priority (info 6, warn 4) and a session's warning with the
/// session's span fields (`F_ID`, `F_CLIENT`); nothing goes to stderr.
pub fn journal_gets_priorities_and_session_fields() {
    if !Path::new("/run/systemd").is_dir() {
        eprintln!("skipped: /run/systemd does not exist to mount the test's journal socket over");
        return;
    }
    let mut lab = lab();
    let (socket, path) = datagram_socket(&lab, "journal.sock");
    let log = journal_stream(&mut lab);
    lab.alg_prefix = in_mount_namespace(
        "mount -t tmpfs tmpfs /run/systemd && mkdir /run/systemd/journal \
         && ln -s \"$0\" /run/systemd/journal/socket && exec \"$@\"",
        &[&path.to_string_lossy()],
    );
    let (child, _, _) = lab.spawn_alg();
    lab.alg = Some(child);
    let mut datagrams = Vec::new();
    let listening = journal_entry(&socket, &mut datagrams, "`listening on`", |message| {
        message.starts_with("listening on")
    });
    assert_eq!(
        field(&listening, "PRIORITY").as_deref(),
        Some("6"),
        "info is 6"
    );
    assert_eq!(
        field(&listening, "SYSLOG_IDENTIFIER").as_deref(),
        Some("ftp-alg")
    );
    // A connection to the listener that was not redirected: a warning in the session's span.
    must(lab.exec(
        &lab.gateway_ns(),
        &[
            "python3",
            "-c",
            "import socket; s = socket.create_connection(('127.0.0.1', 2121), timeout=5); s.recv(100)",
        ],
    ));
    let warning = journal_entry(&socket, &mut datagrams, "a session warning", |message| {
        message.contains("connection was not redirected")
    });
    assert_eq!(
        field(&warning, "PRIORITY").as_deref(),
        Some("4"),
        "{warning:#?}"
    );
    assert_eq!(
        field(&warning, "F_ID").as_deref(),
        Some("1"),
        "{warning:#?}"
    );
    assert!(
        field(&warning, "F_CLIENT").is_some_and(|c| c.starts_with("127.0.0.1:")),
        "{warning:#?}"
    );
    let stderr = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !stderr.contains("listening on"),
        "with the journal, nothing goes to stderr: {stderr}"
    );
}

/// `pinholes.ct_mark_mask = 0x0000ffff` on a gateway whose ruleset gives connmark bit 16 a
/// meaning of its own: a chain at priority mangle (after conntrack, before
/// ftp-alg's nat chains) marks every connection 0x00010000 before
/// ftp-alg's table sees it, and the policy's accept lines require that bit as well as
/// ftp-alg's mark in its own bits (`ct mark and 0x0001ffff == 0x0001f7a0`). Passive and active
/// downloads work, so ftp-alg kept bit 16 (control connection, both data connections) and
/// matched its mark under the mask (the source translation of the passive data connection).
pub fn masked_ct_mark_keeps_the_other_bits() {
    let mut lab = premarked_lab("[pinholes]\nct_mark_mask = 0x0000ffff\n");
    for mode in [DataMode::Pasv, DataMode::Port] {
        let run = lab.client_session(Client::Curl, mode, &[Op::Download]);
        assert!(
            run.status.success(),
            "{mode:?} download with a masked mark\n{}",
            run.transcript
        );
        assert_same_bytes(
            "download",
            &lab.read(&lab.download_path()),
            &lab.read(&lab.served_path()),
        );
    }
    let forward = must(lab.exec(
        &lab.gateway_ns(),
        &["nft", "list", "chain", "inet", "gateway", "forward"],
    ));
    let matched = forward
        .lines()
        .find(|l| l.contains("0x0001f7a0"))
        .unwrap_or_else(|| panic!("no masked rule in\n{forward}"));
    assert!(
        !matched.contains("packets 0 "),
        "data connections went through the masked rule: {matched}"
    );
}

/// The negative control of [`masked_ct_mark_keeps_the_other_bits`]: with the default mask (all
/// 32 bits) ftp-alg overwrites bit 16, and the same ruleset drops the control connection.
pub fn full_ct_mark_overwrites_the_other_bits() {
    let mut lab = premarked_lab("");
    let run = lab.client_session(Client::Curl, DataMode::Pasv, &[Op::Download]);
    assert!(
        !run.status.success(),
        "the session went through although ftp-alg overwrote bit 16\n{}",
        run.transcript
    );
}

/// A gateway lab whose policy accepts ftp-alg's connections only with connmark bit 16 set too,
/// and a chain that sets it on every connection; the daemon runs with `alg_config`.
fn premarked_lab(alg_config: &str) -> Lab {
    const MASKED_RULE: &str = "ct mark and 0x0001ffff == 0x0001f7a0 counter accept";
    let mut lab = lab();
    let policy = fs::read_to_string(POLICY)
        .expect("read the shipped policy")
        .replace(MARK_RULE, MASKED_RULE);
    let policy_path = lab.dir.join("masked-policy.nft");
    fs::write(&policy_path, policy).expect("write the masked policy");
    lab.nft(&["delete", "table", "inet", "gateway"]);
    lab.nft(&["-f", &policy_path.to_string_lossy()]);
    lab.nft(&[
        "add table inet premark; add chain inet premark pre { type filter hook prerouting \
         priority mangle; policy accept; }; add rule inet premark pre ct mark set ct mark or 0x00010000",
    ]);
    lab.alg_config = alg_config.to_owned();
    lab.start_alg();
    lab
}

/// systemd's journal daemon.
const JOURNALD: &str = "/lib/systemd/systemd-journald";

/// Kills the journald a test started when the test ends, however it ends.
struct Journald(PathBuf);

impl Journald {
    /// Its process id, once it has written it.
    fn pid(&self) -> Option<String> {
        fs::read_to_string(&self.0)
            .ok()
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
    }

    /// `journalctl ARGS -o json` in journald's mount namespace: one entry per line.
    fn entries(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let Some(pid) = self.pid() else {
            return Vec::new();
        };
        let out = Command::new("nsenter")
            .args(["-t", &pid, "-m", "journalctl", "--no-pager", "-o", "json"])
            .args(args)
            .output()
            .expect("run journalctl");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").arg(pid).status();
        }
    }
}

/// A real systemd-journald (not PID 1's: started by the test in a private mount namespace,
/// with tmpfs over /run/systemd, /run/log and /var/log/journal so nothing of the host's is
/// touched) receives the daemon's events: `journalctl -p warning` lists the session's warning
/// and not the info lines, and `journalctl F_ID=1` finds the session by its span field.
pub fn journald_filters_by_priority_and_session() {
    if !Path::new(JOURNALD).exists() || !Path::new("/run/log").is_dir() {
        eprintln!("skipped: no {JOURNALD} (package systemd), or no /run/log to mount over");
        return;
    }
    let mut lab = lab();
    journal_stream(&mut lab);
    let pidfile = lab.dir.join("journald.pid");
    let journald = Journald(pidfile.clone());
    lab.alg_prefix = in_mount_namespace(
        "mount -t tmpfs tmpfs /run/systemd && mount -t tmpfs tmpfs /run/log \
         && { [ ! -d /var/log/journal ] || mount -t tmpfs tmpfs /var/log/journal; } \
         && mkdir /run/systemd/journal && { \"$1\" & echo $! > \"$0\"; } \
         && for i in $(seq 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done \
         && shift && exec \"$@\"",
        &[&pidfile.to_string_lossy(), JOURNALD],
    );
    let (child, _, _) = lab.spawn_alg();
    lab.alg = Some(child);
    let message = |e: &serde_json::Value| e["MESSAGE"].as_str().unwrap_or_default().to_owned();
    let deadline = Instant::now() + WITHIN;
    while !journald
        .entries(&["-t", "ftp-alg"])
        .iter()
        .any(|e| message(e).starts_with("listening on"))
    {
        assert!(
            Instant::now() < deadline,
            "no `listening on` in the journal"
        );
        sleep(Duration::from_millis(100));
    }
    must(lab.exec(
        &lab.gateway_ns(),
        &[
            "python3",
            "-c",
            "import socket; s = socket.create_connection(('127.0.0.1', 2121), timeout=5); s.recv(100)",
        ],
    ));
    let deadline = Instant::now() + WITHIN;
    let warnings = loop {
        let warnings = journald.entries(&["-t", "ftp-alg", "-p", "warning"]);
        if warnings
            .iter()
            .any(|e| message(e).contains("connection was not redirected"))
        {
            break warnings;
        }
        assert!(
            Instant::now() < deadline,
            "no session warning in the journal"
        );
        sleep(Duration::from_millis(100));
    };
    assert!(
        warnings.iter().all(|e| e["PRIORITY"].as_str() <= Some("4")),
        "-p warning lists only warnings and worse: {warnings:#?}"
    );
    let session = journald.entries(&["-t", "ftp-alg", "F_ID=1"]);
    assert!(
        !session.is_empty()
            && session.iter().all(|e| e["F_CLIENT"]
                .as_str()
                .is_some_and(|c| c.starts_with("127.0.0.1:"))),
        "the session's entries by F_ID: {session:#?}"
    );
}
