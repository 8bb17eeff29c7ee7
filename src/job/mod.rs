//! Jobs: the submitted spec (queue message, `submit --file`, `POST /v1/jobs`), its
//! validation against the configuration, ids and states.

mod decode;
mod id;
mod spec;
mod validate;

pub use decode::*;
pub use id::*;
pub use spec::*;
pub use validate::*;

/// Default destination container.
pub(crate) const DEFAULT_CONTAINER: &str = "vhd-replicas";
/// More nodes than any Batch pool can have.
pub(crate) const MAX_NODES: u32 = 100_000;
/// More replicas than one job may ask for.
pub(crate) const MAX_REPLICAS: u32 = 5_000;

/// Why a job was refused, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct JobError {
    /// The field, e.g. `pool.nodes`.
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl JobError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::{engine::general_purpose::STANDARD as B64, Engine as _};

    #[test]
    fn job_ids() {
        assert!(JobId::parse("render-2026-11-28").is_ok());
        assert!(JobId::parse("Render").is_err());
        assert!(JobId::parse("a_b").is_err());
        assert!(JobId::parse("").is_err());
        assert!(JobId::parse(&"a".repeat(64)).is_err());
        assert!(JobId::parse(JobId::generate().as_str()).is_ok());
    }

    const JOB: &str = r#"{"job_id":"j1","source":"http://x/a/b.vhd","pool":{"id":"render","os":"windows","nodes":200}}"#;

    fn replicate(text: &str) -> JobSpec {
        match Command::decode(text) {
            Command::Replicate(spec) => spec,
            other => panic!("not a job: {other:?}"),
        }
    }

    fn invalid(text: &str) -> InvalidMessage {
        match Command::decode(text) {
            Command::Invalid(m) => m,
            other => panic!("accepted: {other:?}"),
        }
    }

    #[test]
    fn messages_are_json_or_base64() {
        let a = replicate(JOB);
        let b = replicate(&B64.encode(JOB));
        assert_eq!(a, b);
        assert_eq!(a.pool.nodes, 200);
        assert_eq!(invalid("hello world").error.field, "message");
        assert_eq!(invalid("[1,2]").error.field, "message");
        assert_eq!(invalid(&B64.encode("[1]")).error.field, "message");
        let retire = Command::decode(r#"{"job_id":"r1","retire_pool":"p"}"#);
        assert_eq!(
            retire,
            Command::Retire(RetireSpec {
                job_id: Some("r1".into()),
                retire_pool: "p".into()
            })
        );
        assert_eq!(retire.job_id().unwrap().as_str(), "r1");
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse_job_json(r#"{"source":"s","pool":{"id":"p","os":"windows","nodes":-5}}"#)
            .unwrap_err();
        assert_eq!(e.field, "pool.nodes");
        let e = parse_job_json(r#"{"source":"s","pool":{"id":"p","os":"beos","nodes":5}}"#)
            .unwrap_err();
        assert_eq!(e.field, "pool.os");
        let e =
            parse_job_json(r#"{"source":"s","pool":{"id":"p","os":"linux","nodes":5},"colour":1}"#)
                .unwrap_err();
        assert!(e.message.contains("colour"), "{e}");
        let e = parse_job_json(r#"{"pool":{"id":"p","os":"linux","nodes":5}}"#).unwrap_err();
        assert!(e.message.contains("source"), "{e}");
        let e = parse_job_json(
            r#"{"source":"s","pool":{"id":"p","os":"linux","nodes":5,"caching":"all"}}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "pool.caching");
    }

    #[test]
    fn ids_and_fields_of_invalid_jobs_are_still_read() {
        let text = r#"{"job_id":"j9","source":"s","pool":{"id":"p","os":"linux"}}"#;
        for encoded in [text.to_owned(), B64.encode(text)] {
            let m = invalid(&encoded);
            assert_eq!(m.job_id.unwrap().as_str(), "j9");
            let Salvage::Replicate(spec) = m.salvage else {
                panic!("a job")
            };
            assert_eq!(
                (spec.pool.id.as_str(), spec.pool.os, spec.pool.nodes),
                ("p", Os::Linux, 0)
            );
        }
        assert!(invalid(r#"{"job_id":"Bad Id"}"#).job_id.is_none());
        let m = invalid(r#"{"job_id":"r2","retire_pool":"p","colour":1}"#);
        assert_eq!(m.salvage, Salvage::Retire("p".into()));
        assert!(m.error.message.contains("colour"));
    }

    #[test]
    fn replicas_round_up() {
        let l = crate::config::LimitSettings::default();
        assert_eq!(replicas_needed(Os::Windows, 200, &l), 10);
        assert_eq!(replicas_needed(Os::Windows, 90, &l), 5);
        assert_eq!(replicas_needed(Os::Linux, 41, &l), 2);
        assert_eq!(replicas_needed(Os::Linux, 40, &l), 1);
        assert_eq!(replicas_needed(Os::Windows, 1, &l), 1);
    }
}
