//! The kernel-side filter of sniff's capture socket: a classic BPF program that lets through
//! only TCP segments to or from the watched control ports, so that the data connections a
//! gateway carries (most of its traffic) are never copied to user space, and a burst of them
//! cannot crowd control segments out of the socket's buffer.
//!
//! Written by hand: libpcap would compile it, but would bring a C library for eight
//! instructions per port. IPv4 (first fragments) and IPv6 without extension headers are
//! matched; 802.1Q-tagged frames all pass, for the parser to sort out.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const ETHERTYPE_IPV4: u32 = 0x0800;
const ETHERTYPE_IPV6: u32 = 0x86dd;
const ETHERTYPE_VLAN: u32 = 0x8100;
const IPPROTO_TCP: u32 = 6;
/// Bytes of a frame passed to user space: all of it.
const ACCEPT_LEN: u32 = 0x0004_0000;
/// The capture socket's receive buffer: room for bursts of control segments while the capture
/// thread is busy.
const RECEIVE_BUFFER: libc::c_int = 4 << 20;

// Classic BPF opcodes (linux/filter.h), the few this program uses.
const LD_H_ABS: u16 = 0x28;
const LD_B_ABS: u16 = 0x30;
const LD_H_IND: u16 = 0x48;
const LDX_B_MSH: u16 = 0xb1;
const JEQ_K: u16 = 0x15;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;

/// Where a jump goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Next,
    Accept,
    Drop,
    V4,
    V6,
}

/// One instruction before jump offsets are resolved.
#[derive(Clone, Copy)]
enum Op {
    Load(u16, u32),
    Jump(u16, u32, Target, Target),
    Return(u32),
    Label(Target),
}

/// The filter for Ethernet frames (Ethernet, veth, bridges, loopback) carrying TCP with one of
/// `ports` as source or destination; `None` for so many ports that a jump would not fit in
/// classic BPF's 8-bit offsets (about 60).
pub fn program(ports: &[u16]) -> Option<Vec<libc::sock_filter>> {
    use Target::*;
    // Load a port (source, then destination) and accept it if it is watched.
    let either_port = |source: Op, destination: Op| {
        [source, destination].into_iter().flat_map(|load| {
            std::iter::once(load).chain(
                ports
                    .iter()
                    .map(|p| Op::Jump(JEQ_K, u32::from(*p), Accept, Next)),
            )
        })
    };
    let mut ops = vec![
        Op::Load(LD_H_ABS, 12),
        Op::Jump(JEQ_K, ETHERTYPE_IPV4, V4, Next),
        Op::Jump(JEQ_K, ETHERTYPE_IPV6, V6, Next),
        Op::Jump(JEQ_K, ETHERTYPE_VLAN, Accept, Drop),
        Op::Label(V4),
        Op::Load(LD_B_ABS, 23),
        Op::Jump(JEQ_K, IPPROTO_TCP, Next, Drop),
        // A fragment other than the first carries no TCP header.
        Op::Load(LD_H_ABS, 20),
        Op::Jump(JSET_K, 0x1fff, Drop, Next),
        Op::Load(LDX_B_MSH, 14),
    ];
    ops.extend(either_port(Op::Load(LD_H_IND, 14), Op::Load(LD_H_IND, 16)));
    ops.extend([
        Op::Return(0),
        Op::Label(V6),
        Op::Load(LD_B_ABS, 20),
        Op::Jump(JEQ_K, IPPROTO_TCP, Next, Drop),
    ]);
    ops.extend(either_port(Op::Load(LD_H_ABS, 54), Op::Load(LD_H_ABS, 56)));
    ops.extend([
        Op::Return(0),
        Op::Label(Accept),
        Op::Return(ACCEPT_LEN),
        Op::Label(Drop),
        Op::Return(0),
    ]);
    assemble(&ops)
}

/// Resolve labels into the relative (forward, 8-bit) jump offsets of classic BPF.
fn assemble(ops: &[Op]) -> Option<Vec<libc::sock_filter>> {
    let mut labels = Vec::new();
    let mut index = 0usize;
    for op in ops {
        match op {
            Op::Label(label) => labels.push((*label, index)),
            _ => index += 1,
        }
    }
    let mut out = Vec::new();
    for op in ops {
        let here = out.len();
        let offset = |target: Target| -> Option<u8> {
            if target == Target::Next {
                return Some(0);
            }
            let (_, at) = labels.iter().find(|(l, _)| *l == target)?;
            u8::try_from(at.checked_sub(here + 1)?).ok()
        };
        let (code, jt, jf, k) = match *op {
            Op::Load(code, k) => (code, 0, 0, k),
            Op::Jump(code, k, yes, no) => (code, offset(yes)?, offset(no)?, k),
            Op::Return(k) => (RET_K, 0, 0, k),
            Op::Label(_) => continue,
        };
        out.push(libc::sock_filter { code, jt, jf, k });
    }
    Some(out)
}

/// An AF_PACKET socket that receives nothing until it is bound to an interface (protocol 0),
/// with a large receive buffer and, when `filter` is given, that filter attached.
pub fn socket(filter: Option<&[libc::sock_filter]>) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // FORCE goes past net.core.rmem_max with CAP_NET_ADMIN; without it the default stays.
    let _ = setsockopt(&socket, libc::SO_RCVBUFFORCE, &RECEIVE_BUFFER);
    if let Some(filter) = filter {
        let program = libc::sock_fprog {
            len: u16::try_from(filter.len())
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
            filter: filter.as_ptr().cast_mut(),
        };
        setsockopt(&socket, libc::SO_ATTACH_FILTER, &program)?;
    }
    Ok(socket)
}

fn setsockopt<T>(socket: &OwnedFd, option: libc::c_int, value: &T) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<T>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: value points to a live T of len bytes; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    /// Runs the program the way the kernel does, for the instructions it uses: the length
    /// passed to user space, 0 for a dropped frame.
    fn run(program: &[libc::sock_filter], frame: &[u8]) -> u32 {
        let byte = |at: usize| frame.get(at).copied().map(u32::from);
        let half = |at: usize| Some(byte(at)? << 8 | byte(at + 1)?);
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        loop {
            let i = program[pc];
            pc += 1;
            let k = i.k as usize;
            let loaded = match i.code {
                LD_H_ABS => half(k),
                LD_B_ABS => byte(k),
                LD_H_IND => half(x as usize + k),
                LDX_B_MSH => {
                    x = (byte(k).unwrap_or(0) & 0xf) * 4;
                    continue;
                }
                JEQ_K | JSET_K => {
                    let taken = if i.code == JEQ_K {
                        a == i.k
                    } else {
                        a & i.k != 0
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                    continue;
                }
                RET_K => return i.k,
                other => panic!("opcode {other:#x}"),
            };
            // An out-of-bounds load ends the program with 0, as in the kernel.
            match loaded {
                Some(value) => a = value,
                None => return 0,
            }
        }
    }

    fn v4(src: u16, dst: u16) -> Vec<u8> {
        let mut frame = Vec::new();
        PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv4([198, 18, 0, 2], [203, 0, 113, 2], 64)
            .tcp(src, dst, 1, 1024)
            .write(&mut frame, b"PASV\r\n")
            .unwrap();
        frame
    }

    fn v6(src: u16, dst: u16) -> Vec<u8> {
        let mut frame = Vec::new();
        PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv6([0x20; 16], [0x21; 16], 64)
            .tcp(src, dst, 1, 1024)
            .write(&mut frame, b"EPSV\r\n")
            .unwrap();
        frame
    }

    #[test]
    fn only_tcp_on_the_watched_ports_passes() {
        let program = program(&[21, 2121]).unwrap();
        for (frame, passes) in [
            (v4(40000, 21), true),
            (v4(21, 40000), true),
            (v4(40000, 2121), true),
            (v4(40000, 61000), false),
            (v6(40000, 21), true),
            (v6(21, 40000), true),
            (v6(40000, 443), false),
        ] {
            assert_eq!(run(&program, &frame) != 0, passes, "{frame:?}");
        }
    }

    #[test]
    fn udp_fragments_and_other_protocols_are_dropped() {
        let program = program(&[21]).unwrap();
        let mut udp = Vec::new();
        PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv4([198, 18, 0, 2], [203, 0, 113, 2], 64)
            .udp(40000, 21)
            .write(&mut udp, b"x")
            .unwrap();
        assert_eq!(run(&program, &udp), 0);
        let mut fragment = v4(40000, 21);
        fragment[20] |= 0x01; // fragment offset 256 bytes
        assert_eq!(run(&program, &fragment), 0);
        let mut arp = v4(40000, 21);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(run(&program, &arp), 0);
        assert_eq!(run(&program, &[0u8; 10]), 0, "a runt frame");
    }

    #[test]
    fn jumps_stay_in_range_with_many_ports() {
        let ports: Vec<u16> = (1..=40).collect();
        let program = program(&ports).unwrap();
        for (i, op) in program.iter().enumerate() {
            if op.code == JEQ_K || op.code == JSET_K {
                assert!(i + 1 + usize::from(op.jt) < program.len());
                assert!(i + 1 + usize::from(op.jf) < program.len());
            }
        }
        assert!(run(&program, &v4(40000, 40)) != 0);
        let too_many: Vec<u16> = (1..=100).collect();
        assert!(super::program(&too_many).is_none());
    }
}
