//! Per-device memory budget and model residency: which models are loaded, how much they take,
//! and which idle ones to evict (least recently used first) when a job needs room.

use std::fmt;

#[derive(Debug, Clone)]
struct Resident {
    model: String,
    bytes: u64,
    busy: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetError {
    /// The job cannot run on this device even with nothing else loaded.
    NeverFits { need: u64, budget: u64 },
    /// It would fit, but busy models hold the room now.
    Busy { need: u64, free: u64 },
}

impl fmt::Display for BudgetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NeverFits { need, budget } => write!(
                f,
                "needs about {} but the device budget is {}",
                human_bytes(*need),
                human_bytes(*budget)
            ),
            Self::Busy { need, free } => write!(
                f,
                "needs about {} but only {} can be freed now",
                human_bytes(*need),
                human_bytes(*free)
            ),
        }
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Models resident on one device, least recently used first.
#[derive(Debug)]
pub struct Residency {
    budget: u64,
    resident: Vec<Resident>,
}

impl Residency {
    pub fn new(budget: u64) -> Self {
        Self {
            budget,
            resident: Vec::new(),
        }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn used(&self) -> u64 {
        self.resident.iter().map(|r| r.bytes).sum()
    }

    pub fn is_resident(&self, model: &str) -> bool {
        self.resident.iter().any(|r| r.model == model)
    }

    /// Resident models, least recently used first.
    pub fn models(&self) -> Vec<String> {
        self.resident.iter().map(|r| r.model.clone()).collect()
    }

    /// Whether a job of `model` (weights `weights` bytes) with `activation` bytes of working
    /// memory could ever run here.
    pub fn admit(&self, weights: u64, activation: u64) -> Result<(), BudgetError> {
        let need = weights.saturating_add(activation);
        if need > self.budget {
            return Err(BudgetError::NeverFits {
                need,
                budget: self.budget,
            });
        }
        Ok(())
    }

    /// The idle models to evict, least recently used first, so that `model` is resident and
    /// `activation` bytes are free. Busy models and `model` itself are never chosen.
    pub fn plan(
        &self,
        model: &str,
        weights: u64,
        activation: u64,
    ) -> Result<Vec<String>, BudgetError> {
        self.admit(weights, activation)?;
        let loaded = self.is_resident(model);
        let need = activation + if loaded { 0 } else { weights };
        let mut free = self.budget.saturating_sub(self.used());
        let mut evict = Vec::new();
        for r in &self.resident {
            if free >= need {
                break;
            }
            if r.busy || r.model == model {
                continue;
            }
            free += r.bytes;
            evict.push(r.model.clone());
        }
        if free < need {
            return Err(BudgetError::Busy { need, free });
        }
        Ok(evict)
    }

    pub fn loaded(&mut self, model: &str, bytes: u64) {
        self.resident.retain(|r| r.model != model);
        self.resident.push(Resident {
            model: model.to_string(),
            bytes,
            busy: false,
        });
    }

    pub fn evicted(&mut self, model: &str) {
        self.resident.retain(|r| r.model != model);
    }

    /// Mark `model` most recently used.
    pub fn touch(&mut self, model: &str) {
        if let Some(pos) = self.resident.iter().position(|r| r.model == model) {
            let r = self.resident.remove(pos);
            self.resident.push(r);
        }
    }

    pub fn set_busy(&mut self, model: &str, busy: bool) {
        if let Some(r) = self.resident.iter_mut().find(|r| r.model == model) {
            r.busy = busy;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_idle_models() {
        let mut r = Residency::new(100);
        r.loaded("a", 40);
        r.loaded("b", 40);
        r.touch("a"); // b is now the least recently used
        assert_eq!(r.plan("c", 40, 10), Ok(vec!["b".to_string()]));
        r.evicted("b");
        r.loaded("c", 40);
        assert_eq!(r.models(), ["a", "c"]);
        // Enough room: nothing evicted; already resident: only activations count.
        assert_eq!(r.plan("a", 40, 20), Ok(vec![]));
    }

    #[test]
    fn never_evicts_a_busy_model() {
        let mut r = Residency::new(100);
        r.loaded("a", 50);
        r.loaded("b", 40);
        r.set_busy("a", true);
        assert_eq!(r.plan("c", 45, 5), Ok(vec!["b".to_string()]));
        r.set_busy("b", true);
        assert!(matches!(r.plan("c", 45, 5), Err(BudgetError::Busy { .. })));
        r.set_busy("a", false);
        assert_eq!(r.plan("c", 45, 5), Ok(vec!["a".to_string()]));
    }

    #[test]
    fn a_job_larger_than_the_device_never_fits() {
        let r = Residency::new(100);
        assert!(matches!(
            r.admit(60, 50),
            Err(BudgetError::NeverFits {
                need: 110,
                budget: 100
            })
        ));
        assert!(r.admit(60, 40).is_ok());
    }
}
