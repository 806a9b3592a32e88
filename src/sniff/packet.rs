//! From a captured frame to the TCP segment it carries, with etherparse.
//!
//! Only what the flow tracker needs is kept: the two endpoints, the sequence number, the SYN,
//! FIN and RST flags and the payload. Everything else a frame may be (ARP, UDP, ICMP, an IP
//! fragment, a truncated or malformed packet) is `Ok(None)` or an error, never a panic: the
//! bytes come straight off the wire.

use std::net::{IpAddr, SocketAddr};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use thiserror::Error;

/// What a captured frame starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkType {
    /// An Ethernet II header (Ethernet, veth, bridges, and Linux loopback, whose header is all
    /// zeros); VLAN tags are skipped.
    Ethernet,
    /// The IP header itself (tun devices, WireGuard: Linux's `ARPHRD_NONE`).
    RawIp,
}

impl LinkType {
    /// The link type of a Linux `ARPHRD_*` number (`/sys/class/net/IFACE/type`), if sniff can
    /// read its frames.
    pub fn from_arphrd(arphrd: u16) -> Option<LinkType> {
        match arphrd {
            // ARPHRD_ETHER, ARPHRD_LOOPBACK
            1 | 772 => Some(LinkType::Ethernet),
            // ARPHRD_NONE
            65534 => Some(LinkType::RawIp),
            _ => None,
        }
    }
}

/// A frame that etherparse could not take apart (too short, bad lengths, a bad IP version).
#[derive(Debug, Error)]
#[error("malformed packet: {0}")]
pub struct PacketError(#[from] etherparse::err::packet::SliceError);

/// One TCP segment, borrowing its payload from the captured frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    /// Sender.
    pub src: SocketAddr,
    /// Receiver.
    pub dst: SocketAddr,
    /// The sequence number of the first payload byte (of the SYN, when set).
    pub seq: u32,
    /// SYN flag: a connection starts; sequence numbering starts again.
    pub syn: bool,
    /// FIN flag: the sender has nothing more to say.
    pub fin: bool,
    /// RST flag: the connection is gone.
    pub rst: bool,
    /// The TCP payload.
    pub payload: &'a [u8],
}

/// The TCP segment in `frame`, `Ok(None)` when the frame carries none (another protocol, or an
/// IP fragment, whose TCP header may not even be in it).
pub fn parse_frame(link: LinkType, frame: &[u8]) -> Result<Option<Segment<'_>>, PacketError> {
    let packet = match link {
        LinkType::Ethernet => SlicedPacket::from_ethernet(frame)?,
        LinkType::RawIp => SlicedPacket::from_ip(frame)?,
    };
    let (src_ip, dst_ip): (IpAddr, IpAddr) = match &packet.net {
        Some(NetSlice::Ipv4(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        Some(NetSlice::Ipv6(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        Some(NetSlice::Arp(_)) | None => return Ok(None),
    };
    let Some(TransportSlice::Tcp(tcp)) = packet.transport else {
        return Ok(None);
    };
    Ok(Some(Segment {
        src: SocketAddr::new(src_ip, tcp.source_port()),
        dst: SocketAddr::new(dst_ip, tcp.destination_port()),
        seq: tcp.sequence_number(),
        syn: tcp.syn(),
        fin: tcp.fin(),
        rst: tcp.rst(),
        payload: tcp.payload(),
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    /// An Ethernet frame carrying a TCP segment with the PSH and ACK flags from `src` to `dst`.
    pub(crate) fn tcp_frame(src: SocketAddr, dst: SocketAddr, seq: u32, payload: &[u8]) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let ip = match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
            _ => panic!("one family per frame"),
        };
        let builder = ip.tcp(src.port(), dst.port(), seq, 64240).psh().ack(1);
        let mut frame = Vec::with_capacity(builder.size(payload.len()));
        builder.write(&mut frame, payload).unwrap();
        frame
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_segment() {
        let frame = tcp_frame(
            addr("198.18.0.2:40000"),
            addr("203.0.113.2:21"),
            7,
            b"PASV\r\n",
        );
        let seg = parse_frame(LinkType::Ethernet, &frame).unwrap().unwrap();
        assert_eq!(seg.src, addr("198.18.0.2:40000"));
        assert_eq!(seg.dst, addr("203.0.113.2:21"));
        assert_eq!(seg.seq, 7);
        assert!(!seg.syn && !seg.fin && !seg.rst);
        assert_eq!(seg.payload, b"PASV\r\n");
    }

    #[test]
    fn ipv6_segment() {
        let frame = tcp_frame(
            addr("[2001:db8:b::2]:21"),
            addr("[2001:db8:a::2]:40000"),
            1,
            b"229 Entering Extended Passive Mode (|||40001|)\r\n",
        );
        let seg = parse_frame(LinkType::Ethernet, &frame).unwrap().unwrap();
        assert_eq!(seg.src, addr("[2001:db8:b::2]:21"));
        assert_eq!(seg.dst, addr("[2001:db8:a::2]:40000"));
    }

    #[test]
    fn raw_ip_frames_have_no_ethernet_header() {
        let frame = tcp_frame(addr("198.18.0.2:40000"), addr("203.0.113.2:21"), 7, b"x");
        let ip = &frame[14..];
        let seg = parse_frame(LinkType::RawIp, ip).unwrap().unwrap();
        assert_eq!(seg.payload, b"x");
        // The same bytes read as Ethernet are not this segment.
        assert_ne!(
            parse_frame(LinkType::Ethernet, ip).ok().flatten(),
            Some(seg)
        );
    }

    #[test]
    fn udp_and_truncated_frames() {
        let udp = {
            let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
                .ipv4([198, 18, 0, 2], [203, 0, 113, 2], 64)
                .udp(5353, 21);
            let mut f = Vec::new();
            b.write(&mut f, b"PORT 1,2,3,4,5,6\r\n").unwrap();
            f
        };
        assert_eq!(parse_frame(LinkType::Ethernet, &udp).unwrap(), None);
        let frame = tcp_frame(
            addr("198.18.0.2:40000"),
            addr("203.0.113.2:21"),
            7,
            b"PASV\r\n",
        );
        for cut in 0..frame.len() {
            // Any prefix is an error or no segment: a cut inside the payload disagrees with
            // the IP header's length, and is not taken for a shorter segment.
            assert!(
                matches!(
                    parse_frame(LinkType::Ethernet, &frame[..cut]),
                    Err(_) | Ok(None)
                ),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn arphrd_numbers() {
        assert_eq!(LinkType::from_arphrd(1), Some(LinkType::Ethernet));
        assert_eq!(LinkType::from_arphrd(772), Some(LinkType::Ethernet));
        assert_eq!(LinkType::from_arphrd(65534), Some(LinkType::RawIp));
        // ARPHRD_IEEE80211_RADIOTAP: radio headers, not handled.
        assert_eq!(LinkType::from_arphrd(803), None);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_frame(LinkType::Ethernet, &bytes);
            let _ = parse_frame(LinkType::RawIp, &bytes);
        }

        #[test]
        fn corrupted_frames_never_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut frame = tcp_frame(
                "[2001:db8:a::2]:40000".parse().unwrap(),
                "[2001:db8:b::2]:21".parse().unwrap(),
                1,
                b"EPRT |2|2001:db8:a::2|50001|\r\n",
            );
            for (at, byte) in flips {
                let i = at.index(frame.len());
                frame[i] = byte;
            }
            let _ = parse_frame(LinkType::Ethernet, &frame);
        }
    }
}
