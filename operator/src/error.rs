//! The operator's one error type. Each variant has a short label for the
//! `trellis_operator_reconcile_errors_total` metric.

use crate::ca::CaError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    #[error("invalid Mesh spec: {0}")]
    InvalidSpec(String),
    #[error("JSON encoding failed: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the Mesh CRD is not installed (apply manifests/operator.yaml first): {0}")]
    CrdMissing(kube::Error),
    #[error("object {0} has no name or namespace")]
    MissingObjectKey(&'static str),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Ca(_) => "ca",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Json(_) => "json",
            Error::CrdMissing(_) => "crd_missing",
            Error::MissingObjectKey(_) => "missing_key",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
