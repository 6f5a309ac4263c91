#!/usr/bin/env bash
# make test-vm: tether's privileged tests inside a QEMU guest running the stock Debian kernel, where
# BPF LSM works (on the development host it does not). Two boots:
#   1. lsm=...,bpf: every privileged test, and tether must pick the LSM exec path by itself;
#   2. lsm without bpf: LSM programs would attach and never run; tether must see that and pick
#      the signal path, whose exec tests must pass.
# The kernel is cached by package version under .cache/vm (TETHER_VM_CACHE). QEMU's exit status is
# always 0: the guest prints its own, and that is what this script exits with. A soft lockup in the
# guest panics it at once, with every CPU's stack (loglevel 5 lets them through): the boot then
# fails in seconds instead of hanging until the timeout.
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
# step prints what the script does now, after how long (the boots take minutes each).
step() { echo "== [$(($(date +%s) - start))s] $*"; }
export PATH="$PATH:/usr/local/go/bin"
cache=${TETHER_VM_CACHE:-$PWD/.cache/vm}
timeout_s=${TETHER_VM_TIMEOUT:-2400} # per boot; the BPF LSM boot takes about 20 min (the list below)

for c in qemu-system-x86_64 cpio xz apt-get dpkg go; do
	command -v $c >/dev/null || { echo "test-vm needs $c (apt-get install -y --no-install-recommends qemu-system-x86 cpio xz-utils)"; exit 1; }
done

# The kernel package linux-image-amd64 depends on, cached by version.
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
kdir="$cache/$pkg-$ver"
if [ ! -s "$kdir/vmlinux" ]; then
	step "fetching $pkg $ver (Debian's kernel, cached in $kdir afterwards)"
	tmp=$(mktemp -d)
	(cd "$tmp" && apt-get download "$pkg=$ver" 2>/dev/null && dpkg -x ./*.deb x)
	vmlinuz=$(ls "$tmp"/x/boot/vmlinuz-*)
	off=$(LC_ALL=C grep -m1 -obUaP '\xfd7zXZ\x00' "$vmlinuz" | cut -d: -f1)
	mkdir -p "$kdir"
	tail -c +$((off + 1)) "$vmlinuz" >"$tmp/payload.xz"
	xz -dcq --single-stream "$tmp/payload.xz" >"$kdir/vmlinux.tmp"
	cp "$(find "$tmp"/x/lib/modules -name veth.ko)" "$kdir/veth.ko"
	mv "$kdir/vmlinux.tmp" "$kdir/vmlinux"
	rm -rf "$tmp"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{bin,vm,etc,lib/modules,proc,sys,dev,tmp,run}
step "building the guest's binaries and test binaries"
export CGO_ENABLED=0
go build -o "$root/init" ./test/vm/init
go build -o "$root/bin/" ./cmd/tetherd ./cmd/tetherctl
go test -c -o "$root/bin/kernel.test" ./pkg/kernel
go test -c -o "$root/bin/e2e.test" ./test/e2e
go test -c -o "$root/bin/differential.test" ./test/differential
go build -ldflags=-s -o "$root/bin/true" ./test/vm/true
cp "$kdir/veth.ko" "$root/lib/modules/"
printf 'root:x:0:0:root:/tmp:/bin/false\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"

# boot NAME LSMS PLAN: runs the guest and returns the exit status it printed.
boot() {
	local name=$1 lsms=$2 plan=$3
	echo "$plan" >"$root/vm/plan.json"
	(cd "$root" && find . | cpio -o -H newc --quiet) >"$work/payload.cpio"
	step "boot $name: lsm=$lsms (software emulation: the lsm boot takes about 20 minutes, the other one 1)"
	local log="$work/$name.log"
	timeout "$timeout_s" qemu-system-x86_64 -nodefaults -no-user-config -accel tcg -cpu max -smp 2 -m 2G \
		-kernel "$kdir/vmlinux" -initrd "$work/payload.cpio" -display none -serial stdio -no-reboot \
		-append "console=ttyS0 panic=-1 loglevel=5 softlockup_panic=1 softlockup_all_cpu_backtrace=1 mitigations=off lsm=$lsms" | tee "$log" || true
	local result
	result=$(tr -d '\r' <"$log" | awk '/^TETHER-VM-RESULT/ {print $2}' | tail -1)
	if [ -z "$result" ]; then
		step "boot $name: the guest printed no result (crash or timeout)"
		return 1
	fi
	step "boot $name: guest exit status $result"
	return "$result"
}

# Debian 12's 6.1 has no bpf_sock_destroy (6.5): live sockets are cut by dropping their packets.
common='"TETHER_REQUIRE_PRIVILEGED=1", "TETHER_E2E_BIN=/bin", "TETHER_EXPECT_SOCK_DESTROY=0"'
# The guest runs what the exec and unix paths (LSM here, signal on the host) or the older kernel
# change; the rest runs on the host only (make test), where it costs a tenth of its emulated time,
# which keeps CI's 45 minutes:
#  - pkg/kernel: the user-space map management (HostRules*, BulkRanges, MirrorsStayTrue,
#    AtomicSwap, MapMemory) and the live-socket cases whose mechanism, the packet drop of a kernel
#    without bpf_sock_destroy, the guest already shows in Revocation, KillCuts, RestartKeepsPacketsCut
#    and Sweep* (MaxDuration, AuditModeLiveSockets, ClearCutsLiveSockets: about 80 s here);
#  - test/e2e: the identity, credential, handoff, metrics, stream, bundle, task and renewal tests
#    (the guest also lacks the SPIRE and Prometheus binaries, and the shell, git and curl
#    StrictAgentWorks runs); the DNS tests (DNSProxy*, FQDNFollowsDNS: connect and sendmsg, which
#    the LSM does not change; DNSProxyRestart's 8 s TTL would not outlast a restart of tetherd
#    here) and SystemdNotify;
#  - test/differential: 1,000 samples instead of the host's 10,000 (its exec samples are what the
#    guest adds).
status=0
boot lsm "lockdown,capability,landlock,yama,bpf" '[
 {"name": "pkg/kernel", "bin": "/bin/kernel.test", "args": ["-test.v", "-test.timeout=20m", "-test.skip", "HostRules|BulkRanges|MirrorsStayTrue|AtomicSwap|MapMemory|MaxDuration|AuditModeLiveSockets|ClearCutsLiveSockets"], "env": ['"$common"', "TETHER_EXPECT_EXEC_MODE=lsm"]},
 {"name": "test/e2e", "bin": "/bin/e2e.test", "args": ["-test.v", "-test.timeout=20m", "-test.skip", "SPIRE|KillFinishesAfterRestart|DNSProxy|FQDNFollowsDNS|SystemdNotify|LiveSocketsFollowContext|Prometheus|TaskCredentials|Handoff|StaticIdentity|EventsStream|DenyLoad|DecisionLogEvaluations|ProbeCommand|HealthProbes|DaemonSetCapabilities|StrictAgentWorks|PolicyBundle|TaskAndApprovalThroughTetherctl|SelfRenewalIsBounded|Reaper"], "env": ['"$common"', "TETHER_EXPECT_EXEC_MODE=lsm"]},
 {"name": "test/differential", "bin": "/bin/differential.test", "args": ["-test.v", "-test.timeout=20m"], "env": ['"$common"', "TETHER_DIFF_SAMPLES=1000", "TETHER_EXPECT_EXEC_MODE=lsm"]}
]' || status=1
boot no-bpf-lsm "lockdown,capability,landlock,yama" '[
 {"name": "pkg/kernel exec", "bin": "/bin/kernel.test", "args": ["-test.v", "-test.run", "TestPrivilegedLoad|TestPrivilegedExec"], "env": ['"$common"', "TETHER_EXPECT_EXEC_MODE=signal"]}
]' || status=1
exit $status
