//! Hosting by policy (`[sync] replicate = N`, as the seeds' replicationFactor): every
//! `REPLICATE_INTERVAL`, for each uncontested skill whose weights fewer than N nodes announce
//! (`blob.host`, pinned), the node fetches the weights from a peer (verified, durable,
//! pinned; `Mesh::fetch_blob`) and announces them with its own `blob.host` — within
//! `[sync] replicate_bytes_max` bytes of weights hosted this way or otherwise.
//! Skills are taken in catalog order (by publish id), so nodes with the same quota pick the
//! same ones; weights that no peer serves are left alone for `RETRY_AFTER`. The quota counts
//! the blobs' real sizes, not the publishers' claims.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshnode_ledger::SkillState;
use meshnode_schemas::{BlobHash, BlobHost, Payload};

use crate::node::Node;

/// Pause between two rounds.
const REPLICATE_INTERVAL: Duration = Duration::from_secs(10);
/// Fetch attempts per round (the rest wait for the next one).
const FETCHES_PER_ROUND: usize = 8;

/// How long weights that could not be fetched are left alone.
const RETRY_AFTER: Duration = Duration::from_secs(300);

/// Weights whose fetch failed, and when.
type Failed = HashMap<BlobHash, Instant>;

/// Starts the hosting loop if `[sync] replicate` is above 0.
pub fn spawn(node: Arc<Node>) {
    if node.config.sync.replicate == 0 {
        return;
    }
    tokio::spawn(async move {
        let mut failed = Failed::new();
        loop {
            tokio::time::sleep(REPLICATE_INTERVAL).await;
            if let Err(e) = round(&node, &mut failed).await {
                tracing::warn!("replication round: {e:#}");
            }
        }
    });
}

/// One round; returns how many skills' weights it took on.
pub async fn round(node: &Arc<Node>, failed: &mut Failed) -> anyhow::Result<usize> {
    let Some(mesh) = node.mesh.get() else {
        return Ok(0);
    };
    let want = node.config.sync.replicate as usize;
    let quota = node.config.sync.replicate_bytes_max;
    failed.retain(|_, at| at.elapsed() < RETRY_AFTER);
    // Ledger and store reads are blocking: off the async workers.
    let (mut hosted, short) = {
        let node = node.clone();
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || plan(&node, want, &runtime)).await??
    };
    let mut taken = 0;
    let mut attempts = 0;
    for skill in short {
        if attempts == FETCHES_PER_ROUND {
            break;
        }
        // The publisher's `size` is a claim: the fetch is capped by what the quota has
        // left, and the bytes counted are the blob's own.
        let left = quota.saturating_sub(hosted);
        if left == 0 || skill.size > left || failed.contains_key(&skill.blob) {
            continue;
        }
        attempts += 1;
        let fetched = match mesh.fetch_blob(&skill.blob, left).await {
            Ok(fetched) => fetched,
            Err(e) => {
                tracing::info!(skill = skill.skill_id, "weights not fetched: {e}");
                failed.insert(skill.blob, Instant::now());
                continue;
            }
        };
        if let Err(e) = announce(node, &skill).await {
            tracing::warn!(
                skill = skill.skill_id,
                "weights fetched, not announced: {e:#}"
            );
            failed.insert(skill.blob, Instant::now());
            continue;
        }
        hosted = hosted.saturating_add(fetched.size);
        taken += 1;
    }
    Ok(taken)
}

/// (bytes of weights this node hosts — the stored size where it has them —, uncontested
/// skills whose weights fewer than `want` nodes host, one per blob, in catalog order).
fn plan(
    node: &Node,
    want: usize,
    runtime: &tokio::runtime::Handle,
) -> anyhow::Result<(u64, Vec<SkillState>)> {
    let mut hosted: u64 = 0;
    let mut seen = HashSet::new();
    let mut short = Vec::new();
    for skill in node.ledger.skills()? {
        if skill.contested || !seen.insert(skill.blob) {
            continue;
        }
        if node.ledger.hosts_blob(&skill.blob, &node.node)? {
            let stored = runtime
                .block_on(node.store.stat(&skill.blob))?
                .map(|s| s.size);
            hosted = hosted.saturating_add(stored.unwrap_or(skill.size));
        } else if node.ledger.hosts_up_to(&skill.blob, want)?.0.len() < want {
            short.push(skill);
        }
    }
    Ok((hosted, short))
}

/// Appends a `blob.host` of the skill's weights to the node's own log.
async fn announce(node: &Node, skill: &SkillState) -> anyhow::Result<()> {
    let payload = Payload::BlobHost(BlobHost {
        blob: skill.blob,
        pinned: true,
    });
    node.append_own(Vec::new(), payload).await?;
    tracing::info!(skill = skill.skill_id, blob = %skill.blob, "hosting a skill's weights");
    Ok(())
}
