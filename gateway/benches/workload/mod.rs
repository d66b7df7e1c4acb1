//! The signed workload the ledger and sync benchmarks feed a node: an issuer grants every
//! author, then the authors append transfers and host records round-robin, as many agents
//! would submit them.

use meshnode_schemas::*;
use rayon::prelude::*;

/// The key of author `i` (deterministic).
pub(crate) fn key(i: u64) -> SigningKey {
    SigningKey::from_bytes(blake3::hash(&i.to_le_bytes()).as_bytes())
}

/// `n` events: the issuer grants each of `authors`; each author's first event names its
/// grant and carries `first(author)` (a transfer when `None`), then transfers and host
/// records alternate. Logs are interleaved round-robin.
pub(crate) fn workload(
    n: usize,
    net: BlobHash,
    issuer: &SigningKey,
    authors: usize,
    first: Option<fn(usize) -> Payload>,
) -> Vec<SignedEvent> {
    let users: Vec<SigningKey> = (0..authors as u64).map(key).collect();
    let mut out = Vec::with_capacity(n);
    let mut grants = Vec::with_capacity(authors);
    let mut prev = None;
    for (i, user) in users.iter().enumerate() {
        let body = EventBody {
            net,
            author: author_of(issuer),
            seq: i as u64 + 1,
            prev,
            deps: vec![],
            ts: i as i64,
            payload: Payload::TokenMint(TokenMint {
                to: author_of(user),
                amount: 1_000_000_000,
                reason: String::new(),
            }),
        };
        let e = SignedEvent::sign(body, issuer).expect("sign");
        prev = Some(e.id);
        grants.push(e.id);
        out.push(e);
    }
    let per_user = n.saturating_sub(authors).div_ceil(authors);
    // Each author's log is independent of the others: sign logs in parallel.
    let logs: Vec<Vec<SignedEvent>> = users
        .par_iter()
        .enumerate()
        .map(|(u, user)| {
            let mut log = Vec::with_capacity(per_user);
            let mut prev = None;
            for s in 0..per_user {
                let payload = match (s, first) {
                    (0, Some(first)) => first(u),
                    (s, _) if s % 2 == 0 => Payload::TokenTransfer(TokenTransfer {
                        to: author_of(&users[(u + s + 1) % users.len()]),
                        amount: 1,
                        memo: String::new(),
                    }),
                    (s, _) => Payload::BlobHost(BlobHost {
                        blob: BlobHash::of(&(s as u64).to_le_bytes()),
                        pinned: true,
                    }),
                };
                let body = EventBody {
                    net,
                    author: author_of(user),
                    seq: s as u64 + 1,
                    prev,
                    deps: if s == 0 { vec![grants[u]] } else { vec![] },
                    ts: s as i64,
                    payload,
                };
                let e = SignedEvent::sign(body, user).expect("sign");
                prev = Some(e.id);
                log.push(e);
            }
            log
        })
        .collect();
    for s in 0..per_user {
        for log in &logs {
            if out.len() < n
                && let Some(e) = log.get(s)
            {
                out.push(e.clone());
            }
        }
    }
    out
}
