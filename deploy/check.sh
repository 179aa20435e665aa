#!/usr/bin/env bash
# Checks of deploy/ (run by scripts/test after the workspace tests, or by hand):
#  - the scripts: bash -n, and shellcheck where it is installed;
#  - the systemd units: systemd-analyze verify (where systemd is installed), the sysusers
#    file, and that every variable the units' command lines use is set by each example
#    environment file;
#  - pmem-provision.sh: --dry-run on this machine, without its tools, and on fake sysfs
#    trees (regions without namespaces, namespaces already mounted, a devdax namespace that
#    needs --force); the refusals of a real run (missing tools, not root);
#  - the example cluster files parse (moeshard plan on a fixture), and the example plans
#    resolve against DeepSeek-V3's real shape (a sparse file with synth's header) and name
#    the cluster's nodes;
#  - end to end: the units' command lines, expanded as systemd expands them with the example
#    environment files (paths and ports overridden), start two expert nodes (gRPC, and QUIC
#    with the certificate it creates) from `moeshard split` files and `moeshard serve` with a
#    cluster file; /health, /metrics and a completion answer; SIGTERM stops all three cleanly.
# Needs target/debug/moeshard (cargo build -p coordinator), or MOESHARD_BIN.
set -euo pipefail

deploy="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$deploy")"
bin="${MOESHARD_BIN:-$repo/target/debug/moeshard}"
fixture="$repo/tests/fixtures/qwen3moe/model-q4_k_m.gguf"
work="$(mktemp -d)"
pids=()

cleanup() {
  local p
  for p in "${pids[@]}"; do
    kill -KILL "$p" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# A process waited for: its id may be reused, so cleanup must not kill it.
forget_pid() {
  local keep=() p
  for p in "${pids[@]}"; do
    [ "$p" = "$1" ] || keep+=("$p")
  done
  pids=("${keep[@]}")
}

checks=0
ok() {
  checks=$((checks + 1))
  printf 'ok    %s\n' "$1"
}
skip() { printf 'skip  %s\n' "$1"; }
fail() {
  printf 'FAIL  %s\n' "$1" >&2
  if [ $# -ge 2 ] && [ -f "$2" ]; then
    sed 's/^/      /' "$2" | tail -n 40 >&2
  fi
  exit 1
}

echo "== deploy/check.sh"
[ -x "$bin" ] || fail "no moeshard binary at $bin: build it (cargo build -p coordinator) or set MOESHARD_BIN"

# --- scripts -----------------------------------------------------------------------------

for script in "$deploy"/*.sh; do
  bash -n "$script" || fail "bash -n ${script#"$repo"/}"
done
ok "bash -n deploy/*.sh"
if command -v shellcheck >/dev/null 2>&1; then
  shellcheck "$deploy"/*.sh >"$work/shellcheck.out" 2>&1 || fail "shellcheck deploy/*.sh" "$work/shellcheck.out"
  ok "shellcheck deploy/*.sh"
else
  skip "shellcheck not installed (apt-get install shellcheck): bash -n only"
fi

# --- systemd units -----------------------------------------------------------------------

units="$deploy/systemd"
system_units=""
for d in /usr/lib/systemd/system /lib/systemd/system; do
  if [ -f "$d/sysinit.target" ]; then
    system_units="$d"
    break
  fi
done
if command -v systemd-analyze >/dev/null 2>&1 && [ -n "$system_units" ]; then
  # A root holding the system's units, the binary where the units expect it, and ours.
  vroot="$work/verify-root"
  mkdir -p "$vroot/usr/lib/systemd" "$vroot/usr/local/bin" "$vroot/etc/systemd/system"
  cp -a "$system_units" "$vroot/usr/lib/systemd/system"
  cp "$bin" "$vroot/usr/local/bin/moeshard"
  cp -a "$units"/moeshard-* "$vroot/etc/systemd/system/"
  (cd "$vroot" && systemd-analyze verify --root="$vroot" \
    moeshard-coordinator.service moeshard-expert-node@0.service moeshard-expert-node@1.service) \
    >"$work/verify.out" 2>&1 || fail "systemd-analyze verify" "$work/verify.out"
  # It reports unknown keys and bad values without failing: any output is a finding.
  [ ! -s "$work/verify.out" ] || fail "systemd-analyze verify printed findings" "$work/verify.out"
  ok "systemd-analyze verify: coordinator (with the single-box drop-in), expert-node@0 and @1"
else
  skip "systemd-analyze or the system's units not found: units not verified"
fi
if command -v systemd-sysusers >/dev/null 2>&1; then
  sroot="$work/sysusers-root"
  mkdir -p "$sroot/etc"
  systemd-sysusers --root="$sroot" "$units/moeshard.sysusers.conf" >"$work/sysusers.out" 2>&1 ||
    fail "systemd-sysusers moeshard.sysusers.conf" "$work/sysusers.out"
  grep -q '^moeshard:' "$sroot/etc/passwd" || fail "systemd-sysusers did not create the moeshard user" "$work/sysusers.out"
  ok "systemd-sysusers creates the moeshard user"
else
  skip "systemd-sysusers not installed: sysusers file not checked"
fi

# The environment an EnvironmentFile gives, after a unit's Environment= defaults, written as
# KEY<TAB>VALUE lines (later ones win). Values: as systemd reads them for these files
# (KEY=value or KEY="value with spaces"; # comments).
unit_env() {
  local unit="$1" envfile="$2" a line key value
  local assignments=()
  while read -r -a assignments; do
    for a in "${assignments[@]}"; do
      printf '%s\t%s\n' "${a%%=*}" "${a#*=}"
    done
  done < <(sed -n 's/^Environment=//p' "$unit")
  while IFS= read -r line || [ -n "$line" ]; do
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
    [[ "$line" =~ ^([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || fail "${envfile#"$repo"/}: not KEY=value: $line"
    key="${BASH_REMATCH[1]}"
    value="${BASH_REMATCH[2]}"
    if [[ "$value" =~ ^\"(.*)\"$ ]]; then
      value="${BASH_REMATCH[1]}"
    fi
    printf '%s\t%s\n' "$key" "$value"
  done <"$envfile"
}

# The command line of a unit's ExecStart= for instance $3, one argument per line, expanded as
# systemd does: %i is the instance, ${VAR} one argument, $VAR split on whitespace (none when
# empty). The units' command lines have no quotes, so words are split on whitespace.
exec_argv() {
  local unit="$1" envfile="$2" instance="$3" cmd word name key value
  local -A env=()
  unit_env "$unit" "$envfile" >"$work/unit-env.tsv"
  while IFS=$'\t' read -r key value; do
    env[$key]="$value"
  done <"$work/unit-env.tsv"
  cmd="$(sed -n 's/^ExecStart=//p' "$unit")"
  [ -n "$cmd" ] || fail "${unit#"$repo"/}: no ExecStart="
  cmd="${cmd//%i/$instance}"
  for word in $cmd; do
    if [[ "$word" =~ ^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$ ]]; then
      name="${BASH_REMATCH[1]}"
      [ -n "${env[$name]+set}" ] || fail "${envfile#"$repo"/}: ${unit##*/} uses \${$name}, which neither it nor the file sets"
      printf '%s\n' "${env[$name]}"
    elif [[ "$word" =~ ^\$([A-Za-z_][A-Za-z0-9_]*)$ ]]; then
      name="${BASH_REMATCH[1]}"
      [ -n "${env[$name]+set}" ] || fail "${envfile#"$repo"/}: ${unit##*/} uses \$$name, which neither it nor the file sets"
      for value in ${env[$name]}; do
        printf '%s\n' "$value"
      done
    elif [[ "$word" == *'$'* || "$word" == *'%'* ]]; then
      fail "${unit#"$repo"/}: cannot expand '$word'"
    else
      printf '%s\n' "$word"
    fi
  done
}

node_unit="$units/moeshard-expert-node@.service"
coord_unit="$units/moeshard-coordinator.service"
for f in "$deploy"/env/*/node-*.env; do
  exec_argv "$node_unit" "$f" 0 >/dev/null
done
for f in "$deploy"/env/*/coordinator.env; do
  exec_argv "$coord_unit" "$f" "" >/dev/null
done
ok "every example environment file sets every variable its unit's ExecStart uses"

# --- pmem-provision.sh -------------------------------------------------------------------

pmem="$deploy/pmem-provision.sh"
"$pmem" --help >"$work/help.out" 2>&1 || fail "pmem-provision.sh --help" "$work/help.out"
grep -q -- '--dry-run' "$work/help.out" || fail "pmem-provision.sh --help does not mention --dry-run" "$work/help.out"
ok "pmem-provision.sh --help"

status=0
"$pmem" --dry-run --root / --fstab "$work/none" >"$work/here.out" 2>&1 || status=$?
[ "$status" -eq 0 ] || fail "pmem-provision.sh --dry-run on this machine: exit $status" "$work/here.out"
grep -q '^+ mount -o dax=always /dev/pmem' "$work/here.out" || fail "pmem-provision.sh --dry-run on this machine: no mount" "$work/here.out"
ok "pmem-provision.sh --dry-run on this machine (no PMem): prints goal, namespace, mkfs, mount, fstab"

# A PATH with everything this machine has except the PMem and file system tools.
nopmem="$work/nopmem-bin"
mkdir -p "$nopmem"
IFS=: read -r -a path_dirs <<<"$PATH"
for d in "${path_dirs[@]}" /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
  [ -d "$d" ] || continue
  for f in "$d"/*; do
    name="${f##*/}"
    case "$name" in
      ipmctl | ndctl | mkfs.xfs | mkfs.ext4 | xfs_io) continue ;;
    esac
    if [ -x "$f" ] && [ ! -e "$nopmem/$name" ]; then
      ln -s "$f" "$nopmem/$name"
    fi
  done
done

status=0
PATH="$nopmem" "$pmem" --dry-run --sockets 0,1 --fstab "$work/none" >"$work/notools.out" 2>&1 || status=$?
[ "$status" -eq 0 ] || fail "pmem-provision.sh --dry-run without ipmctl/ndctl: exit $status" "$work/notools.out"
for want in \
  '^# missing tools: ipmctl (ipmctl) ndctl (ndctl)' \
  '^+ ipmctl create -goal -socket 0 PersistentMemoryType=AppDirect$' \
  '^+ ipmctl create -goal -socket 1 PersistentMemoryType=AppDirect$' \
  '^Reboot needed' \
  '^+ ndctl create-namespace --mode=fsdax --region=region1$' \
  '^+ mkfs.xfs -f -m reflink=0 -d su=2m,sw=1 /dev/pmem1$' \
  '^+ mount -o dax=always /dev/pmem0 /mnt/pmem0$' \
  "^+ echo 'UUID=<uuid of /dev/pmem1> /mnt/pmem1 xfs dax=always,nofail 0 0' >> "; do
  grep -q -- "$want" "$work/notools.out" || fail "pmem-provision.sh --dry-run --sockets 0,1 without tools: no line like: $want" "$work/notools.out"
done
ok "pmem-provision.sh --dry-run --sockets 0,1 without ipmctl/ndctl/mkfs: every step, tools named"

# Fake machines: sysfs as the kernel writes it (fsdax namespaces say "memory" and are
# claimed by a pfn device that has the block device).
fake_region() { # root region numa size
  local d="$1/sys/bus/nd/devices/$2"
  mkdir -p "$d" "$1/sys/devices/system/node/node$3"
  echo "$3" >"$d/numa_node"
  echo "$4" >"$d/size"
  echo "$4" >"$d/available_size"
  echo "0-7" >"$1/sys/devices/system/node/node$3/cpulist"
  # The seed namespace every region offers.
  mkdir -p "$1/sys/bus/nd/devices/namespace${2#region}.0"
  echo 0 >"$1/sys/bus/nd/devices/namespace${2#region}.0/size"
}
fake_namespace() { # root name mode size [holder blockdev]
  local d="$1/sys/bus/nd/devices/$2"
  mkdir -p "$d"
  echo "$3" >"$d/mode"
  echo "$4" >"$d/size"
  local region="region${2#namespace}"
  echo 0 >"$1/sys/bus/nd/devices/${region%%.*}/available_size"
  if [ $# -ge 6 ]; then
    echo "$5" >"$d/holder"
    mkdir -p "$1/sys/bus/nd/devices/$5/block/$6"
  fi
}
size=1623497637888 # 1.5 TiB less the label area, as a 6 x 256 GB region shows it

# Two regions, no namespaces yet (right after the goal's reboot).
fresh="$work/fake-fresh"
fake_region "$fresh" region0 0 "$size"
fake_region "$fresh" region1 1 "$size"
mkdir -p "$fresh/proc" && : >"$fresh/proc/mounts"
"$pmem" --dry-run --root "$fresh" --fstab "$work/none" >"$work/fresh.out" 2>&1 || fail "pmem-provision.sh --dry-run, two fresh regions" "$work/fresh.out"
# A goal command, not the install hint for missing tools (which names the ipmctl package).
grep -q '^+ ipmctl' "$work/fresh.out" && fail "pmem-provision.sh: a goal for sockets that have regions" "$work/fresh.out"
grep -q '^sockets: 0 1 ' "$work/fresh.out" || fail "pmem-provision.sh: sockets not taken from the regions" "$work/fresh.out"
for r in 0 1; do
  grep -q "^+ ndctl create-namespace --mode=fsdax --region=region$r\$" "$work/fresh.out" ||
    fail "pmem-provision.sh: no namespace for region$r" "$work/fresh.out"
done
ok "pmem-provision.sh --dry-run, two regions without namespaces: no goal, a namespace per region"

# Already done: fsdax namespaces, mounted with DAX, in fstab: nothing to change.
done_root="$work/fake-done"
fake_region "$done_root" region0 0 "$size"
fake_region "$done_root" region1 1 "$size"
fake_namespace "$done_root" namespace0.0 memory "$size" pfn0.1 pmem0
fake_namespace "$done_root" namespace1.0 memory "$size" pfn1.1 pmem1
mkdir -p "$done_root/proc"
cat >"$done_root/proc/mounts" <<'EOF'
/dev/vda1 / ext4 rw,relatime 0 0
/dev/pmem0 /mnt/pmem0 xfs rw,relatime,attr2,dax=always,inode64,logbufs=8,logbsize=32k,sunit=4096,swidth=4096,noquota 0 0
/dev/pmem1 /mnt/pmem1 xfs rw,relatime,attr2,dax=always,inode64,logbufs=8,logbsize=32k,sunit=4096,swidth=4096,noquota 0 0
EOF
cat >"$work/fstab-done" <<'EOF'
# <file system> <mount point> <type> <options> <dump> <pass>
UUID=0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9 / ext4 errors=remount-ro 0 1
UUID=6f2b8f5e-0c4d-4e0b-9a57-1d2e3f405162 /mnt/pmem0 xfs dax=always,nofail 0 0
UUID=7a3c9e6f-1d5e-4f1c-8b68-2e3f40516273 /mnt/pmem1 xfs dax=always,nofail 0 0
EOF
"$pmem" --dry-run --root "$done_root" --fstab "$work/fstab-done" >"$work/done.out" 2>&1 ||
  fail "pmem-provision.sh --dry-run, already provisioned" "$work/done.out"
if grep '^+' "$work/done.out" | grep -v '^+ install -d -m 0755 /mnt/pmem[01]/moeshard$' | grep -q .; then
  fail "pmem-provision.sh: changes on a provisioned machine" "$work/done.out"
fi
grep -q 'warning' "$work/done.out" && fail "pmem-provision.sh: warnings on a provisioned machine" "$work/done.out"
grep -q 'namespace1.0 (fsdax, 1.5 TiB, /dev/pmem1): fsdax namespace already there' "$work/done.out" ||
  fail "pmem-provision.sh: the existing namespace not recognised" "$work/done.out"
ok "pmem-provision.sh --dry-run, already provisioned: nothing to change"

# A devdax namespace in the way: refused without --force, destroyed with it.
dax_root="$work/fake-devdax"
fake_region "$dax_root" region0 0 "$size"
fake_region "$dax_root" region1 1 "$size"
fake_namespace "$dax_root" namespace0.0 memory "$size" pfn0.1 pmem0
fake_namespace "$dax_root" namespace1.0 dax "$size"
cp "$done_root/proc/mounts" "$work/mounts"
mkdir -p "$dax_root/proc" && grep -v pmem1 "$work/mounts" >"$dax_root/proc/mounts"
status=0
"$pmem" --dry-run --root "$dax_root" --fstab "$work/fstab-done" >"$work/devdax.out" 2>&1 || status=$?
[ "$status" -eq 1 ] || fail "pmem-provision.sh: a devdax namespace not refused (exit $status)" "$work/devdax.out"
grep -q 'region1 (socket 1) already has namespace(s) that may hold data: namespace1.0 (devdax, 1.5 TiB)' "$work/devdax.out" ||
  fail "pmem-provision.sh: the refusal does not name the namespace" "$work/devdax.out"
grep -q 'destroy-namespace' "$work/devdax.out" && fail "pmem-provision.sh: destroys without --force" "$work/devdax.out"
"$pmem" --dry-run --force --root "$dax_root" --fstab "$work/fstab-done" >"$work/force.out" 2>&1 ||
  fail "pmem-provision.sh --dry-run --force, devdax namespace" "$work/force.out"
grep -q '^+ ndctl destroy-namespace --force namespace1.0$' "$work/force.out" || fail "pmem-provision.sh --force: no destroy-namespace" "$work/force.out"
grep -q '^+ ndctl create-namespace --mode=fsdax --region=region1$' "$work/force.out" || fail "pmem-provision.sh --force: no new namespace" "$work/force.out"
grep -q '^+ ndctl .*region0' "$work/force.out" && fail "pmem-provision.sh --force: touched socket 0" "$work/force.out"
ok "pmem-provision.sh: a devdax namespace is refused without --force, replaced with it"

# A real run: refused before anything happens when tools are missing or not root.
status=0
if [ "$(id -u)" -eq 0 ]; then
  PATH="$nopmem" "$pmem" --sockets 0 --fstab "$work/none" >"$work/real.out" 2>&1 || status=$?
  [ "$status" -eq 1 ] || fail "pmem-provision.sh without tools: exit $status, not 1" "$work/real.out"
  grep -q 'error: missing tools: ipmctl (ipmctl) ndctl (ndctl) mkfs.xfs (xfsprogs) xfs_io (xfsprogs)' "$work/real.out" ||
    fail "pmem-provision.sh without tools: the error does not name them" "$work/real.out"
  grep -q '^+' "$work/real.out" && fail "pmem-provision.sh without tools: ran something" "$work/real.out"
  ok "pmem-provision.sh (real run) without ipmctl/ndctl/xfsprogs: refused, naming them and their packages"
  if command -v setpriv >/dev/null 2>&1 &&
    setpriv --reuid=65534 --regid=65534 --clear-groups test -x "$pmem" 2>/dev/null; then
    status=0
    setpriv --reuid=65534 --regid=65534 --clear-groups "$pmem" --sockets 0 >"$work/user.out" 2>&1 || status=$?
    if ! { [ "$status" -eq 1 ] && grep -q 'must run as root' "$work/user.out"; }; then
      fail "pmem-provision.sh as a user: not refused" "$work/user.out"
    fi
    ok "pmem-provision.sh (real run) as a user: refused"
  fi
else
  "$pmem" --sockets 0 >"$work/user.out" 2>&1 || status=$?
  if ! { [ "$status" -eq 1 ] && grep -q 'must run as root' "$work/user.out"; }; then
    fail "pmem-provision.sh as a user: not refused" "$work/user.out"
  fi
  ok "pmem-provision.sh (real run) as a user: refused"
fi
# A real run's App Direct step, with a stand-in ipmctl (what it prints with and without a
# pending goal or a region) and stand-ins for the other tools; only on a machine without PMem
# regions, where a real run stops at that step whatever the tools do.
if [ -d /sys/bus/nd/devices ] && ! compgen -G "/sys/bus/nd/devices/region*" >/dev/null && [ "$(id -u)" -eq 0 ]; then
  fake_bin="$work/fake-ipmctl-bin"
  mkdir -p "$fake_bin"
  for t in ndctl blkid mount mkfs.xfs xfs_io; do
    printf '#!/bin/sh\necho "stand-in %s must not run" >&2\nexit 1\n' "$t" >"$fake_bin/$t"
    chmod +x "$fake_bin/$t"
  done
  cat >"$fake_bin/ipmctl" <<'EOF'
#!/bin/sh
case "$*" in
  "show -goal")
    if [ -n "$FAKE_PENDING" ]; then
      echo "A reboot is required to process new memory allocation goals."
    else
      echo "There are no goal configs defined in the system."
    fi ;;
  "show -region")
    if [ -n "$FAKE_REGION_SOCKET" ]; then
      echo " SocketID | ISetID             | PersistentMemoryType | Capacity     | FreeCapacity | HealthState"
      echo "=========================================================================================="
      echo " 0x000$FAKE_REGION_SOCKET   | 0x2d3c7f48f4e22ccc | AppDirect            | 1512.000 GiB | 0.000 GiB    | Healthy"
    else
      echo "There are no Regions defined in the system."
    fi ;;
  "create -goal -socket "*" PersistentMemoryType=AppDirect") echo "created goal: $*" ;;
  *) echo "unexpected ipmctl $*" >&2; exit 1 ;;
esac
EOF
  chmod +x "$fake_bin/ipmctl"
  status=0
  PATH="$fake_bin:$PATH" "$pmem" --sockets 0,1 --fstab "$work/none" >"$work/goal.out" 2>&1 || status=$?
  [ "$status" -eq 3 ] || fail "pmem-provision.sh, no region: exit $status, not 3 (reboot)" "$work/goal.out"
  grep -q '^created goal: create -goal -socket 1 PersistentMemoryType=AppDirect$' "$work/goal.out" ||
    fail "pmem-provision.sh, no region: no goal for socket 1" "$work/goal.out"
  status=0
  FAKE_PENDING=1 PATH="$fake_bin:$PATH" "$pmem" --sockets 0 --fstab "$work/none" >"$work/pending.out" 2>&1 || status=$?
  if [ "$status" -ne 3 ] || grep -q 'created goal' "$work/pending.out"; then
    fail "pmem-provision.sh, goal pending: not a stop for the reboot (exit $status)" "$work/pending.out"
  fi
  status=0
  FAKE_REGION_SOCKET=1 PATH="$fake_bin:$PATH" "$pmem" --sockets 0,1 --fstab "$work/none" >"$work/hidden.out" 2>&1 || status=$?
  if [ "$status" -ne 1 ] || ! grep -q 'ipmctl shows a region on socket 1 but the kernel has none' "$work/hidden.out" ||
    grep -q 'created goal' "$work/hidden.out"; then
    fail "pmem-provision.sh, a region the kernel does not show: not refused (exit $status)" "$work/hidden.out"
  fi
  ok "pmem-provision.sh (real run, stand-in ipmctl): creates the goals and stops for the reboot; stops on a pending goal; refuses a region the kernel does not show"
else
  skip "pmem-provision.sh's real App Direct step: needs root and /sys/bus/nd without regions"
fi

status=0
"$pmem" --root "$fresh" >"$work/rootreal.out" 2>&1 || status=$?
[ "$status" -eq 2 ] || fail "pmem-provision.sh --root without --dry-run: exit $status, not 2" "$work/rootreal.out"
ok "pmem-provision.sh --root needs --dry-run"

# --- topology, example cluster files and plans -------------------------------------------

"$bin" topology >"$work/topology.out" 2>&1 || fail "moeshard topology" "$work/topology.out"
"$bin" topology --topology "synthetic:pack:2 numa:1 core:4 pu:1" >"$work/topology2.out" 2>&1 ||
  fail "moeshard topology (2 sockets)" "$work/topology2.out"
grep -q '^plan: expert node 1 on numa 1' "$work/topology2.out" || fail "moeshard topology: no node per socket" "$work/topology2.out"
ok "moeshard topology (this machine, and a synthetic 2-socket one)"

examples="$deploy/examples"
for c in dual-socket-box pool-of-three; do
  "$bin" plan --model "$fixture" --cluster "$examples/$c.toml" --out "$work/$c.fixture-plan.toml" \
    >"$work/$c.plan.out" 2>&1 || fail "moeshard plan --cluster deploy/examples/$c.toml" "$work/$c.plan.out"
done
ok "the example cluster files parse (moeshard plan on the qwen3moe fixture)"

# DeepSeek-V3's real header over a sparse file: synth writes the header first, then the
# weights; it is stopped once the header is on disk and the file is extended, as a hole, to
# the size synth announced. moeshard reads only the header and the maps' bounds.
ds="$work/deepseek-v3.gguf"
NO_COLOR=1 MOESHARD_LOG=info "$bin" synth --shape deepseek-v3 --quant q4_k_m --vocab 1024 --threads 1 --out "$ds" \
  >"$work/synth.out" 2>&1 &
synth_pid=$!
pids+=("$synth_pid")
for _ in $(seq 1 600); do
  if [ -f "$ds.tmp" ] && [ "$(stat -c %s "$ds.tmp")" -ge 2097152 ]; then
    break
  fi
  kill -0 "$synth_pid" 2>/dev/null || break
  sleep 0.2
done
kill -KILL "$synth_pid" 2>/dev/null || true
wait "$synth_pid" 2>/dev/null || true
forget_pid "$synth_pid"
total="$(sed -n 's/.* synthesizing .*bytes=\([0-9][0-9]*\).*/\1/p' "$work/synth.out" | head -n 1)"
if ! { [ -n "$total" ] && [ -f "$ds.tmp" ] && [ "$(stat -c %s "$ds.tmp")" -ge 2097152 ]; }; then
  fail "could not get DeepSeek-V3's header from moeshard synth" "$work/synth.out"
fi
truncate -s "$total" "$ds.tmp"
mv "$ds.tmp" "$ds"
"$bin" inspect "$ds" >"$work/inspect.out" 2>&1 || fail "moeshard inspect (sparse DeepSeek-V3)" "$work/inspect.out"
grep -q 'architecture:  deepseek2' "$work/inspect.out" || fail "the sparse file is not DeepSeek-V3" "$work/inspect.out"

# Each example plan against its cluster file with the nodes' addresses pointed at closed
# ports: the coordinator loads the plan, checks it names the cluster's nodes and resolves it
# against the model, and only then connects, which fails. A plan error would come first.
for c in dual-socket-box pool-of-three; do
  cluster_nodes="$(sed -n 's/^name = "\(.*\)"$/\1/p' "$examples/$c.toml" | sort | tr '\n' ' ')"
  plan_nodes="$(sed -n 's/^nodes = \[\(.*\)\]$/\1/p' "$examples/$c.plan.toml" | head -n 1 | tr -d '"' | tr ',' '\n' | tr -d ' ' | sort | tr '\n' ' ')"
  [ "$cluster_nodes" = "$plan_nodes" ] || fail "deploy/examples/$c.plan.toml names nodes $plan_nodes, the cluster file $cluster_nodes"
  grep -q '^model_identity' "$examples/$c.plan.toml" && fail "deploy/examples/$c.plan.toml names one model file (model_identity)"
  sed -e 's/^address = .*/address = "127.0.0.1:1"/' -e 's/^transport = .*/transport = "grpc"/' -e '/^cert = /d' \
    "$examples/$c.toml" >"$work/$c.closed.toml"
  status=0
  NO_COLOR=1 "$bin" eval --model "$ds" --cluster "$work/$c.closed.toml" --plan "$examples/$c.plan.toml" \
    --tokens 1 --logits-out "$work/logits.safetensors" >"$work/$c.resolve.out" 2>&1 || status=$?
  if ! { [ "$status" -ne 0 ] && grep -q 'cannot connect' "$work/$c.resolve.out"; }; then
    fail "deploy/examples/$c.plan.toml does not resolve against DeepSeek-V3 with $c.toml" "$work/$c.resolve.out"
  fi
done
ok "the example plans name their cluster's nodes and resolve against DeepSeek-V3's shape"

# --- end to end: the units' command lines ------------------------------------------------

# HTTP without depending on curl: GET $1, or POST JSON $2 to it; the body on stdout, and
# a failure for a status other than 200.
http() {
  if command -v curl >/dev/null 2>&1; then
    if [ $# -ge 2 ]; then
      curl -sf "$1" -H 'Content-Type: application/json' -d "$2"
    else
      curl -sf "$1"
    fi
  else
    python3 - "$@" <<'EOF'
import sys, urllib.request
data = sys.argv[2].encode() if len(sys.argv) > 2 else None
req = urllib.request.Request(sys.argv[1], data=data, headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=60) as r:
    sys.stdout.write(r.read().decode())
EOF
  fi
}

# Starts a unit's command line (env file $2, instance $3) with its environment (Environment=
# and the file's variables, as systemd passes them) and output in $work/$4.{out,err}; the
# moeshard in it is this one.
start_unit() {
  local argv=() vars=() key value
  exec_argv "$1" "$2" "$3" >"$work/$4.argv"
  mapfile -t argv <"$work/$4.argv"
  while IFS=$'\t' read -r key value; do
    vars+=("$key=$value")
  done <"$work/unit-env.tsv"
  [ "${argv[0]}" = /usr/local/bin/moeshard ] || fail "${1##*/}: ExecStart does not run /usr/local/bin/moeshard"
  argv[0]="$bin"
  printf '%s\n' "${argv[*]}" >"$work/$4.cmd"
  env "${vars[@]}" "${argv[@]}" </dev/null >"$work/$4.out" 2>"$work/$4.err" &
  pids+=("$!")
  started_pid=$!
}

# Waits for a line matching $2 in file $1 (30 s); prints its first match.
wait_for_line() {
  local _
  for _ in $(seq 1 300); do
    if grep -q "$2" "$1" 2>/dev/null; then
      grep -m 1 "$2" "$1"
      return 0
    fi
    sleep 0.1
  done
  return 1
}

# Stops pid $1 with SIGTERM, as systemd does; fails unless it exits 0 within 30 s.
stop_unit() {
  local pid="$1" what="$2" _ status=0
  kill -TERM "$pid"
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && fail "$what did not stop within 30 s of SIGTERM" "$work/$what.err"
  wait "$pid" || status=$?
  forget_pid "$pid"
  [ "$status" -eq 0 ] || fail "$what exited $status after SIGTERM" "$work/$what.err"
}

# A plan for the fixture over s0 and s1 (the planner reads only the cluster's node list
# and figures), and one split file per node, as deploy/README.md does it.
e2e="$work/e2e"
mkdir -p "$e2e/shards" "$e2e/state-1"
cat >"$e2e/plan-cluster.toml" <<'EOF'
[[node]]
name = "s0"
address = "127.0.0.1:1"
transport = "grpc"

[[node]]
name = "s1"
address = "127.0.0.1:2"
transport = "grpc"
EOF
"$bin" plan --model "$fixture" --cluster "$e2e/plan-cluster.toml" --out "$e2e/plan.toml" >"$work/e2e-plan.out" 2>&1 ||
  fail "moeshard plan for the end-to-end check" "$work/e2e-plan.out"
"$bin" split --model "$fixture" --plan "$e2e/plan.toml" --out "$e2e/shards" >"$work/e2e-split.out" 2>&1 ||
  fail "moeshard split for the end-to-end check" "$work/e2e-split.out"

# The example environment files, with this machine's paths and free ports appended (later
# assignments win, in systemd as here). Both nodes are instance 0: this machine may have one
# NUMA node, and --numa-node must name one it has. s1 speaks QUIC with the certificate it
# creates in its "state directory".
{
  cat "$deploy/env/dual-socket-box/node-0.env"
  echo "MOESHARD_MODEL=$e2e/shards/model-q4_k_m.s0.gguf"
  echo "MOESHARD_LISTEN=127.0.0.1:0"
  echo "MOESHARD_NODE_ARGS=--threads 1"
} >"$e2e/node-0.env"
{
  cat "$deploy/env/dual-socket-box/node-1.env"
  echo "MOESHARD_MODEL=$e2e/shards/model-q4_k_m.s1.gguf"
  echo "MOESHARD_LISTEN=127.0.0.1:0"
  echo "MOESHARD_TRANSPORT=quic"
  echo "MOESHARD_NODE_ARGS=\"--threads 1 --tls-cert $e2e/state-1/cert.pem --tls-key $e2e/state-1/key.pem\""
} >"$e2e/node-1.env"

start_unit "$node_unit" "$e2e/node-0.env" 0 node-0
node0_pid=$started_pid
start_unit "$node_unit" "$e2e/node-1.env" 0 node-1
node1_pid=$started_pid
line0="$(wait_for_line "$work/node-0.out" 'listening on grpc://')" || fail "expert node s0 (node-0.env) did not start" "$work/node-0.err"
line1="$(wait_for_line "$work/node-1.out" 'listening on quic://')" || fail "expert node s1 (node-1.env, QUIC) did not start" "$work/node-1.err"
if ! { [ -s "$e2e/state-1/cert.pem" ] && [ -s "$e2e/state-1/key.pem" ]; }; then
  fail "the QUIC node did not create its certificate" "$work/node-1.err"
fi
grep -q -- '--numa-node 0 --model' "$work/node-0.cmd" || fail "the node's command line has no --numa-node from %i" "$work/node-0.cmd"
cat >"$e2e/cluster.toml" <<EOF
[[node]]
name = "s0"
address = "${line0##*grpc://}"
transport = "grpc"
numa_node = 0

[[node]]
name = "s1"
address = "${line1##*quic://}"
transport = "quic"
cert = "state-1/cert.pem"
numa_node = 1
EOF
{
  cat "$deploy/env/dual-socket-box/coordinator.env"
  echo "MOESHARD_MODEL=$fixture"
  echo "MOESHARD_PORT=0"
  echo "MOESHARD_SERVE_ARGS=\"--cluster $e2e/cluster.toml --plan $e2e/plan.toml --parallel 2\""
} >"$e2e/coordinator.env"
start_unit "$coord_unit" "$e2e/coordinator.env" "" coordinator
coord_pid=$started_pid
line="$(wait_for_line "$work/coordinator.out" 'moeshard serve listening on http://')" ||
  fail "moeshard serve (coordinator.env) did not start" "$work/coordinator.err"
url="${line##*listening on }"
http "$url/health" >"$work/health.out" 2>&1 || fail "GET /health: not 200" "$work/health.out"
grep -q '"status": *"ok"' "$work/health.out" || fail "GET /health: not ok" "$work/health.out"
http "$url/v1/completions" '{"prompt": "Hello", "max_tokens": 4, "temperature": 0}' >"$work/completion.out" 2>&1 ||
  fail "POST /v1/completions" "$work/completion.out"
grep -q '"choices"' "$work/completion.out" || fail "POST /v1/completions: no choices" "$work/completion.out"
http "$url/metrics" >"$work/metrics.out" 2>&1 || fail "GET /metrics" "$work/metrics.out"
for n in s0 s1; do
  grep -Eq "^moeshard_node_dispatches_total\{node=\"$n\"\} [1-9]" "$work/metrics.out" ||
    fail "/metrics: node $n got no dispatches" "$work/metrics.out"
done
ok "units' command lines with the example env files: 2 nodes (gRPC, QUIC) from split files + moeshard serve: /health 200, a completion, both nodes dispatched to (/metrics)"
stop_unit "$coord_pid" coordinator
stop_unit "$node0_pid" node-0
stop_unit "$node1_pid" node-1
ok "SIGTERM stops the coordinator and both nodes, each with exit status 0"

echo "deploy/check.sh: all $checks checks passed"
