package identity

import (
	"context"
	"errors"
	"fmt"
	"path"
	"regexp"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

// Kubernetes names the pods of one node by their service accounts:
// spiffe://<trust domain>/ns/<namespace>/sa/<service account>. It watches the node's pods
// through the API server (an informer: one list, then a watch), so a pod is known by the time
// its containers run, and a deleted pod is reported.
type Kubernetes struct {
	trustDomain string
	node        string
	factory     informers.SharedInformerFactory
	informer    cache.SharedIndexInformer

	mu      sync.Mutex
	waiters map[string][]chan struct{} // by pod UID: closed when the pod is known
	deleted func(uid string)
}

// KubeConfig is the client configuration from kubeconfig, or the in-cluster configuration when
// it is empty (the DaemonSet's service account).
func KubeConfig(kubeconfig string) (*rest.Config, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig == "" {
		cfg, err = rest.InClusterConfig()
	} else {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return cfg, nil
}

// KubeClient returns a clientset from kubeconfig (see KubeConfig).
func KubeClient(kubeconfig string) (kubernetes.Interface, error) {
	cfg, err := KubeConfig(kubeconfig)
	if err != nil {
		return nil, err
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return cs, nil
}

const podUIDIndex = "uid"

// NewKubernetes watches the pods of node. deleted, if set, is told the UID of each pod that is
// deleted.
func NewKubernetes(client kubernetes.Interface, node, trustDomain string, deleted func(uid string)) (*Kubernetes, error) {
	if _, err := Parse("spiffe://" + trustDomain); err != nil || strings.Contains(trustDomain, "/") {
		return nil, fmt.Errorf("kubernetes trust domain %q: not a trust domain name", trustDomain)
	}
	if node == "" {
		return nil, errors.New("kubernetes: the node name is required (the DaemonSet passes spec.nodeName)")
	}
	k := &Kubernetes{trustDomain: trustDomain, node: node, waiters: map[string][]chan struct{}{}, deleted: deleted}
	k.factory = informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = "spec.nodeName=" + node
	}))
	k.informer = k.factory.Core().V1().Pods().Informer()
	if err := k.informer.AddIndexers(cache.Indexers{podUIDIndex: func(obj any) ([]string, error) {
		if p, ok := obj.(*corev1.Pod); ok {
			return []string{string(p.UID)}, nil
		}
		return nil, nil
	}}); err != nil {
		return nil, err
	}
	_, err := k.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { k.known(obj) },
		UpdateFunc: func(_, obj any) { k.known(obj) },
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if p, ok := obj.(*corev1.Pod); ok && k.deleted != nil {
				k.deleted(string(p.UID))
			}
		},
	})
	return k, err
}

func (k *Kubernetes) known(obj any) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, c := range k.waiters[string(p.UID)] {
		close(c)
	}
	delete(k.waiters, string(p.UID))
}

// Start starts watching and waits until the node's pods are listed, or ctx ends (the API
// server cannot be reached: the error says so; the watch keeps trying).
func (k *Kubernetes) Start(ctx context.Context) error {
	k.factory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), k.informer.HasSynced) {
		return fmt.Errorf("listing the pods of node %s from the Kubernetes API server did not finish", k.node)
	}
	return nil
}

// Synced reports whether the pods were listed.
func (k *Kubernetes) Synced() bool { return k.informer.HasSynced() }

// Cached returns the pod with uid if the watch knows it, without waiting.
func (k *Kubernetes) Cached(uid string) (*corev1.Pod, bool) {
	objs, err := k.informer.GetIndexer().ByIndex(podUIDIndex, uid)
	if err != nil {
		return nil, false
	}
	for _, o := range objs {
		if p, ok := o.(*corev1.Pod); ok && p.Spec.NodeName == k.node {
			return p, true
		}
	}
	return nil, false
}

// Node is the node whose pods are watched.
func (k *Kubernetes) Node() string { return k.node }

// ContainerName names the container of p whose runtime ID is id (the ID in its cgroup's name),
// or returns "" (the pod's sandbox, or a container not in the pod's status yet).
func ContainerName(p *corev1.Pod, id string) string {
	for _, list := range [][]corev1.ContainerStatus{p.Status.ContainerStatuses, p.Status.InitContainerStatuses, p.Status.EphemeralContainerStatuses} {
		for _, cs := range list {
			if _, cid, ok := strings.Cut(cs.ContainerID, "://"); ok && cid == id {
				return cs.Name
			}
		}
	}
	return ""
}

// ContainerID is the runtime's container ID in a container cgroup's name: the name itself with
// the cgroupfs driver, cri-containerd-<id>.scope, crio-<id>.scope or docker-<id>.scope with the
// systemd one.
func ContainerID(cgroupName string) string {
	name := strings.TrimSuffix(cgroupName, ".scope")
	for _, prefix := range []string{"cri-containerd-", "crio-", "docker-"} {
		name = strings.TrimPrefix(name, prefix)
	}
	return name
}

// Pod returns the pod with uid, waiting until the watch knows it or ctx ends.
func (k *Kubernetes) Pod(ctx context.Context, uid string) (*corev1.Pod, error) {
	for {
		k.mu.Lock() // held from the look to the wait's registration: no add is missed between
		if p, ok := k.Cached(uid); ok {
			k.mu.Unlock()
			return p, nil
		}
		c := make(chan struct{})
		k.waiters[uid] = append(k.waiters[uid], c)
		k.mu.Unlock()
		select {
		case <-c:
		case <-time.After(5 * time.Second): // also look again now and then
		case <-ctx.Done():
			return nil, fmt.Errorf("pod %s is not among the pods of node %s: %w", uid, k.node, ctx.Err())
		}
	}
}

// ID is the SPIFFE ID of pod: its service account's.
func (k *Kubernetes) ID(p *corev1.Pod) (string, error) {
	sa := p.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	return Parse("spiffe://" + k.trustDomain + "/ns/" + p.Namespace + "/sa/" + sa)
}

// Selectors say how a pod was attributed.
func Selectors(p *corev1.Pod) []string {
	sa := p.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	return []string{"k8s:ns:" + p.Namespace, "k8s:sa:" + sa, "k8s:pod-name:" + p.Name, "k8s:pod-uid:" + string(p.UID)}
}

var (
	cgroupfsPod = regexp.MustCompile(`^pod([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$`)
	systemdPod  = regexp.MustCompile(`^kubepods(?:-[a-z]+)?-pod([0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12})\.slice$`)
)

// PodCgroup finds the pod cgroup in a cgroup path (a container's, or the pod's own): the pod's
// UID and the pod cgroup's path. Both the cgroupfs layout (.../kubepods/burstable/pod<UID>/...)
// and the systemd one (.../kubepods-burstable-pod<UID with _>.slice/...) are recognized.
func PodCgroup(cgroup string) (uid, podPath string, ok bool) {
	parts := strings.Split(cgroup, "/")
	for i, seg := range parts {
		if m := cgroupfsPod.FindStringSubmatch(seg); m != nil {
			return m[1], path.Clean(strings.Join(parts[:i+1], "/")), true
		}
		if m := systemdPod.FindStringSubmatch(seg); m != nil {
			return strings.ReplaceAll(m[1], "_", "-"), path.Clean(strings.Join(parts[:i+1], "/")), true
		}
	}
	return "", "", false
}
