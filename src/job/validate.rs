//! Checking a job against the configuration: the source's account, the
//! pool's nodes and replicas, the Batch fields, defaults filled in.

use super::*;
use crate::azure::names::check_container_name;
use crate::config::ValidatedSettings;
use crate::storage::BlobPath;

/// Replicas a pool of `nodes` needs: one VHD per so many nodes of its OS.
pub(crate) fn replicas_needed(os: Os, nodes: u32, limits: &crate::config::LimitSettings) -> u32 {
    let per = match os {
        Os::Windows => limits.windows_nodes_per_vhd,
        Os::Linux => limits.linux_nodes_per_vhd,
    }
    .max(1);
    nodes.div_ceil(per)
}

/// Finds which configured account holds the blob at `url`.
pub fn locate_source(url: &str, settings: &ValidatedSettings) -> Result<BlobPath, JobError> {
    let parsed = url::Url::parse(url).map_err(|_| {
        JobError::new(
            "source",
            format!("{url:?} is not a URL; give the VHD's blob URL"),
        )
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(JobError::new(
            "source",
            "the source must be an http(s) blob URL",
        ));
    }
    if parsed.query().is_some() {
        return Err(JobError::new(
            "source",
            "the source URL must not carry a query or SAS; the daemon signs its own read access",
        ));
    }
    for account in &settings.accounts {
        let base = account.blob_endpoint.as_str().trim_end_matches('/');
        if let Some(rest) = url.strip_prefix(base).and_then(|r| r.strip_prefix('/')) {
            let (container, name) = rest.split_once('/').ok_or_else(|| {
                JobError::new("source", "the source URL must name a container and a blob")
            })?;
            if name.is_empty() {
                return Err(JobError::new("source", "the source URL must name a blob"));
            }
            let name =
                url::form_urlencoded::parse(format!("n={}", name.replace('+', "%2B")).as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
            return Ok(BlobPath::new(&account.name, container, &name));
        }
    }
    Err(JobError::new(
        "source",
        format!("{url} is not in any configured account; add its account to [[accounts]] (destination = false for a source-only account)"),
    ))
}

impl JobSpec {
    /// Checks the job against the configuration and fills in defaults; the
    /// first problem found is refused, naming its field.
    pub fn validate(&self, settings: &ValidatedSettings) -> Result<ValidatedJob, JobError> {
        let id = match &self.job_id {
            Some(id) => JobId::parse(id).map_err(|m| JobError::new("job_id", m))?,
            None => JobId::generate(),
        };
        let source = locate_source(&self.source, settings)?;
        self.pool.check()?;
        let publish = match (self.gallery, &settings.gallery) {
            (Some(true), None) => {
                return Err(JobError::new(
                    "gallery",
                    "true needs a [gallery] section in the configuration; remove it to hand off VHD URIs only",
                ))
            }
            (Some(false), _) | (None, None) => false,
            (_, Some(_)) => true,
        };
        let replicas = self.replicas_for(settings, publish)?;
        let accounts = self.accounts_for(settings)?;
        let capacity: std::collections::BTreeMap<String, Option<u32>> = accounts
            .iter()
            .map(|a| (a.clone(), settings.account(a).and_then(|c| c.max_replicas)))
            .collect();
        crate::placement::place_more(replicas, &accounts, &Default::default(), &capacity)
            .map_err(|e| JobError::new("replicas", e.to_string()))?;
        let container = self
            .container
            .clone()
            .unwrap_or_else(|| DEFAULT_CONTAINER.to_owned());
        check_container_name(&container).map_err(|m| JobError::new("container", m))?;
        if let Some(by) = &self.submitted_by {
            let fine = (1..=64).contains(&by.len())
                && by
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !fine {
                return Err(JobError::new(
                    "submitted_by",
                    format!("{by:?} is not 1-64 lower-case letters, digits and hyphens (e.g. \"watch\" or your tool's name)"),
                ));
            }
        }
        let (vm_size, node_agent_sku_id) = add_pool_fields(&self.pool, &settings.handoff)?;
        let mut spec = self.clone();
        spec.job_id = Some(id.to_string());
        Ok(ValidatedJob {
            id,
            spec,
            source,
            replicas,
            accounts,
            container,
            vm_size,
            node_agent_sku_id,
            publish,
        })
    }

    /// Replicas to make: the default for the nodes, or as many as asked if that
    /// serves them. A job that publishes to a gallery stages one VHD (the
    /// gallery makes the copies the nodes boot from), unless it asks for more.
    fn replicas_for(&self, settings: &ValidatedSettings, publish: bool) -> Result<u32, JobError> {
        let pool = &self.pool;
        let needed = if publish {
            1
        } else {
            replicas_needed(pool.os, pool.nodes, &settings.limits)
        };
        match self.replicas {
            None => Ok(needed),
            Some(0) => Err(JobError::new(
                "replicas",
                "must be at least 1; omit it to use the default",
            )),
            Some(r) if r > MAX_REPLICAS => Err(JobError::new(
                "replicas",
                format!("{r} is more than one job may make (at most {MAX_REPLICAS})"),
            )),
            Some(r) if r < needed => {
                let per = match pool.os {
                    Os::Windows => settings.limits.windows_nodes_per_vhd,
                    Os::Linux => settings.limits.linux_nodes_per_vhd,
                };
                Err(JobError::new(
                    "replicas",
                    format!(
                        "{r} replicas serve fewer than {} {} nodes (Batch allows {per} nodes per VHD); ask for at least {needed} or omit replicas",
                        pool.nodes, pool.os,
                    ),
                ))
            }
            Some(r) => Ok(r),
        }
    }

    /// Destination accounts: the job's (configured destinations, each once), or
    /// every destination account.
    fn accounts_for(&self, settings: &ValidatedSettings) -> Result<Vec<String>, JobError> {
        let Some(list) = &self.accounts else {
            return Ok(settings.destination_accounts());
        };
        if list.is_empty() {
            return Err(JobError::new(
                "accounts",
                "must name at least one account; omit it to use every destination account",
            ));
        }
        let mut out: Vec<String> = Vec::new();
        for (i, name) in list.iter().enumerate() {
            let field = format!("accounts[{i}]");
            match settings.account(name) {
                None => {
                    return Err(JobError::new(
                        &field,
                        format!("{name:?} is not a configured account"),
                    ))
                }
                Some(a) if !a.destination => {
                    return Err(JobError::new(
                        &field,
                        format!("{name:?} is not a destination account (destination = false)"),
                    ))
                }
                Some(_) if out.contains(name) => {
                    return Err(JobError::new(&field, format!("{name:?} is listed twice")))
                }
                Some(_) => out.push(name.clone()),
            }
        }
        Ok(out)
    }
}

impl PoolSpec {
    /// A Batch pool id, a node count Batch allows, no empty VM size.
    fn check(&self) -> Result<(), JobError> {
        if self.id.is_empty()
            || self.id.len() > 64
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(JobError::new(
                "pool.id",
                format!(
                    "{:?} is not a Batch pool id: 1-64 letters, digits, hyphens and underscores",
                    self.id
                ),
            ));
        }
        if self.nodes == 0 {
            return Err(JobError::new("pool.nodes", "must be at least 1"));
        }
        if self.nodes > MAX_NODES {
            return Err(JobError::new(
                "pool.nodes",
                format!(
                    "{} is more than any Batch pool holds (at most {MAX_NODES})",
                    self.nodes
                ),
            ));
        }
        if self
            .vm_size
            .as_deref()
            .is_some_and(|vm| vm.trim().is_empty())
        {
            return Err(JobError::new(
                "pool.vm_size",
                "must not be empty; omit it or name a VM size",
            ));
        }
        Ok(())
    }
}

/// `vmSize` and `nodeAgentSKUId`, which Batch's Add Pool requires: the job's,
/// else the configured defaults; a job that has neither is refused at submission
/// rather than handed off with a body Batch rejects.
fn add_pool_fields(
    pool: &PoolSpec,
    defaults: &crate::config::HandoffSettings,
) -> Result<(String, String), JobError> {
    let vm_size = non_empty(pool.vm_size.as_deref())
        .or_else(|| non_empty(Some(&defaults.vm_size)))
        .ok_or_else(|| {
            JobError::new(
                "pool.vm_size",
                "Batch's Add Pool requires vmSize: give pool.vm_size (e.g. \"STANDARD_D2_V3\") or set handoff.vm_size in the configuration",
            )
        })?;
    let (default_sku, key) = match pool.os {
        Os::Windows => (
            &defaults.windows_node_agent_sku_id,
            "handoff.windows_node_agent_sku_id",
        ),
        Os::Linux => (
            &defaults.linux_node_agent_sku_id,
            "handoff.linux_node_agent_sku_id",
        ),
    };
    let sku = non_empty(pool.node_agent_sku_id.as_deref())
        .or_else(|| non_empty(Some(default_sku)))
        .ok_or_else(|| {
            JobError::new(
                "pool.node_agent_sku_id",
                format!("Batch's Add Pool requires nodeAgentSKUId, which for {} depends on the image (e.g. \"batch.node.ubuntu 22.04\"): give pool.node_agent_sku_id or set {key} in the configuration", pool.os),
            )
        })?;
    Ok((vm_size.to_owned(), sku.to_owned()))
}

fn non_empty(v: Option<&str>) -> Option<&str> {
    v.map(str::trim).filter(|v| !v.is_empty())
}
