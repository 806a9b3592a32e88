//! The operator's side end to end: every CLI command against a running daemon in G (status,
//! sessions list and kill, pinholes list, watch, close and flush), the metrics endpoint, JSON
//! logs without secrets, and what the CLI says when the daemon is not running or the caller is
//! not root. One `pub fn` per `#[test]` of `tests/e2e_operate.rs`; real vsftpd, a Python client.

use std::os::unix::fs::PermissionsExt;
use std::process::Output;

use serde_json::Value;

use super::edge::{assert_replies, PyClient};
use super::*;

/// The password the client logs in with; it must never reach the daemon's log.
const PASSWORD: &str = "s3cret-pass@example.org";
/// Where the daemon serves metrics, on G's own loopback.
const METRICS: &str = "127.0.0.1:9477";
/// What a killed session's client reads last.
const KILLED: &str = "421 Session closed by the operator.";

/// A logged-in client that asks for two passive endpoints, pausing after each, then reads
/// replies until the daemon closes the connection.
const HELD_SESSION: &str = r#"
c = Control()
c.command("USER anonymous")
c.command("PASS PASSWORD")
c.command("PASV")
checkpoint("pasv")
c.command("PASV")
checkpoint("pasv2")
try:
    while True:
        c.reply()
except EOFError:
    emit(reply="(closed)")
"#;

/// Every command of the operator's CLI against one running daemon, with a client session held
/// open in between; then its metrics and its log.
pub fn operator_cli_against_a_running_daemon() {
    let mut lab = Lab::prepared(
        Topology::Gateway(Family::V4),
        Server::Vsftpd,
        Setup::AlgStopped,
        |_| String::new(),
    );
    lab.alg_config = format!("[metrics]\nlisten = \"{METRICS}\"\n[log]\nformat = \"json\"\n");
    lab.start_alg();

    let status = json(&lab, &["status", "--json"]);
    assert_eq!(status["mode"], "gateway", "{status:#}");
    assert_eq!(status["sessions"], 0, "{status:#}");
    let human = must(lab.alg_cli(&["status"]));
    println!("$ ftp-alg status\n{human}");
    assert!(human.contains("mode:     gateway"), "{human}");
    assert!(
        human.contains(&format!("metrics:  http://{METRICS}/metrics")),
        "{human}"
    );

    let mut client = PyClient::in_client(&mut lab, &HELD_SESSION.replace("PASSWORD", PASSWORD));
    assert_replies(
        "login and PASV",
        &client.replies_until("pasv"),
        // The lab's vsftpd lets anonymous in at USER and answers PASS "230 Already logged
        // in": the password still goes through the daemon, which must not log it.
        &["220", "230", "230", "227"],
    );
    let sessions = json(&lab, &["sessions", "list", "--json"]);
    let [session] = sessions.as_array().expect("an array").as_slice() else {
        panic!("one session: {sessions:#}");
    };
    assert_eq!(session["user"], "anonymous", "{session:#}");
    assert_eq!(session["logged_in"], true, "{session:#}");
    assert!(
        session["client"]
            .as_str()
            .is_some_and(|c| c.starts_with(&format!("{}:", lab.addrs().client))),
        "{session:#}"
    );
    let session_id = session["id"].as_u64().expect("a session id");
    let pinhole_id = match session["pinholes"].as_array().map(Vec::as_slice) {
        Some([id]) => id.as_u64().expect("a pinhole id"),
        _ => panic!("the session holds one pinhole: {session:#}"),
    };
    println!(
        "$ ftp-alg sessions list\n{}",
        must(lab.alg_cli(&["sessions", "list"]))
    );

    let pinholes = lab.pinholes();
    assert!(
        matches!(&pinholes[..], [p] if p.id == Some(pinhole_id) && p.session == session_id),
        "the session's pinhole, with the daemon's id: {pinholes:#?}"
    );
    println!(
        "$ ftp-alg pinholes list\n{}",
        must(lab.alg_cli(&["pinholes", "list"]))
    );

    let closed = must(lab.alg_cli(&["pinholes", "close", &pinhole_id.to_string()]));
    assert_eq!(closed.trim(), format!("closed pinholes {pinhole_id}"));
    assert!(lab.pinholes().is_empty(), "closed: {:#?}", lab.pinholes());
    let again = run(lab.alg_cli(&["pinholes", "close", &pinhole_id.to_string()]));
    assert_exit(&again, 4, "no open pinhole");

    client.resume();
    assert_replies("second PASV", &client.replies_until("pasv2"), &["227"]);
    let watched = must(lab.alg_cli(&[
        "pinholes",
        "list",
        "--watch",
        "--count",
        "2",
        "--interval",
        "0.2",
        "--json",
    ]));
    let refreshes: Vec<Value> = watched
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(
        refreshes.len() == 2
            && refreshes
                .iter()
                .all(|r| r.as_array().is_some_and(|a| a.len() == 1)),
        "two refreshes of one pinhole each: {watched}"
    );
    let flushed = must(lab.alg_cli(&["pinholes", "flush"]));
    assert!(flushed.starts_with("closed pinholes "), "{flushed}");
    assert!(lab.pinholes().is_empty(), "flushed: {:#?}", lab.pinholes());

    let metrics = must(lab.exec(
        &lab.gateway_ns(),
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("http://{METRICS}/metrics"),
        ],
    ));
    for line in [
        "ftp_alg_sessions 1",
        "ftp_alg_sessions_total 1",
        "ftp_alg_rewrites_total{kind=\"pasv\"} 2",
        "ftp_alg_pinholes_opened_total 2",
        "ftp_alg_pinholes_closed_total 2",
        "ftp_alg_pinholes_open 0",
        "ftp_alg_nft_install_seconds_count 2",
        "ftp_alg_upstream_connect_failures_total 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line:?} missing:\n{metrics}"
        );
    }

    let killed = must(lab.alg_cli(&["sessions", "kill", &session_id.to_string()]));
    assert_eq!(killed.trim(), format!("session {session_id} is ending"));
    client.resume();
    assert_replies("after the kill", &client.finish(), &[KILLED, "(closed)"]);
    assert!(
        wait_for(Duration::from_secs(10), || no_sessions(&lab)).is_some(),
        "the killed session is still listed 10 s later"
    );
    let again = run(lab.alg_cli(&["sessions", "kill", &session_id.to_string()]));
    assert_exit(&again, 4, "no session");

    assert_json_logs_without_secrets(&lab, session_id);
}

/// The daemon's log: every line one JSON object; the session's lines carry its span (id,
/// client, server); the PASS command is logged masked, the password nowhere.
fn assert_json_logs_without_secrets(lab: &Lab, session_id: u64) {
    let log = fs::read_to_string(lab.dir.join("daemon.log")).expect("the daemon's log");
    assert!(
        !log.contains(PASSWORD),
        "the password is in the log:\n{log}"
    );
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    let masked = lines
        .iter()
        .find(|l| l["fields"]["command"] == "PASS ****")
        .unwrap_or_else(|| panic!("no masked PASS logged:\n{log}"));
    let span = &masked["span"];
    assert_eq!(span["name"], "session", "{masked:#}");
    assert_eq!(span["id"], session_id, "{masked:#}");
    assert!(
        span["client"]
            .as_str()
            .is_some_and(|c| c.starts_with(&format!("{}:", lab.addrs().client))),
        "{masked:#}"
    );
    assert!(span["server"].as_str().is_some(), "{masked:#}");
}

/// A client that floods commands and never reads wedges its session: replies pile up for it,
/// or the daemon stops reading it (the test waits until the kernel's queues show either). The
/// operator can still end it: `sessions kill` removes it within seconds.
pub fn a_client_that_does_not_read_can_still_be_killed() {
    let mut lab = Lab::new(Topology::Gateway(Family::V4), Setup::Alg);
    let mut client = PyClient::in_client(&mut lab, NOT_READING);
    assert_eq!(client.replies_until("wedged"), Vec::<String>::new());
    let sessions = json(&lab, &["sessions", "list", "--json"]);
    let id = match sessions.as_array().map(Vec::as_slice) {
        Some([session]) => session["id"].as_u64().expect("an id"),
        _ => panic!("one session: {sessions:#}"),
    };
    // Wait until the session is wedged by its client: the daemon holds more replies for it
    // than the client can hold (4096 bytes of receive buffer asked for, 8192 given), or it
    // has stopped reading the client (more than its 64 KiB backlog waits in the kernel).
    // Which comes first depends on the machine's load: vsftpd answers each command before it
    // reads the next, and on a loaded machine the daemon was seen to fall behind on the
    // server's replies while the client's commands kept coming.
    let mut sockets = String::new();
    let wedged = wait_for(Duration::from_secs(20), || {
        sockets = must(lab.exec(
            &lab.gateway_ns(),
            &["ss", "-tnH", "state", "established", "( sport = :2121 )"],
        ));
        let mut queues = sockets
            .split_whitespace()
            .map(|q| q.parse().unwrap_or(0u64));
        let (recv_q, send_q) = (queues.next()?, queues.next()?);
        (send_q > 8192 || recv_q > 64 * 1024).then_some(())
    });
    if wedged.is_none() {
        let all = must(lab.exec(&lab.gateway_ns(), &["ss", "-tn"]));
        panic!("the session is not wedged by its client within 20 s: {sockets}\n{all}");
    }

    must(lab.alg_cli(&["sessions", "kill", &id.to_string()]));
    assert!(
        wait_for(Duration::from_secs(10), || no_sessions(&lab)).is_some(),
        "a session blocked writing to its client survived `sessions kill` by 10 s"
    );
    client.resume();
    assert_replies("after the kill", &client.finish(), &["(closed)"]);
}

/// Connects with a small receive buffer, reads nothing, and floods NOOPs from a thread of its
/// own; the test waits at the checkpoint until the daemon's writes to it are stuck. Then it
/// drains what it was sent until the daemon closes.
const NOT_READING: &str = r#"
import threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.connect((HOST, 21))
def flood():
    try:
        while True:
            s.sendall(b"NOOP\r\n" * 1000)
    except OSError:
        pass
threading.Thread(target=flood, daemon=True).start()
checkpoint("wedged")
s.settimeout(10)
try:
    while s.recv(1 << 16):
        pass
except OSError:
    pass
emit(reply="(closed)")
"#;

/// Without a daemon the CLI says so, with exit status 3, except `pinholes list`, which reads
/// the kernel and says it did; a restarted daemon replaces the stale socket. A caller other
/// than root is refused, by the socket's mode and, should that be loosened, by the daemon.
pub fn cli_without_a_daemon_and_for_other_users() {
    let mut lab = Lab::prepared(
        Topology::Gateway(Family::V4),
        Server::Vsftpd,
        Setup::AlgStopped,
        |_| String::new(),
    );
    for args in [
        &["status"][..],
        &["sessions", "list"],
        &["sessions", "kill", "1"],
        &["pinholes", "close", "1"],
        &["pinholes", "flush"],
    ] {
        let out = run(lab.alg_cli(args));
        assert_exit(&out, 3, "ftp-alg is not running");
        assert!(
            stderr(&out).contains("hint: start it"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let no_table = run(lab.alg_cli(&["pinholes", "list"]));
    assert_exit(&no_table, 1, "ftp-alg is not running");

    lab.start_alg();
    lab.stop_alg("KILL", Duration::from_secs(5))
        .expect("the daemon dies at SIGKILL");
    assert!(
        lab.control_socket().exists(),
        "a killed daemon leaves its socket behind"
    );
    let listed = run(lab.alg_cli(&["pinholes", "list"]));
    assert_exit(&listed, 0, "");
    let text = String::from_utf8_lossy(&listed.stdout);
    println!("$ ftp-alg pinholes list   # daemon killed\n{text}");
    assert!(text.starts_with("ftp-alg is not running"), "{text}");
    let listed = run(lab.alg_cli(&["pinholes", "list", "--json"]));
    assert_exit(&listed, 0, "");
    assert!(
        stderr(&listed).starts_with("ftp-alg is not running"),
        "{}",
        stderr(&listed)
    );
    let entries: Value = serde_json::from_slice(&listed.stdout).expect("JSON on stdout");
    assert_eq!(entries, serde_json::json!([]));

    lab.start_alg();
    assert_exit(&run(lab.alg_cli(&["status"])), 0, "");

    let as_nobody = |lab: &Lab| {
        let mut cmd = lab.exec(
            &lab.gateway_ns(),
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                ALG,
                "status",
            ],
        );
        cmd.env("FTP_ALG_SOCKET", lab.control_socket());
        run(cmd)
    };
    assert_exit(&as_nobody(&lab), 1, "the control socket is for root only");
    // Loosen the socket's mode: the daemon still refuses, by the caller's credentials.
    fs::set_permissions(lab.control_socket(), fs::Permissions::from_mode(0o666)).expect("chmod");
    let refused = as_nobody(&lab);
    assert_exit(&refused, 1, "the control socket is for root only");
    assert!(
        !stderr(&refused).contains("permission denied on"),
        "{}",
        stderr(&refused)
    );
}

fn run(mut cmd: Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The command exited with `code`, and its stderr contains `says`.
fn assert_exit(out: &Output, code: i32, says: &str) {
    assert!(
        out.status.code() == Some(code) && stderr(out).contains(says),
        "expected exit {code} saying {says:?}; got {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        stderr(out)
    );
}

/// `ftp-alg ARGS` in G, parsed as JSON.
/// `Some` once `sessions list` shows no session.
fn no_sessions(lab: &Lab) -> Option<()> {
    (json(lab, &["sessions", "list", "--json"]) == serde_json::json!([])).then_some(())
}

fn json(lab: &Lab, args: &[&str]) -> Value {
    let text = must(lab.alg_cli(args));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?} printed {text:?}: {e}"))
}

/// `sessions list` and `pinholes list` agree on what a session holds: once the kernel has
/// dropped a pinhole at its timeout (here 1 s, while the client never dials it), the session
/// no longer lists it, although the daemon keeps its id until the session's next announcement.
pub fn sessions_and_pinholes_agree_after_a_kernel_timeout() {
    let mut lab = Lab::prepared(
        Topology::Gateway(Family::V4),
        Server::Vsftpd,
        Setup::AlgStopped,
        |_| String::new(),
    );
    lab.alg_config = "[pinholes]\ntimeout_secs = 1\nreuse_delay_secs = 1\n".to_owned();
    lab.start_alg();
    let mut client = PyClient::in_client(&mut lab, &HELD_SESSION.replace("PASSWORD", "x"));
    assert_replies(
        "login and PASV",
        &client.replies_until("pasv"),
        &["220", "230", "230", "227"],
    );
    let held = |lab: &Lab| -> Vec<Value> {
        let sessions = json(lab, &["sessions", "list", "--json"]);
        match sessions.as_array().map(Vec::as_slice) {
            Some([session]) => session["pinholes"].as_array().cloned().unwrap_or_default(),
            _ => panic!("one session: {sessions:#}"),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.pinholes().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the kernel kept the pinhole past its 1 s timeout"
        );
        sleep(Duration::from_millis(100));
    }
    assert_eq!(
        held(&lab),
        Vec::<Value>::new(),
        "sessions list shows a pinhole the kernel no longer has"
    );
    client.resume();
    assert_replies("second PASV", &client.replies_until("pasv2"), &["227"]);
    let session_id = json(&lab, &["sessions", "list", "--json"])[0]["id"]
        .as_u64()
        .expect("a session id");
    must(lab.alg_cli(&["sessions", "kill", &session_id.to_string()]));
    client.resume();
    assert_replies("after the kill", &client.finish(), &[KILLED, "(closed)"]);
}
