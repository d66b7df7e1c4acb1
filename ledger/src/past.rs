//! Questions about a new event's causal past (the closure of its `prev` and `deps`), answered
//! so that the answer depends on the causal past alone: never on arrival order, acceptance
//! indexes or events outside it. Searches are bounded by steps of the causal past itself.

use std::collections::HashSet;

use meshnode_schemas::{AuthorKey, EventId};

use crate::error::Result;
use crate::fold::Lookup;
use crate::state::{EventRecord, State};

/// Most events one causal-past search may read. Credits named in `deps` (or below a dep in
/// the crediting log) are found without searching; the search is for the others.
pub const PAST_SEARCH_EVENTS_MAX: usize = 100_000;

/// Whether `t` is `x` or an earlier event of the same branch of the same log. Exact: on a
/// log's unforked prefix every later event descends from `t`; otherwise the branch is walked
/// (only forked, contested logs pay for that walk).
pub(crate) fn descends<L: Lookup>(
    state: &State,
    lookup: &L,
    x: &EventRecord,
    t: &EventRecord,
) -> Result<bool> {
    if x.id == t.id {
        return Ok(true);
    }
    if x.author != t.author || x.seq <= t.seq {
        return Ok(false);
    }
    let on_prefix = state
        .authors
        .get(&t.author)
        .is_none_or(|a| a.on_prefix(t.seq));
    if on_prefix {
        return Ok(true);
    }
    let mut cur = x.clone();
    while cur.seq > t.seq {
        let Some(prev) = cur.prev else {
            return Ok(false);
        };
        match lookup.event(&prev)? {
            Some(r) => cur = r,
            None => return Ok(false),
        }
    }
    Ok(cur.id == t.id)
}

/// The causal past of a new event: its `prev` (the author's branch) and its `deps`.
pub(crate) struct Past<'a, L: Lookup> {
    pub(crate) state: &'a State,
    pub(crate) lookup: &'a L,
    pub(crate) prev: Option<&'a EventRecord>,
    pub(crate) deps: &'a [EventRecord],
}

impl<L: Lookup> Past<'_, L> {
    /// The cheap cases: `t` is the prev or a dep, or below one of them in its own log.
    pub(crate) fn contains_fast(&self, t: &EventRecord) -> Result<bool> {
        for x in self.prev.into_iter().chain(self.deps) {
            if descends(self.state, self.lookup, x, t)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether `target` is in this causal past, reading at most [`PAST_SEARCH_EVENTS_MAX`]
    /// events; `None` when the search ran out of steps. The search visits the past
    /// depth-first in a fixed order (prev, then deps as listed) and skips events not deeper
    /// than the target (they cannot have it in their past), so whether it finds the target, and
    /// in how many steps, depends on the causal past alone.
    pub(crate) fn contains(&self, target: &EventId) -> Result<Option<bool>> {
        let Some(t) = self.lookup.event(target)? else {
            return Ok(Some(false));
        };
        if self.contains_fast(&t)? {
            return Ok(Some(true));
        }
        let mut found = false;
        let complete = self.walk(|x| {
            if x.depth <= t.depth {
                return Ok(Visit::Skip);
            }
            if descends(self.state, self.lookup, x, &t)? {
                found = true;
                return Ok(Visit::Stop);
            }
            Ok(Visit::Expand)
        })?;
        Ok(if found {
            Some(true)
        } else if complete {
            Some(false)
        } else {
            None
        })
    }

    /// The credits to `author` among the first [`PAST_SEARCH_EVENTS_MAX`] events a walk of
    /// this causal past reads (the same walk, so the same set, on every node).
    pub(crate) fn credits_to(&self, author: &AuthorKey) -> Result<HashSet<EventId>> {
        let mut out = HashSet::new();
        self.walk(|x| {
            if x.credit.is_some_and(|c| c.to == *author) {
                out.insert(x.id);
            }
            Ok(Visit::Expand)
        })?;
        Ok(out)
    }

    /// Walks the causal past depth-first in a fixed order (prev, then deps as listed), each
    /// event once, reading at most [`PAST_SEARCH_EVENTS_MAX`] events. Returns whether the walk
    /// ended by itself (not by running out of steps).
    fn walk(&self, mut visit: impl FnMut(&EventRecord) -> Result<Visit>) -> Result<bool> {
        let mut stack: Vec<EventRecord> = Vec::new();
        for x in self.deps.iter().rev().chain(self.prev) {
            stack.push(x.clone());
        }
        let mut seen: HashSet<EventId> = stack.iter().map(|x| x.id).collect();
        let mut reads = 0usize;
        while let Some(x) = stack.pop() {
            match visit(&x)? {
                Visit::Stop => return Ok(true),
                Visit::Skip => continue,
                Visit::Expand => {}
            }
            for id in x.deps.iter().rev().chain(&x.prev) {
                if !seen.insert(*id) {
                    continue;
                }
                reads += 1;
                if reads > PAST_SEARCH_EVENTS_MAX {
                    return Ok(false);
                }
                if let Some(r) = self.lookup.event(id)? {
                    stack.push(r);
                }
            }
        }
        Ok(true)
    }
}

/// What a walk does with an event it reached.
enum Visit {
    /// Go on into its past.
    Expand,
    /// Not into its past.
    Skip,
    /// End the walk.
    Stop,
}
