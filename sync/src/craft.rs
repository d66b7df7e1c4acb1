//! Hand-made automerge sync messages, hostile ones included, for tests of the validator
//! ([`crate::amcheck`]) and of nodes under attack. Nothing here is used to sync.

use std::io::Write;

/// Appends `n` as unsigned LEB128 (automerge's length and count encoding).
pub fn leb128(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// A replica's sync V1 message with no heads, needs or changes and one `Have` whose bloom
/// filter claims `entries` entries of `per_entry` bits and `probes` probes, followed by
/// `bits` bytes of filter.
pub fn ask_with_bloom(entries: u64, per_entry: u64, probes: u64, bits: usize) -> Vec<u8> {
    // V1 tag, no heads, no needs, one have with no last-sync heads.
    let mut out = vec![0x42, 0, 0, 1, 0];
    let mut bloom = Vec::new();
    for v in [entries, per_entry, probes] {
        leb128(&mut bloom, v);
    }
    bloom.extend(std::iter::repeat_n(0xffu8, bits));
    leb128(&mut out, bloom.len() as u64);
    out.extend(bloom);
    out.push(0); // no changes
    out
}

/// An owner's sync V1 message carrying `chunk` as its one change, and nothing else.
pub fn message_with_chunk(chunk: Vec<u8>) -> Vec<u8> {
    automerge::sync::Message {
        heads: vec![],
        need: vec![],
        have: vec![],
        changes: vec![chunk].into(),
        flags: None,
        version: automerge::sync::MessageVersion::V1,
    }
    .encode()
}

/// A compressed-change chunk (type 2) whose data is `mib` MiB of zeros deflated (about
/// 1 KiB per MiB on the wire); its checksum is left zero, as the bomb is refused before.
pub fn deflate_bomb_chunk(mib: usize) -> Vec<u8> {
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..mib {
        enc.write_all(&zeros)
            .expect("deflate into a Vec cannot fail");
    }
    let data = enc.finish().expect("deflate into a Vec cannot fail");
    let mut chunk = vec![0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 2];
    leb128(&mut chunk, data.len() as u64);
    chunk.extend(data);
    chunk
}

/// A change chunk of 79 bytes whose columns declare 2^40 operations (puts of key "a" on
/// the root) in single runs: automerge 0.12 iterates every one of them while parsing it
/// (H7, notes/sync.md). `data` of the chunk is checksummed like automerge's own.
pub fn run_length_bomb() -> Vec<u8> {
    const HUGE: [u8; 6] = [0x80, 0x80, 0x80, 0x80, 0x80, 0x20];
    // No deps, actor 16 x 0xaa, seq 1, start op 1, time 0, no message, no other actors.
    let mut data = vec![0, 16];
    data.extend([0xaa; 16]);
    data.extend([1, 1, 0, 0, 0]);
    // Key strings, insert flags, actions, value metadata, predecessor counts.
    let columns: [(u8, &[u8]); 5] = [
        (0x15, &[0x01, 0x61]),
        (0x34, &[]),
        (0x42, &[0x01]),
        (0x56, &[0x00]),
        (0x70, &[0x00]),
    ];
    data.push(columns.len() as u8);
    for (spec, value) in columns {
        data.push(spec);
        data.push((HUGE.len() + value.len()) as u8);
    }
    for (_, value) in columns {
        data.extend(HUGE);
        data.extend(value);
    }
    crate::amcheck::change_chunk_of(&data)
}
