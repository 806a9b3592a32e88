//! `ftp-alg sniff`: watch FTP control connections on an interface, read-only, and say for each
//! data endpoint announced (PORT, EPRT, 227, 229) whether a pinhole in the kernel lets its data
//! connection through. It answers "why does my FTP hang?" on a gateway where some sessions do
//! not go through ftp-alg: theirs have no pinhole.
//!
//! The parts: [`packet`] takes a captured frame apart (etherparse), [`flows`] is the sans-IO
//! core (segments in, announcements out, with the proxy's own FTP parsers), [`report`] matches
//! announcements with pinholes and formats them. This module is the shell: a thread captures
//! with an `AF_PACKET` socket (pnet_datalink) and feeds the core, and a task reads the pinholes
//! with [`nft::list`] and prints.
//!
//! Timing. A gateway installs a passive pinhole just before it forwards the 227 or 229, and an
//! active one just after it has read the PORT or EPRT; the pinhole is gone once the transfer
//! is over, which can be milliseconds later, sooner than one `nft list` takes. So sniff also
//! follows the pinholes as they are added ([`nft::Monitor`]) and remembers them for a while,
//! and it reads the whole table at once when an announcement is seen (and already when a
//! client sends PASV or EPSV), then every [`POLL_INTERVAL`] until one matches. "No pinhole" is
//! said only after [`GRACE`].
//!
//! Not here: anything that changes the interface or the firewall. The capture is not
//! promiscuous: on a gateway the control connections go through the interface anyway.

// Every byte here comes off the wire: outside tests, clippy rejects the usual panic sources.
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic
    )
)]

mod filter;
pub mod flows;
pub mod packet;
pub mod report;

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::ftp::framing::DEFAULT_MAX_LINE;
use crate::pinhole::{nft, BackendError, PinholeEntry};

use flows::{Announcement, FlowTable, Limits, Observation};
use packet::LinkType;
use report::{Report, TlsReport};

/// The FTP control port, always watched.
pub const FTP_PORT: u16 = 21;
/// How long after an announcement a pinhole may still appear (the gateway installs an active
/// one after it has read the PORT), and how long a pinhole seen is remembered.
pub const GRACE: Duration = Duration::from_secs(2);
/// Pause between two readings of the pinholes while an announcement waits for one.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// Most control connections tracked at once.
const MAX_FLOWS: usize = 4096;
/// A control connection silent for this long is forgotten (it starts again at its next
/// segment; only a partial line is lost).
const FLOW_IDLE: Duration = Duration::from_secs(600);
/// The capture thread wakes this often to expire flows and to notice that sniff is ending.
const READ_TIMEOUT: Duration = Duration::from_millis(200);
/// Capture buffer: a whole 64 KiB IP packet and its link header. Linux hands a packet socket
/// outgoing segments before segmentation offload cuts them, so a frame can be that large.
const FRAME_BUFFER: usize = 65_536 + 256;
/// Announcements queued between the capture thread and the printer.
const QUEUE: usize = 1024;

/// The longest `--timeout`: a year, far below where a deadline would overflow.
const MAX_TIMEOUT_SECS: u64 = 365 * 24 * 3600;

/// `ftp-alg sniff`.
#[derive(Debug, clap::Args)]
pub struct SniffArgs {
    /// The interface to capture on, e.g. a gateway's client-side interface.
    #[arg(long, short)]
    pub interface: String,
    /// A control port to watch besides 21, in both directions (repeatable), e.g. 2121, the
    /// daemon's listen port.
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// Print one JSON object per line instead of a human line.
    #[arg(long)]
    pub json: bool,
    /// Exit after N announcements.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Exit after SECS seconds (at most a year): with status 5 if --count was given and fewer
    /// announcements were seen, else 0.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS))]
    pub timeout: Option<u64>,
    /// The nft executable.
    #[arg(long, default_value = "nft")]
    pub nft: PathBuf,
}

/// Why sniff could not run.
#[derive(Debug, Error)]
pub enum SniffError {
    /// The interface does not exist in this network namespace.
    #[error("no interface named {name:?}; interfaces here: {available}")]
    UnknownInterface {
        /// The name given.
        name: String,
        /// The interfaces that exist, comma-separated.
        available: String,
    },
    /// The interface's frames are neither Ethernet nor bare IP.
    #[error("cannot capture on {interface}: link type {arphrd} is neither Ethernet nor raw IP")]
    UnsupportedLink {
        /// The interface.
        interface: String,
        /// Its `ARPHRD_*` number.
        arphrd: u16,
    },
    /// The interface's link type could not be read from /sys.
    #[error("cannot read the link type of {interface}: {source}")]
    LinkType {
        /// The interface.
        interface: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// Opening a packet socket was refused.
    #[error("capturing on {interface} needs root or CAP_NET_RAW ({source})")]
    NotPermitted {
        /// The interface.
        interface: String,
        /// The refusal.
        source: std::io::Error,
    },
    /// Capturing failed.
    #[error("capture on {interface} failed: {source}")]
    Capture {
        /// The interface.
        interface: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// pnet gave no Ethernet channel (it has no other kind on Linux today).
    #[error("capture on {0}: unsupported channel type")]
    Channel(String),
    /// The pinholes cannot be read at all (no nft, or no permission to list the table).
    #[error("cannot read the pinholes: {0} (sniff needs CAP_NET_ADMIN for that)")]
    Pinholes(BackendError),
    /// Printing failed.
    #[error("writing the output: {0}")]
    Output(std::io::Error),
}

/// How sniff ended, short of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// --count announcements printed, --timeout without --count, Ctrl-C, or the reader of the
    /// output went away.
    Done,
    /// --timeout ended it before --count announcements were seen (exit status 5).
    CountNotReached,
}

/// What the capture thread sends.
enum Event {
    /// A segment revealed something, at this time.
    Seen {
        time: DateTime<Utc>,
        at: Instant,
        observation: Observation,
    },
    /// The capture failed; the thread has ended.
    Failed(std::io::Error),
}

/// An announcement waiting for its pinhole, or for [`GRACE`] to run out.
struct Pending {
    time: DateTime<Utc>,
    announcement: Announcement,
    /// When it was captured.
    at: Instant,
    deadline: Instant,
    pinhole: Option<PinholeEntry>,
}

/// Run `sniff` until --count, --timeout or Ctrl-C.
pub async fn run(args: SniffArgs) -> Result<Outcome, SniffError> {
    let (interface, link) = find_interface(&args.interface)?;
    let mut ports = vec![FTP_PORT];
    ports.extend(&args.ports);
    ports.sort_unstable();
    ports.dedup();
    let table = FlowTable::new(
        ports.iter().copied(),
        Limits {
            max_flows: MAX_FLOWS,
            idle: FLOW_IDLE,
            max_line: DEFAULT_MAX_LINE,
        },
    );
    let rx = open_capture(&interface, link, &ports)?;
    check_pinholes(&args.nft).await?;
    let added = watch_pinholes(&args.nft);

    let (tx, events) = mpsc::channel(QUEUE);
    let name = interface.name.clone();
    std::thread::Builder::new()
        .name("sniff-capture".into())
        .spawn(move || capture(rx, link, table, &tx))
        .map_err(|source| SniffError::Capture {
            interface: name,
            source,
        })?;
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    eprintln!(
        "ftp-alg sniff: capturing FTP control traffic on {} (tcp ports {}); Ctrl-C to stop",
        interface.name,
        ports.join(", ")
    );
    Printer::new(&args, interface.name).run(events, added).await
}

/// The pinholes added from now on, as [`nft::Monitor`] reports them. Without it sniff still
/// reads the pinholes, only it may miss one that comes and goes between two readings.
fn watch_pinholes(nft_path: &Path) -> mpsc::Receiver<Vec<PinholeEntry>> {
    let (tx, added) = mpsc::channel(QUEUE);
    match nft::Monitor::start(nft_path) {
        Ok(mut monitor) => {
            tokio::spawn(async move {
                loop {
                    match monitor.next().await {
                        Ok(Some(entries)) => {
                            if tx.send(entries).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            eprintln!("ftp-alg sniff: nft monitor has exited");
                            return;
                        }
                        Err(e) => {
                            eprintln!("ftp-alg sniff: nft monitor: {e}");
                            return;
                        }
                    }
                }
            });
        }
        Err(e) => eprintln!("ftp-alg sniff: cannot watch the pinholes being added: {e}"),
    }
    added
}

/// The interface named `name` and how to read its frames.
fn find_interface(name: &str) -> Result<(pnet_datalink::NetworkInterface, LinkType), SniffError> {
    let all = pnet_datalink::interfaces();
    let Some(interface) = all.iter().find(|i| i.name == name).cloned() else {
        let mut names: Vec<&str> = all.iter().map(|i| i.name.as_str()).collect();
        names.sort_unstable();
        return Err(SniffError::UnknownInterface {
            name: name.to_owned(),
            available: names.join(", "),
        });
    };
    // pnet does not say what a frame starts with; the kernel does.
    let path = Path::new("/sys/class/net").join(name).join("type");
    let arphrd = std::fs::read_to_string(&path)
        .and_then(|text| {
            text.trim()
                .parse::<u16>()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        })
        .map_err(|source| SniffError::LinkType {
            interface: name.to_owned(),
            source,
        })?;
    let link = LinkType::from_arphrd(arphrd).ok_or_else(|| SniffError::UnsupportedLink {
        interface: name.to_owned(),
        arphrd,
    })?;
    Ok((interface, link))
}

fn open_capture(
    interface: &pnet_datalink::NetworkInterface,
    link: LinkType,
    ports: &[u16],
) -> Result<Box<dyn pnet_datalink::DataLinkReceiver>, SniffError> {
    // Only Ethernet framing has a filter; raw-IP links (tun) are rarely busy gateways.
    let program = match link {
        LinkType::Ethernet => filter::program(ports),
        LinkType::RawIp => None,
    };
    if program.is_none() {
        eprintln!(
            "ftp-alg sniff: no kernel filter for this link or port list: every frame is read"
        );
    }
    let capture_error = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            SniffError::NotPermitted {
                interface: interface.name.clone(),
                source,
            }
        } else {
            SniffError::Capture {
                interface: interface.name.clone(),
                source,
            }
        }
    };
    let socket = filter::socket(program.as_deref()).map_err(capture_error)?;
    let config = pnet_datalink::Config {
        read_buffer_size: FRAME_BUFFER,
        read_timeout: Some(READ_TIMEOUT),
        promiscuous: false,
        // pnet binds the socket to the interface and owns it from here on.
        socket_fd: Some(socket.into_raw_fd()),
        ..Default::default()
    };
    match pnet_datalink::channel(interface, config) {
        Ok(pnet_datalink::Channel::Ethernet(_tx, rx)) => Ok(rx),
        Ok(_) => Err(SniffError::Channel(interface.name.clone())),
        Err(source) => Err(capture_error(source)),
    }
}

/// Whether nft reports that ftp-alg's table does not exist: then there is no pinhole at all.
fn table_missing(error: &BackendError) -> bool {
    matches!(error, BackendError::Refused { stderr, .. } if stderr.contains("No such file or directory"))
}

/// Reads the pinholes once before capturing starts, so that sniff fails at once when it never
/// could (no nft, no permission) rather than reporting "no pinhole" for every announcement.
async fn check_pinholes(nft_path: &Path) -> Result<(), SniffError> {
    match nft::list(nft_path).await {
        Ok(_) => Ok(()),
        Err(e) if table_missing(&e) => {
            eprintln!(
                "ftp-alg sniff: table inet {} does not exist: ftp-alg is not running in this \
                 network namespace, so no announcement has a pinhole",
                nft::TABLE
            );
            Ok(())
        }
        Err(e) => Err(SniffError::Pinholes(e)),
    }
}

/// The capture thread: frames in, observations out, until the printer goes away or the
/// capture fails. A frame that does not parse is skipped: it cannot be a control segment that
/// a peer acted on, since the peers' stacks would have dropped it as well.
fn capture(
    mut rx: Box<dyn pnet_datalink::DataLinkReceiver>,
    link: LinkType,
    mut table: FlowTable,
    tx: &mpsc::Sender<Event>,
) {
    let mut last_expiry = Instant::now();
    while !tx.is_closed() {
        let frame = match rx.next() {
            Ok(frame) => frame,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                ) =>
            {
                &[]
            }
            Err(e) => {
                let _ = tx.blocking_send(Event::Failed(e));
                return;
            }
        };
        let now = Instant::now();
        if now.duration_since(last_expiry) >= READ_TIMEOUT {
            table.expire(now.into_std());
            last_expiry = now;
        }
        let segment = match packet::parse_frame(link, frame) {
            Ok(Some(segment)) if table.is_control(segment.src.port(), segment.dst.port()) => {
                segment
            }
            Ok(_) => continue,
            Err(e) => {
                if !frame.is_empty() {
                    tracing::debug!("skipped a frame: {e}");
                }
                continue;
            }
        };
        for observation in table.handle(now.into_std(), &segment) {
            let event = Event::Seen {
                time: Utc::now(),
                at: now,
                observation,
            };
            if tx.blocking_send(event).is_err() {
                return;
            }
        }
    }
}

/// Pinholes seen lately, by (source, dial), with when each was last seen.
type Seen = HashMap<(IpAddr, SocketAddr), (Instant, PinholeEntry)>;

/// Matches announcements with pinholes and prints them, in the order they were seen.
struct Printer {
    interface: String,
    json: bool,
    count: Option<u64>,
    timeout: Option<Duration>,
    nft: PathBuf,
    pending: VecDeque<Pending>,
    /// Connections seen starting TLS, to be printed (they wait for no pinhole).
    tls: VecDeque<TlsReport>,
    seen: Seen,
    /// Read the pinholes until then.
    poll_until: Option<Instant>,
    next_poll: Instant,
    /// The last error reading the pinholes, said once on stderr.
    last_error: Option<String>,
    printed: u64,
}

impl Printer {
    fn new(args: &SniffArgs, interface: String) -> Printer {
        Printer {
            interface,
            json: args.json,
            count: args.count,
            timeout: args.timeout.map(Duration::from_secs),
            nft: args.nft.clone(),
            pending: VecDeque::new(),
            tls: VecDeque::new(),
            seen: HashMap::new(),
            poll_until: None,
            next_poll: Instant::now(),
            last_error: None,
            printed: 0,
        }
    }

    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut added: mpsc::Receiver<Vec<PinholeEntry>>,
    ) -> Result<Outcome, SniffError> {
        let end = self.timeout.map(|t| Instant::now() + t);
        // After --timeout, announcements already seen still get their verdict.
        let mut closing = false;
        let interrupted = tokio::signal::ctrl_c();
        tokio::pin!(interrupted);
        loop {
            let now = Instant::now();
            let polling = self.poll_until.is_some_and(|until| now < until);
            let wake = self.pending.front().map_or(now, |p| p.deadline);
            tokio::select! {
                event = events.recv(), if !closing => match event {
                    Some(Event::Seen { time, at, observation }) => self.observe(time, at, observation),
                    Some(Event::Failed(source)) => {
                        return Err(SniffError::Capture { interface: self.interface, source })
                    }
                    None => return Err(SniffError::Capture {
                        interface: self.interface,
                        source: std::io::Error::other("the capture thread stopped"),
                    }),
                },
                Some(entries) = added.recv() => self.added(entries),
                () = tokio::time::sleep_until(self.next_poll), if polling => self.poll().await,
                () = tokio::time::sleep_until(wake), if !self.pending.is_empty() => {}
                () = tokio::time::sleep_until(end.unwrap_or(now)), if end.is_some() && !closing => {
                    closing = true;
                }
                _ = &mut interrupted => return Ok(Outcome::Done),
            }
            match self.flush() {
                Ok(true) => return Ok(Outcome::Done),
                Ok(false) => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(Outcome::Done),
                Err(e) => return Err(SniffError::Output(e)),
            }
            if closing && self.pending.is_empty() {
                return Ok(match self.count {
                    Some(count) if self.printed < count => Outcome::CountNotReached,
                    _ => Outcome::Done,
                });
            }
        }
    }

    /// Note what the capture saw; start reading the pinholes.
    fn observe(&mut self, time: DateTime<Utc>, at: Instant, observation: Observation) {
        let now = Instant::now();
        let polling = self.poll_until.is_some_and(|until| until > now);
        if let Observation::TlsStarted(flow) = observation {
            self.tls.push_back(TlsReport::new(time, flow));
            return;
        }
        if let Observation::Announced(announcement) = observation {
            let pinhole = recent_match(&self.seen, at, &announcement);
            self.pending.push_back(Pending {
                time,
                announcement,
                at,
                deadline: at + GRACE,
                pinhole,
            });
            // A passive pinhole is in place by the time its reply is seen: read at once.
            self.next_poll = now;
        } else if !polling {
            self.next_poll = now;
        }
        let until = now + GRACE;
        self.poll_until = Some(self.poll_until.map_or(until, |u| u.max(until)));
    }

    /// Read the pinholes once and give each waiting announcement its match.
    async fn poll(&mut self) {
        let entries = match nft::list(&self.nft).await {
            Ok(entries) => {
                self.last_error = None;
                entries
            }
            Err(e) => {
                if !table_missing(&e) {
                    let message = e.to_string();
                    if self.last_error.as_ref() != Some(&message) {
                        eprintln!("ftp-alg sniff: reading the pinholes: {message}");
                        self.last_error = Some(message);
                    }
                }
                Vec::new()
            }
        };
        let now = Instant::now();
        for entry in entries {
            self.seen.insert((entry.source, entry.dial), (now, entry));
        }
        self.rematch();
        if self.pending.iter().all(|p| p.pinhole.is_some()) && !self.pending.is_empty() {
            // Everything seen so far has its pinhole: no need to keep reading.
            self.poll_until = Some(now);
        }
        self.next_poll = now + POLL_INTERVAL;
    }

    /// Pinholes the monitor saw added. A pinhole's elements arrive one by one (its pin, then
    /// its DNAT), so what is known of it is merged; a reading of the whole table replaces it.
    fn added(&mut self, entries: Vec<PinholeEntry>) {
        let now = Instant::now();
        for entry in entries {
            match self.seen.get_mut(&(entry.source, entry.dial)) {
                Some((when, known)) => {
                    known.maps_to = known.maps_to.or(entry.maps_to);
                    known.snat = known.snat.or(entry.snat);
                    *when = now;
                }
                None => {
                    self.seen.insert((entry.source, entry.dial), (now, entry));
                }
            }
        }
        self.rematch();
    }

    /// Give each announcement still without a pinhole the one seen for it, if any, and forget
    /// sightings too old to match an announcement still waiting or yet to come.
    fn rematch(&mut self) {
        let now = Instant::now();
        self.seen
            .retain(|_, (when, _)| now.duration_since(*when) <= GRACE * 2);
        for pending in self.pending.iter_mut().filter(|p| p.pinhole.is_none()) {
            pending.pinhole = recent_match(&self.seen, pending.at, &pending.announcement);
        }
    }

    /// Print the announcements at the front of the queue that have their verdict. `Ok(true)`
    /// once --count have been printed.
    fn flush(&mut self) -> std::io::Result<bool> {
        let now = Instant::now();
        let mut out = std::io::stdout().lock();
        while let Some(note) = self.tls.pop_front() {
            if self.json {
                serde_json::to_writer(&mut out, &note)?;
                writeln!(out)?;
            } else {
                writeln!(out, "{}", note.human())?;
            }
            out.flush()?;
        }
        while let Some(front) = self.pending.front() {
            if front.pinhole.is_none() && now < front.deadline {
                break;
            }
            let Some(done) = self.pending.pop_front() else {
                break;
            };
            let report = Report::new(done.time, &done.announcement, done.pinhole);
            if self.json {
                serde_json::to_writer(&mut out, &report)?;
                writeln!(out)?;
            } else {
                writeln!(out, "{}", report.human())?;
            }
            out.flush()?;
            self.printed += 1;
            if self.count.is_some_and(|count| self.printed >= count) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// The pinhole for `announcement` (see [`report::matches`]) seen most recently, and at most
/// [`GRACE`] before `at`: one seen earlier belongs to an older transfer.
fn recent_match(seen: &Seen, at: Instant, announcement: &Announcement) -> Option<PinholeEntry> {
    let since = at.checked_sub(GRACE).unwrap_or(at);
    seen.values()
        .filter(|(when, entry)| *when >= since && report::matches(entry, announcement))
        .max_by_key(|(when, _)| *when)
        .map(|(_, entry)| entry.clone())
}
