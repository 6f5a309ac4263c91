#!/usr/bin/env bash
# tether demo: runs tetherd on its embedded defaults (no configuration file) and shows an agent
# allowed and denied in the kernel. Needs root, curl and python3 (for two local HTTP servers).
# It leaves nothing behind: on exit tetherd stops and its pins and cgroup are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=./bin
AGENT=spiffe://tether.local/demo/agent
AUDITOR=spiffe://tether.local/demo/auditor

[ "$(id -u)" = 0 ] || { echo "the demo loads BPF programs: run it as root (sudo make demo)"; exit 1; }
for c in curl python3; do
	command -v $c >/dev/null || { echo "the demo needs $c"; exit 1; }
done
for port in 8080 8081; do
	if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
		echo "127.0.0.1:$port is in use; the demo's grants name it: free it first"; exit 1
	fi
done

work=$(mktemp -d)
pids=()
# tetherd's defaults keep task credentials at /run/tether/credentials (a tmpfs: /run's, or one of
# its own) and its signing key in /var/lib/tether: the demo removes what it created there.
creds=/run/tether/credentials key=/var/lib/tether/credentials.key
had_creds=$([ -e $creds ] && echo yes || true)
had_key=$([ -e $key ] && echo yes || true)
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	$BIN/tetherd --remove-pins || true
	[ -n "$had_creds" ] || { umount $creds 2>/dev/null; rm -rf $creds; } || true
	[ -n "$had_key" ] || { rm -f $key; rmdir /var/lib/tether 2>/dev/null; } || true
	cg=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
	[ -n "$cg" ] && rmdir "$cg/tether" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

python3 -m http.server 8080 --bind 127.0.0.1 >/dev/null 2>&1 & pids+=($!)
python3 -m http.server 8081 --bind 127.0.0.1 >/dev/null 2>&1 & pids+=($!)

step "start tetherd on its embedded defaults (decisions to $work/decisions.jsonl)"
$BIN/tetherd >"$work/decisions.jsonl" 2>"$work/tetherd.log" & pids+=($!)
for _ in $(seq 100); do $BIN/tetherctl status >/dev/null 2>&1 && break; sleep 0.1; done
run $BIN/tetherctl status

step "1. $AGENT may reach 127.0.0.1:8080 with curl"
run $BIN/tetherctl run --id $AGENT -- curl -sS -o /dev/null -w 'HTTP %{http_code}\n' http://127.0.0.1:8080/

step "2. ... but not 127.0.0.1:8081: connect(2) fails with EPERM in the kernel"
run $BIN/tetherctl run --id $AGENT -- curl -sS -o /dev/null http://127.0.0.1:8081/ || echo "(curl exited $?)"

step "3. ... and may not exec a shell: the process is stopped before it runs"
run $BIN/tetherctl run --id $AGENT -- sh -c 'echo this line never prints' || echo "(exit $?: 137 is SIGKILL; with BPF LSM the exec fails with EPERM)"

step "4. $AUDITOR is in audit mode: the same connect succeeds and is logged as audit-deny"
run $BIN/tetherctl run --id $AUDITOR -- curl -sS -o /dev/null -w 'HTTP %{http_code}\n' http://127.0.0.1:8081/

sleep 0.3
step "decisions tetherd logged (JSON lines; here: verdict kind target identity)"
python3 - "$work/decisions.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d["kind"] == "policy":
        ev = d["policy"]
        rules = {k: len(v) for k, v in (ev.get("result") or {}).items() if isinstance(v, list)}
        print(f'{d["verdict"]:<11} {d["kind"]:<13} {ev["query"]:<24} {d.get("spiffe_id", "?")}  (revision {d.get("policy_revision")}, {rules}, {ev["duration_ns"] // 1000} µs)')
        continue
    target = d.get("destination") or d.get("executable") or d.get("socket_path") or ""
    print(f'{d["verdict"]:<11} {d["kind"]:<13} {target:<24} {d.get("spiffe_id", "?")}  (pid {d["pid"]} {d.get("binary") or d["comm"]}, rule generation {d["rule_generation"]})')
PY
echo
echo "one full record:"
grep '"verdict":"deny"' "$work/decisions.jsonl" | grep connect4 | head -1
step "done: tetherd stops, its pins and cgroup are removed"
