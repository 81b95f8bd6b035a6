//! The worker's result cache: outcomes kept until the coordinator acknowledges them.
//!
//! A reply lost with a connection is recovered from here when the coordinator resumes the task,
//! instead of running the task again. The cache is bounded in entries and bytes; when full, the
//! oldest outcome goes first (it is the one the coordinator has most likely received).

use crate::message::{Outcome, TaskId};
use std::collections::VecDeque;

/// Bounded map from task to outcome, evicting oldest first.
#[derive(Debug)]
pub struct ResultCache {
    entries: crate::IdMap<TaskId, (Outcome, u64)>,
    /// Insertion order with each insertion's generation; an id whose entry was removed and
    /// inserted again has a stale older record here, which eviction skips.
    order: VecDeque<(TaskId, u64)>,
    generation: u64,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

fn outcome_size(outcome: &Outcome) -> usize {
    match outcome {
        Outcome::Value(v) => v.len() + 16,
        Outcome::Error(e) => e.message.len() + e.type_name.len() + e.chain.iter().map(String::len).sum::<usize>() + 64,
        Outcome::Cancelled => 16,
    }
}

impl ResultCache {
    /// A cache holding at most `max_entries` outcomes and `max_bytes` bytes of them.
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self { entries: Default::default(), order: VecDeque::new(), generation: 0, bytes: 0, max_entries, max_bytes }
    }

    /// Keep `outcome` for `task`.
    pub fn insert(&mut self, task: TaskId, outcome: Outcome) {
        let size = outcome_size(&outcome);
        self.generation += 1;
        let generation = self.generation;
        if let Some((old, _)) = self.entries.insert(task, (outcome, generation)) {
            self.bytes -= outcome_size(&old);
        }
        self.order.push_back((task, generation));
        self.bytes += size;
        while (self.entries.len() > self.max_entries || self.bytes > self.max_bytes) && self.entries.len() > 1 {
            let Some((oldest, oldest_generation)) = self.order.pop_front() else { break };
            if self.entries.get(&oldest).is_some_and(|(_, g)| *g == oldest_generation)
                && let Some((old, _)) = self.entries.remove(&oldest)
            {
                self.bytes -= outcome_size(&old);
            }
        }
    }

    /// The cached outcome of `task`.
    pub fn get(&self, task: TaskId) -> Option<&Outcome> {
        self.entries.get(&task).map(|(outcome, _)| outcome)
    }

    /// Drop the outcome of `task` (the coordinator has it).
    pub fn remove(&mut self, task: TaskId) {
        if let Some((old, _)) = self.entries.remove(&task) {
            self.bytes -= outcome_size(&old);
            // `order` is cleaned lazily: stale records are skipped when evicting.
            if self.order.len() > 2 * self.entries.len() + 64 {
                let entries = &self.entries;
                self.order.retain(|(t, g)| entries.get(t).is_some_and(|(_, eg)| eg == g));
            }
        }
    }

    /// Number of outcomes held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no outcome is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Ids of every held outcome.
    pub fn tasks(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.entries.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_oldest_when_over_entries() {
        let mut c = ResultCache::new(2, 1 << 20);
        for i in 0..3 {
            c.insert(TaskId(i), Outcome::Value(vec![i as u8]));
        }
        assert!(c.get(TaskId(0)).is_none());
        assert!(c.get(TaskId(1)).is_some() && c.get(TaskId(2)).is_some());
    }

    #[test]
    fn evicts_by_bytes_but_keeps_the_newest() {
        let mut c = ResultCache::new(100, 100);
        c.insert(TaskId(1), Outcome::Value(vec![0; 60]));
        c.insert(TaskId(2), Outcome::Value(vec![0; 60]));
        assert!(c.get(TaskId(1)).is_none());
        assert!(c.get(TaskId(2)).is_some());
        c.insert(TaskId(3), Outcome::Value(vec![0; 500]));
        assert_eq!(c.len(), 1, "a single oversized outcome is still kept");
    }

    #[test]
    fn a_removed_and_reinserted_entry_is_not_evicted_by_its_stale_record() {
        let mut c = ResultCache::new(2, 1 << 20);
        c.insert(TaskId(1), Outcome::Value(vec![1]));
        c.remove(TaskId(1));
        c.insert(TaskId(2), Outcome::Value(vec![2]));
        c.insert(TaskId(1), Outcome::Value(vec![1]));
        c.insert(TaskId(3), Outcome::Value(vec![3]));
        // Oldest live entry is 2; task 1's first record is stale and must not evict the new 1.
        assert!(c.get(TaskId(2)).is_none(), "2 was the oldest live entry");
        assert!(c.get(TaskId(1)).is_some() && c.get(TaskId(3)).is_some());
    }

    #[test]
    fn remove_frees_bytes() {
        let mut c = ResultCache::new(100, 100);
        c.insert(TaskId(1), Outcome::Value(vec![0; 60]));
        c.remove(TaskId(1));
        c.insert(TaskId(2), Outcome::Value(vec![0; 60]));
        assert!(c.get(TaskId(2)).is_some());
        assert_eq!(c.len(), 1);
    }
}
