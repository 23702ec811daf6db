//! The accept loop in front of the router: a cap on open connections, per-connection header
//! and keep-alive idle timeouts (see [`super::conn_io`]), and a shutdown bounded by a grace
//! period whatever clients do. Everything here happens before authentication, so nothing here
//! may cost more than a connection's few kilobytes or outlive its timeouts.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::conn_io::{Counted, Guarded, InFlight, Timeouts};

/// Largest read buffer of one connection: request heads above it are answered 431. Smaller
/// than hyper's default (about 400 KB) so that a slow client cannot make the server hold
/// hundreds of kilobytes for it; bodies are streamed and not bounded by it.
const MAX_READ_BUF: usize = 64 * 1024;
// A head cut at the cap is refused by hyper itself when its buffer is full (see `conn_io`).
const _: () = assert!(MAX_READ_BUF == super::conn_io::MAX_HEAD);

/// What the accept loop needs to know.
#[derive(Debug, Clone)]
pub(super) struct ListenLimits {
    /// Header and idle timeouts, applied per connection.
    pub(super) timeouts: Timeouts,
    /// Most connections open at once; further ones get a 503 and are closed.
    pub(super) max_connections: usize,
    /// How long shutdown waits for connections to finish before closing them.
    pub(super) shutdown_grace: Duration,
    /// HTTPS: each connection's TLS handshake runs in its own task, after the cap.
    pub(super) tls: Option<super::tls::TlsAcceptors>,
}

/// The answer to a connection over the cap: written once without waiting, then closed.
fn over_cap_answer() -> Vec<u8> {
    let body = r#"{"error":"too_many_connections","message":"the server holds its maximum number of connections; retry shortly or elsewhere"}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         connection: close\r\nretry-after: 1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Accepts until `shutdown` completes; then stops accepting, tells `draining` (held acquires
/// answer 503), asks every connection to finish its request and close, and after
/// `shutdown_grace` closes whatever is still open.
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ListenLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    draining: watch::Sender<bool>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let over_cap = over_cap_answer();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .max_buf_size(MAX_READ_BUF)
        .keep_alive(true);
    let http = Arc::new(http);
    tokio::pin!(shutdown);
    loop {
        // Reap finished connections so the set holds only live ones.
        while connections.try_join_next().is_some() {}
        let (stream, _peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors (or a connection reset before accept): the listener
                    // is still good; back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            refuse(&stream, &over_cap);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let in_flight = InFlight::default();
        let service = Counted::new(TowerToHyperService::new(app.clone()), in_flight.clone());
        let http = Arc::clone(&http);
        let stop = stop_rx.clone();
        let timeouts = limits.timeouts;
        let tls = limits.tls.clone();
        connections.spawn(async move {
            match tls {
                None => {
                    let io = Guarded::new(stream, timeouts, in_flight);
                    serve_connection(&http, io, service, stop).await
                }
                Some(tls) => {
                    let handshake = tls.acceptor().accept(stream);
                    match tokio::time::timeout(super::tls::HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(tls_stream)) => {
                            let io = Guarded::new(tls_stream, timeouts, in_flight);
                            serve_connection(&http, io, service, stop).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    tracing::info!(
        open = connections.len(),
        grace_ms = u64::try_from(limits.shutdown_grace.as_millis()).unwrap_or(u64::MAX),
        "shutting down: answering held acquires with 503, closing connections"
    );
    let _ = draining.send(true);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "grace period over: closing connections still open"
        );
        connections.shutdown().await;
    }
    Ok(())
}

/// Serves HTTP/1 on one connection (plain or TLS) until it ends, or gracefully once `stop`.
async fn serve_connection<IO>(
    http: &hyper::server::conn::http1::Builder,
    io: Guarded<IO>,
    service: Counted<TowerToHyperService<Router>>,
    mut stop: watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = http.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => log_end(result),
        () = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            log_end(conn.await);
        }
    }
}

fn refuse(stream: &TcpStream, answer: &[u8]) {
    // Best effort and never waiting: the point is to spend nothing on this connection.
    let _ = stream.try_write(answer);
    tracing::debug!("connection refused: at max_connections");
}

fn log_end(result: Result<(), hyper::Error>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Raises this process's soft limit on open files to the hard limit, so that the connection
/// cap, not the descriptor table, is what bounds connections. Returns the (old, new) soft
/// limit, or `None` where it cannot be read or changed.
pub fn raise_fd_limit() -> Option<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft >= hard {
        return Some((soft, soft));
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).ok()?;
    Some((soft, hard))
}
