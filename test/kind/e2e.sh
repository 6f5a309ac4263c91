#!/usr/bin/env bash
# End-to-end on a kind cluster, for machines with a Docker engine, kind, kubectl and helm:
# builds the image, loads it into a new cluster, installs the chart with test/kind/values.yaml and
# the shipped policies with test/kind/data.json, then runs an agent pod that may connect to one
# port of a target and not to another, and checks both verdicts and the decision log.
# test/k8s (TestKindFiles) renders and checks these same inputs on machines without Docker.
# Usage: test/kind/e2e.sh [--keep]   (--keep leaves the cluster for a look around)
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=tether-e2e
IMAGE=tether.local/tether:e2e
NS=tether-system
AGENT_ID=spiffe://cluster.local/ns/agents/sa/agent
keep=false
[ "${1:-}" = --keep ] && keep=true

for tool in docker kind kubectl helm; do
	command -v "$tool" >/dev/null || { echo "e2e: $tool is needed" >&2; exit 2; }
done

cleanup() {
	if [ "$keep" = false ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

echo "== image $IMAGE"
docker build -t "$IMAGE" .

echo "== cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --wait 120s
kind load docker-image "$IMAGE" --name "$CLUSTER"
ctx=(--context "kind-$CLUSTER")

echo "== chart"
policy=()
for f in policies/tether/*.rego; do
	case "$f" in *_test.rego) continue ;; esac
	name=$(basename "$f")
	policy+=(--set-file "policy.files.${name//./\\.}=$f")
done
policy+=(--set-file 'policy.files.data\.json=test/kind/data.json')
helm --kube-context "kind-$CLUSTER" install tether deploy/helm/tether -n "$NS" --create-namespace \
	-f test/kind/values.yaml "${policy[@]}" --wait --timeout 180s
kubectl "${ctx[@]}" -n "$NS" rollout status ds/tether --timeout=120s
kubectl "${ctx[@]}" -n "$NS" exec ds/tether -- tetherd --config /etc/tether/tetherd.yaml probe

echo "== workloads"
kubectl "${ctx[@]}" apply -f test/kind/workloads.yaml
kubectl "${ctx[@]}" -n agents wait --for=condition=Ready pod/target pod/agent --timeout=120s

echo "== the agent pod is an agent"
for i in $(seq 60); do
	if kubectl "${ctx[@]}" -n "$NS" exec ds/tether -- tetherctl agents | grep -q "$AGENT_ID"; then break; fi
	[ "$i" = 60 ] && { echo "e2e: tetherd never registered $AGENT_ID" >&2; kubectl "${ctx[@]}" -n "$NS" logs ds/tether | tail -50; exit 1; }
	sleep 1
done

echo "== verdicts"
fail=0
if out=$(kubectl "${ctx[@]}" -n agents exec agent -- wget -q -T 5 -O - http://target:8080/ 2>&1) && [ "$out" = tether-e2e ]; then
	echo "allowed: target:8080 answered"
else
	echo "e2e: target:8080 should be allowed: $out" >&2
	fail=1
fi
if out=$(kubectl "${ctx[@]}" -n agents exec agent -- wget -q -T 5 -O - http://target:8081/ 2>&1); then
	echo "e2e: target:8081 should be denied, it answered: $out" >&2
	fail=1
elif grep -q "Operation not permitted" <<<"$out"; then
	echo "denied: target:8081 refused in the kernel ($out)"
else
	echo "e2e: target:8081 failed, but not with EPERM (so not by tether): $out" >&2
	fail=1
fi
# Pods that are not agents are left alone (their connects run the same hooks).
if ! kubectl "${ctx[@]}" -n agents exec target -- wget -q -T 5 -O - http://127.0.0.1:8081/ >/dev/null 2>&1; then
	echo "e2e: a pod that is not an agent could not reach port 8081" >&2
	fail=1
fi

echo "== decision log"
if kubectl "${ctx[@]}" -n "$NS" logs ds/tether | grep '"verdict":"deny"' | grep -q "$AGENT_ID"; then
	echo "the denial is in the decision log with the agent's SPIFFE ID"
else
	echo "e2e: no denial of $AGENT_ID in the decision log" >&2
	fail=1
fi

if [ "$fail" != 0 ]; then
	kubectl "${ctx[@]}" -n "$NS" logs ds/tether | tail -50
	exit 1
fi
echo "e2e: passed"
