//! A change chunk's header and columns, walked before automerge parses the change (H7 in
//! notes/sync.md, verified in automerge 0.12's source): automerge takes the number of
//! operations from the run lengths of the action column and iterates every one of them
//! (`verify_ops`), so 79 bytes declaring a run of 2^40 spin a thread for hours; a
//! predecessor count of 2^40 is iterated until its columns run out; and an actor index or
//! counter of 2^32 or more panics (`OpId::new` unwraps a `u32`). Here each column's runs are summed
//! without being expanded, and every column must hold at most `ops_max` values whose actors
//! and counters fit automerge's types.
//!
//! Layout (automerge's `storage/change.rs` and `columnar/encoding`): deps (count, 32 bytes
//! each), actor, seq, start op, time, message, other actors; column metadata (count, then
//! (spec, length) pairs, specs ascending); the columns' data back to back; extra bytes. A
//! spec is `id << 4 | deflate << 3 | type`.

use crate::amcheck::Invalid;

/// Column types (the low 3 bits of a spec).
const GROUP: u32 = 0;
const ACTOR: u32 = 1;
const ULEB: u32 = 2;
const DELTA: u32 = 3;
const BOOLEAN: u32 = 4;
const STRING: u32 = 5;
const VALUE_META: u32 = 6;
const VALUE_RAW: u32 = 7;
const DEFLATE: u32 = 8;
/// Most columns a change may declare (automerge writes 10 at most).
const COLUMNS_MAX: u64 = 32;
/// Most other actors a change may name.
const OTHER_ACTORS_MAX: u64 = 16;
/// Longest actor id.
const ACTOR_BYTES_MAX: u64 = 64;
/// Counters and actor indexes become `u32` in automerge (`OpId::new` unwraps).
const U32_END: i128 = 1 << 32;

fn bad(why: impl Into<String>) -> Invalid {
    Invalid(why.into())
}

/// What the walk learnt of a change.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Walked {
    /// Other actors the change names.
    pub(crate) other_actors: u64,
    /// Operations (values of the action column).
    pub(crate) ops: u64,
}

/// Walks the data of a change chunk (after its type and length). Refuses a change whose
/// header does not parse, whose columns are deflated, out of order or past the data, or
/// any of whose columns holds more than `ops_max` values or an actor index or counter
/// outside `0..2^32`.
pub(crate) fn walk(data: &[u8], ops_max: u64) -> Result<Walked, Invalid> {
    let mut r = Reader(data);
    let deps = r.uleb()?;
    r.skip(deps.checked_mul(32).ok_or_else(|| bad("too many deps"))?)?;
    let actor_len = r.uleb()?;
    if actor_len > ACTOR_BYTES_MAX {
        return Err(bad(format!("an actor id of {actor_len} bytes")));
    }
    r.skip(actor_len)?;
    r.uleb()?; // seq
    let start_op = r.uleb()?;
    if start_op == 0 || i128::from(start_op) + i128::from(ops_max) >= U32_END {
        return Err(bad(format!("a change starting at op {start_op}")));
    }
    r.sleb()?; // time
    let message_len = r.uleb()?;
    r.skip(message_len)?;
    let other_actors = r.uleb()?;
    if other_actors > OTHER_ACTORS_MAX {
        return Err(bad(format!("{other_actors} other actors in a change")));
    }
    for _ in 0..other_actors {
        let len = r.uleb()?;
        r.skip(len)?;
    }
    let columns = r.uleb()?;
    if columns > COLUMNS_MAX {
        return Err(bad(format!("{columns} columns in a change")));
    }
    let mut specs = Vec::with_capacity(columns as usize);
    for _ in 0..columns {
        let spec = u32::try_from(r.uleb()?).map_err(|_| bad("a column spec past u32"))?;
        if !SPECS.contains(&spec) {
            return Err(bad(format!("column {spec:#x} (not one automerge writes)")));
        }
        let len = r.uleb()?;
        if specs.last().is_some_and(|&(last, _)| last >= spec) {
            return Err(bad("change columns out of order"));
        }
        specs.push((spec, len));
    }
    let actors = 1 + other_actors;
    let mut ops = 0;
    for (spec, len) in specs {
        let data = r.take(len)?;
        let values = column(spec, data, actors, ops_max)
            .map_err(|e| bad(format!("column {spec:#x}: {}", e.0)))?;
        if spec == ACTION_SPEC {
            ops = values;
        }
    }
    Ok(Walked { other_actors, ops })
}

/// The columns automerge 0.12 writes in a change, and so the only ones accepted: object
/// (actor, counter), key (actor, counter, string), insert, action, value (metadata, raw),
/// predecessors (group, actor, counter), expand, mark name. Automerge would also take other
/// encodings of some (an integer column as the predecessors' actors, whose index it then
/// unwraps), and ignores unknown ones.
const SPECS: [u32; 14] = [
    0x01, 0x02, 0x11, 0x13, 0x15, 0x34, 0x42, 0x56, 0x57, 0x70, 0x71, 0x73, 0x94, 0xa5,
];

/// The action column's spec (id 4, uLEB).
const ACTION_SPEC: u32 = 4 << 4 | ULEB;

/// How many values a column holds, at most `max`, its values checked as above.
fn column(spec: u32, data: &[u8], actors: u64, max: u64) -> Result<u64, Invalid> {
    if spec & DEFLATE != 0 {
        return Err(bad("deflated columns are not accepted in a change"));
    }
    let mut r = Reader(data);
    let mut values = Count { n: 0, max };
    match spec & 7 {
        VALUE_RAW => return Ok(0),
        BOOLEAN => {
            while !r.0.is_empty() {
                values.add(r.uleb()?)?;
            }
        }
        DELTA => {
            let mut at: i128 = 0;
            rle(&mut r, &mut values, |r, copies| {
                let delta = i128::from(r.sleb()?);
                at += delta * i128::from(copies);
                // Runs are monotone: checking each run's end checks every value in it.
                if !(0..U32_END).contains(&at) {
                    return Err(bad(format!("a counter at {at}")));
                }
                Ok(())
            })?;
        }
        STRING => rle(&mut r, &mut values, |r, _| {
            let len = r.uleb()?;
            r.skip(len)
        })?,
        ACTOR => rle(&mut r, &mut values, |r, _| {
            let index = r.uleb()?;
            if index >= actors {
                return Err(bad(format!("actor index {index} of {actors} actors")));
            }
            Ok(())
        })?,
        // Counters (the object's), actions, group sizes and value lengths: all far below
        // 2^32 in a change of at most a few MiB.
        GROUP | ULEB | VALUE_META => rle(&mut r, &mut values, |r, _| {
            let v = r.uleb()?;
            if i128::from(v) >= U32_END {
                return Err(bad(format!("a value of {v} (counters are u32)")));
            }
            Ok(())
        })?,
        _ => unreachable!("3 bits"),
    }
    Ok(values.n)
}

/// Walks run-length encoded data: a signed count, then one value repeated `count` times
/// (`count > 0`), `-count` literal values (`count < 0`), or a null run of an unsigned
/// count (`0`). `value` reads one value and is told how many times it stands.
fn rle(
    r: &mut Reader<'_>,
    values: &mut Count,
    mut value: impl FnMut(&mut Reader<'_>, u64) -> Result<(), Invalid>,
) -> Result<(), Invalid> {
    while !r.0.is_empty() {
        let count = r.sleb()?;
        if count > 0 {
            values.add(count as u64)?;
            value(r, count as u64)?;
        } else if count < 0 {
            let literal = count
                .checked_neg()
                .ok_or_else(|| bad("a run of i64::MIN"))? as u64;
            values.add(literal)?;
            for _ in 0..literal {
                value(r, 1)?;
            }
        } else {
            values.add(r.uleb()?)?;
        }
    }
    Ok(())
}

/// Values counted in a column, refused past `max`.
struct Count {
    n: u64,
    max: u64,
}

impl Count {
    fn add(&mut self, more: u64) -> Result<(), Invalid> {
        self.n = self.n.saturating_add(more);
        if self.n > self.max {
            return Err(bad(format!("more than {} values", self.max)));
        }
        Ok(())
    }
}

/// A cursor over bytes, with automerge's LEB128 numbers.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], Invalid> {
        let n = usize::try_from(n).map_err(|_| bad("a length past the data"))?;
        if n > self.0.len() {
            return Err(bad("a length past the data"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn skip(&mut self, n: u64) -> Result<(), Invalid> {
        self.take(n).map(drop)
    }

    fn byte(&mut self) -> Result<u8, Invalid> {
        let (&b, rest) = self.0.split_first().ok_or_else(|| bad("truncated"))?;
        self.0 = rest;
        Ok(b)
    }

    pub(crate) fn uleb(&mut self) -> Result<u64, Invalid> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(bad("a number past u64"));
            }
            value |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(bad("a number longer than 10 bytes"))
    }

    fn sleb(&mut self) -> Result<i64, Invalid> {
        let mut value = 0i64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= i64::from(b & 0x7f).wrapping_shl(shift);
            if b & 0x80 == 0 {
                if shift + 7 < 64 && b & 0x40 != 0 {
                    value |= -1i64 << (shift + 7);
                }
                return Ok(value);
            }
        }
        Err(bad("a number longer than 10 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).expect("hex"))
            .collect()
    }

    /// A change's data: actor 16 × 0xaa, seq 1, start op 1, no deps, time, message or other
    /// actors, then `columns` as (spec, data).
    fn change(columns: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = vec![0, 16];
        out.extend([0xaa; 16]);
        out.extend([1, 1, 0, 0, 0]);
        crate::craft::leb128(&mut out, columns.len() as u64);
        for (spec, data) in columns {
            crate::craft::leb128(&mut out, u64::from(*spec));
            crate::craft::leb128(&mut out, data.len() as u64);
        }
        for (_, data) in columns {
            out.extend(data);
        }
        out
    }

    /// 2^40 as signed and as unsigned LEB128.
    const HUGE: &str = "80 80 80 80 80 20";

    #[test]
    fn runs_are_summed_without_being_expanded() {
        // Two puts of key "a": the layout automerge writes for a map put.
        let honest = change(&[
            (0x15, hex("02 01 61")),
            (0x34, hex("00 02")),
            (0x42, hex("02 01")),
            (0x56, hex("02 00")),
            (0x70, hex("02 00")),
        ]);
        let w = walk(&honest, 20_000).expect("honest");
        assert_eq!(
            w,
            Walked {
                other_actors: 0,
                ops: 2
            }
        );
        // H7: a run of 2^40 ops in 79 bytes (automerge spins for hours on it).
        let spin = change(&[
            (0x15, hex(&format!("{HUGE} 01 61"))),
            (0x34, hex(HUGE)),
            (0x42, hex(&format!("{HUGE} 01"))),
            (0x56, hex(&format!("{HUGE} 00"))),
            (0x70, hex(&format!("{HUGE} 00"))),
        ]);
        let e = walk(&spin, 20_000).expect_err("refused");
        assert!(e.0.contains("more than 20000 values"), "{e}");
        // One op whose predecessor count is 2^40 (automerge grows a Vec towards 8 TiB).
        let preds = change(&[
            (0x15, hex("01 01 61")),
            (0x34, hex("01")),
            (0x42, hex("01 01")),
            (0x56, hex("01 00")),
            (0x70, hex(&format!("01 {HUGE}"))),
            (0x71, hex(&format!("{HUGE} 00"))),
            (0x73, hex(&format!("{HUGE} 00"))),
        ]);
        assert!(walk(&preds, 20_000).is_err());
    }

    #[test]
    fn counters_and_actor_indexes_that_would_panic_automerge_are_refused() {
        // An object counter of 2^32 (automerge's OpId::new unwraps a u32).
        let counter = change(&[(0x01, hex("01 00")), (0x02, hex("01 80 80 80 80 10"))]);
        let e = walk(&counter, 20_000).expect_err("refused");
        assert!(e.0.contains("counters are u32"), "{e}");
        // A negative key counter, reached by a run of negative deltas.
        let negative = change(&[(0x13, hex("01 01 02 7f"))]);
        assert!(
            walk(&negative, 20_000)
                .expect_err("refused")
                .0
                .contains("counter at -1")
        );
        let past = change(&[(0x13, hex("02 80 80 80 80 08"))]);
        assert!(
            walk(&past, 20_000)
                .expect_err("refused")
                .0
                .contains("counter at 4294967296")
        );
        // Actor index 1 with no other actors.
        let actor = change(&[(0x01, hex("01 01"))]);
        assert!(
            walk(&actor, 20_000)
                .expect_err("refused")
                .0
                .contains("actor index")
        );
        // A literal run of i64::MIN, out-of-order specs, deflated columns, a column past the
        // data, a start op of 0.
        let min = change(&[(0x42, hex("80 80 80 80 80 80 80 80 80 7f"))]);
        assert!(walk(&min, 20_000).is_err());
        assert!(walk(&change(&[(0x42, vec![]), (0x34, vec![])]), 20_000).is_err());
        assert!(walk(&change(&[(0x42 | DEFLATE, vec![1, 1])]), 20_000).is_err());
        // Predecessors' actors as an integer column (automerge takes it, and panics on an
        // index past its actors).
        let integer = change(&[
            (0x70, hex("01 01")),
            (0x72, hex("01 01")),
            (0x73, hex("01 01")),
        ]);
        let e = walk(&integer, 20_000).expect_err("refused");
        assert!(e.0.contains("not one automerge writes"), "{e}");
        let mut short = change(&[(0x42, hex("02 01"))]);
        short.pop();
        assert!(walk(&short, 20_000).is_err());
        let mut zero = change(&[]);
        zero[19] = 0;
        assert!(walk(&zero, 20_000).is_err());
    }
}
