//! The waiting room: bounded, fair between users, with a priority tier for admins, and able to
//! hand the worker a batch of compatible jobs.
//!
//! Service order: every priority job before any normal one; within a tier, users take turns
//! (round-robin over users with waiting jobs, each user's own jobs first-in first-out), so one
//! user's hundred jobs delay another user's single job by at most one job.

use std::collections::{HashMap, VecDeque};

/// A job as the queue sees it: who asked, in which tier, and what it can be batched with.
pub struct Entry<T, K> {
    pub id: String,
    pub user: String,
    pub priority: bool,
    /// Jobs with equal keys can share one denoising run.
    pub batch_key: K,
    /// Rows this job adds to a batch (its `n`).
    pub rows: usize,
    pub item: T,
}

#[derive(Default)]
struct Tier<T, K> {
    per_user: HashMap<String, VecDeque<Entry<T, K>>>,
    /// Users with waiting jobs, next to be served first.
    turn: VecDeque<String>,
}

impl<T, K> Tier<T, K> {
    fn new() -> Self {
        Self {
            per_user: HashMap::new(),
            turn: VecDeque::new(),
        }
    }

    fn push(&mut self, e: Entry<T, K>) {
        let queue = self.per_user.entry(e.user.clone()).or_default();
        if queue.is_empty() {
            self.turn.push_back(e.user.clone());
        }
        queue.push_back(e);
    }

    /// Ids in service order (the round-robin interleaving of the users' queues).
    fn order(&self) -> Vec<&Entry<T, K>> {
        let mut out = Vec::new();
        let mut depth = 0;
        loop {
            let before = out.len();
            for user in &self.turn {
                if let Some(e) = self.per_user.get(user).and_then(|q| q.get(depth)) {
                    out.push(e);
                }
            }
            if out.len() == before {
                return out;
            }
            depth += 1;
        }
    }

    fn remove(&mut self, id: &str) -> Option<Entry<T, K>> {
        let user = self
            .per_user
            .iter()
            .find(|(_, q)| q.iter().any(|e| e.id == id))
            .map(|(u, _)| u.clone())?;
        let queue = self.per_user.get_mut(&user)?;
        let pos = queue.iter().position(|e| e.id == id)?;
        let entry = queue.remove(pos);
        if queue.is_empty() {
            self.per_user.remove(&user);
            self.turn.retain(|u| *u != user);
        }
        entry
    }

    /// Take the next job in service order; the user goes to the back of the turn.
    fn pop_next(&mut self) -> Option<Entry<T, K>> {
        let user = self.turn.pop_front()?;
        let queue = self.per_user.get_mut(&user)?;
        let entry = queue.pop_front();
        if queue.is_empty() {
            self.per_user.remove(&user);
        } else {
            self.turn.push_back(user);
        }
        entry
    }

    fn len(&self) -> usize {
        self.per_user.values().map(VecDeque::len).sum()
    }
}

pub struct FairQueue<T, K> {
    capacity: usize,
    priority: Tier<T, K>,
    normal: Tier<T, K>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct QueueFull;

impl<T, K: PartialEq> FairQueue<T, K> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            priority: Tier::new(),
            normal: Tier::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.priority.len() + self.normal.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn push(&mut self, e: Entry<T, K>) -> Result<(), (QueueFull, Entry<T, K>)> {
        if self.len() >= self.capacity {
            return Err((QueueFull, e));
        }
        if e.priority {
            self.priority.push(e);
        } else {
            self.normal.push(e);
        }
        Ok(())
    }

    pub fn remove(&mut self, id: &str) -> Option<Entry<T, K>> {
        self.priority.remove(id).or_else(|| self.normal.remove(id))
    }

    /// 0-based place in service order (0 = next to run).
    pub fn position(&self, id: &str) -> Option<usize> {
        self.priority
            .order()
            .into_iter()
            .chain(self.normal.order())
            .position(|e| e.id == id)
    }

    /// Ids in service order.
    pub fn ids(&self) -> Vec<String> {
        self.priority
            .order()
            .into_iter()
            .chain(self.normal.order())
            .map(|e| e.id.clone())
            .collect()
    }

    /// Remove every job for which `expired` says so (e.g. past its deadline).
    pub fn drain_where(
        &mut self,
        mut expired: impl FnMut(&Entry<T, K>) -> bool,
    ) -> Vec<Entry<T, K>> {
        let ids: Vec<String> = self
            .priority
            .order()
            .into_iter()
            .chain(self.normal.order())
            .filter(|e| expired(e))
            .map(|e| e.id.clone())
            .collect();
        ids.iter().filter_map(|id| self.remove(id)).collect()
    }

    /// The next job in service order plus, up to `max_jobs` jobs and `max_rows` rows in all,
    /// the compatible jobs that come next in service order. Taking a compatible job early only
    /// ever serves it sooner; the order of everyone else is unchanged.
    /// `max_rows` is asked for the head's key (what fits depends on size and model).
    pub fn pop_batch(
        &mut self,
        max_jobs: usize,
        max_rows: impl Fn(&K) -> usize,
    ) -> Vec<Entry<T, K>> {
        let head = match self.priority.pop_next().or_else(|| self.normal.pop_next()) {
            Some(h) => h,
            None => return Vec::new(),
        };
        let max_rows = max_rows(&head.batch_key);
        let mut rows = head.rows;
        let companions: Vec<String> = self
            .priority
            .order()
            .into_iter()
            .chain(self.normal.order())
            .filter(|e| e.batch_key == head.batch_key)
            .take_while(|e| {
                rows += e.rows;
                rows <= max_rows
            })
            .take(max_jobs.saturating_sub(1))
            .map(|e| e.id.clone())
            .collect();
        let mut batch = vec![head];
        batch.extend(companions.iter().filter_map(|id| self.remove(id)));
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, user: &str, key: u8) -> Entry<(), u8> {
        Entry {
            id: id.into(),
            user: user.into(),
            priority: false,
            batch_key: key,
            rows: 1,
            item: (),
        }
    }

    #[test]
    fn users_take_turns() {
        let mut q = FairQueue::new(100);
        for i in 0..5 {
            q.push(entry(&format!("a{i}"), "alice", i)).ok();
        }
        q.push(entry("b0", "bob", 9)).ok();
        q.push(entry("b1", "bob", 10)).ok();
        assert_eq!(q.ids(), ["a0", "b0", "a1", "b1", "a2", "a3", "a4"]);
        assert_eq!(q.position("b0"), Some(1));
        let order: Vec<String> =
            std::iter::from_fn(|| q.pop_batch(1, |_| 16).pop().map(|e| e.id)).collect();
        assert_eq!(order, ["a0", "b0", "a1", "b1", "a2", "a3", "a4"]);
    }

    #[test]
    fn admins_go_first_and_capacity_is_enforced() {
        let mut q = FairQueue::new(3);
        q.push(entry("a0", "alice", 0)).ok();
        q.push(entry("a1", "alice", 1)).ok();
        let mut admin = entry("root0", "root", 2);
        admin.priority = true;
        q.push(admin).ok();
        assert!(q.push(entry("x", "carol", 3)).is_err());
        assert_eq!(q.ids(), ["root0", "a0", "a1"]);
        assert_eq!(q.pop_batch(1, |_| 16)[0].id, "root0");
    }

    #[test]
    fn compatible_jobs_are_batched_without_reordering_the_rest() {
        let mut q = FairQueue::new(100);
        q.push(entry("a0", "alice", 1)).ok();
        q.push(entry("a1", "alice", 2)).ok();
        q.push(entry("a2", "alice", 1)).ok();
        q.push(entry("b0", "bob", 1)).ok();
        q.push(entry("c0", "carol", 3)).ok();
        let batch: Vec<String> = q.pop_batch(8, |_| 16).into_iter().map(|e| e.id).collect();
        assert_eq!(batch, ["a0", "b0", "a2"]);
        assert_eq!(q.ids(), ["c0", "a1"]);
        // Row and job limits.
        let mut q = FairQueue::new(100);
        for i in 0..5 {
            q.push(entry(&format!("j{i}"), &format!("u{i}"), 7)).ok();
        }
        assert_eq!(q.pop_batch(3, |_| 16).len(), 3);
        assert_eq!(q.pop_batch(8, |_| 1).len(), 1);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn removal_and_expiry() {
        let mut q = FairQueue::new(10);
        q.push(entry("a0", "alice", 0)).ok();
        q.push(entry("b0", "bob", 0)).ok();
        assert_eq!(q.remove("a0").map(|e| e.id), Some("a0".into()));
        assert_eq!(q.ids(), ["b0"]);
        assert!(q.remove("zzz").is_none());
        let gone = q.drain_where(|e| e.user == "bob");
        assert_eq!(gone.len(), 1);
        assert!(q.is_empty());
    }
}
