//! The pool of public data ports that rewritten announcements hand out.
//!
//! A port released by a finished transfer is quarantined for a while before it is handed out
//! again: the connection that used it sits in TIME_WAIT, and a new data connection with the same
//! tuple would be refused or confused with the old one (the last paragraph of the seed text in
//! `shared/seeds/`). Ports are handed out round-robin, so even a busy pool reuses a port as late
//! as it can. Time is passed in: no clock is read here.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    InUse,
    Quarantined,
}

/// A range of ports with in-use and quarantine bookkeeping.
#[derive(Debug)]
pub struct PortPool {
    min: u16,
    slots: Vec<Slot>,
    /// Index of the slot to try first on the next allocation.
    cursor: usize,
    /// Released ports in release order, with the instant they may be handed out again.
    quarantine: VecDeque<(u16, Instant)>,
    reuse_delay: Duration,
}

impl PortPool {
    /// A pool of `min..=max`; `min <= max` is checked by the configuration.
    pub fn new(min: u16, max: u16, reuse_delay: Duration) -> PortPool {
        let len = usize::from(max.saturating_sub(min)) + 1;
        PortPool {
            min,
            slots: vec![Slot::Free; len],
            cursor: 0,
            quarantine: VecDeque::new(),
            reuse_delay,
        }
    }

    /// Hand out a port, or `None` when every port is in use or quarantined.
    pub fn allocate(&mut self, now: Instant) -> Option<u16> {
        self.expire(now);
        let len = self.slots.len();
        for step in 0..len {
            let index = (self.cursor + step) % len;
            if self.slots[index] == Slot::Free {
                self.slots[index] = Slot::InUse;
                self.cursor = (index + 1) % len;
                return u16::try_from(index).ok().map(|i| self.min + i);
            }
        }
        None
    }

    /// Give a port back; it is handed out again no sooner than `reuse_delay` after `now`.
    /// Ports outside the range or not in use are ignored, so a double release is harmless.
    pub fn release(&mut self, port: u16, now: Instant) {
        let Some(index) = port.checked_sub(self.min).map(usize::from) else {
            return;
        };
        if self.slots.get(index) == Some(&Slot::InUse) {
            self.slots[index] = Slot::Quarantined;
            self.quarantine.push_back((port, now + self.reuse_delay));
        }
    }

    /// Ports currently handed out.
    pub fn in_use(&self) -> usize {
        self.slots.iter().filter(|s| **s == Slot::InUse).count()
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(port, until)) = self.quarantine.front() {
            if until > now {
                break;
            }
            self.quarantine.pop_front();
            if let Some(slot) = self.slots.get_mut(usize::from(port - self.min)) {
                *slot = Slot::Free;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELAY: Duration = Duration::from_secs(120);

    #[test]
    fn hands_out_each_port_once_then_runs_dry() {
        let now = Instant::now();
        let mut pool = PortPool::new(61000, 61003, DELAY);
        let ports: Vec<_> = (0..4).map(|_| pool.allocate(now).unwrap()).collect();
        assert_eq!(ports, vec![61000, 61001, 61002, 61003]);
        assert_eq!(pool.allocate(now), None);
    }

    #[test]
    fn released_port_waits_out_time_wait() {
        let t0 = Instant::now();
        let mut pool = PortPool::new(61000, 61000, DELAY);
        let p = pool.allocate(t0).unwrap();
        pool.release(p, t0);
        assert_eq!(pool.allocate(t0 + DELAY - Duration::from_secs(1)), None);
        assert_eq!(pool.allocate(t0 + DELAY), Some(p));
    }

    #[test]
    fn round_robin_prefers_ports_not_used_recently() {
        let t0 = Instant::now();
        let mut pool = PortPool::new(61000, 61009, Duration::ZERO);
        let first = pool.allocate(t0).unwrap();
        pool.release(first, t0);
        assert_ne!(pool.allocate(t0).unwrap(), first);
    }

    #[test]
    fn double_and_foreign_release_are_ignored() {
        let t0 = Instant::now();
        let mut pool = PortPool::new(61000, 61001, DELAY);
        let p = pool.allocate(t0).unwrap();
        pool.release(p, t0);
        pool.release(p, t0);
        pool.release(80, t0);
        pool.release(65535, t0);
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.quarantine.len(), 1);
    }

    #[test]
    fn full_range_does_not_overflow() {
        let mut pool = PortPool::new(65535, 65535, DELAY);
        assert_eq!(pool.allocate(Instant::now()), Some(65535));
    }
}
