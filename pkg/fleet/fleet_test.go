package fleet

import (
	"context"
	"log/slog"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/tools/cache"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/killpath"
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
	f := &Fleet{trustDomain: "cluster.local", active: map[string]Spec{}, killed: map[string]map[string]struct{}{}, log: slog.New(slog.DiscardHandler),
		killer: &fakeKiller{}}
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

// fakeKiller is the kill path's deny list and the agents it readmits and thaws.
type fakeKiller struct {
	denied  []killpath.Denied
	agents  []agents.Agent
	resumed []dataplane.Slot
}

func (k *fakeKiller) KillTarget(context.Context, killpath.Target, string, string, bool) ([]killpath.Kill, error) {
	return nil, nil
}

func (k *fakeKiller) Readmit(id string) ([]agents.Agent, error) {
	k.denied = slices.DeleteFunc(k.denied, func(d killpath.Denied) bool { return d.SpiffeID == id })
	var out []agents.Agent
	for _, a := range k.agents {
		if a.SpiffeID == id {
			out = append(out, a)
		}
	}
	return out, nil
}

func (k *fakeKiller) Resume(slot dataplane.Slot) (agents.Agent, error) {
	k.resumed = append(k.resumed, slot)
	return agents.Agent{}, nil
}

func (k *fakeKiller) IsDenied(id string) bool {
	return slices.ContainsFunc(k.denied, func(d killpath.Denied) bool { return d.SpiffeID == id })
}

func (k *fakeKiller) DeniedIDs() []killpath.Denied { return slices.Clone(k.denied) }

// TestReadmitAfterRestart: a tetherd that did not run the kill itself (it started after) still
// readmits and thaws, when the AgentKill is withdrawn, what the kill path's deny list says that
// AgentKill asked for, and nothing another requester killed. readmitWithdrawn does so for an
// AgentKill deleted while tetherd was down (no event tells it), and keeps one that exists.
func TestReadmitAfterRestart(t *testing.T) {
	const coder, other = "spiffe://cluster.local/ns/agents/sa/coder", "spiffe://cluster.local/ns/agents/sa/other"
	k := &fakeKiller{
		denied: []killpath.Denied{{SpiffeID: coder, Requester: requester("coders")}, {SpiffeID: other, Requester: "uid:0"}},
		agents: []agents.Agent{{Slot: 3, SpiffeID: coder}, {Slot: 4, SpiffeID: other}},
	}
	f := &Fleet{trustDomain: "cluster.local", active: map[string]Spec{}, killed: map[string]map[string]struct{}{}, status: map[string]map[dataplane.Slot]AgentStatus{},
		log: slog.New(slog.DiscardHandler), killer: k}
	f.readmit("coders", nil)
	if k.IsDenied(coder) || !k.IsDenied(other) || !slices.Equal(k.resumed, []dataplane.Slot{3}) {
		t.Errorf("deny list %+v, thawed %v: want the AgentKill's identity readmitted and its agent thawed, the other kept", k.denied, k.resumed)
	}
}

func TestReadmitWithdrawn(t *testing.T) {
	const coder, web = "spiffe://cluster.local/ns/agents/sa/coder", "spiffe://cluster.local/ns/web/sa/coder"
	k := &fakeKiller{
		denied: []killpath.Denied{{SpiffeID: coder, Requester: requester("gone")}, {SpiffeID: web, Requester: requester("kept")}},
		agents: []agents.Agent{{Slot: 3, SpiffeID: coder}, {Slot: 4, SpiffeID: web}},
	}
	f := &Fleet{trustDomain: "cluster.local", active: map[string]Spec{}, killed: map[string]map[string]struct{}{}, status: map[string]map[dataplane.Slot]AgentStatus{},
		log: slog.New(slog.DiscardHandler), killer: k, informer: cache.NewSharedIndexInformer(&cache.ListWatch{}, &unstructured.Unstructured{}, 0, cache.Indexers{})}
	kept := agentKill(map[string]any{"spiffeID": web, "reason": "x"})
	kept.SetName("kept")
	if err := f.informer.GetStore().Add(kept); err != nil {
		t.Fatal(err)
	}
	f.readmitWithdrawn()
	if k.IsDenied(coder) || !k.IsDenied(web) || !slices.Equal(k.resumed, []dataplane.Slot{3}) {
		t.Errorf("deny list %+v, thawed %v: want the deleted AgentKill's identity readmitted, the existing one's kept", k.denied, k.resumed)
	}
}
