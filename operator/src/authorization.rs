//! AuthorizationPolicy compilation with Istio's semantics: which policies apply to a workload,
//! and what each compiles to in the proxy's [`InboundAuthorization`]. Pure and table-tested;
//! [`spawn_reporter`] is the one part that talks to the cluster (it reports what is
//! unsupported as Kubernetes Events).
//!
//! Which policies apply (Istio's rules):
//! * in the root namespace (`Mesh.spec.rootNamespace`): without a selector to every workload of
//!   the mesh, with a selector to the matching workloads of every namespace;
//! * in another namespace: without a selector (or with an empty one) to every workload of that
//!   namespace, with a selector to its workloads carrying every selector label.
//!
//! What cannot be enforced is never silently ignored: it is reported (a `Warning` Event with
//! reason `Unsupported` on the policy, and an operator log line) and resolved like Istio
//! resolves what it cannot generate, towards the safe side of the action:
//! * `targetRef`/`targetRefs`: the policy is for a gateway, waypoint or Service, not for
//!   sidecars; Istio does not apply it to sidecars, and neither does Trellis.
//! * An action this version does not know: the policy is left out.
//! * CUSTOM naming a provider the `Mesh` does not define (validly) in
//!   `spec.extensionProviders`: like Istio with an invalid provider, it becomes a DENY of what
//!   its rules match (Istio names those rules `deny-due-to-bad-CUSTOM-action`), so it fails
//!   closed. With a known provider it reaches the proxy with the provider attached
//!   ([`CustomPolicy`]); a workload may have CUSTOM policies of several providers, and a
//!   request is checked with each provider whose policy it matches, as Istio does since it
//!   allows several providers per workload.
//! * An unsupported field or value in a rule (`request.auth.*` keys other than `principal`,
//!   `audiences`, `presenter` and `claims[<name>]…`, `serviceAccounts`,
//!   `experimental.envoy.filters.*`, unknown `when` keys, path templates, a `*` inside a value,
//!   unparsable IPs or ports): in an ALLOW policy the whole rule never matches (a smaller
//!   allow); in a DENY, AUDIT or CUSTOM policy the condition is dropped, so the rule matches on
//!   its other conditions (a wider deny). Where Istio drops only the bad entry of a `values`
//!   list (which narrows the match), Trellis drops the whole list, so a DENY never shrinks.
//! * `destination.ip` is always the workload's own address, so it is decided here from the
//!   pod's IPs; while the pod's IPs are unknown it is resolved like an unsupported condition.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Client, Resource};
use tokio::sync::watch;
use tracing::warn;
use trellis_api::AuthorizationPolicy;
use trellis_api::security::{
    AuthorizationAction, AuthorizationCondition, AuthorizationOperation, AuthorizationRule,
    AuthorizationSource,
};
use trellis_config::authz::{
    Action, Condition, CustomPolicy, InboundAuthorization, IpBlock, Operation, Policy, Rule,
    Source, StringMatch, Values,
};
use trellis_config::ext_authz::ExtAuthzProvider;
use trellis_config::wellknown::OPERATOR_NAME;

/// Event reason for everything a policy asks that Trellis cannot enforce as written.
pub const UNSUPPORTED_REASON: &str = "Unsupported";

/// The workload a proxy serves, as far as AuthorizationPolicy is concerned.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Workload {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// The pod's IPs (`destination.ip`); `None` while unknown.
    pub addresses: Option<Vec<IpAddr>>,
}

impl Workload {
    /// The pod's namespace, labels and IPs; only the namespace while discovery lacks the pod
    /// (then selector policies cannot apply yet, and `destination.ip` is unknown).
    pub fn of(namespace: &str, pod: Option<&Pod>) -> Self {
        let addresses = pod
            .map(crate::stream_access::pod_ips)
            .filter(|ips| !ips.is_empty());
        Self {
            namespace: namespace.to_owned(),
            labels: pod
                .and_then(|pod| pod.metadata.labels.clone())
                .unwrap_or_default(),
            addresses,
        }
    }
}

/// Whether `policy` applies to `workload` (see the module doc).
pub fn applies_to(policy: &AuthorizationPolicy, root_namespace: &str, workload: &Workload) -> bool {
    selects(
        policy.metadata.namespace.as_deref(),
        policy.spec.workload_labels(),
        root_namespace,
        workload,
    )
}

/// Istio's selection of a security policy in `namespace` with the selector `labels` (`None`:
/// namespace- or mesh-wide), shared by AuthorizationPolicy and RequestAuthentication (see the
/// module doc).
pub fn selects(
    namespace: Option<&str>,
    labels: Option<&BTreeMap<String, String>>,
    root_namespace: &str,
    workload: &Workload,
) -> bool {
    let Some(namespace) = namespace else {
        return false;
    };
    if namespace != root_namespace && namespace != workload.namespace {
        return false;
    }
    labels.is_none_or(|selector| {
        selector
            .iter()
            .all(|(key, value)| workload.labels.get(key) == Some(value))
    })
}

/// The compiled policies of `workload`: those of `policies` that apply, in a stable order
/// (namespace, then name), so equal inputs give equal snapshots.
pub fn for_workload<'a>(
    policies: impl IntoIterator<Item = &'a AuthorizationPolicy>,
    root_namespace: &str,
    workload: &Workload,
    providers: &BTreeMap<String, ExtAuthzProvider>,
) -> InboundAuthorization {
    let mut applicable: Vec<&AuthorizationPolicy> = policies
        .into_iter()
        .filter(|policy| applies_to(policy, root_namespace, workload))
        .collect();
    applicable.sort_by_key(|policy| policy_name(policy));
    let mut compiled = InboundAuthorization::default();
    for source in applicable {
        let Some((action, policy)) = compile(source, workload.addresses.as_deref()).policy else {
            continue;
        };
        match action {
            Action::Deny => compiled.deny.push(policy),
            Action::Audit => compiled.audit.push(policy),
            Action::Allow => compiled.allow.push(policy),
            Action::Custom => match providers.get(&source.spec.provider.name) {
                Some(provider) => compiled.custom.push(CustomPolicy {
                    policy,
                    provider: provider.clone(),
                }),
                None => compiled.deny.push(policy),
            },
        }
    }
    compiled
}

/// `<namespace>.<name>`, the name a proxy reports for a policy.
pub fn policy_name(policy: &AuthorizationPolicy) -> String {
    format!(
        "{}.{}",
        policy.metadata.namespace.as_deref().unwrap_or_default(),
        policy.metadata.name.as_deref().unwrap_or_default()
    )
}

/// One policy compiled, with what could not be compiled as written.
#[derive(Debug, Default, PartialEq)]
pub struct Compiled {
    /// `None`: the policy is left out (targetRef, unknown action).
    pub policy: Option<(Action, Policy)>,
    /// What is unsupported, one sentence each (reported, see the module doc).
    pub issues: Vec<String>,
}

/// Compiles one policy. `addresses` are the workload's IPs, for `destination.ip`.
pub fn compile(policy: &AuthorizationPolicy, addresses: Option<&[IpAddr]>) -> Compiled {
    let spec = &policy.spec;
    if spec.has_target_ref() {
        return Compiled {
            policy: None,
            issues: vec![
                "targetRef/targetRefs attach a policy to a gateway, waypoint or Service; \
                 Trellis sidecars apply only selector policies, so this policy is ignored"
                    .to_owned(),
            ],
        };
    }
    let mut issues = Vec::new();
    let action = match spec.action {
        AuthorizationAction::Allow => Action::Allow,
        AuthorizationAction::Deny => Action::Deny,
        AuthorizationAction::Audit => Action::Audit,
        AuthorizationAction::Custom => Action::Custom,
        AuthorizationAction::Unknown => {
            return Compiled {
                policy: None,
                issues: vec!["unknown action; the policy is ignored".to_owned()],
            };
        }
    };
    let mut rules = Vec::new();
    for (index, rule) in spec.rules.iter().enumerate() {
        let mut compiler = RuleCompiler {
            action,
            addresses,
            index,
            issues: &mut issues,
            fails: false,
        };
        if let Some(rule) = compiler.rule(rule)
            && !compiler.fails
        {
            rules.push(rule);
        }
    }
    Compiled {
        policy: Some((
            action,
            Policy {
                name: policy_name(policy),
                rules,
            },
        )),
        issues,
    }
}

/// Compiles one rule; `fails` turns true when an ALLOW rule meets something unsupported.
struct RuleCompiler<'a> {
    action: Action,
    addresses: Option<&'a [IpAddr]>,
    index: usize,
    issues: &'a mut Vec<String>,
    fails: bool,
}

/// A `values`/`notValues` pair after checking every entry.
struct Checked<T> {
    values: Vec<T>,
    not_values: Vec<T>,
}

impl RuleCompiler<'_> {
    /// Records an unsupported condition and resolves it: an ALLOW rule fails, a DENY or AUDIT
    /// rule goes on without it.
    fn unsupported(&mut self, what: impl AsRef<str>, report: bool) {
        if report {
            let consequence = if self.action == Action::Allow {
                "this ALLOW rule never matches"
            } else {
                "the condition is dropped from this rule, which matches more widely"
            };
            self.issues.push(format!(
                "rules[{}]: {}: {consequence}",
                self.index,
                what.as_ref()
            ));
        }
        if self.action == Action::Allow {
            self.fails = true;
        }
    }

    /// `None`: the rule can never match (a `destination.ip` that is not the workload's).
    fn rule(&mut self, rule: &AuthorizationRule) -> Option<Rule> {
        let from = rule.from.iter().map(|f| self.source(&f.source)).collect();
        let to = rule
            .to
            .iter()
            .map(|t| self.operation(&t.operation))
            .collect();
        let mut when = Vec::new();
        for condition in &rule.when {
            match self.condition(condition) {
                Resolved::Condition(c) => when.push(c),
                Resolved::Always => {}
                Resolved::Never => return None,
            }
        }
        Some(Rule { from, to, when })
    }

    fn source(&mut self, source: &AuthorizationSource) -> Source {
        for (field, values) in [
            ("serviceAccounts", &source.service_accounts),
            ("notServiceAccounts", &source.not_service_accounts),
        ] {
            if !values.is_empty() {
                self.unsupported(
                    format!("source.{field} is not supported; use principals"),
                    true,
                );
            }
        }
        let principals = self.strings(
            "source.principals",
            &source.principals,
            &source.not_principals,
        );
        let request_principals = self.strings(
            "source.requestPrincipals",
            &source.request_principals,
            &source.not_request_principals,
        );
        let namespaces = self.strings(
            "source.namespaces",
            &source.namespaces,
            &source.not_namespaces,
        );
        let ips = self.ip_blocks("source.ipBlocks", &source.ip_blocks, &source.not_ip_blocks);
        let remote = self.ip_blocks(
            "source.remoteIpBlocks",
            &source.remote_ip_blocks,
            &source.not_remote_ip_blocks,
        );
        Source {
            principals: principals.values,
            not_principals: principals.not_values,
            request_principals: request_principals.values,
            not_request_principals: request_principals.not_values,
            namespaces: namespaces.values,
            not_namespaces: namespaces.not_values,
            ip_blocks: ips.values,
            not_ip_blocks: ips.not_values,
            remote_ip_blocks: remote.values,
            not_remote_ip_blocks: remote.not_values,
        }
    }

    fn operation(&mut self, operation: &AuthorizationOperation) -> Operation {
        let hosts = self.strings("operation.hosts", &operation.hosts, &operation.not_hosts);
        let methods = self.strings(
            "operation.methods",
            &operation.methods,
            &operation.not_methods,
        );
        let paths = self.paths(&operation.paths, &operation.not_paths);
        let ports = self.ports("operation.ports", &operation.ports, &operation.not_ports);
        Operation {
            hosts: hosts.values,
            not_hosts: hosts.not_values,
            ports: ports.values,
            not_ports: ports.not_values,
            methods: methods.values,
            not_methods: methods.not_values,
            paths: paths.values,
            not_paths: paths.not_values,
        }
    }

    fn condition(&mut self, condition: &AuthorizationCondition) -> Resolved {
        let key = condition.key.as_str();
        let (values, not_values) = (&condition.values, &condition.not_values);
        let field = format!("when {key:?}");
        let strings = |compiler: &mut Self| {
            let checked = compiler.strings(&field, values, not_values);
            Values {
                values: checked.values,
                not_values: checked.not_values,
            }
        };
        let resolved = match key {
            "source.ip" => {
                let checked = self.ip_blocks(&field, values, not_values);
                Condition::SourceIp(Values {
                    values: checked.values,
                    not_values: checked.not_values,
                })
            }
            "remote.ip" => {
                let checked = self.ip_blocks(&field, values, not_values);
                Condition::RemoteIp(Values {
                    values: checked.values,
                    not_values: checked.not_values,
                })
            }
            "source.namespace" => Condition::SourceNamespace(strings(self)),
            "source.principal" => Condition::SourcePrincipal(strings(self)),
            "connection.sni" => Condition::ConnectionSni(strings(self)),
            "request.auth.principal" => Condition::RequestAuthPrincipal(strings(self)),
            "request.auth.audiences" => Condition::RequestAuthAudiences(strings(self)),
            "request.auth.presenter" => Condition::RequestAuthPresenter(strings(self)),
            "destination.port" => {
                let checked = self.ports(&field, values, not_values);
                Condition::DestinationPort(Values {
                    values: checked.values,
                    not_values: checked.not_values,
                })
            }
            "destination.ip" => return self.destination_ip(&field, values, not_values),
            _ => {
                if let Some(name) = header_name(key) {
                    Condition::RequestHeader {
                        name,
                        values: strings(self),
                    }
                } else if let Some(claim) = claim_path(key) {
                    Condition::RequestAuthClaim {
                        claim,
                        values: strings(self),
                    }
                } else {
                    let why = if key.starts_with("request.headers[") {
                        "does not name a valid header (request.headers[<name>])"
                    } else if key.starts_with("request.auth.claims") {
                        "does not name a claim (request.auth.claims[<name>], nested [<a>][<b>])"
                    } else if key.starts_with("experimental.envoy.filters.") {
                        "reads Envoy filter metadata, which Trellis does not have"
                    } else {
                        "is not a known attribute"
                    };
                    self.unsupported(format!("{field} {why}"), true);
                    return Resolved::Always;
                }
            }
        };
        Resolved::Condition(resolved)
    }

    /// `destination.ip` is the workload's own address: decided now.
    fn destination_ip(
        &mut self,
        field: &str,
        values: &[String],
        not_values: &[String],
    ) -> Resolved {
        let checked = self.ip_blocks(field, values, not_values);
        let Some(addresses) = self.addresses.filter(|a| !a.is_empty()) else {
            // Not known yet (the pod has no IP): not a user error, so not reported.
            self.unsupported(
                format!("{field}: the workload's address is not known yet"),
                false,
            );
            return Resolved::Always;
        };
        let within = |blocks: &[IpBlock]| {
            addresses
                .iter()
                .any(|a| blocks.iter().any(|b| b.contains(*a)))
        };
        let matches =
            (checked.values.is_empty() || within(&checked.values)) && !within(&checked.not_values);
        if matches {
            Resolved::Always
        } else {
            Resolved::Never
        }
    }

    /// Istio's string syntax; a `*` inside a value means nothing to Istio and is unsupported.
    fn strings(
        &mut self,
        field: &str,
        values: &[String],
        not_values: &[String],
    ) -> Checked<StringMatch> {
        self.check(field, values, not_values, |text| {
            let inner = text.strip_prefix('*').unwrap_or(text);
            let inner = inner.strip_suffix('*').unwrap_or(inner);
            if text != "*" && inner.contains('*') {
                Err(format!(
                    "{text:?} has a '*' that is neither leading nor trailing"
                ))
            } else {
                Ok(StringMatch::parse(text))
            }
        })
    }

    /// Paths use the string syntax; Istio's path templates (`{*}`, `{**}`) are unsupported.
    fn paths(&mut self, values: &[String], not_values: &[String]) -> Checked<StringMatch> {
        let is_template = |value: &String| value.contains('{');
        let values: &[String] = if values.iter().any(is_template) {
            self.unsupported(
                "operation.paths: path templates ({*}, {**}) are not supported",
                true,
            );
            &[]
        } else {
            values
        };
        if not_values.iter().any(is_template) {
            self.unsupported(
                "operation.notPaths: path templates ({*}, {**}) are not supported",
                true,
            );
        }
        let not_values: Vec<String> = not_values
            .iter()
            .filter(|value| !is_template(value))
            .cloned()
            .collect();
        self.strings("operation.paths", values, &not_values)
    }

    fn ip_blocks(
        &mut self,
        field: &str,
        values: &[String],
        not_values: &[String],
    ) -> Checked<IpBlock> {
        self.check(field, values, not_values, |text| {
            text.parse::<IpBlock>().map_err(|e| e.to_string())
        })
    }

    fn ports(&mut self, field: &str, values: &[String], not_values: &[String]) -> Checked<u16> {
        self.check(field, values, not_values, |text| {
            text.trim()
                .parse::<u16>()
                .map_err(|_| format!("{text:?} is not a port number (0-65535)"))
        })
    }

    /// Parses every entry. A bad entry in `values` drops the whole list in a DENY or AUDIT rule
    /// (never narrowing it) and fails an ALLOW rule; a bad entry in `notValues` is dropped.
    fn check<T>(
        &mut self,
        field: &str,
        values: &[String],
        not_values: &[String],
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Checked<T> {
        let mut parsed_values = Vec::new();
        let mut bad_value = false;
        for value in values {
            match parse(value) {
                Ok(parsed) => parsed_values.push(parsed),
                Err(why) => {
                    bad_value = true;
                    self.unsupported(format!("{field}: {why}"), true);
                }
            }
        }
        if bad_value {
            parsed_values.clear();
        }
        let mut parsed_not_values = Vec::new();
        for value in not_values {
            match parse(value) {
                Ok(parsed) => parsed_not_values.push(parsed),
                Err(why) => self.unsupported(format!("{field} (not): {why}"), true),
            }
        }
        Checked {
            values: parsed_values,
            not_values: parsed_not_values,
        }
    }
}

/// A `when` condition after compiling.
enum Resolved {
    Condition(Condition),
    /// Always true for this workload (or dropped): no condition.
    Always,
    /// Never true for this workload: the rule can never match.
    Never,
}

/// `request.headers[Name]` → `name` (header names are case-insensitive and travel lowercase).
/// The claim path of `request.auth.claims[<a>][<b>]…` (one name at least, none empty).
fn claim_path(key: &str) -> Option<Vec<String>> {
    let mut rest = key.strip_prefix("request.auth.claims")?;
    let mut path = Vec::new();
    while !rest.is_empty() {
        let (name, after) = rest.strip_prefix('[')?.split_once(']')?;
        if name.is_empty() || name.contains('[') {
            return None;
        }
        path.push(name.to_owned());
        rest = after;
    }
    (!path.is_empty()).then_some(path)
}

fn header_name(key: &str) -> Option<String> {
    let name = key.strip_prefix("request.headers[")?.strip_suffix(']')?;
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    valid.then(|| name.to_ascii_lowercase())
}

/// What a policy asks that Trellis cannot enforce as written, independent of the workload.
pub fn issues(policy: &AuthorizationPolicy) -> Vec<String> {
    // With an address every `destination.ip` is decidable, so only real issues remain.
    compile(policy, Some(&[IpAddr::from([0, 0, 0, 0])])).issues
}

/// Reports unsupported parts of AuthorizationPolicies as they appear or change (once per
/// resourceVersion): a `Warning` Event with reason [`UNSUPPORTED_REASON`] on the policy and a
/// log line. Runs until the process ends; every replica reports what it sees.
pub fn spawn_reporter(
    client: Client,
    pod_name: Option<String>,
    policies: Store<AuthorizationPolicy>,
    mut changes: watch::Receiver<u64>,
) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: OPERATOR_NAME.to_owned(),
            instance: pod_name,
        },
    );
    tokio::spawn(async move {
        let mut reported: BTreeMap<String, String> = BTreeMap::new();
        loop {
            changes.borrow_and_update();
            let mut seen = BTreeMap::new();
            for policy in policies.state() {
                let key = policy_name(&policy);
                let version = policy.metadata.resource_version.clone().unwrap_or_default();
                if reported.get(&key) != Some(&version) {
                    report(&recorder, &policy).await;
                }
                seen.insert(key, version);
            }
            reported = seen;
            if changes.changed().await.is_err() {
                return;
            }
        }
    });
}

async fn report(recorder: &Recorder, policy: &Arc<AuthorizationPolicy>) {
    let issues = issues(policy);
    if issues.is_empty() {
        return;
    }
    let name = policy_name(policy);
    for issue in &issues {
        warn!(policy = %name, "AuthorizationPolicy: {issue}");
    }
    let event = Event {
        type_: EventType::Warning,
        reason: UNSUPPORTED_REASON.to_owned(),
        note: Some(event_note(&issues)),
        action: "Compile".to_owned(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &policy.object_ref(&())).await {
        warn!(policy = %name, error = %e, "could not publish the Unsupported event");
    }
}

/// Events carry at most 1 KiB of note.
fn event_note(issues: &[String]) -> String {
    const MAX: usize = 1024;
    let note = issues.join("; ");
    if note.len() <= MAX {
        return note;
    }
    let mut end = MAX - 3;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `Mesh.spec.rootNamespace`'s default.
    const ROOT: &str = trellis_api::mesh::DEFAULT_ROOT_NAMESPACE;

    fn policy(namespace: &str, name: &str, spec: serde_json::Value) -> AuthorizationPolicy {
        serde_json::from_value(json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }))
        .unwrap()
    }

    fn workload(namespace: &str, app: &str) -> Workload {
        Workload {
            namespace: namespace.into(),
            labels: BTreeMap::from([("app".into(), app.into()), ("tier".into(), "web".into())]),
            addresses: Some(vec!["10.0.0.5".parse().unwrap()]),
        }
    }

    #[test]
    fn which_policies_apply_follows_istio() {
        let selector = |app: &str| json!({"selector": {"matchLabels": {"app": app}}});
        let table = [
            (policy(ROOT, "mesh", json!({})), true),
            (policy(ROOT, "mesh-selected", selector("web")), true),
            (policy(ROOT, "mesh-other", selector("db")), false),
            (
                policy("trellis-system", "operator-namespace", json!({})),
                false,
            ),
            (policy("demo", "ns", json!({})), true),
            (
                policy("demo", "ns-empty-selector", json!({"selector": {}})),
                true,
            ),
            (policy("demo", "selected", selector("web")), true),
            (policy("demo", "other-app", selector("db")), false),
            (
                policy(
                    "demo",
                    "two-labels",
                    json!({"selector": {"matchLabels": {"app": "web", "tier": "db"}}}),
                ),
                false,
            ),
            (policy("other", "other-ns", json!({})), false),
            (policy("other", "other-ns-selected", selector("web")), false),
        ];
        let web = workload("demo", "web");
        for (policy, expected) in &table {
            assert_eq!(
                applies_to(policy, ROOT, &web),
                *expected,
                "{}",
                policy_name(policy)
            );
        }
        let applied = for_workload(table.iter().map(|(p, _)| p), ROOT, &web, &BTreeMap::new());
        let names: Vec<_> = applied.allow.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "demo.ns",
                "demo.ns-empty-selector",
                "demo.selected",
                "istio-system.mesh",
                "istio-system.mesh-selected"
            ],
            "sorted by namespace and name"
        );
    }

    #[test]
    fn actions_split_and_compile_their_rules() {
        let policies = [
            policy(
                "demo",
                "deny",
                json!({"action": "DENY", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/bad"]}}]}]}),
            ),
            policy("demo", "audit", json!({"action": "AUDIT", "rules": [{}]})),
            policy(
                "demo",
                "allow",
                json!({"rules": [{
                    "from": [{"source": {"namespaces": ["demo", "prod-*"], "notIpBlocks": ["10.9.0.0/16"]}}],
                    "to": [{"operation": {"methods": ["GET"], "paths": ["/api/*", "*.png"], "ports": ["8080"], "hosts": ["*"]}}],
                    "when": [
                        {"key": "request.headers[X-User]", "values": ["alice"]},
                        {"key": "source.ip", "notValues": ["10.1.2.3"]},
                        {"key": "destination.port", "values": ["8080"]},
                        {"key": "connection.sni", "values": ["*.svc.cluster.local"]},
                        {"key": "source.principal", "values": ["*"]},
                        {"key": "source.namespace", "notValues": ["kube-system"]},
                        {"key": "remote.ip", "values": ["10.0.0.0/8"]}
                    ]
                }]}),
            ),
            policy("demo", "deny-all", json!({"action": "DENY", "rules": [{}]})),
            policy("demo", "allow-nothing", json!({})),
        ];
        let compiled = for_workload(&policies, ROOT, &workload("demo", "web"), &BTreeMap::new());
        compiled.validate().unwrap();
        let expected: InboundAuthorization = serde_json::from_value(json!({
            "deny": [
                {"name": "demo.deny", "rules": [{"from": [{"principals": [{"exact": "cluster.local/ns/demo/sa/bad"}]}]}]},
                {"name": "demo.deny-all", "rules": [{}]}
            ],
            "audit": [{"name": "demo.audit", "rules": [{}]}],
            "allow": [
                {"name": "demo.allow", "rules": [{
                    "from": [{"namespaces": [{"exact": "demo"}, {"prefix": "prod-"}], "notIpBlocks": ["10.9.0.0/16"]}],
                    "to": [{"methods": [{"exact": "GET"}], "paths": [{"prefix": "/api/"}, {"suffix": ".png"}], "ports": [8080], "hosts": ["presence"]}],
                    "when": [
                        {"key": "requestHeader", "name": "x-user", "values": [{"exact": "alice"}]},
                        {"key": "sourceIp", "notValues": ["10.1.2.3/32"]},
                        {"key": "destinationPort", "values": [8080]},
                        {"key": "connectionSni", "values": [{"suffix": ".svc.cluster.local"}]},
                        {"key": "sourcePrincipal", "values": ["presence"]},
                        {"key": "sourceNamespace", "notValues": [{"exact": "kube-system"}]},
                        {"key": "remoteIp", "values": ["10.0.0.0/8"]}
                    ]
                }]},
                {"name": "demo.allow-nothing", "rules": []}
            ]
        }))
        .unwrap();
        assert_eq!(compiled, expected);
        for policy in &policies {
            assert_eq!(
                issues(policy),
                Vec::<String>::new(),
                "{}",
                policy_name(policy)
            );
        }
    }

    #[test]
    fn request_principals_and_request_auth_conditions_compile_as_istio_writes_them() {
        let compiled = compile(
            &policy(
                "shop",
                "jwt",
                json!({"rules": [{
                "from": [{"source": {"requestPrincipals": ["issuer-foo/*"],
                                     "notRequestPrincipals": ["issuer-foo/mallory"]}}],
                "when": [
                    {"key": "request.auth.principal", "values": ["issuer-foo/alice"]},
                    {"key": "request.auth.audiences", "values": ["web"]},
                    {"key": "request.auth.presenter", "notValues": ["*-test"]},
                    {"key": "request.auth.claims[groups]", "values": ["admin"]},
                    {"key": "request.auth.claims[org][role]", "values": ["owner*"]},
                ]}]}),
            ),
            None,
        );
        assert_eq!(compiled.issues, Vec::<String>::new());
        let (action, policy) = compiled.policy.unwrap();
        assert_eq!(action, Action::Allow);
        assert_eq!(
            serde_json::to_value(&policy.rules).unwrap(),
            json!([{
                "from": [{"requestPrincipals": [{"prefix": "issuer-foo/"}],
                          "notRequestPrincipals": [{"exact": "issuer-foo/mallory"}]}],
                "when": [
                    {"key": "requestAuthPrincipal", "values": [{"exact": "issuer-foo/alice"}]},
                    {"key": "requestAuthAudiences", "values": [{"exact": "web"}]},
                    {"key": "requestAuthPresenter", "notValues": [{"suffix": "-test"}]},
                    {"key": "requestAuthClaim", "claim": ["groups"], "values": [{"exact": "admin"}]},
                    {"key": "requestAuthClaim", "claim": ["org", "role"],
                     "values": [{"prefix": "owner"}]},
                ]
            }])
        );
        for key in [
            "request.auth.claims",
            "request.auth.claims[a]b",
            "request.auth.claims[a][]",
            "request.auth.claims[[a]]",
        ] {
            assert_eq!(claim_path(key), None, "{key}");
        }
    }

    #[test]
    fn unsupported_parts_fail_allow_rules_and_widen_deny_rules() {
        // (rule, compiled ALLOW rules, compiled DENY rules, words the issue must contain)
        let table = [
            (
                json!({"from": [{"source": {"requestPrincipals": ["iss/*a*b"], "namespaces": ["a"]}}]}),
                json!([]),
                json!([{"from": [{"namespaces": [{"exact": "a"}]}]}]),
                "source.requestPrincipals",
            ),
            (
                json!({"from": [{"source": {"serviceAccounts": ["demo/web"]}}]}),
                json!([]),
                json!([{"from": [{}]}]),
                "serviceAccounts",
            ),
            (
                json!({"to": [{"operation": {"ports": ["80"]}}], "when": [{"key": "request.auth.claims[]", "values": ["x"]}]}),
                json!([]),
                json!([{"to": [{"ports": [80]}]}]),
                "request.auth.claims[]",
            ),
            (
                json!({"when": [{"key": "experimental.envoy.filters.a[b]", "values": ["x"]}]}),
                json!([]),
                json!([{}]),
                "Envoy",
            ),
            (
                json!({"when": [{"key": "source.color", "values": ["red"]}]}),
                json!([]),
                json!([{}]),
                "not a known attribute",
            ),
            (
                json!({"when": [{"key": "request.headers[x user]", "values": ["a"]}]}),
                json!([]),
                json!([{}]),
                "valid header",
            ),
            (
                json!({"to": [{"operation": {"paths": ["/a", "/api/{*}/x"]}}]}),
                json!([]),
                json!([{"to": [{}]}]),
                "path templates",
            ),
            (
                json!({"to": [{"operation": {"paths": ["/a/*/b", "/c"]}}]}),
                json!([]),
                json!([{"to": [{}]}]),
                "neither leading nor trailing",
            ),
            (
                json!({"to": [{"operation": {"ports": ["http", "80"]}}]}),
                json!([]),
                json!([{"to": [{}]}]),
                "not a port number",
            ),
            (
                json!({"from": [{"source": {"notIpBlocks": ["10.0.0.0/8", "bogus"]}}]}),
                json!([]),
                json!([{"from": [{"notIpBlocks": ["10.0.0.0/8"]}]}]),
                "bogus",
            ),
        ];
        for (rule, allow_rules, deny_rules, words) in table {
            for (action, expected) in [("ALLOW", &allow_rules), ("DENY", &deny_rules)] {
                let p = policy(
                    "demo",
                    "p",
                    json!({"action": action, "rules": [rule.clone()]}),
                );
                let compiled = compile(&p, Some(&["10.0.0.5".parse().unwrap()]));
                let (_, policy) = compiled.policy.expect("the policy is kept");
                assert_eq!(
                    serde_json::to_value(&policy.rules).unwrap(),
                    *expected,
                    "{action} {rule}"
                );
                let text = compiled.issues.join(" | ");
                assert!(text.contains(words), "{action} {rule}: {text}");
                let consequence = if action == "ALLOW" {
                    "never matches"
                } else {
                    "dropped"
                };
                assert!(text.contains(consequence), "{action} {rule}: {text}");
            }
        }
    }

    #[test]
    fn custom_gets_its_provider_or_fails_closed_and_target_refs_and_unknown_actions_are_left_out() {
        let custom = policy(
            "demo",
            "ext",
            json!({"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}),
        );
        let compiled = compile(&custom, None);
        let (action, policy) = compiled.policy.unwrap();
        assert_eq!(action, Action::Custom);
        assert_eq!(compiled.issues, Vec::<String>::new());
        assert_eq!(
            policy.rules[0].to[0].paths,
            [StringMatch::Prefix("/admin".into())]
        );
        let opa: ExtAuthzProvider = serde_json::from_value(json!({
            "name": "opa", "host": "opa.authz.svc.cluster.local", "port": 9191,
            "timeoutMs": 1000, "failOpen": false, "statusOnError": 403, "protocol": {"kind": "grpc"}
        }))
        .unwrap();
        let web = workload("demo", "web");
        let known = for_workload(
            [&custom],
            ROOT,
            &web,
            &BTreeMap::from([("opa".to_owned(), opa.clone())]),
        );
        assert_eq!(
            known.custom,
            [CustomPolicy {
                policy: policy.clone(),
                provider: opa
            }]
        );
        assert!(known.deny.is_empty());
        // Istio's `deny-due-to-bad-CUSTOM-action`: an unknown provider denies what it matches.
        let unknown = for_workload([&custom], ROOT, &web, &BTreeMap::new());
        assert_eq!(unknown.deny, [policy]);
        assert!(unknown.custom.is_empty());

        for spec in [
            json!({"targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "gw"}, "action": "DENY", "rules": [{}]}),
            json!({"targetRefs": [{"kind": "Service", "group": "", "name": "web"}], "rules": [{}]}),
        ] {
            let targeted = compile(&policy_with(spec.clone()), None);
            assert_eq!(targeted.policy, None, "{spec}");
            assert!(
                targeted.issues[0].contains("targetRef"),
                "{:?}",
                targeted.issues
            );
        }
        let unknown = compile(
            &policy_with(json!({"action": "REWRITE", "rules": [{}]})),
            None,
        );
        assert_eq!(unknown.policy, None);
        assert!(unknown.issues[0].contains("unknown action"));
        assert_eq!(
            for_workload(
                [&policy_with(json!({"action": "REWRITE"}))],
                ROOT,
                &workload("demo", "web"),
                &BTreeMap::new()
            ),
            InboundAuthorization::default()
        );
    }

    fn policy_with(spec: serde_json::Value) -> AuthorizationPolicy {
        policy("demo", "p", spec)
    }

    #[test]
    fn destination_ip_is_decided_from_the_workloads_addresses() {
        let pod: &[IpAddr] = &["10.0.0.5".parse().unwrap()];
        let table = [
            (
                json!({"key": "destination.ip", "values": ["10.0.0.0/24"]}),
                Some(pod),
                "ALLOW",
                json!([{}]),
            ),
            (
                json!({"key": "destination.ip", "values": ["10.9.0.0/24"]}),
                Some(pod),
                "ALLOW",
                json!([]),
            ),
            (
                json!({"key": "destination.ip", "notValues": ["10.0.0.5"]}),
                Some(pod),
                "DENY",
                json!([]),
            ),
            (
                json!({"key": "destination.ip", "notValues": ["10.9.0.5"]}),
                Some(pod),
                "DENY",
                json!([{}]),
            ),
            // Unknown address: an ALLOW rule cannot match yet, a DENY rule matches.
            (
                json!({"key": "destination.ip", "values": ["10.0.0.0/24"]}),
                None,
                "ALLOW",
                json!([]),
            ),
            (
                json!({"key": "destination.ip", "values": ["10.9.0.0/24"]}),
                None,
                "DENY",
                json!([{}]),
            ),
        ];
        for (condition, addresses, action, expected) in table {
            let p =
                policy_with(json!({"action": action, "rules": [{"when": [condition.clone()]}]}));
            let compiled = compile(&p, addresses);
            assert!(compiled.issues.is_empty(), "{:?}", compiled.issues);
            let (_, policy) = compiled.policy.unwrap();
            assert_eq!(
                serde_json::to_value(&policy.rules).unwrap(),
                expected,
                "{action} {condition} at {addresses:?}"
            );
        }
    }

    #[test]
    fn a_workload_is_read_from_its_pod() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "demo", "labels": {"app": "web"}},
            "status": {"podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}
        }))
        .unwrap();
        let workload = Workload::of("demo", Some(&pod));
        assert_eq!(workload.labels.get("app").map(String::as_str), Some("web"));
        let addresses = workload.addresses.unwrap();
        assert!(addresses.contains(&"10.0.0.5".parse().unwrap()));
        assert!(addresses.contains(&"fd00::5".parse().unwrap()));
        let pending: Pod =
            serde_json::from_value(json!({"metadata": {"name": "p"}, "status": {}})).unwrap();
        assert_eq!(Workload::of("demo", Some(&pending)).addresses, None);
        assert_eq!(
            Workload::of("demo", None),
            Workload {
                namespace: "demo".into(),
                ..Workload::default()
            }
        );
    }

    #[test]
    fn long_notes_are_cut_at_a_character_boundary() {
        let issues = vec!["é".repeat(600)];
        let note = event_note(&issues);
        assert!(note.len() <= 1024);
        assert!(note.ends_with("..."));
        assert_eq!(event_note(&["short".into()]), "short");
    }
}
