//! Persistent memory: the fsdax (and other) namespaces of `/sys/bus/nd/devices`, the NUMA
//! node each belongs to, and the mounts of their block devices from `/proc/mounts`.
//!
//! Everything is read below a root directory, so that tests can describe a machine with
//! persistent memory in a temporary directory. The kernel's files are not user input: an
//! entry that cannot be read is left out with a warning rather than failing the whole
//! topology.

use std::fs;
use std::path::{Component, Path, PathBuf};

use serde::Serialize;
use tracing::warn;

/// A namespace of a persistent-memory region (`/sys/bus/nd/devices/namespaceR.N`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PmemNamespace {
    /// `namespace0.0`.
    pub name: String,
    /// The region it is carved from, `region0`.
    pub region: String,
    /// `fsdax`, `devdax`, `sector`, `raw` (or `unknown`).
    pub mode: String,
    pub size_bytes: u64,
    /// Its block device (`pmem0`, for `/dev/pmem0`), where it has one.
    pub blockdev: Option<String>,
    /// From the namespace's `numa_node`, or else its region's; `None` where the kernel says
    /// `-1` or nothing.
    pub numa_node: Option<u32>,
}

/// A mounted filesystem on a persistent-memory block device, or any mount with the `dax`
/// option.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PmemMount {
    /// As `/proc/mounts` names it: `/dev/pmem0`.
    pub device: String,
    pub mount_point: PathBuf,
    pub fs_type: String,
    /// Mounted with `dax` or `dax=always`: mappings of its files are the persistent memory
    /// itself, not page cache.
    pub dax: bool,
    /// The namespace whose block device (or a partition of it) is mounted.
    pub namespace: Option<String>,
    pub numa_node: Option<u32>,
}

/// Where a file lives, when it is on persistent memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PmemLocation {
    pub mount_point: PathBuf,
    pub namespace: Option<String>,
    pub dax: bool,
    pub numa_node: Option<u32>,
}

/// The persistent memory of a machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Pmem {
    /// Sorted by name; unconfigured (size 0) namespaces are left out.
    pub namespaces: Vec<PmemNamespace>,
    /// In `/proc/mounts` order.
    pub mounts: Vec<PmemMount>,
    /// Every line of the mount table: its mount point and, for a PMem mount, its index in
    /// `mounts` (so that an ordinary filesystem mounted below or over a PMem mount is seen as
    /// such).
    #[serde(skip)]
    mount_table: Vec<(PathBuf, Option<usize>)>,
}

impl Pmem {
    /// Reads `ROOT/sys/bus/nd/devices` and `ROOT/proc/mounts` (`ROOT` is `/` for this
    /// machine). A machine without persistent memory gives an empty description.
    pub fn read(root: &Path) -> Pmem {
        let namespaces = read_namespaces(&root.join("sys/bus/nd/devices"));
        let mounts_path = root.join("proc/mounts");
        let mounts_text = match fs::read_to_string(&mounts_path) {
            Ok(text) => text,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(path = %mounts_path.display(), error = %e, "cannot read the mounts");
                }
                String::new()
            }
        };
        Pmem::from_parts(namespaces, &mounts_text)
    }

    /// Namespaces as read, mounts from the text of a `/proc/mounts`.
    pub fn from_parts(namespaces: Vec<PmemNamespace>, mounts_text: &str) -> Pmem {
        let mut mounts = Vec::new();
        let mut mount_table = Vec::new();
        for line in mounts_text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [device, mount_point, fs_type, options, ..] = fields[..] else {
                continue;
            };
            let device = unescape_mount_field(device);
            let mount_point = PathBuf::from(unescape_mount_field(mount_point));
            let dax = options.split(',').any(|o| o == "dax" || o == "dax=always");
            let namespace = namespaces.iter().find(|ns| {
                ns.blockdev
                    .as_deref()
                    .is_some_and(|b| device_is_on(&device, b))
            });
            if !dax && namespace.is_none() {
                mount_table.push((mount_point, None));
                continue;
            }
            mount_table.push((mount_point.clone(), Some(mounts.len())));
            mounts.push(PmemMount {
                device,
                mount_point,
                fs_type: fs_type.to_owned(),
                dax,
                namespace: namespace.map(|ns| ns.name.clone()),
                numa_node: namespace.and_then(|ns| ns.numa_node),
            });
        }
        Pmem {
            namespaces,
            mounts,
            mount_table,
        }
    }

    /// The persistent-memory mount `path` is on (the visible mount at the deepest mount
    /// point above it), or `None` when that is an ordinary filesystem. The path is resolved
    /// (symlinks, `..`) where it exists.
    pub fn location_of(&self, path: &Path) -> Option<PmemLocation> {
        let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        let by_hand: Vec<(PathBuf, Option<usize>)>;
        let table = if self.mount_table.is_empty() {
            by_hand = (self.mounts.iter().enumerate())
                .map(|(i, m)| (m.mount_point.clone(), Some(i)))
                .collect();
            &by_hand
        } else {
            &self.mount_table
        };
        let depth = |p: &Path| p.components().filter(|c| *c != Component::RootDir).count();
        let mut best: Option<(usize, Option<usize>)> = None;
        for (mount_point, index) in table {
            if path.starts_with(mount_point) {
                let d = depth(mount_point);
                // At equal depth a later line is mounted over the earlier one.
                if best.is_none_or(|(best_depth, _)| d >= best_depth) {
                    best = Some((d, *index));
                }
            }
        }
        let mount = self.mounts.get(best?.1?)?;
        Some(PmemLocation {
            mount_point: mount.mount_point.clone(),
            namespace: mount.namespace.clone(),
            dax: mount.dax,
            numa_node: mount.numa_node,
        })
    }
}

/// `/dev/pmem0`, `/dev/pmem0p1` are on block device `pmem0`; `/dev/pmem01` is not.
fn device_is_on(device: &str, blockdev: &str) -> bool {
    let name = device.strip_prefix("/dev/").unwrap_or(device);
    match name.strip_prefix(blockdev) {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix('p')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    }
}

/// `/proc/mounts` writes space, tab, newline and backslash as `\040`, `\011`, `\012`,
/// `\134`.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4]).ok();
            if let Some(v) = octal.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_trimmed(path: &Path) -> Option<String> {
    match fs::read_to_string(path) {
        Ok(s) => Some(s.trim().to_owned()),
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(path = %path.display(), error = %e, "cannot read");
            }
            None
        }
    }
}

/// `-1` (no node) and unparsable values are `None`.
fn read_node(path: &Path) -> Option<u32> {
    let text = read_trimmed(path)?;
    match text.parse::<i64>() {
        Ok(n) if n >= 0 && n <= u32::MAX as i64 => Some(n as u32),
        Ok(_) => None,
        Err(_) => {
            warn!(path = %path.display(), value = %text, "not a NUMA node number");
            None
        }
    }
}

/// The first entry of `dir` (a `block/` directory holds the one block device).
fn first_entry(dir: &Path) -> Option<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.into_iter().next()
}

fn read_namespaces(devices: &Path) -> Vec<PmemNamespace> {
    let entries = match fs::read_dir(devices) {
        Ok(entries) => entries,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(path = %devices.display(), error = %e, "cannot list the nvdimm devices");
            }
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_prefix("namespace") else {
            continue;
        };
        let dir = devices.join(&name);
        let size_bytes = match read_trimmed(&dir.join("size")).map(|s| s.parse::<u64>()) {
            Some(Ok(size)) => size,
            Some(Err(_)) => {
                warn!(namespace = %name, "unreadable size: left out");
                continue;
            }
            None => continue,
        };
        // A namespace of size 0 is the seed the kernel offers for creating one.
        if size_bytes == 0 {
            continue;
        }
        let region = format!("region{}", id.split('.').next().unwrap_or(id));
        let mode = read_trimmed(&dir.join("mode")).unwrap_or_else(|| "unknown".to_owned());
        // The block device: a `blockdev` attribute where there is one, else the entry of
        // `block/` (raw and sector modes), else that of the holder's (the pfn or btt device
        // an fsdax or sector namespace is claimed by).
        let blockdev = read_trimmed(&dir.join("blockdev"))
            .filter(|b| !b.is_empty())
            .or_else(|| first_entry(&dir.join("block")))
            .or_else(|| {
                let holder = read_trimmed(&dir.join("holder")).filter(|h| !h.is_empty())?;
                first_entry(&devices.join(holder).join("block"))
            });
        let numa_node = read_node(&dir.join("numa_node"))
            .or_else(|| read_node(&devices.join(&region).join("numa_node")));
        out.push(PmemNamespace {
            name,
            region,
            mode,
            size_bytes,
            blockdev,
            numa_node,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}
