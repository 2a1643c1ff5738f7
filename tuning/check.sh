#!/usr/bin/env bash
# tuning/check.sh: report the host settings ringcast depends on and flag the ones short of
# tuning/README.md's recommendations.
#
# Read-only: it changes nothing and needs no root (as root it also sees other users'
# processes and /proc/slabinfo). The only action beyond reading is an io_uring probe that
# creates and closes one 8-entry ring through python3, if python3 is installed.
# Exit status is always 0; flagged lines say LOW, HIGH, DIFF or BLOCKED.
#
# Usage: tuning/check.sh
set -uo pipefail
trap 'exit 0' EXIT

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
readonly SYSCTL_SRC=$here/sysctl.conf
readonly WANT_NOFILE=1048576

flags=0

line4() { printf '%-34s %-26s %-24s %s\n' "$@"; }
header() { printf '\n== %s ==\n' "$1"; line4 ITEM CURRENT RECOMMENDED STATUS; }
row() { # item current recommended status
	line4 "$1" "$2" "$3" "$4"
	case $4 in LOW* | HIGH* | DIFF* | BLOCKED*) flags=$((flags + 1)) ;; esac
}
note() { printf '  %s\n' "$*"; }

normalize() {
	local -a parts
	read -ra parts <<<"$1"
	printf '%s' "${parts[*]}"
}
sysctl_value() {
	local path=/proc/sys/${1//.//}
	if [[ -r $path ]]; then normalize "$(<"$path")"; else printf 'absent'; fi
}
is_int() { [[ $1 =~ ^[0-9]+$ ]]; }
is_unlimited() { [[ $1 == unlimited || $1 == infinity ]]; }
# at_least current minimum -> ok | LOW ("unlimited" counts as enough).
at_least() {
	if is_unlimited "$1"; then
		echo ok
	elif is_int "$1" && is_int "$2"; then
		if (($1 >= $2)); then echo ok; else echo LOW; fi
	else
		echo "?"
	fi
}
status_for() { # tag current recommended
	local tag=$1 cur=$2 rec=$3
	[[ $cur == absent ]] && { echo "absent"; return; }
	if is_int "$cur" && is_int "$rec"; then
		case $tag in
		"at least") if ((cur >= rec)); then echo ok; else echo LOW; fi ;;
		"at most") if ((cur <= rec)); then echo ok; else echo HIGH; fi ;;
		*) if ((cur == rec)); then echo ok; else echo DIFF; fi ;;
		esac
	elif [[ $cur == "$rec" ]]; then
		echo ok
	else
		echo DIFF
	fi
}
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

kernel=$(uname -r)
kmajor=${kernel%%.*}
kminor=${kernel#*.}
kminor=${kminor%%[!0-9]*}
kernel_at_least() { ((kmajor > $1 || (kmajor == $1 && kminor >= $2))); }
page=$(getconf PAGESIZE 2>/dev/null || echo 4096)

pids=()
if command -v pgrep >/dev/null; then
	mapfile -t pids < <(pgrep -x ringcast 2>/dev/null)
fi

# --- host ---------------------------------------------------------------------------------
printf 'ringcast host check (%s, kernel %s)\n' "$(hostname 2>/dev/null || echo '?')" "$kernel"
header "CPU"
online=$(cat /sys/devices/system/cpu/online 2>/dev/null || echo '?')
allowed=$(awk '/^Cpus_allowed_list/ { print $2 }' /proc/self/status)
row "CPUs online" "$online" "" info
row "CPUs allowed (this shell)" "$allowed" "" info
row "nproc (default RINGCAST_WORKERS)" "$(nproc 2>/dev/null || echo '?')" "= cores ringcast owns" info
row "isolcpus" "$(cat /sys/devices/system/cpu/isolated 2>/dev/null || true)" "" info
row "nohz_full" "$(cat /sys/devices/system/cpu/nohz_full 2>/dev/null || true)" "" info
cg=$(awk -F: '$1 == "0" { print $3 }' /proc/self/cgroup 2>/dev/null)
if [[ -n $cg && -r /sys/fs/cgroup$cg/cpu.max ]]; then
	row "cgroup cpu.max" "$(cat "/sys/fs/cgroup$cg/cpu.max")" "max, or quota/period >= workers" info
fi
if [[ -e /.dockerenv || -e /run/.containerenv ]]; then
	note "this looks like a container: net.* sysctls are per network namespace, and its seccomp profile may block io_uring"
fi

# --- open files ---------------------------------------------------------------------------
header "Open files"
soft=$(ulimit -Sn)
hard=$(ulimit -Hn)
row "nofile soft (this shell)" "$soft" ">= $WANT_NOFILE" "$(at_least "$soft" "$WANT_NOFILE")"
row "nofile hard (this shell)" "$hard" ">= $WANT_NOFILE" "$(at_least "$hard" "$WANT_NOFILE")"
if is_int "$hard" && ((hard < WANT_NOFILE)); then
	note "one process started from this shell can hold about $((hard - 100)) connections (hard limit $hard)"
fi
read -r fa _ fmax < /proc/sys/fs/file-nr
row "file handles in use / max" "$fa / $fmax" "" info

# --- sysctls ------------------------------------------------------------------------------
header "sysctl (recommendations from tuning/sysctl.conf)"
if [[ -r $SYSCTL_SRC ]]; then
	re_tag='^#[[:space:]]*\[(at least|at most|exactly)\]'
	re_key='^-?([a-z][a-z0-9_.-]*)[[:space:]]*=[[:space:]]*(.*[^[:space:]])[[:space:]]*$'
	tag=""
	while IFS= read -r line || [[ -n $line ]]; do
		if [[ $line =~ $re_tag ]]; then
			tag=${BASH_REMATCH[1]}
			continue
		fi
		if [[ $line =~ $re_key ]]; then
			key=${BASH_REMATCH[1]}
			rec=$(normalize "${BASH_REMATCH[2]}")
			t=${tag:-exactly}
			cur=$(sysctl_value "$key")
			st=$(status_for "$t" "$cur" "$rec")
			[[ $key == kernel.io_uring_disabled && $cur == absent ]] && st="ok (kernel < 6.6 has no switch)"
			case $t in "at least") shown=">= $rec" ;; "at most") shown="<= $rec" ;; *) shown=$rec ;; esac
			row "$key" "$cur" "$shown" "$st"
		fi
		tag=""
	done <"$SYSCTL_SRC"
else
	note "cannot read $SYSCTL_SRC"
fi
row "net.ipv4.tcp_mem (pages)" "$(sysctl_value net.ipv4.tcp_mem)" "kernel default" info
row "net.ipv4.tcp_max_orphans" "$(sysctl_value net.ipv4.tcp_max_orphans)" "kernel default" info
row "net.ipv4.tcp_max_tw_buckets" "$(sysctl_value net.ipv4.tcp_max_tw_buckets)" "kernel default" info
row "vm.max_map_count" "$(sysctl_value vm.max_map_count)" "default" info

# --- io_uring -----------------------------------------------------------------------------
header "io_uring"
if kernel_at_least 5 12; then
	row "kernel" "$kernel" ">= 5.12" ok
elif kernel_at_least 5 1; then
	row "kernel" "$kernel" ">= 5.12" "LOW (rings count against memlock)"
else
	row "kernel" "$kernel" ">= 5.12" "LOW (no io_uring: epoll fallback)"
fi
memlock=$(ulimit -l)
if kernel_at_least 5 12; then
	row "memlock KiB (this shell)" "$memlock" "unlimited" "info (rings not charged on >= 5.12)"
else
	row "memlock KiB (this shell)" "$memlock" "unlimited" "$(at_least "$memlock" 1048576)"
fi
disabled=$(sysctl_value kernel.io_uring_disabled)
if [[ $disabled == 1 ]]; then
	row "kernel.io_uring_group" "$(sysctl_value kernel.io_uring_group)" "ringcast's group, or disabled=0" info
fi
seccomp=$(awk '/^Seccomp:/ { print $2 }' /proc/self/status)
case $seccomp in
0) row "seccomp (this shell)" "off" "" ok ;;
2) row "seccomp (this shell)" "filter" "io_uring_* allowed" "info (see probe)" ;;
*) row "seccomp (this shell)" "${seccomp:-?}" "" info ;;
esac
if command -v python3 >/dev/null; then
	probe=$(python3 - 2>&1 <<'EOF'
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
fd = libc.syscall(425, 8, params)          # io_uring_setup, same number on every arch
if fd < 0:
    err = ctypes.get_errno()
    print("failed: %s (%s)" % (os.strerror(err), {1: "EPERM", 12: "ENOMEM", 38: "ENOSYS"}.get(err, err)))
else:
    os.close(fd)
    print("ok")
EOF
)
	if [[ $probe == ok ]]; then
		row "io_uring_setup probe" "ok" "ok" ok
	else
		code=${probe##*(}
		row "io_uring_setup probe" "failed (${code%)})" "ok" "BLOCKED (ringcast falls back to epoll)"
		note "probe: $probe"
		note "EPERM: seccomp profile or kernel.io_uring_disabled; ENOMEM: memlock (< 5.12); ENOSYS: kernel"
	fi
else
	row "io_uring_setup probe" "skipped" "" "info (no python3)"
fi

# --- running ringcast ---------------------------------------------------------------------
header "Running ringcast processes"
if ((${#pids[@]} == 0)); then
	note "none found (pgrep -x ringcast)"
fi
for pid in "${pids[@]}"; do
	st=/proc/$pid
	[[ -r $st/status ]] || continue
	lim_nofile=$(awk '/^Max open files/ { print $4 "/" $5 }' "$st/limits" 2>/dev/null)
	lim_memlock=$(awk '/^Max locked memory/ { print $4 "/" $5 }' "$st/limits" 2>/dev/null)
	row "pid $pid nofile soft/hard" "$lim_nofile" ">= $WANT_NOFILE" "$(at_least "${lim_nofile%%/*}" "$WANT_NOFILE")"
	row "pid $pid memlock bytes soft/hard" "$lim_memlock" "unlimited" info
	if grep -q 'anon_inode:\[io_uring\]' "$st/maps" 2>/dev/null; then
		row "pid $pid io driver" "io_uring" "io_uring" ok
	elif [[ -r $st/maps ]]; then
		row "pid $pid io driver" "epoll (no ring mapped)" "io_uring" "DIFF (see its startup warning)"
	fi
	workers=$(grep -l '^ringcast-w' "$st"/task/*/comm 2>/dev/null | wc -l)
	row "pid $pid worker threads" "$workers" "cores it owns" info
	row "pid $pid RSS" "$(awk '/^VmRSS/ { print $2 " " $3 }' "$st/status")" "" info
	row "pid $pid seccomp" "$(awk '/^Seccomp:/ { print $2 }' "$st/status")" "0, or 2 + io_uring_*" info
	if [[ -r $st/maps ]]; then
		maps=$(wc -l <"$st/maps")
		row "pid $pid memory maps" "$maps" "< vm.max_map_count/2" info
	fi
	if fds=$(find "$st/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l) && ((fds > 0)); then
		row "pid $pid open descriptors" "$fds" "< nofile soft" info
	fi
done

# --- NICs and IRQs ------------------------------------------------------------------------
header "NICs, IRQs, RPS/RFS"
if command -v pgrep >/dev/null && pgrep -x irqbalance >/dev/null 2>&1; then
	row "irqbalance" "running" "banned from worker cores" info
else
	row "irqbalance" "not running" "" info
fi
row "net.core.rps_sock_flow_entries" "$(sysctl_value net.core.rps_sock_flow_entries)" "0, or >= 32768 with RFS" info
for dev in /sys/class/net/*; do
	ifc=${dev##*/}
	[[ $ifc == lo || ! -e $dev/device ]] && continue
	rxq=0 rps=off flows=0
	for q in "$dev"/queues/rx-*; do
		[[ -d $q ]] || continue
		rxq=$((rxq + 1))
		mask=$(tr -d ',0\n' <"$q/rps_cpus" 2>/dev/null)
		[[ -n $mask ]] && rps=on
		f=$(cat "$q/rps_flow_cnt" 2>/dev/null || echo 0)
		flows=$((flows + f))
	done
	row "$ifc rx queues / RPS / flow_cnt" "$rxq / $rps / $flows" "queues >= workers" info
	irqs=$(awk -v i="$ifc" 'index($0, i) { sub(":", "", $1); print $1 }' /proc/interrupts)
	if [[ -n $irqs ]]; then
		aff=$(for n in $irqs; do cat "/proc/irq/$n/smp_affinity_list" 2>/dev/null; done | sort -u | tr '\n' ' ')
		row "$ifc IRQs: count / CPUs" "$(wc -w <<<"$irqs") / $aff" "see README" info
	else
		note "$ifc: no IRQ named after it in /proc/interrupts (virtio and some drivers name IRQs otherwise)"
	fi
done
if [[ -r /proc/net/softnet_stat ]]; then
	dropped=0 squeezed=0
	while read -r _ d s _; do
		dropped=$((dropped + 16#$d)) squeezed=$((squeezed + 16#$s))
	done </proc/net/softnet_stat
	st=ok
	is_int "$dropped" && ((dropped > 0)) && st="LOW (raise netdev_max_backlog)"
	row "softnet dropped / time_squeeze" "$dropped / $squeezed" "0 dropped" "$st"
fi

# --- kernel socket memory -----------------------------------------------------------------
header "Kernel socket memory (/proc/net/sockstat; mem is in pages of $page bytes)"
if [[ -r /proc/net/sockstat ]]; then
	while IFS= read -r line; do note "$line"; done </proc/net/sockstat
	tcp_pages=$(awk '/^TCP:/ { for (i = 1; i < NF; i++) if ($i == "mem") print $(i + 1) }' /proc/net/sockstat)
	read -r _ _ tcp_max <<<"$(sysctl_value net.ipv4.tcp_mem)"
	if is_int "${tcp_pages:-x}" && is_int "${tcp_max:-x}"; then
		row "TCP buffer memory" "$(mib $((tcp_pages * page)))" "< tcp_mem max $(mib $((tcp_max * page)))" info
	fi
fi
if [[ -r /proc/slabinfo ]]; then
	per=$(awk '$1 == "TCP" || $1 == "sock_inode_cache" || $1 == "filp" || $1 == "dentry" { s += $4 } END { print s + 0 }' /proc/slabinfo 2>/dev/null)
	row "slab per IPv4 TCP socket" "$per B" "" "info (not in sockstat mem)"
fi

printf '\n%d item(s) flagged. Reasons and fixes: tuning/README.md\n' "$flags"
