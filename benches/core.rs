//! Micro-benchmarks of the sans-IO core: line framing, command and passive-reply parsing, and a
//! session relaying lines and handling a PASV → 227 exchange. No sockets, no nftables, no root.
//!
//! `cargo bench --bench core` (divan; `-- --help` for its options, e.g. a name filter).
//!
//! These bound what the control channel costs in user space per line; scripts/bench measures
//! the same paths end to end (NOOP round trip, many small transfers) through real sockets.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use ftp_alg::config::Mode;
use ftp_alg::ftp::{Command, LineBuffer, PassiveReply};
use ftp_alg::pinhole::Opened;
use ftp_alg::session::{Action, Session, SessionContext};

fn main() {
    divan::main();
}

/// What a client sends in a busy session: commands of every kind the session parses.
const CLIENT_LINES: &[&[u8]] = &[
    b"USER anonymous\r\n",
    b"TYPE I\r\n",
    b"PASV\r\n",
    b"RETR pub/some/rather/long/path/name/file-0001.bin\r\n",
    b"PORT 198,18,0,2,156,64\r\n",
    b"EPRT |1|198.18.0.2|40000|\r\n",
    b"EPSV\r\n",
    b"NOOP\r\n",
];

mod framing {
    use super::*;

    /// One read holding one command line.
    #[divan::bench]
    fn one_line(bencher: divan::Bencher) {
        let mut buf = LineBuffer::new(2048);
        bencher.bench_local(|| {
            buf.push(black_box(b"RETR pub/file-0001.bin\r\n"));
            black_box(buf.next_line());
        });
    }

    /// One read holding 64 pipelined lines (about 1.9 KiB), split into lines.
    #[divan::bench]
    fn pipelined_64_lines(bencher: divan::Bencher) {
        let chunk: Vec<u8> = CLIENT_LINES
            .iter()
            .cycle()
            .take(64)
            .flat_map(|l| l.iter().copied())
            .collect();
        let mut buf = LineBuffer::new(2048);
        bencher
            .counter(divan::counter::BytesCount::of_slice(&chunk))
            .bench_local(|| {
                buf.push(black_box(&chunk));
                while let Some(line) = buf.next_line() {
                    black_box(line.ok());
                }
            });
    }

    /// A line arriving one byte per read (worst case for reassembly).
    #[divan::bench]
    fn byte_by_byte(bencher: divan::Bencher) {
        let line = b"RETR pub/some/rather/long/path/name/file-0001.bin\r\n";
        let mut buf = LineBuffer::new(2048);
        bencher.bench_local(|| {
            for b in line.chunks(1) {
                buf.push(black_box(b));
            }
            black_box(buf.next_line());
        });
    }
}

mod command {
    use super::*;

    #[divan::bench(args = ["NOOP", "RETR pub/file-0001.bin", "PORT 198,18,0,2,156,64", "EPRT |1|198.18.0.2|40000|", "EPRT |2|2001:db8:a::2|40000|", "EPSV"])]
    fn parse(text: &str) -> Command {
        Command::parse(black_box(text.as_bytes()))
    }

    #[divan::bench]
    fn encode_port() -> Option<Vec<u8>> {
        black_box(Command::Port("203.0.113.1:61000".parse().expect("literal"))).encode()
    }
}

mod passive_reply {
    use super::*;

    const REPLIES: [&str; 3] = [
        "227 Entering Passive Mode (203,0,113,2,156,64).",
        "227 =203,0,113,2,156,64",
        "229 Entering Extended Passive Mode (|||40000|)",
    ];

    #[divan::bench(args = REPLIES)]
    fn parse(text: &str) -> PassiveReply {
        PassiveReply::parse(black_box(text.as_bytes())).expect("a passive reply")
    }

    #[divan::bench(args = REPLIES)]
    fn rewrite(bencher: divan::Bencher, text: &str) {
        let reply = PassiveReply::parse(text.as_bytes()).expect("a passive reply");
        let to: SocketAddr = "198.51.100.7:61000".parse().expect("literal");
        bencher.bench_local(|| black_box(&reply).rewrite(black_box(to)));
    }
}

mod session {
    use super::*;

    fn context() -> SessionContext {
        SessionContext {
            id: 7,
            mode: Mode::Gateway,
            client: "198.18.0.2:50000".parse().expect("literal"),
            client_local: "198.18.0.1:2121".parse().expect("literal"),
            server: "203.0.113.2:21".parse().expect("literal"),
            upstream_local: "203.0.113.1:45000".parse().expect("literal"),
            announce: None,
            max_line: 2048,
            policy: Arc::default(),
            max_pinholes: 8,
            max_windows: 2,
            tls: None,
        }
    }

    /// A session past its greeting and login, as the proxy holds it during transfers. Each
    /// line is handled before the next arrives, as over a real connection: the session pairs
    /// replies with the commands forwarded so far.
    fn logged_in() -> Session {
        let mut s = Session::new(context());
        s.handle_server_data(b"220 ready\r\n");
        drain(&mut s);
        s.handle_client_data(b"USER anonymous\r\n");
        drain(&mut s);
        s.handle_server_data(b"230 Login successful.\r\n");
        drain(&mut s);
        s
    }

    fn drain(s: &mut Session) -> usize {
        let mut n = 0;
        while let Some(action) = s.poll_action() {
            black_box(action);
            n += 1;
        }
        n
    }

    /// NOOP and its 200 through the session: the user-space work of one NOOP round trip.
    #[divan::bench]
    fn noop_round_trip(bencher: divan::Bencher) {
        let mut s = logged_in();
        bencher.bench_local(|| {
            s.handle_client_data(black_box(b"NOOP\r\n"));
            drain(&mut s);
            s.handle_server_data(black_box(b"200 NOOP ok.\r\n"));
            drain(&mut s);
        });
    }

    /// A whole passive transfer's control lines: PASV, the 227 (pinhole requested, result
    /// reported, rewritten line out), RETR, 150 and 226 (pinhole closed).
    #[divan::bench]
    fn pasv_227_transfer(bencher: divan::Bencher) {
        let mut s = logged_in();
        let mut id = 0;
        bencher.bench_local(|| {
            s.handle_client_data(black_box(b"PASV\r\n"));
            drain(&mut s);
            s.handle_server_data(black_box(
                b"227 Entering Passive Mode (203,0,113,2,156,64).\r\n",
            ));
            let open = s.poll_action();
            assert!(matches!(open, Some(Action::Open(_))), "{open:?}");
            id += 1;
            s.handle_opened(Some(Opened {
                id,
                dial_port: 40000,
            }));
            drain(&mut s);
            s.handle_client_data(black_box(b"RETR f0001.bin\r\n"));
            drain(&mut s);
            s.handle_server_data(black_box(
                b"150 Opening BINARY mode data connection.\r\n226 Transfer complete.\r\n",
            ));
            // The 226 settles the RETR: its pinhole is closed.
            assert!(drain(&mut s) == 3, "150, Close, 226");
        });
    }

    /// Creating a session and relaying the greeting and login.
    #[divan::bench]
    fn new_and_login() -> Session {
        logged_in()
    }
}
