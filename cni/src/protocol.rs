//! The CNI protocol, pure: the environment variables and stdin configuration a runtime passes,
//! parsed into a [`Request`], and the error object a failure is reported as. No I/O happens here.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{Value, json};

/// The spec versions this plugin speaks. Both share the parts it uses: the chained `prevResult`
/// it passes through untouched and the error object.
pub const SUPPORTED_VERSIONS: [&str; 2] = ["0.4.0", "1.0.0"];

/// Version used for answers when the request does not name a supported one.
const FALLBACK_VERSION: &str = "1.0.0";

/// Namespaces never captured unless the config says otherwise: the cluster's own components and
/// the mesh's control plane must come up even when the mesh cannot.
pub const DEFAULT_EXCLUDED_NAMESPACES: [&str; 2] =
    ["kube-system", trellis_config::wellknown::OPERATOR_NAMESPACE];

/// The spec's well-known error codes, and this plugin's own (100 and up).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// A `traffic.sidecar.istio.io/*` annotation of the pod cannot be turned into rules.
    pub const INVALID_CAPTURE_ANNOTATION: u32 = 100;
    /// iptables refused or could not run inside the pod's network namespace.
    pub const CAPTURE_FAILED: u32 = 101;
    /// CHECK found the pod's capture chains missing.
    pub const CAPTURE_MISSING: u32 = 102;
}

/// A failure as the spec's error object reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The error object, stamped with `cni_version` (the request's when it is supported).
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": answer_version(Some(cni_version)),
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// The version an answer is stamped with: the request's if we speak it, else our newest.
pub fn answer_version(requested: Option<&str>) -> &str {
    match requested {
        Some(version) if SUPPORTED_VERSIONS.contains(&version) => version,
        _ => FALLBACK_VERSION,
    }
}

/// The answer to VERSION.
pub fn version_info(requested: Option<&str>) -> Value {
    json!({
        "cniVersion": answer_version(requested),
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

/// The `CNI_*` variables, as the runtime set them (unset and empty are the same to the spec).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Environment {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
}

impl Environment {
    /// Reads the variables through `lookup` (the process environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| lookup(name).filter(|value| !value.is_empty());
        Self {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
        }
    }
}

/// The network configuration on stdin: the spec's keys this plugin reads, and its own.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    /// Kubeconfig the pod lookup authenticates with (written by `trellis-cni install`).
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// File the plugin appends its log to, besides stderr.
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// `tracing` filter directive, e.g. `info` or `debug`.
    #[serde(default)]
    pub log_level: Option<String>,
    /// Pods in these namespaces are never looked up nor captured.
    #[serde(default = "default_excluded_namespaces")]
    pub exclude_namespaces: Vec<String>,
    /// The previous plugin's result, passed through unchanged.
    #[serde(default)]
    pub prev_result: Option<Value>,
}

fn default_excluded_namespaces() -> Vec<String> {
    DEFAULT_EXCLUDED_NAMESPACES.map(str::to_owned).to_vec()
}

/// The logging keys of a config, read leniently so that even a request that turns out invalid
/// is logged where the operator looks.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LogSettings {
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    #[serde(default)]
    pub log_level: Option<String>,
}

impl LogSettings {
    pub fn from_stdin(stdin: &[u8]) -> Self {
        serde_json::from_slice(stdin).unwrap_or_default()
    }
}

/// The pod a runtime is setting up, from the `K8S_POD_*` keys of `CNI_ARGS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

/// An ADD or CHECK: everything needed to set up or verify capture.
#[derive(Clone, Debug, PartialEq)]
pub struct Invocation {
    pub config: NetworkConfig,
    pub container_id: String,
    pub netns: PathBuf,
    /// `None` when the runtime is not Kubernetes (no `K8S_POD_*` arguments): nothing to capture.
    pub pod: Option<PodRef>,
    pub prev_result: Value,
}

/// A DEL, parsed leniently: anything missing or malformed only narrows what can be cleaned up.
#[derive(Clone, Debug, PartialEq)]
pub struct Deletion {
    pub config: Option<NetworkConfig>,
    pub netns: Option<PathBuf>,
    pub pod: Option<PodRef>,
    /// Why parts of the request were unusable, for the log.
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    Version { requested: Option<String> },
    Add(Invocation),
    Check(Invocation),
    Del(Deletion),
}

/// A rejected request: the error and the version to stamp on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub error: CniError,
    pub cni_version: String,
}

impl Rejection {
    fn new(error: CniError, cni_version: Option<&str>) -> Self {
        Self {
            error,
            cni_version: answer_version(cni_version).to_owned(),
        }
    }

    pub fn to_json(&self) -> Value {
        self.error.to_json(&self.cni_version)
    }
}

/// Parses a request from the runtime.
pub fn parse_request(env: &Environment, stdin: &[u8]) -> Result<Request, Rejection> {
    let Some(command) = env.command.as_deref() else {
        return Err(Rejection::new(
            CniError::new(code::INVALID_ENVIRONMENT, "CNI_COMMAND is not set"),
            requested_version(stdin).as_deref(),
        ));
    };
    match command {
        "VERSION" => Ok(Request::Version {
            requested: requested_version(stdin),
        }),
        "ADD" => parse_invocation(env, stdin).map(Request::Add),
        "CHECK" => parse_invocation(env, stdin).map(Request::Check),
        "DEL" => Ok(Request::Del(parse_deletion(env, stdin))),
        // Added in spec 1.1.0, which this plugin does not declare, so a runtime never sends them.
        "GC" | "STATUS" => {
            let requested = requested_version(stdin);
            Err(Rejection::new(
                CniError::new(
                    code::INCOMPATIBLE_VERSION,
                    format!(
                        "{command} needs CNI spec 1.1.0; trellis-cni supports {}",
                        SUPPORTED_VERSIONS.join(", ")
                    ),
                ),
                requested.as_deref(),
            ))
        }
        other => Err(Rejection::new(
            CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("CNI_COMMAND {other:?} is not ADD, DEL, CHECK or VERSION"),
            ),
            requested_version(stdin).as_deref(),
        )),
    }
}

/// The `cniVersion` of stdin, if it has one.
fn requested_version(stdin: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Versioned {
        cni_version: String,
    }
    serde_json::from_slice::<Versioned>(stdin)
        .ok()
        .map(|v| v.cni_version)
}

/// Decodes and checks the configuration: syntax, shape, then version.
pub fn parse_config(stdin: &[u8]) -> Result<NetworkConfig, Rejection> {
    let value: Value = serde_json::from_slice(stdin).map_err(|error| {
        Rejection::new(
            CniError::new(
                code::DECODING_FAILURE,
                "network configuration on stdin is not JSON",
            )
            .with_details(error.to_string()),
            None,
        )
    })?;
    let requested = value
        .get("cniVersion")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let config: NetworkConfig = serde_json::from_value(value).map_err(|error| {
        Rejection::new(
            CniError::new(
                code::INVALID_NETWORK_CONFIG,
                "invalid network configuration",
            )
            .with_details(error.to_string()),
            requested.as_deref(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&config.cni_version.as_str()) {
        return Err(Rejection::new(
            CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "incompatible CNI version {:?}: trellis-cni supports {}",
                    config.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ),
            None,
        ));
    }
    Ok(config)
}

fn parse_invocation(env: &Environment, stdin: &[u8]) -> Result<Invocation, Rejection> {
    let config = parse_config(stdin)?;
    let reject = |error| Rejection::new(error, Some(&config.cni_version));
    let missing: Vec<&str> = [
        ("CNI_CONTAINERID", &env.container_id),
        ("CNI_NETNS", &env.netns),
        ("CNI_IFNAME", &env.ifname),
    ]
    .into_iter()
    .filter(|(_, value)| value.is_none())
    .map(|(name, _)| name)
    .collect();
    if !missing.is_empty() {
        return Err(reject(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("missing {}", missing.join(", ")),
        )));
    }
    let pod = pod_ref(env.args.as_deref().unwrap_or_default())
        .map_err(|error| reject(CniError::new(code::INVALID_ENVIRONMENT, error)))?;
    let Some(prev_result) = config.prev_result.clone() else {
        return Err(reject(CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "no prevResult: trellis-cni must be chained after the plugin that creates the \
             pod's interface",
        )));
    };
    Ok(Invocation {
        container_id: env.container_id.clone().unwrap_or_default(),
        netns: PathBuf::from(env.netns.clone().unwrap_or_default()),
        pod,
        prev_result,
        config,
    })
}

fn parse_deletion(env: &Environment, stdin: &[u8]) -> Deletion {
    let mut problems = Vec::new();
    let config = parse_config(stdin)
        .map_err(|rejection| {
            problems.push(format!(
                "{} {}",
                rejection.error.msg, rejection.error.details
            ))
        })
        .ok();
    let pod = pod_ref(env.args.as_deref().unwrap_or_default())
        .map_err(|error| problems.push(error))
        .ok()
        .flatten();
    Deletion {
        config,
        netns: env.netns.as_ref().map(PathBuf::from),
        pod,
        problems,
    }
}

/// Parses `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
pub fn parse_cni_args(args: &str) -> Result<BTreeMap<String, String>, String> {
    args.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
            _ => Err(format!("CNI_ARGS: {pair:?} is not KEY=VALUE")),
        })
        .collect()
}

/// The pod named by `CNI_ARGS`, or `None` when the runtime gave no (complete) pod identity.
fn pod_ref(args: &str) -> Result<Option<PodRef>, String> {
    let mut pairs = parse_cni_args(args)?;
    Ok(
        match (
            pairs.remove("K8S_POD_NAMESPACE"),
            pairs.remove("K8S_POD_NAME"),
        ) {
            (Some(namespace), Some(name)) if !namespace.is_empty() && !name.is_empty() => {
                Some(PodRef { namespace, name })
            }
            _ => None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bridge result of the spec's 1.0.0 example ("Section 5: Result Types").
    fn spec_result_1_0_0() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "00:11:22:33:44:55"},
                {"name": "veth3243", "mac": "55:44:33:22:11:11"},
                {"name": "eth0", "mac": "99:88:77:66:55:44", "sandbox": "/var/run/netns/blue"}
            ],
            "ips": [{"address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 2}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.1.0.1"]}
        })
    }

    /// The spec 0.4.0 example result, whose IPs still carry `version`.
    fn spec_result_0_4_0() -> Value {
        json!({
            "cniVersion": "0.4.0",
            "interfaces": [
                {"name": "cni0", "mac": "00:11:22:33:44:55"},
                {"name": "veth3243", "mac": "55:44:33:22:11:11"},
                {"name": "eth0", "mac": "99:88:77:66:55:44", "sandbox": "/var/run/netns/blue"}
            ],
            "ips": [{"version": "4", "address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 2}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.1.0.1"]}
        })
    }

    /// Our entry of a conflist as libcni hands it to us: `name` and `cniVersion` copied from the
    /// list, `prevResult` from the plugin before.
    fn chained_config(version: &str, prev_result: &Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "cniVersion": version,
            "name": "dbnet",
            "type": "trellis-cni",
            "kubeconfig": "/etc/cni/net.d/trellis-cni.kubeconfig",
            "logFile": "/var/log/trellis-cni.log",
            "excludeNamespaces": ["kube-system"],
            "runtimeConfig": {"portMappings": []},
            "prevResult": prev_result,
        }))
        .unwrap()
    }

    fn env(command: &str) -> Environment {
        Environment {
            command: Some(command.to_owned()),
            container_id: Some("3b1f4e".to_owned()),
            netns: Some("/var/run/netns/blue".to_owned()),
            ifname: Some("eth0".to_owned()),
            args: Some(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-7d9;\
                 K8S_POD_INFRA_CONTAINER_ID=3b1f4e;K8S_POD_UID=0c5e"
                    .to_owned(),
            ),
        }
    }

    fn rejection_code(result: Result<Request, Rejection>) -> u32 {
        result.expect_err("request must be rejected").error.code
    }

    #[test]
    fn add_parses_spec_configs_and_keeps_prev_result_as_is() {
        for (version, result) in [
            ("0.4.0", spec_result_0_4_0()),
            ("1.0.0", spec_result_1_0_0()),
        ] {
            let request = parse_request(&env("ADD"), &chained_config(version, &result)).unwrap();
            let Request::Add(invocation) = request else {
                panic!("{version}: not an ADD: {request:?}");
            };
            assert_eq!(invocation.prev_result, result, "{version}");
            assert_eq!(invocation.config.cni_version, version);
            assert_eq!(invocation.config.name, "dbnet");
            assert_eq!(invocation.config.exclude_namespaces, ["kube-system"]);
            assert_eq!(invocation.netns, PathBuf::from("/var/run/netns/blue"));
            assert_eq!(
                invocation.pod,
                Some(PodRef {
                    namespace: "shop".into(),
                    name: "cart-7d9".into()
                })
            );
        }
    }

    #[test]
    fn defaults_exclude_the_cluster_and_mesh_namespaces() {
        let config =
            parse_config(br#"{"cniVersion":"1.0.0","name":"n","type":"trellis-cni"}"#).unwrap();
        assert_eq!(config.exclude_namespaces, ["kube-system", "trellis-system"]);
        assert_eq!(config.kubeconfig, None);
    }

    #[test]
    fn version_answers_supported_versions() {
        let request = parse_request(&env("VERSION"), br#"{"cniVersion":"0.4.0"}"#).unwrap();
        assert_eq!(
            request,
            Request::Version {
                requested: Some("0.4.0".into())
            }
        );
        assert_eq!(
            version_info(Some("0.4.0")),
            json!({"cniVersion": "0.4.0", "supportedVersions": ["0.4.0", "1.0.0"]})
        );
        assert_eq!(
            version_info(Some("1.1.0")),
            json!({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]}),
            "an unsupported request still learns what we support"
        );
        assert_eq!(version_info(None)["cniVersion"], "1.0.0");
    }

    #[test]
    fn error_codes_follow_the_spec() {
        let good = chained_config("1.0.0", &spec_result_1_0_0());
        let without = |strip: fn(&mut Environment)| {
            let mut environment = env("ADD");
            strip(&mut environment);
            environment
        };
        let cases: Vec<(&str, Environment, Vec<u8>, u32)> = vec![
            (
                "no CNI_COMMAND",
                without(|e| e.command = None),
                good.clone(),
                4,
            ),
            ("unknown command", env("FROB"), good.clone(), 4),
            ("no CNI_NETNS", without(|e| e.netns = None), good.clone(), 4),
            (
                "no CNI_CONTAINERID",
                without(|e| e.container_id = None),
                good.clone(),
                4,
            ),
            (
                "malformed CNI_ARGS",
                without(|e| e.args = Some("K8S_POD_NAME".into())),
                good.clone(),
                4,
            ),
            ("bad JSON", env("ADD"), b"{\"cniVersion\":".to_vec(), 6),
            (
                "wrongly typed key",
                env("ADD"),
                br#"{"cniVersion":"1.0.0","excludeNamespaces":"kube-system"}"#.to_vec(),
                7,
            ),
            (
                "unsupported version",
                env("ADD"),
                chained_config("0.3.1", &spec_result_0_4_0()),
                1,
            ),
            (
                "no prevResult",
                env("ADD"),
                br#"{"cniVersion":"1.0.0","name":"n","type":"trellis-cni"}"#.to_vec(),
                7,
            ),
            ("GC of spec 1.1.0", env("GC"), good.clone(), 1),
            ("STATUS of spec 1.1.0", env("STATUS"), good.clone(), 1),
            (
                "CHECK without CNI_IFNAME",
                {
                    let mut e = env("CHECK");
                    e.ifname = None;
                    e
                },
                good.clone(),
                4,
            ),
        ];
        for (name, environment, stdin, expected) in cases {
            assert_eq!(
                rejection_code(parse_request(&environment, &stdin)),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn missing_variables_are_named_and_errors_carry_the_request_version() {
        let mut environment = env("ADD");
        environment.netns = None;
        environment.ifname = None;
        let rejection = parse_request(&environment, &chained_config("0.4.0", &spec_result_0_4_0()))
            .unwrap_err();
        assert_eq!(
            rejection.to_json(),
            json!({"cniVersion": "0.4.0", "code": 4, "msg": "missing CNI_NETNS, CNI_IFNAME", "details": ""})
        );
        let unsupported =
            parse_request(&env("ADD"), &chained_config("9.9.9", &json!({}))).unwrap_err();
        assert_eq!(unsupported.to_json()["cniVersion"], "1.0.0");
        assert!(unsupported.error.msg.contains("9.9.9"));
    }

    #[test]
    fn del_is_lenient() {
        let Request::Del(deletion) = parse_request(
            &Environment {
                command: Some("DEL".into()),
                ..Environment::default()
            },
            b"not json",
        )
        .unwrap() else {
            panic!("not a DEL");
        };
        assert_eq!(deletion.config, None);
        assert_eq!(deletion.netns, None);
        assert_eq!(deletion.problems.len(), 1, "{:?}", deletion.problems);

        let Request::Del(deletion) =
            parse_request(&env("DEL"), &chained_config("1.0.0", &spec_result_1_0_0())).unwrap()
        else {
            panic!("not a DEL");
        };
        assert!(deletion.problems.is_empty());
        assert_eq!(deletion.pod.unwrap().name, "cart-7d9");
    }

    #[test]
    fn cni_args_parsing() {
        let parsed =
            parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=a=b;").unwrap();
        assert_eq!(parsed["IgnoreUnknown"], "1");
        assert_eq!(parsed["K8S_POD_NAMESPACE"], "shop");
        assert_eq!(parsed["K8S_POD_NAME"], "a=b", "only the first = splits");
        assert_eq!(parse_cni_args(""), Ok(BTreeMap::new()));
        assert!(parse_cni_args("K8S_POD_NAME").is_err());
        assert!(parse_cni_args("=x").is_err());
        assert_eq!(pod_ref("K8S_POD_NAMESPACE=shop"), Ok(None), "name missing");
        assert_eq!(pod_ref("K8S_POD_NAMESPACE=;K8S_POD_NAME=x"), Ok(None));
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let environment = Environment::from_lookup(|name| match name {
            "CNI_COMMAND" => Some("ADD".into()),
            "CNI_NETNS" => Some(String::new()),
            _ => None,
        });
        assert_eq!(environment.command.as_deref(), Some("ADD"));
        assert_eq!(environment.netns, None);
    }

    #[test]
    fn log_settings_survive_an_invalid_config() {
        let settings = LogSettings::from_stdin(
            br#"{"cniVersion":"7","logFile":"/tmp/x.log","logLevel":"debug","excludeNamespaces":3}"#,
        );
        assert_eq!(settings.log_file, Some(PathBuf::from("/tmp/x.log")));
        assert_eq!(settings.log_level.as_deref(), Some("debug"));
        assert_eq!(LogSettings::from_stdin(b"garbage"), LogSettings::default());
    }
}
