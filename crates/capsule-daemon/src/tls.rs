//! The daemon's TCP listener: its token, read from a file only its owner may read, and TLS
//! (rustls), which a listener on any address but loopback must have.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::DaemonError;

/// The shortest token accepted.
const MIN_TOKEN: usize = 16;
/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate chain and its private key, for the TCP listener.
#[derive(Debug, Clone)]
pub struct Tls {
    config: Arc<rustls::ServerConfig>,
}

impl Tls {
    /// From PEM files: `cert` (the chain, leaf first) and `key`.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, DaemonError> {
        let failed =
            |path: &Path, error: &dyn std::fmt::Display| DaemonError::Tls(format!("`{}`: {error}", path.display()));
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| failed(cert, &e))?;
        if chain.is_empty() {
            return Err(failed(cert, &"no certificate in it"));
        }
        let private = PrivateKeyDer::from_pem_file(key).map_err(|e| failed(key, &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|builder| builder.with_no_client_auth().with_single_cert(chain, private))
            .map_err(|e| failed(key, &e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self { config: Arc::new(config) })
    }
}

/// Where TCP clients are served, and what they must show.
#[derive(Debug, Clone)]
pub struct Listen {
    pub address: SocketAddr,
    pub token: String,
    pub tls: Option<Tls>,
}

impl Listen {
    /// A listener on `address` with the token in `token_file`: the file must be readable by
    /// its owner only and hold at least 16 characters, and an address other than loopback
    /// needs `tls`.
    pub fn new(address: SocketAddr, token_file: &Path, tls: Option<Tls>) -> Result<Self, DaemonError> {
        let refuse = |why: String| DaemonError::Token { path: token_file.to_path_buf(), why };
        let file = std::fs::File::open(token_file).map_err(|e| refuse(e.to_string()))?;
        let mode = file.metadata().map_err(|e| refuse(e.to_string()))?.mode();
        if mode & 0o077 != 0 {
            return Err(refuse(format!("its mode is {:o}, so other users may read it", mode & 0o777)));
        }
        let token = std::io::read_to_string(file).map_err(|e| refuse(e.to_string()))?.trim().to_string();
        if token.len() < MIN_TOKEN {
            return Err(refuse(format!(
                "the token is too short to protect a TCP listener: use at least {MIN_TOKEN} random characters, e.g. `head -c 32 /dev/urandom | base64`"
            )));
        }
        if !address.ip().is_loopback() && tls.is_none() {
            return Err(DaemonError::ListenWithoutTls(address));
        }
        Ok(Self { address, token, tls })
    }
}

/// Accepts TCP connections and completes their TLS handshakes away from the accept loop, so a
/// slow client holds up no other.
pub struct TlsListener {
    incoming: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Serves `listener` with `tls` (on the current runtime).
    pub fn new(listener: TcpListener, tls: &Tls) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(tls.config.clone());
        let (sender, incoming) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accepting a TCP connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, sender) = (acceptor.clone(), sender.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let _ = sender.send((stream, peer)).await;
                        }
                        Ok(Err(error)) => tracing::info!(%peer, %error, "a TLS handshake failed"),
                        Err(_) => tracing::info!(%peer, "a TLS handshake took too long"),
                    }
                });
            }
        });
        Ok(Self { incoming, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(accepted) => accepted,
            // The accept loop ends only with the runtime.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn token_file(dir: &Path, mode: u32, token: &str) -> std::path::PathBuf {
        let path = dir.join("token");
        std::fs::write(&path, token).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn tokens_must_be_private_and_long_and_the_network_needs_tls() {
        let dir = tempfile::tempdir().unwrap();
        let loopback: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let good = token_file(dir.path(), 0o600, "0123456789abcdef0123");
        assert_eq!(Listen::new(loopback, &good, None).unwrap().token, "0123456789abcdef0123");
        let readable = token_file(dir.path(), 0o644, "0123456789abcdef0123");
        let error = Listen::new(loopback, &readable, None).unwrap_err().to_string();
        assert!(error.contains("its mode is 644"), "{error}");
        let short = token_file(dir.path(), 0o600, "short");
        assert!(Listen::new(loopback, &short, None).unwrap_err().to_string().contains("too short"));
        let good = token_file(dir.path(), 0o600, "0123456789abcdef0123");
        let everywhere: SocketAddr = "0.0.0.0:7070".parse().unwrap();
        assert!(matches!(Listen::new(everywhere, &good, None), Err(DaemonError::ListenWithoutTls(_))));
    }

    #[test]
    fn the_listener_speaks_tls_and_only_tls() {
        use std::future::IntoFuture;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().self_signed(&key).unwrap();
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        assert!(Tls::from_pem_files(&key_path, &key_path).is_err(), "a key is not a certificate");
        let tls = Tls::from_pem_files(&cert_path, &key_path).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let router = axum::Router::new().route("/", axum::routing::get(|| async { "over tls" }));
            tokio::spawn(axum::serve(TlsListener::new(listener, &tls).unwrap(), router).into_future());

            let mut roots = rustls::RootCertStore::empty();
            roots.add(cert.der().clone()).unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let client = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let mut stream = connector.connect(name, TcpStream::connect(address).await.unwrap()).await.unwrap();
            stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer).await;
            assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("over tls"), "{answer}");

            // Plain HTTP gets no answer: the handshake fails and the connection is dropped.
            let mut plain = TcpStream::connect(address).await.unwrap();
            plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(15), plain.read_to_end(&mut answer)).await;
            assert!(!String::from_utf8_lossy(&answer).contains("over tls"));
        });
    }
}
