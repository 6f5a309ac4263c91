// Package e2e runs the real tetherd and tetherctl binaries against the running kernel: each test
// starts its own tetherd with its own pins, agent parent cgroup, socket and decision log, and
// drives agents with tetherctl run. Agents run the test binary itself as a helper (privtest).
package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/policies"
)

func TestMain(m *testing.M) {
	privtest.Main(m, func() {
		if binDir != "" {
			os.RemoveAll(binDir) // the binaries built for this run
		}
	})
}

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// binaries builds tetherd and tetherctl once per test run, or takes them from the directory
// TETHER_E2E_BIN names (the test guest of make test-vm has no Go toolchain).
func binaries(t *testing.T) string {
	t.Helper()
	if dir := os.Getenv("TETHER_E2E_BIN"); dir != "" {
		return dir
	}
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "tether-e2e-bin")
		if buildErr != nil {
			return
		}
		out, err := exec.Command("go", "build", "-o", binDir+"/", "../../cmd/tetherd", "../../cmd/tetherctl").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("building binaries: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binDir
}

// tetherd is one tetherd the test started.
type tetherd struct {
	t         *testing.T
	bin       string
	dir       string // short: holds the socket
	config    string
	socket    string
	decisions string
	parent    string // the agent parent cgroup
	pin       string
	self      string // the test binary, which agents run as helpers
	policy    string // the policy directory
	// policyConfig replaces the policy section of the configuration (a bundle), and extra is
	// appended to it (dns, ...).
	policyConfig, extra string
	// credExtra is added to the credentials section (indented two spaces).
	credExtra string
	// logExtra is added to the decision_log section (indented two spaces).
	logExtra string
	// allowSample is bpf.allow_sample (1: every allow logged).
	allowSample int
	// ringBytes is bpf.ring_buffer_bytes (0: the default).
	ringBytes int
	// lostBefore: records counted lost by the tetherds this one replaced (their metrics ended
	// with them; see carryLost).
	lostBefore uint64
	// wrap runs tetherd through a command (setpriv ... --), env is added to its environment,
	// and cgroup, when set, is the cgroup tetherd starts in.
	wrap   []string
	env    []string
	cgroup string

	cmd    *exec.Cmd
	stderr *lockedBuffer
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// profile is what the test's policy gives the agent identity (a task type profile of the
// shipped policies: exec, egress, unix).
type profile map[string]any

// newTetherd prepares (does not start) a tetherd whose policy is the shipped Rego with data that
// give agentID the profile p.
func newTetherd(t *testing.T, p profile) *tetherd {
	t.Helper()
	privtest.Gate(t)
	bin := binaries(t)
	dir, err := os.MkdirTemp("", "tte")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o711) // agents running as other users reach their credential files below it
	self := privtest.AgentBinary(t)
	d := &tetherd{
		t: t, bin: bin, dir: dir, config: filepath.Join(dir, "tetherd.yaml"), socket: filepath.Join(dir, "t.sock"),
		decisions: filepath.Join(dir, "decisions.jsonl"), parent: privtest.Cgroup(t), pin: privtest.PinDir(t), self: self,
		policy: filepath.Join(dir, "policy"), allowSample: 1,
	}
	// The shipped Rego, with the test's data.
	rego, _ := fs.Glob(policies.FS, "tether/*.rego")
	os.MkdirAll(filepath.Join(d.policy, "tether"), 0o755)
	for _, name := range rego {
		if strings.HasSuffix(name, "_test.rego") {
			continue
		}
		b, _ := policies.FS.ReadFile(name)
		if err := os.WriteFile(filepath.Join(d.policy, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	d.writePolicy(p)
	d.writeConfig()
	// tetherd mounts a tmpfs for the task credentials in the test's directory.
	t.Cleanup(func() { unix.Unmount(filepath.Join(dir, "creds"), unix.MNT_DETACH) })
	t.Cleanup(d.stop)
	return d
}

// freezeAfter is tether_settings.respond.freeze_after_denied_egress in the tests' policy data:
// 0, so that agents that make denied connects on purpose are not frozen by the respond policy
// (TestPrivilegedRespond sets the shipped 3).
var freezeAfter = 0

// policyData is the data document that gives agentID the profile p (task type "e2e", also its
// type without a task).
func policyData(p profile) map[string]any {
	for k, v := range map[string]any{"exec": []string{}, "egress": []any{}, "unix": []any{}, "high_risk": []string{}} {
		if _, ok := p[k]; !ok {
			p[k] = v
		}
	}
	return map[string]any{"tether_settings": map[string]any{
		"networks": map[string]any{"metadata": []string{"169.254.169.254/32"}}, "internal_networks": []string{},
		"git_binary": "/usr/bin/git", "tools": map[string]any{},
		"profiles":   map[string]any{"e2e": p},
		"identities": map[string]any{agentID: map[string]any{"task_type": "e2e"}},
		"respond":    map[string]any{"freeze_after_denied_egress": freezeAfter},
	}}
}

// writeProfiles gives each identity (SPIFFE ID -> task type without a task) and task type its
// profile.
func (d *tetherd) writeProfiles(profiles map[string]profile, identities map[string]string) {
	d.t.Helper()
	data := policyData(profile{})
	st := data["tether_settings"].(map[string]any)
	ps, ids := map[string]any{}, map[string]any{}
	for name, p := range profiles {
		ps[name] = policyData(p)["tether_settings"].(map[string]any)["profiles"].(map[string]any)["e2e"]
	}
	for id, typ := range identities {
		ids[id] = map[string]any{"task_type": typ}
	}
	st["profiles"], st["identities"] = ps, ids
	b, _ := json.MarshalIndent(data, "", "  ")
	if err := os.WriteFile(filepath.Join(d.policy, "data.json"), b, 0o644); err != nil {
		d.t.Fatal(err)
	}
}

// writePolicy gives agentID the profile p.
func (d *tetherd) writePolicy(p profile) {
	d.t.Helper()
	b, _ := json.MarshalIndent(policyData(p), "", "  ")
	if err := os.WriteFile(filepath.Join(d.policy, "data.json"), b, 0o644); err != nil {
		d.t.Fatal(err)
	}
}

func (d *tetherd) writeConfig() {
	d.t.Helper()
	policySection := "policy:\n  dir: " + d.policy
	if d.policyConfig != "" {
		policySection = d.policyConfig
	}
	ringBytes := ""
	if d.ringBytes != 0 {
		ringBytes = fmt.Sprintf("  ring_buffer_bytes: %d\n", d.ringBytes)
	}
	cfg := fmt.Sprintf(`cgroup:
  agent_parents: [%s]
  launch_parent: %s
bpf:
  pin_dir: %s
  allow_sample: %d
%sapi:
  socket: %s
  agent_socket: %s
%s
decision_log:
  path: %s
%s
log:
  level: debug
kill:
  state_file: %s
credentials:
  dir: %s
  key_file: %s
  ttl: 10s
%s
%s`, d.parent, d.parent, d.pin, d.allowSample, ringBytes, d.socket, filepath.Join(d.dir, "agent.sock"), policySection, d.decisions, d.logExtra, filepath.Join(d.dir, "kill-state.json"), filepath.Join(d.dir, "creds"), filepath.Join(d.dir, "credentials.key"), d.credExtra, d.extra)
	if err := os.WriteFile(d.config, []byte(cfg), 0o600); err != nil {
		d.t.Fatal(err)
	}
}

// start runs tetherd and waits until its API answers.
func (d *tetherd) start() {
	d.t.Helper()
	d.stderr = &lockedBuffer{}
	argv := append(slices.Clone(d.wrap), filepath.Join(d.bin, "tetherd"), "--config", d.config)
	d.cmd = exec.Command(argv[0], argv[1:]...)
	d.cmd.Stderr = d.stderr
	d.cmd.Env = append(os.Environ(), d.env...)
	if d.cgroup != "" {
		cg, err := os.Open(d.cgroup)
		if err != nil {
			d.t.Fatal(err)
		}
		defer cg.Close()
		d.cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	}
	if err := d.cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	// Generous: in the emulated guest of make test-vm, loading the programs alone takes 15 s.
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if _, _, code := d.ctlRaw("status"); code == 0 {
			return
		}
		if d.cmd.ProcessState != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	d.t.Fatalf("tetherd did not become ready; its log:\n%s", d.stderr.String())
}

// kill9 kills tetherd the hard way: no cleanup of any kind runs.
func (d *tetherd) kill9() {
	d.t.Helper()
	d.cmd.Process.Signal(syscall.SIGKILL)
	d.cmd.Wait()
	d.cmd = nil
}

// stop ends tetherd with SIGTERM (pins stay; the test's PinDir cleanup removes them).
func (d *tetherd) stop() {
	if d.cmd == nil {
		return
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { d.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		d.cmd.Process.Kill()
		<-done
		d.t.Errorf("tetherd did not stop on SIGTERM; log:\n%s", d.stderr.String())
	}
	if d.t.Failed() {
		d.t.Logf("tetherd log:\n%s", d.stderr.String())
	}
	d.cmd = nil
}

func (d *tetherd) ctlCmd(args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(d.bin, "tetherctl"), append([]string{"--socket", d.socket}, args...)...)
	return cmd
}

func (d *tetherd) ctlRaw(args ...string) (string, string, int) {
	cmd := d.ctlCmd(args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			code = 128 + int(ws.Signal())
		}
	} else if err != nil {
		d.t.Fatal(err)
	}
	return stdout.String(), stderr.String(), code
}

// ctl runs tetherctl and fails the test unless it succeeds.
func (d *tetherd) ctl(args ...string) string {
	d.t.Helper()
	out, errOut, code := d.ctlRaw(args...)
	if code != 0 {
		d.t.Fatalf("tetherctl %v: exit %d\n%s%s", args, code, out, errOut)
	}
	return out
}

// agentRun runs the test binary's helper as an agent through tetherctl run.
func (d *tetherd) agentRun(id, helper string, args ...string) *exec.Cmd {
	cmd := d.ctlCmd(append([]string{"run", "--id", id, "--", d.self}, args...)...)
	cmd.Env = append(os.Environ(), "TETHER_TEST_HELPER="+helper)
	return cmd
}

func (d *tetherd) agents() []agents.Agent {
	d.t.Helper()
	var list []agents.Agent
	if err := json.Unmarshal([]byte(d.ctl("agents", "-o", "json")), &list); err != nil {
		d.t.Fatal(err)
	}
	return list
}

// decisionsMatching waits until the decision log holds a record match accepts.
func (d *tetherd) decision(what string, match func(events.Decision) bool) events.Decision {
	d.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		f, err := os.Open(d.decisions)
		if err == nil {
			sc := bufio.NewScanner(f)
			sc.Buffer(nil, 1<<20)
			for sc.Scan() {
				var rec events.Decision
				if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
					f.Close()
					d.t.Fatalf("decision log line %q: %v", sc.Text(), err)
				}
				if match(rec) {
					f.Close()
					return rec
				}
			}
			f.Close()
		}
		time.Sleep(50 * time.Millisecond)
	}
	d.t.Fatalf("no decision: %s", what)
	return events.Decision{}
}

// counter counts accepted connections on a listener.
type counter struct {
	mu sync.Mutex
	n  int
}

func (c *counter) get() int { c.mu.Lock(); defer c.mu.Unlock(); return c.n }

// await returns the count once it reaches want, or what it is after 5 s: a connect returns once
// the kernel has the connection, before the listener's goroutine has accepted it.
func (c *counter) await(want int) int {
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if n := c.get(); n >= want || time.Now().After(deadline) {
			return n
		}
	}
}

func accept(l net.Listener) *counter {
	c := &counter{}
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			c.mu.Lock()
			c.n++
			c.mu.Unlock()
			conn.Close()
		}
	}()
	return c
}

func lines(s string) []string { return strings.Fields(strings.TrimSpace(s)) }
