//! The control connection to the FTP server: where a gateway may connect, and how.
//!
//! In gateway mode the proxy's connection to the server starts on this host, so the operator's
//! forward chain, which guards what LAN clients may reach, never sees it. Left alone, a client
//! could reach port 21 (or whatever its redirect covered) of the gateway's own addresses, of
//! loopback and of link-local or multicast addresses, none of which its packets could reach
//! through the forward policy. So those destinations are refused unless
//! `policy.allow_local_servers` says otherwise, and every upstream connection carries the
//! socket mark `proxy.upstream_mark`, which the operator's output chain can filter on as it
//! would filter forwarded FTP (`rules/gateway-policy.nft` shows how).
//!
//! Not here: the allow/deny lists of `[policy]` (plain CIDR checks in `config`).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

/// Why a gateway refuses to connect to an original destination on a client's behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forbidden {
    /// 127.0.0.0/8, ::1: services that trust this host.
    Loopback,
    /// 169.254.0.0/16, fe80::/10: cloud metadata services live there.
    LinkLocal,
    /// Multicast, broadcast, the unspecified address: no FTP server.
    NotUnicast,
    /// An address of this host.
    ThisHost,
}

impl Forbidden {
    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Forbidden::Loopback => "loopback",
            Forbidden::LinkLocal => "link_local",
            Forbidden::NotUnicast => "not_unicast",
            Forbidden::ThisHost => "this_host",
        }
    }
}

/// Whether a gateway must refuse to proxy to `server`, given the addresses of this host.
pub fn forbidden(server: IpAddr, own: &[IpAddr]) -> Option<Forbidden> {
    let server = server.to_canonical();
    let not_unicast = server.is_multicast()
        || server.is_unspecified()
        || matches!(server, IpAddr::V4(v4) if v4.is_broadcast());
    if server.is_loopback() {
        Some(Forbidden::Loopback)
    } else if match server {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    } {
        Some(Forbidden::LinkLocal)
    } else if not_unicast {
        Some(Forbidden::NotUnicast)
    } else if own.iter().any(|a| a.to_canonical() == server) {
        Some(Forbidden::ThisHost)
    } else {
        None
    }
}

/// The names of this host's network interfaces.
pub fn interface_names() -> Vec<String> {
    pnet_datalink::interfaces()
        .into_iter()
        .map(|i| i.name)
        .collect()
}

/// The addresses of this host's interfaces, read now (they change: DHCP, keepalived).
pub fn own_addresses() -> Vec<IpAddr> {
    pnet_datalink::interfaces()
        .into_iter()
        .flat_map(|i| i.ips.into_iter().map(|net| net.ip()))
        .collect()
}

/// The address of `sources` (`proxy.upstream_source`) a connection to `server` starts from:
/// the one of the server's family, if any.
pub fn source_for(server: SocketAddr, sources: &[IpAddr]) -> Option<IpAddr> {
    sources
        .iter()
        .copied()
        .find(|a| a.is_ipv4() == server.is_ipv4())
}

/// Connect to the server within `timeout`, the socket marked with `mark` (0: unmarked), from
/// `source` (any port) if given. `IP_FREEBIND` lets the bind succeed while the address is not
/// (yet) this host's: a standby gateway before keepalived moves the address to it.
pub async fn connect(
    server: SocketAddr,
    source: Option<IpAddr>,
    mark: u32,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = match server {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if mark != 0 {
        socket2::SockRef::from(&socket).set_mark(mark)?;
    }
    if let Some(source) = source {
        let sock = socket2::SockRef::from(&socket);
        match source {
            IpAddr::V4(_) => sock.set_freebind_v4(true)?,
            IpAddr::V6(_) => sock.set_freebind_v6(true)?,
        }
        socket.bind(SocketAddr::new(source, 0))?;
    }
    tokio::time::timeout(timeout, socket.connect(server))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn destinations_a_forward_policy_never_sees_are_refused() {
        let own = [ip("198.18.0.1"), ip("203.0.113.1"), ip("2001:db8:b::1")];
        for (server, why) in [
            ("127.0.0.1", Some(Forbidden::Loopback)),
            ("127.9.9.9", Some(Forbidden::Loopback)),
            ("::1", Some(Forbidden::Loopback)),
            ("::ffff:127.0.0.1", Some(Forbidden::Loopback)),
            ("169.254.169.254", Some(Forbidden::LinkLocal)),
            ("fe80::1", Some(Forbidden::LinkLocal)),
            ("224.0.0.1", Some(Forbidden::NotUnicast)),
            ("ff02::1", Some(Forbidden::NotUnicast)),
            ("255.255.255.255", Some(Forbidden::NotUnicast)),
            ("0.0.0.0", Some(Forbidden::NotUnicast)),
            ("198.18.0.1", Some(Forbidden::ThisHost)),
            ("::ffff:203.0.113.1", Some(Forbidden::ThisHost)),
            ("2001:db8:b::1", Some(Forbidden::ThisHost)),
            ("203.0.113.2", None),
            ("2001:db8:b::2", None),
        ] {
            assert_eq!(forbidden(ip(server), &own), why, "{server}");
        }
    }

    #[test]
    fn the_source_follows_the_servers_family() {
        let sources = [ip("203.0.113.254"), ip("2001:db8:b::fe")];
        let v4: SocketAddr = "203.0.113.2:21".parse().unwrap();
        let v6: SocketAddr = "[2001:db8:b::2]:21".parse().unwrap();
        assert_eq!(source_for(v4, &sources), Some(sources[0]));
        assert_eq!(source_for(v6, &sources), Some(sources[1]));
        assert_eq!(source_for(v6, &sources[..1]), None);
        assert_eq!(source_for(v4, &[]), None);
    }

    #[test]
    fn this_host_has_a_loopback_address() {
        assert!(own_addresses().iter().any(IpAddr::is_loopback));
    }
}
