//! Both pinhole backends against the real kernel: pinholes installed over netlink or through
//! the nft program, read back with `nft -j list` and with `pinholes list`'s reader
//! ([`nft::list`]), shared between owners, removed after the kernel has dropped them, and refused
//! with the kernel's reason; and windows (a TLS session's range of server ports) installed,
//! listed, shared, renewed, put back after the kernel lost them, and removed.
//!
//! Each test moves its own thread into a new network namespace (unshare(2) acts on the calling
//! thread) and runs a single-threaded runtime there, so the netlink socket and every nft process
//! it starts see only that namespace, which goes away with the thread. Needs root, like the
//! end-to-end suite.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ftp_alg::pinhole::{
    netlink, nft, Firewall, Label, OpenError, PinholeEntry, PinholeKind, PinholeRequest,
    PinholeState, Pinholes, WindowRequest,
};
use ftp_alg::ports::PortPool;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `test` in a fresh network namespace of this thread, with the daemon's table loaded.
fn in_namespace<F: std::future::Future<Output = ()>>(test: impl FnOnce() -> F) {
    // SAFETY: unshare only changes the calling thread's network namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET) (run as root): {}",
        std::io::Error::last_os_error()
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            nft::load_table(Path::new("nft"), 0xf7a0.into(), 2121, &[])
                .await
                .expect("load the table");
            test().await;
        });
}

fn nft(args: &[&str]) -> String {
    let out = Command::new("nft").args(args).output().expect("run nft");
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn label(session: u64) -> Label {
    Label {
        session,
        client: "198.18.0.2".parse().unwrap(),
        server: "203.0.113.2".parse().unwrap(),
    }
}

/// Reverse mode, passive: all three elements.
fn reverse_passive(session: u64, port: Option<u16>) -> PinholeRequest {
    PinholeRequest {
        source: "198.18.0.2".parse().unwrap(),
        dial_ip: "198.18.0.1".parse().unwrap(),
        dial_port: port,
        dnat: Some("203.0.113.2:40000".parse().unwrap()),
        snat: Some("203.0.113.1".parse().unwrap()),
        label: label(session),
    }
}

fn pinholes(backend: Firewall) -> Pinholes<Firewall> {
    Pinholes::new(
        backend,
        PortPool::new(61000, 61009, Duration::from_secs(30), Duration::ZERO),
        TIMEOUT,
    )
}

async fn listed() -> Vec<PinholeEntry> {
    nft::list(Path::new("nft")).await.expect("list pinholes")
}

/// The elements of one set or map in `nft -j list table` output.
fn json_elements(set: &str) -> Vec<serde_json::Value> {
    let doc: serde_json::Value =
        serde_json::from_str(&nft(&["-j", "list", "table", "inet", "ftp_alg"])).unwrap();
    doc["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("set").or_else(|| o.get("map")))
        .find(|s| s["name"] == set)
        .and_then(|s| s["elem"].as_array().cloned())
        .unwrap_or_default()
}

/// Install, read back both ways, share, remove: the same for either backend.
async fn round_trip(backend: Firewall) {
    let pinholes = pinholes(backend);
    let first = pinholes.open(&reverse_passive(3, None)).await.unwrap();
    assert_eq!(first.dial_port, 61000);

    let comment = label(3).to_comment(std::process::id());
    let [pin] = &json_elements("pin_v4")[..] else {
        panic!("one pin_v4 element: {:?}", json_elements("pin_v4"));
    };
    assert_eq!(
        pin["elem"]["val"],
        serde_json::json!({"concat": ["198.18.0.2", "198.18.0.1", 61000]})
    );
    assert_eq!(pin["elem"]["timeout"], 30);
    assert_eq!(pin["elem"]["comment"], comment.as_str());
    let [dnat] = &json_elements("dnat_v4")[..] else {
        panic!("one dnat_v4 element");
    };
    assert_eq!(
        dnat[1],
        serde_json::json!({"concat": ["203.0.113.2", 40000]})
    );
    assert_eq!(dnat[0]["elem"]["comment"], comment.as_str());
    let [snat] = &json_elements("snat_v4")[..] else {
        panic!("one snat_v4 element");
    };
    assert_eq!(
        snat[0]["elem"]["val"],
        serde_json::json!({"concat": ["198.18.0.2", "203.0.113.2", 40000]})
    );
    assert_eq!(snat[1], "203.0.113.1");

    let entries = listed().await;
    let [entry] = &entries[..] else {
        panic!("one pinhole: {entries:#?}");
    };
    assert!(
        (TIMEOUT.as_secs() - 3..=TIMEOUT.as_secs()).contains(&entry.seconds_left),
        "{entry:?}"
    );
    assert_eq!(
        *entry,
        PinholeEntry {
            id: None,
            kind: PinholeKind::Pinhole,
            state: PinholeState::Waiting,
            session: Some(3),
            client: Some("198.18.0.2".parse().unwrap()),
            server: Some("203.0.113.2".parse().unwrap()),
            source: "198.18.0.2".parse().unwrap(),
            dial: "198.18.0.1:61000".parse().unwrap(),
            last_port: None,
            maps_to: Some("203.0.113.2:40000".parse().unwrap()),
            snat: Some("203.0.113.1".parse().unwrap()),
            seconds_left: entry.seconds_left,
        }
    );

    // A second pinhole on the same elements takes them over (its label) and shares them.
    let second = pinholes
        .open(&reverse_passive(4, Some(61000)))
        .await
        .unwrap();
    assert_eq!(listed().await[0].session, Some(4));
    pinholes.close(&[first.id]).await.unwrap();
    assert_eq!(
        listed().await.len(),
        1,
        "the second owner keeps the elements"
    );
    pinholes.close(&[second.id]).await.unwrap();
    assert!(listed().await.is_empty());

    // An element the kernel has dropped (here its pin element, as the packet path does when
    // the connection arrives) is no error to remove.
    let used = pinholes.open(&reverse_passive(5, None)).await.unwrap();
    let port = used.dial_port.to_string();
    nft(&[
        "delete",
        "element",
        "inet",
        "ftp_alg",
        "pin_v4",
        &format!("{{ 198.18.0.2 . 198.18.0.1 . {port} }}"),
    ]);
    assert_eq!(listed().await[0].state, PinholeState::Used);
    pinholes.close(&[used.id]).await.unwrap();
    assert!(listed().await.is_empty());

    // IPv6, without translation (gateway mode, passive).
    let v6 = pinholes
        .open(&PinholeRequest {
            source: "2001:db8:a::2".parse().unwrap(),
            dial_ip: "2001:db8:b::2".parse().unwrap(),
            dial_port: Some(40001),
            dnat: None,
            snat: None,
            label: Label {
                session: 6,
                client: "2001:db8:a::2".parse().unwrap(),
                server: "2001:db8:b::2".parse().unwrap(),
            },
        })
        .await
        .unwrap();
    let entries = listed().await;
    assert_eq!(entries.len(), 1);
    assert_eq!(
        (entries[0].source, entries[0].dial, entries[0].session),
        (
            "2001:db8:a::2".parse::<IpAddr>().unwrap(),
            "[2001:db8:b::2]:40001".parse::<SocketAddr>().unwrap(),
            Some(6)
        )
    );
    pinholes.close(&[v6.id]).await.unwrap();
    assert!(listed().await.is_empty());
}

#[test]
fn netlink_pinholes_read_back_through_nft() {
    in_namespace(|| async { round_trip(netlink::backend().unwrap()).await });
}

#[test]
fn nft_pinholes_read_back_through_nft() {
    in_namespace(|| async { round_trip(nft::backend("nft".into())).await });
}

/// A window for session `session` of the client of `label`, IPv4 or IPv6.
fn window(session: u64, v6: bool) -> WindowRequest {
    let (client, server, snat) = match v6 {
        false => ("198.18.0.2", "203.0.113.2", "203.0.113.1"),
        true => ("2001:db8:a::2", "2001:db8:b::2", "2001:db8:b::1"),
    };
    WindowRequest {
        label: Label {
            session,
            client: client.parse().unwrap(),
            server: server.parse().unwrap(),
        },
        snat: snat.parse().unwrap(),
        max_per_client: 2,
    }
}

/// Seconds until the kernel drops the one element of `set`.
fn expires(set: &str) -> u64 {
    let elements = json_elements(set);
    let [element] = &elements[..] else {
        panic!("one {set} element: {elements:?}");
    };
    element[0]["elem"]["expires"].as_u64().expect("expires")
}

/// Windows, the same for either backend: a range element with its label and source address,
/// listed as a window, shared by two sessions of one client, limited per client, renewed,
/// put back by a renewal after the kernel lost it, removed by the last owner; IPv6 alike.
async fn window_round_trip(backend: Firewall) {
    let pinholes = Pinholes::new(
        backend,
        PortPool::new(61000, 61009, Duration::from_secs(30), Duration::ZERO),
        Duration::from_secs(4),
    );
    let a = pinholes.open_window(&window(3, false)).await.unwrap();
    let [element] = &json_elements("win_v4")[..] else {
        panic!("one win_v4 element: {:?}", json_elements("win_v4"));
    };
    assert_eq!(
        element[0]["elem"]["val"],
        serde_json::json!({"concat": ["198.18.0.2", "203.0.113.2", {"range": [1024, 65535]}]})
    );
    assert_eq!(element[0]["elem"]["timeout"], 4);
    assert_eq!(
        element[0]["elem"]["comment"],
        label(3).to_comment(std::process::id()).as_str()
    );
    assert_eq!(element[1], "203.0.113.1");
    let entries = listed().await;
    let [entry] = &entries[..] else {
        panic!("one window: {entries:#?}");
    };
    assert_eq!(
        *entry,
        PinholeEntry {
            id: None,
            kind: PinholeKind::Window,
            state: PinholeState::Open,
            session: Some(3),
            client: Some("198.18.0.2".parse().unwrap()),
            server: Some("203.0.113.2".parse().unwrap()),
            source: "198.18.0.2".parse().unwrap(),
            dial: "203.0.113.2:1024".parse().unwrap(),
            last_port: Some(65535),
            maps_to: None,
            snat: Some("203.0.113.1".parse().unwrap()),
            seconds_left: entry.seconds_left,
        }
    );

    // A second session of the client to the same server shares the element; a third is over
    // the limit.
    let b = pinholes.open_window(&window(4, false)).await.unwrap();
    let refused = pinholes.open_window(&window(5, false)).await;
    assert!(
        matches!(refused, Err(OpenError::WindowLimit(2))),
        "{refused:?}"
    );
    assert_eq!(json_elements("win_v4").len(), 1);

    // A renewal starts the kernel timeout over.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let before = expires("win_v4");
    assert!(before <= 2, "{before} s left after 2.1 s of 4");
    pinholes.refresh_windows().await.unwrap();
    assert!(
        expires("win_v4") >= 3,
        "renewed: {} s left",
        expires("win_v4")
    );

    // A window the kernel lost (a table reloaded under the daemon) comes back at the next
    // renewal.
    nft(&["flush", "map", "inet", "ftp_alg", "win_v4"]);
    pinholes.refresh_windows().await.unwrap();
    assert_eq!(json_elements("win_v4").len(), 1, "renewed back");

    pinholes.close(&[a.id]).await.unwrap();
    assert_eq!(
        json_elements("win_v4").len(),
        1,
        "the second owner keeps it"
    );
    pinholes.close(&[b.id]).await.unwrap();
    assert!(listed().await.is_empty());
    pinholes.refresh_windows().await.unwrap();
    assert!(listed().await.is_empty(), "nothing to renew once closed");

    let v6 = pinholes.open_window(&window(6, true)).await.unwrap();
    let entries = listed().await;
    assert_eq!(
        entries
            .iter()
            .map(|e| (e.kind, e.source, e.dial, e.last_port, e.snat))
            .collect::<Vec<_>>(),
        [(
            PinholeKind::Window,
            "2001:db8:a::2".parse::<IpAddr>().unwrap(),
            "[2001:db8:b::2]:1024".parse::<SocketAddr>().unwrap(),
            Some(65535),
            Some("2001:db8:b::1".parse::<IpAddr>().unwrap())
        )]
    );
    // Removed after the kernel dropped it (its timeout ran out): no error.
    nft(&["flush", "map", "inet", "ftp_alg", "win_v6"]);
    pinholes.close(&[v6.id]).await.unwrap();
    assert!(listed().await.is_empty());
}

#[test]
fn netlink_windows_round_trip() {
    in_namespace(|| async { window_round_trip(netlink::backend().unwrap()).await });
}

#[test]
fn nft_windows_round_trip() {
    in_namespace(|| async { window_round_trip(nft::backend("nft".into())).await });
}

/// Reverse mode, passive, from `client`, to the server's passive port `server_port`: the
/// request a session makes for each 227.
fn passive_from(client: &str, server_port: u16) -> PinholeRequest {
    let mut request = reverse_passive(20, None);
    request.source = client.parse().unwrap();
    request.label.client = request.source;
    request.dnat = Some(SocketAddr::new("203.0.113.2".parse().unwrap(), server_port));
    request
}

/// The value of the dnat_v4 element keyed `source . 198.18.0.1 . 61000`, as nft prints it.
fn dnat_target(source: &str) -> Option<serde_json::Value> {
    json_elements("dnat_v4")
        .into_iter()
        .find(|e| e[0]["elem"]["val"]["concat"][0] == source)
        .map(|e| e[1].clone())
}

/// What a connection's first packet does to its pinhole: the kernel deletes the pin element.
fn connection_arrives(source: &str) {
    nft(&[
        "delete",
        "element",
        "inet",
        "ftp_alg",
        "pin_v4",
        &format!("{{ {source} . 198.18.0.1 . 61000 }}"),
    ]);
}

/// One public port: it waits for two clients at once; the same client gets it again once its
/// first pinhole has been used (learnt from the kernel), and the translation of the new
/// pinhole replaces the old one's map value (the kernel refuses a plain add of another value);
/// a pinhole that is never used holds the port for its client until the wait runs out.
async fn shared_port(backend: Firewall) {
    let pinholes = Pinholes::new(
        backend,
        PortPool::new(61000, 61000, TIMEOUT, Duration::from_secs(120)),
        TIMEOUT,
    )
    .with_port_wait(Duration::from_millis(300));
    let a = pinholes
        .open(&passive_from("198.18.0.2", 40000))
        .await
        .unwrap();
    let other = pinholes
        .open(&passive_from("198.18.0.3", 40007))
        .await
        .unwrap();
    assert_eq!((a.dial_port, other.dial_port), (61000, 61000));
    assert_eq!(
        json_elements("pin_v4").len(),
        2,
        "one port waits for two clients"
    );

    // The same client again, for another server port: it waits until A's connection arrives.
    let again = passive_from("198.18.0.2", 40001);
    let (b, ()) = tokio::join!(pinholes.open(&again), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        connection_arrives("198.18.0.2");
    });
    let b = b.unwrap();
    assert_eq!(b.dial_port, 61000);
    assert_eq!(
        dnat_target("198.18.0.2"),
        Some(serde_json::json!({"concat": ["203.0.113.2", 40001]})),
        "the new pinhole's translation replaced the old one's"
    );
    let snat_keys: Vec<_> = json_elements("snat_v4")
        .iter()
        .map(|e| e[0]["elem"]["val"]["concat"][2].clone())
        .collect();
    assert!(
        snat_keys.contains(&40000.into()) && snat_keys.contains(&40001.into()),
        "{snat_keys:?}"
    );
    // A's transfer ends first: B's translation stays; then B's.
    pinholes.close(&[a.id]).await.unwrap();
    assert_eq!(
        dnat_target("198.18.0.2"),
        Some(serde_json::json!({"concat": ["203.0.113.2", 40001]}))
    );
    pinholes.close(&[b.id]).await.unwrap();
    assert_eq!(dnat_target("198.18.0.2"), None);

    // A pinhole never used: the next announcement for that client waits, then is refused.
    let c = pinholes
        .open(&passive_from("198.18.0.2", 40002))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let refused = pinholes.open(&passive_from("198.18.0.2", 40003)).await;
    assert!(
        matches!(refused, Err(OpenError::PortsExhausted)),
        "{refused:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    pinholes.close(&[c.id, other.id]).await.unwrap();
    assert!(listed().await.is_empty(), "{:#?}", listed().await);
}

#[test]
fn netlink_shares_one_port() {
    in_namespace(|| async { shared_port(netlink::backend().unwrap()).await });
}

#[test]
fn nft_shares_one_port() {
    in_namespace(|| async { shared_port(nft::backend("nft".into())).await });
}

/// One client given one port for transfer after transfer, as fast as netlink goes: the packet
/// path only marks a used pin element dead, and dead copies of one key must not pile up until
/// the kernel refuses the next add (the pin sets' `gc-interval` sees to that).
#[test]
fn netlink_reuses_one_key_quickly() {
    in_namespace(|| async {
        for args in [
            ["addr", "add", "198.18.0.1/32", "dev", "lo"],
            ["addr", "add", "198.18.0.2/32", "dev", "lo"],
        ] {
            let status = Command::new("ip").args(args).status().expect("run ip");
            assert!(status.success(), "ip {args:?}");
        }
        let status = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("run ip");
        assert!(status.success());
        let pinholes = Pinholes::new(
            netlink::backend().unwrap(),
            PortPool::new(61000, 61000, TIMEOUT, Duration::ZERO),
            TIMEOUT,
        )
        .with_port_wait(Duration::from_secs(1));
        let mut request = reverse_passive(30, None);
        // No translation: the connection is refused locally once it has used the pinhole.
        (request.dnat, request.snat) = (None, None);
        for i in 0..1500 {
            let opened = pinholes
                .open(&request)
                .await
                .unwrap_or_else(|e| panic!("transfer {i}: {e}"));
            assert_eq!(opened.dial_port, 61000);
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("198.18.0.2:0".parse().unwrap()).unwrap();
            let refused = socket.connect("198.18.0.1:61000".parse().unwrap()).await;
            assert!(refused.is_err(), "nothing listens on 61000");
            pinholes
                .close(&[opened.id])
                .await
                .unwrap_or_else(|e| panic!("transfer {i}: {e}"));
        }
        assert!(listed().await.is_empty());
    });
}

/// The kernel's refusal reaches the caller with what was refused and why, and the socket
/// serves the next request once the cause is gone.
#[test]
fn netlink_refusal_says_which_element_and_why() {
    in_namespace(|| async {
        let pinholes = pinholes(netlink::backend().unwrap());
        nft(&["delete", "table", "inet", "ftp_alg"]);
        let error = pinholes
            .open(&reverse_passive(7, None))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("add element inet ftp_alg pin_v4 { 198.18.0.2 . 198.18.0.1 . 61000 }")
                && error.contains("No such file or directory"),
            "{error}"
        );
        nft::load_table(Path::new("nft"), 0xf7a0.into(), 2121, &[])
            .await
            .unwrap();
        pinholes.open(&reverse_passive(8, None)).await.unwrap();
        assert_eq!(listed().await.len(), 1);
    });
}

/// Accept one connection on either listener within a bound; says which one got it.
fn accepted_by(listeners: &[&std::net::TcpListener]) -> Option<usize> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        for (i, listener) in listeners.iter().enumerate() {
            if listener.accept().is_ok() {
                return Some(i);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// A connection from `source` to `dest` (both local addresses of the namespace).
fn dial_from(source: &str, dest: &str) -> std::net::TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let source: SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&source.into()).expect("bind the source");
    let dest: SocketAddr = dest.parse().unwrap();
    socket
        .connect_timeout(&dest.into(), Duration::from_secs(5))
        .expect("connect");
    socket.into()
}

/// The dnat map sends on only the connection that hit its pinhole in the same rule. A connection
/// that carries ftp-alg's mark for another reason (here an operator's rule; in the wild, a
/// connection a kernel FTP helper expected, which inherits its control connection's mark) goes
/// where it was addressed, even when a dnat element matches it.
#[test]
fn only_the_connection_that_hit_its_pinhole_is_translated() {
    in_namespace(|| async {
        for args in [
            &["link", "set", "lo", "up"][..],
            &["addr", "add", "198.18.0.1/32", "dev", "lo"],
            &["addr", "add", "198.18.0.2/32", "dev", "lo"],
            &["addr", "add", "203.0.113.2/32", "dev", "lo"],
        ] {
            let status = Command::new("ip").args(args).status().expect("run ip");
            assert!(status.success(), "ip {args:?}");
        }
        let dial = std::net::TcpListener::bind("198.18.0.1:61000").expect("bind");
        let target = std::net::TcpListener::bind("203.0.113.2:40000").expect("bind");
        for l in [&dial, &target] {
            l.set_nonblocking(true).expect("nonblocking");
        }
        nft(&[
            "add element inet ftp_alg dnat_v4 { 198.18.0.2 . 198.18.0.1 . 61000 timeout 30s : 203.0.113.2 . 40000 }",
        ]);
        nft(&["add table inet operator"]);
        nft(&["add chain inet operator out { type filter hook output priority -150; }"]);
        nft(&["add rule inet operator out tcp dport 61000 ct mark set 0x0000f7a0"]);

        let _marked = dial_from("198.18.0.2", "198.18.0.1:61000");
        assert_eq!(
            accepted_by(&[&dial, &target]),
            Some(0),
            "a marked connection without a pinhole was translated"
        );

        nft(&["add element inet ftp_alg pin_v4 { 198.18.0.2 . 198.18.0.1 . 61000 timeout 30s }"]);
        let _pinholed = dial_from("198.18.0.2", "198.18.0.1:61000");
        assert_eq!(
            accepted_by(&[&dial, &target]),
            Some(1),
            "the connection that hit the pinhole was not translated"
        );
        assert!(
            !nft(&["list set inet ftp_alg pin_v4"]).contains("61000"),
            "the pinhole admits one connection"
        );
    });
}
