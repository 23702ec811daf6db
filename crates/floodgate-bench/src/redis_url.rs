//! The Redis URL of the measuring commands (`bench --store`, `bench-growth --redis`): they
//! measure a direct connection to one Redis (and ping it beside), so only `redis://` and
//! `rediss://` URLs are taken. A Sentinel URL (`redis+sentinel://`, which `floodgate serve
//! --redis` takes) or any other is refused with a message saying so, before any connection.

use floodgate::store::redis::redact_url;
use floodgate_server::cli::Failure;

/// What the measuring commands need, said in each refusal.
const NEEDED: &str = "this command needs a direct redis:// or rediss:// connection to one Redis \
                      (Sentinel URLs are for `floodgate serve --redis`)";

/// Refuses (exit 2) a `flag` value that is not a direct Redis URL, naming the flag, the URL
/// with its password hidden, and what the command needs.
pub(crate) fn check_direct(flag: &str, url: &str) -> Result<(), Failure> {
    let shown = redact_url(url);
    let scheme = url
        .split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase());
    if !matches!(scheme.as_deref(), Some("redis" | "rediss")) {
        return Err(Failure::usage(format!("{flag}: {shown}: {NEEDED}")));
    }
    redis::Client::open(url)
        .map(drop)
        .map_err(|e| Failure::usage(format!("{flag}: not a Redis URL: {shown}: {e}; {NEEDED}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_direct_redis_urls_pass() {
        assert!(check_direct("--store", "redis://127.0.0.1:6379").is_ok());
        assert!(check_direct("--store", "rediss://h:6380/0").is_ok());
        for url in [
            "redis+sentinel://h:26379/m",
            "http://h:6379",
            "h:6379",
            "redis://:pw@h:99999",
        ] {
            let e = check_direct("--store", url).expect_err(url);
            assert_eq!(e.code, floodgate_server::cli::EXIT_USAGE, "{url}");
            assert!(e.message.contains("redis:// or rediss://"), "{}", e.message);
            assert!(e.message.starts_with("--store: "), "{}", e.message);
            assert!(!e.message.contains(":pw@"), "{}", e.message);
        }
    }
}
