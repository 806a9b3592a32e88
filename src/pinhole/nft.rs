//! The nft program: loads the daemon's table, lists pinholes, and is one of the two ways to
//! install them.
//!
//! The daemon's table (`rules/ftp-alg.nft`) is loaded as nft text at start-up, and `pinholes
//! list` reads it back as nft's JSON; this module and [`super::netlink`] are the only code in
//! ftp-alg that talks to the kernel firewall. With `pinholes.backend = "nft"`, pinholes are set
//! and map elements built as typed JSON with the `nftables` crate and applied with
//! `nft -j -f -`, one nft process (a few milliseconds) per batch of requests (see
//! `super::batch`).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use nftables::batch::Batch;
use nftables::expr::{Elem, Expression, NamedExpression, Range};
use nftables::schema::{self, NfListObject};
use nftables::types::NfFamily;
use tokio::io::AsyncWriteExt;

use super::batch::{Change, Element, Transaction, Value, Verb};
use super::{BackendError, Firewall, Label, PinholeEntry, PinholeKind, PinholeState};
use crate::config::CtMark;

/// The table the daemon owns (family inet); fixed so that any tool can find it.
pub const TABLE: &str = "ftp_alg";
/// The table definition shipped in `rules/`.
pub const RULES: &str = include_str!("../../rules/ftp-alg.nft");
/// Longest an nft run may take before it is killed and its requests fail.
const NFT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The definitions `rules/ftp-alg.nft` expects before it.
fn definitions(mark: CtMark, intercept_port: u16) -> String {
    format!(
        "define ALG_MARK = {:#010x}\ndefine ALG_MASK = {:#010x}\ndefine ALG_KEEP = {:#010x}\n\
         define INTERCEPT_PORT = {intercept_port}\n",
        mark.value, mark.mask, !mark.mask
    )
}

/// The full script that (re)creates the daemon's table: definitions, an atomic replacement of
/// any previous table (which sweeps its stale pinholes), and the interfaces to intercept.
pub fn table_script(mark: CtMark, intercept_port: u16, intercept: &[String]) -> String {
    let mut script = format!(
        "{}table inet {TABLE}\ndelete table inet {TABLE}\n{RULES}\n",
        definitions(mark, intercept_port)
    );
    for iface in intercept {
        script.push_str(&format!(
            "add element inet {TABLE} intercept_ifaces {{ \"{iface}\" }}\n"
        ));
    }
    script
}

/// Get the daemon's table ready for this process.
///
/// When no other live process owns a pinhole in it (a first start, a restart after a stop or a
/// crash), the table is replaced: [`table_script`] sweeps every element a previous run left.
/// When one does (a predecessor serving its sessions after a hand-over), its pinholes must live
/// on: every element is kept but those whose owner is gone, and the chains and the intercepted
/// interfaces are brought up to this configuration in one transaction. If that transaction is
/// refused (a new version whose sets are defined differently), the table is left as it is, and
/// a restart once the predecessor has ended applies the new rules.
pub async fn prepare_table(
    nft: &Path,
    mark: CtMark,
    intercept_port: u16,
    intercept: &[String],
) -> Result<(), BackendError> {
    let Some(raw) = list_table_json(nft).await? else {
        return load_table(nft, mark, intercept_port, intercept).await;
    };
    let me = std::process::id();
    let listing = TableListing::parse(&raw);
    let live: Vec<u32> = listing
        .owners()
        .into_iter()
        .filter(|&pid| pid != me && alive_here(pid))
        .collect();
    if live.is_empty() {
        return load_table(nft, mark, intercept_port, intercept).await;
    }
    tracing::info!(
        ?live,
        "the table holds pinholes of a live predecessor: keeping them"
    );
    let mut script = definitions(mark, intercept_port);
    for chain in &listing.chains {
        script.push_str(&format!("flush chain inet {TABLE} {chain}\n"));
    }
    script.push_str(RULES);
    script.push_str(&format!("\nflush set inet {TABLE} intercept_ifaces\n"));
    for iface in intercept {
        script.push_str(&format!(
            "add element inet {TABLE} intercept_ifaces {{ \"{iface}\" }}\n"
        ));
    }
    let mut swept = 0;
    for (set, key, owner) in &listing.elements {
        if owner.is_none_or(|pid| !live.contains(&pid) && pid != me) {
            script.push_str(&format!("delete element inet {TABLE} {set} {{ {key} }}\n"));
            swept += 1;
        }
    }
    match run_script(nft, &script).await {
        Ok(()) => {
            tracing::info!(swept, "table rules refreshed; stale pinholes swept");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot refresh the table's rules while a predecessor still uses it; keeping them as they are until a restart");
            Ok(())
        }
    }
}

/// Whether process `pid` runs, in this network namespace (pids are shared across network
/// namespaces; a table is not).
fn alive_here(pid: u32) -> bool {
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).ok();
    match (ns(&pid.to_string()), ns("self")) {
        (Some(theirs), Some(ours)) => theirs == ours,
        _ => false,
    }
}

/// What [`prepare_table`] reads of a listing of the table.
#[derive(Debug, Default, PartialEq)]
struct TableListing {
    /// The chains, by name.
    chains: Vec<String>,
    /// Every pinhole element: its set or map, its key as nft writes it, its owner.
    elements: Vec<(String, String, Option<u32>)>,
}

impl TableListing {
    /// From `nft -j list table` output; what does not parse is left out.
    fn parse(raw: &str) -> TableListing {
        let mut listing = TableListing::default();
        let doc: serde_json::Value = serde_json::from_str(raw).unwrap_or_default();
        for object in doc["nftables"].as_array().into_iter().flatten() {
            if let Some(name) = object["chain"]["name"].as_str() {
                listing.chains.push(name.to_owned());
            }
            let Some(set) = object.get("set").or_else(|| object.get("map")) else {
                continue;
            };
            let name = set["name"].as_str().unwrap_or_default();
            if !PINHOLE_SETS.iter().any(|(_, n)| *n == name) {
                continue;
            }
            for elem in set["elem"].as_array().into_iter().flatten() {
                let key = elem
                    .as_array()
                    .and_then(|pair| pair.first())
                    .unwrap_or(elem);
                let inner = &key["elem"];
                let Some(parts) = inner["val"]["concat"].as_array() else {
                    continue;
                };
                let key: Vec<String> = parts
                    .iter()
                    .map(|p| match (p, port_range(p)) {
                        (_, Some((first, last))) => format!("{first}-{last}"),
                        (serde_json::Value::String(s), None) => s.clone(),
                        (other, None) => other.to_string(),
                    })
                    .collect();
                let owner = inner["comment"].as_str().and_then(Label::owner_of);
                listing
                    .elements
                    .push((name.to_owned(), key.join(" . "), owner));
            }
        }
        listing
    }

    /// The owners named by the elements.
    fn owners(&self) -> Vec<u32> {
        let mut owners: Vec<u32> = self.elements.iter().filter_map(|e| e.2).collect();
        owners.sort_unstable();
        owners.dedup();
        owners
    }
}

/// Run nft with `args`, feeding it `input` on stdin; its stdout on success. nft's stderr is
/// kept in the error, since it is the only place that says what nft objected to.
async fn run_nft(nft: &Path, args: &[&str], input: &str) -> Result<String, BackendError> {
    let program = nft.display().to_string();
    let spawn_err = |source| BackendError::Spawn {
        program: program.clone(),
        source,
    };
    let mut child = tokio::process::Command::new(nft)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err)?;
    let run = async {
        // nft may fail and exit before it has read all its input: its stderr says why, so a
        // failed write does not end the wait for it.
        let written = match child.stdin.take() {
            Some(mut stdin) => stdin.write_all(input.as_bytes()).await,
            None => Ok(()),
        };
        (written, child.wait_with_output().await)
    };
    // A hung nft would stall every session waiting for a pinhole; kill_on_drop ends it.
    let (written, output) =
        tokio::time::timeout(NFT_TIMEOUT, run)
            .await
            .map_err(|_| BackendError::Refused {
                program: program.clone(),
                status: format!("no answer within {} s", NFT_TIMEOUT.as_secs()),
                stderr: String::new(),
            })?;
    let output = output.map_err(spawn_err)?;
    if output.status.success() {
        written.map_err(spawn_err)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(BackendError::Refused {
            program,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Run nft on a text script (`nft -f -`).
pub async fn run_script(nft: &Path, script: &str) -> Result<(), BackendError> {
    run_nft(nft, &["-f", "-"], script).await.map(drop)
}

/// Load (or reload) the daemon's table.
pub async fn load_table(
    nft: &Path,
    mark: CtMark,
    intercept_port: u16,
    intercept: &[String],
) -> Result<(), BackendError> {
    run_script(nft, &table_script(mark, intercept_port, intercept)).await
}

/// The sets and maps that hold pinholes, as (kind, name) in `rules/ftp-alg.nft`.
const PINHOLE_SETS: [(&str, &str); 8] = [
    ("set", "pin_v4"),
    ("set", "pin_v6"),
    ("map", "dnat_v4"),
    ("map", "dnat_v6"),
    ("map", "snat_v4"),
    ("map", "snat_v6"),
    ("map", "win_v4"),
    ("map", "win_v6"),
];

/// Remove every pinhole but keep the table's chains. While a NAT chain is registered in the
/// network namespace the kernel goes on applying the translations recorded in conntrack;
/// deleting the table, possibly the namespace's last NAT chain, would cut every translated
/// connection under way: data connections and redirected control connections alike.
///
/// A table that is already gone (an `nft flush ruleset`, a firewall manager reloading its rules)
/// holds no pinhole, so that is no error: the result says whether the table was there.
pub async fn flush_pinholes(nft: &Path) -> Result<bool, BackendError> {
    let script: String = PINHOLE_SETS
        .iter()
        .map(|(kind, name)| format!("flush {kind} inet {TABLE} {name}\n"))
        .collect();
    match run_script(nft, &script).await {
        Ok(()) => Ok(true),
        Err(e) => match table_exists(nft).await {
            Ok(false) => Ok(false),
            _ => Err(e),
        },
    }
}

/// Whether the daemon's table is in the kernel.
async fn table_exists(nft: &Path) -> Result<bool, BackendError> {
    Ok(list_table_json(nft).await?.is_some())
}

/// `nft -j list table inet ftp_alg`; `None` when there is no such table (nft's "No such file or
/// directory"), which is no error to any caller here.
async fn list_table_json(nft: &Path) -> Result<Option<String>, BackendError> {
    match run_nft(nft, &["-j", "list", "table", "inet", TABLE], "").await {
        Ok(raw) => Ok(Some(raw)),
        Err(BackendError::Refused { stderr, .. })
            if stderr.contains("No such file or directory") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Other live processes in this network namespace that own pinholes in the daemon's table (a
/// predecessor serving its sessions after a hand-over, or a successor taking over).
pub async fn other_live_owners(nft: &Path) -> Result<Vec<u32>, BackendError> {
    let raw = run_nft(nft, &["-j", "list", "table", "inet", TABLE], "").await?;
    let me = std::process::id();
    Ok(TableListing::parse(&raw)
        .owners()
        .into_iter()
        .filter(|&pid| pid != me && alive_here(pid))
        .collect())
}

/// The daemon's table as its structure: each chain with its number of rules, each set and map.
/// Pinholes (elements) are not part of it. `None` when the table does not exist.
pub async fn table_shape(
    nft: &Path,
) -> Result<Option<std::collections::BTreeMap<String, usize>>, BackendError> {
    let Some(raw) = list_table_json(nft).await? else {
        return Ok(None);
    };
    let output = |message: String| BackendError::Output {
        program: nft.display().to_string(),
        message,
    };
    let listing: serde_json::Value =
        serde_json::from_str(&raw).map_err(|e| output(e.to_string()))?;
    let objects = listing
        .get("nftables")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| output("no \"nftables\" array".to_owned()))?;
    let mut shape = std::collections::BTreeMap::new();
    for object in objects {
        let Some((kind, body)) = object.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        let name = |key: &str| body.get(key).and_then(serde_json::Value::as_str);
        match (kind.as_str(), name("name"), name("chain")) {
            ("chain" | "set" | "map", Some(name), _) => {
                shape.entry(format!("{kind} {name}")).or_insert(0);
            }
            ("rule", _, Some(chain)) => *shape.entry(format!("chain {chain}")).or_insert(0) += 1,
            _ => {}
        }
    }
    Ok(Some(shape))
}

/// Delete the daemon's table and every pinhole in it; a missing table is not an error.
pub async fn delete_table(nft: &Path) -> Result<(), BackendError> {
    run_script(
        nft,
        &format!("table inet {TABLE}\ndelete table inet {TABLE}\n"),
    )
    .await
}

/// Read every pinhole from the kernel.
pub async fn list(nft: &Path) -> Result<Vec<PinholeEntry>, BackendError> {
    let raw = run_nft(nft, &["-j", "list", "table", "inet", TABLE], "").await?;
    parse_listing(&raw).map_err(|message| BackendError::Output {
        program: nft.display().to_string(),
        message,
    })
}

/// Pinholes as the kernel adds them, from `nft -j monitor new elements`: a pinhole that is
/// installed, used and removed between two [`list`] calls still shows here. Each element added
/// to ftp-alg's table is read as [`list`] reads it, on its own: a DNAT element arrives apart
/// from its pin element, and so is reported as a used pinhole with only its translation.
pub struct Monitor {
    program: String,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    /// Killed when the monitor is dropped.
    _child: tokio::process::Child,
}

impl Monitor {
    /// Start `nft -j monitor new elements`.
    pub fn start(nft: &Path) -> Result<Monitor, BackendError> {
        let program = nft.display().to_string();
        let spawn_err = |source| BackendError::Spawn {
            program: program.clone(),
            source,
        };
        let mut child = tokio::process::Command::new(nft)
            .args(["-j", "monitor", "new", "elements"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        let stdout = child.stdout.take().ok_or_else(|| BackendError::Output {
            program: program.clone(),
            message: "no stdout".into(),
        })?;
        Ok(Monitor {
            program,
            lines: tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout)),
            _child: child,
        })
    }

    /// The pinholes of the next element added to ftp-alg's table; `Ok(None)` once nft exits.
    pub async fn next(&mut self) -> Result<Option<Vec<PinholeEntry>>, BackendError> {
        loop {
            let line = self
                .lines
                .next_line()
                .await
                .map_err(|source| BackendError::Spawn {
                    program: self.program.clone(),
                    source,
                })?;
            let Some(line) = line else { return Ok(None) };
            if let Some(entries) = parse_monitor_line(&line) {
                return Ok(Some(entries));
            }
        }
    }
}

/// One line of `nft -j monitor`: the pinholes of an element added to ftp-alg's table, or
/// `None` for any other event. An added element is
/// `{"add": {"element": {"family", "table", "name", "elem": {"set": [...]}}}}`, whose elements
/// have the form of a listed set's, so it is read as a listing of that one set.
fn parse_monitor_line(line: &str) -> Option<Vec<PinholeEntry>> {
    let event: serde_json::Value = serde_json::from_str(line).ok()?;
    let element = event.get("add")?.get("element")?;
    if element["family"] != "inet" || element["table"] != TABLE {
        return None;
    }
    let listing = serde_json::json!({"nftables": [{"set": {
        "name": element["name"],
        "elem": element["elem"]["set"],
    }}]});
    parse_listing(&listing.to_string()).ok()
}

/// Turn `nft -j list table inet ftp_alg` output into pinholes. A pin element is a pinhole
/// still waiting for its connection; a dnat or snat element whose pin element is gone belongs
/// to a pinhole whose connection has arrived and whose translation lives on until the transfer
/// ends. Every element carries the pinhole's label, so each can be listed on its own.
fn parse_listing(raw: &str) -> Result<Vec<PinholeEntry>, String> {
    let doc: serde_json::Value = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    let objects = doc["nftables"].as_array().ok_or("no \"nftables\" array")?;
    let mut pins = Vec::new();
    let mut dnat = HashMap::new();
    let mut snat = HashMap::new();
    let mut windows = Vec::new();
    for object in objects {
        let Some(set) = object.get("set").or_else(|| object.get("map")) else {
            continue;
        };
        let name = set["name"].as_str().unwrap_or_default();
        for elem in set["elem"].as_array().into_iter().flatten() {
            // A map element is [key, value]; a set element is the key alone.
            let (key, value) = match elem.as_array() {
                Some(pair) => (pair.first(), pair.get(1)),
                None => (Some(elem), None),
            };
            let Some(inner) = key.map(|k| &k["elem"]) else {
                continue;
            };
            let meta = (
                inner["comment"].as_str().and_then(Label::from_comment),
                inner["expires"].as_u64().unwrap_or(0),
            );
            if name.starts_with("win_") {
                let window =
                    window_key(&inner["val"]).zip(value.and_then(|v| v.as_str()?.parse().ok()));
                if let Some(((source, dial, last), from)) = window {
                    windows.push(PinholeEntry {
                        id: None,
                        kind: PinholeKind::Window,
                        state: PinholeState::Open,
                        session: meta.0.map(|l| l.session),
                        client: meta.0.map(|l| l.client),
                        server: meta.0.map(|l| l.server),
                        source,
                        dial,
                        last_port: Some(last),
                        maps_to: None,
                        snat: Some(from),
                        seconds_left: meta.1,
                    });
                }
                continue;
            }
            let Some(tuple) = key_tuple(&inner["val"]) else {
                continue;
            };
            if name.starts_with("pin_") {
                pins.push((tuple, meta));
            } else if name.starts_with("dnat_") {
                if let Some(to) = value.and_then(value_endpoint) {
                    dnat.insert(tuple, (to, meta));
                }
            } else if name.starts_with("snat_") {
                if let Some(from) = value.and_then(|v| v.as_str()?.parse().ok()) {
                    snat.insert(tuple, (from, meta));
                }
            }
        }
    }
    let entry = |(source, dial): (IpAddr, SocketAddr),
                 (label, seconds_left): (Option<Label>, u64),
                 state,
                 maps_to: Option<SocketAddr>| PinholeEntry {
        id: None,
        kind: PinholeKind::Pinhole,
        state,
        session: label.map(|l| l.session),
        client: label.map(|l| l.client),
        server: label.map(|l| l.server),
        source,
        dial,
        last_port: None,
        maps_to,
        snat: snat
            .get(&(source, maps_to.unwrap_or(dial)))
            .map(|(from, _)| *from),
        seconds_left,
    };
    let mut entries: Vec<PinholeEntry> = pins
        .iter()
        .map(|&(tuple, meta)| {
            let maps_to = dnat.get(&tuple).map(|(to, _)| *to);
            entry(tuple, meta, PinholeState::Waiting, maps_to)
        })
        .collect();
    let waiting: Vec<(IpAddr, SocketAddr)> = pins.iter().map(|(tuple, _)| *tuple).collect();
    for (&tuple, &(to, meta)) in &dnat {
        if !waiting.contains(&tuple) {
            entries.push(entry(tuple, meta, PinholeState::Used, Some(to)));
        }
    }
    // A used pinhole without DNAT (gateway passive) is left only as its snat element.
    for (&(source, translated), &(_, meta)) in &snat {
        let explained = entries
            .iter()
            .any(|e| e.source == source && e.maps_to.unwrap_or(e.dial) == translated);
        if !explained {
            entries.push(entry((source, translated), meta, PinholeState::Used, None));
        }
    }
    entries.extend(windows);
    entries.sort_by_key(|e| (e.session, e.kind, e.dial, e.source));
    Ok(entries)
}

/// The keys of the elements in `nft -j list set` output; an element is listed as its key
/// alone, or (with a timeout or comment, as ftp-alg's are) as `{"elem": {"val": key, ...}}`.
fn set_keys(raw: &str) -> Result<HashSet<(IpAddr, SocketAddr)>, String> {
    let doc: serde_json::Value = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    let objects = doc["nftables"].as_array().ok_or("no \"nftables\" array")?;
    Ok(objects
        .iter()
        .filter_map(|o| o.get("set"))
        .flat_map(|set| set["elem"].as_array().into_iter().flatten())
        .filter_map(|elem| key_tuple(elem.get("elem").map_or(elem, |inner| &inner["val"])))
        .collect())
}

/// `{"concat": [source, address, port]}` as (source, address:port).
fn key_tuple(val: &serde_json::Value) -> Option<(IpAddr, SocketAddr)> {
    let parts = val["concat"].as_array()?;
    let [source, addr, port] = parts.as_slice() else {
        return None;
    };
    let source: IpAddr = source.as_str()?.parse().ok()?;
    let addr: IpAddr = addr.as_str()?.parse().ok()?;
    let port = u16::try_from(port.as_u64()?).ok()?;
    Some((source, SocketAddr::new(addr, port)))
}

/// A window's key, `{"concat": [source, address, {"range": [first, last]}]}`, as (source,
/// address:first, last).
fn window_key(val: &serde_json::Value) -> Option<(IpAddr, SocketAddr, u16)> {
    let parts = val["concat"].as_array()?;
    let [source, addr, ports] = parts.as_slice() else {
        return None;
    };
    let source: IpAddr = source.as_str()?.parse().ok()?;
    let addr: IpAddr = addr.as_str()?.parse().ok()?;
    let (first, last) = port_range(ports)?;
    Some((source, SocketAddr::new(addr, first), last))
}

/// `{"range": [first, last]}` as its two ports.
fn port_range(val: &serde_json::Value) -> Option<(u16, u16)> {
    let [first, last] = val.get("range")?.as_array()?.as_slice() else {
        return None;
    };
    let port = |v: &serde_json::Value| u16::try_from(v.as_u64()?).ok();
    Some((port(first)?, port(last)?))
}

/// `{"concat": [address, port]}` as address:port.
fn value_endpoint(val: &serde_json::Value) -> Option<SocketAddr> {
    let parts = val["concat"].as_array()?;
    let [addr, port] = parts.as_slice() else {
        return None;
    };
    let addr: IpAddr = addr.as_str()?.parse().ok()?;
    Some(SocketAddr::new(addr, u16::try_from(port.as_u64()?).ok()?))
}

/// Applies changes with `nft -j -f -`, one nft process per transaction.
struct Nft {
    program: PathBuf,
}

/// Start a [`Firewall`] that applies pinholes through the nft program at `nft`.
pub fn backend(nft: PathBuf) -> Firewall {
    Firewall::start(Nft { program: nft })
}

impl Transaction for Nft {
    fn commit(
        &mut self,
        changes: &[Change],
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        let mut batch = Batch::new();
        for change in changes {
            let element = NfListObject::Element(json_element(&change.element));
            match change.verb {
                Verb::Add => batch.add(element),
                Verb::Delete => batch.delete(element),
            }
        }
        let program = self.program.clone();
        let payload =
            serde_json::to_string(&batch.to_nftables()).map_err(|e| BackendError::Output {
                program: program.display().to_string(),
                message: e.to_string(),
            });
        async move {
            run_nft(&program, &["-j", "-f", "-"], &payload?)
                .await
                .map(drop)
        }
    }

    /// One `nft -j list set` per set the elements are in, and a look for each key in it.
    fn present(
        &mut self,
        elements: &[Element],
    ) -> impl Future<Output = Result<Vec<bool>, BackendError>> + Send {
        let program = self.program.clone();
        let keys: Vec<(&'static str, (IpAddr, SocketAddr))> = elements
            .iter()
            .map(|e| (e.set, (e.source, e.dest)))
            .collect();
        async move {
            let mut sets: HashMap<&'static str, HashSet<(IpAddr, SocketAddr)>> = HashMap::new();
            for (set, _) in &keys {
                if sets.contains_key(set) {
                    continue;
                }
                let raw = run_nft(&program, &["-j", "list", "set", "inet", TABLE, set], "").await?;
                let members = set_keys(&raw).map_err(|message| BackendError::Output {
                    program: program.display().to_string(),
                    message,
                })?;
                sets.insert(set, members);
            }
            Ok(keys
                .iter()
                .map(|(set, key)| sets.get(set).is_some_and(|m| m.contains(key)))
                .collect())
        }
    }
}

/// `element` in nft's JSON schema: the key with its timeout and comment, and for a map
/// element the value beside it.
fn json_element(element: &Element) -> schema::Element<'static> {
    let first = u32::from(element.dest.port());
    let port = match element.last_port {
        None => Expression::Number(first),
        Some(last) => Expression::Range(Box::new(Range {
            range: [
                Expression::Number(first),
                Expression::Number(u32::from(last)),
            ],
        })),
    };
    let key = Expression::Named(NamedExpression::Elem(Elem {
        val: Box::new(concat(&[element.source, element.dest.ip()], port)),
        timeout: Some(element.timeout_secs),
        expires: None,
        comment: Some(Cow::Owned(element.comment.clone())),
        counter: None,
    }));
    let elem = match &element.value {
        None => key,
        Some(Value::Endpoint(to)) => {
            let port = Expression::Number(u32::from(to.port()));
            Expression::List(vec![key, concat(&[to.ip()], port)])
        }
        Some(Value::Address(from)) => {
            Expression::List(vec![key, Expression::String(Cow::Owned(from.to_string()))])
        }
    };
    schema::Element {
        family: NfFamily::INet,
        table: Cow::Borrowed(TABLE),
        name: Cow::Borrowed(element.set),
        elem: Cow::Owned(vec![elem]),
    }
}

/// Addresses, then a port (or a range of ports), concatenated.
fn concat(addrs: &[IpAddr], port: Expression<'static>) -> Expression<'static> {
    let mut parts: Vec<Expression<'static>> = addrs
        .iter()
        .map(|a| Expression::String(Cow::Owned(a.to_string())))
        .collect();
    parts.push(port);
    Expression::Named(NamedExpression::Concat(parts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pinhole::batch::{
        elements,
        tests::{pinhole, window},
    };

    /// The JSON equals what `nft -j` prints for
    /// `add element inet ftp_alg pin_v4 { 198.18.0.2 . 198.18.0.1 . 61000 timeout 30s comment "..." }`
    /// and the dnat/snat map elements keyed on the arriving and the translated tuple.
    /// What a table start-up keeps or sweeps: every pinhole element with its key as nft
    /// writes it and its owner (none for a comment without `pid=`), and the chains to flush.
    #[test]
    fn a_table_listing_gives_elements_owners_and_chains() {
        let raw = r#"{"nftables": [
            {"metainfo": {"json_schema_version": 1}},
            {"table": {"family": "inet", "name": "ftp_alg"}},
            {"set": {"family": "inet", "name": "pin_v4", "table": "ftp_alg", "elem": [
                {"elem": {"val": {"concat": ["198.18.0.2", "198.18.0.1", 61000]},
                          "timeout": 30, "expires": 20,
                          "comment": "pid=4242 session=1 client=198.18.0.2 server=203.0.113.2"}}]}},
            {"map": {"family": "inet", "name": "dnat_v4", "table": "ftp_alg", "elem": [
                [{"elem": {"val": {"concat": ["198.18.0.2", "198.18.0.1", 61001]},
                           "comment": "session=2 client=198.18.0.2 server=203.0.113.2"}},
                 {"concat": ["203.0.113.2", 40000]}]]}},
            {"map": {"family": "inet", "name": "win_v4", "table": "ftp_alg", "elem": [
                [{"elem": {"val": {"concat": ["198.18.0.2", "203.0.113.2", {"range": [1024, 65535]}]},
                           "comment": "pid=4243 session=3 client=198.18.0.2 server=203.0.113.2"}},
                 "203.0.113.1"]]}},
            {"set": {"family": "inet", "name": "intercept_ifaces", "table": "ftp_alg",
                     "elem": ["lan0"]}},
            {"chain": {"family": "inet", "table": "ftp_alg", "name": "pinhole_prerouting"}}
        ]}"#;
        let listing = TableListing::parse(raw);
        assert_eq!(
            listing,
            TableListing {
                chains: vec!["pinhole_prerouting".into()],
                elements: vec![
                    (
                        "pin_v4".into(),
                        "198.18.0.2 . 198.18.0.1 . 61000".into(),
                        Some(4242)
                    ),
                    (
                        "dnat_v4".into(),
                        "198.18.0.2 . 198.18.0.1 . 61001".into(),
                        None
                    ),
                    (
                        "win_v4".into(),
                        "198.18.0.2 . 203.0.113.2 . 1024-65535".into(),
                        Some(4243)
                    ),
                ],
            }
        );
        assert_eq!(listing.owners(), vec![4242, 4243]);
        assert!(!alive_here(u32::MAX), "no such process");
        assert!(alive_here(std::process::id()));
    }

    /// Keys of `nft -j list set inet ftp_alg pin_v4` as nft 1.0.6 prints them: an element
    /// with a timeout and comment, and one without.
    #[test]
    fn set_keys_reads_both_element_forms() {
        let raw = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"set": {"family": "inet",
            "name": "pin_v4", "table": "ftp_alg", "flags": ["timeout"], "gc-interval": 0,
            "elem": [{"elem": {"val": {"concat": ["198.18.0.2", "198.18.0.1", 61000]},
            "timeout": 30, "expires": 29, "comment": "session=1 client=198.18.0.2 server=203.0.113.2"}},
            {"concat": ["198.18.0.3", "198.18.0.1", 61000]}]}}]}"#;
        let keys = set_keys(raw).unwrap();
        let key = |s: &str| (s.parse().unwrap(), "198.18.0.1:61000".parse().unwrap());
        assert_eq!(keys, HashSet::from([key("198.18.0.2"), key("198.18.0.3")]));
        assert!(set_keys("{}").is_err());
    }

    #[test]
    fn install_json_matches_nft_schema() {
        let elements: Vec<_> = elements(&pinhole())
            .unwrap()
            .iter()
            .map(json_element)
            .collect();
        let json = without_nulls(serde_json::to_value(&elements).unwrap());
        let comment = format!(
            "pid={} session=3 client=198.18.0.2 server=203.0.113.2",
            std::process::id()
        );
        assert_eq!(
            json,
            serde_json::json!([
                {"family": "inet", "table": "ftp_alg", "name": "pin_v4", "elem": [
                    {"elem": {"val": {"concat": ["198.18.0.2", "198.18.0.1", 61000]}, "timeout": 30,
                              "comment": comment}}]},
                {"family": "inet", "table": "ftp_alg", "name": "dnat_v4", "elem": [[
                    {"elem": {"val": {"concat": ["198.18.0.2", "198.18.0.1", 61000]}, "timeout": 30,
                              "comment": comment}},
                    {"concat": ["203.0.113.2", 40000]}]]},
                {"family": "inet", "table": "ftp_alg", "name": "snat_v4", "elem": [[
                    {"elem": {"val": {"concat": ["198.18.0.2", "203.0.113.2", 40000]}, "timeout": 30,
                              "comment": comment}},
                    "203.0.113.1"]]},
            ])
        );
    }

    /// The crate writes absent optional fields as `null`, which nft accepts and ignores.
    fn without_nulls(value: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match value {
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k, without_nulls(v)))
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.into_iter().map(without_nulls).collect()),
            other => other,
        }
    }

    const LABEL: &str = "session=3 client=198.18.0.2 server=203.0.113.2";

    fn listing(pin: bool, dnat: bool) -> String {
        let elem = |tuple: &str| {
            format!(
                r#"{{"elem": {{"val": {{"concat": [{tuple}]}}, "timeout": 30, "expires": 27, "comment": "{LABEL}"}}}}"#
            )
        };
        let pin_elems = if pin {
            elem(r#""198.18.0.2", "198.18.0.1", 61000"#)
        } else {
            String::new()
        };
        let dnat_elems = if dnat {
            format!(
                r#"[{}, {{"concat": ["203.0.113.2", 40000]}}]"#,
                elem(r#""198.18.0.2", "198.18.0.1", 61000"#)
            )
        } else {
            String::new()
        };
        let snat_target = if dnat {
            r#""203.0.113.2", 40000"#
        } else {
            r#""198.18.0.1", 61000"#
        };
        format!(
            r#"{{"nftables": [{{"metainfo": {{"version": "1.0.6"}}}},
              {{"set": {{"family": "inet", "name": "pin_v4", "table": "ftp_alg", "elem": [{pin_elems}]}}}},
              {{"map": {{"family": "inet", "name": "dnat_v4", "table": "ftp_alg", "elem": [{dnat_elems}]}}}},
              {{"map": {{"family": "inet", "name": "snat_v4", "table": "ftp_alg", "elem": [
                [{}, "203.0.113.1"]]}}}}]}}"#,
            elem(&format!(r#""198.18.0.2", {snat_target}"#))
        )
    }

    fn entry(state: PinholeState, dial: &str, maps_to: Option<&str>) -> PinholeEntry {
        PinholeEntry {
            id: None,
            kind: PinholeKind::Pinhole,
            state,
            session: Some(3),
            client: Some("198.18.0.2".parse().unwrap()),
            server: Some("203.0.113.2".parse().unwrap()),
            source: "198.18.0.2".parse().unwrap(),
            dial: dial.parse().unwrap(),
            last_port: None,
            maps_to: maps_to.map(|m| m.parse().unwrap()),
            snat: Some("203.0.113.1".parse().unwrap()),
            seconds_left: 27,
        }
    }

    #[test]
    fn listing_joins_pin_and_map_elements() {
        assert_eq!(
            parse_listing(&listing(true, true)).unwrap(),
            vec![entry(
                PinholeState::Waiting,
                "198.18.0.1:61000",
                Some("203.0.113.2:40000")
            )]
        );
    }

    #[test]
    fn listing_shows_used_pinholes_from_their_translations() {
        assert_eq!(
            parse_listing(&listing(false, true)).unwrap(),
            vec![entry(
                PinholeState::Used,
                "198.18.0.1:61000",
                Some("203.0.113.2:40000")
            )]
        );
        assert_eq!(
            parse_listing(&listing(false, false)).unwrap(),
            vec![entry(PinholeState::Used, "198.18.0.1:61000", None)]
        );
    }

    /// `nft -j list map inet ftp_alg win_v4` (nft 1.0.6) with one window, as `pinholes list`
    /// reads it; and the JSON ftp-alg writes for that window is what nft prints.
    #[test]
    fn a_window_is_listed_and_written_as_nft_does() {
        let raw = r#"{"nftables": [{"map": {"family": "inet", "name": "win_v4", "table": "ftp_alg",
            "type": ["ipv4_addr", "ipv4_addr", "inet_service"], "map": "ipv4_addr",
            "flags": ["interval", "timeout"], "elem": [[{"elem": {"val": {"concat": ["198.18.0.2",
            "203.0.113.2", {"range": [1024, 65535]}]}, "timeout": 30, "expires": 21,
            "comment": "pid=7 session=3 client=198.18.0.2 server=203.0.113.2"}}, "203.0.113.1"]]}}]}"#;
        assert_eq!(
            parse_listing(raw).unwrap(),
            vec![PinholeEntry {
                kind: PinholeKind::Window,
                state: PinholeState::Open,
                dial: "203.0.113.2:1024".parse().unwrap(),
                last_port: Some(65535),
                maps_to: None,
                seconds_left: 21,
                ..entry(PinholeState::Open, "203.0.113.2:1024", None)
            }]
        );
        let [element] = <[Element; 1]>::try_from(elements(&window()).unwrap()).unwrap();
        let json = without_nulls(serde_json::to_value(json_element(&element)).unwrap());
        let comment = format!(
            "pid={} session=3 client=198.18.0.2 server=203.0.113.2",
            std::process::id()
        );
        assert_eq!(
            json,
            serde_json::json!({"family": "inet", "table": "ftp_alg", "name": "win_v4", "elem": [[
                {"elem": {"val": {"concat": ["198.18.0.2", "203.0.113.2", {"range": [1024, 65535]}]},
                          "timeout": 30, "comment": comment}},
                "203.0.113.1"]]})
        );
    }

    #[test]
    fn table_script_defines_mark_and_intercepts() {
        let mark = CtMark {
            value: 0xf7a0,
            mask: 0xffff,
        };
        let script = table_script(mark, 2121, &["lan0".into()]);
        assert!(script.starts_with(
            "define ALG_MARK = 0x0000f7a0\ndefine ALG_MASK = 0x0000ffff\n\
             define ALG_KEEP = 0xffff0000\ndefine INTERCEPT_PORT = 2121\n"
        ));
        assert!(script.contains("add element inet ftp_alg intercept_ifaces { \"lan0\" }"));
    }

    /// Lines `nft -j monitor` printed (nftables 1.0.6) for `add element` of a pin and a dnat
    /// element and a `delete element`, in ftp-alg's table and in another.
    #[test]
    fn monitor_lines() {
        let pin = r#"{"add": {"element": {"family": "inet", "table": "ftp_alg", "name": "pin_v4", "elem": {"set": [{"elem": {"val": {"concat": ["203.0.113.2", "203.0.113.1", 61000]}, "timeout": 30, "expires": 30, "comment": "session=1 client=198.18.0.2 server=203.0.113.2"}}]}}}}"#;
        let dnat = r#"{"add": {"element": {"family": "inet", "table": "ftp_alg", "name": "dnat_v4", "elem": {"set": [[{"elem": {"val": {"concat": ["203.0.113.2", "203.0.113.1", 61000]}, "timeout": 30, "expires": 30, "comment": "session=1 client=198.18.0.2 server=203.0.113.2"}}, {"concat": ["198.18.0.2", 50001]}]]}}}}"#;
        let label = Label::from_comment("session=1 client=198.18.0.2 server=203.0.113.2");
        let [p] = parse_monitor_line(pin).unwrap().try_into().unwrap();
        assert_eq!(p.state, PinholeState::Waiting);
        assert_eq!(p.session, label.map(|l| l.session));
        assert_eq!(p.source, "203.0.113.2".parse::<IpAddr>().unwrap());
        assert_eq!(p.dial, "203.0.113.1:61000".parse().unwrap());
        assert_eq!(p.maps_to, None);
        assert_eq!(p.seconds_left, 30);
        let [d] = parse_monitor_line(dnat).unwrap().try_into().unwrap();
        assert_eq!(d.dial, p.dial);
        assert_eq!(d.maps_to, Some("198.18.0.2:50001".parse().unwrap()));
        let deleted = pin.replace(r#"{"add""#, r#"{"delete""#);
        assert_eq!(parse_monitor_line(&deleted), None);
        let elsewhere = pin.replace("ftp_alg", "gateway");
        assert_eq!(parse_monitor_line(&elsewhere), None);
        assert_eq!(
            parse_monitor_line("# new generation 7 by process 42 (nft)"),
            None
        );
    }
}
