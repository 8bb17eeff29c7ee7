//! The job id.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A job id: `[a-z0-9-]{1,63}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    /// Checks the id's characters and length.
    pub fn parse(text: &str) -> Result<Self, String> {
        if (1..=63).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            Ok(Self(text.to_owned()))
        } else {
            Err(format!(
                "{text:?} is not a job id: use 1-63 lower-case letters, digits and hyphens"
            ))
        }
    }

    /// A fresh random id.
    pub(crate) fn generate() -> Self {
        Self(format!("job-{}", uuid::Uuid::new_v4().simple()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for JobId {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> Self {
        id.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
