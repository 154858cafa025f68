//! Container pieces shared by the install manifest and the injector.

use k8s_openapi::api::core::v1::{
    Capabilities, EnvVar, EnvVarSource, ObjectFieldSelector, SecurityContext,
};

/// An environment variable filled from the pod's own fields (downward API), e.g.
/// `metadata.name`.
pub fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The locked-down context of every container we run without privileges: no capability, no
/// privilege escalation, a read-only root filesystem, and (when given) a fixed non-root uid/gid.
pub fn restricted_security_context(uid_gid: Option<i64>) -> SecurityContext {
    SecurityContext {
        run_as_user: uid_gid,
        run_as_group: uid_gid,
        run_as_non_root: Some(true),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}
