// Package fleet carries out the cluster's kills on this node: every tetherd watches the
// cluster-scoped AgentKill resources (group tether.dev, the chart ships the CRD), runs the kill
// path on its agents that an AgentKill selects, and writes what it did under
// status.nodes.<node> (conditions, and each agent's steps with their timing). Deleting the
// AgentKill, or spec.readmit, readmits and thaws what it killed here. A node that was down when the kill
// was issued carries it out when its tetherd starts: the SPIFFE IDs an AgentKill names are
// denied before a pod with one of them is admitted (Denies), and live agents it selects are
// killed once the AgentKills are listed.
package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/killpath"
)

// Resource is the AgentKill resource.
var Resource = schema.GroupVersionResource{Group: "tether.dev", Version: "v1alpha1", Resource: "agentkills"}

// Kind is AgentKill's kind.
const Kind = "AgentKill"

// Spec is what an AgentKill asks for. It selects agents by at least one of SpiffeID, Namespace
// (with ServiceAccount: that service account's identity) and PodSelector (the agent pod's
// labels); an agent must match every selector given.
type Spec struct {
	SpiffeID       string                `json:"spiffeID,omitempty"`
	Namespace      string                `json:"namespace,omitempty"`
	ServiceAccount string                `json:"serviceAccount,omitempty"`
	PodSelector    *metav1.LabelSelector `json:"podSelector,omitempty"`
	Reason         string                `json:"reason"`
	// Terminate also ends the agents' processes (cgroup.kill).
	Terminate bool `json:"terminate,omitempty"`
	// Readmit readmits what the kill killed (as deleting it does) and keeps the record.
	Readmit bool `json:"readmit,omitempty"`
}

// NodeStatus is what one node did for an AgentKill.
type NodeStatus struct {
	ObservedGeneration int64              `json:"observedGeneration"`
	Conditions         []metav1.Condition `json:"conditions"`
	Agents             []AgentStatus      `json:"agents,omitempty"`
}

// AgentStatus is one agent this node killed.
type AgentStatus struct {
	SpiffeID string `json:"spiffeID"`
	Pod      string `json:"pod,omitempty"` // namespace/name
	KillID   string `json:"killID"`
	Done     bool   `json:"done"`
	Steps    []Step `json:"steps"`
}

// Step is one step of the kill path on one agent, timed.
type Step struct {
	Name   string `json:"name"`
	Done   bool   `json:"done"`
	TookNs int64  `json:"tookNs"`
	Error  string `json:"error,omitempty"`
}

// Condition types of a NodeStatus.
const (
	// Killed is true when every agent the kill selects on the node is killed (reason Done, or
	// NoAgents), false when a step failed (Failed) or after a readmit (Readmitted).
	Killed = "Killed"
)

// Killer is the node's kill path.
type Killer interface {
	KillTarget(ctx context.Context, t killpath.Target, reason, requester string, terminate bool) ([]killpath.Kill, error)
	Readmit(id string) ([]agents.Agent, error)
	Resume(slot dataplane.Slot) (agents.Agent, error)
	IsDenied(id string) bool
	DeniedIDs() []killpath.Denied
}

// Agents lists the node's agents.
type Agents interface {
	List() []agents.Agent
}

// Fleet watches the AgentKills and carries them out on this node.
type Fleet struct {
	client      dynamic.Interface
	node        string
	trustDomain string
	killer      Killer
	agents      Agents
	log         *slog.Logger
	informer    cache.SharedIndexInformer
	resync      time.Duration

	// PodName, if set, names the pod of an agent (namespace/name) for the status.
	PodName func(slot dataplane.Slot) string

	mu     sync.Mutex
	active map[string]Spec                           // by AgentKill name: the kills in force
	killed map[string]map[string]struct{}            // by AgentKill name: the SPIFFE IDs it killed here
	status map[string]map[dataplane.Slot]AgentStatus // by AgentKill name: the agents it killed here
	err    string                                    // why the AgentKills cannot be watched, if so
}

// New watches the AgentKills with client for node, whose pod identities are under trustDomain.
func New(client dynamic.Interface, node, trustDomain string, k Killer, a Agents, log *slog.Logger) *Fleet {
	f := &Fleet{client: client, node: node, trustDomain: trustDomain, killer: k, agents: a, log: log, resync: 5 * time.Second,
		active: map[string]Spec{}, killed: map[string]map[string]struct{}{}, status: map[string]map[dataplane.Slot]AgentStatus{}}
	factory := dynamicinformer.NewDynamicSharedInformerFactory(client, 0)
	f.informer = factory.ForResource(Resource).Informer()
	f.informer.SetWatchErrorHandler(func(_ *cache.Reflector, err error) {
		f.mu.Lock()
		f.err = err.Error()
		f.mu.Unlock()
		log.Warn("watching AgentKills (is the chart's CRD installed?)", "error", err)
	})
	f.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { f.changed(obj) },
		UpdateFunc: func(_, obj any) { f.changed(obj) },
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if u, ok := obj.(*unstructured.Unstructured); ok {
				f.readmit(u.GetName(), nil)
			}
		},
	})
	return f
}

// Run watches until ctx ends. Agents that appear later and an AgentKill selects are killed
// within the resync period. Once the AgentKills are listed, identities that one killed here and
// that was deleted while this tetherd was not running are readmitted.
func (f *Fleet) Run(ctx context.Context) {
	go f.informer.Run(ctx.Done())
	go func() {
		if f.WaitSynced(ctx) {
			f.readmitWithdrawn()
		}
	}()
	t := time.NewTicker(f.resync)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			for _, obj := range f.informer.GetStore().List() {
				f.changed(obj)
			}
		}
	}
}

// WaitSynced waits until the AgentKills are listed (the IDs they name are denied from then on),
// or ctx ends.
func (f *Fleet) WaitSynced(ctx context.Context) bool {
	return cache.WaitForCacheSync(ctx.Done(), f.informer.HasSynced)
}

// Status says whether the AgentKills are watched, and how many are in force.
func (f *Fleet) Status() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case !f.informer.HasSynced() && f.err != "":
		return "AgentKills cannot be listed: " + f.err
	case !f.informer.HasSynced():
		return "AgentKills not listed yet"
	}
	return fmt.Sprintf("watching AgentKills: %d in force", len(f.active))
}

// Denies reports whether an AgentKill in force names spiffeID (by its SPIFFE ID, or its
// namespace and service account): an agent with it is registered killed.
func (f *Fleet) Denies(spiffeID string) bool {
	if f == nil {
		return false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, s := range f.active {
		if s.PodSelector == nil && f.idMatches(s, spiffeID) {
			return true
		}
	}
	return false
}

// idMatches reports whether spiffeID satisfies the identity selectors of s (all of them; true
// when s has none).
func (f *Fleet) idMatches(s Spec, spiffeID string) bool {
	if s.SpiffeID != "" && s.SpiffeID != spiffeID {
		return false
	}
	if s.Namespace != "" {
		prefix := "spiffe://" + f.trustDomain + "/ns/" + s.Namespace + "/sa/"
		if s.ServiceAccount != "" {
			return spiffeID == prefix+s.ServiceAccount
		}
		return strings.HasPrefix(spiffeID, prefix) && !strings.Contains(strings.TrimPrefix(spiffeID, prefix), "/")
	}
	return true
}

// selects reports whether s selects agent a.
func (f *Fleet) selects(s Spec, sel labels.Selector, a agents.Agent) bool {
	if !f.idMatches(s, a.SpiffeID) {
		return false
	}
	return sel == nil || sel.Matches(labels.Set(a.Labels))
}

// Decode reads an AgentKill's spec, refusing one that selects nothing or gives no reason.
func Decode(u *unstructured.Unstructured) (Spec, labels.Selector, error) {
	var s Spec
	raw, _, _ := unstructured.NestedMap(u.Object, "spec")
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(raw, &s); err != nil {
		return s, nil, fmt.Errorf("spec: %w", err)
	}
	if s.SpiffeID == "" && s.Namespace == "" && s.PodSelector == nil {
		return s, nil, errors.New("spec selects no agent: give spiffeID, namespace or podSelector")
	}
	if s.ServiceAccount != "" && s.Namespace == "" {
		return s, nil, errors.New("spec.serviceAccount needs spec.namespace")
	}
	if s.Reason == "" {
		return s, nil, errors.New("spec.reason is required")
	}
	var sel labels.Selector
	if s.PodSelector != nil {
		var err error
		if sel, err = metav1.LabelSelectorAsSelector(s.PodSelector); err != nil {
			return s, nil, fmt.Errorf("spec.podSelector: %w", err)
		}
	}
	return s, sel, nil
}

// changed carries out an AgentKill that was created, changed or is looked at again.
func (f *Fleet) changed(obj any) {
	u, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return
	}
	name := u.GetName()
	s, sel, err := Decode(u)
	if err != nil {
		f.report(u, NodeStatus{Conditions: []metav1.Condition{cond(u, metav1.ConditionFalse, "Invalid", err.Error())}})
		return
	}
	if s.Readmit || u.GetDeletionTimestamp() != nil {
		f.readmit(name, u)
		return
	}
	f.mu.Lock()
	f.active[name] = s
	if f.status[name] == nil {
		f.status[name], f.killed[name] = map[dataplane.Slot]AgentStatus{}, map[string]struct{}{}
	}
	f.mu.Unlock()

	var kills []killpath.Kill
	var errs []error
	for _, a := range f.agents.List() {
		if !f.selects(s, sel, a) {
			continue
		}
		f.mu.Lock()
		_, seen := f.status[name][a.Slot]
		f.mu.Unlock()
		if seen && a.Killed {
			continue
		}
		ks, err := f.killer.KillTarget(context.Background(), killpath.Target{Slot: &a.Slot}, s.Reason, requester(name), s.Terminate)
		if err != nil {
			errs = append(errs, err)
		}
		f.mu.Lock()
		for _, k := range ks {
			as := AgentStatus{SpiffeID: k.SpiffeID, KillID: k.ID, Done: k.Done}
			if f.PodName != nil {
				as.Pod = f.PodName(k.Slot)
			}
			for _, step := range k.Steps {
				as.Steps = append(as.Steps, Step{Name: step.Name, Done: step.Done, TookNs: step.Took.Nanoseconds(), Error: step.Error})
			}
			f.status[name][k.Slot] = as
			f.killed[name][k.SpiffeID] = struct{}{}
		}
		f.mu.Unlock()
		kills = append(kills, ks...)
	}
	if len(kills) == 0 && len(errs) == 0 && u.GetGeneration() == observed(u, f.node) {
		return // nothing new
	}
	f.log.Warn("AgentKill carried out", "agentkill", name, "agents", len(kills), "errors", len(errs))
	f.report(u, f.nodeStatus(u, errs))
}

// nodeStatus is this node's status of AgentKill u: every agent it killed here since tetherd
// started, and whether all are killed.
func (f *Fleet) nodeStatus(u *unstructured.Unstructured, errs []error) NodeStatus {
	name := u.GetName()
	st := NodeStatus{ObservedGeneration: u.GetGeneration()}
	f.mu.Lock()
	for slot, as := range f.status[name] {
		if as.Pod == "" && f.PodName != nil { // killed before the pod watch knew it
			as.Pod = f.PodName(slot)
			f.status[name][slot] = as
		}
		st.Agents = append(st.Agents, as)
	}
	f.mu.Unlock()
	slices.SortFunc(st.Agents, func(a, b AgentStatus) int { return strings.Compare(a.KillID, b.KillID) })
	switch {
	case len(errs) > 0:
		st.Conditions = []metav1.Condition{cond(u, metav1.ConditionFalse, "Failed", errors.Join(errs...).Error())}
	case len(st.Agents) == 0:
		st.Conditions = []metav1.Condition{cond(u, metav1.ConditionTrue, "NoAgents", "no agent on this node is selected; the identities it names are denied here")}
	default:
		done := !slices.ContainsFunc(st.Agents, func(a AgentStatus) bool { return !a.Done })
		status, reason := metav1.ConditionTrue, "Done"
		if !done {
			status, reason = metav1.ConditionFalse, "InProgress"
		}
		st.Conditions = []metav1.Condition{cond(u, status, reason, fmt.Sprintf("%d agent(s) killed on this node", len(st.Agents)))}
	}
	return st
}

// readmit readmits what the AgentKill name killed on this node; u, when it still exists, gets
// the status.
func (f *Fleet) readmit(name string, u *unstructured.Unstructured) {
	denied := f.killer.DeniedIDs()
	f.mu.Lock()
	_, wasActive := f.active[name]
	ids := f.killed[name]
	if ids == nil {
		ids = map[string]struct{}{}
	}
	// What it killed before this tetherd started: the kill path's deny list says who asked.
	for _, d := range denied {
		if d.Requester == requester(name) {
			ids[d.SpiffeID] = struct{}{}
		}
	}
	delete(f.active, name)
	delete(f.killed, name)
	delete(f.status, name)
	f.mu.Unlock()
	var errs []error
	for id := range ids {
		if !f.killer.IsDenied(id) {
			continue
		}
		readmitted, err := f.killer.Readmit(id)
		if err != nil {
			errs = append(errs, err)
		}
		// A readmitted pod runs again: thawed (tetherctl readmit leaves that to resume, for
		// investigation first; withdrawing a cluster kill means it was not wanted).
		for _, a := range readmitted {
			if _, err := f.killer.Resume(a.Slot); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if wasActive || len(ids) > 0 {
		f.log.Warn("AgentKill withdrawn: readmitted", "agentkill", name, "identities", len(ids))
	}
	if u == nil || u.GetDeletionTimestamp() != nil || observed(u, f.node) == u.GetGeneration() {
		return
	}
	c := cond(u, metav1.ConditionFalse, "Readmitted", fmt.Sprintf("%d identities readmitted on this node", len(ids)))
	if len(errs) > 0 {
		c.Reason, c.Message = "ReadmitFailed", errors.Join(errs...).Error()
	}
	f.report(u, NodeStatus{ObservedGeneration: u.GetGeneration(), Conditions: []metav1.Condition{c}})
}

// readmitWithdrawn readmits what AgentKills that no longer exist killed here (the kill path's
// deny list says which AgentKill asked; its deletion was missed while tetherd was down).
func (f *Fleet) readmitWithdrawn() {
	names := map[string]bool{}
	for _, d := range f.killer.DeniedIDs() {
		if name, ok := strings.CutPrefix(d.Requester, requester("")); ok {
			names[name] = true
		}
	}
	for name := range names {
		if _, exists, err := f.informer.GetStore().GetByKey(name); err == nil && !exists {
			f.readmit(name, nil)
		}
	}
}

// requester is how the kill path records a kill an AgentKill asked for.
func requester(name string) string { return "AgentKill " + name }

// report writes this node's status of an AgentKill (a merge patch of status.nodes.<node>, so
// nodes do not overwrite each other).
func (f *Fleet) report(u *unstructured.Unstructured, st NodeStatus) {
	patch, err := json.Marshal(map[string]any{"status": map[string]any{"nodes": map[string]any{f.node: st}}})
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := f.client.Resource(Resource).Patch(ctx, u.GetName(), types.MergePatchType, patch, metav1.PatchOptions{}, "status"); err != nil {
		f.log.Warn("writing an AgentKill's status", "agentkill", u.GetName(), "error", err)
	}
}

// observed is the generation node last reported for u.
func observed(u *unstructured.Unstructured, node string) int64 {
	g, _, _ := unstructured.NestedInt64(u.Object, "status", "nodes", node, "observedGeneration")
	return g
}

func cond(u *unstructured.Unstructured, status metav1.ConditionStatus, reason, msg string) metav1.Condition {
	return metav1.Condition{Type: Killed, Status: status, Reason: reason, Message: msg, ObservedGeneration: u.GetGeneration(),
		LastTransitionTime: metav1.Now()}
}
