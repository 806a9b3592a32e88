//! What `sniff` prints for each announcement: which pinhole, if any, lets its data connection
//! through, as one human line or one JSON object; and for each control connection that starts
//! TLS, a line that says its announcements can no longer be read ([`TlsReport`]).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use chrono::{DateTime, Local, SecondsFormat, Utc};
use serde::{Serialize, Serializer};

use crate::pinhole::{PinholeEntry, PinholeState};

use super::flows::{Announcement, Flow, Kind};

/// What the line says when no pinhole matches.
pub const NO_PINHOLE: &str = "no pinhole: in a default-deny firewall this data connection will \
                              be dropped; is this session going through ftp-alg?";

/// Whether `entry` is the pinhole for `announcement`'s data connection. Three things must
/// agree, in the addresses seen on the captured side of ftp-alg:
/// - the endpoint: what the data connection dials (`dial`), or where the pinhole sends it
///   (`maps_to`). A client behind a gateway announces its own address in PORT, which the
///   pinhole maps to; the server on the other side sees the rewritten PORT, which the pinhole
///   is dialled at.
/// - who dials it: the server for a PORT or EPRT, the client for a 227 or 229. That is the
///   pinhole's `source`, or, on the far side of ftp-alg, the address the pinhole gives it
///   (`snat`). Public ports are shared by peers, so another client's pinhole can wait at the
///   very endpoint this announcement names, and it would not let this data connection in.
/// - the control connection, when the pinhole carries ftp-alg's label: its client or its server
///   is this connection's (the other end is ftp-alg itself when the capture is on the far side).
pub fn matches(entry: &PinholeEntry, announcement: &Announcement) -> bool {
    let same_ip = |a: IpAddr, b: IpAddr| a.to_canonical() == b.to_canonical();
    let endpoint = announcement.endpoint;
    let same = |a: SocketAddr| same_ip(a.ip(), endpoint.ip()) && a.port() == endpoint.port();
    let flow = &announcement.flow;
    let dialler = match announcement.kind {
        Kind::Port | Kind::Eprt => flow.server.ip(),
        Kind::Pasv | Kind::Epsv => flow.client.ip(),
    };
    let dials = same_ip(entry.source, dialler) || entry.snat.is_some_and(|s| same_ip(s, dialler));
    let session = match (entry.client, entry.server) {
        (Some(client), Some(server)) => {
            same_ip(client, flow.client.ip()) || same_ip(server, flow.server.ip())
        }
        _ => true,
    };
    (same(entry.dial) || entry.maps_to.is_some_and(same)) && dials && session
}

/// One printed announcement.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When its segment was captured (RFC 3339, UTC, in JSON).
    #[serde(serialize_with = "rfc3339")]
    pub time: DateTime<Utc>,
    /// The control connection's client.
    pub client: SocketAddr,
    /// The control connection's server.
    pub server: SocketAddr,
    /// PORT, EPRT, 227 or 229.
    pub kind: Kind,
    /// The endpoint announced.
    pub endpoint: SocketAddr,
    /// The pinhole that matches it, as last seen in the kernel (listed, or reported added);
    /// `null` when none does.
    pub pinhole: Option<PinholeEntry>,
}

/// A control connection that started TLS.
#[derive(Debug, Clone, Serialize)]
pub struct TlsReport {
    /// When it was seen (RFC 3339, UTC, in JSON).
    #[serde(serialize_with = "rfc3339")]
    pub time: DateTime<Utc>,
    /// The control connection's client.
    pub client: SocketAddr,
    /// The control connection's server.
    pub server: SocketAddr,
    /// Always `"started"`.
    pub tls: &'static str,
}

/// What the TLS line says after the connection.
pub const TLS_STARTED: &str = "TLS started: this connection's announcements are encrypted and                                cannot be checked here (ftp-alg with [tls] ends TLS itself and                                still opens pinholes; docs/ftps.md)";

impl TlsReport {
    /// A report of `flow` starting TLS at `time`.
    pub fn new(time: DateTime<Utc>, flow: Flow) -> TlsReport {
        TlsReport {
            time,
            client: flow.client,
            server: flow.server,
            tls: "started",
        }
    }

    /// The human line: local time, control connection, the note.
    pub fn human(&self) -> String {
        format!(
            "{}  {} → {}  TLS   {TLS_STARTED}",
            self.time.with_timezone(&Local).format("%H:%M:%S%.3f"),
            self.client,
            self.server,
        )
    }
}

fn rfc3339<S: Serializer>(time: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&time.to_rfc3339_opts(SecondsFormat::Millis, true))
}

impl Report {
    /// A report of `announcement`, captured at `time`, with its pinhole.
    pub fn new(
        time: DateTime<Utc>,
        announcement: &Announcement,
        pinhole: Option<PinholeEntry>,
    ) -> Report {
        Report {
            time,
            client: announcement.flow.client,
            server: announcement.flow.server,
            kind: announcement.kind,
            endpoint: announcement.endpoint,
            pinhole,
        }
    }

    /// The human line: local time, control connection, kind, endpoint, verdict.
    pub fn human(&self) -> String {
        let mut line = format!(
            "{}  {} → {}  {:<4}  {}  ",
            self.time.with_timezone(&Local).format("%H:%M:%S%.3f"),
            self.client,
            self.server,
            self.kind.as_str(),
            self.endpoint,
        );
        match &self.pinhole {
            Some(p) => {
                let session = p.session.map_or_else(|| "?".to_owned(), |s| s.to_string());
                let state = match p.state {
                    PinholeState::Waiting => "waiting",
                    PinholeState::Used => "used",
                    PinholeState::Open => "open window",
                };
                // Writing to a String cannot fail.
                let _ = write!(
                    line,
                    "pinhole: session {session}, {state} (from {} to {}",
                    p.source, p.dial
                );
                if let Some(to) = p.maps_to {
                    let _ = write!(line, " → {to}");
                }
                line.push(')');
            }
            None => line.push_str(NO_PINHOLE),
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sniff::flows::Flow;

    fn entry(dial: &str, maps_to: Option<&str>) -> PinholeEntry {
        PinholeEntry {
            id: None,
            kind: crate::pinhole::PinholeKind::Pinhole,
            state: PinholeState::Waiting,
            session: Some(3),
            client: Some("198.18.0.2".parse().unwrap()),
            server: Some("203.0.113.2".parse().unwrap()),
            source: "203.0.113.2".parse().unwrap(),
            dial: dial.parse().unwrap(),
            last_port: None,
            maps_to: maps_to.map(|m| m.parse().unwrap()),
            snat: None,
            seconds_left: 29,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// An announcement on the control connection 198.18.0.2 → 203.0.113.2:21, as seen on the
    /// client's side of a gateway.
    fn announced(kind: Kind, endpoint: &str) -> Announcement {
        Announcement {
            flow: Flow {
                client: addr("198.18.0.2:40000"),
                server: addr("203.0.113.2:21"),
            },
            kind,
            endpoint: addr(endpoint),
        }
    }

    #[test]
    fn matches_dial_or_maps_to() {
        let active = entry("203.0.113.1:61000", Some("198.18.0.2:50001"));
        assert!(matches(&active, &announced(Kind::Port, "198.18.0.2:50001")));
        assert!(matches(
            &active,
            &announced(Kind::Eprt, "203.0.113.1:61000")
        ));
        assert!(!matches(
            &active,
            &announced(Kind::Port, "198.18.0.2:50002")
        ));
        assert!(!matches(
            &active,
            &announced(Kind::Port, "203.0.113.2:61000")
        ));
        let passive = PinholeEntry {
            source: addr("198.18.0.2:0").ip(),
            ..entry("203.0.113.2:40001", None)
        };
        assert!(matches(
            &passive,
            &announced(Kind::Pasv, "203.0.113.2:40001")
        ));
        // An IPv4-mapped IPv6 endpoint is the same endpoint.
        assert!(matches(
            &passive,
            &announced(Kind::Epsv, "[::ffff:203.0.113.2]:40001")
        ));
    }

    /// The right endpoint is not enough: the pinhole must admit this announcement's dialler
    /// (the client for 227/229, the server for PORT/EPRT) and belong to its control connection.
    #[test]
    fn matches_only_the_dialler_and_the_control_connection() {
        let passive = PinholeEntry {
            source: addr("198.18.0.2:0").ip(),
            ..entry("203.0.113.2:40001", None)
        };
        // A PORT naming the passive pinhole's endpoint: the server would dial it, and the
        // pinhole admits only the client.
        assert!(!matches(
            &passive,
            &announced(Kind::Port, "203.0.113.2:40001")
        ));
        // Another client's pinhole at the same (shared) endpoint.
        let other_client = PinholeEntry {
            source: addr("198.18.0.3:0").ip(),
            client: Some(addr("198.18.0.3:0").ip()),
            ..passive.clone()
        };
        assert!(!matches(
            &other_client,
            &announced(Kind::Pasv, "203.0.113.2:40001")
        ));
        // Seen beyond ftp-alg, the dialler is the address the pinhole gives it.
        let beyond = Announcement {
            flow: Flow {
                client: addr("203.0.113.1:45000"),
                server: addr("203.0.113.2:21"),
            },
            ..announced(Kind::Pasv, "203.0.113.2:40001")
        };
        assert!(!matches(&passive, &beyond));
        let snatted = PinholeEntry {
            snat: Some(addr("203.0.113.1:0").ip()),
            ..passive.clone()
        };
        assert!(matches(&snatted, &beyond));
        // A pinhole of another control connection (another client and another server).
        let other_session = PinholeEntry {
            client: Some(addr("198.18.0.9:0").ip()),
            server: Some(addr("203.0.113.9:0").ip()),
            ..passive.clone()
        };
        assert!(!matches(
            &other_session,
            &announced(Kind::Pasv, "203.0.113.2:40001")
        ));
        // Without ftp-alg's label, whose it is cannot be told: dialler and endpoint decide.
        let unlabelled = PinholeEntry {
            client: None,
            server: None,
            ..other_session
        };
        assert!(matches(
            &unlabelled,
            &announced(Kind::Pasv, "203.0.113.2:40001")
        ));
    }

    fn report(pinhole: Option<PinholeEntry>) -> Report {
        let announcement = Announcement {
            flow: Flow {
                client: addr("198.18.0.2:40000"),
                server: addr("203.0.113.2:21"),
            },
            kind: Kind::Port,
            endpoint: addr("198.18.0.2:50001"),
        };
        let time = DateTime::from_timestamp(1_700_000_000, 123_000_000).unwrap();
        Report::new(time, &announcement, pinhole)
    }

    #[test]
    fn json_has_every_field() {
        let with = report(Some(entry("203.0.113.1:61000", Some("198.18.0.2:50001"))));
        let json = serde_json::to_value(&with).unwrap();
        assert_eq!(json["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(json["client"], "198.18.0.2:40000");
        assert_eq!(json["server"], "203.0.113.2:21");
        assert_eq!(json["kind"], "PORT");
        assert_eq!(json["endpoint"], "198.18.0.2:50001");
        assert_eq!(json["pinhole"]["session"], 3);
        assert_eq!(json["pinhole"]["state"], "waiting");
        assert_eq!(json["pinhole"]["maps_to"], "198.18.0.2:50001");
        let without = serde_json::to_value(report(None)).unwrap();
        assert!(without["pinhole"].is_null());
    }

    #[test]
    fn human_line() {
        let with = report(Some(entry("203.0.113.1:61000", Some("198.18.0.2:50001")))).human();
        assert!(
            with.ends_with(
                "198.18.0.2:40000 → 203.0.113.2:21  PORT  198.18.0.2:50001  pinhole: session 3, \
                 waiting (from 203.0.113.2 to 203.0.113.1:61000 → 198.18.0.2:50001)"
            ),
            "{with}"
        );
        let without = report(None).human();
        assert!(
            without.ends_with(&format!("198.18.0.2:50001  {NO_PINHOLE}")),
            "{without}"
        );
    }
}
