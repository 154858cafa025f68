//! A private Kubernetes API server for the control-plane benchmark: etcd and the same
//! `kube-apiserver` binary `e2e/cluster.sh` builds, inside the benchmark's own network namespace,
//! with their own PKI and data under the work dir.
//!
//! Why not the shared e2e cluster: the operator benchmarked must be the leader (only the leader
//! loads the mesh CA, so only it serves 15012), and a leader reconciles the cluster-wide Mesh,
//! webhook configuration and trust-bundle ConfigMaps — on a shared cluster it would fight the
//! in-cluster operator. Here it owns everything. No kubelet, scheduler or controller-manager
//! runs: the benchmark writes Services and EndpointSlices itself, and TokenRequest/TokenReview
//! are served by the API server alone.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::procs::Proc;

pub const API_PORT: u16 = 6443;
const ETCD_CLIENT: &str = "http://127.0.0.1:2379";
const ETCD_PEER: &str = "http://127.0.0.1:2380";
const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const START_LIMIT: Duration = Duration::from_secs(120);

/// The running etcd and API server; both are killed when this is dropped (API server first).
pub struct ApiServer {
    apiserver: Option<Proc>,
    etcd: Option<Proc>,
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        drop(self.apiserver.take());
        drop(self.etcd.take());
    }
}

impl ApiServer {
    /// Starts etcd (data in `data`, ideally a tmpfs) and the API server (`kube_bin` holds
    /// `kube-apiserver` and `kubectl`), and waits until `/readyz` answers.
    pub fn start(kube_bin: &Path, dir: &Path, data: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let _ = std::fs::remove_dir_all(data);
        std::fs::create_dir_all(data)?;
        let pki = Pki::write(&dir.join("pki"))?;
        let log = |name: &str| dir.join(format!("{name}.log"));

        let mut etcd = Command::new("etcd");
        etcd.args(["--name", "bench", "--data-dir"]).arg(data);
        etcd.args([
            &format!("--listen-client-urls={ETCD_CLIENT}"),
            &format!("--advertise-client-urls={ETCD_CLIENT}"),
            &format!("--listen-peer-urls={ETCD_PEER}"),
            &format!("--initial-advertise-peer-urls={ETCD_PEER}"),
            &format!("--initial-cluster=bench={ETCD_PEER}"),
        ]);
        let mut etcd = Proc::spawn("etcd", &mut etcd, &log("etcd"))?;
        etcd.wait_until(START_LIMIT, || {
            std::net::TcpStream::connect(("127.0.0.1", 2379)).is_ok()
        })?;

        let mut api = Command::new(kube_bin.join("kube-apiserver"));
        let file = |p: &Path| p.display().to_string();
        api.args([
            format!("--etcd-servers={ETCD_CLIENT}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={API_PORT}"),
            // 1.20 still opens an unauthenticated port (8080) unless told not to.
            "--insecure-port=0".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            format!("--tls-cert-file={}", file(&pki.serving_cert)),
            format!("--tls-private-key-file={}", file(&pki.serving_key)),
            format!("--client-ca-file={}", file(&pki.ca_cert)),
            format!("--service-account-key-file={}", file(&pki.sa_public)),
            format!("--service-account-signing-key-file={}", file(&pki.sa_key)),
            format!("--service-account-issuer={SA_ISSUER}"),
            format!("--api-audiences={SA_ISSUER}"),
            "--authorization-mode=RBAC".into(),
        ]);
        let apiserver = Proc::spawn("kube-apiserver", &mut api, &log("apiserver"))?;
        let mut server = Self {
            apiserver: Some(apiserver),
            etcd: Some(etcd),
            kubeconfig: pki.kubeconfig,
            kubectl: kube_bin.join("kubectl"),
        };
        let kubectl = server.kubectl.clone();
        let kubeconfig = server.kubeconfig.clone();
        server
            .apiserver
            .as_mut()
            .expect("just started")
            .wait_until(START_LIMIT, || {
                Command::new(&kubectl)
                    .arg("--kubeconfig")
                    .arg(&kubeconfig)
                    .args(["get", "--raw", "/readyz"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .context("waiting for the private kube-apiserver /readyz")?;
        Ok(server)
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        use std::io::Write;
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["apply", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running kubectl apply")?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            anyhow::bail!(
                "kubectl apply failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Waits until `kubectl wait` reports `condition` on `resource` (e.g. `["crd", "--all"]`).
    pub fn wait(&self, resource: &[&str], condition: &str, timeout: Duration) -> Result<()> {
        let out = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("wait")
            .args(resource)
            .arg(format!("--for=condition={condition}"))
            .arg(format!("--timeout={}s", timeout.as_secs()))
            .output()
            .context("running kubectl wait")?;
        if !out.status.success() {
            anyhow::bail!(
                "{} not {condition} within {timeout:?}: {}",
                resource.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// The API server's PKI: a CA, its serving certificate, an admin client certificate
/// (`system:masters`) in a kubeconfig, and the ServiceAccount token signing key.
struct Pki {
    ca_cert: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    sa_key: PathBuf,
    sa_public: PathBuf,
    kubeconfig: PathBuf,
}

impl Pki {
    fn write(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = name(None, "trellis-bench-apiserver-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let serving_key = KeyPair::generate()?;
        let mut serving = CertificateParams::new(vec!["localhost".to_owned()])?;
        serving.distinguished_name = name(None, "kube-apiserver");
        serving
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving = serving.signed_by(&serving_key, &issuer)?;

        let admin_key = KeyPair::generate()?;
        let mut admin = CertificateParams::default();
        admin.distinguished_name = name(Some("system:masters"), "trellis-bench-admin");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin = admin.signed_by(&admin_key, &issuer)?;

        let sa_key = KeyPair::generate()?;
        let pki = Self {
            ca_cert: dir.join("ca.crt"),
            serving_cert: dir.join("apiserver.crt"),
            serving_key: dir.join("apiserver.key"),
            sa_key: dir.join("sa.key"),
            sa_public: dir.join("sa.pub"),
            kubeconfig: dir.join("admin.kubeconfig"),
        };
        std::fs::write(&pki.ca_cert, ca_cert.pem())?;
        std::fs::write(&pki.serving_cert, serving.pem())?;
        std::fs::write(&pki.serving_key, serving_key.serialize_pem())?;
        std::fs::write(&pki.sa_key, sa_key.serialize_pem())?;
        // The verifying side wants the public key alone (a PKCS#8 EC private key is not
        // among the formats it reads as a public key).
        std::fs::write(&pki.sa_public, sa_key.public_key_pem())?;
        let admin_cert = dir.join("admin.crt");
        let admin_key_file = dir.join("admin.key");
        std::fs::write(&admin_cert, admin.pem())?;
        std::fs::write(&admin_key_file, admin_key.serialize_pem())?;
        std::fs::write(
            &pki.kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters: [{{name: bench, cluster: {{server: \"https://127.0.0.1:{API_PORT}\", certificate-authority: {}}}}}]\n\
                 users: [{{name: admin, user: {{client-certificate: {}, client-key: {}}}}}]\n\
                 contexts: [{{name: bench, context: {{cluster: bench, user: admin}}}}]\n\
                 current-context: bench\n",
                pki.ca_cert.display(),
                admin_cert.display(),
                admin_key_file.display()
            ),
        )
        .context("writing the kubeconfig")?;
        Ok(pki)
    }
}

fn name(organization: Option<&str>, common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if let Some(organization) = organization {
        dn.push(DnType::OrganizationName, organization);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}
