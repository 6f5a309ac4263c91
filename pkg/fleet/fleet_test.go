package fleet

import (
	"log/slog"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

func agentKill(spec map[string]any) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{"apiVersion": "tether.dev/v1alpha1", "kind": Kind,
		"metadata": map[string]any{"name": "k"}, "spec": spec}}
}

// TestDecodeRefuses: an AgentKill that selects nothing, a service account without a namespace,
// no reason, or a selector that does not parse is refused with why.
func TestDecodeRefuses(t *testing.T) {
	for _, c := range []struct {
		spec map[string]any
		want string
	}{
		{map[string]any{"reason": "x"}, "selects no agent"},
		{map[string]any{"serviceAccount": "coder", "spiffeID": "spiffe://td/a", "reason": "x"}, "needs spec.namespace"},
		{map[string]any{"spiffeID": "spiffe://td/a"}, "reason is required"},
		{map[string]any{"podSelector": map[string]any{"matchExpressions": []any{map[string]any{"key": "a", "operator": "Bogus"}}}, "reason": "x"}, "podSelector"},
		{map[string]any{"spiffeID": int64(7), "reason": "x"}, "spec"},
	} {
		if _, _, err := Decode(agentKill(c.spec)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: %v, want an error with %q", c.spec, err, c.want)
		}
	}
	if _, sel, err := Decode(agentKill(map[string]any{"podSelector": map[string]any{"matchLabels": map[string]any{"team": "web"}}, "reason": "x"})); err != nil || sel == nil {
		t.Errorf("a pod selector: %v %v", sel, err)
	}
}

// TestDenies: an AgentKill in force denies the identities it names (by SPIFFE ID, by namespace
// and service account, by namespace alone) before any agent has them; one selecting by pod labels
// does not (labels are not known from an ID), and a withdrawn one denies nothing.
func TestDenies(t *testing.T) {
	f := &Fleet{trustDomain: "cluster.local", active: map[string]Spec{}, killed: map[string]map[string]struct{}{}, log: slog.New(slog.DiscardHandler)}
	const coder, other, elsewhere = "spiffe://cluster.local/ns/agents/sa/coder", "spiffe://cluster.local/ns/agents/sa/other", "spiffe://cluster.local/ns/web/sa/coder"
	var nilFleet *Fleet
	if nilFleet.Denies(coder) {
		t.Error("no fleet denies")
	}
	check := func(what string, want map[string]bool) {
		t.Helper()
		for id, w := range want {
			if got := f.Denies(id); got != w {
				t.Errorf("%s: Denies(%s) = %v, want %v", what, id, got, w)
			}
		}
	}
	f.active["a"] = Spec{SpiffeID: coder, Reason: "x"}
	check("by SPIFFE ID", map[string]bool{coder: true, other: false, elsewhere: false})
	f.active["a"] = Spec{Namespace: "agents", ServiceAccount: "coder", Reason: "x"}
	check("by service account", map[string]bool{coder: true, other: false, elsewhere: false})
	f.active["a"] = Spec{Namespace: "agents", Reason: "x"}
	check("by namespace", map[string]bool{coder: true, other: true, elsewhere: false, "spiffe://cluster.local/ns/agents/sa/x/y": false})
	f.active["a"] = Spec{Namespace: "agents", PodSelector: nil, Reason: "x"}
	f.readmit("a", nil)
	check("withdrawn", map[string]bool{coder: false, other: false})
}
