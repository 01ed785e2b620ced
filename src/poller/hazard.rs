//! What the tenant's history says about when an action changes next: for each action type
//! and status, the rate at which actions leave that status as a function of how long they
//! have been in it (the hazard), learned from the recorded transitions and from the actions
//! still waiting (a 3-day live response queue counts as "not yet" for three days, not as
//! missing data). A sweep's census of the active actions then gives the changes expected
//! over the coming seconds, and the sweep cadence and the calls between sweeps are chosen
//! from that rather than from the average of the last sweeps.
//!
//! Pure: no clock, no I/O. Durations are seconds as `f64`.

use std::collections::HashMap;

/// Dwell buckets: bucket 0 is under one second, bucket `b >= 1` is
/// `[2^((b-1)/4), 2^(b/4))` seconds, the last one open-ended (about 18 days on).
pub(super) const BUCKETS: usize = 86;

/// Events a curve needs before it speaks for its (type, status); below, the status's curve
/// over all types does.
const MIN_EVENTS: f64 = 20.0;

/// Actions a bucket's neighbourhood must have seen through (its exposure over its width)
/// before its rate is trusted.
const MIN_THROUGH: f64 = 5.0;

fn width(b: usize) -> f64 {
    (upper(b).min(1e7) - lower(b)).max(1.0)
}

pub(super) fn bucket(dwell: f64) -> usize {
    if dwell.is_nan() || dwell < 1.0 {
        return 0;
    }
    let b = (4.0 * dwell.log2()).floor() as i64 + 1;
    b.clamp(1, BUCKETS as i64 - 1) as usize
}

fn lower(b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        2f64.powf((b as f64 - 1.0) / 4.0)
    }
}

fn upper(b: usize) -> f64 {
    if b + 1 >= BUCKETS {
        f64::INFINITY
    } else {
        2f64.powf(b as f64 / 4.0)
    }
}

/// Leaving times of one (type, status): per dwell bucket, how many left it there and how
/// long actions spent in it all told (those still waiting included).
#[derive(Debug, Clone)]
pub(super) struct Curve {
    events: [f64; BUCKETS],
    exposure: [f64; BUCKETS],
}

impl Default for Curve {
    fn default() -> Self {
        Self {
            events: [0.0; BUCKETS],
            exposure: [0.0; BUCKETS],
        }
    }
}

impl Curve {
    /// `count` actions that spent `dwell` in the status, and left it then (`left`) or are
    /// still in it.
    pub(super) fn add(&mut self, dwell: f64, left: bool, count: f64) {
        if !dwell.is_finite() || dwell < 0.0 || count <= 0.0 {
            return;
        }
        let end = bucket(dwell);
        for b in 0..end {
            self.exposure[b] += count * (upper(b) - lower(b));
        }
        self.exposure[end] += count * (dwell - lower(end)).max(0.0);
        if left {
            self.events[end] += count;
        }
    }

    fn add_curve(&mut self, other: &Curve) {
        for b in 0..BUCKETS {
            self.events[b] += other.events[b];
            self.exposure[b] += other.exposure[b];
        }
    }

    fn total_events(&self) -> f64 {
        self.events.iter().sum()
    }

    /// Leaving rate per action per second at each bucket: events over exposure in the
    /// nearest buckets holding at least a few events, or None where too few actions have
    /// been through to say.
    fn rates(&self) -> [Option<f64>; BUCKETS] {
        let mut out = [None; BUCKETS];
        for (b, slot) in out.iter_mut().enumerate() {
            let (mut events, mut exposure, mut span) = (self.events[b], self.exposure[b], width(b));
            let mut reach = 0;
            while events < 3.0 && reach < 6 {
                reach += 1;
                for n in [
                    b.checked_sub(reach),
                    Some(b + reach).filter(|n| *n < BUCKETS),
                ]
                .into_iter()
                .flatten()
                {
                    events += self.events[n];
                    exposure += self.exposure[n];
                    span += width(n);
                }
            }
            if exposure >= MIN_THROUGH * span {
                // Half an event of prior: a bucket where nobody left yet still says "rarely",
                // not "never".
                *slot = Some((events + 0.5) / exposure);
            }
        }
        out
    }
}

/// Key of a curve: MDE's action type and the status being left.
pub(super) type Group = (Box<str>, Box<str>);

/// The learned rates, ready to be looked up.
#[derive(Debug, Default, Clone)]
pub(super) struct Hazards {
    by_group: HashMap<Group, [Option<f64>; BUCKETS]>,
    by_status: HashMap<Box<str>, [Option<f64>; BUCKETS]>,
}

impl Hazards {
    /// Builds the rates from the finished dwells (`history`) and the census's waiting ones.
    pub(super) fn learn(history: &HashMap<Group, Curve>, census: &Census) -> Self {
        let mut groups = history.clone();
        for (group, counts) in &census.cells {
            let curve = groups.entry(group.clone()).or_default();
            for (b, &n) in counts.iter().enumerate() {
                if n > 0 {
                    curve.add(mid(b), false, f64::from(n));
                }
            }
        }
        let mut pooled: HashMap<Box<str>, Curve> = HashMap::new();
        for ((_, status), curve) in &groups {
            pooled.entry(status.clone()).or_default().add_curve(curve);
        }
        Self {
            by_group: groups
                .iter()
                .filter(|(_, c)| c.total_events() >= MIN_EVENTS)
                .map(|(g, c)| (g.clone(), c.rates()))
                .collect(),
            by_status: pooled
                .iter()
                .filter(|(_, c)| c.total_events() >= MIN_EVENTS)
                .map(|(s, c)| (s.clone(), c.rates()))
                .collect(),
        }
    }

    /// Leaving rate (per second) of one action of `group` that has been in its status for
    /// `dwell` seconds; None when the history cannot say.
    #[cfg(test)]
    fn rate(&self, group: &Group, dwell: f64) -> Option<f64> {
        self.rates_of(group).at(dwell)
    }

    /// The rates that speak for `group`, looked up once for many dwells.
    fn rates_of(&self, group: &Group) -> Rates<'_> {
        Rates {
            own: self.by_group.get(group),
            status: self.by_status.get(&group.1),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.by_group.is_empty() && self.by_status.is_empty()
    }

    /// The share of the census's actions whose rate the history can say (1 for an empty
    /// census).
    pub(super) fn coverage(&self, census: &Census) -> f64 {
        let (mut known, mut all) = (0u64, 0u64);
        for (g, counts) in &census.cells {
            let rates = self.rates_of(g);
            for (b, &n) in counts.iter().enumerate() {
                all += u64::from(n);
                if rates.at(mid(b)).is_some() {
                    known += u64::from(n);
                }
            }
        }
        if all == 0 {
            1.0
        } else {
            known as f64 / all as f64
        }
    }
}

/// A group's own rates and its status's, the latter where the former cannot say.
#[derive(Clone, Copy)]
struct Rates<'h> {
    own: Option<&'h [Option<f64>; BUCKETS]>,
    status: Option<&'h [Option<f64>; BUCKETS]>,
}

impl Rates<'_> {
    fn at(&self, dwell: f64) -> Option<f64> {
        let b = bucket(dwell);
        self.own
            .and_then(|r| r[b])
            .or_else(|| self.status.and_then(|r| r[b]))
    }
}

/// A representative dwell for bucket `b` (its geometric middle).
fn mid(b: usize) -> f64 {
    if b == 0 {
        0.5
    } else if b + 1 >= BUCKETS {
        lower(b)
    } else {
        (lower(b) * upper(b)).sqrt()
    }
}

/// The active actions a sweep listed, counted by (type, status) and time in that status,
/// as of the sweep's start.
#[derive(Debug, Default, Clone)]
pub(super) struct Census {
    pub(super) cells: HashMap<Group, [u32; BUCKETS]>,
}

impl Census {
    pub(super) fn count(&mut self, kind: &str, status: &str, dwell: f64) {
        let b = bucket(dwell.max(0.0));
        // Lookup by borrowed strings first: a sweep counts up to 100,000 actions into a
        // dozen groups, an allocation for each would be most of the work.
        if let Some((_, cells)) = self
            .cells
            .iter_mut()
            .find(|((k, s), _)| &**k == kind && &**s == status)
        {
            cells[b] = cells[b].saturating_add(1);
            return;
        }
        let mut cells = [0u32; BUCKETS];
        cells[b] = 1;
        self.cells.insert((kind.into(), status.into()), cells);
    }

    pub(super) fn total(&self) -> u64 {
        self.cells
            .values()
            .flat_map(|c| c.iter())
            .map(|&n| u64::from(n))
            .sum()
    }
}

/// What the next sweep is weighed against.
#[derive(Debug, Clone, Copy)]
pub(super) struct Debt {
    /// Actions enqueued since the census and never seen: each is an unseen change already.
    pub(super) arrivals: f64,
    /// Their mean arrival, in seconds after the census.
    pub(super) arrivals_at: f64,
    /// Per-action rate for census actions the history cannot speak for (the rate the last
    /// sweeps saw, spread over the actions).
    pub(super) fallback_rate: f64,
}

/// Seconds after the census at which the lag owed to unseen changes reaches `price`
/// (`cost x lag_per_call`): the expected changes of the census's actions at the learned
/// rates, plus the arrivals. With a constant rate `r` the owed lag after `T` is `r T^2 / 2`,
/// so this is the square-root rule `T = sqrt(2 x price / r)` of `sweep::cadence`; with rates
/// that rise (pending actions nearing their usual start) or fall (a queue of days) it puts
/// the sweeps where the changes will be. `longest` when the debt never gets there.
pub(super) fn time_to_owe(
    hazards: &Hazards,
    census: &Census,
    debt: Debt,
    price: f64,
    longest: f64,
) -> f64 {
    if longest.is_nan() || longest <= 0.0 {
        return 0.0;
    }
    const STEPS: usize = 400;
    let step = longest / STEPS as f64;
    // Per occupied cell: its count, its dwell, its group.
    let cells: Vec<(f64, f64, Rates)> = census
        .cells
        .iter()
        .flat_map(|(g, counts)| {
            let rates = hazards.rates_of(g);
            counts
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(move |(b, n)| (f64::from(*n), mid(b), rates))
        })
        .collect();
    let (mut unseen, mut owed) = (0.0, 0.0);
    for i in 0..STEPS {
        let s = (i as f64 + 0.5) * step;
        let rate: f64 = cells
            .iter()
            .map(|(n, dwell, r)| n * r.at(dwell + s).unwrap_or(debt.fallback_rate))
            .sum();
        unseen += rate * step;
        owed += unseen * step;
        let t = (i + 1) as f64 * step;
        if owed + debt.arrivals * (t - debt.arrivals_at).max(0.0) >= price {
            return t;
        }
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn group(kind: &str, status: &str) -> Group {
        (kind.into(), status.into())
    }

    #[test]
    fn buckets_are_quarter_octaves() {
        assert_eq!(bucket(0.0), 0);
        assert_eq!(bucket(0.99), 0);
        assert_eq!(bucket(1.0), 1);
        assert_eq!(bucket(2.0), 5);
        assert_eq!(bucket(f64::NAN), 0);
        assert_eq!(bucket(1e30), BUCKETS - 1);
        for b in 1..BUCKETS - 1 {
            assert_eq!(bucket(mid(b)), b, "bucket {b}");
        }
    }

    /// Actions that all leave after 100 s: the rate is near zero before, high at 100 s.
    #[test]
    fn a_fixed_dwell_is_learned_as_a_late_rise() {
        let mut history = HashMap::new();
        let g = group("RunAntiVirusScan", "Pending");
        history
            .entry(g.clone())
            .or_insert_with(Curve::default)
            .add(100.0, true, 200.0);
        let h = Hazards::learn(&history, &Census::default());
        let early = h.rate(&g, 10.0).expect("200 actions went through 10 s");
        let due = h.rate(&g, 100.0).expect("and through 100 s");
        assert!(early * 100.0 < due, "early {early}, at 100 s {due}");
        // Nobody was seen past 100 s: no say about 1,000 s.
        assert_eq!(h.rate(&g, 1_000.0), None);
    }

    /// Actions still waiting count as exposure: a queue where most wait for days has a low
    /// rate early on, not the rate of the few that finished quickly.
    #[test]
    fn waiting_actions_lower_the_rate() {
        let g = group("LiveResponse", "Pending");
        let mut history = HashMap::new();
        history
            .entry(g.clone())
            .or_insert_with(Curve::default)
            .add(60.0, true, 30.0);
        let alone = Hazards::learn(&history, &Census::default());
        let mut census = Census::default();
        for _ in 0..3_000 {
            census.count("LiveResponse", "Pending", 86_400.0);
        }
        let with_waiting = Hazards::learn(&history, &census);
        let (a, w) = (
            alone.rate(&g, 60.0).unwrap(),
            with_waiting.rate(&g, 60.0).unwrap(),
        );
        assert!(w < a / 50.0, "alone {a}, with 3,000 waiting {w}");
    }

    #[test]
    fn few_events_of_a_type_borrow_the_status_curve() {
        let mut history = HashMap::new();
        history
            .entry(group("Isolate", "Pending"))
            .or_insert_with(Curve::default)
            .add(30.0, true, 100.0);
        history
            .entry(group("Unisolate", "Pending"))
            .or_insert_with(Curve::default)
            .add(30.0, true, 2.0);
        let h = Hazards::learn(&history, &Census::default());
        let rare = h.rate(&group("Unisolate", "Pending"), 30.0).unwrap();
        let pooled = h.rate(&group("Isolate", "Pending"), 30.0).unwrap();
        assert!(rare > 0.0 && (rare / pooled - 1.0).abs() < 0.1);
        assert!(h.rate(&group("Isolate", "InProgress"), 30.0).is_none());
    }

    #[test]
    fn constant_rate_gives_the_square_root_rule() {
        // Exponential dwells with mean 1,000 s: rate 0.001 at every age.
        let g = group("Isolate", "InProgress");
        let mut curve = Curve::default();
        let mut rng = fastrand::Rng::with_seed(1);
        for _ in 0..200_000 {
            curve.add(-1_000.0 * (1.0 - rng.f64()).ln(), true, 1.0);
        }
        let history = HashMap::from([(g.clone(), curve)]);
        let mut census = Census::default();
        for _ in 0..1_000 {
            census.count("Isolate", "InProgress", 200.0);
        }
        let h = Hazards::learn(&history, &census);
        let none = Debt {
            arrivals: 0.0,
            arrivals_at: 0.0,
            fallback_rate: 0.0,
        };
        // 1,000 actions at 0.001/s: one change a second; price 900: sqrt(1800) = 42 s.
        let t = time_to_owe(&h, &census, none, 900.0, 600.0);
        assert!((t - 42.4).abs() < 4.0, "{t}");
        // Nothing to expect: the longest interval.
        assert_eq!(
            time_to_owe(&h, &Census::default(), none, 900.0, 600.0),
            600.0
        );
        // 30 unseen arrivals, on average 20 s after the census: 30 x (T - 20) = 900.
        let arrived = Debt {
            arrivals: 30.0,
            arrivals_at: 20.0,
            ..none
        };
        let t = time_to_owe(&h, &Census::default(), arrived, 900.0, 600.0);
        assert!((t - 50.0).abs() < 2.0, "{t}");
        // And with the census's changes on top, sooner.
        assert!(time_to_owe(&h, &census, arrived, 900.0, 600.0) < t);
    }

    proptest! {
        #[test]
        fn rates_and_chances_stay_in_range(
            dwells in proptest::collection::vec((0.0f64..1e7, any::<bool>()), 0..300),
            at in 0.0f64..1e8,
            since in 0.0f64..1e6,
        ) {
            let g = group("Isolate", "Pending");
            let mut curve = Curve::default();
            for (d, left) in &dwells {
                curve.add(*d, *left, 1.0);
            }
            let history = HashMap::from([(g.clone(), curve)]);
            let mut census = Census::default();
            census.count("Isolate", "Pending", at);
            let h = Hazards::learn(&history, &census);
            if let Some(r) = h.rate(&g, at) {
                prop_assert!(r.is_finite() && r > 0.0);
            }
            let debt = Debt { arrivals: 1.0, arrivals_at: since, fallback_rate: 1e-3 };
            let t = time_to_owe(&h, &census, debt, 900.0, 120.0);
            prop_assert!((0.0..=120.0).contains(&t));
        }
    }
}
