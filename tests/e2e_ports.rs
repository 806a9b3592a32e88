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
            use crate::common::ports::{self, Mirror, Ports};
            use crate::common::{Family, Server, Topology};

            const TOPOLOGY: Topology = Topology::$Topology(Family::V4);
            const SERVER: Server = Server::$Server;
            const PORTS: Ports = Ports::$Ports;

            #[test]
            fn mirror_passive() {
                ports::mirror(TOPOLOGY, SERVER, PORTS, Mirror::Passive);
            }

            #[test]
            fn mirror_active() {
                ports::mirror(TOPOLOGY, SERVER, PORTS, Mirror::Active);
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

/// The whole 4-tuple repeats (vsftpd dials every data connection from port 20 to the one
/// port): with TCP timestamps, as Linux sends them, the server's kernel takes over its own
/// TIME_WAIT socket, and conntrack reopens its entry (`scripts/time-wait-experiment`).
mod from_port_20 {
    use crate::common::ports::{self, Mirror, Ports};
    use crate::common::{Family, Server, Topology};

    #[test]
    fn reverse_vsftpd_one_port_mirror_active() {
        let topology = Topology::Reverse(Family::V4);
        ports::mirror(
            topology,
            Server::Vsftpd,
            Ports::One,
            Mirror::ActiveFromPort20,
        );
    }

    #[test]
    fn sidecar_vsftpd_one_port_mirror_active() {
        let topology = Topology::Sidecar(Family::V4);
        ports::mirror(
            topology,
            Server::Vsftpd,
            Ports::One,
            Mirror::ActiveFromPort20,
        );
    }
}

/// One port with the nft program as the pinhole backend: it learns which pinholes were used
/// from `nft -j list set` instead of netlink gets. Smaller loads: an nft process per step.
mod nft_backend {
    use crate::common::ports::{self, Mirror, Ports};
    use crate::common::{Family, Server, Topology};

    #[test]
    fn reverse_vsftpd_one_port_mirror_passive() {
        let topology = Topology::Reverse(Family::V4);
        ports::mirror(topology, Server::Vsftpd, Ports::OneWithNft, Mirror::Passive);
    }

    #[test]
    fn reverse_vsftpd_one_port_parallel_from_one_address() {
        let topology = Topology::Reverse(Family::V4);
        ports::parallel_from_one_address(topology, Server::Vsftpd, Ports::OneWithNft);
    }
}
