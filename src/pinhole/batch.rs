//! What both kernel interfaces share: pinholes as set and map elements, batching, ownership.
//!
//! A pinhole is one element of `pin_v4`/`pin_v6` plus optional elements of the dnat and snat
//! maps (`rules/ftp-alg.nft`); a window is one element of `win_v4`/`win_v6`. Sessions ask for pinholes one at a time and concurrently; a
//! [`Firewall`] queues each request, and one worker task applies whatever has queued up in one
//! kernel transaction, so the fixed cost of a transaction is paid per batch, not per pinhole. A
//! failed batch is retried one request at a time, so one bad request cannot fail the others.
//!
//! This module decides *which* elements to add and delete ([`Change`]); a [`Transaction`] says it
//! to the kernel: [`super::netlink`] over a netlink socket, [`super::nft`] through the nft
//! program. A transport keeps no state of its own about elements.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use tokio::sync::{mpsc, oneshot};

use super::{Backend, BackendError, Pinhole};

/// Most requests applied in one transaction.
const MAX_BATCH: usize = 512;

/// The data a map element maps its key to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    /// A dnat element: the address and port the connection is sent to.
    Endpoint(SocketAddr),
    /// An snat element: the source address the connection is given.
    Address(IpAddr),
}

/// One set or map element of a pinhole, keyed on `source . dest address . dest port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Element {
    /// The set or map, as named in `rules/ftp-alg.nft` (`pin_v4`, `dnat_v6`, ...).
    pub set: &'static str,
    /// First field of the key.
    pub source: IpAddr,
    /// Second and third fields of the key (the third, a window's first port).
    pub dest: SocketAddr,
    /// A window's last port: its third field is the range from `dest`'s port to this one.
    pub last_port: Option<u16>,
    /// What a map element maps to; `None` in a set.
    pub value: Option<Value>,
    /// Kernel-side lifetime in whole seconds, as nft counts it.
    pub timeout_secs: u32,
    /// The pinhole's label ([`super::Label::to_comment`]).
    pub comment: String,
}

impl fmt::Display for Element {
    /// The element as nft writes it, e.g. `pin_v4 { 198.18.0.2 . 198.18.0.1 . 61000 }` or
    /// `win_v4 { 198.18.0.2 . 203.0.113.2 . 1024-65535 }`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {{ {} . {} . {}",
            self.set,
            self.source,
            self.dest.ip(),
            self.dest.port()
        )?;
        if let Some(last) = self.last_port {
            write!(f, "-{last}")?;
        }
        f.write_str(" }")
    }
}

/// What a transaction does with an element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verb {
    /// Add it; a no-op when an equal element is there already.
    Add,
    /// Delete it; the kernel refuses (and fails the transaction) when it is not there.
    Delete,
}

/// One step of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    /// Add or delete.
    pub verb: Verb,
    /// The element.
    pub element: Element,
}

/// A way to apply changes to the kernel, and to ask it what it holds.
pub(crate) trait Transaction: Send + 'static {
    /// Apply `changes`, in order, in one kernel transaction: all or none.
    fn commit(
        &mut self,
        changes: &[Change],
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Whether each of `elements` is in the kernel now (its value, if any, is not compared).
    fn present(
        &mut self,
        elements: &[Element],
    ) -> impl Future<Output = Result<Vec<bool>, BackendError>> + Send;
}

/// This process's id, as pinhole comments name their owner: asked of the kernel once, not
/// once per element (glibc does not cache it).
fn own_pid() -> u32 {
    static PID: OnceLock<u32> = OnceLock::new();
    *PID.get_or_init(std::process::id)
}

/// The set and map elements that make up one pinhole, or the one element of a window.
pub(crate) fn elements(p: &Pinhole) -> Result<Vec<Element>, BackendError> {
    let mixed = || BackendError::Invalid(format!("pinhole mixes address families: {p:?}"));
    let v6 = match (p.source, p.dial.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => false,
        (IpAddr::V6(_), IpAddr::V6(_)) => true,
        _ => return Err(mixed()),
    };
    let translated = p.translated();
    if translated.is_ipv6() != v6 || p.snat.is_some_and(|s| s.is_ipv6() != v6) {
        return Err(mixed());
    }
    let name = |v4: &'static str, v6_name: &'static str| if v6 { v6_name } else { v4 };
    // Every element carries the label, so that `pinholes list` can still say whose a pinhole
    // is after its connection has arrived and the pin element is gone. Formatted once: this
    // runs for every install, liveness query and removal, on the path of the 227.
    let comment = p.label.to_comment(own_pid());
    let element = |set, dest, value| Element {
        set,
        source: p.source,
        dest,
        last_port: None,
        value,
        timeout_secs: u32::try_from(p.timeout.as_secs().max(1)).unwrap_or(u32::MAX),
        comment: comment.clone(),
    };
    if let Some(last) = p.last_port {
        // A window translates its connections' source only, and its map element says to what.
        let (Some(from), None) = (p.snat, p.dnat) else {
            return Err(BackendError::Invalid(format!(
                "a window needs a source translation and no destination one: {p:?}"
            )));
        };
        if last < p.dial.port() {
            return Err(BackendError::Invalid(format!(
                "window with an empty port range: {p:?}"
            )));
        }
        return Ok(vec![Element {
            last_port: Some(last),
            ..element(name("win_v4", "win_v6"), p.dial, Some(Value::Address(from)))
        }]);
    }
    let mut out = vec![element(name("pin_v4", "pin_v6"), p.dial, None)];
    if let Some(to) = p.dnat {
        out.push(element(
            name("dnat_v4", "dnat_v6"),
            p.dial,
            Some(Value::Endpoint(to)),
        ));
    }
    if let Some(from) = p.snat {
        out.push(element(
            name("snat_v4", "snat_v6"),
            translated,
            Some(Value::Address(from)),
        ));
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Install,
    Remove,
    /// Write the elements again, with a fresh kernel timeout; owners stay as they are.
    Refresh,
}

struct Job {
    op: Op,
    pinholes: Vec<Pinhole>,
    done: oneshot::Sender<Result<(), BackendError>>,
}

/// A question for the worker: which of these pinholes still wait for their connection?
struct Query {
    pinholes: Vec<Pinhole>,
    done: oneshot::Sender<Result<Vec<bool>, BackendError>>,
}

/// What the worker is asked to do, in the order asked: a query is answered after every change
/// queued before it has been applied.
enum Request {
    Change(Job),
    Query(Query),
}

/// The firewall backend the daemon uses: a handle to the worker task that batches requests
/// into transactions of one kernel interface (see [`super::netlink::backend`] and
/// [`super::nft::backend`]).
///
/// Requests are queued when `install` or `remove` is called, not when the returned future is
/// first polled, so they reach the kernel in call order even when a caller does not wait.
#[derive(Clone)]
pub struct Firewall {
    jobs: mpsc::UnboundedSender<Request>,
}

impl Firewall {
    /// Start the batching worker on the current tokio runtime.
    pub(crate) fn start(transaction: impl Transaction) -> Firewall {
        let (jobs, rx) = mpsc::unbounded_channel();
        let worker = Worker {
            transaction,
            owners: HashMap::new(),
            undo: Vec::new(),
        };
        tokio::spawn(worker.run(rx));
        Firewall { jobs }
    }

    fn submit(
        &self,
        op: Op,
        pinholes: Vec<Pinhole>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        let (done, result) = oneshot::channel();
        let queued = self
            .jobs
            .send(Request::Change(Job { op, pinholes, done }))
            .is_ok();
        async move {
            if !queued {
                return Err(BackendError::WorkerGone);
            }
            result.await.map_err(|_| BackendError::WorkerGone)?
        }
    }
}

impl Backend for Firewall {
    fn install(
        &self,
        pinholes: Vec<Pinhole>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + use<> {
        self.submit(Op::Install, pinholes)
    }

    fn remove(
        &self,
        pinholes: Vec<Pinhole>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + use<> {
        self.submit(Op::Remove, pinholes)
    }

    fn refresh(
        &self,
        pinholes: Vec<Pinhole>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + use<> {
        self.submit(Op::Refresh, pinholes)
    }

    fn waiting(
        &self,
        pinholes: Vec<Pinhole>,
    ) -> impl Future<Output = Result<Vec<bool>, BackendError>> + Send + use<> {
        let (done, result) = oneshot::channel();
        let queued = self
            .jobs
            .send(Request::Query(Query { pinholes, done }))
            .is_ok();
        async move {
            if !queued {
                return Err(BackendError::WorkerGone);
            }
            result.await.map_err(|_| BackendError::WorkerGone)?
        }
    }
}

/// A set or map element as the kernel identifies it: the set's name and the key.
type ElementKey = (&'static str, IpAddr, SocketAddr);

/// How many open pinholes use one element, and the value it holds in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Owned {
    count: usize,
    /// A map element's value as last written: the kernel refuses to add an element
    /// whose key is there with another value (EEXIST, even without NLM_F_EXCL), so an add
    /// before a delete must say this one.
    value: Option<Value>,
}

/// Applies queued jobs, and counts how many open pinholes use each element: two pinholes can
/// share one (two sessions of one client reaching the same server port, a server that
/// announces the same passive port twice, or a shared public port handed to the same client
/// again once its earlier pinhole's connection has arrived), and closing one must not remove
/// the other's.
struct Worker<T> {
    transaction: T,
    owners: HashMap<ElementKey, Owned>,
    /// What the batch being applied changed in `owners`, in order: (element, what it was
    /// before). A refused batch is undone from it, at the cost of the batch's size, not of
    /// every element open.
    undo: Vec<(ElementKey, Option<Owned>)>,
}

impl<T: Transaction> Worker<T> {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Request>) {
        // A change read while collecting queries, kept for the next round.
        let mut next = None;
        loop {
            let first = match next.take() {
                Some(request) => request,
                None => match rx.recv().await {
                    Some(request) => request,
                    None => break,
                },
            };
            let mut jobs = Vec::new();
            let mut queries = Vec::new();
            match first {
                Request::Change(job) => jobs.push(job),
                Request::Query(q) => queries.push(q),
            }
            while queries.is_empty() && jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Request::Change(job)) => jobs.push(job),
                    Ok(Request::Query(q)) => queries.push(q),
                    Err(_) => break,
                }
            }
            // Every query queued right behind the first is answered by the same look at the
            // kernel: announcements waiting for a port all ask at once, and with the nft
            // backend each look is a process.
            if !queries.is_empty() {
                while let Ok(request) = rx.try_recv() {
                    match request {
                        Request::Query(q) => queries.push(q),
                        change => {
                            next = Some(change);
                            break;
                        }
                    }
                }
            }
            if !jobs.is_empty() {
                self.run_jobs(jobs).await;
            }
            if !queries.is_empty() {
                self.answer(queries).await;
            }
        }
    }

    /// Answer `queries` with one look at the kernel.
    async fn answer(&mut self, queries: Vec<Query>) {
        let all: Vec<Pinhole> = queries
            .iter()
            .flat_map(|q| q.pinholes.iter().cloned())
            .collect();
        // A requester that went away no longer needs the answer.
        match self.waiting(&all).await {
            Ok(found) => {
                let mut found = found.into_iter();
                for q in queries {
                    let part = found.by_ref().take(q.pinholes.len()).collect();
                    let _ = q.done.send(Ok(part));
                }
            }
            Err(e) => {
                for q in queries {
                    let _ = q.done.send(Err(e.clone()));
                }
            }
        }
    }

    /// Which of `pinholes` still have their pin element in the kernel (their connection has
    /// not arrived and they have not timed out).
    async fn waiting(&mut self, pinholes: &[Pinhole]) -> Result<Vec<bool>, BackendError> {
        let mut pins = Vec::with_capacity(pinholes.len());
        for pinhole in pinholes {
            // The first element of a pinhole is its pin element.
            if let Some(pin) = elements(pinhole)?.into_iter().next() {
                pins.push(pin);
            }
        }
        if pins.is_empty() {
            return Ok(Vec::new());
        }
        self.transaction.present(&pins).await
    }

    /// Apply `jobs` in one transaction if the kernel takes them, else one by one, and answer
    /// each.
    async fn run_jobs(&mut self, jobs: Vec<Job>) {
        let result = self.apply(&jobs).await;
        if result.is_err() && jobs.len() > 1 {
            self.undo();
            tracing::debug!(jobs = jobs.len(), "batch refused; retrying one by one");
            for job in jobs {
                let result = self.apply(std::slice::from_ref(&job)).await;
                if result.is_err() && job.op == Op::Install {
                    self.undo();
                }
                let _ = job.done.send(result);
            }
            return;
        }
        if result.is_err() && jobs.iter().any(|j| j.op == Op::Install) {
            self.undo();
        }
        for job in jobs {
            // A requester that went away no longer needs the answer.
            let _ = job.done.send(result.clone());
        }
    }

    /// One transaction for all `jobs`; owner counts are updated as if it succeeds. An element
    /// whose last owner is removed is forgotten once the removal succeeds; if it fails, the
    /// element may still be in the kernel (until its timeout) and is kept with no owner, so
    /// that a later install of the same key replaces it rather than colliding with its value.
    async fn apply(&mut self, jobs: &[Job]) -> Result<(), BackendError> {
        self.undo.clear();
        let mut live = self.live_pins(jobs).await?;
        let mut changes = Vec::new();
        for job in jobs {
            for pinhole in &job.pinholes {
                for element in elements(pinhole)? {
                    self.stage(job.op, element, &mut changes, &mut live);
                }
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        self.transaction.commit(&changes).await?;
        for (key, _) in &self.undo {
            if self.owners.get(key).is_some_and(|o| o.count == 0) {
                self.owners.remove(key);
            }
        }
        Ok(())
    }

    /// Which pin elements that `jobs` would delete or replace are in the kernel now.
    ///
    /// A pin element is deleted by the packet path when its connection arrives, and that
    /// delete only marks it dead: it stays in its hash chain until the set's garbage
    /// collection. Adding the key again to delete it safely (as map elements are, see
    /// [`Worker::stage`]) would put one more copy in that chain, and a port handed to the same
    /// peer again and again fills it until the kernel refuses (EBUSY). So the kernel is asked
    /// first, and only a live pin element is deleted. One that is used between the question
    /// and the transaction makes the delete fail with ENOENT; the one-by-one retry asks again.
    async fn live_pins(&mut self, jobs: &[Job]) -> Result<HashSet<ElementKey>, BackendError> {
        let mut pins = Vec::new();
        let mut seen = HashSet::new();
        for job in jobs {
            for pinhole in &job.pinholes {
                // A window's element is a map element, which the packet path never deletes.
                let pin = elements(pinhole)?
                    .into_iter()
                    .next()
                    .filter(|e| e.value.is_none());
                if let Some(pin) = pin {
                    let key = (pin.set, pin.source, pin.dest);
                    if self.owners.contains_key(&key) && seen.insert(key) {
                        pins.push(pin);
                    }
                }
            }
        }
        if pins.is_empty() {
            return Ok(HashSet::new());
        }
        let present = self.transaction.present(&pins).await?;
        Ok(pins
            .iter()
            .zip(present)
            .filter(|(_, present)| *present)
            .map(|(pin, _)| (pin.set, pin.source, pin.dest))
            .collect())
    }

    /// Put back the owner counts that the last [`Worker::apply`] changed.
    fn undo(&mut self) {
        for (key, before) in self.undo.drain(..).rev() {
            match before {
                None => self.owners.remove(&key),
                Some(owned) => self.owners.insert(key, owned),
            };
        }
    }

    /// Add one element's changes to `changes`, if the kernel needs any. `live` holds the pin
    /// elements known to be in the kernel (see [`Worker::live_pins`]), as this batch leaves
    /// them so far.
    fn stage(
        &mut self,
        op: Op,
        element: Element,
        changes: &mut Vec<Change>,
        live: &mut HashSet<ElementKey>,
    ) {
        let key = (element.set, element.source, element.dest);
        let before = self.owners.get(&key).cloned();
        self.undo.push((key, before.clone()));
        // The element as the kernel holds it now (the value last written for this key).
        let current = Element {
            value: before
                .as_ref()
                .map_or_else(|| element.value.clone(), |o| o.value.clone()),
            ..element.clone()
        };
        let mut push = |verb, element: &Element| {
            changes.push(Change {
                verb,
                element: element.clone(),
            })
        };
        // A pin element (a set element, no value) is deleted only when it is live, never added
        // to be deleted (see `live_pins`).
        let pin = element.value.is_none();
        match op {
            // Only what some open pinhole owns is renewed: a refresh racing a removal must not
            // bring the element back. Added, deleted and added again with the new timeout, as an
            // install replaces a shared element: the kernel's add alone keeps the old timeout.
            Op::Refresh if before.as_ref().is_some_and(|o| o.count > 0) => {
                push(Verb::Add, &current);
                push(Verb::Delete, &current);
                push(Verb::Add, &element);
            }
            Op::Refresh => {}
            Op::Install if pin => {
                if live.contains(&key) {
                    // Replace it, so that its timeout and label are the new pinhole's.
                    push(Verb::Delete, &current);
                }
                push(Verb::Add, &element);
                live.insert(key);
                let count = before.as_ref().map_or(0, |o| o.count);
                self.owners.insert(
                    key,
                    Owned {
                        count: count + 1,
                        value: None,
                    },
                );
            }
            Op::Install => {
                let count = before.as_ref().map_or(0, |o| o.count);
                // An entry with no owner is one whose removal failed: it may be there.
                if before.is_some() {
                    // Already there for another pinhole: replace it, so that the timeout, the
                    // label and a map's value are the new pinhole's. The add (of what is there,
                    // a no-op unless the kernel has dropped it) lets the delete succeed either
                    // way; nft's `add element` alone would not replace a map's value, and one
                    // with another value than the kernel's is refused with EEXIST.
                    push(Verb::Add, &current);
                    push(Verb::Delete, &current);
                }
                push(Verb::Add, &element);
                self.owners.insert(
                    key,
                    Owned {
                        count: count + 1,
                        value: element.value.clone(),
                    },
                );
            }
            Op::Remove => match self.owners.get_mut(&key) {
                Some(owned) if owned.count > 1 => owned.count -= 1,
                _ => {
                    // Kept, with no owner, until the removal is known to have succeeded.
                    self.owners.insert(
                        key,
                        Owned {
                            count: 0,
                            value: current.value.clone(),
                        },
                    );
                    // A map element may be gone already: the kernel drops an element when its
                    // timeout runs out. So it is added first (a no-op when it exists), and the
                    // delete then succeeds either way. Deleting it alone and ignoring ENOENT
                    // would not do, even over netlink, where the errno of each message is
                    // seen: the kernel aborts the whole batch at a failed message, and with it
                    // every other request batched in. A `destroy` that ignores a missing
                    // element exists only from Linux 6.3 (NFT_MSG_DESTROYSETELEM; Debian 12
                    // runs 6.1) and is not in nft 1.0.6. A pin element, which the packet path
                    // deletes, is deleted only if the kernel still has it (`live_pins`).
                    if !pin {
                        push(Verb::Add, &current);
                        push(Verb::Delete, &current);
                    } else if live.remove(&key) {
                        push(Verb::Delete, &current);
                    }
                }
            },
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pinhole::Label;
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A pinhole with all three elements (reverse mode, passive).
    pub(crate) fn pinhole() -> Pinhole {
        Pinhole {
            source: "198.18.0.2".parse().unwrap(),
            dial: "198.18.0.1:61000".parse().unwrap(),
            last_port: None,
            dnat: Some("203.0.113.2:40000".parse().unwrap()),
            snat: Some("203.0.113.1".parse().unwrap()),
            label: Label {
                session: 3,
                client: "198.18.0.2".parse().unwrap(),
                server: "203.0.113.2".parse().unwrap(),
            },
            timeout: Duration::from_secs(30),
        }
    }

    /// A gateway window: client 198.18.0.2 to server 203.0.113.2's ports 1024-65535, its
    /// connections given the source 203.0.113.1.
    pub(crate) fn window() -> Pinhole {
        Pinhole {
            dial: "203.0.113.2:1024".parse().unwrap(),
            last_port: Some(65535),
            dnat: None,
            ..pinhole()
        }
    }

    /// Commits nothing, and succeeds unless told to refuse: these tests look at what the
    /// worker stages and counts.
    struct Refuses(bool);

    impl Transaction for Refuses {
        fn commit(
            &mut self,
            _: &[Change],
        ) -> impl Future<Output = Result<(), BackendError>> + Send {
            std::future::ready(if self.0 {
                Err(BackendError::Invalid("refused".into()))
            } else {
                Ok(())
            })
        }

        fn present(
            &mut self,
            elements: &[Element],
        ) -> impl Future<Output = Result<Vec<bool>, BackendError>> + Send {
            std::future::ready(Ok(vec![true; elements.len()]))
        }
    }

    fn worker() -> Worker<Refuses> {
        Worker {
            transaction: Refuses(false),
            owners: HashMap::new(),
            undo: Vec::new(),
        }
    }

    /// Stage `op` of `pinhole` as `apply` does when the kernel has every pin element the
    /// worker knows of (`Refuses::present`), and return its changes.
    fn stage_all(worker: &mut Worker<Refuses>, op: Op, pinhole: &Pinhole) -> Vec<Change> {
        let mut live: HashSet<ElementKey> = worker.owners.keys().copied().collect();
        let mut changes = Vec::new();
        for element in elements(pinhole).unwrap() {
            worker.stage(op, element, &mut changes, &mut live);
        }
        changes
    }

    /// Stage one op of `pinhole` and return its changes, e.g. `["add pin_v4", ...]`.
    fn staged(worker: &mut Worker<Refuses>, op: Op, pinhole: &Pinhole) -> Vec<String> {
        let changes = stage_all(worker, op, pinhole);
        changes
            .iter()
            .map(|c| {
                let verb = match c.verb {
                    Verb::Add => "add",
                    Verb::Delete => "delete",
                };
                format!("{verb} {}", c.element.set)
            })
            .collect()
    }

    #[test]
    fn shared_elements_stay_until_their_last_owner_closes() {
        let mut worker = worker();
        let p = pinhole();
        // The pin element first, then the dnat and snat map elements.
        let sets = |pin: &[&str], maps: &[&str]| -> Vec<String> {
            let each = |set: &'static str, verbs: &[&str]| -> Vec<String> {
                verbs.iter().map(|v| format!("{v} {set}")).collect()
            };
            [
                each("pin_v4", pin),
                each("dnat_v4", maps),
                each("snat_v4", maps),
            ]
            .concat()
        };
        assert_eq!(
            staged(&mut worker, Op::Install, &p),
            sets(&["add"], &["add"])
        );
        // A second owner replaces each element, refreshing its timeout and label: a live pin
        // element is deleted and added; a map element is added (what the kernel holds, so that
        // the delete cannot fail), deleted and added.
        assert_eq!(
            staged(&mut worker, Op::Install, &p),
            sets(&["delete", "add"], &["add", "delete", "add"])
        );
        assert!(staged(&mut worker, Op::Remove, &p).is_empty());
        assert_eq!(
            staged(&mut worker, Op::Remove, &p),
            sets(&["delete"], &["add", "delete"])
        );
        // Kept with no owner until the removal is known to have succeeded...
        assert!(worker.owners.values().all(|o| o.count == 0));
        // ...so that installing the key again replaces whatever may be left of it.
        assert_eq!(
            staged(&mut worker, Op::Install, &p),
            sets(&["delete", "add"], &["add", "delete", "add"])
        );
    }

    /// A window is one map element; a refresh writes it again (its timeout starts over) only
    /// while some window owns it, and leaves the owner count alone.
    #[test]
    fn a_window_is_refreshed_only_while_owned() {
        let mut worker = worker();
        let w = window();
        assert_eq!(staged(&mut worker, Op::Install, &w), ["add win_v4"]);
        assert_eq!(
            staged(&mut worker, Op::Refresh, &w),
            ["add win_v4", "delete win_v4", "add win_v4"]
        );
        assert_eq!(worker.owners.values().map(|o| o.count).sum::<usize>(), 1);
        assert_eq!(
            staged(&mut worker, Op::Remove, &w),
            ["add win_v4", "delete win_v4"]
        );
        assert!(
            staged(&mut worker, Op::Refresh, &w).is_empty(),
            "a refresh racing the removal does not bring the window back"
        );
        let e = elements(&w).unwrap();
        assert_eq!(
            e[0].to_string(),
            "win_v4 { 198.18.0.2 . 203.0.113.2 . 1024-65535 }"
        );
        let mut bad = w.clone();
        bad.snat = None;
        assert!(elements(&bad).is_err());
    }

    /// A used pin element (the packet path has deleted it) is neither deleted nor added to be
    /// deleted: only its map elements are removed.
    #[test]
    fn a_used_pin_element_is_left_to_the_kernel() {
        let mut worker = worker();
        let p = pinhole();
        let mut changes = Vec::new();
        let mut used = HashSet::new();
        for element in elements(&p).unwrap() {
            worker.stage(Op::Install, element, &mut Vec::new(), &mut used);
        }
        used.clear();
        for element in elements(&p).unwrap() {
            worker.stage(Op::Remove, element, &mut changes, &mut used);
        }
        let sets: Vec<_> = changes.iter().map(|c| c.element.set).collect();
        assert_eq!(sets, ["dnat_v4", "dnat_v4", "snat_v4", "snat_v4"]);
    }

    #[test]
    fn a_removal_that_succeeds_forgets_its_elements() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let job = |op| Job {
            op,
            pinholes: vec![pinhole()],
            done: oneshot::channel().0,
        };
        let mut worker = worker();
        runtime.block_on(worker.apply(&[job(Op::Install)])).unwrap();
        runtime.block_on(worker.apply(&[job(Op::Remove)])).unwrap();
        assert!(worker.owners.is_empty());
        runtime.block_on(worker.apply(&[job(Op::Install)])).unwrap();
        worker.transaction.0 = true;
        assert!(runtime.block_on(worker.apply(&[job(Op::Remove)])).is_err());
        assert_eq!(
            worker.owners.len(),
            3,
            "a failed removal keeps what it knows"
        );
    }

    /// A shared public port handed to the same client again, for another server port: the
    /// dnat element is replaced by delete-then-add, and every add before a delete names the
    /// value the kernel holds (else it answers EEXIST).
    #[test]
    fn a_new_target_on_the_same_key_replaces_the_map_value() {
        let mut worker = worker();
        let first = pinhole();
        let mut second = pinhole();
        second.dnat = Some("203.0.113.2:40001".parse().unwrap());
        let dnat_changes = |worker: &mut Worker<Refuses>, op, p: &Pinhole| {
            stage_all(worker, op, p)
                .into_iter()
                .filter(|c| c.element.set == "dnat_v4")
                .map(|c| (c.verb, c.element.value))
                .collect::<Vec<_>>()
        };
        let to = |port: u16| {
            Some(Value::Endpoint(SocketAddr::new(
                "203.0.113.2".parse().unwrap(),
                port,
            )))
        };
        dnat_changes(&mut worker, Op::Install, &first);
        assert_eq!(
            dnat_changes(&mut worker, Op::Install, &second),
            [
                (Verb::Add, to(40000)),
                (Verb::Delete, to(40000)),
                (Verb::Add, to(40001))
            ]
        );
        // The older pinhole closes first: the element stays, with the newer value.
        assert!(dnat_changes(&mut worker, Op::Remove, &first).is_empty());
        assert_eq!(
            dnat_changes(&mut worker, Op::Remove, &second),
            [(Verb::Add, to(40001)), (Verb::Delete, to(40001))]
        );
        // Also when the newer one closes first and the older one last.
        dnat_changes(&mut worker, Op::Install, &first);
        dnat_changes(&mut worker, Op::Install, &second);
        assert!(dnat_changes(&mut worker, Op::Remove, &second).is_empty());
        assert_eq!(
            dnat_changes(&mut worker, Op::Remove, &first),
            [(Verb::Add, to(40001)), (Verb::Delete, to(40001))]
        );
    }

    #[test]
    fn a_refused_batch_leaves_the_owner_counts_as_they_were() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let job = |op, pinhole| Job {
            op,
            pinholes: vec![pinhole],
            done: oneshot::channel().0,
        };
        let mut worker = worker();
        runtime
            .block_on(worker.apply(&[job(Op::Install, pinhole())]))
            .unwrap();
        let before = worker.owners.clone();
        worker.transaction.0 = true;
        let mut other = pinhole();
        other.dial = "198.18.0.1:61001".parse().unwrap();
        let refused = runtime.block_on(worker.apply(&[
            job(Op::Install, pinhole()),
            job(Op::Install, other),
            job(Op::Remove, pinhole()),
        ]));
        assert!(refused.is_err());
        assert_ne!(worker.owners, before);
        worker.undo();
        assert_eq!(worker.owners, before);
    }

    /// A kernel for the worker to commit to, like nf_tables: a transaction applies all its
    /// changes or none, an add of an element already there changes nothing, a delete of one
    /// that is not there fails the transaction. It also refuses every transaction that touches
    /// an element dialled at `poisoned`, and records each transaction's outcome.
    #[derive(Clone)]
    struct Kernel {
        elements: Arc<Mutex<HashSet<ElementKey>>>,
        outcomes: Arc<Mutex<Vec<bool>>>,
        poisoned: SocketAddr,
    }

    impl Transaction for Kernel {
        fn commit(
            &mut self,
            changes: &[Change],
        ) -> impl Future<Output = Result<(), BackendError>> + Send {
            let mut elements = self.elements.lock().unwrap();
            let mut after = elements.clone();
            let applied = !changes.iter().any(|c| c.element.dest == self.poisoned)
                && changes.iter().all(|c| {
                    let key = (c.element.set, c.element.source, c.element.dest);
                    match c.verb {
                        Verb::Add => {
                            after.insert(key);
                            true
                        }
                        Verb::Delete => after.remove(&key),
                    }
                });
            if applied {
                *elements = after;
            }
            self.outcomes.lock().unwrap().push(applied);
            std::future::ready(if applied {
                Ok(())
            } else {
                Err(BackendError::Invalid("refused".into()))
            })
        }

        fn present(
            &mut self,
            elements: &[Element],
        ) -> impl Future<Output = Result<Vec<bool>, BackendError>> + Send {
            let held = self.elements.lock().unwrap();
            let present = elements
                .iter()
                .map(|e| held.contains(&(e.set, e.source, e.dest)))
                .collect();
            std::future::ready(Ok(present))
        }
    }

    /// The worker's own path for a refused batch: it undoes the batch's owner counts, then
    /// applies each request alone. Only the bad request fails; the others' pinholes are in
    /// the kernel exactly as if each had come alone, an element they share (the SNAT element
    /// here) stays until its last owner is removed, and then goes.
    #[test]
    fn a_refused_batch_is_undone_and_retried_one_by_one() {
        let at = |port: u16| Pinhole {
            dial: SocketAddr::from(([198, 18, 0, 1], port)),
            ..pinhole()
        };
        let (a, bad, b) = (at(61000), at(61001), at(61002));
        let kernel = Kernel {
            elements: Arc::default(),
            outcomes: Arc::default(),
            poisoned: bad.dial,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let firewall = runtime.block_on(async { Firewall::start(kernel.clone()) });
        let results = runtime.block_on(async {
            // Queued before the worker first runs, so they make one batch.
            let install_a = firewall.install(vec![a.clone()]);
            let install_bad = firewall.install(vec![bad]);
            let install_b = firewall.install(vec![b.clone()]);
            let remove_a = firewall.remove(vec![a]);
            [
                install_a.await.is_ok(),
                install_bad.await.is_ok(),
                install_b.await.is_ok(),
                remove_a.await.is_ok(),
            ]
        });
        assert_eq!(
            results,
            [true, false, true, true],
            "install a, bad, b; remove a"
        );
        assert_eq!(
            *kernel.outcomes.lock().unwrap(),
            [false, true, false, true, true],
            "the batch, then each request alone"
        );
        let expected: HashSet<ElementKey> = elements(&b)
            .unwrap()
            .iter()
            .map(|e| (e.set, e.source, e.dest))
            .collect();
        assert_eq!(
            *kernel.elements.lock().unwrap(),
            expected,
            "b's elements only"
        );
        // Owner counts left as the refused batch staged them would keep b's elements now.
        let removed = runtime.block_on(firewall.remove(vec![b]));
        assert!(removed.is_ok());
        assert!(
            kernel.elements.lock().unwrap().is_empty(),
            "b's elements removed"
        );
    }

    #[test]
    fn elements_are_keyed_on_the_arriving_and_the_translated_tuple() {
        let elements = elements(&pinhole()).unwrap();
        let shown: Vec<String> = elements.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "pin_v4 { 198.18.0.2 . 198.18.0.1 . 61000 }",
                "dnat_v4 { 198.18.0.2 . 198.18.0.1 . 61000 }",
                "snat_v4 { 198.18.0.2 . 203.0.113.2 . 40000 }",
            ]
        );
        assert_eq!(
            elements[1].value,
            Some(Value::Endpoint("203.0.113.2:40000".parse().unwrap()))
        );
        let comment = format!(
            "pid={} session=3 client=198.18.0.2 server=203.0.113.2",
            std::process::id()
        );
        assert!(elements
            .iter()
            .all(|e| e.timeout_secs == 30 && e.comment == comment));
    }

    #[test]
    fn mixed_families_are_refused() {
        let mut p = pinhole();
        p.dnat = Some("[2001:db8::2]:40000".parse().unwrap());
        assert!(matches!(elements(&p), Err(BackendError::Invalid(_))));
    }
}
