//! The daemon's counters, and their Prometheus text exposition (format 0.0.4) over HTTP when
//! `[metrics] listen` is set.
//!
//! Counters are plain atomics bumped by the proxy; gauges (sessions, open pinholes) are read
//! at scrape time from their owners and passed to [`Metrics::render`], so they cannot drift.
//! The exposition and its tiny HTTP responder are written here rather than taken from a crate:
//! the families are few and fixed, and `prometheus-client` (OpenMetrics naming) would not let the
//! gauge `ftp_alg_sessions` sit beside the counter `ftp_alg_sessions_total`. Metric names are
//! documented in README.md; `deploy/prometheus/` has alert rules built on them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::LimitsConfig;
use crate::pinhole::PinholeStats;
use crate::session::{Reject, Rewrite};
use crate::tls::DataRefusal;

/// Upper bounds of the install-latency histogram's buckets, in seconds.
const INSTALL_BUCKETS: [f64; 13] = [
    0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
/// A scrape request larger than this is not HTTP we want to read.
const MAX_REQUEST: usize = 8192;
/// How long one scrape may take, request and answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; more connections are closed at once.
const MAX_SCRAPES: usize = 8;

/// Why a session was refused before it started, beside the session core's [`Reject`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// `limits.max_sessions` or `limits.max_sessions_per_client` was reached.
    SessionLimit,
    /// `policy.allow_*`/`deny_*` refused the client or the server.
    NetworkDenied,
}

impl Admission {
    const ALL: [Admission; 2] = [Admission::SessionLimit, Admission::NetworkDenied];

    fn as_str(self) -> &'static str {
        match self {
            Admission::SessionLimit => "session_limit",
            Admission::NetworkDenied => "network_denied",
        }
    }
}

/// Why a pinhole could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinholeFailure {
    /// Every port of `pinholes.port_min..=port_max` still waited for a connection from that
    /// source after `pinholes.port_wait_ms`.
    PortsExhausted,
    /// The firewall backend refused or failed.
    Firewall,
}

impl PinholeFailure {
    const ALL: [PinholeFailure; 2] = [PinholeFailure::PortsExhausted, PinholeFailure::Firewall];

    fn as_str(self) -> &'static str {
        match self {
            PinholeFailure::PortsExhausted => "ports_exhausted",
            PinholeFailure::Firewall => "firewall",
        }
    }
}

/// Values owned elsewhere, read when the metrics are rendered.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Sessions open now.
    pub sessions: usize,
    /// Sessions admitted since start.
    pub sessions_total: u64,
    /// Pinholes counted by the pinhole registry.
    pub pinholes: PinholeStats,
    /// The limits in force (a reload may change them).
    pub limits: LimitsConfig,
    /// `pinholes.port_min..=port_max`.
    pub pool: (u16, u16),
    /// Ports of the pool handed out now.
    pub ports_in_use: usize,
}

/// Every counter of one daemon run.
#[derive(Debug, Default)]
pub struct Metrics {
    rewrites: [AtomicU64; Rewrite::ALL.len()],
    refusals: [AtomicU64; Reject::ALL.len()],
    admission_refusals: [AtomicU64; Admission::ALL.len()],
    pinhole_failures: [AtomicU64; PinholeFailure::ALL.len()],
    upstream_connect_failures: AtomicU64,
    table_reloads: AtomicU64,
    pinholes_lost: AtomicU64,
    install: Histogram,
    tls_data_connections: AtomicU64,
    tls_data_refusals: [AtomicU64; DataRefusal::ALL.len()],
    /// Bytes relayed on `PROT P` data connections: towards the client, towards the server.
    tls_relay_bytes: [AtomicU64; 2],
}

impl Metrics {
    /// The session core rewrote an announcement.
    pub fn rewrote(&self, kind: Rewrite) {
        bump(&self.rewrites, Rewrite::ALL.iter().position(|k| *k == kind));
    }

    /// A `PROT P` data connection passed its checks and is relayed.
    pub fn tls_data_connection(&self) {
        self.tls_data_connections.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes of a `PROT P` data connection relayed, towards the client or the server; counted
    /// as they pass, so a long transfer shows in every scrape.
    pub fn relayed(&self, to_client: bool, bytes: u64) {
        let index = if to_client { 0 } else { 1 };
        self.tls_relay_bytes[index].fetch_add(bytes, Ordering::Relaxed);
    }

    /// A `PROT P` data connection was refused.
    pub fn tls_data_refused(&self, why: DataRefusal) {
        bump(
            &self.tls_data_refusals,
            DataRefusal::ALL.iter().position(|r| *r == why),
        );
    }

    /// The session core refused a command or reply.
    pub fn refused(&self, reason: Reject) {
        bump(
            &self.refusals,
            Reject::ALL.iter().position(|r| *r == reason),
        );
    }

    /// A session was refused before it started.
    pub fn refused_session(&self, why: Admission) {
        bump(
            &self.admission_refusals,
            Admission::ALL.iter().position(|a| *a == why),
        );
    }

    /// A pinhole could not be opened.
    pub fn pinhole_failed(&self, why: PinholeFailure) {
        bump(
            &self.pinhole_failures,
            PinholeFailure::ALL.iter().position(|f| *f == why),
        );
    }

    /// The upstream server could not be reached.
    pub fn upstream_connect_failed(&self) {
        self.upstream_connect_failures
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The table was loaded again after it was deleted or changed under the daemon, losing
    /// `lost` open pinholes.
    pub fn table_reloaded(&self, lost: u64) {
        self.table_reloads.fetch_add(1, Ordering::Relaxed);
        self.pinholes_lost.fetch_add(lost, Ordering::Relaxed);
    }

    /// A pinhole was installed in this long.
    pub fn installed_in(&self, took: Duration) {
        self.install.observe(took);
    }

    /// The text exposition of every metric.
    pub fn render(&self, gauges: Gauges) -> String {
        let mut out = String::new();
        let p = gauges.pinholes;
        family(
            &mut out,
            "ftp_alg_build_info",
            "gauge",
            "Always 1; the version of the running ftp-alg in its label.",
        );
        let version = format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
        sample(&mut out, "ftp_alg_build_info", &version, 1);
        family(
            &mut out,
            "ftp_alg_limit",
            "gauge",
            "The configured limits in force ([limits], as last reloaded).",
        );
        let l = &gauges.limits;
        for (name, value) in [
            ("max_sessions", l.max_sessions as u64),
            ("max_sessions_per_client", l.max_sessions_per_client as u64),
            (
                "max_pinholes_per_session",
                l.max_pinholes_per_session as u64,
            ),
            ("idle_timeout_seconds", l.idle_timeout_secs),
            ("shutdown_grace_seconds", l.shutdown_grace_secs),
            ("handover_grace_seconds", l.handover_grace_secs),
        ] {
            let labels = format!("{{limit=\"{name}\"}}");
            sample(&mut out, "ftp_alg_limit", &labels, value);
        }
        let (min, max) = gauges.pool;
        let size = u64::from(max.saturating_sub(min)) + 1;
        let pool = format!("{{pool=\"{min}-{max}\"}}");
        family(
            &mut out,
            "ftp_alg_ports",
            "gauge",
            "Data ports in the pool (pinholes.port_min..=port_max).",
        );
        sample(&mut out, "ftp_alg_ports", &pool, size);
        family(
            &mut out,
            "ftp_alg_ports_free",
            "gauge",
            "Data ports of the pool on which no peer's pinhole waits now (ports are shared: a port with a waiting pinhole is still free for every other peer).",
        );
        sample(
            &mut out,
            "ftp_alg_ports_free",
            &pool,
            size.saturating_sub(gauges.ports_in_use as u64),
        );
        family(
            &mut out,
            "ftp_alg_sessions",
            "gauge",
            "Control sessions open now.",
        );
        sample(&mut out, "ftp_alg_sessions", "", gauges.sessions as u64);
        family(
            &mut out,
            "ftp_alg_sessions_total",
            "counter",
            "Control sessions admitted since start.",
        );
        sample(
            &mut out,
            "ftp_alg_sessions_total",
            "",
            gauges.sessions_total,
        );
        family(
            &mut out,
            "ftp_alg_pinholes_open",
            "gauge",
            "Pinholes the daemon holds open now.",
        );
        sample(&mut out, "ftp_alg_pinholes_open", "", p.open);
        family(
            &mut out,
            "ftp_alg_windows_open",
            "gauge",
            "Windows (policy.tls_window) open now: one per TLS session on a gateway.",
        );
        sample(&mut out, "ftp_alg_windows_open", "", p.windows_open);
        for (name, help, value) in [
            (
                "ftp_alg_pinholes_opened_total",
                "Pinholes installed since start.",
                p.opened,
            ),
            (
                "ftp_alg_pinholes_closed_total",
                "Pinholes removed by the daemon before their kernel timeout.",
                p.closed,
            ),
            (
                "ftp_alg_pinholes_expired_total",
                "Pinholes whose kernel timeout ran out before the daemon removed them.",
                p.expired,
            ),
            (
                "ftp_alg_windows_opened_total",
                "Windows (policy.tls_window) installed since start.",
                p.windows_opened,
            ),
            (
                "ftp_alg_windows_refused_total",
                "Windows refused since start (limits.max_windows_per_client, or a firewall error); each ended its session.",
                p.windows_refused,
            ),
            (
                "ftp_alg_port_waits_total",
                "Announcements that waited for a port: every port already waited for a connection from the same peer.",
                p.waited,
            ),
        ] {
            family(&mut out, name, "counter", help);
            sample(&mut out, name, "", value);
        }
        labelled(
            &mut out,
            "ftp_alg_rewrites_total",
            "Announcements rewritten, by kind.",
            "kind",
            Rewrite::ALL.iter().map(|k| k.as_str()).zip(&self.rewrites),
        );
        family(
            &mut out,
            "ftp_alg_refusals_total",
            "counter",
            "Commands, replies and sessions refused, by reason.",
        );
        let reasons = Reject::ALL
            .iter()
            .map(|r| r.as_str())
            .zip(&self.refusals)
            .chain(
                Admission::ALL
                    .iter()
                    .map(|a| a.as_str())
                    .zip(&self.admission_refusals),
            );
        for (reason, value) in reasons {
            let labels = format!("{{reason=\"{reason}\"}}");
            sample(&mut out, "ftp_alg_refusals_total", &labels, load(value));
        }
        labelled(
            &mut out,
            "ftp_alg_pinhole_failures_total",
            "Pinholes that could not be opened, by cause.",
            "cause",
            PinholeFailure::ALL
                .iter()
                .map(|f| f.as_str())
                .zip(&self.pinhole_failures),
        );
        counter(
            &mut out,
            "ftp_alg_upstream_connect_failures_total",
            "Connections to the FTP server that failed, timed out or could not be secured.",
            &self.upstream_connect_failures,
        );
        counter(
            &mut out,
            "ftp_alg_table_reloads_total",
            "Times ftp-alg's table was loaded again after it was deleted or changed under it.",
            &self.table_reloads,
        );
        counter(
            &mut out,
            "ftp_alg_pinholes_lost_total",
            "Open pinholes lost when the table was deleted or changed under ftp-alg.",
            &self.pinholes_lost,
        );
        counter(
            &mut out,
            "ftp_alg_tls_data_connections_total",
            "PROT P data connections relayed (TLS towards the client, ended by ftp-alg).",
            &self.tls_data_connections,
        );
        labelled(
            &mut out,
            "ftp_alg_tls_data_refusals_total",
            "PROT P data connections refused, by reason (not_resumed: the handshake did not resume the control connection's TLS session).",
            "reason",
            DataRefusal::ALL
                .iter()
                .map(|r| r.as_str())
                .zip(&self.tls_data_refusals),
        );
        labelled(
            &mut out,
            "ftp_alg_tls_relay_bytes_total",
            "Bytes of PROT P data relayed in user space, by direction.",
            "direction",
            ["to_client", "to_server"]
                .into_iter()
                .zip(&self.tls_relay_bytes),
        );
        self.install.render(
            &mut out,
            "ftp_alg_nft_install_seconds",
            "Time from a pinhole request to the pinhole being in the kernel.",
        );
        out
    }
}

fn bump(counters: &[AtomicU64], index: Option<usize>) {
    if let Some(counter) = index.and_then(|i| counters.get(i)) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &str, value: u64) {
    let _ = writeln!(out, "{name}{labels} {value}");
}

fn counter(out: &mut String, name: &str, help: &str, value: &AtomicU64) {
    family(out, name, "counter", help);
    sample(out, name, "", load(value));
}

fn labelled<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: impl Iterator<Item = (&'a str, &'a AtomicU64)>,
) {
    family(out, name, "counter", help);
    for (value_label, value) in values {
        sample(
            out,
            name,
            &format!("{{{label}=\"{value_label}\"}}"),
            load(value),
        );
    }
}

/// A fixed-bucket histogram of durations.
#[derive(Debug, Default)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last slot is above every bound.
    buckets: [AtomicU64; INSTALL_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let index = INSTALL_BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(INSTALL_BUCKETS.len());
        bump(&self.buckets, Some(index));
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        family(out, name, "histogram", help);
        let mut cumulative = 0;
        let bounds = INSTALL_BUCKETS.iter().map(f64::to_string);
        for (bound, count) in bounds.chain(["+Inf".to_owned()]).zip(&self.buckets) {
            cumulative += load(count);
            let labels = format!("{{le=\"{bound}\"}}");
            sample(out, &format!("{name}_bucket"), &labels, cumulative);
        }
        let sum = Duration::from_nanos(load(&self.sum_nanos)).as_secs_f64();
        let _ = writeln!(out, "{name}_sum {sum}");
        sample(out, &format!("{name}_count"), "", load(&self.count));
    }
}

/// Serve `GET /metrics` on `listener` until the task is dropped; `gauges` reads the gauges
/// at each scrape. At most `MAX_SCRAPES` (8) connections are served at once and each within
/// `REQUEST_TIMEOUT` (5 s): the listener may be reachable from the network, and its connections
/// share the daemon's file descriptors with the FTP sessions.
pub async fn serve(
    listener: TcpListener,
    metrics: std::sync::Arc<Metrics>,
    gauges: impl Fn() -> Gauges + Send + Sync + 'static,
) {
    let gauges = std::sync::Arc::new(gauges);
    let scrapes = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let (stream, peer) = crate::accept::next("metrics listener", || listener.accept()).await;
        let Ok(permit) = scrapes.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: too many scrapes at once; closed");
            continue;
        };
        let metrics = metrics.clone();
        let gauges = gauges.clone();
        tokio::spawn(async move {
            let exchange = answer(stream, &metrics, &*gauges);
            match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics request failed"),
                Err(_) => tracing::debug!(%peer, "metrics request timed out"),
            }
            drop(permit);
        });
    }
}

/// Read one HTTP request and answer it: the exposition for `GET /metrics`, 404 otherwise.
async fn answer(
    mut stream: TcpStream,
    metrics: &Metrics,
    gauges: &(dyn Fn() -> Gauges + Sync),
) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let target = request.split(|b| *b == b' ').take(2).collect::<Vec<_>>();
    let (status, content_type, body) = match target.as_slice() {
        [b"GET", path] if path.split(|b| *b == b'?').next() == Some(b"/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(gauges()),
        ),
        _ => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "ftp-alg serves GET /metrics only\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family_with_its_values() {
        let m = Metrics::default();
        m.rewrote(Rewrite::Epsv);
        m.refused(Reject::ThirdPartyAddress);
        m.refused_session(Admission::SessionLimit);
        m.pinhole_failed(PinholeFailure::PortsExhausted);
        m.upstream_connect_failed();
        m.installed_in(Duration::from_micros(150));
        m.table_reloaded(3);
        m.installed_in(Duration::from_secs(3));
        let text = m.render(Gauges {
            sessions: 2,
            sessions_total: 1,
            pinholes: PinholeStats {
                open: 1,
                opened: 5,
                closed: 3,
                expired: 1,
                waited: 2,
                windows_open: 4,
                windows_opened: 6,
                windows_refused: 1,
            },
            limits: LimitsConfig::default(),
            pool: (61000, 61009),
            ports_in_use: 3,
        });
        for line in [
            &format!(
                "ftp_alg_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
            "ftp_alg_limit{limit=\"max_sessions\"} 1000",
            "ftp_alg_limit{limit=\"max_sessions_per_client\"} 256",
            "ftp_alg_limit{limit=\"idle_timeout_seconds\"} 900",
            "ftp_alg_ports{pool=\"61000-61009\"} 10",
            "ftp_alg_ports_free{pool=\"61000-61009\"} 7",
            "# TYPE ftp_alg_sessions gauge",
            "ftp_alg_sessions 2",
            "ftp_alg_sessions_total 1",
            "ftp_alg_pinholes_open 1",
            "ftp_alg_pinholes_opened_total 5",
            "ftp_alg_pinholes_closed_total 3",
            "ftp_alg_pinholes_expired_total 1",
            "ftp_alg_port_waits_total 2",
            "# TYPE ftp_alg_windows_open gauge",
            "ftp_alg_windows_open 4",
            "ftp_alg_windows_opened_total 6",
            "ftp_alg_windows_refused_total 1",
            "ftp_alg_rewrites_total{kind=\"epsv\"} 1",
            "ftp_alg_rewrites_total{kind=\"port\"} 0",
            "ftp_alg_refusals_total{reason=\"third_party_address\"} 1",
            "ftp_alg_refusals_total{reason=\"session_limit\"} 1",
            "ftp_alg_pinhole_failures_total{cause=\"ports_exhausted\"} 1",
            "ftp_alg_upstream_connect_failures_total 1",
            "ftp_alg_table_reloads_total 1",
            "ftp_alg_pinholes_lost_total 3",
            "# TYPE ftp_alg_nft_install_seconds histogram",
            "ftp_alg_nft_install_seconds_bucket{le=\"0.0001\"} 0",
            "ftp_alg_nft_install_seconds_bucket{le=\"0.0002\"} 1",
            "ftp_alg_nft_install_seconds_bucket{le=\"1\"} 1",
            "ftp_alg_nft_install_seconds_bucket{le=\"+Inf\"} 2",
            "ftp_alg_nft_install_seconds_sum 3.00015",
            "ftp_alg_nft_install_seconds_count 2",
        ]
        .map(|l| l as &str)
        {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
        // Every sample belongs to a family declared once.
        let mut types = std::collections::HashSet::new();
        for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            assert!(types.insert(l.to_owned()), "declared twice: {l}");
        }
    }

    /// The names of every series the daemon exports (histograms with their `_bucket`, `_sum`
    /// and `_count`).
    fn exported_names() -> std::collections::BTreeSet<String> {
        Metrics::default()
            .render(Gauges::default())
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect()
    }

    /// Every `ftp_alg_*` name in `text`.
    fn named_metrics(text: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("ftp_alg_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.push(name);
        }
        names
    }

    /// Every string under an `expr` or `query` key of a Grafana dashboard.
    fn dashboard_queries(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr" | "query" | "definition", serde_json::Value::String(q)) => {
                            out.push(q.clone())
                        }
                        _ => dashboard_queries(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
            _ => {}
        }
    }

    /// What deploy/ ships for Prometheus and Grafana names only metrics the daemon exports
    /// (scripts/check-deploy runs this test beside promtool).
    #[test]
    fn deploy_queries_name_only_exported_metrics() {
        let exported = exported_names();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
        let read = |path: &str| {
            std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        let dashboard: serde_json::Value =
            serde_json::from_str(&read("grafana/ftp-alg-dashboard.json")).expect("dashboard JSON");
        let mut queries = Vec::new();
        dashboard_queries(&dashboard, &mut queries);
        assert!(queries.len() >= 10, "the dashboard's queries: {queries:?}");
        for query in &queries {
            let names = named_metrics(query);
            assert!(
                !names.is_empty(),
                "a dashboard query names no ftp-alg metric: {query}"
            );
            for name in names {
                assert!(
                    exported.contains(&name),
                    "dashboard: {name} is not exported ({query})"
                );
            }
        }
        for file in [
            "prometheus/ftp-alg-alerts.yml",
            "prometheus/ftp-alg-alerts.test.yml",
        ] {
            for name in named_metrics(&read(file)) {
                assert!(exported.contains(&name), "{file}: {name} is not exported");
            }
        }
    }

    #[tokio::test]
    async fn http_answers_metrics_and_404() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = std::sync::Arc::new(Metrics::default());
        let server = tokio::spawn(serve(listener, metrics, Gauges::default));
        for (request, status) in [
            (
                "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                "HTTP/1.1 200 OK",
            ),
            ("GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
            ("garbage\r\n\r\n", "HTTP/1.1 404 Not Found"),
        ] {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            assert!(response.starts_with(status), "{request:?}: {response}");
        }
        server.abort();
    }
}
