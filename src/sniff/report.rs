//! What `sniff` prints for each announcement: which pinhole, if any, lets its data connection
//! through, as one human line or one JSON object.

use std::fmt::Write as _;
use std::net::SocketAddr;

use chrono::{DateTime, Local, SecondsFormat, Utc};
use serde::{Serialize, Serializer};

use crate::pinhole::{PinholeEntry, PinholeState};

use super::flows::{Announcement, Kind};

/// What the line says when no pinhole matches.
pub const NO_PINHOLE: &str = "no pinhole: in a default-deny firewall this data connection will \
                              be dropped; is this session going through ftp-alg?";

/// Whether `entry` is the pinhole for a data connection to `endpoint`: the endpoint is what the
/// data connection dials (`dial`), or where the pinhole sends it (`maps_to`). Which one depends
/// on the side of ftp-alg the capture is on: a client behind a gateway announces its own
/// address in PORT, which the pinhole maps to; the server on the other side sees the rewritten
/// PORT, which the pinhole is dialled at.
pub fn matches(entry: &PinholeEntry, endpoint: SocketAddr) -> bool {
    let same = |a: SocketAddr| {
        a.ip().to_canonical() == endpoint.ip().to_canonical() && a.port() == endpoint.port()
    };
    same(entry.dial) || entry.maps_to.is_some_and(same)
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
            state: PinholeState::Waiting,
            session: Some(3),
            client: Some("198.18.0.2".parse().unwrap()),
            server: Some("203.0.113.2".parse().unwrap()),
            source: "203.0.113.2".parse().unwrap(),
            dial: dial.parse().unwrap(),
            maps_to: maps_to.map(|m| m.parse().unwrap()),
            snat: None,
            seconds_left: 29,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn matches_dial_or_maps_to() {
        let active = entry("203.0.113.1:61000", Some("198.18.0.2:50001"));
        assert!(matches(&active, addr("198.18.0.2:50001")));
        assert!(matches(&active, addr("203.0.113.1:61000")));
        assert!(!matches(&active, addr("198.18.0.2:50002")));
        assert!(!matches(&active, addr("203.0.113.2:61000")));
        let passive = entry("203.0.113.2:40001", None);
        assert!(matches(&passive, addr("203.0.113.2:40001")));
        // An IPv4-mapped IPv6 endpoint is the same endpoint.
        assert!(matches(&passive, addr("[::ffff:203.0.113.2]:40001")));
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
