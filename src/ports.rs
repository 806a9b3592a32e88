//! The pool of public data ports that rewritten announcements hand out.
//!
//! A port is shared by every peer that will dial it. The kernel keys a pinhole on the dialling
//! peer's address, the address dialled and the port (`rules/ftp-alg.nft`), so one port can wait
//! for many peers at once; what it cannot do is wait twice for the same peer, since the second
//! pinhole would replace the first one's translation. So a port is *reserved* for a peer only
//! while that peer's pinhole waits for its connection: from the announcement until the
//! connection arrives (the kernel then deletes the pinhole's set element, and the connection
//! lives on in conntrack), until the pinhole is closed, or until its kernel timeout. The
//! transfer and the session hold nothing.
//!
//! TIME_WAIT (the seed's warning) matters only where a whole 4-tuple can repeat
//! (`scripts/time-wait-experiment`). A client dials from a new ephemeral port each time, so a
//! port it dialled is free for it again at once. A server that dials the client back (active
//! mode) may do so from a fixed port (vsftpd's `connect_from_port_20`, proftpd's L-1): then
//! every data connection from it to one port has the same 4-tuple, which collides with the one
//! still open and, when the client sends no TCP timestamps, with the one in TIME_WAIT. So a
//! port a server has dialled is *avoided* for that server while its connection may be open
//! and for `reuse_delay` after: another port is preferred, and an avoided one is handed out
//! only when nothing else is free (the collision is possible, not certain, and a refusal would
//! be certain). One source burning through ports only ever limits itself.
//!
//! Ports are tried round-robin, so a busy pool reuses a port as late as it can. Time is passed
//! in: no clock is read here, and nothing here talks to the kernel.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Who holds a reservation: the pinhole's id, so that a late release of an older pinhole on
/// the same port cannot drop a newer one's reservation.
pub type Owner = u64;

/// Who dials a pinhole's port, which decides whether TIME_WAIT can bite (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialler {
    /// The FTP client (passive mode): from a new ephemeral port every time.
    Client,
    /// The FTP server (active mode): possibly from a fixed port.
    Server,
}

/// A waiting pinhole's hold on (source, port).
#[derive(Debug, Clone, Copy)]
struct Reservation {
    owner: Owner,
    /// The pinhole's kernel timeout: after it, the pinhole cannot admit anything any more.
    until: Instant,
}

/// Ports `min..=max`, reserved per dialling source.
#[derive(Debug)]
pub struct PortPool {
    min: u16,
    len: usize,
    /// Index of the port to try first on the next reservation.
    cursor: usize,
    /// (source, port) held by a pinhole that waits for its connection.
    reserved: HashMap<(IpAddr, u16), Reservation>,
    /// (source, port) that a server has dialled, avoided until the instant given.
    avoided: HashMap<(IpAddr, u16), Instant>,
    /// The same entries in the order they were set, to expire them cheaply; an entry whose
    /// instant no longer matches `avoided` was extended and is skipped.
    avoided_order: VecDeque<(IpAddr, u16, Instant)>,
    /// How long a reservation can last at most: the pinholes' kernel timeout.
    hold: Duration,
    /// How long a port a server dialled is avoided for it after its transfer.
    reuse_delay: Duration,
}

impl PortPool {
    /// A pool of `min..=max` (`min <= max` is checked by the configuration), whose pinholes
    /// live `hold` in the kernel, and whose server-dialled ports are avoided for `reuse_delay`
    /// after their transfer.
    pub fn new(min: u16, max: u16, hold: Duration, reuse_delay: Duration) -> PortPool {
        PortPool {
            min,
            len: usize::from(max.saturating_sub(min)) + 1,
            cursor: 0,
            reserved: HashMap::new(),
            avoided: HashMap::new(),
            avoided_order: VecDeque::new(),
            hold,
            reuse_delay,
        }
    }

    /// Reserve a port that `source` will dial, for the pinhole `owner`; `None` when every port
    /// already waits for a connection from `source`.
    pub fn reserve(&mut self, source: IpAddr, owner: Owner, now: Instant) -> Option<u16> {
        self.expire(now);
        let mut fallback: Option<(usize, u16, Instant)> = None;
        for step in 0..self.len {
            let index = (self.cursor + step) % self.len;
            let Some(port) = u16::try_from(index).ok().map(|i| self.min + i) else {
                continue;
            };
            if self
                .reserved
                .get(&(source, port))
                .is_some_and(|r| r.until > now)
            {
                continue;
            }
            match self.avoided.get(&(source, port)) {
                Some(&until) => {
                    if fallback.is_none_or(|(_, _, best)| until < best) {
                        fallback = Some((index, port, until));
                    }
                }
                None => return Some(self.take(index, port, source, owner, now)),
            }
        }
        let (index, port, _) = fallback?;
        Some(self.take(index, port, source, owner, now))
    }

    /// The connection of `owner`'s pinhole has arrived: `port` is free for `source` again (a
    /// port a server dialled is avoided for it from now on).
    pub fn consumed(
        &mut self,
        source: IpAddr,
        port: u16,
        owner: Owner,
        dialler: Dialler,
        now: Instant,
    ) {
        if self.unreserve(source, port, owner) && dialler == Dialler::Server {
            self.avoid(source, port, now);
        }
    }

    /// `owner`'s pinhole is closed (its transfer is over, or it was never used): its
    /// reservation ends if it still has one, and a port a server dialled is avoided for that
    /// server for `reuse_delay` from `now`. Releasing twice, or a port outside the range, is
    /// harmless.
    pub fn release(
        &mut self,
        source: IpAddr,
        port: u16,
        owner: Owner,
        dialler: Dialler,
        now: Instant,
    ) {
        self.unreserve(source, port, owner);
        if dialler == Dialler::Server && self.contains(port) {
            self.avoid(source, port, now);
        }
    }

    /// The ports reserved for `source` and the pinholes holding them: those a caller may ask
    /// the kernel about, to learn which have been consumed.
    pub fn reservations(&self, source: IpAddr, now: Instant) -> Vec<(u16, Owner)> {
        self.reserved
            .iter()
            .filter(|((s, _), r)| *s == source && r.until > now)
            .map(|((_, port), r)| (*port, r.owner))
            .collect()
    }

    /// Reservations held now, by every source.
    pub fn reserved(&self) -> usize {
        self.reserved.len()
    }

    /// Ports on which at least one peer's pinhole waits now (reservations that have run out
    /// with their pinhole's timeout do not count).
    pub fn ports_waiting(&self, now: Instant) -> usize {
        let mut ports: Vec<u16> = self
            .reserved
            .iter()
            .filter(|(_, r)| r.until > now)
            .map(|((_, port), _)| *port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports.len()
    }

    fn contains(&self, port: u16) -> bool {
        port.checked_sub(self.min)
            .is_some_and(|i| usize::from(i) < self.len)
    }

    fn take(&mut self, index: usize, port: u16, source: IpAddr, owner: Owner, now: Instant) -> u16 {
        self.cursor = (index + 1) % self.len;
        self.reserved.insert(
            (source, port),
            Reservation {
                owner,
                until: now + self.hold,
            },
        );
        port
    }

    /// Whether `owner` held (source, port); it no longer does.
    fn unreserve(&mut self, source: IpAddr, port: u16, owner: Owner) -> bool {
        let key = (source, port);
        if self.reserved.get(&key).is_some_and(|r| r.owner == owner) {
            self.reserved.remove(&key);
            return true;
        }
        false
    }

    fn avoid(&mut self, source: IpAddr, port: u16, now: Instant) {
        if self.reuse_delay.is_zero() {
            return;
        }
        let until = now + self.reuse_delay;
        self.avoided.insert((source, port), until);
        self.avoided_order.push_back((source, port, until));
    }

    /// Forget what has run out by `now`: avoidances, and reservations whose pinhole has timed
    /// out in the kernel (their owner may never release them: a session can sit idle after a
    /// PASV it never used).
    fn expire(&mut self, now: Instant) {
        while let Some(&(source, port, until)) = self.avoided_order.front() {
            if until > now {
                break;
            }
            self.avoided_order.pop_front();
            if self.avoided.get(&(source, port)) == Some(&until) {
                self.avoided.remove(&(source, port));
            }
        }
        // Timed-out reservations are skipped by `reserve` and dropped here in bulk, only when
        // there are many: a scan per call would cost O(reservations) on every announcement.
        if self.reserved.len() > 4 * self.len {
            self.reserved.retain(|_, r| r.until > now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOLD: Duration = Duration::from_secs(30);
    const DELAY: Duration = Duration::from_secs(120);

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 18, 0, last])
    }

    fn pool(min: u16, max: u16) -> PortPool {
        PortPool::new(min, max, HOLD, DELAY)
    }

    #[test]
    fn one_port_waits_for_many_peers_at_once() {
        let now = Instant::now();
        let mut pool = pool(61000, 61000);
        for (owner, peer) in (1..=200).zip(1..=200u8) {
            assert_eq!(pool.reserve(ip(peer), owner, now), Some(61000));
        }
        assert_eq!(pool.reserved(), 200);
    }

    #[test]
    fn a_port_waits_once_per_peer_until_its_connection_arrives() {
        let now = Instant::now();
        let mut pool = pool(61000, 61001);
        assert_eq!(pool.reserve(ip(2), 1, now), Some(61000));
        assert_eq!(pool.reserve(ip(2), 2, now), Some(61001));
        assert_eq!(
            pool.reserve(ip(2), 3, now),
            None,
            "both wait for 198.18.0.2"
        );
        pool.consumed(ip(2), 61000, 1, Dialler::Client, now);
        assert_eq!(
            pool.reserve(ip(2), 3, now),
            Some(61000),
            "a consumed port is free for its client at once: no TIME_WAIT for clients"
        );
    }

    #[test]
    fn a_timed_out_reservation_frees_its_port() {
        let t0 = Instant::now();
        let mut pool = pool(61000, 61000);
        assert_eq!(pool.reserve(ip(2), 1, t0), Some(61000));
        assert_eq!(
            pool.reserve(ip(2), 2, t0 + HOLD - Duration::from_millis(1)),
            None
        );
        assert_eq!(pool.reserve(ip(2), 2, t0 + HOLD), Some(61000));
        // The first pinhole's late release must not drop the second one's reservation.
        pool.release(ip(2), 61000, 1, Dialler::Client, t0 + HOLD);
        assert_eq!(pool.reserve(ip(2), 3, t0 + HOLD), None);
        assert_eq!(pool.reservations(ip(2), t0 + HOLD), vec![(61000, 2)]);
    }

    #[test]
    fn closing_an_unused_pinhole_frees_its_port() {
        let t0 = Instant::now();
        let mut pool = pool(61000, 61000);
        assert_eq!(pool.reserve(ip(2), 1, t0), Some(61000));
        pool.release(ip(2), 61000, 1, Dialler::Client, t0);
        assert_eq!(pool.reserve(ip(2), 2, t0), Some(61000));
    }

    #[test]
    fn a_port_a_server_dialled_is_avoided_for_it_but_not_refused() {
        let t0 = Instant::now();
        let mut pool = pool(61000, 61001);
        let server = ip(9);
        assert_eq!(pool.reserve(server, 1, t0), Some(61000));
        pool.release(server, 61000, 1, Dialler::Server, t0);
        assert_eq!(
            pool.reserve(server, 2, t0),
            Some(61001),
            "the other port first"
        );
        pool.release(
            server,
            61001,
            2,
            Dialler::Server,
            t0 + Duration::from_secs(1),
        );
        assert_eq!(
            pool.reserve(server, 3, t0 + Duration::from_secs(2)),
            Some(61000),
            "both avoided: the one released longest ago"
        );
        assert_eq!(
            pool.reserve(ip(2), 4, t0),
            Some(61001),
            "avoided only for the server that dialled it"
        );
        pool.release(
            server,
            61000,
            3,
            Dialler::Server,
            t0 + Duration::from_secs(2),
        );
        let later = t0 + Duration::from_secs(1) + DELAY;
        assert_eq!(pool.reserve(server, 5, later), Some(61001));
        assert!(pool.avoided.len() <= 1, "expired avoidances are forgotten");
    }

    #[test]
    fn a_consumed_server_port_is_avoided_while_its_transfer_may_run() {
        let t0 = Instant::now();
        let mut pool = pool(61000, 61001);
        assert_eq!(pool.reserve(ip(9), 1, t0), Some(61000));
        pool.consumed(ip(9), 61000, 1, Dialler::Server, t0);
        assert_eq!(pool.reserve(ip(9), 2, t0), Some(61001));
    }

    #[test]
    fn round_robin_prefers_ports_not_used_recently() {
        let t0 = Instant::now();
        let mut pool = PortPool::new(61000, 61009, HOLD, Duration::ZERO);
        let first = pool.reserve(ip(2), 1, t0).unwrap();
        pool.release(ip(2), first, 1, Dialler::Client, t0);
        assert_ne!(pool.reserve(ip(3), 2, t0).unwrap(), first);
    }

    #[test]
    fn foreign_and_double_releases_are_ignored() {
        let t0 = Instant::now();
        let mut pool = pool(61000, 61001);
        let p = pool.reserve(ip(2), 1, t0).unwrap();
        pool.release(ip(2), p, 1, Dialler::Server, t0);
        pool.release(ip(2), p, 1, Dialler::Server, t0);
        pool.release(ip(2), 80, 1, Dialler::Server, t0);
        pool.release(ip(2), 65535, 1, Dialler::Server, t0);
        assert_eq!(pool.reserved(), 0);
        assert_eq!(pool.avoided.len(), 1);
    }

    #[test]
    fn full_range_does_not_overflow() {
        let mut pool = pool(65535, 65535);
        assert_eq!(pool.reserve(ip(2), 1, Instant::now()), Some(65535));
        let mut all = PortPool::new(1024, 65535, HOLD, DELAY);
        assert_eq!(all.reserve(ip(2), 1, Instant::now()), Some(1024));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Reserve { peer: u8 },
        Consume { pick: usize },
        Release { pick: usize, server: bool },
        Wait { secs: u8 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0..4u8).prop_map(|peer| Step::Reserve { peer }),
            2 => any::<usize>().prop_map(|pick| Step::Consume { pick }),
            2 => (any::<usize>(), any::<bool>()).prop_map(|(pick, server)| Step::Release { pick, server }),
            1 => (0..40u8).prop_map(|secs| Step::Wait { secs }),
        ]
    }

    proptest! {
        /// Whatever happens, no (source, port) ever waits for two live pinholes at once, every
        /// port handed out is in the range, and a source is refused only when every port waits
        /// for it.
        #[test]
        fn a_port_never_waits_twice_for_one_peer(steps in proptest::collection::vec(step(), 1..200)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut pool = PortPool::new(61000, 61002, HOLD, DELAY);
            // The model: live pinholes (owner, source, port, until, consumed).
            let mut live: Vec<(Owner, IpAddr, u16, Instant, bool)> = Vec::new();
            let mut next = 1;
            for step in steps {
                match step {
                    Step::Reserve { peer } => {
                        let source = ip(peer);
                        let waiting: Vec<u16> = live
                            .iter()
                            .filter(|l| l.1 == source && !l.4 && l.3 > now)
                            .map(|l| l.2)
                            .collect();
                        match pool.reserve(source, next, now) {
                            Some(port) => {
                                prop_assert!((61000..=61002).contains(&port));
                                prop_assert!(!waiting.contains(&port), "{port} waits twice for {source}");
                                live.push((next, source, port, now + HOLD, false));
                            }
                            None => prop_assert_eq!(waiting.len(), 3),
                        }
                        next += 1;
                    }
                    Step::Consume { pick } if !live.is_empty() => {
                        let at = pick % live.len();
                        let l = &mut live[at];
                        pool.consumed(l.1, l.2, l.0, Dialler::Client, now);
                        l.4 = true;
                    }
                    Step::Release { pick, server } if !live.is_empty() => {
                        let l = live.remove(pick % live.len());
                        let dialler = if server { Dialler::Server } else { Dialler::Client };
                        pool.release(l.1, l.2, l.0, dialler, now);
                    }
                    Step::Wait { secs } => now += Duration::from_secs(u64::from(secs)),
                    _ => {}
                }
            }
        }
    }
}
