//! The transparency log: an RFC 6962 / RFC 9162 Merkle tree (SHA-256) over accepted EventIds in
//! acceptance order, its proofs, and C2SP signed-note checkpoints.

use data_encoding::BASE64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use meshnode_schemas::EventId;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A SHA-256 tree hash.
pub type TreeHash = [u8; 32];

/// RFC 6962 leaf hash of an EventId: SHA-256(0x00 ‖ id).
pub fn leaf_hash(id: &EventId) -> TreeHash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(id.as_bytes());
    h.finalize().into()
}

/// RFC 6962 interior node hash: SHA-256(0x01 ‖ left ‖ right).
pub fn node_hash(left: &TreeHash, right: &TreeHash) -> TreeHash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// SHA-256 of the empty string: the root of the empty tree.
pub fn empty_root() -> TreeHash {
    Sha256::digest([]).into()
}

/// Read access to the hashes of perfect, aligned subtrees: `node(level, index)` is the hash of
/// leaves `[index·2^level, (index+1)·2^level)`.
pub trait Nodes {
    /// The hash of a perfect subtree that lies entirely within the log.
    fn node(&self, level: u8, index: u64) -> Result<TreeHash>;
}

fn largest_power_of_two_below(n: u64) -> u64 {
    debug_assert!(n > 1);
    1 << (63 - (n - 1).leading_zeros())
}

/// MTH(D[start:end]) per RFC 9162 §2.1.1, for ranges that the RFC algorithms produce (always
/// aligned so that every full power-of-two part is a stored perfect subtree).
pub fn subtree(nodes: &impl Nodes, start: u64, end: u64) -> Result<TreeHash> {
    let n = end - start;
    if n == 0 {
        return Ok(empty_root());
    }
    if n.is_power_of_two() && start.is_multiple_of(n) {
        return nodes.node(n.trailing_zeros() as u8, start / n);
    }
    let k = largest_power_of_two_below(n);
    Ok(node_hash(
        &subtree(nodes, start, start + k)?,
        &subtree(nodes, start + k, end)?,
    ))
}

/// The root of the first `size` leaves.
pub fn root(nodes: &impl Nodes, size: u64) -> Result<TreeHash> {
    subtree(nodes, 0, size)
}

/// The audit path of leaf `index` in the tree of `size` leaves (RFC 9162 §2.1.3.1).
pub fn inclusion_path(nodes: &impl Nodes, index: u64, size: u64) -> Result<Vec<TreeHash>> {
    if index >= size {
        return Err(Error::Invalid(format!(
            "leaf {index} is not in a tree of size {size}"
        )));
    }
    let mut path = Vec::new();
    path_rec(nodes, index, 0, size, &mut path)?;
    Ok(path)
}

fn path_rec(
    nodes: &impl Nodes,
    m: u64,
    start: u64,
    end: u64,
    out: &mut Vec<TreeHash>,
) -> Result<()> {
    let n = end - start;
    if n <= 1 {
        return Ok(());
    }
    let k = largest_power_of_two_below(n);
    if m < k {
        path_rec(nodes, m, start, start + k, out)?;
        out.push(subtree(nodes, start + k, end)?);
    } else {
        path_rec(nodes, m - k, start + k, end, out)?;
        out.push(subtree(nodes, start, start + k)?);
    }
    Ok(())
}

/// The consistency proof from size `old` to size `new` (RFC 9162 §2.1.4.1).
pub fn consistency_path(nodes: &impl Nodes, old: u64, new: u64) -> Result<Vec<TreeHash>> {
    if old > new {
        return Err(Error::Invalid(format!(
            "from={old} is larger than to={new}"
        )));
    }
    if old == 0 || old == new {
        return Ok(Vec::new());
    }
    let mut path = Vec::new();
    subproof(nodes, old, 0, new, true, &mut path)?;
    Ok(path)
}

fn subproof(
    nodes: &impl Nodes,
    m: u64,
    start: u64,
    end: u64,
    complete: bool,
    out: &mut Vec<TreeHash>,
) -> Result<()> {
    let n = end - start;
    if m == n {
        if !complete {
            out.push(subtree(nodes, start, end)?);
        }
        return Ok(());
    }
    let k = largest_power_of_two_below(n);
    if m <= k {
        subproof(nodes, m, start, start + k, complete, out)?;
        out.push(subtree(nodes, start + k, end)?);
    } else {
        subproof(nodes, m - k, start + k, end, false, out)?;
        out.push(subtree(nodes, start, start + k)?);
    }
    Ok(())
}

/// Verifies an inclusion proof (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf: &TreeHash,
    index: u64,
    size: u64,
    path: &[TreeHash],
    root: &TreeHash,
) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// Verifies a consistency proof (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &TreeHash,
    new_root: &TreeHash,
    path: &[TreeHash],
) -> bool {
    if old_size > new_size {
        return false;
    }
    if old_size == new_size {
        return path.is_empty() && old_root == new_root;
    }
    if old_size == 0 {
        return path.is_empty();
    }
    let mut path: Vec<TreeHash> = path.to_vec();
    if old_size.is_power_of_two() {
        path.insert(0, *old_root);
    }
    let Some(first) = path.first().copied() else {
        return false;
    };
    let (mut fnode, mut snode) = (old_size - 1, new_size - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (first, first);
    for c in &path[1..] {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    fr == *old_root && sr == *new_root && snode == 0
}

/// The right edge of the tree: one perfect subtree per set bit of the size, largest first.
/// Appending a leaf and computing the root take O(log n).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// (level, hash), levels strictly decreasing.
    peaks: Vec<(u8, TreeHash)>,
}

impl Frontier {
    /// Rebuilds the frontier of a log of `size` leaves from stored nodes.
    pub fn load(nodes: &impl Nodes, size: u64) -> Result<Self> {
        let mut peaks = Vec::new();
        let mut start = 0u64;
        for level in (0..64u8).rev() {
            let width = 1u64 << level;
            if size & width != 0 {
                peaks.push((level, nodes.node(level, start / width)?));
                start += width;
            }
        }
        Ok(Self { size, peaks })
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf; returns the perfect subtrees completed by it (level ≥ 1) as
    /// `(level, index, hash)`, for storage.
    pub fn push(&mut self, leaf: TreeHash) -> Vec<(u8, u64, TreeHash)> {
        let mut completed = Vec::new();
        let mut level = 0u8;
        let mut hash = leaf;
        let mut index = self.size;
        while let Some(&(top_level, top_hash)) = self.peaks.last() {
            if top_level != level {
                break;
            }
            self.peaks.pop();
            hash = node_hash(&top_hash, &hash);
            level += 1;
            index >>= 1;
            completed.push((level, index, hash));
        }
        self.peaks.push((level, hash));
        self.size += 1;
        completed
    }

    /// The root hash (RFC 9162 MTH of all leaves).
    pub fn root(&self) -> TreeHash {
        let mut iter = self.peaks.iter().rev();
        let Some(&(_, mut acc)) = iter.next() else {
            return empty_root();
        };
        for (_, hash) in iter {
            acc = node_hash(hash, &acc);
        }
        acc
    }
}

/// A parsed checkpoint (C2SP `tlog-checkpoint`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Log origin line.
    pub origin: String,
    /// Tree size.
    pub size: u64,
    /// Root hash.
    pub root: TreeHash,
}

impl Checkpoint {
    /// The checkpoint body (the signed text, ending in a newline).
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            BASE64.encode(&self.root)
        )
    }
}

/// The C2SP signed-note key id of an Ed25519 key: SHA-256(name ‖ "\n" ‖ 0x01 ‖ key)[:4].
pub fn key_id(name: &str, key: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([0x01]);
    h.update(key.as_bytes());
    let digest = h.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

/// Signs a checkpoint as a C2SP signed note with one Ed25519 signature line by `name`.
pub fn sign_checkpoint(checkpoint: &Checkpoint, name: &str, key: &SigningKey) -> String {
    let body = checkpoint.body();
    let signature = key.sign(body.as_bytes());
    let mut blob = key_id(name, &key.verifying_key()).to_vec();
    blob.extend_from_slice(&signature.to_bytes());
    format!("{body}\n\u{2014} {name} {}\n", BASE64.encode(&blob))
}

/// Parses a signed note and verifies the signature line of `name` under `key`.
pub fn verify_checkpoint(note: &str, name: &str, key: &VerifyingKey) -> Result<Checkpoint> {
    let bad = |why: &str| Error::Invalid(format!("checkpoint: {why}"));
    let (body, signatures) = note
        .split_once("\n\n")
        .ok_or_else(|| bad("no blank line between text and signatures"))?;
    let body = format!("{body}\n");
    let mut lines = body.lines();
    let origin = lines.next().ok_or_else(|| bad("no origin"))?.to_string();
    let size: u64 = lines
        .next()
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| bad("no tree size"))?;
    let root_bytes = lines
        .next()
        .and_then(|l| BASE64.decode(l.as_bytes()).ok())
        .ok_or_else(|| bad("no base64 root"))?;
    let root: TreeHash = root_bytes
        .as_slice()
        .try_into()
        .map_err(|_| bad("root is not 32 bytes"))?;
    let id = key_id(name, key);
    for line in signatures.lines() {
        let Some(rest) = line.strip_prefix("\u{2014} ") else {
            continue;
        };
        let Some((signer, blob)) = rest.split_once(' ') else {
            continue;
        };
        if signer != name {
            continue;
        }
        let Ok(blob) = BASE64.decode(blob.as_bytes()) else {
            continue;
        };
        if blob.len() != 68 || blob[..4] != id {
            continue;
        }
        let signature = Signature::from_bytes(
            blob[4..]
                .try_into()
                .expect("invariant: 64 bytes after the key id"),
        );
        if key.verify_strict(body.as_bytes(), &signature).is_ok() {
            return Ok(Checkpoint { origin, size, root });
        }
        return Err(bad("signature does not verify"));
    }
    Err(bad(&format!("no signature by {name}")))
}
