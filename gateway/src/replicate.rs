//! Hosting by policy (`[sync] replicate = N`, as the seeds' replicationFactor): every
//! `REPLICATE_INTERVAL`, for each uncontested skill whose weights fewer than N nodes announce
//! (`blob.host`, pinned), the node fetches the weights from a peer (verified, durable,
//! pinned; `Mesh::fetch_blob`) and announces them with its own `blob.host` — within
//! `[sync] replicate_bytes_max` bytes of weights hosted this way or otherwise.
//! Skills are taken in catalog order (by publish id), so nodes with the same quota pick the
//! same ones; a skill whose weights no peer serves is tried again at the next round.

use std::sync::Arc;
use std::time::Duration;

use meshnode_ledger::SkillState;
use meshnode_schemas::{BlobHost, Payload};

use crate::node::Node;

/// Pause between two rounds.
const REPLICATE_INTERVAL: Duration = Duration::from_secs(10);
/// Skills fetched per round (the rest wait for the next one).
const FETCHES_PER_ROUND: usize = 8;

/// Starts the hosting loop if `[sync] replicate` is above 0.
pub fn spawn(node: Arc<Node>) {
    if node.config.sync.replicate == 0 {
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(REPLICATE_INTERVAL).await;
            if let Err(e) = round(&node).await {
                tracing::warn!("replication round: {e:#}");
            }
        }
    });
}

/// One round; returns the skills whose weights it took on.
pub async fn round(node: &Node) -> anyhow::Result<usize> {
    let Some(mesh) = node.mesh.get() else {
        return Ok(0);
    };
    let want = node.config.sync.replicate as usize;
    let quota = node.config.sync.replicate_bytes_max;
    let skills: Vec<SkillState> = node
        .ledger
        .skills()?
        .into_iter()
        .filter(|s| !s.contested)
        .collect();
    let mut hosted: u64 = 0;
    let mut short = Vec::new();
    for skill in &skills {
        if node.ledger.hosts_blob(&skill.blob, &node.node)? {
            hosted = hosted.saturating_add(skill.size);
        } else if node.ledger.hosts_up_to(&skill.blob, want)?.0.len() < want {
            short.push(skill);
        }
    }
    let mut taken = 0;
    for skill in short.into_iter().take(FETCHES_PER_ROUND) {
        if hosted.saturating_add(skill.size) > quota {
            continue;
        }
        if let Err(e) = mesh.fetch_blob(&skill.blob).await {
            tracing::info!(skill = skill.skill_id, "weights not fetched: {e}");
            continue;
        }
        announce(node, skill).await?;
        hosted = hosted.saturating_add(skill.size);
        taken += 1;
    }
    Ok(taken)
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
