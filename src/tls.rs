//! FTPS termination (RFC 4217): the certificate ftp-alg presents, and the binding of every
//! `PROT P` data connection to its control connection's TLS session.
//!
//! ftp-alg is the TLS server towards the client on the control connection (after `AUTH TLS`)
//! and on every data connection, passive or active (RFC 4217 §9). A data connection is accepted
//! only if its handshake resumes the TLS session of its own control connection, as vsftpd's
//! `require_ssl_reuse` demands: each control connection embeds a random token in the session
//! tickets and cached sessions it hands out ([`ServerConnection::set_resumption_data`]), and a
//! data connection must come back with exactly that token. A third party that races the client
//! to the data port, or a client that starts a fresh session, gets no data.
//!
//! Towards the server, with `tls.upstream = "tls"`, ftp-alg is the TLS client
//! ([`Upstream`]): the server's certificate is checked against `tls.upstream_ca` or the
//! pinned `tls.upstream_pin`, and every session gets a rustls client configuration of its own,
//! with a session store of its own, so that the data connections of a session resume that
//! session's control connection (vsftpd's `require_ssl_reuse=YES` refuses any other) and no
//! other session's.
//!
//! Not here: the control-channel logic (which replies `AUTH`, `PBSZ` and `PROT` get is
//! `session.rs`'s, what ftp-alg sends the server is `upstream_tls.rs`'s) and the data relay
//! itself (`datarelay.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::net::SocketAddr;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, Resumption};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::{ServerConfig, ServerConnection, ServerSessionMemoryCache};
use rustls::{CertificateError, DigitallySignedStruct, HandshakeKind, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{TlsConfig, UpstreamTrust};

/// TLS 1.2 sessions kept for resumption by data connections, across all control connections.
const SESSION_CACHE: usize = 4096;
/// Length of the random token that binds data connections to their control session.
const TOKEN_LEN: usize = 16;
/// Sessions one upstream session store keeps: the control connection's, and the TLS 1.3
/// tickets handed out on it and on its data connections (each ticket is used once).
const UPSTREAM_SESSIONS: usize = 8;

/// Why the `[tls]` files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed, or holds no key (`no items found`).
    #[error("{key} = {path}: {source}")]
    Pem {
        /// `tls.certificate` or `tls.key`.
        key: &'static str,
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("tls.certificate: {path} holds no CERTIFICATE block")]
    NoCertificate { path: PathBuf },
    /// The key does not belong to the certificate, or is of a kind rustls cannot use.
    #[error("tls: the key {key} does not fit the certificate {certificate}: {source}")]
    Mismatch {
        certificate: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    /// rustls refused the configuration (no randomness for tickets, say).
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// `tls.upstream_ca` could not be read or parsed.
    #[error("tls.upstream_ca = {path}: {source}")]
    UpstreamCa {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    /// `tls.upstream_ca` holds no certificate rustls accepts as a trust anchor.
    #[error("tls.upstream_ca = {path}: no usable CA certificate ({detail})")]
    NoUpstreamCa { path: PathBuf, detail: String },
    /// `tls.upstream_name` is neither a DNS name nor an IP address.
    #[error("tls.upstream_name = {0:?}: neither a DNS name nor an IP address")]
    UpstreamName(String),
    /// The `tls.upstream*` keys do not fit together (`Config::validate` says so first; only a
    /// configuration built in code gets here).
    #[error("tls: {0}")]
    UpstreamConfig(String),
}

/// What `check-config` says about `[tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Certificates in the chain.
    pub chain: usize,
}

/// The TLS server side of every FTPS connection of a daemon run; one session cache and one
/// ticket key for all, so a data connection can resume its control connection's session.
#[derive(Clone)]
pub struct Terminator {
    acceptor: TlsAcceptor,
    summary: Summary,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator")
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

/// The random value a control session embeds in the sessions it hands out; compared, never
/// shown.
#[derive(Clone, PartialEq, Eq)]
pub struct Token([u8; TOKEN_LEN]);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// Why a `PROT P` data connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataRefusal {
    /// The handshake failed or did not finish.
    Handshake,
    /// A full handshake: the client did not resume its control connection's session.
    NotResumed,
    /// It resumed a session, but another control connection's.
    OtherSession,
}

impl DataRefusal {
    /// Every reason, in the order metrics list them.
    pub const ALL: [DataRefusal; 3] = [
        DataRefusal::Handshake,
        DataRefusal::NotResumed,
        DataRefusal::OtherSession,
    ];

    /// For logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DataRefusal::Handshake => "handshake",
            DataRefusal::NotResumed => "not_resumed",
            DataRefusal::OtherSession => "other_session",
        }
    }
}

impl Terminator {
    /// Load the certificate chain and key of `[tls]` and check that they fit together.
    pub fn load(config: &TlsConfig) -> Result<Terminator, TlsError> {
        fn pem<'a>(
            key: &'static str,
            path: &'a Path,
        ) -> impl Fn(rustls_pki_types::pem::Error) -> TlsError + 'a {
            move |source| TlsError::Pem {
                key,
                path: path.to_owned(),
                source,
            }
        }
        let chain = CertificateDer::pem_file_iter(&config.certificate)
            .map_err(pem("tls.certificate", &config.certificate))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem("tls.certificate", &config.certificate))?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate {
                path: config.certificate.clone(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(&config.key).map_err(pem("tls.key", &config.key))?;
        let summary = Summary { chain: chain.len() };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|source| TlsError::Mismatch {
                certificate: config.certificate.clone(),
                key: config.key.clone(),
                source,
            })?;
        server.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
        server.ticketer = rustls::crypto::ring::Ticketer::new()?;
        Ok(Terminator {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            summary,
        })
    }

    /// What was loaded.
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// A fresh token for one control session.
    pub fn new_token(&self) -> Result<Token, rustls::Error> {
        let mut token = [0u8; TOKEN_LEN];
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut token)
            .map_err(|_| rustls::Error::FailedToGetRandomBytes)?;
        Ok(Token(token))
    }

    /// The control connection's handshake, after the 234 reply; the sessions it hands out
    /// carry `token`.
    pub async fn accept_control<S>(&self, stream: S, token: &Token) -> std::io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.acceptor
            .accept_with(stream, |conn: &mut ServerConnection| {
                conn.set_resumption_data(&token.0)
            })
            .await
    }

    /// A data connection's handshake; it must resume the session of the control connection
    /// that holds `token`.
    pub async fn accept_data<S>(
        &self,
        stream: S,
        token: &Token,
    ) -> Result<TlsStream<S>, DataRefusal>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let tls = self
            .acceptor
            .accept_with(stream, |conn: &mut ServerConnection| {
                // Tickets handed out on a data connection bind the same way.
                conn.set_resumption_data(&token.0)
            })
            .await
            .map_err(|e| {
                tracing::info!(error = %e, "data connection's TLS handshake failed");
                DataRefusal::Handshake
            })?;
        let conn = tls.get_ref().1;
        binding(
            conn.handshake_kind(),
            conn.received_resumption_data(),
            token,
        )?;
        Ok(tls)
    }
}

/// ftp-alg as the TLS client of the upstream server (`tls.upstream = "tls"`): the verified
/// server name and a client configuration to copy for every session.
#[derive(Clone)]
pub struct Upstream {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    trust: &'static str,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

/// One session's side of [`Upstream`]: its control connection and every data connection
/// connect with the same configuration, and so the same session store, so the data
/// connections resume the control connection's TLS session.
#[derive(Clone)]
pub struct UpstreamSession {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for UpstreamSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamSession")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Read `tls.upstream_ca` (or take `tls.upstream_pin`) for a server at `server`; `None`
    /// when the upstream is plain.
    pub fn load(config: &TlsConfig, server: SocketAddr) -> Result<Option<Upstream>, TlsError> {
        let Some(trust) = config.upstream_trust().map_err(TlsError::UpstreamConfig)? else {
            return Ok(None);
        };
        let name = match &config.upstream_name {
            Some(name) => ServerName::try_from(name.clone())
                .map_err(|_| TlsError::UpstreamName(name.clone()))?,
            None => ServerName::IpAddress(server.ip().into()),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let (config, trust) = match trust {
            UpstreamTrust::Ca(path) => {
                let roots = CertificateDer::pem_file_iter(&path)
                    .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                    .map_err(|source| TlsError::UpstreamCa {
                        path: path.clone(),
                        source,
                    })?;
                let mut store = RootCertStore::empty();
                let (added, ignored) = store.add_parsable_certificates(roots);
                if added == 0 {
                    return Err(TlsError::NoUpstreamCa {
                        path,
                        detail: format!("{ignored} certificate(s) that are not CA certificates"),
                    });
                }
                let config = builder.with_root_certificates(store).with_no_client_auth();
                (config, "ca")
            }
            UpstreamTrust::Pin(pin) => {
                let verifier = Pinned {
                    pin,
                    algorithms: provider.signature_verification_algorithms,
                };
                let config = builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verifier))
                    .with_no_client_auth();
                (config, "pin")
            }
        };
        Ok(Some(Upstream {
            config: Arc::new(config),
            name,
            trust,
        }))
    }

    /// `"ca"` or `"pin"`: how the server is verified, for `check-config` and logs.
    pub fn trust(&self) -> &'static str {
        self.trust
    }

    /// The name the server's certificate must carry.
    pub fn name(&self) -> String {
        self.name.to_str().into_owned()
    }

    /// A client side for one session, with a session store of its own.
    pub fn session(&self) -> UpstreamSession {
        let mut config = (*self.config).clone();
        config.resumption = Resumption::in_memory_sessions(UPSTREAM_SESSIONS);
        UpstreamSession {
            connector: TlsConnector::from(Arc::new(config)),
            name: self.name.clone(),
        }
    }
}

impl UpstreamSession {
    /// The TLS handshake with the server, as TLS client, on a control or data connection.
    pub async fn connect<S>(&self, stream: S) -> std::io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.connector.connect(self.name.clone(), stream).await
    }
}

/// Why a handshake failed, for a log line: rustls's own words, but for a certificate that
/// does not match `tls.upstream_pin`, which rustls can only show as a debug dump.
pub fn describe(e: &std::io::Error) -> String {
    let pinned = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|inner| match inner {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                Some(other.0.to_string())
            }
            _ => None,
        });
    pinned.unwrap_or_else(|| e.to_string())
}

/// `tls.upstream_pin`: the server's end-entity certificate must have exactly this SHA-256; its
/// handshake signatures are checked as usual, so the server must hold the certificate's key.
#[derive(Debug)]
struct Pinned {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

/// The server's certificate is not the pinned one.
#[derive(Debug, thiserror::Error)]
#[error("the server's certificate does not match tls.upstream_pin (its SHA-256 is sha256:{found})")]
struct PinMismatch {
    found: String,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest = Sha256::digest(end_entity.as_ref());
        if digest[..] == self.pin[..] {
            return Ok(ServerCertVerified::assertion());
        }
        let found = digest.iter().map(|b| format!("{b:02x}")).collect();
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(PinMismatch { found })),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Whether a data connection's handshake resumed the session that `token` marks.
fn binding(
    kind: Option<HandshakeKind>,
    received: Option<&[u8]>,
    token: &Token,
) -> Result<(), DataRefusal> {
    if kind != Some(HandshakeKind::Resumed) {
        return Err(DataRefusal::NotResumed);
    }
    if received != Some(&token.0[..]) {
        return Err(DataRefusal::OtherSession);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_resumption_of_the_same_session_binds() {
        let token = Token([7; TOKEN_LEN]);
        let other = [8; TOKEN_LEN];
        assert_eq!(
            binding(Some(HandshakeKind::Resumed), Some(&token.0), &token),
            Ok(())
        );
        for (kind, received, refusal) in [
            (
                Some(HandshakeKind::Full),
                Some(&token.0[..]),
                DataRefusal::NotResumed,
            ),
            (None, None, DataRefusal::NotResumed),
            (
                Some(HandshakeKind::FullWithHelloRetryRequest),
                None,
                DataRefusal::NotResumed,
            ),
            (
                Some(HandshakeKind::Resumed),
                Some(&other[..]),
                DataRefusal::OtherSession,
            ),
            (
                Some(HandshakeKind::Resumed),
                None,
                DataRefusal::OtherSession,
            ),
            (
                Some(HandshakeKind::Resumed),
                Some(&[][..]),
                DataRefusal::OtherSession,
            ),
        ] {
            assert_eq!(binding(kind, received, &token), Err(refusal));
        }
    }

    #[test]
    fn an_upstream_is_loaded_only_when_asked_for_and_its_ca_file_is_named() {
        let dir = std::env::temp_dir().join(format!("ftp-alg-upstream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let server: SocketAddr = "203.0.113.2:21".parse().unwrap();
        let mut config = TlsConfig {
            certificate: empty.clone(),
            key: empty.clone(),
            relay_buffer: crate::config::DEFAULT_TLS_RELAY_BUFFER,
            implicit_listen: Vec::new(),
            upstream: crate::config::UpstreamProtocol::Plain,
            upstream_ca: None,
            upstream_pin: None,
            upstream_name: None,
        };
        assert!(Upstream::load(&config, server).unwrap().is_none());
        config.upstream = crate::config::UpstreamProtocol::Tls;
        config.upstream_pin = Some(format!("sha256:{}", "00".repeat(32)));
        let pinned = Upstream::load(&config, server).unwrap().unwrap();
        assert_eq!(
            (pinned.trust(), pinned.name()),
            ("pin", "203.0.113.2".into())
        );
        config.upstream_pin = None;
        for (ca, message) in [
            (dir.join("missing.pem"), "missing.pem"),
            (empty.clone(), "empty.pem"),
        ] {
            config.upstream_ca = Some(ca);
            let e = Upstream::load(&config, server).unwrap_err().to_string();
            assert!(e.contains("tls.upstream_ca") && e.contains(message), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_pin_mismatch_is_told_in_words() {
        let mismatch = rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(PinMismatch {
                found: "ab".repeat(32),
            })),
        ));
        let e = std::io::Error::new(std::io::ErrorKind::InvalidData, mismatch);
        assert_eq!(
            describe(&e),
            format!(
                "the server's certificate does not match tls.upstream_pin (its SHA-256 is sha256:{})",
                "ab".repeat(32)
            )
        );
        let unknown = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        assert_eq!(
            describe(&unknown),
            "invalid peer certificate: UnknownIssuer"
        );
    }

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = std::env::temp_dir().join(format!("ftp-alg-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let missing = dir.join("missing.pem");
        let config = |certificate: &Path| TlsConfig {
            certificate: certificate.to_owned(),
            key: empty.clone(),
            relay_buffer: crate::config::DEFAULT_TLS_RELAY_BUFFER,
            implicit_listen: Vec::new(),
            upstream: Default::default(),
            upstream_ca: None,
            upstream_pin: None,
            upstream_name: None,
        };
        let e = Terminator::load(&config(&missing)).unwrap_err().to_string();
        assert!(e.contains("missing.pem"), "{e}");
        let e = Terminator::load(&config(&empty)).unwrap_err().to_string();
        assert!(e.contains("holds no CERTIFICATE"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
