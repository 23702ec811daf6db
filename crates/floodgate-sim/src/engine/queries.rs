//! A query task's life: it starts, issues its query, and handles success or a rejection.

use super::*;

impl Sim<'_> {
    pub(super) fn query_task_start(&mut self, t: usize) {
        self.enter_gate(t);
        match self.strategy {
            Strategy::Unbounded | Strategy::SeedBatches | Strategy::SeedBackoff => {
                self.issue_query(t);
            }
            Strategy::SeedCounter => {
                self.tasks[t].poll_start = self.now;
                self.start_idle(t, self.now);
                self.counter_step(t, Cs::Get1);
            }
            Strategy::Floodgate
            | Strategy::FloodgateAdaptive
            | Strategy::FloodgateGradient
            | Strategy::FloodgateKeyed => self.acquire(t),
        }
    }

    pub(super) fn issue_query(&mut self, t: usize) {
        let Kind::Query(u) = self.tasks[t].kind else {
            return;
        };
        let admitted = self.backend.arrive(self.now);
        self.leave_gate(t);
        if admitted {
            self.count_start(t);
        }
        let task = &mut self.tasks[t];
        task.phase = Phase::Querying;
        task.query_started = self.now;
        let exec = task.exec;
        let took = if admitted {
            // Contention past the knee slows it (loaded.rs); it keeps the pace it started at.
            let slow = loaded::slowdown(&self.cfg.model, self.backend.counted, self.backend.limit);
            (self.wl.duration_us[u as usize] as f64 * slow).round() as Micros
        } else {
            us(self.cfg.model.reject_latency)
        };
        self.schedule(
            self.now + took,
            Ev::Answer {
                task: t,
                exec,
                admitted,
            },
        );
        // A holder whose query outlasts a heartbeat period extends its lease.
        let beat = self.heartbeat();
        if self.tasks[t].token.is_some() && took > beat {
            self.schedule(self.now + beat, Ev::Extend(t, exec));
        }
    }

    pub(super) fn query_ok(&mut self, t: usize) {
        let Kind::Query(u) = self.tasks[t].kind else {
            return;
        };
        let unit = &mut self.units[u as usize];
        let first = !unit.done;
        if first {
            unit.done = true;
            unit.wait = Some(self.tasks[t].query_started - self.tasks[t].created);
            unit.ended = Some(self.now);
        }
        // The worker dies right after the query, before anything gives its slot back.
        let crash = first
            && self.wl.crash[u as usize]
            && matches!(
                self.strategy,
                Strategy::SeedCounter
                    | Strategy::Floodgate
                    | Strategy::FloodgateAdaptive
                    | Strategy::FloodgateGradient
                    | Strategy::FloodgateKeyed
            );
        if crash {
            self.stats.crashed += 1;
        }
        match self.strategy {
            Strategy::Unbounded | Strategy::SeedBatches | Strategy::SeedBackoff => self.finish(t),
            Strategy::SeedCounter => {
                if crash {
                    self.finish(t);
                } else {
                    self.counter_step(t, Cs::RelGet);
                }
            }
            Strategy::Floodgate
            | Strategy::FloodgateAdaptive
            | Strategy::FloodgateGradient
            | Strategy::FloodgateKeyed => {
                self.feedback(t, Feedback::Ok);
                if crash {
                    self.tasks[t].token = None;
                } else {
                    self.release(t);
                }
                self.finish(t);
            }
        }
    }

    pub(super) fn query_rejected(&mut self, t: usize) {
        match self.strategy {
            Strategy::Unbounded | Strategy::SeedBatches => self.fail(t, Loss::Failed),
            Strategy::SeedCounter => {
                // The exception leaves the `try`; `finally` releases, then the task fails.
                self.tasks[t].failing = true;
                self.counter_step(t, Cs::RelGet);
            }
            Strategy::SeedBackoff => {
                let cfg = self.cfg;
                let m = &cfg.model;
                let tries = self.tasks[t].tries;
                if tries + 1 >= m.backoff_tries {
                    self.fail(t, Loss::Failed);
                } else {
                    let base = m.backoff_base.as_secs_f64() * f64::from(1u32 << tries.min(20));
                    let jitter = self.rng.uniform(0.0, m.backoff_jitter.as_secs_f64());
                    let sleep = ((base + jitter) * 1e6).round() as Micros;
                    self.tasks[t].tries = tries + 1;
                    self.start_idle(t, self.now);
                    self.after(t, sleep, Phase::Backoff);
                }
            }
            Strategy::Floodgate
            | Strategy::FloodgateAdaptive
            | Strategy::FloodgateGradient
            | Strategy::FloodgateKeyed => {
                self.feedback(t, Feedback::Throttled);
                self.release(t);
                let cfg = self.cfg;
                let m = &cfg.model;
                let n = self.tasks[t].throttles;
                if n >= m.throttle_max_retries {
                    self.fail(t, Loss::Failed);
                } else {
                    self.tasks[t].throttles = n + 1;
                    let cap = (m.throttle_backoff.as_secs_f64() * 2f64.powi(n.min(62) as i32))
                        .min(m.throttle_backoff_max.as_secs_f64());
                    let countdown = (self.rng.uniform(0.0, cap) * 1e6).round() as Micros;
                    self.requeue(t, countdown);
                }
            }
        }
    }
}
