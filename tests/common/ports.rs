//! Shared public data ports, end to end (issue 11): reverse and sidecar mode with one public
//! data port (`port_min = port_max`) or the harness's range, real vsftpd and proftpd, real lftp
//! and curl. A 500-file `lftp mirror` in passive and in active mode, 50 parallel downloads from
//! one client address, 200 client addresses downloading at once; every byte checked, the
//! server's own log showing the data command used, the daemon's log showing which ports were
//! announced, and no pinhole left.
//!
//! Files are small (1 KiB) and the client writes them to tmpfs (/dev/shm): on these machines a
//! file creation on disk costs about a millisecond, which would hide the network path.

use super::*;

/// The one public data port of the one-port cases.
pub const ONE_PORT: u16 = 61000;
/// `pinholes.port_wait_ms` of the one-port cases. Sessions that announce at the same instant
/// from one address take one port in turn, each after the previous client's connection has
/// arrived (the kernel keys a pinhole on the client's address and the port, not on the client's
/// port, which it does not know yet). That takes a few milliseconds per session on an idle
/// machine, and up to 50-100 ms with the whole suite (and more) on two cores, where curl waits
/// that long to be scheduled: 50 at once then take 3 to 5 s, far beyond the 500 ms default.
const ONE_PORT_WAIT_MS: u64 = 10_000;
/// Files in the mirrored directory, and each one's length.
const MIRROR_FILES: usize = 500;
const SMALL_LEN: usize = 1024;
const MIRROR_DIR: &str = "many500";
/// The file every parallel client downloads.
const SMALL_FILE: &str = "small.bin";
/// Parallel sessions from one client address.
const PARALLEL: usize = 50;
/// With `backend = "nft"` every pinhole costs three nft processes (install, the look at which
/// pin elements are live, removal), tens of milliseconds each when the suite loads both cores:
/// those cases mirror the first 50 files ([`NFT_MIRROR_GLOB`]) and run 10 sessions at once.
const NFT_MIRROR_FILES: usize = 50;
const NFT_MIRROR_GLOB: &str = "f0[0-4]?";
const NFT_PARALLEL: usize = 10;
/// Client addresses at once: 198.18.0.10 to 198.18.0.209, secondary addresses of C's lan.
const ADDRESSES: usize = 200;
/// Between two of the 200 clients' starts.
const ADDRESS_STAGGER: Duration = Duration::from_millis(5);
/// Bound on a whole batch of parallel clients.
/// Generous: with the rest of the suite, 200 sessions forked by the server at once on two cores
/// can take seconds to be greeted.
const BATCH_LIMIT: Duration = Duration::from_secs(60);

/// Which public data ports the daemon hands out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ports {
    /// `port_min = port_max`.
    One,
    /// The harness's range ([`PINHOLE_PORTS`]).
    Range,
    /// One port, with pinholes installed by the nft program (`pinholes.backend = "nft"`),
    /// which learns whether a pinhole was used from `nft -j list set`.
    OneWithNft,
}

/// A directory in /dev/shm for what the clients write, removed when the test passes.
struct Shm(PathBuf);

impl Shm {
    fn new(lab: &Lab) -> Shm {
        let dir = Path::new("/dev/shm").join(format!("ftp-alg-e2e-{}", lab.prefix));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create a directory in /dev/shm");
        Shm(dir)
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// The content of mirrored file `i`: 1 KiB, different for each file.
fn mirror_file(i: usize) -> Vec<u8> {
    pseudo_random(SMALL_LEN, ((i as u64) + 1) << 1)
}

fn small_file() -> Vec<u8> {
    pseudo_random(SMALL_LEN * 4 + 7, 0x5eed << 1)
}

/// A lab for `topology` and `server`, serving the mirrored directory and the small file, with
/// the daemon handing out `ports`.
fn lab(topology: Topology, server: Server, ports: Ports) -> Lab {
    lab_with(topology, server, ports, "")
}

/// [`lab`], with `vsftpd_options` at the end of vsftpd.conf.
fn lab_with(topology: Topology, server: Server, ports: Ports, vsftpd_options: &str) -> Lab {
    let mut lab = Lab::prepared(topology, server, Setup::Alg, |lab| {
        let dir = lab.ftp_root().join(MIRROR_DIR);
        fs::create_dir(&dir).expect("create the mirrored directory");
        for i in 0..MIRROR_FILES {
            fs::write(dir.join(format!("f{i:03}")), mirror_file(i)).expect("write a small file");
        }
        fs::write(lab.ftp_root().join(SMALL_FILE), small_file()).expect("write the small file");
        // In reverse and sidecar mode every session reaches the server from ftp-alg's own
        // address, so the server's per-address limit (Debian's vsftpd refuses the 51st
        // session with 421) caps all clients together: an operator lifts it, and so does this.
        // Many sessions at once may each wait in PASV: vsftpd answers `500 OOPS` when its
        // passive range has no free port (see [`WIDE_PASSIVE_PORTS`]).
        format!(
            "max_per_ip=0\nmax_clients=0\npasv_min_port={}\npasv_max_port={}\n{vsftpd_options}",
            WIDE_PASSIVE_PORTS.start(),
            WIDE_PASSIVE_PORTS.end()
        )
    });
    if server == Server::Proftpd {
        widen_proftpd_passive_ports(&mut lab);
    }
    if ports != Ports::Range {
        // The daemon the lab started uses the harness's range: restart it with one port.
        assert!(
            lab.stop_alg("TERM", Duration::from_secs(10)).is_some(),
            "the daemon did not stop"
        );
        let backend = if ports == Ports::OneWithNft {
            "backend = \"nft\"\n"
        } else {
            ""
        };
        lab.alg_config = format!(
            "[pinholes]\nport_min = {ONE_PORT}\nport_max = {ONE_PORT}\nport_wait_ms = {ONE_PORT_WAIT_MS}\n{backend}"
        );
        lab.start_alg();
    }
    lab
}

/// The server's passive range for the parallel cases: one passive listener per session
/// that has sent PASV and not yet had its data connection. Sessions of one address that take
/// one public port in turn keep theirs open while they wait, so 50 of them at once in the
/// harness's 101 ports made proftpd answer `425 PASV: Address already in use`: a server
/// behind shared ports wants a passive range as wide as its concurrent sessions (it is never
/// published, so width costs nothing).
const WIDE_PASSIVE_PORTS: RangeInclusive<u16> = 40000..=40999;

/// Restarts the harness's proftpd with [`WIDE_PASSIVE_PORTS`] (vsftpd gets them through its
/// configuration's overrides, see [`lab_with`]).
fn widen_proftpd_passive_ports(lab: &mut Lab) {
    if let Some(mut proftpd) = lab.server_process.take() {
        let _ = proftpd.kill();
        let _ = proftpd.wait();
    }
    let conf = lab.dir.join("proftpd.conf");
    let harness = format!("PassivePorts {} {}", PASV_PORTS.start(), PASV_PORTS.end());
    let text = fs::read_to_string(&conf).expect("read proftpd.conf");
    assert!(text.contains(&harness), "proftpd.conf has no `{harness}`");
    let wide = format!(
        "PassivePorts {} {}",
        WIDE_PASSIVE_PORTS.start(),
        WIDE_PASSIVE_PORTS.end()
    );
    fs::write(&conf, text.replace(&harness, &wide)).expect("write proftpd.conf");
    let out = lab.dir.join("proftpd-wide.out");
    let mut child = lab
        .exec(
            &lab.server_ns(),
            &[
                &installed("usr/sbin/proftpd"),
                "-n",
                "-c",
                &conf.to_string_lossy(),
            ],
        )
        .stdin(Stdio::null())
        .stdout(create(&out))
        .stderr(create(&out))
        .spawn()
        .expect("spawn proftpd");
    let ready = lab.wait_ready(
        &mut child,
        &lab.server_ns(),
        lab.addrs().server_port,
        &out,
        || true,
    );
    lab.server_process = Some(child);
    if let Err(e) = ready {
        panic!("proftpd {e}");
    }
}

/// Every port the daemon announced (its debug log's `announce=ADDR:PORT`), by port.
fn announced_ports(lab: &Lab) -> BTreeSet<u16> {
    let log = fs::read_to_string(lab.dir.join("daemon.log")).unwrap_or_default();
    log.lines()
        .filter_map(|l| l.split_once("announce=")?.1.split_whitespace().next())
        .filter_map(|endpoint| endpoint.parse::<SocketAddr>().ok())
        .map(|endpoint| endpoint.port())
        .collect()
}

/// Asserts that the daemon announced only ports of `ports`, and at least one.
fn assert_announced(lab: &Lab, ports: Ports) {
    let announced = announced_ports(lab);
    assert!(!announced.is_empty(), "the daemon logged no announcement");
    match ports {
        Ports::One | Ports::OneWithNft => {
            assert_eq!(announced, BTreeSet::from([ONE_PORT]), "announced ports")
        }
        Ports::Range => assert!(
            announced.iter().all(|p| PINHOLE_PORTS.contains(p)),
            "announced ports outside the range: {announced:?}"
        ),
    }
}

/// Waits (bounded) until the daemon holds no pinhole: the sessions are over.
fn wait_no_pinholes(lab: &Lab) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = lab.pinholes();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pinholes left 5 s after the clients finished: {left:#?}"
        );
        sleep(Duration::from_millis(50));
    }
}

/// lftp mirrors the 500-file directory in one session, in passive (PASV) or active (PORT)
/// mode: each file arrives intact, the server received that data command once per transfer
/// (lftp falls back silently, so the server's log is what counts), and no pinhole is left.
pub fn mirror(topology: Topology, server: Server, ports: Ports, mode: Mirror) {
    let passive = mode == Mirror::Passive;
    let options = match mode {
        Mirror::ActiveFromPort20 => {
            assert_eq!(server, Server::Vsftpd, "connect_from_port_20 is vsftpd's");
            "connect_from_port_20=YES\n"
        }
        Mirror::Passive | Mirror::Active => "",
    };
    let mut lab = lab_with(topology, server, ports, options);
    let shm = Shm::new(&lab);
    let target = shm.0.join("mirror");
    let (files, include) = match ports {
        Ports::OneWithNft => (NFT_MIRROR_FILES, format!("-I '{NFT_MIRROR_GLOB}' ")),
        Ports::One | Ports::Range => (MIRROR_FILES, String::new()),
    };
    let (user, password) = server.login();
    let script = format!(
        "set cmd:fail-exit yes\nset net:timeout 5\nset net:max-retries 1\n\
         set net:reconnect-interval-base 1\nset net:reconnect-interval-max 1\n\
         set ftp:ssl-allow no\nset xfer:clobber on\nset ftp:passive-mode {passive}\n\
         set ftp:prefer-epsv no\nset ftp:use-site-utime no\nset ftp:use-site-utime2 no\n\
         set ftp:use-mdtm no\n\
         open -u {user},{password} ftp://{}\nmirror {include}{MIRROR_DIR} {}\nbye\n",
        lab.addrs().dial.ip(),
        target.display()
    );
    let path = lab.dir.join("mirror.lftp");
    fs::write(&path, script).expect("write the lftp script");
    let path = path.to_string_lossy().into_owned();
    let args = ["lftp", "-f", &path];
    let cmd = lab.client_command(&args);
    let run = lab.run_bounded(cmd, &args);
    assert!(
        run.status.success(),
        "lftp mirror failed\n{}",
        run.transcript
    );
    for i in 0..files {
        let name = format!("f{i:03}");
        assert_same_bytes(&name, &lab.read(&target.join(&name)), &mirror_file(i));
    }
    let log = ServerLog::read(&lab);
    let verb = if passive { "PASV" } else { "PORT" };
    let verbs = log.data_verbs();
    assert!(
        verbs.iter().all(|v| v == verb),
        "the server received other data commands than {verb}"
    );
    assert!(
        verbs.len() > files,
        "a {verb} per transfer (the listing and {files} files): {}",
        verbs.len()
    );
    let retrs = log
        .commands()
        .iter()
        .filter(|c| c.starts_with("RETR "))
        .count();
    assert_eq!(retrs, files, "downloads the server served");
    assert_announced(&lab, ports);
    if !passive {
        assert_active_sources(&lab, mode);
    }
    wait_no_pinholes(&lab);
}

/// How [`mirror`] sets up its data connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mirror {
    /// PASV.
    Passive,
    /// PORT; the server dials from the port it normally uses: vsftpd (by default) and
    /// proftpd 1.3.8 (as the harness runs it, switched to user nobody) from an ephemeral one.
    Active,
    /// PORT, vsftpd with `connect_from_port_20=YES`: every data connection from port 20.
    ActiveFromPort20,
}

/// The ports the server's data connections came from, read from its own sockets in TIME_WAIT
/// (the server closes a download's data connection first, so it holds TIME_WAIT).
fn server_data_source_ports(lab: &Lab) -> BTreeSet<u16> {
    let out = must(lab.exec(
        &lab.server_ns(),
        &[
            "ss",
            "-Htan",
            "state",
            "time-wait",
            "( dport >= :61000 and dport <= :61999 )",
        ],
    ));
    out.lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter_map(|local| local.rsplit_once(':')?.1.parse().ok())
        .collect()
}

/// The TIME_WAIT case the port pool is about (`scripts/time-wait-experiment`): a server that
/// dials from a fixed port repeats the whole 4-tuple on every transfer to one port. vsftpd
/// with `connect_from_port_20` dials from port 20; vsftpd by default and proftpd from
/// ephemeral ports. The mirror above worked in each case; this shows which case it was.
fn assert_active_sources(lab: &Lab, mode: Mirror) {
    let sources = server_data_source_ports(lab);
    let fixed = match mode {
        Mirror::ActiveFromPort20 => Some(20),
        Mirror::Active | Mirror::Passive => None,
    };
    match fixed {
        Some(port) => assert_eq!(
            sources,
            BTreeSet::from([port]),
            "the server's data connections should all come from port {port}"
        ),
        None => assert!(
            sources.len() > 1,
            "the server's data connections should come from many ports: {sources:?}"
        ),
    }
}

/// One curl download of [`SMALL_FILE`] per entry of `sources` (a client address to bind, or
/// `None` for C's own), started from one shell in the client namespace `stagger` apart (zero:
/// all at once); each must exit 0 with the file intact. Passive mode (PASV): the client dials
/// the shared public port.
fn parallel_downloads(lab: &mut Lab, sources: &[Option<String>], stagger: Duration) {
    let shm = Shm::new(lab);
    let (user, password) = lab.server.login();
    let url = format!("ftp://{}/{SMALL_FILE}", lab.addrs().dial.ip());
    let mut script = String::from("set -u\n");
    for (n, source) in sources.iter().enumerate() {
        let interface = source
            .as_ref()
            .map(|s| format!("--interface {s} "))
            .unwrap_or_default();
        script.push_str(&format!(
            "( curl -q --silent --show-error --noproxy '*' --max-time 45 --connect-timeout 20 \
             --disable-epsv --user {user}:{password} {interface}-o {dir}/out.{n} {url} \
             2>{dir}/err.{n}; echo $? >{dir}/rc.{n} ) &\n",
            dir = shm.0.display()
        ));
        if !stagger.is_zero() {
            script.push_str(&format!("sleep {}\n", stagger.as_secs_f64()));
        }
    }
    script.push_str("wait\n");
    let path = lab.dir.join("parallel.sh");
    fs::write(&path, script).expect("write the client script");
    let path = path.to_string_lossy().into_owned();
    let args = ["sh", &path];
    let mut cmd = lab.client_command(&args);
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the client script");
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() > BATCH_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} parallel clients still running after {BATCH_LIMIT:?}",
                sources.len()
            );
        }
        sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the client script failed: {status}");
    let want = small_file();
    let mut failed = Vec::new();
    for (n, source) in sources.iter().enumerate() {
        let rc = fs::read_to_string(shm.0.join(format!("rc.{n}"))).unwrap_or_default();
        let got = fs::read(shm.0.join(format!("out.{n}"))).unwrap_or_default();
        if rc.trim() != "0" || got != want {
            let err = fs::read_to_string(shm.0.join(format!("err.{n}"))).unwrap_or_default();
            failed.push(format!(
                "client {n} ({source:?}): exit {}, {} of {} bytes: {}",
                rc.trim(),
                got.len(),
                want.len(),
                err.trim()
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} downloads failed after {:?}:\n{}",
        failed.len(),
        sources.len(),
        started.elapsed(),
        failed.join("\n")
    );
}

/// 50 curl downloads at once from the client's one address, through the shared port(s).
pub fn parallel_from_one_address(topology: Topology, server: Server, ports: Ports) {
    let mut lab = lab(topology, server, ports);
    let sessions = match ports {
        Ports::OneWithNft => NFT_PARALLEL,
        Ports::One | Ports::Range => PARALLEL,
    };
    parallel_downloads(&mut lab, &vec![None; sessions], Duration::ZERO);
    let retrs = ServerLog::read(&lab)
        .commands()
        .iter()
        .filter(|c| c.starts_with("RETR "))
        .count();
    assert_eq!(retrs, sessions, "downloads the server served");
    assert_announced(&lab, ports);
    wait_no_pinholes(&lab);
}

/// 200 client addresses (secondary addresses of the client's interface) download, started
/// within a second, so that many of them wait on the one port at the same time.
pub fn many_client_addresses(topology: Topology, server: Server, ports: Ports) {
    let mut lab = lab(topology, server, ports);
    let sources: Vec<Option<String>> = (0..ADDRESSES)
        .map(|i| Some(format!("198.18.0.{}", 10 + i)))
        .collect();
    // One `ip -batch` for all 200 addresses.
    let batch: String = sources
        .iter()
        .flatten()
        .map(|a| format!("addr add {a}/24 dev eth0\n"))
        .collect();
    let batch_path = lab.dir.join("addresses.ip");
    fs::write(&batch_path, batch).expect("write the address batch");
    lab.ip(&[
        "-n",
        &lab.client_ns(),
        "-batch",
        &batch_path.to_string_lossy(),
    ]);
    // Spread over a second: vsftpd listens with a backlog of 32, and 200 connections in the
    // same instant overflow it; the dropped handshakes are retried after 1, 2, 4, 8 s, and
    // some sessions then wait longer for their greeting than any client does.
    parallel_downloads(&mut lab, &sources, ADDRESS_STAGGER);
    let retrs = ServerLog::read(&lab)
        .commands()
        .iter()
        .filter(|c| c.starts_with("RETR "))
        .count();
    assert_eq!(retrs, ADDRESSES, "downloads the server served");
    assert_announced(&lab, ports);
    wait_no_pinholes(&lab);
}
