//! `floodgate limiter set|delete`.

use std::time::Duration;

use serde_json::{Map, Value};

use super::duration::parse_duration;
use super::status::print;
use super::{Failure, ServerArgs};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum LimiterCommand {
    /// Create a limiter, or change the given fields of an existing one.
    Set(SetArgs),
    /// Delete a limiter (its waiters are answered, its permits are no longer held).
    Delete(DeleteArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct SetArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The limiter's name.
    name: String,
    /// Permits out at once (required when creating).
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
}

#[derive(Debug, clap::Args)]
pub(crate) struct DeleteArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The limiter's name.
    name: String,
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
            let client = args.server.client()?;
            let reply = client.put_limiter(&args.name, &Value::Object(body)).await?;
            print(&format!(
                "{}: concurrency {}, in use {}, waiting {}\n",
                args.name,
                reply.get("concurrency").unwrap_or(&Value::Null),
                reply.get("in_use").unwrap_or(&Value::Null),
                reply.get("waiting").unwrap_or(&Value::Null),
            ));
            Ok(0)
        }
        LimiterCommand::Delete(args) => {
            let client = args.server.client()?;
            client.delete_limiter(&args.name).await?;
            print(&format!("{}: deleted\n", args.name));
            Ok(0)
        }
    }
}
