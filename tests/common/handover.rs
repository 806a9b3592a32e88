//! Hand-over end to end: a new ftp-alg process (another binary file, as after an upgrade) takes
//! the listening sockets over from the running one with `run --take-over`, under load. Nothing
//! may be lost: downloads under way finish byte for byte, idle sessions carry on with the old
//! process, and new sessions are served throughout, by one process or the other.

use super::edge::{assert_replies, PyClient};
use super::*;

/// Downloads under way at the hand-over.
const DOWNLOADS: usize = 50;
/// Idle sessions open at the hand-over.
const IDLE: usize = 3;
/// vsftpd's pace per session: data.bin (1 MiB) takes about 2.6 s, so the downloads are still
/// running when the new process takes over. Every session reaches vsftpd from ftp-alg's one
/// address, so its per-address limit (`max_per_ip`, 50 in this build: the 51st session gets
/// `421 There are too many connections from your internet address`) is lifted.
const SLOW: &str = "anon_max_rate=400000\nmax_per_ip=0\n";

/// A logged-in session that waits, then (served by the old process, after the hand-over)
/// lists the directory through a new pinhole and quits.
const IDLE_THEN_LIST: &str = r#"
ftp = RecordingFTP()
ftp.connect(HOST, 21, timeout=10)
ftp.login()
checkpoint("idle")
ftp.voidcmd("NOOP")
ftp.retrlines("LIST", lambda line: None)
ftp.quit()
"#;

/// New sessions, one after the other, each reading the greeting and quitting, until DIR/stop
/// exists (or 120 s have passed); reports how many were served and how many failed.
const PROBER: &str = r#"
import time
ok, failed, errors = 0, 0, []
deadline = time.monotonic() + 120
while not os.path.exists(os.path.join(DIR, "stop")) and time.monotonic() < deadline:
    try:
        c = socket.create_connection((HOST, 21), timeout=5)
        f = c.makefile("rb")
        greeting = f.readline()
        c.sendall(b"QUIT\r\n")
        bye = f.readline()
        c.close()
        if greeting.startswith(b"220") and bye.startswith(b"221"):
            ok += 1
        else:
            failed += 1
            errors.append((greeting + bye).decode(errors="replace"))
    except OSError as e:
        failed += 1
        errors.append(repr(e))
    time.sleep(0.05)
emit(reply="ok=%d failed=%d %s" % (ok, failed, errors[:3]))
"#;

/// Waits until `done` holds (with the harness's [`wait_for`]), failing the test if it does not
/// within `bound`.
fn within(bound: Duration, what: &str, mut done: impl FnMut() -> bool) {
    wait_for(bound, || done().then_some(()))
        .unwrap_or_else(|| panic!("not within {bound:?}: {what}"));
}

fn log_has(path: &Path, text: &str) -> bool {
    fs::read_to_string(path).is_ok_and(|log| log.contains(text))
}

/// 50 downloads under way, 3 idle sessions and a stream of new sessions; a new binary takes
/// over; every download completes byte for byte, every idle session goes on (a listing through
/// a new pinhole), not one new session fails, and the old process exits 0 once its last
/// session has ended, leaving no pinhole behind.
pub fn upgrade_under_load_drops_nobody() {
    let mut lab = Lab::prepared(
        Topology::Reverse(Family::V4),
        Server::Vsftpd,
        Setup::AlgStopped,
        |_| SLOW.to_owned(),
    );
    lab.alg_config = "[limits]\nmax_sessions_per_client = 200\n".to_owned();
    lab.start_alg();
    let host = lab.addrs().dial.ip().to_string();

    let mut idle: Vec<PyClient> = (0..IDLE)
        .map(|_| PyClient::in_client(&mut lab, IDLE_THEN_LIST))
        .collect();
    for client in &mut idle {
        assert_replies("login", &client.replies_until("idle"), &["220", "230"]);
    }
    let prober = PyClient::in_client(&mut lab, PROBER);
    let mut downloads: Vec<(PathBuf, Child)> = (0..DOWNLOADS)
        .map(|i| {
            let file = lab.dir.join(format!("download-{i}.bin"));
            let child = lab
                .client_command(&[
                    "curl",
                    "-sS",
                    "--max-time",
                    "60",
                    "-o",
                    &file.to_string_lossy(),
                    &format!("ftp://{host}/{DATA_FILE}"),
                ])
                .stderr(create(&lab.dir.join(format!("download-{i}.stderr"))))
                .spawn()
                .expect("spawn curl");
            (file, child)
        })
        .collect();
    within(Duration::from_secs(30), "every download has data", || {
        downloads
            .iter()
            .all(|(file, _)| fs::metadata(file).is_ok_and(|m| m.len() > 0))
    });

    let new_binary = lab.dir.join("ftp-alg-upgraded");
    fs::copy(ALG, &new_binary).expect("copy the binary");
    let new_log = lab.dir.join("daemon-upgraded.log");
    let old_log = lab.dir.join("daemon.log");
    let conf = lab.dir.join("ftp-alg.toml");
    let started = Instant::now();
    let new = lab
        .exec(
            &lab.gateway_ns(),
            &[
                &new_binary.to_string_lossy(),
                "run",
                "--config",
                &conf.to_string_lossy(),
                "--take-over",
            ],
        )
        .env("RUST_LOG", "ftp_alg=debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(create(&new_log))
        .stderr(create(&new_log))
        .spawn()
        .expect("spawn the new ftp-alg");
    within(Duration::from_secs(10), "the hand-over completes", || {
        log_has(&new_log, "hand-over complete")
    });
    println!("hand-over took {:?}", started.elapsed());
    assert!(
        log_has(
            &new_log,
            "the table holds pinholes of a live predecessor: keeping them"
        ),
        "the new process replaced the table under the old one's transfers"
    );
    assert!(
        downloads
            .iter_mut()
            .all(|(_, child)| child.try_wait().ok().flatten().is_none()),
        "the downloads were to be under way during the hand-over"
    );

    for (i, (file, child)) in downloads.iter_mut().enumerate() {
        let status = child.wait().expect("wait curl");
        assert!(
            status.success(),
            "download {i} failed ({status}): {}",
            fs::read_to_string(lab.dir.join(format!("download-{i}.stderr"))).unwrap_or_default()
        );
        assert_same_bytes("download", &lab.read(file), &lab.read(&lab.served_path()));
    }
    let old_still_runs = lab
        .alg
        .as_mut()
        .is_some_and(|old| old.try_wait().ok().flatten().is_none());
    assert!(
        old_still_runs,
        "the old process left before its idle sessions ended"
    );
    for mut client in idle {
        client.resume();
        let replies = client.finish();
        assert_replies(
            "idle session after the hand-over",
            &replies,
            &["200", "200", "227", "150", "226", "221"],
        );
    }
    let old = lab
        .wait_alg(Duration::from_secs(10))
        .expect("the old process exits once its last session has ended");
    assert_eq!(old.code(), Some(0), "the old process's exit status");
    println!(
        "the old process lived {:?} after the hand-over",
        started.elapsed()
    );
    assert!(log_has(
        &old_log,
        "handed over: removing this process's pinholes"
    ));

    fs::write(lab.dir.join("stop"), "").expect("stop the prober");
    let probes = prober.finish();
    let [summary] = probes.as_slice() else {
        panic!("the prober's summary: {probes:?}")
    };
    println!("new sessions during the hand-over: {summary}");
    assert!(
        summary.contains(" failed=0 ") && !summary.starts_with("ok=0 "),
        "new sessions were refused: {summary}"
    );
    assert!(
        log_has(&new_log, "session started"),
        "the new process served no session"
    );
    // From now on the harness stops the new process like its own daemon.
    lab.alg = Some(new);
    lab.assert_no_pinholes_left();
    let status = lab
        .stop_alg("TERM", Duration::from_secs(5))
        .expect("the new process stops on SIGTERM");
    assert_eq!(status.code(), Some(0), "the new process's exit status");
}
