//! The pool's membership (rank → address) as tasks see it in `instance_info()`, sent as changes.
//!
//! The coordinator numbers membership states by epoch and keeps a bounded log of changes
//! ([`MembersLog`]). A stream that carries tasks (a lane) gets, with its next task after a change,
//! only the changes since the epoch it last carried ([`MembersUpdate`]); a new stream gets a full
//! snapshot. The worker rebuilds the membership per stream ([`Members`]). So a task's frame does not
//! grow with the pool, and a change costs each lane a few bytes, not the whole address list
//! (1,000 nodes: 20 KB per lane per change before).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Membership changes for one stream, carried by a task's `Submit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersUpdate {
    /// The receiving node's rank.
    pub rank: u32,
    /// The membership epoch after this update.
    pub epoch: u64,
    /// The epoch the changes apply to; `None`: a full snapshot that replaces what the stream had.
    pub base: Option<u64>,
    /// Ranks that joined or changed address, with their address.
    pub set: Vec<(u32, String)>,
    /// Ranks that left.
    pub removed: Vec<u32>,
}

/// A stream's copy of the membership, rebuilt from updates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members {
    /// This node's rank.
    pub rank: u32,
    /// Epoch of the state held.
    pub epoch: u64,
    /// Address of each member, by rank.
    pub addrs: BTreeMap<u32, String>,
}

/// An update that does not follow on from what the stream holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("membership update from epoch {base} reached a stream at epoch {held:?}")]
pub struct MembersGap {
    /// The epoch the update applies to.
    pub base: u64,
    /// What the stream holds (`None`: nothing yet).
    pub held: Option<u64>,
}

impl Members {
    /// Apply `update` to `held` (`None` before the first): a snapshot replaces, changes must start at
    /// the epoch held.
    pub fn apply(held: &mut Option<Members>, update: MembersUpdate) -> Result<(), MembersGap> {
        let members = match (update.base, held.as_mut()) {
            (None, _) => held.insert(Members::default()),
            (Some(base), Some(m)) if m.epoch == base => m,
            (Some(base), m) => return Err(MembersGap { base, held: m.map(|m| m.epoch) }),
        };
        if update.base.is_none() {
            members.addrs.clear();
        }
        for rank in update.removed {
            members.addrs.remove(&rank);
        }
        members.addrs.extend(update.set);
        members.rank = update.rank;
        members.epoch = update.epoch;
        Ok(())
    }

    /// Addresses in rank order.
    pub fn peers(&self) -> Vec<String> {
        self.addrs.values().cloned().collect()
    }
}

/// Changes kept for streams that are behind; a stream further behind gets a snapshot.
const LOG_CAPACITY: usize = 4_096;

/// The coordinator's membership: the current state, its epoch and the recent changes.
#[derive(Debug, Clone, Default)]
pub struct MembersLog {
    epoch: u64,
    addrs: BTreeMap<u32, String>,
    /// `(epoch reached, rank, new address or gone)`, oldest first.
    log: VecDeque<(u64, u32, Option<String>)>,
}

impl MembersLog {
    /// Current epoch (0 before any member).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Ranks in order.
    pub fn ranks(&self) -> impl Iterator<Item = u32> + '_ {
        self.addrs.keys().copied()
    }

    /// `rank` joined (or came back, maybe at another address).
    pub fn set(&mut self, rank: u32, addr: String) {
        if self.addrs.get(&rank) == Some(&addr) {
            return;
        }
        self.addrs.insert(rank, addr.clone());
        self.push(rank, Some(addr));
    }

    /// `rank` left.
    pub fn remove(&mut self, rank: u32) {
        if self.addrs.remove(&rank).is_some() {
            self.push(rank, None);
        }
    }

    fn push(&mut self, rank: u32, addr: Option<String>) {
        self.epoch += 1;
        self.log.push_back((self.epoch, rank, addr));
        if self.log.len() > LOG_CAPACITY {
            self.log.pop_front();
        }
    }

    /// What a stream that holds epoch `since` (`None`: nothing) needs to reach the current state,
    /// for the node of `rank`; `None` when it is current.
    pub fn update_for(&self, rank: u32, since: Option<u64>) -> Option<MembersUpdate> {
        if since == Some(self.epoch) {
            return None;
        }
        let oldest_base = self.log.front().map_or(self.epoch, |(e, _, _)| e - 1);
        match since {
            Some(base) if base >= oldest_base && base < self.epoch => {
                let mut changed: BTreeMap<u32, Option<&String>> = BTreeMap::new();
                for (_, r, addr) in self.log.iter().filter(|(e, _, _)| *e > base) {
                    changed.insert(*r, addr.as_ref());
                }
                let mut update = MembersUpdate { rank, epoch: self.epoch, base: Some(base), set: Vec::new(), removed: Vec::new() };
                for (r, addr) in changed {
                    match addr {
                        Some(a) => update.set.push((r, a.clone())),
                        None => update.removed.push(r),
                    }
                }
                Some(update)
            }
            _ => Some(MembersUpdate {
                rank,
                epoch: self.epoch,
                base: None,
                set: self.addrs.iter().map(|(r, a)| (*r, a.clone())).collect(),
                removed: Vec::new(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_after(log: &MembersLog, held: &mut Option<Members>, rank: u32) {
        let since = held.as_ref().map(|m| m.epoch);
        if let Some(update) = log.update_for(rank, since) {
            Members::apply(held, update).expect("follows on");
        }
        let m = held.as_ref().expect("held");
        assert_eq!(m.epoch, log.epoch());
        assert_eq!(m.addrs, log.addrs, "stream copy matches the coordinator's");
    }

    #[test]
    fn streams_catch_up_with_changes_or_a_snapshot() {
        let mut log = MembersLog::default();
        for r in 0..5 {
            log.set(r, format!("10.0.0.{r}"));
        }
        let mut lane = None;
        held_after(&log, &mut lane, 2);
        assert_eq!(lane.as_ref().map(|m| m.rank), Some(2));
        // Current: nothing to send.
        assert_eq!(log.update_for(2, Some(log.epoch())), None);

        log.remove(3);
        log.set(3, "10.0.0.33".into());
        log.remove(4);
        let update = log.update_for(2, lane.as_ref().map(|m| m.epoch)).expect("behind");
        assert_eq!(update.set, vec![(3, "10.0.0.33".to_string())], "only the changes, last one wins");
        assert_eq!(update.removed, vec![4]);
        held_after(&log, &mut lane, 2);
        assert_eq!(lane.as_ref().map(Members::peers).unwrap_or_default(), vec!["10.0.0.0", "10.0.0.1", "10.0.0.2", "10.0.0.33"]);

        // Setting the same address again is no change.
        let epoch = log.epoch();
        log.set(0, "10.0.0.0".into());
        assert_eq!(log.epoch(), epoch);

        // A stream further behind than the log gets a snapshot.
        let mut old = None;
        held_after(&log, &mut old, 1);
        let stale = old.as_ref().map(|m| m.epoch);
        for i in 0..(LOG_CAPACITY as u32 + 10) {
            log.set(100, format!("10.1.{}.{}", i / 256, i % 256));
        }
        let update = log.update_for(1, stale).expect("behind");
        assert_eq!(update.base, None, "snapshot");
        held_after(&log, &mut old, 1);
    }

    #[test]
    fn an_update_that_does_not_follow_on_is_refused() {
        let mut log = MembersLog::default();
        log.set(0, "a".into());
        log.set(1, "b".into());
        let mut held = None;
        let update = log.update_for(0, Some(1)).expect("changes");
        assert_eq!(Members::apply(&mut held, update.clone()), Err(MembersGap { base: 1, held: None }));
        let mut other = Some(Members { rank: 0, epoch: 7, addrs: BTreeMap::new() });
        assert_eq!(Members::apply(&mut other, update), Err(MembersGap { base: 1, held: Some(7) }));
    }
}
