//! Names: the one place that spells a stream, subject, consumer or bucket name.

use crate::config::Reader;

/// Every name under `TARDIS_PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Names {
    prefix: Option<String>,
}

impl Names {
    pub fn read(r: &mut Reader<'_>) -> Self {
        let prefix = r.string("TARDIS_PREFIX");
        if let Some(p) = &prefix
            && !crate::config::is_valid_prefix(p)
        {
            r.problem(
                "TARDIS_PREFIX",
                format!("{p:?} may only hold letters, digits, '_' or '-' (at most 32)"),
                "for example TARDIS_PREFIX=staging",
            );
            return Self::default();
        }
        Self { prefix }
    }

    /// Names under `prefix` (tests use a random one per test).
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        Self {
            prefix: Some(prefix.into()),
        }
    }

    pub fn prefix(&self) -> Option<&str> {
        self.prefix.as_deref()
    }

    fn name(&self, base: &str) -> String {
        match &self.prefix {
            Some(p) => format!("{p}_{base}"),
            None => base.to_string(),
        }
    }

    fn subject(&self, rest: &str) -> String {
        match &self.prefix {
            Some(p) => format!("{p}.tardis.{rest}"),
            None => format!("tardis.{rest}"),
        }
    }

    pub fn stream(&self, kind: StreamKind) -> String {
        self.name(kind.base_name())
    }

    /// The wildcard subject a stream captures.
    pub fn stream_subjects(&self, kind: StreamKind) -> String {
        self.subject(&format!("{}.>", kind.subject_token()))
    }

    /// `tardis.records.<source>`.
    pub fn records_subject(&self, source: &str) -> String {
        self.subject(&format!("records.{source}"))
    }

    /// `tardis.enriched.<source>`.
    pub fn enriched_subject(&self, source: &str) -> String {
        self.subject(&format!("enriched.{source}"))
    }

    /// `tardis.dlq.<stage>.<source>`.
    pub fn dlq_subject(&self, stage: crate::messages::Stage, source: &str) -> String {
        self.subject(&format!("dlq.{}.{source}", stage.as_str()))
    }

    /// `tardis.runs.<source>`: fetch run reports.
    pub fn runs_subject(&self, source: &str) -> String {
        self.subject(&format!("runs.{source}"))
    }

    pub fn consumer(&self, kind: ConsumerKind) -> String {
        self.name(kind.base_name())
    }

    /// The key-value bucket holding per-source fetch cursors.
    pub fn fetch_state_bucket(&self) -> String {
        self.name("TARDIS_FETCH_STATE")
    }

    /// The key-value bucket holding the enricher fleet's shared LLM budget.
    pub fn llm_budget_bucket(&self) -> String {
        self.name("TARDIS_LLM_BUDGET")
    }

    /// The key-value bucket holding the fetchers' run leases (entries expire on the server).
    pub fn fetch_lease_bucket(&self) -> String {
        self.name("TARDIS_FETCH_LEASES")
    }

    /// The key-value bucket where running workers announce themselves (entries expire on the
    /// server): the replicas `writer status` reports.
    pub fn presence_bucket(&self) -> String {
        self.name("TARDIS_PRESENCE")
    }
}

/// The streams of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// Record chunks from the fetcher: `TARDIS_RECORDS`, `tardis.records.<source>`.
    Records,
    /// Enriched chunks from the enricher: `TARDIS_ENRICHED`, `tardis.enriched.<source>`.
    Enriched,
    /// Dead letters from any stage: `TARDIS_DLQ`, `tardis.dlq.<stage>.<source>`.
    DeadLetters,
    /// Fetch run reports: `TARDIS_RUNS`, `tardis.runs.<source>`.
    Runs,
}

impl StreamKind {
    pub const ALL: [StreamKind; 4] = [
        StreamKind::Records,
        StreamKind::Enriched,
        StreamKind::DeadLetters,
        StreamKind::Runs,
    ];

    fn base_name(self) -> &'static str {
        match self {
            StreamKind::Records => "TARDIS_RECORDS",
            StreamKind::Enriched => "TARDIS_ENRICHED",
            StreamKind::DeadLetters => "TARDIS_DLQ",
            StreamKind::Runs => "TARDIS_RUNS",
        }
    }

    fn subject_token(self) -> &'static str {
        match self {
            StreamKind::Records => "records",
            StreamKind::Enriched => "enriched",
            StreamKind::DeadLetters => "dlq",
            StreamKind::Runs => "runs",
        }
    }
}

/// The durable pull consumers of the pipeline, one per stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConsumerKind {
    /// `enricher` on the records stream.
    Enricher,
    /// `writer` on the enriched stream.
    Writer,
    /// `writer-dlq` on the dead-letter stream.
    WriterDlq,
    /// `writer-runs` on the runs stream.
    WriterRuns,
}

impl ConsumerKind {
    fn base_name(self) -> &'static str {
        match self {
            ConsumerKind::Enricher => "enricher",
            ConsumerKind::Writer => "writer",
            ConsumerKind::WriterDlq => "writer-dlq",
            ConsumerKind::WriterRuns => "writer-runs",
        }
    }

    pub fn stream(self) -> StreamKind {
        match self {
            ConsumerKind::Enricher => StreamKind::Records,
            ConsumerKind::Writer => StreamKind::Enriched,
            ConsumerKind::WriterDlq => StreamKind::DeadLetters,
            ConsumerKind::WriterRuns => StreamKind::Runs,
        }
    }
}
