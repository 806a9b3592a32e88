//! The per-control-connection state machine: the ALG's policy, without any I/O.
//!
//! Bytes from the client and from the server go in (`handle_client_data`,
//! `handle_server_data`); actions come out (`poll_action`): forward this line, answer the client,
//! open a pinhole, close pinholes, shut down. A line that announces a data endpoint (PORT, EPRT,
//! 227, 229) makes the session ask for a pinhole and wait: nothing more comes out until the proxy
//! reports the result with `handle_opened`, so the rewritten line can never overtake its
//! pinhole, and a failed pinhole turns into a 425 instead of the announcement. Everything that
//! is not rewritten is forwarded byte for byte.
//!
//! What each mode rewrites and which pinhole it asks for is DESIGN.md's mode table; the functions
//! `Session::active_request` and `Session::passive_request` hold it.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};

use std::sync::Arc;

use crate::config::{AuthPolicy, ForeignPasv, ForeignPort, Mode, PolicyConfig};
use crate::ftp::command::{self, Command};
use crate::ftp::reply::{PassiveReply, ReplyPosition, ReplyTracker};
use crate::ftp::{canonical, framing, FramingError, LineBuffer};
use crate::pinhole::{Label, Opened, PinholeId, PinholeRequest, WindowRequest};

/// Lowest data port accepted in any announcement (DESIGN.md, safety defaults).
const MIN_DATA_PORT: u16 = 1024;
/// Client bytes buffered, unprocessed, before the proxy stops reading from the client.
const MAX_CLIENT_BACKLOG: usize = 64 * 1024;
/// How much longer than `proxy.max_line` a reply line may be: servers echo a command's argument
/// in their replies (proftpd's and pure-ftpd's `550 <path>: No such file or directory`), so a
/// command of the longest length gets a longer reply, which must not end the session.
const REPLY_ECHO_MARGIN: usize = 1024;
/// A USER argument is kept for `sessions list` up to this many characters.
const MAX_USER_CHARS: usize = 64;
/// Refusals a session logs one by one; past them it logs one in [`REFUSAL_LOG_EVERY`], with the
/// count, so that one read of 64 KiB of tiny bad lines cannot flood the journal. Metrics count
/// every refusal.
const LOGGED_REFUSALS: u64 = 10;
/// See [`LOGGED_REFUSALS`].
const REFUSAL_LOG_EVERY: u64 = 1000;

/// The addresses of one control connection, as the proxy sees them.
#[derive(Debug, Clone)]
pub struct SessionContext {
    /// Session id, unique within a daemon run.
    pub id: u64,
    /// Gateway or reverse.
    pub mode: Mode,
    /// The client's address (peer of the accepted socket).
    pub client: SocketAddr,
    /// The address the client's connection arrived on (what the client dialled, after any
    /// 1:1 NAT in front of this host).
    pub client_local: SocketAddr,
    /// The server's address (original destination in gateway mode, upstream in reverse mode).
    pub server: SocketAddr,
    /// This host's address on the upstream connection.
    pub upstream_local: SocketAddr,
    /// Reverse mode: address to announce in 227 replies instead of `client_local`.
    pub announce: Option<IpAddr>,
    /// Longest line accepted from either side.
    pub max_line: usize,
    /// What the session may do (`[policy]`).
    pub policy: Arc<PolicyConfig>,
    /// Pinholes the session may hold at once (`limits.max_pinholes_per_session`).
    pub max_pinholes: usize,
    /// Windows the session's client may hold at once (`limits.max_windows_per_client`).
    pub max_windows: usize,
    /// FTPS termination (`[tls]`, reverse mode): `None`, AUTH is handled as `policy.auth` says.
    pub tls: Option<TlsContext>,
}

/// What a session that may end TLS itself needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsContext {
    /// The port of the daemon's data relay listener, on every local address: a `PROT P`
    /// pinhole sends its connection there instead of to the other peer.
    pub relay_port: u16,
    /// The client came in on an implicit FTPS listener: TLS is on from the start.
    pub implicit: bool,
    /// The connection to the server is TLS too (`tls.upstream = "tls"`, negotiated before the
    /// session started, see `upstream_tls.rs`), with `PROT P`: every data connection is TLS
    /// towards the server, so every one is relayed, whatever the client's `PROT`.
    pub upstream: bool,
}

/// A `PROT P` data connection that ftp-alg relays itself: its pinhole sends it to the relay
/// listener, which hands it to the session that expects it, by the dialling peer and the port
/// it dialled (the pinhole's own key, see `ports.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    /// The pinhole that leads to the relay.
    pub pinhole: PinholeId,
    /// The port the peer dials (the pinhole's public port).
    pub port: u16,
    /// The two legs.
    pub leg: RelayLeg,
}

/// The two legs of a relayed data connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLeg {
    /// Who dials in: the client (passive) or the server (active).
    pub peer: IpAddr,
    /// Passive: the client dials in, and ftp-alg dials the server. Active: the server dials in,
    /// and ftp-alg dials the client.
    pub passive: bool,
    /// Where ftp-alg dials the other leg.
    pub dial: SocketAddr,
    /// The local address it dials from: the one the other peer expects data from.
    pub bind: IpAddr,
    /// The client's side is TLS (`PROT P`), with ftp-alg as the TLS server whoever dials
    /// (RFC 4217 §9); else it is in clear.
    pub client_tls: bool,
    /// The server's side is TLS (`tls.upstream = "tls"`), with ftp-alg as the TLS client
    /// whoever dials; else it is in clear.
    pub server_tls: bool,
}

/// Whether a session logs its `n`th refusal (see [`LOGGED_REFUSALS`]).
fn logs_refusal(n: u64) -> bool {
    n <= LOGGED_REFUSALS || n.is_multiple_of(REFUSAL_LOG_EVERY)
}

/// What the proxy must do next, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes to the server.
    ToServer(Vec<u8>),
    /// Send the server Telnet IP and Synch (IAC IP, then IAC DM with the DM as TCP urgent data,
    /// RFC 959 §4.1.3 and RFC 854), then these bytes: servers interrupt a running transfer for
    /// ABOR only when urgent data arrives, and vsftpd expects exactly this prefix.
    ToServerSynch(Vec<u8>),
    /// Write these bytes to the client.
    ToClient(Vec<u8>),
    /// Start TLS with the client, as TLS server, on the control connection (the 234 that
    /// allows it is the action before); the client's next bytes are its handshake.
    StartClientTls,
    /// Hand the data connection described to the relay (see [`Expectation`]).
    Expect(Expectation),
    /// Open this pinhole, then call [`Session::handle_opened`] with the result.
    Open(PinholeRequest),
    /// Open this window (`policy.tls_window`), then call [`Session::handle_opened`] with the
    /// result.
    OpenWindow(WindowRequest),
    /// Close these pinholes (their transfer is over or they were superseded).
    Close(Vec<PinholeId>),
    /// The client has finished sending: shut down the write half towards the server, and keep
    /// relaying the server's replies until it closes too.
    EndToServer,
    /// Close both connections.
    Shutdown,
}

/// Something the session did that the daemon counts (its metrics); drained with
/// [`Session::poll_event`]. Events never change what the session does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An announcement was rewritten and forwarded, its pinhole installed.
    Rewrote(Rewrite),
    /// A command or reply was refused.
    Refused(Reject),
}

/// The kinds of announcement ftp-alg rewrites, named after the verb or reply they came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrite {
    /// The client's PORT.
    Port,
    /// The client's EPRT.
    Eprt,
    /// The server's 227 (answer to PASV).
    Pasv,
    /// The server's 229 (answer to EPSV).
    Epsv,
}

impl Rewrite {
    /// Every kind, in the order metrics list them.
    pub const ALL: [Rewrite; 4] = [Rewrite::Port, Rewrite::Eprt, Rewrite::Pasv, Rewrite::Epsv];

    /// The kind as logs and metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Rewrite::Port => "port",
            Rewrite::Eprt => "eprt",
            Rewrite::Pasv => "pasv",
            Rewrite::Epsv => "epsv",
        }
    }
}

/// A session's TLS state, as `sessions list` and `sniff` show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsState {
    /// No TLS.
    #[default]
    Plain,
    /// The control connection is TLS, ended by ftp-alg; data connections are in clear
    /// (`PROT C`, kernel pinholes; relayed, TLS on the server's side, to a TLS upstream).
    Control,
    /// Control and data (`PROT P`) are TLS, ended by ftp-alg; data is relayed.
    Private,
    /// TLS between client and server, unread (`policy.auth = "transparent"`).
    Transparent,
}

impl TlsState {
    /// For logs and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsState::Plain => "plain",
            TlsState::Control => "control",
            TlsState::Private => "private",
            TlsState::Transparent => "transparent",
        }
    }
}

/// One end of the control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The FTP client.
    Client,
    /// The FTP server.
    Server,
}

/// Why the session refused a line; each maps to one reply and one log reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// PORT/EPRT names an address other than the control connection's client: an FTP bounce
    /// attempt (RFC 2577 §3) or a client confused by NAT.
    ThirdPartyAddress,
    /// A data port below 1024 (RFC 2577 §3: "the server should not ... connect to ports
    /// below 1024").
    PrivilegedPort,
    /// A PORT/EPRT argument that does not parse.
    BadArgument,
    /// A 227/229 from the server whose endpoint does not parse: forwarded as it is, it would
    /// send the client nowhere (or leak a private address) with no reason logged.
    BadPassiveReply,
    /// A line longer than `proxy.max_line`.
    LineTooLong,
    /// AUTH (TLS): ftp-alg cannot see inside TLS, so it refuses it and the client goes on in
    /// plain text; passing it would leave data connections without pinholes.
    TlsRefused,
    /// USER or PASS before AUTH TLS, with `policy.require_tls`.
    TlsRequired,
    /// The client and the data endpoint are of different address families; a kernel pinhole
    /// cannot translate between IPv4 and IPv6.
    FamilyMismatch,
    /// The pinhole could not be installed (firewall error, no free port).
    PinholeFailed,
    /// An announcement before the server has accepted a login, with
    /// `policy.data_before_login` off.
    NotLoggedIn,
    /// A command that `policy.read_only` or `policy.deny_commands` refuses.
    CommandDenied,
    /// A 227 naming another host than the server, with `policy.foreign_pasv = "refuse"`.
    ForeignPassiveAddress,
    /// The session holds `limits.max_pinholes_per_session` pinholes already.
    TooManyPinholes,
    /// A client line that servers would read in different ways (a control byte inside it, a
    /// verb that is not letters only, a literal 0xFF): see `ftp::canonical`.
    AmbiguousLine,
    /// A 227 or 229 that does not answer a PASV or an EPSV (or a passive reply spread over
    /// several lines): it opens nothing, and its text does not reach the client.
    UnexpectedPassiveReply,
    /// The window of a gateway session gone TLS (`policy.tls_window`) could not be opened: the
    /// client holds `limits.max_windows_per_client` already, or the firewall failed. The
    /// server has started TLS, so the session cannot go on in plain text: it ends with 421
    /// instead of the 234, and the client learns at once rather than at its first transfer.
    WindowRefused,
}

impl Reject {
    /// Every reason, in the order metrics list them.
    pub const ALL: [Reject; 16] = [
        Reject::ThirdPartyAddress,
        Reject::PrivilegedPort,
        Reject::BadArgument,
        Reject::BadPassiveReply,
        Reject::LineTooLong,
        Reject::TlsRefused,
        Reject::TlsRequired,
        Reject::FamilyMismatch,
        Reject::PinholeFailed,
        Reject::NotLoggedIn,
        Reject::CommandDenied,
        Reject::ForeignPassiveAddress,
        Reject::TooManyPinholes,
        Reject::AmbiguousLine,
        Reject::UnexpectedPassiveReply,
        Reject::WindowRefused,
    ];

    /// The reason as it appears in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::ThirdPartyAddress => "third_party_address",
            Reject::PrivilegedPort => "privileged_port",
            Reject::BadArgument => "bad_argument",
            Reject::BadPassiveReply => "bad_passive_reply",
            Reject::LineTooLong => "line_too_long",
            Reject::TlsRefused => "tls_refused",
            Reject::TlsRequired => "tls_required",
            Reject::FamilyMismatch => "family_mismatch",
            Reject::PinholeFailed => "pinhole_failed",
            Reject::NotLoggedIn => "not_logged_in",
            Reject::CommandDenied => "command_denied",
            Reject::ForeignPassiveAddress => "foreign_passive_address",
            Reject::TooManyPinholes => "too_many_pinholes",
            Reject::AmbiguousLine => "ambiguous_line",
            Reject::UnexpectedPassiveReply => "unexpected_passive_reply",
            Reject::WindowRefused => "window_refused",
        }
    }

    /// The reply the client gets when it sent the refused line.
    fn client_reply(self) -> &'static [u8] {
        match self {
            Reject::ThirdPartyAddress => b"501 Refused: the data address must be your own.\r\n",
            Reject::PrivilegedPort => b"501 Refused: data ports below 1024 are not allowed.\r\n",
            Reject::BadArgument => b"501 Syntax error in PORT/EPRT argument.\r\n",
            Reject::BadPassiveReply => Reject::BadPassiveReply.passive_reply(),
            Reject::LineTooLong => b"500 Line too long.\r\n",
            Reject::TlsRefused => {
                b"534 AUTH refused: this FTP gateway cannot inspect TLS; continue without it.\r\n"
            }
            Reject::TlsRequired => b"530 TLS required: send AUTH TLS before logging in.\r\n",
            Reject::FamilyMismatch => {
                b"522 Network protocol not supported: use the address family of this connection.\r\n"
            }
            Reject::PinholeFailed => b"425 Can't open data connection (firewall).\r\n",
            Reject::NotLoggedIn => b"530 Please log in first.\r\n",
            Reject::CommandDenied => b"550 Command not allowed by gateway policy.\r\n",
            Reject::ForeignPassiveAddress => Reject::ForeignPassiveAddress.passive_reply(),
            Reject::TooManyPinholes => b"425 Too many data connections announced at once.\r\n",
            Reject::AmbiguousLine => {
                b"500 Syntax error: control characters or a malformed command name.\r\n"
            }
            Reject::UnexpectedPassiveReply => Reject::UnexpectedPassiveReply.passive_reply(),
            Reject::WindowRefused => {
                b"421 No data window for a TLS session through this gateway now; closing.\r\n"
            }
        }
    }

    /// The reply the client gets instead of a refused 227/229 from the server.
    fn passive_reply(self) -> &'static [u8] {
        match self {
            Reject::LineTooLong => b"421 Server reply too long; closing control connection.\r\n",
            Reject::PinholeFailed => b"425 Can't open data connection (firewall).\r\n",
            Reject::TooManyPinholes => Reject::TooManyPinholes.client_reply(),
            Reject::UnexpectedPassiveReply => {
                b"425 Can't open data connection: the server's passive reply spans several lines.\r\n"
            }
            _ => b"425 Can't open data connection: the server announced an unusable endpoint.\r\n",
        }
    }
}

/// What a final reply from the server settles, besides answering its command.
#[derive(Debug)]
enum Owed {
    /// Nothing (the greeting, most commands).
    Plain,
    /// REIN: once the server accepts it, the login is over.
    Rein,
    /// AUTH passed on (`policy.auth = "transparent"`): a 234 starts TLS.
    Auth,
    /// The rewritten PORT/EPRT with its pinhole: a refusal by the server voids the pinhole.
    Announcement(PinholeId),
    /// PASV or EPSV: only its own reply (227 to PASV, 229 to EPSV) may open a passive pinhole.
    Passive(PassiveVerb),
    /// A transfer command with the pinholes of the endpoint it uses: its final reply (226,
    /// 426, 425, 550, ...) ends the transfer, and the pinholes go with it. Tying pinholes to
    /// the transfer, not to "the latest announcement", keeps a pipelined `PORT a, RETR, PORT b,
    /// RETR` from closing a's pinhole before the server has connected to it.
    Transfer {
        /// The pinholes of the endpoint it uses.
        ids: Vec<PinholeId>,
        /// The server has answered it with a preliminary reply (125/150): data may be flowing.
        /// A command the server never answered (proftpd silently drops one longer than its
        /// buffer) is not a running transfer, so it cannot keep the session from its idle
        /// timeout.
        started: bool,
    },
}

/// The command whose reply a passive announcement must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PassiveVerb {
    /// PASV, answered by 227.
    Pasv,
    /// EPSV, answered by 229.
    Epsv,
}

impl PassiveVerb {
    /// The reply code that answers it with an endpoint.
    fn reply_code(self) -> u16 {
        match self {
            PassiveVerb::Pasv => 227,
            PassiveVerb::Epsv => 229,
        }
    }
}

/// What waits for the server's outstanding replies.
#[derive(Debug)]
enum Blocked {
    /// ftp-alg's answer to a refused command: RFC 959 replies come in command order, and a
    /// pipelining client matches them up by order.
    Answer(Vec<u8>),
    /// A client line that cannot be judged before those replies (an announcement sent before
    /// the login's verdict).
    Line(Vec<u8>),
    /// AUTH TLS, answered by ftp-alg: the 234 and the handshake come once the server has
    /// answered everything before it, so no plain-text reply follows the handshake.
    StartTls,
}

/// Commands that change the server's files, refused by `policy.read_only` (RFC 959, RFC 3659,
/// and the MFMT/MFCT/MFF draft).
const WRITE_VERBS: &[&str] = &[
    "STOR", "STOU", "APPE", "DELE", "RNFR", "RNTO", "MKD", "XMKD", "RMD", "XRMD", "SITE", "MFMT",
    "MFCT", "MFF",
];

/// Commands that open a data connection on the current endpoint (RFC 959 §4.1.3, RFC 3659).
const TRANSFER_VERBS: &[&str] = &["RETR", "STOR", "STOU", "APPE", "LIST", "NLST", "MLSD"];

/// A rewrite waiting for its pinhole.
#[derive(Debug)]
enum Pending {
    /// The client's PORT or EPRT; `eprt` remembers which verb to answer with.
    Active { eprt: bool },
    /// The server's 227 or 229.
    Passive(PassiveReply),
    /// The server's 234 to AUTH, held until the session's window is open, and the server's
    /// bytes read after the one that held the 234 (TLS already), which must not overtake it.
    Window {
        reply: Vec<u8>,
        after: Vec<u8>,
        /// The client's bytes read meanwhile: like every action, they wait for the window.
        to_server: Vec<u8>,
    },
}

/// One control connection's state.
#[derive(Debug)]
pub struct Session {
    ctx: SessionContext,
    from_client: LineBuffer,
    from_server: LineBuffer,
    replies: ReplyTracker,
    actions: VecDeque<Action>,
    events: VecDeque<Event>,
    pending: Option<Pending>,
    /// Pinholes of the current data endpoint: announced, not yet taken by a transfer command.
    pinholes: Vec<PinholeId>,
    /// The window opened when TLS started (`policy.tls_window`); it lives as long as the
    /// session.
    window: Option<PinholeId>,
    /// The final replies the server still owes, in order: its greeting, then one per forwarded
    /// command, each with the pinholes that its reply settles.
    owed: VecDeque<Owed>,
    /// Something that must wait until the server has answered every command the client sent
    /// before it; the client's later lines wait too.
    blocked: Option<Blocked>,
    /// The server has accepted a login (230 or 232) since the start or the last REIN.
    logged_in: bool,
    /// Inside a multi-line 227/229 reply, whose lines are withheld from the client.
    withholding: bool,
    /// Refusals so far, for rate-limiting their log lines (see [`LOGGED_REFUSALS`]).
    refusals: u64,
    /// The argument of the client's last USER command, for operators listing sessions.
    user: Option<String>,
    /// TLS has started (AUTH accepted with `policy.auth = "transparent"`): every byte passes
    /// unread both ways.
    transparent: bool,
    /// ftp-alg has started TLS with the client on the control connection (`[tls]`).
    client_tls: bool,
    /// The client has sent `PBSZ` over TLS (RFC 4217 §8: before PROT).
    pbsz: bool,
    /// `PROT P`: data connections are TLS towards the client, relayed by ftp-alg.
    private: bool,
    /// The relay legs of the pinhole being opened, for a `PROT P` data connection.
    pending_relay: Option<RelayLeg>,
    /// The client has closed its side.
    client_eof: bool,
    /// ... and everything it sent before has been dealt with: nothing more goes to the server.
    client_done: bool,
    closed: bool,
}

impl Session {
    /// A session for one accepted and connected control connection.
    pub fn new(ctx: SessionContext) -> Session {
        let max_line = ctx.max_line;
        let implicit_tls = ctx.tls.is_some_and(|t| t.implicit);
        Session {
            ctx,
            from_client: LineBuffer::new(max_line),
            from_server: LineBuffer::new(max_line + REPLY_ECHO_MARGIN),
            replies: ReplyTracker::new(),
            actions: VecDeque::new(),
            events: VecDeque::new(),
            pending: None,
            pinholes: Vec::new(),
            window: None,
            owed: VecDeque::from([Owed::Plain]),
            blocked: None,
            logged_in: false,
            withholding: false,
            refusals: 0,
            user: None,
            transparent: false,
            client_tls: implicit_tls,
            pbsz: false,
            private: false,
            pending_relay: None,
            client_eof: false,
            client_done: false,
            closed: false,
        }
    }

    /// The session's addresses.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Whether the server has accepted a login (and no REIN has voided it since).
    pub fn logged_in(&self) -> bool {
        self.logged_in
    }

    /// The session's TLS state, for operators.
    pub fn tls_state(&self) -> TlsState {
        match (self.transparent, self.client_tls, self.private) {
            (true, _, _) => TlsState::Transparent,
            (_, true, true) => TlsState::Private,
            (_, true, false) => TlsState::Control,
            _ => TlsState::Plain,
        }
    }

    /// Whether ftp-alg speaks TLS to the server (`tls.upstream = "tls"`), for operators.
    pub fn upstream_tls(&self) -> bool {
        self.ctx.tls.is_some_and(|t| t.upstream)
    }

    /// The user name of the client's last USER command.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The pinholes the session holds: its current data endpoint's and those of transfers
    /// still awaiting their final reply.
    pub fn pinhole_ids(&self) -> impl Iterator<Item = PinholeId> + '_ {
        let announced = self.owed.iter().filter_map(|o| match o {
            Owed::Transfer { ids, .. } => Some(ids.as_slice()),
            _ => None,
        });
        announced
            .flatten()
            .chain(&self.pinholes)
            .chain(&self.window)
            .copied()
    }

    /// The next event to count, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Bytes read from the client.
    pub fn handle_client_data(&mut self, data: &[u8]) {
        if self.transparent {
            match &mut self.pending {
                // A session ended by a refused window forwards nothing more.
                _ if self.closed => {}
                Some(Pending::Window { to_server, .. }) => to_server.extend_from_slice(data),
                _ => self.actions.push_back(Action::ToServer(data.to_vec())),
            }
        } else if !self.client_eof {
            self.from_client.push(data);
        }
    }

    /// Whether the proxy should read more from the client. While a refusal waits for its turn
    /// the client's lines are not processed; past this much backlog the proxy stops reading,
    /// and TCP pushes back on a client that floods.
    pub fn wants_client_data(&self) -> bool {
        self.from_client.pending() < MAX_CLIENT_BACKLOG
    }

    /// Whether a transfer the server has started (125/150) is still waiting for its final
    /// reply: its data connection may be busy while the control connection is silent, so
    /// idleness does not count.
    pub fn transfer_in_progress(&self) -> bool {
        self.owed
            .iter()
            .any(|o| matches!(o, Owed::Transfer { started: true, .. }))
    }

    /// Bytes read from the server.
    pub fn handle_server_data(&mut self, data: &[u8]) {
        if self.transparent {
            match &mut self.pending {
                _ if self.closed => {}
                Some(Pending::Window { after, .. }) => after.extend_from_slice(data),
                _ => self.actions.push_back(Action::ToClient(data.to_vec())),
            }
            return;
        }
        self.from_server.push(data);
    }

    /// `side` closed its connection (or failed). When the client is done, its unfinished
    /// last line is dropped (it was never checked) and the server's remaining replies still
    /// reach the client; when the server is done, what it sent is forwarded and the session
    /// ends, with its pinholes.
    pub fn handle_eof(&mut self, side: Side) {
        if self.closed {
            return;
        }
        match side {
            // The complete lines still buffered go first; see `poll_action`.
            Side::Client => self.client_eof = true,
            Side::Server => {
                // Complete replies that arrived with the end of the stream are replies like any
                // other: they go through the checks (a 226 and a 221 often share the last read).
                while self.pending.is_none() {
                    match self.from_server.next_line() {
                        Some(line) => self.server_line(line),
                        None => break,
                    }
                }
                if self.closed {
                    // An over-long reply in those lines has ended the session already.
                    return;
                }
                self.closed = true;
                let rest = self.from_server.take_pending();
                if !rest.is_empty() && !self.withholding {
                    self.actions
                        .push_back(Action::ToClient(canonical::reply(&rest)));
                }
                self.take_owed_pinholes();
                self.pinholes.extend(self.window.take());
                self.close_pinholes();
                self.actions.push_back(Action::Shutdown);
            }
        }
    }

    /// The result of the last [`Action::Open`].
    pub fn handle_opened(&mut self, result: Option<Opened>) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        if self.closed {
            // The server went away while the pinhole was being installed: nothing can use it
            // now, and nothing may follow the Shutdown already queued.
            if let Some(opened) = result {
                let before_shutdown = self
                    .actions
                    .iter()
                    .position(|a| *a == Action::Shutdown)
                    .unwrap_or(self.actions.len());
                self.actions
                    .insert(before_shutdown, Action::Close(vec![opened.id]));
            }
            return;
        }
        if let Pending::Window {
            reply,
            after,
            to_server,
        } = pending
        {
            return self.window_opened(result, reply, after, to_server);
        }
        let Some(opened) = result else {
            match pending {
                Pending::Active { .. } => self.refuse_command(Reject::PinholeFailed),
                _ => self.refuse_reply(Reject::PinholeFailed),
            }
            return;
        };
        self.pinholes.push(opened.id);
        if let Some(leg) = self.pending_relay.take() {
            self.actions.push_back(Action::Expect(Expectation {
                pinhole: opened.id,
                port: opened.dial_port,
                leg,
            }));
        }
        match pending {
            Pending::Active { eprt } => {
                let ip = self.ctx.upstream_local.ip();
                let command = match ip {
                    IpAddr::V4(v4) if !eprt => {
                        Command::Port(SocketAddrV4::new(v4, opened.dial_port))
                    }
                    _ => Command::Eprt(SocketAddr::new(ip, opened.dial_port)),
                };
                tracing::debug!(announce = %SocketAddr::new(ip, opened.dial_port), "rewrote active announcement");
                let kind = if eprt { Rewrite::Eprt } else { Rewrite::Port };
                self.events.push_back(Event::Rewrote(kind));
                if let Some(line) = command.encode() {
                    self.forward_command(Action::ToServer(line), Owed::Announcement(opened.id));
                }
            }
            Pending::Window { .. } => {}
            Pending::Passive(reply) => {
                let endpoint = match self.ctx.mode {
                    Mode::Gateway => SocketAddr::new(self.ctx.server.ip(), opened.dial_port),
                    Mode::Reverse => SocketAddr::new(self.announced_ip(), opened.dial_port),
                };
                match reply.rewrite(endpoint) {
                    Ok(line) => {
                        tracing::debug!(announce = %endpoint, "rewrote passive announcement");
                        let kind = match reply {
                            PassiveReply::Pasv { .. } => Rewrite::Pasv,
                            PassiveReply::Epsv { .. } => Rewrite::Epsv,
                        };
                        self.events.push_back(Event::Rewrote(kind));
                        self.actions.push_back(Action::ToClient(line));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot announce {endpoint}");
                        self.close_pinholes();
                        self.refuse_reply(Reject::FamilyMismatch);
                    }
                }
            }
        }
    }

    /// The window for TLS is open (`Some`) or refused: forward the server's 234 that waited for
    /// it and the TLS bytes behind it, in the order they came, or end the session (see
    /// [`Reject::WindowRefused`]).
    fn window_opened(
        &mut self,
        result: Option<Opened>,
        reply: Vec<u8>,
        after: Vec<u8>,
        to_server: Vec<u8>,
    ) {
        match result {
            Some(opened) => {
                tracing::info!(
                    window = opened.id,
                    "TLS started: passing the session through unread; its client may reach the \
                     server's ports 1024-65535 while the session lives"
                );
                self.window = Some(opened.id);
                let same_read = self.from_server.take_pending();
                for bytes in [reply, same_read, after] {
                    if !bytes.is_empty() {
                        self.actions.push_back(Action::ToClient(bytes));
                    }
                }
                if !to_server.is_empty() {
                    self.actions.push_back(Action::ToServer(to_server));
                }
            }
            None => {
                if self.refusal_logged() {
                    tracing::warn!(
                        reason = Reject::WindowRefused.as_str(),
                        "no window for the TLS session: closing it"
                    );
                }
                self.events.push_back(Event::Refused(Reject::WindowRefused));
                self.actions.push_back(Action::ToClient(
                    Reject::WindowRefused.client_reply().to_vec(),
                ));
                self.closed = true;
                // A transfer pipelined ahead of AUTH holds a pinhole too.
                self.take_owed_pinholes();
                self.close_pinholes();
                self.actions.push_back(Action::Shutdown);
            }
        }
    }

    /// The next thing to do, or `None` until more input arrives (or a pinhole result, when an
    /// [`Action::Open`] is outstanding).
    pub fn poll_action(&mut self) -> Option<Action> {
        loop {
            if let Some(action) = self.actions.pop_front() {
                return Some(action);
            }
            if self.pending.is_some() || self.closed {
                return None;
            }
            if self.transparent {
                // What was buffered after the 234 is already TLS.
                let from_server = self.from_server.take_pending();
                let from_client = self.from_client.take_pending();
                if !from_server.is_empty() {
                    self.actions.push_back(Action::ToClient(from_server));
                }
                if !from_client.is_empty() {
                    self.actions.push_back(Action::ToServer(from_client));
                }
                if self.client_eof && !self.client_done {
                    self.client_done = true;
                    self.actions.push_back(Action::EndToServer);
                }
                if self.actions.is_empty() {
                    return None;
                }
                continue;
            }
            if self.owed.is_empty() {
                match self.blocked.take() {
                    Some(Blocked::Answer(reply)) => {
                        self.actions.push_back(Action::ToClient(reply));
                        continue;
                    }
                    Some(Blocked::Line(raw)) => {
                        self.client_line(Ok(raw));
                        continue;
                    }
                    Some(Blocked::StartTls) => {
                        self.start_tls();
                        continue;
                    }
                    None => {}
                }
            }
            if let Some(line) = self.from_server.next_line() {
                self.server_line(line);
            } else if self.blocked.is_some() {
                return None;
            } else if let Some(line) = self.from_client.next_line() {
                self.client_line(line);
            } else if self.client_eof && !self.client_done {
                self.client_done = true;
                // An unfinished last line was never checked: it is not forwarded.
                self.from_client.take_pending();
                self.actions.push_back(Action::EndToServer);
            } else {
                return None;
            }
        }
    }

    /// Answer AUTH TLS and hand the control connection to TLS. A client sends its handshake
    /// only after the 234; bytes it sent before are not part of it, and the session ends.
    fn start_tls(&mut self) {
        if self.from_client.pending() > 0 {
            tracing::warn!("client sent more after AUTH TLS without waiting for 234: closing");
            self.actions.push_back(Action::ToClient(
                b"421 Nothing may follow AUTH TLS before its reply; closing.\r\n".to_vec(),
            ));
            self.closed = true;
            self.close_pinholes();
            self.actions.push_back(Action::Shutdown);
            return;
        }
        tracing::info!("AUTH TLS: starting TLS with the client");
        self.client_tls = true;
        self.actions.push_back(Action::ToClient(
            b"234 Proceed with TLS negotiation.\r\n".to_vec(),
        ));
        self.actions.push_back(Action::StartClientTls);
    }

    fn client_line(&mut self, line: Result<Vec<u8>, FramingError>) {
        let raw = match line {
            Ok(raw) => raw,
            Err(_) => return self.refuse_command(Reject::LineTooLong),
        };
        // What the server receives is this text and CR LF, whatever the client sent: see
        // `ftp::canonical` for why a line with more than one reading is refused instead.
        let text = match canonical::command(&raw) {
            Ok(text) => text,
            Err(why) => {
                tracing::debug!(error = %why, line = %command::redacted(&framing::text_of(&raw)), "ambiguous command");
                return self.refuse_command(Reject::AmbiguousLine);
            }
        };
        let forwarded = [text.as_slice(), b"\r\n"].concat();
        tracing::debug!(command = %command::redacted(&text), "client command");
        let command = Command::parse(&text);
        if let Command::Other { verb } = &command {
            if verb == "USER" {
                // Shown to operators in a terminal: no control characters (escape sequences).
                self.user = command::argument(&text).map(|u| {
                    u.chars()
                        .filter(|c| !c.is_control())
                        .take(MAX_USER_CHARS)
                        .collect()
                });
            }
        }
        if let Command::Other { verb } = &command {
            if self.ctx.tls.is_some() && self.tls_command(verb, &text) {
                return;
            }
        }
        match command {
            // Pipelined after USER and PASS, an announcement comes before the server's verdict
            // on the login: it waits for it.
            Command::Port(_) | Command::Eprt(_)
                if !self.logged_in
                    && !self.ctx.policy.data_before_login
                    && !self.owed.is_empty() =>
            {
                self.blocked = Some(Blocked::Line(raw));
            }
            Command::Port(addr) => self.active(SocketAddr::V4(addr), false),
            Command::Eprt(addr) => self.active(addr, true),
            Command::BadArgument { .. } => self.refuse_command(Reject::BadArgument),
            Command::Other { verb }
                if self.ctx.policy.require_tls
                    && !self.client_tls
                    && matches!(verb.as_str(), "USER" | "PASS" | "ACCT") =>
            {
                self.refuse_command(Reject::TlsRequired)
            }
            Command::Other { verb } if verb == "AUTH" => match self.ctx.policy.auth {
                AuthPolicy::Refuse => self.refuse_command(Reject::TlsRefused),
                AuthPolicy::Transparent => {
                    self.forward_command(Action::ToServer(forwarded), Owed::Auth)
                }
            },
            Command::Other { verb } if self.denied(&verb) => {
                self.refuse_command(Reject::CommandDenied)
            }
            // Clients signal ABOR differently (Telnet IP + Synch, or the whole line sent as
            // urgent data as Python's ftplib does), and the proxy cannot see where the client's
            // urgent mark was; every ABOR goes to the server in RFC 959's form.
            Command::Other { verb } if verb == "ABOR" => {
                self.forward_command(Action::ToServerSynch(forwarded), Owed::Plain);
            }
            Command::Other { verb } if verb == "REIN" => {
                // RFC 959 §4.1.1: REIN flushes all I/O and account information; a data endpoint
                // announced before it is void, and so is the login once the server agrees.
                self.close_pinholes();
                self.forward_command(Action::ToServer(forwarded), Owed::Rein);
            }
            Command::Other { verb } if TRANSFER_VERBS.contains(&verb.as_str()) => {
                let ids = std::mem::take(&mut self.pinholes);
                let owed = Owed::Transfer {
                    ids,
                    started: false,
                };
                self.forward_command(Action::ToServer(forwarded), owed);
            }
            Command::Pasv => self.forward_command(
                Action::ToServer(forwarded),
                Owed::Passive(PassiveVerb::Pasv),
            ),
            Command::Epsv(_) => self.forward_command(
                Action::ToServer(forwarded),
                Owed::Passive(PassiveVerb::Epsv),
            ),
            Command::Other { .. } => self.forward_command(Action::ToServer(forwarded), Owed::Plain),
        }
    }

    fn server_line(&mut self, line: Result<Vec<u8>, FramingError>) {
        let raw = match line {
            Ok(raw) => raw,
            Err(_) => {
                self.refuse_reply(Reject::LineTooLong);
                self.handle_eof(Side::Server);
                return;
            }
        };
        let text = framing::text_of(&raw);
        let reply = self.replies.classify(&text);
        let code = reply.code.unwrap_or(0);
        let complete = matches!(reply.position, ReplyPosition::Single | ReplyPosition::Last);
        let mut answered = None;
        if complete && (200..700).contains(&code) {
            answered = self.settle(code);
            if let Some(Pending::Window { reply, .. }) = &mut self.pending {
                *reply = canonical::reply(&raw);
                return;
            }
            if code == 230 || code == 232 {
                self.logged_in = true;
            }
        } else if complete && (100..200).contains(&code) {
            if let Some(Owed::Transfer { started, .. }) = self.owed.front_mut() {
                *started = true;
            }
        }
        let passive_code = code == 227 || code == 229;
        if reply.position == ReplyPosition::First && passive_code {
            // Nothing in a multi-line passive reply is acted on, and none of it reaches the
            // client: it may hold the server's private address.
            self.withholding = true;
            return;
        }
        if self.withholding {
            if reply.position == ReplyPosition::Last {
                self.withholding = false;
                self.unexpected_passive(code, answered);
            }
            return;
        }
        if reply.position == ReplyPosition::Single && passive_code {
            if answered.map(PassiveVerb::reply_code) != Some(code) {
                return self.unexpected_passive(code, None);
            }
            return match PassiveReply::parse(&text) {
                Ok(parsed) => self.passive(parsed),
                Err(e) => {
                    tracing::warn!(error = %e, "unusable passive reply");
                    self.close_pinholes();
                    self.refuse_reply(Reject::BadPassiveReply);
                }
            };
        }
        self.actions
            .push_back(Action::ToClient(canonical::reply(&raw)));
    }

    /// A 227/229 that may not open a pinhole: one that answers no PASV/EPSV (`answered` is
    /// `None`), or a multi-line one. Its text is withheld; the client gets a reply with the same
    /// code, or a 425 where it asked for a passive endpoint.
    fn unexpected_passive(&mut self, code: u16, answered: Option<PassiveVerb>) {
        if self.refusal_logged() {
            tracing::warn!(
                code,
                reason = Reject::UnexpectedPassiveReply.as_str(),
                "passive reply that answers no PASV/EPSV, or spans several lines: withheld"
            );
        }
        self.events
            .push_back(Event::Refused(Reject::UnexpectedPassiveReply));
        if answered.is_some() {
            self.close_pinholes();
            self.actions.push_back(Action::ToClient(
                Reject::UnexpectedPassiveReply.passive_reply().to_vec(),
            ));
        } else {
            self.actions.push_back(Action::ToClient(
                format!("{code} Reply withheld by the FTP gateway: it answers no PASV/EPSV.\r\n")
                    .into_bytes(),
            ));
        }
    }

    /// PORT/EPRT from the client: the server will connect to a port of this host, which the
    /// pinhole sends on to the client's port.
    fn active(&mut self, target: SocketAddr, eprt: bool) {
        if !self.logged_in && !self.ctx.policy.data_before_login {
            return self.refuse_command(Reject::NotLoggedIn);
        }
        let client = self.ctx.client.ip();
        let target = match self.ctx.policy.foreign_port {
            _ if target.ip() == client => target,
            ForeignPort::Refuse => {
                tracing::debug!(%target, "active announcement names another host");
                return self.refuse_command(Reject::ThirdPartyAddress);
            }
            ForeignPort::Replace => {
                tracing::info!(%target, "active announcement names another host: using the client's address");
                SocketAddr::new(client, target.port())
            }
        };
        if target.port() < MIN_DATA_PORT {
            return self.refuse_command(Reject::PrivilegedPort);
        }
        if client.is_ipv4() != self.ctx.upstream_local.is_ipv4() {
            return self.refuse_command(Reject::FamilyMismatch);
        }
        let request = self.active_request(target);
        let request = self.through_relay(request, false);
        self.request_pinhole(request, Pending::Active { eprt });
    }

    /// 227/229 from the server: the client will connect to the announced port, which the
    /// pinhole lets through (and in reverse mode sends on to the server).
    fn passive(&mut self, reply: PassiveReply) {
        // The server's previous passive endpoint is void now, whatever becomes of this one.
        self.close_pinholes();
        if !self.logged_in && !self.ctx.policy.data_before_login {
            return self.refuse_reply(Reject::NotLoggedIn);
        }
        if reply.port() < MIN_DATA_PORT {
            return self.refuse_reply(Reject::PrivilegedPort);
        }
        // A 227 carries an IPv4 address, which must be announced to the client; and a pinhole
        // cannot join an IPv4 client to an IPv6 server or the reverse.
        let announced_v4 = match self.ctx.mode {
            Mode::Gateway => self.ctx.server.is_ipv4(),
            Mode::Reverse => self.announced_ip().is_ipv4(),
        };
        let family_ok = self.ctx.client.is_ipv4() == self.ctx.server.is_ipv4()
            && (announced_v4 || !matches!(reply, PassiveReply::Pasv { .. }));
        if !family_ok {
            return self.refuse_reply(Reject::FamilyMismatch);
        }
        if let PassiveReply::Pasv { addr, .. } = &reply {
            let foreign = IpAddr::V4(*addr.ip()) != self.ctx.server.ip().to_canonical();
            if foreign && self.ctx.policy.foreign_pasv == ForeignPasv::Refuse {
                tracing::info!(announced = %addr, "227 names another host than the server");
                return self.refuse_reply(Reject::ForeignPassiveAddress);
            }
        }
        let request = self.passive_request(reply.port());
        let request = self.through_relay(request, true);
        self.request_pinhole(request, Pending::Passive(reply));
    }

    /// DESIGN.md: gateway `S → G_out:Q DNAT to C:P`; reverse `S → G_priv:Q DNAT to C:P, SNAT to
    /// G_pub`. G_out and G_priv are both this host's address on the upstream connection.
    fn active_request(&self, target: SocketAddr) -> PinholeRequest {
        PinholeRequest {
            source: self.ctx.server.ip(),
            dial_ip: self.ctx.upstream_local.ip(),
            dial_port: None,
            dnat: Some(target),
            snat: match self.ctx.mode {
                Mode::Gateway => None,
                Mode::Reverse => Some(self.ctx.client_local.ip()),
            },
            label: self.label(),
        }
    }

    /// DESIGN.md: gateway `C → S:P`; reverse `C → G_pub:Q DNAT to S:P, SNAT to G_priv`. The
    /// server's own address is used whatever the 227 said, so a pinhole never leads to a third
    /// host. In gateway mode the source is also rewritten to this host's upstream address, so that
    /// the server sees the data connection come from its control connection's peer (vsftpd's
    /// default `pasv_promiscuous=NO` refuses anything else). In reverse mode the pinhole is keyed
    /// on the address the client dialled, which is also what curl and ftplib use when they
    /// ignore the 227 address.
    fn passive_request(&self, port: u16) -> PinholeRequest {
        let server = self.ctx.server.ip();
        let (dial_ip, dial_port, dnat) = match self.ctx.mode {
            Mode::Gateway => (server, Some(port), None),
            Mode::Reverse => (
                self.ctx.client_local.ip(),
                None,
                Some(SocketAddr::new(server, port)),
            ),
        };
        PinholeRequest {
            source: self.ctx.client.ip(),
            dial_ip,
            dial_port,
            dnat,
            snat: Some(self.ctx.upstream_local.ip()),
            label: self.label(),
        }
    }

    /// Under `PROT P` the data connection is TLS towards the client and ftp-alg must end it,
    /// and with a TLS upstream it is TLS towards the server, which only ftp-alg can speak:
    /// the pinhole sends it to the relay listener on the address it was dialled at, untranslated
    /// at source, and the relay dials the pinhole's real destination from the address the
    /// source translation would have given (see [`Expectation`]). Under `PROT C` to a plain
    /// server (or without TLS) the request is the kernel's, unchanged.
    fn through_relay(&mut self, mut request: PinholeRequest, passive: bool) -> PinholeRequest {
        self.pending_relay = None;
        let relayed = self.private || self.ctx.tls.is_some_and(|t| t.upstream);
        let (Some(tls), true, Some(dial)) = (self.ctx.tls, relayed, request.dnat) else {
            return request;
        };
        let bind = match passive {
            true => self.ctx.upstream_local.ip(),
            false => self.ctx.client_local.ip(),
        };
        self.pending_relay = Some(RelayLeg {
            peer: request.source,
            passive,
            dial,
            bind,
            client_tls: self.private,
            server_tls: tls.upstream,
        });
        request.dnat = Some(SocketAddr::new(request.dial_ip, tls.relay_port));
        request.snat = None;
        request
    }

    fn request_pinhole(&mut self, request: PinholeRequest, pending: Pending) {
        // A new announcement voids the previous data endpoint (RFC 959 §3.2), unless a transfer
        // command has already taken it.
        self.close_pinholes();
        let held: usize = self
            .owed
            .iter()
            .map(|o| match o {
                Owed::Transfer { ids, .. } => ids.len(),
                _ => 0,
            })
            .sum();
        if held >= self.ctx.max_pinholes {
            return match pending {
                Pending::Active { .. } => self.refuse_command(Reject::TooManyPinholes),
                _ => self.refuse_reply(Reject::TooManyPinholes),
            };
        }
        self.pending = Some(pending);
        self.actions.push_back(Action::Open(request));
    }

    fn forward_command(&mut self, action: Action, owed: Owed) {
        self.owed.push_back(owed);
        self.actions.push_back(action);
    }

    /// The server's next final reply has arrived, with `code`: settle what it answers, and say
    /// whether that was a PASV or an EPSV. A reply nobody asked for (a 421 before closing, say)
    /// finds nothing owed and settles nothing.
    fn settle(&mut self, code: u16) -> Option<PassiveVerb> {
        let mut answered = None;
        let closes = match self.owed.pop_front() {
            Some(Owed::Transfer { ids, .. }) => ids,
            Some(Owed::Passive(verb)) => {
                answered = Some(verb);
                Vec::new()
            }
            Some(Owed::Rein) => {
                if (200..300).contains(&code) {
                    self.logged_in = false;
                }
                Vec::new()
            }
            Some(Owed::Auth) if code == 234 => {
                self.transparent = true;
                if self.ctx.policy.tls_window {
                    // The pinholes of the plain part end first: nothing may follow the window's
                    // request until its result is in.
                    self.close_pinholes();
                    // The 234 waits for the window (see `server_line`): once the client has it,
                    // its data connections may follow at once.
                    self.pending = Some(Pending::Window {
                        reply: Vec::new(),
                        after: Vec::new(),
                        to_server: Vec::new(),
                    });
                    self.actions.push_back(Action::OpenWindow(WindowRequest {
                        label: self.label(),
                        snat: self.ctx.upstream_local.ip(),
                        max_per_client: self.ctx.max_windows,
                    }));
                } else {
                    tracing::info!(
                        "TLS started: passing the session through unread, without pinholes"
                    );
                }
                std::mem::take(&mut self.pinholes)
            }
            Some(Owed::Announcement(id)) if !(200..300).contains(&code) => {
                match self.pinholes.iter().position(|p| *p == id) {
                    Some(index) => vec![self.pinholes.remove(index)],
                    None => Vec::new(),
                }
            }
            _ => Vec::new(),
        };
        if !closes.is_empty() {
            self.actions.push_back(Action::Close(closes));
        }
        answered
    }

    /// Count a refusal, and say whether its log line is written (see [`LOGGED_REFUSALS`]).
    fn refusal_logged(&mut self) -> bool {
        self.refusals += 1;
        logs_refusal(self.refusals)
    }

    /// Answer a client command that is not forwarded, in its turn (see [`Blocked::Answer`]).
    fn refuse_command(&mut self, reason: Reject) {
        if self.refusal_logged() {
            tracing::warn!(
                reason = reason.as_str(),
                refusals = self.refusals,
                "refused command"
            );
        }
        self.events.push_back(Event::Refused(reason));
        self.blocked = Some(Blocked::Answer(reason.client_reply().to_vec()));
    }

    /// Replace a server reply that cannot be forwarded; it takes that reply's place.
    fn refuse_reply(&mut self, reason: Reject) {
        if self.refusal_logged() {
            tracing::warn!(
                reason = reason.as_str(),
                refusals = self.refusals,
                "refused server reply"
            );
        }
        self.events.push_back(Event::Refused(reason));
        self.actions
            .push_back(Action::ToClient(reason.passive_reply().to_vec()));
    }

    /// The pinholes of transfers whose final reply will never come now (the session is
    /// ending): they join those to close.
    fn take_owed_pinholes(&mut self) {
        for owed in std::mem::take(&mut self.owed) {
            if let Owed::Transfer { ids, .. } = owed {
                self.pinholes.extend(ids);
            }
        }
    }

    fn close_pinholes(&mut self) {
        if !self.pinholes.is_empty() {
            self.actions
                .push_back(Action::Close(std::mem::take(&mut self.pinholes)));
        }
    }

    /// The commands of RFC 4217 that ftp-alg answers itself when it ends TLS: AUTH, PBSZ, PROT
    /// and CCC never reach the server, which may know nothing of TLS. REIN is refused on a TLS
    /// session, since it would reset a security state the server does not hold. Returns
    /// whether `verb` was one of them.
    fn tls_command(&mut self, verb: &str, text: &[u8]) -> bool {
        let argument = command::argument(text)
            .unwrap_or_default()
            .trim()
            .to_ascii_uppercase();
        let reply: &[u8] = match verb {
            "AUTH" if self.client_tls => b"503 TLS is already in use.\r\n",
            "AUTH" if matches!(argument.as_str(), "TLS" | "TLS-C" | "SSL") => {
                self.blocked = Some(Blocked::StartTls);
                return true;
            }
            "AUTH" => b"504 AUTH: only TLS is supported.\r\n",
            "PBSZ" | "PROT" | "CCC" if !self.client_tls => {
                b"503 Secure the control connection with AUTH TLS first.\r\n"
            }
            "PBSZ" => {
                self.pbsz = true;
                b"200 PBSZ=0\r\n"
            }
            "PROT" if !self.pbsz => b"503 PBSZ first.\r\n",
            "PROT" => match argument.as_str() {
                "C" => {
                    self.private = false;
                    b"200 Protection level set to Clear.\r\n"
                }
                "P" => {
                    self.private = true;
                    b"200 Protection level set to Private.\r\n"
                }
                "S" | "E" => b"536 Only PROT C and PROT P are supported.\r\n",
                _ => b"504 PROT: unknown protection level.\r\n",
            },
            "CCC" => b"534 CCC refused: the control connection stays encrypted.\r\n",
            "REIN" if self.client_tls || self.ctx.tls.is_some_and(|t| t.upstream) => {
                b"502 REIN is not available on a TLS session.\r\n"
            }
            _ => return false,
        };
        self.blocked = Some(Blocked::Answer(reply.to_vec()));
        true
    }

    /// Whether `[policy]` refuses the command `verb` (uppercase).
    fn denied(&self, verb: &str) -> bool {
        let policy = &self.ctx.policy;
        (policy.read_only && WRITE_VERBS.contains(&verb))
            || policy
                .deny_commands
                .iter()
                .any(|d| d.eq_ignore_ascii_case(verb))
    }

    fn announced_ip(&self) -> IpAddr {
        self.ctx.announce.unwrap_or(self.ctx.client_local.ip())
    }

    fn label(&self) -> Label {
        Label {
            session: self.ctx.id,
            client: self.ctx.client.ip(),
            server: self.ctx.server.ip(),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn ctx(mode: Mode) -> SessionContext {
        SessionContext {
            id: 7,
            mode,
            client: "198.18.0.2:50000".parse().unwrap(),
            client_local: match mode {
                Mode::Gateway => "198.18.0.1:2121".parse().unwrap(),
                Mode::Reverse => "198.18.0.1:21".parse().unwrap(),
            },
            server: "203.0.113.2:21".parse().unwrap(),
            upstream_local: "203.0.113.1:45000".parse().unwrap(),
            announce: None,
            max_line: 512,
            policy: Arc::default(),
            max_pinholes: 8,
            max_windows: 2,
            tls: None,
        }
    }

    /// A session whose server greeting and login have been relayed, as every real one starts.
    pub(super) fn greeted(mode: Mode) -> Session {
        let mut s = Session::new(ctx(mode));
        for (from_server, line) in [
            (true, &b"220 ready\r\n"[..]),
            (false, b"USER anonymous\r\n"),
            (true, b"230 Login successful.\r\n"),
        ] {
            if from_server {
                s.handle_server_data(line);
            } else {
                s.handle_client_data(line);
            }
            drain(&mut s);
        }
        s
    }

    /// A greeted session whose client has just sent `verb` (PASV or EPSV): the server's next
    /// reply answers it.
    pub(super) fn asked(mode: Mode, verb: &str) -> Session {
        let mut s = greeted(mode);
        s.handle_client_data(format!("{verb}\r\n").as_bytes());
        assert_eq!(
            drain(&mut s),
            vec![Action::ToServer(format!("{verb}\r\n").into_bytes())]
        );
        s
    }

    pub(super) fn drain(s: &mut Session) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    pub(super) fn opened(id: PinholeId, port: u16) -> Option<Opened> {
        Some(Opened {
            id,
            dial_port: port,
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn other_lines_pass_byte_for_byte_in_both_directions() {
        let mut s = greeted(Mode::Gateway);
        s.handle_client_data(b"USER anonymous\r\nrEtR  file name \r\n");
        s.handle_server_data(b"211-Features:\r\n 227 (1,2,3,4,5,6)\r\n211 End\r\n");
        assert_eq!(
            drain(&mut s),
            vec![
                Action::ToClient(b"211-Features:\r\n".to_vec()),
                Action::ToClient(b" 227 (1,2,3,4,5,6)\r\n".to_vec()),
                Action::ToClient(b"211 End\r\n".to_vec()),
                Action::ToServer(b"USER anonymous\r\n".to_vec()),
                Action::ToServer(b"rEtR  file name \r\n".to_vec()),
            ]
        );
    }

    #[test]
    fn gateway_port_waits_for_its_pinhole_then_announces_the_gateway() {
        let mut s = greeted(Mode::Gateway);
        s.handle_client_data(b"port 198,18,0,2,156,64\r\nRETR f\r\n");
        let actions = drain(&mut s);
        assert_eq!(
            actions,
            vec![Action::Open(PinholeRequest {
                source: ip("203.0.113.2"),
                dial_ip: ip("203.0.113.1"),
                dial_port: None,
                dnat: Some("198.18.0.2:40000".parse().unwrap()),
                snat: None,
                label: Label {
                    session: 7,
                    client: ip("198.18.0.2"),
                    server: ip("203.0.113.2"),
                },
            })]
        );
        s.handle_opened(opened(1, 61000));
        assert_eq!(
            drain(&mut s),
            vec![
                Action::ToServer(b"PORT 203,0,113,1,238,72\r\n".to_vec()),
                Action::ToServer(b"RETR f\r\n".to_vec()),
            ]
        );
        s.handle_server_data(b"200 PORT ok\r\n150 Opening\r\n226 Done\r\n");
        assert_eq!(
            drain(&mut s),
            vec![
                Action::ToClient(b"200 PORT ok\r\n".to_vec()),
                Action::ToClient(b"150 Opening\r\n".to_vec()),
                Action::Close(vec![1]),
                Action::ToClient(b"226 Done\r\n".to_vec()),
            ]
        );
    }

    #[test]
    fn pipelined_transfers_each_keep_their_pinhole_until_their_own_end() {
        let mut s = greeted(Mode::Gateway);
        s.handle_client_data(
            b"PORT 198,18,0,2,156,64\r\nRETR a\r\nPORT 198,18,0,2,156,65\r\nRETR b\r\n",
        );
        assert!(matches!(&drain(&mut s)[..], [Action::Open(_)]));
        s.handle_opened(opened(1, 61000));
        let actions = drain(&mut s);
        assert!(
            matches!(
                &actions[..],
                [Action::ToServer(_), Action::ToServer(_), Action::Open(_)]
            ),
            "the second PORT must not close the first one's pinhole: {actions:?}"
        );
        s.handle_opened(opened(2, 61001));
        drain(&mut s);
        s.handle_server_data(b"200 ok\r\n150 a\r\n226 a done\r\n");
        let actions = drain(&mut s);
        assert!(actions.contains(&Action::Close(vec![1])), "{actions:?}");
        assert!(!actions.contains(&Action::Close(vec![2])), "{actions:?}");
        s.handle_server_data(b"200 ok\r\n150 b\r\n226 b done\r\n");
        assert!(drain(&mut s).contains(&Action::Close(vec![2])));
    }

    #[test]
    fn the_user_name_shown_to_operators_has_no_control_characters() {
        let mut s = Session::new(ctx(Mode::Gateway));
        s.handle_server_data(b"220 ready\r\n");
        // C0 controls make the line ambiguous (it is refused); C1 ones (UTF-8 U+009B, CSI) are
        // forwarded, but not shown.
        s.handle_client_data("USER a\u{9b}2Jb\u{9d}52;c;x\r\n".as_bytes());
        drain(&mut s);
        assert_eq!(s.user(), Some("a2Jb52;c;x"));
    }

    #[test]
    fn rewrites_and_refusals_are_reported_as_events() {
        let mut s = greeted(Mode::Gateway);
        assert_eq!(s.user(), Some("anonymous"));
        assert!(s.logged_in());
        s.handle_client_data(b"PORT 10,9,9,9,156,64\r\nEPRT |1|198.18.0.2|40000|\r\n");
        drain(&mut s);
        s.handle_opened(opened(1, 61000));
        drain(&mut s);
        s.handle_client_data(b"PASV\r\n");
        drain(&mut s);
        s.handle_server_data(b"200 ok\r\n227 Entering Passive Mode (203,0,113,2,156,65)\r\n");
        drain(&mut s);
        s.handle_opened(opened(2, 61001));
        drain(&mut s);
        s.handle_client_data(b"RETR f\r\n");
        drain(&mut s);
        assert_eq!(s.pinhole_ids().collect::<Vec<_>>(), vec![2]);
        let events: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
        assert_eq!(
            events,
            vec![
                Event::Refused(Reject::ThirdPartyAddress),
                Event::Rewrote(Rewrite::Eprt),
                Event::Rewrote(Rewrite::Pasv),
            ]
        );
    }

    #[test]
    fn a_pinhole_installed_after_the_server_left_is_closed_not_announced() {
        let mut s = greeted(Mode::Gateway);
        s.handle_client_data(b"PORT 198,18,0,2,156,64\r\n");
        assert!(matches!(&drain(&mut s)[..], [Action::Open(_)]));
        s.handle_eof(Side::Server);
        s.handle_opened(opened(1, 61000));
        assert_eq!(
            drain(&mut s),
            vec![Action::Close(vec![1]), Action::Shutdown]
        );
    }

    #[test]
    fn a_port_the_server_refuses_loses_its_pinhole() {
        let mut s = greeted(Mode::Gateway);
        s.handle_client_data(b"PORT 198,18,0,2,156,64\r\n");
        drain(&mut s);
        s.handle_opened(opened(1, 61000));
        drain(&mut s);
        s.handle_server_data(b"530 Please login with USER and PASS.\r\n");
        assert_eq!(
            drain(&mut s),
            vec![
                Action::Close(vec![1]),
                Action::ToClient(b"530 Please login with USER and PASS.\r\n".to_vec()),
            ]
        );
    }

    #[test]
    fn failed_pinhole_answers_425_and_never_forwards_the_announcement() {
        let mut s = greeted(Mode::Gateway);
        s.handle_client_data(b"EPRT |1|198.18.0.2|40000|\r\n");
        assert!(matches!(drain(&mut s)[..], [Action::Open(_)]));
        s.handle_opened(None);
        assert_eq!(
            drain(&mut s),
            vec![Action::ToClient(
                b"425 Can't open data connection (firewall).\r\n".to_vec()
            )]
        );
    }

    #[test]
    fn gateway_eprt_is_answered_with_eprt() {
        let mut s = greeted(Mode::Gateway);
        s.handle_client_data(b"EPRT |1|198.18.0.2|40000|\r\n");
        drain(&mut s);
        s.handle_opened(opened(1, 61001));
        assert_eq!(
            drain(&mut s),
            vec![Action::ToServer(b"EPRT |1|203.0.113.1|61001|\r\n".to_vec())]
        );
    }

    #[test]
    fn gateway_227_keeps_the_server_port_and_replaces_a_foreign_address() {
        let mut s = asked(Mode::Gateway, "PASV");
        s.handle_server_data(b"227 Entering Passive Mode (10,0,0,5,156,65).\r\n");
        let actions = drain(&mut s);
        assert_eq!(
            actions,
            vec![Action::Open(PinholeRequest {
                source: ip("198.18.0.2"),
                dial_ip: ip("203.0.113.2"),
                dial_port: Some(40001),
                dnat: None,
                snat: Some(ip("203.0.113.1")),
                label: Label {
                    session: 7,
                    client: ip("198.18.0.2"),
                    server: ip("203.0.113.2"),
                },
            })]
        );
        s.handle_opened(opened(2, 40001));
        assert_eq!(
            drain(&mut s),
            vec![Action::ToClient(
                b"227 Entering Passive Mode (203,0,113,2,156,65).\r\n".to_vec()
            )]
        );
    }

    #[test]
    fn reverse_227_announces_the_dialled_address_and_a_pool_port() {
        let mut s = asked(Mode::Reverse, "PASV");
        s.handle_server_data(b"227 Entering Passive Mode (203,0,113,2,156,65)\r\n");
        match &drain(&mut s)[..] {
            [Action::Open(r)] => {
                assert_eq!(r.dial_ip, ip("198.18.0.1"));
                assert_eq!(r.dial_port, None);
                assert_eq!(r.dnat, Some("203.0.113.2:40001".parse().unwrap()));
                assert_eq!(r.snat, Some(ip("203.0.113.1")));
            }
            other => panic!("{other:?}"),
        }
        s.handle_opened(opened(3, 61002));
        assert_eq!(
            drain(&mut s),
            vec![Action::ToClient(
                b"227 Entering Passive Mode (198,18,0,1,238,74)\r\n".to_vec()
            )]
        );
    }

    #[test]
    fn reverse_229_rewrites_only_the_port() {
        let mut s = asked(Mode::Reverse, "EPSV");
        s.handle_server_data(b"229 Entering Extended Passive Mode (|||40001|)\r\n");
        drain(&mut s);
        s.handle_opened(opened(3, 61002));
        assert_eq!(
            drain(&mut s),
            vec![Action::ToClient(
                b"229 Entering Extended Passive Mode (|||61002|)\r\n".to_vec()
            )]
        );
    }

    /// Formats real servers rarely send, each rewritten in place with its text kept: no
    /// parentheses (RFC 1123 §4.1.2.6 tells clients to scan for the numbers), trailing text,
    /// and a 229 delimiter other than '|' (RFC 2428 §3 allows any of ASCII 33-126).
    #[test]
    fn unusual_passive_formats_are_rewritten_in_place() {
        for (reply, rewritten) in [
            (
                &b"227 Entering Passive Mode 203,0,113,2,156,65\r\n"[..],
                &b"227 Entering Passive Mode 198,18,0,1,238,72\r\n"[..],
            ),
            (
                b"227 =203,0,113,2,156,65 ok, go ahead\r\n",
                b"227 =198,18,0,1,238,72 ok, go ahead\r\n",
            ),
            (
                b"229 Entering Extended Passive Mode (!!!40001!)\r\n",
                b"229 Entering Extended Passive Mode (!!!61000!)\r\n",
            ),
        ] {
            let verb = if reply.starts_with(b"227") {
                "PASV"
            } else {
                "EPSV"
            };
            let mut s = asked(Mode::Reverse, verb);
            s.handle_server_data(reply);
            assert!(matches!(&drain(&mut s)[..], [Action::Open(_)]));
            s.handle_opened(opened(1, 61000));
            assert_eq!(drain(&mut s), vec![Action::ToClient(rewritten.to_vec())]);
        }
    }

    #[test]
    fn reverse_port_snats_to_the_address_the_client_dialled() {
        let mut s = greeted(Mode::Reverse);
        s.handle_client_data(b"PORT 198,18,0,2,156,64\r\n");
        match &drain(&mut s)[..] {
            [Action::Open(r)] => {
                assert_eq!(r.source, ip("203.0.113.2"));
                assert_eq!(r.dial_ip, ip("203.0.113.1"));
                assert_eq!(r.snat, Some(ip("198.18.0.1")));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bounce_and_privileged_ports_are_refused_without_a_pinhole() {
        for line in [
            &b"PORT 203,0,113,9,156,64\r\n"[..],
            b"PORT 198,18,0,2,0,22\r\n",
            b"EPRT |1|203.0.113.9|40000|\r\n",
            b"PORT 198,18,0,2,256,1\r\n",
            b"AUTH TLS\r\n",
        ] {
            let mut s = greeted(Mode::Gateway);
            s.handle_client_data(line);
            let actions = drain(&mut s);
            assert!(
                matches!(&actions[..], [Action::ToClient(r)] if r[0] == b'5'),
                "{:?} -> {actions:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn privileged_passive_port_is_replaced_by_425() {
        let mut s = asked(Mode::Gateway, "PASV");
        s.handle_server_data(b"227 Entering Passive Mode (203,0,113,2,0,25)\r\n");
        assert!(matches!(&drain(&mut s)[..], [Action::ToClient(r)] if r.starts_with(b"425")));
    }

    #[test]
    fn new_announcement_closes_the_previous_pinhole() {
        let mut s = asked(Mode::Gateway, "EPSV");
        s.handle_server_data(b"229 Entering Extended Passive Mode (|||40001|)\r\n");
        drain(&mut s);
        s.handle_opened(opened(1, 40001));
        drain(&mut s);
        s.handle_client_data(b"EPSV\r\n");
        drain(&mut s);
        s.handle_server_data(b"229 Entering Extended Passive Mode (|||40002|)\r\n");
        assert!(matches!(&drain(&mut s)[..], [Action::Close(ids), Action::Open(_)] if ids == &[1]));
    }

    #[test]
    fn eof_flushes_partial_lines_and_closes_pinholes() {
        let mut s = asked(Mode::Gateway, "EPSV");
        s.handle_server_data(b"229 Entering Extended Passive Mode (|||40001|)\r\n");
        drain(&mut s);
        s.handle_opened(opened(1, 40001));
        drain(&mut s);
        s.handle_server_data(b"221 Bye");
        s.handle_eof(Side::Server);
        assert_eq!(
            drain(&mut s),
            vec![
                Action::ToClient(b"221 Bye\r\n".to_vec()),
                Action::Close(vec![1]),
                Action::Shutdown
            ]
        );
    }

    /// A reply that echoes the longest command a client may send is still a reply; only a
    /// line past that margin ends the session.
    #[test]
    fn a_reply_echoing_the_longest_command_is_not_too_long() {
        let mut s = greeted(Mode::Gateway);
        let path = "p".repeat(510);
        s.handle_client_data(format!("CWD {path}\r\n").as_bytes());
        drain(&mut s);
        let echo = format!("550 {path}: No such file or directory\r\n");
        assert!(echo.len() > 512);
        s.handle_server_data(echo.as_bytes());
        assert_eq!(drain(&mut s), vec![Action::ToClient(echo.into_bytes())]);
        s.handle_server_data(format!("200 {}\r\n", "x".repeat(512 + REPLY_ECHO_MARGIN)).as_bytes());
        assert_eq!(
            drain(&mut s)[0],
            Action::ToClient(Reject::LineTooLong.passive_reply().to_vec())
        );
    }

    /// The last replies often arrive in the read that ends the stream: they are forwarded as
    /// the lines they are, not as one blob.
    #[test]
    fn replies_read_with_the_end_of_the_stream_stay_separate_lines() {
        let mut s = greeted(Mode::Gateway);
        s.handle_client_data(b"RETR f\r\nQUIT\r\n");
        drain(&mut s);
        s.handle_server_data(b"150 ok\r\n226 Transfer complete.\r\n221 Goodbye.\r\n");
        s.handle_eof(Side::Server);
        assert_eq!(
            drain(&mut s),
            vec![
                Action::ToClient(b"150 ok\r\n".to_vec()),
                Action::ToClient(b"226 Transfer complete.\r\n".to_vec()),
                Action::ToClient(b"221 Goodbye.\r\n".to_vec()),
                Action::Shutdown
            ]
        );
    }

    #[test]
    fn client_eof_drops_its_unchecked_partial_line_and_waits_for_the_server() {
        let mut s = greeted(Mode::Gateway);
        s.handle_client_data(b"QUIT\r\nPORT 203,0,113,9,0,22");
        s.handle_eof(Side::Client);
        assert_eq!(
            drain(&mut s),
            vec![Action::ToServer(b"QUIT\r\n".to_vec()), Action::EndToServer]
        );
        s.handle_server_data(b"221 Goodbye.\r\n");
        s.handle_eof(Side::Server);
        assert_eq!(
            drain(&mut s),
            vec![
                Action::ToClient(b"221 Goodbye.\r\n".to_vec()),
                Action::Shutdown
            ]
        );
    }

    #[test]
    fn unparsable_passive_reply_is_replaced_by_425() {
        let mut s = asked(Mode::Reverse, "PASV");
        s.handle_server_data(b"227 Entering Passive Mode (10,0,0,5,300,1)\r\n");
        assert!(matches!(&drain(&mut s)[..], [Action::ToClient(r)] if r.starts_with(b"425")));
    }

    #[test]
    fn abor_goes_to_the_server_after_a_synch_whatever_the_client_sent() {
        let mut s = greeted(Mode::Gateway);
        s.handle_client_data(b"\xff\xf4\xff\xf2ABOR\r\nabor\r\n");
        assert_eq!(
            drain(&mut s),
            vec![
                Action::ToServerSynch(b"ABOR\r\n".to_vec()),
                Action::ToServerSynch(b"abor\r\n".to_vec()),
            ]
        );
    }

    #[test]
    fn a_refusal_waits_for_the_replies_to_earlier_pipelined_commands() {
        let mut s = greeted(Mode::Gateway);
        s.handle_client_data(b"CWD /pub\r\nPORT 203,0,113,9,156,64\r\nNOOP\r\n");
        assert_eq!(
            drain(&mut s),
            vec![Action::ToServer(b"CWD /pub\r\n".to_vec())]
        );
        s.handle_server_data(b"250-Directory\r\n250 changed.\r\n");
        assert_eq!(
            drain(&mut s),
            vec![
                Action::ToClient(b"250-Directory\r\n".to_vec()),
                Action::ToClient(b"250 changed.\r\n".to_vec()),
                Action::ToClient(Reject::ThirdPartyAddress.client_reply().to_vec()),
                Action::ToServer(b"NOOP\r\n".to_vec()),
            ]
        );
    }

    #[test]
    fn announcements_before_login_are_refused_by_default() {
        let mut s = Session::new(ctx(Mode::Gateway));
        s.handle_server_data(b"220 ready\r\n");
        s.handle_client_data(b"PORT 198,18,0,2,156,64\r\n");
        assert_eq!(
            drain(&mut s),
            vec![
                Action::ToClient(b"220 ready\r\n".to_vec()),
                Action::ToClient(b"530 Please log in first.\r\n".to_vec()),
            ]
        );
        s.handle_client_data(b"PASV\r\n");
        drain(&mut s);
        s.handle_server_data(b"227 Entering Passive Mode (203,0,113,2,156,65)\r\n");
        assert!(matches!(&drain(&mut s)[..], [Action::ToClient(r)] if r.starts_with(b"425")));
    }

    #[test]
    fn an_announcement_pipelined_after_the_login_waits_for_its_verdict() {
        let mut s = Session::new(ctx(Mode::Gateway));
        s.handle_server_data(b"220 ready\r\n");
        s.handle_client_data(b"USER a\r\nPASS b\r\nPORT 198,18,0,2,156,64\r\n");
        let actions = drain(&mut s);
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Open(_))),
            "{actions:?}"
        );
        s.handle_server_data(b"331 Password please.\r\n230 Logged in.\r\n");
        assert!(matches!(drain(&mut s).last(), Some(Action::Open(_))));
    }

    fn with_policy(policy: PolicyConfig) -> Session {
        let mut s = greeted(Mode::Gateway);
        s.ctx.policy = Arc::new(policy);
        s
    }

    #[test]
    fn a_foreign_port_can_be_replaced_by_the_clients_address() {
        let mut s = with_policy(PolicyConfig {
            foreign_port: ForeignPort::Replace,
            ..PolicyConfig::default()
        });
        s.handle_client_data(b"PORT 10,0,0,7,156,64\r\n");
        match &drain(&mut s)[..] {
            [Action::Open(r)] => assert_eq!(r.dnat, Some("198.18.0.2:40000".parse().unwrap())),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn transparent_auth_passes_tls_unread_and_opens_nothing() {
        let mut s = with_policy(PolicyConfig {
            auth: AuthPolicy::Transparent,
            ..PolicyConfig::default()
        });
        s.handle_client_data(b"AUTH TLS\r\n");
        assert_eq!(
            drain(&mut s),
            vec![Action::ToServer(b"AUTH TLS\r\n".to_vec())]
        );
        s.handle_server_data(b"234 Proceed with negotiation.\r\n\x16\x03\x01PORT 1,2,3,4,5,6\r\n");
        assert_eq!(
            drain(&mut s),
            vec![
                Action::ToClient(b"234 Proceed with negotiation.\r\n".to_vec()),
                Action::ToClient(b"\x16\x03\x01PORT 1,2,3,4,5,6\r\n".to_vec()),
            ]
        );
        s.handle_client_data(b"\x16\x03\x01 227 (1,2,3,4,5,6)\r\n");
        assert_eq!(
            drain(&mut s),
            vec![Action::ToServer(
                b"\x16\x03\x01 227 (1,2,3,4,5,6)\r\n".to_vec()
            )]
        );
        s.handle_eof(Side::Client);
        assert_eq!(drain(&mut s), vec![Action::EndToServer]);
    }

    /// A gateway session with `policy.tls_window` whose server has just accepted AUTH TLS, its
    /// first TLS bytes in the same read: nothing reaches the client but the window request.
    fn windowed() -> Session {
        let mut s = with_policy(PolicyConfig {
            auth: AuthPolicy::Transparent,
            tls_window: true,
            ..PolicyConfig::default()
        });
        s.handle_client_data(b"AUTH TLS\r\n");
        drain(&mut s);
        s.handle_server_data(b"234 Proceed with negotiation.\r\n\x16\x03\x01hello");
        assert_eq!(
            drain(&mut s),
            vec![Action::OpenWindow(WindowRequest {
                label: Label {
                    session: 7,
                    client: ip("198.18.0.2"),
                    server: ip("203.0.113.2"),
                },
                snat: ip("203.0.113.1"),
                max_per_client: 2,
            })]
        );
        s
    }

    #[test]
    fn a_tls_window_opens_before_the_234_and_closes_with_the_session() {
        let mut s = windowed();
        s.handle_server_data(b"\x16\x03\x01later");
        s.handle_client_data(b"\x16\x03\x01early");
        assert_eq!(drain(&mut s), vec![], "TLS bytes wait behind the held 234");
        s.handle_opened(opened(9, 1024));
        assert_eq!(
            drain(&mut s),
            vec![
                to_client("234 Proceed with negotiation.\r\n"),
                Action::ToClient(b"\x16\x03\x01hello".to_vec()),
                Action::ToClient(b"\x16\x03\x01later".to_vec()),
                Action::ToServer(b"\x16\x03\x01early".to_vec()),
            ]
        );
        assert_eq!(s.tls_state(), TlsState::Transparent);
        assert_eq!(s.pinhole_ids().collect::<Vec<_>>(), vec![9]);
        s.handle_server_data(b"\x17\x03\x03 227 (203,0,113,2,200,1)\r\n");
        s.handle_client_data(b"\x17\x03\x03 PORT 1,2,3,4,5,6\r\n");
        assert_eq!(
            drain(&mut s),
            vec![
                Action::ToClient(b"\x17\x03\x03 227 (203,0,113,2,200,1)\r\n".to_vec()),
                Action::ToServer(b"\x17\x03\x03 PORT 1,2,3,4,5,6\r\n".to_vec()),
            ],
            "TLS passes unread: no pinhole for what looks like an announcement"
        );
        s.handle_eof(Side::Client);
        assert_eq!(drain(&mut s), vec![Action::EndToServer]);
        s.handle_eof(Side::Server);
        assert_eq!(
            drain(&mut s),
            vec![Action::Close(vec![9]), Action::Shutdown]
        );
    }

    #[test]
    fn a_refused_tls_window_ends_the_session_with_421_instead_of_the_234() {
        let mut s = windowed();
        s.handle_opened(None);
        assert_eq!(
            drain(&mut s),
            vec![
                Action::ToClient(Reject::WindowRefused.client_reply().to_vec()),
                Action::Shutdown,
            ]
        );
        assert_eq!(s.poll_event(), Some(Event::Refused(Reject::WindowRefused)));
        s.handle_server_data(b"more TLS");
        s.handle_client_data(b"more TLS");
        s.handle_eof(Side::Server);
        assert_eq!(drain(&mut s), vec![], "nothing follows the shutdown");
    }

    /// A reverse session with `[tls]`, greeted by the server, nothing else yet.
    fn terminating(policy: PolicyConfig) -> Session {
        terminating_to(policy, false)
    }

    /// [`terminating`], with a TLS upstream (`upstream`) or a plain one.
    fn terminating_to(policy: PolicyConfig, upstream: bool) -> Session {
        let mut s = Session::new(SessionContext {
            tls: Some(TlsContext {
                relay_port: 45000,
                implicit: false,
                upstream,
            }),
            policy: Arc::new(policy),
            ..ctx(Mode::Reverse)
        });
        s.handle_server_data(b"220 ready\r\n");
        drain(&mut s);
        s
    }

    fn to_client(reply: &str) -> Action {
        Action::ToClient(reply.as_bytes().to_vec())
    }

    #[test]
    fn auth_tls_is_answered_here_and_starts_tls_in_its_turn() {
        let mut s = terminating(PolicyConfig::default());
        s.handle_client_data(b"SYST\r\nAUTH TLS\r\n");
        // The 234 waits for the server's answer to SYST.
        assert_eq!(drain(&mut s), vec![Action::ToServer(b"SYST\r\n".to_vec())]);
        s.handle_server_data(b"215 UNIX Type: L8\r\n");
        assert_eq!(
            drain(&mut s),
            vec![
                to_client("215 UNIX Type: L8\r\n"),
                to_client("234 Proceed with TLS negotiation.\r\n"),
                Action::StartClientTls,
            ]
        );
        assert_eq!(s.tls_state(), TlsState::Control);
        s.handle_client_data(b"AUTH TLS\r\nPROT P\r\nPBSZ 0\r\nPROT S\r\nPROT P\r\nCCC\r\n");
        assert_eq!(
            drain(&mut s),
            vec![
                to_client("503 TLS is already in use.\r\n"),
                to_client("503 PBSZ first.\r\n"),
                to_client("200 PBSZ=0\r\n"),
                to_client("536 Only PROT C and PROT P are supported.\r\n"),
                to_client("200 Protection level set to Private.\r\n"),
                to_client("534 CCC refused: the control connection stays encrypted.\r\n"),
            ]
        );
        assert_eq!(s.tls_state(), TlsState::Private);
    }

    #[test]
    fn tls_commands_before_auth_and_other_mechanisms_are_refused() {
        let mut s = terminating(PolicyConfig::default());
        s.handle_client_data(b"PBSZ 0\r\nPROT P\r\nAUTH KERBEROS_V4\r\n");
        assert_eq!(
            drain(&mut s),
            vec![
                to_client("503 Secure the control connection with AUTH TLS first.\r\n"),
                to_client("503 Secure the control connection with AUTH TLS first.\r\n"),
                to_client("504 AUTH: only TLS is supported.\r\n"),
            ]
        );
        assert_eq!(s.tls_state(), TlsState::Plain);
    }

    #[test]
    fn bytes_pipelined_behind_auth_tls_end_the_session() {
        let mut s = terminating(PolicyConfig::default());
        s.handle_client_data(b"AUTH TLS\r\n\x16\x03\x01");
        let actions = drain(&mut s);
        assert_eq!(
            actions.first(),
            Some(&to_client(
                "421 Nothing may follow AUTH TLS before its reply; closing.\r\n"
            ))
        );
        assert_eq!(actions.last(), Some(&Action::Shutdown));
        assert!(!actions.contains(&Action::StartClientTls));
    }

    #[test]
    fn require_tls_refuses_a_login_in_clear() {
        let mut s = terminating(PolicyConfig {
            require_tls: true,
            ..PolicyConfig::default()
        });
        s.handle_client_data(b"USER anonymous\r\nPASS secret\r\n");
        let refused = to_client("530 TLS required: send AUTH TLS before logging in.\r\n");
        assert_eq!(drain(&mut s), vec![refused.clone(), refused]);
        assert_eq!(
            std::iter::from_fn(|| s.poll_event()).collect::<Vec<_>>(),
            vec![Event::Refused(Reject::TlsRequired); 2]
        );
    }

    /// A login accepted, then `commands`, then a PASV answered by the server: the pinhole the
    /// session asks for.
    fn pasv_after_login(s: &mut Session, commands: &[u8]) -> PinholeRequest {
        s.handle_client_data(b"USER anonymous\r\n");
        drain(s);
        s.handle_server_data(b"230 ok\r\n");
        s.handle_client_data(&[commands, b"PASV\r\n"].concat());
        drain(s);
        s.handle_server_data(b"227 Entering Passive Mode (203,0,113,2,156,64).\r\n");
        match s.poll_action() {
            Some(Action::Open(request)) => request,
            other => panic!("no pinhole asked for: {other:?}"),
        }
    }

    /// Under PROT P a pinhole leads to the relay, and the relay learns both legs before the
    /// announcement goes out; under PROT C the kernel's pinhole is unchanged.
    #[test]
    fn prot_p_pinholes_lead_to_the_relay() {
        let mut s = terminating(PolicyConfig::default());
        s.handle_client_data(b"AUTH TLS\r\n");
        drain(&mut s);
        let request = pasv_after_login(&mut s, b"PBSZ 0\r\nPROT P\r\n");
        assert_eq!(request.source, ip("198.18.0.2"));
        assert_eq!(request.dnat, Some("198.18.0.1:45000".parse().unwrap()));
        assert_eq!(request.snat, None);
        s.handle_opened(opened(3, 61000));
        assert_eq!(
            drain(&mut s),
            vec![
                Action::Expect(Expectation {
                    pinhole: 3,
                    port: 61000,
                    leg: RelayLeg {
                        peer: ip("198.18.0.2"),
                        passive: true,
                        dial: "203.0.113.2:40000".parse().unwrap(),
                        bind: ip("203.0.113.1"),
                        client_tls: true,
                        server_tls: false,
                    },
                }),
                to_client("227 Entering Passive Mode (198,18,0,1,238,72).\r\n"),
            ]
        );
        s.handle_client_data(b"PROT C\r\nPORT 198,18,0,2,195,81\r\n");
        let actions = drain(&mut s);
        assert_eq!(
            actions[..2],
            [
                to_client("200 Protection level set to Clear.\r\n"),
                Action::Close(vec![3])
            ]
        );
        let [Action::Open(request)] = &actions[2..] else {
            panic!("no pinhole asked for: {actions:?}");
        };
        assert_eq!(request.dnat, Some("198.18.0.2:50001".parse().unwrap()));
        assert_eq!(request.snat, Some(ip("198.18.0.1")));
        s.handle_opened(opened(4, 61001));
        assert!(!drain(&mut s).iter().any(|a| matches!(a, Action::Expect(_))));
    }

    /// With a TLS upstream every data connection is relayed (TLS towards the server), whether
    /// the client chose `PROT P`, `PROT C`, or no TLS at all; and REIN, which would reset the
    /// server's TLS state behind ftp-alg's back, never reaches it.
    #[test]
    fn a_tls_upstream_relays_every_data_connection() {
        let expected = |passive: bool, client_tls: bool, pinhole: PinholeId| {
            let (peer, dial, bind) = match passive {
                true => ("198.18.0.2", "203.0.113.2:40000", "203.0.113.1"),
                false => ("203.0.113.2", "198.18.0.2:50001", "198.18.0.1"),
            };
            Action::Expect(Expectation {
                pinhole,
                port: 61000 + pinhole as u16,
                leg: RelayLeg {
                    peer: ip(peer),
                    passive,
                    dial: dial.parse().unwrap(),
                    bind: ip(bind),
                    client_tls,
                    server_tls: true,
                },
            })
        };
        for (auth, protection, client_tls) in [
            (true, &b"PBSZ 0\r\nPROT P\r\n"[..], true),
            (true, b"PBSZ 0\r\nPROT C\r\n", false),
            (false, b"", false),
        ] {
            let mut s = terminating_to(PolicyConfig::default(), true);
            if auth {
                s.handle_client_data(b"AUTH TLS\r\n");
                drain(&mut s);
            }
            let request = pasv_after_login(&mut s, protection);
            assert_eq!(request.dnat, Some("198.18.0.1:45000".parse().unwrap()));
            assert_eq!(request.snat, None);
            s.handle_opened(opened(0, 61000));
            assert_eq!(drain(&mut s)[0], expected(true, client_tls, 0));
            s.handle_client_data(b"PORT 198,18,0,2,195,81\r\n");
            let actions = drain(&mut s);
            let Some(Action::Open(request)) = actions.last() else {
                panic!("no pinhole asked for: {actions:?}");
            };
            assert_eq!(request.dnat, Some("203.0.113.1:45000".parse().unwrap()));
            s.handle_opened(opened(1, 61001));
            assert_eq!(drain(&mut s)[0], expected(false, client_tls, 1));
            s.handle_server_data(b"200 PORT ok\r\n");
            drain(&mut s);
            s.handle_client_data(b"REIN\r\n");
            assert_eq!(
                drain(&mut s),
                vec![to_client("502 REIN is not available on a TLS session.\r\n")]
            );
        }
    }

    #[test]
    fn read_only_and_denied_commands_are_refused_in_their_turn() {
        let mut s = with_policy(PolicyConfig {
            read_only: true,
            deny_commands: vec!["site".into(), "Help".into()],
            ..PolicyConfig::default()
        });
        s.handle_client_data(b"stor x\r\nHELP\r\nRETR y\r\n");
        let denied = Action::ToClient(Reject::CommandDenied.client_reply().to_vec());
        assert_eq!(
            drain(&mut s),
            vec![
                denied.clone(),
                denied,
                Action::ToServer(b"RETR y\r\n".to_vec())
            ]
        );
    }

    #[test]
    fn a_foreign_227_can_be_refused() {
        let mut s = with_policy(PolicyConfig {
            foreign_pasv: ForeignPasv::Refuse,
            ..PolicyConfig::default()
        });
        s.handle_client_data(b"PASV\r\n");
        drain(&mut s);
        s.handle_server_data(b"227 Entering Passive Mode (10,0,0,5,156,65)\r\n");
        assert!(matches!(&drain(&mut s)[..], [Action::ToClient(r)] if r.starts_with(b"425")));
        s.handle_client_data(b"PASV\r\n");
        drain(&mut s);
        s.handle_server_data(b"227 Entering Passive Mode (203,0,113,2,156,65)\r\n");
        assert!(matches!(&drain(&mut s)[..], [Action::Open(_)]));
    }

    #[test]
    fn pipelined_announcements_are_capped_per_session() {
        let mut s = greeted(Mode::Gateway);
        s.handle_client_data(&b"PORT 198,18,0,2,156,64\r\nRETR f\r\n".repeat(10));
        let mut opens = 0;
        while let Some(action) = s.poll_action() {
            if let Action::Open(_) = action {
                opens += 1;
                s.handle_opened(opened(opens, 61000));
            }
        }
        // The ninth PORT's 425 waits for its turn among the replies the server owes.
        assert_eq!(opens, 8, "at most 8 pinholes held at once");
    }

    #[test]
    fn rein_ends_the_login() {
        let mut s = greeted(Mode::Gateway);
        s.handle_client_data(b"REIN\r\n");
        drain(&mut s);
        s.handle_server_data(b"220 ready for new user\r\n");
        drain(&mut s);
        s.handle_client_data(b"PORT 198,18,0,2,156,64\r\n");
        assert_eq!(
            drain(&mut s),
            vec![Action::ToClient(b"530 Please log in first.\r\n".to_vec())]
        );
    }

    #[test]
    fn data_before_login_can_be_allowed() {
        let mut s = Session::new(SessionContext {
            policy: Arc::new(PolicyConfig {
                data_before_login: true,
                ..PolicyConfig::default()
            }),
            ..ctx(Mode::Gateway)
        });
        s.handle_server_data(b"220 ready\r\n");
        s.handle_client_data(b"PORT 198,18,0,2,156,64\r\n");
        assert!(matches!(drain(&mut s).last(), Some(Action::Open(_))));
    }

    #[test]
    fn a_running_transfer_is_not_idleness() {
        let mut s = greeted(Mode::Gateway);
        assert!(!s.transfer_in_progress());
        s.handle_client_data(b"RETR big\r\n");
        drain(&mut s);
        assert!(
            !s.transfer_in_progress(),
            "not before the server has started it"
        );
        s.handle_server_data(b"150 here it comes\r\n");
        drain(&mut s);
        assert!(s.transfer_in_progress());
        s.handle_server_data(b"226 done\r\n");
        drain(&mut s);
        assert!(!s.transfer_in_progress());
    }

    /// proftpd drops a command longer than its buffer without a word. Every later reply then
    /// settles the command before its own, but no unanswered transfer may keep the session
    /// from its idle timeout (or hold its ports) for ever.
    #[test]
    fn a_transfer_the_server_never_answered_does_not_block_the_idle_timeout() {
        let mut s = greeted(Mode::Gateway);
        s.handle_client_data(b"RETR dropped-by-the-server\r\nNOOP\r\n");
        drain(&mut s);
        s.handle_server_data(b"200 NOOP ok\r\n");
        drain(&mut s);
        assert!(!s.transfer_in_progress());
    }

    #[test]
    fn overlong_client_line_is_answered_and_the_session_goes_on() {
        let mut s = greeted(Mode::Gateway);
        let mut long = vec![b'A'; 600];
        long.extend_from_slice(b"\r\nNOOP\r\n");
        s.handle_client_data(&long);
        assert_eq!(
            drain(&mut s),
            vec![
                Action::ToClient(b"500 Line too long.\r\n".to_vec()),
                Action::ToServer(b"NOOP\r\n".to_vec()),
            ]
        );
    }

    mod properties {
        use super::*;
        use crate::proptest_reach;
        use proptest::prelude::*;

        /// A data port, mostly a valid one, sometimes a privileged one.
        fn port() -> impl Strategy<Value = u16> {
            prop_oneof![3 => 1024u16.., 1 => any::<u16>()]
        }

        /// An IPv4 host as the session sees it: its client, its server, this host, or another.
        fn host() -> impl Strategy<Value = [u8; 4]> {
            prop_oneof![
                3 => Just([198, 18, 0, 2]),
                1 => Just([203, 0, 113, 2]),
                1 => Just([198, 18, 0, 1]),
                1 => any::<[u8; 4]>(),
            ]
        }

        /// `h1,h2,h3,h4,p1,p2`, as PORT and 227 carry it.
        fn host_port() -> impl Strategy<Value = String> {
            (host(), port())
                .prop_map(|([a, b, c, d], p)| format!("{a},{b},{c},{d},{},{}", p >> 8, p & 0xff))
        }

        /// A PORT or EPRT naming the client itself or another host.
        fn active_command() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                2 => host_port().prop_map(|hp| format!("PORT {hp}\r\n").into_bytes()),
                2 => (host(), port()).prop_map(|([a, b, c, d], p)| {
                    format!("EPRT |1|{a}.{b}.{c}.{d}|{p}|\r\n").into_bytes()
                }),
                1 => port().prop_map(|p| format!("EPRT |2|2001:db8::2|{p}|\r\n").into_bytes()),
            ]
        }

        /// A line (or two) from the client: announcements, the commands that use or void
        /// them, a login, and raw bytes.
        fn client_chunk() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                5 => active_command(),
                4 => Just(b"PASV\r\n".to_vec()),
                3 => Just(b"EPSV\r\n".to_vec()),
                2 => one_of(&[
                    b"RETR f\r\n",
                    b"STOR f\r\n",
                    b"LIST\r\n",
                    b"ABOR\r\n",
                    b"REIN\r\n",
                    b"AUTH TLS\r\n",
                    b"USER u\r\nPASS p\r\n",
                    b"EPSV ALL\r\n",
                ]),
                1 => proptest::collection::vec(any::<u8>(), 0..64),
            ]
        }

        /// One of `lines`, as bytes.
        fn one_of(lines: &[&'static [u8]]) -> impl Strategy<Value = Vec<u8>> {
            prop::sample::select(lines.to_vec()).prop_map(<[u8]>::to_vec)
        }

        /// A reply (or a few) from the server: passive announcements naming the server or
        /// another host, the replies that settle transfers and logins, and raw bytes.
        fn server_chunk() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                4 => host_port()
                    .prop_map(|hp| format!("227 Entering Passive Mode ({hp}).\r\n").into_bytes()),
                3 => port().prop_map(|p| {
                    format!("229 Entering Extended Passive Mode (|||{p}|)\r\n").into_bytes()
                }),
                3 => one_of(&[
                    b"200 PORT command successful.\r\n",
                    b"150 Here comes the data.\r\n",
                    b"226 Transfer complete.\r\n",
                    b"425 Cannot open data connection.\r\n",
                    b"230 Login successful.\r\n",
                    b"530 Login incorrect.\r\n",
                    b"220 REIN done.\r\n",
                    b"234 Proceed with negotiation.\r\n",
                    b"211-Features:\r\n 227 (203,0,113,9,156,64)\r\n211 End\r\n",
                    b"421 Timeout.\r\n",
                ]),
                1 => proptest::collection::vec(any::<u8>(), 0..64),
            ]
        }

        /// A command and the reply a server would give it: a 227 to PASV, a 229 to EPSV, 200
        /// to PORT or EPRT, 150 and 226 to a transfer; now and then a command and any reply.
        fn exchange() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
            let passive =
                |command: &'static [u8], reply: String| (command.to_vec(), reply.into_bytes());
            prop_oneof![
                3 => host_port().prop_map(move |hp| {
                    passive(b"PASV\r\n", format!("227 Entering Passive Mode ({hp}).\r\n"))
                }),
                2 => port().prop_map(move |p| {
                    passive(b"EPSV\r\n", format!("229 Entering Extended Passive Mode (|||{p}|)\r\n"))
                }),
                2 => active_command().prop_map(|c| (c, b"200 PORT command successful.\r\n".to_vec())),
                2 => one_of(&[b"RETR f\r\n", b"STOR f\r\n", b"LIST\r\n"])
                    .prop_map(|c| (c, b"150 Here comes the data.\r\n226 Transfer complete.\r\n".to_vec())),
                1 => (client_chunk(), server_chunk()),
            ]
        }

        /// A session's traffic: chunks from either peer, each with whether the pinhole it may
        /// ask for installs. Mostly a command followed by its reply: each reply answers the
        /// oldest command not yet answered, so a lone command or reply shifts every later
        /// reply onto another command (a 227 then answers no PASV, and opens nothing).
        fn steps() -> impl Strategy<Value = Vec<(bool, Vec<u8>, bool)>> {
            let step = prop_oneof![
                1 => (client_chunk(), any::<bool>()).prop_map(|(c, ok)| vec![(true, c, ok)]),
                1 => (server_chunk(), any::<bool>()).prop_map(|(r, ok)| vec![(false, r, ok)]),
                8 => (exchange(), prop::bool::weighted(0.8))
                    .prop_map(|((c, r), ok)| vec![(true, c, ok), (false, r, ok)]),
            ];
            proptest::collection::vec(step, 0..16).prop_map(|s| s.concat())
        }

        /// Both ways of treating a foreign address: replacing it is where a pinhole could
        /// most easily be led astray.
        fn policy() -> impl Strategy<Value = PolicyConfig> {
            (any::<bool>(), any::<bool>()).prop_map(|(replace_port, refuse_pasv)| PolicyConfig {
                foreign_port: if replace_port {
                    ForeignPort::Replace
                } else {
                    ForeignPort::Refuse
                },
                foreign_pasv: if refuse_pasv {
                    ForeignPasv::Refuse
                } else {
                    ForeignPasv::Replace
                },
                ..PolicyConfig::default()
            })
        }

        /// Whatever either peer sends to a logged-in session, in either mode, the core does
        /// not panic; every pinhole it asks for joins the session's own client and server at
        /// a data port (never a third host, never a service port); nothing overtakes a pinhole
        /// being installed; it closes only pinholes it holds; and none outlives the session.
        /// The run fails, too, unless a fifth of the cases had both an active and a passive
        /// pinhole installed: the checks above must have had something to check.
        #[test]
        fn pinholes_only_ever_join_the_sessions_peers() {
            for mode in [Mode::Gateway, Mode::Reverse] {
                proptest_reach::check(
                    &format!("an installed active and passive pinhole ({mode:?} mode)"),
                    20,
                    (policy(), steps()),
                    |(policy, steps)| drive(mode, policy, steps),
                );
            }
        }

        /// Runs one case; says whether an active and a passive pinhole were installed.
        fn drive(
            mode: Mode,
            policy: PolicyConfig,
            steps: Vec<(bool, Vec<u8>, bool)>,
        ) -> Result<bool, TestCaseError> {
            let mut s = greeted(mode);
            s.ctx.policy = Arc::new(policy);
            let (client, server) = (s.ctx.client.ip(), s.ctx.server.ip());
            let mut open: Vec<PinholeId> = Vec::new();
            let (mut next_id, mut active, mut passive) = (0, false, false);
            let mut actions = |s: &mut Session, open_ok: bool| -> Result<(), TestCaseError> {
                while let Some(action) = s.poll_action() {
                    match action {
                        Action::Open(r) => {
                            let target = r.dnat.map_or(r.dial_ip, |d| d.ip());
                            let joins = (r.source, target);
                            prop_assert!(
                                joins == (client, server) || joins == (server, client),
                                "{r:?}"
                            );
                            prop_assert!(r.dial_port.is_none_or(|p| p >= MIN_DATA_PORT), "{r:?}");
                            prop_assert!(r.dnat.is_none_or(|d| d.port() >= MIN_DATA_PORT), "{r:?}");
                            prop_assert_eq!(s.poll_action(), None, "overtook {:?}", r);
                            if open_ok {
                                next_id += 1;
                                open.push(next_id);
                                active |= r.source == server;
                                passive |= r.source == client;
                            }
                            s.handle_opened(open_ok.then_some(Opened {
                                id: next_id,
                                dial_port: 61000,
                            }));
                        }
                        Action::Close(ids) => {
                            for id in ids {
                                let held = open.iter().position(|o| *o == id);
                                prop_assert!(held.is_some(), "closed {id}, not open: {open:?}");
                                open.retain(|o| *o != id);
                            }
                        }
                        _ => {}
                    }
                }
                Ok(())
            };
            for (from_client, data, open_ok) in steps {
                if from_client {
                    s.handle_client_data(&data);
                } else {
                    s.handle_server_data(&data);
                }
                actions(&mut s, open_ok)?;
            }
            s.handle_eof(Side::Client);
            s.handle_eof(Side::Server);
            actions(&mut s, false)?;
            prop_assert!(open.is_empty(), "outlived the session: {open:?}");
            Ok(active && passive)
        }
    }
}

/// Hostile input, table-driven: each case is sent to a logged-in session and must end in the
/// exact outcome given (a reply code and no pinhole, or exactly the pinhole expected).
#[cfg(test)]
mod hostile {
    use super::tests::{asked, drain, greeted, opened};
    use super::*;

    /// The first reply ftp-alg itself gives to `line` from the client, asserting that no pinhole
    /// is asked for.
    fn refusal(mode: Mode, line: &[u8]) -> Vec<u8> {
        let mut s = greeted(mode);
        s.handle_client_data(line);
        let actions = drain(&mut s);
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Open(_))),
            "{:?} asked for a pinhole: {actions:?}",
            String::from_utf8_lossy(line)
        );
        match actions.first() {
            Some(Action::ToClient(reply)) => reply.clone(),
            other => panic!(
                "{:?} was not refused: {other:?}",
                String::from_utf8_lossy(line)
            ),
        }
    }

    /// Asserts that ftp-alg answers `line` with exactly the three-digit `code` and no pinhole.
    fn assert_code(mode: Mode, line: &[u8], code: &[u8; 3]) {
        let reply = refusal(mode, line);
        assert!(
            reply.starts_with(code) && reply.get(3) == Some(&b' '),
            "{:?} answered {:?}",
            String::from_utf8_lossy(line),
            String::from_utf8_lossy(&reply)
        );
    }

    /// PORT and EPRT naming hosts other than the client (198.18.0.2): the server, the
    /// gateway, loopback, private, broadcast, multicast and cloud-metadata addresses, at ports
    /// an attacker would aim at (SSH, SMTP, SMB) and at an ordinary one.
    fn third_party_lines() -> Vec<Vec<u8>> {
        let hosts = [
            "203.0.113.9",
            "203.0.113.2",
            "198.18.0.1",
            "10.0.0.1",
            "127.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "169.254.169.254",
        ];
        let mut lines = Vec::new();
        for host in hosts {
            for port in [22u16, 25, 445, 40000] {
                let ip: std::net::Ipv4Addr = host.parse().unwrap();
                let [a, b, c, d] = ip.octets();
                let (p1, p2) = (port >> 8, port & 0xff);
                lines.push(format!("PORT {a},{b},{c},{d},{p1},{p2}\r\n").into_bytes());
                lines.push(format!("EPRT |1|{host}|{port}|\r\n").into_bytes());
            }
        }
        lines
    }

    #[test]
    fn ports_naming_a_third_party_are_refused_with_501() {
        let lines = third_party_lines();
        assert_eq!(lines.len(), 72);
        for line in lines {
            assert_code(Mode::Gateway, &line, b"501");
            assert_code(Mode::Reverse, &line, b"501");
        }
    }

    #[test]
    fn privileged_ports_are_refused_with_501() {
        for port in [0u16, 1, 20, 21, 22, 25, 53, 80, 443, 445, 1023] {
            let (p1, p2) = (port >> 8, port & 0xff);
            assert_code(
                Mode::Gateway,
                format!("PORT 198,18,0,2,{p1},{p2}\r\n").as_bytes(),
                b"501",
            );
            assert_code(
                Mode::Gateway,
                format!("EPRT |1|198.18.0.2|{port}|\r\n").as_bytes(),
                b"501",
            );
        }
    }

    #[test]
    fn malformed_announcements_are_refused_with_501() {
        let lines: &[&[u8]] = &[
            b"PORT 198,18,0,2,156,+64\r\n",
            b"PORT 198,18,0,2,156,-64\r\n",
            b"PORT -198,18,0,2,156,64\r\n",
            b"PORT 198,18,0,2,156,0x40\r\n",
            b"PORT 198,18,0,2,156,256\r\n",
            b"PORT 198,18,0,2,1e3,64\r\n",
            b"PORT 198,18,0,2,156\r\n",
            b"PORT 198,18,0,2,156,64,1\r\n",
            b"PORT 198,18,0,2,156,64,\r\n",
            b"PORT ,198,18,0,2,156,64\r\n",
            b"PORT 198,,18,0,2,156,64\r\n",
            b"PORT 198,18,0,2,156,0064\r\n",
            b"PORT 198,18,0,2,156,99999999999999999999\r\n",
            b"PORT 4294967298,18,0,2,156,64\r\n",
            b"PORT 198.18.0.2,156,64\r\n",
            b"PORT\r\n",
            b"PORT x\r\n",
            b"PORT 198,18,0,2,156,\xfe64\r\n",
            b"PORT \xc3\xa9,18,0,2,156,64\r\n",
            b"PORT 1\xd9\xa198,18,0,2,156,64\r\n",
            b"EPRT |1|198.18.0.2|65536|\r\n",
            b"EPRT |1|198.18.0.2|-1|\r\n",
            b"EPRT |1|198.18.0.2|+40000|\r\n",
            b"EPRT |1|198.18.0.2|4000000000|\r\n",
            b"EPRT |3|198.18.0.2|40000|\r\n",
            b"EPRT |0|198.18.0.2|40000|\r\n",
            b"EPRT |2|198.18.0.2|40000|\r\n",
            b"EPRT |1|2001:db8::2|40000|\r\n",
            b"EPRT ||198.18.0.2|40000|\r\n",
            b"EPRT |1|198.18.0.2|40000\r\n",
            b"EPRT |1|198.18.0.2||\r\n",
            b"EPRT |1||40000|\r\n",
            b"EPRT |1|198.18.0.256|40000|\r\n",
            b"EPRT |1|198.18.0|40000|\r\n",
            b"EPRT |1!198.18.0.2!40000!\r\n",
            b"EPRT  1 198.18.0.2 40000 \r\n",
            b"EPRT\r\n",
            b"EPRT |1|198.18.0.2%eth0|40000|\r\n",
        ];
        assert_eq!(lines.len(), 38);
        for line in lines {
            assert_code(Mode::Gateway, line, b"501");
        }
    }

    /// A 227 naming another host never leads anywhere but the session's own server; one
    /// naming a privileged or malformed endpoint gets the client a 425 and no pinhole.
    #[test]
    fn passive_replies_lead_only_to_the_sessions_server() {
        let internal = [
            "10,0,0,1",
            "127,0,0,1",
            "192,168,1,1",
            "203,0,113,9",
            "0,0,0,0",
            "169,254,169,254",
            "198,18,0,2",
            "255,255,255,255",
        ];
        for host in internal {
            let mut s = asked(Mode::Gateway, "PASV");
            s.handle_server_data(
                format!("227 Entering Passive Mode ({host},156,65)\r\n").as_bytes(),
            );
            match &drain(&mut s)[..] {
                [Action::Open(r)] => {
                    assert_eq!(r.dial_ip, s.ctx.server.ip(), "{host}: {r:?}");
                    assert_eq!(r.dial_port, Some(40001), "{host}");
                    assert_eq!(r.dnat, None, "{host}");
                    assert_eq!(r.source, s.ctx.client.ip(), "{host}");
                }
                other => panic!("{host}: {other:?}"),
            }
            s.handle_opened(opened(1, 40001));
            assert_eq!(
                drain(&mut s),
                vec![Action::ToClient(
                    b"227 Entering Passive Mode (203,0,113,2,156,65)\r\n".to_vec()
                )]
            );
        }
        let bad: &[&[u8]] = &[
            b"227 Entering Passive Mode (203,0,113,2,0,21)\r\n",
            b"227 Entering Passive Mode (203,0,113,2,0,0)\r\n",
            b"227 Entering Passive Mode (203,0,113,2,3,255)\r\n",
            b"227 Entering Passive Mode (203,0,113,2,256,1)\r\n",
            b"227 Entering Passive Mode (203,0,113,2,156)\r\n",
            b"227 Entering Passive Mode (203,0,113,2,156,-1)\r\n",
            b"227 Entering Passive Mode\r\n",
            b"227 Entering Passive Mode (a,b,c,d,e,f)\r\n",
            b"229 Entering Extended Passive Mode (|||22|)\r\n",
            b"229 Entering Extended Passive Mode (|||0|)\r\n",
            b"229 Entering Extended Passive Mode (|||70000|)\r\n",
            b"229 Entering Extended Passive Mode (|||-1|)\r\n",
            b"229 Entering Extended Passive Mode (||1025|)\r\n",
            b"229 Entering Extended Passive Mode (|!|1025|)\r\n",
            b"229 Entering Extended Passive Mode ()\r\n",
            b"229 Entering Extended Passive Mode (|||99999999999999999999|)\r\n",
        ];
        for reply in bad {
            for mode in [Mode::Gateway, Mode::Reverse] {
                let verb = if reply.starts_with(b"227") {
                    "PASV"
                } else {
                    "EPSV"
                };
                let mut s = asked(mode, verb);
                s.handle_server_data(reply);
                let actions = drain(&mut s);
                assert!(
                    matches!(&actions[..], [Action::ToClient(r)] if r.starts_with(b"425")),
                    "{:?}: {actions:?}",
                    String::from_utf8_lossy(reply)
                );
            }
        }
    }

    #[test]
    fn overlong_lines_nul_bytes_and_telnet_codes() {
        for len in [513usize, 1000, 4096, 100_000] {
            let mut line = vec![b'A'; len];
            line.extend_from_slice(b"\r\n");
            assert_code(Mode::Gateway, &line, b"500");
            let mut port = b"PORT ".to_vec();
            port.extend(std::iter::repeat_n(b'1', len));
            port.extend_from_slice(b"\r\n");
            assert_code(Mode::Gateway, &port, b"500");
        }
        // Lines the servers would read differently (a NUL, a literal 0xFF, no verb left once
        // the Telnet command is gone) are refused.
        for line in [
            &b"RETR \x00file\r\n"[..],
            b"PORT 198,18,0,2,156,6\x004\r\n",
            b"EPRT \x7f1\x7f198.18.0.2\x7f40000\x7f\r\n",
            b"PO\xff\xffRT 198,18,0,2,156,64\r\n",
            b"\xff\xfb\x01\r\n",
        ] {
            assert_eq!(
                refusal(Mode::Gateway, line),
                Reject::AmbiguousLine.client_reply()
            );
        }
        // The rest reach the server as ftp-alg read them: Telnet commands removed, CR LF.
        for (line, forwarded) in [
            (&b"USER \xff\xfe\xfd\r\n"[..], &b"USER \r\n"[..]),
            (
                b"CWD \xe6\x97\xa5\xe6\x9c\xac\n",
                b"CWD \xe6\x97\xa5\xe6\x9c\xac\r\n",
            ),
        ] {
            let mut s = greeted(Mode::Gateway);
            s.handle_client_data(line);
            assert_eq!(drain(&mut s), vec![Action::ToServer(forwarded.to_vec())]);
        }
    }

    /// Every split of a PORT line, and of a 227, yields exactly one pinhole request.
    #[test]
    fn announcements_split_at_every_byte() {
        let line = b"PORT 198,18,0,2,156,64\r\n";
        for cut in 0..=line.len() {
            let mut s = greeted(Mode::Gateway);
            s.handle_client_data(&line[..cut]);
            let mut actions = drain(&mut s);
            s.handle_client_data(&line[cut..]);
            actions.extend(drain(&mut s));
            assert!(
                matches!(&actions[..], [Action::Open(r)] if r.dnat == Some("198.18.0.2:40000".parse().unwrap())),
                "cut {cut}: {actions:?}"
            );
        }
        let reply = b"227 Entering Passive Mode (203,0,113,2,156,65).\r\n";
        for cut in 0..=reply.len() {
            let mut s = asked(Mode::Reverse, "PASV");
            s.handle_server_data(&reply[..cut]);
            let mut actions = drain(&mut s);
            s.handle_server_data(&reply[cut..]);
            actions.extend(drain(&mut s));
            assert!(
                matches!(&actions[..], [Action::Open(r)] if r.dnat == Some("203.0.113.2:40001".parse().unwrap())),
                "cut {cut}: {actions:?}"
            );
        }
    }

    #[test]
    fn floods_stay_in_order_and_leave_one_pinhole() {
        let mut s = greeted(Mode::Gateway);
        s.handle_client_data(&b"NOOP\r\n".repeat(10_000));
        let actions = drain(&mut s);
        assert_eq!(actions.len(), 10_000);
        assert!(actions
            .iter()
            .all(|a| *a == Action::ToServer(b"NOOP\r\n".to_vec())));

        // Thousands of PASV answers: each supersedes the one before, so only the last pinhole
        // stays open.
        let mut s = greeted(Mode::Reverse);
        let mut closed = Vec::new();
        for n in 0..3000u64 {
            s.handle_client_data(b"PASV\r\n");
            drain(&mut s);
            s.handle_server_data(b"227 Entering Passive Mode (203,0,113,2,156,65)\r\n");
            for action in drain(&mut s) {
                match action {
                    Action::Open(_) => s.handle_opened(opened(n, 61000)),
                    Action::Close(ids) => closed.extend(ids),
                    _ => {}
                }
            }
            drain(&mut s);
        }
        assert_eq!(closed, (0..2999).collect::<Vec<_>>());
    }

    /// Issue 10's first attack: a bare LF hides a fake 227 inside a CWD argument that proftpd
    /// echoes in its error reply. ftp-alg ends the CWD at the LF, and so does the server, since
    /// the line it receives ends there with CR LF; the "227" line is no command (500), and a 227
    /// that answers no PASV opens nothing, even if a server sends one.
    #[test]
    fn a_227_smuggled_through_an_echoing_error_reply_opens_nothing() {
        for mode in [Mode::Gateway, Mode::Reverse] {
            let mut s = greeted(mode);
            s.handle_client_data(b"CWD nx\n227 Entering Passive Mode (203,0,113,2,8,174)\r\n");
            assert_eq!(
                drain(&mut s),
                vec![Action::ToServer(b"CWD nx\r\n".to_vec())]
            );
            s.handle_server_data(
                b"550 nx\n227 Entering Passive Mode (203,0,113,2,8,174): No such file or directory\r\n",
            );
            let actions = drain(&mut s);
            assert!(
                !actions.iter().any(|a| matches!(a, Action::Open(_))),
                "{actions:?}"
            );
            assert_eq!(
                actions,
                vec![
                    Action::ToClient(b"550 nx\r\n".to_vec()),
                    Action::ToClient(Reject::AmbiguousLine.client_reply().to_vec()),
                    Action::ToClient(
                        b"227 Reply withheld by the FTP gateway: it answers no PASV/EPSV.\r\n"
                            .to_vec()
                    ),
                ]
            );
        }
    }

    /// Issue 10's second attack: a VT (or FF, TAB, NUL) after the verb. proftpd splits the verb
    /// there, so ftp-alg must not forward it as "some other command".
    #[test]
    fn commands_hidden_behind_control_bytes_never_reach_the_server() {
        for line in [
            &b"PORT\x0b203,0,113,1,238,72\r\n"[..],
            b"PORT\x0c203,0,113,1,238,72\r\n",
            b"STOR\x0bx\r\n",
            b"DELE\x0cx\r\n",
            b"SITE\x0bCHMOD 777 x\r\n",
            b"AUTH\x0bTLS\r\n",
            b"RETR\tx\r\n",
            b"PORT\x00 203,0,113,1,238,72\r\n",
        ] {
            for mode in [Mode::Gateway, Mode::Reverse] {
                let mut s = greeted(mode);
                s.handle_client_data(line);
                assert_eq!(
                    drain(&mut s),
                    vec![Action::ToClient(
                        Reject::AmbiguousLine.client_reply().to_vec()
                    )],
                    "{line:?}"
                );
            }
        }
    }

    /// Issue 10's third attack: a 227 or 229 that answers NOOP, a second one after the reply to
    /// PASV, a 227 answering EPSV: none opens a pinhole, and none reaches the client as sent.
    #[test]
    fn only_the_reply_to_pasv_or_epsv_opens_a_passive_pinhole() {
        let cases: [(&str, &[u8]); 4] = [
            (
                "NOOP",
                b"227 Entering Passive Mode (203,0,113,2,156,65)\r\n",
            ),
            (
                "NOOP",
                b"229 Entering Extended Passive Mode (|||40001|)\r\n",
            ),
            (
                "EPSV",
                b"227 Entering Passive Mode (203,0,113,2,156,65)\r\n",
            ),
            (
                "PASV",
                b"229 Entering Extended Passive Mode (|||40001|)\r\n",
            ),
        ];
        for (verb, reply) in cases {
            for mode in [Mode::Gateway, Mode::Reverse] {
                let mut s = asked(mode, verb);
                s.handle_server_data(reply);
                let actions = drain(&mut s);
                assert_eq!(actions.len(), 1, "{verb} {actions:?}");
                match &actions[0] {
                    Action::ToClient(r) => assert!(
                        r.starts_with(&reply[..3]) && !r.windows(3).any(|w| w == b"113"),
                        "{verb}: {:?}",
                        String::from_utf8_lossy(r)
                    ),
                    other => panic!("{verb}: {other:?}"),
                }
            }
        }
        // A second 227 after the one that answered PASV.
        let mut s = asked(Mode::Reverse, "PASV");
        s.handle_server_data(b"227 Entering Passive Mode (203,0,113,2,156,65)\r\n");
        assert!(matches!(&drain(&mut s)[..], [Action::Open(_)]));
        s.handle_opened(opened(1, 61000));
        drain(&mut s);
        s.handle_server_data(b"227 Entering Passive Mode (203,0,113,2,156,66)\r\n");
        let actions = drain(&mut s);
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Open(_))),
            "{actions:?}"
        );
        assert_eq!(s.pinhole_ids().collect::<Vec<_>>(), vec![1]);
        let refused = std::iter::from_fn(|| s.poll_event())
            .filter(|e| *e == Event::Refused(Reject::UnexpectedPassiveReply))
            .count();
        assert_eq!(refused, 1);
    }

    /// A multi-line 227/229 is never acted on, and none of its lines (which may hold the
    /// server's private address) reaches the client: it becomes one 425.
    #[test]
    fn a_multi_line_passive_reply_is_withheld_whole() {
        for (verb, reply) in [
            (
                "PASV",
                &b"227-Entering Passive Mode (10,0,0,5,156,65)\r\n 10,0,0,5,156,65\r\n227 ok\r\n"[..],
            ),
            (
                "EPSV",
                b"229-Entering Extended Passive Mode (|||40001|)\r\n229 ok\r\n",
            ),
        ] {
            let mut s = asked(Mode::Reverse, verb);
            s.handle_server_data(reply);
            assert_eq!(
                drain(&mut s),
                vec![Action::ToClient(
                    Reject::UnexpectedPassiveReply.passive_reply().to_vec()
                )]
            );
            // The session is in step: the next reply answers the next command.
            s.handle_client_data(b"NOOP\r\n");
            s.handle_server_data(b"200 ok\r\n");
            assert_eq!(
                drain(&mut s),
                vec![
                    Action::ToClient(b"200 ok\r\n".to_vec()),
                    Action::ToServer(b"NOOP\r\n".to_vec())
                ]
            );
        }
    }

    /// One read of tiny bad lines is answered line by line (and counted), but logged only at
    /// the start and then once in a thousand.
    #[test]
    fn a_flood_of_bad_lines_is_answered_in_full_and_logged_sparingly() {
        let mut s = greeted(Mode::Gateway);
        s.handle_client_data(&b"\x0b\n".repeat(30_000));
        let actions = drain(&mut s);
        assert_eq!(actions.len(), 30_000);
        assert!(actions
            .iter()
            .all(|a| *a == Action::ToClient(Reject::AmbiguousLine.client_reply().to_vec())));
        assert_eq!(s.refusals, 30_000);
        let logged = (1..=s.refusals).filter(|n| logs_refusal(*n)).count();
        assert_eq!(logged, 10 + 30);
    }
}
