#!/usr/bin/env bash
# tuning/apply.sh: install ringcast's kernel and limits settings on this host.
#
# NEVER run this from tests or CI. It changes kernel settings for the whole host and writes
# under /etc. It is for an operator, as root, on a machine meant to run ringcast.
#
# Usage: sudo tuning/apply.sh [--dry-run]
#   --dry-run   print what would change; write nothing (root not needed)
#
# Steps:
#   1. Read tuning/sysctl.conf and compare each key with the host: [at least] keeps a higher
#      host value, [at most] keeps a lower one, [exactly] sets the value as written. Keys this
#      kernel lacks are commented out. The result is the file to install.
#   2. Install it as /etc/sysctl.d/90-ringcast.conf (a different old copy is kept as
#      .bak.<time>) and run `sysctl --system`.
#   3. Check that nofile in tuning/limits.conf does not exceed fs.nr_open (else pam_limits
#      fails at login), then install it as /etc/security/limits.d/90-ringcast.conf.
#   4. Print every key before and after.
# Exit status: 0 when every key has its target value, 1 otherwise, 2 on bad usage.
set -euo pipefail

readonly SYSCTL_DEST=/etc/sysctl.d/90-ringcast.conf
readonly LIMITS_DEST=/etc/security/limits.d/90-ringcast.conf
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
readonly SYSCTL_SRC=$here/sysctl.conf
readonly LIMITS_SRC=$here/limits.conf

usage() {
	cat <<'EOF'
Usage: sudo tuning/apply.sh [--dry-run]
Installs tuning/sysctl.conf as /etc/sysctl.d/90-ringcast.conf and tuning/limits.conf as
/etc/security/limits.d/90-ringcast.conf, applies them with `sysctl --system` and prints
each value before and after. --dry-run only prints what would change.
Not for tests or CI.
EOF
}

dry_run=0
for arg in "$@"; do
	case $arg in
	--dry-run) dry_run=1 ;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		usage >&2
		exit 2
		;;
	esac
done

die() {
	printf 'apply.sh: %s\n' "$*" >&2
	exit 1
}

[[ -r $SYSCTL_SRC && -r $LIMITS_SRC ]] || die "cannot read $SYSCTL_SRC or $LIMITS_SRC"
command -v sysctl >/dev/null || die "sysctl not found (package procps)"
if ((dry_run == 0 && EUID != 0)); then
	die "must run as root (or use --dry-run)"
fi

workdir=$(mktemp -d)
trap 'rm -rf -- "$workdir"' EXIT
rendered=$workdir/90-ringcast.conf

# Collapses runs of spaces and tabs: /proc/sys separates multiple values with tabs.
normalize() {
	local -a parts
	read -ra parts <<<"$1"
	printf '%s' "${parts[*]}"
}

# Current value of a key, or "absent" if this kernel (or namespace) lacks it.
current() {
	local path=/proc/sys/${1//.//}
	if [[ -r $path ]]; then
		normalize "$(<"$path")"
	else
		printf 'absent'
	fi
}

is_int() { [[ $1 =~ ^-?[0-9]+$ ]]; }

# Target for a key given its tag, the host value and the recommendation.
target() {
	local tag=$1 cur=$2 rec=$3
	if is_int "$cur" && is_int "$rec"; then
		if [[ $tag == "at least" ]] && ((cur > rec)); then
			printf '%s' "$cur"
			return
		fi
		if [[ $tag == "at most" ]] && ((cur < rec)); then
			printf '%s' "$cur"
			return
		fi
	fi
	printf '%s' "$rec"
}

re_tag='^#[[:space:]]*\[(at least|at most|exactly)\]'
re_key='^(-?)([a-z][a-z0-9_.-]*)[[:space:]]*=[[:space:]]*(.*[^[:space:]])[[:space:]]*$'

declare -a keys=()
declare -A tag_of=() rec_of=() before=() want=()

# Renders the file to install and records, per key, the tag, recommendation, host value and
# target. A tag applies only to a key on the very next line.
tag=""
while IFS= read -r line || [[ -n $line ]]; do
	if [[ $line =~ $re_tag ]]; then
		tag=${BASH_REMATCH[1]}
		printf '%s\n' "$line"
		continue
	fi
	if [[ $line =~ $re_key ]]; then
		dash=${BASH_REMATCH[1]}
		key=${BASH_REMATCH[2]}
		rec=$(normalize "${BASH_REMATCH[3]}")
		cur=$(current "$key")
		keys+=("$key")
		tag_of[$key]=${tag:-exactly}
		rec_of[$key]=$rec
		before[$key]=$cur
		if [[ $cur == absent ]]; then
			want[$key]=absent
			printf '# apply.sh: not on this kernel, left out: %s\n' "$line"
		else
			want[$key]=$(target "${tag_of[$key]}" "$cur" "$rec")
			if [[ ${want[$key]} != "$rec" ]]; then
				printf '# apply.sh: kept the host value; recommendation: %s\n' "$rec"
			fi
			printf '%s%s = %s\n' "$dash" "$key" "${want[$key]}"
		fi
	else
		printf '%s\n' "$line"
	fi
	tag=""
done <"$SYSCTL_SRC" >"$rendered"

# nofile values in limits.conf must fit under the fs.nr_open that will be in force.
nr_open_after=${want[fs.nr_open]:-$(current fs.nr_open)}
[[ $nr_open_after == absent ]] && nr_open_after=$(current fs.nr_open)
limits_ok=1
while read -r value; do
	if ! is_int "$value" || ! is_int "$nr_open_after" || ((value > nr_open_after)); then
		printf 'apply.sh: limits.conf nofile %s exceeds fs.nr_open %s; limits file not installed\n' \
			"$value" "$nr_open_after" >&2
		limits_ok=0
	fi
done < <(awk '!/^[[:space:]]*#/ && $3 == "nofile" { print $4 }' "$LIMITS_SRC")

print_plan() {
	printf '%-30s %-24s %-24s %s\n' KEY CURRENT RECOMMENDED ACTION
	local key action
	for key in "${keys[@]}"; do
		if [[ ${want[$key]} == absent ]]; then
			action="skip (not on this kernel)"
		elif [[ ${want[$key]} == "${before[$key]}" ]]; then
			action="none"
			[[ ${want[$key]} != "${rec_of[$key]}" ]] && action="none (host value kept, [${tag_of[$key]}])"
		else
			action="set to ${want[$key]}"
		fi
		printf '%-30s %-24s %-24s %s\n' "$key" "${before[$key]}" "${rec_of[$key]}" "$action"
	done
}

show_diff() { # installed-file new-file
	if [[ -e $1 ]]; then
		if cmp -s "$1" "$2"; then
			printf '%s: unchanged\n' "$1"
		else
			diff -u --label "$1 (installed)" --label "$1 (new)" "$1" "$2" || true
		fi
	else
		printf '%s: would be created with:\n' "$1"
		sed 's/^/+ /' -- "$2"
	fi
}

if ((dry_run)); then
	echo "== sysctl (dry run: nothing is written) =="
	print_plan
	echo
	show_diff "$SYSCTL_DEST" "$rendered"
	echo
	echo "== limits =="
	if ((limits_ok)); then
		show_diff "$LIMITS_DEST" "$LIMITS_SRC"
	else
		echo "would refuse to install $LIMITS_DEST (see above)"
	fi
	echo
	echo "dry run: would install $SYSCTL_DEST and $LIMITS_DEST, then run sysctl --system"
	exit 0
fi

stamp=$(date +%Y%m%d%H%M%S)
install_file() { # source dest
	if [[ -e $2 ]] && ! cmp -s "$1" "$2"; then
		cp -p -- "$2" "$2.bak.$stamp"
		printf 'kept the previous %s as %s.bak.%s\n' "$2" "$2" "$stamp"
	fi
	install -D -m 0644 -o root -g root -- "$1" "$2"
	printf 'installed %s\n' "$2"
}

echo "== before =="
print_plan
echo

install_file "$rendered" "$SYSCTL_DEST"
sysctl_log=$workdir/sysctl.log
sysctl_rc=0
sysctl --system >"$sysctl_log" 2>&1 || sysctl_rc=$?
if ((sysctl_rc != 0)); then
	printf 'sysctl --system exited %d; its complaints:\n' "$sysctl_rc"
	grep -iE 'error|cannot|invalid|denied|read-only|unknown' "$sysctl_log" || true
fi

if ((limits_ok)); then
	install_file "$LIMITS_SRC" "$LIMITS_DEST"
fi
echo

echo "== after =="
status=0
printf '%-30s %-24s %-24s %s\n' KEY BEFORE AFTER NOTE
for key in "${keys[@]}"; do
	after=$(current "$key")
	note="ok"
	if [[ ${want[$key]} == absent ]]; then
		note="not on this kernel"
	elif [[ $after != "${want[$key]}" ]]; then
		note="NOT APPLIED (want ${want[$key]})"
		status=1
	elif [[ $after != "${before[$key]}" ]]; then
		note="changed"
	fi
	printf '%-30s %-24s %-24s %s\n' "$key" "${before[$key]}" "$after" "$note"
done
((limits_ok)) || status=1
if ((status)); then
	cat <<'EOF'

NOT APPLIED: /proc/sys is read-only (a container?), a file that sorts later sets the key,
or the kernel refused the value (see the sysctl --system complaints above).
EOF
fi

cat <<EOF

Limits apply to new login sessions only; systemd services take LimitNOFILE=/LimitMEMLOCK=
from their unit (see tuning/ringcast.service). Check the result with tuning/check.sh.
A later file can override a key: grep -r KEY /etc/sysctl.d /run/sysctl.d /usr/lib/sysctl.d /etc/sysctl.conf
EOF
exit "$status"
