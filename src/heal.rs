//! Keeps the daemon's table in the kernel: when `inet ftp_alg` is deleted or changed under the
//! daemon (`nft flush ruleset`, a firewall manager reloading its rules, an admin deleting a
//! chain), it is loaded again, with one log line, and the pinholes it held are counted as lost
//! (`ftp_alg_pinholes_lost_total`).
//!
//! Detection is by nftables' own change notifications: a netlink socket subscribed to the
//! `NFNLGRP_NFTABLES` group hears of every table, chain, set and rule that is added or deleted,
//! as `nft monitor` does, so a flush is seen within milliseconds and nothing is polled. A
//! notification that names `inet ftp_alg` (or a lost notification: the socket overflowed)
//! triggers a check of the table's structure (its chains with their rule counts, its sets and
//! maps, as loaded at start-up); only a difference reloads it, as start-up does
//! ([`nft::prepare_table`]: a live predecessor's pinholes are kept). A table that was changed
//! while another live ftp-alg holds pinholes in it (a hand-over to a new version) is left
//! alone: two processes must not take turns loading their rules. If the subscription is refused,
//! the check runs every [`POLL_INTERVAL`] instead, and the start-up log says so.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::pinhole::netlink::{netfilter_socket, set_option};
use crate::pinhole::nft;
use crate::proxy::Shared;

/// How often the table is checked when change notifications are not available.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);
/// After a notification, how long to let the change that caused it settle (a firewall reload
/// flushes the ruleset and loads its own rules in two steps) before the table is checked.
const SETTLE: Duration = Duration::from_millis(100);
/// Between attempts when loading the table again fails.
const RETRY: Duration = Duration::from_secs(2);
/// `NFNLGRP_NFTABLES` from `<linux/netfilter/nfnetlink.h>`.
const NFNLGRP_NFTABLES: libc::c_int = 7;
/// `NFNL_SUBSYS_NFTABLES`: the high byte of an nftables message's type.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// Message types (`enum nf_tables_msg_types`) that change a table's structure: NEWTABLE,
/// DELTABLE, NEWCHAIN, DELCHAIN, NEWRULE, DELRULE, NEWSET, DELSET.
const STRUCTURE_CHANGES: [u16; 8] = [0, 2, 3, 5, 6, 8, 9, 11];
/// `NFPROTO_INET`.
const NFPROTO_INET: u8 = 1;
/// Netlink message header, then nftables' `nfgenmsg`.
const HEADERS: usize = 16 + 4;
/// The table-name attribute of each of those messages (`NFTA_TABLE_NAME`, `NFTA_CHAIN_TABLE`,
/// `NFTA_RULE_TABLE`, `NFTA_SET_TABLE` all have the number 1).
const TABLE_ATTRIBUTE: u16 = 1;
/// Receive buffer of the socket: every element the daemon adds is announced too.
const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// Watch the table for as long as the daemon runs (until the task is aborted).
pub(crate) async fn guard(shared: Arc<Shared>) {
    let nft_path = shared.config.pinholes.nft.clone();
    let baseline = match nft::table_shape(&nft_path).await {
        Ok(Some(shape)) => shape,
        Ok(None) => {
            tracing::error!("ftp-alg's table vanished right after start-up; not watching it");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read ftp-alg's table; not watching it");
            return;
        }
    };
    let mut events = match Events::open() {
        Ok(events) => Some(events),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "no nftables change notifications; checking ftp-alg's table every {POLL_INTERVAL:?} instead"
            );
            None
        }
    };
    tracing::debug!(
        notifications = events.is_some(),
        "watching table inet {}",
        nft::TABLE
    );
    loop {
        match &mut events {
            Some(events) => {
                if let Err(e) = events.next_change().await {
                    tracing::warn!(error = %e, "reading nftables notifications failed");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
                tokio::time::sleep(SETTLE).await;
                events.drain();
            }
            None => tokio::time::sleep(POLL_INTERVAL).await,
        }
        heal(&shared, &baseline).await;
    }
}

/// Load the table again if it is missing or differs from `baseline`; retry until it is back.
async fn heal(shared: &Shared, baseline: &BTreeMap<String, usize>) {
    let config = &shared.config;
    let nft_path = &config.pinholes.nft;
    loop {
        let why = match nft::table_shape(nft_path).await {
            Ok(Some(shape)) if shape == *baseline => return,
            Ok(Some(_)) => "was changed",
            Ok(None) => "was deleted",
            Err(e) => {
                tracing::warn!(error = %e, "cannot check ftp-alg's table");
                return;
            }
        };
        // A table shared with another live ftp-alg (during a hand-over, a new version may
        // bring other rules): the newest process's rules win, and two processes must not take
        // turns loading theirs. Only a deleted table is loaded again then.
        if why == "was changed" {
            match nft::other_live_owners(nft_path).await {
                Ok(others) if !others.is_empty() => {
                    tracing::warn!(
                        ?others,
                        "table inet {} {why}, and other ftp-alg processes hold pinholes in it (a hand-over): left as it is",
                        nft::TABLE
                    );
                    return;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the table's pinhole owners"),
            }
        }
        let lost = shared.pinholes.open_count();
        let intercept_port = config.proxy.listen.first().map_or(0, |a| a.port());
        match nft::prepare_table(
            nft_path,
            config.pinholes.mark(),
            intercept_port,
            &config.proxy.intercept,
        )
        .await
        {
            Ok(()) => {
                shared.metrics.table_reloaded(lost as u64);
                tracing::warn!(
                    lost_pinholes = lost,
                    "table inet {} {why} under ftp-alg (nft flush ruleset, a firewall reload?): loaded it again; {lost} open pinholes were lost",
                    nft::TABLE
                );
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "table inet {} {why} under ftp-alg and loading it again failed; retrying in {RETRY:?}", nft::TABLE);
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// A netlink socket subscribed to nftables' change notifications.
struct Events {
    socket: AsyncFd<OwnedFd>,
    buffer: Vec<u8>,
}

impl Events {
    fn open() -> io::Result<Events> {
        let socket = netfilter_socket()?;
        // A multicast subscription delivers nothing to a socket without an address: bind it
        // (the kernel picks the port id).
        // SAFETY: an all-zero sockaddr_nl is valid; the family is set below.
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: the pointer and length describe `address`, which outlives the call.
        let rc = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                std::ptr::from_ref(&address).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        if !set_option(
            &socket,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            SOCKET_BUFFER,
        ) {
            set_option(&socket, libc::SOL_SOCKET, libc::SO_RCVBUF, SOCKET_BUFFER);
        }
        if !set_option(
            &socket,
            libc::SOL_NETLINK,
            libc::NETLINK_ADD_MEMBERSHIP,
            NFNLGRP_NFTABLES,
        ) {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an OwnedFd keeps its descriptor open and always reports the same one while
        // the AsyncFd owns it.
        let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Events {
            socket,
            buffer: vec![0; 64 * 1024],
        })
    }

    /// Wait for a notification about `inet ftp_alg`'s structure, or for notifications lost to
    /// an overflow (which might have been about it).
    async fn next_change(&mut self) -> io::Result<()> {
        loop {
            let buffer = &mut self.buffer;
            let received = self
                .socket
                .async_io(Interest::READABLE, |socket| receive(socket, buffer))
                .await;
            match received {
                Ok(n) if touches_table(&self.buffer[..n]) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Read and discard what is queued now.
    fn drain(&mut self) {
        while receive(self.socket.get_ref(), &mut self.buffer).is_ok() {}
    }
}

fn receive(socket: &OwnedFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe `buffer`, which outlives the call.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n)
        .map(|n| n.min(buffer.len()))
        .map_err(|_| io::Error::last_os_error())
}

/// Whether any message in `datagram` adds or deletes a table, chain, set or rule of
/// `inet ftp_alg`.
fn touches_table(datagram: &[u8]) -> bool {
    let mut rest = datagram;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 16 || len > rest.len() {
            return false;
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let message = &rest[..len];
        if kind >> 8 == NFNL_SUBSYS_NFTABLES
            && STRUCTURE_CHANGES.contains(&(kind & 0xff))
            && message.get(16) == Some(&NFPROTO_INET)
            && table_name(message.get(HEADERS..).unwrap_or_default()) == Some(nft::TABLE.as_bytes())
        {
            return true;
        }
        rest = rest.get(len.div_ceil(4) * 4..).unwrap_or_default();
    }
    false
}

/// The table-name attribute among `attributes`, without its terminating NUL.
fn table_name(attributes: &[u8]) -> Option<&[u8]> {
    let mut rest = attributes;
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        if kind == TABLE_ATTRIBUTE {
            let value = &rest[4..len];
            return Some(value.strip_suffix(&[0]).unwrap_or(value));
        }
        rest = rest.get(len.div_ceil(4) * 4..).unwrap_or_default();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One nftables notification: `kind` (message type), family, and a table-name attribute.
    fn message(kind: u16, family: u8, table: &str) -> Vec<u8> {
        let mut name = table.as_bytes().to_vec();
        name.push(0);
        let attr_len = 4 + name.len();
        let mut attr = Vec::new();
        attr.extend_from_slice(&(attr_len as u16).to_ne_bytes());
        attr.extend_from_slice(&TABLE_ATTRIBUTE.to_ne_bytes());
        attr.extend_from_slice(&name);
        attr.resize(attr_len.div_ceil(4) * 4, 0);
        let len = HEADERS + attr.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | kind).to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[family, 0, 0, 0]);
        m.extend_from_slice(&attr);
        m
    }

    #[test]
    fn only_structure_changes_of_our_table_count() {
        // DELTABLE inet ftp_alg, and DELRULE after an unrelated message in one datagram.
        assert!(touches_table(&message(2, NFPROTO_INET, "ftp_alg")));
        let mut two = message(2, NFPROTO_INET, "filter");
        two.extend(message(8, NFPROTO_INET, "ftp_alg"));
        assert!(touches_table(&two));
        // Another table, another family, an element (NEWSETELEM 12), a truncated message.
        assert!(!touches_table(&message(2, NFPROTO_INET, "filter")));
        assert!(!touches_table(&message(2, 2, "ftp_alg")));
        assert!(!touches_table(&message(12, NFPROTO_INET, "ftp_alg")));
        let whole = message(2, NFPROTO_INET, "ftp_alg");
        for cut in 0..whole.len() {
            assert!(!touches_table(&whole[..cut]), "cut at {cut}");
        }
    }
}
