//! The two textual encodings of a data connection endpoint: RFC 959's
//! `h1,h2,h3,h4,p1,p2` (PORT, 227) and RFC 2428's `<d><net-prt><d><net-addr><d><tcp-port><d>`
//! (EPRT).
//!
//! Parsing is strict where strictness costs nothing (no signs, no blanks, no
//! over-long numbers) because the proxy re-encodes what it parsed: anything
//! it accepts must mean exactly one endpoint. Whether an endpoint is allowed
//! (port 0, a foreign address, ...) is policy and not decided here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

use thiserror::Error;

/// Why a host-port or EPRT argument was rejected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HostPortError {
    /// The argument is empty.
    #[error("missing host-port argument")]
    Empty,
    /// The argument does not have the number of fields its syntax requires.
    #[error("expected {expected} fields, found {found}")]
    WrongFieldCount {
        /// Fields the syntax requires.
        expected: usize,
        /// Fields present.
        found: usize,
    },
    /// A number field is empty, too long, or holds something other than ASCII digits.
    #[error("malformed number")]
    BadNumber,
    /// An address or port byte of `h1,h2,h3,h4,p1,p2` exceeds 255.
    #[error("byte value {0} out of range 0..=255")]
    OctetOutOfRange(u32),
    /// A TCP port exceeds 65535.
    #[error("port {0} out of range 0..=65535")]
    PortOutOfRange(u32),
    /// The EPRT delimiter is not in ASCII 33..=126 or does not enclose the argument.
    #[error("bad or inconsistent delimiter")]
    BadDelimiter,
    /// The EPRT network protocol is neither 1 (IPv4) nor 2 (IPv6).
    #[error("unknown network protocol {0}")]
    UnknownFamily(u16),
    /// The EPRT address is valid but of the other family than announced.
    #[error("address does not match network protocol {0}")]
    FamilyMismatch(u16),
    /// The EPRT address is not a valid address of any family.
    #[error("malformed network address")]
    BadAddress,
}

/// RFC 2428 §2: "The delimiter character MUST be one of the ASCII characters
/// in range 33-126 inclusive."
pub(crate) fn is_delimiter(c: u8) -> bool {
    (33..=126).contains(&c)
}

/// A decimal field of 1..=`max_digits` ASCII digits, nothing else.
///
/// `str::parse` is not used because it accepts a leading `+`.
pub(crate) fn parse_decimal(field: &[u8], max_digits: usize) -> Result<u32, HostPortError> {
    if field.is_empty() || field.len() > max_digits {
        return Err(HostPortError::BadNumber);
    }
    field
        .iter()
        .try_fold(0u32, |n, &b| {
            n.checked_mul(10)?.checked_add(char::from(b).to_digit(10)?)
        })
        .ok_or(HostPortError::BadNumber)
}

/// A TCP port: 1..=5 digits, value <= 65535.
pub(crate) fn parse_port(field: &[u8]) -> Result<u16, HostPortError> {
    let n = parse_decimal(field, 5)?;
    u16::try_from(n).map_err(|_| HostPortError::PortOutOfRange(n))
}

/// Parse RFC 959's `h1,h2,h3,h4,p1,p2`.
///
/// RFC 959 §5.3.2 defines `<number> ::= any decimal integer 1 through 255`,
/// but 0 is needed for addresses such as 10.0.0.1 and ports such as 1024
/// and every implementation sends it, so 0..=255 is accepted. Each field is
/// 1..=3 ASCII digits (leading zeros allowed: "010" is 10); signs and blanks
/// are not.
pub fn parse_host_port(s: &str) -> Result<SocketAddrV4, HostPortError> {
    if s.is_empty() {
        return Err(HostPortError::Empty);
    }
    let bytes = s
        .split(',')
        .map(|field| {
            let n = parse_decimal(field.as_bytes(), 3)?;
            u8::try_from(n).map_err(|_| HostPortError::OctetOutOfRange(n))
        })
        .collect::<Result<Vec<u8>, _>>()?;
    match *bytes.as_slice() {
        [h1, h2, h3, h4, p1, p2] => Ok(SocketAddrV4::new(
            Ipv4Addr::new(h1, h2, h3, h4),
            u16::from_be_bytes([p1, p2]),
        )),
        _ => Err(HostPortError::WrongFieldCount {
            expected: 6,
            found: bytes.len(),
        }),
    }
}

/// Encode as RFC 959's `h1,h2,h3,h4,p1,p2`.
pub fn encode_host_port(addr: SocketAddrV4) -> String {
    let [h1, h2, h3, h4] = addr.ip().octets();
    let [p1, p2] = addr.port().to_be_bytes();
    format!("{h1},{h2},{h3},{h4},{p1},{p2}")
}

/// Parse the argument of RFC 2428's EPRT,
/// `<d><net-prt><d><net-addr><d><tcp-port><d>`.
///
/// RFC 2428 §2: the delimiter "MUST be one of the ASCII characters in range
/// 33-126 inclusive"; net-prt 1 is IPv4 in dotted decimal, 2 is IPv6 text.
/// The port may be 0 here; rejecting it is policy.
pub fn parse_eprt(s: &str) -> Result<SocketAddr, HostPortError> {
    let bytes = s.as_bytes();
    let (&d, rest) = bytes.split_first().ok_or(HostPortError::Empty)?;
    if !is_delimiter(d) {
        return Err(HostPortError::BadDelimiter);
    }
    let body = rest.strip_suffix(&[d]).ok_or(HostPortError::BadDelimiter)?;
    let fields: Vec<&[u8]> = body.split(|&b| b == d).collect();
    let [net_prt, net_addr, tcp_port] = *fields.as_slice() else {
        return Err(HostPortError::WrongFieldCount {
            expected: 3,
            found: fields.len(),
        });
    };
    let family = parse_decimal(net_prt, 5)?;
    let family = u16::try_from(family).map_err(|_| HostPortError::BadNumber)?;
    // The fields are ASCII-delimited slices of a str, so they are valid UTF-8.
    let addr = std::str::from_utf8(net_addr).map_err(|_| HostPortError::BadAddress)?;
    let ip = match family {
        1 => addr.parse::<Ipv4Addr>().map(IpAddr::V4),
        2 => addr.parse::<Ipv6Addr>().map(IpAddr::V6),
        other => return Err(HostPortError::UnknownFamily(other)),
    }
    .map_err(|_| match addr.parse::<IpAddr>() {
        Ok(_) => HostPortError::FamilyMismatch(family),
        Err(_) => HostPortError::BadAddress,
    })?;
    Ok(SocketAddr::new(ip, parse_port(tcp_port)?))
}

/// Encode as an EPRT argument with the recommended `|` delimiter.
///
/// A scope id or flow label of an IPv6 address has no place in EPRT and is
/// dropped.
pub fn encode_eprt(addr: SocketAddr) -> String {
    let family = match addr.ip() {
        IpAddr::V4(_) => 1,
        IpAddr::V6(_) => 2,
    };
    format!("|{family}|{}|{}|", addr.ip(), addr.port())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::proptest_reach::{self, Edit};
    use proptest::prelude::*;

    fn v4(a: [u8; 4], port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(a), port)
    }

    #[test]
    fn host_port_basic_and_leading_zeros() {
        assert_eq!(
            parse_host_port("198,18,0,2,238,72"),
            Ok(v4([198, 18, 0, 2], 61000))
        );
        assert_eq!(
            parse_host_port("010,000,001,002,004,001"),
            Ok(v4([10, 0, 1, 2], 1025))
        );
        assert_eq!(
            encode_host_port(v4([198, 18, 0, 2], 61000)),
            "198,18,0,2,238,72"
        );
    }

    #[test]
    fn host_port_rejects_malformed_numbers() {
        for bad in [
            "+1,2,3,4,5,6",
            "-1,2,3,4,5,6",
            "1,2,3,4,5, 6",
            " 1,2,3,4,5,6",
            "1,2,3,4,5,6 ",
            "1,2,,4,5,6",
            "1,2,3,4,5,0006",
            "1,2,3,4,5,x",
            "1,2,3,4,5,6,",
            "1.2.3.4,5,6",
            "1,2,3,4,5,٣",
        ] {
            assert_eq!(
                parse_host_port(bad),
                Err(HostPortError::BadNumber),
                "{bad:?}"
            );
        }
        assert_eq!(parse_host_port(""), Err(HostPortError::Empty));
    }

    #[test]
    fn host_port_rejects_out_of_range_and_wrong_counts() {
        assert_eq!(
            parse_host_port("1,2,3,256,5,6"),
            Err(HostPortError::OctetOutOfRange(256))
        );
        assert_eq!(
            parse_host_port("1,2,3,4,5,999"),
            Err(HostPortError::OctetOutOfRange(999))
        );
        assert_eq!(
            parse_host_port("1,2,3,4,5"),
            Err(HostPortError::WrongFieldCount {
                expected: 6,
                found: 5
            })
        );
        assert_eq!(
            parse_host_port("1,2,3,4,5,6,7"),
            Err(HostPortError::WrongFieldCount {
                expected: 6,
                found: 7
            })
        );
    }

    #[test]
    fn eprt_ipv4_and_ipv6_with_various_delimiters() {
        let a: SocketAddr = "198.18.0.2:61000".parse().unwrap();
        assert_eq!(parse_eprt("|1|198.18.0.2|61000|"), Ok(a));
        assert_eq!(parse_eprt("!1!198.18.0.2!61000!"), Ok(a));
        assert_eq!(parse_eprt("~1~198.18.0.2~61000~"), Ok(a));
        let b: SocketAddr = "[2001:db8::1]:61000".parse().unwrap();
        assert_eq!(parse_eprt("|2|2001:db8::1|61000|"), Ok(b));
        assert_eq!(parse_eprt("!2!2001:DB8::1!61000!"), Ok(b));
        assert_eq!(encode_eprt(a), "|1|198.18.0.2|61000|");
        assert_eq!(encode_eprt(b), "|2|2001:db8::1|61000|");
    }

    #[test]
    fn eprt_family_must_match_the_address() {
        assert_eq!(
            parse_eprt("|1|2001:db8::1|21|"),
            Err(HostPortError::FamilyMismatch(1))
        );
        assert_eq!(
            parse_eprt("|2|198.18.0.2|21|"),
            Err(HostPortError::FamilyMismatch(2))
        );
        assert_eq!(
            parse_eprt("|3|198.18.0.2|21|"),
            Err(HostPortError::UnknownFamily(3))
        );
        assert_eq!(
            parse_eprt("|1|host.example|21|"),
            Err(HostPortError::BadAddress)
        );
        assert_eq!(
            parse_eprt("|2|fe80::1%eth0|21|"),
            Err(HostPortError::BadAddress)
        );
    }

    #[test]
    fn eprt_rejects_bad_delimiters_fields_and_ports() {
        use HostPortError::*;
        assert_eq!(parse_eprt(""), Err(Empty));
        assert_eq!(parse_eprt(" 1 198.18.0.2 21 "), Err(BadDelimiter));
        assert_eq!(
            parse_eprt("\u{7f}1\u{7f}1.2.3.4\u{7f}21\u{7f}"),
            Err(BadDelimiter)
        );
        assert_eq!(parse_eprt("é1é1.2.3.4é21é"), Err(BadDelimiter));
        assert_eq!(parse_eprt("|1|198.18.0.2|21"), Err(BadDelimiter));
        assert_eq!(parse_eprt("|1|198.18.0.2|21!"), Err(BadDelimiter));
        assert_eq!(parse_eprt("|"), Err(BadDelimiter));
        assert_eq!(
            parse_eprt("||"),
            Err(WrongFieldCount {
                expected: 3,
                found: 1
            })
        );
        assert_eq!(
            parse_eprt("|1|198.18.0.2|21|x|"),
            Err(WrongFieldCount {
                expected: 3,
                found: 4
            })
        );
        // ':' cannot delimit an IPv6 address.
        assert!(parse_eprt(":2:2001:db8::1:21:").is_err());
        assert_eq!(
            parse_eprt("|1|198.18.0.2|65536|"),
            Err(PortOutOfRange(65536))
        );
        assert_eq!(parse_eprt("|1|198.18.0.2|123456|"), Err(BadNumber));
        assert_eq!(parse_eprt("|1|198.18.0.2|+21|"), Err(BadNumber));
        assert_eq!(parse_eprt("|1|198.18.0.2||"), Err(BadNumber));
        assert_eq!(parse_eprt("|99999|198.18.0.2|21|"), Err(BadNumber));
        assert_eq!(parse_eprt("| 1|198.18.0.2|21|"), Err(BadNumber));
        // Port 0 parses; refusing it is policy.
        assert_eq!(
            parse_eprt("|1|198.18.0.2|0|"),
            Ok("198.18.0.2:0".parse().unwrap())
        );
    }

    proptest! {
        #[test]
        fn host_port_round_trips(ip in any::<[u8; 4]>(), port in any::<u16>()) {
            let addr = v4(ip, port);
            prop_assert_eq!(parse_host_port(&encode_host_port(addr)), Ok(addr));
        }

        #[test]
        fn eprt_round_trips_v4(ip in any::<[u8; 4]>(), port in any::<u16>()) {
            let addr = SocketAddr::from((ip, port));
            prop_assert_eq!(parse_eprt(&encode_eprt(addr)), Ok(addr));
        }

        #[test]
        fn eprt_round_trips_v6(ip in any::<[u16; 8]>(), port in any::<u16>()) {
            let addr = SocketAddr::from((Ipv6Addr::from(ip), port));
            prop_assert_eq!(parse_eprt(&encode_eprt(addr)), Ok(addr));
        }

        #[test]
        fn parsers_never_panic(s in any::<String>()) {
            let _ = parse_host_port(&s);
            let _ = parse_eprt(&s);
        }
    }

    /// A decimal field of a host-port, and its value when it is a valid one: mostly plain,
    /// sometimes with leading zeros, sometimes out of range or not a number at all.
    fn field() -> impl Strategy<Value = (String, Option<u8>)> {
        prop_oneof![
            12 => any::<u8>().prop_map(|n| (n.to_string(), Some(n))),
            1 => any::<u8>().prop_map(|n| (format!("{n:03}"), Some(n))),
            1 => prop::sample::select(vec!["256", "999", "0256", "-1", "+1", "0x1", "", " 1", "1 "])
                .prop_map(|f| (f.to_owned(), None)),
        ]
    }

    /// `h1,h2,h3,h4,p1,p2` built field by field (sometimes with one field too few or too
    /// many, or another separator), and the endpoint it names when it is well formed.
    pub(in crate::ftp) fn host_port_text() -> impl Strategy<Value = (String, Option<SocketAddrV4>)>
    {
        let count = prop_oneof![10 => Just(6usize), 1 => Just(5usize), 1 => Just(7usize)];
        let separator = prop_oneof![10 => Just(","), 1 => Just("."), 1 => Just(", ")];
        (
            count.prop_flat_map(|n| proptest::collection::vec(field(), n)),
            separator,
        )
            .prop_map(|(fields, separator)| {
                let text = fields
                    .iter()
                    .map(|(f, _)| f.as_str())
                    .collect::<Vec<_>>()
                    .join(separator);
                let values: Option<Vec<u8>> = fields.iter().map(|(_, v)| *v).collect();
                let addr = match (values.as_deref(), separator) {
                    (Some(&[a, b, c, d, p1, p2]), ",") => {
                        Some(v4([a, b, c, d], u16::from_be_bytes([p1, p2])))
                    }
                    _ => None,
                };
                (text, addr)
            })
    }

    /// `<d>fam<d>addr<d>port<d>` built field by field (a family that does not match the
    /// address, a bad address or port, a delimiter that cannot be one), and the endpoint it
    /// names when it is well formed.
    pub(in crate::ftp) fn eprt_text() -> impl Strategy<Value = (String, Option<SocketAddr>)> {
        let delimiter = prop_oneof![
            6 => prop::sample::select(vec!['|', '!', '#', '$', '~']).prop_map(|d| (d, true)),
            1 => prop::sample::select(vec![' ', '1', ':', '.', '\u{7f}']).prop_map(|d| (d, false)),
        ];
        let family_addr = prop_oneof![
            4 => any::<[u8; 4]>().prop_map(|a| ("1", Ipv4Addr::from(a).to_string(), Some(IpAddr::from(a)))),
            3 => any::<[u16; 8]>().prop_map(|a| ("2", Ipv6Addr::from(a).to_string(), Some(IpAddr::from(a)))),
            1 => any::<[u8; 4]>().prop_map(|a| ("2", Ipv4Addr::from(a).to_string(), None)),
            1 => any::<[u16; 8]>().prop_map(|a| ("1", Ipv6Addr::from(a).to_string(), None)),
            1 => prop::sample::select(vec![
                ("1", "198.18.0.256"),
                ("1", "198.18.0"),
                ("1", ""),
                ("2", "fe80::1%eth0"),
                ("3", "198.18.0.2"),
                ("0", "198.18.0.2"),
                ("", "198.18.0.2"),
            ])
            .prop_map(|(f, a)| (f, a.to_owned(), None)),
        ];
        let port = prop_oneof![
            6 => any::<u16>().prop_map(|p| (p.to_string(), Some(p))),
            1 => prop::sample::select(vec!["65536", "123456", "+1", "-1", "", "0x10"])
                .prop_map(|p| (p.to_owned(), None)),
        ];
        (delimiter, family_addr, port).prop_map(|((d, d_ok), (family, addr, ip), (port, p))| {
            let text = format!("{d}{family}{d}{addr}{d}{port}{d}");
            let expected = match (d_ok, ip, p) {
                (true, Some(ip), Some(p)) => Some(SocketAddr::new(ip, p)),
                _ => None,
            };
            (text, expected)
        })
    }

    /// Near-miss host-ports: a well-formed one parses to exactly its endpoint; whatever
    /// parses re-encodes to itself. Fails unless 15 % of the cases parsed (about
    /// 30 % do).
    #[test]
    fn host_port_near_misses_parse_exactly_or_fail() {
        proptest_reach::check(
            "a host-port that parses",
            15,
            (host_port_text(), proptest_reach::edit()),
            |((text, addr), edit)| {
                check_near_miss(&edit, &text, addr, parse_host_port, |a| {
                    encode_host_port(*a)
                })
            },
        );
    }

    /// The same for EPRT arguments.
    #[test]
    fn eprt_near_misses_parse_exactly_or_fail() {
        proptest_reach::check(
            "an EPRT argument that parses",
            15,
            (eprt_text(), proptest_reach::edit()),
            |((text, addr), edit)| {
                check_near_miss(&edit, &text, addr, parse_eprt, |a| encode_eprt(*a))
            },
        );
    }

    /// `text` after `edit` must parse to `expected` if it was not edited and is well formed,
    /// and whatever it parses to must survive encoding. Returns whether it parsed.
    fn check_near_miss<A: PartialEq + std::fmt::Debug>(
        edit: &Edit,
        text: &str,
        expected: Option<A>,
        parse: fn(&str) -> Result<A, HostPortError>,
        encode: impl Fn(&A) -> String,
    ) -> Result<bool, TestCaseError> {
        let text = edit.apply(text);
        let parsed = parse(&text);
        if let Some(expected) = expected.filter(|_| edit.is_none()) {
            prop_assert_eq!(parsed.as_ref(), Ok(&expected), "{:?}", text);
        }
        if let Ok(a) = &parsed {
            let again = parse(&encode(a));
            prop_assert_eq!(again.as_ref(), Ok(a), "{:?}", text);
        }
        Ok(parsed.is_ok())
    }
}
