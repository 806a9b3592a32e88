//! The pool of public data ports that rewritten announcements hand out.
//!
//! A port released by a finished transfer is quarantined for a while before it is handed out
//! again to the same peer: the connection that used it sits in TIME_WAIT, and a new data
//! connection with the same tuple would be refused or confused with the old one (the last
//! paragraph of the seed text in `shared/seeds/`). The quarantine is per data-connection source,
//! because a connection from another address has another tuple: one client that burns through
//! ports by the thousand only quarantines them for itself, and cannot drain the pool for everyone
//! else. Ports are handed out round-robin, so even a busy pool reuses a port as late as it can.
//! Time is passed in: no clock is read here.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// One port: whether it is handed out, and which sources may not have it yet.
#[derive(Debug, Clone, Default)]
struct Slot {
    in_use: bool,
    /// Sources whose last connection on this port may still be in TIME_WAIT.
    quarantined_for: Vec<IpAddr>,
}

/// A range of ports with in-use and quarantine bookkeeping.
#[derive(Debug)]
pub struct PortPool {
    min: u16,
    slots: Vec<Slot>,
    /// Index of the slot to try first on the next allocation.
    cursor: usize,
    /// Released (port, source) pairs in release order, with the instant the quarantine ends.
    quarantine: VecDeque<(u16, IpAddr, Instant)>,
    reuse_delay: Duration,
}

impl PortPool {
    /// A pool of `min..=max`; `min <= max` is checked by the configuration.
    pub fn new(min: u16, max: u16, reuse_delay: Duration) -> PortPool {
        let len = usize::from(max.saturating_sub(min)) + 1;
        PortPool {
            min,
            slots: vec![Slot::default(); len],
            cursor: 0,
            quarantine: VecDeque::new(),
            reuse_delay,
        }
    }

    /// Hand out a port for a data connection from `source`, or `None` when every port is in use
    /// or quarantined for that source.
    pub fn allocate(&mut self, source: IpAddr, now: Instant) -> Option<u16> {
        self.expire(now);
        let len = self.slots.len();
        for step in 0..len {
            let index = (self.cursor + step) % len;
            let slot = &mut self.slots[index];
            if !slot.in_use && !slot.quarantined_for.contains(&source) {
                slot.in_use = true;
                self.cursor = (index + 1) % len;
                return u16::try_from(index).ok().map(|i| self.min + i);
            }
        }
        None
    }

    /// Give a port back after a data connection from `source`; it is handed out to `source`
    /// again no sooner than `reuse_delay` after `now`. Ports outside the range or not in use
    /// are ignored, so a double release is harmless.
    pub fn release(&mut self, port: u16, source: IpAddr, now: Instant) {
        let Some(index) = port.checked_sub(self.min).map(usize::from) else {
            return;
        };
        if let Some(slot) = self.slots.get_mut(index).filter(|slot| slot.in_use) {
            slot.in_use = false;
            if !self.reuse_delay.is_zero() {
                slot.quarantined_for.push(source);
                self.quarantine
                    .push_back((port, source, now + self.reuse_delay));
            }
        }
    }

    /// Ports currently handed out.
    pub fn in_use(&self) -> usize {
        self.slots.iter().filter(|s| s.in_use).count()
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(port, source, until)) = self.quarantine.front() {
            if until > now {
                break;
            }
            self.quarantine.pop_front();
            if let Some(slot) = self.slots.get_mut(usize::from(port - self.min)) {
                if let Some(at) = slot.quarantined_for.iter().position(|s| *s == source) {
                    slot.quarantined_for.swap_remove(at);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELAY: Duration = Duration::from_secs(120);

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 18, 0, last])
    }

    #[test]
    fn hands_out_each_port_once_then_runs_dry() {
        let now = Instant::now();
        let mut pool = PortPool::new(61000, 61003, DELAY);
        let ports: Vec<_> = (0..4).map(|_| pool.allocate(ip(2), now).unwrap()).collect();
        assert_eq!(ports, vec![61000, 61001, 61002, 61003]);
        assert_eq!(pool.allocate(ip(2), now), None);
        assert_eq!(
            pool.allocate(ip(3), now),
            None,
            "in use is in use for everyone"
        );
    }

    #[test]
    fn released_port_waits_out_time_wait() {
        let t0 = Instant::now();
        let mut pool = PortPool::new(61000, 61000, DELAY);
        let p = pool.allocate(ip(2), t0).unwrap();
        pool.release(p, ip(2), t0);
        assert_eq!(
            pool.allocate(ip(2), t0 + DELAY - Duration::from_secs(1)),
            None
        );
        assert_eq!(pool.allocate(ip(2), t0 + DELAY), Some(p));
    }

    #[test]
    fn one_source_burning_ports_does_not_drain_the_pool_for_others() {
        let t0 = Instant::now();
        let mut pool = PortPool::new(61000, 61003, DELAY);
        for _ in 0..4 {
            let p = pool.allocate(ip(66), t0).unwrap();
            pool.release(p, ip(66), t0);
        }
        assert_eq!(
            pool.allocate(ip(66), t0),
            None,
            "quarantined for the burner"
        );
        let ports: Vec<_> = (0..4).map(|_| pool.allocate(ip(2), t0)).collect();
        assert!(ports.iter().all(Option::is_some), "{ports:?}");
    }

    #[test]
    fn round_robin_prefers_ports_not_used_recently() {
        let t0 = Instant::now();
        let mut pool = PortPool::new(61000, 61009, Duration::ZERO);
        let first = pool.allocate(ip(2), t0).unwrap();
        pool.release(first, ip(2), t0);
        assert_ne!(pool.allocate(ip(2), t0).unwrap(), first);
    }

    #[test]
    fn double_and_foreign_release_are_ignored() {
        let t0 = Instant::now();
        let mut pool = PortPool::new(61000, 61001, DELAY);
        let p = pool.allocate(ip(2), t0).unwrap();
        pool.release(p, ip(2), t0);
        pool.release(p, ip(2), t0);
        pool.release(80, ip(2), t0);
        pool.release(65535, ip(2), t0);
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.quarantine.len(), 1);
    }

    #[test]
    fn full_range_does_not_overflow() {
        let mut pool = PortPool::new(65535, 65535, DELAY);
        assert_eq!(pool.allocate(ip(2), Instant::now()), Some(65535));
    }
}
