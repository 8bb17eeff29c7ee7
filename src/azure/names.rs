//! Azure's naming rules for storage accounts, containers and queues.

/// Storage account names: 3–24 lower-case letters and digits.
pub fn check_account_name(name: &str) -> Result<(), String> {
    if (3..=24).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a storage account name (3-24 lower-case letters and digits)"
        ))
    }
}

/// Container names: 3–63 of lower-case letters, digits and single hyphens, starting
/// and ending with a letter or digit.
pub fn check_container_name(name: &str) -> Result<(), String> {
    let ok = (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a container name (3-63 lower-case letters, digits and single hyphens, starting and ending with a letter or digit)"))
    }
}

/// Queue names follow the container rules.
pub fn check_queue_name(name: &str) -> Result<(), String> {
    check_container_name(name).map_err(|_| {
        format!("{name:?} is not a queue name (3-63 lower-case letters, digits and single hyphens, starting and ending with a letter or digit)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_rules() {
        assert!(check_account_name("dst1").is_ok());
        assert!(check_account_name("Dst1").is_err());
        assert!(check_account_name("ab").is_err());
        assert!(check_container_name("vhd-replicas").is_ok());
        assert!(check_container_name("vhd--replicas").is_err());
        assert!(check_container_name("-vhd").is_err());
        assert!(check_queue_name("Jobs").is_err());
    }
}
