//! The daemon's configuration: one strict TOML file, every key documented in README.md.
//!
//! Unknown keys are rejected (`deny_unknown_fields`), every default is a named constant, and
//! [`Config::validate`] checks what the type system cannot (mode-specific keys, port ranges), so
//! `ftp-alg check-config FILE` and `ftp-alg run` report the same errors before anything starts.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Where the daemon listens in gateway mode: the port that tcp/21 is redirected to.
pub const DEFAULT_GATEWAY_LISTEN: &[&str] = &["0.0.0.0:2121", "[::]:2121"];
/// First port handed out for rewritten announcements; above Linux's default
/// `ip_local_port_range` (32768-60999) so it never collides with the kernel's own ephemeral ports.
pub const DEFAULT_PORT_MIN: u16 = 61000;
/// Last port handed out for rewritten announcements.
pub const DEFAULT_PORT_MAX: u16 = 64999;
/// Kernel-side lifetime of a pinhole: long enough for a client to dial, short enough that a
/// crashed daemon leaks nothing for long. The daemon removes pinholes earlier, at the transfer's
/// final reply or at the end of the session.
pub const DEFAULT_PINHOLE_TIMEOUT_SECS: u64 = 30;
/// A port a server has dialled (active mode) is avoided for that server for this long after its
/// transfer: a server that dials from a fixed port repeats the whole 4-tuple, and its last
/// connection sits in TIME_WAIT (60 s on Linux; conntrack keeps it 120 s). Client-dialled ports
/// need no such wait (`scripts/time-wait-experiment`).
pub const DEFAULT_PORT_REUSE_DELAY_SECS: u64 = 120;
/// How long an announcement waits for a port when every port already waits for a connection
/// from the same peer: a peer's connection usually follows its announcement within a round
/// trip, so a few hundred milliseconds absorb bursts of parallel sessions from one address
/// (50 at once through one port) without holding a refusal back for long.
pub const DEFAULT_PORT_WAIT_MS: u64 = 500;
/// The longest `pinholes.port_wait_ms`: the session's control channel is held meanwhile.
pub const MAX_PORT_WAIT_MS: u64 = 10_000;
/// The connection mark that ftp-alg sets on every connection it lets through; an existing
/// firewall accepts it with the one line `ct mark 0x0000f7a0 accept`.
pub const DEFAULT_CT_MARK: u32 = 0xf7a0;
/// The connmark bits ftp-alg owns: all of them, as before the mask existed. A ruleset that gives
/// other bits a meaning narrows it (e.g. `0x0000ffff`); ftp-alg then sets and matches only these.
pub const DEFAULT_CT_MARK_MASK: u32 = 0xffff_ffff;
/// Longest control-channel line accepted: bytes before the line feed.
pub use crate::ftp::framing::DEFAULT_MAX_LINE;
/// The largest `proxy.max_line`. A forwarded command is its text and CR LF, at most
/// `max_line` + 2 bytes; servers take no more than 4096 (vsftpd answers a longer line `500 Input
/// line too long.` and closes the session; proftpd waits for more bytes after one, or drops a
/// line longer than its buffer without any reply, which would leave every later reply answering
/// the wrong command).
pub const MAX_MAX_LINE: usize = 4094;
/// The socket mark on ftp-alg's own connections to FTP servers, so that an operator's output
/// chain can filter them: in gateway mode they start on this host, and the forward chain never
/// sees them.
pub const DEFAULT_UPSTREAM_MARK: u32 = 0xf7a1;
/// IPv6 clients are counted per network of this prefix length for `max_sessions_per_client`:
/// one host commonly holds a whole /64 and picks a new address from it at will.
pub const DEFAULT_CLIENT_PREFIX_V6: u8 = 64;
/// How long the connection to the upstream server may take before the client gets a 421.
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 10;
/// Control connections handled at once; more are answered 421 and closed.
pub const DEFAULT_MAX_SESSIONS: usize = 1000;
/// Control connections from one client address at once: enough for a parallel client and for
/// an office of users behind one NAT address (ports are shared, so sessions no longer drain a
/// pool), while one address still cannot take more than a quarter of `DEFAULT_MAX_SESSIONS`.
/// A value above `limits.max_sessions` is capped by it.
pub const DEFAULT_MAX_SESSIONS_PER_CLIENT: usize = 256;
/// A control connection with no command from the client for this long, and no transfer
/// running, is closed with 421 (RFC 6384 §12: never while a transfer runs).
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 900;
/// The longest `limits.idle_timeout_secs`: a week. Longer is no timeout in practice, and a
/// deadline that far out must still be representable.
pub const MAX_IDLE_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
/// After SIGTERM, how long the sessions under way may go on before the daemon stops.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 30;
/// After handing its listeners over to a new process (`ftp-alg run --take-over`), how long the
/// old one serves its open sessions before it stops: a day. FTP sessions last minutes to hours,
/// and idle ones end at `idle_timeout_secs` anyway.
pub const DEFAULT_HANDOVER_GRACE_SECS: u64 = 24 * 3600;
/// Pinholes one session may hold at once: the current endpoint plus those of pipelined
/// transfers still awaiting their final reply.
pub const DEFAULT_MAX_PINHOLES_PER_SESSION: usize = 8;
/// Windows (`policy.tls_window`) one client address may hold at once: a window opens far more
/// than a pinhole, so fewer than sessions; enough for a parallel client and a few users behind
/// one NAT address. A session beyond it ends with 421 when its TLS starts.
pub const DEFAULT_MAX_WINDOWS_PER_CLIENT: usize = 16;

/// The configuration file `ftp-alg run` reads when no `--config` is given, if it exists.
pub const DEFAULT_CONFIG: &str = "/etc/ftp-alg/ftp-alg.toml";

/// Where the daemon serves its control API, and where the CLI looks for it.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/ftp-alg/control.sock";

/// Errors found while reading or checking a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema (unknown key, wrong type).
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// The values parse but do not make sense together.
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// How ftp-alg sits between clients and servers (see DESIGN.md's mode table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Clients behind this host reach any server; tcp/21 is redirected to the daemon, which
    /// reads the original destination from the socket.
    Gateway,
    /// In front of one legacy server (sidecar or reverse proxy).
    Reverse,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Gateway => "gateway",
            Mode::Reverse => "reverse",
        })
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Control-channel proxy settings.
    pub proxy: ProxyConfig,
    /// Pinhole and nftables settings.
    #[serde(default)]
    pub pinholes: PinholeConfig,
    /// Limits on sessions.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// What the ALG lets a session do.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// The operator's control API.
    #[serde(default)]
    pub control: ControlConfig,
    /// The Prometheus metrics listener.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Log output.
    #[serde(default)]
    pub log: LogConfig,
    /// FTPS termination (reverse mode): absent, AUTH is handled as `policy.auth` says.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// The most a data relay buffers per direction of one `PROT P` data connection: with 16 KiB
/// (one TLS record) the relay made twice the system calls and took 1.5 s of CPU per GiB against
/// 1.1 s with 64 KiB (`scripts/bench-ftps --relay-buffer`, docs/ftps.md).
pub const DEFAULT_TLS_RELAY_BUFFER: usize = 64 * 1024;
/// The largest `tls.relay_buffer`.
pub const MAX_TLS_RELAY_BUFFER: usize = 1024 * 1024;

/// `[tls]`: ftp-alg ends the client's TLS itself (RFC 4217 explicit FTPS), so that it still
/// reads every announcement; see docs/ftps.md.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, the server's own certificate first.
    pub certificate: PathBuf,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Bytes buffered per direction of one relayed `PROT P` data connection.
    #[serde(default = "default_tls_relay_buffer")]
    pub relay_buffer: usize,
    /// Implicit FTPS listeners (customarily port 990): TLS from the first byte, no AUTH.
    #[serde(default)]
    pub implicit_listen: Vec<SocketAddr>,
    /// Towards the server: plain FTP, or ftp-alg's own `AUTH TLS` (docs/ftps.md).
    #[serde(default)]
    pub upstream: UpstreamProtocol,
    /// `upstream = "tls"`: PEM file of the CA certificates the server's certificate must chain
    /// to (exactly one of this and `upstream_pin`).
    #[serde(default)]
    pub upstream_ca: Option<PathBuf>,
    /// `upstream = "tls"`: `sha256:` and the hex SHA-256 of the server's own (end-entity)
    /// certificate, in DER; colons between the bytes are allowed.
    #[serde(default)]
    pub upstream_pin: Option<String>,
    /// `upstream = "tls"`: the name the server's certificate must carry (a DNS name or an IP
    /// address); by default the address of `proxy.upstream`.
    #[serde(default)]
    pub upstream_name: Option<String>,
}

fn default_tls_relay_buffer() -> usize {
    DEFAULT_TLS_RELAY_BUFFER
}

/// `tls.upstream`: what ftp-alg speaks to the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// Plain FTP: the server needs no TLS (or has it optional).
    #[default]
    Plain,
    /// ftp-alg sends `AUTH TLS` itself after the server's greeting, and `PBSZ 0` and `PROT P`;
    /// every data connection is then relayed, TLS towards the server.
    Tls,
}

/// How the server's certificate is checked when `tls.upstream = "tls"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTrust {
    /// It must chain to a CA of this PEM file.
    Ca(PathBuf),
    /// The SHA-256 of its end-entity certificate must be this.
    Pin([u8; 32]),
}

impl TlsConfig {
    /// With `upstream = "tls"`, how the server's certificate is checked; `None` for a plain
    /// upstream. The error names the keys that are wrong.
    pub fn upstream_trust(&self) -> Result<Option<UpstreamTrust>, String> {
        match (self.upstream, &self.upstream_ca, &self.upstream_pin) {
            (UpstreamProtocol::Plain, None, None) if self.upstream_name.is_none() => Ok(None),
            (UpstreamProtocol::Plain, ..) => Err(
                "tls.upstream_ca, tls.upstream_pin and tls.upstream_name are for tls.upstream = \"tls\"; \
                 with a plain upstream nothing is verified"
                    .into(),
            ),
            (UpstreamProtocol::Tls, Some(ca), None) => Ok(Some(UpstreamTrust::Ca(ca.clone()))),
            (UpstreamProtocol::Tls, None, Some(pin)) => parse_pin(pin).map(UpstreamTrust::Pin).map(Some),
            (UpstreamProtocol::Tls, Some(_), Some(_)) => Err(
                "tls.upstream_ca and tls.upstream_pin: give exactly one, not both".into(),
            ),
            (UpstreamProtocol::Tls, None, None) => Err(
                "tls.upstream = \"tls\" needs tls.upstream_ca (a CA file) or tls.upstream_pin \
                 (sha256:... of the server's certificate): an unverified server could be anyone"
                    .into(),
            ),
        }
    }
}

/// `sha256:` and 64 hex digits, optionally in colon-separated pairs (as `openssl x509
/// -fingerprint -sha256` prints them).
fn parse_pin(pin: &str) -> Result<[u8; 32], String> {
    let bad = || {
        format!(
            "tls.upstream_pin = {pin:?}: expected \"sha256:\" and the 64 hex digits of the \
             SHA-256 of the server's certificate (openssl x509 -noout -fingerprint -sha256)"
        )
    };
    let hex = pin
        .strip_prefix("sha256:")
        .ok_or_else(bad)?
        .replace(':', "");
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// `[control]`: the Unix socket that `ftp-alg status`, `sessions` and `pinholes` talk to.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Serve the control API at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The socket's path; it is created mode 0600, and only root (or the daemon's own user)
    /// is answered.
    #[serde(default = "default_control_socket")]
    pub socket: PathBuf,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            enabled: true,
            socket: default_control_socket(),
        }
    }
}

/// `[metrics]`: Prometheus text exposition over HTTP, off unless `listen` is set.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP listener serving `GET /metrics`, e.g. `127.0.0.1:9477`.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// `[log]`: how log lines are written: to the journal when systemd connected stderr to it,
/// else to stderr.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `human` or `json` (stderr only; the journal gets its own fields).
    #[serde(default)]
    pub format: LogFormat,
    /// Which events to log, as a `RUST_LOG` filter (`info`, `warn,ftp_alg=debug`);
    /// `RUST_LOG`, when set, wins. A SIGHUP reload applies a new value.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

/// `log.level` unless set: events at info and above.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// `log.format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event, with the session's span fields.
    #[default]
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

/// `[limits]`: how much one client, and all of them, may hold.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Control connections handled at once.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// Control connections from one client address at once.
    #[serde(default = "default_max_sessions_per_client")]
    pub max_sessions_per_client: usize,
    /// Seconds without a client command (and without a running transfer) before the session
    /// is closed with 421.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// Pinholes one session may hold at once; an announcement beyond it gets 425.
    #[serde(default = "default_max_pinholes_per_session")]
    pub max_pinholes_per_session: usize,
    /// Windows (`policy.tls_window`) one client address may hold at once; a session gone TLS
    /// beyond it ends with 421.
    #[serde(default = "default_max_windows_per_client")]
    pub max_windows_per_client: usize,
    /// IPv6 clients count towards `max_sessions_per_client` per network of this prefix length.
    #[serde(default = "default_client_prefix_v6")]
    pub client_prefix_v6: u8,
    /// After SIGTERM or SIGINT, seconds the sessions under way may go on (no new ones are
    /// accepted); then the daemon removes every pinhole and exits.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_secs: u64,
    /// After a hand-over to a new process, seconds the old one serves its open sessions.
    #[serde(default = "default_handover_grace")]
    pub handover_grace_secs: u64,
}

/// `[policy]`: what a session may do.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Act on PORT/EPRT and on 227/229 before the server has accepted a login (230). Off by
    /// default: before login nobody is accountable, every announcement holds a port for its
    /// peer until it is used or times out, and no server transfers anything before login anyway.
    #[serde(default)]
    pub data_before_login: bool,
    /// What to do with a PORT/EPRT that names another host than the client.
    #[serde(default)]
    pub foreign_port: ForeignPort,
    /// What to do with a 227 that names another address than the server's.
    #[serde(default)]
    pub foreign_pasv: ForeignPasv,
    /// What to do with AUTH (TLS), which ftp-alg cannot see into.
    #[serde(default)]
    pub auth: AuthPolicy,
    /// Gateway mode, with `auth = "transparent"`: when a session goes TLS, open a window that
    /// lets its client make any new connection to its server's ports 1024-65535 for as long as
    /// the session lives (docs/ftps.md: the trade-off). Off by default.
    #[serde(default)]
    pub tls_window: bool,
    /// Answer USER and PASS with 530 until the client has secured the control connection with
    /// AUTH TLS (needs `[tls]`).
    #[serde(default)]
    pub require_tls: bool,
    /// Refuse every command that changes the server's files (STOR, APPE, DELE, RNFR, MKD, ...).
    #[serde(default)]
    pub read_only: bool,
    /// Further commands to refuse, by verb (case-insensitive).
    #[serde(default)]
    pub deny_commands: Vec<String>,
    /// Clients that may use the ALG (CIDR); empty: all.
    #[serde(default)]
    pub allow_clients: Vec<IpNet>,
    /// Clients that may not, even if allowed above.
    #[serde(default)]
    pub deny_clients: Vec<IpNet>,
    /// Gateway mode: servers that clients may reach (CIDR); empty: all.
    #[serde(default)]
    pub allow_servers: Vec<IpNet>,
    /// Gateway mode: servers that clients may not reach, even if allowed above.
    #[serde(default)]
    pub deny_servers: Vec<IpNet>,
    /// Gateway mode: let clients reach loopback, link-local, multicast, broadcast and this
    /// host's own addresses. Off by default: the proxy's upstream connection starts on this
    /// host, where the forward policy that guards those addresses does not apply.
    #[serde(default)]
    pub allow_local_servers: bool,
}

impl PolicyConfig {
    /// Whether a client at `addr` may use the ALG.
    pub fn client_allowed(&self, addr: IpAddr) -> bool {
        permitted(&self.allow_clients, &self.deny_clients, addr)
    }

    /// Whether clients may reach a server at `addr`.
    pub fn server_allowed(&self, addr: IpAddr) -> bool {
        permitted(&self.allow_servers, &self.deny_servers, addr)
    }
}

/// In `allow` (or `allow` is empty) and not in `deny`. An IPv4-mapped IPv6 address counts as
/// its IPv4 address.
fn permitted(allow: &[IpNet], deny: &[IpNet], addr: IpAddr) -> bool {
    let addr = addr.to_canonical();
    (allow.is_empty() || allow.iter().any(|n| n.contains(&addr)))
        && !deny.iter().any(|n| n.contains(&addr))
}

/// `policy.foreign_port`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ForeignPort {
    /// Answer 501: the FTP bounce attack (RFC 2577) or a client confused by its own NAT.
    #[default]
    Refuse,
    /// Use the client's own address instead, with the port it asked for: for clients behind a
    /// NAT that announce their private address.
    Replace,
}

/// `policy.foreign_pasv`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ForeignPasv {
    /// Use the server's own address: servers behind NAT announce a private address or 0.0.0.0,
    /// and a pinhole must never lead to a third host.
    #[default]
    Replace,
    /// Answer the client 425 instead.
    Refuse,
}

/// `policy.auth`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthPolicy {
    /// Answer 534: the client goes on in plain text and its transfers get pinholes.
    #[default]
    Refuse,
    /// Pass AUTH on; once the server accepts it (234), pass every byte both ways unread and
    /// open no pinhole: transfers then need another way through the firewall, such as
    /// `policy.tls_window`.
    Transparent,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_sessions_per_client: DEFAULT_MAX_SESSIONS_PER_CLIENT,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            max_pinholes_per_session: DEFAULT_MAX_PINHOLES_PER_SESSION,
            max_windows_per_client: DEFAULT_MAX_WINDOWS_PER_CLIENT,
            client_prefix_v6: DEFAULT_CLIENT_PREFIX_V6,
            shutdown_grace_secs: DEFAULT_SHUTDOWN_GRACE_SECS,
            handover_grace_secs: DEFAULT_HANDOVER_GRACE_SECS,
        }
    }
}

/// `[proxy]`: where to listen and where to go.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// `gateway` or `reverse`.
    pub mode: Mode,
    /// Addresses to accept control connections on.
    #[serde(default = "default_listen")]
    pub listen: Vec<SocketAddr>,
    /// Reverse mode only: the legacy server's control address.
    #[serde(default)]
    pub upstream: Option<SocketAddr>,
    /// Reverse mode only: the address to announce in 227 replies instead of the address the
    /// client dialled (for a host behind a 1:1 NAT, such as a cloud public address).
    #[serde(default)]
    pub announce: Option<IpAddr>,
    /// Gateway mode only: interfaces whose tcp/21 traffic the daemon's table redirects to the
    /// first listen port. Empty: the operator's own ruleset redirects.
    #[serde(default)]
    pub intercept: Vec<String>,
    /// Longest control line accepted, in bytes.
    #[serde(default = "default_max_line")]
    pub max_line: usize,
    /// Seconds allowed for the upstream TCP connect.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Gateway mode: socket mark (`SO_MARK`, nftables `meta mark`) on the connections to the
    /// servers, for the operator's output chain; 0: none.
    #[serde(default = "default_upstream_mark")]
    pub upstream_mark: u32,
    /// Local addresses of the connections to the servers, at most one per address family
    /// (none: the kernel picks one by route). The data connections' source follows, since
    /// pinholes translate to the upstream connection's local address. On a gateway pair this
    /// is the virtual address keepalived moves, so that the servers' packets follow a
    /// failover; bound with `IP_FREEBIND`, so a standby starts before it holds the address.
    #[serde(default)]
    pub upstream_source: Vec<IpAddr>,
}

/// `[pinholes]`: how data connections are let through.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PinholeConfig {
    /// First port handed out for rewritten announcements.
    #[serde(default = "default_port_min")]
    pub port_min: u16,
    /// Last port handed out for rewritten announcements.
    #[serde(default = "default_port_max")]
    pub port_max: u16,
    /// Kernel-side timeout of each pinhole, in seconds.
    #[serde(default = "default_pinhole_timeout")]
    pub timeout_secs: u64,
    /// Seconds a port a server has dialled is avoided for that server after its transfer.
    #[serde(default = "default_reuse_delay")]
    pub reuse_delay_secs: u64,
    /// Milliseconds an announcement waits for a port when every port already waits for the
    /// same peer's connection; then 425.
    #[serde(default = "default_port_wait")]
    pub port_wait_ms: u64,
    /// Connection mark set on every connection a pinhole lets through.
    #[serde(default = "default_ct_mark")]
    pub ct_mark: u32,
    /// The connmark bits `ct_mark` lives in; the others are left alone.
    #[serde(default = "default_ct_mark_mask")]
    pub ct_mark_mask: u32,
    /// How pinholes reach the kernel.
    #[serde(default)]
    pub backend: PinholeBackend,
    /// The nft executable: loads the table, and installs pinholes with `backend = "nft"`.
    #[serde(default = "default_nft")]
    pub nft: PathBuf,
}

/// `pinholes.backend`: how pinholes are installed and removed. The table is loaded with the nft
/// program either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PinholeBackend {
    /// Set elements sent over a netlink socket of the daemon's own: a pinhole is installed in
    /// well under a millisecond.
    #[default]
    Netlink,
    /// The nft program, once per batch of pinholes: a few milliseconds each, for kernels or
    /// setups where the netlink encoding would not do.
    Nft,
}

fn default_listen() -> Vec<SocketAddr> {
    DEFAULT_GATEWAY_LISTEN
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}
fn default_max_line() -> usize {
    DEFAULT_MAX_LINE
}
fn default_connect_timeout() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_SECS
}
fn default_upstream_mark() -> u32 {
    DEFAULT_UPSTREAM_MARK
}
fn default_client_prefix_v6() -> u8 {
    DEFAULT_CLIENT_PREFIX_V6
}
fn default_max_sessions() -> usize {
    DEFAULT_MAX_SESSIONS
}
fn default_max_sessions_per_client() -> usize {
    DEFAULT_MAX_SESSIONS_PER_CLIENT
}
fn default_idle_timeout() -> u64 {
    DEFAULT_IDLE_TIMEOUT_SECS
}
fn default_max_pinholes_per_session() -> usize {
    DEFAULT_MAX_PINHOLES_PER_SESSION
}
fn default_max_windows_per_client() -> usize {
    DEFAULT_MAX_WINDOWS_PER_CLIENT
}
fn default_shutdown_grace() -> u64 {
    DEFAULT_SHUTDOWN_GRACE_SECS
}
fn default_handover_grace() -> u64 {
    DEFAULT_HANDOVER_GRACE_SECS
}
fn default_port_min() -> u16 {
    DEFAULT_PORT_MIN
}
fn default_port_max() -> u16 {
    DEFAULT_PORT_MAX
}
fn default_pinhole_timeout() -> u64 {
    DEFAULT_PINHOLE_TIMEOUT_SECS
}
fn default_reuse_delay() -> u64 {
    DEFAULT_PORT_REUSE_DELAY_SECS
}
fn default_ct_mark_mask() -> u32 {
    DEFAULT_CT_MARK_MASK
}
fn default_port_wait() -> u64 {
    DEFAULT_PORT_WAIT_MS
}
fn default_ct_mark() -> u32 {
    DEFAULT_CT_MARK
}
fn default_nft() -> PathBuf {
    PathBuf::from("nft")
}
fn default_log_level() -> String {
    DEFAULT_LOG_LEVEL.to_owned()
}
fn default_true() -> bool {
    true
}
fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}

/// The connection mark ftp-alg sets, within the bits it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtMark {
    /// `pinholes.ct_mark`.
    pub value: u32,
    /// `pinholes.ct_mark_mask`.
    pub mask: u32,
}

impl From<u32> for CtMark {
    /// A mark that owns all 32 bits.
    fn from(value: u32) -> CtMark {
        CtMark {
            value,
            mask: u32::MAX,
        }
    }
}

impl PinholeConfig {
    /// `ct_mark` within `ct_mark_mask`.
    pub fn mark(&self) -> CtMark {
        CtMark {
            value: self.ct_mark,
            mask: self.ct_mark_mask,
        }
    }
}

impl Default for PinholeConfig {
    fn default() -> Self {
        PinholeConfig {
            port_min: DEFAULT_PORT_MIN,
            port_max: DEFAULT_PORT_MAX,
            timeout_secs: DEFAULT_PINHOLE_TIMEOUT_SECS,
            reuse_delay_secs: DEFAULT_PORT_REUSE_DELAY_SECS,
            port_wait_ms: DEFAULT_PORT_WAIT_MS,
            ct_mark: DEFAULT_CT_MARK,
            ct_mark_mask: DEFAULT_CT_MARK_MASK,
            backend: PinholeBackend::default(),
            nft: default_nft(),
        }
    }
}

impl Config {
    /// Check what the configuration names on this host: every `proxy.intercept` interface must
    /// exist in `interfaces` (a typo would otherwise leave tcp/21 unredirected without a word).
    pub fn check_host(&self, interfaces: &[String]) -> Result<(), String> {
        let missing: Vec<&str> = self
            .proxy
            .intercept
            .iter()
            .filter(|name| !interfaces.contains(name))
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(format!(
            "proxy.intercept: no interface named {} on this host (it has: {})",
            missing
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            interfaces.join(", ")
        ))
    }

    /// The built-in default: gateway mode on port 2121, all other values at their defaults.
    pub fn builtin_gateway() -> Config {
        Config {
            proxy: ProxyConfig {
                mode: Mode::Gateway,
                listen: default_listen(),
                upstream: None,
                announce: None,
                intercept: Vec::new(),
                max_line: DEFAULT_MAX_LINE,
                connect_timeout_secs: DEFAULT_CONNECT_TIMEOUT_SECS,
                upstream_mark: DEFAULT_UPSTREAM_MARK,
                upstream_source: Vec::new(),
            },
            pinholes: PinholeConfig::default(),
            limits: LimitsConfig::default(),
            policy: PolicyConfig::default(),
            control: ControlConfig::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
            tls: None,
        }
    }

    /// Read, parse and validate a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// Parse and validate configuration text; `path` only names the source in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    /// Checks that span several keys; returns the first problem found.
    pub fn validate(&self) -> Result<(), String> {
        let p = &self.proxy;
        if p.listen.is_empty() {
            return Err("proxy.listen: at least one address is needed".into());
        }
        match p.mode {
            Mode::Gateway => {
                if p.upstream.is_some() {
                    return Err("proxy.upstream is for reverse mode; a gateway reads each connection's original destination".into());
                }
                if p.announce.is_some() {
                    return Err("proxy.announce is for reverse mode only".into());
                }
            }
            Mode::Reverse => {
                if p.upstream.is_none() {
                    return Err("proxy.upstream is required in reverse mode".into());
                }
                if !p.intercept.is_empty() {
                    return Err("proxy.intercept is for gateway mode only".into());
                }
            }
        }
        if p.max_line < 64 {
            return Err(format!(
                "proxy.max_line = {} is too small: FTP needs at least 64",
                p.max_line
            ));
        }
        if p.max_line > MAX_MAX_LINE {
            return Err(format!(
                "proxy.max_line = {} is above {MAX_MAX_LINE}: proftpd drops longer commands without \
                 a reply, which would put every later reply out of step",
                p.max_line
            ));
        }
        if p.connect_timeout_secs == 0 {
            return Err("proxy.connect_timeout_secs must be at least 1".into());
        }
        let v4 = p.upstream_source.iter().filter(|a| a.is_ipv4()).count();
        if v4 > 1 || p.upstream_source.len() - v4 > 1 {
            return Err(format!(
                "proxy.upstream_source = {:?}: at most one address per family",
                p.upstream_source
            ));
        }
        if let Some(bad) = p
            .upstream_source
            .iter()
            .find(|a| a.is_unspecified() || a.is_multicast())
        {
            return Err(format!(
                "proxy.upstream_source: {bad} is not a unicast address"
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(format!("log.level = {:?}: {e}", self.log.level));
        }
        let ph = &self.pinholes;
        if ph.port_min < 1024 {
            return Err(format!(
                "pinholes.port_min = {}: data ports below 1024 are refused",
                ph.port_min
            ));
        }
        if ph.port_min > ph.port_max {
            return Err(format!(
                "pinholes.port_min ({}) is above pinholes.port_max ({})",
                ph.port_min, ph.port_max
            ));
        }
        if ph.timeout_secs == 0 || ph.timeout_secs > 3600 {
            return Err(format!(
                "pinholes.timeout_secs = {}: must be 1..=3600",
                ph.timeout_secs
            ));
        }
        if ph.port_wait_ms > MAX_PORT_WAIT_MS {
            return Err(format!(
                "pinholes.port_wait_ms = {}: at most {MAX_PORT_WAIT_MS} (the control channel \
                 waits meanwhile)",
                ph.port_wait_ms
            ));
        }
        let l = &self.limits;
        if l.max_sessions == 0 || l.max_sessions_per_client == 0 {
            return Err(
                "limits.max_sessions and limits.max_sessions_per_client must be at least 1".into(),
            );
        }
        if l.handover_grace_secs > MAX_IDLE_TIMEOUT_SECS {
            return Err(format!(
                "limits.handover_grace_secs = {}: at most {MAX_IDLE_TIMEOUT_SECS} (a week)",
                l.handover_grace_secs
            ));
        }
        if l.client_prefix_v6 == 0 || l.client_prefix_v6 > 128 {
            return Err(format!(
                "limits.client_prefix_v6 = {}: must be 1..=128",
                l.client_prefix_v6
            ));
        }
        if p.mode == Mode::Reverse
            && (!self.policy.allow_servers.is_empty()
                || !self.policy.deny_servers.is_empty()
                || self.policy.allow_local_servers)
        {
            return Err("policy.allow_servers, policy.deny_servers and policy.allow_local_servers are for gateway mode; reverse mode has one upstream".into());
        }
        for verb in &self.policy.deny_commands {
            if verb.is_empty() || verb.len() > 8 || !verb.bytes().all(|b| b.is_ascii_alphabetic()) {
                return Err(format!(
                    "policy.deny_commands: {verb:?} is not an FTP command verb"
                ));
            }
        }
        if self.control.enabled && self.control.socket.as_os_str().is_empty() {
            return Err("control.socket: a path is needed (or control.enabled = false)".into());
        }
        if l.max_pinholes_per_session == 0 {
            return Err("limits.max_pinholes_per_session must be at least 1".into());
        }
        if l.max_windows_per_client == 0 {
            return Err("limits.max_windows_per_client must be at least 1 (policy.tls_window = false turns windows off)".into());
        }
        if self.policy.tls_window
            && (p.mode != Mode::Gateway || self.policy.auth != AuthPolicy::Transparent)
        {
            return Err("policy.tls_window is for gateway mode with policy.auth = \"transparent\": it opens a window for sessions that go TLS unread (see docs/ftps.md)".into());
        }
        if l.idle_timeout_secs == 0 || l.idle_timeout_secs > MAX_IDLE_TIMEOUT_SECS {
            return Err(format!(
                "limits.idle_timeout_secs = {}: must be 1..={MAX_IDLE_TIMEOUT_SECS} (a week)",
                l.idle_timeout_secs
            ));
        }
        if ph.ct_mark == 0 {
            return Err(
                "pinholes.ct_mark must not be 0: every connection starts with mark 0".into(),
            );
        }
        if ph.ct_mark & !ph.ct_mark_mask != 0 {
            return Err(format!(
                "pinholes.ct_mark = {:#010x} has bits outside pinholes.ct_mark_mask = {:#010x}",
                ph.ct_mark, ph.ct_mark_mask
            ));
        }
        if let Some(tls) = &self.tls {
            if p.mode != Mode::Reverse {
                return Err("[tls] is for reverse mode: a gateway has no certificate of the servers its clients reach (see docs/ftps.md)".into());
            }
            if let Some(both) = tls.implicit_listen.iter().find(|a| p.listen.contains(a)) {
                return Err(format!(
                    "tls.implicit_listen: {both} is also in proxy.listen; a listener is either \
                     implicit FTPS (TLS first) or plain/explicit"
                ));
            }
            if tls.relay_buffer < 1024 || tls.relay_buffer > MAX_TLS_RELAY_BUFFER {
                return Err(format!(
                    "tls.relay_buffer = {}: must be 1024..={MAX_TLS_RELAY_BUFFER}",
                    tls.relay_buffer
                ));
            }
            tls.upstream_trust()?;
            if let Some(name) = &tls.upstream_name {
                if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
                    return Err(format!(
                        "tls.upstream_name = {name:?}: neither a DNS name nor an IP address"
                    ));
                }
            }
        } else if self.policy.require_tls {
            return Err("policy.require_tls needs a [tls] section with a certificate".into());
        }
        if !p.intercept.is_empty() && p.listen.iter().any(|a| a.port() != p.listen[0].port()) {
            return Err("proxy.intercept redirects to one port: give every proxy.listen address the same port".into());
        }
        for iface in &p.intercept {
            let ok = !iface.is_empty()
                && iface.len() < 16
                && iface
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !ok {
                return Err(format!(
                    "proxy.intercept: {iface:?} is not an interface name"
                ));
            }
        }
        Ok(())
    }

    /// Kernel-side pinhole timeout.
    pub fn pinhole_timeout(&self) -> Duration {
        Duration::from_secs(self.pinholes.timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    #[test]
    fn intercept_names_interfaces_that_exist() {
        let mut config = Config::builtin_gateway();
        let here = ["lo".to_owned(), "lan0".to_owned()];
        assert_eq!(config.check_host(&here), Ok(()));
        config.proxy.intercept = vec!["lan0".into(), "lna0".into()];
        assert_eq!(
            config.check_host(&here),
            Err(
                "proxy.intercept: no interface named \"lna0\" on this host (it has: lo, lan0)"
                    .to_owned()
            )
        );
    }

    #[test]
    fn minimal_gateway_uses_defaults() {
        let c = parse("[proxy]\nmode = \"gateway\"\n").unwrap();
        assert_eq!(c.proxy.listen.len(), 2);
        assert_eq!(c.pinholes.port_min, DEFAULT_PORT_MIN);
        assert_eq!(c.pinholes.ct_mark, DEFAULT_CT_MARK);
        assert_eq!(c.pinholes.backend, PinholeBackend::Netlink);
    }

    #[test]
    fn the_mark_must_lie_within_its_mask() {
        let c = parse("[proxy]\nmode = \"gateway\"\n").unwrap();
        assert_eq!(c.pinholes.mark(), CtMark::from(DEFAULT_CT_MARK));
        let c = parse("[proxy]\nmode = \"gateway\"\n[pinholes]\nct_mark_mask = 0xffff\n").unwrap();
        assert_eq!(c.pinholes.mark().mask, 0xffff);
        let e =
            parse("[proxy]\nmode = \"gateway\"\n[pinholes]\nct_mark_mask = 0xff00\n").unwrap_err();
        assert!(
            e.to_string().contains("outside pinholes.ct_mark_mask"),
            "{e}"
        );
        let e = parse("[proxy]\nmode = \"gateway\"\n[log]\nlevel = \"ftp_alg=[\"\n").unwrap_err();
        assert!(e.to_string().contains("log.level"), "{e}");
    }

    #[test]
    fn upstream_source_takes_one_unicast_address_per_family() {
        let gw = "[proxy]\nmode = \"gateway\"\n";
        let c = parse(&format!(
            "{gw}upstream_source = [\"203.0.113.254\", \"2001:db8:b::fe\"]\n"
        ))
        .unwrap();
        assert_eq!(c.proxy.upstream_source.len(), 2);
        for bad in [
            "[\"203.0.113.254\", \"203.0.113.253\"]",
            "[\"0.0.0.0\"]",
            "[\"ff02::1\"]",
        ] {
            let e = parse(&format!("{gw}upstream_source = {bad}\n")).unwrap_err();
            assert!(
                e.to_string().contains("proxy.upstream_source"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn pinhole_backend_is_netlink_or_nft() {
        let c = parse("[proxy]\nmode = \"gateway\"\n[pinholes]\nbackend = \"nft\"\n").unwrap();
        assert_eq!(c.pinholes.backend, PinholeBackend::Nft);
        let e =
            parse("[proxy]\nmode = \"gateway\"\n[pinholes]\nbackend = \"iptables\"\n").unwrap_err();
        assert!(e.to_string().contains("netlink"), "{e}");
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let e = parse("[proxy]\nmode = \"gateway\"\nlisten_on = []\n").unwrap_err();
        assert!(e.to_string().contains("listen_on"), "{e}");
    }

    #[test]
    fn reverse_needs_upstream() {
        let e = parse("[proxy]\nmode = \"reverse\"\n").unwrap_err();
        assert!(e.to_string().contains("upstream"), "{e}");
    }

    #[test]
    fn privileged_port_range_is_rejected() {
        let e = parse("[proxy]\nmode = \"gateway\"\n[pinholes]\nport_min = 20\n").unwrap_err();
        assert!(e.to_string().contains("below 1024"), "{e}");
    }

    #[test]
    fn port_wait_is_bounded() {
        let c = parse(
            "[proxy]\nmode = \"gateway\"\n[pinholes]\ntimeout_secs = 300\nreuse_delay_secs = 0\n",
        )
        .unwrap();
        assert_eq!(c.pinholes.port_wait_ms, DEFAULT_PORT_WAIT_MS);
        let e =
            parse("[proxy]\nmode = \"gateway\"\n[pinholes]\nport_wait_ms = 60000\n").unwrap_err();
        assert!(e.to_string().contains("port_wait_ms"), "{e}");
    }

    #[test]
    fn limits_are_checked_together() {
        let e = parse("[proxy]\nmode = \"gateway\"\n[limits]\nmax_sessions = 4\nmax_sessions_per_client = 0\n")
            .unwrap_err();
        assert!(e.to_string().contains("max_sessions_per_client"), "{e}");
        // The per-client default is above a small total: the total caps it, no error.
        parse("[proxy]\nmode = \"gateway\"\n[limits]\nmax_sessions = 4\n").unwrap();
        let c = parse(
            "[proxy]\nmode = \"gateway\"\n[policy]\ndata_before_login = true\n\
             foreign_port = \"replace\"\nauth = \"transparent\"\ndeny_commands = [\"site\"]\n",
        )
        .unwrap();
        assert!(c.policy.data_before_login);
        assert_eq!(c.policy.foreign_port, ForeignPort::Replace);
        assert_eq!(c.policy.auth, AuthPolicy::Transparent);
        let e = parse("[proxy]\nmode = \"gateway\"\n[policy]\ndeny_commands = [\"RM -RF\"]\n")
            .unwrap_err();
        assert!(e.to_string().contains("deny_commands"), "{e}");
        assert_eq!(c.limits.max_sessions, DEFAULT_MAX_SESSIONS);
        for idle in ["0", "604801", "9223372036854775807"] {
            let text =
                format!("[proxy]\nmode = \"gateway\"\n[limits]\nidle_timeout_secs = {idle}\n");
            let e = parse(&text).unwrap_err();
            assert!(e.to_string().contains("idle_timeout_secs"), "{idle}: {e}");
        }
    }

    #[test]
    fn a_tls_window_needs_a_gateway_that_passes_auth() {
        let c = parse(
            "[proxy]\nmode = \"gateway\"\n[policy]\nauth = \"transparent\"\ntls_window = true\n",
        )
        .unwrap();
        assert!(c.policy.tls_window);
        assert_eq!(
            c.limits.max_windows_per_client,
            DEFAULT_MAX_WINDOWS_PER_CLIENT
        );
        for text in [
            "[proxy]\nmode = \"gateway\"\n[policy]\ntls_window = true\n",
            "[proxy]\nmode = \"reverse\"\nupstream = \"203.0.113.2:21\"\n[policy]\nauth = \"transparent\"\ntls_window = true\n",
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.to_string().contains("policy.tls_window is for gateway mode"), "{e}");
        }
        let e = parse("[proxy]\nmode = \"gateway\"\n[limits]\nmax_windows_per_client = 0\n")
            .unwrap_err();
        assert!(e.to_string().contains("max_windows_per_client"), "{e}");
    }

    #[test]
    fn networks_allow_then_deny() {
        let c = parse(
            "[proxy]\nmode = \"gateway\"\n[policy]\nallow_clients = [\"198.18.0.0/24\"]\n\
             deny_clients = [\"198.18.0.66/32\"]\ndeny_servers = [\"2001:db8::/32\"]\n",
        )
        .unwrap();
        let p = &c.policy;
        assert!(p.client_allowed("198.18.0.2".parse().unwrap()));
        assert!(p.client_allowed("::ffff:198.18.0.2".parse().unwrap()));
        assert!(!p.client_allowed("198.18.0.66".parse().unwrap()));
        assert!(!p.client_allowed("198.18.1.2".parse().unwrap()));
        assert!(p.server_allowed("203.0.113.2".parse().unwrap()));
        assert!(!p.server_allowed("2001:db8::2".parse().unwrap()));
        let e =
            parse("[proxy]\nmode = \"gateway\"\n[policy]\nallow_clients = [\"198.18.0.0/33\"]\n")
                .unwrap_err();
        assert!(e.to_string().contains("allow_clients"), "{e}");
    }

    #[test]
    fn builtin_default_is_valid() {
        Config::builtin_gateway().validate().unwrap();
    }

    const K8S_SIDECAR: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/k8s/vsftpd-sidecar.yaml"
    );

    /// The ftp-alg TOML embedded in the k8s manifest's ConfigMap: the lines from `# BEGIN
    /// ftp-alg.toml` to `# END ftp-alg.toml` of a YAML block scalar, without their indentation,
    /// with the pod address the container fills in at start (`@POD_IP@`) set to an example.
    /// Read without a YAML parser: the markers delimit it.
    fn k8s_embedded_config(yaml: &str) -> String {
        let lines: Vec<&str> = yaml.lines().collect();
        let begin = lines
            .iter()
            .position(|l| l.trim() == "# BEGIN ftp-alg.toml")
            .expect("BEGIN marker");
        let end = lines
            .iter()
            .position(|l| l.trim() == "# END ftp-alg.toml")
            .expect("END marker");
        let indent = lines[begin].len() - lines[begin].trim_start().len();
        lines[begin..=end]
            .iter()
            .map(|l| {
                assert!(
                    l.trim().is_empty() || l[..indent].trim().is_empty(),
                    "line {l:?} leaves the block scalar"
                );
                format!("{}\n", l.get(indent..).unwrap_or(""))
            })
            .collect::<String>()
            .replace("@POD_IP@", "10.244.1.7")
    }

    /// The YAML document (between `---` lines) whose top-level `kind` is `kind`.
    fn k8s_document<'a>(yaml: &'a str, kind: &str) -> &'a str {
        yaml.split("\n---\n")
            .find(|doc| doc.lines().any(|l| l == format!("kind: {kind}")))
            .unwrap_or_else(|| panic!("no {kind} in {K8S_SIDECAR}"))
    }

    /// Every `key: NUMBER` in `text`, in order, whether in block or flow style.
    fn numbers_after(text: &str, key: &str) -> Vec<u16> {
        let pattern = format!("{key}: ");
        let mut found = Vec::new();
        for (i, _) in text.match_indices(&pattern) {
            // Only whole keys: `port:` must not match inside `targetPort:` or `endPort:`.
            let before = text[..i].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric()) {
                continue;
            }
            let digits: String = text[i + pattern.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            found.push(
                digits
                    .parse()
                    .unwrap_or_else(|_| panic!("{key}: {digits:?}")),
            );
        }
        found
    }

    #[test]
    fn shipped_examples_parse() {
        for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            }
        }
        let yaml = std::fs::read_to_string(K8S_SIDECAR).unwrap();
        let c = Config::from_toml(&k8s_embedded_config(&yaml), Path::new(K8S_SIDECAR))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.proxy.mode, Mode::Reverse);
        assert_eq!(c.proxy.upstream, Some("10.244.1.7:2100".parse().unwrap()));
    }

    /// The manifest runs the image tag the sidecar guide builds and pushes: this version's.
    #[test]
    fn k8s_image_tag_is_pinned_to_the_guides() {
        let yaml = std::fs::read_to_string(K8S_SIDECAR).unwrap();
        let guide =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/sidecar.md"))
                .unwrap();
        let image = format!("registry.example.com/ftp-alg:{}", env!("CARGO_PKG_VERSION"));
        assert!(
            yaml.contains(&format!("image: {image}\n")),
            "the manifest runs {image}"
        );
        assert!(
            guide.contains(&format!("-t {image} ")),
            "the guide builds {image}"
        );
        assert!(!yaml.contains(":latest"), "no :latest in the manifest");
    }

    /// A Service cannot take a port range: it must list port 21 and every pinhole port of the
    /// embedded configuration, each to the same target port (clients dial the number the 227
    /// names), and the NetworkPolicy must admit the same range, and the metrics port.
    #[test]
    fn k8s_service_matches_embedded_config() {
        let yaml = std::fs::read_to_string(K8S_SIDECAR).unwrap();
        let c = Config::from_toml(&k8s_embedded_config(&yaml), Path::new(K8S_SIDECAR)).unwrap();
        let range: Vec<u16> = (c.pinholes.port_min..=c.pinholes.port_max).collect();
        let listen: Vec<u16> = c.proxy.listen.iter().map(|a| a.port()).collect();
        assert_eq!(listen, [21]);

        let service = k8s_document(&yaml, "Service");
        let ports = numbers_after(service, "port");
        assert_eq!(
            ports,
            numbers_after(service, "targetPort"),
            "port != targetPort"
        );
        let expected: Vec<u16> = listen.iter().chain(&range).copied().collect();
        assert_eq!(
            ports, expected,
            "Service ports vs listen port and pinhole range"
        );

        let policy = k8s_document(&yaml, "NetworkPolicy");
        // The metrics port is admitted from the monitoring namespace only, in a rule of its
        // own after the FTP one.
        let metrics = c.metrics.listen.map(|a| a.port()).expect("metrics.listen");
        assert_eq!(
            numbers_after(policy, "port"),
            [21, c.pinholes.port_min, metrics]
        );
        assert_eq!(numbers_after(policy, "endPort"), [c.pinholes.port_max]);

        // vsftpd listens where ftp-alg connects, and its passive ports stay out of the range.
        let upstream = c.proxy.upstream.unwrap().port();
        let vsftpd = |key: &str| -> u16 {
            let line = yaml
                .lines()
                .find_map(|l| l.trim().strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("vsftpd.conf has no {key}"));
            line.parse().unwrap()
        };
        assert_eq!(vsftpd("listen_port"), upstream);
        let pasv = vsftpd("pasv_min_port")..=vsftpd("pasv_max_port");
        assert!(!range.iter().any(|p| pasv.contains(p)));
    }

    /// A reverse config with `[tls]` and the given extra `[tls]` lines.
    fn with_upstream(lines: &str) -> Result<Config, ConfigError> {
        parse(&format!(
            "[proxy]\nmode = \"reverse\"\nupstream = \"192.0.2.1:21\"\n\
             [tls]\ncertificate = \"c.pem\"\nkey = \"k.pem\"\n{lines}"
        ))
    }

    const PIN: &str = "sha256:00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";

    #[test]
    fn upstream_tls_takes_exactly_one_way_to_verify() {
        let tls = |c: Config| c.tls.unwrap();
        let plain = tls(with_upstream("").unwrap());
        assert_eq!(plain.upstream, UpstreamProtocol::Plain);
        assert_eq!(plain.upstream_trust(), Ok(None));
        let ca = tls(with_upstream("upstream = \"tls\"\nupstream_ca = \"ca.pem\"\n").unwrap());
        assert_eq!(
            ca.upstream_trust(),
            Ok(Some(UpstreamTrust::Ca("ca.pem".into())))
        );
        let pinned = tls(with_upstream(&format!(
            "upstream = \"tls\"\nupstream_pin = \"{PIN}\"\nupstream_name = \"ftp.example.org\"\n"
        ))
        .unwrap());
        let Ok(Some(UpstreamTrust::Pin(pin))) = pinned.upstream_trust() else {
            panic!("{:?}", pinned.upstream_trust());
        };
        assert_eq!((pin[0], pin[1], pin[31]), (0x00, 0x11, 0xff));
        // openssl's colon-separated form is the same pin.
        let colons = PIN
            .strip_prefix("sha256:")
            .unwrap()
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_pin(&format!("sha256:{colons}")), Ok(pin));
    }

    #[test]
    fn every_bad_upstream_combination_is_named() {
        for (lines, message) in [
            ("upstream = \"tls\"\n", "needs tls.upstream_ca"),
            (
                &format!(
                    "upstream = \"tls\"\nupstream_ca = \"ca.pem\"\nupstream_pin = \"{PIN}\"\n"
                ),
                "exactly one, not both",
            ),
            (
                "upstream_ca = \"ca.pem\"\n",
                "are for tls.upstream = \"tls\"",
            ),
            (
                &format!("upstream_pin = \"{PIN}\"\n"),
                "are for tls.upstream = \"tls\"",
            ),
            (
                "upstream_name = \"ftp.example.org\"\n",
                "are for tls.upstream = \"tls\"",
            ),
            (
                "upstream = \"tls\"\nupstream_pin = \"00112233\"\n",
                "expected \"sha256:\"",
            ),
            (
                "upstream = \"tls\"\nupstream_pin = \"sha256:0011\"\n",
                "expected \"sha256:\"",
            ),
            (
                &format!(
                    "upstream = \"tls\"\nupstream_pin = \"{}\"\n",
                    PIN.replace('0', "g")
                ),
                "expected \"sha256:\"",
            ),
            (
                "upstream = \"tls\"\nupstream_ca = \"ca.pem\"\nupstream_name = \"not a name\"\n",
                "neither a DNS name nor an IP address",
            ),
            ("upstream = \"starttls\"\n", "unknown variant"),
        ] {
            let e = with_upstream(lines).unwrap_err().to_string();
            assert!(e.contains(message), "{lines}: {e}");
        }
    }
}
