//! Topology from synthetic and XML descriptions and from this machine, pinning plans on 2
//! and 4 packages, persistent memory from a fake sysfs tree, binding on this machine.

use std::fs;
use std::path::Path;

use super::*;

const TWO_PACKAGES: &str = "synthetic:pack:2 numa:1 core:4 pu:1";
const FOUR_PACKAGES: &str = "synthetic:pack:4 numa:1 core:2 pu:2";

fn range(a: u32, b: u32) -> Vec<u32> {
    (a..b).collect()
}

/// (os index, package, cores, PUs) per NUMA node.
type NodeFacts = (u32, Option<u32>, usize, Vec<u32>);

fn check_nodes(spec: &str, want: &[NodeFacts]) {
    let t = Topology::from_spec(spec).unwrap();
    let got: Vec<NodeFacts> = (t.numa_nodes.iter())
        .map(|n| (n.os_index, n.package, n.n_cores, n.pus.clone()))
        .collect();
    assert_eq!(got, want, "{spec}");
    assert_eq!(t.source, spec);
    for n in &t.numa_nodes {
        assert_eq!(n.kind, MemoryKind::Dram);
        assert!(
            n.memory_bytes > 0,
            "{spec}: node {} has no memory",
            n.os_index
        );
    }
    assert!(t.pmem.namespaces.is_empty() && t.pmem.mounts.is_empty());
}

#[test]
fn topology_synthetic_two_and_four_packages() {
    check_nodes(
        TWO_PACKAGES,
        &[(0, Some(0), 4, range(0, 4)), (1, Some(1), 4, range(4, 8))],
    );
    check_nodes(
        FOUR_PACKAGES,
        &[
            (0, Some(0), 2, range(0, 4)),
            (1, Some(1), 2, range(4, 8)),
            (2, Some(2), 2, range(8, 12)),
            (3, Some(3), 2, range(12, 16)),
        ],
    );
    // Two NUMA nodes per package (sub-NUMA clustering).
    check_nodes(
        "synthetic:pack:2 numa:2 core:2 pu:1",
        &[
            (0, Some(0), 2, range(0, 2)),
            (1, Some(0), 2, range(2, 4)),
            (2, Some(1), 2, range(4, 6)),
            (3, Some(1), 2, range(6, 8)),
        ],
    );
    let t = Topology::from_spec(TWO_PACKAGES).unwrap();
    let packages: Vec<(u32, usize, Vec<u32>, Vec<u32>)> = (t.packages.iter())
        .map(|p| (p.index, p.n_cores, p.pus.clone(), p.numa_nodes.clone()))
        .collect();
    assert_eq!(
        packages,
        vec![(0, 4, range(0, 4), vec![0]), (1, 4, range(4, 8), vec![1])]
    );
}

#[test]
fn topology_bad_specs_are_named() {
    for (spec, want) in [
        (
            "pack:2 core:2",
            "expected synthetic:<hwloc synthetic description>",
        ),
        ("", "expected synthetic:"),
        ("synthetic:pack:two", "hwloc refused it"),
        ("xml:/nonexistent/topology.xml", "/nonexistent/topology.xml"),
    ] {
        let err = Topology::from_spec(spec).unwrap_err().to_string();
        assert!(err.contains(want), "{spec:?}: {err}");
    }
}

#[test]
fn topology_from_xml_is_the_same_machine() {
    let dir = tempfile::tempdir().unwrap();
    let xml = dir.path().join("two.xml");
    let hw = hwlocality::Topology::builder()
        .from_synthetic("pack:2 numa:1 core:4 pu:1")
        .unwrap()
        .build()
        .unwrap();
    hw.export_xml_file(Some(xml.as_path()), Default::default())
        .unwrap();
    let spec = format!("xml:{}", xml.display());
    let from_xml = Topology::from_spec(&spec).unwrap();
    let synthetic = Topology::from_spec(TWO_PACKAGES).unwrap();
    assert_eq!(from_xml.source, spec);
    assert_eq!(from_xml.packages, synthetic.packages);
    assert_eq!(from_xml.numa_nodes, synthetic.numa_nodes);
}

/// (NUMA node, PUs, memory node) per expert node, and (NUMA node, PUs) per coordinator part.
fn check_plan(
    t: &Topology,
    n_expert_nodes: usize,
    want_nodes: &[(u32, Vec<u32>, u32)],
    want_coordinator: &[(u32, Vec<u32>)],
) {
    let plan = t.node_plan(n_expert_nodes).unwrap();
    let got: Vec<(u32, Vec<u32>, u32)> = (plan.expert_nodes.iter())
        .map(|p| (p.numa_node, p.pus.clone(), p.memory_node))
        .collect();
    assert_eq!(got, want_nodes, "{}: {n_expert_nodes} nodes", t.source);
    let got: Vec<(u32, Vec<u32>)> = (plan.coordinator.iter())
        .map(|c| {
            assert_eq!(c.memory_node, c.numa_node);
            (c.numa_node, c.pus.clone())
        })
        .collect();
    assert_eq!(got, want_coordinator, "{}: coordinator", t.source);
}

#[test]
fn topology_node_plan_two_packages() {
    let t = Topology::from_spec(TWO_PACKAGES).unwrap();
    let halves = [(0, range(0, 4)), (1, range(4, 8))];
    check_plan(&t, 2, &[(0, range(0, 4), 0), (1, range(4, 8), 1)], &halves);
    // One node: the first socket only; the coordinator still uses both.
    check_plan(&t, 1, &[(0, range(0, 4), 0)], &halves);
    // Two nodes per socket divide its cores.
    check_plan(
        &t,
        4,
        &[
            (0, range(0, 2), 0),
            (1, range(4, 6), 1),
            (0, range(2, 4), 0),
            (1, range(6, 8), 1),
        ],
        &halves,
    );
    // Three nodes: socket 0 is shared by two, socket 1 has one.
    check_plan(
        &t,
        3,
        &[
            (0, range(0, 2), 0),
            (1, range(4, 8), 1),
            (0, range(2, 4), 0),
        ],
        &halves,
    );
    assert_eq!(t.pin_for_numa_node(1).unwrap().pus, range(4, 8));
    let err = t.pin_for_numa_node(2).unwrap_err().to_string();
    assert!(
        err.contains("no NUMA node 2") && err.contains("nodes: 0-1"),
        "{err}"
    );
    assert!(matches!(t.node_plan(0), Err(TopologyError::NoExpertNodes)));
}

#[test]
fn topology_node_plan_four_packages() {
    let t = Topology::from_spec(FOUR_PACKAGES).unwrap();
    let sockets: Vec<(u32, Vec<u32>)> = (0..4).map(|i| (i, range(4 * i, 4 * i + 4))).collect();
    let want: Vec<(u32, Vec<u32>, u32)> = (0..4).map(|i| (i, range(4 * i, 4 * i + 4), i)).collect();
    check_plan(&t, 4, &want, &sockets);
    let plan = t.node_plan(4).unwrap();
    let packages: Vec<Option<u32>> = plan.expert_nodes.iter().map(|p| p.package).collect();
    assert_eq!(packages, vec![Some(0), Some(1), Some(2), Some(3)]);
    // More nodes than units on a socket: units are shared round-robin.
    let tiny = Topology::from_spec("synthetic:pack:2 numa:1 core:1 pu:1").unwrap();
    check_plan(
        &tiny,
        4,
        &[
            (0, vec![0], 0),
            (1, vec![1], 1),
            (0, vec![0], 0),
            (1, vec![1], 1),
        ],
        &[(0, vec![0]), (1, vec![1])],
    );
}

#[test]
fn topology_this_machine() {
    let t = Topology::detect().unwrap();
    assert_eq!(t.source, "this machine");
    assert!(!t.packages.is_empty() && !t.numa_nodes.is_empty());
    let all_pus: Vec<u32> = {
        let mut v: Vec<u32> = t.packages.iter().flat_map(|p| p.pus.clone()).collect();
        v.sort_unstable();
        v
    };
    assert!(!all_pus.is_empty());
    let compute = t.compute_nodes();
    let plan = t.node_plan(compute.len()).unwrap();
    assert_eq!(plan.expert_nodes.len(), compute.len());
    if compute.len() == 1 {
        // One NUMA node: everything on it.
        let node = compute[0].os_index;
        check_plan(
            &t,
            1,
            &[(node, all_pus.clone(), node)],
            &[(node, all_pus.clone())],
        );
        assert_eq!(t.pin_for_numa_node(node).unwrap().pus, all_pus);
    }
    let text = t.to_text();
    assert!(
        text.starts_with("topology: this machine\npackage 0: "),
        "{text}"
    );
    assert!(text.contains("numa "), "{text}");
}

/// A machine with two PMem regions, on NUMA nodes 0 and 1, under `root`.
fn fake_pmem_machine(root: &Path) {
    let devices = root.join("sys/bus/nd/devices");
    let write = |rel: &str, text: &str| {
        let path = devices.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, format!("{text}\n")).unwrap();
    };
    write("region0/numa_node", "0");
    write("region1/numa_node", "1");
    write("ndbus0/provider", "ACPI.NFIT");
    // Region 0's namespace in fsdax mode: its block device hangs below the pfn device
    // claiming it, as the kernel lays it out.
    write("namespace0.0/mode", "fsdax");
    write("namespace0.0/size", "135291469824");
    write("namespace0.0/numa_node", "0");
    write("namespace0.0/holder", "pfn0.1");
    fs::create_dir_all(devices.join("pfn0.1/block/pmem0")).unwrap();
    // Region 1's: a blockdev attribute, no node of its own (the region's applies).
    write("namespace1.0/mode", "fsdax");
    write("namespace1.0/size", "135291469824");
    write("namespace1.0/numa_node", "-1");
    write("namespace1.0/blockdev", "pmem1");
    // The seed namespace the kernel offers for creating another: left out.
    write("namespace1.1/mode", "raw");
    write("namespace1.1/size", "0");
    let mnt = root.join("mnt");
    for dir in ["pmem0/scratch", "pmem 1", "disk"] {
        fs::create_dir_all(mnt.join(dir)).unwrap();
    }
    let mnt = fs::canonicalize(mnt).unwrap();
    let m = mnt.display();
    let mounts = format!(
        "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0\n\
         /dev/sda1 {m}/disk ext4 rw,relatime 0 0\n\
         /dev/pmem0 {m}/pmem0 ext4 rw,relatime,dax=always 0 0\n\
         /dev/pmem1p1 {m}/pmem\\0401 xfs rw,relatime,attr2,dax,inode64 0 0\n\
         tmpfs {m}/pmem0/scratch tmpfs rw,relatime 0 0\n"
    );
    fs::create_dir_all(root.join("proc")).unwrap();
    fs::write(root.join("proc/mounts"), mounts).unwrap();
    for file in ["pmem0/model.gguf", "pmem 1/model.gguf", "disk/model.gguf"] {
        fs::write(mnt.join(file), b"GGUF").unwrap();
    }
}

#[test]
fn topology_pmem_from_a_fake_sysfs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fake_pmem_machine(root);
    let pmem = Pmem::read(root);
    type NamespaceFacts<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, Option<u32>);
    let namespaces: Vec<NamespaceFacts> = (pmem.namespaces.iter())
        .map(|ns| {
            assert_eq!(ns.size_bytes, 135291469824);
            (
                ns.name.as_str(),
                ns.region.as_str(),
                ns.mode.as_str(),
                ns.blockdev.as_deref(),
                ns.numa_node,
            )
        })
        .collect();
    assert_eq!(
        namespaces,
        vec![
            ("namespace0.0", "region0", "fsdax", Some("pmem0"), Some(0)),
            ("namespace1.0", "region1", "fsdax", Some("pmem1"), Some(1)),
        ]
    );
    let mnt = fs::canonicalize(root.join("mnt")).unwrap();
    type MountFacts<'a> = (
        &'a str,
        std::path::PathBuf,
        bool,
        Option<&'a str>,
        Option<u32>,
    );
    let mounts: Vec<MountFacts> = (pmem.mounts.iter())
        .map(|m| {
            (
                m.device.as_str(),
                m.mount_point.clone(),
                m.dax,
                m.namespace.as_deref(),
                m.numa_node,
            )
        })
        .collect();
    assert_eq!(
        mounts,
        vec![
            (
                "/dev/pmem0",
                mnt.join("pmem0"),
                true,
                Some("namespace0.0"),
                Some(0)
            ),
            (
                "/dev/pmem1p1",
                mnt.join("pmem 1"),
                true,
                Some("namespace1.0"),
                Some(1)
            ),
        ]
    );

    let t = Topology::from_spec(TWO_PACKAGES).unwrap().with_pmem(pmem);
    for (file, want) in [
        ("pmem0/model.gguf", Some(0)),
        ("pmem 1/model.gguf", Some(1)),
        ("pmem 1/../pmem0/model.gguf", Some(0)),
        ("disk/model.gguf", None),
        ("pmem0/scratch/x.gguf", None),
    ] {
        assert_eq!(t.numa_node_of_path(&mnt.join(file)), want, "{file}");
    }
    // Each expert node is told where its shard belongs.
    let plan = t.node_plan(2).unwrap();
    assert_eq!(plan.expert_nodes[0].pmem_mounts, vec![mnt.join("pmem0")]);
    assert_eq!(plan.expert_nodes[1].pmem_mounts, vec![mnt.join("pmem 1")]);

    let text = plan.to_text();
    for want in [
        "plan: expert node 0 on numa 0: PUs 0-3, memory node 0, shard on ",
        "plan: coordinator part on numa 1: PUs 4-7, memory node 1\n",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    let text = t.to_text();
    for want in [
        "package 1: 4 cores, PUs 4-7, NUMA nodes 1\n",
        "numa 1 (package 1, DRAM): 4 cores, PUs 4-7, 1.0 GiB\n",
        "pmem namespace0.0 (region0, fsdax, 126.0 GiB, /dev/pmem0): numa 0\n",
        "pmem namespace1.0 (region1, fsdax, 126.0 GiB, /dev/pmem1): numa 1\n",
        "(/dev/pmem1p1, xfs, dax): numa 1\n",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    let json = serde_json::to_value(&t).unwrap();
    assert_eq!(
        json["numa_nodes"][1]["pus"],
        serde_json::json!([4, 5, 6, 7])
    );
    assert_eq!(json["numa_nodes"][1]["kind"], "DRAM");
    assert_eq!(json["pmem"]["namespaces"][1]["numa_node"], 1);
    assert_eq!(json["pmem"]["mounts"][0]["dax"], true);
}

#[test]
fn topology_no_pmem_where_there_is_no_sysfs() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(Pmem::read(dir.path()), Pmem::default());
    assert!(Topology::from_spec(TWO_PACKAGES)
        .unwrap()
        .to_text()
        .ends_with("pmem: none\n"));
}

#[test]
fn topology_mount_fields_and_devices() {
    assert_eq!(
        unescape_for_test("/mnt/a\\040b\\011c\\134d"),
        "/mnt/a b\tc\\d"
    );
    assert_eq!(unescape_for_test("/mnt/trailing\\04"), "/mnt/trailing\\04");
    let ns = |blockdev: &str| PmemNamespace {
        name: "namespace0.0".into(),
        region: "region0".into(),
        mode: "fsdax".into(),
        size_bytes: 1,
        blockdev: Some(blockdev.into()),
        numa_node: Some(0),
    };
    for (device, blockdev, want) in [
        ("/dev/pmem0", "pmem0", true),
        ("/dev/pmem0p2", "pmem0", true),
        ("/dev/pmem01", "pmem0", false),
        ("/dev/pmem0p", "pmem0", false),
        ("/dev/pmem0.1", "pmem0.1", true),
    ] {
        let pmem = Pmem::from_parts(vec![ns(blockdev)], &format!("{device} /x ext4 rw 0 0"));
        assert_eq!(pmem.mounts.len() == 1, want, "{device} on {blockdev}");
    }
}

fn unescape_for_test(s: &str) -> String {
    let pmem = Pmem::from_parts(Vec::new(), &format!("/dev/x {s} ext4 rw,dax 0 0"));
    pmem.mounts[0].mount_point.display().to_string()
}

#[test]
fn topology_format_list() {
    for (values, want) in [
        (vec![], "-"),
        (vec![3], "3"),
        (vec![0, 1, 2, 3], "0-3"),
        (vec![0, 2, 3, 4, 8, 10, 11], "0,2-4,8,10-11"),
    ] {
        assert_eq!(format_list(&values), want);
    }
}

#[test]
fn topology_binder_on_this_machine() {
    let t = Topology::detect().unwrap();
    let node = t.compute_nodes()[0].clone();
    let handle = std::thread::spawn(move || {
        let binder = Binder::this_machine().unwrap();
        binder.bind_thread_cpus(&node.pus).unwrap();
        assert_eq!(binder.thread_cpus().unwrap(), node.pus);
        // A unit this machine lacks: an error naming it, and the binding is unchanged.
        let err = binder.bind_thread_cpus(&[4000]).unwrap_err().to_string();
        assert!(err.contains("PUs 4000"), "{err}");
        assert_eq!(binder.thread_cpus().unwrap(), node.pus);
        let buffer = vec![1u8; 5 * 4096];
        let covered = binder.bind_area(&buffer, node.os_index).unwrap();
        assert!((4 * 4096..=5 * 4096).contains(&covered), "{covered}");
        assert_eq!(binder.bind_area(&buffer[1..10], node.os_index).unwrap(), 0);
        let err = binder.bind_area(&buffer, 4000).unwrap_err().to_string();
        assert!(err.contains("NUMA node 4000"), "{err}");
    });
    handle.join().unwrap();
}

/// Two packages, each with a DRAM node (0, 1) and an NVM node (2, 3: a DAX device onlined as
/// memory), as hwloc describes an Optane box whose PMem is used through `daxctl`.
fn nvm_machine_xml() -> String {
    let node = |os: u32, cpuset: &str, nvm: bool| {
        let nodeset = format!("0x{:08x}", 1u32 << os);
        let (subtype, info) = if nvm {
            (
                " subtype=\"NVM\"",
                format!(
                    "\n        <info name=\"DAXDevice\" value=\"dax{}.0\"/>",
                    os - 2
                ),
            )
        } else {
            ("", String::new())
        };
        format!(
            "      <object type=\"NUMANode\"{subtype} os_index=\"{os}\" cpuset=\"{cpuset}\" \
             complete_cpuset=\"{cpuset}\" nodeset=\"{nodeset}\" complete_nodeset=\"{nodeset}\" \
             gp_index=\"{}\" local_memory=\"{}\">{info}\n      </object>\n",
            100 + os,
            if nvm { 1u64 << 40 } else { 1u64 << 36 },
        )
    };
    let package = |os: u32, cpuset: &str, nodeset: &str| {
        format!(
            "    <object type=\"Package\" os_index=\"{os}\" cpuset=\"{cpuset}\" \
             complete_cpuset=\"{cpuset}\" nodeset=\"{nodeset}\" complete_nodeset=\"{nodeset}\" \
             gp_index=\"{}\">\n{}{}      <object type=\"Core\" os_index=\"0\" cpuset=\"{cpuset}\" \
             complete_cpuset=\"{cpuset}\" nodeset=\"{nodeset}\" complete_nodeset=\"{nodeset}\" \
             gp_index=\"{}\">\n        <object type=\"PU\" os_index=\"{os}\" cpuset=\"{cpuset}\" \
             complete_cpuset=\"{cpuset}\" nodeset=\"{nodeset}\" complete_nodeset=\"{nodeset}\" \
             gp_index=\"{}\"/>\n      </object>\n    </object>\n",
            10 + os,
            node(os, cpuset, false),
            node(os + 2, cpuset, true),
            20 + os,
            30 + os,
        )
    };
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE topology SYSTEM \"hwloc2.dtd\">\n\
         <topology version=\"2.0\">\n  <object type=\"Machine\" os_index=\"0\" \
         cpuset=\"0x00000003\" complete_cpuset=\"0x00000003\" allowed_cpuset=\"0x00000003\" \
         nodeset=\"0x0000000f\" complete_nodeset=\"0x0000000f\" allowed_nodeset=\"0x0000000f\" \
         gp_index=\"1\">\n{}{}  </object>\n  <support name=\"discovery.pu\"/>\n  \
         <support name=\"discovery.numa\"/>\n  <support name=\"discovery.numa_memory\"/>\n\
         </topology>\n",
        package(0, "0x00000001", "0x00000005"),
        package(1, "0x00000002", "0x0000000a"),
    )
}

#[test]
fn topology_nvm_memory_nodes_from_xml() {
    let dir = tempfile::tempdir().unwrap();
    let xml = dir.path().join("optane.xml");
    fs::write(&xml, nvm_machine_xml()).unwrap();
    let t = Topology::from_spec(&format!("xml:{}", xml.display())).unwrap();
    type Facts<'a> = (u32, Option<u32>, String, Option<&'a str>, Vec<u32>);
    let nodes: Vec<Facts> = (t.numa_nodes.iter())
        .map(|n| {
            (
                n.os_index,
                n.package,
                n.kind.to_string(),
                n.dax_device.as_deref(),
                n.pus.clone(),
            )
        })
        .collect();
    assert_eq!(
        nodes,
        vec![
            (0, Some(0), "DRAM".into(), None, vec![0]),
            (1, Some(1), "DRAM".into(), None, vec![1]),
            (2, Some(0), "NVM".into(), Some("dax0.0"), vec![0]),
            (3, Some(1), "NVM".into(), Some("dax1.0"), vec![1]),
        ]
    );
    assert_eq!(t.packages[0].numa_nodes, vec![0, 2]);
    // The NVM nodes are memory, not sockets: one expert node per DRAM node.
    check_plan(
        &t,
        2,
        &[(0, vec![0], 0), (1, vec![1], 1)],
        &[(0, vec![0]), (1, vec![1])],
    );
    let text = t.to_text();
    assert!(
        text.contains("numa 3 (package 1, NVM, dax1.0): 1 cores, PUs 1, 1024.0 GiB\n"),
        "{text}"
    );
}
