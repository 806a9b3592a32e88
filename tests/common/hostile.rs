//! Hostile control lines end to end (issue 10, "a line means the same to ftp-alg as to the
//! server"): one `pub fn` per `#[test]` of `tests/e2e_hostile.rs`.
//!
//! A raw client ([`PROBE`], a Python script on a plain socket: it sends exactly the bytes it is
//! given) logs in and sends each case followed by `SYST`. `SYST` is the sync mark: every server
//! here answers it `215` and nothing else does, so the replies between two `215`s are the case's,
//! and the commands the server logged between two `SYST`s are what it executed of the case.
//! Each case is checked against two readings: what ftp-alg makes of it (refused with its `500`,
//! or forwarded as its canonical text) and what the server logged, as that server writes a
//! command into its log.
//!
//! The three confirmed attacks run with a victim listener where each attack points, which must
//! never be reached. Attack (c), a 227 that answers no PASV, needs a server that sends one, and
//! no real server does: for that case only, a scripted server ([`SCRIPTED_SERVER`], Python)
//! takes the real one's place.

use ftp_alg::ftp::{canonical, LineBuffer};

use super::edge::{assert_replies, PyClient};
use super::*;

/// ftp-alg's answer to a line it refuses (`ftp::canonical`).
pub const REFUSED: &str = "500 Syntax error: control characters or a malformed command name.";

/// What a case's lines became, in order, as ftp-alg reads them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Forwarded as this text (CR LF appended).
    Forward(Vec<u8>),
    /// Answered with [`REFUSED`], never forwarded.
    Refuse,
}

/// One case as sent and as observed.
#[derive(Debug)]
struct Observed {
    pub sent: Vec<u8>,
    /// The replies the client got for the case (multi-line ones whole, terminators included).
    pub replies: Vec<String>,
    /// The commands the server logged for the case.
    pub commands: Vec<String>,
}

/// Where the probe's lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// Through the daemon, from the client namespace.
    ThroughAlg,
    /// Straight to the server, from its own namespace: the server's own reading.
    Direct,
}

/// Logs in, sends every batch in one write (each case followed by `SYST`), reads every reply,
/// and quits. Returns each case with its replies and the commands the server logged for it.
fn probe(lab: &mut Lab, path: Path, batches: &[Vec<Vec<u8>>]) -> Vec<Observed> {
    let (user, password) = lab.server.login();
    let latin1 = |b: &[u8]| b.iter().map(|&b| char::from(b)).collect::<String>();
    let spec = serde_json::json!({
        "login": [format!("USER {user}"), format!("PASS {password}")],
        "batches": batches
            .iter()
            .map(|batch| batch.iter().map(|case| latin1(case)).collect::<Vec<_>>())
            .collect::<Vec<_>>(),
    });
    fs::write(lab.dir.join(PROBE_SPEC), spec.to_string()).expect("write the probe's cases");
    let client = match path {
        Path::ThroughAlg => PyClient::in_client(lab, PROBE),
        Path::Direct => PyClient::in_server(lab, PROBE),
    };
    let replies = client.finish();
    let cases: Vec<&Vec<u8>> = batches.iter().flatten().collect();

    // The greeting and the login's two replies come first, QUIT's 221 last.
    let mut chunks = vec![Vec::new()];
    for reply in replies.iter().skip(3) {
        if reply.starts_with("215 ") {
            chunks.push(Vec::new());
        } else {
            chunks.last_mut().expect("a chunk").push(reply.clone());
        }
    }
    let last = chunks.pop().expect("QUIT's chunk");
    assert!(
        last.len() == 1 && last[0].starts_with("221"),
        "after the last SYST: {last:?}"
    );
    assert_eq!(chunks.len(), cases.len(), "one 215 per case: {replies:#?}");

    let logged = logged_commands(lab, cases.len());
    cases
        .into_iter()
        .zip(chunks)
        .zip(logged)
        .map(|((sent, replies), commands)| Observed {
            sent: sent.clone(),
            replies,
            commands,
        })
        .collect()
}

/// The commands the server logged after the login, cut at each `SYST` into `cases` chunks;
/// waits (up to 5 s) for QUIT to be logged, since proftpd writes its `ExtendedLog` line after
/// it has sent the reply.
fn logged_commands(lab: &Lab, cases: usize) -> Vec<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while ServerLog::read(lab).commands().last() != Some(&"QUIT") {
        assert!(
            Instant::now() < deadline,
            "the server has not logged QUIT: {:#?}",
            ServerLog::read(lab).commands()
        );
        sleep(Duration::from_millis(50));
    }
    let commands = commands_after_login(lab);
    let mut chunks = vec![Vec::new()];
    for command in &commands[..commands.len() - 1] {
        if command == "SYST" {
            chunks.push(Vec::new());
        } else {
            chunks.last_mut().expect("a chunk").push(command.clone());
        }
    }
    let rest = chunks.pop().expect("after the last SYST");
    assert!(rest.is_empty(), "commands after the last SYST: {rest:?}");
    assert_eq!(chunks.len(), cases, "one SYST per case: {commands:#?}");
    chunks
}

/// The probe's cases, written by [`probe`] into the test directory.
const PROBE_SPEC: &str = "probe.json";

/// Reads [`PROBE_SPEC`]: the login lines and batches of cases (latin-1 text: each character is a
/// byte). Sends each batch in one write, every case followed by `SYST`, then reads replies until
/// it has a 215 for each case of the batch.
const PROBE: &str = r#"
spec = json.load(open(os.path.join(DIR, "probe.json")))
c = Control()
for line in spec["login"]:
    c.command(line)
for batch in spec["batches"]:
    c.send("".join(case + "SYST\r\n" for case in batch))
    synced = 0
    while synced < len(batch):
        if c.reply().startswith("215 "):
            synced += 1
c.command("QUIT")
"#;

/// What ftp-alg makes of `bytes` sent on a control connection, line by line: the library's own
/// framing and `canonical::command`, the code the daemon runs.
pub fn alg_reading(bytes: &[u8]) -> Vec<Fate> {
    alg_reading_with(bytes, ftp_alg::ftp::framing::DEFAULT_MAX_LINE)
}

/// [`alg_reading`] with `proxy.max_line = max_line`.
fn alg_reading_with(bytes: &[u8], max_line: usize) -> Vec<Fate> {
    let mut lines = LineBuffer::new(max_line);
    lines.push(bytes);
    let mut fates = Vec::new();
    while let Some(line) = lines.next_line() {
        let raw = line.expect("the cases are shorter than proxy.max_line");
        fates.push(canonical::command(&raw).map_or(Fate::Refuse, Fate::Forward));
    }
    assert_eq!(lines.pending(), 0, "every case ends with a line feed");
    fates
}

/// How `server` writes a command it received as `text` (one plain line: no control byte,
/// a letters-only verb, blanks only SP) into the log [`ServerLog`] reads, as `server_readings`
/// shows it: vsftpd upper-cases the verb, writes the argument after the first SP and `?` for
/// every byte outside printable ASCII; proftpd (`%r`) upper-cases the verb and joins the
/// argument's words with one SP; pure-ftpd writes the argument after the first SP (the harness
/// upper-cases its verb and trims the end).
pub fn logged_as(server: Server, text: &[u8]) -> String {
    let (verb, arg) = split_verb(text);
    let verb = String::from_utf8_lossy(verb).to_ascii_uppercase();
    let arg = match server {
        Server::Vsftpd => arg
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    char::from(b)
                } else {
                    '?'
                }
            })
            .collect(),
        Server::Proftpd => String::from_utf8_lossy(
            &arg.split(|&b| b == b' ')
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(&b' '),
        )
        .into_owned(),
        Server::PureFtpd => String::from_utf8_lossy(arg).trim_end().to_owned(),
    };
    if arg.is_empty() {
        verb
    } else {
        format!("{verb} {arg}")
    }
}

/// The verb and the argument of a plain line: split at the first SP, as every server does with
/// a line ftp-alg forwards.
fn split_verb(text: &[u8]) -> (&[u8], &[u8]) {
    match text.iter().position(|&b| b == b' ') {
        Some(sp) => (&text[..sp], &text[sp + 1..]),
        None => (text, &[]),
    }
}

/// The `550` a server that echoes the argument of a failed CWD sends for `arg`, exactly: the
/// argument as the server read it, byte for byte (vsftpd does not echo it).
fn cwd_echo(server: Server, arg: &[u8]) -> Option<Vec<u8>> {
    let (before, after): (&[u8], &[u8]) = match server {
        Server::Vsftpd => return None,
        Server::Proftpd => (b"550 ", b": No such file or directory\r\n"),
        Server::PureFtpd => (
            b"550 Can't change directory to ",
            b": No such file or directory\r\n",
        ),
    };
    Some([before, arg, after].concat())
}

/// A reply as the probe reported it: latin-1, one character per byte.
fn bytes_of(reply: &str) -> Vec<u8> {
    reply.chars().map(|c| c as u8).collect()
}

/// Whether `o` went through ftp-alg as `fates` say, and the server executed exactly what ftp-alg
/// forwarded: every refused line answered with [`REFUSED`] and absent from the server's log,
/// every forwarded line answered by the server and logged as the server logs that text, and a
/// failed CWD's echo (proftpd, pure-ftpd) carrying exactly the forwarded argument. `Err` says
/// what differs.
fn check(server: Server, o: &Observed, fates: &[Fate]) -> Result<(), String> {
    let refused = format!("{REFUSED}\r\n");
    if o.replies.len() != fates.len() {
        return Err(format!(
            "{} replies for {} lines: {:?}",
            o.replies.len(),
            fates.len(),
            o.replies
        ));
    }
    let mut forwarded = Vec::new();
    for (fate, reply) in fates.iter().zip(&o.replies) {
        match fate {
            Fate::Refuse if *reply != refused => {
                return Err(format!("a refused line was answered {reply:?}"))
            }
            Fate::Refuse => {}
            Fate::Forward(_) if *reply == refused => {
                return Err("a line ftp-alg should forward was refused".into())
            }
            Fate::Forward(text) => {
                forwarded.push(logged_as(server, text));
                let (verb, arg) = split_verb(text);
                let echo = cwd_echo(server, arg);
                if verb.eq_ignore_ascii_case(b"CWD") && reply.starts_with("550") {
                    if let Some(echo) = echo.filter(|e| *e != bytes_of(reply)) {
                        return Err(format!(
                            "the server read another argument: it answered {reply:?}, \
                             expected {:?}",
                            String::from_utf8_lossy(&echo)
                        ));
                    }
                }
            }
        }
    }
    if o.commands != forwarded {
        return Err(format!(
            "the server logged {:?}, ftp-alg forwarded {forwarded:?}",
            o.commands
        ));
    }
    Ok(())
}

/// One hand-written hostile case: what it is, its bytes, and what ftp-alg must make of each of
/// its lines (`None`: refused; `Some(text)`: forwarded as `text`).
struct Case {
    name: &'static str,
    bytes: &'static [u8],
    fates: &'static [Option<&'static [u8]>],
}

/// The 227 smuggled in attack (a), naming the server's own address as it is in the reverse
/// topology and port 2222 (8 * 256 + 174).
const SMUGGLED_227: &[u8] = b"227 Entering Passive Mode (203,0,113,2,8,174)";

/// The hostile lines of the per-line suite. None of them may leave a server in another state
/// than logged in at the root: the probe sends them one after the other in one session.
const CASES: &[Case] = &[
    Case {
        name: "CR inside the argument",
        bytes: b"CWD a\rb\r\n",
        fates: &[None],
    },
    Case {
        name: "CR CR LF",
        bytes: b"CWD nx\r\r\n",
        fates: &[None],
    },
    Case {
        name: "CR before a hidden PORT",
        bytes: b"CWD x\rPORT 203,0,113,1,8,174\r\n",
        fates: &[None],
    },
    Case {
        name: "bare LF ends a line",
        bytes: b"CWD nx\n",
        fates: &[Some(b"CWD nx")],
    },
    Case {
        name: "bare LF between two commands",
        bytes: b"CWD nx\nNOOP\r\n",
        fates: &[Some(b"CWD nx"), Some(b"NOOP")],
    },
    Case {
        name: "attack a: LF then a 227",
        bytes: b"CWD nx\n227 Entering Passive Mode (203,0,113,2,8,174)\r\n",
        fates: &[Some(b"CWD nx"), None],
    },
    Case {
        name: "LF then a 229",
        bytes: b"CWD nx\n229 Entering Extended Passive Mode (|||2222|)\r\n",
        fates: &[Some(b"CWD nx"), None],
    },
    Case {
        name: "FF then a 227",
        bytes: b"CWD nx\x0c227 Entering Passive Mode (203,0,113,2,8,174)\r\n",
        fates: &[None],
    },
    Case {
        name: "attack b: VT after PORT",
        bytes: b"PORT\x0b203,0,113,1,8,174\r\n",
        fates: &[None],
    },
    Case {
        name: "VT after the verb",
        bytes: b"CWD\x0bnx\r\n",
        fates: &[None],
    },
    Case {
        name: "VT in the argument",
        bytes: b"CWD n\x0bx\r\n",
        fates: &[None],
    },
    Case {
        name: "FF after the verb",
        bytes: b"CWD\x0cnx\r\n",
        fates: &[None],
    },
    Case {
        name: "TAB after the verb",
        bytes: b"CWD\tnx\r\n",
        fates: &[None],
    },
    Case {
        name: "TAB in the argument",
        bytes: b"CWD a\tb\r\n",
        fates: &[None],
    },
    Case {
        name: "NUL in the argument",
        bytes: b"CWD nx\x00y\r\n",
        fates: &[None],
    },
    Case {
        name: "NUL before a hidden PORT",
        bytes: b"NOOP\x00PORT 203,0,113,1,8,174\r\n",
        fates: &[None],
    },
    Case {
        name: "NUL before CR LF",
        bytes: b"CWD nx\x00\r\n",
        fates: &[None],
    },
    Case {
        name: "SOH in the argument",
        bytes: b"CWD a\x01b\r\n",
        fates: &[None],
    },
    Case {
        name: "ESC sequence",
        bytes: b"CWD a\x1b[2Jb\r\n",
        fates: &[None],
    },
    Case {
        name: "DEL in the argument",
        bytes: b"CWD a\x7fb\r\n",
        fates: &[None],
    },
    Case {
        name: "IAC IAC (a literal 0xFF)",
        bytes: b"CWD a\xff\xffb\r\n",
        fates: &[None],
    },
    Case {
        name: "IAC IP, IAC DM before the verb",
        bytes: b"\xff\xf4\xff\xf2NOOP\r\n",
        fates: &[Some(b"NOOP")],
    },
    Case {
        name: "IAC NOP inside the verb",
        bytes: b"NO\xff\xf1OP\r\n",
        fates: &[Some(b"NOOP")],
    },
    Case {
        name: "IAC NOP inside a PORT verb",
        bytes: b"PO\xff\xf1RT\x0b203,0,113,1,8,174\r\n",
        fates: &[None],
    },
    Case {
        name: "IAC WILL option in the argument",
        bytes: b"CWD n\xff\xfb\x01x\r\n",
        fates: &[Some(b"CWD nx")],
    },
    Case {
        name: "IAC DO option inside the verb",
        bytes: b"NO\xff\xfd\x22OP\r\n",
        fates: &[Some(b"NOOP")],
    },
    Case {
        name: "IAC and a letter",
        bytes: b"CWD n\xffAx\r\n",
        fates: &[Some(b"CWD nx")],
    },
    Case {
        name: "IAC cut off by the line end",
        bytes: b"NOOP\xff\r\n",
        fates: &[Some(b"NOOP")],
    },
    Case {
        name: "leading SP",
        bytes: b" NOOP\r\n",
        fates: &[None],
    },
    Case {
        name: "leading TAB",
        bytes: b"\tNOOP\r\n",
        fates: &[None],
    },
    Case {
        name: "empty line",
        bytes: b"\r\n",
        fates: &[None],
    },
    Case {
        name: "empty line, bare LF",
        bytes: b"\n",
        fates: &[None],
    },
    Case {
        name: "a 227 as a command",
        bytes: b"227 Entering Passive Mode (203,0,113,2,8,174)\r\n",
        fates: &[None],
    },
    Case {
        name: "digit in the verb",
        bytes: b"X1 a\r\n",
        fates: &[None],
    },
    Case {
        name: "punctuation in the verb",
        bytes: b"NO-OP\r\n",
        fates: &[None],
    },
    Case {
        name: "non-ASCII verb",
        bytes: b"\xc3\xa9TAT\r\n",
        fates: &[None],
    },
    Case {
        name: "lower-case verb",
        bytes: b"noop\r\n",
        fates: &[Some(b"noop")],
    },
    Case {
        name: "blanks around the argument",
        bytes: b"CWD   nx  \r\n",
        fates: &[Some(b"CWD   nx  ")],
    },
    Case {
        name: "SP after a bare verb",
        bytes: b"NOOP \r\n",
        fates: &[Some(b"NOOP ")],
    },
    Case {
        name: "UTF-8 argument",
        bytes: b"CWD \xc3\xa9t\xc3\xa9 \xe6\x97\xa5\r\n",
        fates: &[Some(b"CWD \xc3\xa9t\xc3\xa9 \xe6\x97\xa5")],
    },
    Case {
        name: "bytes 0x80-0xFE in the argument",
        bytes: b"CWD \x80\x9f\xa0\xfe\r\n",
        fates: &[Some(b"CWD \x80\x9f\xa0\xfe")],
    },
    Case {
        name: "pipelined mixture",
        bytes: b"NOOP\r\nCWD a\x0bb\r\nCWD nx\nPORT\x0c1,2,3,4,5,6\r\n\r\nnoop\n",
        fates: &[
            Some(b"NOOP"),
            None,
            Some(b"CWD nx"),
            None,
            None,
            Some(b"noop"),
        ],
    },
    Case {
        name: "pipelined Telnet and IAC IAC",
        bytes: b"\xff\xf4\xff\xf2NOOP\r\nCWD x\xff\xff\r\nCWD n\xff\xf1x\n",
        fates: &[Some(b"NOOP"), None, Some(b"CWD nx")],
    },
    Case {
        name: "three bare-LF lines",
        bytes: b"NOOP\nCWD nx\nNOOP\n",
        fates: &[Some(b"NOOP"), Some(b"CWD nx"), Some(b"NOOP")],
    },
];

/// Lengths of the long lines the per-line suite adds, CR LF included: around the 512- and
/// 1024-byte buffers a server could cut a command at, and close to `proxy.max_line` (2048), but
/// short enough that proftpd's and pure-ftpd's 550 echoing the argument stays under ftp-alg's
/// own reply limit (the same 2048 bytes; a longer reply ends the session with 421).
const LONG_LINES: &[usize] = &[511, 512, 513, 1023, 1024, 1025, 1900];

/// The per-line suite against `server`, through the daemon (reverse topology): every case in
/// [`CASES`], and a CWD of each of [`LONG_LINES`], must be read by ftp-alg as the case says
/// (checked against the library too), and [`check`] must hold for it. Prints one line per case,
/// and a count.
pub fn hostile_lines(server: Server) {
    let mut cases: Vec<(String, Vec<u8>, Vec<Fate>)> = CASES
        .iter()
        .map(|case| {
            let fates = case.fates.iter();
            let fates = fates.map(|f| f.map_or(Fate::Refuse, |t| Fate::Forward(t.to_vec())));
            (case.name.to_owned(), case.bytes.to_vec(), fates.collect())
        })
        .collect();
    for &len in LONG_LINES {
        // Short path components: a long one would be answered "File name too long".
        let path = b"abcdefg/".iter().cycle().take(len - 6).copied();
        let text: Vec<u8> = b"CWD ".iter().copied().chain(path).collect();
        let bytes = [&text[..], b"\r\n"].concat();
        cases.push((format!("{len}-byte line"), bytes, vec![Fate::Forward(text)]));
    }
    let mut failures = Vec::new();
    for (name, bytes, fates) in &cases {
        let read = alg_reading(bytes);
        if read != *fates {
            failures.push(format!(
                "{name}: the case says {fates:?}, ftp-alg's code reads {read:?}"
            ));
        }
    }
    let mut lab = Lab::with_server(Topology::Reverse(Family::V4), server, Setup::Alg);
    let batch: Vec<Vec<u8>> = cases.iter().map(|(_, bytes, _)| bytes.clone()).collect();
    let observed = probe(&mut lab, Path::ThroughAlg, &[batch]);
    for ((name, bytes, _), o) in cases.iter().zip(&observed) {
        let result = check(server, o, &alg_reading(bytes));
        eprintln!(
            "{:<10} {name:<40} {}",
            server.name(),
            result
                .as_ref()
                .map_or_else(|e| format!("FAIL: {e}"), |()| "pass".into())
        );
        if let Err(e) = result {
            failures.push(format!("{name}: {e}"));
        }
    }
    eprintln!(
        "{}: {}/{} hostile cases pass",
        server.name(),
        cases.len() - failures.len(),
        cases.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");
    lab.assert_no_pinholes_left();
}

/// Each server's own reading of CR, LF, VT, FF, NUL and IAC in a command, from a raw client in
/// its namespace with no ftp-alg: the facts `ftp::canonical` rests on (TESTING-NOTES.md), so
/// that a server upgrade that changes them is noticed. Prints what each case did.
pub fn server_readings(server: Server) {
    let mut lab = Lab::with_server(Topology::Reverse(Family::V4), server, Setup::AlgStopped);
    let cases: Vec<Vec<u8>> = READINGS.iter().map(|r| r.bytes.to_vec()).collect();
    let observed = probe(&mut lab, Path::Direct, &[cases]);
    let mut wrong = Vec::new();
    for (reading, o) in READINGS.iter().zip(&observed) {
        let (logged, replies) = match server {
            Server::Vsftpd => (reading.vsftpd.0, reading.vsftpd.1),
            Server::Proftpd => (reading.proftpd.0, reading.proftpd.1),
            Server::PureFtpd => (reading.pure_ftpd.0, reading.pure_ftpd.1),
        };
        eprintln!(
            "{:<10} {:<28} logged {:?}, answered {:?}",
            server.name(),
            reading.name,
            o.commands,
            o.replies
        );
        let got_replies: Vec<&str> = o
            .replies
            .iter()
            .map(|r| r.trim_end_matches("\r\n"))
            .collect();
        if o.commands != logged || got_replies != replies {
            wrong.push(format!(
                "{}: logged {:?}, answered {got_replies:?}; expected {logged:?}, {replies:?}",
                reading.name, o.commands
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} reads these lines otherwise than it did (TESTING-NOTES.md): {wrong:#?}",
        server.name()
    );
}

/// What one line does to each server: the commands it logged, and its replies (without their
/// final CR LF). Logged text is lossy UTF-8 (`\u{fffd}` for bytes that are not) and vsftpd logs
/// `?` for any byte outside printable ASCII.
struct Reading {
    name: &'static str,
    bytes: &'static [u8],
    vsftpd: (&'static [&'static str], &'static [&'static str]),
    proftpd: (&'static [&'static str], &'static [&'static str]),
    pure_ftpd: (&'static [&'static str], &'static [&'static str]),
}

const READINGS: &[Reading] = &[
    Reading {
        name: "CR inside",
        bytes: b"CWD a\rb\r\n",
        vsftpd: (&["CWD a?b"], &["550 Failed to change directory."]),
        proftpd: (&["CWD a b"], &["550 a\rb: No such file or directory"]),
        pure_ftpd: (
            &["CWD a_b"],
            &["550 Can't change directory to a_b: No such file or directory"],
        ),
    },
    Reading {
        name: "bare LF inside",
        bytes: b"CWD nx\n227 Entering Passive Mode (203,0,113,2,8,174)\r\n",
        vsftpd: (
            &["CWD nx", "227 Entering Passive Mode (203,0,113,2,8,174)"],
            &["550 Failed to change directory.", "500 Unknown command."],
        ),
        // proftpd reads one command, and its echo puts the smuggled 227 at the start of a line.
        proftpd: (
            &["CWD nx 227 Entering Passive Mode (203,0,113,2,8,174)"],
            &[
                "550 nx\n",
                "227 Entering Passive Mode (203,0,113,2,8,174): No such file or directory",
            ],
        ),
        pure_ftpd: (
            &["CWD nx", "227 Entering Passive Mode (203,0,113,2,8,174)"],
            &[
                "550 Can't change directory to nx: No such file or directory",
                "500 Unknown command",
            ],
        ),
    },
    Reading {
        name: "VT after the verb",
        bytes: b"PORT\x0b203,0,113,2,8,174\r\n",
        vsftpd: (&["PORT?203,0,113,2,8,174"], &["500 Unknown command."]),
        // proftpd splits the verb at VT: it runs the PORT.
        proftpd: (
            &["PORT 203,0,113,2,8,174"],
            &["200 PORT command successful"],
        ),
        // pure-ftpd answers nothing and logs nothing.
        pure_ftpd: (&[], &[]),
    },
    Reading {
        name: "FF after the verb",
        bytes: b"CWD\x0cnx\r\n",
        vsftpd: (&["CWD?NX"], &["500 Unknown command."]),
        proftpd: (&["CWD nx"], &["550 nx: No such file or directory"]),
        pure_ftpd: (&[], &[]),
    },
    Reading {
        name: "TAB after the verb",
        bytes: b"CWD\tnx\r\n",
        vsftpd: (&["CWD?NX"], &["500 Unknown command."]),
        proftpd: (&["CWD nx"], &["550 nx: No such file or directory"]),
        pure_ftpd: (&[], &[]),
    },
    Reading {
        name: "NUL inside",
        bytes: b"CWD nx\x00y\r\n",
        vsftpd: (&["CWD nx?y"], &["550 Failed to change directory."]),
        // proftpd ends the command at the NUL.
        proftpd: (&["CWD nx"], &["550 nx: No such file or directory"]),
        pure_ftpd: (
            &["CWD nx_y"],
            &["550 Can't change directory to nx_y: No such file or directory"],
        ),
    },
    Reading {
        name: "IAC IAC",
        bytes: b"CWD n\xff\xffx\r\n",
        vsftpd: (&["CWD n??x"], &["550 Failed to change directory."]),
        // proftpd reads one 0xFF; vsftpd and pure-ftpd two.
        proftpd: (
            &["CWD n\u{fffd}x"],
            &["550 n\u{ff}x: No such file or directory"],
        ),
        pure_ftpd: (
            &["CWD n\u{fffd}\u{fffd}x"],
            &["550 Can't change directory to n\u{ff}\u{ff}x: No such file or directory"],
        ),
    },
    Reading {
        name: "IAC NOP",
        bytes: b"CWD n\xff\xf1x\r\n",
        vsftpd: (&["CWD n??x"], &["550 Failed to change directory."]),
        proftpd: (
            &["CWD n\u{fffd}\u{fffd}x"],
            &["550 n\u{ff}\u{f1}x: No such file or directory"],
        ),
        pure_ftpd: (
            &["CWD n\u{fffd}\u{fffd}x"],
            &["550 Can't change directory to n\u{ff}\u{f1}x: No such file or directory"],
        ),
    },
    Reading {
        name: "other controls inside",
        bytes: b"CWD n\x01\x1b\x7fx\r\n",
        vsftpd: (&["CWD n???x"], &["550 Failed to change directory."]),
        proftpd: (
            &["CWD n\u{1}\u{1b}\u{7f}x"],
            &["550 n\u{1}\u{1b}\u{7f}x: No such file or directory"],
        ),
        pure_ftpd: (
            &["CWD n___x"],
            &["550 Can't change directory to n___x: No such file or directory"],
        ),
    },
    Reading {
        name: "leading SP",
        bytes: b" NOOP\r\n",
        vsftpd: (&[" NOOP"], &["500 Unknown command."]),
        proftpd: (&[], &["500 Invalid command: try being more creative"]),
        pure_ftpd: (&[], &[]),
    },
    Reading {
        name: "empty line",
        bytes: b"\r\n",
        vsftpd: (&[], &[]),
        proftpd: (&[], &["500 Invalid command: try being more creative"]),
        pure_ftpd: (&[], &[]),
    },
];

/// How many generated lines the differential test sends to each server, and how many go in one
/// write.
const GENERATED_LINES: usize = 3000;
const GENERATED_BATCH: usize = 150;
/// The generator's seed: the same lines for every server. `HOSTILE_SEED` picks others.
const GENERATED_SEED: u64 = 0x0010_f7a1_2026;

/// The differential test: [`GENERATED_LINES`] seeded pseudo-random lines (control bytes in every
/// position, blank variants, CR and LF placements, Telnet sequences, IAC IAC) through the
/// daemon (reverse) to `server`, in one session; for every line, ftp-alg's decision (its
/// library's reading: forwarded text or refused) must be what the client saw and what the server
/// logged, by [`check`]. Prints a summary and the first disagreements.
pub fn differential(server: Server) {
    let seed = std::env::var("HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(GENERATED_SEED);
    let mut dice = Dice::new(seed);
    let lines: Vec<Vec<u8>> = (0..GENERATED_LINES)
        .map(|_| generated_line(&mut dice))
        .collect();
    let batches: Vec<Vec<Vec<u8>>> = lines.chunks(GENERATED_BATCH).map(<[_]>::to_vec).collect();

    let started = Instant::now();
    let mut lab = Lab::with_server(Topology::Reverse(Family::V4), server, Setup::Alg);
    let observed = probe(&mut lab, Path::ThroughAlg, &batches);
    let (mut forwarded, mut refused, mut disagreements) = (0, 0, Vec::new());
    for o in &observed {
        let fates = alg_reading(&o.sent);
        forwarded += fates
            .iter()
            .filter(|f| matches!(f, Fate::Forward(_)))
            .count();
        refused += fates.iter().filter(|f| **f == Fate::Refuse).count();
        if let Err(e) = check(server, o, &fates) {
            disagreements.push(format!("{:?}: {e}", String::from_utf8_lossy(&o.sent)));
        }
    }
    eprintln!(
        "{}: seed {seed:#x}, {} cases ({forwarded} lines forwarded, {refused} refused), \
         {} disagreements, {:?}",
        server.name(),
        observed.len(),
        disagreements.len(),
        started.elapsed()
    );
    for d in disagreements.iter().take(10) {
        eprintln!("  {d}");
    }
    assert!(
        forwarded > GENERATED_LINES / 4 && refused > GENERATED_LINES / 4,
        "the generator should make plenty of both"
    );
    assert!(
        disagreements.is_empty(),
        "{} of {} cases read differently",
        disagreements.len(),
        observed.len()
    );
    lab.assert_no_pinholes_left();
}

/// Seeded choices, from the harness's xorshift bytes.
struct Dice {
    bytes: Vec<u8>,
}

impl Dice {
    fn new(seed: u64) -> Dice {
        Dice {
            bytes: pseudo_random(GENERATED_LINES * 64, seed),
        }
    }

    /// A number below `n` (at most 256).
    fn below(&mut self, n: usize) -> usize {
        usize::from(self.bytes.pop().expect("enough random bytes")) % n
    }

    fn pick<'a>(&mut self, from: &[&'a [u8]]) -> &'a [u8] {
        from[self.below(from.len())]
    }

    /// True once in `n`.
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// Verbs whose every argument leaves the session as it was (logged in, at the root, no data
/// connection pending), and one no server knows.
const VERBS: &[&[u8]] = &[
    b"CWD", b"cwd", b"Cwd", b"NOOP", b"noop", b"MDTM", b"SIZE", b"TYPE", b"MODE", b"STRU", b"ALLO",
    b"HELP", b"XYZZY",
];
/// Inserted into a verb now and then: Telnet commands ftp-alg removes, and bytes that make the
/// verb no verb.
const IN_VERB: &[&[u8]] = &[
    b"\xff\xf1",
    b"\xff\xfd\x22",
    b"\xff\xff",
    b"\x0b",
    b"-",
    b"1",
    b"\x00",
];
const LEADING: &[&[u8]] = &[b" ", b"\t", b"\xff\xf4\xff\xf2", b"\x00", b"\r", b"\x0c"];
/// Between the verb and the argument: mostly SP.
const SEPARATORS: &[&[u8]] = &[
    b" ",
    b" ",
    b" ",
    b" ",
    b"  ",
    b"\t",
    b"\x0b",
    b"\x0c",
    b"\x00",
    b"\r",
    b"\xff\xf1 ",
    b" \xff\xff",
    b"\n",
];
/// Argument words. Once a line is cut at an LF, a word may start the next line: none of them
/// is a verb that would change the session (PORT, USER, QUIT...) or is SYST.
const WORDS: &[&[u8]] = &[
    b"nx",
    b"dir",
    b"x",
    b"(203,0,113,2,8,174)",
    b"227 Entering Passive Mode (203,0,113,2,8,174)",
    b"1,2,3,4,5,6",
    b"\xc3\xa9t\xc3\xa9",
    b"\xe6\x97\xa5",
    b"\x80\x9f",
    b"\xa0",
    b"~",
    b"%s%n",
    b"I",
];
/// Between argument words: mostly blanks, sometimes a control byte, a Telnet sequence, IAC IAC,
/// a CR or an LF.
const INNER: &[&[u8]] = &[
    b" ",
    b" ",
    b" ",
    b" ",
    b" ",
    b" ",
    b"  ",
    b"",
    b"\r",
    b"\x00",
    b"\x01",
    b"\x1b[2J",
    b"\x7f",
    b"\xff\xff",
    b"\xff\xf4",
    b"\xff\xfb\x18",
    b"\xffA",
    b"\n",
    b"\x0b",
    b"\x0c",
    b"\t",
];
/// Line ends: each ends with LF, the only byte that ends a line for ftp-alg.
const ENDS: &[&[u8]] = &[
    b"\r\n",
    b"\r\n",
    b"\r\n",
    b"\n",
    b"\n",
    b"\r\r\n",
    b" \r\n",
    b"\x00\r\n",
    b"\xff\r\n",
    b"\n\r\n",
    b"\t\n",
];

/// One generated line (which ftp-alg may read as several, at its LFs).
fn generated_line(dice: &mut Dice) -> Vec<u8> {
    let mut line = Vec::new();
    if dice.one_in(10) {
        line.extend_from_slice(dice.pick(LEADING));
    }
    let verb = dice.pick(VERBS);
    if dice.one_in(6) {
        let at = dice.below(verb.len() + 1);
        line.extend_from_slice(&verb[..at]);
        line.extend_from_slice(dice.pick(IN_VERB));
        line.extend_from_slice(&verb[at..]);
    } else {
        line.extend_from_slice(verb);
    }
    let words = dice.below(4);
    if words > 0 {
        line.extend_from_slice(dice.pick(SEPARATORS));
        for i in 0..words {
            if i > 0 {
                line.extend_from_slice(dice.pick(INNER));
            }
            line.extend_from_slice(dice.pick(WORDS));
        }
    }
    line.extend_from_slice(dice.pick(ENDS));
    line
}

/// The port that the attacks' smuggled endpoints name (8 * 256 + 174), where a victim listens.
const VICTIM_PORT: u16 = 2222;
/// How long a victim is watched, after the attack is over, for a connection that must not come.
const VICTIM_WATCH: Duration = Duration::from_secs(2);

/// A TCP listener that an attack tries to reach: it writes the peer address of every connection
/// it accepts into its log.
pub(super) struct Victim {
    child: Child,
    log: PathBuf,
    addr: SocketAddr,
}

const VICTIM: &str = r#"
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
server = socket.create_server((sys.argv[1], int(sys.argv[2])), family=family)
while True:
    conn, peer = server.accept()
    with open(sys.argv[3], "a") as log:
        log.write(peer[0] + "\n")
    conn.close()
"#;

impl Victim {
    /// Listens on `ip`:[`VICTIM_PORT`] in `ns`; returns once it does.
    fn start(lab: &Lab, ns: &str, ip: IpAddr) -> Victim {
        Victim::start_at(lab, ns, SocketAddr::new(ip, VICTIM_PORT))
    }

    /// Listens on `addr` in `ns`; returns once it does.
    pub(super) fn start_at(lab: &Lab, ns: &str, addr: SocketAddr) -> Victim {
        let log = lab.dir.join("victim.log");
        let (ip_arg, port) = (addr.ip().to_string(), addr.port().to_string());
        let args = [
            "python3",
            "-c",
            VICTIM,
            &ip_arg,
            &port,
            &log.to_string_lossy(),
        ];
        let child = start_listener(lab, ns, &args, addr.port(), "victim");
        Victim { child, log, addr }
    }

    /// The peers of the connections it accepted, in order.
    pub(super) fn connections(&self) -> Vec<IpAddr> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .map(|l| l.parse().expect("the victim logs addresses"))
            .collect()
    }

    /// Asserts that the victim has accepted exactly `expected` and nothing more for
    /// [`VICTIM_WATCH`]; waits up to that long for `expected` to arrive.
    pub(super) fn assert_reached_only_by(&self, expected: &[IpAddr]) {
        let deadline = Instant::now() + VICTIM_WATCH;
        loop {
            let got = self.connections();
            assert!(
                expected.starts_with(&got),
                "the victim {} was reached: {got:?}, expected only {expected:?}",
                self.addr
            );
            if Instant::now() >= deadline {
                assert_eq!(got, expected, "connections to the victim {}", self.addr);
                return;
            }
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `args` in `ns`, its output in `NAME.out` of the test directory, and returns once it
/// listens on `port`.
fn start_listener(lab: &Lab, ns: &str, args: &[&str], port: u16, name: &str) -> Child {
    require_tool("python3");
    let out = lab.dir.join(format!("{name}.out"));
    let mut child = lab
        .exec(ns, args)
        .stdin(Stdio::null())
        .stdout(create(&out))
        .stderr(create(&out))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn the {name}: {e}"));
    if let Err(e) = lab.wait_ready(&mut child, ns, port, &out, || true) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the {name} {e}");
    }
    child
}

/// `ip` as the four numbers of a PORT or 227 (IPv4 only).
fn host_numbers(ip: IpAddr) -> String {
    ip.to_string().replace('.', ",")
}

/// The pinholes as the daemon lists them and the kernel's table, taken while an attacking session
/// is open. The tests check them after the victim, so that an attack that works again is first
/// reported by what it reached.
struct PinholeSnapshot {
    listed: Vec<Pinhole>,
    table: String,
}

impl PinholeSnapshot {
    fn take(lab: &Lab) -> PinholeSnapshot {
        let table = must(lab.exec(
            &lab.gateway_ns(),
            &["nft", "list", "table", "inet", "ftp_alg"],
        ));
        PinholeSnapshot {
            listed: lab.pinholes(),
            table,
        }
    }

    /// Neither the daemon nor the kernel held a pinhole that leads to the victim's port.
    fn assert_none_to_victim(&self) {
        assert!(
            self.listed
                .iter()
                .all(|p| p.dial.port() != VICTIM_PORT && p.destination().port() != VICTIM_PORT),
            "a pinhole led to port {VICTIM_PORT}: {:#?}",
            self.listed
        );
        assert!(
            !self
                .table
                .split(|c: char| !c.is_ascii_digit())
                .any(|t| t == VICTIM_PORT.to_string()),
            "port {VICTIM_PORT} in the kernel's table:\n{}",
            self.table
        );
    }
}

/// The commands the server logged after the login.
fn commands_after_login(lab: &Lab) -> Vec<String> {
    let commands: Vec<String> = ServerLog::read(lab)
        .commands()
        .into_iter()
        .map(String::from)
        .collect();
    let login = commands
        .iter()
        .position(|c| c.starts_with("PASS"))
        .unwrap_or_else(|| panic!("no login in the server's log: {commands:#?}"));
    commands[login + 1..].to_vec()
}

/// What the attacking clients do after the attack: dial the endpoint of the first line of
/// `replies` that starts with 227 (what a client that trusts a 227 dials) or 229 (a port of the
/// control peer), or else `ENDPOINT` (the smuggled one), and report whether it connected.
const DIAL: &str = r#"
def dial(replies):
    text = "".join(replies)
    found = re.search(r"^227 .*\((\d+),(\d+),(\d+),(\d+),(\d+),(\d+)\)", text, re.M)
    extended = re.search(r"^229 .*\((.)\1\1(\d+)\1\)", text, re.M)
    if found:
        n = found.groups()
        endpoint = (".".join(n[:4]), int(n[4]) * 256 + int(n[5]))
    elif extended:
        endpoint = (HOST, int(extended.group(2)))
    else:
        endpoint = ENDPOINT
    try:
        socket.create_connection(endpoint, timeout=2).close()
        emit(reply="connected to %s:%d" % endpoint)
    except OSError as e:
        print("dial %s:%d: %s" % (endpoint + (e,)), file=sys.stderr)
        emit(reply="not connected to %s:%d" % endpoint)
"#;

/// Attack (a): after an anonymous login, `CWD nx LF 227 Entering Passive Mode (S,8,174) CR LF`
/// against proftpd, which reads one command up to the CR LF and echoes its argument in its 550,
/// so the smuggled 227 would start a line of the reply (see [`server_readings`]). ftp-alg must
/// forward `CWD nx` and refuse the 227 line; no pinhole to S:2222 may appear, the client's dial
/// of the smuggled endpoint must fail, and the victim listening there must see nothing. Over
/// IPv6 the smuggled line is `229 Entering Extended Passive Mode (|||2222|)`.
pub fn smuggled_announcement(topology: Topology) {
    let mut lab = Lab::with_server(topology, Server::Proftpd, Setup::Alg);
    let smuggled = lab.addrs().server;
    let announcement = match topology.family() {
        Family::V4 => format!(
            "227 Entering Passive Mode ({},8,174)",
            host_numbers(smuggled)
        ),
        Family::V6 => format!("229 Entering Extended Passive Mode (|||{VICTIM_PORT}|)"),
    };
    let victim = Victim::start(&lab, &lab.server_ns(), smuggled);
    let body = format!(
        "ENDPOINT = (\"{smuggled}\", {VICTIM_PORT})\n{DIAL}{}",
        r#"
c = Control()
c.command("USER anonymous")
c.command("PASS e2e")
c.send("CWD nx\n@ANNOUNCEMENT@\r\n")
replies = [c.reply(), c.reply()]
checkpoint("replied")
dial(replies)
c.command("QUIT")
"#
        .replace("@ANNOUNCEMENT@", &announcement)
    );
    let mut client = PyClient::in_client(&mut lab, &body);
    let mut replies = client.replies_until("replied");
    let pinholes = PinholeSnapshot::take(&lab);
    client.resume();
    replies.extend(client.finish());
    victim.assert_reached_only_by(&[]);
    assert!(
        pinholes.listed.is_empty(),
        "pinholes: {:#?}",
        pinholes.listed
    );
    pinholes.assert_none_to_victim();
    let not_connected = format!("not connected to {smuggled}:{VICTIM_PORT}");
    assert_replies(
        "replies to the attack",
        &replies,
        &[
            "220",
            "331",
            "230",
            "550 nx: No such file or directory",
            REFUSED,
            &not_connected,
            "221",
        ],
    );
    assert_eq!(
        commands_after_login(&lab),
        ["CWD nx", "QUIT"],
        "what proftpd executed"
    );
    lab.assert_no_pinholes_left();
}

/// Attack (b): `PORT VT <ftp-alg's upstream address>,8,174`, then LIST, against proftpd, which
/// splits a verb at VT and so would run the PORT (see [`server_readings`]): it names proftpd's
/// own control peer, which proftpd allows, and the LIST would connect to the victim listening
/// there, on G. ftp-alg must refuse the line with its 500; proftpd must run no PORT, and the
/// victim must see no connection but the test's own, from the server's side, that shows it is
/// reachable from there (G's policy accepts tcp/2222 from wan0 for this test: a service on the
/// gateway that the server's network may use).
pub fn port_behind_vt(topology: Topology) {
    let mut lab = Lab::with_server(topology, Server::Proftpd, Setup::Alg);
    let a = lab.addrs();
    let victim = Victim::start(&lab, &lab.gateway_ns(), a.server_sees);
    if !matches!(topology, Topology::Sidecar(_)) {
        lab.nft(&["add rule inet gateway input iifname wan0 tcp dport 2222 accept"]);
    }
    // From where the server would connect: the victim is reachable.
    must(lab.exec(
        &lab.server_ns(),
        &[
            "python3",
            "-c",
            "import socket, sys; socket.create_connection((sys.argv[1], 2222), timeout=3).close()",
            &a.server_sees.to_string(),
        ],
    ));
    let body = r#"
c = Control()
c.command("USER anonymous")
c.command("PASS e2e")
c.send("PORT\x0b@HOST@,8,174\r\nLIST\r\n")
c.reply()
while c.reply()[:1] == "1":
    pass
c.command("QUIT")
"#
    .replace("@HOST@", &host_numbers(a.server_sees));
    let replies = PyClient::in_client(&mut lab, &body).finish();
    victim.assert_reached_only_by(&[a.server]);
    assert_replies(
        "replies to the attack",
        &replies[..4],
        &["220", "331", "230", REFUSED],
    );
    let last = &replies[replies.len() - 2];
    assert!(
        !last.starts_with('2'),
        "LIST succeeded, so a data connection was made: {replies:#?}"
    );
    let executed = commands_after_login(&lab);
    assert!(
        !executed.iter().any(|c| c.starts_with("PORT")),
        "proftpd ran a PORT: {executed:?}"
    );
    assert_eq!(
        executed.first().map(String::as_str),
        Some("LIST"),
        "{executed:?}"
    );
    lab.assert_no_pinholes_left();
}

/// The scripted FTP server of attack (c), the one case where no real server will do: none of
/// vsftpd, proftpd and pure-ftpd answers anything but PASV with a 227. It answers NOOP with a 227
/// naming its own address and port 2222, PASV with its real 227 followed by that same second
/// 227, EPSV with a multi-line 229 naming port 2222, and SYST with a line holding VT, NUL, ESC and
/// CR and ended by a bare LF. Arguments: its address, its control port.
const SCRIPTED_SERVER: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
numbers = host.replace(".", ",")
smuggled = "227 Entering Passive Mode (%s,8,174)\r\n" % numbers
control = socket.create_server((host, port))
data = socket.create_server((host, 0))
p = data.getsockname()[1]
while True:
    conn, _ = control.accept()
    conn.sendall(b"220 scripted\r\n")
    for line in conn.makefile("rb"):
        words = line.decode("latin-1").split()
        verb = words[0].upper() if words else ""
        print("received", line, flush=True)
        if verb == "QUIT":
            conn.sendall(b"221 bye\r\n")
            break
        reply = {
            "USER": "331 ok\r\n",
            "PASS": "230 ok\r\n",
            "NOOP": smuggled,
            "PASV": "227 Entering Passive Mode (%s,%d,%d)\r\n" % (numbers, p >> 8, p & 255) + smuggled,
            "EPSV": "229-Entering Extended Passive Mode (|||2222|)\r\n"
                    "229 Entering Extended Passive Mode (|||2222|)\r\n",
            "SYST": "215 a\x0bb\x00c\x1b[2J\rd\n",
        }.get(verb, "502 no\r\n")
        conn.sendall(reply.encode())
    conn.close()
"#;

/// Attack (c): a 227 that answers no PASV (the scripted server's answer to NOOP), and a second
/// 227 after the real answer to PASV, both naming the server's address and port 2222. ftp-alg
/// must withhold both (`227 Reply withheld ...`), open only the real PASV's pinhole, and the
/// client's dial of the smuggled endpoint must fail; the victim there must see nothing. Besides:
/// a multi-line 229 answering EPSV is withheld whole (425, no pinhole), and a reply line with
/// control bytes reaches the client with spaces in their place, ended by CR LF.
pub fn unsolicited_227(topology: Topology) {
    let mut lab = Lab::with_server(topology, Server::Vsftpd, Setup::Alg);
    // The scripted server takes the real one's place.
    if let Some(mut vsftpd) = lab.server_process.take() {
        vsftpd.kill().expect("kill vsftpd");
        vsftpd.wait().expect("wait vsftpd");
    }
    let bind = lab.server_bind();
    let (ip, port) = (bind.ip().to_string(), bind.port().to_string());
    let args = ["python3", "-c", SCRIPTED_SERVER, &ip, &port];
    let scripted = start_listener(
        &lab,
        &lab.server_ns(),
        &args,
        bind.port(),
        "scripted-server",
    );
    lab.server_process = Some(scripted);
    let a = lab.addrs();
    let victim = Victim::start(&lab, &lab.server_ns(), a.server);

    let body = format!(
        "ENDPOINT = (\"{}\", {VICTIM_PORT})\n{DIAL}{}",
        a.server,
        r#"
c = Control()
c.command("USER e2e")
c.command("PASS e2e")
replies = [c.command("NOOP"), c.command("PASV"), c.reply()]
checkpoint("announced")
replies += [c.command("EPSV"), c.command("SYST")]
checkpoint("withheld")
dial(replies[:1] + replies[2:])
c.command("QUIT")
"#
    );
    let mut client = PyClient::in_client(&mut lab, &body);
    let mut replies = client.replies_until("announced");
    let after_pasv = PinholeSnapshot::take(&lab);
    client.resume();
    replies.extend(client.replies_until("withheld"));
    let after_epsv = PinholeSnapshot::take(&lab);
    client.resume();
    replies.extend(client.finish());
    victim.assert_reached_only_by(&[]);
    after_pasv.assert_none_to_victim();
    let [pinhole] = after_pasv.listed.as_slice() else {
        panic!(
            "one pinhole, the real PASV's, expected: {:#?}",
            after_pasv.listed
        );
    };
    assert_eq!(
        pinhole.destination().ip(),
        a.server,
        "the real PASV's pinhole: {pinhole:#?}"
    );
    // The EPSV voided the PASV's endpoint, and its multi-line 229 opened nothing.
    assert!(
        after_epsv.listed.is_empty(),
        "after EPSV: {:#?}",
        after_epsv.listed
    );
    after_epsv.assert_none_to_victim();
    let withheld = "227 Reply withheld by the FTP gateway: it answers no PASV/EPSV.";
    let not_connected = format!("not connected to {}:{VICTIM_PORT}", a.server);
    assert_replies(
        "replies",
        &replies,
        &[
            "220 scripted",
            "331 ok",
            "230 ok",
            withheld,
            "227",
            withheld,
            "425 Can't open data connection: the server's passive reply spans several lines.",
            "215 a b c [2J d",
            &not_connected,
            "221 bye",
        ],
    );
    assert_eq!(
        replies[7], "215 a b c [2J d\r\n",
        "a reply line with control bytes and a bare LF, as the client got it"
    );
    let announced = parse_host_port(between(&replies[4], '(', ')'));
    assert_eq!(
        announced.ip(),
        a.client_sees,
        "the real 227: {}",
        replies[4]
    );
    assert_ne!(
        announced.port(),
        VICTIM_PORT,
        "the real 227: {}",
        replies[4]
    );
    lab.assert_no_pinholes_left();
}

/// The longest lines the largest `proxy.max_line` lets through (`config::MAX_MAX_LINE`, 4094):
/// `max_line - 1` bytes and CR LF, and `max_line` bytes and a bare LF, which ftp-alg forwards
/// as `max_line + 1` and `max_line + 2` bytes. Every server must read each as one command and go
/// on with the next. At 4096 both failed (this test found it): vsftpd answers a command line
/// longer than 4096 bytes, CR LF included, with `500 Input line too long.` and closes the
/// session; proftpd, given a 4097-byte line with the next command in the same segment, does not
/// run that command until more bytes arrive. Not for pure-ftpd: the harness's syslog reader
/// takes datagrams of up to 4096 bytes, and pure-ftpd logs these commands in longer ones.
pub fn longest_lines_fit(server: Server) {
    const MAX_LINE: usize = ftp_alg::config::MAX_MAX_LINE;
    let mut lab = Lab::with_server(Topology::Reverse(Family::V4), server, Setup::AlgStopped);
    lab.alg_config = format!("[proxy]\nmax_line = {MAX_LINE}\n");
    lab.start_alg();
    let cases: Vec<Vec<u8>> = [(MAX_LINE - 1, &b"\r\n"[..]), (MAX_LINE, b"\n")]
        .into_iter()
        .map(|(len, end)| {
            let path = b"abcdefg/".iter().cycle().take(len - 5).copied();
            let text: Vec<u8> = b"NOOP ".iter().copied().chain(path).collect();
            [&text[..], end].concat()
        })
        .collect();
    let observed = probe(&mut lab, Path::ThroughAlg, &[cases]);
    for o in &observed {
        let fates = alg_reading_with(&o.sent, MAX_LINE);
        assert!(matches!(fates[..], [Fate::Forward(_)]), "{fates:?}");
        if let Err(e) = check(server, o, &fates) {
            panic!("a {}-byte line: {e}", o.sent.len());
        }
    }
}
