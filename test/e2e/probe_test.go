package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
)

// TestPrivilegedHealthProbes: /readyz answers 200 only once the programs are attached, and 503
// with the reason when a link pin is gone (enforcement would not survive a restart); /healthz
// answers 200 while the main loop runs. These are the DaemonSet's probes.
func TestPrivilegedHealthProbes(t *testing.T) {
	d := newTetherd(t, profile{})
	mport := freePort(t)
	d.extra = fmt.Sprintf("telemetry:\n  metrics_address: 127.0.0.1:%d\n", mport)
	d.writeConfig()
	d.start()

	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d%s", mport, path))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, strings.TrimSpace(string(b))
	}
	if code, body := get("/readyz"); code != 200 || body != "ok" {
		t.Fatalf("/readyz after start: %d %q", code, body)
	}
	if code, body := get("/healthz"); code != 200 || body != "ok" {
		t.Fatalf("/healthz: %d %q", code, body)
	}

	pins, err := filepath.Glob(filepath.Join(d.pin, "links", "cg-*-connect4"))
	if err != nil || len(pins) != 1 {
		t.Fatalf("connect4 link pins: %v %v", pins, err)
	}
	if err := os.Remove(pins[0]); err != nil {
		t.Fatal(err)
	}
	code, body := get("/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, pins[0]) {
		t.Fatalf("/readyz with a link pin removed: %d %q, want 503 naming %s", code, body, pins[0])
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Fatalf("/healthz with a link pin removed: %d (liveness is the main loop, not enforcement)", code)
	}
}

// TestPrivilegedProbeCommand: `tetherd probe` finds every requirement on this machine (tether
// runs here) and exits 0; in a cgroup namespace of its own it says so, unless $TETHER_CGROUPNS
// makes tetherd enter another; with a pin directory off any bpffs it names what is missing, how to
// fix it, and exits 1.
func TestPrivilegedProbeCommand(t *testing.T) {
	privtest.Gate(t)
	bin := binaries(t)
	start := time.Now()
	out, err := exec.Command(filepath.Join(bin, "tetherd"), "probe").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "tether can run on this node") {
		t.Fatalf("tetherd probe: %v\n%s", err, out)
	}
	for _, want := range []string{"cgroup v2", "kernel BTF", "BTF tracepoint programs", "cgroup freezer and cgroup.kill", "BPF LSM"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("tetherd probe does not report %q:\n%s", want, out)
		}
	}
	t.Logf("tetherd probe (%s):\n%s", time.Since(start).Round(time.Millisecond), out)

	// In a cgroup namespace of its own, /proc/PID/cgroup names cgroups relative to it: the probe
	// says so, and tetherd enters the namespace $TETHER_CGROUPNS names (here this test's own).
	cg := privtest.Cgroup(t)
	unshared := func(env ...string) string {
		t.Helper()
		dir, err := os.Open(cg)
		if err != nil {
			t.Fatal(err)
		}
		defer dir.Close()
		cmd := exec.Command("unshare", "--cgroup", filepath.Join(bin, "tetherd"), "probe")
		cmd.Env = append(os.Environ(), env...)
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
		out, _ := cmd.CombinedOutput()
		return string(out)
	}
	if out := unshared(); !strings.Contains(out, "tetherd is in a cgroup namespace of its own") {
		t.Errorf("tetherd probe in a cgroup namespace of its own:\n%s", out)
	}
	if out := unshared(fmt.Sprintf("TETHER_CGROUPNS=/proc/%d/ns/cgroup", os.Getpid())); !strings.Contains(out, "tether can run on this node") {
		t.Errorf("tetherd probe told to enter this test's cgroup namespace:\n%s", out)
	}

	dir := t.TempDir()
	cfg := filepath.Join(dir, "tetherd.yaml")
	if err := os.WriteFile(cfg, []byte("bpf:\n  pin_dir: "+filepath.Join(dir, "pins", "tether")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err = exec.Command(filepath.Join(bin, "tetherd"), "--config", cfg, "probe").CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(out), "bpffs") || !strings.Contains(string(out), "MISSING") ||
		!strings.Contains(string(out), "1 requirement(s) missing") {
		t.Fatalf("tetherd probe with the pins off bpffs: %v\n%s", err, out)
	}
	checkProbeJSON(t, bin, cfg)
}

// checkProbeJSON: `tetherd probe -o json` says the same, for a program, with the same exit status:
// ok on this machine, and with a configuration whose pins are off bpffs (cfg) the missing
// requirement with its fix.
func checkProbeJSON(t *testing.T, bin, cfg string) {
	for _, c := range []struct {
		args []string
		ok   bool
	}{{[]string{"probe", "-o", "json"}, true}, {[]string{"--config", cfg, "probe", "-o", "json"}, false}} {
		cmd := exec.Command(filepath.Join(bin, "tetherd"), c.args...)
		cmd.Stderr = io.Discard
		out, err := cmd.Output()
		var rep struct {
			OK           bool `json:"ok"`
			Requirements []struct {
				Name     string `json:"name"`
				OK       bool   `json:"ok"`
				Required bool   `json:"required"`
				Fix      string `json:"fix"`
			} `json:"requirements"`
		}
		if jerr := json.Unmarshal(out, &rep); jerr != nil || rep.OK != c.ok || (err == nil) != c.ok || len(rep.Requirements) < 5 {
			t.Fatalf("tetherd %v: %v, %v\n%s", c.args, err, jerr, out)
		}
		missing := 0
		for _, r := range rep.Requirements {
			if r.Required && !r.OK {
				missing++
				if r.Fix == "" || !strings.Contains(r.Name+r.Fix, "bpf") {
					t.Errorf("tetherd %v: a missing requirement without its fix: %+v", c.args, r)
				}
			}
		}
		if (missing == 0) != c.ok {
			t.Errorf("tetherd %v: %d missing, ok %v", c.args, missing, rep.OK)
		}
	}
}

// TestPrivilegedMissingAgentParent: with cgroup.create_parents off (the DaemonSet's setting: the
// kubelet owns the pods' parent), a missing agent parent stops tetherd with a clear error and
// nothing is created.
func TestPrivilegedMissingAgentParent(t *testing.T) {
	d := newTetherd(t, profile{})
	missing := filepath.Join(d.parent, "kubepods.slice")
	b, err := os.ReadFile(d.config)
	if err != nil {
		t.Fatal(err)
	}
	cfg := strings.Replace(string(b), "cgroup:\n", "cgroup:\n  create_parents: false\n", 1)
	cfg = strings.ReplaceAll(cfg, d.parent, missing)
	if !strings.Contains(cfg, "create_parents: false") {
		t.Fatalf("no cgroup section in the test configuration:\n%s", b)
	}
	if err := os.WriteFile(d.config, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(filepath.Join(d.bin, "tetherd"), "--config", d.config).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "agent parent "+missing+" must exist") {
		t.Fatalf("tetherd with a missing agent parent: %v\n%s", err, out)
	}
	if _, err := os.Stat(missing); !os.IsNotExist(err) {
		t.Errorf("the missing agent parent was created: %v", err)
	}
}
