package discovery

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/compile"
	"github.com/tether-sh/tether/pkg/config"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/dataplane/dataplanetest"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/grants"
)

type noGrants struct{}

func (noGrants) Grants(context.Context, agents.Context) (grants.Grants, error) {
	return grants.Grants{}, nil
}

// TestPrivilegedKubernetesDiscovery: real cgroups laid out as the kubelet does (cgroupfs
// driver), the pod watch on client-go's fake clientset (a kube-apiserver cannot be built here).
// A process in a container cgroup makes the pod cgroup an agent with the service account's
// SPIFFE ID and the pod's labels (not tether.dev/ ones); a second container joins the same
// agent; records name the pod and container; after a restart (a new discovery, the registry
// keeping the agent as adopting the pins does) a deleted pod loses its identity and the removed
// pod cgroup ends the agent. A pod that
// identity.kubernetes.pod_selector does not select, and tetherd's own pod, never become agents.
func TestPrivilegedKubernetesDiscovery(t *testing.T) {
	privtest.Gate(t)
	root := privtest.Cgroup(t)
	const uid, otherUID, selfUID = "6c1e2d3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f", "7d2f3e4a-5b6c-4d7e-8f9a-1b2c3d4e5f60", "8e3a4f5b-6c7d-4e8f-9a0b-2c3d4e5f6071"
	pod := filepath.Join(root, "kubepods", "burstable", "pod"+uid)
	other := filepath.Join(root, "kubepods", "burstable", "pod"+otherUID, "ctr")
	self := filepath.Join(root, "kubepods", "burstable", "pod"+selfUID, "ctr")
	ctr1, ctr2 := filepath.Join(pod, "ctr1"), filepath.Join(pod, "ctr2")
	makePodCgroups(t, pod, ctr1, ctr2, other, self)

	log := slog.New(slog.DiscardHandler)
	reg := agents.New(agents.Options{Dataplane: dataplanetest.New(), Evaluator: noGrants{}, Compile: agents.CompileOn(compile.Options{Files: compile.OS{}}),
		Parents: []string{root}, LaunchParent: root, Logger: log})
	defer reg.Close()
	recs := make(chan events.Decision, 4)
	client := fakePods(uid, otherUID, selfUID)
	privtest.Start(t, other, "sleep", "60")
	privtest.Start(t, self, "sleep", "60")
	d, stop := runDiscovery(t, reg, client, selfUID, root, recs)

	agentOf := func() (agents.Agent, bool) {
		for _, a := range reg.List() {
			if a.Cgroup == pod {
				return a, true
			}
		}
		return agents.Agent{}, false
	}
	wait := func(what string, cond func() bool) { t.Helper(); waitCond(t, what, cond) }

	p1 := privtest.Start(t, ctr1, "sleep", "60")
	wait("the pod's agent", func() bool { _, ok := agentOf(); return ok })
	a, _ := agentOf()
	if a.SpiffeID != "spiffe://cluster.local/ns/agents/sa/coder" || a.Labels["team"] != "web" || a.Labels["tether.dev/mode"] != "" ||
		!strings.Contains(strings.Join(a.Selectors, " "), "k8s:pod-uid:"+uid) {
		t.Fatalf("pod agent %+v", a)
	}
	p2 := privtest.Start(t, ctr2, "sleep", "60")
	time.Sleep(200 * time.Millisecond)
	if n := len(reg.List()); n != 1 {
		t.Errorf("%d agents after a second container started, want 1 (the selected pod; not the unselected one nor tetherd's own): %+v", n, reg.List())
	}

	checkPodRefs(t, d, a.Slot, ctr1, ctr2)

	// tetherd restarts: the registry keeps the agent (as adopting the pins does), a new
	// discovery takes over, and must follow the pod from then on.
	stop()
	d, _ = runDiscovery(t, reg, client, selfUID, root, recs)
	time.Sleep(200 * time.Millisecond) // the new discovery's first scan

	if err := client.CoreV1().Pods("agents").Delete(context.Background(), "coder-0", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("the deleted pod's identity revoked", func() bool { a, _ := agentOf(); return a.Revoked })
	select {
	case rec := <-recs:
		if rec.Kind != "identity" || !strings.Contains(string(rec.Reason), "pod deleted") {
			t.Errorf("record %+v", rec)
		}
	case <-time.After(time.Second):
		t.Error("no identity record for the deleted pod")
	}

	for _, p := range []*exec.Cmd{p1, p2} {
		p.Process.Kill()
		p.Wait()
	}
	for _, p := range []string{ctr1, ctr2, pod} {
		if err := cgroups.Remove(p, 5*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	wait("the agent of the removed pod cgroup unregistered", func() bool { _, ok := agentOf(); return !ok })
}

// checkPodRefs checks that records name the pod, and the container whose cgroup the process is
// in: ctr1 the pod's status lists, ctr2 it does not.
func checkPodRefs(t *testing.T, d *Discovery, slot dataplane.Slot, ctr1, ctr2 string) {
	t.Helper()
	ref := func(cg string) *events.PodRef {
		var st unix.Stat_t
		if err := unix.Stat(cg, &st); err != nil {
			t.Fatal(err)
		}
		rec := events.Decision{Slot: &slot, CgroupID: st.Ino}
		d.Annotate(&rec)
		return rec.Kubernetes
	}
	if got, want := ref(ctr1), (events.PodRef{Node: "node-1", Namespace: "agents", Pod: "coder-0", Container: "main"}); got == nil || *got != want {
		t.Errorf("a record from the first container names %+v, want %+v", got, want)
	}
	if got := ref(ctr2); got == nil || got.Pod != "coder-0" || got.Container != "" {
		t.Errorf("a record from a container the pod's status does not list names %+v, want the pod and no container", got)
	}
}

// runDiscovery runs a discovery of the pods of node-1 (those labelled tether.dev/agent=true,
// selfUID tetherd's own) below root until stop or the end of the test.
func runDiscovery(t *testing.T, reg Registrar, client *fake.Clientset, selfUID types.UID, root string, recs chan events.Decision) (*Discovery, func()) {
	t.Helper()
	d, err := New(config.Identity{TrustDomains: []string{"cluster.local"}}, privtest.Cgroup2(t), nil, reg, func(e events.Decision) { recs <- e }, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	selector, _ := labels.Parse("tether.dev/agent=true")
	if err := d.WatchPods(client, "node-1", "cluster.local", selector, string(selfUID)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx, []string{root}) }()
	var once sync.Once
	stop := func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	return d, stop
}

// makePodCgroups makes the cgroups of the pods: the agent pod's two containers, another pod's
// and tetherd's own pod's container; removed when the test ends.
func makePodCgroups(t *testing.T, pod, ctr1, ctr2, other, self string) {
	t.Helper()
	for _, p := range []string{other, self} {
		if _, err := cgroups.Create(p); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cgroups.Remove(p, 5*time.Second); cgroups.Remove(filepath.Dir(p), 5*time.Second) })
	}
	for _, p := range []string{ctr1, ctr2} {
		if _, err := cgroups.Create(p); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, p := range []string{ctr1, ctr2, pod, filepath.Dir(pod), filepath.Dir(filepath.Dir(pod))} {
			cgroups.Remove(p, 5*time.Second)
		}
	})
}

// fakePods is a clientset with three pods on node-1: the agent pod (selected), another pod of
// the same service account (not selected), and tetherd's own (selected, but tetherd's).
func fakePods(uid, otherUID, selfUID types.UID) *fake.Clientset {
	return fake.NewClientset(&corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "coder-0", Namespace: "agents", UID: uid,
			Labels: map[string]string{"team": "web", "tether.dev/mode": "audit", "tether.dev/agent": "true"}},
		Spec:   corev1.PodSpec{NodeName: "node-1", ServiceAccountName: "coder"},
		Status: corev1.PodStatus{ContainerStatuses: []corev1.ContainerStatus{{Name: "main", ContainerID: "containerd://ctr1"}}},
	}, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web-0", Namespace: "agents", UID: otherUID, Labels: map[string]string{"team": "web"}},
		Spec:       corev1.PodSpec{NodeName: "node-1", ServiceAccountName: "coder"},
	}, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "tether-x", Namespace: "tether-system", UID: selfUID, Labels: map[string]string{"tether.dev/agent": "true"}},
		Spec:       corev1.PodSpec{NodeName: "node-1", ServiceAccountName: "tether"},
	})
}

// waitCond waits up to 5 s for cond.
func waitCond(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

// TestUIDOf: a process's real uid, read through procfs; a process that is gone has none.
func TestUIDOf(t *testing.T) {
	if uid, ok := uidOf(os.Getpid()); !ok || uid != uint32(os.Getuid()) {
		t.Errorf("this process: uid %d %v, want %d", uid, ok, os.Getuid())
	}
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	if uid, ok := uidOf(cmd.Process.Pid); ok {
		t.Errorf("process %d has ended, but its uid is %d", cmd.Process.Pid, uid)
	}
}
