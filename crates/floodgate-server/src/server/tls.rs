//! TLS for the HTTP API (rustls): the acceptors ([`TlsAcceptors`]) the accept loop wraps each
//! TCP connection in, and a reloader that swaps in new certificates when the files change on
//! disk (or on SIGHUP), so certificates rotate without a restart. Connections already open
//! keep the certificate they were made with; new handshakes use the new one.
//!
//! The handshake runs in its own task, bounded by [`HANDSHAKE_TIMEOUT`], so a client that
//! connects and never speaks cannot stall the accept loop of everyone else.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

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

/// The TLS configuration in force, reloaded when the certificate files change: the accept
/// loop (`listen.rs`) takes an acceptor from it for each new connection, after the
/// connection cap and before HTTP, so a client that connects and never completes its handshake
/// holds only its own task for at most [`HANDSHAKE_TIMEOUT`].
#[derive(Clone)]
pub struct TlsAcceptors {
    /// The config in force, shared with the reloader.
    current: Current,
}

impl std::fmt::Debug for TlsAcceptors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptors").finish_non_exhaustive()
    }
}

impl TlsAcceptors {
    /// Loads the files (an error here stops the server from starting) and starts the reloader,
    /// which lives as long as the runtime.
    pub fn start(files: TlsFiles) -> Result<TlsAcceptors, TlsError> {
        let current = Arc::new(RwLock::new(files.load()?));
        // Registered here, before the server listens, so an early SIGHUP is never missed.
        tokio::spawn(reload(files, Arc::clone(&current), hangup()));
        Ok(TlsAcceptors { current })
    }

    /// An acceptor with the configuration in force now.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = match self.current.read() {
            Ok(c) => Arc::clone(&c),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        tokio_rustls::TlsAcceptor::from(config)
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
