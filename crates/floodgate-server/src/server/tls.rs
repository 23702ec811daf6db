//! TLS for the HTTP API (rustls): a [`TlsListener`] that axum serves like a TCP listener, and
//! a reloader that swaps in new certificates when the files change on disk (or on SIGHUP), so
//! certificates rotate without a restart. Connections already open keep the certificate they
//! were made with; new handshakes use the new one.
//!
//! The handshake runs in its own task, bounded by [`HANDSHAKE_TIMEOUT`], so a client that
//! connects and never speaks cannot stall the accept loop of everyone else.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;

/// Longest a client may take to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the reloader looks at the files' modification times.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the pair (for example, a key that does not match the certificate).
    #[error("certificate {cert} with key {key}: {message}")]
    Pair {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
        /// rustls's reason.
        message: String,
    },
}

/// The certificate chain and key files, read again on every reload.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsFiles {
    /// Reads both files into a rustls server config (aws-lc-rs provider, HTTP/1.1 by ALPN).
    pub fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let file_error = |path: &Path, message: String| TlsError::File {
            path: path.display().to_string(),
            message,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .map_err(|e| file_error(&self.cert, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_error(&self.cert, e.to_string()))?;
        if certs.is_empty() {
            return Err(file_error(&self.cert, "no CERTIFICATE in the file".into()));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| file_error(&self.key, format!("no usable private key: {e}")))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
            .map_err(|e| TlsError::Pair {
                cert: self.cert.display().to_string(),
                key: self.key.display().to_string(),
                message: e.to_string(),
            })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The files' modification times and lengths: a change to either means "reload".
    fn stamp(&self) -> Option<[(SystemTime, u64); 2]> {
        let one = |p: &Path| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        };
        Some([one(&self.cert)?, one(&self.key)?])
    }
}

/// SIGHUP's stream, where there is one.
#[cfg(unix)]
type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangup = ();

#[cfg(unix)]
fn hangup() -> Option<Hangup> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(not(unix))]
fn hangup() -> Option<Hangup> {
    None
}

#[cfg(unix)]
async fn recv(h: &mut Hangup) -> bool {
    h.recv().await.is_some()
}

#[cfg(not(unix))]
async fn recv(_: &mut Hangup) -> bool {
    std::future::pending().await
}

/// The config new handshakes use; the reloader replaces it.
type Current = Arc<RwLock<Arc<ServerConfig>>>;

/// A TCP listener whose connections are TLS: what `axum::serve` accepts from it are finished
/// handshakes.
pub struct TlsListener {
    /// The socket.
    tcp: TcpListener,
    /// The config in force, shared with the reloader.
    current: Current,
    /// Handshakes in progress, each in its own task.
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl TlsListener {
    /// Loads the files (an error here stops the server from starting) and starts the reloader,
    /// which lives as long as the runtime.
    pub fn new(tcp: TcpListener, files: TlsFiles) -> Result<TlsListener, TlsError> {
        let current = Arc::new(RwLock::new(files.load()?));
        // Registered here, before the server listens, so an early SIGHUP is never missed.
        tokio::spawn(reload(files, Arc::clone(&current), hangup()));
        Ok(TlsListener {
            tcp,
            current,
            handshakes: JoinSet::new(),
        })
    }

    fn config(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(c) => Arc::clone(&c),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, addr)) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(self.config());
                        self.handshakes.spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) => Some((tls, addr)),
                                Ok(Err(e)) => {
                                    tracing::debug!(%addr, error = %e, "TLS handshake failed");
                                    None
                                }
                                Err(_) => {
                                    tracing::debug!(%addr, "TLS handshake timed out");
                                    None
                                }
                            }
                        });
                    }
                    // Out of file descriptors and the like: wait a little, as axum does.
                    Err(e) => {
                        tracing::error!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// Reloads the files when their modification time or length changes (looked at every
/// [`RELOAD_INTERVAL`]) and on SIGHUP. A pair that does not load (a half-written file, a
/// key that does not match) is logged and the old one stays in force.
async fn reload(files: TlsFiles, current: Current, mut hangup: Option<Hangup>) {
    let mut seen = files.stamp();
    let mut tick = tokio::time::interval(RELOAD_INTERVAL);
    loop {
        let forced = async {
            match hangup.as_mut() {
                Some(h) => recv(h).await,
                None => std::future::pending().await,
            }
        };
        let forced = tokio::select! {
            _ = tick.tick() => false,
            f = forced => f,
        };
        let stamp = files.stamp();
        if !forced && stamp == seen {
            continue;
        }
        match files.load() {
            Ok(config) => {
                match current.write() {
                    Ok(mut c) => *c = config,
                    Err(poisoned) => *poisoned.into_inner() = config,
                }
                tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
            }
            // The next change (the rest of a write in progress) is tried again.
            Err(e) => {
                tracing::error!(error = %e, "TLS certificate not reloaded; the old one stays")
            }
        }
        seen = stamp;
    }
}
