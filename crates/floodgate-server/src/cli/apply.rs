//! Declarative limits: `floodgate limiter apply -f limits.toml [--prune] [--dry-run]` makes the
//! server's limiters match the `[limiters.NAME]` tables of a file (the config file's own
//! format, read by the same parser), and `serve --config` does the same on SIGHUP.
//!
//! Both go through one [`Plan`]: what to create, change and (with prune) delete, computed from
//! full specs on both sides, so a second apply of the same file finds nothing to do. A change
//! is a full `PUT` of the file's spec; the core keeps what a running limiter learned (its
//! adaptive limit) when only other fields change, and keeps its holders and waiters always.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use floodgate::{Floodgate, KeyOverride, LimiterName, LimiterSpec, Store};
use serde::Deserialize;
use serde_json::{json, Value};

use super::print;
use super::{Failure, ServerArgs};
use crate::client::ClientError;
use crate::config::FileConfig;
use crate::wire::{millis, AdaptiveBody, RateBody};

/// Flags of `floodgate limiter apply`.
#[derive(Debug, clap::Args)]
pub(crate) struct ApplyArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The file: `[limiters.NAME]` tables as in floodgate.example.toml (other settings in it
    /// are ignored, so a server's config file can be applied as is).
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Also delete the server's limiters that the file does not name.
    #[arg(long)]
    prune: bool,
    /// Print the difference and change nothing. A change the server refuses (a read-only
    /// server, a create past its max_limiters, a limiter made keyed or plain) ends it with the
    /// apply's error and exit 2, as the apply would.
    #[arg(long)]
    dry_run: bool,
}

/// What applying a file changes.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Limiters in the file the server does not have, with their spec.
    pub(crate) create: Vec<(String, LimiterSpec)>,
    /// Limiters whose spec differs: name, the server's spec, the file's spec.
    pub(crate) change: Vec<(String, LimiterSpec, LimiterSpec)>,
    /// Limiters not in the file, deleted because prune was asked for.
    pub(crate) delete: Vec<String>,
    /// Limiters not in the file and left alone (no prune): shown so nothing is silent.
    pub(crate) kept: Vec<String>,
    /// How many limiters already match the file.
    pub(crate) unchanged: usize,
    /// The file's keyed limiters' per-key specs (`keyed_apply.rs`), for the puts and lines.
    pub(crate) keyed_want: BTreeMap<String, floodgate::KeyedSpec>,
    /// The server's per-key specs of the limiters the file names.
    pub(crate) keyed_now: BTreeMap<String, floodgate::KeyedSpec>,
    /// Key overrides of the file, set (or to set) on every apply.
    pub(crate) overrides: usize,
}

impl Plan {
    /// Compares the file's specs with the server's.
    pub(crate) fn new(
        desired: &BTreeMap<String, LimiterSpec>,
        current: &BTreeMap<String, LimiterSpec>,
        prune: bool,
    ) -> Plan {
        let mut plan = Plan::default();
        for (name, spec) in desired {
            match current.get(name) {
                None => plan.create.push((name.clone(), spec.clone())),
                Some(now) if now == spec => plan.unchanged += 1,
                Some(now) => plan.change.push((name.clone(), now.clone(), spec.clone())),
            }
        }
        for name in current.keys().filter(|n| !desired.contains_key(*n)) {
            if prune {
                plan.delete.push(name.clone());
            } else {
                plan.kept.push(name.clone());
            }
        }
        plan
    }

    /// Adds the keyed specs to the comparison: a limiter whose plain fields match but whose
    /// per-key spec differs is changed too.
    pub(crate) fn with_keyed(
        mut self,
        desired: &BTreeMap<String, LimiterSpec>,
        current: &BTreeMap<String, LimiterSpec>,
        want: BTreeMap<String, floodgate::KeyedSpec>,
        now: BTreeMap<String, floodgate::KeyedSpec>,
    ) -> Plan {
        for (name, spec) in desired {
            let Some(cur) = current.get(name) else {
                continue;
            };
            if cur == spec && want.get(name) != now.get(name) {
                self.unchanged -= 1;
                self.change.push((name.clone(), cur.clone(), spec.clone()));
            }
        }
        self.change.sort_by(|a, b| a.0.cmp(&b.0));
        self.keyed_want = want;
        self.keyed_now = now;
        self
    }

    /// A limiter's fields with its keyed ones, wanted (`true`) or current.
    fn all_fields(
        &self,
        name: &str,
        spec: &LimiterSpec,
        want: bool,
    ) -> Vec<(&'static str, String)> {
        let keyed = if want {
            &self.keyed_want
        } else {
            &self.keyed_now
        };
        let mut out = fields(spec);
        out.extend(super::keyed_apply::keyed_fields(keyed.get(name)));
        out
    }

    /// The first put of the apply (creates, then changes, in its order) that the server
    /// refuses whatever else happens: a limiter the file makes keyed that is plain, or plain
    /// that is keyed (a limiter keeps its kind; deleting it is the way). With the error the
    /// server answers, word for word.
    pub(crate) fn refused_put(&self) -> Option<(&str, ClientError)> {
        self.change.iter().find_map(|(name, _, _)| {
            let message = match (
                self.keyed_want.contains_key(name),
                self.keyed_now.contains_key(name),
            ) {
                (true, false) => floodgate::core::keyed::PLAIN_STAYS_PLAIN,
                (false, true) => crate::server::keyed::KEYED_STAYS_KEYED,
                _ => return None,
            };
            Some((
                name.as_str(),
                ClientError::Api {
                    status: 400,
                    code: "invalid_request".to_owned(),
                    message: format!("per_key: {message}"),
                    retry_after: None,
                },
            ))
        })
    }

    /// The puts the apply makes before `name`'s (every create, then the changes before it),
    /// as the plan done so far.
    fn puts_before(&self, name: &str) -> Plan {
        Plan {
            create: self.create.clone(),
            change: self
                .change
                .iter()
                .take_while(|(n, _, _)| n != name)
                .cloned()
                .collect(),
            unchanged: self.unchanged,
            kept: self.kept.clone(),
            keyed_want: self.keyed_want.clone(),
            keyed_now: self.keyed_now.clone(),
            ..Plan::default()
        }
    }

    /// The limiter of the apply's first write (a create, a change, a key override, a delete,
    /// in the apply's order), if it writes at all.
    fn first_write<'a>(
        &'a self,
        overrides: &'a [(String, String, KeyOverride)],
    ) -> Option<&'a str> {
        self.create
            .iter()
            .map(|(n, _)| n)
            .chain(self.change.iter().map(|(n, _, _)| n))
            .chain(overrides.iter().map(|(n, _, _)| n))
            .chain(self.delete.iter())
            .next()
            .map(String::as_str)
    }

    /// The plan of an apply that has done nothing yet (what it leaves alone, shown).
    fn nothing_done(&self) -> Plan {
        Plan {
            unchanged: self.unchanged,
            kept: self.kept.clone(),
            keyed_want: self.keyed_want.clone(),
            keyed_now: self.keyed_now.clone(),
            ..Plan::default()
        }
    }

    /// Whether applying changes nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.create.is_empty() && self.change.is_empty() && self.delete.is_empty()
    }

    /// One line per difference (`+` create, `~` change, `-` delete), then a summary line.
    pub(crate) fn render(&self, dry_run: bool) -> String {
        let mut out = String::new();
        for (name, spec) in &self.create {
            let fields: Vec<String> = self
                .all_fields(name, spec, true)
                .into_iter()
                .filter(|(k, v)| *k != "per_key" || v != "none")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(out, "+ {name}: {}", fields.join(" "));
        }
        for (name, old, new) in &self.change {
            let old = self.all_fields(name, old, false);
            let diffs: Vec<String> = self
                .all_fields(name, new, true)
                .into_iter()
                .zip(old)
                .filter(|((_, n), (_, o))| n != o)
                .map(|((k, n), (_, o))| format!("{k} {o} -> {n}"))
                .collect();
            let _ = writeln!(out, "~ {name}: {}", diffs.join(", "));
        }
        for name in &self.delete {
            let _ = writeln!(out, "- {name}");
        }
        if !self.kept.is_empty() {
            let _ = writeln!(
                out,
                "(not in the file, left alone; --prune deletes them: {})",
                self.kept.join(", ")
            );
        }
        if self.overrides > 0 {
            let _ = writeln!(
                out,
                "{} {} key overrides of the file (others left alone)",
                if dry_run { "would set" } else { "set" },
                self.overrides
            );
        }
        if self.is_empty() {
            let _ = writeln!(out, "no changes ({} unchanged)", self.unchanged);
        } else {
            let _ = writeln!(
                out,
                "{}{} created, {} changed, {} deleted, {} unchanged",
                if dry_run {
                    "dry run, nothing applied: would be "
                } else {
                    "applied: "
                },
                self.create.len(),
                self.change.len(),
                self.delete.len(),
                self.unchanged,
            );
        }
        out
    }
}

/// A spec's fields as the API names them, for the difference lines. Every field is listed,
/// in a fixed order, so two specs' lists line up.
fn fields(spec: &LimiterSpec) -> Vec<(&'static str, String)> {
    let or_none = |v: Option<String>| v.unwrap_or_else(|| "none".to_owned());
    vec![
        (
            "concurrency",
            or_none(spec.concurrency.map(|c| c.to_string())),
        ),
        (
            "rate",
            or_none(spec.rate.map(|r| {
                let r = RateBody::from(r);
                format!(
                    "{}/{}ms,burst:{}",
                    r.limit,
                    r.period_ms,
                    r.burst.unwrap_or(0)
                )
            })),
        ),
        (
            "adaptive",
            or_none(spec.adaptive.map(|a| {
                let a = AdaptiveBody::from(a);
                format!(
                    "{}..{},increase:{},decrease:{},cooldown_ms:{}{}",
                    a.min,
                    a.max,
                    a.increase.unwrap_or(0),
                    a.decrease.unwrap_or(0.0),
                    a.cooldown_ms.unwrap_or(0),
                    match a.algorithm {
                        Some(crate::wire::AlgorithmName::Gradient) => format!(
                            ",algorithm:gradient,tolerance:{},probe_rounds:{}",
                            a.tolerance.unwrap_or(0.0),
                            a.probe_rounds.unwrap_or(0)
                        ),
                        _ => String::new(),
                    }
                )
            })),
        ),
        ("lease_ms", millis(spec.default_lease).to_string()),
        ("max_wait_ms", millis(spec.max_wait).to_string()),
        ("max_queue", spec.max_queue.to_string()),
    ]
}

/// The full `PUT` body for a spec: every field given (`null` removes a rate or an adaptive
/// setting), so the result is the file's spec whatever the server had.
fn put_body(spec: &LimiterSpec) -> Value {
    json!({
        "concurrency": spec.concurrency,
        "rate": spec.rate.map(RateBody::from),
        "adaptive": spec.adaptive.map(AdaptiveBody::from),
        "lease_ms": millis(spec.default_lease),
        "max_wait_ms": millis(spec.max_wait),
        "max_queue": spec.max_queue,
    })
}

/// A limiter as `GET /v1/limiters` shows it; only the spec's fields are read.
#[derive(Debug, Deserialize)]
struct Shown {
    name: String,
    concurrency: Option<u32>,
    rate: Option<RateBody>,
    adaptive: Option<AdaptiveBody>,
    lease_ms: u64,
    max_wait_ms: u64,
    max_queue: u32,
}

impl Shown {
    fn spec(&self) -> LimiterSpec {
        let mut spec = LimiterSpec::default()
            .with_default_lease(std::time::Duration::from_millis(self.lease_ms))
            .with_max_wait(std::time::Duration::from_millis(self.max_wait_ms))
            .with_max_queue(self.max_queue);
        spec.concurrency = self.concurrency;
        spec.rate = self.rate.map(Into::into);
        spec.adaptive = self.adaptive.map(Into::into);
        spec
    }
}

/// The file's limiters as full specs (defaults filled in, as the server would fill them).
pub(crate) fn desired(file: &FileConfig) -> BTreeMap<String, LimiterSpec> {
    file.limiters
        .iter()
        .map(|(name, l)| (name.clone(), l.spec()))
        .collect()
}

/// `floodgate limiter apply`.
pub(crate) async fn apply(args: ApplyArgs) -> Result<u8, Failure> {
    // The whole file is read and checked before the first request: a bad file applies nothing.
    let file = FileConfig::load(&args.file).map_err(|e| Failure::usage(e.to_string()))?;
    let desired = desired(&file);
    let client = args.server.client()?;
    let listing = client.listing().await?;
    let mut current = BTreeMap::new();
    for value in listing.limiters {
        let shown: Shown = serde_json::from_value(value).map_err(|e| Failure {
            code: 1,
            message: format!("the server's limiter list is not understood: {e}"),
        })?;
        current.insert(shown.name.clone(), shown.spec());
    }
    let names = desired.keys().filter(|n| current.contains_key(*n));
    let keyed_now = super::keyed_apply::current_keyed_http(&client, names).await?;
    let want = super::keyed_apply::desired_keyed(&file);
    let mut plan =
        Plan::new(&desired, &current, args.prune).with_keyed(&desired, &current, want, keyed_now);
    let overrides = super::keyed_apply::desired_overrides(&file);
    plan.overrides = overrides.len();
    if args.dry_run || (plan.is_empty() && overrides.is_empty()) {
        // What the real run would be refused, reported as it would be (exit 2, the server's
        // message): a dry run that showed the change and exited 0 promised an apply that fails.
        // First a read-only server (its first write is refused), then the limiter cap (creates
        // come first), then a change of kind, in the order the apply would meet them.
        if listing.api_writes == Some(false) {
            if let Some(name) = plan.first_write(&overrides) {
                let refusal = ClientError::Api {
                    status: 403,
                    code: "read_only".to_owned(),
                    message: crate::server::READ_ONLY_MESSAGE.to_owned(),
                    retry_after: None,
                };
                return Err(partial(&plan.nothing_done(), refusal.into(), name, true));
            }
        }
        if let Some(max) = listing.max_limiters {
            // The create that finds the store full: the listing counts what the cap counts
            // (on Redis, names of limiters gone but not yet dropped are counted by the cap
            // and not listed, so the apply may be refused sooner than this predicts).
            let room = max.saturating_sub(current.len());
            if let Some((name, _)) = plan.create.get(room) {
                let refusal = ClientError::Api {
                    status: 409,
                    code: "too_many_limiters".to_owned(),
                    message: format!("the server already holds its maximum of {max} limiters"),
                    retry_after: None,
                };
                let mut would = plan.nothing_done();
                would.create = plan.create[..room].to_vec();
                return Err(partial(&would, refusal.into(), name, true));
            }
        }
        if let Some((name, refusal)) = plan.refused_put() {
            let would = plan.puts_before(name);
            return Err(partial(&would, Failure::from(refusal), name, true));
        }
        print(&plan.render(true))?;
        return Ok(0);
    }
    // Creates and changes first, deletes last: a failure part way leaves extra limiters, never
    // missing ones. Each line is printed as it is done, so a failure shows what was applied.
    let mut done = Plan {
        unchanged: plan.unchanged,
        kept: plan.kept.clone(),
        keyed_want: plan.keyed_want.clone(),
        keyed_now: plan.keyed_now.clone(),
        ..Plan::default()
    };
    let puts = plan
        .create
        .iter()
        .map(|(n, s)| (n, s, true))
        .chain(plan.change.iter().map(|(n, _, s)| (n, s, false)));
    for (name, spec, created) in puts {
        let mut body = put_body(spec);
        if let Some(keyed) = plan.keyed_want.get(name) {
            super::keyed_apply::add_to_body(&mut body, keyed);
        } else if plan.keyed_now.contains_key(name) {
            // Left out, `per_key` would keep the limiter keyed; `null` asks to drop the keys,
            // which the server refuses, naming the field, so nothing is silent.
            body["per_key"] = Value::Null;
        }
        client
            .put_limiter(name, &body)
            .await
            .map_err(|e| partial(&done, Failure::from(e), name, false))?;
        if created {
            done.create.push((name.clone(), spec.clone()));
        } else if let Some(c) = plan.change.iter().find(|(n, _, _)| n == name) {
            done.change.push(c.clone());
        }
    }
    done.overrides = super::keyed_apply::set_overrides_http(&client, &overrides)
        .await
        .map_err(|(name, e)| partial(&done, Failure::from(e), &name, false))?;
    for name in &plan.delete {
        match client.delete_limiter(name).await {
            Ok(_) => {}
            // Deleted by someone else meanwhile: the goal is reached all the same.
            Err(e) if e.code() == Some("unknown_limiter") => {}
            Err(e) => return Err(partial(&done, Failure::from(e), name, false)),
        }
        done.delete.push(name.clone());
    }
    print(&done.render(false))?;
    Ok(0)
}

/// A failure part way: what was applied (in a dry run: would have been) before it, then the
/// error.
fn partial(done: &Plan, failure: Failure, name: &str, dry_run: bool) -> Failure {
    Failure {
        code: failure.code,
        message: format!(
            "limiter {name}: {}\nbefore the failure:\n{}",
            failure.message,
            done.render(dry_run)
        ),
    }
}

/// `serve --config` on SIGHUP: applies the file's limiters to the server's own store, the way
/// `limiter apply` does over HTTP. Returns the plan that was carried out.
pub(crate) async fn apply_to_store<S: Store>(
    gate: &Floodgate<S>,
    file: &FileConfig,
    prune: bool,
) -> Result<Plan, String> {
    let desired = desired(file);
    let current: BTreeMap<String, LimiterSpec> = gate
        .limiters()
        .await
        .map_err(|e| format!("cannot list the limiters: {e}"))?
        .into_iter()
        .map(|s| (s.name.to_string(), s.spec))
        .collect();
    let names = desired.keys().filter(|n| current.contains_key(*n));
    let keyed_now = super::keyed_apply::current_keyed_store(gate, names).await?;
    let want = super::keyed_apply::desired_keyed(file);
    let mut plan =
        Plan::new(&desired, &current, prune).with_keyed(&desired, &current, want, keyed_now);
    let puts = plan
        .create
        .iter()
        .map(|(n, s)| (n, s))
        .chain(plan.change.iter().map(|(n, _, s)| (n, s)));
    for (name, spec) in puts {
        let limiter = LimiterName::new(name).map_err(|e| format!("limiter {name}: {e}"))?;
        let keyed = plan.keyed_want.get(name).cloned();
        if keyed.is_none() && plan.keyed_now.contains_key(name) {
            return Err(format!(
                "limiter {name}: per_key: {}",
                crate::server::keyed::KEYED_STAYS_KEYED
            ));
        }
        super::keyed_apply::put_in_store(gate, &limiter, spec.clone(), keyed, &[]).await?;
    }
    let overrides = super::keyed_apply::desired_overrides(file);
    plan.overrides = super::keyed_apply::set_overrides_store(gate, &overrides).await?;
    for name in &plan.delete {
        let limiter = LimiterName::new(name).map_err(|e| format!("limiter {name}: {e}"))?;
        gate.store()
            .delete_limiter(&limiter)
            .await
            .map_err(|e| format!("limiter {name}: {e}"))?;
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(text: &str) -> BTreeMap<String, LimiterSpec> {
        desired(&FileConfig::parse(text).expect("parses"))
    }

    #[test]
    fn a_plan_lists_creates_changes_and_deletes() {
        let current = specs("[limiters.a]\nconcurrency = 5\n[limiters.b]\nconcurrency = 1\n[limiters.old]\nconcurrency = 1");
        let desired = specs("[limiters.a]\nconcurrency = 8\n[limiters.b]\nconcurrency = 1\n[limiters.new]\nconcurrency = 2");
        let plan = Plan::new(&desired, &current, false);
        assert_eq!(plan.create.len(), 1);
        assert_eq!(plan.change.len(), 1);
        assert!(plan.delete.is_empty());
        assert_eq!(plan.kept, vec!["old".to_owned()]);
        let text = plan.render(true);
        assert!(text.contains("~ a: concurrency 5 -> 8\n"), "{text}");
        assert!(text.contains("+ new: concurrency=2 "), "{text}");
        let pruned = Plan::new(&desired, &current, true);
        assert_eq!(pruned.delete, vec!["old".to_owned()]);
        assert!(Plan::new(&desired, &desired, true).is_empty());
    }

    #[test]
    fn a_spec_survives_the_put_body_and_the_listing() {
        let spec = specs("[limiters.a]\nconcurrency = 3\nrate = { limit = 10, period_ms = 1000 }\nadaptive = { min = 1, max = 9 }")
            .remove("a")
            .expect("a");
        let body = put_body(&spec);
        let mut shown = body.clone();
        shown["name"] = json!("a");
        let shown: Shown = serde_json::from_value(shown).expect("shown");
        assert_eq!(shown.spec(), spec);
    }
}
