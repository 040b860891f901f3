//! Standard `metav1.Condition` handling: a transition time changes only when the status does.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

/// A condition to set; `observed_generation` is filled by [`merge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Cond {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// The conditions after setting `wanted`: an unchanged status keeps its `lastTransitionTime`;
/// conditions of other types that are not wanted any more are dropped.
pub fn merge(existing: &[Condition], wanted: &[Cond], generation: Option<i64>) -> Vec<Condition> {
    let now = Time(Timestamp::now());
    wanted
        .iter()
        .map(|w| {
            let status = if w.status { "True" } else { "False" }.to_owned();
            let old = existing.iter().find(|c| c.type_ == w.type_);
            let same = old.is_some_and(|c| c.status == status);
            Condition {
                type_: w.type_.to_owned(),
                status,
                reason: w.reason.to_owned(),
                message: w.message.clone(),
                observed_generation: generation,
                last_transition_time: match old {
                    Some(c) if same => c.last_transition_time.clone(),
                    _ => now.clone(),
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let first = merge(
            &[],
            &[Cond::new("Ready", false, "Pending", "wait")],
            Some(1),
        );
        let t0 = first[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let same = merge(
            &first,
            &[Cond::new("Ready", false, "Pending", "still")],
            Some(2),
        );
        assert_eq!(same[0].last_transition_time, t0);
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = merge(
            &same,
            &[Cond::new("Ready", true, "Reconciled", "ok")],
            Some(2),
        );
        assert_ne!(flipped[0].last_transition_time, t0);
        assert_eq!(flipped[0].status, "True");
    }
}
