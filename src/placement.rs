//! Where replicas go, with no I/O and no knowledge of jobs: balanced over the
//! accounts, within each account's capacity. Used by job validation (does the
//! pool fit?) and by planning (which account gets each replica).

use std::collections::BTreeMap;

/// Spreads `count` replicas over `accounts` round-robin: every account gets
/// `count / n` or one more, earlier accounts first.
#[cfg(test)]
pub(crate) fn place(count: u32, accounts: &[String]) -> Vec<String> {
    assert!(!accounts.is_empty(), "placement needs at least one account");
    (0..count as usize)
        .map(|i| accounts[i % accounts.len()].clone())
        .collect()
}

/// The configured accounts cannot hold the replicas.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the accounts {accounts:?} hold at most {capacity} more replicas but {wanted} are needed; add {accounts_needed} more destination account(s) of the same capacity, or raise max_replicas")]
pub struct CapacityError {
    /// Accounts considered.
    pub accounts: Vec<String>,
    /// Replicas they can still take.
    pub capacity: u64,
    /// Replicas wanted.
    pub wanted: u32,
    /// How many more accounts like the largest would be needed.
    pub accounts_needed: u64,
}

/// Places `count` more replicas over `accounts`, each time into the account holding
/// the fewest (`held` counts what each holds already), never beyond an account's
/// capacity (`None`: unlimited). Ties go to the earlier account.
pub(crate) fn place_more(
    count: u32,
    accounts: &[String],
    held: &BTreeMap<String, u32>,
    capacity: &BTreeMap<String, Option<u32>>,
) -> Result<Vec<String>, CapacityError> {
    let mut counts: Vec<(String, u32, Option<u32>)> = accounts
        .iter()
        .map(|a| {
            (
                a.clone(),
                held.get(a).copied().unwrap_or(0),
                capacity.get(a).copied().flatten(),
            )
        })
        .collect();
    let room: Option<u64> = counts.iter().try_fold(0u64, |sum, (_, n, cap)| {
        cap.map(|c| sum + u64::from(c.saturating_sub(*n)))
    });
    if let Some(room) = room {
        if room < u64::from(count) {
            let largest = counts
                .iter()
                .filter_map(|(_, _, c)| *c)
                .max()
                .unwrap_or(1)
                .max(1);
            let missing = u64::from(count) - room;
            return Err(CapacityError {
                accounts: accounts.to_vec(),
                capacity: room,
                wanted: count,
                accounts_needed: missing.div_ceil(u64::from(largest)),
            });
        }
    }
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let pick = counts
            .iter_mut()
            .filter(|(_, n, cap)| cap.is_none_or(|c| *n < c))
            .min_by_key(|(_, n, _)| *n)
            .expect("room was checked");
        pick.1 += 1;
        out.push(pick.0.clone());
    }
    Ok(out)
}
