//! Edge cases of the control channel (issue 3, "Interop"), each run end to end through the real
//! daemon with vsftpd and a real client (lftp, curl, or Python's ftplib and raw sockets): one
//! `pub fn` per `#[test]` of `tests/e2e_edge.rs`, and the clients they drive.
//!
//! Not here, because none of vsftpd, proftpd and pure-ftpd produces them: a 227 without
//! parentheses, a 229 with another delimiter than `|` (the session core's unit tests cover
//! both), and a 150 sent before the server connects in active mode (all three connect first,
//! and answer 425 without a 150 when the connection fails).

use super::*;

/// An address of the server's own network that the client cannot reach, as a server behind NAT
/// announces its private address. From the benchmarking range, so that even a wrong rewrite
/// sends nothing beyond the test's namespaces.
pub const UNREACHABLE4: &str = "198.19.12.13";
/// What the ABOR tests download: 64 MiB, more than the socket buffers hold, so the transfer is
/// still running when the client aborts it. Sparse, so it costs neither disk nor time.
const BIG_FILE: &str = "big.bin";
const BIG_LEN: u64 = 64 << 20;
/// The directory the many-transfers test mirrors, and how many files it holds.
const MANY_DIR: &str = "many";
const MANY_FILES: usize = 50;
/// The greeting file of the banner test: reply-like lines that ftp-alg must not rewrite.
const BANNER: &str = "Edge-case banner\n\
                      227 Entering Passive Mode (198,19,0,9,4,1)\n \
                      229 (|||1025|)\n\
                      227 =198,19,0,9,4,1\n";

/// A multi-line 211 FEAT reply reaches the client byte for byte as the server sends it.
pub fn feat_reply_passes_intact() {
    let mut lab = Lab::new(Topology::Gateway(Family::V4), Setup::Alg);
    let replies = same_replies_direct_and_through_alg(&mut lab);
    let feat = &replies[1];
    assert!(
        feat.starts_with("211-") && feat.ends_with("\r\n211 End\r\n") && feat.lines().count() > 2,
        "not a multi-line FEAT reply: {feat:?}"
    );
    let log = ServerLog::read(&lab);
    assert_eq!(
        log.commands().iter().filter(|c| **c == "FEAT").count(),
        2,
        "vsftpd must have answered FEAT once directly and once through ftp-alg"
    );
}

/// A multi-line 220 greeting whose lines look like 227 and 229 replies passes unchanged and
/// opens no pinhole. Reverse mode, where a rewrite would change address and port.
pub fn reply_like_lines_in_a_greeting_pass_intact() {
    let mut lab = Lab::prepared(
        Topology::Reverse(Family::V4),
        Server::Vsftpd,
        Setup::Alg,
        |lab| {
            let path = lab.dir.join("banner.txt");
            fs::write(&path, BANNER).expect("write the banner file");
            format!("banner_file={}\n", path.display())
        },
    );
    let replies = same_replies_direct_and_through_alg(&mut lab);
    let expected: String = BANNER
        .lines()
        .map(|line| format!("220-{line}\r\n"))
        .chain(["220 \r\n".to_owned()])
        .collect();
    assert_eq!(replies[0], expected, "the greeting the client saw");
}

/// Runs [`GREETING_AND_FEAT`] in the server's namespace against vsftpd itself, then through
/// ftp-alg from the client: both must see the same bytes. While the ALG session is open, it
/// must hold no pinhole (nothing in a greeting or FEAT announces a data endpoint).
fn same_replies_direct_and_through_alg(lab: &mut Lab) -> Vec<String> {
    let mut direct = PyClient::in_server(lab, GREETING_AND_FEAT);
    let mut want = direct.replies_until("feat");
    direct.resume();
    want.extend(direct.finish());

    let mut client = PyClient::in_client(lab, GREETING_AND_FEAT);
    let mut got = client.replies_until("feat");
    let pinholes = lab.pinholes();
    assert!(
        pinholes.is_empty(),
        "pinholes after greeting and FEAT: {pinholes:#?}"
    );
    client.resume();
    got.extend(client.finish());
    assert_eq!(
        got, want,
        "replies through ftp-alg, then directly from vsftpd"
    );
    lab.assert_no_pinholes_left();
    got
}

const GREETING_AND_FEAT: &str = r#"
c = Control()
c.command("FEAT")
checkpoint("feat")
c.command("QUIT")
"#;

/// vsftpd announces `pasv_address` (an address of the server's network, or 0.0.0.0) in its 227;
/// ftp-alg must put there the address the client dialled, and curl, told to use the announced
/// address, must download through it. vsftpd's text around the numbers (its trailing `.`)
/// stays as it was.
pub fn pasv_address_is_replaced(topology: Topology, pasv_address: &str) {
    let mut lab = Lab::prepared(topology, Server::Vsftpd, Setup::Alg, |_| {
        format!("pasv_address={pasv_address}\n")
    });
    let a = lab.addrs();
    let download = lab.download_path().to_string_lossy().into_owned();
    let url = format!("ftp://{}/{DATA_FILE}", a.dial.ip());
    let args = [
        "curl",
        "-q",
        "--verbose",
        "--stderr",
        "-",
        "--noproxy",
        "*",
        "--max-time",
        "10",
        "--disable-epsv",
        "--no-ftp-skip-pasv-ip",
        &url,
        "-o",
        &download,
    ];
    let cmd = lab.client_command(&args);
    let run = lab.run_bounded(cmd, &args);
    assert!(run.status.success(), "curl failed\n{}", run.transcript);
    assert_same_bytes(
        "download",
        &lab.read(&lab.download_path()),
        &lab.read(&lab.served_path()),
    );

    let log = ServerLog::read(&lab);
    let sent = log
        .responses()
        .into_iter()
        .find(|r| r.starts_with("227 "))
        .expect("vsftpd answered PASV")
        .to_owned();
    let announced_by_server = parse_host_port(between(&sent, '(', ')'));
    assert_eq!(
        announced_by_server.ip().to_string(),
        pasv_address,
        "vsftpd's 227: {sent}"
    );
    let seen = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("< 227 "))
        .map(|rest| format!("227 {rest}"))
        .unwrap_or_else(|| panic!("curl saw no 227\n{}", run.transcript));
    let announced = parse_host_port(between(&seen, '(', ')'));
    assert_eq!(announced.ip(), a.client_sees, "the 227 curl saw: {seen}");
    if a.rewrites_pasv {
        assert!(PINHOLE_PORTS.contains(&announced.port()), "{seen}");
    } else {
        assert_eq!(announced.port(), announced_by_server.port(), "{seen}");
    }
    let outside = |r: &str| {
        let (head, rest) = r.split_once('(').expect("227 with parentheses");
        (
            head.to_owned(),
            rest.split_once(')').expect("closed").1.to_owned(),
        )
    };
    assert_eq!(outside(&seen), outside(&sent), "text around the numbers");
    let dialled = format!(
        "Connecting to {0} ({0}) port {1}",
        announced.ip(),
        announced.port()
    );
    assert!(
        run.stdout.contains(&dialled),
        "curl did not dial the announced endpoint ({dialled})\n{}",
        run.transcript
    );
    lab.assert_no_pinholes_left();
}

/// ftplib aborts a running download the way it always does: `ABOR\r\n` sent with MSG_OOB, the
/// line feed being TCP urgent data, while the data connection stays open and unread, so that
/// only the urgent signal can interrupt vsftpd (`async_abor_enable=YES`). The client must get
/// vsftpd's 426 and 226 and the session must go on.
pub fn abor_from_ftplib() {
    let mut lab = Lab::prepared(
        Topology::Gateway(Family::V4),
        Server::Vsftpd,
        Setup::Alg,
        big_file_abortable,
    );
    let replies = PyClient::in_client(&mut lab, ABORT_WITH_FTPLIB).finish();
    assert_replies(
        "ftplib's replies from RETR on",
        from_150(&replies),
        &ABORTED,
    );
    // ftp-alg sends every ABOR after Telnet IP and Synch, which vsftpd logs as `?`.
    assert_aborted(&lab, |c| c.trim_start_matches('?') == "ABOR");
    let listing = fs::read_to_string(lab.dir.join("listing.txt")).expect("the listing");
    assert!(
        listing.contains(BIG_FILE),
        "listing after ABOR: {listing:?}"
    );
    lab.assert_no_pinholes_left();
}

const ABORT_WITH_FTPLIB: &str = r#"
ftp = RecordingFTP()
# An ABOR that does not reach the server shows as a reply that never comes.
ftp.connect(HOST, 21, timeout=5)
ftp.login()
ftp.voidcmd("TYPE I")
data = ftp.transfercmd("RETR big.bin")
received = 0
while received < 1 << 20:
    received += len(data.recv(1 << 16))
try:
    ftp.abort()
except ftplib.error_proto:
    pass  # recorded; the test says what it expected
ftp.getmultiline()
data.close()
# retrlines sends TYPE A first: the command that shows the session goes on.
with open(os.path.join(DIR, "listing.txt"), "w") as listing:
    ftp.retrlines("LIST", lambda line: print(line, file=listing))
ftp.quit()
"#;

/// lftp aborts a running download (its job killed) with Telnet IP and Synch: `IAC IP IAC`, then
/// `DM` as urgent data, then `ABOR`. Same expectations as [`abor_from_ftplib`].
pub fn abor_from_lftp() {
    let mut lab = Lab::prepared(
        Topology::Gateway(Family::V4),
        Server::Vsftpd,
        Setup::Alg,
        big_file_abortable,
    );
    let partial = lab.dir.join("partial.bin").to_string_lossy().into_owned();
    let run = lftp(
        &mut lab,
        &[
            format!("get {BIG_FILE} -o {partial} &"),
            // Abort only once data arrives (vsftpd has sent its 150 by then), within 20 s.
            format!("!timeout 20 sh -c 'until [ -s {partial} ]; do sleep 0.05; done'"),
            "kill all".to_owned(),
            "ls".to_owned(),
        ],
    );
    assert!(
        run.sent.iter().any(|c| c.ends_with("ABOR")),
        "lftp sent no ABOR: {:?}",
        run.sent
    );
    assert_replies(
        "lftp's replies from RETR on",
        from_150(&run.replies),
        &ABORTED,
    );
    assert!(
        run.stdout.contains(BIG_FILE),
        "ls after ABOR: {:?}",
        run.stdout
    );
    let partial_len = fs::metadata(&partial).map_or(0, |m| m.len());
    assert!(
        (1..BIG_LEN).contains(&partial_len),
        "the aborted download kept {partial_len} bytes"
    );
    // vsftpd logs the Telnet bytes before ABOR as `?`.
    assert_aborted(&lab, |c| c.trim_start_matches('?') == "ABOR");
    lab.assert_no_pinholes_left();
}

/// The 64 MiB file, and vsftpd set to act on urgent data during a transfer and to send at
/// 4 MB/s: the download lasts 16 s whatever the client buffers (lftp reads ahead into memory).
fn big_file_abortable(lab: &Lab) -> String {
    File::create(lab.ftp_root().join(BIG_FILE))
        .and_then(|f| f.set_len(BIG_LEN))
        .expect("create the big file");
    "async_abor_enable=YES\nanon_max_rate=4000000\n".to_owned()
}

/// What a client must get from an aborted RETR on: vsftpd's answers to the transfer and to
/// ABOR, then the session going on: a command (NOOP or TYPE, as the client likes), a passive
/// listing and QUIT.
const ABORTED: [&str; 8] = [
    "150 Opening BINARY mode data connection for big.bin (67108864 bytes).",
    "426 Failure writing network stream.",
    "226 ABOR successful.",
    "200",
    "227",
    "150 Here comes the directory listing.",
    "226 Directory send OK.",
    "221 Goodbye.",
];

/// The replies from the first 150 on.
fn from_150(replies: &[String]) -> &[String] {
    let at = replies.iter().position(|r| r.starts_with("150 "));
    &replies[at.unwrap_or(replies.len())..]
}

/// `replies` (CRLF-terminated or not) against `expected`, where a bare code stands for any
/// reply with that code, as for replies whose text holds a port.
pub(super) fn assert_replies(what: &str, replies: &[String], expected: &[&str]) {
    let seen: Vec<&str> = replies
        .iter()
        .enumerate()
        .map(|(i, reply)| match expected.get(i) {
            Some(code) if code.len() == 3 => reply.get(..3).unwrap_or(reply),
            _ => reply.trim_end_matches("\r\n"),
        })
        .collect();
    assert_eq!(seen, expected, "{what}: {replies:#?}");
}

/// vsftpd received the ABOR during the transfer and answered it with 426, then 226.
fn assert_aborted(lab: &Lab, is_abor: impl Fn(&str) -> bool) {
    let events = ServerLog::read(lab).events;
    let at = events
        .iter()
        .position(|e| e.said == Said::Command && is_abor(&e.text))
        .unwrap_or_else(|| panic!("vsftpd never received ABOR: {events:#?}"));
    let answers: Vec<&str> = events[at + 1..]
        .iter()
        .take(2)
        .map(|e| e.text.as_str())
        .collect();
    assert_eq!(
        answers,
        [
            "426 Failure writing network stream.",
            "226 ABOR successful."
        ],
        "vsftpd's answers to ABOR"
    );
}

/// lftp's `get -c` resumes a partial download with REST and RETR: the result is byte-identical.
pub fn rest_resumes_a_download() {
    let mut lab = Lab::new(Topology::Reverse(Family::V4), Setup::Alg);
    let served = lab.read(&lab.served_path());
    // Not a multiple of any buffer size.
    let offset = served.len() / 3 + 7;
    let resumed = lab.download_path();
    fs::write(&resumed, &served[..offset]).expect("write the partial download");
    let run = lftp(
        &mut lab,
        &[format!("get -c {DATA_FILE} -o {}", resumed.display())],
    );
    assert_same_bytes("resumed download", &lab.read(&resumed), &served);
    let rest = format!("REST {offset}");
    assert!(run.sent.contains(&rest), "lftp sent {:?}", run.sent);
    let restart = format!("350 Restart position accepted ({offset}).");
    let at = run.replies.iter().position(|r| *r == restart);
    assert_replies(
        "lftp's replies from REST on",
        &run.replies[at.unwrap_or(run.replies.len())..],
        &[&restart, "150", "226 Transfer complete.", "221 Goodbye."],
    );
    let log = ServerLog::read(&lab);
    let commands = log.commands();
    let at = commands
        .iter()
        .position(|c| *c == rest)
        .unwrap_or_else(|| panic!("vsftpd did not receive {rest}: {commands:?}"));
    assert_eq!(commands[at + 1], format!("RETR {DATA_FILE}"), "after REST");
    assert!(
        log.responses().contains(&restart.as_str()),
        "vsftpd did not answer {restart}"
    );
    lab.assert_no_pinholes_left();
}

/// Commands written several at a time, as a pipelining client does. Every reply must arrive in
/// command order and every transfer must work:
/// 1. login, a PORT naming another host (ftp-alg answers it itself, in its turn), PASV, RETR;
/// 2. PORT, RETR, and a second PORT and LIST before the server has even connected for RETR;
/// 3. over a new PASV, LIST, then PORT and RETR before the listing's final reply.
///
/// In 2 and 3 the server is slow to open the RETR's data connection: the client holds a lock on
/// the file for a moment, and vsftpd (`lock_upload_files`, on by default) waits for it, as when an
/// upload of the file is under way. Without that the server connects within a millisecond on
/// these veth links, long before a pinhole could be changed, and a server a WAN hop away does not.
pub fn pipelined_commands() {
    let mut lab = Lab::new(Topology::Reverse(Family::V4), Setup::Alg);
    let replies = PyClient::in_client(&mut lab, PIPELINED).finish();
    assert_replies(
        "replies in order",
        &replies,
        &[
            "220", "230", "230", "200", "501", "200", "227", "150", "226", "200", // write 1
            "200", "150", "226", "200", "150", "226", // write 2
            "227", "150", "226", "200", "150", "226", "221", // write 3
        ],
    );
    assert!(replies[4].contains("must be your own"), "{}", replies[4]);
    for name in ["pipelined-1.bin", "pipelined-2.bin", "pipelined-5.bin"] {
        assert_same_bytes(
            name,
            &lab.read(&lab.dir.join(name)),
            &lab.read(&lab.served_path()),
        );
    }
    for name in ["pipelined-3.txt", "pipelined-4.txt"] {
        let listing = fs::read_to_string(lab.dir.join(name)).expect("a listing");
        assert!(listing.contains(DATA_FILE), "{name}: {listing:?}");
    }

    let log = ServerLog::read(&lab);
    let verbs: Vec<&str> = log
        .commands()
        .into_iter()
        .map(|c| c.split(' ').next().unwrap_or(c))
        .collect();
    assert_eq!(
        verbs,
        [
            "USER", "PASS", "TYPE", "NOOP", "PASV", "RETR", "NOOP", // write 1
            "PORT", "RETR", "PORT", "LIST", // write 2
            "PASV", "LIST", "PORT", "RETR", "QUIT", // write 3
        ],
        "the commands vsftpd received, in order (the refused PORT is not among them)"
    );
    lab.assert_no_pinholes_left();
}

const PIPELINED: &str = r#"
import fcntl, time

def slowly(commands):
    """Sends `commands` in one write while data.bin is locked for half a second."""
    with open(os.path.join(DIR, "ftp-root", "data.bin"), "r+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        c.send(commands)
        time.sleep(0.5)

c = Control()
c.send("USER anonymous\r\nPASS e2e\r\nTYPE I\r\nPORT 198,18,0,9,195,80\r\nNOOP\r\nPASV\r\n"
       "RETR data.bin\r\nNOOP\r\n")
for _ in range(5):
    c.reply()
data = passive(c.reply())
c.transfer(data, "pipelined-1.bin")
c.reply()

first, port1 = c.listen()
second, port2 = c.listen()
slowly(port1 + "RETR data.bin\r\n" + port2 + "LIST\r\n")
c.reply()
c.transfer(first, "pipelined-2.bin")
c.reply()
c.transfer(second, "pipelined-3.txt")

data = passive(c.command("PASV"))
third, port3 = c.listen()
slowly("LIST\r\n" + port3 + "RETR data.bin\r\nQUIT\r\n")
c.transfer(data, "pipelined-4.txt")
c.reply()
c.transfer(third, "pipelined-5.bin")
c.reply()
"#;

/// REIN passes through, whatever vsftpd answers (502), the pinhole of the PASV before it is
/// removed, and the session goes on with a new PASV and a listing.
pub fn rein_voids_the_data_endpoint() {
    let mut lab = Lab::new(Topology::Gateway(Family::V4), Setup::Alg);
    let mut client = PyClient::in_client(&mut lab, REIN);
    let mut replies = client.replies_until("announced");
    let open = lab.pinholes();
    assert_eq!(open.len(), 1, "the PASV pinhole: {open:#?}");
    client.resume();
    replies.extend(client.replies_until("reinitialized"));
    lab.assert_no_pinholes_left();
    client.resume();
    replies.extend(client.finish());

    assert_replies(
        "replies around REIN",
        &replies,
        &[
            "220", "230", "227", "502", "200", "227", "150", "226", "221",
        ],
    );
    let log = ServerLog::read(&lab);
    assert!(
        log.responses().contains(&replies[3].trim_end()),
        "the client's REIN reply is vsftpd's: {}",
        replies[3]
    );
    assert!(log.commands().contains(&"REIN"), "vsftpd never got REIN");
    let listing = fs::read_to_string(lab.dir.join("listing.txt")).expect("the listing");
    assert!(
        listing.contains(DATA_FILE),
        "listing after REIN: {listing:?}"
    );
    lab.assert_no_pinholes_left();
}

const REIN: &str = r#"
c = Control()
c.command("USER anonymous")
c.command("PASV")
checkpoint("announced")
c.command("REIN")
checkpoint("reinitialized")
c.command("NOOP")
c.transfer(passive(c.command("PASV")), "listing.txt", "LIST")
c.command("QUIT")
"#;

/// RFC 2428 §4 (and RFC 6384's use of it): vsftpd's answers to `EPSV 3` (an unsupported network
/// protocol: 522), to `EPSV ALL` (200) and to a PASV after it reach the client unchanged, and
/// EPSV transfers still work after EPSV ALL.
pub fn epsv_all_and_unsupported_family() {
    let mut lab = Lab::new(Topology::Reverse(Family::V4), Setup::Alg);
    let replies = PyClient::in_client(&mut lab, EPSV_ALL).finish();
    assert_replies(
        "replies around EPSV ALL",
        &replies,
        &[
            "220", "230", "522", "200", "550", "229", "150", "226", "200", "229", "150", "226",
            "221",
        ],
    );
    let log = ServerLog::read(&lab);
    let responses = log.responses();
    for unchanged in &replies[2..5] {
        assert!(
            responses.contains(&unchanged.trim_end()),
            "not as vsftpd sent it: {unchanged:?}"
        );
    }
    let listing = fs::read_to_string(lab.dir.join("listing.txt")).expect("the listing");
    assert!(
        listing.contains(DATA_FILE),
        "listing after EPSV ALL: {listing:?}"
    );
    assert_same_bytes(
        "download after EPSV ALL",
        &lab.read(&lab.download_path()),
        &lab.read(&lab.served_path()),
    );
    assert_eq!(
        log.data_verbs(),
        ["EPSV", "EPSV", "PASV", "EPSV", "EPSV"],
        "data commands vsftpd received"
    );
    lab.assert_no_pinholes_left();
}

const EPSV_ALL: &str = r#"
c = Control()
for line in ["USER anonymous", "EPSV 3", "EPSV ALL", "PASV"]:
    c.command(line)
c.transfer(passive(c.command("EPSV")), "listing.txt", "LIST")
c.command("TYPE I")
c.transfer(passive(c.command("EPSV 1")), "download.bin", "RETR data.bin")
c.command("QUIT")
"#;

/// ftplib switches between passive and active for each of four transfers in one session, a
/// download and an upload in each mode; each is checked byte for byte.
pub fn passive_and_active_alternate() {
    let mut lab = Lab::new(Topology::Reverse(Family::V4), Setup::Alg);
    let replies = PyClient::in_client(&mut lab, ALTERNATE).finish();
    // ftplib sends TYPE I before each transfer.
    assert_replies(
        "replies",
        &replies,
        &[
            "220", "230", // login
            "200", "227", "150", "226", // passive download
            "200", "200", "150", "226", // active upload
            "200", "227", "150", "226", // passive upload
            "200", "200", "150", "226", // active download
            "221",
        ],
    );
    let served = lab.read(&lab.served_path());
    let upload = lab.read(&lab.upload_source_path());
    for (name, want) in [
        (lab.dir.join("alternate-0.bin"), &served),
        (lab.ftp_root().join("up/alternate-1.bin"), &upload),
        (lab.ftp_root().join("up/alternate-2.bin"), &upload),
        (lab.dir.join("alternate-3.bin"), &served),
    ] {
        assert_same_bytes(&name.to_string_lossy(), &lab.read(&name), want);
    }
    assert_eq!(
        ServerLog::read(&lab).data_verbs(),
        ["PASV", "PORT", "PASV", "PORT"],
        "data commands vsftpd received"
    );
    lab.assert_no_pinholes_left();
}

const ALTERNATE: &str = r#"
ftp = RecordingFTP()
ftp.connect(HOST, 21, timeout=10)
ftp.login()
for i, passive_mode in enumerate([True, False, True, False]):
    ftp.set_pasv(passive_mode)
    if i in (0, 3):
        with open(os.path.join(DIR, "alternate-%d.bin" % i), "wb") as f:
            ftp.retrbinary("RETR data.bin", f.write)
    else:
        with open(os.path.join(DIR, "upload.bin"), "rb") as f:
            ftp.storbinary("STOR up/alternate-%d.bin" % i, f)
ftp.quit()
"#;

/// lftp mirrors a directory of 50 small files in one session: 50 passive transfers, each file
/// identical, and no pinhole left.
pub fn fifty_transfers_in_one_session() {
    let mut lab = Lab::prepared(
        Topology::Reverse(Family::V4),
        Server::Vsftpd,
        Setup::Alg,
        |lab| {
            let dir = lab.ftp_root().join(MANY_DIR);
            fs::create_dir(&dir).expect("create the mirrored directory");
            for i in 0..MANY_FILES {
                fs::write(dir.join(format!("f{i:02}")), many_file(i)).expect("write a small file");
            }
            String::new()
        },
    );
    let mirror = lab.dir.join("mirror");
    let run = lftp(
        &mut lab,
        &[format!("mirror {MANY_DIR} {}", mirror.display())],
    );
    for i in 0..MANY_FILES {
        let name = format!("f{i:02}");
        assert_same_bytes(&name, &lab.read(&mirror.join(&name)), &many_file(i));
    }
    let completed = run
        .replies
        .iter()
        .filter(|r| *r == "226 Transfer complete.")
        .count();
    assert_eq!(completed, MANY_FILES, "transfers lftp saw complete");
    let log = ServerLog::read(&lab);
    let commands = log.commands();
    let count = |verb: &str| commands.iter().filter(|c| c.starts_with(verb)).count();
    assert_eq!(count("USER "), 1, "one control session: {commands:?}");
    assert_eq!(count("RETR "), MANY_FILES, "downloads vsftpd served");
    lab.assert_no_pinholes_left();
}

/// The content of the mirrored file `i`: a few hundred bytes, each file a different length.
fn many_file(i: usize) -> Vec<u8> {
    // pseudo_random ignores the seed's lowest bit.
    pseudo_random(300 + 37 * i, (i as u64) << 1)
}

/// Settings of every lftp run here: give up and reconnect fast, no TLS (ftp-alg refuses AUTH),
/// overwrite.
const LFTP_SETTINGS: &str = "set cmd:fail-exit yes
set net:timeout 3
set net:max-retries 1
set net:reconnect-interval-base 1
set net:reconnect-interval-max 1
set ftp:ssl-allow no
set xfer:clobber on
";

/// An lftp session in the client namespace running `commands`, and what it logged (at debug
/// level 5, the first to show the commands it sends).
struct LftpRun {
    /// The command lines lftp sent (`---> `).
    sent: Vec<String>,
    /// The reply lines lftp received (`<--- `), multi-line replies line by line.
    replies: Vec<String>,
    stdout: String,
}

fn lftp(lab: &mut Lab, commands: &[String]) -> LftpRun {
    let n = lab.runs + 1;
    let debug = lab.dir.join(format!("lftp-{n}.debug"));
    let script = format!(
        "{LFTP_SETTINGS}debug -o {} 5\nopen -u anonymous,e2e ftp://{}\n{}\nbye\n",
        debug.display(),
        lab.addrs().dial.ip(),
        commands.join("\n")
    );
    let path = lab.dir.join(format!("edge-{n}.lftp"));
    fs::write(&path, script).expect("write the lftp script");
    let path = path.to_string_lossy().into_owned();
    let args = ["lftp", "-f", &path];
    let cmd = lab.client_command(&args);
    let run = lab.run_bounded(cmd, &args);
    assert!(run.status.success(), "lftp failed\n{}", run.transcript);
    let log = fs::read_to_string(&debug).expect("lftp's debug log");
    let after = |marker: &str| -> Vec<String> {
        log.lines()
            .filter_map(|l| Some(l.split_once(marker)?.1.to_owned()))
            .collect()
    };
    LftpRun {
        sent: after("---> "),
        replies: after("<--- "),
        stdout: run.stdout,
    }
}

/// A Python script run as an FTP client: [`PY_PRELUDE`] and a body that uses it. It reports
/// each reply it receives and each checkpoint it reaches as one JSON line; at a checkpoint it
/// waits until the test has looked at the gateway.
pub(super) struct PyClient {
    child: Child,
    events: BufReader<ChildStdout>,
    /// The script's stderr and every event, shown when the test fails.
    transcript: PathBuf,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum Event {
    Reply(String),
    Checkpoint(String),
}

impl PyClient {
    /// `body` in the client namespace, dialling what the topology's client dials.
    pub(super) fn in_client(lab: &mut Lab, body: &str) -> PyClient {
        let host = lab.addrs().dial.ip().to_string();
        let args = PyClient::args(lab, body, &host);
        let cmd = lab.client_command(&args.iter().map(String::as_str).collect::<Vec<_>>());
        PyClient::spawn(lab, cmd)
    }

    /// `body` in the server's namespace, dialling vsftpd directly: what a client gets without
    /// ftp-alg.
    pub(super) fn in_server(lab: &mut Lab, body: &str) -> PyClient {
        let host = lab.addrs().server.to_string();
        let args = PyClient::args(lab, body, &host);
        let cmd = lab.exec(
            &lab.server_ns(),
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        PyClient::spawn(lab, cmd)
    }

    fn args(lab: &Lab, body: &str, host: &str) -> Vec<String> {
        require_tool("python3");
        vec![
            "python3".into(),
            "-c".into(),
            format!("{PY_PRELUDE}{body}"),
            host.into(),
            lab.dir.to_string_lossy().into_owned(),
        ]
    }

    fn spawn(lab: &mut Lab, mut cmd: Command) -> PyClient {
        lab.runs += 1;
        let transcript = lab.dir.join(format!("client-{}.txt", lab.runs));
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(create(&transcript))
            .spawn()
            .expect("spawn python3");
        let events = BufReader::new(child.stdout.take().expect("piped stdout"));
        PyClient {
            child,
            events,
            transcript,
        }
    }

    fn next_event(&mut self) -> Option<Event> {
        let mut line = String::new();
        self.events.read_line(&mut line).expect("read python3");
        if line.is_empty() {
            return None;
        }
        create(&self.transcript)
            .write_all(line.as_bytes())
            .expect("write the transcript");
        let event =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("python3 printed {line:?}: {e}"));
        Some(event)
    }

    /// The replies received until the script reaches `checkpoint`.
    pub(super) fn replies_until(&mut self, checkpoint: &str) -> Vec<String> {
        let mut replies = Vec::new();
        loop {
            match self.next_event() {
                Some(Event::Reply(reply)) => replies.push(reply),
                Some(Event::Checkpoint(name)) if name == checkpoint => return replies,
                other => panic!(
                    "waiting for checkpoint {checkpoint:?}, got {other:?} after {replies:#?}\n{}",
                    fs::read_to_string(&self.transcript).unwrap_or_default()
                ),
            }
        }
    }

    /// Lets the script go on from its checkpoint.
    pub(super) fn resume(&mut self) {
        // Unbuffered: the line reaches the script at once.
        writeln!(self.child.stdin.as_mut().expect("piped stdin")).expect("write python3");
    }

    /// Kills the script with SIGKILL, the way a client host that crashes or loses power
    /// vanishes: the kernel closes its sockets and nothing more is said on them.
    pub(super) fn vanish(mut self) {
        self.child.kill().expect("kill python3");
        self.child.wait().expect("wait python3");
    }

    /// The remaining replies; the script must end without error.
    pub(super) fn finish(mut self) -> Vec<String> {
        let mut replies = Vec::new();
        while let Some(event) = self.next_event() {
            match event {
                Event::Reply(reply) => replies.push(reply),
                Event::Checkpoint(name) => panic!("unexpected checkpoint {name:?}"),
            }
        }
        let status = self.child.wait().expect("wait python3");
        assert!(
            status.success(),
            "the Python client failed ({status}) after {replies:#?}\n{}",
            fs::read_to_string(&self.transcript).unwrap_or_default()
        );
        replies
    }
}

/// What every [`PyClient`] script starts with. Arguments: the host to dial, and the test
/// directory, where transfers are saved.
const PY_PRELUDE: &str = r#"
import ftplib, json, os, re, socket, sys

HOST, DIR = sys.argv[1], sys.argv[2]

def emit(**event):
    print(json.dumps(event), flush=True)

def checkpoint(name):
    emit(checkpoint=name)
    sys.stdin.readline()

class RecordingFTP(ftplib.FTP):
    """ftplib as it is, reporting every reply (multi-line ones joined by LF, as ftplib does)."""
    def getmultiline(self):
        reply = super().getmultiline()
        emit(reply=reply)
        return reply

class Control:
    """A raw control connection: sends exactly what it is given (several commands in one write
    when asked), and reports every reply exactly as it arrived, CRLFs included. It starts with
    the greeting read."""
    def __init__(self, host=HOST):
        self.sock = socket.create_connection((host, 21), timeout=10)
        self.buf = b""
        self.reply()

    def command(self, line):
        self.send(line + "\r\n")
        return self.reply()

    def send(self, text):
        self.sock.sendall(text.encode("latin-1"))

    def line(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("the control connection closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def reply(self):
        # RFC 959 4.2: a multi-line reply ends at a line of its code and a space.
        first = text = self.line()
        while first[3:4] == b"-":
            line = self.line()
            text += line
            if line[:3] == first[:3] and line[3:4] == b" ":
                break
        text = text.decode("latin-1")
        emit(reply=text)
        return text

    def listen(self):
        """A listener for an active-mode data connection, and the PORT command naming it."""
        ip = self.sock.getsockname()[0]
        listener = socket.create_server((ip, 0))
        listener.settimeout(10)
        port = listener.getsockname()[1]
        return listener, "PORT %s,%d,%d\r\n" % (ip.replace(".", ","), port >> 8, port & 255)

    def transfer(self, data, name, command=None):
        """Sends `command` (unless an earlier write held it), and reads its replies; on 150, the
        data connection (`data`: dialled, or a listener to accept it from) is read into DIR/name
        in between."""
        if command:
            self.send(command + "\r\n")
        if not self.reply().startswith("150"):
            return
        if data.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            data = data.accept()[0]
        with data, open(os.path.join(DIR, name), "wb") as f:
            while chunk := data.recv(1 << 16):
                f.write(chunk)
        self.reply()

def passive(reply):
    """Dials the endpoint of a 227 (its address) or 229 (a port of the control peer) reply."""
    numbers = re.search(r"(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)", reply)
    if reply.startswith("227") and numbers:
        n = numbers.groups()
        endpoint = (".".join(n[:4]), int(n[4]) * 256 + int(n[5]))
    else:
        endpoint = (HOST, int(re.search(r"\((.)\1\1(\d+)\1\)", reply).group(2)))
    return socket.create_connection(endpoint, timeout=10)
"#;

/// The session limits, with `max_sessions_per_client = 1` and `idle_timeout_secs = 2`: a second
/// control connection from the same client is answered 421 at once; a download that lasts
/// longer than the idle timeout (vsftpd sending at 350 kB/s) is not cut, since a control
/// connection is not idle while its transfer runs (RFC 6384 §12); once the transfer is over,
/// the silent session gets 421 and is closed.
pub fn session_limits_and_idle_timeout() {
    let mut lab = Lab::prepared(
        Topology::Gateway(Family::V4),
        Server::Vsftpd,
        Setup::AlgStopped,
        |_| "anon_max_rate=350000\n".to_owned(),
    );
    lab.alg_config = "[limits]\nmax_sessions_per_client = 1\nidle_timeout_secs = 2\n".to_owned();
    lab.start_alg();
    let replies = PyClient::in_client(&mut lab, LIMITS_SCRIPT).finish();
    assert_replies(
        "replies",
        &replies,
        &[
            "220 (vsFTPd 3.0.3)",
            "230",
            "421 Too many connections from your address; close some and try again.",
            "200",
            "227",
            "150",
            "226",
            "421 Idle timeout; closing control connection.",
        ],
    );
    assert_eq!(
        lab.read(&lab.dir.join("slow.bin")),
        lab.read(&lab.served_path()),
        "the slow download"
    );
    let took: f64 = fs::read_to_string(lab.dir.join("took.txt"))
        .expect("the transfer time")
        .trim()
        .parse()
        .expect("a number of seconds");
    assert!(
        took > 2.0,
        "the download took {took} s, not longer than the idle timeout: the test shows nothing"
    );
    lab.assert_no_pinholes_left();
}

const LIMITS_SCRIPT: &str = r#"
import time
ftp = RecordingFTP()
ftp.connect(HOST, 21, timeout=10)
ftp.login()
second = socket.create_connection((HOST, 21), timeout=10)
emit(reply=second.makefile("rb").readline().decode().rstrip("\r\n"))
second.close()
start = time.monotonic()
with open(os.path.join(DIR, "slow.bin"), "wb") as f:
    ftp.retrbinary("RETR data.bin", f.write)
with open(os.path.join(DIR, "took.txt"), "w") as f:
    f.write(str(time.monotonic() - start))
# The idle timeout's 421, however long it takes to come (up to the socket's 10 s).
ftp.getmultiline()
"#;

/// `policy.read_only`: STOR is answered 550 by the gateway and never reaches the server, while
/// downloads go on as before.
pub fn read_only_policy_refuses_uploads() {
    let mut lab = Lab::new(Topology::Gateway(Family::V4), Setup::AlgStopped);
    lab.alg_config = "[policy]\nread_only = true\n".to_owned();
    lab.start_alg();
    let replies = PyClient::in_client(&mut lab, READ_ONLY_SCRIPT).finish();
    assert_replies(
        "replies",
        &replies,
        &[
            "220 (vsFTPd 3.0.3)",
            "230",
            "200",
            "227",
            "550 Command not allowed by gateway policy.",
            "200",
            "227",
            "150",
            "226",
            "221",
        ],
    );
    assert!(
        !ServerLog::read(&lab)
            .commands()
            .iter()
            .any(|c| c.starts_with("STOR")),
        "STOR reached the server"
    );
    assert_eq!(
        lab.read(&lab.dir.join("got.bin")),
        lab.read(&lab.served_path()),
        "the download"
    );
    lab.assert_no_pinholes_left();
}

const READ_ONLY_SCRIPT: &str = r#"
import io
ftp = RecordingFTP()
ftp.connect(HOST, 21, timeout=10)
ftp.login()
try:
    ftp.storbinary("STOR up.bin", io.BytesIO(b"x"))
except ftplib.error_perm:
    pass
with open(os.path.join(DIR, "got.bin"), "wb") as f:
    ftp.retrbinary("RETR data.bin", f.write)
ftp.quit()
"#;

/// `policy.deny_servers`: a gateway client that dials a denied server gets 421 from the gateway
/// and the connection closes; the command it sends anyway reaches nobody: the server never
/// sees the connection (it logs no greeting and no command).
pub fn denied_server_network_gets_421() {
    let mut lab = Lab::new(Topology::Gateway(Family::V4), Setup::AlgStopped);
    lab.alg_config = "[policy]\ndeny_servers = [\"203.0.113.0/24\"]\n".to_owned();
    lab.start_alg();
    let replies = PyClient::in_client(&mut lab, DENIED_SCRIPT).finish();
    assert_replies(
        "replies",
        &replies,
        &["421 Not allowed by gateway policy.", "(closed)"],
    );
    let log = ServerLog::read(&lab);
    assert!(
        log.commands().is_empty() && log.responses().is_empty(),
        "the denied server was reached: {:?} {:?}",
        log.commands(),
        log.responses()
    );
}

/// Reads the greeting, sends USER anyway, and reads until the gateway closes.
const DENIED_SCRIPT: &str = r#"
control = socket.create_connection((HOST, 21), timeout=10)
reader = control.makefile("rb")
emit(reply=reader.readline().decode().rstrip("\r\n"))
try:
    control.sendall(b"USER anonymous\r\n")
    rest = reader.read()
except OSError:
    rest = b""
emit(reply=rest.decode() or "(closed)")
"#;

/// A gateway does not proxy to its own addresses (nor to loopback, link-local or multicast
/// ones): its upstream connection starts on the gateway, where the forward policy that keeps
/// clients away from them does not apply. A listener on the gateway's LAN address, port 21,
/// stands for a service that trusts connections from the gateway itself. With
/// `policy.allow_local_servers` the same session does reach it, and its connection carries
/// `proxy.upstream_mark`, which the operator's output chain counts here.
pub fn gateway_does_not_proxy_to_itself() {
    for allow_local in [false, true] {
        let mut lab = Lab::new(Topology::Gateway(Family::V4), Setup::AlgStopped);
        lab.alg_config = format!("[policy]\nallow_local_servers = {allow_local}\n");
        lab.start_alg();
        lab.nft(&[
            "insert rule inet gateway output meta mark 0x0000f7a1 tcp dport 21 counter accept",
        ]);
        let service = SocketAddr::new(G_LAN4.parse().expect("an address"), 21);
        let victim = super::hostile::Victim::start_at(&lab, &lab.gateway_ns(), service);
        let replies = PyClient::in_client(&mut lab, SELF_SCRIPT).finish();
        let counted = must(lab.exec(
            &lab.gateway_ns(),
            &["nft", "list", "chain", "inet", "gateway", "output"],
        ));
        let marked = counted
            .lines()
            .find(|l| l.contains("0x0000f7a1") && l.contains("counter"))
            .unwrap_or_default()
            .to_owned();
        if allow_local {
            let gateway: IpAddr = G_LAN4.parse().expect("an address");
            victim.assert_reached_only_by(&[gateway]);
            assert!(
                !marked.contains("packets 0 "),
                "the upstream connection was not marked: {marked}"
            );
        } else {
            assert_replies("replies", &replies, &["421 Not allowed by gateway policy."]);
            victim.assert_reached_only_by(&[]);
        }
    }
}

/// Dials the gateway's own LAN address, port 21, which the gateway intercepts.
const SELF_SCRIPT: &str = r#"
control = socket.create_connection(("198.18.0.1", 21), timeout=10)
emit(reply=control.makefile("rb").readline().decode().rstrip("\r\n"))
"#;
