//! Recently encoded prompts, per pipeline. A served model sees the same prompts again and
//! again: every guided request's negative prompt (`""` unless given), `n` variations and
//! retries sent as separate requests, the same prompt at new seeds. With the text encoders on
//! the CPU (`--text-encoders-on-cpu`), T5-XXL takes seconds to tens of seconds a prompt.
//!
//! Encoding is deterministic, so a hit returns the very tensors the encoders produced.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::engine::error::Result;

/// Prompts kept per pipeline. The largest entry is FLUX-dev's 512 × 4 096 T5 states
/// (4 MiB in bf16, 8 MiB in f32), so a full cache holds at most ~64 MiB.
pub const CAPACITY: usize = 8;

/// The last [`CAPACITY`] distinct keys' values, the least recently used dropped first.
pub struct PromptCache<K, V> {
    entries: Mutex<VecDeque<(K, V)>>,
}

impl<K: PartialEq, V: Clone> Default for PromptCache<K, V> {
    fn default() -> Self {
        Self {
            entries: Mutex::new(VecDeque::with_capacity(CAPACITY)),
        }
    }
}

impl<K: PartialEq, V: Clone> PromptCache<K, V> {
    /// `key`'s value, from the cache or else from `encode` (kept unless it failed).
    pub fn get_or_encode(&self, key: K, encode: impl FnOnce() -> Result<V>) -> Result<V> {
        if let Some(value) = self.take_fresh(&key) {
            return Ok(value);
        }
        // Encoded without the lock held (an encoder may take seconds).
        let value = encode()?;
        let mut entries = self.lock();
        if entries.len() == CAPACITY {
            entries.pop_back();
        }
        entries.push_front((key, value.clone()));
        Ok(value)
    }

    /// A hit, moved to the front (most recently used).
    fn take_fresh(&self, key: &K) -> Option<V> {
        let mut entries = self.lock();
        let at = entries.iter().position(|(k, _)| k == key)?;
        let entry = entries.remove(at)?;
        let value = entry.1.clone();
        entries.push_front(entry);
        Some(value)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(K, V)>> {
        // Nothing panics while holding it; a poisoned lock still holds whole entries.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn hits_skip_the_encoder_and_the_least_recently_used_goes_first() {
        let cache = PromptCache::<String, usize>::default();
        let calls = Cell::new(0);
        let get = |prompt: &str| {
            let encode = || {
                calls.set(calls.get() + 1);
                Ok(prompt.len())
            };
            cache.get_or_encode(prompt.to_string(), encode).unwrap()
        };
        assert_eq!(get("a cat"), 5);
        assert_eq!(get("a cat"), 5);
        assert_eq!(calls.get(), 1, "a repeated prompt was encoded again");
        // Fill the cache; "a cat", used again now, outlives the oldest other entry.
        for i in 1..CAPACITY {
            get(&format!("prompt {i}"));
        }
        get("a cat");
        get("one more");
        assert_eq!(cache.len(), CAPACITY);
        let before = calls.get();
        get("a cat");
        assert_eq!(
            calls.get(),
            before,
            "the most recently used entry was dropped"
        );
        get("prompt 1");
        assert_eq!(
            calls.get(),
            before + 1,
            "the least recently used entry was kept"
        );
        // A failed encoding is not kept.
        let failed = cache.get_or_encode("bad".to_string(), || {
            Err(crate::engine::error::EngineError::Internal("no".into()))
        });
        assert!(failed.is_err());
        assert!(cache.get_or_encode("bad".to_string(), || Ok(3)).unwrap() == 3);
    }
}
