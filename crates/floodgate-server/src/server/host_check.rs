//! The guard against DNS rebinding. A web page the user opens can point its own host name at
//! 127.0.0.1 once loaded and then send requests to a local server as its own origin: the
//! browser sees one origin, so neither CORS nor the JSON content type stops them, and a server
//! without a token would serve them (release other holders' permits, change limits). Such a
//! request names the page's host in `Host`, never an IP address or `localhost`; so a server
//! that only local clients can reach serves only requests naming those, or a name it was given.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// Refuses (403 `host_not_allowed`) a request whose `Host` (or, in HTTP/2, `:authority`)
/// names a host other than an IP address, `localhost` (or a name under it) or one of `names`.
/// A request that names none (HTTP/1.0) passes: a browser always sends one.
pub(super) async fn require_allowed_host(
    State(names): State<Arc<[String]>>,
    request: Request,
    next: Next,
) -> Response {
    let named = match request.uri().authority() {
        Some(authority) => Some(Ok(authority.host())),
        None => request
            .headers()
            .get(header::HOST)
            .map(|v| v.to_str().map(host_of)),
    };
    match named {
        None => next.run(request).await,
        Some(Ok(host)) if allowed(host, &names) => next.run(request).await,
        Some(named) => {
            let shown = named.map_or_else(|_| "(not text)".to_owned(), |h| format!("{h:?}"));
            ApiError::new(
                StatusCode::FORBIDDEN,
                "host_not_allowed",
                format!(
                    "Host {shown} is not allowed: this server listens on loopback without a \
                     token, so it serves requests naming localhost or an IP address (a guard \
                     against DNS rebinding); name the host with --allowed-host, or set a token"
                ),
            )
            .into_response()
        }
    }
}

/// The host of a `Host` value: without its port, and an IPv6 address with its brackets.
fn host_of(value: &str) -> &str {
    let value = value.trim();
    if value.starts_with('[') {
        return value.find(']').map_or(value, |end| &value[..=end]);
    }
    match value.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => value,
    }
}

/// Whether `host` (as `host_of` gives it, or a URI's) is an IP address, `localhost` or a name
/// under it (RFC 6761: never sent to DNS, so never rebound), or one of `names` (lower case).
fn allowed(host: &str, names: &[String]) -> bool {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().is_ok();
    }
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    host.parse::<Ipv4Addr>().is_ok()
        || host == "localhost"
        || host.ends_with(".localhost")
        || names.contains(&host)
}

/// Checks a name given to `--allowed-host` and returns it as `allowed` compares it (lower case,
/// no trailing dot): a host name of letters, digits, `-`, `_` and `.`, with no port.
pub(crate) fn allowed_host_name(name: &str) -> Result<String, String> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    let valid = !trimmed.is_empty()
        && trimmed.len() <= 253
        && trimmed
            .split('.')
            .all(|label| !label.is_empty() && label.len() <= 63)
        && trimmed
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(trimmed.to_ascii_lowercase())
    } else {
        Err(format!(
            "allowed_hosts: {name:?} is not a host name (letters, digits, '-', '_' and '.', \
             without a port or a scheme)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::{allowed, allowed_host_name, host_of};

    fn passes(value: &str, names: &[&str]) -> bool {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        allowed(host_of(value), &names)
    }

    #[test]
    fn addresses_and_localhost_pass_other_names_only_when_given() {
        for ok in [
            "127.0.0.1:8750",
            "127.0.0.1",
            "10.1.2.3:80",
            "[::1]:8750",
            "[::1]",
            "localhost:8750",
            "LOCALHOST",
            "localhost.",
            "app.localhost:3000",
        ] {
            assert!(passes(ok, &[]), "{ok}");
        }
        for refused in [
            "evil.example:8750",
            "evil.example",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "[not-an-address]:1",
            "[::1",
            "",
            "a:b:c",
        ] {
            assert!(!passes(refused, &[]), "{refused}");
        }
        assert!(passes("Floodgate.Internal:8750", &["floodgate.internal"]));
        assert!(passes("floodgate.internal.", &["floodgate.internal"]));
        assert!(!passes("other.internal", &["floodgate.internal"]));
    }

    #[test]
    fn given_names_are_checked_and_lowered() {
        assert_eq!(
            allowed_host_name("Floodgate.Internal.").as_deref(),
            Ok("floodgate.internal")
        );
        for bad in [
            "",
            ".",
            "a..b",
            "host:8750",
            "http://host",
            "a/b",
            "ho st",
            "é.example",
        ] {
            let Err(err) = allowed_host_name(bad) else {
                panic!("{bad:?} accepted");
            };
            assert!(err.starts_with("allowed_hosts: "), "{err}");
        }
    }
}
