//! `moeshard certs`: a cluster's certificate authority and the certificates it signs for
//! mutual TLS between the coordinator and its nodes (docs/security.md).
//!
//! - `init --dir DIR [--name CLUSTER]` writes `DIR/ca.pem` (the CA certificate, for every
//!   host) and `DIR/ca.key` (its key, mode 0600: keep it where certificates are issued).
//! - `issue --dir DIR --cluster CLUSTER.toml` writes `DIR/<node>.pem` and `DIR/<node>.key`
//!   for every node of the cluster file (server and client authentication; its names: the
//!   host of its address, its name, and its `server_name` where one is set) and
//!   `DIR/coordinator.pem` / `.key` for the coordinator (client authentication).
//!   `--node NAME --san HOST[,IP]` issues one node's, `--coordinator NAME` the coordinator's.
//!   Certificates that exist are kept unless `--force`.
//!
//! Keys are written with mode 0600, every file through a temporary name renamed over it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::{ArgGroup, Args, Subcommand};
use proto::transport::{
    is_tls_name, CertAuthority, CertUse, TransportError, DEFAULT_CA_DAYS, DEFAULT_CERT_DAYS,
};
use shared::placement::{is_valid_node_name, Cluster, PlacementError, DEFAULT_SERVER_NAME};

/// The CA's certificate and key in the certificate directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
/// The coordinator's name when none is given.
pub const DEFAULT_COORDINATOR: &str = "coordinator";

/// `moeshard certs …`
#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Create the cluster's CA: DIR/ca.pem (certificate) and DIR/ca.key (key, mode 0600)
    Init {
        /// The certificate directory (created, mode 0700, if missing)
        #[arg(long)]
        dir: PathBuf,
        /// The cluster's name, in the CA's subject ("moeshard CA <NAME>")
        #[arg(long, default_value = "moeshard")]
        name: String,
        /// Days the CA is valid
        #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
        days: u32,
    },
    /// Issue certificates signed by DIR's CA: for every node of a cluster file and the
    /// coordinator, or for one node, or for the coordinator
    Issue(IssueArgs),
}

/// What `moeshard certs issue` signs.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("what").required(true).multiple(true).args(["cluster", "node", "coordinator"])))]
pub struct IssueArgs {
    /// The certificate directory holding the CA (`moeshard certs init`)
    #[arg(long)]
    pub dir: PathBuf,
    /// Every node of this cluster file (names: its address's host, its name, its
    /// server_name if set) and the coordinator
    #[arg(long, conflicts_with = "node")]
    pub cluster: Option<PathBuf>,
    /// One node, by name (its certificate also carries the name)
    #[arg(long, requires = "san")]
    pub node: Option<String>,
    /// With --node: the names the coordinator reaches it by, comma-separated (host names,
    /// IP addresses)
    #[arg(long, value_delimiter = ',', requires = "node")]
    pub san: Vec<String>,
    /// The coordinator's certificate, under this name (with --cluster default "coordinator")
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Days the certificates are valid
    #[arg(long, default_value_t = DEFAULT_CERT_DAYS)]
    pub days: u32,
    /// Replace certificates that exist (default: keep them)
    #[arg(long)]
    pub force: bool,
}

/// Why a `certs` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Tls(#[from] TransportError),
    #[error(transparent)]
    Cluster(#[from] PlacementError),
}

/// One certificate to issue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// A node: its name and the names it is reached by.
    Node { name: String, names: Vec<String> },
    /// The coordinator.
    Coordinator { name: String },
}

impl Subject {
    fn name(&self) -> &str {
        match self {
            Subject::Node { name, .. } | Subject::Coordinator { name } => name,
        }
    }
}

/// A certificate written (or kept) by [`issue`].
#[derive(Clone, Debug)]
pub struct Issued {
    pub subject: Subject,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// It existed and was kept.
    pub kept: bool,
}

/// Runs a `certs` command, printing what it wrote and what to do with it.
pub fn run(command: CertsCommand) -> Result<(), CertsError> {
    match command {
        CertsCommand::Init { dir, name, days } => {
            let (cert, key) = init(&dir, &name, days)?;
            println!(
                "wrote {} (the CA certificate: every node and the coordinator trust it)",
                cert.display()
            );
            println!(
                "wrote {} (the CA key, mode 0600: keep it where certificates are issued, not on the nodes)",
                key.display()
            );
            println!(
                "next: moeshard certs issue --dir {} --cluster CLUSTER.toml",
                dir.display()
            );
        }
        CertsCommand::Issue(args) => {
            let mut subjects = Vec::new();
            let mut cluster = None;
            if let Some(path) = &args.cluster {
                let c = Cluster::load(path)?;
                subjects.extend(cluster_subjects(&c));
                cluster = Some(c);
            }
            if let Some(node) = &args.node {
                let mut names = args.san.clone();
                names.push(node.clone());
                subjects.push(Subject::Node {
                    name: node.clone(),
                    names: dedup(names),
                });
            }
            let coordinator = args
                .coordinator
                .clone()
                .or_else(|| cluster.as_ref().map(|_| DEFAULT_COORDINATOR.to_string()));
            if let Some(name) = coordinator {
                subjects.push(Subject::Coordinator { name });
            }
            let issued = issue(&args.dir, &subjects, args.days, args.force)?;
            print!("{}", summary(&args.dir, &issued));
        }
    }
    Ok(())
}

/// Creates `dir` (mode 0700) if needed and writes a new CA there; refuses to replace one.
pub fn init(dir: &Path, cluster: &str, days: u32) -> Result<(PathBuf, PathBuf), CertsError> {
    let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    for path in [&cert, &key] {
        if path.exists() {
            return Err(CertsError::Refused(format!(
                "{} exists: a new CA would not trust the certificates the old one signed; \
                 remove {} and {} to start over",
                path.display(),
                cert.display(),
                key.display()
            )));
        }
    }
    create_dir(dir)?;
    let ca = CertAuthority::generate(cluster, days)?;
    ca.save(&cert, &key)?;
    Ok((cert, key))
}

fn create_dir(dir: &Path) -> Result<(), CertsError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|e| CertsError::Refused(format!("creating {}: {e}", dir.display())))
}

fn dedup(names: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// The host of `host:port` (an IPv6 address without its brackets).
fn address_host(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// A certificate per node of `cluster`, for the names the coordinator may reach it by: the
/// host of its address, its name (if it is a DNS name), and its `server_name` unless that
/// is only the default of a cluster file without a CA.
pub fn cluster_subjects(cluster: &Cluster) -> Vec<Subject> {
    cluster
        .nodes
        .iter()
        .map(|node| {
            let mut names = vec![address_host(&node.address).to_string()];
            if is_tls_name(&node.name) {
                names.push(node.name.clone());
            }
            if cluster.tls.is_some() || node.server_name != DEFAULT_SERVER_NAME {
                names.push(node.server_name.clone());
            }
            Subject::Node {
                name: node.name.clone(),
                names: dedup(names),
            }
        })
        .collect()
}

/// Signs a certificate for each of `subjects` with the CA in `dir`, written as
/// `dir/<name>.pem` and `dir/<name>.key` (0600). A pair that exists is kept unless `force`.
pub fn issue(
    dir: &Path,
    subjects: &[Subject],
    days: u32,
    force: bool,
) -> Result<Vec<Issued>, CertsError> {
    let ca = CertAuthority::load(&dir.join(CA_CERT), &dir.join(CA_KEY)).map_err(|e| {
        CertsError::Refused(format!(
            "{e} (create the CA first: moeshard certs init --dir {})",
            dir.display()
        ))
    })?;
    for (i, s) in subjects.iter().enumerate() {
        let name = s.name();
        if !is_valid_node_name(name) {
            return Err(CertsError::Refused(format!(
                "{name:?} is not a valid name (1 to 64 letters, digits, '.', '_' or '-', not starting with '.'): it names the files"
            )));
        }
        if name == "ca" {
            return Err(CertsError::Refused(
                "\"ca\" names the CA's own files; choose another name".into(),
            ));
        }
        if subjects[..i].iter().any(|t| t.name() == name) {
            return Err(CertsError::Refused(format!(
                "{name:?} is named twice (a node and the coordinator need different names)"
            )));
        }
        if let Subject::Node { names, .. } = s {
            if let Some(bad) = names.iter().find(|n| !is_tls_name(n)) {
                return Err(CertsError::Refused(format!(
                    "node {name}: {bad:?} is neither a DNS name nor an IP address"
                )));
            }
        }
    }
    let mut out = Vec::with_capacity(subjects.len());
    for subject in subjects {
        let name = subject.name();
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        let kept = match (cert.exists(), key.exists()) {
            (true, true) if !force => true,
            (true, false) | (false, true) if !force => {
                return Err(CertsError::Refused(format!(
                    "{name}: only one of {} and {} exists; give --force to issue both anew",
                    cert.display(),
                    key.display()
                )))
            }
            _ => false,
        };
        if !kept {
            let identity = match subject {
                Subject::Node { names, .. } => ca.issue(name, names, CertUse::Node, days)?,
                Subject::Coordinator { .. } => ca.issue(name, &[], CertUse::Coordinator, days)?,
            };
            identity.save(&cert, &key)?;
        }
        out.push(Issued {
            subject: subject.clone(),
            cert,
            key,
            kept,
        });
    }
    Ok(out)
}

/// What `issue` did, and the cluster-file lines and node flags that use it.
pub fn summary(dir: &Path, issued: &[Issued]) -> String {
    let mut out = String::new();
    for i in issued {
        let what = match &i.subject {
            Subject::Node { name, names } => {
                format!(
                    "node {name} (server and client; names {})",
                    names.join(", ")
                )
            }
            Subject::Coordinator { name } => format!("coordinator {name} (client)"),
        };
        let verb = if i.kept { "kept" } else { "wrote" };
        let _ = writeln!(
            out,
            "{verb} {} and {} (key, 0600): {what}",
            i.cert.display(),
            i.key.display()
        );
    }
    let ca = dir.join(CA_CERT);
    let q = |p: &Path| toml_string(&p.to_string_lossy());
    if let Some(c) = issued
        .iter()
        .find(|i| matches!(i.subject, Subject::Coordinator { .. }))
    {
        let _ = writeln!(out, "\nin the cluster file, before the first [[node]]:");
        let _ = writeln!(out, "ca = {}", q(&ca));
        let _ = writeln!(out, "client_cert = {}", q(&c.cert));
        let _ = writeln!(out, "client_key = {}", q(&c.key));
    }
    let nodes: Vec<&Issued> = issued
        .iter()
        .filter(|i| matches!(i.subject, Subject::Node { .. }))
        .collect();
    if !nodes.is_empty() {
        let _ = writeln!(
            out,
            "\non each node's host (copy {} and its two files there):",
            ca.display()
        );
        for i in nodes {
            let _ = writeln!(
                out,
                "{}: moeshard expert-node … --tls-ca {} --tls-cert {} --tls-key {}",
                i.subject.name(),
                ca.display(),
                i.cert.display(),
                i.key.display()
            );
        }
    }
    out
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_issue_for_a_cluster() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        let (cert, key) = init(&dir, "test", 30).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&key), 0o600);
            assert_eq!(mode(&dir), 0o700);
        }
        let again = init(&dir, "test", 30).unwrap_err().to_string();
        assert!(again.contains("exists"), "{again}");
        assert!(cert.exists());

        let cluster = Cluster::from_toml(
            "[[node]]\nname = \"node0\"\naddress = \"10.0.0.7:7001\"\ntransport = \"grpc\"\n\
             [[node]]\nname = \"node_1\"\naddress = \"[fd00::2]:7002\"\ntransport = \"grpc\"\n\
             server_name = \"n1.lan\"\n",
            Path::new(""),
        )
        .unwrap();
        let mut subjects = cluster_subjects(&cluster);
        assert_eq!(
            subjects,
            [
                Subject::Node {
                    name: "node0".into(),
                    names: vec!["10.0.0.7".into(), "node0".into()],
                },
                Subject::Node {
                    name: "node_1".into(),
                    names: vec!["fd00::2".into(), "node_1".into(), "n1.lan".into()],
                },
            ]
        );
        subjects.push(Subject::Coordinator {
            name: "coordinator".into(),
        });
        let issued = issue(&dir, &subjects, 30, false).unwrap();
        assert!(issued.iter().all(|i| !i.kept));
        #[cfg(unix)]
        for i in &issued {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&i.key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", i.key.display());
        }
        let before = std::fs::read_to_string(&issued[0].cert).unwrap();
        let kept = issue(&dir, &subjects, 30, false).unwrap();
        assert!(kept.iter().all(|i| i.kept));
        assert_eq!(std::fs::read_to_string(&issued[0].cert).unwrap(), before);
        let forced = issue(&dir, &subjects[..1], 30, true).unwrap();
        assert!(!forced[0].kept);
        assert_ne!(std::fs::read_to_string(&issued[0].cert).unwrap(), before);
        // No temporary files left behind: ca, 3 pairs.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 8);
        let text = summary(&dir, &issued);
        assert!(text.contains("client_key = "), "{text}");
        assert!(text.contains("--tls-ca"), "{text}");

        // Refusals.
        let refused =
            |subjects: &[Subject]| issue(&dir, subjects, 30, false).unwrap_err().to_string();
        let node = |name: &str, names: &[&str]| Subject::Node {
            name: name.into(),
            names: names.iter().map(|n| n.to_string()).collect(),
        };
        assert!(refused(&[node("ca", &["h"])]).contains("CA's own files"));
        assert!(refused(&[node("../x", &["h"])]).contains("not a valid name"));
        assert!(refused(&[node("a", &["not a host!"])]).contains("neither a DNS name"));
        assert!(
            refused(&[node("a", &["h"]), Subject::Coordinator { name: "a".into() }])
                .contains("named twice")
        );
        let err = issue(&tmp.path().join("nowhere"), &subjects, 30, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("moeshard certs init"), "{err}");
    }
}
