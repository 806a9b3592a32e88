//! The original destination of a connection that nftables redirected to this host.
//!
//! In gateway mode tcp/21 is redirected to the daemon; the address the client really dialled is
//! kept by conntrack and read back with `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST`
//! (IPv6). No crate wraps these two getsockopt calls, hence the small unsafe block here.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// `SO_ORIGINAL_DST` from `<linux/netfilter_ipv4.h>`; `IP6T_SO_ORIGINAL_DST` has the same value.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The destination the peer dialled before any redirect; the socket's own address if none.
pub fn original_destination(socket: &impl AsRawFd, local: SocketAddr) -> io::Result<SocketAddr> {
    let fd = socket.as_raw_fd();
    if local.is_ipv4() || is_v4_mapped(local) {
        let addr: libc::sockaddr_in = getsockopt(fd, libc::SOL_IP)?;
        Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
            u16::from_be(addr.sin_port),
        )))
    } else {
        let addr: libc::sockaddr_in6 = getsockopt(fd, libc::SOL_IPV6)?;
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(addr.sin6_addr.s6_addr),
            u16::from_be(addr.sin6_port),
            addr.sin6_flowinfo,
            addr.sin6_scope_id,
        )))
    }
}

fn is_v4_mapped(addr: SocketAddr) -> bool {
    matches!(addr, SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some())
}

/// `T` must be a plain C socket address struct, valid for any bit pattern the kernel writes.
fn getsockopt<T: Copy>(fd: libc::c_int, level: libc::c_int) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = libc::socklen_t::try_from(size_of::<T>())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "sockaddr too large"))?;
    // SAFETY: `value` is a writable buffer of `len` bytes that outlives the call; the kernel
    // writes at most `len` bytes and reports how many it wrote.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            SO_ORIGINAL_DST,
            value.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised and then filled by the kernel; every bit pattern is a valid
    // sockaddr_in/sockaddr_in6.
    Ok(unsafe { value.assume_init() })
}
