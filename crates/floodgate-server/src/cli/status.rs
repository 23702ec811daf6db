//! `floodgate status [NAME]`.

use serde_json::Value;

use super::{print, Failure, ServerArgs};

/// Flags of `floodgate status`.
#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Show only this limiter.
    name: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn status(args: StatusArgs) -> Result<u8, Failure> {
    let client = args.server.client()?;
    let limiters = match &args.name {
        Some(name) => vec![client.limiter(name).await?],
        None => client.limiters().await?,
    };
    let mut out = String::new();
    if args.json {
        out = serde_json::to_string_pretty(&limiters).unwrap_or_default();
        out.push('\n');
    } else {
        out.push_str(&format!(
            "{:<32} {:>7} {:>12} {:>7} {:>8} {:>10} {:>10} {:>9}\n",
            "LIMITER", "LIMIT", "RATE", "IN_USE", "WAITING", "GRANTED", "TIMED_OUT", "EXPIRED"
        ));
        for l in &limiters {
            let n = |k: &str| l.get(k).and_then(Value::as_u64).unwrap_or(0);
            let c = |k: &str| {
                l.get("counters")
                    .and_then(|c| c.get(k))
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
            };
            // The limit in force (adaptive limits move it); "-" for rate-only limiters.
            let limit = l
                .get("limit")
                .and_then(Value::as_u64)
                .map_or_else(|| "-".to_owned(), |v| v.to_string());
            let rate = l.get("rate").filter(|r| !r.is_null()).map_or_else(
                || "-".to_owned(),
                |r| {
                    let g = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
                    format!("{}/{}ms", g("limit"), g("period_ms"))
                },
            );
            out.push_str(&format!(
                "{:<32} {:>7} {:>12} {:>7} {:>8} {:>10} {:>10} {:>9}\n",
                l.get("name").and_then(Value::as_str).unwrap_or("?"),
                limit,
                rate,
                n("in_use"),
                n("waiting"),
                c("granted"),
                c("timed_out"),
                c("expired"),
            ));
        }
    }
    print(&out)?;
    Ok(0)
}
