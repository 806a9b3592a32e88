//! Faults end to end: what happens to transfers, pinholes and sessions when the daemon is
//! killed or stopped, when nft or netlink fails at run time, when the upstream server cannot be
//! reached and when a client vanishes. One `pub fn` per `#[test]` of `tests/e2e_faults.rs`, all with
//! vsftpd and Python clients (see [`PyClient`]).
//!
//! The promise under test is DESIGN.md's: data runs in the kernel, so a transfer outlives the
//! daemon; every pinhole has a kernel timeout, so a crashed daemon leaks nothing for long; and a
//! fault of one session or one pinhole is answered with an FTP reply, never with the daemon's
//! end.

use std::os::unix::process::ExitStatusExt;

use super::edge::{assert_replies, PyClient};
use super::*;

/// vsftpd's pace for the downloads that must still run when the fault strikes: data.bin
/// (1 MiB) takes 5.2 s, longer than [`SHORT_TIMEOUT_SECS`].
const SLOW_DOWNLOAD: &str = "anon_max_rate=200000\n";
/// The pinhole lifetime of the SIGKILL test: short, so that the test sees it run out.
const SHORT_TIMEOUT_SECS: u64 = 3;
/// A port of the server's host where nothing listens.
const DEAD_PORT: u16 = 2199;
/// `proxy.connect_timeout_secs` of the unreachable-upstream test.
const CONNECT_TIMEOUT_SECS: u64 = 2;
/// How long a daemon may take to exit after SIGTERM once nothing holds it (its grace period
/// over or its last session ended): a bound for a loaded machine, not a measurement; the
/// grace periods it must be told from are 20 s.
const STOPS_WITHIN: Duration = Duration::from_secs(10);
/// The SIGTERM tests that are not about the grace period keep it short.
const SHORT_GRACE: &str = "[limits]\nshutdown_grace_secs = 1\n";
/// What the nft wrapper says on stderr when it refuses a pinhole transaction.
const NFT_REFUSAL: &str = "e2e nft wrapper: pinhole transaction refused on purpose";
/// The reply-like event the scripts emit once the daemon's end of the control connection is
/// gone (ftplib and [`PyClient`]'s raw `Control` raise `EOFError`).
const CLOSED: &str = "(closed)";
/// The first replies of [`DOWNLOAD_UNDER_WAY`], up to its checkpoint.
const DOWNLOAD_STARTED: [&str; 5] = [
    "220 (vsFTPd 3.0.3)",
    "230 Login successful.",
    "200 Switching to Binary mode.",
    "227",
    "150 Opening BINARY mode data connection for data.bin (1048576 bytes).",
];

/// The daemon is killed with SIGKILL while a download runs through its pinhole (reverse mode,
/// so the data connection is translated both ways). The download completes byte for byte,
/// since the translation lives in conntrack; the control connection dies with the daemon. The
/// pinhole the daemon could not remove runs out by its kernel timeout while the data still
/// flows. A restarted daemon replaces the table the dead one left, and serves a new session.
pub fn daemon_killed_during_a_transfer() {
    let mut lab = lab_with(Topology::Reverse(Family::V4), SLOW_DOWNLOAD, |_| {
        format!("[pinholes]\ntimeout_secs = {SHORT_TIMEOUT_SECS}\n")
    });
    let mut client = download_under_way(&mut lab, FINISH_DOWNLOAD);

    let killed = Instant::now();
    let status = lab
        .stop_alg("KILL", Duration::from_secs(2))
        .expect("the daemon still runs 2 s after SIGKILL");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the daemon's end");
    let left = table_handle(&lab).expect("SIGKILL leaves the daemon's table in the kernel");
    let orphans = lab.pinholes();
    assert_eq!(
        orphans.len(),
        1,
        "the dead daemon's pinhole, left to its kernel timeout: {orphans:#?}"
    );
    client.resume();

    by(
        killed + Duration::from_secs(SHORT_TIMEOUT_SECS + 2),
        "the dead daemon's pinhole runs out by its kernel timeout",
        || lab.pinholes().is_empty(),
    );
    assert!(
        !lab.dir.join("download.took").exists(),
        "the download ended before its pinhole ran out: the test shows less than it should"
    );
    download_completes(&lab, client);

    lab.start_alg();
    let replaced = table_handle(&lab);
    assert!(
        replaced.as_ref().is_some_and(|h| *h != left),
        "the restarted daemon must replace the dead one's table (handle {left}), not keep it: \
         handle now {replaced:?}"
    );
    let run = lab.client_session(Client::Ftplib, DataMode::Pasv, &[Op::List]);
    assert!(
        run.status.success() && run.stdout.contains(DATA_FILE),
        "a listing through the restarted daemon\n{}",
        run.transcript
    );
    lab.assert_no_pinholes_left();
}

/// The rest of the download once the daemon is gone, into download.bin, and how long it took;
/// then the transfer's final reply, which never comes, since the control connection goes with
/// the daemon. A data connection that fails is reported as a reply, so that the test says how.
const FINISH_DOWNLOAD: &str = r#"
with data, open(os.path.join(DIR, "download.bin"), "wb") as f:
    f.write(first)
    try:
        while chunk := data.recv(1 << 16):
            f.write(chunk)
    except OSError as e:
        emit(reply="data connection: " + type(e).__name__)
took("download", start)
until_closed(ftp.getmultiline)
"#;

/// With `pinholes.backend = "nft"`, `pinholes.nft` names a wrapper that runs the real nft to
/// load the table (`-f -`) and to list it, but refuses every pinhole transaction (`-j -f -`),
/// as nft does when the kernel runs out of memory or another program has broken the table.
/// Like nft, the wrapper reads its whole input before it fails: one that exits first fails the
/// daemon's write to its stdin (EPIPE), and the daemon then logs that instead of what nft said.
pub fn nft_failing_at_run_time() {
    let nft = find_tool("nft").expect("preflight found nft");
    let wrapper = format!(
        "#!/bin/sh\n\
         if [ \"$1\" = -j ] && [ \"$2\" = -f ]; then\n\
         \tcat >/dev/null\n\
         \techo '{NFT_REFUSAL}' >&2\n\
         \texit 1\n\
         fi\n\
         exec {} \"$@\"\n",
        nft.display()
    );
    pinholes_refused("nft", &wrapper, &[NFT_REFUSAL]);
}

/// With `pinholes.backend = "netlink"`, the kernel itself refuses every pinhole: the nft
/// wrapper loads the daemon's table with its pin sets renamed, as if another program had
/// broken the table, so each pinhole's first element names a set that does not exist
/// (ENOENT). The daemon logs which element the kernel refused and why.
pub fn netlink_failing_at_run_time() {
    let nft = find_tool("nft").expect("preflight found nft");
    let wrapper = format!(
        "#!/bin/sh\n\
         if [ \"$1\" = -f ] && [ \"$2\" = - ]; then\n\
         \tsed 's/pin_v\\([46]\\)/gone_v\\1/g' | {nft} -f -\n\
         \texit\n\
         fi\n\
         exec {nft} \"$@\"\n",
        nft = nft.display()
    );
    pinholes_refused(
        "netlink",
        &wrapper,
        &[
            "netlink: add element inet ftp_alg pin_v4",
            "No such file or directory",
        ],
    );
}

/// The daemon runs with `pinholes.backend = backend` and `pinholes.nft` naming the shell script
/// `wrapper`, which makes every pinhole fail. PASV and PORT each get 425 and neither
/// announcement reaches the client or the server; the session goes on, a second one is
/// accepted, and the daemon logs the failure, with each of `complaint`, once per announcement.
fn pinholes_refused(backend: &str, wrapper: &str, complaint: &[&str]) {
    let mut lab = lab_with(Topology::Gateway(Family::V4), "", |lab| {
        let path = lab.dir.join("nft-wrapper");
        fs::write(&path, wrapper).expect("write the nft wrapper");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        format!(
            "[pinholes]\nbackend = \"{backend}\"\nnft = \"{}\"\n",
            path.display()
        )
    });
    let replies = script(&mut lab, PINHOLES_REFUSED).finish();
    let refused = "425 Can't open data connection (firewall).";
    assert_replies(
        "replies",
        &replies,
        &[
            "220 (vsFTPd 3.0.3)",
            "230 Login successful.",
            refused,
            refused,
            "200 NOOP ok.",
            "220 (vsFTPd 3.0.3)",
            "221 Goodbye.",
            "221 Goodbye.",
        ],
    );
    let log = ServerLog::read(&lab);
    assert_eq!(
        log.commands(),
        ["USER anonymous", "PASV", "NOOP", "QUIT", "QUIT"],
        "what vsftpd received: the PORT whose pinhole failed must not reach it"
    );
    assert!(
        log.responses().iter().any(|r| r.starts_with("227 ")),
        "vsftpd answered PASV: the 425 must be ftp-alg's"
    );
    let failures = daemon_log_lines(&lab, "cannot open pinhole");
    assert!(
        failures.len() == 2
            && failures
                .iter()
                .all(|l| complaint.iter().all(|c| l.contains(c))),
        "the daemon must log {complaint:?} once for PASV and once for PORT: {failures:#?}"
    );
    assert_daemon_runs(&mut lab);
    lab.assert_no_pinholes_left();
}

/// Login, PASV and PORT (each answered 425), NOOP, and a second session while the first is
/// still open.
const PINHOLES_REFUSED: &str = r#"
c = Control()
c.command("USER anonymous")
c.command("PASV")
listener, port = c.listen()
c.send(port)
c.reply()
c.command("NOOP")
Control().command("QUIT")
c.command("QUIT")
"#;

/// Reverse mode with `proxy.upstream` on a port of the server's host where nothing listens:
/// the client gets 421 at once. Then the server's host drops SYNs to that port: the client gets
/// 421 after `proxy.connect_timeout_secs`, and again on the next connection, which shows that
/// the daemon still serves.
pub fn upstream_unreachable() {
    let mut lab = lab_with(Topology::Reverse(Family::V4), "", |lab| {
        format!(
            "[proxy]\nupstream = \"{}\"\nconnect_timeout_secs = {CONNECT_TIMEOUT_SECS}\n",
            SocketAddr::new(lab.addrs().server, DEAD_PORT)
        )
    });
    let mut client = script(&mut lab, UNREACHABLE);
    let refused = "421 Service not available: cannot reach the FTP server.";
    assert_replies("refused", &client.replies_until("drop"), &[refused, CLOSED]);
    drop_syns_to_dead_port(&lab);
    client.resume();
    assert_replies(
        "dropped",
        &client.finish(),
        &[refused, CLOSED, refused, CLOSED],
    );

    // Each 421 is timed against the connect timeout alone: the refused one comes before it
    // could run out, the dropped ones not before it has. Any later is still the timeout's
    // doing (the kernel would retry a SYN for a minute), however loaded the machine.
    let timeout = CONNECT_TIMEOUT_SECS as f64;
    let refused_within = took(&lab, "refused");
    assert!(
        refused_within < timeout,
        "a refused upstream must be answered at once, not after {refused_within} s"
    );
    for name in ["dropped", "again"] {
        let t = took(&lab, name);
        assert!(
            t >= timeout,
            "{name}: 421 after {t} s, before the {timeout} s connect timeout"
        );
    }
    let unreachable = daemon_log_lines(&lab, "upstream server unreachable");
    let why = [
        "Connection refused",
        "connect timed out",
        "connect timed out",
    ];
    assert!(
        unreachable.len() == why.len() && unreachable.iter().zip(why).all(|(l, w)| l.contains(w)),
        "the daemon must log each unreachable upstream with its reason, {why:?}: {unreachable:#?}"
    );
    assert_daemon_runs(&mut lab);
}

/// Many control connections to an upstream that refuses, then many at once to one that drops
/// SYNs, so each waits out the connect timeout: every one is answered 421, and the daemon gets
/// back to exactly the file descriptors it held before the first one, with no session left.
/// A leaked socket, or a session task that never ends (it holds its client's socket and its
/// place among the daemon's sessions), would keep either count up. Threads are not counted:
/// the daemon's single-threaded runtime runs every task on one thread, so they cannot leak.
pub fn unreachable_upstreams_leak_nothing() {
    let mut lab = lab_with(Topology::Reverse(Family::V4), "", |lab| {
        format!(
            "[proxy]\nupstream = \"{}\"\nconnect_timeout_secs = {CONNECT_TIMEOUT_SECS}\n\
             [limits]\nmax_sessions_per_client = {DROPPED_BURST}\n",
            SocketAddr::new(lab.addrs().server, DEAD_PORT)
        )
    });
    let before = daemon_resources(&lab);
    assert_eq!(before.sessions, 0, "{before:?}");
    let mut client = script(
        &mut lab,
        &format!("REFUSED = {REFUSED_BURST}\nDROPPED = {DROPPED_BURST}\n{UNREACHABLE_BURSTS}"),
    );
    assert_eq!(
        client.replies_until("drop"),
        [format!("{REFUSED_BURST} x 421")],
        "every refused upstream is answered 421"
    );
    let after_refused = back_to(&lab, before, "the refused burst");
    drop_syns_to_dead_port(&lab);
    client.resume();
    assert_eq!(
        client.finish(),
        [format!("{DROPPED_BURST} x 421")],
        "every upstream that never answers is answered 421"
    );
    let after_dropped = back_to(&lab, before, "the timed-out burst");
    println!(
        "daemon: at start {before:?}, after {REFUSED_BURST} refused {after_refused:?}, after \
         {DROPPED_BURST} timed out {after_dropped:?}"
    );
    assert_daemon_runs(&mut lab);
}

/// Sequential control connections of [`UNREACHABLE_BURSTS`] to a refusing upstream.
const REFUSED_BURST: usize = 200;
/// Concurrent control connections of [`UNREACHABLE_BURSTS`] to an upstream that drops SYNs.
const DROPPED_BURST: usize = 50;

/// [`REFUSED_BURST`] connections one after the other, a checkpoint at which the test drops
/// SYNs to the upstream, then [`DROPPED_BURST`] at once. Each burst reports how many
/// connections were answered 421 and then closed.
const UNREACHABLE_BURSTS: &str = r#"
import threading

def answered_421():
    try:
        with socket.create_connection((HOST, 21), timeout=10) as s:
            got = b""
            while chunk := s.recv(4096):
                got += chunk
        return got.startswith(b"421 ")
    except OSError:
        return False

ok = sum(answered_421() for _ in range(REFUSED))
emit(reply=f"{ok} x 421")
checkpoint("drop")
results = []
threads = [threading.Thread(target=lambda: results.append(answered_421())) for _ in range(DROPPED)]
for t in threads:
    t.start()
for t in threads:
    t.join()
emit(reply=f"{sum(results)} x 421")
"#;

/// What a daemon could leak: its open file descriptors (from /proc), and its sessions (from
/// `ftp-alg status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resources {
    fds: usize,
    sessions: u64,
}

fn daemon_resources(lab: &Lab) -> Resources {
    let status = must(lab.alg_cli(&["status", "--json"]));
    let status: serde_json::Value = serde_json::from_str(&status)
        .unwrap_or_else(|e| panic!("status --json printed {status:?}: {e}"));
    let sessions = status["sessions"]
        .as_u64()
        .unwrap_or_else(|| panic!("no session count: {status:#}"));
    // Read after `status` has returned: its control connection is then no longer counted.
    let pid = lab.alg.as_ref().expect("the daemon was started").id();
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's fds")
        .count();
    Resources { fds, sessions }
}

/// Waits, up to 10 s, until the daemon holds what it held `before` (the connections of a burst
/// may still be closing when the client has its answers), and says which counts stayed up.
fn back_to(lab: &Lab, before: Resources, after: &str) -> Resources {
    let mut last = before;
    let settled = wait_for(Duration::from_secs(10), || {
        last = daemon_resources(lab);
        (last == before).then_some(last)
    });
    settled.unwrap_or_else(|| {
        panic!("after {after} the daemon still holds {last:?}, not {before:?}, 10 s later")
    })
}

/// The server's host drops SYNs to [`DEAD_PORT`] from now on.
fn drop_syns_to_dead_port(lab: &Lab) {
    must(lab.exec(
        &lab.server_ns(),
        &[
            "nft",
            &format!(
                "add table inet faults; \
                 add chain inet faults input {{ type filter hook input priority filter; }}; \
                 add rule inet faults input tcp dport {DEAD_PORT} drop"
            ),
        ],
    ));
}

/// Three control connections, each answered and closed by the daemon, timed; the test drops
/// SYNs to the upstream at the checkpoint.
const UNREACHABLE: &str = r#"
def dial(name):
    start = time.monotonic()
    until_closed(Control().reply)
    took(name, start)

dial("refused")
checkpoint("drop")
dial("dropped")
dial("again")
"#;

/// The client is killed (SIGKILL) while its download runs: the daemon sees its control
/// connection end, ends the session, and removes the session's pinhole itself, long before its
/// kernel timeout.
pub fn client_vanishing_mid_transfer() {
    let mut lab = lab_with(Topology::Gateway(Family::V4), SLOW_DOWNLOAD, |_| {
        String::new()
    });
    download_under_way(&mut lab, "").vanish();
    let vanished = Instant::now();
    // Well within the harness's `pinholes.timeout_secs` (30 s): the daemon's doing, not the
    // kernel's, with room for a loaded machine.
    let deadline = vanished + Duration::from_secs(10);
    by(deadline, "the vanished client's pinhole is removed", || {
        lab.pinholes().is_empty()
    });
    by(deadline, "the daemon logs the end of session 1", || {
        daemon_log_lines(&lab, "session{id=1 ")
            .iter()
            .any(|l| l.ends_with("session ended"))
    });
}

/// SIGTERM with a session open and its pinhole waiting: the daemon deletes its table, with
/// the pinhole in it, and exits 0; the data connection the pinhole was for is dropped.
pub fn sigterm_removes_every_pinhole() {
    let mut lab = lab_with(Topology::Gateway(Family::V4), "", |_| {
        SHORT_GRACE.to_owned()
    });
    let mut client = script(&mut lab, OPEN_SESSION);
    assert_replies(
        "before SIGTERM",
        &client.replies_until("open"),
        &["220 (vsFTPd 3.0.3)", "230 Login successful.", "227"],
    );
    let pinholes = lab.pinholes();
    assert!(
        matches!(&pinholes[..], [p] if p.state == "waiting"),
        "one pinhole waiting for PASV's connection: {pinholes:#?}"
    );
    let status = lab
        .stop_alg("TERM", STOPS_WITHIN)
        .expect("the daemon still runs after SIGTERM");
    assert_eq!(status.code(), Some(0), "the daemon's exit status");
    // The chains stay (see `sigterm_during_a_transfer`), the pinholes go.
    assert!(
        table_handle(&lab).is_some(),
        "the daemon's table (its NAT chains) must stay after SIGTERM"
    );
    let left = lab.pinholes();
    assert!(left.is_empty(), "pinholes left after SIGTERM: {left:#?}");
    let shutdown = "shutting down: removing every pinhole";
    assert!(
        daemon_log_lines(&lab, shutdown)
            .iter()
            .filter(|l| l.contains("open_pinholes=1"))
            .count()
            == 1,
        "the daemon must log its shutdown with the pinhole it removes: {shutdown:?}"
    );
    client.resume();
    assert_replies(
        "the data connection PASV announced, dialled after SIGTERM",
        &client.finish(),
        &["data connection: timed out"],
    );
}

/// A session logged in, with a PASV pinhole waiting; after the checkpoint, the data connection
/// that PASV announced, dialled with a short timeout, since a dropped SYN is the expected end.
/// What becomes of the control connection is [`sigterm_during_a_transfer`]'s subject.
const OPEN_SESSION: &str = r#"
c = Control()
c.command("USER anonymous")
port = ftplib.parse227(c.command("PASV"))[1]
checkpoint("open")
try:
    socket.create_connection((HOST, port), timeout=2).close()
    emit(reply="data connection: accepted")
except TimeoutError:
    emit(reply="data connection: timed out")
"#;

/// README: on SIGTERM the daemon removes every pinhole, and transfers already under way go on,
/// since they live in conntrack (with their translation: the table's NAT chains stay, and
/// with them the kernel's NAT hooks). A download runs in gateway mode
/// (its data connection source-translated, its control connection redirected to the daemon)
/// when the daemon gets SIGTERM: the download must complete byte for byte, and the client must
/// see its control connection close.
pub fn sigterm_during_a_transfer() {
    let mut lab = lab_with(Topology::Gateway(Family::V4), SLOW_DOWNLOAD, |_| {
        SHORT_GRACE.to_owned()
    });
    let mut client = download_under_way(&mut lab, FINISH_DOWNLOAD);
    let status = lab
        .stop_alg("TERM", STOPS_WITHIN)
        .expect("the daemon still runs after SIGTERM");
    assert_eq!(status.code(), Some(0), "the daemon's exit status");
    client.resume();
    download_completes(&lab, client);
}

/// Helpers of the scripts here, after [`PyClient`]'s own prelude.
const PRELUDE: &str = r#"
import time

def took(name, start):
    """How long since `start`, in seconds, into DIR/name.took."""
    with open(os.path.join(DIR, name + ".took"), "w") as f:
        f.write(str(time.monotonic() - start))

def until_closed(read):
    """Reads replies until the daemon's end of the control connection is gone; reports a
    connection that fails instead (a reset, or no end within its timeout)."""
    try:
        while True:
            read()
    except EOFError:
        emit(reply="(closed)")
    except OSError as e:
        emit(reply="control connection: " + type(e).__name__)
"#;

/// A download of data.bin at [`SLOW_DOWNLOAD`]'s pace, stopped at a checkpoint once its data
/// flows, with the data socket in `data`, the first bytes in `first`, and its start in `start`.
/// Both connections time out after 5 s, which is long for a transfer that sends every few
/// milliseconds, and keeps a stalled one from taking the test's time.
const DOWNLOAD_UNDER_WAY: &str = r#"
ftp = RecordingFTP()
ftp.connect(HOST, 21, timeout=5)
ftp.login()
ftp.voidcmd("TYPE I")
start = time.monotonic()
data = ftp.transfercmd("RETR data.bin")
first = data.recv(1 << 16)
checkpoint("flowing")
"#;

/// A lab whose daemon starts with the configuration `alg_config` returns (given the lab, once
/// its files are written), and whose vsftpd has `vsftpd` at the end of its configuration.
/// `Setup::AlgStopped` only delays the daemon's start here: its policy's extra forward rule for
/// tcp/21 does not come into play, since a gateway's daemon redirects tcp/21 before the forward
/// hook, and a reverse proxy's client dials G itself.
fn lab_with(topology: Topology, vsftpd: &str, alg_config: impl FnOnce(&Lab) -> String) -> Lab {
    let mut lab = Lab::prepared(topology, Server::Vsftpd, Setup::AlgStopped, |_| {
        vsftpd.to_owned()
    });
    lab.alg_config = alg_config(&lab);
    lab.start_alg();
    lab
}

/// Starts [`DOWNLOAD_UNDER_WAY`] followed by `rest`, and returns the client at its checkpoint,
/// once the download is seen to run through exactly one pinhole, used by session 1.
fn download_under_way(lab: &mut Lab, rest: &str) -> PyClient {
    let mut client = script(lab, &format!("{DOWNLOAD_UNDER_WAY}{rest}"));
    assert_replies(
        "until the data flows",
        &client.replies_until("flowing"),
        &DOWNLOAD_STARTED,
    );
    let pinholes = lab.pinholes();
    assert!(
        matches!(&pinholes[..], [p] if p.state == "used" && p.session == 1),
        "one used pinhole of session 1 while the data flows: {pinholes:#?}"
    );
    client
}

/// A client of [`download_under_way`] and [`FINISH_DOWNLOAD`], resumed once the daemon is
/// gone: the download completes byte for byte, and the control connection is seen to close.
fn download_completes(lab: &Lab, client: PyClient) {
    assert_replies(
        "replies once the daemon is gone",
        &client.finish(),
        &[CLOSED],
    );
    assert_same_bytes(
        "download",
        &lab.read(&lab.download_path()),
        &lab.read(&lab.served_path()),
    );
}

/// `body` run as a client after [`PRELUDE`].
fn script(lab: &mut Lab, body: &str) -> PyClient {
    PyClient::in_client(lab, &format!("{PRELUDE}{body}"))
}

/// Waits until `done` holds, failing the test if it does not by `deadline`.
fn by(deadline: Instant, what: &str, mut done: impl FnMut() -> bool) {
    let within = deadline.saturating_duration_since(Instant::now());
    let held = wait_for(within, || done().then_some(()));
    assert!(held.is_some(), "not by the deadline: {what}");
}

/// The handle of the daemon's table in G; `None` when `nft list table inet ftp_alg` fails
/// because there is no such table.
fn table_handle(lab: &Lab) -> Option<String> {
    let out = lab
        .exec(
            &lab.gateway_ns(),
            &["nft", "-a", "list", "table", "inet", "ftp_alg"],
        )
        .output()
        .expect("run nft");
    if !out.status.success() {
        return None;
    }
    let listing = String::from_utf8_lossy(&out.stdout);
    let handle = listing
        .lines()
        .next()
        .and_then(|l| l.split_once("# handle "))
        .map(|(_, h)| h.trim().to_owned());
    Some(handle.unwrap_or_else(|| panic!("no table handle in {listing:?}")))
}

/// The lines of the daemon's log that contain `text`.
pub(super) fn daemon_log_lines(lab: &Lab, text: &str) -> Vec<String> {
    fs::read_to_string(lab.dir.join("daemon.log"))
        .expect("the daemon's log")
        .lines()
        .filter(|l| l.contains(text))
        .map(str::to_owned)
        .collect()
}

/// The seconds a script recorded with `took(name, ...)`.
fn took(lab: &Lab, name: &str) -> f64 {
    let path = lab.dir.join(format!("{name}.took"));
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {text:?}: {e}", path.display()))
}

/// A fault of one session or one pinhole must not end the daemon.
fn assert_daemon_runs(lab: &mut Lab) {
    let alg = lab.alg.as_mut().expect("the daemon was started");
    let exited = alg.try_wait().expect("try_wait");
    assert!(exited.is_none(), "the daemon has exited: {exited:?}");
}

/// SIGTERM with a grace period: the open session goes on (a listing, then QUIT) while no new
/// one is accepted, and the daemon exits as soon as it has ended, well within the period.
pub fn sigterm_lets_open_sessions_finish() {
    let mut lab = lab_with(Topology::Gateway(Family::V4), "", |_| {
        "[limits]\nshutdown_grace_secs = 20\n".to_owned()
    });
    let mut client = script(&mut lab, GRACEFUL_SESSION);
    assert_replies(
        "before SIGTERM",
        &client.replies_until("open"),
        &["220 (vsFTPd 3.0.3)", "230 Login successful."],
    );
    assert!(
        lab.stop_alg("TERM", Duration::from_millis(500)).is_none(),
        "the daemon must wait for the open session"
    );
    client.resume();
    assert_replies(
        "after SIGTERM",
        &client.finish(),
        &["new session refused", "200", "227", "150", "226", "221"],
    );
    let status = lab
        .wait_alg(STOPS_WITHIN)
        .expect("the daemon exits once its last session has ended, not after its 20 s grace");
    assert_eq!(status.code(), Some(0), "the daemon's exit status");
    assert!(
        lab.pinholes().is_empty(),
        "pinholes left after the shutdown"
    );
}

const GRACEFUL_SESSION: &str = r#"
ftp = RecordingFTP()
ftp.connect(HOST, 21, timeout=10)
ftp.login()
checkpoint("open")
try:
    socket.create_connection((HOST, 21), timeout=2).recv(100)
    emit(reply="new session accepted")
except OSError:
    emit(reply="new session refused")
ftp.retrlines("LIST", lambda line: None)
ftp.quit()
"#;

/// `nft flush ruleset` while a stopping daemon waits for its last session (a firewall manager
/// reloading its rules, an operator starting over) deletes ftp-alg's table, and the daemon no
/// longer loads it again (while it runs, `heal` does: see `e2e_service`). The daemon still stops
/// cleanly, exit status 0, with one log line saying the table was already gone: systemd must not
/// record a failed unit for it.
pub fn sigterm_after_a_ruleset_flush() {
    let mut lab = lab_with(Topology::Gateway(Family::V4), "", |_| {
        format!("[limits]\nshutdown_grace_secs = {FLUSH_GRACE_SECS}\n")
    });
    let mut client = script(&mut lab, HELD_SESSION);
    client.replies_until("open");
    assert!(
        lab.stop_alg("TERM", Duration::from_millis(500)).is_none(),
        "the daemon must wait for the open session"
    );
    // The flush also takes the redirect of the session's control connection with it: the
    // session can no longer end by itself, and the grace period runs out.
    lab.nft(&["flush", "ruleset"]);
    assert!(table_handle(&lab).is_none(), "the table is gone");
    let status = lab
        .wait_alg(Duration::from_secs(FLUSH_GRACE_SECS) + STOPS_WITHIN)
        .expect("the daemon exits once its grace period is over");
    client.vanish();
    assert_eq!(status.code(), Some(0), "the daemon's exit status");
    assert_eq!(
        daemon_log_lines(&lab, "table was already gone").len(),
        1,
        "the daemon must say why it removed nothing"
    );
    assert!(
        daemon_log_lines(&lab, "loaded it again").is_empty(),
        "a stopping daemon does not load its table again"
    );
}

/// The grace period of [`sigterm_after_a_ruleset_flush`].
const FLUSH_GRACE_SECS: u64 = 2;

/// A logged-in session held at a checkpoint.
const HELD_SESSION: &str = r#"
ftp = RecordingFTP()
ftp.connect(HOST, 21, timeout=10)
ftp.login()
checkpoint("open")
"#;
