//! Shared public data ports end to end (issue 11): reverse and sidecar mode, vsftpd and
//! proftpd, with one public data port (`one_port`) and with the harness's range (`range`): a
//! 500-file `lftp mirror` passive and active, 50 parallel downloads from one address, 200
//! client addresses at once. The bodies are in `common::ports`.

// Each test binary uses its own part of the shared harness (this one not its macro).
#[allow(unused)]
mod common;

/// One module per topology, server and port set, with the four cases in each, e.g.
/// `reverse::vsftpd::one_port::mirror_active`.
macro_rules! cases {
    ($($topology:ident: $Topology:ident;)+) => {
        $(mod $topology {
            cases!(@server $Topology, vsftpd: Vsftpd);
            cases!(@server $Topology, proftpd: Proftpd);
        })+
    };
    (@server $Topology:ident, $server:ident: $Server:ident) => {
        mod $server {
            cases!(@ports $Topology, $Server, one_port: One);
            cases!(@ports $Topology, $Server, range: Range);
        }
    };
    (@ports $Topology:ident, $Server:ident, $ports:ident: $Ports:ident) => {
        mod $ports {
            use crate::common::ports::{self, Ports};
            use crate::common::{Family, Server, Topology};

            const TOPOLOGY: Topology = Topology::$Topology(Family::V4);
            const SERVER: Server = Server::$Server;
            const PORTS: Ports = Ports::$Ports;

            #[test]
            fn mirror_passive() {
                ports::mirror(TOPOLOGY, SERVER, PORTS, true);
            }

            #[test]
            fn mirror_active() {
                ports::mirror(TOPOLOGY, SERVER, PORTS, false);
            }

            #[test]
            fn parallel_from_one_address() {
                ports::parallel_from_one_address(TOPOLOGY, SERVER, PORTS);
            }

            #[test]
            fn many_client_addresses() {
                ports::many_client_addresses(TOPOLOGY, SERVER, PORTS);
            }
        }
    };
}

cases! {
    reverse: Reverse;
    sidecar: Sidecar;
}
