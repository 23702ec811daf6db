//! The seed's fix as a strategy program: a Redis counter as a semaphore, with its leaks.

use super::*;

impl Sim<'_> {
    pub(super) fn counter_step(&mut self, t: usize, cs: Cs) {
        let now = self.now;
        let cfg = self.cfg;
        let m = &cfg.model;
        let rtt = us(m.cache_rtt);
        let max = i64::from(cfg.limit);
        match cs {
            Cs::Get1 => {
                let current = self.cache.get(now).unwrap_or(0);
                let next = if current >= max {
                    Cs::Returned
                } else {
                    Cs::Get2
                };
                self.after(t, rtt, Phase::Counter(next));
            }
            Cs::Get2 => {
                let truthy = self.cache.get(now).is_some_and(|v| v != 0);
                let next = if truthy { Cs::Incr } else { Cs::Add };
                self.after(t, rtt, Phase::Counter(next));
            }
            Cs::Incr => {
                let next = match self.cache.incr(now, 1) {
                    None => {
                        self.stats.cache_errors += 1;
                        Cs::Raise
                    }
                    Some(v) => {
                        if v > max {
                            self.stats.overshoots += 1;
                        }
                        // Python: `new_value and new_value <= MAX`, so 0 is a failure and
                        // a negative count a success.
                        Cs::Decide(v != 0 && v <= max)
                    }
                };
                self.after(t, rtt, Phase::Counter(next));
            }
            Cs::Add => {
                // `add` returns True, and `True <= 50` holds.
                let stored = self.cache.add(now, 1);
                self.after(t, rtt, Phase::Counter(Cs::Decide(stored)));
            }
            Cs::Decide(true) => {
                self.end_idle(t);
                self.issue_query(t);
            }
            Cs::Decide(false) => {
                let sleep = us(m.counter_try_sleep);
                let task = &mut self.tasks[t];
                if task.iter + 1 < m.counter_tries {
                    task.iter += 1;
                    self.after(t, sleep, Phase::Counter(Cs::Get1));
                } else {
                    self.after(t, sleep, Phase::Counter(Cs::Returned));
                }
            }
            Cs::Returned => {
                let waited = now - self.tasks[t].poll_start;
                if waited > us(m.counter_max_wait) {
                    // "Skip this run rather than failing": the task succeeds, the work is
                    // not done.
                    if let Kind::Query(u) = self.tasks[t].kind {
                        self.units[u as usize].loss = Some(Loss::Skipped);
                    }
                    self.finish(t);
                } else {
                    let poll = us(m.counter_poll);
                    self.tasks[t].iter = 0;
                    self.after(t, poll, Phase::Counter(Cs::Get1));
                }
            }
            Cs::Raise | Cs::RelRaise => {
                self.end_idle(t);
                self.fail(t, Loss::Failed);
            }
            Cs::RelGet => {
                let current = self.cache.get(now).unwrap_or(0);
                let next = if current > 0 {
                    Cs::RelDecr
                } else {
                    Cs::RelDone
                };
                self.after(t, rtt, Phase::Counter(next));
            }
            Cs::RelDecr => {
                let next = match self.cache.incr(now, -1) {
                    None => {
                        self.stats.cache_errors += 1;
                        Cs::RelRaise
                    }
                    Some(_) => Cs::RelDone,
                };
                self.after(t, rtt, Phase::Counter(next));
            }
            Cs::RelDone => {
                if self.tasks[t].failing {
                    self.fail(t, Loss::Failed);
                } else {
                    self.finish(t);
                }
            }
        }
    }
}
