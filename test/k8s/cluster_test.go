package k8s

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/dnstest"
)

// A single-node cluster from real parts, what kind gives without Docker: etcd, kube-apiserver,
// kube-controller-manager, kube-scheduler and the kubelet (tools/k8s), containerd and runc and the
// CNI bridge plugin (Debian packages), each with its own data directory, certificates and ports.
// The node's own resources are the test's:
//   - cgroups: the kubelet's cgroup root is a tether-test-k8s-* cgroup below this test's cgroup
//     in every hierarchy (cgroup v1 controllers and cgroup2); pods land in
//     <root>/kubepods/<qos>/pod<uid>/<container> in each, so also in the cgroup2 tree tetherd
//     enforces on;
//   - network: a bridge with 198.18.0.1/16 (a benchmarking range, never a private one) for the
//     pods, the API server and the test hosts (a network namespace with 198.18.2.1 and
//     198.18.2.2); the service range is 198.19.0.0/16; no kube-proxy, so tetherd is given the
//     API server's address (the chart's kubernetesServiceHost, as for other eBPF agents);
//   - sysctls: the kubelet with protectKernelDefaults changes none, but refuses to start unless
//     vm.overcommit_memory=1, kernel.panic=10 and kernel.panic_on_oops=1; the test sets those and
//     puts the machine's values back at the end.
//
// Everything is stopped and removed when the test ends.

const (
	nodeName    = "tether-node"
	bridgeAddr  = "198.18.0.1"
	grantedHost = "198.18.2.1"
	deniedHost  = "198.18.2.2"
	namedHost   = "198.18.2.3" // what svc.k8s.test resolves to (the DNS proxy's part)
	hostPort    = 8080
	serviceCIDR = "198.19.0.0/16"
	serviceIP   = "198.19.0.1"
	podRange    = "198.18.1.0-198.18.1.250"
)

// kubeletSysctls are the kernel settings the kubelet insists on (protectKernelDefaults).
var kubeletSysctls = map[string]string{"vm/overcommit_memory": "1", "kernel/panic": "10", "kernel/panic_on_oops": "1"}

// cluster is a running single-node cluster.
type cluster struct {
	t          *testing.T
	dir, bin   string
	kubeconfig string
	server     string // https://198.18.0.1:port
	apiPort    int
	cgroupRoot string // the kubelet's, relative to each hierarchy's root
	cgroup2    string // the cgroup2 mount
	bridge     string
	hostsNetns string
	sock       string // containerd's
	podagent   string // test/k8s/cmd/podagent, built for this machine
	dns        *dnstest.Server
}

// requireNodeParts fails (TETHER_REQUIRE_K8S=1) or skips when a part of the node is missing.
func requireNodeParts(t *testing.T) string {
	t.Helper()
	missing := func(why string) {
		if os.Getenv(RequireK8sEnv) == "1" || os.Getenv("TETHER_REQUIRE_PRIVILEGED") == "1" {
			t.Fatalf("the node cannot run here: %s", why)
		}
		t.Skipf("the node cannot run here: %s", why)
	}
	if os.Geteuid() != 0 {
		missing("needs root (cgroups, network namespaces, containerd, BPF)")
	}
	bin := os.Getenv(K8sBinEnv)
	if bin == "" {
		missing(K8sBinEnv + " is not set (make test-k8s builds the Kubernetes binaries and sets it)")
	}
	for _, name := range []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl"} {
		if _, err := os.Stat(filepath.Join(bin, name)); err != nil {
			missing(fmt.Sprintf("%s: %v (make k8s-bin)", name, err))
		}
	}
	for _, tool := range []string{"containerd", "containerd-shim-runc-v2", "runc", "ctr", "ip"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing(tool + " not found (apt-get install containerd runc iproute2)")
		}
	}
	for _, plugin := range []string{"bridge", "host-local", "loopback"} {
		if _, err := os.Stat(filepath.Join(cniBinDir, plugin)); err != nil {
			missing(fmt.Sprintf("CNI plugin %s: %v (apt-get install containernetworking-plugins)", plugin, err))
		}
	}
	return bin
}

const cniBinDir = "/usr/lib/cni"

// startCluster starts the node and returns it Ready, with the images imported.
func startCluster(t *testing.T, bin string, images []string) *cluster {
	t.Helper()
	c := &cluster{t: t, dir: t.TempDir(), bin: bin}
	// Last of all (cleanups run in reverse): what the kubelet and containerd mounted below the
	// test's directory (volumes, container root file systems).
	t.Cleanup(func() { unmountBelow(t, c.dir) })
	suffix := strings.ToLower(rand.Text()[:6])
	c.setSysctls()
	c.makeCgroupRoot("tether-test-k8s-" + suffix)
	c.makeNetwork(suffix)
	pki := c.makePKI()
	c.startControlPlane(pki)
	c.startContainerd(images)
	c.startKubelet(pki)
	if out, err := c.kubectl("wait", "--for=condition=Ready", "node/"+nodeName, "--timeout=120s"); err != nil {
		t.Fatalf("the node is not Ready: %v\n%s", err, out)
	}
	// Before anything is stopped: what the cluster says of its pods, when the test failed.
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := c.kubectl("get", "events", "-A", "--sort-by=.lastTimestamp")
			t.Logf("events:\n%s", tail(out, 6000))
			out, _ = c.kubectl("get", "pods", "-A", "-o", "wide")
			t.Logf("pods:\n%s", out)
			out, _ = c.kubectl("-n", Namespace, "logs", "ds/tether")
			var logs []string // tetherd's log without its decision records
			for _, line := range strings.Split(out, "\n") {
				if !strings.HasPrefix(line, `{"decision_id"`) {
					logs = append(logs, line)
				}
			}
			t.Logf("tetherd's log (records left out):\n%s", tail(strings.Join(logs, "\n"), 12000))
		}
	})
	return c
}

func (c *cluster) kubectl(args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(c.bin, "kubectl"), append([]string{"--kubeconfig", c.kubeconfig}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// mustKubectl runs kubectl and fails the test if it fails.
func (c *cluster) mustKubectl(args ...string) string {
	c.t.Helper()
	out, err := c.kubectl(args...)
	if err != nil {
		c.t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (c *cluster) setSysctls() {
	t := c.t
	for key, want := range kubeletSysctls {
		p := filepath.Join("/proc/sys", key)
		old, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if strings.TrimSpace(string(old)) == want {
			continue
		}
		if err := os.WriteFile(p, []byte(want), 0o644); err != nil {
			t.Fatalf("the kubelet needs %s=%s: %v", key, want, err)
		}
		t.Cleanup(func() {
			if err := os.WriteFile(p, old, 0o644); err != nil {
				t.Errorf("putting %s back to %s: %v", key, old, err)
			}
		})
	}
}

// hierarchy is a mounted cgroup hierarchy and this process's cgroup in it.
type hierarchy struct {
	mount, self string
}

// cgroupHierarchies lists the mounted cgroup hierarchies (v1 controllers and cgroup2) from
// /proc/self/mountinfo, each with this process's cgroup from /proc/self/cgroup.
func cgroupHierarchies() ([]hierarchy, string, error) {
	own := map[string]string{} // controllers ("" for cgroup2) -> path
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return nil, "", err
	}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) == 3 {
			own[f[1]] = f[2]
		}
	}
	mi, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, "", err
	}
	defer mi.Close()
	var hs []hierarchy
	var cgroup2 string
	seen := map[string]bool{}
	sc := bufio.NewScanner(mi)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		sep := slices.Index(fields, "-")
		if sep < 0 || sep+3 >= len(fields) {
			continue
		}
		fstype, mount, opts := fields[sep+1], fields[4], fields[sep+3]
		var key string
		switch fstype {
		case "cgroup2":
			cgroup2 = mount
		case "cgroup":
			var ctrls []string
			for _, o := range strings.Split(opts, ",") {
				if o != "rw" && o != "ro" && !strings.HasPrefix(o, "release_agent") && o != "clone_children" && o != "xattr" && o != "nsdelegate" {
					ctrls = append(ctrls, o)
				}
			}
			key = strings.Join(ctrls, ",")
		default:
			continue
		}
		if seen[key] {
			continue
		}
		self, ok := own[key]
		if !ok {
			return nil, "", fmt.Errorf("the cgroup hierarchy at %s (%s) is not in /proc/self/cgroup", mount, key)
		}
		seen[key] = true
		hs = append(hs, hierarchy{mount: mount, self: self})
	}
	if cgroup2 == "" {
		return nil, "", fmt.Errorf("no cgroup2 mount in /proc/self/mountinfo")
	}
	return hs, cgroup2, sc.Err()
}

// makeCgroupRoot makes the kubelet's cgroup root: name below this test's cgroup, the same path
// in every hierarchy (the kubelet's cgroupfs driver uses one path for all). That is only below
// the test's own cgroup in each if one of the test's cgroups is below all the others (as here:
// / everywhere but memory); otherwise the test says so and stops.
func (c *cluster) makeCgroupRoot(name string) {
	t := c.t
	hs, cgroup2, err := cgroupHierarchies()
	if err != nil {
		t.Fatal(err)
	}
	c.cgroup2 = cgroup2
	base := "/"
	for _, h := range hs {
		if len(h.self) > len(base) {
			base = h.self
		}
	}
	for _, h := range hs {
		if h.self != "/" && h.self != base && !strings.HasPrefix(base, h.self+"/") {
			t.Fatalf("this test's cgroups are not on one line (%s in %s, %s elsewhere): the kubelet's one cgroup root cannot be below all of them", h.self, h.mount, base)
		}
	}
	c.cgroupRoot = filepath.Join(base, name)
	for _, h := range hs {
		// Directories made here (base in hierarchies where the test is higher up included) are
		// removed at the end, deepest first, once the kubelet's pods are gone.
		var made []string
		for d := c.cgroupRoot; d != "/"; d = filepath.Dir(d) {
			if _, err := os.Stat(filepath.Join(h.mount, d)); err == nil {
				break
			}
			made = append(made, filepath.Join(h.mount, d))
		}
		if err := os.MkdirAll(filepath.Join(h.mount, c.cgroupRoot), 0o755); err != nil {
			t.Fatalf("cgroup root in %s: %v", h.mount, err)
		}
		t.Cleanup(func() {
			removeCgroupTree(t, filepath.Join(h.mount, c.cgroupRoot))
			for _, d := range made[1:] {
				os.Remove(d)
			}
		})
	}
	// tetherd attaches at <root>/kubepods in cgroup2 (the chart's agentParent; tetherd does not
	// make it).
	if err := os.MkdirAll(filepath.Join(cgroup2, c.cgroupRoot, "kubepods"), 0o755); err != nil {
		t.Fatal(err)
	}
}

// removeCgroupTree kills what is left in a cgroup tree the test made and removes it, deepest
// first.
func removeCgroupTree(t *testing.T, dir string) {
	var dirs []string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	for i := len(dirs) - 1; i >= 0; i-- {
		d := dirs[i]
		// cgroup2: cgroup.kill; a v1 freezer cgroup left frozen is thawed first.
		os.WriteFile(filepath.Join(d, "cgroup.freeze"), []byte("0"), 0)
		os.WriteFile(filepath.Join(d, "freezer.state"), []byte("THAWED"), 0)
		os.WriteFile(filepath.Join(d, "cgroup.kill"), []byte("1"), 0)
		var err error
		for range 50 {
			if err = os.Remove(d); err == nil || os.IsNotExist(err) {
				break
			}
			if procs, _ := os.ReadFile(filepath.Join(d, "cgroup.procs")); len(procs) > 0 {
				for _, pid := range strings.Fields(string(procs)) {
					exec.Command("kill", "-9", pid).Run()
				}
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil && !os.IsNotExist(err) {
			t.Errorf("removing the test's cgroup %s: %v", d, err)
		}
	}
}

// makeNetwork makes the pods' bridge and the test hosts' network namespace.
func (c *cluster) makeNetwork(suffix string) {
	t := c.t
	c.bridge = "tk8s" + suffix
	c.hostsNetns = "tether-test-k8s-" + suffix
	hostVeth, nsVeth := "tk8sh"+suffix, "tk8sn"+suffix
	run := func(args ...string) {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	// The bridge's address must be nobody else's: another node test running, or one that was
	// killed before its cleanup, would take the pods' and test hosts' traffic.
	if out, _ := exec.Command("ip", "-br", "-4", "addr", "show", "to", bridgeAddr+"/32").Output(); len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("%s is already on this machine (another make test-k8s, or one killed before its cleanup: remove it with ip link del):\n%s", bridgeAddr, out)
	}
	run("link", "add", c.bridge, "type", "bridge")
	t.Cleanup(func() { exec.Command("ip", "link", "del", c.bridge).Run() })
	// The pods' network namespaces (cni-*) outlive containerd, which is stopped before the CNI
	// plugin tears them down: those that appeared during the test go when it ends.
	before := cniNetns()
	t.Cleanup(func() {
		for n := range cniNetns() {
			if !before[n] {
				exec.Command("ip", "netns", "del", n).Run()
			}
		}
	})
	run("addr", "add", bridgeAddr+"/16", "dev", c.bridge)
	run("link", "set", c.bridge, "up")
	run("netns", "add", c.hostsNetns)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", c.hostsNetns).Run() })
	run("link", "add", hostVeth, "type", "veth", "peer", "name", nsVeth, "netns", c.hostsNetns)
	run("link", "set", hostVeth, "master", c.bridge, "up")
	run("-n", c.hostsNetns, "addr", "add", grantedHost+"/16", "dev", nsVeth)
	run("-n", c.hostsNetns, "addr", "add", deniedHost+"/16", "dev", nsVeth)
	run("-n", c.hostsNetns, "addr", "add", namedHost+"/16", "dev", nsVeth)
	run("-n", c.hostsNetns, "link", "set", nsVeth, "up")
	run("-n", c.hostsNetns, "link", "set", "lo", "up")
}

// startHosts serves on the granted, the denied and the named test host (podagent serve in their
// network namespace).
func (c *cluster) startHosts(podagent string) {
	addrs := []string{fmt.Sprintf("%s:%d", grantedHost, hostPort), fmt.Sprintf("%s:%d", deniedHost, hostPort), fmt.Sprintf("%s:%d", namedHost, hostPort)}
	ip, _ := exec.LookPath("ip")
	startLogged(c.t, filepath.Dir(ip), c.dir, "ip", append([]string{"netns", "exec", c.hostsNetns, podagent, "serve"}, addrs...)...)
	for _, a := range addrs {
		waitFor(c.t, 10*time.Second, "test host "+a, func() error {
			out, err := exec.Command("ip", "netns", "exec", c.hostsNetns, podagent, "connect", a).CombinedOutput()
			if err != nil {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		})
	}
}

// pki is the cluster's CA and the files made with it.
type pki struct {
	caFile, caKeyFile, saKey, certFile, keyFile, tokens string
	caPEM                                               []byte
	token                                               map[string]string // user -> bearer token
}

func (c *cluster) makePKI() *pki {
	t := c.t
	p := &pki{token: map[string]string{}}
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "tether-test-k8s CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	p.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "kube-apiserver"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:    []string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "localhost"},
		IPAddresses: []net.IP{net.ParseIP(bridgeAddr), net.ParseIP(serviceIP), net.ParseIP("127.0.0.1")}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name string, b []byte) string {
		path := filepath.Join(c.dir, "pki", name)
		os.MkdirAll(filepath.Dir(path), 0o700)
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	ecPEM := func(k *ecdsa.PrivateKey) []byte {
		b, _ := x509.MarshalECPrivateKey(k)
		return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: b})
	}
	p.caFile = write("ca.crt", p.caPEM)
	p.caKeyFile = write("ca.key", ecPEM(caKey))
	p.certFile = write("apiserver.crt", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	p.keyFile = write("apiserver.key", ecPEM(key))
	saKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p.saKey = write("sa.key", ecPEM(saKey))
	// Static tokens: an administrator, the kubelet as a node (the Node authorizer), and the
	// controller manager and scheduler with their built-in roles.
	var csv strings.Builder
	for _, u := range []struct{ user, groups string }{
		{"admin", "system:masters"},
		{"system:node:" + nodeName, "system:nodes"},
		{"system:kube-controller-manager", ""},
		{"system:kube-scheduler", ""},
	} {
		tok := rand.Text()
		p.token[u.user] = tok
		fmt.Fprintf(&csv, "%s,%s,%s,%q\n", tok, u.user, u.user, u.groups)
	}
	p.tokens = write("tokens.csv", []byte(csv.String()))
	return p
}

// kubeconfigFor writes a kubeconfig for user and returns its path.
func (c *cluster) kubeconfigFor(p *pki, user string) string {
	kc := map[string]any{
		"apiVersion": "v1", "kind": "Config", "current-context": "test",
		"clusters": []any{map[string]any{"name": "test", "cluster": map[string]any{"server": c.server, "certificate-authority": p.caFile}}},
		"users":    []any{map[string]any{"name": user, "user": map[string]any{"token": p.token[user]}}},
		"contexts": []any{map[string]any{"name": "test", "context": map[string]any{"cluster": "test", "user": user}}},
	}
	b, _ := json.Marshal(kc)
	path := filepath.Join(c.dir, "kubeconfig-"+strings.ReplaceAll(user, ":", "-"))
	if err := os.WriteFile(path, b, 0o600); err != nil {
		c.t.Fatal(err)
	}
	return path
}

func (c *cluster) startControlPlane(p *pki) {
	t := c.t
	etcdClient, etcdPeer := freePort(t), freePort(t)
	c.apiPort = freePort(t)
	c.server = fmt.Sprintf("https://%s:%d", bridgeAddr, c.apiPort)
	start := func(name string, args ...string) <-chan struct{} { return startLogged(t, c.bin, c.dir, name, args...) }
	client := fmt.Sprintf("http://127.0.0.1:%d", etcdClient)
	peer := fmt.Sprintf("http://127.0.0.1:%d", etcdPeer)
	start("etcd", "--data-dir", filepath.Join(c.dir, "etcd"), "--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", "default="+peer, "--log-level", "warn")
	apiExited := start("kube-apiserver", "--etcd-servers", client, "--bind-address", bridgeAddr, "--advertise-address", bridgeAddr,
		"--secure-port", fmt.Sprint(c.apiPort), "--tls-cert-file", p.certFile, "--tls-private-key-file", p.keyFile,
		"--client-ca-file", p.caFile, "--token-auth-file", p.tokens,
		"--authorization-mode", "Node,RBAC", "--allow-privileged=true", "--service-cluster-ip-range", serviceCIDR,
		"--service-account-issuer", "https://kubernetes.default.svc", "--service-account-key-file", p.saKey,
		"--service-account-signing-key-file", p.saKey, "--enable-priority-and-fairness=false",
		// The kubelet's serving certificate is its own self-signed one.
		"--kubelet-preferred-address-types", "InternalIP")
	waitReady(t, c.server, p.token["admin"], apiExited)
	c.kubeconfig = c.kubeconfigFor(p, "admin")
	start("kube-controller-manager", "--kubeconfig", c.kubeconfigFor(p, "system:kube-controller-manager"),
		"--authentication-kubeconfig", c.kubeconfigFor(p, "system:kube-controller-manager"),
		"--authorization-kubeconfig", c.kubeconfigFor(p, "system:kube-controller-manager"),
		"--root-ca-file", p.caFile, "--service-account-private-key-file", p.saKey, "--use-service-account-credentials",
		"--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", fmt.Sprint(freePort(t)),
		"--service-cluster-ip-range", serviceCIDR, "--controllers", "*,-node-ipam-controller")
	start("kube-scheduler", "--kubeconfig", c.kubeconfigFor(p, "system:kube-scheduler"),
		"--authentication-kubeconfig", c.kubeconfigFor(p, "system:kube-scheduler"),
		"--authorization-kubeconfig", c.kubeconfigFor(p, "system:kube-scheduler"),
		"--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", fmt.Sprint(freePort(t)))
}

func (c *cluster) startContainerd(images []string) {
	t := c.t
	dir := filepath.Join(c.dir, "containerd")
	c.sock = filepath.Join(dir, "containerd.sock")
	cniConf := filepath.Join(c.dir, "cni")
	os.MkdirAll(cniConf, 0o755)
	conflist := fmt.Sprintf(`{"cniVersion": "0.4.0", "name": "tether-test", "plugins": [{"type": "bridge", "bridge": %q,
  "isGateway": false, "ipMasq": false, "hairpinMode": true,
  "ipam": {"type": "host-local", "dataDir": %q, "ranges": [[{"subnet": "198.18.0.0/16", "rangeStart": %q, "rangeEnd": %q}]]}}]}`,
		c.bridge, filepath.Join(c.dir, "cni-ipam"), strings.Split(podRange, "-")[0], strings.Split(podRange, "-")[1])
	os.WriteFile(filepath.Join(cniConf, "10-tether-test.conflist"), []byte(conflist), 0o644)
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = %q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), c.sock, pauseImage, cniBinDir, cniConf)
	os.MkdirAll(dir, 0o755)
	cfgFile := filepath.Join(dir, "config.toml")
	os.WriteFile(cfgFile, []byte(cfg), 0o644)
	// The shims outlive a killed containerd: after it stops, those of this containerd are ended.
	t.Cleanup(func() { killShims(c.sock) })
	ctrBin, _ := exec.LookPath("containerd")
	exited := startLogged(t, filepath.Dir(ctrBin), c.dir, "containerd", "--config", cfgFile)
	waitFor(t, 30*time.Second, "containerd's socket", func() error {
		select {
		case <-exited:
			t.Fatal("containerd exited")
		default:
		}
		return exec.Command("ctr", "--address", c.sock, "version").Run()
	})
	// Containers are removed with the kubelet's pods; what is left (a failed test) goes here.
	t.Cleanup(func() {
		out, _ := exec.Command("ctr", "--address", c.sock, "-n", "k8s.io", "tasks", "ls", "-q").Output()
		for _, id := range strings.Fields(string(out)) {
			exec.Command("ctr", "--address", c.sock, "-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", id).Run()
		}
	})
	for _, img := range images {
		if out, err := exec.Command("ctr", "--address", c.sock, "-n", "k8s.io", "images", "import", img).CombinedOutput(); err != nil {
			t.Fatalf("ctr images import %s: %v\n%s", img, err, out)
		}
	}
}

func (c *cluster) startKubelet(p *pki) {
	t := c.t
	root := filepath.Join(c.dir, "kubelet")
	os.MkdirAll(root, 0o755)
	cfg := map[string]any{
		"apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
		"cgroupDriver": "cgroupfs", "cgroupRoot": c.cgroupRoot, "cgroupsPerQOS": true,
		// Nothing outside the kubelet's own subtree: no system or kubelet cgroups, node
		// allocatable enforced on the pods' cgroup only, no iptables chains, no sysctls.
		"enforceNodeAllocatable": []string{"pods"}, "makeIPTablesUtilChains": false, "protectKernelDefaults": true,
		"failCgroupV1": false, "failSwapOn": false,
		"containerRuntimeEndpoint": "unix://" + c.sock,
		"address":                  bridgeAddr, "port": freePort(t), "readOnlyPort": 0,
		"healthzBindAddress": "127.0.0.1", "healthzPort": freePort(t),
		"podLogsDir":                  filepath.Join(c.dir, "pod-logs"),
		"authentication":              map[string]any{"anonymous": map[string]any{"enabled": true}, "webhook": map[string]any{"enabled": false}},
		"authorization":               map[string]any{"mode": "AlwaysAllow"},
		"evictionHard":                map[string]string{"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
		"imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
		"resolvConf": "/etc/resolv.conf", "clusterDomain": "cluster.local",
		"syncFrequency": "5s", "fileCheckFrequency": "5s",
	}
	b, _ := json.Marshal(cfg)
	cfgFile := filepath.Join(c.dir, "kubelet-config.json")
	os.WriteFile(cfgFile, b, 0o644)
	exited := startLogged(t, c.bin, c.dir, "kubelet", "--config", cfgFile, "--kubeconfig", c.kubeconfigFor(p, "system:node:"+nodeName),
		"--root-dir", root, "--cert-dir", filepath.Join(c.dir, "kubelet-pki"), "--hostname-override", nodeName, "--node-ip", bridgeAddr)
	waitFor(t, 90*time.Second, "the node to register", func() error {
		select {
		case <-exited:
			t.Fatal("the kubelet exited")
		default:
		}
		_, err := c.kubectl("get", "node", nodeName)
		return err
	})
}

// killShims ends the runc shims started by the containerd listening on sock (their command
// line names its address).
func killShims(sock string) {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !strings.Contains(string(b), "containerd-shim") || !strings.Contains(string(b), sock) {
			continue
		}
		var pid int
		if _, err := fmt.Sscanf(filepath.Base(filepath.Dir(p)), "%d", &pid); err == nil {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// unmountBelow unmounts every mount below dir, deepest first.
func unmountBelow(t *testing.T, dir string) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var mounts []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			mounts = append(mounts, f[4])
		}
	}
	slices.SortFunc(mounts, func(a, b string) int { return len(b) - len(a) })
	for _, m := range mounts {
		if err := exec.Command("umount", "-l", m).Run(); err != nil {
			t.Logf("umount %s: %v", m, err)
		}
	}
}

// tail is the end of s, at most n bytes.
func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// waitFor calls check until it returns nil, failing the test with its last error after timeout.
func waitFor(t *testing.T, timeout time.Duration, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("waiting %v for %s: %v", timeout, what, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// cniNetns are the named network namespaces the CNI plugin made (cni-*).
func cniNetns() map[string]bool {
	out := map[string]bool{}
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "cni-") {
			out[e.Name()] = true
		}
	}
	return out
}
