//! `floodgate limiter set|delete|apply`.

use std::time::Duration;

use serde_json::{Map, Value};

use super::duration::parse_duration;
use super::print;
use super::{Failure, ServerArgs};
use crate::client::ClientError;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum LimiterCommand {
    /// Create a limiter, or change the given fields of an existing one.
    Set(SetArgs),
    /// Delete a limiter (its waiters are answered, its permits are no longer held).
    Delete(DeleteArgs),
    /// Make the server's limiters match a file's `[limiters.NAME]` tables (see --dry-run).
    Apply(super::apply::ApplyArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct SetArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The limiter's name.
    name: String,
    /// Permits out at once (required when creating, unless --rate is given).
    #[arg(long)]
    concurrency: Option<u32>,
    /// Default lease, e.g. 5m.
    #[arg(long, value_parser = parse_duration)]
    lease: Option<Duration>,
    /// Cap on a wait, e.g. 60s.
    #[arg(long, value_parser = parse_duration)]
    max_wait: Option<Duration>,
    /// Cap on the queue length.
    #[arg(long)]
    max_queue: Option<u32>,
    /// A rate limit, LIMIT/PERIOD: `100/1m`, `10/1s`, `5/250ms`.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<(u32, Duration)>,
    /// Tokens the rate allows back to back (default: the tokens of 20 ms, at least 1).
    #[arg(long, requires = "rate")]
    burst: Option<u32>,
    /// Adapt the concurrency limit to backend feedback between MIN:MAX. On a limiter that
    /// already adapts, only the range changes: its controller and tuning stay, unless
    /// --algorithm names another controller (which starts from its defaults).
    #[arg(long, value_parser = parse_range)]
    adaptive: Option<(u32, u32)>,
    /// The adaptive controller: aimd (the default) or gradient (latency-aware, plateaus where
    /// throttling began; see docs/api.md).
    #[arg(long, requires = "adaptive", value_parser = ["aimd", "gradient"])]
    algorithm: Option<String>,
}

/// `100/1m` -> (100, 60 s).
fn parse_rate(text: &str) -> Result<(u32, Duration), String> {
    let (n, period) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?}: expected LIMIT/PERIOD, e.g. 100/1m"))?;
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: {n:?} is not a whole number"))?;
    let period = parse_duration(period)?;
    Ok((n, period))
}

/// `5:100` -> (5, 100).
fn parse_range(text: &str) -> Result<(u32, u32), String> {
    let (a, b) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?}: expected MIN:MAX, e.g. 5:100"))?;
    let num = |s: &str| {
        s.trim()
            .parse::<u32>()
            .map_err(|_| format!("{text:?}: {s:?} is not a whole number"))
    };
    Ok((num(a)?, num(b)?))
}

#[derive(Debug, clap::Args)]
pub(crate) struct DeleteArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The limiter's name.
    name: String,
}

/// The limiter's adaptive setting to keep under a new `--adaptive` range: its controller and
/// tuning, when it adapts with the controller `algorithm` names (any, when `None`). The API
/// replaces `adaptive` as a whole, so sending only the range would silently turn a gradient
/// limiter into AIMD and drop its tuning. `None`: a new limiter, one that does not adapt, or
/// a change of controller, which starts from that controller's defaults.
async fn current_adaptive(
    client: &crate::client::Client,
    name: &str,
    algorithm: Option<&str>,
) -> Result<Option<Map<String, Value>>, Failure> {
    let current = match client.limiter(name).await {
        Ok(limiter) => limiter,
        Err(ClientError::Api { status: 404, .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(adaptive) = current.get("adaptive").and_then(Value::as_object) else {
        return Ok(None);
    };
    let same_controller =
        algorithm.is_none_or(|a| adaptive.get("algorithm").and_then(Value::as_str) == Some(a));
    Ok(same_controller.then(|| adaptive.clone()))
}

fn ms(d: Duration) -> Value {
    Value::from(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) async fn limiter(cmd: LimiterCommand) -> Result<u8, Failure> {
    match cmd {
        LimiterCommand::Set(args) => {
            let mut body = Map::new();
            if let Some(c) = args.concurrency {
                body.insert("concurrency".into(), c.into());
            }
            if let Some(d) = args.lease {
                body.insert("lease_ms".into(), ms(d));
            }
            if let Some(d) = args.max_wait {
                body.insert("max_wait_ms".into(), ms(d));
            }
            if let Some(q) = args.max_queue {
                body.insert("max_queue".into(), q.into());
            }
            if let Some((limit, period)) = args.rate {
                let mut rate = serde_json::json!({ "limit": limit, "period_ms": ms(period) });
                // Left out, not null: the API refuses a null burst, and its default is the
                // tokens of 20 ms.
                if let (Some(burst), Some(fields)) = (args.burst, rate.as_object_mut()) {
                    fields.insert("burst".into(), burst.into());
                }
                body.insert("rate".into(), rate);
            }
            let client = args.server.client()?;
            if let Some((min, max)) = args.adaptive {
                let mut adaptive = current_adaptive(&client, &args.name, args.algorithm.as_deref())
                    .await?
                    .unwrap_or_default();
                adaptive.insert("min".into(), min.into());
                adaptive.insert("max".into(), max.into());
                if let Some(a) = &args.algorithm {
                    adaptive.insert("algorithm".into(), a.as_str().into());
                }
                body.insert("adaptive".into(), Value::Object(adaptive));
            }
            let reply = client.put_limiter(&args.name, &Value::Object(body)).await?;
            print(&format!(
                "{}: limit {}, rate {}, in use {}, waiting {}\n",
                args.name,
                reply.get("limit").unwrap_or(&Value::Null),
                reply.get("rate").unwrap_or(&Value::Null),
                reply.get("in_use").unwrap_or(&Value::Null),
                reply.get("waiting").unwrap_or(&Value::Null),
            ))?;
            Ok(0)
        }
        LimiterCommand::Delete(args) => {
            let client = args.server.client()?;
            client.delete_limiter(&args.name).await?;
            print(&format!("{}: deleted\n", args.name))?;
            Ok(0)
        }
        LimiterCommand::Apply(args) => super::apply::apply(args).await,
    }
}
