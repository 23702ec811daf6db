//! Randomized-schedule tests (shuttle) of the embedded store's wake-up and cancel path.
//!
//! Built only with the crate feature `shuttle`, which swaps the store's mutex for shuttle's so
//! the scheduler can interleave threads at every lock. Each scenario runs a standalone limiter
//! (no timer task, no tokio runtime) on a fake clock, with acquire futures driven on shuttle
//! threads, and checks that no permit leaks, that queued waiters still get their permit when
//! the waiter ahead of them gives up, and that an independent witness never sees more holders
//! than the limit.
//!
//! Run with `cargo test -p floodgate --features shuttle --test shuttle_schedules`.

#![allow(clippy::unwrap_used)]

mod harness;
mod scenarios;

use harness::{explore, Path};
use scenarios::{
    cancelled_head_unblocks_smaller_request_behind_it, grant_races_cancel_of_head_waiter,
    holder_releases_while_one_waiter_cancels, lease_expiry_grant_races_cancel,
    timeout_grant_and_cancel_race,
};

use Path::{Cancelled, GrantedUnawares, NeverQueued, SawGrant, TimedOut};

#[test]
fn random_holder_releases_while_one_waiter_cancels() {
    let all = [SawGrant, GrantedUnawares, Cancelled, NeverQueued];
    explore(holder_releases_while_one_waiter_cancels, false, &all);
}

#[test]
fn pct_holder_releases_while_one_waiter_cancels() {
    explore(
        holder_releases_while_one_waiter_cancels,
        true,
        &[SawGrant, GrantedUnawares, Cancelled, NeverQueued],
    );
}

#[test]
fn random_grant_races_cancel_of_head_waiter() {
    let all = [SawGrant, GrantedUnawares, Cancelled];
    explore(grant_races_cancel_of_head_waiter, false, &all);
}

#[test]
fn pct_grant_races_cancel_of_head_waiter() {
    explore(
        grant_races_cancel_of_head_waiter,
        true,
        &[SawGrant, GrantedUnawares, Cancelled],
    );
}

#[test]
fn random_cancelled_head_unblocks_smaller_request_behind_it() {
    let all = [SawGrant, GrantedUnawares, Cancelled];
    explore(
        cancelled_head_unblocks_smaller_request_behind_it,
        false,
        &all,
    );
}

#[test]
fn pct_cancelled_head_unblocks_smaller_request_behind_it() {
    explore(
        cancelled_head_unblocks_smaller_request_behind_it,
        true,
        &[SawGrant, GrantedUnawares, Cancelled],
    );
}

#[test]
fn random_timeout_grant_and_cancel_race() {
    let all = [SawGrant, GrantedUnawares, Cancelled, TimedOut];
    explore(timeout_grant_and_cancel_race, false, &all);
}

#[test]
fn pct_timeout_grant_and_cancel_race() {
    explore(
        timeout_grant_and_cancel_race,
        true,
        &[SawGrant, GrantedUnawares, Cancelled, TimedOut],
    );
}

#[test]
fn random_lease_expiry_grant_races_cancel() {
    let all = [SawGrant, GrantedUnawares, Cancelled];
    explore(lease_expiry_grant_races_cancel, false, &all);
}

#[test]
fn pct_lease_expiry_grant_races_cancel() {
    explore(
        lease_expiry_grant_races_cancel,
        true,
        &[SawGrant, GrantedUnawares, Cancelled],
    );
}
