#!/usr/bin/env bash
# Provisions Intel Optane persistent memory for moeshard: App Direct, one interleaved region
# per socket, one fsdax namespace on it, a file system mounted with -o dax=always on
# /mnt/pmem<socket>, and its /etc/fstab line. Run it as root; run it again after the reboot
# that a new App Direct goal needs. Nothing that exists is destroyed without --force.
# --dry-run prints every command instead of running it (any machine, any user).
# See deploy/README.md, "1. Persistent memory".
set -euo pipefail

readonly PROG="pmem-provision.sh"
readonly EXIT_REBOOT=3

usage() {
  cat <<EOF
usage: $PROG [--dry-run] [--force] [--sockets 0|0,1] [--fs xfs|ext4]
                         [--mount-prefix DIR] [--fstab FILE]

Puts each socket's Optane PMem in App Direct with one fsdax namespace, makes a file system
on it, mounts it with -o dax=always on DIR<socket> (default /mnt/pmem<socket>, so
/mnt/pmem0 and /mnt/pmem1) and adds its line to /etc/fstab. Steps already done are
checked and skipped, so it can be run again at any time.

  --dry-run        print every command instead of running it; reads only sysfs and
                   /proc/mounts (works without PMem, without the tools, as any user)
  --force          destroy what is in the way: other namespaces of a socket's region and
                   file systems of another type (their data is lost)
  --sockets LIST   sockets (NUMA nodes) to provision, comma-separated; default: those
                   with a PMem region, else every NUMA node with CPUs
  --fs TYPE        xfs (default; made with -m reflink=0, required for DAX) or ext4
  --mount-prefix P mount socket S's namespace on P<S> (default /mnt/pmem)
  --fstab FILE     the fstab to add the mounts to (default /etc/fstab)
  --root DIR       read sysfs and /proc/mounts below DIR (tests; with --dry-run only)

Steps, per socket:
  1. no App Direct region: ipmctl create -goal -socket S PersistentMemoryType=AppDirect
     (ipmctl asks to confirm), then stop: the BIOS applies the goal at the next boot.
     Reboot and run this again (exit status $EXIT_REBOOT means: reboot needed).
  2. ndctl create-namespace --mode=fsdax --region=regionN
  3. mkfs.xfs -m reflink=0 -d su=2m,sw=1 (or mkfs.ext4 -b 4096), unless it has one
  4. mount -o dax=always /dev/pmemN /mnt/pmemS; xfs: extent size hint 2 MiB;
     /mnt/pmemS/moeshard for the node's split file
  5. an /etc/fstab line: UUID=... /mnt/pmemS xfs dax=always,nofail 0 0
Socket S is NUMA node S (sub-NUMA clustering off). Exit status: 0 done, 1 error,
2 usage, $EXIT_REBOOT reboot needed.
EOF
}

dry_run=0
force=0
sockets_arg=""
fs_type="xfs"
mount_prefix="/mnt/pmem"
fstab="/etc/fstab"
root="/"

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 1
}
usage_error() {
  printf '%s: %s (see --help)\n' "$PROG" "$*" >&2
  exit 2
}
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
note() { printf '%s\n' "$*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    -n | --dry-run) dry_run=1 ;;
    --force) force=1 ;;
    --sockets)
      [ $# -ge 2 ] || usage_error "--sockets needs a value"
      sockets_arg="$2"
      shift
      ;;
    --sockets=*) sockets_arg="${1#*=}" ;;
    --fs)
      [ $# -ge 2 ] || usage_error "--fs needs a value"
      fs_type="$2"
      shift
      ;;
    --fs=*) fs_type="${1#*=}" ;;
    --mount-prefix)
      [ $# -ge 2 ] || usage_error "--mount-prefix needs a value"
      mount_prefix="$2"
      shift
      ;;
    --mount-prefix=*) mount_prefix="${1#*=}" ;;
    --fstab)
      [ $# -ge 2 ] || usage_error "--fstab needs a value"
      fstab="$2"
      shift
      ;;
    --fstab=*) fstab="${1#*=}" ;;
    --root)
      [ $# -ge 2 ] || usage_error "--root needs a value"
      root="$2"
      shift
      ;;
    --root=*) root="${1#*=}" ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) usage_error "unknown argument: $1" ;;
  esac
  shift
done

case "$fs_type" in
  xfs | ext4) ;;
  *) usage_error "--fs must be xfs or ext4, not '$fs_type'" ;;
esac
case "$mount_prefix" in
  /*) ;;
  *) usage_error "--mount-prefix must be an absolute path, not '$mount_prefix'" ;;
esac
if [ -n "$sockets_arg" ] && ! [[ "$sockets_arg" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  usage_error "--sockets takes NUMA node numbers such as 0 or 0,1, not '$sockets_arg'"
fi
if [ "$root" != "/" ] && [ "$dry_run" -eq 0 ]; then
  usage_error "--root reads a test tree; it goes only with --dry-run"
fi
root="${root%/}"
readonly nd="$root/sys/bus/nd/devices"
readonly mounts_file="$root/proc/mounts"

# An argument as a shell would need it typed: bare when safe, else in single quotes.
shquote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Runs a command, printing it first; with --dry-run only prints it.
run() {
  local arg
  printf '+'
  for arg in "$@"; do
    printf ' %s' "$(shquote "$arg")"
  done
  printf '\n'
  if [ "$dry_run" -eq 0 ]; then
    "$@"
  fi
}

# --- what the machine has (sysfs only: no tools needed) ---------------------------------

# The first line of a sysfs attribute, or $2 when it cannot be read.
attr() {
  local value
  if value="$(head -n 1 "$1" 2>/dev/null)"; then
    printf '%s' "$value"
  else
    printf '%s' "${2-}"
  fi
}

# ndctl's name for the kernel's namespace mode (sysfs says memory, dax, safe, raw).
mode_name() {
  case "$1" in
    memory | fsdax) printf 'fsdax' ;;
    dax | devdax) printf 'devdax' ;;
    safe | sector) printf 'sector' ;;
    *) printf '%s' "$1" ;;
  esac
}

# The block device of a namespace: its own block/ entry (raw, or label-less fsdax), else
# that of the pfn/btt device that claims it.
ns_blockdev() {
  local ns="$1" holder entry
  for entry in "$nd/$ns"/block/*; do
    [ -e "$entry" ] && { basename "$entry"; return 0; }
  done
  holder="$(attr "$nd/$ns/holder")"
  if [ -n "$holder" ]; then
    for entry in "$nd/$holder"/block/*; do
      [ -e "$entry" ] && { basename "$entry"; return 0; }
    done
  fi
  attr "$nd/$ns/blockdev"
}

human() {
  awk -v b="$1" 'BEGIN {
    split("B KiB MiB GiB TiB", u, " "); i = 1
    while (b >= 1024 && i < 5) { b /= 1024; i++ }
    printf (i == 1 ? "%d %s" : "%.1f %s"), b, u[i] }'
}

# Regions on NUMA node $1, one per line.
regions_on() {
  local r
  for r in "$nd"/region*; do
    [ -d "$r" ] || continue
    if [ "$(attr "$r/numa_node" -1)" = "$1" ]; then
      basename "$r"
    fi
  done
}

# Namespaces of region $1 with a size (size-0 ones are the kernel's seeds), one per line.
namespaces_of() {
  local id="${1#region}" ns
  for ns in "$nd/namespace$id".*; do
    [ -d "$ns" ] || continue
    if [ "$(attr "$ns/size" 0)" != "0" ]; then
      basename "$ns"
    fi
  done
}

# "mount_point fs_type options" of device $1 in /proc/mounts, one line per mount.
mounts_of() {
  [ -r "$mounts_file" ] || return 0
  awk -v dev="$1" '$1 == dev { print $2, $3, $4 }' "$mounts_file"
}

# The device mounted on $1 ("" when none).
device_on() {
  [ -r "$mounts_file" ] || return 0
  awk -v mp="$1" '$2 == mp { d = $1 } END { if (d != "") print d }' "$mounts_file"
}

has_dax() {
  case ",$1," in
    *,dax,* | *,dax=always,*) return 0 ;;
    *) return 1 ;;
  esac
}

# Sockets: given, else those with a region, else the NUMA nodes with CPUs.
sockets=()
if [ -n "$sockets_arg" ]; then
  IFS=, read -r -a sockets <<<"$sockets_arg"
else
  for r in "$nd"/region*; do
    [ -d "$r" ] || continue
    n="$(attr "$r/numa_node" -1)"
    [ "$n" = "-1" ] || sockets+=("$n")
  done
  if [ ${#sockets[@]} -eq 0 ]; then
    for d in "$root"/sys/devices/system/node/node[0-9]*; do
      [ -d "$d" ] || continue
      [ -n "$(attr "$d/cpulist")" ] && sockets+=("${d##*/node}")
    done
  fi
  if [ ${#sockets[@]} -eq 0 ]; then
    [ "$dry_run" -eq 1 ] || die "cannot tell which sockets to provision (no PMem region, no NUMA nodes in $root/sys): give --sockets 0 or --sockets 0,1"
    note "# no PMem region and no NUMA nodes in $root/sys: assuming socket 0 (--sockets to choose)"
    sockets=(0)
  fi
  mapfile -t sockets < <(printf '%s\n' "${sockets[@]}" | sort -n -u)
fi
[ ${#sockets[@]} -le 2 ] || warn "${#sockets[@]} sockets: moeshard's examples are for one or two"

if [ "$dry_run" -eq 1 ]; then
  note "# dry run: the commands below are printed, not run"
elif [ "$(id -u)" -ne 0 ]; then
  die "must run as root (it creates namespaces, file systems and mounts); --dry-run works as any user"
fi

# Per socket: its region, or "" when App Direct still has to be set up.
declare -A region_of=()
need_goal=()
for s in "${sockets[@]}"; do
  mapfile -t rs < <(regions_on "$s")
  case ${#rs[@]} in
    0)
      region_of[$s]=""
      need_goal+=("$s")
      ;;
    1) region_of[$s]="${rs[0]}" ;;
    *)
      die "socket $s has ${#rs[@]} PMem regions (${rs[*]}): the modules are not interleaved. moeshard wants one interleaved App Direct region per socket; changing that (ipmctl delete -goal, ipmctl create -goal -socket $s PersistentMemoryType=AppDirect) destroys their data, so this script leaves it to you"
      ;;
  esac
done

note "sockets: ${sockets[*]} (file system $fs_type, mounts ${mount_prefix}N)"
for s in "${sockets[@]}"; do
  if [ -n "${region_of[$s]}" ]; then
    r="${region_of[$s]}"
    note "socket $s: ${r}, $(human "$(attr "$nd/$r/size" 0)"), $(human "$(attr "$nd/$r/available_size" 0)") not in a namespace"
  else
    note "socket $s: no App Direct region"
  fi
done

# --- the tools -------------------------------------------------------------------------

package_of() {
  case "$1" in
    ipmctl) printf 'ipmctl' ;;
    ndctl) printf 'ndctl' ;;
    mkfs.xfs | xfs_io) printf 'xfsprogs' ;;
    mkfs.ext4) printf 'e2fsprogs' ;;
    blkid) printf 'util-linux' ;;
    mount) printf 'mount' ;;
    *) printf '%s' "$1" ;;
  esac
}

tools=(ndctl blkid mount "mkfs.$fs_type")
[ "$fs_type" = xfs ] && tools+=(xfs_io)
[ ${#need_goal[@]} -gt 0 ] && tools=(ipmctl "${tools[@]}")
missing=()
for t in "${tools[@]}"; do
  command -v "$t" >/dev/null 2>&1 || missing+=("$t ($(package_of "$t"))")
done
if [ ${#missing[@]} -gt 0 ]; then
  msg="missing tools: ${missing[*]}; on Debian/Ubuntu: apt-get install ipmctl ndctl xfsprogs e2fsprogs"
  if [ "$dry_run" -eq 1 ]; then
    note "# $msg"
  else
    die "$msg"
  fi
fi

if [ ! -d "$nd" ]; then
  if [ "$dry_run" -eq 1 ]; then
    note "# $nd does not exist: this machine shows no NVDIMMs (no PMem, or the nfit driver is not loaded)"
  else
    die "$nd does not exist: the kernel's NVDIMM driver is not loaded (modprobe nfit) or this machine has no PMem"
  fi
fi

# --- 1. App Direct goal ----------------------------------------------------------------

if [ ${#need_goal[@]} -gt 0 ]; then
  if [ "$dry_run" -eq 0 ]; then
    goal="$(ipmctl show -goal 2>&1)" || die "ipmctl show -goal failed: $goal"
    if grep -qi 'reboot is required' <<<"$goal"; then
      printf '%s\n' "$goal"
      note "A memory allocation goal is already pending: reboot to apply it, then run $PROG again."
      exit "$EXIT_REBOOT"
    fi
    grep -qi 'no goal configs' <<<"$goal" || die "cannot tell whether a goal is pending; ipmctl show -goal says: $goal"
    # The platform's regions, whatever the kernel shows: a table whose rows start with the
    # socket id in hex (" 0x0001 | ..."), or "There are no Regions defined in the system."
    regions="$(ipmctl show -region 2>&1)" || die "ipmctl show -region failed: $regions"
    platform_sockets=()
    while read -r first _; do
      if [[ "$first" =~ ^0x([0-9A-Fa-f]+)$ ]]; then
        platform_sockets+=("$((16#${BASH_REMATCH[1]}))")
      fi
    done <<<"$regions"
    if [ ${#platform_sockets[@]} -eq 0 ] && ! grep -qi 'no regions' <<<"$regions"; then
      die "cannot read ipmctl show -region; it says: $regions"
    fi
    for s in "${need_goal[@]}"; do
      for p in "${platform_sockets[@]}"; do
        if [ "$p" = "$s" ]; then
          printf '%s\n' "$regions"
          die "ipmctl shows a region on socket $s but the kernel has none on NUMA node $s: check that the nfit driver is loaded (modprobe nfit) and that the region is App Direct; nothing was changed"
        fi
      done
    done
  fi
  note "# 1. App Direct goal for socket(s) ${need_goal[*]} (ipmctl asks to confirm)"
  for s in "${need_goal[@]}"; do
    run ipmctl create -goal -socket "$s" PersistentMemoryType=AppDirect
  done
  note "Reboot needed: the BIOS applies the goal at the next boot. Then run $PROG again with the same arguments."
  if [ "$dry_run" -eq 0 ]; then
    exit "$EXIT_REBOOT"
  fi
  note "# after the reboot (assumed below: socket S's region is regionS and its namespace /dev/pmemS, as on most machines):"
  for s in "${need_goal[@]}"; do
    region_of[$s]="region$s"
  done
fi

# --- 2.-5. per socket ------------------------------------------------------------------

summary=()
for s in "${sockets[@]}"; do
  r="${region_of[$s]}"
  mp="${mount_prefix}${s}"
  note "# socket $s: $r"

  # 2. The namespace.
  dev=""
  fresh=0
  mapfile -t nss < <(namespaces_of "$r")
  fsdax=()
  descs=()
  for ns in "${nss[@]}"; do
    mode="$(mode_name "$(attr "$nd/$ns/mode" unknown)")"
    bdev="$(ns_blockdev "$ns")"
    descs+=("$ns ($mode, $(human "$(attr "$nd/$ns/size" 0)")${bdev:+, /dev/$bdev})")
    if [ "$mode" = fsdax ] && [ -n "$bdev" ]; then
      fsdax+=("$bdev")
    fi
  done
  if [ ${#nss[@]} -eq 1 ] && [ ${#fsdax[@]} -eq 1 ]; then
    dev="/dev/${fsdax[0]}"
    note "${descs[0]}: fsdax namespace already there"
  else
    if [ ${#nss[@]} -gt 0 ]; then
      if [ "$force" -eq 0 ]; then
        die "$r (socket $s) already has namespace(s) that may hold data: ${descs[*]}. moeshard wants one fsdax namespace per region; rerun with --force to destroy them (their data is lost), or reconfigure them yourself"
      fi
      for ns in "${nss[@]}"; do
        run ndctl destroy-namespace --force "$ns"
      done
    fi
    if [ "$dry_run" -eq 1 ]; then
      run ndctl create-namespace --mode=fsdax "--region=$r"
      dev="/dev/pmem${r#region}"
      note "# (its block device, $dev on most machines, is printed by ndctl as \"blockdev\")"
    else
      out="$(run ndctl create-namespace --mode=fsdax "--region=$r")" || die "ndctl create-namespace failed on $r: $out"
      printf '%s\n' "$out"
      bdev="$(sed -n 's/.*"blockdev" *: *"\([^"]*\)".*/\1/p' <<<"$out" | head -n 1)"
      [ -n "$bdev" ] || die "ndctl create-namespace did not name the block device; see its output above"
      dev="/dev/$bdev"
    fi
    fresh=1
  fi

  # Where it is mounted now (a mounted device has a file system).
  mounted=0
  current=""
  while read -r where type opts; do
    [ -n "$where" ] || continue
    if [ "$where" != "$mp" ]; then
      die "$dev is mounted on $where; unmount it, or use --mount-prefix so that socket $s's mount point is $where"
    fi
    has_dax "$opts" || die "$dev is mounted on $mp without DAX ($opts): umount $mp and run $PROG again"
    mounted=1
    current="$type"
  done < <(mounts_of "$dev")

  # 3. The file system.
  if [ "$fresh" -eq 0 ] && [ -z "$current" ] && [ -b "$dev" ] && command -v blkid >/dev/null 2>&1; then
    current="$(blkid -p -o value -s TYPE "$dev" 2>/dev/null || true)"
  fi
  if [ "$fresh" -eq 0 ] && [ -z "$current" ] && [ "$dry_run" -eq 1 ] && [ ! -b "$dev" ]; then
    note "# (dry run: $dev is not a block device here; assumed to have no file system)"
  fi
  if [ -n "$current" ] && [ "$current" = "$fs_type" ]; then
    note "$dev: $current file system already there"
  else
    if [ -n "$current" ] && [ "$force" -eq 0 ]; then
      die "$dev has a $current file system, not $fs_type: rerun with --fs $current to keep it, or with --force to replace it (its data is lost)"
    fi
    overwrite=()
    if [ "$fresh" -eq 1 ] || [ -n "$current" ]; then
      # A new namespace may show an old signature; --force was given for an old one.
      if [ "$fs_type" = xfs ]; then overwrite=(-f); else overwrite=(-F); fi
    fi
    if [ "$fs_type" = xfs ]; then
      # reflink and DAX do not go together; 2 MiB stripe unit: extents aligned for
      # 2 MiB (PMD) mappings.
      run mkfs.xfs "${overwrite[@]}" -m reflink=0 -d su=2m,sw=1 "$dev"
    else
      run mkfs.ext4 "${overwrite[@]}" -b 4096 -E stride=512,stripe_width=512 "$dev"
    fi
  fi

  # 4. The mount.
  if [ "$mounted" -eq 1 ]; then
    note "$dev: mounted on $mp with DAX"
  else
    other="$(device_on "$mp")"
    [ -z "$other" ] || die "$mp already has $other mounted on it"
    run mkdir -p "$mp"
    run mount -o dax=always "$dev" "$mp"
    if [ "$dry_run" -eq 0 ]; then
      opts="$(awk -v mp="$mp" '$2 == mp { o = $4 } END { print o }' /proc/mounts)"
      has_dax "$opts" || die "$dev is mounted on $mp without DAX ($opts): this kernel or file system does not do dax=always (see dmesg); moeshard would read through the page cache"
    fi
    if [ "$fs_type" = xfs ]; then
      run xfs_io -c "extsize 2m" "$mp"
    fi
  fi
  run install -d -m 0755 "$mp/moeshard"

  # 5. fstab.
  uuid=""
  if [ "$dry_run" -eq 0 ]; then
    uuid="$(blkid -s UUID -o value "$dev" || true)"
    [ -n "$uuid" ] || die "blkid gives no UUID for $dev"
  elif [ "$fresh" -eq 0 ] && [ -b "$dev" ] && command -v blkid >/dev/null 2>&1; then
    uuid="$(blkid -s UUID -o value "$dev" 2>/dev/null || true)"
  fi
  line="UUID=${uuid:-<uuid of $dev>} $mp $fs_type dax=always,nofail 0 0"
  existing=""
  if [ -r "$fstab" ]; then
    existing="$(awk -v mp="$mp" '$1 !~ /^#/ && $2 == mp' "$fstab")"
  fi
  if [ -n "$existing" ]; then
    read -r _ _ e_type e_opts _ <<<"$existing"
    if [ "$e_type" = "$fs_type" ] && has_dax "$e_opts"; then
      note "$fstab: already has $mp ($existing)"
    else
      warn "$fstab already has a line for $mp, left as it is: $existing (wanted: $line)"
    fi
  else
    printf '+ echo %s >> %s\n' "$(shquote "$line")" "$(shquote "$fstab")"
    if [ "$dry_run" -eq 0 ]; then
      printf '%s\n' "$line" >>"$fstab"
    fi
  fi
  summary+=("socket $s: $r, $dev, $fs_type on $mp (dax=always); split files go in $mp/moeshard")
done

if [ "$dry_run" -eq 1 ]; then
  note "dry run done; would give:"
else
  note "done:"
fi
printf '  %s\n' "${summary[@]}"
note "check: moeshard topology (each pmem namespace and mount with its NUMA node)"
