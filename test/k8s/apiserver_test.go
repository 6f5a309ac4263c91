package k8s

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// K8sBinEnv names the directory with etcd, kube-apiserver and kubectl (make test-k8s builds them
// from tools/k8s); RequireK8sEnv=1 makes the test fail instead of skipping without them.
const (
	K8sBinEnv     = "TETHER_K8S_BIN"
	RequireK8sEnv = "TETHER_REQUIRE_K8S"
)

// ServiceMonitorCRD is the Prometheus operator release whose ServiceMonitor and PrometheusRule
// CRDs the API server learns (the same version as the Go types the chart is decoded with).
const ServiceMonitorCRD = "github.com/prometheus-operator/prometheus-operator@v0.85.0"

// TestAPIServerDryRun: a real etcd and kube-apiserver on loopback; `kubectl apply
// --dry-run=server` of the plain manifests and of the chart rendered in each value set is
// accepted, which runs the server's validation and admission (what strict decoding cannot see).
// A DaemonSet the server must refuse is refused: a privileged container with
// allowPrivilegeEscalation false decodes strictly but is invalid.
func TestAPIServerDryRun(t *testing.T) {
	bin := os.Getenv(K8sBinEnv)
	if bin == "" {
		if os.Getenv(RequireK8sEnv) == "1" {
			t.Fatalf("%s is not set (make test-k8s builds etcd, kube-apiserver and kubectl and sets it); %s=1 forbids skipping", K8sBinEnv, RequireK8sEnv)
		}
		t.Skipf("needs %s: a directory with etcd, kube-apiserver and kubectl (make test-k8s)", K8sBinEnv)
	}
	dir := t.TempDir()
	kubeconfig := startAPIServer(t, bin, dir)
	kubectl := func(args ...string) (string, error) {
		cmd := exec.Command(filepath.Join(bin, "kubectl"), append([]string{"--kubeconfig", kubeconfig}, args...)...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}

	if out, err := kubectl("create", "namespace", Namespace, "--save-config"); err != nil {
		t.Fatalf("kubectl create namespace: %v\n%s", err, out)
	}
	for _, kind := range []string{"servicemonitors", "prometheusrules"} {
		if out, err := kubectl("apply", "--server-side", "-f", operatorCRD(t, kind)); err != nil {
			t.Fatalf("installing the %s CRD: %v\n%s", kind, err, out)
		}
		if out, err := kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/"+kind+".monitoring.coreos.com"); err != nil {
			t.Fatalf("the %s CRD: %v\n%s", kind, err, out)
		}
	}

	for _, name := range []string{"tether.yaml", "servicemonitor.yaml"} {
		path := filepath.Join(Root(), "deploy", "kubernetes", name)
		out, err := kubectl("apply", "--dry-run=server", "-f", path)
		if err != nil {
			t.Errorf("kubectl apply --dry-run=server -f %s: %v\n%s", path, err, out)
			continue
		}
		t.Logf("deploy/kubernetes/%s:\n%s", name, out)
	}
	for name, values := range valueSets {
		m, err := Render(ChartDir(), values)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, name+".yaml")
		if err := os.WriteFile(path, []byte(m), 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := kubectl("apply", "--dry-run=server", "-f", path); err != nil {
			t.Errorf("chart with values %q: kubectl apply --dry-run=server: %v\n%s", name, err, out)
		}
	}

	plain, err := os.ReadFile(filepath.Join(Root(), "deploy", "kubernetes", "tether.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	bad := strings.Replace(string(plain), "privileged: false", "privileged: true", 1)
	if _, err := Decode(bad); err != nil {
		t.Fatalf("the refused DaemonSet should decode strictly (the server is what refuses it): %v", err)
	}
	path := filepath.Join(dir, "bad.yaml")
	os.WriteFile(path, []byte(bad), 0o644)
	out, err := kubectl("apply", "--dry-run=server", "-f", path)
	if err == nil || !strings.Contains(out, "allowPrivilegeEscalation") {
		t.Errorf("the API server accepts a privileged container with allowPrivilegeEscalation false: %v\n%s", err, out)
	}
	// Nothing was created by the dry runs.
	if out, err := kubectl("get", "daemonsets", "-n", Namespace, "-o", "name"); err != nil || strings.TrimSpace(out) != "" {
		t.Errorf("after dry runs, daemonsets: %v %q", err, out)
	}
}

// startAPIServer starts etcd and kube-apiserver on loopback for the test and returns a
// kubeconfig for an administrator.
func startAPIServer(t *testing.T, bin, dir string) string {
	t.Helper()
	etcdClient, etcdPeer, apiPort := freePort(t), freePort(t), freePort(t)
	start := func(name string, args ...string) <-chan struct{} { return startLogged(t, bin, dir, name, args...) }
	client := fmt.Sprintf("http://127.0.0.1:%d", etcdClient)
	peer := fmt.Sprintf("http://127.0.0.1:%d", etcdPeer)
	start("etcd", "--data-dir", filepath.Join(dir, "etcd"), "--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", "default="+peer, "--log-level", "warn")

	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(dir, "sa.key")
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}), 0o600)
	token := rand.Text()
	tokens := filepath.Join(dir, "tokens.csv")
	os.WriteFile(tokens, []byte(token+`,admin,admin,"system:masters"`+"\n"), 0o600)
	// The endpoint reconciler refuses a loopback address; nothing here needs the kubernetes
	// Service's endpoints.
	apiExited := start("kube-apiserver", "--endpoint-reconciler-type", "none", "--etcd-servers", client, "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
		"--secure-port", fmt.Sprint(apiPort), "--cert-dir", filepath.Join(dir, "certs"), "--token-auth-file", tokens,
		"--authorization-mode", "RBAC", "--allow-privileged=true", "--service-cluster-ip-range", "10.96.0.0/16",
		"--service-account-issuer", "https://kubernetes.default.svc", "--service-account-key-file", keyFile,
		"--service-account-signing-key-file", keyFile, "--enable-priority-and-fairness=false")

	server := fmt.Sprintf("https://127.0.0.1:%d", apiPort)
	waitReady(t, server, token, apiExited)
	kc := map[string]any{
		"apiVersion": "v1", "kind": "Config", "current-context": "test",
		"clusters": []any{map[string]any{"name": "test", "cluster": map[string]any{"server": server, "insecure-skip-tls-verify": true}}},
		"users":    []any{map[string]any{"name": "admin", "user": map[string]any{"token": token}}},
		"contexts": []any{map[string]any{"name": "test", "context": map[string]any{"cluster": "test", "user": "admin"}}},
	}
	b, _ := json.Marshal(kc)
	path := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// startLogged starts bin/name with args, its output in dir/name.log (the end of which is
// logged if the test fails), and stops it when the test ends. The channel closes when it exits.
func startLogged(t *testing.T, bin, dir, name string, args ...string) <-chan struct{} {
	t.Helper()
	log, err := os.Create(filepath.Join(dir, name+".log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(bin, name), args...)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		log.Close()
		if t.Failed() {
			b, _ := os.ReadFile(log.Name())
			if len(b) > 8000 {
				b = b[len(b)-8000:]
			}
			t.Logf("%s log (end):\n%s", name, b)
		}
	})
	return exited
}

// waitReady waits up to 2 minutes for the API server at server to say it is ready.
func waitReady(t *testing.T, server, token string, exited <-chan struct{}) {
	t.Helper()
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for {
		req, _ := http.NewRequestWithContext(ctx, "GET", server+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := hc.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("kube-apiserver not ready after 2 minutes: %v", err)
		case <-exited:
			t.Fatal("kube-apiserver exited")
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// operatorCRD fetches the CRD of kind (servicemonitors, prometheusrules) from the Prometheus
// operator's module (the Go module proxy) and returns its path.
func operatorCRD(t *testing.T, kind string) string {
	t.Helper()
	out, err := exec.Command("go", "mod", "download", "-json", ServiceMonitorCRD).Output()
	if err != nil {
		t.Fatalf("go mod download %s: %v", ServiceMonitorCRD, err)
	}
	var mod struct{ Dir, Error string }
	if err := json.Unmarshal(out, &mod); err != nil || mod.Dir == "" {
		t.Fatalf("go mod download %s: %v %s", ServiceMonitorCRD, err, mod.Error)
	}
	return filepath.Join(mod.Dir, "example", "prometheus-operator-crd", "monitoring.coreos.com_"+kind+".yaml")
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
