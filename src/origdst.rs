//! The original destination of a connection that nftables redirected to this host.
//!
//! In gateway mode tcp/21 is redirected to the daemon; the address the client really dialled is
//! kept by conntrack and read back with `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST`
//! (IPv6), through socket2's wrappers of the two getsockopt calls.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;

use socket2::SockRef;

/// The destination the peer dialled before any redirect; the socket's own address if none.
pub fn original_destination(socket: &impl AsFd, local: SocketAddr) -> io::Result<SocketAddr> {
    let socket = SockRef::from(socket);
    let original = if local.is_ipv4() || is_v4_mapped(local) {
        socket.original_dst_v4()?
    } else {
        socket.original_dst_v6()?
    };
    original.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the original destination is not an IP socket address",
        )
    })
}

fn is_v4_mapped(addr: SocketAddr) -> bool {
    matches!(addr, SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some())
}
