//! The daemon's table of live sessions: admission under `[limits]`, what `sessions list`
//! shows, and how `sessions kill` reaches a session.
//!
//! A session holds an [`Admitted`] for as long as it runs; dropping it, however the session
//! ends, gives its place back. The proxy copies what operators want to see (user, login,
//! pinholes) from the session core into the registry after each burst of activity, so a
//! listing never waits on a session.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::pinhole::PinholeId;
use crate::session::{Session, TlsState};

/// Identifies a session within one daemon run.
pub type SessionId = u64;

/// A session as `sessions list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The daemon's id for it (what `sessions kill` takes, and pinholes are labelled with).
    pub id: SessionId,
    /// The control connection's client.
    pub client: SocketAddr,
    /// The FTP server, once known.
    pub server: Option<SocketAddr>,
    /// The argument of the client's last USER command.
    pub user: Option<String>,
    /// Whether the server has accepted a login.
    pub logged_in: bool,
    /// TLS on the session (absent in the answer of an older daemon: plain).
    #[serde(default)]
    pub tls: TlsState,
    /// ftp-alg speaks TLS to the server (`tls.upstream = "tls"`; absent from an older daemon).
    #[serde(default)]
    pub upstream_tls: bool,
    /// The pinholes the session holds.
    pub pinholes: Vec<PinholeId>,
    /// When it started, in seconds since the Unix epoch.
    pub started_unix: u64,
    /// Seconds since the client last sent anything.
    pub idle_secs: u64,
}

/// Which limit refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitReached {
    /// `limits.max_sessions`.
    Total,
    /// `limits.max_sessions_per_client`.
    PerClient,
}

impl LimitReached {
    /// The configuration key, for logs.
    pub fn key(self) -> &'static str {
        match self {
            LimitReached::Total => "limits.max_sessions",
            LimitReached::PerClient => "limits.max_sessions_per_client",
        }
    }
}

/// Every live session, and the limits they are admitted under.
pub struct Registry {
    /// `limits.max_sessions`; a reload may change it (see [`Registry::set_limits`]).
    max_sessions: AtomicUsize,
    /// `limits.max_sessions_per_client`, likewise.
    max_per_client: AtomicUsize,
    /// IPv6 clients count per network of this prefix length (`limits.client_prefix_v6`).
    client_prefix_v6: u8,
    inner: Mutex<Inner>,
    /// Signalled when the last session ends.
    emptied: Notify,
}

#[derive(Default)]
struct Inner {
    next_id: SessionId,
    sessions: HashMap<SessionId, Arc<Entry>>,
    per_client: HashMap<IpAddr, usize>,
    admitted_total: u64,
}

/// One live session's registry entry.
pub struct Entry {
    id: SessionId,
    client: SocketAddr,
    started: SystemTime,
    live: Mutex<Live>,
    kill: Notify,
}

/// What the session core last reported.
struct Live {
    server: Option<SocketAddr>,
    user: Option<String>,
    logged_in: bool,
    tls: TlsState,
    upstream_tls: bool,
    pinholes: Vec<PinholeId>,
    last_active: Instant,
}

/// A session's place in the registry; given back when dropped.
pub struct Admitted {
    registry: Arc<Registry>,
    entry: Arc<Entry>,
}

impl Registry {
    /// An empty registry enforcing these limits.
    pub fn new(max_sessions: usize, max_per_client: usize) -> Registry {
        Registry {
            max_sessions: AtomicUsize::new(max_sessions),
            max_per_client: AtomicUsize::new(max_per_client),
            client_prefix_v6: 128,
            inner: Mutex::new(Inner {
                next_id: 1,
                ..Inner::default()
            }),
            emptied: Notify::new(),
        }
    }

    /// Count IPv6 clients per network of `prefix` bits for the per-client limit, rather than
    /// per address: one host commonly holds a whole /64 and can use a new address for every
    /// connection.
    pub fn counting_ipv6_per(mut self, prefix: u8) -> Registry {
        self.client_prefix_v6 = prefix;
        self
    }

    /// Admit new sessions under these limits from now on. Sessions already admitted stay,
    /// even above a lowered limit: they end in their own time.
    pub fn set_limits(&self, max_sessions: usize, max_per_client: usize) {
        self.max_sessions.store(max_sessions, Ordering::Relaxed);
        self.max_per_client.store(max_per_client, Ordering::Relaxed);
    }

    /// What the per-client limit counts `client` as: its address, or for IPv6 its network.
    fn client_key(&self, client: SocketAddr) -> IpAddr {
        match client.ip().to_canonical() {
            IpAddr::V6(v6) => ipnet::Ipv6Net::new(v6, self.client_prefix_v6)
                .map_or(IpAddr::V6(v6), |net| IpAddr::V6(net.network())),
            v4 => v4,
        }
    }

    /// Take a place for a session from `client`, or say which limit is reached.
    pub fn admit(self: &Arc<Self>, client: SocketAddr) -> Result<Admitted, LimitReached> {
        let key = self.client_key(client);
        let mut inner = self.lock();
        if inner.sessions.len() >= self.max_sessions.load(Ordering::Relaxed) {
            return Err(LimitReached::Total);
        }
        let mine = inner.per_client.entry(key).or_insert(0);
        if *mine >= self.max_per_client.load(Ordering::Relaxed) {
            return Err(LimitReached::PerClient);
        }
        *mine += 1;
        let id = inner.next_id;
        inner.next_id += 1;
        inner.admitted_total += 1;
        let entry = Arc::new(Entry {
            id,
            client,
            started: SystemTime::now(),
            live: Mutex::new(Live {
                server: None,
                user: None,
                logged_in: false,
                tls: TlsState::Plain,
                upstream_tls: false,
                pinholes: Vec::new(),
                last_active: Instant::now(),
            }),
            kill: Notify::new(),
        });
        inner.sessions.insert(id, entry.clone());
        Ok(Admitted {
            registry: self.clone(),
            entry,
        })
    }

    /// Sessions open now.
    pub fn count(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Sessions admitted since start.
    pub fn admitted_total(&self) -> u64 {
        self.lock().admitted_total
    }

    /// Every live session, by id.
    pub fn list(&self) -> Vec<SessionInfo> {
        let entries: Vec<Arc<Entry>> = self.lock().sessions.values().cloned().collect();
        let mut infos: Vec<SessionInfo> = entries.iter().map(|e| e.info()).collect();
        infos.sort_by_key(|i| i.id);
        infos
    }

    /// Whether session `id` is still running.
    pub fn is_live(&self, id: SessionId) -> bool {
        self.lock().sessions.contains_key(&id)
    }

    /// Ask session `id` to end; `false` when there is no such session.
    pub fn kill(&self, id: SessionId) -> bool {
        let entry = self.lock().sessions.get(&id).cloned();
        match entry {
            Some(entry) => {
                // A stored permit: the session sees it even if it is not waiting right now.
                entry.kill.notify_one();
                true
            }
            None => false,
        }
    }

    /// Wait until no session is left.
    pub async fn all_ended(&self) {
        loop {
            // Created before the check, so that an end between the check and the wait is seen.
            let emptied = self.emptied.notified();
            if self.count() == 0 {
                return;
            }
            emptied.await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Each update leaves the maps consistent: a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Entry {
    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The server is known.
    pub fn set_server(&self, server: SocketAddr) {
        self.live().server = Some(server);
    }

    /// The client sent something.
    pub fn touch(&self) {
        self.live().last_active = Instant::now();
    }

    /// Copy what operators see from the session core.
    pub fn observe(&self, session: &Session) {
        let mut live = self.live();
        live.logged_in = session.logged_in();
        live.tls = session.tls_state();
        live.upstream_tls = session.upstream_tls();
        if live.user.as_deref() != session.user() {
            live.user = session.user().map(str::to_owned);
        }
        // Called on every pass of the session's loop: refill in place, no allocation.
        live.pinholes.clear();
        live.pinholes.extend(session.pinhole_ids());
    }

    /// Resolves when an operator has asked this session to end.
    pub async fn killed(&self) {
        self.kill.notified().await;
    }

    fn info(&self) -> SessionInfo {
        let live = self.live();
        SessionInfo {
            id: self.id,
            client: self.client,
            server: live.server,
            user: live.user.clone(),
            logged_in: live.logged_in,
            tls: live.tls,
            upstream_tls: live.upstream_tls,
            pinholes: live.pinholes.clone(),
            started_unix: self
                .started
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            idle_secs: live.last_active.elapsed().as_secs(),
        }
    }

    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Admitted {
    /// The session's entry.
    pub fn entry(&self) -> &Entry {
        &self.entry
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        inner.sessions.remove(&self.entry.id);
        let client = self.registry.client_key(self.entry.client);
        if let Some(mine) = inner.per_client.get_mut(&client) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                inner.per_client.remove(&client);
            }
        }
        if inner.sessions.is_empty() {
            self.registry.emptied.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn limits_hold_and_places_come_back() {
        let registry = Arc::new(Registry::new(3, 2));
        let a1 = registry.admit(addr("198.18.0.2:1000")).unwrap();
        let _a2 = registry.admit(addr("198.18.0.2:1001")).unwrap();
        assert_eq!(
            registry.admit(addr("198.18.0.2:1002")).err(),
            Some(LimitReached::PerClient)
        );
        let _b = registry.admit(addr("198.18.0.3:1000")).unwrap();
        assert_eq!(
            registry.admit(addr("198.18.0.4:1000")).err(),
            Some(LimitReached::Total)
        );
        drop(a1);
        assert_eq!(registry.count(), 2);
        let again = registry.admit(addr("198.18.0.2:1003")).unwrap();
        assert_eq!(again.entry().id(), 4, "ids are never reused");
        assert_eq!(registry.admitted_total(), 4);
    }

    #[test]
    fn ipv6_clients_count_per_prefix() {
        let registry = Arc::new(Registry::new(10, 2).counting_ipv6_per(64));
        let _a = registry.admit(addr("[2001:db8:a::2]:1000")).unwrap();
        let b = registry.admit(addr("[2001:db8:a::ffff:1]:1000")).unwrap();
        assert_eq!(
            registry.admit(addr("[2001:db8:a::3]:1000")).err(),
            Some(LimitReached::PerClient),
            "a new address in the same /64 is the same client"
        );
        let _other = registry.admit(addr("[2001:db8:a:1::2]:1000")).unwrap();
        let _v4 = registry.admit(addr("198.18.0.2:1000")).unwrap();
        drop(b);
        assert!(registry.admit(addr("[2001:db8:a::4]:1000")).is_ok());
    }

    #[test]
    fn list_and_kill_by_id() {
        let registry = Arc::new(Registry::new(10, 10));
        let a = registry.admit(addr("198.18.0.2:1000")).unwrap();
        a.entry().set_server(addr("203.0.113.2:21"));
        let listed = registry.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].server, Some(addr("203.0.113.2:21")));
        assert!(registry.kill(1));
        assert!(!registry.kill(2));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), a.entry().killed())
                .await
                .expect("the kill reaches the session even though it was not waiting yet");
        });
    }
}
