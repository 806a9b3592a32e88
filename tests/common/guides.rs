//! The deployment guides' nftables snippets, run as the guides print them: each is read from
//! its `<!-- snippet: NAME -->` block in `docs/`, loaded into the gateway's ruleset, and real
//! transfers (curl, passive and active) must go through it byte for byte. A guide that is
//! edited into something that no longer works fails here.

use super::*;

/// The body of the fenced block that follows `<!-- snippet: NAME -->` in `doc` (under
/// `docs/`).
fn snippet(doc: &str, name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join(doc);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let marker = format!("<!-- snippet: {name} -->");
    let after = text
        .split_once(&marker)
        .unwrap_or_else(|| panic!("{doc} has no {marker}"))
        .1;
    let body = after
        .split_once("```nft\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .unwrap_or_else(|| panic!("{doc}: no ```nft block after {marker}"))
        .0;
    body.to_owned()
}

/// Load a snippet into G's ruleset, from a file as an operator would.
fn load(lab: &Lab, doc: &str, name: &str) {
    let path = lab.dir.join(format!("{name}.nft"));
    fs::write(&path, snippet(doc, name)).expect("write the snippet");
    lab.nft(&["-f", &path.to_string_lossy()]);
}

/// A passive and an active download with curl, each byte for byte.
fn transfers_pass(lab: &mut Lab, what: &str) {
    for mode in [DataMode::Pasv, DataMode::Port] {
        let run = lab.client_session(Client::Curl, mode, &[Op::Download]);
        assert!(
            run.status.success(),
            "{what}, {mode:?}: the download failed\n{}",
            run.transcript
        );
        assert_same_bytes(
            "download",
            &lab.read(&lab.download_path()),
            &lab.read(&lab.served_path()),
        );
        lab.assert_no_pinholes_left();
    }
}

/// docs/gateway.md's strict output chain: policy drop, the daemon's marked connections to the
/// servers let out, and the replies on the redirected control connections (established).
pub fn gateway_strict_output_chain() {
    let mut lab = Lab::new(Topology::Gateway(Family::V4), Setup::Alg);
    load(&lab, "gateway.md", "strict-output");
    transfers_pass(&mut lab, "strict output chain");
}

/// docs/gateway.md's redirect for operators who leave `proxy.intercept` empty: it must mark
/// the connection it redirects, or the shipped input chain drops it.
pub fn gateway_own_redirect() {
    let mut lab = Lab::new(Topology::Gateway(Family::V4), Setup::AlgStopped);
    lab.alg_config = "[proxy]\nintercept = []\n".to_owned();
    load(&lab, "gateway.md", "own-redirect");
    lab.start_alg();
    transfers_pass(&mut lab, "own redirect");
}

/// docs/sidecar.md's host ruleset, loaded twice as a firewall reload would: the second load
/// replaces the table instead of appending a copy of every rule, and transfers pass through it
/// on a sidecar host.
pub fn sidecar_host_ruleset_reloads() {
    let mut lab = Lab::new(Topology::Sidecar(Family::V4), Setup::Alg);
    let rules = |lab: &Lab| {
        must(lab.exec(&lab.gateway_ns(), &["nft", "list", "table", "inet", "host"]))
            .lines()
            .filter(|l| l.contains("accept"))
            .count()
    };
    load(&lab, "sidecar.md", "sidecar-host");
    let once = rules(&lab);
    load(&lab, "sidecar.md", "sidecar-host");
    assert_eq!(rules(&lab), once, "a reload appended rules");
    transfers_pass(&mut lab, "sidecar host ruleset");
}
