package identity

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
)

func TestPodCgroup(t *testing.T) {
	tests := []struct{ in, uid, pod string }{
		{"/kubepods/burstable/pod1f5b8c3a-2d4e-4f6a-8b9c-0d1e2f3a4b5c/3e1f0c", "1f5b8c3a-2d4e-4f6a-8b9c-0d1e2f3a4b5c", "/kubepods/burstable/pod1f5b8c3a-2d4e-4f6a-8b9c-0d1e2f3a4b5c"},
		{"/kubepods/pod1f5b8c3a-2d4e-4f6a-8b9c-0d1e2f3a4b5c", "1f5b8c3a-2d4e-4f6a-8b9c-0d1e2f3a4b5c", "/kubepods/pod1f5b8c3a-2d4e-4f6a-8b9c-0d1e2f3a4b5c"},
		{"/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1f5b8c3a_2d4e_4f6a_8b9c_0d1e2f3a4b5c.slice/cri-containerd-ab.scope",
			"1f5b8c3a-2d4e-4f6a-8b9c-0d1e2f3a4b5c", "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1f5b8c3a_2d4e_4f6a_8b9c_0d1e2f3a4b5c.slice"},
		{"/kubepods.slice/kubepods-pod1f5b8c3a_2d4e_4f6a_8b9c_0d1e2f3a4b5c.slice", "1f5b8c3a-2d4e-4f6a-8b9c-0d1e2f3a4b5c", "/kubepods.slice/kubepods-pod1f5b8c3a_2d4e_4f6a_8b9c_0d1e2f3a4b5c.slice"},
		{"/kubepods/burstable", "", ""},
		{"/system.slice/podman.service", "", ""},
		{"/kubepods/podXYZ/abc", "", ""},
	}
	for _, tt := range tests {
		uid, pod, ok := PodCgroup(tt.in)
		if ok != (tt.uid != "") || uid != tt.uid || pod != tt.pod {
			t.Errorf("PodCgroup(%q) = %q %q %v, want %q %q", tt.in, uid, pod, ok, tt.uid, tt.pod)
		}
	}
}

func pod(name, ns, node, sa, uid string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, UID: types.UID(uid)},
		Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: sa}}
}

// TestKubernetesPods runs the informer against client-go's fake clientset (no kube-apiserver can
// be built here): pods of this node resolve to their service account's SPIFFE ID, a pod that
// appears later is waited for, another node's pods are not taken, deletions are reported.
func TestKubernetesPods(t *testing.T) {
	const uidA, uidB, uidOther = "00000000-0000-0000-0000-00000000000a", "00000000-0000-0000-0000-00000000000b", "00000000-0000-0000-0000-0000000000ff"
	client := fake.NewClientset(pod("a", "agents", "node-1", "coder", uidA), pod("x", "agents", "node-2", "coder", uidOther))
	deleted := make(chan string, 4)
	k, err := NewKubernetes(client, "node-1", "cluster.local", func(uid string) { deleted <- uid })
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := k.Start(ctx); err != nil {
		t.Fatal(err)
	}
	p, err := k.Pod(ctx, uidA)
	if err != nil {
		t.Fatal(err)
	}
	if id, err := k.ID(p); err != nil || id != "spiffe://cluster.local/ns/agents/sa/coder" {
		t.Errorf("ID %q %v", id, err)
	}
	// A pod of another node is not this node's.
	short, stop := context.WithTimeout(ctx, 200*time.Millisecond)
	if _, err := k.Pod(short, uidOther); err == nil {
		t.Error("took another node's pod")
	}
	stop()
	// A pod the watch learns of later.
	got := make(chan *corev1.Pod, 1)
	go func() {
		p, _ := k.Pod(ctx, uidB)
		got <- p
	}()
	time.Sleep(50 * time.Millisecond)
	if _, err := client.CoreV1().Pods("agents").Create(ctx, pod("b", "agents", "node-1", "", uidB), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	select {
	case p := <-got:
		if id, _ := k.ID(p); id != "spiffe://cluster.local/ns/agents/sa/default" {
			t.Errorf("pod without a service account: %q", id)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the new pod was not seen")
	}
	if err := client.CoreV1().Pods("agents").Delete(ctx, "a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	select {
	case uid := <-deleted:
		if uid != uidA {
			t.Errorf("deleted %s, want %s", uid, uidA)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the deletion was not reported")
	}
}

func TestNewKubernetesRefuses(t *testing.T) {
	if _, err := NewKubernetes(fake.NewClientset(), "", "cluster.local", nil); err == nil {
		t.Error("no node name accepted")
	}
	if _, err := NewKubernetes(fake.NewClientset(), "n", "Bad/TD", nil); err == nil {
		t.Error("bad trust domain accepted")
	}
}
