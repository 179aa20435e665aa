//! A network namespace joined to this one by a veth pair, with an address on each end,
//! optionally shaped with `tc ... tbf`; everything removed on drop, even when the test
//! panics. A process put in the namespace (`ip netns exec NS ...`, see
//! [`NetnsLink::exec_prefix`]) is reached from the test process through the veth pair.
//!
//! Needs root and iproute2; [`NetnsLink::create`] says why it cannot (a [`Skip`]) instead
//! of failing, so the suite still passes where namespaces are not allowed.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::Skip;

/// Names start with this, followed by this process's id: leftovers of a test process that
/// died are recognized (and removed) by the next run.
const NS_PREFIX: &str = "moeshard-ft-";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS` (or `tc`), returning stderr as the error.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A namespace and the veth pair into it.
pub struct NetnsLink {
    ns: String,
    /// The veth end in this (the test process's) namespace.
    host_if: String,
    /// The veth end inside the namespace.
    ns_if: String,
    pub host_addr: Ipv4Addr,
    pub ns_addr: Ipv4Addr,
}

impl NetnsLink {
    /// Creates the namespace and a veth pair with a /30 between the two ends.
    pub fn create() -> Result<NetnsLink, Skip> {
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(Skip(format!(
                "network namespaces need root (euid {euid}); run the suite as root to cover \
                 them"
            )));
        }
        if Command::new("ip").arg("-V").output().is_err() {
            return Err(Skip("`ip` (iproute2) is not installed".into()));
        }
        remove_leftovers();
        let pid = std::process::id();
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let ns = format!("{NS_PREFIX}{pid}-{k}");
        // Interface names: at most 15 bytes.
        let host_if = format!("mf{}h{k}", pid % 10_000_000);
        let ns_if = format!("mf{}n{k}", pid % 10_000_000);
        // A /30 in 10.233.0.0/16 picked from the pid, so concurrent runs rarely meet.
        let index = (pid.wrapping_mul(7).wrapping_add(k)) % 16384;
        let base = [10, 233, (index / 64) as u8, ((index % 64) * 4) as u8];
        let host_addr = Ipv4Addr::new(base[0], base[1], base[2], base[3] + 1);
        let ns_addr = Ipv4Addr::new(base[0], base[1], base[2], base[3] + 2);

        run("ip", &["netns", "add", &ns])
            .map_err(|e| Skip(format!("cannot create a network namespace: {e}")))?;
        // From here on, drop removes what exists.
        let link = NetnsLink {
            ns,
            host_if,
            ns_if,
            host_addr,
            ns_addr,
        };
        link.configure()
            .map_err(|e| Skip(format!("cannot set up the veth pair: {e}")))?;
        Ok(link)
    }

    fn configure(&self) -> Result<(), String> {
        let (ns, h, n) = (self.ns.as_str(), self.host_if.as_str(), self.ns_if.as_str());
        let host_cidr = format!("{}/30", self.host_addr);
        let ns_cidr = format!("{}/30", self.ns_addr);
        run("ip", &["link", "add", h, "type", "veth", "peer", "name", n])?;
        run("ip", &["link", "set", n, "netns", ns])?;
        run("ip", &["addr", "add", &host_cidr, "dev", h])?;
        run("ip", &["link", "set", h, "up"])?;
        run("ip", &["-n", ns, "addr", "add", &ns_cidr, "dev", n])?;
        run("ip", &["-n", ns, "link", "set", n, "up"])?;
        run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.ns
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn exec_prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.ns]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// Shapes both directions: `tc qdisc add dev IF root tbf rate R burst B latency L` on
    /// each end of the pair (tbf shapes what an interface sends).
    pub fn shape_tbf(&self, rate: &str, burst: &str, latency: &str) -> Result<(), String> {
        let tbf = [
            "root", "tbf", "rate", rate, "burst", burst, "latency", latency,
        ];
        let mut host = vec!["qdisc", "add", "dev", &self.host_if];
        host.extend(tbf);
        run("tc", &host)?;
        let mut inside = vec!["-n", &self.ns, "qdisc", "add", "dev", &self.ns_if];
        inside.extend(tbf);
        run("tc", &inside)?;
        Ok(())
    }

    /// Bytes sent through the root qdisc of (this side's end, the namespace's end): proof
    /// that traffic went through the shaper.
    pub fn qdisc_sent_bytes(&self) -> Result<(u64, u64), String> {
        let parse = |text: String| {
            text.split_whitespace()
                .skip_while(|w| *w != "Sent")
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| format!("no \"Sent N bytes\" in {text:?}"))
        };
        let host = parse(run("tc", &["-s", "qdisc", "show", "dev", &self.host_if])?)?;
        let inside = parse(run(
            "tc",
            &["-n", &self.ns, "-s", "qdisc", "show", "dev", &self.ns_if],
        )?)?;
        Ok((host, inside))
    }
}

impl Drop for NetnsLink {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both (and its qdiscs); the namespace goes
        // once no process is left in it (the tests kill their nodes first).
        let _ = run("ip", &["link", "del", &self.host_if]);
        if let Err(e) = run("ip", &["netns", "del", &self.ns]) {
            eprintln!("warning: removing network namespace {}: {e}", self.ns);
        }
    }
}

/// Removes the namespaces (and with them their veth ends) of test processes that are gone.
fn remove_leftovers() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next() else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}
