//! Convergence (DESIGN.md §3): the same events, in any order, batching and repetition, give
//! the same accepted set and the same state. A generator writes event sets with forks that
//! grow on both branches, transfers that spend forked credits and chains built on them, key
//! rotations with later events signed by the new key, late prevs and deps, basin deltas from
//! owners, named writers and strangers, and duplicates; each set is folded in many random
//! orders and batch splits, and every fold must give the same digest, forks and contested set.

use std::collections::{BTreeSet, HashMap};

use meshnode_schemas::*;

use crate::audit::MemLookup;
use crate::fold::{Applied, Lookup, Overlay, Rules, State};

/// A small deterministic generator (SplitMix64): the tests need no particular distribution.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

const ISSUER: u8 = 1;

/// A branch of one author's log as the generator knows it.
#[derive(Clone)]
struct Branch {
    seq: u64,
    head: Option<EventId>,
    signer: u8,
}

struct Generator {
    rng: Rng,
    net: BlobHash,
    /// Author seed → its branches.
    logs: HashMap<u8, Vec<Branch>>,
    events: Vec<SignedEvent>,
    /// Credits (mints and transfers) by recipient seed.
    credits: HashMap<u8, Vec<EventId>>,
    /// Basin versions: (basin publish id, version id).
    versions: Vec<(EventId, EventId)>,
    skills: Vec<EventId>,
    next_key: u8,
    /// The generator's own ledger: a rejected event is kept rarely and never built on, so
    /// that most of a set is accepted and grows.
    check: MemLedger,
}

const AUTHORS: [u8; 4] = [2, 3, 4, 5];

impl Generator {
    fn new(seed: u64, net: BlobHash) -> Self {
        Self {
            rng: Rng(seed),
            net,
            logs: HashMap::new(),
            events: Vec::new(),
            credits: HashMap::new(),
            versions: Vec::new(),
            skills: Vec::new(),
            next_key: 100,
            check: MemLedger::new(rules()),
        }
    }

    fn some_deps(&mut self) -> Vec<EventId> {
        let mut deps = BTreeSet::new();
        for _ in 0..self.rng.below(3) {
            if !self.events.is_empty() {
                let i = self.rng.below(self.events.len());
                deps.insert(self.events[i].id);
            }
        }
        deps.into_iter().collect()
    }

    /// Signs the next event of a branch of `author` (a fork when `fork` and the branch has
    /// a head: a second event at the head's seq).
    fn emit(
        &mut self,
        author: u8,
        fork: bool,
        mut deps: Vec<EventId>,
        payload: Payload,
    ) -> Option<EventId> {
        let branches = self.logs.entry(author).or_insert_with(|| {
            vec![Branch {
                seq: 0,
                head: None,
                signer: author,
            }]
        });
        let b = self.rng.below(branches.len());
        let branch = branches[b].clone();
        let (seq, prev, base) = if fork && branch.seq > 0 {
            // Fork: another event at the head's seq, on the head's prev.
            let parent = self
                .events
                .iter()
                .find(|e| Some(e.id) == branch.head)
                .map(|e| e.body.prev)
                .expect("head was generated");
            (branch.seq, parent, true)
        } else {
            (branch.seq + 1, branch.head, false)
        };
        deps.sort();
        deps.dedup();
        let body = EventBody {
            net: self.net,
            author: author_of(&key(author)),
            seq,
            prev,
            deps,
            ts: self.events.len() as i64,
            payload,
        };
        let rotate_to = match &body.payload {
            Payload::KeyRotate(_) => Some(self.next_key - 1),
            _ => None,
        };
        let event = SignedEvent::sign(body, &key(branch.signer)).expect("sign");
        let id = event.id;
        self.check.feed(std::slice::from_ref(&event));
        if self.check.rejected.contains(&id) {
            if self.rng.chance(20) {
                self.events.push(event);
            }
            return None;
        }
        self.events.push(event);
        let next = Branch {
            seq,
            head: Some(id),
            signer: rotate_to.unwrap_or(branch.signer),
        };
        let branches = self.logs.get_mut(&author).expect("log");
        if base {
            branches.push(next);
        } else {
            branches[b] = next;
        }
        Some(id)
    }

    fn step(&mut self) {
        let author = AUTHORS[self.rng.below(AUTHORS.len())];
        let fork = self.rng.chance(8);
        let deps = self.some_deps();
        match self.rng.below(10) {
            0 | 1 => {
                let to = AUTHORS[self.rng.below(AUTHORS.len())];
                let amount = 1 + self.rng.below(100) as u64;
                let fork = self.rng.chance(5);
                let id = self.emit(
                    ISSUER,
                    fork,
                    deps,
                    Payload::TokenMint(TokenMint {
                        to: author_of(&key(to)),
                        amount,
                        reason: String::new(),
                    }),
                );
                if let Some(id) = id {
                    self.credits.entry(to).or_default().push(id);
                }
            }
            2..=4 => {
                let mut deps = deps;
                let mine = self.credits.get(&author).cloned().unwrap_or_default();
                deps.extend(mine.iter().rev().take(3));
                let to = AUTHORS[self.rng.below(AUTHORS.len())];
                let amount = 1 + self.rng.below(40) as u64;
                let id = self.emit(
                    author,
                    fork,
                    deps,
                    Payload::TokenTransfer(TokenTransfer {
                        to: author_of(&key(to)),
                        amount,
                        memo: String::new(),
                    }),
                );
                if let Some(id) = id {
                    self.credits.entry(to).or_default().push(id);
                }
            }
            5 => {
                let writer = AUTHORS[self.rng.below(AUTHORS.len())];
                let id = self.emit(
                    author,
                    fork,
                    deps,
                    Payload::BasinPublish(BasinPublish {
                        basin_id: "b".into(),
                        coordinates: Vector::new(&[0.5, -0.25, 1.0]).expect("vector"),
                        metadata: Default::default(),
                        writers: if writer == author {
                            vec![]
                        } else {
                            vec![author_of(&key(writer))]
                        },
                    }),
                );
                if let Some(id) = id {
                    self.versions.push((id, id));
                }
            }
            6 => {
                if self.versions.is_empty() {
                    return;
                }
                let (basin, parent) = self.versions[self.rng.below(self.versions.len())];
                let mut deps = deps;
                deps.push(parent);
                let v = (self.rng.below(1000) as f32) / 97.0 - 5.0;
                let weight_ppm = 1 + self.rng.below(1_000_000) as u64;
                let id = self.emit(
                    author,
                    fork,
                    deps,
                    Payload::BasinDelta(BasinDelta {
                        basin_id: "b".into(),
                        parent,
                        indices: vec![1],
                        values: Vector::new(&[v]).expect("vector"),
                        weight_ppm,
                    }),
                );
                if let Some(id) = id {
                    self.versions.push((basin, id));
                }
            }
            7 => {
                if self.rng.chance(50) || self.skills.is_empty() {
                    let blob = BlobHash::of(&[self.rng.below(4) as u8]);
                    let id = self.emit(
                        author,
                        fork,
                        deps,
                        Payload::SkillPublish(SkillPublish {
                            skill_id: "s".into(),
                            name: "s".into(),
                            version: "1".into(),
                            description: String::new(),
                            domain: "d".into(),
                            capabilities: vec![],
                            specializations: vec![],
                            embedding: Vector::new(&[1.0]).expect("vector"),
                            blob,
                            size: 1,
                            base_model: String::new(),
                            license: String::new(),
                            price: 0,
                        }),
                    );
                    self.skills.extend(id);
                } else {
                    let skill = self.skills[self.rng.below(self.skills.len())];
                    let mut deps = deps;
                    deps.push(skill);
                    let score = self.rng.below(1001) as u64;
                    let _ = self.emit(
                        author,
                        fork,
                        deps,
                        Payload::SkillEndorse(SkillEndorse {
                            skill,
                            verdict: "valid".into(),
                            score,
                            note: String::new(),
                        }),
                    );
                }
            }
            8 => {
                let subject = AUTHORS[self.rng.below(AUTHORS.len())];
                let payload = if self.rng.chance(50) {
                    Payload::ReputationDelta(ReputationDelta {
                        subject: author_of(&key(subject)),
                        delta: self.rng.below(2001) as i64 - 1000,
                        reason: String::new(),
                        evidence: None,
                    })
                } else if self.rng.chance(50) {
                    Payload::BlobHost(BlobHost {
                        blob: BlobHash::of(&[self.rng.below(4) as u8]),
                        pinned: self.rng.chance(60),
                    })
                } else {
                    Payload::NodeAnnounce(NodeAnnounce {
                        service: format!("svc{}", self.rng.below(3)),
                        endpoints: vec![],
                        capabilities: vec![],
                        basin_signature: Vector::new(&[1.0]).expect("vector"),
                        addr: String::new(),
                    })
                };
                let _ = self.emit(author, fork, deps, payload);
            }
            _ => {
                self.next_key += 1;
                let new_key = author_of(&key(self.next_key - 1));
                let _ = self.emit(
                    author,
                    false,
                    deps,
                    Payload::KeyRotate(KeyRotate { new_key }),
                );
            }
        }
    }
}

/// A ledger in memory: the fold with the pending mechanism of the real one (an event waits
/// for what it misses and applies when that arrives), fed in batches.
struct MemLedger {
    rules: Rules,
    state: State,
    mem: MemLookup,
    waiting: HashMap<EventId, Vec<SignedEvent>>,
    rejected: BTreeSet<EventId>,
}

impl MemLedger {
    fn new(rules: Rules) -> Self {
        Self {
            rules,
            state: State::default(),
            mem: MemLookup::default(),
            waiting: HashMap::new(),
            rejected: BTreeSet::new(),
        }
    }

    fn feed(&mut self, batch: &[SignedEvent]) {
        let mut overlay = Overlay::default();
        for event in batch {
            let mut queue = vec![event.clone()];
            while let Some(e) = queue.pop() {
                let hash = BlobHash::of(&e.envelope);
                match self
                    .state
                    .apply(&self.rules, &self.mem, &mut overlay, &e, hash, None)
                {
                    Ok(Applied::Accepted(record)) => {
                        if let Some(woken) = self.waiting.remove(&record.id) {
                            queue.extend(woken);
                        }
                    }
                    Ok(Applied::Duplicate(_)) => {}
                    Ok(Applied::Waiting(w)) => {
                        for missing in w.missing {
                            self.waiting.entry(missing).or_default().push(e.clone());
                        }
                    }
                    Err(err) => {
                        assert!(err.is_rejection(), "not a rejection: {err}");
                        self.rejected.insert(e.id);
                    }
                }
            }
        }
        self.mem.absorb(overlay);
    }
}

fn rules() -> Rules {
    let genesis = Genesis::new("convergence", author_of(&key(ISSUER)), 1);
    let net = genesis.net().expect("net");
    Rules { genesis, net }
}

/// Folds `events` in a random order (with some duplicated) split into random batches.
fn fold_shuffled(rng: &mut Rng, events: &[SignedEvent]) -> MemLedger {
    let mut order: Vec<SignedEvent> = events.to_vec();
    for _ in 0..events.len() / 10 {
        order.push(events[rng.below(events.len())].clone());
    }
    rng.shuffle(&mut order);
    let mut ledger = MemLedger::new(rules());
    let mut rest = &order[..];
    while !rest.is_empty() {
        let n = 1 + rng.below(rest.len().min(16));
        ledger.feed(&rest[..n]);
        rest = &rest[n..];
    }
    ledger
}

/// What nodes compare: the digest, the fork proofs' ids and the contested set.
type Summary = (
    String,
    Vec<(AuthorKey, u64, [EventId; 2])>,
    BTreeSet<EventId>,
);

fn summary(l: &MemLedger) -> Summary {
    (
        hex::encode(l.state.digest()),
        l.state
            .forks
            .values()
            .map(|p| (p.author, p.seq, p.ids()))
            .collect(),
        l.state.contested.clone(),
    )
}

/// Which parts of two states differ (for failure messages).
fn differences(a: &State, b: &State) -> String {
    let mut out = Vec::new();
    for (key, x) in &a.authors {
        match b.authors.get(key) {
            Some(y)
                if (
                    x.received,
                    x.received_contested,
                    x.sent,
                    x.sent_contested,
                    &x.uncovered,
                ) == (
                    y.received,
                    y.received_contested,
                    y.sent,
                    y.sent_contested,
                    &y.uncovered,
                ) => {}
            Some(y) => out.push(format!("author {key}: {x:?} vs {y:?}")),
            None => out.push(format!("author {key} only on one side")),
        }
    }
    if a.skills != b.skills {
        out.push(format!("skills {:?} vs {:?}", a.skills, b.skills));
    }
    if a.basins != b.basins {
        out.push(format!("basins {:?} vs {:?}", a.basins, b.basins));
    }
    if a.reputation != b.reputation {
        out.push("reputation".into());
    }
    if a.nodes != b.nodes {
        out.push(format!("nodes {:?} vs {:?}", a.nodes, b.nodes));
    }
    if a.hosts != b.hosts {
        out.push(format!("hosts {:?} vs {:?}", a.hosts, b.hosts));
    }
    if (a.n_events, a.supply) != (b.n_events, b.supply) {
        out.push("counts".into());
    }
    out.join("\n")
}

#[test]
fn same_events_in_any_order_give_the_same_state() {
    let rules = rules();
    let mut n_forks = 0;
    let mut n_contested = 0;
    let mut n_accepted = 0;
    for seed in 0..6u64 {
        let mut generator = Generator::new(seed, rules.net);
        for _ in 0..120 {
            generator.step();
        }
        let events = generator.events.clone();
        // The reference: the order they were made in, one event per batch.
        let mut reference = MemLedger::new(rules.clone());
        for e in &events {
            reference.feed(std::slice::from_ref(e));
        }
        let expected = summary(&reference);
        assert!(
            reference.state.invariant_violations().is_empty(),
            "{:?}",
            reference.state.invariant_violations()
        );
        n_forks += reference.state.forks.len();
        n_contested += reference.state.contested.len();
        n_accepted += reference.state.n_events;
        let mut rng = Rng(seed ^ 0xfeed);
        for round in 0..100 {
            let folded = fold_shuffled(&mut rng, &events);
            assert_eq!(
                summary(&folded),
                expected,
                "seed {seed}, order {round}: a different state: {}",
                differences(&folded.state, &reference.state)
            );
            assert_eq!(folded.rejected, reference.rejected, "seed {seed}");
            assert!(folded.state.invariant_violations().is_empty());
            for (key, a) in &folded.state.authors {
                let r = &reference.state.authors[key];
                assert_eq!(
                    (a.balance(), a.received, a.sent, a.frozen_from),
                    (r.balance(), r.received, r.sent, r.frozen_from)
                );
            }
        }
    }
    // The generated sets exercise what they claim to.
    assert!(n_forks >= 3, "only {n_forks} forks");
    assert!(n_contested >= 10, "only {n_contested} contested events");
    assert!(n_accepted >= 300, "only {n_accepted} accepted events");
}

/// The five events of issue #9: a mint M to Mallory, her transfer T to Hank, a second body T'
/// at T's seq, Hank's transfer S that spends T, and Hank's next event. Every order gives the
/// same ledger: S and Hank's next event accepted, S contested, no negative balance.
#[test]
fn the_five_event_fork_case_converges() {
    let rules = rules();
    let (issuer, mallory, hank, vic) = (key(ISSUER), key(2), key(3), key(4));
    let sign = |k: &SigningKey, seq: u64, prev: Option<EventId>, deps: Vec<EventId>, p| {
        SignedEvent::sign(
            EventBody {
                net: rules.net,
                author: author_of(k),
                seq,
                prev,
                deps,
                ts: 0,
                payload: p,
            },
            k,
        )
        .expect("sign")
    };
    let pay = |to: &SigningKey, amount| {
        Payload::TokenTransfer(TokenTransfer {
            to: author_of(to),
            amount,
            memo: String::new(),
        })
    };
    let m = sign(
        &issuer,
        1,
        None,
        vec![],
        Payload::TokenMint(TokenMint {
            to: author_of(&mallory),
            amount: 100,
            reason: String::new(),
        }),
    );
    let t = sign(&mallory, 1, None, vec![m.id], pay(&hank, 100));
    let t2 = sign(&mallory, 1, None, vec![m.id], pay(&vic, 100));
    let s = sign(&hank, 1, None, vec![t.id], pay(&vic, 60));
    let next = sign(&hank, 2, Some(s.id), vec![], pay(&vic, 40));
    let events = [m, t, t2, s.clone(), next.clone()];
    let mut results = BTreeSet::new();
    let mut order: Vec<usize> = (0..5).collect();
    // All 120 orders.
    fn permutations(k: usize, order: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if k == order.len() {
            out.push(order.clone());
            return;
        }
        for i in k..order.len() {
            order.swap(k, i);
            permutations(k + 1, order, out);
            order.swap(k, i);
        }
    }
    let mut all = Vec::new();
    permutations(0, &mut order, &mut all);
    for perm in all {
        let mut ledger = MemLedger::new(rules.clone());
        for i in perm {
            ledger.feed(std::slice::from_ref(&events[i]));
        }
        assert_eq!(ledger.state.n_events, 5, "every event is accepted");
        for id in [s.id, next.id] {
            assert!(ledger.state.contested.contains(&id), "built on a fork");
        }
        assert!(ledger.state.invariant_violations().is_empty());
        let h = &ledger.state.authors[&author_of(&hank)];
        assert_eq!((h.balance(), h.received_contested), (0, 100));
        results.insert(summary(&ledger));
    }
    assert_eq!(results.len(), 1, "all orders agree");
}

/// Cumulative counters pass 2^64 by recirculation without any inflation: the sums are exact,
/// the invariants hold, and every order gives the same state (no build panics or wraps).
#[test]
fn counters_past_two_to_the_64_stay_exact() {
    let rules = rules();
    let (issuer, alice, bob) = (key(ISSUER), key(2), key(3));
    let mut events = Vec::new();
    let mut sign = |k: &SigningKey, seq: u64, prev: Option<EventId>, deps: Vec<EventId>, p| {
        let e = SignedEvent::sign(
            EventBody {
                net: rules.net,
                author: author_of(k),
                seq,
                prev,
                deps,
                ts: 0,
                payload: p,
            },
            k,
        )
        .expect("sign");
        events.push(e.clone());
        e.id
    };
    let pay = |to: &SigningKey| {
        Payload::TokenTransfer(TokenTransfer {
            to: author_of(to),
            amount: u64::MAX,
            memo: String::new(),
        })
    };
    let mut credit = sign(
        &issuer,
        1,
        None,
        vec![],
        Payload::TokenMint(TokenMint {
            to: author_of(&alice),
            amount: u64::MAX,
            reason: String::new(),
        }),
    );
    let (mut a_prev, mut b_prev) = (None, None);
    for round in 1..=3u64 {
        let a = sign(&alice, round, a_prev, vec![credit], pay(&bob));
        a_prev = Some(a);
        let b = sign(&bob, round, b_prev, vec![a], pay(&alice));
        b_prev = Some(b);
        credit = b;
    }
    let mut digests = BTreeSet::new();
    let mut rng = Rng(7);
    for _ in 0..20 {
        let ledger = fold_shuffled(&mut rng, &events);
        assert_eq!(ledger.state.n_events, 7);
        assert!(ledger.state.invariant_violations().is_empty());
        let a = &ledger.state.authors[&author_of(&alice)];
        assert_eq!(a.received, 4 * u128::from(u64::MAX));
        assert_eq!(a.sent, 3 * u128::from(u64::MAX));
        assert_eq!(a.balance(), u128::from(u64::MAX));
        assert_eq!(ledger.state.supply, u128::from(u64::MAX));
        digests.insert(summary(&ledger).0);
    }
    assert_eq!(digests.len(), 1);
}

/// A lookup that counts its reads.
struct Counting<'a> {
    inner: &'a MemLookup,
    reads: std::cell::Cell<usize>,
}

impl Counting<'_> {
    fn count(&self) {
        self.reads.set(self.reads.get() + 1);
    }
}

impl Lookup for Counting<'_> {
    fn event(&self, id: &EventId) -> crate::Result<Option<crate::fold::EventRecord>> {
        self.count();
        self.inner.event(id)
    }
    fn at(&self, author: &AuthorKey, seq: u64) -> crate::Result<Vec<EventId>> {
        self.count();
        self.inner.at(author, seq)
    }
    fn basin_version(&self, id: &EventId) -> crate::Result<Option<crate::fold::BasinVersion>> {
        self.count();
        self.inner.basin_version(id)
    }
    fn envelope(&self, id: &EventId) -> crate::Result<Option<Vec<u8>>> {
        self.count();
        self.inner.envelope(id)
    }
    fn covered_by(&self, credit: &EventId) -> crate::Result<Vec<EventId>> {
        self.count();
        self.inner.covered_by(credit)
    }
}

fn mint(to: u8, amount: u64) -> Payload {
    Payload::TokenMint(TokenMint {
        to: author_of(&key(to)),
        amount,
        reason: String::new(),
    })
}

fn transfer(to: u8, amount: u64) -> Payload {
    Payload::TokenTransfer(TokenTransfer {
        to: author_of(&key(to)),
        amount,
        memo: String::new(),
    })
}

/// Dust sent to an account does not slow its owner: a transfer reads the credits its prev
/// and deps reach (through the per-sender index, kept in step as dust arrives), not every
/// unreferenced credit of the account. Counted in reads, not time.
#[test]
fn dust_sent_to_an_account_does_not_slow_its_owners_transfers() {
    const DUST: usize = 3000;
    let rules = rules();
    let (owner, duster, payee) = (2u8, 3u8, 4u8);
    let mut g = Generator::new(11, rules.net);
    let first = g
        .emit(ISSUER, false, vec![], mint(owner, 1000))
        .expect("mint");
    let funding = g
        .emit(ISSUER, false, vec![], mint(duster, 10_000))
        .expect("mint");
    // The owner's first transfer builds its index (no dust yet).
    g.emit(owner, false, vec![first], transfer(payee, 100))
        .expect("first transfer");
    for i in 0..DUST {
        let deps = if i == 0 { vec![funding] } else { vec![] };
        g.emit(duster, false, deps, transfer(owner, 1))
            .expect("dust");
    }
    let second = g
        .emit(ISSUER, false, vec![], mint(owner, 1000))
        .expect("mint");
    let owner_key = author_of(&key(owner));
    assert_eq!(
        g.check.state.authors[&owner_key].uncovered.len(),
        DUST + 1,
        "every dust credit and the second mint are unreferenced"
    );
    // 900 left on the branch; 1500 needs the second mint, which its deps name.
    let head = g
        .events
        .iter()
        .rev()
        .find(|e| e.body.author == owner_key)
        .expect("head");
    let body = EventBody {
        net: rules.net,
        author: owner_key,
        seq: 2,
        prev: Some(head.id),
        deps: vec![second],
        ts: 0,
        payload: transfer(payee, 1500),
    };
    let event = SignedEvent::sign(body, &key(owner)).expect("sign");
    let counting = Counting {
        inner: &g.check.mem,
        reads: std::cell::Cell::new(0),
    };
    let mut overlay = Overlay::default();
    let hash = BlobHash::of(&event.envelope);
    let applied = g
        .check
        .state
        .apply(&rules, &counting, &mut overlay, &event, hash, None)
        .expect("apply");
    let Applied::Accepted(record) = applied else {
        panic!("the transfer was not accepted: {applied:?}");
    };
    assert_eq!(record.covers, vec![(second, 1000)]);
    // The index built before the dust kept in step with every credit that arrived since.
    let account = &g.check.state.authors[&owner_key];
    let index = account
        .credit_index
        .get()
        .expect("built by the first transfer");
    let indexed: BTreeSet<EventId> = index.ids().copied().collect();
    assert_eq!(
        indexed, account.uncovered,
        "the index and the unreferenced credits differ"
    );
    let reads = counting.reads.get();
    assert!(
        reads < 50,
        "a transfer read {reads} records with {DUST} dust credits on the account"
    );
}
